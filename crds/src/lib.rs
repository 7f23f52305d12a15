//! Karri API types: the records every component agrees on (group `karri.dev`, version
//! `v1alpha1`), the static facts about each kind, and the pure admission checks.
//!
//! No I/O happens here: the `crdgen` binary writes the generated CRDs, the gateway stores the
//! records, controllers and agents read them.

pub mod access_key;
pub mod account;
pub mod bucket;
pub mod capacity;
pub mod common;
pub mod image;
pub mod instance;
pub mod instance_type;
pub mod key_pair;
pub mod lease;
pub mod node;
pub mod subnet;
pub mod validation;
pub mod zone;

use std::sync::LazyLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::core::object::{HasSpec, HasStatus};
use kube::CustomResourceExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use access_key::{AccessKey, AccessKeySpec, AccessKeyStatus};
pub use account::{Account, AccountSpec, AccountStatus, SYSTEM_ACCOUNT_ID};
pub use bucket::{is_valid_bucket_name, Bucket, BucketSpec, BucketStatus, CannedAcl};
pub use common::{
    Condition, ConditionStatus, Tag, CONDITION_DOMAIN_RUNNING, CONDITION_READY,
    CONDITION_SCHEDULED, REASON_DOMAIN_PAUSED, REASON_GUEST_SHUTDOWN,
};
pub use image::{
    Architecture, DiskImageFormat, Image, ImageSpec, ImageState, ImageStatus, ImageType,
};
pub use instance::{
    DesiredState, HttpEndpoint, HttpTokens, ImageArtifact, Instance, InstanceMetadataTags,
    InstanceSpec, InstanceState, InstanceStatus, LaunchSpec, MetadataOptions,
    FORCE_STOP_ANNOTATION, INSTANCE_FINALIZER, NODE_NAME_FIELD, REBOOT_ANNOTATION,
};
pub use instance_type::{InstanceType, InstanceTypeSpec, InstanceTypeStatus};
pub use key_pair::{KeyPair, KeyPairSpec, KeyPairStatus, KeyType};
pub use lease::{Lease, LeaseSpec, LeaseStatus, NODE_LEASE_NAMESPACE, SYSTEM_NAMESPACE};
pub use node::{
    DomainType, HypervisorHints, Node, NodeAddress, NodeResources, NodeSpec, NodeStatus,
};
pub use validation::{
    decode_user_data, is_valid_account_id, is_valid_id, is_valid_record_name, Validate,
    ValidationError,
};
pub use zone::{
    AvailabilityZone, AvailabilityZoneSpec, AvailabilityZoneStatus, PlacementPolicy, ZoneState,
};

/// API group of every Karri kind.
pub const GROUP: &str = "karri.dev";
/// API version of every Karri kind.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Karri record.
pub const API_VERSION: &str = "karri.dev/v1alpha1";
/// Label holding the EC2-style ID of every record.
pub const ID_LABEL: &str = "karri.dev/id";
/// CRD category of every Karri kind, so `kubectl get karri` lists them all.
pub const CATEGORY: &str = "karri";

/// Static facts about one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindInfo {
    /// Kind, e.g. `Instance`.
    pub kind: &'static str,
    /// Plural resource name used in URLs, e.g. `instances`.
    pub plural: &'static str,
    /// Singular resource name, e.g. `instance`.
    pub singular: &'static str,
    /// kubectl short names, e.g. `inst`.
    pub short_names: &'static [&'static str],
    /// Whether records live in a namespace (else cluster-scoped).
    pub namespaced: bool,
    /// Prefix of the kind's EC2-style IDs, without the dash, e.g. `i`.
    pub id_prefix: &'static str,
}

impl KindInfo {
    /// Whether `id` is an ID of this kind: `<id_prefix>-` and 17 lowercase hex digits.
    pub fn is_valid_id(&self, id: &str) -> bool {
        is_valid_id(self.id_prefix, id)
    }

    /// The prefix of the ID of a record of this kind with `spec`: the kind's own, except for
    /// images, whose `spec.imageType` chooses `emi-`, `eki-` or `eri-`.
    pub fn id_prefix_of(&self, spec: Option<&Value>) -> &'static str {
        if self.kind != "Image" {
            return self.id_prefix;
        }
        spec.and_then(|s| s.get("imageType"))
            .cloned()
            .and_then(|t| serde_json::from_value::<ImageType>(t).ok())
            .unwrap_or_default()
            .id_prefix()
    }
}

/// A Karri kind: its generated root type, with static facts and validated spec and status.
pub trait KarriResource: CustomResourceExt + HasSpec + HasStatus {
    /// Static facts about the kind.
    const INFO: KindInfo;
}

impl KarriResource for Account {
    const INFO: KindInfo = KindInfo {
        kind: "Account",
        plural: "accounts",
        singular: "account",
        short_names: &["acct"],
        namespaced: false,
        id_prefix: "acct",
    };
}

impl KarriResource for AvailabilityZone {
    const INFO: KindInfo = KindInfo {
        kind: "AvailabilityZone",
        plural: "availabilityzones",
        singular: "availabilityzone",
        short_names: &["az"],
        namespaced: false,
        id_prefix: "az",
    };
}

impl KarriResource for Node {
    const INFO: KindInfo = KindInfo {
        kind: "Node",
        plural: "nodes",
        singular: "node",
        short_names: &["knode"],
        namespaced: false,
        id_prefix: "node",
    };
}

impl KarriResource for InstanceType {
    const INFO: KindInfo = KindInfo {
        kind: "InstanceType",
        plural: "instancetypes",
        singular: "instancetype",
        short_names: &["itype"],
        namespaced: false,
        id_prefix: "itype",
    };
}

/// Images use Eucalyptus-style `emi-` IDs. EC2 clients are shown these IDs as they are (the AWS
/// tools treat image IDs as opaque); `ami-` aliases may be added later and are already accepted
/// wherever an instance names its image.
impl KarriResource for Image {
    const INFO: KindInfo = KindInfo {
        kind: "Image",
        plural: "images",
        singular: "image",
        short_names: &["img"],
        namespaced: true,
        id_prefix: "emi",
    };
}

impl KarriResource for Instance {
    const INFO: KindInfo = KindInfo {
        kind: "Instance",
        plural: "instances",
        singular: "instance",
        short_names: &["inst"],
        namespaced: true,
        id_prefix: "i",
    };
}

/// Leases are namespaced like `coordination.k8s.io` leases; no short name, so a real cluster's
/// `lease` keeps meaning its own.
impl KarriResource for AccessKey {
    const INFO: KindInfo = KindInfo {
        kind: "AccessKey",
        plural: "accesskeys",
        singular: "accesskey",
        short_names: &["akey"],
        namespaced: false,
        id_prefix: "akey",
    };
}

/// Buckets are named by their S3 name; the `bkt-` ID only labels the record.
impl KarriResource for Bucket {
    const INFO: KindInfo = KindInfo {
        kind: "Bucket",
        plural: "buckets",
        singular: "bucket",
        short_names: &["bkt"],
        namespaced: false,
        id_prefix: "bkt",
    };
}

impl KarriResource for KeyPair {
    const INFO: KindInfo = KindInfo {
        kind: "KeyPair",
        plural: "keypairs",
        singular: "keypair",
        short_names: &["kp"],
        namespaced: true,
        id_prefix: "key",
    };
}

impl KarriResource for Lease {
    const INFO: KindInfo = KindInfo {
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        short_names: &[],
        namespaced: true,
        id_prefix: "lease",
    };
}

/// Facts of every kind, in the stable order of [`kinds`].
const KIND_INFOS: [KindInfo; 10] = [
    Account::INFO,
    AccessKey::INFO,
    AvailabilityZone::INFO,
    Node::INFO,
    InstanceType::INFO,
    Bucket::INFO,
    Image::INFO,
    Instance::INFO,
    KeyPair::INFO,
    Lease::INFO,
];

static KINDS: LazyLock<Vec<(KindInfo, CustomResourceDefinition)>> = LazyLock::new(|| {
    vec![
        (Account::INFO, Account::crd()),
        (AccessKey::INFO, AccessKey::crd()),
        (AvailabilityZone::INFO, AvailabilityZone::crd()),
        (Node::INFO, Node::crd()),
        (InstanceType::INFO, InstanceType::crd()),
        (Bucket::INFO, Bucket::crd()),
        (Image::INFO, Image::crd()),
        (Instance::INFO, Instance::crd()),
        (KeyPair::INFO, KeyPair::crd()),
        (Lease::INFO, Lease::crd()),
    ]
});

/// Every kind with its generated CRD, in a stable order (cluster-scoped kinds first).
pub fn kinds() -> Vec<(KindInfo, CustomResourceDefinition)> {
    KINDS.clone()
}

/// Facts of every kind, in the same order as [`kinds`], without building CRDs.
pub fn kind_infos() -> &'static [KindInfo] {
    &KIND_INFOS
}

/// The generated CRD of `kind` (e.g. `Instance`), from a table built once.
pub fn crd_for_kind(kind: &str) -> Option<&'static CustomResourceDefinition> {
    KINDS
        .iter()
        .find(|(info, _)| info.kind == kind)
        .map(|(_, crd)| crd)
}

/// The kind whose plural resource name is exactly `plural` (e.g. `instances`).
pub fn kind_by_plural(plural: &str) -> Option<KindInfo> {
    KIND_INFOS.iter().find(|k| k.plural == plural).cloned()
}

/// The kind named exactly `kind` (e.g. `Instance`).
pub fn kind_by_kind(kind: &str) -> Option<KindInfo> {
    KIND_INFOS.iter().find(|k| k.kind == kind).cloned()
}

/// The kind `name` refers to the way kubectl resolves it: plural, singular, kind or short name,
/// ignoring case (`instances`, `instance`, `Instance`, `inst`).
pub fn resolve(name: &str) -> Option<KindInfo> {
    KIND_INFOS
        .iter()
        .find(|k| {
            [k.plural, k.singular, k.kind]
                .iter()
                .chain(k.short_names)
                .any(|n| n.eq_ignore_ascii_case(name))
        })
        .cloned()
}

/// A CRD as YAML, exactly as the committed files under `charts/karri/crds` hold it.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_norway::Error> {
    let body = serde_norway::to_string(crd)?;
    Ok(format!(
        "# Generated by `cargo run -p karri-crds --bin crdgen` from the karri-crds types; do not edit.\n{body}"
    ))
}

/// File name of a CRD under `charts/karri/crds`: `<plural>.karri.dev.yaml`.
pub fn crd_file_name(info: &KindInfo) -> String {
    format!("{}.{GROUP}.yaml", info.plural)
}

/// Admission check of a whole record of `kind` (e.g. `Instance`) given as JSON, on create and
/// update: `apiVersion` and `kind` (when present) must match; `spec` and `status` must hold no
/// field the CRD schema lacks, must deserialize into the typed spec and status, and must pass
/// their [`Validate`] rules; the `karri.dev/id` label, when present, must be an ID of the kind.
/// The rest of `metadata` (name, namespace ...) is the gateway's to check.
pub fn validate_object(kind: &str, value: &Value) -> Result<(), ValidationError> {
    match kind {
        "Account" => validate_typed::<Account>(value),
        "AccessKey" => validate_typed::<AccessKey>(value),
        "AvailabilityZone" => validate_typed::<AvailabilityZone>(value),
        "Node" => validate_typed::<Node>(value),
        "InstanceType" => validate_typed::<InstanceType>(value),
        "Bucket" => validate_typed::<Bucket>(value),
        "Image" => validate_typed::<Image>(value),
        "Instance" => validate_typed::<Instance>(value),
        "KeyPair" => validate_typed::<KeyPair>(value),
        "Lease" => validate_typed::<Lease>(value),
        other => Err(ValidationError::UnknownKind(other.to_owned())),
    }
}

fn validate_typed<K>(value: &Value) -> Result<(), ValidationError>
where
    K: KarriResource,
    <K as HasSpec>::Spec: Validate + DeserializeOwned,
    <K as HasStatus>::Status: Validate + DeserializeOwned,
{
    let object = value
        .as_object()
        .ok_or_else(|| ValidationError::Malformed {
            field: "object".to_owned(),
            message: "must be a JSON object".to_owned(),
        })?;
    if let Some(api_version) = object.get("apiVersion") {
        if api_version.as_str() != Some(API_VERSION) {
            return Err(ValidationError::WrongApiVersion(display(api_version)));
        }
    }
    if let Some(found) = object.get("kind") {
        if found.as_str() != Some(K::INFO.kind) {
            return Err(ValidationError::WrongKind {
                expected: K::INFO.kind.to_owned(),
                found: display(found),
            });
        }
    }
    if let Some(schema) = crd_for_kind(K::INFO.kind).and_then(root_schema) {
        let mut unknown = Vec::new();
        for (key, field) in object {
            match schema.properties.as_ref().and_then(|p| p.get(key)) {
                Some(sub) => unknown_fields(sub, field, key, &mut unknown),
                // The API server owns these; the CRD schema leaves them implicit.
                None if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") => {}
                None => unknown.push(key.clone()),
            }
        }
        if let Some(field) = unknown.into_iter().next() {
            return Err(ValidationError::UnknownField { field });
        }
    }
    if let Some(id) = object
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get(ID_LABEL))
    {
        let prefix = K::INFO.id_prefix_of(object.get("spec"));
        if !id.as_str().is_some_and(|id| is_valid_id(prefix, id)) {
            return Err(ValidationError::invalid(
                format!("metadata.labels.{ID_LABEL}"),
                format!("look like {prefix}-0123456789abcdef0"),
            ));
        }
    }
    let spec = object.get("spec").ok_or_else(|| ValidationError::Missing {
        field: "spec".to_owned(),
    })?;
    let spec: <K as HasSpec>::Spec = deserialize("spec", spec)?;
    spec.validate()?;
    if let Some(status) = object.get("status").filter(|s| !s.is_null()) {
        let status: <K as HasStatus>::Status = deserialize("status", status)?;
        status.validate()?;
    }
    Ok(())
}

/// Fills in the schema defaults of `kind` (e.g. `spec.desiredState: running`) that `value` lacks,
/// the way the Kubernetes API server defaults custom resources; fields that are present, even
/// when null, are left alone. Run it before [`validate_object`] on create and update.
pub fn apply_defaults(kind: &str, value: &mut Value) -> Result<(), ValidationError> {
    let schema = crd_for_kind(kind)
        .and_then(root_schema)
        .ok_or_else(|| ValidationError::UnknownKind(kind.to_owned()))?;
    if let (Some(properties), Some(object)) = (&schema.properties, value.as_object_mut()) {
        for key in ["spec", "status"] {
            if let (Some(sub), Some(field)) = (properties.get(key), object.get_mut(key)) {
                default_fields(sub, field);
            }
        }
    }
    Ok(())
}

fn default_fields(schema: &JSONSchemaProps, value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, sub) in schema.properties.iter().flatten() {
                match map.get_mut(key) {
                    Some(field) => default_fields(sub, field),
                    None => {
                        if let Some(default) = &sub.default {
                            map.insert(key.clone(), default.0.clone());
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(sub)) = &schema.items {
                for item in items {
                    default_fields(sub, item);
                }
            }
        }
        _ => {}
    }
}

fn display(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

fn deserialize<T: DeserializeOwned>(root: &str, value: &Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            root.to_owned()
        } else {
            format!("{root}.{path}")
        };
        ValidationError::Malformed {
            field,
            message: e.into_inner().to_string(),
        }
    })
}

fn root_schema(crd: &CustomResourceDefinition) -> Option<&JSONSchemaProps> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == VERSION)?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()
}

/// Collects into `out` the paths of fields in `value` that `schema` does not define, the way
/// the Kubernetes API server's strict field validation finds them.
fn unknown_fields(schema: &JSONSchemaProps, value: &Value, path: &str, out: &mut Vec<String>) {
    if schema.x_kubernetes_preserve_unknown_fields == Some(true) {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = &schema.properties {
                for (key, field) in map {
                    let field_path = format!("{path}.{key}");
                    match properties.get(key) {
                        Some(sub) => unknown_fields(sub, field, &field_path, out),
                        None => out.push(field_path),
                    }
                }
            } else if let Some(JSONSchemaPropsOrBool::Schema(sub)) = &schema.additional_properties {
                for (key, field) in map {
                    unknown_fields(sub, field, &format!("{path}.{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(sub)) = &schema.items {
                for (i, item) in items.iter().enumerate() {
                    unknown_fields(sub, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}
