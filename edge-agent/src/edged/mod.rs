//! edged: what this node should run. In this release it keeps the desired set
//! the metamanager passes on (one entry per microservice) and logs each change;
//! the process runtime builds on this set.

pub mod artifact;
pub mod fake;
pub mod group;
pub mod health;
pub mod logs;
pub mod process;
pub mod runtime;

use std::collections::BTreeMap;

use supermesh_api::protocol::Assignment;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use runtime::{InstanceSpec, Runtime};

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

/// Variable naming the mesh of an instance's microservice.
pub const ENV_MESH: &str = "SUPERMESH_MESH";

/// The context environment of an instance: who and where it is.
pub fn context_env(node: &str, assignment: &Assignment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (runtime::ENV_NODE.to_owned(), node.to_owned()),
        (runtime::ENV_NAMESPACE.to_owned(), assignment.namespace.clone()),
        (runtime::ENV_MICROSERVICE.to_owned(), assignment.name.clone()),
        (ENV_MESH.to_owned(), assignment.spec.mesh.clone()),
    ])
}

/// Makes `runtime` run exactly the desired set until the set's channel closes:
/// every desired instance at its version, nothing else. The first pass also stops
/// instances adopted after an agent restart that are no longer desired.
pub async fn reconcile<R: Runtime>(runtime: &R, mut desired: watch::Receiver<BTreeMap<String, Desired>>, node: &str) {
    let mut ensured: BTreeMap<String, String> = BTreeMap::new();
    let mut first = true;
    loop {
        let want = desired.borrow_and_update().clone();
        for (key, d) in &want {
            if ensured.get(key) == Some(&d.version) {
                continue;
            }
            match serde_json::from_str::<Assignment>(&d.value) {
                Ok(a) => {
                    runtime.ensure(InstanceSpec::from_assignment(&a, context_env(node, &a))).await;
                    ensured.insert(key.clone(), d.version.clone());
                }
                Err(e) => warn!(%key, error = %e, "stored assignment is unreadable; not run"),
            }
        }
        let mut unwanted: Vec<String> = ensured.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
        if std::mem::take(&mut first) {
            unwanted.extend(runtime.running_keys().into_iter().filter(|k| !want.contains_key(k)));
        }
        for key in unwanted {
            info!(target: "edged", %key, "stopping an instance that is no longer placed here");
            runtime.stop(&key).await;
            ensured.remove(&key);
        }
        if desired.changed().await.is_err() {
            return;
        }
    }
}
