//! The registry: stream definitions by key, and the workers serving them.
//!
//! Definitions come from the config file (static) or the admin API (stored). A client's
//! subscribe looks up the definition, binds its variables, and finds or starts the one worker
//! for that (stream, revision, variables). Replacing or deleting a definition ends its workers
//! with a `cancel` event; clients reconnect and land on the new revision.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::definition::{AvarsError, CompiledDefinition, StreamKey, parse_avars};
use crate::event::{Event, EventKind, Token};
use crate::limits::{CursorBudget, UpstreamLimit};
use crate::metrics::Metrics;
use crate::routing::{ClientFilter, FilterError};
use crate::worker::subscription::SubscribeError;
use crate::worker::{
    ClientGuard, Owner, Subscription, Worker, WorkerContext, WorkerKey, WorkerSettings, lock,
};

/// How long a first client waits for a new worker's cursor before getting 503.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// `claims` are the client's verified token claims, used by `match` rules.
    pub async fn subscribe(
        &self,
        key: &StreamKey,
        avars: Option<&str>,
        resume: Option<Token>,
        claims: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Subscription, SubscribeFailure> {
        let (guard, filter) = self.attach(key, avars, claims).await?;
        Ok(Subscription::start(guard, resume, filter).await?)
    }

    /// Counts a client on the stream's worker (started if needed) once its cursor is open,
    /// without reading yet: the caller picks the position (a snapshot reads its cluster time
    /// from the worker first). Returns the client's routing filter too.
    pub async fn attach(
        &self,
        key: &StreamKey,
        avars: Option<&str>,
        claims: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<(ClientGuard, Option<Arc<ClientFilter>>), SubscribeFailure> {
        let avars = parse_avars(avars)?;
        let (guard, filter) = loop {
            let entry = self
                .get(key)
                .ok_or_else(|| SubscribeFailure::NotFound(key.clone()))?;
            let binding = entry.definition.bind(key, &avars)?;
            let filter = ClientFilter::build(&binding.spec.routing, claims, &binding.routed)?;
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
                    // The worker holds its cursor slot for as long as it lives.
                    let permit = self.context.budget.try_acquire(key)?;
                    let worker = Worker::new(
                        worker_key.clone(),
                        spec,
                        &self.context,
                        &self.cancel,
                        permit,
                    );
                    map.insert(worker_key, Arc::clone(&worker));
                    worker.spawn();
                    worker
                }
            };
            // Counted under the map lock: an idle worker cannot retire between lookup and
            // count. The guard uncounts however this future ends, even dropped mid-`ready`.
            break (ClientGuard::new(worker), filter);
        };
        if !guard.worker().ready(READY_TIMEOUT).await {
            return Err(SubscribeFailure::NotReady);
        }
        Ok((guard, filter))
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
