//! `Node`: one hypervisor host, registered and kept alive by its node agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::validation::{check_ip, check_record_name, check_text, Validate, ValidationError};

/// Address type of a node's address on the instance network.
pub const ADDRESS_INTERNAL_IP: &str = "InternalIP";
/// Address type of a node's externally reachable address.
pub const ADDRESS_EXTERNAL_IP: &str = "ExternalIP";
/// Address type of a node's host name.
pub const ADDRESS_HOSTNAME: &str = "Hostname";

/// Desired state of a node: registered by its node agent; administrators set `unschedulable`.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "Node",
    plural = "nodes",
    singular = "node",
    shortname = "knode",
    category = "karri",
    status = "NodeStatus",
    derive = "PartialEq",
    doc = "A hypervisor host running a Karri node agent. Its name is what instances' status.nodeName refers to.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.availabilityZone"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "vCPUs",
        type_ = "integer",
        json_path = ".status.capacity.vcpus"
    ),
    printcolumn(
        name = "Memory MiB",
        type_ = "integer",
        json_path = ".status.capacity.memoryMiB"
    ),
    printcolumn(
        name = "Unschedulable",
        type_ = "boolean",
        json_path = ".spec.unschedulable",
        priority = 1
    ),
    printcolumn(
        name = "Hypervisor",
        type_ = "string",
        json_path = ".status.hypervisor",
        priority = 1
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.agentVersion",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// Name of the AvailabilityZone the node belongs to.
    pub availability_zone: String,
    /// When true, no new instances are placed on the node; running ones stay.
    #[serde(default)]
    pub unschedulable: bool,
    /// Operator-supplied hints for the hypervisor; the agent auto-detects whatever is unset.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hypervisor: Option<HypervisorHints>,
}

/// Libvirt domain type to force (`kvm` or `qemu`) instead of probing `/dev/kvm`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU software emulation (TCG).
    Qemu,
}

/// Hints overriding the node agent's hypervisor auto-detection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorHints {
    /// Force the libvirt domain type (`kvm` or `qemu`) instead of probing `/dev/kvm`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub domain_type: Option<DomainType>,
    /// Libvirt CPU model or mode for guests, e.g. `host-passthrough` or `qemu64`; accepted but
    /// not applied yet (guests get QEMU's default CPU model).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_model: Option<String>,
    /// Most instances the scheduler may place on the node, regardless of free capacity.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_instances: Option<u32>,
}

/// An amount of node resources.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Instance disk space in GiB.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
}

/// One address of a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    /// Address type: `InternalIP`, `ExternalIP` or `Hostname`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The address itself.
    pub address: String,
}

/// Observed state of a node, written by its node agent (and by the operator when the node's
/// heartbeat expires).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Current conditions of the node; `Ready` is true while the agent heartbeats.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub conditions: Vec<Condition>,
    /// Total resources of the host.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub capacity: Option<NodeResources>,
    /// Resources available to instances (the agent reports the capacity here too: it reserves
    /// nothing for the host yet).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub allocatable: Option<NodeResources>,
    /// Addresses of the host.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub addresses: Vec<NodeAddress>,
    /// Reserved: the agent's heartbeat is its Lease in `karri-node-lease`, and nothing sets
    /// this yet.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_heartbeat_time: Option<Time>,
    /// Hypervisor in use, e.g. `kvm` or `qemu`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hypervisor: Option<String>,
    /// Version of the node agent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub agent_version: Option<String>,
}

impl Validate for NodeSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_record_name("spec.availabilityZone", &self.availability_zone, "karri-1a")?;
        if let Some(hints) = &self.hypervisor {
            if let Some(model) = &hints.cpu_model {
                check_text("spec.hypervisor.cpuModel", model, 64)?;
            }
            if hints.max_instances == Some(0) {
                return Err(ValidationError::invalid(
                    "spec.hypervisor.maxInstances",
                    "be at least 1 (set spec.unschedulable to drain a node)",
                ));
            }
        }
        Ok(())
    }
}

impl Validate for NodeStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        if let (Some(capacity), Some(allocatable)) = (&self.capacity, &self.allocatable) {
            let rows = [
                (
                    "vcpus",
                    u64::from(allocatable.vcpus),
                    u64::from(capacity.vcpus),
                ),
                ("memoryMiB", allocatable.memory_mib, capacity.memory_mib),
                ("diskGiB", allocatable.disk_gib, capacity.disk_gib),
            ];
            for (name, allocatable, capacity) in rows {
                if allocatable > capacity {
                    return Err(ValidationError::invalid(
                        format!("status.allocatable.{name}"),
                        format!("not exceed status.capacity.{name}"),
                    ));
                }
            }
        }
        for (i, address) in self.addresses.iter().enumerate() {
            let field = format!("status.addresses[{i}].address");
            match address.type_.as_str() {
                ADDRESS_INTERNAL_IP | ADDRESS_EXTERNAL_IP => check_ip(&field, &address.address)?,
                ADDRESS_HOSTNAME => check_text(&field, &address.address, 253)?,
                _ => {
                    return Err(ValidationError::invalid(
                        format!("status.addresses[{i}].type"),
                        "be InternalIP, ExternalIP or Hostname",
                    ))
                }
            }
        }
        Ok(())
    }
}
