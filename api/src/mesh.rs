//! `Mesh`: how a team's microservices are grouped onto edge nodes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use supermesh_protocol::Location;

/// How the nodes of a mesh are chosen.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MeshType {
    /// Nodes on the same network (LAN); each network forms its own cluster.
    Network,
    /// Nodes of the same account, wherever they are.
    Account,
    /// Nodes located within a radius of a center point.
    Proximity,
}

/// Desired grouping of microservices onto edge nodes.
// Repeated `printcolumn(type_ = ...)` keys look like duplicated attributes to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "supermesh.io",
    version = "v1alpha1",
    kind = "Mesh",
    plural = "meshes",
    shortname = "mesh",
    namespaced,
    status = "MeshStatus",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type", description = "How nodes are grouped"),
    printcolumn(
        name = "Account",
        type_ = "string",
        json_path = ".spec.account",
        description = "Account of an Account mesh"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodeCount",
        description = "Edge nodes in the mesh"
    ),
    printcolumn(
        name = "Microservices",
        type_ = "integer",
        json_path = ".status.microserviceCount",
        description = "Microservices using the mesh"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the mesh spec is valid"
    ),
    printcolumn(
        name = "Clusters",
        type_ = "integer",
        json_path = ".status.clusterCount",
        description = "Network clusters of the mesh's nodes"
    ),
    printcolumn(
        name = "Supernodes",
        type_ = "string",
        json_path = ".status.supernodes",
        description = "Supernodes of the listed clusters"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// How nodes are grouped: Network, Account or Proximity.
    #[serde(rename = "type")]
    pub mesh_type: MeshType,
    /// Account whose nodes form the mesh. Required when type is Account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub account: Option<String>,
    /// Networks whose nodes form the mesh (type Network). Absent means every network, each its own cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    /// Area whose nodes form the mesh. Required when type is Proximity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proximity: Option<Proximity>,
    /// Label selector narrowing the member nodes, whatever the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// A circle on the Earth's surface.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Proximity {
    /// Center of the circle.
    pub center: Location,
    /// Radius of the circle in kilometres (great-circle distance).
    #[schemars(range(min = 0.0))]
    pub radius_km: f64,
}

/// Observed state of a Mesh.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of edge nodes in the mesh.
    #[serde(default)]
    pub node_count: i32,
    /// Number of microservices that name this mesh.
    #[serde(default)]
    pub microservice_count: i32,
    /// Number of per-network clusters of member nodes, all of them (`clusters` lists at most `MAX_CLUSTERS`).
    #[serde(default)]
    pub cluster_count: i32,
    /// The supernodes of the listed clusters, comma-separated (a printer column can show only one
    /// value of a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernodes: Option<String>,
    /// Per-network clusters of member nodes, at most `MAX_CLUSTERS` entries (largest first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
    /// Ready: whether the spec is valid and the mesh is in use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Summary of the member nodes of a mesh on one network.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The network (LAN) of the cluster.
    pub network: String,
    /// Name of the cluster's supernode: the member most of its Ready members follow, once one is elected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernode: Option<String>,
    /// Number of member nodes on the network.
    pub members: i32,
    /// Number of member nodes that are Ready.
    pub ready: i32,
}

impl MeshStatus {
    /// Largest number of clusters listed in a Mesh status; the rest are counted only.
    pub const MAX_CLUSTERS: usize = 32;
}
