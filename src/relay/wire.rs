//! What one relayed message carries, and how it is read back into a worker's [`Step`].
//!
//! The owner publishes the *raw* change document (BSON, as the cursor returned it), not the
//! encoded event: every instance then routes and encodes it exactly as its own cursor would
//! (`RawChange::route` with the worker's `match` rules), so per-user routing values, the
//! document view and every transport's bytes come out identical with and without the relay.
//!
//! | kind | `Nats-Msg-Id` | `Sg-Token` | payload |
//! |---|---|---|---|
//! | `change`, `skipped` | the resume token | the resume token | the change document (BSON) |
//! | `changes` (two or more the cursor held together) | `b` + first + `.` + last token | the last token | per change: a `skipped` byte, the token's length (u16, big-endian), the token, the change document (BSON) |
//! | `mark` (an open, or a quiet cursor's position) | `m` + token | the position | empty |
//! | `invalidate` | `i` + last position | the invalidate's id, if any | the event's `data` (JSON) |
//! | `failed` | `f` + last position | — | the message; `Sg-Code` the error code |
//!
//! `Nats-Msg-Id` makes JetStream drop a change two owners both publish (a hand-over, or an
//! owner that has not yet noticed its lease expired): the fleet's log holds each change once.
//! JetStream de-duplicates over the whole stream, not per subject, so the owner scopes each id
//! to its worker ([`Outbound::scoped`]): two workers' logs may hold the same token (two
//! streams on one collection both get a change; two cursors opened at one cluster time start
//! at the same position), and each must keep its copy.

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use mongodb::bson::Document;

use crate::event::{ErrorCode, Event, EventKind, Token};
use crate::worker::source::RawChange;

/// Header naming the message's kind.
pub const KIND: &str = "Sg-Kind";
/// Header holding the message's resume token (or position).
pub const TOKEN: &str = "Sg-Token";
/// Header holding a `failed` message's error code.
pub const CODE: &str = "Sg-Code";
/// Header holding the publisher's clock (Unix ms) when it published: the delivery-lag clock.
pub const PUBLISHED_MS: &str = "Sg-Published-Ms";

/// A relayed message, decoded.
#[derive(Debug)]
pub enum Relayed {
    /// A change (or a `skipped` placeholder for one over 16 MB).
    Change(RawChange),
    /// Changes the owner's cursor held together, in order (published under one
    /// acknowledgement; never empty).
    Changes(Vec<RawChange>),
    /// A position the owner's cursor reached (its open, or an empty batch).
    Mark(Token),
    /// The collection was dropped or renamed: the stream is over.
    Invalidate(Arc<Event>),
    /// The owner's cursor failed in a way retrying cannot fix.
    Failed(ErrorCode, String),
}

impl Relayed {
    /// The resume position this message stands at, if it has one.
    pub fn token(&self) -> Option<&Token> {
        match self {
            Relayed::Change(raw) => Some(&raw.id),
            Relayed::Changes(raws) => raws.last().map(|raw| &raw.id),
            Relayed::Mark(token) => Some(token),
            Relayed::Invalidate(_) | Relayed::Failed(..) => None,
        }
    }

    /// Whether the stream ends with this message.
    pub fn is_end(&self) -> bool {
        matches!(self, Relayed::Invalidate(_) | Relayed::Failed(..))
    }
}

/// A message ready to publish: headers (with `Nats-Msg-Id`) and payload.
#[derive(Debug)]
pub struct Outbound {
    /// Headers, de-duplication id included.
    pub headers: HeaderMap,
    /// Payload.
    pub payload: Bytes,
    /// The changes it carries, kept for this instance's reader of the subject (only by a
    /// [`Batch::keeping`] them; empty otherwise). Never sent.
    pub changes: Vec<RawChange>,
}

impl Outbound {
    /// The message with its de-duplication id scoped to the worker `key` (`<key>.<id>`).
    pub fn scoped(mut self, key: &str) -> Outbound {
        let id = self
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|id| format!("{key}.{}", id.as_str()));
        if let Some(id) = id {
            self.headers
                .insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        }
        self
    }
}

/// The message is not one this relay wrote.
#[derive(Debug, thiserror::Error)]
#[error("malformed relay message: {0}")]
pub struct Malformed(String);

fn headers(kind: &str, msg_id: &str, published_ms: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    headers.insert(KIND, kind);
    headers.insert(PUBLISHED_MS, published_ms.to_string().as_str());
    headers
}

/// A change read by the owner's cursor, as one message.
#[cfg(test)]
pub fn change(raw: &RawChange, published_ms: u64) -> Result<Outbound, Malformed> {
    let mut batch = Batch::default();
    batch.try_push(raw, 0)?;
    batch
        .finish(published_ms)
        .ok_or_else(|| Malformed("no change".into()))
}

/// Changes the owner's cursor held together, gathered into one message so that one
/// acknowledgement covers them all and the log never holds some without the others.
#[derive(Debug, Default)]
pub struct Batch {
    payload: Vec<u8>,
    first: Option<Token>,
    last: Option<Token>,
    count: usize,
    /// The changes taken, when kept for this instance's reader ([`Outbound::changes`]).
    kept: Option<Vec<RawChange>>,
}

impl Batch {
    /// A batch that also keeps the changes it takes, for this instance's reader of the
    /// subject it goes to ([`Outbound::changes`]).
    pub fn keeping() -> Batch {
        Batch {
            kept: Some(Vec::new()),
            ..Batch::default()
        }
    }

    /// Adds `raw` unless the payload would then pass `max_bytes` (a batch's first change is
    /// always taken). `Ok(false)`: not taken, the batch is full.
    pub fn try_push(&mut self, raw: &RawChange, max_bytes: usize) -> Result<bool, Malformed> {
        let token = raw.id.as_str().as_bytes();
        let length = u16::try_from(token.len())
            .map_err(|_| Malformed(format!("a resume token of {} bytes", token.len())))?;
        let doc = mongodb::bson::to_vec(&raw.doc).map_err(|e| Malformed(e.to_string()))?;
        let entry = 3 + token.len() + doc.len();
        if self.count > 0 && self.payload.len() + entry > max_bytes {
            return Ok(false);
        }
        self.payload.push(u8::from(raw.skipped));
        self.payload.extend_from_slice(&length.to_be_bytes());
        self.payload.extend_from_slice(token);
        self.payload.extend_from_slice(&doc);
        self.first.get_or_insert_with(|| raw.id.clone());
        self.last = Some(raw.id.clone());
        self.count += 1;
        if let Some(kept) = &mut self.kept {
            kept.push(raw.clone());
        }
        Ok(true)
    }

    /// How many changes it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// The message (a single change as a `change` or `skipped` one); `None` for an empty
    /// batch.
    pub fn finish(self, published_ms: u64) -> Option<Outbound> {
        let (first, last) = (self.first?, self.last?);
        if self.count == 1 {
            let kind = if self.payload.first() == Some(&1) {
                "skipped"
            } else {
                "change"
            };
            let mut headers = headers(kind, first.as_str(), published_ms);
            headers.insert(TOKEN, first.as_str());
            // The entry's document follows its flag, length and token.
            let doc = Bytes::from(self.payload).slice(3 + first.as_str().len()..);
            return Some(Outbound {
                headers,
                payload: doc,
                changes: self.kept.unwrap_or_default(),
            });
        }
        let mut headers = headers("changes", &format!("b{first}.{last}"), published_ms);
        headers.insert(TOKEN, last.as_str());
        Some(Outbound {
            headers,
            payload: Bytes::from(self.payload),
            changes: self.kept.unwrap_or_default(),
        })
    }
}

/// Reads the payload of a `changes` message.
fn decode_changes(mut payload: &[u8]) -> Result<Vec<RawChange>, Malformed> {
    let short = || Malformed("a truncated batch of changes".into());
    let mut raws = Vec::new();
    while let [skipped, high, low, rest @ ..] = payload {
        let length = usize::from(u16::from_be_bytes([*high, *low]));
        let token = rest.get(..length).ok_or_else(short)?;
        let token = std::str::from_utf8(token)
            .ok()
            .and_then(|t| Token::parse(t).ok())
            .ok_or_else(|| Malformed("a batched change without a valid token".into()))?;
        let rest = &rest[length..];
        let size = rest
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(i32::from_le_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n <= rest.len())
            .ok_or_else(short)?;
        let doc: Document =
            mongodb::bson::from_slice(&rest[..size]).map_err(|e| Malformed(e.to_string()))?;
        raws.push(RawChange {
            id: token,
            doc,
            skipped: *skipped != 0,
        });
        payload = &rest[size..];
    }
    if !payload.is_empty() || raws.is_empty() {
        return Err(short());
    }
    Ok(raws)
}

/// A position of the owner's cursor.
pub fn mark(token: &Token, published_ms: u64) -> Outbound {
    let mut headers = headers("mark", &format!("m{token}"), published_ms);
    headers.insert(TOKEN, token.as_str());
    Outbound {
        headers,
        payload: Bytes::new(),
        changes: Vec::new(),
    }
}

/// The end of the stream: an invalidate (`event` as the cursor produced it).
pub fn invalidate(event: &Event, after: Option<&Token>, published_ms: u64) -> Outbound {
    let mut headers = headers("invalidate", &end_id('i', after), published_ms);
    if let Some(id) = &event.id {
        headers.insert(TOKEN, id.as_str());
    }
    Outbound {
        headers,
        payload: event.data(),
        changes: Vec::new(),
    }
}

/// The end of the stream: an error retrying cannot fix.
pub fn failed(
    code: ErrorCode,
    message: &str,
    after: Option<&Token>,
    published_ms: u64,
) -> Outbound {
    let mut headers = headers("failed", &end_id('f', after), published_ms);
    headers.insert(CODE, code.as_str());
    Outbound {
        headers,
        payload: Bytes::copy_from_slice(message.as_bytes()),
        changes: Vec::new(),
    }
}

/// Two owners ending the same stream at the same position publish one end.
fn end_id(prefix: char, after: Option<&Token>) -> String {
    match after {
        Some(token) => format!("{prefix}{token}"),
        None => format!("{prefix}-{}", crate::metrics::now_ms()),
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|value| value.as_str())
}

/// When the message was published (Unix ms by the publisher's clock), if it says.
pub fn published_ms(headers: Option<&HeaderMap>) -> Option<u64> {
    header(headers, PUBLISHED_MS)?.parse().ok()
}

/// Where a message stands in its worker's log, read from its headers alone (a catch-up
/// searching the retained window reads many messages and needs only this of each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A change, the last change of a batch, or a marked position.
    At(Token),
    /// An `invalidate` at this id: the stream ended there.
    EndAt(Token),
    /// An end without a position (a `failed`, an `invalidate` without an id), or a message
    /// this relay did not write: the search cannot place it.
    Unknown,
}

/// The [`Placement`] of a message, from its headers.
pub fn placement(headers: Option<&HeaderMap>) -> Placement {
    let token = || header(headers, TOKEN).and_then(|t| Token::parse(t).ok());
    match header(headers, KIND) {
        Some("change" | "skipped" | "changes" | "mark") => {
            token().map_or(Placement::Unknown, Placement::At)
        }
        Some("invalidate") => token().map_or(Placement::Unknown, Placement::EndAt),
        _ => Placement::Unknown,
    }
}

/// Reads a relayed message.
pub fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Relayed, Malformed> {
    let kind = header(headers, KIND).ok_or_else(|| Malformed("no Sg-Kind header".into()))?;
    let token = || {
        header(headers, TOKEN)
            .and_then(|t| Token::parse(t).ok())
            .ok_or_else(|| Malformed(format!("{kind} without a valid Sg-Token")))
    };
    match kind {
        "change" | "skipped" => {
            let doc: Document =
                mongodb::bson::from_slice(payload).map_err(|e| Malformed(e.to_string()))?;
            Ok(Relayed::Change(RawChange {
                id: token()?,
                doc,
                skipped: kind == "skipped",
            }))
        }
        "changes" => {
            let raws = decode_changes(payload)?;
            // The header names the last change: a payload cut between two changes is refused.
            if raws.last().map(|raw| &raw.id) != Some(&token()?) {
                return Err(Malformed(
                    "a batch of changes not ending at its Sg-Token".into(),
                ));
            }
            Ok(Relayed::Changes(raws))
        }
        "mark" => Ok(Relayed::Mark(token()?)),
        "invalidate" => {
            let data: serde_json::Value = serde_json::from_slice(payload)
                .map_err(|e| Malformed(format!("invalidate data: {e}")))?;
            let id = header(headers, TOKEN).and_then(|t| Token::parse(t).ok());
            Ok(Relayed::Invalidate(Arc::new(Event::new(
                EventKind::Invalidate,
                id,
                &data,
            ))))
        }
        "failed" => {
            let code = match header(headers, CODE) {
                Some("history_lost") => ErrorCode::HistoryLost,
                _ => ErrorCode::Upstream,
            };
            Ok(Relayed::Failed(
                code,
                String::from_utf8_lossy(payload).into_owned(),
            ))
        }
        other => Err(Malformed(format!("unknown kind {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    const T1: &str = "8263A1B2C3000000012B022C0100296E5A1004AB";

    fn raw(skipped: bool) -> RawChange {
        RawChange {
            id: Token::parse(T1).unwrap(),
            doc: doc! { "_id": { "_data": T1 }, "operationType": "insert", "fullDocument": { "x": 1 } },
            skipped,
        }
    }

    #[test]
    fn a_change_round_trips_with_its_token_as_message_id() {
        let out = change(&raw(false), 42).unwrap();
        assert_eq!(
            out.headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .unwrap()
                .as_str(),
            T1
        );
        assert_eq!(published_ms(Some(&out.headers)), Some(42));
        let Relayed::Change(back) = decode(Some(&out.headers), &out.payload).unwrap() else {
            panic!("expected a change");
        };
        assert_eq!(back.id.as_str(), T1);
        assert!(!back.skipped);
        assert_eq!(back.doc, raw(false).doc);
        let out = change(&raw(true), 42).unwrap();
        let Relayed::Change(back) = decode(Some(&out.headers), &out.payload).unwrap() else {
            panic!("expected a change");
        };
        assert!(back.skipped);
    }

    #[test]
    fn changes_held_together_round_trip_in_one_message() {
        let token = |n: u8| Token::parse(&format!("8263A1B2C3000000{n:02X}2B022C01")).unwrap();
        let raws: Vec<RawChange> = (1..=3)
            .map(|n| RawChange {
                id: token(n),
                doc: doc! { "operationType": "insert", "fullDocument": { "n": i32::from(n) } },
                skipped: n == 2,
            })
            .collect();
        let mut batch = Batch::default();
        for raw in &raws {
            assert!(batch.try_push(raw, 1 << 20).unwrap());
        }
        assert_eq!(batch.len(), 3);
        let out = batch.finish(7).unwrap();
        let id = out
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap();
        assert_eq!(id.as_str(), format!("b{}.{}", token(1), token(3)));
        let back = decode(Some(&out.headers), &out.payload).unwrap();
        assert_eq!(back.token(), Some(&token(3)));
        let Relayed::Changes(back) = back else {
            panic!("expected changes");
        };
        assert_eq!(back.len(), 3);
        for (back, raw) in back.iter().zip(&raws) {
            assert_eq!(
                (&back.id, &back.doc, back.skipped),
                (&raw.id, &raw.doc, raw.skipped)
            );
        }
        // Bounded in bytes, though a first change is always taken; none makes no message.
        let mut small = Batch::default();
        assert!(small.try_push(&raws[0], 1).unwrap());
        assert!(!small.try_push(&raws[1], 1).unwrap());
        assert_eq!(small.len(), 1);
        assert!(Batch::default().finish(7).is_none());
        // Truncated anywhere: refused, never a panic.
        for cut in 0..out.payload.len() {
            assert!(
                decode(Some(&out.headers), &out.payload[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn ids_are_scoped_to_the_worker_and_nothing_else_changes() {
        let id = |out: &Outbound| {
            out.headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .unwrap()
                .as_str()
                .to_owned()
        };
        let token = Token::parse(T1).unwrap();
        // The same change, or the same opening position, in two workers' logs: two ids.
        let (a, b) = (
            change(&raw(false), 1).unwrap().scoped("aa"),
            change(&raw(false), 1).unwrap().scoped("bb"),
        );
        assert_eq!(id(&a), format!("aa.{T1}"));
        assert_ne!(id(&a), id(&b));
        assert_ne!(
            id(&mark(&token, 1).scoped("aa")),
            id(&mark(&token, 1).scoped("bb"))
        );
        let Relayed::Change(back) = decode(Some(&a.headers), &a.payload).unwrap() else {
            panic!("expected a change");
        };
        assert_eq!(back.id.as_str(), T1);
    }

    #[test]
    fn marks_and_ends_round_trip_under_ids_of_their_own() {
        let token = Token::parse(T1).unwrap();
        let out = mark(&token, 1);
        let id = out
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap();
        assert_eq!(id.as_str(), format!("m{T1}"));
        assert!(matches!(
            decode(Some(&out.headers), &out.payload).unwrap(),
            Relayed::Mark(t) if t == token
        ));

        let event = Event::control(EventKind::Invalidate, "dropped", false);
        let out = invalidate(&event, Some(&token), 1);
        let Relayed::Invalidate(back) = decode(Some(&out.headers), &out.payload).unwrap() else {
            panic!("expected an invalidate");
        };
        assert_eq!(back.kind, EventKind::Invalidate);
        assert_eq!(back.ndjson, event.ndjson);

        let out = failed(ErrorCode::HistoryLost, "gone", Some(&token), 1);
        assert!(matches!(
            decode(Some(&out.headers), &out.payload).unwrap(),
            Relayed::Failed(ErrorCode::HistoryLost, m) if m == "gone"
        ));
    }

    #[test]
    fn placements_come_from_the_headers_alone() {
        let token = Token::parse(T1).unwrap();
        assert_eq!(
            placement(Some(&change(&raw(false), 1).unwrap().headers)),
            Placement::At(token.clone())
        );
        assert_eq!(
            placement(Some(&mark(&token, 1).headers)),
            Placement::At(token.clone())
        );
        let event = Event::new(
            EventKind::Invalidate,
            Some(token.clone()),
            &serde_json::json!({}),
        );
        assert_eq!(
            placement(Some(&invalidate(&event, None, 1).headers)),
            Placement::EndAt(token.clone())
        );
        let event = Event::control(EventKind::Invalidate, "dropped", false);
        assert_eq!(
            placement(Some(&invalidate(&event, Some(&token), 1).headers)),
            Placement::Unknown
        );
        assert_eq!(
            placement(Some(
                &failed(ErrorCode::Upstream, "x", Some(&token), 1).headers
            )),
            Placement::Unknown
        );
        assert_eq!(placement(None), Placement::Unknown);
    }

    #[test]
    fn foreign_messages_are_refused() {
        assert!(decode(None, b"").is_err());
        let mut headers = HeaderMap::new();
        headers.insert(KIND, "change");
        assert!(decode(Some(&headers), b"not bson").is_err());
        headers.insert(KIND, "bogus");
        assert!(decode(Some(&headers), b"").is_err());
    }
}
