//! HTTP surface: the stream and probe handlers, the transports, the socket layer and the
//! state every handler reaches ([`AppState`]). Endpoints:
//!
//! | route | module |
//! |---|---|
//! | `GET /{db}/{coll}/_streams/{name}` (SSE, WebSocket, NDJSON) | [`subscribe`] |
//! | `GET /{db}/{coll}/_streams/{name}.json`, `?format=firebase` (SSE) | [`docview`] |
//! | `GET /_streams?streams=…` (many streams on one connection) | [`multi`] |
//! | `GET /health/live`, `GET /health/ready`, `GET /metrics` | [`health`] |
//!
//! The admin API ([`crate::admin`]) sits above this module (it uses [`AppState`] and the
//! problem type); [`crate::router`] is the one place that assembles both into the router,
//! so nothing here imports `admin`.

pub mod body;
pub mod clients;
pub mod deadline;
pub mod docview;
pub mod error;
pub mod feed;
pub mod guard;
pub mod health;
pub mod host;
pub mod multi;
pub mod ndjson;
pub mod negotiate;
pub mod options;
pub mod server;
pub mod sse;
pub mod subscribe;
pub mod ws;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

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
    /// Clients per transport and worker, for the admin API's stream views.
    pub clients: Arc<clients::TransportClients>,
}
