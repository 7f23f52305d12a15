//! What instances take of a node: the arithmetic placement (in the operator) and the gateway's
//! check of an instance type change share. Pure.
//!
//! Every bound instance that is not `terminated` holds the room of its instance type on its node,
//! stopped ones included: stop and start keep an instance on its node.

use std::collections::BTreeMap;

use crate::{Instance, InstanceState, InstanceTypeSpec, NodeResources};

/// vCPUs, memory and instance disk: what an instance type asks for, or what a node offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Instance disk in GiB (an instance type's `diskGiB`: its disks may grow that large).
    pub disk_gib: u64,
}

impl Resources {
    /// `vcpus` vCPUs and `memory_mib` MiB, no disk.
    pub fn new(vcpus: u32, memory_mib: u64) -> Self {
        Self {
            vcpus,
            memory_mib,
            disk_gib: 0,
        }
    }

    /// `self` with `disk_gib` GiB of disk.
    pub fn with_disk(self, disk_gib: u64) -> Self {
        Self { disk_gib, ..self }
    }

    /// What is left of `self` once `other` is taken, never below zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }

    /// Whether `self` has room for the vCPUs, the memory and the disk of `need`.
    pub fn covers(self, need: Resources) -> bool {
        self.vcpus >= need.vcpus
            && self.memory_mib >= need.memory_mib
            && self.disk_gib >= need.disk_gib
    }
}

impl From<&InstanceTypeSpec> for Resources {
    fn from(spec: &InstanceTypeSpec) -> Self {
        Self::new(spec.vcpus, spec.memory_mib).with_disk(spec.disk_gib)
    }
}

impl From<&NodeResources> for Resources {
    /// A node that reports no disk (`diskGiB` 0: a record written before agents measured it)
    /// is not limited by disk.
    fn from(resources: &NodeResources) -> Self {
        let disk = if resources.disk_gib == 0 {
            u64::MAX
        } else {
            resources.disk_gib
        };
        Self::new(resources.vcpus, resources.memory_mib).with_disk(disk)
    }
}

/// What the instances bound to one node take from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// vCPUs, memory and disk of the bound instances' types, summed.
    pub resources: Resources,
    /// How many instances are bound (compared with the node's `maxInstances`).
    pub instances: u32,
}

impl Usage {
    /// Adds one instance of size `resources`.
    pub fn add(&mut self, resources: Resources) {
        self.resources.vcpus = self.resources.vcpus.saturating_add(resources.vcpus);
        self.resources.memory_mib = self
            .resources
            .memory_mib
            .saturating_add(resources.memory_mib);
        self.resources.disk_gib = self.resources.disk_gib.saturating_add(resources.disk_gib);
        self.instances = self.instances.saturating_add(1);
    }
}

/// Whether an instance still holds capacity on the node it is bound to: every bound instance
/// that is not `terminated` does, stopped ones included (stop/start keeps an instance on its
/// node, so its room stays reserved), and so do records being deleted until the agent has
/// removed their domain and the record is gone.
pub fn holds_capacity(instance: &Instance) -> bool {
    instance
        .status
        .as_ref()
        .is_some_and(|s| s.node_name.is_some() && s.state != InstanceState::Terminated)
}

/// What each node has in use, by node name: the sum of the instance types of the instances bound
/// to it that [`holds_capacity`]. An instance whose type is not in `types` (deleted after
/// placement, in a gateway before types in use were kept) is counted with no vCPUs, memory or
/// disk, but still counts against `maxInstances`.
pub fn usage<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
    types: &BTreeMap<String, InstanceTypeSpec>,
) -> BTreeMap<String, Usage> {
    let mut used: BTreeMap<String, Usage> = BTreeMap::new();
    for instance in instances.into_iter().filter(|i| holds_capacity(i)) {
        let Some(node) = instance.status.as_ref().and_then(|s| s.node_name.as_ref()) else {
            continue;
        };
        let size = types
            .get(&instance.spec.instance_type)
            .map(Resources::from)
            .unwrap_or_default();
        used.entry(node.clone()).or_default().add(size);
    }
    used
}

/// An instance type change that its node has no room for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoom {
    /// The node the instance is bound to.
    pub node: String,
    /// What the node's other instances leave free.
    pub free: Resources,
    /// What the new instance type needs.
    pub need: Resources,
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A node not limited by disk (see `From<&NodeResources>`) shows none.
        let disk_limited = self.free.disk_gib < u64::MAX / 2;
        let disk = |gib: u64| {
            if disk_limited {
                format!(", {gib} GiB of disk")
            } else {
                String::new()
            }
        };
        write!(
            f,
            "node {} has {} vCPUs, {} MiB{} free beside its other instances, and the instance type needs {} vCPUs, {} MiB{}",
            self.node,
            self.free.vcpus,
            self.free.memory_mib,
            disk(self.free.disk_gib),
            self.need.vcpus,
            self.need.memory_mib,
            disk(self.need.disk_gib),
        )
    }
}

/// Whether the instance with UID `uid`, bound to `node` whose allocatable resources are
/// `allocatable`, may grow to `need` there: what the node's other instances (of `instances`) hold
/// must leave room for it. An instance is never moved off its node, so a type it would not fit
/// in is refused before it starts. Pure.
pub fn room_for_resize<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
    types: &BTreeMap<String, InstanceTypeSpec>,
    uid: &str,
    node: &str,
    allocatable: Resources,
    need: Resources,
) -> Result<(), NoRoom> {
    let others = instances
        .into_iter()
        .filter(|i| i.metadata.uid.as_deref() != Some(uid));
    let used = usage(others, types).remove(node).unwrap_or_default();
    let free = allocatable.saturating_sub(used.resources);
    if free.covers(need) {
        Ok(())
    } else {
        Err(NoRoom {
            node: node.to_owned(),
            free,
            need,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InstanceSpec, InstanceStatus};

    fn instance(uid: &str, itype: &str, node: &str, state: InstanceState) -> Instance {
        let mut i = Instance::new(
            uid,
            InstanceSpec {
                image_id: "emi-0123456789abcdef0".into(),
                instance_type: itype.into(),
                ..Default::default()
            },
        );
        i.metadata.uid = Some(uid.into());
        i.status = Some(InstanceStatus {
            node_name: Some(node.into()),
            state,
            ..Default::default()
        });
        i
    }

    #[test]
    fn a_node_that_reports_no_disk_is_not_limited_by_disk_and_usage_sums_disks() {
        let reported = |disk_gib| NodeResources {
            vcpus: 4,
            memory_mib: 4096,
            disk_gib,
        };
        let need = Resources::new(1, 512).with_disk(500);
        assert!(Resources::from(&reported(0)).covers(need));
        assert!(!Resources::from(&reported(100)).covers(need));
        assert!(Resources::from(&reported(500)).covers(need));
        let mut used = Usage::default();
        used.add(Resources::new(1, 512).with_disk(10));
        used.add(Resources::new(2, 1024).with_disk(20));
        assert_eq!(used.resources, Resources::new(3, 1536).with_disk(30));
        let free = Resources::from(&reported(25)).saturating_sub(used.resources);
        assert_eq!(free.disk_gib, 0, "never below zero");
    }

    #[test]
    fn a_resize_fits_only_in_the_room_the_nodes_other_instances_leave() {
        let types: BTreeMap<String, InstanceTypeSpec> = [("small", 1, 512), ("large", 4, 4096)]
            .into_iter()
            .map(|(name, vcpus, memory_mib)| {
                (
                    name.to_owned(),
                    InstanceTypeSpec {
                        vcpus,
                        memory_mib,
                        disk_gib: 10,
                        description: None,
                    },
                )
            })
            .collect();
        let node = Resources::new(6, 6144);
        use InstanceState::*;
        // (what, the node's instances, the one resized, its new size, fits)
        let rows: Vec<(&str, Vec<Instance>, Resources, bool)> = vec![
            (
                "alone on the node",
                vec![instance("me", "small", "n1", Stopped)],
                Resources::new(4, 4096),
                true,
            ),
            (
                "its own old size is not counted",
                vec![
                    instance("me", "large", "n1", Stopped),
                    instance("a", "small", "n1", Running),
                ],
                Resources::new(5, 5632),
                true,
            ),
            (
                "another large instance leaves too little CPU",
                vec![
                    instance("me", "small", "n1", Stopped),
                    instance("a", "large", "n1", Running),
                ],
                Resources::new(4, 1024),
                false,
            ),
            (
                "stopped neighbours keep their room",
                vec![
                    instance("me", "small", "n1", Stopped),
                    instance("a", "large", "n1", Stopped),
                ],
                Resources::new(1, 4096),
                false,
            ),
            (
                "terminated neighbours and other nodes' instances take nothing",
                vec![
                    instance("me", "small", "n1", Stopped),
                    instance("a", "large", "n1", Terminated),
                    instance("b", "large", "n2", Running),
                ],
                Resources::new(6, 6144),
                true,
            ),
        ];
        for (what, instances, need, fits) in rows {
            let got = room_for_resize(&instances, &types, "me", "n1", node, need);
            assert_eq!(got.is_ok(), fits, "{what}: {got:?}");
        }
        let refused = room_for_resize(
            &[instance("a", "large", "n1", Running)],
            &types,
            "me",
            "n1",
            node,
            Resources::new(4, 4096),
        )
        .expect_err("no room");
        assert_eq!(refused.free, Resources::new(2, 2048));
        assert!(
            refused.to_string().contains("node n1 has 2 vCPUs"),
            "{refused}"
        );
    }
}
