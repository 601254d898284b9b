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
use crate::metrics::Metrics;
use crate::worker::subscription::SubscribeError;
use crate::worker::{Subscription, Worker, WorkerKey, WorkerMap, WorkerSettings, lock};

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
}

/// Definitions and workers.
pub struct Registry {
    client: mongodb::Client,
    settings: WorkerSettings,
    definitions: RwLock<BTreeMap<StreamKey, Arc<StreamEntry>>>,
    workers: WorkerMap,
    next_revision: Mutex<u64>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// An empty registry. Workers run on `tracker` and stop when `cancel` fires.
    pub fn new(
        client: mongodb::Client,
        settings: WorkerSettings,
        cancel: CancellationToken,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Registry {
        Registry {
            client,
            settings,
            definitions: RwLock::new(BTreeMap::new()),
            workers: Arc::new(Mutex::new(HashMap::new())),
            next_revision: Mutex::new(1),
            cancel,
            tracker,
            metrics,
        }
    }

    /// The MongoDB client shared by all workers.
    pub fn mongo(&self) -> &mongodb::Client {
        &self.client
    }

    /// Looks up a definition.
    pub fn get(&self, key: &StreamKey) -> Option<Arc<StreamEntry>> {
        self.definitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Every definition, ordered by key.
    pub fn list(&self) -> Vec<Arc<StreamEntry>> {
        self.definitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Adds or replaces a definition. Returns `true` when it was new. Workers of a replaced
    /// definition end with `cancel` (clients reconnect onto the new revision).
    pub fn upsert(&self, key: StreamKey, definition: CompiledDefinition, origin: Origin) -> bool {
        let revision = {
            let mut next = lock(&self.next_revision);
            *next += 1;
            *next
        };
        let entry = Arc::new(StreamEntry {
            key: key.clone(),
            definition,
            origin,
            revision,
        });
        let previous = self
            .definitions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), entry);
        if previous.is_some() {
            self.cancel_workers(
                &key,
                "the stream definition was replaced; reconnect to get the new one",
            );
        }
        previous.is_none()
    }

    /// Removes a definition; its clients get `cancel`. Returns whether it existed.
    pub fn remove(&self, key: &StreamKey) -> bool {
        let removed = self
            .definitions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .is_some();
        if removed {
            self.cancel_workers(key, "the stream was deleted");
        }
        removed
    }

    fn cancel_workers(&self, key: &StreamKey, message: &str) {
        for worker in self.workers_of(key) {
            worker.terminate(Event::control(EventKind::Cancel, message, false));
        }
    }

    /// Running workers of a stream (any revision, any variables).
    pub fn workers_of(&self, key: &StreamKey) -> Vec<Arc<Worker>> {
        lock(&self.workers)
            .values()
            .filter(|w| &w.key.stream == key)
            .cloned()
            .collect()
    }

    /// Every running worker.
    pub fn all_workers(&self) -> Vec<Arc<Worker>> {
        lock(&self.workers).values().cloned().collect()
    }

    /// Subscribes a client: finds or starts the worker, then attaches (resuming after `resume`).
    pub async fn subscribe(
        &self,
        key: &StreamKey,
        avars: Option<&str>,
        resume: Option<Token>,
        transport: usize,
    ) -> Result<Subscription, SubscribeFailure> {
        let entry = self
            .get(key)
            .ok_or_else(|| SubscribeFailure::NotFound(key.clone()))?;
        let avars = parse_avars(avars)?;
        let (spec, vars) = entry.definition.bind(key, &avars)?;
        let worker_key = WorkerKey {
            stream: key.clone(),
            revision: entry.revision,
            vars,
        };
        let worker = {
            let mut map = lock(&self.workers);
            let existing = map.get(&worker_key).filter(|w| !w.is_finished()).cloned();
            let worker = match existing {
                Some(worker) => worker,
                None => {
                    let worker = Worker::new(
                        worker_key.clone(),
                        spec,
                        self.client.clone(),
                        self.settings.clone(),
                        &self.cancel,
                        Arc::clone(&self.metrics),
                        Arc::clone(&self.workers),
                    );
                    map.insert(worker_key, Arc::clone(&worker));
                    worker.spawn(&self.tracker);
                    worker
                }
            };
            // Counted under the map lock: an idle worker cannot retire between lookup and count.
            worker.add_client();
            worker
        };
        if !worker.ready(READY_TIMEOUT).await {
            worker.remove_client();
            return Err(SubscribeFailure::NotReady);
        }
        // From here the subscription's guard owns the client count.
        Ok(Subscription::start(worker, transport, resume).await?)
    }
}
