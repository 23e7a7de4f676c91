//! The hello an agent opens its stream with, and the cloud's welcome.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Location, ProtocolVersion};

/// The agent's first message (operation NodeConnection): who it is and what it holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// Node name; must match the upgrade request's [`crate::NODE_HEADER`].
    pub node: String,
    /// Account of the node, for automatic registration.
    pub account: String,
    /// Network of the node, for automatic registration.
    pub network: String,
    /// Location of the node, for automatic registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Whether the node may be elected supernode, for automatic registration.
    #[serde(default = "yes")]
    pub supernode_eligible: bool,
    /// Version of supermesh-agent.
    pub agent_version: String,
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Versions of the resources the agent holds, by resource string.
    #[serde(default)]
    pub held: BTreeMap<String, String>,
    /// `host:port` at which the node's peers reach its supernode service, when it
    /// advertises one; `:port` alone means "the address I connect from".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// The newest protocol version the agent speaks (absent before 1.1: 1.0).
    #[serde(default)]
    pub protocol: ProtocolVersion,
    /// What the device has: its cluster's election compares it, as the cloud records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

/// What a device has, as its agent tells the cloud.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// CPU cores.
    pub cpus: u32,
    /// Memory, in bytes.
    pub memory_bytes: u64,
}

impl Capacity {
    /// The capacity class the supernode election compares: CPU cores × 1000 + memory in GiB
    /// (capped at 999), so cores count first.
    pub fn class(self) -> u32 {
        let cores = self.cpus.min(4_000_000);
        let gib = u32::try_from((self.memory_bytes >> 30).min(999)).unwrap_or(999);
        cores.saturating_mul(1000).saturating_add(gib)
    }
}

fn yes() -> bool {
    true
}

/// The cloud's answer to a hello (operation NodeConnection).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Welcome {
    /// Seconds between keepalives the agent sends while idle.
    pub keepalive_seconds: u64,
    /// Number of changes the cloud sends to bring the agent up to date.
    pub pending: u64,
    /// The protocol version the session speaks (absent before 1.1: 1.0).
    #[serde(default)]
    pub protocol: ProtocolVersion,
}
