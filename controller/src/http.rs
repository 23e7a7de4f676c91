//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` and `/readyz`, open to
//! anyone; `/logs`, for Kubernetes users allowed to `get microservices/log` (checked
//! with a TokenReview and a SubjectAccessReview, as an aggregated API server does);
//! and the endpoint other replicas forward their agents' reports to (signed, see
//! `forward`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State as AxumState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use supermesh_protocol::names::is_dns1123_subdomain;
use supermesh_protocol::{Answer, Body, LogQuery, ResourceRef, LOG};
use tokio::net::TcpListener;

use crate::cloudhub::Hub;
use crate::forward;
use crate::index::{Index, Key};
use crate::metrics::Metrics;
use crate::replicas::Replicas;
use crate::{Error, Result};

/// What the HTTP side reads; written by the controller.
#[derive(Clone)]
pub struct State {
    /// Metrics rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The fleet index: readiness and where microservices run.
    pub index: Arc<Index>,
    /// Agent sessions, which answer log queries.
    pub hub: Arc<Hub>,
    /// The live replicas.
    pub replicas: Replicas,
    /// The key forwards from other replicas are signed with.
    pub forward_key: Arc<str>,
    /// Checks who calls `/logs`, and whether they may.
    pub access: Arc<Access>,
}

/// How long a caller's permission to read a microservice's logs is remembered: a
/// `supermeshctl logs --follow` asks every second, the API server need not hear of each.
const ACCESS_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// Checks callers with the API server: who a bearer token is (TokenReview), and whether
/// they may `get` the `log` subresource of a Microservice (SubjectAccessReview).
pub struct Access {
    client: kube::Client,
    /// Recent permissions, by the token's hash, namespace and name.
    recent: std::sync::Mutex<std::collections::HashMap<(String, String, String), std::time::Instant>>,
}

impl Access {
    /// Checks callers with the API server `client` talks to.
    pub fn new(client: kube::Client) -> Access {
        Access { client, recent: std::sync::Mutex::default() }
    }

    /// Whether the caller presenting `headers` may read the logs of `namespace/name`; the
    /// status and reason to answer when not (401 without a valid token, 403 without the permission).
    pub async fn check(&self, headers: &HeaderMap, namespace: &str, name: &str) -> Result<(), (StatusCode, String)> {
        let refuse = |code: StatusCode, message: String| Err((code, message));
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty() && t.len() <= 16 * 1024);
        let Some(token) = bearer else {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "send a Kubernetes bearer token (supermeshctl sends your kubeconfig's, or --token)".into(),
            );
        };
        // Tokens are kept hashed, not as they are.
        let hashed = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(token.as_bytes()))
        };
        let key = (hashed, namespace.to_owned(), name.to_owned());
        // Only a permission is remembered: a grant counts at once, a revocation within the TTL.
        if self.lock().get(&key).is_some_and(|at| at.elapsed() < ACCESS_TTL) {
            return Ok(());
        }
        let user = match self.authenticate(token).await {
            Ok(Some(user)) => user,
            Ok(None) => return refuse(StatusCode::UNAUTHORIZED, "the bearer token is not valid".into()),
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("cannot check the token now: {e}")),
        };
        match self.authorize(&user, namespace, name).await {
            Ok(true) => {
                let mut recent = self.lock();
                if recent.len() > 10_000 {
                    recent.retain(|_, at| at.elapsed() < ACCESS_TTL);
                }
                recent.insert(key, std::time::Instant::now());
                Ok(())
            }
            Ok(false) => refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "user {:?} may not get microservices/log in namespace {namespace}",
                    user.username.unwrap_or_default()
                ),
            ),
            Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, format!("cannot check access now: {e}")),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String, String), std::time::Instant>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who `token` is, or `None` when the API server does not know it.
    async fn authenticate(&self, token: &str) -> kube::Result<Option<UserInfo>> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), ..TokenReviewSpec::default() },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api.create(&kube::api::PostParams::default(), &review).await?;
        Ok(answer.status.filter(|s| s.authenticated == Some(true)).and_then(|s| s.user))
    }

    /// Whether `user` may get the log subresource of Microservice `namespace/name`.
    async fn authorize(&self, user: &UserInfo, namespace: &str, name: &str) -> kube::Result<bool> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some("get".into()),
                    group: Some(supermesh_api::names::GROUP.into()),
                    resource: Some("microservices".into()),
                    subresource: Some("log".into()),
                    name: Some(name.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
        let answer = api.create(&kube::api::PostParams::default(), &review).await?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}

/// Binds the listener now, so that a taken port fails the start with a clear error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Http(addr.to_string(), e))
}

/// Serves the endpoints until the process ends.
pub async fn serve(listener: TcpListener, state: State) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/logs/{namespace}/{name}", get(logs))
        .route(forward::PATH, post(forwarded).layer(DefaultBodyLimit::max(forward::MAX_BODY)))
        .with_state(state);
    axum::serve(listener, app).await
}

async fn metrics(AxumState(state): AxumState<State>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

/// Query of `GET /logs/{namespace}/{name}`.
#[derive(serde::Deserialize)]
struct LogParams {
    node: Option<String>,
    tail: Option<u64>,
    offset: Option<u64>,
}

/// Header of a request one replica passes on to the replica that serves the node.
const PASSED_ON: &str = "x-supermesh-passed-on";

/// An instance's log, read from its node's agent through the cloudhub. The node
/// defaults to the first one the microservice is placed on; the offset to follow
/// from comes back in `x-supermesh-offset`. When another replica serves the node,
/// the request is passed on to it (once).
async fn logs(
    AxumState(state): AxumState<State>,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Query<LogParams>,
    headers: HeaderMap,
) -> axum::response::Response {
    let fail = |code: StatusCode, message: String| (code, message + "\n").into_response();
    if ![&namespace, &name].into_iter().all(|n| is_dns1123_subdomain(n)) {
        return fail(StatusCode::BAD_REQUEST, format!("{namespace}/{name}: not Kubernetes names"));
    }
    if let Err((code, reason)) = state.access.check(&headers, &namespace, &name).await {
        return fail(code, reason);
    }
    let placed = state.index.placed(&Key::new(&namespace, &name));
    let node = match params.node.or_else(|| placed.first().cloned()) {
        Some(node) => node,
        None => return fail(StatusCode::NOT_FOUND, format!("{namespace}/{name} runs on no node")),
    };
    if ![&namespace, &name, &node].into_iter().all(|n| is_dns1123_subdomain(n)) {
        return fail(StatusCode::BAD_REQUEST, format!("{namespace}/{name} on node {node}: not Kubernetes names"));
    }
    if let Some(owner) = state.replicas.elsewhere(&node).filter(|_| !headers.contains_key(PASSED_ON)) {
        let mut url = format!("http://{}/logs/{namespace}/{name}?node={node}", owner.peer);
        for (key, value) in [("tail", params.tail), ("offset", params.offset)] {
            if let Some(value) = value {
                url.push_str(&format!("&{key}={value}"));
            }
        }
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        return pass_on(url, authorization).await;
    }
    let resource = ResourceRef::string(&namespace, LOG, &name);
    let query = LogQuery { tail: params.tail, offset: params.offset };
    match state.hub.query(&node, &resource, supermesh_protocol::Query::Log(query)).await.map(|answer| answer.body()) {
        Ok(Ok(Body::Response(Answer::Log(chunk)))) => {
            let headers = [("x-supermesh-offset", chunk.offset.to_string()), ("x-supermesh-node", node)];
            (headers, chunk.text).into_response()
        }
        Ok(Ok(Body::Error(refusal))) => fail(StatusCode::NOT_FOUND, refusal.message),
        Ok(Ok(other)) => fail(StatusCode::BAD_GATEWAY, format!("node {node} answered a {:?}", other.operation())),
        Ok(Err(e)) => fail(StatusCode::BAD_GATEWAY, format!("node {node} answered badly: {e}")),
        Err(reason) => fail(StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

/// Passes a log request on to the replica at `url`, with the caller's credentials (that
/// replica checks them too), and returns its answer as it is.
async fn pass_on(url: String, authorization: Option<String>) -> axum::response::Response {
    let answered = tokio::task::spawn_blocking(move || {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(15)))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut request = http.get(&url).header(PASSED_ON, "1");
        if let Some(authorization) = &authorization {
            request = request.header(header::AUTHORIZATION.as_str(), authorization);
        }
        let mut response = request.call().map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        let kept = ["x-supermesh-offset", "x-supermesh-node"]
            .into_iter()
            .filter_map(|h| Some((h, response.headers().get(h)?.to_str().ok()?.to_owned())))
            .collect::<Vec<_>>();
        let body = response.body_mut().read_to_string().map_err(|e| format!("{url}: {e}"))?;
        Ok::<_, String>((status, kept, body))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match answered {
        Ok((status, kept, body)) => {
            let mut response = (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), body).into_response();
            for (name, value) in kept {
                if let Ok(value) = value.parse() {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Err(e) => {
            (StatusCode::BAD_GATEWAY, format!("the replica that serves the node did not answer: {e}\n")).into_response()
        }
    }
}

/// Reports another replica took from its agents.
async fn forwarded(AxumState(state): AxumState<State>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let signature = headers.get(forward::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    match forward::receive(&state.index, &state.replicas, &state.forward_key, &body, signature) {
        Ok(taken) => {
            state.metrics.reports_received.inc_by(taken as u64);
            (StatusCode::OK, String::new())
        }
        Err(reason) => {
            forward::refused(&reason);
            (StatusCode::FORBIDDEN, reason)
        }
    }
}

async fn readyz(AxumState(state): AxumState<State>) -> impl IntoResponse {
    if state.index.is_synced() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches are not synced yet")
    }
}
