//! The HTTP API: `GET /status` (JSON), `GET /metrics` (Prometheus text),
//! `GET /model/head` (the head manifest as JSON). Read-only; bound to
//! loopback unless configured otherwise.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing;
use serde_json::json;
use tokio::sync::watch;

use crate::status::{Shared, Status};

async fn status(State(shared): State<Shared>) -> Json<Status> {
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

async fn health(State(shared): State<Shared>) -> Response {
    match shared.health.check() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// The API's routes.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/status", routing::get(status))
        .route("/health", routing::get(health))
        .route("/metrics", routing::get(metrics))
        .route("/model/head", routing::get(head))
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

/// Why a GET of a node's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not `HOST:PORT`.
    #[error("api address {0:?} is not HOST:PORT")]
    BadAddress(String),
    /// Nothing answered there.
    #[error("no node API at {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed while talking.
    #[error("reading from {addr}: {source}")]
    Io {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not an HTTP response.
    #[error("malformed HTTP response")]
    Malformed,
    /// An answer other than 200.
    #[error("{path}: {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// The path asked for.
        path: String,
        /// The status line.
        status: String,
        /// The answer's first line, if any.
        body: String,
    },
}

/// A plain HTTP GET of a node's API at `addr` (`HOST:PORT`): the body of a
/// 200 answer. The API is local and tiny, so no client library: HTTP/1.0,
/// the body comes whole, never in chunks; connecting and each read give up
/// after `timeout`. What `tapestry status` and the lab use.
pub fn get(addr: &str, path: &str, timeout: std::time::Duration) -> Result<String, ClientError> {
    use std::io::{Read, Write};
    let sock: SocketAddr = addr
        .parse()
        .map_err(|_| ClientError::BadAddress(addr.to_owned()))?;
    let io = |source| ClientError::Io {
        addr: addr.to_owned(),
        source,
    };
    let mut stream = std::net::TcpStream::connect_timeout(&sock, timeout).map_err(|source| {
        ClientError::Connect {
            addr: addr.to_owned(),
            source,
        }
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(io)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(io)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or(ClientError::Malformed)?;
    let status = head.lines().next().unwrap_or_default();
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        return Err(ClientError::Status {
            path: path.to_owned(),
            status: status.to_owned(),
            body: body
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
        });
    }
    Ok(body.to_owned())
}
