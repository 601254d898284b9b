//! `GET /_streams?streams=/db/c/_streams/a,/db/c2/_streams/b`: one connection, many streams
//! (PROTOCOL.md §8), over SSE, NDJSON or WebSocket.
//!
//! Each stream is an ordinary [`Subscription`] of the one worker it shares with single-stream
//! clients, checked exactly as a single subscribe is (permission, limits, `avars`), and a
//! refusal names the stream. [`Streams`] merges them: each subscription is driven as a boxed
//! stream with its own waker, so a wake-up polls only the streams that have news (no per-event
//! allocation, no polling of idle streams).
//!
//! **Composite position** (`position.rs`). The connection's id is one position over all its
//! streams, so one `Last-Event-ID` resumes every stream exactly (each from its place in the
//! oplog, with the usual exactly-once machinery). Each stream's entry is a few bytes (cluster
//! time as a delta from the oldest entry's, increment, transaction index, a short tag of the
//! stream's path), so the id does not grow with the data and barely with the streams. Each
//! stream's entry is kept decoded and the id is rebuilt per event (a few bytes per stream).
//! A malformed id, or one of the former format, is a 400.
//!
//! **Per-connection encoding.** A multi-stream envelope must name its stream (and, except over
//! SSE, carry the composite id), so it cannot be the worker's shared encoding. It is spliced,
//! not re-serialised: a small prefix (`{"stream":…,"event":…[,"id":…],"data":`) plus the
//! shared `data` bytes sliced out of the worker's envelope, plus a constant suffix; SSE and
//! NDJSON write the three as one `writev` without copying the change. Over SSE the id is sent
//! once, in the `id:` line (PROTOCOL.md §8), not again in the envelope.
//!
//! **Stream ends.** A terminal event of one stream (`cancel`, `invalidate`, an `error` such
//! as `history_lost`) is delivered with its stream's name and removes that stream (and its
//! entry in the composite id, so a resume starts it from now); the connection goes on while
//! other streams remain (a WebSocket stays open even with none).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::task::AtomicWaker;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::time::{Interval, MissedTickBehavior, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::AppState;
use super::clients::TransportCount;
use super::negotiate::{Transport, negotiate};
use super::options::{Options, RawOptions, named_frame};
use super::subscribe::Caller;
use super::ws::{GOING_AWAY, MESSAGE_TOO_BIG, close};
use crate::auth::Principal;
use crate::auth::{REVOKED_MESSAGE, Revocation};
use crate::event::{Event, EventKind, Token};
use crate::http::error::ApiError;
use crate::limits::Permit;
use crate::metrics::{ClientGauge, Metrics};
use crate::snapshot::{Lease, Mode, Prelude};
use crate::streams::{Requester, StreamKey};
use crate::worker::{Subscription, Worker};

mod position;
mod shared;

use self::position::{Encoder, Entry, Position, PositionError};
use self::shared::{FrameState, SharedFrame};

/// Largest WebSocket message we read from a client: a `subscribe` with a composite id.
const WS_MAX_INCOMING: usize = 64 * 1024;
/// Most events written in one batch.
const MAX_BATCH_EVENTS: usize = 256;

/// Query parameters of `GET /_streams`.
#[derive(Debug, Default, Deserialize)]
pub struct MultiParams {
    /// Comma-separated stream paths (`/db/coll/_streams/name`).
    pub streams: Option<String>,
    /// URL-encoded JSON object of variable values, for every stream.
    pub avars: Option<String>,
    /// Composite resume position for clients that cannot send `Last-Event-ID`.
    #[serde(rename = "lastEventId")]
    pub last_event_id: Option<String>,
    /// Auth token for clients that cannot send headers.
    pub access_token: Option<String>,
    /// `true`: every stream starts with its current documents (PROTOCOL.md §6); by default, as
    /// each stream's definition says.
    pub snapshot: Option<String>,
    /// `rewind`, `heartbeats`, `enveloped`, `operationType`, `info`.
    #[serde(flatten)]
    pub options: RawOptions,
}

/// Everything needed to open one more stream on a connection (also after a WebSocket
/// `subscribe`).
struct Opener {
    state: AppState,
    principal: Option<Principal>,
    ip: Option<IpAddr>,
    avars: Option<String>,
    /// `?snapshot=` as given (`None`: as each definition says).
    snapshot: Option<bool>,
    /// The connection's snapshot queue budget (all its streams together) and principal.
    lease: Lease,
    options: Options,
    transport: Transport,
}

/// The `GET /_streams` handler.
pub async fn subscribe_many(
    State(state): State<AppState>,
    query: Result<Query<MultiParams>, QueryRejection>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let headers = &caller.headers;
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let transport = negotiate(headers)?;
    let options = Options::parse(&params.options)?;
    let max = state.config.limits.max_streams_per_connection;
    let names = stream_list(params.streams.as_deref(), max)?;
    if names.is_empty() && transport != Transport::WebSocket {
        return Err(ApiError::bad_request(
            "streams: give at least one stream path, e.g. ?streams=/db/coll/_streams/name",
        ));
    }
    let resume = resume_position(headers, params.last_event_id.as_deref())?;
    let upgrade = super::subscribe::checked_upgrade(
        &state,
        headers,
        transport,
        params.access_token.as_deref(),
        caller.upgrade,
    )?;
    let lease = state.snapshots.lease(
        &state.limits,
        caller.principal.as_ref().map(|p| p.subject.as_str()),
        caller.ip,
    );
    let opener = Opener {
        lease,
        principal: caller.principal,
        ip: caller.ip,
        avars: params.avars,
        snapshot: super::subscribe::snapshot_param(params.snapshot.as_deref())?,
        options,
        transport,
        state,
    };
    // Every stream is checked (and opened) before the response starts: a refusal of any one
    // is the whole request's status, naming that stream.
    let mut streams = Streams::default();
    for key in &names {
        // Resuming: every stream from its entry (a stream the id does not hold from now).
        let start = resume.as_ref().and_then(|p| p.get(&key.to_string()));
        streams.push(opener.open(key, start, resume.is_none()).await?);
    }
    let mut feed = MultiFeed::new(streams, &opener);
    let info = opener.options.info.then(|| feed.info());
    Ok(match transport {
        Transport::Sse | Transport::Ndjson => text_response(feed, info, &opener),
        Transport::WebSocket => {
            let Some(upgrade) = upgrade else {
                return Err(ApiError::bad_request("missing WebSocket upgrade"));
            };
            super::ws::accept(upgrade, WS_MAX_INCOMING, move |sink, incoming| {
                serve_ws(sink, incoming, feed, info, opener)
            })
        }
    })
}

/// Parses `streams=`: comma-separated `/db/coll/_streams/name` paths, no duplicates, at most
/// `max`.
fn stream_list(list: Option<&str>, max: usize) -> Result<Vec<StreamKey>, ApiError> {
    let mut keys: Vec<StreamKey> = Vec::new();
    for item in list.unwrap_or("").split(',').map(str::trim) {
        if item.is_empty() {
            continue;
        }
        let key = stream_key(item)?;
        if keys.contains(&key) {
            return Err(ApiError::bad_request(format!(
                "streams: {key} is listed twice"
            )));
        }
        keys.push(key);
        if keys.len() > max {
            return Err(ApiError::bad_request(format!(
                "streams: at most {max} streams per connection (max_streams_per_connection)"
            )));
        }
    }
    Ok(keys)
}

/// `/db/coll/_streams/name` (leading slash optional) → the stream's key; 400 when it is not
/// shaped like one, 404 naming it when the names are not valid.
fn stream_key(path: &str) -> Result<StreamKey, ApiError> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [db, coll, "_streams", name] = parts.as_slice() else {
        return Err(ApiError::bad_request(format!(
            "streams: {path:?} is not a stream path (/db/coll/_streams/name)"
        )));
    };
    StreamKey::new(db, coll, name)
        .map_err(|_| ApiError::not_found(format!("no stream is defined at {path}")))
}

/// Prefixes an error's detail with the stream it is about, and names it in the body.
fn naming(key: &StreamKey, error: impl Into<ApiError>) -> ApiError {
    let mut error = error.into();
    let stream = key.to_string();
    if !error.detail.contains(&stream) {
        error.detail = format!("{stream}: {}", error.detail);
    }
    error.with_extra(json!({ "stream": stream }))
}

impl Opener {
    /// Checks and opens one stream: permission (403 naming it), existence, limits, then the
    /// worker's subscription from `start` (`None`: from now, then `rewind` if `rewind`).
    async fn open(
        &self,
        key: &StreamKey,
        start: Option<Token>,
        rewind: bool,
    ) -> Result<Slot, ApiError> {
        let state = &self.state;
        // Before the existence check, so a refused client cannot probe which streams exist.
        state
            .auth
            .authorize_stream(self.principal.as_ref(), key)
            .map_err(|e| naming(key, e))?;
        if state.registry.get(key).is_none() {
            return Err(naming(
                key,
                ApiError::not_found("no stream is defined here"),
            ));
        }
        let user = self.principal.as_ref().map(Principal::limit_key);
        let permit = state
            .limits
            .try_acquire(key, user.as_deref(), self.ip)
            .map_err(|exceeded| naming(key, state.limits.refusal(exceeded)))?;
        // A well-formed id that cannot be a position of this collection: 400, naming the stream.
        if let Some(token) = &start {
            state
                .resume
                .check(key, token)
                .await
                .map_err(|e| naming(key, e))?;
            crate::snapshot::check_id(token).map_err(|e| naming(key, e))?;
        }
        let who = super::subscribe::principal_key(user, self.ip);
        let requester = Requester {
            claims: self.principal.as_ref().map(|p| &p.claims),
            principal: who.as_ref(),
        };
        let snapshot = super::subscribe::snapshot_wanted(state, key, self.snapshot);
        let rewind = rewind && start.is_none() && !snapshot;
        let (mut subscription, prelude) = if snapshot {
            state
                .snapshots
                .subscribe(
                    &state.registry,
                    key,
                    self.avars.as_deref(),
                    start,
                    requester,
                    Mode::Events,
                    &self.lease,
                )
                .await
                .map_err(|e| naming(key, e))?
        } else {
            let subscription = state
                .registry
                .subscribe(key, self.avars.as_deref(), start, requester)
                .await
                .map_err(|e| naming(key, e))?;
            (subscription, None)
        };
        if rewind {
            let narrowing = self.options.narrowing.clone();
            subscription.rewind(self.options.rewind, &|event| {
                narrowing.as_ref().is_none_or(|n| n.keeps(event))
            });
        }
        // A rule change that withdraws this stream ends it (and only it) with `cancel`.
        let revocation = state.auth.watch_access(self.principal.as_ref(), key);
        let count = state.clients.count(subscription.worker(), self.transport);
        Ok(Slot::new(
            key.to_string(),
            subscription,
            (permit, count),
            prelude,
            revocation,
        ))
    }
}

/// `Last-Event-ID` wins over `?lastEventId=`; empty means "from now"; anything else must be a
/// composite position.
fn resume_position(headers: &HeaderMap, param: Option<&str>) -> Result<Option<Position>, ApiError> {
    let Some(raw) = super::subscribe::last_event_id(headers, param)? else {
        return Ok(None);
    };
    Position::decode(raw).map(Some).map_err(refused_position)
}

/// The 400 for a composite id we cannot read, with its `reason`.
fn refused_position(error: PositionError) -> ApiError {
    ApiError::bad_request(error.to_string()).with_extra(json!({ "reason": error.reason() }))
}

/// Marks its stream as having news and wakes the connection's task.
struct SlotWaker {
    ready: AtomicBool,
    parent: Arc<AtomicWaker>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        self.parent.wake();
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Arc<Event>> + Send>>;

/// One stream of a connection.
struct Slot {
    /// `/db/coll/_streams/name`.
    name: Arc<str>,
    /// The hash of `name` the stream's tag in the composite position is cut from.
    hash: u64,
    /// `{"stream":"<name>","event":"`, encoded once.
    head: Bytes,
    /// What this client has seen through on this stream, reduced to its composite-id entry
    /// (`None`: no position yet, a resume starts this stream afresh).
    entry: Option<Entry>,
    /// For delivery stats.
    worker: Arc<Worker>,
    /// The subscription, driven as a stream (boxed once, so no allocation per event).
    events: EventStream,
    flag: Arc<SlotWaker>,
    /// `flag` as a waker, created once.
    waker: Waker,
    /// Events delivered in the current batch (flushed to the worker's stats per batch).
    delivered: u64,
    delivered_bytes: u64,
    /// This stream's connection-limit slot and its client in the worker's per-transport
    /// count, both held for as long as the slot lives.
    _held: (Permit, TransportCount),
}

impl Slot {
    fn new(
        name: String,
        subscription: Subscription,
        held: (Permit, TransportCount),
        prelude: Option<Prelude>,
        revocation: Option<Revocation>,
    ) -> Slot {
        // With a snapshot still to come, no position yet: a client that reconnects before its
        // first event starts that stream afresh (snapshot included), not after it.
        let position = prelude
            .is_none()
            .then(|| subscription.position().cloned())
            .flatten();
        let worker = Arc::clone(subscription.worker());
        let head = format!(
            "{{\"stream\":{},\"event\":\"",
            serde_json::Value::String(name.clone())
        );
        // The state is boxed: `unfold` moves it into a new future for every event, and a
        // subscription is large.
        let events: EventStream = Box::pin(futures::stream::unfold(
            Box::new((prelude, subscription, revocation)),
            |mut state| async move {
                let (prelude, subscription, revocation) = &mut *state;
                // A snapshot first (its `snapshot` events and `ready`), then the changes.
                if let Some(events) = prelude.as_mut() {
                    match events.recv().await {
                        Some(event) => return Some((event, state)),
                        None => *prelude = None,
                    }
                }
                let event = match revocation.as_mut() {
                    // `cancel` is terminal: the slot leaves the merge and is not polled again.
                    Some(revoked) => tokio::select! {
                        biased;
                        _ = revoked => Arc::new(Event::control(EventKind::Cancel, REVOKED_MESSAGE, false)),
                        event = subscription.next() => event?,
                    },
                    None => subscription.next().await?,
                };
                Some((event, state))
            },
        ));
        // A placeholder parent until the slot joins a `Streams` (see `Streams::push`).
        let flag = Arc::new(SlotWaker {
            ready: AtomicBool::new(true),
            parent: Arc::new(AtomicWaker::new()),
        });
        Slot {
            hash: position::hash(&name),
            name: Arc::from(name),
            head: Bytes::from(head),
            entry: position.as_ref().map(Entry::of),
            worker,
            events,
            waker: Waker::from(Arc::clone(&flag)),
            flag,
            delivered: 0,
            delivered_bytes: 0,
            _held: held,
        }
    }

    /// The stream has delivered (or passed over) `event`: its entry moves to the event's id.
    fn advance(&mut self, event: &Event) {
        if let Some(id) = &event.id {
            self.entry = Some(Entry::with_place(id, event.place()));
        }
    }

    fn flush_stats(&mut self) {
        if self.delivered > 0 {
            let stats = &self.worker.stats;
            stats.delivered.fetch_add(self.delivered, Ordering::Relaxed);
            stats
                .delivered_bytes
                .fetch_add(self.delivered_bytes, Ordering::Relaxed);
            self.delivered = 0;
            self.delivered_bytes = 0;
        }
    }
}

/// A connection's streams, merged: fair (round robin), per-stream order kept.
#[derive(Default)]
struct Streams {
    slots: Vec<Slot>,
    /// The connection task's waker, woken by any slot with news.
    parent: Arc<AtomicWaker>,
    /// Where the next scan starts (round robin).
    next: usize,
    /// The narrowest tag width at which the streams' tags differ (see `position.rs`), kept
    /// in step with `slots` by `push` and `remove`.
    width: usize,
    /// The composite id's buffer, reused for every event.
    encoder: Encoder,
}

impl Streams {
    fn push(&mut self, mut slot: Slot) {
        slot.flag = Arc::new(SlotWaker {
            ready: AtomicBool::new(true),
            parent: Arc::clone(&self.parent),
        });
        slot.waker = Waker::from(Arc::clone(&slot.flag));
        self.slots.push(slot);
        self.retag();
    }

    /// Takes a stream out (it ended or was unsubscribed).
    fn remove(&mut self, index: usize) -> Slot {
        let slot = self.slots.remove(index);
        self.next = 0;
        self.retag();
        slot
    }

    fn retag(&mut self) {
        let hashes: Vec<u64> = self.slots.iter().map(|s| s.hash).collect();
        self.width = position::width_for(&hashes, 2);
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| &*s.name == name)
    }

    /// The next event of any stream with news: `(slot, Some(event))`, or `(slot, None)` when
    /// that stream ended. `register`: whether to be woken (false for a non-waiting look).
    fn poll_event(&mut self, cx: Option<&mut Context<'_>>) -> Poll<(usize, Option<Arc<Event>>)> {
        if let Some(cx) = cx {
            // Registered before the scan, so a wake during it is not lost.
            self.parent.register(cx.waker());
        }
        let count = self.slots.len();
        for offset in 0..count {
            let index = (self.next + offset) % count;
            let slot = &mut self.slots[index];
            // Read before the swap: most slots have no news, and a swap (an atomic write)
            // takes the flag's cache line from the core whose wake set it, for every slot and
            // every scan (three quarters of this function's samples in a 10-stream fan-out).
            if !slot.flag.ready.load(Ordering::Acquire)
                || !slot.flag.ready.swap(false, Ordering::AcqRel)
            {
                continue;
            }
            let mut context = Context::from_waker(&slot.waker);
            match slot.events.as_mut().poll_next(&mut context) {
                Poll::Ready(event) => {
                    // More may be ready: look again next time.
                    slot.flag.ready.store(true, Ordering::Release);
                    self.next = (index + 1) % count;
                    return Poll::Ready((index, event));
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// The composite position of every stream.
    fn position(&mut self) -> String {
        self.current_position().to_owned()
    }

    /// The composite position of every stream, in the encoder's buffer (no allocation: it is
    /// spliced into every event of the connection).
    fn current_position(&mut self) -> &str {
        let entries = self
            .slots
            .iter()
            .filter_map(|s| s.entry.as_ref().map(|entry| (s.hash, entry)));
        self.encoder.encode(self.width, entries)
    }

    /// What this connection's frame of an event of the stream with `head` depends on: every
    /// stream's tag hash and entry, in order (what the composite id encodes), and the rest.
    fn frame_state<'a>(
        &'a self,
        splice: Splice,
        head: &'a Bytes,
    ) -> FrameState<'a, impl Iterator<Item = (u64, &'a Entry)> + Clone> {
        FrameState {
            transport: splice.transport,
            enveloped: splice.enveloped,
            head,
            width: self.width,
            entries: self
                .slots
                .iter()
                .filter_map(|s| s.entry.as_ref().map(|entry| (s.hash, entry))),
        }
    }
}

/// What to write next.
enum MultiFrame {
    /// Encoded events: `chunks` in order; for WebSocket, event `i` is the chunks up to
    /// `ends[i]`. `close`: the connection ends after them (with this WebSocket close code).
    Events {
        chunks: Vec<Bytes>,
        ends: Vec<usize>,
        close: Option<u16>,
    },
    /// Nothing happened for a keep-alive period.
    KeepAlive,
    /// The server is shutting down.
    Shutdown,
}

/// A multi-stream connection's feed: merged streams, keep-alive, shutdown, token expiry.
struct MultiFeed {
    /// This client in `streamgate_clients`, for as long as the feed lives.
    _counted: ClientGauge,
    streams: Streams,
    transport: Transport,
    enveloped: bool,
    narrowing: Option<Arc<super::options::Narrowing>>,
    keepalive: Interval,
    wrote: bool,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    expiry: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
    /// HTTP transports end when their last stream does; a WebSocket may subscribe again.
    end_when_empty: bool,
    done: bool,
}

impl MultiFeed {
    fn new(streams: Streams, opener: &Opener) -> MultiFeed {
        let period: Duration = opener.state.config.keepalive();
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let metrics = Arc::clone(&opener.state.metrics);
        let counted = ClientGauge::new(Arc::clone(&metrics), opener.transport.as_str());
        MultiFeed {
            _counted: counted,
            streams,
            transport: opener.transport,
            enveloped: opener.options.enveloped,
            narrowing: opener.options.narrowing.clone(),
            keepalive,
            wrote: false,
            shutdown: Box::pin(opener.state.shutdown.clone().cancelled_owned()),
            expiry: opener
                .principal
                .as_ref()
                .and_then(Principal::deadline)
                .map(|at| Box::pin(tokio::time::sleep_until(at))),
            metrics,
            end_when_empty: opener.transport != Transport::WebSocket,
            done: false,
        }
    }

    /// The `info` event: the streams and the composite position at connect.
    fn info(&mut self) -> Bytes {
        let position = self.streams.position();
        let names: Vec<&str> = self.streams.slots.iter().map(|s| &*s.name).collect();
        let data = json!({ "streams": names, "position": position });
        named_frame(self.transport, "info", Some(&position), &data.to_string())
    }

    async fn next(&mut self) -> Option<MultiFrame> {
        loop {
            if self.done || (self.end_when_empty && self.streams.slots.is_empty()) {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.as_mut() => {
                    self.done = true;
                    return Some(MultiFrame::Shutdown);
                }
                _ = expired(&mut self.expiry) => {
                    self.done = true;
                    let revoked = Event::control(EventKind::AuthRevoked, "the access token expired", false);
                    let bytes = named_frame(self.transport, revoked.kind.name(), None, &String::from_utf8_lossy(&revoked.data()));
                    return Some(MultiFrame::Events {
                        chunks: vec![bytes],
                        ends: vec![1],
                        close: Some(super::ws::close_code(revoked.kind)),
                    });
                }
                (index, event) = std::future::poll_fn(|cx| self.streams.poll_event(Some(cx))) => {
                    let mut frame = Batch::default();
                    self.take(index, event, &mut frame);
                    while frame.events < MAX_BATCH_EVENTS {
                        match self.streams.poll_event(None) {
                            Poll::Ready((index, event)) => self.take(index, event, &mut frame),
                            Poll::Pending => break,
                        }
                    }
                    if frame.events == 0 {
                        continue;
                    }
                    self.wrote = true;
                    let mut total = 0;
                    for slot in &mut self.streams.slots {
                        total += slot.delivered;
                        slot.flush_stats();
                    }
                    total += frame.orphaned;
                    self.metrics.deliveries.inc_by(total);
                    return Some(MultiFrame::Events { chunks: frame.chunks, ends: frame.ends, close: None });
                }
                _ = self.keepalive.tick() => {
                    if std::mem::take(&mut self.wrote) {
                        continue;
                    }
                    return Some(MultiFrame::KeepAlive);
                }
            }
        }
    }

    /// Adds one event of slot `index` to the batch (or removes the slot when it ended).
    fn take(&mut self, index: usize, event: Option<Arc<Event>>, batch: &mut Batch) {
        let Some(event) = event else {
            self.streams.remove(index);
            return;
        };
        if self.narrowing.as_ref().is_some_and(|n| !n.keeps(&event)) {
            // Not for this client, but seen: the position moves past it.
            self.streams.slots[index].advance(&event);
            return;
        }
        let terminal = event.kind.is_terminal();
        let (name_head, removed) = if terminal {
            // The stream ends here: out of the merge and out of the composite position.
            let slot = self.streams.remove(index);
            (slot.head.clone(), Some(slot))
        } else {
            self.streams.slots[index].advance(&event);
            (self.streams.slots[index].head.clone(), None)
        };
        let splice = Splice {
            transport: self.transport,
            enveloped: self.enveloped,
        };
        let before = batch.chunks.len();
        let kept = event
            .shared_frame
            .get()
            .and_then(|kept| kept.downcast_ref::<SharedFrame>());
        match kept.and_then(|kept| self.streams.frame_state(splice, &name_head).reuse(kept)) {
            // Another connection in the same state framed it already (`shared.rs`).
            Some(frame) => batch.chunks.push(frame),
            None => {
                let position = self.streams.current_position();
                splice.encode(&event, &name_head, position, &mut batch.chunks);
                if kept.is_none()
                    && let Some(frame) = batch.chunks.last()
                {
                    let shared = self
                        .streams
                        .frame_state(splice, &name_head)
                        .keep(frame.clone());
                    let _ = event.shared_frame.set(Box::new(shared));
                }
            }
        }
        let bytes: usize = batch.chunks[before..].iter().map(Bytes::len).sum();
        batch.ends.push(batch.chunks.len());
        batch.events += 1;
        match removed {
            Some(mut slot) => {
                slot.delivered += 1;
                slot.delivered_bytes += bytes as u64;
                slot.flush_stats();
                batch.orphaned += 1;
            }
            None => {
                let slot = &mut self.streams.slots[index];
                slot.delivered += 1;
                slot.delivered_bytes += bytes as u64;
            }
        }
    }
}

/// How a connection frames each event it splices.
#[derive(Clone, Copy)]
struct Splice {
    transport: Transport,
    enveloped: bool,
}

impl Splice {
    /// Splices one event into one chunk: prefix (composite id, stream, event name) + the
    /// event's shared `data` bytes + suffix, copied together. One chunk per event, as a
    /// single-stream connection writes: each chunk is a trip through the body and an iovec,
    /// which cost more than copying the few hundred bytes of a change.
    fn encode(self, event: &Event, head: &Bytes, position: &str, out: &mut Vec<Bytes>) {
        let name = event.kind.name();
        let data = event.data();
        let bare = !self.enveloped && event.kind == EventKind::Change;
        let mut frame: Vec<u8> =
            Vec::with_capacity(head.len() + 2 * position.len() + data.len() + 64);
        if self.transport == Transport::Sse {
            // PROTOCOL.md §8: every stream's event is an `event: change` whose data is the
            // envelope (its `event` member says what it is: change, snapshot, cancel, …).
            frame.extend_from_slice(b"id: ");
            frame.extend_from_slice(position.as_bytes());
            frame.extend_from_slice(b"\nevent: change\ndata: ");
        }
        if bare {
            // `enveloped=false`: the change alone (SSE keeps its id line, the position).
            frame.extend_from_slice(&data);
        } else {
            // The stream's head is spliced as the bytes it is (built from a `String`).
            frame.extend_from_slice(head);
            frame.extend_from_slice(name.as_bytes());
            if self.transport == Transport::Sse {
                // The `id:` line above is the id: not repeated in the envelope (§8).
                frame.extend_from_slice(b"\",\"data\":");
            } else {
                frame.extend_from_slice(b"\",\"id\":\"");
                frame.extend_from_slice(position.as_bytes());
                frame.extend_from_slice(b"\",\"data\":");
            }
            frame.extend_from_slice(&data);
        }
        frame.extend_from_slice(self.suffix(!bare));
        out.push(Bytes::from(frame));
    }

    fn suffix(self, envelope: bool) -> &'static [u8] {
        match (self.transport, envelope) {
            (Transport::Sse, true) => b"}\n\n",
            (Transport::Sse, false) => b"\n\n",
            (Transport::Ndjson, true) => b"}\n",
            (Transport::Ndjson, false) => b"\n",
            (Transport::WebSocket, true) => b"}",
            (Transport::WebSocket, false) => b"",
        }
    }
}

/// A batch being built.
#[derive(Default)]
struct Batch {
    chunks: Vec<Bytes>,
    ends: Vec<usize>,
    events: usize,
    /// Deliveries of streams that ended inside the batch (their stats are already flushed).
    orphaned: u64,
}

async fn expired(expiry: &mut Option<Pin<Box<Sleep>>>) {
    match expiry {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// SSE or NDJSON: a streaming body (written straight to the socket by `server.rs`).
fn text_response(feed: MultiFeed, info: Option<Bytes>, opener: &Opener) -> Response {
    let sse = opener.transport == Transport::Sse;
    let retry = Bytes::from(format!("retry: {}\n\n", opener.state.config.sse_retry_ms));
    let mut pending: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    if sse {
        pending.push_back(retry.clone());
    }
    pending.extend(info);
    let keepalive = opener
        .options
        .heartbeat(opener.transport)
        .unwrap_or_else(|| Bytes::from_static(if sse { b": keep-alive\n\n" } else { b"\n" }));
    let goodbye = sse.then_some(retry);
    // The state is boxed: `unfold` moves its state into a new future for every chunk (three
    // per event here), and the feed is large (as in `body.rs`).
    let stream = futures::stream::unfold(
        Box::new((feed, pending, false, keepalive, goodbye)),
        |mut state| async move {
            let (feed, pending, ending, keepalive, goodbye) = &mut *state;
            loop {
                if let Some(bytes) = pending.pop_front() {
                    return Some((Ok::<Bytes, std::convert::Infallible>(bytes), state));
                }
                if *ending {
                    return None;
                }
                match feed.next().await? {
                    MultiFrame::Events { chunks, close, .. } => {
                        pending.extend(chunks);
                        *ending = close.is_some();
                    }
                    MultiFrame::KeepAlive => pending.push_back(keepalive.clone()),
                    MultiFrame::Shutdown => {
                        pending.extend(goodbye.clone());
                        *ending = true;
                    }
                }
            }
        },
    );
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// WebSocket: frames out, `subscribe` / `unsubscribe` in.
async fn serve_ws<W, R, E>(
    mut sink: W,
    mut incoming: R,
    mut feed: MultiFeed,
    info: Option<Bytes>,
    opener: Opener,
) where
    W: Sink<Message> + Unpin,
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + 'static,
{
    if let Some(info) = &info
        && sink.send(super::ws::text(info)).await.is_err()
    {
        return;
    }
    let heartbeat = opener.options.heartbeat(Transport::WebSocket);
    loop {
        tokio::select! {
            frame = feed.next() => {
                let outcome = match frame {
                    None => close(&mut sink, 1000, "stream ended").await,
                    Some(MultiFrame::Events { chunks, ends, close: code }) => {
                        write_messages(&mut sink, &chunks, &ends, code).await
                    }
                    Some(MultiFrame::KeepAlive) => match &heartbeat {
                        Some(heartbeat) => sink.send(super::ws::text(heartbeat)).await.map(|_| true),
                        None => sink.send(Message::Ping(Bytes::new())).await.map(|_| true),
                    },
                    Some(MultiFrame::Shutdown) => close(&mut sink, GOING_AWAY, "server shutting down").await,
                };
                match outcome {
                    Ok(true) => {}
                    _ => return,
                }
            }
            message = incoming.next() => {
                let reply = match message {
                    Some(Ok(Message::Text(text))) => opener.handle(&mut feed, text.as_str()).await,
                    Some(Ok(Message::Binary(_))) => op_error(None, None, "bad_request", "send operations as JSON text messages"),
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Err(error)) => {
                        if super::ws::too_big(&error) {
                            let _ = close(&mut sink, MESSAGE_TOO_BIG, "message too big").await;
                        }
                        return;
                    }
                    // Pings are answered by the protocol layer.
                    Some(Ok(_)) => continue,
                };
                if sink.send(Message::Text(Utf8Bytes::from(reply))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes each event as one text message; closes after a terminal frame.
async fn write_messages<W: Sink<Message> + Unpin>(
    sink: &mut W,
    chunks: &[Bytes],
    ends: &[usize],
    code: Option<u16>,
) -> Result<bool, W::Error> {
    let mut start = 0;
    for &end in ends {
        let message = match &chunks[start..end] {
            [one] => one.clone(),
            many => {
                let mut text = Vec::with_capacity(many.iter().map(Bytes::len).sum());
                for chunk in many {
                    text.extend_from_slice(chunk);
                }
                Bytes::from(text)
            }
        };
        start = end;
        sink.feed(super::ws::text(&message)).await?;
    }
    sink.flush().await?;
    match code {
        Some(code) => close(sink, code, "stream ended").await,
        None => Ok(true),
    }
}

/// `{"event":"error","data":{code,message,op,stream}}`: the answer to an operation we refused.
fn op_error(op: Option<&str>, stream: Option<&str>, code: &str, message: &str) -> String {
    json!({
        "event": "error",
        "data": { "code": code, "message": message, "op": op, "stream": stream },
    })
    .to_string()
}

/// A client operation on a live WebSocket (PROTOCOL.md §8).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Operation {
    op: String,
    stream: Option<String>,
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

impl Opener {
    /// Answers one client message: `subscribed`, `unsubscribed` or `error` (never a close).
    async fn handle(&self, feed: &mut MultiFeed, text: &str) -> String {
        let operation: Operation = match serde_json::from_str(text) {
            Ok(op) => op,
            Err(error) => {
                return op_error(
                    None,
                    None,
                    "bad_request",
                    &format!(
                        "expected {{\"op\":\"subscribe\"|\"unsubscribe\",\"stream\":\"/db/coll/_streams/name\",\"lastEventId\":…}}: {error}"
                    ),
                );
            }
        };
        let op = operation.op.as_str();
        if !matches!(op, "subscribe" | "unsubscribe") {
            return op_error(
                Some(op),
                None,
                "bad_request",
                "unknown op (subscribe or unsubscribe)",
            );
        }
        let Some(path) = operation.stream.as_deref() else {
            return op_error(Some(op), None, "bad_request", "stream is required");
        };
        let key = match stream_key(path) {
            Ok(key) => key,
            Err(error) => return op_error(Some(op), Some(path), code_of(&error), &error.detail),
        };
        let name = key.to_string();
        let existing = feed.streams.find(&name);
        if op == "unsubscribe" {
            let Some(index) = existing else {
                return op_error(
                    Some(op),
                    Some(&name),
                    "not_subscribed",
                    "this connection is not subscribed to it",
                );
            };
            let mut slot = feed.streams.remove(index);
            slot.flush_stats();
            drop(slot);
            let position = feed.streams.position();
            return json!({ "event": "unsubscribed", "stream": name, "id": position }).to_string();
        }
        if existing.is_some() {
            return op_error(
                Some(op),
                Some(&name),
                "already_subscribed",
                "this connection is already subscribed to it",
            );
        }
        let max = self.state.config.limits.max_streams_per_connection;
        if feed.streams.slots.len() >= max {
            return op_error(
                Some(op),
                Some(&name),
                "too_many_streams",
                &format!("at most {max} streams per connection (max_streams_per_connection)"),
            );
        }
        // A plain resume token of this stream, or a composite id holding it.
        let start = match operation.last_event_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(raw) => match Token::parse(raw) {
                Ok(token) => Some(token),
                Err(_) => match Position::decode(raw) {
                    Ok(position) => position.get(&name),
                    Err(PositionError::OldFormat) => {
                        return op_error(
                            Some(op),
                            Some(&name),
                            "bad_request",
                            &PositionError::OldFormat.to_string(),
                        );
                    }
                    Err(PositionError::Malformed) => {
                        return op_error(
                            Some(op),
                            Some(&name),
                            "bad_request",
                            "lastEventId is neither a resume token nor a /_streams position",
                        );
                    }
                },
            },
        };
        let rewind = start.is_none();
        match self.open(&key, start, rewind).await {
            Ok(slot) => {
                feed.streams.push(slot);
                let position = feed.streams.position();
                json!({ "event": "subscribed", "stream": name, "id": position }).to_string()
            }
            Err(error) => op_error(Some(op), Some(&name), code_of(&error), &error.detail),
        }
    }
}

/// The `code` of an operation error, from the status a request would have got.
fn code_of(error: &ApiError) -> &'static str {
    match error.status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::TOO_MANY_REQUESTS => "limit_reached",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_lists_are_checked() {
        assert_eq!(
            stream_list(Some("/d/c/_streams/a, d/c/_streams/b"), 10)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            stream_list(Some("/d/c/_streams/a,/d/c/_streams/a"), 10)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert!(
            stream_list(Some("/d/c/_streams/a,/d/c/_streams/b"), 1)
                .unwrap_err()
                .detail
                .contains("max_streams_per_connection")
        );
        assert_eq!(
            stream_list(Some("/d/c/a"), 10).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
