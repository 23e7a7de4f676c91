//! Component tests: the API on a real TCP listener, a real metamanager on a
//! SQLite file, a fake cloud answering forwarded queries and a fake cluster,
//! driven over real HTTP.

use std::time::Duration;

use serde_json::{json, Value};
use supermesh_protocol::peer::RegistryEntry;
use supermesh_protocol::{ConnectionState, ErrorContent, EventReport, InstanceReport, Message, Phase};
use tempfile::TempDir;
use tokio::sync::mpsc;

use super::*;
use crate::metamanager::store::Store;
use crate::metamanager::{self, EdgedEvent, QUEUE_CAPACITY};

const DEADLINE: Duration = Duration::from_secs(10);
const WEB: &str = "team/microservice/web";
const DB: &str = "team/microservice/db";
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const PARIS: Location = Location { latitude: 48.8566, longitude: 2.3522 };
const VERSAILLES: Location = Location { latitude: 48.8049, longitude: 2.1204 };
const LONDON: Location = Location { latitude: 51.5074, longitude: -0.1278 };

fn config(location: Option<Location>) -> Arc<EdgeConfig> {
    let mut config = crate::config::parse(
        r#"
node: {name: pi-kitchen, account: acme, network: home}
cloud:
  address: 127.0.0.1:10350
  token: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.abc123.0123456789abcdef"
"#,
        "edge.yaml",
    )
    .unwrap();
    config.node.location = location;
    Arc::new(config)
}

fn assignment(key: &str, mesh: &str) -> Desired {
    let r = ResourceRef::parse(key).unwrap();
    let value = json!({
        "namespace": r.namespace, "name": r.id, "uid": "u", "generation": 1,
        "spec": {"mesh": mesh, "command": ["run"]}
    });
    Desired { version: "1-u".into(), value: value.to_string() }
}

/// A cluster whose view and registry the test sets.
struct FakeCluster {
    view: Mutex<Option<ClusterView>>,
    registry: Mutex<Result<Registry, String>>,
}

impl Cluster for FakeCluster {
    fn view(&self) -> Option<ClusterView> {
        lock(&self.view).clone()
    }

    fn registry(&self) -> BoxFuture<'_, Result<Registry, String>> {
        let registry = lock(&self.registry).clone();
        Box::pin(async move { registry })
    }
}

/// What the fake cloud answers to forwarded queries, by resource; others get NotFound.
type CloudAnswers = Arc<Mutex<HashMap<String, Value>>>;

struct Rig {
    _dir: TempDir,
    base: String,
    meta: MetaHandle,
    outbox: Arc<Notify>,
    desired: watch::Sender<BTreeMap<String, Desired>>,
    cluster: Arc<FakeCluster>,
    cloud: CloudAnswers,
    _edged: mpsc::Receiver<EdgedEvent>,
}

/// An API for node pi-kitchen in Paris running web and db, offline, in no cluster.
async fn rig() -> Rig {
    rig_with(Some(PARIS), |_| (), |_| ()).await
}

/// An API at `location`, after `prepare` had its way with the store and `tune` with the API.
async fn rig_with(location: Option<Location>, prepare: impl FnOnce(&Store), tune: impl FnOnce(&mut LocalApi)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("meta.db")).unwrap();
    prepare(&store);
    let (to_cloud, mut queries) = mpsc::channel(QUEUE_CAPACITY);
    let (to_edged, edged) = mpsc::channel(QUEUE_CAPACITY);
    let meta = metamanager::spawn(store, to_cloud, to_edged);
    let cloud = CloudAnswers::default();
    let (answers, from_cloud) = (cloud.clone(), meta.clone());
    tokio::spawn(async move {
        while let Some(query) = queries.recv().await {
            let answer = lock(&answers).get(&query.resource).cloned();
            let (operation, content) = match answer {
                Some(content) => (Operation::Response, content),
                None => {
                    let refusal =
                        ErrorContent { code: ErrorCode::NotFound, message: "unknown".into(), retry_after_ms: None };
                    (Operation::Error, serde_json::to_value(refusal).unwrap())
                }
            };
            let reply = Message::new(format!("c-{}", query.id), 1, operation, &query.resource, content);
            from_cloud.from_cloud(reply.answering(&query.id)).await;
        }
    });
    let (desired, wanted) = watch::channel(BTreeMap::from([
        (WEB.to_owned(), assignment(WEB, "lan")),
        (DB.to_owned(), assignment(DB, "lan")),
    ]));
    let cluster =
        Arc::new(FakeCluster { view: Mutex::new(None), registry: Mutex::new(Err("no membership yet".into())) });
    let outbox = Arc::new(Notify::new());
    let mut api = LocalApi::new(config(location), meta.clone(), outbox.clone(), wanted, cluster.clone(), SECRET.into());
    tune(&mut api);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, Arc::new(api)));
    Rig { _dir: dir, base, meta, outbox, desired, cluster, cloud, _edged: edged }
}

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        assert_eq!(self.content_type.as_deref(), Some("application/json"), "{self:?}");
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The message of a JSON error answer with `status`.
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        let message = body["error"].as_str().unwrap_or_else(|| panic!("no error message: {body}"));
        assert!(!message.is_empty());
        message.to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Rig {
    /// Sends a request as microservice `key` (`None`: no Authorization header).
    async fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<Vec<u8>>) -> Reply {
        let token = key.map(|k| token_for(SECRET, k));
        self.call_with(method, path, token.as_deref().map(|t| format!("Bearer {t}")), body).await
    }

    /// Sends a request with `authorization` as the raw header.
    async fn call_with(&self, method: &str, path: &str, authorization: Option<String>, body: Option<Vec<u8>>) -> Reply {
        let (url, method) = (format!("{}{path}", self.base), method.to_owned());
        let blocking = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).proxy(None).build().into();
            let mut request = ureq::http::Request::builder().method(method.as_str()).uri(&url);
            if let Some(authorization) = authorization {
                request = request.header("authorization", authorization);
            }
            let mut response = match body {
                Some(body) => agent.run(request.body(body).unwrap()),
                None => agent.run(request.body(()).unwrap()),
            }
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            Reply {
                status: response.status().as_u16(),
                content_type: response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()),
                headers: response
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                    .collect(),
                body: response.body_mut().read_to_vec().unwrap(),
            }
        });
        tokio::time::timeout(DEADLINE, blocking).await.expect("no answer before the deadline").unwrap()
    }

    async fn get(&self, path: &str, key: &str) -> Reply {
        self.call("GET", path, Some(key), None).await
    }

    fn answer(&self, resource: &str, content: impl Serialize) {
        lock(&self.cloud).insert(resource.to_owned(), serde_json::to_value(content).unwrap());
    }

    fn set_registry(&self, registry: Result<Registry, String>) {
        *lock(&self.cluster.registry) = registry;
    }
}

fn node_info(name: &str, network: &str, location: Option<Location>, live: bool) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        account: "acme".into(),
        network: network.into(),
        location,
        address: None,
        role: None,
        live,
        distance_km: None,
    }
}

fn names(reply: &Reply, list: &str, field: &str) -> Vec<String> {
    let body = reply.json();
    let items = body[list].as_array().unwrap_or_else(|| panic!("no {list}: {body}"));
    items.iter().map(|n| n[field].as_str().unwrap().to_owned()).collect()
}

fn member(node: &str, address: &str, location: Option<Location>, live: bool, runs: &[(&str, bool)]) -> RegistryEntry {
    RegistryEntry {
        node: node.into(),
        account: "acme".into(),
        address: Some(address.into()),
        location,
        live,
        role: Some(if node == "pi-kitchen" { NodeRole::Supernode } else { NodeRole::Member }),
        instances: runs
            .iter()
            .map(|(resource, ready)| InstanceReport {
                ready: *ready,
                ports: vec![8080],
                ..InstanceReport::new(resource, "1-u", Phase::Ready)
            })
            .collect(),
    }
}

fn home_registry() -> Registry {
    Registry {
        network: "home".into(),
        members: vec![
            member("pi-garage", "10.0.0.3:10360", None, true, &[(DB, true)]),
            member("pi-attic", "10.0.0.4:10360", Some(LONDON), false, &[(WEB, true)]),
            member("pi-kitchen", "10.0.0.2:10360", Some(PARIS), true, &[(WEB, true)]),
            member("pi-cellar", "10.0.0.5:10360", Some(VERSAILLES), true, &[(WEB, false), (DB, true)]),
        ],
        ..Registry::default()
    }
}

#[tokio::test]
async fn the_context_names_the_caller_its_node_and_cluster() {
    let rig = rig().await;
    let reply = rig.get("/v1/context", WEB).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({
            "node": "pi-kitchen", "namespace": "team", "microservice": "web", "mesh": "lan",
            "account": "acme", "network": "home", "location": {"latitude": 48.8566, "longitude": 2.3522},
            "role": null, "supernode": null
        })
    );
    *lock(&rig.cluster.view) = Some(ClusterView { role: NodeRole::Member, supernode: Some("pi-garage".into()) });
    let body = rig.get("/v1/context", DB).await.json();
    assert_eq!((body["microservice"].as_str(), body["role"].as_str()), (Some("db"), Some("Member")));
    assert_eq!(body["supernode"], "pi-garage");
}

#[tokio::test]
async fn requests_without_a_known_token_are_refused() {
    let rig = rig().await;
    let missing = rig.call("GET", "/v1/context", None, None).await;
    assert!(missing.error(401).contains("missing Authorization header"));
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let other_secret = format!("Bearer {}", token_for("another-secret-another-secret-xx", WEB));
    let unknown = rig.call_with("GET", "/v1/context", Some(other_secret), None).await;
    assert!(unknown.error(401).contains("unknown token"));
    let basic = rig.call_with("GET", "/v1/kv", Some("Basic dXNlcjpwdw==".into()), None).await;
    assert!(basic.error(401).contains("Bearer <token>"));
    let unplaced = "team/microservice/cache";
    assert!(rig.get("/v1/context", unplaced).await.error(401).contains("unknown token"));

    // The token map follows the desired set.
    rig.desired.send_modify(|set| {
        set.insert(unplaced.into(), assignment(unplaced, "lan"));
        set.remove(WEB);
    });
    assert_eq!(rig.get("/v1/context", unplaced).await.json()["microservice"], "cache");
    assert!(rig.get("/v1/context", WEB).await.error(401).contains("unknown token"));
    // Unknown paths are JSON errors too, and need no token.
    assert!(rig.call("GET", "/v2/nothing", None, None).await.error(404).contains("/v1/context"));
    assert!(rig.call("POST", "/v1/context", Some(DB), None).await.error(405).contains("method"));
}

#[tokio::test]
async fn storage_round_trips_per_microservice_within_its_limits() {
    let rig = rig().await;
    let value = vec![0u8, 159, 146, 150, b'\n', 255];
    let put = rig.call("PUT", "/v1/kv/state.bin", Some(WEB), Some(value.clone())).await;
    assert_eq!(put.status, 201, "{put:?}");
    let again = rig.call("PUT", "/v1/kv/state.bin", Some(WEB), Some(value.clone())).await;
    assert_eq!(again.status, 204, "{again:?}");
    assert_eq!(rig.call("PUT", "/v1/kv/empty", Some(WEB), Some(vec![])).await.status, 201);
    let got = rig.get("/v1/kv/state.bin", WEB).await;
    assert_eq!((got.status, got.content_type.as_deref()), (200, Some("application/octet-stream")));
    assert_eq!(got.body, value);
    assert_eq!(rig.get("/v1/kv", WEB).await.json(), json!({"keys": ["empty", "state.bin"]}));
    // Another microservice sees none of it.
    assert_eq!(rig.get("/v1/kv", DB).await.json(), json!({"keys": []}));
    assert!(rig.get("/v1/kv/state.bin", DB).await.error(404).contains("team/microservice/db"));
    // It is in the database, as a second connection sees it.
    assert_eq!(rig.meta.kv_get(WEB, "state.bin").await.unwrap(), Some(value));

    assert_eq!(rig.call("DELETE", "/v1/kv/state.bin", Some(WEB), None).await.status, 204);
    assert!(rig.get("/v1/kv/state.bin", WEB).await.error(404).contains("state.bin"));
    assert_eq!(rig.call("DELETE", "/v1/kv/state.bin", Some(WEB), None).await.status, 404);

    let bad_key = rig.call("PUT", "/v1/kv/a%20b", Some(WEB), Some(b"x".to_vec())).await;
    assert!(bad_key.error(400).contains("A-Z a-z 0-9 . _ -"));
    let long_key = format!("/v1/kv/{}", "k".repeat(257));
    assert!(rig.call("PUT", &long_key, Some(WEB), Some(b"x".to_vec())).await.error(400).contains("257 bytes"));
    let big = rig.call("PUT", "/v1/kv/big", Some(WEB), Some(vec![1; 64 * 1024 + 1])).await;
    assert!(big.error(413).contains("65537 bytes"));
    let huge = rig.call("PUT", "/v1/kv/huge", Some(WEB), Some(vec![1; MAX_BODY_BYTES + 1])).await;
    assert!(huge.error(413).contains("request body exceeds"));
    assert_eq!(rig.get("/v1/kv", WEB).await.json(), json!({"keys": ["empty"]}), "refused writes leave nothing");
}

#[tokio::test]
async fn a_microservice_stores_at_most_a_thousand_keys() {
    let rig = rig().await;
    for i in 1..MAX_KEYS {
        rig.meta.kv_put(WEB, &format!("k{i:04}"), vec![], MAX_KEYS).await.unwrap();
    }
    assert_eq!(rig.call("PUT", "/v1/kv/last", Some(WEB), Some(b"1".to_vec())).await.status, 201);
    let full = rig.call("PUT", "/v1/kv/one-more", Some(WEB), Some(b"1".to_vec())).await;
    assert!(full.error(409).contains("1000 keys"));
    assert_eq!(rig.call("PUT", "/v1/kv/last", Some(WEB), Some(b"2".to_vec())).await.status, 204, "held keys change");
    assert_eq!(rig.call("PUT", "/v1/kv/one-more", Some(DB), Some(b"1".to_vec())).await.status, 201, "per microservice");
    assert_eq!(rig.call("DELETE", "/v1/kv/k0001", Some(WEB), None).await.status, 204);
    assert_eq!(rig.call("PUT", "/v1/kv/one-more", Some(WEB), Some(b"1".to_vec())).await.status, 201);
}

#[tokio::test]
async fn a_full_disk_answers_507_and_writes_nothing() {
    let rig = rig_with(Some(PARIS), Store::fill_disk, |_| ()).await;
    let reply = rig.call("PUT", "/v1/kv/blob", Some(WEB), Some(vec![7; 60 * 1024])).await;
    let message = reply.error(507);
    assert!(message.contains("full") && message.contains("meta.db"), "{message}");
    assert!(rig.get("/v1/kv/blob", WEB).await.error(404).contains("blob"));
    assert_eq!(rig.get("/v1/kv", WEB).await.json(), json!({"keys": []}));
}

#[tokio::test]
async fn events_are_queued_in_the_outbox_under_the_callers_key() {
    let three_an_hour =
        governor::Quota::with_period(Duration::from_secs(1200)).unwrap().allow_burst(3.try_into().unwrap());
    let rig = rig_with(Some(PARIS), |_| (), |api| api.events = EventLimiter::hashmap(three_an_hour)).await;
    let post = |key: &'static str, body: Vec<u8>| rig.call("POST", "/v1/events", Some(key), Some(body));
    let event = |value: Value| value.to_string().into_bytes();
    let reply = post(WEB, event(json!({"type": "Warning", "reason": "CacheCold", "message": "rebuilding"}))).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    tokio::time::timeout(DEADLINE, rig.outbox.notified()).await.expect("the edgehub is told to send");
    let pending = rig.meta.outbox_pending(10).await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!((pending[0].operation, pending[0].resource.as_str()), (Operation::MetaSync, WEB));
    let report: EventReport = serde_json::from_str(&pending[0].content).unwrap();
    assert_eq!(report, EventReport { warning: true, reason: "CacheCold".into(), message: "rebuilding".into() });

    let bad = post(WEB, event(json!({"type": "Normal", "reason": "not one word"}))).await;
    assert!(bad.error(400).contains("invalid reason"));
    assert!(post(WEB, b"{".to_vec()).await.error(400).contains("not an event"));

    // This rig's bucket holds 3 events and never refills: two more pass, the next is refused.
    let tick = event(json!({"type": "Normal", "reason": "Tick"}));
    for _ in 0..2 {
        assert_eq!(post(WEB, tick.clone()).await.status, 202);
    }
    let limited = post(WEB, tick.clone()).await;
    assert!(limited.error(429).contains("faster than"));
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(post(DB, tick).await.status, 202, "each microservice has its own bucket");
    let resources: Vec<String> = rig.meta.outbox_pending(10).await.unwrap().into_iter().map(|e| e.resource).collect();
    assert_eq!(resources, [WEB, WEB, WEB, DB], "refused events are not queued");
}

#[tokio::test]
async fn network_nodes_come_from_the_registry() {
    let rig = rig().await;
    let none = rig.get("/v1/nodes?type=network", WEB).await;
    assert!(none.error(503).contains("no membership yet"));
    rig.set_registry(Ok(home_registry()));
    for kind in ["network", "linkLocal"] {
        let reply = rig.get(&format!("/v1/nodes?type={kind}"), WEB).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.json()["source"], "registry");
        assert_eq!(names(&reply, "nodes", "name"), ["pi-kitchen", "pi-cellar", "pi-garage", "pi-attic"]);
    }
    let body = rig.get("/v1/nodes?type=network&limit=2", WEB).await.json();
    assert_eq!(body["nodes"].as_array().unwrap().len(), 2);
    let cellar = &body["nodes"][1];
    assert_eq!((cellar["address"].as_str(), cellar["network"].as_str()), (Some("10.0.0.5"), Some("home")));
    assert_eq!((cellar["live"].as_bool(), cellar["role"].as_str()), (Some(true), Some("Member")));
    let km = cellar["distanceKm"].as_f64().unwrap();
    assert!((15.0..20.0).contains(&km), "Paris to Versailles is about 17 km, got {km}");

    assert!(rig
        .get("/v1/nodes?type=mesh", WEB)
        .await
        .error(400)
        .contains("network (alias linkLocal), account and proximity"));
    assert!(rig.get("/v1/nodes", WEB).await.error(400).contains("missing parameter type"));
    assert!(rig.get("/v1/nodes?type=network&limit=x", WEB).await.error(400).contains("limit"));
    assert!(rig.get("/v1/nodes?type=network&radius=5", WEB).await.error(400).contains("radius"));
}

#[tokio::test]
async fn account_and_proximity_nodes_come_from_the_cloud_or_its_last_answer() {
    let rig = rig().await;
    let offline = rig.get("/v1/nodes?type=account", WEB).await;
    let message = offline.error(503);
    assert!(message.contains("cloud is unreachable") && message.contains("no earlier answer is cached"), "{message}");

    let nodes = vec![
        node_info("berlin", "office", Some(Location { latitude: 52.52, longitude: 13.405 }), true),
        node_info("london", "office", Some(LONDON), true),
        node_info("versailles", "home", Some(VERSAILLES), true),
        node_info("unplaced", "office", None, true),
    ];
    rig.answer("_/nodes/account", NodesAnswer { nodes: nodes.clone() });
    rig.answer("_/nodes/proximity", NodesAnswer { nodes });
    rig.meta.set_connection(ConnectionState::CloudConnected);
    let account = rig.get("/v1/nodes?type=account", WEB).await;
    assert_eq!(account.json()["source"], "cloud");
    assert_eq!(names(&account, "nodes", "name"), ["versailles", "london", "berlin", "unplaced"]);
    let near = rig.get("/v1/nodes?type=proximity&radiusKm=500", WEB).await;
    assert_eq!(
        (near.json()["source"].as_str(), names(&near, "nodes", "name")),
        (Some("cloud"), vec!["versailles".to_owned(), "london".to_owned()])
    );

    rig.meta.set_connection(ConnectionState::CloudDisconnected);
    let cached = rig.get("/v1/nodes?type=proximity&limit=1", WEB).await;
    assert_eq!(cached.json()["source"], "cache");
    assert_eq!(names(&cached, "nodes", "name"), ["versailles"]);
    assert_eq!(rig.get("/v1/nodes?type=account", WEB).await.json()["source"], "cache");

    let nowhere = rig_with(None, |_| (), |_| ()).await;
    let refused = nowhere.get("/v1/nodes?type=proximity", WEB).await;
    assert!(refused.error(409).contains("node.location"));
}

#[tokio::test]
async fn endpoints_merge_the_registry_and_the_cloud() {
    let rig = rig().await;
    let neither = rig.get("/v1/endpoints/web", DB).await;
    let message = neither.error(503);
    assert!(message.contains("no earlier answer") && message.contains("no membership yet"), "{message}");

    rig.set_registry(Ok(home_registry()));
    let local = rig.get("/v1/endpoints/web", DB).await;
    assert_eq!(local.json()["source"], "registry");
    assert_eq!(names(&local, "endpoints", "node"), ["pi-kitchen", "pi-cellar", "pi-attic"]);
    let cellar = &local.json()["endpoints"][1];
    assert_eq!((cellar["ready"].as_bool(), cellar["ports"].clone()), (Some(false), json!([8080])));
    assert_eq!(local.json()["endpoints"][2]["ready"], false, "pi-attic's heartbeats stopped");

    let remote = |node: &str, network: &str, location| Endpoint {
        node: node.into(),
        network: network.into(),
        address: Some("192.0.2.1".into()),
        ports: vec![9090],
        ready: true,
        location,
        distance_km: None,
    };
    rig.answer(
        "team/endpoints/web",
        EndpointsAnswer {
            endpoints: vec![
                remote("far-away", "office", Some(LONDON)),
                remote("pi-kitchen", "home", Some(PARIS)),
                remote("near-by", "office", Some(VERSAILLES)),
            ],
        },
    );
    rig.meta.set_connection(ConnectionState::CloudConnected);
    let merged = rig.get("/v1/endpoints/web", DB).await;
    assert_eq!(merged.json()["source"], "cloud");
    assert_eq!(names(&merged, "endpoints", "node"), ["pi-kitchen", "pi-cellar", "pi-attic", "near-by", "far-away"]);
    assert_eq!(merged.json()["endpoints"][0]["ports"], json!([8080]), "the registry wins for its own network");

    rig.meta.set_connection(ConnectionState::CloudDisconnected);
    rig.set_registry(Err("the supernode left".into()));
    let cached = rig.get("/v1/endpoints/web", DB).await;
    assert_eq!(cached.json()["source"], "cache");
    assert_eq!(names(&cached, "endpoints", "node"), ["pi-kitchen", "near-by", "far-away"]);

    // Names are those of the caller's namespace; the cloud knowing nothing is an empty answer.
    rig.meta.set_connection(ConnectionState::CloudConnected);
    let unknown = rig.get("/v1/endpoints/nothing-here", DB).await;
    assert_eq!(unknown.json(), json!({"endpoints": [], "source": "cloud"}));
    assert!(rig.get("/v1/endpoints/..", DB).await.error(400).contains("not a microservice name"));
    assert!(rig.get("/v1/endpoints/a%2Fb", DB).await.error(400).contains("not a microservice name"));
}
