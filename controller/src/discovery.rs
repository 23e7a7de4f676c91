//! Discovery answers for agents' local APIs: the nodes of the asking node's account
//! (nearest first), the nodes near it, and the endpoints of a microservice. Pure
//! functions over the index; the session reads the index and sends the answer.

use std::cmp::Ordering;

use kube::ResourceExt;
use supermesh_api::edgenode::NodeAddress;
use supermesh_api::protocol::{Endpoint, NodeInfo, ResourceRef, MICROSERVICE};
use supermesh_api::{EdgeNode, Location};

/// Most nodes or endpoints one answer carries.
pub const MAX_ANSWER: usize = 1000;

/// Which nodes a `_/nodes/<scope>` query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The nodes of the asking node's account, itself included.
    Account,
    /// Those of them with a known location.
    Proximity,
}

impl Scope {
    /// The scope named by the last segment of a `_/nodes/<scope>` resource.
    pub fn parse(name: &str) -> Option<Scope> {
        match name {
            "account" => Some(Scope::Account),
            "proximity" => Some(Scope::Proximity),
            _ => None,
        }
    }
}

/// The host at which `node` is reachable: that of its Peer address, else its InternalIP.
pub fn address(node: &EdgeNode) -> Option<String> {
    let status = node.status.as_ref()?;
    status
        .address(NodeAddress::PEER)
        .and_then(host_of)
        .or_else(|| status.address(NodeAddress::INTERNAL_IP))
        .map(str::to_owned)
}

/// The host of `host:port` (`[v6]:port` gives `v6`).
fn host_of(address: &str) -> Option<&str> {
    let (host, _port) = address.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some(host)
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

/// `node` as discovery describes it to a node at `from`.
pub fn node_info(node: &EdgeNode, from: Option<&Location>, live: bool) -> NodeInfo {
    NodeInfo {
        name: node.name_any(),
        account: node.spec.account.clone(),
        network: node.spec.network.clone(),
        location: node.spec.location,
        address: address(node),
        role: node.status.as_ref().and_then(|s| s.role),
        live,
        distance_km: distance(from, node.spec.location.as_ref()),
    }
}

/// The nodes of `asking`'s account within `scope`, nearest first (unknown distances
/// last), then by name; at most [`MAX_ANSWER`]. `live` tells whether a node's agent is connected.
pub fn nodes<'a>(
    scope: Scope,
    asking: &EdgeNode,
    all: impl IntoIterator<Item = &'a EdgeNode>,
    live: impl Fn(&str) -> bool,
) -> Vec<NodeInfo> {
    let from = asking.spec.location.as_ref();
    let mut found: Vec<NodeInfo> = all
        .into_iter()
        .filter(|n| n.spec.account == asking.spec.account)
        .filter(|n| scope == Scope::Account || n.spec.location.is_some())
        .map(|n| node_info(n, from, live(&n.name_any())))
        .collect();
    found.sort_by(|a, b| nearest_first(a.distance_km, b.distance_km).then_with(|| a.name.cmp(&b.name)));
    found.truncate(MAX_ANSWER);
    found
}

/// The endpoints of a microservice declaring `ports`, one per node of `placed`, for `asking`:
/// nodes of its own network first, then nearest first (unknown distances last), then by name;
/// at most [`MAX_ANSWER`]. `ready` tells whether a node reports its instance ready.
pub fn endpoints<'a>(
    asking: &EdgeNode,
    placed: impl IntoIterator<Item = &'a EdgeNode>,
    ports: &[i32],
    ready: impl Fn(&str) -> bool,
) -> Vec<Endpoint> {
    let from = asking.spec.location.as_ref();
    let mut found: Vec<Endpoint> = placed
        .into_iter()
        .map(|n| Endpoint {
            node: n.name_any(),
            network: n.spec.network.clone(),
            address: address(n),
            ports: ports.to_vec(),
            ready: ready(&n.name_any()),
            location: n.spec.location,
            distance_km: distance(from, n.spec.location.as_ref()),
        })
        .collect();
    let elsewhere = |e: &Endpoint| e.network != asking.spec.network;
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
    use supermesh_api::edgenode::NodeRole;
    use supermesh_api::EdgeNodeStatus;

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
        assert_eq!(address(&n).as_deref(), Some("192.168.1.7"));
        let v6 = with_addresses(node("a", "acme", "lan", None), "10.0.0.7", Some("[fd00::7]:10360"));
        assert_eq!(address(&v6).as_deref(), Some("fd00::7"));
        let internal = with_addresses(node("a", "acme", "lan", None), "10.0.0.7", None);
        assert_eq!(address(&internal).as_deref(), Some("10.0.0.7"));
        assert_eq!(address(&node("a", "acme", "lan", None)), None);
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
        let found = nodes(Scope::Account, &me, &all, |n| n == "london");
        assert_eq!(names(&found), ["me", "london", "berlin", "nowhere-a", "nowhere-b"]);
        assert_eq!(found[0].distance_km, Some(0.0));
        assert_eq!(found[0].address.as_deref(), Some("10.0.0.1"));
        assert_eq!(found[0].role, Some(NodeRole::Member));
        assert!((found[1].distance_km.unwrap() - 343.5).abs() < 2.0);
        assert!(found[1].live && !found[0].live);
        assert_eq!(found[3].distance_km, None);

        let near = nodes(Scope::Proximity, &me, &all, |_| true);
        assert_eq!(names(&near), ["me", "london", "berlin"], "only located nodes");
    }

    #[test]
    fn without_a_location_of_its_own_a_node_gets_nodes_by_name() {
        let me = node("me", "acme", "lan", None);
        let all = [node("b", "acme", "x", Some(BERLIN)), node("a", "acme", "x", Some(LONDON)), me.clone()];
        let found = nodes(Scope::Proximity, &me, &all, |_| false);
        assert_eq!(names(&found), ["a", "b"]);
        assert!(found.iter().all(|n| n.distance_km.is_none()));
    }

    #[test]
    fn answers_are_bounded() {
        let me = node("me", "acme", "lan", None);
        let all: Vec<EdgeNode> = (0..MAX_ANSWER + 5).map(|i| node(&format!("n{i:05}"), "acme", "lan", None)).collect();
        assert_eq!(nodes(Scope::Account, &me, &all, |_| false).len(), MAX_ANSWER);
        assert_eq!(endpoints(&me, &all, &[], |_| false).len(), MAX_ANSWER);
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
        let found = endpoints(&me, &placed, &[8080, 9090], |n| n.ends_with("lan"));
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
