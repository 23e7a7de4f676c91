//! The local API router (`localapi::router`) with its real state: a metamanager on a
//! SQLite file, an offline cloud, a cluster with a registry, and two microservices
//! holding tokens; driven with `tower::ServiceExt::oneshot`, as hyper would after
//! parsing a request. The input is a request written as text:
//!
//! ```text
//! METHOD /path?query
//! header-name: value
//!
//! body
//! ```
//!
//! where `$WEB` and `$DB` in the headers stand for the tokens of the two microservices.
//!
//! Besides not panicking: no answer is a 500 (every failure has its status), every
//! error is JSON `{"error": "..."}` (but for a HEAD, which has no body), and a 401 asks
//! for a bearer token.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use supermesh_agent::config;
use supermesh_agent::edged::Desired;
use supermesh_agent::localapi::{router, token_for, Cluster, LocalApi};
use supermesh_agent::metamanager::store::Store;
use supermesh_agent::metamanager::{self, EdgedEvent, QUEUE_CAPACITY};
use supermesh_protocol::peer::{Registry, RegistryEntry};
use supermesh_protocol::{ClusterView, InstanceReport, Location, Message, NodeRole, Phase};
use tokio::sync::{mpsc, watch, Notify};
use tower::ServiceExt;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const WEB: &str = "team/microservice/web";
const DB: &str = "team/microservice/db";

/// A cluster whose supernode is `pi-hall`, with the registry it answers.
struct FixedCluster;

impl Cluster for FixedCluster {
    fn view(&self) -> Option<ClusterView> {
        Some(ClusterView { role: NodeRole::Member, supernode: Some("pi-hall".into()) })
    }

    fn registry(&self) -> BoxFuture<'_, Result<Registry, String>> {
        let member = |node: &str, live, location| RegistryEntry {
            node: node.into(),
            account: "acme".into(),
            address: Some(format!("{node}.local:10360")),
            location,
            live,
            role: Some(NodeRole::Member),
            instances: vec![InstanceReport { ports: vec![8080], ..InstanceReport::new(WEB, "1-u", Phase::Ready) }],
        };
        let registry = Registry {
            network: "home".into(),
            supernode: Some("pi-hall".into()),
            members: vec![
                member("pi-hall", true, Some(Location { latitude: 48.85, longitude: 2.35 })),
                member("pi-garage", false, None),
            ],
            ..Registry::default()
        };
        Box::pin(async move { Ok(registry) })
    }
}

/// The API and what keeps it alive: its runtime, data directory and the ends of its channels.
struct Rig {
    runtime: tokio::runtime::Runtime,
    router: Router,
    _dir: tempfile::TempDir,
    _ends: Mutex<Ends>,
}

/// The other ends of the API's channels: the cloud's, edged's and the desired set's.
struct Ends {
    _from_meta: mpsc::Receiver<Message>,
    _edged: mpsc::Receiver<EdgedEvent>,
    _desired: watch::Sender<BTreeMap<String, Desired>>,
}

static RIG: LazyLock<Rig> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let dir = tempfile::Builder::new().prefix("localapi").tempdir().expect("a data directory");
    let edge_yaml = r#"
node: {name: pi-kitchen, account: acme, network: home, location: {latitude: 48.8566, longitude: 2.3522}}
cloud: {address: 127.0.0.1:10350}
"#;
    let config = Arc::new(config::parse(edge_yaml, "edge.yaml").expect("a valid edge.yaml"));
    let assignment = |key: &str| {
        let (namespace, name) = key.split_once("/microservice/").expect("a microservice key");
        let value = serde_json::json!({"namespace": namespace, "name": name, "uid": "u", "generation": 1,
            "spec": {"mesh": "lan", "command": ["run"]}});
        Desired { version: "1-u".into(), value: value.to_string() }
    };
    let (desired, wanted) =
        watch::channel(BTreeMap::from([(WEB.to_owned(), assignment(WEB)), (DB.to_owned(), assignment(DB))]));
    let store = Store::open(dir.path().join("meta.db")).expect("a store");
    let (router, ends) = runtime.block_on(async {
        let (to_cloud, from_meta) = mpsc::channel(QUEUE_CAPACITY);
        let (to_edged, edged) = mpsc::channel(QUEUE_CAPACITY);
        let meta = metamanager::spawn(store, to_cloud, to_edged);
        let api = LocalApi::new(config, meta, Arc::new(Notify::new()), wanted, Arc::new(FixedCluster), SECRET.into());
        (router(Arc::new(api)), Ends { _from_meta: from_meta, _edged: edged, _desired: desired })
    });
    Rig { runtime, router, _dir: dir, _ends: Mutex::new(ends) }
});

/// The request `data` writes, if it is one hyper could have parsed.
fn request(data: &[u8]) -> Option<Request<Body>> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, uri) = lines.next()?.split_once(' ')?;
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim().replace("$WEB", &token_for(SECRET, WEB)).replace("$DB", &token_for(SECRET, DB));
        builder = builder.header(name, value);
    }
    builder.body(Body::from(body.to_vec())).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(request) = request(data) else { return };
    // The answer to a HEAD has the headers of a GET's and no body.
    let head = request.method() == Method::HEAD;
    let rig = &*RIG;
    let (status, headers, body) = rig.runtime.block_on(async {
        let response = rig.router.clone().oneshot(request).await.expect("the router is infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("an answer's body can be read").to_bytes();
        (parts.status, parts.headers, body)
    });
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{}", String::from_utf8_lossy(&body));
    if (status.is_client_error() || status.is_server_error()) && !head {
        let error: serde_json::Value = serde_json::from_slice(&body).expect("an error answer is JSON");
        assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()), "{error}");
    }
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(headers.get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
    }
});
