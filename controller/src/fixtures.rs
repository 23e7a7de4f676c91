//! Test fixtures: objects, an index fed like the watches feed it, and a mocked
//! API server that checks each call a reconcile makes, in the style of kube-rs
//! controller-rs. For unit tests only; end-to-end tests use a real API server.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use supermesh_api::names::{CONTROLLER_MANAGER, FINALIZER};
use supermesh_api::{EdgeNode, Mesh, Microservice};

use crate::context::{Context, Role};
use crate::index::{Index, SessionInfo, Triggers};
use crate::metrics::Metrics;
use crate::replicas::{Replica, Replicas};

/// A Mesh `team/name` of `spec`.
pub fn mesh(name: &str, spec: Value) -> Mesh {
    let mut m = Mesh::new(name, serde_json::from_value(spec).unwrap());
    m.metadata.namespace = Some("team".into());
    m.metadata.generation = Some(1);
    m
}

/// An EdgeNode `name` of `account` on `network`.
pub fn node(name: &str, account: &str, network: &str) -> EdgeNode {
    EdgeNode::new(name, serde_json::from_value(json!({"account": account, "network": network})).unwrap())
}

/// An EdgeNode `name` on `network` with a status: Ready or not, reporting itself supernode or not.
pub fn node_with_status(name: &str, network: &str, ready: bool, supernode: bool) -> EdgeNode {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use supermesh_api::names::condition::READY;
    let mut n = node(name, "a", network);
    let mut status = supermesh_api::EdgeNodeStatus::default();
    if ready {
        status.conditions.push(Condition {
            type_: READY.into(),
            status: "True".into(),
            reason: "AgentReady".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        });
    }
    status.role = supernode.then_some(supermesh_protocol::NodeRole::Supernode);
    n.status = Some(status);
    n
}

/// A Microservice `team/name` in `mesh` at `generation`, with `extra` spec fields.
pub fn microservice(name: &str, mesh: &str, generation: i64, extra: Value) -> Microservice {
    let mut spec = json!({"mesh": mesh, "command": ["srv"]});
    spec.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    let mut m = Microservice::new(name, serde_json::from_value(spec).unwrap());
    m.metadata.namespace = Some("team".into());
    m.metadata.uid = Some(format!("uid-{name}"));
    m.metadata.generation = Some(generation);
    m
}

/// `obj` carrying the supermesh finalizer, as after its first reconcile.
pub fn finalized<K: kube::Resource>(mut obj: K) -> K {
    obj.meta_mut().finalizers = Some(vec![FINALIZER.into()]);
    obj
}

/// A session of an agent that connected at the epoch.
pub fn session(peer: Option<&str>) -> SessionInfo {
    let at = k8s_openapi::jiff::Timestamp::UNIX_EPOCH;
    SessionInfo {
        connected_at: at,
        last_seen: at,
        agent_version: "test".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        address: "10.0.0.9".into(),
        peer_address: peer.map(str::to_owned),
        capacity: None,
    }
}

/// An empty index whose reconnect grace is over.
pub fn new_index() -> (Arc<Index>, Triggers) {
    Index::new("secret".into(), Duration::ZERO, Arc::new(Metrics::default()))
}

/// Feeds `index` a complete listing of each kind, as the watches do at start.
pub fn listed(index: &Index, meshes: Vec<Mesh>, nodes: Vec<EdgeNode>, microservices: Vec<Microservice>) {
    index.mesh_event(&watcher::Event::Init);
    for m in meshes {
        index.mesh_event(&watcher::Event::InitApply(m));
    }
    index.mesh_event(&watcher::Event::InitDone);
    index.node_event(&watcher::Event::Init);
    for n in nodes {
        index.node_event(&watcher::Event::InitApply(n));
    }
    index.node_event(&watcher::Event::InitDone);
    index.microservice_event(&watcher::Event::Init);
    for m in microservices {
        index.microservice_event(&watcher::Event::InitApply(m));
    }
    index.microservice_event(&watcher::Event::InitDone);
}

/// The API server side of a mocked client: each call is checked, then answered.
pub struct ApiServer(tower_test::mock::Handle<Request<Body>, Response<Body>>);

/// One call a reconcile made.
#[derive(Debug)]
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// The JSON body, `Null` when empty.
    pub body: Value,
}

impl ApiServer {
    /// Waits for the next call, checks its method and that its path starts with `path`,
    /// answers it with `answer`, and returns it for further checks.
    pub async fn expect(&mut self, method: Method, path: &str, answer: Value) -> Call {
        let next = tokio::time::timeout(Duration::from_secs(5), self.0.next_request()).await;
        let (request, send) = next.unwrap_or_else(|_| panic!("no {method} {path} within 5 s")).expect("a request");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let uri = parts.uri.to_string();
        assert_eq!(parts.method, method, "{uri}: {body}");
        assert!(uri.starts_with(path), "expected {method} {path}, got {uri}");
        send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap());
        Call { method: parts.method, uri, body }
    }

    /// Expects a server-side apply of `obj`'s status and returns its patch.
    pub async fn expect_status(&mut self, path: &str, obj: &impl serde::Serialize) -> Value {
        let call = self.expect(Method::PATCH, &format!("{path}/status?"), serde_json::to_value(obj).unwrap()).await;
        assert!(call.uri.contains(&format!("fieldManager={CONTROLLER_MANAGER}")), "{}", call.uri);
        assert!(call.uri.contains("force=true"), "status is applied by force: {}", call.uri);
        call.body["status"].clone()
    }

    /// Expects a Kubernetes Event and returns it.
    pub async fn expect_event(&mut self) -> Value {
        let call = self.expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/", json!({})).await;
        call.body
    }

    /// Asserts that no call comes within a second.
    pub async fn expect_nothing(&mut self) {
        let next = tokio::time::timeout(Duration::from_secs(1), self.0.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    }
}

/// A reconcile context whose client talks to the returned mocked API server.
pub fn context(index: Arc<Index>) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let recorder = Recorder::new(client.clone(), Reporter { controller: CONTROLLER_MANAGER.into(), instance: None });
    // The only replica, and the leader.
    let me = Replica { id: "replica-0".into(), address: "127.0.0.1:10350".into(), peer: "127.0.0.1:8080".into() };
    let role = Role { leader: tokio::sync::watch::channel(true).1, replicas: Replicas::alone(client.clone(), me) };
    let ctx = Context::new(client, recorder, Arc::new(Metrics::default()), index, role);
    (Arc::new(ctx), ApiServer(handle))
}
