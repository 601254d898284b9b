//! Faults: mongod killed and restarted, slow consumers, dropped collections, lost history.

use std::time::Duration;

use mongodb::bson::{Document, doc};
use tokio::io::AsyncReadExt;

use crate::harness::clients::{Kind, Next, parse_raw_sse, stalled_sse};
use crate::harness::eventually;
use crate::harness::fixture::{Fixture, seqs};
use crate::harness::mongod::MongoD;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn mongod_killed_and_restarted_is_invisible_to_clients() {
    let mongo = tokio::task::spawn_blocking(MongoD::start).await.unwrap();
    let f = Fixture::start_on(&mongo, "kill", |_| {}).await;
    let mut sse = f.connect(Kind::Sse).await;
    let mut ws = f.connect(Kind::Ws).await;
    f.insert_seqs(0..5).await;
    assert_eq!(
        seqs(&sse.changes(5, WAIT).await),
        (0..5).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&ws.changes(5, WAIT).await), (0..5).collect::<Vec<_>>());

    let mongo = tokio::task::spawn_blocking(move || {
        mongo.kill();
        // On purpose, not a wait for a condition: down longer than the server-selection
        // timeout (5 s), so the driver's own one-shot resume gives up and Streamgate's
        // reconnect loop has to do the work.
        std::thread::sleep(Duration::from_secs(6));
        mongo.restart();
        mongo
    })
    .await
    .unwrap();

    f.insert_seqs(5..10).await;
    assert_eq!(
        seqs(&sse.changes(5, WAIT).await),
        (5..10).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&ws.changes(5, WAIT).await),
        (5..10).collect::<Vec<_>>()
    );
    // Nothing more (no duplicate replayed after the resume).
    assert!(matches!(
        sse.next(Duration::from_millis(700)).await,
        Next::Timeout
    ));
    assert!(
        f.server.metrics.worker_retries.get() >= 1,
        "the worker did reconnect"
    );
    f.server.stop().await;
    drop(mongo);
}

#[tokio::test]
async fn stalled_client_is_cut_while_fast_client_gets_everything() {
    // A reading client is never cut by how far behind it is; one whose socket takes no bytes
    // for `stall_timeout_secs` is.
    let f = Fixture::start("slow", |config| config.stall_timeout_secs = 2).await;
    let mut fast = f.connect(Kind::Sse).await;
    // Attached once its response head is in: no sleep needed before inserting.
    let (mut stalled, mut raw) = stalled_sse(f.server.addr, &f.path).await;

    const N: i64 = 1000;
    let padding = "x".repeat(16 * 1024);
    let docs: Vec<Document> = (0..N)
        .map(|seq| doc! { "seq": seq, "pad": &padding })
        .collect();
    let reader = tokio::spawn(async move {
        let events = fast.changes(N as usize, WAIT).await;
        (fast, events)
    });
    // Paced so a reading client never lags 64 events; the stalled one lags without bound.
    for chunk in docs.chunks(8) {
        f.coll.insert_many(chunk.to_vec()).await.unwrap();
        // On purpose: pacing the writer (not waiting for a condition).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_fast, events) = reader.await.unwrap();
    assert_eq!(
        seqs(&events),
        (0..N).collect::<Vec<_>>(),
        "fast client got everything in order"
    );

    // Once the deadline has cut it (counted as a slow consumer), read what the stalled client
    // was sent: a gap-free prefix, then EOF.
    eventually("the stalled client is cut", WAIT, async || {
        f.server.metrics.slow_consumers.get() >= 1
    })
    .await;
    tokio::time::timeout(WAIT, stalled.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let frames = parse_raw_sse(&String::from_utf8_lossy(&raw));
    let changes: Vec<_> = frames.iter().filter(|f| f.1 == "change").collect();
    if let Some(last) = frames.last().filter(|f| f.1 != "change") {
        assert_eq!(last.1, "error");
        assert_eq!(last.2["code"], "slow_consumer");
    }
    let got: Vec<i64> = changes
        .iter()
        .map(|f| f.2["fullDocument"]["seq"].as_i64().unwrap())
        .collect();
    assert!(
        (got.len() as i64) < N,
        "the stalled client was cut before the end"
    );
    assert_eq!(got, (0..got.len() as i64).collect::<Vec<_>>());

    // It resumes from its last id and gets the rest.
    let last_id = changes
        .iter()
        .last()
        .and_then(|f| f.0.clone())
        .expect("stalled client got some events first");
    let mut resumed = f.resume(Kind::Sse, &last_id).await;
    let rest = resumed.changes((N as usize) - got.len(), WAIT).await;
    assert_eq!(seqs(&rest), (got.len() as i64..N).collect::<Vec<_>>());
    f.server.stop().await;
}

#[tokio::test]
async fn burst_larger_than_live_buffer_reaches_every_client() {
    let f = Fixture::start("burst", |_| {}).await;
    let mut clients = Vec::new();
    for kind in [Kind::Sse, Kind::Ws, Kind::Ndjson] {
        clients.push(f.connect(kind).await);
    }
    // One insert_many: the worker publishes 3,000 events as fast as MongoDB returns them,
    // far more than the 1,024 live slots; clients catch up from the ring instead of being cut.
    const N: i64 = 3000;
    f.coll
        .insert_many((0..N).map(|seq| doc! { "seq": seq }))
        .await
        .unwrap();
    for client in &mut clients {
        assert_eq!(
            seqs(&client.changes(N as usize, WAIT).await),
            (0..N).collect::<Vec<_>>()
        );
    }
    assert_eq!(f.server.metrics.slow_consumers.get(), 0);
    f.server.stop().await;
}

#[tokio::test]
async fn a_reader_lapped_past_the_ring_goes_through_a_catch_up_and_rejoins_live() {
    // A 1,000-event ring: 3,000 changes lap it (and the live channel) three times over, as
    // 30,000 would the default 10,000-event ring, in a tenth of the time.
    let f = Fixture::start("lapped", |config| config.ring_size = 1_000).await;
    let mut fast = f.connect(Kind::Sse).await;
    let mut late = f.connect(Kind::Ws).await;
    const N: i64 = 3_000;
    let reader = tokio::spawn(async move {
        let events = fast.changes(N as usize, WAIT * 4).await;
        (fast, events)
    });
    for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
        f.coll
            .insert_many(chunk.iter().map(|seq| doc! { "seq": seq }))
            .await
            .unwrap();
    }
    // The late client reads nothing until the worker has published all 20,000: it is behind
    // the live channel and behind the ring, and must still get everything, in order.
    let worker = f.worker();
    eventually("the worker received the burst", WAIT * 4, async || {
        worker
            .stats
            .events
            .load(std::sync::atomic::Ordering::Relaxed)
            >= N as u64
    })
    .await;
    let (_fast, events) = reader.await.unwrap();
    assert_eq!(seqs(&events), (0..N).collect::<Vec<_>>());
    assert_eq!(
        seqs(&late.changes(N as usize, WAIT * 4).await),
        (0..N).collect::<Vec<_>>()
    );
    let metrics = &f.server.metrics;
    assert!(metrics.lag_recoveries.get() >= 1, "the ring path ran");
    assert!(metrics.catchups.get() >= 1, "the catch-up path ran");
    // And it is live again: the next insert arrives.
    f.coll.insert_one(doc! { "seq": N }).await.unwrap();
    assert_eq!(seqs(&late.changes(1, WAIT).await), vec![N]);
    assert_eq!(metrics.slow_consumers.get(), 0);
    f.server.stop().await;
}

#[tokio::test]
async fn dropped_collection_invalidates_and_closes() {
    let f = Fixture::start("drop", |_| {}).await;
    f.insert_seqs(0..1).await;
    let mut sse = f.connect(Kind::Sse).await;
    let mut ws = f.connect(Kind::Ws).await;
    f.coll.drop().await.unwrap();
    for client in [&mut sse, &mut ws] {
        let drop_event = client.expect_event(WAIT).await;
        assert_eq!(drop_event.event, "change");
        assert_eq!(drop_event.data["operationType"], "drop");
        let invalidate = client.expect_event(WAIT).await;
        assert_eq!(invalidate.event, "invalidate");
        assert!(invalidate.id.is_some());
    }
    assert!(matches!(sse.next(WAIT).await, Next::End(None)));
    assert!(matches!(ws.next(WAIT).await, Next::End(Some(1000))));
    f.server.stop().await;
}

#[tokio::test]
async fn history_lost_sends_error_then_empty_id_and_closes() {
    let f = Fixture::start("lost", |_| {}).await;
    let mut client = f.connect(Kind::Sse).await;
    f.insert_seqs(0..1).await;
    let real = client.changes(1, WAIT).await[0].id.clone().unwrap();
    // Same token, cluster time moved back to 1970: long gone from the oplog.
    let ancient = format!("82{}{}", "0000000100000001", &real[18..]);

    for kind in [Kind::Sse, Kind::Ws] {
        let mut lost = f.resume(kind, &ancient).await;
        let error = lost.expect_event(WAIT).await;
        assert_eq!(error.event, "error");
        assert_eq!(error.data["code"], "history_lost");
        if kind == Kind::Sse {
            assert_eq!(
                error.id.as_deref(),
                Some(""),
                "SSE resets the browser's last id"
            );
        }
        let end = lost.next(WAIT).await;
        match kind {
            Kind::Ws => assert!(matches!(end, Next::End(Some(4010))), "{end:?}"),
            _ => assert!(matches!(end, Next::End(None)), "{end:?}"),
        }
    }
    f.server.stop().await;
}

/// A server on a replica set of its own that is then killed (restart it to end the outage).
/// Its MongoDB client gives up selecting a server after 1 s, so a cursor's first open fails
/// well within the registry's ready timeout.
async fn during_an_outage(prefix: &str) -> (Fixture, MongoD) {
    let mongo = tokio::task::spawn_blocking(MongoD::start).await.unwrap();
    let f = Fixture::start_on(&mongo, prefix, |config| {
        let separator = if config.mongo_uri.contains('?') {
            '&'
        } else {
            '?'
        };
        config.mongo_uri = format!(
            "{}{separator}serverSelectionTimeoutMS=1000",
            config.mongo_uri
        );
    })
    .await;
    let mongo = mongo.killed().await;
    (f, mongo)
}

#[tokio::test]
async fn a_first_subscribe_waits_out_an_outage_instead_of_failing_at_once() {
    // Issue 9 item 9: a transient error while the first cursor opens is waited out (up to the
    // ready timeout), not answered 503 on the first failure.
    let (f, mongo) = during_an_outage("ready_outage").await;
    let registry = f.server.registry.clone();
    let key = f.key();
    let started = std::time::Instant::now();
    let subscribe = tokio::spawn(async move {
        registry
            .subscribe(&key, None, None, Default::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let _mongo = tokio::task::spawn_blocking(move || {
        // On purpose: down past the first open's server-selection timeout (1 s).
        std::thread::sleep(Duration::from_millis(3000));
        mongo.restart();
        mongo
    })
    .await
    .unwrap();
    let result = subscribe.await.unwrap();
    assert!(result.is_ok(), "{result:?} after {:?}", started.elapsed());
    assert!(
        f.server.metrics.worker_retries.get() >= 1,
        "the first open failed and was retried"
    );
    f.server.stop().await;
}

#[tokio::test]
async fn a_subscribe_abandoned_while_the_cursor_opens_leaves_no_client_behind() {
    // Issue 9 item 5: with MongoDB down the first subscribe waits in `ready`; a client that
    // leaves then (a WebSocket closed while the cursor opens) must not leave its count behind,
    // or the worker never lingers out.
    let mongo = tokio::task::spawn_blocking(MongoD::start).await.unwrap();
    let f = Fixture::start_on(&mongo, "abandon", |_| {}).await;
    let mongo = mongo.killed().await;
    let registry = f.server.registry.clone();
    let key = f.key();
    let attempt = tokio::spawn(async move {
        let _ = registry
            .subscribe(&key, None, None, Default::default())
            .await;
    });
    eventually("the worker started", WAIT, async || {
        !f.server.registry.workers_of(&f.key()).is_empty()
    })
    .await;
    let worker = f.worker();
    assert_eq!(worker.client_count(), 1);
    attempt.abort();
    let _ = attempt.await;
    assert_eq!(
        worker.client_count(),
        0,
        "the abandoned client is uncounted"
    );
    eventually("the worker lingered out", WAIT, async || {
        f.server.registry.workers_of(&f.key()).is_empty()
    })
    .await;
    drop(mongo);
    f.server.stop().await;
}

/// A subscribe that meets the server's shutdown (here: while its worker still waits for an
/// unreachable MongoDB) gets `200` with only `retry:` over SSE, so a browser's `EventSource`
/// reconnects to the next instance. The 503 it used to get ends an `EventSource` for good.
#[tokio::test]
async fn an_sse_subscribe_during_shutdown_is_told_to_reconnect() {
    let (f, mongo) = during_an_outage("shutdown_goodbye").await;
    let url = f.server.url(&f.path);
    let request = tokio::spawn(async move {
        let response = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        (status, content_type, response.text().await.unwrap())
    });
    let (registry, key) = (f.server.registry.clone(), f.key());
    eventually("the subscribe waits for its worker", WAIT, async || {
        !registry.workers_of(&key).is_empty()
    })
    .await;
    f.server.stop().await;
    let (status, content_type, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/event-stream");
    assert_eq!(body, format!("retry: {}\n\n", f.config.sse_retry_ms));
    drop(mongo);
}

#[tokio::test]
async fn a_large_batch_does_not_hold_the_runtime_thread() {
    // The worker must hand the runtime back while it works through a batch the driver already
    // holds: otherwise every client, timer and expiry on its thread waits for the whole batch
    // (16 MB, some 100,000 small changes). Counted, not timed: a probe task on this test's
    // single-threaded runtime records how many changes the worker applied between two of its
    // turns.
    let f = Fixture::start("big_batch", |_| {}).await;
    let mut client = f.connect(Kind::Ndjson).await;
    f.insert_seqs(0..1).await;
    assert_eq!(seqs(&client.changes(1, WAIT).await), vec![0]);
    let worker = f.worker();
    let events = || {
        worker
            .stats
            .events
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Insert from another thread while this runtime is blocked, so the worker finds thousands
    // of changes waiting and gets them in one or two large batches. 5,000: twice the bound
    // below, so a worker that applied a whole batch without a turn fails it.
    const N: i64 = 5_000;
    let uri = f.config.mongo_uri.clone();
    let db = f.db.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mongo = mongodb::Client::with_uri_str(&uri).await.unwrap();
            mongo
                .database(&db)
                .collection::<Document>("c")
                .insert_many((1..=N).map(|seq| doc! { "seq": seq }))
                .await
                .unwrap();
        });
    })
    .join()
    .unwrap();
    let mut most = 0;
    let mut last = events();
    let deadline = tokio::time::Instant::now() + WAIT;
    while last < 1 + N as u64 {
        assert!(tokio::time::Instant::now() < deadline, "applied {last}");
        tokio::task::yield_now().await;
        let now = events();
        most = most.max(now - last);
        last = now;
    }
    assert!(
        most <= 2_500,
        "{most} changes applied without a turn for anybody else"
    );
    assert_eq!(
        seqs(&client.changes(N as usize, WAIT).await),
        (1..=N).collect::<Vec<_>>()
    );
    f.server.stop().await;
}
