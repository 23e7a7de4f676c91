//! End-to-end: supernode election, reporting through supernodes, and discovery,
//! with every agent in its own network namespace. Two networks of three devices,
//! each on a bridge of its own; the cloudhub is reached at the bridge's gateway
//! address, so removing that address cuts one network off from the cloud while
//! its devices still reach each other. Traffic goes only to loopback and to the
//! namespaces' addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use supermesh_api::{EdgeNode, Mesh, Microservice};
use supermesh_protocol::peer::Registry;
use supermesh_protocol::NodeRole;
use supermesh_tests::lan::Lan;
use supermesh_tests::*;

/// A microservice that uses the local API the way a real one would: it posts a
/// numbered event every half second (retrying until the API takes it, then
/// recording the number in `ticks`), and every second discovers its network's
/// nodes and the endpoints of `probe`, calls a peer instance, and writes what it
/// saw to `discovery.json`. It also serves "hello from <node>" on port 8080.
const PROBE: &str = r#"
import json, os, threading, time, urllib.request, http.server
API, NODE = os.environ["SUPERMESH_API"], os.environ["SUPERMESH_NODE"]
TOKEN = open(os.environ["SUPERMESH_TOKEN_FILE"]).read()
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + NODE).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
threading.Thread(target=http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hello).serve_forever, daemon=True).start()
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(API + path, method=method, data=data,
        headers={"authorization": "Bearer " + TOKEN, "content-type": "application/json"})
    with direct.open(req, timeout=5) as r:
        return r.status, r.read().decode()
def write(name, text):
    open(name + ".tmp", "w").write(text); os.replace(name + ".tmp", name)
tick, last = 1, 0.0
while True:
    try:
        status, _ = call("POST", "/v1/events", {"type": "Normal", "reason": "Tick%d" % tick, "message": "tick %d" % tick})
        if status == 202:
            write("ticks", str(tick)); tick += 1
    except Exception:
        pass
    if time.time() - last >= 1:
        last = time.time()
        try:
            _, nodes = call("GET", "/v1/nodes?type=network")
            _, endpoints = call("GET", "/v1/endpoints/probe")
            peers = [e for e in json.loads(endpoints)["endpoints"] if e["node"] != NODE and e.get("address") and e["ready"]]
            answer = ""
            if peers:
                with direct.open("http://%s:8080/" % peers[0]["address"], timeout=3) as r:
                    answer = r.read().decode()
            write("discovery.json", json.dumps({"at": time.time(), "nodes": json.loads(nodes),
                                                 "endpoints": json.loads(endpoints), "answer": answer}))
        except Exception as e:
            write("discovery-error", "%f %s" % (time.time(), e))
    time.sleep(0.5)
"#;

/// A network of three agents, started in order (so the first has the longest uptime).
struct Net {
    lan: Lan,
    agents: Vec<Agent>,
}

fn start_net(site_id: &str, lan: Lan, cloudhub_port: u16, token: &str, extra: &str) -> Net {
    let cloudhub = format!("{}:{cloudhub_port}", lan.gateway());
    let agents = lan
        .hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = format!("{}-{i}-{site_id}", lan.network);
            let extra = format!("meta: {{sync: {{podstatus: {{interval: 2}}}}}}\n{extra}");
            let account = format!("acct-{site_id}");
            let agent = Agent::start_in(host, &name, &lan.network, &account, &cloudhub, token, &extra);
            // Distinct start times make the election's order known: the first started wins.
            std::thread::sleep(Duration::from_millis(300));
            agent
        })
        .collect();
    Net { lan, agents }
}

/// Polls `check` every 200 ms until it returns `Some`, failing with `what` after `limit`.
async fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether every agent's registry names `supernode`.
fn all_follow(agents: &[&Agent], root: &str, supernode: &str) -> Option<Vec<Registry>> {
    let registries: Vec<Registry> = agents.iter().map(|a| a.registry_inside(root)).collect::<Option<_>>()?;
    registries.iter().all(|r| r.supernode.as_deref() == Some(supernode)).then_some(registries)
}

/// The ticks the probe on `agent` has handed to its local API so far.
fn ticks(agent: &Agent, key: &str) -> u64 {
    let dir = agent.instance_dir(key);
    dir.and_then(|d| std::fs::read_to_string(d.join("work/ticks")).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Tick numbers that reached the cloud as Kubernetes Events, per node.
async fn ticks_at_cloud(events: &Api<Event>) -> BTreeMap<String, BTreeSet<u64>> {
    let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for e in events.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
        let (Some(reason), Some(note)) = (e.reason.as_deref(), e.note.as_deref()) else { continue };
        let Some(n) = reason.strip_prefix("Tick").and_then(|n| n.parse().ok()) else { continue };
        if let Some((node, _)) = note.split_once(": ") {
            seen.entry(node.to_owned()).or_default().insert(n);
        }
    }
    seen
}

/// Waits until every tick `1..=upto` of each `(node, upto)` reached the cloud; returns what it saw.
async fn all_ticks_arrive(events: &Api<Event>, what: &str, want: &[(String, u64)]) -> BTreeMap<String, BTreeSet<u64>> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen = ticks_at_cloud(events).await;
        let gaps: Vec<(&String, Vec<u64>)> = want
            .iter()
            .map(|(node, upto)| (node, missing(seen.get(node), *upto)))
            .filter(|(_, m)| !m.is_empty())
            .collect();
        if gaps.is_empty() {
            return seen;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; missing ticks: {gaps:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Numbers in `1..=upto` missing from `seen`.
fn missing(seen: Option<&BTreeSet<u64>>, upto: u64) -> Vec<u64> {
    (1..=upto).filter(|n| !seen.is_some_and(|s| s.contains(n))).collect()
}

/// What the probe on `agent` last wrote to `discovery.json`, if written after `since` (Unix seconds).
fn discovery_since(agent: &Agent, key: &str, since: f64) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(agent.instance_dir(key)?.join("work/discovery.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    (v["at"].as_f64()? > since).then_some(v)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn role(node: &EdgeNode) -> Option<NodeRole> {
    node.status.as_ref().and_then(|s| s.role)
}

#[tokio::test]
async fn supernodes_relay_reports_fail_over_and_keep_discovery_working_offline() {
    lan::require_root();
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("supernode");
    let id = unique();
    let (lan_a, lan_b) = (Lan::create(&format!("lan-a-{id}"), 1, 3), Lan::create(&format!("lan-b-{id}"), 2, 3));
    let port = free_port();
    let names = [
        "--cloudhub-name",
        &lan_a.gateway(),
        "--cloudhub-name",
        &lan_b.gateway(),
        "--keepalive-seconds",
        "2",
        "--reconnect-grace-seconds",
        "5",
    ];
    let controller = Controller::launch_at("supernode", None, &format!("0.0.0.0:{port}"), &names);
    let token = join_token().await;
    let root = cluster_key_root(&cluster.client).await;
    let mesh = format!(
        "apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {{name: lan}}\nspec: {{type: Network, networks: [{}, {}]}}\n",
        lan_a.network, lan_b.network
    );
    apply_yaml(&mesh, &["-n", &ns]).unwrap();
    let probe = serde_json::json!({
        "apiVersion": "supermesh.io/v1alpha1", "kind": "Microservice", "metadata": {"name": "probe"},
        "spec": {"mesh": "lan", "command": ["python3", "-c", PROBE], "ports": [{"port": 8080}],
                 "healthCheck": {"tcp": {"port": 8080}, "periodSeconds": 1}, "restartPolicy": "Always"}
    });
    apply_yaml(&serde_json::to_string(&probe).unwrap(), &["-n", &ns]).unwrap();
    let key = format!("{ns}/microservice/probe");

    // Network A finds its peers through the membership the cloud sends; network B also
    // through UDP multicast on its LAN.
    let mut a = start_net(&id, lan_a, port, &token, "");
    let mut b = start_net(
        &id,
        lan_b,
        port,
        &token,
        "supernode: {listen: \"0.0.0.0:10360\", heartbeatSeconds: 1, multicast: true}",
    );
    let names: Vec<String> = a.agents.iter().chain(&b.agents).map(|a| a.name.clone()).collect();

    // 1. One supernode per network: the first started, as every member agrees.
    for net in [&a, &b] {
        let expected = net.agents[0].name.clone();
        let members: Vec<&Agent> = net.agents.iter().collect();
        eventually(&format!("{} to elect {expected}", net.lan.network), Duration::from_secs(60), || {
            all_follow(&members, &root, &expected)
        })
        .await;
    }
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    for net in [&a, &b] {
        for (i, agent) in net.agents.iter().enumerate() {
            let want = if i == 0 { NodeRole::Supernode } else { NodeRole::Member };
            controller
                .wait_for(&nodes, &agent.name, "role and supernode in EdgeNode status", |n| {
                    role(n) == Some(want)
                        && n.status.as_ref().and_then(|s| s.supernode.as_deref()) == Some(&net.agents[0].name)
                })
                .await;
        }
    }
    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), &ns);
    let (sa, sb) = (a.agents[0].name.clone(), b.agents[0].name.clone());
    controller
        .wait_for(&meshes, "lan", "a cluster per network with its supernode", |m| {
            let clusters = m.status.as_ref().map(|s| s.clusters.clone()).unwrap_or_default();
            let of = |net: &str| clusters.iter().find(|c| c.network == net).and_then(|c| c.supernode.clone());
            clusters.len() == 2 && of(&a.lan.network) == Some(sa.clone()) && of(&b.lan.network) == Some(sb.clone())
        })
        .await;
    let printed = eventually("kubectl get mesh to show both supernodes", Duration::from_secs(30), || {
        let printed = kubectl(&["get", "mesh", "lan", "-n", &ns]);
        (printed.contains(&sa) && printed.contains(&sb)).then_some(printed)
    })
    .await;
    eprintln!("{printed}");
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    controller
        .wait_for(&msvcs, "probe", "6 ready instances", |m| m.status.as_ref().is_some_and(|s| s.ready_instances == 6))
        .await;

    // 2. Reports go upstream in batches, one message for several nodes' reports.
    let counter = |name: &str, path: &str| controller.metric(name, &format!("path=\"{path}\"")).unwrap_or(0.0);
    let (messages0, reports0) =
        (counter("supermesh_report_messages_total", "batch"), counter("supermesh_reports_total", "batch"));
    let direct0 = counter("supermesh_report_messages_total", "direct");
    eventually("60 more batched reports", Duration::from_secs(60), || {
        (counter("supermesh_reports_total", "batch") >= reports0 + 60.0).then_some(())
    })
    .await;
    let messages = counter("supermesh_report_messages_total", "batch") - messages0;
    let reports = counter("supermesh_reports_total", "batch") - reports0;
    let direct = counter("supermesh_report_messages_total", "direct") - direct0;
    eprintln!("upstream: {reports} reports in {messages} batch messages, {direct} direct messages");
    assert!(
        reports >= 2.0 * messages,
        "batches carry several nodes' reports: {reports} reports in {messages} messages"
    );
    assert!(reports > direct, "most reports go through the supernodes: {reports} batched, {direct} direct messages");

    // 3. The supernode of network A dies: a new one within three heartbeats, nothing lost.
    let (old, rest) = a.agents.split_at_mut(1);
    let survivors: Vec<&Agent> = rest.iter().collect();
    let before: Vec<u64> = survivors.iter().map(|s| s.registry_inside(&root).expect("registry").heartbeats).collect();
    old[0].kill9();
    let next = rest[0].name.clone();
    let registries =
        eventually(&format!("{next} to take over"), Duration::from_secs(30), || all_follow(&survivors, &root, &next))
            .await;
    for ((agent, r), at_kill) in survivors.iter().zip(&registries).zip(&before) {
        eprintln!("{}: supernode {next} elected at heartbeat {} (kill at {at_kill})", agent.name, r.elected_at);
        assert!(r.elected_at <= at_kill + 3, "{} elected after {} heartbeats", agent.name, r.elected_at - at_kill);
    }
    controller
        .wait_for(&nodes, &next, "the new supernode in its EdgeNode status", |n| role(n) == Some(NodeRole::Supernode))
        .await;
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);
    let goal: Vec<u64> = survivors.iter().map(|s| ticks(s, &key) + 10).collect();
    eventually("the survivors to post 10 more ticks", Duration::from_secs(60), || {
        survivors.iter().zip(&goal).all(|(s, g)| ticks(s, &key) >= *g).then_some(())
    })
    .await;
    let handed: Vec<(String, u64)> = survivors.iter().map(|s| (s.name.clone(), ticks(s, &key))).collect();
    let seen = all_ticks_arrive(&events, "every tick of the survivors at the cloud", &handed).await;
    for (node, n) in &handed {
        eprintln!("{node}: ticks 1..={n} all arrived ({} seen)", seen[node].len());
    }

    // 4. Network B loses the cloud: discovery and services keep working there, then status catches up.
    let cut_at = unix_now();
    b.lan.cut_cloud();
    for agent in &b.agents {
        controller
            .wait_for(&nodes, &agent.name, "Connected=False while cut off", |n| {
                n.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Connected" && c.status == "False"))
            })
            .await;
    }
    let pids: Vec<Option<i32>> = b.agents.iter().map(|a| a.instance_pid(&key)).collect();
    let offline_at = unix_now();
    for agent in &b.agents {
        let seen =
            eventually(&format!("{} to discover its network offline", agent.name), Duration::from_secs(30), || {
                discovery_since(agent, &key, offline_at)
            })
            .await;
        let live: Vec<&str> = seen["nodes"]["nodes"]
            .as_array()
            .map(|n| n.iter().filter(|n| n["live"] == true).filter_map(|n| n["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(live.len(), 3, "{}: all three nodes of its network are live: {seen}", agent.name);
        let answer = seen["answer"].as_str().unwrap_or_default();
        assert!(
            answer.starts_with("hello from") && answer.contains(&b.lan.network),
            "{}: a peer answered: {seen}",
            agent.name
        );
    }
    let handed_offline: Vec<u64> = b.agents.iter().map(|s| ticks(s, &key)).collect();
    let at_cloud = ticks_at_cloud(&events).await;
    let stalled = b.agents.iter().zip(&handed_offline).any(|(s, n)| !missing(at_cloud.get(&s.name), *n).is_empty());
    assert!(stalled, "ticks posted while the network is cut off cannot have reached the cloud yet");
    b.lan.restore_cloud();
    let want: Vec<(String, u64)> =
        b.agents.iter().map(|a| a.name.clone()).zip(handed_offline.iter().copied()).collect();
    all_ticks_arrive(&events, "network B's ticks of the outage to reach the cloud", &want).await;
    for agent in &b.agents {
        controller
            .wait_for(&nodes, &agent.name, "Connected again, role reported", |n| {
                role(n).is_some()
                    && n.status
                        .as_ref()
                        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Connected" && c.status == "True"))
            })
            .await;
    }
    let pids_after: Vec<Option<i32>> = b.agents.iter().map(|a| a.instance_pid(&key)).collect();
    assert_eq!(pids, pids_after, "no instance of network B restarted");
    eprintln!("network B: cut off {:.0} s; every tick it posted meanwhile arrived afterwards", unix_now() - cut_at);

    // 5. The old supernode comes back as a member: the incumbent keeps the role (no flapping).
    a.agents[0].restart();
    let rejoined: Vec<&Agent> = a.agents.iter().collect();
    eventually("the old supernode to follow the new one", Duration::from_secs(30), || {
        all_follow(&rejoined, &root, &next)
    })
    .await;

    for agent in a.agents.iter_mut().chain(b.agents.iter_mut()) {
        agent.stop();
    }
    delete_all(&nodes, &names).await;
}
