//! Permission rules: which roles may subscribe to which streams.
//!
//! A pattern has the shape of a subscribe path, `/{db}/{coll}/_streams/{name}`, where each of
//! the three names is either a literal or `*` (any one name): `/shop/orders/_streams/*`,
//! `/shop/*/_streams/public`, `/*/*/_streams/*`. A `*` never spans more than one name and
//! never matches part of a name, so a pattern can only ever grant what it visibly says.
//!
//! A rule grants its patterns to principals holding any of its roles; the role `*` means
//! "any authenticated principal". Rules only add permissions: there is no deny rule, and a
//! stream no rule grants is refused (403).

use std::fmt;

use crate::streams::StreamKey;

/// The role that, in a rule, stands for every authenticated principal.
pub const ANY_ROLE: &str = "*";

/// One name of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `*`: any name.
    Any,
    /// This name exactly.
    Exact(String),
}

impl Segment {
    fn parse(text: &str) -> Segment {
        if text == "*" {
            Segment::Any
        } else {
            Segment::Exact(text.to_owned())
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Segment::Any => true,
            Segment::Exact(exact) => exact == name,
        }
    }
}

/// A parsed stream pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPattern {
    db: Segment,
    coll: Segment,
    name: Segment,
    text: String,
}

impl StreamPattern {
    /// Parses `/{db}/{coll}/_streams/{name}`; each name is a literal or `*`.
    pub fn parse(text: &str) -> Result<StreamPattern, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let [empty, db, coll, streams, name] = parts.as_slice() else {
            return Err(format!(
                "{text:?} is not of the form /{{db}}/{{coll}}/_streams/{{name}}"
            ));
        };
        if !empty.is_empty() || *streams != "_streams" {
            return Err(format!(
                "{text:?} is not of the form /{{db}}/{{coll}}/_streams/{{name}}"
            ));
        }
        for part in [db, coll, name] {
            if part.is_empty() || (part.contains('*') && *part != "*") {
                return Err(format!(
                    "{text:?}: each name must be a literal or exactly `*`, not {part:?}"
                ));
            }
        }
        Ok(StreamPattern {
            db: Segment::parse(db),
            coll: Segment::parse(coll),
            name: Segment::parse(name),
            text: text.to_owned(),
        })
    }

    /// Whether the stream `key` is covered.
    pub fn matches(&self, key: &StreamKey) -> bool {
        self.db.matches(&key.db) && self.coll.matches(&key.coll) && self.name.matches(&key.name)
    }
}

impl fmt::Display for StreamPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One rule: holders of any of `roles` may subscribe to streams matching any of `streams`.
#[derive(Debug, Clone)]
pub struct Rule {
    roles: Vec<String>,
    streams: Vec<StreamPattern>,
}

impl Rule {
    /// Builds a rule from its roles and pattern texts.
    pub fn new(roles: &[String], streams: &[String]) -> Result<Rule, String> {
        let streams = streams
            .iter()
            .map(|s| StreamPattern::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rule {
            roles: roles.to_vec(),
            streams,
        })
    }

    fn applies_to(&self, roles: &[String]) -> bool {
        self.roles
            .iter()
            .any(|rule_role| rule_role == ANY_ROLE || roles.iter().any(|r| r == rule_role))
    }
}

/// Every rule of the configuration.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// The rules, in configuration order (order does not matter: rules only grant).
    pub fn new(rules: Vec<Rule>) -> Rules {
        Rules { rules }
    }

    /// Whether a principal with `roles` may subscribe to `key`.
    pub fn allows(&self, roles: &[String], key: &StreamKey) -> bool {
        self.rules
            .iter()
            .filter(|rule| rule.applies_to(roles))
            .any(|rule| rule.streams.iter().any(|p| p.matches(key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(db: &str, coll: &str, name: &str) -> StreamKey {
        StreamKey::new(db, coll, name).unwrap()
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_match_whole_names() {
        let p = StreamPattern::parse("/shop/orders/_streams/*").unwrap();
        assert!(p.matches(&key("shop", "orders", "all")));
        assert!(!p.matches(&key("shop", "orders2", "all")));
        assert!(!p.matches(&key("shopx", "orders", "all")));
        let p = StreamPattern::parse("/shop/*/_streams/public").unwrap();
        assert!(p.matches(&key("shop", "anything", "public")));
        assert!(!p.matches(&key("shop", "anything", "private")));
        let p = StreamPattern::parse("/*/*/_streams/*").unwrap();
        assert!(p.matches(&key("a", "b.c", "d")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "shop/orders/_streams/x",
            "/shop/orders/x",
            "/shop/orders/_streams/x/y",
            "/shop/ord*/_streams/x",
            "/shop//_streams/x",
            "/shop/orders/streams/x",
            "/shop/**/_streams/x",
        ] {
            assert!(StreamPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_grant_by_role() {
        let rules = Rules::new(vec![
            Rule::new(&roles(&["reader"]), &roles(&["/shop/orders/_streams/*"])).unwrap(),
            Rule::new(&roles(&["*"]), &roles(&["/shop/*/_streams/public"])).unwrap(),
        ]);
        let orders = key("shop", "orders", "all");
        let public = key("shop", "items", "public");
        assert!(rules.allows(&roles(&["reader"]), &orders));
        assert!(!rules.allows(&roles(&["other"]), &orders));
        assert!(rules.allows(&roles(&["other"]), &public));
        assert!(rules.allows(&[], &public));
        assert!(!rules.allows(&roles(&["reader"]), &key("shop", "items", "all")));
    }
}
