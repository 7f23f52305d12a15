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
    /// The field, dotted.
    pub field: String,
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
        if get(&result, p) == get(applied, p) {
            // Applying the value a field already has shares ownership without conflict.
            continue;
        }
        for (entry, owned, _) in others.iter_mut() {
            if !is_apply(entry) {
                continue;
            }
            let clash: Vec<Path> = owned.iter().filter(|o| overlaps(o, p)).cloned().collect();
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
                    field: format!(".{}", p.join(".")),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    for stale in mine_prev.difference(&wanted) {
        let still_owned = others
            .iter()
            .any(|(_, s, _)| s.iter().any(|o| overlaps(o, stale)));
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
        .filter(|(e, s, _)| !is_apply(e) || !s.is_empty())
        .map(|(mut e, s, before)| {
            if is_apply(&e) {
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
    Ok(result)
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
}
