//! `streamgate-bench`: end-to-end load tool for Streamgate (issue 5).
//!
//! By default it starts everything itself: a fresh single-node replica set
//! (`scripts/mongo-local` on a free port, in a temporary directory, stopped at the end) and the
//! `streamgate` binary next to this one (or `--server-bin`) with a generated config. With
//! `--target http://127.0.0.1:PORT --mongo-uri …` it uses running ones instead.
//!
//! A run opens N clients (SSE, WebSocket, NDJSON or mixed), inserts M documents
//! `{seq, sentAt}` at R/s (or as fast as possible), and reports end-to-end latency, deliveries
//! per second, loss / duplicates / order violations, connect times, server RSS per client and
//! CPU use. `--mode catchup` measures a client resuming M events behind. `--suite` runs the
//! matrix of docs/benchmarks.md in one go. `--scenario` runs one of issue 8's upstream fan-in
//! scenarios (many streams, many bindings, a restart storm, a burst, bulk writes, a stalled
//! client; module `fanin`) against a server with its default configuration.
//!
//! ```text
//! cargo build --release --workspace      # streamgate and streamgate-bench
//! target/release/streamgate-bench --clients 1000 --transport sse --rate 100 --docs 2000
//! target/release/streamgate-bench --suite            # the whole table, ~5 minutes
//! target/release/streamgate-bench --scenario streams --size 200
//! ```

mod client;
mod env;
mod fanin;
mod noisy;
mod parse;
mod report;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use mongodb::bson::{Document, doc};
use tokio::sync::Semaphore;

use client::{ClientResult, Expect, Shared, Target, Transport, now_us};
use env::{Mongo, Server, ServerSpec, StreamSpec};
use fanin::FanIn;
use report::{Percentiles, Report};

/// The repository this tool was built from: the workspace root, one level above this crate.
const REPO_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// End-to-end load tool for Streamgate: N clients, M inserts at rate R, latency and loss.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Cli {
    /// Concurrent clients.
    #[arg(long, short = 'n', default_value_t = 100)]
    clients: usize,
    /// Client transport.
    #[arg(long, short = 't', value_enum, default_value_t = Transport::Sse)]
    transport: Transport,
    /// Documents to insert (0: connect, measure RSS, hold `--idle-secs`, disconnect).
    #[arg(long, short = 'm', default_value_t = 1000)]
    docs: u64,
    /// Inserts per second; 0 inserts as fast as possible (saturation).
    #[arg(long, short = 'r', default_value_t = 100.0)]
    rate: f64,
    /// Largest `insert_many` batch (saturation and rates above 1000/s).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// `live` (fan-out) or `catchup` (one client resumes `--docs` events behind).
    #[arg(long, value_enum, default_value_t = Mode::Live)]
    mode: Mode,
    /// Streams per client (issue 11): each client opens ONE `/_streams` connection over this
    /// many streams (collections `<coll>_0…`), and document k goes to collection k mod N, so
    /// every client still gets each document once and deliveries compare 1:1 with N = 1.
    #[arg(long, default_value_t = 1)]
    streams_per_client: usize,
    /// Seconds to hold every client connected and idle before inserting.
    #[arg(long, default_value_t = 0.0)]
    idle_secs: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Worker threads of the clients' runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Give up when no event arrived for this long after the last insert.
    #[arg(long, default_value_t = 15.0)]
    drain_secs: f64,
    /// Hard limit on one scenario's event phase, seconds.
    #[arg(long, default_value_t = 240.0)]
    max_secs: f64,
    /// Use a running Streamgate at this URL instead of starting one (loopback only).
    #[arg(long, requires = "mongo_uri", conflicts_with = "scenario")]
    target: Option<String>,
    /// MongoDB URI for inserts and for the servers the tool starts (default: it starts a
    /// mongod of its own).
    #[arg(long)]
    mongo_uri: Option<String>,
    /// With `--target`: pid of the server, for RSS and CPU readings.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Database the stream watches.
    #[arg(long, default_value = "bench")]
    db: String,
    /// Collection the stream watches (with `--target`; otherwise one per scenario).
    #[arg(long, default_value = "events")]
    coll: String,
    /// Stream name (with `--target`).
    #[arg(long, default_value = "all")]
    stream: String,
    /// The `streamgate` binary to start (default: next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Repository root (for `scripts/mongo-local`).
    #[arg(long, default_value = REPO_ROOT)]
    repo: PathBuf,
    /// Server `client_queue` (default: docs + 1024, at least 4096, so saturation loses nothing;
    /// 1024 in catch-up mode). `ring_size` is this or 10,000, whichever is larger.
    #[arg(long)]
    client_queue: Option<usize>,
    /// Run the server under this command, e.g. "valgrind --tool=callgrind".
    #[arg(long)]
    server_wrapper: Option<String>,
    /// Run the benchmark matrix of docs/benchmarks.md (ignores the scenario options).
    #[arg(long)]
    suite: bool,
    /// With `--suite`: run only scenarios whose label contains this.
    #[arg(long)]
    only: Option<String>,
    /// Print JSON (one report, or an array with `--suite`) instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Run one of issue 8's upstream fan-in scenarios, with the server's DEFAULT configuration
    /// (`all`: each at its default size). The matrix's options do not apply, except
    /// `--rate` (bindings, stall), `--drain-secs`, `--max-secs` and `--connect-concurrency`.
    #[arg(long, value_enum)]
    scenario: Option<FanIn>,
    /// Scenario size: streams (default 40), bindings (120), restart-storm clients (300),
    /// burst clients (1000).
    #[arg(long)]
    size: Option<usize>,
    /// noisy: who misbehaves beside the well-behaved clients (`all`: the baseline, then each).
    #[arg(long, value_enum, default_value_t = noisy::Abuser::All)]
    abuser: noisy::Abuser,
    /// restart-storm: distinct positions (resume ids) the clients hold.
    #[arg(long, default_value_t = 1)]
    positions: usize,
    /// restart-storm: events inserted while the server is down.
    #[arg(long, default_value_t = 100)]
    missed: u64,
    /// streams: seconds of one insert per second on every stream.
    #[arg(long, default_value_t = 15)]
    events_secs: u64,
    /// streams: cold streams subscribed one after another while the N workers run.
    #[arg(long, default_value_t = 20)]
    cold: usize,
    /// bindings: documents inserted per owner.
    #[arg(long, default_value_t = 3)]
    per_owner: u64,
    /// streams, bindings: bound on the one-after-another subscribe phase, seconds.
    #[arg(long, default_value_t = 90.0)]
    subscribe_secs: f64,
    /// stall: bound on the wait for the server to close the stalled client, seconds.
    #[arg(long, default_value_t = 75.0)]
    stall_secs: f64,
    /// stall: the control run, without the stalled client (the reader and the inserts for the
    /// whole `--stall-secs`), to tell the ring's memory from the stalled client's.
    #[arg(long)]
    stall_control: bool,
    /// `RUST_LOG` of the servers the tool starts (default `warn`), e.g. `streamgate=debug`.
    #[arg(long)]
    server_log: Option<String>,
    /// Keep the run's directory (server configs and logs, mongod's data) and print its path.
    #[arg(long)]
    keep: bool,
    /// Run the servers the tool starts with the relay tier (docs/relay.md): start a
    /// `nats-server -js` and give them `[relay] nats_url`. Compare with the same run without.
    #[arg(long, conflicts_with = "target")]
    relay: bool,
    /// With `--relay`: the nats-server binary (default `$NATS_SERVER`, else
    /// `scripts/fetch-nats`).
    #[arg(long, requires = "relay")]
    nats_server: Option<PathBuf>,
    /// Servers the tool starts for a live run (issue 22's fleet): the clients spread over them
    /// round-robin; with `--relay` they share one change-stream cursor per stream. The report's
    /// server CPU and RSS are their sums; its mongod cursors and CPU are the point.
    #[arg(long, default_value_t = 1, conflicts_with = "target")]
    instances: usize,
}

impl Cli {
    /// Extra environment for the servers the tool starts.
    fn server_env(&self) -> Vec<(String, String)> {
        self.server_log
            .iter()
            .map(|level| ("RUST_LOG".to_owned(), level.clone()))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Live,
    Catchup,
}

/// One scenario of a run.
#[derive(Debug, Clone)]
struct Scenario {
    label: String,
    mode: Mode,
    transport: Transport,
    clients: usize,
    docs: u64,
    rate: f64,
    idle_secs: f64,
    /// Largest `insert_many`.
    batch: usize,
    /// What the inserted documents carry besides `seq` and `sentAt`.
    shape: Shape,
    /// Streams per client connection (`/_streams` when more than 1).
    streams: usize,
}

impl Scenario {
    fn from_cli(cli: &Cli) -> Scenario {
        let mode = match cli.mode {
            Mode::Live => "live",
            Mode::Catchup => "catchup",
        };
        Scenario {
            label: format!(
                "{mode} {} x{}{} {}docs @{}",
                cli.transport.as_str(),
                if cli.mode == Mode::Catchup {
                    1
                } else {
                    cli.clients
                },
                match (cli.streams_per_client, cli.instances) {
                    (0 | 1, 0 | 1) => String::new(),
                    (streams, 0 | 1) => format!(" x{streams} streams"),
                    (0 | 1, instances) => format!(" on {instances} instances"),
                    (streams, instances) => format!(" x{streams} streams on {instances} instances"),
                },
                cli.docs,
                rate_label(cli.rate)
            ),
            mode: cli.mode,
            transport: cli.transport,
            clients: if cli.mode == Mode::Catchup {
                1
            } else {
                cli.clients
            },
            docs: cli.docs,
            rate: cli.rate,
            idle_secs: cli.idle_secs,
            batch: cli.batch,
            shape: Shape::default(),
            streams: cli.streams_per_client.max(1),
        }
    }
}

fn rate_label(rate: f64) -> String {
    if rate > 0.0 {
        format!("{rate}/s")
    } else {
        "max".into()
    }
}

/// The matrix of docs/benchmarks.md.
fn suite(batch: usize) -> Vec<Scenario> {
    let mut out = Vec::new();
    let mut add = |mode, transport: Transport, clients, docs, rate: f64, idle_secs| {
        let label = match mode {
            Mode::Catchup => format!("catch-up {} {docs} behind", transport.as_str()),
            Mode::Live => format!("{} x{clients} @{}", transport.as_str(), rate_label(rate)),
        };
        out.push(Scenario {
            label,
            mode,
            transport,
            clients,
            docs,
            rate,
            idle_secs,
            batch,
            shape: Shape::default(),
            streams: 1,
        });
    };
    for transport in [Transport::Sse, Transport::Ws] {
        // Moderate rate: 100 inserts/s for 10 s (3 s at 10,000 clients, which is past
        // saturation: 1,000,000 deliveries/s asked).
        for (clients, docs) in [(1, 1000), (100, 1000), (1000, 1000), (10_000, 300)] {
            add(Mode::Live, transport, clients, docs, 100.0, 0.0);
        }
        // Saturation: inserts as fast as possible, ~2-5 M deliveries each.
        for (clients, docs) in [(1, 20_000), (100, 20_000), (1000, 5000), (10_000, 400)] {
            add(Mode::Live, transport, clients, docs, 0.0, 0.0);
        }
    }
    add(Mode::Live, Transport::Ndjson, 1000, 1000, 100.0, 0.0);
    add(Mode::Live, Transport::Mixed, 1000, 1000, 100.0, 0.0);
    add(Mode::Live, Transport::Sse, 10_000, 0, 0.0, 5.0);
    add(Mode::Live, Transport::Ws, 10_000, 0, 0.0, 5.0);
    add(Mode::Catchup, Transport::Sse, 1, 100_000, 0.0, 0.0);
    add(Mode::Catchup, Transport::Ws, 1, 100_000, 0.0, 0.0);
    out
}

/// What every scenario of a run shares.
struct Ctx {
    cli: Cli,
    mongo: mongodb::Client,
    mongo_uri: String,
    mongod_pid: Option<u32>,
    server_bin: PathBuf,
    dir: PathBuf,
    clients_rt: tokio::runtime::Runtime,
    /// `--relay`: the NATS URL the servers relay through.
    relay_url: Option<String>,
}

/// Where one scenario sends its clients and inserts.
struct Place {
    /// Every server's stream (`--instances`; never empty): client `i` goes to
    /// `targets[i % len]`.
    targets: Vec<Arc<Target>>,
    coll: mongodb::Collection<Document>,
    /// Multi-stream scenarios: the N collections documents are spread over (empty otherwise).
    spread: Vec<mongodb::Collection<Document>>,
    /// The servers' pids (none for `--target` without `--server-pid`).
    server_pids: Vec<u32>,
    _servers: Vec<Server>,
}

impl Place {
    /// The first server's stream.
    fn target(&self) -> &Arc<Target> {
        &self.targets[0]
    }

    /// The servers' RSS (or peak RSS with `env::hwm_kib`), summed.
    fn rss_kib(&self, read: fn(u32) -> Option<u64>) -> Option<u64> {
        if self.server_pids.is_empty() {
            return None;
        }
        self.server_pids.iter().map(|pid| read(*pid)).sum()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(cli: Cli) -> Result<(), String> {
    let nofile = env::raise_nofile();
    let scenarios = if cli.scenario.is_some() {
        Vec::new()
    } else if cli.suite {
        suite(cli.batch)
            .into_iter()
            .filter(|s| {
                cli.only
                    .as_ref()
                    .is_none_or(|o| s.label.contains(o.as_str()))
            })
            .collect()
    } else {
        vec![Scenario::from_cli(&cli)]
    };
    let most = match cli.scenario {
        Some(which) => fanin::most_clients(which, &cli),
        None => scenarios.iter().map(|s| s.clients).max().unwrap_or(0),
    };
    if (most as u64) + 64 > nofile {
        return Err(format!(
            "{most} clients need about {} open files but the limit is {nofile}; raise it \
             (ulimit -Hn / limits.conf) or use fewer clients",
            most + 64
        ));
    }
    let server_bin = match &cli.server_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("streamgate"),
    };
    let dir = std::env::temp_dir().join(format!("streamgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;

    // Started mongod lives until the end of main_async (dropped last, after the servers).
    let mut _mongod: Option<Mongo> = None;
    let (mongo_uri, mongod_pid) = match &cli.mongo_uri {
        Some(uri) => (uri.clone(), None),
        None => {
            if !server_bin.is_file() {
                return Err(format!(
                    "{} not found: build it (cargo build --release) or pass --server-bin",
                    server_bin.display()
                ));
            }
            let started = Mongo::start(&cli.repo, &dir, &server_bin)?;
            let out = (started.uri.clone(), started.pid);
            _mongod = Some(started);
            out
        }
    };
    // Stopped after the servers (dropped at the end of main_async, like mongod).
    let nats = if cli.relay {
        Some(env::Nats::start(
            &cli.repo,
            &dir,
            cli.nats_server.as_deref(),
        )?)
    } else {
        None
    };
    let mongo = mongodb::Client::with_uri_str(&mongo_uri)
        .await
        .map_err(|e| format!("MongoDB URI: {e}"))?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_threads.max(1))
        .thread_name("bench-client")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let ctx = Ctx {
        cli: cli.clone(),
        mongo,
        mongo_uri,
        mongod_pid,
        server_bin,
        dir: dir.clone(),
        clients_rt,
        relay_url: nats.as_ref().map(|n| n.url.clone()),
    };

    let mut reports = Vec::new();
    let outcome = tokio::select! {
        r = async {
            if let Some(which) = cli.scenario {
                return fanin::run(&ctx, which, &mut |report| {
                    if !cli.json {
                        report.print_human();
                    }
                    reports.push(report);
                })
                .await;
            }
            for (i, scenario) in scenarios.iter().enumerate() {
                eprintln!("bench: scenario {}/{}: {}", i + 1, scenarios.len(), scenario.label);
                let report = run_scenario(&ctx, i, scenario).await?;
                if !cli.json {
                    report.print_human();
                }
                reports.push(report);
            }
            Ok::<(), String>(())
        } => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    if cli.json {
        let json = if cli.suite || cli.scenario.is_some() {
            serde_json::to_string_pretty(&reports)
        } else {
            serde_json::to_string_pretty(&reports.first())
        };
        println!("{}", json.map_err(|e| e.to_string())?);
    } else if cli.scenario.is_some() {
        println!("{}", report::FANIN_HEADER);
        for r in &reports {
            println!("{}", report::fanin_row(r));
        }
    } else if reports.len() > 1 {
        report::print_table(&reports);
    }
    let Ctx { clients_rt, .. } = ctx;
    clients_rt.shutdown_background();
    drop(nats);
    drop(_mongod);
    if cli.keep {
        eprintln!("bench: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

/// Starts a server for the scenario (or uses `--target`).
async fn place(ctx: &Ctx, index: usize, scenario: &Scenario) -> Result<Place, String> {
    let cli = &ctx.cli;
    if let Some(url) = &cli.target {
        let host = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let addr: SocketAddr = host
            .parse()
            .map_err(|_| format!("--target must be http://IP:PORT, got {url}"))?;
        if !addr.ip().is_loopback() {
            return Err("--target must be a loopback address".into());
        }
        let target = Arc::new(Target {
            addr,
            path: format!("/{}/{}/_streams/{}", cli.db, cli.coll, cli.stream),
        });
        return Ok(Place {
            targets: vec![target],
            coll: ctx.mongo.database(&cli.db).collection(&cli.coll),
            spread: Vec::new(),
            server_pids: cli.server_pid.into_iter().collect(),
            _servers: Vec::new(),
        });
    }
    let coll = format!(
        "s{index}_{}_{}",
        scenario.transport.as_str(),
        scenario.clients
    );
    // Saturation must not cut clients with slow_consumer: let them lag by a whole run. A
    // resuming client must go through MongoDB, not the ring: keep the defaults there.
    let client_queue = cli.client_queue.unwrap_or(match scenario.mode {
        Mode::Live => (scenario.docs as usize + 1024).max(4096),
        Mode::Catchup => 1024,
    });
    let wrapper: Vec<String> = cli
        .server_wrapper
        .as_deref()
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let ready_timeout = Duration::from_secs(if wrapper.is_empty() { 30 } else { 120 });
    let spread: Vec<String> = if scenario.streams > 1 {
        (0..scenario.streams)
            .map(|i| format!("{coll}_{i}"))
            .collect()
    } else {
        Vec::new()
    };
    let specs: Vec<StreamSpec> = if spread.is_empty() {
        vec![StreamSpec::all(&cli.db, &coll, "all")]
    } else {
        spread
            .iter()
            .map(|c| StreamSpec::all(&cli.db, c, "all"))
            .collect()
    };
    let path = if spread.is_empty() {
        format!("/{}/{coll}/_streams/all", cli.db)
    } else {
        let list: Vec<String> = spread
            .iter()
            .map(|c| format!("/{}/{c}/_streams/all", cli.db))
            .collect();
        format!("/_streams?streams={}", list.join(","))
    };
    let instances = if scenario.mode == Mode::Live {
        cli.instances.max(1)
    } else {
        1
    };
    let mut servers = Vec::with_capacity(instances);
    for _ in 0..instances {
        servers.push(
            Server::start(
                &ServerSpec {
                    bin: &ctx.server_bin,
                    mongo_uri: &ctx.mongo_uri,
                    streams: &specs,
                    client_queue: Some(client_queue),
                    dir: &ctx.dir,
                    env: &cli.server_env(),
                    wrapper: &wrapper,
                    relay_url: ctx.relay_url.as_deref(),
                    more_toml: None,
                },
                ready_timeout,
            )
            .await?,
        );
    }
    let targets: Vec<Arc<Target>> = servers
        .iter()
        .map(|server| {
            Arc::new(Target {
                addr: server.addr,
                path: path.clone(),
            })
        })
        .collect();
    Ok(Place {
        targets,
        coll: ctx.mongo.database(&cli.db).collection(&coll),
        spread: spread
            .iter()
            .map(|c| ctx.mongo.database(&cli.db).collection(c))
            .collect(),
        server_pids: servers.iter().map(Server::pid).collect(),
        _servers: servers,
    })
}

async fn run_scenario(ctx: &Ctx, index: usize, scenario: &Scenario) -> Result<Report, String> {
    let load_before = env::loadavg();
    let place = place(ctx, index, scenario).await?;
    // Start the stream's worker (it lingers) so the first client does not pay for it and the
    // RSS baseline includes it.
    for target in &place.targets {
        drop(client::Conn::connect(target, Transport::Sse, None).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut report = match scenario.mode {
        Mode::Live => live(ctx, &place, scenario).await?,
        Mode::Catchup => catch_up(ctx, &place, scenario).await?,
    };
    report.loadavg = [load_before, env::loadavg()];
    Ok(report)
}

/// CPU readings of the three processes.
struct Cpu {
    at: Instant,
    server: Option<f64>,
    mongod: Option<f64>,
    bench: Option<f64>,
}

impl Cpu {
    fn read(ctx: &Ctx, server_pid: Option<u32>) -> Cpu {
        Cpu::read_all(ctx, &Vec::from_iter(server_pid))
    }

    /// With the servers' CPU summed.
    fn read_all(ctx: &Ctx, server_pids: &[u32]) -> Cpu {
        Cpu {
            at: Instant::now(),
            server: if server_pids.is_empty() {
                None
            } else {
                server_pids.iter().map(|pid| env::cpu_secs(*pid)).sum()
            },
            mongod: ctx.mongod_pid.and_then(env::cpu_secs),
            bench: env::cpu_secs(std::process::id()),
        }
    }

    fn fill(&self, later: &Cpu, report: &mut Report) {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let pct = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / wall * 100.0);
        report.server_cpu_pct = pct(self.server, later.server);
        report.mongod_cpu_pct = pct(self.mongod, later.mongod);
        report.bench_cpu_pct = pct(self.bench, later.bench);
    }
}

async fn live(ctx: &Ctx, place: &Place, scenario: &Scenario) -> Result<Report, String> {
    let cli = &ctx.cli;
    let mut report = Report {
        scenario: scenario.label.clone(),
        mode: "live".into(),
        transport: scenario.transport.as_str().into(),
        clients: scenario.clients,
        docs: scenario.docs,
        rate: scenario.rate,
        ..Report::default()
    };
    report.server_rss_base_kib = place.rss_kib(env::rss_kib);

    let shared = Shared::new(64);
    let gate = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
    let expect = Expect::range(0, scenario.docs);
    let overflows_before = env::listen_overflows();
    let handles: Vec<_> = (0..scenario.clients)
        .map(|i| {
            ctx.clients_rt.spawn(client::run_client(
                i,
                scenario.transport.for_client(i),
                Arc::clone(&place.targets[i % place.targets.len()]),
                expect,
                None,
                Arc::clone(&gate),
                Arc::clone(&shared),
            ))
        })
        .collect();
    report.connect_all_secs =
        wait_connected(&shared, scenario.clients, Duration::from_secs(120)).await;
    report.connected = shared.connected.load(Ordering::Acquire);
    report.listen_overflows = env::listen_overflows()
        .zip(overflows_before)
        .map(|(after, before)| after - before);
    // Let the server settle (allocator, kernel buffers) before reading its RSS.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if scenario.idle_secs > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(scenario.idle_secs)).await;
    }
    report.server_rss_connected_kib = place.rss_kib(env::rss_kib);
    if let (Some(base), Some(conn)) = (report.server_rss_base_kib, report.server_rss_connected_kib)
        && report.connected > 0
    {
        report.server_rss_per_client_kib =
            Some((conn as f64 - base as f64) / report.connected as f64);
    }
    // Every client attached: what the run costs mongod in cursors (the relay's point).
    report.relay = ctx.relay_url.is_some();
    report.mongod_cursors = upstream::change_stream_cursors(&ctx.mongo).await.ok();
    report.mongod_connections = upstream::mongod_connections(&ctx.mongo).await.ok();

    let cpu0 = Cpu::read_all(ctx, &place.server_pids);
    let bytes0 = shared.bytes.load(Ordering::Relaxed);
    let first_insert_us = now_us();
    let inserted = if place.spread.is_empty() {
        insert_docs(
            &place.coll,
            0,
            scenario.docs,
            scenario.rate,
            scenario.batch,
            &scenario.shape,
        )
        .await?
    } else {
        insert_spread(
            &place.spread,
            scenario.docs,
            scenario.rate,
            scenario.batch,
            &scenario.shape,
        )
        .await?
    };
    let insert_secs = (now_us() - first_insert_us) as f64 / 1e6;
    report.insert_rate = inserted as f64 / insert_secs.max(1e-9);

    wait_delivered(&shared, report.connected, scenario.docs > 0, cli).await;
    let cpu1 = Cpu::read_all(ctx, &place.server_pids);
    cpu0.fill(&cpu1, &mut report);
    report.server_rss_peak_kib = place.rss_kib(env::hwm_kib);
    shared.stop.cancel();
    let results = join_clients(handles).await?;
    report.deliveries = shared.delivered.load(Ordering::Relaxed);
    if report.deliveries > 0 {
        let per = |total: f64| total / report.deliveries as f64;
        let bytes = shared.bytes.load(Ordering::Relaxed).saturating_sub(bytes0);
        report.bytes_per_delivery = Some(per(bytes as f64));
        report.server_cpu_us_per_delivery = cpu0
            .server
            .zip(cpu1.server)
            .map(|(before, after)| per((after - before) * 1e6));
    }
    report.max_id_len = Some(shared.max_id_len.load(Ordering::Relaxed)).filter(|n| *n > 0);
    let last = shared.last_delivery_us.load(Ordering::Relaxed);
    report.delivery_secs = ((last - first_insert_us) as f64 / 1e6).max(0.0);
    if report.delivery_secs > 0.0 {
        report.deliveries_per_sec = report.deliveries as f64 / report.delivery_secs;
    }
    report.latency_ms = Percentiles::from_us(&shared.merged());
    report.add_clients(&results, scenario.docs);
    Ok(report)
}

/// One client reads a marker event and disconnects; `docs` documents are inserted; the
/// client reconnects with `Last-Event-ID` = the marker and is timed until it has them all.
async fn catch_up(ctx: &Ctx, place: &Place, scenario: &Scenario) -> Result<Report, String> {
    let cli = &ctx.cli;
    let mut report = Report {
        scenario: scenario.label.clone(),
        mode: "catchup".into(),
        transport: scenario.transport.as_str().into(),
        clients: 1,
        docs: scenario.docs,
        ..Report::default()
    };
    let coll = place.coll.clone();
    let marker = client::first_id_of(
        place.target(),
        scenario.transport,
        -1,
        Duration::from_secs(10),
        async move {
            insert_docs(&coll, -1, 1, 0.0, 1, &Shape::default())
                .await
                .map(drop)
        },
    )
    .await?;
    let started = now_us();
    insert_docs(
        &place.coll,
        0,
        scenario.docs,
        0.0,
        scenario.batch.max(1000),
        &scenario.shape,
    )
    .await?;
    report.insert_rate = scenario.docs as f64 / ((now_us() - started) as f64 / 1e6);
    // Let the worker publish everything (it is ahead of the client, as in real resumes).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let shared = Shared::new(1);
    let cpu0 = Cpu::read_all(ctx, &place.server_pids);
    let t0 = now_us();
    let handle = ctx.clients_rt.spawn(client::run_client(
        0,
        scenario.transport,
        Arc::clone(place.target()),
        Expect::range(0, scenario.docs),
        Some(marker),
        Arc::new(Semaphore::new(1)),
        Arc::clone(&shared),
    ));
    let deadline = Instant::now() + Duration::from_secs_f64(cli.max_secs);
    let mut first_event_us = None;
    let mut last_count = 0;
    let mut last_progress = Instant::now();
    while shared.complete.load(Ordering::Acquire) == 0 && shared.ended.load(Ordering::Acquire) == 0
    {
        let count = shared.delivered.load(Ordering::Relaxed);
        if count > 0 && first_event_us.is_none() {
            first_event_us = Some(now_us());
        }
        if count != last_count {
            last_count = count;
            last_progress = Instant::now();
        }
        if Instant::now() > deadline
            || last_progress.elapsed() > Duration::from_secs_f64(cli.drain_secs)
        {
            eprintln!("bench: catch-up stalled at {count} events; stopping");
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu1 = Cpu::read_all(ctx, &place.server_pids);
    cpu0.fill(&cpu1, &mut report);
    shared.stop.cancel();
    let result = handle.await.map_err(|e| e.to_string())?;
    report.connected = usize::from(result.connect_us.is_some());
    report.deliveries = shared.delivered.load(Ordering::Relaxed);
    let last = shared.last_delivery_us.load(Ordering::Relaxed);
    report.delivery_secs = ((last - t0) as f64 / 1e6).max(0.0);
    if report.delivery_secs > 0.0 {
        report.deliveries_per_sec = report.deliveries as f64 / report.delivery_secs;
        report.catch_up_events_per_sec = Some(result.unique as f64 / report.delivery_secs);
    }
    report.catch_up_first_event_ms = first_event_us.map(|t| (t - t0) as f64 / 1000.0);
    report.latency_ms = Percentiles::from_us(&shared.merged());
    report.add_clients(std::slice::from_ref(&result), scenario.docs);
    Ok(report)
}

/// Waits until every one of `clients` clients has connected or failed, at most `bound` (then
/// the ones still connecting give up). Returns the seconds it took.
async fn wait_connected(shared: &Shared, clients: usize, bound: Duration) -> f64 {
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let connected = shared.connected.load(Ordering::Acquire);
        let failed = shared.connect_failed.load(Ordering::Acquire);
        if connected + failed >= clients {
            break;
        }
        if started.elapsed() > bound {
            eprintln!(
                "bench: connect phase bounded at {bound:?} ({connected} connected, {failed} failed)"
            );
            shared.stop_connecting.cancel();
            break;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!("bench:   {connected} connected, {failed} failed");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed().as_secs_f64()
}

/// Waits until every one of `connected` clients has everything (or ended), nothing arrived for
/// `--drain-secs`, or `--max-secs` passed. Returns whether every client completed.
async fn wait_delivered(shared: &Shared, connected: usize, expecting: bool, cli: &Cli) -> bool {
    let hard_deadline = Instant::now() + Duration::from_secs_f64(cli.max_secs);
    let mut last_count = shared.delivered.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let done = shared.complete.load(Ordering::Acquire);
        let ended = shared.ended.load(Ordering::Acquire);
        if done >= connected || !expecting {
            return true;
        }
        // Every client either has everything or was ended (cut, closed) by the server.
        if done + ended >= connected {
            return false;
        }
        let count = shared.delivered.load(Ordering::Relaxed);
        if count != last_count {
            last_count = count;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > Duration::from_secs_f64(cli.drain_secs) {
            eprintln!("bench: no event for {} s; stopping", cli.drain_secs);
            return false;
        }
        if Instant::now() > hard_deadline {
            eprintln!("bench: --max-secs reached; stopping");
            return false;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!("bench:   {count} deliveries, {done}/{connected} clients complete");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Collects the clients' results (after `shared.stop`), each within 30 s.
async fn join_clients(
    handles: Vec<tokio::task::JoinHandle<ClientResult>>,
) -> Result<Vec<ClientResult>, String> {
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        match tokio::time::timeout(Duration::from_secs(30), handle).await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => return Err(format!("client task failed: {e}")),
            Err(_) => return Err("a client did not stop within 30 s".into()),
        }
    }
    Ok(results)
}

/// What benchmark documents carry besides `seq` and `sentAt`.
#[derive(Debug, Clone, Default)]
struct Shape {
    /// `pad`: a string of this many bytes (0: none).
    pad: usize,
    /// `owner`: `"o{seq mod owners}"` (0: none), for streams bound by owner.
    owners: u64,
}

impl Shape {
    /// The document of `seq`, stamped `sent_at`.
    fn doc(&self, seq: i64, sent_at: i64, pad: &str) -> Document {
        let mut d = doc! { "seq": seq, "sentAt": sent_at };
        if self.owners > 0 {
            d.insert("owner", owner(seq.rem_euclid(self.owners as i64) as u64));
        }
        if !pad.is_empty() {
            d.insert("pad", pad);
        }
        d
    }
}

/// The owner name of binding `i`.
fn owner(i: u64) -> String {
    format!("o{i}")
}

/// Inserts the documents of `seq` in `first .. first + count` (see [`Shape`]), paced to
/// `rate` per second (0: back-to-back batches of `batch`). Returns how many were inserted.
/// Like [`insert_docs`] from seq 0, document k into `colls[k % len]` (a batch becomes one
/// `insert_many` per collection, so each stream's order is the seq order).
async fn insert_spread(
    colls: &[mongodb::Collection<Document>],
    count: u64,
    rate: f64,
    batch: usize,
    shape: &Shape,
) -> Result<u64, String> {
    let pad = "x".repeat(shape.pad);
    let batch = batch.max(1) as u64;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let len = colls.len().max(1) as u64;
    while sent < count {
        let n = if rate > 0.0 {
            let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(count);
            if due <= sent {
                let next = started + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(next).await;
                continue;
            }
            (due - sent).min(batch)
        } else {
            (count - sent).min(batch)
        };
        let stamp = now_us();
        for (i, coll) in colls.iter().enumerate() {
            let docs: Vec<Document> = (sent..sent + n)
                .filter(|k| k % len == i as u64)
                .map(|k| shape.doc(k as i64, stamp, &pad))
                .collect();
            if !docs.is_empty() {
                coll.insert_many(docs)
                    .await
                    .map_err(|e| format!("insert failed: {e}"))?;
            }
        }
        sent += n;
    }
    Ok(sent)
}

async fn insert_docs(
    coll: &mongodb::Collection<Document>,
    first: i64,
    count: u64,
    rate: f64,
    batch: usize,
    shape: &Shape,
) -> Result<u64, String> {
    let pad = "x".repeat(shape.pad);
    let batch = batch.max(1) as u64;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    while sent < count {
        let n = if rate > 0.0 {
            // Documents due by now (the first one at t = 0).
            let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(count);
            if due <= sent {
                let next = started + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(next).await;
                continue;
            }
            (due - sent).min(batch)
        } else {
            (count - sent).min(batch)
        };
        let stamp = now_us();
        let seq = |k: u64| first + (sent + k) as i64;
        let result = if n == 1 {
            coll.insert_one(shape.doc(seq(0), stamp, &pad))
                .await
                .map(drop)
        } else {
            let docs = (0..n).map(|k| shape.doc(seq(k), stamp, &pad));
            coll.insert_many(docs).await.map(drop)
        };
        result.map_err(|e| format!("insert failed: {e}"))?;
        sent += n;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_carry_owner_and_pad_when_asked() {
        let plain = Shape::default().doc(7, 100, "");
        assert_eq!(plain, doc! { "seq": 7_i64, "sentAt": 100_i64 });
        let owned = Shape { pad: 3, owners: 5 }.doc(7, 100, "xxx");
        assert_eq!(owned.get_str("owner").ok(), Some("o2"));
        assert_eq!(owned.get_str("pad").ok(), Some("xxx"));
    }
}
