//! One WebSocket text frame between an agent and the cloud, as both sides read it:
//! `decode` (size, envelope, version, id, resource string), then `Message::body` (the
//! content typed by operation and resource), then what each side does with a body
//! before any I/O: the agent's instance spec, health probe, sandbox and directory of an
//! assignment, its keepalive from a welcome, its arrangement of discovery answers; the
//! cloud's bounds and version negotiation of a hello, and the reports inside a batch.
//!
//! Besides not panicking: a decoded frame encodes and decodes to itself, and a body
//! built back into a message (as both sides build theirs) reads as the same body.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use supermesh_agent::edged::health::Probe;
use supermesh_agent::edged::process::dir_name;
use supermesh_agent::edged::runtime::InstanceStatus;
use supermesh_agent::edged::sandbox::Sandbox;
use supermesh_agent::edged::{instance_spec, Context};
use supermesh_agent::localapi::discovery::{arrange_nodes, merge_endpoints, NodesQuery};
use supermesh_protocol::{
    decode, encode, Answer, Body, Change, CodecError, Connection, Location, Message, ProtocolVersion, Report,
};

/// The node the agent side runs as.
static CONTEXT: LazyLock<Context> = LazyLock::new(|| Context {
    node: "pi-kitchen".into(),
    account: "acme".into(),
    network: "home".into(),
    api_url: "http://127.0.0.1:10380".into(),
    secret: "0123456789abcdef0123456789abcdef".into(),
});

const HERE: Location = Location { latitude: 48.8566, longitude: 2.3522 };

fuzz_target!(|data: &[u8]| {
    // A text frame is UTF-8: tungstenite refuses anything else before the decoder sees it.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(message) = decode(text) else { return };
    match encode(&message) {
        Ok(again) => assert_eq!(decode(&again).as_ref(), Ok(&message), "{text}"),
        // Numbers may print longer than they were written (`1e2` is `100.0`).
        Err(CodecError::Oversized(_)) => {}
        Err(e) => panic!("a decoded message does not encode: {e}"),
    }
    let Ok(body) = message.body() else { return };
    let rebuilt = Message::with_body(message.id.clone(), message.timestamp, &message.resource, &body);
    assert_eq!(rebuilt.body().as_ref(), Ok(&body), "{text}");
    match body {
        Body::Insert(change) | Body::Update(change) | Body::Response(Answer::Resource(change)) => agent_takes(&change),
        Body::NodeConnection(Connection::Hello(hello)) => {
            let _ = hello.check_bounds();
            let _ = ProtocolVersion::CURRENT.negotiate(hello.protocol);
            let _ = hello.capacity.map(|c| c.class());
        }
        Body::NodeConnection(Connection::Welcome(welcome)) => {
            let _ = supermesh_agent::edgehub::Keepalive::of(&welcome);
        }
        Body::MetaSync(Report::Status(status)) => drop(status.check_bounds()),
        Body::MetaSync(Report::Event(event)) => drop(event.check_bounds()),
        Body::MetaSync(Report::Batch(batch)) if batch.check_bounds().is_ok() => {
            for entry in &batch.entries {
                let _ = Report::relayed(entry);
                let _ = entry.signed_bytes();
            }
        }
        Body::Response(Answer::Nodes(answer)) => {
            for (kind, radius) in [("network", None), ("account", None), ("proximity", Some("50"))] {
                let query = NodesQuery::parse(Some(kind), radius, Some("3")).expect("a valid query");
                let nodes = arrange_nodes(&query, answer.nodes.clone(), Some(&HERE));
                assert!(nodes.len() <= 3);
            }
        }
        Body::Response(Answer::Endpoints(answer)) => {
            let _ = merge_endpoints(Vec::new(), answer.endpoints, "home", Some(&HERE));
        }
        _ => {}
    }
});

/// What the agent makes of a change before it runs or stores anything.
fn agent_takes(change: &Change) {
    let _ = (change.resource(), change.version());
    let Change::Assignment(assignment) = change else { return };
    let spec = instance_spec(&CONTEXT, assignment);
    let _ = InstanceStatus::of(&spec);
    let dir = dir_name(&spec.key);
    assert!(!dir.contains('/') && dir != "." && dir != "..", "{:?} names directory {dir:?}", spec.key);
    if let Some(check) = &spec.spec.health_check {
        let _ = Probe::from_check(check);
    }
    let _ = Sandbox::new(1_900_000_000, spec.spec.security_context.as_ref());
}
