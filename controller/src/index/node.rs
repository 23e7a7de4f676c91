//! What the index keeps of each node: views of its EdgeNode, its agent's
//! session, its latest report and the changes published to it.

use std::collections::BTreeSet;
use std::sync::Arc;

use supermesh_protocol::StatusReport;
use tokio::sync::watch;

use super::desired::NodeDesired;
use super::seqs::SeqWindow;
use super::Key;
use crate::view::{NodeStatusView, NodeView, SessionInfo};

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
    /// Whether its EdgeNode was ever seen (so that its absence means it was deleted).
    pub seen: bool,
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
            seen: false,
            status: NodeStatusView::default(),
            session: None,
            report: None,
            events: SeqWindow::default(),
            assigned: BTreeSet::new(),
            desired: watch::Sender::new(Arc::new(NodeDesired::default())),
        }
    }

    /// The network the node's EdgeNode names, while it is active (not being deleted, approved).
    pub fn network(&self) -> Option<&str> {
        self.view.as_ref().filter(|v| v.active()).map(|v| v.network.as_str())
    }

    /// Where its peers reach it: its agent's own word while connected, else its status.
    pub fn peer_address(&self) -> Option<&str> {
        match &self.session {
            Some(live) => live.info.peer_address.as_deref().or(self.status.peer_address.as_deref()),
            None => self.status.peer_address.as_deref(),
        }
    }

    /// Its capacity class for its cluster's election: its agent's own word while connected,
    /// else its status; 0 while unknown.
    pub fn capacity(&self) -> u32 {
        let live = self.session.as_ref().and_then(|l| l.info.capacity);
        live.or(self.status.capacity).map_or(0, |c| c.class())
    }

    /// Whether nothing refers to the entry any more: no EdgeNode, no session.
    pub fn is_unused(&self) -> bool {
        self.view.is_none() && self.session.is_none()
    }
}
