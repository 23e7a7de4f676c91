//! supermesh-agent binary: `--config edge.yaml` runs the agent; `inspect` shows its store.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
        (None, Some(path)) => match supermesh_agent::config::load(&path) {
            Ok(config) => match supermesh_agent::run::run(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.to_string()),
            },
            Err(e) => fail(e.to_string()),
        },
        (None, None) => fail("give --config edge.yaml to run the agent, or a subcommand (see --help)".into()),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
