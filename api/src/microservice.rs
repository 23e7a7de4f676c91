//! `Microservice`: a workload run on the nodes of a mesh.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
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
pub struct EnvVar {
    /// Name of the variable.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Value of the variable (may be empty, but must be given).
    pub value: String,
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
}

impl MicroserviceStatus {
    /// Largest number of unhealthy instances listed in the status.
    pub const MAX_UNHEALTHY: usize = 10;
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
