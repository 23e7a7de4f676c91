//! edged: what this node should run. In this release it keeps the desired set
//! the metamanager passes on (one entry per microservice) and logs each change;
//! the process runtime builds on this set.

pub mod artifact;
pub mod fake;
pub mod group;
pub mod health;
pub mod logs;
pub mod process;
pub mod runtime;
pub mod sandbox;

use std::collections::BTreeMap;
use std::fmt;

use supermesh_protocol::{Assignment, ResourceRef, MICROSERVICE};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use runtime::{InstanceSpec, Runtime};

use crate::config::EdgeConfig;
use crate::localapi;
use crate::metamanager::EdgedEvent;

/// One microservice this node should run: its resource key, version and assignment (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Version of the assignment.
    pub version: String,
    /// The assignment as stored by the metamanager.
    pub value: String,
}

/// Applies metamanager events about microservices to the desired set until the
/// channel closes, and publishes the set after each change. Other resources the
/// metamanager stores (memberships, for example) are not workloads and are skipped.
pub async fn run(mut events: mpsc::Receiver<EdgedEvent>, desired: watch::Sender<BTreeMap<String, Desired>>) {
    while let Some(event) = events.recv().await {
        desired.send_if_modified(|set| apply(set, event));
    }
}

/// Applies one event to the desired set; returns whether the set changed.
fn apply(set: &mut BTreeMap<String, Desired>, event: EdgedEvent) -> bool {
    match event {
        EdgedEvent::Upserted { key, res_type, version, value } => {
            if res_type != MICROSERVICE {
                return false;
            }
            info!(target: "edged", %key, %version, "desired microservice stored");
            set.insert(key, Desired { version, value });
            true
        }
        EdgedEvent::Deleted { key } => {
            if !ResourceRef::parse(&key).is_ok_and(|r| r.res_type == MICROSERVICE) {
                return false;
            }
            info!(target: "edged", %key, "desired microservice removed");
            set.remove(&key).is_some()
        }
    }
}

/// Variable naming the mesh of an instance's microservice.
pub const ENV_MESH: &str = "SUPERMESH_MESH";
/// Variable naming the account of the node.
pub const ENV_ACCOUNT: &str = "SUPERMESH_ACCOUNT";
/// Variable naming the network of the node.
pub const ENV_NETWORK: &str = "SUPERMESH_NETWORK";
/// Variable holding the base URL of the agent's local API, e.g. `http://127.0.0.1:10380`.
pub const ENV_API: &str = "SUPERMESH_API";
/// Variable naming the file that holds the instance's bearer token for the local API
/// (readable only by the instance's user; never in the environment, where
/// `/proc/<pid>/environ` would show it).
pub const ENV_TOKEN_FILE: &str = "SUPERMESH_TOKEN_FILE";

/// What edged tells every instance about where it runs: the node and how to reach its local API.
#[derive(Clone, PartialEq, Eq)]
pub struct Context {
    /// Name of this node's EdgeNode.
    pub node: String,
    /// Account of this node.
    pub account: String,
    /// Network of this node.
    pub network: String,
    /// Base URL of the local API ([`localapi::api_url`]).
    pub api_url: String,
    /// The agent's API secret, from which each instance's token is derived ([`localapi::token_for`]).
    pub secret: String,
}

impl Context {
    /// The context of the node `config` describes, with the agent's API secret.
    pub fn new(config: &EdgeConfig, secret: String) -> Context {
        Context {
            node: config.node.name.clone(),
            account: config.node.account.clone(),
            network: config.node.network.clone(),
            api_url: localapi::api_url(config.local_api.listen),
            secret,
        }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("node", &self.node)
            .field("account", &self.account)
            .field("network", &self.network)
            .field("api_url", &self.api_url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The instance of `assignment` on this node: its context environment and its token.
pub fn instance_spec(context: &Context, assignment: &Assignment) -> InstanceSpec {
    InstanceSpec {
        token: Some(localapi::token_for(&context.secret, &assignment.resource())),
        ..InstanceSpec::from_assignment(assignment, context_env(context, assignment))
    }
}

/// The context environment of an instance: who and where it is, and how it reaches the local API.
pub fn context_env(context: &Context, assignment: &Assignment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (runtime::ENV_NODE.to_owned(), context.node.clone()),
        (runtime::ENV_NAMESPACE.to_owned(), assignment.namespace.clone()),
        (runtime::ENV_MICROSERVICE.to_owned(), assignment.name.clone()),
        (ENV_MESH.to_owned(), assignment.spec.mesh.clone()),
        (ENV_ACCOUNT.to_owned(), context.account.clone()),
        (ENV_NETWORK.to_owned(), context.network.clone()),
        (ENV_API.to_owned(), context.api_url.clone()),
    ])
}

/// Makes `runtime` run exactly the desired set until the set's channel closes:
/// every desired instance at its version, nothing else. The first pass also stops
/// instances adopted after an agent restart that are no longer desired.
pub async fn reconcile<R: Runtime>(
    runtime: &R,
    mut desired: watch::Receiver<BTreeMap<String, Desired>>,
    context: &Context,
) {
    let mut ensured: BTreeMap<String, String> = BTreeMap::new();
    let mut first = true;
    loop {
        let want = desired.borrow_and_update().clone();
        for (key, d) in &want {
            if ensured.get(key) == Some(&d.version) {
                continue;
            }
            match serde_json::from_str::<Assignment>(&d.value) {
                Ok(a) => {
                    runtime.ensure(instance_spec(context, &a)).await;
                    ensured.insert(key.clone(), d.version.clone());
                }
                Err(e) => warn!(%key, error = %e, "stored assignment is unreadable; not run"),
            }
        }
        let mut unwanted: Vec<String> = ensured.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
        if std::mem::take(&mut first) {
            unwanted.extend(runtime.running_keys().into_iter().filter(|k| !want.contains_key(k)));
        }
        for key in unwanted {
            info!(target: "edged", %key, "stopping an instance that is no longer placed here");
            runtime.stop(&key).await;
            ensured.remove(&key);
        }
        if desired.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn upserted(key: &str, res_type: &str) -> EdgedEvent {
        EdgedEvent::Upserted { key: key.into(), res_type: res_type.into(), version: "1".into(), value: "{}".into() }
    }

    #[test]
    fn only_microservices_enter_the_desired_set() {
        let mut set = BTreeMap::new();
        assert!(apply(&mut set, upserted("team/microservice/web", MICROSERVICE)));
        assert!(!apply(&mut set, upserted("_/membership/home", "membership")), "a membership is no workload");
        assert!(!apply(&mut set, EdgedEvent::Deleted { key: "_/membership/home".into() }));
        assert_eq!(set.keys().collect::<Vec<_>>(), ["team/microservice/web"]);
        assert!(apply(&mut set, EdgedEvent::Deleted { key: "team/microservice/web".into() }));
        assert!(!apply(&mut set, EdgedEvent::Deleted { key: "team/microservice/web".into() }), "already gone");
        assert!(set.is_empty());
    }

    #[test]
    fn the_environment_carries_the_context_and_a_token_per_microservice() {
        let context = Context {
            node: "pi-kitchen".into(),
            account: "acme".into(),
            network: "home".into(),
            api_url: "http://127.0.0.1:10380".into(),
            secret: "s3cret".into(),
        };
        let assignment = |name: &str| Assignment {
            min_ready_seconds: 0,
            namespace: "team".into(),
            name: name.into(),
            uid: "u".into(),
            generation: 1,
            spec: serde_json::from_value(serde_json::json!({"mesh": "lan", "command": ["web"]})).unwrap(),
        };
        let spec = instance_spec(&context, &assignment("web"));
        let env = &spec.env;
        let get = |name: &str| env.get(name).map(String::as_str);
        assert_eq!(get("SUPERMESH_NODE"), Some("pi-kitchen"));
        assert_eq!(get("SUPERMESH_NAMESPACE"), Some("team"));
        assert_eq!(get("SUPERMESH_MICROSERVICE"), Some("web"));
        assert_eq!(get("SUPERMESH_MESH"), Some("lan"));
        assert_eq!(get("SUPERMESH_ACCOUNT"), Some("acme"));
        assert_eq!(get("SUPERMESH_NETWORK"), Some("home"));
        assert_eq!(get("SUPERMESH_API"), Some("http://127.0.0.1:10380"));
        let token = localapi::token_for("s3cret", "team/microservice/web");
        assert_eq!(spec.token.as_deref(), Some(token.as_str()));
        assert!(env.values().all(|v| *v != token), "the token is handed in a file, not in the environment");
        let other = instance_spec(&context, &assignment("db"));
        assert_ne!(other.token, spec.token, "each microservice has its own token");
        assert!(!format!("{context:?}").contains("s3cret"), "the secret stays out of logs");
    }
}
