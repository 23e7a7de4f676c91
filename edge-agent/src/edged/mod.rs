//! edged: what this node should run. In this release it keeps the desired set
//! the metamanager passes on (one entry per microservice) and logs each change;
//! the process runtime builds on this set.

pub mod artifact;
pub mod fake;
pub mod group;
pub mod health;
pub mod logs;
pub mod process;
pub mod rollback;
pub mod runtime;
pub mod sandbox;
pub mod snapshot;

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;

use supermesh_protocol::{Assignment, EventReport, InstanceEvent, ResourceRef, MICROSERVICE};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use rollback::Step;
use runtime::{InstanceSpec, Phase, Rollback, Runtime};

use crate::config::EdgeConfig;
use crate::localapi;
use crate::metamanager::store::{Kept, Revisions};
use crate::metamanager::{EdgedEvent, MetaHandle};

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
/// every desired instance at its version, nothing else; or at the version kept in
/// `meta` while the device refuses the one the cloud sent ([`rollback`]). The first
/// pass also stops instances adopted after an agent restart that are no longer desired.
pub async fn reconcile<R: Runtime>(
    runtime: &R,
    mut desired: watch::Receiver<BTreeMap<String, Desired>>,
    context: &Context,
    meta: &MetaHandle,
) {
    let mut statuses = runtime.statuses();
    let mut devices = Revisioned::default();
    let mut first = true;
    loop {
        let want = desired.borrow_and_update().clone();
        let seen = statuses.borrow_and_update().clone();
        let mut wake: Option<Instant> = None;
        let mut again = false;
        for (key, d) in &want {
            match devices.pass(runtime, context, meta, key, d, &seen).await {
                Step::Wait(at) => wake = earliest(wake, at),
                Step::Keep(_) => {}
                Step::Refuse(_) => again = true,
            }
        }
        let mut unwanted: Vec<String> = devices.ensured.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
        if std::mem::take(&mut first) {
            unwanted.extend(runtime.running_keys().into_iter().filter(|k| !want.contains_key(k)));
        }
        for key in unwanted {
            info!(target: "edged", %key, "stopping an instance that is no longer placed here");
            runtime.stop(&key).await;
            devices.forget(meta, &key).await;
        }
        if again {
            continue;
        }
        let due = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return },
            changed = statuses.changed() => if changed.is_err() { return },
            () = due => {}
        }
    }
}

/// What [`reconcile`] remembers per microservice: what it asked the runtime to run,
/// the revisions kept in SQLite (cached) and the version on probation.
#[derive(Default)]
struct Revisioned {
    ensured: BTreeMap<String, (Desired, Option<Rollback>)>,
    revisions: BTreeMap<String, Revisions>,
    probations: BTreeMap<String, rollback::Probation>,
}

impl Revisioned {
    /// One look at microservice `key`, which the cloud wants at `d`: ensures what should
    /// run and judges a version on probation.
    async fn pass<R: Runtime>(
        &mut self,
        runtime: &R,
        context: &Context,
        meta: &MetaHandle,
        key: &str,
        d: &Desired,
        seen: &runtime::Statuses,
    ) -> Step {
        let revisions = match self.revisions.entry(key.to_owned()) {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(slot) => slot.insert(meta.revisions(key).await.unwrap_or_else(|e| {
                warn!(target: "edged", %key, error = %e, "cannot read the kept revisions; none kept");
                Revisions::default()
            })),
        };
        if revisions.refused.as_ref().is_some_and(|r| r.version != d.version) {
            info!(target: "edged", %key, version = %d.version, "the cloud sent another version: the refusal ends");
            revisions.refused = None;
            if let Err(e) = meta.clear_revisions(key, false).await {
                warn!(target: "edged", %key, error = %e, "cannot end the refusal in the store");
            }
        }
        let status_of = |version: &str| seen.get(key).filter(|s| s.version == version);
        if let Some((running, _)) = self.ensured.get(key) {
            let phase = status_of(&running.version).map_or(Phase::Unknown, |s| s.phase);
            if let Some(kept) = rollback::kept_on_arrival(running, phase, d, revisions) {
                keep(meta, key, kept, revisions).await;
            }
        }
        let chosen = rollback::choose(d, revisions);
        if self.ensured.get(key) != Some(&chosen) {
            let (run, rolled_back) = &chosen;
            match serde_json::from_str::<Assignment>(&run.value) {
                Ok(a) => {
                    runtime.ensure(InstanceSpec { rollback: rolled_back.clone(), ..instance_spec(context, &a) }).await;
                    if rolled_back.is_none() && rollback::on_probation(d, a.min_ready_seconds, revisions) {
                        let probation = rollback::Probation::new(&d.version, a.min_ready_seconds, Instant::now());
                        self.probations.insert(key.to_owned(), probation);
                    } else {
                        self.probations.remove(key);
                    }
                    self.ensured.insert(key.to_owned(), chosen);
                }
                Err(e) => warn!(%key, error = %e, "stored assignment is unreadable; not run"),
            }
        }
        let Some(probation) = self.probations.get_mut(key) else { return Step::Wait(None) };
        let status = status_of(&probation.version).map(|s| (s.phase, s.message.as_deref()));
        let step = probation.judge(d, revisions, status, Instant::now());
        match &step {
            Step::Wait(_) => {}
            Step::Keep(kept) => {
                info!(target: "edged", %key, version = %kept.version, "version proved itself: kept as the one to go back to");
                self.probations.remove(key);
                keep(meta, key, kept.clone(), revisions).await;
            }
            Step::Refuse(refusal) => {
                warn!(target: "edged", %key, refused = %refusal.version, back_to = %refusal.back_to, message = %refusal.message, "rolling back on the device");
                self.probations.remove(key);
                let event = EventReport::instance(InstanceEvent::RolledBackOnDevice, true, refusal.message.clone());
                let event = serde_json::to_value(&event).unwrap_or_default();
                if let Err(e) = meta.refuse(key, refusal.clone(), &event).await {
                    warn!(target: "edged", %key, error = %e, "cannot record the refusal; rolling back anyway");
                }
                revisions.refused = Some(refusal.clone());
            }
        }
        step
    }

    /// Forgets microservice `key`, which left this node, here and in the store.
    async fn forget(&mut self, meta: &MetaHandle, key: &str) {
        self.ensured.remove(key);
        self.probations.remove(key);
        self.revisions.remove(key);
        if let Err(e) = meta.clear_revisions(key, true).await {
            warn!(target: "edged", %key, error = %e, "cannot drop the kept revisions");
        }
    }
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Keeps `kept` as the version `key` goes back to, in the store and in `revisions`.
async fn keep(meta: &MetaHandle, key: &str, kept: Kept, revisions: &mut Revisions) {
    if let Err(e) = meta.keep_previous(key, kept.clone()).await {
        warn!(target: "edged", %key, error = %e, "cannot keep the previous version in the store");
    }
    revisions.previous = Some(kept);
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
            config: None,
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
