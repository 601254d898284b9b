//! Configuration: a TOML file, then `STREAMGATE_*` environment variables, then CLI flags.
//!
//! Parsing never binds a socket or connects to MongoDB. The environment and CLI layer is the
//! [`Overrides`] struct (filled by clap in `main.rs`), so tests build configs without touching
//! the process environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::streams::definition::{
    DefinitionError, FullDocument, FullDocumentBeforeChange, StreamDefinition, StreamKey,
};

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
    /// Events a client may fall behind its worker before it is cut with `slow_consumer`
    /// (lagging clients are served from the shared ring, so this costs no per-client memory;
    /// must not exceed `ring_size`).
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
    /// Where the admin API stores stream definitions.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Static stream definitions (read-only in the admin API).
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
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

/// One `[[streams]]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamConfig {
    /// Database watched.
    pub db: String,
    /// Collection watched.
    pub coll: String,
    /// Stream name.
    pub name: String,
    /// Change-stream stages (`stages` also accepted).
    #[serde(default, alias = "stages")]
    pub pipeline: Option<Value>,
    /// `fullDocument` option.
    #[serde(default)]
    pub full_document: FullDocument,
    /// `fullDocumentBeforeChange` option.
    #[serde(default)]
    pub full_document_before_change: FullDocumentBeforeChange,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Per-user filtering rules: `match = { "fullDocument.tenantId" = { "$claim" = "tenant" } }`.
    #[serde(default, rename = "match")]
    pub match_rules: Option<Value>,
}

impl StreamConfig {
    /// The key and definition this table declares.
    pub fn split(&self) -> Result<(StreamKey, StreamDefinition), DefinitionError> {
        let key = StreamKey::new(&self.db, &self.coll, &self.name)?;
        Ok((
            key,
            StreamDefinition {
                pipeline: self.pipeline.clone().unwrap_or(Value::Array(Vec::new())),
                full_document: self.full_document,
                full_document_before_change: self.full_document_before_change,
                description: self.description.clone(),
                match_rules: self.match_rules.clone(),
            },
        ))
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
        if self.client_queue < 2 {
            return Err(ConfigError::Invalid(
                "client_queue must be at least 2".into(),
            ));
        }
        if self.ring_size < self.client_queue {
            return Err(ConfigError::Invalid(format!(
                "ring_size ({}) must be at least client_queue ({}): lagging clients are served from the ring",
                self.ring_size, self.client_queue
            )));
        }
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
fn default_admin_db() -> String {
    "streamgate".to_owned()
}
fn default_admin_coll() -> String {
    "streams".to_owned()
}
fn default_admin_body_limit() -> usize {
    64 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

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
