//! Protocol compatibility: an agent of the previous release (0.1.0, protocol 1.0,
//! built from its commit by `cargo xtask test`) against this controller (1.1). It
//! joins, runs what is placed on it, reports it ready, takes a spec change and a
//! removal, and its events arrive, all without knowing anything of protocol 1.1.

use kube::api::Api;
use supermesh_api::Microservice;
use supermesh_tests::{kubectl, microservice, Launch, Site};

/// Ready instances of a Microservice, as its status says.
fn ready(m: &Microservice) -> i32 {
    m.status.as_ref().map_or(0, |s| s.ready_instances)
}

#[tokio::test]
async fn an_agent_one_minor_version_older_still_works() {
    let previous = std::env::var_os("SUPERMESH_PREVIOUS_AGENT")
        .expect("SUPERMESH_PREVIOUS_AGENT names the previous release's agent: run `cargo xtask test`, which builds it");
    let site = Site::new("compat").await;
    let agent = site.agent_as(0, Launch { binary: Some(previous.into()), ..Launch::default() });
    site.wait_agents(1.0).await;
    let log = site.controller.log();
    assert!(
        log.lines().any(|l| l.contains("agent connected") && l.contains(&agent.name) && l.contains("protocol=1.0")),
        "the controller speaks 1.0 to an agent whose hello states no version:\n{log}"
    );

    site.apply(&microservice("web", "m", ""));
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let first = site.controller.wait_for(&msvcs, "web", "1 ready instance", |m| ready(m) == 1).await;
    let version = |m: &Microservice| format!("{}-{}", m.metadata.generation.unwrap(), m.metadata.uid.clone().unwrap());
    let key = site.key("web");
    assert_eq!(agent.held().get(&key), Some(&version(&first)), "the 1.0 agent stored the assignment as sent");
    site.controller
        .wait_until("the instance's Started event", || {
            let events = kubectl(&["get", "events", "-n", &site.ns, "-o", "jsonpath={.items[*].reason}"]);
            events.split_whitespace().any(|r| r == "Started")
        })
        .await;

    site.apply(&microservice("web", "m", "  args: [\"7200\"]\n"));
    let second = site.controller.wait_for(&msvcs, "web", "generation 2", |m| m.metadata.generation == Some(2)).await;
    agent.wait_held("the new version", |h| h.get(&key) == Some(&version(&second))).await;
    site.controller
        .wait_for(&msvcs, "web", "the new version available", |m| {
            m.status.as_ref().is_some_and(|s| s.available_instances == 1 && s.observed_generation == Some(2))
        })
        .await;

    kubectl(&["delete", "msvc", "web", "-n", &site.ns, "--timeout=30s"]);
    agent.wait_held("web removed", |h| !h.contains_key(&key)).await;
    assert_eq!(site.controller.metric("supermesh_controller_cloudhub_bad_messages_total", ""), Some(0.0));
    site.cleanup(&[&agent]).await;
}
