//! The `Runtime` trait: what edged asks of whatever runs microservice instances
//! on this device, and the status every runtime reports back.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use serde::{Deserialize, Serialize};
use supermesh_protocol::{Assignment, FailureReason, Workload};
use tokio::sync::watch;

/// Variable naming the edge node an instance runs on.
pub const ENV_NODE: &str = "SUPERMESH_NODE";
/// Variable naming the namespace of the instance's microservice.
pub const ENV_NAMESPACE: &str = "SUPERMESH_NAMESPACE";
/// Variable naming the instance's microservice.
pub const ENV_MICROSERVICE: &str = "SUPERMESH_MICROSERVICE";

/// Latest status of every instance a runtime knows, by resource key.
pub type Statuses = BTreeMap<String, InstanceStatus>;

/// One microservice instance the node should run.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// Resource key `namespace/microservice/name`.
    pub key: String,
    /// Namespace of the microservice.
    pub namespace: String,
    /// Name of the microservice.
    pub name: String,
    /// Version of the assignment; a new version replaces the running instance.
    pub version: String,
    /// What to run.
    pub spec: Workload,
    /// Context environment the agent adds (node, mesh, namespace, microservice, local API address).
    pub env: BTreeMap<String, String>,
    /// Bearer token of the instance for the local API, handed in a file of its own.
    pub token: Option<String>,
    /// Set when this version runs because the agent refused a newer one ([`super::rollback`]).
    pub rollback: Option<Rollback>,
    /// Name of the configuration snapshot its `valueFrom` variables and `files` take their
    /// values from ([`Assignment::config`], see [`super::snapshot`]).
    pub config: Option<String>,
}

/// Why an instance runs the version it ran before instead of the one the cloud sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rollback {
    /// The refused version (the one the cloud sent).
    pub from: String,
    /// What failed and after how long, for a user to read.
    pub message: String,
}

impl InstanceSpec {
    /// The instance of an assignment, with the agent's context environment.
    pub fn from_assignment(assignment: &Assignment, env: BTreeMap<String, String>) -> InstanceSpec {
        InstanceSpec {
            key: assignment.resource(),
            namespace: assignment.namespace.clone(),
            name: assignment.name.clone(),
            version: assignment.version(),
            spec: assignment.spec.clone(),
            env,
            token: None,
            rollback: None,
            config: assignment.config.clone(),
        }
    }
}

pub use supermesh_protocol::Phase;

/// Observed state of one instance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Resource key `namespace/microservice/name`.
    pub key: String,
    /// Version of the spec this status describes.
    pub version: String,
    /// Current phase.
    pub phase: Phase,
    /// How many times the instance was restarted (since this version or the agent started).
    pub restarts: u32,
    /// Process id of the running instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Exit code of the last exit, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What happened last, for a user to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why it failed for good, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailureReason>,
    /// Milliseconds since the Unix epoch when the phase last changed.
    pub since_ms: i64,
    /// Ports the instance's spec declares (`spec.ports[].port`), for endpoint discovery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<i32>,
    /// Set when the instance runs the version it ran before because a newer one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
}

impl InstanceStatus {
    /// A new instance's status: `Pending`, no restarts, since now.
    pub fn pending(key: &str, version: &str) -> InstanceStatus {
        InstanceStatus {
            key: key.to_owned(),
            version: version.to_owned(),
            phase: Phase::Pending,
            restarts: 0,
            pid: None,
            exit_code: None,
            message: None,
            reason: None,
            since_ms: now_ms(),
            ports: Vec::new(),
            rollback: None,
        }
    }

    /// The status of a new instance of `spec`: `Pending`, with the ports it declares.
    pub fn of(spec: &InstanceSpec) -> InstanceStatus {
        InstanceStatus {
            ports: spec.spec.ports.iter().map(|p| p.port).collect(),
            rollback: spec.rollback.clone(),
            ..InstanceStatus::pending(&spec.key, &spec.version)
        }
    }
}

/// Runs microservice instances on this device.
///
/// Every method is idempotent; outcomes (including a spec that cannot run) are
/// reported through [`Runtime::statuses`], never as errors of the call.
pub trait Runtime: Send + Sync {
    /// Makes the instance run `spec`: starts it, adopts a still-running process of the
    /// same key and version, or replaces one of another version. Returns once the
    /// request is taken; progress shows in the statuses.
    fn ensure(&self, spec: InstanceSpec) -> impl Future<Output = ()> + Send;

    /// Stops the instance gracefully (also one left running by a previous agent) and
    /// forgets it; resolves when its processes are gone.
    fn stop(&self, key: &str) -> impl Future<Output = ()> + Send;

    /// Every instance's status; each phase change is published at once.
    fn statuses(&self) -> watch::Receiver<Statuses>;

    /// Keys of the instances this runtime runs or supervises, including processes a
    /// previous agent left running: what the agent compares with its desired set.
    fn running_keys(&self) -> BTreeSet<String>;
}

pub use supermesh_protocol::now_ms;

/// A duration for people: `500ms`, `4s`, `2m8s`.
pub fn human(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}
