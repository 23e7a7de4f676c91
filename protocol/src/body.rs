//! Typed message bodies: one enum per operation, decoded from the envelope's
//! operation, resource and content in one place, and built back into envelopes.

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::connection::{Hello, Welcome};
use crate::discovery::{EndpointsAnswer, NodesAnswer, Scope};
use crate::message::{CodecError, ErrorContent, Message, Operation, ResourceRef, MAX_MESSAGE_BYTES, PROTOCOL_MAJOR};
use crate::{
    Assignment, BatchAck, ConfigData, EventReport, LogChunk, LogQuery, Membership, RelayedReport, ReportBatch,
    StatusReport, BATCH_RESOURCE, CONFIG, CONNECTION_RESOURCE, ENDPOINTS, LOG, MEMBERSHIP, MICROSERVICE, NODES,
    STATUS_RESOURCE,
};

/// The content of a message, typed by its operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A resource to store.
    Insert(Change),
    /// A new version of a stored resource.
    Update(Change),
    /// Remove the message's resource.
    Delete,
    /// A question for the other side.
    Query(Query),
    /// An answer; the envelope's parent id names what it answers.
    Response(Answer),
    /// The hello or the welcome.
    NodeConnection(Connection),
    /// A report of the agent's.
    MetaSync(Report),
    /// Liveness of an idle stream.
    Keepalive,
    /// A refusal or failure.
    Error(ErrorContent),
}

/// A resource the cloud keeps on an agent (content of Insert and Update).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A microservice placed on the node (`namespace/microservice/name`).
    Assignment(Box<Assignment>),
    /// The membership of the node's network (`_/membership/<network>`).
    Membership(Membership),
}

impl Change {
    /// The resource string the change is stored under.
    pub fn resource(&self) -> String {
        match self {
            Change::Assignment(a) => a.resource(),
            Change::Membership(m) => Membership::resource(&m.network),
        }
    }

    /// The version the agent stores and states.
    pub fn version(&self) -> String {
        match self {
            Change::Assignment(a) => a.version(),
            Change::Membership(m) => m.version(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Change::Assignment(a) => serde_json::to_value(a),
            Change::Membership(m) => serde_json::to_value(m),
        };
        value.unwrap_or(serde_json::Value::Null)
    }
}

/// A question (content of Query).
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// The cloud asks for an instance's log (`namespace/log/name`).
    Log(LogQuery),
    /// An agent asks for nodes of its account (`_/nodes/<scope>`).
    Nodes(Scope),
    /// An agent asks for a microservice's endpoints (`namespace/endpoints/name`).
    Endpoints {
        /// Namespace of the Microservice.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Either side asks for the resource the envelope names (a microservice the agent does not hold).
    Resource,
    /// A question this build cannot answer; the text says what can be asked instead.
    Unknown(String),
}

/// An answer (content of Response).
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Taken: a change committed, a report received. Its content is `{"status": "ok"}`
    /// (protocol 1.0 agents send that; an empty content is read the same).
    Ack,
    /// Part of an instance's log.
    Log(LogChunk),
    /// Nodes found.
    Nodes(NodesAnswer),
    /// Endpoints found.
    Endpoints(EndpointsAnswer),
    /// What became of a supernode's batch.
    Batch(BatchAck),
    /// A resource asked for.
    Resource(Change),
    /// A configuration snapshot asked for (`namespace/config/<name>`, protocol 1.4).
    Config(ConfigData),
}

/// The opening of a session (content of NodeConnection).
#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    /// The agent says who it is and what it holds.
    Hello(Box<Hello>),
    /// The cloud accepts it.
    Welcome(Welcome),
}

/// What agents report (content of MetaSync).
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A node's instance status ([`STATUS_RESOURCE`]).
    Status(StatusReport),
    /// Something that happened to the instance the envelope's resource names.
    Event(EventReport),
    /// A supernode's batch of its cluster's reports ([`BATCH_RESOURCE`]).
    Batch(ReportBatch),
}

impl Report {
    /// The report a supernode relays in a batch entry: a status or an event, never a batch.
    pub fn relayed(entry: &RelayedReport) -> Result<Report, CodecError> {
        match decode_report(entry.operation, &entry.resource, &entry.content)? {
            Report::Batch(_) => Err(CodecError::Unexpected(entry.operation, entry.resource.clone())),
            report => Ok(report),
        }
    }
}

impl Body {
    /// The operation that carries this body.
    pub fn operation(&self) -> Operation {
        match self {
            Body::Insert(_) => Operation::Insert,
            Body::Update(_) => Operation::Update,
            Body::Delete => Operation::Delete,
            Body::Query(_) => Operation::Query,
            Body::Response(_) => Operation::Response,
            Body::NodeConnection(_) => Operation::NodeConnection,
            Body::MetaSync(_) => Operation::MetaSync,
            Body::Keepalive => Operation::Keepalive,
            Body::Error(_) => Operation::Error,
        }
    }

    fn content(&self) -> serde_json::Value {
        fn json(value: impl Serialize) -> serde_json::Value {
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
        }
        match self {
            Body::Insert(c) | Body::Update(c) => c.to_json(),
            Body::Delete | Body::Keepalive => serde_json::Value::Null,
            Body::Query(Query::Log(q)) => json(q),
            Body::Query(_) => serde_json::Value::Null,
            Body::Response(Answer::Ack) => serde_json::json!({"status": "ok"}),
            Body::Response(Answer::Log(c)) => json(c),
            Body::Response(Answer::Nodes(a)) => json(a),
            Body::Response(Answer::Endpoints(a)) => json(a),
            Body::Response(Answer::Batch(a)) => json(a),
            Body::Response(Answer::Resource(c)) => c.to_json(),
            Body::Response(Answer::Config(c)) => json(c),
            Body::NodeConnection(Connection::Hello(h)) => json(h),
            Body::NodeConnection(Connection::Welcome(w)) => json(w),
            Body::MetaSync(Report::Status(s)) => json(s),
            Body::MetaSync(Report::Event(e)) => json(e),
            Body::MetaSync(Report::Batch(b)) => json(b),
            Body::Error(e) => json(e),
        }
    }
}

impl Message {
    /// A message carrying `body` on `resource`.
    pub fn with_body(id: String, timestamp: i64, resource: &str, body: &Body) -> Message {
        let mut message = Message::new(id, timestamp, body.operation(), resource, ());
        message.content = body.content();
        message
    }

    /// The typed body of this message: its content read as its operation and resource say.
    pub fn body(&self) -> Result<Body, CodecError> {
        let op = self.operation;
        let resource = ResourceRef::parse(&self.resource)?;
        let unexpected = || CodecError::Unexpected(op, self.resource.clone());
        Ok(match op {
            Operation::Insert => Body::Insert(self.change(&resource)?),
            Operation::Update => Body::Update(self.change(&resource)?),
            Operation::Delete => Body::Delete,
            Operation::Keepalive => Body::Keepalive,
            Operation::Error => Body::Error(self.content_as()?),
            Operation::Query => Body::Query(match (resource.namespace, resource.res_type, resource.id) {
                (_, LOG, Some(_)) if self.content.is_null() => Query::Log(LogQuery::default()),
                (_, LOG, Some(_)) => Query::Log(self.content_as()?),
                ("_", NODES, Some(scope)) => match Scope::parse(scope) {
                    Some(scope) => Query::Nodes(scope),
                    None => {
                        Query::Unknown(format!("no node discovery {scope:?}; ask _/nodes/account or _/nodes/proximity"))
                    }
                },
                (namespace, ENDPOINTS, Some(name)) => {
                    Query::Endpoints { namespace: namespace.to_owned(), name: name.to_owned() }
                }
                (_, _, Some(_)) => Query::Resource,
                _ => return Err(unexpected()),
            }),
            Operation::Response => Body::Response(match resource.res_type {
                _ if is_ack(&self.content) => Answer::Ack,
                LOG => Answer::Log(self.content_as()?),
                NODES => Answer::Nodes(self.content_as()?),
                ENDPOINTS => Answer::Endpoints(self.content_as()?),
                _ if self.resource == BATCH_RESOURCE => Answer::Batch(self.content_as()?),
                MICROSERVICE | MEMBERSHIP => Answer::Resource(self.change(&resource)?),
                CONFIG => Answer::Config(self.content_as()?),
                _ => return Err(unexpected()),
            }),
            Operation::NodeConnection if self.resource != CONNECTION_RESOURCE => return Err(unexpected()),
            Operation::NodeConnection if self.content.get("node").is_some() => {
                Body::NodeConnection(Connection::Hello(Box::new(self.content_as()?)))
            }
            Operation::NodeConnection => Body::NodeConnection(Connection::Welcome(self.content_as()?)),
            Operation::MetaSync => Body::MetaSync(decode_report(op, &self.resource, &self.content)?),
        })
    }

    /// The content as the resource a change stores, checked against the resource string.
    fn change(&self, resource: &ResourceRef<'_>) -> Result<Change, CodecError> {
        let change = match resource.res_type {
            MICROSERVICE => Change::Assignment(Box::new(self.content_as()?)),
            MEMBERSHIP => Change::Membership(self.content_as()?),
            _ => return Err(CodecError::Unexpected(self.operation, self.resource.clone())),
        };
        if change.resource() != self.resource {
            return Err(CodecError::Content(
                self.operation,
                format!("the content describes {} but the message is about {}", change.resource(), self.resource),
            ));
        }
        Ok(change)
    }
}

/// Whether a Response's content is an ack: `{"status": "ok"}`, or nothing.
fn is_ack(content: &serde_json::Value) -> bool {
    content.is_null()
        || content.as_object().is_some_and(|o| o.len() == 1 && o.get("status").and_then(|s| s.as_str()) == Some("ok"))
}

fn decode_report(op: Operation, resource: &str, content: &serde_json::Value) -> Result<Report, CodecError> {
    let read = |e: serde_json::Error| CodecError::Content(op, e.to_string());
    if op != Operation::MetaSync {
        return Err(CodecError::Content(op, format!("a report is a MetaSync, not a {op:?}")));
    }
    if resource == STATUS_RESOURCE {
        return serde::Deserialize::deserialize(content).map(Report::Status).map_err(read);
    }
    if resource == BATCH_RESOURCE {
        return serde::Deserialize::deserialize(content).map(Report::Batch).map_err(read);
    }
    if ResourceRef::microservice(resource).is_some() {
        return serde::Deserialize::deserialize(content).map(Report::Event).map_err(read);
    }
    Err(CodecError::Unexpected(op, resource.to_owned()))
}

/// A change encoded once and sent to any number of agents: the hot path of a
/// fleet-wide update serializes the content once, not once per node.
#[derive(Debug)]
pub struct Prepared {
    /// Resource string, shared by every node's desired state that holds it.
    pub resource: Arc<str>,
    /// Version the agent stores.
    pub version: String,
    content: Box<RawValue>,
}

impl Prepared {
    /// Encodes `change` once.
    pub fn new(change: &Change) -> Prepared {
        let text = change.to_json().to_string();
        let content = RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned());
        Prepared { resource: change.resource().into(), version: change.version(), content }
    }

    /// Bytes of the encoded content.
    pub fn len(&self) -> usize {
        self.content.get().len()
    }

    /// Whether the content is empty (never, for a real change).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The content, decoded again.
    pub fn change(&self) -> Result<Change, CodecError> {
        let value: serde_json::Value =
            serde_json::from_str(self.content.get()).map_err(|e| CodecError::Malformed(e.to_string()))?;
        let message =
            Message { content: value, ..Message::new(String::new(), 0, Operation::Update, &self.resource, ()) };
        message.change(&ResourceRef::parse(&self.resource)?)
    }

    /// The frame of `operation` (Insert, Update, or Response answering `parent`) carrying this change.
    pub fn frame(
        &self,
        id: &str,
        parent: Option<&str>,
        timestamp: i64,
        operation: Operation,
    ) -> Result<String, CodecError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Frame<'a> {
            version: u32,
            id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            parent_id: Option<&'a str>,
            timestamp: i64,
            operation: Operation,
            resource: &'a str,
            resource_version: &'a str,
            content: &'a RawValue,
        }
        let frame = Frame {
            version: PROTOCOL_MAJOR,
            id,
            parent_id: parent,
            timestamp,
            operation,
            resource: &self.resource,
            resource_version: &self.version,
            content: &self.content,
        };
        let text = serde_json::to_string(&frame).map_err(|e| CodecError::Malformed(e.to_string()))?;
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(CodecError::Oversized(text.len()));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, ErrorCode, Member, Workload};
    use serde_json::json;

    fn assignment() -> Assignment {
        let spec: Workload = serde_json::from_value(json!({"mesh": "m", "command": ["srv"]})).unwrap();
        Assignment {
            min_ready_seconds: 0,
            namespace: "team".into(),
            name: "web".into(),
            uid: "u".into(),
            generation: 2,
            spec,
            config: None,
        }
    }

    #[test]
    fn configuration_snapshots_are_answered_as_config_data() {
        let data: ConfigData =
            serde_json::from_value(json!({"configMaps": {"app": {"mode": "fast"}}, "secrets": {"db": {"pw": "s"}}}))
                .unwrap();
        let answer = Message::with_body(
            "c-1".into(),
            1,
            "team/config/web-config-1",
            &Body::Response(Answer::Config(data.clone())),
        );
        assert_eq!(answer.body().unwrap(), Body::Response(Answer::Config(data)));
        let query = Message::with_body("e-1".into(), 1, "team/config/web-config-1", &Body::Query(Query::Resource));
        assert_eq!(query.body().unwrap(), Body::Query(Query::Resource));
    }

    fn membership() -> Membership {
        let member = Member {
            name: "a".into(),
            account: "acme".into(),
            address: None,
            location: None,
            supernode_eligible: true,
            key: None,
            capacity: 0,
        };
        Membership { network: "lan".into(), key: "k".into(), members: vec![member], cloud_key: None }
    }

    fn round_trip(resource: &str, body: Body) {
        let message = Message::with_body("m-1".into(), 5, resource, &body);
        let decoded = decode(&encode(&message).unwrap()).unwrap();
        assert_eq!(decoded.body().unwrap(), body, "{resource}");
    }

    #[test]
    fn every_body_round_trips() {
        let change = Change::Assignment(Box::new(assignment()));
        round_trip("team/microservice/web", Body::Insert(change.clone()));
        round_trip("_/membership/lan", Body::Update(Change::Membership(membership())));
        round_trip("team/microservice/web", Body::Delete);
        round_trip("team/log/web", Body::Query(Query::Log(LogQuery { tail: Some(5), offset: None })));
        round_trip("_/nodes/proximity", Body::Query(Query::Nodes(Scope::Proximity)));
        round_trip(
            "team/endpoints/web",
            Body::Query(Query::Endpoints { namespace: "team".into(), name: "web".into() }),
        );
        round_trip("team/microservice/web", Body::Query(Query::Resource));
        round_trip("team/microservice/web", Body::Response(Answer::Ack));
        round_trip("team/microservice/web", Body::Response(Answer::Resource(change)));
        round_trip("team/log/web", Body::Response(Answer::Log(LogChunk { text: "x\n".into(), offset: 2 })));
        round_trip("_/nodes/account", Body::Response(Answer::Nodes(NodesAnswer::default())));
        round_trip("team/endpoints/web", Body::Response(Answer::Endpoints(EndpointsAnswer::default())));
        round_trip(BATCH_RESOURCE, Body::Response(Answer::Batch(BatchAck::default())));
        let hello = Hello { node: "n".into(), agent_version: "0.1.0".into(), ..Hello::default() };
        round_trip(CONNECTION_RESOURCE, Body::NodeConnection(Connection::Hello(Box::new(hello))));
        let welcome = Welcome { keepalive_seconds: 15, pending: 0, protocol: crate::ProtocolVersion::CURRENT };
        round_trip(CONNECTION_RESOURCE, Body::NodeConnection(Connection::Welcome(welcome)));
        round_trip(STATUS_RESOURCE, Body::MetaSync(Report::Status(StatusReport::default())));
        let event = EventReport { warning: true, reason: "Exited".into(), message: "code 3".into() };
        round_trip("team/microservice/web", Body::MetaSync(Report::Event(event)));
        round_trip(BATCH_RESOURCE, Body::MetaSync(Report::Batch(ReportBatch::default())));
        round_trip(CONNECTION_RESOURCE, Body::Keepalive);
        round_trip(CONNECTION_RESOURCE, Body::Error(ErrorContent::new(ErrorCode::Forbidden, "no")));
    }

    #[test]
    fn contents_that_do_not_fit_are_refused_with_a_reason() {
        let bad = |op, resource: &str, content: serde_json::Value| {
            let message = Message::new("m".into(), 0, op, resource, content);
            message.body().unwrap_err().to_string()
        };
        let other = json!({"namespace": "team", "name": "db", "uid": "u", "generation": 1,
            "spec": {"mesh": "m", "command": ["x"]}});
        assert!(bad(Operation::Insert, "team/microservice/web", other).contains("describes team/microservice/db"));
        assert!(bad(Operation::Insert, "team/configmap/web", json!({})).contains("means nothing"));
        assert!(bad(Operation::Update, "team/microservice/web", json!({"spec": 1})).contains("Update"));
        assert!(bad(Operation::MetaSync, STATUS_RESOURCE, json!({"instances": 5})).contains("MetaSync"));
        assert!(bad(Operation::MetaSync, "team/log/web", json!({})).contains("means nothing"));
        assert!(bad(Operation::NodeConnection, STATUS_RESOURCE, json!({})).contains("means nothing"));
        let scope = Message::new("m".into(), 0, Operation::Query, "_/nodes/planet", ()).body().unwrap();
        assert!(matches!(scope, Body::Query(Query::Unknown(ref why)) if why.contains("_/nodes/account")));
    }

    #[test]
    fn relayed_entries_are_statuses_or_events_only() {
        let entry = |resource: &str, content: serde_json::Value| RelayedReport {
            node: "n".into(),
            seq: 1,
            operation: Operation::MetaSync,
            resource: resource.into(),
            content,
            created_ms: 0,
            signature: None,
        };
        assert!(matches!(
            Report::relayed(&entry(STATUS_RESOURCE, json!({"takenMs": 1, "instances": []}))),
            Ok(Report::Status(_))
        ));
        let event = json!({"warning": false, "reason": "Started", "message": "pid 1"});
        assert!(matches!(Report::relayed(&entry("t/microservice/a", event)), Ok(Report::Event(_))));
        assert!(Report::relayed(&entry(BATCH_RESOURCE, json!({"entries": []}))).is_err(), "no batch in a batch");
        let mut insert = entry(STATUS_RESOURCE, json!({}));
        insert.operation = Operation::Insert;
        assert!(Report::relayed(&insert).unwrap_err().to_string().contains("not a Insert"));
    }

    #[test]
    fn a_prepared_change_frames_like_an_ordinary_message() {
        let change = Change::Assignment(Box::new(assignment()));
        let prepared = Prepared::new(&change);
        assert_eq!((&*prepared.resource, prepared.version.as_str()), ("team/microservice/web", "2-u"));
        let frame = prepared.frame("c1-1", None, 9, Operation::Insert).unwrap();
        let decoded = decode(&frame).unwrap();
        assert_eq!(decoded.resource_version.as_deref(), Some("2-u"));
        assert_eq!(decoded.body().unwrap(), Body::Insert(change.clone()));
        let expected = Message::with_body("c1-1".into(), 9, "team/microservice/web", &Body::Insert(change.clone()))
            .with_version("2-u");
        assert_eq!(decoded, expected);
        assert_eq!(prepared.change().unwrap(), change);
        let answer = decode(&prepared.frame("c1-2", Some("q-1"), 9, Operation::Response).unwrap()).unwrap();
        assert_eq!(answer.parent_id.as_deref(), Some("q-1"));
        assert_eq!(answer.body().unwrap(), Body::Response(Answer::Resource(change)));
    }
}
