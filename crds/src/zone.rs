//! `AvailabilityZone`: a failure domain of nodes inside a region.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::validation::{check_record_name, check_text, Validate};
use crate::ValidationError;

/// Desired state of an availability zone.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "AvailabilityZone",
    plural = "availabilityzones",
    singular = "availabilityzone",
    shortname = "az",
    category = "karri",
    status = "AvailabilityZoneStatus",
    derive = "PartialEq",
    doc = "An availability zone: a failure domain of nodes inside a region. Its name (e.g. karri-1a) is the zone name EC2 clients see; nodes join it through spec.availabilityZone.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Placement",
        type_ = "string",
        json_path = ".spec.placementPolicy"
    ),
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
pub struct AvailabilityZoneSpec {
    /// Region the zone belongs to, e.g. `karri-1`.
    pub region: String,
    /// Free-form description shown by DescribeAvailabilityZones messages.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
    /// How the operator chooses a node in this zone; the operator's default when unset.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub placement_policy: Option<PlacementPolicy>,
    /// The zone's subnet (its default subnet in the default VPC), e.g. `172.31.0.0/20`, a /16 to
    /// /28; when unset, a /20 of 172.31.0.0/16 chosen by the letter the zone's name ends with
    /// (`a` the first, `b` the second, …), which other zones never move.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subnet_cidr: Option<String>,
}

/// Node selection within a zone (Eucalyptus' cluster scheduling policies, plus packing and
/// spreading by capacity).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PlacementPolicy {
    /// The next node that fits, in turn.
    #[serde(rename = "ROUNDROBIN")]
    RoundRobin,
    /// The first node that fits, in name order.
    #[serde(rename = "GREEDY")]
    Greedy,
    /// The fullest node that still fits (POWERSAVE-style packing).
    #[serde(rename = "PACK")]
    Pack,
    /// The emptiest node.
    #[serde(rename = "SPREAD")]
    Spread,
}

/// EC2 state of an availability zone.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ZoneState {
    /// The zone accepts instances.
    Available,
    /// The zone works; an informational message is attached.
    Information,
    /// The zone works with reduced capacity or health.
    Impaired,
    /// The zone accepts no instances.
    Unavailable,
    /// The zone is out of capacity for new instances.
    Constrained,
}

impl ZoneState {
    /// The wire form, e.g. `available`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Information => "information",
            Self::Impaired => "impaired",
            Self::Unavailable => "unavailable",
            Self::Constrained => "constrained",
        }
    }
}

/// Observed state of an availability zone; reserved: nothing writes it yet
/// (DescribeAvailabilityZones shows `available` while it is unset).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AvailabilityZoneStatus {
    /// EC2 zone state: `available`, `information`, `impaired`, `unavailable` or `constrained`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub state: Option<ZoneState>,
    /// Current conditions of the zone, e.g. `Ready` when at least one node is ready.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub conditions: Vec<Condition>,
}

impl Validate for AvailabilityZoneSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_record_name("spec.region", &self.region, "karri-1")?;
        if let Some(description) = &self.description {
            check_text("spec.description", description, 255)?;
        }
        if let Some(cidr) = &self.subnet_cidr {
            if cidr.parse::<crate::subnet::Subnet>().is_err() {
                return Err(ValidationError::invalid(
                    "spec.subnetCidr",
                    "be an IPv4 CIDR block from /16 to /28 without host bits, e.g. 172.31.0.0/20",
                ));
            }
        }
        Ok(())
    }
}

impl Validate for AvailabilityZoneStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}
