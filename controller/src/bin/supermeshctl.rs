//! supermeshctl: reads what the cluster's edge nodes know, through the controller.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Command-line client of supermesh-controller.
#[derive(Parser, Debug)]
#[command(name = "supermeshctl", version, about)]
struct Cli {
    /// Base URL of the controller's HTTP endpoint (its --metrics-addr), for example
    /// through `kubectl port-forward svc/supermesh-controller 8080`.
    #[arg(long, env = "SUPERMESH_CONTROLLER", default_value = "http://127.0.0.1:8080")]
    controller: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the log of a microservice's instance, read from its edge node.
    Logs {
        /// The microservice, as NAMESPACE/NAME.
        microservice: String,
        /// The node whose instance to read (default: the first node it is placed on).
        #[arg(long)]
        node: Option<String>,
        /// Only the last K lines.
        #[arg(long, value_name = "K")]
        tail: Option<u64>,
        /// Keep printing new lines as they are written.
        #[arg(long, short)]
        follow: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Logs { microservice, node, tail, follow } = cli.command;
    let Some((namespace, name)) = microservice.split_once('/') else {
        eprintln!("error: give the microservice as NAMESPACE/NAME, for example default/hello");
        return ExitCode::from(2);
    };
    let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{}/logs/{namespace}/{name}", cli.controller.trim_end_matches('/'));
    let mut offset: Option<u64> = None;
    loop {
        let mut request = http.get(&url);
        if let Some(node) = &node {
            request = request.query("node", node);
        }
        request = match (offset, tail) {
            (Some(o), _) => request.query("offset", o.to_string()),
            (None, Some(t)) => request.query("tail", t.to_string()),
            (None, None) => request,
        };
        let mut response = match request.call() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot reach the controller at {}: {e}", cli.controller);
                return ExitCode::FAILURE;
            }
        };
        let status = response.status();
        let next = response.headers().get("x-supermesh-offset").and_then(|v| v.to_str().ok()?.parse().ok());
        let body = response.body_mut().read_to_string().unwrap_or_default();
        if !status.is_success() {
            eprintln!("error: {}", body.trim());
            return ExitCode::FAILURE;
        }
        print!("{body}");
        let _ = std::io::stdout().flush();
        if !follow {
            return ExitCode::SUCCESS;
        }
        offset = next.or(offset);
        std::thread::sleep(Duration::from_secs(1));
    }
}
