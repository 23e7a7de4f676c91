//! Network memberships: who belongs to a network cluster, sent to its members.

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{Location, MEMBERSHIP};

/// Who belongs to a network cluster as the cloud's records say: each member's enrolled
/// key and election inputs, the cluster key, and the key the cloud signs receipts with
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
    /// Hex of the public key the cloud signs its [`crate::Receipt`]s with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_key: Option<String>,
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
    /// Fingerprint of the key it enrolled ([`crate::identity::key_fingerprint`]): what its
    /// heartbeats, reports, registries and certificate must carry. `None` before it enrolled;
    /// such a member is no peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Its capacity class as the cloud knows it (CPU cores × 1000 + memory in GiB, capped
    /// at 999), what the election compares; 0 while unknown.
    #[serde(default)]
    pub capacity: u32,
}

impl Membership {
    /// The member named `name`, if listed.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

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
