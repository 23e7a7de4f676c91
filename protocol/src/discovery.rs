//! Discovery answers the cloud gives agents' local APIs.

use serde::{Deserialize, Serialize};

use crate::{Location, NodeRole};

/// Which nodes a `_/nodes/<scope>` query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The nodes of the asking node's account, itself included.
    Account,
    /// Those of them with a known location.
    Proximity,
}

impl Scope {
    /// The scope named by the last segment of a `_/nodes/<scope>` resource.
    pub fn parse(name: &str) -> Option<Scope> {
        match name {
            "account" => Some(Scope::Account),
            "proximity" => Some(Scope::Proximity),
            _ => None,
        }
    }

    /// The segment naming the scope in a `_/nodes/<scope>` resource.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Account => "account",
            Scope::Proximity => "proximity",
        }
    }
}

/// A node as discovery describes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// EdgeNode name.
    pub name: String,
    /// Account of the node.
    pub account: String,
    /// Network of the node.
    pub network: String,
    /// Where the node is, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Host (IP address or name) at which the node is reachable, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its role in its network cluster, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    /// Whether the node is live: connected to the cloud, or heard by its peers.
    pub live: bool,
    /// Great-circle distance from the asking node, when both locations are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
}

/// One instance of a microservice as endpoint discovery describes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The node running the instance.
    pub node: String,
    /// Its network.
    pub network: String,
    /// Host at which the node is reachable, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Ports the microservice declares.
    #[serde(default)]
    pub ports: Vec<i32>,
    /// Whether the instance passes its health check.
    pub ready: bool,
    /// Where the node is, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Great-circle distance from the asking node, when both locations are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
}

/// The cloud's answer to a `_/nodes/<scope>` query.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodesAnswer {
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
}

/// The cloud's answer to a `namespace/endpoints/name` query.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsAnswer {
    /// The instances.
    pub endpoints: Vec<Endpoint>,
}
