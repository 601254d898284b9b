//! The composite position of a `/_streams` connection (PROTOCOL.md §8): one id that resumes
//! every stream exactly, whose size does not grow with the data and barely with the streams.
//!
//! **What a stream's entry holds.** Not its resume token (about 42 bytes, most of them the
//! collection's UUID and the document key) but its [`Place`]: what identifies a change's place
//! in the oplog. In a replica set the cluster time (seconds + increment) and the `txnOpIndex`
//! (index within a transaction) identify one change; the token's other leading fields tell
//! a change from a high-water mark and from the `invalidate` it caused. A stream resumes from
//! [`Token::after_place`], a synthetic position that sorts right after the change and before
//! the next one, so the ordinary machinery is exact with it: inside the worker's ring it is a
//! read "after" it; behind the ring, a catch-up opens with `startAtOperationTime` at its
//! cluster time and its readers skip what sorts at or before it (`worker/catchup.rs`).
//!
//! **Encoding.** base64url (no padding) of:
//!
//! ```text
//! [2]                      format version (1 was the concatenation of whole tokens: refused)
//! [w]                      tag width code: 0..3 → 2, 3, 4 or 8 bytes
//! varint version           the token format version most entries share
//! varint base              the smallest cluster-time second of the entries
//! per stream:
//!   tag                    the first w bytes of FNV-1a-64 of the stream path
//!   varint (Δs << 2 | k)   seconds after `base`, and the entry's kind k
//!   varint increment       the cluster time's increment
//!   k = 0                  a change (tokenType 128, txnOpIndex 0)
//!   k = 1                  a high-water mark (tokenType 0)
//!   k = 2                  a change inside a transaction: varint txnOpIndex
//!   k = 3                  one more byte: 0 after every change at that time (a snapshot's
//!                          hand-over); 1 other fields (varint version, tokenType,
//!                          txnOpIndex, byte fromInvalidate); 2 a whole id (varint length,
//!                          bytes): a snapshot event's id, which holds its document's `_id`
//! ```
//!
//! A change outside a transaction within 31 s of the oldest entry, with an increment under
//! 128, costs 2 + 1 + 1 = 4 bytes; 10 streams ≈ 60 characters, 100 streams ≈ 560 (§8 bounds:
//! 160 and 1,000; the tests check them on real tokens).
//!
//! **Tags, not indexes.** A stream's entry is found by its path's hash, so a resume works
//! whatever the order or subset of streams the client lists again, and a WebSocket
//! `subscribe` finds its stream's entry in any composite id it was given. The encoder picks
//! the narrowest width at which this id's streams have distinct tags (at least 2 bytes; 4
//! when it carries a snapshot id, whose `_id` must never be applied to another stream).
//! A stream the id does not hold starts from now; one that merely shares a 2-byte tag with
//! an entry (1 in 65,536 per entry) starts from that entry's place in the oplog instead: a
//! little earlier than now, never a duplicate of what this connection delivered.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mongodb::bson::Timestamp;

use crate::event::{Place, PlaceFields, Token};

/// The format byte of this encoding.
const FORMAT: u8 = 2;
/// The format byte of the former encoding (whole tokens concatenated).
const OLD_FORMAT: u8 = 1;
/// Tag widths, by the code in the header's second byte.
const WIDTHS: [usize; 4] = [2, 3, 4, 8];
/// Narrowest tag of an id that carries a snapshot event's id.
const RAW_MIN_WIDTH: usize = 4;
/// Largest composite id we decode: 100 streams, each mid-snapshot with a large `_id`.
pub const MAX_POSITION_LEN: usize = 256 * 1024;

/// One stream's entry, reduced from its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An oplog position.
    Place(Place),
    /// Anything else, carried whole (a snapshot event's id, an unknown token format).
    Whole(Token),
}

impl Entry {
    /// The entry of a stream at `token`.
    pub fn of(token: &Token) -> Entry {
        Entry::with_place(token, token.place())
    }

    /// The entry of a stream at `token`, whose place is already known (an [`Event`]'s,
    /// read once for all its readers).
    ///
    /// [`Event`]: crate::event::Event
    pub fn with_place(token: &Token, place: Option<Place>) -> Entry {
        place.map_or_else(|| Entry::Whole(token.clone()), Entry::Place)
    }

    /// The position a stream resumes from.
    pub fn token(&self) -> Token {
        match self {
            Entry::Place(place) => Token::after_place(place),
            Entry::Whole(token) => token.clone(),
        }
    }
}

/// A stream's tag: FNV-1a-64 of its path (its leading bytes are the tag at any width).
pub fn hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |hash: u64, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn tag(hash: u64, width: usize) -> u64 {
    hash >> (64 - 8 * width)
}

/// The narrowest width (at least `min`) at which `hashes` have distinct tags; the widest
/// otherwise (64-bit hashes of distinct paths do not collide in practice).
pub fn width_for(hashes: &[u64], min: usize) -> usize {
    let mut tags: Vec<u64> = Vec::with_capacity(hashes.len());
    for &width in WIDTHS.iter().filter(|w| **w >= min) {
        tags.clear();
        tags.extend(hashes.iter().map(|h| tag(*h, width)));
        tags.sort_unstable();
        if tags.windows(2).all(|pair| pair[0] != pair[1]) {
            return width;
        }
    }
    WIDTHS[WIDTHS.len() - 1]
}

/// Why a composite id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    /// An id of the former format (whole tokens concatenated).
    #[error(
        "Last-Event-ID is a /_streams position of the former format (whole resume tokens), \
         which this server no longer reads; reconnect without it to start from now"
    )]
    OldFormat,
    /// Not a composite id at all.
    #[error(
        "Last-Event-ID is not a /_streams position (the id of an event of this connection, \
         as sent)"
    )]
    Malformed,
}

impl PositionError {
    /// A stable, machine-readable reason for the problem body.
    pub fn reason(self) -> &'static str {
        match self {
            PositionError::OldFormat => "old_position_format",
            PositionError::Malformed => "not_a_position",
        }
    }
}

/// A decoded composite position: each stream's tag and entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    width: usize,
    entries: Vec<(u64, Entry)>,
}

impl Position {
    /// The resume position of the stream at `path`, if this id holds one.
    pub fn get(&self, path: &str) -> Option<Token> {
        if self.entries.is_empty() {
            return None;
        }
        let wanted = tag(hash(path), self.width);
        self.entries
            .iter()
            .find(|(t, _)| *t == wanted)
            .map(|(_, entry)| entry.token())
    }

    /// Decodes a composite id.
    pub fn decode(text: &str) -> Result<Position, PositionError> {
        let text = text.trim();
        if text.len() > MAX_POSITION_LEN {
            return Err(PositionError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| PositionError::Malformed)?;
        match bytes.first() {
            Some(&FORMAT) => {}
            Some(&OLD_FORMAT) if bytes.get(1..3) == Some(&[0, 0]) => {
                return Err(PositionError::OldFormat);
            }
            _ => return Err(PositionError::Malformed),
        }
        Reader {
            bytes: &bytes,
            at: 1,
        }
        .position()
        .ok_or(PositionError::Malformed)
    }
}

/// Builds composite ids. Reused by a connection (its buffers are kept between events).
#[derive(Debug, Default)]
pub struct Encoder {
    bytes: Vec<u8>,
    text: Vec<u8>,
}

impl Encoder {
    /// The id of `entries` (each stream's hash and entry), tags `width` bytes wide (from
    /// [`width_for`]; widened to 4 when an entry is carried whole).
    pub fn encode<'a>(
        &mut self,
        width: usize,
        entries: impl Iterator<Item = (u64, &'a Entry)> + Clone,
    ) -> &str {
        // One pass for the header: whether an entry is carried whole, the version most
        // changes share (the first one's: one server, one version), the oldest second.
        let mut whole = false;
        let mut version = None;
        let mut base: Option<u32> = None;
        for (_, entry) in entries.clone() {
            match entry {
                Entry::Place(place) => {
                    if version.is_none() {
                        version = place.fields.map(|f| f.version);
                    }
                    base = Some(base.map_or(place.at.time, |b| b.min(place.at.time)));
                }
                Entry::Whole(_) => whole = true,
            }
        }
        let width = if whole {
            width.max(RAW_MIN_WIDTH)
        } else {
            width
        };
        let code = WIDTHS.iter().position(|w| *w == width).unwrap_or(3);
        let width = WIDTHS[code];
        let version = version.unwrap_or(1);
        let base = base.unwrap_or(0);
        let out = &mut self.bytes;
        out.clear();
        out.push(FORMAT);
        out.push(code as u8);
        varint(out, version);
        varint(out, u64::from(base));
        for (hash, entry) in entries {
            let tag = tag(hash, width);
            out.extend_from_slice(&tag.to_be_bytes()[8 - width..]);
            match entry {
                Entry::Place(place) => {
                    let delta = u64::from(place.at.time - base);
                    let head = |kind: u64| (delta << 2) | kind;
                    match place.fields {
                        Some(f)
                            if f.version == version
                                && !f.from_invalidate
                                && f.token_type == PlaceFields::EVENT =>
                        {
                            if f.txn_op_index == 0 {
                                varint(out, head(0));
                                varint(out, u64::from(place.at.increment));
                            } else {
                                varint(out, head(2));
                                varint(out, u64::from(place.at.increment));
                                varint(out, f.txn_op_index);
                            }
                        }
                        Some(f)
                            if f.version == version
                                && !f.from_invalidate
                                && f.token_type == PlaceFields::HIGH_WATER_MARK
                                && f.txn_op_index == 0 =>
                        {
                            varint(out, head(1));
                            varint(out, u64::from(place.at.increment));
                        }
                        Some(f) => {
                            varint(out, head(3));
                            varint(out, u64::from(place.at.increment));
                            out.push(1);
                            varint(out, f.version);
                            varint(out, f.token_type);
                            varint(out, f.txn_op_index);
                            out.push(u8::from(f.from_invalidate));
                        }
                        None => {
                            varint(out, head(3));
                            varint(out, u64::from(place.at.increment));
                            out.push(0);
                        }
                    }
                }
                Entry::Whole(token) => {
                    let raw = hex::decode(token.as_str()).unwrap_or_default();
                    varint(out, 3);
                    varint(out, 0);
                    out.push(2);
                    varint(out, raw.len() as u64);
                    out.extend_from_slice(&raw);
                }
            }
        }
        // Into a buffer of the exact length: `encode_string` goes through base64's chunked
        // encoder, twice the cost for ids this short.
        let length = base64::encoded_len(self.bytes.len(), false).unwrap_or(0);
        self.text.resize(length, 0);
        let written = URL_SAFE_NO_PAD
            .encode_slice(&self.bytes, &mut self.text)
            .unwrap_or(0);
        // base64url is ASCII.
        std::str::from_utf8(&self.text[..written]).unwrap_or_default()
    }
}

/// LEB128.
fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads an id's bytes after the format byte; `None` on anything malformed.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7F).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }

    fn position(mut self) -> Option<Position> {
        let width = *WIDTHS.get(usize::from(self.byte()?))?;
        let version = self.varint()?;
        let base = self.u32()?;
        let mut entries: Vec<(u64, Entry)> = Vec::new();
        while self.at < self.bytes.len() {
            let mut tag = 0u64;
            for _ in 0..width {
                tag = (tag << 8) | u64::from(self.byte()?);
            }
            let head = self.varint()?;
            let time = base.checked_add(u32::try_from(head >> 2).ok()?)?;
            let increment = self.u32()?;
            let at = Timestamp { time, increment };
            let fields = |token_type, txn_op_index| {
                Some(PlaceFields {
                    version,
                    token_type,
                    txn_op_index,
                    from_invalidate: false,
                })
            };
            let entry = match head & 3 {
                0 => Entry::Place(Place {
                    at,
                    fields: fields(PlaceFields::EVENT, 0),
                }),
                1 => Entry::Place(Place {
                    at,
                    fields: fields(PlaceFields::HIGH_WATER_MARK, 0),
                }),
                2 => Entry::Place(Place {
                    at,
                    fields: fields(PlaceFields::EVENT, self.varint()?),
                }),
                _ => match self.byte()? {
                    0 => Entry::Place(Place { at, fields: None }),
                    1 => Entry::Place(Place {
                        at,
                        fields: Some(PlaceFields {
                            version: self.varint()?,
                            token_type: self.varint()?,
                            txn_op_index: self.varint()?,
                            from_invalidate: match self.byte()? {
                                0 => false,
                                1 => true,
                                _ => return None,
                            },
                        }),
                    }),
                    2 => {
                        let len = usize::try_from(self.varint()?).ok()?;
                        let raw = self.bytes.get(self.at..self.at.checked_add(len)?)?;
                        self.at += len;
                        Entry::Whole(Token::parse(&hex::encode_upper(raw)).ok()?)
                    }
                    _ => return None,
                },
            };
            // One entry per stream: a repeated tag is not an id we made.
            if entries.iter().any(|(t, _)| *t == tag) {
                return None;
            }
            entries.push((tag, entry));
        }
        Some(Position { width, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MongoDB 6.0 change token at `time`/`increment` (collection UUID and an ObjectId
    /// document key after the fields), `txn` its transaction index.
    fn change(time: u32, increment: u32, txn: u64) -> Token {
        // KeyString: 0 is `29`; n > 0 is `2B` + 2n in one byte, `2C` + 2n in two.
        let fields = match txn {
            0 => "29".to_owned(),
            1..=127 => format!("2B{:02X}", 2 * txn),
            _ => format!("2C{:04X}", 2 * txn),
        };
        Token::parse(&format!(
            "82{time:08X}{increment:08X}2B022C0100{fields}6E5A1004\
             0123456789ABCDEF0123456789ABCDEF463C5F6964003C64A1B2C3D4E5F6A7B8C9D0E1F20004"
        ))
        .unwrap()
    }

    fn round_trip(entries: &[(&str, Token)]) -> (String, Position) {
        let hashes: Vec<u64> = entries.iter().map(|(p, _)| hash(p)).collect();
        let reduced: Vec<(u64, Entry)> = entries
            .iter()
            .map(|(p, t)| (hash(p), Entry::of(t)))
            .collect();
        let text = Encoder::default()
            .encode(width_for(&hashes, 2), reduced.iter().map(|(h, e)| (*h, e)))
            .to_owned();
        let position = Position::decode(&text).unwrap();
        (text, position)
    }

    #[test]
    fn every_stream_resumes_from_a_position_equivalent_to_its_token() {
        let t = 0x65A1_B2C3;
        let snapshot = crate::snapshot::SnapshotId {
            at: Timestamp {
                time: t,
                increment: 1,
            },
            count: 3,
            after: mongodb::bson::Bson::Int32(7),
        }
        .encode()
        .unwrap();
        let cases = [
            ("/d/a/_streams/s", change(t, 5, 0)),
            ("/d/b/_streams/s", change(t + 40, 70_000, 0)),
            ("/d/c/_streams/s", change(t + 3, 1, 9)),
            (
                "/d/e/_streams/s",
                Token::parse(&format!("82{t:08X}000000022B0229296E04")).unwrap(),
            ),
            (
                "/d/f/_streams/s",
                Token::after_cluster_time(Timestamp {
                    time: t + 1,
                    increment: 4,
                }),
            ),
            ("/d/g/_streams/s", snapshot.clone()),
        ];
        let (text, position) = round_trip(&cases);
        assert!(
            text.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "URL- and header-safe: {text}"
        );
        for (path, token) in &cases {
            let resumed = position.get(path).unwrap();
            if token.place().is_none() {
                assert_eq!(&resumed, token, "{path}: carried whole");
                continue;
            }
            // Right after the token, before anything after it.
            assert!(token <= &resumed, "{path}: {token:?} {resumed:?}");
            assert_eq!(resumed.place(), token.place(), "{path}");
        }
        assert_eq!(position.get("/d/x/_streams/s"), None);
        assert_eq!(position.get("/d/g/_streams/s"), Some(snapshot));
    }

    #[test]
    fn a_place_sorts_after_its_change_and_before_every_later_one() {
        let t = 0x65A1_B2C3;
        let at = change(t, 5, 2);
        let after = Token::after_place(&at.place().unwrap());
        let later = [
            change(t, 5, 3),
            change(t, 5, 300),
            change(t, 6, 0),
            change(t + 1, 0, 0),
        ];
        let earlier = [change(t, 5, 1), change(t, 4, 900), change(t - 1, 9, 0)];
        assert!(at < after);
        for token in later {
            assert!(after < token, "{token:?}");
        }
        for token in earlier {
            assert!(token < after, "{token:?}");
        }
        // A change's own invalidate follows it.
        let invalidate = Token::parse(&at.as_str().replacen("6E5A", "6F5A", 1)).unwrap();
        assert!(after < invalidate);
        // A cursor for it opens at its cluster time, every change at that time included.
        assert_eq!(
            after.start_at(),
            Some(Timestamp {
                time: t,
                increment: 5
            })
        );
    }

    #[test]
    fn ids_stay_small_at_10_and_100_streams() {
        // Streams spread over 20 minutes of history, busy increments, a few in transactions.
        let t = 0x65A1_B2C3;
        let paths: Vec<String> = (0..100).map(|i| format!("/db/c{i}/_streams/s")).collect();
        let entries: Vec<(&str, Token)> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let i = i as u32;
                (
                    p.as_str(),
                    change(
                        t + (i * 13) % 1200,
                        1000 + i * 97,
                        u64::from(i.is_multiple_of(10)),
                    ),
                )
            })
            .collect();
        let (ten, _) = round_trip(&entries[..10]);
        let (hundred, position) = round_trip(&entries);
        assert!(ten.len() <= 160, "10 streams: {} characters", ten.len());
        assert!(
            hundred.len() <= 1000,
            "100 streams: {} characters",
            hundred.len()
        );
        for (path, token) in &entries {
            assert_eq!(position.get(path).unwrap().place(), token.place());
        }
    }

    #[test]
    fn colliding_tags_are_widened() {
        // Two paths whose 2-byte tags collide (found by a bounded search).
        let base = hash("/d/c/_streams/s0") >> 48;
        let other = (1..200_000)
            .map(|i| format!("/d/c/_streams/s{i}"))
            .find(|p| hash(p) >> 48 == base)
            .expect("a 16-bit collision within 200,000 names");
        let t = 0x65A1_B2C3;
        let entries = [
            ("/d/c/_streams/s0", change(t, 1, 0)),
            (other.as_str(), change(t, 2, 0)),
        ];
        let (_, position) = round_trip(&entries);
        assert_eq!(position.width, 3);
        for (path, token) in &entries {
            assert_eq!(position.get(path).unwrap().place(), token.place());
        }
    }

    #[test]
    fn old_and_malformed_ids_are_refused() {
        // A former id: header [1, 0, 0], then per stream a 4-byte tag, a 2-byte length and
        // the whole token, padded to 3 bytes.
        let token = hex::decode(change(7, 1, 0).as_str()).unwrap();
        let mut old = vec![1, 0, 0, 0x12, 0x34, 0x56, 0x78, 0, token.len() as u8];
        old.extend_from_slice(&token);
        old.resize(old.len().div_ceil(3) * 3, 0);
        assert_eq!(
            Position::decode(&URL_SAFE_NO_PAD.encode(&old)),
            Err(PositionError::OldFormat)
        );
        for text in ["", "!!", "AgAB", "Ag", "AgQBAA", "826B03ED"] {
            assert_eq!(
                Position::decode(text),
                Err(PositionError::Malformed),
                "{text}"
            );
        }
        // An entry cut short, and two entries with one tag.
        let (text, _) = round_trip(&[("/d/a/_streams/s", change(7, 1, 0))]);
        let bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        let cut = URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() - 1]);
        assert_eq!(Position::decode(&cut), Err(PositionError::Malformed));
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes[4..]);
        assert_eq!(
            Position::decode(&URL_SAFE_NO_PAD.encode(&twice)),
            Err(PositionError::Malformed)
        );
        // No stream yet: a valid, empty position.
        let empty = Encoder::default().encode(2, std::iter::empty()).to_owned();
        assert_eq!(
            Position::decode(&empty).unwrap().get("/d/a/_streams/s"),
            None
        );
    }
}
