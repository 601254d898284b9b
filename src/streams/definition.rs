//! Stream definitions: what a stream watches, validated before anything runs or is stored.
//!
//! A definition is the JSON document of PROTOCOL.md §1. [`StreamDefinition::compile`] checks it
//! (stage allowlist, forbidden operators at any depth, enum values) and turns the pipeline into
//! BSON once; [`CompiledDefinition::bind`] substitutes a client's `avars` for `{"$var": …}`
//! placeholders and yields the [`WatchSpec`] a worker runs, plus the canonical key that decides
//! which clients share a cursor.

use std::collections::BTreeMap;

use mongodb::bson::{Bson, Document};
use serde_json::Value;

use crate::membership::{self, Membership};
use crate::routing::{MatchRule, RuleSource};
use crate::spec::MAX_NAME_LEN;
pub use crate::spec::{
    DefinitionError, FullDocument, FullDocumentBeforeChange, StreamDefinition, StreamKey, WatchSpec,
};

/// Stages MongoDB allows after `$changeStream`.
pub const ALLOWED_STAGES: &[&str] = &[
    "$match",
    "$project",
    "$addFields",
    "$set",
    "$unset",
    "$replaceRoot",
    "$replaceWith",
    "$redact",
];

/// Operators that run arbitrary JavaScript or accumulate unbounded state: refused at any depth.
pub const FORBIDDEN_OPERATORS: &[&str] = &["$where", "$function", "$accumulator"];

/// A validated definition, ready to be bound to a client's variables.
#[derive(Debug, Clone)]
pub struct CompiledDefinition {
    /// The definition as given (echoed by the admin API).
    pub source: StreamDefinition,
    stages: Vec<Document>,
    /// Variables the pipeline uses, with their defaults.
    variables: BTreeMap<String, Option<Bson>>,
    /// Compiled `match` rules (empty: every client gets every event).
    routing: Vec<MatchRule>,
    /// Variables used only as routable conditions, with where (see [`routable_uses`]).
    routable: BTreeMap<String, Vec<RoutableUse>>,
    /// Why membership (PROTOCOL.md §10) is partial or off although the filter reads the
    /// document: an admin API warning.
    membership_note: Option<String>,
    /// Whether this stream decides membership (so it wants its collection's pre-images).
    decides_membership: bool,
}

/// A `$var` that is only the value of an equality or `$in` on a field of a top-level `$match`
/// followed by nothing but `$match` stages: the condition can be taken out of the pipeline and
/// evaluated per client in-process on the event as MongoDB returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RoutableUse {
    /// Index of the `$match` stage.
    stage: usize,
    /// The field (dotted path) the condition is on.
    field: String,
    /// `$in` (the variable is a list of values) rather than equality.
    membership: bool,
}

/// A definition bound to one client's variables.
#[derive(Debug, Clone)]
pub struct Binding {
    /// What the worker runs.
    pub spec: WatchSpec,
    /// Canonical JSON of the variables kept in the pipeline: clients with equal values share
    /// one worker (the routed ones share it whatever their values).
    pub vars: String,
    /// Variables routed in-process, with this client's values (for its filter).
    pub routed: BTreeMap<String, Bson>,
}

impl StreamDefinition {
    /// Validates the definition and converts its pipeline to BSON.
    pub fn compile(self) -> Result<CompiledDefinition, DefinitionError> {
        let items = match &self.pipeline {
            Value::Null => Vec::new(),
            Value::Array(items) => items.clone(),
            _ => {
                return Err(DefinitionError::new(
                    "pipeline",
                    "must be an array of stage documents",
                ));
            }
        };
        let mut stages = Vec::with_capacity(items.len());
        let mut variables = BTreeMap::new();
        for (index, item) in items.into_iter().enumerate() {
            let path = format!("pipeline[{index}]");
            let Value::Object(stage) = &item else {
                return Err(DefinitionError::new(path, "a stage must be a document"));
            };
            if stage.len() != 1 {
                return Err(DefinitionError::new(
                    path,
                    "a stage must have exactly one key (its operator)",
                ));
            }
            let (operator, _) = stage.iter().next().ok_or_else(|| {
                DefinitionError::new(path.clone(), "a stage must have exactly one key")
            })?;
            if !ALLOWED_STAGES.contains(&operator.as_str()) {
                return Err(DefinitionError::new(
                    format!("{path}.{operator}"),
                    format!(
                        "stage {operator} is not allowed in a change stream; allowed: {}",
                        ALLOWED_STAGES.join(", ")
                    ),
                ));
            }
            scan(&item, &path, &mut variables)?;
            let bson = Bson::try_from(item).map_err(|e| {
                DefinitionError::new(path.clone(), format!("invalid Extended JSON: {e}"))
            })?;
            match bson {
                Bson::Document(doc) => stages.push(doc),
                _ => return Err(DefinitionError::new(path, "a stage must be a document")),
            }
        }
        if let Some(description) = &self.description
            && description.len() > 1024
        {
            return Err(DefinitionError::new(
                "description",
                "at most 1024 characters",
            ));
        }
        let routing = compile_match(self.match_rules.as_ref())?;
        let routable = routable_uses(&stages);
        // As bound with every routable variable routed and the others unknown (`null`).
        let unrouted: BTreeMap<&str, Bson> = variables
            .keys()
            .filter(|name| !routable.contains_key(*name))
            .map(|name| (name.as_str(), Bson::Null))
            .collect();
        let removed: Vec<(usize, &str)> = routable
            .values()
            .flatten()
            .map(|u| (u.stage, u.field.as_str()))
            .collect();
        let typical = without_routed(&stages, &unrouted, &removed);
        let rules_read = routing.iter().any(reads_document)
            || routable
                .values()
                .flatten()
                .any(|u| u.field == "fullDocument" || u.field.starts_with("fullDocument."));
        let planned = membership::plan(
            &typical,
            rules_read,
            self.membership,
            self.full_document != FullDocument::Default,
        );
        Ok(CompiledDefinition {
            source: self,
            stages,
            variables,
            routing,
            routable,
            membership_note: planned.note,
            decides_membership: planned.enabled,
        })
    }
}

/// Compiles `match`: an object of `field path → {"$claim": name}`.
fn compile_match(rules: Option<&Value>) -> Result<Vec<MatchRule>, DefinitionError> {
    let Some(rules) = rules else {
        return Ok(Vec::new());
    };
    let Value::Object(map) = rules else {
        return Err(DefinitionError::new(
            "match",
            "must be an object like {\"fullDocument.tenantId\": {\"$claim\": \"tenant\"}}",
        ));
    };
    map.iter()
        .map(|(field, spec)| {
            let path = format!("match.{field}");
            let segments: Vec<String> = field.split('.').map(str::to_owned).collect();
            if segments.iter().any(|s| s.is_empty() || s.starts_with('$')) {
                return Err(DefinitionError::new(
                    path,
                    "must be a dotted field path without empty or '$' segments",
                ));
            }
            let claim = match spec {
                Value::Object(o) if o.len() == 1 => o.get("$claim").and_then(Value::as_str),
                _ => None,
            }
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                DefinitionError::new(path.clone(), "must be {\"$claim\": \"<claim name>\"}")
            })?;
            Ok(MatchRule {
                field: segments,
                source: RuleSource::Claim(claim.to_owned()),
                pre_image: false,
            })
        })
        .collect()
}

/// Walks a stage: refuses forbidden operators, collects and checks `$var` placeholders.
fn scan(
    value: &Value,
    path: &str,
    variables: &mut BTreeMap<String, Option<Bson>>,
) -> Result<(), DefinitionError> {
    match value {
        Value::Object(map) => {
            if let Some(spec) = map.get("$var") {
                if map.len() != 1 {
                    return Err(DefinitionError::new(
                        path,
                        "a {\"$var\": …} placeholder must be alone in its document",
                    ));
                }
                let (name, default) = parse_var(spec).ok_or_else(|| {
                    DefinitionError::new(
                        format!("{path}.$var"),
                        "must be \"name\" or [\"name\", default]; names are letters, digits and '_'",
                    )
                })?;
                let default = default
                    .map(|v| {
                        Bson::try_from(v.clone()).map_err(|e| {
                            DefinitionError::new(
                                format!("{path}.$var"),
                                format!("bad default: {e}"),
                            )
                        })
                    })
                    .transpose()?;
                variables.insert(name.to_owned(), default);
                return Ok(());
            }
            for (key, child) in map {
                if FORBIDDEN_OPERATORS.contains(&key.as_str()) {
                    return Err(DefinitionError::new(
                        format!("{path}.{key}"),
                        format!("operator {key} is not allowed (it runs server-side JavaScript)"),
                    ));
                }
                scan(child, &format!("{path}.{key}"), variables)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                scan(child, &format!("{path}[{index}]"), variables)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Name of the variable a `{"$var": …}` document stands for.
fn var_name(value: &Bson) -> Option<&str> {
    let Bson::Document(doc) = value else {
        return None;
    };
    match (doc.len(), doc.get("$var")?) {
        (1, Bson::String(name)) => Some(name),
        (1, Bson::Array(items)) => items.first()?.as_str(),
        _ => None,
    }
}

/// Counts every `{"$var": …}` placeholder in a value, by variable.
fn count_vars(value: &Bson, counts: &mut BTreeMap<String, usize>) {
    if let Some(name) = var_name(value) {
        *counts.entry(name.to_owned()).or_default() += 1;
        return;
    }
    match value {
        Bson::Document(doc) => doc.values().for_each(|v| count_vars(v, counts)),
        Bson::Array(items) => items.iter().for_each(|v| count_vars(v, counts)),
        _ => {}
    }
}

/// The variables whose every use is a routable condition (see [`RoutableUse`]).
fn routable_uses(stages: &[Document]) -> BTreeMap<String, Vec<RoutableUse>> {
    let mut counts = BTreeMap::new();
    for stage in stages {
        count_vars(&Bson::Document(stage.clone()), &mut counts);
    }
    let mut uses: BTreeMap<String, Vec<RoutableUse>> = BTreeMap::new();
    for (index, stage) in stages.iter().enumerate() {
        let only_matches_follow = stages[index..].iter().all(|s| s.contains_key("$match"));
        let Ok(conditions) = stage.get_document("$match") else {
            continue;
        };
        if !only_matches_follow {
            continue;
        }
        for (field, condition) in conditions {
            if field.starts_with('$') {
                continue;
            }
            let operator = match condition {
                Bson::Document(doc) if doc.len() == 1 => doc.iter().next(),
                _ => None,
            };
            let (name, membership) = match operator {
                Some((op, _)) if op == "$var" => (var_name(condition), false),
                Some((op, inner)) if op == "$eq" => (var_name(inner), false),
                Some((op, inner)) if op == "$in" => (var_name(inner), true),
                _ => (None, false),
            };
            if let Some(name) = name {
                uses.entry(name.to_owned()).or_default().push(RoutableUse {
                    stage: index,
                    field: field.clone(),
                    membership,
                });
            }
        }
    }
    uses.retain(|name, found| counts.get(name) == Some(&found.len()));
    uses
}

/// Whether a bound value can be compared in-process exactly as MongoDB would: a plain scalar
/// for equality, an array of them for `$in`. (`null` also matches missing fields, a document or
/// array compares as a whole, decimals and regexes compare by rules of their own: those keep a
/// cursor per binding.)
fn routable_value(value: &Bson, membership: bool) -> bool {
    fn scalar(value: &Bson) -> bool {
        match value {
            Bson::Double(f) => f.is_finite(),
            Bson::String(_)
            | Bson::Int32(_)
            | Bson::Int64(_)
            | Bson::Boolean(_)
            | Bson::ObjectId(_)
            | Bson::DateTime(_) => true,
            _ => false,
        }
    }
    match value {
        Bson::Array(items) if membership => items.iter().all(scalar),
        other => !membership && scalar(other),
    }
}

fn parse_var(spec: &Value) -> Option<(&str, Option<&Value>)> {
    let (name, default) = match spec {
        Value::String(name) => (name.as_str(), None),
        Value::Array(items) if items.len() == 2 => (items[0].as_str()?, Some(&items[1])),
        _ => return None,
    };
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    valid.then_some((name, default))
}

/// Why a client's `avars` were refused (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AvarsError {
    /// Not a JSON object.
    #[error("avars must be a URL-encoded JSON object: {0}")]
    NotAnObject(String),
    /// A key or string value starts with `$` (operator or field-path injection).
    #[error("avars {0:?} starts with '$': operators and field paths are not allowed in variables")]
    Dollar(String),
    /// The pipeline needs a variable the client did not give and that has no default.
    #[error("variable {0:?} is required by this stream and has no default; pass it in avars")]
    Unbound(String),
}

/// Parses `?avars=` (already URL-decoded) and refuses `$`-prefixed keys or strings at any depth.
pub fn parse_avars(raw: Option<&str>) -> Result<serde_json::Map<String, Value>, AvarsError> {
    let Some(raw) = raw else {
        return Ok(serde_json::Map::new());
    };
    let value: Value =
        serde_json::from_str(raw).map_err(|e| AvarsError::NotAnObject(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(AvarsError::NotAnObject("got a non-object".into()));
    };
    fn check(value: &Value) -> Result<(), AvarsError> {
        match value {
            Value::String(s) if s.starts_with('$') => Err(AvarsError::Dollar(s.clone())),
            Value::Array(items) => items.iter().try_for_each(check),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                if k.starts_with('$') {
                    Err(AvarsError::Dollar(k.clone()))
                } else {
                    check(v)
                }
            }),
            _ => Ok(()),
        }
    }
    for (key, value) in &map {
        if key.starts_with('$') {
            return Err(AvarsError::Dollar(key.clone()));
        }
        check(value)?;
    }
    Ok(map)
}

impl CompiledDefinition {
    /// Binds the client's variables: routable ones become routing rules (their conditions
    /// leave the pipeline, so every binding shares one cursor), the others are substituted.
    pub fn bind(
        &self,
        key: &StreamKey,
        avars: &serde_json::Map<String, Value>,
    ) -> Result<Binding, AvarsError> {
        let mut bound: BTreeMap<&str, Bson> = BTreeMap::new();
        for (name, default) in &self.variables {
            let value = match avars.get(name) {
                Some(value) => Bson::try_from(value.clone())
                    .map_err(|e| AvarsError::NotAnObject(format!("{name}: {e}")))?,
                None => default
                    .clone()
                    .ok_or_else(|| AvarsError::Unbound(name.clone()))?,
            };
            bound.insert(name, value);
        }
        let mut routed = BTreeMap::new();
        let mut routing = Vec::new();
        let mut removed: Vec<(usize, &str)> = Vec::new();
        for (name, uses) in &self.routable {
            let Some(value) = bound.get(name.as_str()) else {
                continue;
            };
            if !uses.iter().all(|u| routable_value(value, u.membership)) {
                continue;
            }
            routed.insert(name.clone(), value.clone());
            for u in uses {
                removed.push((u.stage, &u.field));
                routing.push(MatchRule {
                    field: u.field.split('.').map(str::to_owned).collect(),
                    source: RuleSource::Var(name.clone()),
                    pre_image: false,
                });
            }
        }
        let mut pipeline = without_routed(&self.stages, &bound, &removed);
        routing.extend(self.routing.iter().cloned());
        let plan = membership::plan(
            &pipeline,
            routing.iter().any(reads_document),
            self.source.membership,
            self.source.full_document != FullDocument::Default,
        );
        let mut full_document_before_change = self.source.full_document_before_change;
        let mut membership = None;
        if plan.enabled {
            let mut filter = None;
            if plan.pipeline
                && let Ok(Some((rewritten, matcher))) = membership::rewrite(&pipeline)
            {
                pipeline = rewritten;
                filter = Some(matcher);
            }
            let strip_pre_image = full_document_before_change == FullDocumentBeforeChange::Off;
            if strip_pre_image {
                full_document_before_change = FullDocumentBeforeChange::WhenAvailable;
            }
            membership = Some(std::sync::Arc::new(Membership {
                filter,
                strip_pre_image,
                enable_pre_images: self.source.enable_pre_images,
            }));
        }
        // With pre-images on, a delete is routed by its pre-image (its owners learn it).
        let pre_image = full_document_before_change != FullDocumentBeforeChange::Off;
        for rule in &mut routing {
            rule.pre_image = pre_image;
        }
        let vars = Bson::Document(
            bound
                .iter()
                .filter(|(k, _)| !routed.contains_key(**k))
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
        .into_canonical_extjson()
        .to_string();
        Ok(Binding {
            spec: WatchSpec {
                db: key.db.clone(),
                coll: key.coll.clone(),
                pipeline,
                full_document: self.source.full_document,
                full_document_before_change,
                routing,
                membership,
            },
            vars,
            routed,
        })
    }

    /// Names of the variables the pipeline uses.
    pub fn variable_names(&self) -> impl Iterator<Item = &str> {
        self.variables.keys().map(String::as_str)
    }

    /// Why membership (PROTOCOL.md §10) is partial or off although the filter reads the
    /// document, if it is.
    pub fn membership_note(&self) -> Option<&str> {
        self.membership_note.as_deref()
    }

    /// Whether the stream decides membership, and so wants its collection's pre-images.
    pub fn decides_membership(&self) -> bool {
        self.decides_membership
    }
}

/// Whether a routing rule reads the document (so its verdict can change with an update).
fn reads_document(rule: &MatchRule) -> bool {
    rule.field.first().is_some_and(|f| f == "fullDocument")
}

/// The stages with `bound` substituted and the routed conditions (`removed`: stage index,
/// field) taken out; a `$match` emptied by that is dropped.
fn without_routed(
    stages: &[Document],
    bound: &BTreeMap<&str, Bson>,
    removed: &[(usize, &str)],
) -> Vec<Document> {
    stages
        .iter()
        .enumerate()
        .filter_map(|(index, stage)| {
            let mut stage = substitute_doc(stage, bound);
            let mut emptied = false;
            for (_, field) in removed.iter().filter(|(i, _)| *i == index) {
                if let Ok(conditions) = stage.get_document_mut("$match") {
                    conditions.remove(*field);
                    emptied = conditions.is_empty();
                }
            }
            (!emptied).then_some(stage)
        })
        .collect()
}

fn substitute(value: &Bson, bound: &BTreeMap<&str, Bson>) -> Bson {
    match value {
        Bson::Document(doc) => {
            if let (1, Some(spec)) = (doc.len(), doc.get("$var")) {
                let name = match spec {
                    Bson::String(name) => Some(name.as_str()),
                    Bson::Array(items) => items.first().and_then(Bson::as_str),
                    _ => None,
                };
                if let Some(value) = name.and_then(|n| bound.get(n)) {
                    return value.clone();
                }
            }
            Bson::Document(substitute_doc(doc, bound))
        }
        Bson::Array(items) => Bson::Array(items.iter().map(|v| substitute(v, bound)).collect()),
        other => other.clone(),
    }
}

fn substitute_doc(doc: &Document, bound: &BTreeMap<&str, Bson>) -> Document {
    doc.iter()
        .map(|(k, v)| (k.clone(), substitute(v, bound)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(pipeline: Value) -> StreamDefinition {
        StreamDefinition {
            pipeline,
            ..StreamDefinition::default()
        }
    }

    fn key() -> StreamKey {
        StreamKey::new("db", "coll", "s").unwrap()
    }

    #[test]
    fn accepts_change_stream_stages_and_stages_alias() {
        let parsed: StreamDefinition =
            serde_json::from_value(json!({"stages": [{"$match": {"operationType": "insert"}}]}))
                .unwrap();
        assert!(parsed.compile().is_ok());
    }

    #[test]
    fn refuses_other_stages_naming_them() {
        let err = def(json!([{"$match": {}}, {"$group": {"_id": 1}}]))
            .compile()
            .unwrap_err();
        assert_eq!(err.field, "pipeline[1].$group");
    }

    #[test]
    fn refuses_javascript_at_any_depth() {
        let err = def(json!([{"$match": {"$expr": {"$and": [{"$function": {}}]}}}]))
            .compile()
            .unwrap_err();
        assert_eq!(err.field, "pipeline[0].$match.$expr.$and[0].$function");
        assert!(def(json!([{"$match": {"$where": "1"}}])).compile().is_err());
        assert!(
            def(json!([{"$addFields": {"x": {"$accumulator": {}}}}]))
                .compile()
                .is_err()
        );
    }

    #[test]
    fn refuses_non_array_pipeline_and_multi_key_stage() {
        assert_eq!(
            def(json!({"$match": {}})).compile().unwrap_err().field,
            "pipeline"
        );
        assert_eq!(
            def(json!([{"$match": {}, "$project": {}}]))
                .compile()
                .unwrap_err()
                .field,
            "pipeline[0]"
        );
        assert_eq!(def(json!([1])).compile().unwrap_err().field, "pipeline[0]");
    }

    #[test]
    fn refuses_unknown_enum_values() {
        let r: Result<StreamDefinition, _> = serde_json::from_value(json!({"fullDocument": "yes"}));
        assert!(r.is_err());
    }

    #[test]
    fn binds_variables_and_defaults() {
        // Without membership, so the bound pipeline is the definition's own.
        let compiled = StreamDefinition {
            membership: false,
            ..def(json!([{"$match": {
                "fullDocument.owner": {"$var": "owner"},
                "fullDocument.kind": {"$var": ["kind", "a"]}
            }}]))
        }
        .compile()
        .unwrap();
        // `owner` is routable for a string, `kind` too; a document value keeps its cursor.
        let avars = parse_avars(Some(r#"{"owner":"bob","kind":{"k":1}}"#)).unwrap();
        let binding = compiled.bind(&key(), &avars).unwrap();
        let m = binding.spec.pipeline[0].get_document("$match").unwrap();
        assert!(!m.contains_key("fullDocument.owner"));
        assert_eq!(
            m.get_document("fullDocument.kind").unwrap(),
            &mongodb::bson::doc! {"k": 1}
        );
        assert_eq!(binding.vars, r#"{"kind":{"k":{"$numberInt":"1"}}}"#);
        assert_eq!(binding.routed.get("owner"), Some(&Bson::from("bob")));
        assert_eq!(binding.spec.routing.len(), 1);
        assert_eq!(
            binding.spec.routing[0].source,
            RuleSource::Var("owner".into())
        );
        let missing = compiled.bind(&key(), &serde_json::Map::new()).unwrap_err();
        assert_eq!(missing, AvarsError::Unbound("owner".into()));
    }

    #[test]
    fn routes_only_variables_whose_every_use_is_a_plain_condition() {
        let bind = |pipeline: Value, avars: &str| {
            def(pipeline)
                .compile()
                .unwrap()
                .bind(&key(), &parse_avars(Some(avars)).unwrap())
                .unwrap()
        };
        // Equality, `$eq` and `$in`: one cursor for every binding, the stage gone when emptied.
        let eq = bind(
            json!([{"$match": {"fullDocument.owner": {"$eq": {"$var": "who"}}}}]),
            r#"{"who":"a"}"#,
        );
        assert!(eq.spec.pipeline.is_empty());
        assert_eq!(eq.vars, "{}");
        let within = bind(
            json!([{"$match": {"operationType": "insert", "fullDocument.owner": {"$in": {"$var": "who"}}}}]),
            r#"{"who":["a","b"]}"#,
        );
        assert_eq!(within.spec.pipeline.len(), 1);
        assert_eq!(within.vars, "{}");
        assert_eq!(within.spec.routing.len(), 1);
        // A shaping stage after the condition, or a second use elsewhere: a cursor per binding.
        let shaped = bind(
            json!([{"$match": {"fullDocument.owner": {"$var": "who"}}}, {"$project": {"x": 1}}]),
            r#"{"who":"a"}"#,
        );
        assert_eq!(shaped.vars, r#"{"who":"a"}"#);
        assert!(shaped.spec.routing.is_empty());
        let twice = bind(
            json!([{"$match": {"fullDocument.owner": {"$var": "who"}}},
                   {"$match": {"$expr": {"$eq": ["$fullDocument.x", {"$var": "who"}]}}}]),
            r#"{"who":"a"}"#,
        );
        assert_eq!(twice.vars, r#"{"who":"a"}"#);
        // null matches missing fields: not routable, keeps its own cursor.
        let null = bind(
            json!([{"$match": {"fullDocument.owner": {"$var": "who"}}}]),
            r#"{"who":null}"#,
        );
        assert_eq!(null.vars, r#"{"who":null}"#);
        assert!(null.spec.routing.is_empty());
    }

    #[test]
    fn membership_rewrites_the_match_and_reads_pre_images_for_itself() {
        let compiled = def(json!([{"$match": {
            "fullDocument.status": "open",
            "fullDocument.owner": {"$var": "who"}
        }}]))
        .compile()
        .unwrap();
        assert_eq!(compiled.membership_note(), None);
        let binding = compiled
            .bind(&key(), &parse_avars(Some(r#"{"who":"a"}"#)).unwrap())
            .unwrap();
        let spec = &binding.spec;
        let membership = spec.membership.as_ref().unwrap();
        assert!(membership.filter.is_some() && membership.strip_pre_image);
        assert_eq!(
            spec.full_document_before_change,
            FullDocumentBeforeChange::WhenAvailable
        );
        assert!(spec.routing.iter().all(|r| r.pre_image));
        let or = spec.pipeline[0]
            .get_document("$match")
            .unwrap()
            .get_array("$or")
            .unwrap();
        assert_eq!(or.len(), 2);
        // Claims only: no rewrite, membership by the rules.
        let claims = StreamDefinition {
            match_rules: Some(json!({"fullDocument.tenantId": {"$claim": "tenant"}})),
            full_document_before_change: FullDocumentBeforeChange::Required,
            ..StreamDefinition::default()
        }
        .compile()
        .unwrap()
        .bind(&key(), &serde_json::Map::new())
        .unwrap();
        let membership = claims.spec.membership.as_ref().unwrap();
        assert!(membership.filter.is_none() && !membership.strip_pre_image);
        assert!(claims.spec.pipeline.is_empty());
        // An operator only MongoDB evaluates: the pipeline stays, the admin API is told why.
        let regex = def(json!([{"$match": {"fullDocument.s": {"$regex": "^o"}}}]))
            .compile()
            .unwrap();
        assert!(regex.membership_note().unwrap().contains("$regex"));
        let bound = regex.bind(&key(), &serde_json::Map::new()).unwrap();
        assert!(bound.spec.membership.is_none());
        assert!(
            bound.spec.pipeline[0]
                .get_document("$match")
                .unwrap()
                .contains_key("fullDocument.s")
        );
        // Nothing reads the document: no membership.
        let plain = def(json!([{"$match": {"operationType": "insert"}}]))
            .compile()
            .unwrap()
            .bind(&key(), &serde_json::Map::new())
            .unwrap();
        assert!(plain.spec.membership.is_none());
    }

    #[test]
    fn refuses_injection_in_avars() {
        assert!(matches!(
            parse_avars(Some(r#"{"a":{"$gt":""}}"#)),
            Err(AvarsError::Dollar(_))
        ));
        assert!(matches!(
            parse_avars(Some(r#"{"a":"$fullDocument.secret"}"#)),
            Err(AvarsError::Dollar(_))
        ));
        assert!(matches!(
            parse_avars(Some(r#"{"$a":1}"#)),
            Err(AvarsError::Dollar(_))
        ));
        assert!(matches!(
            parse_avars(Some("[1]")),
            Err(AvarsError::NotAnObject(_))
        ));
    }

    #[test]
    fn compiles_and_checks_match_rules() {
        let ok = StreamDefinition {
            match_rules: Some(json!({"fullDocument.tenantId": {"$claim": "tenant"}})),
            ..StreamDefinition::default()
        };
        let spec = ok
            .compile()
            .unwrap()
            .bind(&key(), &serde_json::Map::new())
            .unwrap()
            .spec;
        assert_eq!(spec.routing[0].field, ["fullDocument", "tenantId"]);
        assert_eq!(spec.routing[0].source, RuleSource::Claim("tenant".into()));
        for bad in [
            json!([1]),
            json!({"a": "tenant"}),
            json!({"$where": {"$claim": "x"}}),
            json!({"a": {"$claim": ""}}),
        ] {
            let def = StreamDefinition {
                match_rules: Some(bad.clone()),
                ..StreamDefinition::default()
            };
            assert!(
                def.compile().unwrap_err().field.starts_with("match"),
                "{bad}"
            );
        }
    }

    #[test]
    fn checks_names() {
        assert!(StreamKey::new("shop", "orders.v2", "all-1").is_ok());
        assert_eq!(StreamKey::new("sh/op", "o", "a").unwrap_err().field, "db");
        assert_eq!(
            StreamKey::new("shop", "system.users", "a")
                .unwrap_err()
                .field,
            "coll"
        );
        assert_eq!(StreamKey::new("shop", "o", "").unwrap_err().field, "name");
        assert_eq!(
            StreamKey::new("shop", "o", "a b").unwrap_err().field,
            "name"
        );
    }
}
