//! What instances take of a node: the arithmetic placement (in the operator) and the gateway's
//! checks of an instance type change and of an EC2 launch share. Pure.
//!
//! Every bound instance that is not `terminated` holds the room of its instance type on its node,
//! stopped ones included: stop and start keep an instance on its node.

use std::collections::BTreeMap;

use crate::common::is_condition_true;
use crate::{Instance, InstanceState, InstanceTypeSpec, Node, NodeResources, CONDITION_READY};

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

/// What placement needs to know about one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Node name (`metadata.name`), what `status.nodeName` will hold.
    pub name: String,
    /// Zone the node belongs to (`spec.availabilityZone`).
    pub zone: String,
    /// Whether the node's `Ready` condition is `True`.
    pub ready: bool,
    /// Whether an administrator drained the node (`spec.unschedulable`).
    pub unschedulable: bool,
    /// Most instances the node may hold (`spec.hypervisor.maxInstances`), if limited.
    pub max_instances: Option<u32>,
    /// Resources available to instances (`status.allocatable`).
    pub allocatable: Resources,
    /// What the instances bound to the node already take (see [`usage`]).
    pub used: Usage,
}

impl NodeView {
    /// The view of `node`, with `used` looked up by name in the result of [`usage`]; `None` for a
    /// record without a name. A node that has not reported `status.allocatable` offers nothing.
    pub fn from_node(node: &Node, used: &BTreeMap<String, Usage>) -> Option<Self> {
        let name = node.metadata.name.clone()?;
        let status = node.status.as_ref();
        Some(Self {
            zone: node.spec.availability_zone.clone(),
            ready: status.is_some_and(|s| is_condition_true(&s.conditions, CONDITION_READY)),
            unschedulable: node.spec.unschedulable,
            max_instances: node.spec.hypervisor.as_ref().and_then(|h| h.max_instances),
            allocatable: status
                .and_then(|s| s.allocatable.as_ref())
                .map(Resources::from)
                .unwrap_or_default(),
            used: used.get(&name).copied().unwrap_or_default(),
            name,
        })
    }

    /// What is still free on the node.
    pub fn free(&self) -> Resources {
        self.allocatable.saturating_sub(self.used.resources)
    }

    /// Whether the node accepts new instances at all: Ready and schedulable.
    pub fn schedulable(&self) -> bool {
        self.ready && !self.unschedulable
    }

    /// Whether an instance of size `need` fits: schedulable, below `maxInstances`, and room for
    /// its vCPUs, its memory and its disk.
    pub fn fits(&self, need: Resources) -> bool {
        self.schedulable()
            && self
                .max_instances
                .is_none_or(|max| self.used.instances < max)
            && self.free().covers(need)
    }

    /// Counts an instance of size `need` as bound here. The operator calls this for each binding
    /// it has written but not yet seen come back through its watch, so that two placements in a
    /// row never both take the same room.
    pub fn assume(&mut self, need: Resources) {
        self.used.add(need);
    }
}

/// How many more instances of size `need` fit on `node` now, at most `most`: none on a node
/// that is not schedulable; else what its `maxInstances` and each of its free vCPUs, memory and
/// disk leave room for (a dimension `need` does not ask for limits nothing).
pub fn room_on(node: &NodeView, need: Resources, most: u32) -> u32 {
    if !node.schedulable() {
        return 0;
    }
    let free = node.free();
    let by = |free: u64, need: u64| free.checked_div(need).unwrap_or(u64::MAX);
    let slots = node.max_instances.map_or(u64::MAX, |max| {
        u64::from(max.saturating_sub(node.used.instances))
    });
    let room = slots
        .min(by(u64::from(free.vcpus), u64::from(need.vcpus)))
        .min(by(free.memory_mib, need.memory_mib))
        .min(by(free.disk_gib, need.disk_gib));
    u32::try_from(room.min(u64::from(most))).unwrap_or(most)
}

/// Instances not placed yet, all of one size and one zone (`None`: any zone): they will take
/// room that a new launch must not count on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Awaiting {
    /// The zone they must go to, if any.
    pub zone: Option<String>,
    /// The size of their instance type.
    pub resources: Resources,
    /// How many.
    pub count: u32,
}

/// How many instances of size `need` (at most `most`) each zone could take now, by zone name:
/// the room of its nodes ([`room_on`]) once the instances still `awaiting` placement are counted
/// on the first nodes (in name order, in their zone) that fit them, as placement could put
/// them there: those bound to a zone first, then those free to go anywhere, larger ones first. A zone without nodes is absent. What an EC2 launch checks before it makes
/// records that no node could take. Pure.
pub fn launch_room(
    nodes: &[NodeView],
    awaiting: &[Awaiting],
    need: Resources,
    most: u32,
) -> BTreeMap<String, u32> {
    let mut nodes: Vec<NodeView> = nodes.to_vec();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    // Those bound to a zone first (the ones free to go anywhere must not take their room), the
    // largest first within each.
    let mut awaiting: Vec<&Awaiting> = awaiting.iter().collect();
    awaiting.sort_by_key(|a| {
        (
            a.zone.is_none(),
            a.zone.clone(),
            std::cmp::Reverse((
                a.resources.vcpus,
                a.resources.memory_mib,
                a.resources.disk_gib,
            )),
        )
    });
    for group in awaiting {
        let mut left = group.count;
        for node in nodes
            .iter_mut()
            .filter(|n| group.zone.as_ref().is_none_or(|z| &n.zone == z))
        {
            if left == 0 {
                break;
            }
            let take = room_on(node, group.resources, left);
            for _ in 0..take {
                node.assume(group.resources);
            }
            left -= take;
        }
    }
    let mut room: BTreeMap<String, u32> = BTreeMap::new();
    for node in &nodes {
        let zone = room.entry(node.zone.clone()).or_default();
        *zone = zone.saturating_add(room_on(node, need, most)).min(most);
    }
    room
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
    fn node(name: &str, zone: &str, vcpus: u32, memory_mib: u64) -> NodeView {
        NodeView {
            name: name.into(),
            zone: zone.into(),
            ready: true,
            allocatable: Resources::new(vcpus, memory_mib).with_disk(u64::MAX),
            ..Default::default()
        }
    }

    #[test]
    fn the_room_on_a_node_is_its_tightest_limit() {
        let small = Resources::new(1, 512).with_disk(10);
        let mut busy = node("n1", "z", 4, 4096);
        busy.assume(Resources::new(1, 1024));
        let mut capped = node("n1", "z", 64, 65536);
        capped.max_instances = Some(3);
        capped.assume(small);
        let mut disk = node("n1", "z", 64, 65536);
        disk.allocatable.disk_gib = 25;
        let rows: Vec<(&str, NodeView, Resources, u32, u32)> = vec![
            ("vCPUs limit", node("n1", "z", 4, 65536), small, 50, 4),
            ("memory limits", node("n1", "z", 64, 2048), small, 50, 4),
            ("what is used is taken off", busy, small, 50, 3),
            ("maxInstances limits", capped, small, 50, 2),
            ("disk limits", disk, small, 50, 2),
            (
                "never more than asked",
                node("n1", "z", 64, 65536),
                small,
                5,
                5,
            ),
            (
                "a size that asks for nothing is limited by the cap",
                node("n1", "z", 0, 0),
                Resources::default(),
                7,
                7,
            ),
            (
                "not ready: none",
                NodeView {
                    ready: false,
                    ..node("n1", "z", 64, 65536)
                },
                small,
                50,
                0,
            ),
            (
                "drained: none",
                NodeView {
                    unschedulable: true,
                    ..node("n1", "z", 64, 65536)
                },
                small,
                50,
                0,
            ),
        ];
        for (what, n, need, most, want) in rows {
            assert_eq!(room_on(&n, need, most), want, "{what}");
        }
    }

    #[test]
    fn launch_room_counts_each_zone_after_the_instances_awaiting_placement() {
        let small = Resources::new(1, 512);
        let nodes = vec![
            node("a2", "za", 2, 4096),
            node("a1", "za", 2, 4096),
            node("b1", "zb", 1, 4096),
        ];
        let room = |awaiting: &[Awaiting], most| launch_room(&nodes, awaiting, small, most);
        let zones = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(z, n)| (z.to_string(), *n)).collect()
        };
        assert_eq!(room(&[], 50), zones(&[("za", 4), ("zb", 1)]));
        assert_eq!(room(&[], 3), zones(&[("za", 3), ("zb", 1)]), "capped");
        let in_za = Awaiting {
            zone: Some("za".into()),
            resources: small,
            count: 3,
        };
        assert_eq!(room(&[in_za], 50), zones(&[("za", 1), ("zb", 1)]));
        // Awaiting without a zone fills nodes in name order: a1, a2, then b1.
        let anywhere = Awaiting {
            zone: None,
            resources: small,
            count: 5,
        };
        assert_eq!(room(&[anywhere], 50), zones(&[("za", 0), ("zb", 0)]));
        // More awaiting than fits takes what there is and no more.
        let too_many = Awaiting {
            zone: Some("zb".into()),
            resources: Resources::new(1, 512),
            count: 9,
        };
        assert_eq!(room(&[too_many], 50), zones(&[("za", 4), ("zb", 0)]));
        assert!(
            launch_room(&[], &[], small, 50).is_empty(),
            "no nodes, no zones"
        );
        // One free anywhere, one bound to za, listed in that order: the bound one takes za's
        // room first, so the free one goes to zb, and nothing is left anywhere.
        let one_each = vec![node("a1", "za", 1, 4096), node("b1", "zb", 1, 4096)];
        let mixed = [
            Awaiting {
                zone: None,
                resources: small,
                count: 1,
            },
            Awaiting {
                zone: Some("za".into()),
                resources: small,
                count: 1,
            },
        ];
        assert_eq!(
            launch_room(&one_each, &mixed, small, 50),
            zones(&[("za", 0), ("zb", 0)])
        );
    }
}
