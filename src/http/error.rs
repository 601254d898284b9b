//! One error envelope for every HTTP error: RFC 9457 `application/problem+json`.
//!
//! Handlers return `Result<_, ApiError>`. The `detail` is written for the client; internal
//! causes (driver errors, I/O) are logged, not sent.
//!
//! The layers below HTTP (limits, snapshots, authentication, resume checks, the registry)
//! return their own error types; the `From` impls here are the one place each becomes a
//! status, a title, headers and a problem body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::AuthError;
use crate::auth::resume::ResumeRefused;
use crate::limits::{BindingsRefused, ConnectionRefused, UpstreamLimit};
use crate::snapshot::SnapshotError;
use crate::streams::definition::DefinitionError;
use crate::streams::{StoreError, SubscribeFailure};
use crate::worker::subscription::SubscribeError;

/// An HTTP error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Status code.
    pub status: StatusCode,
    /// Short, stable summary per kind of problem.
    pub title: &'static str,
    /// What went wrong in this request, for a human.
    pub detail: String,
    /// Extra members merged into the body (e.g. the offending `field`). Boxed: errors travel
    /// in every handler's `Result`, so the common case stays small.
    pub extra: Option<Box<serde_json::Value>>,
    /// `Retry-After` seconds, for 429/503.
    pub retry_after: Option<u64>,
    /// `WWW-Authenticate` challenge, for 401.
    pub www_authenticate: Option<&'static str>,
}

impl ApiError {
    /// A problem with the given status, title and detail.
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            title,
            detail: detail.into(),
            extra: None,
            retry_after: None,
            www_authenticate: None,
        }
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "Bad Request", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "Not Found", detail)
    }

    /// 409.
    pub fn conflict(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "Conflict", detail)
    }

    /// 413.
    pub fn payload_too_large(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "Content Too Large", detail)
    }

    /// 415.
    pub fn unsupported_media_type(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type",
            detail,
        )
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            detail,
        );
        error.retry_after = Some(2);
        error
    }

    /// 500; the cause is logged here and never shown to the client.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(%cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
            "an internal error occurred; it has been logged",
        )
    }

    /// A refusal by a limit: `limit` names its config key in the body, `Retry-After` says
    /// when to try again.
    pub fn limit(mut self, limit: &str, retry_after_secs: u64) -> ApiError {
        self.retry_after = Some(retry_after_secs);
        self.with_extra(json!({ "limit": limit }))
    }

    /// Adds members to the problem body.
    pub fn with_extra(mut self, extra: serde_json::Value) -> ApiError {
        self.extra = Some(Box::new(extra));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Every refusal passes here exactly once: one debug line with its reason, so an operator
        // can see why clients are turned away without logging every successful request.
        let extra = self.extra.as_deref();
        tracing::debug!(
            status = self.status.as_u16(),
            title = self.title,
            detail = %self.detail,
            limit = extra.and_then(|e| e.get("limit")).and_then(|v| v.as_str()),
            field = extra.and_then(|e| e.get("field")).and_then(|v| v.as_str()),
            "request refused"
        );
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let (Some(serde_json::Value::Object(extra)), Some(object)) =
            (self.extra.map(|extra| *extra), body.as_object_mut())
        {
            object.extend(extra);
        }
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(challenge) = self.www_authenticate {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<DefinitionError> for ApiError {
    fn from(error: DefinitionError) -> ApiError {
        let field = error.field.clone();
        ApiError::bad_request(error.to_string()).with_extra(json!({ "field": field }))
    }
}

impl From<SubscribeFailure> for ApiError {
    fn from(failure: SubscribeFailure) -> ApiError {
        match failure {
            SubscribeFailure::NotFound(key) => {
                ApiError::not_found(format!("no stream is defined at {key}"))
            }
            SubscribeFailure::Avars(error) => ApiError::bad_request(error.to_string()),
            SubscribeFailure::Subscribe(SubscribeError::BadResumeToken(message)) => {
                ApiError::bad_request(format!("the event id cannot be resumed from: {message}"))
            }
            SubscribeFailure::NotReady => ApiError::unavailable(failure.to_string()),
            SubscribeFailure::Upstream(limit)
            | SubscribeFailure::Subscribe(SubscribeError::Upstream(limit)) => limit.into(),
            SubscribeFailure::Filter(error) => {
                ApiError::new(StatusCode::FORBIDDEN, "Forbidden", error.to_string())
            }
            SubscribeFailure::Bindings(refused) => refused.into(),
        }
    }
}

impl From<UpstreamLimit> for ApiError {
    /// 503 (the server, not this client, is at capacity) with `Retry-After`, like the 429 of
    /// the connection limits, and `limit` naming the config key that was reached.
    fn from(refused: UpstreamLimit) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            refused.to_string(),
        )
        .limit(refused.limit.as_str(), refused.retry_after_secs)
    }
}

impl From<ConnectionRefused> for ApiError {
    /// 429 with `Retry-After` and `limit` naming the config key that was reached.
    fn from(refused: ConnectionRefused) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too Many Requests",
            refused.to_string(),
        )
        .limit(refused.limit.as_str(), refused.retry_after_secs)
    }
}

impl From<BindingsRefused> for ApiError {
    /// 429 (this client, not the server, is over) with `Retry-After` until one more binding
    /// is allowed, and `limit` naming `new_bindings_per_minute`.
    fn from(refused: BindingsRefused) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too Many Requests",
            refused.to_string(),
        )
        .limit(BindingsRefused::LIMIT, refused.retry_after_secs)
    }
}

/// Challenge sent with a 401 when no credential was given.
const CHALLENGE: &str = r#"Bearer realm="streamgate""#;
/// Challenge sent with a 401 for a credential that was refused (RFC 6750 §3.1).
const CHALLENGE_INVALID: &str = r#"Bearer realm="streamgate", error="invalid_token""#;
/// Challenge sent with a 401 for an expired token.
const CHALLENGE_EXPIRED: &str =
    r#"Bearer realm="streamgate", error="invalid_token", error_description="token expired""#;

impl From<AuthError> for ApiError {
    /// 401 with a `WWW-Authenticate` challenge; 403 for a principal without the right; 503
    /// while the JWKS URL has not been fetched.
    fn from(error: AuthError) -> ApiError {
        let (detail, challenge) = match &error {
            AuthError::KeysUnavailable => {
                return ApiError::unavailable(
                    "the token signing keys are not loaded yet (auth.jwt.jwks_url); retry shortly",
                );
            }
            AuthError::Forbidden(detail) => {
                return ApiError::new(StatusCode::FORBIDDEN, "Forbidden", detail.clone());
            }
            AuthError::Missing => (
                "a credential is required: send `Authorization: Bearer <token>`, \
                 `?access_token=<token>` or the auth cookie",
                CHALLENGE,
            ),
            AuthError::Expired => ("the access token expired", CHALLENGE_EXPIRED),
            AuthError::EmulatorOwner => (
                "`Authorization: Bearer owner` is the Firebase emulator's credential (what \
                 firebase-admin sends to an http:// databaseURL); this server has auth on: \
                 send an API key or a JWT (Pyrebase: stream(handler, token=...))",
                CHALLENGE_INVALID,
            ),
            AuthError::Invalid(reason) => {
                tracing::debug!(%reason, "credential refused");
                ("the credential is not valid", CHALLENGE_INVALID)
            }
        };
        let mut api = ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", detail);
        api.www_authenticate = Some(challenge);
        api
    }
}

impl From<ResumeRefused> for ApiError {
    /// 400 with `reason` (`future_cluster_time`, `other_collection`).
    fn from(refused: ResumeRefused) -> ApiError {
        ApiError::bad_request(refused.detail).with_extra(json!({ "reason": refused.reason }))
    }
}

impl From<SnapshotError> for ApiError {
    /// 400 when retrying cannot help (a malformed snapshot id too), 413 past
    /// `snapshot_max_docs` or `snapshot_max_put_bytes`, 429 past the principal's `per_user` /
    /// `per_ip`, 503 (with `Retry-After`) when a retry may succeed.
    fn from(error: SnapshotError) -> ApiError {
        match error {
            SnapshotError::Subscribe(failure) => failure.into(),
            SnapshotError::BadId(_) => ApiError::bad_request(error.to_string()),
            SnapshotError::Limit(refused) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                error.to_string(),
            )
            .limit(refused.limit.as_str(), refused.retry_after_secs),
            SnapshotError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload Too Large",
                error.to_string(),
            )
            .with_extra(json!({ "limit": "snapshot_max_put_bytes" })),
            SnapshotError::SlotsBusy => ApiError::unavailable(error.to_string())
                .with_extra(json!({ "limit": "snapshot_max_scans" })),
            SnapshotError::TooManyDocs { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload Too Large",
                error.to_string(),
            )
            .with_extra(json!({ "limit": "snapshot_max_docs" })),
            SnapshotError::Unreadable(_) => ApiError::bad_request(error.to_string()),
            SnapshotError::Unavailable(_) => ApiError::unavailable(error.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::Mongo(error) => {
                tracing::warn!(%error, "stream definition store unavailable");
                ApiError::unavailable(
                    "the definition could not be stored: MongoDB is not reachable; retry shortly",
                )
            }
            StoreError::Encode(error) => ApiError::internal(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use crate::limits::CursorBudget;
    use crate::metrics::Metrics;
    use crate::streams::StreamKey;

    #[tokio::test]
    async fn an_upstream_limit_is_a_503_problem_naming_it() {
        let limits = LimitsConfig {
            max_workers: 1,
            retry_after_secs: 9,
            ..LimitsConfig::default()
        };
        let budget = CursorBudget::new(&limits, &Metrics::new());
        let key = StreamKey::new("db", "c", "s").unwrap();
        let _held = budget.try_acquire(&key).unwrap();
        let refused = budget.try_acquire(&key).unwrap_err();
        let response = ApiError::from(refused).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "9");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["status"], 503);
        assert_eq!(body["limit"], "max_workers");
        assert!(
            body["detail"].as_str().unwrap().contains("max_workers"),
            "{body}"
        );
    }
}
