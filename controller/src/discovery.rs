//! Discovery answers for agents' local APIs: the nodes of the asking node's account
//! (nearest first), the nodes near it, and the endpoints of a microservice. Pure
//! functions over the index's node views; the index reads itself and calls them.

use std::cmp::Ordering;

use supermesh_protocol::names::host_of;
use supermesh_protocol::{Endpoint, Location, NodeInfo, ResourceRef, Scope, MICROSERVICE};

use crate::view::{NodeStatusView, NodeView};

/// Most nodes or endpoints one answer carries.
pub const MAX_ANSWER: usize = 1000;

/// The host at which a node is reachable: that of its Peer address, else its InternalIP.
pub fn address(status: &NodeStatusView) -> Option<String> {
    status.peer_address.as_deref().and_then(host_of).or(status.internal_ip.as_deref()).map(str::to_owned)
}

fn distance(from: Option<&Location>, to: Option<&Location>) -> Option<f64> {
    Some(from?.distance_km(to?))
}

/// Nearest first, unknown distances last.
fn nearest_first(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// A node as discovery describes it to a node at `from`.
pub fn node_info(node: &NodeView, status: &NodeStatusView, from: Option<&Location>, live: bool) -> NodeInfo {
    NodeInfo {
        name: node.name.clone(),
        account: node.account.clone(),
        network: node.network.clone(),
        location: node.location,
        address: address(status),
        role: status.role,
        live,
        distance_km: distance(from, node.location.as_ref()),
    }
}

/// The nodes of `asking`'s account within `scope`, nearest first (unknown distances
/// last), then by name; at most [`MAX_ANSWER`]. Each node of `all` comes with its
/// status and whether its agent is connected.
pub fn nodes<'a>(
    scope: Scope,
    asking: &NodeView,
    all: impl IntoIterator<Item = (&'a NodeView, &'a NodeStatusView, bool)>,
) -> Vec<NodeInfo> {
    let from = asking.location.as_ref();
    let mut found: Vec<NodeInfo> = all
        .into_iter()
        .filter(|(n, _, _)| n.account == asking.account)
        .filter(|(n, _, _)| scope == Scope::Account || n.location.is_some())
        .map(|(n, status, live)| node_info(n, status, from, live))
        .collect();
    found.sort_by(|a, b| nearest_first(a.distance_km, b.distance_km).then_with(|| a.name.cmp(&b.name)));
    found.truncate(MAX_ANSWER);
    found
}

/// The endpoints of a microservice declaring `ports`, one per node of `placed` (each
/// with its status and whether it reports its instance ready), for `asking`: nodes of
/// its own network first, then nearest first (unknown distances last), then by name;
/// at most [`MAX_ANSWER`].
pub fn endpoints<'a>(
    asking: &NodeView,
    placed: impl IntoIterator<Item = (&'a NodeView, &'a NodeStatusView, bool)>,
    ports: &[i32],
) -> Vec<Endpoint> {
    let from = asking.location.as_ref();
    let mut found: Vec<Endpoint> = placed
        .into_iter()
        .map(|(n, status, ready)| Endpoint {
            node: n.name.clone(),
            network: n.network.clone(),
            address: address(status),
            ports: ports.to_vec(),
            ready,
            location: n.location,
            distance_km: distance(from, n.location.as_ref()),
        })
        .collect();
    let elsewhere = |e: &Endpoint| e.network != asking.network;
    found.sort_by(|a, b| {
        elsewhere(a)
            .cmp(&elsewhere(b))
            .then_with(|| nearest_first(a.distance_km, b.distance_km))
            .then_with(|| a.node.cmp(&b.node))
    });
    found.truncate(MAX_ANSWER);
    found
}

/// Whether a node holding `held` (resource strings) may discover the endpoints of
/// `namespace`: only when at least one microservice of that namespace is on it.
pub fn may_discover<'a>(namespace: &str, held: impl IntoIterator<Item = &'a str>) -> bool {
    held.into_iter()
        .filter_map(|r| ResourceRef::parse(r).ok())
        .any(|r| r.namespace == namespace && r.res_type == MICROSERVICE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use supermesh_api::edgenode::NodeAddress;
    use supermesh_api::{EdgeNode, EdgeNodeStatus};
    use supermesh_protocol::NodeRole;

    fn nodes_of(scope: Scope, me: &EdgeNode, all: &[EdgeNode], live: impl Fn(&str) -> bool) -> Vec<NodeInfo> {
        let all: Vec<(NodeView, NodeStatusView)> = all.iter().map(|n| (n.into(), n.into())).collect();
        nodes(scope, &me.into(), all.iter().map(|(v, s)| (v, s, live(&v.name))))
    }

    fn endpoints_of(me: &EdgeNode, placed: &[EdgeNode], ports: &[i32], ready: impl Fn(&str) -> bool) -> Vec<Endpoint> {
        let placed: Vec<(NodeView, NodeStatusView)> = placed.iter().map(|n| (n.into(), n.into())).collect();
        endpoints(&me.into(), placed.iter().map(|(v, s)| (v, s, ready(&v.name))), ports)
    }

    fn address_of(n: &EdgeNode) -> Option<String> {
        address(&n.into())
    }

    fn node(name: &str, account: &str, network: &str, at: Option<(f64, f64)>) -> EdgeNode {
        let mut spec = json!({"account": account, "network": network});
        if let Some((latitude, longitude)) = at {
            spec["location"] = json!({"latitude": latitude, "longitude": longitude});
        }
        EdgeNode::new(name, serde_json::from_value(spec).unwrap())
    }

    fn with_addresses(mut n: EdgeNode, internal: &str, peer: Option<&str>) -> EdgeNode {
        let mut status = EdgeNodeStatus { role: Some(NodeRole::Member), ..EdgeNodeStatus::default() };
        status.addresses.push(NodeAddress { address_type: NodeAddress::INTERNAL_IP.into(), address: internal.into() });
        if let Some(peer) = peer {
            status.addresses.push(NodeAddress { address_type: NodeAddress::PEER.into(), address: peer.into() });
        }
        n.status = Some(status);
        n
    }

    const PARIS: (f64, f64) = (48.8566, 2.3522);
    const LONDON: (f64, f64) = (51.5074, -0.1278);
    const BERLIN: (f64, f64) = (52.52, 13.405);

    fn names(infos: &[NodeInfo]) -> Vec<&str> {
        infos.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn the_address_is_the_peer_host_else_the_internal_ip() {
        let n = with_addresses(node("a", "acme", "lan", None), "10.0.0.7", Some("192.168.1.7:10360"));
        assert_eq!(address_of(&n).as_deref(), Some("192.168.1.7"));
        let v6 = with_addresses(node("a", "acme", "lan", None), "10.0.0.7", Some("[fd00::7]:10360"));
        assert_eq!(address_of(&v6).as_deref(), Some("fd00::7"));
        let internal = with_addresses(node("a", "acme", "lan", None), "10.0.0.7", None);
        assert_eq!(address_of(&internal).as_deref(), Some("10.0.0.7"));
        assert_eq!(address_of(&node("a", "acme", "lan", None)), None);
    }

    #[test]
    fn account_discovery_lists_the_account_nearest_first_then_unlocated() {
        let me = with_addresses(node("me", "acme", "lan", Some(PARIS)), "10.0.0.1", None);
        let all = [
            me.clone(),
            node("berlin", "acme", "b", Some(BERLIN)),
            node("nowhere-b", "acme", "x", None),
            node("nowhere-a", "acme", "x", None),
            node("london", "acme", "l", Some(LONDON)),
            node("stranger", "other", "lan", Some(PARIS)),
        ];
        let found = nodes_of(Scope::Account, &me, &all, |n| n == "london");
        assert_eq!(names(&found), ["me", "london", "berlin", "nowhere-a", "nowhere-b"]);
        assert_eq!(found[0].distance_km, Some(0.0));
        assert_eq!(found[0].address.as_deref(), Some("10.0.0.1"));
        assert_eq!(found[0].role, Some(NodeRole::Member));
        assert!((found[1].distance_km.unwrap() - 343.5).abs() < 2.0);
        assert!(found[1].live && !found[0].live);
        assert_eq!(found[3].distance_km, None);

        let near = nodes_of(Scope::Proximity, &me, &all, |_| true);
        assert_eq!(names(&near), ["me", "london", "berlin"], "only located nodes");
    }

    #[test]
    fn without_a_location_of_its_own_a_node_gets_nodes_by_name() {
        let me = node("me", "acme", "lan", None);
        let all = [node("b", "acme", "x", Some(BERLIN)), node("a", "acme", "x", Some(LONDON)), me.clone()];
        let found = nodes_of(Scope::Proximity, &me, &all, |_| false);
        assert_eq!(names(&found), ["a", "b"]);
        assert!(found.iter().all(|n| n.distance_km.is_none()));
    }

    #[test]
    fn answers_are_bounded() {
        let me = node("me", "acme", "lan", None);
        let all: Vec<EdgeNode> = (0..MAX_ANSWER + 5).map(|i| node(&format!("n{i:05}"), "acme", "lan", None)).collect();
        assert_eq!(nodes_of(Scope::Account, &me, &all, |_| false).len(), MAX_ANSWER);
        assert_eq!(endpoints_of(&me, &all, &[], |_| false).len(), MAX_ANSWER);
    }

    #[test]
    fn endpoints_on_the_same_network_come_first_then_nearest() {
        let me = node("me", "acme", "lan", Some(PARIS));
        let placed = [
            node("far-lan", "acme", "lan", Some(BERLIN)),
            with_addresses(node("near-wan", "acme", "wan", Some(LONDON)), "10.1.0.1", Some("203.0.113.5:10360")),
            node("unlocated-wan", "acme", "wan", None),
            node("near-lan", "acme", "lan", Some(PARIS)),
            node("berlin-wan", "acme", "wan", Some(BERLIN)),
        ];
        let found = endpoints_of(&me, &placed, &[8080, 9090], |n| n.ends_with("lan"));
        let order: Vec<&str> = found.iter().map(|e| e.node.as_str()).collect();
        assert_eq!(order, ["near-lan", "far-lan", "near-wan", "berlin-wan", "unlocated-wan"]);
        assert_eq!(found[2].address.as_deref(), Some("203.0.113.5"));
        assert_eq!(found[2].ports, [8080, 9090]);
        assert!(found[0].ready && found[1].ready && !found[2].ready);
        assert_eq!(found[4].distance_km, None);
    }

    #[test]
    fn only_nodes_running_a_microservice_of_the_namespace_discover_its_endpoints() {
        let held = ["team/microservice/web", "_/membership/lan"];
        assert!(may_discover("team", held));
        assert!(!may_discover("other", held));
        assert!(!may_discover("_", held), "a membership is not a microservice");
        assert!(!may_discover("team", []));
    }
}
