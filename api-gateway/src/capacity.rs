//! Instance type changes checked against the room on the instance's node. An instance stays on
//! the node it was placed on (through stop and start), so a larger type that the node cannot
//! hold beside its other instances is refused when it is asked for, for every face: EC2's
//! ModifyInstanceAttribute answers `InsufficientInstanceCapacity`, the resource API 403.
//! The arithmetic is placement's (`crds::capacity`); the records come from the watch cache.

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
