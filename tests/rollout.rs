//! Rollouts on a real API server with real agents: waves in rendezvous order, the health
//! gate, automatic rollback, undo, and nodes offline while their wave passes.

use std::collections::BTreeMap;

use kube::api::{Api, Patch, PatchParams};
use supermesh_api::microservice::RolloutPhase;
use supermesh_api::names::condition::*;
use supermesh_api::Microservice;
use supermesh_tests::*;

/// Waves of one node, then doubling; each held for a second.
const WAVES: &str =
    "  rollout: {strategy: Waves, canary: 1, growthFactor: 2, minReadySeconds: 1, progressDeadlineSeconds: 4}\n";

fn with_env(value: &str) -> String {
    format!("  env: [{{name: V, value: \"{value}\"}}]\n{WAVES}")
}

/// A revision whose instances exit at once: a crash loop on every node it reaches.
const CRASHING: &str = "  command: [\"/bin/sh\", \"-c\", \"exit 3\"]\n";

fn patch_crashing(extra: &str) -> String {
    format!(
        "apiVersion: supermesh.io/v1alpha1\nkind: Microservice\nmetadata:\n  name: web\nspec:\n  mesh: m\n{CRASHING}{extra}"
    )
}

/// When each agent first started an instance of `key` at `version`, from its own log.
fn started_at(agents: &[Agent], key: &str, version: &str) -> BTreeMap<String, String> {
    let (k, v) = (format!("key={key}"), format!("version={version}"));
    agents
        .iter()
        .filter_map(|a| {
            let log = a.log();
            let line = log.lines().find(|l| {
                l.contains("started instance")
                    && l.split_whitespace().any(|w| w == k)
                    && l.split_whitespace().any(|w| w == v)
            })?;
            Some((a.name.clone(), line.split_whitespace().next()?.to_owned()))
        })
        .collect()
}

fn pids(agents: &[Agent], key: &str) -> BTreeMap<String, Option<i32>> {
    agents.iter().map(|a| (a.name.clone(), a.instance_pid(key))).collect()
}

async fn settled(
    site: &Site,
    msvcs: &Api<Microservice>,
    what: &str,
    check: impl Fn(&Microservice) -> bool,
) -> Microservice {
    site.controller.wait_for(msvcs, "web", what, check).await
}

fn rollout_phase(m: &Microservice) -> Option<RolloutPhase> {
    m.status.as_ref()?.rollout.as_ref().map(|r| r.phase)
}

fn revisions(m: &Microservice) -> (Option<i64>, Option<i64>) {
    m.status.as_ref().map_or((None, None), |s| (s.current_revision, s.updated_revision))
}

/// Starts `n` agents on `site` and `web` at revision 1 (`with_env("1")`) on all of them,
/// ready; returns the agents, the Microservices API and `web` as it then stands.
async fn fleet(site: &Site, n: usize) -> (Vec<Agent>, Api<Microservice>, Microservice) {
    let agents: Vec<Agent> = (0..n).map(|i| site.agent(i)).collect();
    site.wait_agents(n as f64).await;
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    site.apply(&microservice("web", "m", &with_env("1")));
    let m = settled(site, &msvcs, &format!("revision 1 ready on {n} nodes"), |m| {
        all_ready(m, n as i32) && revisions(m) == (Some(1), Some(1))
    })
    .await;
    (agents, msvcs, m)
}

#[tokio::test]
async fn a_rollout_in_waves_updates_the_canary_first_then_growing_waves() {
    let site = Site::new("waves").await;
    let (agents, msvcs, m) = fleet(&site, 10).await;
    let uid = m.metadata.uid.clone().unwrap();
    let key = site.key("web");

    site.apply(&microservice("web", "m", &with_env("2")));
    let m = settled(&site, &msvcs, "revision 2 rolled out", |m| {
        revisions(m) == (Some(2), Some(2)) && rollout_phase(m) == Some(RolloutPhase::Complete) && all_ready(m, 10)
    })
    .await;
    let status = m.status.unwrap();
    let counts: Vec<(i64, i32, i32)> = status.revisions.iter().map(|r| (r.revision, r.instances, r.ready)).collect();
    assert_eq!(counts, [(1, 0, 0), (2, 10, 10)]);
    assert_eq!(status.rollout.as_ref().map(|r| r.wave), Some(4));

    // The waves, as Events say: 1, then 2, 4 and the 3 left.
    let waves = events(&site, "web", ROLLOUT_WAVE).await;
    let sizes: Vec<&str> = waves.iter().filter_map(|w| w.split(": ").nth(1)).collect();
    assert_eq!(sizes, ["1 of 10 nodes", "2 of 10 nodes", "4 of 10 nodes", "3 of 10 nodes"], "{waves:#?}");
    assert!(waves[0].starts_with("canary wave"), "{waves:#?}");

    // And as the devices saw it: every node of a wave started revision 2 after every node of the waves before.
    let order: Vec<String> = waves.iter().flat_map(|w| w_nodes(w)).collect();
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    let expected = supermesh_controller::rollout::order(&uid, names.iter().copied());
    assert_eq!(order, expected, "waves follow the rendezvous order");
    let started = started_at(&agents, &key, &format!("2-{uid}"));
    assert_eq!(started.len(), 10, "{started:#?}");
    let mut wave_of = BTreeMap::new();
    for (w, nodes) in waves.iter().enumerate() {
        for n in w_nodes(nodes) {
            wave_of.insert(n, w);
        }
    }
    for (a, ta) in &started {
        for (b, tb) in &started {
            if wave_of[a] < wave_of[b] {
                assert!(ta < tb, "{a} (wave {}) started at {ta}, {b} (wave {}) at {tb}", wave_of[a], wave_of[b]);
            }
        }
    }
    let out = supermeshctl(&["rollout", "status", &format!("{}/web", site.ns)]).unwrap();
    assert!(out.contains("revision 2: Complete, wave 4, 10 of 10 nodes updated"), "{out}");
    let refs: Vec<&Agent> = agents.iter().collect();
    site.cleanup(&refs).await;
}

fn w_nodes(event: &str) -> Vec<String> {
    event.rsplit(": ").next().unwrap_or_default().split(", ").map(str::to_owned).collect()
}

#[tokio::test]
async fn a_failing_revision_pauses_after_the_canary_and_auto_rollback_spares_the_untouched_nodes() {
    let site = Site::new("gate").await;
    let (agents, msvcs, m) = fleet(&site, 4).await;
    let key = site.key("web");
    let uid = m.metadata.uid.clone().unwrap();
    let before = pids(&agents, &key);
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    let canary = supermesh_controller::rollout::order(&uid, names.iter().copied())[0].to_owned();

    // Revision 2 crashes: the gate pauses the rollout after the canary.
    site.apply(&patch_crashing(&with_env("1")));
    let m = settled(&site, &msvcs, "paused by the health gate", |m| {
        m.status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .is_some_and(|r| r.pause_reason.as_deref() == Some(HEALTH_GATE))
    })
    .await;
    let status = m.status.unwrap();
    assert_eq!(status.rollout.as_ref().unwrap().failing_nodes, std::slice::from_ref(&canary));
    let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("False", ROLLOUT_PAUSED));
    assert!(progressing.message.contains(&canary), "{}", progressing.message);
    let paused = events(&site, "web", ROLLOUT_PAUSED).await;
    assert!(paused.iter().any(|e| e.contains(&canary)), "{paused:#?}");
    let now = pids(&agents, &key);
    for a in &agents {
        if a.name != canary {
            assert_eq!(now[&a.name], before[&a.name], "{} is not in the canary wave: untouched", a.name);
        }
    }

    // With autoRollback the fleet goes back to revision 1.
    let msvcs_patch = serde_json::json!({"spec": {"rollout": {"autoRollback": true}}});
    msvcs.patch("web", &PatchParams::default(), &Patch::Merge(&msvcs_patch)).await.unwrap();
    let m = settled(&site, &msvcs, "rolled back and ready", |m| {
        rollout_phase(m) == Some(RolloutPhase::RolledBack) && all_ready(m, 4)
    })
    .await;
    let progressing = m.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == PROGRESSING).cloned().unwrap();
    assert_eq!(progressing.reason, ROLLED_BACK);
    assert!(
        progressing.message.contains(&canary) && progressing.message.contains("back to revision 1"),
        "{}",
        progressing.message
    );
    assert!(!events(&site, "web", ROLLED_BACK).await.is_empty());
    for a in &agents {
        a.wait_held("revision 1 again", |h| h.get(&key).is_some_and(|v| v.starts_with("1-"))).await;
    }
    let after = pids(&agents, &key);
    for a in &agents {
        if a.name != canary {
            assert_eq!(after[&a.name], before[&a.name], "{} was never restarted", a.name);
        }
    }

    // Undo to revision 1: the spec is revision 1's again, and nothing restarts.
    let out = supermeshctl(&["rollout", "undo", &format!("{}/web", site.ns), "--to-revision", "1"]).unwrap();
    assert!(out.contains("back to revision 1"), "{out}");
    let m = settled(&site, &msvcs, "revision 1 everywhere", |m| {
        revisions(m) == (Some(1), Some(1)) && rollout_phase(m) == Some(RolloutPhase::Complete)
    })
    .await;
    assert_eq!(m.spec.command, ["/bin/sleep", "3600"]);
    assert_eq!(pids(&agents, &key), after, "undo to what runs restarts nothing");
    let refs: Vec<&Agent> = agents.iter().collect();
    site.cleanup(&refs).await;
}

#[tokio::test]
async fn undo_returns_to_a_chosen_revision() {
    let site = Site::new("undo").await;
    let agent = site.agent(0);
    site.wait_agents(1.0).await;
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let key = site.key("web");
    for v in [1, 2, 3] {
        site.apply(&microservice("web", "m", &format!("  env: [{{name: V, value: \"{v}\"}}]\n")));
        settled(&site, &msvcs, "the revision recorded", |m| revisions(m) == (Some(v), Some(v))).await;
    }
    let err = supermeshctl(&["rollout", "undo", &format!("{}/web", site.ns), "--to-revision", "7"]).unwrap_err();
    assert!(err.contains("keeps no revision 7"), "{err}");
    supermeshctl(&["rollout", "undo", &format!("{}/web", site.ns), "--to-revision", "1"]).unwrap();
    let m = settled(&site, &msvcs, "back at revision 1", |m| revisions(m) == (Some(1), Some(1))).await;
    assert_eq!(m.spec.env[0].value, "1");
    assert_eq!(m.metadata.generation, Some(4), "undo is a spec change");
    agent.wait_held("revision 1 on the node", |h| h.get(&key).is_some_and(|v| v.starts_with("1-"))).await;
    // Without --to-revision: the one before the current.
    let err = supermeshctl(&["rollout", "undo", &format!("{}/web", site.ns)]).unwrap_err();
    assert!(err.contains("has no earlier revision to go back to"), "{err}");
    supermeshctl(&["rollout", "undo", &format!("{}/web", site.ns), "--to-revision", "3"]).unwrap();
    settled(&site, &msvcs, "back at revision 3", |m| revisions(m) == (Some(3), Some(3))).await;
    supermeshctl(&["rollout", "undo", &format!("{}/web", site.ns)]).unwrap();
    let m = settled(&site, &msvcs, "the one before 3", |m| m.metadata.generation == Some(6)).await;
    assert_eq!(m.spec.env[0].value, "2");
    agent.wait_held("revision 2 on the node", |h| h.get(&key).is_some_and(|v| v.starts_with("2-"))).await;
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn a_node_offline_while_its_wave_passes_gets_that_wave_s_revision_and_never_an_abandoned_one() {
    // A short reconnect grace: until it is over, a node that seems offline is waited for.
    let site = Site::with_args("offline-wave", &["--reconnect-grace-seconds", "2"]).await;
    let (mut agents, msvcs, m) = fleet(&site, 3).await;
    let key = site.key("web");
    let uid = m.metadata.uid.clone().unwrap();
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let canary = supermesh_controller::rollout::order(&uid, names.iter().map(String::as_str))[0].to_owned();
    let away = agents.iter().position(|a| a.name == canary).unwrap();

    // The canary node is offline: its wave waits progressDeadlineSeconds for it, then goes on.
    agents[away].stop();
    site.wait_agents(2.0).await;
    site.apply(&microservice("web", "m", &with_env("2")));
    let m = settled(&site, &msvcs, "revision 2 complete without the offline node", |m| {
        rollout_phase(m) == Some(RolloutPhase::Complete) && revisions(m) == (Some(2), Some(2))
    })
    .await;
    assert!(m.status.unwrap().rollout.unwrap().message.unwrap().contains("1 offline nodes get it when they return"));
    // Revision 3 fails on the canary wave's... other nodes, and is rolled back while the node is away.
    let crashing = format!(
        "{}  rollout: {{strategy: Waves, canary: 2, minReadySeconds: 1, autoRollback: true}}\n",
        "  env: [{name: V, value: \"3\"}]\n"
    );
    site.apply(&patch_crashing(&crashing));
    settled(&site, &msvcs, "revision 3 rolled back", |m| rollout_phase(m) == Some(RolloutPhase::RolledBack)).await;

    agents[away].restart();
    site.wait_agents(3.0).await;
    agents[away].wait_held("revision 2, its wave's", |h| h.get(&key).is_some_and(|v| v.starts_with("2-"))).await;
    settled(&site, &msvcs, "3 ready", |m| m.status.as_ref().is_some_and(|s| s.ready_instances == 3)).await;
    assert!(!agents[away].log().contains(&format!("version=3-{uid}")), "never sent the abandoned revision 3");
    let refs: Vec<&Agent> = agents.iter().collect();
    site.cleanup(&refs).await;
}
