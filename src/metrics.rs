//! Prometheus metrics, served at `GET /metrics`: the Prometheus text format (0.0.4), or
//! OpenMetrics when the scraper asks for it in `Accept`.
//!
//! Counters are plain atomics (prometheus-client) bumped on the paths that already do work:
//! per event, per client connect/disconnect, per retry, per written batch. The one figure
//! taken per event per client, the delivery latency, is an atomic add into a fixed bucket
//! ([`LatencyHistogram`]), not a lock.
//!
//! Two figures answer "is it behind?":
//! - `streamgate_delivery_latency_seconds` (histogram): from the change in MongoDB (its
//!   `wallTime`, else its cluster time's second) to the batch holding it being handed to the
//!   client's socket (after the WebSocket flush; for SSE/NDJSON as the batch leaves the feed
//!   for the socket writer, which pulls it only once the previous batch is written).
//! - `streamgate_worker_lag_seconds{stream}` (gauge, computed at scrape time): for each stream,
//!   the worst of its workers' `now − the oplog time it has read through` (the `wallTime` of its
//!   last change, or the moment an empty batch, with its post-batch token, showed it at the
//!   head of the oplog). A worker that cannot read (MongoDB down, cursor lost) climbs by one
//!   second per second. At most [`MAX_LAG_SERIES`] streams get their own series (the most
//!   behind); the others are folded into `stream="_other"`, so cardinality is bounded whatever
//!   the number of definitions, and bound variables never become labels.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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

/// Label set for per-stream series (the stream's path; never its bound variables).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    /// `/{db}/{coll}/_streams/{name}`, or `_other` for the streams past [`MAX_LAG_SERIES`].
    pub stream: String,
}

/// Most `streamgate_worker_lag_seconds` series; the rest are folded into `stream="_other"`.
pub const MAX_LAG_SERIES: usize = 100;

/// Upper bounds (seconds) of the delivery-latency buckets: milliseconds on a healthy loopback
/// up to minutes for a client resuming from far behind.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram of latencies with fixed buckets, lock-free: an observation is two relaxed atomic
/// adds and a bucket search (prometheus-client's histogram takes a mutex per observation,
/// which every client's writer would contend on).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of observations, in microseconds.
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Records one latency given in milliseconds.
    pub fn observe_ms(&self, ms: u64) {
        let seconds = ms as f64 / 1000.0;
        let bucket = LATENCY_BUCKETS.partition_point(|upper| *upper < seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(ms.saturating_mul(1000), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// The registry's handle on a [`LatencyHistogram`] the feeds also hold.
#[derive(Debug)]
struct Shared(Arc<LatencyHistogram>);

impl EncodeMetric for Shared {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let histogram = &self.0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(histogram.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Where the lag gauge finds the workers: the stream registry, bound after the metrics exist.
pub trait LagSource: Send + Sync {
    /// `(stream path, seconds behind)` for every running worker.
    fn lags(&self, now_ms: u64) -> Vec<(String, f64)>;
}

/// Computes `streamgate_worker_lag_seconds` at scrape time.
#[derive(Default)]
struct LagCollector {
    source: OnceLock<Weak<dyn LagSource>>,
}

impl std::fmt::Debug for LagCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LagCollector")
    }
}

/// Per stream the worst lag of its workers, the [`MAX_LAG_SERIES`] most behind by name, the
/// rest as one `_other` series.
fn lag_series(mut lags: Vec<(String, f64)>) -> Vec<(String, f64)> {
    lags.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    lags.dedup_by(|later, kept| later.0 == kept.0);
    lags.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if lags.len() > MAX_LAG_SERIES {
        let worst_rest = lags[MAX_LAG_SERIES].1;
        lags.truncate(MAX_LAG_SERIES);
        lags.push(("_other".to_owned(), worst_rest));
    }
    lags
}

impl Collector for LagCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let lags = self
            .source
            .get()
            .and_then(Weak::upgrade)
            .map(|source| source.lags(now_ms()))
            .unwrap_or_default();
        let mut metric = encoder.encode_descriptor(
            "worker_lag_seconds",
            "Seconds each stream's most-behind worker trails the oplog (now minus the wallTime of \
             its last change, or of its last empty batch at the head)",
            None,
            MetricType::Gauge,
        )?;
        for (stream, lag) in lag_series(lags) {
            let labels = StreamLabel { stream };
            ConstGauge::new(lag).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Unix time in milliseconds (0 before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every metric Streamgate exports.
pub struct Metrics {
    registry: Registry,
    /// Connected clients by transport.
    pub clients: Family<TransportLabel, Gauge>,
    /// Running workers (open or reopening cursors).
    pub workers: Gauge,
    /// Running database feeds (one shared cursor each, see `worker::feed`).
    pub database_feeds: Gauge,
    /// Database feed members moved to a cursor of their own because their `$match` failed on
    /// a change (the feed's other members went on).
    pub database_feed_isolations: Counter,
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
    /// Catch-up cursors opened on MongoDB for resumes older than a worker's ring (in relay
    /// mode, those the retained window could not serve: `relay.window_catchups`).
    pub catchups: Counter,
    /// Clients that joined a catch-up cursor another client had opened.
    pub catchups_joined: Counter,
    /// Times a client was lapped by the live channel and read on from the ring.
    pub lag_recoveries: Counter,
    /// Catch-up readers let go because they fell a whole catch-up ring behind a reader waiting at
    /// its head.
    pub catchup_readers_detached: Counter,
    /// Changes over 16 MB replaced by `event: skipped`.
    pub oversize_skipped: Counter,
    /// Updates and replaces on membership streams (PROTOCOL.md §10) that came without a
    /// pre-image, so only their post-image decided who got them.
    pub membership_without_pre_image: Counter,
    /// Workers of membership streams that started on a collection without pre-images.
    pub membership_pre_images_off: Counter,
    /// Change-stream cursors holding a slot of `limits.max_workers` (workers and catch-ups).
    pub upstream_cursors: Gauge,
    /// The most cursors any one stream definition holds (against
    /// `limits.max_bindings_per_stream`): one series, whatever the number of streams.
    pub upstream_bindings_max: Gauge,
    /// Cursors refused by an upstream limit, by limit.
    pub upstream_refusals: Family<LimitLabel, Counter>,
    /// Idle workers (no clients, lingering) closed early to give their cursor slot to a new
    /// subscriber.
    pub upstream_idle_evictions: Counter,
    /// Fetches of `auth.jwt.jwks_url`, by trigger and result.
    pub jwks_fetches: Family<JwksFetchLabel, Counter>,
    /// Subscriptions refused by a connection limit (429), by limit.
    pub connection_refusals: Family<LimitLabel, Counter>,
    /// Change → socket latency of every change written to a client.
    pub delivery_latency: Arc<LatencyHistogram>,
    /// Bytes of events written to clients, by transport.
    pub bytes_written: Family<TransportLabel, Counter>,
    /// Snapshots started (`snapshot=true` and the document view's first `put`).
    pub snapshots: Counter,
    /// Snapshot scans holding a slot of `snapshot_max_scans` now (one per batch being read).
    pub snapshot_scans_active: Gauge,
    /// Bytes of snapshot events queued for clients' sockets, all connections together (each
    /// bounded by `snapshot_queue_bytes`).
    pub snapshot_queued_bytes: Gauge,
    /// The relay tier (`[relay]`; zero without it).
    pub relay: RelayMetrics,
    lag: Arc<LagCollector>,
}

/// Label of relay errors: what failed (`connect`, `publish`, `consume`, `lease`, `read`,
/// `window`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayErrorLabel {
    /// The operation.
    pub op: &'static str,
}

/// Metrics of the relay tier (`src/relay`).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Workers whose MongoDB cursor this instance holds for the whole fleet.
    pub owned_cursors: Gauge,
    /// Cursor leases this instance took (first owner or takeover).
    pub takeovers: Counter,
    /// Messages this instance published to JetStream (changes and positions).
    pub published: Counter,
    /// Members of a database feed whose log stood far behind and that this instance, owning
    /// the feed, brought up to date on a cursor of their own before they joined it.
    pub feed_catch_ups: Counter,
    /// JetStream errors, by operation.
    pub errors: Family<RelayErrorLabel, Counter>,
    /// MongoDB cluster time (`wallTime`) → acknowledged by JetStream, per change published.
    pub publish_lag: Arc<LatencyHistogram>,
    /// Published by the owner → applied to this instance's hub, per change.
    pub delivery_lag: Arc<LatencyHistogram>,
    /// Catch-ups (resumes older than a worker's ring) read from JetStream's retained window
    /// instead of a MongoDB cursor (those count in `catchups`).
    pub window_catchups: Counter,
    /// Relayed changes this instance applied as it published them as owner, without waiting
    /// for JetStream to deliver them back.
    pub applied_as_owner: Counter,
}

impl RelayMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "relay_owned_cursors",
            "Workers whose MongoDB cursor this instance holds for the fleet (relay mode)",
            self.owned_cursors.clone(),
        );
        registry.register(
            "relay_takeovers",
            "Cursor leases this instance took (first owner or takeover)",
            self.takeovers.clone(),
        );
        registry.register(
            "relay_published",
            "Messages this instance published to JetStream",
            self.published.clone(),
        );
        registry.register(
            "relay_feed_catch_ups",
            "Database feed members brought up to date on a cursor of their own before joining",
            self.feed_catch_ups.clone(),
        );
        registry.register(
            "relay_errors",
            "JetStream errors, by operation",
            self.errors.clone(),
        );
        registry.register(
            "relay_publish_lag_seconds",
            "MongoDB cluster time to JetStream acknowledgement, per relayed change",
            Shared(Arc::clone(&self.publish_lag)),
        );
        registry.register(
            "relay_delivery_lag_seconds",
            "Owner's publish to this instance's hub, per relayed change",
            Shared(Arc::clone(&self.delivery_lag)),
        );
        registry.register(
            "relay_window_catchups",
            "Catch-ups for old resume ids read from JetStream's retained window instead of a MongoDB cursor",
            self.window_catchups.clone(),
        );
        registry.register(
            "relay_applied_as_owner",
            "Relayed changes this instance applied as it published them as owner (not read back from JetStream)",
            self.applied_as_owner.clone(),
        );
        for op in ["connect", "publish", "consume", "lease", "read", "window"] {
            let _ = self.errors.get_or_create(&RelayErrorLabel { op });
        }
    }

    /// Counts a JetStream error of `op`.
    pub fn error(&self, op: &'static str) {
        self.errors.get_or_create(&RelayErrorLabel { op }).inc();
    }
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
        let database_feeds = Gauge::default();
        registry.register(
            "database_feeds",
            "Running database feeds: change-stream cursors shared by the workers of a database",
            database_feeds.clone(),
        );
        let database_feed_isolations = Counter::default();
        registry.register(
            "database_feed_isolations",
            "Database feed members moved to a cursor of their own because their $match failed on a change",
            database_feed_isolations.clone(),
        );
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
            "Catch-up cursors opened on MongoDB for old resume ids",
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
        let catchup_readers_detached = Counter::default();
        registry.register(
            "catchup_readers_detached",
            "Catch-up readers that fell a whole catch-up ring behind a waiting reader and were let go so the others could go on",
            catchup_readers_detached.clone(),
        );
        let oversize_skipped = Counter::default();
        registry.register(
            "oversize_skipped",
            "Changes over 16 MB delivered as event: skipped",
            oversize_skipped.clone(),
        );
        let membership_without_pre_image = Counter::default();
        registry.register(
            "membership_without_pre_image",
            "Updates and replaces on streams that decide membership (entries, removals) that came without a pre-image: decided by the post-image alone",
            membership_without_pre_image.clone(),
        );
        let membership_pre_images_off = Counter::default();
        registry.register(
            "membership_pre_images_off",
            "Workers of membership streams that started on a collection without changeStreamPreAndPostImages (see the log for the collMod to run)",
            membership_pre_images_off.clone(),
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
        let upstream_idle_evictions = Counter::default();
        registry.register(
            "upstream_idle_evictions",
            "Idle workers (no clients, lingering) closed early to give their cursor slot to a new subscriber",
            upstream_idle_evictions.clone(),
        );
        let jwks_fetches = Family::<JwksFetchLabel, Counter>::default();
        registry.register(
            "jwks_fetches",
            "Fetches of auth.jwt.jwks_url by trigger and result (errors keep the last good set)",
            jwks_fetches.clone(),
        );
        let connection_refusals = Family::<LimitLabel, Counter>::default();
        registry.register(
            "connection_refusals",
            "Subscriptions refused by a connection limit (answered 429)",
            connection_refusals.clone(),
        );
        let delivery_latency = Arc::new(LatencyHistogram::default());
        registry.register(
            "delivery_latency_seconds",
            "Seconds from a change in MongoDB (wallTime) to its bytes handed to a client's socket",
            Shared(Arc::clone(&delivery_latency)),
        );
        let bytes_written = Family::<TransportLabel, Counter>::default();
        registry.register(
            "bytes_written",
            "Bytes of events written to clients",
            bytes_written.clone(),
        );
        let snapshots = Counter::default();
        registry.register(
            "snapshots",
            "Snapshots started (snapshot=true and the document view)",
            snapshots.clone(),
        );
        let snapshot_scans_active = Gauge::default();
        registry.register(
            "snapshot_scans_active",
            "Snapshot scans holding a slot of snapshot_max_scans now (one per batch being read)",
            snapshot_scans_active.clone(),
        );
        let snapshot_queued_bytes = Gauge::default();
        registry.register(
            "snapshot_queued_bytes",
            "Bytes of snapshot events queued for clients' sockets, all connections together",
            snapshot_queued_bytes.clone(),
        );
        // Every known label value exists from the start (at 0), so a dashboard's rate() has a
        // series before the first refusal or the first client of a transport.
        for limit in [
            "max_connections",
            "per_stream",
            "per_user",
            "per_ip",
            "new_bindings_per_minute",
        ] {
            let _ = connection_refusals.get_or_create(&LimitLabel { limit });
        }
        for limit in ["max_workers", "max_bindings_per_stream"] {
            let _ = upstream_refusals.get_or_create(&LimitLabel { limit });
        }
        for transport in ["sse", "websocket", "ndjson"] {
            let _ = clients.get_or_create(&TransportLabel { transport });
            let _ = bytes_written.get_or_create(&TransportLabel { transport });
        }
        let lag = Arc::new(LagCollector::default());
        registry.register_collector(Box::new(Arc::clone(&lag)));
        let relay = RelayMetrics::default();
        relay.register(&mut registry);
        Metrics {
            relay,
            registry,
            jwks_fetches,
            connection_refusals,
            delivery_latency,
            bytes_written,
            snapshots,
            snapshot_scans_active,
            snapshot_queued_bytes,
            lag,
            catchups_joined,
            lag_recoveries,
            catchup_readers_detached,
            oversize_skipped,
            membership_without_pre_image,
            membership_pre_images_off,
            clients,
            workers,
            database_feeds,
            database_feed_isolations,
            cursors_opened,
            events_received,
            deliveries,
            slow_consumers,
            worker_retries,
            catchups,
            upstream_cursors,
            upstream_bindings_max,
            upstream_refusals,
            upstream_idle_evictions,
        }
    }

    /// Lets the lag gauge read `source`'s workers (the registry, once it exists).
    pub fn watch_workers(&self, source: Weak<dyn LagSource>) {
        let _ = self.lag.source.set(source);
    }

    /// OpenMetrics text exposition (`application/openmetrics-text; version=1.0.0`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Prometheus text exposition (`text/plain; version=0.0.4`), what `promtool check metrics`
    /// and most scrapers read: counters are described under their `_total` sample names,
    /// without OpenMetrics' `# UNIT` and `# EOF` lines.
    pub fn render_text(&self) -> String {
        openmetrics_to_text(&self.render())
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4. OpenMetrics names a counter family
/// `x` and its sample `x_total`; the older format has no families, so `# HELP`/`# TYPE` must
/// name `x_total` itself. Everything else is the same in both.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((_, text)) = help.take() {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_describes_counters_by_their_total_names() {
        let metrics = Metrics::new();
        metrics.deliveries.inc_by(3);
        let text = metrics.render_text();
        assert!(text.contains("# HELP streamgate_deliveries_total Events written to clients"));
        assert!(text.contains("# TYPE streamgate_deliveries_total counter\n"));
        assert!(text.contains("\nstreamgate_deliveries_total 3\n"));
        assert!(text.contains("# TYPE streamgate_workers gauge\n"));
        assert!(!text.contains("# EOF"));
        assert!(text.contains("streamgate_upstream_refusals_total{limit=\"max_workers\"} 0\n"));
        assert!(text.contains("streamgate_clients{transport=\"ndjson\"} 0\n"));
        assert!(metrics.render().ends_with("# EOF\n"));
    }

    #[test]
    fn latency_histogram_buckets_are_cumulative_with_sum_and_count() {
        let metrics = Metrics::new();
        for ms in [0, 4, 40, 40, 700_000] {
            metrics.delivery_latency.observe_ms(ms);
        }
        let text = metrics.render_text();
        for line in [
            "# TYPE streamgate_delivery_latency_seconds histogram",
            "streamgate_delivery_latency_seconds_count 5",
            "streamgate_delivery_latency_seconds_sum 700.084",
            "streamgate_delivery_latency_seconds_bucket{le=\"0.001\"} 1",
            "streamgate_delivery_latency_seconds_bucket{le=\"0.005\"} 2",
            "streamgate_delivery_latency_seconds_bucket{le=\"0.05\"} 4",
            "streamgate_delivery_latency_seconds_bucket{le=\"300.0\"} 4",
            "streamgate_delivery_latency_seconds_bucket{le=\"+Inf\"} 5",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    struct Fixed(Vec<(String, f64)>);

    impl LagSource for Fixed {
        fn lags(&self, _: u64) -> Vec<(String, f64)> {
            self.0.clone()
        }
    }

    #[test]
    fn lag_is_the_worst_worker_per_stream_with_bounded_series() {
        let metrics = Metrics::new();
        let mut lags = vec![
            ("/d/c/_streams/a".to_owned(), 1.5),
            ("/d/c/_streams/a".to_owned(), 7.0),
        ];
        lags.extend((0..MAX_LAG_SERIES + 10).map(|i| (format!("/d/c/_streams/s{i}"), 0.25)));
        let source: Arc<dyn LagSource> = Arc::new(Fixed(lags));
        metrics.watch_workers(Arc::downgrade(&source));
        let text = metrics.render_text();
        assert!(
            text.contains("streamgate_worker_lag_seconds{stream=\"/d/c/_streams/a\"} 7.0\n"),
            "{text}"
        );
        let series = text
            .lines()
            .filter(|l| l.starts_with("streamgate_worker_lag_seconds{"))
            .count();
        assert_eq!(series, MAX_LAG_SERIES + 1);
        assert!(text.contains("streamgate_worker_lag_seconds{stream=\"_other\"} 0.25"));
    }
}
