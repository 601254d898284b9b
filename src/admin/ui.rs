//! The operator console and the server-wide stats it reads.
//!
//! | route | result |
//! |---|---|
//! | `GET /_admin/ui` | the console: one HTML page, CSS and JavaScript inline, no framework |
//! | `GET /_admin/stats` | server-wide figures: clients by transport, workers, cursors, lag |
//!
//! The page is compiled into the binary (`include_str!`) and served as one document, so the
//! admin credential that let the browser load it (a cookie, or `?access_token=` which the page
//! then keeps in `sessionStorage` and sends as a bearer token) is the only one it needs; no
//! sub-resource would have to authenticate on its own. Both routes are under `/_admin`, so the
//! auth guard requires the admin role for them like for the rest of the admin API.
//!
//! The page shows stream data (documents from the live tail), so its Content-Security-Policy
//! allows only its own inline script and style, by hash (computed once from the embedded
//! page): an injected `<script>` would not run, and nothing loads from or talks to another
//! origin.

use std::sync::OnceLock;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::http::AppState;
use crate::http::negotiate::Transport;
use crate::metrics::TransportLabel;
use crate::worker::WorkerState;

/// The console page.
const PAGE: &str = include_str!("ui.html");

/// `GET /_admin/ui`.
pub async fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            ),
            (
                header::HeaderName::from_static("referrer-policy"),
                HeaderValue::from_static("no-referrer"),
            ),
            (header::CONTENT_SECURITY_POLICY, csp().clone()),
        ],
        PAGE,
    )
        .into_response()
}

/// `default-src 'none'` plus the page's own script and style by hash, and same-origin fetches
/// and EventSources.
fn csp() -> &'static HeaderValue {
    static CSP: OnceLock<HeaderValue> = OnceLock::new();
    CSP.get_or_init(|| {
        let script = inline_hash(PAGE, "<script>", "</script>");
        let style = inline_hash(PAGE, "<style>", "</style>");
        let policy = format!(
            "default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        );
        HeaderValue::from_str(&policy)
            .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
    })
}

/// `'sha256-…'` of the text between the first `open` and the next `close` tag.
fn inline_hash(page: &str, open: &str, close: &str) -> String {
    let body = page
        .split_once(open)
        .and_then(|(_, rest)| rest.split_once(close))
        .map_or("", |(body, _)| body);
    format!("'sha256-{}'", base64(&Sha256::digest(body.as_bytes())))
}

/// Standard base64 with padding (CSP hashes; not worth a dependency).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /_admin/stats`: what the console's overview shows, from the metrics and the workers.
pub async fn stats(State(state): State<AppState>) -> Json<Value> {
    let metrics = &state.metrics;
    let mut clients = serde_json::Map::new();
    let (mut total, mut bytes) = (0, 0);
    for transport in Transport::ALL {
        let label = TransportLabel {
            transport: transport.as_str(),
        };
        let n = metrics.clients.get_or_create(&label).get();
        bytes += metrics.bytes_written.get_or_create(&label).get();
        total += n;
        clients.insert(transport.as_str().to_owned(), Value::from(n));
    }
    clients.insert("total".into(), Value::from(total));
    let now = crate::metrics::now_ms();
    let workers = state.registry.all_workers();
    let max_lag = workers
        .iter()
        .filter(|w| w.state() != WorkerState::Stopped)
        .map(|w| w.lag_seconds(now))
        .max_by(f64::total_cmp);
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "auth": state.config.auth.enabled,
        "streams": state.registry.list().len(),
        "clients": clients,
        "workers": workers.len(),
        "cursors": metrics.upstream_cursors.get(),
        "cursorLimit": state.config.limits.max_workers,
        "eventsReceived": metrics.events_received.get(),
        "eventsDelivered": metrics.deliveries.get(),
        "catchups": metrics.catchups.get(),
        "snapshots": metrics.snapshots.get(),
        "slowConsumers": metrics.slow_consumers.get(),
        "workerRetries": metrics.worker_retries.get(),
        "maxLagSeconds": max_lag,
        "deliveryLatencyCount": metrics.delivery_latency.count(),
        "bytesWritten": bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_policy_hashes_the_page_script_and_style_and_allows_nothing_inline_else() {
        let policy = csp().to_str().unwrap();
        assert!(policy.contains("script-src 'sha256-"), "{policy}");
        assert!(policy.contains("style-src 'sha256-"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        // One script and one style block: a second would not be covered by the hash.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(
            !PAGE.contains(" style=\""),
            "inline style attributes are blocked by the CSP"
        );
        assert!(
            !PAGE.contains(" onclick="),
            "inline handlers are blocked by the CSP"
        );
        assert!(!PAGE.contains("https://"), "no CDN");
    }
}
