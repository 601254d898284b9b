//! The relay tier (issue 22, `[relay]`): instances sharing one mongod and one `nats-server -js`
//! hold ONE change-stream cursor per stream between them, every client of every instance gets
//! every change exactly once, and when the cursor's owner stops or is killed another instance
//! takes the cursor over from the last change published, losing and repeating nothing. The
//! cursors spread evenly over the instances and move when one joins or leaves. A client that
//! stops reading, live or in a catch-up of the retained window, costs the others nothing.

use std::time::{Duration, Instant};

use mongodb::Collection;
use mongodb::bson::{Document, doc};
use streamgate::config::Config;
use tokio_util::sync::CancellationToken;

use crate::harness::clients::{Client, Kind, Next, parse_raw_sse, stalled_sse};
use crate::harness::eventually;
use crate::harness::fixture::{insert_seqs, resume, seqs};
use crate::harness::fleet::{self, Fleet, Instance};
use crate::harness::mongod::{self, change_stream_cursors, database_change_stream_cursors};
use crate::harness::nats::NatsServer;
use crate::harness::server::{self, TestServer};
use crate::harness::unique_db;

const WAIT: Duration = Duration::from_secs(30);

/// The tests' lease lifetime and heartbeat (`[relay]`): short clocks.
const LEASE_TTL_MS: u64 = 1_000;
const HEARTBEAT_MS: u64 = 100;

/// The tests' `[relay]` settings on `nats`.
fn set_relay(config: &mut Config, nats: &NatsServer) {
    config.relay.nats_url = Some(nats.url());
    config.relay.lease_ttl_ms = LEASE_TTL_MS;
    config.relay.heartbeat_ms = HEARTBEAT_MS;
    config.relay.instance_ttl_ms = 5 * HEARTBEAT_MS;
    config.relay.takeover_grace_ms = 600;
}

/// The same as a TOML section, for instances run as processes.
fn relay_toml(nats: &NatsServer) -> String {
    relay_toml_with_lease(nats, LEASE_TTL_MS)
}

/// [`relay_toml`] with leases of `lease_ttl_ms`.
fn relay_toml_with_lease(nats: &NatsServer, lease_ttl_ms: u64) -> String {
    format!(
        "[relay]\nnats_url = {:?}\nlease_ttl_ms = {lease_ttl_ms}\nheartbeat_ms = {HEARTBEAT_MS}\n\
         instance_ttl_ms = {}\ntakeover_grace_ms = 600\n",
        nats.url(),
        5 * HEARTBEAT_MS,
    )
}

/// A relay-mode config for stream `c`/`s` of `db` on the shared replica set.
fn relay_config(db: &str, nats: &NatsServer) -> Config {
    let mut config = server::config(mongod::shared());
    config
        .streams
        .push(server::stream(db, "c", "s", serde_json::json!([])));
    set_relay(&mut config, nats);
    config
}

async fn subscribe(server: &TestServer, db: &str, kind: Kind) -> Client {
    Client::connect(kind, &server.url(""), &format!("/{db}/c/_streams/s"), None)
        .await
        .unwrap()
}

/// Reads until `n` changes arrived, then checks that nothing else comes: the `seq`s, in order.
async fn exactly(client: &mut Client, n: usize) -> Vec<i64> {
    let got = seqs(&client.changes(n, WAIT).await);
    match client.next(Duration::from_millis(500)).await {
        Next::Timeout => {}
        other => panic!("after {n} changes, more arrived: {other:?}"),
    }
    got
}

fn owned(servers: &[&TestServer]) -> Vec<i64> {
    servers
        .iter()
        .map(|s| s.metrics.relay.owned_cursors.get())
        .collect()
}

/// Waits until one instance (of those `owned` reports on) owns the one cursor, and has for
/// longer than an owner keeps a lease before handing it over plus a few heartbeats (for the
/// views to agree): the instance the placement names, which keeps it. Returns its index.
async fn settled_owner(owned: impl AsyncFnMut() -> Vec<f64>) -> usize {
    settled_owner_with_lease(LEASE_TTL_MS, owned).await
}

/// [`settled_owner`] for instances whose leases live `lease_ttl_ms`.
async fn settled_owner_with_lease(
    lease_ttl_ms: u64,
    mut owned: impl AsyncFnMut() -> Vec<f64>,
) -> usize {
    let settle = Duration::from_millis(lease_ttl_ms + 3 * HEARTBEAT_MS);
    let started = Instant::now();
    let mut current: Option<(usize, Instant)> = None;
    loop {
        let counts = owned().await;
        let owner = (counts.iter().sum::<f64>() == 1.0)
            .then(|| counts.iter().position(|c| *c == 1.0))
            .flatten();
        current = match (owner, current) {
            (Some(owner), Some((same, since))) if owner == same => {
                if since.elapsed() >= settle {
                    return owner;
                }
                Some((same, since))
            }
            (Some(owner), _) => Some((owner, Instant::now())),
            (None, _) => None,
        };
        assert!(
            started.elapsed() < WAIT,
            "no owner kept the cursor: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn three_instances_hold_one_cursor_and_a_stopped_owner_hands_it_over_exactly_once() {
    let nats = NatsServer::start();
    let db = unique_db("relay_one");
    let mongo = mongod::shared().client().await;
    let coll = mongo.database(&db).collection("c");
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(TestServer::start(relay_config(&db, &nats)).await);
    }
    // (instance, client): one instance has two.
    let mut clients = Vec::new();
    for (i, kind) in [
        (0, Kind::Sse),
        (1, Kind::Ws),
        (2, Kind::Ndjson),
        (2, Kind::Sse),
    ] {
        clients.push((i, subscribe(&servers[i], &db, kind).await));
    }
    // One instance reads the cursor; the others read its log.
    let owner = settled_owner(async || {
        let servers: Vec<&TestServer> = servers.iter().collect();
        owned(&servers).into_iter().map(|n| n as f64).collect()
    })
    .await;
    eventually("one change-stream cursor on mongod", WAIT, async || {
        change_stream_cursors(&mongo, &db, "c").await == 1
    })
    .await;

    let published_before: Vec<u64> = servers
        .iter()
        .map(|s| s.metrics.relay.published.get())
        .collect();
    insert_seqs(&coll, 0..100).await;
    let all: Vec<i64> = (0..100).collect();
    for (_, client) in &mut clients {
        assert_eq!(exactly(client, 100).await, all);
    }
    assert_eq!(change_stream_cursors(&mongo, &db, "c").await, 1);
    // The owner published them; every instance applied them.
    for (i, server) in servers.iter().enumerate() {
        let published = server.metrics.relay.published.get() - published_before[i];
        // The owner's own clients got (most of) them as it published them, not read back
        // from JetStream; each change still exactly once (above).
        let as_owner = server.metrics.relay.applied_as_owner.get();
        if i == owner {
            assert!(published >= 1, "the owner published {published}");
            assert!(server.metrics.relay.publish_lag.count() >= 100);
            assert!(as_owner >= 1, "the owner applied none of its own publishes");
        } else {
            assert_eq!(published, 0, "instance {i} is not the owner");
            assert_eq!(as_owner, 0, "instance {i} is not the owner");
        }
        assert!(server.metrics.relay.delivery_lag.count() >= 100);
    }

    // A burst the cursor holds together (one `insertMany`) goes out as few messages, one
    // acknowledgement each, and every client still gets each change once, in order.
    let published_before = servers[owner].metrics.relay.published.get();
    coll.insert_many((1_000..2_000).map(|seq| doc! { "seq": seq }))
        .await
        .unwrap();
    let burst: Vec<i64> = (1_000..2_000).collect();
    for (_, client) in &mut clients {
        assert_eq!(exactly(client, 1_000).await, burst);
    }
    let messages = servers[owner].metrics.relay.published.get() - published_before;
    eprintln!("relay: a burst of 1,000 changes published as {messages} messages");
    assert!(messages <= 100, "1,000 changes in {messages} messages");

    // The owner stops (a rolling restart) while changes are being written: it gives its lease
    // back, and one of the others goes on from the last change it published.
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move {
            for seq in 100..300 {
                coll.insert_one(doc! { "seq": seq }).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    clients.retain(|(i, _)| *i != owner);
    let stopping = servers.remove(owner);
    let stopped = Instant::now();
    stopping.stop().await;
    let took = eventually("another instance owns the cursor", WAIT, async || {
        let servers: Vec<&TestServer> = servers.iter().collect();
        owned(&servers).iter().sum::<i64>() == 1
    })
    .await;
    eprintln!(
        "relay hand-over after a graceful stop: {:?} (stop took {:?})",
        took,
        stopped.elapsed() - took
    );
    writer.await.unwrap();
    let all: Vec<i64> = (100..300).collect();
    for (_, client) in &mut clients {
        assert_eq!(exactly(client, 200).await, all);
    }
    eventually(
        "still one change-stream cursor on mongod",
        WAIT,
        async || change_stream_cursors(&mongo, &db, "c").await == 1,
    )
    .await;
    for server in servers {
        server.stop().await;
    }
}

/// Two instances in relay mode whose workers keep 5 events in memory: the catch-up path is
/// taken by any id older than the last few changes.
async fn two_small_ring_instances(db: &str, nats: &NatsServer) -> (TestServer, TestServer) {
    two_small_ring_instances_with(db, nats, |_| {}).await
}

/// [`two_small_ring_instances`] with `tweak` applied to both instances' configs.
async fn two_small_ring_instances_with(
    db: &str,
    nats: &NatsServer,
    tweak: impl Fn(&mut Config),
) -> (TestServer, TestServer) {
    let config = || {
        let mut config = relay_config(db, nats);
        tweak(&mut config);
        config.ring_size = 5;
        // A second stream, on collection `d`: its messages interleave with `s`'s in the
        // JetStream stream.
        config
            .streams
            .push(server::stream(db, "d", "s2", serde_json::json!([])));
        config
    };
    let a = TestServer::start(config()).await;
    let b = TestServer::start(config()).await;
    (a, b)
}

/// Resumes on `server` after `id` while `more` are written, and checks that the client gets
/// exactly `expected`, in order, and then the live changes.
async fn resume_while_writing(
    server: &TestServer,
    db: &str,
    coll: &Collection<Document>,
    kind: Kind,
    id: &str,
    from: i64,
    more: std::ops::Range<i64>,
) -> Client {
    let writer = {
        let coll = coll.clone();
        let more = more.clone();
        tokio::spawn(async move { insert_seqs(&coll, more).await })
    };
    let mut resumed = resume(server, &format!("/{db}/c/_streams/s"), kind, id).await;
    let expected: Vec<i64> = (from..more.end).collect();
    assert_eq!(exactly(&mut resumed, expected.len()).await, expected);
    writer.await.unwrap();
    resumed
}

/// Issue 22's middle step: a resume older than the worker's ring is read from JetStream's
/// retained window, on an instance that is not the one holding the cursor, and no MongoDB
/// catch-up cursor is opened for it.
#[tokio::test]
async fn a_resume_older_than_the_ring_is_read_from_the_retained_window_on_any_instance() {
    let nats = NatsServer::start();
    let db = unique_db("relay_window");
    let mongo = mongod::shared().client().await;
    let coll = mongo.database(&db).collection("c");
    let other: Collection<Document> = mongo.database(&db).collection("d");
    let (a, b) = two_small_ring_instances(&db, &nats).await;
    let mut live = subscribe(&a, &db, Kind::Sse).await;
    let mut live_other =
        Client::connect(Kind::Sse, &a.url(""), &format!("/{db}/d/_streams/s2"), None)
            .await
            .unwrap();
    // Both streams only filter: one database feed's cursor for the fleet, read by `a`.
    eventually("instance a reads the streams' cursor", WAIT, async || {
        a.metrics.relay.owned_cursors.get() == 1
    })
    .await;
    // A batch (one `insertMany`: few `changes` messages) and single changes, between which
    // the other stream's changes are published (the search and the retention check meet
    // sequences of another subject).
    coll.insert_many((0..30).map(|seq| doc! { "seq": seq }))
        .await
        .unwrap();
    for seq in 30..60 {
        coll.insert_one(doc! { "seq": seq }).await.unwrap();
        other.insert_one(doc! { "seq": seq }).await.unwrap();
    }
    let seen = live.changes(60, WAIT).await;
    assert_eq!(seqs(&seen), (0..60).collect::<Vec<_>>());
    assert_eq!(
        seqs(&live_other.changes(30, WAIT).await),
        (30..60).collect::<Vec<_>>()
    );
    let id = |n: usize| seen[n].id.clone().expect("id");

    // Instance b has no worker yet: it starts one at the log's last message (its ring holds
    // nothing older), and the client's id, inside the batch, is far older.
    let mut resumed =
        resume_while_writing(&b, &db, &coll, Kind::Ndjson, &id(12), 13, 60..100).await;
    // One normally; a reader slowed down by a busy machine can fall behind the 5-event ring
    // again after the hand-over (writes go on) and need another: from the window too.
    let windows = b.metrics.relay.window_catchups.get();
    assert!(windows >= 1, "read from the window");
    assert_eq!(b.metrics.catchups.get(), 0, "no MongoDB catch-up cursor");
    // Another, between single changes, while b's worker runs: the window again (or the
    // first catch-up's ring, if it still holds it), never MongoDB.
    let mut again = resume_while_writing(&b, &db, &coll, Kind::Sse, &id(40), 41, 100..120).await;
    assert_eq!(
        exactly(&mut resumed, 20).await,
        (100..120).collect::<Vec<_>>()
    );
    insert_seqs(&coll, 120..123).await;
    assert_eq!(exactly(&mut again, 3).await, vec![120, 121, 122]);
    assert_eq!(exactly(&mut resumed, 3).await, vec![120, 121, 122]);
    for server in [&a, &b] {
        assert_eq!(
            server.metrics.catchups.get(),
            0,
            "no MongoDB catch-up cursor"
        );
    }
    assert!(b.metrics.relay.window_catchups.get() >= 1);
    assert_eq!(
        b.metrics
            .relay
            .errors
            .get_or_create(&streamgate::metrics::RelayErrorLabel { op: "window" })
            .get(),
        0
    );
    a.stop().await;
    b.stop().await;
}

/// An id the window cannot cover (written before the relay's log of the stream began) still
/// resumes exactly once, through a MongoDB catch-up cursor.
#[tokio::test]
async fn a_resume_from_before_the_retained_window_falls_back_to_a_mongodb_catch_up() {
    use futures::StreamExt;

    let nats = NatsServer::start();
    let db = unique_db("relay_window_fallback");
    let mongo = mongod::shared().client().await;
    let coll: Collection<Document> = mongo.database(&db).collection("c");
    // Changes before any instance watched the stream: in no relay log.
    let mut watch = coll.watch().await.unwrap();
    insert_seqs(&coll, 0..3).await;
    let mut early = Vec::new();
    for _ in 0..3 {
        let change = watch.next().await.unwrap().unwrap();
        let token = mongodb::bson::to_document(&change.id).unwrap();
        early.push(token.get_str("_data").unwrap().to_owned());
    }
    drop(watch);

    let (a, b) = two_small_ring_instances(&db, &nats).await;
    let mut live = subscribe(&a, &db, Kind::Sse).await;
    eventually("instance a reads the cursor", WAIT, async || {
        a.metrics.relay.owned_cursors.get() == 1
    })
    .await;
    insert_seqs(&coll, 3..30).await;
    assert_eq!(
        seqs(&live.changes(27, WAIT).await),
        (3..30).collect::<Vec<_>>()
    );
    let mut resumed = resume_while_writing(&b, &db, &coll, Kind::Sse, &early[1], 2, 30..60).await;
    // The id is not covered: a MongoDB catch-up. (A reader slowed down by a busy machine can
    // fall behind the 5-event ring again after the hand-over, and that later catch-up, from an
    // id the window holds, may read the window.)
    assert!(b.metrics.catchups.get() >= 1, "a MongoDB catch-up cursor");
    insert_seqs(&coll, 60..62).await;
    assert_eq!(exactly(&mut resumed, 2).await, vec![60, 61]);
    a.stop().await;
    b.stop().await;
}

/// With a stream small enough that retention drops the oldest messages while the test
/// writes: an id whose message is still retained resumes from the window, one whose message
/// retention dropped through MongoDB, both exactly once.
#[tokio::test]
async fn once_retention_dropped_an_id_it_resumes_through_mongodb_and_a_retained_one_from_the_window()
 {
    let nats = NatsServer::start();
    let db = unique_db("relay_window_retention");
    let mongo = mongod::shared().client().await;
    let coll: Collection<Document> = mongo.database(&db).collection("c");
    let config = || {
        let mut config = relay_config(&db, &nats);
        config.ring_size = 5;
        // About a hundred messages of these changes.
        config.relay.max_bytes = 32 * 1024;
        config
    };
    let a = TestServer::start(config()).await;
    let b = TestServer::start(config()).await;
    let mut live = subscribe(&a, &db, Kind::Sse).await;
    eventually("instance a reads the cursor", WAIT, async || {
        a.metrics.relay.owned_cursors.get() == 1
    })
    .await;
    insert_seqs(&coll, 0..300).await;
    let seen = live.changes(300, WAIT).await;
    assert_eq!(seqs(&seen), (0..300).collect::<Vec<_>>());
    let id = |n: usize| seen[n].id.clone().expect("id");

    let mut recent =
        resume_while_writing(&b, &db, &coll, Kind::Ndjson, &id(290), 291, 300..305).await;
    assert!(
        b.metrics.relay.window_catchups.get() >= 1,
        "read from the window"
    );
    assert_eq!(b.metrics.catchups.get(), 0, "no MongoDB catch-up cursor");
    let mut old = resume_while_writing(&b, &db, &coll, Kind::Sse, &id(5), 6, 305..310).await;
    assert!(b.metrics.catchups.get() >= 1, "a MongoDB catch-up cursor");
    assert_eq!(
        exactly(&mut recent, 5).await,
        (305..310).collect::<Vec<_>>()
    );
    insert_seqs(&coll, 310..312).await;
    for client in [&mut recent, &mut old] {
        assert_eq!(exactly(client, 2).await, vec![310, 311]);
    }
    a.stop().await;
    b.stop().await;
}

/// The abusive-client test's `stall_timeout_secs`: the cut comes within the test, and a feed
/// held up until it came would show as a lag far past [`ABUSE_MAX_LAG`].
const ABUSE_STALL_SECS: u64 = 6;
/// Changes written beside the abusive client, and each one's padding: 6 MB, far more than its
/// socket holds (4 KB receive buffer).
const ABUSE_CHANGES: i64 = 1_500;
const ABUSE_PAD: usize = 4 * 1024;
/// Changes per `insert_many` of the abusive-client test's writer.
const ABUSE_CHUNK: usize = 8;
/// How long after it was written any change may take to reach a well-behaved client: generous
/// for a debug build on a loaded 2-core machine, and half the stall timeout.
const ABUSE_MAX_LAG: Duration = Duration::from_secs(3);

/// Reads `n` changes from `client` in a task of its own, noting when each arrived, then checks
/// that nothing else comes ([`exactly`]). Yields the client, the `seq`s and the arrival times.
fn timed_reader(
    mut client: Client,
    n: usize,
) -> tokio::task::JoinHandle<(Client, Vec<i64>, Vec<Instant>)> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(n);
        let mut arrived = Vec::with_capacity(n);
        while got.len() < n {
            got.extend(seqs(&client.changes(1, WAIT).await));
            arrived.push(Instant::now());
        }
        exactly(&mut client, 0).await;
        (client, got, arrived)
    })
}

/// The fairness rule of a worker's reader in relay mode (the project's "one abusive client
/// beside well-behaved ones"): a client that connects and never reads its socket, on the
/// instance that owns the cursor, costs nobody anything. Two instances, an SSE and a WebSocket
/// client on each, and the abuser on the owner; 1,500 changes of 4 KB are written. Every
/// well-behaved client gets every change once, in order, each within [`ABUSE_MAX_LAG`] of its
/// write; the abuser is cut by the stall timeout (`streamgate_slow_consumers_total`), having
/// got a gap-free prefix; the owner keeps its lease and keeps publishing, before and after the
/// cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_on_the_owner_costs_the_other_clients_nothing_in_relay_mode() {
    use tokio::io::AsyncReadExt;

    let nats = NatsServer::start();
    let db = unique_db("relay_abuser");
    let mongo = mongod::shared().client().await;
    let coll: Collection<Document> = mongo.database(&db).collection("c");
    let config = || {
        let mut config = relay_config(&db, &nats);
        config.stall_timeout_secs = ABUSE_STALL_SECS;
        config
    };
    let servers = [
        TestServer::start(config()).await,
        TestServer::start(config()).await,
    ];
    // (instance, kind, client): an SSE and a WebSocket client on each instance.
    let mut clients = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        for kind in [Kind::Sse, Kind::Ws] {
            clients.push((i, kind, subscribe(server, &db, kind).await));
        }
    }
    let owner = settled_owner(async || {
        let servers: Vec<&TestServer> = servers.iter().collect();
        owned(&servers).into_iter().map(|n| n as f64).collect()
    })
    .await;
    let other = 1 - owner;
    let path = format!("/{db}/c/_streams/s");
    let (mut abuser, mut raw) = stalled_sse(servers[owner].addr, &path).await;
    // When the owner cuts it, seen from the side (every 10 ms, for the report).
    let cut = {
        let metrics = std::sync::Arc::clone(&servers[owner].metrics);
        tokio::spawn(async move {
            let started = Instant::now();
            while metrics.slow_consumers.get() == 0 {
                assert!(started.elapsed() < WAIT, "the abuser was not cut");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Instant::now()
        })
    };

    let published_before = servers[owner].metrics.relay.published.get();
    let publish_lag_before = servers[owner].metrics.relay.publish_lag.count();
    let delivered_before = servers[other].metrics.relay.delivery_lag.count();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(i, kind, client)| (i, kind, timed_reader(client, ABUSE_CHANGES as usize)))
        .collect();
    // Paced (a change every millisecond or so), as an application writes; each chunk's
    // acknowledgement is when its changes were written.
    let padding = "x".repeat(ABUSE_PAD);
    let all: Vec<i64> = (0..ABUSE_CHANGES).collect();
    let writing = Instant::now();
    let mut written = Vec::new();
    for chunk in all.chunks(ABUSE_CHUNK) {
        coll.insert_many(chunk.iter().map(|seq| doc! { "seq": seq, "pad": &padding }))
            .await
            .unwrap();
        written.push(Instant::now());
        // On purpose: pacing the writer (not waiting for a condition).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let write_took = writing.elapsed();

    let mut clients = Vec::new();
    for (i, kind, reader) in readers {
        let (client, got, arrived) = reader.await.unwrap();
        assert_eq!(got, all, "instance {i} {kind:?}");
        let lag = |n: usize| arrived[n].saturating_duration_since(written[n / ABUSE_CHUNK]);
        let worst = (0..arrived.len()).map(lag).max().unwrap_or_default();
        let last = lag(arrived.len() - 1);
        eprintln!(
            "relay abuser: instance {i}{} {kind:?}: worst lag {worst:?}, the last change \
             {last:?} after it was written (the write took {write_took:?})",
            if i == owner { " (owner)" } else { "" }
        );
        assert!(
            worst < ABUSE_MAX_LAG,
            "instance {i} {kind:?}: a change took {worst:?} to arrive"
        );
        clients.push(client);
    }

    // The abuser is cut by the stall timeout (not by how far behind it is), after a gap-free
    // prefix of the changes; nobody else is.
    let cut = cut.await.unwrap();
    tokio::time::timeout(WAIT, abuser.read_to_end(&mut raw))
        .await
        .expect("the abuser's socket closes")
        .unwrap();
    let frames = parse_raw_sse(&String::from_utf8_lossy(&raw));
    let got: Vec<i64> = frames
        .iter()
        .filter(|(_, event, _)| event == "change")
        .map(|(_, _, data)| data["fullDocument"]["seq"].as_i64().expect("seq"))
        .collect();
    eprintln!(
        "relay abuser: cut {:?} after the write began, having got {} of {ABUSE_CHANGES} changes",
        cut.saturating_duration_since(writing),
        got.len()
    );
    assert!(
        (got.len() as i64) < ABUSE_CHANGES,
        "the abuser got every change: its socket never filled"
    );
    assert_eq!(got, (0..got.len() as i64).collect::<Vec<_>>());
    if let Some((_, event, data)) = frames.last().filter(|(_, event, _)| event != "change") {
        assert_eq!(event, "error");
        assert_eq!(data["code"], "slow_consumer");
    }
    assert_eq!(servers[owner].metrics.slow_consumers.get(), 1);
    assert_eq!(servers[other].metrics.slow_consumers.get(), 0);

    // The owner's relay went on: it kept its lease, published every change (their publish
    // lag measured) without an error, and the other instance applied them from JetStream.
    let owner_metrics = &servers[owner].metrics.relay;
    let published = owner_metrics.published.get() - published_before;
    assert!(published >= 1, "the owner published {published} messages");
    assert!(owner_metrics.publish_lag.count() - publish_lag_before >= ABUSE_CHANGES as u64);
    let publish_errors = owner_metrics
        .errors
        .get_or_create(&streamgate::metrics::RelayErrorLabel { op: "publish" })
        .get();
    assert_eq!(publish_errors, 0);
    assert!(
        servers[other].metrics.relay.delivery_lag.count() - delivered_before
            >= ABUSE_CHANGES as u64
    );
    let servers_ref: Vec<&TestServer> = servers.iter().collect();
    let mut expected_owned = vec![0, 0];
    expected_owned[owner] = 1;
    assert_eq!(
        owned(&servers_ref),
        expected_owned,
        "the owner kept its lease"
    );
    // And goes on after the cut.
    let published_before = servers[owner].metrics.relay.published.get();
    let after: Vec<i64> = (ABUSE_CHANGES..ABUSE_CHANGES + 3).collect();
    insert_seqs(&coll, after[0]..after[2] + 1).await;
    for client in &mut clients {
        assert_eq!(exactly(client, 3).await, after);
    }
    assert!(servers[owner].metrics.relay.published.get() > published_before);
    drop(clients);
    for server in servers {
        server.stop().await;
    }
}

/// Changes the stopped-reader test writes before its clients resume: more than a catch-up
/// reads ahead of its slowest reader (4,096) plus what a stopped client's sockets hold.
const STOPPED_READER_CHANGES: i64 = 8_001;

/// Changes the stopped reader of that test reads once it reads again: well past where it was
/// let go.
const STOPPED_READER_REREAD: usize = 1_000;

/// The catch-up's fairness rule (`worker/catchup.rs`: a reader a whole ring behind one that
/// waits at the head is let go) when the catch-up reads JetStream's retained window: two
/// clients resume from the same old id, 8,000 changes back, on the instance that did not
/// hold the cursor (nor the worker); one stops reading. The other gets every change once, in
/// order, and goes live without waiting for it; the stopped one, reading again, goes on from
/// its own position, nothing lost or repeated. The stall timeout is far past the test's
/// length, so that the let-go rule frees the reader, not the cut (as in
/// `fanin::a_catch_up_reader_that_stops_does_not_hold_up_the_others`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_reader_that_stops_in_relay_mode_does_not_hold_up_the_others() {
    use tokio::io::AsyncReadExt;

    let nats = NatsServer::start();
    let db = unique_db("relay_stopped_reader");
    let mongo = mongod::shared().client().await;
    let coll: Collection<Document> = mongo.database(&db).collection("c");
    let (a, b) = two_small_ring_instances_with(&db, &nats, |config| {
        config.stall_timeout_secs = 120;
    })
    .await;
    let mut first = subscribe(&a, &db, Kind::Sse).await;
    eventually("instance a reads the cursor", WAIT, async || {
        a.metrics.relay.owned_cursors.get() == 1
    })
    .await;
    insert_seqs(&coll, 0..1).await;
    let id = first.changes(1, WAIT).await[0].id.clone().expect("id");
    // Kept connected (so that the owner's worker runs) and read, so that its socket never
    // fills with the megabytes below.
    let first = first.drain_in_background();
    let padding = "x".repeat(1024);
    let rest: Vec<i64> = (1..STOPPED_READER_CHANGES).collect();
    for chunk in rest.chunks(500) {
        coll.insert_many(chunk.iter().map(|seq| doc! { "seq": seq, "pad": &padding }))
            .await
            .unwrap();
    }
    // Every change is in the log before anybody resumes: the catch-up has all of them to
    // read (instance b's worker starts at the log's last message).
    let key = streamgate::streams::StreamKey::new(&db, "c", "s").unwrap();
    let worker = a.registry.workers_of(&key).pop().expect("a's worker");
    eventually(
        "the owner's worker applied every change",
        WAIT,
        async || {
            worker
                .stats
                .events
                .load(std::sync::atomic::Ordering::Relaxed)
                == STOPPED_READER_CHANGES as u64
        },
    )
    .await;

    let path = format!("/{db}/c/_streams/s");
    // The stopped one never reads past its response head, on a socket with a 4 KB receive
    // buffer (a WebSocket or `reqwest` client's kernel buffers can take megabytes, thousands
    // of these changes: its server side would read far into the catch-up before it stopped).
    // Both connect at once, so that they share one catch-up (the second joins while the
    // first's opens): one connecting after the catch-up had read a ring's worth would start
    // a catch-up of its own, and a lone reader is never let go.
    let stopped_path = format!("{path}?lastEventId={id}");
    let ((mut stopped, mut raw), mut reading) = tokio::join!(
        stalled_sse(b.addr, &stopped_path),
        resume(&b, &path, Kind::Sse, &id)
    );
    let started = Instant::now();
    let events = reading.changes(rest.len(), WAIT).await;
    let took = started.elapsed();
    assert_eq!(seqs(&events), rest);
    eprintln!(
        "relay stopped catch-up reader: the other read {} changes from the window in {took:?}",
        rest.len()
    );
    assert!(
        b.metrics.catchups_joined.get() >= 1,
        "the two readers share one catch-up"
    );
    assert!(
        b.metrics.catchup_readers_detached.get() >= 1,
        "the stopped reader was let go"
    );
    assert!(
        b.metrics.relay.window_catchups.get() >= 1,
        "read from the window"
    );
    assert_eq!(b.metrics.catchups.get(), 0, "no MongoDB catch-up cursor");
    // Live, with the stopped one still not reading.
    let live: Vec<i64> = (STOPPED_READER_CHANGES..STOPPED_READER_CHANGES + 3).collect();
    insert_seqs(&coll, live[0]..live[2] + 1).await;
    assert_eq!(exactly(&mut reading, 3).await, live);

    // The stopped one reads again, from where it was let go (after the chunk it took before
    // its socket filled: 256 changes) on:
    // its own position, in order, nothing repeated (served by a catch-up of its own, from the
    // window again). Only the first [`STOPPED_READER_REREAD`] changes: through a 4 KB
    // receive buffer, it reads about 450 KB/s.
    let marker = b"event: change\n";
    let mut frames = memchr::memmem::find_iter(&raw, marker).count();
    let mut chunk = vec![0_u8; 64 * 1024];
    let reading_again = Instant::now();
    while frames <= STOPPED_READER_REREAD {
        assert!(
            reading_again.elapsed() < WAIT,
            "the stopped reader got {frames} changes"
        );
        let n = tokio::time::timeout(WAIT, stopped.read(&mut chunk))
            .await
            .expect("the stopped reader's next bytes")
            .unwrap();
        assert!(n > 0, "the stopped reader's connection closed");
        // (A marker may straddle the end of what was counted.)
        let from = raw.len().saturating_sub(marker.len() - 1);
        raw.extend_from_slice(&chunk[..n]);
        frames += memchr::memmem::find_iter(&raw[from..], marker).count();
    }
    let got: Vec<i64> = parse_raw_sse(&String::from_utf8_lossy(&raw))
        .iter()
        .filter(|(_, event, _)| event == "change")
        .map(|(_, _, data)| data["fullDocument"]["seq"].as_i64().expect("seq"))
        .collect();
    assert!(got.len() >= STOPPED_READER_REREAD, "{} changes", got.len());
    assert_eq!(got, (1..=got.len() as i64).collect::<Vec<_>>());
    assert!(
        b.metrics.relay.window_catchups.get() >= 2,
        "the stopped reader's own catch-up reads the window"
    );
    assert_eq!(b.metrics.catchups.get(), 0, "no MongoDB catch-up cursor");
    for server in [&a, &b] {
        assert_eq!(server.metrics.slow_consumers.get(), 0, "nobody was cut");
    }
    drop((first, stopped, reading));
    a.stop().await;
    b.stop().await;
}

/// Each process's `streamgate_relay_owned_cursors` (0 for one that does not answer).
async fn instance_owners(instances: &[Instance]) -> Vec<f64> {
    let mut owned = Vec::new();
    for instance in instances {
        owned.push(instance.metric("streamgate_relay_owned_cursors").await);
    }
    owned
}

/// The kill test's lease lifetime: far longer than a heartbeat's (`5 * HEARTBEAT_MS`).
const KILL_TEST_LEASE_TTL_MS: u64 = 5_000;

#[tokio::test]
async fn an_owner_killed_with_sigkill_is_taken_over_within_two_seconds_losing_nothing() {
    let nats = NatsServer::start();
    let db = unique_db("relay_kill");
    let mongo = mongod::shared().client().await;
    let coll = mongo.database(&db).collection("c");
    // Processes, so that the owner can really be frozen and killed. Leases of 5 s: the
    // killed owner's is taken once its heartbeat has expired (0.5 s), not when it would.
    let mut instances: Vec<Instance> = (0..3)
        .map(|_| Instance::new(&db, &relay_toml_with_lease(&nats, KILL_TEST_LEASE_TTL_MS)))
        .collect();
    for instance in &mut instances {
        instance.start().await;
    }
    let path = format!("/{db}/c/_streams/s");
    let mut clients = Vec::new();
    for (i, kind) in [Kind::Sse, Kind::Ws, Kind::Ndjson].into_iter().enumerate() {
        let client = Client::connect(kind, &instances[i].url(), &path, None)
            .await
            .unwrap();
        clients.push((i, client));
    }
    insert_seqs(&coll, 0..20).await;
    let first: Vec<i64> = (0..20).collect();
    for (_, client) in &mut clients {
        assert_eq!(exactly(client, 20).await, first);
    }
    let owner = settled_owner_with_lease(KILL_TEST_LEASE_TTL_MS, async || {
        instance_owners(&instances).await
    })
    .await;
    eventually("one change-stream cursor on mongod", WAIT, async || {
        change_stream_cursors(&mongo, &db, "c").await == 1
    })
    .await;

    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move {
            for seq in 20..400 {
                coll.insert_one(doc! { "seq": seq }).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Frozen first (SIGSTOP): its running `getMore` is answered and its cursor sits idle on
    // mongod, as when an owner dies between two `getMore`s; then killed. mongod keeps such a
    // cursor until `cursorTimeoutMillis` (10 minutes): the new owner must end it.
    instances[owner].signal("-STOP");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    instances[owner].stop("-KILL").await;
    clients.retain(|(i, _)| *i != owner);
    let others: Vec<&Instance> = (0..3)
        .filter(|i| *i != owner)
        .map(|i| &instances[i])
        .collect();
    eventually("an instance takes the cursor over", WAIT, async || {
        let mut sum = 0.0;
        for instance in &others {
            sum += instance.metric("streamgate_relay_owned_cursors").await;
        }
        sum == 1.0
    })
    .await;
    let took = killed.elapsed();
    eprintln!("relay takeover after SIGSTOP + SIGKILL of the owner: {took:?}");
    assert!(took < Duration::from_secs(2), "takeover took {took:?}");
    writer.await.unwrap();
    let rest: Vec<i64> = (20..400).collect();
    for (_, client) in &mut clients {
        assert_eq!(exactly(client, 380).await, rest);
    }
    // The new owner's cursor is open (it read those changes); the killed one's is gone.
    eventually(
        "the killed owner's idle cursor ended: one cursor on mongod",
        Duration::from_secs(1),
        async || change_stream_cursors(&mongo, &db, "c").await == 1,
    )
    .await;
    drop(clients);
    for instance in &mut instances {
        if instance.is_running() {
            instance.stop("-TERM").await;
        }
    }
}

#[tokio::test]
async fn readiness_follows_the_nats_server_in_relay_mode() {
    let mut nats = NatsServer::start();
    let db = unique_db("relay_ready");
    let server = TestServer::start(relay_config(&db, &nats)).await;
    let ready = server.url("/health/ready");
    let is_ready = async || reqwest::get(&ready).await.unwrap().status().as_u16() == 200;
    eventually("ready with NATS up", WAIT, is_ready).await;
    nats.kill();
    eventually("not ready while NATS is down", WAIT, async || {
        let response = reqwest::get(&ready).await.unwrap();
        response.status().as_u16() == 503 && response.text().await.unwrap().contains("NATS")
    })
    .await;
    nats.restart();
    eventually("ready again once NATS is back", WAIT, is_ready).await;
    // Relayed streams work after the outage.
    let mut client = subscribe(&server, &db, Kind::Sse).await;
    let coll = mongod::shared()
        .client()
        .await
        .database(&db)
        .collection("c");
    insert_seqs(&coll, 0..5).await;
    assert_eq!(exactly(&mut client, 5).await, (0..5).collect::<Vec<_>>());
    server.stop().await;
}

/// Streams of the spread test, one per collection.
const SPREAD_STREAMS: usize = 12;

/// A relay-mode config with stream `s` on each of the collections `c0` … `c11` of `db`, each
/// on a cursor of its own (not their database's feed: what is placed is each stream's cursor).
fn spread_config(db: &str, nats: &NatsServer) -> Config {
    let mut config = server::config(mongod::shared());
    config.shared_database_cursors = false;
    for i in 0..SPREAD_STREAMS {
        config.streams.push(server::stream(
            db,
            &format!("c{i}"),
            "s",
            serde_json::json!([]),
        ));
    }
    set_relay(&mut config, nats);
    config
}

/// A client of stream `s` of `c{stream}` on `server`, read by a task of its own until the
/// `seq: -1` that ends the test (or until the server ends the stream): its `seq`s in order.
async fn spread_reader(
    server: &TestServer,
    db: &str,
    stream: usize,
) -> tokio::task::JoinHandle<Vec<i64>> {
    let path = format!("/{db}/c{stream}/_streams/s");
    let mut client = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            match client.next(WAIT).await {
                Next::Event(event) if event.event == "change" => {
                    let seq = event.data["fullDocument"]["seq"].as_i64().expect("seq");
                    if seq < 0 {
                        return seen;
                    }
                    seen.push(seq);
                }
                Next::End(_) => return seen,
                other => panic!("stream {stream}: after {} changes: {other:?}", seen.len()),
            }
        }
    })
}

/// Whether every instance owns between `low` and `high` cursors, all of them owned.
fn spread_within(counts: &[i64], low: i64, high: i64) -> bool {
    counts.iter().sum::<i64>() == SPREAD_STREAMS as i64
        && counts.iter().all(|n| (low..=high).contains(n))
}

/// Ownership spreads evenly over the instances that have the workers (rendezvous hashing
/// with bounded loads over the heartbeats, `membership.rs`), and moves when an instance joins
/// or leaves, each move a clean hand-over: 12 streams, each with a client on every instance;
/// 3 instances own 4±1 each; a 4th joins while changes are written and takes its share (3±1
/// each); one stops and its cursors are taken over within 2 s. Every client gets every change
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_spreads_evenly_over_instances_and_moves_when_one_joins_or_leaves() {
    let nats = NatsServer::start();
    let db = unique_db("relay_spread");
    let mongo = mongod::shared().client().await;
    let colls: Vec<Collection<Document>> = (0..SPREAD_STREAMS)
        .map(|i| mongo.database(&db).collection(&format!("c{i}")))
        .collect();
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(TestServer::start(spread_config(&db, &nats)).await);
    }
    // (instance, stream, reader): every stream has a client on every instance. The first
    // instance's clients come first, so it has every worker before the others have any.
    let mut readers = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        for stream in 0..SPREAD_STREAMS {
            readers.push((i, stream, spread_reader(server, &db, stream).await));
        }
    }
    let counts = |servers: &[TestServer]| -> Vec<i64> {
        servers
            .iter()
            .map(|s| s.metrics.relay.owned_cursors.get())
            .collect()
    };
    let took = eventually("3 instances own 4±1 cursors each", WAIT, async || {
        spread_within(&counts(&servers), 3, 5)
    })
    .await;
    // Once the views agree, the placement is exact: 12 over 3.
    let even = eventually("3 instances own 4 cursors each", WAIT, async || {
        spread_within(&counts(&servers), 4, 4)
    })
    .await;
    println!("relay spread over 3 instances: 4±1 each after {took:?}, 4 each after {even:?}");

    // Changes flow from now on: one per collection every 10 ms or so.
    let writing = CancellationToken::new();
    let writer = tokio::spawn({
        let (colls, writing) = (colls.clone(), writing.clone());
        async move {
            let mut seq = 0_i64;
            while !writing.is_cancelled() {
                for coll in &colls {
                    coll.insert_one(doc! { "seq": seq }).await.unwrap();
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for coll in &colls {
                coll.insert_one(doc! { "seq": -1_i64 }).await.unwrap();
            }
            seq - 1
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A 4th instance joins: its clients start its workers, its heartbeat names it for a
    // share, and the owners of that share hand it over.
    servers.push(TestServer::start(spread_config(&db, &nats)).await);
    for stream in 0..SPREAD_STREAMS {
        readers.push((3, stream, spread_reader(&servers[3], &db, stream).await));
    }
    let took = eventually("4 instances own 3±1 cursors each", WAIT, async || {
        spread_within(&counts(&servers), 2, 4)
    })
    .await;
    let even = eventually("4 instances own 3 cursors each", WAIT, async || {
        spread_within(&counts(&servers), 3, 3)
    })
    .await;
    println!(
        "relay spread over 4 instances: 3±1 each {took:?}, 3 each {even:?} after the 4th's \
         clients subscribed"
    );

    // One leaves (a graceful stop): its cursors move to the other three.
    let leaving = 1;
    let stopping = servers.remove(leaving);
    let left = Instant::now();
    let stopped = tokio::spawn(stopping.stop());
    let took = eventually(
        "the stopped instance's cursors taken over",
        WAIT,
        async || counts(&servers).iter().sum::<i64>() == SPREAD_STREAMS as i64,
    )
    .await;
    println!(
        "relay: an instance of 4 stopped; its cursors taken over after {took:?}: {:?}",
        counts(&servers)
    );
    assert!(took < Duration::from_secs(2), "taken over after {took:?}");
    stopped.await.unwrap();
    eventually(
        "3 instances own 4±1 cursors each again",
        WAIT,
        async || spread_within(&counts(&servers), 3, 5),
    )
    .await;
    eventually("3 instances own 4 cursors each again", WAIT, async || {
        spread_within(&counts(&servers), 4, 4)
    })
    .await;
    println!(
        "relay spread over the 3 left: 4 each {:?} after the stop",
        left.elapsed()
    );

    // One cursor per stream for the fleet, hand-overs and the stop included (a cursor left
    // behind by any of them would stay on mongod for minutes).
    eventually(
        "one change-stream cursor per stream on mongod",
        WAIT,
        async || {
            let mut total = 0;
            for i in 0..SPREAD_STREAMS {
                total += change_stream_cursors(&mongo, &db, &format!("c{i}")).await;
            }
            total == SPREAD_STREAMS
        },
    )
    .await;
    writing.cancel();
    let last = writer.await.unwrap();
    let mut changes = 0;
    for (i, stream, reader) in readers {
        let seen = reader.await.unwrap();
        if i == leaving {
            continue;
        }
        changes += seen.len();
        if i == 3 {
            // Subscribed while changes were being written: every one after its first.
            let first = *seen.first().expect("the 4th instance's client got changes");
            let expected: Vec<i64> = (first..=last).collect();
            assert_eq!(seen, expected, "instance 4, stream {stream}");
        } else {
            let expected: Vec<i64> = (0..=last).collect();
            assert_eq!(seen, expected, "instance {}, stream {stream}", i + 1);
        }
    }
    println!(
        "relay spread: {} changes per stream, {changes} delivered, 0 lost, 0 repeated",
        last + 1
    );
    // Every client gone, every worker retires (`worker_linger_ms`), its lease bouncing
    // between the instances whose workers linger longest: no cursor may stay behind (one whose
    // open a retiring owner dropped in flight would stay idle on mongod for minutes).
    eventually("no change-stream cursor left on mongod", WAIT, async || {
        let mut total = 0;
        for i in 0..SPREAD_STREAMS {
            total += change_stream_cursors(&mongo, &db, &format!("c{i}")).await;
        }
        total == 0
    })
    .await;
    for server in servers {
        server.stop().await;
    }
}

/// Each instance's `streamgate_relay_owned_cursors` (0 for one that does not answer).
async fn fleet_owners(fleet: &Fleet) -> Vec<f64> {
    let mut owned = Vec::new();
    for instance in &fleet.instances {
        owned.push(instance.metric("streamgate_relay_owned_cursors").await);
    }
    owned
}

/// The fleet test of `ops.rs` (haproxy in front of three processes, `fleet::client_count()`
/// = 300 reconnecting SSE clients, inserts every 20 ms all along) in relay mode, with one
/// `nats-server -js`: the fleet holds one change-stream cursor; the instance holding it (found
/// through the relay metrics) is killed with SIGKILL and another takes it over within 2 s;
/// then a rolling restart. Every client ends with every change exactly once, in order, and
/// mongod with one change-stream cursor for the stream.
#[tokio::test]
async fn fleet_behind_haproxy_in_relay_mode_survives_sigkill_of_the_owner_and_rolling_restart() {
    let nats = NatsServer::start();
    let db = unique_db("relay_fleet");
    let mongo = mongod::shared().client().await;
    let mut fleet = Fleet::start(&db, fleet::client_count(), &relay_toml(&nats)).await;
    let cursors = async || change_stream_cursors(&mongo, &db, "c").await;
    let owner = settled_owner(async || fleet_owners(&fleet).await).await;
    eventually("one cursor for the fleet", WAIT, async || {
        cursors().await == 1
    })
    .await;

    // SIGKILL the owner: its lease is left to expire (lease_ttl_ms), then another instance
    // takes it and opens the cursor after the last change published.
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let mut published_before = 0.0;
    for i in &others {
        published_before += fleet.instances[*i]
            .metric("streamgate_relay_published_total")
            .await;
    }
    let after = fleet.next_seq() + 1;
    let killed = Instant::now();
    fleet.instances[owner].stop("-KILL").await;
    // Measured side by side (a scrape of a busy instance can take a few hundred ms): the lease
    // taken, the first message the new owner published, every client has the next change.
    let metric_sum = async |series: &str| {
        let mut sum = 0.0;
        for i in &others {
            sum += fleet.instances[*i].metric(series).await;
        }
        sum
    };
    let (leased, publishing, delivered) = tokio::join!(
        async {
            eventually("another instance takes the lease", WAIT, async || {
                metric_sum("streamgate_relay_owned_cursors").await == 1.0
            })
            .await;
            killed.elapsed()
        },
        async {
            eventually("the new owner publishes", WAIT, async || {
                metric_sum("streamgate_relay_published_total").await > published_before
            })
            .await;
            killed.elapsed()
        },
        async {
            fleet
                .until_every_client_has(after, "every client has the next change after the kill")
                .await;
            killed.elapsed()
        },
    );
    println!(
        "relay fleet ({} clients): owner (instance {}) killed; lease taken after {leased:?}, \
         first message published by the new owner after {publishing:?}, the next change on \
         every client after {delivered:?}",
        fleet.clients,
        owner + 1,
    );
    // Takeover: the new owner reads the cursor and its changes reach the clients.
    assert!(
        delivered < Duration::from_secs(2),
        "takeover took {delivered:?}"
    );

    fleet.instances[owner].start().await;
    let restarts = fleet.rolling_restart().await;
    settled_owner(async || fleet_owners(&fleet).await).await;
    // The killed owner's cursor is gone too: mongod ends it if a `getMore` was running when
    // the connection closed, else the new owner did (`owner.rs`, `kill_orphans`).
    eventually("one change-stream cursor on mongod", WAIT, async || {
        cursors().await == 1
    })
    .await;
    fleet.finish().await;
    for took in &restarts {
        assert!(*took < Duration::from_secs(30), "a recovery took {took:?}");
    }
}

/// Collections of the database-feed tests' streams (stream `s` on each).
const FEED_COLLS: usize = 6;

/// A relay-mode config with stream `s` on each of `c0` … `c5` of `db` (pipelines that only
/// filter: they share their database's cursor) and `more` streams.
fn feed_config(db: &str, nats: &NatsServer, more: &[(&str, &str, serde_json::Value)]) -> Config {
    let mut config = server::config(mongod::shared());
    for i in 0..FEED_COLLS {
        config.streams.push(server::stream(
            db,
            &format!("c{i}"),
            "s",
            serde_json::json!([]),
        ));
    }
    for (coll, name, pipeline) in more {
        config
            .streams
            .push(server::stream(db, coll, name, pipeline.clone()));
    }
    set_relay(&mut config, nats);
    config
}

/// A relay fleet whose `FEED_COLLS` `$match`-only streams (collections `c0`…) form one
/// database feed, with a reader on every instance for each stream but the last.
struct FeedFleet {
    nats: NatsServer,
    db: String,
    mongo: mongodb::Client,
    colls: Vec<Collection<Document>>,
    servers: Vec<TestServer>,
    /// `(instance, stream, reader)`.
    readers: Vec<(usize, usize, Reader)>,
}

/// A [`reader`]'s task: the seqs it read, and whether it saw an `invalidate`.
type Reader = tokio::task::JoinHandle<(Vec<i64>, bool)>;

impl FeedFleet {
    async fn start(name: &str, instances: usize) -> FeedFleet {
        let nats = NatsServer::start();
        let db = unique_db(name);
        let mongo = mongod::shared().client().await;
        let colls = (0..FEED_COLLS)
            .map(|i| mongo.database(&db).collection(&format!("c{i}")))
            .collect();
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(TestServer::start(feed_config(&db, &nats, &[])).await);
        }
        let mut readers = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            for stream in 0..FEED_COLLS - 1 {
                let path = format!("/{db}/c{stream}/_streams/s");
                readers.push((i, stream, reader(&server.url(""), &path).await));
            }
        }
        FeedFleet {
            nats,
            db,
            mongo,
            colls,
            servers,
            readers,
        }
    }
}

/// A client of `path` at `base`, read by a task of its own until the `seq: -1` that ends the
/// test: its `seq`s in order (and whether the stream ended with an `invalidate`).
async fn reader(base: &str, path: &str) -> Reader {
    let mut client = Client::connect(Kind::Sse, base, path, None).await.unwrap();
    let path = path.to_owned();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            match client.next(WAIT).await {
                Next::Event(event) if event.event == "change" => {
                    if event.data["operationType"] != "insert" {
                        continue;
                    }
                    let seq = event.data["fullDocument"]["seq"].as_i64().expect("seq");
                    if seq < 0 {
                        return (seen, false);
                    }
                    seen.push(seq);
                }
                Next::Event(event) if event.event == "invalidate" => return (seen, true),
                Next::End(_) => return (seen, false),
                other => panic!("{path}: after {} changes: {other:?}", seen.len()),
            }
        }
    })
}

/// Writes `seq` 0, 1, … to every collection of `colls` until `writing` is cancelled, then
/// `seq: -1`; returns the last `seq` written.
fn write_until(
    colls: Vec<Collection<Document>>,
    writing: CancellationToken,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut seq = 0_i64;
        while !writing.is_cancelled() {
            for coll in &colls {
                coll.insert_one(doc! { "seq": seq }).await.unwrap();
            }
            seq += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for coll in &colls {
            coll.insert_one(doc! { "seq": -1_i64 }).await.unwrap();
        }
        seq - 1
    })
}

/// Issue 22 for database feeds: in relay mode the `$match`-only streams of a database share
/// ONE cursor for the whole fleet (read by one instance, published to each stream's subject),
/// not one per stream. 3 instances, 5 streams on 5 collections with a client on every
/// instance: one change-stream cursor on mongod; a 6th stream joins (its clients subscribe on
/// every instance) while changes are written: every client gets every change once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_feed_streams_share_one_cursor_for_the_whole_fleet() {
    // (instance, stream, reader): streams c0 … c4 now, c5 later.
    let FeedFleet {
        nats: _nats,
        db,
        mongo,
        colls,
        servers,
        mut readers,
    } = FeedFleet::start("relay_feed", 3).await;
    let all: Vec<&TestServer> = servers.iter().collect();
    // One instance owns the feed and mongod holds its one cursor (a cursor per stream, 5,
    // before the relay shared database feeds).
    let settled = Instant::now();
    let (mut cursors, mut owners) = (0, Vec::new());
    while settled.elapsed() < WAIT {
        cursors = database_change_stream_cursors(&mongo, &db).await;
        owners = owned(&all);
        if cursors == 1 && owners.iter().sum::<i64>() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "relay database feed: {} streams × 3 instances, clients on every instance: {cursors} \
         change-stream cursor(s) on mongod, owned per instance {owners:?}",
        FEED_COLLS - 1
    );
    assert_eq!(cursors, 1, "one cursor for the fleet's streams");
    let writing = CancellationToken::new();
    let writer = write_until(colls.clone(), writing.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A member joins the fleet's feed while changes are written.
    for (i, server) in servers.iter().enumerate() {
        let stream = FEED_COLLS - 1;
        let path = format!("/{db}/c{stream}/_streams/s");
        readers.push((i, stream, reader(&server.url(""), &path).await));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A join reopens the feed's cursor; the one it replaced may linger for its `getMore`'s
    // wait (100 ms), and a hand-over between instances for a moment.
    eventually(
        "one cursor for the fleet after the join",
        WAIT,
        async || {
            database_change_stream_cursors(&mongo, &db).await == 1
                && owned(&all).iter().sum::<i64>() == 1
        },
    )
    .await;
    writing.cancel();
    let last = writer.await.unwrap();
    let mut changes = 0;
    for (i, stream, reader) in readers {
        let (seen, _) = reader.await.unwrap();
        changes += seen.len();
        if stream == FEED_COLLS - 1 {
            // Subscribed while changes were written: every one after its first.
            let first = *seen.first().expect("the joining stream got changes");
            let expected: Vec<i64> = (first..=last).collect();
            assert_eq!(seen, expected, "instance {i}, the joining stream");
        } else {
            let expected: Vec<i64> = (0..=last).collect();
            assert_eq!(seen, expected, "instance {i}, stream c{stream}");
        }
    }
    println!(
        "relay database feed: {} changes per stream, {changes} delivered, 0 lost, 0 repeated",
        last + 1
    );
    for server in servers {
        server.stop().await;
    }
}

/// The database feed's owner SIGKILLed (frozen first, so that its cursor sits idle on mongod)
/// while changes are written to its 5 streams: another instance takes the feed over and every
/// client of the other instances gets every change once, in order; one cursor on mongod after
/// (the new owner ended the killed one's).
#[tokio::test]
async fn a_database_feed_owner_killed_with_sigkill_is_taken_over_losing_nothing() {
    let nats = NatsServer::start();
    let db = unique_db("relay_feed_kill");
    let mongo = mongod::shared().client().await;
    let names = ["c", "c1", "c2", "c3", "c4"];
    let colls: Vec<Collection<Document>> = names
        .iter()
        .map(|name| mongo.database(&db).collection(name))
        .collect();
    let mut extra = relay_toml_with_lease(&nats, KILL_TEST_LEASE_TTL_MS);
    for name in &names[1..] {
        extra.push_str(&format!(
            "[[streams]]\ndb = {db:?}\ncoll = {name:?}\nname = \"s\"\n"
        ));
    }
    let mut instances: Vec<Instance> = (0..3).map(|_| Instance::new(&db, &extra)).collect();
    for instance in &mut instances {
        instance.start().await;
    }
    let mut readers = Vec::new();
    for (i, instance) in instances.iter().enumerate() {
        for name in names {
            let path = format!("/{db}/{name}/_streams/s");
            readers.push((i, name, reader(&instance.url(), &path).await));
        }
    }
    let owner = settled_owner_with_lease(KILL_TEST_LEASE_TTL_MS, async || {
        instance_owners(&instances).await
    })
    .await;
    eventually("one change-stream cursor on mongod", WAIT, async || {
        database_change_stream_cursors(&mongo, &db).await == 1
    })
    .await;
    let writing = CancellationToken::new();
    let writer = write_until(colls, writing.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    instances[owner].signal("-STOP");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    instances[owner].stop("-KILL").await;
    let others: Vec<&Instance> = (0..3)
        .filter(|i| *i != owner)
        .map(|i| &instances[i])
        .collect();
    eventually(
        "an instance takes the database feed over",
        WAIT,
        async || {
            let mut sum = 0.0;
            for instance in &others {
                sum += instance.metric("streamgate_relay_owned_cursors").await;
            }
            sum == 1.0
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!("relay database feed takeover after SIGSTOP + SIGKILL of the owner: {took:?}");
    assert!(took < Duration::from_secs(2), "takeover took {took:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    writing.cancel();
    let last = writer.await.unwrap();
    let expected: Vec<i64> = (0..=last).collect();
    for (i, name, reader) in readers {
        if i == owner {
            reader.abort();
            continue;
        }
        let (seen, _) = reader.await.unwrap();
        assert_eq!(seen, expected, "instance {i}, stream {name}");
    }
    // The new owner's cursor is open (it read those changes); the killed one's is gone (the
    // new owner ended it: `kill_orphans` finds database cursors by their comment too).
    eventually(
        "the killed owner's idle cursor ended: one cursor on mongod",
        Duration::from_secs(1),
        async || database_change_stream_cursors(&mongo, &db).await == 1,
    )
    .await;
    for instance in &mut instances {
        if instance.is_running() {
            instance.stop("-TERM").await;
        }
    }
}

/// Streams filtering one collection differently share the fleet's feed (one cursor), and each
/// client gets only its own stream's matches (MongoDB judges a batch's changes per `$match`);
/// a stream without a filter on that collection gets all of them.
#[tokio::test]
async fn database_feed_streams_filtering_one_collection_differently_get_only_their_matches() {
    let nats = NatsServer::start();
    let db = unique_db("relay_feed_filters");
    let mongo = mongod::shared().client().await;
    let more = [
        (
            "c0",
            "evens",
            serde_json::json!([{ "$match": { "documentKey._id": { "$mod": [2, 0] } } }]),
        ),
        (
            "c0",
            "odds",
            serde_json::json!([{ "$match": { "documentKey._id": { "$mod": [2, 1] } } }]),
        ),
    ];
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(TestServer::start(feed_config(&db, &nats, &more)).await);
    }
    let mut clients = Vec::new();
    for server in &servers {
        for name in ["evens", "odds", "s"] {
            let path = format!("/{db}/c0/_streams/{name}");
            let client = Client::connect(Kind::Sse, &server.url(""), &path, None)
                .await
                .unwrap();
            clients.push((name, client));
        }
    }
    eventually("one change-stream cursor on mongod", WAIT, async || {
        database_change_stream_cursors(&mongo, &db).await == 1
    })
    .await;

    let coll: Collection<Document> = mongo.database(&db).collection("c0");
    // A burst (batches the cursor holds together), then one by one.
    coll.insert_many((0..40).map(|seq| doc! { "_id": seq, "seq": seq }))
        .await
        .unwrap();
    for seq in 40..60 {
        coll.insert_one(doc! { "_id": seq, "seq": seq })
            .await
            .unwrap();
    }
    for (name, client) in &mut clients {
        let expected: Vec<i64> = match *name {
            "evens" => (0..60).step_by(2).collect(),
            "odds" => (1..60).step_by(2).collect(),
            _ => (0..60).collect(),
        };
        assert_eq!(exactly(client, expected.len()).await, expected, "{name}");
    }
    // (A hand-over between the two instances may leave the old cursor a moment.)
    eventually(
        "still one change-stream cursor on mongod",
        WAIT,
        async || database_change_stream_cursors(&mongo, &db).await == 1,
    )
    .await;
    for server in servers {
        server.stop().await;
    }
}

/// A member's collection dropped: its stream's clients get the `drop` and the `invalidate`
/// on every instance, the fleet feed's other streams go on.
#[tokio::test]
async fn a_dropped_collection_ends_its_database_feed_stream_and_the_others_go_on() {
    let nats = NatsServer::start();
    let db = unique_db("relay_feed_drop");
    let mongo = mongod::shared().client().await;
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(TestServer::start(feed_config(&db, &nats, &[])).await);
    }
    let mut gone = Vec::new();
    let mut stays = Vec::new();
    for server in &servers {
        for (coll, clients) in [("c0", &mut gone), ("c1", &mut stays)] {
            let path = format!("/{db}/{coll}/_streams/s");
            let client = Client::connect(Kind::Sse, &server.url(""), &path, None)
                .await
                .unwrap();
            clients.push(client);
        }
    }
    let (c0, c1): (Collection<Document>, Collection<Document>) = (
        mongo.database(&db).collection("c0"),
        mongo.database(&db).collection("c1"),
    );
    insert_seqs(&c0, 0..3).await;
    for client in &mut gone {
        assert_eq!(exactly(client, 3).await, vec![0, 1, 2]);
    }
    c0.drop().await.unwrap();
    for client in &mut gone {
        let drop_event = client.expect_event(WAIT).await;
        assert_eq!(drop_event.data["operationType"], "drop");
        let invalidate = client.expect_event(WAIT).await;
        assert_eq!(invalidate.event, "invalidate");
        assert!(invalidate.id.is_some());
        assert!(matches!(client.next(WAIT).await, Next::End(_)));
    }
    insert_seqs(&c1, 0..5).await;
    for client in &mut stays {
        assert_eq!(exactly(client, 5).await, (0..5).collect::<Vec<_>>());
    }
    eventually("one change-stream cursor on mongod", WAIT, async || {
        database_change_stream_cursors(&mongo, &db).await == 1
    })
    .await;
    for server in servers {
        server.stop().await;
    }
}

/// A stream whose clients all left (its workers retired, it left the fleet's feed) and one
/// resumes later with its last id, while changes are written: its log stands seconds behind
/// the feed, so it catches up on a cursor of its own (the feed does not rewind the other
/// streams' cursor) and then joins the feed. The resuming client gets every change after its
/// id once, in order; the other streams lose and repeat nothing; one cursor at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_feed_stream_resumed_after_its_workers_retired_catches_up_on_its_own() {
    let FeedFleet {
        nats: _nats,
        db,
        mongo,
        colls,
        servers,
        readers,
    } = FeedFleet::start("relay_feed_rejoin", 2).await;
    let leaving = format!("/{db}/c{}/_streams/s", FEED_COLLS - 1);
    let mut client = Client::connect(Kind::Sse, &servers[0].url(""), &leaving, None)
        .await
        .unwrap();
    let writing = CancellationToken::new();
    let writer = write_until(colls, writing.clone());
    let first = client.changes(10, WAIT).await;
    let last_id = first.last().and_then(|e| e.id.clone()).expect("an id");
    let last_seen = seqs(&first).last().copied().expect("a seq");
    drop(client);
    // Its worker retires (`worker_linger_ms`), the stream leaves the feed; the others go on.
    let catch_ups = || {
        servers
            .iter()
            .map(|s| s.metrics.relay.feed_catch_ups.get())
            .sum::<u64>()
    };
    // Longer than the two mark intervals past which a log counts as far behind.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(catch_ups(), 0);
    let mut client = Client::connect(Kind::Sse, &servers[1].url(""), &leaving, Some(&last_id))
        .await
        .unwrap();
    eventually("the stream caught up on its own", WAIT, async || {
        catch_ups() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    writing.cancel();
    let last = writer.await.unwrap();
    // Every change after its id, then the writer's `seq: -1`.
    let rest: Vec<i64> = ((last_seen + 1)..=last).chain([-1]).collect();
    assert_eq!(exactly(&mut client, rest.len()).await, rest);
    let all: Vec<i64> = (0..=last).collect();
    for (i, stream, reader) in readers {
        let (seen, _) = reader.await.unwrap();
        assert_eq!(seen, all, "instance {i}, stream c{stream}");
    }
    eventually("one change-stream cursor on mongod", WAIT, async || {
        database_change_stream_cursors(&mongo, &db).await == 1
    })
    .await;
    for server in servers {
        server.stop().await;
    }
}

/// Members that could take the fleet's feed down do not: a `$match` MongoDB refuses ends its
/// own stream alone with MongoDB's error (the feed's open is probed member by member; the
/// stream's empty log gets a start before the error, so its worker opens and ends with it),
/// and one whose `$expr` fails
/// on a change is relayed on a cursor of its own, whose error reaches its clients alone. The
/// plain stream of the same database gets every change once, in order.
#[tokio::test]
async fn database_feed_members_that_fail_do_not_take_the_others_down() {
    let nats = NatsServer::start();
    let db = unique_db("relay_feed_fail");
    let mongo = mongod::shared().client().await;
    let more = [
        (
            "bad",
            "s",
            // An invalid regular expression: MongoDB refuses it when a cursor opens.
            serde_json::json!([{ "$match": { "fullDocument.name": { "$regex": "(" } } }]),
        ),
        (
            "b",
            "s",
            serde_json::json!([{ "$match": { "$expr": { "$eq": [{ "$toInt": "$fullDocument.code" }, 5] } } }]),
        ),
    ];
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(TestServer::start(feed_config(&db, &nats, &more)).await);
    }
    let c0: Collection<Document> = mongo.database(&db).collection("c0");
    let path = format!("/{db}/c0/_streams/s");
    let mut good = Vec::new();
    for server in &servers {
        good.push(
            Client::connect(Kind::Sse, &server.url(""), &path, None)
                .await
                .unwrap(),
        );
    }
    insert_seqs(&c0, 0..2).await;
    for client in &mut good {
        assert_eq!(exactly(client, 2).await, vec![0, 1]);
    }
    let bad = format!("/{db}/bad/_streams/s");
    let mut refused = Client::connect(Kind::Sse, &servers[1].url(""), &bad, None)
        .await
        .unwrap();
    let error = refused.expect_event(WAIT).await;
    assert_eq!(error.event, "error", "{error:?}");
    let message = error.data["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Regular expression is invalid"),
        "{error:?}"
    );
    assert!(matches!(refused.next(WAIT).await, Next::End(_)));
    let poison = format!("/{db}/b/_streams/s");
    let mut poisoned = Client::connect(Kind::Sse, &servers[0].url(""), &poison, None)
        .await
        .unwrap();
    let b: Collection<Document> = mongo.database(&db).collection("b");
    b.insert_one(doc! { "code": "x" }).await.unwrap();
    let error = poisoned.expect_event(WAIT).await;
    assert_eq!(error.event, "error", "{error:?}");
    let message = error.data["message"].as_str().unwrap_or_default();
    assert!(message.contains("Failed to parse number 'x'"), "{error:?}");
    insert_seqs(&c0, 2..5).await;
    for client in &mut good {
        assert_eq!(exactly(client, 3).await, vec![2, 3, 4]);
    }
    for server in servers {
        server.stop().await;
    }
}
