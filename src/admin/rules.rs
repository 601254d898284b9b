//! `/_admin/rules`: permission rules that change live (docs/security.md, "Rules that change
//! live").
//!
//! | route | result |
//! |---|---|
//! | `GET /_admin/rules` | 200 `{"rules": [rule…]}`: the config's (read-only) and the stored ones |
//! | `GET /_admin/rules/{name}` | 200 rule · 404 |
//! | `PUT /_admin/rules/{name}` | 201 created · 200 replaced · 400 naming the member · 409 a config rule |
//! | `DELETE /_admin/rules/{name}` | 204 · 404 · 409 a config rule |
//!
//! A rule is `{"name", "roles", "streams", "origin", "readOnly"}`; a PUT body needs `roles` and
//! `streams` (the other members may be echoed back and are ignored; `name` must match the
//! URL). Config rules are named `config[N]` (their index), a name a stored rule cannot take.
//! Writes go through [`RuleStore`](crate::auth::store::RuleStore): stored in MongoDB, in force
//! here at once and on every other instance within a second; a stream whose right a change
//! withdraws ends with `cancel`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::store::{PutRule, StoredRule, valid_name};
use crate::http::AppState;
use crate::http::error::ApiError;

/// A rule as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RuleView {
    name: String,
    roles: Vec<String>,
    streams: Vec<String>,
    /// `config` or `stored`.
    origin: &'static str,
    read_only: bool,
}

/// A PUT body: the rule, plus the view's members (ignored, so a GET can be PUT back).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleBody {
    name: Option<String>,
    roles: Vec<String>,
    streams: Vec<String>,
    #[serde(default, rename = "origin")]
    _origin: Option<Value>,
    #[serde(default, rename = "readOnly")]
    _read_only: Option<Value>,
}

/// The rules routes (merged into the admin router).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_admin/rules", get(list).fallback(method_not_allowed))
        .route(
            "/_admin/rules/{name}",
            get(get_rule)
                .put(put_rule)
                .delete(delete_rule)
                .fallback(method_not_allowed),
        )
}

fn config_rules(state: &AppState) -> Vec<RuleView> {
    state
        .config
        .auth
        .rules
        .iter()
        .enumerate()
        .map(|(index, rule)| RuleView {
            name: format!("config[{index}]"),
            roles: rule.roles.clone(),
            streams: rule.streams.clone(),
            origin: "config",
            read_only: true,
        })
        .collect()
}

fn stored_view(name: String, rule: StoredRule) -> RuleView {
    RuleView {
        name,
        roles: rule.roles,
        streams: rule.streams,
        origin: "stored",
        read_only: false,
    }
}

fn unavailable(error: mongodb::error::Error) -> ApiError {
    tracing::warn!(%error, "rules store: MongoDB error");
    ApiError::unavailable("the rules store (MongoDB) is not reachable; retry shortly")
}

/// `GET /_admin/rules`.
async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut rules = config_rules(&state);
    let stored = state.rules.list().await.map_err(unavailable)?;
    rules.extend(
        stored
            .into_iter()
            .map(|(name, rule)| stored_view(name, rule)),
    );
    Ok(Json(json!({ "rules": rules })))
}

/// The name in the path; a config rule's name is read-only (409), any other invalid one 404s
/// on reads and 400s on writes.
fn name_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(name)
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("no rule is named {name:?}"))
}

fn read_only(name: &str) -> ApiError {
    ApiError::conflict(format!(
        "{name} is a rule of the configuration file and is read-only here; change it there"
    ))
}

/// `GET /_admin/rules/{name}`.
async fn get_rule(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RuleView>, ApiError> {
    let name = name_of(path)?;
    if let Some(rule) = config_rules(&state).into_iter().find(|r| r.name == name) {
        return Ok(Json(rule));
    }
    if !valid_name(&name) {
        return Err(not_found(&name));
    }
    match state.rules.get(&name).await.map_err(unavailable)? {
        Some(rule) => Ok(Json(stored_view(name, rule))),
        None => Err(not_found(&name)),
    }
}

/// `PUT /_admin/rules/{name}`.
async fn put_rule(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let name = name_of(path)?;
    if config_rules(&state).iter().any(|r| r.name == name) {
        return Err(read_only(&name));
    }
    if !valid_name(&name) {
        return Err(field_error(
            "name",
            format!("rule name {name:?}: use 1 to 64 of A-Z a-z 0-9 _ . -"),
        ));
    }
    let body = body.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let rule = parse_body(&name, &headers, &body)?;
    let put = state.rules.put(&name, &rule).await.map_err(unavailable)?;
    let view = Json(stored_view(name.clone(), rule));
    Ok(match put {
        PutRule::Created => {
            let mut response = (StatusCode::CREATED, view).into_response();
            if let Ok(location) = HeaderValue::from_str(&format!("/_admin/rules/{name}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        PutRule::Replaced => (StatusCode::OK, view).into_response(),
    })
}

/// `DELETE /_admin/rules/{name}`: streams it alone granted end with `cancel`.
async fn delete_rule(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let name = name_of(path)?;
    if config_rules(&state).iter().any(|r| r.name == name) {
        return Err(read_only(&name));
    }
    if !valid_name(&name) {
        return Err(not_found(&name));
    }
    if state.rules.delete(&name).await.map_err(unavailable)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&name))
    }
}

fn parse_body(name: &str, headers: &HeaderMap, body: &[u8]) -> Result<StoredRule, ApiError> {
    let value = super::json_body(headers, body, "a rule")?;
    let body: RuleBody = serde_path_to_error::deserialize(value).map_err(|error| {
        let field = error.path().to_string();
        let message = error.inner().to_string();
        let field = if field == "." {
            // A missing member: serde names it in the message.
            ["roles", "streams"]
                .into_iter()
                .find(|m| message.contains(&format!("`{m}`")))
                .unwrap_or(".")
                .to_owned()
        } else {
            field
        };
        field_error(&field, format!("{field}: {message}"))
    })?;
    if body.name.as_deref().is_some_and(|given| given != name) {
        return Err(field_error(
            "name",
            format!("name must match the URL ({name:?}) or be left out"),
        ));
    }
    let rule = StoredRule {
        roles: body.roles,
        streams: body.streams,
    };
    rule.validate()
        .map_err(|(field, message)| field_error(field, message))?;
    Ok(rule)
}

fn field_error(field: &str, detail: impl Into<String>) -> ApiError {
    ApiError::bad_request(detail).with_extra(json!({ "field": field }))
}

/// Any other method on a rules route.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        "the rules API takes GET on /_admin/rules and GET, PUT or DELETE on \
         /_admin/rules/{name}",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(body: &str) -> String {
        let error = parse_body("r", &HeaderMap::new(), body.as_bytes()).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST, "{}", error.detail);
        error.extra.unwrap()["field"].as_str().unwrap().to_owned()
    }

    #[test]
    fn bodies_are_checked_and_views_can_be_put_back() {
        let ok = r#"{"roles":["r"],"streams":["/a/b/_streams/*"]}"#;
        assert_eq!(
            parse_body("r", &HeaderMap::new(), ok.as_bytes())
                .unwrap()
                .roles,
            ["r"]
        );
        let echoed = r#"{"name":"r","roles":["r"],"streams":["/a/b/_streams/*"],
                         "origin":"stored","readOnly":false}"#;
        assert!(parse_body("r", &HeaderMap::new(), echoed.as_bytes()).is_ok());
        assert_eq!(field(r#"{"streams":["/a/b/_streams/*"]}"#), "roles");
        assert_eq!(field(r#"{"roles":["r"]}"#), "streams");
        assert_eq!(field(r#"{"roles":["r"],"streams":["/a/b"]}"#), "streams");
        assert_eq!(field(r#"{"roles":"r","streams":[]}"#), "roles");
        assert_eq!(
            field(r#"{"roles":["r"],"streams":["/a/b/_streams/x"],"x":1}"#),
            "x"
        );
        assert_eq!(
            field(r#"{"name":"other","roles":["r"],"streams":["/a/b/_streams/x"]}"#),
            "name"
        );
    }
}
