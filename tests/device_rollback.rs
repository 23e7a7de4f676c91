//! End-to-end: an agent rolls back, by itself, a revision that fails its health check
//! within `minReadySeconds`, while the cloud is down, and tells the cloud once it is back.

use std::path::{Path, PathBuf};

use kube::api::Api;
use supermesh_agent::metamanager::store::Store;
use supermesh_api::names::condition::ROLLED_BACK_ON_DEVICE;
use supermesh_api::Microservice;
use supermesh_protocol::{InstanceReport, StatusReport, STATUS_RESOURCE};
use supermesh_tests::{kubectl, microservice, Agent, Site};

/// Revision `revision` of Microservice `web`: its instances carry `REVISION=<revision>`
/// and pass their health check while the file `<flags>/<revision>` does not exist.
fn web(revision: &str, flags: &Path) -> String {
    let fail = flags.join(revision).display().to_string();
    let spec = format!(
        "  env: [{{name: REVISION, value: {revision}}}]\n  healthCheck: {{exec: {{command: [sh, -c, \"test ! -e {fail}\"]}}, \
         periodSeconds: 1, failureThreshold: 2}}\n  rollout: {{minReadySeconds: 30}}\n"
    );
    microservice("web", "m", &spec)
}

/// The revision the process of `key` runs (its `REVISION` variable, read from /proc) and its pid.
fn running(agent: &Agent, key: &str) -> Option<(String, i32)> {
    let pid = agent.instance_pid(key)?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let revision = environ.split(|b| *b == 0).find_map(|var| var.strip_prefix(b"REVISION="))?;
    Some((String::from_utf8_lossy(revision).into_owned(), pid))
}

/// The instance report of `key` in the status snapshot waiting in the agent's outbox.
fn queued_report(agent: &Agent, key: &str) -> Option<InstanceReport> {
    let store = Store::open(agent.data_dir.join("meta.db")).ok()?;
    let pending = store.pending(1000).ok()?;
    let snapshot = pending.iter().rev().find(|e| e.resource == STATUS_RESOURCE)?;
    let report: StatusReport = serde_json::from_str(&snapshot.content).ok()?;
    report.instances.into_iter().find(|i| i.resource == key)
}

/// Polls `check` until it holds, failing with the agent's log after `DEADLINE`.
async fn until(agent: &Agent, what: &str, check: impl FnMut() -> bool) {
    agent.wait_until(what, check).await;
}

#[tokio::test]
async fn the_device_rolls_back_a_revision_failing_its_health_check_while_the_cloud_is_down() {
    let mut site = Site::new("rollback").await;
    let mut agent = site.agent(0);
    let key = site.key("web");
    let flags = PathBuf::from(format!("/tmp/supermesh-rollback-{}", site.id));
    std::fs::create_dir_all(&flags).unwrap();
    let fail = flags.join("v2");
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let ready = |n: i32| move |m: &Microservice| m.status.as_ref().is_some_and(|s| s.ready_instances == n);

    // v1 runs and is ready; v2 arrives and runs (its check passes for now).
    site.apply(&web("v1", &flags));
    site.controller.wait_for(&msvcs, "web", "v1 ready", ready(1)).await;
    let v1 = agent.held()[&key].clone();
    site.apply(&web("v2", &flags));
    agent.wait_held("v2", |held| held.get(&key).is_some_and(|v| *v != v1)).await;
    let v2 = agent.held()[&key].clone();
    until(&agent, "the v2 process", || running(&agent, &key).is_some_and(|(r, _)| r == "v2")).await;

    // The cloud goes away; then v2 fails its health check within its minReadySeconds.
    site.controller.pause();
    std::fs::write(&fail, "").unwrap();
    until(&agent, "v1 running again, ready, reported as rolled back from v2", || {
        let report = queued_report(&agent, &key);
        running(&agent, &key).is_some_and(|(r, _)| r == "v1")
            && report.is_some_and(|r| r.version == v1 && r.ready && r.rolled_back_from.as_ref() == Some(&v2))
    })
    .await;
    let report = queued_report(&agent, &key).unwrap();
    let message = report.message.unwrap_or_default();
    assert!(message.contains(&v2) && message.contains(&v1) && message.contains("minReadySeconds"), "{message}");
    let inspect = agent.inspect().unwrap();
    assert!(inspect.contains("REFUSED") && inspect.contains(&v2), "inspect shows the refusal:\n{inspect}");
    assert_eq!(agent.held()[&key], v2, "the agent holds what the cloud sent; its report says what runs");
    std::fs::remove_file(&fail).unwrap();

    // The cloud comes back and learns it: the instance ready on the old revision (the Event is checked last).
    site.controller.resume();
    site.controller
        .wait_for(&msvcs, "web", "one ready instance, not of the current revision", |m| {
            m.status.as_ref().is_some_and(|s| s.ready_instances == 1 && s.available_instances == 0)
        })
        .await;

    // An agent restart adopts v1 and does not try v2 again.
    let (_, pid) = running(&agent, &key).unwrap();
    let adopted = |agent: &Agent| agent.log().matches("adopted running instance").count();
    let before = adopted(&agent);
    agent.stop();
    agent.restart();
    until(&agent, "the restarted agent to adopt v1", || adopted(&agent) > before).await;
    assert_eq!(running(&agent, &key), Some(("v1".to_owned(), pid)), "the v1 process runs on, adopted");
    assert!(agent.inspect().unwrap().contains("REFUSED"), "the refusal survives the restart");

    // A fix (v3) ends the refusal and runs.
    site.apply(&web("v3", &flags));
    until(&agent, "the v3 process", || running(&agent, &key).is_some_and(|(r, _)| r == "v3")).await;
    site.controller
        .wait_for(&msvcs, "web", "v3 ready and available", |m| {
            m.status.as_ref().is_some_and(|s| s.ready_instances == 1 && s.available_instances == 1)
        })
        .await;
    assert!(!agent.inspect().unwrap().contains("REFUSED"), "no refusal left");
    let started_v2 = agent.log().lines().filter(|l| l.contains("started instance") && l.contains(&v2)).count();
    assert_eq!(started_v2, 1, "v2 was started once, before the rollback, and never again");
    // The cloud published the rollback as one Event on the Microservice, naming v2.
    site.controller
        .wait_until("the RolledBackOnDevice event naming v2", || {
            let reasons = kubectl(&["get", "events", "-n", &site.ns, "-o", "jsonpath={.items[*].reason}"]);
            reasons.contains(ROLLED_BACK_ON_DEVICE)
                && kubectl(&["describe", "msvc", "web", "-n", &site.ns]).contains(&v2)
        })
        .await;
    let events = kubectl(&["get", "events", "-n", &site.ns, "-o", "jsonpath={.items[*].reason}"]);
    assert_eq!(events.matches(ROLLED_BACK_ON_DEVICE).count(), 1, "one event: {events}");
    site.cleanup(&[&agent]).await;
    let _ = std::fs::remove_dir_all(&flags);
}

/// Microservice `web` taking `REVISION` from ConfigMap `web-settings`: a change to the
/// ConfigMap is its next revision. Healthy while `<flags>/<REVISION>` does not exist.
fn web_from_config(flags: &Path) -> String {
    let spec = format!(
        "  env: [{{name: REVISION, valueFrom: {{configMapKeyRef: {{name: web-settings, key: revision}}}}}}]\n  \
         healthCheck: {{exec: {{command: [sh, -c, \"test ! -e {}/$REVISION\"]}}, periodSeconds: 1, failureThreshold: 2}}\n  \
         rollout: {{minReadySeconds: 30}}\n",
        flags.display()
    );
    microservice("web", "m", &spec)
}

fn settings(revision: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web-settings}}\ndata: {{revision: {revision}}}\n")
}

#[tokio::test]
async fn the_device_rolls_back_a_config_change_with_the_values_it_ran_before_while_the_cloud_is_down() {
    let site = Site::new("rollback-config").await;
    let agent = site.agent(0);
    let key = site.key("web");
    let flags = PathBuf::from(format!("/tmp/supermesh-rollback-config-{}", site.id));
    std::fs::create_dir_all(&flags).unwrap();
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);

    // v1 of the ConfigMap runs and is ready; its change to v2 is the next revision.
    site.apply(&settings("v1"));
    site.apply(&web_from_config(&flags));
    site.controller
        .wait_for(&msvcs, "web", "v1 ready", |m| m.status.as_ref().is_some_and(|s| s.ready_instances == 1))
        .await;
    let v1 = agent.held()[&key].clone();
    until(&agent, "the v1 process", || running(&agent, &key).is_some_and(|(r, _)| r == "v1")).await;
    site.apply(&settings("v2"));
    agent.wait_held("the ConfigMap's revision", |held| held.get(&key).is_some_and(|v| *v != v1)).await;
    until(&agent, "the v2 process", || running(&agent, &key).is_some_and(|(r, _)| r == "v2")).await;

    // The cloud goes away; v2 fails: the agent goes back to v1 with v1's values, from its store.
    let mut site = site;
    site.controller.pause();
    std::fs::write(flags.join("v2"), "").unwrap();
    until(&agent, "v1 running again with its own values, reported ready", || {
        running(&agent, &key).is_some_and(|(r, _)| r == "v1")
            && queued_report(&agent, &key).is_some_and(|r| r.version == v1 && r.ready)
    })
    .await;
    site.controller.resume();
    site.cleanup(&[&agent]).await;
    let _ = std::fs::remove_dir_all(&flags);
}
