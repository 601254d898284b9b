//! `auth.jwt.jwks_url`: an identity provider's signing keys, fetched and kept fresh.
//!
//! ```text
//! startup ──▶ refresher task: fetch ─ ok ─▶ swap the key set; sleep its HTTP cache lifetime
//!                                  └ error ─▶ keep the last good set; retry 1 s, 2 s … 60 s
//! token with an unknown kid ──▶ (single flight) fetch now, unless the last such fetch was
//!                               less than jwks_min_refresh_secs ago ──▶ look the kid up again
//! ```
//!
//! * Rotation needs no restart: a provider publishes its next key before signing with it, so a
//!   new `kid` is usually already in the set; if not, the unknown-`kid` fetch finds it at once.
//!   A key that left the set stops verifying at the next fetch.
//! * Forged `kid`s cannot make us hammer the provider: at most one unknown-`kid` fetch per
//!   `jwks_min_refresh_secs`, and concurrent ones share the one in flight (a mutex held across
//!   the fetch). The cost: a token with a genuinely new `kid` arriving within that window of a
//!   forged one is refused until the next fetch.
//! * A failed fetch (network, status, bad JSON, no usable key) keeps the last good set, is
//!   logged and counted (`jwks_fetches{result="error"}`). Before the first good fetch there is
//!   no set: tokens are answered 503 and `/health/ready` is not ready.
//! * TLS is rustls (ring) with the system's CA certificates; `http://` is accepted only for a
//!   loopback host (keys fetched in clear text over a network could be replaced).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderMap, Request, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{ConfigBuilderExt, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::Value;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AuthError;
use super::jwt::{Key, jwks_url_keys};
use crate::config::JwtConfig;
use crate::metrics::JwksFetchLabel;

/// Longest a fetch (connect, response, body) may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS body accepted (real ones are a few KiB).
const MAX_BODY: usize = 1024 * 1024;
/// Longest cache lifetime honoured, whatever the provider says.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// First retry after a failed scheduled fetch; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two attempts while the provider keeps failing.
const MAX_RETRY: Duration = Duration::from_secs(60);

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The key set of a JWKS URL: the last good fetch, refreshed in the background.
pub struct RemoteJwks {
    url: Uri,
    client: HttpClient,
    /// The last good set (`None` before the first). Replaced whole, read by cloning the `Arc`:
    /// a verification never holds the lock while it checks a signature.
    keys: RwLock<Option<Arc<Vec<Key>>>>,
    /// `true` once a first set is loaded.
    loaded: watch::Sender<bool>,
    /// Held across every fetch (one at a time, shared by whoever waits); holds when the last
    /// unknown-`kid` fetch started, for the rate limit.
    fetching: Mutex<Option<Instant>>,
    /// Lifetime when the response names none (`jwks_refresh_secs`).
    default_lifetime: Duration,
    /// `jwks_min_refresh_secs`: unknown-`kid` rate limit and shortest lifetime honoured.
    min_refresh: Duration,
    fetches: Family<JwksFetchLabel, Counter>,
}

/// Checks `jwks_url` without I/O: an absolute `https://` URL, or `http://` to a loopback host.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("auth.jwt.jwks_url {url:?}: {e}"))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(format!(
            "auth.jwt.jwks_url {url:?}: signing keys must be fetched over https:// \
             (http:// is accepted only for a loopback host)"
        )),
        _ => Err(format!(
            "auth.jwt.jwks_url {url:?}: expected an absolute https:// URL"
        )),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl RemoteJwks {
    /// Prepares the client (reading the system's CA certificates for an `https://` URL); no
    /// fetch yet.
    pub fn new(
        config: &JwtConfig,
        url: &str,
        fetches: Family<JwksFetchLabel, Counter>,
    ) -> Result<Arc<RemoteJwks>, String> {
        let uri = check_url(url)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("auth.jwt.jwks_url: TLS setup: {e}"))?;
        // Only an https:// URL needs the system's roots (a loopback http:// one, in tests or
        // behind a local sidecar, must not fail on a host without CA certificates).
        let tls = if uri.scheme_str() == Some("https") {
            builder.with_native_roots().map_err(|e| {
                format!(
                    "auth.jwt.jwks_url: cannot load the system's CA certificates ({e}); \
                     install the ca-certificates package"
                )
            })?
        } else {
            builder.with_root_certificates(rustls::RootCertStore::empty())
        }
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Arc::new(RemoteJwks {
            url: uri,
            client,
            keys: RwLock::new(None),
            loaded: watch::channel(false).0,
            fetching: Mutex::new(None),
            default_lifetime: Duration::from_secs(config.jwks_refresh_secs),
            min_refresh: Duration::from_secs(config.jwks_min_refresh_secs),
            fetches,
        }))
    }

    /// Whether a first set has been loaded.
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Waits until a first set is loaded, at most `timeout`; returns whether it was.
    pub async fn wait_loaded(&self, timeout: Duration) -> bool {
        let mut loaded = self.loaded.subscribe();
        matches!(
            tokio::time::timeout(timeout, loaded.wait_for(|l| *l)).await,
            Ok(Ok(_))
        )
    }

    /// Starts the task that fetches the set now and again when its lifetime ends.
    pub fn spawn_refresher(self: &Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken) {
        let jwks = Arc::clone(self);
        tracker.spawn(async move { jwks.refresh_loop(cancel).await });
    }

    async fn refresh_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut retry = FIRST_RETRY;
        loop {
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return,
                fetched = async {
                    let _turn = self.fetching.lock().await;
                    self.fetch("scheduled").await
                } => fetched,
            };
            let wait = match fetched {
                Ok(lifetime) => {
                    retry = FIRST_RETRY;
                    lifetime
                }
                Err(()) => {
                    let wait = retry;
                    retry = (retry * 2).min(MAX_RETRY);
                    wait
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn current(&self) -> Option<Arc<Vec<Key>>> {
        crate::sync::read(&self.keys).clone()
    }

    /// The set to verify a token naming `kid` with. An unknown `kid` triggers one fetch unless
    /// one did less than `jwks_min_refresh_secs` ago; the caller then finds the `kid` or not.
    pub(crate) async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<Vec<Key>>, AuthError> {
        let has =
            |keys: &Arc<Vec<Key>>, kid: &str| keys.iter().any(|k| k.kid.as_deref() == Some(kid));
        let keys = self.current().ok_or(AuthError::KeysUnavailable)?;
        let Some(kid) = kid else {
            return Ok(keys);
        };
        if has(&keys, kid) {
            return Ok(keys);
        }
        // Waits for a fetch in flight, if any: it may bring this kid.
        let mut last = self.fetching.lock().await;
        let keys = self.current().ok_or(AuthError::KeysUnavailable)?;
        if has(&keys, kid) {
            return Ok(keys);
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refresh) {
            tracing::debug!(kid, "unknown JWT kid; JWKS fetch rate-limited");
            return Ok(keys);
        }
        *last = Some(Instant::now());
        let _ = self.fetch("unknown_kid").await;
        drop(last);
        self.current().ok_or(AuthError::KeysUnavailable)
    }

    /// One fetch; the caller holds `fetching`. Returns the set's lifetime on success.
    async fn fetch(&self, trigger: &'static str) -> Result<Duration, ()> {
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.get()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        };
        let label = |result| JwksFetchLabel { trigger, result };
        match result {
            Ok((keys, lifetime)) => {
                let count = keys.len();
                *crate::sync::write(&self.keys) = Some(Arc::new(keys));
                self.loaded.send_replace(true);
                self.fetches.get_or_create(&label("ok")).inc();
                tracing::debug!(url = %self.url, trigger, keys = count, ?lifetime, "JWKS fetched");
                Ok(lifetime)
            }
            Err(error) => {
                self.fetches.get_or_create(&label("error")).inc();
                tracing::warn!(
                    url = %self.url,
                    trigger,
                    %error,
                    kept_last_good = self.is_loaded(),
                    "JWKS fetch failed"
                );
                Err(())
            }
        }
    }

    async fn get(&self) -> Result<(Vec<Key>, Duration), String> {
        let request = Request::get(self.url.clone())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "streamgate")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        let lifetime = lifetime(response.headers(), self.default_lifetime, self.min_refresh);
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        let document: Value =
            serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
        let Some(keys) = document.get("keys").and_then(Value::as_array) else {
            return Err("not a JWKS: no \"keys\" array".into());
        };
        Ok((jwks_url_keys(keys)?, lifetime))
    }
}

/// How long a response may be kept: `Cache-Control: max-age` (`no-cache`/`no-store`: as
/// short as allowed), else `Expires`, else `default`; clamped to `[min, 24 h]`.
fn lifetime(headers: &HeaderMap, default: Duration, min: Duration) -> Duration {
    let directives: Vec<String> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    let from_cache_control = directives.iter().find_map(|d| {
        if d == "no-cache" || d == "no-store" {
            Some(Duration::ZERO)
        } else {
            d.strip_prefix("max-age=")
                .and_then(|n| n.trim_matches('"').parse::<u64>().ok())
                .map(Duration::from_secs)
        }
    });
    let from_expires = || {
        let expires = headers.get(header::EXPIRES)?.to_str().ok()?;
        let at = httpdate::parse_http_date(expires).ok()?;
        Some(at.duration_since(SystemTime::now()).unwrap_or_default())
    };
    from_cache_control
        .or_else(from_expires)
        .unwrap_or(default)
        .clamp(min, MAX_LIFETIME.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn cache_lifetime_from_headers() {
        let (default, min) = (Duration::from_secs(300), Duration::from_secs(10));
        let life = |pairs: &[(&'static str, &str)]| lifetime(&headers(pairs), default, min);
        assert_eq!(life(&[]), default);
        assert_eq!(
            life(&[("cache-control", "public, Max-Age=600")]),
            Duration::from_secs(600)
        );
        assert_eq!(life(&[("cache-control", "max-age=1")]), min, "clamped up");
        assert_eq!(life(&[("cache-control", "no-store")]), min);
        assert_eq!(life(&[("cache-control", "max-age=99999999")]), MAX_LIFETIME);
        let in_an_hour = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let expires = life(&[("expires", &in_an_hour)]);
        assert!(expires > Duration::from_secs(3500) && expires <= Duration::from_secs(3600));
        assert_eq!(life(&[("expires", "garbage")]), default);
    }

    #[test]
    fn urls_must_be_https_unless_loopback() {
        assert!(check_url("https://idp.example.com/.well-known/jwks.json").is_ok());
        assert!(check_url("http://127.0.0.1:8081/jwks").is_ok());
        assert!(check_url("http://[::1]:8081/jwks").is_ok());
        assert!(check_url("http://localhost/jwks").is_ok());
        let err = check_url("http://idp.example.com/jwks").unwrap_err();
        assert!(err.contains("https://"), "{err}");
        assert!(check_url("ftp://idp.example.com/jwks").is_err());
        assert!(check_url("/jwks").is_err());
    }
}
