//! Connection limits: in total, per stream, per user and per client IP.
//!
//! A subscribe request takes a [`Permit`] before its subscription (and so before any worker)
//! starts; the permit travels inside the client's `Feed` and gives its slot back when dropped,
//! whichever way the stream ends (client gone, shutdown, terminal event, failed upgrade).
//! Over a limit the request is answered 429 with `Retry-After` at once: nothing waits.
//!
//! All counters sit behind one mutex so a permit is taken or refused atomically across the
//! four dimensions. It is held for a few map operations per connect/disconnect, which is
//! negligible next to the cost of a connection; only dimensions with a limit are counted, and
//! entries are removed at zero so the maps hold only live keys.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::http::StatusCode;

use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::streams::StreamKey;

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// `max_connections`.
    Total,
    /// `per_stream`.
    Stream,
    /// `per_user`.
    User,
    /// `per_ip`.
    Ip,
}

impl LimitExceeded {
    /// The config key of the limit.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitExceeded::Total => "max_connections",
            LimitExceeded::Stream => "per_stream",
            LimitExceeded::User => "per_user",
            LimitExceeded::Ip => "per_ip",
        }
    }
}

#[derive(Default)]
struct Counters {
    total: usize,
    per_stream: HashMap<StreamKey, usize>,
    per_user: HashMap<String, usize>,
    per_ip: HashMap<IpAddr, usize>,
}

/// The limits in force and the connections they count.
pub struct Limits {
    config: LimitsConfig,
    counters: Mutex<Counters>,
}

/// One open stream's slot; dropping it frees the slot.
#[must_use = "the slot is freed as soon as the permit is dropped"]
pub struct Permit {
    limits: Arc<Limits>,
    stream: Option<StreamKey>,
    user: Option<String>,
    ip: Option<IpAddr>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("stream", &self.stream)
            .field("user", &self.user)
            .field("ip", &self.ip)
            .finish()
    }
}

impl Limits {
    /// Limits from `[limits]`.
    pub fn new(config: LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits {
            config,
            counters: Mutex::new(Counters::default()),
        })
    }

    /// Open streams counted now (when `max_connections` is set; 0 otherwise).
    pub fn open(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // The counters stay consistent even if a holder panicked: every update is one step.
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for a stream of `stream` opened by `user` (if authenticated) from `ip`.
    pub fn try_acquire(
        self: &Arc<Self>,
        stream: &StreamKey,
        user: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<Permit, LimitExceeded> {
        let config = &self.config;
        let stream = config.per_stream.map(|_| stream.clone());
        let user = config
            .per_user
            .and(user)
            .filter(|u| !u.is_empty())
            .map(str::to_owned);
        let ip = config.per_ip.and(ip);

        let mut counters = self.lock();
        let full = |count: usize, limit: Option<usize>| limit.is_some_and(|l| count >= l);
        if full(counters.total, config.max_connections) {
            return Err(LimitExceeded::Total);
        }
        if let Some(key) = &stream
            && full(count(&counters.per_stream, key), config.per_stream)
        {
            return Err(LimitExceeded::Stream);
        }
        if let Some(key) = &user
            && full(count(&counters.per_user, key), config.per_user)
        {
            return Err(LimitExceeded::User);
        }
        if let Some(key) = &ip
            && full(count(&counters.per_ip, key), config.per_ip)
        {
            return Err(LimitExceeded::Ip);
        }
        counters.total += 1;
        if let Some(key) = &stream {
            *counters.per_stream.entry(key.clone()).or_default() += 1;
        }
        if let Some(key) = &user {
            *counters.per_user.entry(key.clone()).or_default() += 1;
        }
        if let Some(key) = ip {
            *counters.per_ip.entry(key).or_default() += 1;
        }
        drop(counters);
        Ok(Permit {
            limits: Arc::clone(self),
            stream,
            user,
            ip,
        })
    }

    /// The 429 for a refused connection, with `Retry-After`.
    pub fn refusal(&self, exceeded: LimitExceeded) -> ApiError {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too Many Requests",
            format!(
                "connection limit reached ({}); retry later",
                exceeded.as_str()
            ),
        )
        .with_extra(serde_json::json!({ "limit": exceeded.as_str() }));
        error.retry_after = Some(self.config.retry_after_secs);
        error
    }
}

fn count<K: Eq + Hash>(map: &HashMap<K, usize>, key: &K) -> usize {
    map.get(key).copied().unwrap_or(0)
}

fn release<K: Eq + Hash>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counters = self.limits.lock();
        counters.total = counters.total.saturating_sub(1);
        if let Some(key) = &self.stream {
            release(&mut counters.per_stream, key);
        }
        if let Some(key) = &self.user {
            release(&mut counters.per_user, key);
        }
        if let Some(key) = &self.ip {
            release(&mut counters.per_ip, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> StreamKey {
        StreamKey::new("db", "coll", name).unwrap()
    }

    #[test]
    fn each_limit_refuses_and_releases() {
        let limits = Limits::new(LimitsConfig {
            max_connections: Some(4),
            per_stream: Some(2),
            per_user: Some(3),
            per_ip: Some(2),
            retry_after_secs: 1,
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limits.try_acquire(&key("a"), Some("u"), Some(ip)).unwrap();
        let _a2 = limits.try_acquire(&key("a"), Some("u"), Some(ip)).unwrap();
        assert_eq!(
            limits.try_acquire(&key("a"), None, None).unwrap_err(),
            LimitExceeded::Stream
        );
        let _b1 = limits
            .try_acquire(&key("b"), Some("u"), Some(other))
            .unwrap();
        assert_eq!(
            limits
                .try_acquire(&key("b"), Some("u"), Some(other))
                .unwrap_err(),
            LimitExceeded::User
        );
        assert_eq!(
            limits
                .try_acquire(&key("c"), Some("v"), Some(ip))
                .unwrap_err(),
            LimitExceeded::Ip
        );
        let _c1 = limits
            .try_acquire(&key("c"), Some("v"), Some(other))
            .unwrap();
        assert_eq!(
            limits.try_acquire(&key("d"), None, None).unwrap_err(),
            LimitExceeded::Total
        );
        drop(a1);
        assert_eq!(limits.open(), 3);
        let _a3 = limits.try_acquire(&key("a"), Some("w"), Some(ip)).unwrap();
    }

    #[test]
    fn unlimited_counts_nothing_per_key() {
        let limits = Limits::new(LimitsConfig::default());
        let permits: Vec<_> = (0..100)
            .map(|_| limits.try_acquire(&key("a"), Some("u"), None).unwrap())
            .collect();
        assert_eq!(limits.open(), 100);
        drop(permits);
        assert_eq!(limits.open(), 0);
        assert!(limits.lock().per_stream.is_empty());
    }
}
