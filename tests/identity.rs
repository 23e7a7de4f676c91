//! Node identity, black-box against the real binaries and API server: every device
//! enrolls once with a bootstrap token for a certificate of its own, and nothing it
//! says about another node (or a copy of another's config) makes it that node. Each
//! attack asserts the refusal and that nothing changed for the victim.

use std::os::unix::fs::PermissionsExt;

use std::collections::BTreeMap;

use futures::{SinkExt, StreamExt};
use kube::api::Api;
use serde_json::json;
use supermesh_api::{EdgeNode, Microservice};
use supermesh_protocol::{
    decode, encode, now_ms, Answer, Body, Connection, ErrorCode, EventReport, Hello, Message, Operation, Query,
    RelayedReport, Report, ReportBatch, StatusReport, BATCH_RESOURCE, CONNECTION_RESOURCE, STATUS_RESOURCE,
};
use supermesh_tests::{join_token_with, kubectl, microservice, supermeshctl, Agent, Launch, Site, AGENTS};
use tokio_tungstenite::tungstenite::Message as Frame;

/// The status and reason of condition `type_` of `node`.
fn condition(node: &EdgeNode, type_: &str) -> Option<(String, String)> {
    let c = node.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

fn annotation<'a>(node: &'a EdgeNode, key: &str) -> Option<&'a str> {
    node.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// A fresh agent of `site` named `name`, joining with `token`.
fn agent(site: &Site, name: &str, token: &str) -> Agent {
    let (network, account) = (format!("net-{}", site.id), format!("acct-{}", site.id));
    Agent::launch(name, &network, &account, &site.controller.cloudhub_addr, token, Launch::default())
}

#[tokio::test]
async fn a_device_enrolls_once_and_then_needs_no_token() {
    let site = Site::with_args("enroll", &["--reconnect-grace-seconds", "0"]).await;
    let mut agent = site.agent(0);
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    let connected = |n: &EdgeNode| condition(n, "Connected").is_some_and(|(s, _)| s == "True");
    let node = site.controller.wait_for(&nodes, &agent.name, "Connected=True", connected).await;
    assert_eq!(annotation(&node, "supermesh.io/identity").map(str::len), Some(64), "the enrolled key is recorded");
    assert_eq!(annotation(&node, "supermesh.io/approved"), Some("true"));
    assert_eq!(condition(&node, "Approved").unwrap(), ("True".into(), "NodeApproved".into()));
    assert!(agent.log().contains("is not needed any more"), "the agent says the token may go:\n{}", agent.log());
    let key = agent.data_dir.join("identity/node.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "the key is private");

    // Without the token, a restarted agent connects with its certificate.
    agent.stop();
    let gone = |n: &EdgeNode| condition(n, "Connected").is_some_and(|(s, _)| s != "True");
    site.controller.wait_for(&nodes, &agent.name, "Connected=False", gone).await;
    agent.edit_config(|yaml| yaml.replace(&format!(", token: \"{}\"", site.token), ""));
    assert!(!std::fs::read_to_string(agent.config()).unwrap().contains("token"));
    agent.restart();
    site.controller.wait_for(&nodes, &agent.name, "Connected=True without a token", connected).await;
    let enrollments = site.controller.metric("supermesh_controller_enrollments_total", "result=\"enrolled\"");
    assert_eq!(enrollments, Some(1.0), "one enrollment, not two");
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn a_copy_of_another_nodes_config_or_certificate_does_not_make_a_device_that_node() {
    let site = Site::new("impersonate").await;
    site.apply(&microservice("web", "m", ""));
    let victim = site.agent(0);
    let key = site.key("web");
    victim.wait_held("the victim's assignment", |h| h.contains_key(&key)).await;
    site.wait_agents(1.0).await;
    let held = victim.held();

    // A second device with a copy of the victim's edge.yaml (its name and token) and a data dir of its own.
    let copycat = claiming(&site, "copy", &victim.name);
    site.controller.wait_until("the copy to be refused", || copycat.log().contains("is already enrolled")).await;
    assert!(copycat.log().contains("409"), "{}", copycat.log());

    // A device presenting another node's certificate and key while claiming the victim's name.
    let other = site.agent(1);
    site.wait_agents(2.0).await;
    let mut thief = claiming(&site, "thief", &victim.name);
    thief.stop();
    let identity = thief.data_dir.join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    for file in ["node.key", "node.crt", "node.json", "cloud-ca.sha256"] {
        std::fs::copy(other.data_dir.join("identity").join(file), identity.join(file)).unwrap();
    }
    thief.restart();
    let refusal = format!("hello names node {:?} but the connection is for {:?}", victim.name, other.name);
    site.controller.wait_until("the claim to be refused", || site.controller.log().contains(&refusal)).await;

    // Nothing changed for the victim (nor for the node whose certificate was copied).
    for intruder in [&copycat, &thief] {
        assert!(intruder.held().is_empty(), "{} received nothing", intruder.name);
    }
    assert_eq!(victim.held(), held);
    let sessions = |name: &str| {
        site.controller
            .log()
            .lines()
            .filter(|l| l.contains("agent connected") && l.contains(&format!("node={name} ")))
            .count()
    };
    assert_eq!(sessions(&victim.name), 1, "the victim was never disconnected");
    assert_eq!(sessions(&other.name), 1, "the copied node was never disconnected");
    assert_eq!(site.controller.metric(AGENTS, ""), Some(2.0));
    site.cleanup(&[&victim, &other]).await;
}

/// A device of `site` with a data dir of its own (named `role`) whose edge.yaml states `name`.
fn claiming(site: &Site, role: &str, name: &str) -> Agent {
    let (network, account) = (format!("net-{}", site.id), format!("acct-{}", site.id));
    let how = Launch { claims: Some(name), ..Launch::default() };
    Agent::launch(&format!("{role}-{}", site.id), &network, &account, &site.controller.cloudhub_addr, &site.token, how)
}

#[tokio::test]
async fn the_stream_refuses_a_token_alone() {
    let site = Site::new("token-alone").await;
    let (config, identity) = site.device(&format!("alone-{}", site.id));
    let refused = supermesh_agent::edgehub::connect(&config.cloud.address, &identity).await.expect_err("refused");
    match refused {
        supermesh_agent::edgehub::LinkError::Refused { status, reason, .. } => {
            assert_eq!(status, 401);
            assert!(reason.contains("node certificate is required"), "{reason}");
        }
        other => panic!("expected a 401, got {other}"),
    }
    assert_eq!(
        site.controller.metric("supermesh_controller_cloudhub_refused_total", "reason=\"no_certificate\""),
        Some(1.0)
    );
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    assert!(nodes.get_opt(&format!("alone-{}", site.id)).await.unwrap().is_none());
}

#[tokio::test]
async fn tokens_enroll_only_in_scope_in_time_and_within_their_uses() {
    let site = Site::new("scope").await;
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    let refused = |agent: &Agent, says: &str| agent.log().contains(says);

    let other_account = join_token_with(&["--auto-approve", "--account", "someone-else"]).await;
    let outside = agent(&site, &format!("outside-{}", site.id), &other_account);
    site.controller
        .wait_until("enrollment outside the scope refused", || refused(&outside, "enrolls only nodes of account"))
        .await;
    assert!(outside.log().contains("403"));

    let pattern = join_token_with(&["--auto-approve", "--node-pattern", "cam-*"]).await;
    let misnamed = agent(&site, &format!("pi-{}", site.id), &pattern);
    site.controller
        .wait_until("a name outside the pattern refused", || refused(&misnamed, "enrolls only nodes named"))
        .await;

    let paris = join_token_with(&["--auto-approve", "--near", "48.8566,2.3522,30"]).await;
    let nowhere = agent(&site, &format!("nowhere-{}", site.id), &paris);
    site.controller
        .wait_until("a node stating no location refused", || refused(&nowhere, "state a location within"))
        .await;

    let once = join_token_with(&["--auto-approve", "--uses", "1"]).await;
    let first = agent(&site, &format!("first-{}", site.id), &once);
    site.controller.wait_until("the first use", || first.log().contains("connected to the cloud")).await;
    let second = agent(&site, &format!("second-{}", site.id), &once);
    site.controller.wait_until("the second use refused", || refused(&second, "is used up")).await;

    let brief = join_token_with(&["--auto-approve", "--ttl", "1s"]).await;
    let id = brief.split('.').nth(1).unwrap().to_owned();
    site.controller
        .wait_until("the brief token to expire", || {
            supermeshctl(&["token", "list"]).unwrap().lines().any(|l| l.starts_with(&id) && l.contains("expired"))
        })
        .await;
    let late = agent(&site, &format!("late-{}", site.id), &brief);
    site.controller.wait_until("the expired token refused", || refused(&late, "expired at")).await;

    let deleted = join_token_with(&["--auto-approve"]).await;
    let deleted_id = deleted.split('.').nth(1).unwrap().to_owned();
    supermeshctl(&["token", "delete", &deleted_id]).unwrap();
    let revoked = agent(&site, &format!("revoked-{}", site.id), &deleted);
    site.controller
        .wait_until("the deleted token refused", || refused(&revoked, "does not exist or was deleted"))
        .await;

    for refused in [&outside, &misnamed, &nowhere, &second, &late, &revoked] {
        assert!(nodes.get_opt(&refused.name).await.unwrap().is_none(), "no EdgeNode for {}", refused.name);
        assert!(refused.held().is_empty());
    }
    site.cleanup(&[&first]).await;
}

#[tokio::test]
async fn an_unapproved_node_gets_nothing_until_approved() {
    let site = Site::new("approve").await;
    site.apply(&microservice("web", "m", "  replicas: 2\n"));
    let approved = site.agent(0);
    let manual = join_token_with(&["--account", &format!("acct-{}", site.id)]).await;
    let pending = agent(&site, &format!("pending-{}", site.id), &manual);
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    let awaiting = |n: &EdgeNode| condition(n, "Approved") == Some(("False".into(), "PendingApproval".into()));
    let node = site.controller.wait_for(&nodes, &pending.name, "Approved=False", awaiting).await;
    assert!(node.spec.unschedulable, "a pending node takes no instances");
    assert!(pending.log().contains("awaits approval"), "{}", pending.log());
    let key = site.key("web");
    approved.wait_held("the approved node's assignment", |h| h.contains_key(&key)).await;
    site.wait_agents(2.0).await;
    assert!(pending.held().is_empty(), "a pending node holds nothing, not even its network's membership");

    supermeshctl(&["node", "approve", &pending.name]).unwrap();
    let admitted = |n: &EdgeNode| condition(n, "Approved").is_some_and(|(s, _)| s == "True");
    site.controller.wait_for(&nodes, &pending.name, "Approved=True", admitted).await;
    pending.wait_held("its assignment once approved", |h| h.contains_key(&key)).await;
    site.cleanup(&[&approved, &pending]).await;
}

#[tokio::test]
async fn a_revoked_node_is_cut_off_and_stays_out_until_reset() {
    let site = Site::new("revoke").await;
    site.apply(&microservice("web", "m", ""));
    let mut node = site.agent(0);
    let key = site.key("web");
    node.wait_held("its assignment", |h| h.contains_key(&key)).await;
    site.wait_agents(1.0).await;
    let pid = node.instance_pid(&key);

    supermeshctl(&["node", "revoke", &node.name]).unwrap();
    site.wait_agents(0.0).await;
    site.controller.wait_until("the agent to hear why", || node.log().contains("the cloud cut this node off")).await;
    site.controller.wait_until("its reconnects to be refused", || node.log().contains("the node was revoked")).await;
    assert_eq!(node.instance_pid(&key), pid, "its instance keeps running on the device");

    // A token does not bring a revoked name back: a device enrolling it is refused.
    node.stop();
    let reenroll = claiming(&site, "again", &node.name);
    site.controller.wait_until("re-enrollment refused", || reenroll.log().contains("is already enrolled")).await;
    drop(reenroll);

    // After a reset, a device may enroll the name again.
    supermeshctl(&["node", "reset", &node.name]).unwrap();
    let fresh = claiming(&site, "fresh", &node.name);
    site.wait_agents(1.0).await;
    fresh.wait_held("the assignment again", |h| h.contains_key(&key)).await;
    site.cleanup(&[&node, &fresh]).await;
}

#[tokio::test]
async fn a_certificate_expired_offline_renews_within_the_grace_and_not_after() {
    let site =
        Site::with_args("expiry", &["--certificate-lifetime-seconds", "6", "--certificate-grace-seconds", "6"]).await;
    let mut node = site.agent(0);
    site.wait_agents(1.0).await;
    site.controller.wait_until("a renewal in time", || node.log().contains("renewed the node certificate")).await;

    let not_after = |node: &Agent| -> i64 {
        let json = std::fs::read_to_string(node.data_dir.join("identity/node.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["notAfter"].as_i64().unwrap()
    };
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;

    // Offline past the certificate's end, back within the grace: it renews and connects.
    node.stop();
    site.wait_agents(0.0).await;
    let expiry = not_after(&node);
    site.controller.wait_until("the certificate to expire", || now() > expiry).await;
    let renewals = node.log().matches("renewed the node certificate").count();
    node.restart();
    site.wait_agents(1.0).await;
    assert!(node.log().contains("expired while offline"), "{}", node.log());
    assert!(node.log().matches("renewed the node certificate").count() > renewals);

    // Offline past the grace: refused.
    node.stop();
    site.wait_agents(0.0).await;
    let expiry = not_after(&node);
    site.controller.wait_until("the grace to pass", || now() > expiry + 6 + 1).await;
    node.restart();
    site.controller
        .wait_until("the expired certificate refused", || {
            node.log().lines().rev().take(20).any(|l| l.to_lowercase().contains("certificateexpired"))
        })
        .await;
    assert_eq!(site.controller.metric(AGENTS, ""), Some(0.0));
    site.cleanup(&[&node]).await;
}

/// A device speaking the protocol by hand with a certificate of its own: what a compromised
/// or hostile node can send.
struct Raw {
    ws: supermesh_agent::edgehub::Ws,
    name: String,
}

impl Raw {
    /// Enrolls `name` in `site`'s account and network, connects, and says hello claiming to hold `held`.
    async fn join(site: &Site, name: &str, held: BTreeMap<String, String>) -> Raw {
        let mut raw = Raw::connect(site, name).await;
        raw.hello(Hello { held, ..raw.hello_of(site) }).await;
        raw
    }

    /// The hello a device of `site` would send.
    fn hello_of(&self, site: &Site) -> Hello {
        Hello {
            node: self.name.clone(),
            account: format!("acct-{}", site.id),
            network: format!("net-{}", site.id),
            agent_version: "raw".into(),
            ..Hello::default()
        }
    }

    async fn hello(&mut self, hello: Hello) {
        self.send("h-1", CONNECTION_RESOURCE, &Body::NodeConnection(Connection::Hello(Box::new(hello)))).await;
    }

    /// The next message from the cloud, if the stream stays open.
    async fn next(&mut self) -> Option<Body> {
        let deadline = tokio::time::Instant::now() + supermesh_tests::DEADLINE;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("a message in time")?.ok()?;
            if let Frame::Text(text) = frame {
                return Some(decode(&text).unwrap().body().unwrap());
            }
            if let Frame::Close(_) = frame {
                return None;
            }
        }
    }

    /// Enrolls `name` in `site`'s account and network and connects, without a hello.
    async fn connect(site: &Site, name: &str) -> Raw {
        let (config, identity) = site.device(name);
        let ws = supermesh_agent::edgehub::dial(&config, &identity).await.expect("enroll and dial");
        Raw { ws, name: name.to_owned() }
    }

    async fn send(&mut self, id: &str, resource: &str, body: &Body) {
        let msg = Message::with_body(id.to_owned(), now_ms(), resource, body);
        self.ws.send(Frame::text(encode(&msg).unwrap())).await.unwrap();
    }

    /// The cloud's answer to message `id`, acknowledging whatever changes it sends meanwhile.
    async fn answer_to(&mut self, id: &str) -> Body {
        let deadline = tokio::time::Instant::now() + supermesh_tests::DEADLINE;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("an answer in time");
            let msg = decode(&frame.expect("open").unwrap().into_text().unwrap()).unwrap();
            let body = msg.body().unwrap();
            if msg.parent_id.as_deref() == Some(id) {
                return body;
            }
            if matches!(body, Body::Insert(_) | Body::Update(_) | Body::Delete) {
                let ack =
                    Message::with_body(format!("a-{}", msg.id), now_ms(), &msg.resource, &Body::Response(Answer::Ack));
                self.ws.send(Frame::text(encode(&ack.answering(&msg.id)).unwrap())).await.unwrap();
            }
        }
    }
}

fn status_of(node: &EdgeNode) -> (i32, i32) {
    let counts = node.status.as_ref().and_then(|s| s.instances.clone()).unwrap_or_default();
    (counts.running, counts.ready)
}

#[tokio::test]
async fn a_node_reports_only_for_itself_and_never_from_the_future() {
    let site = Site::new("relay").await;
    site.apply(&microservice("web", "m", ""));
    let victim = site.agent(0);
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    let before =
        site.controller.wait_for(&nodes, &victim.name, "the victim's instance ready", |n| status_of(n).1 == 1).await;

    // A node of the victim's network declares itself supernode and relays a report that the
    // victim runs nothing.
    let mut raw = Raw::join(&site, &format!("rogue-{}", site.id), BTreeMap::new()).await;
    let now = now_ms();
    let own = json!({"takenMs": now, "instances": [], "cluster": {"role": "Supernode", "supernode": raw.name}});
    let forged = json!({"takenMs": now, "instances": []});
    let entry = |node: &str, seq, content: serde_json::Value| RelayedReport {
        node: node.to_owned(),
        seq,
        operation: Operation::MetaSync,
        resource: STATUS_RESOURCE.into(),
        content,
        created_ms: now,
        signature: None,
    };
    let batch = ReportBatch { entries: vec![entry(&raw.name.clone(), 1, own), entry(&victim.name, 7, forged)] };
    raw.send("b-1", BATCH_RESOURCE, &Body::MetaSync(Report::Batch(batch))).await;
    let Body::Response(Answer::Batch(ack)) = raw.answer_to("b-1").await else { panic!("a batch answer") };
    assert!(ack.acked.iter().all(|id| id.node == raw.name), "only its own report is taken: {ack:?}");
    assert!(!ack.refused.iter().any(|(id, _)| id.node == victim.name), "the forged report is not taken either way");
    let not_taken = site.controller.metric("supermesh_controller_reports_not_taken_total", "reason=\"later\"");
    assert!(not_taken >= Some(1.0), "{not_taken:?}");

    // A report stamped an hour ahead is refused for good.
    let ahead = StatusReport { taken_ms: now + 3_600_000, instances: vec![], cluster: None };
    raw.send("o-2", STATUS_RESOURCE, &Body::MetaSync(Report::Status(ahead))).await;
    let Body::Error(refusal) = raw.answer_to("o-2").await else { panic!("refused") };
    assert_eq!(refusal.code, ErrorCode::Forbidden);
    assert!(refusal.message.contains("in the future"), "{}", refusal.message);

    // Nothing changed for the victim.
    let after = nodes.get(&victim.name).await.unwrap();
    assert_eq!(status_of(&after), status_of(&before));
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let web = msvcs.get("web").await.unwrap();
    assert!(web.status.as_ref().is_some_and(|s| s.ready_instances >= 1), "{:?}", web.status);
    site.cleanup(&[&victim]).await;
    let _ = nodes.delete(&raw.name, &Default::default()).await;
}

#[tokio::test]
async fn events_and_discovery_follow_placement_not_what_a_node_claims() {
    let site = Site::new("claims").await;
    site.apply(&microservice("web", "m", ""));
    // Another namespace with a microservice the node has nothing to do with.
    let other = site.cluster.namespace("private");
    let mesh =
        "apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {type: Account, account: nobody}\n";
    supermesh_tests::apply_yaml(mesh, &["-n", &other]).unwrap();
    supermesh_tests::apply_yaml(&microservice("vault", "m", "  ports: [{port: 8200}]\n"), &["-n", &other]).unwrap();

    let claimed = format!("{other}/microservice/vault");
    let mut raw =
        Raw::join(&site, &format!("claimer-{}", site.id), BTreeMap::from([(claimed.clone(), "1-x".to_owned())])).await;
    let query = Body::Query(Query::Endpoints { namespace: other.clone(), name: "vault".into() });
    raw.send("q-1", &format!("{other}/endpoints/vault"), &query).await;
    let Body::Error(refusal) = raw.answer_to("q-1").await else { panic!("discovery refused") };
    assert_eq!(refusal.code, ErrorCode::Forbidden);
    assert!(refusal.message.contains(&format!("runs no microservice of namespace {other}")), "{}", refusal.message);

    // An event for the other namespace's microservice, then one for what is placed on the node.
    let forged =
        Report::Event(EventReport { warning: true, reason: "Exited".into(), message: format!("forged-{}", site.id) });
    raw.send("o-1", &claimed, &Body::MetaSync(forged)).await;
    raw.answer_to("o-1").await;
    let web = site.key("web");
    let legit =
        Report::Event(EventReport { warning: false, reason: "Started".into(), message: format!("legit-{}", site.id) });
    raw.send("o-2", &web, &Body::MetaSync(legit)).await;
    raw.answer_to("o-2").await;
    let messages = |ns: &str| kubectl(&["get", "events", "-n", ns, "-o", "jsonpath={.items[*].message}"]);
    site.controller
        .wait_until("the event of the placed microservice", || {
            messages(&site.ns).contains(&format!("legit-{}", site.id))
        })
        .await;
    assert!(!messages(&other).contains("forged"), "no event for a microservice not placed on the node");
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    let _ = nodes.delete(&raw.name, &Default::default()).await;
}

#[tokio::test]
async fn logs_are_only_for_kubernetes_users_allowed_to_read_them() {
    let site = Site::new("logs-auth").await;
    site.apply(&microservice("web", "m", ""));
    let agent = site.agent(0);
    let key = site.key("web");
    site.controller.wait_until("the instance running", || agent.instance_pid(&key).is_some()).await;
    let path = format!("/logs/{}/web?node={}&tail=5", site.ns, agent.name);

    let anonymous = site.controller.http_get(&path).unwrap();
    assert_eq!(anonymous.0, 401, "{anonymous:?}");
    let forged = site.controller.http_get_as(&path, "not-a-token").unwrap();
    assert_eq!(forged.0, 401, "{forged:?}");

    // A ServiceAccount without the permission, then with it.
    kubectl(&["create", "serviceaccount", "reader", "-n", &site.ns]);
    let token = kubectl(&["create", "token", "reader", "-n", &site.ns]).trim().to_owned();
    let denied = site.controller.http_get_as(&path, &token).unwrap();
    assert_eq!(denied.0, 403, "{denied:?}");
    assert!(denied.1.contains("may not get microservices/log"), "{}", denied.1);
    let grant = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: log-reader}}\nrules:\n- apiGroups: [supermesh.io]\n  resources: [microservices/log]\n  verbs: [get]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: log-reader}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: log-reader}}\nsubjects:\n- {{kind: ServiceAccount, name: reader, namespace: {}}}\n",
        site.ns
    );
    site.apply(&grant);
    site.controller
        .wait_until("the granted ServiceAccount to read the log", || {
            site.controller.http_get_as(&path, &token).is_some_and(|(code, _)| code == 200)
        })
        .await;
    // The permission is for its namespace only.
    let elsewhere = site.controller.http_get_as(&format!("/logs/default/web?node={}", agent.name), &token).unwrap();
    assert_eq!(elsewhere.0, 403, "{elsewhere:?}");
    assert_eq!(site.controller.http_get("/metrics").map(|(code, _)| code), Some(200), "metrics stay open");
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn oversized_input_is_refused_and_costs_the_others_nothing() {
    let site = Site::new("bounds").await;
    site.apply(&microservice("web", "m", ""));
    let member = site.agent(0);
    let key = site.key("web");
    member.wait_held("the member's assignment", |h| h.contains_key(&key)).await;
    site.wait_agents(1.0).await;
    let held = member.held();

    // A hello with a 600 KB account and one with a long agent version: refused, nothing recorded.
    for (what, edit) in [
        ("account", Box::new(|h: &mut Hello| h.account = "a".repeat(600_000)) as Box<dyn Fn(&mut Hello)>),
        ("agentVersion", Box::new(|h: &mut Hello| h.agent_version = "v".repeat(65))),
    ] {
        let mut raw = Raw::connect(&site, &format!("big-{what}-{}", site.id).to_lowercase()).await;
        let mut hello = raw.hello_of(&site);
        edit(&mut hello);
        raw.hello(hello).await;
        let Some(Body::Error(refusal)) = raw.next().await else { panic!("the hello with a long {what} is refused") };
        assert!(refusal.message.contains(&format!("hello refused: {what}")), "{}", refusal.message);
        assert_eq!(raw.next().await, None, "and the stream ends");
    }

    // A batch of 10,000 events: refused whole, the session goes on.
    let mut raw = Raw::join(&site, &format!("flood-{}", site.id), BTreeMap::new()).await;
    let entries = (0..10_000)
        .map(|seq| RelayedReport {
            node: raw.name.clone(),
            seq,
            operation: Operation::MetaSync,
            resource: key.clone(),
            content: json!({"warning": true, "reason": "Exited", "message": format!("flood {seq}")}),
            created_ms: now_ms(),
            signature: None,
        })
        .collect();
    let batch = |entries: Vec<RelayedReport>| Body::MetaSync(Report::Batch(ReportBatch { entries }));
    // 10,000 events are more than a message may hold (sent as is, past the sender's own check)...
    let flood = Message::with_body("b-1".into(), now_ms(), BATCH_RESOURCE, &batch(entries));
    raw.ws.send(Frame::text(serde_json::to_string(&flood).unwrap())).await.unwrap();
    let refusal = loop {
        match raw.next().await.expect("the session stays open") {
            Body::Error(refusal) => break refusal,
            _ => continue,
        }
    };
    assert!(refusal.message.contains("exceeds the limit"), "{}", refusal.message);
    // ...and 2,000 small ones, which fit, are more than a batch may hold.
    let entries = (0..2_000)
        .map(|seq| RelayedReport {
            node: raw.name.clone(),
            seq,
            operation: Operation::MetaSync,
            resource: key.clone(),
            content: json!({"warning": true, "reason": "Exited", "message": "flood"}),
            created_ms: now_ms(),
            signature: None,
        })
        .collect();
    raw.send("b-2", BATCH_RESOURCE, &batch(entries)).await;
    let Body::Error(refusal) = raw.answer_to("b-2").await else { panic!("the batch is refused") };
    assert!(refusal.message.contains("2000 entries; at most 1024"), "{}", refusal.message);
    raw.send(
        "q-1",
        &format!("{}/endpoints/web", site.ns),
        &Body::Query(Query::Endpoints { namespace: site.ns.clone(), name: "web".into() }),
    )
    .await;
    assert!(matches!(raw.answer_to("q-1").await, Body::Response(_)), "the session still answers");
    let events = kubectl(&["get", "events", "-n", &site.ns, "-o", "jsonpath={.items[*].message}"]);
    assert!(!events.contains("flood"), "no event of the refused batch");

    // Nothing changed for the member.
    assert_eq!(member.held(), held);
    assert_eq!(
        site.controller.log().lines().filter(|l| l.contains("agent connected") && l.contains(&member.name)).count(),
        1
    );
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    supermesh_tests::delete_all(
        &nodes,
        &[raw.name.clone(), format!("big-account-{}", site.id), format!("big-agentversion-{}", site.id)],
    )
    .await;
    site.cleanup(&[&member]).await;
}

#[tokio::test]
async fn idle_connections_from_one_address_do_not_keep_a_device_out() {
    let site = Site::new("idle").await;
    // 500 connections from another address that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..500 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(stream) = socket.connect(site.controller.cloudhub_addr.parse().unwrap()).await {
            idle.push(stream);
        }
    }
    assert_eq!(idle.len(), 500);
    let agent = site.agent(0);
    site.wait_agents(1.0).await;
    let capped = site.controller.metric("supermesh_controller_cloudhub_refused_total", "reason=\"per_address\"");
    // 256 is the controller's default --max-pending-per-address.
    assert_eq!(capped, Some((500 - 256) as f64));
    drop(idle);
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn a_network_cluster_key_rotates_without_a_flap() {
    let site = Site::new("rotate").await;
    let agents = [site.agent(0), site.agent(1)];
    let network = format!("net-{}", site.id);
    let root = supermesh_tests::cluster_key_root(&site.cluster.client).await;
    let key = |generation| supermesh_protocol::peer::cluster_key(&root, &network, generation);
    // Both live for each other, following one supernode: that supernode and when each chose it.
    let settled = |key: &str| -> Option<Vec<(String, u64)>> {
        let registries: Vec<_> = agents.iter().map(|a| a.registry_with(key)).collect::<Option<_>>()?;
        let all_live = registries.iter().all(|r| r.members.len() == 2 && r.members.iter().all(|m| m.live));
        let chosen: Vec<(String, u64)> =
            registries.iter().map(|r| Some((r.supernode.clone()?, r.elected_at))).collect::<Option<_>>()?;
        (all_live && chosen.iter().all(|(s, _)| *s == chosen[0].0)).then_some(chosen)
    };
    let mut before = None;
    site.controller
        .wait_until("a settled cluster", || {
            before = settled(&key(0));
            before.is_some()
        })
        .await;
    let before = before.unwrap();
    assert!(agents[0].registry_with(&key(1)).is_none(), "the next key is not the cluster's yet");

    let out = supermeshctl(&["network", "rotate-key", &network]).unwrap();
    assert!(out.contains("generation 1"), "{out}");
    let mut after = None;
    site.controller
        .wait_until("the new key in the whole cluster", || {
            after = settled(&key(1));
            after.is_some()
        })
        .await;
    assert_eq!(after.unwrap(), before, "the same supernode, chosen at the same time: no flap");
    assert!(agents.iter().all(|a| a.log().contains("the cluster key was rotated")));
    site.cleanup(&[&agents[0], &agents[1]]).await;
}
