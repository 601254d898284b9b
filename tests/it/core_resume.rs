//! One cursor per stream, worker linger, and exactly-once resume (ring, catch-up, restart).

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::harness::clients::Kind;
use crate::harness::fixture::{Fixture, insert_seqs, resume, seqs};
use crate::harness::mongod::change_stream_cursors;
use crate::harness::server::TestServer;
use crate::harness::{eventually, mongod};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn mixed_clients_share_one_cursor_and_worker_lingers_then_stops() {
    let f = Fixture::start("onecursor", |_| {}).await;
    let mut clients = Vec::new();
    for kind in [Kind::Sse, Kind::Ws, Kind::Ndjson]
        .into_iter()
        .cycle()
        .take(9)
    {
        clients.push(f.connect(kind).await);
    }
    f.insert_seqs(0..20).await;
    for client in &mut clients {
        assert_eq!(
            seqs(&client.changes(20, WAIT).await),
            (0..20).collect::<Vec<_>>()
        );
    }
    let workers = f.server.registry.workers_of(&f.key());
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].client_count(), 9);
    // Its database's feed serves it: one cursor opened in all, none of the worker's own.
    assert_eq!(workers[0].stats.cursors_opened.load(Ordering::Relaxed), 0);
    assert_eq!(f.server.metrics.cursors_opened.get(), 1);
    let mongo = mongod::shared().client().await;
    assert_eq!(change_stream_cursors(&mongo, &f.db, "c").await, 1);

    for client in &mut clients {
        client.close().await;
    }
    drop(clients);
    // Linger is 300 ms; reads return at least every 500 ms.
    eventually(
        "worker stops after linger",
        Duration::from_secs(5),
        async || f.server.registry.workers_of(&f.key()).is_empty(),
    )
    .await;
    eventually(
        "cursor closed on the server",
        Duration::from_secs(5),
        async || change_stream_cursors(&mongo, &f.db, "c").await == 0,
    )
    .await;
    f.server.stop().await;
}

#[tokio::test]
async fn resume_from_ring_is_exactly_once() {
    let f = Fixture::start("ring", |_| {}).await;
    // A keeps the worker running; B leaves and comes back.
    let mut a = f.connect(Kind::Sse).await;
    let mut b = f.connect(Kind::Sse).await;
    f.insert_seqs(0..5).await;
    let first = b.changes(5, WAIT).await;
    let resume_from = first[2].id.clone().unwrap();
    drop(b);
    f.insert_seqs(5..10).await;
    a.changes(10, WAIT).await;

    for kind in [Kind::Sse, Kind::Ndjson, Kind::Ws] {
        let mut resumed = f.resume(kind, &resume_from).await;
        assert_eq!(
            seqs(&resumed.changes(7, WAIT).await),
            (3..10).collect::<Vec<_>>(),
            "{kind:?}"
        );
    }
    assert_eq!(f.server.metrics.catchups.get(), 0, "served from the ring");
    f.server.stop().await;
}

#[tokio::test]
async fn resume_older_than_ring_hands_over_to_live_without_gap_or_duplicate() {
    let f = Fixture::start("catchup", |config| config.ring_size = 5).await;
    let mut live = f.connect(Kind::Sse).await;
    f.insert_seqs(0..60).await;
    let seen = live.changes(60, WAIT).await;
    let resume_from = seen[1].id.clone().unwrap();

    // Keep inserting while the resumed client catches up and hands over.
    let writer = {
        let coll = f.coll.clone();
        tokio::spawn(async move { insert_seqs(&coll, 60..160).await })
    };
    let mut resumed = f.resume(Kind::Ndjson, &resume_from).await;
    let events = resumed.changes(158, WAIT).await;
    writer.await.unwrap();
    assert_eq!(seqs(&events), (2..160).collect::<Vec<_>>());
    let ids: Vec<_> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    // And it continues live.
    f.insert_seqs(160..163).await;
    assert_eq!(seqs(&resumed.changes(3, WAIT).await), vec![160, 161, 162]);
    // One catch-up normally; a reader slowed down by a busy machine can fall behind the 5-event
    // ring again after the hand-over and need a second one, never more than a few.
    let catchups = f.server.metrics.catchups.get();
    assert!((1..=3).contains(&catchups), "{catchups} catch-ups");
    f.server.stop().await;
}

#[tokio::test]
async fn client_resumes_across_streamgate_restart() {
    let f = Fixture::start("restart", |_| {}).await;
    let mut client = f.connect(Kind::Sse).await;
    f.insert_seqs(0..5).await;
    client.changes(5, WAIT).await;
    let last = client.last_id.clone().unwrap();
    let Fixture {
        server,
        path,
        coll,
        config,
        ..
    } = f;
    server.stop().await;

    insert_seqs(&coll, 5..12).await; // while Streamgate is down
    let second = TestServer::start(config).await;
    let mut client = resume(&second, &path, Kind::Sse, &last).await;
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move { insert_seqs(&coll, 12..20).await })
    };
    let events = client.changes(15, WAIT).await;
    writer.await.unwrap();
    assert_eq!(seqs(&events), (5..20).collect::<Vec<_>>());
    second.stop().await;
}
