//! HTTP surface. Endpoints:
//!
//! | route | module |
//! |---|---|
//! | `GET /{db}/{coll}/_streams/{name}` (SSE, WebSocket, NDJSON) | [`subscribe`] |
//! | `GET /{db}/{coll}/_streams/{name}.json`, `?format=firebase` (SSE) | [`docview`] |
//! | `GET /_streams?streams=…` (many streams on one connection) | [`multi`] |
//! | `GET /health/live`, `GET /health/ready`, `GET /metrics` | [`health`] |
//! | `/_admin/streams…`, `/_admin/rules…`, `GET /_admin/openapi.json`, `/_admin/stats`, `/_admin/ui` | [`crate::admin`] |

pub mod body;
pub mod deadline;
pub mod docview;
pub mod feed;
pub mod health;
pub mod multi;
pub mod ndjson;
pub mod negotiate;
pub mod options;
pub mod server;
pub mod sse;
pub mod subscribe;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tower::util::option_layer;
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::auth::proxy::TrustedProxies;
use crate::auth::resume::ResumeCheck;
use crate::auth::store::RuleStore;
use crate::config::Config;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::streams::{Registry, Store};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Definitions and workers.
    pub registry: Arc<Registry>,
    /// Stored (admin API) definitions, shared through MongoDB.
    pub store: Arc<Store>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Credentials, roles and stream permissions.
    pub auth: Arc<Authenticator>,
    /// Permission rules stored in MongoDB (`/_admin/rules`).
    pub rules: Arc<RuleStore>,
    /// Refuses resume ids that cannot be real.
    pub resume: Arc<ResumeCheck>,
    /// `trusted_proxies`: whose word on the client's address is taken.
    pub trusted: Arc<TrustedProxies>,
    /// Connection limits.
    pub limits: Arc<Limits>,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Fires on shutdown; every open stream watches it.
    pub shutdown: CancellationToken,
    /// Snapshot scans (`snapshot=true`, the document view).
    pub snapshots: Arc<crate::snapshot::Snapshots>,
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    // Request tracing wraps every body frame in a span; that is noise (and 2.7% of CPU at
    // saturation) for long-lived streams, so the stream route is left out of it.
    let traced = Router::new()
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .merge(crate::admin::routes(state.config.admin.body_limit))
        .layer(TraceLayer::new_for_http());
    Router::new()
        .route("/{db}/{coll}/_streams/{name}", get(subscribe::subscribe))
        .route("/_streams", get(multi::subscribe_many))
        .merge(traced)
        // Authenticates every route but the probes, and requires the admin role on
        // `/_admin…` whatever the method or sub-path (see `auth::guard`).
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            crate::auth::guard,
        ))
        // Outside the guard: preflights are answered without a credential, and 401/403
        // carry CORS headers so the browser lets the page read them.
        .layer(option_layer(crate::auth::cors::layer(&state.config.cors)))
        // Outermost: the client's address (behind trusted proxies) for limits and logs.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.trusted),
            crate::auth::proxy::client_addr,
        ))
        .with_state(state)
}
