//! Label and field selectors: parsing and matching, pure.

use serde_json::Value;

/// Why a selector could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The selector text is malformed.
    #[error("unable to parse requirement {0:?}")]
    Malformed(String),
    /// The field selector names a field that is not supported for this kind.
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    /// The label's value, an integer, is greater than this.
    Gt(i64),
    /// The label's value, an integer, is less than this.
    Lt(i64),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    reqs: Vec<(String, Op)>,
}

/// Split on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A label key as Kubernetes checks it in a selector: a qualified name (`-a` is not one).
fn valid_key(k: &str) -> bool {
    crate::schema::qualified_name_problem(k).is_none()
}

/// `key <op> (…)`, with or without a space before the parenthesis: the key and the set.
fn set_operation<'a>(p: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let (key, rest) = p.split_at(p.find(char::is_whitespace)?);
    let rest = rest.trim_start().strip_prefix(op)?.trim_start();
    rest.starts_with('(').then_some((key, rest))
}

fn parse_set(rest: &str, whole: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError::Malformed(whole.to_string()))?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    // As Kubernetes: `in` and `notin` need at least one value.
    if values.is_empty() {
        return Err(SelectorError::Malformed(whole.to_string()));
    }
    Ok(values)
}

impl LabelSelector {
    /// Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h,n>1,m<2`.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for part in split_top_level(text) {
            let p = part.trim();
            let bad = || SelectorError::Malformed(p.to_string());
            let (key, op) = if let Some(k) = p.strip_prefix('!') {
                (k.trim().to_string(), Op::DoesNotExist)
            } else if let Some((k, v)) = p.split_once("!=") {
                (k.trim().to_string(), Op::NotEq(v.trim().to_string()))
            } else if let Some((k, v)) = p.split_once("==") {
                (k.trim().to_string(), Op::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = p.split_once('=') {
                (k.trim().to_string(), Op::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = p.split_once('>') {
                (
                    k.trim().to_string(),
                    Op::Gt(v.trim().parse().map_err(|_| bad())?),
                )
            } else if let Some((k, v)) = p.split_once('<') {
                (
                    k.trim().to_string(),
                    Op::Lt(v.trim().parse().map_err(|_| bad())?),
                )
            } else if let Some((k, rest)) = set_operation(p, "notin") {
                (k.to_string(), Op::NotIn(parse_set(rest, p)?))
            } else if let Some((k, rest)) = set_operation(p, "in") {
                (k.to_string(), Op::In(parse_set(rest, p)?))
            } else {
                (p.to_string(), Op::Exists)
            };
            // Values are label values, as Kubernetes checks them (`env===prod` asks for the
            // value `=prod`, which no label can have: a malformed selector, not an empty list).
            let values: &[String] = match &op {
                Op::Eq(v) | Op::NotEq(v) => std::slice::from_ref(v),
                Op::In(vs) | Op::NotIn(vs) => vs,
                Op::Exists | Op::DoesNotExist | Op::Gt(_) | Op::Lt(_) => &[],
            };
            if !valid_key(&key)
                || values
                    .iter()
                    .any(|v| crate::schema::label_value_problem(v).is_some())
            {
                return Err(bad());
            }
            reqs.push((key, op));
        }
        Ok(Self { reqs })
    }

    /// Whether the labels of `object` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        // Lists without a selector ask this of every record: answer without a lookup.
        if self.reqs.is_empty() {
            return true;
        }
        let labels = object.get("metadata").and_then(|m| m.get("labels"));
        self.reqs.iter().all(|(key, op)| {
            let value = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match op {
                Op::Eq(v) => value == Some(v.as_str()),
                Op::NotEq(v) => value != Some(v.as_str()),
                Op::In(vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
                Op::NotIn(vs) => !value.is_some_and(|x| vs.iter().any(|v| v == x)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
                Op::Gt(n) => value
                    .and_then(|x| x.parse::<i64>().ok())
                    .is_some_and(|x| x > *n),
                Op::Lt(n) => value
                    .and_then(|x| x.parse::<i64>().ok())
                    .is_some_and(|x| x < *n),
            }
        })
    }

    /// True when the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }
}

/// A parsed field selector over a fixed set of supported fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

/// Fields every kind can be selected on; `status.nodeName` is the binding of instances.
pub const SUPPORTED_FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "status.nodeName"];

impl FieldSelector {
    /// Parse `metadata.name=x,status.nodeName!=y`, with Kubernetes' escapes in values (`\,`,
    /// `\=`, `\\`).
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_unescaped(text, |c| c == ',') {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            let (field, eq, value) =
                split_field_term(p).ok_or_else(|| SelectorError::Malformed(p.to_string()))?;
            let field = field.trim();
            if !SUPPORTED_FIELDS.contains(&field) {
                return Err(SelectorError::UnsupportedField(field.to_string()));
            }
            let value = unescape_field_value(value.trim())?;
            reqs.push((field.to_string(), eq, value));
        }
        Ok(Self { reqs })
    }

    /// The value the selector requires for `field` with `=`, if any.
    pub fn required(&self, field: &str) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(f, eq, _)| f == field && *eq)
            .map(|(_, _, v)| v.as_str())
    }

    /// Whether `object` satisfies every requirement; a missing field reads as "".
    pub fn matches(&self, object: &Value) -> bool {
        self.reqs.iter().all(|(field, eq, want)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let have = object
                .pointer(&pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (have == want) == *eq
        })
    }
}

/// The pieces of `text` between the characters `sep` accepts that no backslash escapes.
fn split_unescaped(text: &str, sep: impl Fn(char) -> bool) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if sep(c) {
            parts.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&text[start..]);
    parts
}

/// `field`, whether the operator is `=`/`==` (true) or `!=` (false), and the raw value: the
/// first operator no backslash escapes, as Kubernetes splits a field selector term.
fn split_field_term(term: &str) -> Option<(&str, bool, &str)> {
    let mut escaped = false;
    for (i, c) in term.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        let rest = &term[i..];
        if c == '\\' {
            escaped = true;
        } else if let Some(v) = rest.strip_prefix("!=") {
            return Some((&term[..i], false, v));
        } else if let Some(v) = rest.strip_prefix("==") {
            return Some((&term[..i], true, v));
        } else if let Some(v) = rest.strip_prefix('=') {
            return Some((&term[..i], true, v));
        }
    }
    None
}

/// A field selector value with its escapes undone; an unescaped `,` or `=`, or an unknown or
/// unfinished escape, is malformed (as Kubernetes' `UnescapeValue`).
fn unescape_field_value(raw: &str) -> Result<String, SelectorError> {
    let malformed = || SelectorError::Malformed(raw.to_string());
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                _ => return Err(malformed()),
            },
            ',' | '=' => return Err(malformed()),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj() -> Value {
        json!({"metadata": {"name": "web-1", "namespace": "acme", "labels": {"app": "web", "tier": "front", "rank": "5"}},
               "status": {"nodeName": "node-1"}})
    }

    #[test]
    fn label_selectors_match_as_kubernetes_does() {
        let rows = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("app!=web", false),
            ("app in (web,db)", true),
            ("app in(web,db)", true),
            ("app notin(db)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("missing!=x", true),
            ("rank>4", true),
            ("rank > 5", false),
            ("rank<6", true),
            ("rank<-1", false),
            ("app>1", false),
            ("missing<9", false),
        ];
        for (sel, want) in rows {
            let s = LabelSelector::parse(sel).expect(sel);
            assert_eq!(s.matches(&obj()), want, "selector {sel:?}");
        }
    }

    #[test]
    fn malformed_label_selector_is_rejected() {
        for sel in [
            "app in web",
            "a b=c",
            "=x",
            "app in ()",
            "app notin ( , )",
            "env===prod",
            "env!==prod",
            "app in (a b)",
            "tier=web!",
            "-a",
            "a/b/c",
            "rank>five",
            "rank<",
        ] {
            assert!(LabelSelector::parse(sel).is_err(), "{sel:?} should fail");
        }
    }

    #[test]
    fn field_selectors_match_node_binding_and_name() {
        let rows = [
            ("status.nodeName=node-1", true),
            ("status.nodeName=node-2", false),
            ("status.nodeName!=node-2", true),
            ("metadata.name=web-1,metadata.namespace=acme", true),
            ("metadata.namespace=other", false),
        ];
        for (sel, want) in rows {
            let s = FieldSelector::parse(sel).expect(sel);
            assert_eq!(s.matches(&obj()), want, "selector {sel:?}");
        }
        let unbound = json!({"metadata": {"name": "x"}});
        let s = FieldSelector::parse("status.nodeName=").expect("empty value parses");
        assert!(s.matches(&unbound));
    }

    #[test]
    fn field_selector_values_take_kubernetes_escapes() {
        let named = |name: &str| json!({"metadata": {"name": name}});
        let rows = [
            (r"metadata.name=a\,b", "a,b", true),
            (r"metadata.name=a\=b", "a=b", true),
            (r"metadata.name=a\\b", r"a\b", true),
            (r"metadata.name!=a\,b,metadata.name=c", "c", true),
            (r"metadata.name=a\,b", "a", false),
            ("metadata.name=x,,", "x", true),
        ];
        for (sel, name, want) in rows {
            let s = FieldSelector::parse(sel).expect(sel);
            assert_eq!(
                s.matches(&named(name)),
                want,
                "selector {sel:?} on {name:?}"
            );
        }
        for sel in [
            r"metadata.name=a\b",
            r"metadata.name=a\",
            "metadata.name=a=b",
            "metadata.name",
        ] {
            assert!(
                matches!(FieldSelector::parse(sel), Err(SelectorError::Malformed(_))),
                "{sel:?} should be malformed"
            );
        }
    }

    #[test]
    fn unsupported_field_is_named_in_the_error() {
        let e = FieldSelector::parse("spec.imageId=emi-1").expect_err("unsupported");
        assert_eq!(e.to_string(), "field label not supported: spec.imageId");
    }
}
