//! The DNS-rebinding guard: with auth off, a server listening on a loopback address answers
//! only requests addressed to a loopback name.
//!
//! Why: a web page on `evil.example` can make its own name resolve to 127.0.0.1 after the page
//! loaded (DNS rebinding); the browser then sends the page's requests to this server as
//! same-origin ones, and the page reads every stream and changes every definition, since a
//! local run has no credentials. Those requests still carry `Host: evil.example`, which is what
//! this checks. Names accepted: `localhost` and `*.localhost`, loopback IP literals
//! (`127.0.0.0/8`, `[::1]`), with any port, and the names in `allowed_hosts` (`*`: any). A
//! request without `Host` (HTTP/1.0 health checks) passes: browsers always send one. Refused
//! requests get 421 Misdirected Request with a problem body.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;

/// The host names a loopback-only server without auth answers besides loopback names.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// Lower-case names from `allowed_hosts`, without a trailing dot.
    names: Vec<String>,
}

impl AllowedHosts {
    /// The guard for a server listening on `loopback` (whether its address is one) with auth
    /// `auth_enabled`: `None` when it does not apply (auth on, a non-loopback address, or
    /// `allowed_hosts` holding `*`).
    pub fn for_listener(
        allowed: &[String],
        loopback: bool,
        auth_enabled: bool,
    ) -> Option<Arc<AllowedHosts>> {
        if auth_enabled || !loopback || allowed.iter().any(|name| name == "*") {
            return None;
        }
        Some(Arc::new(AllowedHosts {
            names: allowed.iter().map(|name| normal(name)).collect(),
        }))
    }

    /// Whether a request with this `Host` value is answered.
    pub fn allows(&self, host: &str) -> bool {
        let name = normal(strip_port(host));
        is_loopback_name(&name) || self.names.contains(&name)
    }
}

/// Lower case, without a trailing dot (`LocalHost.` is `localhost`).
fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `host[:port]` → `host` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_loopback_name(name: &str) -> bool {
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    let literal = name
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(name);
    literal.parse::<IpAddr>().is_ok_and(|ip| match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    })
}

/// The middleware (installed only where [`AllowedHosts::for_listener`] applies).
pub async fn guard(
    State(allowed): State<Arc<AllowedHosts>>,
    request: Request,
    next: Next,
) -> Response {
    let host = match request.headers().get(header::HOST) {
        None => return next.run(request).await,
        Some(value) => value.to_str().unwrap_or(""),
    };
    if allowed.allows(host) {
        return next.run(request).await;
    }
    tracing::debug!(host, "request for a non-loopback Host refused");
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "Misdirected Request",
        format!(
            "this server listens on loopback without authentication, so it answers only \
             requests addressed to localhost, 127.0.0.1 or [::1] (a DNS-rebinding guard); \
             Host {host:?} is not one. If the name is yours (a reverse proxy on this machine), \
             add it to allowed_hosts"
        ),
    )
    .with_extra(json!({ "setting": "allowed_hosts" }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_with_any_port_and_allowed_names_pass() {
        let guard = AllowedHosts::for_listener(&["Streams.Example.".into()], true, false)
            .expect("a loopback listener without auth is guarded");
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
            "streams.example",
            "streams.example:443",
        ] {
            assert!(guard.allows(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]:80",
            "0.0.0.0",
            "",
            "127.0.0.1.evil.example",
        ] {
            assert!(!guard.allows(host), "{host}");
        }
    }

    #[test]
    fn the_guard_applies_only_to_loopback_listeners_without_auth() {
        assert!(AllowedHosts::for_listener(&[], true, false).is_some());
        assert!(AllowedHosts::for_listener(&[], false, false).is_none());
        assert!(AllowedHosts::for_listener(&[], true, true).is_none());
        assert!(AllowedHosts::for_listener(&["*".into()], true, false).is_none());
    }
}
