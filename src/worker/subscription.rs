//! One client's view of a worker: backlog, catch-up and live events, exactly once and in order.
//!
//! A client resuming from id X goes through up to three phases:
//!
//! 1. **Catch-up** (only when X is older than the worker's ring): a private cursor
//!    `resumeAfter: X` runs in its own task and feeds a small bounded channel. After each event
//!    (and after each empty batch, using the post-batch token) the task asks the worker to
//!    [`attach`](super::Worker::attach) at that position; once it can, it hands the attachment
//!    over and stops.
//! 2. **Backlog**: ring events after the hand-over point, cloned (`Arc`) under the worker lock.
//! 3. **Live**: the broadcast receiver, subscribed under the same lock, so nothing falls between
//!    2 and 3. Live events at or before `skip_through` are dropped: they are the ones the
//!    catch-up cursor already delivered when it ran ahead of the worker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mongodb::bson::Document;
use mongodb::change_stream::ChangeStream;
use tokio::sync::{broadcast, mpsc};

use super::cursor::open_cursor;
use super::errors::{Disposition, classify};
use super::routing::ClientFilter;
use super::{Attachment, Worker};
use crate::event::{ErrorCode, Event, EventKind, Token};

/// Catch-up events buffered ahead of the client: enough to keep the cursor busy while the
/// client writes, small enough that a slow client holds little memory.
const CATCH_UP_BUFFER: usize = 256;

/// Why a subscription could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// MongoDB refused the resume token (not history loss: a token it cannot use at all).
    #[error("MongoDB rejected the resume token: {0}")]
    BadResumeToken(String),
    /// MongoDB was unreachable long enough that we gave up for this request.
    #[error("MongoDB is not reachable: {0}")]
    Unavailable(String),
}

/// Messages from the catch-up task.
enum CatchUp {
    Event(Arc<Event>),
    Handover(Attachment),
}

enum Source {
    CatchUp(mpsc::Receiver<CatchUp>),
    Live(broadcast::Receiver<Arc<Event>>),
    Done,
}

/// Decrements the worker's client count when the subscription goes away, however it ends.
struct ClientGuard {
    worker: Arc<Worker>,
    transport: usize,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.worker.clients_by_transport[self.transport].fetch_sub(1, Ordering::Relaxed);
        self.worker.remove_client();
    }
}

/// A client's ordered, gap-free, duplicate-free event feed.
pub struct Subscription {
    guard: ClientGuard,
    backlog: VecDeque<Arc<Event>>,
    source: Source,
    skip_through: Option<Token>,
    /// Where this client is in the worker's sequence: the id of the last change handed out,
    /// else the resume id it came with, else the worker's position when it attached. Lag
    /// recovery re-attaches from here. (One field, one refcount per delivered event.)
    cursor_pos: Option<Token>,
    /// This client's claim filter, for streams with `match` rules.
    filter: Option<Arc<ClientFilter>>,
}

impl Subscription {
    /// Starts a subscription on `worker`, which already counts this client (see registry).
    /// `transport` indexes `Worker::clients_by_transport`.
    pub async fn start(
        worker: Arc<Worker>,
        transport: usize,
        resume: Option<Token>,
        filter: Option<Arc<ClientFilter>>,
    ) -> Result<Subscription, SubscribeError> {
        worker.clients_by_transport[transport].fetch_add(1, Ordering::Relaxed);
        let guard = ClientGuard {
            worker: Arc::clone(&worker),
            transport,
        };
        let mut subscription = Subscription {
            guard,
            backlog: VecDeque::new(),
            source: Source::Done,
            skip_through: None,
            cursor_pos: resume.clone(),
            filter: filter.clone(),
        };
        if let Some(attachment) = worker.attach(resume.as_ref(), filter.as_ref()) {
            subscription.switch_to(attachment);
            return Ok(subscription);
        }
        // Older than the ring: open a private cursor now, so a bad token is a 400 before any
        // byte of the response is sent.
        let Some(after) = resume else {
            // attach(None) always succeeds; kept total for the type checker.
            return Err(SubscribeError::Unavailable(
                "worker has no live feed".into(),
            ));
        };
        match open_cursor(&worker, Some(&after)).await {
            Ok(cursor) => {
                worker.metrics().catchups.inc();
                let (tx, rx) = mpsc::channel(CATCH_UP_BUFFER);
                let task_worker = Arc::clone(&worker);
                tokio::spawn(catch_up(task_worker, cursor, after, filter, tx));
                subscription.source = Source::CatchUp(rx);
                Ok(subscription)
            }
            Err(error) => match classify(&error) {
                Disposition::HistoryLost(message) => {
                    subscription.backlog.push_back(Arc::new(Event::control(
                        EventKind::Error(ErrorCode::HistoryLost),
                        &format!("the event id is older than the oplog holds: {message}"),
                        true,
                    )));
                    Ok(subscription)
                }
                Disposition::Fatal(message) => Err(SubscribeError::BadResumeToken(message)),
                Disposition::Retry => Err(SubscribeError::Unavailable(error.to_string())),
            },
        }
    }

    fn switch_to(&mut self, attachment: Attachment) {
        if self.cursor_pos.is_none() {
            self.cursor_pos = attachment.position;
        }
        self.backlog.extend(attachment.backlog);
        self.skip_through = attachment.skip_through;
        self.source = Source::Live(attachment.live);
    }

    /// The worker this subscription reads from.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.guard.worker
    }

    /// Next event, waiting if needed. `None` once the feed has ended (after a terminal event).
    /// Cancel-safe: the only awaits are on channel receivers.
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                return Some(self.deliver(event));
            }
            match &mut self.source {
                Source::Done => return None,
                Source::CatchUp(rx) => match rx.recv().await {
                    Some(CatchUp::Event(event)) => return Some(self.deliver(event)),
                    Some(CatchUp::Handover(attachment)) => self.switch_to(attachment),
                    None => {
                        // The task ended without a hand-over: only on shutdown or cancel.
                        return Some(self.deliver(Arc::new(Event::control(
                            EventKind::Error(ErrorCode::Shutdown),
                            "catch-up ended",
                            false,
                        ))));
                    }
                },
                Source::Live(rx) => match rx.recv().await {
                    Ok(event) => {
                        if let Some(event) = self.filter_live(event) {
                            return Some(self.deliver(event));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if !self.recover() {
                            return Some(self.slow());
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.source = Source::Done;
                        return None;
                    }
                },
            }
        }
    }

    /// An event that is ready now, without waiting (for batching writes).
    pub fn try_next(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                return Some(self.deliver(event));
            }
            let Source::Live(rx) = &mut self.source else {
                return None;
            };
            match rx.try_recv() {
                Ok(event) => {
                    if let Some(event) = self.filter_live(event) {
                        return Some(self.deliver(event));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    if !self.recover() {
                        return Some(self.slow());
                    }
                }
                Err(_) => return None,
            }
        }
    }

    fn filter_live(&mut self, event: Arc<Event>) -> Option<Arc<Event>> {
        if let (Some(skip), Some(id)) = (&self.skip_through, &event.id) {
            if id <= skip {
                return None;
            }
            // Past the hand-over point: no more comparisons needed.
            self.skip_through = None;
        }
        Some(event)
    }

    /// After the live channel lapped this client: re-attach from the ring at the client's
    /// position, if it is still there and within `client_queue` of the head.
    fn recover(&mut self) -> bool {
        let worker = Arc::clone(&self.guard.worker);
        let max_lag = worker.settings().client_queue;
        match worker.attach_within(self.cursor_pos.as_ref(), max_lag, self.filter.as_ref()) {
            Some(attachment) if self.cursor_pos.is_some() => {
                self.switch_to(attachment);
                true
            }
            _ => false,
        }
    }

    fn slow(&mut self) -> Arc<Event> {
        self.guard.worker.metrics().slow_consumers.inc();
        tracing::info!(stream = %self.guard.worker.key.stream, position = ?self.cursor_pos, "client too slow, closing");
        self.deliver(Arc::new(Event::control(
            EventKind::Error(ErrorCode::SlowConsumer),
            "client fell too far behind; reconnect with the last event id to resume",
            false,
        )))
    }

    fn deliver(&mut self, event: Arc<Event>) -> Arc<Event> {
        if event.kind.is_terminal() {
            self.backlog.clear();
            self.source = Source::Done;
        } else if let Some(id) = &event.id {
            self.cursor_pos = Some(id.clone());
        }
        event
    }
}

/// Reads the private catch-up cursor until the worker's ring covers its position.
///
/// A transient MongoDB error reopens the cursor from the last event sent, like the worker does.
async fn catch_up(
    worker: Arc<Worker>,
    mut cursor: ChangeStream<Document>,
    mut sent: Token,
    filter: Option<Arc<ClientFilter>>,
    tx: mpsc::Sender<CatchUp>,
) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        if tx.is_closed() || worker.cancel_token().is_cancelled() {
            return;
        }
        let position = match cursor.next_if_any().await {
            Ok(Some(change)) => {
                let (event, values) = match worker.encode(change) {
                    Ok(encoded) => encoded,
                    Err(error) => {
                        return fail(&tx, ErrorCode::Upstream, &error.to_string(), false).await;
                    }
                };
                let terminal = event.kind.is_terminal();
                let id = event.id.clone();
                // Another tenant's document is not sent, but still moves the position forward.
                if terminal || filter.as_ref().is_none_or(|f| f.matches(&values)) {
                    let sent_ok = tx.send(CatchUp::Event(Arc::new(event))).await.is_ok();
                    if !sent_ok || terminal {
                        return;
                    }
                }
                if let Some(id) = &id {
                    sent = id.clone();
                }
                id
            }
            Ok(None) => cursor.resume_token().as_ref().and_then(Token::from_driver),
            Err(error) => {
                let (code, reset) = match classify(&error) {
                    Disposition::Retry => {
                        tracing::warn!(%error, "catch-up cursor lost, reopening");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(worker.settings().max_backoff);
                        match open_cursor(&worker, Some(&sent)).await {
                            Ok(reopened) => cursor = reopened,
                            Err(error) => tracing::warn!(%error, "catch-up reopen failed"),
                        }
                        continue;
                    }
                    Disposition::HistoryLost(_) => (ErrorCode::HistoryLost, true),
                    Disposition::Fatal(_) => (ErrorCode::Upstream, false),
                };
                return fail(&tx, code, &error.to_string(), reset).await;
            }
        };
        if let Some(position) = position
            && let Some(attachment) = worker.attach(Some(&position), filter.as_ref())
        {
            let _ = tx.send(CatchUp::Handover(attachment)).await;
            return;
        }
    }
}

/// Ends a catch-up with an `error` event for its client.
async fn fail(tx: &mpsc::Sender<CatchUp>, code: ErrorCode, message: &str, reset_id: bool) {
    let event = Event::control(EventKind::Error(code), message, reset_id);
    let _ = tx.send(CatchUp::Event(Arc::new(event))).await;
}
