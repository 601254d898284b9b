//! Configuration: a TOML file, then `STREAMGATE_*` environment variables, then CLI flags.
//!
//! Parsing never binds a socket or connects to MongoDB. The environment and CLI layer is the
//! [`Overrides`] struct (filled by clap in `main.rs`), so tests build configs without touching
//! the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::streams::definition::{DefinitionError, StreamDefinition, StreamKey};

/// Default listen address: loopback only, so a local run never exposes data by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default MongoDB URI: the single-node replica set `scripts/mongo-local` starts.
pub const DEFAULT_MONGO_URI: &str = "mongodb://127.0.0.1:27017/?replicaSet=rs0";

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// MongoDB connection string; must reach a replica set (change streams need one).
    #[serde(default = "default_mongo_uri")]
    pub mongo_uri: String,
    /// Seconds between keep-alives (SSE comment, NDJSON empty line, WebSocket ping).
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
    /// Deprecated and ignored: clients are no longer cut by how many events they are behind
    /// (a client that keeps reading is served from the ring and shared catch-ups; one whose
    /// socket stalls is closed after `stall_timeout_secs`). Still accepted so old configs load.
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    /// Recent events each worker keeps in memory to serve resumes without a new cursor.
    #[serde(default = "default_ring_size")]
    pub ring_size: usize,
    /// Milliseconds a worker keeps its cursor open after its last client leaves.
    #[serde(default = "default_worker_linger_ms")]
    pub worker_linger_ms: u64,
    /// Seconds open streams get to close on SIGTERM/SIGINT before the process exits anyway.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// The `retry:` hint (ms) sent to SSE clients at the start and on shutdown.
    #[serde(default = "default_sse_retry_ms")]
    pub sse_retry_ms: u64,
    /// Seconds a client's socket may accept no bytes while the server has some to write to
    /// it (a stream falling behind, a response, a WebSocket frame); then it is closed. Any
    /// progress restarts the clock, so a slow but steady reader is never cut by it.
    #[serde(default = "default_stall_timeout_secs")]
    pub stall_timeout_secs: u64,
    /// Seconds a connection may take to send a complete request head (from accept, or for a
    /// kept-alive connection from the end of the previous response); then it is closed.
    #[serde(default = "default_head_timeout_secs")]
    pub head_timeout_secs: u64,
    /// Seconds a kept-alive HTTP connection may move no bytes either way before it is closed
    /// (open streams write keep-alives, so they are not idle).
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Most documents the document view's first `put` may hold (it is one event, built
    /// before the response starts); past it the request is refused with 413.
    #[serde(default = "default_snapshot_max_docs")]
    pub snapshot_max_docs: usize,
    /// Snapshot scans (`snapshot=true`, the document view) running at once on this server;
    /// a request that finds none free within a few seconds gets 503 with `Retry-After`.
    #[serde(default = "default_snapshot_max_scans")]
    pub snapshot_max_scans: usize,
    /// Where the admin API stores stream definitions.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Static stream definitions (read-only in the admin API).
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
    /// Authentication and permissions (off by default; see `docs/security.md`).
    #[serde(default)]
    pub auth: AuthConfig,
    /// Connection limits (unlimited by default).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Cross-origin access for browsers (same-origin only by default).
    #[serde(default)]
    pub cors: CorsConfig,
    /// Peers (CIDRs such as `10.0.0.0/8`, or single addresses) whose word on the client's
    /// address is taken: from them only, the PROXY protocol header (v1/v2) and
    /// `X-Forwarded-For` (rightmost untrusted hop) name the client for limits, logs and metrics.
    /// Empty (default): the TCP peer is the client, and both are ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// `text` (default) or `json`: one JSON object per line with stable field names
    /// (`timestamp`, `level`, `target`, `message`, then the event's own fields). `--log-json`
    /// (`STREAMGATE_LOG_JSON`) forces `json`.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[auth]`: who may subscribe to which stream and who may use `/_admin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Require a valid credential on subscribe and admin requests. Off by default so a local
    /// run needs no setup; Streamgate warns loudly when it listens beyond loopback without it.
    #[serde(default)]
    pub enabled: bool,
    /// JWT bearer tokens (`[auth.jwt]`); absent: JWTs are not accepted.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Static API keys for services, stored as SHA-256 hashes (`[[auth.api_keys]]`).
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Cookie that may carry the token (after `Authorization: Bearer` and `?access_token=`).
    #[serde(default = "default_cookie_name")]
    pub cookie_name: String,
    /// Role required for every `/_admin` request.
    #[serde(default = "default_admin_role")]
    pub admin_role: String,
    /// Subscribe permissions; a stream no rule grants is refused with 403. These are static;
    /// rules managed through `/_admin/rules` are stored in MongoDB and add to them.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Collection (in `admin.database`) holding the rules managed through `/_admin/rules`.
    #[serde(default = "default_rules_collection")]
    pub rules_collection: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            jwt: None,
            api_keys: Vec::new(),
            cookie_name: default_cookie_name(),
            admin_role: default_admin_role(),
            rules: Vec::new(),
            rules_collection: default_rules_collection(),
        }
    }
}

/// `[auth.jwt]`: how bearer JWTs are verified. Exactly one key source must be given:
/// `hs256_secret`, `public_key_pem_file`, `jwks_file` or `jwks_url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256/384/512 tokens.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// PEM file holding an RSA or EC public key (RS*/PS*/ES* tokens).
    #[serde(default)]
    pub public_key_pem_file: Option<PathBuf>,
    /// JWKS file (`{"keys":[…]}`); the token's `kid` picks the key.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL of an identity provider (`https://…/.well-known/jwks.json`; `http://` only for
    /// a loopback host). Fetched at startup (readiness waits for it), refreshed when its HTTP
    /// cache lifetime ends and, rate-limited, when a token names an unknown `kid`; a failed
    /// fetch keeps the last good set.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Seconds a fetched JWKS is kept when the response has no `Cache-Control: max-age` or
    /// `Expires`.
    #[serde(default = "default_jwks_refresh_secs")]
    pub jwks_refresh_secs: u64,
    /// Least seconds between two fetches of `jwks_url` caused by unknown `kid`s (so forged
    /// `kid`s cannot make us hammer the provider); also the shortest cache lifetime honoured
    /// and the first retry delay after a failed fetch.
    #[serde(default = "default_jwks_min_refresh_secs")]
    pub jwks_min_refresh_secs: u64,
    /// Accepted `alg` values (e.g. `["RS256"]`); empty: every algorithm of the key's family.
    /// Algorithms of another family than the key are refused at startup.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud` (the token's `aud` must contain it), if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Claim holding the roles: an array of strings or a space-separated string; dots walk
    /// into objects (`realm_access.roles`).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Clock-skew allowance in seconds for `exp` and `nbf`; a live stream is then cut at
    /// `exp + leeway_secs`.
    #[serde(default)]
    pub leeway_secs: u64,
}

/// `[[auth.api_keys]]`: a static key for a service. The key itself never appears in the
/// config: `sha256` is the hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds the key; the principal's subject (limits, logs).
    pub name: String,
    /// Lower- or upper-case hex SHA-256 of the key (64 digits).
    pub sha256: String,
    /// Roles granted to the key.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// `[[auth.rules]]`: holders of any of `roles` may subscribe to the `streams` patterns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Roles the rule applies to; `*` means any authenticated principal.
    pub roles: Vec<String>,
    /// Patterns `/{db}/{coll}/_streams/{name}`; each name is a literal or `*`.
    pub streams: Vec<String>,
}

/// `[limits]`: open streams allowed (absent: unlimited; over a limit a request gets 429 with
/// `Retry-After`; a slot is held for the whole life of a stream), and upstream work allowed
/// (MongoDB change-stream cursors, always bounded; over a limit a subscribe gets 503 with
/// `Retry-After`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open streams in total.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Open streams per stream definition (all variable values together).
    #[serde(default)]
    pub per_stream: Option<usize>,
    /// Open streams per authenticated subject (not applied when auth is off).
    #[serde(default)]
    pub per_user: Option<usize>,
    /// Open streams per client IP address (the TCP peer).
    #[serde(default)]
    pub per_ip: Option<usize>,
    /// The `Retry-After` value sent with 429 and with an upstream 503, in seconds.
    #[serde(default = "default_retry_after_secs")]
    pub retry_after_secs: u64,
    /// MongoDB change-stream cursors open at once, catch-up cursors included. Each one holds a
    /// pooled connection during its `getMore` (up to `max_await`), so the driver's pool is
    /// sized from this. Default 1000: ten times the 100 definitions a large deployment runs,
    /// well under a mongod's usual connection ceiling (its open-files limit, often 64k, shared
    /// by every instance), and about 1 GB of mongod memory (~1 MB per connection) per instance.
    #[serde(default = "default_max_workers")]
    pub max_workers: usize,
    /// Distinct cursors one stream definition may hold: one per binding of `$var` values that
    /// cannot be routed in-process. Clients choose `avars`, so without a bound one client could
    /// open cursors at will. Default 100: room for many bindings while no single stream can
    /// take more than a tenth of the default `max_workers`.
    #[serde(default = "default_max_bindings_per_stream")]
    pub max_bindings_per_stream: usize,
    /// Streams one `GET /_streams` connection may carry (query list plus WebSocket
    /// `subscribe`s). Each stream also takes its own slot of the limits above.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: None,
            per_stream: None,
            per_user: None,
            per_ip: None,
            retry_after_secs: default_retry_after_secs(),
            max_workers: default_max_workers(),
            max_bindings_per_stream: default_max_bindings_per_stream(),
            max_streams_per_connection: default_max_streams_per_connection(),
        }
    }
}

/// Largest accepted `max_workers`: each cursor may need its own connection to the primary, and
/// a mongod rarely accepts more than its open-files limit (often 64k) in total.
pub const MAX_WORKERS_CEILING: usize = 65_536;

impl LimitsConfig {
    /// Checks the upstream limits (the connection limits are valid whatever they are).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_WORKERS_CEILING).contains(&self.max_workers) {
            return Err(ConfigError::Invalid(format!(
                "limits.max_workers must be 1 to {MAX_WORKERS_CEILING} (got {})",
                self.max_workers
            )));
        }
        if self.max_bindings_per_stream == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_bindings_per_stream must be at least 1".into(),
            ));
        }
        if self.max_streams_per_connection == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_streams_per_connection must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// `[cors]`: which other origins browsers may use Streamgate from (HTTP via CORS headers,
/// WebSocket via an `Origin` check).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`); `*` allows any origin, but only without
    /// credentials. Empty: same-origin only.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Let browsers send cookies (`Access-Control-Allow-Credentials: true`).
    #[serde(default)]
    pub allow_credentials: bool,
}

impl CorsConfig {
    /// Checks `[cors]` (no I/O): origins are scheme and host, and `*` never with credentials.
    pub fn check(&self) -> Result<(), String> {
        for origin in &self.allowed_origins {
            if origin == "*" {
                if self.allow_credentials {
                    return Err(
                        "cors: `*` cannot be combined with allow_credentials; list the origins"
                            .into(),
                    );
                }
                continue;
            }
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let valid = rest.is_some_and(|host| {
                !host.is_empty()
                    && !host.contains('/')
                    && axum::http::HeaderValue::from_str(origin).is_ok()
            });
            if !valid {
                return Err(format!(
                    "cors.allowed_origins: {origin:?} is not an origin like https://app.example.com \
                     (scheme and host, optional port, no path)"
                ));
            }
        }
        Ok(())
    }
}

/// Storage of dynamic stream definitions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Database holding the definitions collection.
    #[serde(default = "default_admin_db")]
    pub database: String,
    /// Collection holding one document per stream definition.
    #[serde(default = "default_admin_coll")]
    pub collection: String,
    /// Largest accepted admin request body, in bytes.
    #[serde(default = "default_admin_body_limit")]
    pub body_limit: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            database: default_admin_db(),
            collection: default_admin_coll(),
            body_limit: default_admin_body_limit(),
        }
    }
}

/// One `[[streams]]` table of the config file: where the stream is served, plus the same
/// definition members the admin API and the store take (one serde type, [`StreamDefinition`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Database watched.
    pub db: String,
    /// Collection watched.
    pub coll: String,
    /// Stream name.
    pub name: String,
    /// `pipeline` (alias `stages`), `fullDocument`, `fullDocumentBeforeChange`, `description`
    /// and `match`, e.g. `match = { "fullDocument.tenantId" = { "$claim" = "tenant" } }`.
    #[serde(flatten)]
    pub definition: StreamDefinition,
}

impl StreamConfig {
    /// The key and definition this table declares.
    pub fn split(&self) -> Result<(StreamKey, StreamDefinition), DefinitionError> {
        let key = StreamKey::new(&self.db, &self.coll, &self.name)?;
        Ok((key, self.definition.clone()))
    }
}

/// Values from the environment or the command line; each `Some` wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `STREAMGATE_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--mongo-uri` / `STREAMGATE_MONGO_URI`.
    pub mongo_uri: Option<String>,
    /// `--keepalive-secs` / `STREAMGATE_KEEPALIVE_SECS`.
    pub keepalive_secs: Option<u64>,
    /// `--client-queue` / `STREAMGATE_CLIENT_QUEUE`.
    pub client_queue: Option<usize>,
    /// `--worker-linger-ms` / `STREAMGATE_WORKER_LINGER_MS`.
    pub worker_linger_ms: Option<u64>,
}

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// TOML syntax or a wrong key/type; the message names the key, line and column.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// File path, or `<string>`.
        origin: String,
        /// toml's message, which quotes the line.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Default for Config {
    fn default() -> Self {
        // An empty document takes every serde default; this cannot fail.
        Config::from_toml_str("", "<defaults>").unwrap_or_else(|_| unreachable!())
    }
}

impl Config {
    /// Parses TOML text. `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Applies environment/CLI overrides, then checks the result.
    pub fn with_overrides(mut self, overrides: Overrides) -> Result<Config, ConfigError> {
        if let Some(v) = overrides.listen {
            self.listen = v;
        }
        if let Some(v) = overrides.mongo_uri {
            self.mongo_uri = v;
        }
        if let Some(v) = overrides.keepalive_secs {
            self.keepalive_secs = v;
        }
        if let Some(v) = overrides.client_queue {
            self.client_queue = v;
        }
        if let Some(v) = overrides.worker_linger_ms {
            self.worker_linger_ms = v;
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.keepalive_secs == 0 {
            return Err(ConfigError::Invalid(
                "keepalive_secs must be at least 1".into(),
            ));
        }
        for (key, value) in [
            ("stall_timeout_secs", self.stall_timeout_secs),
            ("head_timeout_secs", self.head_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
            }
        }
        if self.ring_size == 0 {
            return Err(ConfigError::Invalid("ring_size must be at least 1".into()));
        }
        if self.snapshot_max_scans == 0 {
            return Err(ConfigError::Invalid(
                "snapshot_max_scans must be at least 1".into(),
            ));
        }
        self.limits.validate()?;
        // `[auth]` and `trusted_proxies` are checked where they are built (`App::new`,
        // `streamgate check-config`), so configuration does not depend on authentication.
        self.cors.check().map_err(ConfigError::Invalid)?;
        for (index, stream) in self.streams.iter().enumerate() {
            let (_, definition) = stream
                .split()
                .map_err(|e| ConfigError::Invalid(format!("streams[{index}].{e}")))?;
            definition
                .compile()
                .map_err(|e| ConfigError::Invalid(format!("streams[{index}].{e}")))?;
        }
        Ok(())
    }

    /// Keep-alive period.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs)
    }

    /// Worker linger.
    pub fn worker_linger(&self) -> Duration {
        Duration::from_millis(self.worker_linger_ms)
    }

    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Write deadline of every client socket.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.stall_timeout_secs)
    }

    /// Time allowed for a complete request head.
    pub fn head_timeout(&self) -> Duration {
        Duration::from_secs(self.head_timeout_secs)
    }

    /// Idle time allowed on a kept-alive connection.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_mongo_uri() -> String {
    DEFAULT_MONGO_URI.to_owned()
}
fn default_keepalive_secs() -> u64 {
    15
}
fn default_client_queue() -> usize {
    4096
}
fn default_ring_size() -> usize {
    10_000
}
fn default_worker_linger_ms() -> u64 {
    5_000
}
fn default_shutdown_grace_secs() -> u64 {
    10
}
fn default_sse_retry_ms() -> u64 {
    2_000
}
fn default_stall_timeout_secs() -> u64 {
    30
}
fn default_head_timeout_secs() -> u64 {
    30
}
fn default_idle_timeout_secs() -> u64 {
    10
}
fn default_snapshot_max_docs() -> usize {
    10_000
}
fn default_snapshot_max_scans() -> usize {
    8
}
fn default_admin_db() -> String {
    "streamgate".to_owned()
}
fn default_admin_coll() -> String {
    "streams".to_owned()
}
fn default_admin_body_limit() -> usize {
    64 * 1024
}
fn default_cookie_name() -> String {
    "streamgate_token".to_owned()
}
fn default_rules_collection() -> String {
    "rules".to_owned()
}
fn default_jwks_refresh_secs() -> u64 {
    300
}
fn default_jwks_min_refresh_secs() -> u64 {
    10
}
fn default_admin_role() -> String {
    "admin".to_owned()
}
fn default_roles_claim() -> String {
    "roles".to_owned()
}
fn default_retry_after_secs() -> u64 {
    5
}
fn default_max_workers() -> usize {
    1_000
}
fn default_max_streams_per_connection() -> usize {
    100
}

fn default_max_bindings_per_stream() -> usize {
    100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_wildcard_with_credentials_is_refused() {
        let cors = |origins: &[&str], credentials: bool| CorsConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_credentials: credentials,
        };
        assert!(cors(&["*"], true).check().is_err());
        assert!(cors(&["*"], false).check().is_ok());
        assert!(cors(&["https://a.example"], true).check().is_ok());
        assert!(cors(&["https://a.example/"], false).check().is_err());
        assert!(cors(&["a.example"], false).check().is_err());
    }

    #[test]
    fn log_format_is_text_or_json() {
        assert_eq!(Config::default().log_format, LogFormat::Text);
        let json = Config::from_toml_str("log_format = \"json\"", "<t>").unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
        let error = Config::from_toml_str("log_format = \"xml\"", "<t>").unwrap_err();
        assert!(error.to_string().contains("log_format"), "{error}");
    }

    #[test]
    fn defaults_are_local() {
        let config = Config::default();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.mongo_uri, DEFAULT_MONGO_URI);
        assert_eq!(config.keepalive_secs, 15);
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../examples/streamgate.toml");
        let config = Config::from_toml_str(text, "examples/streamgate.toml").unwrap();
        config.validate().unwrap();
        assert!(!config.streams.is_empty());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_toml_str("listen = \"127.0.0.1:1\"\nlisen = 3\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn bad_stream_is_named() {
        let text = "[[streams]]\ndb='a'\ncoll='b'\nname='c'\npipeline=[{ '$group' = {} }]\n";
        let err = Config::from_toml_str(text, "x")
            .unwrap()
            .with_overrides(Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("streams[0].pipeline[0].$group"), "{err}");
    }

    #[test]
    fn a_stream_table_is_a_definition_plus_its_key() {
        let text = "[[streams]]\ndb='a'\ncoll='b'\nname='c'\nstages=[{ '$match' = { x = 1 } }]\n\
                    fullDocument='required'\nmatch={ 'fullDocument.t' = { '$claim' = 't' } }\n";
        let config = Config::from_toml_str(text, "x").unwrap();
        let (key, definition) = config.streams[0].split().unwrap();
        assert_eq!(key.to_string(), "/a/b/_streams/c");
        let expected: StreamDefinition = serde_json::from_value(serde_json::json!({
            "pipeline": [{"$match": {"x": 1}}],
            "fullDocument": "required",
            "match": {"fullDocument.t": {"$claim": "t"}},
        }))
        .unwrap();
        assert_eq!(definition, expected);
        let text = "[[streams]]\ndb='a'\ncoll='b'\nname='c'\n\n[[streams]]\ndb='a'\ncoll='b'\nname='d'\npipelin=[]\n";
        let err = Config::from_toml_str(text, "x").unwrap_err().to_string();
        assert!(err.contains("unknown field `pipelin`"), "{err}");
        assert!(err.contains("line 6"), "{err}");
    }

    #[test]
    fn upstream_limits_default_bounded_and_are_validated() {
        let limits = Config::default().limits;
        assert_eq!(
            (limits.max_workers, limits.max_bindings_per_stream),
            (1000, 100)
        );
        for (text, words) in [
            ("[limits]\nmax_workers = 0\n", "max_workers must be 1 to"),
            (
                "[limits]\nmax_workers = 100000\n",
                "max_workers must be 1 to",
            ),
            (
                "[limits]\nmax_bindings_per_stream = 0\n",
                "max_bindings_per_stream",
            ),
        ] {
            let err = Config::from_toml_str(text, "x")
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(words), "{text}: {err}");
        }
        let config = Config::from_toml_str(
            "[limits]\nmax_workers = 5\nmax_bindings_per_stream = 2\n",
            "x",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.limits.max_workers, 5);
    }

    #[test]
    fn overrides_win() {
        let config = Config::from_toml_str("keepalive_secs = 3", "x")
            .unwrap()
            .with_overrides(Overrides {
                keepalive_secs: Some(7),
                mongo_uri: Some("mongodb://h/?replicaSet=x".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(config.keepalive_secs, 7);
        assert_eq!(config.mongo_uri, "mongodb://h/?replicaSet=x");
    }
}
