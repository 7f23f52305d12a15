//! Server-side apply (`application/apply-patch+yaml`): field ownership per manager in
//! `metadata.managedFields`, conflicts between appliers, removal of fields a manager stopped
//! applying. Lists are atomic, but for two lists whose items have owners of their own, as in
//! Kubernetes: `metadata.finalizers`, a set (an applier that drops its finalizer leaves the
//! operator's), and `metadata.ownerReferences`, a map keyed by `uid` (an applier that drops its
//! owner leaves the others'; `k:{"uid":…}` in `fieldsV1`). Pure.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// A field path, e.g. `["spec", "imageId"]`.
pub type Path = Vec<String>;

/// A field owned by another manager whose value this apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// The other manager as kube-apiserver names it in a conflict: quoted, with its
    /// subresource, and for an update the API version and time of its write
    /// (`"kubectl-edit" using karri.dev/v1alpha1 at 2026-01-02T03:04:05Z`).
    pub described: String,
    /// The field, dotted.
    pub field: String,
    /// The field's path.
    pub path: Path,
}

/// The leaf paths of an applied configuration.
pub fn field_set(applied: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(obj) = applied.as_object() else {
        return out;
    };
    for (k, v) in obj {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                let Some(meta) = v.as_object() else { continue };
                for (mk, mv) in meta {
                    match mk.as_str() {
                        "labels" | "annotations" => {
                            for lk in mv.as_object().into_iter().flat_map(|m| m.keys()) {
                                out.insert(vec!["metadata".into(), mk.clone(), lk.clone()]);
                            }
                        }
                        "finalizers" => {
                            for item in mv.as_array().into_iter().flatten() {
                                out.insert(vec!["metadata".into(), mk.clone(), set_item(item)]);
                            }
                        }
                        "ownerReferences" => {
                            let items = mv.as_array().map(Vec::as_slice).unwrap_or_default();
                            let keyed: Option<Vec<String>> = items.iter().map(uid_item).collect();
                            match keyed {
                                // An empty list owns no owner: the others' stay.
                                Some(keys) => {
                                    for key in keys {
                                        out.insert(vec!["metadata".into(), mk.clone(), key]);
                                    }
                                }
                                // Items without a uid (admission refuses them): owned whole.
                                None => {
                                    out.insert(vec!["metadata".into(), mk.clone()]);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => leaves(v, vec![k.clone()], &mut out),
        }
    }
    out
}

/// The path segment of an item of a set list, `v:<the item as JSON>` (its `fieldsV1` key, as in
/// Kubernetes).
fn set_item(item: &Value) -> String {
    format!("v:{item}")
}

/// The path segment of an item of a list keyed by `uid`, `k:{"uid":"…"}` (its `fieldsV1` key,
/// as in Kubernetes); `None` for an item without a string `uid`.
fn uid_item(item: &Value) -> Option<String> {
    let uid = item.get("uid")?.as_str()?;
    Some(format!("k:{}", json!({ "uid": uid })))
}

/// The item a `v:` path segment names.
fn item_of(segment: &str) -> Option<Value> {
    segment
        .strip_prefix("v:")
        .and_then(|json| serde_json::from_str(json).ok())
}

/// The key fields a `k:` path segment names (`{"uid": "…"}`).
fn key_of(segment: &str) -> Option<Map<String, Value>> {
    segment
        .strip_prefix("k:")
        .and_then(|json| serde_json::from_str(json).ok())
}

/// Whether a list item has every key field of `key`.
fn has_key(item: &Value, key: &Map<String, Value>) -> bool {
    key.iter().all(|(k, v)| item.get(k) == Some(v))
}

/// The child of `v` that a path segment names: a field of a map, or the item of a keyed list.
fn child<'a>(v: &'a Value, segment: &str) -> Option<&'a Value> {
    match (v, key_of(segment)) {
        (Value::Array(items), Some(key)) => items.iter().find(|i| has_key(i, &key)),
        _ => v.get(segment),
    }
}

/// [`child`], mutable.
fn child_mut<'a>(v: &'a mut Value, segment: &str) -> Option<&'a mut Value> {
    match key_of(segment) {
        Some(key) if v.is_array() => v
            .as_array_mut()
            .and_then(|items| items.iter_mut().find(|i| has_key(i, &key))),
        _ => v.get_mut(segment),
    }
}

/// Makes sure the list at `path`'s parent holds the item `path` ends with: for a set, that
/// item; for a keyed list, `applied`'s item with that key, in place of the one there.
fn add_item(v: &mut Value, path: &[String], applied: &Value) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    if key_of(last).is_some() {
        let Some(item) = get(applied, path).cloned() else {
            return;
        };
        match get_mut(v, parent) {
            Some(Value::Array(items)) => {
                match items
                    .iter_mut()
                    .find(|i| uid_item(i).as_ref() == Some(last))
                {
                    Some(there) => *there = item,
                    None => items.push(item),
                }
            }
            _ => set(v, parent, Value::Array(vec![item])),
        }
        return;
    }
    let Some(item) = item_of(last) else { return };
    match get_mut(v, parent) {
        Some(Value::Array(items)) => {
            if !items.contains(&item) {
                items.push(item);
            }
        }
        _ => set(v, parent, Value::Array(vec![item])),
    }
}

/// Takes the item `path` ends with out of the list at its parent.
fn remove_item(v: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let Some(Value::Array(items)) = get_mut(v, parent) else {
        return;
    };
    if let Some(key) = key_of(last) {
        items.retain(|i| !has_key(i, &key));
    } else if let Some(item) = item_of(last) {
        items.retain(|i| i != &item);
    }
}

/// Whether `path` names an item of a set (`v:`) or keyed list (`k:`).
fn is_item(path: &[String]) -> bool {
    path.last()
        .is_some_and(|s| s.starts_with("v:") || s.starts_with("k:"))
}

fn leaves(v: &Value, path: Path, out: &mut BTreeSet<Path>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                let mut p = path.clone();
                p.push(k.clone());
                leaves(child, p, out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

/// Encode a field set as `fieldsV1` (`{"f:spec":{"f:imageId":{}}}`).
pub fn encode(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for seg in path {
            let key = if seg.starts_with("v:") || seg.starts_with("k:") {
                seg.clone()
            } else {
                format!("f:{seg}")
            };
            let entry = cur.entry(key).or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            let Some(next) = entry.as_object_mut() else {
                break;
            };
            cur = next;
        }
    }
    Value::Object(root)
}

/// Decode `fieldsV1` into leaf paths.
pub fn decode(fields: &Value) -> BTreeSet<Path> {
    fn go(v: &Value, path: Path, out: &mut BTreeSet<Path>) {
        let children: Vec<(&String, &Value)> = v
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        k.starts_with("f:") || k.starts_with("v:") || k.starts_with("k:")
                    })
                    .collect()
            })
            .unwrap_or_default();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path);
            }
            return;
        }
        for (k, child) in children {
            let mut p = path.clone();
            p.push(match k.strip_prefix("f:") {
                Some(field) => field.to_string(),
                None => k.clone(),
            });
            go(child, p, out);
        }
    }
    let mut out = BTreeSet::new();
    go(fields, Vec::new(), &mut out);
    out
}

fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, seg| child(cur, seg))
}

fn get_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |cur, seg| child_mut(cur, seg))
}

fn set(v: &mut Value, path: &[String], value: Value) {
    let mut cur = v;
    for (i, seg) in path.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        if i + 1 == path.len() {
            map.insert(seg.clone(), value);
            return;
        }
        cur = map
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parents {
        match cur.get_mut(seg) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(map) = cur.as_object_mut() {
        map.remove(last);
    }
}

fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Whether owning `owned` makes a manager an owner of the field `p` in `record`: the same
/// field, one inside `p`, or one `p` is inside; but not a map `p` is inside, whose owner owns
/// its presence (an empty map in a manifest, or one an update made), not the fields others put
/// in it.
fn claims(owned: &Path, p: &Path, record: &Value) -> bool {
    let presence_of_a_map = owned.len() < p.len()
        && !is_item(owned)
        && lookup(record, owned).is_some_and(Value::is_object);
    overlaps(owned, p) && !presence_of_a_map
}

/// A `managedFields` entry's manager as kube-apiserver names it in an apply conflict.
pub fn describe_manager(entry: &Value) -> String {
    let text = |field: &str| entry.get(field).and_then(Value::as_str).unwrap_or("");
    let mut out = format!("{:?}", text("manager"));
    if !text("subresource").is_empty() {
        out.push_str(&format!(" with subresource {:?}", text("subresource")));
    }
    if text("operation") == "Update" {
        out.push_str(&format!(" using {}", text("apiVersion")));
        if !text("time").is_empty() {
            out.push_str(&format!(" at {}", text("time")));
        }
    }
    out
}

/// Apply `applied` for `manager` over `live` (None when the record does not exist yet).
/// Returns the new record with updated `managedFields`, or the conflicts when `force` is false.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut result = match live {
        Some(l) => l.clone(),
        None => {
            let mut base = json!({
                "apiVersion": applied.get("apiVersion").cloned().unwrap_or(Value::Null),
                "kind": applied.get("kind").cloned().unwrap_or(Value::Null),
                "metadata": {},
            });
            for field in ["name", "namespace", "generateName"] {
                if let Some(v) = applied.pointer(&format!("/metadata/{field}")) {
                    base["metadata"][field] = v.clone();
                }
            }
            base
        }
    };
    let entries: Vec<Value> = result
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is_apply = |e: &Value| e.get("operation").and_then(Value::as_str) == Some("Apply");
    let manager_of = |e: &Value| {
        e.get("manager")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let mine_at = entries
        .iter()
        .position(|e| is_apply(e) && manager_of(e) == manager);
    let mine_entry = mine_at.and_then(|i| entries.get(i));
    let mine_prev: BTreeSet<Path> = mine_entry
        .and_then(|e| e.get("fieldsV1"))
        .map(decode)
        .unwrap_or_default();
    // Entries before this manager's own keep their place ahead of it.
    let before_mine = |i: usize| mine_at.is_some_and(|m| i < m);
    let mut others: Vec<(Value, BTreeSet<Path>, bool)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !(is_apply(e) && manager_of(e) == manager))
        .map(|(i, e)| {
            (
                e.clone(),
                e.get("fieldsV1").map(decode).unwrap_or_default(),
                before_mine(i),
            )
        })
        .collect();
    let wanted = field_set(applied);

    let mut conflicts = Vec::new();
    for p in &wanted {
        // Applying the value a field already has shares ownership without conflict; so does
        // an empty map where there is a map (it asks for the map, not for emptying it).
        let asks_only_for_a_map = get(applied, p)
            .is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
            && get(&result, p).is_some_and(Value::is_object);
        if get(&result, p) == get(applied, p) || asks_only_for_a_map {
            continue;
        }
        // Fields an update (a create, a PUT, a patch) last set conflict too, as in Kubernetes:
        // an apply does not silently undo what `kubectl edit` or an EC2 call changed.
        for (entry, owned, _) in others.iter_mut() {
            let clash: Vec<Path> = owned
                .iter()
                .filter(|o| claims(o, p, &result))
                .cloned()
                .collect();
            if clash.is_empty() {
                continue;
            }
            if force {
                for c in &clash {
                    owned.remove(c);
                }
            } else {
                conflicts.push(Conflict {
                    manager: manager_of(entry),
                    described: describe_manager(entry),
                    field: format!(".{}", p.join(".")),
                    path: p.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        // kubectl's server-side apply may take what its client-side apply set, as
        // kube-apiserver lets it; only the other conflicts are reported.
        let allowed = match live {
            Some(l) if manager == KUBECTL => last_applied_fields(l),
            _ => BTreeSet::new(),
        };
        conflicts.retain(|c| !allowed.contains(&c.path));
        if conflicts.is_empty() {
            return apply(live, applied, manager, true, now);
        }
        return Err(conflicts);
    }
    for stale in mine_prev.difference(&wanted) {
        let still_owned = others
            .iter()
            .any(|(_, s, _)| s.iter().any(|o| claims(o, stale, &result)));
        // A leaf path that holds a filled map now was an empty map in the manifest: it owned
        // the map's presence, not what others have put in it since.
        let filled_map = !is_item(stale)
            && get(&result, stale).is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty()));
        // The whole finalizer or owner list, as records applied before finalizers were a set
        // and owners a keyed list own it: others' items are in it too, and the manager's own
        // are named from now on.
        let whole_set = matches!(
            stale.as_slice(),
            [m, l] if m == "metadata" && (l == "finalizers" || l == "ownerReferences")
        );
        if still_owned || filled_map || whole_set {
            continue;
        }
        if is_item(stale) {
            remove_item(&mut result, stale);
        } else {
            remove(&mut result, stale);
        }
    }
    for p in &wanted {
        if is_item(p) {
            add_item(&mut result, p, applied);
            continue;
        }
        if let Some(v) = get(applied, p) {
            // An empty map in the manifest asks for the map, not for emptying it (Kubernetes
            // keeps the fields under it that the manifest does not name).
            let empty_map = v.as_object().is_some_and(Map::is_empty);
            if empty_map && get(&result, p).is_some_and(Value::is_object) {
                continue;
            }
            set(&mut result, p, v.clone());
        }
    }
    let kept: Vec<(Value, bool)> = others
        .into_iter()
        .filter(|(_, s, _)| !s.is_empty())
        .map(|(mut e, s, before)| {
            // Entries whose fields did not change stay as they were written.
            if e.get("fieldsV1").map(decode).unwrap_or_default() != s {
                e["fieldsV1"] = encode(&s);
            }
            (e, before)
        })
        .collect();
    let api_version = applied.get("apiVersion").cloned().unwrap_or(Value::Null);
    // As Kubernetes does, the time moves only when what the manager owns changes, so that
    // applying the same manifest again (a GitOps loop) is no write at all.
    let time = match mine_entry {
        Some(prev) if mine_prev == wanted && prev.get("apiVersion") == Some(&api_version) => prev
            .get("time")
            .cloned()
            .unwrap_or_else(|| Value::String(now.to_string())),
        _ => Value::String(now.to_string()),
    };
    let mine = json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": api_version,
        "time": time,
        "fieldsType": "FieldsV1",
        "fieldsV1": encode(&wanted),
    });
    let at = kept.iter().take_while(|(_, before)| *before).count();
    let mut managed: Vec<Value> = kept.into_iter().map(|(e, _)| e).collect();
    if mine_at.is_some() {
        managed.insert(at, mine);
    } else {
        managed.push(mine);
    }
    if let Some(meta) = result.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("managedFields".into(), Value::Array(managed));
    }
    if manager == KUBECTL {
        sync_last_applied(&mut result, applied);
    }
    Ok(result)
}

/// Most `Update` entries a record keeps, as in Kubernetes: each name a client chooses would
/// otherwise add one, and the record could grow to etcd's limit.
pub const MAX_UPDATE_MANAGERS: usize = 10;

/// The entry the oldest updates are merged into past [`MAX_UPDATE_MANAGERS`], as Kubernetes
/// names it.
pub const ANCIENT_CHANGES: &str = "ancient-changes";

/// Merges the oldest `Update` entries (and the [`ANCIENT_CHANGES`] entry, if there is one) into
/// one [`ANCIENT_CHANGES`] entry until at most [`MAX_UPDATE_MANAGERS`] are left: its fields are
/// theirs together, its time the latest of theirs. It takes the place of the first of them.
fn cap_update_managers(managed: &mut Vec<Value>) {
    let is_update = |e: &Value| e.get("operation").and_then(Value::as_str) == Some("Update");
    let updates = managed.iter().filter(|e| is_update(e)).count();
    if updates <= MAX_UPDATE_MANAGERS {
        return;
    }
    let time_of = |e: &Value| {
        e.get("time")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let mut oldest: Vec<usize> = (0..managed.len())
        .filter(|i| managed.get(*i).is_some_and(&is_update))
        .collect();
    oldest.sort_by_key(|i| {
        let e = &managed[*i];
        // The ancient-changes entry goes first: it is always one of those merged.
        (
            e.get("manager").and_then(Value::as_str) != Some(ANCIENT_CHANGES),
            time_of(e),
        )
    });
    let merged: BTreeSet<usize> = oldest
        .into_iter()
        .take(updates - MAX_UPDATE_MANAGERS + 1)
        .collect();
    let mut fields = BTreeSet::new();
    let mut latest = String::new();
    let mut api_version = Value::Null;
    for i in &merged {
        let e = &managed[*i];
        fields.extend(e.get("fieldsV1").map(decode).unwrap_or_default());
        if time_of(e) >= latest {
            latest = time_of(e);
            api_version = e.get("apiVersion").cloned().unwrap_or(Value::Null);
        }
    }
    let bucket = json!({
        "manager": ANCIENT_CHANGES,
        "operation": "Update",
        "apiVersion": api_version,
        "time": latest,
        "fieldsType": "FieldsV1",
        "fieldsV1": encode(&fields),
    });
    let at = merged.first().copied().unwrap_or(0);
    let mut kept = Vec::with_capacity(managed.len());
    for (i, e) in managed.drain(..).enumerate() {
        if i == at {
            kept.push(bucket.clone());
        } else if !merged.contains(&i) {
            kept.push(e);
        }
    }
    *managed = kept;
}

/// The field manager `kubectl apply --server-side` uses: the one that takes over from
/// client-side apply.
const KUBECTL: &str = "kubectl";

/// The annotation in which client-side `kubectl apply` keeps the configuration it applied.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Most bytes a record's annotations may hold together, as in Kubernetes.
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// The fields client-side apply set that nobody changed since: in the last-applied annotation
/// (of the record's own API version) with the value the record still has. Kubernetes lets
/// `kubectl apply --server-side` take them from other managers without `--force-conflicts`, so
/// that moving from one apply to the other is no conflict.
fn last_applied_fields(live: &Value) -> BTreeSet<Path> {
    let last = live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(LAST_APPLIED))
        .and_then(Value::as_str)
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .filter(|last| last.get("apiVersion") == live.get("apiVersion"));
    let Some(last) = last else {
        return BTreeSet::new();
    };
    field_set(&last)
        .into_iter()
        .filter(|p| lookup(live, p) == lookup(&last, p))
        .collect()
}

/// Keeps a record's last-applied annotation, where it has one, in step with what
/// `kubectl apply --server-side` applied, as Kubernetes does, so that a later client-side apply
/// computes its changes from the right configuration. An annotation that would be too large
/// goes.
fn sync_last_applied(result: &mut Value, applied: &Value) {
    let has_it = result
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(LAST_APPLIED))
        .is_some();
    if !has_it {
        return;
    }
    let mut config = applied.clone();
    if let Some(annotations) = config
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.remove(LAST_APPLIED);
    }
    let text = config.to_string();
    let Some(annotations) = result
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    annotations.insert(LAST_APPLIED.into(), Value::String(text));
    let size: usize = annotations
        .iter()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    if size > MAX_ANNOTATIONS_BYTES {
        annotations.remove(LAST_APPLIED);
    }
}

/// Which part of a record a write other than an apply changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The record but its status (a create, a PUT or a patch of the record).
    Main,
    /// Its status (a write of the `/status` subresource).
    Status,
}

/// The fields of `v` that a write of `scope` can change, as leaf paths.
fn scope_set(v: &Value, scope: Scope) -> BTreeSet<Path> {
    match scope {
        Scope::Main => field_set(v),
        Scope::Status => {
            let mut out = BTreeSet::new();
            if let Some(status) = v.get("status") {
                leaves(status, vec!["status".into()], &mut out);
            }
            out
        }
    }
}

/// The value at `path`, where a `v:` segment names an item of a set list (and `k:` one of a
/// keyed list).
fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(v, |cur, seg| match (cur, item_of(seg)) {
            (Value::Array(items), Some(item)) => items.iter().find(|i| **i == item),
            _ => child(cur, seg),
        })
}

/// Records a write other than an apply (a create, a PUT, a merge or JSON patch, a status write)
/// by `manager` in `next`'s `metadata.managedFields`, as Kubernetes does: the manager's
/// `Update` entry (with `subresource: status` for a status write) gains every field the write
/// added or changed, those fields leave every other manager (an update takes them, it never
/// conflicts), and fields the write removed leave every manager; an entry left without fields
/// goes. `live` is the record before the write (`None` for a create).
///
/// Managed fields that `next` sets itself replace the live ones (kubectl rewrites them when it
/// moves client-side apply to server-side apply; `[{}]` clears them); unset or `[]`, and on a
/// status write, the live ones are kept. A write that changes nothing leaves them as they
/// were, time included. Pure.
pub fn record_update(
    live: Option<&Value>,
    next: &mut Value,
    manager: &str,
    scope: Scope,
    now: &str,
) {
    let entries_of = |v: Option<&Value>| {
        v.and_then(|v| v.pointer("/metadata/managedFields"))
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .cloned()
    };
    let entries = match scope {
        Scope::Main => entries_of(Some(next)),
        Scope::Status => None,
    }
    .or_else(|| entries_of(live))
    .unwrap_or_default();
    let empty = json!({});
    let old = live.unwrap_or(&empty);
    let (old_set, new_set) = (scope_set(old, scope), scope_set(next, scope));
    let taken: BTreeSet<Path> = old_set
        .union(&new_set)
        .filter(|p| {
            let (before, after) = (lookup(old, p), lookup(next, p));
            // A map that gained or lost fields is changed in those fields, not as a whole.
            // (An owner reference, a keyed item, is a field whose value is an object.)
            let both_maps = !is_item(p)
                && before.is_some_and(Value::is_object)
                && after.is_some_and(Value::is_object);
            after.is_some() && before != after && !both_maps
        })
        .cloned()
        .collect();
    let removed: Vec<&Path> = old_set
        .iter()
        .filter(|p| lookup(next, p).is_none())
        .collect();
    let subresource = match scope {
        Scope::Main => None,
        Scope::Status => Some("status"),
    };
    let is_mine = |e: &Value| {
        e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Update")
            && e.get("subresource")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                == subresource
    };
    let api_version = next.get("apiVersion").cloned().unwrap_or(Value::Null);
    let mut managed = Vec::with_capacity(entries.len() + 1);
    let mut found_mine = false;
    for mut entry in entries {
        let owned = entry.get("fieldsV1").map(decode).unwrap_or_default();
        let mine = !found_mine && is_mine(&entry);
        found_mine |= mine;
        let mut left: BTreeSet<Path> = owned
            .iter()
            .filter(|o| {
                let gone = removed.iter().any(|r| o.starts_with(r));
                let lost = !mine && taken.iter().any(|t| o.starts_with(t));
                !gone && !lost
            })
            .cloned()
            .collect();
        if mine && !taken.is_empty() {
            left.extend(taken.iter().cloned());
            entry["apiVersion"] = api_version.clone();
            entry["time"] = Value::String(now.to_string());
        }
        if left.is_empty() {
            continue;
        }
        if left != owned {
            entry["fieldsV1"] = encode(&left);
        }
        managed.push(entry);
    }
    if !found_mine && !taken.is_empty() {
        let mut entry = json!({
            "manager": manager,
            "operation": "Update",
            "apiVersion": api_version,
            "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": encode(&taken),
        });
        if let Some(sub) = subresource {
            entry["subresource"] = json!(sub);
        }
        managed.push(entry);
    }
    cap_update_managers(&mut managed);
    if let Some(meta) = next.get_mut("metadata").and_then(Value::as_object_mut) {
        if managed.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(managed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(image: &str, extra: Option<&str>) -> Value {
        let mut v = json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"imageId": image, "instanceType": "t1.micro"}});
        if let Some(k) = extra {
            v["spec"]["keyName"] = json!(k);
        }
        v
    }

    #[test]
    fn first_apply_creates_and_records_ownership() {
        let out = apply(None, &cfg("emi-1", None), "kubectl", false, "t").expect("no conflict");
        assert_eq!(out["spec"]["imageId"], "emi-1");
        assert_eq!(out["metadata"]["name"], "web");
        let owned = decode(&out["metadata"]["managedFields"][0]["fieldsV1"]);
        assert!(owned.contains(&vec!["spec".to_string(), "imageId".to_string()]));
        assert!(owned.contains(&vec!["metadata".into(), "labels".into(), "app".into()]));
    }

    #[test]
    fn reapply_changes_a_field_and_removes_a_dropped_one() {
        let live = apply(None, &cfg("emi-1", Some("k1")), "kubectl", false, "t").expect("ok");
        let out = apply(Some(&live), &cfg("emi-2", None), "kubectl", false, "t").expect("ok");
        assert_eq!(out["spec"]["imageId"], "emi-2");
        assert!(out["spec"].get("keyName").is_none(), "{out}");
    }

    #[test]
    fn another_manager_changing_an_owned_field_conflicts_unless_forced() {
        let live = apply(None, &cfg("emi-1", None), "kubectl", false, "t").expect("ok");
        let err =
            apply(Some(&live), &cfg("emi-9", None), "gitops", false, "t").expect_err("conflict");
        assert_eq!(err[0].manager, "kubectl");
        assert_eq!(err[0].field, ".spec.imageId");
        let out = apply(Some(&live), &cfg("emi-9", None), "gitops", true, "t").expect("forced");
        assert_eq!(out["spec"]["imageId"], "emi-9");
        // Same value from a second manager shares ownership without conflict.
        apply(Some(&live), &cfg("emi-1", None), "gitops", false, "t").expect("shared");
    }

    #[test]
    fn applying_the_same_manifest_again_changes_nothing_not_even_the_time() {
        let first = apply(None, &cfg("emi-1", None), "flux", false, "t1").expect("ok");
        // A second manager, so that the first one's entry is not last.
        let shared = apply(Some(&first), &cfg("emi-1", None), "argo", false, "t2").expect("ok");
        let again = apply(Some(&shared), &cfg("emi-1", None), "flux", false, "t3").expect("ok");
        assert_eq!(again, shared, "a repeated apply changed the record");
        // A change of what it owns moves its time.
        let changed =
            apply(Some(&again), &cfg("emi-1", Some("k")), "flux", false, "t4").expect("ok");
        let flux = changed["metadata"]["managedFields"]
            .as_array()
            .expect("managed fields")
            .iter()
            .find(|e| e["manager"] == "flux")
            .expect("flux's entry")
            .clone();
        assert_eq!(flux["time"], "t4");
    }

    #[test]
    fn an_empty_map_in_the_manifest_keeps_what_others_put_in_it() {
        let with_empty = |image: &str| {
            let mut v = cfg(image, None);
            v["spec"]["metadataOptions"] = json!({});
            v
        };
        let mut live = apply(None, &with_empty("emi-1"), "helm", false, "t").expect("ok");
        // Set since by another writer (an EC2 call, kubectl patch): no apply manager owns it.
        live["spec"]["metadataOptions"]["httpTokens"] = json!("required");
        let again = apply(Some(&live), &with_empty("emi-2"), "helm", false, "t").expect("ok");
        assert_eq!(again["spec"]["imageId"], "emi-2");
        assert_eq!(again["spec"]["metadataOptions"]["httpTokens"], "required");
        // Dropping the empty map from the manifest leaves the filled map alone too.
        let dropped = apply(Some(&again), &cfg("emi-2", None), "helm", false, "t").expect("ok");
        assert_eq!(dropped["spec"]["metadataOptions"]["httpTokens"], "required");
        // An empty map where there is none yet is set.
        let fresh = apply(None, &with_empty("emi-1"), "helm", false, "t").expect("ok");
        assert_eq!(fresh["spec"]["metadataOptions"], json!({}));
    }

    #[test]
    fn finalizers_are_a_set_each_item_owned_by_who_applied_it() {
        let with = |finalizers: Value| {
            let mut v = cfg("emi-1", None);
            v["metadata"]["finalizers"] = finalizers;
            v
        };
        let mut live =
            apply(None, &with(json!(["example.com/a"])), "gitops", false, "t").expect("ok");
        // The operator adds its own (a JSON patch: no apply manager owns it).
        live["metadata"]["finalizers"]
            .as_array_mut()
            .expect("a list")
            .push(json!("karri.dev/instance"));
        let dropped = apply(Some(&live), &cfg("emi-1", None), "gitops", false, "t").expect("ok");
        assert_eq!(
            dropped["metadata"]["finalizers"],
            json!(["karri.dev/instance"]),
            "dropping its finalizer took the operator's too"
        );
        let added = apply(
            Some(&dropped),
            &with(json!(["karri.dev/instance", "example.com/b"])),
            "gitops",
            false,
            "t",
        )
        .expect("ok");
        assert_eq!(
            added["metadata"]["finalizers"],
            json!(["karri.dev/instance", "example.com/b"])
        );
        let owned = decode(&added["metadata"]["managedFields"][0]["fieldsV1"]);
        assert!(owned.contains(&vec![
            "metadata".to_string(),
            "finalizers".to_string(),
            "v:\"example.com/b\"".to_string()
        ]));
        // Records applied while the list was owned whole keep everyone's finalizers.
        let mut old_style = added.clone();
        old_style["metadata"]["managedFields"][0]["fieldsV1"] =
            json!({"f:metadata": {"f:finalizers": {}}, "f:spec": {"f:imageId": {}}});
        let after = apply(Some(&old_style), &cfg("emi-1", None), "gitops", false, "t").expect("ok");
        assert_eq!(
            after["metadata"]["finalizers"],
            json!(["karri.dev/instance", "example.com/b"])
        );
    }

    #[test]
    fn owner_references_are_keyed_by_uid_each_owned_by_who_applied_it() {
        let owner = |uid: &str, controller: bool| {
            json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Account", "name": uid,
                "uid": uid, "controller": controller})
        };
        let with = |owners: Value| {
            let mut v = cfg("emi-1", None);
            v["metadata"]["ownerReferences"] = owners;
            v
        };
        let live = apply(
            None,
            &with(json!([owner("a", false)])),
            "gitops",
            false,
            "t",
        )
        .expect("ok");
        let both = apply(
            Some(&live),
            &with(json!([owner("b", false)])),
            "team",
            false,
            "t",
        )
        .expect("another owner is no conflict");
        assert_eq!(
            both["metadata"]["ownerReferences"],
            json!([owner("a", false), owner("b", false)])
        );
        let team = both["metadata"]["managedFields"]
            .as_array()
            .expect("managed fields")
            .iter()
            .find(|e| e["manager"] == "team")
            .expect("team's entry")
            .clone();
        assert_eq!(
            team["fieldsV1"]["f:metadata"]["f:ownerReferences"],
            json!({"k:{\"uid\":\"b\"}": {}})
        );
        // Changing an item another manager owns conflicts; forced, it replaces the item.
        let err = apply(
            Some(&both),
            &with(json!([owner("a", true)])),
            "team",
            false,
            "t",
        )
        .expect_err("conflict");
        assert_eq!(err[0].manager, "gitops");
        assert_eq!(err[0].field, ".metadata.ownerReferences.k:{\"uid\":\"a\"}");
        let forced = apply(
            Some(&both),
            &with(json!([owner("a", true)])),
            "team",
            true,
            "t",
        )
        .expect("forced");
        // (b is gone: team owned it alone and no longer names it.)
        assert_eq!(
            forced["metadata"]["ownerReferences"],
            json!([owner("a", true)])
        );
        // Dropping its owner takes only that one away.
        let dropped = apply(Some(&both), &cfg("emi-1", None), "team", false, "t").expect("ok");
        assert_eq!(
            dropped["metadata"]["ownerReferences"],
            json!([owner("a", false)])
        );
        // So does an empty list: it owns no owner, and leaves the others'.
        let emptied = apply(Some(&both), &with(json!([])), "team", false, "t").expect("ok");
        assert_eq!(
            emptied["metadata"]["ownerReferences"],
            json!([owner("a", false)])
        );
        // Records applied while the list was owned whole keep every owner.
        let mut old_style = both.clone();
        old_style["metadata"]["managedFields"][0]["fieldsV1"] =
            json!({"f:metadata": {"f:ownerReferences": {}}, "f:spec": {"f:imageId": {}}});
        let after = apply(Some(&old_style), &cfg("emi-1", None), "gitops", false, "t").expect("ok");
        assert_eq!(
            after["metadata"]["ownerReferences"],
            json!([owner("a", false), owner("b", false)])
        );
    }

    #[test]
    fn fields_v1_round_trips() {
        let set = field_set(&cfg("emi-1", Some("k")));
        assert_eq!(decode(&encode(&set)), set);
    }

    /// The manager names of `v`'s entries, in order.
    fn managers(v: &Value) -> Vec<String> {
        v["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["manager"].as_str().map(str::to_string))
            .collect()
    }

    /// The manager names of `v`'s entries that own the field at `path`.
    fn owners(v: &Value, path: &[&str]) -> Vec<String> {
        let path: Path = path.iter().map(|s| s.to_string()).collect();
        v["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| decode(&e["fieldsV1"]).contains(&path))
            .filter_map(|e| e["manager"].as_str().map(str::to_string))
            .collect()
    }

    #[test]
    fn a_create_by_update_owns_every_field_it_set() {
        let mut created = cfg("emi-1", Some("k"));
        record_update(None, &mut created, "kubectl-create", Scope::Main, "t1");
        let entries = created["metadata"]["managedFields"]
            .as_array()
            .expect("one entry");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["operation"], "Update");
        assert_eq!(entries[0]["time"], "t1");
        assert!(entries[0].get("subresource").is_none());
        for field in [
            &["spec", "imageId"][..],
            &["spec", "keyName"],
            &["metadata", "labels", "app"],
        ] {
            assert_eq!(owners(&created, field), ["kubectl-create"], "{field:?}");
        }
        assert!(owners(&created, &["metadata", "name"]).is_empty());
    }

    #[test]
    fn a_conflicting_manager_is_named_as_kube_names_it() {
        let named = |entry: Value| describe_manager(&entry);
        assert_eq!(
            named(
                json!({"manager": "gitops", "operation": "Apply", "apiVersion": "karri.dev/v1alpha1", "time": "t"})
            ),
            "\"gitops\""
        );
        assert_eq!(
            named(
                json!({"manager": "kubectl-edit", "operation": "Update", "apiVersion": "karri.dev/v1alpha1", "time": "2026-01-02T03:04:05Z"})
            ),
            "\"kubectl-edit\" using karri.dev/v1alpha1 at 2026-01-02T03:04:05Z"
        );
        assert_eq!(
            named(
                json!({"manager": "karri-operator", "operation": "Update", "apiVersion": "karri.dev/v1alpha1", "subresource": "status"})
            ),
            "\"karri-operator\" with subresource \"status\" using karri.dev/v1alpha1"
        );
    }

    #[test]
    fn an_update_takes_the_fields_it_changes_and_a_later_apply_conflicts_with_it() {
        let live = apply(None, &cfg("emi-1", None), "argo", false, "t1").expect("ok");
        let mut edited = live.clone();
        edited["spec"]["instanceType"] = json!("m1.large");
        record_update(Some(&live), &mut edited, "kubectl-edit", Scope::Main, "t2");
        assert_eq!(owners(&edited, &["spec", "instanceType"]), ["kubectl-edit"]);
        assert_eq!(owners(&edited, &["spec", "imageId"]), ["argo"]);
        // Re-applying the old manifest would undo the edit: a conflict, unless forced.
        let err = apply(Some(&edited), &cfg("emi-1", None), "argo", false, "t3")
            .expect_err("conflict with the edit");
        assert_eq!(err[0].manager, "kubectl-edit");
        assert_eq!(err[0].field, ".spec.instanceType");
        // Named as kube-apiserver names an update's manager: its API version and time.
        let version = edited["metadata"]["managedFields"][1]["apiVersion"].clone();
        assert_eq!(
            err[0].described,
            format!(
                "\"kubectl-edit\" using {} at t2",
                version.as_str().expect("a version")
            )
        );
        let forced = apply(Some(&edited), &cfg("emi-1", None), "argo", true, "t3").expect("forced");
        assert_eq!(forced["spec"]["instanceType"], "t1.micro");
        assert_eq!(owners(&forced, &["spec", "instanceType"]), ["argo"]);
        // The editor owned nothing else: its entry is gone.
        assert!(forced["metadata"]["managedFields"]
            .as_array()
            .expect("entries")
            .iter()
            .all(|e| e["manager"] != "kubectl-edit"));
    }

    #[test]
    fn a_field_an_update_removes_leaves_every_manager() {
        let live = apply(None, &cfg("emi-1", Some("k")), "argo", false, "t1").expect("ok");
        let mut edited = live.clone();
        edited["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("keyName");
        record_update(Some(&live), &mut edited, "kubectl-edit", Scope::Main, "t2");
        assert!(owners(&edited, &["spec", "keyName"]).is_empty());
        // Removing is no ownership: the editor has no entry.
        assert_eq!(managers(&edited), ["argo"]);
    }

    #[test]
    fn an_update_that_changes_nothing_leaves_the_managed_fields_as_they_were() {
        let mut live = cfg("emi-1", None);
        record_update(None, &mut live, "kubectl-create", Scope::Main, "t1");
        let mut same = live.clone();
        record_update(Some(&live), &mut same, "kubectl-edit", Scope::Main, "t2");
        assert_eq!(same, live);
        // A second change by the same manager merges into its entry and moves its time.
        let mut first = live.clone();
        first["spec"]["keyName"] = json!("a");
        record_update(Some(&live), &mut first, "ctl", Scope::Main, "t3");
        let mut second = first.clone();
        second["metadata"]["labels"]["tier"] = json!("db");
        record_update(Some(&first), &mut second, "ctl", Scope::Main, "t4");
        let ctl: Vec<&Value> = second["metadata"]["managedFields"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["manager"] == "ctl")
            .collect();
        assert_eq!(ctl.len(), 1);
        assert_eq!(ctl[0]["time"], "t4");
        assert_eq!(owners(&second, &["spec", "keyName"]), ["ctl"]);
        assert_eq!(owners(&second, &["metadata", "labels", "tier"]), ["ctl"]);
    }

    #[test]
    fn managed_fields_the_writer_sets_replace_the_live_ones_unless_empty() {
        let live = apply(None, &cfg("emi-1", None), "argo", false, "t1").expect("ok");
        // A PUT of a record built without managedFields, or with [], keeps them.
        for body_fields in [None, Some(json!([]))] {
            let mut put = cfg("emi-1", None);
            if let Some(f) = body_fields.clone() {
                put["metadata"]["managedFields"] = f;
            }
            record_update(Some(&live), &mut put, "client", Scope::Main, "t2");
            assert_eq!(
                put["metadata"]["managedFields"], live["metadata"]["managedFields"],
                "{body_fields:?}"
            );
        }
        // A list with one empty entry clears them.
        let mut reset = live.clone();
        reset["metadata"]["managedFields"] = json!([{}]);
        record_update(Some(&live), &mut reset, "client", Scope::Main, "t2");
        assert!(reset["metadata"].get("managedFields").is_none(), "{reset}");
        // Entries the writer rewrote are kept as written (kubectl's move to server-side apply).
        let mut renamed = live.clone();
        renamed["metadata"]["managedFields"][0]["manager"] = json!("kubectl");
        record_update(Some(&live), &mut renamed, "kubectl", Scope::Main, "t2");
        assert_eq!(owners(&renamed, &["spec", "imageId"]), ["kubectl"]);
    }

    #[test]
    fn a_status_write_is_recorded_under_its_subresource_and_keeps_the_live_entries() {
        let live = apply(None, &cfg("emi-1", None), "argo", false, "t1").expect("ok");
        let mut reported = live.clone();
        reported["status"] = json!({"state": "running", "conditions": [{"type": "Ready"}]});
        // A status write cannot rewrite the managed fields.
        reported["metadata"]["managedFields"] = json!([{}]);
        record_update(
            Some(&live),
            &mut reported,
            "node-agent",
            Scope::Status,
            "t2",
        );
        let entries = reported["metadata"]["managedFields"]
            .as_array()
            .expect("entries");
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(entries[1]["subresource"], "status");
        assert_eq!(owners(&reported, &["status", "state"]), ["node-agent"]);
        // Lists are atomic: the conditions list is one field.
        assert_eq!(owners(&reported, &["status", "conditions"]), ["node-agent"]);
        assert_eq!(owners(&reported, &["spec", "imageId"]), ["argo"]);
        // An update of the same manager to the record itself is another entry.
        let mut labelled = reported.clone();
        labelled["metadata"]["labels"]["x"] = json!("y");
        record_update(
            Some(&reported),
            &mut labelled,
            "node-agent",
            Scope::Main,
            "t3",
        );
        assert_eq!(
            labelled["metadata"]["managedFields"]
                .as_array()
                .expect("entries")
                .len(),
            3
        );
    }

    #[test]
    fn a_finalizer_an_update_adds_is_owned_item_by_item() {
        let live = apply(None, &cfg("emi-1", None), "argo", false, "t1").expect("ok");
        let mut added = live.clone();
        added["metadata"]["finalizers"] = json!(["karri.dev/instance"]);
        record_update(Some(&live), &mut added, "operator", Scope::Main, "t2");
        assert_eq!(
            owners(
                &added,
                &["metadata", "finalizers", r#"v:"karri.dev/instance""#]
            ),
            ["operator"]
        );
        let mut dropped = added.clone();
        dropped["metadata"]["finalizers"] = json!([]);
        record_update(Some(&added), &mut dropped, "operator", Scope::Main, "t3");
        assert_eq!(managers(&dropped), ["argo"]);
    }

    /// A record as client-side `kubectl apply` creates it from `config`.
    fn client_side_applied(config: &Value) -> Value {
        let mut made = config.clone();
        made["metadata"]["annotations"] = json!({ LAST_APPLIED: config.to_string() });
        record_update(
            None,
            &mut made,
            "kubectl-client-side-apply",
            Scope::Main,
            "t1",
        );
        made
    }

    #[test]
    fn kubectl_server_side_apply_takes_over_what_client_side_apply_set() {
        let live = client_side_applied(&cfg("emi-1", None));
        let moved = apply(Some(&live), &cfg("emi-2", None), "kubectl", false, "t2")
            .expect("no conflict: the client-side apply set the image and nobody changed it");
        assert_eq!(moved["spec"]["imageId"], "emi-2");
        assert_eq!(owners(&moved, &["spec", "imageId"]), ["kubectl"]);
        // The annotation follows what was applied, for a later client-side apply.
        let annotation = moved["metadata"]["annotations"][LAST_APPLIED]
            .as_str()
            .expect("the annotation stays");
        let recorded: Value = serde_json::from_str(annotation).expect("JSON");
        assert_eq!(recorded["spec"]["imageId"], "emi-2");
        // Another manager gets no such pass.
        let err = apply(Some(&live), &cfg("emi-2", None), "argo", false, "t2")
            .expect_err("a conflict for any other manager");
        assert_eq!(err[0].manager, "kubectl-client-side-apply");
    }

    #[test]
    fn a_field_changed_since_the_client_side_apply_still_conflicts() {
        let live = client_side_applied(&cfg("emi-1", None));
        let mut edited = live.clone();
        edited["spec"]["imageId"] = json!("emi-7");
        record_update(Some(&live), &mut edited, "kubectl-edit", Scope::Main, "t2");
        let err = apply(Some(&edited), &cfg("emi-2", None), "kubectl", false, "t3")
            .expect_err("the edit is not the client-side apply's to give away");
        assert_eq!(err[0].manager, "kubectl-edit");
        // A record without the annotation gives no pass either.
        let mut plain = cfg("emi-1", None);
        record_update(None, &mut plain, "kubectl-create", Scope::Main, "t1");
        apply(Some(&plain), &cfg("emi-2", None), "kubectl", false, "t2")
            .expect_err("a conflict with kubectl-create");
    }

    #[test]
    fn past_ten_update_managers_the_oldest_merge_into_ancient_changes() {
        let mut record = cfg("emi-1", None);
        record_update(
            None,
            &mut record,
            "creator",
            Scope::Main,
            "2026-01-01T00:00:00Z",
        );
        for i in 0..12 {
            let mut next = record.clone();
            next["metadata"]["labels"][format!("l{i}")] = json!("x");
            let now = format!("2026-01-01T00:00:{:02}Z", i + 1);
            record_update(
                Some(&record),
                &mut next,
                &format!("m{i}"),
                Scope::Main,
                &now,
            );
            record = next;
        }
        let entries = record["metadata"]["managedFields"]
            .as_array()
            .expect("entries");
        assert_eq!(entries.len(), MAX_UPDATE_MANAGERS);
        let ancient = entries
            .iter()
            .find(|e| e["manager"] == ANCIENT_CHANGES)
            .expect("an ancient-changes entry");
        // The creator and m0..m2 went into it: their fields, the latest of their times.
        assert_eq!(ancient["time"], "2026-01-01T00:00:03Z");
        for field in [
            &["spec", "imageId"][..],
            &["metadata", "labels", "l0"],
            &["metadata", "labels", "l2"],
        ] {
            assert_eq!(owners(&record, field), [ANCIENT_CHANGES], "{field:?}");
        }
        assert_eq!(owners(&record, &["metadata", "labels", "l3"]), ["m3"]);
        assert_eq!(owners(&record, &["metadata", "labels", "l11"]), ["m11"]);
    }

    #[test]
    fn owning_a_maps_presence_does_not_own_what_others_put_in_it() {
        let with_empty = {
            let mut v = cfg("emi-1", None);
            v["spec"]["metadataOptions"] = json!({});
            v
        };
        // An update made the empty map; an applier then sets a field inside it: no conflict.
        let mut made = with_empty.clone();
        record_update(None, &mut made, "kubectl-create", Scope::Main, "t1");
        let mut tokens = cfg("emi-1", None);
        tokens["spec"]["metadataOptions"] = json!({"httpTokens": "required"});
        let applied = apply(Some(&made), &tokens, "argo", false, "t2").expect("no conflict");
        assert_eq!(applied["spec"]["metadataOptions"]["httpTokens"], "required");
        // An applier that asks only for the (now filled) map does not conflict with the field.
        apply(Some(&applied), &with_empty, "flux", false, "t3").expect("no conflict either");
    }

    #[test]
    fn a_change_inside_an_owner_reference_is_owned_by_who_made_it() {
        let reference = |controller: bool| {
            json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "o",
                "uid": "u-1", "controller": controller}])
        };
        let mut with_owner = cfg("emi-1", None);
        with_owner["metadata"]["ownerReferences"] = reference(false);
        let live = apply(None, &with_owner, "argo", false, "t1").expect("ok");
        let mut edited = live.clone();
        edited["metadata"]["ownerReferences"] = reference(true);
        record_update(Some(&live), &mut edited, "kubectl-edit", Scope::Main, "t2");
        let path = ["metadata", "ownerReferences", r#"k:{"uid":"u-1"}"#];
        assert_eq!(owners(&edited, &path), ["kubectl-edit"]);
        let err = apply(Some(&edited), &with_owner, "argo", false, "t3")
            .expect_err("undoing the edit conflicts");
        assert_eq!(err[0].manager, "kubectl-edit");
    }

    #[test]
    fn kubectl_is_told_only_the_conflicts_client_side_apply_does_not_explain() {
        let mut live = client_side_applied(&cfg("emi-1", None));
        // Another writer changed the type since; the image is still as last applied.
        let mut edited = live.clone();
        edited["spec"]["instanceType"] = json!("m1.large");
        record_update(Some(&live), &mut edited, "kubectl-edit", Scope::Main, "t2");
        live = edited;
        let mut wanted = cfg("emi-2", None);
        wanted["spec"]["instanceType"] = json!("m1.small");
        let err = apply(Some(&live), &wanted, "kubectl", false, "t3").expect_err("one conflict");
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].field, ".spec.instanceType");
    }
}
