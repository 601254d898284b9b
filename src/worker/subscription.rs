//! One client's view of a worker: exactly once and in order, by position.
//!
//! A subscription remembers one thing, the id it has seen through (`cursor_pos`), and reads on
//! from wherever that id is covered:
//!
//! 1. **Live**: the worker's broadcast (or the client's partition), when it is at the head.
//! 2. **Ring**: the worker's ring, a chunk at a time, when it is behind the live channel (a burst
//!    lapped it) or resumed from an id the ring still holds. A read that reaches the head
//!    subscribes to live under the hub lock, so nothing falls between the two.
//! 3. **Catch-up**: a shared catch-up cursor (`catchup.rs`), when the id is older than the ring.
//!    When the catch-up hands over, the client goes back to (2).
//!
//! Live events at or before `skip_through` are dropped: the catch-up already delivered them when
//! it ran ahead of the worker. Nothing here cuts a client for being behind: a client that keeps
//! reading always gets there, and one that stops is closed by its transport's stall timeout.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::Worker;
use super::catchup::{CatchUpReader, NoCatchUp, Pull};
use super::hub::Attachment;
use crate::event::{ErrorCode, Event, EventKind, Token};
use crate::limits::UpstreamLimit;
use crate::routing::ClientFilter;

/// Ring entries read per chunk: bounds both the lock hold time and a lagging client's memory
/// (`CHUNK` `Arc`s, not a copy of the ring).
const CHUNK: usize = 256;

/// Why a subscription could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// MongoDB refused the resume token (not history loss: a token it cannot use at all).
    #[error("MongoDB rejected the resume token: {0}")]
    BadResumeToken(String),
    /// The resume needs a catch-up cursor and `limits.max_workers` is spent.
    #[error(transparent)]
    Upstream(#[from] UpstreamLimit),
}

/// How often a client waiting for a catch-up slot looks again even without news from its own
/// worker (a slot of `limits.max_workers` may free up on another stream).
const SLOT_RECHECK: Duration = Duration::from_secs(1);

/// Where the next events come from.
enum Source {
    /// The worker's ring, read from `cursor_pos`.
    Ring,
    /// The worker's live channel.
    Live(broadcast::Receiver<Arc<Event>>),
    /// A shared catch-up.
    CatchUp(CatchUpReader),
    /// Every catch-up slot is busy: wait for one to end, then look again.
    Waiting(watch::Receiver<u64>),
    /// The feed ended (terminal event delivered).
    Done,
}

/// A counted client of a worker. Created by the registry under the worker-map lock (so an idle
/// worker cannot retire between lookup and count), and uncounted on drop however the subscribe
/// or the stream ends, including a subscribe future dropped while the cursor opens.
pub struct ClientGuard {
    worker: Arc<Worker>,
}

impl ClientGuard {
    /// Counts a client of `worker`. Call only while holding the worker-map lock.
    pub(crate) fn new(worker: Arc<Worker>) -> ClientGuard {
        worker.add_client();
        ClientGuard { worker }
    }

    /// The worker counted.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.worker.remove_client();
    }
}

/// A client's ordered, gap-free, duplicate-free event feed.
pub struct Subscription {
    guard: ClientGuard,
    backlog: VecDeque<Arc<Event>>,
    source: Source,
    skip_through: Option<Token>,
    /// The id this client has seen through: the last change handed out, a position the hub
    /// vouched for (everything before it delivered or not for this client), or the resume id.
    cursor_pos: Option<Token>,
    /// This client's filter, for streams with routing rules.
    filter: Option<Arc<ClientFilter>>,
    /// Set when a catch-up was refused by the cursor budget (a 503 for a starting subscribe).
    refused: Option<UpstreamLimit>,
}

impl Subscription {
    /// Starts a subscription for the client counted by `guard`, resuming after `resume`.
    pub async fn start(
        guard: ClientGuard,
        resume: Option<Token>,
        filter: Option<Arc<ClientFilter>>,
    ) -> Result<Subscription, SubscribeError> {
        let mut subscription = Subscription {
            guard,
            backlog: VecDeque::new(),
            source: Source::Ring,
            skip_through: None,
            cursor_pos: resume,
            filter,
            refused: None,
        };
        subscription.read_worker();
        if let Some(limit) = subscription.refused.take() {
            return Err(SubscribeError::Upstream(limit));
        }
        // A new catch-up for this client's own id: wait (`cursor_open_wait`) for MongoDB to
        // accept it, so a token it refuses is a 400 before any byte of the response; past
        // that the stream starts and the client waits inside it.
        let wait = subscription.guard.worker().settings().cursor_open_wait;
        if let Source::CatchUp(reader) = &mut subscription.source
            && let Ok(Err(message)) = tokio::time::timeout(wait, reader.opened()).await
        {
            return Err(SubscribeError::BadResumeToken(message));
        }
        Ok(subscription)
    }

    /// The worker this subscription reads from.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.guard.worker
    }

    /// The id this client has seen through (its resume id, its attach position, or the last
    /// event handed out); `None` before the worker had any position.
    pub fn position(&self) -> Option<&Token> {
        self.cursor_pos.as_ref()
    }

    /// `rewind=N` for a client that did not resume: puts the last `n` events before its start
    /// (that its filter and `keep` let through) in front of its feed. They are all at or before
    /// its position, and everything after comes by position as usual, so nothing is doubled.
    /// Only what the worker's ring still holds can be rewound.
    pub fn rewind(&mut self, n: usize, keep: &dyn Fn(&Event) -> bool) {
        if n == 0 {
            return;
        }
        let through = self.cursor_pos.as_ref();
        let events = super::lock(&self.guard.worker.hub).last_entries(
            n,
            through,
            self.filter.as_deref(),
            keep,
        );
        for event in events.into_iter().rev() {
            self.backlog.push_front(event);
        }
    }

    /// Next event, waiting if needed. `None` once the feed has ended (after a terminal event).
    /// Cancel-safe: the only awaits are on channel receivers.
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                return Some(self.deliver(event));
            }
            if let Source::Live(rx) = &mut self.source {
                match rx.recv().await {
                    Ok(event) => {
                        if let Some(event) = self.filter_live(event) {
                            return Some(self.deliver(event));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => self.lagged(),
                    Err(broadcast::error::RecvError::Closed) => self.source = Source::Done,
                }
                continue;
            }
            if !self.advance() {
                match &mut self.source {
                    Source::Done => return None,
                    Source::CatchUp(reader) => reader.changed().await,
                    Source::Waiting(ended) => {
                        tokio::select! {
                            changed = ended.changed() => {
                                if changed.is_err() {
                                    std::future::pending::<()>().await;
                                }
                            }
                            _ = tokio::time::sleep(SLOT_RECHECK) => {}
                        }
                        self.source = Source::Ring;
                    }
                    Source::Ring | Source::Live(_) => {}
                }
            }
        }
    }

    /// An event that is ready now, without waiting (for batching writes).
    pub fn try_next(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                return Some(self.deliver(event));
            }
            if let Source::Live(rx) = &mut self.source {
                match rx.try_recv() {
                    Ok(event) => {
                        if let Some(event) = self.filter_live(event) {
                            return Some(self.deliver(event));
                        }
                    }
                    Err(broadcast::error::TryRecvError::Lagged(_)) => self.lagged(),
                    Err(broadcast::error::TryRecvError::Closed) => self.source = Source::Done,
                    Err(broadcast::error::TryRecvError::Empty) => return None,
                }
                continue;
            }
            if !self.advance() {
                return None;
            }
        }
    }

    /// Moves forward without waiting (not for `Live`, which `next`/`try_next` receive from
    /// directly): fills the backlog or switches source. `false` when only waiting can help.
    fn advance(&mut self) -> bool {
        match &mut self.source {
            Source::Done | Source::Live(_) => false,
            Source::Ring => {
                self.read_worker();
                true
            }
            Source::Waiting(ended) => {
                if ended.has_changed().unwrap_or(true) {
                    self.source = Source::Ring;
                    return true;
                }
                false
            }
            Source::CatchUp(reader) => {
                let Some(after) = self.cursor_pos.clone() else {
                    self.source = Source::Ring;
                    return true;
                };
                match reader.pull(&after, self.filter.as_deref(), CHUNK) {
                    Pull::Events(events, through) => {
                        self.backlog.extend(events);
                        if let Some(through) = through {
                            self.advance_to(&through);
                        }
                    }
                    Pull::Wait => return false,
                    Pull::Finished(through) => {
                        self.advance_to(&through);
                        self.source = Source::Ring;
                    }
                    Pull::Terminal(event) => self.backlog.push_back(event),
                    Pull::Lost => self.source = Source::Ring,
                    Pull::Refused(message) => self.backlog.push_back(Arc::new(Event::control(
                        EventKind::Error(ErrorCode::Upstream),
                        &format!("MongoDB rejected the resume token: {message}"),
                        false,
                    ))),
                }
                true
            }
        }
    }

    /// Reads the worker's ring from `cursor_pos`; attaches live at the head; goes to a
    /// catch-up when the ring no longer covers the position.
    fn read_worker(&mut self) {
        let worker = Arc::clone(&self.guard.worker);
        match worker.read(self.cursor_pos.as_ref(), self.filter.as_ref(), CHUNK) {
            Some(Ok(attachment)) => self.switch_to(attachment),
            Some(Err(scan)) => {
                self.backlog.extend(scan.events);
                if let Some(through) = scan.through {
                    self.advance_to(&through);
                }
            }
            None => {
                if let Some(terminal) = worker.terminal() {
                    self.backlog.push_back(terminal);
                    return;
                }
                let Some(after) = self.cursor_pos.clone() else {
                    return;
                };
                self.source = match worker.join_catch_up(&after) {
                    Ok(reader) => Source::CatchUp(reader),
                    Err(refusal) => {
                        if let NoCatchUp::Budget(limit) = refusal {
                            self.refused = Some(limit);
                        }
                        Source::Waiting(worker.catch_ups.subscribe_ended())
                    }
                };
            }
        }
    }

    fn switch_to(&mut self, attachment: Attachment) {
        if let Some(position) = &attachment.position {
            self.advance_to(position);
        }
        self.backlog.extend(attachment.backlog);
        self.skip_through = attachment.skip_through;
        self.source = Source::Live(attachment.live);
    }

    /// The live channel lapped this client: read on from the ring at its position.
    fn lagged(&mut self) {
        self.guard.worker.metrics().lag_recoveries.inc();
        self.source = Source::Ring;
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

    /// Moves `cursor_pos` forward (never back).
    fn advance_to(&mut self, id: &Token) {
        if self.cursor_pos.as_ref().is_none_or(|pos| id > pos) {
            self.cursor_pos = Some(id.clone());
        }
    }

    fn deliver(&mut self, event: Arc<Event>) -> Arc<Event> {
        if event.kind.is_terminal() {
            self.backlog.clear();
            self.source = Source::Done;
        } else if let Some(id) = &event.id {
            self.advance_to(id);
        }
        event
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Drop the receiver first, so the partition sees no listener left.
        self.source = Source::Done;
        if let Some(filter) = &self.filter {
            self.guard.worker.release_partition(filter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::LIVE_SLOTS;
    use mongodb::bson::doc;

    fn token(n: u32) -> Token {
        Token::parse(&format!("8200000001{n:08}")).unwrap()
    }

    fn change(n: u32) -> mongodb::bson::Document {
        doc! { "_id": { "_data": token(n).as_str() }, "operationType": "insert", "fullDocument": { "n": n } }
    }

    #[tokio::test]
    async fn a_lapped_reader_reads_on_from_the_ring_and_is_never_cut() {
        let burst = (LIVE_SLOTS * 4) as u32;
        let worker = crate::worker::test_worker(burst as usize + 10).await;
        worker.open_for_test(token(0));
        let guard = ClientGuard::new(Arc::clone(&worker));
        let mut subscription = Subscription::start(guard, None, None).await.unwrap();
        // A burst four times the live channel, published before the client reads anything.
        for n in 1..=burst {
            worker.publish_change_for_test(change(n));
        }
        let mut seen = Vec::new();
        while let Some(event) = subscription.try_next() {
            assert_eq!(event.kind, EventKind::Change, "never cut: {event:?}");
            seen.push(event.id.clone().unwrap());
        }
        assert_eq!(seen, (1..=burst).map(token).collect::<Vec<_>>());
        assert!(
            worker.metrics().lag_recoveries.get() >= 1,
            "the ring path ran"
        );
        // Rejoined live: the next event comes through the live channel.
        worker.publish_change_for_test(change(burst + 1));
        assert_eq!(
            subscription.next().await.unwrap().id,
            Some(token(burst + 1))
        );
    }

    #[tokio::test]
    async fn resume_inside_the_ring_gets_exactly_the_rest() {
        let worker = crate::worker::test_worker(100).await;
        worker.open_for_test(token(0));
        for n in 1..=50 {
            worker.publish_change_for_test(change(n));
        }
        let guard = ClientGuard::new(Arc::clone(&worker));
        let mut subscription = Subscription::start(guard, Some(token(20)), None)
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Some(event) = subscription.try_next() {
            seen.push(event.id.clone().unwrap());
        }
        assert_eq!(seen, (21..=50).map(token).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_position_ahead_of_the_worker_skips_what_it_already_has() {
        // A catch-up that ran ahead of the worker hands its reader over at 60 while the worker
        // has only published up to 50: live events through 60 were delivered by the catch-up.
        let worker = crate::worker::test_worker(100).await;
        worker.open_for_test(token(0));
        for n in 1..=50 {
            worker.publish_change_for_test(change(n));
        }
        let guard = ClientGuard::new(Arc::clone(&worker));
        let mut subscription = Subscription::start(guard, Some(token(60)), None)
            .await
            .unwrap();
        assert!(subscription.try_next().is_none());
        for n in 51..=70 {
            worker.publish_change_for_test(change(n));
        }
        let mut seen = Vec::new();
        while let Some(event) = subscription.try_next() {
            seen.push(event.id.clone().unwrap());
        }
        assert_eq!(seen, (61..=70).map(token).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn rewind_prepends_the_last_events_before_the_start_once() {
        let worker = crate::worker::test_worker(100).await;
        worker.open_for_test(token(0));
        for n in 1..=10 {
            worker.publish_change_for_test(change(n));
        }
        let guard = ClientGuard::new(Arc::clone(&worker));
        let mut subscription = Subscription::start(guard, None, None).await.unwrap();
        assert_eq!(subscription.position(), Some(&token(10)));
        subscription.rewind(3, &|_| true);
        worker.publish_change_for_test(change(11));
        let mut seen = Vec::new();
        while let Some(event) = subscription.try_next() {
            seen.push(event.id.clone().unwrap());
        }
        assert_eq!(seen, (8..=11).map(token).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn dropping_a_subscription_uncounts_the_client() {
        let worker = crate::worker::test_worker(10).await;
        worker.open_for_test(token(0));
        let guard = ClientGuard::new(Arc::clone(&worker));
        assert_eq!(worker.client_count(), 1);
        drop(guard);
        assert_eq!(worker.client_count(), 0);
    }
}
