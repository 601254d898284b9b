//! Per-user document filtering on a shared cursor.
//!
//! A definition's `match` rules (`{"fullDocument.tenantId": {"$claim": "tenant"}}`) are
//! evaluated inside Streamgate, per client, from its verified token claims. Routing an event
//! costs O(matching clients), not O(all clients):
//!
//! * Clients with the same claim values share a **partition** (one broadcast channel).
//! * The worker indexes partitions by their values for the first rule. For an event it looks
//!   up the event's values for that rule's field, and sends to those partitions only (checking
//!   any further rules per partition, not per client).
//!
//! Values are compared by their canonical relaxed Extended JSON text, so `"A"`, `5` and
//! `{"$oid": …}` in a claim match the same values in a document. A rule matches when the field's
//! values and the claim's values intersect: equality for scalars, membership for arrays.

use std::collections::BTreeSet;
use std::sync::Arc;

use mongodb::bson::{Bson, Document};
use serde_json::Value;

/// One `field: {"$claim": name}` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchRule {
    /// Dotted path into the change event (`fullDocument.tenantId`), split on dots.
    pub field: Vec<String>,
    /// Claim whose value(s) the field must match.
    pub claim: String,
}

/// The values an event has for each rule's field (canonical text), in rule order.
pub type RouteValues = Arc<[Vec<String>]>;

/// Canonical text of a BSON value (the comparison key).
fn canonical(value: &Bson) -> String {
    value.clone().into_relaxed_extjson().to_string()
}

fn values_of(value: &Bson) -> Vec<String> {
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
            let mut current = None::<&Bson>;
            let mut doc = Some(change);
            for segment in &rule.field {
                current = doc.and_then(|d| d.get(segment));
                doc = match current {
                    Some(Bson::Document(inner)) => Some(inner),
                    _ => None,
                };
            }
            current.map(values_of).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .into()
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
    /// Builds the filter from verified claims. `None` rules → `None` filter (no filtering).
    pub fn for_claims(
        rules: &[MatchRule],
        claims: Option<&serde_json::Map<String, Value>>,
    ) -> Result<Option<Arc<ClientFilter>>, FilterError> {
        if rules.is_empty() {
            return Ok(None);
        }
        let claims = claims.ok_or(FilterError::NoClaims)?;
        let mut sets = Vec::with_capacity(rules.len());
        for rule in rules {
            let claim = claims
                .get(&rule.claim)
                .ok_or_else(|| FilterError::MissingClaim(rule.claim.clone()))?;
            let bson = Bson::try_from(claim.clone())
                .map_err(|_| FilterError::BadClaim(rule.claim.clone()))?;
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
            claim: "tenant".into(),
        }]
    }

    fn claims(value: Value) -> serde_json::Map<String, Value> {
        json!({ "tenant": value }).as_object().cloned().unwrap()
    }

    #[test]
    fn equality_and_membership() {
        let event = route_values(&rules(), &doc! { "fullDocument": { "tenantId": "A" } });
        let a = ClientFilter::for_claims(&rules(), Some(&claims(json!("A"))))
            .unwrap()
            .unwrap();
        let b = ClientFilter::for_claims(&rules(), Some(&claims(json!("B"))))
            .unwrap()
            .unwrap();
        let ab = ClientFilter::for_claims(&rules(), Some(&claims(json!(["B", "A"]))))
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
        let seven = ClientFilter::for_claims(&rules(), Some(&claims(json!(7))))
            .unwrap()
            .unwrap();
        assert!(seven.matches(&event));
        let none = route_values(&rules(), &doc! { "fullDocument": { "other": 1 } });
        assert!(!seven.matches(&none));
    }

    #[test]
    fn claims_are_required() {
        assert_eq!(
            ClientFilter::for_claims(&rules(), None),
            Err(FilterError::NoClaims)
        );
        let empty = serde_json::Map::new();
        assert_eq!(
            ClientFilter::for_claims(&rules(), Some(&empty)),
            Err(FilterError::MissingClaim("tenant".into()))
        );
        assert_eq!(ClientFilter::for_claims(&[], None), Ok(None));
    }

    #[test]
    fn equal_claims_share_a_partition_key() {
        let x = ClientFilter::for_claims(&rules(), Some(&claims(json!(["A", "B"]))))
            .unwrap()
            .unwrap();
        let y = ClientFilter::for_claims(&rules(), Some(&claims(json!(["B", "A"]))))
            .unwrap()
            .unwrap();
        assert_eq!(x.key, y.key);
    }
}
