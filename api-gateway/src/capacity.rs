//! The room on the nodes, as the gateway checks it: for an EC2 launch ([`launch_room`], from
//! the claims the watch cache keeps counted) and for instance type changes.
//!
//! Instance type changes are checked against the room on the instance's node. An instance stays on
//! the node it was placed on (through stop and start), so a larger type that the node cannot
//! hold beside its other instances is refused when it is asked for, for every face: EC2's
//! ModifyInstanceAttribute answers `InsufficientInstanceCapacity`, the resource API 403.
//! An instance type that instances hold room by cannot be deleted or shrunk under them: their
//! nodes' room would be under-counted (409). The arithmetic is placement's (`crds::capacity`);
//! the records come from the watch cache.

use std::collections::BTreeMap;

use crds::capacity::{self, Resources};
use crds::{Instance, InstanceTypeSpec, NodeResources};
use serde_json::Value;

use crate::cache::WatchCache;
use crate::error::ApiError;
use crate::store;

/// The refusal of the change from `current` to `next` of an Instance record, when it gives a
/// bound instance a type its node has no room for; `None` when the change may be made (the
/// type is unchanged, the instance holds no room, or a record the check needs is unknown: an
/// unknown type is refused by the faces themselves).
pub fn resize_refusal(cache: &WatchCache, current: &Value, next: &Value) -> Option<ApiError> {
    fn type_of(v: &Value) -> Option<&str> {
        v.pointer("/spec/instanceType").and_then(Value::as_str)
    }
    let (old, new) = (type_of(current)?, type_of(next)?);
    if old == new {
        return None;
    }
    let instance: Instance = serde_json::from_value(current.clone()).ok()?;
    if !capacity::holds_capacity(&instance) {
        return None;
    }
    let node = instance.status.as_ref()?.node_name.clone()?;
    let uid = instance.metadata.uid.clone()?;
    let types: BTreeMap<String, InstanceTypeSpec> = cache
        .list("instancetypes", &store::kind_prefix("instancetypes"))
        .0
        .iter()
        .filter_map(|o| {
            let name = o.value.pointer("/metadata/name")?.as_str()?.to_owned();
            Some((
                name,
                serde_json::from_value(o.value.get("spec")?.clone()).ok()?,
            ))
        })
        .collect();
    let need = Resources::from(types.get(new)?);
    let node_record = cache.get("nodes", &store::record_key("nodes", None, &node))?;
    let allocatable: NodeResources =
        serde_json::from_value(node_record.value.pointer("/status/allocatable")?.clone()).ok()?;
    let (all, _) = cache.list("instances", &store::kind_prefix("instances"));
    let on_node: Vec<Instance> = all
        .iter()
        .filter(|o| o.value.pointer("/status/nodeName").and_then(Value::as_str) == Some(&node))
        .filter_map(|o| serde_json::from_value(o.value.clone()).ok())
        .collect();
    capacity::room_for_resize(
        &on_node,
        &types,
        &uid,
        &node,
        Resources::from(&allocatable),
        need,
    )
    .err()
    .map(|no_room| {
        ApiError::insufficient_capacity(format!(
            "There is not enough capacity for instance type {new}: {no_room}. An instance stays on its node; terminate other instances there or launch a new instance of type {new}."
        ))
    })
}

/// The instances (`namespace/name`) of `instances` of type `type_name` that hold room on a node
/// ([`capacity::holds_capacity`]), sorted. Pure.
pub fn holders<'a>(instances: impl IntoIterator<Item = &'a Value>, type_name: &str) -> Vec<String> {
    let mut held: Vec<String> = instances
        .into_iter()
        .filter(|v| v.pointer("/spec/instanceType").and_then(Value::as_str) == Some(type_name))
        .filter_map(|v| {
            let instance: Instance = serde_json::from_value(v.clone()).ok()?;
            capacity::holds_capacity(&instance).then(|| {
                format!(
                    "{}/{}",
                    instance.metadata.namespace.unwrap_or_default(),
                    instance.metadata.name.unwrap_or_default()
                )
            })
        })
        .collect();
    held.sort();
    held
}

/// The refusal of `what` (deleting or shrinking) instance type `name` while `held` instances
/// hold room by it.
fn in_use(name: &str, what: &str, held: &[String]) -> ApiError {
    const SHOWN: usize = 5;
    let mut listed = held
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if held.len() > SHOWN {
        listed.push_str(&format!(" and {} more", held.len() - SHOWN));
    }
    let count = match held.len() {
        1 => "1 instance of it holds room on its node".to_owned(),
        n => format!("{n} instances of it hold room on their nodes"),
    };
    ApiError::conflict_message(format!(
        "instancetypes.{} {name:?} cannot be {what}: {count} ({listed}); terminate them or change their type first",
        crds::GROUP,
    ))
}

/// The refusal of deleting instance type `name` while instances hold room by it.
pub fn type_delete_refusal(cache: &WatchCache, name: &str) -> Option<ApiError> {
    let (all, _) = cache.list("instances", &store::kind_prefix("instances"));
    let held = holders(all.iter().map(|o| &o.value), name);
    (!held.is_empty()).then(|| in_use(name, "deleted", &held))
}

/// Whether a change from `current` to `next` of an InstanceType record gives it fewer vCPUs,
/// less memory or less disk. Pure.
pub fn type_shrinks(current: &Value, next: &Value) -> bool {
    let size = |v: &Value| -> Option<InstanceTypeSpec> {
        serde_json::from_value(v.get("spec")?.clone()).ok()
    };
    let (Some(old), Some(new)) = (size(current), size(next)) else {
        return false;
    };
    new.vcpus < old.vcpus || new.memory_mib < old.memory_mib || new.disk_gib < old.disk_gib
}

/// Whether the checks of a write from `current` to `next` of a `kind` record read the instances
/// in the cache: a resize, a type shrunk, a type's last finalizer removed. Pure.
pub fn reads_instances(kind: &str, current: &Value, next: &Value) -> bool {
    let type_of = |v: &Value| v.pointer("/spec/instanceType").cloned();
    match kind {
        "Instance" => type_of(current) != type_of(next),
        "InstanceType" => type_shrinks(current, next) || crate::admission::ready_to_delete(next),
        _ => false,
    }
}

/// The refusal of a change from `current` to `next` of an InstanceType record that gives it
/// fewer vCPUs, less memory or less disk while instances hold room by it (growing it is placement's
/// concern: it may overfill a node, as a resize would, and is left to the administrator).
pub fn type_change_refusal(cache: &WatchCache, current: &Value, next: &Value) -> Option<ApiError> {
    if !type_shrinks(current, next) {
        return None;
    }
    let name = current.pointer("/metadata/name").and_then(Value::as_str)?;
    let (all, _) = cache.list("instances", &store::kind_prefix("instances"));
    let held = holders(all.iter().map(|o| &o.value), name);
    (!held.is_empty()).then(|| in_use(name, "shrunk", &held))
}

/// What one Instance record takes, or is about to take, of the nodes' room, as an EC2 launch
/// counts it (the cache keeps these counted: [`WatchCache::claims`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Claim {
    /// Bound to `node` and holding room there ([`capacity::holds_capacity`]).
    Held {
        /// The node it is bound to.
        node: String,
        /// Its instance type.
        instance_type: String,
    },
    /// Not placed yet, neither terminated nor on its way out: placement will give it room in
    /// `zone` (any zone when `None`).
    Awaiting {
        /// The zone it asks for.
        zone: Option<String>,
        /// Its instance type.
        instance_type: String,
    },
}

/// The claim of an Instance record on the nodes' room, `None` when it holds none and will not.
/// Pure.
pub fn claim_of(record: &Value) -> Option<Claim> {
    let text = |pointer: &str| record.pointer(pointer).and_then(Value::as_str);
    let instance_type = text("/spec/instanceType")?.to_owned();
    let terminated = text("/status/state") == Some(crds::InstanceState::Terminated.as_str());
    if let Some(node) = text("/status/nodeName") {
        return (!terminated).then(|| Claim::Held {
            node: node.to_owned(),
            instance_type,
        });
    }
    let leaving = terminated
        || record.pointer("/metadata/deletionTimestamp").is_some()
        || text("/spec/desiredState") == Some(crds::DesiredState::Terminated.as_str());
    (!leaving).then(|| Claim::Awaiting {
        zone: text("/spec/availabilityZone").map(str::to_owned),
        instance_type,
    })
}

/// How many instances of type `instance_type` (at most `most`) each zone could take now, by
/// zone name ([`capacity::launch_room`]), from the nodes, instance types and claims in the
/// cache. A zone without nodes is absent; an unknown type has room nowhere.
pub fn launch_room(cache: &WatchCache, instance_type: &str, most: u32) -> BTreeMap<String, u32> {
    let types: BTreeMap<String, Resources> = cache
        .list("instancetypes", &store::kind_prefix("instancetypes"))
        .0
        .iter()
        .filter_map(|o| {
            let name = o.value.pointer("/metadata/name")?.as_str()?.to_owned();
            let spec: InstanceTypeSpec =
                serde_json::from_value(o.value.get("spec")?.clone()).ok()?;
            Some((name, Resources::from(&spec)))
        })
        .collect();
    let Some(&need) = types.get(instance_type) else {
        return BTreeMap::new();
    };
    // A type deleted under its instances takes no room but still counts an instance.
    let size = |t: &str| types.get(t).copied().unwrap_or_default();
    let mut used: BTreeMap<String, capacity::Usage> = BTreeMap::new();
    let mut awaiting = Vec::new();
    for (claim, count) in cache.claims() {
        match claim {
            Claim::Held {
                node,
                instance_type,
            } => {
                let usage = used.entry(node).or_default();
                for _ in 0..count {
                    usage.add(size(&instance_type));
                }
            }
            Claim::Awaiting {
                zone,
                instance_type,
            } => awaiting.push(capacity::Awaiting {
                zone,
                resources: size(&instance_type),
                count,
            }),
        }
    }
    let nodes: Vec<capacity::NodeView> = cache
        .list("nodes", &store::kind_prefix("nodes"))
        .0
        .iter()
        .filter_map(|o| serde_json::from_value::<crds::Node>(o.value.clone()).ok())
        .filter_map(|node| capacity::NodeView::from_node(&node, &used))
        .collect();
    capacity::launch_room(&nodes, &awaiting, need, most)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_writes_whose_checks_read_instances_wait_for_the_cache_and_are_fenced() {
        let itype = |vcpus: u32, deleting: bool, finalizers: &[&str]| {
            let mut v = json!({"metadata": {"name": "t", "finalizers": finalizers},
                "spec": {"vcpus": vcpus, "memoryMiB": 512, "diskGiB": 1}});
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-11-26T00:00:00Z");
            }
            v
        };
        let inst = |t: &str, key: &str| json!({"metadata": {"name": "i"}, "spec": {"instanceType": t, "keyName": key}});
        let rows = [
            (
                "Instance",
                inst("m1.small", "a"),
                inst("m1.large", "a"),
                true,
            ),
            (
                "Instance",
                inst("m1.small", "a"),
                inst("m1.small", "b"),
                false,
            ),
            (
                "InstanceType",
                itype(2, false, &[]),
                itype(1, false, &[]),
                true,
            ),
            (
                "InstanceType",
                itype(1, false, &[]),
                itype(2, false, &[]),
                false,
            ),
            (
                "InstanceType",
                itype(2, true, &["x"]),
                itype(2, true, &[]),
                true,
            ),
            (
                "InstanceType",
                itype(2, true, &["x", "y"]),
                itype(2, true, &["x"]),
                false,
            ),
            ("Node", json!({}), json!({}), false),
        ];
        for (i, (kind, current, next, reads)) in rows.iter().enumerate() {
            assert_eq!(reads_instances(kind, current, next), *reads, "row {i}");
        }
    }

    fn instance(ns: &str, name: &str, itype: &str, node: Option<&str>, state: &str) -> Value {
        let mut v = json!({
            "apiVersion": crds::API_VERSION,
            "kind": "Instance",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": itype},
            "status": {"state": state},
        });
        if let Some(node) = node {
            v["status"]["nodeName"] = json!(node);
        }
        v
    }

    #[test]
    fn only_bound_instances_not_terminated_hold_room_by_their_type() {
        let all = [
            instance("b", "i-2", "m1.small", Some("n1"), "running"),
            instance("a", "i-1", "m1.small", Some("n1"), "stopped"),
            instance("a", "i-3", "m1.small", None, "pending"),
            instance("a", "i-4", "m1.small", Some("n2"), "terminated"),
            instance("a", "i-5", "c1.medium", Some("n1"), "running"),
        ];
        assert_eq!(holders(&all, "m1.small"), ["a/i-1", "b/i-2"]);
        assert!(holders(&all, "m1.large").is_empty());
    }

    #[test]
    fn the_refusal_names_a_few_holders_and_counts_the_rest() {
        let held: Vec<String> = (1..=7).map(|i| format!("a/i-{i}")).collect();
        let e = in_use("m1.small", "deleted", &held);
        assert_eq!(e.code, 409);
        assert!(
            e.message.contains("7 instances of it hold room"),
            "{}",
            e.message
        );
        assert!(e.message.contains("a/i-5 and 2 more"), "{}", e.message);
        let one = in_use("m1.small", "shrunk", &held[..1]);
        assert!(
            one.message
                .contains("1 instance of it holds room on its node"),
            "{}",
            one.message
        );
    }
    #[test]
    fn an_instance_claims_room_on_its_node_or_awaits_it_until_it_leaves() {
        use serde_json::json;
        let held = |node: &str| Claim::Held {
            node: node.into(),
            instance_type: "m1.small".into(),
        };
        let awaiting = |zone: Option<&str>| Claim::Awaiting {
            zone: zone.map(str::to_owned),
            instance_type: "m1.small".into(),
        };
        let rows = [
            (
                json!({"spec": {"instanceType": "m1.small"}}),
                Some(awaiting(None)),
            ),
            (
                json!({"spec": {"instanceType": "m1.small", "availabilityZone": "karri-1a"},
                       "status": {"state": "pending"}}),
                Some(awaiting(Some("karri-1a"))),
            ),
            (
                json!({"spec": {"instanceType": "m1.small", "desiredState": "terminated"}}),
                None,
            ),
            (
                json!({"metadata": {"deletionTimestamp": "2026-11-27T00:00:00Z"},
                       "spec": {"instanceType": "m1.small"}}),
                None,
            ),
            (
                json!({"spec": {"instanceType": "m1.small"},
                       "status": {"state": "stopped", "nodeName": "node-1"}}),
                Some(held("node-1")),
            ),
            (
                json!({"metadata": {"deletionTimestamp": "2026-11-27T00:00:00Z"},
                       "spec": {"instanceType": "m1.small", "desiredState": "terminated"},
                       "status": {"state": "shutting-down", "nodeName": "node-1"}}),
                Some(held("node-1")),
            ),
            (
                json!({"spec": {"instanceType": "m1.small"},
                       "status": {"state": "terminated", "nodeName": "node-1"}}),
                None,
            ),
            (json!({"spec": {}}), None),
        ];
        for (record, want) in rows {
            assert_eq!(claim_of(&record), want, "{record}");
        }
    }
}
