//! Structural checks of a record against its CRD's OpenAPI schema: unknown fields are found
//! (and pruned, as kube-apiserver prunes them), types and required fields are checked. Pure.

use serde_json::{Map, Value};

/// What a check found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Paths of fields the schema does not declare (already removed from the value).
    pub unknown: Vec<String>,
    /// (path, message) of values of the wrong type, missing required fields, bad enum values.
    pub invalid: Vec<(String, String)>,
}

/// Fields of `metadata` that a client may send.
const METADATA_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Why `key` is no label or annotation key (a qualified name: an optional DNS subdomain
/// prefix and `/`, then a name of at most 63 characters, alphanumeric at both ends, with `-`,
/// `_` and `.` inside), worded as kube-apiserver words it; `None` if it is one. Pure.
pub fn qualified_name_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(label_ok) {
            return Some(format!(
                "Invalid value: {key:?}: prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ));
        }
    }
    if name.is_empty() {
        return Some(format!(
            "Invalid value: {key:?}: name part must be non-empty"
        ));
    }
    if name.len() > 63 {
        return Some(format!(
            "Invalid value: {key:?}: name part must be no more than 63 characters"
        ));
    }
    if !is_label_name(name) {
        return Some(format!(
            "Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ));
    }
    None
}

/// Why `value` is no label value (at most 63 characters, empty or alphanumeric at both ends with
/// `-`, `_` and `.` inside), worded as kube-apiserver words it; `None` if it is one. Pure.
pub fn label_value_problem(value: &str) -> Option<String> {
    if value.len() > 63 {
        return Some(format!(
            "Invalid value: {value:?}: must be no more than 63 characters"
        ));
    }
    if !value.is_empty() && !is_label_name(value) {
        return Some(format!(
            "Invalid value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ));
    }
    None
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
fn is_label_name(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    edge(s.chars().next())
        && edge(s.chars().next_back())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The most bytes a record's annotations (keys and values) may hold, as in Kubernetes.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// What is wrong with the shape of `metadata`'s fields other than labels and the keys and
/// values of annotations (checked apart): each has the type Kubernetes' ObjectMeta gives it, so
/// that every client (and Karri's own controllers, which read records typed) can read the
/// record back; finalizers are qualified names, and annotations hold at most
/// [`MAX_ANNOTATIONS_BYTES`]. Pure.
pub fn metadata_problems(meta: &Map<String, Value>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |path: String, why: &str| out.push((path, why.to_owned()));
    let is_time = |v: &Value| {
        v.as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
    };
    for (field, value) in meta {
        if value.is_null() {
            continue;
        }
        let path = format!("metadata.{field}");
        match field.as_str() {
            "name" | "generateName" | "namespace" | "selfLink" | "uid" | "resourceVersion"
                if !value.is_string() =>
            {
                bad(path, "must be a string")
            }
            "generation" | "deletionGracePeriodSeconds" if !value.is_i64() => {
                bad(path, "must be an integer")
            }
            "creationTimestamp" | "deletionTimestamp" if !is_time(value) => {
                bad(path, "must be an RFC 3339 time")
            }
            "finalizers" => match value.as_array() {
                Some(items) if items.iter().all(Value::is_string) => {
                    // As Kubernetes: each names its owner as a qualified name.
                    for (i, name) in items.iter().filter_map(Value::as_str).enumerate() {
                        if let Some(why) = qualified_name_problem(name) {
                            bad(format!("{path}[{i}]"), &why);
                        }
                    }
                }
                _ => bad(path, "must be a list of strings"),
            },
            "annotations" => {
                let size: usize = value
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                    .sum();
                if size > MAX_ANNOTATIONS_BYTES {
                    bad(
                        path,
                        &format!("Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes"),
                    );
                }
            }
            "ownerReferences" => {
                let Some(items) = value.as_array() else {
                    bad(path, "must be a list of owner references");
                    continue;
                };
                let mut controllers = 0;
                let mut uids = std::collections::HashSet::new();
                for (i, r) in items.iter().enumerate() {
                    if let Some(uid) = r.get("uid").and_then(Value::as_str) {
                        if !uids.insert(uid) {
                            bad(
                                format!("{path}[{i}].uid"),
                                "Duplicate value: an owner is named once",
                            );
                        }
                    }
                    let at = format!("{path}[{i}]");
                    if !r.is_object() {
                        bad(at, "must be an owner reference");
                        continue;
                    }
                    for key in ["apiVersion", "kind", "name", "uid"] {
                        if r.get(key).and_then(Value::as_str).is_none_or(str::is_empty) {
                            bad(format!("{at}.{key}"), "Required value: a non-empty string");
                        }
                    }
                    for key in ["controller", "blockOwnerDeletion"] {
                        if r.get(key).is_some_and(|v| !v.is_null() && !v.is_boolean()) {
                            bad(format!("{at}.{key}"), "must be true or false");
                        }
                    }
                    if r.get("controller").and_then(Value::as_bool) == Some(true) {
                        controllers += 1;
                    }
                }
                if controllers > 1 {
                    bad(path, "Only one reference can have Controller set to true");
                }
            }
            "managedFields" => {
                let Some(items) = value.as_array() else {
                    bad(path, "must be a list of managed fields entries");
                    continue;
                };
                for (i, e) in items.iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    let Some(entry) = e.as_object() else {
                        bad(at, "must be a managed fields entry");
                        continue;
                    };
                    for (key, v) in entry {
                        let ok = v.is_null()
                            || match key.as_str() {
                                "manager" | "apiVersion" | "subresource" => v.is_string(),
                                "operation" => matches!(v.as_str(), Some("Apply" | "Update")),
                                "fieldsType" => v.as_str() == Some("FieldsV1"),
                                "fieldsV1" => v.is_object(),
                                "time" => is_time(v),
                                _ => true,
                            };
                        if !ok {
                            bad(format!("{at}.{key}"), "has the wrong type or value");
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Check `value` (a whole record) against the CRD's root schema, pruning unknown fields.
pub fn check_record(value: &mut Value, root: &Value) -> Findings {
    let mut f = Findings::default();
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        let unknown: Vec<String> = meta
            .keys()
            .filter(|k| !METADATA_FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in unknown {
            meta.remove(&k);
            f.unknown.push(format!(".metadata.{k}"));
        }
        for field in ["labels", "annotations"] {
            if let Some(map) = meta.get(field) {
                let ok = map.is_null()
                    || map
                        .as_object()
                        .is_some_and(|m| m.values().all(Value::is_string));
                if !ok {
                    f.invalid.push((
                        format!("metadata.{field}"),
                        "must be a map of string keys to string values".into(),
                    ));
                    continue;
                }
                for (key, value) in map.as_object().into_iter().flatten() {
                    let value = value.as_str().unwrap_or_default();
                    let problem = qualified_name_problem(key).or_else(|| {
                        (field == "labels")
                            .then(|| label_value_problem(value))
                            .flatten()
                    });
                    if let Some(why) = problem {
                        f.invalid.push((format!("metadata.{field}"), why));
                    }
                }
            }
        }
        f.invalid.extend(metadata_problems(meta));
    }
    if let (Some(obj), Some(props)) = (
        value.as_object_mut(),
        root.get("properties").and_then(Value::as_object),
    ) {
        let unknown: Vec<String> = obj
            .keys()
            .filter(|k| {
                !matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                    && !props.contains_key(k.as_str())
            })
            .cloned()
            .collect();
        for k in unknown {
            obj.remove(&k);
            f.unknown.push(format!(".{k}"));
        }
        let mut nulls = Vec::new();
        for (k, v) in obj.iter_mut() {
            if k == "metadata" || k == "apiVersion" || k == "kind" {
                continue;
            }
            if let Some(s) = props.get(k) {
                if v.is_null() && !nullable(s) {
                    nulls.push(k.clone());
                    continue;
                }
                walk(v, s, k, &mut f);
            }
        }
        for k in nulls {
            obj.remove(&k);
        }
        check_required(obj, root, "", &mut f);
    }
    f
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn check_required(obj: &Map<String, Value>, schema: &Value, path: &str, f: &mut Findings) {
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if obj.get(r).is_none_or(Value::is_null) {
                f.invalid.push((join(path, r), "Required value".into()));
            }
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether a schema lets its value be null.
fn nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool) == Some(true)
}

fn walk(value: &mut Value, schema: &Value, path: &str, f: &mut Findings) {
    if value.is_null() {
        // A null the schema allows stays; its parent prunes one it does not allow.
        return;
    }
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            f.invalid.push((
                path.into(),
                format!("Invalid value: {value}: must be an integer or a string"),
            ));
        }
        return;
    }
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let Some(ty) = schema.get("type").and_then(Value::as_str) else {
        // anyOf / oneOf / untyped: accept as is.
        return;
    };
    let actual = type_name(value);
    let type_ok = actual == ty || (ty == "number" && actual == "integer");
    if !type_ok {
        f.invalid.push((
            path.into(),
            format!(
                "Invalid value: \"{actual}\": {path} in body must be of type {ty}: \"{actual}\""
            ),
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let list = allowed
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            f.invalid.push((
                path.into(),
                format!("Unsupported value: {value}: supported values: {list}"),
            ));
        }
    }
    match value {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let mut unknown = Vec::new();
            // As kube-apiserver for custom resources: a null where the schema does not allow
            // one is pruned before defaulting (Helm and Kustomize render empty values so).
            let mut nulls = Vec::new();
            for (k, v) in obj.iter_mut() {
                let child = join(path, k);
                match props.and_then(|p| p.get(k)).or(additional) {
                    Some(s) if v.is_null() && !nullable(s) => nulls.push(k.clone()),
                    Some(s) => walk(v, s, &child, f),
                    None if !preserve => unknown.push(k.clone()),
                    None => {}
                }
            }
            for k in nulls {
                obj.remove(&k);
            }
            for k in unknown {
                obj.remove(&k);
                f.unknown.push(format!(".{}", join(path, &k)));
            }
            check_required(obj, schema, path, f);
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    walk(v, s, &format!("{path}[{i}]"), f);
                }
            }
        }
        _ => {}
    }
}

/// Why a name is not a valid DNS subdomain (RFC 1123), if it is not.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("name or generateName is required".into());
    }
    if name.len() > 253 {
        return Some(format!(
            "Invalid value: {:?}: must be no more than 253 characters",
            name.chars().take(20).collect::<String>() + "..."
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return Some(format!(
            "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        ));
    }
    None
}

/// Why a namespace name is not a valid DNS label, if it is not.
pub fn namespace_problem(ns: &str) -> Option<String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    (!ok).then(|| format!("Invalid value: {ns:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_and_annotation_keys_and_label_values_are_checked_as_kubernetes_checks_them() {
        for ok in [
            "app",
            "karri.dev/id",
            "a.b-c_d",
            "example.com/My.Name-1",
            "x",
        ] {
            assert_eq!(qualified_name_problem(ok), None, "{ok}");
        }
        let long = "n".repeat(64);
        for (bad, why) in [
            ("bad label!", "name part must consist"),
            ("-lead", "name part must consist"),
            ("", "name part must be non-empty"),
            ("example.com/", "name part must be non-empty"),
            (long.as_str(), "no more than 63"),
            ("Example.com/app", "prefix part"),
            ("/app", "prefix part"),
            ("a/b/c", "name part must consist"),
        ] {
            let got = qualified_name_problem(bad).unwrap_or_default();
            assert!(got.contains(why), "{bad:?}: {got}");
        }
        for ok in ["", "prod", "v1.2_3-x"] {
            assert_eq!(label_value_problem(ok), None, "{ok:?}");
        }
        for bad in ["bad value", "trailing-", &"v".repeat(64)] {
            assert!(label_value_problem(bad).is_some(), "{bad:?}");
        }
    }

    fn root() -> Value {
        json!({"type": "object", "required": ["spec"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["imageId"], "properties": {
                "imageId": {"type": "string"},
                "count": {"type": "integer"},
                "state": {"type": "string", "enum": ["running", "stopped"]},
                "ids": {"type": "array", "items": {"type": "string"}},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}}
            }},
            "status": {"type": "object", "nullable": true, "properties": {"state": {"type": "string"}}}
        }})
    }

    #[test]
    fn unknown_fields_are_reported_and_pruned() {
        let mut v = json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
            "metadata": {"name": "a", "bogus": 1},
            "spec": {"imageId": "emi-1", "extra": true, "tags": {"a": "b"}}, "top": 1});
        let f = check_record(&mut v, &root());
        assert_eq!(f.unknown, vec![".metadata.bogus", ".top", ".spec.extra"]);
        assert!(f.invalid.is_empty(), "{:?}", f.invalid);
        assert_eq!(v["spec"], json!({"imageId": "emi-1", "tags": {"a": "b"}}));
    }

    #[test]
    fn wrong_types_missing_required_and_bad_enums_are_invalid() {
        let rows = [
            (json!({"spec": {"imageId": 5}}), "spec.imageId"),
            (json!({"spec": {}}), "spec.imageId"),
            (json!({}), "spec"),
            (
                json!({"spec": {"imageId": "x", "count": "3"}}),
                "spec.count",
            ),
            (
                json!({"spec": {"imageId": "x", "state": "paused"}}),
                "spec.state",
            ),
            (json!({"spec": {"imageId": "x", "ids": [1]}}), "spec.ids[0]"),
            (
                json!({"metadata": {"labels": {"a": 1}}, "spec": {"imageId": "x"}}),
                "metadata.labels",
            ),
        ];
        for (mut v, field) in rows {
            let f = check_record(&mut v, &root());
            assert!(
                f.invalid.iter().any(|(p, _)| p == field),
                "expected {field} invalid in {:?}",
                f.invalid
            );
        }
    }

    #[test]
    fn metadata_fields_must_have_their_object_meta_types() {
        let owner = json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Account", "name": "a",
            "uid": "u1", "controller": true});
        let fine = json!({
            "name": "a", "namespace": "acme", "generation": 3,
            "finalizers": ["x/y", "orphan", "foregroundDeletion", "karri.dev/instance"],
            "annotations": {"big": "x".repeat(MAX_ANNOTATIONS_BYTES - 3)},
            "creationTimestamp": "2026-11-26T10:00:00Z", "deletionTimestamp": null,
            "ownerReferences": [owner],
            "managedFields": [{"manager": "kubectl", "operation": "Apply",
                "time": "2026-11-26T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {}}],
        });
        let meta = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(metadata_problems(&meta(fine)), vec![]);
        let rows = [
            (json!({"finalizers": "x"}), "metadata.finalizers"),
            (json!({"finalizers": [1]}), "metadata.finalizers"),
            (
                json!({"finalizers": ["ok", "a/b/c"]}),
                "metadata.finalizers[1]",
            ),
            (
                json!({"finalizers": ["Bad Name?"]}),
                "metadata.finalizers[0]",
            ),
            (
                json!({"annotations": {"big": "x".repeat(MAX_ANNOTATIONS_BYTES)}}),
                "metadata.annotations",
            ),
            (json!({"ownerReferences": "x"}), "metadata.ownerReferences"),
            (
                json!({"ownerReferences": [1]}),
                "metadata.ownerReferences[0]",
            ),
            (
                json!({"ownerReferences": [{"apiVersion": "v1", "kind": "K", "name": "n"}]}),
                "metadata.ownerReferences[0].uid",
            ),
            (
                json!({"ownerReferences": [{"apiVersion": "v1", "kind": "K", "name": "n",
                    "uid": "u", "controller": "yes"}]}),
                "metadata.ownerReferences[0].controller",
            ),
            (
                json!({"ownerReferences": [owner.clone(), owner.clone()]}),
                "metadata.ownerReferences",
            ),
            (
                json!({"ownerReferences": [
                    {"apiVersion": "v1", "kind": "K", "name": "n", "uid": "u"},
                    {"apiVersion": "v1", "kind": "K", "name": "m", "uid": "u"}]}),
                "metadata.ownerReferences[1].uid",
            ),
            (json!({"managedFields": {}}), "metadata.managedFields"),
            (json!({"managedFields": ["x"]}), "metadata.managedFields[0]"),
            (
                json!({"managedFields": [{"time": "yesterday"}]}),
                "metadata.managedFields[0].time",
            ),
            (
                json!({"managedFields": [{"operation": "Replace"}]}),
                "metadata.managedFields[0].operation",
            ),
            (json!({"generation": "1"}), "metadata.generation"),
            (json!({"uid": 5}), "metadata.uid"),
            (
                json!({"creationTimestamp": "now"}),
                "metadata.creationTimestamp",
            ),
        ];
        for (v, field) in rows {
            let found = metadata_problems(&meta(v.clone()));
            assert!(
                found.iter().any(|(p, _)| p == field),
                "{v}: expected {field}, found {found:?}"
            );
        }
    }

    #[test]
    fn nulls_the_schema_does_not_allow_are_pruned_before_defaulting() {
        let mut v = json!({"spec": {"imageId": "x", "count": null, "tags": {"a": null}},
            "status": null});
        let f = check_record(&mut v, &root());
        assert_eq!(f, Findings::default());
        // `status` is nullable: it stays; `count` and the map value are not: pruned.
        assert_eq!(
            v,
            json!({"spec": {"imageId": "x", "tags": {}}, "status": null})
        );
        // A required field sent as null is missing.
        let mut v = json!({"spec": {"imageId": null}});
        let f = check_record(&mut v, &root());
        assert_eq!(
            f.invalid,
            vec![("spec.imageId".to_string(), "Required value".to_string())]
        );
    }

    #[test]
    fn names_must_be_dns_subdomains() {
        assert_eq!(name_problem("web-1.prod"), None);
        assert!(name_problem("Web").is_some());
        assert!(name_problem("-a").is_some());
        assert!(name_problem(&"a".repeat(254)).is_some());
        assert!(name_problem("").is_some());
        assert_eq!(namespace_problem("acme"), None);
        assert!(namespace_problem("a.b").is_some());
    }
}
