//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` and `/readyz`, and the
//! endpoint other replicas forward their agents' reports to (signed, see `forward`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State as AxumState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
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
        return pass_on(url).await;
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

/// Passes a log request on to the replica at `url` and returns its answer as it is.
async fn pass_on(url: String) -> axum::response::Response {
    let answered = tokio::task::spawn_blocking(move || {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(15)))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut response = http.get(&url).header(PASSED_ON, "1").call().map_err(|e| format!("{url}: {e}"))?;
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
