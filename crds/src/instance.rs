//! `Instance`: one virtual machine, the EC2 instance.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Tag};
use crate::validation::{
    check_boot_ids, check_id, check_ip, check_record_name, check_tags, check_text,
    decode_user_data, Validate, ValidationError,
};

/// Annotation RebootInstances sets to the time of the request; the node agent reboots a running
/// domain whose `status.lastRebootRequest` differs, then records it there.
pub const REBOOT_ANNOTATION: &str = "karri.dev/reboot-requested-at";

/// Annotation StopInstances with `Force` sets (and a stop without it, or a start, removes):
/// while the instance is asked to stop, the node agent powers its domain off at once instead of
/// waiting for the guest to shut down.
pub const FORCE_STOP_ANNOTATION: &str = "karri.dev/force-stop";

/// The operator's finalizer on every instance: it holds the record until the domain is gone
/// and the instance's addresses and capacity are released. Only Karri's controllers remove it.
pub const INSTANCE_FINALIZER: &str = "karri.dev/instance";

/// Field selector path binding instances to nodes: agents list and watch
/// `status.nodeName=<their node>`.
pub const NODE_NAME_FIELD: &str = "status.nodeName";

/// Desired state of an instance, as RunInstances or kubectl set it; field names follow the EC2 API.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "Instance",
    namespaced,
    plural = "instances",
    singular = "instance",
    shortname = "inst",
    category = "karri",
    status = "InstanceStatus",
    derive = "PartialEq",
    selectable = ".status.nodeName",
    doc = "A virtual machine, the EC2 instance. Its ID (i- and 17 hex digits) is in the karri.dev/id label.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.instanceType"),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.imageId"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(
        name = "Private IP",
        type_ = "string",
        json_path = ".status.privateIpAddress"
    ),
    printcolumn(
        name = "Public IP",
        type_ = "string",
        json_path = ".status.publicIpAddress",
        priority = 1
    ),
    printcolumn(
        name = "Zone",
        type_ = "string",
        json_path = ".status.availabilityZone",
        priority = 1
    ),
    printcolumn(
        name = "Desired",
        type_ = "string",
        json_path = ".spec.desiredState",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// ID of the image to boot, e.g. `emi-0123456789abcdef0` (`ami-` is accepted too).
    pub image_id: String,
    /// Name of the InstanceType giving the size, e.g. `m1.small`.
    pub instance_type: String,
    /// Name of the key pair whose public key is served to the guest.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_name: Option<String>,
    /// IDs of security groups (`sg-...`); reserved: validated, but security groups are not
    /// enforced yet (RunInstances refuses them).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub security_group_ids: Vec<String>,
    /// Base64-encoded user data served by the metadata service, at most 16 KiB decoded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_data: Option<String>,
    /// Zone to place the instance in; the scheduler picks one when unset.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub availability_zone: Option<String>,
    /// Power state asked for: StopInstances and StartInstances flip it between `running` and
    /// `stopped`; TerminateInstances sets `terminated`, which is final.
    #[serde(default)]
    pub desired_state: DesiredState,
    /// Idempotency token of the RunInstances call that created the instance.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_token: Option<String>,
    /// Reservation (`r-` and 17 hex digits) of the RunInstances call that created the instance.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reservation_id: Option<String>,
    /// Position of the instance in its reservation (EC2's `amiLaunchIndex`), from 0.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub launch_index: Option<u32>,
    /// When true, TerminateInstances refuses to terminate the instance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable_api_termination: bool,
    /// EC2 tags.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tags: Vec<Tag>,
    /// Kernel image (`eki-`) to boot instead of the machine image's own.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kernel_id: Option<String>,
    /// Ramdisk image (`eri-`) to boot instead of the machine image's own.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ramdisk_id: Option<String>,
    /// How the metadata service answers this instance (EC2's `MetadataOptions`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub metadata_options: Option<MetadataOptions>,
}

/// EC2 `InstanceMetadataOptions`: whether IMDSv2 session tokens are required.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOptions {
    /// `optional` (IMDSv1 and v2) or `required` (IMDSv2 only).
    #[serde(default)]
    pub http_tokens: HttpTokens,
    /// `enabled` or `disabled`: whether the metadata service answers at all.
    #[serde(default)]
    pub http_endpoint: HttpEndpoint,
    /// Hop limit of token responses (1 to 64).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub http_put_response_hop_limit: Option<u8>,
    /// `enabled` or `disabled`: whether the instance's tags are served under
    /// `meta-data/tags/instance/`.
    #[serde(default)]
    pub instance_metadata_tags: InstanceMetadataTags,
}

/// Whether the metadata service serves the instance's tags.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum InstanceMetadataTags {
    /// Tags are not served.
    #[default]
    Disabled,
    /// Tags are served under `meta-data/tags/instance/`.
    Enabled,
}

impl InstanceMetadataTags {
    /// The EC2 API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

/// Whether the metadata service requires IMDSv2 session tokens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpTokens {
    /// Requests with or without a token are served.
    #[default]
    Optional,
    /// Only requests with a valid token are served.
    Required,
}

impl HttpTokens {
    /// The EC2 API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// Whether the metadata service answers an instance.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpEndpoint {
    /// The service answers.
    #[default]
    Enabled,
    /// The service refuses every request.
    Disabled,
}

impl HttpEndpoint {
    /// The EC2 API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

/// What the operator resolved, at placement, for the node agent to boot: image locations and
/// checksums and the public keys (a node reads only its instances, never images or key pairs).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct LaunchSpec {
    /// The machine image's root disk, when it has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub root: Option<ImageArtifact>,
    /// The kernel to boot directly, when the image names one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kernel: Option<ImageArtifact>,
    /// The initial ramdisk booted with the kernel.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ramdisk: Option<ImageArtifact>,
    /// The key pair's public key in OpenSSH form, served by the metadata service.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub public_key: Option<String>,
    /// The instance's account ID, for the instance identity document.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub account_id: Option<String>,
    /// The zone's subnet, e.g. `172.31.0.0/20`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subnet_cidr: Option<String>,
}

/// One image a node must fetch: where it is, what it hashes to, its format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageArtifact {
    /// The image record's ID (`emi-`, `eki-`, `eri-`).
    pub image_id: String,
    /// An absolute path on the node or an HTTP(S) URL.
    pub location: String,
    /// SHA-256 of the bytes, lower-case hex.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sha256: Option<String>,
    /// `raw` or `qcow2`.
    #[serde(default)]
    pub format: crate::image::DiskImageFormat,
}

/// Power state an instance's owner asks for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Keep the instance running.
    #[default]
    Running,
    /// Keep the instance shut down, disks kept.
    Stopped,
    /// Shut the instance down for good and release its resources.
    Terminated,
}

impl DesiredState {
    /// The wire form, e.g. `running`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Terminated => "terminated",
        }
    }
}

/// EC2 instance state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Accepted; being scheduled or booted.
    #[default]
    Pending,
    /// The domain is running.
    Running,
    /// Being terminated.
    ShuttingDown,
    /// Gone for good; the record stays visible for a while, then is collected.
    Terminated,
    /// Being stopped.
    Stopping,
    /// Shut down, disks kept.
    Stopped,
}

impl InstanceState {
    /// The wire form, e.g. `shutting-down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }

    /// The EC2 `instanceState.code` (0 pending, 16 running, 32 shutting-down, 48 terminated,
    /// 64 stopping, 80 stopped).
    pub fn code(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Running => 16,
            Self::ShuttingDown => 32,
            Self::Terminated => 48,
            Self::Stopping => 64,
            Self::Stopped => 80,
        }
    }
}

/// Observed state of an instance: the operator writes the binding (`nodeName`), the addresses
/// and the EC2 state; the node agent writes only the `DomainRunning` condition, the console
/// output and the last reboot it carried out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// EC2 state: `pending`, `running`, `shutting-down`, `terminated`, `stopping` or `stopped`.
    #[serde(default)]
    pub state: InstanceState,
    /// Node the instance is bound to; set once by the scheduler. Agents watch the field selector
    /// `status.nodeName=<node>`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node_name: Option<String>,
    /// Zone the instance was placed in.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub availability_zone: Option<String>,
    /// Private IPv4 address.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub private_ip_address: Option<String>,
    /// Public IPv4 address; reserved: Karri assigns no public addresses yet.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub public_ip_address: Option<String>,
    /// When the instance last started running.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub launch_time: Option<Time>,
    /// When `state` last changed; terminated instances are collected a retention period later.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub state_transition_time: Option<Time>,
    /// The `metadata.generation` this status was computed from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub observed_generation: Option<i64>,
    /// Current conditions: `Scheduled` (bound to a node) and `Ready` (booted).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub conditions: Vec<Condition>,
    /// EC2-style reason code of the last state change, e.g. `Client.UserInitiatedShutdown`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Human-readable explanation of the last state change.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// The reboot request (the `karri.dev/reboot-requested-at` annotation RebootInstances sets)
    /// the node agent last carried out.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_reboot_request: Option<String>,
    /// MAC address of the instance's network interface.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mac_address: Option<String>,
    /// Private DNS name, e.g. `ip-172-31-0-5.karri-1.compute.internal`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub private_dns_name: Option<String>,
    /// What the node agent boots, resolved by the operator at placement.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub launch: Option<LaunchSpec>,
    /// The last part of the serial console output (at most 64 KiB), kept by the node agent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub console_output: Option<String>,
    /// When the node agent last updated `consoleOutput`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub console_output_time: Option<Time>,
}

impl Validate for InstanceSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id(
            "spec.imageId",
            &self.image_id,
            &["emi", "ami"],
            "emi-0123456789abcdef0",
        )?;
        if self.instance_type.is_empty() {
            return Err(ValidationError::invalid(
                "spec.instanceType",
                "not be empty",
            ));
        }
        check_record_name("spec.instanceType", &self.instance_type, "m1.small")?;
        if let Some(key) = &self.key_name {
            check_text("spec.keyName", key, 255)?;
        }
        for (i, id) in self.security_group_ids.iter().enumerate() {
            check_id(
                &format!("spec.securityGroupIds[{i}]"),
                id,
                &["sg"],
                "sg-0123456789abcdef0",
            )?;
        }
        if let Some(user_data) = &self.user_data {
            decode_user_data(user_data)?;
        }
        if let Some(zone) = &self.availability_zone {
            check_record_name("spec.availabilityZone", zone, "karri-1a")?;
        }
        if let Some(token) = &self.client_token {
            if token.is_empty() || token.len() > 64 || !token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ValidationError::invalid(
                    "spec.clientToken",
                    "be 1 to 64 printable ASCII characters",
                ));
            }
        }
        if let Some(id) = &self.reservation_id {
            check_id("spec.reservationId", id, &["r"], "r-0123456789abcdef0")?;
        }
        check_boot_ids(self.kernel_id.as_deref(), self.ramdisk_id.as_deref())?;
        if let Some(limit) = self
            .metadata_options
            .as_ref()
            .and_then(|o| o.http_put_response_hop_limit)
        {
            if !(1..=64).contains(&limit) {
                return Err(ValidationError::invalid(
                    "spec.metadataOptions.httpPutResponseHopLimit",
                    "be 1 to 64",
                ));
            }
        }
        check_tags("spec.tags", &self.tags)
    }
}

impl Validate for InstanceStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(node) = &self.node_name {
            check_record_name("status.nodeName", node, "node-1")?;
        }
        if let Some(ip) = &self.private_ip_address {
            check_ip("status.privateIpAddress", ip)?;
        }
        if let Some(ip) = &self.public_ip_address {
            check_ip("status.publicIpAddress", ip)?;
        }
        Ok(())
    }
}
