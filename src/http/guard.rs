//! Authentication in front of every route: the middleware that turns a request's credential
//! into a [`Principal`](crate::auth::Principal) (or a 401/403/503 problem). The checks are
//! [`crate::auth`]'s; this module only reads the request and writes the response.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use crate::auth::Authenticator;
use crate::auth::proxy::ClientAddr;

/// Paths served without a credential: probes and Prometheus scrapes (no stream data; but
/// `/metrics` names the running streams, so `auth.metrics_role` can require a role for it).
const PUBLIC_PATHS: &[&str] = &["/health/live", "/health/ready", "/metrics"];

/// The metrics path (see [`Authenticator::guards_metrics`]).
const METRICS_PATH: &str = "/metrics";

/// `?access_token=` of any request.
#[derive(Deserialize)]
struct TokenParam {
    access_token: Option<String>,
    /// Firebase's name for it (the document view, PROTOCOL.md §7).
    auth: Option<String>,
}

/// The middleware in front of every route (see [`crate::auth`] for the whole flow):
/// authenticates, requires the admin role on `/_admin`, and stores the
/// [`Principal`](crate::auth::Principal) in the request extensions. Stream permissions are
/// checked by the subscribe handler, which knows the stream.
///
/// It goes by path rather than being attached to particular routes, so a route added later
/// (any admin method or sub-path) is covered without anyone remembering to.
pub async fn guard(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let metrics = path == METRICS_PATH && auth.guards_metrics();
    if !auth.enabled() || (PUBLIC_PATHS.contains(&path) && !metrics) {
        return next.run(request).await;
    }
    let admin = path == "/_admin" || path.starts_with("/_admin/");
    let access_token = Query::<TokenParam>::try_from_uri(request.uri())
        .ok()
        .and_then(|Query(p)| p.access_token.or(p.auth));
    let principal = match auth
        .authenticate(request.headers(), access_token.as_deref())
        .await
    {
        Ok(principal) => principal,
        Err(error) => {
            let client = request
                .extensions()
                .get::<ClientAddr>()
                .map(|ClientAddr(ip)| *ip);
            tracing::debug!(?client, %error, "request refused by authentication");
            return ApiError::from(error).into_response();
        }
    };
    if admin && let Err(error) = auth.authorize_admin(&principal) {
        return ApiError::from(error).into_response();
    }
    if metrics && let Err(error) = auth.authorize_metrics(&principal) {
        return ApiError::from(error).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}
