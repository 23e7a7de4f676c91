//! supermesh-controller binary: flags, logging, then `run`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use supermesh_controller::cloudhub::pki::Lifetimes;
use supermesh_controller::replicas::Replica;
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
    /// Namespace of the cloudhub CA and the bootstrap token Secrets (the CA is created when missing).
    #[arg(long, env = "POD_NAMESPACE", default_value = "supermesh")]
    namespace: String,
    /// Most agents connected at once; more are told to retry later.
    #[arg(long, default_value_t = 10_000)]
    max_agents: usize,
    /// Connections from one source address that may be in their handshake at once (a NAT
    /// in front of many devices may need more); more are closed at once.
    #[arg(long, default_value_t = supermesh_controller::cloudhub::MAX_PENDING_PER_ADDRESS)]
    max_pending_per_address: usize,
    /// Seconds after a start during which nodes keep their Connected condition while their agents reconnect.
    #[arg(long, default_value_t = supermesh_controller::cloudhub::RECONNECT_GRACE.as_secs())]
    reconnect_grace_seconds: u64,
    /// Seconds between keepalives on idle agent streams; a stream silent for three is dead.
    #[arg(long, default_value_t = supermesh_controller::cloudhub::KEEPALIVE_SECONDS)]
    keepalive_seconds: u64,
    /// Seconds a node certificate is valid (default 30 days); agents renew at 70 to 90 % of it.
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    certificate_lifetime_seconds: u64,
    /// Seconds after its expiry during which a node certificate may still renew itself, for
    /// devices that were offline (default: one certificate lifetime).
    #[arg(long)]
    certificate_grace_seconds: Option<u64>,
    /// This replica's id, unique among the controller's replicas (in a cluster, the Pod name).
    #[arg(long, env = "POD_NAME")]
    replica_id: Option<String>,
    /// `host:port` where agents reach this replica's cloudhub when another replica sends
    /// them here (default: POD_IP, else the first --cloudhub-name, with the cloudhub port).
    #[arg(long, env = "SUPERMESH_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// `host:port` where the other replicas reach this one's HTTP endpoint to forward
    /// reports (default: the advertised host with the metrics port).
    #[arg(long, env = "SUPERMESH_PEER_ADDRESS")]
    peer_address: Option<String>,
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
    let port = args.cloudhub_addr.port();
    let advertised_host = std::env::var("POD_IP")
        .ok()
        .filter(|ip| !ip.is_empty())
        .or_else(|| args.cloudhub_names.first().cloned())
        .or_else(|| (!args.cloudhub_addr.ip().is_unspecified()).then(|| args.cloudhub_addr.ip().to_string()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let bracketed = if advertised_host.contains(':') { format!("[{advertised_host}]") } else { advertised_host };
    let replica = Replica {
        id: args.replica_id.unwrap_or_else(|| format!("{}-{}", hostname(), rand::random::<u32>() % 1_000_000)),
        address: args.advertise_address.unwrap_or_else(|| format!("{bracketed}:{port}")),
        peer: args.peer_address.unwrap_or_else(|| format!("{bracketed}:{}", args.metrics_addr.port())),
    };
    if !supermesh_protocol::names::is_dns1123_subdomain(&replica.id) {
        eprintln!("error: --replica-id {:?} must be a DNS-1123 name (it names a Lease)", replica.id);
        return ExitCode::from(2);
    }
    let settings = Settings {
        metrics_addr: args.metrics_addr,
        install_crds: args.install_crds,
        cloudhub_addr: args.cloudhub_addr,
        cloudhub_names: args.cloudhub_names,
        namespace: args.namespace,
        max_agents: args.max_agents,
        max_pending_per_address: args.max_pending_per_address,
        reconnect_grace: std::time::Duration::from_secs(args.reconnect_grace_seconds),
        keepalive: std::time::Duration::from_secs(args.keepalive_seconds),
        lifetimes: Lifetimes {
            certificate: std::time::Duration::from_secs(args.certificate_lifetime_seconds.max(1)),
            grace: args.certificate_grace_seconds.map(std::time::Duration::from_secs),
        },
        replica,
    };
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// This machine's host name in lower case, or `controller` when it has none usable.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_lowercase();
    if supermesh_protocol::names::is_dns1123_subdomain(&name) && name.len() <= 40 {
        name
    } else {
        "controller".into()
    }
}
