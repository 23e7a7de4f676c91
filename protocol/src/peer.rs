//! The protocol between the agents of one network cluster: heartbeats for the
//! supernode election (UDP datagrams, unicast to every member and optionally
//! multicast on the LAN) and HTTP requests for reports, acks and the registry.
//!
//! Every datagram and request body is signed with the cluster key, an HMAC-SHA256
//! key the cloud derives per network from its secret and sends to the network's
//! members in their [`Membership`](crate::Membership). A node that never
//! reached the cloud has no key and takes part in no cluster; a message with a bad
//! signature is dropped, so a device on the same LAN cannot win an election or
//! inject reports.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{InstanceReport, Location, NodeRole, RelayedReport};

/// Version of the peer protocol; datagrams and requests of another version are dropped.
pub const PEER_VERSION: u32 = 1;
/// Largest heartbeat datagram accepted, in bytes.
pub const MAX_DATAGRAM: usize = 2048;
/// Largest peer HTTP request body accepted, in bytes.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Header naming the sending node of a peer request.
pub const NODE_HEADER: &str = "x-supermesh-node";
/// Header carrying the hex HMAC of a peer request's body.
pub const SIGNATURE_HEADER: &str = "x-supermesh-signature";
/// Path on which a supernode takes its members' reports (POST [`ReportPost`]).
pub const REPORTS_PATH: &str = "/peer/v1/reports";
/// Path on which a member takes acks of its relayed reports (POST [`AckPost`]).
pub const ACKS_PATH: &str = "/peer/v1/acks";
/// Path of a node's registry of its cluster (POST an empty signed body, answer [`Registry`]).
pub const REGISTRY_PATH: &str = "/peer/v1/registry";
/// Default multicast group and port of LAN discovery.
pub const MULTICAST_GROUP: &str = "239.255.77.77";

/// The cluster key of `network` in its `generation` (bumped by each rotation), derived
/// from the cloud's random root: hex HMAC-SHA256, a different key per network and generation.
pub fn cluster_key(root: &str, network: &str, generation: u64) -> String {
    let label = match generation {
        0 => format!("supermesh cluster key/{network}"),
        g => format!("supermesh cluster key/{network}/{g}"),
    };
    hex::encode(mac(root.as_bytes(), label.as_bytes()))
}

/// The hex signature of `body` under the hex `key`.
pub fn sign(key: &str, body: &[u8]) -> String {
    hex::encode(mac(key.as_bytes(), body))
}

/// Whether `signature` is `body`'s signature under `key` (constant-time comparison).
pub fn verify(key: &str, body: &[u8], signature: &str) -> bool {
    if signature.len() > 128 {
        return false;
    }
    let Ok(expected) = hex::decode(signature) else { return false };
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else { return false };
    m.update(body);
    m.verify_slice(&expected).is_ok()
}

fn mac(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// What a node tells its peers every heartbeat interval.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// [`PEER_VERSION`].
    pub version: u32,
    /// The sending node.
    pub node: String,
    /// Its network; heartbeats of other networks are ignored.
    pub network: String,
    /// Its account.
    pub account: String,
    /// `host:port` of its supernode service.
    pub address: String,
    /// Where it is, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// What the election compares.
    pub score: Score,
    /// Whether it is connected to the cloud right now.
    pub cloud_connected: bool,
    /// The supernode it follows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernode: Option<String>,
    /// Heartbeats the node sent before this one, since it started.
    pub seq: u64,
}

/// A node's capability, as the election compares it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Score {
    /// `supernodeEligible`: a node that is not eligible is never elected.
    pub eligible: bool,
    /// Whether the device stays put (a vehicle or phone is not stationary).
    pub stationary: bool,
    /// Capacity class: CPU cores × 1000 + memory in GiB (capped at 999).
    pub capacity: u32,
    /// When its agent started, milliseconds since the epoch: earlier is longer uptime.
    pub started_ms: i64,
}

/// A datagram: the heartbeat's JSON and its signature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SignedHeartbeat {
    /// The heartbeat as JSON text.
    pub body: String,
    /// Hex HMAC of `body` under the cluster key.
    pub sig: String,
}

impl SignedHeartbeat {
    /// Encodes `hb` signed with `key` as one datagram.
    pub fn encode(hb: &Heartbeat, key: &str) -> Vec<u8> {
        let body = serde_json::to_string(hb).unwrap_or_default();
        let sig = sign(key, body.as_bytes());
        serde_json::to_vec(&SignedHeartbeat { body, sig }).unwrap_or_default()
    }

    /// Decodes a datagram and checks its size, signature and version.
    pub fn decode(bytes: &[u8], key: &str) -> Result<Heartbeat, String> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(format!("datagram of {} bytes exceeds {MAX_DATAGRAM}", bytes.len()));
        }
        let signed: SignedHeartbeat = serde_json::from_slice(bytes).map_err(|e| format!("malformed datagram: {e}"))?;
        if !verify(key, signed.body.as_bytes(), &signed.sig) {
            return Err("bad signature: not signed with this cluster's key".into());
        }
        let hb: Heartbeat = serde_json::from_str(&signed.body).map_err(|e| format!("malformed heartbeat: {e}"))?;
        if hb.version != PEER_VERSION {
            return Err(format!("peer protocol version {} is not {PEER_VERSION}", hb.version));
        }
        Ok(hb)
    }
}

/// A member's reports for its supernode to send upstream (body of POST [`REPORTS_PATH`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReportPost {
    /// The member; every entry's `node` must be it.
    pub from: String,
    /// Outbox entries, oldest first.
    pub entries: Vec<RelayedReport>,
}

/// Reports the cloud acknowledged (body of POST [`ACKS_PATH`]): the member deletes them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AckPost {
    /// The supernode sending the acks.
    pub from: String,
    /// Outbox seqs of the receiving member.
    pub seqs: Vec<i64>,
}

/// A node's registry of its network cluster (answer of [`REGISTRY_PATH`]): the
/// live members and what they run, as their heartbeats and reports tell.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    /// The network.
    pub network: String,
    /// The supernode the answering node follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernode: Option<String>,
    /// Every member the answering node knows of.
    pub members: Vec<RegistryEntry>,
    /// Heartbeats the answering node has sent since it started.
    #[serde(default)]
    pub heartbeats: u64,
    /// The answering node's heartbeat count when it last changed its supernode.
    #[serde(default)]
    pub elected_at: u64,
}

/// One member in a [`Registry`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegistryEntry {
    /// EdgeNode name.
    pub node: String,
    /// Account of the node.
    pub account: String,
    /// `host:port` of its supernode service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Where it is, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Whether its heartbeats arrive.
    pub live: bool,
    /// Its role, if it is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    /// Its instances, from the latest status report it sent through this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            version: PEER_VERSION,
            node: "a1".into(),
            network: "lan-a".into(),
            account: "acme".into(),
            address: "10.0.0.1:10360".into(),
            location: None,
            score: Score { eligible: true, stationary: true, capacity: 4008, started_ms: 1 },
            cloud_connected: true,
            supernode: Some("a1".into()),
            seq: 7,
        }
    }

    #[test]
    fn cluster_keys_differ_per_network_and_secret() {
        let k = cluster_key("secret-secret-secret", "lan-a", 0);
        assert_eq!(k.len(), 64);
        assert_eq!(k, cluster_key("secret-secret-secret", "lan-a", 0));
        assert_ne!(k, cluster_key("secret-secret-secret", "lan-b", 0));
        assert_ne!(k, cluster_key("another-secret-here", "lan-a", 0));
        assert_ne!(k, cluster_key("secret-secret-secret", "lan-a", 1), "a rotation makes a new key");
    }

    #[test]
    fn heartbeats_round_trip_only_under_the_right_key() {
        let key = cluster_key("s", "lan-a", 0);
        let bytes = SignedHeartbeat::encode(&heartbeat(), &key);
        assert_eq!(SignedHeartbeat::decode(&bytes, &key).unwrap(), heartbeat());
        let err = SignedHeartbeat::decode(&bytes, &cluster_key("s", "lan-b", 0)).unwrap_err();
        assert!(err.contains("bad signature"), "{err}");
        let tampered = String::from_utf8(bytes.clone()).unwrap().replace("a1", "zz");
        assert!(SignedHeartbeat::decode(tampered.as_bytes(), &key).unwrap_err().contains("bad signature"));
        assert!(SignedHeartbeat::decode(b"{nope", &key).unwrap_err().contains("malformed"));
        assert!(SignedHeartbeat::decode(&vec![b' '; MAX_DATAGRAM + 1], &key).unwrap_err().contains("exceeds"));
        let mut old = heartbeat();
        old.version = 9;
        let err = SignedHeartbeat::decode(&SignedHeartbeat::encode(&old, &key), &key).unwrap_err();
        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn signatures_reject_garbage() {
        assert!(verify("k", b"body", &sign("k", b"body")));
        assert!(!verify("k", b"body", "zz"));
        assert!(!verify("k", b"body", ""));
        assert!(!verify("k", b"body!", &sign("k", b"body")));
    }
}
