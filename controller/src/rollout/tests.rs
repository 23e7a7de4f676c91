use super::*;
use serde_json::json;
use supermesh_protocol::Phase;

const UID: &str = "u-1";

/// One look at the fleet of `m`, whose references (if any) resolved.
fn advance(m: &Microservice, nodes: &[Observed<'_>], now: Timestamp, settled: bool) -> Advanced {
    super::advance(m, nodes, now, settled).expect("references resolved")
}

fn msvc(generation: i64, args: &str, rollout: serde_json::Value) -> Microservice {
    let spec = json!({"mesh": "m", "command": ["srv"], "args": [args], "rollout": rollout});
    let mut m = Microservice::new("web", serde_json::from_value(spec).unwrap());
    m.metadata.namespace = Some("team".into());
    m.metadata.uid = Some(UID.into());
    m.metadata.generation = Some(generation);
    m
}

/// `m` after a reconcile wrote `a` into its status.
fn written(mut m: Microservice, a: &Advanced) -> Microservice {
    let status = m.status.get_or_insert_with(Default::default);
    status.current_revision = Some(a.current);
    status.updated_revision = Some(a.updated);
    status.revisions = a.revisions.clone();
    status.rollout = a.rollout.clone();
    m
}

/// A new spec (next generation, other args) of `m`, its status kept.
fn changed(m: &Microservice, args: &str) -> Microservice {
    let mut next = m.clone();
    next.spec.args = vec![args.into()];
    next.metadata.generation = Some(m.metadata.generation.unwrap() + 1);
    next
}

struct Fleet {
    names: Vec<String>,
    reports: Vec<Option<InstanceReport>>,
    online: Vec<bool>,
}

impl Fleet {
    fn new(n: usize) -> Fleet {
        let names: Vec<String> = (0..n).map(|i| format!("n{i:02}")).collect();
        let ordered: Vec<String> =
            order(UID, names.iter().map(String::as_str)).into_iter().map(str::to_owned).collect();
        Fleet { names: ordered, reports: vec![None; n], online: vec![true; n] }
    }

    fn observed(&self) -> Vec<Observed<'_>> {
        (0..self.names.len())
            .map(|i| Observed { name: &self.names[i], online: self.online[i], report: self.reports[i].as_ref() })
            .collect()
    }

    /// Every online node runs what `m`'s targets give it, in `phase`.
    fn converge(&mut self, m: &Microservice, phase: Phase) {
        let targets = targets(m);
        for i in 0..self.names.len() {
            if !self.online[i] {
                continue;
            }
            let rev = if targets.updates(i) { targets.updated } else { targets.current };
            let version = supermesh_protocol::version(rev.number, UID);
            let kept = self.reports[i].as_ref().is_some_and(|r| r.version == version);
            if !kept || phase != Phase::Ready {
                self.reports[i] = Some(InstanceReport::new("team/microservice/web", &version, phase));
            }
        }
    }
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn waves(extra: serde_json::Value) -> serde_json::Value {
    let mut r = json!({"strategy": "Waves", "canary": 1, "growthFactor": 2, "minReadySeconds": 5});
    r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    r
}

/// A Microservice installed at revision 1 on `fleet`, every instance ready.
fn installed(fleet: &mut Fleet, rollout: serde_json::Value) -> Microservice {
    let m = msvc(1, "v1", rollout);
    let a = advance(&m, &fleet.observed(), at(0), true);
    assert_eq!((a.current, a.updated, a.rollout.as_ref()), (1, 1, None), "the first revision goes everywhere");
    let m = written(m, &a);
    fleet.converge(&m, Phase::Ready);
    let a = advance(&m, &fleet.observed(), at(1), true);
    written(m, &a)
}

#[test]
fn waves_grow_by_their_factor_up_to_the_cap() {
    let r = |v: serde_json::Value| Params::of(&serde_json::from_value(v).unwrap(), 100).unwrap();
    let p = r(json!({"strategy": "Waves", "canary": 2, "growthFactor": 3, "maxWave": 20}));
    let through: Vec<usize> = (1..=8).map(|w| p.through(w, 100)).collect();
    assert_eq!(through, [2, 8, 26, 46, 66, 86, 100, 100]);
    let p = r(json!({"strategy": "Waves", "canary": "5%"}));
    assert_eq!((p.canary, p.through(2, 100), p.max_unavailable), (5, 15, 100));
    let bad: Rollout = serde_json::from_value(json!({"strategy": "Waves", "canary": "ten"})).unwrap();
    assert!(Params::of(&bad, 10).unwrap_err().contains("spec.rollout.canary \"ten\""));
}

#[test]
fn the_rendezvous_order_is_stable_and_its_own_per_microservice() {
    let nodes = ["a", "b", "c", "d", "e", "f"];
    let mut reversed = nodes;
    reversed.reverse();
    assert_eq!(order("u1", nodes), order("u1", reversed), "independent of the listing order");
    let without_c: Vec<&str> = order("u1", nodes).into_iter().filter(|n| *n != "c").collect();
    assert_eq!(order("u1", nodes.into_iter().filter(|n| *n != "c")), without_c, "a node leaving moves no other");
    assert_ne!(order("u1", nodes), order("u2", nodes), "each microservice has its own canaries");
}

#[test]
fn a_rollout_goes_canary_first_then_growing_waves_each_held_for_min_ready() {
    let mut fleet = Fleet::new(10);
    let mut m = installed(&mut fleet, waves(json!({})));
    m = changed(&m, "v2");
    let mut updated = Vec::new();
    let mut waves_seen = Vec::new();
    for t in 2..200 {
        let a = advance(&m, &fleet.observed(), at(t), true);
        for note in &a.notes {
            if note.reason == ROLLOUT_WAVE {
                waves_seen.push(note.message.clone());
            }
        }
        m = written(m, &a);
        let r = m.status.as_ref().unwrap().rollout.clone().unwrap();
        if updated.last() != Some(&r.updated_nodes) {
            updated.push(r.updated_nodes);
        }
        if r.phase == RolloutPhase::Complete {
            break;
        }
        fleet.converge(&m, Phase::Ready);
    }
    assert_eq!(updated, [1, 3, 7, 10], "canary of 1, then waves of 2, 4 and the 3 left");
    assert_eq!(waves_seen.len(), 4);
    assert!(waves_seen[0].starts_with(&format!("canary wave: 1 of 10 nodes: {}", fleet.names[0])), "{waves_seen:?}");
    let status = m.status.unwrap();
    assert_eq!((status.current_revision, status.updated_revision), (Some(2), Some(2)));
    let counts: Vec<(i64, i32, i32)> = status.revisions.iter().map(|r| (r.revision, r.instances, r.ready)).collect();
    assert_eq!(counts, [(1, 0, 0), (2, 10, 10)]);
}

#[test]
fn a_failing_canary_pauses_the_rollout_and_with_auto_rollback_sends_it_back() {
    for auto in [false, true] {
        let mut fleet = Fleet::new(10);
        let mut m = installed(&mut fleet, waves(json!({"autoRollback": auto})));
        m = changed(&m, "v2");
        let a = advance(&m, &fleet.observed(), at(2), true);
        m = written(m, &a);
        assert_eq!(targets(&m).updated_nodes, Some(1));
        fleet.converge(&m, Phase::Backoff);
        let a = advance(&m, &fleet.observed(), at(3), true);
        m = written(m, &a);
        let r = m.status.as_ref().unwrap().rollout.clone().unwrap();
        assert_eq!(r.failing_nodes, [fleet.names[0].clone()]);
        let note = a.notes.last().unwrap();
        assert!(note.warning && note.message.contains("1 of 1 updated instances of revision 2 failed"), "{note:?}");
        if auto {
            assert_eq!((r.phase, note.reason), (RolloutPhase::RolledBack, ROLLED_BACK));
            assert_eq!(targets(&m).updated_nodes, Some(0), "every node back on revision 1");
            assert_eq!(a.current, 1);
        } else {
            assert_eq!(
                (r.phase, r.pause_reason.as_deref(), note.reason),
                (RolloutPhase::Paused, Some(HEALTH_GATE), ROLLOUT_PAUSED)
            );
            assert_eq!(targets(&m).updated_nodes, Some(1), "the canary stays where it is");
        }
        // Nothing moves on while the spec stays.
        let again = advance(&m, &fleet.observed(), at(60), true);
        assert!(again.notes.is_empty(), "{:?}", again.notes);
        assert_eq!(again.rollout, m.status.as_ref().unwrap().rollout);
    }
}

#[test]
fn a_device_rollback_counts_in_the_health_gate() {
    let mut fleet = Fleet::new(4);
    let mut m = installed(&mut fleet, waves(json!({})));
    m = changed(&m, "v2");
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(2), true));
    let mut back = InstanceReport::new("team/microservice/web", &supermesh_protocol::version(1, UID), Phase::Ready);
    back.rolled_back_from = Some(supermesh_protocol::version(2, UID));
    fleet.reports[0] = Some(back);
    let a = advance(&m, &fleet.observed(), at(3), true);
    assert_eq!(a.rollout.unwrap().pause_reason.as_deref(), Some(HEALTH_GATE));
}

#[test]
fn offline_nodes_are_waited_for_until_the_deadline_then_get_their_wave_on_return() {
    let mut fleet = Fleet::new(4);
    let mut m = installed(&mut fleet, waves(json!({"minReadySeconds": 0, "progressDeadlineSeconds": 30})));
    fleet.online[0] = false;
    m = changed(&m, "v2");
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(2), true));
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(10), true));
    let r = m.status.as_ref().unwrap().rollout.clone().unwrap();
    assert_eq!((r.wave, r.offline_nodes), (1, 1), "the offline canary is waited for");
    assert!(r.message.unwrap().contains("waiting for 1 offline nodes"));
    let unsettled = advance(&m, &fleet.observed(), at(33), false);
    assert_eq!(unsettled.rollout.unwrap().wave, 1, "not skipped while agents may still be reconnecting");
    assert_eq!(unsettled.again, Some(Duration::from_millis(100)));
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(33), true));
    let r = m.status.as_ref().unwrap().rollout.clone().unwrap();
    assert_eq!(r.wave, 2, "then skipped");
    let targets = targets(&m);
    assert!(targets.updates(0), "the offline node gets revision 2 when it returns");
    assert_eq!(targets.updated.number, 2);
}

#[test]
fn an_online_wave_not_ready_by_the_deadline_pauses() {
    let mut fleet = Fleet::new(3);
    let mut m = installed(&mut fleet, waves(json!({"progressDeadlineSeconds": 30})));
    m = changed(&m, "v2");
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(2), true));
    fleet.converge(&m, Phase::Starting);
    let a = advance(&m, &fleet.observed(), at(40), true);
    let r = a.rollout.unwrap();
    assert_eq!((r.phase, r.pause_reason.as_deref()), (RolloutPhase::Paused, Some(PROGRESS_DEADLINE_EXCEEDED)));
}

#[test]
fn paused_holds_the_waves_and_clearing_it_resumes() {
    let mut fleet = Fleet::new(5);
    let mut m = installed(&mut fleet, waves(json!({"minReadySeconds": 0})));
    m = changed(&m, "v2");
    m.spec.rollout.as_mut().unwrap().paused = true;
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(2), true));
    fleet.converge(&m, Phase::Ready);
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(3), true));
    let r = m.status.as_ref().unwrap().rollout.clone().unwrap();
    assert_eq!((r.phase, r.pause_reason.as_deref(), r.updated_nodes), (RolloutPhase::Paused, Some(PAUSED), 1));
    m.spec.rollout.as_mut().unwrap().paused = false;
    let a = advance(&m, &fleet.observed(), at(4), true);
    assert!(a.notes.iter().any(|n| n.reason == ROLLING_OUT && n.message.contains("resumed")), "{:?}", a.notes);
    assert_eq!(a.rollout.unwrap().updated_nodes, 3, "the next wave starts");
}

#[test]
fn a_spec_back_at_a_kept_revision_reuses_its_number_and_changes_nothing_else() {
    let mut fleet = Fleet::new(3);
    let mut m = installed(&mut fleet, waves(json!({})));
    m = changed(&m, "v2");
    m = written(m.clone(), &advance(&m, &fleet.observed(), at(2), true));
    assert_eq!(targets(&m).updated_nodes, Some(1));
    // Undo: the spec of revision 1 again, at generation 3.
    let back = changed(&m, "v1");
    assert_eq!(spec_revision(&back), Some(1));
    let t = targets(&back);
    assert_eq!((t.current.number, t.updated.number, t.updated_nodes), (1, 1, None), "every node back at once");
    let a = advance(&back, &fleet.observed(), at(3), true);
    assert_eq!((a.current, a.updated, a.rollout.clone().unwrap().phase), (1, 1, RolloutPhase::Complete));
    // A change of placement only is no revision.
    let mut scaled = written(back.clone(), &a);
    scaled.spec.replicas = Some(2);
    scaled.metadata.generation = Some(4);
    assert_eq!(spec_revision(&scaled), Some(1));
}

#[test]
fn a_new_spec_not_yet_recorded_holds_the_nodes_where_they_are() {
    let mut fleet = Fleet::new(3);
    let m = installed(&mut fleet, waves(json!({})));
    let next = changed(&m, "v2");
    let t = targets(&next);
    assert_eq!((t.current.number, t.updated_nodes), (1, None), "revision 2 waits for the reconciler");
    let plain = installed(&mut Fleet::new(3), json!(null));
    let next = changed(&plain, "v2");
    let t = targets(&next);
    assert_eq!((t.updated.number, t.updated_nodes), (2, None), "all at once: at once");
}

#[test]
fn only_the_newest_revisions_are_kept() {
    let mut fleet = Fleet::new(2);
    let mut m = installed(&mut fleet, json!(null));
    for g in 0..15 {
        m = changed(&m, &format!("v{g}"));
        m = written(m.clone(), &advance(&m, &fleet.observed(), at(g), true));
    }
    let status = m.status.unwrap();
    assert_eq!(status.revisions.len(), MicroserviceStatus::MAX_REVISIONS);
    assert_eq!(status.revisions.last().unwrap().revision, 16);
    assert_eq!(status.current_revision, Some(16));
}

/// `m` referencing ConfigMap `app` key `mode`, resolved to values hashed `values`.
fn with_config(mut m: Microservice, values: &str) -> Microservice {
    m.spec.env = vec![serde_json::from_value(json!({"name": "MODE",
        "valueFrom": {"configMapKeyRef": {"name": "app", "key": "mode"}}}))
    .unwrap()];
    let references = config::references_hash(&m.spec).unwrap();
    m.status.get_or_insert_with(Default::default).config =
        Some(ResolvedConfig { references, hash: values.into(), snapshot: format!("web-config-{values}") });
    m
}

#[test]
fn a_config_change_is_a_new_revision_under_the_same_generation() {
    let fleet = Fleet::new(3);
    let m = with_config(msvc(4, "a", json!({})), "v1");
    let m = written(m.clone(), &advance(&m, &fleet.observed(), at(0), true));
    let first = targets(&m);
    assert_eq!((first.current.number, first.current.config), (4, Some("web-config-v1")));
    assert_eq!(assignment(&m, first.current).config.as_deref(), Some("web-config-v1"));

    // The ConfigMap changes: same generation, new values, a new revision with its own snapshot.
    let m = with_config(m, "v2");
    let a = advance(&m, &fleet.observed(), at(1), true);
    assert_eq!((a.current, a.updated), (5, 5), "numbered one past the newest kept");
    let kept: Vec<_> = a.revisions.iter().map(|r| (r.revision, r.config.as_deref())).collect();
    assert_eq!(kept, [(4, Some("web-config-v1")), (5, Some("web-config-v2"))]);
    let m = written(m, &a);
    assert_eq!(targets(&m).current.config, Some("web-config-v2"));

    // Back to the first values: the kept revision and its snapshot again.
    let back = with_config(m, "v1");
    assert_eq!(super::spec_revision(&back), Some(4));
}

#[test]
fn unresolved_references_hold_the_fleet_where_it_is() {
    let fleet = Fleet::new(3);
    let m = with_config(msvc(4, "a", json!({})), "v1");
    let m = written(m.clone(), &advance(&m, &fleet.observed(), at(0), true));
    // A second reference, not resolved yet: nothing moves, nothing is recorded.
    let mut more = m.clone();
    more.spec.files =
        vec![serde_json::from_value(json!({"path": "key", "secretKeyRef": {"name": "db", "key": "k"}})).unwrap()];
    more.metadata.generation = Some(5);
    assert!(super::advance(&more, &fleet.observed(), at(1), true).is_none());
    let t = targets(&more);
    assert_eq!((t.current.number, t.updated.number, t.unresolved), (4, 4, false));
    assert_eq!(t.current.config, Some("web-config-v1"));

    // Never resolved and nothing kept: nothing can run.
    let mut fresh = msvc(1, "a", json!({}));
    fresh.spec.files = more.spec.files.clone();
    assert!(targets(&fresh).unresolved);
    assert!(super::advance(&fresh, &fleet.observed(), at(0), true).is_none());
}
