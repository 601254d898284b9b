//! Snapshot event ids: `82` + T (16 hex digits) + `FE` + the count so far (8 hex digits) + the
//! BSON of `{"i": _id}` (hex).
//!
//! A client sends them back as `Last-Event-ID`, so decoding is input validation: the embedded
//! BSON's declared length is checked against the bytes actually given (and against the longest
//! id we hand out) before anything is allocated from it; the BSON reader would otherwise
//! reserve whatever the first four bytes claim.

use std::fmt::Write as _;

use mongodb::bson::{Bson, Document, Timestamp, doc};

use crate::event::Token;

/// Longest snapshot id we hand out, in hex digits (a huge `_id` gets no id: resuming restarts
/// before it).
const MAX_ID_LEN: usize = 2048;
/// Hex digits before the BSON: `82`, the timestamp, `FE`, the count.
const HEAD_LEN: usize = 28;
/// Longest embedded BSON we accept, in bytes: what [`MAX_ID_LEN`] leaves.
const MAX_BSON_LEN: usize = (MAX_ID_LEN - HEAD_LEN) / 2;

/// Where a snapshot event stands: its cluster time, how many events came before it (itself
/// included), and its document's `_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotId {
    /// The snapshot's cluster time.
    pub at: Timestamp,
    /// Snapshot events delivered through this one.
    pub count: u32,
    /// The `_id` of this event's document.
    pub after: Bson,
}

/// A resume id shaped like a snapshot id (`FE` after the timestamp) whose content is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Last-Event-ID is not a valid snapshot event id: {0}")]
pub struct BadSnapshotId(&'static str);

impl SnapshotId {
    /// The event id (`None` when the `_id` is too large to carry).
    pub fn encode(&self) -> Option<Token> {
        let bytes = mongodb::bson::to_vec(&doc! { "i": self.after.clone() }).ok()?;
        if bytes.len() > MAX_BSON_LEN {
            return None;
        }
        let ts = (u64::from(self.at.time) << 32) | u64::from(self.at.increment);
        let mut hex = format!("82{ts:016X}FE{:08X}", self.count);
        for byte in bytes {
            let _ = write!(hex, "{byte:02X}");
        }
        Token::parse(&hex).ok()
    }

    /// Reads a snapshot id back: `Ok(None)` for any other id (real tokens never have `FE`
    /// after the timestamp: that byte is a KeyString type, at most `F0`), an error for an id
    /// shaped like a snapshot id that is not one.
    pub fn decode(token: &Token) -> Result<Option<SnapshotId>, BadSnapshotId> {
        let hex = token.as_str();
        if hex.get(18..20) != Some("FE") {
            return Ok(None);
        }
        let at = token
            .cluster_time()
            .ok_or(BadSnapshotId("no cluster time"))?;
        let count = hex
            .get(20..HEAD_LEN)
            .and_then(|count| u32::from_str_radix(count, 16).ok())
            .ok_or(BadSnapshotId("no event count"))?;
        let body = hex.get(HEAD_LEN..).unwrap_or("");
        // `Token::parse` already bounds the id (and makes it even-length hex), but this is
        // the bound that matters here: no `_id` we encode is longer.
        if body.len() > 2 * MAX_BSON_LEN {
            return Err(BadSnapshotId("longer than any snapshot id"));
        }
        let bytes = hex::decode(body).map_err(|_| BadSnapshotId("not hex"))?;
        // The BSON's own length must be exactly the bytes given, checked before the reader
        // sizes a buffer from it.
        let declared = bytes
            .get(..4)
            .and_then(|len| <[u8; 4]>::try_from(len).ok())
            .map(i32::from_le_bytes)
            .ok_or(BadSnapshotId("no document"))?;
        if usize::try_from(declared).ok() != Some(bytes.len()) {
            return Err(BadSnapshotId(
                "the document's length does not match its bytes",
            ));
        }
        let document = Document::from_reader(bytes.as_slice())
            .map_err(|_| BadSnapshotId("the document is not valid BSON"))?;
        let after = document
            .get("i")
            .cloned()
            .ok_or(BadSnapshotId("the document has no _id"))?;
        Ok(Some(SnapshotId { at, count, after }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Records the largest single allocation made on this thread while armed, so a test can
    /// show that a lying length allocates nothing of its size.
    struct Largest;

    thread_local! {
        static ARMED: Cell<bool> = const { Cell::new(false) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    unsafe impl GlobalAlloc for Largest {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // `try_with`: thread-locals may be gone while a thread exits.
            let _ = ARMED.try_with(|armed| {
                if armed.get() {
                    let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
                }
            });
            // SAFETY: forwarded unchanged to the system allocator.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System.alloc` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Largest = Largest;

    /// The largest allocation `f` makes on this thread.
    fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        ARMED.with(|a| a.set(true));
        let out = f();
        ARMED.with(|a| a.set(false));
        (out, LARGEST.with(Cell::get))
    }

    const AT: Timestamp = Timestamp {
        time: 0x65A1_B2C3,
        increment: 4,
    };

    #[test]
    fn snapshot_ids_round_trip_and_sort_between_the_changes_of_t_and_ready() {
        for after in [
            Bson::ObjectId(ObjectId::new()),
            Bson::String("a/b".into()),
            Bson::Int64(-5),
            Bson::Document(doc! { "x": 1, "y": [1, 2] }),
        ] {
            let id = SnapshotId {
                at: AT,
                count: 17,
                after: after.clone(),
            };
            let token = id.encode().unwrap();
            assert_eq!(SnapshotId::decode(&token), Ok(Some(id)));
            // A client sends it back as Last-Event-ID: it parses as an id.
            assert_eq!(Token::parse(token.as_str()).unwrap(), token);
            let change_at = Token::parse("8265A1B2C3000000042B022C0100296E5A1004").unwrap();
            assert!(change_at < token && token < Token::after_cluster_time(AT));
        }
        let real = Token::parse("8265A1B2C3000000042B022C0100296E5A1004").unwrap();
        assert_eq!(SnapshotId::decode(&real), Ok(None));
        assert_eq!(SnapshotId::decode(&Token::after_cluster_time(AT)), Ok(None));
        let huge = SnapshotId {
            at: AT,
            count: 1,
            after: Bson::String("x".repeat(4000)),
        };
        assert_eq!(huge.encode(), None);
        // The longest `_id` that still gets an id decodes.
        let longest = SnapshotId {
            at: AT,
            count: 1,
            after: Bson::String("x".repeat(MAX_BSON_LEN - 16)),
        };
        let token = longest.encode().unwrap();
        assert_eq!(SnapshotId::decode(&token), Ok(Some(longest)));
    }

    /// `82` + T + `FE` + count + `body`, as a client could send it.
    fn forged(body: &[u8]) -> Token {
        Token::parse(&format!(
            "8265A1B2C300000004FE00000011{}",
            hex::encode_upper(body)
        ))
        .unwrap()
    }

    #[test]
    fn lying_lengths_are_refused_before_any_allocation_of_their_size() {
        let valid = mongodb::bson::to_vec(&doc! { "i": { "a": "b", "n": [1, 2] } }).unwrap();
        // Every declared length but the true one, at the document and at each nested length
        // field (inner document, string, array): an error or an id, never a panic, and never
        // an allocation near what the length claims.
        let mut cases = Vec::new();
        for lie in [
            i32::MAX,
            i32::MAX - 3,
            0x4000_0000,
            1 << 20,
            0,
            -1,
            i32::MIN,
            5,
        ] {
            for at in 0..valid.len().saturating_sub(4) {
                let mut bytes = valid.clone();
                bytes[at..at + 4].copy_from_slice(&lie.to_le_bytes());
                cases.push(bytes);
            }
        }
        // Truncations and extensions of a valid document.
        for len in 0..valid.len() {
            cases.push(valid[..len].to_vec());
        }
        let mut extended = valid.clone();
        extended.extend_from_slice(&[0; 16]);
        cases.push(extended);
        // A pseudo-random sweep of single-byte changes.
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bytes = valid.clone();
            let at = (seed % bytes.len() as u64) as usize;
            bytes[at] = (seed >> 32) as u8;
            cases.push(bytes);
        }
        for bytes in cases {
            let token = forged(&bytes);
            let (result, largest) = largest_allocation(|| SnapshotId::decode(&token));
            assert!(
                largest < 64 * 1024,
                "{largest} bytes allocated for {}",
                hex::encode(&bytes)
            );
            if let Ok(Some(id)) = result {
                assert_eq!(id.count, 0x11);
            }
        }
        // The whole document's length lying: a clear refusal.
        let mut bytes = valid.clone();
        bytes[..4].copy_from_slice(&i32::MAX.to_le_bytes());
        let error = SnapshotId::decode(&forged(&bytes)).unwrap_err();
        assert!(error.to_string().contains("length"), "{error}");
        assert!(SnapshotId::decode(&forged(&[])).is_err());
        assert!(SnapshotId::decode(&forged(&valid[..valid.len() - 1])).is_err());
    }
}
