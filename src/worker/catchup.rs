//! Shared catch-up cursors: clients resuming from before the worker's ring share them.
//!
//! A client whose position is older than the worker's ring covers reads from a [`CatchUp`]: a
//! cursor opened `resumeAfter` an old position (or, in relay mode, the relay's retained log
//! read from there: "Where the steps come from" below), filling a ring of its own that its
//! readers pull from by position (like the worker's ring, but with back-pressure). One
//! catch-up serves every client whose position it covers, whatever their exact ids, so a
//! restart storm of N clients opens a handful of cursors, not N:
//!
//! * **Join.** A client at X joins the running catch-up with the newest start at or before X
//!   (its ring still holds everything after X); only when none covers X does it start one, up to
//!   [`MAX_CATCH_UPS_PER_WORKER`]; past that it waits for one to end (no extra cursor).
//! * **Back-pressure, and fairness.** The cursor reads ahead of its slowest reader by at most
//!   the ring size ([`CATCH_UP_RING`] events): it pauses while the ring is full of entries some
//!   reader still needs. A reader that falls a whole ring behind the fastest one (it still needs
//!   the ring's oldest entry while another has read the newest and waits) is let go at once
//!   (its entries may then be overwritten), whether it stopped or reads slowly: the others go on
//!   at their own pace, never at the slowest one's or until its stall timeout. The bound is the
//!   ring because that is the first moment a slow reader costs anybody anything: until the ring
//!   is full the cursor reads on, and while nobody waits at the head nobody is held up. Its next
//!   pull sends the detached reader to look again from its own position (the worker's ring, or a
//!   catch-up of its own, never this one while it is still a ring behind), like a reader the
//!   worker's ring lapped: nothing lost or repeated. A lone reader, however slow, is never let
//!   go: there is nobody to hurry for, it sets its own pace.
//! * **Hand-over.** After every change and every empty batch the catch-up checks whether the
//!   worker's ring covers its position. When it does, it gives the worker the part of its ring
//!   that is older than the worker's (so later clients with ids in that range are served from
//!   memory), ends, and its readers drain what they have not read and go on from the worker.
//! * **Failure.** A failure to open (bad token, history lost) goes to the client whose id it was;
//!   the other readers look for another way. Later failures, `invalidate`, and the worker's own
//!   end (`cancel` on replace/delete) reach every reader.
//! * **Where the steps come from.** A MongoDB cursor `resumeAfter` the start, except in relay
//!   mode when the relay's retained log of the worker still holds everything after the start
//!   (`Relay::window` in `relayed.rs`, implemented in `relay/window.rs`): then the steps are
//!   read from there, on any instance, with no cursor on mongod. Only the source differs:
//!   both begin with `Opened(Some(start))` and give every step after it once, in order, and
//!   joining, back-pressure, hand-over and failures are the same. A window that cannot go on
//!   (the relay failed, or retention dropped what came next) is replaced by a cursor after the
//!   last position the catch-up was given. `catchups` counts the MongoDB cursors,
//!   `relay.window_catchups` the windows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use super::hub::{Hub, Routed};
use super::relayed::WindowSource;
use super::source::{Step, WorkerSource};
use super::{Worker, lock};
use crate::event::{ErrorCode, Event, EventKind, Token};
use crate::limits::UpstreamLimit;
use crate::routing::ClientFilter;

/// Catch-up cursors one worker runs at once.
pub const MAX_CATCH_UPS_PER_WORKER: usize = 4;

/// Events a catch-up reads ahead of its slowest reader; a reader this far behind another that
/// waits at the head is let go.
const CATCH_UP_RING: usize = 4096;

/// Where a catch-up is.
#[derive(Debug, Clone)]
enum Status {
    /// The cursor is being opened.
    Opening,
    /// Reading.
    Running,
    /// The worker covers everything after `through`: readers continue from the worker.
    HandedOver { through: Token },
    /// The first open failed: only the client whose id it was gets `event`; others look again.
    Refused { event: Arc<Event>, fatal: bool },
    /// Ended with `event` for every reader (invalidate, error, cancel).
    Ended(Arc<Event>),
}

struct State {
    hub: Hub,
    /// Reader id → the id it has read through. A reader missing here was let go.
    readers: HashMap<u64, Token>,
    status: Status,
}

impl State {
    /// Whether a reader that has read through `through` is a whole ring behind the fastest
    /// reader: the ring is full, the reader still needs its oldest entry, and another reader has
    /// read its newest (and waits for the cursor, which waits for this one).
    fn lapped(&self, through: &Token) -> bool {
        let (Some(front), Some(head)) = (self.hub.front_id(), self.hub.back_id()) else {
            return false;
        };
        self.hub.is_full() && through < front && self.readers.values().any(|r| r >= head)
    }
}

/// One shared catch-up cursor and its ring.
pub struct CatchUp {
    /// The position the cursor resumed after.
    start: Token,
    state: Mutex<State>,
    /// Bumped after every change of `state` readers care about.
    progress: watch::Sender<u64>,
    /// Readers moved or left: the cursor may be able to read on.
    space: Notify,
    next_reader: AtomicU64,
}

/// What a reader's pull found.
pub enum Pull {
    /// Events for the reader, and the id it has now read through.
    Events(Vec<Arc<Event>>, Option<Token>),
    /// Nothing new yet: wait for [`CatchUpReader::changed`].
    Wait,
    /// The catch-up handed over: continue from the worker after this position.
    Finished(Token),
    /// The catch-up ended with this terminal event.
    Terminal(Arc<Event>),
    /// This catch-up cannot serve the reader (it failed for another client's id): look again.
    Lost,
    /// The reader's own id was refused by MongoDB as unusable (not history loss).
    Refused(String),
}

impl CatchUp {
    fn new(start: Token) -> Arc<CatchUp> {
        let mut hub = Hub::new(CATCH_UP_RING);
        hub.coverage_start = Some(start.clone());
        hub.position = Some(start.clone());
        Arc::new(CatchUp {
            start,
            state: Mutex::new(State {
                hub,
                readers: HashMap::new(),
                status: Status::Opening,
            }),
            progress: watch::channel(0).0,
            space: Notify::new(),
            next_reader: AtomicU64::new(1),
        })
    }

    /// Whether the catch-up still reads (not handed over, failed or ended).
    fn is_active(&self) -> bool {
        matches!(lock(&self.state).status, Status::Opening | Status::Running)
    }

    /// Whether a client at `after` can read from this catch-up: the start of what it still
    /// holds, and, once it has handed over, the position its readers continue from on the
    /// worker (which must still cover it).
    fn coverage_for(&self, after: &Token) -> Option<(Token, Option<Token>)> {
        let state = lock(&self.state);
        let through = match &state.status {
            Status::Opening | Status::Running => None,
            Status::HandedOver { through } => Some(through.clone()),
            Status::Refused { .. } | Status::Ended(_) => return None,
        };
        // A reader a ring behind would be let go at once (it may just have been).
        if !state.hub.covers(after) || state.lapped(after) {
            return None;
        }
        Some((state.hub.coverage_start.clone()?, through))
    }

    /// Whether the catch-up is handed over and its ring is no longer worth keeping.
    fn is_spent(&self, worker: &Worker) -> bool {
        match &lock(&self.state).status {
            Status::Opening | Status::Running => false,
            Status::HandedOver { through } => !worker.covers(through),
            Status::Refused { .. } | Status::Ended(_) => true,
        }
    }

    fn reader(self: &Arc<Self>, after: &Token) -> CatchUpReader {
        let reader = self.next_reader.fetch_add(1, Ordering::Relaxed);
        lock(&self.state).readers.insert(reader, after.clone());
        // A reader joining at the head may be the one that lets the cursor go on.
        self.space.notify_one();
        CatchUpReader {
            catch_up: Arc::clone(self),
            reader,
            own_start: &self.start == after,
            progress: self.progress.subscribe(),
        }
    }

    fn bump(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set_status(&self, status: Status) {
        lock(&self.state).status = status;
        self.bump();
    }

    /// Whether the cursor must wait for readers before reading on: the ring is full and its
    /// oldest entry is still needed by somebody.
    fn blocked(&self) -> bool {
        let state = lock(&self.state);
        state.hub.is_full()
            && state
                .hub
                .front_id()
                .is_some_and(|front| state.readers.values().any(|r| r < front))
    }

    /// Lets go of the readers a whole ring behind the fastest one ([`State::lapped`]): they hold
    /// up the cursor, and through it a reader waiting at the head. A lone slow reader is never
    /// let go, there is nobody to hurry for. Returns how many were let go.
    fn detach_lapped(&self) -> usize {
        let mut state = lock(&self.state);
        let lapped: Vec<u64> = state
            .readers
            .iter()
            .filter(|(_, through)| state.lapped(through))
            .map(|(reader, _)| *reader)
            .collect();
        for reader in &lapped {
            state.readers.remove(reader);
        }
        lapped.len()
    }

    fn has_readers(&self) -> bool {
        !lock(&self.state).readers.is_empty()
    }
}

/// A client's place in a catch-up. Dropping it lets the cursor read on without it.
pub struct CatchUpReader {
    catch_up: Arc<CatchUp>,
    reader: u64,
    /// Whether the catch-up was started for this reader's id (its open errors are ours).
    own_start: bool,
    progress: watch::Receiver<u64>,
}

impl CatchUpReader {
    /// Reads up to `max_scan` entries after `after` (the reader's position).
    pub fn pull(&mut self, after: &Token, filter: Option<&ClientFilter>, max_scan: usize) -> Pull {
        self.progress.mark_unchanged();
        let mut state = lock(&self.catch_up.state);
        if let Status::Refused { event, fatal } = &state.status {
            return match (self.own_start, fatal) {
                (true, true) => Pull::Refused(event_message(event)),
                (true, false) => Pull::Terminal(Arc::clone(event)),
                (false, _) => Pull::Lost,
            };
        }
        if !state.readers.contains_key(&self.reader) {
            // Let go a ring behind: look again from our own position.
            return Pull::Lost;
        }
        let Some(scan) = state.hub.scan(after, filter, max_scan) else {
            return Pull::Lost;
        };
        if let Some(through) = &scan.through {
            let was_full = state.hub.is_full();
            state.readers.insert(self.reader, through.clone());
            if was_full {
                self.catch_up.space.notify_one();
            }
        }
        if !scan.events.is_empty() || !scan.at_head {
            return Pull::Events(scan.events, scan.through);
        }
        match &state.status {
            Status::Opening | Status::Running => Pull::Wait,
            Status::HandedOver { through } => Pull::Finished(through.clone()),
            Status::Ended(event) => Pull::Terminal(Arc::clone(event)),
            Status::Refused { .. } => Pull::Lost,
        }
    }

    /// Waits until the catch-up moved (an append, an end, a status change).
    pub async fn changed(&mut self) {
        if self.progress.changed().await.is_err() {
            // The sender lives as long as the catch-up we hold: never reached.
            std::future::pending::<()>().await;
        }
    }

    /// Waits until the cursor is open (or failed). `Err` carries MongoDB's message when it
    /// refused this reader's own id as unusable (a 400 for the subscribe request).
    pub async fn opened(&mut self) -> Result<(), String> {
        loop {
            self.progress.mark_unchanged();
            {
                let state = lock(&self.catch_up.state);
                match &state.status {
                    Status::Opening => {}
                    Status::Refused { event, fatal: true } if self.own_start => {
                        return Err(event_message(event));
                    }
                    _ => return Ok(()),
                }
            }
            self.changed().await;
        }
    }
}

impl Drop for CatchUpReader {
    fn drop(&mut self) {
        lock(&self.catch_up.state).readers.remove(&self.reader);
        self.catch_up.space.notify_one();
    }
}

fn event_message(event: &Event) -> String {
    serde_json::from_slice::<serde_json::Value>(event.ndjson.as_ref())
        .ok()
        .and_then(|v| v["data"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "MongoDB refused the resume token".into())
}

/// Why a client could not get a catch-up now.
#[derive(Debug)]
pub(crate) enum NoCatchUp {
    /// This worker already runs [`MAX_CATCH_UPS_PER_WORKER`] catch-ups.
    Busy,
    /// `limits.max_workers` is spent.
    Budget(UpstreamLimit),
}

/// The worker's catch-ups.
#[derive(Default)]
pub(crate) struct CatchUps {
    running: Mutex<Vec<Arc<CatchUp>>>,
    /// Bumped whenever a catch-up ends: clients waiting for a slot look again.
    ended: watch::Sender<u64>,
}

impl CatchUps {
    /// Catch-up cursors currently open or opening.
    pub fn count(&self) -> usize {
        lock(&self.running).iter().filter(|c| c.is_active()).count()
    }

    /// A receiver that changes when a catch-up ends (for clients waiting for a slot).
    pub fn subscribe_ended(&self) -> watch::Receiver<u64> {
        self.ended.subscribe()
    }

    /// Wakes every client waiting for a slot (a catch-up ended, or the worker did).
    pub fn notify_ended(&self) {
        self.ended.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Worker {
    /// A reader for a client at `after` (older than the ring): joins a catch-up that covers it,
    /// or starts one. Refused when every slot of this worker is busy (wait for
    /// `CatchUps::subscribe_ended`) or `limits.max_workers` is spent.
    pub(crate) fn join_catch_up(
        self: &Arc<Self>,
        after: &Token,
    ) -> Result<CatchUpReader, NoCatchUp> {
        let mut running = lock(&self.catch_ups.running);
        // A handed-over catch-up keeps its ring (no cursor) while the worker still covers
        // where it ended: a restart storm's later clients read from it instead of a new cursor.
        running.retain(|c| !c.is_spent(self));
        while running.len() > 2 * MAX_CATCH_UPS_PER_WORKER {
            let Some(oldest) = running.iter().position(|c| !c.is_active()) else {
                break;
            };
            running.remove(oldest);
        }
        let best = running
            .iter()
            .filter_map(|c| {
                c.coverage_for(after)
                    .map(|(start, through)| (start, through, c))
            })
            .filter(|(_, through, _)| through.as_ref().is_none_or(|t| self.covers(t)))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, _, c)| Arc::clone(c));
        if let Some(catch_up) = best {
            self.metrics().catchups_joined.inc();
            return Ok(catch_up.reader(after));
        }
        if running.iter().filter(|c| c.is_active()).count() >= MAX_CATCH_UPS_PER_WORKER {
            return Err(NoCatchUp::Busy);
        }
        // A worker without clients holds its slot only until someone needs it (`registry`).
        let owner = &self.context.owner;
        let permit = self
            .context
            .budget
            .try_acquire_catch_up_evicting(|| owner.free_idle_slot())
            .map_err(NoCatchUp::Budget)?;
        let catch_up = CatchUp::new(after.clone());
        let reader = catch_up.reader(after);
        running.push(Arc::clone(&catch_up));
        drop(running);
        let worker = Arc::clone(self);
        self.tracker().spawn(async move {
            run(&worker, &catch_up).await;
            // The cursor slot is free once the catch-up's cursor is gone.
            drop(permit);
            worker.catch_ups.notify_ended();
        });
        Ok(reader)
    }

    /// Running catch-up cursors (for stats).
    pub fn catch_up_count(&self) -> usize {
        self.catch_ups.count()
    }
}

/// Where a catch-up's steps come from.
enum Upstream {
    /// The relay's retained log (relay mode, when it holds everything after the start).
    Window(Box<dyn WindowSource>),
    /// A MongoDB cursor after the start (or after the last position a window gave).
    Cursor(Box<WorkerSource>),
}

impl Upstream {
    /// The relay's retained window when it covers `start`, else a MongoDB cursor.
    async fn open(worker: &Arc<Worker>, start: &Token) -> Upstream {
        if let Some(relay) = worker.context.relay.get()
            && let Some(window) = Arc::clone(relay).window(worker, start.clone()).await
        {
            worker.metrics().relay.window_catchups.inc();
            return Upstream::Window(window);
        }
        Upstream::cursor(worker, start)
    }

    fn cursor(worker: &Arc<Worker>, after: &Token) -> Upstream {
        worker.metrics().catchups.inc();
        Upstream::Cursor(Box::new(WorkerSource::new(worker, Some(after.clone()))))
    }

    /// The next step (cancel-safe). A window that cannot go on is replaced by a cursor after
    /// `position`, the last position the catch-up was given.
    async fn next(&mut self, worker: &Arc<Worker>, position: &Token) -> Step<Routed> {
        loop {
            match self {
                Upstream::Cursor(source) => return source.next().await,
                Upstream::Window(window) => match window.next().await {
                    Some(step) => return step,
                    None => *self = Upstream::cursor(worker, position),
                },
            }
        }
    }
}

/// The worker ended (replace, delete, shutdown): its terminal event, if it has one, is what
/// every reader gets.
fn end_with_worker(worker: &Worker, catch_up: &CatchUp) {
    let event = worker.terminal().unwrap_or_else(|| {
        Arc::new(Event::control(
            EventKind::Error(ErrorCode::Shutdown),
            "the server is shutting down",
            false,
        ))
    });
    catch_up.set_status(Status::Ended(event));
}

/// The catch-up's loop: its steps from the relay's window or its cursor, into its ring.
async fn run(worker: &Arc<Worker>, catch_up: &Arc<CatchUp>) {
    let cancel = worker.cancel_token().clone();
    let mut source = tokio::select! {
        _ = cancel.cancelled() => {
            end_with_worker(worker, catch_up);
            return;
        }
        source = Upstream::open(worker, &catch_up.start) => source,
    };
    // The last position the catch-up was given (where a cursor replacing a window resumes).
    let mut position = catch_up.start.clone();
    loop {
        // Back-pressure: wait for the slowest reader (letting go of one a whole ring behind
        // another that waits); stop when nobody reads any more.
        loop {
            let space = catch_up.space.notified();
            if !catch_up.has_readers() {
                catch_up.set_status(Status::Ended(Arc::new(Event::control(
                    EventKind::Error(ErrorCode::Shutdown),
                    "catch-up abandoned",
                    false,
                ))));
                return;
            }
            if !catch_up.blocked() {
                break;
            }
            // Checked on every wake: a reader reaching the head (or joining there) wakes this
            // loop, as does any reader moving while the ring is full.
            let detached = catch_up.detach_lapped();
            if detached > 0 {
                tracing::debug!(stream = %worker.key.stream, detached, "catch-up let go of readers a whole ring behind");
                worker
                    .metrics()
                    .catchup_readers_detached
                    .inc_by(detached as u64);
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = space => {}
            }
        }
        let step = tokio::select! {
            _ = cancel.cancelled() => {
                end_with_worker(worker, catch_up);
                return;
            }
            step = source.next(worker, &position) => step,
        };
        position = match step {
            Step::Opened(_) => {
                let mut state = lock(&catch_up.state);
                if matches!(state.status, Status::Opening) {
                    state.status = Status::Running;
                }
                drop(state);
                catch_up.bump();
                continue;
            }
            Step::Change(routed) => {
                let id = routed.id.clone();
                lock(&catch_up.state).hub.push(routed);
                catch_up.bump();
                id
            }
            Step::Quiet(Some(token)) => {
                lock(&catch_up.state).hub.position = Some(token.clone());
                token
            }
            Step::Quiet(None) => continue,
            Step::Retrying(error) => {
                // Like the worker's own cursor (worker/cursor.rs): every retry is a warning.
                tracing::warn!(stream = %worker.key.stream, %error, "catch-up cursor lost, retrying");
                worker.metrics().worker_retries.inc();
                continue;
            }
            Step::Invalidated(event) => {
                catch_up.set_status(Status::Ended(event));
                return;
            }
            Step::Failed(code, message) => {
                let history_lost = code == ErrorCode::HistoryLost;
                let event = Arc::new(Event::control(
                    EventKind::Error(code),
                    &if history_lost {
                        format!("the event id is older than the oplog holds: {message}")
                    } else {
                        message
                    },
                    history_lost,
                ));
                let mut state = lock(&catch_up.state);
                state.status = if matches!(state.status, Status::Opening) {
                    Status::Refused {
                        event,
                        fatal: !history_lost,
                    }
                } else {
                    Status::Ended(event)
                };
                drop(state);
                catch_up.bump();
                return;
            }
        };
        if worker.covers(&position) {
            hand_over(worker, catch_up, position);
            return;
        }
    }
}

/// Gives the worker what it lacks of the catch-up's ring, then lets the readers go on from it.
fn hand_over(worker: &Worker, catch_up: &CatchUp, through: Token) {
    let (older_start, entries) = {
        let state = lock(&catch_up.state);
        (
            state.hub.coverage_start.clone(),
            state.hub.entries_through(&through),
        )
    };
    if let Some(older_start) = older_start {
        worker.extend_history(&older_start, entries);
    }
    catch_up.set_status(Status::HandedOver { through });
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn token(n: u32) -> Token {
        Token::parse(&format!("8200000001{n:08}")).unwrap()
    }

    fn routed(n: u32) -> Routed {
        let change = doc! { "_id": { "_data": token(n).as_str() }, "operationType": "insert" };
        Routed {
            id: token(n),
            event: Arc::new(Event::from_change(change).unwrap()),
            values: Default::default(),
            moves: None,
        }
    }

    /// A catch-up whose ring is full of entries 1..=CATCH_UP_RING after start 0.
    fn full_catch_up() -> Arc<CatchUp> {
        let catch_up = CatchUp::new(token(0));
        let mut state = lock(&catch_up.state);
        for n in 1..=CATCH_UP_RING as u32 {
            state.hub.push(routed(n));
        }
        drop(state);
        catch_up
    }

    fn read_all(reader: &mut CatchUpReader, after: &Token) -> Token {
        let mut at = after.clone();
        while let Pull::Events(_, Some(through)) = reader.pull(&at, None, 256) {
            at = through;
        }
        at
    }

    #[test]
    fn a_reader_a_whole_ring_behind_one_waiting_at_the_head_is_let_go_and_not_before() {
        let catch_up = full_catch_up();
        let mut fast = catch_up.reader(&token(0));
        let slow = catch_up.reader(&token(0));
        // Nobody has read: the slow reader is in the way, but nobody waits at the head.
        assert_eq!(catch_up.detach_lapped(), 0);
        assert!(catch_up.blocked());
        // The fast reader one entry short of the head: a ring behind it is not yet a full ring.
        let short = token(CATCH_UP_RING as u32 - 1);
        lock(&catch_up.state)
            .readers
            .insert(fast.reader, short.clone());
        assert_eq!(catch_up.detach_lapped(), 0);
        assert!(
            catch_up.blocked(),
            "nobody waits yet: the slow reader sets the pace"
        );
        // At the head, waiting: the slow reader is a whole ring behind and is let go at once,
        // however recently it moved.
        let head = read_all(&mut fast, &short);
        assert_eq!(head, token(CATCH_UP_RING as u32));
        assert_eq!(catch_up.detach_lapped(), 1);
        assert!(!catch_up.blocked());
        // Its next pull sends it to look again from its own position, even before the ring has
        // moved past it, and it cannot rejoin this catch-up while it is a ring behind.
        let mut slow = slow;
        assert!(matches!(slow.pull(&token(0), None, 256), Pull::Lost));
        assert!(catch_up.coverage_for(&token(0)).is_none());
        assert_eq!(
            lock(&catch_up.state).readers.len(),
            1,
            "only the fast reader is left"
        );
    }

    #[test]
    fn a_reader_less_than_a_ring_behind_is_kept() {
        let catch_up = full_catch_up();
        let mut fast = catch_up.reader(&token(0));
        let mut slow = catch_up.reader(&token(0));
        read_all(&mut fast, &token(0));
        // The slow reader has read the ring's oldest entry: CATCH_UP_RING - 1 behind the head.
        assert!(matches!(
            slow.pull(&token(0), None, 1),
            Pull::Events(_, Some(_))
        ));
        assert!(!catch_up.blocked());
        assert_eq!(catch_up.detach_lapped(), 0);
        // The cursor pushes one more entry (evicting the one it read): a ring behind again.
        lock(&catch_up.state)
            .hub
            .push(routed(CATCH_UP_RING as u32 + 1));
        assert!(catch_up.blocked());
        assert_eq!(
            catch_up.detach_lapped(),
            0,
            "the fast reader is not at the head"
        );
        read_all(&mut fast, &token(CATCH_UP_RING as u32));
        assert_eq!(catch_up.detach_lapped(), 1);
    }

    #[test]
    fn a_lone_slow_reader_sets_the_pace_and_is_never_let_go() {
        let catch_up = full_catch_up();
        let _slow = catch_up.reader(&token(0));
        assert_eq!(catch_up.detach_lapped(), 0);
        assert!(catch_up.blocked());
        assert!(catch_up.coverage_for(&token(0)).is_some());
    }
}
