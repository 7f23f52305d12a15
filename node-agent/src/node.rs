//! The node's own records: its `Node` (registration and what the host offers) and its
//! heartbeat `Lease` (`karri-node-lease/<node>`).
//!
//! The agent owns the Node's spec only at creation (name and zone) and, in its status, the
//! capacity, allocatable resources, hypervisor, agent version and addresses. Every other status
//! field — in particular the `Ready` condition, which the operator derives from the lease — is
//! kept: status is written read-modify-write with the record's `resourceVersion`, and a 409
//! means "read again and recompute".

use crds::{Lease, LeaseSpec, Node, NodeResources, NodeSpec, NodeStatus, NODE_LEASE_NAMESPACE};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::domain::DomainType;

/// How often a status write is tried again after a conflict before giving up for this round.
const CONFLICT_RETRIES: usize = 5;

/// What the agent reports about its host in the Node's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Availability zone, written to `spec.availabilityZone` when the Node is created.
    pub zone: String,
    /// Total resources of the host (also reported as allocatable).
    pub capacity: NodeResources,
    /// `kvm`, `qemu` or `test`.
    pub hypervisor: String,
    /// Version of the agent.
    pub agent_version: String,
    /// The data directory whose disk the capacity offers, when it is measured rather than set
    /// by a flag: [`NodeFacts::remeasure`] measures it again.
    pub disk_from: Option<std::path::PathBuf>,
}

impl NodeFacts {
    /// Measures the disk again ([`crate::host::disk_gib`]), so that space other programs take
    /// on that file system later (or give back) is seen; true when the figure changed.
    pub fn remeasure(&mut self) -> bool {
        let Some(gib) = self.disk_from.as_deref().and_then(crate::host::disk_gib) else {
            return false;
        };
        if gib == self.capacity.disk_gib {
            return false;
        }
        tracing::info!(
            was = self.capacity.disk_gib,
            now = gib,
            "the disk the node offers changed"
        );
        self.capacity.disk_gib = gib;
        true
    }
}

/// The domain type the Node's spec forces, if any (`spec.hypervisor.domainType`).
pub fn domain_type_hint(node: &Node) -> Option<DomainType> {
    let hint = node.spec.hypervisor.as_ref()?.domain_type?;
    Some(match hint {
        crds::DomainType::Kvm => DomainType::Kvm,
        crds::DomainType::Qemu => DomainType::Qemu,
    })
}

/// `current` with the agent's fields set from `facts` (every other field kept), or `None` when
/// it already says so.
pub fn node_status(current: Option<&NodeStatus>, facts: &NodeFacts) -> Option<NodeStatus> {
    let mut next = current.cloned().unwrap_or_default();
    next.capacity = Some(facts.capacity);
    next.allocatable = Some(facts.capacity);
    next.hypervisor = Some(facts.hypervisor.clone());
    next.agent_version = Some(facts.agent_version.clone());
    next.addresses = Vec::new();
    (current != Some(&next)).then_some(next)
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The Node record named `name`, created with `zone` if it is missing.
pub async fn get_or_create(api: &Api<Node>, name: &str, zone: &str) -> Result<Node, kube::Error> {
    let mut attempt = 0;
    loop {
        if let Some(node) = api.get_opt(name).await? {
            if node.spec.availability_zone != zone {
                tracing::warn!(
                    node = name,
                    registered = %node.spec.availability_zone,
                    flag = zone,
                    "the Node is registered in another zone; keeping the record's"
                );
            }
            return Ok(node);
        }
        let node = Node::new(
            name,
            NodeSpec {
                availability_zone: zone.to_owned(),
                unschedulable: false,
                hypervisor: None,
            },
        );
        match api.create(&PostParams::default(), &node).await {
            Ok(created) => {
                tracing::info!(node = name, zone, "registered the Node");
                return Ok(created);
            }
            // Created meanwhile (another run of this agent): read it.
            Err(e) if is_conflict(&e) && attempt < CONFLICT_RETRIES => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Writes the agent's fields of `node`'s status from `facts`, read-modify-write, re-reading on
/// a conflict. Returns the record as stored.
pub async fn write_status(
    api: &Api<Node>,
    mut node: Node,
    facts: &NodeFacts,
) -> Result<Node, kube::Error> {
    let mut attempt = 0;
    loop {
        let Some(status) = node_status(node.status.as_ref(), facts) else {
            return Ok(node);
        };
        let mut updated = node.clone();
        updated.status = Some(status);
        match api
            .replace_status(&facts.name, &PostParams::default(), &updated)
            .await
        {
            Ok(stored) => {
                tracing::info!(
                    node = %facts.name,
                    vcpus = facts.capacity.vcpus,
                    memory_mib = facts.capacity.memory_mib,
                    disk_gib = facts.capacity.disk_gib,
                    hypervisor = %facts.hypervisor,
                    "reported the node's capacity"
                );
                return Ok(stored);
            }
            Err(e) if is_conflict(&e) && attempt < CONFLICT_RETRIES => {
                attempt += 1;
                node = get_or_create(api, &facts.name, &facts.zone).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes sure the Node exists and its status says what `facts` say.
pub async fn ensure(api: &Api<Node>, facts: &NodeFacts) -> Result<Node, kube::Error> {
    let node = get_or_create(api, &facts.name, &facts.zone).await?;
    write_status(api, node, facts).await
}

fn seconds(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// The lease spec after `node` renews `current` at `now`: holder, duration and renew time set;
/// acquire time and transitions move only when the holder changes.
pub fn renewed(
    current: Option<&LeaseSpec>,
    node: &str,
    duration: std::time::Duration,
    now: Timestamp,
) -> LeaseSpec {
    let mut spec = current.cloned().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(node) {
        if spec.holder_identity.is_some() {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(node.to_owned());
        spec.acquire_time = Some(MicroTime(now));
    }
    spec.lease_transitions.get_or_insert(0);
    spec.acquire_time.get_or_insert(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds(duration));
    spec.renew_time = Some(MicroTime(now));
    spec
}

/// Creates or renews the node's lease once.
pub async fn renew_lease(
    api: &Api<Lease>,
    node: &str,
    duration: std::time::Duration,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(node).await? {
        Some(mut lease) => {
            lease.spec = renewed(Some(&lease.spec), node, duration, now);
            // Carries the resourceVersion read: a concurrent write is a 409, retried next tick.
            api.replace(node, &PostParams::default(), &lease).await?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.to_owned()),
                    namespace: Some(NODE_LEASE_NAMESPACE.to_owned()),
                    ..Default::default()
                },
                spec: renewed(None, node, duration, now),
                status: None,
            };
            api.create(&PostParams::default(), &lease).await?;
            tracing::info!(node, "created the node lease");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{Condition, ConditionStatus, HypervisorHints, CONDITION_READY};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::time::Duration;

    fn facts() -> NodeFacts {
        NodeFacts {
            name: "node-1".into(),
            zone: "karri-1a".into(),
            capacity: NodeResources {
                vcpus: 4,
                memory_mib: 8192,
                disk_gib: 100,
            },
            hypervisor: "qemu".into(),
            agent_version: "0.1.0".into(),
            disk_from: None,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid timestamp")
    }

    #[test]
    fn node_status_sets_the_agents_fields_and_keeps_the_operators() {
        let ready = Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "LeaseRenewed",
            "",
            Time(at(5)),
        );
        let current = NodeStatus {
            conditions: vec![ready.clone()],
            last_heartbeat_time: Some(Time(at(5))),
            ..Default::default()
        };
        let next = node_status(Some(&current), &facts()).expect("changed");
        assert_eq!(next.conditions, vec![ready]);
        assert_eq!(next.last_heartbeat_time, Some(Time(at(5))));
        assert_eq!(next.capacity, Some(facts().capacity));
        assert_eq!(next.allocatable, Some(facts().capacity));
        assert_eq!(next.hypervisor.as_deref(), Some("qemu"));
        assert_eq!(next.agent_version.as_deref(), Some("0.1.0"));
        assert_eq!(node_status(Some(&next), &facts()), None);
    }

    #[test]
    fn domain_type_hint_comes_from_the_spec() {
        let mut node = Node::new(
            "node-1",
            NodeSpec {
                availability_zone: "karri-1a".into(),
                unschedulable: false,
                hypervisor: None,
            },
        );
        assert_eq!(domain_type_hint(&node), None);
        node.spec.hypervisor = Some(HypervisorHints {
            domain_type: Some(crds::DomainType::Qemu),
            ..Default::default()
        });
        assert_eq!(domain_type_hint(&node), Some(DomainType::Qemu));
    }

    #[test]
    fn first_lease_is_acquired_and_renewed_now() {
        let spec = renewed(None, "node-1", Duration::from_secs(40), at(10));
        assert_eq!(spec.holder_identity.as_deref(), Some("node-1"));
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(10))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(10))));
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn renewal_moves_only_the_renew_time() {
        let first = renewed(None, "node-1", Duration::from_secs(40), at(10));
        let next = renewed(Some(&first), "node-1", Duration::from_secs(40), at(20));
        assert_eq!(next.acquire_time, Some(MicroTime(at(10))));
        assert_eq!(next.renew_time, Some(MicroTime(at(20))));
        assert_eq!(next.lease_transitions, Some(0));
    }

    #[test]
    fn lease_held_by_another_is_taken_over_with_a_transition() {
        let other = renewed(None, "intruder", Duration::from_secs(40), at(10));
        let next = renewed(Some(&other), "node-1", Duration::from_secs(40), at(20));
        assert_eq!(next.holder_identity.as_deref(), Some("node-1"));
        assert_eq!(next.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(next.lease_transitions, Some(1));
    }

    #[test]
    fn a_measured_disk_is_measured_again_and_a_flag_is_kept() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut measured = NodeFacts {
            disk_from: Some(dir.path().to_path_buf()),
            ..facts()
        };
        measured.capacity.disk_gib = u64::MAX;
        assert!(measured.remeasure(), "a changed figure is reported");
        assert!(measured.capacity.disk_gib < u64::MAX);
        let mut unmeasurable = NodeFacts {
            disk_from: Some(dir.path().join("missing")),
            ..facts()
        };
        assert!(!unmeasurable.remeasure(), "what cannot be measured is kept");
        assert_eq!(unmeasurable.capacity.disk_gib, 100);
        let mut flagged = facts();
        assert!(!flagged.remeasure());
        assert_eq!(flagged.capacity.disk_gib, 100);
    }
}
