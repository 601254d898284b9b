//! Dotted paths (`fullDocument.owner`, `realm_access.roles`): one walker for BSON and JSON.
//!
//! A step is a field name, or a numeric index when the value there is an array (as MongoDB
//! reads `items.0`). Routing values, token claims and the document view all go through here.

use mongodb::bson::Bson;
use serde_json::Value;

/// A document tree that can be walked one step at a time.
pub trait Node {
    /// The child at `step`: a field of an object, or an element of an array by index.
    fn child(&self, step: &str) -> Option<&Self>;
}

impl Node for Bson {
    fn child(&self, step: &str) -> Option<&Bson> {
        match self {
            Bson::Document(doc) => doc.get(step),
            Bson::Array(items) => items.get(step.parse::<usize>().ok()?),
            _ => None,
        }
    }
}

impl Node for Value {
    fn child(&self, step: &str) -> Option<&Value> {
        match self {
            Value::Object(map) => map.get(step),
            Value::Array(items) => items.get(step.parse::<usize>().ok()?),
            _ => None,
        }
    }
}

/// The node at `path` below `node` (the empty path is `node` itself).
pub fn walk<N: Node, S: AsRef<str>>(node: &N, path: impl IntoIterator<Item = S>) -> Option<&N> {
    path.into_iter()
        .try_fold(node, |node, step| node.child(step.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;
    use serde_json::json;

    #[test]
    fn walks_fields_and_array_indexes_in_bson_and_json() {
        let bson = Bson::Document(doc! { "a": { "b": [10, { "c": "x" }] } });
        assert_eq!(walk(&bson, ["a", "b", "1", "c"]), Some(&Bson::from("x")));
        assert_eq!(walk(&bson, ["a", "missing"]), None);
        assert_eq!(walk(&bson, ["a", "b", "z"]), None);
        let json = json!({ "a": { "b": [10, { "c": "x" }] } });
        assert_eq!(walk(&json, "a.b.0".split('.')), Some(&json!(10)));
        assert_eq!(walk(&json, Vec::<String>::new()), Some(&json));
    }
}
