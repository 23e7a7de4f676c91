//! supermeshctl: joins devices (bootstrap tokens), admits and revokes nodes, and reads
//! what the cluster's edge nodes know, through the controller.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Span, SpanRelativeTo, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use supermesh_api::microservice::{MicroserviceStatus, RolloutPhase};
use supermesh_api::names::{condition, identity};
use supermesh_api::{EdgeNode, Microservice};
use supermesh_controller::cloudhub::pki;
use supermesh_controller::tokens::{self, Near, Scope, Token};
use supermesh_protocol::identity::{BootstrapToken, JoinString};

/// Command-line client of supermesh-controller.
#[derive(Parser, Debug)]
#[command(name = "supermeshctl", version, about)]
struct Cli {
    /// Base URL of the controller's HTTP endpoint (its --metrics-addr), for example
    /// through `kubectl port-forward svc/supermesh-controller 8080`.
    #[arg(long, env = "SUPERMESH_CONTROLLER", default_value = "http://127.0.0.1:8080")]
    controller: String,
    /// Namespace the controller runs in (its CA and bootstrap tokens live there).
    #[arg(long, short, env = "SUPERMESH_NAMESPACE", default_value = "supermesh")]
    namespace: String,
    /// Kubernetes bearer token `logs` presents to the controller (default: your kubeconfig's).
    #[arg(long, env = "SUPERMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    /// Bootstrap tokens devices join with.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Approve, revoke or reset a node's identity.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Network clusters.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Rollouts of a microservice's revisions.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// Where the rollout stands: revisions, wave, nodes updated, offline and failing.
    Status {
        /// The microservice, as NAMESPACE/NAME.
        microservice: String,
        /// Print every change until the rollout completes, pauses or rolls back.
        #[arg(long, short)]
        watch: bool,
    },
    /// Start no further wave (sets spec.rollout.paused).
    Pause {
        /// The microservice, as NAMESPACE/NAME.
        microservice: String,
    },
    /// Go on with a paused rollout, also one the health gate or its deadline paused.
    Resume {
        /// The microservice, as NAMESPACE/NAME.
        microservice: String,
    },
    /// Go back to an earlier revision: its spec becomes the microservice's spec again.
    Undo {
        /// The microservice, as NAMESPACE/NAME.
        microservice: String,
        /// The revision to go back to (default: the current one while a rollout is under
        /// way, else the one before it).
        #[arg(long)]
        to_revision: Option<i64>,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCommand {
    /// Rotate a network's cluster key: its members get a new key with their next membership
    /// (within seconds) and keep accepting the old one for two minutes meanwhile.
    RotateKey {
        /// The network.
        network: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token and print the join string a device enrolls with.
    Create(CreateArgs),
    /// List the tokens.
    List,
    /// Delete (revoke) a token: it enrolls nothing from now on.
    Delete {
        /// The token's id (the part before the '.').
        id: String,
    },
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// How long the token is valid, for example 24h, 30m or 7d.
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    ttl: SignedDuration,
    /// Enroll only nodes of this account.
    #[arg(long)]
    account: Option<String>,
    /// Enroll only nodes of this network.
    #[arg(long)]
    network: Option<String>,
    /// Enroll only nodes whose name matches this pattern (`*` for any characters).
    #[arg(long)]
    node_pattern: Option<String>,
    /// Enroll only nodes that state a location within KM kilometres of LAT,LON.
    #[arg(long, value_name = "LAT,LON,KM")]
    near: Option<Near>,
    /// Enroll at most this many nodes.
    #[arg(long)]
    uses: Option<u32>,
    /// Approve the nodes it enrolls at once; without it each waits for `supermeshctl node approve`.
    #[arg(long)]
    auto_approve: bool,
    /// What the token is for.
    #[arg(long, default_value = "")]
    description: String,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Approve a node that enrolled with a token that does not approve: it is sent its work.
    Approve {
        /// The node (EdgeNode name).
        name: String,
    },
    /// Revoke a node: its session is closed and its certificate refused from now on.
    Revoke {
        /// The node (EdgeNode name).
        name: String,
    },
    /// Forget a node's enrolled identity, so that a device may enroll the name again with a token.
    Reset {
        /// The node (EdgeNode name).
        name: String,
    },
}

fn parse_ttl(text: &str) -> Result<SignedDuration, String> {
    let span: Span = text.parse().map_err(|e| format!("{e}; for example 24h, 30m or 7d"))?;
    let ttl = span.to_duration(SpanRelativeTo::days_are_24_hours()).map_err(|e| e.to_string())?;
    if ttl <= SignedDuration::ZERO {
        return Err("the ttl must be positive".into());
    }
    Ok(ttl)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logs { microservice, node, tail, follow } => {
            let token = match cli.token.map_or_else(kubeconfig_token, Ok) {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            return logs(&cli.controller, &token, &microservice, node, tail, follow);
        }
        Command::Token(command) => with_client(|client| token(client, cli.namespace, command)),
        Command::Node(command) => with_client(|client| node(client, command)),
        Command::Rollout(command) => with_client(|client| rollout(client, command)),
        Command::Network(NetworkCommand::RotateKey { network }) => {
            with_client(|client| async move {
                let generation =
                    pki::rotate_cluster_key(&client, &cli.namespace, &network).await.map_err(|e| e.to_string())?;
                println!("network {network}: cluster key rotated (generation {generation}); its members get it within seconds");
                Ok(())
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The bearer token of the kubeconfig's current user, which the controller checks with the
/// API server (a kubeconfig that authenticates otherwise, with a client certificate, needs --token).
fn kubeconfig_token() -> Result<String, String> {
    use secrecy::ExposeSecret;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let config = runtime.block_on(kube::Config::infer()).map_err(|e| format!("cannot read your kubeconfig: {e}"))?;
    let auth = config.auth_info;
    if let Some(token) = auth.token {
        return Ok(token.expose_secret().to_owned());
    }
    if let Some(file) = auth.token_file {
        return std::fs::read_to_string(&file).map(|t| t.trim().to_owned()).map_err(|e| format!("{file}: {e}"));
    }
    Err("your kubeconfig's user has no bearer token (it may use a client certificate); pass one with --token, \
         for example from `kubectl create token SERVICEACCOUNT`"
        .into())
}

/// Runs `work` with a client of the cluster the kubeconfig names.
fn with_client<F, Fut>(work: F) -> Result<(), String>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = Client::try_default().await.map_err(|e| format!("cannot reach the cluster (kubeconfig): {e}"))?;
        work(client).await
    })
}

async fn token(client: Client, namespace: String, command: TokenCommand) -> Result<(), String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    match command {
        TokenCommand::Create(args) => {
            let ca = pki::ca_certificate(&client, &namespace).await.map_err(|e| e.to_string())?.ok_or_else(|| {
                format!("no cloudhub CA in namespace {namespace} yet: start the controller first (or pass --namespace)")
            })?;
            let mut token = Token::new(BootstrapToken::generate(rand::random), args.ttl);
            token.limit = args.uses;
            token.scope = Scope {
                account: args.account,
                network: args.network,
                node_pattern: args.node_pattern,
                near: args.near,
            };
            token.auto_approve = args.auto_approve;
            token.description = args.description;
            tokens::create(&secrets, &token).await.map_err(|e| format!("cannot create the token: {e}"))?;
            let join = JoinString {
                ca_hash: pki::fingerprint_of(&ca).map_err(|e| e.to_string())?,
                token: token.token.clone(),
            };
            eprintln!("token {} valid until {}{}", token.token.id, token.expires, describe_scope(&token));
            println!("{join}");
            Ok(())
        }
        TokenCommand::List => {
            let found = tokens::list(&secrets).await.map_err(|e| format!("cannot list tokens: {e}"))?;
            let mut out =
                format!("{:<8} {:<22} {:<10} {:<8} {:<9} SCOPE\n", "ID", "EXPIRES", "USES", "APPROVE", "STATE");
            let now = Timestamp::now();
            for token in found {
                match token {
                    Ok(t) => {
                        let uses = match t.limit {
                            Some(limit) => format!("{}/{limit}", t.used),
                            None => "unlimited".into(),
                        };
                        let state = match () {
                            _ if t.expires <= now => "expired",
                            _ if t.limit.is_some_and(|l| t.used >= l) => "used-up",
                            _ => "valid",
                        };
                        let approve = if t.auto_approve { "auto" } else { "manual" };
                        let expires = t.expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
                        out += &format!(
                            "{:<8} {expires:<22} {uses:<10} {approve:<8} {state:<9} {}
",
                            t.token.id,
                            describe_scope(&t).trim_start_matches("; ")
                        );
                    }
                    Err(e) => out += &format!("(unreadable: {e})\n"),
                }
            }
            // A closed pipe (`| head`) is no error of ours.
            let _ = std::io::stdout().write_all(out.as_bytes());
            Ok(())
        }
        TokenCommand::Delete { id } => match tokens::delete(&secrets, &id).await {
            Ok(true) => {
                println!("token {id} deleted: it enrolls nothing from now on");
                Ok(())
            }
            Ok(false) => Err(format!("there is no token {id} in namespace {namespace}")),
            Err(e) => Err(format!("cannot delete token {id}: {e}")),
        },
    }
}

fn describe_scope(token: &Token) -> String {
    let Scope { account, network, node_pattern, near } = &token.scope;
    let near = near.map(|n| n.to_string());
    let parts: Vec<String> = [("account", account), ("network", network), ("nodes", node_pattern), ("near", &near)]
        .into_iter()
        .filter_map(|(what, v)| v.as_ref().map(|v| format!("{what}={v}")))
        .collect();
    if parts.is_empty() {
        "; any account, network and node name".into()
    } else {
        format!("; {}", parts.join(" "))
    }
}

async fn node(client: Client, command: NodeCommand) -> Result<(), String> {
    let nodes: Api<EdgeNode> = Api::all(client);
    let (name, patch, done) = match &command {
        NodeCommand::Approve { name } => (
            name,
            serde_json::json!({"metadata": {"annotations": {identity::APPROVED: "true"}}, "spec": {"unschedulable": false}}),
            "approved: it is sent its work",
        ),
        NodeCommand::Revoke { name } => (
            name,
            serde_json::json!({"metadata": {"annotations": {identity::REVOKED: Timestamp::now().to_string()}}}),
            "revoked: its session is closed and its certificate refused",
        ),
        NodeCommand::Reset { name } => (
            name,
            serde_json::json!({"metadata": {"annotations": {identity::KEY: null, identity::REVOKED: null}}}),
            "reset: a device may enroll the name again with a token",
        ),
    };
    match nodes.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            println!("node {name} {done}");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Err(format!("there is no EdgeNode {name}")),
        Err(e) => Err(format!("cannot update EdgeNode {name}: {e}")),
    }
}

/// `NAMESPACE/NAME` split, or what to write instead.
fn namespaced(microservice: &str) -> Result<(&str, &str), String> {
    microservice
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .ok_or_else(|| "give the microservice as NAMESPACE/NAME, for example default/hello".to_owned())
}

/// The fields of a Microservice spec that make a revision (what runs).
const REVISION_FIELDS: [&str; 8] =
    ["command", "args", "env", "artifact", "ports", "healthCheck", "restartPolicy", "securityContext"];

async fn rollout(client: Client, command: RolloutCommand) -> Result<(), String> {
    let name = match &command {
        RolloutCommand::Status { microservice, .. }
        | RolloutCommand::Pause { microservice }
        | RolloutCommand::Resume { microservice }
        | RolloutCommand::Undo { microservice, .. } => microservice.clone(),
    };
    let (namespace, name) = namespaced(&name)?;
    let api: Api<Microservice> = Api::namespaced(client, namespace);
    let get = || async {
        match api.get(name).await {
            Ok(m) => Ok(m),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(format!("there is no Microservice {namespace}/{name}")),
            Err(e) => Err(format!("cannot read Microservice {namespace}/{name}: {e}")),
        }
    };
    let msvc = get().await?;
    let waves = || {
        if supermesh_controller::rollout::in_waves(&msvc.spec) {
            Ok(())
        } else {
            Err(format!(
                "{namespace}/{name} rolls out all at once; set spec.rollout.strategy: Waves to pause and resume"
            ))
        }
    };
    let patch_spec = |patch: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|e| format!("cannot update Microservice {namespace}/{name}: {e}"))
        }
    };
    match command {
        RolloutCommand::Status { watch, .. } => {
            let mut shown = String::new();
            let mut msvc = msvc;
            loop {
                let text = describe_rollout(&msvc);
                if text != shown {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                    shown = text;
                }
                let phase = msvc.status.as_ref().and_then(|s| s.rollout.as_ref()).map(|r| r.phase);
                if !watch || phase != Some(RolloutPhase::Progressing) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                msvc = get().await?;
            }
        }
        RolloutCommand::Pause { .. } => {
            waves()?;
            patch_spec(serde_json::json!({"spec": {"rollout": {"paused": true}}})).await?;
            println!("{namespace}/{name}: paused; no further wave starts until `supermeshctl rollout resume`");
            Ok(())
        }
        RolloutCommand::Resume { .. } => {
            waves()?;
            patch_spec(serde_json::json!({"spec": {"rollout": {"paused": false}}})).await?;
            let stopped =
                msvc.status.as_ref().and_then(|s| s.rollout.as_ref()).filter(|r| {
                    r.phase == RolloutPhase::Paused && r.pause_reason.as_deref() != Some(condition::PAUSED)
                });
            if let Some(r) = stopped {
                let patch = serde_json::json!({"status": {"rollout": {"phase": "Progressing", "pauseReason": null}}});
                api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|e| format!("cannot resume {namespace}/{name}: {e}"))?;
                println!(
                    "{namespace}/{name}: resumed after {}; the health gate looks again at once and stops it again                      if the updated instances still fail",
                    r.pause_reason.as_deref().unwrap_or("a pause")
                );
            } else {
                println!("{namespace}/{name}: resumed");
            }
            Ok(())
        }
        RolloutCommand::Undo { to_revision, .. } => {
            let status = msvc.status.clone().unwrap_or_default();
            let target = to_revision.or_else(|| undo_target(&status)).ok_or_else(|| {
                format!("{namespace}/{name} has no earlier revision to go back to; see `supermeshctl rollout status`")
            })?;
            let revision = status.revision(target).ok_or_else(|| {
                let kept: Vec<String> = status.revisions.iter().map(|r| r.revision.to_string()).collect();
                format!("{namespace}/{name} keeps no revision {target}; it keeps {}", kept.join(", "))
            })?;
            let template = serde_json::to_value(&revision.template).map_err(|e| e.to_string())?;
            let fields: serde_json::Map<String, serde_json::Value> = REVISION_FIELDS
                .iter()
                .map(|f| ((*f).to_owned(), template.get(*f).cloned().unwrap_or(serde_json::Value::Null)))
                .collect();
            patch_spec(serde_json::json!({ "spec": fields })).await?;
            println!("{namespace}/{name}: back to revision {target}; nodes that run it keep their instances");
            Ok(())
        }
    }
}

/// The revision `undo` goes back to by default: the current one while a rollout is under
/// way, else the newest one before it.
fn undo_target(status: &MicroserviceStatus) -> Option<i64> {
    let current = status.current_revision?;
    if status.updated_revision != Some(current) {
        return Some(current);
    }
    status.revisions.iter().map(|r| r.revision).filter(|r| *r < current).max()
}

/// What `rollout status` prints.
fn describe_rollout(msvc: &Microservice) -> String {
    let status = msvc.status.clone().unwrap_or_default();
    let mut out = String::new();
    let (Some(current), Some(updated)) = (status.current_revision, status.updated_revision) else {
        return "no revision recorded yet: the controller has not reconciled it\n".into();
    };
    match &status.rollout {
        None => out += &format!("revision {updated}, rolled out all at once\n"),
        Some(r) => {
            let replacing = if current == updated { String::new() } else { format!(" replacing {current}") };
            out += &format!(
                "revision {updated}{replacing}: {:?}, wave {}, {} of {} nodes updated",
                r.phase, r.wave, r.updated_nodes, r.nodes
            );
            if r.offline_nodes > 0 {
                out += &format!(", {} offline", r.offline_nodes);
            }
            out += "\n";
            if let Some(reason) = &r.pause_reason {
                out += &format!("  paused: {reason}\n");
            }
            if !r.failing_nodes.is_empty() {
                out += &format!("  failing: {}\n", r.failing_nodes.join(", "));
            }
            if let Some(message) = &r.message {
                out += &format!("  {message}\n");
            }
        }
    }
    out += &format!("{:<10} {:>9} {:>6}  HASH\n", "REVISION", "ASSIGNED", "READY");
    for r in &status.revisions {
        let mark = match r.revision {
            n if n == updated && n == current => " (current)",
            n if n == updated => " (updated)",
            n if n == current => " (current)",
            _ => "",
        };
        out += &format!("{:<10} {:>9} {:>6}  {}{mark}\n", r.revision, r.instances, r.ready, r.hash);
    }
    out
}

fn logs(
    controller: &str,
    token: &str,
    microservice: &str,
    node: Option<String>,
    tail: Option<u64>,
    follow: bool,
) -> ExitCode {
    let Some((namespace, name)) = microservice.split_once('/') else {
        eprintln!("error: give the microservice as NAMESPACE/NAME, for example default/hello");
        return ExitCode::from(2);
    };
    let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{}/logs/{namespace}/{name}", controller.trim_end_matches('/'));
    let mut offset: Option<u64> = None;
    loop {
        let mut request = http.get(&url).header("authorization", format!("Bearer {token}"));
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
                eprintln!("error: cannot reach the controller at {}: {e}", controller);
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
