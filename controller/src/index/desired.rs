//! What a node should hold, as the index publishes it to the node's session.

use std::collections::BTreeMap;
use std::sync::Arc;

use supermesh_protocol::Prepared;

/// Everything a node should hold: its assignments and its network's membership,
/// each encoded once and shared by every node that holds it.
#[derive(Debug, Default)]
pub struct NodeDesired {
    /// False until the index holds a complete listing of every kind and has placed
    /// every microservice: until then nothing may be sent (nor deleted).
    pub complete: bool,
    /// By resource string (shared with the change itself: publishing copies no strings).
    pub resources: BTreeMap<Arc<str>, Arc<Prepared>>,
}
