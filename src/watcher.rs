//! One watcher loop for every collection kept in memory from MongoDB: the stored stream
//! definitions (`streams/store.rs`) and the stored permission rules (`auth/store.rs`).
//!
//! A store implements [`Watched::sync_and_watch`], one pass: open the change stream *first*,
//! load everything, mark itself synced, then apply changes until the stream ends or fails.
//! The loop here runs passes until shutdown, starting over after each with [`Backoff`] (reset
//! by a pass that loaded), and keeps the store's [`SyncFlag`] false between passes, so
//! readiness and startup can wait for a loaded store.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::sync::SyncFlag;

/// First wait before a watcher starts over after an error; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts of a watcher.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A store that follows a MongoDB collection with one watcher task.
pub trait Watched: Send + Sync + 'static {
    /// What is watched, for logs (`definitions`, `rules`).
    const WHAT: &'static str;
    /// Why a pass failed (logged; the watcher then starts over after a backoff).
    type Error: Display + Send;

    /// The flag the store sets once a pass has loaded (and this loop clears between passes).
    fn synced_flag(&self) -> &SyncFlag;

    /// One pass: watch, load, set [`Watched::synced_flag`] and reset `backoff`, then apply
    /// changes until the stream ends (returns why) or fails.
    fn sync_and_watch(
        &self,
        backoff: &mut Backoff,
    ) -> impl Future<Output = Result<&'static str, Self::Error>> + Send;

    /// Starts the watcher on `tracker`; it stops when `cancel` fires.
    fn spawn_watcher(self: &Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken)
    where
        Self: Sized,
    {
        tracker.spawn(watch_loop(Arc::clone(self), cancel));
    }

    /// Waits until the watcher has loaded, at most `timeout`; returns whether it did.
    fn wait_synced(&self, timeout: Duration) -> impl Future<Output = bool> + Send {
        self.synced_flag().wait(timeout)
    }

    /// Whether the watcher is currently loaded and watching.
    fn is_synced(&self) -> bool {
        self.synced_flag().get()
    }
}

/// Passes of `store` until `cancel` fires, with backoff between them.
async fn watch_loop<S: Watched>(store: Arc<S>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = store.sync_and_watch(&mut backoff) => result,
        };
        let delay = backoff.next_delay();
        store.synced_flag().set(false);
        match result {
            Ok(reason) => tracing::info!(reason, "{} watcher starting over", S::WHAT),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?delay, "{} watcher failed; retrying", S::WHAT)
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
