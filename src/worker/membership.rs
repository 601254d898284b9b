//! Membership per change (PROTOCOL.md §10): one change, up to three encodings, each client
//! gets the one its filter says.
//!
//! For a stream whose filter reads the document, every update/replace is judged on both images
//! (`crate::membership` for the pipeline's `$match`, `crate::routing` for claims and routed
//! bindings): the stream-wide verdict and the routing values of the pre-image sit beside the
//! post-image's in the ring entry ([`Moves`]). A client's filter then picks, in O(its rules):
//!
//! | before | after | the client gets |
//! |---|---|---|
//! | yes | yes | the change as MongoDB sent it |
//! | yes | no  | the removal: the change plus `"streamgate":{"membership":"left"}` |
//! | no  | yes | the entry: the change (with its `fullDocument`) plus `"streamgate":{"membership":"entered"}` |
//! | no  | no  | nothing |
//!
//! The removal and entry encodings are made only when some filter can pick them (the images'
//! verdicts or values differ), once per change for all clients, like the plain one. A change
//! without a pre-image (the collection does not record them, or it expired) is decided by its
//! post-image alone, as before membership, and counted (`membership_without_pre_image`).
//! Deletes are decided by their pre-image: they go to the clients the document belonged to.
//!
//! [`check_pre_images`] runs when a worker starts: it reads the collection's
//! `changeStreamPreAndPostImages`, turns it on (`collMod`) when configured to, and otherwise
//! logs the command to run.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{Bson, Document, doc};

use super::hub::Routed;
use super::source::RawChange;
use crate::event::{EncodeError, Event};
use crate::membership::{MARKER, Membership};
use crate::routing::{ClientFilter, Image, MatchRule, RouteValues, image_values, route_values};

/// How long the pre-image check may take before the worker opens its cursor anyway.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What a ring entry knows about the document's membership before and after its change.
#[derive(Debug)]
pub(crate) struct Moves {
    /// The pipeline's `$match` on the document after the change (`true` without one).
    post: bool,
    /// Before the change: the pipeline's verdict and the routing values of the pre-image.
    /// `None`: no pre-image, the post-image decides alone.
    pre: Option<(bool, RouteValues)>,
    /// The change as a removal, when some client can get one.
    left: Option<Arc<Event>>,
    /// The change as an entry, when some client can get one.
    entered: Option<Arc<Event>>,
}

impl Moves {
    /// Routing values of the pre-image, if they may route this change to other partitions.
    pub(crate) fn pre_values(&self) -> Option<&RouteValues> {
        self.pre.as_ref().map(|(_, values)| values)
    }
}

impl Routed {
    /// The encoding of this change for a client with `filter` (`None`: no routing rules), or
    /// `None` when the change is not for it.
    pub(crate) fn for_client(&self, filter: Option<&ClientFilter>) -> Option<&Arc<Event>> {
        let rules_after = filter.is_none_or(|f| f.matches(&self.values));
        let Some(moves) = &self.moves else {
            return rules_after.then_some(&self.event);
        };
        let after = moves.post && rules_after;
        let Some((pipeline_before, values_before)) = &moves.pre else {
            return after.then_some(&self.event);
        };
        let before = *pipeline_before && filter.is_none_or(|f| f.matches(values_before));
        match (before, after) {
            (true, true) => Some(&self.event),
            (true, false) => moves.left.as_ref(),
            (false, true) => moves.entered.as_ref(),
            (false, false) => None,
        }
    }
}

/// A change being encoded for the workers it is for (one for a worker's own cursor, one per
/// member on its collection for a database feed): each encoding is made once.
pub(crate) struct Encoder {
    raw: RawChange,
    /// The change as MongoDB sent it; with the pre-image removed.
    plain: [Option<Arc<Event>>; 2],
}

impl Encoder {
    pub(crate) fn new(raw: RawChange) -> Encoder {
        Encoder {
            raw,
            plain: [None, None],
        }
    }

    /// The ring entry for a worker with `rules` and `membership`, and whether the change is an
    /// update/replace that should have had a pre-image and had none.
    pub(crate) fn routed(
        &mut self,
        rules: &[MatchRule],
        membership: Option<&Membership>,
    ) -> Result<(Routed, bool), EncodeError> {
        let doc = &self.raw.doc;
        let Some(membership) = membership.filter(|_| !self.raw.skipped) else {
            let values = route_values(rules, doc);
            return Ok((self.routed_plain(values, None, false)?, false));
        };
        let operation = doc.get_str("operationType").unwrap_or("");
        let has_pre_image = matches!(doc.get("fullDocumentBeforeChange"), Some(Bson::Document(_)));
        let filter = membership.filter.as_ref();
        let strip = membership.strip_pre_image;
        let (values, moves, missing) = match operation {
            "update" | "replace" => {
                let values = image_values(rules, doc, Image::Post);
                let post = filter.is_none_or(|f| f.matches_change(doc));
                let pre = has_pre_image.then(|| {
                    let before = filter.is_none_or(|f| f.matches_pre_image(doc));
                    (before, image_values(rules, doc, Image::Pre))
                });
                (values, Some((post, pre)), !has_pre_image)
            }
            // The document's last state decides who learns it is gone.
            "delete" => {
                let post = filter.is_none_or(|f| {
                    if has_pre_image {
                        f.matches_pre_image(doc)
                    } else {
                        f.matches_change(doc)
                    }
                });
                (route_values(rules, doc), Some((post, None)), false)
            }
            "insert" => {
                let post = filter.is_none_or(|f| f.matches_change(doc));
                (route_values(rules, doc), Some((post, None)), false)
            }
            _ => (route_values(rules, doc), None, false),
        };
        let moves = match moves {
            None => None,
            Some((post, pre)) => {
                let (left, entered) = match &pre {
                    Some((before, values_before)) => {
                        let differ = values_before != &values;
                        let left = (*before && (!post || differ))
                            .then(|| self.variant("left", strip))
                            .transpose()?;
                        let entered = (post && (!*before || differ))
                            .then(|| self.variant("entered", strip))
                            .transpose()?;
                        (left, entered)
                    }
                    None => (None, None),
                };
                Some(Arc::new(Moves {
                    post,
                    pre,
                    left,
                    entered,
                }))
            }
        };
        Ok((self.routed_plain(values, moves, strip)?, missing))
    }

    fn routed_plain(
        &mut self,
        values: RouteValues,
        moves: Option<Arc<Moves>>,
        strip: bool,
    ) -> Result<Routed, EncodeError> {
        let slot = usize::from(strip);
        let event = match &self.plain[slot] {
            Some(event) => Arc::clone(event),
            None => {
                let event = Arc::new(if self.raw.skipped {
                    Event::skipped(&self.raw.id, &self.raw.doc)
                } else {
                    Event::from_change(self.document(strip))?
                });
                self.plain[slot] = Some(Arc::clone(&event));
                event
            }
        };
        Ok(Routed {
            id: self.raw.id.clone(),
            event,
            values,
            moves,
        })
    }

    /// The change document to encode: without the pre-image when only membership asked for it.
    fn document(&self, strip: bool) -> Document {
        let mut doc = self.raw.doc.clone();
        if strip {
            doc.remove("fullDocumentBeforeChange");
        }
        doc
    }

    /// The change marked as a removal or an entry.
    fn variant(&self, membership: &str, strip: bool) -> Result<Arc<Event>, EncodeError> {
        let mut doc = self.document(strip);
        doc.insert(MARKER, doc! { "membership": membership });
        Event::from_change(doc).map(Arc::new)
    }
}

/// Whether the collection records pre-images, as the worker found or made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PreImages {
    /// `changeStreamPreAndPostImages` is on.
    On,
    /// It was off and this call turned it on.
    Enabled,
    /// Off (or unknown): the warning to show, naming the command to run.
    Off(String),
}

/// The command that turns pre-images on, as an operator would type it in `mongosh`.
pub(crate) fn coll_mod_advice(db: &str, coll: &str) -> String {
    format!(
        "membership (entries and removals, PROTOCOL.md §10) needs pre-images on {db}.{coll}; run \
         db.getSiblingDB({db:?}).runCommand({{collMod: {coll:?}, changeStreamPreAndPostImages: \
         {{enabled: true}}}}) (or set enable_pre_images / \"enablePreImages\": true with the \
         collMod privilege); until then documents leaving the filter are not removed"
    )
}

/// Reads the collection's pre-image setting and, with `enable`, turns it on (creating the
/// collection with it when it does not exist yet).
pub(crate) async fn check_pre_images(
    client: &mongodb::Client,
    db: &str,
    coll: &str,
    enable: bool,
) -> PreImages {
    let check = async {
        let database = client.database(db);
        let listed = database
            .run_command(doc! {
                "listCollections": 1,
                "filter": { "name": coll },
                "authorizedCollections": true,
            })
            .await
            .map_err(|e| e.to_string())?;
        let found = listed
            .get_document("cursor")
            .and_then(|c| c.get_array("firstBatch"))
            .ok()
            .and_then(|batch| batch.first())
            .and_then(Bson::as_document)
            .cloned();
        let on = found.as_ref().is_some_and(|spec| {
            spec.get_document("options")
                .and_then(|o| o.get_document("changeStreamPreAndPostImages"))
                .and_then(|p| p.get_bool("enabled"))
                .unwrap_or(false)
        });
        if on {
            return Ok(PreImages::On);
        }
        if !enable {
            return Err(String::new());
        }
        let command = if found.is_some() {
            doc! { "collMod": coll, "changeStreamPreAndPostImages": { "enabled": true } }
        } else {
            doc! { "create": coll, "changeStreamPreAndPostImages": { "enabled": true } }
        };
        match database.run_command(command).await {
            Ok(_) => Ok(PreImages::Enabled),
            // Created meanwhile by a writer: modify it instead.
            Err(_) if found.is_none() => database
                .run_command(
                    doc! { "collMod": coll, "changeStreamPreAndPostImages": { "enabled": true } },
                )
                .await
                .map(|_| PreImages::Enabled)
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        }
    };
    let outcome = tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    match outcome {
        Ok(state) => state,
        Err(why) if why.is_empty() => PreImages::Off(coll_mod_advice(db, coll)),
        Err(why) => PreImages::Off(format!(
            "{} (turning them on failed: {why})",
            coll_mod_advice(db, coll)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Token;
    use crate::membership::Matcher;
    use crate::routing::RuleSource;
    use std::collections::BTreeMap;

    fn token() -> Token {
        Token::parse("8200000001000000012B").unwrap()
    }

    fn raw(doc: Document) -> RawChange {
        let mut doc = doc;
        doc.insert("_id", doc! { "_data": token().as_str() });
        RawChange {
            id: token(),
            doc,
            skipped: false,
        }
    }

    fn rules() -> Vec<MatchRule> {
        vec![MatchRule {
            field: vec!["fullDocument".into(), "t".into()],
            source: RuleSource::Var("t".into()),
            pre_image: true,
        }]
    }

    fn tenant(t: &str) -> Arc<ClientFilter> {
        let mut routed = BTreeMap::new();
        routed.insert("t".to_owned(), Bson::from(t));
        ClientFilter::build(&rules(), None, &routed)
            .unwrap()
            .unwrap()
    }

    fn marker(event: Option<&Arc<Event>>) -> Option<String> {
        let event = event?;
        let data: serde_json::Value = serde_json::from_slice(&event.data()).unwrap();
        assert!(data.get("fullDocumentBeforeChange").is_none(), "stripped");
        Some(
            data[MARKER]["membership"]
                .as_str()
                .unwrap_or("plain")
                .to_owned(),
        )
    }

    #[test]
    fn a_tenant_change_is_a_removal_for_one_and_an_entry_for_the_other() {
        let membership = Membership {
            filter: None,
            strip_pre_image: true,
            enable_pre_images: false,
        };
        let mut encoder = Encoder::new(raw(doc! {
            "operationType": "update",
            "documentKey": {"_id": 1},
            "fullDocument": {"_id": 1, "t": "B"},
            "fullDocumentBeforeChange": {"_id": 1, "t": "A"},
        }));
        let (routed, missing) = encoder.routed(&rules(), Some(&membership)).unwrap();
        assert!(!missing);
        assert_eq!(
            marker(routed.for_client(Some(&tenant("A")))),
            Some("left".into())
        );
        assert_eq!(
            marker(routed.for_client(Some(&tenant("B")))),
            Some("entered".into())
        );
        assert_eq!(marker(routed.for_client(Some(&tenant("C")))), None);
    }

    #[test]
    fn a_status_change_leaves_the_pipeline_filter_and_same_tenant_updates_stay_plain() {
        let filter = Matcher::compile(&doc! {"fullDocument.s": "open"}).unwrap();
        let membership = Membership {
            filter: Some(filter),
            strip_pre_image: true,
            enable_pre_images: false,
        };
        let change = |before: &str, after: &str| {
            raw(doc! {
                "operationType": "update",
                "documentKey": {"_id": 1},
                "fullDocument": {"_id": 1, "t": "A", "s": after},
                "fullDocumentBeforeChange": {"_id": 1, "t": "A", "s": before},
            })
        };
        let decide = |before, after| {
            let (routed, _) = Encoder::new(change(before, after))
                .routed(&rules(), Some(&membership))
                .unwrap();
            (
                marker(routed.for_client(Some(&tenant("A")))),
                routed
                    .moves
                    .as_ref()
                    .is_some_and(|m| m.left.is_some() || m.entered.is_some()),
            )
        };
        assert_eq!(decide("open", "closed"), (Some("left".into()), true));
        assert_eq!(decide("closed", "open"), (Some("entered".into()), true));
        assert_eq!(decide("open", "open"), (Some("plain".into()), false));
        assert_eq!(decide("closed", "closed"), (None, false));
    }

    #[test]
    fn without_a_pre_image_the_post_image_decides_and_it_is_counted() {
        let membership = Membership {
            filter: None,
            strip_pre_image: false,
            enable_pre_images: false,
        };
        let (routed, missing) = Encoder::new(raw(doc! {
            "operationType": "update",
            "documentKey": {"_id": 1},
            "fullDocument": {"_id": 1, "t": "B"},
        }))
        .routed(&rules(), Some(&membership))
        .unwrap();
        assert!(missing);
        assert_eq!(
            marker(routed.for_client(Some(&tenant("B")))),
            Some("plain".into())
        );
        assert_eq!(marker(routed.for_client(Some(&tenant("A")))), None);
    }
}
