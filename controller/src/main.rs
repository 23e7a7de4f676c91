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
#[command(name = "supermesh-controller", version, about, args_override_self = true)]
struct Args {
    /// Address serving /metrics, /healthz and /readyz.
    #[arg(long, env = "SUPERMESH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Install or upgrade the supermesh CRDs at start instead of requiring them.
    #[arg(long)]
    install_crds: bool,
    /// Address the cloudhub accepts agents on (WebSocket over TLS).
    #[arg(long, env = "SUPERMESH_CLOUDHUB_ADDR", default_value = "0.0.0.0:10350")]
    cloudhub_addr: SocketAddr,
    /// DNS name or IP address agents use to reach the cloudhub (repeatable); goes into its certificate.
    #[arg(long = "cloudhub-name")]
    cloudhub_names: Vec<String>,
    /// Namespace of the cloudhub CA and bootstrap token Secrets (created when missing).
    #[arg(long, env = "POD_NAMESPACE", default_value = "supermesh")]
    namespace: String,
    /// Most agents connected at once; more are told to retry later.
    #[arg(long, default_value_t = 10_000)]
    max_agents: usize,
    /// Seconds after a start during which nodes keep their Connected condition while their agents reconnect.
    #[arg(long, default_value_t = supermesh_controller::cloudhub::RECONNECT_GRACE.as_secs())]
    reconnect_grace_seconds: u64,
    /// Seconds between keepalives on idle agent streams; a stream silent for three is dead.
    #[arg(long, default_value_t = supermesh_controller::cloudhub::KEEPALIVE_SECONDS)]
    keepalive_seconds: u64,
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
    let settings = Settings {
        metrics_addr: args.metrics_addr,
        install_crds: args.install_crds,
        cloudhub_addr: args.cloudhub_addr,
        cloudhub_names: args.cloudhub_names,
        namespace: args.namespace,
        max_agents: args.max_agents,
        reconnect_grace: std::time::Duration::from_secs(args.reconnect_grace_seconds),
        keepalive: std::time::Duration::from_secs(args.keepalive_seconds),
    };
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
