//! `cargo xtask bench sync`: figures for the cloud -> edge sync path. A benchmark
//! reports; it never passes or fails on timings.
//!
//! 1. The agent's metamanager store on a real SQLite file: upserts per second with
//!    one transaction per message, then batched as the metamanager batches.
//! 2. Change-to-ack latency and controller memory with N simulated agents: one
//!    process opens N authenticated sessions to one real controller (release build)
//!    with `edgehub::dial`, acks every change at
//!    once, and times each Update from just before the API write that caused it.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use supermesh_agent::config::EdgeConfig;
use supermesh_agent::edgehub::{self, Ws};
use supermesh_agent::metamanager::store::{Change, Store};
use supermesh_agent::metamanager::MAX_BATCH;
use supermesh_api::{EdgeNode, Mesh, Microservice};
use supermesh_protocol::{self as protocol, Assignment, Message, Operation, CONNECTION_RESOURCE};
use supermesh_tests::{apply_yaml, delete_all, join_token, microservice, unique, Cluster, Controller};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as Frame;

/// Upserts written in each of the two store modes.
const UPSERTS: usize = 5000;
/// Spec changes timed per agent count.
const CHANGES: usize = 5;
/// Agent counts run when `--agents` is not given.
const DEFAULT_AGENTS: &[usize] = &[1, 100, 1000];
/// Sessions opening at once; the cloudhub allows 64 concurrent handshakes.
const CONNECTING_AT_ONCE: usize = 50;
/// How often a simulated agent sends a keepalive (the cloudhub drops a session silent for 45 s).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long all agents may take to connect.
const CONNECT_LIMIT: Duration = Duration::from_secs(120);
/// How long the controller may take to deliver the new microservice to every agent.
const PLACE_LIMIT: Duration = Duration::from_secs(120);
/// How long one change may take to reach every agent.
const DELIVERY_LIMIT: Duration = Duration::from_secs(60);
/// How long cleaning up (finalizers removed by the controller) may take.
const CLEANUP_LIMIT: Duration = Duration::from_secs(90);
/// Name of the microservice placed on every node.
const MSVC: &str = "bench";
/// Name of the Account mesh holding the simulated nodes.
const MESH: &str = "m";

/// How long the controller must write no status before the timed changes start.
const QUIET: Duration = Duration::from_secs(2);
/// How long to wait for that quiet.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

const STATUS_WRITES_METRIC: &str = "supermesh_controller_status_writes_total";
const AGENTS_METRIC: &str = "supermesh_controller_cloudhub_agents";
const SENT_METRIC: &str = "supermesh_controller_cloudhub_changes_sent_total";
const ACKED_METRIC: &str = "supermesh_controller_cloudhub_changes_acked_total";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; a bench target run by `cargo test --all-targets` gets no
    // arguments, and a test run must not start a benchmark of several minutes.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("bench sync: skipped outside `cargo bench`; run it with `cargo xtask bench sync`");
        return;
    }
    let agents = agent_counts(&args).unwrap_or_else(|e| fail(&e));

    eprintln!(
        "==> metamanager store: {UPSERTS} upserts one transaction each, then {UPSERTS} in batches of {MAX_BATCH}"
    );
    let store = store_bench().unwrap_or_else(|e| fail(&format!("store benchmark: {e}")));

    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| fail(&format!("cannot start tokio: {e}")));
    let (population, rows) = runtime.block_on(async {
        let cluster = Cluster::connect().await;
        // The controller reconciles every object in the cluster, not only the benchmark's.
        let population = population(&cluster).await;
        let mut rows = Vec::new();
        for &n in &agents {
            eprintln!("==> sync with {n} simulated agent(s)");
            let mut notes = Vec::new();
            let figures = sync_bench(&cluster, n, &mut notes).await;
            rows.push((n, figures, notes));
        }
        (population, rows)
    });

    println!();
    println!("{}", store.report());
    println!();
    println!(
        "change-to-ack: {CHANGES} spec changes (patch spec.args) of one Microservice placed on every node of an \
         Account mesh;\ncontroller: the build in SUPERMESH_BIN_DIR (release under cargo xtask bench), one fresh process per row; \
         simulator: this process (release)"
    );
    println!("{population}");
    println!("agents  connect s  p50 ms  p99 ms  max ms  all-acked ms  controller RSS MiB (idle)");
    let mut failed = false;
    for (n, row, _) in &rows {
        match row {
            Ok(f) => println!(
                "{n:>6}  {:>9.1}  {:>6.1}  {:>6.1}  {:>6.1}  {:>12.1}  {:>10.1} ({:.1})",
                f.connect.as_secs_f64(),
                ms(f.p50),
                ms(f.p99),
                ms(f.max),
                ms(f.all_acked),
                mib(f.rss),
                mib(f.idle_rss)
            ),
            Err(e) => {
                failed = true;
                println!("{n:>6}  failed: {e}");
            }
        }
    }
    println!(
        "latency: API write (kube client patch) -> Update received by an agent, over all agents x {CHANGES} changes;\n\
         all-acked: API write -> the last agent's ack sent, median of the {CHANGES} changes; RSS: VmRSS after the \
         changes with all agents connected (idle: before any agent)"
    );
    for (n, _, notes) in &rows {
        for note in notes {
            println!("note ({n} agents): {note}");
        }
    }
    if failed {
        std::process::exit(1);
    }
}

/// How many supermesh objects the cluster already holds, for the report.
async fn population(cluster: &Cluster) -> String {
    async fn count<K>(api: Api<K>) -> String
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        api.list(&ListParams::default()).await.map_or_else(|e| format!("? ({e})"), |l| l.items.len().to_string())
    }
    let client = &cluster.client;
    format!(
        "cluster before the benchmark: {} Meshes, {} Microservices, {} EdgeNodes (all reconciled by each controller)",
        count(Api::<Mesh>::all(client.clone())).await,
        count(Api::<Microservice>::all(client.clone())).await,
        count(Api::<EdgeNode>::all(client.clone())).await
    )
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

/// The agent counts from `--agents 1,100` (or `--agents=1,100`), else [`DEFAULT_AGENTS`].
fn agent_counts(args: &[String]) -> Result<Vec<usize>, String> {
    let mut counts = DEFAULT_AGENTS.to_vec();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let list = match arg.strip_prefix("--agents") {
            Some("") => rest.next().map(String::as_str).unwrap_or_default(),
            Some(value) if value.starts_with('=') => &value[1..],
            _ if arg == "--bench" => continue,
            _ => return Err(format!("unknown argument {arg:?}; the sync benchmark takes --agents 1,100,1000")),
        };
        counts = list
            .split(',')
            .map(|n| n.trim().parse().ok().filter(|&n: &usize| n > 0))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| format!("--agents {list:?}: expected positive counts separated by commas, e.g. 1,100"))?;
    }
    Ok(counts)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Store throughput in both modes.
struct StoreFigures {
    one_per_call: f64,
    batched: f64,
    value_bytes: usize,
}

impl StoreFigures {
    fn report(&self) -> String {
        format!(
            "metamanager upserts/s (real SQLite file, WAL, synchronous=FULL, {UPSERTS} each, {}-byte values): \
             one transaction per message {:.0}, batched ({MAX_BATCH}) {:.0} ({:.0}x)",
            self.value_bytes,
            self.one_per_call,
            self.batched,
            self.batched / self.one_per_call
        )
    }
}

/// Writes [`UPSERTS`] new resources one per `apply`, then as many in batches of [`MAX_BATCH`].
fn store_bench() -> Result<StoreFigures, String> {
    // A temp dir on disk, not tmpfs-backed memory: each commit's fsync is the cost measured.
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let mut store = Store::open(dir.path().join("agent.db")).map_err(|e| e.to_string())?;
    let changes = (0..2 * UPSERTS).map(upsert).collect::<Result<Vec<_>, _>>()?;
    let value_bytes = match &changes[0] {
        Change::Upsert { value, .. } => value.len(),
        Change::Delete { .. } => 0,
    };
    let (single, batched) = changes.split_at(UPSERTS);

    let start = std::time::Instant::now();
    for change in single {
        store.apply(std::slice::from_ref(change)).map_err(|e| e.to_string())?;
    }
    let single_time = start.elapsed();
    let start = std::time::Instant::now();
    for chunk in batched.chunks(MAX_BATCH) {
        store.apply(chunk).map_err(|e| e.to_string())?;
    }
    let batched_time = start.elapsed();

    // Not a timing check: a rate of writes that never happened would be meaningless.
    let written = store.stats().rows_written;
    if written != 2 * UPSERTS as u64 {
        return Err(format!("expected {} rows written, the store wrote {written}", 2 * UPSERTS));
    }
    Ok(StoreFigures {
        one_per_call: UPSERTS as f64 / single_time.as_secs_f64(),
        batched: UPSERTS as f64 / batched_time.as_secs_f64(),
        value_bytes,
    })
}

/// Upsert of a new resource `i` holding what the cloud sends for a typical microservice.
fn upsert(i: usize) -> Result<Change, String> {
    let name = format!("svc-{i:05}");
    let assignment: Assignment = serde_json::from_value(serde_json::json!({
        "namespace": "bench",
        "name": name,
        "uid": format!("3f9c1d2e-8a47-4b6e-9c0d-{i:012x}"),
        "generation": 1,
        "spec": {
            "mesh": "home",
            "command": ["/usr/bin/python3", "-m", "http.server", "8080"],
            "args": ["--bind", "0.0.0.0"],
            "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "REPORT_INTERVAL", "value": "10"}],
            "ports": [{"name": "http", "port": 8080}],
            "healthCheck": {"http": {"path": "/healthz", "port": 8080}, "periodSeconds": 5, "failureThreshold": 3},
            "restartPolicy": "Always"
        }
    }))
    .map_err(|e| format!("the sample assignment does not match the protocol: {e}"))?;
    let value = serde_json::to_string(&assignment).map_err(|e| e.to_string())?;
    Ok(Change::Upsert {
        key: assignment.resource(),
        res_type: protocol::MICROSERVICE.into(),
        version: assignment.version(),
        value,
    })
}

/// One row of the sync table.
struct SyncFigures {
    connect: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    all_acked: Duration,
    idle_rss: u64,
    rss: u64,
}

/// What a simulated agent reports to the benchmark.
enum Event {
    /// The session is up: hello sent, welcome read.
    Connected,
    /// The agent gave up connecting.
    Failed(String),
    /// A change arrived (at `received`) and was acked (at `acked`).
    Change { node: usize, resource: String, version: String, received: Instant, acked: Instant },
    /// The cloudhub sent an Error message.
    CloudError(usize, String),
    /// The session ended.
    Closed(usize, String),
}

/// Everything the simulated agents reported so far.
struct Tally {
    agents: usize,
    resource: String,
    connected: usize,
    failed: Vec<String>,
    /// First receipt and ack of each version, by node.
    deliveries: HashMap<String, HashMap<usize, (Instant, Instant)>>,
    /// Deliveries beyond the first of a version to a node (resends), by version.
    duplicates: HashMap<String, usize>,
    others: Vec<String>,
    cloud_errors: Vec<String>,
    closed: Vec<String>,
}

impl Tally {
    fn record(&mut self, event: Event) {
        match event {
            Event::Connected => self.connected += 1,
            Event::Failed(reason) => self.failed.push(reason),
            Event::Change { node, resource, version, received, acked } => {
                if resource != self.resource {
                    self.others.push(format!("{resource} {version}"));
                    return;
                }
                let nodes = self.deliveries.entry(version.clone()).or_default();
                match nodes.entry(node) {
                    Entry::Vacant(first) => {
                        first.insert((received, acked));
                    }
                    Entry::Occupied(_) => *self.duplicates.entry(version).or_default() += 1,
                }
            }
            Event::CloudError(node, message) => self.cloud_errors.push(format!("agent {node}: {message}")),
            Event::Closed(node, reason) => self.closed.push(format!("agent {node}: {reason}")),
        }
    }

    /// Receives events until `done` holds (true) or `deadline` passes (false).
    async fn until(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        deadline: Instant,
        done: impl Fn(&Tally) -> bool,
    ) -> bool {
        while !done(self) {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => self.record(event),
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    fn received(&self, version: &str) -> usize {
        self.deliveries.get(version).map_or(0, HashMap::len)
    }

    /// Why agents are missing, for error messages.
    fn trouble(&self) -> String {
        let sample = |v: &[String]| v.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
        let mut parts = Vec::new();
        if !self.failed.is_empty() {
            parts.push(format!("{} failed to connect (e.g. {})", self.failed.len(), sample(&self.failed)));
        }
        if !self.closed.is_empty() {
            parts.push(format!("{} sessions ended (e.g. {})", self.closed.len(), sample(&self.closed)));
        }
        if !self.cloud_errors.is_empty() {
            parts.push(format!(
                "{} errors from the cloudhub (e.g. {})",
                self.cloud_errors.len(),
                sample(&self.cloud_errors)
            ));
        }
        if parts.is_empty() {
            "every session is up and no agent saw an error: the controller did not send it".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Runs the sync benchmark with `n` simulated agents against a fresh controller and namespace;
/// what is worth knowing besides the figures goes to `notes`, also when the run fails.
async fn sync_bench(cluster: &Cluster, n: usize, notes: &mut Vec<String>) -> Result<SyncFigures, String> {
    let ns = cluster.namespace("bench-sync");
    let controller = Controller::start(&format!("bench-sync-{n}"));
    controller.wait_ready().await;
    let token = join_token(&cluster.client).await;
    let id = unique();
    let account = format!("bench-{id}");
    let mesh = format!(
        "apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {{name: {MESH}}}\nspec: {{type: Account, account: {account}}}\n"
    );
    apply_yaml(&mesh, &["-n", &ns]).map_err(|e| format!("cannot create the mesh: {e}"))?;
    let idle_rss = rss(controller.pid())?;

    let names: Vec<String> = (0..n).map(|i| format!("bench-{id}-{i}")).collect();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (stop, stopped) = watch::channel(false);
    let mut tally = Tally {
        agents: n,
        resource: protocol::ResourceRef::string(&ns, protocol::MICROSERVICE, MSVC),
        connected: 0,
        failed: Vec::new(),
        deliveries: HashMap::new(),
        duplicates: HashMap::new(),
        others: Vec::new(),
        cloud_errors: Vec::new(),
        closed: Vec::new(),
    };
    let mut sessions = JoinSet::new();
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    for (i, name) in names.iter().enumerate() {
        // Ten nodes per network, all in one account: the Account mesh holds them all.
        let yaml = format!(
            "node: {{name: {name}, account: {account}, network: net-{id}-{}}}\ncloud: {{address: \"{}\", token: \"{token}\"}}\n",
            i / 10,
            controller.cloudhub_addr
        );
        let config = supermesh_agent::config::parse(&yaml, "edge.yaml").map_err(|e| e.to_string())?;
        let agent = SimulatedAgent { index: i, config, events: events_tx.clone(), stop: stopped.clone() };
        sessions.spawn(agent.run(permits.clone(), started + CONNECT_LIMIT));
    }
    drop(events_tx);

    let result = measure(cluster, &controller, &ns, &mut tally, &mut events, started, notes).await;
    if result.is_err() {
        if let Ok(bytes) = rss(controller.pid()) {
            notes.push(format!("controller RSS when the run failed: {:.1} MiB", mib(bytes)));
        }
    }

    // Clean up whatever happened: sessions, microservice, EdgeNodes (their finalizers need
    // this controller), namespace; only then stop the controller.
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), sessions.join_all()).await;
    let leftovers = cleanup(cluster, &ns, &names).await;
    controller.stop();
    notes.extend(leftovers);
    result.map(|figures| SyncFigures { idle_rss, ..figures })
}

/// Connection, delivery of the first version, then the timed changes.
async fn measure(
    cluster: &Cluster,
    controller: &Controller,
    ns: &str,
    tally: &mut Tally,
    events: &mut mpsc::UnboundedReceiver<Event>,
    started: Instant,
    notes: &mut Vec<String>,
) -> Result<SyncFigures, String> {
    let n = tally.agents;
    let connect_deadline = started + CONNECT_LIMIT;
    tally.until(events, connect_deadline, |t| t.connected + t.failed.len() >= n).await;
    if tally.connected < n {
        return Err(format!(
            "only {} of {n} agents connected within {} s: {}",
            tally.connected,
            CONNECT_LIMIT.as_secs(),
            tally.trouble()
        ));
    }
    let mut seen = None;
    while Instant::now() < connect_deadline {
        seen = controller.metric(AGENTS_METRIC, "");
        if seen == Some(n as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if seen != Some(n as f64) {
        return Err(format!(
            "all {n} agents got a welcome but the controller counts {seen:?} connected ({AGENTS_METRIC}) after {} s",
            CONNECT_LIMIT.as_secs()
        ));
    }
    let connect = started.elapsed();

    let place_deadline = Instant::now() + PLACE_LIMIT;
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), ns);
    let created = Instant::now();
    apply_yaml(&microservice(MSVC, MESH, ""), &["-n", ns])
        .map_err(|e| format!("cannot create the microservice: {e}"))?;
    let first = msvcs.get(MSVC).await.map_err(|e| format!("cannot read the microservice back: {e}"))?;
    let version = assignment_version(&first);
    if !tally.until(events, place_deadline, |t| t.received(&version) >= n).await {
        return Err(format!(
            "only {} of {n} agents received the new microservice ({version}) {:.0} s after it was created: {}",
            tally.received(&version),
            created.elapsed().as_secs_f64(),
            tally.trouble()
        ));
    }
    notes.push(format!(
        "all {n} agents had the new microservice {:.1} s after it was created (kubectl apply)",
        created.elapsed().as_secs_f64()
    ));
    notes.push(settle(controller).await);

    let mut latencies = Vec::with_capacity(n * CHANGES);
    let mut all_acked = Vec::with_capacity(CHANGES);
    for k in 1..=CHANGES {
        let patch = serde_json::json!({"spec": {"args": [format!("change-{k}")]}});
        let written = Instant::now();
        let changed = msvcs
            .patch(MSVC, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("change {k}: patch failed: {e}"))?;
        let version = assignment_version(&changed);
        if !tally.until(events, written + DELIVERY_LIMIT, |t| t.received(&version) >= n).await {
            return Err(format!(
                "change {k}: only {} of {n} agents received {version} within {} s: {}",
                tally.received(&version),
                DELIVERY_LIMIT.as_secs(),
                tally.trouble()
            ));
        }
        let deliveries = &tally.deliveries[&version];
        latencies.extend(deliveries.values().map(|(received, _)| received.duration_since(written)));
        let last_ack = deliveries.values().map(|(_, acked)| *acked).max().unwrap_or(written);
        all_acked.push(last_ack.duration_since(written));
        eprintln!("    change {k}: all {n} agents acked after {:.1} ms", ms(last_ack.duration_since(written)));
    }
    let rss = rss(controller.pid())?;
    notes.extend(check_counts(controller, tally, events).await);

    latencies.sort();
    all_acked.sort();
    Ok(SyncFigures {
        connect,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        all_acked: percentile(&all_acked, 0.50),
        idle_rss: 0,
        rss,
    })
}

/// Waits until the controller stops writing status (the placement just made changes every
/// EdgeNode's instance count), so that the timed changes measure the change path in a steady
/// state rather than the tail of that burst. Returns a note saying how long it took.
async fn settle(controller: &Controller) -> String {
    let writes = || -> f64 {
        ["EdgeNode", "Microservice", "Mesh"]
            .iter()
            .filter_map(|kind| controller.metric(STATUS_WRITES_METRIC, &format!("kind=\"{kind}\"")))
            .sum()
    };
    let started = Instant::now();
    let initial = writes();
    let (mut last, mut since) = (initial, Instant::now());
    while since.elapsed() < QUIET {
        if started.elapsed() > SETTLE_LIMIT {
            let rate = (writes() - initial) / started.elapsed().as_secs_f64();
            return format!(
                "the controller never stopped writing status for {} s within {} s after placement ({rate:.1} \
                 writes/s on average); the changes were timed anyway",
                QUIET.as_secs(),
                SETTLE_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = writes();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    format!(
        "placement settled {:.1} s after every agent had the microservice ({last} status writes so far, then none for {} s)",
        (started.elapsed() - QUIET).as_secs_f64(),
        QUIET.as_secs()
    )
}

/// Not timings: whether the controller sent and counted exactly one change per agent and
/// version, and whether anything unexpected arrived. Anomalies become notes under the table.
async fn check_counts(
    controller: &Controller,
    tally: &mut Tally,
    events: &mut mpsc::UnboundedReceiver<Event>,
) -> Vec<String> {
    let expected = (tally.agents * (CHANGES + 1)) as f64;
    let mut acked = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        acked = controller.metric(ACKED_METRIC, "");
        if acked >= Some(expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Late duplicates (resends) are in the channel by now if there are any.
    while let Ok(event) = events.try_recv() {
        tally.record(event);
    }
    let mut notes = Vec::new();
    if acked != Some(expected) {
        notes.push(format!("the controller counted {acked:?} acks ({ACKED_METRIC}), {expected} were sent"));
    }
    let sent = controller.metric(SENT_METRIC, "");
    if sent != Some(expected) {
        notes.push(format!("the controller sent {sent:?} changes ({SENT_METRIC}) where {expected} suffice"));
    }
    if !tally.duplicates.is_empty() {
        // Generation 1 is the insert, generation k + 1 the k-th timed change.
        let mut by_generation: Vec<(String, usize)> = tally
            .duplicates
            .iter()
            .map(|(v, count)| (v.split('-').next().unwrap_or_default().to_owned(), *count))
            .collect();
        by_generation.sort();
        let listed: Vec<String> = by_generation.iter().map(|(g, c)| format!("generation {g}: {c}")).collect();
        notes.push(format!(
            "{} changes reached an agent again after it had acked them (resends; {})",
            by_generation.iter().map(|(_, c)| c).sum::<usize>(),
            listed.join(", ")
        ));
    }
    if !tally.others.is_empty() {
        notes.push(format!("{} changes of other resources arrived, e.g. {}", tally.others.len(), tally.others[0]));
    }
    if !tally.cloud_errors.is_empty() || !tally.closed.is_empty() {
        notes.push(tally.trouble());
    }
    notes
}

/// The version the cloud sends for `msvc`, as [`Assignment::version`] writes it.
fn assignment_version(msvc: &Microservice) -> String {
    format!("{}-{}", msvc.metadata.generation.unwrap_or_default(), msvc.uid().unwrap_or_default())
}

/// Nearest-rank percentile `q` of sorted `samples`.
fn percentile(samples: &[Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Resident memory (VmRSS) of process `pid`, in bytes.
fn rss(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the memory use of the controller (pid {pid}): {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status; did the controller exit?"))
}

/// Deletes what a run created; returns what could not be removed in time.
async fn cleanup(cluster: &Cluster, ns: &str, names: &[String]) -> Vec<String> {
    let mut notes = Vec::new();
    // Explicit deletes: a namespace's contents are removed by kube-controller-manager, which the
    // local control plane does not run, and only a running controller removes the finalizers.
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), ns);
    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), ns);
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let _ = msvcs.delete(MSVC, &DeleteParams::default()).await;
    let _ = meshes.delete(MESH, &DeleteParams::default()).await;
    delete_all(&nodes, names).await;
    let ours: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let deadline = Instant::now() + CLEANUP_LIMIT;
    loop {
        let msvc_left = msvcs.get_opt(MSVC).await.ok().flatten().is_some();
        let mesh_left = meshes.get_opt(MESH).await.ok().flatten().is_some();
        let nodes_left = match nodes.list(&ListParams::default()).await {
            Ok(list) => list.items.iter().filter(|n| ours.contains(n.name_any().as_str())).count(),
            Err(_) => names.len(),
        };
        if !msvc_left && !mesh_left && nodes_left == 0 {
            break;
        }
        if Instant::now() > deadline {
            notes.push(format!(
                "cleanup: after {} s, left in {ns}: microservice {msvc_left}, mesh {mesh_left}; \
                 {nodes_left} EdgeNodes remain (finalizers)",
                CLEANUP_LIMIT.as_secs(),
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = supermesh_tests::try_kubectl(&["delete", "namespace", ns, "--wait=false"]);
    notes
}

/// One simulated agent: a session that acks every change at once and does nothing else.
struct SimulatedAgent {
    index: usize,
    config: EdgeConfig,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
}

impl SimulatedAgent {
    /// Connects (holding one of `permits` until welcomed, retrying until `deadline`), then serves.
    async fn run(mut self, permits: Arc<Semaphore>, deadline: Instant) {
        let ws = {
            let Ok(_permit) = permits.acquire().await else { return };
            match self.join(deadline).await {
                Ok(ws) => ws,
                Err(reason) => {
                    let _ = self.events.send(Event::Failed(format!("{}: {reason}", self.config.node.name)));
                    return;
                }
            }
        };
        let _ = self.events.send(Event::Connected);
        let reason = self.serve(ws).await;
        let _ = self.events.send(Event::Closed(self.index, reason));
    }

    async fn join(&self, deadline: Instant) -> Result<Ws, String> {
        let mut last = "no attempt before the deadline".to_string();
        while Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, self.handshake()).await {
                Ok(Ok(ws)) => return Ok(ws),
                Ok(Err(e)) => last = e,
                Err(_) => return Err(format!("timed out; last error: {last}")),
            }
            tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_secs(1))).await;
        }
        Err(last)
    }

    /// Dials, says hello holding nothing, and reads the welcome.
    async fn handshake(&self) -> Result<Ws, String> {
        let mut ws = edgehub::dial(&self.config).await.map_err(|e| e.to_string())?;
        let mut hello = edgehub::hello(&self.config, Default::default());
        hello.agent_version = format!("bench-{}", hello.agent_version);
        let hello =
            Message::new(format!("b{}-0", self.index), now_ms(), Operation::NodeConnection, CONNECTION_RESOURCE, hello);
        send(&mut ws, &hello).await?;
        let frame = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .map_err(|_| "no welcome within 15 s".to_string())?
            .ok_or("closed before the welcome")?
            .map_err(|e| e.to_string())?;
        let msg = protocol::decode(&frame.into_text().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        match msg.operation {
            Operation::NodeConnection => match msg.body() {
                Ok(protocol::Body::NodeConnection(protocol::Connection::Welcome(_))) => Ok(ws),
                other => Err(format!("not a welcome: {other:?}")),
            },
            Operation::Error => match msg.body() {
                Ok(protocol::Body::Error(refusal)) => Err(refusal.message),
                other => Err(format!("{other:?}")),
            },
            other => Err(format!("expected a welcome, got {other:?}")),
        }
    }

    /// Acks every change as soon as it arrives and keeps the session alive, until stopped.
    async fn serve(&mut self, mut ws: Ws) -> String {
        let mut keepalive = tokio::time::interval_at(Instant::now() + KEEPALIVE, KEEPALIVE);
        let mut counter = 0u64;
        loop {
            tokio::select! {
                frame = ws.next() => {
                    let received = Instant::now();
                    let text = match frame {
                        Some(Ok(Frame::Text(text))) => text,
                        Some(Ok(Frame::Close(_))) | None => return "closed by the cloudhub".into(),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return format!("stream failed: {e}"),
                    };
                    let msg = match protocol::decode(&text) {
                        Ok(msg) => msg,
                        Err(e) => {
                            let _ = self.events.send(Event::CloudError(self.index, format!("undecodable message: {e}")));
                            continue;
                        }
                    };
                    if msg.operation == Operation::Error {
                        let reason = match msg.body() {
                            Ok(protocol::Body::Error(refusal)) => refusal.message,
                            other => format!("{other:?}"),
                        };
                        let _ = self.events.send(Event::CloudError(self.index, reason));
                    }
                    if !msg.operation.is_change() {
                        continue;
                    }
                    // The ack a real agent sends after its commit, with no commit in between.
                    counter += 1;
                    let mut ack = Message::new(format!("b{}-{counter}", self.index), now_ms(), Operation::Response, &msg.resource, ())
                        .answering(&msg.id);
                    ack.resource_version = msg.resource_version.clone();
                    if let Err(e) = send(&mut ws, &ack).await {
                        return format!("ack failed: {e}");
                    }
                    let _ = self.events.send(Event::Change {
                        node: self.index,
                        resource: msg.resource,
                        version: msg.resource_version.unwrap_or_default(),
                        received,
                        acked: Instant::now(),
                    });
                }
                _ = keepalive.tick() => {
                    counter += 1;
                    let ping = Message::new(format!("b{}-{counter}", self.index), now_ms(), Operation::Keepalive, CONNECTION_RESOURCE, ());
                    if let Err(e) = send(&mut ws, &ping).await {
                        return format!("keepalive failed: {e}");
                    }
                }
                _ = self.stop.changed() => {
                    let _ = ws.close(None).await;
                    return "stopped by the benchmark".into();
                }
            }
        }
    }
}

async fn send(ws: &mut Ws, msg: &Message) -> Result<(), String> {
    let text = protocol::encode(msg).map_err(|e| e.to_string())?;
    ws.send(Frame::text(text)).await.map_err(|e| e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
