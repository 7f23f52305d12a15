//! `meta.k8s.io/v1` Table responses, so `kubectl get` shows the CRD printer columns. Pure.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::kinds::Kind;

/// Whether an `Accept` header asks for a Table.
pub fn wants_table(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.split(',').any(|part| part.contains("as=Table")))
}

/// Evaluate the JSONPath subset printer columns use: `.a.b`, `.a\.b`, `.a[0]`,
/// `.a[?(@.type=="Ready")].status`.
pub fn json_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut segments = Vec::new();
    let mut cur = String::new();
    let mut chars = path
        .trim_start_matches('{')
        .trim_end_matches('}')
        .chars()
        .peekable();
    let mut depth = 0;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '[' => {
                depth += 1;
                cur.push(c);
            }
            ']' => {
                depth -= 1;
                cur.push(c);
            }
            '.' if depth == 0 => {
                if !cur.is_empty() {
                    segments.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        segments.push(cur);
    }
    let mut node = v;
    for seg in segments {
        let (name, filter) = match seg.find('[') {
            Some(i) => (&seg[..i], Some(seg[i + 1..].trim_end_matches(']'))),
            None => (seg.as_str(), None),
        };
        if !name.is_empty() {
            node = node.get(name)?;
        }
        if let Some(f) = filter {
            let arr = node.as_array()?;
            if let Ok(i) = f.parse::<usize>() {
                node = arr.get(i)?;
            } else {
                let cond = f.strip_prefix("?(@.")?.strip_suffix(')')?;
                let (key, want) = cond.split_once("==")?;
                let want = want.trim().trim_matches('"').trim_matches('\'');
                node = arr
                    .iter()
                    .find(|e| e.get(key.trim()).and_then(Value::as_str) == Some(want))?;
            }
        }
    }
    Some(node)
}

/// A duration the way kubectl prints ages: `45s`, `12m`, `5h`, `3d`.
pub fn human_age(since: &str, now: DateTime<Utc>) -> String {
    let Ok(t) = DateTime::parse_from_rfc3339(since) else {
        return "<invalid>".into();
    };
    let secs = (now - t.with_timezone(&Utc)).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn cell(v: Option<&Value>, type_: &str, now: DateTime<Utc>) -> Value {
    match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if type_ == "date" => Value::String(human_age(s, now)),
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(other @ (Value::Number(_) | Value::Bool(_))) => other.clone(),
        Some(other) => Value::String(other.to_string()),
    }
}

/// The column definitions of a kind's Table.
pub fn column_definitions(kind: &Kind) -> Value {
    let mut cols = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    cols.extend(kind.columns.iter().map(|c| {
        json!({"name": c.name, "type": c.type_, "format": "", "description": c.description, "priority": c.priority})
    }));
    Value::Array(cols)
}

/// One Table row, carrying the record's metadata as kubectl expects.
pub fn row(kind: &Kind, obj: &Value, now: DateTime<Utc>) -> Value {
    let mut cells = vec![obj
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null)];
    cells.extend(
        kind.columns
            .iter()
            .map(|c| cell(json_path(obj, &c.json_path), &c.type_, now)),
    );
    json!({
        "cells": cells,
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
        }
    })
}

/// A whole Table.
pub fn table<'a>(
    kind: &Kind,
    objects: impl Iterator<Item = &'a Value>,
    resource_version: i64,
    continue_token: Option<&str>,
) -> Value {
    let now = Utc::now();
    let rows: Vec<Value> = objects.map(|o| row(kind, o, now)).collect();
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if let Some(c) = continue_token {
        metadata["continue"] = Value::String(c.to_string());
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": column_definitions(kind),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_handles_escaped_dots_and_filters() {
        let v = json!({"metadata": {"labels": {"karri.dev/id": "i-1"}},
            "status": {"conditions": [{"type": "Scheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}});
        assert_eq!(
            json_path(&v, ".metadata.labels.karri\\.dev/id"),
            Some(&json!("i-1"))
        );
        assert_eq!(
            json_path(&v, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("False"))
        );
        assert_eq!(
            json_path(&v, ".status.conditions[0].type"),
            Some(&json!("Scheduled"))
        );
        assert_eq!(json_path(&v, ".spec.missing"), None);
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = DateTime::parse_from_rfc3339("2026-01-02T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        assert_eq!(human_age("2026-01-01T23:59:15Z", now), "45s");
        assert_eq!(human_age("2026-01-01T23:00:00Z", now), "60m");
        assert_eq!(human_age("2026-01-01T12:00:00Z", now), "12h");
        assert_eq!(human_age("2025-12-28T00:00:00Z", now), "5d");
    }

    #[test]
    fn table_accept_header_is_recognised() {
        assert!(wants_table(Some(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        )));
        assert!(!wants_table(Some("application/json")));
    }
}
