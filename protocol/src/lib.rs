//! The supermesh wire protocol, shared by the controller and the agent and
//! nothing else: no kube, no k8s-openapi. A change to a custom resource cannot
//! change what crosses the wire; the controller maps its CRD types into these
//! types at its edge ([`Workload`] is what an agent runs, not the CRD spec).
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
//! - messages stay readable in logs and `supermesh-agent inspect`;
//! - KubeEdge's default transport is the same, so operators know how to run it.
//!
//! # Messages
//! The envelope ([`Message`]: id, parent id, timestamp, operation, resource,
//! resource version, content) is the same for every operation. Its content is
//! typed per operation by [`Body`]: one enum per operation ([`Change`] for
//! Insert and Update, [`Query`], [`Answer`] for Response, [`Connection`] for
//! NodeConnection, [`Report`] for MetaSync). Both sides decode with
//! [`Message::body`] and build with [`Message::with_body`] (or [`Prepared`]
//! for a change sent to many agents); nothing else looks at raw content.
//!
//! # Versions
//! The envelope carries the major version ([`PROTOCOL_MAJOR`]); a peer drops
//! messages of another major. Minor versions only add: fields with defaults,
//! variants an older peer never receives. The agent states its version in its
//! [`Hello`]; the cloud answers in its [`Welcome`] with the version both speak
//! ([`ProtocolVersion::negotiate`]) and refuses another major with a clear error.
//!
//! # Delivery
//! Cloud→edge changes are at-least-once and idempotent: every resource carries
//! its version, the agent answers each change with a Response (ack) or an Error
//! (nack) whose `parent_id` is the change's id, after its SQLite transaction
//! commits. On connect the agent states the versions it holds ([`Hello::held`])
//! and the cloud sends only the difference.

mod batch;
mod body;
pub mod bounds;
mod connection;
mod discovery;
pub mod identity;
mod location;
mod log;
mod membership;
mod message;
pub mod names;
pub mod peer;
pub mod signing;
mod status;
mod workload;

pub use batch::{BatchAck, Receipt, Receipted, RelayedReport, ReportBatch, ReportId};
pub use body::{Answer, Body, Change, Connection, Prepared, Query, Report};
pub use connection::{Capacity, Hello, Welcome};
pub use discovery::{Endpoint, EndpointsAnswer, NodeInfo, NodesAnswer, Scope};
pub use location::Location;
pub use log::{LogChunk, LogQuery, MAX_LOG_CHUNK};
pub use membership::{Member, Membership};
pub use message::{
    decode, encode, moved_address, moved_location, CodecError, ErrorCode, ErrorContent, Message, Operation,
    ProtocolVersion, ResourceError, ResourceRef, CONNECT_PATH, MAX_MESSAGE_BYTES, MOVED_CLOSE_CODE, MOVED_STATUS,
    NODE_HEADER, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
pub use status::{
    ClusterView, EventReport, FailureReason, InstanceEvent, InstanceReport, NodeRole, Phase, StatusReport,
};
pub use workload::{
    version, Artifact, Assignment, ConfigData, ConfigFile, ConfigKind, EnvVar, ExecCheck, HealthCheck, HttpCheck,
    KeyRef, Port, Protocol, RestartPolicy, SecurityContext, TcpCheck, ValueFrom, Workload,
};

/// Resource type of microservices on the wire (`namespace/microservice/name`).
pub const MICROSERVICE: &str = "microservice";
/// Resource type of a revision's configuration snapshot (`namespace/config/<snapshot>`,
/// content [`ConfigData`]), named by [`Assignment::config`].
pub const CONFIG: &str = "config";
/// Resource type of a network's membership (`_/membership/<network>`).
pub const MEMBERSHIP: &str = "membership";
/// Resource type of an instance's log (Query `namespace/log/name`).
pub const LOG: &str = "log";
/// Resource type of discovery queries for nodes: `_/nodes/account`, `_/nodes/proximity`.
pub const NODES: &str = "nodes";
/// Resource type of discovery queries for a microservice's endpoints: `namespace/endpoints/name`.
pub const ENDPOINTS: &str = "endpoints";
/// Resource of connection-state messages (hello, welcome, keepalive, connection errors).
pub const CONNECTION_RESOURCE: &str = "node/connection";
/// Resource of a node's instance status report (MetaSync).
pub const STATUS_RESOURCE: &str = "node/status";
/// Resource of a supernode's upstream batch of its cluster's reports (MetaSync).
pub const BATCH_RESOURCE: &str = "node/batch";
/// Prefix of the ids of the messages an agent sends from its outbox, followed by the entry's seq.
pub const OUTBOX_ID_PREFIX: &str = "o-";

/// Connection state as the agent's edgehub publishes it inside the agent.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// The stream to the cloud is up.
    CloudConnected,
    /// The stream to the cloud is down.
    CloudDisconnected,
}

/// Milliseconds since the Unix epoch, as every timestamp on the wire.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
