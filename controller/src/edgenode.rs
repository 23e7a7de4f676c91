//! EdgeNode reconciler: instance counts from placement and reports, the Connected
//! condition and addresses from the agent's session, the cluster role from its
//! reports; all read from the fleet index.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use supermesh_api::edgenode::{EdgeNodeStatus, InstanceCounts, NodeAddress};
use supermesh_api::names::condition::*;
use supermesh_api::EdgeNode;
use supermesh_protocol::ClusterView;
use tracing::instrument;

use crate::conditions::{self, Wanted};
use crate::context::{reconcile_in_finalizer, Context, RESYNC};
use crate::view::{capacity_quantities, NodeIdentity, SessionInfo};
use crate::Result;

/// How stale `lastHeartbeatTime` may get before it is rewritten while the agent stays
/// connected, as often as a kubelet reports its node status: the session itself is the
/// liveness signal, so keepalives never turn into API writes.
const HEARTBEAT_WRITE_INTERVAL_SECONDS: i64 = 300;

/// The status of `node` with `desired` instances placed on it, its agent's
/// session, if connected, and its place in its cluster from its latest report,
/// if any. Until `grace_over`, a node without a session keeps its conditions:
/// after a controller restart agents are still reconnecting. A disconnected node
/// has no role: its cluster has moved on without it.
pub fn status_for(
    node: &EdgeNode,
    counts: InstanceCounts,
    session: Option<&SessionInfo>,
    cluster: Option<&ClusterView>,
    grace_over: bool,
) -> EdgeNodeStatus {
    let mut status = node.status.clone().unwrap_or_default();
    status.instances = Some(counts);
    let was = conditions::reason(&status.conditions, CONNECTED).map(str::to_owned);
    let connection = |ok: &'static str, reason: &'static str, message: String| {
        vec![
            Wanted { type_: READY, status: ok, reason, message: message.clone() },
            Wanted { type_: CONNECTED, status: ok, reason, message },
        ]
    };
    let wanted = match session {
        Some(s) => {
            let stale = status
                .last_heartbeat_time
                .as_ref()
                .is_none_or(|t| s.last_seen.as_second() - t.0.as_second() >= HEARTBEAT_WRITE_INTERVAL_SECONDS);
            if stale {
                let seen = Timestamp::from_second(s.last_seen.as_second()).unwrap_or(s.last_seen);
                status.last_heartbeat_time = Some(Time(seen));
            }
            status.agent_version = Some(s.agent_version.clone());
            status.os = Some(s.os.clone());
            status.arch = Some(s.arch.clone());
            status.addresses = addresses(s);
            if let Some(capacity) = s.capacity {
                status.capacity = capacity_quantities(capacity);
            }
            Some(connection("True", AGENT_CONNECTED, format!("supermesh-agent {} connected", s.agent_version)))
        }
        None if was.as_deref() == Some(AGENT_CONNECTED) && !grace_over => None,
        None if was.is_none() || was.as_deref() == Some(AGENT_NEVER_CONNECTED) => Some(connection(
            "Unknown",
            AGENT_NEVER_CONNECTED,
            "the node's supermesh-agent has not connected to the cloud yet".into(),
        )),
        None => Some(connection(
            "False",
            AGENT_DISCONNECTED,
            "the agent lost its connection; its instances keep running on the node".into(),
        )),
    };
    let approval = match NodeIdentity::of(node).approved {
        true => {
            Wanted { type_: APPROVED, status: "True", reason: NODE_APPROVED, message: "the node is approved".into() }
        }
        false => Wanted {
            type_: APPROVED,
            status: "False",
            reason: PENDING_APPROVAL,
            message: format!(
                "the node enrolled with a token that does not approve it and is sent nothing until \
                 `supermeshctl node approve {}`",
                node.name_any()
            ),
        },
    };
    match wanted {
        Some(mut wanted) => {
            wanted.push(approval);
            status.conditions = conditions::merge(&status.conditions, wanted, None);
        }
        // Connection conditions kept as they are (the grace), approval as it is now.
        None => {
            let approved = conditions::merge(&status.conditions, vec![approval], None);
            status.conditions.retain(|c| c.type_ != APPROVED);
            status.conditions.extend(approved);
        }
    }
    if conditions::reason(&status.conditions, CONNECTED) == Some(AGENT_DISCONNECTED) {
        (status.role, status.supernode) = (None, None);
    } else if let Some(view) = cluster {
        (status.role, status.supernode) = (Some(view.role), view.supernode.clone());
    }
    status
}

/// The addresses of a connected node: where its agent connects from and, if it
/// advertises one, where its peers reach it.
fn addresses(session: &SessionInfo) -> Vec<NodeAddress> {
    let internal = NodeAddress { address_type: NodeAddress::INTERNAL_IP.into(), address: session.address.clone() };
    let peer =
        session.peer_address.iter().map(|a| NodeAddress { address_type: NodeAddress::PEER.into(), address: a.clone() });
    std::iter::once(internal).chain(peer).collect()
}

/// Reconciles one EdgeNode.
#[instrument(skip_all, fields(name = %node.name_any()))]
pub async fn reconcile(node: Arc<EdgeNode>, ctx: Arc<Context>) -> Result<Action> {
    // Another replica holds its agent's session and reports: that one writes its status.
    if !ctx.serves(&node.name_any()) {
        return Ok(Action::await_change());
    }
    let api: Api<EdgeNode> = Api::all(ctx.client.clone());
    // Nothing to clean up: the index stopped placing anything on the node when its deletion began.
    reconcile_in_finalizer(api.clone(), node, ctx, |n, c| apply(api, n, c), |_, _| async { Ok(Action::await_change()) })
        .await
}

async fn apply(api: Api<EdgeNode>, node: Arc<EdgeNode>, ctx: Arc<Context>) -> Result<Action> {
    let inputs = ctx.index.node(&node.name_any());
    let grace_over = ctx.index.grace_over();
    let status = status_for(&node, inputs.counts, inputs.session.as_ref(), inputs.cluster.as_ref(), grace_over);
    ctx.write_status(&api, &node, &status).await?;
    Ok(match inputs.session {
        // A node left Connected during the grace must be looked at again when it ends.
        None if !grace_over => Action::requeue(ctx.index.grace_left() + Duration::from_millis(100)),
        None => Action::requeue(RESYNC),
        // Refresh the heartbeat when it is due, spread so that nodes that connected together do not write together.
        Some(_) => {
            let spread = rand::random::<f64>() * 30.0;
            Action::requeue(Duration::from_secs_f64(HEARTBEAT_WRITE_INTERVAL_SECONDS as f64 + 30.0 + spread))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use supermesh_protocol::NodeRole;

    fn counts(desired: i32) -> InstanceCounts {
        InstanceCounts { desired, running: 0, ready: 0 }
    }

    fn session(seen: i64) -> SessionInfo {
        let at = Timestamp::from_second(seen).unwrap();
        SessionInfo {
            connected_at: at,
            last_seen: at,
            agent_version: "0.1.0".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            address: "10.0.0.7".into(),
            peer_address: None,
            capacity: None,
        }
    }

    fn connected(s: &EdgeNodeStatus) -> (&str, &str) {
        let c = s.conditions.iter().find(|c| c.type_ == CONNECTED).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn new_node_is_unknown_until_its_agent_connects() {
        let n = EdgeNode::new("n1", serde_json::from_value(json!({"account": "a", "network": "n"})).unwrap());
        let s = status_for(&n, counts(2), None, None, true);
        assert_eq!(s.instances.as_ref().unwrap().desired, 2);
        assert_eq!(connected(&s), ("Unknown", AGENT_NEVER_CONNECTED));
        let mut again = n.clone();
        again.status = Some(s.clone());
        assert_eq!(status_for(&again, counts(2), None, None, true), s, "no change, no write");
    }

    #[test]
    fn connection_follows_the_session_and_heartbeats_are_coalesced() {
        let mut n = EdgeNode::new("n1", serde_json::from_value(json!({"account": "a", "network": "n"})).unwrap());
        let s = status_for(&n, counts(0), Some(&session(1000)), None, false);
        assert_eq!(connected(&s), ("True", AGENT_CONNECTED));
        assert_eq!(s.last_heartbeat_time.as_ref().unwrap().0.as_second(), 1000);
        assert_eq!(s.arch.as_deref(), Some("x86_64"));
        n.status = Some(s.clone());
        let soon = status_for(&n, counts(0), Some(&session(1100)), None, false);
        assert_eq!(soon, s, "a heartbeat 100 s later is not written");
        let later = status_for(&n, counts(0), Some(&session(1301)), None, false);
        assert_eq!(later.last_heartbeat_time.unwrap().0.as_second(), 1301);

        // Right after a controller restart the node keeps Connected until agents had time to reconnect.
        assert_eq!(status_for(&n, counts(0), None, None, false), s);
        let gone = status_for(&n, counts(0), None, None, true);
        assert_eq!(connected(&gone), ("False", AGENT_DISCONNECTED));
    }

    #[test]
    fn the_peer_address_is_kept_while_the_node_is_offline() {
        let mut n = EdgeNode::new("n1", serde_json::from_value(json!({"account": "a", "network": "n"})).unwrap());
        let s = status_for(
            &n,
            counts(0),
            Some(&SessionInfo { peer_address: Some("10.0.0.7:10360".into()), ..session(1000) }),
            None,
            true,
        );
        assert_eq!(s.address(NodeAddress::INTERNAL_IP), Some("10.0.0.7"));
        assert_eq!(s.address(NodeAddress::PEER), Some("10.0.0.7:10360"));
        n.status = Some(s);
        let offline = status_for(&n, counts(0), None, None, true);
        assert_eq!(offline.address(NodeAddress::PEER), Some("10.0.0.7:10360"));
        let without = status_for(&n, counts(0), Some(&session(2000)), None, true);
        assert_eq!(without.address(NodeAddress::PEER), None, "a reconnect without a peer address drops it");
    }

    #[test]
    fn the_capacity_an_agent_tells_is_recorded_and_read_back_while_offline() {
        let mut n = EdgeNode::new("n1", serde_json::from_value(json!({"account": "a", "network": "n"})).unwrap());
        let capacity = supermesh_protocol::Capacity { cpus: 4, memory_bytes: 8 << 30 };
        let s = status_for(&n, counts(0), Some(&SessionInfo { capacity: Some(capacity), ..session(1000) }), None, true);
        assert_eq!(s.capacity.get("cpu").map(String::as_str), Some("4"));
        assert_eq!(s.capacity.get("memory").map(String::as_str), Some("8388608Ki"));
        n.status = Some(s);
        assert_eq!(crate::view::NodeStatusView::from(&n).capacity, Some(capacity));
        let offline = status_for(&n, counts(0), None, None, true);
        assert_eq!(crate::view::capacity_of(&offline.capacity), Some(capacity), "kept while offline");
        assert_eq!(capacity.class(), 4008);
    }

    #[test]
    fn role_and_supernode_follow_reports_and_clear_on_disconnect() {
        let mut n = EdgeNode::new("n1", serde_json::from_value(json!({"account": "a", "network": "n"})).unwrap());
        let view = ClusterView { role: NodeRole::Member, supernode: Some("n2".into()) };
        let s = status_for(&n, counts(0), Some(&session(1000)), Some(&view), true);
        assert_eq!((s.role, s.supernode.as_deref()), (Some(NodeRole::Member), Some("n2")));
        n.status = Some(s.clone());
        assert_eq!(
            status_for(&n, counts(0), Some(&session(1000)), None, true),
            s,
            "no report since a restart keeps them"
        );
        let promoted = ClusterView { role: NodeRole::Supernode, supernode: Some("n1".into()) };
        let s2 = status_for(&n, counts(0), Some(&session(1000)), Some(&promoted), true);
        assert_eq!((s2.role, s2.supernode.as_deref()), (Some(NodeRole::Supernode), Some("n1")));

        assert_eq!(
            status_for(&n, counts(0), None, Some(&view), false).role,
            Some(NodeRole::Member),
            "within the grace"
        );
        let gone = status_for(&n, counts(0), None, Some(&view), true);
        assert_eq!((gone.role, gone.supernode), (None, None));
    }
}

#[cfg(test)]
mod reconcile_tests {
    use super::*;
    use crate::fixtures::{self, finalized, listed, new_index, node, session};

    #[tokio::test]
    async fn a_connected_agent_makes_its_node_connected_and_ready() {
        let (index, _t) = new_index();
        let pi = finalized(node("pi", "acme", "lan"));
        listed(&index, vec![], vec![pi.clone()], vec![]);
        let _desired = index.connect("pi", 1, session(Some("10.0.0.9:10360")));
        let (ctx, mut api) = fixtures::context(index.clone());
        let reconciled = tokio::spawn(reconcile(Arc::new(pi.clone()), ctx.clone()));
        let status = api.expect_status("/apis/supermesh.io/v1alpha1/edgenodes/pi", &pi).await;
        let connected = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == CONNECTED).unwrap();
        assert_eq!((connected["status"].as_str(), connected["reason"].as_str()), (Some("True"), Some(AGENT_CONNECTED)));
        assert_eq!(status["addresses"][1]["address"], "10.0.0.9:10360");
        assert_eq!(status["instances"]["desired"], 0);
        let action = reconciled.await.unwrap().expect("reconciled");
        assert_ne!(action, Action::await_change(), "a connected node comes back to refresh its heartbeat");

        index.disconnect("pi", 1);
        let mut written = pi;
        written.status = Some(serde_json::from_value(status).unwrap());
        let reconciled = tokio::spawn(reconcile(Arc::new(written.clone()), ctx));
        let status = api.expect_status("/apis/supermesh.io/v1alpha1/edgenodes/pi", &written).await;
        let connected = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == CONNECTED).unwrap();
        assert_eq!(connected["reason"], AGENT_DISCONNECTED);
        reconciled.await.unwrap().expect("reconciled");
    }
}
