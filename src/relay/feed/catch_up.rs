//! A member whose log stands far behind its database feed is brought up to where the feed
//! reads on a cursor of its own before it joins (so that the feed's other members are not held
//! back while the oplog is re-read).

use std::sync::Arc;

use futures::FutureExt;
use mongodb::bson::{Timestamp, doc};
use tokio::sync::watch;

use super::{Advert, LocalFeed};
use crate::event::Token;
use crate::metrics::now_ms;
use crate::relay::Relay;
use crate::relay::owner::{BATCH_BYTES, BATCH_CHANGES, cursor_comment, publish};
use crate::relay::wire::{self, Outbound};
use crate::worker::source::{ChangeSource, RawChange, Step, Watch};

/// How a member's catch-up ended.
pub(super) enum Caught {
    /// Its log reached the oplog's head at this position (an empty batch): it joins the feed
    /// (its log's last message now this stream sequence).
    Up(Token, u64),
    /// Its stream ended (the collection dropped, an error retrying cannot fix), published.
    Ended,
    /// JetStream did not take a message.
    Unpublished(String),
}

/// Brings a member whose log stands far behind the feed up to the oplog's head on a cursor
/// of its own (its collection and pipeline, as its own owner would read, from the cluster
/// time of `from`, skipping what its log has), publishing to its subject; the feed then
/// includes it from there. The other members' changes are not held back meanwhile.
pub(super) async fn catch_up(
    relay: &Relay,
    local: &LocalFeed,
    feed_key: &str,
    instance: &str,
    advert: &Advert,
    (from, mut sequence): (Token, u64),
    feed_at: watch::Receiver<Option<Timestamp>>,
) -> Caught {
    let template = &local.template;
    let mut pipeline = vec![doc! { "$match": { "$comment": cursor_comment(feed_key, instance) } }];
    pipeline.extend(advert.pipeline.iter().cloned());
    let watch = Watch {
        client: template.client.clone(),
        db: template.db.clone(),
        coll: Some(advert.coll.clone()),
        pipeline,
        options: template.options.clone(),
        probe_fields: advert.fields.clone(),
        features: template.features,
        isolation_changes: template.isolation_changes,
        max_backoff: template.max_backoff,
        label: format!(
            "{}.{} (relayed database feed catch-up)",
            template.db, advert.coll
        ),
        on_open: Arc::new(|| {}),
        on_skip: Arc::new(|| {}),
    };
    let mut source = ChangeSource::at_time_of(watch, from.clone());
    let mut at = from;
    // Each publish expects the log's last message (`owner::publish`).
    let mut send = async |message: Outbound| {
        publish(relay, &advert.subject, &advert.key, message, &mut sequence).await
    };
    // A step read while gathering a batch that did not go into it: the next one handled.
    let mut carried: Option<Step<RawChange>> = None;
    loop {
        let step = match carried.take() {
            Some(step) => step,
            None => source.next().await,
        };
        let published = now_ms();
        let message = match step {
            Step::Opened(_) | Step::Quiet(None) | Step::Retrying(_) => continue,
            Step::Quiet(Some(token)) => {
                return Caught::Up(if token > at { token } else { at }, sequence);
            }
            Step::Change(raw) => {
                // Reached where the feed reads: it joins the feed from here.
                let reached = |raw: &RawChange| {
                    let feed_at = *feed_at.borrow();
                    raw.id
                        .cluster_time()
                        .zip(feed_at)
                        .is_some_and(|(t, f)| t >= f)
                };
                let mut caught = false;
                let mut batch = wire::Batch::default();
                let mut next = Some(raw);
                while let Some(raw) = next.take() {
                    // Opened at the cluster time of `from`: what its log has is skipped.
                    caught = reached(&raw);
                    if raw.id > at {
                        match batch.try_push(&raw, BATCH_BYTES) {
                            Ok(true) => at = raw.id.clone(),
                            Ok(false) => {
                                carried = Some(Step::Change(raw));
                                break;
                            }
                            Err(error) => return Caught::Unpublished(error.to_string()),
                        }
                    }
                    if caught || batch.len() >= BATCH_CHANGES || !source.is_open() {
                        break;
                    }
                    match source.next().now_or_never() {
                        Some(Step::Change(raw)) => next = Some(raw),
                        Some(step) => carried = Some(step),
                        None => {}
                    }
                }
                if let Some(message) = batch.finish(published)
                    && let Err(error) = send(message).await
                {
                    return Caught::Unpublished(error);
                }
                if caught && carried.is_none() {
                    return Caught::Up(at, sequence);
                }
                continue;
            }
            Step::Invalidated(event) => wire::invalidate(&event, Some(&at), published),
            Step::Failed(code, message) => wire::failed(code, &message, Some(&at), published),
        };
        return match send(message).await {
            Ok(()) => Caught::Ended,
            Err(error) => Caught::Unpublished(error),
        };
    }
}
