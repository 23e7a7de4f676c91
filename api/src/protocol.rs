//! The cloud<->edge protocol: one long-lived stream per agent carrying
//! versioned [`Message`]s.
//!
//! # Transport: WebSocket over TLS
//!
//! Each agent keeps one WebSocket (RFC 6455) over TLS to the controller's
//! cloudhub; every frame is one JSON-encoded [`Message`]. Chosen over a gRPC
//! stream because:
//! - it crosses the proxies, NATs and captive firewalls edge devices sit behind
//!   as plain HTTPS, where HTTP/2 end to end is often not available;
//! - the agent's footprint stays small: no protobuf runtime or code generation,
//!   one TLS stack (rustls) shared with the controller;
//! - messages stay readable in logs and `supermesh-agent inspect`, and the
//!   content of a resource is already JSON in Kubernetes;
//! - KubeEdge's default transport is the same, so operators know how to run it.
//!
//! The upgrade request names the node ([`NODE_HEADER`]) and carries the
//! bootstrap token secret as a bearer token; node certificates and mutual TLS
//! take their place later without changing the messages.
//!
//! # Delivery
//! Cloud→edge changes are at-least-once and idempotent: every resource carries
//! its version, the agent answers each change with a [`Operation::Response`]
//! (ack) or an [`Operation::Error`] (nack) whose `parent_id` is the change's id,
//! after its SQLite transaction commits. On connect the agent states the
//! versions it holds ([`Hello::held`]) and the cloud sends only the difference.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::edgenode::NodeRole;
use crate::microservice::MicroserviceSpec;
use crate::Location;

/// Version of the message format; a peer rejects messages of another version.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest encoded message accepted by either side, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Path of the WebSocket endpoint on the cloudhub.
pub const CONNECT_PATH: &str = "/v1/connect";
/// Header of the upgrade request that names the connecting node.
pub const NODE_HEADER: &str = "x-supermesh-node";
/// Resource type of microservices on the wire.
pub const MICROSERVICE: &str = "microservice";
/// Resource of connection-state messages.
pub const CONNECTION_RESOURCE: &str = "node/connection";

/// What a message asks for or reports.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A resource to store that the receiver does not hold yet.
    Insert,
    /// A new version of a held resource.
    Update,
    /// A resource to remove.
    Delete,
    /// A request for a resource; answered by Response or Error.
    Query,
    /// The answer to a message (an ack for changes); `parent_id` names it.
    Response,
    /// Connection state: the agent's hello, the cloud's welcome.
    NodeConnection,
    /// Instance status of a node, sent periodically and on phase changes.
    MetaSync,
    /// Liveness of an idle stream.
    Keepalive,
    /// A refusal or failure; `parent_id` names the message it answers, if any.
    Error,
}

impl Operation {
    /// Whether the operation changes stored resources and so needs an ack.
    pub fn is_change(self) -> bool {
        matches!(self, Operation::Insert | Operation::Update | Operation::Delete)
    }
}

/// One message on the stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Message {
    /// Format version, [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Id unique per sender and session.
    pub id: String,
    /// Id of the message this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Milliseconds since the Unix epoch when the message was made.
    pub timestamp: i64,
    /// What the message does.
    pub operation: Operation,
    /// Resource string `namespace/type/name` (see [`ResourceRef`]).
    pub resource: String,
    /// Version of the resource the content describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Payload; its shape depends on operation and resource type.
    #[serde(default)]
    pub content: serde_json::Value,
}

impl Message {
    /// A message with `content` serialized to JSON.
    pub fn new(id: String, timestamp: i64, operation: Operation, resource: &str, content: impl Serialize) -> Message {
        Message {
            version: PROTOCOL_VERSION,
            id,
            parent_id: None,
            timestamp,
            operation,
            resource: resource.to_owned(),
            resource_version: None,
            content: serde_json::to_value(content).unwrap_or(serde_json::Value::Null),
        }
    }

    /// The same message answering `parent`.
    pub fn answering(mut self, parent: &str) -> Message {
        self.parent_id = Some(parent.to_owned());
        self
    }

    /// The same message describing `version` of its resource.
    pub fn with_version(mut self, version: &str) -> Message {
        self.resource_version = Some(version.to_owned());
        self
    }

    /// The content read as `T`.
    pub fn content_as<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        T::deserialize(&self.content).map_err(|e| CodecError::Content(self.operation, e.to_string()))
    }
}

/// Why bytes from the stream are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    Oversized(usize),
    /// Not a JSON message of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message format this peer does not speak.
    #[error("unsupported protocol version {0}, this peer speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u32),
    /// The resource string does not parse.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// The content does not fit the operation.
    #[error("content of a {0:?} message is invalid: {1}")]
    Content(Operation, String),
}

/// Encodes a message for one WebSocket text frame.
pub fn encode(message: &Message) -> Result<String, CodecError> {
    let text = serde_json::to_string(message).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::Oversized(text.len()));
    }
    Ok(text)
}

/// Decodes and checks one frame: size, shape, version and resource string.
pub fn decode(text: &str) -> Result<Message, CodecError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::Oversized(text.len()));
    }
    let message: Message = serde_json::from_str(text).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if message.version != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion(message.version));
    }
    if message.id.is_empty() {
        return Err(CodecError::Malformed("empty message id".into()));
    }
    ResourceRef::parse(&message.resource)?;
    Ok(message)
}

/// A parsed resource string, as KubeEdge splits it: `namespace/type` or
/// `namespace/type/name`. `key` is the whole string. Cluster-scoped resources
/// use `_` as namespace; connection messages use `node/connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceRef<'a> {
    /// The whole resource string, the key in the agent's store.
    pub key: &'a str,
    /// Namespace (the first segment).
    pub namespace: &'a str,
    /// Resource type: the last of two segments, the middle of three.
    pub res_type: &'a str,
    /// Resource name: the last of three segments.
    pub id: Option<&'a str>,
}

/// Why a resource string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource {resource:?}: {reason}; expected namespace/type or namespace/type/name")]
pub struct ResourceError {
    /// The offending string.
    pub resource: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Longest resource string accepted.
const MAX_RESOURCE_LEN: usize = 512;

impl<'a> ResourceRef<'a> {
    /// Splits `resource` on `/` into namespace, type and optional name.
    pub fn parse(resource: &'a str) -> Result<ResourceRef<'a>, ResourceError> {
        let fail = |reason| Err(ResourceError { resource: resource.chars().take(80).collect(), reason });
        if resource.len() > MAX_RESOURCE_LEN {
            return fail("longer than 512 bytes");
        }
        let parts: Vec<&str> = resource.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return fail("empty segment");
        }
        if !parts.iter().all(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))) {
            return fail("segments may hold only letters, digits, '-', '.' and '_'");
        }
        if parts.iter().any(|p| p.chars().all(|c| c == '.')) {
            return fail("'.' and '..' are not names");
        }
        match parts.as_slice() {
            [namespace, res_type] => Ok(ResourceRef { key: resource, namespace, res_type, id: None }),
            [namespace, res_type, id] => Ok(ResourceRef { key: resource, namespace, res_type, id: Some(id) }),
            _ => fail("needs two or three segments"),
        }
    }

    /// The resource string of a namespaced object.
    pub fn string(namespace: &str, res_type: &str, name: &str) -> String {
        format!("{namespace}/{res_type}/{name}")
    }
}

/// The agent's first message (operation NodeConnection): who it is and what it holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// Node name; must match the upgrade request's [`NODE_HEADER`].
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
    /// advertises one; `None` with only a port (`:10360`) means "the address I connect from".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
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
}

/// Connection state as the agent's edgehub publishes it inside the agent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// The stream to the cloud is up.
    CloudConnected,
    /// The stream to the cloud is down.
    CloudDisconnected,
}

/// Machine-readable kind of an Error message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The message could not be decoded or was invalid.
    BadMessage,
    /// The change could not be stored; the sender should retry later.
    StoreFailed,
    /// The peer is overloaded; reconnect or resend after `retryAfterMs`.
    Overloaded,
    /// The node may not do this.
    Forbidden,
    /// The queried resource does not exist.
    NotFound,
    /// The query could not be answered (for example the agent is offline).
    Unavailable,
}

/// Content of an Error message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorContent {
    /// Kind of error.
    pub code: ErrorCode,
    /// What went wrong, for logs and users.
    pub message: String,
    /// When to try again, for Overloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

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
    /// The spec to run.
    pub spec: MicroserviceSpec,
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

/// Resource of a node's instance status report (operation MetaSync).
pub const STATUS_RESOURCE: &str = "node/status";
/// Prefix of the ids of the messages an agent sends from its outbox, followed by the entry's seq.
pub const OUTBOX_ID_PREFIX: &str = "o-";

/// A node's full instance status (content of MetaSync on [`STATUS_RESOURCE`]).
/// Sent every `meta.sync.podstatus.interval` seconds and, coalesced, on every
/// phase change. Each report supersedes the previous one of the same node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Milliseconds since the epoch when the agent took the snapshot.
    pub taken_ms: i64,
    /// Every instance the node runs or tried to run.
    pub instances: Vec<InstanceReport>,
    /// The node's place in its network cluster, as its own election sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// A node's view of its network cluster, carried in its status reports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Whether the node is its cluster's supernode.
    pub role: NodeRole,
    /// The supernode the node follows (itself when it is the supernode), if any is elected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernode: Option<String>,
}

/// Status of one instance in a [`StatusReport`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceReport {
    /// Resource string of the microservice (`namespace/microservice/name`).
    pub resource: String,
    /// Version of the assignment the instance runs.
    pub version: String,
    /// Phase, for example Running, Ready, Backoff or Failed.
    pub phase: String,
    /// Whether the instance passes its health check.
    pub ready: bool,
    /// Restarts so far.
    pub restarts: u32,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Ports the instance declares (`spec.ports`), for endpoint discovery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<i32>,
}

/// Something that happened to an instance, for `kubectl describe` (content of
/// MetaSync on the instance's resource string). Unlike status reports, events
/// are never collapsed: each is delivered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EventReport {
    /// Whether it is a warning (otherwise normal).
    pub warning: bool,
    /// One-word reason, for example Started, Exited or ArtifactHashMismatch.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

/// Resource type of an instance's log (Query `namespace/log/name`).
pub const LOG: &str = "log";
/// Most log bytes one answer carries; `--follow` asks again from the returned offset.
pub const MAX_LOG_CHUNK: u64 = 256 * 1024;

/// What the cloud asks of an instance's log (content of a Query on `namespace/log/name`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    /// Only the last this many lines (ignored when `offset` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u64>,
    /// Bytes from this offset of the current log file on (for following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// An agent's answer to a [`LogQuery`] (content of the Response).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogChunk {
    /// The log text (lossy UTF-8).
    pub text: String,
    /// Offset to ask from next time to get what follows.
    pub offset: u64,
}

/// Lower-case hex SHA-256 of a DER certificate: how a join token pins the cloud's CA.
pub fn ca_fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// A join token `<ca-fingerprint>.<secret>`: the agent trusts only a cloud whose
/// CA has that fingerprint, and proves itself with the secret.
pub fn join_token(ca_der: &[u8], secret: &str) -> String {
    format!("{}.{secret}", ca_fingerprint(ca_der))
}

/// Resource type of a network's membership (`_/membership/<network>`), which the
/// cloud sends every node of the network like any other resource.
pub const MEMBERSHIP: &str = "membership";

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
        use sha2::Digest;
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        sha2::Sha256::digest(&bytes).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// Resource of a supernode's upstream batch of its cluster's reports (operation MetaSync).
pub const BATCH_RESOURCE: &str = "node/batch";

/// Reports of several nodes of one cluster, sent upstream by their supernode in one
/// message (content of MetaSync on [`BATCH_RESOURCE`]). The cloud answers with a
/// Response carrying a [`BatchAck`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReportBatch {
    /// The reports, oldest first per node.
    pub entries: Vec<RelayedReport>,
}

/// One outbox entry of a node, relayed by its supernode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelayedReport {
    /// The node that made the report.
    pub node: String,
    /// Its seq in that node's outbox: the node deletes it when this is acknowledged.
    pub seq: i64,
    /// Operation of the report (MetaSync).
    pub operation: Operation,
    /// Resource of the report: [`STATUS_RESOURCE`] or an instance's resource string for events.
    pub resource: String,
    /// The report itself ([`StatusReport`] or [`EventReport`]).
    pub content: serde_json::Value,
    /// When the node queued it, milliseconds since the epoch.
    pub created_ms: i64,
}

impl RelayedReport {
    /// Which report this is, for acks.
    pub fn id(&self) -> ReportId {
        ReportId { node: self.node.clone(), seq: self.seq }
    }
}

/// Names one relayed report: node and outbox seq.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ReportId {
    /// The node that made the report.
    pub node: String,
    /// Its outbox seq.
    pub seq: i64,
}

/// The cloud's answer to a [`ReportBatch`] (content of the Response).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BatchAck {
    /// Reports taken (or already taken before): their nodes delete them.
    pub acked: Vec<ReportId>,
    /// Reports refused for good, with the reason (for example a node of another network);
    /// their nodes delete them too, since sending them again cannot succeed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<(ReportId, String)>,
}

/// Resource type of discovery queries for nodes: `_/nodes/account`, `_/nodes/proximity`.
pub const NODES: &str = "nodes";
/// Resource type of discovery queries for a microservice's endpoints: `namespace/endpoints/name`.
pub const ENDPOINTS: &str = "endpoints";

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

/// The cloud's answer to a `_/nodes/<type>` query.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_pin_the_ca() {
        let token = join_token(b"certificate", "s3cret-s3cret-s3cret");
        let (hash, secret) = token.split_once('.').unwrap();
        assert_eq!(hash.len(), 64);
        assert_eq!(hash, ca_fingerprint(b"certificate"));
        assert_ne!(hash, ca_fingerprint(b"another"));
        assert_eq!(secret, "s3cret-s3cret-s3cret");
    }

    #[test]
    fn resource_strings_split_like_kubeedge() {
        let two = ResourceRef::parse("team/microservice").unwrap();
        assert_eq!((two.namespace, two.res_type, two.id, two.key), ("team", "microservice", None, "team/microservice"));
        let three = ResourceRef::parse("team/microservice/web-1").unwrap();
        assert_eq!((three.namespace, three.res_type, three.id), ("team", "microservice", Some("web-1")));
        assert_eq!(ResourceRef::parse(CONNECTION_RESOURCE).unwrap().res_type, "connection");
        let cluster = ResourceRef::parse("_/edgenode/pi.kitchen").unwrap();
        assert_eq!((cluster.namespace, cluster.id), ("_", Some("pi.kitchen")));
        assert_eq!(ResourceRef::string("a", "b", "c"), "a/b/c");
    }

    #[test]
    fn malformed_resource_strings_are_rejected_with_a_reason() {
        for (bad, reason) in [
            ("", "empty segment"),
            ("team", "two or three"),
            ("a/b/c/d", "two or three"),
            ("/microservice/x", "empty segment"),
            ("team//x", "empty segment"),
            ("team/microservice/", "empty segment"),
            ("team/micro service/x", "only letters"),
            ("team/../etc", "are not names"),
            ("team/ms/x;drop", "only letters"),
        ] {
            let err = ResourceRef::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(reason), "{bad:?}: {err}");
        }
        assert!(ResourceRef::parse(&format!("a/b/{}", "x".repeat(600))).unwrap_err().reason.contains("512"));
    }

    fn sample() -> Message {
        Message::new(
            "c-1".into(),
            1_700_000_000_000,
            Operation::Insert,
            "team/microservice/web",
            serde_json::json!({"a": 1}),
        )
        .with_version("7-abc")
    }

    #[test]
    fn messages_round_trip() {
        let m = sample();
        let text = encode(&m).unwrap();
        assert!(!text.contains("\"parentId\"") && text.contains("\"resourceVersion\":\"7-abc\""), "{text}");
        assert_eq!(decode(&text).unwrap(), m);
        let ack = Message::new("e-1".into(), 1, Operation::Response, &m.resource, ()).answering(&m.id);
        assert_eq!(decode(&encode(&ack).unwrap()).unwrap().parent_id.as_deref(), Some("c-1"));
        assert!(Operation::Update.is_change() && !Operation::Keepalive.is_change());
    }

    #[test]
    fn bad_frames_are_rejected_with_a_reason() {
        assert!(matches!(decode("{not json"), Err(CodecError::Malformed(_))));
        assert!(matches!(decode("{\"id\": \"x\"}"), Err(CodecError::Malformed(_))));
        let mut m = sample();
        m.version = 99;
        assert_eq!(decode(&serde_json::to_string(&m).unwrap()), Err(CodecError::UnsupportedVersion(99)));
        let mut m = sample();
        m.resource = "no-slash".into();
        assert!(matches!(decode(&serde_json::to_string(&m).unwrap()), Err(CodecError::Resource(_))));
        let mut m = sample();
        m.id.clear();
        assert!(matches!(decode(&serde_json::to_string(&m).unwrap()), Err(CodecError::Malformed(_))));
        let huge = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert_eq!(decode(&huge), Err(CodecError::Oversized(MAX_MESSAGE_BYTES + 1)));
        let mut m = sample();
        m.content = serde_json::Value::String("y".repeat(MAX_MESSAGE_BYTES));
        assert!(matches!(encode(&m), Err(CodecError::Oversized(_))));
        let unknown = encode(&sample()).unwrap().replacen('{', "{\"extra\":1,", 1);
        assert!(matches!(decode(&unknown), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn typed_content_is_checked() {
        let hello = Hello { node: "n".into(), agent_version: "0.1.0".into(), ..Hello::default() };
        let m = Message::new("1".into(), 0, Operation::NodeConnection, CONNECTION_RESOURCE, &hello);
        assert_eq!(m.content_as::<Hello>().unwrap(), hello);
        let err = m.content_as::<Welcome>().unwrap_err();
        assert!(err.to_string().contains("NodeConnection"), "{err}");
    }
}
