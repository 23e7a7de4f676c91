//! What a node should hold, as the index publishes it to the node's session.

use std::collections::BTreeMap;
use std::sync::Arc;

use supermesh_protocol::Prepared;

use crate::view::NodeIdentity;

/// Everything a node should hold: its assignments and its network's membership,
/// each encoded once and shared by every node that holds it.
#[derive(Debug, Default)]
pub struct NodeDesired {
    /// False until the index holds a complete listing of every kind and has placed
    /// every microservice: until then nothing may be sent (nor deleted).
    pub complete: bool,
    /// By resource string (shared with the change itself: publishing copies no strings).
    pub resources: BTreeMap<Arc<str>, Arc<Prepared>>,
    /// What the node's EdgeNode says of who may be the node: a session whose certificate
    /// it no longer accepts (revoked, reset, deleted) ends.
    pub standing: Standing,
}

/// A node's identity as the index knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Standing {
    /// Its EdgeNode was not seen yet (it was just enrolled): nothing to check yet.
    #[default]
    Unseen,
    /// Its EdgeNode's record.
    Present(NodeIdentity),
    /// Its EdgeNode was deleted.
    Deleted,
}

impl Standing {
    /// Whether a certificate carrying the key of fingerprint `key` still speaks for the node; if not, why.
    pub fn accepts(&self, key: &str) -> Result<(), &'static str> {
        match self {
            Standing::Unseen => Ok(()),
            Standing::Present(identity) => identity.accepts(key),
            Standing::Deleted => Err("the node's EdgeNode was deleted"),
        }
    }
}
