//! Wiring of a running agent: store, metamanager, edged and edgehub.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::config::EdgeConfig;
use crate::edged::process::ProcessRuntime;
use crate::edged::runtime::Runtime;
use crate::edged::Desired;
use crate::edgehub::Signals;
use crate::metamanager::store::{self, Store};
use crate::metamanager::{self, MetaError};
use crate::{edged, edgehub, metasync};
use supermesh_api::protocol::MICROSERVICE;

/// File name of the agent's database inside its data dir.
pub const DATABASE: &str = "meta.db";

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: EdgeConfig) -> Result<(), MetaError> {
    let config = Arc::new(config);
    let store = Store::open(config.data_dir.join(DATABASE))?;
    info!(node = %config.node.name, data = %config.data_dir.display(), cloud = %config.cloud.address, "supermesh-agent starting");
    let (to_cloud, outbound) = mpsc::channel(1024);
    let (to_edged, edged_events) = mpsc::channel(1024);
    let meta = metamanager::spawn(store, to_cloud, to_edged);
    // Offline autonomy: edged starts from what SQLite holds, whether the cloud answers or not.
    let held: BTreeMap<String, Desired> = meta
        .list(MICROSERVICE)
        .await?
        .into_iter()
        .map(|row| (row.key, Desired { version: row.version, value: row.value }))
        .collect();
    info!(instances = held.len(), "starting the instances recorded in the store");
    let (desired, wanted) = watch::channel(held);
    tokio::spawn(edged::run(edged_events, desired));
    let runtime = Arc::new(ProcessRuntime::new(config.data_dir.clone(), config.node.name.clone()));
    let signals = Signals::default();
    tokio::spawn(metasync::run(runtime.statuses(), meta.clone(), config.podstatus_interval(), signals.clone()));
    let (edged_runtime, node) = (runtime.clone(), config.node.name.clone());
    tokio::spawn(async move { edged::reconcile(&*edged_runtime, wanted, &node).await });
    tokio::spawn(edgehub::run(config, meta, outbound, signals));
    shutdown_signal().await;
    // Dropping the runtime leaves instances running: the next agent adopts them.
    info!("supermesh-agent stopping; instances are left running");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// What `supermesh-agent inspect` prints: the stored resources and the outbox.
pub fn inspect(data_dir: &Path) -> Result<String, String> {
    let path = data_dir.join(DATABASE);
    if !path.exists() {
        return Err(format!("{} does not exist: is --data-dir the agent's dataDir?", path.display()));
    }
    store::integrity_check(&path).map_err(|e| format!("{}: integrity check failed: {e}", path.display()))?;
    let store = Store::open(&path).map_err(|e| e.to_string())?;
    let versions = store.held_versions().map_err(|e| e.to_string())?;
    let mut out = format!("{:<50} {:<14} {:<44} {:>6}\n", "RESOURCE", "TYPE", "VERSION", "BYTES");
    for key in versions.keys() {
        if let Some(row) = store.get(key).map_err(|e| e.to_string())? {
            out += &format!("{:<50} {:<14} {:<44} {:>6}\n", row.key, row.res_type, row.version, row.value.len());
        }
    }
    let pending = store.pending(usize::MAX >> 1).map_err(|e| e.to_string())?;
    out += &format!("\n{} resources; {} reports waiting in the outbox; integrity ok\n", versions.len(), pending.len());
    Ok(out)
}
