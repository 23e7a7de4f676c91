//! `Microservice`: a workload run on the nodes of a mesh.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a microservice.
// Repeated `printcolumn(type_ = ...)` keys look like duplicated attributes to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "supermesh.io",
    version = "v1alpha1",
    kind = "Microservice",
    plural = "microservices",
    shortname = "msvc",
    namespaced,
    status = "MicroserviceStatus",
    printcolumn(
        name = "Mesh",
        type_ = "string",
        json_path = ".spec.mesh",
        description = "Mesh the microservice runs in"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredInstances",
        description = "Instances placed on edge nodes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyInstances",
        description = "Instances reporting ready"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableInstances",
        description = "Instances serving"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition"
    ),
    printcolumn(
        name = "Current",
        type_ = "integer",
        json_path = ".status.currentRevision",
        description = "Revision the fleet runs outside the rollout"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        json_path = ".status.updatedRevision",
        description = "Revision being rolled out"
    ),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        json_path = ".status.rollout.phase",
        description = "Phase of the rollout"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MicroserviceSpec {
    /// Name of the Mesh, in the same namespace, whose nodes run this microservice.
    #[schemars(length(min = 1, max = 253))]
    pub mesh: String,
    /// Executable and its leading arguments, as in a Pod's command.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Further arguments appended to the command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables set for every instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Files written from ConfigMap or Secret keys into each instance's `config/` directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ConfigFile>,
    /// Archive to download, verify and unpack before running the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// Number of instances. Absent means one instance on every node of the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Labels a node must carry to run an instance, as on a Pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Ports the microservice listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// How the agent checks that an instance is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// When the agent restarts an instance that exited.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// What an instance needs beyond the default sandbox (its own unprivileged user, no
    /// capabilities). Placed only on nodes whose EdgeNode `spec.security` allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// How a new revision (a change to what runs) reaches the nodes: all at once (the
    /// default) or in health-gated waves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// How a new revision reaches the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// `AllAtOnce` (every node at once) or `Waves`.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Waves: size of the first wave, a count (`1`) or a share of the nodes (`"10%"`, rounded up). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<IntOrString>,
    /// Waves: each wave after the canary is this many times the one before. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub growth_factor: Option<i32>,
    /// Waves: the largest wave, a count or a share of the nodes. Default: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wave: Option<IntOrString>,
    /// Seconds an updated instance must stay ready before its wave counts as done. On the
    /// device, a new revision that fails its health check within this time is replaced by
    /// the previous one, by the agent itself. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,
    /// Waves: at most this many updated instances may be not ready at once, a count or a
    /// share of the nodes. Default: no limit but the wave's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// Waves: the health gate. When the share of updated instances that failed, are
    /// unhealthy or were rolled back on their device passes this (a count or a share of the
    /// updated instances), the rollout pauses, or rolls back with `autoRollback`. Default 0:
    /// any failure stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<IntOrString>,
    /// Waves: roll the fleet back to the current revision when the health gate closes,
    /// instead of pausing.
    #[serde(default)]
    pub auto_rollback: bool,
    /// Waves: no further wave starts while set (`supermeshctl rollout pause|resume`).
    #[serde(default)]
    pub paused: bool,
    /// Waves: how long a wave may wait for its instances (offline nodes included) before
    /// the rollout stops with `ProgressDeadlineExceeded`; offline nodes are then skipped and
    /// get their wave's revision when they return. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub progress_deadline_seconds: Option<i32>,
}

/// How a new revision reaches the nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutStrategy {
    /// Every node at once.
    #[default]
    AllAtOnce,
    /// A canary wave, then growing waves, each held until its instances are ready.
    Waves,
}

/// Who an instance runs as and which capabilities it keeps.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    /// User id to run as instead of the microservice's own allocated one (0 is root).
    /// Needs `allowRunAsUser` on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4294967294u32))]
    pub run_as_user: Option<u32>,
    /// Group id to run as instead of the microservice's own. Needs `allowRunAsUser` on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4294967294u32))]
    pub run_as_group: Option<u32>,
    /// Linux capabilities the instance keeps, without the `CAP_` prefix (for example
    /// `NET_BIND_SERVICE`). Each must be in the node's `allowedCapabilities`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[A-Z][A-Z0-9_]{0,31}$")))]
    pub capabilities: Vec<Capability>,
}

/// A Linux capability name without the `CAP_` prefix, upper case (`NET_BIND_SERVICE`).
pub type Capability = String;

/// One environment variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Name of the variable.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Value of the variable (may be empty); not set with `valueFrom`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// Takes the value from a key of a ConfigMap or Secret in the microservice's namespace
    /// instead. The values a revision runs are frozen with it: a change to the key is a new
    /// revision, rolled out like any other change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<ValueFrom>,
}

/// A key of a ConfigMap or of a Secret in the microservice's namespace: exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValueFrom {
    /// A key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    /// A key of a Secret. Its value reaches only the nodes that run the microservice, and
    /// the agents keep it encrypted at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
}

/// A key of a named ConfigMap or Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub struct KeyRef {
    /// Name of the ConfigMap or Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A file written into the instance's `config/` directory (`$SUPERMESH_CONFIG_DIR`),
/// readable by the instance's user only (0400).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFile {
    /// Path under `config/`: relative, without `..` (for example `app/settings.toml`).
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/\x00]"))]
    pub path: String,
    /// Where its content comes from: `configMapKeyRef` or `secretKeyRef`.
    #[serde(flatten)]
    pub from: ValueFrom,
}

/// A downloadable archive with its expected digest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Artifact {
    /// Where the agent downloads the archive from (http or https).
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Lower-case hex SHA-256 of the archive; a mismatch fails the instance.
    #[schemars(pattern(r"^[a-f0-9]{64}$"))]
    pub sha256: String,
}

/// Transport protocol of a port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Protocol {
    /// TCP.
    #[default]
    TCP,
    /// UDP.
    UDP,
}

/// A port the microservice listens on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Port {
    /// Name of the port, used in endpoint discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Protocol, TCP by default.
    #[serde(default)]
    pub protocol: Protocol,
}

fn default_period_seconds() -> i32 {
    10
}

fn default_failure_threshold() -> i32 {
    3
}

/// Health check of an instance: exactly one of `http`, `tcp` or `exec`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Healthy when a GET on this local path and port answers 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Healthy when a TCP connection to this local port succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// Healthy when this command exits with status 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    /// Seconds between two checks.
    #[serde(default = "default_period_seconds")]
    #[schemars(range(min = 1))]
    pub period_seconds: i32,
    /// Consecutive failures after which the instance is unhealthy and restarted.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1))]
    pub failure_threshold: i32,
}

/// HTTP GET health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct HttpCheck {
    /// Path to GET, for example /healthz.
    #[serde(default = "default_http_path")]
    pub path: String,
    /// Local port to connect to.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

fn default_http_path() -> String {
    "/".to_owned()
}

/// TCP connect health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TcpCheck {
    /// Local port to connect to.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// Command health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ExecCheck {
    /// Command and arguments to run.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
}

/// When an exited instance is restarted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartPolicy {
    /// Always restart, with exponential backoff.
    #[default]
    Always,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

/// Observed state of a microservice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicroserviceStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of instances placed on edge nodes.
    #[serde(default)]
    pub desired_instances: i32,
    /// Number of instances passing their health check.
    #[serde(default)]
    pub ready_instances: i32,
    /// Number of instances ready and serving.
    #[serde(default)]
    pub available_instances: i32,
    /// Ready, Progressing and Degraded, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Some unhealthy instances, at most `MAX_UNHEALTHY` (the full view is served by the controller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy_instances: Vec<UnhealthyInstance>,
    /// The revision the fleet runs outside the rollout (and goes back to on rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<i64>,
    /// The revision being rolled out (equal to `currentRevision` once it is done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_revision: Option<i64>,
    /// The latest revisions, newest last, at most `MAX_REVISIONS`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<Revision>,
    /// Where the rollout of `updatedRevision` stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// What the spec's ConfigMap and Secret references last resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ResolvedConfig>,
}

/// The values of a spec's references, frozen in a snapshot Secret owned by the Microservice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedConfig {
    /// Hash of the references resolved (the spec's `valueFrom` and `files` entries).
    pub references: String,
    /// Hash of the values they had.
    pub hash: String,
    /// Name of the snapshot Secret holding them.
    pub snapshot: String,
}

impl MicroserviceStatus {
    /// Largest number of unhealthy instances listed in the status.
    pub const MAX_UNHEALTHY: usize = 10;
    /// Number of revisions kept.
    pub const MAX_REVISIONS: usize = 10;
    /// Largest number of nodes named in `rollout.failingNodes`.
    pub const MAX_FAILING: usize = 10;

    /// The kept revision numbered `revision`.
    pub fn revision(&self, revision: i64) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.revision == revision)
    }
}

/// One revision: what runs, as of the generation that first asked for it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// Its number: the generation of the Microservice that first asked for it. A change back
    /// to a kept revision's content reuses its number.
    pub revision: i64,
    /// Hash of what runs (the wire workload), so that equal contents are one revision.
    pub hash: String,
    /// The spec the revision was taken from; only what runs of it counts.
    pub template: MicroserviceSpec,
    /// The snapshot Secret of the ConfigMap and Secret values the revision runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Nodes assigned this revision (while a wave replaces them, old instances still run and
    /// may report ready at the revision they leave).
    #[serde(default)]
    pub instances: i32,
    /// Instances reporting ready at this revision.
    #[serde(default)]
    pub ready: i32,
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Progressing`, `Paused`, `RolledBack` or `Complete`.
    pub phase: RolloutPhase,
    /// Wave reached, 1 for the canary; 0 before the first.
    #[serde(default)]
    pub wave: i32,
    /// Nodes, first in rendezvous order, that are to run `updatedRevision`.
    #[serde(default)]
    pub updated_nodes: i32,
    /// Nodes placed in all.
    #[serde(default)]
    pub nodes: i32,
    /// Nodes of the waves so far whose agent is offline (they get their wave's revision on return).
    #[serde(default)]
    pub offline_nodes: i32,
    /// When the current wave started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_started_at: Option<Time>,
    /// Since when every online instance of the waves so far is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_since: Option<Time>,
    /// Why a `Paused` rollout stopped: `Paused` (by `spec.rollout.paused`, resumed by
    /// clearing it), `HealthGate` or `ProgressDeadlineExceeded` (resumed by
    /// `supermeshctl rollout resume`), or `InvalidSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// Nodes whose updated instance failed, at most `MAX_FAILING`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing_nodes: Vec<String>,
    /// What the rollout waits for or why it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Phase of a rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Waves are being rolled out.
    #[default]
    Progressing,
    /// Stopped: by `paused`, by the health gate or by the progress deadline.
    Paused,
    /// The health gate sent the fleet back to `currentRevision`.
    RolledBack,
    /// Every node runs `updatedRevision`.
    Complete,
}

/// An instance that is not healthy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnhealthyInstance {
    /// Edge node running the instance.
    pub node: String,
    /// Phase of the instance, for example Failed or CrashLoop.
    pub phase: String,
    /// How many times the instance was restarted.
    #[serde(default)]
    pub restarts: i32,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
