//! Membership (PROTOCOL.md §10): whether a document was in a filtered stream before a change
//! and whether it is after it, decided in-process on the pre-image and the post-image.
//!
//! A stream's filter can read the document three ways: a pipeline `$match` on `fullDocument…`
//! (one verdict for the whole stream), a definition's `match` with `$claim`, and a routable
//! `$var` binding (one verdict per client, `crate::routing`). All three are evaluated the same
//! way, inside Streamgate, on two views of each update/replace: the change as MongoDB returns
//! it (post-image in `fullDocument`) and the same change with `fullDocumentBeforeChange` in the
//! place of `fullDocument`. The worker turns the verdicts into a plain change, a removal or an
//! entry per client (`worker::membership`).
//!
//! This module is the pure part: [`Matcher`], an evaluator for the query operators a `$match`
//! on documents commonly uses, with MongoDB's semantics (paths through arrays, numbers compared
//! across types, `null` matching missing fields, comparison within a type bracket); and
//! [`Membership`], what a bound stream needs, with the rewrite that makes MongoDB send the
//! changes whose pre-image matched (`$or` of the filter on the post-image and on the pre-image).
//! A filter with an operator the matcher does not know is left to MongoDB alone (post-image
//! only, today's behaviour) and [`Plan::note`] says why, so the admin API can warn.

use std::cmp::Ordering;

use mongodb::bson::{Bson, Document, doc};

/// The marker field added at the top level of a change's `data`.
pub const MARKER: &str = "streamgate";

/// Operation types that have a pre-image.
pub const WITH_PRE_IMAGE: [&str; 3] = ["update", "replace", "delete"];

/// Why a filter cannot be evaluated in-process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// A compiled query filter (the conditions of `$match` stages).
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher(Vec<Cond>);

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    And(Vec<Matcher>),
    Or(Vec<Matcher>),
    Nor(Vec<Matcher>),
    Field { path: Vec<String>, ops: Vec<Op> },
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq(Bson),
    Ne(Bson),
    In(Vec<Bson>),
    Nin(Vec<Bson>),
    Cmp(Ordering, bool, Bson),
    Exists(bool),
    Not(Vec<Op>),
}

impl Matcher {
    /// Compiles a query document. Refuses what it cannot evaluate exactly as MongoDB would.
    pub fn compile(filter: &Document) -> Result<Matcher, Unsupported> {
        let mut conds = Vec::with_capacity(filter.len());
        for (key, value) in filter {
            match key.as_str() {
                "$and" | "$or" | "$nor" => {
                    let Bson::Array(items) = value else {
                        return Err(Unsupported(format!("{key} must be an array")));
                    };
                    let parts = items
                        .iter()
                        .map(|item| match item {
                            Bson::Document(d) => Matcher::compile(d),
                            _ => Err(Unsupported(format!("{key} takes documents"))),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    conds.push(match key.as_str() {
                        "$and" => Cond::And(parts),
                        "$or" => Cond::Or(parts),
                        _ => Cond::Nor(parts),
                    });
                }
                "$comment" => {}
                other if other.starts_with('$') => {
                    return Err(Unsupported(format!("operator {other}")));
                }
                path => conds.push(Cond::Field {
                    path: path.split('.').map(str::to_owned).collect(),
                    ops: field_ops(value)?,
                }),
            }
        }
        Ok(Matcher(conds))
    }

    /// Whether a document matches, reading top-level fields through `root`.
    pub fn matches<'a>(&self, root: &dyn Fn(&str) -> Option<&'a Bson>) -> bool {
        self.0.iter().all(|cond| match cond {
            Cond::And(parts) => parts.iter().all(|m| m.matches(root)),
            Cond::Or(parts) => parts.iter().any(|m| m.matches(root)),
            Cond::Nor(parts) => !parts.iter().any(|m| m.matches(root)),
            Cond::Field { path, ops } => {
                let mut leaves = Vec::new();
                if let Some((first, rest)) = path.split_first()
                    && let Some(value) = root(first)
                {
                    collect(value, rest, &mut leaves);
                }
                ops.iter().all(|op| op.holds(&leaves))
            }
        })
    }

    /// Whether a change document matches as it is (post-image in `fullDocument`).
    pub fn matches_change(&self, change: &Document) -> bool {
        self.matches(&|key| change.get(key))
    }

    /// Whether a change matches with its pre-image in the place of `fullDocument`.
    pub fn matches_pre_image(&self, change: &Document) -> bool {
        self.matches(&|key| match key {
            "fullDocument" => change.get("fullDocumentBeforeChange"),
            other => change.get(other),
        })
    }
}

/// The operators of one field's condition: a document of `$` operators, or equality.
fn field_ops(value: &Bson) -> Result<Vec<Op>, Unsupported> {
    let Bson::Document(doc) = value else {
        return Ok(vec![Op::Eq(operand(value)?)]);
    };
    if !doc.keys().next().is_some_and(|k| k.starts_with('$')) {
        return Ok(vec![Op::Eq(operand(value)?)]);
    }
    doc.iter()
        .map(|(op, arg)| {
            Ok(match op.as_str() {
                "$eq" => Op::Eq(operand(arg)?),
                "$ne" => Op::Ne(operand(arg)?),
                "$in" | "$nin" => {
                    let Bson::Array(items) = arg else {
                        return Err(Unsupported(format!("{op} needs an array")));
                    };
                    let items = items.iter().map(operand).collect::<Result<Vec<_>, _>>()?;
                    if op == "$in" {
                        Op::In(items)
                    } else {
                        Op::Nin(items)
                    }
                }
                "$gt" | "$gte" | "$lt" | "$lte" => {
                    if bracket(arg).is_none() {
                        return Err(Unsupported(format!(
                            "{op} on a {:?} value",
                            arg.element_type()
                        )));
                    }
                    let (order, or_equal) = match op.as_str() {
                        "$gt" => (Ordering::Greater, false),
                        "$gte" => (Ordering::Greater, true),
                        "$lt" => (Ordering::Less, false),
                        _ => (Ordering::Less, true),
                    };
                    Op::Cmp(order, or_equal, arg.clone())
                }
                "$exists" => Op::Exists(match arg {
                    Bson::Boolean(b) => *b,
                    Bson::Int32(n) => *n != 0,
                    Bson::Int64(n) => *n != 0,
                    Bson::Double(n) => *n != 0.0,
                    _ => return Err(Unsupported("$exists takes a boolean".into())),
                }),
                "$not" => Op::Not(match arg {
                    Bson::Document(_) => field_ops(arg)?,
                    _ => return Err(Unsupported("$not with a regular expression".into())),
                }),
                other => return Err(Unsupported(format!("operator {other}"))),
            })
        })
        .collect()
}

/// An equality operand the matcher compares exactly (no regexes, decimals, `$` documents).
fn operand(value: &Bson) -> Result<Bson, Unsupported> {
    match value {
        Bson::RegularExpression(_) => Err(Unsupported("a regular expression".into())),
        Bson::Decimal128(_) => Err(Unsupported("a Decimal128 value".into())),
        Bson::JavaScriptCode(_) | Bson::JavaScriptCodeWithScope(_) => {
            Err(Unsupported("JavaScript".into()))
        }
        Bson::Document(doc) => {
            if doc.keys().any(|k| k.starts_with('$')) {
                return Err(Unsupported(format!(
                    "operator {}",
                    doc.keys().find(|k| k.starts_with('$')).map_or("", |k| k)
                )));
            }
            doc.values().try_for_each(|v| operand(v).map(drop))?;
            Ok(value.clone())
        }
        Bson::Array(items) => {
            items.iter().try_for_each(|v| operand(v).map(drop))?;
            Ok(value.clone())
        }
        other => Ok(other.clone()),
    }
}

/// The values a path reaches, MongoDB's way: through arrays of documents (each element), or by
/// index. Leaves are not expanded (an array leaf is matched whole and by element).
fn collect<'a>(value: &'a Bson, path: &[String], out: &mut Vec<&'a Bson>) {
    let Some((step, rest)) = path.split_first() else {
        out.push(value);
        return;
    };
    match value {
        Bson::Document(doc) => {
            if let Some(child) = doc.get(step) {
                collect(child, rest, out);
            }
        }
        Bson::Array(items) => {
            if let Ok(index) = step.parse::<usize>()
                && let Some(child) = items.get(index)
            {
                collect(child, rest, out);
            }
            for item in items {
                if let Bson::Document(doc) = item
                    && let Some(child) = doc.get(step)
                {
                    collect(child, rest, out);
                }
            }
        }
        _ => {}
    }
}

impl Op {
    fn holds(&self, leaves: &[&Bson]) -> bool {
        match self {
            Op::Eq(v) => equal_any(leaves, v),
            Op::Ne(v) => !equal_any(leaves, v),
            Op::In(items) => items.iter().any(|v| equal_any(leaves, v)),
            Op::Nin(items) => !items.iter().any(|v| equal_any(leaves, v)),
            Op::Cmp(order, or_equal, v) => leaves.iter().any(|leaf| {
                let hit = |x: &Bson| {
                    compare(x, v).is_some_and(|o| o == *order || (*or_equal && o.is_eq()))
                };
                match leaf {
                    Bson::Array(items) => items.iter().any(hit),
                    other => hit(other),
                }
            }),
            Op::Exists(wanted) => leaves.is_empty() != *wanted,
            Op::Not(ops) => !ops.iter().all(|op| op.holds(leaves)),
        }
    }
}

/// Equality against the leaves a path reached: a leaf equal to `v`, an array leaf with an
/// element equal to `v`; `null` also matches a missing field.
fn equal_any(leaves: &[&Bson], v: &Bson) -> bool {
    if matches!(v, Bson::Null) && leaves.is_empty() {
        return true;
    }
    leaves.iter().any(|leaf| {
        equal(leaf, v) || matches!(leaf, Bson::Array(items) if items.iter().any(|x| equal(x, v)))
    })
}

fn number(value: &Bson) -> Option<f64> {
    match value {
        Bson::Int32(n) => Some(f64::from(*n)),
        Bson::Int64(n) => Some(*n as f64),
        Bson::Double(n) => Some(*n),
        _ => None,
    }
}

/// MongoDB's equality: numbers across types, documents field by field in order.
fn equal(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::Int64(x), Bson::Int64(y)) => x == y,
        (Bson::Document(x), Bson::Document(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && equal(va, vb))
        }
        (Bson::Array(x), Bson::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(va, vb)| equal(va, vb))
        }
        _ => match (number(a), number(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// The comparison bracket of a value (`$gt` and friends compare within one bracket only).
fn bracket(value: &Bson) -> Option<u8> {
    match value {
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) => Some(1),
        Bson::String(_) => Some(2),
        Bson::ObjectId(_) => Some(3),
        Bson::Boolean(_) => Some(4),
        Bson::DateTime(_) => Some(5),
        Bson::Timestamp(_) => Some(6),
        _ => None,
    }
}

fn compare(a: &Bson, b: &Bson) -> Option<Ordering> {
    if bracket(a)? != bracket(b)? {
        return None;
    }
    match (a, b) {
        (Bson::Int64(x), Bson::Int64(y)) => Some(x.cmp(y)),
        (Bson::String(x), Bson::String(y)) => Some(x.as_str().cmp(y.as_str())),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => Some(x.bytes().cmp(&y.bytes())),
        (Bson::Boolean(x), Bson::Boolean(y)) => Some(x.cmp(y)),
        (Bson::DateTime(x), Bson::DateTime(y)) => Some(x.cmp(y)),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            Some((x.time, x.increment).cmp(&(y.time, y.increment)))
        }
        _ => number(a)?.partial_cmp(&number(b)?),
    }
}

/// Whether a query document has a condition on the document (`fullDocument` or below it).
pub fn reads_document(filter: &Document) -> bool {
    filter.iter().any(|(key, value)| match key.as_str() {
        "$and" | "$or" | "$nor" => match value {
            Bson::Array(items) => items
                .iter()
                .any(|i| matches!(i, Bson::Document(d) if reads_document(d))),
            _ => false,
        },
        // `$expr` may read `$fullDocument…` too: the matcher refuses it, which is the point.
        "$expr" => format!("{value}").contains("$fullDocument"),
        path => on_document(path),
    })
}

fn on_document(path: &str) -> bool {
    path == "fullDocument" || path.starts_with("fullDocument.")
}

/// The same query on the pre-image: every `fullDocument…` path moved to
/// `fullDocumentBeforeChange…`.
fn on_pre_image(filter: &Document) -> Document {
    filter
        .iter()
        .map(|(key, value)| match key.as_str() {
            "$and" | "$or" | "$nor" => {
                let items = match value {
                    Bson::Array(items) => items
                        .iter()
                        .map(|i| match i {
                            Bson::Document(d) => Bson::Document(on_pre_image(d)),
                            other => other.clone(),
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                (key.clone(), Bson::Array(items))
            }
            path if on_document(path) => (
                format!("fullDocumentBeforeChange{}", &path["fullDocument".len()..]),
                value.clone(),
            ),
            _ => (key.clone(), value.clone()),
        })
        .collect()
}

/// What a bound stream needs to decide membership.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    /// The pipeline's conditions, evaluated on each image (`None`: the pipeline does not read
    /// the document, or only MongoDB can evaluate it; then only the routing rules decide).
    pub filter: Option<Matcher>,
    /// The definition did not ask for pre-images: they are read for membership only and
    /// removed from the events clients get.
    pub strip_pre_image: bool,
    /// The definition asks Streamgate to turn on the collection's pre-images (`enablePreImages`).
    pub enable_pre_images: bool,
}

/// Membership for a definition, planned once at compile time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Whether membership is decided at all for this definition.
    pub enabled: bool,
    /// Whether the pipeline's `$match` stages are evaluated in-process (and rewritten so MongoDB
    /// sends changes whose pre-image matched).
    pub pipeline: bool,
    /// Why membership is partial or off although the filter reads the document.
    pub note: Option<String>,
}

/// Plans membership for a definition with `stages` whose `match`/routable rules read the
/// document (`rules_read`). `wanted`: the definition's `membership` switch; `has_post_image`:
/// whether updates carry a `fullDocument` (not with `fullDocument: default`).
pub fn plan(stages: &[Document], rules_read: bool, wanted: bool, has_post_image: bool) -> Plan {
    let matches: Vec<&Document> = stages
        .iter()
        .filter_map(|s| s.get_document("$match").ok())
        .collect();
    let pipeline_reads = matches.iter().any(|m| reads_document(m));
    if !wanted || !(pipeline_reads || rules_read) {
        return Plan::default();
    }
    if !has_post_image {
        return Plan {
            note: Some(
                "membership needs the post-image of updates: set fullDocument to \
                 updateLookup, whenAvailable or required"
                    .into(),
            ),
            ..Plan::default()
        };
    }
    if !pipeline_reads {
        return Plan {
            enabled: true,
            ..Plan::default()
        };
    }
    let refusal = if matches.len() != stages.len() {
        Some("the pipeline has stages other than $match, so a document leaving its $match is not seen".to_owned())
    } else {
        matches
            .iter()
            .find_map(|m| Matcher::compile(m).err())
            .map(|e| format!("its $match uses {e}, which only MongoDB evaluates, so a document leaving it is not seen"))
    };
    match refusal {
        None => Plan {
            enabled: true,
            pipeline: true,
            note: None,
        },
        Some(why) => Plan {
            enabled: rules_read,
            pipeline: false,
            note: Some(why),
        },
    }
}

/// The bound pipeline (`$match` stages only) as one `$match` that takes a change when the
/// filter matches the change as it is, or matches its pre-image (updates, replaces, deletes),
/// and the compiled filter for the in-process verdicts. `None` when the pipeline is empty.
pub fn rewrite(stages: &[Document]) -> Result<Option<(Vec<Document>, Matcher)>, Unsupported> {
    let conditions: Vec<Document> = stages
        .iter()
        .filter_map(|s| s.get_document("$match").ok().cloned())
        .collect();
    if conditions.is_empty() {
        return Ok(None);
    }
    let all: Document =
        doc! { "$and": conditions.iter().cloned().map(Bson::Document).collect::<Vec<_>>() };
    let matcher = Matcher::compile(&all)?;
    let mut before = vec![Bson::Document(
        doc! { "operationType": { "$in": WITH_PRE_IMAGE.to_vec() } },
    )];
    before.extend(conditions.iter().map(|c| Bson::Document(on_pre_image(c))));
    let stage = doc! { "$match": { "$or": [ all, { "$and": before } ] } };
    Ok(Some((vec![stage], matcher)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: Document) -> Matcher {
        Matcher::compile(&filter).unwrap()
    }

    fn on(filter: Document, document: Document) -> bool {
        m(filter).matches_change(&doc! { "fullDocument": document })
    }

    #[test]
    fn equality_through_arrays_numbers_and_null() {
        assert!(on(doc! {"fullDocument.s": "open"}, doc! {"s": "open"}));
        assert!(!on(doc! {"fullDocument.s": "open"}, doc! {"s": "closed"}));
        assert!(on(
            doc! {"fullDocument.tags": "a"},
            doc! {"tags": ["b", "a"]}
        ));
        assert!(on(
            doc! {"fullDocument.tags": ["b", "a"]},
            doc! {"tags": ["b", "a"]}
        ));
        assert!(on(doc! {"fullDocument.n": 5}, doc! {"n": 5.0}));
        assert!(on(doc! {"fullDocument.n": 5_i64}, doc! {"n": 5_i32}));
        assert!(on(doc! {"fullDocument.x": null}, doc! {"n": 1}));
        assert!(!on(doc! {"fullDocument.x": {"$ne": null}}, doc! {"n": 1}));
        assert!(on(
            doc! {"fullDocument.a.b": 2},
            doc! {"a": [{"b": 1}, {"b": 2}]}
        ));
        assert!(on(doc! {"fullDocument.a.1": 9}, doc! {"a": [8, 9]}));
        assert!(!on(
            doc! {"fullDocument.d": {"x": 1, "y": 2}},
            doc! {"d": {"y": 2, "x": 1}}
        ));
    }

    #[test]
    fn operators_and_logic() {
        let d = doc! {"n": 7, "s": "b", "t": ["x", "y"]};
        assert!(on(
            doc! {"fullDocument.n": {"$gt": 5, "$lte": 7}},
            d.clone()
        ));
        assert!(!on(doc! {"fullDocument.n": {"$gt": 7}}, d.clone()));
        // Comparison stays within a type bracket.
        assert!(!on(doc! {"fullDocument.s": {"$gt": 1}}, d.clone()));
        assert!(on(doc! {"fullDocument.s": {"$in": ["a", "b"]}}, d.clone()));
        assert!(on(doc! {"fullDocument.t": {"$nin": ["z"]}}, d.clone()));
        assert!(!on(doc! {"fullDocument.t": {"$nin": ["y"]}}, d.clone()));
        assert!(on(doc! {"fullDocument.q": {"$exists": false}}, d.clone()));
        assert!(on(doc! {"fullDocument.n": {"$not": {"$gt": 9}}}, d.clone()));
        assert!(on(
            doc! {"$or": [{"fullDocument.n": 1}, {"fullDocument.s": "b"}]},
            d.clone()
        ));
        assert!(!on(doc! {"$nor": [{"fullDocument.s": "b"}]}, d.clone()));
        assert!(on(
            doc! {"$and": [{"fullDocument.n": 7}, {"fullDocument.s": "b"}]},
            d
        ));
    }

    #[test]
    fn refuses_what_it_cannot_evaluate() {
        for filter in [
            doc! {"$expr": {"$eq": ["$fullDocument.a", 1]}},
            doc! {"fullDocument.a": {"$regex": "x"}},
            doc! {"fullDocument.a": {"$elemMatch": {"b": 1}}},
            doc! {"fullDocument.a": {"$gt": [1]}},
            doc! {"fullDocument.a": {"$in": [{"$gt": 1}]}},
        ] {
            assert!(Matcher::compile(&filter).is_err(), "{filter}");
        }
    }

    #[test]
    fn pre_image_view_and_rewrite() {
        let change = doc! {
            "operationType": "update",
            "fullDocument": {"s": "closed"},
            "fullDocumentBeforeChange": {"s": "open"},
        };
        let stages = vec![
            doc! {"$match": {"operationType": {"$in": ["insert", "update"]}, "fullDocument.s": "open"}},
        ];
        let (pipeline, matcher) = rewrite(&stages).unwrap().unwrap();
        assert!(!matcher.matches_change(&change));
        assert!(matcher.matches_pre_image(&change));
        let rewritten = pipeline[0].get_document("$match").unwrap();
        let before = rewritten.get_array("$or").unwrap()[1]
            .as_document()
            .unwrap();
        let conditions = before.get_array("$and").unwrap()[1].as_document().unwrap();
        assert_eq!(conditions.get_str("fullDocumentBeforeChange.s"), Ok("open"));
        assert!(conditions.contains_key("operationType"));
    }

    #[test]
    fn plans_say_why_membership_is_partial() {
        let reads = vec![doc! {"$match": {"fullDocument.s": "open"}}];
        assert!(plan(&reads, false, true, true).pipeline);
        assert!(!plan(&reads, false, false, true).enabled);
        assert!(plan(&reads, false, true, false).note.is_some());
        let other = vec![doc! {"$match": {"operationType": "insert"}}];
        assert_eq!(plan(&other, false, true, true), Plan::default());
        assert!(plan(&other, true, true, true).enabled);
        let regex = vec![doc! {"$match": {"fullDocument.s": {"$regex": "^o"}}}];
        let partial = plan(&regex, true, true, true);
        assert!(partial.enabled && !partial.pipeline && partial.note.is_some());
        let shaped = vec![reads[0].clone(), doc! {"$project": {"x": 1}}];
        assert!(!plan(&shaped, false, true, true).enabled);
    }
}
