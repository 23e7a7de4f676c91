//! `cargo xtask bench supernode`: figures for reporting through supernodes. A benchmark
//! reports; it never passes or fails on timings.
//!
//! 1. Upstream report load at the cloud: N simulated nodes in networks of S (one process,
//!    real authenticated sessions to a fresh release controller each run, opened with
//!    `edgehub::dial` and a hello, so every node is a real EdgeNode of its network), each
//!    reporting its instance status every interval. Without supernodes every node sends its
//!    own report; with supernodes one node per network sends its network's reports in one
//!    batch built with the agent's relay queue, and the others only keep their sessions
//!    alive. Measured at the cloud with the controller's report counters, CPU and memory,
//!    over a window after a warm-up.
//! 2. Failover with real agents: real `supermesh-agent` processes on one network; the
//!    supernode is killed with SIGKILL, and the time until the survivors agree on the next
//!    one, the heartbeats that took, and the time until the controller shows its role are
//!    measured.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use kube::api::{Api, DeleteParams, ListParams};
use kube::ResourceExt;
use supermesh_agent::config::EdgeConfig;
use supermesh_agent::edgehub::{self, Ws};
use supermesh_agent::supernode::relay::Queue;
use supermesh_api::EdgeNode;
use supermesh_protocol::peer::Registry;
use supermesh_protocol::{self as protocol, Answer, Body, Change, NodeRole};
use supermesh_protocol::{
    self, ClusterView, InstanceReport, Membership, Message, Operation, RelayedReport, StatusReport, BATCH_RESOURCE,
    CONNECTION_RESOURCE, OUTBOX_ID_PREFIX, STATUS_RESOURCE,
};
use supermesh_tests::{join_token, unique, Agent, Cluster, Controller};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as Frame;

/// Defaults of the flags.
const DEFAULT_NODES: usize = 1000;
const DEFAULT_CLUSTER_SIZE: usize = 10;
const DEFAULT_INTERVAL: f64 = 10.0;
const DEFAULT_WINDOW: f64 = 60.0;
const DEFAULT_FAILOVER_AGENTS: usize = 10;
const DEFAULT_ROUNDS: usize = 3;

/// Instances in each simulated status report, for a realistic size.
const INSTANCES: usize = 3;
/// Sessions opening at once; the cloudhub allows 64 concurrent handshakes.
const CONNECTING_AT_ONCE: usize = 50;
/// A simulated node sends a keepalive after this long without sending anything
/// (the cloudhub drops a session silent for 45 s).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long all simulated nodes may take to connect.
const CONNECT_LIMIT: Duration = Duration::from_secs(180);
/// How long the controller must write no status before the reports start.
const QUIET: Duration = Duration::from_secs(2);
/// How long to wait for that quiet.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// Shortest warm-up between the first reports and the window: the controller writes the
/// EdgeNode changes the first reports cause (roles, with supernodes) before it is measured.
const MIN_WARMUP: Duration = Duration::from_secs(20);
/// Lines of the controller's log shown when a run fails.
const LOG_LINES: usize = 6;
/// How long the cloud may take to send every node a membership listing its whole network.
const MEMBERSHIP_LIMIT: Duration = Duration::from_secs(60);
/// How often the window's progress is shown.
const PROGRESS: Duration = Duration::from_secs(10);
/// How long the answers to the last reports may take after the window.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);
/// Deleting the benchmark's EdgeNodes (finalizers removed by the controller) goes on while
/// their number falls at least once in this long; after the first such stall the
/// controller is restarted (a fresh one finalizes every deleted node at start).
const CLEANUP_STALL: Duration = Duration::from_secs(30);
/// Largest batch, in entries and bytes, as the agent's supernode sends them.
const MAX_BATCH_ENTRIES: usize = 512;
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Reports the simulated supernode's relay queue holds at most (the agent's limit).
const QUEUE_LIMIT: usize = 20_000;

/// Failover: time between agent starts (the election prefers the longest uptime).
const START_GAP: Duration = Duration::from_millis(200);
/// Failover: how often the agents' registries and the EdgeNodes are read.
const POLL: Duration = Duration::from_millis(50);
/// Failover: how long the first election, and each failover, may take.
const ELECTION_LIMIT: Duration = Duration::from_secs(90);
const FAILOVER_LIMIT: Duration = Duration::from_secs(60);

/// Requests for /metrics tried before a reading fails.
const METRICS_TRIES: usize = 6;
const STATUS_WRITES_METRIC: &str = "supermesh_controller_status_writes_total";
const RECONCILES_METRIC: &str = "supermesh_controller_reconciliations_total";
const AGENTS_METRIC: &str = "supermesh_controller_cloudhub_agents";
const REPORT_MESSAGES_METRIC: &str = "supermesh_report_messages_total";
const REPORT_BYTES_METRIC: &str = "supermesh_report_bytes_total";
const REPORTS_METRIC: &str = "supermesh_reports_total";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; a bench target run by `cargo test --all-targets` gets no
    // arguments, and a test run must not start a benchmark of several minutes.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("bench supernode: skipped outside `cargo bench`; run it with `cargo xtask bench supernode`");
        return;
    }
    let plan = Plan::parse(&args).unwrap_or_else(|e| fail(&e));
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| fail(&format!("cannot start tokio: {e}")));
    let report = runtime.block_on(async {
        let cluster = Cluster::connect().await;
        let population = population(&cluster).await;
        let load = if plan.load { Some(load_bench(&cluster, &plan).await) } else { None };
        let failover = if plan.failover { Some(failover_bench(&cluster, &plan).await) } else { None };
        (population, load, failover)
    });
    let (population, load, failover) = report;
    println!();
    println!("{population}");
    let mut failed = false;
    if let Some(load) = load {
        println!();
        failed |= load.print(&plan);
    }
    if let Some(failover) = failover {
        println!();
        failed |= failover.print(&plan);
    }
    if failed {
        std::process::exit(1);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

/// What to run, from the flags.
struct Plan {
    nodes: usize,
    cluster_size: usize,
    interval: Duration,
    window: Duration,
    failover_agents: usize,
    rounds: usize,
    /// Reports before the window; `None`: the interval, at least [`MIN_WARMUP`].
    warmup: Option<Duration>,
    load: bool,
    failover: bool,
}

impl Plan {
    const USAGE: &str = "the supernode benchmark takes --nodes 1000 --cluster-size 10 --interval 10 --window 60 \
                         --warmup 20 (seconds) --failover-agents 10 --rounds 3 --only load|failover";

    fn parse(args: &[String]) -> Result<Plan, String> {
        let mut plan = Plan {
            nodes: DEFAULT_NODES,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            interval: Duration::from_secs_f64(DEFAULT_INTERVAL),
            window: Duration::from_secs_f64(DEFAULT_WINDOW),
            failover_agents: DEFAULT_FAILOVER_AGENTS,
            rounds: DEFAULT_ROUNDS,
            warmup: None,
            load: true,
            failover: true,
        };
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            if arg == "--bench" {
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_owned())),
                None => (arg.as_str(), None),
            };
            let mut value =
                || inline.clone().or_else(|| rest.next().cloned()).ok_or_else(|| format!("{flag} needs a value"));
            let count = |v: String| -> Result<usize, String> {
                v.trim()
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .ok_or_else(|| format!("{flag} {v:?}: expected a positive count"))
            };
            let seconds = |v: String| -> Result<Duration, String> {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("{flag} {v:?}: expected a positive number of seconds"))
            };
            match flag {
                "--nodes" => plan.nodes = count(value()?)?,
                "--cluster-size" => plan.cluster_size = count(value()?)?,
                "--interval" => plan.interval = seconds(value()?)?,
                "--window" => plan.window = seconds(value()?)?,
                "--warmup" => plan.warmup = Some(seconds(value()?)?),
                "--failover-agents" => plan.failover_agents = count(value()?)?,
                "--rounds" => plan.rounds = count(value()?)?,
                "--only" => match value()?.as_str() {
                    "load" => plan.failover = false,
                    "failover" => plan.load = false,
                    other => return Err(format!("--only {other:?}: expected load or failover")),
                },
                _ => return Err(format!("unknown argument {arg:?}; {}", Plan::USAGE)),
            }
        }
        if plan.cluster_size < 2 {
            return Err("--cluster-size must be at least 2: a supernode and a member".into());
        }
        if plan.rounds >= plan.failover_agents {
            return Err(format!(
                "--rounds {} kills that many agents: it needs more than --failover-agents {}",
                plan.rounds, plan.failover_agents
            ));
        }
        Ok(plan)
    }

    fn warmup(&self) -> Duration {
        self.warmup.unwrap_or(self.interval.max(MIN_WARMUP))
    }

    fn networks(&self) -> usize {
        self.nodes.div_ceil(self.cluster_size)
    }
}

/// How many supermesh objects the cluster already holds, for the report.
async fn population(cluster: &Cluster) -> String {
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let count =
        nodes.list(&ListParams::default()).await.map_or_else(|e| format!("? ({e})"), |l| l.items.len().to_string());
    format!("cluster before the benchmark: {count} EdgeNodes (every controller started here reconciles them all)")
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident memory (VmRSS) of process `pid`, in bytes.
fn rss(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the memory use of pid {pid}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status; did the process exit?"))
}

/// CPU time (user + system) process `pid` (or "self") used so far, in seconds.
fn cpu_seconds(pid: &str) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read the CPU use of pid {pid}: {e}"))?;
    // The command name may hold spaces; the fields after it start with the state (field 3).
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(utime), Some(stime)) => Ok((utime + stime) as f64 / clock_ticks()),
        _ => Err(format!("unexpected /proc/{pid}/stat: {stat}")),
    }
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

// ---------------------------------------------------------------------------------------
// Part 1: upstream report load
// ---------------------------------------------------------------------------------------

/// How reports go upstream in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Every node sends its own report.
    Direct,
    /// One node per network sends its network's reports in one batch.
    Batch,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "without supernodes",
            Mode::Batch => "with supernodes",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Batch => "batch",
        }
    }
}

/// The simulated nodes, the same in both runs: node `i` is on network `i / cluster_size`.
struct Fleet {
    account: String,
    names: Vec<String>,
    networks: Vec<String>,
    cluster_size: usize,
}

impl Fleet {
    fn new(plan: &Plan) -> Fleet {
        let id = unique();
        Fleet {
            account: format!("bench-{id}"),
            names: (0..plan.nodes)
                .map(|i| format!("bench-{id}-{}-{}", i / plan.cluster_size, i % plan.cluster_size))
                .collect(),
            networks: (0..plan.networks()).map(|k| format!("bench-net-{k}")).collect(),
            cluster_size: plan.cluster_size,
        }
    }

    fn network_of(&self, i: usize) -> usize {
        i / self.cluster_size
    }

    /// Indexes of the nodes of network `k`, the supernode (the first) included.
    fn members(&self, k: usize) -> std::ops::Range<usize> {
        k * self.cluster_size..((k + 1) * self.cluster_size).min(self.names.len())
    }
}

/// The report counters of the controller, by path, and its work on the API server.
#[derive(Clone, Copy, Default, Debug)]
struct Counters {
    messages: [f64; 2],
    bytes: [f64; 2],
    reports: [f64; 2],
    /// Status writes to the API server and reconciles, all kinds.
    writes: f64,
    reconciles: f64,
}

impl Counters {
    const PATHS: [&str; 2] = ["direct", "batch"];

    /// Reads them from `/metrics`; a label set not counted yet is 0.
    fn read(controller: &Controller) -> Result<Counters, String> {
        // A busy controller may miss one request's 5 s limit; a few are tried.
        let mut answer = None;
        for _ in 0..METRICS_TRIES {
            answer = controller.http_get("/metrics");
            if answer.is_some() {
                break;
            }
        }
        let (code, body) = answer
            .ok_or(format!("the controller's /metrics did not answer {METRICS_TRIES} requests of 5 s each in a row"))?;
        if code != 200 {
            return Err(format!("the controller's /metrics answered {code}"));
        }
        let value = |name: &str, path: &str| {
            let prefix = format!("{name}{{path=\"{path}\"}} ");
            body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
        };
        let by_path = |name: &str| Counters::PATHS.map(|p| value(name, p));
        // Every label set of a counter.
        let sum = |name: &str| -> f64 {
            let prefix = format!("{name}{{");
            body.lines().filter_map(|l| l.strip_prefix(&prefix)?.rsplit_once("} ")?.1.trim().parse::<f64>().ok()).sum()
        };
        Ok(Counters {
            messages: by_path(REPORT_MESSAGES_METRIC),
            bytes: by_path(REPORT_BYTES_METRIC),
            reports: by_path(REPORTS_METRIC),
            writes: sum(STATUS_WRITES_METRIC),
            reconciles: sum(RECONCILES_METRIC),
        })
    }

    fn since(&self, start: &Counters) -> Counters {
        let d = |a: [f64; 2], b: [f64; 2]| [a[0] - b[0], a[1] - b[1]];
        Counters {
            messages: d(self.messages, start.messages),
            bytes: d(self.bytes, start.bytes),
            reports: d(self.reports, start.reports),
            writes: self.writes - start.writes,
            reconciles: self.reconciles - start.reconciles,
        }
    }

    fn path(&self, mode: Mode) -> usize {
        usize::from(mode == Mode::Batch)
    }
}

/// What the simulated nodes did, counted as they go.
#[derive(Default)]
struct Stats {
    connected: AtomicUsize,
    failed: Mutex<Vec<String>>,
    /// Report messages sent (direct reports or batches), the reports they carried, their bytes.
    report_messages: AtomicU64,
    reports: AtomicU64,
    report_bytes: AtomicU64,
    /// Report messages the cloud answered with a Response, and the reports acked in them.
    answered: AtomicU64,
    acked: AtomicU64,
    /// Report messages the cloud answered with an Error.
    errors: AtomicU64,
    /// Batch entries the cloud refused, and the first reasons.
    refused: AtomicU64,
    refusals: Mutex<Vec<String>>,
    keepalives: AtomicU64,
    changes_acked: AtomicU64,
    /// Nodes whose membership from the cloud lists every node of their network.
    complete_memberships: AtomicUsize,
    cloud_errors: Mutex<Vec<String>>,
    closed: Mutex<Vec<String>>,
    /// Report message sent -> its answer read, in ms.
    ack_ms: Mutex<Vec<f64>>,
}

/// A copy of the counts of [`Stats`] at one moment.
#[derive(Clone, Copy, Default, Debug)]
struct Sent {
    report_messages: u64,
    reports: u64,
    report_bytes: u64,
    answered: u64,
    acked: u64,
    errors: u64,
    refused: u64,
    keepalives: u64,
}

impl Stats {
    fn sent(&self) -> Sent {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Sent {
            report_messages: get(&self.report_messages),
            reports: get(&self.reports),
            report_bytes: get(&self.report_bytes),
            answered: get(&self.answered),
            acked: get(&self.acked),
            errors: get(&self.errors),
            refused: get(&self.refused),
            keepalives: get(&self.keepalives),
        }
    }

    fn note(list: &Mutex<Vec<String>>, what: String) {
        let mut list = lock(list);
        if list.len() < 1000 {
            list.push(what);
        }
    }

    fn trouble(&self) -> String {
        let mut parts = Vec::new();
        for (what, list) in [
            ("failed to connect", &self.failed),
            ("sessions closed", &self.closed),
            ("errors from the cloudhub", &self.cloud_errors),
        ] {
            let list = lock(list);
            if let Some(first) = list.first() {
                parts.push(format!("{} {what} (e.g. {first})", list.len()));
            }
        }
        parts.join("; ")
    }
}

/// What the benchmark tells the simulated nodes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Control {
    /// Connected: keep the session, send nothing but keepalives.
    Idle,
    /// Report every interval from this instant plus the node's phase.
    Report(Instant),
    /// Report no more, but read the answers still coming.
    Drain,
    /// Close the session.
    Stop,
}

/// What a simulated node reports.
enum Role {
    /// Its own status, every interval at its phase.
    Direct { phase: Duration },
    /// Its network's statuses in one batch every interval at its phase: it is the supernode
    /// of `members` (itself first).
    Supernode { phase: Duration, members: Vec<String> },
    /// Nothing: a member whose supernode reports for it.
    Member,
}

/// Figures of one run.
struct LoadFigures {
    mode: Mode,
    window: Duration,
    cloud: Counters,
    cpu: f64,
    rss: u64,
    simulator_cpu: f64,
    /// Counts of the simulated nodes over the window, and over the whole run.
    in_window: Sent,
    total: Sent,
    ack_p50: f64,
    ack_max: f64,
}

impl LoadFigures {
    fn rate(&self, value: f64) -> f64 {
        value / self.window.as_secs_f64()
    }

    fn messages(&self) -> f64 {
        self.cloud.messages[self.cloud.path(self.mode)]
    }

    fn bytes(&self) -> f64 {
        self.cloud.bytes[self.cloud.path(self.mode)]
    }

    fn reports(&self) -> f64 {
        self.cloud.reports[self.cloud.path(self.mode)]
    }
}

/// Both runs' results and notes.
struct LoadReport {
    runs: Vec<(Mode, Result<LoadFigures, String>)>,
    notes: Vec<String>,
}

impl LoadReport {
    /// Prints the table and notes; returns whether a run failed.
    fn print(&self, plan: &Plan) -> bool {
        println!(
            "upstream report load at the cloud: {} simulated nodes in {} networks of {}, a status report ({INSTANCES} \
             instances) per node every {:.0} s, measured over {:.0} s after {:.0} s of warm-up;\ncontroller: the \
             build in SUPERMESH_BIN_DIR (release under cargo xtask bench), a fresh process and fresh EdgeNodes per \
             run; simulator: this process (release)",
            plan.nodes,
            plan.networks(),
            plan.cluster_size,
            plan.interval.as_secs_f64(),
            plan.window.as_secs_f64(),
            plan.warmup().as_secs_f64()
        );
        println!(
            "run                  report msgs/s    KiB/s  reports/s  B/report  ctrl CPU s (%)  ctrl RSS MiB  \
             writes/s  reconciles/s  acked/sent  refused"
        );
        let mut failed = false;
        let mut ok = Vec::new();
        for (mode, run) in &self.runs {
            match run {
                Ok(f) => {
                    println!(
                        "{:<19}  {:>13.1}  {:>7.1}  {:>9.1}  {:>8.0}  {:>6.2} ({:>4.1}%)  {:>12.1}  {:>8.1}  {:>12.1}  \
                         {:>10}  {:>7}",
                        mode.label(),
                        f.rate(f.messages()),
                        f.rate(f.bytes()) / 1024.0,
                        f.rate(f.reports()),
                        if f.reports() > 0.0 { f.bytes() / f.reports() } else { 0.0 },
                        f.cpu,
                        100.0 * f.cpu / f.window.as_secs_f64(),
                        mib(f.rss),
                        f.rate(f.cloud.writes),
                        f.rate(f.cloud.reconciles),
                        format!("{}/{}", f.total.acked, f.total.reports),
                        f.total.refused
                    );
                    ok.push(f);
                }
                Err(e) => {
                    failed = true;
                    println!("{:<19}  failed: {e}", mode.label());
                }
            }
        }
        if let [without, with] = ok.as_slice() {
            let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.1}x", a / b) } else { "-".into() };
            println!(
                "{:<19}  {:>13}  {:>7}  {:>9}  {:>8}  {:>14}",
                "without/with",
                ratio(without.rate(without.messages()), with.rate(with.messages())),
                ratio(without.rate(without.bytes()), with.rate(with.bytes())),
                ratio(without.rate(without.reports()), with.rate(with.reports())),
                "",
                ratio(without.cpu, with.cpu)
            );
        }
        println!(
            "report msgs, KiB and reports: the controller's supermesh_report_messages_total, supermesh_report_bytes_total \
             and supermesh_reports_total\n(path=\"direct\" without, path=\"batch\" with supernodes) over the window; CPU: \
             utime+stime of the controller over the window (% of one core);\nRSS: VmRSS at the end of the window; \
             writes, reconciles: the controller's status writes to the API server and reconciles (all kinds) over the \
             window;\nacked/sent: reports the cloud acknowledged / reports sent, over the whole run (warm-up and window)"
        );
        for f in &ok {
            let w = &f.in_window;
            println!(
                "{}: the simulator sent {} report messages ({} reports, {:.1} KiB) and {} keepalives in the window, \
                 so {:.1} messages/s from agents in all; answers {:.1} ms median, {:.1} ms max (send to ack read); \
                 simulator CPU {:.1} s",
                f.mode.label(),
                w.report_messages,
                w.reports,
                w.report_bytes as f64 / 1024.0,
                w.keepalives,
                f.rate((w.report_messages + w.keepalives) as f64),
                f.ack_p50,
                f.ack_max,
                f.simulator_cpu
            );
        }
        for note in &self.notes {
            println!("note: {note}");
        }
        failed
    }
}

/// Runs both load runs against a fresh controller each, then removes the EdgeNodes.
async fn load_bench(cluster: &Cluster, plan: &Plan) -> LoadReport {
    let mut notes = Vec::new();
    let mut runs = Vec::new();
    for mode in [Mode::Direct, Mode::Batch] {
        // Both runs start alike: a fresh controller, and nodes it registers from their hellos.
        let fleet = Fleet::new(plan);
        eprintln!("==> report load {}: {} simulated nodes", mode.label(), plan.nodes);
        let mut controller = Controller::start(&format!("bench-supernode-{}", mode.path()));
        controller.wait_ready().await;
        let run = load_run(cluster, &controller, mode, plan, &fleet, &mut notes).await;
        if let Err(e) = &run {
            notes.push(format!("{}: the controller's log ends with:\n{}", mode.label(), log_end(&controller)));
            eprintln!("    failed: {e}");
        }
        runs.push((mode, run));
        // Only a running controller removes the EdgeNodes' finalizers.
        eprintln!("    removing the {} EdgeNodes", fleet.names.len());
        let removed = remove_nodes(cluster, &mut controller, &fleet.names).await;
        notes.extend(removed.into_iter().map(|note| format!("{}: {note}", mode.label())));
        controller.stop();
    }
    LoadReport { runs, notes }
}

/// One run: connect every node, wait for quiet, start the reports, warm up, measure, drain.
async fn load_run(
    cluster: &Cluster,
    controller: &Controller,
    mode: Mode,
    plan: &Plan,
    fleet: &Fleet,
    notes: &mut Vec<String>,
) -> Result<LoadFigures, String> {
    let token = join_token(&cluster.client).await;
    let stats = Arc::new(Stats::default());
    let (control, controlled) = watch::channel(Control::Idle);
    let permits = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let started = Instant::now();
    let mut sessions = JoinSet::new();
    let networks = fleet.networks.len() as f64;
    let members: Vec<Arc<BTreeSet<String>>> = (0..fleet.networks.len())
        .map(|k| Arc::new(fleet.members(k).map(|j| fleet.names[j].clone()).collect()))
        .collect();
    for (i, name) in fleet.names.iter().enumerate() {
        let k = fleet.network_of(i);
        let yaml = format!(
            "node: {{name: {name}, account: {}, network: {}}}\ncloud: {{address: \"{}\", token: \"{token}\"}}\n",
            fleet.account, fleet.networks[k], controller.cloudhub_addr
        );
        let config = supermesh_agent::config::parse(&yaml, "edge.yaml").map_err(|e| e.to_string())?;
        // Phases spread uniformly over the interval: per node without supernodes, per network with.
        let role = match mode {
            Mode::Direct => Role::Direct { phase: plan.interval.mul_f64(i as f64 / fleet.names.len() as f64) },
            Mode::Batch if fleet.members(k).start == i => Role::Supernode {
                phase: plan.interval.mul_f64(k as f64 / networks),
                members: fleet.members(k).map(|j| fleet.names[j].clone()).collect(),
            },
            Mode::Batch => Role::Member,
        };
        let node = SimNode {
            config,
            role,
            interval: plan.interval,
            stats: stats.clone(),
            control: controlled.clone(),
            seqs: HashMap::new(),
            pending: HashMap::new(),
            queue: Queue::new(QUEUE_LIMIT),
            counter: 0,
            network: members[k].clone(),
            membership_complete: false,
        };
        sessions.spawn(node.run(permits.clone(), started + CONNECT_LIMIT));
    }
    drop(controlled);

    let result = measure(controller, mode, plan, fleet, &stats, &control, started, notes, cluster).await;

    let _ = control.send(Control::Stop);
    if tokio::time::timeout(Duration::from_secs(20), sessions.join_all()).await.is_err() {
        notes.push(format!("{}: some sessions did not close within 20 s", mode.label()));
    }
    result
}

/// Waits for every session, then measures the window.
#[allow(clippy::too_many_arguments)]
async fn measure(
    controller: &Controller,
    mode: Mode,
    plan: &Plan,
    fleet: &Fleet,
    stats: &Stats,
    control: &watch::Sender<Control>,
    started: Instant,
    notes: &mut Vec<String>,
    cluster: &Cluster,
) -> Result<LoadFigures, String> {
    let n = fleet.names.len();
    let label = mode.label();
    let deadline = started + CONNECT_LIMIT;
    while stats.connected.load(Ordering::Relaxed) + lock(&stats.failed).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connected = stats.connected.load(Ordering::Relaxed);
    if connected < n {
        return Err(format!(
            "only {connected} of {n} nodes connected within {} s: {}",
            CONNECT_LIMIT.as_secs(),
            stats.trouble()
        ));
    }
    let mut seen = None;
    while Instant::now() < deadline {
        seen = controller.metric(AGENTS_METRIC, "");
        if seen == Some(n as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if seen != Some(n as f64) {
        return Err(format!(
            "all {n} nodes got a welcome but the controller counts {seen:?} connected ({AGENTS_METRIC})"
        ));
    }
    let connect = started.elapsed();
    // The cloud registers a node from its hello before it answers: every EdgeNode exists now.
    let ours: BTreeSet<&str> = fleet.names.iter().map(String::as_str).collect();
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let listed = nodes.list(&ListParams::default()).await.map_err(|e| format!("cannot list EdgeNodes: {e}"))?;
    let registered = listed.items.iter().filter(|n| ours.contains(n.name_any().as_str())).count();
    if registered < n {
        return Err(format!("all {n} nodes are connected but only {registered} have an EdgeNode"));
    }
    // The cloud authorizes a relayed report from its index of EdgeNodes; the memberships it
    // sends are built from that index, so once every node's lists its whole network, the
    // index knows every node.
    let waited = Instant::now();
    let listed = |s: &Stats| s.complete_memberships.load(Ordering::Relaxed);
    while listed(stats) < n && waited.elapsed() < MEMBERSHIP_LIMIT {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if listed(stats) < n {
        notes.push(format!(
            "{label}: only {} of {n} nodes got a membership listing their whole network within {} s; reports may be refused",
            listed(stats),
            MEMBERSHIP_LIMIT.as_secs()
        ));
    }
    let memberships = waited.elapsed().as_secs_f64();
    let settled = settle(controller).await;
    let connected = format!(
        "{n} nodes connected in {:.1} s, all with an EdgeNode, their networks' memberships complete {memberships:.1} s \
         later; {settled}",
        connect.as_secs_f64()
    );
    eprintln!("    {connected}");
    notes.push(format!("{label}: {connected}"));

    // Reports start; the window starts after the warm-up (at least one whole interval), when
    // every node (or supernode) has reported and the status changes of the first reports are written.
    let go = Instant::now() + Duration::from_millis(100);
    control.send(Control::Report(go)).map_err(|_| "every session ended".to_string())?;
    eprintln!("    reporting; warm-up {:.0} s", plan.warmup().as_secs_f64());
    tokio::time::sleep_until(go + plan.warmup() + Duration::from_millis(500)).await;
    if mode == Mode::Batch {
        // The first batches give every node a role: 1 status write each, which must not
        // spill into the window (the direct run has no such writes).
        let waited = Instant::now();
        let roles = wait_fleet_roles(&nodes, fleet).await;
        let took = waited.elapsed().as_secs_f64();
        eprintln!("    every EdgeNode showed its role {took:.1} s after the warm-up");
        match roles {
            Ok(()) => notes.push(format!("{label}: every EdgeNode showed its role {took:.1} s after the warm-up")),
            Err(e) => notes.push(format!("{label}: {e}; measured anyway")),
        }
    }
    let load_start = load_average();
    let mut others = other_controllers(controller.pid());
    eprintln!("    measuring for {:.0} s", plan.window.as_secs_f64());
    let pid = controller.pid().to_string();
    let (cloud_start, cpu_start, sim_start, sent_start) =
        (Counters::read(controller)?, cpu_seconds(&pid)?, cpu_seconds("self")?, stats.sent());
    let window_start = Instant::now();
    lock(&stats.ack_ms).clear();
    let window_end = window_start + plan.window;
    while Instant::now() < window_end {
        tokio::time::sleep_until(window_end.min(Instant::now() + PROGRESS)).await;
        if let (Ok(now), Ok(cpu)) = (Counters::read(controller), cpu_seconds(&pid)) {
            let d = now.since(&cloud_start);
            eprintln!(
                "    {:>4.0} s: {} report messages, {} reports, {} status writes, {} reconciles, controller CPU {:.1} s",
                window_start.elapsed().as_secs_f64(),
                d.messages[d.path(mode)],
                d.reports[d.path(mode)],
                d.writes,
                d.reconciles,
                cpu - cpu_start
            );
        }
    }
    let (cloud_end, cpu_end, sim_end, sent_end) =
        (Counters::read(controller)?, cpu_seconds(&pid)?, cpu_seconds("self")?, stats.sent());
    let window = window_start.elapsed();
    let rss = rss(controller.pid())?;
    others.extend(other_controllers(controller.pid()));
    if !others.is_empty() {
        others.sort_unstable();
        others.dedup();
        notes.push(format!(
            "{label}: {} other supermesh-controller processes ran during the window (pids {others:?}, other tests): they \
             reconcile these EdgeNodes too, and disturb the controller's CPU and status writes",
            others.len()
        ));
    }
    notes.push(format!(
        "{label}: load average {load_start} at the start of the window, {} at its end ({} CPUs; other processes \
         compete with the controller, the API server and the simulator)",
        load_average(),
        std::thread::available_parallelism().map_or(0, usize::from)
    ));
    let mut ack_ms = std::mem::take(&mut *lock(&stats.ack_ms));

    // Every report must be answered; wait for the answers to the last ones.
    let _ = control.send(Control::Drain);
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    let unanswered = |s: &Sent| s.report_messages - s.answered - s.errors;
    while unanswered(&stats.sent()) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = stats.sent();
    if unanswered(&total) > 0 {
        notes.push(format!(
            "{label}: {} of {} report messages got no answer within {} s after the window",
            unanswered(&total),
            total.report_messages,
            DRAIN_LIMIT.as_secs()
        ));
    }
    if total.acked != total.reports {
        notes.push(format!("{label}: the cloud acknowledged {} of the {} reports sent", total.acked, total.reports));
    }
    if total.errors > 0 {
        notes.push(format!("{label}: the cloud answered {} report messages with an Error", total.errors));
    }
    if total.refused > 0 {
        let reasons = lock(&stats.refusals);
        notes.push(format!(
            "{label}: the cloud refused {} relayed reports, {} of them in the window (e.g. {})",
            total.refused,
            sent_end.refused - sent_start.refused,
            reasons.first().map_or("", String::as_str)
        ));
    }
    let cloud = cloud_end.since(&cloud_start);
    let other = 1 - cloud.path(mode);
    if cloud.messages[other] > 0.0 {
        notes.push(format!(
            "{label}: the controller also counted {} report messages on path {:?} in the window",
            cloud.messages[other],
            Counters::PATHS[other]
        ));
    }
    let trouble = stats.trouble();
    if !trouble.is_empty() {
        notes.push(format!("{label}: {trouble}"));
    }
    ack_ms.sort_by(f64::total_cmp);
    let p50 = ack_ms.get(ack_ms.len().saturating_sub(1) / 2).copied().unwrap_or_default();
    let max = ack_ms.last().copied().unwrap_or_default();
    let in_window = Sent {
        report_messages: sent_end.report_messages - sent_start.report_messages,
        reports: sent_end.reports - sent_start.reports,
        report_bytes: sent_end.report_bytes - sent_start.report_bytes,
        answered: sent_end.answered - sent_start.answered,
        acked: sent_end.acked - sent_start.acked,
        errors: sent_end.errors - sent_start.errors,
        refused: sent_end.refused - sent_start.refused,
        keepalives: sent_end.keepalives - sent_start.keepalives,
    };
    eprintln!(
        "    {} report messages, {} reports at the cloud in {:.1} s",
        cloud.messages[cloud.path(mode)],
        cloud.reports[cloud.path(mode)],
        window.as_secs_f64()
    );
    Ok(LoadFigures {
        mode,
        window,
        cloud,
        cpu: cpu_end - cpu_start,
        rss,
        simulator_cpu: sim_end - sim_start,
        in_window,
        total,
        ack_p50: p50,
        ack_max: max,
    })
}

/// Waits until the controller stops writing status (connecting nodes change their
/// EdgeNodes and their networks' memberships), so the window measures reports in a steady
/// state. Returns what happened, for a note.
async fn settle(controller: &Controller) -> String {
    let writes = || -> f64 {
        ["EdgeNode", "Microservice", "Mesh"]
            .iter()
            .filter_map(|kind| controller.metric(STATUS_WRITES_METRIC, &format!("kind=\"{kind}\"")))
            .sum()
    };
    let started = Instant::now();
    let (mut last, mut since) = (writes(), Instant::now());
    while since.elapsed() < QUIET {
        if started.elapsed() > SETTLE_LIMIT {
            return format!(
                "the controller kept writing status for {} s after they connected ({last} writes); measured anyway",
                SETTLE_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = writes();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    format!("status writes settled after {:.1} s more ({last} so far)", (started.elapsed() - QUIET).as_secs_f64())
}

/// Waits until the controller's EdgeNode of every node of `fleet` shows the role its
/// reports carry (the first of each network is its supernode).
async fn wait_fleet_roles(nodes: &Api<EdgeNode>, fleet: &Fleet) -> Result<(), String> {
    let want: HashMap<&str, NodeRole> = fleet
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let first = fleet.members(fleet.network_of(i)).start == i;
            (name.as_str(), if first { NodeRole::Supernode } else { NodeRole::Member })
        })
        .collect();
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut missing = want.len();
    while Instant::now() < deadline {
        if let Ok(list) = nodes.list(&ListParams::default()).await {
            let shown = list
                .items
                .iter()
                .filter(|n| want.get(n.name_any().as_str()).is_some_and(|w| role(n) == Some(*w)))
                .count();
            missing = want.len() - shown;
            if missing == 0 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("{missing} EdgeNodes did not show their role within {} s after the warm-up", SETTLE_LIMIT.as_secs()))
}

/// Pids of the supermesh-controller processes running besides `own`.
fn other_controllers(own: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            // The kernel keeps 15 bytes of the command name.
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "supermesh-contr")
        })
        .collect()
}

/// The last lines of the controller's log, shortened, for a note.
fn log_end(controller: &Controller) -> String {
    let tail = controller.log_tail();
    let lines: Vec<&str> = tail.lines().collect();
    lines[lines.len().saturating_sub(LOG_LINES)..]
        .iter()
        .map(|l| if l.len() > 240 { format!("{}...", &l[..l.floor_char_boundary(240)]) } else { (*l).to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The 1-minute load average, from /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Deletes the benchmark's EdgeNodes while `controller` runs to remove their finalizers;
/// returns notes on what was slow or is left.
async fn remove_nodes(cluster: &Cluster, controller: &mut Controller, names: &[String]) -> Vec<String> {
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let ours: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (mut fewest, mut progress) = (names.len(), Instant::now());
    let mut failure = None;
    let mut shown = 0;
    let mut notes = Vec::new();
    let mut restarted = false;
    loop {
        // Deleted again while they remain: a delete the API server failed is retried.
        let left: Vec<(String, bool)> = match nodes.list(&ListParams::default()).await {
            Ok(list) => list
                .items
                .iter()
                .filter(|n| ours.contains(n.name_any().as_str()))
                .map(|n| (n.name_any(), n.metadata.deletion_timestamp.is_some()))
                .collect(),
            Err(e) => {
                failure = Some(format!("cannot list EdgeNodes: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if left.is_empty() {
            if restarted {
                notes.push(format!(
                    "cleanup: all {} EdgeNodes were gone {:.0} s later",
                    names.len(),
                    started.elapsed().as_secs_f64()
                ));
            }
            return notes;
        }
        if left.len() < fewest {
            (fewest, progress) = (left.len(), Instant::now());
        }
        if started.elapsed().as_secs() / 10 != shown {
            shown = started.elapsed().as_secs() / 10;
            eprintln!("    {} left after {:.0} s", left.len(), started.elapsed().as_secs_f64());
        }
        if progress.elapsed() > CLEANUP_STALL {
            let deleting = left.iter().filter(|(_, d)| *d).count();
            let stalled = format!(
                "cleanup: {} EdgeNodes of the benchmark remained ({deleting} of them deleted, waiting for their \
                 finalizers) {:.0} s after the deletes began, none removed in the last {} s{}",
                left.len(),
                started.elapsed().as_secs_f64(),
                CLEANUP_STALL.as_secs(),
                failure.take().map(|f| format!("; last error: {f}")).unwrap_or_default()
            );
            if restarted {
                notes.push(stalled);
                return notes;
            }
            eprintln!("    {stalled}; restarting the controller");
            notes.push(format!("{stalled}; the controller was restarted to finalize them"));
            controller.restart();
            controller.wait_ready().await;
            (restarted, progress) = (true, Instant::now());
        }
        for (name, _) in left.iter().filter(|(_, deleting)| !deleting) {
            match nodes.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => failure = Some(format!("delete {name}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One simulated node: a real session that acks every change, reports as its role says
/// and keeps the session alive.
struct SimNode {
    config: EdgeConfig,
    role: Role,
    interval: Duration,
    stats: Arc<Stats>,
    control: watch::Receiver<Control>,
    /// Outbox seq of the last report, per node (only the node itself, or a supernode's members).
    seqs: HashMap<String, i64>,
    /// Report messages awaiting their answer: id -> (reports carried, sent at).
    pending: HashMap<String, (u64, Instant)>,
    /// A supernode's relay queue, as the agent's.
    queue: Queue,
    counter: u64,
    /// Every node of this node's network, and whether the cloud's membership listed them all yet.
    network: Arc<BTreeSet<String>>,
    membership_complete: bool,
}

impl SimNode {
    fn name(&self) -> &str {
        &self.config.node.name
    }

    /// Connects (holding one of `permits` until welcomed, retrying until `deadline`), then serves.
    async fn run(mut self, permits: Arc<Semaphore>, deadline: Instant) {
        let ws = {
            let Ok(_permit) = permits.acquire().await else { return };
            match self.join(deadline).await {
                Ok(ws) => ws,
                Err(reason) => {
                    Stats::note(&self.stats.failed, format!("{}: {reason}", self.name()));
                    return;
                }
            }
        };
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = self.serve(ws).await {
            Stats::note(&self.stats.closed, format!("{}: {reason}", self.name()));
        }
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

    /// Dials, says hello holding nothing (the cloud registers the node from it), reads the welcome.
    async fn handshake(&self) -> Result<Ws, String> {
        let mut ws = edgehub::dial(&self.config).await.map_err(|e| e.to_string())?;
        let mut hello = edgehub::hello(&self.config, Default::default());
        hello.agent_version = format!("bench-{}", hello.agent_version);
        let hello = Message::new("h-0".into(), now_ms(), Operation::NodeConnection, CONNECTION_RESOURCE, hello);
        send(&mut ws, &hello).await?;
        let frame = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .map_err(|_| "no welcome within 15 s".to_string())?
            .ok_or("closed before the welcome")?
            .map_err(|e| e.to_string())?;
        let msg = protocol::decode(&frame.into_text().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        match msg.operation {
            Operation::NodeConnection => Ok(ws),
            Operation::Error => Err(error_message(&msg)),
            other => Err(format!("expected a welcome, got {other:?}")),
        }
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    /// Serves until told to stop (`None`) or the session ends (the reason).
    async fn serve(&mut self, mut ws: Ws) -> Option<String> {
        let mut next_report: Option<Instant> = None;
        let mut keepalive_at = Instant::now() + KEEPALIVE;
        loop {
            let report_due = async move {
                match next_report {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                changed = self.control.changed() => {
                    let command = *self.control.borrow_and_update();
                    match (changed, command) {
                        (Err(_), _) | (_, Control::Stop) => {
                            let _ = ws.close(None).await;
                            return None;
                        }
                        (_, Control::Report(go)) => next_report = self.phase().map(|phase| go + phase),
                        (_, Control::Drain) => next_report = None,
                        (_, Control::Idle) => {}
                    }
                }
                frame = ws.next() => {
                    let text = match frame {
                        Some(Ok(Frame::Text(text))) => text,
                        Some(Ok(Frame::Close(_))) | None => return Some("closed by the cloudhub".into()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Some(format!("stream failed: {e}")),
                    };
                    match protocol::decode(&text) {
                        Ok(msg) => {
                            if let Err(e) = self.received(&mut ws, msg).await {
                                return Some(e);
                            }
                        }
                        Err(e) => Stats::note(&self.stats.cloud_errors, format!("{}: undecodable message: {e}", self.name())),
                    }
                }
                _ = report_due => {
                    let sent = match &self.role {
                        Role::Direct { .. } => self.report(&mut ws).await,
                        Role::Supernode { .. } => self.batch(&mut ws).await,
                        Role::Member => Ok(()),
                    };
                    if let Err(e) = sent {
                        return Some(format!("report failed: {e}"));
                    }
                    keepalive_at = Instant::now() + KEEPALIVE;
                    next_report = next_report.map(|at| at + self.interval);
                }
                _ = tokio::time::sleep_until(keepalive_at) => {
                    let id = self.next_id("k-");
                    let ping = Message::new(id, now_ms(), Operation::Keepalive, CONNECTION_RESOURCE, ());
                    if let Err(e) = send(&mut ws, &ping).await {
                        return Some(format!("keepalive failed: {e}"));
                    }
                    self.stats.keepalives.fetch_add(1, Ordering::Relaxed);
                    keepalive_at = Instant::now() + KEEPALIVE;
                }
            }
        }
    }

    /// The node's phase in the interval; `None` for a member, which never reports.
    fn phase(&self) -> Option<Duration> {
        match &self.role {
            Role::Direct { phase } | Role::Supernode { phase, .. } => Some(*phase),
            Role::Member => None,
        }
    }

    /// A message from the cloud: a change is acked at once (as after a commit), an answer
    /// to a report is counted.
    async fn received(&mut self, ws: &mut Ws, msg: Message) -> Result<(), String> {
        if msg.operation.is_change() {
            if !self.membership_complete && msg.resource == Membership::resource(&self.config.node.network) {
                let listed: BTreeSet<String> = match msg.body() {
                    Ok(Body::Insert(Change::Membership(m)) | Body::Update(Change::Membership(m))) => {
                        m.members.into_iter().map(|m| m.name).collect()
                    }
                    _ => BTreeSet::new(),
                };
                if self.network.is_subset(&listed) {
                    self.membership_complete = true;
                    self.stats.complete_memberships.fetch_add(1, Ordering::Relaxed);
                }
            }
            let id = self.next_id("a-");
            let mut ack = Message::new(id, now_ms(), Operation::Response, &msg.resource, ()).answering(&msg.id);
            ack.resource_version = msg.resource_version.clone();
            send(ws, &ack).await.map_err(|e| format!("ack failed: {e}"))?;
            self.stats.changes_acked.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let answered = msg.parent_id.as_ref().and_then(|p| self.pending.remove_entry(p));
        match (msg.operation, answered) {
            (Operation::Response, Some((id, (reports, sent)))) => {
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                lock(&self.stats.ack_ms).push(sent.elapsed().as_secs_f64() * 1000.0);
                if msg.resource == BATCH_RESOURCE {
                    let ack = match msg.body() {
                        Ok(Body::Response(Answer::Batch(ack))) => ack,
                        other => return Err(format!("invalid batch ack: {other:?}")),
                    };
                    self.stats.acked.fetch_add(ack.acked.len() as u64, Ordering::Relaxed);
                    self.stats.refused.fetch_add(ack.refused.len() as u64, Ordering::Relaxed);
                    for (report, reason) in ack.refused.iter().take(1) {
                        Stats::note(&self.stats.refusals, format!("{}: {reason}", report.node));
                    }
                    // What a real supernode does with the answer: acked and refused reports
                    // leave the queue; the rest would go again with the next batch.
                    let done = self.queue.answered(&id, &ack);
                    if done.len() as u64 != reports {
                        Stats::note(
                            &self.stats.cloud_errors,
                            format!("{}: batch {id} of {reports} reports answered for {}", self.name(), done.len()),
                        );
                    }
                } else {
                    self.stats.acked.fetch_add(reports, Ordering::Relaxed);
                }
            }
            (Operation::Error, Some((id, _))) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if msg.resource == BATCH_RESOURCE {
                    self.queue.failed(&id);
                }
                let reason = error_message(&msg);
                Stats::note(&self.stats.cloud_errors, format!("{}: report {id} refused: {reason}", self.name()));
            }
            (Operation::Error, None) => {
                let reason = error_message(&msg);
                Stats::note(&self.stats.cloud_errors, format!("{}: {reason}", self.name()));
            }
            _ => {}
        }
        Ok(())
    }

    /// The next outbox seq of `node`.
    fn seq(&mut self, node: &str) -> i64 {
        let seq = self.seqs.entry(node.to_owned()).or_insert(0);
        *seq += 1;
        *seq
    }

    /// Sends this node's own status, as the edgehub sends an outbox entry.
    async fn report(&mut self, ws: &mut Ws) -> Result<(), String> {
        let name = self.name().to_owned();
        let seq = self.seq(&name);
        let id = format!("{OUTBOX_ID_PREFIX}{seq}");
        let msg = Message::new(id.clone(), now_ms(), Operation::MetaSync, STATUS_RESOURCE, status(None));
        let bytes = send(ws, &msg).await?;
        self.pending.insert(id, (1, Instant::now()));
        self.count(1, bytes);
        Ok(())
    }

    /// Queues every member's status (its own included) in the relay queue and sends one batch.
    async fn batch(&mut self, ws: &mut Ws) -> Result<(), String> {
        let Role::Supernode { members, .. } = &self.role else { return Ok(()) };
        let members = members.clone();
        let supernode = members[0].clone();
        for node in &members {
            let role = if *node == supernode { NodeRole::Supernode } else { NodeRole::Member };
            let view = ClusterView { role, supernode: Some(supernode.clone()) };
            let content = serde_json::to_value(status(Some(view))).map_err(|e| e.to_string())?;
            let seq = self.seq(node);
            let report = RelayedReport {
                node: node.clone(),
                seq,
                operation: Operation::MetaSync,
                resource: STATUS_RESOURCE.into(),
                content,
                created_ms: now_ms(),
            };
            self.queue.push(report).map_err(|e| e.to_string())?;
        }
        let id = self.next_id("b-");
        let Some(batch) = self.queue.take_batch(&id, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES) else { return Ok(()) };
        let reports = batch.entries.len() as u64;
        let msg = Message::new(id.clone(), now_ms(), Operation::MetaSync, BATCH_RESOURCE, batch);
        let bytes = send(ws, &msg).await?;
        self.pending.insert(id, (reports, Instant::now()));
        self.count(reports, bytes);
        Ok(())
    }

    fn count(&self, reports: u64, bytes: usize) {
        self.stats.report_messages.fetch_add(1, Ordering::Relaxed);
        self.stats.reports.fetch_add(reports, Ordering::Relaxed);
        self.stats.report_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// A node's status with [`INSTANCES`] ready instances, as a real agent reports it.
fn status(cluster: Option<ClusterView>) -> StatusReport {
    let instances = (0..INSTANCES)
        .map(|j| {
            let resource = format!("bench/microservice/service-{j}");
            let version = format!("1-3f9c1d2e-8a47-4b6e-9c0d-{j:012x}");
            InstanceReport { ports: vec![8080], ..InstanceReport::new(&resource, &version, protocol::Phase::Ready) }
        })
        .collect();
    StatusReport { taken_ms: now_ms(), instances, cluster }
}

/// Sends `msg`; returns the bytes of its frame.
async fn send(ws: &mut Ws, msg: &Message) -> Result<usize, String> {
    let text = protocol::encode(msg).map_err(|e| e.to_string())?;
    let bytes = text.len();
    ws.send(Frame::text(text)).await.map_err(|e| e.to_string())?;
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------
// Part 2: failover with real agents
// ---------------------------------------------------------------------------------------

/// One killed supernode.
struct Round {
    killed: String,
    /// The supernode the survivors agreed on, and when.
    successor: Option<(String, Duration)>,
    /// Heartbeats from the kill to the new election, the most any survivor needed.
    heartbeats: Option<u64>,
    /// When the controller's EdgeNode of the successor showed role Supernode.
    cloud: Option<Duration>,
}

struct FailoverReport {
    agents: usize,
    rounds: Result<Vec<Round>, String>,
    notes: Vec<String>,
}

impl FailoverReport {
    /// Prints the table and notes; returns whether the run failed.
    fn print(&self, _plan: &Plan) -> bool {
        println!(
            "supernode failover: {} real supermesh-agent processes (release) on one network, heartbeatSeconds 1, \
             podstatus interval 2 s, started {} ms apart;\neach round kills the current supernode with SIGKILL",
            self.agents,
            START_GAP.as_millis()
        );
        let rounds = match &self.rounds {
            Ok(rounds) => rounds,
            Err(e) => {
                println!("failed: {e}");
                for note in &self.notes {
                    println!("note: {note}");
                }
                return true;
            }
        };
        let secs = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), |d| format!("{:.2}", d.as_secs_f64()));
        println!("round  killed                     new supernode              agreed s  heartbeats  cloud role s");
        for (i, r) in rounds.iter().enumerate() {
            println!(
                "{:>5}  {:<25}  {:<25}  {:>8}  {:>10}  {:>12}",
                i + 1,
                r.killed,
                r.successor.as_ref().map_or("none agreed", |(s, _)| s.as_str()),
                secs(r.successor.as_ref().map(|(_, d)| *d)),
                r.heartbeats.map_or_else(|| "-".to_owned(), |h| h.to_string()),
                secs(r.cloud)
            );
        }
        let mean = |values: Vec<f64>| {
            if values.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", values.iter().sum::<f64>() / values.len() as f64)
            }
        };
        println!(
            "{:>5}  {:<25}  {:<25}  {:>8}  {:>10}  {:>12}",
            "mean",
            "",
            "",
            mean(rounds.iter().filter_map(|r| r.successor.as_ref().map(|(_, d)| d.as_secs_f64())).collect()),
            mean(rounds.iter().filter_map(|r| r.heartbeats.map(|h| h as f64)).collect()),
            mean(rounds.iter().filter_map(|r| r.cloud.map(|d| d.as_secs_f64())).collect())
        );
        println!(
            "agreed: SIGKILL -> every surviving agent's registry (peer service, polled every {} ms) names the same \
             new supernode;\nheartbeats: the registry's electedAt minus its heartbeat count just before the kill, the \
             most of any survivor;\ncloud role: SIGKILL -> the controller's EdgeNode of the new supernode has \
             status.role Supernode (polled every {} ms)",
            POLL.as_millis(),
            POLL.as_millis()
        );
        for note in &self.notes {
            println!("note: {note}");
        }
        false
    }
}

/// Starts the agents and a controller, runs the rounds, cleans up.
async fn failover_bench(cluster: &Cluster, plan: &Plan) -> FailoverReport {
    eprintln!("==> failover: {} agents, {} rounds", plan.failover_agents, plan.rounds);
    let mut notes = Vec::new();
    let mut controller = Controller::start("bench-supernode-failover");
    controller.wait_ready().await;
    let token = join_token(&cluster.client).await;
    let id = unique();
    let (network, account) = (format!("bench-failover-{id}"), format!("bench-{id}"));
    let extra = "meta: {sync: {podstatus: {interval: 2}}}";
    let mut agents = Vec::new();
    for i in 0..plan.failover_agents {
        let name = format!("bench-fo-{id}-{i}");
        agents.push(Agent::start_with(&name, &network, &account, &controller.cloudhub_addr, &token, extra));
        tokio::time::sleep(START_GAP).await;
    }
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let mut others = other_controllers(controller.pid());
    let rounds = rounds(cluster, &mut agents, &token, plan, &mut notes).await;
    others.extend(other_controllers(controller.pid()));
    if !others.is_empty() {
        others.sort_unstable();
        others.dedup();
        notes.push(format!(
            "{} other supermesh-controller processes ran meanwhile (pids {others:?}, other tests): they reconcile \
             these EdgeNodes too",
            others.len()
        ));
    }
    if rounds.is_err() {
        notes.push(format!("the controller's log ends with:\n{}", log_end(&controller)));
    }

    let dirs: Vec<std::path::PathBuf> =
        agents.iter().filter_map(|a| a.data_dir.parent().map(std::path::Path::to_path_buf)).collect();
    drop(agents);
    notes.extend(remove_nodes(cluster, &mut controller, &names).await);
    controller.stop();
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    FailoverReport { agents: plan.failover_agents, rounds, notes }
}

/// Waits for the first election, then kills the supernode `plan.rounds` times.
async fn rounds(
    cluster: &Cluster,
    agents: &mut [Agent],
    token: &str,
    plan: &Plan,
    notes: &mut Vec<String>,
) -> Result<Vec<Round>, String> {
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let mut killed: HashSet<usize> = HashSet::new();
    let started = Instant::now();
    let mut supernode = loop {
        let live: Vec<&Agent> = agents.iter().collect();
        if let Some(s) = agreed(&live, token, &killed_names(agents, &killed)).map(|(s, _)| s) {
            break s;
        }
        if started.elapsed() > ELECTION_LIMIT {
            return Err(format!(
                "the {} agents did not agree on a supernode within {} s (registries: {})",
                agents.len(),
                ELECTION_LIMIT.as_secs(),
                describe(&live, token)
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let first = started.elapsed();
    if supernode != agents[0].name {
        notes.push(format!("the first election chose {supernode}, not the first agent started ({})", agents[0].name));
    }
    let all: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    wait_roles(&nodes, &all, &supernode, ELECTION_LIMIT).await?;
    let settled = started.elapsed();
    eprintln!("    all agents follow {supernode} after {:.1} s", first.as_secs_f64());
    notes.push(format!(
        "first election: every agent followed {supernode} {:.1} s after the last agent started; its EdgeNode showed \
         role Supernode {:.1} s after",
        first.as_secs_f64(),
        settled.as_secs_f64()
    ));

    let mut results = Vec::new();
    for round in 1..=plan.rounds {
        let victim = agents.iter().position(|a| a.name == supernode).ok_or("the supernode is not one of the agents")?;
        let survivors: Vec<usize> = (0..agents.len()).filter(|i| *i != victim && !killed.contains(i)).collect();
        // Heartbeat counts just before the kill.
        let before: HashMap<usize, u64> =
            survivors.iter().filter_map(|&i| agents[i].registry(token).map(|r| (i, r.heartbeats))).collect();
        let kill = Instant::now();
        agents[victim].kill9();
        killed.insert(victim);
        let gone = killed_names(agents, &killed);
        let mut successor: Option<(String, Duration)> = None;
        let mut heartbeats = None;
        let mut cloud: Option<(String, Duration)> = None;
        while (successor.is_none() || cloud.is_none()) && kill.elapsed() < FAILOVER_LIMIT {
            if successor.is_none() {
                let live: Vec<&Agent> = survivors.iter().map(|&i| &agents[i]).collect();
                if let Some((name, registries)) = agreed(&live, token, &gone) {
                    let taken = survivors
                        .iter()
                        .zip(&registries)
                        .filter_map(|(i, r)| before.get(i).map(|b| r.elected_at.saturating_sub(*b)))
                        .max();
                    successor = Some((name, kill.elapsed()));
                    heartbeats = taken;
                }
            }
            if cloud.is_none() {
                if let Ok(list) = nodes.list(&ListParams::default()).await {
                    let survivor_names: BTreeSet<&str> = survivors.iter().map(|&i| agents[i].name.as_str()).collect();
                    cloud = list
                        .items
                        .iter()
                        .find(|n| {
                            survivor_names.contains(n.name_any().as_str()) && role(n) == Some(NodeRole::Supernode)
                        })
                        .map(|n| (n.name_any(), kill.elapsed()));
                }
            }
            tokio::time::sleep(POLL).await;
        }
        let killed_name = agents[victim].name.clone();
        match (&successor, &cloud) {
            (Some((agreed_on, t)), _) => {
                eprintln!(
                    "    round {round}: killed {killed_name}; all follow {agreed_on} after {:.2} s",
                    t.as_secs_f64()
                );
            }
            (None, _) => notes.push(format!(
                "round {round}: the survivors did not agree on a new supernode within {} s (registries: {})",
                FAILOVER_LIMIT.as_secs(),
                describe(&survivors.iter().map(|&i| &agents[i]).collect::<Vec<_>>(), token)
            )),
        }
        if let (Some((s, _)), Some((c, _))) = (&successor, &cloud) {
            if s != c {
                notes.push(format!(
                    "round {round}: the agents agreed on {s} but the controller showed {c} as supernode"
                ));
            }
        }
        if cloud.is_none() {
            notes.push(format!(
                "round {round}: no surviving EdgeNode showed role Supernode within {} s",
                FAILOVER_LIMIT.as_secs()
            ));
        }
        let next = successor.as_ref().map(|(s, _)| s.clone());
        results.push(Round { killed: killed_name, successor, heartbeats, cloud: cloud.map(|(_, t)| t) });
        let Some(next) = next else { break };
        supernode = next;
        if round < plan.rounds {
            let live: Vec<&str> = survivors.iter().map(|&i| agents[i].name.as_str()).collect();
            if let Err(e) = wait_roles(&nodes, &live, &supernode, FAILOVER_LIMIT).await {
                notes.push(format!("after round {round}: {e}"));
                break;
            }
        }
    }
    if results.len() < plan.rounds {
        notes.push(format!("only {} of {} rounds ran: a round found no new supernode", results.len(), plan.rounds));
    }
    Ok(results)
}

fn killed_names(agents: &[Agent], killed: &HashSet<usize>) -> BTreeSet<String> {
    killed.iter().map(|&i| agents[i].name.clone()).collect()
}

/// The supernode every one of `agents` names, with their registries, when they agree on
/// one that is not in `gone`.
fn agreed(agents: &[&Agent], token: &str, gone: &BTreeSet<String>) -> Option<(String, Vec<Registry>)> {
    let registries: Vec<Registry> = agents.iter().map(|a| a.registry(token)).collect::<Option<_>>()?;
    let first = registries.first()?.supernode.clone()?;
    let all = registries.iter().all(|r| r.supernode.as_deref() == Some(first.as_str()));
    (all && !gone.contains(&first)).then_some((first, registries))
}

/// What each agent's registry says about the supernode, for failure messages.
fn describe(agents: &[&Agent], token: &str) -> String {
    agents
        .iter()
        .map(|a| match a.registry(token) {
            Some(r) => format!("{} -> {}", a.name, r.supernode.as_deref().unwrap_or("none")),
            None => format!("{} -> no answer", a.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn role(node: &EdgeNode) -> Option<NodeRole> {
    node.status.as_ref().and_then(|s| s.role)
}

/// Waits until the controller's EdgeNodes show `supernode` as Supernode and the others of
/// `live` as Members: the cluster is settled and the next kill starts from a known state.
async fn wait_roles(nodes: &Api<EdgeNode>, live: &[&str], supernode: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut seen = String::new();
    loop {
        if let Ok(list) = nodes.list(&ListParams::default()).await {
            let roles: HashMap<String, Option<NodeRole>> = list
                .items
                .iter()
                .filter(|n| live.contains(&n.name_any().as_str()))
                .map(|n| (n.name_any(), role(n)))
                .collect();
            let want = |name: &str| if name == supernode { NodeRole::Supernode } else { NodeRole::Member };
            if live.iter().all(|name| roles.get(*name).is_some_and(|r| *r == Some(want(name)))) {
                return Ok(());
            }
            seen = format!("{roles:?}");
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the EdgeNodes did not show {supernode} as Supernode and the others as Members within {} s: {seen}",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The message of an Error from the cloud.
fn error_message(msg: &Message) -> String {
    match msg.body() {
        Ok(Body::Error(refusal)) => refusal.message,
        other => format!("{other:?}"),
    }
}
