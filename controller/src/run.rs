//! Wiring: client, CRD check, caches, the three controllers and the HTTP server.

use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use supermesh_api::names::CONTROLLER_MANAGER;
use supermesh_api::{EdgeNode, Mesh, Microservice};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::context::{error_policy, Context, Index, Placements, Synced};
use crate::metrics::Metrics;
use crate::{cloudhub, crds, edgenode, http, mesh, microservice, Error, Result};

/// Settings of a controller run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address of the metrics and health endpoints.
    pub metrics_addr: SocketAddr,
    /// Install (or upgrade) the CRDs instead of requiring them.
    pub install_crds: bool,
    /// Address agents connect to.
    pub cloudhub_addr: SocketAddr,
    /// DNS names and IP addresses agents dial, for the serving certificate.
    pub cloudhub_names: Vec<String>,
    /// Namespace holding the cloudhub CA and bootstrap token Secrets.
    pub namespace: String,
    /// Most agents connected at once.
    pub max_agents: usize,
    /// Time after a start during which nodes without a session keep their Connected condition.
    pub reconnect_grace: std::time::Duration,
    /// Time between keepalives on idle agent streams.
    pub keepalive: std::time::Duration,
}

/// Runs the controller until SIGINT or SIGTERM.
pub async fn run(settings: Settings) -> Result<()> {
    let config = kube::Config::infer().await.map_err(Error::Config)?;
    info!(cluster = %config.cluster_url, "connecting to the Kubernetes API");
    let client = Client::try_from(config)?;
    crds::ensure(&client, settings.install_crds).await?;
    let listener = http::bind(settings.metrics_addr).await?;
    let agents = cloudhub::bind(settings.cloudhub_addr).await?;
    let pki = cloudhub::pki::load(&client, &settings.namespace, &settings.cloudhub_names).await?;
    info!(addr = %settings.cloudhub_addr, namespace = %settings.namespace, "cloudhub listening for agents");

    let meshes: Api<Mesh> = Api::all(client.clone());
    let nodes: Api<EdgeNode> = Api::all(client.clone());
    let microservices: Api<Microservice> = Api::all(client.clone());
    let wc = watcher::Config::default();
    let (synced_tx, synced) = watch::channel(Synced::default());
    let synced_tx = Arc::new(synced_tx);
    let (mesh_store, mesh_stream) = reflect(meshes.clone(), &synced_tx, |s| s.meshes = true);
    let (node_store, node_stream) = reflect(nodes.clone(), &synced_tx, |s| s.nodes = true);
    let (msvc_store, msvc_stream) = reflect(microservices.clone(), &synced_tx, |s| s.microservices = true);
    let index =
        Index { meshes: mesh_store.clone(), nodes: node_store.clone(), microservices: msvc_store.clone(), synced };
    let mesh_ctrl = Controller::for_stream(mesh_stream, mesh_store);
    let node_ctrl = Controller::for_stream(node_stream, node_store);
    let msvc_ctrl = Controller::for_stream(msvc_stream, msvc_store);

    let (node_trigger, node_triggers) = futures::channel::mpsc::unbounded();
    let (msvc_trigger, msvc_triggers) = futures::channel::mpsc::unbounded();
    let metrics = Arc::new(Metrics::default());
    let reporter = Reporter { controller: CONTROLLER_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client, reporter),
        metrics: metrics.clone(),
        index: index.clone(),
        placements: Placements::default(),
        node_trigger: node_trigger.clone(),
        hub: Arc::new(
            cloudhub::Hub::new(settings.max_agents, settings.reconnect_grace, node_trigger)
                .with_keepalive(settings.keepalive),
        ),
        reports: Default::default(),
        token_secret: pki.token_secret.clone(),
        members: Default::default(),
        msvc_trigger,
        failures: Default::default(),
    });
    tokio::spawn(cloudhub::serve(agents, pki, ctx.clone()));

    let state = http::State { metrics, ctx: ctx.clone() };
    tokio::spawn(async move {
        if let Err(e) = http::serve(listener, state).await {
            warn!(error = %e, "metrics server stopped");
        }
    });
    let readiness = index.clone();
    tokio::spawn(async move {
        readiness.wait_ready().await;
        info!("caches synced, controller ready");
    });

    // A Mesh change affects the microservices that name it; an EdgeNode change may affect any.
    let (by_mesh, all_msvcs) = (index.microservices.clone(), index.microservices.clone());
    let msvc_ctrl = msvc_ctrl
        .watches_stream(node_changes(nodes.clone(), placement_hash), move |_: EdgeNode| all_refs(&all_msvcs))
        .watches(meshes.clone(), wc.clone(), move |mesh: Mesh| {
            let (ns, name) = (mesh.namespace(), mesh.name_any());
            by_mesh
                .state()
                .into_iter()
                .filter(|m| m.namespace() == ns && m.spec.mesh == name)
                .map(|m| ObjectRef::from_obj(&*m))
                .collect::<Vec<_>>()
        });
    // A node change may change any mesh's members; a microservice changes its mesh's count.
    let all_meshes = index.meshes.clone();
    let mesh_ctrl = mesh_ctrl
        .watches_stream(node_changes(nodes, membership_hash), move |_: EdgeNode| all_refs(&all_meshes))
        .watches(microservices, wc, |m: Microservice| {
            Some(ObjectRef::<Mesh>::new(&m.spec.mesh).within(&m.namespace().unwrap_or_default()))
        });
    // Reports arrive in bursts: coalesce the status writes they cause.
    let coalesce = kube::runtime::controller::Config::default().debounce(std::time::Duration::from_millis(150));
    let node_ctrl = node_ctrl.reconcile_on(node_triggers).with_config(coalesce.clone());
    let msvc_ctrl = msvc_ctrl.reconcile_on(msvc_triggers).with_config(coalesce);

    info!("starting the Mesh, EdgeNode and Microservice controllers");
    futures::join!(
        drain("Microservice", msvc_ctrl.shutdown_on_signal().run(microservice::reconcile, error_policy, ctx.clone())),
        drain("Mesh", mesh_ctrl.shutdown_on_signal().run(mesh::reconcile, error_policy, ctx.clone())),
        drain("EdgeNode", node_ctrl.shutdown_on_signal().run(edgenode::reconcile, error_policy, ctx)),
    );
    info!("controller stopped");
    Ok(())
}

/// A cache of `K` fed by its own watch, and the stream of changed objects that
/// drives `K`'s controller. `mark` records in `synced` that the cache is listed.
fn reflect<K>(
    api: Api<K>,
    synced: &Arc<watch::Sender<Synced>>,
    mark: fn(&mut Synced),
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let synced = synced.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                synced.send_modify(mark);
            }
        })
        .touched_objects();
    (reader, stream)
}

/// EdgeNode changes that matter to a consumer, as `hash` sees them: heartbeats and
/// instance counts change node status constantly and must not re-run every
/// Microservice and Mesh of the cluster.
fn node_changes(
    api: Api<EdgeNode>,
    hash: fn(&EdgeNode) -> Option<u64>,
) -> impl Stream<Item = Result<EdgeNode, watcher::Error>> + Send + 'static {
    watcher(api, watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .predicate_filter(hash, Default::default())
}

/// What placement depends on: spec, labels and whether the node is being deleted.
fn placement_hash(node: &EdgeNode) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&node.spec).unwrap_or_default().hash(&mut h);
    node.labels().hash(&mut h);
    node.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// What mesh status depends on: placement, plus readiness, role and supernode of the node.
fn membership_hash(node: &EdgeNode) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    placement_hash(node).hash(&mut h);
    let status = node.status.as_ref();
    status.map(|s| crate::conditions::is_true(&s.conditions, supermesh_api::names::condition::READY)).hash(&mut h);
    status.and_then(|s| s.role).map(|r| format!("{r:?}")).hash(&mut h);
    status.and_then(|s| s.supernode.as_deref()).hash(&mut h);
    Some(h.finish())
}

fn all_refs<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<ObjectRef<K>> {
    store.state().iter().map(|o| ObjectRef::from_obj(&**o)).collect()
}

/// Consumes a controller's result stream, logging what failed.
async fn drain<K, E>(kind: &'static str, results: impl Stream<Item = Result<(ObjectRef<K>, Action), E>>)
where
    K: Resource,
    K::DynamicType: Debug,
    E: std::error::Error,
{
    results
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => debug!(kind, object = %obj, "reconciled"),
                Err(e) => debug!(kind, error = %e, "reconcile or watch error"),
            }
        })
        .await;
}
