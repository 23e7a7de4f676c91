//! Network memberships: who belongs to each network cluster, as the cloud sends it
//! to the cluster's nodes, and which networks' nodes must hear of a change.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use kube::ResourceExt;
use supermesh_api::edgenode::NodeAddress;
use supermesh_api::protocol::{Member, Membership};
use supermesh_api::EdgeNode;

/// What `node` contributes to its network's membership.
pub fn member(node: &EdgeNode) -> Member {
    Member {
        name: node.name_any(),
        account: node.spec.account.clone(),
        address: node.status.as_ref().and_then(|s| s.address(NodeAddress::PEER)).map(str::to_owned),
        location: node.spec.location,
        supernode_eligible: node.spec.supernode_eligible,
    }
}

/// Whether `node` is a member of a network cluster: every EdgeNode not being deleted.
fn is_member(node: &EdgeNode) -> bool {
    node.metadata.deletion_timestamp.is_none()
}

/// The membership of `network`: its EdgeNodes by name and the cluster key derived from `secret`.
pub fn build<'a>(network: &str, secret: &str, nodes: impl IntoIterator<Item = &'a EdgeNode>) -> Membership {
    let mut members: Vec<Member> =
        nodes.into_iter().filter(|n| n.spec.network == network && is_member(n)).map(member).collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Membership { network: network.to_owned(), key: supermesh_api::peer::cluster_key(secret, network), members }
}

/// What a node contributes to the membership of its network, as last seen by the EdgeNode
/// reconciler; tells which networks' memberships changed, so that only their sessions are poked.
#[derive(Default)]
pub struct Tracker {
    by_node: Mutex<HashMap<String, (String, Member)>>,
}

impl Tracker {
    /// Records what `node` contributes now (`None` once it is gone) and returns the networks
    /// whose membership this changes: none, its network, or its old and new networks.
    pub fn update(&self, node: &EdgeNode) -> BTreeSet<String> {
        let now = is_member(node).then(|| (node.spec.network.clone(), member(node)));
        self.record(&node.name_any(), now)
    }

    /// Forgets `node` (deleted) and returns the network whose membership this changes.
    pub fn remove(&self, node: &str) -> BTreeSet<String> {
        self.record(node, None)
    }

    fn record(&self, node: &str, now: Option<(String, Member)>) -> BTreeSet<String> {
        let mut by_node = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        let before = match &now {
            Some(contribution) => by_node.insert(node.to_owned(), contribution.clone()),
            None => by_node.remove(node),
        };
        if before == now {
            return BTreeSet::new();
        }
        before.into_iter().chain(now).map(|(network, _)| network).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use supermesh_api::EdgeNodeStatus;

    fn node(name: &str, network: &str, peer: Option<&str>) -> EdgeNode {
        let spec = json!({"account": "acme", "network": network, "location": {"latitude": 1.0, "longitude": 2.0}});
        let mut n = EdgeNode::new(name, serde_json::from_value(spec).unwrap());
        let mut status = EdgeNodeStatus::default();
        status
            .addresses
            .push(NodeAddress { address_type: NodeAddress::INTERNAL_IP.into(), address: "10.0.0.9".into() });
        if let Some(peer) = peer {
            status.addresses.push(NodeAddress { address_type: NodeAddress::PEER.into(), address: peer.into() });
        }
        n.status = Some(status);
        n
    }

    #[test]
    fn a_membership_lists_the_network_s_nodes_by_name_with_their_peer_address() {
        let nodes = [node("c", "lan", None), node("a", "lan", Some("10.0.0.1:10360")), node("b", "other", None)];
        let m = build("lan", "secret", &nodes);
        assert_eq!(m.network, "lan");
        assert_eq!(m.key, supermesh_api::peer::cluster_key("secret", "lan"));
        assert_ne!(m.key, build("other", "secret", &nodes).key, "each network has its own key");
        let names: Vec<&str> = m.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(m.members[0].address.as_deref(), Some("10.0.0.1:10360"));
        assert_eq!(m.members[1].address, None, "an InternalIP is not a peer address");
        assert_eq!((m.members[0].account.as_str(), m.members[0].supernode_eligible), ("acme", true));
        assert_eq!(m.members[0].location.map(|l| l.longitude), Some(2.0));
    }

    #[test]
    fn the_version_changes_with_members_and_addresses_only() {
        let mut nodes = vec![node("a", "lan", None), node("b", "lan", None)];
        let first = build("lan", "secret", &nodes).version();
        assert_eq!(build("lan", "secret", nodes.iter().rev()).version(), first, "order of the index does not matter");
        nodes.push(node("x", "elsewhere", None));
        assert_eq!(build("lan", "secret", &nodes).version(), first, "another network's node does not matter");

        nodes[1] = node("b", "lan", Some("10.0.0.2:10360"));
        let addressed = build("lan", "secret", &nodes).version();
        assert_ne!(addressed, first, "a new peer address");
        nodes.push(node("c", "lan", None));
        let joined = build("lan", "secret", &nodes).version();
        assert_ne!(joined, addressed, "a new member");
        nodes[0].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let left = build("lan", "secret", &nodes);
        assert_ne!(left.version(), joined, "a node being deleted leaves");
        assert_eq!(left.members.len(), 2);
    }

    #[test]
    fn the_tracker_names_the_networks_whose_membership_changed() {
        let tracker = Tracker::default();
        assert_eq!(tracker.update(&node("a", "lan", None)), BTreeSet::from(["lan".to_string()]), "a new node");
        assert!(tracker.update(&node("a", "lan", None)).is_empty(), "nothing changed");
        let addressed = node("a", "lan", Some("10.0.0.1:10360"));
        assert_eq!(tracker.update(&addressed), BTreeSet::from(["lan".to_string()]));
        let mut moved = addressed.clone();
        moved.spec.network = "wan".into();
        assert_eq!(tracker.update(&moved), BTreeSet::from(["lan".to_string(), "wan".to_string()]));
        let mut status_only = moved.clone();
        status_only.status.as_mut().unwrap().agent_version = Some("0.2.0".into());
        assert!(tracker.update(&status_only).is_empty(), "other status fields do not matter");
        assert_eq!(tracker.remove("a"), BTreeSet::from(["wan".to_string()]));
        assert!(tracker.remove("a").is_empty());
    }
}
