//! `streamgate` binary: CLI → config → telemetry → bind → serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use streamgate::config::{Config, Overrides};
use tokio::net::{TcpListener, TcpSocket};
use tracing_subscriber::EnvFilter;

/// MongoDB change streams as live SSE / WebSocket / NDJSON feeds.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "STREAMGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the file).
    #[arg(long, env = "STREAMGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// MongoDB URI; must reach a replica set (overrides the file).
    #[arg(long, env = "STREAMGATE_MONGO_URI")]
    mongo_uri: Option<String>,
    /// Keep-alive period in seconds.
    #[arg(long, env = "STREAMGATE_KEEPALIVE_SECS")]
    keepalive_secs: Option<u64>,
    /// Events a client may lag before `slow_consumer`.
    #[arg(long, env = "STREAMGATE_CLIENT_QUEUE")]
    client_queue: Option<usize>,
    /// Milliseconds a worker lingers after its last client.
    #[arg(long, env = "STREAMGATE_WORKER_LINGER_MS")]
    worker_linger_ms: Option<u64>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "STREAMGATE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Initiate a single-node replica set and wait until it is primary (local development).
    InitReplset {
        /// URI of the mongod (use directConnection=true).
        #[arg(
            long,
            default_value = "mongodb://127.0.0.1:27017/?directConnection=true"
        )]
        uri: String,
        /// Replica set name (must match mongod --replSet).
        #[arg(long, default_value = "rs0")]
        replset: String,
        /// Member host:port as clients will reach it.
        #[arg(long, default_value = "127.0.0.1:27017")]
        host: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("streamgate: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    if let Some(Command::InitReplset { uri, replset, host }) = &cli.command {
        streamgate::replset::initiate(uri, replset, host, Duration::from_secs(60)).await?;
        println!("replica set {replset} ready, primary {host}");
        return Ok(());
    }
    let config = match &cli.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let config = config
        .with_overrides(Overrides {
            listen: cli.listen,
            mongo_uri: cli.mongo_uri,
            keepalive_secs: cli.keepalive_secs,
            client_queue: cli.client_queue,
            worker_linger_ms: cli.worker_linger_ms,
        })
        .map_err(|e| e.to_string())?;
    let listen = config.listen;
    if !listen.ip().is_loopback() && !config.auth.enabled {
        tracing::warn!(%listen, "listening on a non-loopback address WITHOUT authentication: anyone who can reach this port can read every stream and change every definition; set [auth] enabled = true (docs/security.md)");
    }
    if config.auth.enabled && config.auth.rules.is_empty() {
        tracing::warn!(
            "auth is on but [[auth.rules]] is empty: no one may subscribe to any stream"
        );
    }
    let app = streamgate::App::new(config)
        .await
        .map_err(|e| e.to_string())?;
    let listener = bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "streamgate listening");
    app.serve(listener, streamgate::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Pending connections the kernel queues before `accept`: the default 128 overflows when
/// thousands of clients reconnect at once (1 s connect tails measured at 1,000 clients).
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
