//! Admission: what the registry does to a record before it is stored, shared by every face
//! (resource API, EC2 and S3). Validation, defaulting, system fields. Pure.

use rand::Rng;
use serde_json::{json, Map, Value};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::kinds::Kind;
use crate::schema::{self, Findings};
use crate::store;

/// How unknown fields are treated (`fieldValidation` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Drop unknown fields silently.
    Ignore,
    /// Drop them and warn (the Kubernetes default).
    #[default]
    Warn,
    /// Refuse the request.
    Strict,
}

impl FieldValidation {
    /// Parse the query value; an unknown value is refused with what it may be (the caller
    /// answers 422, as for any invalid request option).
    pub fn parse(v: Option<&str>) -> Result<Self, String> {
        match v {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(format!(
                "Unsupported value: {other:?}: supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
            )),
        }
    }
}

/// Which part of a record a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// Everything but status.
    Main,
    /// Status only.
    Status,
}

/// Values the registry chooses for a new record.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// RFC 3339 time of creation.
    pub now: String,
    /// The new UID.
    pub uid: String,
    /// The EC2-style ID (`i-0123456789abcdef0`).
    pub id: String,
}

/// A key that at most one record may hold, written in the same etcd transaction as the record
/// and removed with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    /// The etcd key (under `/karri/index/unique/`).
    pub key: String,
    /// What is unique, for messages: `key pair name "laptop"`.
    pub what: String,
    /// The field that holds it: `spec.keyName`.
    pub field: &'static str,
    /// Whether the gateway chose the value, so that a collision is retried with a fresh one.
    pub generated: bool,
    /// Whether it follows the status (a live instance's address), claimed and given up by
    /// updates; the others are fixed once the record exists.
    pub follows_status: bool,
}

/// The unique key a RunInstances client token claims in namespace `ns`.
pub fn client_token_key(ns: &str, token: &str) -> String {
    store::unique_key(&["client-token", ns, &hex_text(token)])
}

/// The unique key of an access key ID.
pub fn access_key_key(id: &str) -> String {
    store::unique_key(&["access-key", id])
}

fn hex_text(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The unique secondary keys a record holds: an account's 12-digit ID, an access key's ID, a
/// key pair's name within its namespace, the client token of the first instance of a
/// RunInstances reservation, and a live instance's private address in its zone (claimed when
/// the operator writes it to the status, released when the instance is terminated).
pub fn unique_keys(kind: &str, obj: &Value) -> Vec<UniqueKey> {
    let text = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let ns = text("/metadata/namespace").unwrap_or("");
    match kind {
        "Account" => text("/status/accountId")
            .map(|id| UniqueKey {
                key: store::unique_key(&["account-id", id]),
                what: format!("account ID {id}"),
                field: "status.accountId",
                generated: true,
                follows_status: false,
            })
            .into_iter()
            .collect(),
        "AccessKey" => text("/status/accessKeyId")
            .map(|id| UniqueKey {
                key: access_key_key(id),
                what: format!("access key ID {id}"),
                field: "status.accessKeyId",
                generated: true,
                follows_status: false,
            })
            .into_iter()
            .collect(),
        "KeyPair" => text("/spec/keyName")
            .map(|name| UniqueKey {
                key: store::unique_key(&["key-name", ns, &hex_text(name)]),
                what: format!("key pair name {name:?}"),
                field: "spec.keyName",
                generated: false,
                follows_status: false,
            })
            .into_iter()
            .collect(),
        // EC2 image names are unique within an account; two concurrent RegisterImage calls of
        // one name must not both succeed.
        "Image" => text("/spec/name")
            .map(|name| UniqueKey {
                key: store::unique_key(&["image-name", ns, &hex_text(name)]),
                what: format!("image name {name:?}"),
                field: "spec.name",
                generated: false,
                follows_status: false,
            })
            .into_iter()
            .collect(),
        "Instance" => {
            let first = obj
                .pointer("/spec/launchIndex")
                .and_then(Value::as_u64)
                .is_none_or(|i| i == 0);
            let token = text("/spec/clientToken")
                .filter(|_| first)
                .map(|token| UniqueKey {
                    key: client_token_key(ns, token),
                    what: format!("client token {token:?}"),
                    field: "spec.clientToken",
                    generated: false,
                    follows_status: false,
                });
            let live = text("/status/state") != Some(crds::InstanceState::Terminated.as_str());
            let address = match (
                text("/status/availabilityZone"),
                text("/status/privateIpAddress"),
            ) {
                (Some(zone), Some(ip)) if live => Some(UniqueKey {
                    key: store::unique_key(&["private-ip", zone, ip]),
                    what: format!("private IP address {ip} in zone {zone}"),
                    field: "status.privateIpAddress",
                    generated: false,
                    follows_status: true,
                }),
                _ => None,
            };
            token.into_iter().chain(address).collect()
        }
        _ => Vec::new(),
    }
}

/// Why `name` cannot name an account, whose records live in the namespace of the same name:
/// it must be a DNS label (a namespace name) and not a namespace Karri or Kubernetes reserve.
pub fn account_name_problem(name: &str) -> Option<String> {
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label {
        return Some(
            "an account name is its namespace: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit".into(),
        );
    }
    if is_system_namespace(name) {
        return Some(format!(
            "{name:?} is reserved: default, kube-* and karri-* namespaces are not accounts"
        ));
    }
    None
}

/// Whether `namespace` is reserved for the system (`default`, `kube-*`, `karri-*`): no account
/// is named so, and only administrators write there.
pub fn is_system_namespace(namespace: &str) -> bool {
    namespace == "default" || namespace.starts_with("kube-") || namespace.starts_with("karri-")
}

/// A fresh EC2-style ID: `<prefix>-` and 17 hex digits.
pub fn new_id(prefix: &str) -> String {
    let n: u128 = rand::rng().random::<u128>() & ((1u128 << 68) - 1);
    format!("{prefix}-{n:017x}")
}

/// A fresh random (version 4) UUID, from the thread's CSPRNG: `Uuid::new_v4` asks the kernel
/// (a `getrandom` call) for each, and a create makes two (its UID, its request ID).
pub fn new_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid()
}

/// A fresh random name suffix as Kubernetes makes for `generateName`.
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The labels of a record's `metadata` (made an empty map when absent or null), or 422 when
/// they are something other than a map: replacing them would silently drop every label.
fn labels_of<'m>(
    meta: &'m mut Map<String, Value>,
    kind: &Kind,
    name: &str,
) -> ApiResult<&'m mut Map<String, Value>> {
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if labels.is_null() {
        *labels = json!({});
    }
    labels.as_object_mut().ok_or_else(|| {
        ApiError::invalid(
            kind.info.kind,
            name,
            vec![(
                "metadata.labels".into(),
                "must be a map of string keys to string values".into(),
            )],
        )
    })
}

fn meta_mut(obj: &mut Value) -> ApiResult<&mut Map<String, Value>> {
    let o = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON or YAML object"))?;
    let meta = o.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

/// Check `apiVersion` and `kind` of a body against the endpoint it was sent to.
pub fn check_type(kind: &Kind, obj: &Value) -> ApiResult<()> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let k = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != crds::API_VERSION {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            crds::API_VERSION
        )));
    }
    if k != kind.info.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            kind.info.kind
        )));
    }
    Ok(())
}

/// The object's name.
pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Apply the schema and the kind's own validation; unknown fields are pruned and returned.
pub fn validate(kind: &Kind, obj: &mut Value, mode: FieldValidation) -> ApiResult<Vec<String>> {
    let name = name_of(obj).to_string();
    let Findings { unknown, invalid } = schema::check_record(obj, &kind.schema);
    if let Err(e) = crds::apply_defaults(kind.info.kind, obj) {
        return Err(ApiError::invalid(
            kind.info.kind,
            &name,
            vec![(e.field().unwrap_or("").to_string(), e.to_string())],
        ));
    }
    if mode == FieldValidation::Strict && !unknown.is_empty() {
        let fields = unknown
            .iter()
            .map(|u| format!("unknown field \"{}\"", u.trim_start_matches('.')))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {fields}",
            kind.info.kind,
            crds::VERSION,
            kind.info.kind
        )));
    }
    if !invalid.is_empty() {
        return Err(ApiError::invalid(kind.info.kind, &name, invalid));
    }
    if let Err(e) = crds::validate_object(kind.info.kind, obj) {
        let field = e.field().unwrap_or("").to_string();
        return Err(ApiError::invalid(
            kind.info.kind,
            &name,
            vec![(field, e.to_string())],
        ));
    }
    Ok(match mode {
        FieldValidation::Ignore => Vec::new(),
        _ => unknown,
    })
}

/// Prepare a new record: check type and names, drop status, set system fields and the ID.
pub fn prepare_create(
    kind: &Kind,
    namespace: Option<&str>,
    mut obj: Value,
    new: &NewRecord,
    mode: FieldValidation,
) -> ApiResult<(Value, Vec<String>)> {
    check_type(kind, &obj)?;
    let meta = meta_mut(&mut obj)?;
    let mut name = meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        if let Some(g) = meta.get("generateName").and_then(Value::as_str) {
            if !g.is_empty() {
                name = format!("{g}{}", name_suffix());
                meta.insert("name".into(), Value::String(name.clone()));
            }
        }
    }
    if let Some(problem) = schema::name_problem(&name) {
        return Err(ApiError::invalid(
            kind.info.kind,
            &name,
            vec![("metadata.name".into(), problem)],
        ));
    }
    if kind.info.namespaced {
        let ns = namespace.unwrap_or("");
        match meta.get("namespace").and_then(Value::as_str) {
            Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            _ => {
                meta.insert("namespace".into(), Value::String(ns.to_string()));
            }
        }
    } else {
        meta.remove("namespace");
    }
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        meta.remove(field);
    }
    meta.insert("uid".into(), Value::String(new.uid.clone()));
    meta.insert("creationTimestamp".into(), Value::String(new.now.clone()));
    meta.insert("generation".into(), json!(1));
    labels_of(meta, kind, &name)?.insert(crds::ID_LABEL.into(), Value::String(new.id.clone()));
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    let unknown = validate(kind, &mut obj, mode)?;
    if kind.info.kind == "KeyPair" {
        key_pair_facts(None, &mut obj)
            .map_err(|cause| ApiError::invalid(kind.info.kind, &name, vec![cause]))?;
    }
    Ok((obj, unknown))
}

/// Sets what a KeyPair's public key says of it, as ImportKeyPair would: its `keyType` and the
/// `fingerprint` EC2 shows for an imported key, for a pair made with a key of the writer's
/// (kubectl, GitOps) and for any new public key; a pair whose key stays (and a new one given
/// with its fingerprint, as CreateKeyPair gives its SHA-1) keeps its fingerprint. A key EC2
/// would not take is refused, as `(field, message)`. Pure.
pub fn key_pair_facts(old: Option<&Value>, next: &mut Value) -> Result<(), (String, String)> {
    let key = |v: &Value| {
        v.pointer("/spec/publicKey")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let public_key = key(next).unwrap_or_default();
    let imported = crate::ec2::keys::import(public_key.as_bytes())
        .map_err(|e| ("spec.publicKey".to_string(), format!("Invalid value: {e}")))?;
    let kept = old.filter(|o| key(o).as_deref() == Some(public_key.as_str()));
    let fingerprint = match kept {
        Some(o) => o.pointer("/spec/fingerprint").cloned(),
        None if old.is_none() => next.pointer("/spec/fingerprint").cloned(),
        None => None,
    }
    .filter(|f| f.as_str().is_some_and(|f| !f.is_empty()))
    .unwrap_or_else(|| Value::String(imported.fingerprint.clone()));
    if let Some(spec) = next.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("fingerprint".into(), fingerprint);
        spec.insert(
            "keyType".into(),
            Value::String(imported.key_type.as_str().to_string()),
        );
    }
    Ok(())
}

fn without_meta_and_status(v: &Value) -> Value {
    let mut c = v.clone();
    if let Some(o) = c.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    c
}

/// The record's finalizers.
pub fn finalizers(v: &Value) -> Vec<&str> {
    v.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The finalizer a delete with `propagationPolicy=Orphan` adds while other finalizers hold the
/// record (Kubernetes' name): the registry orphans the dependents when it is the last one left.
pub const ORPHAN_FINALIZER: &str = "orphan";

/// The finalizer a delete with `propagationPolicy=Foreground` adds (Kubernetes' name): the
/// garbage collector deletes the record's dependents and removes it once no dependent that
/// blocks its owner's deletion (`blockOwnerDeletion: true`) is left.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// Whether the record is marked for deletion and waits on [`FOREGROUND_FINALIZER`].
pub fn deleting_in_foreground(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp")
        .is_some_and(|d| !d.is_null())
        && finalizers(v).contains(&FOREGROUND_FINALIZER)
}

/// Whether the record is marked for deletion and only [`ORPHAN_FINALIZER`] still holds it.
pub fn only_orphan_finalizer_left(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp")
        .is_some_and(|d| !d.is_null())
        && finalizers(v) == [ORPHAN_FINALIZER]
}

/// `v` with `finalizer` added (once) or removed.
pub fn with_finalizer(v: &Value, finalizer: &str, present: bool) -> Value {
    let mut out = v.clone();
    let mut list: Vec<Value> = finalizers(v)
        .into_iter()
        .filter(|f| *f != finalizer)
        .map(|f| Value::String(f.to_string()))
        .collect();
    if present {
        list.push(Value::String(finalizer.to_string()));
    }
    if let Some(meta) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("finalizers");
        } else {
            meta.insert("finalizers".into(), Value::Array(list));
        }
    }
    out
}

/// Whether the record is marked for deletion and no finalizer holds it any more.
pub fn ready_to_delete(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp")
        .is_some_and(|d| !d.is_null())
        && finalizers(v).is_empty()
}

/// Prepare an update of `old` to `new`: system fields are kept, status or spec is taken from
/// the right side, generation increments on spec changes only.
pub fn prepare_update(
    kind: &Kind,
    old: &Value,
    new: Value,
    sub: Subresource,
    mode: FieldValidation,
) -> ApiResult<(Value, Vec<String>)> {
    check_type(kind, &new)?;
    let old_name = name_of(old).to_string();
    let new_name = name_of(&new).to_string();
    if new_name != old_name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({new_name}) does not match the name on the URL ({old_name})"
        )));
    }
    // A namespace in the body must be the record's own (none means "the one on the URL").
    let namespace_of = |v: &Value| {
        v.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let new_namespace = namespace_of(&new);
    if kind.info.namespaced && !new_namespace.is_empty() && new_namespace != namespace_of(old) {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
    if let Some(uid) = new.pointer("/metadata/uid").and_then(Value::as_str) {
        let old_uid = old_meta.get("uid").and_then(Value::as_str).unwrap_or("");
        if !uid.is_empty() && uid != old_uid {
            return Err(ApiError::precondition_failed(
                kind.info.plural,
                &old_name,
                "UID",
                uid,
                old_uid,
            ));
        }
    }
    let mut out = match sub {
        Subresource::Main => {
            let mut out = new;
            if let Some(o) = out.as_object_mut() {
                match old.get("status") {
                    Some(s) => o.insert("status".into(), s.clone()),
                    None => o.remove("status"),
                };
            }
            out
        }
        Subresource::Status => {
            let mut out = old.clone();
            if let Some(o) = out.as_object_mut() {
                match new.get("status") {
                    Some(s) if !s.is_null() => o.insert("status".into(), s.clone()),
                    _ => o.remove("status"),
                };
            }
            out
        }
    };
    let old_id = old_meta
        .pointer(&format!("/labels/{}", crds::ID_LABEL.replace('/', "~1")))
        .cloned();
    let being_deleted = old_meta
        .get("deletionTimestamp")
        .is_some_and(|d| !d.is_null());
    let old_finalizers = finalizers(old)
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    {
        let meta = meta_mut(&mut out)?;
        for field in [
            "uid",
            "creationTimestamp",
            "namespace",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        meta.remove("resourceVersion");
        meta.remove("selfLink");
        if let Some(id) = &old_id {
            let l = labels_of(meta, kind, &old_name)?;
            match l.get(crds::ID_LABEL) {
                Some(v) if v != id => {
                    return Err(ApiError::invalid(
                        kind.info.kind,
                        &old_name,
                        vec![(
                            format!("metadata.labels[{}]", crds::ID_LABEL),
                            "field is immutable".into(),
                        )],
                    ))
                }
                _ => {
                    l.insert(crds::ID_LABEL.into(), id.clone());
                }
            }
        }
    }
    if kind.info.kind == "KeyPair" && sub == Subresource::Main {
        key_pair_facts(Some(old), &mut out)
            .map_err(|cause| ApiError::invalid(kind.info.kind, &old_name, vec![cause]))?;
    }
    if kind.info.kind == "Instance" && sub == Subresource::Main {
        if let Some((field, why)) = instance_change_problem(old, &out) {
            return Err(ApiError::invalid(
                kind.info.kind,
                &old_name,
                vec![(field, why)],
            ));
        }
    }
    if being_deleted {
        let added = finalizers(&out)
            .into_iter()
            .any(|f| !old_finalizers.iter().any(|o| o == f));
        if added {
            // 422 with a Forbidden cause, as Kubernetes answers it.
            return Err(ApiError::invalid(
                kind.info.kind,
                &old_name,
                vec![(
                    "metadata.finalizers".into(),
                    "Forbidden: no new finalizers can be added if the object is being deleted"
                        .into(),
                )],
            ));
        }
    }
    let generation = old_meta
        .get("generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    // Compared once pruned and defaulted: a manifest with a misspelt field, or one leaving a
    // defaulted field out, changes nothing, and must not move the generation at each apply.
    let unknown = validate(kind, &mut out, mode)?;
    if without_meta_and_status(old) != without_meta_and_status(&out) {
        meta_mut(&mut out)?.insert("generation".into(), json!(generation + 1));
    }
    let fixed = |v: &Value| -> Vec<UniqueKey> {
        unique_keys(kind.info.kind, v)
            .into_iter()
            .filter(|u| !u.follows_status)
            .collect()
    };
    let (before, after) = (fixed(old), fixed(&out));
    if before != after {
        let (field, what) = before
            .iter()
            .chain(&after)
            .map(|u| (u.field, u.what.clone()))
            .next()
            .unwrap_or_default();
        return Err(ApiError::invalid(
            kind.info.kind,
            &old_name,
            vec![(
                field.to_owned(),
                format!("{what} is immutable once the record exists"),
            )],
        ));
    }
    Ok((out, unknown))
}

/// Mark a record for deletion (its finalizers still hold it).
pub fn mark_deleted(old: &Value, now: &str) -> Value {
    let mut out = old.clone();
    if let Some(meta) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        // As Kubernetes does, the first mark bumps the generation: what controllers and agents
        // reported for the record before it was deleted is then visibly older than the deletion.
        if !meta.contains_key("deletionTimestamp") {
            if let Some(generation) = meta
                .get("generation")
                .and_then(Value::as_i64)
                .filter(|g| *g > 0)
            {
                meta.insert("generation".into(), json!(generation.saturating_add(1)));
            }
        }
        meta.entry("deletionTimestamp")
            .or_insert_with(|| Value::String(now.to_string()));
        meta.entry("deletionGracePeriodSeconds").or_insert(json!(0));
        meta.remove("resourceVersion");
    }
    out
}

/// Whether Instance record `v` has termination protection (`spec.disableApiTermination`).
fn protected(v: &Value) -> bool {
    v.pointer("/spec/disableApiTermination")
        .and_then(Value::as_bool)
        == Some(true)
}

/// Whether Instance record `v` is asked to be terminated.
fn asked_terminated(v: &Value) -> bool {
    v.pointer("/spec/desiredState").and_then(Value::as_str) == Some("terminated")
}

/// Why `who` may not delete record `current`, if it may not: an Instance with termination
/// protection (`spec.disableApiTermination`) is no more terminated by deleting its record than
/// by any other API (as in EC2), until it is asked to be terminated or already being deleted;
/// the operator's controllers may (the garbage collector, acting for a deleted owner, is not
/// asked). Pure.
pub fn delete_refusal(kind: &str, current: &Value, who: &Principal) -> Option<ApiError> {
    let refused = kind == "Instance"
        && protected(current)
        && !asked_terminated(current)
        && current.pointer("/metadata/deletionTimestamp").is_none()
        && !matches!(who, Principal::Operator(_));
    refused.then(|| {
        ApiError::forbidden(format!(
            "instance {} has termination protection (spec.disableApiTermination): set it to false before deleting it",
            name_of(current)
        ))
    })
}

/// Why the change of an Instance's spec from `old` to `new` is not allowed, as `(field,
/// message)`, if it is not: one with termination protection is not asked to terminate (unless
/// the same change lifts the protection); once the instance is bound to a node, what it was
/// launched from (image, kernel, ramdisk, key pair, zone) stays, and its type and user data
/// change only while it is stopped, as EC2 allows them (ModifyInstanceAttribute). An instance
/// not bound yet may otherwise be edited freely. Pure.
pub fn instance_change_problem(old: &Value, new: &Value) -> Option<(String, String)> {
    if protected(new) && asked_terminated(new) && !asked_terminated(old) {
        return Some((
            "spec.desiredState".into(),
            "Forbidden: the instance has termination protection (spec.disableApiTermination): set it to false to terminate the instance".into(),
        ));
    }
    let status = |p: &str| old.pointer(&format!("/status/{p}")).and_then(Value::as_str);
    if status("nodeName").is_none_or(str::is_empty) {
        return None;
    }
    let stopped = status("state") == Some("stopped");
    let spec = |v: &Value, f: &str| v.pointer(&format!("/spec/{f}")).cloned();
    for field in [
        "imageId",
        "kernelId",
        "ramdiskId",
        "keyName",
        "availabilityZone",
    ] {
        if spec(old, field) != spec(new, field) {
            return Some((
                format!("spec.{field}"),
                "Invalid value: field is immutable once the instance is placed on a node".into(),
            ));
        }
    }
    for field in ["instanceType", "userData"] {
        if !stopped && spec(old, field) != spec(new, field) {
            return Some((
                format!("spec.{field}"),
                "Invalid value: can be changed only while the instance is stopped".into(),
            ));
        }
    }
    None
}

/// How deeply a stored record may nest objects and arrays: well inside what the JSON reader
/// reads back (128), which a JSON patch could otherwise exceed by nesting a value inside one.
pub const MAX_NESTING: usize = 100;

/// Why `obj` cannot be stored as it is nested, if it cannot: a record the gateway could not
/// read back would be unreadable and undeletable. Pure.
pub fn nesting_problem(obj: &Value) -> Option<String> {
    let mut stack: Vec<(&Value, usize)> = vec![(obj, 1)];
    while let Some((v, depth)) = stack.pop() {
        let nests = matches!(v, Value::Object(_) | Value::Array(_));
        if nests && depth > MAX_NESTING {
            return Some(format!(
                "the record nests objects and arrays more than {MAX_NESTING} deep"
            ));
        }
        match v {
            Value::Object(map) => stack.extend(map.values().map(|c| (c, depth + 1))),
            Value::Array(items) => stack.extend(items.iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    None
}

/// The same record without fields that change on every write, for no-op detection.
pub fn comparable(v: &Value) -> Value {
    let mut c = v.clone();
    if let Some(meta) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_uuid_is_a_random_version_4_uuid_and_never_the_last() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = new_uuid();
            assert_eq!(id.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert!(seen.insert(id), "{id} came twice");
        }
    }

    #[test]
    fn a_record_nested_deeper_than_the_reader_reads_back_is_refused() {
        let nested = |depth: usize| {
            let mut v = json!("leaf");
            for _ in 0..depth {
                v = json!({"a": v});
            }
            v
        };
        assert_eq!(nesting_problem(&nested(MAX_NESTING)), None);
        assert!(nesting_problem(&nested(MAX_NESTING + 1)).is_some());
        assert!(nesting_problem(&json!([[[[nested(MAX_NESTING - 3)]]]])).is_some());
        // What is deep enough to refuse is still well inside what serde_json reads back.
        let text = serde_json::to_string(&nested(MAX_NESTING)).expect("serialised");
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }

    #[test]
    fn a_key_pairs_type_and_fingerprint_follow_its_public_key() {
        const KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKHnc2vSLJAEqjplP3WP12DlDNrh0g1XYeMkmjX4NKfx";
        let imported = crate::ec2::keys::import(KEY.as_bytes()).expect("a valid key");
        let pair = |key: &str, extra: Value| {
            let mut v = json!({"spec": {"keyName": "k", "publicKey": key}});
            if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
                spec.extend(extra.clone());
            }
            v
        };
        let facts = |old: Option<&Value>, mut next: Value| {
            key_pair_facts(old, &mut next).map(|()| {
                (
                    next["spec"]["keyType"].clone(),
                    next["spec"]["fingerprint"].clone(),
                )
            })
        };
        let want = (json!("ed25519"), json!(imported.fingerprint));
        // Written by kubectl: the type the key is, its imported fingerprint (not "rsa", none).
        assert_eq!(facts(None, pair(KEY, json!({}))), Ok(want.clone()));
        assert_eq!(
            facts(None, pair(KEY, json!({"keyType": "rsa"}))),
            Ok(want.clone())
        );
        // CreateKeyPair's own fingerprint is kept, on creation and while the key stays.
        let created = pair(KEY, json!({"fingerprint": "1f:51"}));
        assert_eq!(
            facts(None, created.clone()),
            Ok((json!("ed25519"), json!("1f:51")))
        );
        assert_eq!(
            facts(Some(&created), pair(KEY, json!({"fingerprint": "forged"}))),
            Ok((json!("ed25519"), json!("1f:51")))
        );
        // A new key is an imported one.
        let other = crate::ec2::keys::create(crate::ec2::keys::KeyType::Ed25519)
            .expect("a new key")
            .public_key;
        let changed = facts(
            Some(&created),
            pair(&other, json!({"fingerprint": "1f:51"})),
        );
        assert_ne!(changed.map(|(_, f)| f), Ok(json!("1f:51")));
        // What EC2 would not import is refused.
        let refused = facts(None, pair("ssh-dss AAAA", json!({})));
        assert_eq!(
            refused.map_err(|(f, _)| f),
            Err("spec.publicKey".to_string())
        );
    }

    #[test]
    fn termination_protection_holds_against_deleting_the_record_and_asking_it_to_terminate() {
        let instance = |protected: bool, desired: &str| {
            json!({"metadata": {"name": "i-1"},
                "spec": {"disableApiTermination": protected, "desiredState": desired}})
        };
        let admin = Principal::Admin("admin".into());
        let account = Principal::Account {
            user: "u".into(),
            namespace: "acme".into(),
        };
        let operator = Principal::Operator("operator".into());
        let mut deleting = instance(true, "running");
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        // (record, who, refused)
        let deletes = [
            (instance(true, "running"), &admin, true),
            (instance(true, "stopped"), &account, true),
            (instance(true, "running"), &operator, false),
            (instance(false, "running"), &account, false),
            (instance(true, "terminated"), &account, false),
            (deleting, &account, false),
        ];
        for (i, (record, who, refused)) in deletes.iter().enumerate() {
            assert_eq!(
                delete_refusal("Instance", record, who).is_some(),
                *refused,
                "delete row {i}"
            );
        }
        assert!(delete_refusal("Image", &instance(true, "running"), &admin).is_none());
        // (old, new, refused)
        let changes = [
            (
                instance(true, "running"),
                instance(true, "terminated"),
                true,
            ),
            (
                instance(true, "stopped"),
                instance(true, "terminated"),
                true,
            ),
            // Lifted in the same change: asked for in so many words.
            (
                instance(true, "running"),
                instance(false, "terminated"),
                false,
            ),
            (
                instance(false, "running"),
                instance(false, "terminated"),
                false,
            ),
            (instance(true, "running"), instance(true, "stopped"), false),
            // Set on one asked to terminate already: it stays as it was.
            (
                instance(false, "terminated"),
                instance(true, "terminated"),
                false,
            ),
        ];
        for (i, (old, new, refused)) in changes.iter().enumerate() {
            assert_eq!(
                instance_change_problem(old, new).map(|(f, _)| f),
                refused.then(|| "spec.desiredState".to_string()),
                "change row {i}"
            );
        }
    }

    #[test]
    fn a_placed_instance_keeps_what_it_was_launched_from_and_resizes_only_when_stopped() {
        let instance = |node: Option<&str>, state: &str, image: &str, itype: &str| {
            let mut v = json!({"spec": {"imageId": image, "instanceType": itype},
                "status": {"state": state}});
            if let Some(n) = node {
                v["status"]["nodeName"] = json!(n);
            }
            v
        };
        let rows = [
            // (old, new, the field refused)
            (
                instance(None, "pending", "emi-1", "t1.micro"),
                instance(None, "pending", "emi-2", "m1.small"),
                None,
            ),
            (
                instance(Some("n"), "running", "emi-1", "t1.micro"),
                instance(Some("n"), "running", "emi-2", "t1.micro"),
                Some("spec.imageId"),
            ),
            (
                instance(Some("n"), "stopped", "emi-1", "t1.micro"),
                instance(Some("n"), "stopped", "emi-2", "t1.micro"),
                Some("spec.imageId"),
            ),
            (
                instance(Some("n"), "running", "emi-1", "t1.micro"),
                instance(Some("n"), "running", "emi-1", "m1.small"),
                Some("spec.instanceType"),
            ),
            (
                instance(Some("n"), "stopped", "emi-1", "t1.micro"),
                instance(Some("n"), "stopped", "emi-1", "m1.small"),
                None,
            ),
            (
                instance(Some("n"), "running", "emi-1", "t1.micro"),
                instance(Some("n"), "running", "emi-1", "t1.micro"),
                None,
            ),
        ];
        for (i, (old, new, refused)) in rows.iter().enumerate() {
            assert_eq!(
                instance_change_problem(old, new).map(|(f, _)| f).as_deref(),
                *refused,
                "row {i}"
            );
        }
    }

    #[test]
    fn marking_a_record_deleted_bumps_its_generation_once() {
        let record = json!({"metadata": {"name": "i", "generation": 3, "resourceVersion": "9"}});
        let marked = mark_deleted(&record, "2026-11-26T02:00:00Z");
        assert_eq!(marked["metadata"]["generation"], 4);
        assert_eq!(
            marked["metadata"]["deletionTimestamp"],
            "2026-11-26T02:00:00Z"
        );
        assert!(marked["metadata"].get("resourceVersion").is_none());
        // Deleting it again changes nothing more.
        let again = mark_deleted(&marked, "2026-11-26T02:05:00Z");
        assert_eq!(again["metadata"]["generation"], 4);
        assert_eq!(
            again["metadata"]["deletionTimestamp"],
            "2026-11-26T02:00:00Z"
        );
        // A kind without generations gets none.
        let plain = mark_deleted(&json!({"metadata": {"name": "n"}}), "2026-11-26T02:00:00Z");
        assert!(plain["metadata"].get("generation").is_none());
    }

    #[test]
    fn account_names_are_namespace_labels_and_not_reserved() {
        for ok in ["research", "team-7", "a"] {
            assert_eq!(account_name_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "acme.corp",
            "Acme",
            "-x",
            "x-",
            "default",
            "kube-system",
            "karri-system",
        ] {
            assert!(account_name_problem(bad).is_some(), "{bad}");
        }
        assert!(account_name_problem(&"a".repeat(64)).is_some());
    }

    #[test]
    fn system_namespaces_are_default_kube_and_karri_ones() {
        for system in ["default", "kube-system", "karri-images"] {
            assert!(is_system_namespace(system), "{system}");
        }
        for other in ["research", "karri", "kube", "defaults"] {
            assert!(!is_system_namespace(other), "{other}");
        }
    }
}
