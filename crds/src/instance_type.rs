//! `InstanceType`: a named size of virtual machine (`m1.small` ...).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::validation::{check_text, Validate, ValidationError};

/// Smallest memory an instance type may have, in MiB.
pub const MIN_MEMORY_MIB: u64 = 64;

/// Size of every instance of this type.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "InstanceType",
    plural = "instancetypes",
    singular = "instancetype",
    shortname = "itype",
    category = "karri",
    status = "InstanceTypeStatus",
    derive = "PartialEq",
    doc = "A size of virtual machine. Its name (e.g. m1.small) is what Instance spec.instanceType refers to.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "vCPUs", type_ = "integer", json_path = ".spec.vcpus"),
    printcolumn(name = "Memory MiB", type_ = "integer", json_path = ".spec.memoryMiB"),
    printcolumn(name = "Disk GiB", type_ = "integer", json_path = ".spec.diskGiB"),
    printcolumn(
        name = "Description",
        type_ = "string",
        json_path = ".spec.description",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InstanceTypeSpec {
    /// Virtual CPUs of each instance.
    pub vcpus: u32,
    /// Memory of each instance in MiB (at least 64).
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Size of each instance's root disk in GiB.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
    /// Free-form description, e.g. `general purpose, small`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
}

/// Observed state of an instance type; kept for uniformity with the other kinds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct InstanceTypeStatus {
    /// Current conditions of the instance type.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub conditions: Vec<Condition>,
}

impl Validate for InstanceTypeSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.vcpus < 1 {
            return Err(ValidationError::invalid("spec.vcpus", "be at least 1"));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ValidationError::invalid(
                "spec.memoryMiB",
                format!("be at least {MIN_MEMORY_MIB}"),
            ));
        }
        if self.disk_gib < 1 {
            return Err(ValidationError::invalid("spec.diskGiB", "be at least 1"));
        }
        if let Some(description) = &self.description {
            check_text("spec.description", description, 255)?;
        }
        Ok(())
    }
}

impl Validate for InstanceTypeStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}
