//! Database feeds (issue 8): the streams of one database whose pipelines only filter share ONE
//! change-stream cursor, routed by collection; joins, drops and refused filters stay exact.

use std::time::Duration;

use mongodb::bson::{Document, doc};
use serde_json::json;

use crate::harness::clients::{Client, Kind, Next};
use crate::harness::eventually;
use crate::harness::fixture::{Fixture, insert_seqs, seqs};
use crate::harness::mongod::{self, change_stream_cursors, database_change_stream_cursors};
use crate::harness::server;

const WAIT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(700);

async fn connect(f: &Fixture, coll: &str, name: &str, kind: Kind) -> Client {
    let path = format!("/{}/{coll}/_streams/{name}", f.db);
    Client::connect(kind, &f.server.url(""), &path, None)
        .await
        .unwrap()
}

async fn coll(f: &Fixture, name: &str) -> mongodb::Collection<Document> {
    mongod::shared()
        .client()
        .await
        .database(&f.db)
        .collection::<Document>(name)
}

#[tokio::test]
async fn streams_of_a_database_share_one_cursor_and_joins_lose_nothing() {
    let f = Fixture::start("feeds_share", |config| {
        let db = config.streams[0].db.clone();
        for c in ["c1", "c2", "c3"] {
            config.streams.push(server::stream(&db, c, "s", json!([])));
        }
        config.streams.push(server::stream(
            &db,
            "c4",
            "inserts",
            json!([{ "$match": { "operationType": "insert" } }]),
        ));
    })
    .await;
    let mut first = f.connect(Kind::Sse).await;
    // A writer on `c` while three more streams join (each join reopens the shared cursor).
    const N: i64 = 300;
    let writer = {
        let c = f.coll.clone();
        tokio::spawn(async move {
            for seq in 0..N {
                c.insert_one(doc! { "seq": seq }).await.unwrap();
                if seq % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut c1 = connect(&f, "c1", "s", Kind::Ws).await;
    let mut c2 = connect(&f, "c2", "s", Kind::Ndjson).await;
    let mut inserts = connect(&f, "c4", "inserts", Kind::Sse).await;
    writer.await.unwrap();
    assert_eq!(
        seqs(&first.changes(N as usize, WAIT).await),
        (0..N).collect::<Vec<_>>(),
        "the reader of `c` across three reopens"
    );
    first.expect_quiet(QUIET).await;

    // Each stream sees its own collection only, and `inserts` only its filter's changes.
    insert_seqs(&coll(&f, "c1").await, 0..3).await;
    insert_seqs(&coll(&f, "c2").await, 10..12).await;
    let c4 = coll(&f, "c4").await;
    insert_seqs(&c4, 20..22).await;
    c4.update_one(doc! { "seq": 20 }, doc! { "$set": { "x": 1 } })
        .await
        .unwrap();
    insert_seqs(&c4, 22..23).await;
    assert_eq!(seqs(&c1.changes(3, WAIT).await), vec![0, 1, 2]);
    assert_eq!(seqs(&c2.changes(2, WAIT).await), vec![10, 11]);
    assert_eq!(seqs(&inserts.changes(3, WAIT).await), vec![20, 21, 22]);
    for client in [&mut first, &mut c1, &mut c2, &mut inserts] {
        client.expect_quiet(QUIET).await;
    }

    // Five streams on five collections: one cursor on MongoDB (the database's), none of a
    // collection's own.
    // (`$currentOp` samples a cursor idle or inside a getMore: each count is retried.)
    let mongo = mongod::shared().client().await;
    eventually("one cursor on MongoDB", WAIT, async || {
        database_change_stream_cursors(&mongo, &f.db).await == 1
    })
    .await;
    for c in ["c", "c1", "c2", "c4"] {
        eventually(
            &format!("only the database's cursor for {c}"),
            WAIT,
            async || change_stream_cursors(&mongo, &f.db, c).await == 1,
        )
        .await;
    }
    assert_eq!(f.server.metrics.database_feeds.get(), 1);
    f.server.stop().await;
}

#[tokio::test]
async fn a_dropped_collection_ends_its_streams_and_the_others_go_on() {
    let f = Fixture::start("feeds_drop", |config| {
        let db = config.streams[0].db.clone();
        config
            .streams
            .push(server::stream(&db, "gone", "s", json!([])));
        config.streams.push(server::stream(
            &db,
            "gone",
            "inserts",
            json!([{ "$match": { "operationType": "insert" } }]),
        ));
    })
    .await;
    let mut stays = f.connect(Kind::Sse).await;
    let mut all = connect(&f, "gone", "s", Kind::Sse).await;
    let gone = coll(&f, "gone").await;
    insert_seqs(&gone, 0..1).await;
    assert_eq!(seqs(&all.changes(1, WAIT).await), vec![0]);
    // Same collection, another filter: a cursor of its own (one filter per collection).
    let mut filtered = connect(&f, "gone", "inserts", Kind::Ws).await;
    assert_eq!(f.server.metrics.database_feeds.get(), 1);
    let mongo = mongod::shared().client().await;
    eventually(
        "the feed and the filtered stream's own cursor",
        WAIT,
        async || database_change_stream_cursors(&mongo, &f.db).await == 2,
    )
    .await;
    gone.drop().await.unwrap();

    let drop_event = all.expect_event(WAIT).await;
    assert_eq!(drop_event.data["operationType"], "drop");
    let invalidate = all.expect_event(WAIT).await;
    assert_eq!(invalidate.event, "invalidate");
    assert!(invalidate.id.is_some());
    assert!(matches!(all.next(WAIT).await, Next::End(_)));
    // The filtered stream gets no `drop` (its filter takes inserts only), just the end.
    let end = filtered.expect_event(WAIT).await;
    assert_eq!(end.event, "invalidate");

    insert_seqs(&f.coll, 0..3).await;
    assert_eq!(seqs(&stays.changes(3, WAIT).await), vec![0, 1, 2]);
    stays.expect_quiet(QUIET).await;
    f.server.stop().await;
}

/// Filtering streams on the feed end as their own collection cursors would: the `drop` if
/// their `$match` takes it (MongoDB says, over `$documents`), then the `invalidate`.
#[tokio::test]
async fn filtering_streams_get_the_drop_only_if_their_match_takes_it() {
    let f = Fixture::start("feeds_drop_filtered", |config| {
        let db = config.streams[0].db.clone();
        config.streams.push(server::stream(
            &db,
            "takes",
            "s",
            json!([{ "$match": { "operationType": { "$in": ["insert", "drop"] } } }]),
        ));
        config.streams.push(server::stream(
            &db,
            "skips",
            "s",
            json!([{ "$match": { "operationType": "insert" } }]),
        ));
    })
    .await;
    let mut takes = connect(&f, "takes", "s", Kind::Sse).await;
    let mut skips = connect(&f, "skips", "s", Kind::Ndjson).await;
    let mut stays = f.connect(Kind::Sse).await;
    assert_eq!(f.server.metrics.database_feeds.get(), 1);
    let mongo = mongod::shared().client().await;
    // The joins' reopens leave their cancelled getMore's cursor for up to 100 ms.
    eventually("one cursor for the three streams", WAIT, async || {
        database_change_stream_cursors(&mongo, &f.db).await == 1
    })
    .await;
    for (name, client) in [("takes", &mut takes), ("skips", &mut skips)] {
        let c = coll(&f, name).await;
        insert_seqs(&c, 0..1).await;
        assert_eq!(seqs(&client.changes(1, WAIT).await), vec![0]);
        c.drop().await.unwrap();
    }
    let drop_event = takes.expect_event(WAIT).await;
    assert_eq!(drop_event.data["operationType"], "drop", "{drop_event:?}");
    assert_eq!(takes.expect_event(WAIT).await.event, "invalidate");
    assert!(matches!(takes.next(WAIT).await, Next::End(_)));
    assert_eq!(skips.expect_event(WAIT).await.event, "invalidate");
    assert!(matches!(skips.next(WAIT).await, Next::End(_)));

    insert_seqs(&f.coll, 0..2).await;
    assert_eq!(seqs(&stays.changes(2, WAIT).await), vec![0, 1]);
    f.server.stop().await;
}

#[tokio::test]
async fn a_match_mongodb_refuses_fails_its_stream_alone() {
    let f = Fixture::start("feeds_refused", |config| {
        let db = config.streams[0].db.clone();
        // An invalid regular expression: MongoDB refuses the pipeline when the cursor opens.
        config.streams.push(server::stream(
            &db,
            "bad",
            "s",
            json!([{ "$match": { "fullDocument.name": { "$regex": "(" } } }]),
        ));
    })
    .await;
    let mut good = f.connect(Kind::Sse).await;
    insert_seqs(&f.coll, 0..2).await;
    assert_eq!(seqs(&good.changes(2, WAIT).await), vec![0, 1]);

    let path = format!("/{}/bad/_streams/s", f.db);
    match Client::connect(Kind::Sse, &f.server.url(""), &path, None).await {
        Ok(mut bad) => {
            let error = bad.expect_event(WAIT).await;
            assert_eq!(error.event, "error", "{error:?}");
        }
        Err(refused) => assert_ne!(refused.status, 500, "{refused:?}"),
    }
    // The shared cursor went on for the good stream, without a gap.
    assert_eq!(f.server.metrics.database_feeds.get(), 1);
    insert_seqs(&f.coll, 2..5).await;
    assert_eq!(seqs(&good.changes(3, WAIT).await), vec![2, 3, 4]);
    good.expect_quiet(QUIET).await;
    f.server.stop().await;
}

/// A `$match` MongoDB accepts but that fails on some changes (issue 23, row 1).
fn poison_stream(db: &str) -> streamgate::config::StreamConfig {
    server::stream(
        db,
        "b",
        "s",
        json!([{ "$match": { "$expr": { "$eq": [{ "$toInt": "$fullDocument.code" }, 5] } } }]),
    )
}

/// Asserts the next event is the error a cursor of the poison stream's own gives on `{code: "x"}`.
async fn expect_poison_error(client: &mut Client) {
    let error = client.expect_event(WAIT).await;
    assert_eq!(error.event, "error", "{error:?}");
    assert_eq!(error.data["code"], "upstream_error", "{error:?}");
    let message = error.data["message"].as_str().unwrap_or_default();
    assert!(message.contains("Failed to parse number 'x'"), "{error:?}");
    assert!(matches!(client.next(WAIT).await, Next::End(_)));
}

/// One stream's `$match` fails on a change at `getMore` time (not when the cursor opens): its
/// own clients get the error its own cursor gives; the plain stream on another collection of
/// the same feed, and another stream whose `$match` evaluates expressions but does not fail
/// (a suspect the probes clear), get every change once, in order, and no error.
#[tokio::test]
async fn a_match_that_fails_on_a_change_fails_its_stream_alone() {
    let f = Fixture::start("feeds_poison", |config| {
        let db = config.streams[0].db.clone();
        config.streams.push(poison_stream(&db));
        config.streams.push(server::stream(
            &db,
            "e",
            "s",
            json!([{ "$match": { "$expr": { "$gte": ["$fullDocument.seq", 0] } } }]),
        ));
    })
    .await;
    let mut good = f.connect(Kind::Sse).await;
    let mut bad = connect(&f, "b", "s", Kind::Sse).await;
    let mut expr = connect(&f, "e", "s", Kind::Ndjson).await;
    assert_eq!(f.server.metrics.database_feeds.get(), 1);
    let mongo = mongod::shared().client().await;
    eventually("one cursor for the three streams", WAIT, async || {
        database_change_stream_cursors(&mongo, &f.db).await == 1
    })
    .await;

    let (b, e) = (coll(&f, "b").await, coll(&f, "e").await);
    f.insert_seqs(0..3).await;
    insert_seqs(&e, 0..2).await;
    b.insert_one(doc! { "code": "5", "seq": 100 })
        .await
        .unwrap();
    b.insert_one(doc! { "code": "x", "seq": 101 })
        .await
        .unwrap();
    f.insert_seqs(3..6).await;
    insert_seqs(&e, 2..4).await;

    assert_eq!(
        seqs(&good.changes(6, WAIT).await),
        (0..6).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&expr.changes(4, WAIT).await), vec![0, 1, 2, 3]);
    assert_eq!(seqs(&bad.changes(1, WAIT).await), vec![100]);
    expect_poison_error(&mut bad).await;
    good.expect_quiet(QUIET).await;
    expr.expect_quiet(QUIET).await;
    assert_eq!(f.server.metrics.database_feed_isolations.get(), 1);

    // The feed goes on for the others, still one cursor for both.
    f.insert_seqs(6..8).await;
    insert_seqs(&e, 4..5).await;
    assert_eq!(seqs(&good.changes(2, WAIT).await), vec![6, 7]);
    assert_eq!(seqs(&expr.changes(1, WAIT).await), vec![4]);
    good.expect_quiet(QUIET).await;
    eventually("the feed's cursor alone", WAIT, async || {
        database_change_stream_cursors(&mongo, &f.db).await == 1
    })
    .await;
    f.server.stop().await;
}

/// A poison write after every reconnect of the failing stream's client: the stream is taken
/// out of the feed once and never rejoins it, so the others see no error, no gap, and the
/// feed is not reopened for it again.
#[tokio::test]
async fn a_stream_that_failed_the_feed_does_not_rejoin_it() {
    let f = Fixture::start("feeds_poison_again", |config| {
        let db = config.streams[0].db.clone();
        config.streams.push(poison_stream(&db));
    })
    .await;
    let mut good = f.connect(Kind::Sse).await;
    let b = coll(&f, "b").await;
    const ROUNDS: i64 = 5;
    for round in 0..ROUNDS {
        let mut bad = connect(&f, "b", "s", Kind::Sse).await;
        f.insert_seqs(2 * round..2 * round + 1).await;
        b.insert_one(doc! { "code": "x" }).await.unwrap();
        f.insert_seqs(2 * round + 1..2 * round + 2).await;
        expect_poison_error(&mut bad).await;
    }
    assert_eq!(
        seqs(&good.changes(2 * ROUNDS as usize, WAIT).await),
        (0..2 * ROUNDS).collect::<Vec<_>>()
    );
    good.expect_quiet(QUIET).await;
    assert_eq!(f.server.metrics.database_feed_isolations.get(), 1);
    assert_eq!(f.server.metrics.database_feeds.get(), 1);
    let mongo = mongod::shared().client().await;
    eventually("the feed's cursor alone", WAIT, async || {
        database_change_stream_cursors(&mongo, &f.db).await == 1
    })
    .await;
    f.server.stop().await;
}

/// `feed_probe_timeout_ms` at its bound (0): no time to find the failing stream, so every
/// stream of the feed ends with the error, as before streams could fail alone.
#[tokio::test]
async fn without_time_to_probe_every_stream_of_the_feed_ends_with_the_error() {
    let f = Fixture::start("feeds_poison_no_probe", |config| {
        let db = config.streams[0].db.clone();
        config.streams.push(poison_stream(&db));
        config.feed_probe_timeout_ms = 0;
    })
    .await;
    let mut good = f.connect(Kind::Sse).await;
    let mut bad = connect(&f, "b", "s", Kind::Sse).await;
    coll(&f, "b")
        .await
        .insert_one(doc! { "code": "x" })
        .await
        .unwrap();
    expect_poison_error(&mut good).await;
    expect_poison_error(&mut bad).await;
    assert_eq!(f.server.metrics.database_feed_isolations.get(), 0);
    f.server.stop().await;
}
