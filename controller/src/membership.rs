//! Network memberships: who belongs to each network cluster, as the cloud sends it
//! to the cluster's nodes. Pure functions; the index keeps them up to date.
//!
//! A membership is the cloud's own record, and what members trust each other by: each
//! member's enrolled key (a revoked node is listed without one, so it is no peer), its
//! eligibility and capacity for the election, and the key the cloud signs receipts with.

use supermesh_protocol::peer::cluster_key;
use supermesh_protocol::signing::CloudKey;
use supermesh_protocol::{Member, Membership};

use crate::view::NodeView;

/// What `node` contributes to its network's membership, reachable by its peers at `address`,
/// of capacity class `capacity` as its agent last told the cloud (0 when unknown).
pub fn member(node: &NodeView, address: Option<&str>, capacity: u32) -> Member {
    Member {
        name: node.name.clone(),
        account: node.account.clone(),
        address: address.map(str::to_owned),
        location: node.location,
        supernode_eligible: node.supernode_eligible,
        key: node.identity.key.clone().filter(|_| !node.identity.revoked),
        capacity,
    }
}

/// The membership of `network`: `members` by name, the cluster key of its `generation`
/// and the cloud's receipt key, both derived from the cloud's random `root`.
pub fn build(network: &str, root: &str, generation: u64, mut members: Vec<Member>) -> Membership {
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Membership {
        network: network.to_owned(),
        key: cluster_key(root, network, generation),
        members,
        cloud_key: Some(CloudKey::derive(root).public()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use supermesh_api::EdgeNode;

    fn node(name: &str, network: &str) -> NodeView {
        let spec = json!({"account": "acme", "network": network, "location": {"latitude": 1.0, "longitude": 2.0}});
        NodeView::from(&EdgeNode::new(name, serde_json::from_value(spec).unwrap()))
    }

    #[test]
    fn a_membership_lists_the_network_s_nodes_by_name_with_their_peer_address() {
        let m = build(
            "lan",
            "secret",
            0,
            vec![member(&node("c", "lan"), None, 0), member(&node("a", "lan"), Some("10.0.0.1:10360"), 4008)],
        );
        assert_eq!(m.network, "lan");
        assert_eq!(m.key, cluster_key("secret", "lan", 0));
        assert_ne!(m.key, build("other", "secret", 0, vec![]).key, "each network has its own key");
        assert_ne!(m.key, build("lan", "secret", 1, vec![]).key, "and a new one when it is rotated");
        let names: Vec<&str> = m.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(m.members[0].address.as_deref(), Some("10.0.0.1:10360"));
        assert_eq!(m.members[1].address, None);
        assert_eq!((m.members[0].account.as_str(), m.members[0].supernode_eligible), ("acme", true));
        assert_eq!(m.members[0].location.map(|l| l.longitude), Some(2.0));
        assert_eq!((m.members[0].capacity, m.members[1].capacity), (4008, 0));
        assert_eq!(m.cloud_key, Some(CloudKey::derive("secret").public()));
    }

    #[test]
    fn a_member_carries_its_enrolled_key_unless_it_was_revoked() {
        let mut enrolled = node("a", "lan");
        enrolled.identity.key = Some("f1".into());
        assert_eq!(member(&enrolled, None, 0).key.as_deref(), Some("f1"));
        enrolled.identity.revoked = true;
        assert_eq!(member(&enrolled, None, 0).key, None, "a revoked node is no peer");
        assert_eq!(member(&node("b", "lan"), None, 0).key, None, "nor one that never enrolled");
    }

    #[test]
    fn the_version_changes_with_members_and_addresses_only() {
        let members = |addr: Option<&str>| vec![member(&node("a", "lan"), None, 0), member(&node("b", "lan"), addr, 0)];
        let first = build("lan", "secret", 0, members(None)).version();
        let mut reversed = members(None);
        reversed.reverse();
        assert_eq!(build("lan", "secret", 0, reversed).version(), first, "order does not matter");
        let addressed = build("lan", "secret", 0, members(Some("10.0.0.2:10360"))).version();
        assert_ne!(addressed, first, "a new peer address");
        let mut joined = members(Some("10.0.0.2:10360"));
        joined.push(member(&node("c", "lan"), None, 0));
        assert_ne!(build("lan", "secret", 0, joined).version(), addressed, "a new member");
    }
}
