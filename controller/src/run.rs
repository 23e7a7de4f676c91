//! Wiring: client, CRD check, one shared watch per kind feeding the fleet index,
//! the cache and its controller, the cloudhub and the HTTP server.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use kube_lease_manager::LeaseManagerBuilder;
use serde::de::DeserializeOwned;
use supermesh_api::names::CONTROLLER_MANAGER;
use supermesh_protocol::names::host_of;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::cloudhub::pki::Lifetimes;
use crate::coalesce::coalesce;
use crate::context::{error_policy, Context, Role};
use crate::forward::{self, Forwarder};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::replicas::{Replica, Replicas, Ring};
use crate::{cloudhub, crds, edgenode, http, mesh, microservice, rollout, Error, Result};

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
    /// Namespace holding the cloudhub CA and the bootstrap token Secrets.
    pub namespace: String,
    /// Most agents connected at once.
    pub max_agents: usize,
    /// Connections from one address that may be in their handshake at once.
    pub max_pending_per_address: usize,
    /// Time after a start during which nodes without a session keep their Connected condition.
    pub reconnect_grace: Duration,
    /// Time between keepalives on idle agent streams.
    pub keepalive: Duration,
    /// How long node certificates live, and may renew after expiry.
    pub lifetimes: Lifetimes,
    /// This replica: its id and where agents reach its cloudhub.
    pub replica: Replica,
}

/// Events a shared watch may hold for its slowest consumer before the watch waits.
const SHARED_BUFFER: usize = 1024;
/// A microservice's or mesh's status is written at most this often for changes agents report.
const STATUS_COALESCE: Duration = Duration::from_secs(1);
/// An EdgeNode's status follows its agent's connection, its placement and its role this fast...
const CONNECTION_COALESCE: Duration = Duration::from_millis(200);
/// ...and the instance counts its agent reports this fast: a rollout passing through a
/// node usually leaves the counts where they were, and then nothing is written.
const COUNTS_COALESCE: Duration = Duration::from_secs(10);
/// Reconciles of one kind running at once: each may call the API server, and a burst of
/// thousands of nodes must not open thousands of connections to it.
const CONCURRENT_RECONCILES: u16 = 16;
/// Network memberships are rebuilt at most this often, so a burst of connects is one update.
const MEMBERSHIP_COALESCE: Duration = Duration::from_millis(250);
/// The Lease whose holder reconciles Meshes and Microservices.
pub const LEADER_LEASE: &str = "supermesh-controller";
/// How long the leader's claim lasts without renewal, and how early before that it renews.
const LEADER_LEASE_SECONDS: u64 = 15;
const LEADER_GRACE_SECONDS: u64 = 5;

/// Runs the controller until SIGINT or SIGTERM.
pub async fn run(settings: Settings) -> Result<()> {
    let config = kube::Config::infer().await.map_err(Error::Config)?;
    info!(cluster = %config.cluster_url, "connecting to the Kubernetes API");
    let client = Client::try_from(config)?;
    crds::ensure(&client, settings.install_crds).await?;
    let listener = http::bind(settings.metrics_addr).await?;
    let agents = cloudhub::bind(settings.cloudhub_addr).await?;
    // Agents sent here by another replica dial the address this one announces.
    let mut names = settings.cloudhub_names.clone();
    let host = host_of(&settings.replica.address).unwrap_or(&settings.replica.address);
    if !names.iter().any(|n| n == host) {
        names.push(host.to_owned());
    }
    let pki = cloudhub::pki::load(&client, &settings.namespace, &names, settings.lifetimes).await?;
    info!(addr = %settings.cloudhub_addr, namespace = %settings.namespace, "cloudhub listening for agents");

    let metrics = Arc::new(Metrics::default());
    let (index, triggers) = Index::new(pki.cluster_key_root.clone(), settings.reconnect_grace, metrics.clone());
    // Rotated keys are known before any membership is built: a restart never sends an old key.
    index.set_key_generations(cloudhub::pki::key_generations(&client, &settings.namespace).await?);
    tokio::spawn(index.clone().run_memberships(MEMBERSHIP_COALESCE));
    tokio::spawn(follow_key_generations(client.clone(), settings.namespace.clone(), index.clone()));
    // When a replica leaves, its nodes come to the others and their agents are reconnecting:
    // the reconnect grace starts again before anything reconciles them, so no EdgeNode turns
    // Connected=False and no count drops meanwhile.
    let replicas = Replicas::start(client.clone(), &settings.namespace, settings.replica.clone(), {
        let index = index.clone();
        move || index.restart_grace()
    });
    let leadership = LeaseManagerBuilder::new(client.clone(), LEADER_LEASE)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.replica.id)
        .with_field_manager(CONTROLLER_MANAGER)
        .with_duration(LEADER_LEASE_SECONDS)
        .with_grace(LEADER_GRACE_SECONDS)
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (leader, leadership) = leadership.watch().await;
    let role_follower = tokio::spawn(follow_role(leader.clone(), replicas.subscribe(), metrics.clone()));

    let (meshes, mesh_cache, mesh_watch) = shared_watch(&client, &metrics, "Mesh", {
        let ix = index.clone();
        move |e| ix.mesh_event(e)
    });
    let (nodes, node_cache, node_watch) = shared_watch(&client, &metrics, "EdgeNode", {
        let ix = index.clone();
        move |e| ix.node_event(e)
    });
    let (msvcs, msvc_cache, msvc_watch) = shared_watch(&client, &metrics, "Microservice", {
        let ix = index.clone();
        move |e| ix.microservice_event(e)
    });
    tokio::spawn(mesh_watch);
    tokio::spawn(node_watch);
    tokio::spawn(msvc_watch);

    let reporter = Reporter { controller: CONTROLLER_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
    let recorder = Recorder::new(client.clone(), reporter);
    let hub = Arc::new(cloudhub::Hub::new(settings.max_agents, settings.keepalive));
    let events = cloudhub::events::spawn(recorder.clone(), metrics.clone());
    let forward_key = forward::key(&pki.ca_key_pem);
    let forwarder = Forwarder::start(index.clone(), replicas.clone(), forward_key.clone(), metrics.clone());
    let serving = cloudhub::Serving {
        pki,
        namespace: settings.namespace.clone(),
        hub: hub.clone(),
        index: index.clone(),
        events,
        metrics: metrics.clone(),
        client: client.clone(),
        replicas: replicas.clone(),
        forward: forwarder,
        max_pending_per_address: settings.max_pending_per_address,
    };
    tokio::spawn(cloudhub::serve(agents, serving));
    let state = http::State {
        metrics: metrics.clone(),
        index: index.clone(),
        hub,
        replicas: replicas.clone(),
        forward_key: forward_key.into(),
        access: Arc::new(http::Access::new(client.clone())),
    };
    tokio::spawn(async move {
        if let Err(e) = http::serve(listener, state).await {
            warn!(error = %e, "metrics server stopped");
        }
    });
    let ticking = index.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(rollout::WATCH_EVERY / 2);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            ticking.tick_rollouts();
        }
    });
    let ready = index.clone();
    tokio::spawn(async move {
        ready.wait_synced().await;
        info!("every kind listed and every microservice placed: controller ready");
    });
    let role = Role { leader: leader.clone(), replicas: replicas.clone() };
    let ctx = Arc::new(Context::new(client, recorder, metrics, index, role));

    let bounded = kube::runtime::controller::Config::default().concurrency(CONCURRENT_RECONCILES);
    // The leader reconciles every Microservice and Mesh when it takes the Lease; every replica
    // reconciles the EdgeNodes it serves, all of them again when the live replicas change.
    let config_changes = crate::config::triggers(ctx.client.clone(), msvc_cache.clone());
    let msvc_ctrl = Controller::for_shared_stream(msvcs, msvc_cache)
        .with_config(bounded.clone())
        .reconcile_on(futures::stream::select(coalesce(triggers.microservices, STATUS_COALESCE), config_changes))
        .reconcile_all_on(became_leader(leader.clone()));
    let mesh_ctrl = Controller::for_shared_stream(meshes, mesh_cache)
        .with_config(bounded.clone())
        .reconcile_on(coalesce(triggers.meshes, STATUS_COALESCE))
        .reconcile_all_on(became_leader(leader.clone()));
    let node_triggers = futures::stream::select(
        coalesce(triggers.nodes_now, CONNECTION_COALESCE),
        coalesce(triggers.nodes_later, COUNTS_COALESCE),
    );
    let node_ctrl = Controller::for_shared_stream(nodes, node_cache)
        .with_config(bounded)
        .reconcile_on(node_triggers)
        .reconcile_all_on(changes(replicas.subscribe()).map(|_| ()));

    info!("starting the Mesh, EdgeNode and Microservice controllers");
    futures::join!(
        drain("Microservice", msvc_ctrl.shutdown_on_signal().run(microservice::reconcile, error_policy, ctx.clone())),
        drain("Mesh", mesh_ctrl.shutdown_on_signal().run(mesh::reconcile, error_policy, ctx.clone())),
        drain("EdgeNode", node_ctrl.shutdown_on_signal().run(edgenode::reconcile, error_policy, ctx)),
    );
    // Hand over at once: the others take this replica's nodes and, if it led, the Lease.
    replicas.leave().await;
    // With its last receiver gone, the Lease's keeper releases it and ends.
    role_follower.abort();
    let _ = role_follower.await;
    drop(leader);
    if let Ok(Err(e)) = leadership.await {
        warn!(error = %e, "cannot release the controller Lease; another replica takes it when it runs out");
    }
    info!("controller stopped");
    Ok(())
}

/// Every change of `values`, starting with the next one.
fn changes<T: Clone + Send + Sync + 'static>(values: watch::Receiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold(values, |mut values| async move {
        values.changed().await.ok()?;
        let value = values.borrow_and_update().clone();
        Some((value, values))
    })
}

/// A tick each time this replica takes the controller Lease.
fn became_leader(leader: watch::Receiver<bool>) -> impl Stream<Item = ()> + Send + 'static {
    changes(leader).filter_map(|leads| std::future::ready(leads.then_some(())))
}

/// Follows this replica's role in its gauges: whether it leads, how many replicas are live.
async fn follow_role(mut leader: watch::Receiver<bool>, mut ring: watch::Receiver<Arc<Ring>>, metrics: Arc<Metrics>) {
    metrics.replicas.set(ring.borrow_and_update().replicas().len() as i64);
    metrics.leader.set(i64::from(*leader.borrow_and_update()));
    loop {
        tokio::select! {
            Ok(()) = leader.changed() => {
                let leads = *leader.borrow_and_update();
                metrics.leader.set(i64::from(leads));
                match leads {
                    true => info!("this replica holds the controller Lease: it reconciles Meshes and Microservices"),
                    false => info!("another replica holds the controller Lease"),
                }
            }
            Ok(()) = ring.changed() => {
                metrics.replicas.set(ring.borrow_and_update().replicas().len() as i64);
            }
            else => return,
        }
    }
}

/// The one watch of kind `K`: every event goes to `index` first, then to the
/// cache and its subscriber (the controller of `K`). Objects that do not
/// deserialize are logged and skipped instead of stopping the watch; managed
/// fields are dropped, since nothing reads them and they double an object's size.
/// Returns the subscriber, the cache and the future that drives the watch.
fn shared_watch<K>(
    client: &Client,
    metrics: &Arc<Metrics>,
    kind: &'static str,
    index: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> (impl Stream<Item = Arc<K>> + Send + 'static, Store<K>, impl std::future::Future<Output = ()> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (cache, writer) = reflector::store_shared(SHARED_BUFFER);
    let subscriber = writer.subscribe().expect("a shared store has subscribers");
    let api: Api<DeserializeGuard<K>> = Api::all(client.clone());
    let metrics = metrics.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| std::future::ready(guard(kind, &metrics, event)))
        .modify(|obj: &mut K| obj.meta_mut().managed_fields = None)
        .inspect(move |event| {
            if let Ok(event) = event {
                index(event);
            }
        })
        .reflect_shared(writer);
    let driver = async move {
        stream
            .for_each(|event| async move {
                if let Err(e) = event {
                    warn!(kind, error = %e, "watch failed; retrying with backoff");
                }
            })
            .await
    };
    (subscriber, cache, driver)
}

/// The event with its object, or nothing when the object does not deserialize as `K`
/// (logged and counted; the index and the cache keep what they had).
fn guard<K: Resource>(
    kind: &'static str,
    metrics: &Metrics,
    event: Result<watcher::Event<DeserializeGuard<K>>, watcher::Error>,
) -> Option<Result<watcher::Event<K>, watcher::Error>> {
    let mut invalid = None;
    let mut read = |obj: DeserializeGuard<K>| match obj.0 {
        Ok(k) => Some(k),
        Err(e) => {
            invalid = Some(e);
            None
        }
    };
    let converted = match event {
        Err(e) => return Some(Err(e)),
        Ok(watcher::Event::Apply(o)) => read(o).map(watcher::Event::Apply),
        Ok(watcher::Event::Delete(o)) => read(o).map(watcher::Event::Delete),
        Ok(watcher::Event::InitApply(o)) => read(o).map(watcher::Event::InitApply),
        Ok(watcher::Event::Init) => Some(watcher::Event::Init),
        Ok(watcher::Event::InitDone) => Some(watcher::Event::InitDone),
    };
    if let Some(e) = invalid {
        let name = e.metadata.name.as_deref().unwrap_or_default();
        let namespace = e.metadata.namespace.as_deref().unwrap_or_default();
        warn!(kind, %namespace, %name, error = %e.error, "skipping an object that does not match its schema");
        metrics.invalid_objects.get_or_create(&crate::metrics::KindLabels { kind }).inc();
    }
    converted.map(Ok)
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

/// How often the generations of the networks' cluster keys are read: a rotation reaches the
/// network's members within this, plus the membership coalescing.
const KEY_GENERATIONS_EVERY: Duration = Duration::from_secs(10);

/// Reads the generations of the networks' cluster keys from their Secret, again and again, into `index`.
async fn follow_key_generations(client: Client, namespace: String, index: Arc<Index>) {
    loop {
        match cloudhub::pki::key_generations(&client, &namespace).await {
            Ok(generations) => index.set_key_generations(generations),
            Err(e) => warn!(error = %e, "cannot read the generations of the cluster keys"),
        }
        tokio::time::sleep(KEY_GENERATIONS_EVERY).await;
    }
}
