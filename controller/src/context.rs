//! What reconcilers share: the client, Events, metrics and the fleet index, and
//! helpers that write status, publish Events and wrap reconciles in the finalizer.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::FutureExt;
use kube::api::{Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalized};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use supermesh_api::names::{CONTROLLER_MANAGER, FINALIZER};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::index::Index;
use crate::metrics::Metrics;
use crate::replicas::Replicas;
use crate::{Error, Result};

/// Everything a reconcile needs: the client, Events, metrics and the fleet index.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The fleet index: placements, reports, memberships and liveness.
    pub index: Arc<Index>,
    /// What this replica reconciles.
    pub role: Role,
    /// Retry backoff of the objects whose reconcile failed, by object.
    retries: Mutex<HashMap<String, ExponentialBackoff>>,
}

/// What a replica reconciles: Meshes and Microservices while it holds the controller
/// Lease, and the EdgeNodes of the nodes it serves (it holds their sessions and reports).
#[derive(Clone)]
pub struct Role {
    /// True while this replica holds the controller Lease.
    pub leader: watch::Receiver<bool>,
    /// The live replicas, and which serves which node.
    pub replicas: Replicas,
}

/// Retries after failed reconciles: 200 ms doubling up to 60 s, with jitter, so that
/// a stuck object never storms the API server.
const RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(200))
    .with_max_delay(Duration::from_secs(60))
    .with_jitter()
    .without_max_times();

impl Context {
    /// A context for reconciles.
    pub fn new(client: Client, recorder: Recorder, metrics: Arc<Metrics>, index: Arc<Index>, role: Role) -> Context {
        Context { client, recorder, metrics, index, role, retries: Mutex::default() }
    }

    /// Whether this replica reconciles Meshes and Microservices now.
    pub fn leads(&self) -> bool {
        *self.role.leader.borrow()
    }

    /// Whether this replica reconciles the EdgeNode of `node`.
    pub fn serves(&self, node: &str) -> bool {
        self.role.replicas.elsewhere(node).is_none()
    }

    fn failure_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
        format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
    }

    /// Records one more failure of `obj` and returns how long to wait before retrying.
    fn next_retry<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Duration {
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        let backoff = retries.entry(Self::failure_key(obj)).or_insert_with(|| RETRY.build());
        backoff.next().unwrap_or(Duration::from_secs(60))
    }

    fn succeeded<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).remove(&Self::failure_key(obj));
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
        self.publish_event(obj, related, "Reconcile", warning, reason, note).await
    }

    /// Publishes a Kubernetes Event on `obj` for `action`: Events of one object with the
    /// same reason and action make one series, so each action of its own shows apart (for
    /// example each wave of a rollout).
    pub async fn publish_event<K>(
        &self,
        obj: &K,
        related: Option<k8s_openapi::api::core::v1::ObjectReference>,
        action: &str,
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
            action: action.to_owned(),
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
    ctx.index.wait_synced().await;
    let (done, key) = (ctx.clone(), obj.clone());
    let reconcile = finalizer(&api, FINALIZER, obj, |event| async move {
        match event {
            Finalized::Apply(o) => apply(o, ctx).await,
            Finalized::Cleanup(o) => {
                info!(kind = kind_of::<K>(), name = %o.name_any(), "cleaning up before deletion");
                cleanup(o, ctx).await
            }
        }
    });
    // A bug in one reconcile must not end the controller's stream, and with it every other
    // object's reconciles: the panic becomes an error, logged, counted and retried.
    let result = match AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => result.map_err(Error::from),
        Err(panic) => Err(Error::Panicked(panic_message(panic.as_ref()))),
    };
    if result.is_ok() {
        done.succeeded(&*key);
    }
    result
}

/// The message a panic carried, when it is text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_owned(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_owned(),
    }
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
