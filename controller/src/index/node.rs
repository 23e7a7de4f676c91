//! What the index keeps of each node: views of its EdgeNode, its agent's
//! session, its latest report and the changes published to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use supermesh_api::edgenode::NodeAddress;
use supermesh_api::names::condition::READY;
use supermesh_api::EdgeNode;
use supermesh_protocol::{Location, NodeRole, StatusReport};
use tokio::sync::watch;

use super::desired::NodeDesired;
use super::seqs::SeqWindow;
use super::Key;

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
    /// Whether the EdgeNode is being deleted.
    pub deleting: bool,
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
            deleting: node.metadata.deletion_timestamp.is_some(),
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
        }
    }
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
}

/// A connected session of a node's agent.
#[derive(Debug, Clone)]
pub(super) struct Live {
    pub id: u64,
    pub info: SessionInfo,
}

/// Everything the index keeps of one node.
pub(super) struct NodeEntry {
    /// Its EdgeNode, once it exists.
    pub view: Option<NodeView>,
    /// Its EdgeNode's status.
    pub status: NodeStatusView,
    /// Its agent's session, while connected.
    pub session: Option<Live>,
    /// Its latest status report (only what is placed on it or its session holds).
    pub report: Option<StatusReport>,
    /// Outbox seqs of the events taken from it recently.
    pub events: SeqWindow,
    /// Microservices placed on it.
    pub assigned: BTreeSet<Key>,
    /// What it should hold, published to its session.
    pub desired: watch::Sender<Arc<NodeDesired>>,
}

impl NodeEntry {
    pub fn new() -> NodeEntry {
        NodeEntry {
            view: None,
            status: NodeStatusView::default(),
            session: None,
            report: None,
            events: SeqWindow::default(),
            assigned: BTreeSet::new(),
            desired: watch::Sender::new(Arc::new(NodeDesired::default())),
        }
    }

    /// The network the node's EdgeNode names, while it is not being deleted.
    pub fn network(&self) -> Option<&str> {
        self.view.as_ref().filter(|v| !v.deleting).map(|v| v.network.as_str())
    }

    /// Where its peers reach it: its agent's own word while connected, else its status.
    pub fn peer_address(&self) -> Option<&str> {
        match &self.session {
            Some(live) => live.info.peer_address.as_deref().or(self.status.peer_address.as_deref()),
            None => self.status.peer_address.as_deref(),
        }
    }

    /// Whether nothing refers to the entry any more: no EdgeNode, no session.
    pub fn is_unused(&self) -> bool {
        self.view.is_none() && self.session.is_none()
    }
}
