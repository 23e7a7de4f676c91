//! Simulated agents for benchmarks: the agent's own edgehub (TLS pinned to the
//! join token's CA, WebSocket, hello with held versions, acks, keepalives, outbox
//! delivery until acked, jittered reconnects) over a [`Device`] that lives in
//! memory and runs fake instances. One process holds thousands of them.
//!
//! A simulated instance goes Starting → Ready `ready_after` after its assignment
//! arrives, as a real one would go through its start and first health check;
//! each phase change is a status report in the outbox, and a start is an event.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use supermesh_agent::edgehub::{self, Device, Signals};
use supermesh_agent::metamanager::store::OutboxEntry;
use supermesh_protocol::{
    now_ms, Answer, Body, ErrorCode, ErrorContent, EventReport, InstanceEvent, InstanceReport, LogQuery, Message,
    Operation, Phase, ResourceRef, StatusReport, STATUS_RESOURCE,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

/// Counters of a whole fleet of simulated agents, read by the benchmark.
#[derive(Default)]
pub struct Stats {
    /// Agents connected now.
    pub connected: AtomicUsize,
    /// Changes (Insert, Update, Delete) received and acknowledged.
    pub changes: AtomicU64,
    /// Instance phase changes put in status reports.
    pub status_changes: AtomicU64,
    /// Reports (status and events) the cloud acknowledged.
    pub reports_acked: AtomicU64,
    /// Events put in outboxes.
    pub events: AtomicU64,
    watched: Mutex<Option<Watched>>,
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

    fn arrived(&self, resource: &str, version: &str) {
        if let Some(w) = lock(&self.watched).as_mut().filter(|w| w.resource == resource && w.version == version) {
            w.arrivals.push(Instant::now());
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
    /// Starts an agent as `spec` says, counting into `stats`. Call it inside a tokio runtime.
    pub fn start(spec: &Spec, stats: Arc<Stats>) -> Result<Agent, String> {
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
        let device = Arc::new(SimDevice {
            held: Mutex::default(),
            instances: Mutex::default(),
            outbox: Mutex::default(),
            next_seq: AtomicI64::new(1),
            to_cloud,
            signals: signals.clone(),
            stats,
            starts,
            ids: AtomicU64::new(1),
        });
        let hub = tokio::spawn(edgehub::run(config, device.clone(), outbound, signals));
        let lifecycle = tokio::spawn(lifecycle(device.clone(), started, spec.ready_after, spec.status_interval));
        Ok(Agent { device, tasks: vec![hub, lifecycle] })
    }
}

/// The instances' side of the agent: each started instance is Ready `ready_after` later,
/// and a full status report goes out every `interval`, as an agent's MetaSync sends it.
async fn lifecycle(
    device: Arc<SimDevice>,
    mut started: mpsc::UnboundedReceiver<(String, String)>,
    ready_after: Duration,
    interval: Duration,
) {
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = tick.tick() => device.report_status(),
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

/// The in-memory device of a simulated agent.
pub struct SimDevice {
    held: Mutex<BTreeMap<String, String>>,
    instances: Mutex<BTreeMap<String, (String, Phase)>>,
    outbox: Mutex<BTreeMap<i64, OutboxEntry>>,
    next_seq: AtomicI64,
    to_cloud: mpsc::Sender<Message>,
    signals: Signals,
    stats: Arc<Stats>,
    /// Instances started, for the lifecycle task to make Ready.
    starts: mpsc::UnboundedSender<(String, String)>,
    ids: AtomicU64,
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

    fn enqueue(&self, resource: &str, content: String, replace: bool) {
        let mut outbox = lock(&self.outbox);
        if replace {
            outbox.retain(|_, e| e.resource != resource);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let entry = OutboxEntry {
            seq,
            operation: Operation::MetaSync,
            resource: resource.to_owned(),
            content,
            created_ms: now_ms(),
        };
        outbox.insert(seq, entry);
        drop(outbox);
        self.signals.outbox.notify_one();
    }

    /// Queues a full status report, superseding an unsent one.
    fn report_status(&self) {
        let instances = lock(&self.instances)
            .iter()
            .map(|(resource, (version, phase))| InstanceReport::new(resource, version, *phase))
            .collect();
        let report = StatusReport { taken_ms: now_ms(), instances, cluster: None };
        self.enqueue(STATUS_RESOURCE, serde_json::to_string(&report).unwrap_or_default(), true);
    }

    /// Moves the instance of `resource` to `phase` at `version` (or removes it) and reports it.
    fn set_phase(&self, resource: &str, state: Option<(String, Phase)>) {
        let started = matches!(&state, Some((_, Phase::Ready)));
        {
            let mut instances = lock(&self.instances);
            let changed = match &state {
                Some(s) => instances.insert(resource.to_owned(), s.clone()).as_ref() != Some(s),
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
        self.report_status();
    }

    /// Runs `version` of `resource`: Starting now, Ready when the lifecycle says so.
    fn run(&self, resource: String, version: String) {
        self.set_phase(&resource, Some((version.clone(), Phase::Starting)));
        let _ = self.starts.send((resource, version));
    }

    /// The instance of `resource` passed its start, unless another version replaced it meanwhile.
    fn ready(&self, resource: &str, version: String) {
        let current = lock(&self.instances).get(resource).map(|(v, _)| v.clone());
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

    async fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, String> {
        Ok(lock(&self.outbox).values().take(limit).cloned().collect())
    }

    async fn acked(&self, seqs: &[i64]) -> Result<(), String> {
        let mut outbox = lock(&self.outbox);
        let gone = seqs.iter().filter(|s| outbox.remove(s).is_some()).count();
        self.stats.reports_acked.fetch_add(gone as u64, Ordering::Relaxed);
        Ok(())
    }

    fn connected(&self, connected: bool) {
        if connected {
            self.stats.connected.fetch_add(1, Ordering::Relaxed);
            // As a real agent after every reconnect: a fresh snapshot.
            self.report_status();
        } else {
            self.stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn reports_directly(&self) -> bool {
        true
    }

    fn batch_answered(&self, _: Message, _: Body) {}

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
