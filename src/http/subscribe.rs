//! `GET /{db}/{coll}/_streams/{name}`: validate, subscribe, then hand over to a transport.
//!
//! Everything that can fail with a status code (not allowed, unknown stream, bad `avars`,
//! malformed or unusable resume id, no transport, foreign WebSocket origin, connection limit)
//! fails here, before the response starts and before any worker starts.

use std::convert::Infallible;
use std::net::IpAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::feed::Feed;
use super::negotiate::{Transport, negotiate};
use super::options::{Options, RawOptions, named_frame};
use super::{docview, ndjson, sse, ws};
use crate::auth::proxy::ClientAddr;
use crate::auth::{Principal, cors};
use crate::event::Token;
use crate::http::error::ApiError;
use crate::limits::PrincipalKey;
use crate::snapshot::Mode;
use crate::streams::{Requester, StreamKey};

/// Largest WebSocket message we read from a client (they have nothing to say).
const WS_MAX_INCOMING: usize = 4096;

/// Query parameters of a subscribe request.
#[derive(Debug, Default, Deserialize)]
pub struct SubscribeParams {
    /// URL-encoded JSON object of variable values.
    pub avars: Option<String>,
    /// Resume position for clients that cannot send `Last-Event-ID`.
    #[serde(rename = "lastEventId")]
    pub last_event_id: Option<String>,
    /// Auth token for clients that cannot send headers.
    pub access_token: Option<String>,
    /// Firebase's name for `access_token` (PROTOCOL.md §7).
    pub auth: Option<String>,
    /// `true`: start with the current documents (PROTOCOL.md §6).
    pub snapshot: Option<String>,
    /// `firebase`: the document view (PROTOCOL.md §7), like the `.json` suffix.
    pub format: Option<String>,
    /// `rewind`, `heartbeats`, `enveloped`, `operationType`, `info` (PROTOCOL.md §8).
    #[serde(flatten)]
    pub options: RawOptions,
}

/// What both subscribe handlers (this one and [`super::multi`]'s) take from a request besides
/// its path and query. Never refuses: each part is checked where it is used.
pub struct Caller {
    /// The WebSocket upgrade, or why the request is not one (see [`checked_upgrade`]).
    pub upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    /// Set by `http::guard` when auth is on; `None` when it is off.
    pub principal: Option<Principal>,
    /// The client as trusted proxies vouch for it (`auth::proxy`), else the TCP peer.
    pub ip: Option<IpAddr>,
    /// The request headers.
    pub headers: HeaderMap,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Caller, Infallible> {
        Ok(Caller {
            upgrade: WebSocketUpgrade::from_request_parts(parts, state).await,
            principal: parts.extensions.get::<Principal>().cloned(),
            ip: parts
                .extensions
                .get::<ClientAddr>()
                .map(|ClientAddr(ip)| *ip),
            headers: parts.headers.clone(),
        })
    }
}

/// The subscribe handler.
pub async fn subscribe(
    State(state): State<AppState>,
    Path((db, coll, name)): Path<(String, String, String)>,
    query: Result<Query<SubscribeParams>, QueryRejection>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let (principal, headers) = (caller.principal, caller.headers);
    // `{name}.json` is the document view of `{name}` (stream names have no dots).
    let (name, json_suffix) = match name.strip_suffix(docview::SUFFIX) {
        Some(stem) => (stem.to_owned(), true),
        None => (name, false),
    };
    let key = StreamKey::new(&db, &coll, &name).map_err(|_| {
        ApiError::not_found(format!(
            "no stream is defined at /{db}/{coll}/_streams/{name}"
        ))
    })?;
    // Before the existence check, so a refused client cannot probe which streams exist.
    state.auth.authorize_stream(principal.as_ref(), &key)?;
    if state.registry.get(&key).is_none() {
        return Err(ApiError::not_found(format!(
            "no stream is defined at {key}"
        )));
    }
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let transport = negotiate(&headers)?;
    let options = Options::parse(&params.options)?;
    let resume = resume_id(&headers, &params)?;
    // A well-formed id that cannot be a position of this collection: 400 now, not silence.
    if let Some(token) = &resume {
        state.resume.check(&key, token).await?;
        crate::snapshot::check_id(token)?;
    }
    let resumed = resume.is_some();
    let mode = start_mode(&state, &key, &params, json_suffix, transport)?;
    // Check the upgrade before any worker starts for a request that cannot be served.
    let upgrade = checked_upgrade(
        &state,
        &headers,
        transport,
        params.access_token.as_deref().or(params.auth.as_deref()),
        caller.upgrade,
    )?;
    // The slot is held by the feed for the life of the stream (freed on drop).
    let user = principal.as_ref().map(Principal::limit_key);
    let permit = state
        .limits
        .try_acquire(&key, user.as_deref(), caller.ip)
        .map_err(|exceeded| {
            state
                .metrics
                .connection_refusals
                .get_or_create(&crate::metrics::LimitLabel {
                    limit: exceeded.as_str(),
                })
                .inc();
            state.limits.refusal(exceeded)
        })?;

    // Per-user document filtering: the authenticated claims (`None` with auth off).
    let claims = principal.as_ref().map(|p| &p.claims);
    let who = principal_key(user, caller.ip);
    let requester = Requester {
        claims,
        principal: who.as_ref(),
    };
    let (subscription, prelude) = match mode {
        None => (
            state
                .registry
                .subscribe(&key, params.avars.as_deref(), resume, requester)
                .await?,
            None,
        ),
        Some(mode) => {
            let lease = state.snapshots.lease(
                &state.limits,
                principal.as_ref().map(|p| p.subject.as_str()),
                caller.ip,
            );
            state
                .snapshots
                .subscribe(
                    &state.registry,
                    &key,
                    params.avars.as_deref(),
                    resume,
                    requester,
                    mode,
                    &lease,
                )
                .await?
        }
    };
    // This client in its worker's per-transport count, for as long as the feed lives.
    let count = state.clients.count(subscription.worker(), transport);
    let mut feed = Feed::new(
        subscription,
        state.config.keepalive(),
        state.shutdown.clone(),
        state.metrics.clone(),
        transport,
        principal.as_ref().and_then(Principal::deadline),
    )
    .with_permit(permit)
    .with_count(count)
    .with_narrowing(options.narrowing.clone())
    .with_revocation(state.auth.watch_access(principal.as_ref(), &key));
    if let Some(prelude) = prelude {
        feed = feed.with_prelude(prelude);
    }
    if mode == Some(Mode::View) {
        return Ok(docview::response(feed, state.config.sse_retry_ms));
    }
    // `rewind` is for a fresh live subscription; a resume or a snapshot already starts exactly.
    if !resumed && mode.is_none() {
        feed.rewind(options.rewind);
    }
    let info = options.info.then(|| {
        let data = json!({
            "streams": [key.to_string()],
            "position": feed.position().map(Token::as_str),
        });
        named_frame(transport, "info", None, &data.to_string())
    });
    Ok(match transport {
        Transport::Sse => sse::response(feed, state.config.sse_retry_ms, &options, info),
        Transport::Ndjson => ndjson::response(feed, &options, info),
        Transport::WebSocket => {
            let Some(upgrade) = upgrade else {
                return Err(ApiError::bad_request("missing WebSocket upgrade"));
            };
            let extras = ws::Extras {
                info,
                heartbeat: options.heartbeat(Transport::WebSocket),
                bare: !options.enveloped,
            };
            ws::accept(upgrade, WS_MAX_INCOMING, move |sink, incoming| {
                ws::serve(sink, incoming, feed, extras)
            })
        }
    })
}

/// Who new bindings count against (`limits.new_bindings_per_minute`): the authenticated
/// principal's limit key (`user`), else the client's address.
pub(super) fn principal_key(user: Option<String>, ip: Option<IpAddr>) -> Option<PrincipalKey> {
    match (user, ip) {
        (Some(user), _) => Some(PrincipalKey::User(user)),
        (None, Some(ip)) => Some(PrincipalKey::Ip(ip)),
        (None, None) => None,
    }
}

/// Whether the client starts with a snapshot, and in which form; the document view is SSE only.
fn start_mode(
    state: &AppState,
    key: &StreamKey,
    params: &SubscribeParams,
    json_suffix: bool,
    transport: Transport,
) -> Result<Option<Mode>, ApiError> {
    let view = match params.format.as_deref() {
        None => json_suffix,
        Some("firebase") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format={other:?} is not known; the only format is \"firebase\" (the document view)"
            )));
        }
    };
    if view {
        if transport != Transport::Sse {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "Not Acceptable",
                "the document view is served as Server-Sent Events only (Accept: text/event-stream)",
            ));
        }
        return Ok(Some(Mode::View));
    }
    let asked = snapshot_param(params.snapshot.as_deref())?;
    Ok(snapshot_wanted(state, key, asked).then_some(Mode::Events))
}

/// The WebSocket upgrade of a subscribe (`None` for other transports), checked before any
/// worker starts: browsers do not apply CORS to WebSocket, so the origin check is ours.
pub(super) fn checked_upgrade(
    state: &AppState,
    headers: &HeaderMap,
    transport: Transport,
    access_token: Option<&str>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Option<WebSocketUpgrade>, ApiError> {
    if transport != Transport::WebSocket {
        return Ok(None);
    }
    let cookie = state.auth.credential_is_cookie(headers, access_token);
    if !cors::websocket_origin_allowed(&state.config.cors, headers, cookie) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "WebSocket connections from this origin are not allowed",
        ));
    }
    upgrade
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("bad WebSocket upgrade: {}", e.body_text())))
}

/// `?snapshot=`: `Some(true|false)` when given, `None` when not; anything else is a 400.
pub(super) fn snapshot_param(raw: Option<&str>) -> Result<Option<bool>, ApiError> {
    match raw {
        None => Ok(None),
        Some("true" | "1") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(other) => Err(ApiError::bad_request(format!(
            "snapshot={other:?}: expected true or false"
        ))),
    }
}

/// Whether a subscription to `key` starts with a snapshot: as asked, else as its definition says.
pub(super) fn snapshot_wanted(state: &AppState, key: &StreamKey, asked: Option<bool>) -> bool {
    asked.unwrap_or_else(|| {
        state
            .registry
            .get(key)
            .is_some_and(|entry| entry.definition.source.snapshot)
    })
}

/// The resume id asked for, trimmed: `Last-Event-ID` wins over `?lastEventId=` (`param`);
/// `None` when neither is given or it is empty ("from now").
pub(super) fn last_event_id<'a>(
    headers: &'a HeaderMap,
    param: Option<&'a str>,
) -> Result<Option<&'a str>, ApiError> {
    let header = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::bad_request("Last-Event-ID is not valid text"))?,
        ),
        None => None,
    };
    Ok(header
        .or(param)
        .map(str::trim)
        .filter(|raw| !raw.is_empty()))
}

/// The resume id as a token (see [`last_event_id`]).
fn resume_id(headers: &HeaderMap, params: &SubscribeParams) -> Result<Option<Token>, ApiError> {
    last_event_id(headers, params.last_event_id.as_deref())?
        .map(|raw| Token::parse(raw).map_err(|e| ApiError::bad_request(e.to_string())))
        .transpose()
}
