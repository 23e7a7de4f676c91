//! `cargo xtask bench scale -- --agents 1000,5000,10000`: how the cloud side holds up
//! as the fleet grows. A benchmark reports; it never passes or fails on figures.
//!
//! For each agent count: a fresh controller (the release build) against the real API
//! server, and that many simulated agents in this process (`supermesh_tests::sim`: the
//! agent's own edgehub over an in-memory device). The fleet: networks of 10 nodes, 9
//! accounts, 10 meshes (one Network mesh over the whole fleet, one Account mesh per
//! account) and 50 microservices (per mesh 4 on every node, 1 with 3 replicas).
//!
//! Measured: time until every agent is connected and holds its assignments; controller
//! CPU and memory at rest; for one spec change of the fleet-wide microservice, the time
//! from the API write to each agent's ack; and the API writes the controller makes per
//! 1,000 instance status changes the rollout causes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use supermesh_api::{EdgeNode, Microservice};
use supermesh_tests::sim::{self, cpu_seconds, rss, Stats};
use supermesh_tests::{apply_yaml, join_token, kubectl, unique, Cluster, Controller};
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
    let counts = match parse(&args) {
        Ok(counts) => counts,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let rows: Vec<(usize, Result<Row, String>)> = runtime.block_on(async {
        let cluster = Cluster::connect().await;
        let mut rows = Vec::new();
        for &n in &counts {
            eprintln!("==> {n} simulated agents");
            rows.push((n, row(&cluster, n).await));
        }
        rows
    });
    print_report(&rows);
    if rows.iter().any(|(_, r)| r.is_err()) {
        std::process::exit(1);
    }
}

/// The agent counts of `--agents 1000,5000`; `--replicas` other than 1 waits for several replicas.
fn parse(args: &[String]) -> Result<Vec<usize>, String> {
    let mut counts = DEFAULT_AGENTS.to_vec();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| rest.next().cloned()).unwrap_or_default();
        match flag {
            "--bench" => {}
            "--agents" => {
                let list = value();
                counts = list
                    .split(',')
                    .map(|n| n.trim().parse().ok().filter(|&n: &usize| n > 0))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| format!("--agents {list:?}: expected positive counts separated by commas"))?;
            }
            "--replicas" => {
                let list = value();
                if list.split(',').any(|r| r.trim() != "1") {
                    return Err(format!(
                        "--replicas {list:?}: one controller replica runs today; several come with the replicas issue"
                    ));
                }
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; bench scale takes --agents 1000,5000 and --replicas 1"
                ))
            }
        }
    }
    Ok(counts)
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
    reconnect: Duration,
    resent_after_restart: f64,
    status_changes: u64,
    status_writes: f64,
    events: u64,
    resent: f64,
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

async fn row(cluster: &Cluster, n: usize) -> Result<Row, String> {
    let id = unique();
    let ns = cluster.namespace("scale");
    let (meshes, msvcs) = population();
    apply_yaml(&meshes, &["-n", &ns])?;
    apply_yaml(&msvcs.join("---\n"), &["-n", &ns])?;
    let mut controller =
        Controller::launch(&format!("scale-{n}"), None, &["--max-agents", "100000", "--log-level", "info"]);
    controller.wait_ready_within(PHASE_LIMIT).await?;
    // Published by the first controller started on the cluster.
    let token = join_token(&cluster.client).await;
    let pid = controller.pid();
    let idle_rss = rss(pid)?;
    let names: Vec<String> = (0..n).map(|i| format!("scale-{id}-{i:05}")).collect();
    let result = measure(cluster, &token, &mut controller, &ns, &names, idle_rss).await;
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
    controller.stop();
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
    controller: &mut Controller,
    ns: &str,
    names: &[String],
    idle_rss: u64,
) -> Result<Row, String> {
    let n = names.len();
    let pid = controller.pid();
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
            cloud: controller.cloudhub_addr.clone(),
            token: token.to_owned(),
            ready_after: Duration::from_millis(500),
            status_interval: Duration::from_secs(60),
        };
        agents.push(sim::Agent::start(&spec, stats.clone())?);
    }
    while controller.metric(AGENTS, "") != Some(n as f64) {
        phase_limit(start, "the controller to count every agent")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect = start.elapsed();
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
    quiet(controller, n).await?;

    let (cpu_before, at) = (cpu_seconds(pid)?, Instant::now());
    tokio::time::sleep(AT_REST).await;
    let cpu_percent_at_rest = 100.0 * (cpu_seconds(pid)? - cpu_before) / at.elapsed().as_secs_f64();
    let rss = rss(pid)?;
    eprintln!("    at rest: {cpu_percent_at_rest:.1} % of a core, RSS {:.0} MiB", rss as f64 / 1048576.0);

    // One spec change of the microservice on every node.
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), ns);
    let (writes_before, acked_before) = (metric(controller, STATUS_WRITES), metric(controller, ACKED));
    let (changes_before, events_before) =
        (stats.status_changes.load(Ordering::Relaxed), stats.events.load(Ordering::Relaxed));
    let resent_before = metric(controller, RESENT);
    let patch = serde_json::json!({"spec": {"args": ["--version", "2"]}});
    let written = Instant::now();
    let changed = msvcs
        .patch("fleet-0", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("patching fleet-0: {e}"))?;
    let version =
        format!("{}-{}", changed.metadata.generation.unwrap_or_default(), changed.metadata.uid.unwrap_or_default());
    stats.watch(&fleet_key(0), &version);
    // Arrivals before `watch` are possible in principle; waiting for all acks covers them.
    while metric(controller, ACKED) - acked_before < n as f64 {
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
    quiet(controller, n).await?;
    let (status_changes, status_writes) = (
        stats.status_changes.load(Ordering::Relaxed) - changes_before,
        metric(controller, STATUS_WRITES) - writes_before,
    );
    let events = stats.events.load(Ordering::Relaxed) - events_before;
    let resent = metric(controller, RESENT) - resent_before;

    // A controller restart: every agent reconnects and states what it holds; nothing is resent.
    let held: Vec<BTreeMap<String, String>> = agents.iter().map(|a| a.device.held()).collect();
    controller.restart();
    let restarted = Instant::now();
    while controller.metric(AGENTS, "") != Some(n as f64) {
        phase_limit(restarted, "every agent to reconnect after a controller restart")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reconnect = restarted.elapsed();
    eprintln!("    {n} reconnected {:.1} s after a controller restart", reconnect.as_secs_f64());
    quiet(controller, n).await?;
    let resent_after_restart = metric(controller, "supermesh_controller_cloudhub_changes_sent_total");
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
        reconnect,
        resent_after_restart,
        status_changes,
        status_writes,
        events,
        resent,
    })
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

/// Waits until the controller writes no status for [`QUIET`].
/// Waits until the controller writes no Microservice or Mesh status for [`QUIET`], and
/// EdgeNode status no faster than connected nodes' heartbeats (each every 5 minutes or so):
/// what is left is the fleet at rest.
async fn quiet(controller: &Controller, nodes: usize) -> Result<(), String> {
    let start = Instant::now();
    let workloads =
        || metric_of(controller, STATUS_WRITES, "Microservice") + metric_of(controller, STATUS_WRITES, "Mesh");
    let heartbeats = 2.0 * nodes as f64 * QUIET.as_secs_f64() / 300.0 + 5.0;
    let (mut last, mut since) = (workloads(), Instant::now());
    let mut window =
        std::collections::VecDeque::from([(Instant::now(), metric_of(controller, STATUS_WRITES, "EdgeNode"))]);
    loop {
        phase_limit(start, "the controller to be quiet")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = workloads();
        if now != last {
            (last, since) = (now, Instant::now());
        }
        window.push_back((Instant::now(), metric_of(controller, STATUS_WRITES, "EdgeNode")));
        while window.front().is_some_and(|(at, _)| at.elapsed() > QUIET) {
            window.pop_front();
        }
        let node_writes = window.back().map_or(0.0, |b| b.1) - window.front().map_or(0.0, |f| f.1);
        if since.elapsed() >= QUIET && node_writes <= heartbeats {
            return Ok(());
        }
    }
}

/// A metric of one kind (`kind="..."`), 0 when absent.
fn metric_of(controller: &Controller, name: &str, kind: &str) -> f64 {
    controller.metric(name, &format!("kind=\"{kind}\"")).unwrap_or(0.0)
}

fn print_report(rows: &[(usize, Result<Row, String>)]) {
    let mib = |b: u64| b as f64 / 1048576.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("bench scale: simulated agents (the agent's edgehub over an in-memory device) against one controller (release build)");
    println!("fleet: networks of {NETWORK_SIZE}, {ACCOUNTS} accounts, 10 meshes, 50 microservices (about 9 instances per node)");
    println!(
        "{:>6}  {:>9}  {:>8}  {:>11}  {:>14}  {:>13}  {:>11}  {:>7}  {:>7}  {:>7}  {:>15}  {:>7}  {:>6}",
        "agents",
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
    for (n, row) in rows {
        match row {
            Ok(r) => {
                let per_agent = (r.rss.saturating_sub(r.idle_rss)) as f64 / 1024.0 / *n as f64;
                let writes = 1000.0 * r.status_writes / r.status_changes.max(1) as f64;
                println!(
                    "{n:>6}  {:>9.1}  {:>8.1}  {:>5.1} ({:>3})  {:>14.2}  {:>6.0} ({:>4.0})  {:>11.1}  {:>7.0}  {:>7.0}  {:>7.0}  {:>6.1} ({:>5}/{:<6})  {:>7}  {:>6}",
                    r.connect.as_secs_f64(),
                    r.synced.as_secs_f64(),
                    r.reconnect.as_secs_f64(),
                    r.resent_after_restart,
                    r.cpu_percent_at_rest * 1000.0 / *n as f64,
                    mib(r.rss),
                    mib(r.idle_rss),
                    per_agent,
                    ms(r.p50),
                    ms(r.p99),
                    ms(r.max),
                    writes,
                    r.status_writes,
                    r.status_changes,
                    r.events,
                    r.resent
                );
            }
            Err(e) => println!("{n:>6}  failed: {e}"),
        }
    }
    println!(
        "targets: 10,000 agents on one controller; RSS <= 1 GiB at 10,000 (<= 100 KiB per agent); at rest <= 5 % of a \
         core per 1,000 agents; change -> ack p99 <= 2 s at 10,000; <= 100 status writes per 1,000 status changes"
    );
    println!(
        "connect: first agent started -> the controller counts all; synced: -> every agent holds its assignments \
         (first connections: every EdgeNode is created); reconnect: controller restart -> the new one counts every \
         agent (changes it sent them, in parentheses); rest: controller CPU over {} s after {} s without a status write; KiB/agent: (RSS - idle RSS) / agents; \
         p50/p99/max: API write of one spec change -> each agent's ack; writes/1k chg: controller status writes per \
         1,000 instance status changes during that rollout (writes/changes); events: instance events the agents sent",
        AT_REST.as_secs(),
        QUIET.as_secs()
    );
}
