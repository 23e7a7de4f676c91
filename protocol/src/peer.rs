//! The protocol between the agents of one network cluster: heartbeats for the
//! supernode election (UDP datagrams, unicast to every member and optionally
//! multicast on the LAN) and HTTP requests for reports, receipts and the registry.
//!
//! What it guarantees, against anyone on the LAN and against members too:
//! - **Who sent it.** A heartbeat is signed with the sender's node key (the key its
//!   certificate carries, made on the device); a receiver takes it only when the key
//!   is the one the cloud's [`Membership`](crate::Membership) gives for that node, so a
//!   member cannot speak for another and a stranger for nobody. Peer HTTP is mutual
//!   TLS with the node certificates, each side's key checked against the membership
//!   in the handshake; nothing is read from a connection that fails it.
//! - **When.** A heartbeat carries the time it was sent and a sequence number that
//!   grows per sender and agent start; a receiver drops one sent too long ago (or
//!   ahead), and one whose sequence is not above the last it took from that sender
//!   (a replay), and counts what it dropped by [`DropReason`].
//! - **What the election compares.** Eligibility and capacity come from the cloud's
//!   membership, never from a heartbeat; only what a node says of itself (its start,
//!   whether it is stationary) comes signed in its heartbeats.
//! - **Reports end to end.** A member signs each report it hands its supernode; the
//!   cloud takes a relayed report only with its node's valid signature, and answers
//!   with a [`Receipt`](crate::Receipt) it signs itself; a member deletes a report from
//!   its outbox only on such a receipt, so a supernode can neither forge, alter nor
//!   make a member drop a report.
//! - **Registries** are signed by the node that answers.
//! - **Bounded.** Only listed members are peers (the peer list is at most the
//!   membership); datagrams and bodies have size limits checked before they are read;
//!   concurrent peer connections are limited and more are refused at once.
//!
//! On top of that, datagrams and request bodies carry an HMAC with the cluster key, a
//! key the cloud derives per network and rotates on demand: a cheap first check that
//! drops strangers' traffic before any signature is verified.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::signing::{NodeSignature, Purpose, SignatureError};
use crate::{InstanceReport, Location, NodeRole, Receipt, RelayedReport};

/// Version of the peer protocol; datagrams and requests of another version are dropped.
pub const PEER_VERSION: u32 = 2;
/// Largest heartbeat datagram accepted, in bytes.
pub const MAX_DATAGRAM: usize = 2048;
/// Largest peer HTTP request body accepted (reports), in bytes.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Largest body of a request for receipts or a registry, in bytes.
pub const MAX_SMALL_BODY: usize = 256 * 1024;
/// How far a heartbeat's send time may be from the receiver's clock, in milliseconds.
pub const MAX_HEARTBEAT_AGE_MS: i64 = 30_000;
/// Header carrying the hex HMAC of a peer request's body under the cluster key.
pub const SIGNATURE_HEADER: &str = "x-supermesh-signature";
/// Path on which a supernode takes its members' reports (POST [`ReportPost`]).
pub const REPORTS_PATH: &str = "/peer/v1/reports";
/// Path on which a member takes the cloud's receipts for its relayed reports (POST [`AckPost`]).
pub const ACKS_PATH: &str = "/peer/v1/acks";
/// Path of a node's registry of its cluster (POST an empty object, answer [`SignedRegistry`]).
pub const REGISTRY_PATH: &str = "/peer/v1/registry";
/// Default multicast group and port of LAN discovery.
pub const MULTICAST_GROUP: &str = "239.255.77.77";

/// The largest body a peer request to `path` may have, or `None` for a path the peer
/// service does not serve.
pub fn max_body(path: &str) -> Option<usize> {
    match path {
        REPORTS_PATH => Some(MAX_BODY),
        ACKS_PATH | REGISTRY_PATH => Some(MAX_SMALL_BODY),
        _ => None,
    }
}

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

/// What a node tells its peers every heartbeat interval, signed with its node key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// [`PEER_VERSION`].
    pub version: u32,
    /// The sending node.
    pub node: String,
    /// Its network; heartbeats of other networks are ignored.
    pub network: String,
    /// `host:port` of its supernode service (`:port` for the address it sends from).
    pub address: String,
    /// Whether the device stays put (a vehicle or phone is not stationary).
    pub stationary: bool,
    /// When its agent started, milliseconds since the epoch: earlier is longer uptime,
    /// and a later one is a new start of the node (its `seq` starts again).
    pub started_ms: i64,
    /// Whether it is connected to the cloud right now.
    pub cloud_connected: bool,
    /// The supernode it follows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernode: Option<String>,
    /// Heartbeats the node sent since it started, this one included: grows with every beat.
    pub seq: u64,
    /// When it was sent, milliseconds since the epoch.
    pub sent_ms: i64,
}

/// Why a heartbeat was dropped (counted by reason in the [`Registry`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub enum DropReason {
    /// Unreadable, too big, or of another peer protocol version.
    Malformed,
    /// Not of this cluster: another network, or not made with its cluster key.
    Foreign,
    /// From a node the membership does not list, or lists without an enrolled key.
    Unknown,
    /// Not signed with the key the membership gives for the node it names.
    BadSignature,
    /// A sequence number not above the last one taken from that node: a replay.
    Replayed,
    /// Sent too long ago, or stamped ahead, by more than [`MAX_HEARTBEAT_AGE_MS`].
    Stale,
}

impl DropReason {
    /// The reason's name, as counted and logged.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Foreign => "foreign",
            DropReason::Unknown => "unknown",
            DropReason::BadSignature => "badSignature",
            DropReason::Replayed => "replayed",
            DropReason::Stale => "stale",
        }
    }
}

/// A heartbeat dropped: why, and the details for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Why, as counted.
    pub reason: DropReason,
    /// What exactly, for the log.
    pub detail: String,
}

impl Dropped {
    /// A drop for `reason` with `detail`.
    pub fn new(reason: DropReason, detail: impl Into<String>) -> Dropped {
        Dropped { reason, detail: detail.into() }
    }
}

/// A datagram: the heartbeat's JSON, its HMAC under the cluster key and its node signature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SignedHeartbeat {
    /// The heartbeat as JSON text.
    pub body: String,
    /// Hex HMAC of `body` under the cluster key.
    pub mac: String,
    /// The sender's signature of `body` ([`Purpose::Heartbeat`]).
    pub signature: NodeSignature,
}

impl SignedHeartbeat {
    /// Encodes `hb` as one datagram: MACed with the cluster key `key`, signed with `sign`
    /// (the node's key). `None` when the node cannot sign.
    pub fn encode(
        hb: &Heartbeat,
        key: &str,
        sign: impl FnOnce(Purpose, &[u8]) -> Option<NodeSignature>,
    ) -> Option<Vec<u8>> {
        let body = serde_json::to_string(hb).ok()?;
        let signature = sign(Purpose::Heartbeat, body.as_bytes())?;
        let mac = self::sign(key, body.as_bytes());
        serde_json::to_vec(&SignedHeartbeat { body, mac, signature }).ok()
    }

    /// Decodes a datagram and checks its size, its HMAC under one of the cluster `keys`
    /// and its version. Its node signature is checked by [`SignedHeartbeat::verify`].
    pub fn decode(bytes: &[u8], keys: &[String]) -> Result<(Heartbeat, SignedHeartbeat), Dropped> {
        use DropReason::*;
        if bytes.len() > MAX_DATAGRAM {
            return Err(Dropped::new(Malformed, format!("datagram of {} bytes exceeds {MAX_DATAGRAM}", bytes.len())));
        }
        let signed: SignedHeartbeat =
            serde_json::from_slice(bytes).map_err(|e| Dropped::new(Malformed, format!("malformed datagram: {e}")))?;
        if !keys.iter().any(|key| verify(key, signed.body.as_bytes(), &signed.mac)) {
            return Err(Dropped::new(Foreign, "not made with this cluster's key"));
        }
        let hb: Heartbeat = serde_json::from_str(&signed.body)
            .map_err(|e| Dropped::new(Malformed, format!("malformed heartbeat: {e}")))?;
        if hb.version != PEER_VERSION {
            return Err(Dropped::new(Malformed, format!("peer protocol version {} is not {PEER_VERSION}", hb.version)));
        }
        Ok((hb, signed))
    }

    /// Whether the heartbeat is signed with the key of fingerprint `fingerprint`, the one the
    /// membership gives for the node it names.
    pub fn verify(&self, fingerprint: &str) -> Result<(), Dropped> {
        self.signature.verify(fingerprint, Purpose::Heartbeat, self.body.as_bytes()).map_err(|e| {
            let detail = match e {
                SignatureError::NotTheNodesKey => "signed with a key that is not the node's".to_owned(),
                e => e.to_string(),
            };
            Dropped::new(DropReason::BadSignature, detail)
        })
    }
}

/// A member's reports for its supernode to send upstream (body of POST [`REPORTS_PATH`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReportPost {
    /// The member; every entry's `node` must be it, and its certificate must name it.
    pub from: String,
    /// Outbox entries, oldest first, each signed by the member.
    pub entries: Vec<RelayedReport>,
}

/// The cloud's receipt for a member's relayed reports, passed on by the supernode (body of
/// POST [`ACKS_PATH`]): the member deletes the reports it names once its signature verifies.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AckPost {
    /// The supernode passing it on.
    pub from: String,
    /// The cloud's receipt.
    pub receipt: Receipt,
}

/// Why the peer service refused a connection or request before reading it (counted by
/// reason in the [`Registry`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub enum PeerRefusal {
    /// Too many peer connections at once: closed as it came.
    Busy,
    /// The TLS handshake failed: no certificate, or not a member's, or not TLS at all.
    Handshake,
    /// A request without a length, or longer than its path allows.
    TooBig,
    /// A request without a valid cluster key HMAC, or from a node the membership does not list.
    Unsigned,
}

/// A node's registry of its network cluster (what [`REGISTRY_PATH`] answers, signed): the
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
    /// Heartbeats the answering node dropped since it started, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped: BTreeMap<DropReason, u64>,
    /// Peer connections and requests it refused unread since it started, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<PeerRefusal, u64>,
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

/// A registry as JSON text and the answering node's signature of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SignedRegistry {
    /// The node that answered.
    pub node: String,
    /// The [`Registry`] as JSON text.
    pub body: String,
    /// The node's signature of `body` ([`Purpose::Registry`]).
    pub signature: NodeSignature,
}

impl SignedRegistry {
    /// `registry` of `node`, signed with `sign` (its key); `None` when it cannot sign.
    pub fn sign(
        node: &str,
        registry: &Registry,
        sign: impl FnOnce(Purpose, &[u8]) -> Option<NodeSignature>,
    ) -> Option<SignedRegistry> {
        let body = serde_json::to_string(registry).ok()?;
        let signature = sign(Purpose::Registry, body.as_bytes())?;
        Some(SignedRegistry { node: node.to_owned(), body, signature })
    }

    /// The registry, once its signature verifies with the key of fingerprint `fingerprint`
    /// (the answering node's, as the membership gives it).
    pub fn open(&self, fingerprint: &str) -> Result<Registry, String> {
        self.signature
            .verify(fingerprint, Purpose::Registry, self.body.as_bytes())
            .map_err(|e| format!("the registry of {} is refused: {e}", self.node))?;
        serde_json::from_str(&self.body).map_err(|e| format!("malformed registry: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::tests::TestKey;

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            version: PEER_VERSION,
            node: "a1".into(),
            network: "lan-a".into(),
            address: "10.0.0.1:10360".into(),
            stationary: true,
            started_ms: 1,
            cloud_connected: true,
            supernode: Some("a1".into()),
            seq: 7,
            sent_ms: 1_000,
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
    fn heartbeats_are_taken_only_under_the_cluster_key_and_the_sender_s_own_key() {
        let (node, other) = (TestKey::new(), TestKey::new());
        let keys = vec![cluster_key("s", "lan-a", 0)];
        let bytes = SignedHeartbeat::encode(&heartbeat(), &keys[0], |p, b| Some(node.sign(p, b))).unwrap();
        let (hb, signed) = SignedHeartbeat::decode(&bytes, &keys).unwrap();
        assert_eq!(hb, heartbeat());
        assert_eq!(signed.verify(&node.fingerprint()), Ok(()));
        let err = signed.verify(&other.fingerprint()).unwrap_err();
        assert_eq!(err.reason, DropReason::BadSignature, "{err:?}");

        // Another member's key, with the cluster key: a member cannot speak for another.
        let forged = SignedHeartbeat::encode(&heartbeat(), &keys[0], |p, b| Some(other.sign(p, b))).unwrap();
        let (_, signed) = SignedHeartbeat::decode(&forged, &keys).unwrap();
        assert_eq!(signed.verify(&node.fingerprint()).unwrap_err().reason, DropReason::BadSignature);

        let foreign = SignedHeartbeat::decode(&bytes, &[cluster_key("s", "lan-b", 0)]).unwrap_err();
        assert_eq!(foreign.reason, DropReason::Foreign);
        let tampered = String::from_utf8(bytes.clone()).unwrap().replace("a1", "zz");
        assert_eq!(SignedHeartbeat::decode(tampered.as_bytes(), &keys).unwrap_err().reason, DropReason::Foreign);
        assert_eq!(SignedHeartbeat::decode(b"{nope", &keys).unwrap_err().reason, DropReason::Malformed);
        let big = SignedHeartbeat::decode(&vec![b' '; MAX_DATAGRAM + 1], &keys).unwrap_err();
        assert!(big.detail.contains("exceeds"), "{big:?}");
        let mut old = heartbeat();
        old.version = 1;
        let old = SignedHeartbeat::encode(&old, &keys[0], |p, b| Some(node.sign(p, b))).unwrap();
        let err = SignedHeartbeat::decode(&old, &keys).unwrap_err();
        assert!(err.reason == DropReason::Malformed && err.detail.contains("version 1"), "{err:?}");
        assert!(bytes.len() < MAX_DATAGRAM / 2, "a heartbeat fits a datagram with room: {} bytes", bytes.len());
    }

    #[test]
    fn registries_open_only_with_the_answering_node_s_key() {
        let (node, other) = (TestKey::new(), TestKey::new());
        let registry = Registry { network: "lan".into(), heartbeats: 3, ..Registry::default() };
        let signed = SignedRegistry::sign("a", &registry, |p, b| Some(node.sign(p, b))).unwrap();
        assert_eq!(signed.open(&node.fingerprint()), Ok(registry));
        assert!(signed.open(&other.fingerprint()).unwrap_err().contains("refused"));
        let altered = SignedRegistry { body: signed.body.replace("lan", "lam"), ..signed };
        assert!(altered.open(&node.fingerprint()).is_err());
    }

    #[test]
    fn signatures_reject_garbage() {
        assert!(verify("k", b"body", &sign("k", b"body")));
        assert!(!verify("k", b"body", "zz"));
        assert!(!verify("k", b"body", ""));
        assert!(!verify("k", b"body!", &sign("k", b"body")));
    }

    #[test]
    fn bodies_are_bounded_per_path() {
        assert_eq!(max_body(REPORTS_PATH), Some(MAX_BODY));
        assert_eq!(max_body(REGISTRY_PATH), Some(MAX_SMALL_BODY));
        assert_eq!(max_body("/elsewhere"), None);
    }
}
