//! Snapshot, then changes (`?snapshot=true`, PROTOCOL.md §6): gapless and duplicate-free under
//! a concurrent writer, resumable mid-snapshot, shaped and routed like changes, bounded memory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mongodb::Collection;
use mongodb::bson::{Bson, Document, doc};
use serde_json::{Value, json};

use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::fixture::Fixture;

const WAIT: Duration = Duration::from_secs(30);

/// A pipeline that both filters and shapes: hidden documents are left out, `secret` removed.
pub fn shaping_pipeline() -> Value {
    json!([
        { "$match": { "fullDocument.kind": { "$ne": "hidden" } } },
        { "$unset": "fullDocument.secret" }
    ])
}

/// A tiny deterministic generator (no extra dependency).
pub struct Lcg(pub u64);

impl Lcg {
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Seeds `n` documents `{_id: i, kind, secret, n, f: {g}, arr}`, every fifth one hidden.
pub async fn seed(coll: &Collection<Document>, n: i64) {
    let docs: Vec<Document> = (0..n).map(seed_doc).collect();
    for chunk in docs.chunks(10_000) {
        coll.insert_many(chunk.to_vec()).await.unwrap();
    }
}

fn seed_doc(i: i64) -> Document {
    doc! {
        "_id": i,
        "kind": if i % 5 == 0 { "hidden" } else { "shown" },
        "secret": format!("s{i}"),
        "n": i,
        "f": { "g": i },
        "arr": [1, 2, 3],
    }
}

/// `ops` random inserts, updates (set, nested set, unset, push, pop), replaces and deletes on
/// ids below `next_id`, then returns. Kinds never change, so the pipeline's filter is stable.
pub async fn random_writes(coll: Collection<Document>, seed: u64, ops: usize, mut next_id: i64) {
    let mut rng = Lcg(seed);
    for _ in 0..ops {
        let id = rng.below(next_id as u64) as i64;
        let value = rng.below(1000) as i64;
        match rng.below(8) {
            0 => {
                coll.insert_one(seed_doc(next_id)).await.unwrap();
                next_id += 1;
            }
            1 => {
                coll.update_one(doc! {"_id": id}, doc! {"$set": {"n": value, "f.g": value}})
                    .await
                    .unwrap();
            }
            2 => {
                coll.update_one(doc! {"_id": id}, doc! {"$unset": {"n": ""}})
                    .await
                    .unwrap();
            }
            3 => {
                coll.update_one(doc! {"_id": id}, doc! {"$push": {"arr": value}})
                    .await
                    .unwrap();
            }
            4 => {
                coll.update_one(doc! {"_id": id}, doc! {"$pop": {"arr": 1}})
                    .await
                    .unwrap();
            }
            5 => {
                let kind = if id % 5 == 0 { "hidden" } else { "shown" };
                coll.replace_one(
                    doc! {"_id": id},
                    doc! {"kind": kind, "secret": "r", "n": value, "new": true},
                )
                .await
                .unwrap();
            }
            6 => {
                coll.delete_one(doc! {"_id": id}).await.unwrap();
            }
            _ => {
                coll.update_one(doc! {"_id": id}, doc! {"$inc": {"f.g": 1}})
                    .await
                    .unwrap();
            }
        }
    }
}

/// The collection as the shaping pipeline shows it, by `_id` JSON text.
pub async fn expected(coll: &Collection<Document>) -> BTreeMap<String, Value> {
    use futures::TryStreamExt;
    let docs: Vec<Document> = coll
        .find(doc! {"kind": {"$ne": "hidden"}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.into_iter()
        .filter(|d| d.get("_id") != Some(&Bson::String("end".into())))
        .map(|mut d| {
            d.remove("secret");
            let id = d.get("_id").cloned().unwrap();
            (
                id.into_relaxed_extjson().to_string(),
                Bson::Document(d).into_relaxed_extjson(),
            )
        })
        .collect()
}

/// A client's view built from snapshot and change events applied in order.
#[derive(Default)]
pub struct Applied {
    pub docs: BTreeMap<String, Value>,
    pub snapshot_events: usize,
    pub ready: Option<Envelope>,
    pub last_id: Option<String>,
}

impl Applied {
    /// Applies one event; `true` when it was the insert of the `end` marker.
    pub fn apply(&mut self, event: &Envelope) -> bool {
        if let Some(id) = &event.id {
            self.last_id = Some(id.clone());
        }
        let key = || event.data["documentKey"]["_id"].to_string();
        match event.event.as_str() {
            "snapshot" => {
                assert!(self.ready.is_none(), "snapshot after ready: {event:?}");
                self.snapshot_events += 1;
                let previous = self.docs.insert(key(), event.data["fullDocument"].clone());
                assert!(previous.is_none(), "snapshot delivered twice: {event:?}");
            }
            "ready" => {
                assert!(self.ready.is_none(), "two readies");
                self.ready = Some(event.clone());
            }
            "change" => {
                assert!(self.ready.is_some(), "change before ready: {event:?}");
                if key() == "\"end\"" {
                    return true;
                }
                match event.data["operationType"].as_str().unwrap() {
                    "delete" => {
                        self.docs.remove(&key());
                    }
                    _ => {
                        // updateLookup: null when the document was deleted since (a delete follows).
                        let full = &event.data["fullDocument"];
                        if full.is_object() {
                            self.docs.insert(key(), full.clone());
                        }
                    }
                }
            }
            other => panic!("unexpected event {other}: {event:?}"),
        }
        false
    }
}

/// Reads `client` until the `end` marker's insert (or panics).
pub async fn apply_until_end(client: &mut Client, applied: &mut Applied) {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match client.next(remaining).await {
            Next::Event(event) => {
                if applied.apply(&event) {
                    return;
                }
            }
            other => panic!("before the end marker: {other:?}"),
        }
    }
}

#[tokio::test]
async fn snapshot_plus_changes_equals_the_collection_under_a_concurrent_writer() {
    let f = Fixture::start("snapshot_writer", |config| {
        config.streams[0].definition.pipeline = shaping_pipeline();
    })
    .await;
    seed(&f.coll, 300).await;
    // The worker runs before the writer starts, as it would on a live server.
    let mut first = f.connect(Kind::Sse).await;
    drop(first.next(Duration::from_millis(10)).await);
    let writer = tokio::spawn(random_writes(f.coll.clone(), 7, 1500, 300));
    // Clients arrive while the writer runs, on every transport.
    let mut clients = Vec::new();
    for kind in [Kind::Sse, Kind::Ws, Kind::Ndjson, Kind::Sse, Kind::Ws] {
        let path = format!("{}?snapshot=true", f.path);
        let client = Client::connect(kind, &f.server.url(""), &path, None)
            .await
            .unwrap();
        clients.push((kind, client, Applied::default()));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    writer.await.unwrap();
    f.coll.insert_one(doc! {"_id": "end"}).await.unwrap();
    let want = expected(&f.coll).await;
    for (kind, client, applied) in &mut clients {
        apply_until_end(client, applied).await;
        let ready = applied.ready.as_ref().expect("ready");
        assert_eq!(
            ready.data["count"].as_u64(),
            Some(applied.snapshot_events as u64),
            "{kind:?}"
        );
        assert!(ready.id.as_deref().is_some_and(|id| !id.is_empty()));
        assert_eq!(
            applied.docs, want,
            "{kind:?}: snapshot + changes != collection"
        );
        assert!(
            applied.docs.values().all(|d| d.get("secret").is_none()),
            "the pipeline shapes snapshot documents"
        );
    }
}

#[tokio::test]
async fn a_client_resumes_mid_snapshot_and_after_ready() {
    let f = Fixture::start("snapshot_resume", |config| {
        config.streams[0].definition.pipeline = shaping_pipeline();
    })
    .await;
    seed(&f.coll, 1000).await;
    let path = format!("{}?snapshot=true", f.path);
    let mut applied = Applied::default();
    let mut client = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
        .await
        .unwrap();
    while applied.snapshot_events < 300 {
        let event = client.expect_event(WAIT).await;
        applied.apply(&event);
    }
    drop(client);
    // Changes after the snapshot's time, some to documents already delivered, some not yet.
    random_writes(f.coll.clone(), 11, 300, 1000).await;
    let id = applied.last_id.clone().unwrap();
    let mut client = Client::connect(Kind::Sse, &f.server.url(""), &path, Some(&id))
        .await
        .unwrap();
    // The rest of the same snapshot (no document twice: `apply` checks), then ready, then
    // the writes above as changes.
    f.coll.insert_one(doc! {"_id": "end"}).await.unwrap();
    apply_until_end(&mut client, &mut applied).await;
    let ready = applied.ready.clone().unwrap();
    assert_eq!(
        ready.data["count"].as_u64(),
        Some(800),
        "every shown document once"
    );
    assert_eq!(applied.docs, expected(&f.coll).await);

    // Resuming from `ready`'s id gives the changes after the snapshot's time, no snapshot.
    drop(client);
    f.coll.insert_one(doc! {"_id": "end2"}).await.unwrap();
    let resumed = format!("{path}&lastEventId={}", ready.id.clone().unwrap());
    let mut client = Client::connect(Kind::Ndjson, &f.server.url(""), &resumed, None)
        .await
        .unwrap();
    let mut seen = 0;
    loop {
        let event = client.expect_event(WAIT).await;
        assert_eq!(event.event, "change", "no second snapshot: {event:?}");
        seen += 1;
        if event.data["documentKey"]["_id"] == "end2" {
            break;
        }
    }
    assert!(
        seen > 100,
        "the writes after the snapshot, then the markers: {seen}"
    );
}

#[tokio::test]
async fn snapshots_are_routed_by_variables_and_definitions_can_ask_for_them() {
    let f = Fixture::start("snapshot_routed", |config| {
        config.streams[0].definition.pipeline =
            json!([{ "$match": { "fullDocument.owner": { "$var": "who" } } }]);
        config.streams[0].definition.snapshot = true;
    })
    .await;
    let docs: Vec<Document> = (0..40)
        .map(|i| doc! {"_id": i, "owner": if i % 2 == 0 { "a" } else { "b" }})
        .collect();
    f.coll.insert_many(docs).await.unwrap();
    // No ?snapshot=true: the definition asks for it. `who` is routed in-process.
    let path = format!("{}?avars=%7B%22who%22%3A%22a%22%7D", f.path);
    let mut client = Client::connect(Kind::Ws, &f.server.url(""), &path, None)
        .await
        .unwrap();
    let mut ids = Vec::new();
    loop {
        let event = client.expect_event(WAIT).await;
        match event.event.as_str() {
            "snapshot" => ids.push(event.data["fullDocument"]["_id"].as_i64().unwrap()),
            "ready" => break,
            other => panic!("{other}"),
        }
    }
    assert_eq!(ids, (0..40).step_by(2).collect::<Vec<_>>());
    // ?snapshot=false opts out.
    let path = format!("{}?avars=%7B%22who%22%3A%22b%22%7D&snapshot=false", f.path);
    let mut plain = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
        .await
        .unwrap();
    f.coll
        .insert_one(doc! {"_id": 100, "owner": "b"})
        .await
        .unwrap();
    let event = plain.expect_event(WAIT).await;
    assert_eq!(event.event, "change");
    assert_eq!(event.data["fullDocument"]["_id"], 100);
    // A bad value is a 400.
    let bad = format!("{}?snapshot=maybe", f.path);
    let refused = Client::connect(Kind::Sse, &f.server.url(""), &bad, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 400);
}

#[tokio::test]
async fn a_snapshot_of_200k_documents_streams_in_bounded_memory() {
    let _memory = crate::harness::memory_heavy().await;
    let f = Fixture::start("snapshot_big", |_| {}).await;
    const N: i64 = 200_000;
    let docs: Vec<Document> = (0..N)
        .map(|i| doc! {"_id": i, "payload": "x".repeat(200)})
        .collect();
    for chunk in docs.chunks(20_000) {
        f.coll.insert_many(chunk.to_vec()).await.unwrap();
    }
    drop(docs);
    let path = format!("{}?snapshot=true", f.path);
    let before = crate::harness::rss_bytes();
    let mut client = Client::connect(Kind::Ndjson, &f.server.url(""), &path, None)
        .await
        .unwrap();
    let started = Instant::now();
    let (mut count, mut peak) = (0u64, before);
    loop {
        let event = client.expect_event(WAIT).await;
        if count % 5_000 == 0 {
            peak = peak.max(crate::harness::rss_bytes());
            // A slow start: the server must wait for this client, not buffer for it.
            if count < 20_000 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        match event.event.as_str() {
            "snapshot" => count += 1,
            "ready" => {
                assert_eq!(event.data["count"].as_u64(), Some(N as u64));
                break;
            }
            other => panic!("{other}: {event:?}"),
        }
    }
    let elapsed = started.elapsed();
    let growth = peak.saturating_sub(before);
    println!(
        "snapshot of {count} documents (~230 B each) in {elapsed:?}: {:.0} documents/s, RSS growth {} KiB",
        count as f64 / elapsed.as_secs_f64(),
        growth / 1024
    );
    assert_eq!(count, N as u64);
    assert!(growth < 50 * 1024 * 1024, "RSS grew by {growth} bytes");
}

/// Reads one `snapshot=true` client to `ready`; returns its snapshot event count.
async fn drain_snapshot(f: &Fixture) -> u64 {
    let path = format!("{}?snapshot=true", f.path);
    let mut client = Client::connect(Kind::Ndjson, &f.server.url(""), &path, None)
        .await
        .unwrap();
    let mut count = 0;
    loop {
        let event = client.expect_event(Duration::from_secs(120)).await;
        match event.event.as_str() {
            "snapshot" => count += 1,
            "ready" => return count,
            other => panic!("{other}"),
        }
    }
}

/// The number in docs/benchmarks.md: snapshot throughput to one client and to 100 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: cargo test --test it snapshot_throughput -- --ignored --nocapture"]
async fn snapshot_throughput() {
    const N: i64 = 20_000;
    let f = Fixture::start("snapshot_bench", |config| config.snapshot_max_scans = 100).await;
    let docs: Vec<Document> = (0..N)
        .map(|i| doc! {"_id": i, "name": format!("user {i}"), "score": i, "payload": "x".repeat(150)})
        .collect();
    f.coll.insert_many(docs).await.unwrap();
    drain_snapshot(&f).await; // warm the worker and the page cache
    let started = Instant::now();
    assert_eq!(drain_snapshot(&f).await, N as u64);
    let one = started.elapsed();
    println!(
        "1 client: {N} documents in {one:?} = {:.0} documents/s",
        N as f64 / one.as_secs_f64()
    );
    // 100 clients on a 2,000-document collection (every client is in this process too).
    const M: i64 = 2_000;
    f.coll.delete_many(doc! {"_id": {"$gte": M}}).await.unwrap();
    let started = Instant::now();
    let clients: Vec<_> = (0..100).map(|_| drain_snapshot(&f)).collect();
    let counts = futures::future::join_all(clients).await;
    let all = started.elapsed();
    assert!(counts.iter().all(|c| *c == M as u64));
    println!(
        "100 clients at once: {} documents in {all:?} = {:.0} documents/s in total, {:.0} per client",
        100 * M,
        (100 * M) as f64 / all.as_secs_f64(),
        M as f64 / all.as_secs_f64()
    );
}
