//! Configuration: defaults, then a TOML file, then `STREAMGATE_*` environment variables, then
//! CLI flags; each layer wins over the one before it.
//!
//! Every setting is declared once, in a [`settings!`] block below: its name, type, default and
//! documentation. That one declaration yields the serde struct (unknown keys are errors that
//! name the key and line), the struct's `Default`, and a [`Key`] that gives the setting its
//! environment variable (`STREAMGATE_<SECTION>_<KEY>`) and flag (`--<section>-<key>`). The
//! README's configuration table is generated from the same keys (a test keeps it in step).
//!
//! Parsing never binds a socket or connects to MongoDB, and the environment is passed in (a
//! lookup function, see [`Overrides::collect`]), so tests never touch the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::spec::{DefinitionError, StreamDefinition, StreamKey};

/// Default listen address: loopback only, so a local run never exposes data by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default MongoDB URI: the single-node replica set `scripts/mongo-local` starts.
pub const DEFAULT_MONGO_URI: &str = "mongodb://127.0.0.1:27017/?replicaSet=rs0";
/// Prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "STREAMGATE_";

/// Declares one table of the configuration: `keys` are the settings (each gets an environment
/// variable and a flag), `tables` the nested tables and arrays of tables (file only). Each field
/// is written once, with its doc comment, type and default; `|c| place` says where the table
/// sits in a [`Config`] `c` (so a key's setter can reach it).
macro_rules! settings {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident in $section:literal, |$c:ident| $place:expr;
        keys {
            $(
                $(#[doc = $doc:literal])*
                pub $key:ident: $ty:ty = $default:expr,
            )*
        }
        tables {
            $(
                $(#[doc = $tdoc:literal])*
                pub $table:ident: $tty:ty = $tdefault:expr,
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $key: $ty, )*
            $( $(#[doc = $tdoc])* pub $table: $tty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $key: $default, )* $( $table: $tdefault, )* }
            }
        }

        impl $name {
            /// The settings of this table, in declaration order.
            pub const KEYS: &'static [Key] = &[
                $(
                    Key {
                        section: $section,
                        name: stringify!($key),
                        doc: concat!($($doc, "\n",)* ""),
                        set: |$c, text| {
                            ($place).$key = <$ty as Scalar>::parse(text)?;
                            Ok(())
                        },
                        default: || Scalar::show(&$name::default().$key),
                        bare: <$ty as Scalar>::BARE,
                    },
                )*
            ];
        }
    };
}

settings! {
    /// The whole server configuration.
    pub struct Config in "", |c| c;
    keys {
        /// Address the HTTP server listens on.
        pub listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
        /// MongoDB connection string; must reach a replica set (change streams need one).
        pub mongo_uri: String = DEFAULT_MONGO_URI.to_owned(),
        /// Seconds between keep-alives (SSE comment, NDJSON empty line, WebSocket ping).
        pub keepalive_secs: u64 = 15,
        /// Deprecated and ignored: clients are no longer cut by how many events they are behind
        /// (a client that keeps reading is served from the ring and shared catch-ups; one whose
        /// socket stalls is closed after `stall_timeout_secs`). Still accepted so old configs load.
        pub client_queue: usize = 4096,
        /// Recent events each worker keeps in memory to serve resumes without a new cursor (and
        /// clients reading behind the live channel).
        pub ring_size: usize = 10_000,
        /// Milliseconds a worker keeps its cursor open after its last client leaves.
        pub worker_linger_ms: u64 = 5_000,
        /// Streams whose pipeline only filters (`$match` stages, or none) share one
        /// change-stream cursor per database, routed by collection. `false` gives every stream
        /// a cursor of its own (one `getMore` loop on MongoDB per stream).
        pub shared_database_cursors: bool = true,
        /// Streams that decide membership (documents entering and leaving a filter, PROTOCOL.md
        /// §10) turn on `changeStreamPreAndPostImages` on their collection (`collMod`, MongoDB
        /// 6.0+) when a worker starts and finds it off; a stream can ask for it alone with
        /// `"enablePreImages": true`. Needs the `collMod` action on the collection (the
        /// `dbAdmin` role on its database has it). Off: the worker logs the `collMod` to run and
        /// decides by post-images only.
        pub enable_pre_images: bool = false,
        /// Milliseconds a database feed may spend, when its cursor fails on a change, finding
        /// which stream's `$match` failed (one probe cursor per suspect group); the streams it
        /// finds move to cursors of their own and the others go on. Its other streams wait
        /// meanwhile. Nothing found in time: every stream of the feed ends with the error.
        pub feed_probe_timeout_ms: u64 = 5_000,
        /// Milliseconds a subscribe waits for a cursor to open: a new worker's (past it the
        /// client gets 503 and retries, e.g. while MongoDB is unreachable) or a catch-up's for a
        /// resume id (past it the stream starts and the client waits inside it; within it an id
        /// MongoDB refuses is a 400 before any byte of the response).
        pub cursor_open_wait_ms: u64 = 10_000,
        /// Changes a cursor re-reads one per batch to find a change over 16 MB on a MongoDB
        /// server that cannot split it (before 6.0.9): the other changes of the batch it failed
        /// are delivered, the large one alone becomes `event: skipped`. After this many (or an
        /// empty batch) the cursor goes back to full batches, isolating again if the large change
        /// is still ahead, so one that was large only for a moment cannot keep it at one change
        /// per round trip.
        pub oversize_isolation_changes: usize = 1_000,
        /// Seconds open streams get to close on SIGTERM/SIGINT before the process exits anyway.
        pub shutdown_grace_secs: u64 = 10,
        /// The `retry:` hint (ms) sent to SSE clients at the start and on shutdown.
        pub sse_retry_ms: u64 = 2_000,
        /// Seconds a client's socket may accept no bytes while the server has some to write to
        /// it (a stream falling behind, a response, a WebSocket frame); then it is closed. Any
        /// progress restarts the clock, so a slow but steady reader is never cut by it.
        pub stall_timeout_secs: u64 = 30,
        /// Seconds a connection may take to send a complete request head (from accept, or for a
        /// kept-alive connection from the end of the previous response); then it is closed.
        pub head_timeout_secs: u64 = 30,
        /// Seconds a kept-alive HTTP connection may move no bytes either way before it is closed
        /// (open streams write keep-alives, so they are not idle).
        pub idle_timeout_secs: u64 = 10,
        /// Most documents the document view's first `put` may hold (it is one event, built
        /// before the response starts); past it the request is refused with 413.
        pub snapshot_max_docs: usize = 10_000,
        /// Snapshot scans (`snapshot=true`, the document view) running at once on this server;
        /// a request that finds none free within a few seconds gets 503 with `Retry-After`.
        pub snapshot_max_scans: usize = 8,
        /// Most bytes of JSON the document view's first `put` may hold (it is one event, built
        /// in memory before the response starts); past it the request is refused with 413.
        pub snapshot_max_put_bytes: usize = 32 * 1024 * 1024,
        /// Bytes of snapshot events a connection may have queued ahead of its socket (all its
        /// streams together); its scans read on as the client drains them.
        pub snapshot_queue_bytes: usize = 8 * 1024 * 1024,
        /// Peers (CIDRs such as `10.0.0.0/8`, or single addresses) whose word on the client's
        /// address is taken: from them only, the PROXY protocol header (v1/v2) and
        /// `X-Forwarded-For` (rightmost untrusted hop) name the client for limits, logs and
        /// metrics. Empty: the TCP peer is the client, and both are ignored.
        pub trusted_proxies: Vec<String> = Vec::new(),
        /// `text` or `json`: one JSON object per line with stable field names (`timestamp`,
        /// `level`, `target`, `message`, then the event's own fields). `--log-json`
        /// (`STREAMGATE_LOG_JSON`) forces `json`.
        pub log_format: LogFormat = LogFormat::Text,
        /// A second address serving `GET /metrics` only (e.g. `10.0.0.5:9090` on a network only
        /// Prometheus reaches); the main address then answers `/metrics` with 404. Unset:
        /// `/metrics` is served on `listen`.
        pub metrics_listen: Option<SocketAddr> = None,
        /// Host names (no port) accepted besides loopback names when auth is off and the server
        /// listens on a loopback address; `*` accepts any. Requests for any other `Host` get 421
        /// (a web page cannot reach the server through DNS rebinding). Needed only behind a
        /// reverse proxy on the same machine that forwards its own `Host`.
        pub allowed_hosts: Vec<String> = Vec::new(),
    }
    tables {
        /// Where the admin API stores stream definitions.
        pub admin: AdminConfig = AdminConfig::default(),
        /// Authentication and permissions (off by default; see `docs/security.md`).
        pub auth: AuthConfig = AuthConfig::default(),
        /// Connection limits (unlimited by default).
        pub limits: LimitsConfig = LimitsConfig::default(),
        /// Cross-origin access for browsers (same-origin only by default).
        pub cors: CorsConfig = CorsConfig::default(),
        /// Static stream definitions (read-only in the admin API).
        pub streams: Vec<StreamConfig> = Vec::new(),
        /// The relay tier on NATS JetStream (off unless `nats_url` is set; see `docs/relay.md`).
        pub relay: RelayConfig = RelayConfig::default(),
    }
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

settings! {
    /// `[auth]`: who may subscribe to which stream and who may use `/_admin`.
    pub struct AuthConfig in "auth", |c| c.auth;
    keys {
        /// Require a valid credential on subscribe and admin requests. Off by default so a local
        /// run needs no setup; Streamgate warns loudly when it listens beyond loopback without it.
        pub enabled: bool = false,
        /// Cookie that may carry the token (after `Authorization: Bearer` and `?access_token=`).
        pub cookie_name: String = "streamgate_token".to_owned(),
        /// Role required for every `/_admin` request.
        pub admin_role: String = "admin".to_owned(),
        /// Collection (in `admin.database`) holding the permission rules managed through
        /// `/_admin/rules`, shared by every instance; they add to `[[auth.rules]]`.
        pub rules_collection: String = "rules".to_owned(),
        /// Role required for `GET /metrics` when auth is on (a Prometheus scrape then sends a
        /// token or API key holding it). Unset: `/metrics` needs no credential (it names every
        /// running stream: serve it on `metrics_listen` or set this when that matters).
        pub metrics_role: Option<String> = None,
    }
    tables {
        /// JWT bearer tokens (`[auth.jwt]`); absent: JWTs are not accepted.
        pub jwt: Option<JwtConfig> = None,
        /// Static API keys for services, stored as SHA-256 hashes (`[[auth.api_keys]]`).
        pub api_keys: Vec<ApiKeyConfig> = Vec::new(),
        /// Subscribe permissions; a stream no rule grants is refused with 403. These are static;
        /// rules managed through `/_admin/rules` are stored in MongoDB and add to them.
        pub rules: Vec<RuleConfig> = Vec::new(),
    }
}

settings! {
    /// `[auth.jwt]`: how bearer JWTs are verified. Exactly one key source must be given:
    /// `hs256_secret`, `public_key_pem_file`, `jwks_file` or `jwks_url`. Setting any of its keys
    /// from the environment or a flag creates the table.
    pub struct JwtConfig in "auth.jwt", |c| c.auth.jwt.get_or_insert_with(JwtConfig::default);
    keys {
        /// Shared secret for HS256/384/512 tokens (rather in the file or the environment than
        /// as a flag, which `ps` shows).
        pub hs256_secret: Option<String> = None,
        /// PEM file holding an RSA or EC public key (RS*/PS*/ES* tokens).
        pub public_key_pem_file: Option<PathBuf> = None,
        /// JWKS file (`{"keys":[…]}`); the token's `kid` picks the key.
        pub jwks_file: Option<PathBuf> = None,
        /// JWKS URL of an identity provider (`https://…/.well-known/jwks.json`; `http://` only
        /// for a loopback host). Fetched at startup (readiness waits for it), refreshed when its
        /// HTTP cache lifetime ends and, rate-limited, when a token names an unknown `kid`; a
        /// failed fetch keeps the last good set.
        pub jwks_url: Option<String> = None,
        /// Accepted `alg` values (e.g. `["RS256"]`); empty: every algorithm of the key's family.
        /// Algorithms of another family than the key are refused at startup.
        pub algorithms: Vec<String> = Vec::new(),
        /// Seconds a fetched JWKS is kept when the response has no `Cache-Control: max-age` or
        /// `Expires`.
        pub jwks_refresh_secs: u64 = 300,
        /// Least seconds between two fetches of `jwks_url` caused by unknown `kid`s (so forged
        /// `kid`s cannot make us hammer the provider); also the shortest cache lifetime honoured
        /// and the first retry delay after a failed fetch.
        pub jwks_min_refresh_secs: u64 = 10,
        /// Required `iss`, if set.
        pub issuer: Option<String> = None,
        /// Required `aud` (the token's `aud` must contain it), if set.
        pub audience: Option<String> = None,
        /// Claim holding the roles: an array of strings or a space-separated string; dots walk
        /// into objects (`realm_access.roles`).
        pub roles_claim: String = "roles".to_owned(),
        /// Clock-skew allowance in seconds for `exp` and `nbf`; a live stream is then cut at
        /// `exp + leeway_secs`.
        pub leeway_secs: u64 = 0,
    }
    tables {}
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

settings! {
    /// `[limits]`: open streams allowed (absent: unlimited; over a limit a request gets 429 with
    /// `Retry-After`; a slot is held for the whole life of a stream), and upstream work allowed
    /// (MongoDB change-stream cursors, always bounded; over a limit a subscribe gets 503 with
    /// `Retry-After`).
    pub struct LimitsConfig in "limits", |c| c.limits;
    keys {
        /// Open streams in total (unset: unlimited).
        pub max_connections: Option<usize> = None,
        /// Open streams per stream definition, all variable values together (unset: unlimited).
        pub per_stream: Option<usize> = None,
        /// Open streams per authenticated principal: its `sub` or API key `name`, for a token
        /// without `sub` a hash of its lasting claims (docs/security.md); not applied when auth
        /// is off (unset: unlimited).
        pub per_user: Option<usize> = None,
        /// Open streams per client IP address (unset: unlimited); a snapshot in progress
        /// counts as one more (so does it against `per_user`).
        pub per_ip: Option<usize> = None,
        /// The `Retry-After` value sent with 429 and with an upstream 503, in seconds.
        pub retry_after_secs: u64 = 5,
        /// MongoDB change-stream cursors open at once, catch-up cursors included. Each one holds
        /// a pooled connection during its `getMore` (up to `max_await`), so the driver's pool is
        /// sized from this. Default 1000: ten times the 100 definitions a large deployment runs,
        /// well under a mongod's usual connection ceiling (its open-files limit, often 64k,
        /// shared by every instance), and about 1 GB of mongod memory (~1 MB per connection) per
        /// instance.
        pub max_workers: usize = 1_000,
        /// Distinct cursors one stream definition may hold: one per binding of `$var` values
        /// that cannot be routed in-process. Clients choose `avars`, so without a bound one
        /// client could open cursors at will. Default 100: room for many bindings while no
        /// single stream can take more than a tenth of the default `max_workers`.
        pub max_bindings_per_stream: usize = 100,
        /// Streams one `GET /_streams` connection may carry (query list plus WebSocket
        /// `subscribe`s). Each stream also takes its own slot of the limits above.
        pub max_streams_per_connection: usize = 100,
        /// New bindings (cursors for `$var` values that cannot be routed in-process) one
        /// principal may start per minute: the user when authenticated, else the client
        /// address. Joining a running binding is not counted. Past it such a subscribe gets 429
        /// with `Retry-After`. Default 60; 0: unbounded.
        pub new_bindings_per_minute: usize = 60,
        /// New bindings one principal may start at once, before `new_bindings_per_minute`
        /// paces it (the size of its token bucket). Each is a cursor on MongoDB that lingers
        /// `worker_linger_ms` after its client leaves: a burst of 60 was 60 cursors opened in
        /// one second and held together, a noticeable load for everyone else. Default 10.
        pub new_bindings_burst: usize = 10,
        /// Bindings a principal started that may linger (no client left, kept
        /// `worker_linger_ms` for a reconnect) at once: its next new binding first closes its
        /// longest-idle one past this. A churning client then holds this many idle cursors on
        /// MongoDB, not one per binding of the last `worker_linger_ms`; a client reconnecting
        /// to a closed one resumes exactly, through a catch-up. Default 2; 0: unbounded.
        pub idle_bindings_per_principal: usize = 2,
    }
    tables {}
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

settings! {
    /// `[cors]`: which other origins browsers may use Streamgate from (HTTP via CORS headers,
    /// WebSocket via an `Origin` check).
    pub struct CorsConfig in "cors", |c| c.cors;
    keys {
        /// Exact origins (`https://app.example.com`); `*` allows any origin, but only without
        /// credentials. Empty: same-origin only.
        pub allowed_origins: Vec<String> = Vec::new(),
        /// Let browsers send cookies (`Access-Control-Allow-Credentials: true`).
        pub allow_credentials: bool = false,
    }
    tables {}
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

settings! {
    /// `[relay]`: one MongoDB cursor per stream for a whole fleet of instances, through NATS
    /// JetStream (`docs/relay.md`). Without `nats_url` every instance reads its own cursors.
    pub struct RelayConfig in "relay", |c| c.relay;
    keys {
        /// NATS server URL(s), comma-separated for a cluster (`nats://nats:4222`). Set: relay
        /// mode; for each worker one instance of the fleet holds the cursor and publishes its
        /// changes to JetStream, and every instance serves its clients from there.
        pub nats_url: Option<String> = None,
        /// JetStream stream holding the relayed changes (created if missing).
        pub stream: String = "STREAMGATE".to_owned(),
        /// Subject prefix of the relayed changes: one subject per worker under it.
        pub subject_prefix: String = "streamgate.relay".to_owned(),
        /// JetStream key-value bucket holding the cursor leases (created if missing).
        pub lease_bucket: String = "streamgate_leases".to_owned(),
        /// Milliseconds a cursor lease lives without renewal (renewed every third of it): how
        /// long the streams of an owner that stopped renewing but still heartbeats wait before
        /// another instance takes the cursor over (a killed owner's move once its heartbeat
        /// expires, `instance_ttl_ms`).
        pub lease_ttl_ms: u64 = 1_200,
        /// Milliseconds between the positions an owner publishes while its cursor is quiet
        /// (the point a new owner resumes from, and the relay's lag clock).
        pub mark_interval_ms: u64 = 1_000,
        /// Seconds JetStream keeps relayed changes.
        pub retention_secs: u64 = 3_600,
        /// Most bytes the JetStream stream keeps (oldest changes go first).
        pub max_bytes: u64 = 1024 * 1024 * 1024,
        /// Replicas of the stream and the key-value buckets (a 3-node NATS cluster: 3).
        pub replicas: usize = 1,
        /// JetStream key-value bucket of the instances' heartbeats, each listing the workers
        /// the instance has (created if missing): who is live and who could read each cursor.
        pub instance_bucket: String = "streamgate_instances".to_owned(),
        /// JetStream key-value bucket where each instance lists the streams it has that share
        /// their database's cursor (created if missing): the members of the fleet's database
        /// feeds.
        pub feed_bucket: String = "streamgate_feeds".to_owned(),
        /// Milliseconds between an instance's heartbeats (and its reads of the others'): how
        /// soon ownership moves when an instance joins or leaves.
        pub heartbeat_ms: u64 = 300,
        /// Milliseconds an instance counts as live after its last heartbeat (at least twice
        /// `heartbeat_ms`; keep it at most `lease_ttl_ms`, so that a killed instance is out of
        /// the others' view by the time its leases expire).
        pub instance_ttl_ms: u64 = 900,
        /// Milliseconds a cursor lease may stay free before an instance that is not the one
        /// chosen for it takes it anyway (the chosen one cannot, or the views differ).
        pub takeover_grace_ms: u64 = 900,
    }
    tables {}
}

/// Shortest `relay.lease_ttl_ms`: JetStream expires nothing younger than 100 ms, and renewals
/// every third of the lease must fit round trips to NATS.
pub const MIN_LEASE_TTL_MS: u64 = 300;

/// Shortest `relay.heartbeat_ms`: each heartbeat is a write and a read of the bucket.
pub const MIN_HEARTBEAT_MS: u64 = 20;

/// Shortest `relay.instance_ttl_ms`: JetStream's shortest `max_age`.
pub const MIN_INSTANCE_TTL_MS: u64 = 100;

impl RelayConfig {
    /// Checks `[relay]` (no I/O).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lease_ttl_ms < MIN_LEASE_TTL_MS {
            return Err(ConfigError::Invalid(format!(
                "relay.lease_ttl_ms must be at least {MIN_LEASE_TTL_MS} (got {})",
                self.lease_ttl_ms
            )));
        }
        let subject_ok = !self.subject_prefix.is_empty()
            && self
                .subject_prefix
                .split('.')
                .all(|token| !token.is_empty() && !token.contains(['*', '>', ' ', '\t']));
        if !subject_ok {
            return Err(ConfigError::Invalid(format!(
                "relay.subject_prefix {:?} is not a NATS subject (dot-separated tokens, no \
                 wildcards or spaces)",
                self.subject_prefix
            )));
        }
        for (key, value) in [
            ("relay.mark_interval_ms", self.mark_interval_ms),
            ("relay.retention_secs", self.retention_secs),
            ("relay.max_bytes", self.max_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
            }
        }
        if self.heartbeat_ms < MIN_HEARTBEAT_MS {
            return Err(ConfigError::Invalid(format!(
                "relay.heartbeat_ms must be at least {MIN_HEARTBEAT_MS} (got {})",
                self.heartbeat_ms
            )));
        }
        if self.instance_ttl_ms < (2 * self.heartbeat_ms).max(MIN_INSTANCE_TTL_MS) {
            return Err(ConfigError::Invalid(format!(
                "relay.instance_ttl_ms must be at least twice relay.heartbeat_ms and at least \
                 {MIN_INSTANCE_TTL_MS} (got {} with heartbeat_ms = {})",
                self.instance_ttl_ms, self.heartbeat_ms
            )));
        }
        if self.takeover_grace_ms == 0 {
            return Err(ConfigError::Invalid(
                "relay.takeover_grace_ms must be at least 1".into(),
            ));
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(ConfigError::Invalid(
                "relay.replicas must be 1 to 5 (JetStream's limit)".into(),
            ));
        }
        Ok(())
    }

    /// Lease lifetime.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// Interval of an instance's heartbeats.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// How long an instance counts as live after its last heartbeat.
    pub fn instance_ttl(&self) -> Duration {
        Duration::from_millis(self.instance_ttl_ms)
    }

    /// How long a lease may stay free before any instance that wants it takes it.
    pub fn takeover_grace(&self) -> Duration {
        Duration::from_millis(self.takeover_grace_ms)
    }
}

settings! {
    /// `[admin]`: where the admin API stores dynamic stream definitions.
    pub struct AdminConfig in "admin", |c| c.admin;
    keys {
        /// Database holding the definitions collection (and the rules collection).
        pub database: String = "streamgate".to_owned(),
        /// Collection holding one document per stream definition.
        pub collection: String = "streams".to_owned(),
        /// Largest accepted admin request body, in bytes.
        pub body_limit: usize = 64 * 1024,
    }
    tables {}
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

/// One setting: where it sits in the file, and (derived from that) its environment variable
/// and flag. Declared by [`settings!`]; [`keys`] lists them all.
#[derive(Debug)]
pub struct Key {
    /// Dotted table it sits in: `""` (top level), `"limits"`, `"auth.jwt"`.
    pub section: &'static str,
    /// Its name in that table.
    pub name: &'static str,
    /// Its documentation (the field's doc comment, one line per source line).
    pub doc: &'static str,
    /// Parses a value from the environment or a flag into its place in a config.
    set: fn(&mut Config, &str) -> Result<(), String>,
    /// Its default, as it is written in the environment (empty: unset).
    default: fn() -> String,
    /// The value of its flag given without one (`--auth-enabled` is `--auth-enabled=true`).
    bare: Option<&'static str>,
}

impl Key {
    /// The dotted path: `listen`, `limits.max_workers`.
    pub fn path(&self) -> String {
        if self.section.is_empty() {
            self.name.to_owned()
        } else {
            format!("{}.{}", self.section, self.name)
        }
    }

    /// `STREAMGATE_` and the path in capitals, dots as underscores: `STREAMGATE_LIMITS_MAX_WORKERS`.
    pub fn env(&self) -> String {
        format!(
            "{ENV_PREFIX}{}",
            self.path().replace('.', "_").to_uppercase()
        )
    }

    /// The long flag without its dashes: the path with dots and underscores as dashes
    /// (`limits-max-workers`).
    pub fn flag(&self) -> String {
        self.path().replace(['.', '_'], "-")
    }

    /// The default, as it would be written in the environment (empty: unset).
    pub fn default_value(&self) -> String {
        (self.default)()
    }

    /// The doc comment as one line.
    pub fn summary(&self) -> String {
        self.doc.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Every setting, table by table in file order.
pub fn keys() -> impl Iterator<Item = &'static Key> {
    [
        Config::KEYS,
        AdminConfig::KEYS,
        AuthConfig::KEYS,
        JwtConfig::KEYS,
        LimitsConfig::KEYS,
        CorsConfig::KEYS,
        RelayConfig::KEYS,
    ]
    .into_iter()
    .flatten()
}

/// A setting's value as the environment and flags write it: parsed from text, shown as text.
trait Scalar: Sized {
    /// The value a flag given bare stands for; `None`: the flag needs a value.
    const BARE: Option<&'static str> = None;
    /// Reads the value; the error says what was expected.
    fn parse(text: &str) -> Result<Self, String>;
    /// Writes the value (empty: unset).
    fn show(&self) -> String;
}

/// [`Scalar`] through `FromStr`/`Display`, with what a value must look like.
macro_rules! scalar_from_str {
    ($($ty:ty => $expected:literal),* $(,)?) => {$(
        impl Scalar for $ty {
            fn parse(text: &str) -> Result<Self, String> {
                text.trim()
                    .parse()
                    .map_err(|_| format!("expected {}, got {text:?}", $expected))
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

scalar_from_str! {
    u64 => "a whole number",
    usize => "a whole number",
    SocketAddr => "an address like 127.0.0.1:8080",
}

/// A switch: `--auth-enabled` alone turns it on (`--auth-enabled=false` turns it off).
impl Scalar for bool {
    const BARE: Option<&'static str> = Some("true");
    fn parse(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("expected true or false, got {text:?}"))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Scalar for String {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(text.to_owned())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl Scalar for PathBuf {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(PathBuf::from(text))
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

/// A list is written comma-separated (`10.0.0.0/8,192.168.0.1`); spaces around items are
/// dropped.
impl Scalar for Vec<String> {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect())
    }
    fn show(&self) -> String {
        self.join(",")
    }
}

/// An optional setting given any value is set.
impl<T: Scalar> Scalar for Option<T> {
    fn parse(text: &str) -> Result<Self, String> {
        T::parse(text).map(Some)
    }
    fn show(&self) -> String {
        self.as_ref().map_or_else(String::new, T::show)
    }
}

impl Scalar for LogFormat {
    fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("expected text or json, got {text:?}")),
        }
    }
    fn show(&self) -> String {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .to_owned()
    }
}

/// Where an override came from; a flag wins over the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `STREAMGATE_*` environment variable.
    Env,
    /// A command-line flag.
    Flag,
}

/// Values from the environment and the command line, in the order they apply (environment
/// first, so a flag wins).
#[derive(Debug, Default)]
pub struct Overrides {
    values: Vec<(&'static Key, Source, String)>,
}

impl Overrides {
    /// Where each overridden setting comes from (`limits.max_workers from
    /// STREAMGATE_LIMITS_MAX_WORKERS`), in the order they apply.
    pub fn describe(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(key, source, _)| {
                let from = match source {
                    Source::Env => key.env(),
                    Source::Flag => format!("--{}", key.flag()),
                };
                format!("{} from {from}", key.path())
            })
            .collect()
    }

    /// Every key's environment variable (through `env`, so tests need not touch the process
    /// environment; an empty value counts as unset), then every flag given in `flags` (matches
    /// of a command that has [`flags`]'s arguments).
    pub fn collect(env: impl Fn(&str) -> Option<String>, flags: &clap::ArgMatches) -> Overrides {
        let mut values = Vec::new();
        for key in keys() {
            if let Some(value) = env(&key.env()).filter(|value| !value.is_empty()) {
                values.push((key, Source::Env, value));
            }
        }
        for key in keys() {
            if let Ok(Some(value)) = flags.try_get_one::<String>(&key.path()) {
                values.push((key, Source::Flag, value.clone()));
            }
        }
        Overrides { values }
    }
}

/// One optional `--<section>-<key> VALUE` argument per setting, for the binary's CLI (without
/// clap's `env`: [`Overrides::collect`] reads the environment itself). Help is grouped by table.
pub fn flags() -> Vec<clap::Arg> {
    keys()
        .map(|key| {
            let heading = if key.section.is_empty() {
                "Settings (override the file)".to_owned()
            } else {
                format!("Settings [{}]", key.section)
            };
            let default = key.default_value();
            let default = if default.is_empty() {
                "unset".to_owned()
            } else {
                default
            };
            let summary = key.summary();
            // `-h` shows the first sentence, `--help` the whole doc comment.
            let first = summary.split_inclusive(". ").next().unwrap_or(&summary);
            let env = key.env();
            let arg = clap::Arg::new(key.path())
                .long(key.flag())
                .value_name("VALUE")
                .help_heading(heading)
                .help(format!("{} [env: {env}]", first.trim_end()))
                .long_help(format!("{summary}\n[env: {env}] [default: {default}]"));
            match key.bare {
                // `=` required, so a switch never swallows the subcommand after it.
                Some(bare) => arg
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value(bare),
                None => arg,
            }
        })
        .collect()
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
    /// An environment variable or flag has a value its setting cannot take.
    #[error("invalid {origin} (setting {key}): {message}")]
    Override {
        /// `STREAMGATE_…` or `--…`.
        origin: String,
        /// The setting's dotted path.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid config: {0}")]
    Invalid(String),
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

    /// Applies environment/CLI overrides (a flag after the environment, so it wins), then
    /// checks the result.
    pub fn with_overrides(mut self, overrides: Overrides) -> Result<Config, ConfigError> {
        for (key, source, value) in overrides.values {
            (key.set)(&mut self, &value).map_err(|message| ConfigError::Override {
                origin: match source {
                    Source::Env => key.env(),
                    Source::Flag => format!("--{}", key.flag()),
                },
                key: key.path(),
                message,
            })?;
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
        for (key, value) in [
            ("snapshot_max_put_bytes", self.snapshot_max_put_bytes),
            ("snapshot_queue_bytes", self.snapshot_queue_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
            }
        }
        self.limits.validate()?;
        self.relay.validate()?;
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

    /// How long a subscribe waits for a cursor to open.
    pub fn cursor_open_wait(&self) -> Duration {
        Duration::from_millis(self.cursor_open_wait_ms)
    }

    /// How long a database feed may look for the stream whose `$match` failed.
    pub fn feed_probe_timeout(&self) -> Duration {
        Duration::from_millis(self.feed_probe_timeout_ms)
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Defaults, then `file`, then the environment `env`, then the command line `args`.
    fn load(file: &str, env: &[(&str, &str)], args: &[&str]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let matches = clap::Command::new("streamgate")
            .args(flags())
            .try_get_matches_from(std::iter::once("streamgate").chain(args.iter().copied()))
            .unwrap();
        let overrides = Overrides::collect(|name| env.get(name).cloned(), &matches);
        Config::from_toml_str(file, "x.toml")?.with_overrides(overrides)
    }

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
        let json = load("", &[("STREAMGATE_LOG_FORMAT", "json")], &[]).unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
    }

    #[test]
    fn defaults_are_local() {
        let config = Config::default();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.mongo_uri, DEFAULT_MONGO_URI);
        assert_eq!(config.keepalive_secs, 15);
        // An empty file is the defaults.
        let empty = Config::from_toml_str("", "x").unwrap();
        assert_eq!(format!("{empty:?}"), format!("{config:?}"));
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
        for (text, unknown, line) in [
            ("listen = \"127.0.0.1:1\"\nlisen = 3\n", "lisen", "line 2"),
            (
                "[limits]\nmax_workers = 5\nmax_wrkers = 3\n",
                "max_wrkers",
                "line 3",
            ),
            (
                "[auth.jwt]\nhs256_secret = \"s\"\n\nissuerr = \"i\"\n",
                "issuerr",
                "line 4",
            ),
        ] {
            let err = Config::from_toml_str(text, "x.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(unknown), "{err}");
            assert!(err.contains(line), "{err}");
        }
    }

    #[test]
    fn bad_stream_is_named() {
        let text = "[[streams]]\ndb='a'\ncoll='b'\nname='c'\npipeline=[{ '$group' = {} }]\n";
        let err = load(text, &[], &[]).unwrap_err().to_string();
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
    fn the_file_sets_keys_of_every_table() {
        let config = load(
            "ring_size = 7\n[limits]\nper_ip = 3\n[auth.jwt]\nleeway_secs = 2\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(config.ring_size, 7);
        assert_eq!(config.limits.per_ip, Some(3));
        assert_eq!(config.auth.jwt.map(|jwt| jwt.leeway_secs), Some(2));
    }

    #[test]
    fn the_environment_sets_keys_of_every_table() {
        let config = load(
            "",
            &[
                ("STREAMGATE_RING_SIZE", "7"),
                ("STREAMGATE_SHUTDOWN_GRACE_SECS", "3"),
                ("STREAMGATE_SSE_RETRY_MS", "500"),
                ("STREAMGATE_LIMITS_PER_IP", "3"),
                ("STREAMGATE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.0.1"),
                ("STREAMGATE_AUTH_JWT_HS256_SECRET", "s3cret"),
                ("STREAMGATE_AUTH_ENABLED", "true"),
                // Empty counts as unset (a templated variable with no value).
                ("STREAMGATE_ADMIN_DATABASE", ""),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.ring_size, 7);
        assert_eq!(config.shutdown_grace_secs, 3);
        assert_eq!(config.sse_retry_ms, 500);
        assert_eq!(config.limits.per_ip, Some(3));
        assert_eq!(config.trusted_proxies, ["10.0.0.0/8", "192.168.0.1"]);
        assert!(config.auth.enabled);
        // Setting a key of `[auth.jwt]` creates the table with its other defaults.
        let jwt = config.auth.jwt.unwrap();
        assert_eq!(jwt.hs256_secret.as_deref(), Some("s3cret"));
        assert_eq!(jwt.jwks_refresh_secs, 300);
        assert_eq!(config.admin.database, "streamgate");
    }

    #[test]
    fn flags_set_keys_of_every_table() {
        let config = load(
            "",
            &[],
            &[
                "--ring-size",
                "7",
                "--limits-per-ip=3",
                "--admin-body-limit",
                "100",
                "--auth-jwt-audience",
                "api",
                "--cors-allowed-origins",
                "https://a.example",
            ],
        )
        .unwrap();
        assert_eq!(config.ring_size, 7);
        assert_eq!(config.limits.per_ip, Some(3));
        assert_eq!(config.admin.body_limit, 100);
        assert_eq!(config.auth.jwt.unwrap().audience.as_deref(), Some("api"));
        assert_eq!(config.cors.allowed_origins, ["https://a.example"]);
        // A switch alone is on, and `=false` turns off what the file turned on.
        let config = load(
            "[cors]\nallow_credentials = true\n",
            &[],
            &["--auth-enabled"],
        )
        .unwrap();
        assert!(config.auth.enabled);
        let config = load(
            "[cors]\nallow_credentials = true\n",
            &[],
            &["--cors-allow-credentials=false"],
        )
        .unwrap();
        assert!(!config.cors.allow_credentials);
    }

    #[test]
    fn a_flag_beats_the_environment_beats_the_file_beats_the_default() {
        let file = "keepalive_secs = 3\nring_size = 3\nsse_retry_ms = 3\n";
        let env = [
            ("STREAMGATE_KEEPALIVE_SECS", "2"),
            ("STREAMGATE_RING_SIZE", "2"),
        ];
        let config = load(file, &env, &["--keepalive-secs", "1"]).unwrap();
        assert_eq!(config.keepalive_secs, 1, "flag over env and file");
        assert_eq!(config.ring_size, 2, "env over file");
        assert_eq!(config.sse_retry_ms, 3, "file over default");
        assert_eq!(config.shutdown_grace_secs, 10, "default");
        let config = load("", &[], &["--mongo-uri", "mongodb://h/?replicaSet=x"]).unwrap();
        assert_eq!(config.mongo_uri, "mongodb://h/?replicaSet=x");
    }

    #[test]
    fn a_bad_value_names_its_variable_or_flag() {
        let err = load("", &[("STREAMGATE_LIMITS_MAX_WORKERS", "many")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("STREAMGATE_LIMITS_MAX_WORKERS"), "{err}");
        assert!(err.contains("limits.max_workers"), "{err}");
        assert!(err.contains("a whole number"), "{err}");
        let err = load("", &[], &["--listen", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--listen"), "{err}");
        // Overrides are validated like the file.
        let err = load("", &[("STREAMGATE_RING_SIZE", "0")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ring_size must be at least 1"), "{err}");
    }

    #[test]
    fn every_key_has_an_env_var_and_a_flag() {
        let keys: Vec<&Key> = keys().collect();
        assert!(keys.len() >= 40, "{} keys", keys.len());
        let mut envs = std::collections::HashSet::new();
        let mut flag_names = std::collections::HashSet::new();
        let command = clap::Command::new("streamgate").args(flags());
        for key in &keys {
            let env = key.env();
            assert!(env.starts_with(ENV_PREFIX), "{env}");
            assert!(envs.insert(env.clone()), "{env} twice");
            assert!(flag_names.insert(key.flag()), "--{} twice", key.flag());
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(key.flag().as_str()))
                .unwrap_or_else(|| panic!("no flag for {}", key.path()));
            assert!(arg.get_help().unwrap().to_string().contains(&env));
            assert!(!key.doc.trim().is_empty(), "{} has no doc", key.path());
            // Its default, written back through the variable and the flag, loads.
            let default = key.default_value();
            if !default.is_empty() {
                let flag = format!("--{}={default}", key.flag());
                let config = load("", &[(env.as_str(), default.as_str())], &[&flag]);
                assert!(config.is_ok(), "{}: {config:?}", key.path());
            }
        }
        // The names that existed before every key had one still work.
        for old in [
            "STREAMGATE_LISTEN",
            "STREAMGATE_MONGO_URI",
            "STREAMGATE_KEEPALIVE_SECS",
            "STREAMGATE_CLIENT_QUEUE",
            "STREAMGATE_WORKER_LINGER_MS",
        ] {
            assert!(envs.contains(old), "{old}");
            let flag = old[ENV_PREFIX.len()..].to_lowercase().replace('_', "-");
            assert!(flag_names.contains(&flag), "--{flag}");
        }
    }

    /// The README's table of settings, as [`keys`] declare them.
    fn settings_table() -> String {
        let mut table = String::from("| key | environment | flag | default | meaning |\n");
        table.push_str("|---|---|---|---|---|\n");
        for key in keys() {
            let default = key.default_value();
            let default = if default.is_empty() {
                "unset".to_owned()
            } else {
                format!("`{default}`")
            };
            table.push_str(&format!(
                "| `{}` | `{}` | `--{}` | {default} | {} |\n",
                key.path(),
                key.env(),
                key.flag(),
                key.summary().replace('|', "\\|")
            ));
        }
        table
    }

    /// The table between the README's markers is the one [`keys`] make. `BLESS=1 cargo test
    /// --lib readme_settings_table` rewrites it.
    #[test]
    fn readme_settings_table_matches_the_declarations() {
        const START: &str = "<!-- settings table: generated from src/config.rs -->\n";
        const END: &str = "<!-- end of settings table -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let start = readme
            .find(START)
            .expect("README lacks the table's start marker")
            + START.len();
        let end = start
            + readme[start..]
                .find(END)
                .expect("README lacks the end marker");
        let expected = settings_table();
        if readme[start..end] != expected {
            if std::env::var_os("BLESS").is_some() {
                let updated = format!("{}{expected}{}", &readme[..start], &readme[end..]);
                std::fs::write(path, updated).unwrap();
            } else {
                panic!(
                    "README.md's settings table differs from src/config.rs; rerun with BLESS=1 \
                     to rewrite it. Expected:\n{expected}"
                );
            }
        }
    }
}
