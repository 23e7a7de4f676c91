//! `cargo xtask test`: formatting, lints, generated files, then every test
//! (unit, component and end-to-end) against a real API server.

use anyhow::{Context, Result};

use crate::shell::{self, cargo};

pub fn run(extra: &[String]) -> Result<()> {
    step("cargo fmt --check");
    shell::run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    step("cargo clippy");
    shell::run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    step("generated CRDs match the Rust types");
    crate::crdgen::run(true)?;
    step("the agent links no Kubernetes client or types");
    agent_is_kube_free()?;
    // The end-to-end tests put agents in network namespaces (`ip`) and run Python microservices.
    shell::ensure_program("ip", "iproute2")?;
    shell::ensure_program("python3", "python3")?;
    step("building the binaries");
    shell::run(cargo().args(["build", "--workspace", "--bins"]))?;
    step("the previous release's agent, for the protocol compatibility test");
    let previous = crate::compat::previous_agent()?;

    let mut tests = if shell::has("cargo-nextest") {
        let mut c = cargo();
        c.args(["nextest", "run", "--workspace"]);
        c
    } else {
        let mut c = cargo();
        c.args(["test", "--workspace", "--", "--test-threads=1"]);
        c
    };
    // Any cluster given by KUBECONFIG is used as is; otherwise a local one is brought up.
    crate::controlplane::with_cluster(|kubeconfig| {
        step("tests");
        shell::run(tests.args(extra).env("KUBECONFIG", kubeconfig).env(crate::compat::ENV, &previous))
    })
}

/// The agent speaks the wire protocol only: its dependency tree has neither kube nor
/// k8s-openapi, so that no CRD change reaches devices unless the protocol changes too.
fn agent_is_kube_free() -> Result<()> {
    let tree = shell::output(cargo().args(["tree", "-p", "supermesh-agent", "-e", "normal", "--prefix", "none"]))?;
    let kube: Vec<&str> = tree
        .lines()
        .filter(|l| l.starts_with("kube") || l.starts_with("k8s-openapi") || l.starts_with("supermesh-api"))
        .collect();
    if !kube.is_empty() {
        anyhow::bail!("supermesh-agent depends on {}: it must depend on supermesh-protocol only", kube.join(", "));
    }
    Ok(())
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}
