//! Permission rules stored in MongoDB, managed through `/_admin/rules` and shared by every
//! instance on the cluster (like stream definitions, `streams/store.rs`).
//!
//! ```text
//!  PUT/DELETE /_admin/rules/{name} ─▶ RuleStore::put / delete ─▶ rules collection ─(oplog)─┐
//!        │                                                                                 ▼
//!        └──── reload ◀──────────────────────────── watcher (change stream, every instance)
//!                 │
//!                 ▼
//!   Authenticator::set_stored_rules ─▶ open streams re-check; a withdrawn right ends with cancel
//! ```
//!
//! * One document per rule: `{_id: <name>, roles: [..], streams: [..], updatedAt}`.
//! * Rules are few, so every change reloads the whole collection rather than applying the
//!   event: no per-key ordering to get wrong. Reloads are serialised (one mutex), each reads
//!   the primary after the change that caused it, so the last one applied is the newest state.
//!   Events already queued are drained first, so a burst of changes costs one reload.
//! * The watcher opens its change stream *before* the first load, so nothing written between
//!   the two is missed; on any error it starts over the same way, with backoff. Until it has
//!   loaded, `/health/ready` is not ready (stored grants would be missing: 403s).
//! * An invalid stored document (written around the API) is skipped with a warning; the
//!   other rules stay in force.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use mongodb::bson::{DateTime, Document, doc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::Authenticator;
use super::rules::{Rule, Rules};
use crate::backoff::Backoff;
use crate::sync::SyncFlag;
use crate::watcher::Watched;

/// Longest rule name.
const MAX_NAME: usize = 64;

/// A rule as stored and as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRule {
    /// Roles the rule applies to; `*` means any authenticated principal.
    pub roles: Vec<String>,
    /// Patterns `/{db}/{coll}/_streams/{name}`; each name is a literal or `*`.
    pub streams: Vec<String>,
}

impl StoredRule {
    /// Checks the rule as the config's are checked; the message names the member.
    pub fn validate(&self) -> Result<Rule, (&'static str, String)> {
        if self.roles.is_empty() || self.roles.iter().any(String::is_empty) {
            return Err((
                "roles",
                "roles must be a non-empty list of role names".into(),
            ));
        }
        if self.streams.is_empty() {
            return Err((
                "streams",
                "streams must list at least one /{db}/{coll}/_streams/{name} pattern".into(),
            ));
        }
        Rule::new(&self.roles, &self.streams).map_err(|e| ("streams", e))
    }
}

/// A rule name: 1 to 64 of `A-Z a-z 0-9 _ . -`.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The result of a [`RuleStore::put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutRule {
    /// No rule had this name.
    Created,
    /// A rule was replaced.
    Replaced,
}

/// Persistence of admin-API rules and their propagation to the [`Authenticator`].
pub struct RuleStore {
    collection: mongodb::Collection<Document>,
    auth: Arc<Authenticator>,
    /// Serialises reloads, so an older read never replaces a newer one.
    reload: Mutex<()>,
    /// `true` once the watcher has loaded the collection and is watching it.
    synced: crate::sync::SyncFlag,
}

impl RuleStore {
    /// A store on `database.collection`, applying to `auth`. Does no I/O.
    pub fn new(
        client: &mongodb::Client,
        database: &str,
        collection: &str,
        auth: Arc<Authenticator>,
    ) -> Arc<RuleStore> {
        Arc::new(RuleStore {
            collection: client.database(database).collection(collection),
            auth,
            reload: Mutex::new(()),
            synced: crate::sync::SyncFlag::default(),
        })
    }

    /// Every stored rule, by name.
    pub async fn list(&self) -> Result<Vec<(String, StoredRule)>, mongodb::error::Error> {
        let mut cursor = self
            .collection
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await?;
        let mut rules = Vec::new();
        while let Some(document) = cursor.next().await {
            if let Some(rule) = parse(&document?) {
                rules.push(rule);
            }
        }
        Ok(rules)
    }

    /// One stored rule.
    pub async fn get(&self, name: &str) -> Result<Option<StoredRule>, mongodb::error::Error> {
        let document = self.collection.find_one(doc! { "_id": name }).await?;
        Ok(document.as_ref().and_then(parse).map(|(_, rule)| rule))
    }

    /// Stores a (validated) rule and applies the new set here at once; the watcher of every
    /// other instance applies it from the change stream.
    pub async fn put(
        &self,
        name: &str,
        rule: &StoredRule,
    ) -> Result<PutRule, mongodb::error::Error> {
        let document = doc! {
            "_id": name,
            "roles": &rule.roles,
            "streams": &rule.streams,
            "updatedAt": DateTime::now(),
        };
        let result = self
            .collection
            .replace_one(doc! { "_id": name }, document)
            .upsert(true)
            .await?;
        self.reload().await?;
        Ok(if result.upserted_id.is_some() {
            PutRule::Created
        } else {
            PutRule::Replaced
        })
    }

    /// Deletes a stored rule and applies the new set here at once. Returns whether it existed.
    pub async fn delete(&self, name: &str) -> Result<bool, mongodb::error::Error> {
        let result = self.collection.delete_one(doc! { "_id": name }).await?;
        self.reload().await?;
        Ok(result.deleted_count > 0)
    }

    /// Reads every stored rule and puts the set in force.
    async fn reload(&self) -> Result<(), mongodb::error::Error> {
        let _turn = self.reload.lock().await;
        let rules = self.list().await?;
        let count = rules.len();
        let compiled = rules
            .iter()
            .filter_map(|(name, rule)| match rule.validate() {
                Ok(rule) => Some(rule),
                Err((_, error)) => {
                    tracing::warn!(rule = name, %error, "ignoring invalid stored rule");
                    None
                }
            })
            .collect();
        self.auth.set_stored_rules(Rules::new(compiled));
        tracing::debug!(rules = count, "stored permission rules loaded");
        Ok(())
    }
}

impl Watched for RuleStore {
    const WHAT: &'static str = "rules";
    type Error = mongodb::error::Error;

    fn synced_flag(&self) -> &SyncFlag {
        &self.synced
    }

    /// Watch, load, then reload on every change until the stream ends (returns why) or fails.
    async fn sync_and_watch(
        &self,
        backoff: &mut Backoff,
    ) -> Result<&'static str, mongodb::error::Error> {
        let mut stream = self.collection.watch().await?;
        self.reload().await?;
        self.synced.set(true);
        backoff.reset();
        while let Some(event) = stream.next().await {
            let mut ended = is_end(&event?);
            // Take whatever else is already here: one reload covers them all.
            while let Some(Some(event)) = stream.next().now_or_never() {
                ended |= is_end(&event?);
            }
            if ended {
                return Ok("the rules collection was dropped or renamed");
            }
            self.reload().await?;
        }
        Ok("the change stream ended")
    }
}

/// Whether a change-stream event means the collection is gone (start over).
fn is_end(event: &mongodb::change_stream::event::ChangeStreamEvent<Document>) -> bool {
    use mongodb::change_stream::event::OperationType;
    matches!(
        event.operation_type,
        OperationType::Drop
            | OperationType::DropDatabase
            | OperationType::Rename
            | OperationType::Invalidate
    )
}

/// A stored document as `(name, rule)`; `None` (with a warning) when it is malformed.
fn parse(document: &Document) -> Option<(String, StoredRule)> {
    let name = document.get_str("_id").ok()?.to_owned();
    let strings = |field: &str| -> Option<Vec<String>> {
        document
            .get_array(field)
            .ok()?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    match (strings("roles"), strings("streams")) {
        (Some(roles), Some(streams)) => Some((name, StoredRule { roles, streams })),
        _ => {
            tracing::warn!(
                rule = name,
                "ignoring stored rule without string arrays roles/streams"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_rules_are_checked() {
        assert!(valid_name("readers-2024.v1_x"));
        assert!(!valid_name(""));
        assert!(!valid_name("config[0]"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(65)));
        let rule = |roles: &[&str], streams: &[&str]| StoredRule {
            roles: roles.iter().map(|s| s.to_string()).collect(),
            streams: streams.iter().map(|s| s.to_string()).collect(),
        };
        assert!(rule(&["r"], &["/a/b/_streams/*"]).validate().is_ok());
        assert_eq!(
            rule(&[], &["/a/b/_streams/*"]).validate().unwrap_err().0,
            "roles"
        );
        assert_eq!(rule(&["r"], &[]).validate().unwrap_err().0, "streams");
        assert_eq!(rule(&["r"], &["/a/b"]).validate().unwrap_err().0, "streams");
    }

    #[test]
    fn stored_documents_are_parsed() {
        let good = doc! { "_id": "r1", "roles": ["a"], "streams": ["/a/b/_streams/c"] };
        let (name, rule) = parse(&good).unwrap();
        assert_eq!(name, "r1");
        assert_eq!(rule.roles, ["a"]);
        assert!(parse(&doc! { "_id": "r1", "roles": "a", "streams": [] }).is_none());
        assert!(parse(&doc! { "_id": "r1", "roles": [1], "streams": [] }).is_none());
    }
}
