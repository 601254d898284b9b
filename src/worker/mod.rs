//! The ChangeStreamWorker: one MongoDB cursor per (stream, bound variables), fanned out.
//!
//! ```text
//!  MongoDB ──cursor──▶ Worker::run ──Event::from_change (encode once)──▶ Hub
//!                                                                        │ ring (recent events)
//!                                                                        │ broadcast (live)
//!                                     Subscription ◀── attach(after) ────┘
//! ```
//!
//! * [`Hub`] is the worker's shared state. Publishing an event and attaching a client both take
//!   its lock, so a client attaches *between* two events: the ring gives it everything after its
//!   resume point up to now, the broadcast receiver everything after now. That is the whole
//!   exactly-once argument for resumes inside the ring.
//! * Per-client queues are shared, not copied: the broadcast channel (a small ring of
//!   [`LIVE_SLOTS`] `Arc<Event>`s) is the hot path, and the worker's ring is the overflow. A
//!   receiver that falls more than `LIVE_SLOTS` behind (a burst, a slow write) gets `Lagged` and
//!   transparently re-attaches from the ring at its last delivered id; only a client more than
//!   `client_queue` events behind (or out of the ring) is closed with `slow_consumer`. The
//!   worker never waits for a client, and a lagging client costs no extra memory.
//! * On a resumable MongoDB error the worker reopens its cursor from its last resume position
//!   (last event or post-batch token) with exponential backoff; clients see nothing.
//! * The worker stops itself `linger` after its last client leaves (see [`WorkerMap`]).

mod cursor;
pub mod errors;
pub mod routing;
pub mod subscription;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::event::{Event, EventKind, Token};
use crate::metrics::Metrics;
use crate::streams::definition::{StreamKey, WatchSpec};
use routing::{ClientFilter, RouteValues};

pub use subscription::Subscription;

/// Identity of a worker: the stream, its definition revision and the client's bound variables.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerKey {
    /// The stream served.
    pub stream: StreamKey,
    /// Revision of the definition (bumped by the admin API on replace).
    pub revision: u64,
    /// Canonical JSON of the bound variables (`{}` when none).
    pub vars: String,
}

/// Slots of the live broadcast channel. Small on purpose: lagging clients recover from the ring.
pub const LIVE_SLOTS: usize = 1024;

/// Slots of a filtered partition's channel: there may be one per tenant, so keep them small.
const PARTITION_SLOTS: usize = 64;

/// Tuning shared by every worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// How many events a client may lag behind the worker before `slow_consumer`.
    pub client_queue: usize,
    /// Recent events kept for resumes.
    pub ring_size: usize,
    /// How long an idle worker keeps its cursor.
    pub linger: Duration,
    /// `maxAwaitTimeMS` of getMore: bounds how long the loop waits without news.
    pub max_await: Duration,
    /// Upper bound of the reconnect backoff.
    pub max_backoff: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            client_queue: 4096,
            ring_size: 10_000,
            linger: Duration::from_secs(5),
            max_await: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
        }
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

/// The registry's map of live workers. Guarded by a plain mutex: every critical section is a
/// lookup/insert/remove, never an await. Client counts change only under this lock, which is
/// what makes "retire when idle" race-free against a client arriving at the same moment.
pub type WorkerMap = Arc<Mutex<HashMap<WorkerKey, Arc<Worker>>>>;

/// Locks a std mutex, recovering from poisoning (a panic elsewhere must not take the server down).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// State shared by the cursor loop and every client attaching.
#[derive(Debug, Default)]
struct Hub {
    /// The latest `ring_size` change events, in oplog order, with their routing values.
    ring: VecDeque<Routed>,
    /// Every change after this token is in `ring` or still to come on the broadcast.
    /// `None` until the first cursor is open.
    coverage_start: Option<Token>,
    /// Where to reopen the cursor: the last event's token or the latest post-batch token.
    position: Option<Token>,
    /// Set once the worker ended with an event (`invalidate`, `error`, `cancel`); late
    /// attachers get it instead of waiting forever.
    terminal: Option<Arc<Event>>,
    /// Filtered streams only: one live channel per distinct client filter.
    partitions: HashMap<Arc<str>, Partition>,
    /// Filtered streams only: first-rule value → partitions whose claims contain it.
    index: HashMap<String, Vec<Arc<str>>>,
}

/// A ring entry.
#[derive(Debug)]
struct Routed {
    event: Arc<Event>,
    /// Per `match` rule, the event's values (empty slice for unfiltered streams).
    values: RouteValues,
}

/// Clients that share a filter share this channel.
#[derive(Debug)]
struct Partition {
    live: broadcast::Sender<Arc<Event>>,
    filter: Arc<ClientFilter>,
}

impl Hub {
    /// Sends a filtered event to the partitions it matches: O(matching partitions).
    fn route(&mut self, event: &Arc<Event>, values: &[Vec<String>]) {
        let Some(first) = values.first() else {
            return;
        };
        let mut sent: Vec<&Arc<str>> = Vec::new();
        let mut abandoned: Vec<Arc<str>> = Vec::new();
        for value in first {
            for key in self.index.get(value).into_iter().flatten() {
                if sent.contains(&key) {
                    continue;
                }
                sent.push(key);
                if let Some(partition) = self.partitions.get(key)
                    && partition.filter.matches(values)
                    && partition.live.send(Arc::clone(event)).is_err()
                {
                    abandoned.push(Arc::clone(key));
                }
            }
        }
        for key in abandoned {
            self.drop_partition(&key);
        }
    }

    /// The live channel for `filter`, created (and indexed) on first use.
    fn partition(&mut self, filter: &Arc<ClientFilter>) -> broadcast::Receiver<Arc<Event>> {
        if let Some(partition) = self.partitions.get(&filter.key) {
            return partition.live.subscribe();
        }
        let (live, receiver) = broadcast::channel(PARTITION_SLOTS);
        for value in filter.sets.first().into_iter().flatten() {
            self.index
                .entry(value.clone())
                .or_default()
                .push(Arc::clone(&filter.key));
        }
        self.partitions.insert(
            Arc::clone(&filter.key),
            Partition {
                live,
                filter: Arc::clone(filter),
            },
        );
        receiver
    }

    /// Forgets a partition nobody listens to any more.
    fn drop_partition(&mut self, key: &Arc<str>) {
        let Some(partition) = self.partitions.remove(key) else {
            return;
        };
        for value in partition.filter.sets.first().into_iter().flatten() {
            if let Some(keys) = self.index.get_mut(value) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.index.remove(value);
                }
            }
        }
    }
}

/// What a client gets when it attaches: events it missed from the ring, then the live feed.
pub struct Attachment {
    /// Ring events after the client's resume point (plus the terminal event, if any).
    pub backlog: Vec<Arc<Event>>,
    /// Live events published after the attach.
    pub live: broadcast::Receiver<Arc<Event>>,
    /// Live events at or before this token were already delivered (catch-up ran ahead).
    pub skip_through: Option<Token>,
    /// The worker's position at attach time: everything up to here is in `backlog` or was
    /// before the client's start. A client that lags before its first event recovers from here.
    pub position: Option<Token>,
}

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
    /// Cursors opened (first open plus every reconnect).
    pub cursors_opened: AtomicU64,
}

/// One change-stream cursor and its fan-out.
pub struct Worker {
    /// Identity.
    pub key: WorkerKey,
    spec: WatchSpec,
    client: mongodb::Client,
    settings: WorkerSettings,
    hub: Mutex<Hub>,
    /// Sending happens under `hub`'s lock (see module docs); receivers are the clients.
    live: broadcast::Sender<Arc<Event>>,
    state: watch::Sender<WorkerState>,
    /// Attached clients; changed only under the [`WorkerMap`] lock (increment) or by a guard's
    /// drop (decrement, which then wakes the idle check).
    clients: AtomicUsize,
    /// Clients per transport, for stats.
    pub clients_by_transport: [AtomicUsize; 3],
    idle: Notify,
    cancel: CancellationToken,
    /// Counters.
    pub stats: WorkerStats,
    metrics: Arc<Metrics>,
    map: WorkerMap,
}

impl Worker {
    /// Creates a worker (not yet running); the registry inserts it and calls [`Worker::spawn`].
    pub fn new(
        key: WorkerKey,
        spec: WatchSpec,
        client: mongodb::Client,
        settings: WorkerSettings,
        parent_cancel: &CancellationToken,
        metrics: Arc<Metrics>,
        map: WorkerMap,
    ) -> Arc<Worker> {
        let (live, _) = broadcast::channel(LIVE_SLOTS.min(settings.client_queue).max(2));
        let (state, _) = watch::channel(WorkerState::Starting);
        Arc::new(Worker {
            key,
            spec,
            client,
            settings,
            hub: Mutex::new(Hub::default()),
            live,
            state,
            clients: AtomicUsize::new(0),
            clients_by_transport: Default::default(),
            idle: Notify::new(),
            cancel: parent_cancel.child_token(),
            stats: WorkerStats::default(),
            metrics,
            map,
        })
    }

    /// Starts the cursor loop on `tracker`.
    pub fn spawn(self: &Arc<Self>, tracker: &tokio_util::task::TaskTracker) {
        self.metrics.workers.inc();
        let worker = Arc::clone(self);
        tracker.spawn(async move {
            let metrics = Arc::clone(&worker.metrics);
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

    /// Live partitions (distinct client filters) of a filtered stream.
    pub fn partition_count(&self) -> usize {
        lock(&self.hub).partitions.len()
    }

    /// Whether the worker has ended and must not take new clients.
    pub fn is_finished(&self) -> bool {
        lock(&self.hub).terminal.is_some() || self.cancel.is_cancelled()
    }

    /// Counts a new client. Call only while holding the [`WorkerMap`] lock.
    pub(crate) fn add_client(&self) {
        self.clients.fetch_add(1, Ordering::AcqRel);
    }

    /// Uncounts a client; wakes the idle check when it was the last.
    pub(crate) fn remove_client(&self) {
        if self.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_one();
        }
    }

    /// Waits until the worker can serve clients: its first cursor is open (or it ended).
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut state = self.state.subscribe();
        let wait = state.wait_for(|s| *s != WorkerState::Starting);
        let left_starting = matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(_)));
        let hub = lock(&self.hub);
        // Ended before opening (e.g. a pipeline MongoDB refuses): ready, with that error.
        hub.terminal.is_some() || (left_starting && hub.coverage_start.is_some())
    }

    /// Attaches a client that has seen everything up to `after` (or nothing, for a new client).
    ///
    /// Returns `None` when `after` is older than the ring covers: the caller must catch up from
    /// MongoDB first and try again with a later token.
    pub fn attach(
        &self,
        after: Option<&Token>,
        filter: Option<&Arc<ClientFilter>>,
    ) -> Option<Attachment> {
        self.attach_within(after, usize::MAX, filter)
    }

    /// Like [`Worker::attach`], but refuses when more than `max_lag` ring events follow `after`
    /// (a lagging client recovering from the ring must still be within its queue bound).
    pub fn attach_within(
        &self,
        after: Option<&Token>,
        max_lag: usize,
        filter: Option<&Arc<ClientFilter>>,
    ) -> Option<Attachment> {
        let mut hub = lock(&self.hub);
        let mut backlog = Vec::new();
        let mut skip_through = None;
        if let Some(after) = after {
            match &hub.coverage_start {
                Some(start) if after >= start => {}
                _ => return None,
            }
            let first = hub
                .ring
                .partition_point(|r| r.event.id.as_ref().is_some_and(|id| id <= after));
            backlog.extend(
                hub.ring
                    .range(first..)
                    .filter(|r| filter.is_none_or(|f| f.matches(&r.values)))
                    .map(|r| Arc::clone(&r.event)),
            );
            if backlog.len() > max_lag {
                return None;
            }
            skip_through = Some(after.clone());
        }
        if let Some(terminal) = &hub.terminal {
            backlog.push(Arc::clone(terminal));
        }
        let position = hub
            .ring
            .back()
            .and_then(|r| r.event.id.clone())
            .or_else(|| hub.position.clone());
        let live = match filter {
            Some(filter) => hub.partition(filter),
            None => self.live.subscribe(),
        };
        Some(Attachment {
            position,
            backlog,
            live,
            skip_through,
        })
    }

    /// Records a change and sends it to every attached client it is for.
    fn publish(&self, event: Arc<Event>, values: RouteValues) {
        let mut hub = lock(&self.hub);
        if let Some(id) = &event.id {
            hub.position = Some(id.clone());
        }
        if event.kind == EventKind::Change {
            if hub.ring.len() >= self.settings.ring_size
                && let Some(evicted) = hub.ring.pop_front()
            {
                hub.coverage_start = evicted.event.id.clone();
            }
            hub.ring.push_back(Routed {
                event: Arc::clone(&event),
                values: Arc::clone(&values),
            });
            self.metrics.events_received.inc();
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            self.stats.last_event_ms.store(now_ms(), Ordering::Relaxed);
            if self.spec.routing.is_empty() {
                // No receivers is fine: the event stays in the ring for resumes.
                let _ = self.live.send(event);
            } else {
                hub.route(&event, &values);
            }
        } else {
            // Terminal events reach everybody, filtered or not.
            hub.terminal = Some(Arc::clone(&event));
            for partition in hub.partitions.values() {
                let _ = partition.live.send(Arc::clone(&event));
            }
            let _ = self.live.send(event);
        }
    }

    /// Publishes a change as if MongoDB had sent it (unit tests of the layers above).
    #[cfg(test)]
    pub(crate) fn publish_change_for_test(&self, change: mongodb::bson::Document) {
        if let Ok(event) = Event::from_change(change) {
            self.publish(Arc::new(event), Arc::from(Vec::new()));
        }
    }

    /// Ends the worker with a final event for every client (`cancel` on delete, …).
    pub fn terminate(&self, event: Event) {
        self.publish(Arc::new(event), Arc::from(Vec::new()));
        self.cancel.cancel();
    }

    /// Removes the worker from the map if it still has no clients. Returns whether it did.
    fn retire_if_idle(self: &Arc<Self>) -> bool {
        let mut map = lock(&self.map);
        if self.client_count() != 0 {
            return false;
        }
        if map.get(&self.key).is_some_and(|w| Arc::ptr_eq(w, self)) {
            map.remove(&self.key);
        }
        true
    }

    /// Removes the worker from the map whatever its clients (it ended).
    fn unregister(self: &Arc<Self>) {
        let mut map = lock(&self.map);
        if map.get(&self.key).is_some_and(|w| Arc::ptr_eq(w, self)) {
            map.remove(&self.key);
        }
    }

    /// The watched collection.
    pub fn spec(&self) -> &WatchSpec {
        &self.spec
    }

    pub(crate) fn client(&self) -> &mongodb::Client {
        &self.client
    }

    pub(crate) fn settings(&self) -> &WorkerSettings {
        &self.settings
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
