//! `cargo xtask bench supernode`: figures for reporting through supernodes. A benchmark
//! reports; it never passes or fails on timings.
//!
//! 1. Upstream report load at the cloud: N simulated nodes in networks of S (one process,
//!    `supermesh_tests::sim`: the agent's own edgehub over an in-memory device, with real
//!    authenticated sessions to a fresh release controller each run, so every node is a
//!    real EdgeNode of its network), each reporting its instance status every interval.
//!    Without supernodes every node sends its own report; with supernodes one node per
//!    network sends its network's reports in one batch built with the agent's relay queue,
//!    and the others only keep their sessions alive. Measured at the cloud with the
//!    controller's report counters, CPU and memory, over a window after a warm-up.
//! 2. Failover with real agents: real `supermesh-agent` processes on one network; the
//!    supernode is killed with SIGKILL, and the time until the survivors agree on the next
//!    one, the heartbeats that took, and the time until the controller shows its role are
//!    measured.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, ListParams};
use kube::ResourceExt;
use supermesh_api::EdgeNode;
use supermesh_protocol::peer::Registry;
use supermesh_protocol::{InstanceReport, NodeRole, Phase};
use supermesh_tests::sim::{self, cpu_seconds, rss, Control, ReportCounts, Route};
use supermesh_tests::{join_token, unique, Agent, Cluster, Controller};
use tokio::sync::watch;
use tokio::time::Instant;

/// Defaults of the flags.
const DEFAULT_NODES: usize = 1000;
const DEFAULT_CLUSTER_SIZE: usize = 10;
const DEFAULT_INTERVAL: f64 = 10.0;
const DEFAULT_WINDOW: f64 = 60.0;
const DEFAULT_FAILOVER_AGENTS: usize = 10;
const DEFAULT_ROUNDS: usize = 3;

/// Instances in each simulated status report, for a realistic size.
const INSTANCES: usize = 3;
/// Simulated nodes connecting at once; the cloudhub allows 64 concurrent handshakes.
const CONNECTING_AT_ONCE: usize = 50;
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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
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

    /// Indexes of the nodes of network `k`, the supernode included.
    fn members(&self, k: usize) -> std::ops::Range<usize> {
        k * self.cluster_size..((k + 1) * self.cluster_size).min(self.names.len())
    }

    /// Index of the supernode of network `k`: its last node, so that the agents of its
    /// members, whose outboxes it relays, exist when it starts.
    fn supernode(&self, k: usize) -> usize {
        self.members(k).end - 1
    }

    /// Which way node `i`'s reports go in `mode`; `agents` are those of the nodes before it.
    fn route(&self, mode: Mode, i: usize, agents: &[sim::Agent]) -> Route {
        let k = self.network_of(i);
        let supernode = self.supernode(k);
        match mode {
            Mode::Direct => Route::Direct,
            Mode::Batch if i == supernode => Route::Supernode {
                members: agents[self.members(k).start..i].iter().map(|a| a.device.clone()).collect(),
            },
            Mode::Batch => Route::Member { supernode: self.names[supernode].clone() },
        }
    }

    /// Node `i`'s phase in the interval, spread uniformly: per node without supernodes, per
    /// network with them (a network's nodes report together, its supernode relays them in
    /// one batch).
    fn phase(&self, mode: Mode, i: usize, interval: Duration) -> Duration {
        match mode {
            Mode::Direct => interval.mul_f64(i as f64 / self.names.len() as f64),
            Mode::Batch => interval.mul_f64(self.network_of(i) as f64 / self.networks.len() as f64),
        }
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

/// Figures of one run.
struct LoadFigures {
    mode: Mode,
    window: Duration,
    cloud: Counters,
    cpu: f64,
    rss: u64,
    simulator_cpu: f64,
    /// Counts of the simulated nodes over the window, and over the whole run.
    in_window: ReportCounts,
    total: ReportCounts,
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
             run; simulator: this process (release), the agent's edgehub over in-memory devices",
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
                "{}: the simulator sent {} report messages ({} reports, {:.1} KiB) in the window, so {:.1} report \
                 messages/s from agents (keepalives and acks of changes, the edgehub's own, not counted); answers \
                 {:.1} ms median, {:.1} ms max (send to ack read); simulator CPU {:.1} s",
                f.mode.label(),
                w.messages,
                w.reports,
                w.bytes as f64 / 1024.0,
                f.rate(w.messages as f64),
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
        // The simulated fleet connects from one address: no cap on its handshakes in flight.
        let mut controller = Controller::launch(
            &format!("bench-supernode-{}", mode.path()),
            None,
            &["--max-pending-per-address", "100000"],
        );
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

/// The simulated side of a run: the agents, their counters and what tells them when to
/// report. Dropping it closes every session.
struct Simulated {
    agents: Vec<sim::Agent>,
    stats: Arc<sim::Stats>,
    control: watch::Sender<Control>,
    /// When the first agent started.
    started: Instant,
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
    let token = join_token().await;
    let simulated = connect(controller, mode, plan, fleet, &token).await?;
    measure(cluster, controller, mode, plan, fleet, &simulated, notes).await
}

/// Starts a simulated agent for every node of `fleet`, reporting as `mode` says once told
/// to, at most [`CONNECTING_AT_ONCE`] of them connecting at a time; returns when all are
/// connected.
async fn connect(
    controller: &Controller,
    mode: Mode,
    plan: &Plan,
    fleet: &Fleet,
    token: &str,
) -> Result<Simulated, String> {
    let n = fleet.names.len();
    let stats = Arc::new(sim::Stats::default());
    let (control, controlled) = watch::channel(Control::Idle);
    let running = instances();
    let started = Instant::now();
    let deadline = started + CONNECT_LIMIT;
    let connected = || stats.connected.load(Ordering::Relaxed);
    let mut agents: Vec<sim::Agent> = Vec::with_capacity(n);
    for (i, name) in fleet.names.iter().enumerate() {
        while agents.len() >= connected() + CONNECTING_AT_ONCE && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let spec = sim::Spec {
            name: name.clone(),
            account: fleet.account.clone(),
            network: fleet.networks[fleet.network_of(i)].clone(),
            cloud: controller.cloudhub_addr.clone(),
            token: token.to_owned(),
            // No microservice is placed on the nodes: nothing starts.
            ready_after: Duration::ZERO,
            status_interval: plan.interval,
        };
        let reporting = sim::Reporting {
            route: fleet.route(mode, i, &agents),
            phase: fleet.phase(mode, i, plan.interval),
            control: controlled.clone(),
            running: running.clone(),
        };
        agents.push(sim::Agent::start_with(&spec, stats.clone(), reporting)?);
    }
    while connected() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if connected() < n {
        return Err(format!(
            "only {} of {n} nodes connected within {} s (the edgehub keeps retrying with backoff){}",
            connected(),
            CONNECT_LIMIT.as_secs(),
            trouble(&stats).map(|t| format!("; {t}")).unwrap_or_default()
        ));
    }
    Ok(Simulated { agents, stats, control, started })
}

/// Nodes whose last membership from the cloud lists every node of their network.
fn complete_memberships(fleet: &Fleet, agents: &[sim::Agent]) -> usize {
    let networks: Vec<BTreeSet<String>> =
        (0..fleet.networks.len()).map(|k| fleet.members(k).map(|j| fleet.names[j].clone()).collect()).collect();
    agents
        .iter()
        .enumerate()
        .filter(|(i, agent)| agent.device.membership().is_superset(&networks[fleet.network_of(*i)]))
        .count()
}

/// What went wrong on the simulated side besides refusals, for a note; `None` if nothing did.
fn trouble(stats: &sim::Stats) -> Option<String> {
    let mut parts = Vec::new();
    let disconnects = stats.disconnects.load(Ordering::Relaxed);
    if disconnects > 0 {
        parts.push(format!("{disconnects} sessions ended and reconnected"));
    }
    let problems = stats.problems();
    if let Some(first) = problems.first() {
        parts.push(format!("{} problems with batches (e.g. {first})", problems.len()));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Waits for the controller to count every node, then measures the window.
async fn measure(
    cluster: &Cluster,
    controller: &Controller,
    mode: Mode,
    plan: &Plan,
    fleet: &Fleet,
    simulated: &Simulated,
    notes: &mut Vec<String>,
) -> Result<LoadFigures, String> {
    let n = fleet.names.len();
    let label = mode.label();
    let stats = &simulated.stats;
    let deadline = simulated.started + CONNECT_LIMIT;
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
    let connect = simulated.started.elapsed();
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
    let listed = || complete_memberships(fleet, &simulated.agents);
    while listed() < n && waited.elapsed() < MEMBERSHIP_LIMIT {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let complete = listed();
    if complete < n {
        notes.push(format!(
            "{label}: only {complete} of {n} nodes got a membership listing their whole network within {} s; reports may be refused",
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
    simulated.control.send(Control::Report(go)).map_err(|_| "every simulated agent is gone".to_string())?;
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
    let (pid, simulator) = (controller.pid(), std::process::id());
    let (cloud_start, cpu_start, sim_start, sent_start) =
        (Counters::read(controller)?, cpu_seconds(pid)?, cpu_seconds(simulator)?, stats.reports());
    let window_start = Instant::now();
    // Only the answers read in the window count.
    stats.take_ack_latencies();
    let window_end = window_start + plan.window;
    while Instant::now() < window_end {
        tokio::time::sleep_until(window_end.min(Instant::now() + PROGRESS)).await;
        if let (Ok(now), Ok(cpu)) = (Counters::read(controller), cpu_seconds(pid)) {
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
        (Counters::read(controller)?, cpu_seconds(pid)?, cpu_seconds(simulator)?, stats.reports());
    let window = window_start.elapsed();
    let rss = rss(pid)?;
    others.extend(other_controllers(pid));
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
    let mut ack_ms: Vec<f64> = stats.take_ack_latencies().iter().map(|d| d.as_secs_f64() * 1000.0).collect();

    // Every report must be answered; wait for the answers to the last ones.
    let _ = simulated.control.send(Control::Drain);
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    while stats.reports().unanswered() > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = stats.reports();
    if total.unanswered() > 0 {
        notes.push(format!(
            "{label}: {} of {} report messages got no ack within {} s after the window (a direct report the cloud \
             refuses stays unanswered: the edgehub sends it again)",
            total.unanswered(),
            total.messages,
            DRAIN_LIMIT.as_secs()
        ));
    }
    if total.acked != total.reports {
        notes.push(format!("{label}: the cloud acknowledged {} of the {} reports sent", total.acked, total.reports));
    }
    if total.failed > 0 {
        notes.push(format!(
            "{label}: {} batches were answered with an Error or lost with their session; their reports went again",
            total.failed
        ));
    }
    if total.refused > 0 {
        let reasons = stats.refusals();
        notes.push(format!(
            "{label}: the cloud refused {} relayed reports, {} of them in the window (e.g. {})",
            total.refused,
            sent_end.since(&sent_start).refused,
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
    if let Some(trouble) = trouble(stats) {
        notes.push(format!("{label}: {trouble}"));
    }
    ack_ms.sort_by(f64::total_cmp);
    let p50 = ack_ms.get(ack_ms.len().saturating_sub(1) / 2).copied().unwrap_or_default();
    let max = ack_ms.last().copied().unwrap_or_default();
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
        in_window: sent_end.since(&sent_start),
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
/// reports carry (the last of each network is its supernode).
async fn wait_fleet_roles(nodes: &Api<EdgeNode>, fleet: &Fleet) -> Result<(), String> {
    let want: HashMap<&str, NodeRole> = fleet
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let supernode = fleet.supernode(fleet.network_of(i)) == i;
            (name.as_str(), if supernode { NodeRole::Supernode } else { NodeRole::Member })
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

/// The [`INSTANCES`] Ready instances every simulated node runs, for reports of a realistic size.
fn instances() -> Vec<InstanceReport> {
    (0..INSTANCES)
        .map(|j| {
            let resource = format!("bench/microservice/service-{j}");
            let version = format!("1-3f9c1d2e-8a47-4b6e-9c0d-{j:012x}");
            InstanceReport { ports: vec![8080], ..InstanceReport::new(&resource, &version, Phase::Ready) }
        })
        .collect()
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
    let token = join_token().await;
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
    let root = supermesh_tests::cluster_key_root(&cluster.client).await;
    let rounds = rounds(cluster, &mut agents, &root, plan, &mut notes).await;
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
    root: &str,
    plan: &Plan,
    notes: &mut Vec<String>,
) -> Result<Vec<Round>, String> {
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let mut killed: HashSet<usize> = HashSet::new();
    let started = Instant::now();
    let mut supernode = loop {
        let live: Vec<&Agent> = agents.iter().collect();
        if let Some(s) = agreed(&live, root, &killed_names(agents, &killed)).map(|(s, _)| s) {
            break s;
        }
        if started.elapsed() > ELECTION_LIMIT {
            return Err(format!(
                "the {} agents did not agree on a supernode within {} s (registries: {})",
                agents.len(),
                ELECTION_LIMIT.as_secs(),
                describe(&live, root)
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
            survivors.iter().filter_map(|&i| agents[i].registry(root).map(|r| (i, r.heartbeats))).collect();
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
                if let Some((name, registries)) = agreed(&live, root, &gone) {
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
                describe(&survivors.iter().map(|&i| &agents[i]).collect::<Vec<_>>(), root)
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
fn agreed(agents: &[&Agent], root: &str, gone: &BTreeSet<String>) -> Option<(String, Vec<Registry>)> {
    let registries: Vec<Registry> = agents.iter().map(|a| a.registry(root)).collect::<Option<_>>()?;
    let first = registries.first()?.supernode.clone()?;
    let all = registries.iter().all(|r| r.supernode.as_deref() == Some(first.as_str()));
    (all && !gone.contains(&first)).then_some((first, registries))
}

/// What each agent's registry says about the supernode, for failure messages.
fn describe(agents: &[&Agent], root: &str) -> String {
    agents
        .iter()
        .map(|a| match a.registry(root) {
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
