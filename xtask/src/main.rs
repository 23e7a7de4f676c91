//! `cargo xtask`: the project's own automation. Every command installs what it needs.

mod bench;
mod cluster;
mod compat;
mod controlplane;
mod crdgen;
mod demo;
mod fuzz;
mod helm;
mod image;
mod package;
mod procs;
mod shell;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "supermesh development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write crds/*.yaml and the chart's copy from the Rust types (--check: fail if they differ).
    Crdgen {
        /// Only compare; exit non-zero when the committed YAML is stale.
        #[arg(long)]
        check: bool,
    },
    /// Manage a local etcd + kube-apiserver for tests and the demo.
    Controlplane {
        #[command(subcommand)]
        action: controlplane::Action,
    },
    /// Manage a real single-node Kubernetes (containerd, kubelet, kube-proxy, ...) for the chart's tests.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
    /// Run every check and test, end-to-end ones included, against a real API server.
    Test {
        /// Extra arguments for the test runner (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bring up a control plane and the controller, apply examples/, show the result.
    Demo {
        /// Install the controller image with the Helm chart on the single-node cluster (`cargo xtask
        /// cluster`; started if needed and stopped afterwards only then) instead of a local process.
        #[arg(long)]
        cluster: bool,
    },
    /// Build the supermesh-controller container image as a docker-archive (`docker load`, `ctr images import`).
    Image,
    /// Run helm (Helm's SDK behind a `helm` command line when none is installed): `cargo xtask helm -- lint charts/supermesh`.
    Helm {
        /// Arguments for helm.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package of supermesh-agent (target/debian/*.deb) and check it with lintian.
    Package,
    /// Build the fuzz targets of fuzz/ (cargo fuzz, libFuzzer, stable toolchain) and run each for
    /// a while from its corpus; fails on a crash, naming the input that causes it.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Afterwards, add to the committed corpus (fuzz/corpus/) the inputs found that reach new code.
        #[arg(long)]
        merge: bool,
        /// Targets to run (all when none is given): see `cargo fuzz list` in fuzz/.
        targets: Vec<String>,
    },
    /// Run a benchmark and print its figures (`sync`, `scale`, `supernode`).
    Bench {
        /// Which benchmark: `sync`, `scale` or `supernode`.
        what: String,
        /// Extra arguments for the benchmark, after `--` (scale: `-- --agents 1000,5000,10000`; supernode:
        /// `-- --nodes 1000 --cluster-size 10 --interval 10 --window 60 --warmup 20 --failover-agents 10
        /// --rounds 3 --only load|failover`, times in seconds).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Crdgen { check } => crdgen::run(check),
        Command::Controlplane { action } => controlplane::run(action),
        Command::Cluster { action } => cluster::run(action),
        Command::Test { args } => test::run(&args),
        Command::Demo { cluster } => demo::run(cluster),
        Command::Image => image::build().map(drop),
        Command::Helm { args } => helm::run(&args),
        Command::Package => package::run(),
        Command::Bench { what, args } => bench::run(&what, &args),
        Command::Fuzz { seconds, merge, targets } => fuzz::run(seconds, merge, &targets),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
