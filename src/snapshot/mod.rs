//! Snapshot, then changes (PROTOCOL.md §6), and the initial `put` of the document view (§7).
//!
//! ```text
//!  worker position P ──cluster time T──┐
//!                                      ├─▶ scan task (scan.rs): batches at readConcern
//!  MongoDB ◀── atClusterTime T ────────┘   snapshot, atClusterTime T, by _id, each document
//!                                          wrapped as an insert event + the stream's stages
//!        byte-bounded queue (queue.rs) ──▶ Feed prelude: snapshot… ready
//!  Subscription at `Token::after_cluster_time(T)` ──────────▶ Feed: changes after T
//! ```
//!
//! **Why it is gapless and duplicate-free.** The documents are read at one cluster time T, so
//! they include every change committed at or before T and none after. The client's
//! [`Subscription`] starts at the position "after every change at T" (a synthetic id that sorts
//! after every real token of T and before every later one, see [`Token::after_cluster_time`]).
//! From there the ordinary machinery applies: T is taken from the worker's own position, so the
//! ring covers it; live events at or before it are skipped (`skip_through`); and if the ring
//! moved past it during a long snapshot, the shared catch-up opens with `startAtOperationTime`
//! just after T. No event at T can be delivered as a change, and none after T is missing.
//!
//! **Shared, and guarded.** Three things are shared, each with its rule:
//! - *Scan slots* (`snapshot_max_scans`): held per batch, only while MongoDB reads it
//!   (`scan.rs`), never while a client drains; FIFO. Only T's first read (before the response)
//!   gives up after [`SCAN_SLOT_WAIT`] (503).
//! - *Memory*: a connection's snapshot events queue against its `snapshot_queue_bytes`
//!   (`queue.rs`); the document view's `put` is refused past `snapshot_max_put_bytes` or
//!   `snapshot_max_docs` (413).
//! - *The principal's connection allowance*: a snapshot in progress (T picked, `ready` not yet
//!   queued) holds a permit of `per_user`/`per_ip` like one more connection of its principal
//!   ([`Lease`]), so one address or user cannot run more snapshots at once than its limit.
//!
//! **Resumable.** Each snapshot event's id ([`SnapshotId`]) carries T, the count so far and its
//! `_id`: a client that drops mid-snapshot resumes after that `_id` at the same T while MongoDB
//! still holds it (`minSnapshotHistoryWindowInSeconds`), else gets `history_lost` (start again).
//! `ready` carries `after_cluster_time(T)`: resuming from it is resuming changes.

mod id;
mod queue;
mod scan;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::Bson;
use serde_json::json;

pub use self::id::{BadSnapshotId, SnapshotId};
use self::queue::Sender;
pub use self::queue::{Prelude, QueueBudget};
use self::scan::{Scan, ScanError, Slots};
use crate::config::Config;
use crate::event::{Event, EventKind, Token};
use crate::limits::{ConnectionRefused, Limits, Permit};
use crate::metrics::Metrics;
use crate::streams::registry::SubscribeFailure;
use crate::streams::{Registry, Requester, StreamKey};
use crate::worker::Subscription;

/// How long the first read of a snapshot (before the response) waits for a scan slot
/// before 503; the document view's later batches too (its response has not started).
const SCAN_SLOT_WAIT: Duration = Duration::from_secs(5);
/// Largest batch the document view reads at once, in BSON bytes (its whole `put` is bounded
/// by `snapshot_max_put_bytes`; this keeps each of its slot holds short).
const VIEW_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What a subscribe asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `snapshot=true`: `snapshot` events, `ready`, then changes.
    Events,
    /// The document view: one `put` of every document, then the changes as `put`/`patch`.
    View,
}

/// What one connection brings to its snapshots: its queue budget (shared by its streams) and
/// who it is (each snapshot in progress takes a `per_user`/`per_ip` permit of its own).
pub struct Lease {
    queue: QueueBudget,
    limits: Arc<Limits>,
    user: Option<String>,
    ip: Option<IpAddr>,
}

/// The server's snapshot scans: the slots, the byte bounds and the document view's guards.
pub struct Snapshots {
    slots: Arc<Slots>,
    max_docs: usize,
    max_put_bytes: usize,
    queue_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Snapshots {
    /// The snapshot settings of `config` (`snapshot_*`), reporting to `metrics`.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Snapshots {
        Snapshots {
            slots: Arc::new(Slots::new(
                config.snapshot_max_scans,
                metrics.snapshot_scans_active.clone(),
            )),
            max_docs: config.snapshot_max_docs,
            max_put_bytes: config.snapshot_max_put_bytes,
            queue_bytes: config.snapshot_queue_bytes,
            metrics,
        }
    }

    /// A connection's lease: a fresh queue budget, and the principal (`user` when
    /// authenticated, `ip`) whose `limits` its snapshots count against.
    pub fn lease(&self, limits: &Arc<Limits>, user: Option<&str>, ip: Option<IpAddr>) -> Lease {
        Lease {
            queue: QueueBudget::new(self.queue_bytes, self.metrics.snapshot_queued_bytes.clone()),
            limits: Arc::clone(limits),
            user: user.map(str::to_owned),
            ip,
        }
    }

    /// Subscribes a client that wants the current documents first. `resume` is its last id:
    /// a snapshot id resumes the snapshot (event mode), any other id resumes changes only
    /// (the client already has a snapshot).
    #[allow(clippy::too_many_arguments)]
    pub async fn subscribe(
        &self,
        registry: &Registry,
        key: &StreamKey,
        avars: Option<&str>,
        resume: Option<Token>,
        requester: Requester<'_>,
        mode: Mode,
        lease: &Lease,
    ) -> Result<(Subscription, Option<Prelude>), SnapshotError> {
        let snapshot_resume = match &resume {
            Some(token) => SnapshotId::decode(token)?,
            None => None,
        };
        if let Some(resume) = resume.filter(|_| snapshot_resume.is_none()) {
            return Ok((
                registry
                    .subscribe(key, avars, Some(resume), requester)
                    .await?,
                None,
            ));
        }
        // A snapshot will run: it counts against its principal's connection allowance.
        let permit = lease
            .limits
            .try_acquire_snapshot(lease.user.as_deref(), lease.ip)
            .map_err(|exceeded| SnapshotError::Limit(lease.limits.refusal(exceeded)))?;
        let (guard, filter) = registry.attach(key, avars, requester).await?;
        let worker = Arc::clone(guard.worker());
        // The document view's `put` is one event: a partial snapshot cannot be resumed there.
        let from = snapshot_resume.filter(|_| mode == Mode::Events);
        let resumed = from.is_some();
        let (count, at, after) = match from {
            Some(from) => (from.count, Some(from.at), Some(from.after)),
            None => (0, None, None),
        };
        let mut scan = Scan::new(worker, filter.clone(), Arc::clone(&self.slots), at, after);
        let prelude = match mode {
            Mode::Events => {
                // T first, before the response: the subscription starts after it.
                let at = match scan.pick_time(SCAN_SLOT_WAIT).await {
                    Ok(at) => at,
                    // A resumed snapshot whose time MongoDB no longer holds: `history_lost`
                    // (the client starts again); the subscription is never read.
                    Err(ScanError::TooOld(message)) if resumed => {
                        let prelude = Prelude::one(ScanError::TooOld(message).event());
                        let subscription = Subscription::start(guard, None, filter)
                            .await
                            .map_err(SubscribeFailure::from)?;
                        return Ok((subscription, Some(prelude)));
                    }
                    Err(error) => return Err(error.into()),
                };
                let (tx, rx) = lease.queue.channel();
                let tracker = guard.worker().tracker().clone();
                tracker.spawn(stream(scan, count, tx, permit));
                let subscription =
                    Subscription::start(guard, Some(Token::after_cluster_time(at)), filter)
                        .await
                        .map_err(SubscribeFailure::from)?;
                return Ok((subscription, Some(rx)));
            }
            Mode::View => {
                let put = view_put(&mut scan, self.max_docs, self.max_put_bytes).await?;
                drop(permit);
                Prelude::one(put)
            }
        };
        let Some(at) = scan.at else {
            return Err(SnapshotError::Unavailable(
                "MongoDB did not report the snapshot time".into(),
            ));
        };
        let subscription = Subscription::start(guard, Some(Token::after_cluster_time(at)), filter)
            .await
            .map_err(SubscribeFailure::from)?;
        Ok((subscription, Some(prelude)))
    }
}

/// Checks a client's resume id: one shaped like a snapshot id must be one (400 otherwise),
/// whether or not this subscription asks for a snapshot.
pub fn check_id(token: &Token) -> Result<(), SnapshotError> {
    SnapshotId::decode(token).map(|_| ()).map_err(Into::into)
}

/// Why a snapshot subscription could not start. The HTTP layer answers it (`http::error`):
/// 400 when retrying cannot help, 413 past `snapshot_max_docs`/`snapshot_max_put_bytes`, 429
/// past the principal's connection limit, else 503.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The subscription itself (unknown stream, limits, filters…).
    #[error(transparent)]
    Subscribe(#[from] SubscribeFailure),
    /// A snapshot id that is not one.
    #[error(transparent)]
    BadId(#[from] BadSnapshotId),
    /// The principal already has as many connections and snapshots as `per_user`/`per_ip`
    /// allow.
    #[error("{0} (a snapshot in progress counts as one more connection of its user and address)")]
    Limit(ConnectionRefused),
    /// No scan slot freed up in time.
    #[error("every snapshot scan slot is busy (snapshot_max_scans); retry shortly")]
    SlotsBusy,
    /// The document view's `put` would hold more than `snapshot_max_docs` documents.
    #[error(
        "the document view sends every document in one first event and this stream has more \
         than snapshot_max_docs ({max_docs}); subscribe with ?snapshot=true to stream them one \
         by one"
    )]
    TooManyDocs {
        /// `snapshot_max_docs`.
        max_docs: usize,
    },
    /// The document view's `put` would be larger than `snapshot_max_put_bytes`.
    #[error(
        "the document view sends every document in one first event and this stream's \
         documents are more than snapshot_max_put_bytes ({max_bytes} bytes of JSON); subscribe \
         with ?snapshot=true to stream them one by one"
    )]
    TooLarge {
        /// `snapshot_max_put_bytes`.
        max_bytes: usize,
    },
    /// Retrying cannot help (a pipeline MongoDB refuses, …).
    #[error("the snapshot could not be read: {0}")]
    Unreadable(String),
    /// A retry may succeed (election, network, the snapshot time no longer held).
    #[error("the snapshot could not be read: {0}")]
    Unavailable(String),
}

/// A snapshot that cannot start: unreadable when retrying cannot help, else unavailable.
impl From<ScanError> for SnapshotError {
    fn from(error: ScanError) -> SnapshotError {
        match error {
            ScanError::Busy => SnapshotError::SlotsBusy,
            ScanError::Fatal(message) => SnapshotError::Unreadable(message),
            ScanError::TooOld(message) | ScanError::Transient(message) => {
                SnapshotError::Unavailable(message)
            }
        }
    }
}

/// The scan task: `snapshot` events, then `ready`, into the client's queue, one batch per
/// credit (so as fast as the client drains them, and no faster). Holds the principal's
/// `permit` until the end, or until the client leaves.
async fn stream(mut scan: Scan, mut count: u32, tx: Sender, permit: Permit) {
    let _permit = permit;
    let Some(at) = scan.at else {
        return;
    };
    loop {
        let Some(mut credit) = tx.credit().await else {
            return;
        };
        // Events hold their JSON twice (SSE frame and envelope): half the credit in BSON.
        let batch = match scan.batch(credit.bytes() / 2, None).await {
            Ok(batch) => batch,
            Err(error) => {
                tx.send_last(error.event()).await;
                return;
            }
        };
        for (id, document) in batch {
            count = count.saturating_add(1);
            let id = SnapshotId {
                at,
                count,
                after: id,
            }
            .encode();
            let data = Bson::Document(document).into_relaxed_extjson();
            let event = Event::new(EventKind::Snapshot, id, &data);
            // The client left: stop reading.
            if !tx.send(&mut credit, Arc::new(event)).await {
                return;
            }
        }
        if scan.done {
            break;
        }
    }
    let ready = Event::new(
        EventKind::Ready,
        Some(Token::after_cluster_time(at)),
        &json!({ "count": count }),
    );
    tx.send_last(ready).await;
}

/// The document view's first event: `put` at `/` of every document by `_id` text, built as
/// JSON text (no tree in memory), read in batches (each holding a slot only while MongoDB
/// reads it), refused past `max_docs` documents or `max_bytes` bytes.
async fn view_put(
    scan: &mut Scan,
    max_docs: usize,
    max_bytes: usize,
) -> Result<Event, SnapshotError> {
    let mut data = String::from("{\"path\":\"/\",\"data\":{");
    let mut count = 0usize;
    while !scan.done {
        // One byte past the bound is enough to know it is passed.
        let budget = (max_bytes + 1)
            .saturating_sub(data.len() + 2)
            .clamp(1, VIEW_BATCH_BYTES);
        for (id, mut document) in scan.batch(budget, Some(SCAN_SLOT_WAIT)).await? {
            let Some(Bson::Document(full)) = document.remove("fullDocument") else {
                continue;
            };
            count += 1;
            if count > max_docs {
                return Err(SnapshotError::TooManyDocs { max_docs });
            }
            if count > 1 {
                data.push(',');
            }
            data.push_str(&serde_json::Value::from(id_text(&id)).to_string());
            data.push(':');
            data.push_str(&Bson::Document(full).into_relaxed_extjson().to_string());
            // With the closing `}}`: the bound is the whole `data` line's.
            if data.len() + 2 > max_bytes {
                return Err(SnapshotError::TooLarge { max_bytes });
            }
        }
    }
    data.push_str("}}");
    Ok(Event::view(
        "put",
        scan.at.map(Token::after_cluster_time),
        &data,
    ))
}

/// A document's key in the document view: strings as they are, ObjectIds as hex, numbers as
/// digits, anything else as its relaxed Extended JSON.
pub fn id_text(id: &Bson) -> String {
    match id {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::Int32(n) => n.to_string(),
        Bson::Int64(n) => n.to_string(),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => (*f as i64).to_string(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

    #[test]
    fn view_keys() {
        let oid = ObjectId::new();
        assert_eq!(id_text(&Bson::ObjectId(oid)), oid.to_hex());
        assert_eq!(id_text(&Bson::String("k".into())), "k");
        assert_eq!(id_text(&Bson::Int32(5)), "5");
        assert_eq!(id_text(&Bson::Double(5.0)), "5");
    }
}
