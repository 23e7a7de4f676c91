//! EdgeNode reconciler: instance counts from placement and the Connected
//! condition until the node's agent reports its own state.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use supermesh_api::edgenode::{EdgeNodeStatus, InstanceCounts};
use supermesh_api::names::condition::*;
use supermesh_api::EdgeNode;
use tracing::{instrument, warn};

use crate::conditions::{self, Wanted};
use crate::context::{reconcile_in_finalizer, Context, RESYNC};
use crate::Result;

/// The status of `node` when `desired` instances are placed on it.
pub fn status_for(node: &EdgeNode, desired: i32) -> EdgeNodeStatus {
    let mut status = node.status.clone().unwrap_or_default();
    let counts = status.instances.get_or_insert_with(InstanceCounts::default);
    counts.desired = desired;
    if !status.conditions.iter().any(|c| c.type_ == CONNECTED) {
        let never = "the node's supermesh-agent has not connected to the cloud yet";
        let wanted = vec![
            Wanted { type_: READY, status: "Unknown", reason: AGENT_NEVER_CONNECTED, message: never.into() },
            Wanted { type_: CONNECTED, status: "Unknown", reason: AGENT_NEVER_CONNECTED, message: never.into() },
        ];
        status.conditions = conditions::merge(&status.conditions, wanted, None);
    }
    status
}

/// Reconciles one EdgeNode.
#[instrument(skip_all, fields(name = %node.name_any()))]
pub async fn reconcile(node: Arc<EdgeNode>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<EdgeNode> = Api::all(ctx.client.clone());
    reconcile_in_finalizer(
        api.clone(),
        node,
        ctx,
        |n, c| apply(api, n, c),
        |_, _| async {
            // Microservices placed on the node are re-placed by the EdgeNode watch.
            Ok(Action::await_change())
        },
    )
    .await
}

async fn apply(api: Api<EdgeNode>, node: Arc<EdgeNode>, ctx: Arc<Context>) -> Result<Action> {
    // Right after a start, counts are only right once every microservice was placed.
    if !ctx.placements.wait_complete(&ctx.index.microservices, Duration::from_secs(30)).await {
        warn!("placements still incomplete after 30 s; instance counts may be low until the next pass");
    }
    let desired = ctx.placements.instances_on(&node.name_any()) as i32;
    ctx.write_status(&api, &node, &status_for(&node, desired)).await?;
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn new_node_is_unknown_until_its_agent_connects() {
        let n = EdgeNode::new("n1", serde_json::from_value(json!({"account": "a", "network": "n"})).unwrap());
        let s = status_for(&n, 2);
        assert_eq!(s.instances.as_ref().unwrap().desired, 2);
        let connected = s.conditions.iter().find(|c| c.type_ == CONNECTED).unwrap();
        assert_eq!((connected.status.as_str(), connected.reason.as_str()), ("Unknown", AGENT_NEVER_CONNECTED));
        let mut again = n.clone();
        again.status = Some(s.clone());
        assert_eq!(status_for(&again, 2), s, "no change, no write");
    }
}
