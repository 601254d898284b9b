//! The seam of the relay tier (`[relay]`, `src/relay/`): in relay mode a worker's steps come
//! from the fleet's shared log, into which exactly one instance's cursor writes, rather than
//! from a cursor of its own. They are applied exactly as a cursor's steps are (`cursor.rs`,
//! `Worker::apply`), so the ring, catch-ups, the document view, multi-stream connections and
//! routing work unchanged. The relay sits above `worker/` and implements these traits.
//!
//! A catch-up (`catchup.rs`) for a client older than the worker's ring asks the relay first
//! ([`Relay::window`]): while the log still holds everything after the client's position, the
//! catch-up reads it from there instead of opening a MongoDB cursor.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::Worker;
use super::hub::Routed;
use super::source::Step;
use crate::event::Token;

/// A relay tier the workers of a registry read through.
pub(crate) trait Relay: Send + Sync {
    /// Where `worker`'s steps come from (its cursor, if this instance wins it, runs beside).
    fn source(self: Arc<Self>, worker: &Arc<Worker>) -> Box<dyn RelayedSource>;
    /// Whether the relay's server can be reached now (readiness).
    fn reachable(&self) -> bool;
    /// `worker`'s steps after `after`, read from the relay's retained log, when that log still
    /// holds everything after it; `None` (it does not, or the relay cannot say now): the
    /// catch-up reads them from MongoDB.
    fn window(
        self: Arc<Self>,
        worker: &Arc<Worker>,
        after: Token,
    ) -> BoxFuture<'static, Option<Box<dyn WindowSource>>>;
}

/// One worker's steps, read from the relay.
pub(crate) trait RelayedSource: Send {
    /// The next step to apply (cancel-safe: dropping the future loses nothing).
    fn next(&mut self) -> BoxFuture<'_, Step<Routed>>;
}

/// A catch-up's steps read from the relay's retained log: first `Opened(Some(after))`, then
/// every step after that position, in order, each change once, as a cursor `resumeAfter` it
/// would give them.
pub(crate) trait WindowSource: Send {
    /// The next step (cancel-safe); `None` when the log can no longer serve the catch-up (the
    /// relay failed, or retention dropped what came next): it goes on from MongoDB after the
    /// last position it was given.
    fn next(&mut self) -> BoxFuture<'_, Option<Step<Routed>>>;
}
