//! Snapshots share the server fairly (PROTOCOL.md §6–§8): a scan holds a slot only while
//! MongoDB reads a batch, so clients that stop reading hold none; a connection's snapshot
//! queue and the document view's `put` are bounded in bytes; a snapshot in progress counts
//! against `per_ip`/`per_user`; a snapshot whose cluster time ages out ends with
//! `history_lost`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use serde_json::json;
use streamgate::config::Config;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::clients::{Client, Kind, Next};
use crate::harness::eventually;
use crate::harness::fixture::Fixture;
use crate::harness::mongod::{self, MongoD};
use crate::harness::server::{self, TestServer};
use crate::harness::unique_db;

const WAIT: Duration = Duration::from_secs(30);

/// `n` documents `{_id: i, p: "x" × bytes}` in `coll`, inserted in chunks of about 8 MB.
async fn fill(coll: &mongodb::Collection<Document>, n: i64, bytes: usize) {
    let per_chunk = i64::try_from(8_000_000 / bytes.max(1)).unwrap_or(1).max(1);
    let mut start = 0;
    while start < n {
        // One chunk in memory at a time (the memory test measures this process).
        let chunk =
            (start..n.min(start + per_chunk)).map(|i| doc! {"_id": i, "p": "x".repeat(bytes)});
        coll.insert_many(chunk).await.unwrap();
        start += per_chunk;
    }
}

/// A client that sends a subscribe request and never reads a byte of the answer.
async fn never_reading(server: &TestServer, path: &str) -> TcpStream {
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/x-ndjson\r\n\r\n",
        server.addr
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    socket
}

/// Reads a `snapshot=true` client to `ready`: `(snapshot events, ready's count)`.
async fn to_ready(client: &mut Client) -> (u64, u64) {
    let mut seen = 0;
    loop {
        let event = client.expect_event(WAIT).await;
        match event.event.as_str() {
            "snapshot" => seen += 1,
            "ready" => return (seen, event.data["count"].as_u64().unwrap()),
            other => panic!("{other}: {event:?}"),
        }
    }
}

#[tokio::test]
async fn never_reading_snapshot_clients_hold_no_scan_slot() {
    let _memory = crate::harness::memory_heavy().await;
    // A small queue so the abusers stall quickly; the slots are the default 8.
    let f = Fixture::start("snapfair_slots", |config| {
        config.snapshot_queue_bytes = 1024 * 1024;
        let db = config.streams[0].db.clone();
        config
            .streams
            .push(server::stream(&db, "small", "small", json!([])));
    })
    .await;
    assert_eq!(f.config.snapshot_max_scans, 8);
    // 30 MB: more than a stalled client's queue and socket buffers hold.
    fill(&f.coll, 3_000, 10_000).await;
    let small = f.coll.client().database(&f.db).collection("small");
    fill(&small, 50, 100).await;
    // Eight clients take a snapshot of the large stream and never read.
    let path = format!("{}?snapshot=true", f.path);
    let mut abusers = Vec::new();
    for _ in 0..8 {
        abusers.push(never_reading(&f.server, &path).await);
    }
    let metrics = f.server.metrics.clone();
    // They stall: their queues fill and no scan goes on for them.
    eventually("the abusers' queues fill", WAIT, async || {
        metrics.snapshot_queued_bytes.get() >= 8 * 512 * 1024
    })
    .await;
    eventually("no scan slot held", WAIT, async || {
        metrics.snapshot_scans_active.get() == 0
    })
    .await;
    // Everybody else is served at once: a snapshot, and the document view.
    let started = Instant::now();
    let small_path = format!("/{}/small/_streams/small", f.db);
    let mut client = Client::connect(
        Kind::Sse,
        &f.server.url(""),
        &format!("{small_path}?snapshot=true"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(to_ready(&mut client).await, (50, 50));
    let mut view = Client::connect(
        Kind::Sse,
        &f.server.url(""),
        &format!("{small_path}.json"),
        None,
    )
    .await
    .unwrap();
    let put = view.expect_event(WAIT).await;
    assert_eq!(put.data["data"].as_object().map(|m| m.len()), Some(50));
    let elapsed = started.elapsed();
    println!("beside 8 stalled snapshots: a snapshot and a view served in {elapsed:?}");
    // Before, they waited 5 s for a slot and got 503.
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    // The large stream too, for a client that reads.
    let mut reader = Client::connect(Kind::Ndjson, &f.server.url(""), &path, None)
        .await
        .unwrap();
    assert_eq!(to_ready(&mut reader).await, (3_000, 3_000));
    // The abusers are still there, still holding nothing.
    assert_eq!(metrics.snapshot_scans_active.get(), 0);
    drop(abusers);
    eventually("the abusers' queues are freed", WAIT, async || {
        metrics.snapshot_queued_bytes.get() == 0
    })
    .await;
}

/// A `/_streams` config with `n` streams `s0..` on collections `c0..` of one database.
fn many_streams(n: usize, tweak: impl FnOnce(&mut Config)) -> (Config, String) {
    let db = unique_db("snapfair_multi");
    let mut config = server::config(mongod::shared());
    for i in 0..n {
        config.streams.push(server::stream(
            &db,
            &format!("c{i}"),
            &format!("s{i}"),
            json!([]),
        ));
    }
    tweak(&mut config);
    (config, db)
}

/// Reads a multi-stream connection until every stream sent `ready`; checks each stream's
/// snapshot count.
async fn all_ready(client: &mut Client, streams: usize, per_stream: u64) {
    let mut counts = std::collections::HashMap::<String, u64>::new();
    let mut ready = 0;
    while ready < streams {
        let event = client.expect_event(WAIT).await;
        let stream = event.stream.clone().expect("a stream");
        match event.event.as_str() {
            "snapshot" => *counts.entry(stream).or_default() += 1,
            "ready" => {
                assert_eq!(event.data["count"].as_u64(), Some(per_stream), "{stream}");
                assert_eq!(counts.get(&stream).copied().unwrap_or(0), per_stream);
                ready += 1;
            }
            other => panic!("{other}: {event:?}"),
        }
    }
}

#[tokio::test]
async fn a_multi_stream_snapshot_over_more_streams_than_scan_slots_completes() {
    // 12 streams of 1,000 documents: more streams than slots (8), more documents each than
    // a queue held before (512 events).
    let (config, db) = many_streams(12, |_| {});
    let server = TestServer::start(config).await;
    let client = mongod::shared().client().await;
    for i in 0..12 {
        fill(
            &client.database(&db).collection(&format!("c{i}")),
            1_000,
            200,
        )
        .await;
    }
    let list: Vec<String> = (0..12)
        .map(|i| format!("/{db}/c{i}/_streams/s{i}"))
        .collect();
    let path = format!("/_streams?streams={}&snapshot=true", list.join(","));
    let started = Instant::now();
    let mut connection = Client::connect(Kind::Ndjson, &server.url(""), &path, None)
        .await
        .unwrap();
    all_ready(&mut connection, 12, 1_000).await;
    println!(
        "12 × 1,000 documents on one connection in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_multi_stream_snapshot_over_100_streams_completes() {
    let (config, db) = many_streams(100, |_| {});
    assert_eq!(config.limits.max_streams_per_connection, 100);
    let server = TestServer::start(config).await;
    let client = mongod::shared().client().await;
    for i in 0..100 {
        fill(&client.database(&db).collection(&format!("c{i}")), 5, 100).await;
    }
    let list: Vec<String> = (0..100)
        .map(|i| format!("/{db}/c{i}/_streams/s{i}"))
        .collect();
    let path = format!("/_streams?streams={}&snapshot=true", list.join(","));
    let started = Instant::now();
    let mut connection = Client::connect(Kind::Ws, &server.url(""), &path, None)
        .await
        .unwrap();
    all_ready(&mut connection, 100, 5).await;
    println!(
        "100 streams × 5 documents on one connection in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_snapshot_in_progress_counts_against_per_ip() {
    let f = Fixture::start("snapfair_per_ip", |config| {
        config.limits.per_ip = Some(3);
        config.snapshot_queue_bytes = 64 * 1024;
        let db = config.streams[0].db.clone();
        config
            .streams
            .push(server::stream(&db, "small", "small", json!([])));
    })
    .await;
    fill(&f.coll, 2_000, 10_000).await;
    let small = f.coll.client().database(&f.db).collection("small");
    fill(&small, 3, 10).await;
    let small_path = format!("/{}/small/_streams/small", f.db);
    // A snapshot in progress: its connection and its snapshot, 2 of the address's 3.
    let path = format!("{}?snapshot=true", f.path);
    let stalled = never_reading(&f.server, &path).await;
    let metrics = f.server.metrics.clone();
    eventually("the snapshot stalls", WAIT, async || {
        metrics.snapshot_queued_bytes.get() > 0
    })
    .await;
    // A second snapshot gets its connection (the 3rd) but not its snapshot: 429.
    let refused = Client::connect(
        Kind::Sse,
        &f.server.url(""),
        &format!("{small_path}?snapshot=true"),
        None,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(refused.status, 429, "{refused:?}");
    assert!(refused.body.contains("per_ip"), "{}", refused.body);
    assert!(refused.body.contains("snapshot"), "{}", refused.body);
    // A plain connection still fits (3 of 3), and one more does not.
    let plain = Client::connect(Kind::Sse, &f.server.url(""), &small_path, None)
        .await
        .unwrap();
    let over = Client::connect(Kind::Sse, &f.server.url(""), &small_path, None)
        .await
        .err()
        .unwrap();
    assert_eq!(over.status, 429);
    drop((stalled, plain));
    // A snapshot that is done gives its permit back: 2 snapshot clients read to `ready`
    // one after the other, then hold only their connections (2 of 3), so a third fits.
    let mut done = Vec::new();
    for _ in 0..2 {
        let mut client = eventually_connect(&f, &format!("{small_path}?snapshot=true")).await;
        assert_eq!(to_ready(&mut client).await, (3, 3));
        done.push(client);
    }
    eventually_connect(&f, &small_path).await;
}

/// Connects once the server has seen earlier clients leave (their permits are given back
/// when the server notices).
async fn eventually_connect(f: &Fixture, path: &str) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::connect(Kind::Sse, &f.server.url(""), path, None).await {
            Ok(client) => return client,
            Err(refused) if refused.status == 429 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(refused) => panic!("{refused:?}"),
        }
    }
}

#[tokio::test]
async fn a_stalled_snapshot_whose_cluster_time_ages_out_ends_with_history_lost() {
    // A replica set of its own: the history window is shortened for the whole mongod.
    let mongo = MongoD::start();
    let admin = mongo.client().await.database("admin");
    admin
        .run_command(doc! {"setParameter": 1, "minSnapshotHistoryWindowInSeconds": 1})
        .await
        .unwrap();
    let f = Fixture::start_on(&mongo, "snapfair_expiry", |config| {
        config.snapshot_queue_bytes = 64 * 1024;
    })
    .await;
    fill(&f.coll, 2_000, 10_000).await;
    let path = format!("{}?snapshot=true", f.path);
    let mut client = Client::connect(Kind::Ndjson, &f.server.url(""), &path, None)
        .await
        .unwrap();
    assert_eq!(client.expect_event(WAIT).await.event, "snapshot");
    // The client stops reading; its scan stalls on its queue.
    let metrics = f.server.metrics.clone();
    eventually("the snapshot stalls", WAIT, async || {
        metrics.snapshot_queued_bytes.get() > 0 && metrics.snapshot_scans_active.get() == 0
    })
    .await;
    // Writes move MongoDB's oldest held time past T (window: 1 s).
    let other = f
        .coll
        .client()
        .database(&f.db)
        .collection::<Document>("other");
    for i in 0..30 {
        other.insert_one(doc! {"i": i}).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reading again: the rest of what was queued, then `history_lost`, no `ready`.
    loop {
        match client.next(WAIT).await {
            Next::Event(event) if event.event == "snapshot" => {}
            Next::Event(event) => {
                assert_eq!(event.event, "error", "{event:?}");
                assert_eq!(event.data["code"], "history_lost", "{event:?}");
                assert!(
                    event.data["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("snapshot=true")),
                    "{event:?}"
                );
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(client.next(WAIT).await, Next::End(_)));
}

#[tokio::test]
async fn the_document_view_put_is_bounded_in_bytes() {
    let _memory = crate::harness::memory_heavy().await;
    // Three documents of 1 MB: the `put`'s JSON is exactly this long.
    const DOC: usize = 1_000_000;
    let put_len = |payloads: &[usize]| {
        let entries: Vec<String> = payloads
            .iter()
            .enumerate()
            .map(|(i, n)| format!("\"{i}\":{{\"_id\":{i},\"p\":\"{}\"}}", "x".repeat(*n)))
            .collect();
        format!("{{\"path\":\"/\",\"data\":{{{}}}}}", entries.join(",")).len()
    };
    let bound = put_len(&[DOC, DOC, DOC]);
    let f = Fixture::start("snapfair_put", |config| {
        config.snapshot_max_put_bytes = bound;
    })
    .await;
    fill(&f.coll, 3, DOC).await;
    let path = format!("{}.json", f.path);
    // At the bound: served.
    let mut view = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
        .await
        .unwrap();
    let put = view.expect_event(WAIT).await;
    assert_eq!(put.data.to_string().len(), bound);
    drop(view);
    // One byte past it: 413, naming the setting.
    f.coll
        .update_one(doc! {"_id": 2}, doc! {"$set": {"p": "x".repeat(DOC + 1)}})
        .await
        .unwrap();
    let refused = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 413, "{refused:?}");
    assert!(refused.content_type.contains("problem+json"));
    let body: serde_json::Value = serde_json::from_str(&refused.body).unwrap();
    assert_eq!(body["limit"], "snapshot_max_put_bytes", "{body}");
}

#[tokio::test]
async fn never_reading_snapshots_of_1mb_documents_stay_within_the_queue_bound() {
    let _memory = crate::harness::memory_heavy().await;
    // Default settings: snapshot_queue_bytes = 8 MiB per connection.
    let f = Fixture::start("snapfair_rss", |_| {}).await;
    let queue = f.config.snapshot_queue_bytes;
    assert_eq!(queue, 8 * 1024 * 1024);
    // 48 documents of 1 MB: 96 MB of events per client if nothing bounded them.
    fill(&f.coll, 48, 1_000_000).await;
    let path = format!("{}?snapshot=true", f.path);
    let before = crate::harness::rss_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = tokio::spawn({
        let peak = Arc::clone(&peak);
        async move {
            loop {
                peak.fetch_max(crate::harness::rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    const CLIENTS: i64 = 4;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(never_reading(&f.server, &path).await);
    }
    let metrics = f.server.metrics.clone();
    // Each stalls with at least half its budget queued; none holds a slot.
    eventually("the clients' queues fill", WAIT, async || {
        metrics.snapshot_queued_bytes.get() >= CLIENTS * (queue as i64) / 2
            && metrics.snapshot_scans_active.get() == 0
    })
    .await;
    // Stalled for good: what is queued stays within the bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = metrics.snapshot_queued_bytes.get();
    assert!(queued <= CLIENTS * queue as i64, "{queued} bytes queued");
    sampler.abort();
    let peak = peak
        .load(Ordering::Relaxed)
        .max(crate::harness::rss_bytes());
    let growth = peak.saturating_sub(before);
    println!(
        "{CLIENTS} stalled snapshots of 1 MB documents: {} MiB queued, RSS growth {} MiB",
        queued >> 20,
        growth >> 20
    );
    // Per client: its queue, the batch its feed is writing (at most a queue's worth) and the
    // batch its scan read; 32 MiB of slack for the driver's replies and the allocator.
    let bound = CLIENTS as u64 * 3 * queue as u64 + 32 * 1024 * 1024;
    assert!(growth < bound, "RSS grew by {} MiB", growth >> 20);
    // A client that reads gets everything.
    let mut reader = Client::connect(Kind::Ndjson, &f.server.url(""), &path, None)
        .await
        .unwrap();
    assert_eq!(to_ready(&mut reader).await, (48, 48));
    drop(clients);
}

#[tokio::test]
async fn a_snapshot_id_with_a_lying_bson_length_is_a_400() {
    let f = Fixture::start("snapfair_badid", |_| {}).await;
    // `82` + T + `FE` + count + a BSON document claiming 2 GiB in 13 bytes.
    let at = "65A1B2C300000004";
    let id = format!("82{at}FE00000001FFFFFF7F1069000100000000");
    // With or without a snapshot asked for: before, the first was taken for a change
    // position and the second resumed from a position that is not one.
    for path in [format!("{}?snapshot=true", f.path), f.path.clone()] {
        let refused = Client::connect(Kind::Sse, &f.server.url(""), &path, Some(&id))
            .await
            .err()
            .unwrap_or_else(|| panic!("{path}: accepted"));
        assert_eq!(refused.status, 400, "{path}: {refused:?}");
    }
    let refused = Client::connect(
        Kind::Sse,
        &f.server.url(""),
        &format!("{}?snapshot=true", f.path),
        Some(&format!("82{at}FE00000001FFFFFF7F1069000100000000")),
    )
    .await
    .err()
    .unwrap();
    assert!(refused.body.contains("length"), "{}", refused.body);
}
