//! Events as they travel from a worker to its clients.
//!
//! A change is encoded **once**, when the worker receives it: the SSE frame and the JSON
//! envelope (the NDJSON line; without its `\n`, the WebSocket text) are built here and then
//! shared (`Arc<Event>`, `Bytes` clones) by every client of the worker. No transport does
//! per-client JSON work for a change. Nothing here knows a transport's types or codes: the
//! encodings are plain UTF-8 `Bytes`, and `http/` frames them (WebSocket close codes live in
//! `http/ws.rs`).
//!
//! Event ids are MongoDB resume tokens (`_data` hex strings). Their byte order is the oplog order,
//! so [`Token`] compares them as strings to decide "before/after" during resume hand-overs.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use mongodb::bson::{Bson, Document, Timestamp, doc};
use mongodb::change_stream::event::ResumeToken;
use serde_json::json;

/// Largest id we accept from a client; real tokens are a few hundred hex digits at most.
const MAX_TOKEN_LEN: usize = 4096;

/// A MongoDB resume token's `_data` string, normalised to upper-case hex.
///
/// Ordering is the oplog order: resume tokens are KeyString encodings whose byte order is
/// the order of the changes, and upper-case hex preserves byte order.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(Arc<str>);

/// Why a client-supplied resume id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not hex, odd length, empty or too long.
    #[error("event id is not a MongoDB resume token (expected an even-length hex string)")]
    NotHex,
    /// Hex, but not the KeyString encoding of a resume token (which starts with a timestamp).
    #[error("event id is not a MongoDB resume token (it does not start with a cluster time)")]
    NotResumeToken,
    /// JSON given, but not `{"_data": "…"}`.
    #[error("event id JSON must be {{\"_data\": \"<hex>\"}}")]
    BadJson,
}

impl Token {
    /// Parses a client-supplied id: the bare `_data` string, or RESTHeart's `{"_data":"…"}`.
    pub fn parse(input: &str) -> Result<Token, TokenError> {
        let input = input.trim();
        let data = if input.starts_with('{') {
            let value: serde_json::Value =
                serde_json::from_str(input).map_err(|_| TokenError::BadJson)?;
            value
                .get("_data")
                .and_then(|v| v.as_str())
                .ok_or(TokenError::BadJson)?
                .to_owned()
        } else {
            input.to_owned()
        };
        if data.is_empty()
            || data.len() > MAX_TOKEN_LEN
            || data.len() % 2 != 0
            || !data.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(TokenError::NotHex);
        }
        // KeyString type byte 130 (0x82) = Timestamp: every resume token starts with the
        // cluster time of its change, followed by 8 bytes of it.
        if data.len() < 18 || !data[..2].eq_ignore_ascii_case("82") {
            return Err(TokenError::NotResumeToken);
        }
        Ok(Token(Arc::from(data.to_ascii_uppercase())))
    }

    /// Reads the `_data` string out of a change event's `_id` (or a post-batch token).
    pub fn from_resume_document(id: &Document) -> Option<Token> {
        id.get_str("_data")
            .ok()
            .map(|s| Token(Arc::from(s.to_ascii_uppercase())))
    }

    /// Reads the token out of the driver's opaque [`ResumeToken`].
    pub fn from_driver(token: &ResumeToken) -> Option<Token> {
        match mongodb::bson::to_bson(token).ok()? {
            Bson::Document(doc) => Token::from_resume_document(&doc),
            _ => None,
        }
    }

    /// The driver's [`ResumeToken`] for `resumeAfter`.
    pub fn to_driver(&self) -> Option<ResumeToken> {
        mongodb::bson::from_document(doc! { "_data": self.as_str() }).ok()
    }

    /// The `_data` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The position "after every change at cluster time `at`": `82`, the 8-byte timestamp
    /// (KeyString encodes a Timestamp big-endian, so hex order is time order), then `FF`.
    /// Every real token of a change at `at` continues the same prefix with a KeyString type
    /// byte (at most `F0`), so it sorts before this one; every change after `at` has a greater
    /// timestamp, so it sorts after. It is not a token MongoDB can resume from: a cursor opened
    /// from it uses `startAtOperationTime` just after `at` (see [`Token::start_at`]).
    pub fn after_cluster_time(at: Timestamp) -> Token {
        let ts = (u64::from(at.time) << 32) | u64::from(at.increment);
        Token(Arc::from(format!("82{ts:016X}FF")))
    }

    /// The position "before every change at cluster time `at`" (after every earlier one): a
    /// cursor opened at `at` covers everything after it.
    pub fn before_cluster_time(at: Timestamp) -> Token {
        let earlier = match at.increment.checked_sub(1) {
            Some(increment) => Timestamp {
                time: at.time,
                increment,
            },
            None => Timestamp {
                time: at.time.saturating_sub(1),
                increment: u32::MAX,
            },
        };
        Token::after_cluster_time(earlier)
    }

    /// The cluster time a token starts with (every resume token's first element).
    pub fn cluster_time(&self) -> Option<Timestamp> {
        let ts = u64::from_str_radix(self.0.get(2..18)?, 16).ok()?;
        Some(Timestamp {
            time: (ts >> 32) as u32,
            increment: ts as u32,
        })
    }

    /// For a synthetic position ([`Token::after_cluster_time`], [`Token::after_place`]): the
    /// `startAtOperationTime` that opens a change stream at the first change that can follow
    /// it. `None` for real resume tokens (they end with KeyString's end byte `04`, never `FF`),
    /// which MongoDB resumes after itself.
    ///
    /// After every change at T (`82`+T+`FF`): just after T. After one change at T
    /// (`82`+T+fields+`FF`): at T itself, every change at T included; the consumer skips those
    /// at or before the position by token order (the catch-up's ring is read "after" it), so
    /// the changes at T that follow it (later operations of the same transaction) are kept.
    pub fn start_at(&self) -> Option<Timestamp> {
        if self.0.len() < 20 || !self.0.ends_with("FF") {
            return None;
        }
        let at = self.cluster_time()?;
        if self.0.len() > 20 {
            return Some(at);
        }
        Some(match at.increment.checked_add(1) {
            Some(increment) => Timestamp {
                time: at.time,
                increment,
            },
            None => Timestamp {
                time: at.time.saturating_add(1),
                increment: 0,
            },
        })
    }

    /// What places this position in the oplog (see [`Place`]); `None` for ids that are not
    /// oplog positions in a form we can rebuild exactly (snapshot ids, older token formats).
    pub fn place(&self) -> Option<Place> {
        let hex = self.as_str();
        // KeyString of `{clusterTime, version, tokenType, txnOpIndex, fromInvalidate, …}`: the
        // fields we read fit in the first 38 bytes (9 + 3 × at most 9 + 1 + 1 for `FF`).
        let head = hex.get(..hex.len().min(2 * PLACE_MAX_BYTES))?;
        let bytes = hex::decode(head).ok()?;
        let at = self.cluster_time()?;
        let rest = bytes.get(9..)?;
        if rest == [0xFF] && hex.len() == 20 {
            return Some(Place { at, fields: None });
        }
        let mut at_byte = 0;
        let mut int = || -> Option<u64> {
            let (value, used) = keystring::read_uint(rest.get(at_byte..)?)?;
            at_byte += used;
            Some(value)
        };
        let version = int()?;
        let token_type = int()?;
        let txn_op_index = int()?;
        let from_invalidate = match *rest.get(at_byte)? {
            keystring::FALSE => false,
            keystring::TRUE => true,
            _ => return None,
        };
        let place = Place {
            at,
            fields: Some(PlaceFields {
                version,
                token_type,
                txn_op_index,
                from_invalidate,
            }),
        };
        // Rebuilt exactly (canonical encodings only), so the rebuilt position sorts exactly
        // where this token does relative to every other token.
        let rebuilt = Token::after_place(&place);
        let prefix = &rebuilt.as_str()[..rebuilt.as_str().len() - 2];
        hex.starts_with(prefix).then_some(place)
    }

    /// The position "after the change (or high-water mark) at `place`": its token's leading
    /// fields followed by `FF`, which sorts after every token that starts with those fields
    /// (the change's own, whatever follows them: collection UUID, document key, fragment)
    /// and before every token with greater fields: the next operation of a transaction, the
    /// `invalidate` the change caused, the next cluster time. Not a token MongoDB resumes
    /// from: a cursor opens at its cluster time ([`Token::start_at`]) and the consumer
    /// skips by order.
    pub fn after_place(place: &Place) -> Token {
        let Some(fields) = &place.fields else {
            return Token::after_cluster_time(place.at);
        };
        let ts = (u64::from(place.at.time) << 32) | u64::from(place.at.increment);
        let mut hex = format!("82{ts:016X}");
        for value in [fields.version, fields.token_type, fields.txn_op_index] {
            keystring::write_uint(&mut hex, value);
        }
        hex.push_str(if fields.from_invalidate { "6F" } else { "6E" });
        hex.push_str("FF");
        Token(Arc::from(hex))
    }
}

/// Longest KeyString prefix [`Token::place`] reads, in bytes.
const PLACE_MAX_BYTES: usize = 9 + 3 * 9 + 1 + 1;

/// Where a position stands in the oplog: what a resume token says before the collection and
/// document it names. In a replica set, cluster time and `txnOpIndex` (the operation's index
/// within its transaction, 0 outside one) identify one change; the other fields tell a
/// change from a high-water mark at the same time, and a change from the `invalidate` it
/// caused. A position rebuilt from a place ([`Token::after_place`]) is equivalent to the
/// token it came from for every order comparison with real tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The cluster time.
    pub at: Timestamp,
    /// `None`: after every change at `at` ([`Token::after_cluster_time`]).
    pub fields: Option<PlaceFields>,
}

/// The resume token fields after the cluster time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaceFields {
    /// The token format version (1 or 2 for MongoDB 4.2 to 8.0).
    pub version: u64,
    /// 128: a change; 0: a high-water mark (a post-batch token).
    pub token_type: u64,
    /// The operation's index within its transaction.
    pub txn_op_index: u64,
    /// Whether this is the `invalidate` caused by the change at this place.
    pub from_invalidate: bool,
}

impl PlaceFields {
    /// `tokenType` of a change event.
    pub const EVENT: u64 = 128;
    /// `tokenType` of a high-water mark.
    pub const HIGH_WATER_MARK: u64 = 0;
}

/// The few KeyString forms a resume token's leading fields take.
mod keystring {
    use std::fmt::Write as _;

    /// Numeric zero.
    const ZERO: u8 = 0x29;
    /// A positive integer in 1 byte; `+n-1` for n bytes (the value shifted left by one, the
    /// low bit saying whether a fraction follows).
    const POSITIVE_1_BYTE: u8 = 0x2B;
    const POSITIVE_8_BYTES: u8 = 0x32;
    pub const FALSE: u8 = 0x6E;
    pub const TRUE: u8 = 0x6F;

    /// A non-negative integer without fraction: its value and the bytes it took.
    pub fn read_uint(bytes: &[u8]) -> Option<(u64, usize)> {
        match *bytes.first()? {
            ZERO => Some((0, 1)),
            kind @ POSITIVE_1_BYTE..=POSITIVE_8_BYTES => {
                let n = usize::from(kind - POSITIVE_1_BYTE) + 1;
                let raw = bytes
                    .get(1..=n)?
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                // A fraction follows: not the integer a token field is.
                if raw & 1 == 1 {
                    return None;
                }
                Some((raw >> 1, n + 1))
            }
            _ => None,
        }
    }

    /// Appends the canonical (shortest) encoding of `value` as upper-case hex.
    pub fn write_uint(hex: &mut String, value: u64) {
        if value == 0 {
            hex.push_str("29");
            return;
        }
        // Values past 2^63 cannot be shifted; no token field comes near.
        let raw = value.saturating_mul(2);
        let n = (8 - raw.leading_zeros() as usize / 8).max(1);
        let _ = write!(hex, "{:02X}", POSITIVE_1_BYTE + (n as u8 - 1));
        for i in (0..n).rev() {
            let _ = write!(hex, "{:02X}", (raw >> (8 * i)) as u8);
        }
    }
}

impl Ord for Token {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.as_bytes().cmp(other.0.as_bytes())
    }
}

impl PartialOrd for Token {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", &self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an event means to a client; everything but `Change` ends the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A change document; carries an id.
    Change,
    /// A change that cannot be delivered (over MongoDB's 16 MB limit on a server that cannot
    /// split it); carries that change's id, so resuming after it goes on. Not terminal.
    Skipped,
    /// The collection was dropped or renamed; the stream ends.
    Invalidate,
    /// The stream was deleted or the client's access withdrawn; the stream ends.
    Cancel,
    /// The client's token expired; the stream ends.
    AuthRevoked,
    /// Something went wrong for this client (see [`ErrorCode`]); the stream ends.
    Error(ErrorCode),
    /// A current document of a `snapshot=true` stream (PROTOCOL.md §6). Not terminal.
    Snapshot,
    /// The snapshot is complete (`{"count":N}`); changes follow. Not terminal.
    Ready,
    /// A document-view event (`put` / `patch`, PROTOCOL.md §7), named by its own frame.
    View,
}

/// Codes carried by `error` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The client fell more than its queue bound behind; it may resume from its last id.
    SlowConsumer,
    /// The resume id is older than the oplog holds.
    HistoryLost,
    /// MongoDB refused the change stream in a way retrying cannot fix (bad pipeline, ...).
    Upstream,
    /// The server is shutting down.
    Shutdown,
}

impl ErrorCode {
    /// The wire name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::HistoryLost => "history_lost",
            ErrorCode::Upstream => "upstream_error",
            ErrorCode::Shutdown => "shutdown",
        }
    }
}

impl EventKind {
    /// The SSE `event:` name and the envelope's `event` field.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Change => "change",
            EventKind::Skipped => "skipped",
            EventKind::Invalidate => "invalidate",
            EventKind::Cancel => "cancel",
            EventKind::AuthRevoked => "auth_revoked",
            EventKind::Error(_) => "error",
            EventKind::Snapshot => "snapshot",
            EventKind::Ready => "ready",
            EventKind::View => "put",
        }
    }

    /// Whether the stream ends after this event.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            EventKind::Change
                | EventKind::Skipped
                | EventKind::Snapshot
                | EventKind::Ready
                | EventKind::View
        )
    }
}

/// One event, pre-encoded for every transport.
#[derive(Debug)]
pub struct Event {
    /// What the event means.
    pub kind: EventKind,
    /// The resume token (changes and invalidates); `None` for control events.
    pub id: Option<Token>,
    /// Complete SSE frame, blank line included.
    pub sse: Bytes,
    /// The JSON envelope `{"event","id","data"}` plus `\n`, for NDJSON; without the `\n`
    /// ([`Event::envelope`]) it is the WebSocket text. UTF-8 (built from a `String`).
    pub ndjson: Bytes,
    /// Unix ms of the change in MongoDB (its `wallTime`, else its cluster time's second): the
    /// start of the delivery-latency clock (`metrics::Metrics::delivery_latency`). 0 for
    /// events that are not changes.
    pub at_ms: u64,
    /// This change as the document view shows it (`put`/`patch`, PROTOCOL.md §7), made by
    /// the first document-view client that needs it and shared by the others; `None` inside
    /// when the change means nothing to the view.
    pub view: std::sync::OnceLock<Option<Arc<Event>>>,
    /// The change's `operationType` (changes only), for clients that narrow by it.
    pub operation_type: Option<Box<str>>,
    /// The id's place in the oplog ([`Token::place`]), read once for every multi-stream
    /// connection that puts it in its composite id (a fan-out asks for it once per client).
    place: std::sync::OnceLock<Option<Place>>,
    /// This event as the first multi-stream connection that sent it framed it (its
    /// composite id included), shared with every other connection in the same state: a
    /// fan-out frames it once, as a single-stream one does. Opaque here: the connection
    /// type (`http/multi`) says what makes two connections alike.
    pub shared_frame: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

/// A change document could not be turned into an event.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The change has no `_id._data` (a pipeline removed or replaced `_id`).
    #[error("change event has no resume token in _id (a pipeline stage removed or changed _id)")]
    MissingId,
}

impl Event {
    /// The id's place in the oplog ([`Token::place`]); `None` without an id or for a token
    /// that is not an oplog position. Read once, then shared by every reader of the event.
    pub fn place(&self) -> Option<Place> {
        *self
            .place
            .get_or_init(|| self.id.as_ref().and_then(Token::place))
    }

    /// Encodes a change document as returned by MongoDB (after the pipeline).
    ///
    /// `_id` becomes the event id and is removed from `data`; the rest is relaxed Extended JSON.
    /// `operationType: invalidate` becomes an `invalidate` event.
    pub fn from_change(mut change: Document) -> Result<Event, EncodeError> {
        let id = match change.remove("_id") {
            Some(Bson::Document(id)) => Token::from_resume_document(&id),
            _ => None,
        }
        .ok_or(EncodeError::MissingId)?;
        let operation_type = change.get_str("operationType").ok().map(Box::from);
        let kind = if operation_type.as_deref() == Some("invalidate") {
            EventKind::Invalidate
        } else {
            EventKind::Change
        };
        // `wallTime` (MongoDB 6.0+, ms) unless a pipeline projected it away; the token's
        // cluster time (whole seconds) always exists.
        let at_ms = match change.get_datetime("wallTime") {
            Ok(wall) => u64::try_from(wall.timestamp_millis()).unwrap_or(0),
            Err(_) => id.cluster_time().map_or(0, |t| u64::from(t.time) * 1000),
        };
        let data = Bson::Document(change).into_relaxed_extjson();
        let mut event = Event::encode(kind, Some(id), &data, false);
        event.at_ms = at_ms;
        event.operation_type = operation_type;
        Ok(event)
    }

    /// The JSON envelope `{"event","id","data"}` alone (the NDJSON line without its `\n`),
    /// sliced out of the pre-encoded line (no copy): the WebSocket text payload.
    pub fn envelope(&self) -> Bytes {
        self.ndjson.slice(..self.ndjson.len().saturating_sub(1))
    }

    /// The event's `data` JSON alone, sliced out of the pre-encoded envelope (no copy): what
    /// `enveloped=false` clients get, and what multi-stream envelopes splice in.
    pub fn data(&self) -> Bytes {
        // The envelope is `{"event":"<name>"[,"id":"<id>"],"data":<data>}\n` (see `encode`).
        let start = "{\"event\":\"".len()
            + self.kind.name().len()
            + 1
            + self
                .id
                .as_ref()
                .map_or(0, |id| ",\"id\":\"".len() + id.as_str().len() + 1)
            + ",\"data\":".len();
        let end = self.ndjson.len().saturating_sub(2);
        self.ndjson.slice(start.min(end)..end)
    }

    /// `event: skipped` for a change over 16 MB: `{"code":"event_too_large",…}` with the
    /// change's id and what identifies it (`operationType`, `documentKey`, `ns`).
    pub fn skipped(id: &Token, found: &Document) -> Event {
        let pick = |key: &str| {
            found
                .get(key)
                .cloned()
                .map_or(serde_json::Value::Null, Bson::into_relaxed_extjson)
        };
        let data = json!({
            "code": "event_too_large",
            "message": "this change is larger than MongoDB's 16 MB document limit and this MongoDB server cannot split it; it was skipped",
            "operationType": pick("operationType"),
            "documentKey": pick("documentKey"),
            "ns": pick("ns"),
        });
        Event::encode(EventKind::Skipped, Some(id.clone()), &data, false)
    }

    /// An event of `kind` with `data` (snapshot documents, `ready`).
    pub fn new(kind: EventKind, id: Option<Token>, data: &serde_json::Value) -> Event {
        Event::encode(kind, id, data, false)
    }

    /// A document-view event: SSE `event: <name>` with `data` already encoded as JSON text
    /// (the initial `put` is assembled from many documents without a tree in memory).
    pub fn view(name: &str, id: Option<Token>, data_json: &str) -> Event {
        let mut sse = String::with_capacity(data_json.len() + 128);
        if let Some(token) = &id {
            sse.push_str("id: ");
            sse.push_str(token.as_str());
            sse.push('\n');
        }
        sse.push_str("event: ");
        sse.push_str(name);
        sse.push_str("\ndata: ");
        sse.push_str(data_json);
        sse.push_str("\n\n");
        let envelope = format!(
            "{{\"event\":{},{}\"data\":{data_json}}}",
            serde_json::Value::from(name),
            id.as_ref()
                .map(|t| format!("\"id\":\"{t}\","))
                .unwrap_or_default()
        );
        Event {
            kind: EventKind::View,
            id,
            sse: Bytes::from(sse),
            ndjson: Bytes::from(envelope + "\n"),
            at_ms: 0,
            view: std::sync::OnceLock::new(),
            operation_type: None,
            place: std::sync::OnceLock::new(),
            shared_frame: std::sync::OnceLock::new(),
        }
    }

    /// A control event (`error`, `cancel`, `auth_revoked`, …) with a `{code,message}` body.
    ///
    /// `reset_id` adds an empty SSE `id:` line so a browser forgets its last id (history lost).
    pub fn control(kind: EventKind, message: &str, reset_id: bool) -> Event {
        let code = match kind {
            EventKind::Error(code) => code.as_str(),
            other => other.name(),
        };
        let data = json!({ "code": code, "message": message });
        Event::encode(kind, None, &data, reset_id)
    }

    fn encode(
        kind: EventKind,
        id: Option<Token>,
        data: &serde_json::Value,
        reset_id: bool,
    ) -> Event {
        // serde_json never fails on a Value (map keys are strings).
        let data_json = data.to_string();
        let name = kind.name();
        let mut sse = String::with_capacity(
            data_json.len() + 64 + id.as_ref().map_or(0, |t| t.as_str().len()),
        );
        match (&id, reset_id) {
            (Some(token), _) => {
                sse.push_str("id: ");
                sse.push_str(token.as_str());
                sse.push('\n');
            }
            (None, true) => sse.push_str("id:\n"),
            (None, false) => {}
        }
        sse.push_str("event: ");
        sse.push_str(name);
        sse.push_str("\ndata: ");
        sse.push_str(&data_json);
        sse.push_str("\n\n");

        let mut envelope = String::with_capacity(data_json.len() + 64);
        envelope.push_str("{\"event\":\"");
        envelope.push_str(name);
        envelope.push('"');
        if let Some(token) = &id {
            envelope.push_str(",\"id\":\"");
            envelope.push_str(token.as_str());
            envelope.push('"');
        }
        envelope.push_str(",\"data\":");
        envelope.push_str(&data_json);
        envelope.push('}');
        envelope.push('\n');
        Event {
            kind,
            id,
            sse: Bytes::from(sse),
            ndjson: Bytes::from(envelope),
            at_ms: 0,
            view: std::sync::OnceLock::new(),
            operation_type: None,
            place: std::sync::OnceLock::new(),
            shared_frame: std::sync::OnceLock::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "8265A1B2C3000000012B022C0100296E5A1004";

    #[test]
    fn parses_bare_and_json_ids() {
        let bare = Token::parse(TOKEN).unwrap();
        let json = Token::parse(&format!("{{\"_data\":\"{TOKEN}\"}}")).unwrap();
        let lower = Token::parse(&TOKEN.to_lowercase()).unwrap();
        assert_eq!(bare, json);
        assert_eq!(bare, lower);
    }

    #[test]
    fn rejects_malformed_ids() {
        assert_eq!(Token::parse("not-hex"), Err(TokenError::NotHex));
        assert_eq!(Token::parse("abc"), Err(TokenError::NotHex));
        assert_eq!(Token::parse(""), Err(TokenError::NotHex));
        assert_eq!(
            Token::parse("00112233445566778899"),
            Err(TokenError::NotResumeToken)
        );
        assert_eq!(Token::parse("{\"x\":1}"), Err(TokenError::BadJson));
    }

    #[test]
    fn a_change_is_timed_by_its_wall_time_else_its_cluster_time() {
        let wall = mongodb::bson::DateTime::from_millis(1_700_000_000_123);
        let timed = doc! { "_id": { "_data": TOKEN }, "operationType": "insert", "wallTime": wall };
        assert_eq!(Event::from_change(timed).unwrap().at_ms, 1_700_000_000_123);
        let projected = doc! { "_id": { "_data": TOKEN }, "operationType": "insert" };
        assert_eq!(
            Event::from_change(projected).unwrap().at_ms,
            0x65A1_B2C3 * 1000
        );
        assert_eq!(Event::control(EventKind::Cancel, "x", false).at_ms, 0);
    }

    #[test]
    fn orders_by_oplog_position() {
        let a = Token::parse("8265A1B2C3000000012B").unwrap();
        let b = Token::parse("8265A1B2C3000000022B").unwrap();
        assert!(a < b);
    }

    #[test]
    fn encodes_every_wire_format_once() {
        let change = doc! {
            "_id": { "_data": TOKEN },
            "operationType": "insert",
            "fullDocument": { "_id": 1, "n": 2_i64 },
        };
        let event = Event::from_change(change).unwrap();
        assert_eq!(event.kind, EventKind::Change);
        let sse = std::str::from_utf8(&event.sse).unwrap();
        assert!(sse.starts_with(&format!("id: {TOKEN}\nevent: change\ndata: {{")));
        assert!(sse.ends_with("}\n\n"));
        assert!(!sse.contains("_data"));
        let envelope: serde_json::Value = serde_json::from_slice(&event.envelope()).unwrap();
        assert_eq!(envelope["event"], "change");
        assert_eq!(envelope["id"], TOKEN);
        assert_eq!(envelope["data"]["fullDocument"]["n"], 2);
        assert_eq!(
            &event.ndjson[..event.ndjson.len() - 1],
            &event.envelope()[..]
        );
        assert_eq!(event.operation_type.as_deref(), Some("insert"));
        let data: serde_json::Value = serde_json::from_slice(&event.data()).unwrap();
        assert_eq!(data, envelope["data"]);
    }

    #[test]
    fn data_of_a_control_event_is_its_body() {
        let event = Event::control(EventKind::Cancel, "gone", false);
        let data: serde_json::Value = serde_json::from_slice(&event.data()).unwrap();
        assert_eq!(data, json!({"code": "cancel", "message": "gone"}));
    }

    #[test]
    fn history_lost_resets_the_browser_id() {
        let event = Event::control(EventKind::Error(ErrorCode::HistoryLost), "gone", true);
        let sse = std::str::from_utf8(&event.sse).unwrap();
        assert!(sse.starts_with("id:\nevent: error\n"));
        assert!(sse.contains("\"code\":\"history_lost\""));
    }

    #[test]
    fn a_cluster_time_position_sorts_after_every_change_at_that_time_and_before_the_next() {
        let at = Timestamp {
            time: 0x65A1_B2C3,
            increment: 1,
        };
        let position = Token::after_cluster_time(at);
        assert_eq!(position.as_str(), "8265A1B2C300000001FF");
        assert_eq!(position.cluster_time(), Some(at));
        // A change at `at` (event token) and the high-water mark at `at`: before.
        let event_at = Token::parse("8265A1B2C3000000012B022C0100296E5A1004").unwrap();
        let high_water = Token::parse("8265A1B2C3000000010000000000").unwrap();
        assert!(event_at < position && high_water < position);
        // The next increment and the next second: after.
        let next = Token::parse("8265A1B2C3000000022B022C0100296E5A1004").unwrap();
        let later = Token::parse("8265A1B2C4000000002B022C0100296E5A1004").unwrap();
        assert!(position < next && position < later);
        // It parses back from a client (it is a valid id), opens just after `at`, and real
        // tokens are not mistaken for it.
        assert_eq!(Token::parse(position.as_str()).unwrap(), position);
        assert_eq!(
            position.start_at(),
            Some(Timestamp {
                time: 0x65A1_B2C3,
                increment: 2
            })
        );
        assert_eq!(event_at.start_at(), None);
        let wrap = Token::after_cluster_time(Timestamp {
            time: 7,
            increment: u32::MAX,
        });
        assert_eq!(
            wrap.start_at(),
            Some(Timestamp {
                time: 8,
                increment: 0
            })
        );
    }

    #[test]
    fn a_place_is_read_from_real_tokens_and_rebuilt_exactly() {
        // A 6.0 insert: version 1, tokenType 128, txnOpIndex 0, not from invalidate, UUID,
        // document key.
        let insert = Token::parse(
            "8265A1B2C3000000012B022C0100296E5A10040123456789ABCDEF0123456789ABCDEF\
             463C5F6964003C64A1B2C3D4E5F6A7B8C9D0E1F20004",
        )
        .unwrap();
        let place = insert.place().unwrap();
        assert_eq!(
            place,
            Place {
                at: Timestamp {
                    time: 0x65A1_B2C3,
                    increment: 1
                },
                fields: Some(PlaceFields {
                    version: 1,
                    token_type: PlaceFields::EVENT,
                    txn_op_index: 0,
                    from_invalidate: false
                })
            }
        );
        let after = Token::after_place(&place);
        assert_eq!(after.as_str(), "8265A1B2C3000000012B022C0100296EFF");
        assert!(insert < after);
        assert_eq!(after.place(), Some(place), "a rebuilt position reads back");
        // The 300th operation of a transaction (two-byte integer), and a high-water mark.
        let txn = Token::parse("8265A1B2C3000000012B022C01002C02586E5A1004AB").unwrap();
        assert_eq!(txn.place().unwrap().fields.unwrap().txn_op_index, 300);
        let hwm = Token::parse("8265A1B2C3000000012B0229296E04").unwrap();
        let hwm_place = hwm.place().unwrap();
        assert_eq!(hwm_place.fields.unwrap().token_type, 0);
        // A high-water mark at T comes before every change at T; its place too.
        assert!(Token::after_place(&hwm_place) < insert);
        // A cluster-time position is a place without fields.
        let at = Token::after_cluster_time(place.at);
        assert_eq!(
            at.place(),
            Some(Place {
                at: place.at,
                fields: None
            })
        );
        // Snapshot ids, fractional or non-canonical integers: not places.
        assert_eq!(
            Token::parse("8265A1B2C300000001FE0000000105000000")
                .unwrap()
                .place(),
            None
        );
        assert_eq!(
            Token::parse("8265A1B2C3000000012B03296E04")
                .unwrap()
                .place(),
            None
        );
        assert_eq!(
            Token::parse("8265A1B2C3000000012C0002296E04")
                .unwrap()
                .place(),
            None,
            "1 written in two bytes"
        );
    }

    #[test]
    fn change_without_id_is_refused() {
        assert!(Event::from_change(doc! { "operationType": "insert" }).is_err());
    }
}
