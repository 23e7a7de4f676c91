//! Mesh reconciler: validate the spec, count members and microservices, summarise
//! clusters; members and counts are read from the fleet index.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use supermesh_api::mesh::MeshStatus;
use supermesh_api::names::condition::*;
use supermesh_api::Mesh;
use tracing::instrument;

use crate::clusters::Summary;
use crate::conditions::{self, Wanted};
use crate::context::{reconcile_in_finalizer, Context, RESYNC};
use crate::index::{Key, MeshInputs};
use crate::Result;

/// The status of `mesh` given its members (or why its spec is invalid) and the
/// number of microservices naming it.
pub fn status_for(mesh: &Mesh, inputs: &MeshInputs) -> MeshStatus {
    let old = mesh.status.clone().unwrap_or_default();
    let (summary, wanted) = match &inputs.members {
        Ok(summary) => {
            let message = format!("{} nodes in {} clusters", summary.nodes, summary.count);
            (Some(summary.clone()), Wanted::new(READY, true, MESH_VALID, message))
        }
        Err(e) => (None, Wanted::new(READY, false, INVALID_SPEC, e.0.clone())),
    };
    let Summary { nodes: node_count, count: cluster_count, list: clusters } = summary.unwrap_or_default();
    let elected: Vec<&str> = clusters.iter().filter_map(|c| c.supernode.as_deref()).collect();
    MeshStatus {
        supernodes: (!elected.is_empty()).then(|| elected.join(",")),
        observed_generation: mesh.metadata.generation,
        node_count,
        microservice_count: inputs.microservices,
        cluster_count,
        clusters,
        conditions: conditions::merge(&old.conditions, vec![wanted], mesh.metadata.generation),
    }
}

/// Reconciles one Mesh, on the replica holding the controller Lease.
#[instrument(skip_all, fields(namespace = %mesh.namespace().unwrap_or_default(), name = %mesh.name_any()))]
pub async fn reconcile(mesh: Arc<Mesh>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.leads() {
        return Ok(Action::await_change());
    }
    let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &mesh.namespace().unwrap_or_default());
    reconcile_in_finalizer(
        api.clone(),
        mesh,
        ctx,
        |m, c| apply(api, m, c),
        |_, _| async {
            // Microservices naming this mesh are re-reconciled by the watch and report MeshNotFound.
            Ok(Action::await_change())
        },
    )
    .await
}

async fn apply(api: Api<Mesh>, mesh: Arc<Mesh>, ctx: Arc<Context>) -> Result<Action> {
    // The index takes each event before the controller does; a miss is a race with a relist.
    let Some(inputs) = ctx.index.mesh(&Key::of(&*mesh)) else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let status = status_for(&mesh, &inputs);
    let old_reason = mesh.status.as_ref().and_then(|s| conditions::reason(&s.conditions, READY)).map(str::to_owned);
    ctx.write_status(&api, &mesh, &status).await?;
    let ready = &status.conditions[0];
    if ready.reason == INVALID_SPEC && old_reason.as_deref() != Some(INVALID_SPEC) {
        ctx.publish(&*mesh, true, INVALID_SPEC, ready.message.clone()).await;
    }
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clusters::{summarize, MemberStatus};
    use crate::fixtures::node_with_status as node;
    use crate::view::{NodeStatusView, NodeView};
    use serde_json::json;
    use supermesh_api::mesh::ClusterStatus;
    use supermesh_api::{EdgeNode, Microservice};

    /// The status of `mesh` as the index would feed it: its members among `nodes`.
    fn status_of(mesh: &Mesh, nodes: &[EdgeNode], microservices: &[&Microservice]) -> MeshStatus {
        let views: Vec<(NodeView, NodeStatusView)> = nodes.iter().map(|n| (n.into(), n.into())).collect();
        let admitted: Vec<NodeView> = views.iter().map(|(v, _)| v.clone()).collect();
        let members = crate::placement::mesh_members(&mesh.spec, &admitted).map(|members| {
            summarize(members.iter().filter_map(|m| {
                let (view, status) = views.iter().find(|(v, _)| v.name == m.name)?;
                Some(MemberStatus { name: &view.name, network: &view.network, status })
            }))
        });
        let microservices = microservices.iter().filter(|m| m.spec.mesh == mesh.name_any()).count() as i32;
        status_for(mesh, &MeshInputs { members, microservices })
    }

    #[test]
    fn counts_members_clusters_and_microservices() {
        let mut mesh = Mesh::new("lan", serde_json::from_value(json!({"type": "Network"})).unwrap());
        mesh.metadata.namespace = Some("team".into());
        let nodes =
            vec![node("a1", "net-a", true, true), node("a2", "net-a", false, false), node("b1", "net-b", true, false)];
        let web = Microservice::new("web", serde_json::from_value(json!({"mesh": "lan", "command": ["x"]})).unwrap());
        let other = Microservice::new("db", serde_json::from_value(json!({"mesh": "x", "command": ["x"]})).unwrap());
        let s = status_of(&mesh, &nodes, &[&web, &other]);
        assert_eq!((s.node_count, s.microservice_count, s.cluster_count), (3, 1, 2));
        assert_eq!(s.supernodes.as_deref(), Some("a1"));
        assert_eq!(
            s.clusters,
            vec![
                ClusterStatus { network: "net-a".into(), supernode: Some("a1".into()), members: 2, ready: 1 },
                ClusterStatus { network: "net-b".into(), supernode: None, members: 1, ready: 1 },
            ]
        );
        assert_eq!(conditions::reason(&s.conditions, READY), Some(MESH_VALID));
    }

    #[test]
    fn invalid_spec_is_a_condition_not_an_error() {
        let mesh = Mesh::new("near", serde_json::from_value(json!({"type": "Proximity"})).unwrap());
        let s = status_of(&mesh, &[node("a1", "n", true, false)], &[]);
        assert_eq!(s.node_count, 0);
        let ready = &s.conditions[0];
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", INVALID_SPEC));
        assert!(ready.message.contains("spec.proximity"));
    }

    #[test]
    fn cluster_list_is_bounded() {
        let nodes: Vec<EdgeNode> =
            (0..100).map(|i| node(&format!("n{i}"), &format!("net-{i}"), false, false)).collect();
        let mesh = Mesh::new("lan", serde_json::from_value(json!({"type": "Network"})).unwrap());
        let s = status_of(&mesh, &nodes, &[]);
        assert_eq!(s.node_count, 100);
        assert_eq!(s.clusters.len(), MeshStatus::MAX_CLUSTERS);
        assert_eq!(s.cluster_count, 100, "the count is not bounded");
    }
}

#[cfg(test)]
mod reconcile_tests {
    use super::*;
    use crate::fixtures::{self, finalized, listed, mesh, new_index, node};
    use serde_json::json;

    #[tokio::test]
    async fn an_invalid_mesh_says_why_in_its_status_and_an_event() {
        let (index, _t) = new_index();
        let near = finalized(mesh("near", json!({"type": "Proximity"})));
        listed(&index, vec![near.clone()], vec![node("a", "acme", "lan")], vec![]);
        let (ctx, mut api) = fixtures::context(index);
        let reconciled = tokio::spawn(reconcile(Arc::new(near.clone()), ctx));
        let status = api.expect_status("/apis/supermesh.io/v1alpha1/namespaces/team/meshes/near", &near).await;
        assert_eq!(status["conditions"][0]["reason"], INVALID_SPEC);
        assert!(status["conditions"][0]["message"].as_str().unwrap().contains("spec.proximity"));
        let event = api.expect_event().await;
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some(INVALID_SPEC)));
        reconciled.await.unwrap().expect("reconciled");
    }

    #[tokio::test]
    async fn a_valid_mesh_counts_its_members_from_the_index() {
        let (index, _t) = new_index();
        let acme = finalized(mesh("acme", json!({"type": "Account", "account": "acme"})));
        let nodes = vec![node("a", "acme", "lan"), node("b", "acme", "wan"), node("c", "globex", "lan")];
        listed(&index, vec![acme.clone()], nodes, vec![]);
        let (ctx, mut api) = fixtures::context(index);
        let reconciled = tokio::spawn(reconcile(Arc::new(acme.clone()), ctx));
        let status = api.expect_status("/apis/supermesh.io/v1alpha1/namespaces/team/meshes/acme", &acme).await;
        assert_eq!((status["nodeCount"].as_i64(), status["clusterCount"].as_i64()), (Some(2), Some(2)));
        reconciled.await.unwrap().expect("reconciled");
        api.expect_nothing().await;
    }
}
