//! The ChangeStreamWorker: one MongoDB cursor per stream (and per binding of variables that
//! cannot be routed in-process), fanned out to every client.
//!
//! ```text
//!  MongoDB ──cursor──▶ ChangeSource ──Routed (encoded once)──▶ Hub (ring + live channels)
//!                                                               │ read(after) by position
//!  MongoDB ──catch-up cursor──▶ CatchUp ring ──pull(after)──┐   │
//!                                                           ▼   ▼
//!                                                        Subscription (one per client)
//! ```
//!
//! * The worker's [`hub::Hub`] holds the recent events; publishing and reading take its lock,
//!   so a client's read that reaches the head subscribes to the live channel *between* two events.
//! * A client never holds a queue of its own: it remembers the id it has seen through. Behind
//!   the live channel (a burst) it reads the ring in chunks; behind the ring it reads a shared
//!   [`catchup::CatchUp`]; then it rejoins live. A client that keeps reading is never cut; one
//!   whose socket stops taking bytes is closed by its transport (`stall_timeout_secs`).
//! * On a resumable MongoDB error the [`source::ChangeSource`] reopens the cursor from its last
//!   position with backoff; clients see nothing.
//! * The worker stops itself `linger` after its last client leaves, handing itself back to its
//!   [`Owner`] (the registry), which decides under its own lock. Until then its cursor slot is
//!   on loan: the registry may `Worker::evict` it, under the same lock, for a new
//!   subscriber the budget would otherwise refuse.

pub(crate) mod catchup;
mod cursor;
pub mod errors;
pub(crate) mod feed;
pub(crate) mod hub;
pub(crate) mod membership;
pub(crate) mod relayed;
pub(crate) mod source;
pub mod subscription;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::event::{Event, Token};
use crate::limits::{CursorBudget, CursorPermit};
use crate::metrics::Metrics;
use crate::routing::ClientFilter;
use crate::spec::{StreamKey, WatchSpec};
use catchup::CatchUps;
use hub::{Attachment, Hub, Routed, Scan};
use source::ServerFeatures;

pub use hub::LIVE_SLOTS;
pub use subscription::{ClientGuard, Subscription};

/// Identity of a worker: the stream, its definition revision and the bound variables that
/// cannot be routed in-process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerKey {
    /// The stream served.
    pub stream: StreamKey,
    /// Revision of the definition (bumped by the admin API on replace).
    pub revision: u64,
    /// Canonical JSON of the bound variables kept in the pipeline (`{}` when none).
    pub vars: String,
}

/// Tuning shared by every worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Recent events kept for resumes and for clients reading behind the live channel.
    pub ring_size: usize,
    /// How long an idle worker keeps its cursor.
    pub linger: Duration,
    /// `maxAwaitTimeMS` of getMore: bounds how long a cursor waits without news.
    pub max_await: Duration,
    /// Upper bound of the reconnect backoff.
    pub max_backoff: Duration,
    /// Whether `$match`-only streams share their database's cursor (`worker::feed`).
    pub shared_database_cursors: bool,
    /// Whether membership streams turn on their collection's pre-images (`worker::membership`).
    pub enable_pre_images: bool,
    /// How long a feed may look for the member whose `$match` failed (`worker::feed`).
    pub feed_probe_timeout: Duration,
    /// Changes a cursor re-reads one per batch while isolating a change over 16 MB.
    pub oversize_isolation_changes: usize,
    /// How long a subscribe waits for a new worker's or a catch-up's cursor to open.
    pub cursor_open_wait: Duration,
}

/// The configuration's defaults (declared once, in `config.rs`) for what is configurable; the
/// rest is fixed here.
impl Default for WorkerSettings {
    fn default() -> Self {
        let config = crate::config::Config::default();
        WorkerSettings {
            ring_size: config.ring_size,
            linger: config.worker_linger(),
            max_await: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            shared_database_cursors: config.shared_database_cursors,
            enable_pre_images: config.enable_pre_images,
            feed_probe_timeout: config.feed_probe_timeout(),
            oversize_isolation_changes: config.oversize_isolation_changes,
            cursor_open_wait: config.cursor_open_wait(),
        }
    }
}

/// What every worker of a registry shares.
pub struct WorkerContext {
    /// The MongoDB client (its pool is sized for the cursor limits).
    pub client: mongodb::Client,
    /// Tuning.
    pub settings: WorkerSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Where worker and catch-up tasks run (shutdown waits for them).
    pub tracker: TaskTracker,
    /// Who holds the workers (the registry): a worker hands itself back when it retires.
    pub owner: Arc<dyn Owner>,
    /// Slots for change-stream cursors (`limits.max_workers`, `max_bindings_per_stream`).
    pub budget: CursorBudget,
    /// What the server can do, asked once.
    features: tokio::sync::OnceCell<ServerFeatures>,
    /// Database cursors shared by workers whose pipelines only filter.
    pub(crate) feeds: feed::Feeds,
    /// The relay tier, in relay mode (`[relay]`): workers read their steps through it.
    pub(crate) relay: OnceLock<Arc<dyn relayed::Relay>>,
}

impl WorkerContext {
    /// A context for a registry's workers.
    pub fn new(
        client: mongodb::Client,
        settings: WorkerSettings,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        budget: CursorBudget,
        owner: Arc<dyn Owner>,
    ) -> Arc<WorkerContext> {
        Arc::new(WorkerContext {
            client,
            settings,
            metrics,
            tracker,
            budget,
            owner,
            features: tokio::sync::OnceCell::new(),
            feeds: feed::Feeds::default(),
            relay: OnceLock::new(),
        })
    }
}

/// What a worker is doing, for `/_admin` stats and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Opening its first cursor.
    Starting,
    /// Cursor open.
    Running,
    /// Lost the cursor; reopening with backoff.
    Retrying,
    /// Ended (idle, invalidated, cancelled or failed).
    Stopped,
}

impl WorkerState {
    /// Name used in JSON stats.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Retrying => "retrying",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// Who holds the workers. Client counts go up only under the owner's lock (see
/// [`ClientGuard::new`]), and the owner checks "still idle" under that same lock, which is what
/// makes "retire when idle" race-free against a client arriving at the same moment.
pub trait Owner: Send + Sync {
    /// Forgets `worker` if it still has no clients; returns whether it did.
    fn retire_if_idle(&self, worker: &Arc<Worker>) -> bool;
    /// Forgets `worker` whatever its clients (it ended).
    fn unregister(&self, worker: &Arc<Worker>);
    /// Closes the longest-idle worker without clients, freeing its slot of `max_workers` for
    /// a catch-up cursor; returns whether there was one.
    fn free_idle_slot(&self) -> bool;
}

pub(crate) use crate::sync::lock;

/// Counters for the admin API and metrics.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Change events received from MongoDB.
    pub events: AtomicU64,
    /// Events written to clients (sum over clients).
    pub delivered: AtomicU64,
    /// Bytes written to clients.
    pub delivered_bytes: AtomicU64,
    /// Unix ms of the last change event (0 = none yet).
    pub last_event_ms: AtomicU64,
    /// Change-stream cursors opened by this worker: its own (first open and every reopen) and
    /// its catch-ups'. A worker served by its database's feed opens none of its own.
    pub cursors_opened: AtomicU64,
    /// Whether the worker is served by its database's shared cursor (`worker::feed`).
    pub on_database_feed: std::sync::atomic::AtomicBool,
    /// Unix ms of the oplog time this worker has read through: the `wallTime` of its last
    /// change, or when an empty batch showed it at the head (the worker's creation before
    /// either). `now − this` is its lag (`streamgate_worker_lag_seconds`).
    pub read_through_ms: AtomicU64,
}

/// One change-stream cursor and its fan-out.
pub struct Worker {
    /// Identity.
    pub key: WorkerKey,
    spec: WatchSpec,
    context: Arc<WorkerContext>,
    features: OnceLock<ServerFeatures>,
    /// Set when this membership stream's collection has no pre-images (the `collMod` to run).
    pre_images_warning: OnceLock<String>,
    hub: Mutex<Hub>,
    catch_ups: CatchUps,
    state: watch::Sender<WorkerState>,
    /// Attached clients; changed only under the [`Owner`]'s lock (increment) or by a guard's
    /// drop (decrement, which then wakes the idle check).
    clients: AtomicUsize,
    idle: Notify,
    cancel: CancellationToken,
    /// Counters.
    pub stats: WorkerStats,
    /// Since when the worker has had no clients (`None` while it has some): the registry
    /// evicts the longest-idle worker first. Only an ordering hint: whether a worker may be
    /// evicted is decided by `clients`, under the owner's lock.
    idle_since: Mutex<Option<Instant>>,
    /// Who started this worker, for a binding the client chose (`$var` values that need a
    /// cursor of their own): the registry keeps each principal's lingering ones bounded.
    started_by: OnceLock<crate::limits::PrincipalKey>,
    /// This worker's cursor slot, freed when the worker is dropped, or taken by
    /// [`evict`](Self::evict) so that a new worker can have it at once.
    permit: Mutex<Option<CursorPermit>>,
}

impl Worker {
    /// Creates a worker (not yet running); the registry inserts it and calls [`Worker::spawn`].
    pub fn new(
        key: WorkerKey,
        spec: WatchSpec,
        context: &Arc<WorkerContext>,
        parent_cancel: &CancellationToken,
        permit: CursorPermit,
    ) -> Arc<Worker> {
        let (state, _) = watch::channel(WorkerState::Starting);
        Arc::new(Worker {
            key,
            spec,
            hub: Mutex::new(Hub::new(context.settings.ring_size)),
            context: Arc::clone(context),
            features: OnceLock::new(),
            pre_images_warning: OnceLock::new(),
            catch_ups: CatchUps::default(),
            state,
            clients: AtomicUsize::new(0),
            idle: Notify::new(),
            idle_since: Mutex::new(None),
            started_by: OnceLock::new(),
            cancel: parent_cancel.child_token(),
            // A new worker opens "from now": it is not behind until time passes unread.
            stats: WorkerStats {
                read_through_ms: AtomicU64::new(now_ms()),
                ..WorkerStats::default()
            },
            permit: Mutex::new(Some(permit)),
        })
    }

    /// Starts the cursor loop on the context's tracker.
    pub fn spawn(self: &Arc<Self>) {
        self.metrics().workers.inc();
        let worker = Arc::clone(self);
        self.context.tracker.spawn(async move {
            let metrics = Arc::clone(&worker.context.metrics);
            worker.run().await;
            metrics.workers.dec();
        });
    }

    /// Current state.
    pub fn state(&self) -> WorkerState {
        *self.state.borrow()
    }

    /// Number of attached clients.
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// The latest resume position (for stats).
    pub fn position(&self) -> Option<Token> {
        lock(&self.hub).position.clone()
    }

    /// Seconds this worker trails the oplog at `now_ms` (see [`WorkerStats::read_through_ms`]).
    pub fn lag_seconds(&self, now_ms: u64) -> f64 {
        let through = self.stats.read_through_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(through) as f64 / 1000.0
    }

    /// Records that the worker has read the oplog through `at_ms` (never moves back).
    pub(crate) fn read_through(&self, at_ms: u64) {
        self.stats
            .read_through_ms
            .fetch_max(at_ms, Ordering::Relaxed);
    }

    /// Live partitions (distinct client filters) of a filtered stream.
    pub fn partition_count(&self) -> usize {
        lock(&self.hub).partition_count()
    }

    /// Whether the worker has ended and must not take new clients.
    pub fn is_finished(&self) -> bool {
        lock(&self.hub).terminal.is_some() || self.cancel.is_cancelled()
    }

    /// The event the worker ended with, if it did.
    pub(crate) fn terminal(&self) -> Option<Arc<Event>> {
        lock(&self.hub).terminal.clone()
    }

    /// Counts a new client. Call only while holding the [`Owner`]'s lock.
    pub(crate) fn add_client(&self) {
        self.clients.fetch_add(1, Ordering::AcqRel);
        *lock(&self.idle_since) = None;
    }

    /// Uncounts a client; wakes the idle check when it was the last.
    pub(crate) fn remove_client(&self) {
        if self.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.idle_since) = Some(Instant::now());
            self.idle.notify_one();
        }
    }

    /// Since when the worker has had no clients (`None`: it has some, or never had one).
    /// Records who started this worker (a chosen binding); see [`started_by`](Self::started_by).
    pub(crate) fn set_started_by(&self, principal: crate::limits::PrincipalKey) {
        let _ = self.started_by.set(principal);
    }

    /// Who started this worker, if it is a binding a client chose.
    pub(crate) fn started_by(&self) -> Option<&crate::limits::PrincipalKey> {
        self.started_by.get()
    }

    pub fn idle_since(&self) -> Option<Instant> {
        *lock(&self.idle_since)
    }

    /// Closes a worker that has no clients and hands back its cursor slot, so that the caller
    /// can give it to a new worker at once (the cursor itself closes as the worker's task sees
    /// the cancellation, a moment later). Call only while holding the [`Owner`]'s lock, after
    /// checking that [`client_count`](Self::client_count) is 0 and removing the worker from
    /// the owner's map: client counts go up only under that lock, so no client can be
    /// attached to it, and none can find it afterwards (invariant 4).
    pub(crate) fn evict(&self) -> Option<CursorPermit> {
        // Debug: under binding churn this is one line per new binding (the metric counts them).
        tracing::debug!(stream = %self.key.stream, vars = %self.key.vars, "idle worker closed to free its cursor slot");
        self.cancel.cancel();
        lock(&self.permit).take()
    }

    /// Waits until the worker can serve clients: its first cursor is open, or it ended with an
    /// event. Transient errors while opening (an election) are waited out up to `timeout`.
    pub async fn ready(&self, timeout: Duration) -> bool {
        // Ended before opening (e.g. a pipeline MongoDB refuses): ready, with that error.
        let covered = || {
            let hub = lock(&self.hub);
            hub.terminal.is_some() || hub.coverage_start.is_some()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut state = self.state.subscribe();
        loop {
            if covered() {
                return true;
            }
            if *state.borrow_and_update() == WorkerState::Stopped
                || tokio::time::Instant::now() >= deadline
            {
                return covered();
            }
            // `Running` alone is not enough: a cursor (or a database feed) opened "from now"
            // without a position yet covers no place a client could start from, until its
            // first post-batch token. Answering then was an immediate 503 (seen about 1 run in
            // 16 right after a restart). The position comes without a state change: look again
            // shortly.
            let next = deadline.min(tokio::time::Instant::now() + Duration::from_millis(20));
            if let Ok(Err(_)) = tokio::time::timeout_at(next, state.changed()).await {
                return covered();
            }
        }
    }

    /// Reads for a client that has seen everything through `after` (`None`: a new client): at
    /// most `max_scan` ring entries, or, when that reaches the head, the rest plus the live
    /// channel. `None` when `after` is older than the ring covers.
    pub(crate) fn read(
        &self,
        after: Option<&Token>,
        filter: Option<&Arc<ClientFilter>>,
        max_scan: usize,
    ) -> Option<Result<Attachment, Scan>> {
        lock(&self.hub).read(after, filter, max_scan)
    }

    /// Whether the ring covers a client at `after`.
    pub(crate) fn covers(&self, after: &Token) -> bool {
        lock(&self.hub).covers(after)
    }

    /// Extends the ring backwards with a catch-up's events (see `catchup::hand_over`).
    pub(crate) fn extend_history(&self, older_start: &Token, entries: Vec<Routed>) {
        let added = lock(&self.hub).prepend(older_start, entries);
        tracing::debug!(stream = %self.key.stream, added, "catch-up extended the ring backwards");
    }

    /// Why this membership stream decides by post-images only (no pre-images), if it does.
    pub fn pre_images_warning(&self) -> Option<&str> {
        self.pre_images_warning.get().map(String::as_str)
    }

    /// Forgets a filtered client's partition if nobody else listens to it.
    pub(crate) fn release_partition(&self, filter: &ClientFilter) {
        lock(&self.hub).release_partition(&filter.key);
    }

    /// Records a change and sends it to every attached client it is for.
    fn publish(&self, routed: Routed) {
        let at_ms = routed.event.at_ms;
        lock(&self.hub).publish(routed);
        self.metrics().events_received.inc();
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        self.stats.last_event_ms.store(now_ms(), Ordering::Relaxed);
        self.read_through(at_ms);
    }

    /// Publishes a change as if MongoDB had sent it (unit tests of the layers above).
    #[cfg(test)]
    pub(crate) fn publish_change_for_test(&self, change: mongodb::bson::Document) {
        if let Ok(event) = Event::from_change(change)
            && let Some(id) = event.id.clone()
        {
            self.publish(Routed {
                id,
                event: Arc::new(event),
                values: Arc::from(Vec::new()),
                moves: None,
            });
        }
    }

    /// Marks the hub open at `start` for unit tests that publish by hand.
    #[cfg(test)]
    pub(crate) fn open_for_test(&self, start: Token) {
        let mut hub = lock(&self.hub);
        hub.coverage_start = Some(start.clone());
        hub.position = Some(start);
        drop(hub);
        self.state.send_replace(WorkerState::Running);
    }

    /// Ends the worker with a final event for every client, catch-up readers included
    /// (`cancel` on replace or delete, …).
    pub fn terminate(&self, event: Event) {
        self.end(Arc::new(event));
        self.cancel.cancel();
    }

    /// Publishes a terminal event and wakes clients waiting for a catch-up slot.
    fn end(&self, event: Arc<Event>) {
        lock(&self.hub).end(event);
        self.catch_ups.notify_ended();
    }

    /// Hands the worker back if it still has no clients. Returns whether it was.
    fn retire_if_idle(self: &Arc<Self>) -> bool {
        self.context.owner.retire_if_idle(self)
    }

    /// Hands the worker back whatever its clients (it ended).
    fn unregister(self: &Arc<Self>) {
        self.context.owner.unregister(self);
    }

    /// The watched collection.
    pub fn spec(&self) -> &WatchSpec {
        &self.spec
    }

    pub(crate) fn client(&self) -> &mongodb::Client {
        &self.context.client
    }

    pub(crate) fn settings(&self) -> &WorkerSettings {
        &self.context.settings
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.context.metrics
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.context.tracker
    }

    pub(crate) fn features(&self) -> ServerFeatures {
        self.features.get().copied().unwrap_or_default()
    }

    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Counts a change-stream cursor opened for this worker (its own or a catch-up's).
    pub(crate) fn count_cursor_opened(&self) {
        self.stats.cursors_opened.fetch_add(1, Ordering::Relaxed);
        self.metrics().cursors_opened.inc();
    }
}

/// An owner that holds nothing (unit-test workers are never in a registry).
#[cfg(test)]
struct NoOwner;

#[cfg(test)]
impl Owner for NoOwner {
    fn retire_if_idle(&self, worker: &Arc<Worker>) -> bool {
        worker.client_count() == 0
    }
    fn unregister(&self, _: &Arc<Worker>) {}
    fn free_idle_slot(&self) -> bool {
        false
    }
}

/// A worker that is never spawned, on an unreachable MongoDB: unit tests publish into it.
#[cfg(test)]
pub(crate) async fn test_worker(ring_size: usize) -> Arc<Worker> {
    use crate::spec::{FullDocument, FullDocumentBeforeChange};
    let client = mongodb::Client::with_uri_str("mongodb://127.0.0.1:1/")
        .await
        .expect("a URI without I/O");
    let key = StreamKey::new("db", "c", "s").expect("a valid key");
    let metrics = Arc::new(Metrics::new());
    let budget = CursorBudget::new(&crate::config::LimitsConfig::default(), &metrics);
    let permit = budget.try_acquire(&key).expect("an empty budget");
    Worker::new(
        WorkerKey {
            stream: key,
            revision: 1,
            vars: "{}".into(),
        },
        WatchSpec {
            db: "db".into(),
            coll: "c".into(),
            pipeline: Vec::new(),
            full_document: FullDocument::Default,
            full_document_before_change: FullDocumentBeforeChange::Off,
            routing: Vec::new(),
            membership: None,
        },
        &WorkerContext::new(
            client,
            WorkerSettings {
                ring_size,
                ..WorkerSettings::default()
            },
            metrics,
            TaskTracker::new(),
            budget,
            Arc::new(NoOwner),
        ),
        &CancellationToken::new(),
        permit,
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
