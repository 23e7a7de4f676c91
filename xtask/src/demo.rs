//! `cargo xtask demo`: control plane, controller, examples, and what the cluster shows.

use std::fs;
use std::net::TcpListener;
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
    eprintln!("==> building supermesh-controller");
    shell::run(cargo().args(["build", "--quiet", "--bin", "supermesh-controller"]))?;
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
    let result = apply_and_wait(plane, &root.join("examples").display().to_string());
    let result = result.and_then(|()| {
        println!("{}", plane.kubectl(&["get", "mesh,edgenodes,msvc", "-A"])?);
        println!("The controller keeps running. Try: export KUBECONFIG={}", plane.kubeconfig().display());
        println!("  kubectl describe msvc hello    # conditions and events");
        println!("  kubectl label edgenode pi-attic role=spare; kubectl get msvc  # placement follows");
        println!("Press Ctrl-C to stop everything the demo started.");
        wait_for_signal()
    });
    eprintln!("==> stopping supermesh-controller");
    stop(pid, Duration::from_secs(10));
    result
}

fn apply_and_wait(plane: &ControlPlane, examples: &str) -> Result<()> {
    eprintln!("==> kubectl apply -f examples/");
    print!("{}", plane.kubectl(&["apply", "-f", examples])?);
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = "{range .items[*]}{.status.observedGeneration}{\"\\n\"}{end}";
    loop {
        let out = plane.kubectl(&["get", "msvc,mesh", "-A", "-o", &format!("jsonpath={query}")])?;
        if !out.is_empty() && out.lines().all(|l| !l.trim().is_empty()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the controller did not write status within 60 s; see target/demo/controller.log");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
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
