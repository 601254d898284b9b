//! The worker's cursor loop: read steps from the [`ChangeSource`], publish, linger, stop.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::feed::{Membership, Signal};
use super::hub::Routed;
use super::membership::{PreImages, check_pre_images};
use super::relayed::RelayedSource;
use super::source::{ServerFeatures, Step, WorkerSource};
use super::{Worker, WorkerState, lock};
use crate::event::{ErrorCode, Event, EventKind};

/// What to do after a step.
pub(super) enum Flow {
    Continue,
    Stop,
}

impl Flow {
    /// Whether the worker ended.
    pub(super) fn is_stop(&self) -> bool {
        matches!(self, Flow::Stop)
    }
}

impl Worker {
    /// The cursor loop. Returns when the worker is cancelled, retired or ended.
    pub(super) async fn run(self: Arc<Self>) {
        tracing::info!(stream = %self.key.stream, vars = %self.key.vars, "worker started");
        // Cached once known; a server that cannot answer now gets the defaults for this worker.
        let features = self
            .context
            .features
            .get_or_try_init(|| async {
                ServerFeatures::detect(&self.context.client).await.ok_or(())
            })
            .await
            .copied()
            .unwrap_or_default();
        let _ = self.features.set(features);
        self.check_pre_images().await;
        let mut source = match self.context.relay.get() {
            // Relay mode: one instance of the fleet holds the cursor (`src/relay`).
            Some(relay) => Upstream::Relayed(Arc::clone(relay).source(&self)),
            None => match self.context.feeds.join(&self.context, &self) {
                Some(membership) => {
                    self.stats.on_database_feed.store(true, Ordering::Relaxed);
                    Upstream::Shared(membership)
                }
                None => Upstream::Own(Box::new(WorkerSource::new(&self, None))),
            },
        };
        let mut idle_since: Option<Instant> = None;
        loop {
            if self.cancel_token().is_cancelled() || self.lingered_out(&mut idle_since) {
                break;
            }
            let linger_end = idle_since.map(|since| since + self.settings().linger);
            let step = tokio::select! {
                _ = self.cancel_token().cancelled() => break,
                // The last client left: start the linger clock now, not after the next batch.
                _ = self.idle.notified(), if idle_since.is_none() => continue,
                _ = sleep_until(linger_end) => continue,
                step = source.next(&self) => step,
            };
            // `None`: the feed applied this worker's last step itself.
            if step.is_none_or(|step| self.apply(step).is_stop()) {
                break;
            }
        }
        self.state.send_replace(WorkerState::Stopped);
        self.unregister();
        self.cancel_token().cancel();
        self.catch_ups.notify_ended();
        tracing::info!(stream = %self.key.stream, vars = %self.key.vars, "worker stopped");
    }

    /// A membership stream (PROTOCOL.md §10) needs its collection's pre-images: turn them on
    /// when configured to, else say which command would (log, metric, admin stats).
    async fn check_pre_images(&self) {
        let Some(membership) = &self.spec().membership else {
            return;
        };
        let enable = membership.enable_pre_images || self.settings().enable_pre_images;
        let spec = self.spec();
        match check_pre_images(&self.context.client, &spec.db, &spec.coll, enable).await {
            PreImages::On => {}
            PreImages::Enabled => {
                tracing::info!(stream = %self.key.stream, "turned on changeStreamPreAndPostImages for membership");
            }
            PreImages::Off(warning) => {
                tracing::warn!(stream = %self.key.stream, "{warning}");
                self.metrics().membership_pre_images_off.inc();
                let _ = self.pre_images_warning.set(warning);
            }
        }
    }

    /// Tracks the linger clock; `true` when the worker has been idle for `linger` and retired.
    fn lingered_out(self: &Arc<Self>, idle_since: &mut Option<Instant>) -> bool {
        if self.client_count() != 0 {
            *idle_since = None;
            return false;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.settings().linger && self.retire_if_idle() {
            tracing::info!(stream = %self.key.stream, "worker idle, stopping");
            return true;
        }
        false
    }

    /// Applies one step of the source to the hub (from this worker's loop, or from its
    /// database feed's task).
    pub(super) fn apply(&self, step: Step) -> Flow {
        match step {
            Step::Opened(start) => {
                {
                    let mut hub = lock(&self.hub);
                    if hub.coverage_start.is_none() {
                        hub.coverage_start = start.clone();
                    }
                    if hub.position.is_none() {
                        hub.position = start;
                    }
                }
                if self.state() == WorkerState::Retrying {
                    tracing::info!(stream = %self.key.stream, "cursor resumed");
                }
                self.state.send_replace(WorkerState::Running);
            }
            Step::Change(routed) => self.publish(routed),
            Step::Quiet(Some(token)) => {
                lock(&self.hub).advance(token);
                // An empty batch: the cursor has read everything MongoDB holds, as of now.
                self.read_through(crate::metrics::now_ms());
            }
            Step::Quiet(None) => {}
            Step::Invalidated(event) => {
                tracing::info!(stream = %self.key.stream, "collection invalidated");
                self.end(event);
                return Flow::Stop;
            }
            Step::Retrying(error) => {
                tracing::warn!(stream = %self.key.stream, %error, "cursor lost, retrying");
                self.metrics().worker_retries.inc();
                self.state.send_replace(WorkerState::Retrying);
            }
            Step::Failed(code, message) => {
                self.fail(code, &message);
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn fail(&self, code: ErrorCode, message: &str) {
        tracing::error!(stream = %self.key.stream, code = code.as_str(), message, "worker failed");
        self.end(Arc::new(Event::control(
            EventKind::Error(code),
            message,
            false,
        )));
    }
}

/// Where a worker's changes come from.
enum Upstream {
    /// A cursor of its own.
    Own(Box<WorkerSource>),
    /// Its database's shared cursor (whose task applies the steps to this worker).
    Shared(Membership),
    /// The relay tier's log of the fleet's one cursor for it.
    Relayed(Box<dyn RelayedSource>),
}

impl Upstream {
    /// The next step to apply (cancel-safe); `None` once the feed has ended the worker. A feed
    /// that cannot serve the worker is replaced by a cursor of its own, from where the feed
    /// served it through (from now if it had not been served yet).
    async fn next(&mut self, worker: &Arc<Worker>) -> Option<Step<Routed>> {
        loop {
            match self {
                Upstream::Own(source) => return Some(source.next().await),
                Upstream::Relayed(source) => return Some(source.next().await),
                Upstream::Shared(membership) => match membership.done().await {
                    Signal::Ended => return None,
                    Signal::Serving | Signal::OwnCursor => {
                        tracing::warn!(stream = %worker.key.stream, "the database feed cannot serve this stream; opening its own cursor");
                        worker
                            .stats
                            .on_database_feed
                            .store(false, Ordering::Relaxed);
                        let served = worker.position();
                        *self = Upstream::Own(Box::new(WorkerSource::new(worker, served)));
                    }
                },
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Token;
    use std::time::Duration;

    fn token(n: u32) -> Token {
        Token::parse(&format!("8200000001{n:08}")).unwrap()
    }

    /// A cursor opened "from now" that tells its place only later: the worker is ready from
    /// that first position on, and a client that has seen it is covered.
    #[tokio::test]
    async fn a_cursor_opened_without_a_position_is_ready_at_its_first_post_batch_token() {
        let worker = crate::worker::test_worker(10).await;
        assert!(!worker.apply(Step::Opened(None)).is_stop());
        assert!(
            !worker.ready(Duration::from_millis(50)).await,
            "no position yet"
        );
        assert!(!worker.apply(Step::Quiet(Some(token(3)))).is_stop());
        assert!(worker.ready(Duration::from_millis(50)).await);
        assert!(lock(&worker.hub).covers(&token(3)));
        assert!(!lock(&worker.hub).covers(&token(2)));
    }

    /// The same when the first thing after the open is a change.
    #[tokio::test]
    async fn a_cursor_opened_without_a_position_is_ready_at_its_first_change() {
        let worker = crate::worker::test_worker(10).await;
        assert!(!worker.apply(Step::Opened(None)).is_stop());
        worker.publish_change_for_test(mongodb::bson::doc! {
            "_id": { "_data": token(5).as_str() }, "operationType": "insert", "fullDocument": {}
        });
        assert!(worker.ready(Duration::from_millis(50)).await);
        assert!(lock(&worker.hub).covers(&token(5)));
        assert!(!lock(&worker.hub).covers(&token(4)));
    }
}
