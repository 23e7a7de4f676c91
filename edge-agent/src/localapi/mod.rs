//! The local API: what the agent serves its microservices over HTTP/1.1 on
//! `localApi.listen` (keep it on loopback), JSON in and out. Instances find its
//! address in `SUPERMESH_API` and their bearer token in the file `SUPERMESH_TOKEN_FILE` names; the
//! token says which microservice calls ([`auth`]).
//!
//! Endpoints, all under `/v1`:
//! - `GET /v1/context`: who and where the caller runs, and the node's cluster role.
//! - `GET /v1/nodes?type=network|account|proximity[&radiusKm=R][&limit=N]`: other
//!   nodes, nearest first. `network` (alias `linkLocal`) comes from the cluster
//!   registry and works without the cloud; `account` and `proximity` ask the cloud
//!   and fall back to its last answer while it cannot be reached.
//! - `GET /v1/endpoints/{name}`: instances of microservice `name` of the caller's
//!   namespace, from the registry and the cloud.
//! - `GET /v1/kv`, `GET|PUT|DELETE /v1/kv/{key}`: storage per microservice in the
//!   agent's SQLite, written through the metamanager. Keys stay when the
//!   microservice is removed from the node, so it finds its data if placed here again.
//! - `POST /v1/events`: an event that becomes a Kubernetes Event on the Microservice.
//!
//! Every error is `{"error": "..."}` with a fitting status code.

pub mod auth;
pub mod discovery;
pub mod limits;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use supermesh_protocol::peer::Registry;
use supermesh_protocol::Location;
use supermesh_protocol::NodeRole;
use supermesh_protocol::{
    ClusterView, Endpoint, EndpointsAnswer, ErrorCode, NodeInfo, NodesAnswer, Operation, ResourceRef, ENDPOINTS,
    MICROSERVICE,
};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{error, info};

use crate::config::EdgeConfig;
use crate::edged::Desired;
use crate::metamanager::store::KvPut;
use crate::metamanager::{MetaError, MetaHandle};
pub use auth::{load_or_create_secret, token_for, Caller};
use discovery::{NodesQuery, NodesType};
use limits::{event_quota, EventLimiter, EVENTS_PER_SECOND, EVENT_BURST, MAX_BODY_BYTES, MAX_KEYS};

/// Most cloud answers kept for when the cloud cannot be reached.
const MAX_CACHED_ANSWERS: usize = 1024;

/// What the local API needs of the node's network cluster (implemented by the supernode module).
pub trait Cluster: Send + Sync + 'static {
    /// The node's role and supernode right now, if the node is in a cluster.
    fn view(&self) -> Option<ClusterView>;
    /// The cluster's registry: from the supernode, or this node's own when it is the supernode
    /// or no supernode answers. Err when there is no cluster at all.
    fn registry(&self) -> BoxFuture<'_, Result<Registry, String>>;
}

/// The base URL of the local API listening on `listen`; an unspecified address
/// (`0.0.0.0`, `::`) is reached on loopback.
pub fn api_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// The state behind the API: the node, the metamanager, the cluster, and who holds which token.
pub struct LocalApi {
    config: Arc<EdgeConfig>,
    meta: MetaHandle,
    outbox: Arc<Notify>,
    cluster: Arc<dyn Cluster>,
    secret: String,
    tokens: Mutex<Tokens>,
    /// How many events each microservice may send.
    events: EventLimiter,
    /// The last good cloud answer of each discovery query, by resource string.
    answers: Mutex<HashMap<String, serde_json::Value>>,
}

/// The token map and the desired set it was built from; rebuilt when the set changes.
struct Tokens {
    desired: watch::Receiver<BTreeMap<String, Desired>>,
    callers: HashMap<String, Caller>,
}

/// Locks `mutex`; every critical section leaves its map consistent, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalApi {
    /// The API of the node `config` describes. `outbox` is told when an event is
    /// queued; `desired` is edged's desired set, whose microservices hold the tokens.
    pub fn new(
        config: Arc<EdgeConfig>,
        meta: MetaHandle,
        outbox: Arc<Notify>,
        mut desired: watch::Receiver<BTreeMap<String, Desired>>,
        cluster: Arc<dyn Cluster>,
        secret: String,
    ) -> LocalApi {
        let callers = auth::callers(&secret, &desired.borrow_and_update());
        LocalApi {
            config,
            meta,
            outbox,
            cluster,
            secret,
            tokens: Mutex::new(Tokens { desired, callers }),
            events: EventLimiter::hashmap(event_quota()),
            answers: Mutex::default(),
        }
    }

    /// The microservice holding `token`, from the current desired set.
    fn caller(&self, token: &str) -> Option<Caller> {
        let mut tokens = lock(&self.tokens);
        // An error means edged is gone; the last set stays the truth.
        if tokens.desired.has_changed().unwrap_or(false) {
            let callers = auth::callers(&self.secret, &tokens.desired.borrow_and_update());
            // Buckets as full as new ones tell nothing: forget them, so removed microservices leave none.
            self.events.retain_recent();
            tokens.callers = callers;
        }
        tokens.callers.get(token).cloned()
    }

    /// Takes one of `key`'s event tokens, if it has one left.
    fn take_event(&self, key: &str) -> bool {
        self.events.check_key(&key.to_owned()).is_ok()
    }

    /// Asks the cloud a discovery query; while it cannot be reached, answers with its last good answer.
    async fn ask_cloud<T: DeserializeOwned + Serialize + Default>(
        &self,
        resource: &str,
    ) -> Result<Remote<T>, ApiError> {
        let value = match self.meta.query(resource).await {
            Ok(value) => value,
            // The cloud knows nothing of it: an empty answer, and a good one.
            Err(MetaError::Cloud { code: ErrorCode::NotFound, .. }) => {
                serde_json::to_value(T::default()).unwrap_or_default()
            }
            Err(
                e @ (MetaError::Offline(_)
                | MetaError::Timeout(_)
                | MetaError::Cloud { code: ErrorCode::Unavailable | ErrorCode::Overloaded, .. }),
            ) => {
                let cached = lock(&self.answers).get(resource).and_then(|v| T::deserialize(v).ok());
                return Ok(cached.map_or_else(|| Remote::Unreachable(e.to_string()), Remote::Cached));
            }
            Err(e) => return Err(e.into()),
        };
        let answer = T::deserialize(&value)
            .map_err(|e| ApiError::Upstream(format!("the cloud's answer to {resource} is malformed: {e}")))?;
        let mut answers = lock(&self.answers);
        if answers.len() >= MAX_CACHED_ANSWERS && !answers.contains_key(resource) {
            // Bounded: forgetting one answer only costs a 503 while offline.
            if let Some(old) = answers.keys().next().cloned() {
                answers.remove(&old);
            }
        }
        answers.insert(resource.to_owned(), value);
        Ok(Remote::Fresh(answer))
    }
}

/// What the cloud said to a discovery query.
enum Remote<T> {
    /// It answered now.
    Fresh(T),
    /// It cannot be reached; this is its last good answer.
    Cached(T),
    /// It cannot be reached and never answered this query; why.
    Unreachable(String),
}

/// Where a discovery answer comes from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The network cluster's registry alone.
    Registry,
    /// The cloud, answering now (merged with the registry for endpoints).
    Cloud,
    /// The cloud's last good answer, since it cannot be reached now.
    Cache,
}

/// Answer of `GET /v1/context`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContextReply {
    /// This node's EdgeNode name.
    pub node: String,
    /// Namespace of the calling microservice.
    pub namespace: String,
    /// Name of the calling microservice.
    pub microservice: String,
    /// Mesh of the calling microservice.
    pub mesh: String,
    /// Account of this node.
    pub account: String,
    /// Network of this node.
    pub network: String,
    /// Where this node is, if configured.
    pub location: Option<Location>,
    /// This node's role in its network cluster, if it is in one.
    pub role: Option<NodeRole>,
    /// The supernode this node follows, if one is elected.
    pub supernode: Option<String>,
}

/// Answer of `GET /v1/nodes`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodesReply {
    /// The nodes, in the order the query asks for.
    pub nodes: Vec<NodeInfo>,
    /// Where they come from.
    pub source: Source,
}

/// Answer of `GET /v1/endpoints/{name}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EndpointsReply {
    /// One instance per node: this node's network first, then nearest first.
    pub endpoints: Vec<Endpoint>,
    /// Where the instances beyond the registry come from.
    pub source: Source,
}

/// Answer of `GET /v1/kv`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeysReply {
    /// The caller's keys, in byte order.
    pub keys: Vec<String>,
}

/// Why a request failed; each kind has its status code, the message goes in `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one that belongs to no microservice here.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: nothing there.
    #[error("{0}")]
    NotFound(String),
    /// 405: the path does not take this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the request conflicts with the node's state or a limit.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body or value is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 429: too many requests; retry after a second.
    #[error("{0}")]
    RateLimited(String),
    /// 502: the cloud answered, but not usefully.
    #[error("{0}")]
    Upstream(String),
    /// 503: what answers this is not reachable now.
    #[error("{0}")]
    Unavailable(String),
    /// 507: the agent's database could not take the write (for example a full disk).
    #[error("{0}")]
    Storage(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Storage(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> ApiError {
        match e {
            MetaError::Store(_) => ApiError::Storage(e.to_string()),
            MetaError::BadResource(_) => ApiError::BadRequest(e.to_string()),
            MetaError::Cloud { .. } => ApiError::Upstream(e.to_string()),
            MetaError::Offline(_) | MetaError::Timeout(_) | MetaError::Stopped => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json(self.status(), &serde_json::json!({ "error": self.to_string() }));
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized(_) => drop(headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))),
            ApiError::RateLimited(_) => drop(headers.insert(RETRY_AFTER, HeaderValue::from_static("1"))),
            _ => {}
        }
        response
    }
}

/// `body` as a JSON response with `status`.
fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let json = HeaderValue::from_static("application/json");
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(CONTENT_TYPE, json)], bytes).into_response(),
        Err(e) => {
            let body = serde_json::json!({ "error": format!("cannot encode the answer: {e}") }).to_string();
            (StatusCode::INTERNAL_SERVER_ERROR, [(CONTENT_TYPE, json)], body).into_response()
        }
    }
}

impl FromRequestParts<Arc<LocalApi>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<LocalApi>) -> Result<Caller, ApiError> {
        // A header that is not text is as bad as a malformed one.
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.to_str().unwrap_or_default());
        let token = auth::bearer(header).map_err(|e| ApiError::Unauthorized(e.to_owned()))?;
        api.caller(token).ok_or_else(|| {
            ApiError::Unauthorized(
                "unknown token: it belongs to no microservice placed on this node; send the contents of \
                 the instance's $SUPERMESH_TOKEN_FILE"
                    .to_owned(),
            )
        })
    }
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, api: Arc<LocalApi>) {
    match listener.local_addr() {
        Ok(address) => info!(%address, "local API listening"),
        Err(e) => error!(error = %e, "local API listener has no address"),
    }
    if let Err(e) = axum::serve(listener, router(api)).await {
        error!(error = %e, "the local API stopped; microservices cannot reach it until the agent restarts");
    }
}

/// The API's routes, serving `api` (what [`serve`] serves; public for the fuzz target).
pub fn router(api: Arc<LocalApi>) -> Router {
    Router::new()
        .route("/v1/context", get(context))
        .route("/v1/nodes", get(nodes))
        .route("/v1/endpoints/{name}", get(endpoints))
        .route("/v1/kv", get(kv_list))
        .route("/v1/kv/{key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/events", post(events))
        .fallback(|| async {
            ApiError::NotFound(
                "no such endpoint; the local API serves /v1/context, /v1/nodes, /v1/endpoints/{name}, /v1/kv, \
                 /v1/kv/{key} and /v1/events"
                    .into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// The body of a request, or why it cannot be read.
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("the request body exceeds the limit of {MAX_BODY_BYTES} bytes"))
        }
        _ => ApiError::BadRequest(e.body_text()),
    })
}

/// The path parameter of a request, or why it cannot be read.
fn path_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(p)| p).map_err(|e| ApiError::BadRequest(e.body_text()))
}

async fn context(State(api): State<Arc<LocalApi>>, caller: Caller) -> Response {
    let node = &api.config.node;
    let view = api.cluster.view();
    json(
        StatusCode::OK,
        &ContextReply {
            node: node.name.clone(),
            namespace: caller.namespace,
            microservice: caller.microservice,
            mesh: caller.mesh,
            account: node.account.clone(),
            network: node.network.clone(),
            location: node.location,
            role: view.as_ref().map(|v| v.role),
            supernode: view.and_then(|v| v.supernode),
        },
    )
}

/// Query of `GET /v1/nodes`; values are checked by [`NodesQuery::parse`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesParams {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "radiusKm")]
    radius_km: Option<String>,
    limit: Option<String>,
}

async fn nodes(
    State(api): State<Arc<LocalApi>>,
    _caller: Caller,
    params: Result<Query<NodesParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = NodesQuery::parse(params.kind.as_deref(), params.radius_km.as_deref(), params.limit.as_deref())
        .map_err(ApiError::BadRequest)?;
    let here = api.config.node.location;
    let (nodes, source) = match query.kind.resource() {
        None => {
            let registry = api
                .cluster
                .registry()
                .await
                .map_err(|e| ApiError::Unavailable(format!("this node's network cluster cannot be listed: {e}")))?;
            (discovery::registry_nodes(&registry), Source::Registry)
        }
        Some(resource) => {
            if query.kind == NodesType::Proximity && here.is_none() {
                return Err(ApiError::Conflict(
                    "proximity discovery measures from this node, which has no location; set node.location \
                     in the agent's edge.yaml"
                        .into(),
                ));
            }
            match api.ask_cloud::<NodesAnswer>(&resource).await? {
                Remote::Fresh(answer) => (answer.nodes, Source::Cloud),
                Remote::Cached(answer) => (answer.nodes, Source::Cache),
                Remote::Unreachable(reason) => {
                    return Err(ApiError::Unavailable(format!(
                        "{reason}; no earlier answer is cached, so {resource} cannot be answered until the node \
                         connects"
                    )))
                }
            }
        }
    };
    let nodes = discovery::arrange_nodes(&query, nodes, here.as_ref());
    Ok(json(StatusCode::OK, &NodesReply { nodes, source }))
}

async fn endpoints(
    State(api): State<Arc<LocalApi>>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = path_of(name)?;
    let resource = ResourceRef::string(&caller.namespace, ENDPOINTS, &name);
    ResourceRef::parse(&resource)
        .map_err(|e| ApiError::BadRequest(format!("{name:?} is not a microservice name: {}", e.reason)))?;
    let key = ResourceRef::string(&caller.namespace, MICROSERVICE, &name);
    let (registry, remote) = tokio::join!(api.cluster.registry(), api.ask_cloud::<EndpointsAnswer>(&resource));
    let local = registry.as_ref().map(|r| discovery::registry_endpoints(r, &key)).unwrap_or_default();
    let (remote, source) = match remote? {
        Remote::Fresh(answer) => (answer.endpoints, Source::Cloud),
        Remote::Cached(answer) => (answer.endpoints, Source::Cache),
        Remote::Unreachable(reason) => match &registry {
            Ok(_) => (Vec::new(), Source::Registry),
            Err(e) => {
                return Err(ApiError::Unavailable(format!(
                    "{reason}; no earlier answer is cached, and this node's network cluster cannot be listed: {e}"
                )))
            }
        },
    };
    let node = &api.config.node;
    let endpoints = discovery::merge_endpoints(local, remote, &node.network, node.location.as_ref());
    Ok(json(StatusCode::OK, &EndpointsReply { endpoints, source }))
}

/// The checked storage key of a request.
fn kv_key(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let key = path_of(path)?;
    limits::check_key(&key).map_err(ApiError::BadRequest)?;
    Ok(key)
}

async fn kv_list(State(api): State<Arc<LocalApi>>, caller: Caller) -> Result<Response, ApiError> {
    let keys = api.meta.kv_keys(&caller.key).await?;
    Ok(json(StatusCode::OK, &KeysReply { keys }))
}

async fn kv_get(
    State(api): State<Arc<LocalApi>>,
    caller: Caller,
    key: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let key = kv_key(key)?;
    match api.meta.kv_get(&caller.key, &key).await? {
        Some(value) => {
            Ok((StatusCode::OK, [(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], value)
                .into_response())
        }
        None => Err(ApiError::NotFound(format!("{} has stored nothing under {key:?}", caller.key))),
    }
}

async fn kv_put(
    State(api): State<Arc<LocalApi>>,
    caller: Caller,
    key: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = kv_key(key)?;
    let value = body_of(body)?;
    limits::check_value(value.len()).map_err(ApiError::TooLarge)?;
    match api.meta.kv_put(&caller.key, &key, value.to_vec(), MAX_KEYS).await? {
        KvPut::Created => Ok(StatusCode::CREATED.into_response()),
        KvPut::Replaced => Ok(StatusCode::NO_CONTENT.into_response()),
        KvPut::Full => Err(ApiError::Conflict(format!(
            "{} already stores {MAX_KEYS} keys, the most allowed; delete one before adding {key:?}",
            caller.key
        ))),
    }
}

async fn kv_delete(
    State(api): State<Arc<LocalApi>>,
    caller: Caller,
    key: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let key = kv_key(key)?;
    if api.meta.kv_delete(&caller.key, &key).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound(format!("{} has stored nothing under {key:?}", caller.key)))
    }
}

async fn events(
    State(api): State<Arc<LocalApi>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let report = limits::event_report(&body_of(body)?).map_err(ApiError::BadRequest)?;
    if !api.take_event(&caller.key) {
        return Err(ApiError::RateLimited(format!(
            "{} sends events faster than {EVENTS_PER_SECOND} a second (bursts of {EVENT_BURST}); this one was \
             dropped, send it again later",
            caller.key
        )));
    }
    let content = serde_json::to_value(&report).unwrap_or_default();
    api.meta.enqueue_report(Operation::MetaSync, &caller.key, &content).await?;
    api.outbox.notify_one();
    Ok(StatusCode::ACCEPTED.into_response())
}

#[cfg(test)]
mod tests;
