//! `cargo xtask bench <name>`: benchmarks that print figures measured with the
//! real binaries against a real API server. They report; they never pass or fail on timings.

use anyhow::{bail, Result};

use crate::shell::{self, cargo};

/// Known benchmarks: name (also the bench target of the `supermesh-tests` crate) and what it measures.
const BENCHES: &[(&str, &str)] = &[
    (
        "sync",
        "metamanager upserts/s (one transaction per message vs batched), change-to-ack latency and \
         controller memory with 1, 100 and 1000 simulated agents",
    ),
    (
        "scale",
        "the cloud side as the fleet grows (--agents 1000,5000,10000): time for all agents to connect, controller \
         CPU and memory at rest, change-to-ack latency of one spec change to every node, status writes per 1,000 \
         status changes; simulated agents built on the agent's own edgehub",
    ),
    (
        "supernode",
        "upstream report load at the cloud (messages, bytes, reports per second, controller CPU and memory) \
         for 1000 simulated nodes in networks of 10, without and with supernodes batching their networks' \
         reports; supernode failover time with 10 real agents",
    ),
];

/// Builds what benchmark `what` needs, then runs it against a cluster and prints its report.
pub fn run(what: &str, extra: &[String]) -> Result<()> {
    if !BENCHES.iter().any(|(name, _)| *name == what) {
        let known: Vec<String> = BENCHES.iter().map(|(name, about)| format!("  {name}: {about}")).collect();
        bail!("unknown benchmark {what:?}; known benchmarks:\n{}", known.join("\n"));
    }
    // The controller and agents are measured as they ship: release builds.
    step("building the binaries");
    shell::run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    step(&format!("building benchmark {what} (release)"));
    shell::run(cargo().args(["bench", "-p", "supermesh-tests", "--bench", what, "--no-run"]))?;
    crate::controlplane::with_cluster(|kubeconfig| {
        step(&format!("benchmark {what}"));
        shell::run(
            cargo()
                .args(["bench", "-p", "supermesh-tests", "--bench", what, "--"])
                .args(extra)
                .env("KUBECONFIG", kubeconfig)
                .env("SUPERMESH_BIN_DIR", crate::shell::target_dir().join("release")),
        )
    })
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}
