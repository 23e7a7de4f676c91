//! supermesh-controller binary: flags, logging, then `run`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use supermesh_controller::run::{run, Settings};
use tracing_subscriber::EnvFilter;

/// Reconciles supermesh Mesh, EdgeNode and Microservice resources.
///
/// Connects to the cluster like kubectl: KUBECONFIG, ~/.kube/config, or the in-cluster service account.
#[derive(Parser, Debug)]
#[command(name = "supermesh-controller", version, about)]
struct Args {
    /// Address serving /metrics, /healthz and /readyz.
    #[arg(long, env = "SUPERMESH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Install or upgrade the supermesh CRDs at start instead of requiring them.
    #[arg(long)]
    install_crds: bool,
    /// Log filter, for example `info` or `supermesh_controller=debug,kube=info`.
    #[arg(long, env = "SUPERMESH_LOG", default_value = "info")]
    log_level: String,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: invalid --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let settings = Settings { metrics_addr: args.metrics_addr, install_crds: args.install_crds };
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
