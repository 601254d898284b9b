//! The admin API: define, change and remove streams at runtime (PROTOCOL.md §1–2).
//!
//! | route | result |
//! |---|---|
//! | `GET /_admin/streams` | 200 `{"streams": [view…]}`, static and stored |
//! | `GET /_admin/streams/{db}/{coll}/{name}` | 200 view · 404 |
//! | `PUT /_admin/streams/{db}/{coll}/{name}` | 201 created · 200 replaced · 400 · 409 static · 413 · 415 |
//! | `DELETE /_admin/streams/{db}/{coll}/{name}` | 204 · 404 · 409 static |
//! | `/_admin/rules…` | permission rules that change live: see [`rules`] |
//! | `GET /_admin/openapi.json` | the OpenAPI 3.1 document of these routes |
//! | `GET /_admin/stats` | server-wide figures for the console ([`ui`]) |
//! | `GET /_admin/ui` | the operator console ([`ui`]) |
//!
//! A view ([`view::StreamView`]) is the definition ([`StreamDefinition`], the same serde type
//! the config file and the store use) plus `db`, `coll`, `name`, `path`, `origin`, `readOnly`,
//! `revision`, `variables` and `stats`. A PUT body is parsed as that same view type: serde
//! drops the read-only members, so a GET response can be edited and PUT back, and every
//! member a definition has (including `match`) is accepted because it is derived, not listed.
//!
//! Writes go through the [`Store`](crate::streams::Store): the definition is stored in MongoDB,
//! applied here at once, and applied by every other instance from its change stream. Replacing
//! a definition ends its clients with `cancel` (they reconnect onto the new one); an identical
//! PUT disturbs no one. Every error is `application/problem+json`, naming the offending `field`
//! when there is one.

pub mod rules;
pub mod ui;
pub mod view;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::http::AppState;
use crate::http::error::ApiError;
use crate::streams::definition::CompiledDefinition;
use crate::streams::{Origin, Put, StreamDefinition, StreamKey};
use crate::worker::membership::{PreImages, check_pre_images};
use view::StreamView;

/// The OpenAPI document, kept true by `tests/it/admin.rs`, which validates real responses
/// against it.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The admin routes, with request bodies capped at `body_limit` bytes.
pub fn routes(body_limit: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/_admin/streams",
            get(list_streams).fallback(method_not_allowed),
        )
        .route(
            "/_admin/streams/{db}/{coll}/{name}",
            get(get_stream)
                .put(put_stream)
                .delete(delete_stream)
                .fallback(method_not_allowed),
        )
        .route(
            "/_admin/openapi.json",
            get(openapi).fallback(method_not_allowed),
        )
        .merge(rules::routes())
        .route("/_admin/stats", get(ui::stats).fallback(method_not_allowed))
        .route("/_admin/ui", get(ui::page).fallback(method_not_allowed))
        .layer(DefaultBodyLimit::max(body_limit))
}

/// `GET /_admin/streams`: every stream, static and stored, ordered by key.
async fn list_streams(State(state): State<AppState>) -> Json<Value> {
    let registry = &state.registry;
    let streams: Vec<StreamView> = registry
        .list()
        .iter()
        .map(|entry| view::stream(entry, &registry.workers_of(&entry.key), &state.clients))
        .collect();
    Json(json!({ "streams": streams }))
}

/// `GET /_admin/streams/{db}/{coll}/{name}`.
async fn get_stream(
    State(state): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Json<StreamView>, ApiError> {
    let key = existing_key(path)?;
    let entry = state.registry.get(&key).ok_or_else(|| not_found(&key))?;
    Ok(Json(view::stream(
        &entry,
        &state.registry.workers_of(&key),
        &state.clients,
    )))
}

/// `PUT /_admin/streams/{db}/{coll}/{name}`: validate, store, apply.
async fn put_stream(
    State(state): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((db, coll, name)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let key = StreamKey::new(&db, &coll, &name)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(format!(
                "the definition is larger than {} bytes (admin.body_limit)",
                state.config.admin.body_limit
            ))
        } else {
            ApiError::bad_request(rejection.body_text())
        }
    })?;
    let definition = parse_definition(&key, &headers, &body)?;
    if let Some(entry) = state.registry.get(&key)
        && entry.origin == Origin::Static
    {
        return Err(read_only(&key));
    }
    let put = state.store.put(&key, definition).await?;
    let entry = state.registry.get(&key).ok_or_else(|| {
        ApiError::conflict(format!("{key} was deleted while it was being stored"))
    })?;
    let mut view = view::stream(&entry, &state.registry.workers_of(&key), &state.clients);
    if entry.definition.decides_membership() {
        // Said when the definition is created, not only once a client starts a worker.
        let enable = entry.definition.source.enable_pre_images || state.config.enable_pre_images;
        let mongo = state.registry.mongo();
        if let PreImages::Off(warning) = check_pre_images(mongo, &key.db, &key.coll, enable).await {
            tracing::warn!(stream = %key, "{warning}");
            if !view.warnings.contains(&warning) {
                view.warnings.push(warning);
            }
        }
    }
    let body = Json(view);
    Ok(match put {
        Put::Created => {
            let location = format!("/_admin/streams/{}/{}/{}", key.db, key.coll, key.name);
            let mut response = (StatusCode::CREATED, body).into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
        Put::Replaced => (StatusCode::OK, body).into_response(),
    })
}

/// `DELETE /_admin/streams/{db}/{coll}/{name}`: its clients get `cancel` and are closed.
async fn delete_stream(
    State(state): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let key = existing_key(path)?;
    if let Some(entry) = state.registry.get(&key)
        && entry.origin == Origin::Static
    {
        return Err(read_only(&key));
    }
    if state.store.delete(&key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&key))
    }
}

/// `GET /_admin/openapi.json`.
async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Any other method on an admin route.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        "the admin API takes GET on /_admin/streams and GET, PUT or DELETE on \
         /_admin/streams/{db}/{coll}/{name}",
    )
}

/// The key of a stream that must already exist: a malformed name cannot, so it is a 404.
fn existing_key(
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<StreamKey, ApiError> {
    let Path((db, coll, name)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    StreamKey::new(&db, &coll, &name).map_err(|_| {
        ApiError::not_found(format!(
            "no stream is defined at /{db}/{coll}/_streams/{name}"
        ))
    })
}

fn not_found(key: &StreamKey) -> ApiError {
    ApiError::not_found(format!("no stream is defined at {key}"))
}

fn read_only(key: &StreamKey) -> ApiError {
    ApiError::conflict(format!(
        "{key} is defined in the configuration file and is read-only here; change it there"
    ))
}

/// Checks the body and turns it into a validated definition. Errors name the `field`.
fn parse_definition(
    key: &StreamKey,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<CompiledDefinition, ApiError> {
    let value = json_body(headers, body, "a stream definition")?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the body must be a JSON object: a stream definition such as \
             {\"pipeline\": [{\"$match\": {…}}]}",
        ));
    }
    // The view's own members are taken (read-only ones dropped) by serde; the rest is the
    // definition, deserialized on its own so that errors name their path.
    let body: StreamView<serde_json::Map<String, Value>> =
        serde_path_to_error::deserialize(value).map_err(member_error)?;
    for (member, given, expected) in [
        ("db", &body.db, &key.db),
        ("coll", &body.coll, &key.coll),
        ("name", &body.name, &key.name),
    ] {
        if given.as_ref().is_some_and(|given| given != expected) {
            return Err(field_error(
                member,
                format!("{member} must match the URL ({expected:?}) or be left out"),
            ));
        }
    }
    if body.definition.contains_key("pipeline") && body.definition.contains_key("stages") {
        return Err(field_error(
            "stages",
            "give the pipeline as pipeline or as its alias stages, not both",
        ));
    }
    let definition: StreamDefinition =
        serde_path_to_error::deserialize(Value::Object(body.definition)).map_err(member_error)?;
    Ok(definition.compile()?)
}

/// A member that does not deserialize: 400 naming it (serde's "unknown field" lists the
/// members a definition has).
fn member_error(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let field = error.path().to_string();
    let message = error
        .inner()
        .to_string()
        .replacen("unknown field", "unknown member", 1);
    field_error(&field, format!("{field}: {message}"))
}

fn field_error(field: &str, detail: impl Into<String>) -> ApiError {
    ApiError::bad_request(detail).with_extra(json!({ "field": field }))
}

/// A request body that must be JSON (`what` names it in the errors): 415 for another content
/// type, 400 for a body that does not parse.
pub(crate) fn json_body(headers: &HeaderMap, body: &[u8], what: &str) -> Result<Value, ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::unsupported_media_type(format!(
                "{what} is JSON: send Content-Type: application/json"
            )));
        }
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CompiledDefinition, ApiError> {
        let key = StreamKey::new("shop", "orders", "all").unwrap();
        parse_definition(&key, &HeaderMap::new(), body.as_bytes())
    }

    fn field(body: &str) -> String {
        let error = parse(body).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST, "{}", error.detail);
        error.extra.unwrap()["field"].as_str().unwrap().to_owned()
    }

    #[test]
    fn openapi_document_is_json() {
        let document: Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    }

    #[test]
    fn accepts_definitions_and_ignores_view_members() {
        assert!(parse("{}").is_ok());
        assert!(parse(r#"{"stages": [{"$match": {"x": 1}}]}"#).is_ok());
        let echoed = r#"{"db":"shop","coll":"orders","name":"all","pipeline":[],
            "origin":"stored","readOnly":false,"revision":3,"variables":[],"stats":{}}"#;
        assert!(parse(echoed).is_ok());
    }

    #[test]
    fn names_the_offending_member() {
        assert_eq!(field(r#"{"pipelin": []}"#), "pipelin");
        assert_eq!(field(r#"{"fullDocument": "yes"}"#), "fullDocument");
        assert_eq!(field(r#"{"description": 3}"#), "description");
        assert_eq!(field(r#"{"pipeline": [], "stages": []}"#), "stages");
        assert_eq!(field(r#"{"name": "other"}"#), "name");
        assert_eq!(
            field(r#"{"pipeline": [{"$out": "x"}]}"#),
            "pipeline[0].$out"
        );
    }

    #[test]
    fn accepts_every_definition_member_including_match() {
        let compiled = parse(
            r#"{"pipeline": [], "fullDocument": "required", "fullDocumentBeforeChange": "off",
                "description": "d", "match": {"fullDocument.tenantId": {"$claim": "tenant"}}}"#,
        )
        .unwrap();
        assert_eq!(
            compiled.source.match_rules,
            Some(serde_json::json!({"fullDocument.tenantId": {"$claim": "tenant"}}))
        );
        assert_eq!(field(r#"{"match": [1]}"#), "match");
    }

    #[test]
    fn a_view_put_back_is_the_same_definition() {
        let key = StreamKey::new("shop", "orders", "all").unwrap();
        let definition = StreamDefinition {
            pipeline: serde_json::json!([{"$match": {"x": {"$var": "x"}}}]),
            description: Some("d".into()),
            match_rules: Some(serde_json::json!({"fullDocument.t": {"$claim": "t"}})),
            ..StreamDefinition::default()
        };
        let view = StreamView {
            db: Some(key.db.clone()),
            coll: Some(key.coll.clone()),
            name: Some(key.name.clone()),
            path: key.to_string(),
            definition: definition.clone(),
            origin: "stored",
            read_only: false,
            revision: 4,
            variables: vec!["x".into()],
            stats: serde_json::json!({"state": "idle", "workers": []}),
            warnings: vec!["read-only".into()],
        };
        let body = serde_json::to_vec(&view).unwrap();
        let parsed = parse_definition(&key, &HeaderMap::new(), &body).unwrap();
        assert_eq!(parsed.source, definition);
    }

    #[test]
    fn refuses_non_objects_and_bad_json() {
        assert!(parse("[]").unwrap_err().detail.contains("JSON object"));
        assert!(parse("{").unwrap_err().detail.contains("not valid JSON"));
        let key = StreamKey::new("a", "b", "c").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let error = parse_definition(&key, &headers, b"{}").unwrap_err();
        assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(parse_definition(&key, &headers, b"{}").is_ok());
    }
}
