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

/// An instance's log, read from its node's agent through the cloudhub. The node
/// defaults to the first one the microservice is placed on; the offset to follow
/// from comes back in `x-supermesh-offset`.
async fn logs(
    AxumState(state): AxumState<State>,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Query<LogParams>,
) -> axum::response::Response {
    let fail = |code: StatusCode, message: String| (code, message + "\n").into_response();
    let placed = state.index.placed(&Key::new(&namespace, &name));
    let node = match params.node.or_else(|| placed.first().cloned()) {
        Some(node) => node,
        None => return fail(StatusCode::NOT_FOUND, format!("{namespace}/{name} runs on no node")),
    };
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
