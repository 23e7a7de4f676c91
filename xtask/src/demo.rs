//! `cargo xtask demo`: control plane, controller, examples, and what the cluster shows.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use crate::controlplane::{stop, ControlPlane};
use crate::shell::{self, cargo, target_dir, workspace_root};

pub fn run() -> Result<()> {
    let plane = ControlPlane::new();
    let started_plane = !plane.is_running();
    plane.up()?;
    let result = show(&plane);
    if started_plane {
        plane.down()?;
    }
    result
}

fn show(plane: &ControlPlane) -> Result<()> {
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
    let root = workspace_root();
    plane.kubectl(&["apply", "--server-side", "-f", &root.join("crds").display().to_string()])?;
    for crd in ["meshes", "edgenodes", "microservices"] {
        plane.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", &format!("crd/{crd}.supermesh.io")])?;
    }

    let dir = target_dir().join("demo");
    fs::create_dir_all(&dir)?;
    let log_path = dir.join("controller.log");
    let log = fs::File::create(&log_path)?;
    plane.kubectl(&["create", "namespace", "supermesh"]).or_else(|e| {
        if e.to_string().contains("AlreadyExists") {
            Ok(String::new())
        } else {
            Err(e)
        }
    })?;
    let metrics = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let cloudhub = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    eprintln!("==> starting supermesh-controller (metrics on http://{metrics}/metrics, log in {})", log_path.display());
    let controller = Command::new(target_dir().join("debug/supermesh-controller"))
        .args(["--metrics-addr", &metrics.to_string(), "--cloudhub-addr", &cloudhub.to_string()])
        .env("KUBECONFIG", plane.kubeconfig())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start supermesh-controller")?;
    let pid = Pid::from_raw(controller.id() as i32);
    let mut agents = Vec::new();
    let result = apply_and_wait(plane, &root.join("examples").display().to_string())
        .and_then(|()| start_agents(plane, &cloudhub.to_string(), &dir, &mut agents));
    let result = result.and_then(|()| {
        println!("{}", plane.kubectl(&["get", "mesh,edgenodes,msvc", "-A"])?);
        println!("What agent pi-kitchen stored in its SQLite (supermesh-agent inspect):");
        println!("{}", inspect(&dir.join("agents/pi-kitchen/data"))?);
        println!("An answer from the hello instance on pi-kitchen:");
        println!("{}", hello_answer(&dir.join("agents/pi-kitchen/data"))?);
        println!("The controller keeps running. Try: export KUBECONFIG={}", plane.kubeconfig().display());
        println!("  kubectl describe msvc hello    # conditions and events");
        println!("  kubectl label edgenode pi-attic role=spare; kubectl get msvc  # placement follows");
        println!("Press Ctrl-C to stop everything the demo started.");
        wait_for_signal()
    });
    for agent in agents {
        stop(agent, Duration::from_secs(10));
    }
    // Agents leave instances running on purpose (a restarted agent adopts them); the demo does not.
    for name in AGENTS {
        for group in instance_groups(&dir.join("agents").join(name).join("data")) {
            stop(group, Duration::from_secs(10));
        }
    }
    eprintln!("==> stopping supermesh-controller");
    stop(pid, Duration::from_secs(10));
    result
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

/// Starts one agent per entry of `AGENTS` with a join token made for them, and waits until
/// they are enrolled, connected and hold what is placed on them.
fn start_agents(plane: &ControlPlane, cloudhub: &str, dir: &Path, pids: &mut Vec<Pid>) -> Result<()> {
    eprintln!("==> supermeshctl {}", TOKEN_ARGS.join(" "));
    let token = wait_for("the controller's CA, to make a join token", || {
        let out = Command::new(target_dir().join("debug/supermeshctl"))
            .args(TOKEN_ARGS)
            .env("KUBECONFIG", plane.kubeconfig())
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
        let home = dir.join("agents").join(name);
        let _ = fs::remove_dir_all(&home);
        fs::create_dir_all(&home)?;
        let config = home.join("edge.yaml");
        // The three "devices" share this machine, so each gets its own peer and local API ports.
        let (peer, api) = (crate::controlplane::free_port()?, crate::controlplane::free_port()?);
        let yaml = format!(
            "node: {{name: {name}, account: acme, network: home}}\ncloud: {{address: \"{cloudhub}\", token: \"{token}\"}}\ndataDir: {}\nmeta:\n  sync:\n    podstatus:\n      interval: 60\nsupernode: {{listen: \"127.0.0.1:{peer}\", heartbeatSeconds: 1}}\nlocalApi: {{listen: \"127.0.0.1:{api}\"}}\n",
            home.join("data").display()
        );
        fs::write(&config, yaml)?;
        let log = fs::File::create(home.join("agent.log"))?;
        let child = Command::new(target_dir().join("debug/supermesh-agent"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start supermesh-agent")?;
        pids.push(Pid::from_raw(child.id() as i32));
    }
    eprintln!("==> started agents {} (logs in {})", AGENTS.join(", "), dir.join("agents").display());
    let connected = "{range .items[*]}{.status.conditions[?(@.type==\"Connected\")].status}{\" \"}{end}";
    wait_for("three connected agents", || {
        let out = plane.kubectl(&["get", "edgenodes", "-o", &format!("jsonpath={connected}")]).ok()?;
        (out.split_whitespace().filter(|s| *s == "True").count() >= AGENTS.len()).then_some(())
    })?;
    wait_for("the microservices to reach pi-kitchen", || {
        inspect(&dir.join("agents/pi-kitchen/data")).ok().filter(|r| r.contains("default/microservice/hello"))
    })?;
    wait_for("hello to be ready on the three agents", || {
        let ready = plane.kubectl(&["get", "msvc", "hello", "-o", "jsonpath={.status.readyInstances}"]).ok()?;
        (ready.trim() == "3").then_some(())
    })?;
    Ok(())
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

/// Polls `check` for up to 60 s.
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after 60 s waiting for {what}; logs are in target/demo/");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn apply_and_wait(plane: &ControlPlane, examples: &str) -> Result<()> {
    eprintln!("==> kubectl apply -f examples/");
    print!("{}", plane.kubectl(&["apply", "-f", examples])?);
    let query = "{range .items[*]}{.status.observedGeneration}{\"\\n\"}{end}";
    wait_for("the controller to write status", || {
        let out = plane.kubectl(&["get", "msvc,mesh", "-A", "-o", &format!("jsonpath={query}")]).ok()?;
        (!out.is_empty() && out.lines().all(|l| !l.trim().is_empty())).then_some(())
    })
}

fn wait_for_signal() -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("cannot install the Ctrl-C handler")?;
    let _ = rx.recv();
    Ok(())
}
