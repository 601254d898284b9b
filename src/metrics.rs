//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! Counters are plain atomics (prometheus-client) bumped on the paths that already do work:
//! per event, per client connect/disconnect, per retry. Nothing here is per-event-per-client.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set for per-transport series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `sse`, `websocket` or `ndjson`.
    pub transport: &'static str,
}

/// Label set for the upstream-limit refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// `max_workers` or `max_bindings_per_stream`.
    pub limit: &'static str,
}

/// Label set for fetches of `auth.jwt.jwks_url`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksFetchLabel {
    /// `scheduled` (startup, cache lifetime, retry) or `unknown_kid`.
    pub trigger: &'static str,
    /// `ok` or `error` (the last good key set was kept).
    pub result: &'static str,
}

/// Every metric Streamgate exports.
pub struct Metrics {
    registry: Registry,
    /// Connected clients by transport.
    pub clients: Family<TransportLabel, Gauge>,
    /// Running workers (open or reopening cursors).
    pub workers: Gauge,
    /// Change-stream cursors opened, reconnects and catch-ups included.
    pub cursors_opened: Counter,
    /// Change events received from MongoDB.
    pub events_received: Counter,
    /// Events written to clients, summed over clients.
    pub deliveries: Counter,
    /// Clients closed with `slow_consumer`.
    pub slow_consumers: Counter,
    /// Cursor reconnect attempts after transient errors.
    pub worker_retries: Counter,
    /// Catch-up cursors opened for resumes older than a worker's ring.
    pub catchups: Counter,
    /// Clients that joined a catch-up cursor another client had opened.
    pub catchups_joined: Counter,
    /// Times a client was lapped by the live channel and read on from the ring.
    pub lag_recoveries: Counter,
    /// Changes over 16 MB replaced by `event: skipped`.
    pub oversize_skipped: Counter,
    /// Change-stream cursors holding a slot of `limits.max_workers` (workers and catch-ups).
    pub upstream_cursors: Gauge,
    /// The most cursors any one stream definition holds (against
    /// `limits.max_bindings_per_stream`): one series, whatever the number of streams.
    pub upstream_bindings_max: Gauge,
    /// Cursors refused by an upstream limit, by limit.
    pub upstream_refusals: Family<LimitLabel, Counter>,
    /// Fetches of `auth.jwt.jwks_url`, by trigger and result.
    pub jwks_fetches: Family<JwksFetchLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("streamgate");
        let clients = Family::<TransportLabel, Gauge>::default();
        registry.register("clients", "Connected clients by transport", clients.clone());
        let workers = Gauge::default();
        registry.register("workers", "Running change-stream workers", workers.clone());
        let cursors_opened = Counter::default();
        registry.register(
            "cursors_opened",
            "Change-stream cursors opened (reconnects and catch-ups included)",
            cursors_opened.clone(),
        );
        let events_received = Counter::default();
        registry.register(
            "events_received",
            "Change events received from MongoDB",
            events_received.clone(),
        );
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Events written to clients",
            deliveries.clone(),
        );
        let slow_consumers = Counter::default();
        registry.register(
            "slow_consumers",
            "Clients closed as too slow",
            slow_consumers.clone(),
        );
        let worker_retries = Counter::default();
        registry.register(
            "worker_retries",
            "Cursor reconnect attempts",
            worker_retries.clone(),
        );
        let catchups = Counter::default();
        registry.register(
            "catchups",
            "Catch-up cursors opened for old resume ids",
            catchups.clone(),
        );
        let catchups_joined = Counter::default();
        registry.register(
            "catchups_joined",
            "Clients served by a catch-up cursor another client opened",
            catchups_joined.clone(),
        );
        let lag_recoveries = Counter::default();
        registry.register(
            "lag_recoveries",
            "Clients lapped by the live channel that read on from the ring",
            lag_recoveries.clone(),
        );
        let oversize_skipped = Counter::default();
        registry.register(
            "oversize_skipped",
            "Changes over 16 MB delivered as event: skipped",
            oversize_skipped.clone(),
        );
        let upstream_cursors = Gauge::default();
        registry.register(
            "upstream_cursors",
            "Change-stream cursors open or opening, catch-ups included (bounded by limits.max_workers)",
            upstream_cursors.clone(),
        );
        let upstream_bindings_max = Gauge::default();
        registry.register(
            "upstream_bindings_max",
            "Most cursors held by one stream definition (bounded by limits.max_bindings_per_stream)",
            upstream_bindings_max.clone(),
        );
        let upstream_refusals = Family::<LimitLabel, Counter>::default();
        registry.register(
            "upstream_refusals",
            "Cursors refused by an upstream limit (answered 503)",
            upstream_refusals.clone(),
        );
        let jwks_fetches = Family::<JwksFetchLabel, Counter>::default();
        registry.register(
            "jwks_fetches",
            "Fetches of auth.jwt.jwks_url by trigger and result (errors keep the last good set)",
            jwks_fetches.clone(),
        );
        Metrics {
            registry,
            jwks_fetches,
            catchups_joined,
            lag_recoveries,
            oversize_skipped,
            clients,
            workers,
            cursors_opened,
            events_received,
            deliveries,
            slow_consumers,
            worker_retries,
            catchups,
            upstream_cursors,
            upstream_bindings_max,
            upstream_refusals,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One connected client in `streamgate_clients{transport}`: counted when made, uncounted when
/// dropped, however the stream ends.
#[must_use = "the client is uncounted as soon as the gauge is dropped"]
pub struct ClientGauge {
    metrics: std::sync::Arc<Metrics>,
    transport: &'static str,
}

impl ClientGauge {
    /// Counts a client of `transport` (`sse`, `websocket`, `ndjson`).
    pub fn new(metrics: std::sync::Arc<Metrics>, transport: &'static str) -> ClientGauge {
        metrics
            .clients
            .get_or_create(&TransportLabel { transport })
            .inc();
        ClientGauge { metrics, transport }
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.metrics
            .clients
            .get_or_create(&TransportLabel {
                transport: self.transport,
            })
            .dec();
    }
}
