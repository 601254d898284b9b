//! The seam of the relay tier (`[relay]`, `src/relay/`): in relay mode a worker's steps come
//! from the fleet's shared log, into which exactly one instance's cursor writes, rather than
//! from a cursor of its own. They are applied exactly as a cursor's steps are (`cursor.rs`,
//! `Worker::apply`), so the ring, catch-ups, the document view, multi-stream connections and
//! routing work unchanged. The relay sits above `worker/` and implements these traits.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::Worker;
use super::hub::Routed;
use super::source::Step;

/// A relay tier the workers of a registry read through.
pub(crate) trait Relay: Send + Sync {
    /// Where `worker`'s steps come from (its cursor, if this instance wins it, runs beside).
    fn source(self: Arc<Self>, worker: &Arc<Worker>) -> Box<dyn RelayedSource>;
    /// Whether the relay's server can be reached now (readiness).
    fn reachable(&self) -> bool;
}

/// One worker's steps, read from the relay.
pub(crate) trait RelayedSource: Send {
    /// The next step to apply (cancel-safe: dropping the future loses nothing).
    fn next(&mut self) -> BoxFuture<'_, Step<Routed>>;
}
