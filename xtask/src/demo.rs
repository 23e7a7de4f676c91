//! `cargo xtask demo`: the examples on three agents of this machine, and what the cluster
//! shows. By default the controller runs as a local process against the local control
//! plane; with `--cluster` Helm installs it from charts/supermesh on the single-node
//! cluster (`cargo xtask cluster`), and the agents join through its NodePort.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::Pid;

use crate::controlplane::{free_port, stop, ControlPlane};
use crate::shell::{self, cargo, target_dir, workspace_root};

/// The chart's release and namespace in the cluster demo.
const RELEASE: &str = "supermesh";
const NAMESPACE: &str = "supermesh";
/// How long the chart's Pods may take to start and pass their probes.
const INSTALL_TIMEOUT: &str = "180s";

pub fn run(cluster: bool) -> Result<()> {
    // From here on Ctrl-C (or SIGTERM) ends the demo through its cleanup, whenever it comes.
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst)).context("cannot install the Ctrl-C handler")?;
    eprintln!("==> building supermesh-controller, supermeshctl and supermesh-agent");
    shell::run(cargo().args([
        "build",
        "--quiet",
        "--bin",
        "supermesh-controller",
        "--bin",
        "supermeshctl",
        "--bin",
        "supermesh-agent",
    ]))?;
    if cluster {
        on_cluster()
    } else {
        on_control_plane()
    }
}

/// The controller as a local process, on the control plane (brought up if needed and
/// stopped afterwards only when this call started it).
fn on_control_plane() -> Result<()> {
    let plane = ControlPlane::new();
    let started_plane = !plane.is_running();
    plane.up()?;
    let result = Demo::new(plane.kubeconfig()).and_then(|demo| with_local_controller(&demo));
    if started_plane {
        plane.down()?;
    }
    result
}

fn with_local_controller(demo: &Demo) -> Result<()> {
    let root = workspace_root();
    demo.kubectl(&["apply", "--server-side", "-f", &root.join("crds").display().to_string()])?;
    for crd in ["meshes", "edgenodes", "microservices"] {
        demo.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", &format!("crd/{crd}.supermesh.io")])?;
    }
    let log_path = demo.dir.join("controller.log");
    let log = fs::File::create(&log_path)?;
    demo.kubectl(&["create", "namespace", NAMESPACE]).or_else(|e| {
        if e.to_string().contains("AlreadyExists") {
            Ok(String::new())
        } else {
            Err(e)
        }
    })?;
    let metrics = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let cloudhub = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    eprintln!("==> starting supermesh-controller (metrics on http://{metrics}/metrics, log in {})", log_path.display());
    let mut controller = Command::new(target_dir().join("debug/supermesh-controller"))
        .args(["--metrics-addr", &metrics.to_string(), "--cloudhub-addr", &cloudhub.to_string()])
        .env("KUBECONFIG", &demo.kubeconfig)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start supermesh-controller")?;
    let result = demo.show(&cloudhub.to_string(), &[]);
    eprintln!("==> stopping supermesh-controller");
    end(&mut controller);
    result
}

/// The controller image installed with the chart on the cluster (brought up if needed and
/// stopped afterwards only when this call started it; or the one
/// `SUPERMESH_CLUSTER_KUBECONFIG` names, holding the image).
fn on_cluster() -> Result<()> {
    let image = crate::image::build()?;
    let helm = crate::helm::ensure_helm()?.join("helm");
    crate::cluster::with_cluster(&image, |kubeconfig| with_release(&Demo::new(kubeconfig.into())?, &helm))
}

/// `helm install` of the chart with the cloudhub on a NodePort of the node's address, the
/// demo through it, then `helm uninstall` and the namespace deleted, whatever happened.
fn with_release(demo: &Demo, helm: &Path) -> Result<()> {
    // A namespace of an earlier run may still be going away; one in use is not the demo's.
    wait_for(&format!("namespace {NAMESPACE} of an earlier run to be deleted"), || {
        match demo.kubectl(&["get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}"]) {
            Err(_) => Some(Ok(())),
            Ok(phase) if phase.trim() == "Terminating" => None,
            Ok(_) => Some(Err(anyhow!(
                "namespace {NAMESPACE} exists: is another demo or `cargo xtask test` using this cluster? \
                 If not, remove it: helm uninstall {RELEASE} -n {NAMESPACE}; kubectl delete namespace {NAMESPACE}"
            ))),
        }
    })??;
    let address = "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}";
    let node_ip = demo.kubectl(&["get", "nodes", "-o", address])?.trim().to_owned();
    if node_ip.is_empty() {
        bail!("the cluster's node has no InternalIP for the agents to dial");
    }
    let chart = workspace_root().join("charts/supermesh").display().to_string();
    let names = format!("cloudhub.names={{{node_ip}}}");
    let args = ["install", RELEASE, &chart, "-n", NAMESPACE, "--create-namespace"];
    let args = [&args[..], &["--set", "cloudhub.serviceType=NodePort", "--set", &names]].concat();
    let args = [&args[..], &["--wait", "--timeout", INSTALL_TIMEOUT]].concat();
    eprintln!("==> helm {}", args.join(" ").replace(&chart, "charts/supermesh"));
    let installed = demo.helm(helm, &args).and_then(|_| {
        println!("{}", demo.kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "wide"])?);
        let port = "jsonpath={.spec.ports[0].nodePort}";
        let node_port = demo.kubectl(&["-n", NAMESPACE, "get", "svc", "supermesh-controller-cloudhub", "-o", port])?;
        let supermeshctl = target_dir().join("debug/supermeshctl");
        let logs = [
            format!("kubectl -n {NAMESPACE} port-forward svc/supermesh-controller 8080 &  # the controller's HTTP"),
            format!("{} logs default/hello --node pi-kitchen  # hello's log, from its device", supermeshctl.display()),
        ];
        demo.show(&format!("{node_ip}:{}", node_port.trim()), &logs)
    });
    eprintln!("==> helm uninstall {RELEASE} -n {NAMESPACE}");
    let uninstalled = demo.helm(helm, &["uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", INSTALL_TIMEOUT]);
    eprintln!("==> kubectl delete namespace {NAMESPACE}");
    let deleted = demo.kubectl(&["delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s"]);
    installed.and(uninstalled.map(drop)).and(deleted.map(drop))
}

/// The demo's agents: three devices of the `home` network, as in examples/edgenodes.yaml.
const AGENTS: [&str; 3] = ["pi-kitchen", "pi-garage", "pi-attic"];

/// How the demo makes the token its devices join with: scoped to their account, network and
/// names, approving what it enrolls, valid for an hour.
const TOKEN_ARGS: [&str; 12] = [
    "token",
    "create",
    "--auto-approve",
    "--account",
    "acme",
    "--network",
    "home",
    "--node-pattern",
    "pi-*",
    "--ttl",
    "1h",
    "--description=cargo xtask demo",
];

/// What both demos share: the cluster the controller watches, and the agents' directory.
struct Demo {
    kubeconfig: PathBuf,
    /// target/demo: the agents' homes and the local controller's log.
    dir: PathBuf,
}

impl Demo {
    fn new(kubeconfig: PathBuf) -> Result<Demo> {
        let dir = target_dir().join("demo");
        fs::create_dir_all(&dir)?;
        Ok(Demo { kubeconfig, dir })
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        shell::output(Command::new("kubectl").arg("--kubeconfig").arg(&self.kubeconfig).args(args))
    }

    fn helm(&self, helm: &Path, args: &[&str]) -> Result<String> {
        shell::output(Command::new(helm).args(args).arg("--kubeconfig").arg(&self.kubeconfig))
    }

    /// With the controller running and its cloudhub at `cloud`: applies the examples, joins
    /// the agents, shows the result (and `hints`) until Ctrl-C, and removes what it made.
    fn show(&self, cloud: &str, hints: &[String]) -> Result<()> {
        let mut agents = Vec::new();
        let result = self
            .apply_and_wait()
            .and_then(|()| self.start_agents(cloud, &mut agents))
            .and_then(|()| self.show_rollout())
            .and_then(|()| self.print_results(hints))
            .and_then(|()| wait_for_signal());
        self.cleanup(agents);
        result
    }

    fn examples(&self) -> String {
        workspace_root().join("examples").display().to_string()
    }

    fn apply_and_wait(&self) -> Result<()> {
        eprintln!("==> kubectl apply -f examples/");
        print!("{}", self.kubectl(&["apply", "-f", &self.examples()])?);
        let query = "{range .items[*]}{.status.observedGeneration}{\"\\n\"}{end}";
        wait_for("the controller to write status", || {
            let out = self.kubectl(&["get", "msvc,mesh", "-A", "-o", &format!("jsonpath={query}")]).ok()?;
            (!out.is_empty() && out.lines().all(|l| !l.trim().is_empty())).then_some(())
        })
    }

    /// Joins one agent per entry of `AGENTS` to the cloudhub at `cloud` with a token made for
    /// them, as a user does (`supermesh-agent join`), and waits until they are enrolled,
    /// connected and hold what is placed on them.
    fn start_agents(&self, cloud: &str, agents: &mut Vec<Child>) -> Result<()> {
        eprintln!("==> supermeshctl {}", TOKEN_ARGS.join(" "));
        let token = wait_for("the controller's CA, to make a join token", || {
            let out = Command::new(target_dir().join("debug/supermeshctl"))
                .args(TOKEN_ARGS)
                .env("KUBECONFIG", &self.kubeconfig)
                .output()
                .ok()?;
            let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let made = out.status.success() && !token.is_empty();
            if made {
                eprint!("    {}", String::from_utf8_lossy(&out.stderr));
            }
            made.then_some(token)
        })?;
        for name in AGENTS {
            let home = self.dir.join("agents").join(name);
            let _ = fs::remove_dir_all(&home);
            fs::create_dir_all(&home)?;
            // The three "devices" share this machine, so each gets its own peer and local API ports.
            let (peer, api) = (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
            let log = fs::File::create(home.join("agent.log"))?;
            // join writes edge.yaml and execs the agent in place: the child's pid is the agent's.
            let child = Command::new(target_dir().join("debug/supermesh-agent"))
                .args(["join", "--cloud", cloud, "--token", &token, "--name", name, "--account", "acme"])
                .args(["--network", "home", "--peer-listen", &peer, "--api-listen", &api])
                .arg("--config")
                .arg(home.join("edge.yaml"))
                .arg("--data-dir")
                .arg(home.join("data"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start supermesh-agent")?;
            agents.push(child);
        }
        eprintln!("==> started agents {} (logs in {})", AGENTS.join(", "), self.dir.join("agents").display());
        let connected = "{range .items[*]}{.status.conditions[?(@.type==\"Connected\")].status}{\" \"}{end}";
        wait_for("three connected agents", || {
            let out = self.kubectl(&["get", "edgenodes", "-o", &format!("jsonpath={connected}")]).ok()?;
            (out.split_whitespace().filter(|s| *s == "True").count() >= AGENTS.len()).then_some(())
        })?;
        let kitchen = self.data_dir("pi-kitchen");
        wait_for("the microservices to reach pi-kitchen", || {
            inspect(&kitchen).ok().filter(|r| r.contains("default/microservice/hello"))
        })?;
        wait_for("hello to be ready on the three agents", || {
            let ready = self.kubectl(&["get", "msvc", "hello", "-o", "jsonpath={.status.readyInstances}"]).ok()?;
            (ready.trim() == "3").then_some(())
        })?;
        Ok(())
    }

    fn data_dir(&self, agent: &str) -> PathBuf {
        self.dir.join("agents").join(agent).join("data")
    }

    fn supermeshctl(&self, args: &[&str]) -> Result<String> {
        shell::output(
            Command::new(target_dir().join("debug/supermeshctl")).args(args).env("KUBECONFIG", &self.kubeconfig),
        )
    }

    /// Changes `sensor-reader`, which examples/rollout.yaml rolls out in health-gated waves,
    /// and prints its rollout as `supermeshctl rollout status` tells it, until it completes.
    fn show_rollout(&self) -> Result<()> {
        wait_for("sensor-reader to be ready on the three agents", || {
            let ready =
                self.kubectl(&["get", "msvc", "sensor-reader", "-o", "jsonpath={.status.readyInstances}"]).ok()?;
            (ready.trim() == "3").then_some(())
        })?;
        eprintln!("==> kubectl patch configmap sensor-settings  # interval 5 -> 3: revision 2, rolled out in waves");
        let patch = r#"{"data":{"interval":"3"}}"#;
        self.kubectl(&["patch", "configmap", "sensor-settings", "--type=merge", "-p", patch])?;
        eprintln!("==> supermeshctl rollout status default/sensor-reader  # polled until the rollout completes");
        let mut shown = String::new();
        wait_within("the rollout of sensor-reader to complete", Duration::from_secs(180), || {
            let status = self.supermeshctl(&["rollout", "status", "default/sensor-reader"]).ok()?;
            if status != shown {
                println!("{status}");
                shown = status;
            }
            shown.contains("Complete").then_some(())
        })
    }

    fn print_results(&self, hints: &[String]) -> Result<()> {
        println!("{}", self.kubectl(&["get", "mesh,edgenodes,msvc", "-A"])?);
        println!("What agent pi-kitchen stored in its SQLite (supermesh-agent inspect):");
        println!("{}", inspect(&self.data_dir("pi-kitchen"))?);
        println!("An answer from the hello instance on pi-kitchen:");
        println!("{}", hello_answer(&self.data_dir("pi-kitchen"))?);
        println!("The controller keeps running. Try: export KUBECONFIG={}", self.kubeconfig.display());
        println!("  kubectl describe msvc hello    # conditions and events");
        println!("  kubectl label edgenode pi-attic role=spare; kubectl get msvc  # placement follows");
        println!("  kubectl describe msvc sensor-reader  # the rollout's waves, as Events");
        for hint in hints {
            println!("  {hint}");
        }
        println!("Press Ctrl-C to stop everything the demo started.");
        Ok(())
    }

    /// Stops the agents and their instances, then deletes the examples while the controller
    /// still runs, so that it removes its finalizers.
    fn cleanup(&self, agents: Vec<Child>) {
        for mut agent in agents {
            end(&mut agent);
        }
        // Agents leave instances running on purpose (a restarted agent adopts them); the demo does not.
        for name in AGENTS {
            for group in instance_groups(&self.data_dir(name)) {
                stop(group, Duration::from_secs(10));
            }
        }
        eprintln!("==> kubectl delete -f examples/");
        let examples = self.examples();
        if let Err(e) = self.kubectl(&["delete", "--ignore-not-found", "--timeout=60s", "-f", &examples]) {
            // Left with finalizers, they would outlive the controller: drop them.
            eprintln!("    {e:#}; removing their finalizers");
            let finalizers = r#"{"metadata":{"finalizers":null}}"#;
            let _ = self.kubectl(&["patch", "-f", &examples, "--type=merge", "-p", finalizers]);
            let _ = self.kubectl(&["delete", "--ignore-not-found", "--wait=false", "-f", &examples]);
        }
    }
}

/// Stops a process the demo started and reaps it.
fn end(child: &mut Child) {
    stop(Pid::from_raw(child.id() as i32), Duration::from_secs(10));
    let _ = child.wait();
}

/// Instance records (`instance.json`) of an agent's data dir, with the process group each started.
fn instance_groups(data_dir: &Path) -> Vec<Pid> {
    let Ok(dirs) = fs::read_dir(data_dir.join("instances")) else { return Vec::new() };
    dirs.filter_map(|d| {
        let record: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(d.ok()?.path().join("instance.json")).ok()?).ok()?;
        Some(Pid::from_raw(-i32::try_from(record["process"]["pid"].as_i64()?).ok()?))
    })
    .collect()
}

/// GETs the hello instance of the agent with `data_dir`, on the port it recorded.
fn hello_answer(data_dir: &Path) -> Result<String> {
    use std::io::{Read, Write};
    let dirs = fs::read_dir(data_dir.join("instances"))?;
    let port = dirs
        .filter_map(|d| fs::read_to_string(d.ok()?.path().join("work/port")).ok())
        .find_map(|p| p.trim().parse::<u16>().ok())
        .context("the hello instance has not written its port")?;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(stream, "GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.rsplit("\r\n\r\n").next().unwrap_or_default().trim().to_owned())
}

fn inspect(data_dir: &Path) -> Result<String> {
    shell::output(
        Command::new(target_dir().join("debug/supermesh-agent")).arg("inspect").arg("--data-dir").arg(data_dir),
    )
}

/// Set by Ctrl-C or SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Polls `check` for up to 60 s; fails at once on Ctrl-C.
fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> Result<T> {
    wait_within(what, Duration::from_secs(60), check)
}

fn wait_within<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted while waiting for {what}");
        }
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {} s waiting for {what}; logs are in target/demo/", within.as_secs());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn wait_for_signal() -> Result<()> {
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
