//! What a change stream watches: a stream's key, its definition as an operator writes it
//! (checked and compiled in `streams::definition`), the `fullDocument…` options and the
//! [`WatchSpec`] a worker opens its cursor with. The foundation under `streams/` (which builds
//! these) and `config.rs`, `worker/`, `limits.rs` (which use them): nothing here imports
//! any of them.

use std::fmt;

use mongodb::bson::Document;
use mongodb::options::{ChangeStreamOptions, FullDocumentBeforeChangeType, FullDocumentType};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::routing::MatchRule;

/// Longest name accepted for a database, collection or stream.
pub(crate) const MAX_NAME_LEN: usize = 64;

/// `(db, coll, name)`: the identity of a stream and the path it is served on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct StreamKey {
    /// Database watched.
    pub db: String,
    /// Collection watched.
    pub coll: String,
    /// Stream name, unique per collection.
    pub name: String,
}

impl StreamKey {
    /// Builds a key, checking that each part is a valid MongoDB name and URL-safe.
    pub fn new(db: &str, coll: &str, name: &str) -> Result<StreamKey, DefinitionError> {
        check_name("db", db, false)?;
        check_name("coll", coll, true)?;
        check_name("name", name, false)?;
        if coll.starts_with("system.") {
            return Err(DefinitionError::new(
                "coll",
                "system collections cannot be streamed",
            ));
        }
        Ok(StreamKey {
            db: db.to_owned(),
            coll: coll.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/{}/_streams/{}", self.db, self.coll, self.name)
    }
}

fn check_name(field: &str, value: &str, allow_dot: bool) -> Result<(), DefinitionError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(DefinitionError::new(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (allow_dot && b == b'.'));
    if !ok || value.starts_with('.') || value.ends_with('.') {
        let allowed = if allow_dot {
            "letters, digits, '_', '-' and '.'"
        } else {
            "letters, digits, '_' and '-'"
        };
        return Err(DefinitionError::new(
            field,
            format!("{value:?} may only contain {allowed}"),
        ));
    }
    Ok(())
}

/// A definition was refused; `field` names the offending part (`pipeline[1].$match…`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct DefinitionError {
    /// Path of the offending field or stage.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl DefinitionError {
    /// A new error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        DefinitionError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `fullDocument` option of a change stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FullDocument {
    /// Only deltas for updates.
    Default,
    /// Look up the current document on update (the default here, as in RESTHeart).
    #[default]
    UpdateLookup,
    /// Post-image if the collection records them.
    WhenAvailable,
    /// Post-image, or an error.
    Required,
}

/// `fullDocumentBeforeChange` option of a change stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FullDocumentBeforeChange {
    /// No pre-image.
    #[default]
    Off,
    /// Pre-image if the collection records them.
    WhenAvailable,
    /// Pre-image, or an error.
    Required,
}

/// A stream definition as written by an operator: the one type behind an admin PUT body (inside
/// [`StreamView`](crate::admin::view::StreamView)), a stored definition, and a config file's
/// `[[streams]]` table (inside [`StreamConfig`](crate::config::StreamConfig)). The members it
/// accepts are these fields; unknown ones are refused by serde, naming them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamDefinition {
    /// Change-stream stages, possibly with `{"$var": …}` placeholders.
    #[serde(default, alias = "stages")]
    pub pipeline: Value,
    /// `fullDocument` option.
    #[serde(default)]
    pub full_document: FullDocument,
    /// `fullDocumentBeforeChange` option.
    #[serde(default)]
    pub full_document_before_change: FullDocumentBeforeChange,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Per-user filtering: `{"<field path>": {"$claim": "<claim>"}}`, evaluated inside
    /// Streamgate for each client from its verified token (see `crate::routing`).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_rules: Option<Value>,
    /// Start every subscription with the current documents (`?snapshot=true` for all clients,
    /// PROTOCOL.md §6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
    /// Decide membership (PROTOCOL.md §10) when the filter reads the document: removals and
    /// entries for documents that stop or start matching. On by default.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub membership: bool,
    /// Turn on the collection's `changeStreamPreAndPostImages` (a `collMod`) when a worker of
    /// this stream starts and finds them off (as `[streams] enable_pre_images` does for all).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_pre_images: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl Default for StreamDefinition {
    fn default() -> Self {
        StreamDefinition {
            pipeline: Value::Array(Vec::new()),
            full_document: FullDocument::default(),
            full_document_before_change: FullDocumentBeforeChange::default(),
            description: None,
            match_rules: None,
            snapshot: false,
            membership: true,
            enable_pre_images: false,
        }
    }
}

/// Everything a worker needs to open (and reopen) its cursor.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Database watched.
    pub db: String,
    /// Collection watched.
    pub coll: String,
    /// The pipeline with variables substituted.
    pub pipeline: Vec<Document>,
    /// `fullDocument`.
    pub full_document: FullDocument,
    /// `fullDocumentBeforeChange`.
    pub full_document_before_change: FullDocumentBeforeChange,
    /// Per-user `match` rules (empty: no filtering).
    pub routing: Vec<MatchRule>,
    /// How membership is decided (PROTOCOL.md §10); `None`: post-image filtering only.
    pub membership: Option<std::sync::Arc<crate::membership::Membership>>,
}

impl WatchSpec {
    /// Driver options for this spec (the caller adds resume position and timing).
    pub fn options(&self) -> ChangeStreamOptions {
        let mut options = ChangeStreamOptions::default();
        options.full_document = match self.full_document {
            FullDocument::Default => None,
            FullDocument::UpdateLookup => Some(FullDocumentType::UpdateLookup),
            FullDocument::WhenAvailable => Some(FullDocumentType::WhenAvailable),
            FullDocument::Required => Some(FullDocumentType::Required),
        };
        options.full_document_before_change = match self.full_document_before_change {
            FullDocumentBeforeChange::Off => None,
            FullDocumentBeforeChange::WhenAvailable => {
                Some(FullDocumentBeforeChangeType::WhenAvailable)
            }
            FullDocumentBeforeChange::Required => Some(FullDocumentBeforeChangeType::Required),
        };
        options
    }
}
