//! `Lease`: a heartbeat and a lock, like `coordination.k8s.io/v1` Lease. Node agents renew one
//! each (node health), and operator replicas compete for one (leader election).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::Validate;
use crate::ValidationError;

/// Namespace of the node agents' heartbeat leases (one per node, named as the node).
pub const NODE_LEASE_NAMESPACE: &str = "karri-node-lease";
/// Namespace of the system's own leases, e.g. the operator's leader lease.
pub const SYSTEM_NAMESPACE: &str = "karri-system";

/// Who holds the lease and until when.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "Lease",
    plural = "leases",
    singular = "lease",
    category = "karri",
    namespaced,
    status = "LeaseStatus",
    derive = "PartialEq",
    doc = "A lease: a node agent's heartbeat (namespace karri-node-lease, named as the node) or a leader-election lock (namespace karri-system).",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "Holder", type_ = "string", json_path = ".spec.holderIdentity"),
    printcolumn(
        name = "Duration",
        type_ = "integer",
        json_path = ".spec.leaseDurationSeconds"
    ),
    printcolumn(name = "Renewed", type_ = "date", json_path = ".spec.renewTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LeaseSpec {
    /// Identity of the current holder (a node name, or an operator replica's identity).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub holder_identity: Option<String>,
    /// How long the holder may go without renewing before others may take the lease.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lease_duration_seconds: Option<i32>,
    /// When the current holder acquired the lease.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub acquire_time: Option<MicroTime>,
    /// When the holder last renewed the lease.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub renew_time: Option<MicroTime>,
    /// How many times the lease changed hands.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lease_transitions: Option<i32>,
}

/// Leases carry no status; the type exists so every kind has the same shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct LeaseStatus {}

impl Validate for LeaseSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(d) = self.lease_duration_seconds {
            if d < 1 {
                return Err(ValidationError::invalid(
                    "spec.leaseDurationSeconds",
                    "be at least 1",
                ));
            }
        }
        if self.lease_transitions.is_some_and(|t| t < 0) {
            return Err(ValidationError::invalid(
                "spec.leaseTransitions",
                "not be negative",
            ));
        }
        Ok(())
    }
}

impl Validate for LeaseStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}
