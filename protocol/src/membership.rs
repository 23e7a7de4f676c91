//! Network memberships: who belongs to a network cluster, sent to its members.

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{Location, MEMBERSHIP};

/// Who belongs to a network cluster, and the key its members sign peer traffic with
/// (content of Insert and Update on `_/membership/<network>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    /// The network.
    pub network: String,
    /// Hex HMAC key shared by the members ([`crate::peer::cluster_key`]).
    pub key: String,
    /// Every EdgeNode of the network, by name.
    pub members: Vec<Member>,
}

/// One node of a [`Membership`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// EdgeNode name.
    pub name: String,
    /// Account of the node.
    pub account: String,
    /// `host:port` of its supernode service, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Where the node is, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Whether it may be elected supernode.
    pub supernode_eligible: bool,
}

impl Membership {
    /// The resource string of the membership of `network`.
    pub fn resource(network: &str) -> String {
        format!("_/{MEMBERSHIP}/{network}")
    }

    /// A version that changes whenever the content does.
    pub fn version(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&sha2::Sha256::digest(&bytes)[..8])
    }
}
