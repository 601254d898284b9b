//! Connection limits: in total, per stream, per user and per client IP.
//!
//! A subscribe request takes a [`Permit`] before its subscription (and so before any worker)
//! starts; the permit travels inside the client's `Feed` and gives its slot back when dropped,
//! whichever way the stream ends (client gone, shutdown, terminal event, failed upgrade).
//! Over a limit the request is refused at once ([`ConnectionRefused`], which the HTTP layer
//! answers 429 with `Retry-After`): nothing waits.
//!
//! All counters sit behind one mutex so a permit is taken or refused atomically across the
//! four dimensions. It is held for a few map operations per connect/disconnect, which is
//! negligible next to the cost of a connection; only dimensions with a limit are counted, and
//! entries are removed at zero so the maps hold only live keys.
//!
//! # Upstream work (PROTOCOL.md §9)
//!
//! Clients are cheap; MongoDB cursors are not: each one holds a pooled connection during its
//! `getMore`. [`CursorBudget`] bounds them with `limits.max_workers` (all cursors, catch-ups
//! included) and `limits.max_bindings_per_stream` (cursors of one definition, one per binding
//! of variables that cannot be routed in-process). A cursor takes a [`CursorPermit`] before it
//! opens and holds it for its life (reconnects included); refusals are [`UpstreamLimit`]s,
//! answered 503 with `Retry-After`. [`PoolSize`] sizes the driver's pool from the same limit,
//! so that no cursor waits for a connection.
//!
//! # Fairness of the budget
//!
//! The budget serves clients that are connected. A worker whose clients left keeps its cursor
//! for `worker_linger_ms` (a client that comes back finds it warm), but that slot is on loan:
//! a subscriber that would be refused takes it (the registry closes the longest-idle such
//! worker first, under its worker-map lock, so a client re-attaching at that moment keeps its
//! worker; see `streams::registry`). What one party can still do is churn: open distinct
//! bindings (each a new cursor on MongoDB) one after the other. `BindingRate` bounds that per
//! principal (the user when authenticated, else the client address): at most
//! `limits.new_bindings_per_minute` new bindings a minute (a token bucket of
//! `limits.new_bindings_burst` tokens refilled evenly at that rate); past it a subscribe that would start a binding gets 429 with
//! `Retry-After` ([`BindingsRefused`]), while joining a running binding is never refused.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::LimitsConfig;
use crate::metrics::{LimitLabel, Metrics};
use crate::spec::StreamKey;

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// `max_connections`.
    Total,
    /// `per_stream`.
    Stream,
    /// `per_user`.
    User,
    /// `per_ip`.
    Ip,
}

impl LimitExceeded {
    /// The config key of the limit.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitExceeded::Total => "max_connections",
            LimitExceeded::Stream => "per_stream",
            LimitExceeded::User => "per_user",
            LimitExceeded::Ip => "per_ip",
        }
    }
}

/// A connection refused by a limit: which one, and when to try again. The HTTP layer answers
/// it 429 with `Retry-After` and a problem body naming the limit (`http::error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection limit reached ({}); retry later", self.limit.as_str())]
pub struct ConnectionRefused {
    /// Which limit.
    pub limit: LimitExceeded,
    /// `limits.retry_after_secs`, for `Retry-After`.
    pub retry_after_secs: u64,
}

#[derive(Default)]
struct Counters {
    total: usize,
    per_stream: HashMap<StreamKey, usize>,
    per_user: HashMap<String, usize>,
    per_ip: HashMap<IpAddr, usize>,
}

/// The limits in force and the connections they count.
pub struct Limits {
    config: LimitsConfig,
    counters: Mutex<Counters>,
}

/// One open stream's slot; dropping it frees the slot.
#[must_use = "the slot is freed as soon as the permit is dropped"]
pub struct Permit {
    limits: Arc<Limits>,
    stream: Option<StreamKey>,
    user: Option<String>,
    ip: Option<IpAddr>,
    /// Counted in `max_connections` (a connection's permit; a snapshot's is not).
    total: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("stream", &self.stream)
            .field("user", &self.user)
            .field("ip", &self.ip)
            .finish()
    }
}

impl Limits {
    /// Limits from `[limits]`.
    pub fn new(config: LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits {
            config,
            counters: Mutex::new(Counters::default()),
        })
    }

    /// Open streams counted now (when `max_connections` is set; 0 otherwise).
    pub fn open(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // The counters stay consistent even if a holder panicked: every update is one step.
        crate::sync::lock(&self.counters)
    }

    /// Takes a slot for a stream of `stream` opened by `user` (if authenticated) from `ip`.
    pub fn try_acquire(
        self: &Arc<Self>,
        stream: &StreamKey,
        user: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<Permit, LimitExceeded> {
        self.take(Some(stream), true, user, ip)
    }

    /// Takes a slot for a snapshot in progress (PROTOCOL.md §6) of `user` from `ip`: it counts
    /// against `per_user` and `per_ip` like one more connection of theirs, so a principal runs
    /// at most that many snapshots at once (beside its connections). Not against
    /// `max_connections` or `per_stream`: the server's own scan slots bound those.
    pub fn try_acquire_snapshot(
        self: &Arc<Self>,
        user: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<Permit, LimitExceeded> {
        self.take(None, false, user, ip)
    }

    fn take(
        self: &Arc<Self>,
        stream: Option<&StreamKey>,
        total: bool,
        user: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<Permit, LimitExceeded> {
        let config = &self.config;
        let stream = config.per_stream.and(stream).cloned();
        let user = config
            .per_user
            .and(user)
            .filter(|u| !u.is_empty())
            .map(str::to_owned);
        let ip = config.per_ip.and(ip);

        let mut counters = self.lock();
        let full = |count: usize, limit: Option<usize>| limit.is_some_and(|l| count >= l);
        if total && full(counters.total, config.max_connections) {
            return Err(LimitExceeded::Total);
        }
        if let Some(key) = &stream
            && full(count(&counters.per_stream, key), config.per_stream)
        {
            return Err(LimitExceeded::Stream);
        }
        if let Some(key) = &user
            && full(count(&counters.per_user, key), config.per_user)
        {
            return Err(LimitExceeded::User);
        }
        if let Some(key) = &ip
            && full(count(&counters.per_ip, key), config.per_ip)
        {
            return Err(LimitExceeded::Ip);
        }
        if total {
            counters.total += 1;
        }
        if let Some(key) = &stream {
            *counters.per_stream.entry(key.clone()).or_default() += 1;
        }
        if let Some(key) = &user {
            *counters.per_user.entry(key.clone()).or_default() += 1;
        }
        if let Some(key) = ip {
            *counters.per_ip.entry(key).or_default() += 1;
        }
        drop(counters);
        Ok(Permit {
            limits: Arc::clone(self),
            stream,
            user,
            ip,
            total,
        })
    }

    /// The refusal of a connection over `exceeded`, with the `Retry-After` to send.
    pub fn refusal(&self, exceeded: LimitExceeded) -> ConnectionRefused {
        ConnectionRefused {
            limit: exceeded,
            retry_after_secs: self.config.retry_after_secs,
        }
    }
}

fn count<K: Eq + Hash>(map: &HashMap<K, usize>, key: &K) -> usize {
    map.get(key).copied().unwrap_or(0)
}

fn release<K: Eq + Hash>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counters = self.limits.lock();
        if self.total {
            counters.total = counters.total.saturating_sub(1);
        }
        if let Some(key) = &self.stream {
            release(&mut counters.per_stream, key);
        }
        if let Some(key) = &self.user {
            release(&mut counters.per_user, key);
        }
        if let Some(key) = &self.ip {
            release(&mut counters.per_ip, key);
        }
    }
}

/// Which upstream limit refused a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorLimit {
    /// `max_workers`: cursors in total, catch-ups included.
    MaxWorkers,
    /// `max_bindings_per_stream`: cursors of one stream definition.
    MaxBindingsPerStream,
}

impl CursorLimit {
    /// The config key of the limit (also the problem body's `limit` and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            CursorLimit::MaxWorkers => "max_workers",
            CursorLimit::MaxBindingsPerStream => "max_bindings_per_stream",
        }
    }
}

/// A cursor refused by an upstream limit. Subscribe answers it 503 with `Retry-After` and a
/// problem body naming the limit (`From<UpstreamLimit> for ApiError` in `http::error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct UpstreamLimit {
    /// Which limit.
    pub limit: CursorLimit,
    /// Its configured value.
    pub max: usize,
    /// The stream whose cursor was refused (`None` for a catch-up).
    pub stream: Option<StreamKey>,
    /// `limits.retry_after_secs`, for `Retry-After`.
    pub retry_after_secs: u64,
}

impl UpstreamLimit {
    fn describe(&self) -> String {
        match (self.limit, &self.stream) {
            (CursorLimit::MaxBindingsPerStream, Some(stream)) => format!(
                "upstream limit reached (max_bindings_per_stream): {stream} already holds {} \
                 change-stream cursors, one per distinct set of variable values; retry later",
                self.max
            ),
            (limit, _) => format!(
                "upstream limit reached ({}): this instance already holds {} MongoDB \
                 change-stream cursors; retry later",
                limit.as_str(),
                self.max
            ),
        }
    }
}

#[derive(Default)]
struct CursorCounts {
    total: usize,
    /// Cursors per stream definition (catch-ups not counted); entries removed at zero.
    per_stream: HashMap<StreamKey, usize>,
    /// The largest value in `per_stream` (the `upstream_bindings_max` gauge).
    max_per_stream: usize,
}

struct BudgetInner {
    max_workers: usize,
    max_bindings: usize,
    /// `limits.idle_bindings_per_principal` (0: unbounded).
    idle_bindings_per_principal: usize,
    retry_after_secs: u64,
    counts: Mutex<CursorCounts>,
    cursors_gauge: Gauge,
    bindings_gauge: Gauge,
    refusals: Family<LimitLabel, Counter>,
    evictions: Counter,
    /// New bindings per principal (`limits.new_bindings_per_minute`).
    binding_rate: BindingRate,
}

impl BudgetInner {
    fn lock(&self) -> MutexGuard<'_, CursorCounts> {
        // Every update is one consistent step, so a poisoned lock's data is still valid.
        crate::sync::lock(&self.counts)
    }

    /// Publishes the counts; called under the lock so the gauges never go backwards in time.
    fn publish(&self, counts: &CursorCounts) {
        self.cursors_gauge
            .set(i64::try_from(counts.total).unwrap_or(i64::MAX));
        self.bindings_gauge
            .set(i64::try_from(counts.max_per_stream).unwrap_or(i64::MAX));
    }

    fn refuse(&self, limit: CursorLimit, stream: Option<&StreamKey>) -> UpstreamLimit {
        self.refusals
            .get_or_create(&LimitLabel {
                limit: limit.as_str(),
            })
            .inc();
        let max = match limit {
            CursorLimit::MaxWorkers => self.max_workers,
            CursorLimit::MaxBindingsPerStream => self.max_bindings,
        };
        tracing::debug!(limit = limit.as_str(), max, stream = ?stream, "cursor refused");
        UpstreamLimit {
            limit,
            max,
            stream: stream.cloned(),
            retry_after_secs: self.retry_after_secs,
        }
    }
}

/// The budget of MongoDB change-stream cursors. Cheap to clone (one shared budget).
///
/// A worker takes [`try_acquire`](Self::try_acquire) before it opens its cursor and keeps the
/// permit for its whole life (reconnects and linger included); a catch-up cursor takes
/// [`try_acquire_catch_up`](Self::try_acquire_catch_up) and keeps it until it hands over. Both
/// are refused at once, never queued: a refusal is cheaper for everyone than a wait.
#[derive(Clone)]
pub struct CursorBudget {
    inner: Arc<BudgetInner>,
}

/// One cursor's slot in the [`CursorBudget`]; dropping it frees the slot.
#[must_use = "the cursor's slot is freed as soon as the permit is dropped"]
pub struct CursorPermit {
    budget: Arc<BudgetInner>,
    /// The stream it counts against (`None`: a catch-up, counted in the total only).
    stream: Option<StreamKey>,
}

impl std::fmt::Debug for CursorPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CursorPermit")
            .field("stream", &self.stream)
            .finish()
    }
}

impl CursorBudget {
    /// A budget with `[limits]`'s `max_workers` and `max_bindings_per_stream`, reporting to the
    /// `upstream_*` metrics.
    pub fn new(limits: &LimitsConfig, metrics: &Metrics) -> CursorBudget {
        CursorBudget {
            inner: Arc::new(BudgetInner {
                max_workers: limits.max_workers,
                max_bindings: limits.max_bindings_per_stream,
                idle_bindings_per_principal: limits.idle_bindings_per_principal,
                retry_after_secs: limits.retry_after_secs,
                counts: Mutex::new(CursorCounts::default()),
                cursors_gauge: metrics.upstream_cursors.clone(),
                bindings_gauge: metrics.upstream_bindings_max.clone(),
                refusals: metrics.upstream_refusals.clone(),
                evictions: metrics.upstream_idle_evictions.clone(),
                binding_rate: BindingRate::new(
                    limits.new_bindings_per_minute,
                    limits.new_bindings_burst,
                    metrics
                        .connection_refusals
                        .get_or_create(&LimitLabel {
                            limit: BindingsRefused::LIMIT,
                        })
                        .clone(),
                ),
            }),
        }
    }

    /// Takes one of `principal`'s new bindings (`limits.new_bindings_per_minute`), or says when
    /// to try again. Give it back with [`refund_binding`](Self::refund_binding) if the binding
    /// is not started after all.
    pub fn take_binding(&self, principal: &PrincipalKey) -> Result<(), BindingsRefused> {
        self.inner.binding_rate.take(principal, Instant::now())
    }

    /// How many lingering bindings a principal may leave (`limits.idle_bindings_per_principal`;
    /// `None`: unbounded).
    pub fn idle_bindings_per_principal(&self) -> Option<usize> {
        Some(self.inner.idle_bindings_per_principal).filter(|n| *n > 0)
    }

    /// Gives back a binding taken by [`take_binding`](Self::take_binding) whose worker was not
    /// started (its cursor was refused).
    pub fn refund_binding(&self, principal: &PrincipalKey) {
        self.inner.binding_rate.refund(principal, Instant::now());
    }

    /// A slot for a worker's cursor on `stream`: one of `max_workers` and one of the stream's
    /// `max_bindings_per_stream`.
    pub fn try_acquire(&self, stream: &StreamKey) -> Result<CursorPermit, UpstreamLimit> {
        self.try_acquire_evicting(stream, |_| false)
    }

    /// [`try_acquire`](Self::try_acquire), but before refusing, asks `evict` to free a slot
    /// (it returns whether it did, by dropping an idle worker's permit) and tries again.
    /// `evict` is told which limit is in the way: for `MaxBindingsPerStream` only a cursor of
    /// `stream` can help; for `MaxWorkers` any. It runs without the budget's lock held.
    pub fn try_acquire_evicting(
        &self,
        stream: &StreamKey,
        mut evict: impl FnMut(CursorLimit) -> bool,
    ) -> Result<CursorPermit, UpstreamLimit> {
        loop {
            match self.take(stream) {
                Ok(permit) => return Ok(permit),
                Err(limit) if evict(limit) => continue,
                Err(limit) => return Err(self.inner.refuse(limit, Some(stream))),
            }
        }
    }

    /// A worker slot, or the limit in the way (the stream's own first: then only one of its
    /// cursors can make room).
    fn take(&self, stream: &StreamKey) -> Result<CursorPermit, CursorLimit> {
        let inner = &self.inner;
        let mut counts = inner.lock();
        let bindings = counts.per_stream.get(stream).copied().unwrap_or(0);
        if bindings >= inner.max_bindings {
            return Err(CursorLimit::MaxBindingsPerStream);
        }
        if counts.total >= inner.max_workers {
            return Err(CursorLimit::MaxWorkers);
        }
        counts.total += 1;
        counts.per_stream.insert(stream.clone(), bindings + 1);
        counts.max_per_stream = counts.max_per_stream.max(bindings + 1);
        inner.publish(&counts);
        drop(counts);
        Ok(CursorPermit {
            budget: Arc::clone(inner),
            stream: Some(stream.clone()),
        })
    }

    /// A slot for a catch-up cursor: one of `max_workers`, but no binding (it serves clients
    /// of an existing worker and ends when they hand over to it).
    pub fn try_acquire_catch_up(&self) -> Result<CursorPermit, UpstreamLimit> {
        self.try_acquire_catch_up_evicting(|| false)
    }

    /// [`try_acquire_catch_up`](Self::try_acquire_catch_up), but before refusing, asks `evict`
    /// to free a slot of `max_workers` (see [`try_acquire_evicting`](Self::try_acquire_evicting)).
    pub fn try_acquire_catch_up_evicting(
        &self,
        mut evict: impl FnMut() -> bool,
    ) -> Result<CursorPermit, UpstreamLimit> {
        let inner = &self.inner;
        loop {
            let mut counts = inner.lock();
            if counts.total < inner.max_workers {
                counts.total += 1;
                inner.publish(&counts);
                drop(counts);
                return Ok(CursorPermit {
                    budget: Arc::clone(inner),
                    stream: None,
                });
            }
            drop(counts);
            if !evict() {
                return Err(inner.refuse(CursorLimit::MaxWorkers, None));
            }
        }
    }

    /// Cursors holding a slot now.
    pub fn in_use(&self) -> usize {
        self.inner.lock().total
    }

    /// Worker cursors `stream` holds now.
    pub fn bindings(&self, stream: &StreamKey) -> usize {
        self.inner
            .lock()
            .per_stream
            .get(stream)
            .copied()
            .unwrap_or(0)
    }
}

impl CursorPermit {
    /// Frees the slot of an idle worker closed to make room for a new cursor, counting it
    /// (`streamgate_upstream_idle_evictions_total`).
    pub fn evicted(self) {
        self.budget.evictions.inc();
    }
}

impl Drop for CursorPermit {
    fn drop(&mut self) {
        let budget = &self.budget;
        let mut counts = budget.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(stream) = &self.stream {
            let before = count(&counts.per_stream, stream);
            release(&mut counts.per_stream, stream);
            // Only the stream at the maximum can lower it: rescan then (rare, O(streams)).
            if before == counts.max_per_stream {
                counts.max_per_stream = counts.per_stream.values().copied().max().unwrap_or(0);
            }
        }
        budget.publish(&counts);
    }
}

/// Who new bindings are counted against: the authenticated user (see
/// `auth::Principal::limit_key`), else the client's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PrincipalKey {
    /// An authenticated principal, by its limit key.
    User(String),
    /// An anonymous client, by address (behind trusted proxies, the one they vouch for).
    Ip(IpAddr),
}

/// A subscribe that would start a new binding, refused by `limits.new_bindings_per_minute`.
/// The HTTP layer answers it 429 with `Retry-After` and a problem body naming the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "too many new bindings (new_bindings_per_minute): this client may start {per_minute} \
     distinct bindings of `$var` values that need a cursor of their own a minute \
     (new_bindings_burst at once), and has; retry in {retry_after_secs} s"
)]
pub struct BindingsRefused {
    /// The configured `new_bindings_per_minute`.
    pub per_minute: usize,
    /// Seconds until one more binding is allowed.
    pub retry_after_secs: u64,
}

impl BindingsRefused {
    /// The config key (the problem body's `limit` and the metric label).
    pub const LIMIT: &'static str = "new_bindings_per_minute";
}

/// A principal's allowance of new bindings: a token bucket holding up to `burst` tokens,
/// refilled at `per_minute` a minute.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// `limits.new_bindings_per_minute`, per principal. One mutex: it is taken only when a
/// subscribe would start a new binding's cursor, which costs far more.
struct BindingRate {
    per_minute: usize,
    /// The bucket's size: new bindings allowed at once (at least 1).
    burst: usize,
    buckets: Mutex<Buckets>,
    refusals: Counter,
}

struct Buckets {
    map: HashMap<PrincipalKey, Bucket>,
    /// Sweep full buckets (the same as none) when the map grows past this.
    sweep_at: usize,
}

/// Buckets kept before the first sweep of full ones.
const SWEEP_MIN: usize = 1024;

impl BindingRate {
    fn new(per_minute: usize, burst: usize, refusals: Counter) -> BindingRate {
        BindingRate {
            per_minute,
            burst: burst.max(1),
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                sweep_at: SWEEP_MIN,
            }),
            refusals,
        }
    }

    fn capacity(&self) -> f64 {
        self.burst as f64
    }

    /// Tokens refilled per second.
    fn rate(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    /// Tokens in `bucket` at `now` (refilled since it was last touched), at most the capacity.
    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.rate()).min(self.capacity())
    }

    fn take(&self, principal: &PrincipalKey, now: Instant) -> Result<(), BindingsRefused> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let mut buckets = crate::sync::lock(&self.buckets);
        let tokens = buckets
            .map
            .get(principal)
            .map_or(self.capacity(), |b| self.refilled(*b, now));
        if tokens < 1.0 {
            self.refusals.inc();
            let wait = (1.0 - tokens) / self.rate();
            return Err(BindingsRefused {
                per_minute: self.per_minute,
                retry_after_secs: (wait.ceil() as u64).max(1),
            });
        }
        buckets.map.insert(
            principal.clone(),
            Bucket {
                tokens: tokens - 1.0,
                at: now,
            },
        );
        self.sweep(&mut buckets, now);
        Ok(())
    }

    fn refund(&self, principal: &PrincipalKey, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        let mut buckets = crate::sync::lock(&self.buckets);
        if let Some(bucket) = buckets.map.get_mut(principal) {
            bucket.tokens = (self.refilled(*bucket, now) + 1.0).min(self.capacity());
            bucket.at = now;
        }
    }

    /// Drops the buckets that are full again (a full bucket is the same as none), when the
    /// map has doubled since the last sweep: amortised O(1) per take, memory bounded by the
    /// principals active in the last minute.
    fn sweep(&self, buckets: &mut Buckets, now: Instant) {
        if buckets.map.len() < buckets.sweep_at {
            return;
        }
        let capacity = self.capacity();
        buckets
            .map
            .retain(|_, bucket| self.refilled(*bucket, now) < capacity);
        buckets.sweep_at = (buckets.map.len() * 2).max(SWEEP_MIN);
    }
}

/// Connections the pool keeps beyond one per cursor: the definitions watcher (its own
/// `getMore`), admin writes, readiness pings, snapshot reads, and a cursor (re)opening while
/// the others sit in `getMore`. Connections are opened lazily, so unused room costs nothing.
pub const POOL_HEADROOM: u32 = 16;

/// What to do with the MongoDB driver's `maxPoolSize` (per server; every cursor reads from the
/// primary, so one pool holds them all). Each cursor's `getMore` holds a pooled connection for
/// up to `max_await`: with fewer connections than cursors, cursor opens and `getMore`s queue
/// behind each other (measured: 40 streams took 26.5 s to subscribe with the driver's default
/// of 10, 0.1 s with 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    /// `mongo_uri` sets no `maxPoolSize`: use this one (`max_workers` + [`POOL_HEADROOM`]).
    Sized(u32),
    /// `mongo_uri` sets one that is large enough (0: unlimited): keep it.
    Kept(u32),
    /// `mongo_uri` sets one below what `max_workers` needs: kept, because the operator asked
    /// for it, but warned about at startup naming both numbers.
    TooSmall {
        /// `maxPoolSize` from `mongo_uri`.
        given: u32,
        /// `max_workers` + [`POOL_HEADROOM`].
        needed: u32,
    },
}

impl PoolSize {
    /// Decides the pool size from `[limits]` and the URI's `maxPoolSize`, if any.
    pub fn for_limits(limits: &LimitsConfig, from_uri: Option<u32>) -> PoolSize {
        let needed = u32::try_from(limits.max_workers)
            .unwrap_or(u32::MAX)
            .saturating_add(POOL_HEADROOM);
        match from_uri {
            None => PoolSize::Sized(needed),
            // The driver reads 0 as "no limit".
            Some(given) if given == 0 || given >= needed => PoolSize::Kept(given),
            Some(given) => PoolSize::TooSmall { given, needed },
        }
    }

    /// The `maxPoolSize` to give the driver.
    pub fn max_pool_size(self) -> u32 {
        match self {
            PoolSize::Sized(size) | PoolSize::Kept(size) => size,
            PoolSize::TooSmall { given, .. } => given,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> StreamKey {
        StreamKey::new("db", "coll", name).unwrap()
    }

    #[test]
    fn each_limit_refuses_and_releases() {
        let limits = Limits::new(LimitsConfig {
            max_connections: Some(4),
            per_stream: Some(2),
            per_user: Some(3),
            per_ip: Some(2),
            retry_after_secs: 1,
            ..LimitsConfig::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limits.try_acquire(&key("a"), Some("u"), Some(ip)).unwrap();
        let _a2 = limits.try_acquire(&key("a"), Some("u"), Some(ip)).unwrap();
        assert_eq!(
            limits.try_acquire(&key("a"), None, None).unwrap_err(),
            LimitExceeded::Stream
        );
        let _b1 = limits
            .try_acquire(&key("b"), Some("u"), Some(other))
            .unwrap();
        assert_eq!(
            limits
                .try_acquire(&key("b"), Some("u"), Some(other))
                .unwrap_err(),
            LimitExceeded::User
        );
        assert_eq!(
            limits
                .try_acquire(&key("c"), Some("v"), Some(ip))
                .unwrap_err(),
            LimitExceeded::Ip
        );
        let _c1 = limits
            .try_acquire(&key("c"), Some("v"), Some(other))
            .unwrap();
        assert_eq!(
            limits.try_acquire(&key("d"), None, None).unwrap_err(),
            LimitExceeded::Total
        );
        drop(a1);
        assert_eq!(limits.open(), 3);
        let _a3 = limits.try_acquire(&key("a"), Some("w"), Some(ip)).unwrap();
    }

    #[test]
    fn a_snapshot_counts_as_a_connection_of_its_user_and_address_only() {
        let limits = Limits::new(LimitsConfig {
            max_connections: Some(2),
            per_stream: Some(1),
            per_user: Some(2),
            per_ip: Some(2),
            ..LimitsConfig::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let connection = limits.try_acquire(&key("a"), Some("u"), Some(ip)).unwrap();
        let snapshot = limits.try_acquire_snapshot(Some("u"), Some(ip)).unwrap();
        // The address is full (a connection and its snapshot)…
        assert_eq!(
            limits.try_acquire(&key("b"), None, Some(ip)).unwrap_err(),
            LimitExceeded::Ip
        );
        // …and the user, from anywhere.
        assert_eq!(
            limits.try_acquire_snapshot(Some("u"), None).unwrap_err(),
            LimitExceeded::User
        );
        // Neither `max_connections` nor `per_stream` counted the snapshot.
        assert_eq!(limits.open(), 1);
        let _other = limits.try_acquire(&key("b"), Some("v"), None).unwrap();
        drop(snapshot);
        let _again = limits.try_acquire_snapshot(Some("u"), Some(ip)).unwrap();
        drop(connection);
        assert_eq!(limits.open(), 1);
    }

    #[test]
    fn unlimited_counts_nothing_per_key() {
        let limits = Limits::new(LimitsConfig::default());
        let permits: Vec<_> = (0..100)
            .map(|_| limits.try_acquire(&key("a"), Some("u"), None).unwrap())
            .collect();
        assert_eq!(limits.open(), 100);
        drop(permits);
        assert_eq!(limits.open(), 0);
        assert!(limits.lock().per_stream.is_empty());
    }

    fn budget(max_workers: usize, max_bindings_per_stream: usize) -> (CursorBudget, Metrics) {
        let metrics = Metrics::new();
        let limits = LimitsConfig {
            max_workers,
            max_bindings_per_stream,
            retry_after_secs: 3,
            ..LimitsConfig::default()
        };
        (CursorBudget::new(&limits, &metrics), metrics)
    }

    #[test]
    fn bindings_are_bounded_per_stream_and_freed_on_drop() {
        let (budget, metrics) = budget(10, 2);
        let a1 = budget.try_acquire(&key("a")).unwrap();
        let a2 = budget.try_acquire(&key("a")).unwrap();
        let refused = budget.try_acquire(&key("a")).unwrap_err();
        assert_eq!(refused.limit, CursorLimit::MaxBindingsPerStream);
        assert_eq!((refused.max, refused.retry_after_secs), (2, 3));
        assert_eq!(refused.stream, Some(key("a")));
        assert!(
            refused.to_string().contains("/db/coll/_streams/a"),
            "{refused}"
        );
        // Another stream has its own bindings.
        let _b1 = budget.try_acquire(&key("b")).unwrap();
        assert_eq!(budget.in_use(), 3);
        assert_eq!(metrics.upstream_cursors.get(), 3);
        assert_eq!(metrics.upstream_bindings_max.get(), 2);
        drop(a1);
        assert_eq!(budget.bindings(&key("a")), 1);
        assert_eq!(metrics.upstream_bindings_max.get(), 1);
        let _a3 = budget.try_acquire(&key("a")).unwrap();
        drop(a2);
        assert_eq!(budget.in_use(), 2);
        let refusals = metrics
            .upstream_refusals
            .get_or_create(&LimitLabel {
                limit: "max_bindings_per_stream",
            })
            .get();
        assert_eq!(refusals, 1);
    }

    #[test]
    fn catch_ups_count_against_max_workers_only() {
        let (budget, metrics) = budget(3, 1);
        let _worker = budget.try_acquire(&key("a")).unwrap();
        let catch_up = budget.try_acquire_catch_up().unwrap();
        let _catch_up2 = budget.try_acquire_catch_up().unwrap();
        // The catch-ups took no binding of "a", but every slot of max_workers is gone.
        assert_eq!(budget.bindings(&key("a")), 1);
        let refused = budget.try_acquire(&key("b")).unwrap_err();
        assert_eq!(refused.limit, CursorLimit::MaxWorkers);
        assert!(refused.to_string().contains("max_workers"), "{refused}");
        let refused = budget.try_acquire_catch_up().unwrap_err();
        assert_eq!(
            (refused.limit, refused.stream),
            (CursorLimit::MaxWorkers, None)
        );
        drop(catch_up);
        let _b = budget.try_acquire(&key("b")).unwrap();
        assert_eq!(metrics.upstream_cursors.get(), 3);
        assert!(metrics.render().contains("streamgate_upstream_cursors 3"));
    }

    #[test]
    fn a_refused_slot_is_retried_after_the_evict_callback_frees_one() {
        let (budget, metrics) = budget(2, 1);
        let mut held = vec![budget.try_acquire(&key("a")).unwrap()];
        // The stream's own binding is in the way: that is what the callback is told.
        let mut asked = Vec::new();
        let refused = budget
            .try_acquire_evicting(&key("a"), |limit| {
                asked.push(limit);
                false
            })
            .unwrap_err();
        assert_eq!(refused.limit, CursorLimit::MaxBindingsPerStream);
        assert_eq!(asked, [CursorLimit::MaxBindingsPerStream]);
        // Freeing it lets the same call succeed.
        let _a2 = budget
            .try_acquire_evicting(&key("a"), |_| held.pop().is_some())
            .unwrap();
        let _b = budget.try_acquire(&key("b")).unwrap();
        let refused = budget
            .try_acquire_evicting(&key("c"), |limit| {
                assert_eq!(limit, CursorLimit::MaxWorkers);
                false
            })
            .unwrap_err();
        assert_eq!(refused.limit, CursorLimit::MaxWorkers);
        let refusals = |limit| {
            metrics
                .upstream_refusals
                .get_or_create(&LimitLabel { limit })
                .get()
        };
        // Only the refusals that reached the client are counted.
        assert_eq!(refusals("max_bindings_per_stream"), 1);
        assert_eq!(refusals("max_workers"), 1);
    }

    #[test]
    fn new_bindings_are_a_token_bucket_per_principal() {
        let rate = BindingRate::new(3, 3, Counter::default());
        let alice = PrincipalKey::User("alice".into());
        let bob = PrincipalKey::Ip("10.0.0.1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            rate.take(&alice, t0).unwrap();
        }
        // The fourth within the minute: refused, told to come back when a token is back
        // (3 a minute: one every 20 s).
        let refused = rate.take(&alice, t0).unwrap_err();
        assert_eq!((refused.per_minute, refused.retry_after_secs), (3, 20));
        assert!(refused.to_string().contains("new_bindings_per_minute"));
        // Another principal has its own allowance.
        rate.take(&bob, t0).unwrap();
        // 10 s later half a token is back: 10 s more to wait.
        let later = t0 + std::time::Duration::from_secs(10);
        assert_eq!(rate.take(&alice, later).unwrap_err().retry_after_secs, 10);
        let later = t0 + std::time::Duration::from_secs(20);
        rate.take(&alice, later).unwrap();
        assert!(rate.take(&alice, later).is_err());
        // A refund gives the token back.
        rate.refund(&alice, later);
        rate.take(&alice, later).unwrap();
        assert_eq!(rate.refusals.get(), 3);
        // 0: unbounded.
        let unbounded = BindingRate::new(0, 10, Counter::default());
        for _ in 0..1000 {
            unbounded.take(&alice, t0).unwrap();
        }
    }

    #[test]
    fn the_burst_is_smaller_than_the_minute_and_the_rest_is_paced() {
        // 60 a minute, 10 at once: the 11th at once is refused for one second, and a minute
        // gives 60 more, never more than 10 at once.
        let rate = BindingRate::new(60, 10, Counter::default());
        let alice = PrincipalKey::User("alice".into());
        let t0 = Instant::now();
        for _ in 0..10 {
            rate.take(&alice, t0).unwrap();
        }
        assert_eq!(rate.take(&alice, t0).unwrap_err().retry_after_secs, 1);
        let mut started = 0;
        for second in 1..=60 {
            let at = t0 + std::time::Duration::from_secs(second);
            while rate.take(&alice, at).is_ok() {
                started += 1;
            }
        }
        assert_eq!(started, 60);
        let an_hour_later = t0 + std::time::Duration::from_secs(3600);
        let mut at_once = 0;
        while rate.take(&alice, an_hour_later).is_ok() {
            at_once += 1;
        }
        assert_eq!(at_once, 10);
    }

    #[test]
    fn full_buckets_are_swept_so_the_map_holds_recent_principals_only() {
        let rate = BindingRate::new(60, 60, Counter::default());
        let t0 = Instant::now();
        for i in 1..SWEEP_MIN as u32 {
            rate.take(&PrincipalKey::Ip(IpAddr::from(i.to_be_bytes())), t0)
                .unwrap();
        }
        // A minute later every bucket is full again; the next take sweeps them.
        let later = t0 + std::time::Duration::from_secs(61);
        rate.take(&PrincipalKey::User("new".into()), later).unwrap();
        assert_eq!(crate::sync::lock(&rate.buckets).map.len(), 1);
    }

    #[test]
    fn pool_is_sized_from_max_workers_unless_the_uri_says_otherwise() {
        let limits = LimitsConfig {
            max_workers: 200,
            ..LimitsConfig::default()
        };
        let needed = 200 + POOL_HEADROOM;
        assert_eq!(PoolSize::for_limits(&limits, None), PoolSize::Sized(needed));
        assert_eq!(
            PoolSize::for_limits(&limits, Some(500)),
            PoolSize::Kept(500)
        );
        assert_eq!(
            PoolSize::for_limits(&limits, Some(needed)),
            PoolSize::Kept(needed)
        );
        assert_eq!(PoolSize::for_limits(&limits, Some(0)), PoolSize::Kept(0));
        let small = PoolSize::for_limits(&limits, Some(100));
        assert_eq!(small, PoolSize::TooSmall { given: 100, needed });
        assert_eq!(small.max_pool_size(), 100, "an explicit size is kept");
        assert_eq!(
            PoolSize::for_limits(&LimitsConfig::default(), None).max_pool_size(),
            1000 + POOL_HEADROOM
        );
    }
}
