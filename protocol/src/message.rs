//! The envelope every message shares, its codec, resource strings and versions.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Major version of the message format, carried by every message; a peer drops
/// messages of another major.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Minor version this build speaks: minors only add to the format (see the crate docs).
pub const PROTOCOL_MINOR: u32 = 4;
/// Largest encoded message accepted by either side, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Path of the WebSocket endpoint on the cloudhub.
pub const CONNECT_PATH: &str = "/v1/connect";
/// Header of the upgrade request that names the connecting node.
pub const NODE_HEADER: &str = "x-supermesh-node";
/// HTTP status of an upgrade refused because another controller replica serves the
/// node; its `Location` ([`moved_location`]) names that replica's cloudhub.
pub const MOVED_STATUS: u16 = 307;
/// WebSocket close code with which a replica hands a connected node over to another
/// replica; the close reason is that replica's cloudhub address (`host:port`).
pub const MOVED_CLOSE_CODE: u16 = 4307;

/// The `Location` of a redirect to the cloudhub at `address` (`host:port`).
pub fn moved_location(address: &str) -> String {
    format!("wss://{address}{CONNECT_PATH}")
}

/// The cloudhub address (`host:port`) a redirect's `Location` names, if it names one.
pub fn moved_address(location: &str) -> Option<&str> {
    let address = location.strip_prefix("wss://")?.strip_suffix(CONNECT_PATH)?;
    (!address.is_empty() && !address.contains(['/', '?', '#', '@'])).then_some(address)
}
/// Longest resource string accepted.
const MAX_RESOURCE_LEN: usize = 512;
/// Longest message id accepted.
const MAX_ID_LEN: usize = 128;

/// A protocol version `major.minor`, written as such in hellos and welcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Additions an older peer of the same major ignores.
    pub minor: u32,
}

impl ProtocolVersion {
    /// The version this build speaks.
    pub const CURRENT: ProtocolVersion = ProtocolVersion { major: PROTOCOL_MAJOR, minor: PROTOCOL_MINOR };
    /// The first version, spoken by agents whose hello states none.
    pub const FIRST: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };

    /// The version the cloud (speaking `self`) and a peer stating `peer` both speak:
    /// the lower minor of the same major. Another major is refused with what to do.
    pub fn negotiate(self, peer: ProtocolVersion) -> Result<ProtocolVersion, String> {
        if peer.major != self.major {
            let upgrade = if peer.major > self.major { "the controller" } else { "the agent" };
            return Err(format!(
                "the agent speaks protocol {peer} and this controller speaks {}.0 to {self}: upgrade {upgrade}",
                self.major
            ));
        }
        Ok(ProtocolVersion { major: self.major, minor: self.minor.min(peer.minor) })
    }
}

impl Default for ProtocolVersion {
    fn default() -> Self {
        ProtocolVersion::FIRST
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl std::str::FromStr for ProtocolVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (major, minor) = s.split_once('.').ok_or_else(|| format!("protocol version {s:?} is not major.minor"))?;
        let number = |n: &str| n.parse::<u32>().map_err(|_| format!("protocol version {s:?} is not major.minor"));
        Ok(ProtocolVersion { major: number(major)?, minor: number(minor)? })
    }
}

impl Serialize for ProtocolVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProtocolVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

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
    /// Instance status and events of a node, sent periodically and on changes.
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

/// One message on the stream: the envelope, with its content as JSON. Read the
/// content with [`Message::body`]; the envelope's fields are fixed for a major
/// version (an older peer refuses unknown ones).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Message {
    /// Major format version, [`PROTOCOL_MAJOR`].
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
    /// Payload; its shape depends on operation and resource type (see [`crate::Body`]).
    #[serde(default)]
    pub content: serde_json::Value,
}

impl Message {
    /// A message with `content` serialized to JSON.
    pub fn new(id: String, timestamp: i64, operation: Operation, resource: &str, content: impl Serialize) -> Message {
        Message {
            version: PROTOCOL_MAJOR,
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
    pub(crate) fn content_as<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
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
    #[error("unsupported protocol version {0}, this peer speaks {PROTOCOL_MAJOR}")]
    UnsupportedVersion(u32),
    /// The resource string does not parse.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// The content does not fit the operation.
    #[error("content of a {0:?} message is invalid: {1}")]
    Content(Operation, String),
    /// No body of this operation exists for this resource.
    #[error("a {0:?} on {1:?} means nothing to this peer")]
    Unexpected(Operation, String),
}

/// Encodes a message for one WebSocket text frame.
pub fn encode(message: &Message) -> Result<String, CodecError> {
    let text = serde_json::to_string(message).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::Oversized(text.len()));
    }
    Ok(text)
}

/// Decodes and checks one frame: size, shape, version, id and resource string.
pub fn decode(text: &str) -> Result<Message, CodecError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::Oversized(text.len()));
    }
    let message: Message = serde_json::from_str(text).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if message.version != PROTOCOL_MAJOR {
        return Err(CodecError::UnsupportedVersion(message.version));
    }
    if message.id.is_empty() || message.id.len() > MAX_ID_LEN {
        return Err(CodecError::Malformed(format!("a message id has 1 to {MAX_ID_LEN} bytes")));
    }
    if message.parent_id.as_ref().is_some_and(|p| p.len() > MAX_ID_LEN) {
        return Err(CodecError::Malformed(format!("a parent id has at most {MAX_ID_LEN} bytes")));
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

    /// The microservice this resource names (`namespace/microservice/name`), as namespace and name.
    pub fn microservice(resource: &'a str) -> Option<(&'a str, &'a str)> {
        let r = ResourceRef::parse(resource).ok().filter(|r| r.res_type == crate::MICROSERVICE)?;
        Some((r.namespace, r.id?))
    }
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
    /// The peers speak no common protocol version.
    UnsupportedVersion,
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

impl ErrorContent {
    /// An error of `code` saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorContent {
        ErrorContent { code, message: message.into(), retry_after_ms: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_names_a_cloudhub_address_and_nothing_else() {
        let location = moved_location("10.0.0.7:10350");
        assert_eq!(location, "wss://10.0.0.7:10350/v1/connect");
        assert_eq!(moved_address(&location), Some("10.0.0.7:10350"));
        assert_eq!(moved_address("wss://[fd00::7]:10350/v1/connect"), Some("[fd00::7]:10350"));
        for other in [
            "https://a:1/v1/connect",
            "wss:///v1/connect",
            "wss://a/b:1/v1/connect",
            "wss://u@a:1/v1/connect",
            "wss://a:1/",
        ] {
            assert_eq!(moved_address(other), None, "{other}");
        }
    }

    #[test]
    fn resource_strings_split_like_kubeedge() {
        let two = ResourceRef::parse("team/microservice").unwrap();
        assert_eq!((two.namespace, two.res_type, two.id, two.key), ("team", "microservice", None, "team/microservice"));
        let three = ResourceRef::parse("team/microservice/web-1").unwrap();
        assert_eq!((three.namespace, three.res_type, three.id), ("team", "microservice", Some("web-1")));
        assert_eq!(ResourceRef::parse(crate::CONNECTION_RESOURCE).unwrap().res_type, "connection");
        let cluster = ResourceRef::parse("_/edgenode/pi.kitchen").unwrap();
        assert_eq!((cluster.namespace, cluster.id), ("_", Some("pi.kitchen")));
        assert_eq!(ResourceRef::string("a", "b", "c"), "a/b/c");
        assert_eq!(ResourceRef::microservice("team/microservice/web"), Some(("team", "web")));
        assert_eq!(ResourceRef::microservice("team/log/web"), None);
        assert_eq!(ResourceRef::microservice("team/microservice"), None);
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
    fn a_decoded_message_encodes_and_decodes_to_itself() {
        // Found by the cloud_message fuzz target: without serde_json's float_roundtrip, this
        // number read as 12.777777777777779, which read back as 12.77777777777778.
        let frame = r#"{"version":1,"id":"c-1","timestamp":1,"operation":"Response","resource":"_/nodes/account",
            "content":{"nodes":[{"distanceKm":12.7777777777777777777777777777775}]}}"#;
        let decoded = decode(frame).unwrap();
        assert_eq!(decode(&encode(&decoded).unwrap()).unwrap(), decoded);
        let number = &decoded.content["nodes"][0]["distanceKm"];
        assert_eq!(number.as_f64(), Some(12.777777777777779));
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
        let mut m = sample();
        m.id = "i".repeat(200);
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
    fn versions_negotiate_to_the_lower_minor_of_one_major() {
        let cloud = ProtocolVersion { major: 1, minor: 1 };
        assert_eq!(cloud.negotiate(ProtocolVersion::FIRST), Ok(ProtocolVersion::FIRST));
        assert_eq!(
            cloud.negotiate(ProtocolVersion { major: 1, minor: 7 }),
            Ok(cloud),
            "a newer agent is spoken to at 1.1"
        );
        let newer = cloud.negotiate(ProtocolVersion { major: 2, minor: 0 }).unwrap_err();
        assert!(newer.contains("protocol 2.0") && newer.contains("upgrade the controller"), "{newer}");
        let older = ProtocolVersion { major: 2, minor: 3 }.negotiate(ProtocolVersion::FIRST).unwrap_err();
        assert!(older.contains("upgrade the agent"), "{older}");
        assert_eq!("1.12".parse::<ProtocolVersion>(), Ok(ProtocolVersion { major: 1, minor: 12 }));
        assert!("1".parse::<ProtocolVersion>().is_err() && "a.b".parse::<ProtocolVersion>().is_err());
        assert_eq!(serde_json::to_string(&cloud).unwrap(), "\"1.1\"");
        assert_eq!(ProtocolVersion::CURRENT.major, PROTOCOL_MAJOR);
    }
}
