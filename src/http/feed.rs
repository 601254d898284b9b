//! A client's feed as frames: batches of events, keep-alives, shutdown.
//!
//! Every transport drives a [`Feed`]; they differ only in how a frame becomes bytes. Batching
//! happens here: after one event arrives, everything already queued (up to a bound) is taken
//! too, so a client that lags a little gets one large write instead of many small ones.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::negotiate::Transport;
use crate::event::{Event, EventKind};
use crate::limits::Permit;
use crate::metrics::{Metrics, TransportLabel};
use crate::worker::Subscription;

/// Most events written in one batch.
const MAX_BATCH_EVENTS: usize = 256;

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
    subscription: Subscription,
    keepalive: Interval,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    transport: Transport,
    /// When the client's credential expires: the feed then ends with `auth_revoked`.
    expires_at: Option<tokio::time::Instant>,
    /// The client's connection-limit slot: held for as long as the feed lives, freed on drop.
    permit: Option<Permit>,
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
        metrics
            .clients
            .get_or_create(&TransportLabel {
                transport: transport.as_str(),
            })
            .inc();
        Feed {
            subscription,
            keepalive,
            shutdown,
            metrics,
            transport,
            expires_at,
            permit: None,
            done: false,
        }
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
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => {
                self.done = true;
                Some(Frame::Shutdown)
            }
            event = self.subscription.next() => {
                let Some(first) = event else {
                    self.done = true;
                    return None;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH_EVENTS
                    && !batch.last().is_some_and(|e| e.kind.is_terminal())
                {
                    match self.subscription.try_next() {
                        Some(event) => batch.push(event),
                        None => break,
                    }
                }
                self.keepalive.reset();
                Some(Frame::Events(batch))
            }
            _ = self.keepalive.tick() => Some(Frame::KeepAlive),
            // A timer, not a check on the next event: an idle stream is cut on time too.
            _ = sleep_until_or_never(self.expires_at) => {
                self.done = true;
                let revoked = Event::control(EventKind::AuthRevoked, "the access token expired", false);
                Some(Frame::Events(vec![Arc::new(revoked)]))
            }
        }
    }

    /// Records a written batch in stats and metrics.
    pub fn delivered(&self, events: usize, bytes: usize) {
        let stats = &self.subscription.worker().stats;
        stats.delivered.fetch_add(events as u64, Ordering::Relaxed);
        stats
            .delivered_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.metrics.deliveries.inc_by(events as u64);
    }
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.metrics
            .clients
            .get_or_create(&TransportLabel {
                transport: self.transport.as_str(),
            })
            .dec();
    }
}
