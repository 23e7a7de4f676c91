//! The product as a user installs it, on a real Kubernetes cluster with Pods (`cargo xtask
//! cluster up`, kind, or any cluster `KUBECONFIG` names, with the controller image loaded):
//! `helm install` of charts/supermesh, devices joining through the agents' Service with a
//! token taken from the cluster, `kubectl apply -f examples/`, logs read through the
//! cluster, a `helm upgrade` that restarts the controller while no instance restarts and no
//! EdgeNode flaps, and a `helm uninstall` that leaves CRDs and devices running.
//!
//! `cargo xtask test` runs it in its cluster tier (it builds and loads the image, and puts
//! Helm on PATH). The README's "Using it on a cluster" follows these steps.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use supermesh_api::EdgeNode;
use supermesh_tests::{binary, kubectl, try_kubectl, workspace, Agent, DEADLINE};

const RELEASE: &str = "supermesh";
const NAMESPACE: &str = "supermesh";
const DEVICES: [&str; 3] = ["pi-kitchen", "pi-garage", "pi-attic"];
/// How long Pods may take to start and pass their probes.
const INSTALL_TIMEOUT: &str = "180s";

/// Runs `helm ARGS`; panics with its output when it fails.
fn helm(args: &[&str]) -> String {
    let out = Command::new("helm")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("helm is on PATH (`cargo xtask test` puts it there; or install Helm 3.13+ or 4)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "helm {} failed: {stderr}{stdout}", args.join(" "));
    eprintln!("$ helm {}\n{stdout}", args.join(" "));
    stdout.into_owned()
}

/// `helm install|upgrade` of the release from `chart` with `args`, waiting for the rollout.
fn helm_release(verb: &str, chart: &str, args: &[&str]) -> String {
    let release = [verb, RELEASE, chart, "-n", NAMESPACE, "--wait", "--timeout", INSTALL_TIMEOUT];
    helm(&[&release[..], args].concat())
}

fn supermeshctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new(binary("supermeshctl")).args(args).output().map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn jsonpath(args: &[&str], path: &str) -> String {
    let mut all = args.to_vec();
    let query = format!("jsonpath={path}");
    all.extend(["-o", query.as_str()]);
    kubectl(&all).trim().to_owned()
}

fn connected(node: &EdgeNode) -> Option<&str> {
    let status = node.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == "Connected").map(|c| c.status.as_str())
}

/// Polls `check` every 250 ms until it gives a value; fails naming `what` after `limit`.
async fn wait<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    wait_for(what, limit, || check().ok_or_else(String::new)).await
}

/// Polls `check` every 250 ms until it gives `Ok`; fails naming `what` and the last `Err`
/// (why not yet) after `limit`.
async fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let why = match check() {
            Ok(v) => return v,
            Err(why) => why,
        };
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}: {why}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The controller's Pods, by name, with whether each is Ready.
fn controller_pods() -> BTreeMap<String, bool> {
    let query =
        "{range .items[*]}{.metadata.name}{\" \"}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}";
    let out = jsonpath(&["-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=supermesh-controller"], query);
    out.lines()
        .filter_map(|l| {
            let (name, ready) = l.split_once(' ').unwrap_or((l, ""));
            (!name.is_empty()).then(|| (name.to_owned(), ready == "True"))
        })
        .collect()
}

/// Every instance process of the devices, by instance directory: what must survive an upgrade.
fn instance_pids(agents: &[Agent]) -> BTreeMap<String, i32> {
    let mut pids = BTreeMap::new();
    for agent in agents {
        let Ok(dirs) = std::fs::read_dir(agent.data_dir.join("instances")) else { continue };
        for dir in dirs.flatten() {
            let text = std::fs::read_to_string(dir.path().join("instance.json")).unwrap_or_default();
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
            if let Some(pid) = record["process"]["pid"].as_i64() {
                pids.insert(format!("{}:{}", agent.name, record["key"].as_str().unwrap_or_default()), pid as i32);
            }
        }
    }
    pids
}

/// How many sessions with the cloud the agent has opened so far.
fn sessions_of(agent: &Agent) -> usize {
    agent.log().lines().filter(|l| l.contains("connected to the cloud")).count()
}

/// Whether the agent's last word on its link is a session opened (not a loss or a handover).
fn online(agent: &Agent) -> bool {
    let link = ["connected to the cloud", "disconnected from the cloud", "handed this node to another replica"];
    let log = agent.log();
    let last = log.lines().rev().find(|l| link.iter().any(|m| l.contains(m)));
    last.is_some_and(|l| l.contains(link[0]))
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// GETs the hello instance of `agent` on the port it wrote in its working directory.
fn hello_answer(agent: &Agent) -> String {
    use std::io::{Read, Write};
    let dirs = std::fs::read_dir(agent.data_dir.join("instances")).expect("instances");
    let port = dirs
        .filter_map(|d| std::fs::read_to_string(d.ok()?.path().join("work/port")).ok())
        .find_map(|p| p.trim().parse::<u16>().ok())
        .expect("the hello instance wrote its port");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("hello answers");
    write!(stream, "GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.rsplit("\r\n\r\n").next().unwrap_or_default().trim().to_owned()
}

/// `kubectl port-forward` to the controller's HTTP Service, killed on drop.
struct PortForward {
    child: Child,
    url: String,
    /// kubectl reports each connection on its output: kept open, or it dies writing.
    _output: BufReader<std::process::ChildStdout>,
}

impl PortForward {
    fn start() -> PortForward {
        let mut child = Command::new("kubectl")
            .args(["-n", NAMESPACE, "port-forward", "svc/supermesh-controller", ":8080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl port-forward");
        // "Forwarding from 127.0.0.1:40123 -> 8080"
        let mut line = String::new();
        let mut output = BufReader::new(child.stdout.take().expect("stdout"));
        output.read_line(&mut line).expect("port-forward output");
        let addr = line.split_whitespace().nth(2).unwrap_or_default().to_owned();
        assert!(addr.starts_with("127.0.0.1:"), "unexpected port-forward output: {line:?}");
        PortForward { child, url: format!("http://{addr}"), _output: output }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test leaves behind is removed even when it fails half-way.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let examples = workspace().join("examples").display().to_string();
        // A controller still installed finalizes what it placed; after `helm uninstall` nothing
        // would, so the test (as an admin leaving for good) drops the finalizers itself.
        if try_kubectl(&["-n", NAMESPACE, "get", "deployment", "supermesh-controller"]).is_ok() {
            let _ = try_kubectl(&["delete", "--ignore-not-found", "--timeout=30s", "-f", &examples]);
            let _ = Command::new("helm").args(["uninstall", RELEASE, "-n", NAMESPACE]).output();
        }
        let _ = try_kubectl(&["patch", "-f", &examples, "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#]);
        let _ = try_kubectl(&["delete", "--ignore-not-found", "--wait=false", "-f", &examples]);
        let _ = try_kubectl(&["delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false"]);
    }
}

#[tokio::test]
async fn helm_install_join_upgrade_and_uninstall_on_a_real_cluster() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "this test needs a cluster with a node: run it through `cargo xtask test`, or set KUBECONFIG \
         (for example from `cargo xtask cluster up`) and load the image from `cargo xtask image`"
    );
    let client = Client::try_default().await.expect("a client for KUBECONFIG");
    let ready_nodes = jsonpath(&["get", "nodes"], "{.items[*].status.conditions[?(@.type==\"Ready\")].status}");
    assert!(ready_nodes.contains("True"), "the cluster has no Ready node to run the controller on");
    // Devices dial the node's address, on the agents' NodePort.
    let node_ip = jsonpath(&["get", "nodes"], "{.items[0].status.addresses[?(@.type==\"InternalIP\")].address}");
    assert!(!node_ip.is_empty(), "the node has no InternalIP");
    // A namespace of an earlier run may still be going away.
    wait("namespace supermesh of an earlier run to be gone", DEADLINE * 2, || {
        try_kubectl(&["get", "namespace", NAMESPACE]).is_err().then_some(())
    })
    .await;
    let _cleanup = Cleanup;

    // Install the chart as a user would, exposing the agents' port on every node.
    let chart = workspace().join("charts/supermesh").display().to_string();
    let names = format!("cloudhub.names={{{node_ip}}}");
    let service = ["--set", "cloudhub.serviceType=NodePort", "--set", &names];
    helm_release("install", &chart, &[&["--create-namespace"], &service[..]].concat());
    let pods = controller_pods();
    assert!(!pods.is_empty() && pods.values().all(|r| *r), "controller Pods not all Ready: {pods:?}");
    eprintln!("{}", kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "wide"]));
    let node_port =
        jsonpath(&["-n", NAMESPACE, "get", "svc", "supermesh-controller-cloudhub"], "{.spec.ports[0].nodePort}");
    let cloud = format!("{node_ip}:{node_port}");

    // A join token from the cluster; three devices join through the NodePort.
    let args = ["--namespace", NAMESPACE, "token", "create", "--auto-approve", "--account", "acme"];
    let args = [&args[..], &["--network", "home", "--node-pattern", "pi-*", "--ttl", "1h"]].concat();
    let token = wait("the controller's CA, to make a join token", DEADLINE, || {
        supermeshctl(&args).ok().map(|t| t.trim().to_owned())
    })
    .await;
    let agents: Vec<Agent> = DEVICES.iter().map(|name| Agent::join(name, "home", "acme", &cloud, &token)).collect();
    let nodes: Api<EdgeNode> = Api::all(client.clone());
    for agent in &agents {
        let deadline = tokio::time::Instant::now() + DEADLINE * 2;
        let node = loop {
            let node = nodes.get_opt(&agent.name).await.ok().flatten();
            if let Some(node) = node.filter(|n| connected(n) == Some("True")) {
                break node;
            }
            assert!(tokio::time::Instant::now() < deadline, "{} not Connected=True:\n{}", agent.name, agent.log());
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(node.spec.network, "home");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(agent.config()).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "join wrote {} readable by others", agent.config().display());
    }

    // The examples, applied with kubectl, reach the devices.
    let examples = workspace().join("examples").display().to_string();
    eprintln!("{}", kubectl(&["apply", "-f", &examples]));
    wait("hello 3/3 ready", DEADLINE * 2, || {
        (jsonpath(&["get", "msvc", "hello"], "{.status.readyInstances}") == "3").then_some(())
    })
    .await;
    eprintln!("{}", kubectl(&["get", "mesh,edgenodes,msvc", "-A"]));

    // An instance's log, read from its device through the cluster (as an admin of it): a
    // request to hello on pi-kitchen shows in the log hello writes there.
    let kitchen = &agents[0];
    let answer = hello_answer(kitchen);
    assert_eq!(answer, "hello from pi-kitchen");
    let forward = PortForward::start();
    let log = wait_for("hello's log through the controller", DEADLINE, || {
        let args =
            ["--namespace", NAMESPACE, "--controller", &forward.url, "logs", "default/hello", "--node", "pi-kitchen"];
        match supermeshctl(&args) {
            Ok(log) if log.contains("GET / ") => Ok(log),
            Ok(log) => Err(format!("the log has no request yet:\n{log}")),
            Err(e) => Err(e),
        }
    })
    .await;
    eprintln!("supermeshctl logs default/hello --node pi-kitchen:\n{log}");
    let stranger = ["--controller", &forward.url, "--token", "not-a-token", "logs", "default/hello"];
    let refused = supermeshctl(&stranger);
    assert!(refused.is_err(), "logs were read without a valid token: {refused:?}");
    eprintln!("with a token the cluster does not know: {}", refused.unwrap_err().trim());
    drop(forward);

    // helm upgrade to a new revision of the controller: its Pods are replaced while every
    // instance on the devices keeps its process and no EdgeNode turns Connected=False.
    let before = instance_pids(&agents);
    assert!(before.len() >= DEVICES.len(), "instances not recorded: {before:?}");
    let old_pods: BTreeSet<String> = controller_pods().into_keys().collect();
    let sessions_before: Vec<usize> = agents.iter().map(sessions_of).collect();
    let flapped = Arc::new(Mutex::new(Vec::<String>::new()));
    let marker_seen = Arc::new(Mutex::new(false));
    let watch = {
        let (flapped, marker_seen) = (flapped.clone(), marker_seen.clone());
        let stream = watcher(nodes.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(node)) = stream.next().await {
                let name = node.metadata.name.clone().unwrap_or_default();
                if DEVICES.contains(&name.as_str()) && connected(&node) == Some("False") {
                    flapped.lock().unwrap().push(name);
                }
                if node.metadata.labels.as_ref().is_some_and(|l| l.contains_key("upgrade-test-marker")) {
                    *marker_seen.lock().unwrap() = true;
                }
            }
        })
    };
    helm_release("upgrade", &chart, &["--reuse-values", "--set", "logLevel=debug"]);
    let new_pods = wait("the old controller Pods gone", DEADLINE * 2, || {
        let pods = controller_pods();
        let fresh = !pods.is_empty() && pods.keys().all(|p| !old_pods.contains(p)) && pods.values().all(|r| *r);
        fresh.then_some(pods)
    })
    .await;
    eprintln!("controller Pods before the upgrade: {old_pods:?}, after: {:?}", new_pods.keys().collect::<Vec<_>>());
    // Every device reconnected to the new Pods (a report they send now is taken), and the
    // watch has seen everything up to a marker written after that.
    for (agent, sessions) in agents.iter().zip(&sessions_before) {
        wait(&format!("{}'s session on a new controller Pod", agent.name), DEADLINE * 2, || {
            (sessions_of(agent) > *sessions && online(agent)).then_some(())
        })
        .await;
    }
    kubectl(&["label", "edgenode", DEVICES[0], "upgrade-test-marker=1", "--overwrite"]);
    wait("the EdgeNode watch to catch up", DEADLINE, || marker_seen.lock().unwrap().then_some(())).await;
    watch.abort();
    assert_eq!(*flapped.lock().unwrap(), Vec::<String>::new(), "EdgeNodes turned Connected=False during the upgrade");
    let after = instance_pids(&agents);
    eprintln!("instance PIDs before the upgrade: {before:?}\ninstance PIDs after:  {after:?}");
    assert_eq!(after, before, "instances were restarted during the upgrade");
    assert!(before.values().all(|pid| alive(*pid)), "an instance died during the upgrade");
    wait("hello 3/3 ready after the upgrade", DEADLINE, || {
        (jsonpath(&["get", "msvc", "hello"], "{.status.readyInstances}") == "3").then_some(())
    })
    .await;

    // helm uninstall removes what the chart installed; CRDs and what devices run stay.
    helm(&["uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", INSTALL_TIMEOUT]);
    for kind in ["deployment", "service", "serviceaccount", "role", "rolebinding"] {
        let left = kubectl(&["-n", NAMESPACE, "get", kind, "-l", "app.kubernetes.io/instance=supermesh", "-o", "name"]);
        assert!(left.trim().is_empty(), "helm uninstall left {left}");
    }
    for kind in ["clusterrole", "clusterrolebinding"] {
        assert!(try_kubectl(&["get", kind, "supermesh-controller"]).is_err(), "helm uninstall left the {kind}");
    }
    for crd in ["meshes", "edgenodes", "microservices"] {
        kubectl(&["get", "crd", &format!("{crd}.supermesh.io")]);
    }
    assert!(instance_pids(&agents).values().all(|pid| alive(*pid)), "devices stopped their instances at uninstall");
    assert_eq!(instance_pids(&agents), before, "devices restarted instances when the controller went away");
}
