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

/// The media a response is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    /// `application/json`.
    Json,
    /// `application/yaml` (not for a watch, which has no YAML stream).
    Yaml,
}

/// What an `Accept` header asks for, as kube-apiserver negotiates it for a custom resource: the
/// first media range served (a client lists what it prefers first, e.g.
/// `application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json`); the
/// records in JSON without a header. `None` when every range names something not served (HTML,
/// protobuf, YAML for a `watch`, a view of another group or version): that is answered 406
/// rather than with what the client did not ask for. Media types are compared without regard to
/// case; `q` and other parameters are not weighed.
pub fn negotiate(accept: Option<&str>, watch: bool) -> Option<(View, Media)> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some((View::Full, Media::Json));
    };
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or_default().to_ascii_lowercase();
        let media = match media.as_str() {
            "application/json" | "application/*" | "*/*" | "*" => Media::Json,
            "application/yaml" if !watch => Media::Yaml,
            _ => continue,
        };
        let (mut as_, mut group, mut version) = (None, None, None);
        for p in params {
            match p.split_once('=') {
                Some(("as", v)) => as_ = Some(v),
                Some(("g", v)) => group = Some(v),
                Some(("v", v)) => version = Some(v),
                _ => {}
            }
        }
        let meta = group == Some("meta.k8s.io");
        let version = match version {
            Some("v1") => Some("v1"),
            Some("v1beta1") => Some("v1beta1"),
            _ => None,
        };
        let view = match (as_, version) {
            (None, _) => View::Full,
            (Some("Table"), Some(_)) if meta => View::Table(IncludeObject::Metadata),
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some(v)) if meta => {
                View::Metadata(v)
            }
            _ => continue,
        };
        return Some((view, media));
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
    fn a_header_naming_only_what_karri_does_not_serve_is_not_acceptable() {
        for accept in [
            "text/html",
            "text/html,",
            "application/vnd.kubernetes.protobuf",
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v2",
            "application/json;as=Table;g=example.com;v=v1",
            // kube-apiserver names the group and version of a view: both are needed.
            "application/json;as=Table",
            "application/json;as=Table;g=meta.k8s.io",
        ] {
            assert_eq!(negotiate(Some(accept), false), None, "{accept}");
        }
        // A watch has no YAML stream.
        assert_eq!(negotiate(Some("application/yaml"), true), None);
    }

    #[test]
    fn the_answer_is_the_first_media_range_karri_serves() {
        use Media::{Json, Yaml};
        let as_table = View::Table(IncludeObject::Metadata);
        let rows = [
            (None, false, View::Full, Json),
            (Some(""), false, View::Full, Json),
            (Some("application/json"), false, View::Full, Json),
            (Some("Application/JSON; charset=utf-8"), false, View::Full, Json),
            (Some("*/*"), false, View::Full, Json),
            (Some("*"), false, View::Full, Json),
            (Some("application/*"), false, View::Full, Json),
            // A browser's header: its wildcard takes JSON.
            (
                Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                false,
                View::Full,
                Json,
            ),
            (Some("application/json;stream=watch"), true, View::Full, Json),
            (Some("application/yaml"), false, View::Full, Yaml),
            // A watch skips YAML for what follows.
            (Some("application/yaml,application/json"), true, View::Full, Json),
            (
                Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
                false,
                as_table,
                Json,
            ),
            (
                Some("application/json;as=Table;v=v1beta1;g=meta.k8s.io"),
                false,
                as_table,
                Json,
            ),
            // client-go's metadata client, and kube-rs's metadata API.
            (
                Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"),
                false,
                View::Metadata("v1"),
                Json,
            ),
            (
                Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1beta1"),
                false,
                View::Metadata("v1beta1"),
                Json,
            ),
            // A protobuf preference first, then JSON: the records in JSON.
            (
                Some("application/vnd.kubernetes.protobuf;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"),
                false,
                View::Full,
                Json,
            ),
            // A version Karri does not serve falls through to the next range.
            (
                Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v2,application/json;as=Table;g=meta.k8s.io;v=v1"),
                false,
                as_table,
                Json,
            ),
        ];
        for (accept, watch, view, media) in rows {
            assert_eq!(
                negotiate(accept, watch),
                Some((view, media)),
                "{accept:?} watch={watch}"
            );
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
