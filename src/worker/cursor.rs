//! The worker's cursor loop: open, read, publish, reopen from the last token on failure.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mongodb::bson::Document;
use mongodb::change_stream::ChangeStream;
use tokio::time::Instant;

use super::errors::{Disposition, classify};
use super::routing::{RouteValues, route_values};
use super::{Worker, WorkerState, lock};
use crate::event::{EncodeError, ErrorCode, Event, EventKind, Token};

/// Backoff before the first reconnect attempt; doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Opens a change stream on the worker's collection, optionally resuming after `after`.
pub(crate) async fn open_cursor(
    worker: &Worker,
    after: Option<&Token>,
) -> mongodb::error::Result<ChangeStream<Document>> {
    let spec = worker.spec();
    let mut options = spec.options();
    options.max_await_time = Some(worker.settings().max_await);
    options.resume_after = after.and_then(Token::to_driver);
    let stream = worker
        .client()
        .database(&spec.db)
        .collection::<Document>(&spec.coll)
        .watch()
        .pipeline(spec.pipeline.clone())
        .with_options(options)
        .await?
        .with_type::<Document>();
    worker.stats.cursors_opened.fetch_add(1, Ordering::Relaxed);
    worker.metrics().cursors_opened.inc();
    Ok(stream)
}

impl Worker {
    /// The cursor loop. Returns when the worker is cancelled, retired or ended.
    pub(super) async fn run(self: Arc<Self>) {
        let mut backoff = FIRST_BACKOFF;
        let mut cursor: Option<ChangeStream<Document>> = None;
        let mut idle_since: Option<Instant> = None;
        tracing::info!(stream = %self.key.stream, vars = %self.key.vars, "worker started");
        loop {
            if self.cancel_token().is_cancelled() {
                break;
            }
            // Linger: checked between reads, which return at least every `max_await`.
            if self.client_count() == 0 {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.settings().linger && self.retire_if_idle() {
                    tracing::info!(stream = %self.key.stream, "worker idle, stopping");
                    break;
                }
            } else {
                idle_since = None;
            }

            let Some(stream) = cursor.as_mut() else {
                let position = lock(&self.hub).position.clone();
                let opened = tokio::select! {
                    _ = self.cancel_token().cancelled() => break,
                    opened = open_cursor(&self, position.as_ref()) => opened,
                };
                match opened {
                    Ok(stream) => {
                        {
                            let mut hub = lock(&self.hub);
                            let start = stream.resume_token().as_ref().and_then(Token::from_driver);
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
                        backoff = FIRST_BACKOFF;
                        cursor = Some(stream);
                    }
                    Err(error) => {
                        if !self.on_error(&error, &mut backoff).await {
                            break;
                        }
                    }
                }
                continue;
            };

            let next = tokio::select! {
                _ = self.cancel_token().cancelled() => break,
                // Also wake when the last client leaves, to start the linger clock promptly.
                _ = self.idle.notified(), if self.client_count() == 0 && idle_since.is_none() => continue,
                next = stream.next_if_any() => next,
            };
            match next {
                Ok(Some(change)) => match self.encode(change) {
                    Ok((event, values)) => {
                        let terminal = event.kind.is_terminal();
                        self.publish(Arc::new(event), values);
                        if terminal {
                            tracing::info!(stream = %self.key.stream, "collection invalidated");
                            break;
                        }
                    }
                    Err(error) => {
                        self.fail(ErrorCode::Upstream, &error.to_string());
                        break;
                    }
                },
                Ok(None) => {
                    if !stream.is_alive() {
                        // The server closed the cursor after an invalidate our pipeline
                        // filtered out: the stream is over all the same.
                        self.publish(
                            Arc::new(Event::control(
                                EventKind::Invalidate,
                                "the collection was dropped or renamed",
                                false,
                            )),
                            no_values(),
                        );
                        break;
                    }
                    if let Some(token) = stream.resume_token().as_ref().and_then(Token::from_driver)
                    {
                        lock(&self.hub).position = Some(token);
                    }
                }
                Err(error) => {
                    cursor = None;
                    if !self.on_error(&error, &mut backoff).await {
                        break;
                    }
                }
            }
        }
        self.state.send_replace(WorkerState::Stopped);
        self.unregister();
        self.cancel_token().cancel();
        tracing::info!(stream = %self.key.stream, vars = %self.key.vars, "worker stopped");
    }

    /// Handles a cursor error: backs off and returns `true` to retry, or tells the clients and
    /// returns `false`.
    async fn on_error(&self, error: &mongodb::error::Error, backoff: &mut Duration) -> bool {
        match classify(error) {
            Disposition::Retry => {
                tracing::warn!(stream = %self.key.stream, %error, retry_in = ?backoff, "cursor lost, retrying");
                self.metrics().worker_retries.inc();
                self.state.send_replace(WorkerState::Retrying);
                tokio::select! {
                    _ = self.cancel_token().cancelled() => return false,
                    _ = tokio::time::sleep(*backoff) => {}
                }
                *backoff = (*backoff * 2).min(self.settings().max_backoff);
                true
            }
            Disposition::HistoryLost(message) => {
                self.fail(ErrorCode::HistoryLost, &message);
                false
            }
            Disposition::Fatal(message) => {
                self.fail(ErrorCode::Upstream, &message);
                false
            }
        }
    }

    fn fail(&self, code: ErrorCode, message: &str) {
        tracing::error!(stream = %self.key.stream, code = code.as_str(), message, "worker failed");
        self.publish(
            Arc::new(Event::control(EventKind::Error(code), message, false)),
            no_values(),
        );
    }

    /// Routing values (for `match` rules) and the encoded event of a change document.
    pub(crate) fn encode(&self, change: Document) -> Result<(Event, RouteValues), EncodeError> {
        let values = route_values(&self.spec().routing, &change);
        Ok((Event::from_change(change)?, values))
    }
}

fn no_values() -> RouteValues {
    Arc::from(Vec::new())
}
