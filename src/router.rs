//! The router: the one module that knows both the HTTP surface ([`crate::http`]: streams,
//! probes, metrics) and the admin API ([`crate::admin`]), so neither imports the other's
//! routes (admin looks down to `http` for [`AppState`] and the problem type; `http` never
//! looks up to `admin`).
//!
//! | route | module |
//! |---|---|
//! | `GET /{db}/{coll}/_streams/{name}` (SSE, WebSocket, NDJSON; `.json` document view) | [`crate::http::subscribe`] |
//! | `GET /_streams?streams=…` (many streams on one connection) | [`crate::http::multi`] |
//! | `GET /health/live`, `GET /health/ready`, `GET /metrics` (or on `metrics_listen`: [`metrics_router`]) | [`crate::http::health`] |
//! | `/_admin/streams…`, `/_admin/rules…`, `GET /_admin/openapi.json`, `/_admin/stats`, `/_admin/ui` | [`crate::admin`] |

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::routing::get;
use tower::util::option_layer;
use tower_http::trace::TraceLayer;

use crate::http::{self, AppState};

/// Builds the router for the main listener, bound to `local`.
pub fn router(state: AppState, local: SocketAddr) -> Router {
    // Request tracing wraps every body frame in a span; that is noise (and 2.7% of CPU at
    // saturation) for long-lived streams, so the stream route is left out of it.
    let mut traced = Router::new()
        .route("/health/live", get(http::health::live))
        .route("/health/ready", get(http::health::ready));
    if state.config.metrics_listen.is_none() {
        traced = traced.route("/metrics", get(http::health::metrics));
    }
    let traced = traced
        .merge(crate::admin::routes(state.config.admin.body_limit))
        .layer(TraceLayer::new_for_http());
    let routes = Router::new()
        .route(
            "/{db}/{coll}/_streams/{name}",
            get(http::subscribe::subscribe),
        )
        .route("/_streams", get(http::multi::subscribe_many))
        // SSE clients meeting a shutdown are told to reconnect, never given an error status.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            http::sse::reconnect_on_shutdown,
        ))
        .merge(traced)
        // Authenticates every route but the probes, and requires the admin role on
        // `/_admin…` whatever the method or sub-path (see `http::guard`).
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            http::guard::guard,
        ))
        // Outside the guard: preflights are answered without a credential, and 401/403
        // carry CORS headers so the browser lets the page read them.
        .layer(option_layer(crate::auth::cors::layer(&state.config.cors)));
    outermost(routes, state, local)
}

/// The router of the `metrics_listen` address, bound to `local`: `GET /metrics` only, behind
/// the same authentication (`auth.metrics_role`) and Host guard as the main one.
pub fn metrics_router(state: AppState, local: SocketAddr) -> Router {
    let routes = Router::new()
        .route("/metrics", get(http::health::metrics))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            http::guard::guard,
        ));
    outermost(routes, state, local)
}

/// The layers every listener's router ends with, the same for each: the DNS-rebinding guard
/// (before anything answers: no credentials means no answers for a rebound name), then,
/// outermost, the client's address (behind trusted proxies) for limits and logs.
fn outermost(routes: Router<AppState>, state: AppState, local: SocketAddr) -> Router {
    let hosts = host_guard(&state, local);
    routes
        .layer(option_layer(hosts.map(|allowed| {
            middleware::from_fn_with_state(allowed, http::host::guard)
        })))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.trusted),
            crate::auth::proxy::client_addr,
        ))
        .with_state(state)
}

/// The DNS-rebinding guard (`http::host`) where it applies to a listener bound to `local`.
fn host_guard(state: &AppState, local: SocketAddr) -> Option<Arc<http::host::AllowedHosts>> {
    http::host::AllowedHosts::for_listener(
        &state.config.allowed_hosts,
        local.ip().is_loopback(),
        state.config.auth.enabled,
    )
}
