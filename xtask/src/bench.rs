//! `cargo xtask bench <name>`: benchmarks that print figures measured with the
//! real binaries against a real API server. They report; they never pass or fail on timings.

use anyhow::{bail, Result};

use crate::shell::{self, cargo};

/// A benchmark: its name (also the bench target of the `supermesh-tests` crate), what it
/// measures, and whether it needs a cluster.
struct Bench {
    name: &'static str,
    about: &'static str,
    cluster: bool,
}

/// Known benchmarks.
const BENCHES: &[Bench] = &[
    Bench {
        name: "sync",
        cluster: false,
        about: "the agent's metamanager store on a real SQLite file: upserts/s with one transaction per message \
         and batched",
    },
    Bench {
        name: "scale",
        cluster: true,
        about:
            "the cloud side as the fleet grows (--agents 1000,5000,10000): time for all agents to connect, controller \
         CPU and memory at rest, change-to-ack latency of one spec change to every node, status writes per 1,000 \
         status changes; simulated agents built on the agent's own edgehub",
    },
    Bench {
        name: "supernode",
        cluster: true,
        about: "upstream report load at the cloud (messages, bytes, reports per second, controller CPU and memory) \
         for 1000 simulated nodes in networks of 10, without and with supernodes batching their networks' \
         reports; supernode failover time with 10 real agents",
    },
];

/// Builds what benchmark `what` needs, then runs it against a cluster and prints its report.
pub fn run(what: &str, extra: &[String]) -> Result<()> {
    let Some(bench) = BENCHES.iter().find(|b| b.name == what) else {
        let known: Vec<String> = BENCHES.iter().map(|b| format!("  {}: {}", b.name, b.about)).collect();
        bail!("unknown benchmark {what:?}; known benchmarks:\n{}", known.join("\n"));
    };
    // The controller and agents are measured as they ship: release builds.
    step("building the binaries");
    shell::run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    step(&format!("building benchmark {what} (release)"));
    shell::run(cargo().args(["bench", "-p", "supermesh-tests", "--bench", what, "--no-run"]))?;
    let mut run = cargo();
    run.args(["bench", "-p", "supermesh-tests", "--bench", what, "--"])
        .args(extra)
        .env("SUPERMESH_BIN_DIR", crate::shell::target_dir().join("release"));
    if !bench.cluster {
        step(&format!("benchmark {what}"));
        return shell::run(&mut run);
    }
    crate::controlplane::with_cluster(|kubeconfig| {
        step(&format!("benchmark {what}"));
        shell::run(run.env("KUBECONFIG", kubeconfig))
    })
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}
