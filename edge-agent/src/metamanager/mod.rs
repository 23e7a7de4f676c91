//! The metamanager: the message processor between the cloud link (edgehub) and
//! the local runtime (edged), and the only owner of the agent's SQLite database.
//!
//! One task owns the [`Store`]. Changes from the cloud queue on a bounded
//! channel; the task drains what is queued, commits it in one transaction, then
//! tells edged about what really changed and acks every change to the cloud.
//! Nothing is acked before it is on disk, so the cloud may resend freely.
//!
//! Reports for the cloud wait in the outbox, which is capped: a full outbox drops
//! its oldest events (never a status snapshot), counts them in the database and
//! says so in a warning at most every [`DROP_WARNING_EVERY`].

pub mod seal;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use supermesh_protocol::{
    now_ms, Answer, Body, ConnectionState, ErrorCode, ErrorContent, Message, Operation, Query, ResourceError,
    ResourceRef, CONFIG, CONNECTION_RESOURCE,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use store::{Change, KvPut, OutboxEntry, Outcome, Queued, Store, StoreError};

/// Capacity of the command queue; senders wait while it is full.
pub const QUEUE_CAPACITY: usize = 1024;
/// Most commands taken from the queue, and so committed, in one transaction.
pub const MAX_BATCH: usize = 256;
/// How long a query forwarded to the cloud waits for its answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two warnings about events dropped from the full outbox.
pub const DROP_WARNING_EVERY: Duration = Duration::from_secs(600);

/// What edged hears about a resource that really changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgedEvent {
    /// A resource was stored or replaced.
    Upserted {
        /// Resource string.
        key: String,
        /// Resource type.
        res_type: String,
        /// Resource version.
        version: String,
        /// The resource as JSON text.
        value: String,
    },
    /// A resource was removed.
    Deleted {
        /// Resource string.
        key: String,
    },
}

/// Counters of the metamanager since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `meta` rows inserted, updated or deleted.
    pub rows_written: u64,
    /// Transactions committed for changes.
    pub batches: u64,
    /// Changes acked without a write: same version and content, or delete of an absent resource.
    pub unchanged: u64,
    /// Events delivered to edged.
    pub edged_events: u64,
    /// Events dropped from the full outbox, in all, across restarts.
    pub events_dropped: u64,
}

/// Why a metamanager request failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Not held locally and no cloud to ask.
    #[error("resource {0:?} is not held locally and the cloud is unreachable; retry once the node is connected")]
    Offline(String),
    /// The cloud did not answer a forwarded query in time.
    #[error("the cloud did not answer the query for {0:?} within {QUERY_TIMEOUT:?}")]
    Timeout(String),
    /// The cloud answered a forwarded query with an error.
    #[error("the cloud refused the query for {resource:?}: {message} ({code:?})")]
    Cloud {
        /// The queried resource string.
        resource: String,
        /// The cloud's error code.
        code: ErrorCode,
        /// The cloud's explanation.
        message: String,
    },
    /// The resource string does not parse.
    #[error(transparent)]
    BadResource(#[from] ResourceError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The metamanager task is gone (it panicked or the runtime is shutting down).
    #[error("the metamanager has stopped; restart the agent")]
    Stopped,
}

/// A change from the cloud, validated, waiting for its transaction.
struct Incoming {
    parent_id: String,
    version: Option<String>,
    change: Change,
}

/// Anything else the task does for a handle, run after the batch's commit so it sees the batch.
type Job = Box<dyn FnOnce(&mut Actor) + Send>;

enum Command {
    Change(Incoming),
    Job(Job),
}

/// State shared by all handles: connection state and queries forwarded to the cloud.
#[derive(Default)]
struct Shared {
    connected: AtomicBool,
    waiting: Mutex<HashMap<String, oneshot::Sender<Message>>>,
}

impl Shared {
    fn waiting(&self) -> MutexGuard<'_, HashMap<String, oneshot::Sender<Message>>> {
        // The map stays consistent even if a holder panicked: every operation is a single insert or remove.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes a forwarded query's waiter however the query ends, including cancellation.
struct Waiter<'a>(&'a Shared, String);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.waiting().remove(&self.1);
    }
}

/// A cheap, cloneable handle to the metamanager task.
#[derive(Clone)]
pub struct MetaHandle {
    commands: mpsc::Sender<Command>,
    to_cloud: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

/// Starts the metamanager task owning `store`; it runs until every handle is dropped.
///
/// Call it inside a tokio runtime. The edgehub must drain `to_cloud` independently
/// of calling [`MetaHandle::from_cloud`], since the task waits on `to_cloud` when it is full.
pub fn spawn(store: Store, to_cloud: mpsc::Sender<Message>, to_edged: mpsc::Sender<EdgedEvent>) -> MetaHandle {
    let (commands, queue) = mpsc::channel(QUEUE_CAPACITY);
    let actor = Actor {
        store,
        to_cloud: to_cloud.clone(),
        to_edged,
        unchanged: 0,
        edged_events: 0,
        drops: DropWarning::default(),
    };
    let runtime = tokio::runtime::Handle::current();
    // On a blocking thread: every commit waits for fsync, which must not stall the
    // runtime's workers. The task only awaits channels, which need no driver.
    tokio::task::spawn_blocking(move || runtime.block_on(actor.run(queue)));
    MetaHandle { commands, to_cloud, shared: Arc::default() }
}

impl MetaHandle {
    /// Handles a message from the cloud (whose body the edgehub has checked): stores
    /// changes, completes forwarded queries, answers queries for what it holds.
    pub async fn from_cloud(&self, msg: Message) {
        match msg.operation {
            Operation::Insert | Operation::Update | Operation::Delete => match change_of(&msg) {
                Ok(change) => {
                    let incoming = Incoming { parent_id: msg.id, version: msg.resource_version, change };
                    if self.commands.send(Command::Change(incoming)).await.is_err() {
                        error!("{}; change not stored, the cloud resends it", MetaError::Stopped);
                    }
                }
                Err(reason) => {
                    warn!(id = %msg.id, %reason, "refused a change from the cloud");
                    let nack = answer(
                        &msg.id,
                        &msg.resource,
                        msg.resource_version.as_deref(),
                        Err((ErrorCode::BadMessage, reason)),
                    );
                    send(&self.to_cloud, nack).await;
                }
            },
            Operation::Response | Operation::Error => {
                match msg.parent_id.as_ref().and_then(|id| self.shared.waiting().remove(id)) {
                    // The query may have timed out meanwhile; then nobody needs the answer.
                    Some(waiter) => drop(waiter.send(msg)),
                    None => debug!(id = %msg.id, parent = ?msg.parent_id, "answer matches no waiting query"),
                }
            }
            Operation::Query => {
                let (result, version) = match self.lookup(&msg.resource).await {
                    Ok(Some((value, version))) => (Ok(Some(value)), Some(version)),
                    Ok(None) => {
                        (Err((ErrorCode::NotFound, format!("{} is not held by this node", msg.resource))), None)
                    }
                    Err(e) => (Err((ErrorCode::Unavailable, e.to_string())), None),
                };
                send(&self.to_cloud, answer(&msg.id, &msg.resource, version.as_deref(), result)).await;
            }
            other => debug!(operation = ?other, id = %msg.id, "metamanager ignores this operation"),
        }
    }

    /// Records whether the cloud is reachable; going offline fails forwarded queries at once.
    pub fn set_connection(&self, state: ConnectionState) {
        let connected = state == ConnectionState::CloudConnected;
        self.shared.connected.store(connected, Ordering::SeqCst);
        if !connected {
            // Dropping the senders wakes each waiting query with Offline instead of a timeout.
            self.shared.waiting().clear();
        }
    }

    /// The resource `resource` as JSON: from the store if held, else from the cloud while connected.
    ///
    /// A configuration snapshot (`namespace/config/<name>`) the cloud answers is stored
    /// sealed ([`seal`]) before it is returned, so that it is answered here from then on,
    /// cloud or not, for as long as an assignment or a kept revision names it.
    pub async fn query(&self, resource: &str) -> Result<Value, MetaError> {
        let is_config = ResourceRef::parse(resource)?.res_type == CONFIG;
        let held = if is_config { self.lookup_config(resource).await? } else { self.lookup(resource).await? };
        if let Some((value, _)) = held {
            return Ok(value);
        }
        let offline = || MetaError::Offline(resource.to_owned());
        let id = next_id();
        let (tx, rx) = oneshot::channel();
        self.shared.waiting().insert(id.clone(), tx);
        let _waiter = Waiter(&self.shared, id.clone());
        // Checked after registering, so a disconnect in between still drops the waiter.
        if !self.shared.connected.load(Ordering::SeqCst)
            || !send(&self.to_cloud, Message::with_body(id, now_ms(), resource, &Body::Query(Query::Resource))).await
        {
            return Err(offline());
        }
        let answer = match tokio::time::timeout(QUERY_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(offline()),
            Err(_) => return Err(MetaError::Timeout(resource.to_owned())),
        };
        // The edgehub checked the answer's body before handing it over.
        if answer.operation == Operation::Response {
            if is_config {
                self.store_config(resource, &answer.content).await;
            }
            return Ok(answer.content);
        }
        let refusal = match answer.body() {
            Ok(Body::Error(refusal)) => refusal,
            Ok(other) => ErrorContent::new(ErrorCode::BadMessage, format!("answered with a {:?}", other.operation())),
            Err(e) => ErrorContent::new(ErrorCode::BadMessage, e.to_string()),
        };
        Err(MetaError::Cloud { resource: resource.to_owned(), code: refusal.code, message: refusal.message })
    }

    /// Version of every stored resource, by resource string, for the hello on connect.
    pub async fn held_versions(&self) -> Result<BTreeMap<String, String>, MetaError> {
        self.with_actor(|a| a.store.held_versions()).await
    }

    /// Every stored resource of `res_type` (what edged starts from after a restart, cloud or not).
    pub async fn list(&self, res_type: &str) -> Result<Vec<store::Row>, MetaError> {
        let res_type = res_type.to_owned();
        self.with_actor(move |a| a.store.list(&res_type)).await
    }

    /// Queues a report that supersedes unsent reports of the same operation and resource.
    pub async fn replace_report(
        &self,
        operation: Operation,
        resource: &str,
        content: &Value,
    ) -> Result<i64, MetaError> {
        self.report(operation, resource, content, Store::replace).await
    }

    /// Puts a report for the cloud in the outbox; returns its seq.
    pub async fn enqueue_report(
        &self,
        operation: Operation,
        resource: &str,
        content: &Value,
    ) -> Result<i64, MetaError> {
        self.report(operation, resource, content, Store::enqueue).await
    }

    /// Writes a report to the outbox with `write` (append, or append superseding).
    async fn report(
        &self,
        operation: Operation,
        resource: &str,
        content: &Value,
        write: fn(&mut Store, Operation, &str, &str) -> Result<Queued, StoreError>,
    ) -> Result<i64, MetaError> {
        let (resource, content) = (resource.to_owned(), content.to_string());
        self.with_actor(move |a| {
            let queued = write(&mut a.store, operation, &resource, &content)?;
            a.drops.note(&queued, a.store.outbox_cap(), Instant::now());
            Ok(queued.seq)
        })
        .await
    }

    /// Up to `limit` reports not yet acked by the cloud, oldest first.
    pub async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, MetaError> {
        self.with_actor(move |a| a.store.pending(limit)).await
    }

    /// Drops the reports the cloud acked; returns how many were still there.
    pub async fn outbox_acked(&self, seqs: &[i64]) -> Result<usize, MetaError> {
        let seqs = seqs.to_vec();
        self.with_actor(move |a| a.store.remove(&seqs)).await
    }

    /// The keys microservice `microservice` (its resource string) stored through the local API.
    pub async fn kv_keys(&self, microservice: &str) -> Result<Vec<String>, MetaError> {
        let microservice = microservice.to_owned();
        self.with_actor(move |a| a.store.kv_keys(&microservice)).await
    }

    /// The value microservice `microservice` stored under `key`, if any.
    pub async fn kv_get(&self, microservice: &str, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let (microservice, key) = (microservice.to_owned(), key.to_owned());
        self.with_actor(move |a| a.store.kv_get(&microservice, &key)).await
    }

    /// Stores `value` under `key` for `microservice` unless that would make it hold more than `max_keys` keys.
    pub async fn kv_put(
        &self,
        microservice: &str,
        key: &str,
        value: Vec<u8>,
        max_keys: usize,
    ) -> Result<KvPut, MetaError> {
        let (microservice, key) = (microservice.to_owned(), key.to_owned());
        self.with_actor(move |a| a.store.kv_put(&microservice, &key, &value, max_keys)).await
    }

    /// Removes `key` of `microservice`; returns whether it was there.
    pub async fn kv_delete(&self, microservice: &str, key: &str) -> Result<bool, MetaError> {
        let (microservice, key) = (microservice.to_owned(), key.to_owned());
        self.with_actor(move |a| a.store.kv_delete(&microservice, &key)).await
    }

    /// What this device keeps about the revisions of microservice `key` (edged's rollback).
    pub async fn revisions(&self, key: &str) -> Result<store::Revisions, MetaError> {
        let key = key.to_owned();
        self.with_actor(move |a| a.store.revisions(&key)).await
    }

    /// Keeps `kept` as the version microservice `key` goes back to.
    pub async fn keep_previous(&self, key: &str, kept: store::Kept) -> Result<(), MetaError> {
        let key = key.to_owned();
        self.with_actor(move |a| a.store.keep_previous(&key, &kept)).await
    }

    /// Records that microservice `key` refused a version and queues `event` about it, in one transaction.
    pub async fn refuse(&self, key: &str, refusal: store::Refusal, event: &Value) -> Result<(), MetaError> {
        let (key, event) = (key.to_owned(), event.to_string());
        self.with_actor(move |a| {
            let queued = a.store.refuse(&key, &refusal, &event)?;
            a.drops.note(&queued, a.store.outbox_cap(), Instant::now());
            Ok(())
        })
        .await
    }

    /// Ends the refusal of microservice `key`; with `forget`, drops its kept version too.
    pub async fn clear_revisions(&self, key: &str, forget: bool) -> Result<(), MetaError> {
        let key = key.to_owned();
        self.with_actor(move |a| a.store.clear_revisions(&key, forget)).await
    }

    /// Counters since the task started.
    pub async fn stats(&self) -> Result<Stats, MetaError> {
        self.with_actor(|a| {
            let s = a.store.stats();
            Ok(Stats {
                rows_written: s.rows_written,
                batches: s.batches,
                unchanged: a.unchanged,
                edged_events: a.edged_events,
                events_dropped: a.store.dropped_events()?,
            })
        })
        .await
    }

    /// The stored resource `key` parsed from JSON, with its version.
    async fn lookup(&self, key: &str) -> Result<Option<(Value, String)>, MetaError> {
        let key = key.to_owned();
        self.with_actor(move |a| {
            let Some(row) = a.store.get(&key)? else { return Ok(None) };
            let value = serde_json::from_str(&row.value).map_err(|e| StoreError::Unusable {
                path: a.store.path().to_owned(),
                reason: format!("stored value of {key} is not JSON: {e}"),
            })?;
            Ok(Some((value, row.version)))
        })
        .await
    }

    /// Stored configuration snapshot `key`, unsealed and parsed.
    async fn lookup_config(&self, key: &str) -> Result<Option<(Value, String)>, MetaError> {
        let key = key.to_owned();
        self.with_actor(move |a| {
            let Some(text) = a.store.config(&key)? else { return Ok(None) };
            // Not the parser's message: it may quote the snapshot's values.
            let value = serde_json::from_str(&text).map_err(|_| StoreError::Unusable {
                path: a.store.path().to_owned(),
                reason: format!("stored configuration snapshot {key} is not JSON"),
            })?;
            Ok(Some((value, String::new())))
        })
        .await
    }

    /// Stores the configuration snapshot `key` the cloud answered with, sealed; a failure
    /// only means it is asked for again next time.
    async fn store_config(&self, key: &str, content: &Value) {
        // The edgehub checked that it is a ConfigData; its values are never logged.
        let (key, text) = (key.to_owned(), content.to_string());
        match self
            .with_actor({
                let key = key.clone();
                move |a| a.store.put_config(&key, &text)
            })
            .await
        {
            Ok(stored) => debug!(%key, stored, "configuration snapshot from the cloud"),
            Err(e) => warn!(%key, error = %e, "cannot store the configuration snapshot; it is asked for again"),
        }
    }

    /// Runs `job` on the task and returns its result.
    async fn with_actor<U: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Actor) -> Result<U, StoreError> + Send + 'static,
    ) -> Result<U, MetaError> {
        let (tx, rx) = oneshot::channel();
        // The asker may have been cancelled; its result is then dropped.
        let job: Job = Box::new(move |actor| drop(tx.send(job(actor))));
        self.commands.send(Command::Job(job)).await.map_err(|_| MetaError::Stopped)?;
        Ok(rx.await.map_err(|_| MetaError::Stopped)??)
    }
}

/// The task's state; lives on the task alone.
struct Actor {
    store: Store,
    to_cloud: mpsc::Sender<Message>,
    to_edged: mpsc::Sender<EdgedEvent>,
    unchanged: u64,
    edged_events: u64,
    drops: DropWarning,
}

/// Warns about a full outbox, at most every [`DROP_WARNING_EVERY`]: a week offline
/// must not fill the journal with one line per event.
#[derive(Debug, Default)]
struct DropWarning {
    last: Option<Instant>,
    /// Events dropped since the last warning.
    unreported: u64,
}

impl DropWarning {
    /// Takes note of a write to the outbox; returns whether it warned.
    fn note(&mut self, queued: &Queued, cap: store::OutboxCap, now: Instant) -> bool {
        let over = !queued.usage.within(cap);
        if queued.dropped == 0 && !over {
            return false;
        }
        self.unreported = self.unreported.saturating_add(queued.dropped);
        if self.last.is_some_and(|last| now.duration_since(last) < DROP_WARNING_EVERY) {
            return false;
        }
        self.last = Some(now);
        let dropped = std::mem::take(&mut self.unreported);
        let (reports, bytes) = (queued.usage.reports, queued.usage.bytes);
        if over {
            warn!(
                reports, bytes, cap_reports = cap.reports, cap_bytes = cap.bytes, dropped, total = queued.dropped_total,
                "status snapshots alone exceed the outbox cap, so every event is dropped; raise meta.outbox.maxReports \
                 or meta.outbox.maxBytes in edge.yaml"
            );
        } else {
            warn!(
                dropped,
                total = queued.dropped_total,
                cap_reports = cap.reports,
                cap_bytes = cap.bytes,
                "the outbox is full (the cloud has not acked for a while): dropped the oldest events; \
                 status snapshots are kept"
            );
        }
        true
    }
}

impl Actor {
    async fn run(mut self, mut queue: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let (mut changes, mut jobs) = (Vec::new(), Vec::new());
            for command in batch.drain(..) {
                match command {
                    Command::Change(incoming) => changes.push(incoming),
                    Command::Job(job) => jobs.push(job),
                }
            }
            if !changes.is_empty() {
                self.commit(changes).await;
            }
            for job in jobs {
                job(&mut self);
            }
        }
        debug!("metamanager stopped: every handle is gone");
    }

    /// Commits `batch` in one transaction, then tells edged and acks each change, or nacks them all.
    async fn commit(&mut self, batch: Vec<Incoming>) {
        let (replies, changes): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|i| ((i.parent_id, i.version), i.change)).unzip();
        let applied = self.store.apply(&changes).map_err(|e| {
            error!(error = %e, changes = changes.len(), "committing a batch failed; nacked it, the cloud resends it");
            e.to_string()
        });
        for (i, ((parent_id, version), change)) in replies.into_iter().zip(changes).enumerate() {
            let result = match &applied {
                Ok(_) => Ok(None),
                Err(e) => Err((ErrorCode::StoreFailed, e.clone())),
            };
            let reply = answer(&parent_id, change.key(), version.as_deref(), result);
            if let Ok(outcomes) = &applied {
                self.tell_edged(change, outcomes[i]).await;
            }
            send(&self.to_cloud, reply).await;
        }
    }

    async fn tell_edged(&mut self, change: Change, outcome: Outcome) {
        if !outcome.changed() {
            self.unchanged += 1;
            return;
        }
        let event = match change {
            Change::Upsert { key, res_type, version, value } => EdgedEvent::Upserted { key, res_type, version, value },
            Change::Delete { key } => EdgedEvent::Deleted { key },
        };
        match self.to_edged.send(event).await {
            Ok(()) => self.edged_events += 1,
            Err(_) => warn!("edged is gone; it reads the store when it starts again"),
        }
    }
}

/// The change an Insert, Update or Delete asks for, or why it is refused.
fn change_of(msg: &Message) -> Result<Change, String> {
    let resource = ResourceRef::parse(&msg.resource).map_err(|e| e.to_string())?;
    let key = msg.resource.clone();
    if msg.operation == Operation::Delete {
        return Ok(Change::Delete { key });
    }
    let Some(version) = msg.resource_version.clone().filter(|v| !v.is_empty()) else {
        return Err(format!("{:?} of {key} has no resourceVersion", msg.operation));
    };
    if !msg.content.is_object() {
        return Err(format!("content of {:?} {key} must be a JSON object holding the resource", msg.operation));
    }
    if resource.res_type == CONFIG {
        // Never stored in clear: snapshots are queried, and stored sealed.
        return Err(format!(
            "{:?} of {key}: configuration snapshots are queried by the agent, not pushed",
            msg.operation
        ));
    }
    Ok(Change::Upsert { key, res_type: resource.res_type.to_owned(), version, value: msg.content.to_string() })
}

/// A Response (`Ok`: an ack, or the resource asked for) or Error (`Err`) answering message `parent_id`.
fn answer(
    parent_id: &str,
    resource: &str,
    version: Option<&str>,
    result: Result<Option<Value>, (ErrorCode, String)>,
) -> Message {
    // The cloud's decoder checks the resource; parent_id still names what is answered.
    let resource = if ResourceRef::parse(resource).is_ok() { resource } else { CONNECTION_RESOURCE };
    let (id, now) = (next_id(), now_ms());
    let mut msg = match result {
        Ok(None) => Message::with_body(id, now, resource, &Body::Response(Answer::Ack)),
        Ok(Some(content)) => Message::new(id, now, Operation::Response, resource, content),
        Err((code, message)) => Message::with_body(id, now, resource, &Body::Error(ErrorContent::new(code, message))),
    };
    msg.resource_version = version.map(str::to_owned);
    msg.answering(parent_id)
}

/// Sends `msg` towards the cloud; false when the edgehub is gone.
async fn send(to_cloud: &mpsc::Sender<Message>, msg: Message) -> bool {
    let sent = to_cloud.send(msg).await.is_ok();
    if !sent {
        debug!("edgehub is gone; the cloud resends unacked changes on reconnect");
    }
    sent
}

/// A fresh id for a message of this agent: `e-<process start>-<counter>`.
fn next_id() -> String {
    // The start time keeps ids unique across agent restarts, which the cloud may still remember.
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| format!("{:x}", now_ms()));
    format!("e-{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests;
