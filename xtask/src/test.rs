//! `cargo xtask test`: formatting, lints, generated files, then every test
//! (unit, component and end-to-end) against a real API server, a short run of every
//! fuzz target, and the chart's tests on a real cluster.

use anyhow::{Context, Result};

use crate::shell::{self, cargo};

pub fn run(extra: &[String]) -> Result<()> {
    step("cargo fmt --check");
    shell::run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    shell::run(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))
        .context("the fuzz targets are not formatted: run `cargo fmt` in fuzz/")?;
    step("cargo clippy");
    shell::run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    step("generated CRDs match the Rust types");
    crate::crdgen::run(true)?;
    step("helm lint charts/supermesh");
    crate::helm::check_chart()?;
    step("the agent links no Kubernetes client or types");
    agent_is_kube_free()?;
    // The end-to-end tests put agents in network namespaces (`ip`) and run Python microservices.
    shell::ensure_program("ip", "iproute2")?;
    shell::ensure_program("python3", "python3")?;
    step("building the binaries");
    shell::run(cargo().args(["build", "--workspace", "--bins"]))?;
    step("the previous release's agent, for the protocol compatibility test");
    let previous = crate::compat::previous_agent()?;
    step("the Debian package of the agent, for the test that installs it");
    let deb = crate::package::build()?;

    // Any cluster given by KUBECONFIG is used as is; otherwise a local one is brought up.
    crate::controlplane::with_cluster(|kubeconfig| {
        step("tests");
        let mut tests = test_runner(extra, Tier::ControlPlane);
        let tests = tests.env("KUBECONFIG", kubeconfig).env(crate::compat::ENV, &previous);
        shell::run(tests.env(crate::package::ENV, &deb))
    })?;

    step(&format!("fuzz: every target for {} s (`cargo xtask fuzz` runs longer)", crate::fuzz::TEST_SECONDS));
    crate::fuzz::run(crate::fuzz::TEST_SECONDS, false, &[])?;

    // The cluster tier: the chart installed with Helm on a real cluster with a node, which
    // runs the controller image.
    step("the controller image");
    let image = crate::image::build()?;
    let helm = crate::helm::ensure_helm()?;
    let path = std::env::join_paths(
        std::iter::once(helm).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    crate::cluster::with_cluster(&image, |kubeconfig| {
        step("cluster tests");
        shell::run(test_runner(extra, Tier::Cluster).env("KUBECONFIG", kubeconfig).env("PATH", &path))
    })
}

/// Which cluster a run of the end-to-end tests needs.
#[derive(PartialEq)]
enum Tier {
    /// An API server: every test but the cluster ones.
    ControlPlane,
    /// A cluster with a node that runs Pods: `tests/cluster.rs`.
    Cluster,
}

/// The test runner (nextest when installed) for `tier`, with the user's extra arguments.
fn test_runner(extra: &[String], tier: Tier) -> std::process::Command {
    let mut c = cargo();
    if shell::has("cargo-nextest") {
        c.args(["nextest", "run", "--no-tests=pass"]);
        match tier {
            Tier::ControlPlane => c.args(["--workspace", "-E", "not binary(cluster)"]),
            Tier::Cluster => c.args(["-p", "supermesh-tests", "--test", "cluster"]),
        };
        c.args(extra);
    } else {
        match tier {
            Tier::ControlPlane => {
                c.args(["test", "--workspace"]).args(extra).args(["--", "--skip", "on_a_real_cluster"])
            }
            Tier::Cluster => c.args(["test", "-p", "supermesh-tests", "--test", "cluster"]).args(extra).arg("--"),
        };
        c.arg("--test-threads=1");
    }
    c
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
