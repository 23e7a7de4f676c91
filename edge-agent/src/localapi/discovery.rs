//! Discovery answers, worked out without I/O: which nodes a query asks for, the
//! network's nodes and endpoints from the cluster registry, nodes nearest first,
//! and a microservice's endpoints merged from the registry and the cloud.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use supermesh_protocol::peer::Registry;
use supermesh_protocol::Location;
use supermesh_protocol::{Endpoint, NodeInfo, NODES};

/// Which nodes `GET /v1/nodes` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodesType {
    /// Nodes of this node's network cluster, from its registry (works without the cloud).
    Network,
    /// Nodes of this node's account, anywhere, from the cloud.
    Account,
    /// Nodes with a location, nearest first, from the cloud.
    Proximity,
}

impl NodesType {
    /// The type a `type` parameter names; `linkLocal` is mimik's name for `network`.
    pub fn parse(text: &str) -> Result<NodesType, String> {
        match text {
            "network" | "linkLocal" => Ok(NodesType::Network),
            "account" => Ok(NodesType::Account),
            "proximity" => Ok(NodesType::Proximity),
            other => {
                let shown: String = other.chars().take(64).collect();
                Err(format!("unknown type {shown:?}; valid types are network (alias linkLocal), account and proximity"))
            }
        }
    }

    /// The resource the cloud answers this type's query on; `None` for network, which the registry answers.
    pub fn resource(self) -> Option<String> {
        match self {
            NodesType::Network => None,
            NodesType::Account => Some(format!("_/{NODES}/account")),
            NodesType::Proximity => Some(format!("_/{NODES}/proximity")),
        }
    }
}

/// A checked `GET /v1/nodes` query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodesQuery {
    /// Which nodes.
    pub kind: NodesType,
    /// Only nodes at most this far away (proximity only).
    pub radius_km: Option<f64>,
    /// At most this many nodes, the first in order.
    pub limit: Option<usize>,
}

impl NodesQuery {
    /// Checks the query parameters `type`, `radiusKm` and `limit`.
    pub fn parse(kind: Option<&str>, radius_km: Option<&str>, limit: Option<&str>) -> Result<NodesQuery, String> {
        let kind =
            kind.ok_or("missing parameter type; valid types are network (alias linkLocal), account and proximity")?;
        let kind = NodesType::parse(kind)?;
        let radius_km = radius_km
            .map(|r| {
                if kind != NodesType::Proximity {
                    return Err("radiusKm applies only to type=proximity".to_owned());
                }
                r.parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| format!("radiusKm {r:?} is not a positive number of kilometres, e.g. 25"))
            })
            .transpose()?;
        let limit = limit
            .map(|l| {
                l.parse::<usize>()
                    .ok()
                    .filter(|l| *l > 0)
                    .ok_or_else(|| format!("limit {l:?} is not a positive integer"))
            })
            .transpose()?;
        Ok(NodesQuery { kind, radius_km, limit })
    }
}

/// Great-circle distance between two places, when both are known.
fn distance(here: Option<&Location>, there: Option<&Location>) -> Option<f64> {
    Some(here?.distance_km(there?))
}

/// Nearer first; unknown distances last.
fn nearer(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The host of a `host:port` address (`[v6]:port` gives `v6`); anything else as it is.
pub fn host_of(address: &str) -> String {
    supermesh_protocol::names::host_of(address).unwrap_or(address).to_owned()
}

/// The members of a cluster registry as nodes of its network.
pub fn registry_nodes(registry: &Registry) -> Vec<NodeInfo> {
    registry
        .members
        .iter()
        .map(|m| NodeInfo {
            name: m.node.clone(),
            account: m.account.clone(),
            network: registry.network.clone(),
            location: m.location,
            address: m.address.as_deref().map(host_of),
            role: m.role,
            live: m.live,
            distance_km: None,
        })
        .collect()
}

/// The nodes `query` answers, out of `nodes`, with their distance from `here`:
/// proximity keeps only located nodes (within `radiusKm` if given), nearest first;
/// network and account list live nodes first, then nearest first (unknown distance
/// last). Ties break on name; `limit` cuts the list.
pub fn arrange_nodes(query: &NodesQuery, nodes: Vec<NodeInfo>, here: Option<&Location>) -> Vec<NodeInfo> {
    let mut nodes: Vec<NodeInfo> =
        nodes.into_iter().map(|n| NodeInfo { distance_km: distance(here, n.location.as_ref()), ..n }).collect();
    match query.kind {
        NodesType::Proximity => {
            nodes.retain(|n| n.distance_km.is_some_and(|d| query.radius_km.is_none_or(|r| d <= r)));
            nodes.sort_by(|a, b| nearer(a.distance_km, b.distance_km).then_with(|| a.name.cmp(&b.name)));
        }
        NodesType::Network | NodesType::Account => nodes.sort_by(|a, b| {
            b.live.cmp(&a.live).then_with(|| nearer(a.distance_km, b.distance_km)).then_with(|| a.name.cmp(&b.name))
        }),
    }
    if let Some(limit) = query.limit {
        nodes.truncate(limit);
    }
    nodes
}

/// The instances of microservice `key` (`namespace/microservice/name`) the registry
/// knows of. An instance on a member whose heartbeats stopped is not ready.
pub fn registry_endpoints(registry: &Registry, key: &str) -> Vec<Endpoint> {
    registry
        .members
        .iter()
        .flat_map(|m| {
            m.instances.iter().filter(|i| i.resource == key).map(move |i| Endpoint {
                node: m.node.clone(),
                network: registry.network.clone(),
                address: m.address.as_deref().map(host_of),
                ports: i.ports.clone(),
                ready: i.ready && m.live,
                location: m.location,
                distance_km: None,
            })
        })
        .collect()
}

/// One endpoint per node: the registry's (`local`) where it has one, else the
/// cloud's (`remote`); with distances from `here`, nodes of `network` first, then
/// nearest first (unknown distance last), then by node name.
pub fn merge_endpoints(
    local: Vec<Endpoint>,
    remote: Vec<Endpoint>,
    network: &str,
    here: Option<&Location>,
) -> Vec<Endpoint> {
    let mut by_node: BTreeMap<String, Endpoint> = BTreeMap::new();
    for endpoint in local.into_iter().chain(remote) {
        by_node.entry(endpoint.node.clone()).or_insert(endpoint);
    }
    let mut endpoints: Vec<Endpoint> =
        by_node.into_values().map(|e| Endpoint { distance_km: distance(here, e.location.as_ref()), ..e }).collect();
    endpoints.sort_by(|a, b| {
        (a.network != network)
            .cmp(&(b.network != network))
            .then_with(|| nearer(a.distance_km, b.distance_km))
            .then_with(|| a.node.cmp(&b.node))
    });
    endpoints
}

#[cfg(test)]
mod tests {
    use supermesh_protocol::peer::RegistryEntry;
    use supermesh_protocol::{InstanceReport, NodeRole, Phase};

    use super::*;

    const PARIS: Location = Location { latitude: 48.8566, longitude: 2.3522 };
    const VERSAILLES: Location = Location { latitude: 48.8049, longitude: 2.1204 };
    const LONDON: Location = Location { latitude: 51.5074, longitude: -0.1278 };
    const BERLIN: Location = Location { latitude: 52.52, longitude: 13.405 };

    fn node(name: &str, location: Option<Location>, live: bool) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            account: "acme".into(),
            network: "home".into(),
            location,
            address: None,
            role: None,
            live,
            // The cloud's figure is replaced by this node's own.
            distance_km: Some(-1.0),
        }
    }

    fn names(nodes: &[NodeInfo]) -> Vec<&str> {
        nodes.iter().map(|n| n.name.as_str()).collect()
    }

    fn query(text: &str) -> NodesQuery {
        let params: BTreeMap<&str, &str> = text.split('&').filter_map(|p| p.split_once('=')).collect();
        NodesQuery::parse(params.get("type").copied(), params.get("radiusKm").copied(), params.get("limit").copied())
            .unwrap()
    }

    #[test]
    fn queries_are_checked_with_clear_messages() {
        assert_eq!(query("type=linkLocal").kind, NodesType::Network);
        assert_eq!(
            query("type=network&limit=3"),
            NodesQuery { kind: NodesType::Network, radius_km: None, limit: Some(3) }
        );
        assert_eq!(query("type=proximity&radiusKm=2.5").radius_km, Some(2.5));
        assert_eq!(NodesType::Account.resource().as_deref(), Some("_/nodes/account"));
        assert_eq!(NodesType::Proximity.resource().as_deref(), Some("_/nodes/proximity"));
        assert_eq!(NodesType::Network.resource(), None);
        let cases = [
            (None, None, None, "missing parameter type"),
            (Some("cluster"), None, None, "valid types are network (alias linkLocal), account and proximity"),
            (Some("Network"), None, None, "unknown type \"Network\""),
            (Some("account"), Some("5"), None, "only to type=proximity"),
            (Some("proximity"), Some("-1"), None, "not a positive number"),
            (Some("proximity"), Some("NaN"), None, "not a positive number"),
            (Some("proximity"), Some("inf"), None, "not a positive number"),
            (Some("proximity"), Some("far"), None, "not a positive number"),
            (Some("network"), None, Some("0"), "not a positive integer"),
            (Some("network"), None, Some("-2"), "not a positive integer"),
        ];
        for (kind, radius, limit, hint) in cases {
            let err = NodesQuery::parse(kind, radius, limit).unwrap_err();
            assert!(err.contains(hint), "{kind:?} {radius:?} {limit:?}: {err}");
        }
    }

    #[test]
    fn proximity_lists_located_nodes_nearest_first_within_the_radius() {
        let nodes = vec![
            node("berlin", Some(BERLIN), true),
            node("nowhere", None, true),
            node("london", Some(LONDON), false),
            node("versailles", Some(VERSAILLES), true),
            node("paris", Some(PARIS), true),
        ];
        let all = arrange_nodes(&query("type=proximity"), nodes.clone(), Some(&PARIS));
        assert_eq!(names(&all), ["paris", "versailles", "london", "berlin"], "nearest first, dead or alive");
        assert_eq!(all[0].distance_km, Some(0.0));
        assert!((all[2].distance_km.unwrap() - 343.5).abs() < 2.0, "{:?}", all[2].distance_km);
        let near = arrange_nodes(&query("type=proximity&radiusKm=400"), nodes.clone(), Some(&PARIS));
        assert_eq!(names(&near), ["paris", "versailles", "london"]);
        let two = arrange_nodes(&query("type=proximity&radiusKm=400&limit=2"), nodes, Some(&PARIS));
        assert_eq!(names(&two), ["paris", "versailles"]);
    }

    #[test]
    fn network_and_account_list_live_nodes_first_then_nearest_then_by_name() {
        let nodes = vec![
            node("b-unknown", None, true),
            node("a-unknown", None, true),
            node("london", Some(LONDON), true),
            node("dead-paris", Some(PARIS), false),
            node("versailles", Some(VERSAILLES), true),
        ];
        let order = ["versailles", "london", "a-unknown", "b-unknown", "dead-paris"];
        for kind in ["network", "account"] {
            let arranged = arrange_nodes(&query(&format!("type={kind}")), nodes.clone(), Some(&PARIS));
            assert_eq!(names(&arranged), order, "{kind}");
            assert_eq!(arranged[2].distance_km, None, "no location, no distance");
        }
        let unplaced = arrange_nodes(&query("type=account&limit=3"), nodes, None);
        assert_eq!(names(&unplaced), ["a-unknown", "b-unknown", "london"], "without a location here: by name");
        assert!(unplaced.iter().all(|n| n.distance_km.is_none()));
    }

    fn entry(node: &str, address: Option<&str>, live: bool, instances: Vec<InstanceReport>) -> RegistryEntry {
        RegistryEntry {
            node: node.into(),
            account: "acme".into(),
            address: address.map(Into::into),
            location: Some(VERSAILLES),
            live,
            role: live.then_some(NodeRole::Member),
            instances,
        }
    }

    fn instance(resource: &str, ready: bool, ports: Vec<i32>) -> InstanceReport {
        InstanceReport {
            ports,
            ..InstanceReport::new(resource, "1-u", if ready { Phase::Ready } else { Phase::Running })
        }
    }

    #[test]
    fn addresses_lose_their_port() {
        assert_eq!(host_of("10.0.0.7:10360"), "10.0.0.7");
        assert_eq!(host_of("[fe80::1]:10360"), "fe80::1");
        assert_eq!(host_of("pi.local:1"), "pi.local");
        assert_eq!(host_of("fe80::1"), "fe80::1");
        assert_eq!(host_of("pi.local"), "pi.local");
    }

    #[test]
    fn the_registry_gives_the_network_and_its_endpoints() {
        let web = "team/microservice/web";
        let registry = Registry {
            network: "home".into(),
            members: vec![
                entry("a", Some("10.0.0.1:10360"), true, vec![instance(web, true, vec![8080, 8443])]),
                entry("b", None, true, vec![instance("team/microservice/db", true, vec![])]),
                entry("c", Some("[fd00::3]:10360"), false, vec![instance(web, true, vec![8080])]),
                entry("d", Some("10.0.0.4:10360"), true, vec![instance("other/microservice/web", true, vec![1])]),
            ],
            ..Registry::default()
        };
        let nodes = registry_nodes(&registry);
        assert_eq!(names(&nodes), ["a", "b", "c", "d"]);
        assert_eq!(
            (nodes[0].address.as_deref(), nodes[0].network.as_str(), nodes[0].role, nodes[0].live),
            (Some("10.0.0.1"), "home", Some(NodeRole::Member), true)
        );
        assert_eq!((nodes[2].address.as_deref(), nodes[2].live, nodes[2].role), (Some("fd00::3"), false, None));

        let endpoints = registry_endpoints(&registry, web);
        let seen: Vec<_> = endpoints.iter().map(|e| (e.node.as_str(), e.ports.clone(), e.ready)).collect();
        assert_eq!(seen, [("a", vec![8080, 8443], true), ("c", vec![8080], false)], "c's heartbeats stopped");
        assert_eq!(endpoints[1].address.as_deref(), Some("fd00::3"));
    }

    fn endpoint(node: &str, network: &str, location: Option<Location>, ports: Vec<i32>) -> Endpoint {
        Endpoint {
            node: node.into(),
            network: network.into(),
            address: None,
            ports,
            ready: true,
            location,
            distance_km: None,
        }
    }

    #[test]
    fn endpoints_merge_one_per_node_same_network_first_then_nearest() {
        let local =
            vec![endpoint("lan-far", "home", Some(BERLIN), vec![1]), endpoint("lan-near", "home", None, vec![1])];
        let remote = vec![
            endpoint("lan-far", "home", Some(BERLIN), vec![2]),
            endpoint("lan-cloud-only", "home", Some(LONDON), vec![2]),
            endpoint("wan-unknown", "office", None, vec![2]),
            endpoint("wan-near", "office", Some(VERSAILLES), vec![2]),
            endpoint("wan-far", "office", Some(LONDON), vec![2]),
            endpoint("wan-far", "office", Some(LONDON), vec![3]),
        ];
        let merged = merge_endpoints(local, remote, "home", Some(&PARIS));
        let seen: Vec<_> = merged.iter().map(|e| (e.node.as_str(), e.ports[0])).collect();
        assert_eq!(
            seen,
            [
                ("lan-cloud-only", 2),
                ("lan-far", 1),
                ("lan-near", 1),
                ("wan-near", 2),
                ("wan-far", 2),
                ("wan-unknown", 2),
            ],
            "the registry wins for its nodes; same network first, nearest first, unknown distance last"
        );
        assert!(merged[0].distance_km.is_some() && merged[2].distance_km.is_none());
        assert!(merge_endpoints(vec![], vec![], "home", None).is_empty());
    }
}
