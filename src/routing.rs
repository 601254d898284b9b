//! Per-client document routing on a shared cursor: claims and variable bindings, one mechanism.
//!
//! Two kinds of rule route an event to some clients only, evaluated inside Streamgate:
//!
//! * a definition's `match` rules (`{"fullDocument.tenantId": {"$claim": "tenant"}}`), valued
//!   from the client's verified token claims;
//! * a `$var` that is only the value of an equality or `$in` in a top-level `$match`
//!   (`{"fullDocument.owner": {"$var": "who"}}`): the stream runs ONE cursor without that
//!   condition and each client's binding becomes a rule (see `definition::CompiledDefinition::bind`).
//!
//! Routing an event costs O(matching clients), not O(all clients):
//!
//! * Clients with the same claim values share a **partition** (one broadcast channel).
//! * The worker indexes partitions by their values for the first rule. For an event it looks
//!   up the event's values for that rule's field, and sends to those partitions only (checking
//!   any further rules per partition, not per client).
//!
//! Values are compared by their canonical relaxed Extended JSON text, so `"A"`, `5` and
//! `{"$oid": …}` in a claim match the same values in a document. A rule matches when the field's
//! values and the claim's values intersect: equality for scalars, membership for arrays.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mongodb::bson::{Bson, Document};
use serde_json::Value;

/// Where a rule's values come from, per client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSource {
    /// A claim of the client's verified token (`match` rules).
    Claim(String),
    /// A variable bound by the client's `avars` (routable `$var` conditions).
    Var(String),
}

/// One routing rule: the event's values at `field` must meet the client's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchRule {
    /// Dotted path into the change event (`fullDocument.tenantId`), split on dots.
    pub field: Vec<String>,
    /// Where the client's values come from.
    pub source: RuleSource,
    /// For a `fullDocument.…` field: read the pre-image (`fullDocumentBeforeChange`) when the
    /// event has no `fullDocument` (a delete), so a tenant learns its document went away.
    pub pre_image: bool,
}

/// The values an event has for each rule's field (canonical text), in rule order.
pub type RouteValues = Arc<[Vec<String>]>;

/// Canonical text of a BSON value (the comparison key). Integral doubles read as integers, as
/// MongoDB's equality compares numbers across types (`5 == 5.0`).
fn canonical(value: &Bson) -> String {
    match value {
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => (*f as i64).to_string(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// The comparison keys of a value: its own, or each element's for an array.
pub(crate) fn values_of(value: &Bson) -> Vec<String> {
    match value {
        Bson::Array(items) => items.iter().map(canonical).collect(),
        other => vec![canonical(other)],
    }
}

/// Extracts, for each rule, the event's values at the rule's field (empty when missing).
pub fn route_values(rules: &[MatchRule], change: &Document) -> RouteValues {
    rules
        .iter()
        .map(|rule| {
            let has_post_image = matches!(change.get("fullDocument"), Some(Bson::Document(_)));
            let value = match rule.field.split_first() {
                Some((first, rest))
                    if rule.pre_image && first == "fullDocument" && !has_post_image =>
                {
                    change
                        .get_document("fullDocumentBeforeChange")
                        .ok()
                        .and_then(|image| lookup(image, rest))
                }
                _ => lookup(change, &rule.field),
            };
            value.map(values_of).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .into()
}

/// Which image of the document a rule on `fullDocument…` reads (membership, PROTOCOL.md §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// `fullDocument` only (what the document is after the change).
    Post,
    /// `fullDocumentBeforeChange` (what it was before).
    Pre,
}

/// For each rule, the values of one image of the document (no fallback from one image to the
/// other: a missing image has no values). Rules on other fields read the change as it is.
pub fn image_values(rules: &[MatchRule], change: &Document, image: Image) -> RouteValues {
    let source = match image {
        Image::Post => "fullDocument",
        Image::Pre => "fullDocumentBeforeChange",
    };
    rules
        .iter()
        .map(|rule| {
            let value = match rule.field.split_first() {
                Some((first, rest)) if first == "fullDocument" => change
                    .get_document(source)
                    .ok()
                    .and_then(|image| lookup(image, rest)),
                _ => lookup(change, &rule.field),
            };
            value.map(values_of).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .into()
}

/// The value at a dotted path (already split) of a change document.
fn lookup<'a>(doc: &'a Document, path: &[String]) -> Option<&'a Bson> {
    let (first, rest) = path.split_first()?;
    crate::path::walk(doc.get(first)?, rest)
}

/// Why a client cannot be routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// The stream filters by claims but the request has no verified claims (auth is off).
    #[error("this stream filters documents by token claims; authenticate to subscribe")]
    NoClaims,
    /// The token lacks a claim a rule needs.
    #[error("the token has no {0:?} claim, which this stream filters on")]
    MissingClaim(String),
    /// The claim has a value that cannot be compared (e.g. an object with `$` keys).
    #[error("the {0:?} claim has a value that cannot be matched")]
    BadClaim(String),
}

/// A client's routing identity: its claim values per rule. Clients with equal filters share a
/// partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFilter {
    /// Canonical text of `sets`, the partition key.
    pub key: Arc<str>,
    /// Per rule, the claim's values.
    pub sets: Vec<BTreeSet<String>>,
}

impl ClientFilter {
    /// Builds a client's filter from its verified claims and its routed variable values.
    /// No rules → `None` (no filtering).
    pub fn build(
        rules: &[MatchRule],
        claims: Option<&serde_json::Map<String, Value>>,
        routed: &BTreeMap<String, Bson>,
    ) -> Result<Option<Arc<ClientFilter>>, FilterError> {
        if rules.is_empty() {
            return Ok(None);
        }
        let mut sets = Vec::with_capacity(rules.len());
        for rule in rules {
            let bson = match &rule.source {
                RuleSource::Claim(name) => {
                    let claims = claims.ok_or(FilterError::NoClaims)?;
                    let claim = claims
                        .get(name)
                        .ok_or_else(|| FilterError::MissingClaim(name.clone()))?;
                    Bson::try_from(claim.clone())
                        .map_err(|_| FilterError::BadClaim(name.clone()))?
                }
                // `bind` routes a variable only when it bound a value for it.
                RuleSource::Var(name) => routed.get(name).cloned().unwrap_or(Bson::Null),
            };
            sets.push(values_of(&bson).into_iter().collect::<BTreeSet<_>>());
        }
        let key = serde_json::to_string(&sets).unwrap_or_default();
        Ok(Some(Arc::new(ClientFilter {
            key: Arc::from(key),
            sets,
        })))
    }

    /// Whether an event with these values is for this client.
    pub fn matches(&self, values: &[Vec<String>]) -> bool {
        self.sets.len() == values.len()
            && self
                .sets
                .iter()
                .zip(values)
                .all(|(set, values)| values.iter().any(|v| set.contains(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;
    use serde_json::json;

    fn rules() -> Vec<MatchRule> {
        vec![MatchRule {
            field: vec!["fullDocument".into(), "tenantId".into()],
            source: RuleSource::Claim("tenant".into()),
            pre_image: true,
        }]
    }

    fn for_claims(
        rules: &[MatchRule],
        claims: Option<&serde_json::Map<String, Value>>,
    ) -> Result<Option<Arc<ClientFilter>>, FilterError> {
        ClientFilter::build(rules, claims, &BTreeMap::new())
    }

    fn claims(value: Value) -> serde_json::Map<String, Value> {
        json!({ "tenant": value }).as_object().cloned().unwrap()
    }

    #[test]
    fn equality_and_membership() {
        let event = route_values(&rules(), &doc! { "fullDocument": { "tenantId": "A" } });
        let a = for_claims(&rules(), Some(&claims(json!("A"))))
            .unwrap()
            .unwrap();
        let b = for_claims(&rules(), Some(&claims(json!("B"))))
            .unwrap()
            .unwrap();
        let ab = for_claims(&rules(), Some(&claims(json!(["B", "A"]))))
            .unwrap()
            .unwrap();
        assert!(a.matches(&event));
        assert!(!b.matches(&event));
        assert!(ab.matches(&event));
        let multi = route_values(
            &rules(),
            &doc! { "fullDocument": { "tenantId": ["C", "B"] } },
        );
        assert!(b.matches(&multi));
        assert!(!a.matches(&multi));
    }

    #[test]
    fn numbers_compare_across_int_widths_and_missing_fields_match_nobody() {
        let event = route_values(&rules(), &doc! { "fullDocument": { "tenantId": 7_i32 } });
        let seven = for_claims(&rules(), Some(&claims(json!(7))))
            .unwrap()
            .unwrap();
        assert!(seven.matches(&event));
        let none = route_values(&rules(), &doc! { "fullDocument": { "other": 1 } });
        assert!(!seven.matches(&none));
    }

    #[test]
    fn claims_are_required() {
        assert_eq!(for_claims(&rules(), None), Err(FilterError::NoClaims));
        let empty = serde_json::Map::new();
        assert_eq!(
            for_claims(&rules(), Some(&empty)),
            Err(FilterError::MissingClaim("tenant".into()))
        );
        assert_eq!(for_claims(&[], None), Ok(None));
    }

    #[test]
    fn deletes_route_by_pre_image_only_when_asked() {
        let delete = doc! {
            "operationType": "delete",
            "fullDocumentBeforeChange": { "tenantId": "A" },
        };
        assert_eq!(
            &*route_values(&rules(), &delete),
            &[vec!["\"A\"".to_owned()]]
        );
        let mut no_pre_image = rules();
        no_pre_image[0].pre_image = false;
        assert_eq!(
            &*route_values(&no_pre_image, &delete),
            &[Vec::<String>::new()]
        );
        // An update with a post-image routes by the post-image, not the pre-image.
        let update = doc! {
            "fullDocument": { "tenantId": "B" },
            "fullDocumentBeforeChange": { "tenantId": "A" },
        };
        assert_eq!(
            &*route_values(&rules(), &update),
            &[vec!["\"B\"".to_owned()]]
        );
    }

    #[test]
    fn images_are_read_without_fallback() {
        let update = doc! {
            "fullDocument": null,
            "fullDocumentBeforeChange": { "tenantId": "A" },
        };
        assert_eq!(
            &*image_values(&rules(), &update, Image::Pre),
            &[vec!["\"A\"".to_owned()]]
        );
        assert_eq!(
            &*image_values(&rules(), &update, Image::Post),
            &[Vec::<String>::new()]
        );
    }

    #[test]
    fn variables_route_like_claims_and_numbers_compare_across_types() {
        let rules = vec![MatchRule {
            field: vec!["fullDocument".into(), "owner".into()],
            source: RuleSource::Var("who".into()),
            pre_image: false,
        }];
        let mut routed = BTreeMap::new();
        routed.insert("who".to_owned(), Bson::Int32(5));
        let five = ClientFilter::build(&rules, None, &routed).unwrap().unwrap();
        let event = route_values(&rules, &doc! { "fullDocument": { "owner": 5.0 } });
        assert!(five.matches(&event));
        let other = route_values(&rules, &doc! { "fullDocument": { "owner": 6_i64 } });
        assert!(!five.matches(&other));
        routed.insert(
            "who".to_owned(),
            Bson::Array(vec![Bson::from("a"), Bson::from("b")]),
        );
        let in_ab = ClientFilter::build(&rules, None, &routed).unwrap().unwrap();
        assert!(in_ab.matches(&route_values(
            &rules,
            &doc! { "fullDocument": { "owner": "b" } }
        )));
    }

    #[test]
    fn equal_claims_share_a_partition_key() {
        let x = for_claims(&rules(), Some(&claims(json!(["A", "B"]))))
            .unwrap()
            .unwrap();
        let y = for_claims(&rules(), Some(&claims(json!(["B", "A"]))))
            .unwrap()
            .unwrap();
        assert_eq!(x.key, y.key);
    }
}
