//! The index fed events like the watches feed it; assertions on what it publishes
//! to nodes and what it asks the controllers to reconcile.

use std::collections::BTreeSet;

use serde_json::json;
use supermesh_protocol::{InstanceReport, Phase};

use super::*;
use crate::fixtures::{listed, mesh, microservice as msvc, new_index, node, session};

/// Resource strings and versions a node is published to hold.
fn held(rx: &watch::Receiver<Arc<NodeDesired>>) -> Vec<(String, String)> {
    rx.borrow().resources.iter().map(|(r, p)| (r.to_string(), p.version.clone())).collect()
}

/// Drains what the index asked so far of one controller.
fn drained<K: Resource>(rx: &mut UnboundedReceiver<ObjectRef<K>>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    while let Ok(r) = rx.try_recv() {
        out.insert(r.name.clone());
    }
    out
}

fn connect(index: &Index, name: &str) -> watch::Receiver<Arc<NodeDesired>> {
    index.connect(name, 1, session(None))
}

#[test]
fn nothing_is_complete_until_every_kind_is_listed_and_placed() {
    let (index, _t) = new_index();
    let mut a = connect(&index, "a");
    index.mesh_event(&watcher::Event::InitDone);
    index.node_event(&watcher::Event::Init);
    index.node_event(&watcher::Event::InitApply(node("a", "acme", "lan")));
    index.node_event(&watcher::Event::InitDone);
    index.mesh_event(&watcher::Event::Apply(mesh("m", json!({"type": "Account", "account": "acme"}))));
    assert!(!a.borrow().complete && !index.is_synced(), "Microservices are not listed yet");
    index.microservice_event(&watcher::Event::Init);
    index.microservice_event(&watcher::Event::InitApply(msvc("web", "m", 1, json!({}))));
    index.microservice_event(&watcher::Event::InitDone);
    assert!(index.is_synced());
    assert!(a.has_changed().unwrap());
    let desired = a.borrow_and_update().clone();
    assert!(desired.complete);
    assert_eq!(
        desired.resources.keys().map(|k| &**k).collect::<Vec<_>>(),
        ["_/membership/lan", "team/microservice/web"]
    );
}

#[test]
fn a_microservice_reaches_exactly_the_nodes_its_mesh_admits() {
    let (index, mut t) = new_index();
    let meshes = vec![mesh("m", json!({"type": "Account", "account": "acme"}))];
    let nodes = vec![node("a", "acme", "lan"), node("b", "globex", "lan"), node("c", "acme", "wan")];
    listed(&index, meshes, nodes, vec![msvc("web", "m", 1, json!({}))]);
    let (a, b, c) = (connect(&index, "a"), connect(&index, "b"), connect(&index, "c"));
    assert_eq!(held(&a).iter().filter(|(r, _)| r.contains("microservice")).count(), 1);
    assert!(held(&b).iter().all(|(r, _)| !r.contains("microservice")), "another account's node runs nothing");
    assert_eq!(index.placed(&Key::new("team", "web")), BTreeSet::from(["a".into(), "c".into()]));
    let inputs = index.microservice(&Key::new("team", "web")).unwrap();
    assert!(matches!(*inputs.plan, Plan::Placed(ref p) if p.candidates == 2));
    assert_eq!(index.node("a").counts.desired, 1);
    assert_eq!(drained(&mut t.microservices), BTreeSet::from(["web".to_string()]));
    assert!(held(&c).iter().any(|(r, v)| r == "team/microservice/web" && v == "1-uid-web"));
}

#[test]
fn a_spec_change_republishes_only_the_nodes_that_run_it() {
    let (index, _t) = new_index();
    let meshes = vec![
        mesh("east", json!({"type": "Network", "networks": ["e"]})),
        mesh("west", json!({"type": "Network", "networks": ["w"]})),
    ];
    let nodes = vec![node("e1", "acme", "e"), node("w1", "acme", "w")];
    listed(&index, meshes, nodes, vec![msvc("web", "east", 1, json!({})), msvc("db", "west", 1, json!({}))]);
    let (mut e1, mut w1) = (connect(&index, "e1"), connect(&index, "w1"));
    e1.mark_unchanged();
    w1.mark_unchanged();
    index.microservice_event(&watcher::Event::Apply(msvc("web", "east", 2, json!({"args": ["--v2"]}))));
    assert!(e1.has_changed().unwrap(), "the node running web hears of its new version");
    assert!(!w1.has_changed().unwrap(), "a node running only db is not woken");
    assert!(held(&e1).contains(&("team/microservice/web".into(), "2-uid-web".into())));
    // Encoded once: every node holding web shares the same prepared change.
    let shared = e1.borrow().resources["team/microservice/web"].clone();
    assert_eq!(shared.version, "2-uid-web");
}

#[test]
fn node_changes_move_instances_and_ask_only_for_what_changed() {
    let (index, mut t) = new_index();
    let meshes = vec![
        mesh("m", json!({"type": "Account", "account": "acme"})),
        mesh("other", json!({"type": "Account", "account": "globex"})),
    ];
    let nodes = vec![node("a", "acme", "lan")];
    let msvcs = vec![msvc("web", "m", 1, json!({"nodeSelector": {"gpu": "yes"}})), msvc("db", "other", 1, json!({}))];
    listed(&index, meshes, nodes, msvcs);
    drained(&mut t.microservices);
    drained(&mut t.meshes);
    let mut labeled = node("a", "acme", "lan");
    labeled.metadata.labels = Some([("gpu".to_string(), "yes".to_string())].into());
    index.node_event(&watcher::Event::Apply(labeled.clone()));
    assert_eq!(index.placed(&Key::new("team", "web")), BTreeSet::from(["a".to_string()]));
    assert_eq!(drained(&mut t.microservices), BTreeSet::from(["web".to_string()]), "db's mesh does not admit a");
    assert_eq!(drained(&mut t.meshes), BTreeSet::new(), "a was a member of m before and after");
    // A status-only change moves nothing.
    let mut reported = labeled.clone();
    reported.status = Some(Default::default());
    reported.status.as_mut().unwrap().agent_version = Some("9".into());
    index.node_event(&watcher::Event::Apply(reported));
    assert!(drained(&mut t.microservices).is_empty());
    // Moving to another account leaves m and joins other.
    let mut moved = labeled;
    moved.spec.account = "globex".into();
    index.node_event(&watcher::Event::Apply(moved));
    assert!(index.placed(&Key::new("team", "web")).is_empty());
    assert_eq!(index.placed(&Key::new("team", "db")), BTreeSet::from(["a".to_string()]));
    assert_eq!(drained(&mut t.meshes), BTreeSet::from(["m".to_string(), "other".to_string()]));
}

#[test]
fn memberships_list_the_network_with_live_addresses_and_leave_others_alone() {
    let (index, _t) = new_index();
    listed(&index, vec![], vec![node("a", "acme", "lan"), node("b", "acme", "lan"), node("x", "acme", "wan")], vec![]);
    let mut a = index.connect("a", 1, session(Some("10.0.0.1:10360")));
    let mut x = connect(&index, "x");
    let before = a.borrow_and_update().resources["_/membership/lan"].version.clone();
    x.mark_unchanged();
    let mut s = index.lock();
    s.flush_memberships(&index);
    s.publish();
    drop(s);
    let membership = match a.borrow_and_update().resources["_/membership/lan"].change().unwrap() {
        Change::Membership(m) => m,
        other => panic!("{other:?}"),
    };
    assert_ne!(membership.version(), before, "a's session gave it a peer address");
    let names: Vec<&str> = membership.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(membership.members[0].address.as_deref(), Some("10.0.0.1:10360"));
    assert!(!x.has_changed().unwrap(), "another network hears nothing");
    // A node being deleted leaves its network's membership.
    let mut leaving = node("b", "acme", "lan");
    leaving.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    index.node_event(&watcher::Event::Apply(leaving));
    let mut s = index.lock();
    s.flush_memberships(&index);
    s.publish();
    drop(s);
    let after = a.borrow().resources["_/membership/lan"].change().unwrap();
    match after {
        Change::Membership(m) => assert_eq!(m.members.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn memberships_carry_enrolled_keys_and_capacities_and_follow_a_new_enrollment() {
    use supermesh_api::names::identity;
    let enrolled = |name: &str, key: &str| {
        let mut n = node(name, "acme", "lan");
        n.metadata.annotations = Some([(identity::KEY.to_owned(), key.to_owned())].into());
        n
    };
    let (index, _t) = new_index();
    listed(&index, vec![], vec![enrolled("a", "key-a1"), node("b", "acme", "lan")], vec![]);
    let capacity = supermesh_protocol::Capacity { cpus: 4, memory_bytes: 8 << 30 };
    let mut a = index.connect("a", 1, SessionInfo { capacity: Some(capacity), ..session(None) });
    let membership = |a: &mut watch::Receiver<Arc<NodeDesired>>| {
        let mut s = index.lock();
        s.flush_memberships(&index);
        s.publish();
        drop(s);
        match a.borrow_and_update().resources["_/membership/lan"].change().unwrap() {
            Change::Membership(m) => m,
            other => panic!("{other:?}"),
        }
    };
    let first = membership(&mut a);
    let of = |m: &supermesh_protocol::Membership, n: &str| m.member(n).map(|m| (m.key.clone(), m.capacity));
    assert_eq!(of(&first, "a"), Some((Some("key-a1".into()), 4008)));
    assert_eq!(of(&first, "b"), Some((None, 0)), "not enrolled, capacity unknown");
    assert!(first.cloud_key.is_some());
    // Reset and enrolled again with a new key: the members hear of the new key.
    index.node_event(&watcher::Event::Apply(enrolled("a", "key-a2")));
    assert_eq!(of(&membership(&mut a), "a"), Some((Some("key-a2".into()), 4008)));
}

#[test]
fn reports_ask_for_a_status_only_when_they_change_something() {
    let (index, mut t) = new_index();
    let meshes = vec![mesh("m", json!({"type": "Account", "account": "acme"}))];
    listed(&index, meshes, vec![node("a", "acme", "lan")], vec![msvc("web", "m", 1, json!({}))]);
    connect(&index, "a");
    drained(&mut t.microservices);
    drained(&mut t.nodes_later);
    let report = |taken_ms, phase| StatusReport {
        taken_ms,
        instances: vec![
            InstanceReport::new("team/microservice/web", "1-uid-web", phase),
            InstanceReport::new("team/microservice/stranger", "1", Phase::Ready),
        ],
        cluster: None,
    };
    assert!(index.take_status("a", report(1, Phase::Running), None));
    assert_eq!(drained(&mut t.microservices), BTreeSet::from(["web".to_string()]));
    assert_eq!(drained(&mut t.nodes_later), BTreeSet::from(["a".to_string()]), "one instance runs now");
    assert!(index.take_status("a", report(2, Phase::Running), None), "a newer snapshot is taken");
    assert!(drained(&mut t.microservices).is_empty(), "an unchanged snapshot asks for nothing");
    assert!(!index.take_status("a", report(2, Phase::Ready), None), "a snapshot no newer is dropped");
    assert!(index.take_status("a", report(3, Phase::Ready), None));
    assert_eq!(drained(&mut t.microservices), BTreeSet::from(["web".to_string()]));
    let inputs = index.microservice(&Key::new("team", "web")).unwrap();
    assert_eq!((inputs.aggregate.reported, inputs.aggregate.ready, inputs.aggregate.available), (1, 1, 1));
    let counts = index.node("a").counts;
    assert_eq!((counts.desired, counts.running, counts.ready), (1, 1, 1), "what is not placed does not count");
}

#[test]
fn a_relist_forgets_what_is_gone() {
    let (index, _t) = new_index();
    let meshes = vec![mesh("m", json!({"type": "Account", "account": "acme"}))];
    listed(
        &index,
        meshes,
        vec![node("a", "acme", "lan"), node("b", "acme", "lan")],
        vec![msvc("web", "m", 1, json!({}))],
    );
    let b = connect(&index, "b");
    index.node_event(&watcher::Event::Init);
    index.node_event(&watcher::Event::InitApply(node("a", "acme", "lan")));
    assert_eq!(index.placed(&Key::new("team", "web")).len(), 2, "nothing is forgotten before the listing ends");
    index.node_event(&watcher::Event::InitDone);
    assert_eq!(index.placed(&Key::new("team", "web")), BTreeSet::from(["a".to_string()]));
    assert!(!b.borrow().complete, "a node without an EdgeNode is sent nothing, not told to delete");
    assert!(!index.knows("b"));
}

#[test]
fn events_are_taken_once_per_node_and_go_to_their_microservice() {
    let (index, _t) = new_index();
    let meshes = vec![mesh("m", json!({"type": "Account", "account": "acme"}))];
    listed(
        &index,
        meshes,
        vec![node("a", "acme", "lan"), node("b", "acme", "lan")],
        vec![msvc("web", "m", 1, json!({}))],
    );
    assert!(index.first_event("a", 7));
    assert!(!index.first_event("a", 7));
    assert!(index.first_event("b", 7), "another node's seq 7 is another event");
    let target = index.event_target("a", "team/microservice/web").unwrap();
    assert_eq!(target.microservice.uid.as_deref(), Some("uid-web"));
    assert_eq!(target.node.name.as_deref(), Some("a"));
    assert!(index.event_target("a", "team/microservice/gone").is_none());
}

#[test]
fn a_blocked_microservice_runs_nowhere_until_its_mesh_appears() {
    let (index, mut t) = new_index();
    listed(&index, vec![], vec![node("a", "acme", "lan")], vec![msvc("web", "m", 1, json!({}))]);
    let inputs = index.microservice(&Key::new("team", "web")).unwrap();
    assert!(
        matches!(*inputs.plan, Plan::Blocked { reason, .. } if reason == supermesh_api::names::condition::MESH_NOT_FOUND)
    );
    drained(&mut t.microservices);
    index.mesh_event(&watcher::Event::Apply(mesh("m", json!({"type": "Account", "account": "acme"}))));
    assert_eq!(index.placed(&Key::new("team", "web")), BTreeSet::from(["a".to_string()]));
    assert_eq!(drained(&mut t.microservices), BTreeSet::from(["web".to_string()]));
    assert_eq!(index.mesh(&Key::new("team", "m")).unwrap().microservices, 1);
    index.mesh_event(&watcher::Event::Delete(mesh("m", json!({"type": "Account", "account": "acme"}))));
    assert!(index.placed(&Key::new("team", "web")).is_empty());
}

#[test]
fn sessions_come_and_go_by_id() {
    let (index, mut t) = new_index();
    listed(&index, vec![], vec![node("a", "acme", "lan")], vec![]);
    index.connect("a", 1, session(None));
    index.connect("a", 2, session(None));
    index.disconnect("a", 1);
    assert!(index.node("a").session.is_some(), "an older session's end does not disconnect the newer");
    index.disconnect("a", 2);
    assert!(index.node("a").session.is_none());
    let mut asked = 0;
    while let Ok(r) = t.nodes_now.try_recv() {
        assert_eq!(r.name, "a");
        asked += 1;
    }
    assert_eq!(asked, 3, "two connects and the newer session's end; the older's end changes nothing");
}

#[test]
fn configuration_snapshots_go_only_to_the_nodes_that_run_their_revision() {
    let (index, _t) = new_index();
    let refs =
        json!({"replicas": 1, "env": [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]});
    let web = msvc("web", "m", 1, refs);
    let nodes = vec![node("a", "acme", "lan"), node("b", "acme", "lan")];
    listed(&index, vec![mesh("m", json!({"type": "Account", "account": "acme"}))], nodes, vec![web.clone()]);
    let (a, b) = (connect(&index, "a"), connect(&index, "b"));
    let web_of = |rx: &watch::Receiver<Arc<NodeDesired>>| held(rx).into_iter().any(|(r, _)| r.contains("microservice"));

    // Unresolved references: placed nowhere, and the plan says why.
    assert!(!web_of(&a) && !web_of(&b));
    let plan = index.microservice(&Key::new("team", "web")).unwrap().plan;
    assert!(matches!(*plan, Plan::Blocked { reason, .. } if reason == CONFIG_MISSING), "{plan:?}");

    // The reconciler resolved them into snapshot `web-config-1`: the revision names it.
    let mut resolved = web.clone();
    resolved.status = Some(supermesh_api::MicroserviceStatus {
        config: Some(supermesh_api::microservice::ResolvedConfig {
            references: crate::config::references_hash(&web.spec).unwrap(),
            hash: "1".into(),
            snapshot: "web-config-1".into(),
        }),
        ..Default::default()
    });
    index.microservice_event(&watcher::Event::Apply(resolved));
    let placed = index.placed(&Key::new("team", "web"));
    assert_eq!(placed.len(), 1);
    let (runs, other) = if placed.contains("a") { ("a", "b") } else { ("b", "a") };
    let assignment = index.assignment(runs, "team/microservice/web").expect("assigned");
    let frame = assignment.frame("x", None, 0, supermesh_protocol::Operation::Insert).unwrap();
    let body = supermesh_protocol::decode(&frame).unwrap().body().unwrap();
    let supermesh_protocol::Body::Insert(Change::Assignment(sent)) = body else { panic!("{body:?}") };
    assert_eq!(sent.config.as_deref(), Some("web-config-1"));
    assert!(index.may_read_config(runs, "team", "web-config-1"));
    assert!(!index.may_read_config(other, "team", "web-config-1"), "a node that does not run it");
    assert!(!index.may_read_config(runs, "other", "web-config-1"), "another namespace");
    assert!(!index.may_read_config(runs, "team", "db-config-1"), "another snapshot");
}
