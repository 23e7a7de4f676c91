//! `cargo xtask bench scale -- --agents 1000,5000,10000 [--replicas 1,3]`: how the cloud
//! side holds up as the fleet grows. A benchmark reports; it never passes or fails on figures.
//!
//! For each agent count and each replica count: fresh controller replicas (the release
//! build) against the real API server, and that many simulated agents in this process
//! (`supermesh_tests::sim`: the agent's own edgehub over an in-memory device), all dialling
//! the first replica, which sends each to the replica that serves its node. The fleet: networks of 10 nodes, 9
//! accounts, 10 meshes (one Network mesh over the whole fleet, one Account mesh per
//! account) and 50 microservices (per mesh 4 on every node, 1 with 3 replicas).
//!
//! Measured: time until every agent is connected and holds its assignments; controller
//! CPU and memory at rest; for one spec change of the fleet-wide microservice, the time
//! from the API write to each agent's ack; and the API writes the controller makes per
//! 1,000 instance status changes the rollout causes. With one replica, a controller
//! restart; with several, the spread of agents over them and the loss of one: the time
//! until its agents are served again, EdgeNodes that turned Connected=False meanwhile,
//! changes sent again and instances restarted.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use supermesh_api::{EdgeNode, Microservice};
use supermesh_tests::sim::{self, cpu_seconds, rss, Stats};
use supermesh_tests::{
    apply_yaml, free_port, join_token, kubectl, unique, Cluster, Controller, CONTROLLER_NAMESPACE, SENT,
};
use tokio::time::Instant;

/// Agent counts run when `--agents` is not given.
const DEFAULT_AGENTS: &[usize] = &[1000, 5000, 10_000];
/// Accounts the fleet is spread over, one Account mesh each.
const ACCOUNTS: usize = 9;
/// Nodes per network.
const NETWORK_SIZE: usize = 10;
/// Microservices per mesh.
const PER_MESH: usize = 5;
/// Agents that may be connecting at once: a fleet comes online over time, not in one instant.
const CONNECTING: usize = 200;
/// How long the controller is watched at rest.
const AT_REST: Duration = Duration::from_secs(60);
/// How long the controller must write nothing before it counts as quiet.
const QUIET: Duration = Duration::from_secs(15);
/// How long any phase may take before the row is given up (a first registration of ten
/// thousand devices is as fast as the API server writes).
const PHASE_LIMIT: Duration = Duration::from_secs(1800);

const STATUS_WRITES: &str = "supermesh_controller_status_writes_total";
const ACKED: &str = "supermesh_controller_cloudhub_changes_acked_total";
const RESENT: &str = "supermesh_controller_cloudhub_changes_resent_total";
const AGENTS: &str = "supermesh_controller_cloudhub_agents";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; a bench target run by `cargo test --all-targets` gets no
    // arguments, and a test run must not start a benchmark of many minutes.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("bench scale: skipped outside `cargo bench`; run it with `cargo xtask bench scale`");
        return;
    }
    let (counts, replicas) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let rows: Vec<(usize, usize, Result<Row, String>)> = runtime.block_on(async {
        let cluster = Cluster::connect().await;
        let mut rows = Vec::new();
        for &n in &counts {
            for &r in &replicas {
                eprintln!("==> {n} simulated agents, {r} controller replica(s)");
                rows.push((n, r, row(&cluster, n, r).await));
            }
        }
        rows
    });
    print_report(&rows);
    if rows.iter().any(|(_, _, r)| r.is_err()) {
        std::process::exit(1);
    }
}

/// The agent counts of `--agents 1000,5000` and the replica counts of `--replicas 1,3`.
fn parse(args: &[String]) -> Result<(Vec<usize>, Vec<usize>), String> {
    let mut counts = DEFAULT_AGENTS.to_vec();
    let mut replicas = vec![1];
    let positive = |flag: &str, list: String| {
        list.split(',')
            .map(|n| n.trim().parse().ok().filter(|&n: &usize| n > 0))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| format!("{flag} {list:?}: expected positive counts separated by commas"))
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| rest.next().cloned()).unwrap_or_default();
        match flag {
            "--bench" => {}
            "--agents" => counts = positive("--agents", value())?,
            "--replicas" => replicas = positive("--replicas", value())?,
            other => {
                return Err(format!(
                    "unknown argument {other:?}; bench scale takes --agents 1000,5000 and --replicas 1,3"
                ))
            }
        }
    }
    Ok((counts, replicas))
}

/// Figures of one agent count.
struct Row {
    connect: Duration,
    synced: Duration,
    cpu_percent_at_rest: f64,
    rss: u64,
    idle_rss: u64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Agents each replica served before any was lost.
    spread: Vec<usize>,
    /// One replica: a controller restart. Several: the loss of one.
    after: After,
    status_changes: u64,
    status_writes: f64,
    events: u64,
    resent: f64,
}

/// What the fleet went through after the rollout.
enum After {
    /// The controller restarted: time until every agent was back, changes it sent them.
    Restart { reconnect: Duration, sent: f64 },
    /// A replica was killed: its agents, the time until all were served again, EdgeNodes
    /// that turned Connected=False meanwhile, changes sent to them, instances restarted.
    Loss { moved: usize, served_again: Duration, disconnected: usize, sent: f64, restarted: u64 },
}

/// The controller replicas of a row; agents dial the first, which stays.
struct Replicas {
    live: Vec<Controller>,
    /// Replica ids, as `live`.
    ids: Vec<String>,
    /// Replicas killed, whose announcements are left to remove.
    killed: Vec<String>,
}

impl Replicas {
    /// Starts `r` replicas with their cloudhubs on fresh ports and waits until each is ready.
    async fn start(n: usize, r: usize) -> Result<Replicas, String> {
        let id = unique();
        let ids: Vec<String> = (0..r).map(|i| format!("scale-{n}-{i}-{id}")).collect();
        let live: Vec<Controller> = ids
            .iter()
            .map(|replica| {
                let addr = format!("127.0.0.1:{}", free_port());
                // The simulated fleet connects from one address: no cap on its handshakes in flight.
                let args = [
                    "--max-agents",
                    "100000",
                    "--max-pending-per-address",
                    "100000",
                    "--log-level",
                    "info",
                    "--replica-id",
                    replica,
                ];
                let args = [&args[..], &["--advertise-address", &addr]].concat();
                Controller::launch_at(replica, None, &addr, &args)
            })
            .collect();
        for controller in &live {
            controller.wait_ready_within(PHASE_LIMIT).await?;
        }
        Ok(Replicas { live, ids, killed: Vec::new() })
    }

    /// Kills replica `i` with SIGKILL, as a lost Pod would go.
    fn kill(&mut self, i: usize) {
        let mut lost = self.live.remove(i);
        lost.kill9();
        self.killed.push(self.ids.remove(i));
    }

    /// Stops the live replicas and removes what the killed ones left behind.
    async fn stop(&mut self) {
        for controller in self.live.drain(..) {
            controller.stop();
        }
        for id in self.killed.drain(..) {
            let lease = format!("supermesh-replica-{id}");
            let _ = supermesh_tests::try_kubectl(&["delete", "lease", "-n", CONTROLLER_NAMESPACE, &lease]);
        }
    }

    /// The sum of a metric over the live replicas and its label sets.
    fn metric(&self, name: &str) -> f64 {
        self.live.iter().map(|c| metric(c, name)).sum()
    }

    /// The sum of a metric of one kind over the live replicas.
    fn metric_of(&self, name: &str, kind: &str) -> f64 {
        self.live.iter().map(|c| c.metric(name, &format!("kind=\"{kind}\"")).unwrap_or(0.0)).sum()
    }

    /// Agents each live replica serves.
    fn spread(&self) -> Vec<usize> {
        self.live.iter().map(|c| c.metric(AGENTS, "").unwrap_or(0.0) as usize).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.live.iter().map(Controller::pid).collect()
    }

    fn cpu_seconds(&self) -> Result<f64, String> {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    fn rss(&self) -> Result<u64, String> {
        self.pids().into_iter().map(rss).sum()
    }
}

/// The fleet's objects: 10 meshes, 50 microservices.
fn population() -> (String, Vec<String>) {
    let mut meshes =
        vec!["apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: fleet}\nspec: {type: Network}\n"
            .to_string()];
    for a in 1..=ACCOUNTS {
        meshes.push(format!(
            "apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {{name: acct-{a}}}\nspec: {{type: Account, account: acct-{a}}}\n"
        ));
    }
    let mut msvcs = Vec::new();
    for mesh in std::iter::once("fleet".to_string()).chain((1..=ACCOUNTS).map(|a| format!("acct-{a}"))) {
        for i in 0..PER_MESH {
            let replicas = if i == PER_MESH - 1 { "  replicas: 3\n" } else { "" };
            msvcs.push(format!(
                "apiVersion: supermesh.io/v1alpha1\nkind: Microservice\nmetadata: {{name: {mesh}-{i}}}\nspec:\n  mesh: {mesh}\n  command: [\"/usr/bin/app\"]\n  args: [\"--version\", \"1\"]\n  ports: [{{port: 8080}}]\n{replicas}"
            ));
        }
    }
    (meshes.join("---\n"), msvcs)
}

async fn row(cluster: &Cluster, n: usize, r: usize) -> Result<Row, String> {
    let id = unique();
    let ns = cluster.namespace("scale");
    let (meshes, msvcs) = population();
    apply_yaml(&meshes, &["-n", &ns])?;
    apply_yaml(&msvcs.join("---\n"), &["-n", &ns])?;
    let mut replicas = Replicas::start(n, r).await?;
    // Published by the first controller started on the cluster.
    let token = join_token().await;
    let idle_rss = replicas.rss()?;
    let names: Vec<String> = (0..n).map(|i| format!("scale-{id}-{i:05}")).collect();
    let result = measure(cluster, &token, &mut replicas, &ns, &names, idle_rss).await;
    eprintln!("    cleaning up");
    // Objects go first, while the controller runs to remove its finalizers: a namespace
    // alone is only emptied by a controller manager, which a bare control plane lacks.
    let _ = supermesh_tests::try_kubectl(&["delete", "microservices,meshes", "--all", "-n", &ns, "--timeout=300s"]);
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    futures::stream::iter(names.iter())
        .for_each_concurrent(32, |name| {
            let nodes = nodes.clone();
            async move {
                let _ = nodes.delete(name, &DeleteParams::default()).await;
            }
        })
        .await;
    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    let deadline = Instant::now() + PHASE_LIMIT;
    while Instant::now() < deadline && remaining(&nodes, &id).await > 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    replicas.stop().await;
    result
}

/// EdgeNodes of this row still in the cluster.
async fn remaining(nodes: &Api<EdgeNode>, id: &str) -> usize {
    let prefix = format!("scale-{id}-");
    let list = nodes.list_metadata(&Default::default()).await.map(|l| l.items).unwrap_or_default();
    list.iter().filter(|n| n.metadata.name.as_deref().is_some_and(|name| name.starts_with(&prefix))).count()
}

async fn measure(
    cluster: &Cluster,
    token: &str,
    replicas: &mut Replicas,
    ns: &str,
    names: &[String],
    idle_rss: u64,
) -> Result<Row, String> {
    let n = names.len();
    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for (i, name) in names.iter().enumerate() {
        while agents.len() >= stats.connected.load(Ordering::Relaxed) + CONNECTING {
            tokio::time::sleep(Duration::from_millis(20)).await;
            phase_limit(start, "agents connecting")?;
        }
        let spec = sim::Spec {
            name: name.clone(),
            account: format!("acct-{}", i % ACCOUNTS + 1),
            network: format!("{}-net-{}", &name[..name.len() - 6], i / NETWORK_SIZE),
            cloud: replicas.live[0].cloudhub_addr.clone(),
            token: token.to_owned(),
            ready_after: Duration::from_millis(500),
            status_interval: Duration::from_secs(60),
        };
        agents.push(sim::Agent::start(&spec, stats.clone())?);
    }
    let connect = all_served(replicas, n, start, "the controller to count every agent").await?;
    eprintln!("    {n} connected in {:.1} s", connect.as_secs_f64());
    // Synced: every agent holds the fleet's 4 microservices on every node and its account's 4.
    let fleet_key = |i: usize| format!("{ns}/microservice/fleet-{i}");
    let synced = |held: &BTreeMap<String, String>| {
        let count = held.keys().filter(|k| k.contains("/microservice/")).count();
        (0..PER_MESH - 1).all(|i| held.contains_key(&fleet_key(i))) && count >= 2 * (PER_MESH - 1)
    };
    while !agents.iter().all(|a| synced(&a.device.held())) {
        phase_limit(start, "every agent to hold its assignments")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let synced_after = start.elapsed();
    eprintln!("    every agent holds its assignments after {:.1} s", synced_after.as_secs_f64());
    quiet(replicas, n).await?;

    let (cpu_before, at) = (replicas.cpu_seconds()?, Instant::now());
    tokio::time::sleep(AT_REST).await;
    let cpu_percent_at_rest = 100.0 * (replicas.cpu_seconds()? - cpu_before) / at.elapsed().as_secs_f64();
    let rss = replicas.rss()?;
    eprintln!("    at rest: {cpu_percent_at_rest:.1} % of a core, RSS {:.0} MiB", rss as f64 / 1048576.0);

    // One spec change of the microservice on every node.
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), ns);
    let (writes_before, acked_before) = (replicas.metric(STATUS_WRITES), replicas.metric(ACKED));
    let (changes_before, events_before) =
        (stats.status_changes.load(Ordering::Relaxed), stats.events.load(Ordering::Relaxed));
    let resent_before = replicas.metric(RESENT);
    // The version the change makes (a spec change is the next generation), watched before the
    // write: the fastest agents have it before the API server's answer is back here.
    let current = msvcs.get("fleet-0").await.map_err(|e| format!("reading fleet-0: {e}"))?;
    let uid = current.metadata.uid.clone().unwrap_or_default();
    let version = format!("{}-{uid}", current.metadata.generation.unwrap_or_default() + 1);
    stats.watch(&fleet_key(0), &version);
    let patch = serde_json::json!({"spec": {"args": ["--version", "2"]}});
    let written = Instant::now();
    let changed = msvcs
        .patch("fleet-0", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("patching fleet-0: {e}"))?;
    let made = format!("{}-{uid}", changed.metadata.generation.unwrap_or_default());
    if made != version {
        return Err(format!("the change made version {made}, not the {version} watched"));
    }
    while replicas.metric(ACKED) - acked_before < n as f64 {
        phase_limit(written, "every agent to ack the change")?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies: Vec<Duration> = stats.arrivals().into_iter().map(|t| t - written).collect();
    latencies.sort();
    if latencies.len() < n * 99 / 100 {
        return Err(format!("only {} of {n} arrivals were timed", latencies.len()));
    }
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    eprintln!("    change -> ack p50 {:?}, p99 {:?}", at(0.5), at(0.99));
    // Let the rollout's status settle: every instance Ready again, the controller quiet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    quiet(replicas, n).await?;
    let (status_changes, status_writes) =
        (stats.status_changes.load(Ordering::Relaxed) - changes_before, replicas.metric(STATUS_WRITES) - writes_before);
    let events = stats.events.load(Ordering::Relaxed) - events_before;
    let resent = replicas.metric(RESENT) - resent_before;

    // One replica restarts, or one of several is lost: every agent states what it holds
    // to the replica that serves it next; nothing is resent.
    let held: Vec<BTreeMap<String, String>> = agents.iter().map(|a| a.device.held()).collect();
    let spread = replicas.spread();
    let after = match replicas.live.len() {
        1 => restart(replicas, n).await?,
        _ => loss(cluster, replicas, names, &stats).await?,
    };
    quiet(replicas, n).await?;
    let changed = agents.iter().zip(&held).filter(|(a, h)| a.device.held() != **h).count();
    if changed > 0 {
        return Err(format!("{changed} agents hold something else after the controller restart"));
    }
    drop(agents);
    Ok(Row {
        connect,
        synced: synced_after,
        cpu_percent_at_rest,
        rss,
        idle_rss,
        p50: at(0.5),
        p99: at(0.99),
        max: *latencies.last().unwrap_or(&Duration::ZERO),
        spread,
        after,
        status_changes,
        status_writes,
        events,
        resent,
    })
}

/// Restarts the one replica and waits until every agent is back.
async fn restart(replicas: &mut Replicas, n: usize) -> Result<After, String> {
    replicas.live[0].restart();
    let reconnect =
        all_served(replicas, n, Instant::now(), "every agent to reconnect after a controller restart").await?;
    eprintln!("    {n} reconnected {:.1} s after a controller restart", reconnect.as_secs_f64());
    quiet(replicas, n).await?;
    Ok(After::Restart { reconnect, sent: replicas.metric(SENT) })
}

/// Kills the replica serving the most agents (never the one they dial, as a Service
/// would stop routing to a lost Pod) and waits until the others serve every agent.
async fn loss(cluster: &Cluster, replicas: &mut Replicas, names: &[String], stats: &Stats) -> Result<After, String> {
    let n = names.len();
    let spread = replicas.spread();
    let victim = (1..spread.len()).max_by_key(|&i| spread[i]).unwrap_or(1);
    let moved = spread[victim];
    // Every Connected=False of the fleet's EdgeNodes from here on.
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let fleet: std::collections::BTreeSet<String> = names.iter().cloned().collect();
    let disconnected = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let marker = format!("scale-marker-{}", unique());
    let seen_marker = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (disconnected, seen_marker, marker) = (disconnected.clone(), seen_marker.clone(), marker.clone());
        let stream = watcher(nodes.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let Ok(node) = event else { continue };
                let name = node.metadata.name.clone().unwrap_or_default();
                let status = node.status.as_ref();
                let connected = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Connected"));
                if fleet.contains(&name) && connected.is_some_and(|c| c.status == "False") {
                    disconnected.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
                }
                if node.metadata.labels.as_ref().is_some_and(|l| l.contains_key(&marker)) {
                    seen_marker.store(true, Ordering::Relaxed);
                }
            }
        })
    };
    let starts_before = stats.starts.load(Ordering::Relaxed);
    replicas.kill(victim);
    let sent_before = replicas.metric(SENT);
    let lost = Instant::now();
    let served_again = all_served(replicas, n, lost, "the other replicas to serve every agent of the lost one").await?;
    eprintln!("    {moved} agents of the lost replica served again after {:.1} s", served_again.as_secs_f64());
    // Once the watch has seen a label written now, it has seen every earlier change.
    kubectl(&["label", "edgenode", &names[0], &format!("{marker}=1")]);
    while !seen_marker.load(Ordering::Relaxed) {
        phase_limit(lost, "the EdgeNode watch to catch up")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watch.abort();
    let disconnected = disconnected.lock().unwrap_or_else(|p| p.into_inner()).len();
    let sent = replicas.metric(SENT) - sent_before;
    let restarted = stats.starts.load(Ordering::Relaxed) - starts_before;
    Ok(After::Loss { moved, served_again, disconnected, sent, restarted })
}

/// Waits until the replicas serve `n` agents; the time since `since`.
async fn all_served(replicas: &Replicas, n: usize, since: Instant, what: &str) -> Result<Duration, String> {
    while replicas.metric(AGENTS) != n as f64 {
        phase_limit(since, what)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(since.elapsed())
}

fn phase_limit(since: Instant, what: &str) -> Result<(), String> {
    if since.elapsed() > PHASE_LIMIT {
        return Err(format!("gave up waiting for {what} after {} s", PHASE_LIMIT.as_secs()));
    }
    Ok(())
}

/// The sum of a metric over its label sets (0 when absent).
fn metric(controller: &Controller, name: &str) -> f64 {
    let Some((_, body)) = controller.http_get("/metrics") else { return 0.0 };
    body.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the replicas write no Microservice or Mesh status for [`QUIET`], and
/// EdgeNode status no faster than connected nodes' heartbeats (each every 5 minutes or so):
/// what is left is the fleet at rest.
async fn quiet(replicas: &Replicas, nodes: usize) -> Result<(), String> {
    let start = Instant::now();
    let workloads = || replicas.metric_of(STATUS_WRITES, "Microservice") + replicas.metric_of(STATUS_WRITES, "Mesh");
    let heartbeats = 2.0 * nodes as f64 * QUIET.as_secs_f64() / 300.0 + 5.0;
    let (mut last, mut since) = (workloads(), Instant::now());
    let mut window =
        std::collections::VecDeque::from([(Instant::now(), replicas.metric_of(STATUS_WRITES, "EdgeNode"))]);
    loop {
        phase_limit(start, "the controller to be quiet")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = workloads();
        if now != last {
            (last, since) = (now, Instant::now());
        }
        window.push_back((Instant::now(), replicas.metric_of(STATUS_WRITES, "EdgeNode")));
        while window.front().is_some_and(|(at, _)| at.elapsed() > QUIET) {
            window.pop_front();
        }
        let node_writes = window.back().map_or(0.0, |b| b.1) - window.front().map_or(0.0, |f| f.1);
        if since.elapsed() >= QUIET && node_writes <= heartbeats {
            return Ok(());
        }
    }
}

fn print_report(rows: &[(usize, usize, Result<Row, String>)]) {
    let mib = |b: u64| b as f64 / 1048576.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("bench scale: simulated agents (the agent's edgehub over an in-memory device) against controller replicas (release build)");
    println!("fleet: networks of {NETWORK_SIZE}, {ACCOUNTS} accounts, 10 meshes, 50 microservices (about 9 instances per node)");
    println!(
        "{:>6}  {:>4}  {:>9}  {:>8}  {:>11}  {:>14}  {:>13}  {:>11}  {:>7}  {:>7}  {:>7}  {:>15}  {:>7}  {:>6}",
        "agents",
        "repl",
        "connect s",
        "synced s",
        "reconnect s",
        "rest %core/1k",
        "RSS MiB (idle)",
        "KiB/agent",
        "p50 ms",
        "p99 ms",
        "max ms",
        "writes/1k chg",
        "events",
        "resent"
    );
    for (n, r, row) in rows {
        let Ok(row) = row else { continue };
        let per_agent = (row.rss.saturating_sub(row.idle_rss)) as f64 / 1024.0 / *n as f64;
        let writes = 1000.0 * row.status_writes / row.status_changes.max(1) as f64;
        let reconnect = match row.after {
            After::Restart { reconnect, sent } => format!("{:>5.1} ({sent:>3})", reconnect.as_secs_f64()),
            After::Loss { .. } => "see below".into(),
        };
        println!(
            "{n:>6}  {r:>4}  {:>9.1}  {:>8.1}  {reconnect:>11}  {:>14.2}  {:>6.0} ({:>4.0})  {:>11.1}  {:>7.0}  {:>7.0}  {:>7.0}  {:>6.1} ({:>5}/{:<6})  {:>7}  {:>6}",
            row.connect.as_secs_f64(),
            row.synced.as_secs_f64(),
            row.cpu_percent_at_rest * 1000.0 / *n as f64,
            mib(row.rss),
            mib(row.idle_rss),
            per_agent,
            ms(row.p50),
            ms(row.p99),
            ms(row.max),
            writes,
            row.status_writes,
            row.status_changes,
            row.events,
            row.resent
        );
    }
    for (n, r, row) in rows {
        if let Err(e) = row {
            println!("{n:>6}  {r:>4}  failed: {e}");
        }
    }
    let losses: Vec<_> = rows
        .iter()
        .filter_map(|(n, r, row)| match row.as_ref().ok()?.after {
            After::Loss { moved, served_again, disconnected, sent, restarted } => {
                Some((n, r, &row.as_ref().ok()?.spread, moved, served_again, disconnected, sent, restarted))
            }
            After::Restart { .. } => None,
        })
        .collect();
    if !losses.is_empty() {
        println!();
        println!(
            "{:>6}  {:>4}  {:<24}  {:>10}  {:>14}  {:>17}  {:>12}  {:>9}",
            "agents",
            "repl",
            "agents per replica",
            "lost with",
            "served again s",
            "Connected=False",
            "changes sent",
            "restarts"
        );
        for (n, r, spread, moved, served_again, disconnected, sent, restarted) in losses {
            let spread = spread.iter().map(usize::to_string).collect::<Vec<_>>().join(" / ");
            println!(
                "{n:>6}  {r:>4}  {spread:<24}  {moved:>10}  {:>14.1}  {disconnected:>17}  {sent:>12}  {restarted:>9}",
                served_again.as_secs_f64()
            );
        }
    }
    println!(
        "targets: 10,000 agents on one controller; RSS <= 1 GiB at 10,000 (<= 100 KiB per agent); at rest <= 5 % of a \
         core per 1,000 agents; change -> ack p99 <= 2 s at 10,000; <= 100 status writes per 1,000 status changes; \
         after a replica is lost its agents served again within 15 s with 0 Connected=False, 0 changes sent again, \
         0 restarts; with 3 replicas no more writes per 1,000 status changes than with 1"
    );
    println!(
        "connect: first agent started -> the replicas count all; synced: -> every agent holds its assignments \
         (first connections: every EdgeNode is created); reconnect: controller restart (one replica) -> the new one counts every \
         agent (changes it sent them, in parentheses); rest: CPU of all replicas over {} s after {} s without a status write; \
         RSS: all replicas; KiB/agent: (RSS - idle RSS) / agents; \
         p50/p99/max: API write of one spec change -> each agent's ack; writes/1k chg: status writes of all replicas per \
         1,000 instance status changes during that rollout (writes/changes); events: instance events the agents sent; \
         lost: SIGKILL of the replica serving the most agents (not the one they dial) -> the others serve all; \
         Connected=False: the fleet's EdgeNodes that showed it meanwhile; changes sent: by the others to the moved agents; \
         restarts: instances the agents started again",
        AT_REST.as_secs(),
        QUIET.as_secs()
    );
}
