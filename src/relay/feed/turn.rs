//! One turn as owner of a fleet's database feed: the members heard from every instance, the
//! cursor with their `$or`, routing each change to its members' subjects, positions, ends.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::{FutureExt, StreamExt};
use mongodb::bson::{Bson, Document, Timestamp, doc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::catch_up::{Caught, catch_up};
use super::{Advert, LocalFeed, PROBE_TIMEOUT, decode};
use crate::event::{ErrorCode, Token};
use crate::metrics::now_ms;
use crate::relay::lease::Lease;
use crate::relay::membership::View;
use crate::relay::owner::{self, spawn_kill_orphans};
use crate::relay::owner::{
    BATCH_BYTES, BATCH_CHANGES, OPEN_SETTLE, Outcome, Turn, cursor_comment, last_position, publish,
    wall_ms,
};
use crate::relay::wire::{self, Outbound};
use crate::worker::feed::{filter_of, invalidate_after, taken_by};
use crate::worker::source::{ChangeSource, RawChange, Step, Watch};

/// A member as the owner serves it.
struct Member {
    advert: Advert,
    /// Where its log stands: changes at or before this are not published to it again.
    at: Option<Token>,
    /// The stream sequence of its log's last message as this owner knows it: each publish
    /// expects it (`owner::publish`), so that no late owner appends after a successor.
    sequence: u64,
    /// Its log has a start (read from JetStream, or the start published at an open).
    served: bool,
    /// Added since the last open: its log's position is still to be read.
    added: bool,
    /// Added at the last open, which has not succeeded yet (a refusal may be its).
    joined: bool,
    /// Its log stood far behind the feed: a cursor of its own brings it up to the oplog's
    /// head before it joins the feed's filter ([`catch_up`]).
    catching: bool,
}

/// Why the feed's turn stops, beside the ways every owner's turn ends.
enum Exit {
    Cancelled,
    Lost,
    HandOver,
    Unpublished,
}

impl From<owner::Exit> for Exit {
    fn from(exit: owner::Exit) -> Exit {
        match exit {
            owner::Exit::Cancelled => Exit::Cancelled,
            owner::Exit::Lost => Exit::Lost,
            owner::Exit::HandOver => Exit::HandOver,
        }
    }
}

/// What ended reading one step: go on, or open the cursor again (members changed or ended).
enum Next {
    Go,
    Reopen,
}

/// One turn as owner of a fleet feed.
pub(super) struct Owner<'a> {
    local: &'a LocalFeed,
    turn: Turn<'a>,
    /// Subject → member.
    members: BTreeMap<String, Member>,
    /// Instance → its members and when its list came.
    heard: BTreeMap<String, (Vec<Advert>, Instant)>,
    /// Members whose stream ended (subject → when): not added again while listed, for a while.
    ended: HashMap<String, Instant>,
    /// The cursor's position (its last change or post-batch token).
    position: Option<Token>,
    /// The last change read (a post-batch token equal to it is not a high-water mark).
    last_change: Option<Token>,
    /// The last post-batch token that is no change's id (a high-water mark).
    quiet_at: Option<Token>,
    /// The start of members whose log is empty, after an open by time ("before T").
    pending_start: Option<Token>,
    /// Members were added since the last open succeeded (a refusal may be theirs).
    joined: bool,
}

impl<'a> Owner<'a> {
    /// A turn of this instance's side of a feed, `local`.
    pub(super) fn new(local: &'a LocalFeed, turn: Turn<'a>) -> Owner<'a> {
        Owner {
            local,
            members: BTreeMap::new(),
            heard: BTreeMap::new(),
            ended: HashMap::new(),
            position: None,
            last_change: None,
            quiet_at: None,
            pending_start: None,
            joined: false,
            turn,
        }
    }

    pub(super) async fn own(
        mut self,
        mut lease: Lease,
        view: &mut watch::Receiver<Arc<View>>,
        cancel: &CancellationToken,
    ) -> (Outcome, Option<Lease>) {
        let (relay, handles, key) = (self.turn.relay, self.turn.handles, self.turn.key);
        let taken = Instant::now();
        let template = &self.local.template;
        spawn_kill_orphans(relay, &template.client, &template.tracker, key);
        let mut roster = match handles.feeds.watch(format!("{key}.*")).await {
            Ok(roster) => roster,
            Err(error) => {
                relay.metrics().relay.error("read");
                tracing::warn!(%error, "relay: cannot watch a database feed's members");
                return (Outcome::Unpublished, Some(lease));
            }
        };
        // The lists as they stand (the replay ends with `delta` 0), bounded by their lifetime.
        let caught_up = Instant::now() + relay.settings.instance_ttl();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return (Outcome::Cancelled, Some(lease)),
                _ = tokio::time::sleep_until(caught_up) => break,
                entry = roster.next() => match entry {
                    Some(Ok(entry)) => {
                        let last = entry.delta == 0;
                        self.hear(entry);
                        if last {
                            break;
                        }
                    }
                    _ => return (Outcome::Unpublished, Some(lease)),
                },
            }
        }
        self.take_roster();
        let every = Lease::renew_every(relay.settings.lease_ttl());
        let mut renew = tokio::time::interval_at(Instant::now() + every, every);
        let mut expire = tokio::time::interval(relay.settings.heartbeat());
        let mark_every = Duration::from_millis(relay.settings.mark_interval_ms);
        let mut marked = Instant::now();
        let mut source: Option<ChangeSource> = None;
        let mut reopen = true;
        // The cluster time the feed has read to, for members catching up on their own.
        let feed_at = watch::Sender::new(None::<Timestamp>);
        // Members catching up on cursors of their own: each ends with its subject.
        let mut catch_ups: futures::stream::FuturesUnordered<
            futures::future::BoxFuture<'_, (String, Caught)>,
        > = futures::stream::FuturesUnordered::new();
        // A step read while gathering a batch that did not go into it: the next one handled.
        let mut carried: Option<Step<RawChange>> = None;
        let exit = 'turn: loop {
            if reopen && carried.is_none() {
                reopen = false;
                source = None;
                match self.prepare().await {
                    Ok(started) => {
                        for (subject, advert, from, sequence) in started {
                            let (local, instance) = (self.local, relay.instance.as_str());
                            let feed_at = feed_at.subscribe();
                            catch_ups.push(Box::pin(async move {
                                let caught = catch_up(
                                    relay,
                                    local,
                                    key,
                                    instance,
                                    &advert,
                                    (from, sequence),
                                    feed_at,
                                )
                                .await;
                                (subject, caught)
                            }));
                        }
                    }
                    Err(error) => {
                        relay.metrics().relay.error("read");
                        tracing::warn!(%error, "relay: cannot read where a database feed member's log stands");
                        break 'turn Exit::Unpublished;
                    }
                }
                let feeding = self.members.values().any(|m| !m.catching);
                source = feeding.then(|| self.open());
            }
            let step = if let Some(step) = carried.take() {
                step
            } else {
                let opening = source.as_ref().is_some_and(|s| !s.is_open());
                let mut pending = std::pin::pin!(async {
                    match source.as_mut() {
                        Some(source) => source.next().await,
                        None => std::future::pending().await,
                    }
                });
                // An open dropped in flight would leave its cursor on mongod: let it finish.
                let settle = async |pending: std::pin::Pin<&mut _>| {
                    if opening {
                        let _ = tokio::time::timeout(OPEN_SETTLE, pending).await;
                    }
                };
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            settle(pending.as_mut()).await;
                            break 'turn Exit::Cancelled;
                        }
                        _ = renew.tick() => {
                            if let Some(exit) = self.turn.renew(&mut lease, taken, view).await {
                                settle(pending.as_mut()).await;
                                break 'turn exit.into();
                            }
                        }
                        Ok(()) = view.changed() => {
                            if self.turn.handing_over(taken, &view.borrow_and_update()) {
                                settle(pending.as_mut()).await;
                                break 'turn Exit::HandOver;
                            }
                        }
                        entry = roster.next() => match entry {
                            Some(Ok(entry)) => {
                                self.hear(entry);
                                if self.take_roster() {
                                    settle(pending.as_mut()).await;
                                    reopen = true;
                                    continue 'turn;
                                }
                            }
                            _ => {
                                settle(pending.as_mut()).await;
                                break 'turn Exit::Unpublished;
                            }
                        },
                        Some((subject, caught)) = catch_ups.next(), if !catch_ups.is_empty() => {
                            match caught {
                                Caught::Up(at, sequence) => {
                                    if let Some(member) = self.members.get_mut(&subject) {
                                        member.at = Some(at);
                                        member.sequence = sequence;
                                        member.catching = false;
                                        member.served = true;
                                    }
                                    // It joins the feed's filter from where it caught up.
                                    settle(pending.as_mut()).await;
                                    reopen = true;
                                    continue 'turn;
                                }
                                Caught::Ended => {
                                    self.members.remove(&subject);
                                    self.ended.insert(subject, Instant::now());
                                }
                                Caught::Unpublished(error) => {
                                    relay.metrics().relay.error("publish");
                                    tracing::warn!(%error, "relay: JetStream did not take a catching-up member's change; resuming from the logs");
                                    settle(pending.as_mut()).await;
                                    break 'turn Exit::Unpublished;
                                }
                            }
                        }
                        _ = expire.tick() => {
                            if self.take_roster() {
                                settle(pending.as_mut()).await;
                                reopen = true;
                                continue 'turn;
                            }
                        }
                        step = &mut pending => break step,
                    }
                }
            };
            let next = match step {
                Step::Opened(start) => {
                    tracing::debug!(db = %template.db, "relay: database feed cursor open");
                    self.joined = false;
                    for member in self.members.values_mut() {
                        member.joined = false;
                    }
                    let start = self.pending_start.take().or(start);
                    self.start_fresh(start.as_ref()).await
                }
                Step::Change(raw) => {
                    let mut batch = vec![raw];
                    while batch.len() < BATCH_CHANGES
                        && source.as_ref().is_some_and(|s| s.is_open())
                    {
                        let Some(source) = source.as_mut() else {
                            break;
                        };
                        match source.next().now_or_never() {
                            Some(Step::Change(raw)) => batch.push(raw),
                            Some(step) => {
                                carried = Some(step);
                                break;
                            }
                            None => break,
                        }
                    }
                    self.route(batch).await
                }
                Step::Quiet(Some(token)) => {
                    if self.last_change.as_ref() != Some(&token) {
                        self.quiet_at = Some(token.clone());
                    }
                    self.position = Some(token);
                    // Members whose log is empty start at the first position there is.
                    let start = self.quiet_at.clone();
                    self.start_fresh(start.as_ref()).await
                }
                Step::Quiet(None) => Ok(Next::Go),
                Step::Retrying(error) => {
                    tracing::warn!(db = %template.db, %error, "relay: database feed cursor lost, retrying");
                    template.metrics.worker_retries.inc();
                    Ok(Next::Go)
                }
                Step::Invalidated(event) => {
                    // The database is gone: every member ends, as its collection's cursor would.
                    let ends = self.served_subjects();
                    let end = |m: &Member| wire::invalidate(&event, m.at.as_ref(), now_ms());
                    self.end(ends, end).await.map(|()| {
                        self.position = None;
                        Next::Reopen
                    })
                }
                Step::Failed(code, message) => self.failed(code, message).await,
            };
            match next {
                Ok(Next::Go) => {}
                Ok(Next::Reopen) => {
                    reopen = true;
                    continue;
                }
                Err(error) => {
                    relay.metrics().relay.error("publish");
                    tracing::warn!(%error, "relay: JetStream did not take a database feed's change; resuming from the logs");
                    break 'turn Exit::Unpublished;
                }
            }
            if let Some(position) = source.as_ref().and_then(ChangeSource::position) {
                self.position = Some(position.clone());
            }
            feed_at.send_replace(self.position.as_ref().and_then(Token::cluster_time));
            if marked.elapsed() >= mark_every {
                marked = Instant::now();
                if let Err(error) = self.mark_moved().await {
                    relay.metrics().relay.error("publish");
                    tracing::warn!(%error, "relay: JetStream did not take a database feed's position");
                    break 'turn Exit::Unpublished;
                }
            }
        };
        drop(source);
        drop(catch_ups);
        match exit {
            Exit::Cancelled => (Outcome::Cancelled, Some(lease)),
            Exit::Lost => (Outcome::Lost, None),
            Exit::Unpublished => (Outcome::Unpublished, Some(lease)),
            Exit::HandOver => {
                // Where each member's log stands, so that the next owner opens close to here.
                if let Err(error) = self.mark_moved().await {
                    relay.metrics().relay.error("publish");
                    tracing::warn!(%error, "relay: the last positions before a hand-over were not published");
                }
                (Outcome::HandedOver, Some(lease))
            }
        }
    }

    /// Takes one entry of the member lists' watch.
    fn hear(&mut self, entry: kv::Entry) {
        let Some(instance) = entry
            .key
            .strip_prefix(self.turn.key)
            .and_then(|k| k.strip_prefix('.'))
        else {
            return;
        };
        if entry.operation == kv::Operation::Put {
            self.heard
                .insert(instance.to_owned(), (decode(&entry.value), Instant::now()));
        } else {
            self.heard.remove(instance);
        }
    }

    /// Brings the members in line with the lists (live ones, and this instance's own as they
    /// are now): members no longer listed leave; `true` when some were added (the cursor must
    /// open again with them).
    fn take_roster(&mut self) -> bool {
        let relay = self.turn.relay;
        let ttl = relay.settings.instance_ttl();
        // A killed instance's list expired without a delete.
        self.heard.retain(|_, (_, at)| at.elapsed() < ttl);
        let mut listed: BTreeMap<String, Advert> = BTreeMap::new();
        for (instance, (adverts, _)) in &self.heard {
            if *instance != relay.instance {
                for advert in adverts {
                    listed.insert(advert.subject.clone(), advert.clone());
                }
            }
        }
        for advert in self.local.adverts() {
            listed.insert(advert.subject.clone(), advert);
        }
        let linger = relay.settings.lease_ttl();
        self.ended
            .retain(|subject, at| listed.contains_key(subject) && at.elapsed() < linger);
        self.members
            .retain(|subject, _| listed.contains_key(subject));
        let mut added = false;
        for (subject, advert) in listed {
            if self.members.contains_key(&subject) || self.ended.contains_key(&subject) {
                continue;
            }
            self.members.insert(
                subject,
                Member {
                    advert,
                    at: None,
                    sequence: 0,
                    served: false,
                    added: true,
                    joined: false,
                    catching: false,
                },
            );
            added = true;
        }
        added
    }

    /// Before an open: members served so far skip what they had (up to the cursor's
    /// position); added members start where their log stands, those whose log stands far
    /// behind the others after a catch-up of their own (returned: subject, member, position).
    async fn prepare(&mut self) -> Result<Vec<(String, Advert, Token, u64)>, String> {
        let handles = self.turn.handles;
        for (subject, member) in &mut self.members {
            if member.served {
                if let Some(position) = &self.position
                    && member.at.as_ref().is_none_or(|at| at < position)
                {
                    member.at = Some(position.clone());
                }
            } else if member.added {
                (member.at, member.sequence) = last_position(handles, subject).await?;
                member.served = member.at.is_some();
                member.added = false;
                member.joined = true;
                self.joined = true;
            }
        }
        // Far behind the newest position: rewinding the feed there would hold every other
        // member's changes back while it re-reads; the member catches up on its own instead.
        let behind = 2 * Duration::from_millis(self.turn.relay.settings.mark_interval_ms);
        let newest = self
            .members
            .values()
            .filter(|m| !m.catching)
            .filter_map(|m| m.at.clone())
            .chain(self.position.clone())
            .max();
        let Some(newest) = newest.as_ref().and_then(Token::cluster_time) else {
            return Ok(Vec::new());
        };
        let mut catch_ups = Vec::new();
        for (subject, member) in &mut self.members {
            let far = member
                .at
                .as_ref()
                .and_then(Token::cluster_time)
                .is_some_and(|at| {
                    seconds(newest).saturating_sub(seconds(at)) > behind.as_secs().max(1)
                });
            if member.joined
                && member.served
                && far
                && let Some(at) = member.at.clone()
            {
                tracing::info!(coll = %member.advert.coll, "relay: a database feed member's log stands far behind; it catches up on a cursor of its own, then joins");
                self.turn.relay.metrics().relay.feed_catch_ups.inc();
                member.served = false;
                member.joined = false;
                member.catching = true;
                catch_ups.push((subject.clone(), member.advert.clone(), at, member.sequence));
            }
        }
        Ok(catch_ups)
    }

    /// The cursor for the members: at the cluster time of the oldest log position, or from
    /// now when no member's log has one.
    fn open(&mut self) -> ChangeSource {
        let template = &self.local.template;
        let relay = self.turn.relay;
        let from = self
            .members
            .values()
            .filter(|m| !m.catching)
            .filter_map(|m| m.at.clone())
            .min();
        self.pending_start = from
            .as_ref()
            .and_then(Token::cluster_time)
            .map(Token::before_cluster_time);
        let filter = filter_of(
            self.members
                .values()
                .filter(|m| !m.catching)
                .map(|m| (m.advert.coll.as_str(), m.advert.pipeline.as_slice())),
        );
        let mut fields: Vec<String> = self
            .members
            .values()
            .flat_map(|m| m.advert.fields.iter().cloned())
            .collect();
        fields.sort_unstable();
        fields.dedup();
        let (opened, skipped) = (Arc::clone(&template.metrics), Arc::clone(&template.metrics));
        let watch = Watch {
            client: template.client.clone(),
            db: template.db.clone(),
            coll: None,
            // The comment first (how a later owner finds this cursor if this one is killed).
            pipeline: vec![
                doc! { "$match": { "$comment": cursor_comment(self.turn.key, &relay.instance) } },
                doc! { "$match": filter },
            ],
            options: template.options.clone(),
            probe_fields: fields,
            features: template.features,
            isolation_changes: template.isolation_changes,
            max_backoff: template.max_backoff,
            label: format!("{} (relayed database feed)", template.db),
            on_open: Arc::new(move || {
                opened.cursors_opened.inc();
            }),
            on_skip: Arc::new(move || {
                skipped.oversize_skipped.inc();
            }),
        };
        self.position = from.clone();
        match from {
            Some(from) => ChangeSource::at_time_of(watch, from),
            None => ChangeSource::new(watch, None),
        }
    }

    /// Members whose log is empty start at `start` (their opening `mark`).
    async fn start_fresh(&mut self, start: Option<&Token>) -> Result<Next, String> {
        let Some(start) = start else {
            return Ok(Next::Go);
        };
        let fresh: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| !m.served && !m.added && !m.catching)
            .map(|(subject, _)| subject.clone())
            .collect();
        let messages = fresh
            .iter()
            .filter_map(|subject| {
                let member = self.members.get(subject)?;
                Some((
                    subject.clone(),
                    member.advert.key.clone(),
                    vec![wire::mark(start, now_ms())],
                ))
            })
            .collect();
        self.publish_all(messages).await?;
        for subject in fresh {
            if let Some(member) = self.members.get_mut(&subject) {
                member.at = Some(start.clone());
                member.served = true;
            }
        }
        Ok(Next::Go)
    }

    /// Every `mark_interval_ms`: a position for each member whose log has not moved to it (the
    /// cursor's high-water mark when quiet, else "before the cluster time of its last
    /// change": never another collection's change id).
    async fn mark_moved(&mut self) -> Result<(), String> {
        let mark = match (&self.quiet_at, &self.position) {
            (Some(quiet), Some(position)) if quiet == position => Some(quiet.clone()),
            (_, Some(position)) => position.cluster_time().map(Token::before_cluster_time),
            _ => None,
        };
        let Some(mark) = mark else {
            return Ok(());
        };
        let mut messages = Vec::new();
        for (subject, member) in &self.members {
            if member.served && member.at.as_ref().is_some_and(|at| *at < mark) {
                let message = wire::mark(&mark, now_ms());
                messages.push((subject.clone(), member.advert.key.clone(), vec![message]));
            }
        }
        self.publish_all(messages).await?;
        for member in self.members.values_mut() {
            if member.served && member.at.as_ref().is_some_and(|at| *at < mark) {
                member.at = Some(mark.clone());
            }
        }
        Ok(())
    }

    /// Publishes a batch of changes to the members on their collections (MongoDB says which a
    /// member's `$match` takes where members of one collection filter differently, and
    /// whether a filtering member's `$match` takes its collection's `drop`/`rename`); a
    /// `drop`/`rename` ends its members.
    async fn route(&mut self, batch: Vec<RawChange>) -> Result<Next, String> {
        let relay = self.turn.relay;
        let published = now_ms();
        for raw in &batch {
            if let Some(at_ms) = wall_ms(raw) {
                relay
                    .metrics()
                    .relay
                    .publish_lag
                    .observe_ms(published.saturating_sub(at_ms));
            }
        }
        let taken = self.evaluate(&batch).await?;
        let judged: HashMap<String, &HashSet<String>> = self
            .members
            .iter()
            .filter_map(|(subject, m)| {
                Some((
                    subject.clone(),
                    taken.get(&pipeline_bytes(&m.advert.pipeline))?,
                ))
            })
            .collect();
        // Per member: its messages in order.
        let mut out: BTreeMap<String, (String, Vec<Outbound>, wire::Batch)> = BTreeMap::new();
        let mut ended: Vec<String> = Vec::new();
        for raw in &batch {
            self.last_change = Some(raw.id.clone());
            self.position = Some(raw.id.clone());
            let Some(coll) = raw.coll() else {
                continue; // `dropDatabase`: each collection's `drop` came before it.
            };
            let ends = matches!(raw.operation_type(), "drop" | "rename");
            for (subject, member) in &mut self.members {
                if !member.served
                    || member.advert.coll != coll
                    || member.at.as_ref().is_some_and(|at| raw.id <= *at)
                {
                    continue;
                }
                let takes = match judged.get(subject) {
                    Some(ids) => raw.skipped || ids.contains(raw.id.as_str()),
                    None => true,
                };
                member.at = Some(raw.id.clone());
                let (_, messages, pending) = out.entry(subject.clone()).or_insert_with(|| {
                    (
                        member.advert.key.clone(),
                        Vec::new(),
                        relay.batch_for(subject),
                    )
                });
                if takes
                    && !pending
                        .try_push(raw, BATCH_BYTES)
                        .map_err(|e| e.to_string())?
                {
                    let full = std::mem::replace(pending, relay.batch_for(subject));
                    messages.extend(full.finish(published));
                    pending
                        .try_push(raw, BATCH_BYTES)
                        .map_err(|e| e.to_string())?;
                }
                if ends {
                    let full = std::mem::replace(pending, relay.batch_for(subject));
                    messages.extend(full.finish(published));
                    let invalidate = invalidate_after(raw);
                    messages.push(wire::invalidate(&invalidate, Some(&raw.id), published));
                    ended.push(subject.clone());
                }
            }
        }
        let messages = out
            .into_iter()
            .map(|(subject, (key, mut messages, pending))| {
                messages.extend(pending.finish(published));
                (subject, key, messages)
            })
            .collect();
        self.publish_all(messages).await?;
        for subject in &ended {
            self.members.remove(subject);
            self.ended.insert(subject.clone(), Instant::now());
        }
        Ok(Next::Go)
    }

    /// For each pipeline MongoDB must judge changes of this batch for (members of one
    /// collection filtering differently; a filtering member's `drop`/`rename`): the ids of
    /// those it takes. A pipeline absent from the answer takes every change routed to it.
    async fn evaluate(
        &self,
        batch: &[RawChange],
    ) -> Result<HashMap<Vec<u8>, HashSet<String>>, String> {
        let mut pipelines_of: HashMap<&str, BTreeSet<Vec<u8>>> = HashMap::new();
        let mut by_bytes: HashMap<Vec<u8>, &[Document]> = HashMap::new();
        for member in self.members.values().filter(|m| m.served) {
            let bytes = pipeline_bytes(&member.advert.pipeline);
            by_bytes.insert(bytes.clone(), &member.advert.pipeline);
            pipelines_of
                .entry(member.advert.coll.as_str())
                .or_default()
                .insert(bytes);
        }
        // Pipeline → the changes it must judge.
        let mut judge: HashMap<Vec<u8>, Vec<Document>> = HashMap::new();
        for raw in batch {
            let Some(pipelines) = raw.coll().and_then(|c| pipelines_of.get(c)) else {
                continue;
            };
            let ends = matches!(raw.operation_type(), "drop" | "rename");
            for bytes in pipelines {
                let filters = by_bytes.get(bytes).is_some_and(|p| !p.is_empty());
                if filters && (pipelines.len() > 1 || ends) && !raw.skipped {
                    judge
                        .entry(bytes.clone())
                        .or_default()
                        .push(raw.doc.clone());
                }
            }
        }
        let mut taken = HashMap::new();
        if judge.is_empty() {
            return Ok(taken);
        }
        let db = self.local.template.client.database(&self.local.template.db);
        for (bytes, changes) in judge {
            let Some(pipeline) = by_bytes.get(&bytes) else {
                continue;
            };
            let ids = taken_by(&db, changes, pipeline).await?;
            let ids: HashSet<String> = ids
                .iter()
                .filter_map(|id| id.as_document()?.get_str("_data").ok().map(str::to_owned))
                .collect();
            taken.insert(bytes, ids);
        }
        Ok(taken)
    }

    /// Subjects of the members that have a log start.
    fn served_subjects(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| m.served)
            .map(|(subject, _)| subject.clone())
            .collect()
    }

    /// Ends the members `subjects` with the message `end` makes for each. A member whose log
    /// is empty gets a start first ("before" the cluster time the feed stands at): a log
    /// whose first message is an end reads as an earlier life of the stream, and its workers
    /// would wait for a start rather than end with the error.
    async fn end(
        &mut self,
        subjects: Vec<String>,
        end: impl Fn(&Member) -> Outbound,
    ) -> Result<(), String> {
        let start = self.pending_start.clone().or_else(|| {
            let at = self.position.as_ref()?.cluster_time()?;
            Some(Token::before_cluster_time(at))
        });
        let messages = subjects
            .iter()
            .filter_map(|subject| {
                let member = self.members.get(subject)?;
                let mut messages = Vec::with_capacity(2);
                if member.at.is_none()
                    && let Some(start) = &start
                {
                    messages.push(wire::mark(start, now_ms()));
                }
                messages.push(end(member));
                Some((subject.clone(), member.advert.key.clone(), messages))
            })
            .collect();
        self.publish_all(messages).await?;
        for subject in subjects {
            self.members.remove(&subject);
            self.ended.insert(subject, Instant::now());
        }
        Ok(())
    }

    /// The cursor failed in a way retrying cannot fix: a refused open right after members
    /// joined ends those MongoDB refuses alone; history lost ends the members at the oldest
    /// position; anything else ends every member.
    async fn failed(&mut self, code: ErrorCode, message: String) -> Result<Next, String> {
        let db = &self.local.template.db;
        if code == ErrorCode::Upstream && self.joined {
            let refused = self.refused_members().await;
            if !refused.is_empty() {
                tracing::warn!(db = %db, %message, members = refused.len(), "relay: MongoDB refused database feed members' $match; their streams end");
                let subjects: Vec<String> = refused.iter().map(|(s, _)| s.clone()).collect();
                let errors: HashMap<String, String> = refused.into_iter().collect();
                let end = |m: &Member| {
                    let message = errors
                        .get(&m.advert.subject)
                        .map_or(message.as_str(), String::as_str);
                    wire::failed(ErrorCode::Upstream, message, m.at.as_ref(), now_ms())
                };
                self.end(subjects, end).await?;
                return Ok(Next::Reopen);
            }
        }
        let oldest = self.members.values().filter_map(|m| m.at.clone()).min();
        let ending: Vec<String> = match (code, &oldest) {
            (ErrorCode::HistoryLost, Some(oldest)) => self
                .members
                .iter()
                .filter(|(_, m)| m.at.as_ref() == Some(oldest))
                .map(|(subject, _)| subject.clone())
                .collect(),
            _ => self.members.keys().cloned().collect(),
        };
        tracing::error!(db = %db, code = code.as_str(), %message, members = ending.len(), "relay: database feed failed; its members end");
        let end = |m: &Member| wire::failed(code, &message, m.at.as_ref(), now_ms());
        self.end(ending, end).await?;
        self.position = None;
        Ok(Next::Reopen)
    }

    /// The members added at the last open whose `$match` MongoDB refuses alone, with the
    /// error a cursor of their own got.
    async fn refused_members(&self) -> Vec<(String, String)> {
        let template = &self.local.template;
        let mut refused = Vec::new();
        for (subject, member) in &self.members {
            if member.advert.pipeline.is_empty() || !member.joined {
                continue;
            }
            let watch = Watch {
                client: template.client.clone(),
                db: template.db.clone(),
                coll: None,
                pipeline: vec![doc! { "$match": filter_of(std::iter::once((
                    member.advert.coll.as_str(),
                    member.advert.pipeline.as_slice(),
                ))) }],
                options: template.options.clone(),
                probe_fields: Vec::new(),
                features: template.features,
                isolation_changes: template.isolation_changes,
                max_backoff: template.max_backoff,
                label: format!("{} (database feed probe)", template.db),
                on_open: Arc::new(|| {}),
                on_skip: Arc::new(|| {}),
            };
            let mut probe = ChangeSource::new(watch, None);
            if let Ok(Step::Failed(ErrorCode::Upstream, error)) =
                tokio::time::timeout(PROBE_TIMEOUT, probe.next()).await
            {
                refused.push((subject.clone(), error));
            }
        }
        refused
    }

    /// Publishes each member's messages in order (members side by side), each expecting
    /// its log's last sequence.
    async fn publish_all(
        &mut self,
        messages: Vec<(String, String, Vec<Outbound>)>,
    ) -> Result<(), String> {
        let (relay, handles) = (self.turn.relay, self.turn.handles);
        let sends = messages.into_iter().map(|(subject, key, messages)| {
            let known = self.members.get(&subject).map(|m| m.sequence);
            async move {
                let mut sequence = match known {
                    Some(sequence) => sequence,
                    // Not a member any more: where its log stands.
                    None => last_position(handles, &subject).await?.1,
                };
                for message in messages {
                    publish(relay, &subject, &key, message, &mut sequence).await?;
                }
                Ok::<_, String>((subject, sequence))
            }
        });
        for (subject, sequence) in futures::future::try_join_all(sends).await? {
            if let Some(member) = self.members.get_mut(&subject) {
                member.sequence = sequence;
            }
        }
        Ok(())
    }
}

/// Seconds of a cluster time.
fn seconds(at: Timestamp) -> u64 {
    u64::from(at.time)
}

/// A pipeline as bytes (a map key).
fn pipeline_bytes(pipeline: &[Document]) -> Vec<u8> {
    let stages: Vec<Bson> = pipeline.iter().cloned().map(Bson::Document).collect();
    mongodb::bson::to_vec(&doc! { "p": stages }).unwrap_or_default()
}
