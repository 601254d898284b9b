//! Issue 23's noisy-neighbour scenario: well-behaved clients beside one abusive party, against
//! a fresh `streamgate` with its DEFAULT configuration each run.
//!
//! The well-behaved side is the same in every run:
//! * 100 SSE clients on 10 streams of one database, all subscribing with `?snapshot=true`:
//!   90 on nine plain streams (they share the database's feed cursor) and 10 on a stream whose
//!   `$var` cannot be routed in-process (`$match` on the owner, then a `$project`: a cursor per
//!   binding), each with its own owner. They subscribe while the abuser is already at work,
//!   then 6,000 documents are inserted at 100/s (a minute), spread over the 10 collections.
//! * Then 5 catch-up readers resume together at an id 15,000 changes (of 1 KB) behind, further
//!   back than the worker's ring, so they share a catch-up cursor; `complete_secs` is how long
//!   the slowest of them took to read all of it.
//!
//! The abusers (`--abuser`), each from 127.0.0.2 (so per-address bounds tell them apart):
//! * `poison`: a stream on another collection of the same database whose `$match` fails on
//!   data (`$toInt` of a string); one of its clients stays subscribed (reconnecting when its
//!   stream ends) and `{code: "x"}` is inserted there every second.
//! * `snapshots`: 8 clients open `snapshot=true` on a 20 MB collection and never read.
//! * `bindings`: distinct bindings of the `$var` stream opened and dropped in a loop, two at a
//!   time.
//! * `catch-up`: a sixth reader of the catch-up that reads 30 KB/s.
//!
//! A run reports the well-behaved clients' latency, loss, duplicates and errors, with the
//! abuser's own tally in `abuser`; `--abuser all` runs the baseline, each abuser, and the
//! baseline again, and prints each run's p99 against the mean of the two baselines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use mongodb::bson::{Document, doc};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Expect, Shared, Target, Transport, now_us, url_encode};
use crate::env::{self, Server, ServerSpec, StreamSpec};
use crate::report::Report;
use crate::upstream::{Probe, Snapshot};
use crate::{Cpu, Ctx, Shape, insert_spread, join_clients, wait_connected, wait_delivered};

/// Who misbehaves beside the well-behaved clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Abuser {
    /// Nobody: the baseline.
    None,
    /// A stream whose filter fails on data, written to every second.
    Poison,
    /// 8 never-reading `snapshot=true` clients on a large collection.
    Snapshots,
    /// Binding churn from one address.
    Bindings,
    /// A catch-up reader at 30 KB/s.
    CatchUp,
    /// The baseline, then each abuser in turn.
    All,
}

impl Abuser {
    fn as_str(self) -> &'static str {
        match self {
            Abuser::None => "alone",
            Abuser::Poison => "poison writes",
            Abuser::Snapshots => "8 never-reading snapshots",
            Abuser::Bindings => "binding churn",
            Abuser::CatchUp => "30 KB/s catch-up reader",
            Abuser::All => "all",
        }
    }
}

/// Well-behaved streams (and collections).
const STREAMS: usize = 10;
/// Well-behaved SSE clients.
const CLIENTS: usize = 100;
/// Documents inserted while they listen, and the rate.
/// (A minute: the p99 of ~60,000 deliveries, which one stall of this VM does not set, as it
/// set the p99 of the ~9,000 a 10-second phase gave.)
const DOCS: u64 = 6000;
const RATE: f64 = 100.0;
/// Catch-up readers, the backlog they read and its documents' padding.
const CATCH_UP_READERS: usize = 5;
const BACKLOG: u64 = 15_000;
const BACKLOG_PAD: usize = 1000;
/// The snapshot abuser's collection: documents and their padding (20 MB).
const BIG_DOCS: u64 = 20_000;
const BIG_PAD: usize = 1000;
/// The address every abuser connects from.
const ABUSER_IP: [u8; 4] = [127, 0, 0, 2];

/// The `$var` stream: the owner `$match`, then a `$project`, so the binding cannot be routed
/// in-process and each binding has a cursor of its own.
const BY_OWNER_UNROUTABLE: &str = r#"[ { "$match" = { "fullDocument.owner" = { "$var" = "who" } } }, { "$project" = { "fullDocument.pad" = 0 } } ]"#;
/// A `$match` that fails on a document whose `code` is not a number.
const POISON: &str =
    r#"[ { "$match" = { "$expr" = { "$eq" = [ { "$toInt" = "$fullDocument.code" }, 5 ] } } } ]"#;

/// Runs `which` (with `All`: the baseline, then each abuser), each on a fresh server.
pub async fn run(
    ctx: &Ctx,
    which: Abuser,
    on_report: &mut dyn FnMut(Report),
) -> Result<(), String> {
    // The baseline runs first and last: the machine's own drift over the runs shows, and
    // each abuser is compared with the mean of the two.
    let runs = match which {
        Abuser::All => vec![
            Abuser::None,
            Abuser::Poison,
            Abuser::Snapshots,
            Abuser::Bindings,
            Abuser::CatchUp,
            Abuser::None,
        ],
        Abuser::None => vec![Abuser::None],
        one => vec![Abuser::None, one, Abuser::None],
    };
    let mut done: Vec<(Abuser, String, f64)> = Vec::new();
    for (i, abuser) in runs.into_iter().enumerate() {
        let load_before = env::loadavg();
        let mut report = one_run(ctx, abuser, i).await?;
        report.loadavg = [load_before, env::loadavg()];
        let p99 = report.latency_ms.p99;
        let tally = format!(
            "lost {}, duplicates {}, errors {}, catch-up {:.1} s; {}",
            report.lost,
            report.duplicates,
            report.client_errors.values().sum::<usize>(),
            report.complete_secs.unwrap_or(f64::NAN),
            report.abuser.clone().unwrap_or_default(),
        );
        done.push((abuser, tally, p99));
        on_report(report);
    }
    let alone: Vec<f64> = done
        .iter()
        .filter(|(abuser, ..)| *abuser == Abuser::None)
        .map(|(.., p99)| *p99)
        .collect();
    let baseline = alone.iter().sum::<f64>() / alone.len().max(1) as f64;
    eprintln!(
        "\nnoisy neighbours (well-behaved clients' view; ratios against the mean p99 alone, {baseline:.1} ms):"
    );
    for (abuser, tally, p99) in done {
        eprintln!(
            "  {:<28} p99 {:>7.1} ms ({:.2}x), {tally}",
            abuser.as_str(),
            p99,
            p99 / baseline.max(1e-9),
        );
    }
    Ok(())
}

/// What the abuser did, counted by its task.
#[derive(Default)]
struct Tally {
    actions: AtomicU64,
    refused: AtomicU64,
    bytes: AtomicU64,
}

/// One run: a fresh server, the abuser at work, the well-behaved clients measured.
async fn one_run(ctx: &Ctx, abuser: Abuser, run: usize) -> Result<Report, String> {
    let cli = &ctx.cli;
    let tag = format!("noisy{}_{run}", std::process::id());
    let db = ctx.mongo.database(&cli.db);
    let colls: Vec<String> = (0..STREAMS).map(|i| format!("{tag}_{i}")).collect();
    let mut specs: Vec<StreamSpec> = colls[..STREAMS - 1]
        .iter()
        .map(|c| StreamSpec::all(&cli.db, c, "all"))
        .collect();
    let bound = &colls[STREAMS - 1];
    specs.push(StreamSpec {
        pipeline_toml: Some(BY_OWNER_UNROUTABLE.into()),
        ..StreamSpec::all(&cli.db, bound, "byowner")
    });
    let (poison, big, log) = (
        format!("{tag}_poison"),
        format!("{tag}_big"),
        format!("{tag}_log"),
    );
    specs.push(StreamSpec {
        pipeline_toml: Some(POISON.into()),
        ..StreamSpec::all(&cli.db, &poison, "fives")
    });
    specs.push(StreamSpec::all(&cli.db, &big, "all"));
    specs.push(StreamSpec::all(&cli.db, &log, "all"));
    eprintln!(
        "bench: noisy: {} beside 100 SSE clients, default config",
        abuser.as_str()
    );
    if abuser == Abuser::Snapshots {
        fill(&db.collection(&big), BIG_DOCS, BIG_PAD).await?;
    }
    let server = Server::start(
        &ServerSpec {
            bin: &ctx.server_bin,
            mongo_uri: &ctx.mongo_uri,
            streams: &specs,
            client_queue: None,
            dir: &ctx.dir,
            env: &cli.server_env(),
            wrapper: &[],
            relay_url: ctx.relay_url.as_deref(),
            more_toml: None,
        },
        Duration::from_secs(30),
    )
    .await?;
    let addr = server.addr;
    let mut report = Report {
        scenario: format!("noisy: {}", abuser.as_str()),
        mode: "noisy".into(),
        transport: "sse".into(),
        clients: CLIENTS,
        docs: DOCS,
        rate: RATE,
        ..Report::default()
    };

    // The catch-up readers' position: the id of seq 0 in `log`, then a backlog behind it.
    let log_target = Target::stream(addr, &cli.db, &log, "all");
    let log_coll = db.collection::<Document>(&log);
    let first = client::first_id_of(&log_target, Transport::Sse, 0, Duration::from_secs(30), {
        let coll = log_coll.clone();
        async move {
            coll.insert_one(doc! { "seq": 0_i64, "sentAt": now_us() })
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    let pad = "x".repeat(BACKLOG_PAD);
    for chunk in (1..=BACKLOG).collect::<Vec<_>>().chunks(1000) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|&seq| doc! { "seq": seq as i64, "sentAt": now_us(), "pad": &pad })
            .collect();
        log_coll
            .insert_many(docs)
            .await
            .map_err(|e| format!("backlog insert: {e}"))?;
    }

    let before = Snapshot::take(&ctx.mongo, addr).await;
    let probe = Probe::start(&ctx.mongo);
    report.server_rss_base_kib = env::rss_kib(server.pid());

    // The abuser starts first and gets two seconds to take what it takes.
    let stop_abuser = CancellationToken::new();
    let tally = Arc::new(Tally::default());
    let abuser_task = {
        let stop = stop_abuser.clone();
        let tally = Arc::clone(&tally);
        let paths = AbuserPaths {
            poison: format!("/{}/{poison}/_streams/fives", cli.db),
            big: format!("/{}/{big}/_streams/all?snapshot=true", cli.db),
            churn: format!("/{}/{bound}/_streams/byowner", cli.db),
            log: format!("/{}/{log}/_streams/all", cli.db),
        };
        let poison_coll = db.collection::<Document>(&poison);
        let first = first.clone();
        ctx.clients_rt.spawn(async move {
            abuse(abuser, addr, paths, poison_coll, first, tally, stop).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The well-behaved clients, all at once, while the abuser works.
    let shared = Shared::new(64);
    let gate = Arc::new(Semaphore::new(CLIENTS));
    let per_stream = DOCS / STREAMS as u64;
    let mut handles = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let stream = i % STREAMS;
        let (target, expect) = if stream < STREAMS - 1 {
            let mut t = Target::stream(addr, &cli.db, &colls[stream], "all");
            t.path.push_str("?snapshot=true");
            (
                t,
                Expect::every(0, per_stream, STREAMS as u64, stream as u64),
            )
        } else {
            // Owner `o{r}` with r = 9, 19, …, 99: every tenth document of this collection.
            let residue = (STREAMS - 1 + STREAMS * (i / STREAMS)) as u64;
            let owners = (STREAMS * (CLIENTS / STREAMS)) as u64;
            let mut t = Target::stream(addr, &cli.db, bound, "byowner")
                .with_avars(&serde_json::json!({ "who": format!("o{residue}") }));
            t.path.push_str("&snapshot=true");
            (t, Expect::every(0, DOCS / owners, owners, residue))
        };
        handles.push(ctx.clients_rt.spawn(client::run_client(
            i,
            Transport::Sse,
            Arc::new(target),
            expect,
            None,
            Arc::clone(&gate),
            Arc::clone(&shared),
        )));
    }
    report.connect_all_secs = wait_connected(&shared, CLIENTS, Duration::from_secs(60)).await;
    report.connected = shared.connected.load(Ordering::Acquire);
    report.server_rss_connected_kib = env::rss_kib(server.pid());

    let cpu0 = Cpu::read(ctx, Some(server.pid()));
    let first_insert_us = now_us();
    let targets: Vec<mongodb::Collection<Document>> =
        colls.iter().map(|c| db.collection(c)).collect();
    let shape = Shape {
        pad: 0,
        owners: (STREAMS * (CLIENTS / STREAMS)) as u64,
    };
    let inserted = insert_spread(&targets, DOCS, RATE, cli.batch, &shape).await?;
    report.insert_rate = inserted as f64 / ((now_us() - first_insert_us) as f64 / 1e6).max(1e-9);
    wait_delivered(&shared, report.connected, true, cli).await;
    let cpu1 = Cpu::read(ctx, Some(server.pid()));
    cpu0.fill(&cpu1, &mut report);

    // Then the catch-up readers, together (they share one catch-up cursor), while the abuser
    // still works; after the live phase, so their reading does not weigh on its latency.
    let catch_up = Shared::new(8);
    let catch_up_started = Instant::now();
    let catch_up_handles: Vec<_> = (0..CATCH_UP_READERS)
        .map(|i| {
            ctx.clients_rt.spawn(client::run_client(
                i,
                Transport::Sse,
                Arc::new(log_target.clone()),
                Expect::range(1, BACKLOG),
                Some(first.clone()),
                Arc::new(Semaphore::new(1)),
                Arc::clone(&catch_up),
            ))
        })
        .collect();

    // The catch-up readers get a bounded time to finish.
    let deadline = Instant::now() + Duration::from_secs_f64(cli.max_secs.min(120.0));
    while catch_up.complete.load(Ordering::Acquire) < CATCH_UP_READERS
        && catch_up.ended.load(Ordering::Acquire) < CATCH_UP_READERS
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let catch_up_done = catch_up.complete.load(Ordering::Acquire);
    report.complete_secs = Some(catch_up_started.elapsed().as_secs_f64());

    let after = Snapshot::take(&ctx.mongo, addr).await;
    report.upstream = Some(probe.finish(&before, &after).await);
    report.server_rss_peak_kib = env::hwm_kib(server.pid());
    stop_abuser.cancel();
    shared.stop.cancel();
    catch_up.stop.cancel();
    let results = join_clients(handles).await?;
    crate::fanin::finish(&mut report, &shared, &results, first_insert_us);
    let catch_up_results = join_clients(catch_up_handles).await?;
    for r in &catch_up_results {
        report.lost += r.lost;
        report.duplicates += r.duplicates;
        report.order_violations += r.order_violations;
        if let Some(e) = &r.error {
            *report
                .client_errors
                .entry(format!(
                    "catch-up reader: {}",
                    e.chars().take(60).collect::<String>()
                ))
                .or_default() += 1;
        }
    }
    if catch_up_done < CATCH_UP_READERS {
        report.client_errors.insert(
            "catch-up readers unfinished".into(),
            CATCH_UP_READERS - catch_up_done,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), abuser_task).await;
    report.abuser = Some(format!(
        "{}: {} actions, {} refused, {} bytes read",
        abuser.as_str(),
        tally.actions.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed),
    ));
    Ok(report)
}

/// Inserts `count` documents of `pad` bytes into `coll` (a collection to snapshot).
async fn fill(coll: &mongodb::Collection<Document>, count: u64, pad: usize) -> Result<(), String> {
    let pad = "y".repeat(pad);
    let all: Vec<u64> = (0..count).collect();
    for chunk in all.chunks(1000) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|&i| doc! { "n": i as i64, "pad": &pad })
            .collect();
        coll.insert_many(docs)
            .await
            .map_err(|e| format!("fill {}: {e}", coll.name()))?;
    }
    Ok(())
}

/// The paths the abusers use.
struct AbuserPaths {
    poison: String,
    big: String,
    churn: String,
    log: String,
}

/// The abuser's loop until `stop` (every loop is bounded by it and by its own pacing).
async fn abuse(
    abuser: Abuser,
    addr: SocketAddr,
    paths: AbuserPaths,
    poison_coll: mongodb::Collection<Document>,
    first: String,
    tally: Arc<Tally>,
    stop: CancellationToken,
) {
    match abuser {
        Abuser::None | Abuser::All => {}
        Abuser::Poison => {
            let subscriber = async {
                loop {
                    match connect(addr, &paths.poison, None, None).await {
                        Ok(mut s) => {
                            let mut buf = vec![0u8; 16 * 1024];
                            while let Ok(n) = s.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            };
            let writer = async {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if poison_coll.insert_one(doc! { "code": "x" }).await.is_ok() {
                        tally.actions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            tokio::select! {
                _ = subscriber => {}
                _ = writer => {}
                _ = stop.cancelled() => {}
            }
        }
        Abuser::Snapshots => {
            let mut held = Vec::new();
            for _ in 0..8 {
                match connect(addr, &paths.big, None, Some(4096)).await {
                    Ok(s) => {
                        tally.actions.fetch_add(1, Ordering::Relaxed);
                        held.push(s);
                    }
                    Err(_) => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            stop.cancelled().await;
            drop(held);
        }
        Abuser::Bindings => {
            let churn = |n: u64| {
                let avars = serde_json::json!({ "who": format!("churn{n}") }).to_string();
                format!("{}?avars={}", paths.churn, url_encode(&avars))
            };
            let next = AtomicU64::new(0);
            let one = || async {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    match connect(addr, &churn(n), None, None).await {
                        Ok(s) => {
                            tally.actions.fetch_add(1, Ordering::Relaxed);
                            drop(s);
                        }
                        Err(_) => {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            // A refused abuser retries at once, as a hostile one would, but
                            // yields so the loop stays bounded by `stop`.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            };
            tokio::select! {
                _ = one() => {}
                _ = one() => {}
                _ = stop.cancelled() => {}
            }
        }
        Abuser::CatchUp => {
            let reader = async {
                let Ok(mut s) = connect(addr, &paths.log, Some(&first), Some(4096)).await else {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                tally.actions.fetch_add(1, Ordering::Relaxed);
                // 3 KB every 100 ms: 30 KB/s.
                let mut buf = vec![0u8; 3 * 1024];
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            };
            tokio::select! {
                _ = reader => {}
                _ = stop.cancelled() => {}
            }
        }
    }
}

/// An SSE request from the abuser's address; returns the socket after a 200 head (the body is
/// the caller's to read or not). `recv_buffer` sets a small receive window before connecting.
async fn connect(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<&str>,
    recv_buffer: Option<u32>,
) -> Result<TcpStream, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(size) = recv_buffer {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| e.to_string())?;
    }
    socket
        .bind(SocketAddr::from((ABUSER_IP, 0)))
        .map_err(|e| format!("bind {ABUSER_IP:?}: {e}"))?;
    tokio::time::timeout(
        Duration::from_secs(30),
        client::sse_on(socket, addr, path, last_event_id),
    )
    .await
    .map_err(|_| "no response head within 30 s".to_string())?
}
