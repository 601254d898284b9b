//! The relay tier (issue 22, `[relay]`): instances sharing one mongod and one `nats-server -js`
//! hold ONE change-stream cursor per stream between them, every client of every instance gets
//! every change exactly once, and when the cursor's owner stops or is killed another instance
//! takes the cursor over from the last change published, losing and repeating nothing.

use std::process::Stdio;
use std::time::{Duration, Instant};

use mongodb::bson::doc;
use streamgate::config::Config;

use crate::harness::clients::{Client, Kind, Next};
use crate::harness::eventually;
use crate::harness::fixture::{insert_seqs, seqs};
use crate::harness::fleet::{self, Fleet};
use crate::harness::mongod::{self, change_stream_cursors, free_port};
use crate::harness::nats::NatsServer;
use crate::harness::server::{self, TestServer};
use crate::harness::unique_db;

const WAIT: Duration = Duration::from_secs(30);

/// A relay-mode config for stream `c`/`s` of `db` on the shared replica set.
fn relay_config(db: &str, nats: &NatsServer) -> Config {
    let mut config = server::config(mongod::shared());
    config
        .streams
        .push(server::stream(db, "c", "s", serde_json::json!([])));
    config.relay.nats_url = Some(nats.url());
    config.relay.lease_ttl_ms = 1_000;
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

#[tokio::test]
async fn three_instances_hold_one_cursor_and_a_stopped_owner_hands_it_over_exactly_once() {
    let nats = NatsServer::start();
    let db = unique_db("relay_one");
    let mongo = mongod::shared().client().await;
    let coll = mongo.database(&db).collection("c");
    let a = TestServer::start(relay_config(&db, &nats)).await;
    let b = TestServer::start(relay_config(&db, &nats)).await;
    let c = TestServer::start(relay_config(&db, &nats)).await;
    // The first subscriber's instance takes the cursor; the others read its log.
    let mut on_a = subscribe(&a, &db, Kind::Sse).await;
    let mut on_b = subscribe(&b, &db, Kind::Ws).await;
    let mut on_c = subscribe(&c, &db, Kind::Ndjson).await;
    let mut also_on_c = subscribe(&c, &db, Kind::Sse).await;
    assert_eq!(owned(&[&a, &b, &c]), vec![1, 0, 0]);
    eventually("one change-stream cursor on mongod", WAIT, async || {
        change_stream_cursors(&mongo, &db, "c").await == 1
    })
    .await;

    insert_seqs(&coll, 0..100).await;
    let all: Vec<i64> = (0..100).collect();
    for client in [&mut on_a, &mut on_b, &mut on_c, &mut also_on_c] {
        assert_eq!(exactly(client, 100).await, all);
    }
    assert_eq!(change_stream_cursors(&mongo, &db, "c").await, 1);
    // The owner published them (and its opening position); every instance applied them.
    assert!(a.metrics.relay.published.get() > 100);
    assert_eq!(b.metrics.relay.published.get(), 0);
    assert_eq!(a.metrics.relay.takeovers.get(), 1);
    for server in [&a, &b, &c] {
        assert!(server.metrics.relay.delivery_lag.count() >= 100);
    }
    assert!(a.metrics.relay.publish_lag.count() >= 100);

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
    drop(on_a);
    let stopped = Instant::now();
    a.stop().await;
    let took = eventually("another instance owns the cursor", WAIT, async || {
        owned(&[&b, &c]).iter().sum::<i64>() == 1
    })
    .await;
    eprintln!(
        "relay hand-over after a graceful stop: {:?} (stop took {:?})",
        took,
        stopped.elapsed() - took
    );
    writer.await.unwrap();
    let all: Vec<i64> = (100..300).collect();
    for client in [&mut on_b, &mut on_c, &mut also_on_c] {
        assert_eq!(exactly(client, 200).await, all);
    }
    eventually(
        "still one change-stream cursor on mongod",
        WAIT,
        async || change_stream_cursors(&mongo, &db, "c").await == 1,
    )
    .await;
    b.stop().await;
    c.stop().await;
}

/// `streamgate --config <file>` in relay mode on a port of its own, killed on drop.
async fn spawn_instance(db: &str, nats: &NatsServer) -> (tokio::process::Child, String) {
    let port = free_port();
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\nmongo_uri = {:?}\nworker_linger_ms = 300\n\
         [relay]\nnats_url = {:?}\nlease_ttl_ms = 1000\n\
         [[streams]]\ndb = {db:?}\ncoll = \"c\"\nname = \"s\"\n",
        mongod::shared().uri(),
        nats.url(),
    );
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
        .arg("--config")
        .arg(file.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let ready = format!("{base}/health/ready");
    eventually("the spawned instance is ready", WAIT, async || {
        reqwest::get(&ready)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    // The config file must outlive the read of it at startup only.
    drop(file);
    (child, base)
}

#[tokio::test]
async fn an_owner_killed_with_sigkill_is_taken_over_within_two_seconds_losing_nothing() {
    let nats = NatsServer::start();
    let db = unique_db("relay_kill");
    let mongo = mongod::shared().client().await;
    let coll = mongo.database(&db).collection("c");
    // The owner is a process of its own, so that it can really be killed.
    let (mut owner, owner_url) = spawn_instance(&db, &nats).await;
    let mut on_owner = Client::connect(Kind::Sse, &owner_url, &format!("/{db}/c/_streams/s"), None)
        .await
        .unwrap();
    let b = TestServer::start(relay_config(&db, &nats)).await;
    let c = TestServer::start(relay_config(&db, &nats)).await;
    let mut on_b = subscribe(&b, &db, Kind::Sse).await;
    let mut on_c = subscribe(&c, &db, Kind::Ws).await;
    assert_eq!(owned(&[&b, &c]), vec![0, 0], "the spawned instance owns");
    insert_seqs(&coll, 0..20).await;
    let first: Vec<i64> = (0..20).collect();
    assert_eq!(seqs(&on_owner.changes(20, WAIT).await), first);
    assert_eq!(exactly(&mut on_b, 20).await, first);
    assert_eq!(exactly(&mut on_c, 20).await, first);
    assert_eq!(change_stream_cursors(&mongo, &db, "c").await, 1);

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
    let pid = owner.id().unwrap().to_string();
    let frozen = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(frozen.success());
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    owner.start_kill().unwrap();
    owner.wait().await.unwrap();
    eventually("an instance takes the cursor over", WAIT, async || {
        owned(&[&b, &c]).iter().sum::<i64>() == 1
    })
    .await;
    // Taken over: the next change written reaches the clients.
    let took = killed.elapsed();
    eprintln!("relay takeover after SIGSTOP + SIGKILL of the owner: {took:?}");
    assert!(took < Duration::from_secs(2), "takeover took {took:?}");
    writer.await.unwrap();
    let rest: Vec<i64> = (20..400).collect();
    assert_eq!(exactly(&mut on_b, 380).await, rest);
    assert_eq!(exactly(&mut on_c, 380).await, rest);
    // The new owner's cursor is open (it read those changes); the killed one's is gone.
    eventually(
        "the killed owner's idle cursor ended: one cursor on mongod",
        Duration::from_secs(1),
        async || change_stream_cursors(&mongo, &db, "c").await == 1,
    )
    .await;
    drop(on_owner);
    b.stop().await;
    c.stop().await;
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
    let relay = format!(
        "[relay]\nnats_url = {:?}\nlease_ttl_ms = 1000\n",
        nats.url()
    );
    let mut fleet = Fleet::start(&db, fleet::client_count(), &relay).await;
    let cursors = async || change_stream_cursors(&mongo, &db, "c").await;
    assert_eq!(cursors().await, 1, "one cursor for the fleet");
    let owners = fleet_owners(&fleet).await;
    assert_eq!(owners.iter().sum::<f64>(), 1.0, "one owner: {owners:?}");
    let owner = owners.iter().position(|o| *o == 1.0).unwrap();

    // SIGKILL the owner: its lease is left to expire (lease_ttl_ms), then another instance
    // takes it and opens the cursor after the last change published.
    let after = fleet.next_seq() + 1;
    let killed = Instant::now();
    fleet.instances[owner].stop("-KILL").await;
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
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
                metric_sum("streamgate_relay_published_total").await > 0.0
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
    let owners = fleet_owners(&fleet).await;
    assert_eq!(owners.iter().sum::<f64>(), 1.0, "one owner: {owners:?}");
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
