//! Compatibility with the previous release: an agent of 0.1.0 (protocol 1.0, built
//! from its commit by `cargo xtask test`) joined with the fleet-wide token, which no
//! longer admits a node: every node now enrolls for a certificate of its own. The old
//! agent is refused at the handshake with the way forward, gets nothing, and nothing
//! is recorded for it. (From the next release on, this test runs this release's agent,
//! which enrolls, against the next controller.)

use kube::api::Api;
use supermesh_api::EdgeNode;
use supermesh_tests::{Agent, Launch, Site};

#[tokio::test]
async fn an_agent_of_the_previous_release_is_refused_with_the_way_forward() {
    let previous = std::env::var_os("SUPERMESH_PREVIOUS_AGENT")
        .expect("SUPERMESH_PREVIOUS_AGENT names the previous release's agent: run `cargo xtask test`, which builds it");
    let site = Site::new("compat").await;
    // A 0.1 join token: the CA fingerprint and a fleet-wide secret.
    let (fingerprint, _) = site.token.split_once('.').unwrap();
    let legacy = format!("{fingerprint}.fleet-wide-secret-of-0-1");
    let name = format!("old-{}", site.id);
    let how = Launch { binary: Some(previous.into()), ..Launch::default() };
    let (network, account) = (format!("net-{}", site.id), format!("acct-{}", site.id));
    let agent = Agent::launch(&name, &network, &account, &site.controller.cloudhub_addr, &legacy, how);
    site.controller
        .wait_until("the old agent to log its refusal", || agent.log().contains("node certificate is required"))
        .await;
    let log = agent.log();
    assert!(log.contains("401"), "refused as unauthenticated:\n{log}");
    assert!(log.contains("supermeshctl token create") && log.contains("0.2"), "the way forward is named:\n{log}");
    let nodes: Api<EdgeNode> = Api::all(site.cluster.client.clone());
    assert!(nodes.get_opt(&name).await.unwrap().is_none(), "nothing is recorded for a node that did not enroll");
    assert!(agent.held().is_empty(), "the old agent was sent nothing");
    assert_eq!(site.controller.metric(supermesh_tests::AGENTS, ""), Some(0.0));
    assert!(
        site.controller.metric("supermesh_controller_cloudhub_refused_total", "reason=\"no_certificate\"") >= Some(1.0)
    );
}
