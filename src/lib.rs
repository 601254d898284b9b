//! Streamgate: MongoDB change streams as live feeds over SSE, WebSocket and NDJSON.
//!
//! # Layout
//! ```text
//! config.rs      settings declared once → TOML, env and CLI layers (no I/O beyond reading the file)
//! event.rs       Token (resume token, oplog-ordered) and Event (encoded once per wire format)
//! path.rs        dotted paths into BSON and JSON (one walker)
//! routing.rs     per-client routing rules and filters (claims, routable $var bindings)
//! membership.rs  in-process $match evaluation on pre- and post-images (entries, removals)
//! spec.rs        what a cursor watches: StreamKey, fullDocument options, WatchSpec
//! backoff.rs     exponential backoff for every retry loop
//! sync.rs        lock helpers (poison-recovering), one way to take a lock
//! watcher.rs     one watcher loop (watch, load, follow; backoff) for the two MongoDB stores
//! streams/       definition.rs (validation, $var binding) · registry.rs (definitions → workers)
//!                store.rs (admin definitions in MongoDB + the watcher applying them)
//! worker/        mod.rs (worker, context) · hub.rs (ring read by position + live channels)
//!                source.rs (self-reopening cursor, oversize changes) · cursor.rs (the loop)
//!                catchup.rs (shared catch-up cursors) · subscription.rs (one client, by position)
//!                membership.rs (per change: plain, removal or entry per client; pre-images)
//! http/          server.rs (accept loop, direct SSE/NDJSON writes) · deadline.rs (write deadline)
//!                error.rs (ApiError → application/problem+json, from every lower layer's
//!                error type) · guard.rs (the authentication middleware) · clients.rs
//!                (clients per transport and worker: the worker counts clients, not transports)
//!                negotiation, sse.rs / ws.rs / ndjson.rs, feed.rs, health + metrics
//! admin/         the admin REST API (/_admin/streams, OpenAPI document) · view.rs (stats JSON)
//!                ui.rs (the console at /_admin/ui, /_admin/stats); looks down to http/
//! router.rs      the router: http/'s routes + admin/'s, behind the auth middleware (the
//!                only module that knows both)
//! auth/          credentials → Principal (JWT incl. JWKS URL, API keys), stream rules (config +
//!                live ones stored in MongoDB), CORS/Origin policy, trusted proxies, resume checks
//! limits.rs      connection limits and the upstream cursor budget, with RAII permits
//! metrics.rs     Prometheus registry
//! relay/         the relay tier (`[relay]`): one cursor per worker for a fleet, through NATS
//!                JetStream (owner.rs publishes, consumer.rs feeds the hub, lease.rs, wire.rs)
//! replset.rs     replica-set initiation for local runs and tests
//! ```
//! Data flow: MongoDB cursor → `Worker` (encode once, ring, live channels) → `Subscription` (per
//! client, by position: live, ring chunks, shared catch-up) → `Feed` (batches, keep-alive,
//! shutdown, expiry) → transport.
//!
//! [`App::new`] builds everything without binding; [`App::serve`] takes an already-bound
//! listener and a shutdown future, so tests run servers on `127.0.0.1:0`.

pub mod admin;
pub mod auth;
pub mod backoff;
pub mod config;
pub mod event;
pub mod http;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod path;
pub mod relay;
pub mod replset;
pub mod router;
pub mod routing;
pub mod snapshot;
pub mod spec;
pub mod streams;
pub mod sync;
pub mod watcher;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mongodb::options::ClientOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::streams::{Origin, Registry, Store};
use crate::watcher::Watched;
use crate::worker::WorkerSettings;

/// Startup failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The MongoDB URI is invalid.
    #[error("invalid MongoDB URI: {0}")]
    MongoUri(mongodb::error::Error),
    /// A static stream definition is invalid.
    #[error("invalid stream definition: {0}")]
    Definition(String),
    /// The `[auth]` section cannot be used (e.g. an unreadable key file).
    #[error("invalid auth configuration: {0}")]
    Auth(String),
    /// `[relay]` cannot be used (e.g. a malformed `nats_url`).
    #[error("invalid relay configuration: {0}")]
    Relay(relay::RelayError),
    /// `metrics_listen` cannot be bound.
    #[error("cannot listen on {0} (metrics_listen): {1}")]
    MetricsListen(std::net::SocketAddr, std::io::Error),
}

/// How long [`App::new`] waits for the stored definitions before serving without them (the
/// watcher keeps trying and applies them as soon as MongoDB answers).
const STORE_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the MongoDB client may take to end its sessions on shutdown.
const MONGO_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A configured server, not yet serving. Dropping it stops its background tasks.
pub struct App {
    state: AppState,
    tracker: TaskTracker,
    /// The `metrics_listen` socket, once bound ([`App::bind_metrics`]).
    metrics_listener: Option<TcpListener>,
}

impl App {
    /// Builds the registry (static streams loaded), the MongoDB client (which connects
    /// lazily: a MongoDB outage at startup is survived and shows in `/health/ready`), and
    /// starts the watcher of stored definitions, waiting a bounded time for their first load.
    pub async fn new(config: Config) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new());
        let auth = Arc::new(
            auth::Authenticator::from_config(&config.auth, &metrics).map_err(StartError::Auth)?,
        );
        let trusted = Arc::new(
            auth::proxy::TrustedProxies::parse(&config.trusted_proxies)
                .map_err(StartError::Auth)?,
        );
        let limits = limits::Limits::new(config.limits.clone());
        let mut options = ClientOptions::parse(&config.mongo_uri)
            .await
            .map_err(StartError::MongoUri)?;
        options
            .app_name
            .get_or_insert_with(|| "streamgate".to_owned());
        // Notice a restarted or re-elected primary quickly; the driver default is 10 s.
        options.heartbeat_freq.get_or_insert(Duration::from_secs(1));
        options
            .server_selection_timeout
            .get_or_insert(Duration::from_secs(5));
        // Every cursor's getMore holds a pooled connection for up to max_await: size the pool
        // from limits.max_workers so that no cursor queues for a connection (issue 8).
        let pool = limits::PoolSize::for_limits(&config.limits, options.max_pool_size);
        if let limits::PoolSize::TooSmall { given, needed } = pool {
            tracing::warn!(
                given,
                needed,
                "mongo_uri sets maxPoolSize={given}, below the {needed} connections that \
                 limits.max_workers ({}) cursors need (one each, plus {} for the rest): cursors \
                 will queue for connections; raise maxPoolSize or remove it from mongo_uri",
                config.limits.max_workers,
                limits::POOL_HEADROOM
            );
        }
        options.max_pool_size = Some(pool.max_pool_size());
        let client = mongodb::Client::with_options(options).map_err(StartError::MongoUri)?;

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let settings = WorkerSettings {
            ring_size: config.ring_size,
            linger: config.worker_linger(),
            shared_database_cursors: config.shared_database_cursors,
            enable_pre_images: config.enable_pre_images,
            feed_probe_timeout: config.feed_probe_timeout(),
            oversize_isolation_changes: config.oversize_isolation_changes,
            cursor_open_wait: config.cursor_open_wait(),
            ..WorkerSettings::default()
        };
        let budget = crate::limits::CursorBudget::new(&config.limits, &metrics);
        let registry = Arc::new(Registry::new(
            client,
            settings,
            budget,
            shutdown.clone(),
            tracker.clone(),
            Arc::clone(&metrics),
        ));
        metrics.watch_workers(Arc::downgrade(&registry) as std::sync::Weak<dyn metrics::LagSource>);
        if config.relay.nats_url.is_some() {
            let relay = relay::Relay::connect(&config.relay, Arc::clone(&metrics))
                .await
                .map_err(StartError::Relay)?;
            registry.set_relay(relay);
        }
        for stream in &config.streams {
            let (key, definition) = stream
                .split()
                .map_err(|e| StartError::Definition(e.to_string()))?;
            let compiled = definition
                .compile()
                .map_err(|e| StartError::Definition(format!("{key}: {e}")))?;
            registry.upsert(key, compiled, Origin::Static);
        }
        let store = Store::new(
            Arc::clone(&registry),
            &config.admin.database,
            &config.admin.collection,
        );
        store.spawn_watcher(&tracker, shutdown.clone());
        let rules = auth::store::RuleStore::new(
            registry.mongo(),
            &config.admin.database,
            &config.auth.rules_collection,
            Arc::clone(&auth),
        );
        // The rules only matter with auth on; without it, `/_admin/rules` still stores them.
        if config.auth.enabled {
            rules.spawn_watcher(&tracker, shutdown.clone());
        }
        auth.start(&tracker, shutdown.clone());
        let resume = Arc::new(auth::resume::ResumeCheck::new(registry.mongo().clone()));
        if !store.wait_synced(STORE_SYNC_TIMEOUT).await {
            tracing::warn!(
                "stored stream definitions not loaded yet (MongoDB unreachable?); \
                 serving static ones, the rest follow when MongoDB answers"
            );
        }
        if config.auth.enabled && !rules.wait_synced(STORE_SYNC_TIMEOUT).await {
            tracing::warn!(
                "stored permission rules not loaded yet (MongoDB unreachable?); \
                 only the config's rules apply until MongoDB answers"
            );
        }
        if !auth.wait_keys_ready(STORE_SYNC_TIMEOUT).await {
            tracing::warn!(
                "auth.jwt.jwks_url not fetched yet; tokens are answered 503 and readiness \
                 waits until a first key set is loaded (retrying)"
            );
        }
        Ok(App {
            state: AppState {
                snapshots: Arc::new(snapshot::Snapshots::new(&config, Arc::clone(&metrics))),
                registry,
                store,
                metrics,
                auth,
                rules,
                resume,
                trusted,
                limits,
                config: Arc::new(config),
                shutdown,
                clients: Arc::default(),
            },
            tracker,
            metrics_listener: None,
        })
    }

    /// Binds `metrics_listen`, if set (else does nothing), and returns the bound address (its
    /// port when the setting's is 0). [`App::serve`] binds it itself if this was not called.
    pub async fn bind_metrics(&mut self) -> Result<Option<std::net::SocketAddr>, StartError> {
        let Some(addr) = self.state.config.metrics_listen else {
            return Ok(None);
        };
        if self.metrics_listener.is_none() {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::MetricsListen(addr, e))?;
            self.metrics_listener = Some(listener);
        }
        Ok(self
            .metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok()))
    }

    /// The registry (for tests and embedding).
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.state.registry)
    }

    /// The metrics (for tests and embedding).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.state.metrics)
    }

    /// Serves until `shutdown` completes, then closes every stream (SSE `retry` + end,
    /// WebSocket 1001) and returns within the configured grace period.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let token = self.state.shutdown.clone();
        let grace = self.state.config.shutdown_grace();
        let local = listener.local_addr().unwrap_or(self.state.config.listen);
        let router = router::router(self.state.clone(), local);
        let connections = TaskTracker::new();
        if let Some(metrics_addr) = self.bind_metrics().await? {
            let metrics_listener = self.metrics_listener.take();
            let router = router::metrics_router(self.state.clone(), metrics_addr);
            let stop = token.clone();
            connections.spawn(async move {
                let Some(listener) = metrics_listener else {
                    return;
                };
                tracing::info!(listen = %metrics_addr, "serving /metrics");
                let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
                if let Err(error) = axum::serve(listener, service)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::error!(%error, "the metrics listener failed");
                }
            });
        }
        tokio::spawn({
            let token = token.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down");
                token.cancel();
            }
        });
        // Hyper for ordinary requests, direct writes for SSE/NDJSON (see `http::server`);
        // both put the peer address in `ConnectInfo` (a trusted proxy's PROXY header source
        // when there is one), from which `auth::proxy` derives the address limits count.
        let timeouts = http::server::Timeouts {
            stall: self.state.config.stall_timeout(),
            head: self.state.config.head_timeout(),
            idle: self.state.config.idle_timeout(),
        };
        http::server::serve(
            listener,
            router,
            token.clone(),
            connections.clone(),
            timeouts,
            self.state.metrics.slow_consumers.clone(),
            Arc::clone(&self.state.trusted),
        )
        .await;
        connections.close();
        // Open streams end on the token (SSE `retry`, WebSocket 1001); do not let a stuck
        // connection hold shutdown hostage.
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "grace period over; closing remaining connections");
        }
        self.tracker.close();
        let stopped = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait())
            .await
            .is_ok();
        if !stopped {
            tracing::warn!("some workers did not stop in time");
        }
        // End the server sessions and close the pooled and monitoring connections now, not
        // whenever the last handle goes (an embedder or test may keep the registry, and with
        // it the client, long after). A plain shutdown waits for every cursor to be dropped,
        // so it is bounded, and skipped for an immediate one when workers are still running.
        let client = self.state.registry.mongo().clone();
        let graceful = stopped
            && tokio::time::timeout(MONGO_SHUTDOWN_TIMEOUT, client.clone().shutdown())
                .await
                .is_ok();
        if !graceful {
            client.shutdown().immediate(true).await;
        }
        Ok(())
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // After `serve` this is a no-op; an App dropped unserved stops its watcher and workers.
        self.state.shutdown.cancel();
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
