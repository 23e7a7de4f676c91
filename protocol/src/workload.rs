//! What an agent runs: the workload of a microservice placed on its node.
//!
//! These types mirror the run-related part of the Microservice spec field by
//! field in JSON, so that agents of every 1.x version read them, but they are
//! their own types: the controller maps the CRD into them, and a CRD change
//! that is not also made here never reaches an agent.

use std::collections::BTreeMap;

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
    /// Name of the configuration snapshot the revision takes the values of its
    /// `valueFrom` variables and `files` from (protocol 1.4): the agent reads it as
    /// resource `namespace/config/<name>`, from its store or by a Query to the cloud,
    /// which answers only nodes holding an assignment that names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
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
    /// Files written into the instance's `config/` directory from a ConfigMap or Secret
    /// key (protocol 1.4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ConfigFile>,
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
///
/// `value` crosses the wire only without `value_from`: agents before 1.4 require it, so
/// they refuse (nack) a variable they cannot resolve instead of running it empty.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Name of the variable.
    pub name: String,
    /// Value of the variable; empty with `value_from`.
    #[serde(default)]
    pub value: String,
    /// Where the value comes from instead (protocol 1.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<ValueFrom>,
}

impl Serialize for EnvVar {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut var = serializer.serialize_struct("EnvVar", 2)?;
        var.serialize_field("name", &self.name)?;
        match &self.value_from {
            None => var.serialize_field("value", &self.value)?,
            Some(from) => var.serialize_field("valueFrom", from)?,
        }
        var.end()
    }
}

/// A key of a ConfigMap or a Secret in the microservice's namespace: exactly one is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ValueFrom {
    /// A key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    /// A key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
}

impl ValueFrom {
    /// The source as (`configMaps` or `secrets`, name, key), as [`ConfigData`] files it.
    pub fn source(&self) -> Option<(ConfigKind, &KeyRef)> {
        match (&self.config_map_key_ref, &self.secret_key_ref) {
            (Some(r), None) => Some((ConfigKind::ConfigMap, r)),
            (None, Some(r)) => Some((ConfigKind::Secret, r)),
            _ => None,
        }
    }
}

/// A key of a named ConfigMap or Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRef {
    /// Name of the ConfigMap or Secret.
    pub name: String,
    /// The key.
    pub key: String,
}

/// A file written into the instance's `config/` directory, readable by its user only (0400).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFile {
    /// Path under `config/`: relative, without `..`, for example `app/settings.toml`.
    pub path: String,
    /// Where its content comes from.
    #[serde(flatten)]
    pub from: ValueFrom,
}

/// Whether a referenced key is a ConfigMap's or a Secret's.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfigKind {
    /// A ConfigMap.
    ConfigMap,
    /// A Secret.
    Secret,
}

/// A configuration snapshot (content of resource `namespace/config/<name>`): the
/// values of the keys one revision references, frozen when the revision was made,
/// so that every node of the revision runs the same values and a change to a
/// ConfigMap or Secret is a new revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConfigData {
    /// Referenced keys of ConfigMaps: name → key → value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Referenced keys of Secrets: name → key → value (UTF-8; other bytes are refused
    /// when the snapshot is made).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
}

impl ConfigData {
    /// The value of `key` of `kind` `name`, if the snapshot holds it.
    pub fn get(&self, kind: ConfigKind, r: &KeyRef) -> Option<&str> {
        let maps = match kind {
            ConfigKind::ConfigMap => &self.config_maps,
            ConfigKind::Secret => &self.secrets,
        };
        maps.get(&r.name)?.get(&r.key).map(String::as_str)
    }
}

impl Workload {
    /// Every key the workload's variables and files reference, with its kind.
    pub fn references(&self) -> impl Iterator<Item = (ConfigKind, &KeyRef)> {
        let env = self.env.iter().filter_map(|e| e.value_from.as_ref());
        env.chain(self.files.iter().map(|f| &f.from)).filter_map(ValueFrom::source)
    }
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

    #[test]
    fn a_variable_from_a_config_map_carries_no_value_that_older_agents_would_run_empty() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct EnvVarOf1_3 {
            name: String,
            value: String,
        }
        let vars: Vec<EnvVar> = serde_json::from_value(serde_json::json!([
            {"name": "A", "value": ""},
            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "b"}}}
        ]))
        .unwrap();
        assert_eq!((vars[1].value.as_str(), vars[1].value_from.is_some()), ("", true));
        let sent: Vec<serde_json::Value> = vars.iter().map(|v| serde_json::to_value(v).unwrap()).collect();
        assert!(serde_json::from_value::<EnvVarOf1_3>(sent[0].clone()).is_ok(), "an empty literal still crosses");
        let refused = serde_json::from_value::<EnvVarOf1_3>(sent[1].clone()).unwrap_err();
        assert!(refused.to_string().contains("missing field `value`"), "{refused}");
        let back: Vec<EnvVar> = sent.into_iter().map(|v| serde_json::from_value(v).unwrap()).collect();
        assert_eq!(back, vars);
    }
}
