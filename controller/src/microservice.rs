//! Microservice reconciler: dereference the mesh, validate, place, write status.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use supermesh_api::microservice::MicroserviceStatus;
use supermesh_api::names::condition::*;
use supermesh_api::{EdgeNode, Mesh, Microservice};
use tracing::{info, instrument};

use crate::conditions::{self, Wanted};
use crate::context::{reconcile_in_finalizer, Context, RESYNC};
use crate::placement::{self, Placement};
use crate::Result;

/// The outcome of placing a microservice: where it runs, or why it cannot.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Placed on these nodes.
    Placed(Placement),
    /// Not placed; `reason` is a condition reason, `message` says what to fix.
    Blocked { reason: &'static str, message: String },
}

/// Dereference → validate → place: the pure core of the reconcile.
pub fn plan(msvc: &Microservice, mesh: Option<&Mesh>, nodes: &[EdgeNode], current: &BTreeSet<String>) -> Plan {
    let ns = msvc.namespace().unwrap_or_default();
    let Some(mesh) = mesh else {
        return Plan::Blocked {
            reason: MESH_NOT_FOUND,
            message: format!(
                "Mesh {:?} does not exist in namespace {ns:?}: create it or change spec.mesh",
                msvc.spec.mesh
            ),
        };
    };
    if let Err(e) = placement::validate_microservice(&msvc.spec) {
        return Plan::Blocked { reason: INVALID_SPEC, message: e.0 };
    }
    if let Err(e) = placement::validate_mesh(&mesh.spec) {
        return Plan::Blocked {
            reason: MESH_INVALID,
            message: format!("Mesh {:?} is invalid: {}", mesh.name_any(), e.0),
        };
    }
    let key = format!("{ns}/{}", msvc.name_any());
    match placement::place(&mesh.spec, nodes, &key, &msvc.spec, current) {
        Ok(p) => Plan::Placed(p),
        Err(e) => Plan::Blocked { reason: INVALID_SPEC, message: e.0 },
    }
}

/// The status that describes `plan` (instance readiness is reported by agents).
pub fn status_for(msvc: &Microservice, plan: &Plan) -> MicroserviceStatus {
    let old = msvc.status.clone().unwrap_or_default();
    let (desired, wanted) = match plan {
        Plan::Blocked { reason, message } => (
            0,
            vec![
                Wanted::new(READY, false, reason, message.clone()),
                Wanted::new(PROGRESSING, false, reason, message.clone()),
            ],
        ),
        Plan::Placed(p) if p.nodes.is_empty() && msvc.spec.replicas != Some(0) => {
            let message = format!(
                "no node of Mesh {:?} can run it ({} mesh nodes match the node selector); \
                 add nodes to the mesh or relax spec.nodeSelector",
                msvc.spec.mesh, p.candidates
            );
            (
                0,
                vec![
                    Wanted::new(READY, false, NO_MATCHING_NODES, message.clone()),
                    Wanted::new(PROGRESSING, false, NO_MATCHING_NODES, message),
                ],
            )
        }
        Plan::Placed(p) => {
            let desired = p.nodes.len() as i32;
            let ready = old.ready_instances.min(desired);
            let ready_condition = if ready == desired {
                Wanted::new(READY, true, INSTANCES_READY, format!("{ready} of {desired} instances ready"))
            } else {
                Wanted::new(READY, false, INSTANCES_NOT_READY, format!("{ready} of {desired} instances ready"))
            };
            let progressing = Wanted::new(
                PROGRESSING,
                true,
                PLACED,
                format!("placed on {desired} of {} candidate nodes", p.candidates),
            );
            (desired, vec![ready_condition, progressing])
        }
    };
    let ready = old.ready_instances.min(desired);
    MicroserviceStatus {
        observed_generation: msvc.metadata.generation,
        desired_instances: desired,
        ready_instances: ready,
        available_instances: old.available_instances.min(ready),
        conditions: conditions::merge(&old.conditions, wanted, msvc.metadata.generation),
        unhealthy_instances: old.unhealthy_instances,
    }
}

/// Reconciles one Microservice.
#[instrument(skip_all, fields(namespace = %msvc.namespace().unwrap_or_default(), name = %msvc.name_any()))]
pub async fn reconcile(msvc: Arc<Microservice>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<Microservice> = Api::namespaced(ctx.client.clone(), &msvc.namespace().unwrap_or_default());
    reconcile_in_finalizer(api.clone(), msvc, ctx, |m, c| apply(api.clone(), m, c), cleanup).await
}

async fn apply(api: Api<Microservice>, msvc: Arc<Microservice>, ctx: Arc<Context>) -> Result<Action> {
    let key = ObjectRef::from_obj(&*msvc);
    let mesh_ref = ObjectRef::<Mesh>::new(&msvc.spec.mesh).within(&msvc.namespace().unwrap_or_default());
    let mesh = ctx.index.meshes.get(&mesh_ref);
    let current = ctx.placements.get(&key);
    let plan = plan(&msvc, mesh.as_deref(), &ctx.index.node_list(), current.as_ref().unwrap_or(&BTreeSet::new()));

    let nodes = match &plan {
        Plan::Placed(p) => p.nodes.clone(),
        Plan::Blocked { .. } => BTreeSet::new(),
    };
    let previous = ctx.placements.set(key, nodes.clone());
    ctx.metrics.placed_instances.set(ctx.placements.total() as i64);
    let moved = previous.as_ref().is_some_and(|p| *p != nodes);
    let previous = previous.unwrap_or_default();
    for node in previous.symmetric_difference(&nodes) {
        // The EdgeNode controller runs as long as this one; a closed channel means shutdown.
        let _ = ctx.node_trigger.unbounded_send(ObjectRef::new(node));
    }
    // The spec may have changed too: every node that had or gets it re-syncs.
    ctx.hub.poke(previous.union(&nodes));

    let status = status_for(&msvc, &plan);
    let old = msvc.status.clone().unwrap_or_default();
    let old_reason = conditions::reason(&old.conditions, READY).map(str::to_owned);
    let new_reason = conditions::reason(&status.conditions, READY).unwrap_or_default();
    if ctx.write_status(&api, &msvc, &status).await? {
        info!(desired = status.desired_instances, reason = new_reason, "status written");
    }
    match &plan {
        Plan::Blocked { reason, message } if old_reason.as_deref() != Some(*reason) => {
            ctx.publish(&*msvc, true, reason, message.clone()).await;
        }
        Plan::Placed(p) if moved || old.desired_instances != status.desired_instances || old_reason.is_none() => {
            let shown: Vec<&str> = p.nodes.iter().take(10).map(String::as_str).collect();
            let more = p.nodes.len().saturating_sub(shown.len());
            let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
            let note = format!("placed on {} nodes: {}{tail}", p.nodes.len(), shown.join(", "));
            ctx.publish(&*msvc, false, PLACED, note).await;
        }
        _ => {}
    }
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(msvc: Arc<Microservice>, ctx: Arc<Context>) -> Result<Action> {
    let removed = ctx.placements.remove(&ObjectRef::from_obj(&*msvc)).unwrap_or_default();
    ctx.metrics.placed_instances.set(ctx.placements.total() as i64);
    ctx.hub.poke(&removed);
    for node in removed {
        let _ = ctx.node_trigger.unbounded_send(ObjectRef::new(&node));
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    fn ready(status: &MicroserviceStatus) -> (&str, &str) {
        let c = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn missing_mesh_is_reported_as_mesh_not_found() {
        let m = msvc(json!({"mesh": "nope", "command": ["srv"]}));
        let p = plan(&m, None, &nodes(), &BTreeSet::new());
        let s = status_for(&m, &p);
        assert_eq!(ready(&s), ("False", MESH_NOT_FOUND));
        assert_eq!(s.desired_instances, 0);
        assert!(s.conditions[0].message.contains("\"nope\""), "{}", s.conditions[0].message);
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn invalid_mesh_and_invalid_spec_have_their_own_reasons() {
        let m = msvc(json!({"mesh": "lan", "command": ["srv"]}));
        let bad_mesh = mesh(json!({"type": "Proximity"}));
        let s = status_for(&m, &plan(&m, Some(&bad_mesh), &nodes(), &BTreeSet::new()));
        assert_eq!(ready(&s), ("False", MESH_INVALID));
        let bad = msvc(
            json!({"mesh": "lan", "command": ["srv"], "healthCheck": {"tcp": {"port": 1}, "exec": {"command": ["x"]}}}),
        );
        let s = status_for(&bad, &plan(&bad, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()));
        assert_eq!(ready(&s), ("False", INVALID_SPEC));
    }

    #[test]
    fn placed_microservice_waits_for_its_instances() {
        let m = msvc(json!({"mesh": "lan", "command": ["srv"]}));
        let s = status_for(&m, &plan(&m, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()));
        assert_eq!(s.desired_instances, 3);
        assert_eq!(ready(&s), ("False", INSTANCES_NOT_READY));
        let progressing = s.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
        assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", PLACED));
    }

    #[test]
    fn no_matching_nodes_is_explained() {
        let m = msvc(json!({"mesh": "lan", "command": ["srv"], "nodeSelector": {"gpu": "yes"}}));
        let s = status_for(&m, &plan(&m, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()));
        assert_eq!(ready(&s), ("False", NO_MATCHING_NODES));
        let zero = msvc(json!({"mesh": "lan", "command": ["srv"], "replicas": 0}));
        let s = status_for(&zero, &plan(&zero, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new()));
        assert_eq!(ready(&s), ("True", INSTANCES_READY));
    }

    #[test]
    fn an_unchanged_plan_gives_an_identical_status() {
        let mut m = msvc(json!({"mesh": "lan", "command": ["srv"]}));
        let p = plan(&m, Some(&mesh(json!({"type": "Network"}))), &nodes(), &BTreeSet::new());
        let first = status_for(&m, &p);
        m.status = Some(first.clone());
        assert_eq!(status_for(&m, &p), first, "a second reconcile must not need a write");
    }
}
