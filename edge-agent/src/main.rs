//! supermesh-agent binary: `--config edge.yaml` runs the agent; `join` writes edge.yaml
//! and then runs the agent with it; `inspect` shows its store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use supermesh_agent::join::{JoinArgs, Joined};
use tracing_subscriber::EnvFilter;

/// The supermesh edge agent.
#[derive(Parser, Debug)]
#[command(name = "supermesh-agent", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Agent configuration file.
    #[arg(long, value_name = "EDGE_YAML")]
    config: Option<PathBuf>,
    /// Log filter, for example `info` or `supermesh_agent=debug`.
    #[arg(long, env = "SUPERMESH_LOG", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print what the agent's store holds.
    Inspect {
        /// The agent's dataDir.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Make this device a node of a cloud: check the values, write edge.yaml (0600), run the agent.
    ///
    /// A device that already joined keeps its edge.yaml and identity: joining again as the same
    /// node of the same cloud changes nothing, joining as another node is refused.
    Join(Box<JoinArgs>),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(e) => return fail(format!("invalid --log-level {:?}: {e}", cli.log_level)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match (cli.command, cli.config) {
        (Some(Command::Inspect { data_dir }), _) => match supermesh_agent::run::inspect(&data_dir) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        (Some(Command::Join(args)), _) => match supermesh_agent::join::join(&args) {
            Ok(joined) => {
                report(&args, &joined);
                if args.no_run {
                    ExitCode::SUCCESS
                } else {
                    exec_agent(&args.config, &cli.log_level)
                }
            }
            Err(e) => fail(e.to_string()),
        },
        (None, Some(path)) => run(&path).await,
        (None, None) => fail("give --config edge.yaml to run the agent, or a subcommand (see --help)".into()),
    }
}

/// Runs the agent with the configuration at `path`.
async fn run(path: &Path) -> ExitCode {
    keep_private(path);
    match supermesh_agent::config::load(path) {
        Ok(config) => match supermesh_agent::run::run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e.to_string()),
        },
        Err(e) => fail(e.to_string()),
    }
}

/// Makes edge.yaml (it may hold the join token) readable by its owner only, as `join` writes it.
fn keep_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.permissions().mode() & 0o077 != 0 {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => eprintln!("note: {} was readable by others; it is now 0600", path.display()),
            Err(e) => eprintln!("warning: {} is readable by others and cannot be made private: {e}", path.display()),
        }
    }
}

/// Replaces this process with `supermesh-agent --config PATH`: the agent runs exactly as when
/// started so, and the join token leaves the process table instead of staying in this
/// command line for as long as the agent runs.
fn exec_agent(path: &Path, log_level: &str) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let error = match std::env::current_exe() {
        Ok(agent) => std::process::Command::new(agent)
            .arg("--config")
            .arg(path)
            .arg("--log-level")
            .arg(log_level)
            .env_remove("SUPERMESH_JOIN_TOKEN")
            .exec(),
        Err(e) => e,
    };
    fail(format!("cannot start the agent: {error}"))
}

/// Says what `join` did and, with `--no-run`, how to start the agent.
fn report(args: &JoinArgs, joined: &Joined) {
    let path = args.config.display();
    let config = joined.config();
    let node = format!(
        "node {} (account {}, network {}) of cloud {}",
        config.node.name, config.node.account, config.node.network, config.cloud.address
    );
    match joined {
        Joined::Written(_) => println!("wrote {path}: this device joins as {node}"),
        Joined::Kept { differs, .. } => {
            println!("this device already joined as {node}; keeping {path} and its identity");
            if !differs.is_empty() {
                println!("note: {path} keeps its own {}; edit it to change them", differs.join(", "));
            }
        }
    }
    if !args.no_run {
        return;
    }
    // The service reads the default path only.
    if args.config == Path::new(supermesh_agent::join::DEFAULT_CONFIG) {
        println!("start the agent with: systemctl enable --now supermesh-agent");
    } else {
        println!(
            "start the agent with: supermesh-agent --config {path} (the supermesh-agent service reads {})",
            supermesh_agent::join::DEFAULT_CONFIG
        );
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
