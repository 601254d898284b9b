//! Issue 8's upstream fan-in scenarios, each against a fresh `streamgate` with its DEFAULT
//! configuration (the config file holds only `listen`, `mongo_uri` and the streams), each
//! reporting what it costs upstream ([`crate::upstream`]):
//!
//! * `streams`: N streams on N collections, one SSE client each, subscribed one after another
//!   (time to the response head), then one insert per second on each; then cold subscribes
//!   while the N workers run.
//! * `bindings`: one stream `{"$match": {"fullDocument.owner": {"$var": "who"}}}`, K clients
//!   with K distinct owners, subscribed one after another; inserts spread over the owners;
//!   counts events a client gets of another owner (must be 0).
//! * `restart-storm`: N SSE clients hold positions (`--positions` distinct ids); the server is
//!   SIGKILLed; events are inserted while it is down; it restarts on the same address; every
//!   client reconnects with its `Last-Event-ID` at once; then a few live events. Counts every
//!   event each client should get after its id: lost, duplicated, reordered.
//! * `burst`: 1,000 SSE clients, 5,000 inserts as fast as possible (`insert_many` of 500).
//! * `bulk`: one client reading as fast as it can, 20 × `insert_many(1000)` of 2 KB documents,
//!   then a single `insert_many(20000)`.
//! * `stall`: a client with a 4 KiB receive buffer that never reads while 2 KB events flow
//!   (and a second client that reads): when does the server close it, and what does it hold.
//!
//! * `membership`: K SSE clients (default 1,000) over 100 owners of one stream filtered by a
//!   JWT claim (`match = { "fullDocument.owner" = { "$claim" = "owner" } }`, auth on, each
//!   client with an HS256 token naming its owner), updates at `--rate` (default 100/s)
//!   for `--events-secs` of documents that stay with their owner; the same run with the
//!   definition's `membership = false`, then with membership on (pre-images on the collection
//!   in both), to compare their latency (issue 19: p99 within 1.2x).
//!
//! Every phase is bounded (`--subscribe-secs`, `--drain-secs`, `--max-secs`, `--stall-secs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use mongodb::bson::Document;
use tokio::sync::Semaphore;

use crate::client::{self, ClientResult, Expect, Shared, Target, Transport, now_us};
use crate::env::{self, Server, ServerSpec, StreamSpec};
use crate::report::{Percentiles, Report, Stall};
use crate::upstream::{Probe, ServerCounters, Snapshot};
use crate::{
    Cli, Cpu, Ctx, Mode, Place, Scenario, Shape, insert_docs, join_clients, owner, wait_connected,
    wait_delivered,
};

/// The scenarios (`all`: each at its default size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FanIn {
    /// N streams × 1 client, 1 insert/s each, cold subscribes (`--size`, default 40).
    Streams,
    /// One `$var` stream, K distinct bindings (`--size`, default 120).
    Bindings,
    /// N SSE clients resume after SIGKILL + restart (`--size`, default 300; `--positions`).
    RestartStorm,
    /// 1,000 SSE clients, 5,000 inserts as fast as possible (`--size` clients).
    Burst,
    /// One reader, 20 × insert_many(1000) and one insert_many(20000) of 2 KB documents.
    Bulk,
    /// A client that stops reading while events flow.
    Stall,
    /// Every scenario above at its default size.
    All,
    /// Issue 23: 100 well-behaved SSE clients beside an abuser (`--abuser`; not part of `all`).
    Noisy,
    /// Issue 19: K SSE clients × 100 updates/s on an owner-bound stream, membership off then
    /// on (`--size` clients, default 1000; not part of `all`).
    Membership,
}

/// The pipeline of the `bindings` stream, as TOML.
const BY_OWNER: &str = r#"[ { "$match" = { "fullDocument.owner" = { "$var" = "who" } } } ]"#;

/// Bytes of padding per document in `bulk` and `stall` (the issue's 2 KB documents).
const PAD: usize = 2000;

/// The most clients `which` opens at once (for the open-files check).
pub fn most_clients(which: FanIn, cli: &Cli) -> usize {
    let size = |default: usize| cli.size.unwrap_or(default);
    match which {
        FanIn::Streams => size(40) + cli.cold + 1,
        FanIn::Bindings => size(120),
        // Held before the kill and reconnecting after it, never both.
        FanIn::RestartStorm => size(300) + 1,
        FanIn::Burst => size(1000) + 1,
        FanIn::Bulk | FanIn::Stall => 2,
        FanIn::Noisy => 130,
        FanIn::Membership => size(1000),
        FanIn::All => [300 + 1, 1000 + 1, 40 + cli.cold + 1, 120]
            .into_iter()
            .max()
            .unwrap_or(0),
    }
}

/// Runs `which`, handing each report to `on_report` as soon as it is complete.
pub async fn run(ctx: &Ctx, which: FanIn, on_report: &mut dyn FnMut(Report)) -> Result<(), String> {
    let cli = &ctx.cli;
    let each = match which {
        FanIn::All => vec![
            FanIn::Streams,
            FanIn::Bindings,
            FanIn::RestartStorm,
            FanIn::Burst,
            FanIn::Bulk,
            FanIn::Stall,
        ],
        FanIn::Noisy => return crate::noisy::run(ctx, cli.abuser, on_report).await,
        one => vec![one],
    };
    // With `all`, `--size` would mean different things to different scenarios: ignore it.
    let size = |default: usize| match which {
        FanIn::All => default,
        _ => cli.size.unwrap_or(default),
    };
    for scenario in each {
        let load_before = env::loadavg();
        let mut reports = match scenario {
            FanIn::Streams => vec![streams(ctx, size(40)).await?],
            FanIn::Bindings => vec![bindings(ctx, size(120)).await?],
            FanIn::RestartStorm => vec![restart_storm(ctx, size(300)).await?],
            FanIn::Burst => vec![burst(ctx, size(1000)).await?],
            FanIn::Bulk => {
                vec![bulk(ctx, 1000).await?, bulk(ctx, 20_000).await?]
            }
            FanIn::Stall => vec![stall(ctx).await?],
            FanIn::Membership => vec![
                membership(ctx, size(1000), false).await?,
                membership(ctx, size(1000), true).await?,
            ],
            FanIn::All | FanIn::Noisy => Vec::new(),
        };
        for report in &mut reports {
            report.loadavg = [load_before, env::loadavg()];
        }
        reports.into_iter().for_each(&mut *on_report);
    }
    Ok(())
}

/// A fresh server with the default configuration and these streams.
async fn start(ctx: &Ctx, streams: &[StreamSpec]) -> Result<Server, String> {
    start_with(ctx, streams, None).await
}

/// [`start`] with more top-level TOML in the server's config (an `[auth]` table).
async fn start_with(
    ctx: &Ctx,
    streams: &[StreamSpec],
    more_toml: Option<&str>,
) -> Result<Server, String> {
    Server::start(
        &ServerSpec {
            bin: &ctx.server_bin,
            mongo_uri: &ctx.mongo_uri,
            streams,
            client_queue: None,
            dir: &ctx.dir,
            env: &ctx.cli.server_env(),
            wrapper: &[],
            relay_url: ctx.relay_url.as_deref(),
            more_toml,
        },
        Duration::from_secs(30),
    )
    .await
}

/// A collection name unique to this run of the tool (a `--mongo-uri` database may be reused).
fn coll_name(tag: &str) -> String {
    format!("{tag}_{}", std::process::id())
}

/// Spawns one client per target, each with its expectation and resume id.
fn spawn_clients(
    ctx: &Ctx,
    clients: Vec<(Arc<Target>, Expect, Option<String>)>,
    gate: &Arc<Semaphore>,
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<ClientResult>> {
    clients
        .into_iter()
        .enumerate()
        .map(|(i, (target, expect, resume))| {
            ctx.clients_rt.spawn(client::run_client(
                i,
                Transport::Sse,
                target,
                expect,
                resume,
                Arc::clone(gate),
                Arc::clone(shared),
            ))
        })
        .collect()
}

/// Fills the delivery figures of `report` once the clients have stopped.
pub(crate) fn finish(
    report: &mut Report,
    shared: &Shared,
    results: &[ClientResult],
    since_us: i64,
) {
    report.deliveries = shared.delivered.load(Ordering::Relaxed);
    let last = shared.last_delivery_us.load(Ordering::Relaxed);
    report.delivery_secs = ((last - since_us) as f64 / 1e6).max(0.0);
    if report.delivery_secs > 0.0 {
        report.deliveries_per_sec = report.deliveries as f64 / report.delivery_secs;
    }
    report.latency_ms = Percentiles::from_us(&shared.merged());
    // Only the clients that connected: the others are counted in `clients - connected`.
    let connected: Vec<ClientResult> = results
        .iter()
        .filter(|r| r.connect_us.is_some())
        .cloned()
        .collect();
    let expected: u64 = connected.iter().map(|r| r.unique + r.lost).sum();
    let failed = results.len() - connected.len();
    report.add_clients(&connected, 0);
    report.expected_deliveries = expected;
    if let (Some(base), Some(conn)) = (report.server_rss_base_kib, report.server_rss_connected_kib)
        && report.connected > 0
    {
        report.server_rss_per_client_kib =
            Some((conn as f64 - base as f64) / report.connected as f64);
    }
    if failed > 0 {
        let first = results
            .iter()
            .find_map(|r| r.connect_us.is_none().then(|| r.error.clone()).flatten());
        report.client_errors.insert(
            format!(
                "not subscribed: {}",
                first
                    .unwrap_or_default()
                    .chars()
                    .take(60)
                    .collect::<String>()
            ),
            failed,
        );
    }
}

/// `streams`: N streams on N collections, one client each.
async fn streams(ctx: &Ctx, n: usize) -> Result<Report, String> {
    let cli = &ctx.cli;
    let tag = coll_name(&format!("streams{n}"));
    let cold = cli.cold;
    let colls: Vec<String> = (0..n + cold).map(|i| format!("{tag}_{i}")).collect();
    let specs: Vec<StreamSpec> = colls
        .iter()
        .map(|c| StreamSpec::all(&cli.db, c, "all"))
        .collect();
    eprintln!("bench: streams: {n} streams (+{cold} cold), one client each, default config");
    let server = start(ctx, &specs).await?;
    let target = |i: usize| Arc::new(Target::stream(server.addr, &cli.db, &colls[i], "all"));
    let events = cli.events_secs.max(1);
    let mut report = Report {
        scenario: format!("streams x{n}"),
        mode: "streams".into(),
        transport: "sse".into(),
        clients: n,
        docs: events,
        rate: 1.0,
        ..Report::default()
    };
    let before = Snapshot::take(&ctx.mongo, server.addr).await;
    let probe = Probe::start(&ctx.mongo);
    report.server_rss_base_kib = env::rss_kib(server.pid());

    // One after another: a gate of one.
    let shared = Shared::new(64);
    let clients = (0..n)
        .map(|i| (target(i), Expect::range(0, events), None))
        .collect();
    let handles = spawn_clients(ctx, clients, &Arc::new(Semaphore::new(1)), &shared);
    report.connect_all_secs =
        wait_connected(&shared, n, Duration::from_secs_f64(cli.subscribe_secs)).await;
    report.connected = shared.connected.load(Ordering::Acquire);
    report.server_rss_connected_kib = env::rss_kib(server.pid());

    // Cold subscribes while the workers run and the inserts flow.
    let cold_targets: Vec<Arc<Target>> = (n..n + cold).map(target).collect();
    let cold_task = ctx.clients_rt.spawn(cold_subscribes(cold_targets));
    let cpu0 = Cpu::read(ctx, Some(server.pid()));
    let first_insert_us = now_us();
    let db = ctx.mongo.database(&cli.db);
    let colls_written: Vec<mongodb::Collection<Document>> =
        colls[..n].iter().map(|c| db.collection(c)).collect();
    let inserted = insert_round_robin(&colls_written, events).await?;
    report.insert_rate = inserted as f64 / ((now_us() - first_insert_us) as f64 / 1e6).max(1e-9);
    wait_delivered(&shared, report.connected, true, cli).await;
    let cpu1 = Cpu::read(ctx, Some(server.pid()));
    cpu0.fill(&cpu1, &mut report);
    let (cold_hist, cold_failed, cold_open) = cold_task
        .await
        .map_err(|e| format!("cold subscribes: {e}"))?;
    report.cold_subscribe_ms = Some(Percentiles::from_us(&cold_hist));
    report.cold_failed = Some(cold_failed);

    let after = Snapshot::take(&ctx.mongo, server.addr).await;
    report.upstream = Some(probe.finish(&before, &after).await);
    report.server_rss_peak_kib = env::hwm_kib(server.pid());
    shared.stop.cancel();
    let results = join_clients(handles).await?;
    finish(&mut report, &shared, &results, first_insert_us);
    drop(cold_open);
    Ok(report)
}

/// One insert per second on each collection, spread evenly over the second (`seq` = second).
async fn insert_round_robin(
    colls: &[mongodb::Collection<Document>],
    seconds: u64,
) -> Result<u64, String> {
    let started = tokio::time::Instant::now();
    let per = Duration::from_secs(1).div_f64(colls.len().max(1) as f64);
    let shape = Shape::default();
    let mut inserted = 0;
    for second in 0..seconds {
        for (i, coll) in colls.iter().enumerate() {
            let due = started + Duration::from_secs(second) + per.mul_f64(i as f64);
            tokio::time::sleep_until(due).await;
            coll.insert_one(shape.doc(second as i64, now_us(), ""))
                .await
                .map_err(|e| format!("insert failed: {e}"))?;
            inserted += 1;
        }
    }
    Ok(inserted)
}

/// Subscribes to each cold stream in turn (1 s after the start, 30 s bound each); returns the
/// times to the response head (µs), how many failed, and the open connections (the caller
/// holds them until the end, so the cold workers keep running).
async fn cold_subscribes(
    targets: Vec<Arc<Target>>,
) -> (hdrhistogram::Histogram<u64>, usize, Vec<client::Conn>) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut times = client::histogram();
    let mut failed = 0;
    let mut open = Vec::with_capacity(targets.len());
    for target in targets {
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            Duration::from_secs(30),
            client::Conn::connect(&target, Transport::Sse, None),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                let _ = times.record((started.elapsed().as_micros() as u64).max(1));
                open.push(conn);
            }
            Ok(Err(e)) => {
                eprintln!("bench: cold subscribe failed: {e}");
                failed += 1;
            }
            Err(_) => {
                eprintln!("bench: cold subscribe took over 30 s");
                failed += 1;
            }
        }
    }
    (times, failed, open)
}

/// `bindings`: one `$var` stream, K clients with K distinct owners.
async fn bindings(ctx: &Ctx, k: usize) -> Result<Report, String> {
    let cli = &ctx.cli;
    let coll = coll_name(&format!("bindings{k}"));
    let stream = StreamSpec {
        pipeline_toml: Some(BY_OWNER.into()),
        ..StreamSpec::all(&cli.db, &coll, "byowner")
    };
    eprintln!("bench: bindings: one $var stream, {k} distinct owners, default config");
    let server = start(ctx, &[stream]).await?;
    let per_owner = cli.per_owner.max(1);
    let docs = per_owner * k as u64;
    let rate = if cli.rate > 0.0 { cli.rate } else { 100.0 };
    let mut report = Report {
        scenario: format!("bindings x{k}"),
        mode: "bindings".into(),
        transport: "sse".into(),
        clients: k,
        docs,
        rate,
        ..Report::default()
    };
    let before = Snapshot::take(&ctx.mongo, server.addr).await;
    let probe = Probe::start(&ctx.mongo);
    report.server_rss_base_kib = env::rss_kib(server.pid());

    let base = Target::stream(server.addr, &cli.db, &coll, "byowner");
    let shared = Shared::new(64);
    let clients = (0..k)
        .map(|i| {
            let target = base.with_avars(&serde_json::json!({ "who": owner(i as u64) }));
            let expect = Expect::every(0, per_owner, k as u64, i as u64);
            (Arc::new(target), expect, None)
        })
        .collect();
    let handles = spawn_clients(ctx, clients, &Arc::new(Semaphore::new(1)), &shared);
    report.connect_all_secs =
        wait_connected(&shared, k, Duration::from_secs_f64(cli.subscribe_secs)).await;
    report.connected = shared.connected.load(Ordering::Acquire);
    report.server_rss_connected_kib = env::rss_kib(server.pid());

    let cpu0 = Cpu::read(ctx, Some(server.pid()));
    let first_insert_us = now_us();
    let shape = Shape {
        owners: k as u64,
        ..Shape::default()
    };
    let target_coll = ctx.mongo.database(&cli.db).collection(&coll);
    let inserted = insert_docs(&target_coll, 0, docs, rate, cli.batch, &shape).await?;
    report.insert_rate = inserted as f64 / ((now_us() - first_insert_us) as f64 / 1e6).max(1e-9);
    wait_delivered(&shared, report.connected, true, cli).await;
    let cpu1 = Cpu::read(ctx, Some(server.pid()));
    cpu0.fill(&cpu1, &mut report);
    let after = Snapshot::take(&ctx.mongo, server.addr).await;
    report.upstream = Some(probe.finish(&before, &after).await);
    report.server_rss_peak_kib = env::hwm_kib(server.pid());
    shared.stop.cancel();
    let results = join_clients(handles).await?;
    finish(&mut report, &shared, &results, first_insert_us);
    Ok(report)
}

/// The HS256 secret of the `membership` scenario's server.
const MEMBERSHIP_SECRET: &str = "streamgate-bench-membership-0123456789";

/// A JWT with `claims`, signed HS256 with [`MEMBERSHIP_SECRET`].
fn hs256_token(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(MEMBERSHIP_SECRET.as_bytes()),
    )
    // Signing HS256 fails only on claims that do not serialize; these are plain JSON.
    .unwrap_or_default()
}

/// Owners of the `membership` scenario's documents (one document each).
const MEMBERSHIP_OWNERS: u64 = 100;

/// `membership`: K SSE clients over 100 owners, updates that keep each document with its owner,
/// with the stream's membership `on` or off.
async fn membership(ctx: &Ctx, k: usize, on: bool) -> Result<Report, String> {
    let cli = &ctx.cli;
    let label = if on { "on" } else { "off" };
    let coll = coll_name(&format!("membership{k}_{label}"));
    let db = ctx.mongo.database(&cli.db);
    db.run_command(mongodb::bson::doc! {
        "create": &coll,
        "changeStreamPreAndPostImages": { "enabled": true },
    })
    .await
    .map_err(|e| format!("create {coll} with pre-images: {e}"))?;
    let target_coll = db.collection::<Document>(&coll);
    // One document per owner; seq below the run's, so never counted.
    let seeds = (0..MEMBERSHIP_OWNERS).map(|o| {
        mongodb::bson::doc! { "_id": o as i64, "owner": owner(o), "seq": -1 - o as i64 }
    });
    target_coll
        .insert_many(seeds)
        .await
        .map_err(|e| format!("seed {coll}: {e}"))?;
    let mut more = r#"match = { "fullDocument.owner" = { "$claim" = "owner" } }"#.to_owned();
    if !on {
        more.push_str("\nmembership = false");
    }
    let stream = StreamSpec {
        more_toml: Some(more),
        ..StreamSpec::all(&cli.db, &coll, "byowner")
    };
    eprintln!(
        "bench: membership {label}: {k} SSE clients over {MEMBERSHIP_OWNERS} owners (a JWT claim each), updates, default config"
    );
    let auth = format!(
        "[auth]\nenabled = true\n[auth.jwt]\nhs256_secret = \"{MEMBERSHIP_SECRET}\"\n\
         [[auth.rules]]\nroles = [\"*\"]\nstreams = [\"/{}/{coll}/_streams/*\"]\n",
        cli.db
    );
    let server = start_with(ctx, &[stream], Some(&auth)).await?;
    let rate = if cli.rate > 0.0 { cli.rate } else { 100.0 };
    let per_owner = ((rate * cli.events_secs as f64) as u64 / MEMBERSHIP_OWNERS).max(1);
    let docs = per_owner * MEMBERSHIP_OWNERS;
    let mut report = Report {
        scenario: format!("membership {label} x{k}"),
        mode: "updates".into(),
        transport: "sse".into(),
        clients: k,
        docs,
        rate,
        ..Report::default()
    };
    let before = Snapshot::take(&ctx.mongo, server.addr).await;
    let probe = Probe::start(&ctx.mongo);
    report.server_rss_base_kib = env::rss_kib(server.pid());
    let base = Target::stream(server.addr, &cli.db, &coll, "byowner");
    let shared = Shared::new(64);
    let clients = (0..k)
        .map(|i| {
            let o = i as u64 % MEMBERSHIP_OWNERS;
            let token = hs256_token(&serde_json::json!({
                "sub": format!("client{i}"),
                "owner": owner(o),
                "exp": now_us() / 1_000_000 + 24 * 3600,
            }));
            let target = Target {
                addr: base.addr,
                path: format!("{}?access_token={token}", base.path),
            };
            let expect = Expect::every(0, per_owner, MEMBERSHIP_OWNERS, o);
            (Arc::new(target), expect, None)
        })
        .collect();
    let gate = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
    let handles = spawn_clients(ctx, clients, &gate, &shared);
    report.connect_all_secs =
        wait_connected(&shared, k, Duration::from_secs_f64(cli.subscribe_secs)).await;
    report.connected = shared.connected.load(Ordering::Acquire);
    report.server_rss_connected_kib = env::rss_kib(server.pid());

    let cpu0 = Cpu::read(ctx, Some(server.pid()));
    let first_us = now_us();
    let started = tokio::time::Instant::now();
    for seq in 0..docs {
        tokio::time::sleep_until(started + Duration::from_secs_f64(seq as f64 / rate)).await;
        let id = (seq % MEMBERSHIP_OWNERS) as i64;
        target_coll
            .update_one(
                mongodb::bson::doc! { "_id": id },
                mongodb::bson::doc! { "$set": { "seq": seq as i64, "sentAt": now_us() } },
            )
            .await
            .map_err(|e| format!("update failed: {e}"))?;
    }
    report.insert_rate = docs as f64 / ((now_us() - first_us) as f64 / 1e6).max(1e-9);
    wait_delivered(&shared, report.connected, true, cli).await;
    let cpu1 = Cpu::read(ctx, Some(server.pid()));
    cpu0.fill(&cpu1, &mut report);
    let after = Snapshot::take(&ctx.mongo, server.addr).await;
    report.upstream = Some(probe.finish(&before, &after).await);
    report.server_rss_peak_kib = env::hwm_kib(server.pid());
    shared.stop.cancel();
    let results = join_clients(handles).await?;
    finish(&mut report, &shared, &results, first_us);
    Ok(report)
}

/// Live events inserted after the storm, to check that every client rejoined live.
const STORM_LIVE: u64 = 10;

/// `restart-storm`: N clients resume at `--positions` ids after SIGKILL and restart.
async fn restart_storm(ctx: &Ctx, n: usize) -> Result<Report, String> {
    let cli = &ctx.cli;
    let positions = cli.positions.clamp(1, 10_000);
    let missed = cli.missed;
    let coll_id = coll_name(&format!("storm{n}_{positions}"));
    eprintln!(
        "bench: restart-storm: {n} SSE clients at {positions} position(s), SIGKILL, \
         {missed} events while down, restart, default config"
    );
    let mut server = start(ctx, &[StreamSpec::all(&cli.db, &coll_id, "all")]).await?;
    let target = Arc::new(Target::stream(server.addr, &cli.db, &coll_id, "all"));
    let coll = ctx.mongo.database(&cli.db).collection::<Document>(&coll_id);
    let gate = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
    let plain = Shape::default();

    // 1. N clients connect and read the position events (one more connection records ids).
    let holding = Shared::new(8);
    let clients = (0..n)
        .map(|_| {
            (
                Arc::clone(&target),
                Expect::range(0, positions as u64),
                None,
            )
        })
        .collect();
    let held = spawn_clients(ctx, clients, &gate, &holding);
    wait_connected(&holding, n, Duration::from_secs(120)).await;
    let holders = holding.connected.load(Ordering::Acquire);
    let ids = client::ids_of(
        &target,
        Transport::Sse,
        0,
        positions,
        Duration::from_secs(30),
        async {
            insert_docs(&coll, 0, positions as u64, 0.0, 500, &plain)
                .await
                .map(drop)
        },
    )
    .await?;
    wait_delivered(&holding, holders, true, cli).await;

    // 2. SIGKILL; events while it is down; restart on the same address.
    let killed = Instant::now();
    server.kill();
    let noticed = Instant::now() + Duration::from_secs(10);
    while holding.ended.load(Ordering::Acquire) < holders && Instant::now() < noticed {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holding.stop.cancel();
    join_clients(held).await?;
    insert_docs(&coll, positions as i64, missed, 0.0, 500, &plain).await?;
    server.restart(Duration::from_secs(30)).await?;
    let restart_secs = killed.elapsed().as_secs_f64();

    // 3. The storm: every client at once (within --connect-concurrency) with its id.
    let live_first = positions as u64 + missed;
    let mut report = Report {
        scenario: format!("restart-storm x{n} at {positions} id(s)"),
        mode: "restart-storm".into(),
        transport: "sse".into(),
        clients: n,
        docs: missed,
        restart_secs: Some(restart_secs),
        ..Report::default()
    };
    let before = Snapshot::take(&ctx.mongo, server.addr).await;
    let probe = Probe::start(&ctx.mongo);
    report.server_rss_base_kib = env::rss_kib(server.pid());
    let shared = Shared::new(64);
    let clients = (0..n)
        .map(|i| {
            let at = i % positions;
            // Everything after its id: the later positions, the missed and the live events.
            let expect = Expect::range(at as i64 + 1, live_first + STORM_LIVE - 1 - at as u64);
            (Arc::clone(&target), expect, ids.get(at).cloned())
        })
        .collect();
    let storm_started = Instant::now();
    let storm_started_us = now_us();
    let cpu0 = Cpu::read(ctx, Some(server.pid()));
    let handles = spawn_clients(ctx, clients, &gate, &shared);
    report.connect_all_secs = wait_connected(&shared, n, Duration::from_secs(120)).await;
    report.connected = shared.connected.load(Ordering::Acquire);
    insert_docs(&coll, live_first as i64, STORM_LIVE, 10.0, 1, &plain).await?;
    if wait_delivered(&shared, report.connected, true, cli).await {
        report.complete_secs = Some(storm_started.elapsed().as_secs_f64());
    }
    let cpu1 = Cpu::read(ctx, Some(server.pid()));
    cpu0.fill(&cpu1, &mut report);
    let after = Snapshot::take(&ctx.mongo, server.addr).await;
    report.upstream = Some(probe.finish(&before, &after).await);
    report.server_rss_peak_kib = env::hwm_kib(server.pid());
    shared.stop.cancel();
    let results = join_clients(handles).await?;
    finish(&mut report, &shared, &results, storm_started_us);
    print_incomplete_positions(&results, positions, live_first + STORM_LIVE);
    Ok(report)
}

/// Which resume positions the clients that missed events held (client i holds position
/// i mod `positions`), on stderr: a loss that hits whole positions points at how the server
/// served those ids, not at single clients.
fn print_incomplete_positions(results: &[ClientResult], positions: usize, events: u64) {
    let mut by_position: std::collections::BTreeMap<usize, (usize, u64, u64)> =
        std::collections::BTreeMap::new();
    for r in results.iter().filter(|r| r.lost > 0) {
        let entry = by_position
            .entry(r.index % positions)
            .or_insert((0, u64::MAX, 0));
        entry.0 += 1;
        entry.1 = entry.1.min(r.unique);
        entry.2 = entry.2.max(r.unique);
    }
    for (at, (clients, min, max)) in by_position {
        let expected = events.saturating_sub(at as u64 + 1);
        eprintln!(
            "bench: position {at}: {clients} client(s) incomplete, received {min}..{max} of \
             {expected} events"
        );
    }
}

/// Runs the matrix's `live` measurement against a default-config server, with the upstream
/// readings around it.
async fn live_default(ctx: &Ctx, tag: &str, scenario: &Scenario) -> Result<Report, String> {
    let cli = &ctx.cli;
    let coll = coll_name(tag);
    let server = start(ctx, &[StreamSpec::all(&cli.db, &coll, "all")]).await?;
    let addr = server.addr;
    let target = Arc::new(Target::stream(addr, &cli.db, &coll, "all"));
    let place = Place {
        targets: vec![target],
        coll: ctx.mongo.database(&cli.db).collection(&coll),
        spread: Vec::new(),
        server_pids: vec![server.pid()],
        _servers: vec![server],
    };
    let before = Snapshot::take(&ctx.mongo, addr).await;
    let probe = Probe::start(&ctx.mongo);
    // As in the matrix: the worker runs before the measurement (it lingers 5 s by default,
    // longer than the clients take to connect).
    drop(client::Conn::connect(place.target(), Transport::Sse, None).await?);
    let mut report = crate::live(ctx, &place, scenario).await?;
    let after = Snapshot::take(&ctx.mongo, addr).await;
    report.upstream = Some(probe.finish(&before, &after).await);
    report.mode = tag.trim_end_matches(char::is_numeric).into();
    Ok(report)
}

/// `burst`: `clients` SSE clients, 5,000 inserts as fast as possible in batches of 500.
async fn burst(ctx: &Ctx, clients: usize) -> Result<Report, String> {
    eprintln!(
        "bench: burst: {clients} SSE clients, 5000 inserts (insert_many of 500), default config"
    );
    let scenario = Scenario {
        label: format!("burst sse x{clients} 5000 docs"),
        mode: Mode::Live,
        transport: Transport::Sse,
        clients,
        docs: 5000,
        rate: 0.0,
        idle_secs: 0.0,
        batch: 500,
        shape: Shape::default(),
        streams: 1,
    };
    live_default(ctx, &format!("burst{clients}"), &scenario).await
}

/// `bulk`: one reader; 20,000 documents of 2 KB in `insert_many` batches of `batch`.
async fn bulk(ctx: &Ctx, batch: usize) -> Result<Report, String> {
    let batches = 20_000 / batch.max(1);
    eprintln!(
        "bench: bulk: one SSE reader, {batches} x insert_many({batch}) of 2 KB documents, \
         default config"
    );
    let scenario = Scenario {
        label: format!("bulk {batches} x insert_many({batch}) 2 KB"),
        mode: Mode::Live,
        transport: Transport::Sse,
        clients: 1,
        docs: (batches * batch) as u64,
        rate: 0.0,
        idle_secs: 0.0,
        batch,
        shape: Shape {
            pad: PAD,
            ..Shape::default()
        },
        streams: 1,
    };
    live_default(ctx, &format!("bulk{batch}"), &scenario).await
}

/// Receive buffer of the stalled client: small, so its window closes after a few events.
const STALL_RCVBUF: u32 = 4096;

/// `stall`: a client that stops reading while events flow, next to one that reads.
async fn stall(ctx: &Ctx) -> Result<Report, String> {
    let cli = &ctx.cli;
    let coll_id = coll_name("stall");
    let rate = if cli.rate > 0.0 { cli.rate } else { 100.0 };
    let bound = Duration::from_secs_f64(cli.stall_secs.max(1.0));
    let events = (rate * bound.as_secs_f64()).ceil() as u64;
    eprintln!(
        "bench: stall: one client stops reading ({STALL_RCVBUF} B receive buffer) while \
         {rate}/s 2 KB events flow, up to {bound:?}; default config"
    );
    let server = start(ctx, &[StreamSpec::all(&cli.db, &coll_id, "all")]).await?;
    let target = Arc::new(Target::stream(server.addr, &cli.db, &coll_id, "all"));
    let mut report = Report {
        scenario: format!("stall (1 stalled + 1 reading, {rate}/s 2 KB)"),
        mode: "stall".into(),
        transport: "sse".into(),
        clients: 2,
        docs: events,
        rate,
        ..Report::default()
    };
    let before = Snapshot::take(&ctx.mongo, server.addr).await;
    let probe = Probe::start(&ctx.mongo);
    report.server_rss_base_kib = env::rss_kib(server.pid());

    let shared = Shared::new(1);
    let reader = vec![(Arc::clone(&target), Expect::range(0, events), None)];
    let handles = spawn_clients(ctx, reader, &Arc::new(Semaphore::new(1)), &shared);
    wait_connected(&shared, 1, Duration::from_secs(30)).await;
    // The control run has no stalled client: the same events for the whole bound, so its RSS
    // shows what the ring alone costs.
    let stalled = if cli.stall_control {
        report.scenario = format!("stall control (1 reading, no stalled client, {rate}/s 2 KB)");
        report.clients = 1;
        None
    } else {
        Some(client::stalled_sse(&target, STALL_RCVBUF).await?)
    };
    let client_port = match &stalled {
        Some(s) => Some(s.local_addr().map_err(|e| e.to_string())?.port()),
        None => None,
    };
    report.connected = shared.connected.load(Ordering::Acquire) + usize::from(stalled.is_some());

    let mut outcome = Stall {
        bound_secs: bound.as_secs_f64(),
        rss_start_kib: env::rss_kib(server.pid()),
        ..Stall::default()
    };
    let coll = ctx.mongo.database(&cli.db).collection::<Document>(&coll_id);
    let inserter = {
        let coll = coll.clone();
        tokio::spawn(async move {
            let shape = Shape {
                pad: PAD,
                ..Shape::default()
            };
            insert_docs(&coll, 0, events, rate, 1, &shape).await
        })
    };
    let stalled_at = Instant::now();
    let first_insert_us = now_us();
    let cpu0 = Cpu::read(ctx, Some(server.pid()));
    while stalled_at.elapsed() < bound {
        let at = stalled_at.elapsed().as_secs_f64();
        outcome.rss_max_kib = outcome.rss_max_kib.max(env::rss_kib(server.pid()));
        let Some(client_port) = client_port else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        match env::tcp_socket(&table, server.addr.port(), client_port) {
            Some(socket) => {
                outcome.server_send_queue = Some(socket.send_queue);
                if !socket.established && outcome.socket_closed_secs.is_none() {
                    outcome.socket_closed_secs = Some(at);
                }
            }
            None => {
                outcome.socket_closed_secs.get_or_insert(at);
            }
        }
        // The reading client counts too, while it is connected.
        let reading =
            shared.connected.load(Ordering::Acquire) - shared.ended.load(Ordering::Acquire).min(1);
        if let Some(clients) = ServerCounters::read(server.addr).await.clients
            && clients < (reading + 1) as f64
        {
            outcome.client_gone_secs.get_or_insert(at);
        }
        if outcome.socket_closed_secs.is_some() && outcome.client_gone_secs.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    inserter.abort();
    outcome.events = coll.estimated_document_count().await.unwrap_or(0);
    report.insert_rate = outcome.events as f64 / stalled_at.elapsed().as_secs_f64().max(1e-9);
    let cpu1 = Cpu::read(ctx, Some(server.pid()));
    cpu0.fill(&cpu1, &mut report);
    let after = Snapshot::take(&ctx.mongo, server.addr).await;
    report.upstream = Some(probe.finish(&before, &after).await);
    report.server_rss_peak_kib = env::hwm_kib(server.pid());
    report.stall = Some(outcome);
    drop(stalled);
    shared.stop.cancel();
    let results = join_clients(handles).await?;
    finish(&mut report, &shared, &results, first_insert_us);
    // The reader expected every event the bound allowed; it can only get those inserted.
    report.docs = outcome_events(&report);
    report.expected_deliveries = report.docs;
    report.lost = results
        .iter()
        .filter(|r| r.connect_us.is_some())
        .map(|r| report.docs.saturating_sub(r.unique))
        .sum();
    report.clients_with_loss = usize::from(report.lost > 0);
    Ok(report)
}

/// Events inserted during the stall (known once the inserter stopped).
fn outcome_events(report: &Report) -> u64 {
    report.stall.as_ref().map_or(report.docs, |s| s.events)
}
