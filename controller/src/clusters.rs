//! Network clusters of a mesh's members: how many, how large, how many Ready, and
//! which supernode each follows. Pure functions over borrowed node views, which the
//! index runs under its lock: a fleet-wide mesh has as many members as the fleet.

use std::collections::BTreeMap;

use supermesh_api::mesh::{ClusterStatus, MeshStatus};
use supermesh_protocol::NodeRole;

use crate::view::NodeStatusView;

/// One member of a mesh, as its clusters are summed up.
#[derive(Debug, Clone, Copy)]
pub struct MemberStatus<'a> {
    /// EdgeNode name.
    pub name: &'a str,
    /// Its network.
    pub network: &'a str,
    /// Its EdgeNode's status.
    pub status: &'a NodeStatusView,
}

/// A mesh's members summed up by network cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Member nodes.
    pub nodes: i32,
    /// Network clusters (not bounded).
    pub count: i32,
    /// The largest clusters, at most [`MeshStatus::MAX_CLUSTERS`].
    pub list: Vec<ClusterStatus>,
}

/// The clusters of `members`: per network, its supernode, size and Ready nodes, largest first.
pub fn summarize<'a>(members: impl IntoIterator<Item = MemberStatus<'a>>) -> Summary {
    let mut by_network: BTreeMap<&str, Vec<MemberStatus<'a>>> = BTreeMap::new();
    let mut nodes = 0;
    for node in members {
        nodes += 1;
        by_network.entry(node.network).or_default().push(node);
    }
    let mut list: Vec<ClusterStatus> = by_network
        .into_iter()
        .map(|(network, nodes)| ClusterStatus {
            network: network.to_owned(),
            supernode: supernode(&nodes),
            members: nodes.len() as i32,
            ready: nodes.iter().filter(|n| n.status.ready).count() as i32,
        })
        .collect();
    let count = list.len() as i32;
    list.sort_by(|a, b| b.members.cmp(&a.members).then_with(|| a.network.cmp(&b.network)));
    list.truncate(MeshStatus::MAX_CLUSTERS);
    Summary { nodes, count, list }
}

/// The supernode of one cluster's `nodes`: the member its Ready members name most
/// (ties to the first name), else a Ready member that reports itself supernode.
fn supernode(nodes: &[MemberStatus<'_>]) -> Option<String> {
    let ready: Vec<&MemberStatus<'_>> = nodes.iter().filter(|n| n.status.ready).collect();
    let mut votes: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.name, 0)).collect();
    for named in ready.iter().filter_map(|n| n.status.supernode.as_deref()) {
        if let Some(count) = votes.get_mut(named) {
            *count += 1;
        }
    }
    // `max_by` keeps the last of equal elements: iterate names in reverse so the first name wins ties.
    let named = votes.into_iter().rev().filter(|(_, v)| *v > 0).max_by(|a, b| a.1.cmp(&b.1)).map(|(name, _)| name);
    named.map(str::to_owned).or_else(|| {
        let mut claiming: Vec<&str> =
            ready.iter().filter(|n| n.status.role == Some(NodeRole::Supernode)).map(|n| n.name).collect();
        claiming.sort();
        claiming.first().map(|n| (*n).to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::node_with_status as node;
    use kube::ResourceExt;
    use supermesh_api::EdgeNode;

    fn following(mut n: EdgeNode, supernode: &str) -> EdgeNode {
        n.status.as_mut().unwrap().supernode = Some(supernode.into());
        n
    }

    fn chosen(nodes: &[EdgeNode]) -> Option<String> {
        let views: Vec<(String, String, NodeStatusView)> =
            nodes.iter().map(|n| (n.name_any(), n.spec.network.clone(), n.into())).collect();
        let members: Vec<MemberStatus<'_>> =
            views.iter().map(|(name, network, status)| MemberStatus { name, network, status }).collect();
        supernode(&members)
    }

    #[test]
    fn the_supernode_is_the_one_most_ready_members_follow() {
        // b claims the role but the Ready majority follows a (a split view during failover).
        let nodes = [
            following(node("a", "lan", true, true), "a"),
            following(node("b", "lan", true, true), "b"),
            following(node("c", "lan", true, false), "a"),
            following(node("d", "lan", false, false), "b"),
            following(node("e", "lan", false, false), "b"),
        ];
        assert_eq!(chosen(&nodes).as_deref(), Some("a"), "votes of members that are not Ready do not count");
    }

    #[test]
    fn ties_go_to_the_first_name_and_only_members_can_be_chosen() {
        let nodes = [
            following(node("b", "lan", true, true), "b"),
            following(node("a", "lan", true, true), "a"),
            following(node("c", "lan", true, false), "gone"),
        ];
        assert_eq!(chosen(&nodes).as_deref(), Some("a"));
        let only_outsider = [following(node("c", "lan", true, false), "gone")];
        assert_eq!(chosen(&only_outsider), None);
    }

    #[test]
    fn without_votes_a_ready_node_claiming_the_role_is_the_supernode() {
        let nodes = [node("z", "lan", true, true), node("y", "lan", false, true), node("x", "lan", true, false)];
        assert_eq!(chosen(&nodes).as_deref(), Some("z"), "y is not Ready");
        let nobody = [node("y", "lan", false, true), node("x", "lan", true, false)];
        assert_eq!(chosen(&nobody), None);
    }
}
