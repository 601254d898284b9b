//! Options every subscription takes, single- or multi-stream (PROTOCOL.md §8, after Ably's SSE
//! API): `rewind=N`, `heartbeats=true`, `enveloped=false`, `operationType=…`, `info=false`;
//! and the frames they add (`info`, `heartbeat`).
//!
//! `operationType` is applied per client after the stream's pipeline, on the shared worker's
//! events: it can only drop events the definition lets through, never add any (narrowing, not
//! widening), and it costs one string comparison per event.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::negotiate::Transport;
use crate::event::{Event, EventKind};
use crate::http::error::ApiError;

/// Largest `rewind`: the default ring size (what a worker can hold in memory at most).
pub const MAX_REWIND: usize = 10_000;

/// The change-event `operationType` values MongoDB produces (expanded events included).
const OPERATION_TYPES: &[&str] = &[
    "insert",
    "update",
    "replace",
    "delete",
    "drop",
    "rename",
    "dropDatabase",
    "invalidate",
    "create",
    "createIndexes",
    "dropIndexes",
    "modify",
    "shardCollection",
    "refineCollectionShardKey",
    "reshardCollection",
];

/// The options as they arrive in the query string (validated by [`Options::parse`]).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawOptions {
    /// `rewind=N`: start with the last N events (ignored when resuming).
    pub rewind: Option<String>,
    /// `heartbeats=true`: an explicit `heartbeat` event instead of a comment / empty line.
    pub heartbeats: Option<String>,
    /// `enveloped=false`: NDJSON / WebSocket changes as the bare change document.
    pub enveloped: Option<String>,
    /// `operationType=insert,update`: only changes of these types.
    #[serde(rename = "operationType")]
    pub operation_type: Option<String>,
    /// `info=false`: no `info` event on connect.
    pub info: Option<String>,
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events to replay on a fresh (not resumed) subscription.
    pub rewind: usize,
    /// `heartbeat` events instead of comments / empty lines / pings.
    pub heartbeats: bool,
    /// Whether NDJSON / WebSocket changes are wrapped in the envelope.
    pub enveloped: bool,
    /// Only these operation types, when given.
    pub narrowing: Option<Arc<Narrowing>>,
    /// Whether to send `info` on connect.
    pub info: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rewind: 0,
            heartbeats: false,
            enveloped: true,
            narrowing: None,
            info: true,
        }
    }
}

impl Options {
    /// Validates the raw options: a bad value is a 400 naming the parameter.
    pub fn parse(raw: &RawOptions) -> Result<Options, ApiError> {
        let mut options = Options::default();
        if let Some(rewind) = raw.rewind.as_deref() {
            options.rewind = rewind
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_REWIND)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "rewind must be a number of events from 0 to {MAX_REWIND}"
                    ))
                })?;
        }
        options.heartbeats = flag("heartbeats", raw.heartbeats.as_deref(), false)?;
        options.enveloped = flag("enveloped", raw.enveloped.as_deref(), true)?;
        options.info = flag("info", raw.info.as_deref(), true)?;
        if let Some(types) = raw.operation_type.as_deref() {
            options.narrowing = Some(Arc::new(Narrowing::parse(types)?));
        }
        Ok(options)
    }

    /// Whether `event` goes to this client (the `operationType` narrowing).
    pub fn keeps(&self, event: &Event) -> bool {
        self.narrowing.as_ref().is_none_or(|n| n.keeps(event))
    }

    /// What this client's idle periods look like on `transport`, when `heartbeats=true`.
    pub fn heartbeat(&self, transport: Transport) -> Option<Bytes> {
        self.heartbeats.then(|| match transport {
            Transport::Sse => Bytes::from_static(b"event: heartbeat\ndata: {}\n\n"),
            Transport::Ndjson => Bytes::from_static(b"{\"event\":\"heartbeat\"}\n"),
            Transport::WebSocket => Bytes::from_static(b"{\"event\":\"heartbeat\"}"),
        })
    }
}

fn flag(name: &str, value: Option<&str>, default: bool) -> Result<bool, ApiError> {
    match value.map(str::trim) {
        None => Ok(default),
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!(
            "{name} must be true or false (got {other:?})"
        ))),
    }
}

/// `operationType=…`: the change types a client wants.
#[derive(Debug)]
pub struct Narrowing {
    types: Vec<Box<str>>,
}

impl Narrowing {
    /// Parses a comma-separated list of known operation types.
    pub fn parse(list: &str) -> Result<Narrowing, ApiError> {
        let mut types: Vec<Box<str>> = Vec::new();
        for name in list.split(',').map(str::trim) {
            if !OPERATION_TYPES.contains(&name) {
                return Err(ApiError::bad_request(format!(
                    "operationType: {name:?} is not a change event type (one of {})",
                    OPERATION_TYPES.join(", ")
                )));
            }
            if !types.iter().any(|t| &**t == name) {
                types.push(name.into());
            }
        }
        Ok(Narrowing { types })
    }

    /// Changes of the listed types pass; control events (errors, `cancel`, …) always do.
    pub fn keeps(&self, event: &Event) -> bool {
        match event.kind {
            EventKind::Change => event
                .operation_type
                .as_deref()
                .is_some_and(|op| self.types.iter().any(|t| &**t == op)),
            _ => true,
        }
    }
}

/// One `info` (or other named) frame for `transport`: SSE `event:` block with an optional
/// `id:` line, or the `{"event","id","data"}` envelope (plus `\n` for NDJSON). `data` is JSON.
pub fn named_frame(transport: Transport, name: &str, id: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + name.len() + 48);
    match transport {
        Transport::Sse => {
            if let Some(id) = id {
                out.push_str("id: ");
                out.push_str(id);
                out.push('\n');
            }
            out.push_str("event: ");
            out.push_str(name);
            out.push_str("\ndata: ");
            out.push_str(data);
            out.push_str("\n\n");
        }
        Transport::Ndjson | Transport::WebSocket => {
            out.push_str("{\"event\":\"");
            out.push_str(name);
            out.push('"');
            if let Some(id) = id {
                out.push_str(",\"id\":\"");
                out.push_str(id);
                out.push('"');
            }
            out.push_str(",\"data\":");
            out.push_str(data);
            out.push('}');
            if transport == Transport::Ndjson {
                out.push('\n');
            }
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> RawOptions {
        let mut raw = RawOptions::default();
        for (key, value) in pairs {
            let value = Some((*value).to_owned());
            match *key {
                "rewind" => raw.rewind = value,
                "heartbeats" => raw.heartbeats = value,
                "enveloped" => raw.enveloped = value,
                "info" => raw.info = value,
                "operationType" => raw.operation_type = value,
                other => panic!("unknown option {other}"),
            }
        }
        raw
    }

    #[test]
    fn defaults_and_values() {
        let options = Options::parse(&RawOptions::default()).unwrap();
        assert!(options.info && options.enveloped && !options.heartbeats);
        let options = Options::parse(&raw(&[
            ("rewind", "5"),
            ("heartbeats", "true"),
            ("enveloped", "false"),
            ("info", "false"),
            ("operationType", "insert,update"),
        ]))
        .unwrap();
        assert_eq!(options.rewind, 5);
        assert!(options.heartbeats && !options.enveloped && !options.info);
        assert!(options.narrowing.is_some());
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (key, value) in [
            ("rewind", "-1"),
            ("rewind", "100001"),
            ("heartbeats", "yes"),
            ("operationType", "insert,$where"),
        ] {
            let error = Options::parse(&raw(&[(key, value)])).unwrap_err();
            assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(error.detail.contains(key), "{key}: {}", error.detail);
        }
    }

    #[test]
    fn narrowing_keeps_listed_changes_and_every_control_event() {
        let narrowing = Narrowing::parse("insert").unwrap();
        let change = |op: &str| {
            Event::from_change(mongodb::bson::doc! {
                "_id": { "_data": "8265A1B2C3000000012B" }, "operationType": op,
            })
            .unwrap()
        };
        assert!(narrowing.keeps(&change("insert")));
        assert!(!narrowing.keeps(&change("update")));
        assert!(narrowing.keeps(&Event::control(EventKind::Cancel, "x", false)));
    }
}
