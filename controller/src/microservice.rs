//! Microservice reconciler: the index places microservices; this writes what
//! the placement and the nodes' reports say into status, and tells users by Events.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use supermesh_api::microservice::{MicroserviceStatus, RolloutPhase};
use supermesh_api::names::condition::*;
use supermesh_api::Microservice;
use tracing::{info, instrument};

use crate::aggregator::Aggregate;
use crate::conditions::{self, Wanted};
use crate::config;
use crate::context::{reconcile_in_finalizer, Context, RESYNC};
use crate::index::Key;
use crate::placement::{self, Plan};
use crate::rollout;
use crate::Result;

/// The status that describes `plan` and what agents report (`agg`). Without an
/// aggregate (agents still reconnecting after a controller start) the previous
/// counts and Degraded condition are kept, so that a restart flips nothing.
pub fn status_for(msvc: &Microservice, plan: &Plan, agg: Option<&Aggregate>) -> MicroserviceStatus {
    let old = msvc.status.clone().unwrap_or_default();
    let kept = Aggregate {
        ready: old.ready_instances,
        available: old.available_instances,
        unhealthy: old.unhealthy_instances.clone(),
        ..Aggregate::default()
    };
    let reported = agg.unwrap_or(&kept);
    let blocked = |reason: &'static str, message: String| {
        (0, vec![Wanted::new(READY, false, reason, message.clone()), Wanted::new(PROGRESSING, false, reason, message)])
    };
    let (desired, mut wanted) = match plan {
        Plan::Blocked { reason, message } => blocked(reason, message.clone()),
        Plan::Placed(p) if p.nodes.is_empty() && msvc.spec.replicas != Some(0) => blocked(
            NO_MATCHING_NODES,
            format!(
                "no node of Mesh {:?} can run it ({} mesh nodes match the node selector); \
                 add nodes to the mesh or relax spec.nodeSelector",
                msvc.spec.mesh, p.candidates
            ),
        ),
        Plan::Placed(p) => {
            let desired = p.nodes.len() as i32;
            let ready = reported.ready.min(desired);
            let counts = format!("{ready} of {desired} instances ready");
            let ready_condition = if ready == desired {
                Wanted::new(READY, true, INSTANCES_READY, counts)
            } else {
                Wanted::new(READY, false, INSTANCES_NOT_READY, counts)
            };
            let progressing = Wanted::new(
                PROGRESSING,
                true,
                PLACED,
                format!(
                    "placed on {desired} of {} candidate nodes; {} run the current version and are ready",
                    p.candidates,
                    reported.available.min(desired)
                ),
            );
            (desired, vec![ready_condition, progressing])
        }
    };
    let placed = matches!(plan, Plan::Placed(p) if desired > 0 || p.nodes.is_empty() && msvc.spec.replicas == Some(0));
    if placed {
        if let Some(agg) = agg {
            wanted.push(match &agg.degraded {
                Some((reason, message)) => Wanted::new(DEGRADED, true, reason, message.clone()),
                None => Wanted::new(DEGRADED, false, AS_EXPECTED, "no instance is failing"),
            });
        }
    }
    let mut conditions = conditions::merge(&old.conditions, wanted, msvc.metadata.generation);
    if placed && agg.is_none() {
        conditions.extend(old.conditions.iter().filter(|c| c.type_ == DEGRADED).cloned());
    }
    let ready = reported.ready.min(desired);
    MicroserviceStatus {
        observed_generation: msvc.metadata.generation,
        desired_instances: desired,
        ready_instances: ready,
        available_instances: reported.available.min(ready),
        conditions,
        unhealthy_instances: if desired > 0 { reported.unhealthy.clone() } else { Vec::new() },
        ..MicroserviceStatus::default()
    }
}

/// Reconciles one Microservice, on the replica holding the controller Lease.
#[instrument(skip_all, fields(namespace = %msvc.namespace().unwrap_or_default(), name = %msvc.name_any()))]
pub async fn reconcile(msvc: Arc<Microservice>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.leads() {
        return Ok(Action::await_change());
    }
    let api: Api<Microservice> = Api::namespaced(ctx.client.clone(), &msvc.namespace().unwrap_or_default());
    reconcile_in_finalizer(api.clone(), msvc, ctx, |m, c| apply(api.clone(), m, c), cleanup).await
}

async fn apply(api: Api<Microservice>, msvc: Arc<Microservice>, ctx: Arc<Context>) -> Result<Action> {
    // The index takes each event before the controller does; a miss is a race with a relist.
    let Some(inputs) = ctx.index.microservice(&Key::of(&*msvc)) else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    // What the references resolve to now goes into status first: the index derives the
    // revisions from it. A missing key keeps what was resolved before, so nothing moves.
    let stored = msvc.clone();
    let resolution = match placement::validate_microservice(&msvc.spec) {
        // An invalid spec is the plan's InvalidSpec; nothing to resolve.
        Err(_) => Ok(msvc.status.as_ref().and_then(|s| s.config.clone())),
        Ok(()) => config::resolve(&ctx.client, &msvc).await,
    };
    let (msvc, missing) = match resolution {
        Ok(resolved) if resolved.as_ref() != msvc.status.as_ref().and_then(|s| s.config.as_ref()) => {
            let mut with = (*msvc).clone();
            with.status.get_or_insert_with(Default::default).config = resolved;
            (Arc::new(with), None)
        }
        Ok(_) => (msvc, None),
        Err(config::Unresolved::Missing(message)) => (msvc, Some(message)),
        Err(config::Unresolved::Kube(e)) => return Err(e.into()),
    };
    let blocked;
    let plan = match (&*inputs.plan, &missing) {
        (Plan::Blocked { reason, .. }, Some(message)) if *reason == CONFIG_MISSING => {
            blocked = Plan::Blocked { reason: CONFIG_MISSING, message: message.clone() };
            &blocked
        }
        (plan, _) => plan,
    };
    let agg = match plan {
        Plan::Placed(p) => {
            let agg = inputs.aggregate;
            // Right after a start, agents are still reconnecting: an incomplete picture may
            // raise the counts but not lower them, so a controller restart flips nothing.
            let old_ready = msvc.status.as_ref().map_or(0, |s| s.ready_instances);
            let complete = agg.reported as usize >= p.nodes.len();
            (ctx.index.grace_over() || complete || agg.ready >= old_ready).then_some(agg)
        }
        Plan::Blocked { .. } => Some(Aggregate::default()),
    };
    let mut status = status_for(&msvc, plan, agg.as_ref());
    let nodes: Vec<rollout::Observed<'_>> = inputs
        .nodes
        .iter()
        .map(|n| rollout::Observed { name: &n.name, online: n.online, report: n.report.as_ref() })
        .collect();
    // Right after a start the picture of the fleet is incomplete: the rollout waits.
    let advanced = rollout::advance(&msvc, &nodes, Timestamp::now(), ctx.index.grace_over());
    with_rollout(&mut status, &msvc, advanced.as_ref());
    status.config = msvc.status.as_ref().and_then(|s| s.config.clone());
    if let Some(message) = &missing {
        let wanted = Wanted::new(PROGRESSING, false, CONFIG_MISSING, message.clone());
        let old = msvc.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
        let merged = conditions::merge(old, vec![wanted], msvc.metadata.generation);
        status.conditions.retain(|c| c.type_ != PROGRESSING);
        status.conditions.extend(merged.into_iter().filter(|c| c.type_ == PROGRESSING));
    }
    let old = stored.status.clone().unwrap_or_default();
    let old_reason = conditions::reason(&old.conditions, READY).map(str::to_owned);
    let new_reason = conditions::reason(&status.conditions, READY).unwrap_or_default();
    if ctx.write_status(&api, &*stored, &status).await? {
        info!(desired = status.desired_instances, reason = new_reason, "status written");
    }
    if let Some(message) = missing.filter(|_| conditions::reason(&old.conditions, PROGRESSING) != Some(CONFIG_MISSING))
    {
        ctx.publish(&*msvc, true, CONFIG_MISSING, message).await;
    }
    let snapshots = |s: &MicroserviceStatus| {
        let kept = s.revisions.iter().filter_map(|r| r.config.clone());
        kept.chain(s.config.iter().map(|c| c.snapshot.clone())).collect::<std::collections::BTreeSet<_>>()
    };
    if snapshots(&old) != snapshots(&status) {
        let mut written = (*msvc).clone();
        written.status = Some(status.clone());
        match config::prune(&ctx.client, &written).await {
            Ok(0) => {}
            Ok(n) => info!(pruned = n, "deleted configuration snapshots no kept revision runs"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete old configuration snapshots; tried again on the next change")
            }
        }
    }
    let degraded = |s: &MicroserviceStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == DEGRADED && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) =
        degraded(&status).filter(|(r, _)| degraded(&old).map(|(o, _)| o) != Some(r.clone()))
    {
        ctx.publish(&*msvc, true, &reason, message).await;
    }
    match plan {
        // Told above when a reference is missing: the index also blocks a microservice until it
        // sees its references resolved, which is no news once this reconcile resolved them.
        Plan::Blocked { reason, .. } if *reason == CONFIG_MISSING => {}
        Plan::Blocked { reason, message } if old_reason.as_deref() != Some(*reason) => {
            ctx.publish(&*msvc, true, reason, message.clone()).await;
        }
        Plan::Placed(p) if old.desired_instances != status.desired_instances || old_reason.is_none() => {
            let shown: Vec<&str> = p.nodes.iter().take(10).map(String::as_str).collect();
            let more = p.nodes.len().saturating_sub(shown.len());
            let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
            let note = format!("placed on {} nodes: {}{tail}", p.nodes.len(), shown.join(", "));
            ctx.publish(&*msvc, false, PLACED, note).await;
        }
        _ => {}
    }
    let again = advanced.as_ref().and_then(|a| a.again);
    for note in advanced.map(|a| a.notes).unwrap_or_default() {
        info!(reason = note.reason, message = %note.message, "rollout");
        ctx.publish_event(&*msvc, None, &note.action, note.warning, note.reason, note.message).await;
    }
    Ok(Action::requeue(again.map_or(RESYNC, |a| a.min(RESYNC))))
}

/// Puts the revisions and the rollout `advanced` into `status`; without it (right after a
/// start) those of the status before. A rollout in waves that is not complete tells the
/// Progressing condition.
pub fn with_rollout(status: &mut MicroserviceStatus, msvc: &Microservice, advanced: Option<&rollout::Advanced>) {
    let old = msvc.status.clone().unwrap_or_default();
    match advanced {
        Some(a) => {
            status.current_revision = Some(a.current);
            status.updated_revision = Some(a.updated);
            status.revisions = a.revisions.clone();
            status.rollout = a.rollout.clone();
        }
        None => {
            status.current_revision = old.current_revision;
            status.updated_revision = old.updated_revision;
            status.revisions = old.revisions;
            status.rollout = old.rollout;
        }
    }
    let Some(r) = status.rollout.as_ref() else { return };
    let message = r.message.clone().unwrap_or_default();
    let wanted = match r.phase {
        RolloutPhase::Progressing => Wanted::new(PROGRESSING, true, ROLLING_OUT, message),
        RolloutPhase::Paused => Wanted::new(PROGRESSING, false, ROLLOUT_PAUSED, message),
        RolloutPhase::RolledBack => Wanted::new(PROGRESSING, false, ROLLED_BACK, message),
        RolloutPhase::Complete => return,
    };
    if let Some(at) = status.conditions.iter().position(|c| c.type_ == PROGRESSING) {
        let merged = conditions::merge(&old.conditions, vec![wanted], msvc.metadata.generation);
        status.conditions.splice(at..=at, merged);
    }
}

/// Nothing to clean up: the index stopped placing the microservice when its deletion began.
async fn cleanup(_: Arc<Microservice>, _: Arc<Context>) -> Result<Action> {
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::NodeView;
    use crate::placement::{mesh_members, MeshState};
    use serde_json::json;
    use std::collections::BTreeSet;
    use supermesh_api::{EdgeNode, Mesh};

    /// The plan of `msvc` in `mesh` among `nodes`, as the index makes it.
    fn plan(msvc: &Microservice, mesh: Option<&Mesh>, nodes: &[EdgeNode], current: &BTreeSet<String>) -> Plan {
        let views: Vec<NodeView> = nodes.iter().map(NodeView::from).collect();
        let (ns, name) = (msvc.namespace().unwrap_or_default(), msvc.name_any());
        match mesh.map(|m| (m.name_any(), mesh_members(&m.spec, &views))) {
            None => crate::placement::plan(&ns, &name, &msvc.spec, MeshState::Missing, current),
            Some((mesh, Err(e))) => {
                crate::placement::plan(&ns, &name, &msvc.spec, MeshState::Invalid(&mesh, &e), current)
            }
            Some((_, Ok(members))) => {
                crate::placement::plan(&ns, &name, &msvc.spec, MeshState::Members(&members), current)
            }
        }
    }

    fn msvc(spec: serde_json::Value) -> Microservice {
        let mut m = Microservice::new("web", serde_json::from_value(spec).unwrap());
        m.metadata.namespace = Some("team".into());
        m.metadata.generation = Some(3);
        m
    }

    fn mesh(spec: serde_json::Value) -> Mesh {
        let mut m = Mesh::new("lan", serde_json::from_value(spec).unwrap());
        m.metadata.namespace = Some("team".into());
        m
    }

    fn nodes() -> Vec<EdgeNode> {
        ["n1", "n2", "n3"]
            .iter()
            .map(|n| EdgeNode::new(n, serde_json::from_value(json!({"account": "acme", "network": "home"})).unwrap()))
            .collect()
    }

    const NONE: Option<&Aggregate> =
        Some(&Aggregate { reported: 0, ready: 0, available: 0, unhealthy: Vec::new(), degraded: None });

    fn ready(status: &MicroserviceStatus) -> (&str, &str) {
        let c = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn missing_mesh_is_reported_as_mesh_not_found() {
        let m = msvc(json!({"mesh": "nope", "command": ["srv"]}));
        let p = plan(&m, None, &nodes(), &BTreeSet::new());
        let s = status_for(&m, &p, NONE);
        assert_eq!(ready(&s), ("False", MESH_NOT_FOUND));
        assert_eq!(s.desired_instances, 0);
        assert!(s.conditions[0].message.contains("\"nope\""), "{}", s.conditions[0].message);
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn invalid_mesh_and_invalid_spec_have_their_own_reasons() {
        let m = msvc(json!({"mesh": "lan", "command": ["srv"]}));
        let bad_mesh = mesh(json!({"type": "Proximity"}));
        let s = status_for(&m, &plan(&m, Some(&bad_mesh), &nodes(), &BTreeSet::new()), NONE);
        assert_eq!(ready(&s), ("False", MESH_INVALID));
        let bad = msvc(
            json!({"mesh": "lan", "command": ["srv"], "healthCheck": {"tcp": {"port": 1}, "exec": {"command": ["x"]}}}),
        );
        let s =
            status_for(&bad, &plan(&bad, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()), NONE);
        assert_eq!(ready(&s), ("False", INVALID_SPEC));
    }

    #[test]
    fn placed_microservice_waits_for_its_instances() {
        let m = msvc(json!({"mesh": "lan", "command": ["srv"]}));
        let s = status_for(&m, &plan(&m, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()), NONE);
        assert_eq!(s.desired_instances, 3);
        assert_eq!(ready(&s), ("False", INSTANCES_NOT_READY));
        let progressing = s.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
        assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", PLACED));
    }

    #[test]
    fn no_matching_nodes_is_explained() {
        let m = msvc(json!({"mesh": "lan", "command": ["srv"], "nodeSelector": {"gpu": "yes"}}));
        let s = status_for(&m, &plan(&m, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()), NONE);
        assert_eq!(ready(&s), ("False", NO_MATCHING_NODES));
        let zero = msvc(json!({"mesh": "lan", "command": ["srv"], "replicas": 0}));
        let s =
            status_for(&zero, &plan(&zero, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()), NONE);
        assert_eq!(ready(&s), ("True", INSTANCES_READY));
    }

    #[test]
    fn an_unchanged_plan_gives_an_identical_status() {
        let mut m = msvc(json!({"mesh": "lan", "command": ["srv"]}));
        let p = plan(&m, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new());
        let first = status_for(&m, &p, NONE);
        m.status = Some(first.clone());
        assert_eq!(status_for(&m, &p, NONE), first, "a second reconcile must not need a write");
    }
}

#[cfg(test)]
mod aggregate_tests {
    use super::*;
    use crate::placement::Placement;
    use serde_json::json;
    use supermesh_api::microservice::UnhealthyInstance;

    fn placed(n: usize) -> Plan {
        Plan::Placed(Placement { nodes: (0..n).map(|i| format!("n{i}")).collect(), candidates: n, refused: None })
    }

    fn msvc() -> Microservice {
        let mut m = Microservice::new("web", serde_json::from_value(json!({"mesh": "m", "command": ["x"]})).unwrap());
        m.metadata.generation = Some(1);
        m
    }

    fn condition<'a>(s: &'a MicroserviceStatus, type_: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn reports_make_instances_ready() {
        let agg = Aggregate { reported: 3, ready: 3, available: 3, ..Aggregate::default() };
        let s = status_for(&msvc(), &placed(3), Some(&agg));
        assert_eq!((s.desired_instances, s.ready_instances, s.available_instances), (3, 3, 3));
        assert_eq!(condition(&s, READY), ("True", INSTANCES_READY));
        assert_eq!(condition(&s, DEGRADED), ("False", AS_EXPECTED));
    }

    #[test]
    fn a_crash_loop_degrades_with_its_reason() {
        let unhealthy =
            vec![UnhealthyInstance { node: "n1".into(), phase: "Backoff".into(), restarts: 5, message: None }];
        let agg = Aggregate {
            reported: 2,
            ready: 1,
            available: 1,
            unhealthy: unhealthy.clone(),
            degraded: Some(("CrashLoop", "1 of the instances are Backoff".into())),
        };
        let s = status_for(&msvc(), &placed(2), Some(&agg));
        assert_eq!(condition(&s, DEGRADED), ("True", "CrashLoop"));
        assert_eq!(condition(&s, READY), ("False", INSTANCES_NOT_READY));
        assert_eq!(s.unhealthy_instances, unhealthy);
    }

    #[test]
    fn without_an_aggregate_the_previous_counts_are_kept() {
        let agg = Aggregate {
            reported: 2,
            ready: 2,
            available: 2,
            degraded: Some(("Unhealthy", "x".into())),
            ..Aggregate::default()
        };
        let mut m = msvc();
        m.status = Some(status_for(&m, &placed(2), Some(&agg)));
        let after_restart = status_for(&m, &placed(2), None);
        assert_eq!(Some(after_restart), m.status, "a controller restart rewrites nothing");
    }
}

#[cfg(test)]
mod reconcile_tests {
    use super::*;
    use crate::fixtures::{self, finalized, listed, mesh, microservice, new_index, node};
    use http::Method;
    use serde_json::json;
    use supermesh_api::names::FINALIZER;

    const PATH: &str = "/apis/supermesh.io/v1alpha1/namespaces/team/microservices/web";

    #[tokio::test]
    async fn a_new_microservice_gets_the_finalizer_before_anything_else() {
        let (index, _t) = new_index();
        let web = microservice("web", "m", 1, json!({}));
        listed(&index, vec![mesh("m", json!({"type": "Account", "account": "acme"}))], vec![], vec![web.clone()]);
        let (ctx, mut api) = fixtures::context(index);
        let reconciled = tokio::spawn(reconcile(Arc::new(web.clone()), ctx));
        let call = api.expect(Method::PATCH, PATH, serde_json::to_value(finalized(web)).unwrap()).await;
        assert!(call.body.to_string().contains(FINALIZER), "{}", call.body);
        reconciled.await.unwrap().expect("reconciled");
        api.expect_nothing().await;
    }

    #[tokio::test]
    async fn a_placed_microservice_writes_its_status_once_and_says_where_it_runs() {
        let (index, _t) = new_index();
        let web = finalized(microservice("web", "m", 3, json!({})));
        let nodes = vec![node("a", "acme", "lan"), node("b", "acme", "lan"), node("c", "globex", "lan")];
        listed(&index, vec![mesh("m", json!({"type": "Account", "account": "acme"}))], nodes, vec![web.clone()]);
        let (ctx, mut api) = fixtures::context(index);
        let reconciled = tokio::spawn(reconcile(Arc::new(web.clone()), ctx.clone()));
        let status = api.expect_status(PATH, &web).await;
        assert_eq!((status["desiredInstances"].as_i64(), status["observedGeneration"].as_i64()), (Some(2), Some(3)));
        let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some(INSTANCES_NOT_READY)));
        let event = api.expect_event().await;
        assert_eq!(event["reason"], PLACED);
        assert!(event["note"].as_str().unwrap().contains("placed on 2 nodes: a, b"), "{event}");
        reconciled.await.unwrap().expect("reconciled");

        // The status it wrote, read back: nothing to write, nothing to tell.
        let mut written = web;
        written.status = Some(serde_json::from_value(status).unwrap());
        let again = tokio::spawn(reconcile(Arc::new(written), ctx));
        api.expect_nothing().await;
        again.await.unwrap().expect("reconciled");
    }

    #[tokio::test]
    async fn a_missing_mesh_is_a_condition_and_a_warning() {
        let (index, _t) = new_index();
        let web = finalized(microservice("web", "nope", 1, json!({})));
        listed(&index, vec![], vec![node("a", "acme", "lan")], vec![web.clone()]);
        let (ctx, mut api) = fixtures::context(index);
        let reconciled = tokio::spawn(reconcile(Arc::new(web.clone()), ctx));
        let status = api.expect_status(PATH, &web).await;
        let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(ready["reason"], MESH_NOT_FOUND);
        let event = api.expect_event().await;
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some(MESH_NOT_FOUND)));
        reconciled.await.unwrap().expect("reconciled");
    }
}
