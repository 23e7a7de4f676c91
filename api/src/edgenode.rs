//! `EdgeNode`: one edge device running supermesh-agent.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use supermesh_protocol::Location;

use crate::microservice::MicroserviceSpec;

fn default_true() -> bool {
    true
}

/// Desired state of an edge device.
// Repeated `printcolumn(type_ = ...)` keys look like duplicated attributes to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "supermesh.io",
    version = "v1alpha1",
    kind = "EdgeNode",
    plural = "edgenodes",
    shortname = "en",
    status = "EdgeNodeStatus",
    printcolumn(
        name = "Network",
        type_ = "string",
        json_path = ".spec.network",
        description = "Network (LAN) of the node"
    ),
    printcolumn(name = "Account", type_ = "string", json_path = ".spec.account", description = "Owner account"),
    printcolumn(name = "Role", type_ = "string", json_path = ".status.role", description = "Supernode or Member"),
    printcolumn(
        name = "Connected",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Connected\")].status",
        description = "Whether the agent is connected"
    ),
    printcolumn(
        name = "Instances",
        type_ = "integer",
        json_path = ".status.instances.desired",
        description = "Microservice instances placed on the node"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeSpec {
    /// Account (owner) of the device.
    #[schemars(length(min = 1, max = 253))]
    pub account: String,
    /// Network (LAN) the device sits on; nodes on one network form a cluster.
    #[schemars(length(min = 1, max = 253))]
    pub network: String,
    /// Where the device is, for Proximity meshes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Whether the node may be elected supernode of its cluster.
    #[serde(default = "default_true")]
    pub supernode_eligible: bool,
    /// When true, no new microservice instance is placed on the node; running ones stay.
    #[serde(default)]
    pub unschedulable: bool,
    /// What microservices on the node may have beyond the default sandbox. Empty by
    /// default: each instance runs as its own unprivileged user with no capabilities,
    /// and artifacts come only over https.
    #[serde(default, skip_serializing_if = "NodeSecurity::is_default")]
    pub security: NodeSecurity,
}

/// What a node allows its microservices beyond the default sandbox.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSecurity {
    /// Whether a microservice may choose its user and group (`securityContext.runAsUser`,
    /// `runAsGroup`), root included.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_run_as_user: bool,
    /// Capabilities (without `CAP_`, e.g. `NET_BIND_SERVICE`) a microservice may keep.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[A-Z][A-Z0-9_]{0,31}$")))]
    pub allowed_capabilities: Vec<String>,
    /// Whether artifacts may be downloaded over plain http (otherwise https only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_artifacts: bool,
}

impl NodeSecurity {
    /// Whether nothing beyond the default sandbox is allowed.
    pub fn is_default(&self) -> bool {
        *self == NodeSecurity::default()
    }

    /// What `spec` needs that this node does not allow, for a user to read; `None` when it may run here.
    pub fn refuses(&self, spec: &MicroserviceSpec) -> Option<String> {
        let mut missing = Vec::new();
        if let Some(sc) = &spec.security_context {
            if (sc.run_as_user.is_some() || sc.run_as_group.is_some()) && !self.allow_run_as_user {
                missing.push("allowRunAsUser: true".to_owned());
            }
            let caps: Vec<&str> =
                sc.capabilities.iter().filter(|c| !self.allowed_capabilities.contains(c)).map(String::as_str).collect();
            if !caps.is_empty() {
                missing.push(format!("allowedCapabilities with {}", caps.join(", ")));
            }
        }
        let insecure = spec.artifact.as_ref().is_some_and(|a| !a.url.starts_with("https://"));
        if insecure && !self.allow_insecure_artifacts {
            missing.push("allowInsecureArtifacts: true (the artifact URL is not https)".to_owned());
        }
        (!missing.is_empty()).then(|| missing.join("; "))
    }
}

pub use supermesh_protocol::NodeRole;

/// Observed state of an edge device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeStatus {
    /// Ready and Connected conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Role of the node in its network cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    /// Name of the supernode of the node's cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernode: Option<String>,
    /// Last time the agent was heard from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Version of the supermesh-agent running on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Operating system of the node (for example linux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// CPU architecture of the node (for example x86_64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Resources of the node, such as cpu and memory, as quantities.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capacity: BTreeMap<String, String>,
    /// Counts of microservice instances on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceCounts>,
    /// Addresses the node is reachable at: `InternalIP`, the address its agent connects from, and
    /// `Peer`, the `host:port` at which its cluster peers reach its supernode service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
}

impl EdgeNodeStatus {
    /// The address of type `address_type` (for example [`NodeAddress::PEER`]), if the node has one.
    pub fn address(&self, address_type: &str) -> Option<&str> {
        self.addresses.iter().find(|a| a.address_type == address_type).map(|a| a.address.as_str())
    }
}

/// Counts of microservice instances on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceCounts {
    /// Instances placed on the node.
    pub desired: i32,
    /// Instances reported running.
    #[serde(default)]
    pub running: i32,
    /// Instances reported ready.
    #[serde(default)]
    pub ready: i32,
}

/// One address of a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    /// Kind of address: InternalIP or Peer.
    #[serde(rename = "type")]
    pub address_type: String,
    /// The address.
    pub address: String,
}

impl NodeAddress {
    /// Type of the IP address the node's agent connects to the cloud from.
    pub const INTERNAL_IP: &'static str = "InternalIP";
    /// Type of the `host:port` at which the node's cluster peers reach its supernode service.
    pub const PEER: &'static str = "Peer";
}
