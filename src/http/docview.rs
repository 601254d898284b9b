//! The document view (PROTOCOL.md §7): `GET /{db}/{coll}/_streams/{name}.json` or
//! `?format=firebase`, SSE only, in the shape of Firebase and Lark REST streaming.
//!
//! ```text
//! event: put     data: {"path":"/","data":{"<id>":{…},…}}        first: every document
//! event: put     data: {"path":"/<id>","data":{…}}                insert, replace, entering
//! event: patch   data: {"path":"/<id>","data":{"a/b":1,"c":null}} update (multi-path update)
//! event: put     data: {"path":"/<id>","data":null}               delete, leaving the filter
//! event: keep-alive  data: null
//! ```
//!
//! Every block is one of Firebase's events (`put`, `patch`, `keep-alive`, `cancel`,
//! `auth_revoked`) with JSON `data`: its SDKs (firebase-admin, Pyrebase) JSON-decode every
//! block, so a comment line or a `retry:`-only block kills their listener. `retry:` therefore
//! rides on the first block; events Firebase has no name for become `cancel` (the stream ends)
//! or nothing (the connection closes and the client resumes with `Last-Event-ID`).
//!
//! The first `put` is built by `snapshot::Snapshots` (at cluster time T, bounded by
//! `snapshot_max_docs`); the changes after T come from the ordinary subscription and are
//! rewritten here, once per change for all view clients (cached in [`Event::view`]). Ids are the
//! changes' own, so `Last-Event-ID` resumes the view like any stream.

use std::sync::Arc;

use axum::response::Response;
use bytes::Bytes;
use mongodb::bson::Bson;
use serde_json::{Map, Value, json};

use super::body::{Encoding, streaming_response};
use super::feed::Feed;
use crate::event::{ErrorCode, Event, EventKind};
use crate::snapshot::id_text;

/// The `.json` suffix that asks for the view (stream names cannot contain dots).
pub const SUFFIX: &str = ".json";

/// The view's content type: the charset is explicit because Python's `requests` (under both
/// Firebase SDKs) decodes a `text/*` body without one as ISO-8859-1, garbling non-ASCII data.
pub const CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";

/// The SSE response for a document-view feed.
pub fn response(feed: Feed, retry_ms: u64) -> Response {
    let encoding = Encoding {
        // No blank line: the field joins the first block written (the first `put`, or a
        // keep-alive when resuming), never a block of its own.
        preamble: vec![Bytes::from(format!("retry: {retry_ms}\n"))],
        // Firebase sends keep-alive as an event, so clients can watch for it.
        keepalive: Bytes::from_static(b"event: keep-alive\ndata: null\n\n"),
        // On shutdown the connection just closes: the client reconnects after `retry` with
        // its last id, as after any dropped connection.
        goodbye: None,
        pick: |event| &event.sse,
        bare: false,
    };
    streaming_response(feed.with_view(view_of), encoding, CONTENT_TYPE)
}

/// An event as the view shows it: changes become `put`/`patch` (or nothing, for changes that
/// do not touch a document); other events as Firebase names them (see [`control_of`]).
pub fn view_of(event: &Arc<Event>) -> Option<Arc<Event>> {
    if event.kind != EventKind::Change {
        return control_of(event);
    }
    event
        .view
        .get_or_init(|| {
            let envelope: Value = serde_json::from_slice(&event.envelope()).ok()?;
            let (name, data) = change_to_view(&envelope["data"])?;
            Some(Arc::new(Event::view(
                name,
                event.id.clone(),
                &data.to_string(),
            )))
        })
        .clone()
}

/// A non-change event in Firebase's vocabulary. `put` (the first), `cancel` and `auth_revoked`
/// are Firebase's own; an `invalidate` (collection dropped or renamed) and the errors a
/// reconnect cannot cure (`history_lost`, `upstream_error`) end the stream as `cancel` with
/// their `{code,message}`; `shutdown` and `slow_consumer` send nothing, since the connection
/// closes and the client's reconnect with its last id is the cure; `skipped` (a change over
/// 16 MB) has no `put`/`patch` form and is dropped.
fn control_of(event: &Arc<Event>) -> Option<Arc<Event>> {
    match event.kind {
        EventKind::View | EventKind::Cancel | EventKind::AuthRevoked => Some(Arc::clone(event)),
        EventKind::Invalidate => Some(cancel(&json!({
            "code": "invalidate",
            "message": "the collection was dropped or renamed",
        }))),
        EventKind::Error(ErrorCode::HistoryLost | ErrorCode::Upstream) => {
            let data: Value = serde_json::from_slice(&event.data()).unwrap_or(Value::Null);
            Some(cancel(&data))
        }
        EventKind::Error(ErrorCode::Shutdown | ErrorCode::SlowConsumer)
        | EventKind::Skipped
        | EventKind::Snapshot
        | EventKind::Ready
        | EventKind::Change => None,
    }
}

/// A `cancel` block with `data` (no id: a resume after it would only be refused again).
fn cancel(data: &Value) -> Arc<Event> {
    Arc::new(Event::view("cancel", None, &data.to_string()))
}

/// `(event name, data)` for a change event's JSON, `None` when it is not about one document
/// the view can place (no `documentKey._id`, a drop, …).
fn change_to_view(change: &Value) -> Option<(&'static str, Value)> {
    let id = Bson::try_from(change.get("documentKey")?.get("_id")?.clone()).ok()?;
    let path = format!("/{}", id_text(&id));
    let full = change.get("fullDocument").filter(|d| d.is_object());
    // Membership (PROTOCOL.md §10): a document leaving the filter is gone from the view, one
    // entering it arrives whole (never as a patch on a document the view does not have).
    match change
        .pointer("/streamgate/membership")
        .and_then(Value::as_str)
    {
        Some("left") => return Some(("put", json!({ "path": path, "data": null }))),
        Some("entered") => return Some(("put", json!({ "path": path, "data": full? }))),
        _ => {}
    }
    match change.get("operationType")?.as_str()? {
        "insert" | "replace" => Some(("put", json!({ "path": path, "data": full? }))),
        "delete" => Some(("put", json!({ "path": path, "data": null }))),
        "update" => match change.get("updateDescription") {
            Some(description) => Some((
                "patch",
                json!({ "path": path, "data": patch(description, full) }),
            )),
            // A pipeline removed the delta: the whole document, if it kept that.
            None => Some(("put", json!({ "path": path, "data": full? }))),
        },
        _ => None,
    }
}

/// Firebase's multi-path update for an `updateDescription`: each updated field at its child
/// path (`a.b` → `a/b`), removed fields `null`, a truncated array whole (from the post-image;
/// keys inside it dropped, since Firebase refuses a path under another one of the same update).
fn patch(description: &Value, full: Option<&Value>) -> Value {
    let mut data = Map::new();
    if let Some(Value::Object(updated)) = description.get("updatedFields") {
        for (field, value) in updated {
            data.insert(field.replace('.', "/"), value.clone());
        }
    }
    if let Some(Value::Array(removed)) = description.get("removedFields") {
        for field in removed.iter().filter_map(Value::as_str) {
            data.insert(field.replace('.', "/"), Value::Null);
        }
    }
    if let Some(Value::Array(truncated)) = description.get("truncatedArrays") {
        for field in truncated
            .iter()
            .filter_map(|t| t.get("field").and_then(Value::as_str))
        {
            let Some(array) = full.and_then(|d| lookup(d, field)) else {
                continue;
            };
            let key = field.replace('.', "/");
            let inner = format!("{key}/");
            data.retain(|k, _| !k.starts_with(&inner));
            data.insert(key, array.clone());
        }
    }
    Value::Object(data)
}

/// The value at a dotted path of a JSON document (array indexes as numbers).
fn lookup<'a>(document: &'a Value, path: &str) -> Option<&'a Value> {
    crate::path::walk(document, path.split('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_become_puts_and_patches() {
        let oid = "65a1b2c3d4e5f60718293a4b";
        let insert = json!({"operationType": "insert", "documentKey": {"_id": {"$oid": oid}},
            "fullDocument": {"_id": {"$oid": oid}, "n": 1}});
        assert_eq!(
            change_to_view(&insert),
            Some((
                "put",
                json!({"path": format!("/{oid}"), "data": {"_id": {"$oid": oid}, "n": 1}})
            ))
        );
        let update = json!({"operationType": "update", "documentKey": {"_id": 7},
            "updateDescription": {
                "updatedFields": {"score": 300, "f.g": 3, "arr.1": 9},
                "removedFields": ["gone"],
                "truncatedArrays": [{"field": "arr", "newSize": 2}]},
            "fullDocument": {"_id": 7, "arr": [1, 9], "f": {"g": 3}, "score": 300}});
        assert_eq!(
            change_to_view(&update),
            Some((
                "patch",
                json!({"path": "/7", "data": {"score": 300, "f/g": 3, "gone": null, "arr": [1, 9]}})
            ))
        );
        let delete = json!({"operationType": "delete", "documentKey": {"_id": "k"}});
        assert_eq!(
            change_to_view(&delete),
            Some(("put", json!({"path": "/k", "data": null})))
        );
        assert_eq!(change_to_view(&json!({"operationType": "drop"})), None);
    }

    /// The SSE block of what the view makes of `event`, if anything.
    fn block(event: Event) -> Option<String> {
        control_of(&Arc::new(event)).map(|e| String::from_utf8_lossy(&e.sse).into_owned())
    }

    #[test]
    fn other_events_take_firebase_names_or_are_dropped() {
        let revoked = Event::control(EventKind::AuthRevoked, "the access token expired", false);
        assert!(
            block(revoked)
                .unwrap()
                .starts_with("event: auth_revoked\ndata: {")
        );
        let lost = Event::control(EventKind::Error(ErrorCode::HistoryLost), "gone", true);
        assert_eq!(
            block(lost).as_deref(),
            Some("event: cancel\ndata: {\"code\":\"history_lost\",\"message\":\"gone\"}\n\n")
        );
        let invalidate = Event::from_change(mongodb::bson::doc! {
            "_id": {"_data": "8265A1B2C3000000012B0229296E04"},
            "operationType": "invalidate",
        })
        .unwrap();
        let cancelled = block(invalidate).unwrap();
        assert!(
            cancelled.starts_with("event: cancel\ndata: {"),
            "{cancelled}"
        );
        assert!(cancelled.contains("\"code\":\"invalidate\""), "{cancelled}");
        for dropped in [ErrorCode::Shutdown, ErrorCode::SlowConsumer] {
            let event = Event::control(EventKind::Error(dropped), "bye", false);
            assert_eq!(block(event), None);
        }
    }

    #[test]
    fn entries_are_puts_and_removals_are_null_puts() {
        let moved = |membership: &str| {
            json!({"operationType": "update", "documentKey": {"_id": 7},
                "updateDescription": {"updatedFields": {"t": "B"}, "removedFields": []},
                "fullDocument": {"_id": 7, "t": "B", "n": 1},
                "streamgate": {"membership": membership}})
        };
        assert_eq!(
            change_to_view(&moved("left")),
            Some(("put", json!({"path": "/7", "data": null})))
        );
        assert_eq!(
            change_to_view(&moved("entered")),
            Some((
                "put",
                json!({"path": "/7", "data": {"_id": 7, "t": "B", "n": 1}})
            ))
        );
    }
}
