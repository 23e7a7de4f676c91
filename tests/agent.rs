//! End-to-end tests of the cloud->edge path: the real controller, real agent
//! processes with real SQLite files, and the real API server.

use std::collections::BTreeMap;

use futures::{SinkExt, StreamExt};
use kube::api::Api;
use supermesh_api::{EdgeNode, Microservice};
use supermesh_protocol::{self as protocol, ErrorCode};
use supermesh_tests::{kubectl, microservice, Agent, Site, AGENTS};
use tokio_tungstenite::tungstenite::Message as Frame;

#[tokio::test]
async fn agents_register_and_receive_exactly_what_is_placed_on_them() {
    let site = Site::new("placed").await;
    let agents: Vec<Agent> = (0..3).map(|i| site.agent(i)).collect();
    site.wait_agents(3.0).await;

    // Automatic registration: EdgeNodes created from edge.yaml, connected.
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    for agent in &agents {
        let node = site
            .controller
            .wait_for(&nodes, &agent.name, "Connected=True", |n| {
                n.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Connected" && c.status == "True"))
            })
            .await;
        assert_eq!(node.spec.network, format!("net-{}", site.id));
        assert_eq!(node.status.unwrap().agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    }
    for agent in &agents[..2] {
        kubectl(&["label", "edgenode", &agent.name, "tier=edge"]);
    }
    site.apply(&microservice("web", "m", "  nodeSelector: {tier: edge}\n"));
    let key = site.key("web");
    for agent in &agents[..2] {
        agent.wait_held("web stored", |held| held.contains_key(&key)).await;
        assert_eq!(agent.edged_events(&key), 1, "edged told once");
    }
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let web = msvcs.get("web").await.unwrap();
    site.controller
        .wait_until("2 changes acked", || {
            site.controller.metric("supermesh_controller_cloudhub_changes_acked_total", "") == Some(2.0)
        })
        .await;
    assert_eq!(site.sent(), 2.0, "one change per placed node and no more");
    assert!(agents[2].held().is_empty(), "the unplaced node holds nothing");
    let version = format!("{}-{}", web.metadata.generation.unwrap(), web.metadata.uid.unwrap());
    assert_eq!(agents[0].held()[&key], version);
    site.cleanup(&agents.iter().collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn updates_are_stored_only_when_they_change_and_deletes_remove() {
    let site = Site::new("updates").await;
    let agent = site.agent(0);
    site.wait_agents(1.0).await;
    site.apply(&microservice("svc", "m", ""));
    let key = site.key("svc");
    agent.wait_held("svc stored", |h| h.get(&key).is_some_and(|v| v.starts_with("1-"))).await;

    // A metadata-only change does not change the spec: nothing is sent, stored or passed to edged.
    let reconciles =
        || site.controller.metric("supermesh_controller_reconciliations_total", "kind=\"Microservice\"").unwrap_or(0.0);
    let before = reconciles();
    kubectl(&["annotate", "msvc", "svc", "-n", &site.ns, "note=hello"]);
    site.controller.wait_until("the annotation reconciled", || reconciles() > before).await;
    assert_eq!(site.sent(), 1.0);
    assert_eq!(agent.edged_events(&key), 1);

    // A real change is stored and passed on.
    kubectl(&["patch", "msvc", "svc", "-n", &site.ns, "--type", "merge", "-p", r#"{"spec":{"args":["7200"]}}"#]);
    agent.wait_held("svc at generation 2", |h| h.get(&key).is_some_and(|v| v.starts_with("2-"))).await;
    assert_eq!(agent.edged_events(&key), 2);

    kubectl(&["delete", "msvc", "svc", "-n", &site.ns]);
    agent.wait_held("svc removed", |h| !h.contains_key(&key)).await;
    assert_eq!(agent.edged_events(&key), 3);
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn an_agent_that_was_offline_receives_exactly_the_missing_changes() {
    let site = Site::new("offline").await;
    let mut agent = site.agent(0);
    site.wait_agents(1.0).await;
    let batch = |names: &[String], extra: &str| -> String {
        names.iter().map(|n| microservice(n, "m", extra)).collect::<Vec<_>>().join("---\n")
    };
    let old: Vec<String> = (0..10).map(|i| format!("old-{i}")).collect();
    site.apply(&batch(&old, ""));
    agent.wait_held("10 microservices", |h| h.len() == 10).await;
    let sent_before = site.sent();

    agent.stop();
    site.wait_agents(0.0).await;
    // 50 changes while offline: 10 updates, 5 second updates, 5 deletes, 30 creations.
    site.apply(&batch(&old, "  args: [\"1\"]\n"));
    site.apply(&batch(&old[..5], "  args: [\"2\"]\n"));
    for name in &old[5..] {
        kubectl(&["delete", "msvc", name, "-n", &site.ns, "--wait=false"]);
    }
    let new: Vec<String> = (0..30).map(|i| format!("new-{i}")).collect();
    site.apply(&batch(&new, ""));
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    for name in &old[..5] {
        site.controller
            .wait_for(&msvcs, name, "generation 3 reconciled", |m| {
                m.status.as_ref().and_then(|s| s.observed_generation) == Some(3)
            })
            .await;
    }
    assert_eq!(site.sent(), sent_before, "nothing is sent while the agent is away");

    agent.restart();
    let expected: BTreeMap<String, String> = {
        let mut e = BTreeMap::new();
        for name in old[..5].iter().chain(&new) {
            site.controller
                .wait_for(&msvcs, name, "placed", |m| m.status.as_ref().is_some_and(|s| s.desired_instances == 1))
                .await;
            let m = msvcs.get(name).await.unwrap();
            e.insert(site.key(name), format!("{}-{}", m.metadata.generation.unwrap(), m.metadata.uid.unwrap()));
        }
        e
    };
    agent.wait_held("the final state", |h| *h == expected).await;
    // 5 updates (final versions only), 5 deletes and 30 inserts: the difference, counted.
    assert_eq!(site.sent() - sent_before, 40.0);
    for name in &new {
        assert_eq!(agent.edged_events(&site.key(name)), 1, "{name} passed to edged once");
    }
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn kill_9_during_batches_leaves_a_sound_database_that_converges() {
    let site = Site::new("kill9").await;
    let mut agent = site.agent(0);
    site.wait_agents(1.0).await;
    let names: Vec<String> = (0..8).map(|i| format!("svc-{i}")).collect();
    for round in 0..20 {
        let events_before = agent.log().matches("edged: desired microservice").count();
        let yaml: Vec<String> =
            names.iter().map(|n| microservice(n, "m", &format!("  args: [\"{round}\"]\n"))).collect();
        site.apply(&yaml.join("---\n"));
        // Kill as soon as the batch starts arriving.
        site.controller
            .wait_until("the batch to start", || {
                agent.log().matches("edged: desired microservice").count() > events_before
            })
            .await;
        agent.kill9();
        let report = agent.inspect().unwrap_or_else(|e| panic!("round {round}: database unsound after kill -9: {e}"));
        assert!(report.contains("integrity ok"), "{report}");
        agent.restart();
    }
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let mut expected = BTreeMap::new();
    for name in &names {
        let m = site.controller.wait_for(&msvcs, name, "generation 20", |m| m.metadata.generation == Some(20)).await;
        expected.insert(site.key(name), format!("20-{}", m.metadata.uid.unwrap()));
    }
    agent.wait_held("the last round everywhere", |h| *h == expected).await;
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn a_controller_restart_reapplies_nothing() {
    let mut site = Site::new("ctl-restart").await;
    let agent = site.agent(0);
    site.wait_agents(1.0).await;
    site.apply(&[microservice("a", "m", ""), microservice("b", "m", "")].join("---\n"));
    agent.wait_held("a and b", |h| h.len() == 2).await;
    let held = agent.held();

    site.controller.restart();
    site.wait_agents(1.0).await;
    // A new change after the reconnect is the only thing the new controller sends.
    site.apply(&microservice("c", "m", ""));
    agent.wait_held("c", |h| h.len() == 3).await;
    assert_eq!(site.sent(), 1.0, "the reconnect re-sent nothing");
    assert!(
        !agent.log().contains("desired microservice removed"),
        "a controller restart deleted workloads:\n{}",
        agent.log()
    );
    let after = agent.held();
    for (key, version) in &held {
        assert_eq!(after.get(key), Some(version));
        assert_eq!(agent.edged_events(key), 1, "{key} not re-applied");
    }
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn bad_messages_get_an_error_reply_and_lose_nothing() {
    let site = Site::new("bad-msg").await;
    site.apply(&microservice("kept", "m", ""));
    let name = format!("raw-{}", site.id);
    let mut ws = site.dial_as(&name, &format!("acct-{}", site.id)).await;

    let mut errors = Vec::new();
    let mut assignment = None;
    ws.send(Frame::text("{this is not json")).await.unwrap();
    ws.send(Frame::text("x".repeat(protocol::MAX_MESSAGE_BYTES + 100))).await.unwrap();
    let deadline = tokio::time::Instant::now() + supermesh_tests::DEADLINE;
    while errors.len() < 2 || assignment.is_none() {
        let frame =
            tokio::time::timeout_at(deadline, ws.next()).await.expect("replies in time").expect("open").unwrap();
        let msg = protocol::decode(&frame.into_text().unwrap()).unwrap();
        match msg.body().unwrap() {
            protocol::Body::Error(refusal) => errors.push(refusal),
            protocol::Body::Insert(protocol::Change::Assignment(_)) => assignment = Some(msg),
            _ => {}
        }
    }
    assert!(errors.iter().all(|e| e.code == ErrorCode::BadMessage), "{errors:?}");
    assert!(errors.iter().any(|e| e.message.contains("exceeds the limit")), "{errors:?}");
    // Nothing lost: the session still works and the placed microservice was delivered.
    let insert = assignment.unwrap();
    assert_eq!(insert.resource, site.key("kept"));
    assert_eq!(site.controller.metric("supermesh_controller_cloudhub_bad_messages_total", ""), Some(2.0));
    assert!(site.controller.log().contains("invalid message from agent"));
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    supermesh_tests::delete_all(&nodes, &[name]).await;
}

#[tokio::test]
async fn a_wrong_bootstrap_token_is_refused_with_a_clear_reason() {
    let site = Site::new("bad-token").await;
    // The right token id with a wrong secret.
    let wrong = format!("{}0123456789abcdef", &site.token[..site.token.len() - 16]);
    assert_ne!(wrong, site.token);
    let name = format!("intruder-{}", site.id);
    let agent = Agent::start(&name, "net", "acct", &site.controller.cloudhub_addr, &wrong);
    site.controller
        .wait_until("the agent to log the refusal", || agent.log().contains("was presented with a wrong secret"))
        .await;
    assert!(agent.log().contains("401"), "the refusal carries its status:\n{}", agent.log());
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    assert!(nodes.get_opt(&name).await.unwrap().is_none(), "no EdgeNode for a refused agent");
    assert_eq!(site.controller.metric(AGENTS, ""), Some(0.0));
}

fn connected(node: &EdgeNode) -> Option<(String, String)> {
    let c = node.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Connected")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn connected_and_heartbeat_follow_the_session() {
    let site = Site::with_args("session", &["--reconnect-grace-seconds", "0"]).await;
    let mut agent = site.agent(0);
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    let is = |status: &'static str| move |n: &EdgeNode| connected(n).is_some_and(|(s, _)| s == status);
    let node = site.controller.wait_for(&nodes, &agent.name, "Connected=True", is("True")).await;
    assert!(node.status.unwrap().last_heartbeat_time.is_some(), "heartbeat recorded");

    agent.stop();
    let node = site.controller.wait_for(&nodes, &agent.name, "Connected=False", is("False")).await;
    assert_eq!(connected(&node).unwrap().1, "AgentDisconnected");
    agent.restart();
    site.controller.wait_for(&nodes, &agent.name, "Connected=True again", is("True")).await;
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn agents_beyond_the_limit_are_told_to_retry_later() {
    let site = Site::with_args("limit", &["--max-agents", "1"]).await;
    let first = site.agent(0);
    site.wait_agents(1.0).await;
    let second = site.agent(1);
    site.controller.wait_until("the second agent to be refused", || second.log().contains("agent limit")).await;
    assert!(second.log().contains("503"), "{}", second.log());
    assert_eq!(site.controller.metric(AGENTS, ""), Some(1.0));
    assert!(first.log().contains("connected to the cloud"));
    site.cleanup(&[&first, &second]).await;
}

#[tokio::test]
async fn a_change_an_agent_refuses_is_a_warning_on_the_microservice() {
    let site = Site::new("refused").await;
    site.apply(&microservice("kept", "m", ""));
    let name = format!("raw-{}", site.id);
    let mut ws = site.dial_as(&name, &format!("acct-{}", site.id)).await;
    // The device refuses what it is sent, as an agent too old for a field would.
    let deadline = tokio::time::Instant::now() + supermesh_tests::DEADLINE;
    let insert = loop {
        let frame = tokio::time::timeout_at(deadline, ws.next()).await.expect("sent in time").expect("open").unwrap();
        let msg = protocol::decode(&frame.into_text().unwrap()).unwrap();
        if matches!(msg.body(), Ok(protocol::Body::Insert(protocol::Change::Assignment(_)))) {
            break msg;
        }
    };
    let refusal = protocol::ErrorContent::new(ErrorCode::BadMessage, "missing field `value` at line 1");
    let nack = protocol::Message::new("t-2".into(), 0, protocol::Operation::Error, &insert.resource, refusal)
        .answering(&insert.id);
    ws.send(Frame::text(protocol::encode(&nack).unwrap())).await.unwrap();
    loop {
        let refused = supermesh_tests::events(&site, "kept", "ChangeRefused").await;
        if refused.iter().any(|e| e.contains(&name) && e.contains("missing field `value`")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no ChangeRefused warning naming the node: {refused:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    supermesh_tests::delete_all(&nodes, &[name]).await;
}
