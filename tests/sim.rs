//! Simulated agents for benchmarks: the agent's own edgehub (TLS pinned to the
//! join token's CA, WebSocket, hello with held versions, acks, keepalives, outbox
//! delivery until acked, jittered reconnects) over a [`Device`] that lives in
//! memory and runs fake instances. One process holds thousands of them.
//!
//! A simulated instance goes Starting → Ready `ready_after` after its assignment
//! arrives, as a real one would go through its start and first health check;
//! phase changes become a status report in the outbox after the agent's own
//! coalescing delay ([`metasync::COALESCE`]), and a start is an event.
//!
//! Full status reports follow a [`Control`] that a benchmark shares with its fleet,
//! each agent at its own phase of the status interval. They go upstream as the
//! agent's [`Route`] says: over its own link, or through a simulated supernode in
//! the same process, which relays its members' outboxes in batches built with the
//! agent's relay queue, as the agent's supernode does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use supermesh_agent::config::EdgeConfig;
use supermesh_agent::edgehub::{self, Device, Signals};
use supermesh_agent::identity::Identity;
use supermesh_agent::metamanager::store::OutboxEntry;
use supermesh_agent::metasync;
use supermesh_agent::supernode::relay::Queue;
use supermesh_protocol::{
    encode, now_ms, Answer, Body, Change, ClusterView, ErrorCode, ErrorContent, EventReport, InstanceEvent,
    InstanceReport, LogQuery, Membership, Message, NodeRole, Operation, Phase, RelayedReport, Report, ResourceRef,
    StatusReport, BATCH_RESOURCE, OUTBOX_ID_PREFIX, STATUS_RESOURCE,
};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Reports in one batch upstream, and its bytes about, as the agent's supernode sends them.
const MAX_BATCH_ENTRIES: usize = 512;
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Reports a supernode's relay queue holds at most (the agent's limit).
const QUEUE_LIMIT: usize = 20_000;
/// How long after its own full status report a supernode relays (at most half the
/// interval): its members report at the same phase, and their reports come in meanwhile,
/// as the agent's supernode coalesces reports that arrive together.
const COALESCE: Duration = Duration::from_secs(1);
/// Descriptions of problems kept, and ack latencies kept until taken: a fleet whose
/// figures nobody reads stays bounded.
const KEPT_PROBLEMS: usize = 1000;
const KEPT_LATENCIES: usize = 1_000_000;

/// What a simulated agent is and how its instances behave.
#[derive(Debug, Clone)]
pub struct Spec {
    /// EdgeNode name.
    pub name: String,
    /// Account of the node.
    pub account: String,
    /// Network of the node.
    pub network: String,
    /// `host:port` of the cloudhub.
    pub cloud: String,
    /// The join token.
    pub token: String,
    /// Time from an assignment's arrival to its instance being Ready.
    pub ready_after: Duration,
    /// Time between full status reports (`meta.sync.podstatus.interval`).
    pub status_interval: Duration,
}

/// When a fleet's agents make full status reports; a benchmark sends it to all of them at
/// once through one `watch` channel. Stopping is dropping the [`Agent`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Connected, making no full status reports, not even on a reconnect (reports of
    /// instance changes still go).
    Idle,
    /// A full status report at this instant plus the agent's phase, then one every status
    /// interval, and one after every reconnect, as an agent's MetaSync sends them.
    Report(Instant),
    /// No more full status reports; what is queued still goes and its answers are counted.
    Drain,
}

/// How a simulated agent's reports reach the cloud.
pub enum Route {
    /// Over its own link, from its outbox, as an agent without a supernode sends them.
    Direct,
    /// Through `supernode`, its cluster's supernode: reports wait in the outbox until the
    /// supernode relays them and their acks come back; its status reports name its role.
    Member {
        /// Name of the supernode.
        supernode: String,
    },
    /// As its network's supernode: shortly after each of its full status reports, its own
    /// outbox reports and those of `members` (simulated agents of this process, reporting at
    /// the same phase) go into the agent's relay queue and upstream in one batch on its own
    /// link; the batch's ack deletes them from their outboxes.
    Supernode {
        /// The devices of the members it relays for.
        members: Vec<Arc<SimDevice>>,
    },
}

/// How a simulated agent reports, beyond its [`Spec`].
pub struct Reporting {
    /// Which way reports go.
    pub route: Route,
    /// Offset of its full status reports in the status interval, to spread a fleet's.
    pub phase: Duration,
    /// When it makes full status reports.
    pub control: watch::Receiver<Control>,
    /// Instances it runs from the start, in every status report: reports of a realistic
    /// size without placing microservices. They are not held: the hello does not state them.
    pub running: Vec<InstanceReport>,
}

impl Reporting {
    /// As an agent on its own reports: directly, a full status report every status interval
    /// from one interval after the start, and instances only as assignments arrive.
    pub fn on_its_own(spec: &Spec) -> Reporting {
        // Nobody changes this control: the schedule stays as it starts.
        let (_, control) = watch::channel(Control::Report(Instant::now() + spec.status_interval));
        Reporting { route: Route::Direct, phase: Duration::ZERO, control, running: Vec::new() }
    }
}

/// Counters of a whole fleet of simulated agents, read by the benchmark.
#[derive(Default)]
pub struct Stats {
    /// Agents connected now.
    pub connected: AtomicUsize,
    /// Sessions that ended while their agent ran (it reconnects).
    pub disconnects: AtomicU64,
    /// Changes (Insert, Update, Delete) received and acknowledged.
    pub changes: AtomicU64,
    /// Instance phase changes put in status reports.
    pub status_changes: AtomicU64,
    /// Instances (re)started because a change of their microservice arrived.
    pub starts: AtomicU64,
    /// Reports (status and events, direct or relayed) the cloud acknowledged.
    pub reports_acked: AtomicU64,
    /// Events put in outboxes.
    pub events: AtomicU64,
    report_messages: AtomicU64,
    reports_sent: AtomicU64,
    report_bytes: AtomicU64,
    report_answers: AtomicU64,
    batches_failed: AtomicU64,
    reports_refused: AtomicU64,
    /// Report message sent → its ack, since the last [`Stats::take_ack_latencies`].
    ack_latencies: Mutex<Vec<Duration>>,
    refusals: Mutex<Vec<String>>,
    problems: Mutex<Vec<String>>,
    watched: Mutex<Option<Watched>>,
}

/// The report counters of a fleet at one moment ([`Stats::reports`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportCounts {
    /// Messages carrying reports sent: outbox entries sent directly (each counted once,
    /// whatever the edgehub sends again after a reconnect) and supernodes' batches.
    pub messages: u64,
    /// Reports those messages carried (a batch's entries, again when they go again).
    pub reports: u64,
    /// Bytes of those messages' frames.
    pub bytes: u64,
    /// Report messages the cloud acknowledged.
    pub answered: u64,
    /// Reports the cloud acknowledged.
    pub acked: u64,
    /// Batches answered with an Error or lost with their link; their reports go again.
    /// A direct report the cloud refuses is not among them: the edgehub keeps the refusal
    /// to itself, and the report stays unanswered in the outbox until it is taken.
    pub failed: u64,
    /// Relayed reports the cloud refused for good.
    pub refused: u64,
}

impl ReportCounts {
    /// The counts from `earlier` to these.
    pub fn since(&self, earlier: &ReportCounts) -> ReportCounts {
        ReportCounts {
            messages: self.messages.saturating_sub(earlier.messages),
            reports: self.reports.saturating_sub(earlier.reports),
            bytes: self.bytes.saturating_sub(earlier.bytes),
            answered: self.answered.saturating_sub(earlier.answered),
            acked: self.acked.saturating_sub(earlier.acked),
            failed: self.failed.saturating_sub(earlier.failed),
            refused: self.refused.saturating_sub(earlier.refused),
        }
    }

    /// Report messages still waiting for their answer.
    pub fn unanswered(&self) -> u64 {
        self.messages.saturating_sub(self.answered + self.failed)
    }
}

/// A version of a resource whose arrivals are timed.
struct Watched {
    resource: String,
    version: String,
    arrivals: Vec<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Stats {
    /// Times the arrival of `version` of `resource` at every agent from now on.
    pub fn watch(&self, resource: &str, version: &str) {
        *lock(&self.watched) =
            Some(Watched { resource: resource.to_owned(), version: version.to_owned(), arrivals: Vec::new() });
    }

    /// When each agent received the watched version, so far.
    pub fn arrivals(&self) -> Vec<Instant> {
        lock(&self.watched).as_ref().map(|w| w.arrivals.clone()).unwrap_or_default()
    }

    /// The report counters now.
    pub fn reports(&self) -> ReportCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReportCounts {
            messages: get(&self.report_messages),
            reports: get(&self.reports_sent),
            bytes: get(&self.report_bytes),
            answered: get(&self.report_answers),
            acked: get(&self.reports_acked),
            failed: get(&self.batches_failed),
            refused: get(&self.reports_refused),
        }
    }

    /// Times from sending a report message to reading its ack, since the last call.
    pub fn take_ack_latencies(&self) -> Vec<Duration> {
        std::mem::take(&mut *lock(&self.ack_latencies))
    }

    /// Why the cloud refused relayed reports, the first ones.
    pub fn refusals(&self) -> Vec<String> {
        lock(&self.refusals).clone()
    }

    /// What went wrong with batches, the first ones.
    pub fn problems(&self) -> Vec<String> {
        lock(&self.problems).clone()
    }

    fn arrived(&self, resource: &str, version: &str) {
        if let Some(w) = lock(&self.watched).as_mut().filter(|w| w.resource == resource && w.version == version) {
            w.arrivals.push(Instant::now());
        }
    }

    /// A report message of `reports` reports and `bytes` bytes went to the cloud.
    fn sent(&self, reports: usize, bytes: usize) {
        self.report_messages.fetch_add(1, Ordering::Relaxed);
        self.reports_sent.fetch_add(reports as u64, Ordering::Relaxed);
        self.report_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The cloud acknowledged a report message sent at `sent`.
    fn answered(&self, sent: Instant) {
        self.report_answers.fetch_add(1, Ordering::Relaxed);
        let mut latencies = lock(&self.ack_latencies);
        if latencies.len() < KEPT_LATENCIES {
            latencies.push(sent.elapsed());
        }
    }

    fn note(list: &Mutex<Vec<String>>, what: String) {
        let mut list = lock(list);
        if list.len() < KEPT_PROBLEMS {
            list.push(what);
        }
    }
}

/// A simulated agent, running until dropped.
pub struct Agent {
    /// Its device: what it holds and runs.
    pub device: Arc<SimDevice>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Agent {
    /// Starts an agent as `spec` says, reporting on its own, counting into `stats`. Call it
    /// inside a tokio runtime.
    pub fn start(spec: &Spec, stats: Arc<Stats>) -> Result<Agent, String> {
        Agent::start_with(spec, stats, Reporting::on_its_own(spec))
    }

    /// Starts an agent as `spec` says, reporting as `reporting` says, counting into `stats`.
    /// Call it inside a tokio runtime.
    pub fn start_with(spec: &Spec, stats: Arc<Stats>, reporting: Reporting) -> Result<Agent, String> {
        let yaml = format!(
            "node: {{name: {}, account: {}, network: {}}}\ncloud: {{address: \"{}\", token: \"{}\"}}\ndataDir: /nonexistent\n",
            spec.name, spec.account, spec.network, spec.cloud, spec.token
        );
        let config = Arc::new(
            supermesh_agent::config::parse(&yaml, "simulated edge.yaml").map_err(|e| format!("{}: {e}", spec.name))?,
        );
        let (to_cloud, outbound) = mpsc::channel(256);
        let (starts, started) = mpsc::unbounded_channel();
        let signals = Signals::default();
        let Reporting { route, phase, control, running } = reporting;
        let uplink = match route {
            Route::Direct => Uplink::Direct,
            Route::Member { supernode } => Uplink::Member { supernode },
            Route::Supernode { members } => Uplink::Supernode(Relay {
                members: members.into_iter().map(|m| (m.name.clone(), m)).collect(),
                queue: Mutex::new(Queue::new(QUEUE_LIMIT)),
                in_flight: Mutex::default(),
                next_batch: AtomicU64::new(1),
            }),
        };
        let identity = identity_of(&spec.name, &config)?;
        let device = Arc::new(SimDevice {
            identity: identity.clone(),
            name: spec.name.clone(),
            membership_resource: Membership::resource(&spec.network),
            held: Mutex::default(),
            instances: Mutex::new(running.into_iter().map(|i| (i.resource.clone(), i)).collect()),
            outbox: Mutex::default(),
            membership: Mutex::default(),
            next_seq: AtomicI64::new(1),
            to_cloud,
            signals: signals.clone(),
            stats,
            starts,
            ids: AtomicU64::new(1),
            uplink,
            control,
            online: AtomicBool::new(false),
            status_changed: AtomicBool::new(false),
            status_notify: Notify::new(),
        });
        let hub = tokio::spawn(edgehub::run(config, identity, device.clone(), outbound, signals));
        let lifecycle = tokio::spawn(lifecycle(device.clone(), started, spec.ready_after, spec.status_interval, phase));
        Ok(Agent { device, tasks: vec![hub, lifecycle] })
    }
}

/// The identity of simulated node `name`: made (and enrolled) once, kept for the process as a
/// device keeps it on disk, so that a simulated agent started again connects as the same node.
fn identity_of(name: &str, config: &EdgeConfig) -> Result<Arc<Identity>, String> {
    static IDENTITIES: OnceLock<Mutex<HashMap<String, Arc<Identity>>>> = OnceLock::new();
    let mut identities = IDENTITIES.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(identity) = identities.get(name) {
        return Ok(identity.clone());
    }
    let token = config.cloud.token.as_ref().map(|t| &t.0);
    let identity = Arc::new(Identity::load(None, token).map_err(|e| format!("{name}: {e}"))?);
    identities.insert(name.to_owned(), identity.clone());
    Ok(identity)
}

/// The agent's own timers: each started instance is Ready `ready_after` later; full status
/// reports go out as the control says, every `interval` from the agent's `phase`, as an
/// agent's MetaSync sends them; a supernode relays its cluster's reports shortly after.
async fn lifecycle(
    device: Arc<SimDevice>,
    mut started: mpsc::UnboundedReceiver<(String, String)>,
    ready_after: Duration,
    interval: Duration,
    phase: Duration,
) {
    let mut control = device.control.clone();
    let due = |control: Control| match control {
        Control::Report(start) => Some(start + phase),
        Control::Idle | Control::Drain => None,
    };
    let mut next_status = due(*control.borrow_and_update());
    let mut relay_at = None;
    let mut coalesced_at = None;
    let mut controlled = true;
    // A supernode relays its cluster's reports shortly after its own.
    let reported = |device: &SimDevice| {
        device.report_status();
        device.is_supernode().then(|| Instant::now() + COALESCE.min(interval / 2))
    };
    loop {
        tokio::select! {
            changed = control.changed(), if controlled => match changed {
                Ok(()) => next_status = due(*control.borrow_and_update()),
                // Nobody changes it any more: the schedule stays as it is.
                Err(_) => controlled = false,
            },
            () = until(next_status) => {
                relay_at = reported(&device).or(relay_at);
                next_status = next_status.map(|at| at + interval);
            }
            // As the agent's MetaSync: phase changes are reported together, a moment after the first.
            () = device.status_notify.notified(), if coalesced_at.is_none() => {
                coalesced_at = Some(Instant::now() + metasync::COALESCE);
            }
            () = until(coalesced_at) => {
                coalesced_at = None;
                if device.status_changed.load(Ordering::Relaxed) {
                    relay_at = reported(&device).or(relay_at);
                }
            }
            () = until(relay_at) => {
                relay_at = None;
                device.relay().await;
            }
            Some((resource, version)) = started.recv() => {
                let device = device.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ready_after).await;
                    device.ready(&resource, version);
                });
            }
        }
    }
}

/// Sleeps until `at`; forever when there is nothing to wait for.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The in-memory device of a simulated agent.
pub struct SimDevice {
    /// Its key: a member signs the reports its supernode relays, as an agent does.
    identity: Arc<Identity>,
    name: String,
    /// Resource of its network's membership, which names its cluster.
    membership_resource: String,
    held: Mutex<BTreeMap<String, String>>,
    instances: Mutex<BTreeMap<String, InstanceReport>>,
    outbox: Mutex<BTreeMap<i64, Queued>>,
    /// Nodes the last membership of its network listed.
    membership: Mutex<BTreeSet<String>>,
    next_seq: AtomicI64,
    to_cloud: mpsc::Sender<Message>,
    signals: Signals,
    stats: Arc<Stats>,
    /// Instances started, for the lifecycle task to make Ready.
    starts: mpsc::UnboundedSender<(String, String)>,
    ids: AtomicU64,
    uplink: Uplink,
    control: watch::Receiver<Control>,
    /// Whether its link is up: what a supernode hands the edgehub offline is dropped.
    online: AtomicBool,
    /// Whether an instance changed since its last status report, and the lifecycle's wake-up.
    status_changed: AtomicBool,
    status_notify: Notify,
}

/// An outbox entry, and when it first went over the device's own link.
struct Queued {
    entry: OutboxEntry,
    sent: Option<Instant>,
}

/// How a device's reports leave it (a [`Route`] made ready to run).
enum Uplink {
    Direct,
    Member { supernode: String },
    Supernode(Relay),
}

/// A supernode's relaying: its members, the agent's relay queue, its batches in flight.
struct Relay {
    members: BTreeMap<String, Arc<SimDevice>>,
    queue: Mutex<Queue>,
    /// Batches sent and not answered yet: id → (reports in it, sent at).
    in_flight: Mutex<HashMap<String, (usize, Instant)>>,
    next_batch: AtomicU64,
}

impl SimDevice {
    /// Resource strings and versions it holds now.
    pub fn held(&self) -> BTreeMap<String, String> {
        lock(&self.held).clone()
    }

    /// Reports waiting in its outbox.
    pub fn outbox_len(&self) -> usize {
        lock(&self.outbox).len()
    }

    /// Nodes the last membership of its network from the cloud listed (none before the
    /// first): whether the cloud knows its whole cluster.
    pub fn membership(&self) -> BTreeSet<String> {
        lock(&self.membership).clone()
    }

    fn is_supernode(&self) -> bool {
        matches!(self.uplink, Uplink::Supernode(_))
    }

    fn reporting(&self) -> bool {
        matches!(*self.control.borrow(), Control::Report(_))
    }

    fn enqueue(&self, resource: &str, content: String, replace: bool) {
        let mut outbox = lock(&self.outbox);
        if replace {
            outbox.retain(|_, q| q.entry.resource != resource);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let entry = OutboxEntry {
            seq,
            operation: Operation::MetaSync,
            resource: resource.to_owned(),
            content,
            created_ms: now_ms(),
        };
        outbox.insert(seq, Queued { entry, sent: None });
        drop(outbox);
        self.signals.outbox.notify_one();
    }

    /// Takes the outbox entries `seqs` out, those it holds.
    fn remove(&self, seqs: &[i64]) -> Vec<Queued> {
        let mut outbox = lock(&self.outbox);
        seqs.iter().filter_map(|seq| outbox.remove(seq)).collect()
    }

    /// Its role and supernode, as an agent in a cluster puts them in its status reports.
    fn view(&self) -> Option<ClusterView> {
        let (role, supernode) = match &self.uplink {
            Uplink::Direct => return None,
            Uplink::Member { supernode } => (NodeRole::Member, supernode),
            Uplink::Supernode(_) => (NodeRole::Supernode, &self.name),
        };
        Some(ClusterView { role, supernode: Some(supernode.clone()) })
    }

    /// Queues a full status report, superseding an unsent one.
    fn report_status(&self) {
        self.status_changed.store(false, Ordering::Relaxed);
        let instances = lock(&self.instances).values().cloned().collect();
        let report = StatusReport { taken_ms: now_ms(), instances, cluster: self.view() };
        self.enqueue(STATUS_RESOURCE, serde_json::to_string(&report).unwrap_or_default(), true);
    }

    /// Moves the instance of `resource` to `phase` at `version` (or removes it) and reports it.
    fn set_phase(&self, resource: &str, state: Option<(String, Phase)>) {
        let started = matches!(&state, Some((_, Phase::Ready)));
        {
            let mut instances = lock(&self.instances);
            let changed = match &state {
                Some((version, phase)) => {
                    let report = InstanceReport::new(resource, version, *phase);
                    instances.insert(resource.to_owned(), report.clone()).as_ref() != Some(&report)
                }
                None => instances.remove(resource).is_some(),
            };
            if !changed {
                return;
            }
        }
        self.stats.status_changes.fetch_add(1, Ordering::Relaxed);
        if started {
            let event = EventReport::instance(InstanceEvent::Started, false, "started (simulated)".into());
            self.enqueue(resource, serde_json::to_string(&event).unwrap_or_default(), false);
            self.stats.events.fetch_add(1, Ordering::Relaxed);
        }
        self.status_changed.store(true, Ordering::Relaxed);
        self.status_notify.notify_one();
    }

    /// Runs `version` of `resource`: Starting now, Ready when the lifecycle says so.
    fn run(&self, resource: String, version: String) {
        self.stats.starts.fetch_add(1, Ordering::Relaxed);
        self.set_phase(&resource, Some((version.clone(), Phase::Starting)));
        let _ = self.starts.send((resource, version));
    }

    /// The instance of `resource` passed its start, unless another version replaced it meanwhile.
    fn ready(&self, resource: &str, version: String) {
        let current = lock(&self.instances).get(resource).map(|i| i.version.clone());
        if current.as_deref() == Some(version.as_str()) {
            self.set_phase(resource, Some((version, Phase::Ready)));
        }
    }

    async fn answer(&self, msg: &Message, body: Body) {
        let id = format!("s-{}", self.ids.fetch_add(1, Ordering::Relaxed));
        let mut reply = Message::with_body(id, now_ms(), &msg.resource, &body).answering(&msg.id);
        reply.resource_version = msg.resource_version.clone();
        // A full channel means the link is down: the cloud resends what it misses.
        let _ = self.to_cloud.send(reply).await;
    }

    /// Up to `limit` of its outbox reports as a supernode relays them, oldest first.
    fn relayed(&self, limit: usize) -> Vec<RelayedReport> {
        lock(&self.outbox)
            .values()
            .take(limit)
            .map(|q| RelayedReport {
                node: self.name.clone(),
                seq: q.entry.seq,
                operation: q.entry.operation,
                resource: q.entry.resource.clone(),
                content: serde_json::from_str(&q.entry.content).unwrap_or(serde_json::Value::Null),
                created_ms: q.entry.created_ms,
                signature: None,
            })
            .map(|r| r.sign(|purpose, body| self.identity.sign(purpose, body)))
            .collect()
    }

    /// As its cluster's supernode: queues its own and its members' outbox reports in the
    /// relay queue and sends one batch of them on its own link.
    async fn relay(&self) {
        let Uplink::Supernode(relay) = &self.uplink else { return };
        // Offline, the edgehub drops what it is handed; the reports wait in the outboxes.
        if !self.online.load(Ordering::Relaxed) {
            return;
        }
        // The edgehub hands the answer to an id starting with `b-` to `batch_answered`.
        let id = format!("b-{}", relay.next_batch.fetch_add(1, Ordering::Relaxed));
        let batch = {
            let mut queue = lock(&relay.queue);
            for device in std::iter::once(self).chain(relay.members.values().map(Arc::as_ref)) {
                for report in device.relayed(MAX_BATCH_ENTRIES) {
                    if let Err(full) = queue.push(report) {
                        Stats::note(&self.stats.problems, format!("{}: {full}", self.name));
                        break;
                    }
                }
            }
            queue.take_batch(&id, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES)
        };
        let Some(batch) = batch else { return };
        let reports = batch.entries.len();
        let msg = Message::with_body(id.clone(), now_ms(), BATCH_RESOURCE, &Body::MetaSync(Report::Batch(batch)));
        // What the edgehub sends is this message encoded.
        let bytes = encode(&msg).map_or(0, |text| text.len());
        lock(&relay.in_flight).insert(id, (reports, Instant::now()));
        self.stats.sent(reports, bytes);
        let _ = self.to_cloud.send(msg).await;
    }

    /// The session changed: the batches in flight get no answer now; their reports go again.
    fn batches_lost(&self) {
        let Uplink::Supernode(relay) = &self.uplink else { return };
        let lost: Vec<String> = lock(&relay.in_flight).drain().map(|(id, _)| id).collect();
        let mut queue = lock(&relay.queue);
        for id in &lost {
            queue.failed(id);
        }
        self.stats.batches_failed.fetch_add(lost.len() as u64, Ordering::Relaxed);
    }
}

/// Bytes of the frame the edgehub sends for `entry`: its outbox message (id from the seq,
/// time of the entry) around the content as stored, compact JSON already, so the content
/// is not encoded again.
fn frame_bytes(entry: &OutboxEntry) -> usize {
    let id = format!("{OUTBOX_ID_PREFIX}{}", entry.seq);
    let envelope = Message::new(id, entry.created_ms, entry.operation, &entry.resource, ());
    let around = encode(&envelope).map_or(0, |text| text.len()).saturating_sub("null".len());
    around + entry.content.len()
}

impl Device for SimDevice {
    async fn held(&self) -> Result<BTreeMap<String, String>, String> {
        Ok(SimDevice::held(self))
    }

    async fn receive(&self, msg: Message) {
        let change = match msg.operation {
            Operation::Insert | Operation::Update => msg.resource_version.clone(),
            Operation::Delete => None,
            Operation::Query => {
                let refusal = ErrorContent::new(ErrorCode::NotFound, "a simulated agent answers no queries");
                return self.answer(&msg, Body::Error(refusal)).await;
            }
            _ => return,
        };
        match &change {
            Some(version) => lock(&self.held).insert(msg.resource.clone(), version.clone()),
            None => lock(&self.held).remove(&msg.resource),
        };
        if msg.resource == self.membership_resource {
            let listed = match msg.body() {
                Ok(Body::Insert(Change::Membership(m)) | Body::Update(Change::Membership(m))) => {
                    m.members.into_iter().map(|m| m.name).collect()
                }
                _ => BTreeSet::new(),
            };
            *lock(&self.membership) = listed;
        }
        self.answer(&msg, Body::Response(Answer::Ack)).await;
        self.stats.changes.fetch_add(1, Ordering::Relaxed);
        if let Some(version) = &change {
            self.stats.arrived(&msg.resource, version);
        }
        if ResourceRef::microservice(&msg.resource).is_some() {
            match change {
                Some(version) => self.run(msg.resource.clone(), version),
                None => self.set_phase(&msg.resource, None),
            }
        }
    }

    /// The edgehub asks only when reports go directly, and sends each entry it gets that
    /// it has not in flight: an entry given for the first time is a report message sent.
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, String> {
        let now = Instant::now();
        let mut first = Vec::new();
        let pending = lock(&self.outbox)
            .values_mut()
            .take(limit)
            .map(|q| {
                if q.sent.is_none() {
                    q.sent = Some(now);
                    first.push(frame_bytes(&q.entry));
                }
                q.entry.clone()
            })
            .collect();
        for bytes in first {
            self.stats.sent(1, bytes);
        }
        Ok(pending)
    }

    async fn acked(&self, seqs: &[i64]) -> Result<(), String> {
        let gone = self.remove(seqs);
        self.stats.reports_acked.fetch_add(gone.len() as u64, Ordering::Relaxed);
        for sent in gone.iter().filter_map(|q| q.sent) {
            self.stats.answered(sent);
        }
        Ok(())
    }

    fn connected(&self, connected: bool) {
        // No batch in flight gets an answer after its session ended, nor on a new one (a
        // batch handed over as the link went down may still be counted as in flight).
        self.batches_lost();
        self.online.store(connected, Ordering::Relaxed);
        if connected {
            self.stats.connected.fetch_add(1, Ordering::Relaxed);
            // As a real agent after every reconnect: a fresh snapshot.
            if self.reporting() {
                self.report_status();
            }
        } else {
            self.stats.connected.fetch_sub(1, Ordering::Relaxed);
            self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reports_directly(&self) -> bool {
        matches!(self.uplink, Uplink::Direct)
    }

    fn batch_answered(&self, msg: Message, body: Body) {
        let Uplink::Supernode(relay) = &self.uplink else { return };
        let Some(id) = msg.parent_id else { return };
        // Not in flight: its link was lost before this answer, and it counts as failed.
        let Some((reports, sent)) = lock(&relay.in_flight).remove(&id) else { return };
        let ack = match body {
            Body::Response(Answer::Batch(ack)) => ack,
            other => {
                lock(&relay.queue).failed(&id);
                self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                let reason = match other {
                    Body::Error(refusal) => refusal.message,
                    other => format!("a {:?} instead of a batch ack", other.operation()),
                };
                Stats::note(&self.stats.problems, format!("{}: batch {id} failed: {reason}", self.name));
                return;
            }
        };
        self.stats.answered(sent);
        self.stats.reports_acked.fetch_add(ack.acked.len() as u64, Ordering::Relaxed);
        self.stats.reports_refused.fetch_add(ack.refused.len() as u64, Ordering::Relaxed);
        for (report, reason) in ack.refused.iter().take(1) {
            Stats::note(&self.stats.refusals, format!("{}: {reason}", report.node));
        }
        let done = lock(&relay.queue).answered(&id, &ack);
        if done.len() != reports {
            let answered = format!("{}: batch {id} of {reports} reports answered for {}", self.name, done.len());
            Stats::note(&self.stats.problems, answered);
        }
        // As the agent's supernode: acked and refused reports leave their nodes' outboxes.
        let mut by_node: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for report in done {
            by_node.entry(report.node).or_default().push(report.seq);
        }
        for (node, seqs) in by_node {
            let device = if node == self.name { Some(self) } else { relay.members.get(&node).map(Arc::as_ref) };
            if let Some(device) = device {
                device.remove(&seqs);
            }
        }
    }

    fn log(&self, _: &str, _: &LogQuery) -> Body {
        Body::Error(ErrorContent::new(ErrorCode::NotFound, "a simulated agent keeps no logs"))
    }
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status; did the process exit?"))
}

/// CPU seconds (user and system) process `pid` used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap_or(0) + 1..].split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok((user + system) / 100.0),
        _ => Err(format!("unexpected /proc/{pid}/stat: {stat}")),
    }
}
