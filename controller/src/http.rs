//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::{Error, Result};

/// What the HTTP side reads; written by the controller.
#[derive(Clone)]
pub struct State {
    /// Metrics rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Which caches hold their initial listing; ready once all do.
    pub synced: tokio::sync::watch::Receiver<crate::context::Synced>,
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
        .with_state(state);
    axum::serve(listener, app).await
}

async fn metrics(AxumState(state): AxumState<State>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

async fn readyz(AxumState(state): AxumState<State>) -> impl IntoResponse {
    if state.synced.borrow().all() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches are not synced yet")
    }
}
