//! Discovery and OpenAPI v3 documents, generated from the same schemas as the CRDs.

use serde_json::{json, Value};

use crate::kinds::{Kind, Kinds};

/// `GET /version`.
pub fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-karri",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
        "goVersion": "", "compiler": "rustc", "platform": "linux/amd64",
    })
}

/// `GET /api`: the core group's one version, `v1`, which serves namespaces alone (see
/// [`core_resource_list`]). kubectl maps `kind: List` (what `kubectl get a b -o yaml` saves, and
/// what `kubectl edit` of several records opens) through it: without it no List is applied.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
}

/// `GET /api/v1`: the core group's one version, which serves namespaces (get, list, watch:
/// kopf waits for them, and kubectl's discovery counts a version without resources as
/// failed). Clients that look every kind up across all groups (the Python client's dynamic
/// discovery, Ansible) always read it.
pub fn core_resource_list() -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [{
        "name": "namespaces", "singularName": "namespace", "namespaced": false,
        "kind": "Namespace", "verbs": ["get", "list", "watch"], "shortNames": ["ns"],
    }]})
}

/// A namespace as kubectl expects to read it.
pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "spec": {}, "status": {"phase": "Active"}})
}

/// The namespace of Karri's own records that every account may read (public images).
pub const SYSTEM_NAMESPACE: &str = "karri-images";

/// Namespace `name` as a list or watch shows it, made with `account` (its UID, creation and
/// resourceVersion) or, for Karri's own, at resourceVersion `1`.
pub fn namespace_record(name: &str, account: Option<&Value>) -> Value {
    let mut ns = namespace(name);
    ns["metadata"]["labels"] = json!({"kubernetes.io/metadata.name": name});
    ns["metadata"]["resourceVersion"] = json!("1");
    if let Some(account) = account {
        for field in ["uid", "resourceVersion", "creationTimestamp"] {
            if let Some(v) = account.pointer(&format!("/metadata/{field}")) {
                ns["metadata"][field] = v.clone();
            }
        }
        if account.pointer("/metadata/deletionTimestamp").is_some() {
            ns["status"]["phase"] = json!("Terminating");
        }
    }
    ns
}

/// The namespace of an Account record (its `status.namespace`, else its name).
pub fn namespace_record_of_account(account: &Value) -> Value {
    let name = account
        .pointer("/status/namespace")
        .or_else(|| account.pointer("/metadata/name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    namespace_record(name, Some(account))
}

fn group() -> Value {
    let gv = json!({"groupVersion": crds::API_VERSION, "version": crds::VERSION});
    json!({"name": crds::GROUP, "versions": [gv], "preferredVersion": gv})
}

/// `GET /apis`: Karri's group, and the CustomResourceDefinitions of its kinds (read-only).
pub fn group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group(), crd_group()]})
}

/// The group that serves CustomResourceDefinitions.
pub const CRD_GROUP: &str = "apiextensions.k8s.io";

/// The path of the CustomResourceDefinitions.
pub const CRDS_PATH: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";

fn crd_group() -> Value {
    let gv = json!({"groupVersion": format!("{CRD_GROUP}/v1"), "version": "v1"});
    json!({"name": CRD_GROUP, "versions": [gv], "preferredVersion": gv})
}

/// `GET /apis/apiextensions.k8s.io`.
pub fn crd_api_group() -> Value {
    let mut g = crd_group();
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    g
}

/// `GET /apis/apiextensions.k8s.io/v1`: CustomResourceDefinitions, which may only be read.
pub fn crd_resource_list() -> Value {
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{CRD_GROUP}/v1"),
        "resources": [{
            "name": "customresourcedefinitions", "singularName": "customresourcedefinition",
            "namespaced": false, "kind": "CustomResourceDefinition", "verbs": ["get", "list", "watch"],
            "shortNames": ["crd", "crds"], "categories": ["api-extensions"],
        }],
    })
}

/// The resourceVersion of every CustomResourceDefinition and of their list: they change only
/// with the gateway's binary.
pub const CRDS_VERSION: i64 = 1;

/// The CustomResourceDefinition of `kind` as the API serves it: the generated CRD (as in
/// `charts/karri/crds/`), established since `since` (RFC 3339), with a UID that follows from its
/// name. Its resourceVersion is `1`: it changes only with the gateway's binary.
pub fn served_crd(kind: &Kind, since: &str) -> Value {
    use sha2::{Digest as _, Sha256};
    let mut crd = serde_json::to_value(&kind.crd).unwrap_or_else(|_| json!({}));
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let h = hex::encode(&Sha256::digest(name.as_bytes())[..16]);
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    crd["metadata"]["uid"] = json!(uid);
    crd["metadata"]["creationTimestamp"] = json!(since);
    crd["metadata"]["resourceVersion"] = json!(CRDS_VERSION.to_string());
    crd["metadata"]["generation"] = json!(1);
    let condition = |type_: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": "True", "lastTransitionTime": since,
               "reason": reason, "message": message})
    };
    crd["status"] = json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({})),
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": [crds::VERSION],
    });
    crd
}

/// `GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions`.
pub fn crd_list(kinds: &Kinds, since: &str) -> Value {
    let items: Vec<Value> = kinds.all().iter().map(|k| served_crd(k, since)).collect();
    json!({
        "apiVersion": format!("{CRD_GROUP}/v1"), "kind": "CustomResourceDefinitionList",
        "metadata": {"resourceVersion": CRDS_VERSION.to_string()}, "items": items,
    })
}

/// `GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/<name>`.
pub fn crd_named(kinds: &Kinds, name: &str, since: &str) -> Option<Value> {
    kinds
        .all()
        .iter()
        .map(|k| served_crd(k, since))
        .find(|crd| crd.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
}

/// `GET /apis/karri.dev`.
pub fn api_group() -> Value {
    let mut g = group();
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    g
}

/// `GET /apis/karri.dev/v1alpha1`.
pub fn resource_list(kinds: &Kinds) -> Value {
    let mut resources = Vec::new();
    for k in kinds.all() {
        let i = &k.info;
        resources.push(json!({
            "name": i.plural, "singularName": i.singular, "namespaced": i.namespaced,
            "kind": i.kind, "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": i.short_names, "categories": [crds::CATEGORY],
        }));
        resources.push(json!({
            "name": format!("{}/status", i.plural), "singularName": "", "namespaced": i.namespaced,
            "kind": i.kind, "verbs": ["get", "patch", "update"],
        }));
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": crds::API_VERSION, "resources": resources})
}

fn schema_name(kind: &str) -> String {
    format!("dev.karri.{}.{kind}", crds::VERSION)
}

fn gvk(kind: &str) -> Value {
    json!({"group": crds::GROUP, "version": crds::VERSION, "kind": kind})
}

fn query_param(name: &str, description: &str, ty: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": ty, "uniqueItems": true}})
}

fn write_params() -> Vec<Value> {
    vec![
        query_param(
            "dryRun",
            "When present, modifications are not persisted (All).",
            "string",
        ),
        query_param(
            "fieldManager",
            "Name of the actor making the change.",
            "string",
        ),
        query_param(
            "fieldValidation",
            "Ignore, Warn or Strict handling of unknown fields.",
            "string",
        ),
    ]
}

fn op(kind: &Kind, action: &str, response_schema: &str, params: Vec<Value>, body: bool) -> Value {
    let mut o = json!({
        "description": format!("{action} {}", kind.info.kind),
        "operationId": format!("{action}{}", kind.info.kind),
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{response_schema}")}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(kind.info.kind),
    });
    if body {
        o["requestBody"] = json!({"content": {"*/*": {"schema": {"$ref": format!("#/components/schemas/{}", schema_name(kind.info.kind))}}}});
    }
    o
}

/// `GET /openapi/v3/apis/karri.dev/v1alpha1`: paths with their parameters (kubectl checks
/// `fieldValidation` and `dryRun` support here) and the schemas (`kubectl explain`).
pub fn openapi_group_version(kinds: &Kinds) -> Value {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for k in kinds.all() {
        let i = &k.info;
        let name = schema_name(i.kind);
        let list = schema_name(&k.list_kind());
        let base = if i.namespaced {
            format!(
                "/apis/{}/namespaces/{{namespace}}/{}",
                crds::API_VERSION,
                i.plural
            )
        } else {
            format!("/apis/{}/{}", crds::API_VERSION, i.plural)
        };
        let mut patch_params = write_params();
        patch_params.push(query_param(
            "force",
            "Force server-side apply over conflicts.",
            "boolean",
        ));
        paths.insert(
            base.clone(),
            json!({
                "get": op(k, "list", &list, vec![
                    query_param("labelSelector", "Label selector.", "string"),
                    query_param("fieldSelector", "Field selector.", "string"),
                    query_param("limit", "Page size.", "integer"),
                    query_param("continue", "Continue token.", "string"),
                    query_param("resourceVersion", "Resource version.", "string"),
                    query_param("watch", "Watch for changes.", "boolean"),
                ], false),
                "post": op(k, "post", &name, write_params(), true),
            }),
        );
        paths.insert(format!("{base}/{{name}}"), json!({
            "get": op(k, "get", &name, vec![], false),
            "put": op(k, "put", &name, write_params(), true),
            "patch": op(k, "patch", &name, patch_params.clone(), true),
            "delete": op(k, "delete", &name, vec![query_param("dryRun", "When present, nothing is deleted (All).", "string")], false),
        }));
        paths.insert(
            format!("{base}/{{name}}/status"),
            json!({
                "get": op(k, "get", &name, vec![], false),
                "put": op(k, "put", &name, write_params(), true),
                "patch": op(k, "patch", &name, patch_params, true),
            }),
        );
        let mut schema = k.schema.clone();
        if let Some(o) = schema.as_object_mut() {
            o.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([gvk(i.kind)]),
            );
            if let Some(props) = o.get_mut("properties").and_then(Value::as_object_mut) {
                for (field, field_schema) in object_fields() {
                    props.entry(field).or_insert(field_schema);
                }
            }
        }
        schemas.insert(name.clone(), schema);
        schemas.insert(list, json!({
            "type": "object",
            "description": format!("A list of {}.", i.plural),
            "required": ["items"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "items": {"type": "array", "items": {"$ref": format!("#/components/schemas/{name}")}},
            },
            "x-kubernetes-group-version-kind": [gvk(&k.list_kind())],
        }));
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Karri", "version": crds::VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// The fields of every Kubernetes object (`apiVersion`, `kind`, `metadata`), which a CRD's
/// schema leaves out and kube-apiserver adds to what it publishes (`kubectl explain
/// <kind>.metadata`).
fn object_fields() -> [(String, Value); 3] {
    let text = |description: &str| json!({"type": "string", "description": description});
    let strings = |description: &str| {
        json!({"type": "object", "description": description,
            "additionalProperties": {"type": "string"}})
    };
    let metadata = json!({
        "type": "object",
        "description": "Standard object's metadata: its name, namespace, labels, annotations and what the registry keeps of it.",
        "properties": {
            "name": text("Name, unique within a namespace (or the cluster, for cluster-scoped kinds). Cannot be updated."),
            "generateName": text("A prefix from which the server makes a unique name when no name is given."),
            "namespace": text("Namespace the record lives in (an account's). Cannot be updated."),
            "labels": strings("Key/value pairs to select records by (label selectors)."),
            "annotations": strings("Key/value pairs for tools; not selectable."),
            "uid": text("Unique ID of this record, never reused. Set by the server."),
            "resourceVersion": text("Version of this record, for optimistic concurrency and watches. Set by the server."),
            "generation": {"type": "integer", "format": "int64", "description": "Sequence number of changes to the spec. Set by the server."},
            "creationTimestamp": {"type": "string", "format": "date-time", "description": "When the record was created. Set by the server."},
            "deletionTimestamp": {"type": "string", "format": "date-time", "description": "When deletion was asked for: the record goes once its finalizers are removed. Set by the server."},
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64", "description": "Seconds the record was given to go. Set by the server."},
            "finalizers": {"type": "array", "items": {"type": "string"}, "description": "Names of the controllers that must act before the record is deleted."},
            "ownerReferences": {"type": "array", "description": "Records this one depends on: it is deleted with them (garbage collection).",
                "items": {"type": "object", "required": ["apiVersion", "kind", "name", "uid"], "properties": {
                    "apiVersion": text("API version of the owner."),
                    "kind": text("Kind of the owner."),
                    "name": text("Name of the owner."),
                    "uid": text("UID of the owner."),
                    "controller": {"type": "boolean", "description": "Whether the owner is the managing controller."},
                    "blockOwnerDeletion": {"type": "boolean", "description": "Whether a foreground deletion of the owner waits for this record."},
                }}},
            "managedFields": {"type": "array", "items": {"type": "object"}, "description": "Which manager owns which fields (server-side apply). Set by the server."},
        },
    });
    [
        (
            "apiVersion".into(),
            text("The versioned schema of this representation of an object (karri.dev/v1alpha1)."),
        ),
        ("kind".into(), text("The kind of the object, in CamelCase.")),
        ("metadata".into(), metadata),
    ]
}

/// An OpenAPI v2 document with no paths or definitions (see `http::openapi_v2`).
pub fn openapi_v2_document() -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Karri", "version": crds::VERSION},
        "paths": {},
        "definitions": {},
    })
}

/// `GET /openapi/v3`: where each group-version document lives.
pub fn openapi_root(hash: &str) -> Value {
    json!({"paths": {
        format!("apis/{}", crds::API_VERSION): {
            "serverRelativeURL": format!("/openapi/v3/apis/{}?hash={hash}", crds::API_VERSION)
        }
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_an_established_crd_with_a_stable_uid() {
        let kinds = Kinds::load();
        let since = "2026-11-27T00:00:00Z";
        let list = crd_list(&kinds, since);
        let items = list["items"].as_array().expect("items");
        assert_eq!(items.len(), kinds.all().len());
        for (crd, kind) in items.iter().zip(kinds.all()) {
            let name = format!("{}.{}", kind.info.plural, crds::GROUP);
            assert_eq!(crd["metadata"]["name"], json!(name));
            assert_eq!(
                crd["spec"],
                serde_json::to_value(&kind.crd.spec).expect("spec")
            );
            let established = crd["status"]["conditions"]
                .as_array()
                .expect("conditions")
                .iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True");
            assert!(established, "{name}");
            let again = crd_named(&kinds, &name, since).expect("found by name");
            assert_eq!(again["metadata"]["uid"], crd["metadata"]["uid"]);
        }
        assert!(crd_named(&kinds, "pods.core", since).is_none());
    }
}
