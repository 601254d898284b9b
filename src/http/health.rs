//! Liveness, readiness and metrics endpoints.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mongodb::bson::{Document, doc};
use serde_json::json;

use super::AppState;
use crate::watcher::Watched;

/// How long readiness waits for MongoDB to answer `hello`.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health/live`: the process is up.
pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /health/ready`: MongoDB answers, is a replica set member (change streams need one), and
/// the stored stream definitions are loaded and watched (otherwise stored streams would 404);
/// with auth on, the stored permission rules too (else their grants would be 403s) and the
/// JWKS URL's first key set (else every token would be refused); in relay mode, NATS (else
/// no relayed change would arrive).
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return not_ready("shutting down");
    }
    if !state.auth.keys_ready() {
        return not_ready("the JWKS URL has not been fetched yet");
    }
    if state.auth.enabled() && !state.rules.is_synced() {
        return not_ready("stored permission rules are not loaded yet");
    }
    if state.registry.relay_reachable() == Some(false) {
        return not_ready("the relay's NATS server is not reachable (relay mode)");
    }
    let admin = state.registry.mongo().database("admin");
    let hello = admin.run_command(doc! { "hello": 1 });
    match tokio::time::timeout(READY_TIMEOUT, hello).await {
        Ok(Ok(reply)) => match replica_set_name(&reply) {
            Some(_) if !state.store.is_synced() => {
                not_ready("stored stream definitions are not loaded yet")
            }
            Some(set) => Json(json!({ "status": "ready", "replicaSet": set })).into_response(),
            None => {
                not_ready("MongoDB is not a replica set member: change streams need a replica set")
            }
        },
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: MongoDB error");
            not_ready("MongoDB is not reachable")
        }
        Err(_) => not_ready("MongoDB did not answer in time"),
    }
}

fn replica_set_name(hello: &Document) -> Option<&str> {
    hello.get_str("setName").ok()
}

fn not_ready(reason: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": "unavailable", "reason": reason })),
    )
        .into_response()
}

/// `GET /metrics`: OpenMetrics when `Accept` asks for it (Prometheus does), else the
/// Prometheus text format (curl, `promtool check metrics`, older scrapers).
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.render(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render_text(),
        )
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}
