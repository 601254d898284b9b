//! Picks the transport from `Upgrade` / `Accept` (PROTOCOL.md §3).

use axum::http::{HeaderMap, StatusCode, header};
use serde_json::json;

use crate::http::error::ApiError;

/// The three ways to subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Server-Sent Events (`Accept: text/event-stream`).
    Sse,
    /// WebSocket (`Upgrade: websocket`).
    WebSocket,
    /// Newline-delimited JSON (`Accept: application/x-ndjson`).
    Ndjson,
}

impl Transport {
    /// Every transport, in the order stats list them.
    pub const ALL: [Transport; 3] = [Transport::Sse, Transport::WebSocket, Transport::Ndjson];

    /// Name used in metrics and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::WebSocket => "websocket",
            Transport::Ndjson => "ndjson",
        }
    }
}

/// Chooses the transport, or 406 naming the three ways in.
pub fn negotiate(headers: &HeaderMap) -> Result<Transport, ApiError> {
    let header_contains = |name: header::HeaderName, needle: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .map(|v| v.to_ascii_lowercase().contains(needle))
                .unwrap_or(false)
        })
    };
    if header_contains(header::UPGRADE, "websocket") {
        return Ok(Transport::WebSocket);
    }
    if header_contains(header::ACCEPT, "text/event-stream") {
        return Ok(Transport::Sse);
    }
    if header_contains(header::ACCEPT, "application/x-ndjson") {
        return Ok(Transport::Ndjson);
    }
    Err(ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "Not Acceptable",
        "this is a change stream: ask for Server-Sent Events (Accept: text/event-stream), \
         newline-delimited JSON (Accept: application/x-ndjson) or a WebSocket (Upgrade: websocket)",
    )
    .with_extra(json!({
        "accepted": ["text/event-stream", "application/x-ndjson", "websocket"]
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn picks_each_transport() {
        assert_eq!(
            negotiate(&headers(&[(header::UPGRADE, "WebSocket")])).unwrap(),
            Transport::WebSocket
        );
        assert_eq!(
            negotiate(&headers(&[(
                header::ACCEPT,
                "text/html, text/event-stream;q=0.9"
            )]))
            .unwrap(),
            Transport::Sse
        );
        assert_eq!(
            negotiate(&headers(&[(header::ACCEPT, "application/x-ndjson")])).unwrap(),
            Transport::Ndjson
        );
    }

    #[test]
    fn refuses_plain_get() {
        let err = negotiate(&headers(&[(header::ACCEPT, "*/*")])).unwrap_err();
        assert_eq!(err.status, StatusCode::NOT_ACCEPTABLE);
        assert!(err.detail.contains("text/event-stream"));
    }
}
