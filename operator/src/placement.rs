//! Placement: which node of a zone a pending instance goes to (the Eucalyptus Cluster
//! Controller's scheduler).
//!
//! A node is a candidate when it is in the requested zone (any zone when none is requested), Ready,
//! schedulable, below its `maxInstances`, and has room for the vCPUs, the memory and the disk of
//! the instance's type: `allocatable - used`, where `used` is what [`usage`] (shared with the gateway,
//! in `crds::capacity`) sums over the instances already bound to the node. Among the
//! candidates the [`Policy`] picks one; nodes are always considered in name order, so every
//! decision is deterministic.
//!
//! Placement never moves an instance: the operator calls [`place`] only for an instance without
//! `status.nodeName`, and the binding it writes is permanent (EC2 keeps an instance on its host,
//! through stop/start and through host trouble).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crds::{InstanceSpec, InstanceTypeSpec};
use serde::{Deserialize, Serialize};

pub use crds::capacity::{holds_capacity, usage, NodeView, Resources, Usage};

/// What to place: the zone asked for and the size of the instance's type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlacementRequest {
    /// Zone the instance must go to; `None` lets placement use any zone.
    pub zone: Option<String>,
    /// vCPUs, memory and disk of the instance's type.
    pub resources: Resources,
}

impl PlacementRequest {
    /// The request for an instance with `spec`, sized by its instance type in `types`.
    pub fn for_instance(
        spec: &InstanceSpec,
        types: &BTreeMap<String, InstanceTypeSpec>,
    ) -> Result<Self, Unplaceable> {
        let size = types
            .get(&spec.instance_type)
            .ok_or_else(|| Unplaceable::UnknownInstanceType(spec.instance_type.clone()))?;
        Ok(Self {
            zone: spec.availability_zone.clone(),
            resources: Resources::from(size),
        })
    }
}

/// How placement chooses among the nodes that fit (set per zone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Policy {
    /// The next fitting node after the previous choice, in name order, wrapping around
    /// (Eucalyptus ROUNDROBIN, the default).
    #[default]
    #[serde(rename = "ROUNDROBIN")]
    RoundRobin,
    /// The first fitting node in name order (Eucalyptus GREEDY).
    Greedy,
    /// The fitting node left fullest by the instance, so idle nodes stay idle
    /// (Eucalyptus POWERSAVE-style packing).
    Pack,
    /// The fitting node left emptiest by the instance, so load spreads evenly.
    Spread,
}

impl Policy {
    /// The configuration form, e.g. `ROUNDROBIN`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "ROUNDROBIN",
            Self::Greedy => "GREEDY",
            Self::Pack => "PACK",
            Self::Spread => "SPREAD",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A placement policy name that is none of ROUNDROBIN, GREEDY, PACK and SPREAD.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement policy {0:?}: expected ROUNDROBIN, GREEDY, PACK or SPREAD")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;

    /// Parses `ROUNDROBIN`, `GREEDY`, `PACK` or `SPREAD`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::RoundRobin, Self::Greedy, Self::Pack, Self::Spread]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// Why an instance cannot be placed now. `Display` is a short sentence meant for the message of
/// the instance's `Scheduled` condition; the instance stays pending and placement is tried again
/// when nodes or instances change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unplaceable {
    /// No node belongs to the zone (`None`: there are no nodes at all).
    #[error("{}", no_nodes(.0.as_deref()))]
    NoNodesInZone(Option<String>),
    /// The zone has nodes, but none is Ready and schedulable.
    #[error("no node {}is ready and schedulable", in_zone(.0.as_deref()))]
    NoReadyNodes(Option<String>),
    /// Ready nodes exist, but none has room for the instance.
    #[error(
        "no node {}has room for {}",
        in_zone(.zone.as_deref()),
        size_text(*.vcpus, *.memory_mib, *.disk_gib)
    )]
    NoRoom {
        /// Zone asked for (`None`: any zone).
        zone: Option<String>,
        /// vCPUs asked for.
        vcpus: u32,
        /// Memory asked for, in MiB.
        memory_mib: u64,
        /// Instance disk asked for, in GiB.
        disk_gib: u64,
    },
    /// The instance's type does not exist, so its size is unknown.
    #[error("instance type {0} does not exist")]
    UnknownInstanceType(String),
}

impl Unplaceable {
    /// A CamelCase name of the cause, for metric labels and logs.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::NoNodesInZone(_) => "NoNodesInZone",
            Self::NoReadyNodes(_) => "NoReadyNodes",
            Self::NoRoom { .. } => "NoRoom",
            Self::UnknownInstanceType(_) => "UnknownInstanceType",
        }
    }
}

fn no_nodes(zone: Option<&str>) -> String {
    match zone {
        Some(zone) => format!("zone {zone} has no nodes"),
        None => "there are no nodes".to_owned(),
    }
}

fn in_zone(zone: Option<&str>) -> String {
    zone.map(|z| format!("in zone {z} ")).unwrap_or_default()
}

/// `2 vCPUs and 1024 MiB`, or `2 vCPUs, 1024 MiB and 10 GiB of disk` for a size with disk.
fn size_text(vcpus: u32, memory_mib: u64, disk_gib: u64) -> String {
    let vcpus = vcpus_text(&vcpus);
    if disk_gib == 0 {
        format!("{vcpus} and {memory_mib} MiB")
    } else {
        format!("{vcpus}, {memory_mib} MiB and {disk_gib} GiB of disk")
    }
}

fn vcpus_text(vcpus: &u32) -> String {
    if *vcpus == 1 {
        "1 vCPU".to_owned()
    } else {
        format!("{vcpus} vCPUs")
    }
}

/// Chooses the node for `request` among `nodes` by `policy`, or says why none fits.
///
/// `cursor` is the ROUNDROBIN position, kept by the caller between calls (one per zone; other
/// policies leave it alone): an index into the zone's nodes in name order, ready or not. The
/// search starts at `cursor` (modulo the number of nodes) and, once a node is chosen, `cursor`
/// moves just past it.
pub fn place(
    request: &PlacementRequest,
    nodes: &[NodeView],
    policy: Policy,
    cursor: &mut usize,
) -> Result<String, Unplaceable> {
    let mut zone_nodes: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| request.zone.as_ref().is_none_or(|z| &n.zone == z))
        .collect();
    zone_nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if zone_nodes.is_empty() {
        return Err(Unplaceable::NoNodesInZone(request.zone.clone()));
    }
    if !zone_nodes.iter().any(|n| n.schedulable()) {
        return Err(Unplaceable::NoReadyNodes(request.zone.clone()));
    }
    let need = request.resources;
    let fits = |n: &&&NodeView| n.fits(need);
    let chosen = match policy {
        Policy::Greedy => zone_nodes.iter().find(fits),
        Policy::RoundRobin => {
            let start = *cursor % zone_nodes.len();
            let found = zone_nodes
                .iter()
                .enumerate()
                .cycle()
                .skip(start)
                .take(zone_nodes.len())
                .find(|(_, n)| n.fits(need));
            if let Some((index, _)) = found {
                *cursor = index + 1;
            }
            found.map(|(_, n)| n)
        }
        // Ties go to the first node in name order: `min_by`/`max_by` keep the first minimum
        // but the last maximum, so PACK compares reversed loads with `min_by`.
        Policy::Pack => zone_nodes
            .iter()
            .filter(fits)
            .min_by(|a, b| load_with(b, need).cmp(&load_with(a, need))),
        Policy::Spread => zone_nodes
            .iter()
            .filter(fits)
            .min_by(|a, b| load_with(a, need).cmp(&load_with(b, need))),
    };
    chosen
        .map(|n| n.name.clone())
        .ok_or_else(|| Unplaceable::NoRoom {
            zone: request.zone.clone(),
            vcpus: need.vcpus,
            memory_mib: need.memory_mib,
            disk_gib: need.disk_gib,
        })
}

/// How full `node` would be with `need` added, for PACK and SPREAD.
fn load_with(node: &NodeView, need: Resources) -> Load {
    Load::of(node.used.resources, need, node.allocatable)
}

/// How full a node would be: the vCPU share plus the memory share in use, each `used / allocatable`
/// (Kubernetes' MostAllocated / LeastAllocated scores), compared exactly as fractions so that
/// equal loads tie and fall back to name order.
#[derive(Clone, Copy, Debug)]
struct Load {
    numerator: u128,
    denominator: u128,
}

impl Load {
    fn of(used: Resources, need: Resources, allocatable: Resources) -> Self {
        // A dimension with nothing allocatable counts as full (share 1/1).
        let share = |used: u128, alloc: u128| if alloc == 0 { (1, 1) } else { (used, alloc) };
        let (cpu_used, cpu_alloc) = share(
            u128::from(used.vcpus) + u128::from(need.vcpus),
            u128::from(allocatable.vcpus),
        );
        let (mem_used, mem_alloc) = share(
            u128::from(used.memory_mib) + u128::from(need.memory_mib),
            u128::from(allocatable.memory_mib),
        );
        Self {
            numerator: cpu_used * mem_alloc + mem_used * cpu_alloc,
            denominator: cpu_alloc * mem_alloc,
        }
    }
}

impl PartialEq for Load {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Load {}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> Ordering {
        // Both sides stay far below u128::MAX: shares are at most ~2^97 after cross-multiplying.
        (self.numerator.saturating_mul(other.denominator))
            .cmp(&other.numerator.saturating_mul(self.denominator))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{
        Condition, ConditionStatus, HypervisorHints, Instance, InstanceState, InstanceStatus, Node,
        NodeResources, NodeSpec, NodeStatus, CONDITION_READY,
    };

    /// A Ready, schedulable node in `zone` with `vcpus`/`mem` allocatable and `used_*` in use.
    fn node(
        name: &str,
        zone: &str,
        vcpus: u32,
        mem: u64,
        used_vcpus: u32,
        used_mem: u64,
    ) -> NodeView {
        NodeView {
            name: name.into(),
            zone: zone.into(),
            ready: true,
            unschedulable: false,
            max_instances: None,
            allocatable: Resources::new(vcpus, mem),
            used: Usage {
                resources: Resources::new(used_vcpus, used_mem),
                instances: u32::from(used_vcpus > 0),
            },
        }
    }

    /// `n` with `alloc` GiB of disk allocatable and `used` GiB in use.
    fn with_disk(mut n: NodeView, alloc: u64, used: u64) -> NodeView {
        n.allocatable.disk_gib = alloc;
        n.used.resources.disk_gib = used;
        n
    }

    fn not_ready(mut n: NodeView) -> NodeView {
        n.ready = false;
        n
    }

    fn drained(mut n: NodeView) -> NodeView {
        n.unschedulable = true;
        n
    }

    fn capped(mut n: NodeView, max: u32, instances: u32) -> NodeView {
        n.max_instances = Some(max);
        n.used.instances = instances;
        n
    }

    fn request(zone: Option<&str>, vcpus: u32, mem: u64) -> PlacementRequest {
        PlacementRequest {
            zone: zone.map(str::to_owned),
            resources: Resources::new(vcpus, mem),
        }
    }

    const A: &str = "karri-1a";
    const B: &str = "karri-1b";

    /// One row: nodes, request, policy, cursor before → expected node (or error text).
    struct Row {
        what: &'static str,
        nodes: Vec<NodeView>,
        request: PlacementRequest,
        policy: Policy,
        cursor: usize,
        want: Result<&'static str, &'static str>,
    }

    fn check(rows: Vec<Row>) {
        for row in rows {
            let mut cursor = row.cursor;
            let got = place(&row.request, &row.nodes, row.policy, &mut cursor);
            let got = got.as_deref().map_err(ToString::to_string);
            assert_eq!(
                got,
                row.want.map_err(str::to_owned),
                "{} ({})",
                row.what,
                row.policy
            );
        }
    }

    fn three_nodes() -> Vec<NodeView> {
        vec![
            // free: 6 vCPUs / 12288 MiB, 1/8 vCPUs used
            node("hv-02", A, 8, 16384, 2, 4096),
            // free: 2 vCPUs / 2048 MiB, 6/8 used
            node("hv-01", A, 8, 16384, 6, 14336),
            // empty
            node("hv-03", A, 8, 16384, 0, 0),
        ]
    }

    #[test]
    fn pack_prefers_the_fullest_node_that_still_fits() {
        check(vec![
            Row {
                what: "the fullest node fits",
                nodes: three_nodes(),
                request: request(Some(A), 1, 1024),
                policy: Policy::Pack,
                cursor: 0,
                want: Ok("hv-01"),
            },
            Row {
                what: "the fullest node is too small, the next fullest fits",
                nodes: three_nodes(),
                request: request(Some(A), 4, 4096),
                policy: Policy::Pack,
                cursor: 0,
                want: Ok("hv-02"),
            },
            Row {
                what: "only memory is short on the fullest node",
                nodes: three_nodes(),
                request: request(Some(A), 1, 4096),
                policy: Policy::Pack,
                cursor: 0,
                want: Ok("hv-02"),
            },
            Row {
                what: "equal loads fall back to name order",
                nodes: vec![
                    node("hv-b", A, 4, 4096, 2, 2048),
                    node("hv-a", A, 4, 4096, 2, 2048),
                ],
                request: request(Some(A), 1, 512),
                policy: Policy::Pack,
                cursor: 0,
                want: Ok("hv-a"),
            },
            Row {
                what: "fullness is relative to each node's size",
                nodes: vec![
                    // 16 of 64 used: a quarter full, but the most free space left
                    node("big", A, 64, 65536, 16, 16384),
                    // 4 of 8 used: half full
                    node("small", A, 8, 8192, 4, 4096),
                ],
                request: request(Some(A), 1, 512),
                policy: Policy::Pack,
                cursor: 0,
                want: Ok("small"),
            },
            Row {
                what: "a node exactly filled by the instance is the best fit",
                nodes: vec![
                    node("hv-01", A, 8, 8192, 0, 0),
                    node("hv-02", A, 4, 4096, 3, 3072),
                ],
                request: request(Some(A), 1, 1024),
                policy: Policy::Pack,
                cursor: 0,
                want: Ok("hv-02"),
            },
        ]);
    }

    #[test]
    fn spread_prefers_the_emptiest_node() {
        check(vec![
            Row {
                what: "the empty node wins",
                nodes: three_nodes(),
                request: request(Some(A), 1, 1024),
                policy: Policy::Spread,
                cursor: 0,
                want: Ok("hv-03"),
            },
            Row {
                what: "the emptiest node is not ready",
                nodes: vec![
                    node("hv-01", A, 8, 16384, 6, 14336),
                    node("hv-02", A, 8, 16384, 2, 4096),
                    not_ready(node("hv-03", A, 8, 16384, 0, 0)),
                ],
                request: request(Some(A), 1, 1024),
                policy: Policy::Spread,
                cursor: 0,
                want: Ok("hv-02"),
            },
            Row {
                what: "emptiness is relative to each node's size",
                nodes: vec![
                    node("big", A, 64, 65536, 16, 16384),
                    node("small", A, 8, 8192, 4, 4096),
                ],
                request: request(Some(A), 1, 512),
                policy: Policy::Spread,
                cursor: 0,
                want: Ok("big"),
            },
            Row {
                what: "equal loads fall back to name order",
                nodes: vec![
                    node("hv-b", A, 4, 4096, 0, 0),
                    node("hv-a", A, 4, 4096, 0, 0),
                ],
                request: request(Some(A), 1, 512),
                policy: Policy::Spread,
                cursor: 0,
                want: Ok("hv-a"),
            },
        ]);
    }

    #[test]
    fn greedy_takes_the_first_fitting_node_in_name_order() {
        check(vec![
            Row {
                what: "the first node by name fits",
                nodes: three_nodes(),
                request: request(Some(A), 1, 1024),
                policy: Policy::Greedy,
                cursor: 7,
                want: Ok("hv-01"),
            },
            Row {
                what: "the first node by name is too full",
                nodes: three_nodes(),
                request: request(Some(A), 3, 1024),
                policy: Policy::Greedy,
                cursor: 0,
                want: Ok("hv-02"),
            },
            Row {
                what: "only the last node has room",
                nodes: three_nodes(),
                request: request(Some(A), 7, 1024),
                policy: Policy::Greedy,
                cursor: 0,
                want: Ok("hv-03"),
            },
            Row {
                what: "an exact fit is a fit",
                nodes: vec![node("hv-01", A, 2, 2048, 1, 1024)],
                request: request(Some(A), 1, 1024),
                policy: Policy::Greedy,
                cursor: 0,
                want: Ok("hv-01"),
            },
        ]);
    }

    #[test]
    fn round_robin_starts_at_the_cursor() {
        check(vec![
            Row {
                what: "cursor 0 is the first node",
                nodes: three_nodes(),
                request: request(Some(A), 1, 1024),
                policy: Policy::RoundRobin,
                cursor: 0,
                want: Ok("hv-01"),
            },
            Row {
                what: "cursor 2 is the third node",
                nodes: three_nodes(),
                request: request(Some(A), 1, 1024),
                policy: Policy::RoundRobin,
                cursor: 2,
                want: Ok("hv-03"),
            },
            Row {
                what: "a cursor past the end wraps",
                nodes: three_nodes(),
                request: request(Some(A), 1, 1024),
                policy: Policy::RoundRobin,
                cursor: 4,
                want: Ok("hv-02"),
            },
            Row {
                what: "nodes without room are skipped",
                nodes: three_nodes(),
                request: request(Some(A), 7, 1024),
                policy: Policy::RoundRobin,
                cursor: 0,
                want: Ok("hv-03"),
            },
            Row {
                what: "the search wraps round to a node before the cursor",
                nodes: vec![
                    node("hv-01", A, 8, 8192, 0, 0),
                    node("hv-02", A, 1, 1024, 1, 1024),
                ],
                request: request(Some(A), 1, 1024),
                policy: Policy::RoundRobin,
                cursor: 1,
                want: Ok("hv-01"),
            },
        ]);
    }

    #[test]
    fn round_robin_rotates_through_fitting_nodes() {
        let mut nodes = vec![
            node("hv-03", A, 4, 4096, 0, 0),
            node("hv-01", A, 4, 4096, 0, 0),
            // never fits a 1-vCPU instance: it has no vCPU left
            node("hv-02", A, 4, 4096, 4, 1024),
            node("hv-04", A, 4, 4096, 0, 0),
            node("other-zone", B, 64, 65536, 0, 0),
        ];
        let req = request(Some(A), 1, 512);
        let mut cursor = 0;
        let mut chosen = Vec::new();
        for _ in 0..7 {
            let name = place(&req, &nodes, Policy::RoundRobin, &mut cursor).expect("fits");
            if let Some(n) = nodes.iter_mut().find(|n| n.name == name) {
                n.assume(req.resources);
            }
            chosen.push(name);
        }
        assert_eq!(
            chosen,
            ["hv-01", "hv-03", "hv-04", "hv-01", "hv-03", "hv-04", "hv-01"]
        );
        // hv-01 now holds three 1-vCPU instances, the others two each.
        let used: Vec<u32> = ["hv-01", "hv-03", "hv-04"]
            .iter()
            .map(|name| {
                nodes
                    .iter()
                    .find(|n| &n.name == name)
                    .map_or(0, |n| n.used.resources.vcpus)
            })
            .collect();
        assert_eq!(used, [3, 2, 2]);
    }

    #[test]
    fn round_robin_keeps_the_cursor_when_nothing_fits() {
        let nodes = vec![node("hv-01", A, 1, 1024, 1, 1024)];
        let mut cursor = 5;
        let got = place(
            &request(Some(A), 1, 512),
            &nodes,
            Policy::RoundRobin,
            &mut cursor,
        );
        assert!(got.is_err());
        assert_eq!(cursor, 5);
    }

    #[test]
    fn other_policies_leave_the_cursor_alone() {
        for policy in [Policy::Greedy, Policy::Pack, Policy::Spread] {
            let mut cursor = 3;
            place(
                &request(Some(A), 1, 512),
                &three_nodes(),
                policy,
                &mut cursor,
            )
            .expect("fits");
            assert_eq!(cursor, 3, "{policy}");
        }
    }

    #[test]
    fn not_ready_and_unschedulable_nodes_are_skipped() {
        let rows = |policy| {
            vec![
                Row {
                    what: "the only roomy node is not ready",
                    nodes: vec![
                        not_ready(node("hv-01", A, 8, 8192, 0, 0)),
                        node("hv-02", A, 8, 8192, 1, 1024),
                    ],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Ok("hv-02"),
                },
                Row {
                    what: "a drained node is skipped",
                    nodes: vec![
                        drained(node("hv-01", A, 8, 8192, 0, 0)),
                        node("hv-02", A, 8, 8192, 1, 1024),
                    ],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Ok("hv-02"),
                },
                Row {
                    what: "a node at maxInstances is skipped",
                    nodes: vec![
                        capped(node("hv-01", A, 8, 8192, 1, 512), 1, 1),
                        capped(node("hv-02", A, 8, 8192, 1, 512), 2, 1),
                    ],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Ok("hv-02"),
                },
                Row {
                    what: "every node not ready",
                    nodes: vec![
                        not_ready(node("hv-01", A, 8, 8192, 0, 0)),
                        not_ready(node("hv-02", A, 8, 8192, 0, 0)),
                    ],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a is ready and schedulable"),
                },
                Row {
                    what: "not ready and drained",
                    nodes: vec![
                        not_ready(node("hv-01", A, 8, 8192, 0, 0)),
                        drained(node("hv-02", A, 8, 8192, 0, 0)),
                        node("hv-03", B, 8, 8192, 0, 0),
                    ],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a is ready and schedulable"),
                },
            ]
        };
        for policy in [
            Policy::RoundRobin,
            Policy::Greedy,
            Policy::Pack,
            Policy::Spread,
        ] {
            check(rows(policy));
        }
    }

    #[test]
    fn only_nodes_of_the_requested_zone_are_used() {
        let nodes = vec![
            node("hv-01", A, 8, 8192, 7, 0),
            node("hv-02", B, 8, 8192, 0, 0),
            node("hv-03", A, 8, 8192, 0, 0),
        ];
        for policy in [
            Policy::RoundRobin,
            Policy::Greedy,
            Policy::Pack,
            Policy::Spread,
        ] {
            check(vec![
                Row {
                    what: "zone a",
                    nodes: nodes.clone(),
                    request: request(Some(A), 2, 512),
                    policy,
                    cursor: 0,
                    want: Ok("hv-03"),
                },
                Row {
                    what: "zone b",
                    nodes: nodes.clone(),
                    request: request(Some(B), 2, 512),
                    policy,
                    cursor: 0,
                    want: Ok("hv-02"),
                },
                Row {
                    what: "a zone without nodes",
                    nodes: nodes.clone(),
                    request: request(Some("karri-1c"), 1, 512),
                    policy,
                    cursor: 0,
                    want: Err("zone karri-1c has no nodes"),
                },
            ]);
        }
    }

    #[test]
    fn no_zone_means_any_zone() {
        let nodes = vec![
            node("hv-01", A, 8, 8192, 8, 0),
            node("hv-02", B, 8, 8192, 0, 0),
        ];
        check(vec![
            Row {
                what: "the node with room is in the other zone",
                nodes: nodes.clone(),
                request: request(None, 1, 512),
                policy: Policy::Greedy,
                cursor: 0,
                want: Ok("hv-02"),
            },
            Row {
                what: "no room in any zone",
                nodes,
                request: request(None, 9, 512),
                policy: Policy::Greedy,
                cursor: 0,
                want: Err("no node has room for 9 vCPUs and 512 MiB"),
            },
            Row {
                what: "no nodes at all",
                nodes: vec![],
                request: request(None, 1, 512),
                policy: Policy::RoundRobin,
                cursor: 0,
                want: Err("there are no nodes"),
            },
            Row {
                what: "no ready node at all",
                nodes: vec![not_ready(node("hv-01", A, 8, 8192, 0, 0))],
                request: request(None, 1, 512),
                policy: Policy::Spread,
                cursor: 0,
                want: Err("no node is ready and schedulable"),
            },
        ]);
    }

    #[test]
    fn no_room_anywhere_says_why() {
        let rows = |policy| {
            vec![
                Row {
                    what: "vCPUs short everywhere",
                    nodes: vec![
                        node("hv-01", A, 2, 8192, 1, 0),
                        node("hv-02", A, 4, 8192, 3, 0),
                    ],
                    request: request(Some(A), 2, 1024),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a has room for 2 vCPUs and 1024 MiB"),
                },
                Row {
                    what: "memory short everywhere",
                    nodes: vec![
                        node("hv-01", A, 8, 2048, 0, 1536),
                        node("hv-02", A, 8, 1000, 0, 0),
                    ],
                    request: request(Some(A), 1, 1024),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a has room for 1 vCPU and 1024 MiB"),
                },
                Row {
                    what: "one node short of vCPUs, the other of memory",
                    nodes: vec![
                        node("hv-01", A, 2, 8192, 2, 0),
                        node("hv-02", A, 8, 1024, 0, 512),
                    ],
                    request: request(Some(A), 1, 1024),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a has room for 1 vCPU and 1024 MiB"),
                },
                Row {
                    what: "the roomy node is drained, the ready one full",
                    nodes: vec![
                        drained(node("hv-01", A, 8, 8192, 0, 0)),
                        node("hv-02", A, 1, 512, 1, 512),
                    ],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a has room for 1 vCPU and 512 MiB"),
                },
                Row {
                    what: "a node without reported allocatable offers nothing",
                    nodes: vec![node("hv-01", A, 0, 0, 0, 0)],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a has room for 1 vCPU and 512 MiB"),
                },
                Row {
                    what: "disk short everywhere (the types' disks may grow that large)",
                    nodes: vec![
                        with_disk(node("hv-01", A, 8, 8192, 0, 0), 100, 95),
                        with_disk(node("hv-02", A, 8, 8192, 0, 0), 8, 0),
                    ],
                    request: PlacementRequest {
                        zone: Some(A.into()),
                        resources: Resources::new(1, 512).with_disk(10),
                    },
                    policy,
                    cursor: 0,
                    want: Err(
                        "no node in zone karri-1a has room for 1 vCPU, 512 MiB and 10 GiB of disk",
                    ),
                },
                Row {
                    what: "overcommitted nodes have nothing free",
                    nodes: vec![node("hv-01", A, 4, 4096, 6, 8192)],
                    request: request(Some(A), 1, 512),
                    policy,
                    cursor: 0,
                    want: Err("no node in zone karri-1a has room for 1 vCPU and 512 MiB"),
                },
            ]
        };
        for policy in [
            Policy::RoundRobin,
            Policy::Greedy,
            Policy::Pack,
            Policy::Spread,
        ] {
            check(rows(policy));
        }
    }

    #[test]
    fn unplaceable_names_its_cause() {
        let rows = [
            (
                Unplaceable::NoNodesInZone(Some(A.into())),
                "NoNodesInZone",
                "zone karri-1a has no nodes",
            ),
            (
                Unplaceable::NoReadyNodes(None),
                "NoReadyNodes",
                "no node is ready and schedulable",
            ),
            (
                Unplaceable::NoRoom {
                    zone: Some(A.into()),
                    vcpus: 2,
                    memory_mib: 1024,
                    disk_gib: 10,
                },
                "NoRoom",
                "no node in zone karri-1a has room for 2 vCPUs, 1024 MiB and 10 GiB of disk",
            ),
            (
                Unplaceable::UnknownInstanceType("m9.huge".into()),
                "UnknownInstanceType",
                "instance type m9.huge does not exist",
            ),
        ];
        for (error, cause, message) in rows {
            assert_eq!(error.cause(), cause);
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn policy_names_parse_in_any_case() {
        let rows = [
            ("ROUNDROBIN", Ok(Policy::RoundRobin)),
            ("roundrobin", Ok(Policy::RoundRobin)),
            ("RoundRobin", Ok(Policy::RoundRobin)),
            ("GREEDY", Ok(Policy::Greedy)),
            ("greedy", Ok(Policy::Greedy)),
            ("PACK", Ok(Policy::Pack)),
            ("Pack", Ok(Policy::Pack)),
            ("SPREAD", Ok(Policy::Spread)),
            ("spread", Ok(Policy::Spread)),
            ("POWERSAVE", Err(())),
            ("ROUND_ROBIN", Err(())),
            ("", Err(())),
            (" GREEDY", Err(())),
        ];
        for (text, want) in rows {
            assert_eq!(text.parse::<Policy>().map_err(|_| ()), want, "{text:?}");
        }
        assert_eq!(
            "best".parse::<Policy>().map_err(|e| e.to_string()),
            Err(
                "unknown placement policy \"best\": expected ROUNDROBIN, GREEDY, PACK or SPREAD"
                    .to_owned()
            )
        );
        assert_eq!(Policy::default(), Policy::RoundRobin);
        for policy in [
            Policy::RoundRobin,
            Policy::Greedy,
            Policy::Pack,
            Policy::Spread,
        ] {
            assert_eq!(policy.to_string().parse::<Policy>(), Ok(policy));
            assert_eq!(
                serde_json::to_value(policy).expect("serializes"),
                serde_json::Value::String(policy.as_str().into())
            );
        }
    }

    fn instance_type(vcpus: u32, memory_mib: u64) -> InstanceTypeSpec {
        InstanceTypeSpec {
            vcpus,
            memory_mib,
            disk_gib: 10,
            description: None,
        }
    }

    fn types() -> BTreeMap<String, InstanceTypeSpec> {
        BTreeMap::from([
            ("m1.small".to_owned(), instance_type(1, 512)),
            ("c1.medium".to_owned(), instance_type(2, 1024)),
        ])
    }

    fn instance(name: &str, itype: &str, node: Option<&str>, state: InstanceState) -> Instance {
        let mut i = Instance::new(
            name,
            InstanceSpec {
                image_id: "emi-0123456789abcdef0".into(),
                instance_type: itype.into(),
                availability_zone: Some(A.into()),
                ..Default::default()
            },
        );
        i.status = Some(InstanceStatus {
            state,
            node_name: node.map(str::to_owned),
            ..Default::default()
        });
        i
    }

    #[test]
    fn usage_sums_the_bound_instances_that_hold_capacity() {
        use InstanceState::*;
        let instances = vec![
            instance("a", "m1.small", Some("hv-01"), Running),
            instance("b", "c1.medium", Some("hv-01"), Pending),
            instance("c", "c1.medium", Some("hv-01"), Stopped),
            instance("d", "c1.medium", Some("hv-01"), ShuttingDown),
            instance("e", "c1.medium", Some("hv-01"), Terminated),
            instance("f", "m1.small", Some("hv-02"), Stopping),
            instance("g", "m1.small", None, Pending),
            instance("h", "gone.type", Some("hv-02"), Running),
        ];
        let mut unbound_without_status = instance("i", "m1.small", None, Pending);
        unbound_without_status.status = None;
        let mut all = instances;
        all.push(unbound_without_status);
        let used = usage(&all, &types());
        assert_eq!(
            used,
            BTreeMap::from([
                (
                    "hv-01".to_owned(),
                    Usage {
                        resources: Resources::new(7, 3584).with_disk(40),
                        instances: 4
                    }
                ),
                (
                    "hv-02".to_owned(),
                    Usage {
                        resources: Resources::new(1, 512).with_disk(10),
                        instances: 2
                    }
                ),
            ])
        );
    }

    #[test]
    fn request_is_sized_by_the_instance_type() {
        let i = instance("a", "c1.medium", None, InstanceState::Pending);
        assert_eq!(
            PlacementRequest::for_instance(&i.spec, &types()),
            Ok(PlacementRequest {
                zone: Some(A.into()),
                resources: Resources::new(2, 1024).with_disk(10)
            })
        );
        let unknown = instance("b", "m9.huge", None, InstanceState::Pending);
        assert_eq!(
            PlacementRequest::for_instance(&unknown.spec, &types()),
            Err(Unplaceable::UnknownInstanceType("m9.huge".into()))
        );
    }

    #[test]
    fn node_view_reads_the_node_record() {
        let ready = Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "LeaseRenewed",
            "",
            crate::clock::at(0),
        );
        let mut record = Node::new(
            "hv-01",
            NodeSpec {
                availability_zone: A.into(),
                unschedulable: false,
                hypervisor: Some(HypervisorHints {
                    max_instances: Some(16),
                    ..Default::default()
                }),
            },
        );
        record.status = Some(NodeStatus {
            conditions: vec![ready],
            allocatable: Some(NodeResources {
                vcpus: 8,
                memory_mib: 16384,
                disk_gib: 100,
            }),
            ..Default::default()
        });
        let used = BTreeMap::from([(
            "hv-01".to_owned(),
            Usage {
                resources: Resources::new(2, 1024),
                instances: 2,
            },
        )]);
        assert_eq!(
            NodeView::from_node(&record, &used),
            Some(NodeView {
                name: "hv-01".into(),
                zone: A.into(),
                ready: true,
                unschedulable: false,
                max_instances: Some(16),
                allocatable: Resources::new(8, 16384).with_disk(100),
                used: Usage {
                    resources: Resources::new(2, 1024),
                    instances: 2
                },
            })
        );

        let fresh = Node::new(
            "hv-02",
            NodeSpec {
                availability_zone: B.into(),
                unschedulable: true,
                hypervisor: None,
            },
        );
        let view = NodeView::from_node(&fresh, &used).expect("named");
        assert!(!view.ready);
        assert!(view.unschedulable);
        assert_eq!(view.allocatable, Resources::default());
        assert_eq!(view.used, Usage::default());
    }
}
