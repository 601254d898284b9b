//! The owner side of a relayed worker: contend for its lease; while holding it, read the
//! worker's MongoDB cursor and publish every step to the worker's subject.
//!
//! A new owner resumes from the last message of the subject (a change's token or a marked
//! position): what the last owner published is where the fleet stands. Whatever goes wrong
//! while owning (a publish not acknowledged, the lease lost) ends the turn: the cursor is
//! dropped and the instance contends again, resuming, if it wins, from the subject's last
//! message once more. JetStream's de-duplication by resume token makes those re-reads
//! publish nothing twice.
//!
//! An owner's cursor carries a comment naming the worker and the instance, so that a new
//! owner can end the cursor a killed one left idle on mongod ([`kill_orphans`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{Lease, Renewal};
use super::wire::{self, Outbound};
use super::{Handles, Relay};
use crate::backoff::Backoff;
use crate::event::{ErrorCode, Token};
use crate::metrics::now_ms;
use crate::worker::Worker;
use crate::worker::source::{ChangeSource, Step, Watch};

/// How a turn as owner ended.
enum Outcome {
    /// The worker stopped (retired, evicted, shut down): release the lease.
    Cancelled,
    /// Another instance holds the lease now.
    Lost,
    /// The stream ended (invalidate, or an error retrying cannot fix) and that was published.
    Ended,
    /// JetStream did not take a message (or could not say where the log stands).
    Unpublished,
}

/// Starts contending for `worker`'s cursor, on its tracker, until the worker stops.
pub(super) fn spawn(relay: Arc<Relay>, worker: &Arc<Worker>, subject: String, key: String) {
    let worker = Arc::clone(worker);
    let tracker = worker.tracker().clone();
    tracker.spawn(async move {
        let cancel = worker.cancel_token().clone();
        contend(&relay, &worker, &subject, &key, &cancel).await;
    });
}

async fn contend(
    relay: &Relay,
    worker: &Arc<Worker>,
    subject: &str,
    key: &str,
    cancel: &CancellationToken,
) {
    let ttl = relay.settings.lease_ttl();
    // Contenders try a few times per lease lifetime: a killed owner's cursor moves within
    // about `ttl` plus a quarter of it.
    let poll = ttl / 4;
    let mut backoff = Backoff::new(Duration::from_millis(100), ttl);
    loop {
        let wait = match relay.handles().await {
            Err(error) => {
                relay.metrics().relay.error("connect");
                tracing::warn!(%error, "relay: JetStream not available yet");
                backoff.next_delay()
            }
            Ok(handles) => {
                match Lease::try_take(&handles.leases, key, &relay.instance, ttl).await {
                    Ok(None) => poll,
                    Err(error) => {
                        relay.metrics().relay.error("lease");
                        tracing::warn!(%error, "relay: cannot ask for a cursor lease");
                        backoff.next_delay()
                    }
                    Ok(Some(lease)) => {
                        backoff.reset();
                        let metrics = &relay.metrics().relay;
                        metrics.takeovers.inc();
                        metrics.owned_cursors.inc();
                        tracing::info!(stream = %worker.key.stream, subject, "relay: this instance reads the stream's cursor for the fleet");
                        let (outcome, lease) =
                            own(relay, &handles, worker, subject, key, lease, cancel).await;
                        metrics.owned_cursors.dec();
                        match outcome {
                            Outcome::Cancelled => {
                                if let Some(lease) = lease {
                                    lease.release().await;
                                }
                                return;
                            }
                            Outcome::Ended => {
                                if let Some(lease) = lease {
                                    lease.release().await;
                                }
                                // The consumers (this instance's too) end the worker.
                                cancel.cancelled().await;
                                return;
                            }
                            Outcome::Lost => {
                                tracing::info!(stream = %worker.key.stream, "relay: cursor lease lost; another instance reads it");
                                poll
                            }
                            Outcome::Unpublished => {
                                if let Some(lease) = lease {
                                    lease.release().await;
                                }
                                backoff.next_delay()
                            }
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The comment an owner's change stream carries (its pipeline's first stage after
/// `$changeStream`, `{$match: {$comment}}`, shown by `$currentOp` and in mongod's log): how a
/// later owner finds the cursor of one that was killed.
fn cursor_comment(key: &str, instance: &str) -> String {
    format!("streamgate relay {key} {instance}")
}

/// Kills the cursors that earlier owners of `key` left on mongod; returns how many.
///
/// An owner killed between two `getMore`s leaves its cursor idle on mongod: mongod ends a
/// cursor whose running `getMore`'s connection closes, but an idle one only when it times
/// out (`cursorTimeoutMillis`, 10 minutes by default), holding its memory meanwhile and
/// counting as a second cursor of the fleet. `$currentOp` with `allUsers: false` lists a
/// user's own cursors without further privileges; where even that is refused, they time out
/// as before.
async fn kill_orphans(
    client: &mongodb::Client,
    key: &str,
    instance: &str,
) -> mongodb::error::Result<usize> {
    let pipeline = vec![
        doc! { "$currentOp": { "idleCursors": true, "allUsers": false } },
        doc! { "$match": { "cursor.originatingCommand.pipeline.1.$match.$comment": {
            "$regex": format!("^streamgate relay {key} "),
            "$ne": cursor_comment(key, instance),
        } } },
        doc! { "$project": { "ns": 1, "id": "$cursor.cursorId" } },
    ];
    let found: Vec<Document> = client
        .database("admin")
        .aggregate(pipeline)
        .await?
        .try_collect()
        .await?;
    let mut killed = 0;
    for cursor in found {
        let (Ok(ns), Ok(id)) = (cursor.get_str("ns"), cursor.get_i64("id")) else {
            continue;
        };
        // Database names hold no dots; collection names may.
        let Some((db, coll)) = ns.split_once('.') else {
            continue;
        };
        let reply = client
            .database(db)
            .run_command(doc! { "killCursors": coll, "cursors": [id] })
            .await?;
        killed += reply.get_array("cursorsKilled").map_or(0, Vec::len);
    }
    Ok(killed)
}

/// Ends, beside a takeover (not before it), the cursors earlier owners of `key` left.
fn spawn_kill_orphans(relay: &Relay, worker: &Arc<Worker>, key: &str) {
    let client = worker.client().clone();
    let (key, instance) = (key.to_owned(), relay.instance.clone());
    worker.tracker().spawn(async move {
        let killed = tokio::time::timeout(
            Duration::from_secs(5),
            kill_orphans(&client, &key, &instance),
        )
        .await;
        match killed {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(
                    cursors = n,
                    "relay: ended the cursors an earlier owner left on mongod"
                );
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "relay: cannot look for cursors an earlier owner left");
            }
            Err(_) => tracing::debug!("relay: looking for cursors an earlier owner left timed out"),
        }
    });
}

/// Where the fleet's log of `subject` stands: the last change or position published, `None`
/// when there is none (or the last message ended an earlier life of the stream).
async fn last_position(handles: &Handles, subject: &str) -> Result<Option<Token>, String> {
    match handles
        .stream
        .get_last_raw_message_by_subject(subject)
        .await
    {
        Ok(message) => match wire::decode(Some(&message.headers), &message.payload) {
            Ok(relayed) if relayed.is_end() => Ok(None),
            Ok(relayed) => Ok(relayed.token().cloned()),
            Err(error) => Err(error.to_string()),
        },
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

/// One turn as owner: read the cursor and publish, until something ends the turn. Gives the
/// lease back when it may still be held.
async fn own(
    relay: &Relay,
    handles: &Handles,
    worker: &Arc<Worker>,
    subject: &str,
    key: &str,
    mut lease: Lease,
    cancel: &CancellationToken,
) -> (Outcome, Option<Lease>) {
    let metrics = &relay.metrics().relay;
    spawn_kill_orphans(relay, worker, key);
    let after = match last_position(handles, subject).await {
        Ok(after) => after,
        Err(error) => {
            metrics.error("read");
            tracing::warn!(%error, subject, "relay: cannot read where the stream's log stands");
            return (Outcome::Unpublished, Some(lease));
        }
    };
    tracing::debug!(subject, "relay: the log's last position read");
    let mut position = after.clone();
    let mut watch = Watch::of_worker(worker);
    // A `$match` that keeps everything, for the comment: the driver would put the `comment`
    // option into the `$changeStream` stage too, which MongoDB refuses.
    watch.pipeline.insert(
        0,
        doc! { "$match": { "$comment": cursor_comment(key, &relay.instance) } },
    );
    let mut source = ChangeSource::new(watch, after);
    let every = Lease::renew_every(relay.settings.lease_ttl());
    let mut renew = tokio::time::interval_at(Instant::now() + every, every);
    let mark_every = Duration::from_millis(relay.settings.mark_interval_ms);
    let mut marked = Instant::now();
    loop {
        let step = tokio::select! {
            _ = cancel.cancelled() => return (Outcome::Cancelled, Some(lease)),
            _ = renew.tick() => {
                match lease.renew().await {
                    Renewal::Held | Renewal::Unsure => {}
                    Renewal::Lost => return (Outcome::Lost, None),
                }
                continue;
            }
            step = source.next() => step,
        };
        let published = now_ms();
        let (message, ends) = match step {
            Step::Opened(start) => {
                tracing::debug!(subject, "relay: cursor open");
                if start.is_some() {
                    position = start;
                }
                (position.as_ref().map(|t| wire::mark(t, published)), false)
            }
            Step::Change(raw) => {
                position = Some(raw.id.clone());
                let at_ms = raw
                    .doc
                    .get_datetime("wallTime")
                    .ok()
                    .and_then(|wall| u64::try_from(wall.timestamp_millis()).ok());
                match wire::change(&raw, published) {
                    Ok(message) => {
                        if let Some(at_ms) = at_ms {
                            metrics
                                .publish_lag
                                .observe_ms(published.saturating_sub(at_ms));
                        }
                        (Some(message), false)
                    }
                    Err(error) => (
                        Some(wire::failed(
                            ErrorCode::Upstream,
                            &error.to_string(),
                            position.as_ref(),
                            published,
                        )),
                        true,
                    ),
                }
            }
            Step::Quiet(Some(token)) => {
                let moved = position.as_ref() != Some(&token);
                position = Some(token);
                if moved && marked.elapsed() >= mark_every {
                    marked = Instant::now();
                    (position.as_ref().map(|t| wire::mark(t, published)), false)
                } else {
                    (None, false)
                }
            }
            Step::Quiet(None) => (None, false),
            Step::Retrying(error) => {
                tracing::warn!(stream = %worker.key.stream, %error, "relay: cursor lost, retrying");
                worker.metrics().worker_retries.inc();
                (None, false)
            }
            Step::Invalidated(event) => (
                Some(wire::invalidate(&event, position.as_ref(), published)),
                true,
            ),
            Step::Failed(code, message) => (
                Some(wire::failed(code, &message, position.as_ref(), published)),
                true,
            ),
        };
        if let Some(message) = message
            && let Err(error) = publish(relay, subject, message).await
        {
            metrics.error("publish");
            tracing::warn!(%error, subject, "relay: JetStream did not take a change; resuming from the log");
            return (Outcome::Unpublished, Some(lease));
        }
        if ends {
            return (Outcome::Ended, Some(lease));
        }
    }
}

/// Publishes one message and waits for JetStream's acknowledgement (a duplicate, which
/// another owner published already, is as good).
async fn publish(relay: &Relay, subject: &str, message: Outbound) -> Result<(), String> {
    let ack = relay
        .jetstream
        .publish_with_headers(subject.to_owned(), message.headers, message.payload)
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map_err(|e| e.to_string())?;
    relay.metrics().relay.published.inc();
    Ok(())
}
