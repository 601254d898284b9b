//! The cursor budget serves the living (issue 23 item 5): a worker whose clients left lingers
//! on a loan of its slot, which the next subscriber the budget would refuse takes (the
//! longest-idle one first); a client coming back to a closed worker misses nothing; and one
//! principal cannot churn through new bindings faster than `limits.new_bindings_per_minute`.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Value, json};
use streamgate::config::Config;

use crate::harness::clients::{Client, Kind, Next};
use crate::harness::eventually;
use crate::harness::fixture::{Fixture, seqs};

const WAIT: Duration = Duration::from_secs(10);

/// The churning address (the well-behaved clients come from 127.0.0.1).
fn churner() -> IpAddr {
    "127.0.0.2".parse().unwrap()
}

/// Stream `c`/`s` filtered by a `$var` inside `$expr`: not routable, so every binding needs a
/// cursor (a worker) of its own. Workers linger far longer than the test, so that only the
/// budget's own rule can free their slots; keep-alives every second, so a dropped client is
/// noticed quickly.
fn unroutable(config: &mut Config) {
    config.streams[0].definition.pipeline = json!([{ "$match": { "$expr": {
        "$eq": ["$fullDocument.owner", { "$var": "who" }] } } }]);
    config.worker_linger_ms = 600_000;
    config.keepalive_secs = 1;
}

fn bound_path(f: &Fixture, who: &str) -> String {
    let avars = json!({ "who": who }).to_string();
    let encoded: String = avars
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("{}?avars={encoded}", f.path)
}

/// An SSE request for `who`'s binding from `from`: the open response (its stream held while
/// it lives), or the refusal.
async fn open(
    f: &Fixture,
    who: &str,
    from: IpAddr,
) -> Result<reqwest::Response, reqwest::Response> {
    let client = reqwest::Client::builder()
        .local_address(from)
        .build()
        .unwrap();
    let response = tokio::time::timeout(
        WAIT,
        client
            .get(f.server.url(&bound_path(f, who)))
            .header("accept", "text/event-stream")
            .send(),
    )
    .await
    .expect("answered in time")
    .expect("request");
    if response.status() == 200 {
        Ok(response)
    } else {
        Err(response)
    }
}

async fn connect(f: &Fixture, who: &str, last_id: Option<&str>) -> Result<Client, String> {
    Client::connect(Kind::Sse, &f.server.url(""), &bound_path(f, who), last_id)
        .await
        .map_err(|refused| format!("{refused:?}"))
}

async fn insert(f: &Fixture, owner: &str, seq: i64) {
    f.coll
        .insert_one(mongodb::bson::doc! { "owner": owner, "seq": seq })
        .await
        .unwrap();
}

/// Waits until every worker of the stream but those of `busy` bindings has no clients.
async fn idle_but(f: &Fixture, busy: usize) {
    eventually("departed clients are noticed", WAIT, async || {
        let workers = f.server.registry.workers_of(&f.key());
        workers.iter().filter(|w| w.client_count() > 0).count() == busy
    })
    .await;
}

/// The table row: one address (`per_ip = 2`) opens and drops distinct unroutable
/// bindings in a loop; their workers linger. Before, every later new binding got 503
/// `max_bindings_per_stream` for as long as they lingered; now a fresh binding from another
/// principal takes the slot of the longest-idle one, while a binding with a client beside the
/// churn is never closed and misses nothing.
#[tokio::test]
async fn churned_bindings_do_not_lock_a_fresh_binding_out() {
    const CHURN: usize = 8;
    let f = Fixture::start("budget_churn", |config| {
        unroutable(config);
        config.limits.max_bindings_per_stream = 3;
        config.limits.per_ip = Some(2);
    })
    .await;
    // A well-behaved client, connected all along.
    let mut keeper = connect(&f, "keep", None).await.unwrap();
    insert(&f, "keep", 0).await;
    assert_eq!(seqs(&keeper.changes(1, WAIT).await), vec![0]);

    // The churn: each binding opened, then dropped (retrying while its address is at per_ip).
    let mut refused = 0;
    for n in 0..CHURN {
        let who = format!("churn{n}");
        loop {
            match open(&f, &who, churner()).await {
                Ok(stream) => {
                    drop(stream);
                    break;
                }
                Err(response) if response.status() == 429 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(response) => {
                    // A churned client the server has not noticed gone yet still holds its
                    // slot: that is a refusal the churner earned, and the test goes on.
                    assert_eq!(response.status(), 503);
                    refused += 1;
                    break;
                }
            }
        }
        insert(&f, "keep", n as i64 + 1).await;
    }
    eprintln!("churner refused {refused} of {CHURN}");
    idle_but(&f, 1).await;
    assert_eq!(
        f.server.registry.workers_of(&f.key()).len(),
        3,
        "the lingering"
    );

    // A fresh binding from another principal: served, and live.
    let mut fresh = connect(&f, "fresh", None)
        .await
        .expect("a fresh binding is served while idle workers hold the slots");
    insert(&f, "fresh", 100).await;
    assert_eq!(seqs(&fresh.changes(1, WAIT).await), vec![100]);
    // Every churned binding past the first two (and the fresh one) took an idle worker's slot,
    // unless the churner was refused.
    let evictions = f.server.metrics.upstream_idle_evictions.get() as usize;
    assert!(
        evictions + refused > CHURN - 2,
        "{evictions} idle workers closed"
    );
    assert!(f.server.registry.workers_of(&f.key()).len() <= 3);

    // The keeper's worker was never closed: every change, once, in order, no error.
    insert(&f, "keep", 99).await;
    let expected: Vec<i64> = (0..=CHURN as i64).chain([99]).collect();
    let mut got = vec![0];
    got.extend(seqs(&keeper.changes(expected.len() - 1, WAIT).await));
    assert_eq!(got, expected);
    assert!(matches!(
        keeper.next(Duration::from_millis(200)).await,
        Next::Timeout
    ));
    f.server.stop().await;
}

/// A worker's slot is taken only from a worker without clients: a client that came back to
/// its lingering worker keeps it (the new binding is refused instead), and a client whose
/// worker was closed while it was away resumes on a new one with every change it missed,
/// exactly once.
#[tokio::test]
async fn a_client_back_after_its_worker_was_closed_misses_nothing() {
    let f = Fixture::start("budget_back", |config| {
        unroutable(config);
        config.limits.max_bindings_per_stream = 1;
    })
    .await;
    let mut a = connect(&f, "x", None).await.unwrap();
    insert(&f, "x", 0).await;
    let first = a.changes(1, WAIT).await;
    let id = first[0].id.clone().expect("id");
    drop(a);
    idle_but(&f, 0).await;

    // Back while its worker lingers: the same worker (no new cursor), and it is living again,
    // so a new binding cannot have its slot.
    let opened = f.server.metrics.cursors_opened.get();
    let mut a = connect(&f, "x", Some(&id)).await.unwrap();
    assert_eq!(f.server.metrics.cursors_opened.get(), opened);
    let refused = connect(&f, "y", None).await.err().expect("refused");
    assert!(refused.contains("503"), "{refused}");
    assert!(refused.contains("max_bindings_per_stream"), "{refused}");
    insert(&f, "x", 1).await;
    let seen = a.changes(1, WAIT).await;
    assert_eq!(seqs(&seen), vec![1]);
    let id = seen[0].id.clone().expect("id");
    drop(a);
    idle_but(&f, 0).await;

    // Away: its worker is closed for y's binding, and changes go on.
    insert(&f, "x", 2).await;
    let mut b = connect(&f, "y", None).await.unwrap();
    assert_eq!(f.server.metrics.upstream_idle_evictions.get(), 1);
    insert(&f, "x", 3).await;
    insert(&f, "y", 50).await;
    assert_eq!(seqs(&b.changes(1, WAIT).await), vec![50]);
    drop(b);
    idle_but(&f, 0).await;

    // Back with its last id: y's idle worker makes room, and x misses nothing.
    let mut a = connect(&f, "x", Some(&id)).await.unwrap();
    assert_eq!(f.server.metrics.upstream_idle_evictions.get(), 2);
    insert(&f, "x", 4).await;
    assert_eq!(seqs(&a.changes(3, WAIT).await), vec![2, 3, 4]);
    assert!(matches!(
        a.next(Duration::from_millis(200)).await,
        Next::Timeout
    ));
    f.server.stop().await;
}

/// `limits.new_bindings_per_minute` at its bound: a principal's first N new bindings start,
/// the next gets 429 with `Retry-After` and a problem naming the setting; joining a running
/// binding is not a new one, and another principal has its own allowance.
#[tokio::test]
async fn new_bindings_past_the_per_principal_bound_get_429() {
    let f = Fixture::start("budget_rate", |config| {
        unroutable(config);
        config.limits.new_bindings_per_minute = 3;
        config.limits.new_bindings_burst = 3;
        // Beside it: a routable `$var` stream (one cursor for every binding) and a plain one.
        let mut routable = config.streams[0].clone();
        routable.name = "routable".into();
        routable.definition.pipeline =
            json!([{ "$match": { "fullDocument.owner": { "$var": "who" } } }]);
        let mut plain = config.streams[0].clone();
        plain.name = "plain".into();
        plain.definition.pipeline = json!([]);
        config.streams.extend([routable, plain]);
    })
    .await;
    let mut held = Vec::new();
    for n in 0..3 {
        held.push(open(&f, &format!("b{n}"), churner()).await.unwrap());
    }
    let refusal = open(&f, "b3", churner()).await.unwrap_err();
    assert_eq!(refusal.status(), 429);
    // Three a minute: the next one in 20 s (ceil; the clock ran a little meanwhile).
    let retry: u64 = refusal.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        refusal.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = refusal.json().await.unwrap();
    assert_eq!(body["status"], 429);
    assert_eq!(body["limit"], "new_bindings_per_minute", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("new_bindings_per_minute"),
        "{body}"
    );
    // No cursor was started for it.
    assert_eq!(f.server.registry.workers_of(&f.key()).len(), 3);
    // A running binding is joined, not started: not counted. Nor are routable bindings and
    // streams without variables: they never need a cursor of their own per client.
    held.push(open(&f, "b0", churner()).await.unwrap());
    let client = reqwest::Client::builder()
        .local_address(churner())
        .build()
        .unwrap();
    for path in [
        bound_path(&f, "r1").replace("/_streams/s?", "/_streams/routable?"),
        bound_path(&f, "r2").replace("/_streams/s?", "/_streams/routable?"),
        f.path.replace("/_streams/s", "/_streams/plain"),
    ] {
        let response = client
            .get(f.server.url(&path))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        held.push(response);
    }
    // Another principal (address) starts the same binding the churner was refused.
    let mut other = connect(&f, "b3", None).await.unwrap();
    insert(&f, "b3", 7).await;
    assert_eq!(seqs(&other.changes(1, WAIT).await), vec![7]);
    let refusals = f
        .server
        .metrics
        .connection_refusals
        .get_or_create(&streamgate::metrics::LimitLabel {
            limit: "new_bindings_per_minute",
        })
        .get();
    assert_eq!(refusals, 1);
    drop(held);
    f.server.stop().await;
}

/// A resume older than its worker's ring needs a catch-up cursor, a slot of `max_workers`:
/// before, it got 503 `max_workers` while an idle worker held the last slot; now the idle
/// worker gives its slot up and the client gets every change it missed, once.
#[tokio::test]
async fn a_catch_up_takes_the_slot_of_an_idle_worker() {
    let f = Fixture::start("budget_catchup", |config| {
        unroutable(config);
        config.ring_size = 5;
        config.limits.max_workers = 2;
    })
    .await;
    let mut a = connect(&f, "x", None).await.unwrap();
    for seq in 0..10 {
        insert(&f, "x", seq).await;
    }
    let ids: Vec<String> = a
        .changes(10, WAIT)
        .await
        .into_iter()
        .map(|e| e.id.expect("id"))
        .collect();
    drop(connect(&f, "y", None).await.unwrap());
    idle_but(&f, 1).await;
    let catch_ups = f.server.metrics.catchups.get();
    // Behind x's 5-event ring: a third cursor.
    let mut behind = connect(&f, "x", Some(&ids[0]))
        .await
        .expect("served: the idle worker gives up its slot");
    assert_eq!(
        seqs(&behind.changes(9, WAIT).await),
        (1..10).collect::<Vec<_>>()
    );
    assert_eq!(f.server.metrics.catchups.get(), catch_ups + 1);
    assert_eq!(f.server.metrics.upstream_idle_evictions.get(), 1);
    insert(&f, "x", 10).await;
    assert_eq!(seqs(&behind.changes(1, WAIT).await), vec![10]);
    assert_eq!(seqs(&a.changes(1, WAIT).await), vec![10]);
    f.server.stop().await;
}

/// A principal's lingering bindings are bounded (`limits.idle_bindings_per_principal`): one
/// address that opens and drops distinct unroutable bindings leaves at most that many idle
/// cursors behind (before, one per binding for as long as they lingered: the noisy-neighbour
/// bench's binding churn held a dozen extra cursors on mongod), and only its own: another
/// principal's lingering binding is not touched.
#[tokio::test]
async fn a_churning_principal_leaves_at_most_its_bound_of_lingering_bindings() {
    const CHURN: usize = 8;
    const BOUND: usize = 2;
    let f = Fixture::start("budget_idle_bound", |config| {
        unroutable(config);
        // Neither the rate nor the stream's budget is what stops the churn here.
        config.limits.new_bindings_burst = 100;
        config.limits.idle_bindings_per_principal = BOUND;
    })
    .await;
    // Another principal's binding, lingering since its client left.
    let keep = connect(&f, "keep", None).await.unwrap();
    drop(keep);
    idle_but(&f, 0).await;

    for n in 0..CHURN {
        let stream = open(&f, &format!("churn{n}"), churner())
            .await
            .unwrap_or_else(|refused| panic!("churn{n}: {}", refused.status()));
        drop(stream);
        idle_but(&f, 0).await;
    }
    let workers = f.server.registry.workers_of(&f.key());
    assert_eq!(
        workers.len(),
        BOUND + 1,
        "the churner's {BOUND} most recent bindings and the other principal's one"
    );
    assert_eq!(
        f.server.metrics.upstream_idle_evictions.get() as usize,
        CHURN - BOUND
    );

    // The other principal's binding was kept: its client comes back to it (no new worker),
    // and it is live.
    let mut keep = connect(&f, "keep", None).await.unwrap();
    assert_eq!(f.server.registry.workers_of(&f.key()).len(), BOUND + 1);
    insert(&f, "keep", 7).await;
    assert_eq!(seqs(&keep.changes(1, WAIT).await), vec![7]);
    f.server.stop().await;
}
