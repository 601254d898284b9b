//! The queue between a connection's snapshot scans and its socket, bounded in bytes.
//!
//! **Bound.** Each connection gets one [`QueueBudget`] of `snapshot_queue_bytes`, shared by
//! every snapshot it runs (a `/_streams` connection may run 100). An event holds permits for
//! its bytes (both pre-encoded forms, see [`size`]) from the moment its scan queues it until
//! the feed takes it off the queue, so a client that stops reading holds at most the budget,
//! whatever its number of streams or the size of its documents (an event larger than the
//! budget takes the whole budget: one at a time). Add the batch the feed is writing (taken off
//! the queue, so at most the budget again) and the batch a scan has read but not yet queued
//! (half the budget, see [`Sender::credit`]).
//!
//! **Pace.** A scan asks for [`Sender::credit`] (half the budget) before it reads a batch, so
//! the next batch is read from MongoDB while the client drains the previous one, and a scan
//! never waits for the client while it holds a scan slot (it has its credit before it asks
//! for one). Waiting scans of one connection queue on its budget, so one connection has at
//! most two batches reading or waiting for a slot at a time, however many streams it has.
//!
//! **Lag policy.** None needed: nothing is dropped. A client that never reads keeps its
//! snapshots waiting (no slot held, no MongoDB work) until it leaves, is closed by
//! `stall_timeout_secs`, or its snapshot time ages out (`history_lost`, PROTOCOL.md §6).

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::event::Event;

/// Events (not bytes) queued per snapshot at most: a second bound for tiny documents.
const QUEUE_EVENTS: usize = 1024;
/// What an event costs besides its encodings (the `Event` itself, `Arc`, channel slot).
const EVENT_OVERHEAD: usize = 256;

/// Bytes an event holds in memory while queued: its SSE frame and its JSON envelope.
pub fn size(event: &Event) -> usize {
    event.sse.len() + event.ndjson.len() + EVENT_OVERHEAD
}

/// One connection's budget of queued snapshot bytes (`snapshot_queue_bytes`). Cheap to clone.
#[derive(Clone)]
pub struct QueueBudget {
    bytes: Arc<Semaphore>,
    cap: usize,
    /// `streamgate_snapshot_queued_bytes`: every connection's queued bytes.
    gauge: Gauge,
}

impl QueueBudget {
    /// A budget of `cap` bytes (at least 1), reporting to `gauge`.
    pub fn new(cap: usize, gauge: Gauge) -> QueueBudget {
        let cap = cap.clamp(1, Semaphore::MAX_PERMITS);
        QueueBudget {
            bytes: Arc::new(Semaphore::new(cap)),
            cap,
            gauge,
        }
    }

    /// A queue for one snapshot on this budget: the scan's end and the feed's end.
    pub(super) fn channel(&self) -> (Sender, Prelude) {
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
        (
            Sender {
                tx,
                budget: self.clone(),
            },
            Prelude { rx },
        )
    }

    /// Waits for `n` permits (capped at the budget, so it can always complete) unless the
    /// queue's client leaves first.
    async fn take(&self, n: usize, tx: &mpsc::Sender<Queued>) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n.clamp(1, self.cap)).unwrap_or(u32::MAX);
        tokio::select! {
            biased;
            () = tx.closed() => None,
            permit = Arc::clone(&self.bytes).acquire_many_owned(n) => permit.ok(),
        }
    }
}

/// Bytes a scan may read into its next batch, taken from the connection's budget.
pub struct Credit {
    permit: OwnedSemaphorePermit,
}

impl Credit {
    /// Bytes left.
    pub fn bytes(&self) -> usize {
        self.permit.num_permits()
    }
}

/// An event in the queue, with the bytes it holds of its connection's budget.
struct Queued {
    event: Arc<Event>,
    _held: Option<Held>,
}

/// Queued bytes; given back (and taken off the gauge) when the feed takes the event.
struct Held {
    permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge
            .dec_by(i64::try_from(self.permit.num_permits()).unwrap_or(i64::MAX));
    }
}

/// The scan's end of a snapshot queue.
pub struct Sender {
    tx: mpsc::Sender<Queued>,
    budget: QueueBudget,
}

impl Sender {
    /// Credit for one batch: half the budget, once the client has drained that much; `None`
    /// if the client left first.
    pub async fn credit(&self) -> Option<Credit> {
        let half = (self.budget.cap / 2).max(1);
        let permit = self.budget.take(half, &self.tx).await?;
        Some(Credit { permit })
    }

    /// Queues `event`, its bytes taken from `credit` (and, if the batch overran it, from the
    /// budget once the client drains it). `false`: the client left.
    pub async fn send(&self, credit: &mut Credit, event: Arc<Event>) -> bool {
        let need = size(&event).min(self.budget.cap);
        if credit.bytes() < need {
            let Some(more) = self.budget.take(need - credit.bytes(), &self.tx).await else {
                return false;
            };
            credit.permit.merge(more);
        }
        let Some(permit) = credit.permit.split(need) else {
            return false;
        };
        self.budget
            .gauge
            .inc_by(i64::try_from(need).unwrap_or(i64::MAX));
        let held = Held {
            permit,
            gauge: self.budget.gauge.clone(),
        };
        self.tx
            .send(Queued {
                event,
                _held: Some(held),
            })
            .await
            .is_ok()
    }

    /// Queues `event` outside the budget: the last event of a snapshot (`ready`, an
    /// `error`), a few hundred bytes.
    pub async fn send_last(&self, event: Event) {
        let _ = self
            .tx
            .send(Queued {
                event: Arc::new(event),
                _held: None,
            })
            .await;
    }
}

/// Events sent before a subscription's own (the snapshot); closes when the snapshot is done.
/// Taking an event gives its bytes back to the connection's budget.
pub struct Prelude {
    rx: mpsc::Receiver<Queued>,
}

impl Prelude {
    /// A prelude of one event, outside any budget (the document view's `put`, bounded by
    /// `snapshot_max_put_bytes`; an error).
    pub fn one(event: Event) -> Prelude {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Queued {
            event: Arc::new(event),
            _held: None,
        });
        Prelude { rx }
    }

    /// The next event; `None` once the snapshot is done (or its scan gone).
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        self.rx.recv().await.map(|queued| queued.event)
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Result<Arc<Event>, TryRecvError> {
        self.rx.try_recv().map(|queued| queued.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use serde_json::json;

    fn event(bytes: usize) -> Arc<Event> {
        Arc::new(Event::new(
            EventKind::Snapshot,
            None,
            &json!({ "x": "y".repeat(bytes) }),
        ))
    }

    #[tokio::test]
    async fn queued_bytes_are_bounded_and_given_back_when_taken() {
        let gauge = Gauge::default();
        let budget = QueueBudget::new(100_000, gauge.clone());
        let (tx, mut rx) = budget.channel();
        let mut credit = tx.credit().await.unwrap();
        assert_eq!(credit.bytes(), 50_000);
        // 10 events of ~10 KB: the credit covers some, the rest waits for the client.
        let sender = tokio::spawn(async move {
            for _ in 0..10 {
                assert!(tx.send(&mut credit, event(5_000)).await);
            }
            tx
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!sender.is_finished(), "the budget stops the scan");
        let queued = usize::try_from(gauge.get()).unwrap();
        assert!(queued <= 100_000 && queued > 80_000, "{queued}");
        for _ in 0..10 {
            rx.recv().await.unwrap();
        }
        let tx = sender.await.unwrap();
        assert_eq!(gauge.get(), 0);
        // An event larger than the whole budget still goes, alone.
        let mut credit = tx.credit().await.unwrap();
        assert!(tx.send(&mut credit, event(300_000)).await);
        assert_eq!(gauge.get(), 100_000);
        drop(rx);
        // The client left: waiting for credit ends.
        assert!(tx.credit().await.is_none());
    }
}
