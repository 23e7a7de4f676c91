//! What reconcilers share: the client, the in-memory index of the three kinds,
//! the placement of every microservice, metrics, and helpers that write status,
//! publish Events and wrap reconciles in the finalizer.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use kube::api::{Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalized};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use supermesh_api::names::{CONTROLLER_MANAGER, FINALIZER};
use supermesh_api::{EdgeNode, Mesh, Microservice};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::{Error, Result};

/// Read-only caches of the three kinds, fed by the controllers' watches.
#[derive(Clone)]
pub struct Index {
    /// Every Mesh.
    pub meshes: Store<Mesh>,
    /// Every EdgeNode.
    pub nodes: Store<EdgeNode>,
    /// Every Microservice.
    pub microservices: Store<Microservice>,
    /// Which caches hold their initial listing (see `Synced`).
    pub synced: watch::Receiver<Synced>,
}

/// Which of the three caches hold their initial listing. Tracked from the watch
/// events themselves: kube's `Store::wait_until_ready` wakes only one waiter,
/// and the controllers' own appliers are already waiting on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    /// Meshes listed.
    pub meshes: bool,
    /// EdgeNodes listed.
    pub nodes: bool,
    /// Microservices listed.
    pub microservices: bool,
}

impl Synced {
    /// Whether all three caches are listed.
    pub fn all(&self) -> bool {
        self.meshes && self.nodes && self.microservices
    }
}

impl Index {
    /// Whether every cache holds its initial listing.
    pub fn is_ready(&self) -> bool {
        self.synced.borrow().all()
    }

    /// Waits until every cache holds its initial listing.
    pub async fn wait_ready(&self) {
        // An error means the sender is gone, that is the controller is shutting down.
        let _ = self.synced.clone().wait_for(Synced::all).await;
    }

    /// Every EdgeNode, cloned out of the cache.
    pub fn node_list(&self) -> Vec<EdgeNode> {
        self.nodes.state().iter().map(|n| (**n).clone()).collect()
    }
}

/// Where each microservice is placed: written by the Microservice reconciler,
/// read by the EdgeNode reconciler (instance counts) and, later, the cloudhub.
#[derive(Default)]
pub struct Placements {
    by_microservice: Mutex<HashMap<ObjectRef<Microservice>, BTreeSet<String>>>,
    changed: Notify,
}

impl Placements {
    /// The nodes `msvc` is placed on now.
    pub fn get(&self, msvc: &ObjectRef<Microservice>) -> Option<BTreeSet<String>> {
        self.lock().get(msvc).cloned()
    }

    /// Records the placement of `msvc` and returns the previous one.
    pub fn set(&self, msvc: ObjectRef<Microservice>, nodes: BTreeSet<String>) -> Option<BTreeSet<String>> {
        let old = self.lock().insert(msvc, nodes);
        self.changed.notify_waiters();
        old
    }

    /// Forgets `msvc` and returns where it was placed.
    pub fn remove(&self, msvc: &ObjectRef<Microservice>) -> Option<BTreeSet<String>> {
        let old = self.lock().remove(msvc);
        self.changed.notify_waiters();
        old
    }

    /// The microservices placed on `node`.
    pub fn assigned_to(&self, node: &str) -> Vec<ObjectRef<Microservice>> {
        self.lock().iter().filter(|(_, nodes)| nodes.contains(node)).map(|(m, _)| m.clone()).collect()
    }

    /// Number of microservice instances placed on `node`.
    pub fn instances_on(&self, node: &str) -> usize {
        self.lock().values().filter(|nodes| nodes.contains(node)).count()
    }

    /// Total number of placed instances.
    pub fn total(&self) -> usize {
        self.lock().values().map(BTreeSet::len).sum()
    }

    /// Whether every microservice in `store` has been placed at least once since this
    /// controller started: until then, what a node "should hold" is not known.
    pub fn is_complete(&self, store: &Store<Microservice>) -> bool {
        let placed = self.lock();
        store.state().iter().all(|m| placed.contains_key(&ObjectRef::from_obj(&**m)))
    }

    /// Waits until every microservice in `store` has been placed at least once,
    /// so that counts derived from placements are complete (for example right
    /// after a controller restart). Gives up after `limit` and returns false.
    pub async fn wait_complete(&self, store: &Store<Microservice>, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if self.is_complete(store) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<Microservice>, BTreeSet<String>>> {
        // The map stays consistent even if a holder panicked: each operation is one map call.
        self.by_microservice.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Caches of the three kinds.
    pub index: Index,
    /// Placement of every microservice.
    pub placements: Placements,
    /// Asks the EdgeNode controller to recount a node's instances.
    pub node_trigger: UnboundedSender<ObjectRef<EdgeNode>>,
    /// Sessions of connected agents.
    pub hub: Arc<crate::cloudhub::Hub>,
    /// The latest instance status report of every node.
    pub reports: crate::aggregator::Reports,
    /// The secret of the bootstrap token: the cluster keys of network memberships derive from it.
    pub token_secret: String,
    /// What each node last contributed to its network's membership.
    pub members: crate::membership::Tracker,
    /// Asks the Microservice controller to re-aggregate a microservice's status.
    pub msvc_trigger: UnboundedSender<ObjectRef<Microservice>>,
    /// Consecutive failed reconciles per object, for exponential retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    fn failure_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
        format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
    }

    /// Records one more failure of `obj` and returns how long to wait before retrying:
    /// 200 ms doubling up to 60 s, with jitter, so that a stuck object never storms the API server.
    fn next_retry<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(Self::failure_key(obj)).or_insert(0);
        *n = n.saturating_add(1);
        let base = Duration::from_millis(200).saturating_mul(1 << (*n - 1).min(9)).min(Duration::from_secs(60));
        base.mul_f64(0.75 + rand::random::<f64>() / 2.0)
    }

    fn succeeded<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&Self::failure_key(obj));
    }
}

impl Context {
    /// Writes `status` by server-side apply unless the object already has it.
    /// Returns whether a write was made.
    pub async fn write_status<K>(&self, api: &Api<K>, obj: &K, status: &K::Status) -> Result<bool>
    where
        K: Resource<DynamicType = ()> + HasStatus + DeserializeOwned + Clone + Debug,
        K::Status: PartialEq + Serialize,
    {
        if obj.status() == Some(status) {
            return Ok(false);
        }
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(CONTROLLER_MANAGER).force();
        api.patch_status(&obj.name_any(), &params, &Patch::Apply(patch)).await?;
        self.metrics.status_writes.get_or_create(&crate::metrics::KindLabels { kind: kind_of::<K>() }).inc();
        Ok(true)
    }

    /// Publishes a Kubernetes Event on `obj`. Events are best effort: a failure is logged.
    pub async fn publish<K>(&self, obj: &K, warning: bool, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        self.publish_related(obj, None, warning, reason, note).await
    }

    /// Publishes a Kubernetes Event on `obj` related to another object (for
    /// example the EdgeNode an instance event happened on, which also keeps the
    /// events of different nodes apart instead of merging them into one series).
    pub async fn publish_related<K>(
        &self,
        obj: &K,
        related: Option<k8s_openapi::api::core::v1::ObjectReference>,
        warning: bool,
        reason: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, object = %obj.name_any(), "cannot publish event");
        }
    }
}

/// The kind name of `K`, as a static string for metrics.
fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Mesh" => "Mesh",
        "EdgeNode" => "EdgeNode",
        "Microservice" => "Microservice",
        _ => "Other",
    }
}

/// Runs `apply` (object present) or `cleanup` (object being deleted) inside the
/// supermesh finalizer, after the caches are ready; times and counts the reconcile.
pub async fn reconcile_in_finalizer<K, A, C, FA, FC>(
    api: Api<K>,
    obj: Arc<K>,
    ctx: Arc<Context>,
    apply: A,
    cleanup: C,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
    A: FnOnce(Arc<K>, Arc<Context>) -> FA,
    C: FnOnce(Arc<K>, Arc<Context>) -> FC,
    FA: Future<Output = Result<Action>>,
    FC: Future<Output = Result<Action>>,
{
    let _timer = ctx.metrics.reconcile(kind_of::<K>());
    ctx.index.wait_ready().await;
    let (done, key) = (ctx.clone(), obj.clone());
    let result = finalizer(&api, FINALIZER, obj, |event| async move {
        match event {
            Finalized::Apply(o) => apply(o, ctx).await,
            Finalized::Cleanup(o) => {
                info!(kind = kind_of::<K>(), name = %o.name_any(), "cleaning up before deletion");
                cleanup(o, ctx).await
            }
        }
    })
    .await
    .map_err(Error::from);
    if result.is_ok() {
        done.succeeded(&*key);
    }
    result
}

/// What to do after a failed reconcile: log, count by reason, retry later.
pub fn error_policy<K: Resource<DynamicType = ()>>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_gone() {
        debug!(kind = kind_of::<K>(), name = %obj.name_any(), "object is gone; nothing to retry");
        ctx.succeeded(&*obj);
        return Action::await_change();
    }
    let retry = ctx.next_retry(&*obj);
    if error.is_stale_write() {
        debug!(kind = kind_of::<K>(), name = %obj.name_any(), %error, ?retry, "write raced a newer version, retrying");
        ctx.metrics.failure(kind_of::<K>(), "stale");
    } else {
        warn!(kind = kind_of::<K>(), name = %obj.name_any(), namespace = ?obj.namespace(), %error, ?retry, "reconcile failed, retrying");
        ctx.metrics.failure(kind_of::<K>(), error.metric_label());
    }
    Action::requeue(retry)
}

/// Requeue interval of a successful reconcile: a safety net, watches drive the rest.
pub const RESYNC: Duration = Duration::from_secs(600);
