//! Wiring of a running agent: store, metamanager, edged and edgehub.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use crate::config::{EdgeConfig, IsolationMode};
use crate::edged::process::{ProcessConfig, ProcessRuntime};
use crate::edged::runtime::Runtime;
use crate::edged::sandbox::{self, InstanceUserTable, SandboxError};
use crate::edged::snapshot::Snapshots;
use crate::edged::Desired;
use crate::edgehub::Signals;
use crate::identity::{Identity, IdentityError, Standing};
use crate::localapi::{self, LocalApi};
use crate::metamanager::seal::{SealError, SealingKey};
use crate::metamanager::store::{self, Store};
use crate::metamanager::{self, EdgedEvent, MetaError};
use crate::supernode::{self, Cluster};
use crate::{edged, edgehub, metasync};
use supermesh_protocol::{Membership, MEMBERSHIP, MICROSERVICE};

/// File name of the agent's database inside its data dir.
pub const DATABASE: &str = "meta.db";
/// Directory of the node's key and certificate inside its data dir.
pub const IDENTITY_DIR: &str = "identity";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store or metamanager failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A listener could not be opened.
    #[error("cannot listen on {addr} for {what}: {source}; set {key} in edge.yaml to a free address")]
    Listen {
        /// What the listener serves.
        what: &'static str,
        /// The address from the config.
        addr: std::net::SocketAddr,
        /// The config key to change.
        key: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The local API's secret could not be read or created.
    #[error("cannot read or create the local API key in {0}: {1}")]
    Secret(String, std::io::Error),
    /// The node's key or certificate could not be read, or there is nothing to enroll with.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Isolation is required but the agent may not switch users.
    #[error(
        "edged.isolation is Required, but the agent may not run instances as other users: run it as root, \
         or give it CAP_SETUID, CAP_SETGID and CAP_CHOWN (see packaging/supermesh-agent.service)"
    )]
    CannotIsolate,
    /// The table of instance users could not be opened.
    #[error(transparent)]
    InstanceUsers(#[from] SandboxError),
    /// The key sealing stored configuration could not be read or made.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: EdgeConfig) -> Result<(), StartError> {
    // Whatever the agent writes is its own; instances get their files explicitly (edged::sandbox).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let config = Arc::new(config);
    let mut store = Store::open(config.data_dir.join(DATABASE)).map_err(MetaError::from)?;
    store.set_outbox_cap(config.outbox_cap());
    let isolation = instance_users(&config)?;
    info!(node = %config.node.name, data = %config.data_dir.display(), cloud = %config.cloud.address, "supermesh-agent starting");
    let (peer_tcp, peer_udp) = supernode::bind(&config).await.map_err(|source| StartError::Listen {
        what: "peers (supernode service, TCP and UDP)",
        addr: config.supernode.listen,
        key: "supernode.listen",
        source,
    })?;
    let api_listener = tokio::net::TcpListener::bind(config.local_api.listen).await.map_err(|source| {
        StartError::Listen { what: "the local API", addr: config.local_api.listen, key: "localApi.listen", source }
    })?;
    let secret = localapi::load_or_create_secret(&config.data_dir)
        .map_err(|e| StartError::Secret(config.data_dir.display().to_string(), e))?;
    let token = config.cloud.token.as_ref().map(|t| &t.0);
    let identity = Arc::new(Identity::load(Some(&config.data_dir.join(IDENTITY_DIR)), token)?);
    // Configuration snapshots (secrets included) are stored sealed with a key that never leaves the device.
    store.set_sealing_key(SealingKey::load_or_create(&config.data_dir.join(IDENTITY_DIR))?);
    if token.is_some() && identity.standing() != Standing::Missing {
        info!("the node holds its certificate: cloud.token in edge.yaml is not needed any more and may be removed");
    }

    let (to_cloud, outbound) = mpsc::channel(1024);
    let (to_router, from_meta) = mpsc::channel(1024);
    let meta = metamanager::spawn(store, to_cloud.clone(), to_router);
    let cluster = Cluster::new(config.clone(), meta.clone(), identity.clone(), to_cloud);
    for row in meta.list(MEMBERSHIP).await? {
        match serde_json::from_str::<Membership>(&row.value) {
            Ok(m) => cluster.set_membership(m),
            Err(e) => warn!(key = %row.key, error = %e, "stored membership is unreadable"),
        }
    }
    // Offline autonomy: edged starts from what SQLite holds, whether the cloud answers or not.
    let held: BTreeMap<String, Desired> = meta
        .list(MICROSERVICE)
        .await?
        .into_iter()
        .map(|row| (row.key, Desired { version: row.version, value: row.value }))
        .collect();
    info!(instances = held.len(), "starting the instances recorded in the store");
    let (desired, wanted) = watch::channel(held);
    let (to_edged, edged_events) = mpsc::channel(1024);
    tokio::spawn(route_changes(from_meta, to_edged, cluster.clone()));
    tokio::spawn(edged::run(edged_events, desired));

    // Reports are queued by MetaSync and the local API; edgehub and the cluster's relay both send them.
    let queued = Arc::new(Notify::new());
    let producers = Signals { outbox: queued.clone(), connected: Arc::new(Notify::new()) };
    let hub_signals = Signals { outbox: Arc::new(Notify::new()), connected: producers.connected.clone() };
    tokio::spawn(fan_out(queued, hub_signals.outbox.clone(), cluster.clone()));

    let process_config =
        ProcessConfig { isolation, snapshots: Some(Snapshots::new(meta.clone())), ..ProcessConfig::default() };
    let runtime =
        Arc::new(ProcessRuntime::with_config(config.data_dir.clone(), config.node.name.clone(), process_config));
    tokio::spawn(metasync::run(
        runtime.statuses(),
        meta.clone(),
        config.podstatus_interval(),
        producers.clone(),
        cluster.clone(),
    ));
    let api = LocalApi::new(
        config.clone(),
        meta.clone(),
        producers.outbox.clone(),
        wanted.clone(),
        cluster.clone(),
        secret.clone(),
    );
    tokio::spawn(localapi::serve(api_listener, Arc::new(api)));
    let context = edged::Context::new(&config, secret);
    let (edged_runtime, edged_meta) = (runtime.clone(), meta.clone());
    tokio::spawn(async move { edged::reconcile(&*edged_runtime, wanted, &context, &edged_meta).await });
    supernode::spawn(cluster.clone(), peer_tcp, peer_udp);
    let device = edgehub::AgentDevice { meta, cluster, data_dir: config.data_dir.clone() };
    tokio::spawn(edgehub::run(config, identity, Arc::new(device), outbound, hub_signals));
    shutdown_signal().await;
    // Dropping the runtime leaves instances running: the next agent adopts them.
    info!("supermesh-agent stopping; instances are left running");
    Ok(())
}

/// The users instances run as, when they run isolated (`edged.isolation`).
fn instance_users(config: &EdgeConfig) -> Result<Option<Arc<InstanceUserTable>>, StartError> {
    let able = sandbox::can_switch_users();
    match config.edged.isolation {
        IsolationMode::Off => {
            warn!("edged.isolation is Off: instances run as the agent's user and can read its files");
            return Ok(None);
        }
        IsolationMode::Required if !able => return Err(StartError::CannotIsolate),
        IsolationMode::Auto if !able => {
            warn!(
                "the agent may not switch users (it needs root, or CAP_SETUID, CAP_SETGID and CAP_CHOWN): \
                 instances run as the agent's user, NOT isolated; set edged.isolation: Required to refuse this"
            );
            return Ok(None);
        }
        _ => {}
    }
    let users = config.edged.instance_users;
    info!(first = users.first, count = users.count, "instances run isolated, each as a user of its own");
    Ok(Some(Arc::new(InstanceUserTable::open(&config.data_dir.join(DATABASE), users)?)))
}

/// Passes the metamanager's changes on: memberships to the cluster, the rest to edged.
async fn route_changes(
    mut from_meta: mpsc::Receiver<EdgedEvent>,
    to_edged: mpsc::Sender<EdgedEvent>,
    cluster: Arc<Cluster>,
) {
    while let Some(event) = from_meta.recv().await {
        if let EdgedEvent::Upserted { res_type, value, key, .. } = &event {
            if res_type == MEMBERSHIP {
                match serde_json::from_str::<Membership>(value) {
                    Ok(m) => cluster.set_membership(m),
                    Err(e) => warn!(%key, error = %e, "membership from the cloud is unreadable"),
                }
                continue;
            }
        }
        if to_edged.send(event).await.is_err() {
            return;
        }
    }
}

/// Wakes every sender of reports when one was queued.
async fn fan_out(queued: Arc<Notify>, edgehub: Arc<Notify>, cluster: Arc<Cluster>) {
    loop {
        queued.notified().await;
        edgehub.notify_one();
        cluster.outbox_changed();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// What `supermesh-agent inspect` prints: the stored resources, the outbox and the versions refused on the device.
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
    let usage = store.outbox_usage().map_err(|e| e.to_string())?;
    let dropped = store.dropped_events().map_err(|e| e.to_string())?;
    out += &format!(
        "\n{} resources; {} reports waiting in the outbox ({} bytes; {dropped} events dropped while it was full); \
         integrity ok\n",
        versions.len(),
        usage.reports,
        usage.bytes
    );
    let configs = store.config_keys().map_err(|e| e.to_string())?;
    if !configs.is_empty() {
        let noun = if configs.len() == 1 { "snapshot" } else { "snapshots" };
        out += &format!("\n{} configuration {noun} stored sealed: {}\n", configs.len(), configs.join(", "));
    }
    let refusals = store.refusals().map_err(|e| e.to_string())?;
    if !refusals.is_empty() {
        out += &format!("\n{:<50} {:<44} {:<44}\n", "REFUSED (rolled back on the device)", "VERSION", "BACK TO");
        for (key, refusal) in refusals {
            out += &format!("{key:<50} {:<44} {:<44}\n  {}\n", refusal.version, refusal.back_to, refusal.message);
        }
    }
    Ok(out)
}
