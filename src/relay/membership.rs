//! Who of the fleet is live, which workers each instance has, and from that, which instance
//! should read each worker's cursor.
//!
//! Every instance with relayed workers keeps one key in the JetStream key-value bucket
//! `relay.instance_bucket`: its name, whose value lists the lease keys of its workers (and of
//! the database feeds its workers are members of, `feed/`: a feed is placed as a worker). It
//! writes it every `heartbeat_ms` (and at once when a worker starts or stops) and deletes it
//! when its last worker stops; the bucket's `max_age` (`instance_ttl_ms`) drops the key of an
//! instance that was killed. Each instance watches the bucket (one consumer, for as long as
//! it has workers): an instance counts as live from each heartbeat received until
//! `instance_ttl_ms` after it, or until its key is deleted. That is its [`View`] of the fleet.
//!
//! From a view, [`assign`] places each worker on one of the instances that have it:
//! rendezvous hashing (each instance ranks by a hash of worker and instance name, the highest
//! wins) with bounded loads (an instance takes no more than its share, the number of workers
//! divided by the number of instances, rounded up, while another that has the worker is
//! below it). Every instance computes the same placement from the same heartbeats, without
//! talking, and a joining or leaving instance moves few workers. The placement only says who
//! *should* hold a lease: the lease (`lease.rs`) still decides who does, so instances whose
//! views differ for a moment contend, and one wins.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::Relay;
use crate::backoff::Backoff;

/// How long one read or write of the heartbeat bucket may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// This instance's view of the fleet: which instance should read each worker's cursor.
#[derive(Debug, Default, PartialEq)]
pub(super) struct View {
    /// Whether the bucket has been read at least once (an unknown view assigns nothing).
    pub known: bool,
    /// Live instances with workers, this one included.
    pub instances: usize,
    /// Instances heard from before whose heartbeat has since expired (killed, or cut off):
    /// their leases may be taken without waiting for them to expire.
    gone: BTreeSet<String>,
    /// Worker (lease key) → the instance that should read its cursor.
    assignment: HashMap<String, String>,
}

impl View {
    /// The instance that should read `key`'s cursor, if the view knows one.
    pub fn assignee(&self, key: &str) -> Option<&str> {
        self.assignment.get(key).map(String::as_str)
    }

    /// Whether `instance` is gone as far as this view can tell: it was heard from, and not
    /// within `instance_ttl_ms` since. (An instance never heard from is not gone: this view
    /// may simply not have caught up with it.)
    pub fn is_gone(&self, instance: &str) -> bool {
        self.gone.contains(instance)
    }
}

/// This instance's heartbeat and its view of the others'.
pub(super) struct Membership {
    /// This instance's key in the bucket.
    instance: String,
    /// Lease keys of this instance's relayed workers, with how many workers have each (two
    /// streams watching the same thing share a key).
    wanted: Mutex<BTreeMap<String, usize>>,
    /// Set while the heartbeat task runs (it starts with the first worker).
    running: AtomicBool,
    /// Wakes the heartbeat task: a worker started or stopped, or the relay was dropped.
    pub(super) wake: Notify,
    /// One write of this instance's key at a time, so that a delete is not overtaken by an
    /// older put.
    writing: tokio::sync::Mutex<bool>,
    view: watch::Sender<Arc<View>>,
}

impl Membership {
    pub(super) fn new(instance: String) -> Membership {
        Membership {
            instance,
            wanted: Mutex::new(BTreeMap::new()),
            running: AtomicBool::new(false),
            wake: Notify::new(),
            writing: tokio::sync::Mutex::new(false),
            view: watch::Sender::new(Arc::new(View::default())),
        }
    }

    /// The view, and a way to wait until it changes.
    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// A worker with lease key `key` started here: announce it (at once), starting the
    /// heartbeat with the first one.
    pub(super) fn want(relay: &Arc<Relay>, key: &str) {
        let membership = &relay.membership;
        *crate::sync::lock(&membership.wanted)
            .entry(key.to_owned())
            .or_default() += 1;
        if !membership.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(heartbeat(Arc::downgrade(relay)));
        }
        membership.wake.notify_one();
    }

    /// A worker with lease key `key` stopped here. When it was the last one, the instance's
    /// key is deleted before this returns (a stopping instance leaves the others' views
    /// before it exits, rather than when its heartbeat expires).
    pub(super) async fn unwant(relay: &Relay, key: &str) {
        let membership = &relay.membership;
        let empty = {
            let mut wanted = crate::sync::lock(&membership.wanted);
            if let Some(count) = wanted.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    wanted.remove(key);
                }
            }
            wanted.is_empty()
        };
        membership.wake.notify_one();
        if empty && let Ok(handles) = relay.handles().await {
            let _ = membership.write(&handles.instances).await;
        }
    }

    fn wanted(&self) -> BTreeSet<String> {
        crate::sync::lock(&self.wanted).keys().cloned().collect()
    }

    /// Writes this instance's key (its workers), or deletes it once it has none.
    async fn write(&self, store: &kv::Store) -> Result<(), String> {
        let mut written = self.writing.lock().await;
        let wanted = self.wanted();
        if wanted.is_empty() {
            if *written {
                tokio::time::timeout(TIMEOUT, store.delete(&self.instance))
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                *written = false;
            }
            return Ok(());
        }
        let value = wanted.into_iter().collect::<Vec<_>>().join("\n");
        tokio::time::timeout(TIMEOUT, store.put(&self.instance, Bytes::from(value)))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        *written = true;
        Ok(())
    }

    /// Publishes the placement the live instances' heartbeats make (waking owners and
    /// contenders only when it changed).
    fn place(&self, heard: &Heard, ttl: Duration) {
        let now = Instant::now();
        let mut wants: BTreeMap<String, BTreeSet<String>> = heard
            .iter()
            .filter(|(name, (_, at))| **name != self.instance && now.duration_since(*at) < ttl)
            .map(|(name, (keys, _))| (name.clone(), keys.clone()))
            .collect();
        // This instance's own workers as they are now, not as its last heartbeat said.
        let mine = self.wanted();
        if !mine.is_empty() {
            wants.insert(self.instance.clone(), mine);
        }
        let view = View {
            known: true,
            instances: wants.len(),
            gone: heard
                .iter()
                .filter(|(name, (_, at))| **name != self.instance && now.duration_since(*at) >= ttl)
                .map(|(name, _)| name.clone())
                .collect(),
            assignment: assign(&wants),
        };
        self.view.send_if_modified(|current| {
            if **current == view {
                false
            } else {
                *current = Arc::new(view);
                true
            }
        });
    }
}

/// The heartbeats received: instance → (its workers' lease keys, when its last one came).
type Heard = BTreeMap<String, (BTreeSet<String>, Instant)>;

/// Takes one entry of the bucket's watch into `heard`.
fn hear(heard: &mut Heard, entry: kv::Entry) {
    if entry.operation != kv::Operation::Put {
        // Deleted: the instance's last worker stopped (or it shut down).
        heard.remove(&entry.key);
        return;
    }
    let keys: BTreeSet<String> = String::from_utf8_lossy(&entry.value)
        .split('\n')
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    heard.insert(entry.key, (keys, Instant::now()));
}

/// The heartbeat task of an instance: while it has workers, writes its key every
/// `heartbeat_ms` (and at once when a worker starts or stops), watches the others' and
/// publishes the placement. Ends with the relay.
async fn heartbeat(relay: Weak<Relay>) {
    let mut heard = Heard::new();
    let mut watch: Option<kv::Watch> = None;
    // Whether the watch has replayed every key the bucket held when it started: a placement
    // made from part of them would move cursors to the wrong instances.
    let mut caught_up = false;
    let mut beat = Instant::now();
    let mut watch_after = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let Some(strong) = relay.upgrade() else {
            return;
        };
        let membership = Arc::clone(&strong.membership);
        let (every, ttl) = (strong.settings.heartbeat(), strong.settings.instance_ttl());
        let handles = strong.handles().await.ok();
        if let Some(handles) = &handles
            && Instant::now() >= beat
        {
            if let Err(error) = membership.write(&handles.instances).await {
                strong.metrics().relay.error("lease");
                tracing::warn!(%error, "relay: cannot write this instance's heartbeat");
            }
            beat = Instant::now() + every;
        }
        let idle = membership.wanted().is_empty();
        if idle {
            // Nothing to renew or place: no watch until the next worker.
            watch = None;
            heard.clear();
        } else if watch.is_none()
            && Instant::now() >= watch_after
            && let Some(handles) = &handles
        {
            caught_up = false;
            heard.clear();
            match handles.instances.watch_all().await {
                Ok(watching) => watch = Some(watching),
                Err(error) => {
                    strong.metrics().relay.error("lease");
                    tracing::warn!(%error, "relay: cannot watch the fleet's heartbeats");
                    watch_after = Instant::now() + backoff.next_delay();
                }
            }
        }
        if !idle && caught_up {
            membership.place(&heard, ttl);
        }
        // The relay is held only weakly while waiting, so that it can be dropped (which wakes
        // this task).
        drop(strong);
        let retry_watch = watch.is_none() && !idle;
        let heard_one = async {
            match watch.as_mut() {
                Some(watching) => watching.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = membership.wake.notified() => beat = Instant::now(),
            _ = tokio::time::sleep_until(beat), if !idle => {}
            _ = tokio::time::sleep_until(watch_after), if retry_watch => {}
            entry = heard_one => match entry {
                Some(Ok(entry)) => {
                    backoff.reset();
                    // The last of the replay, or a new heartbeat: `delta` counts what follows.
                    caught_up |= entry.delta == 0;
                    hear(&mut heard, entry);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "relay: the watch of the fleet's heartbeats failed");
                    watch = None;
                    watch_after = Instant::now() + backoff.next_delay();
                }
                None => {
                    watch = None;
                    watch_after = Instant::now() + backoff.next_delay();
                }
            },
        }
    }
}

/// Rendezvous score of `instance` for the worker `key`: the same on every instance.
fn score(key: &str, instance: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(key.as_bytes());
    hasher.update([0]);
    hasher.update(instance.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Places each worker on one of the instances that have it (`wants`: instance → its
/// workers' lease keys): the instance with the highest rendezvous score for the worker that
/// holds fewer than its share (workers ÷ instances, rounded up), else, when all that have it
/// are full, the highest of them. Workers are placed in key order, so the placement depends
/// only on `wants`.
pub(super) fn assign(wants: &BTreeMap<String, BTreeSet<String>>) -> HashMap<String, String> {
    let mut wanted_by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (instance, keys) in wants {
        for key in keys {
            wanted_by.entry(key).or_default().push(instance);
        }
    }
    let instances = wants.values().filter(|keys| !keys.is_empty()).count();
    let mut placed = HashMap::with_capacity(wanted_by.len());
    if instances == 0 {
        return placed;
    }
    let share = wanted_by.len().div_ceil(instances);
    let mut load: HashMap<&str, usize> = HashMap::new();
    for (key, mut candidates) in wanted_by {
        // Highest score first; equal scores (never, in practice) by name.
        candidates.sort_by_key(|instance| (std::cmp::Reverse(score(key, instance)), *instance));
        let chosen = candidates
            .iter()
            .find(|instance| load.get(*instance).copied().unwrap_or(0) < share)
            .unwrap_or(&candidates[0]);
        *load.entry(chosen).or_default() += 1;
        placed.insert(key.to_owned(), (*chosen).to_owned());
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("{:032x}", i * 7919)).collect()
    }

    fn fleet(names: &[&str], workers: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), workers.clone()))
            .collect()
    }

    fn counts(placed: &HashMap<String, String>) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for instance in placed.values() {
            *counts.entry(instance.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn workers_spread_evenly_and_a_joining_instance_takes_its_share() {
        let workers = keys(12);
        let three = assign(&fleet(&["host-1-a1", "host-2-b2", "host-3-c3"], &workers));
        assert_eq!(three.len(), 12);
        assert!(counts(&three).values().all(|n| *n == 4), "{three:?}");
        let four = assign(&fleet(
            &["host-1-a1", "host-2-b2", "host-3-c3", "host-4-d4"],
            &workers,
        ));
        assert!(counts(&four).values().all(|n| *n == 3), "{four:?}");
        // Workers that stay on one of the first three mostly stay where they were.
        let stayed = workers
            .iter()
            .filter(|k| four[*k] != "host-4-d4" && four[*k] == three[*k])
            .count();
        assert!(stayed >= 6, "only {stayed} of 9 stayed");
        // An instance leaving: its workers go to the others, evenly.
        let two = assign(&fleet(&["host-1-a1", "host-3-c3"], &workers));
        assert!(counts(&two).values().all(|n| *n == 6), "{two:?}");
    }

    #[test]
    fn a_worker_goes_only_to_an_instance_that_has_it() {
        let workers = keys(6);
        let mut wants = fleet(&["a", "b"], &workers);
        let only_on_c: BTreeSet<String> = keys(8).difference(&workers).cloned().collect();
        wants.insert("c".into(), only_on_c.clone());
        let placed = assign(&wants);
        for key in &only_on_c {
            assert_eq!(placed[key], "c");
        }
        for key in &workers {
            assert_ne!(placed[key], "c");
        }
        // 8 workers, 3 instances: a share of 3; c has only 2, a and b split the other 6.
        assert_eq!(counts(&placed)["a"], 3);
        assert_eq!(counts(&placed)["b"], 3);
    }

    #[test]
    fn the_placement_depends_only_on_the_heartbeats() {
        let workers = keys(20);
        let names = ["x-1", "y-2", "z-3"];
        let mut reversed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for name in names.iter().rev() {
            reversed.insert((*name).to_owned(), workers.clone());
        }
        assert_eq!(assign(&fleet(&names, &workers)), assign(&reversed));
        assert!(assign(&BTreeMap::new()).is_empty());
    }
}
