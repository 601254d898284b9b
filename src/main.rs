//! `streamgate` binary: CLI → config → telemetry → bind → serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use streamgate::config::{self, Config, LogFormat, Overrides};
use tokio::net::{TcpListener, TcpSocket};
use tracing_subscriber::EnvFilter;

/// MongoDB change streams as live SSE / WebSocket / NDJSON feeds.
///
/// Every setting of the file can also be given as a flag or an environment variable (see the
/// settings below): a flag wins over the environment, which wins over the file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "STREAMGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text (the same as `log_format = "json"` in the file).
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
    /// Validate a configuration file and print what it would serve, without binding a port or
    /// connecting to MongoDB. Exits 1 on an invalid configuration.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // The settings' flags come from the configuration's declarations, not from `Cli`.
    let matches = Cli::command().args(config::flags()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let overrides = Overrides::collect(
        |name| std::env::var_os(name).map(|value| value.to_string_lossy().into_owned()),
        &matches,
    );
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match check_config(file, overrides).await {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("streamgate: {message}");
                ExitCode::FAILURE
            }
        };
    }
    // The log format is in the config file: read it before logging starts (its errors are
    // printed to stderr below either way).
    let config = load_config(&cli, overrides);
    let json = cli.log_json
        || config
            .as_ref()
            .is_ok_and(|config| config.log_format == LogFormat::Json);
    init_logging(json);
    let result = match config {
        Ok(config) => run(cli, config).await,
        Err(message) => Err(message),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("streamgate: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Text or JSON lines on stdout, filtered by `RUST_LOG` (default `info`). JSON lines have
/// stable top-level fields: `timestamp`, `level`, `target`, `message`, then the event's own
/// fields (`stream`, `error`, `status`, …); spans are left out so the shape never depends on
/// where an event was logged from.
fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

/// The file's config (defaults without one) with the environment and flag overrides, validated.
fn load_config(cli: &Cli, overrides: Overrides) -> Result<Config, String> {
    let config = match &cli.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    config.with_overrides(overrides).map_err(|e| e.to_string())
}

async fn run(cli: Cli, config: Config) -> Result<(), String> {
    if let Some(Command::InitReplset { uri, replset, host }) = &cli.command {
        streamgate::replset::initiate(uri, replset, host, Duration::from_secs(60)).await?;
        println!("replica set {replset} ready, primary {host}");
        return Ok(());
    }
    let listen = config.listen;
    if !listen.ip().is_loopback() && !config.auth.enabled {
        tracing::warn!(%listen, "listening on a non-loopback address WITHOUT authentication: anyone who can reach this port can read every stream and change every definition; set [auth] enabled = true (docs/security.md)");
    }
    if config.auth.enabled && config.auth.rules.is_empty() {
        tracing::warn!(
            "auth is on but [[auth.rules]] is empty: no one may subscribe to any stream"
        );
    }
    let mut app = streamgate::App::new(config)
        .await
        .map_err(|e| e.to_string())?;
    app.bind_metrics().await.map_err(|e| e.to_string())?;
    let listener = bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    // The bound address (port 0 in the config means "any": say which one).
    let listen = listener.local_addr().unwrap_or(listen);
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

/// `streamgate check-config FILE`: parses and validates `file` with the environment's and the
/// flags' settings over it, as the server would load it (TOML, stream definitions, `[auth]`
/// key files, the MongoDB URI's syntax), and describes what the server would serve. Binds
/// nothing and connects to nothing (a `mongodb+srv` URI is not resolved).
async fn check_config(file: &std::path::Path, overrides: Overrides) -> Result<String, String> {
    use std::fmt::Write as _;
    let overridden = overrides.describe();
    let config = Config::from_file(file)
        .map_err(|e| e.to_string())?
        .with_overrides(overrides)
        .map_err(|e| e.to_string())?;
    // Building the authenticator checks keys and rules; a JWKS URL is only fetched later.
    streamgate::auth::Authenticator::from_config(
        &config.auth,
        &streamgate::metrics::Metrics::new(),
    )
    .map_err(|e| format!("invalid auth configuration: {e}"))?;
    let srv = config.mongo_uri.starts_with("mongodb+srv://");
    let pool_from_uri = if srv {
        None
    } else {
        mongodb::options::ClientOptions::parse(&config.mongo_uri)
            .await
            .map_err(|e| format!("invalid MongoDB URI: {e}"))?
            .max_pool_size
    };
    let mut out = String::new();
    let mut warnings = Vec::new();
    let _ = writeln!(out, "{}: valid", file.display());
    if !overridden.is_empty() {
        let _ = writeln!(out, "overrides     {}", overridden.join(", "));
    }
    let _ = writeln!(out, "listen        {}", config.listen);
    let _ = writeln!(
        out,
        "mongo_uri     {}{}",
        redact(&config.mongo_uri),
        if srv { " (SRV: not resolved here)" } else { "" }
    );
    let auth = &config.auth;
    if auth.enabled {
        let _ = writeln!(
            out,
            "auth          on: jwt {}, {} api key(s), admin role {:?}, {} subscribe rule(s)",
            if auth.jwt.is_some() { "yes" } else { "no" },
            auth.api_keys.len(),
            auth.admin_role,
            auth.rules.len()
        );
        if auth.rules.is_empty() {
            warnings.push("auth is on but [[auth.rules]] is empty: no one may subscribe".into());
        }
    } else {
        let _ = writeln!(out, "auth          off");
        if !config.listen.ip().is_loopback() {
            warnings.push(format!(
                "listening on {} WITHOUT authentication: anyone who can reach it reads every \
                 stream and changes every definition",
                config.listen
            ));
        }
    }
    let limits = &config.limits;
    let show = |v: Option<usize>| v.map_or("unlimited".to_owned(), |v| v.to_string());
    let _ = writeln!(
        out,
        "limits        connections {} (per stream {}, per user {}, per ip {}); cursors {} \
         (per stream {})",
        show(limits.max_connections),
        show(limits.per_stream),
        show(limits.per_user),
        show(limits.per_ip),
        limits.max_workers,
        limits.max_bindings_per_stream
    );
    if let streamgate::limits::PoolSize::TooSmall { given, needed } =
        streamgate::limits::PoolSize::for_limits(limits, pool_from_uri)
    {
        warnings.push(format!(
            "mongo_uri sets maxPoolSize={given}, below the {needed} that limits.max_workers needs"
        ));
    }
    let _ = writeln!(
        out,
        "timeouts      keep-alive {}s, stall {}s, shutdown grace {}s, worker linger {}ms",
        config.keepalive_secs,
        config.stall_timeout_secs,
        config.shutdown_grace_secs,
        config.worker_linger_ms
    );
    let _ = writeln!(
        out,
        "definitions   stored in {}.{} (admin API), shared by every instance on the cluster",
        config.admin.database, config.admin.collection
    );
    let _ = writeln!(out, "static streams ({}):", config.streams.len());
    for stream in &config.streams {
        let (key, definition) = stream.split().map_err(|e| e.to_string())?;
        let compiled = definition
            .clone()
            .compile()
            .map_err(|e| format!("{key}: {e}"))?;
        let stages = definition.pipeline.as_array().map_or(0, Vec::len);
        let variables: Vec<&str> = compiled.variable_names().collect();
        let mut notes = vec![format!("{stages} stage(s)")];
        if !variables.is_empty() {
            notes.push(format!("avars {}", variables.join(", ")));
        }
        if definition.match_rules.is_some() {
            notes.push("match rules".into());
        }
        if definition.snapshot {
            notes.push("snapshot".into());
        }
        let _ = writeln!(out, "  {key}  ({})", notes.join("; "));
    }
    let _ = writeln!(
        out,
        "endpoints     GET /{{db}}/{{coll}}/_streams/{{name}} (SSE, WebSocket, NDJSON; .json: \
         document view), /_admin/streams, /_admin/ui, \
         /_admin/openapi.json, /health/live, /health/ready, /metrics"
    );
    let _ = writeln!(
        out,
        "logs          {}",
        match config.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    );
    for warning in warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    Ok(out)
}

/// The URI with its password replaced by `****`.
fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:****@{host}")
        }
        _ => uri.to_owned(),
    }
}
