//! The `meta.k8s.io` views of records a client may ask for in its `Accept` header: Table
//! responses, so `kubectl get` shows the CRD printer columns, and PartialObjectMetadata, which
//! metadata-only informers (client-go's metadata client, kube-rs `metadata_watcher`) read.
//! Pure.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::kinds::Kind;

/// How a client asked to see records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The records as they are.
    Full,
    /// A `meta.k8s.io/v1` Table, its rows carrying what [`IncludeObject`] says.
    Table(IncludeObject),
    /// `PartialObjectMetadata` of `meta.k8s.io/<version>` (`v1` or `v1beta1`).
    Metadata(&'static str),
}

/// What each row of a Table carries as its `object` (the request's `includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// Nothing.
    None,
    /// The record's metadata, as `PartialObjectMetadata` (the default).
    #[default]
    Metadata,
    /// The whole record (kubectl asks for it to `--sort-by` a field of the spec or status).
    Object,
}

impl IncludeObject {
    /// The policy a request's `includeObject` names (`Metadata` when it names none); the
    /// message of a Kubernetes `BadRequest` for any other value.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("" | "Metadata") => Ok(Self::Metadata),
            Some("None") => Ok(Self::None),
            Some("Object") => Ok(Self::Object),
            Some(other) => Err(format!(
                "includeObject: Unsupported value: {other:?}: supported values: \"None\", \"Metadata\", \"Object\""
            )),
        }
    }
}

/// The view an `Accept` header asks for: its first media range Karri serves (a client lists
/// what it prefers first, e.g. `application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,
/// application/json`); the records themselves without a header. `None` when the header names
/// only media Karri does not serve (HTML, YAML, protobuf, an `as=` view of another version):
/// kube-apiserver answers that 406 rather than send what the client did not ask for.
pub fn view_of(accept: Option<&str>) -> Option<View> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(View::Full);
    };
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or_default();
        if !matches!(media, "application/json" | "application/*" | "*/*" | "") {
            continue;
        }
        let (mut as_, mut group, mut version) = (None, None, None);
        for p in params {
            match p.split_once('=') {
                Some(("as", v)) => as_ = Some(v),
                Some(("g", v)) => group = Some(v),
                Some(("v", v)) => version = Some(v),
                _ => {}
            }
        }
        let meta_group = group.is_none_or(|g| g == "meta.k8s.io");
        match (as_, version) {
            (None, _) => return Some(View::Full),
            (Some("Table"), _) if meta_group => return Some(View::Table(IncludeObject::Metadata)),
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("v1"))
                if meta_group =>
            {
                return Some(View::Metadata("v1"))
            }
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("v1beta1"))
                if meta_group =>
            {
                return Some(View::Metadata("v1beta1"))
            }
            _ => {}
        }
    }
    None
}

/// A record as `PartialObjectMetadata` of `meta.k8s.io/<version>`: its metadata only.
pub fn partial_metadata(v: &Value, version: &str) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": v.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// Records as a `PartialObjectMetadataList` of `meta.k8s.io/<version>` at `revision`, with the
/// continue token of a page.
pub fn partial_metadata_list<'a>(
    items: impl Iterator<Item = &'a Value>,
    revision: i64,
    continue_token: Option<&str>,
    version: &str,
) -> Value {
    let mut meta = json!({"resourceVersion": revision.to_string()});
    if let Some(c) = continue_token {
        meta["continue"] = Value::String(c.to_owned());
    }
    json!({
        "kind": "PartialObjectMetadataList",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": meta,
        "items": items.map(|v| partial_metadata(v, version)).collect::<Vec<_>>(),
    })
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

/// One Table row, carrying the record as `include` says.
pub fn row(kind: &Kind, obj: &Value, now: DateTime<Utc>, include: IncludeObject) -> Value {
    let mut cells = vec![obj
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null)];
    cells.extend(
        kind.columns
            .iter()
            .map(|c| cell(json_path(obj, &c.json_path), &c.type_, now)),
    );
    let object = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
        }),
        IncludeObject::Object => obj.clone(),
    };
    json!({"cells": cells, "object": object})
}

/// A whole Table.
pub fn table<'a>(
    kind: &Kind,
    objects: impl Iterator<Item = &'a Value>,
    resource_version: i64,
    continue_token: Option<&str>,
    include: IncludeObject,
) -> Value {
    let now = Utc::now();
    let rows: Vec<Value> = objects.map(|o| row(kind, o, now, include)).collect();
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
    fn a_header_naming_only_media_karri_does_not_serve_gets_no_view() {
        for accept in [
            "text/html",
            "application/yaml",
            "application/vnd.kubernetes.protobuf",
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v2",
            "application/json;as=Table;g=example.com;v=v1",
        ] {
            assert_eq!(view_of(Some(accept)), None, "{accept}");
        }
    }

    #[test]
    fn the_view_is_the_first_media_range_karri_serves() {
        let rows = [
            (None, View::Full),
            (Some(""), View::Full),
            (Some("application/json"), View::Full),
            (Some("*/*"), View::Full),
            // A browser's header: its wildcard takes JSON.
            (
                Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                View::Full,
            ),
            // A watch.
            (Some("application/json;stream=watch"), View::Full),
            (
                Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
                View::Table(IncludeObject::Metadata),
            ),
            // client-go's metadata client, and kube-rs's metadata API.
            (
                Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"),
                View::Metadata("v1"),
            ),
            (
                Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1beta1"),
                View::Metadata("v1beta1"),
            ),
            // A protobuf preference first, then JSON: the records in JSON.
            (
                Some("application/vnd.kubernetes.protobuf;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"),
                View::Full,
            ),
            // A version Karri does not serve falls through to the next range.
            (
                Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v2,application/json;as=Table;g=meta.k8s.io;v=v1"),
                View::Table(IncludeObject::Metadata),
            ),
        ];
        for (accept, want) in rows {
            assert_eq!(view_of(accept), Some(want), "{accept:?}");
        }
        let record = json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
            "metadata": {"name": "web", "resourceVersion": "7"}, "spec": {"imageId": "emi-1"}});
        assert_eq!(
            partial_metadata(&record, "v1"),
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"name": "web", "resourceVersion": "7"}})
        );
        // A Table's rows carry the metadata, nothing, or the whole record, as includeObject says.
        let include = |v: Option<&str>| IncludeObject::parse(v);
        assert_eq!(include(None), Ok(IncludeObject::Metadata));
        assert_eq!(include(Some("Object")), Ok(IncludeObject::Object));
        assert_eq!(include(Some("None")), Ok(IncludeObject::None));
        assert!(include(Some("object")).is_err());
        let kind = crate::kinds::Kinds::load()
            .by_plural("instances")
            .expect("instances are served");
        let object_of = |policy| {
            table(&kind, std::iter::once(&record), 1, None, policy)["rows"][0]["object"].clone()
        };
        assert_eq!(object_of(IncludeObject::Object), record);
        assert_eq!(object_of(IncludeObject::None), Value::Null);
        assert_eq!(
            object_of(IncludeObject::Metadata)["kind"],
            "PartialObjectMetadata"
        );
        let list = partial_metadata_list(std::iter::once(&record), 9, Some("c"), "v1");
        assert_eq!(list["kind"], "PartialObjectMetadataList");
        assert_eq!(
            list["metadata"],
            json!({"resourceVersion": "9", "continue": "c"})
        );
        assert_eq!(list["items"][0]["metadata"]["name"], "web");
    }
}
