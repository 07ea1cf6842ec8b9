//! The HTTP API: `GET /status` (JSON), `GET /metrics` (Prometheus text),
//! `GET /model/head` (the head manifest as JSON). Read-only; bound to
//! loopback unless configured otherwise.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use tokio::sync::watch;

use crate::runtime::Shared;

async fn status(State(shared): State<Shared>) -> Json<crate::runtime::Status> {
    Json(shared.status())
}

async fn metrics(State(shared): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
        .into_response()
}

async fn head(State(shared): State<Shared>) -> Response {
    let head = shared.head.lock().ok().and_then(|h| h.clone());
    match head {
        Some(m) => {
            let msg = m.message();
            Json(json!({
                "id": m.id().to_string(),
                "model_id": msg.model_id,
                "region": msg.region,
                "round": msg.round,
                "author": msg.author.to_string(),
                "parents": msg.parents.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "deltas": msg.deltas.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "payload_bytes": msg.payload_bytes,
                "chunk_size": msg.chunk_size,
                "chunk_ids": msg.chunk_ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "layout": msg.layout.iter().map(|t| json!({"name": t.name, "shape": t.shape})).collect::<Vec<_>>(),
            }))
            .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no head yet\n").into_response(),
    }
}

/// The API's routes.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/model/head", get(head))
        .with_state(shared)
}

/// Binds `addr` and serves until `shutdown` turns true. Returns the bound
/// address (useful with port 0) once listening.
pub async fn serve(
    addr: SocketAddr,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, router(shared)).with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
    Ok((bound, task))
}
