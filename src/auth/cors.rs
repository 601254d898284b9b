//! Browser origin policy: CORS headers for HTTP, an `Origin` check for WebSocket.
//!
//! Browsers enforce CORS on `fetch` and `EventSource`, but not on WebSocket: any page can open
//! a WebSocket to any host, with the user's cookies. So the subscribe handler refuses (403) a
//! WebSocket whose `Origin` is neither this server's own nor allowed by `[cors]`; a cookie
//! credential from another origin needs that origin listed and `allow_credentials`, as for
//! CORS (`*` never admits it). Requests without `Origin` (non-browser clients) are not
//! affected by either check.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsConfig;

/// How long browsers may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for HTTP routes; `None` when no other origin is allowed.
pub fn layer(config: &CorsConfig) -> Option<CorsLayer> {
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins = if config.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::ACCEPT,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .allow_credentials(config.allow_credentials)
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// Whether a WebSocket handshake with these headers may proceed: no `Origin`, the server's
/// own origin (same host), or another origin the config lets in. `cookie` says whether the
/// request is authenticated by the cookie, which a browser attaches whatever page opens the
/// socket: then only a listed origin with `allow_credentials` may use it, never `*`, exactly
/// as the CORS headers rule it for `fetch` and `EventSource` (cross-site WebSocket hijacking).
pub fn websocket_origin_allowed(config: &CorsConfig, headers: &HeaderMap, cookie: bool) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h)) {
        return true;
    }
    let listed = config
        .allowed_origins
        .iter()
        .any(|o| o.eq_ignore_ascii_case(origin));
    if cookie {
        listed && config.allow_credentials
    } else {
        listed || config.allowed_origins.iter().any(|o| o == "*")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(origins: &[&str], credentials: bool) -> CorsConfig {
        CorsConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_credentials: credentials,
        }
    }

    #[test]
    fn websocket_origins() {
        let allowed = config(&["https://app.example"], true);
        let headers = |origin: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("gate:8080"));
            h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
            h
        };
        for cookie in [false, true] {
            assert!(websocket_origin_allowed(
                &allowed,
                &HeaderMap::new(),
                cookie
            ));
            assert!(websocket_origin_allowed(
                &allowed,
                &headers("https://app.example"),
                cookie
            ));
            assert!(websocket_origin_allowed(
                &allowed,
                &headers("http://gate:8080"),
                cookie
            ));
            assert!(!websocket_origin_allowed(
                &allowed,
                &headers("https://evil.example"),
                cookie
            ));
            assert!(!websocket_origin_allowed(
                &config(&[], false),
                &headers("https://app.example"),
                cookie
            ));
        }
        // `*` and listed origins without credentials: any origin, but never with the cookie.
        let any = config(&["*"], false);
        assert!(websocket_origin_allowed(
            &any,
            &headers("https://evil.example"),
            false
        ));
        assert!(!websocket_origin_allowed(
            &any,
            &headers("https://evil.example"),
            true
        ));
        assert!(websocket_origin_allowed(
            &any,
            &headers("http://gate:8080"),
            true
        ));
        let listed = config(&["https://app.example"], false);
        assert!(websocket_origin_allowed(
            &listed,
            &headers("https://app.example"),
            false
        ));
        assert!(!websocket_origin_allowed(
            &listed,
            &headers("https://app.example"),
            true
        ));
    }
}
