//! edged: what this node should run. In this release it keeps the desired set
//! the metamanager passes on (one entry per microservice) and logs each change;
//! the process runtime builds on this set.

use std::collections::BTreeMap;

use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::metamanager::EdgedEvent;

/// One microservice this node should run: its resource key, version and assignment (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Version of the assignment.
    pub version: String,
    /// The assignment as stored by the metamanager.
    pub value: String,
}

/// Applies metamanager events to the desired set until the channel closes, and
/// publishes the set after each change.
pub async fn run(mut events: mpsc::Receiver<EdgedEvent>, desired: watch::Sender<BTreeMap<String, Desired>>) {
    while let Some(event) = events.recv().await {
        desired.send_modify(|set| match event {
            EdgedEvent::Upserted { key, version, value, .. } => {
                info!(target: "edged", %key, %version, "desired microservice stored");
                set.insert(key, Desired { version, value });
            }
            EdgedEvent::Deleted { key } => {
                info!(target: "edged", %key, "desired microservice removed");
                set.remove(&key);
            }
        });
    }
}
