//! A client's feed as frames: batches of events, keep-alives, shutdown.
//!
//! Every transport drives a [`Feed`]; they differ only in how a frame becomes bytes. Batching
//! happens here: after one event arrives, everything already queued (up to a bound) is taken
//! too, so a client that lags a little gets one large write instead of many small ones.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::clients::TransportCount;
use super::negotiate::Transport;
use super::options::Narrowing;
use crate::auth::{REVOKED_MESSAGE, Revocation};
use crate::event::{Event, EventKind, Token};
use crate::limits::Permit;
use crate::metrics::{ClientGauge, Metrics, TransportLabel};
use crate::snapshot::Prelude;
use crate::worker::Subscription;

/// Most events written in one batch.
const MAX_BATCH_EVENTS: usize = 256;

/// Rewrites an event for a view of the stream; `None` drops it (see `http::docview`).
pub type ViewFn = fn(&Arc<Event>) -> Option<Arc<Event>>;

/// What to write next.
pub enum Frame {
    /// One or more events, in order; a terminal event can only be last.
    Events(Vec<Arc<Event>>),
    /// Nothing happened for a keep-alive period.
    KeepAlive,
    /// The server is shutting down; write a goodbye and close.
    Shutdown,
}

/// A subscription plus the timers and signals every transport needs.
pub struct Feed {
    /// This client in `streamgate_clients`, for as long as the feed lives.
    _counted: ClientGauge,
    subscription: Subscription,
    /// Ticks every keep-alive period; a tick after a period with writes sends nothing (cheaper
    /// than resetting a timer on every write, which takes the timer driver's lock).
    keepalive: Interval,
    /// Whether anything was written since the last keep-alive tick.
    wrote: bool,
    /// Created once: a fresh `cancelled()` per `next()` would lock the token's waiter list on
    /// every event for every client.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    metrics: Arc<Metrics>,
    /// The transport, for per-transport metrics (bytes written).
    transport: Transport,
    /// Fires when the client's credential expires: the feed then ends with `auth_revoked`.
    expiry: Option<Pin<Box<Sleep>>>,
    /// Resolves when a rule change withdraws the client's right: the feed then ends with
    /// `cancel`.
    revocation: Option<Revocation>,
    /// The client's connection-limit slot: held for as long as the feed lives, freed on drop.
    permit: Option<Permit>,
    /// This client in its worker's per-transport count (the admin API's stream view), for as
    /// long as the feed lives.
    count: Option<TransportCount>,
    /// Events sent before the subscription's (a snapshot, PROTOCOL.md §6); `None` once it
    /// has closed. A bounded channel: the scan behind it waits for this client.
    prelude: Option<Prelude>,
    /// Rewrites each event for a view (the document view); `None` from it drops the event.
    view: Option<ViewFn>,
    /// `operationType=…`: changes of other types are passed over (control events never are).
    narrowing: Option<Arc<Narrowing>>,
    /// `at_ms` of the changes in the batch last returned, until [`Feed::delivered`] times them
    /// (reused: no allocation per batch).
    unreported: Vec<u64>,
    done: bool,
}

impl Feed {
    /// Wraps a subscription; counts the client in metrics until dropped.
    pub fn new(
        subscription: Subscription,
        keepalive: Duration,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
        transport: Transport,
        expires_at: Option<tokio::time::Instant>,
    ) -> Feed {
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let counted = ClientGauge::new(Arc::clone(&metrics), transport.as_str());
        Feed {
            _counted: counted,
            subscription,
            keepalive,
            wrote: false,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            metrics,
            transport,
            expiry: expires_at.map(|at| Box::pin(tokio::time::sleep_until(at))),
            revocation: None,
            permit: None,
            count: None,
            prelude: None,
            view: None,
            narrowing: None,
            unreported: Vec::new(),
            done: false,
        }
    }

    /// Sends `prelude`'s events (a snapshot) before the subscription's.
    pub fn with_prelude(mut self, prelude: Prelude) -> Feed {
        self.metrics.snapshots.inc();
        self.prelude = Some(prelude);
        self
    }

    /// Passes every event through `view` (the document view's `put`/`patch`).
    pub fn with_view(mut self, view: ViewFn) -> Feed {
        self.view = Some(view);
        self
    }

    /// Passes over changes `narrowing` does not keep (`operationType=…`).
    pub fn with_narrowing(mut self, narrowing: Option<Arc<Narrowing>>) -> Feed {
        self.narrowing = narrowing;
        self
    }

    /// `rewind=N` on a fresh subscription: the last `n` events this client would have got.
    pub fn rewind(&mut self, n: usize) {
        let narrowing = self.narrowing.clone();
        self.subscription.rewind(n, &|event| {
            narrowing.as_ref().is_none_or(|k| k.keeps(event))
        });
    }

    /// The position this feed has delivered through (for the `info` event).
    pub fn position(&self) -> Option<&Token> {
        self.subscription.position()
    }

    /// Ends the feed with `cancel` when `revocation` resolves (see
    /// `Authenticator::watch_access`).
    pub fn with_revocation(mut self, revocation: Option<Revocation>) -> Feed {
        self.revocation = revocation;
        self
    }

    /// Holds `count` (this client in its worker's per-transport count) until the feed is
    /// dropped.
    pub fn with_count(mut self, count: TransportCount) -> Feed {
        self.count = Some(count);
        self
    }

    /// Holds `permit` (a connection-limit slot) until the feed is dropped.
    pub fn with_permit(mut self, permit: Permit) -> Feed {
        self.permit = Some(permit);
        self
    }

    /// The next frame; `None` after the feed ended (terminal event written, or shutdown).
    pub async fn next(&mut self) -> Option<Frame> {
        if self.done {
            return None;
        }
        loop {
            match self.wait().await {
                Step::Again => {}
                Step::End => return None,
                Step::Frame(Frame::Events(batch)) => {
                    if let Some(batch) = self.prepare(batch) {
                        return Some(Frame::Events(batch));
                    }
                }
                Step::Frame(frame) => return Some(frame),
            }
        }
    }

    /// Waits for whatever comes first. The order is the priority: shutdown; then the expiry
    /// and the revocation, timers rather than checks on the next event (an idle stream is cut
    /// on time too) polled before the subscription (one that is always ready, a long
    /// catch-up, must not starve them); then events (`recv` is cancel-safe: a keep-alive tick
    /// loses nothing); then the keep-alive.
    async fn wait(&mut self) -> Step {
        tokio::select! {
            biased;
            _ = self.shutdown.as_mut() => self.last(Frame::Shutdown),
            _ = expired(&mut self.expiry) => {
                self.last_event(EventKind::AuthRevoked, "the access token expired")
            }
            _ = revoked(&mut self.revocation) => {
                self.last_event(EventKind::Cancel, REVOKED_MESSAGE)
            }
            event = next_prelude(&mut self.prelude), if self.prelude.is_some() => {
                self.prelude_batch(event)
            }
            event = self.subscription.next(), if self.prelude.is_none() => {
                self.subscription_batch(event)
            }
            _ = self.keepalive.tick() => self.keepalive(),
        }
    }

    /// Ends the feed with `frame`.
    fn last(&mut self, frame: Frame) -> Step {
        self.done = true;
        Step::Frame(frame)
    }

    /// Ends the feed with a control event of `kind`.
    fn last_event(&mut self, kind: EventKind, message: &str) -> Step {
        let event = Arc::new(Event::control(kind, message, false));
        self.last(Frame::Events(vec![event]))
    }

    /// A batch of the prelude (the snapshot) starting with `first`; a closed prelude hands
    /// over to the subscription.
    fn prelude_batch(&mut self, first: Option<Arc<Event>>) -> Step {
        let (Some(first), Some(prelude)) = (first, self.prelude.as_mut()) else {
            self.prelude = None;
            return Step::Again;
        };
        let batch = gather(first, || prelude.try_recv().ok());
        if ends(&batch) {
            self.done = true;
        }
        self.wrote = true;
        Step::Frame(Frame::Events(batch))
    }

    /// A batch of the subscription starting with `first`, narrowed (`operationType=…`); its
    /// end (`None`) ends the feed.
    fn subscription_batch(&mut self, first: Option<Arc<Event>>) -> Step {
        let Some(first) = first else {
            self.done = true;
            return Step::End;
        };
        let subscription = &mut self.subscription;
        let mut batch = gather(first, || subscription.try_next());
        if let Some(narrowing) = &self.narrowing {
            batch.retain(|event| narrowing.keeps(event));
            if batch.is_empty() {
                return Step::Again;
            }
        }
        self.wrote = true;
        Step::Frame(Frame::Events(batch))
    }

    /// A keep-alive, unless something was written since the last tick.
    fn keepalive(&mut self) -> Step {
        if std::mem::take(&mut self.wrote) {
            Step::Again
        } else {
            Step::Frame(Frame::KeepAlive)
        }
    }

    /// Notes the batch's change times for [`Feed::delivered`] (from the changes themselves,
    /// before a view rewrites them), then applies the view; `None` when the view leaves
    /// nothing to write.
    fn prepare(&mut self, batch: Vec<Arc<Event>>) -> Option<Vec<Arc<Event>>> {
        self.unreported.clear();
        self.unreported.extend(
            batch
                .iter()
                .filter(|e| e.kind == EventKind::Change && e.at_ms != 0)
                .map(|e| e.at_ms),
        );
        let Some(view) = self.view else {
            return Some(batch);
        };
        let batch: Vec<Arc<Event>> = batch.iter().filter_map(view).collect();
        (!batch.is_empty()).then_some(batch)
    }

    /// Records a batch handed to the socket in stats and metrics (counters per batch, not per
    /// event: a lagging client's large batches cost one update), and each change's delivery
    /// latency (call it when the batch's bytes have been handed to the socket).
    pub fn delivered(&mut self, events: usize, bytes: usize) {
        let stats = &self.subscription.worker().stats;
        stats.delivered.fetch_add(events as u64, Ordering::Relaxed);
        stats
            .delivered_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.metrics.deliveries.inc_by(events as u64);
        self.metrics
            .bytes_written
            .get_or_create(&TransportLabel {
                transport: self.transport.as_str(),
            })
            .inc_by(bytes as u64);
        if !self.unreported.is_empty() {
            let now = crate::metrics::now_ms();
            for at in self.unreported.drain(..) {
                // A MongoDB clock ahead of ours reads as 0, not as a huge unsigned number.
                self.metrics
                    .delivery_latency
                    .observe_ms(now.saturating_sub(at));
            }
        }
    }
}

/// What one wait for the next frame produced.
enum Step {
    /// A frame to return (events still go through [`Feed::prepare`]).
    Frame(Frame),
    /// Nothing to write (a closed prelude, a batch narrowing emptied, a keep-alive period
    /// with writes): wait again.
    Again,
    /// The subscription ended: so does the feed.
    End,
}

/// `first` and the events already waiting behind it (`more`), up to [`MAX_BATCH_EVENTS`] and
/// never past a terminal event.
fn gather(first: Arc<Event>, mut more: impl FnMut() -> Option<Arc<Event>>) -> Vec<Arc<Event>> {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_EVENTS && !ends(&batch) {
        match more() {
            Some(event) => batch.push(event),
            None => break,
        }
    }
    batch
}

/// Whether `batch` ends with a terminal event.
fn ends(batch: &[Arc<Event>]) -> bool {
    batch.last().is_some_and(|e| e.kind.is_terminal())
}

async fn next_prelude(prelude: &mut Option<Prelude>) -> Option<Arc<Event>> {
    match prelude {
        Some(prelude) => prelude.recv().await,
        None => std::future::pending().await,
    }
}

async fn expired(expiry: &mut Option<Pin<Box<Sleep>>>) {
    match expiry {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn revoked(revocation: &mut Option<Revocation>) {
    match revocation {
        Some(revocation) => revocation.as_mut().await,
        None => std::future::pending().await,
    }
}
