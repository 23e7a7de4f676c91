//! What an agent runs: the workload of a microservice placed on its node.
//!
//! These types mirror the run-related part of the Microservice spec field by
//! field in JSON, so that agents of every 1.x version read them, but they are
//! their own types: the controller maps the CRD into them, and a CRD change
//! that is not also made here never reaches an agent.

use serde::{Deserialize, Serialize};

use crate::message::ResourceRef;
use crate::MICROSERVICE;

/// What the cloud sends an agent about one microservice placed on it
/// (content of Insert and Update on resource `namespace/microservice/name`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// Namespace of the Microservice.
    pub namespace: String,
    /// Name of the Microservice.
    pub name: String,
    /// UID of the Microservice object.
    pub uid: String,
    /// Generation of its spec.
    pub generation: i64,
    /// What to run.
    pub spec: Workload,
    /// Seconds an instance of this version must stay ready; one that fails its health
    /// check sooner is replaced by the version the agent ran before, by the agent itself
    /// (protocol 1.3; 0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_ready_seconds: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Assignment {
    /// The resource string of this assignment.
    pub fn resource(&self) -> String {
        ResourceRef::string(&self.namespace, MICROSERVICE, &self.name)
    }

    /// The version the agent stores and states: changes with every spec change and
    /// when an object is deleted and re-created under the same name.
    pub fn version(&self) -> String {
        version(self.generation, &self.uid)
    }
}

/// The version of a Microservice's assignment: changes with every spec change and
/// when the object is deleted and re-created under the same name.
pub fn version(generation: i64, uid: &str) -> String {
    format!("{generation}-{uid}")
}

/// How to run a microservice's instances on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Name of the Mesh the microservice runs in, for the instance's context.
    pub mesh: String,
    /// Executable and its leading arguments.
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
    /// Ports the microservice listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// How the agent checks that an instance is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// When the agent restarts an instance that exited.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// What the instance needs beyond the default sandbox; the cloud sends it only to
    /// nodes whose EdgeNode allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
}

/// Who an instance runs as and which capabilities it keeps (`spec.securityContext`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    /// User id instead of the microservice's allocated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<u32>,
    /// Group id instead of the microservice's allocated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<u32>,
    /// Capabilities kept, without the `CAP_` prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// One environment variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    /// Name of the variable.
    pub name: String,
    /// Value of the variable.
    pub value: String,
}

/// A downloadable archive with its expected digest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// Where the agent downloads the archive from.
    pub url: String,
    /// Lower-case hex SHA-256 of the archive.
    pub sha256: String,
}

/// Transport protocol of a port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    #[default]
    TCP,
    /// UDP.
    UDP,
}

/// A port the microservice listens on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Name of the port, used in endpoint discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number.
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

fn default_http_path() -> String {
    "/".to_owned()
}

/// Health check of an instance: exactly one of `http`, `tcp` or `exec`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
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
    pub period_seconds: i32,
    /// Consecutive failures after which the instance is unhealthy and restarted.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: i32,
}

/// HTTP GET health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HttpCheck {
    /// Path to GET, for example /healthz.
    #[serde(default = "default_http_path")]
    pub path: String,
    /// Local port to connect to.
    pub port: i32,
}

/// TCP connect health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TcpCheck {
    /// Local port to connect to.
    pub port: i32,
}

/// Command health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ExecCheck {
    /// Command and arguments to run.
    pub command: Vec<String>,
}

/// When an exited instance is restarted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Always restart, with exponential backoff.
    #[default]
    Always,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_read_what_agents_of_protocol_1_0_stored() {
        // An assignment as protocol 1.0 sent it: the whole Microservice spec, placement fields included.
        let stored = serde_json::json!({
            "namespace": "team", "name": "web", "uid": "u-1", "generation": 4,
            "spec": {
                "mesh": "home", "command": ["srv"], "replicas": 2, "nodeSelector": {"gpu": "yes"},
                "ports": [{"port": 8080}], "healthCheck": {"http": {"port": 8080}}
            }
        });
        let a: Assignment = serde_json::from_value(stored).unwrap();
        assert_eq!((a.resource(), a.version()), ("team/microservice/web".to_string(), "4-u-1".to_string()));
        let check = a.spec.health_check.as_ref().unwrap();
        assert_eq!((check.period_seconds, check.failure_threshold), (10, 3));
        assert_eq!(check.http.as_ref().unwrap().path, "/");
        assert_eq!(a.spec.ports[0].protocol, Protocol::TCP);
        assert_eq!(a.spec.restart_policy, RestartPolicy::Always);
        let sent = serde_json::to_value(&a).unwrap();
        assert_eq!(sent["spec"]["mesh"], "home", "1.0 agents require mesh and command");
        assert!(sent["spec"].get("replicas").is_none(), "placement stays in the cloud");
    }
}
