//! The registry: stream definitions by key, and the workers serving them.
//!
//! Definitions come from the config file (static) or the admin API (stored). A client's
//! subscribe looks up the definition, binds its variables, and finds or starts the one worker
//! for that (stream, revision, variables). Replacing or deleting a definition ends its workers
//! with a `cancel` event; clients reconnect and land on the new revision.
//!
//! # The cursor budget serves the living
//!
//! A new worker needs a slot of the [`CursorBudget`]. When none is free, the registry closes
//! the longest-idle worker that has no clients (lingering after its last one left) and gives
//! its slot to the new one: for `max_bindings_per_stream`, one of the same stream; for
//! `max_workers`, any. This happens under the worker-map lock, where client counts go up, so a
//! worker with a client is never closed and a client re-attaching to a lingering worker either
//! finds it (and keeps it) or finds it gone (and starts a fresh one, resuming from its
//! position). Only when every slot is held by a worker with clients is the subscriber refused.
//! A catch-up cursor (`worker::catchup`) short of a `max_workers` slot asks the registry the
//! same way ([`Owner::free_idle_slot`]).
//! A new binding of `$var` values that need their own cursor is also counted against its
//! principal (`limits.new_bindings_per_minute`), so that one client cannot churn through the
//! budget closing everybody's lingering workers; and the bindings a principal started that
//! linger are at most `limits.idle_bindings_per_principal` (its next new binding closes its own
//! longest-idle one first), so that a churning client holds a few idle cursors on MongoDB, not
//! one per binding of the last `worker_linger_ms`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::definition::{AvarsError, CompiledDefinition, StreamKey, parse_avars};
use crate::event::{Event, EventKind, Token};
use crate::limits::{
    BindingsRefused, CursorBudget, CursorLimit, CursorPermit, PrincipalKey, UpstreamLimit,
};
use crate::metrics::Metrics;
use crate::routing::{ClientFilter, FilterError};
use crate::worker::subscription::SubscribeError;
use crate::worker::{
    ClientGuard, Owner, Subscription, Worker, WorkerContext, WorkerKey, WorkerSettings, lock,
};

/// Where a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The config file: read-only at runtime.
    Static,
    /// The admin API (stored in MongoDB).
    Stored,
}

/// A definition as the registry holds it.
#[derive(Debug)]
pub struct StreamEntry {
    /// Identity.
    pub key: StreamKey,
    /// Validated definition.
    pub definition: CompiledDefinition,
    /// Static or stored.
    pub origin: Origin,
    /// Bumped on every replace; part of the worker key so old workers are never reused.
    pub revision: u64,
}

/// What [`Registry::put_stored`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The stream did not exist; it does now.
    Created,
    /// The definition changed: new revision, old workers ended with `cancel`.
    Replaced,
    /// The same definition was already in force: nothing changed, no client was disturbed.
    Unchanged,
    /// A static (config file) definition holds this key; the stored one was ignored.
    Static,
}

/// What [`Registry::remove_stored`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The stored definition was removed; its clients got `cancel`.
    Removed,
    /// No definition had this key.
    Absent,
    /// A static definition holds this key; it was left alone.
    Static,
}

/// A subscribe request failed before streaming started.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeFailure {
    /// No such stream.
    #[error("no stream {0}")]
    NotFound(StreamKey),
    /// `avars` refused.
    #[error(transparent)]
    Avars(#[from] AvarsError),
    /// Resume token refused by MongoDB, or MongoDB unreachable.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// The worker's cursor did not open in time.
    #[error("the change stream could not be opened in time; MongoDB may be unavailable")]
    NotReady,
    /// The stream filters by token claims and this client's claims do not allow routing.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// A new cursor would exceed `limits.max_workers` or `limits.max_bindings_per_stream`.
    #[error(transparent)]
    Upstream(#[from] UpstreamLimit),
    /// A new binding would exceed the principal's `limits.new_bindings_per_minute`.
    #[error(transparent)]
    Bindings(#[from] BindingsRefused),
}

/// Who subscribes, as far as the registry cares.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requester<'a> {
    /// The verified token claims, for `match` rules (`None` with auth off).
    pub claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// Who a new binding is counted against (`limits.new_bindings_per_minute`); `None`: nobody.
    pub principal: Option<&'a PrincipalKey>,
}

/// A requester known by its claims only (counted against nobody).
impl<'a> From<Option<&'a serde_json::Map<String, serde_json::Value>>> for Requester<'a> {
    fn from(claims: Option<&'a serde_json::Map<String, serde_json::Value>>) -> Requester<'a> {
        Requester {
            claims,
            principal: None,
        }
    }
}

/// The running workers by key. Guarded by a plain mutex: every critical section is a
/// lookup/insert/remove, never an await. Client counts go up only under this lock (see
/// `subscribe`), and a worker retires only if, under it, it still has no clients.
#[derive(Default)]
struct Workers {
    map: Mutex<HashMap<WorkerKey, Arc<Worker>>>,
}

impl Owner for Workers {
    fn retire_if_idle(&self, worker: &Arc<Worker>) -> bool {
        let mut map = lock(&self.map);
        if worker.client_count() != 0 {
            return false;
        }
        if map.get(&worker.key).is_some_and(|w| Arc::ptr_eq(w, worker)) {
            map.remove(&worker.key);
        }
        true
    }

    fn unregister(&self, worker: &Arc<Worker>) {
        let mut map = lock(&self.map);
        if map.get(&worker.key).is_some_and(|w| Arc::ptr_eq(w, worker)) {
            map.remove(&worker.key);
        }
    }

    fn free_idle_slot(&self) -> bool {
        let mut map = lock(&self.map);
        evict_longest_idle(&mut map, None, None)
    }
}

/// Closes the worker without clients that has been idle longest (of `stream`, if given), under
/// the worker-map lock (`map`), and frees its cursor slot; returns whether there was one. Its
/// client count is read under that lock, where counts go up, so it stays 0 until the lock goes.
fn evict_longest_idle(
    map: &mut HashMap<WorkerKey, Arc<Worker>>,
    stream: Option<&StreamKey>,
    started_by: Option<&PrincipalKey>,
) -> bool {
    let now = Instant::now();
    let idle = map
        .values()
        .filter(|worker| worker.client_count() == 0)
        .filter(|worker| stream.is_none_or(|stream| &worker.key.stream == stream))
        .filter(|worker| started_by.is_none_or(|p| worker.started_by() == Some(p)))
        .min_by_key(|worker| worker.idle_since().unwrap_or(now))
        .cloned();
    let Some(idle) = idle else {
        return false;
    };
    map.remove(&idle.key);
    // Dropped here: the slot is free before the caller tries again.
    if let Some(permit) = idle.evict() {
        permit.evicted();
    }
    true
}

/// How many bindings `principal` started that have no client left (under the map lock).
fn idle_bindings_of(map: &HashMap<WorkerKey, Arc<Worker>>, principal: &PrincipalKey) -> usize {
    map.values()
        .filter(|worker| worker.client_count() == 0 && worker.started_by() == Some(principal))
        .count()
}

/// Definitions and workers.
pub struct Registry {
    context: Arc<WorkerContext>,
    workers: Arc<Workers>,
    definitions: RwLock<BTreeMap<StreamKey, Arc<StreamEntry>>>,
    next_revision: Mutex<u64>,
    cancel: CancellationToken,
}

impl Registry {
    /// An empty registry. Workers run on `tracker` and stop when `cancel` fires.
    pub fn new(
        client: mongodb::Client,
        settings: WorkerSettings,
        budget: CursorBudget,
        cancel: CancellationToken,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Registry {
        let workers = Arc::new(Workers::default());
        Registry {
            context: WorkerContext::new(
                client,
                settings,
                metrics,
                tracker,
                budget,
                Arc::clone(&workers) as Arc<dyn Owner>,
            ),
            workers,
            definitions: RwLock::new(BTreeMap::new()),
            next_revision: Mutex::new(1),
            cancel,
        }
    }

    /// The MongoDB client shared by all workers.
    pub fn mongo(&self) -> &mongodb::Client {
        &self.context.client
    }

    /// Puts every worker started from now on behind the relay tier (`[relay]`); set once, at
    /// startup, before any worker runs.
    pub(crate) fn set_relay(&self, relay: Arc<dyn crate::worker::relayed::Relay>) {
        let _ = self.context.relay.set(relay);
    }

    /// In relay mode, whether the relay's server is reachable now; `None` without a relay.
    pub fn relay_reachable(&self) -> Option<bool> {
        self.context.relay.get().map(|relay| relay.reachable())
    }

    /// Looks up a definition.
    pub fn get(&self, key: &StreamKey) -> Option<Arc<StreamEntry>> {
        crate::sync::read(&self.definitions).get(key).cloned()
    }

    /// Every definition, ordered by key.
    pub fn list(&self) -> Vec<Arc<StreamEntry>> {
        crate::sync::read(&self.definitions)
            .values()
            .cloned()
            .collect()
    }

    fn next_revision(&self) -> u64 {
        let mut next = lock(&self.next_revision);
        *next += 1;
        *next
    }

    /// Adds or replaces a definition. Returns `true` when it was new. Workers of a replaced
    /// definition end with `cancel` (clients reconnect onto the new revision).
    pub fn upsert(&self, key: StreamKey, definition: CompiledDefinition, origin: Origin) -> bool {
        let revision = self.next_revision();
        let entry = Arc::new(StreamEntry {
            key: key.clone(),
            definition,
            origin,
            revision,
        });
        let previous = crate::sync::write(&self.definitions).insert(key.clone(), entry);
        if previous.is_some() {
            self.cancel_workers(
                &key,
                Some(revision),
                "the stream definition was replaced; reconnect to get the new one",
            );
        }
        previous.is_none()
    }

    /// Applies a definition from the admin store, idempotently: an identical definition changes
    /// nothing (no new revision, no `cancel`), and a static definition is never overridden.
    pub fn put_stored(&self, key: StreamKey, definition: CompiledDefinition) -> Applied {
        let (applied, revision) = {
            let mut definitions = crate::sync::write(&self.definitions);
            let applied = match definitions.get(&key) {
                None => Applied::Created,
                Some(current) if current.origin == Origin::Static => return Applied::Static,
                Some(current) if current.definition.source == definition.source => {
                    return Applied::Unchanged;
                }
                Some(_) => Applied::Replaced,
            };
            let revision = self.next_revision();
            let entry = Arc::new(StreamEntry {
                key: key.clone(),
                definition,
                origin: Origin::Stored,
                revision,
            });
            definitions.insert(key.clone(), entry);
            (applied, revision)
        };
        if applied == Applied::Replaced {
            self.cancel_workers(
                &key,
                Some(revision),
                "the stream definition was replaced; reconnect to get the new one",
            );
        }
        applied
    }

    /// Removes a stored definition (never a static one); its clients get `cancel`.
    pub fn remove_stored(&self, key: &StreamKey) -> Removed {
        {
            let mut definitions = crate::sync::write(&self.definitions);
            match definitions.get(key) {
                None => return Removed::Absent,
                Some(current) if current.origin == Origin::Static => return Removed::Static,
                Some(_) => {
                    definitions.remove(key);
                }
            }
        }
        self.cancel_workers(key, None, "the stream was deleted");
        Removed::Removed
    }

    /// Ends the stream's workers with `cancel`, except those of revision `keep` (the current
    /// one: a client may already have reconnected onto it).
    fn cancel_workers(&self, key: &StreamKey, keep: Option<u64>, message: &str) {
        for worker in self.workers_of(key) {
            if Some(worker.key.revision) != keep {
                worker.terminate(Event::control(EventKind::Cancel, message, false));
            }
        }
    }

    /// Running workers of a stream (any revision, any variables).
    pub fn workers_of(&self, key: &StreamKey) -> Vec<Arc<Worker>> {
        lock(&self.workers.map)
            .values()
            .filter(|w| &w.key.stream == key)
            .cloned()
            .collect()
    }

    /// Every running worker.
    pub fn all_workers(&self) -> Vec<Arc<Worker>> {
        lock(&self.workers.map).values().cloned().collect()
    }

    /// Subscribes a client: finds or starts the worker, then attaches (resuming after `resume`).
    /// The requester's claims are used by `match` rules; a new binding counts against its
    /// principal.
    pub async fn subscribe(
        &self,
        key: &StreamKey,
        avars: Option<&str>,
        resume: Option<Token>,
        requester: Requester<'_>,
    ) -> Result<Subscription, SubscribeFailure> {
        let (guard, filter) = self.attach(key, avars, requester).await?;
        Ok(Subscription::start(guard, resume, filter).await?)
    }

    /// Counts a client on the stream's worker (started if needed) once its cursor is open,
    /// without reading yet: the caller picks the position (a snapshot reads its cluster time
    /// from the worker first). Returns the client's routing filter too.
    pub async fn attach(
        &self,
        key: &StreamKey,
        avars: Option<&str>,
        requester: Requester<'_>,
    ) -> Result<(ClientGuard, Option<Arc<ClientFilter>>), SubscribeFailure> {
        let avars = parse_avars(avars)?;
        let (guard, filter) = loop {
            let entry = self
                .get(key)
                .ok_or_else(|| SubscribeFailure::NotFound(key.clone()))?;
            let binding = entry.definition.bind(key, &avars)?;
            let filter =
                ClientFilter::build(&binding.spec.routing, requester.claims, &binding.routed)?;
            let spec = binding.spec;
            let worker_key = WorkerKey {
                stream: key.clone(),
                revision: entry.revision,
                vars: binding.vars,
            };
            let mut map = lock(&self.workers.map);
            // A replace or delete between the lookup above and here would have missed a worker
            // started now for the old revision: check again under the map lock, which
            // `cancel_workers` also takes.
            match self.get(key) {
                Some(current) if current.revision == entry.revision => {}
                Some(_) => continue,
                None => return Err(SubscribeFailure::NotFound(key.clone())),
            }
            let existing = map.get(&worker_key).filter(|w| !w.is_finished()).cloned();
            let worker = match existing {
                Some(worker) => worker,
                None => {
                    // Variables kept in the pipeline: a binding the client chose, which is
                    // what a churning client would multiply.
                    let chosen = worker_key.vars != "{}";
                    let principal = requester.principal.filter(|_| chosen);
                    // The worker holds its cursor slot for as long as it lives.
                    let permit = self.new_worker_slot(&mut map, key, principal)?;
                    let worker = Worker::new(
                        worker_key.clone(),
                        spec,
                        &self.context,
                        &self.cancel,
                        permit,
                    );
                    if let Some(principal) = principal {
                        worker.set_started_by(principal.clone());
                    }
                    map.insert(worker_key, Arc::clone(&worker));
                    worker.spawn();
                    worker
                }
            };
            // Counted under the map lock: an idle worker cannot retire between lookup and
            // count. The guard uncounts however this future ends, even dropped mid-`ready`.
            break (ClientGuard::new(worker), filter);
        };
        // A first client waits this long for a new worker's cursor before getting 503.
        let wait = self.context.settings.cursor_open_wait;
        if !guard.worker().ready(wait).await {
            return Err(SubscribeFailure::NotReady);
        }
        Ok((guard, filter))
    }

    /// A cursor slot for a new worker of `key`, taken under the worker-map lock (`map`): a
    /// free one, else the slot of the longest-idle worker that could make room (see the module
    /// doc). A new binding takes one of `principal`'s first, given back if no slot is found.
    fn new_worker_slot(
        &self,
        map: &mut HashMap<WorkerKey, Arc<Worker>>,
        key: &StreamKey,
        principal: Option<&PrincipalKey>,
    ) -> Result<CursorPermit, SubscribeFailure> {
        let budget = &self.context.budget;
        if let Some(principal) = principal {
            budget.take_binding(principal)?;
            // The principal's lingering bindings, bounded: a client that opens and drops
            // bindings leaves `idle_bindings_per_principal` cursors behind, not one per binding
            // of the last `worker_linger_ms` (each a cursor every write costs MongoDB).
            if let Some(bound) = budget.idle_bindings_per_principal() {
                // (Each counted in `streamgate_upstream_idle_evictions_total`.)
                while idle_bindings_of(map, principal) >= bound
                    && evict_longest_idle(map, None, Some(principal))
                {}
            }
        }
        let slot = budget.try_acquire_evicting(key, |limit| {
            // For the stream's own limit only one of its workers can make room.
            let stream = (limit == CursorLimit::MaxBindingsPerStream).then_some(key);
            evict_longest_idle(map, stream, None)
        });
        if slot.is_err()
            && let Some(principal) = principal
        {
            budget.refund_binding(principal);
        }
        Ok(slot?)
    }
}

/// The lag gauge reads every running worker of the registry.
impl crate::metrics::LagSource for Registry {
    fn lags(&self, now_ms: u64) -> Vec<(String, f64)> {
        self.all_workers()
            .iter()
            .filter(|worker| worker.state() != crate::worker::WorkerState::Stopped)
            .map(|worker| (worker.key.stream.to_string(), worker.lag_seconds(now_ms)))
            .collect()
    }
}
