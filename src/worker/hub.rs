//! A hub: recent events in oplog order, read by position, with live fan-out.
//!
//! A worker has one hub (its ring plus the broadcast and per-filter partition channels); a shared
//! catch-up has one too (a ring only: its readers always pull by position). Clients never hold a
//! copy of the ring: they remember the id they have seen through and read the next chunk after it,
//! under the hub's lock, so a client behind by 10,000 events costs one position, not 10,000
//! queue slots. The lock is also what makes attaching exact: a read that reaches the head
//! subscribes to the live channel before the lock is released, so the next event published is the
//! first one the live receiver gets.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::broadcast;

use super::membership::Moves;
use crate::event::{Event, Token};
use crate::routing::{ClientFilter, RouteValues};

/// Slots of the live broadcast channel. Small on purpose: lagging clients read from the ring.
pub const LIVE_SLOTS: usize = 1024;

/// Slots of a filtered partition's channel: there may be one per tenant or binding, so small.
const PARTITION_SLOTS: usize = 64;

/// A ring entry: a change (or `skipped`) event with its id and its routing values.
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    /// The event's resume token (every ring event has one).
    pub id: Token,
    /// The pre-encoded event.
    pub event: Arc<Event>,
    /// Per routing rule, the event's values (empty for unfiltered streams).
    pub values: RouteValues,
    /// Membership streams (PROTOCOL.md §10): the document's verdicts before and after the
    /// change, and its removal/entry encodings; `None`: `values` alone decide.
    pub moves: Option<Arc<Moves>>,
}

/// Clients that share a filter share this channel.
#[derive(Debug)]
struct Partition {
    live: broadcast::Sender<Arc<Event>>,
    filter: Arc<ClientFilter>,
}

/// What a client gets when its read reaches the head of a worker's hub.
#[derive(Debug)]
pub struct Attachment {
    /// Ring events after the client's position (plus the terminal event, if any).
    pub backlog: Vec<Arc<Event>>,
    /// Live events published after the attach.
    pub live: broadcast::Receiver<Arc<Event>>,
    /// Live events at or before this token were already delivered (a catch-up ran ahead).
    pub skip_through: Option<Token>,
    /// The hub's position at attach time: everything up to here is in `backlog` or was before
    /// the client's start (or, for a filtered client, was not for it).
    pub position: Option<Token>,
}

/// A bounded read of the ring after a position.
#[derive(Debug)]
pub struct Scan {
    /// The events for this client, in order.
    pub events: Vec<Arc<Event>>,
    /// Id of the last ring entry scanned (delivered or filtered out); `None` if none was.
    pub through: Option<Token>,
    /// Whether the scan reached the newest entry.
    pub at_head: bool,
}

/// Ring, coverage, position and channels. Always used under its owner's mutex.
#[derive(Debug)]
pub(crate) struct Hub {
    ring: VecDeque<Routed>,
    capacity: usize,
    /// Every change after this token is in `ring` or still to come. `None` until the feeding
    /// cursor has a first position (its open's token, a post-batch token or a change).
    pub coverage_start: Option<Token>,
    /// Where the feeding cursor stands: the last event's token or the latest post-batch token.
    pub position: Option<Token>,
    /// Set once the hub ended with an event (`invalidate`, `error`, `cancel`); late readers get it.
    pub terminal: Option<Arc<Event>>,
    live: broadcast::Sender<Arc<Event>>,
    /// Filtered streams only: one live channel per distinct client filter.
    partitions: HashMap<Arc<str>, Partition>,
    /// Filtered streams only: first-rule value → partitions whose filter contains it.
    index: HashMap<String, Vec<Arc<str>>>,
}

impl Hub {
    /// An empty hub keeping at most `capacity` events.
    pub fn new(capacity: usize) -> Hub {
        Hub {
            ring: VecDeque::new(),
            capacity: capacity.max(1),
            coverage_start: None,
            position: None,
            terminal: None,
            live: broadcast::channel(LIVE_SLOTS).0,
            partitions: HashMap::new(),
            index: HashMap::new(),
        }
    }

    /// Whether the ring is at capacity (the next push evicts).
    pub fn is_full(&self) -> bool {
        self.ring.len() >= self.capacity
    }

    /// Id of the oldest ring entry.
    pub fn front_id(&self) -> Option<&Token> {
        self.ring.front().map(|r| &r.id)
    }

    /// Id of the newest ring entry.
    pub fn back_id(&self) -> Option<&Token> {
        self.ring.back().map(|r| &r.id)
    }

    /// Whether a client that has seen everything through `after` can read on from this hub.
    pub fn covers(&self, after: &Token) -> bool {
        self.coverage_start
            .as_ref()
            .is_some_and(|start| after >= start)
    }

    /// Reads the entries after `after` (which must be covered), at most `max_scan` of them,
    /// keeping those `filter` lets through.
    pub fn scan(
        &self,
        after: &Token,
        filter: Option<&ClientFilter>,
        max_scan: usize,
    ) -> Option<Scan> {
        if !self.covers(after) {
            return None;
        }
        let first = self.ring.partition_point(|r| &r.id <= after);
        let stop = first.saturating_add(max_scan.max(1)).min(self.ring.len());
        let entries = self.ring.range(first..stop);
        let events = entries
            .clone()
            .filter_map(|r| r.for_client(filter).cloned())
            .collect();
        Some(Scan {
            events,
            through: entries.last().map(|r| r.id.clone()),
            at_head: stop == self.ring.len(),
        })
    }

    /// Reads after `after` like [`Hub::scan`]; when the read reaches the head, subscribes the
    /// client to the live channel under the same lock and returns an [`Attachment`]. `None`
    /// after a client position means it is not covered. `after = None` is a new client.
    pub fn read(
        &mut self,
        after: Option<&Token>,
        filter: Option<&Arc<ClientFilter>>,
        max_scan: usize,
    ) -> Option<Result<Attachment, Scan>> {
        let mut backlog = Vec::new();
        let mut skip_through = None;
        if let Some(after) = after {
            let scan = self.scan(after, filter.map(|f| &**f), max_scan)?;
            if !scan.at_head {
                return Some(Err(scan));
            }
            backlog = scan.events;
            skip_through = Some(after.clone());
        }
        if let Some(terminal) = &self.terminal {
            backlog.push(Arc::clone(terminal));
        }
        let position = self
            .position
            .clone()
            .or_else(|| self.ring.back().map(|r| r.id.clone()));
        let live = match filter {
            Some(filter) => self.partition(filter),
            None => self.live.subscribe(),
        };
        Some(Ok(Attachment {
            backlog,
            live,
            skip_through,
            position,
        }))
    }

    /// The last `n` ring entries at or before `through` (all of them when `None`) that
    /// `filter` and `keep` let through, oldest first: a new client's `rewind`.
    pub fn last_entries(
        &self,
        n: usize,
        through: Option<&Token>,
        filter: Option<&ClientFilter>,
        keep: &dyn Fn(&Event) -> bool,
    ) -> Vec<Arc<Event>> {
        let mut events: Vec<Arc<Event>> = self
            .ring
            .iter()
            .rev()
            .filter(|r| through.is_none_or(|t| &r.id <= t))
            .filter_map(|r| r.for_client(filter).filter(|e| keep(e)).cloned())
            .take(n)
            .collect();
        events.reverse();
        events
    }

    /// Appends a change, evicting the oldest entry when full. Does not fan out.
    pub fn push(&mut self, routed: Routed) {
        if self.ring.len() >= self.capacity
            && let Some(evicted) = self.ring.pop_front()
        {
            self.coverage_start = Some(evicted.id);
        }
        self.advance(routed.id.clone());
        self.ring.push_back(routed);
    }

    /// The feeding cursor has read through `token`. The first position also starts the
    /// coverage: a cursor opened "from now" may tell its place only with a later post-batch
    /// token or change, and until then no client could be served (a restart under writes
    /// left a first subscriber waiting out `cursor_open_wait` for a 503).
    pub fn advance(&mut self, token: Token) {
        if self.coverage_start.is_none() {
            self.coverage_start = Some(token.clone());
        }
        self.position = Some(token);
    }

    /// Appends a change and sends it to the live clients it is for.
    pub fn publish(&mut self, routed: Routed) {
        self.push(routed.clone());
        if routed.values.is_empty() {
            // Unfiltered stream (no routing rules).
            // No receivers is fine: the event stays in the ring for readers by position.
            if let Some(event) = routed.for_client(None) {
                let _ = self.live.send(Arc::clone(event));
            }
        } else {
            self.route(&routed);
        }
    }

    /// Ends the hub with `event` for every client, filtered or not.
    pub fn end(&mut self, event: Arc<Event>) {
        self.terminal = Some(Arc::clone(&event));
        for partition in self.partitions.values() {
            let _ = partition.live.send(Arc::clone(&event));
        }
        let _ = self.live.send(event);
    }

    /// Entries with ids at or before `through`, oldest first (for a catch-up's hand-over).
    pub fn entries_through(&self, through: &Token) -> Vec<Routed> {
        self.ring
            .iter()
            .take_while(|r| &r.id <= through)
            .cloned()
            .collect()
    }

    /// Extends the ring backwards with `older` (consecutive changes ending at or before
    /// `coverage_start`, whose predecessor is `older_start`), as far as capacity allows.
    /// Returns how many entries were added.
    pub fn prepend(&mut self, older_start: &Token, older: Vec<Routed>) -> usize {
        let Some(start) = self.coverage_start.clone() else {
            return 0;
        };
        let mut older: Vec<Routed> = older.into_iter().filter(|r| r.id <= start).collect();
        let room = self.capacity.saturating_sub(self.ring.len());
        if room == 0 || (older.is_empty() && older_start >= &start) {
            return 0;
        }
        let skip = older.len().saturating_sub(room);
        let new_start = if skip == 0 {
            older_start.clone()
        } else {
            older[skip - 1].id.clone()
        };
        if new_start >= start {
            return 0;
        }
        let added = older.len() - skip;
        for routed in older.drain(skip..).rev() {
            self.ring.push_front(routed);
        }
        self.coverage_start = Some(new_start);
        added
    }

    /// Sends a filtered event to the partitions it is for: O(matching partitions), looked up
    /// by the post-image's values and, for a membership change, the pre-image's too (the
    /// partitions the document leaves).
    fn route(&mut self, routed: &Routed) {
        let Some(first) = routed.values.first() else {
            return;
        };
        let before = routed
            .moves
            .as_ref()
            .and_then(|m| m.pre_values())
            .and_then(|values| values.first())
            .filter(|values| *values != first);
        let mut sent: Vec<&Arc<str>> = Vec::new();
        for value in first.iter().chain(before.into_iter().flatten()) {
            for key in self.index.get(value).into_iter().flatten() {
                if sent.contains(&key) {
                    continue;
                }
                sent.push(key);
                if let Some(partition) = self.partitions.get(key)
                    && let Some(event) = routed.for_client(Some(&partition.filter))
                {
                    // A partition without receivers is removed by `release_partition`.
                    let _ = partition.live.send(Arc::clone(event));
                }
            }
        }
    }

    /// The live channel for `filter`, created (and indexed) on first use.
    fn partition(&mut self, filter: &Arc<ClientFilter>) -> broadcast::Receiver<Arc<Event>> {
        if let Some(partition) = self.partitions.get(&filter.key) {
            return partition.live.subscribe();
        }
        let (live, receiver) = broadcast::channel(PARTITION_SLOTS);
        for value in filter.sets.first().into_iter().flatten() {
            self.index
                .entry(value.clone())
                .or_default()
                .push(Arc::clone(&filter.key));
        }
        self.partitions.insert(
            Arc::clone(&filter.key),
            Partition {
                live,
                filter: Arc::clone(filter),
            },
        );
        receiver
    }

    /// Forgets the partition of `key` when no client listens to it any more.
    pub fn release_partition(&mut self, key: &Arc<str>) {
        let unused = self
            .partitions
            .get(key)
            .is_some_and(|p| p.live.receiver_count() == 0);
        if !unused {
            return;
        }
        let Some(partition) = self.partitions.remove(key) else {
            return;
        };
        for value in partition.filter.sets.first().into_iter().flatten() {
            if let Some(keys) = self.index.get_mut(value) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.index.remove(value);
                }
            }
        }
    }

    /// Live partitions (distinct client filters).
    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{MatchRule, RuleSource, route_values};
    use mongodb::bson::doc;
    use std::collections::BTreeMap;

    fn token(n: u32) -> Token {
        Token::parse(&format!("82000000010000{n:04}")).unwrap()
    }

    fn routed(n: u32, tenant: &str) -> Routed {
        let change = doc! {
            "_id": { "_data": token(n).as_str() },
            "operationType": "insert",
            "fullDocument": { "t": tenant },
        };
        let values = route_values(&rules(), &change);
        Routed {
            id: token(n),
            event: Arc::new(Event::from_change(change).unwrap()),
            values,
            moves: None,
        }
    }

    fn rules() -> Vec<MatchRule> {
        vec![MatchRule {
            field: vec!["fullDocument".into(), "t".into()],
            source: RuleSource::Var("t".into()),
            pre_image: false,
        }]
    }

    fn filter(tenant: &str) -> Arc<ClientFilter> {
        let mut routed = BTreeMap::new();
        routed.insert("t".to_owned(), mongodb::bson::Bson::from(tenant));
        ClientFilter::build(&rules(), None, &routed)
            .unwrap()
            .unwrap()
    }

    fn ids(events: &[Arc<Event>]) -> Vec<Token> {
        events.iter().filter_map(|e| e.id.clone()).collect()
    }

    fn hub(capacity: usize, events: std::ops::RangeInclusive<u32>) -> Hub {
        let mut hub = Hub::new(capacity);
        hub.coverage_start = Some(token(0));
        for n in events {
            hub.push(routed(n, if n % 2 == 0 { "even" } else { "odd" }));
        }
        hub
    }

    #[test]
    fn reads_in_chunks_then_attaches_at_the_head() {
        let mut hub = hub(100, 1..=10);
        let Some(Err(scan)) = hub.read(Some(&token(2)), None, 4) else {
            panic!("expected a chunk");
        };
        assert_eq!(ids(&scan.events), (3..=6).map(token).collect::<Vec<_>>());
        assert_eq!(scan.through, Some(token(6)));
        let Some(Ok(attachment)) = hub.read(Some(&token(6)), None, 4) else {
            panic!("expected the head");
        };
        assert_eq!(
            ids(&attachment.backlog),
            (7..=10).map(token).collect::<Vec<_>>()
        );
        assert_eq!(attachment.position, Some(token(10)));
        assert_eq!(attachment.skip_through, Some(token(6)));
    }

    #[test]
    fn a_filtered_chunk_moves_through_other_tenants_events() {
        let mut hub = hub(100, 1..=10);
        let odd = filter("odd");
        let Some(Err(scan)) = hub.read(Some(&token(0)), Some(&odd), 4) else {
            panic!("expected a chunk");
        };
        assert_eq!(ids(&scan.events), vec![token(1), token(3)]);
        // The position moves past the even events too: they are not for this client.
        assert_eq!(scan.through, Some(token(4)));
    }

    #[test]
    fn eviction_moves_coverage_and_old_positions_are_not_covered() {
        let mut hub = hub(5, 1..=10);
        assert_eq!(hub.coverage_start, Some(token(5)));
        assert!(hub.read(Some(&token(4)), None, 100).is_none());
        assert!(hub.read(Some(&token(5)), None, 100).is_some());
    }

    #[test]
    fn prepend_extends_coverage_backwards_within_capacity() {
        // The worker holds 8..=10 (coverage from 7); a catch-up read 2..=9 after 1.
        let mut worker = Hub::new(6);
        worker.coverage_start = Some(token(7));
        for n in 8..=10 {
            worker.push(routed(n, "odd"));
        }
        let older: Vec<Routed> = (2..=9).map(|n| routed(n, "odd")).collect();
        // Room for 3: the newest three at or before 7 (5, 6, 7); coverage from 4.
        assert_eq!(worker.prepend(&token(1), older), 3);
        assert_eq!(worker.coverage_start, Some(token(4)));
        let Some(Ok(attachment)) = worker.read(Some(&token(4)), None, 100) else {
            panic!("expected the head");
        };
        assert_eq!(
            ids(&attachment.backlog),
            (5..=10).map(token).collect::<Vec<_>>()
        );
    }

    #[test]
    fn partitions_are_dropped_with_their_last_listener() {
        let mut hub = hub(10, 1..=2);
        let odd = filter("odd");
        let Some(Ok(attachment)) = hub.read(None, Some(&odd), 10) else {
            panic!("expected an attachment");
        };
        assert_eq!(hub.partition_count(), 1);
        hub.release_partition(&odd.key);
        assert_eq!(hub.partition_count(), 1, "still listened to");
        drop(attachment);
        hub.release_partition(&odd.key);
        assert_eq!(hub.partition_count(), 0);
    }
}
