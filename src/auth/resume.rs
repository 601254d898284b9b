//! Resume ids that cannot be real: refused with 400 before streaming starts.
//!
//! A well-formed but impossible `Last-Event-ID` used to be accepted and then deliver nothing,
//! forever (the stream waited for a position the cluster had not reached). Two checks, both
//! from the token itself (a resume token's `_data` is a KeyString of
//! `{clusterTime, version, tokenType, txnOpIndex, fromInvalidate, uuid, eventIdentifier}`):
//!
//! 1. **Cluster time from the future.** The first field is the change's cluster time. A real
//!    event's time is at most the cluster's current time (it was committed), so a time later
//!    than that plus [`FUTURE_ALLOWANCE`] is refused (`reason: "future_cluster_time"`). The
//!    current time is the `$clusterTime` of a `ping`, asked only when the token is later than
//!    the latest one seen, so ordinary resumes cost no round trip.
//! 2. **Another collection.** An event token of version 1 or 2 (MongoDB 4.2+) carries the
//!    UUID of its collection right after four fixed-form fields. It is decoded only when every
//!    byte before it has the one form those fields take (small non-negative integers, a
//!    boolean, then BinData of 16 bytes, subtype 4); anything else (older formats, high-water
//!    mark tokens, which have no UUID) is not judged. A UUID that differs from the watched
//!    collection's (`listCollections`) is refused (`reason: "other_collection"`); a collection
//!    dropped and recreated has a new UUID, so its old tokens are refused too, which is right:
//!    they cannot be resumed on the new collection.
//!
//! If MongoDB cannot be asked (an outage), the checks are skipped: the subscribe then takes
//! its usual course (the worker retries), rather than refusing valid ids.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{Timestamp, doc};

use crate::event::Token;
use crate::streams::StreamKey;

/// How far past the cluster's current time a token may be (the cluster time we read may
/// trail a just-committed write by a little; a real token is never later than that).
pub const FUTURE_ALLOWANCE: Duration = Duration::from_secs(10);
/// How long to wait for MongoDB's answer before skipping a check.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// KeyString type bytes met in a resume token's prefix.
mod ks {
    /// Numeric zero.
    pub const ZERO: u8 = 0x29;
    /// Positive integer held in 1 byte; up to `+7` for 8 bytes (value shifted left by one).
    pub const POSITIVE_1_BYTE: u8 = 0x2B;
    pub const POSITIVE_8_BYTES: u8 = 0x32;
    pub const FALSE: u8 = 0x6E;
    pub const TRUE: u8 = 0x6F;
    pub const BIN_DATA: u8 = 0x5A;
    pub const TIMESTAMP: u8 = 0x82;
    /// BinData subtype 4: UUID.
    pub const UUID_SUBTYPE: u8 = 0x04;
}

/// What a token says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decoded {
    /// Cluster time of the change.
    time: Timestamp,
    /// UUID of its collection, when the token has one in a form we read with certainty.
    uuid: Option<[u8; 16]>,
}

fn decode(token: &Token) -> Option<Decoded> {
    let bytes = hex::decode(token.as_str()).ok()?;
    if bytes.first() != Some(&ks::TIMESTAMP) {
        return None;
    }
    let raw = u64::from_be_bytes(bytes.get(1..9)?.try_into().ok()?);
    let time = Timestamp {
        time: (raw >> 32) as u32,
        increment: raw as u32,
    };
    Some(Decoded {
        time,
        uuid: collection_uuid(&bytes[9..]),
    })
}

/// The collection UUID after the token's cluster time, or `None` unless every byte before it
/// is in the expected form.
fn collection_uuid(rest: &[u8]) -> Option<[u8; 16]> {
    // version: 1 or 2 (encoded shifted left by one).
    let (version, mut at) = match rest {
        [ks::POSITIVE_1_BYTE, v, ..] => (v >> 1, 2),
        _ => return None,
    };
    if !(1..=2).contains(&version) {
        return None;
    }
    // tokenType, txnOpIndex: non-negative integers.
    for _ in 0..2 {
        match *rest.get(at)? {
            ks::ZERO => at += 1,
            t @ ks::POSITIVE_1_BYTE..=ks::POSITIVE_8_BYTES => {
                at += 1 + usize::from(t - ks::POSITIVE_1_BYTE + 1);
            }
            _ => return None,
        }
    }
    // fromInvalidate
    match *rest.get(at)? {
        ks::FALSE | ks::TRUE => at += 1,
        _ => return None,
    }
    // uuid: BinData, length 16, subtype 4.
    if rest.get(at..at + 3)? != [ks::BIN_DATA, 16, ks::UUID_SUBTYPE] {
        return None;
    }
    rest.get(at + 3..at + 19)?.try_into().ok()
}

/// Checks resume ids against the cluster; caches what it learns.
pub struct ResumeCheck {
    client: mongodb::Client,
    /// The latest cluster time read: tokens at or before it need no round trip.
    latest: Mutex<Option<Timestamp>>,
    /// Collection UUIDs seen, per `(db, coll)`. Only a match is trusted from here: a mismatch
    /// is rechecked against MongoDB (the collection may have been recreated).
    uuids: Mutex<HashMap<(String, String), [u8; 16]>>,
    /// One question to MongoDB at a time: a restart storm of N resumes on a fresh server asks
    /// once and the others find the answer cached, instead of N questions opening N pooled
    /// connections.
    asking: tokio::sync::Mutex<()>,
}

/// A resume id that cannot be a position of the stream's collection. The HTTP layer answers
/// it 400 with `reason` in the problem body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct ResumeRefused {
    /// Stable, machine-readable: `future_cluster_time` or `other_collection`.
    pub reason: &'static str,
    /// For a human: what is wrong with the id.
    pub detail: String,
}

impl ResumeCheck {
    /// A checker asking `client`. Does no I/O.
    pub fn new(client: mongodb::Client) -> ResumeCheck {
        ResumeCheck {
            client,
            latest: Mutex::new(None),
            uuids: Mutex::new(HashMap::new()),
            asking: tokio::sync::Mutex::new(()),
        }
    }

    /// `Ok` unless `token` cannot be a position of `key`'s collection; the refusal says why.
    pub async fn check(&self, key: &StreamKey, token: &Token) -> Result<(), ResumeRefused> {
        let Some(decoded) = decode(token) else {
            return Ok(());
        };
        let reachable = self.check_time(decoded.time).await?;
        // MongoDB just failed to answer: do not wait for it a second time.
        if let (true, Some(uuid)) = (reachable, decoded.uuid) {
            self.check_collection(key, uuid).await?;
        }
        Ok(())
    }

    /// Refuses a time from the future; `Ok(false)` when MongoDB could not be asked.
    async fn check_time(&self, time: Timestamp) -> Result<bool, ResumeRefused> {
        let reached = |check: &ResumeCheck| {
            crate::sync::lock(&check.latest).is_some_and(|latest| time <= latest)
        };
        if reached(self) {
            return Ok(true);
        }
        let _turn = self.asking.lock().await;
        if reached(self) {
            return Ok(true);
        }
        let Some(now) = self.cluster_time().await else {
            return Ok(false);
        };
        {
            let mut latest = crate::sync::lock(&self.latest);
            if latest.is_none_or(|l| now > l) {
                *latest = Some(now);
            }
        }
        let allowance = u32::try_from(FUTURE_ALLOWANCE.as_secs()).unwrap_or(u32::MAX);
        if time.time > now.time.saturating_add(allowance) {
            return Err(ResumeRefused {
                reason: "future_cluster_time",
                detail: format!(
                    "the event id is not a position this cluster has reached: its cluster \
                     time ({}) is later than the cluster's current time ({}); it was not \
                     issued for this deployment",
                    time.time, now.time
                ),
            });
        }
        Ok(true)
    }

    async fn check_collection(&self, key: &StreamKey, uuid: [u8; 16]) -> Result<(), ResumeRefused> {
        let cache_key = (key.db.clone(), key.coll.clone());
        let cached = |check: &ResumeCheck| {
            crate::sync::lock(&check.uuids).get(&cache_key).copied() == Some(uuid)
        };
        if cached(self) {
            return Ok(());
        }
        let _turn = self.asking.lock().await;
        if cached(self) {
            return Ok(());
        }
        // Not there (yet): a change stream may watch a collection before it exists.
        let Some(actual) = self.collection_uuid(&key.db, &key.coll).await else {
            return Ok(());
        };
        crate::sync::lock(&self.uuids).insert(cache_key, actual);
        if actual != uuid {
            return Err(ResumeRefused {
                reason: "other_collection",
                detail: format!(
                    "the event id belongs to another collection (UUID {}), not {}.{} (UUID \
                     {}): resume with an id this stream sent",
                    hex::encode(uuid),
                    key.db,
                    key.coll,
                    hex::encode(actual)
                ),
            });
        }
        Ok(())
    }

    /// The cluster's current time (`$clusterTime` of a `ping`), `None` if MongoDB does not
    /// answer in time.
    async fn cluster_time(&self) -> Option<Timestamp> {
        let admin = self.client.database("admin");
        let ping = admin.run_command(doc! { "ping": 1 });
        let reply = match tokio::time::timeout(ASK_TIMEOUT, ping).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => {
                tracing::debug!(%error, "resume check: no cluster time; check skipped");
                return None;
            }
            Err(_) => return None,
        };
        reply
            .get_document("$clusterTime")
            .ok()
            .and_then(|c| c.get_timestamp("clusterTime").ok())
            .or_else(|| reply.get_timestamp("operationTime").ok())
    }

    /// The collection's UUID, `None` if it does not exist or MongoDB does not answer.
    async fn collection_uuid(&self, db: &str, coll: &str) -> Option<[u8; 16]> {
        let ask = async {
            let mut cursor = self
                .client
                .database(db)
                .list_collections()
                .filter(doc! { "name": coll })
                .await?;
            let mut found = None;
            if let Some(spec) = cursor.next().await {
                found = spec?
                    .info
                    .uuid
                    .and_then(|binary| <[u8; 16]>::try_from(binary.bytes.as_slice()).ok());
            }
            Ok::<_, mongodb::error::Error>(found)
        };
        match tokio::time::timeout(ASK_TIMEOUT, ask).await {
            Ok(Ok(uuid)) => uuid,
            Ok(Err(error)) => {
                tracing::debug!(%error, "resume check: no collection UUID; check skipped");
                None
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real insert event id (MongoDB 7): version 1, event token, collection UUID, then
    /// `{operationType, documentKey}`.
    const REAL: &str = "82635019A0000000012B022C0100296E5A1004AB1154ACACD849A48C61756D70D3B21F463C6F7065726174696F6E54797065003C696E736572740046646F63756D656E744B65790046645F69640064635019A078BE67426D7CF4D2000004";

    #[test]
    fn decodes_time_and_collection() {
        let decoded = decode(&Token::parse(REAL).unwrap()).unwrap();
        assert_eq!(
            decoded.time,
            Timestamp {
                time: 0x6350_19A0,
                increment: 1
            }
        );
        assert_eq!(
            hex::encode_upper(decoded.uuid.unwrap()),
            "AB1154ACACD849A48C61756D70D3B21F"
        );
    }

    #[test]
    fn undecodable_prefixes_are_not_judged() {
        // A high-water-mark token: no UUID.
        let hwm = Token::parse("8265A1B2C3000000012B0229296E04").unwrap();
        assert_eq!(decode(&hwm).unwrap().uuid, None);
        // Version 0 or an unexpected type byte: not judged.
        let v0 = REAL.replacen("2B02", "2B00", 1);
        assert_eq!(decode(&Token::parse(&v0).unwrap()).unwrap().uuid, None);
        let odd = REAL.replacen("296E5A", "296E3C", 1);
        assert_eq!(decode(&Token::parse(&odd).unwrap()).unwrap().uuid, None);
        // Too short to hold a UUID.
        let short = Token::parse(&REAL[..60]).unwrap();
        assert_eq!(decode(&short).unwrap().uuid, None);
    }
}
