//! Views of EdgeNodes and agent sessions: what placement, memberships, discovery and
//! status read of a node, without the rest of the object. Shared by the index and the
//! pure functions it calls, so that neither depends on the other.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use supermesh_api::edgenode::{NodeAddress, NodeSecurity};
use supermesh_api::names::condition::READY;
use supermesh_api::names::identity;
use supermesh_api::EdgeNode;
use supermesh_protocol::{Capacity, Location, NodeRole};

/// What placement and memberships read of an EdgeNode: spec, labels and whether it is being deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// EdgeNode name.
    pub name: String,
    /// Account (owner) of the device.
    pub account: String,
    /// Network (LAN) of the device.
    pub network: String,
    /// Where the device is.
    pub location: Option<Location>,
    /// Labels of the EdgeNode.
    pub labels: BTreeMap<String, String>,
    /// Whether it may be elected supernode.
    pub supernode_eligible: bool,
    /// Whether it takes no new instances.
    pub unschedulable: bool,
    /// What it allows microservices beyond the default sandbox.
    pub security: NodeSecurity,
    /// Whether the EdgeNode is being deleted.
    pub deleting: bool,
    /// Who may be the node, and whether it is approved.
    pub identity: NodeIdentity,
}

impl NodeView {
    /// Whether the node takes part in meshes and its network: not being deleted, and approved.
    pub fn active(&self) -> bool {
        !self.deleting && self.identity.approved
    }
}

/// The cloud's record of a node's identity, from its EdgeNode's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Fingerprint of the enrolled key; `None` before enrollment or after a reset.
    pub key: Option<String>,
    /// Whether an admin revoked it.
    pub revoked: bool,
    /// Whether it is approved (nodes registered before enrollment existed are).
    pub approved: bool,
}

impl NodeIdentity {
    /// What the annotations of `node` say.
    pub fn of(node: &EdgeNode) -> NodeIdentity {
        let annotations = node.annotations();
        NodeIdentity {
            key: annotations.get(identity::KEY).filter(|k| !k.is_empty()).cloned(),
            revoked: annotations.contains_key(identity::REVOKED),
            approved: annotations.get(identity::APPROVED).is_none_or(|a| a != "false"),
        }
    }

    /// Whether a certificate carrying the key of fingerprint `key` still speaks for the node;
    /// if not, why.
    pub fn accepts(&self, key: &str) -> Result<(), &'static str> {
        match &self.key {
            _ if self.revoked => Err("the node was revoked"),
            None => Err("the node has no enrolled identity (it was reset or never enrolled)"),
            Some(k) if k != key => Err("the certificate carries another key than the one the node enrolled"),
            Some(_) => Ok(()),
        }
    }
}

impl From<&EdgeNode> for NodeView {
    fn from(node: &EdgeNode) -> NodeView {
        NodeView {
            name: node.name_any(),
            account: node.spec.account.clone(),
            network: node.spec.network.clone(),
            location: node.spec.location,
            labels: node.labels().clone(),
            supernode_eligible: node.spec.supernode_eligible,
            unschedulable: node.spec.unschedulable,
            security: node.spec.security.clone(),
            deleting: node.metadata.deletion_timestamp.is_some(),
            identity: NodeIdentity::of(node),
        }
    }
}

/// What mesh status and discovery read of an EdgeNode's status.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeStatusView {
    /// Whether its Ready condition is True.
    pub ready: bool,
    /// Its role in its cluster.
    pub role: Option<NodeRole>,
    /// The supernode it follows.
    pub supernode: Option<String>,
    /// `host:port` of its supernode service, as last written.
    pub peer_address: Option<String>,
    /// The address its agent last connected from.
    pub internal_ip: Option<String>,
    /// What the device has, as last written.
    pub capacity: Option<Capacity>,
}

impl From<&EdgeNode> for NodeStatusView {
    fn from(node: &EdgeNode) -> NodeStatusView {
        let Some(s) = node.status.as_ref() else { return NodeStatusView::default() };
        NodeStatusView {
            ready: crate::conditions::is_true(&s.conditions, READY),
            role: s.role,
            supernode: s.supernode.clone(),
            peer_address: s.address(NodeAddress::PEER).map(str::to_owned),
            internal_ip: s.address(NodeAddress::INTERNAL_IP).map(str::to_owned),
            capacity: capacity_of(&s.capacity),
        }
    }
}

/// A device's capacity as EdgeNode status records it: `cpu` in cores, `memory` in Ki.
pub fn capacity_quantities(capacity: Capacity) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("cpu".to_owned(), capacity.cpus.to_string()),
        ("memory".to_owned(), format!("{}Ki", capacity.memory_bytes >> 10)),
    ])
}

/// The capacity EdgeNode status records ([`capacity_quantities`]), if it reads well.
pub fn capacity_of(quantities: &BTreeMap<String, String>) -> Option<Capacity> {
    let cpus = quantities.get("cpu")?.parse().ok()?;
    let kib: u64 = quantities.get("memory")?.strip_suffix("Ki")?.parse().ok()?;
    Some(Capacity { cpus, memory_bytes: kib.saturating_mul(1024) })
}

/// What the cloud knows about a connected agent.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// When the session started.
    pub connected_at: Timestamp,
    /// When the agent was last heard from.
    pub last_seen: Timestamp,
    /// Version of supermesh-agent, from its hello.
    pub agent_version: String,
    /// Operating system of the node.
    pub os: String,
    /// CPU architecture of the node.
    pub arch: String,
    /// Address the agent connected from.
    pub address: String,
    /// `host:port` at which the node's cluster peers reach its supernode service, if it advertises one.
    pub peer_address: Option<String>,
    /// What the device has, if its agent says.
    pub capacity: Option<Capacity>,
}

/// What the cloud's own records say of a node that reports or is reported for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    /// Its EdgeNode's network, while it is active (approved, not being deleted).
    pub network: String,
    /// Whether its latest report made it its cluster's supernode.
    pub supernode: bool,
    /// The supernode its latest report names.
    pub follows: Option<String>,
    /// Whether its agent holds a session with the cloud.
    pub connected: bool,
}
