//! From decoded parameters to a typed request: which action, its validated arguments, `DryRun`
//! and the API version. Pure: no I/O, no lookups; whether an id *exists* is the handler's
//! business, whether it is *well-formed* is decided here.
//!
//! Order of checks, as EC2 does: `Action` (missing → `MissingAction`; a name EC2 does not have →
//! `InvalidAction`; a real EC2 action Karri does not implement → `UnsupportedOperation`), then
//! `Version` (`MissingParameter`), then parameters Karri knows but cannot honour
//! (`UnsupportedOperation`), then the action's own parameters, then whatever nobody read: a real
//! EC2 parameter that changes nothing essential in Karri (e.g. `Monitoring.Enabled`) is listed in
//! [`Request::ignored_params`] for the handler to log, anything else is `UnknownParameter`.

use base64::Engine as _;

use super::error::Ec2Error;
use super::filter::{self, Filter};
use super::params::{Params, Scope};

/// The EC2 API version this face implements (and the one its namespace names).
pub const API_VERSION: &str = "2016-11-15";
/// The instance type RunInstances uses when none is given (EC2's historical default).
pub const DEFAULT_INSTANCE_TYPE: &str = "m1.small";
/// The most user data an instance may have, decoded.
pub const MAX_USER_DATA: usize = 16 * 1024;
/// The most tags one resource may carry.
pub const MAX_TAGS_PER_RESOURCE: usize = 50;
/// The most IDs one list parameter may hold (`InstanceId.N`, `ResourceId.N`, ...), as EC2
/// documents for CreateTags and TerminateInstances: each unknown ID may cost a store read.
pub const MAX_IDS: usize = 1000;
/// Longest tag key, in characters.
pub const MAX_TAG_KEY_CHARS: usize = 128;
/// Longest tag value, in characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;
/// Longest `ClientToken`, in ASCII characters.
pub const MAX_CLIENT_TOKEN: usize = 64;
/// Longest key pair name, in ASCII characters.
pub const MAX_KEY_NAME: usize = 255;

/// A routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The action and its validated arguments.
    pub action: Action,
    /// `DryRun=true`: check permissions and arguments, change nothing, answer `DryRunOperation`.
    pub dry_run: bool,
    /// The `Version` the client sent (any value is accepted; responses use [`API_VERSION`]'s
    /// namespace).
    pub version: String,
    /// Real EC2 parameters of this action that Karri accepted but does not act on (e.g.
    /// `Monitoring.Enabled`, `IamInstanceProfile.Name`), by full name, sorted; for logging.
    pub ignored_params: Vec<String>,
}

/// Every action Karri serves, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Launch instances.
    RunInstances(RunInstances),
    /// Describe instances (grouped by reservation in the response).
    DescribeInstances(DescribeInstances),
    /// Describe instance state and status checks.
    DescribeInstanceStatus(DescribeInstanceStatus),
    /// Terminate instances.
    TerminateInstances(InstanceIds),
    /// Stop instances.
    StopInstances(StopInstances),
    /// Start stopped instances.
    StartInstances(InstanceIds),
    /// Reboot instances.
    RebootInstances(InstanceIds),
    /// Read one attribute of an instance.
    DescribeInstanceAttribute(DescribeInstanceAttribute),
    /// Change one attribute of an instance.
    ModifyInstanceAttribute(ModifyInstanceAttribute),
    /// Change the metadata service options of an instance.
    ModifyInstanceMetadataOptions(ModifyInstanceMetadataOptions),
    /// Read an instance's console output.
    GetConsoleOutput(GetConsoleOutput),
    /// Describe the instance types offered.
    DescribeInstanceTypes(DescribeInstanceTypes),
    /// Describe where each instance type is offered.
    DescribeInstanceTypeOfferings(DescribeInstanceTypeOfferings),
    /// Describe availability zones.
    DescribeAvailabilityZones(DescribeAvailabilityZones),
    /// Describe regions.
    DescribeRegions(DescribeRegions),
    /// Describe account attributes (`supported-platforms`, `default-vpc` …).
    DescribeAccountAttributes(DescribeAccountAttributes),
    /// Create a key pair (the private key is returned once).
    CreateKeyPair(CreateKeyPair),
    /// Import a public key.
    ImportKeyPair(ImportKeyPair),
    /// Describe key pairs.
    DescribeKeyPairs(DescribeKeyPairs),
    /// Delete a key pair.
    DeleteKeyPair(DeleteKeyPair),
    /// Describe images.
    DescribeImages(DescribeImages),
    /// Register an image.
    RegisterImage(RegisterImage),
    /// Deregister an image.
    DeregisterImage(DeregisterImage),
    /// Read one attribute of an image.
    DescribeImageAttribute(DescribeImageAttribute),
    /// Change an image's launch permissions or description.
    ModifyImageAttribute(ModifyImageAttribute),
    /// Add or overwrite tags.
    CreateTags(CreateTags),
    /// Delete tags.
    DeleteTags(DeleteTags),
    /// Describe tags.
    DescribeTags(DescribeTags),
    /// Describe VPCs.
    DescribeVpcs(DescribeVpcs),
    /// Describe subnets.
    DescribeSubnets(DescribeSubnets),
    /// Read one attribute of a VPC.
    DescribeVpcAttribute(DescribeVpcAttribute),
    /// Describe elastic IP addresses (Karri has none yet).
    DescribeAddresses(DescribeAddresses),
}

impl Action {
    /// The EC2 action name (`RunInstances` …); the response's root element is this name followed
    /// by `Response`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::RunInstances(_) => "RunInstances",
            Action::DescribeInstances(_) => "DescribeInstances",
            Action::DescribeInstanceStatus(_) => "DescribeInstanceStatus",
            Action::TerminateInstances(_) => "TerminateInstances",
            Action::StopInstances(_) => "StopInstances",
            Action::StartInstances(_) => "StartInstances",
            Action::RebootInstances(_) => "RebootInstances",
            Action::DescribeInstanceAttribute(_) => "DescribeInstanceAttribute",
            Action::ModifyInstanceAttribute(_) => "ModifyInstanceAttribute",
            Action::ModifyInstanceMetadataOptions(_) => "ModifyInstanceMetadataOptions",
            Action::GetConsoleOutput(_) => "GetConsoleOutput",
            Action::DescribeInstanceTypes(_) => "DescribeInstanceTypes",
            Action::DescribeInstanceTypeOfferings(_) => "DescribeInstanceTypeOfferings",
            Action::DescribeAvailabilityZones(_) => "DescribeAvailabilityZones",
            Action::DescribeRegions(_) => "DescribeRegions",
            Action::DescribeAccountAttributes(_) => "DescribeAccountAttributes",
            Action::CreateKeyPair(_) => "CreateKeyPair",
            Action::ImportKeyPair(_) => "ImportKeyPair",
            Action::DescribeKeyPairs(_) => "DescribeKeyPairs",
            Action::DeleteKeyPair(_) => "DeleteKeyPair",
            Action::DescribeImages(_) => "DescribeImages",
            Action::RegisterImage(_) => "RegisterImage",
            Action::DeregisterImage(_) => "DeregisterImage",
            Action::DescribeImageAttribute(_) => "DescribeImageAttribute",
            Action::ModifyImageAttribute(_) => "ModifyImageAttribute",
            Action::CreateTags(_) => "CreateTags",
            Action::DeleteTags(_) => "DeleteTags",
            Action::DescribeTags(_) => "DescribeTags",
            Action::DescribeVpcs(_) => "DescribeVpcs",
            Action::DescribeSubnets(_) => "DescribeSubnets",
            Action::DescribeVpcAttribute(_) => "DescribeVpcAttribute",
            Action::DescribeAddresses(_) => "DescribeAddresses",
        }
    }

    /// The root element of the success response: `{name}Response`.
    pub fn response_name(&self) -> String {
        format!("{}Response", self.name())
    }
}

// ----- Shared argument types ----------------------------------------------------------------

/// A tag to set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tag {
    /// Key: 1–128 characters, not starting with `aws:`.
    pub key: String,
    /// Value: 0–256 characters (an absent `Value` is the empty string).
    pub value: String,
}

/// A tag to delete: by key and, optionally, value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteTag {
    /// Key.
    pub key: String,
    /// `None`: delete whatever the value; `Some(v)`: delete only if the value is `v` (`Some("")`
    /// deletes only a tag whose value is empty).
    pub value: Option<String>,
}

/// `TagSpecification.N`: tags to put on resources an action creates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TagSpecification {
    /// The kind of resource they go on (`instance`, `volume`, `key-pair`, `image` …), one the
    /// action creates; no two specifications of a request name the same kind.
    pub resource_type: String,
    /// The tags (at least one, at most 50, keys unique).
    pub tags: Vec<Tag>,
}

/// `BlockDeviceMapping.N` (RunInstances, RegisterImage).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockDeviceMapping {
    /// Device name, e.g. `/dev/sda1` or `xvdb`.
    pub device_name: String,
    /// `ephemeralN` for an instance store volume.
    pub virtual_name: Option<String>,
    /// `NoDevice` was given: suppress the device the image maps there.
    pub no_device: bool,
    /// The EBS volume, when any `Ebs.*` parameter was given.
    pub ebs: Option<EbsBlockDevice>,
}

/// `BlockDeviceMapping.N.Ebs.*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EbsBlockDevice {
    /// Snapshot to create the volume from (`snap-…`).
    pub snapshot_id: Option<String>,
    /// Size in GiB, 1–65536.
    pub volume_size: Option<u32>,
    /// `standard`, `io1`, `io2`, `gp2`, `gp3`, `sc1` or `st1`.
    pub volume_type: Option<String>,
    /// Delete the volume when the instance terminates.
    pub delete_on_termination: Option<bool>,
    /// Provisioned IOPS.
    pub iops: Option<u32>,
    /// Encrypt the volume.
    pub encrypted: Option<bool>,
}

/// An implementation of a closed set of wire strings as a Rust enum.
pub trait WireEnum: Sized + Copy + 'static {
    /// Every value.
    const ALL: &'static [Self];
    /// The wire name.
    fn as_str(self) -> &'static str;
    /// The value with wire name `s` (case-sensitive).
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.as_str() == s)
    }
}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }
        impl WireEnum for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire),+
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// `InstanceInitiatedShutdownBehavior`: what a shutdown from inside the instance does.
    #[derive(Default)]
    ShutdownBehavior {
        /// Stop the instance (the default).
        #[default]
        Stop = "stop",
        /// Terminate the instance.
        Terminate = "terminate",
    }
}

wire_enum! {
    /// `KeyType` of CreateKeyPair.
    #[derive(Default)]
    KeyType {
        /// RSA 2048 (the default).
        #[default]
        Rsa = "rsa",
        /// ED25519.
        Ed25519 = "ed25519",
    }
}

wire_enum! {
    /// `KeyFormat` of CreateKeyPair: how the private key is returned.
    #[derive(Default)]
    KeyFormat {
        /// PEM (the default).
        #[default]
        Pem = "pem",
        /// PuTTY.
        Ppk = "ppk",
    }
}

wire_enum! {
    /// `Attribute` of DescribeInstanceAttribute (and the legacy form of ModifyInstanceAttribute).
    InstanceAttribute {
        /// `instanceType`.
        InstanceType = "instanceType",
        /// `kernel`.
        Kernel = "kernel",
        /// `ramdisk`.
        Ramdisk = "ramdisk",
        /// `userData`.
        UserData = "userData",
        /// `disableApiTermination`.
        DisableApiTermination = "disableApiTermination",
        /// `instanceInitiatedShutdownBehavior`.
        InstanceInitiatedShutdownBehavior = "instanceInitiatedShutdownBehavior",
        /// `rootDeviceName`.
        RootDeviceName = "rootDeviceName",
        /// `blockDeviceMapping`.
        BlockDeviceMapping = "blockDeviceMapping",
        /// `productCodes`.
        ProductCodes = "productCodes",
        /// `sourceDestCheck`.
        SourceDestCheck = "sourceDestCheck",
        /// `groupSet`.
        GroupSet = "groupSet",
        /// `ebsOptimized`.
        EbsOptimized = "ebsOptimized",
        /// `sriovNetSupport`.
        SriovNetSupport = "sriovNetSupport",
        /// `enaSupport`.
        EnaSupport = "enaSupport",
        /// `enclaveOptions`.
        EnclaveOptions = "enclaveOptions",
        /// `disableApiStop`.
        DisableApiStop = "disableApiStop",
    }
}

wire_enum! {
    /// `Attribute` of DescribeImageAttribute.
    ImageAttribute {
        /// `description`.
        Description = "description",
        /// `kernel`.
        Kernel = "kernel",
        /// `ramdisk`.
        Ramdisk = "ramdisk",
        /// `launchPermission`.
        LaunchPermission = "launchPermission",
        /// `productCodes`.
        ProductCodes = "productCodes",
        /// `blockDeviceMapping`.
        BlockDeviceMapping = "blockDeviceMapping",
        /// `sriovNetSupport`.
        SriovNetSupport = "sriovNetSupport",
        /// `bootMode`.
        BootMode = "bootMode",
        /// `tpmSupport`.
        TpmSupport = "tpmSupport",
        /// `uefiData`.
        UefiData = "uefiData",
        /// `lastLaunchedTime`.
        LastLaunchedTime = "lastLaunchedTime",
        /// `imdsSupport`.
        ImdsSupport = "imdsSupport",
        /// `deregistrationProtection`.
        DeregistrationProtection = "deregistrationProtection",
    }
}

// ----- Instances ------------------------------------------------------------------------------

/// RunInstances.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunInstances {
    /// `ImageId` (required; `ami-`/`emi-` …, well-formed).
    pub image_id: String,
    /// `InstanceType`, [`DEFAULT_INSTANCE_TYPE`] when absent (whether it exists is the handler's
    /// check: `Ec2Error::invalid_instance_type`).
    pub instance_type: String,
    /// `MinCount` (required, ≥ 1, ≤ `max_count`).
    pub min_count: u32,
    /// `MaxCount` (required, ≥ 1; launch as many as possible up to it, at least `min_count`).
    pub max_count: u32,
    /// `KeyName`.
    pub key_name: Option<String>,
    /// `UserData`: base64 text (whitespace removed), checked to decode to at most
    /// [`MAX_USER_DATA`] bytes.
    pub user_data: Option<String>,
    /// `Placement.AvailabilityZone`.
    pub availability_zone: Option<String>,
    /// `KernelId` (`aki-`/`eki-` …).
    pub kernel_id: Option<String>,
    /// `RamdiskId` (`ari-`/`eri-` …).
    pub ramdisk_id: Option<String>,
    /// `SecurityGroupId.N` (`sg-…`).
    pub security_group_ids: Vec<String>,
    /// `SecurityGroup.N`: security group names.
    pub security_groups: Vec<String>,
    /// `SubnetId` (`subnet-…`).
    pub subnet_id: Option<String>,
    /// `BlockDeviceMapping.N`.
    pub block_device_mappings: Vec<BlockDeviceMapping>,
    /// `TagSpecification.N` (resource types `instance`, `volume`, `network-interface`,
    /// `spot-instances-request`, `elastic-gpu`).
    pub tag_specifications: Vec<TagSpecification>,
    /// `ClientToken` (≤ 64 ASCII characters): idempotency key.
    pub client_token: Option<String>,
    /// `DisableApiTermination` (default false).
    pub disable_api_termination: bool,
    /// `DisableApiStop` (default false).
    pub disable_api_stop: bool,
    /// `EbsOptimized` (default false).
    pub ebs_optimized: bool,
    /// `InstanceInitiatedShutdownBehavior` (default `stop`).
    pub instance_initiated_shutdown_behavior: ShutdownBehavior,
    /// `MetadataOptions.HttpTokens` (`optional` or `required`).
    pub http_tokens: Option<String>,
    /// `MetadataOptions.HttpEndpoint` (`enabled` or `disabled`).
    pub http_endpoint: Option<String>,
    /// `MetadataOptions.HttpPutResponseHopLimit` (1–64).
    pub http_put_response_hop_limit: Option<u32>,
    /// `MetadataOptions.InstanceMetadataTags` (`enabled` or `disabled`).
    pub instance_metadata_tags: Option<String>,
}

/// DescribeInstances.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeInstances {
    /// `InstanceId.N` (well-formed). Not combinable with `max_results`.
    pub instance_ids: Vec<String>,
    /// `Filter.N`, names checked against [`filter::INSTANCE_FILTERS`] and tag filters.
    pub filters: Vec<Filter>,
    /// `MaxResults`, 5–1000.
    pub max_results: Option<u32>,
    /// `NextToken` (opaque; an empty one is `None`).
    pub next_token: Option<String>,
}

/// DescribeInstanceStatus.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeInstanceStatus {
    /// `InstanceId.N`. Not combinable with `max_results`.
    pub instance_ids: Vec<String>,
    /// `Filter.N` ([`filter::INSTANCE_STATUS_FILTERS`]).
    pub filters: Vec<Filter>,
    /// `IncludeAllInstances`: also instances that are not running (default false).
    pub include_all_instances: bool,
    /// `MaxResults`, 5–1000.
    pub max_results: Option<u32>,
    /// `NextToken`.
    pub next_token: Option<String>,
}

/// TerminateInstances, StartInstances, RebootInstances.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceIds {
    /// `InstanceId.N` (at least one, well-formed).
    pub instance_ids: Vec<String>,
}

/// StopInstances.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopInstances {
    /// `InstanceId.N` (at least one, well-formed).
    pub instance_ids: Vec<String>,
    /// `Force`: stop without a clean shutdown.
    pub force: bool,
}

/// DescribeInstanceAttribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeInstanceAttribute {
    /// `InstanceId`.
    pub instance_id: String,
    /// `Attribute`.
    pub attribute: InstanceAttribute,
}

/// The one change of a ModifyInstanceAttribute call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceAttributeChange {
    /// `InstanceType.Value` (or `Attribute=instanceType`).
    InstanceType(String),
    /// `Kernel.Value`.
    Kernel(String),
    /// `Ramdisk.Value`.
    Ramdisk(String),
    /// `UserData.Value`: base64 text, checked like RunInstances' `UserData`.
    UserData(String),
    /// `DisableApiTermination.Value`.
    DisableApiTermination(bool),
    /// `DisableApiStop.Value`.
    DisableApiStop(bool),
    /// `InstanceInitiatedShutdownBehavior.Value`.
    InstanceInitiatedShutdownBehavior(ShutdownBehavior),
    /// `SourceDestCheck.Value`.
    SourceDestCheck(bool),
    /// `EbsOptimized.Value`.
    EbsOptimized(bool),
    /// `EnaSupport.Value`.
    EnaSupport(bool),
    /// `SriovNetSupport.Value` (`simple`).
    SriovNetSupport(String),
    /// `GroupId.N`: replaces the security groups (`sg-…`, at least one).
    GroupSet(Vec<String>),
}

/// ModifyInstanceAttribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModifyInstanceAttribute {
    /// `InstanceId`.
    pub instance_id: String,
    /// Exactly one change.
    pub change: InstanceAttributeChange,
}

/// GetConsoleOutput.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GetConsoleOutput {
    /// `InstanceId`.
    pub instance_id: String,
    /// `Latest`: the most recent output only.
    pub latest: bool,
}

/// DescribeInstanceTypes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeInstanceTypes {
    /// `InstanceType.N`.
    pub instance_types: Vec<String>,
    /// `Filter.N` ([`filter::INSTANCE_TYPE_FILTERS`]).
    pub filters: Vec<Filter>,
    /// `MaxResults`, 5–100.
    pub max_results: Option<u32>,
    /// `NextToken`.
    pub next_token: Option<String>,
}

/// Where DescribeInstanceTypeOfferings says the types are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocationType {
    /// The region (the default).
    #[default]
    Region,
    /// Each availability zone, by name.
    AvailabilityZone,
    /// Each availability zone, by ID.
    AvailabilityZoneId,
}

impl LocationType {
    /// The EC2 spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Region => "region",
            Self::AvailabilityZone => "availability-zone",
            Self::AvailabilityZoneId => "availability-zone-id",
        }
    }
}

/// DescribeInstanceTypeOfferings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeInstanceTypeOfferings {
    /// `LocationType`.
    pub location_type: LocationType,
    /// `Filter.N` ([`filter::INSTANCE_TYPE_OFFERING_FILTERS`]).
    pub filters: Vec<Filter>,
    /// `MaxResults`, 5–1000.
    pub max_results: Option<u32>,
    /// `NextToken`.
    pub next_token: Option<String>,
}

// ----- Zones, regions, account ----------------------------------------------------------------

/// DescribeAvailabilityZones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeAvailabilityZones {
    /// `ZoneName.N`.
    pub zone_names: Vec<String>,
    /// `ZoneId.N`.
    pub zone_ids: Vec<String>,
    /// `Filter.N` ([`filter::AVAILABILITY_ZONE_FILTERS`]).
    pub filters: Vec<Filter>,
    /// `AllAvailabilityZones`.
    pub all_availability_zones: bool,
}

/// DescribeRegions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeRegions {
    /// `RegionName.N`.
    pub region_names: Vec<String>,
    /// `Filter.N` ([`filter::REGION_FILTERS`]).
    pub filters: Vec<Filter>,
    /// `AllRegions`.
    pub all_regions: bool,
}

/// The attribute names DescribeAccountAttributes accepts.
pub const ACCOUNT_ATTRIBUTES: &[&str] = &[
    "supported-platforms",
    "default-vpc",
    "max-instances",
    "vpc-max-security-groups-per-interface",
    "max-elastic-ips",
    "vpc-max-elastic-ips",
];

/// DescribeAccountAttributes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeAccountAttributes {
    /// `AttributeName.N`, each one of [`ACCOUNT_ATTRIBUTES`]; empty means all.
    pub attribute_names: Vec<String>,
}

// ----- Key pairs ------------------------------------------------------------------------------

/// CreateKeyPair.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateKeyPair {
    /// `KeyName` (1–255 ASCII characters).
    pub key_name: String,
    /// `KeyType` (default `rsa`).
    pub key_type: KeyType,
    /// `KeyFormat` (default `pem`).
    pub key_format: KeyFormat,
    /// `TagSpecification.N` (resource type `key-pair`).
    pub tag_specifications: Vec<TagSpecification>,
}

/// ImportKeyPair.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImportKeyPair {
    /// `KeyName` (1–255 ASCII characters).
    pub key_name: String,
    /// `PublicKeyMaterial`, base64-decoded: the public key text (OpenSSH, RFC 4716 …), UTF-8.
    /// Whether it is a valid key is the handler's check (`Ec2Error::key_pair_format`).
    pub public_key_material: String,
    /// `TagSpecification.N` (resource type `key-pair`).
    pub tag_specifications: Vec<TagSpecification>,
}

/// DescribeKeyPairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeKeyPairs {
    /// `KeyName.N`.
    pub key_names: Vec<String>,
    /// `KeyPairId.N` (`key-…`).
    pub key_pair_ids: Vec<String>,
    /// `Filter.N` ([`filter::KEY_PAIR_FILTERS`] and tag filters).
    pub filters: Vec<Filter>,
    /// `IncludePublicKey`.
    pub include_public_key: bool,
}

/// Which key pair DeleteKeyPair deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPairRef {
    /// `KeyName`.
    Name(String),
    /// `KeyPairId` (`key-…`).
    Id(String),
}

/// DeleteKeyPair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteKeyPair {
    /// `KeyName` or `KeyPairId` (exactly one).
    pub key: KeyPairRef,
}

// ----- Images ---------------------------------------------------------------------------------

/// DescribeImages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeImages {
    /// `ImageId.N` (well-formed). Not combinable with `max_results`.
    pub image_ids: Vec<String>,
    /// `Owner.N`: `self`, `amazon`, an account id …
    pub owners: Vec<String>,
    /// `ExecutableBy.N`: `self`, `all`, an account id …
    pub executable_by: Vec<String>,
    /// `Filter.N` ([`filter::IMAGE_FILTERS`] and tag filters).
    pub filters: Vec<Filter>,
    /// `IncludeDeprecated`.
    pub include_deprecated: bool,
    /// `MaxResults`, 5–1000.
    pub max_results: Option<u32>,
    /// `NextToken`.
    pub next_token: Option<String>,
}

/// The architectures RegisterImage accepts.
pub const ARCHITECTURES: &[&str] = &["i386", "x86_64", "arm64", "x86_64_mac", "arm64_mac"];
/// The virtualization types RegisterImage accepts.
pub const VIRTUALIZATION_TYPES: &[&str] = &["hvm", "paravirtual"];
/// The boot modes RegisterImage accepts.
pub const BOOT_MODES: &[&str] = &["legacy-bios", "uefi", "uefi-preferred"];
/// The EBS volume types a block device mapping accepts.
pub const VOLUME_TYPES: &[&str] = &["standard", "io1", "io2", "gp2", "gp3", "sc1", "st1"];

/// RegisterImage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegisterImage {
    /// `Name`: 3–128 characters of letters, digits, `()[] ./-'@_`.
    pub name: String,
    /// `ImageLocation`: the manifest (`bucket/path.manifest.xml`). This or a block device
    /// mapping is required.
    pub image_location: Option<String>,
    /// `Architecture`, one of [`ARCHITECTURES`].
    pub architecture: Option<String>,
    /// `KernelId` (`aki-`/`eki-` …).
    pub kernel_id: Option<String>,
    /// `RamdiskId` (`ari-`/`eri-` …).
    pub ramdisk_id: Option<String>,
    /// `RootDeviceName`, e.g. `/dev/sda1`.
    pub root_device_name: Option<String>,
    /// `Description` (≤ 255 characters).
    pub description: Option<String>,
    /// `VirtualizationType`, one of [`VIRTUALIZATION_TYPES`].
    pub virtualization_type: Option<String>,
    /// `BootMode`, one of [`BOOT_MODES`].
    pub boot_mode: Option<String>,
    /// `BlockDeviceMapping.N`.
    pub block_device_mappings: Vec<BlockDeviceMapping>,
    /// `TagSpecification.N` (resource type `image`; EC2's `snapshot` is refused, Karri has no
    /// EBS snapshots).
    pub tag_specifications: Vec<TagSpecification>,
}

/// DeregisterImage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeregisterImage {
    /// `ImageId`.
    pub image_id: String,
}

/// DescribeImageAttribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeImageAttribute {
    /// `ImageId`.
    pub image_id: String,
    /// `Attribute`.
    pub attribute: ImageAttribute,
}

/// Who a launch permission is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchPermission {
    /// `UserId`: one account.
    User(String),
    /// `Group=all`: everyone (the image is public).
    AllUsers,
}

/// The change of a ModifyImageAttribute call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageAttributeChange {
    /// `LaunchPermission.Add.N` / `LaunchPermission.Remove.N` (or the legacy
    /// `Attribute=launchPermission&OperationType=add|remove&UserId.N&UserGroup.N`). At least one
    /// of the two lists is non-empty.
    LaunchPermission {
        /// Permissions to grant.
        add: Vec<LaunchPermission>,
        /// Permissions to revoke.
        remove: Vec<LaunchPermission>,
    },
    /// `Description.Value` (or `Attribute=description&Value=…`), ≤ 255 characters.
    Description(String),
}

/// ModifyImageAttribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModifyImageAttribute {
    /// `ImageId`.
    pub image_id: String,
    /// The change.
    pub change: ImageAttributeChange,
}

// ----- Tags, VPCs, subnets --------------------------------------------------------------------

/// CreateTags.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateTags {
    /// `ResourceId.N` (1–1000, each of a known id kind, else `InvalidID`).
    pub resource_ids: Vec<String>,
    /// `Tag.N` (1–50, keys unique).
    pub tags: Vec<Tag>,
}

/// DeleteTags.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteTags {
    /// `ResourceId.N` (1–1000, each of a known id kind, else `InvalidID`).
    pub resource_ids: Vec<String>,
    /// `Tag.N`; empty means every user tag of the resources.
    pub tags: Vec<DeleteTag>,
}

/// DescribeTags.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeTags {
    /// `Filter.N` ([`filter::TAG_FILTERS`] and `tag:<key>`).
    pub filters: Vec<Filter>,
    /// `MaxResults`, 5–1000.
    pub max_results: Option<u32>,
    /// `NextToken`.
    pub next_token: Option<String>,
}

/// DescribeVpcs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeVpcs {
    /// `VpcId.N` (`vpc-…`).
    pub vpc_ids: Vec<String>,
    /// `Filter.N` ([`filter::VPC_FILTERS`] and tag filters).
    pub filters: Vec<Filter>,
    /// `MaxResults`, 5–1000.
    pub max_results: Option<u32>,
    /// `NextToken`.
    pub next_token: Option<String>,
}

/// DescribeSubnets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeSubnets {
    /// `SubnetId.N` (`subnet-…`).
    pub subnet_ids: Vec<String>,
    /// `Filter.N` ([`filter::SUBNET_FILTERS`] and tag filters).
    pub filters: Vec<Filter>,
    /// `MaxResults`, 5–1000.
    pub max_results: Option<u32>,
    /// `NextToken`.
    pub next_token: Option<String>,
}

/// ModifyInstanceMetadataOptions: the options given change, the others keep their values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModifyInstanceMetadataOptions {
    /// `InstanceId`.
    pub instance_id: String,
    /// `HttpTokens`: `optional` or `required`.
    pub http_tokens: Option<String>,
    /// `HttpPutResponseHopLimit`, 1–64.
    pub http_put_response_hop_limit: Option<u32>,
    /// `HttpEndpoint`: `enabled` or `disabled`.
    pub http_endpoint: Option<String>,
    /// `InstanceMetadataTags`: `enabled` or `disabled`.
    pub instance_metadata_tags: Option<String>,
}

/// DescribeVpcAttribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeVpcAttribute {
    /// `VpcId`.
    pub vpc_id: String,
    /// `Attribute`: `enableDnsSupport`, `enableDnsHostnames` or
    /// `enableNetworkAddressUsageMetrics`.
    pub attribute: String,
}

/// The attributes DescribeVpcAttribute reads.
pub const VPC_ATTRIBUTES: [&str; 3] = [
    "enableDnsSupport",
    "enableDnsHostnames",
    "enableNetworkAddressUsageMetrics",
];

/// DescribeAddresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeAddresses {
    /// `PublicIp.N`.
    pub public_ips: Vec<String>,
    /// `AllocationId.N` (`eipalloc-…`).
    pub allocation_ids: Vec<String>,
    /// `Filter.N` ([`filter::ADDRESS_FILTERS`] and tag filters).
    pub filters: Vec<Filter>,
}

// ----- Action names ---------------------------------------------------------------------------

/// The actions Karri serves (sorted).
pub const SUPPORTED_ACTIONS: &[&str] = &[
    "CreateKeyPair",
    "CreateTags",
    "DeleteKeyPair",
    "DeleteTags",
    "DeregisterImage",
    "DescribeAccountAttributes",
    "DescribeAddresses",
    "DescribeAvailabilityZones",
    "DescribeImageAttribute",
    "DescribeImages",
    "DescribeInstanceAttribute",
    "DescribeInstanceStatus",
    "DescribeInstanceTypeOfferings",
    "DescribeInstanceTypes",
    "DescribeInstances",
    "DescribeKeyPairs",
    "DescribeRegions",
    "DescribeSubnets",
    "DescribeTags",
    "DescribeVpcAttribute",
    "DescribeVpcs",
    "GetConsoleOutput",
    "ImportKeyPair",
    "ModifyImageAttribute",
    "ModifyInstanceAttribute",
    "ModifyInstanceMetadataOptions",
    "RebootInstances",
    "RegisterImage",
    "RunInstances",
    "StartInstances",
    "StopInstances",
    "TerminateInstances",
];

/// Real EC2 actions (all in the 2016-11-15 API) that Karri does not implement yet: they get
/// `UnsupportedOperation` rather than `InvalidAction`. Sorted.
pub const UNSUPPORTED_ACTIONS: &[&str] = &[
    "AcceptVpcPeeringConnection",
    "AllocateAddress",
    "AssignPrivateIpAddresses",
    "AssociateAddress",
    "AssociateDhcpOptions",
    "AssociateIamInstanceProfile",
    "AssociateRouteTable",
    "AttachInternetGateway",
    "AttachNetworkInterface",
    "AttachVolume",
    "AuthorizeSecurityGroupEgress",
    "AuthorizeSecurityGroupIngress",
    "BundleInstance",
    "CancelBundleTask",
    "CancelSpotInstanceRequests",
    "ConfirmProductInstance",
    "CopyImage",
    "CopySnapshot",
    "CreateCustomerGateway",
    "CreateDefaultSubnet",
    "CreateDefaultVpc",
    "CreateDhcpOptions",
    "CreateFleet",
    "CreateImage",
    "CreateInternetGateway",
    "CreateLaunchTemplate",
    "CreateNatGateway",
    "CreateNetworkAcl",
    "CreateNetworkAclEntry",
    "CreateNetworkInterface",
    "CreatePlacementGroup",
    "CreateRoute",
    "CreateRouteTable",
    "CreateSecurityGroup",
    "CreateSnapshot",
    "CreateSnapshots",
    "CreateSubnet",
    "CreateVolume",
    "CreateVpc",
    "CreateVpcPeeringConnection",
    "DeleteDhcpOptions",
    "DeleteInternetGateway",
    "DeleteLaunchTemplate",
    "DeleteNatGateway",
    "DeleteNetworkAcl",
    "DeleteNetworkInterface",
    "DeletePlacementGroup",
    "DeleteRoute",
    "DeleteRouteTable",
    "DeleteSecurityGroup",
    "DeleteSnapshot",
    "DeleteSubnet",
    "DeleteVolume",
    "DeleteVpc",
    "DescribeBundleTasks",
    "DescribeCapacityBlockOfferings",
    "DescribeCapacityReservations",
    "DescribeCarrierGateways",
    "DescribeConversionTasks",
    "DescribeCustomerGateways",
    "DescribeDhcpOptions",
    "DescribeEgressOnlyInternetGateways",
    "DescribeElasticGpus",
    "DescribeExportTasks",
    "DescribeFleets",
    "DescribeFlowLogs",
    "DescribeHostReservations",
    "DescribeHosts",
    "DescribeIamInstanceProfileAssociations",
    "DescribeIdFormat",
    "DescribeImportImageTasks",
    "DescribeInstanceConnectEndpoints",
    "DescribeInstanceCreditSpecifications",
    "DescribeInstanceEventWindows",
    "DescribeInstanceTopology",
    "DescribeInternetGateways",
    "DescribeLaunchTemplateVersions",
    "DescribeLaunchTemplates",
    "DescribeManagedPrefixLists",
    "DescribeNatGateways",
    "DescribeNetworkAcls",
    "DescribeNetworkInterfaces",
    "DescribePlacementGroups",
    "DescribePrefixLists",
    "DescribeReservedInstances",
    "DescribeReservedInstancesOfferings",
    "DescribeRouteTables",
    "DescribeSecurityGroupReferences",
    "DescribeSecurityGroupRules",
    "DescribeSecurityGroups",
    "DescribeSnapshotAttribute",
    "DescribeSnapshots",
    "DescribeSpotInstanceRequests",
    "DescribeSpotPriceHistory",
    "DescribeStaleSecurityGroups",
    "DescribeTransitGateways",
    "DescribeVolumeAttribute",
    "DescribeVolumeStatus",
    "DescribeVolumes",
    "DescribeVolumesModifications",
    "DescribeVpcEndpoints",
    "DescribeVpcPeeringConnections",
    "DescribeVpnConnections",
    "DescribeVpnGateways",
    "DetachInternetGateway",
    "DetachNetworkInterface",
    "DetachVolume",
    "DisassociateAddress",
    "DisassociateIamInstanceProfile",
    "DisassociateRouteTable",
    "EnableEbsEncryptionByDefault",
    "EnableVolumeIO",
    "GetEbsEncryptionByDefault",
    "GetPasswordData",
    "ImportImage",
    "ImportInstance",
    "ImportSnapshot",
    "ImportVolume",
    "ModifyInstancePlacement",
    "ModifyNetworkInterfaceAttribute",
    "ModifySnapshotAttribute",
    "ModifySubnetAttribute",
    "ModifyVolume",
    "ModifyVolumeAttribute",
    "ModifyVpcAttribute",
    "MonitorInstances",
    "ReleaseAddress",
    "ReplaceRoute",
    "ReplaceRouteTableAssociation",
    "ReportInstanceStatus",
    "RequestSpotInstances",
    "ResetImageAttribute",
    "ResetInstanceAttribute",
    "ResetSnapshotAttribute",
    "RevokeSecurityGroupEgress",
    "RevokeSecurityGroupIngress",
    "UnassignPrivateIpAddresses",
    "UnmonitorInstances",
];

/// Parameters every action accepts: the action itself, the version, `DryRun` and the
/// authentication parameters (SigV2 and SigV4 query signing), which the signature check reads.
pub const COMMON_PARAMS: &[&str] = &[
    "AWSAccessKeyId",
    "Action",
    "DryRun",
    "Expires",
    "SecurityToken",
    "Signature",
    "SignatureMethod",
    "SignatureVersion",
    "Timestamp",
    "Version",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
    "X-Amz-SignedHeaders",
];

/// What to do with parameters an action's parser does not read. Entries are parameter name
/// patterns matched segment by segment as a prefix of the key, `N` standing for any index:
/// `Placement` covers `Placement.Tenancy`, `BlockDeviceMapping.N.Ebs` covers
/// `BlockDeviceMapping.3.Ebs.KmsKeyId`.
struct ParamPolicy {
    /// Real EC2 parameters accepted and not acted on (reported in `ignored_params`).
    ignored: &'static [&'static str],
    /// Real EC2 parameters Karri cannot honour: `UnsupportedOperation`.
    unsupported: &'static [&'static str],
}

fn policy(action: &str) -> ParamPolicy {
    const NONE: &[&str] = &[];
    let (ignored, unsupported): (&'static [&'static str], &'static [&'static str]) = match action {
        "RunInstances" => (
            &[
                "AdditionalInfo",
                "BlockDeviceMapping.N.Ebs",
                "CapacityReservationSpecification",
                "CpuOptions",
                "CreditSpecification",
                "EnablePrimaryIpv6",
                "EnclaveOptions",
                "HibernationOptions",
                "MaintenanceOptions",
                "MetadataOptions",
                "Monitoring",
                "NetworkPerformanceOptions",
                "Operator",
                "Placement",
                "PrivateDnsNameOptions",
            ],
            &[
                "ElasticGpuSpecification",
                "ElasticInferenceAccelerator",
                // Karri has no IAM roles yet: a guest that expects role credentials would get
                // none, so the launch is refused rather than made without them.
                "IamInstanceProfile",
                "InstanceMarketOptions",
                "Ipv6Address",
                "Ipv6AddressCount",
                "LaunchTemplate",
                "LicenseSpecification",
                "PrivateIpAddress",
                "SecondaryInterface",
            ],
        ),
        "DescribeInstances" | "DescribeInstanceStatus" => (&["IncludeManagedResources"], NONE),
        "TerminateInstances" => (&["Force", "SkipOsShutdown"], NONE),
        "StopInstances" => (&["SkipOsShutdown"], NONE),
        "StartInstances" => (&["AdditionalInfo"], NONE),
        "ModifyInstanceAttribute" => (NONE, &["BlockDeviceMapping", "EnclaveOptions"]),
        "DescribeInstanceTypes" => (&["IncludeUnsupportedInRegion"], NONE),
        "DescribeImages" => (&["IncludeDisabled"], NONE),
        "RegisterImage" => (
            &[
                "BillingProduct",
                "BlockDeviceMapping.N.Ebs",
                "EnaSupport",
                "ImdsSupport",
                "SriovNetSupport",
                "TpmSupport",
                "UefiData",
            ],
            NONE,
        ),
        "DeregisterImage" => (&["DeleteAssociatedSnapshots"], NONE),
        "ModifyImageAttribute" => (
            NONE,
            &[
                "ImdsSupport",
                "LaunchPermission.Add.N.OrganizationArn",
                "LaunchPermission.Add.N.OrganizationalUnitArn",
                "LaunchPermission.Remove.N.OrganizationArn",
                "LaunchPermission.Remove.N.OrganizationalUnitArn",
                "OrganizationArn",
                "OrganizationalUnitArn",
                "ProductCode",
            ],
        ),
        _ => (NONE, NONE),
    };
    ParamPolicy {
        ignored,
        unsupported,
    }
}

/// Whether `pattern` (segments, `N` = any all-digit segment) is a segment prefix of `key`.
fn pattern_covers(pattern: &str, key: &str) -> bool {
    let mut keys = key.split('.');
    pattern.split('.').all(|p| match keys.next() {
        Some(k) if p == "N" => !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()),
        Some(k) => p == k,
        None => false,
    })
}

// ----- Routing --------------------------------------------------------------------------------

/// Routes a request: see the module documentation for the order of checks.
pub fn route(params: &Params) -> Result<Request, Ec2Error> {
    let name = match params.get("Action") {
        Some(name) if !name.is_empty() => name,
        _ => return Err(Ec2Error::missing_action()),
    };
    if SUPPORTED_ACTIONS.binary_search(&name).is_err() {
        return Err(if UNSUPPORTED_ACTIONS.binary_search(&name).is_ok() {
            Ec2Error::unsupported_action(name)
        } else {
            Ec2Error::invalid_action(name)
        });
    }
    let version = params.required("Version")?.to_string();
    let dry_run = params.flag("DryRun")?;
    for common in COMMON_PARAMS {
        params.mark_used(common);
    }

    let policy = policy(name);
    if let Some((key, _)) = params
        .iter()
        .find(|(key, _)| policy.unsupported.iter().any(|p| pattern_covers(p, key)))
    {
        return Err(Ec2Error::unsupported_parameter(key));
    }

    let action =
        parse_action(name, params).unwrap_or_else(|| Err(Ec2Error::invalid_action(name)))?;

    let mut ignored_params = Vec::new();
    for key in params.unused() {
        if policy.ignored.iter().any(|p| pattern_covers(p, key)) {
            ignored_params.push(key.to_string());
        } else {
            return Err(Ec2Error::unknown_parameter(key));
        }
    }
    Ok(Request {
        action,
        dry_run,
        version,
        ignored_params,
    })
}

/// The parser of each supported action (`None` for any other name).
fn parse_action(name: &str, p: &Params) -> Option<Result<Action, Ec2Error>> {
    let parsed = match name {
        "RunInstances" => run_instances(p).map(Action::RunInstances),
        "DescribeInstances" => describe_instances(p).map(Action::DescribeInstances),
        "DescribeInstanceStatus" => describe_instance_status(p).map(Action::DescribeInstanceStatus),
        "TerminateInstances" => instance_id_list(p).map(Action::TerminateInstances),
        "StopInstances" => stop_instances(p).map(Action::StopInstances),
        "StartInstances" => instance_id_list(p).map(Action::StartInstances),
        "RebootInstances" => instance_id_list(p).map(Action::RebootInstances),
        "DescribeInstanceAttribute" => {
            describe_instance_attribute(p).map(Action::DescribeInstanceAttribute)
        }
        "ModifyInstanceAttribute" => {
            modify_instance_attribute(p).map(Action::ModifyInstanceAttribute)
        }
        "ModifyInstanceMetadataOptions" => {
            modify_instance_metadata_options(p).map(Action::ModifyInstanceMetadataOptions)
        }
        "GetConsoleOutput" => get_console_output(p).map(Action::GetConsoleOutput),
        "DescribeInstanceTypes" => describe_instance_types(p).map(Action::DescribeInstanceTypes),
        "DescribeInstanceTypeOfferings" => {
            describe_instance_type_offerings(p).map(Action::DescribeInstanceTypeOfferings)
        }
        "DescribeAvailabilityZones" => {
            describe_availability_zones(p).map(Action::DescribeAvailabilityZones)
        }
        "DescribeRegions" => describe_regions(p).map(Action::DescribeRegions),
        "DescribeAccountAttributes" => {
            describe_account_attributes(p).map(Action::DescribeAccountAttributes)
        }
        "CreateKeyPair" => create_key_pair(p).map(Action::CreateKeyPair),
        "ImportKeyPair" => import_key_pair(p).map(Action::ImportKeyPair),
        "DescribeKeyPairs" => describe_key_pairs(p).map(Action::DescribeKeyPairs),
        "DeleteKeyPair" => delete_key_pair(p).map(Action::DeleteKeyPair),
        "DescribeImages" => describe_images(p).map(Action::DescribeImages),
        "RegisterImage" => register_image(p).map(Action::RegisterImage),
        "DeregisterImage" => deregister_image(p).map(Action::DeregisterImage),
        "DescribeImageAttribute" => describe_image_attribute(p).map(Action::DescribeImageAttribute),
        "ModifyImageAttribute" => modify_image_attribute(p).map(Action::ModifyImageAttribute),
        "CreateTags" => create_tags(p).map(Action::CreateTags),
        "DeleteTags" => delete_tags(p).map(Action::DeleteTags),
        "DescribeTags" => describe_tags(p).map(Action::DescribeTags),
        "DescribeVpcs" => describe_vpcs(p).map(Action::DescribeVpcs),
        "DescribeVpcAttribute" => describe_vpc_attribute(p).map(Action::DescribeVpcAttribute),
        "DescribeAddresses" => describe_addresses(p).map(Action::DescribeAddresses),
        "DescribeSubnets" => describe_subnets(p).map(Action::DescribeSubnets),
        _ => return None,
    };
    Some(parsed)
}

// ----- Ids ------------------------------------------------------------------------------------

/// Image id prefixes: AWS's `ami`/`aki`/`ari` and Eucalyptus' `emi`/`eki`/`eri`.
pub const IMAGE_ID_PREFIXES: &[&str] = &["ami", "aki", "ari", "emi", "eki", "eri"];

/// Id prefixes CreateTags / DeleteTags accept.
pub const TAGGABLE_ID_PREFIXES: &[&str] = &[
    "acl", "aki", "ami", "ari", "dopt", "eipalloc", "eki", "emi", "eni", "eri", "i", "igw", "key",
    "lt", "nat", "pcx", "rtb", "sg", "snap", "subnet", "vol", "vpc", "vpce",
];

/// Whether `id` is `{prefix}-` followed by 8 or 17 lowercase hexadecimal digits.
pub fn is_ec2_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            (hex.len() == 8 || hex.len() == 17)
                && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
}

/// Whether `id` is a well-formed id with one of `prefixes`.
pub fn is_ec2_id_of(id: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| is_ec2_id(id, p))
}

/// Checks an instance id: `InvalidInstanceID.Malformed` unless `i-` + 8 or 17 hex digits.
pub fn validate_instance_id(id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id(id, "i") {
        Ok(())
    } else {
        Err(Ec2Error::instance_id_malformed(id))
    }
}

/// Checks an image id (any of [`IMAGE_ID_PREFIXES`]): `InvalidAMIID.Malformed` otherwise.
pub fn validate_image_id(id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id_of(id, IMAGE_ID_PREFIXES) {
        Ok(())
    } else {
        Err(Ec2Error::image_id_malformed(id))
    }
}

/// Checks a resource id for CreateTags / DeleteTags: `InvalidID` unless of a known kind.
pub fn validate_resource_id(id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id_of(id, TAGGABLE_ID_PREFIXES) {
        Ok(())
    } else {
        Err(Ec2Error::invalid_id(id))
    }
}

fn validate_key_pair_id(name: &str, id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id(id, "key") {
        Ok(())
    } else {
        Err(Ec2Error::invalid_value(name, id, "Expected: 'key-...'."))
    }
}

fn validate_group_id(id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id(id, "sg") {
        Ok(())
    } else {
        Err(Ec2Error::group_id_malformed(id))
    }
}

fn validate_vpc_id(id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id(id, "vpc") {
        Ok(())
    } else {
        Err(Ec2Error::vpc_id_malformed(id))
    }
}

fn validate_subnet_id(id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id(id, "subnet") {
        Ok(())
    } else {
        Err(Ec2Error::subnet_id_malformed(id))
    }
}

fn validate_snapshot_id(id: &str) -> Result<(), Ec2Error> {
    if is_ec2_id(id, "snap") {
        Ok(())
    } else {
        Err(Ec2Error::snapshot_id_malformed(id))
    }
}

// ----- Argument helpers -----------------------------------------------------------------------

/// An optional string; an empty value counts as absent.
fn opt(p: &Scope<'_>, name: &str) -> Option<String> {
    p.get(name).filter(|v| !v.is_empty()).map(str::to_string)
}

/// An optional string of at most `max` characters.
fn opt_bounded(p: &Scope<'_>, name: &str, max: usize) -> Result<Option<String>, Ec2Error> {
    let value = opt(p, name);
    if let Some(v) = &value {
        check_length(&p.key(name), v, max)?;
    }
    Ok(value)
}

fn check_length(name: &str, value: &str, max: usize) -> Result<(), Ec2Error> {
    if value.chars().count() > max {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "Value for parameter {name} is invalid. Length exceeds maximum of {max} characters."
        )));
    }
    Ok(())
}

/// A list of strings, each checked by `validate`.
fn id_list(
    p: &Scope<'_>,
    name: &str,
    validate: impl Fn(&str) -> Result<(), Ec2Error>,
) -> Result<Vec<String>, Ec2Error> {
    id_list_of_at_most(p, name, MAX_IDS, validate)
}

/// [`id_list`] for an action that takes at most `max` IDs.
fn id_list_of_at_most(
    p: &Scope<'_>,
    name: &str,
    max: usize,
    validate: impl Fn(&str) -> Result<(), Ec2Error>,
) -> Result<Vec<String>, Ec2Error> {
    let ids = p.list(name)?;
    if ids.len() > max {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "At most {max} IDs may be given in {}.N; {} were.",
            p.key(name),
            ids.len()
        )));
    }
    ids.into_iter()
        .map(|id| validate(id).map(|()| id.to_string()))
        .collect()
}

/// A list of plain strings.
fn strings(p: &Scope<'_>, name: &str) -> Result<Vec<String>, Ec2Error> {
    Ok(p.list(name)?.into_iter().map(str::to_string).collect())
}

/// A one-of-a-set string parameter.
fn enum_param<T: WireEnum>(p: &Scope<'_>, name: &str) -> Result<Option<T>, Ec2Error> {
    match p.get(name) {
        None => Ok(None),
        Some(value) => T::parse(value).map(Some).ok_or_else(|| {
            let expected: Vec<&str> = T::ALL.iter().map(|v| v.as_str()).collect();
            Ec2Error::invalid_value(
                &p.key(name),
                value,
                &format!("Expected one of: {}.", expected.join(", ")),
            )
        }),
    }
}

/// A string parameter that must be one of `allowed`.
fn one_of(p: &Scope<'_>, name: &str, allowed: &[&str]) -> Result<Option<String>, Ec2Error> {
    match p.get(name) {
        None => Ok(None),
        Some(value) if allowed.contains(&value) => Ok(Some(value.to_string())),
        Some(value) => Err(Ec2Error::invalid_value(
            &p.key(name),
            value,
            &format!("Expected one of: {}.", allowed.join(", ")),
        )),
    }
}

/// `Filter.N`, names checked.
fn filters(p: &Params, allowed: &[&str], taggable: bool) -> Result<Vec<Filter>, Ec2Error> {
    let filters = p.filters()?;
    filter::validate_names(&filters, allowed, taggable)?;
    Ok(filters)
}

/// `MaxResults` within `range` and `NextToken`.
fn paging(
    p: &Params,
    range: std::ops::RangeInclusive<u32>,
) -> Result<(Option<u32>, Option<String>), Ec2Error> {
    Ok((p.int("MaxResults", range)?, opt(&p.root(), "NextToken")))
}

/// `MaxResults` may not come with a list of ids (DescribeInstances, DescribeImages …).
fn no_max_results_with(
    ids: &[String],
    max_results: Option<u32>,
    what: &str,
) -> Result<(), Ec2Error> {
    if !ids.is_empty() && max_results.is_some() {
        return Err(Ec2Error::invalid_parameter_combination(format!(
            "The parameter {what} cannot be used with the parameter MaxResults"
        )));
    }
    Ok(())
}

/// Base64 user data: whitespace removed, must decode, at most [`MAX_USER_DATA`] bytes decoded.
pub fn check_user_data(value: &str) -> Result<String, Ec2Error> {
    let text: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    // Reject what cannot fit before decoding it.
    if text.len() > (MAX_USER_DATA / 3 + 1) * 4 {
        return Err(user_data_too_long());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|_| Ec2Error::invalid_parameter_value("Invalid BASE64 encoding of user data."))?;
    if decoded.len() > MAX_USER_DATA {
        return Err(user_data_too_long());
    }
    Ok(text)
}

fn user_data_too_long() -> Ec2Error {
    Ec2Error::invalid_parameter_value(format!("User data is limited to {MAX_USER_DATA} bytes"))
}

/// Checks a tag key and value.
fn check_tag(key: &str, value: &str) -> Result<(), Ec2Error> {
    if key.is_empty() {
        return Err(Ec2Error::invalid_parameter_value(
            "Tag keys must not be empty.",
        ));
    }
    if key.chars().count() > MAX_TAG_KEY_CHARS {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "Tag key exceeds the maximum length of {MAX_TAG_KEY_CHARS} characters"
        )));
    }
    if value.chars().count() > MAX_TAG_VALUE_CHARS {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "Tag value exceeds the maximum length of {MAX_TAG_VALUE_CHARS} characters"
        )));
    }
    if key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:")) {
        return Err(Ec2Error::invalid_parameter_value(
            "Tag keys starting with 'aws:' are reserved for internal use",
        ));
    }
    Ok(())
}

/// Tags to set (`Tag.N` under `p`): checked, keys unique, 1–50 of them.
fn tags_to_set(p: &Scope<'_>, name: &str) -> Result<Vec<Tag>, Ec2Error> {
    let raw = p.tags(name)?;
    if raw.len() > MAX_TAGS_PER_RESOURCE {
        return Err(Ec2Error::tag_limit_exceeded());
    }
    let mut tags: Vec<Tag> = Vec::with_capacity(raw.len());
    for (key, value) in raw {
        let value = value.unwrap_or_default();
        check_tag(&key, &value)?;
        if tags.iter().any(|t| t.key == key) {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "Duplicate tag key '{key}' specified."
            )));
        }
        tags.push(Tag { key, value });
    }
    Ok(tags)
}

/// `TagSpecification.N` with resource types from `allowed`.
fn tag_specifications(p: &Params, allowed: &[&str]) -> Result<Vec<TagSpecification>, Ec2Error> {
    let mut specs: Vec<TagSpecification> = Vec::new();
    for spec in p.structs("TagSpecification")? {
        let resource_type = match spec.get("ResourceType") {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => {
                return Err(Ec2Error::invalid_parameter_value(
                    "Tag specification resource type must have a value",
                ))
            }
        };
        if !allowed.contains(&resource_type.as_str()) {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "'{resource_type}' is not a valid taggable resource type for this operation."
            )));
        }
        if specs.iter().any(|s| s.resource_type == resource_type) {
            return Err(Ec2Error::invalid_parameter_value(
                "The same resource type may not be specified more than once in tag specifications",
            ));
        }
        let tags = tags_to_set(&spec, "Tag")?;
        if tags.is_empty() {
            return Err(Ec2Error::invalid_parameter_value(
                "Tag specification must have at least one tag",
            ));
        }
        specs.push(TagSpecification {
            resource_type,
            tags,
        });
    }
    Ok(specs)
}

/// `BlockDeviceMapping.N`.
fn block_device_mappings(p: &Params) -> Result<Vec<BlockDeviceMapping>, Ec2Error> {
    p.structs("BlockDeviceMapping")?
        .into_iter()
        .map(|m| {
            let device_name = m.required("DeviceName")?.to_string();
            check_length(&m.key("DeviceName"), &device_name, 64)?;
            let ebs = if m.contains_any("Ebs") {
                let snapshot_id = opt(&m, "Ebs.SnapshotId");
                if let Some(id) = &snapshot_id {
                    validate_snapshot_id(id)?;
                }
                Some(EbsBlockDevice {
                    snapshot_id,
                    volume_size: m.int("Ebs.VolumeSize", 1..=65_536)?,
                    volume_type: one_of(&m, "Ebs.VolumeType", VOLUME_TYPES)?,
                    delete_on_termination: m.bool("Ebs.DeleteOnTermination")?,
                    iops: m.int("Ebs.Iops", 1..=256_000)?,
                    encrypted: m.bool("Ebs.Encrypted")?,
                })
            } else {
                None
            };
            Ok(BlockDeviceMapping {
                device_name,
                virtual_name: opt_bounded(&m, "VirtualName", 64)?,
                no_device: m.get("NoDevice").is_some(),
                ebs,
            })
        })
        .collect()
}

/// `KeyName`: 1–255 ASCII characters.
fn key_name(p: &Params) -> Result<String, Ec2Error> {
    let name = p.required("KeyName")?;
    check_key_name(name)?;
    Ok(name.to_string())
}

fn check_key_name(name: &str) -> Result<(), Ec2Error> {
    if !name.is_ascii() {
        return Err(Ec2Error::invalid_value(
            "KeyName",
            name,
            "Character sets beyond ASCII are not supported.",
        ));
    }
    check_length("KeyName", name, MAX_KEY_NAME)
}

fn optional_image_id(p: &Params, name: &str) -> Result<Option<String>, Ec2Error> {
    let id = opt(&p.root(), name);
    if let Some(id) = &id {
        validate_image_id(id)?;
    }
    Ok(id)
}

fn required_instance_id(p: &Params) -> Result<String, Ec2Error> {
    let id = p.required("InstanceId")?;
    validate_instance_id(id)?;
    Ok(id.to_string())
}

fn required_image_id(p: &Params) -> Result<String, Ec2Error> {
    let id = p.required("ImageId")?;
    validate_image_id(id)?;
    Ok(id.to_string())
}

// ----- Parsers --------------------------------------------------------------------------------

fn run_instances(p: &Params) -> Result<RunInstances, Ec2Error> {
    let root = p.root();
    let image_id = required_image_id(p)?;
    let instance_type = match opt(&root, "InstanceType") {
        Some(t) if t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(Ec2Error::invalid_instance_type(&t))
        }
        Some(t) => t,
        None => DEFAULT_INSTANCE_TYPE.to_string(),
    };
    let positive = 1..=i32::MAX as u32;
    let min_count = p
        .int("MinCount", positive.clone())?
        .ok_or_else(|| Ec2Error::missing_parameter("MinCount"))?;
    let max_count = p
        .int("MaxCount", positive)?
        .ok_or_else(|| Ec2Error::missing_parameter("MaxCount"))?;
    if min_count > max_count {
        return Err(Ec2Error::invalid_value(
            "MinCount",
            &min_count.to_string(),
            &format!("MinCount must be less than or equal to MaxCount ({max_count})."),
        ));
    }
    let key_name = opt(&root, "KeyName");
    if let Some(name) = &key_name {
        check_key_name(name)?;
    }
    let user_data = p.get("UserData").map(check_user_data).transpose()?;
    let client_token = opt(&root, "ClientToken");
    if let Some(token) = &client_token {
        if token.len() > MAX_CLIENT_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Ec2Error::invalid_value(
                "ClientToken",
                token,
                &format!("Expected at most {MAX_CLIENT_TOKEN} printable ASCII characters."),
            ));
        }
    }
    let mut subnet_id = opt(&root, "SubnetId");
    if let Some(id) = &subnet_id {
        validate_subnet_id(id)?;
    }
    let security_groups = strings(&root, "SecurityGroup")?;
    for name in &security_groups {
        check_length("SecurityGroup", name, 255)?;
    }
    let mut security_group_ids = id_list(&root, "SecurityGroupId", validate_group_id)?;
    if let Some(nic) = primary_interface(p)? {
        // As EC2: with a network interface, the subnet and groups are the interface's.
        if subnet_id.is_some() {
            return Err(Ec2Error::invalid_parameter_combination(
                "Network interfaces and an instance-level subnet ID may not be specified on the same request",
            ));
        }
        if !security_group_ids.is_empty() || !security_groups.is_empty() {
            return Err(Ec2Error::invalid_parameter_combination(
                "Network interfaces and an instance-level security groups may not be specified on the same request",
            ));
        }
        subnet_id = nic.subnet_id;
        security_group_ids = nic.security_group_ids;
    }
    Ok(RunInstances {
        image_id,
        instance_type,
        min_count,
        max_count,
        key_name,
        user_data,
        availability_zone: opt_bounded(&root, "Placement.AvailabilityZone", 64)?,
        kernel_id: optional_image_id(p, "KernelId")?,
        ramdisk_id: optional_image_id(p, "RamdiskId")?,
        security_group_ids,
        security_groups,
        subnet_id,
        block_device_mappings: block_device_mappings(p)?,
        tag_specifications: tag_specifications(
            p,
            &[
                "instance",
                "volume",
                "network-interface",
                "spot-instances-request",
                "elastic-gpu",
            ],
        )?,
        client_token,
        disable_api_termination: p.flag("DisableApiTermination")?,
        disable_api_stop: p.flag("DisableApiStop")?,
        ebs_optimized: p.flag("EbsOptimized")?,
        instance_initiated_shutdown_behavior: enum_param(
            &root,
            "InstanceInitiatedShutdownBehavior",
        )?
        .unwrap_or_default(),
        http_tokens: one_of(
            &root,
            "MetadataOptions.HttpTokens",
            &["optional", "required"],
        )?,
        http_endpoint: one_of(
            &root,
            "MetadataOptions.HttpEndpoint",
            &["enabled", "disabled"],
        )?,
        http_put_response_hop_limit: p.int("MetadataOptions.HttpPutResponseHopLimit", 1..=64)?,
        instance_metadata_tags: one_of(
            &root,
            "MetadataOptions.InstanceMetadataTags",
            &["enabled", "disabled"],
        )?,
    })
}

/// What RunInstances takes from its one network interface specification.
struct PrimaryInterface {
    subnet_id: Option<String>,
    security_group_ids: Vec<String>,
}

/// The instance's network interface as `NetworkInterface.N.*` describes it (what Ansible's
/// `ec2_instance` and Terraform always send): the primary interface only (device index 0),
/// created with the instance and deleted with it, in a subnet, with security groups, without a
/// public address. Anything else about it (a second interface, an existing interface, chosen
/// private addresses, a public address) is `UnsupportedOperation`.
fn primary_interface(p: &Params) -> Result<Option<PrimaryInterface>, Ec2Error> {
    const KNOWN: [&str; 6] = [
        "DeviceIndex",
        "SubnetId",
        "DeleteOnTermination",
        "AssociatePublicIpAddress",
        "Description",
        "SecurityGroupId",
    ];
    let specs = p.root().structs("NetworkInterface")?;
    let Some(nic) = specs.first() else {
        return Ok(None);
    };
    if let Some(second) = specs.get(1) {
        return Err(Ec2Error::unsupported_operation(format!(
            "{}: Karri gives an instance one network interface; specify only the primary one (device index 0).",
            second.prefix().trim_end_matches('.')
        )));
    }
    if let Some((key, _)) = p.iter().find(|(key, _)| {
        key.strip_prefix(nic.prefix()).is_some_and(|rest| {
            let field = rest.split('.').next().unwrap_or(rest);
            !KNOWN.contains(&field)
        })
    }) {
        return Err(Ec2Error::unsupported_parameter(key));
    }
    match nic.int("DeviceIndex", 0..=u32::MAX)? {
        Some(0) => {}
        Some(_) => {
            return Err(Ec2Error::unsupported_operation(format!(
                "{}: Karri gives an instance only its primary network interface, device index 0.",
                nic.key("DeviceIndex")
            )))
        }
        None => return Err(Ec2Error::missing_parameter(&nic.key("DeviceIndex"))),
    }
    if nic.bool("DeleteOnTermination")? == Some(false) {
        return Err(Ec2Error::unsupported_operation(format!(
            "{}=false: an instance's network interface is deleted with it on Karri.",
            nic.key("DeleteOnTermination")
        )));
    }
    if nic.bool("AssociatePublicIpAddress")? == Some(true) {
        return Err(Ec2Error::unsupported_operation(format!(
            "{}=true: Karri gives instances no public addresses yet.",
            nic.key("AssociatePublicIpAddress")
        )));
    }
    let _description = opt_bounded(nic, "Description", 255)?;
    let subnet_id = opt(nic, "SubnetId");
    if let Some(id) = &subnet_id {
        validate_subnet_id(id)?;
    }
    let security_group_ids = id_list(nic, "SecurityGroupId", validate_group_id)?;
    Ok(Some(PrimaryInterface {
        subnet_id,
        security_group_ids,
    }))
}

fn describe_instances(p: &Params) -> Result<DescribeInstances, Ec2Error> {
    let instance_ids = id_list(&p.root(), "InstanceId", validate_instance_id)?;
    let (max_results, next_token) = paging(p, 5..=1000)?;
    no_max_results_with(&instance_ids, max_results, "InstanceId")?;
    Ok(DescribeInstances {
        instance_ids,
        filters: filters(p, filter::INSTANCE_FILTERS, true)?,
        max_results,
        next_token,
    })
}

/// DescribeInstanceStatus takes at most 100 instance IDs (AWS's API reference).
const MAX_STATUS_IDS: usize = 100;

fn describe_instance_status(p: &Params) -> Result<DescribeInstanceStatus, Ec2Error> {
    let instance_ids = id_list_of_at_most(
        &p.root(),
        "InstanceId",
        MAX_STATUS_IDS,
        validate_instance_id,
    )?;
    let (max_results, next_token) = paging(p, 5..=1000)?;
    no_max_results_with(&instance_ids, max_results, "InstanceId")?;
    Ok(DescribeInstanceStatus {
        instance_ids,
        filters: filters(p, filter::INSTANCE_STATUS_FILTERS, false)?,
        include_all_instances: p.flag("IncludeAllInstances")?,
        max_results,
        next_token,
    })
}

fn required_instance_ids(p: &Params) -> Result<Vec<String>, Ec2Error> {
    let ids = id_list(&p.root(), "InstanceId", validate_instance_id)?;
    if ids.is_empty() {
        return Err(Ec2Error::missing_parameter("InstanceId"));
    }
    Ok(ids)
}

fn instance_id_list(p: &Params) -> Result<InstanceIds, Ec2Error> {
    Ok(InstanceIds {
        instance_ids: required_instance_ids(p)?,
    })
}

fn stop_instances(p: &Params) -> Result<StopInstances, Ec2Error> {
    let instance_ids = required_instance_ids(p)?;
    if p.flag("Hibernate")? {
        return Err(Ec2Error::unsupported_parameter("Hibernate"));
    }
    Ok(StopInstances {
        instance_ids,
        force: p.flag("Force")?,
    })
}

fn describe_instance_attribute(p: &Params) -> Result<DescribeInstanceAttribute, Ec2Error> {
    let instance_id = required_instance_id(p)?;
    p.required("Attribute")?;
    let attribute = enum_param(&p.root(), "Attribute")?
        .ok_or_else(|| Ec2Error::missing_parameter("Attribute"))?;
    Ok(DescribeInstanceAttribute {
        instance_id,
        attribute,
    })
}

/// A `.Value` or legacy `Value` string as an instance attribute change.
fn instance_change_from(
    attribute: InstanceAttribute,
    name: &str,
    value: &str,
) -> Result<InstanceAttributeChange, Ec2Error> {
    let boolean = |value: &str| {
        if value.eq_ignore_ascii_case("true") {
            Ok(true)
        } else if value.eq_ignore_ascii_case("false") {
            Ok(false)
        } else {
            Err(Ec2Error::invalid_value(
                name,
                value,
                "Expected a boolean: true or false.",
            ))
        }
    };
    let nonempty = |value: &str| {
        if value.is_empty() {
            Err(Ec2Error::missing_parameter(name))
        } else {
            Ok(value.to_string())
        }
    };
    use InstanceAttributeChange as C;
    Ok(match attribute {
        InstanceAttribute::InstanceType => {
            let t = nonempty(value)?;
            if t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Ec2Error::invalid_instance_type(&t));
            }
            C::InstanceType(t)
        }
        InstanceAttribute::Kernel => {
            let id = nonempty(value)?;
            validate_image_id(&id)?;
            C::Kernel(id)
        }
        InstanceAttribute::Ramdisk => {
            let id = nonempty(value)?;
            validate_image_id(&id)?;
            C::Ramdisk(id)
        }
        InstanceAttribute::UserData => C::UserData(check_user_data(value)?),
        InstanceAttribute::DisableApiTermination => C::DisableApiTermination(boolean(value)?),
        InstanceAttribute::DisableApiStop => C::DisableApiStop(boolean(value)?),
        InstanceAttribute::InstanceInitiatedShutdownBehavior => {
            C::InstanceInitiatedShutdownBehavior(ShutdownBehavior::parse(value).ok_or_else(
                || Ec2Error::invalid_value(name, value, "Expected one of: stop, terminate."),
            )?)
        }
        InstanceAttribute::SourceDestCheck => C::SourceDestCheck(boolean(value)?),
        InstanceAttribute::EbsOptimized => C::EbsOptimized(boolean(value)?),
        InstanceAttribute::EnaSupport => C::EnaSupport(boolean(value)?),
        InstanceAttribute::SriovNetSupport => C::SriovNetSupport(nonempty(value)?),
        InstanceAttribute::GroupSet => {
            let id = nonempty(value)?;
            validate_group_id(&id)?;
            C::GroupSet(vec![id])
        }
        InstanceAttribute::BlockDeviceMapping | InstanceAttribute::EnclaveOptions => {
            return Err(Ec2Error::unsupported_operation(format!(
                "Modifying the attribute {attribute} is not supported by Karri yet."
            )))
        }
        InstanceAttribute::RootDeviceName | InstanceAttribute::ProductCodes => {
            return Err(Ec2Error::invalid_value(
                "Attribute",
                attribute.as_str(),
                "The attribute cannot be modified.",
            ))
        }
    })
}

fn modify_instance_attribute(p: &Params) -> Result<ModifyInstanceAttribute, Ec2Error> {
    let instance_id = required_instance_id(p)?;
    let mut changes = Vec::new();
    // The structured form: `<Attribute>.Value`.
    const STRUCTURED: &[(&str, InstanceAttribute)] = &[
        ("InstanceType.Value", InstanceAttribute::InstanceType),
        ("Kernel.Value", InstanceAttribute::Kernel),
        ("Ramdisk.Value", InstanceAttribute::Ramdisk),
        ("UserData.Value", InstanceAttribute::UserData),
        (
            "DisableApiTermination.Value",
            InstanceAttribute::DisableApiTermination,
        ),
        ("DisableApiStop.Value", InstanceAttribute::DisableApiStop),
        (
            "InstanceInitiatedShutdownBehavior.Value",
            InstanceAttribute::InstanceInitiatedShutdownBehavior,
        ),
        ("SourceDestCheck.Value", InstanceAttribute::SourceDestCheck),
        ("EbsOptimized.Value", InstanceAttribute::EbsOptimized),
        ("EnaSupport.Value", InstanceAttribute::EnaSupport),
        ("SriovNetSupport.Value", InstanceAttribute::SriovNetSupport),
    ];
    for (name, attribute) in STRUCTURED {
        if let Some(value) = p.get(name) {
            changes.push(instance_change_from(*attribute, name, value)?);
        }
    }
    let groups = id_list(&p.root(), "GroupId", validate_group_id)?;
    if !groups.is_empty() {
        changes.push(InstanceAttributeChange::GroupSet(groups));
    }
    // The legacy form: `Attribute` + `Value`.
    match (p.get("Attribute"), p.get("Value")) {
        (None, None) => {}
        (Some(_), None) => return Err(Ec2Error::missing_parameter("Value")),
        (None, Some(_)) => return Err(Ec2Error::missing_parameter("Attribute")),
        (Some(_), Some(value)) => {
            let attribute = enum_param::<InstanceAttribute>(&p.root(), "Attribute")?
                .ok_or_else(|| Ec2Error::missing_parameter("Attribute"))?;
            changes.push(instance_change_from(attribute, "Value", value)?);
        }
    }
    if changes.len() > 1 {
        return Err(Ec2Error::invalid_parameter_combination(
            "Only one attribute can be modified at a time.",
        ));
    }
    let change = changes.pop().ok_or_else(|| {
        Ec2Error::invalid_parameter_combination("No attribute to modify was specified.")
    })?;
    Ok(ModifyInstanceAttribute {
        instance_id,
        change,
    })
}

fn get_console_output(p: &Params) -> Result<GetConsoleOutput, Ec2Error> {
    Ok(GetConsoleOutput {
        instance_id: required_instance_id(p)?,
        latest: p.flag("Latest")?,
    })
}

fn describe_instance_types(p: &Params) -> Result<DescribeInstanceTypes, Ec2Error> {
    let (max_results, next_token) = paging(p, 5..=100)?;
    Ok(DescribeInstanceTypes {
        instance_types: strings(&p.root(), "InstanceType")?,
        filters: filters(p, filter::INSTANCE_TYPE_FILTERS, false)?,
        max_results,
        next_token,
    })
}

fn describe_instance_type_offerings(p: &Params) -> Result<DescribeInstanceTypeOfferings, Ec2Error> {
    let (max_results, next_token) = paging(p, 5..=1000)?;
    let location_type = match opt(&p.root(), "LocationType").as_deref() {
        None | Some("region") => LocationType::Region,
        Some("availability-zone") => LocationType::AvailabilityZone,
        Some("availability-zone-id") => LocationType::AvailabilityZoneId,
        Some(other) => {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "Value ({other}) for parameter locationType is invalid. Valid values are region, availability-zone, availability-zone-id."
            )))
        }
    };
    Ok(DescribeInstanceTypeOfferings {
        location_type,
        filters: filters(p, filter::INSTANCE_TYPE_OFFERING_FILTERS, false)?,
        max_results,
        next_token,
    })
}

fn describe_availability_zones(p: &Params) -> Result<DescribeAvailabilityZones, Ec2Error> {
    Ok(DescribeAvailabilityZones {
        zone_names: strings(&p.root(), "ZoneName")?,
        zone_ids: strings(&p.root(), "ZoneId")?,
        filters: filters(p, filter::AVAILABILITY_ZONE_FILTERS, false)?,
        all_availability_zones: p.flag("AllAvailabilityZones")?,
    })
}

fn describe_regions(p: &Params) -> Result<DescribeRegions, Ec2Error> {
    Ok(DescribeRegions {
        region_names: strings(&p.root(), "RegionName")?,
        filters: filters(p, filter::REGION_FILTERS, false)?,
        all_regions: p.flag("AllRegions")?,
    })
}

fn describe_account_attributes(p: &Params) -> Result<DescribeAccountAttributes, Ec2Error> {
    let attribute_names = strings(&p.root(), "AttributeName")?;
    if let Some(bad) = attribute_names
        .iter()
        .find(|n| !ACCOUNT_ATTRIBUTES.contains(&n.as_str()))
    {
        return Err(Ec2Error::invalid_value(
            "AttributeName",
            bad,
            &format!("Expected one of: {}.", ACCOUNT_ATTRIBUTES.join(", ")),
        ));
    }
    Ok(DescribeAccountAttributes { attribute_names })
}

fn create_key_pair(p: &Params) -> Result<CreateKeyPair, Ec2Error> {
    Ok(CreateKeyPair {
        key_name: key_name(p)?,
        key_type: enum_param(&p.root(), "KeyType")?.unwrap_or_default(),
        key_format: enum_param(&p.root(), "KeyFormat")?.unwrap_or_default(),
        tag_specifications: tag_specifications(p, &["key-pair"])?,
    })
}

fn import_key_pair(p: &Params) -> Result<ImportKeyPair, Ec2Error> {
    let key_name = key_name(p)?;
    let material = p.required("PublicKeyMaterial")?;
    let text: String = material
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|_| {
            Ec2Error::invalid_parameter_value(
                "Value for parameter PublicKeyMaterial is invalid. It must be base64-encoded.",
            )
        })?;
    let public_key_material =
        String::from_utf8(decoded).map_err(|_| Ec2Error::key_pair_format())?;
    Ok(ImportKeyPair {
        key_name,
        public_key_material,
        tag_specifications: tag_specifications(p, &["key-pair"])?,
    })
}

fn describe_key_pairs(p: &Params) -> Result<DescribeKeyPairs, Ec2Error> {
    Ok(DescribeKeyPairs {
        key_names: strings(&p.root(), "KeyName")?,
        key_pair_ids: id_list(&p.root(), "KeyPairId", |id| {
            validate_key_pair_id("KeyPairId", id)
        })?,
        filters: filters(p, filter::KEY_PAIR_FILTERS, true)?,
        include_public_key: p.flag("IncludePublicKey")?,
    })
}

fn delete_key_pair(p: &Params) -> Result<DeleteKeyPair, Ec2Error> {
    let root = p.root();
    let key = match (opt(&root, "KeyName"), opt(&root, "KeyPairId")) {
        (Some(_), Some(_)) => {
            return Err(Ec2Error::invalid_parameter_combination(
                "The parameter KeyName cannot be used with the parameter KeyPairId",
            ))
        }
        (Some(name), None) => {
            check_key_name(&name)?;
            KeyPairRef::Name(name)
        }
        (None, Some(id)) => {
            validate_key_pair_id("KeyPairId", &id)?;
            KeyPairRef::Id(id)
        }
        (None, None) => return Err(Ec2Error::missing_parameter("KeyName or KeyPairId")),
    };
    Ok(DeleteKeyPair { key })
}

fn describe_images(p: &Params) -> Result<DescribeImages, Ec2Error> {
    let image_ids = id_list(&p.root(), "ImageId", validate_image_id)?;
    let (max_results, next_token) = paging(p, 5..=1000)?;
    no_max_results_with(&image_ids, max_results, "ImageId")?;
    Ok(DescribeImages {
        image_ids,
        owners: strings(&p.root(), "Owner")?,
        executable_by: strings(&p.root(), "ExecutableBy")?,
        filters: filters(p, filter::IMAGE_FILTERS, true)?,
        include_deprecated: p.flag("IncludeDeprecated")?,
        max_results,
        next_token,
    })
}

/// EC2's image name rule: 3–128 of letters, digits, `()[] ./-'@_`.
fn check_image_name(name: &str) -> Result<(), Ec2Error> {
    let length = name.chars().count();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c);
    if !(3..=128).contains(&length) || !name.chars().all(allowed) {
        return Err(Ec2Error::image_name_malformed());
    }
    Ok(())
}

fn register_image(p: &Params) -> Result<RegisterImage, Ec2Error> {
    let root = p.root();
    let name = p.required("Name")?.to_string();
    check_image_name(&name)?;
    let image = RegisterImage {
        name,
        image_location: opt_bounded(&root, "ImageLocation", 1024)?,
        architecture: one_of(&root, "Architecture", ARCHITECTURES)?,
        kernel_id: optional_image_id(p, "KernelId")?,
        ramdisk_id: optional_image_id(p, "RamdiskId")?,
        root_device_name: opt_bounded(&root, "RootDeviceName", 64)?,
        description: opt_bounded(&root, "Description", 255)?,
        virtualization_type: one_of(&root, "VirtualizationType", VIRTUALIZATION_TYPES)?,
        boot_mode: one_of(&root, "BootMode", BOOT_MODES)?,
        block_device_mappings: block_device_mappings(p)?,
        tag_specifications: tag_specifications(p, &["image", "snapshot"])?,
    };
    // EC2 puts `snapshot` tags on the EBS snapshots the image is made of; Karri has none.
    if image
        .tag_specifications
        .iter()
        .any(|s| s.resource_type == "snapshot")
    {
        return Err(Ec2Error::unsupported_operation(
            "Karri has no EBS snapshots to tag: use a TagSpecification of resource type image only.",
        ));
    }
    if image.image_location.is_none() && image.block_device_mappings.is_empty() {
        return Err(Ec2Error::invalid_parameter_combination(
            "Either ImageLocation or a BlockDeviceMapping for the root device must be specified.",
        ));
    }
    Ok(image)
}

fn deregister_image(p: &Params) -> Result<DeregisterImage, Ec2Error> {
    Ok(DeregisterImage {
        image_id: required_image_id(p)?,
    })
}

fn describe_image_attribute(p: &Params) -> Result<DescribeImageAttribute, Ec2Error> {
    let image_id = required_image_id(p)?;
    p.required("Attribute")?;
    let attribute = enum_param(&p.root(), "Attribute")?
        .ok_or_else(|| Ec2Error::missing_parameter("Attribute"))?;
    Ok(DescribeImageAttribute {
        image_id,
        attribute,
    })
}

/// `LaunchPermission.{Add,Remove}.N.{UserId,Group}`.
fn launch_permissions(p: &Params, name: &str) -> Result<Vec<LaunchPermission>, Ec2Error> {
    p.structs(name)?
        .into_iter()
        .map(|entry| match (opt(&entry, "UserId"), entry.get("Group")) {
            (Some(_), Some(_)) => Err(Ec2Error::invalid_parameter_combination(format!(
                "The parameter {} cannot be used with the parameter {}",
                entry.key("UserId"),
                entry.key("Group")
            ))),
            (Some(user), None) => Ok(LaunchPermission::User(user)),
            (None, Some(group)) => group_permission(&entry.key("Group"), group),
            (None, None) => Err(Ec2Error::missing_parameter(&entry.key("UserId"))),
        })
        .collect()
}

fn group_permission(name: &str, group: &str) -> Result<LaunchPermission, Ec2Error> {
    if group == "all" {
        Ok(LaunchPermission::AllUsers)
    } else {
        Err(Ec2Error::invalid_value(name, group, "Expected: all."))
    }
}

fn modify_image_attribute(p: &Params) -> Result<ModifyImageAttribute, Ec2Error> {
    let image_id = required_image_id(p)?;
    let root = p.root();
    let mut changes = Vec::new();

    let add = launch_permissions(p, "LaunchPermission.Add")?;
    let remove = launch_permissions(p, "LaunchPermission.Remove")?;
    if !add.is_empty() || !remove.is_empty() {
        changes.push(ImageAttributeChange::LaunchPermission { add, remove });
    }
    if let Some(description) = p.get("Description.Value") {
        check_length("Description.Value", description, 255)?;
        changes.push(ImageAttributeChange::Description(description.to_string()));
    }

    // The legacy form: `Attribute` (+ `OperationType`, `UserId.N`, `UserGroup.N`, or `Value`).
    let attribute = p.get("Attribute");
    let operation = p.get("OperationType");
    let users = strings(&root, "UserId")?;
    let groups = root.list("UserGroup")?;
    let value = p.get("Value");
    let legacy_permission = operation.is_some() || !users.is_empty() || !groups.is_empty();
    match attribute {
        Some("launchPermission") | None if legacy_permission => {
            let operation =
                operation.ok_or_else(|| Ec2Error::missing_parameter("OperationType"))?;
            let mut permissions: Vec<LaunchPermission> =
                users.into_iter().map(LaunchPermission::User).collect();
            for group in groups {
                permissions.push(group_permission("UserGroup", group)?);
            }
            if permissions.is_empty() {
                return Err(Ec2Error::missing_parameter("UserId"));
            }
            let change = match operation {
                "add" => ImageAttributeChange::LaunchPermission {
                    add: permissions,
                    remove: Vec::new(),
                },
                "remove" => ImageAttributeChange::LaunchPermission {
                    add: Vec::new(),
                    remove: permissions,
                },
                other => {
                    return Err(Ec2Error::invalid_value(
                        "OperationType",
                        other,
                        "Expected one of: add, remove.",
                    ))
                }
            };
            changes.push(change);
        }
        Some("launchPermission") => {
            if changes.is_empty() {
                return Err(Ec2Error::missing_parameter("OperationType"));
            }
        }
        Some("description") => {
            if legacy_permission {
                return Err(Ec2Error::invalid_parameter_combination(
                    "OperationType, UserId and UserGroup apply to the attribute launchPermission only.",
                ));
            }
            let value = value.ok_or_else(|| Ec2Error::missing_parameter("Value"))?;
            check_length("Value", value, 255)?;
            changes.push(ImageAttributeChange::Description(value.to_string()));
        }
        Some(other) => {
            return Err(Ec2Error::invalid_value(
                "Attribute",
                other,
                "Expected one of: description, launchPermission.",
            ))
        }
        None => {
            if value.is_some() {
                return Err(Ec2Error::missing_parameter("Attribute"));
            }
        }
    }

    if changes.len() > 1 {
        return Err(Ec2Error::invalid_parameter_combination(
            "Only one attribute can be modified at a time.",
        ));
    }
    let change = changes.pop().ok_or_else(|| {
        Ec2Error::invalid_parameter_combination("No attribute to modify was specified.")
    })?;
    if let ImageAttributeChange::LaunchPermission { add, remove } = &change {
        for permission in add.iter().chain(remove) {
            if let LaunchPermission::User(user) = permission {
                check_launch_user(user)?;
            }
        }
    }
    Ok(ModifyImageAttribute { image_id, change })
}

/// A launch permission's `UserId` must be an account ID (12 digits); EC2 answers any other with
/// `InvalidAMIAttributeItemValue`.
fn check_launch_user(user: &str) -> Result<(), Ec2Error> {
    if crds::is_valid_account_id(user) {
        Ok(())
    } else {
        Err(Ec2Error::new(
            "InvalidAMIAttributeItemValue",
            400,
            format!("Invalid attribute item value \"{user}\" for userId item type."),
        ))
    }
}

fn resource_ids(p: &Params) -> Result<Vec<String>, Ec2Error> {
    let ids = id_list(&p.root(), "ResourceId", validate_resource_id)?;
    if ids.is_empty() {
        return Err(Ec2Error::missing_parameter("ResourceId"));
    }
    Ok(ids)
}

fn create_tags(p: &Params) -> Result<CreateTags, Ec2Error> {
    let resource_ids = resource_ids(p)?;
    let tags = tags_to_set(&p.root(), "Tag")?;
    if tags.is_empty() {
        return Err(Ec2Error::missing_parameter("Tag"));
    }
    Ok(CreateTags { resource_ids, tags })
}

fn delete_tags(p: &Params) -> Result<DeleteTags, Ec2Error> {
    let resource_ids = resource_ids(p)?;
    let tags = p
        .tags("Tag")?
        .into_iter()
        .map(|(key, value)| {
            check_tag(&key, value.as_deref().unwrap_or_default())?;
            Ok(DeleteTag { key, value })
        })
        .collect::<Result<Vec<_>, Ec2Error>>()?;
    Ok(DeleteTags { resource_ids, tags })
}

fn describe_tags(p: &Params) -> Result<DescribeTags, Ec2Error> {
    let (max_results, next_token) = paging(p, 5..=1000)?;
    Ok(DescribeTags {
        filters: filters(p, filter::TAG_FILTERS, true)?,
        max_results,
        next_token,
    })
}

fn describe_vpcs(p: &Params) -> Result<DescribeVpcs, Ec2Error> {
    let (max_results, next_token) = paging(p, 5..=1000)?;
    Ok(DescribeVpcs {
        vpc_ids: id_list(&p.root(), "VpcId", validate_vpc_id)?,
        filters: filters(p, filter::VPC_FILTERS, true)?,
        max_results,
        next_token,
    })
}

fn modify_instance_metadata_options(p: &Params) -> Result<ModifyInstanceMetadataOptions, Ec2Error> {
    let root = p.root();
    let instance_id = required_instance_id(p)?;
    if one_of(&root, "HttpProtocolIpv6", &["enabled", "disabled"])?.as_deref() == Some("enabled") {
        return Err(Ec2Error::unsupported_operation(
            "HttpProtocolIpv6=enabled: Karri's metadata service has no IPv6 address.",
        ));
    }
    let a = ModifyInstanceMetadataOptions {
        instance_id,
        http_tokens: one_of(&root, "HttpTokens", &["optional", "required"])?,
        http_put_response_hop_limit: p.int("HttpPutResponseHopLimit", 1..=64)?,
        http_endpoint: one_of(&root, "HttpEndpoint", &["enabled", "disabled"])?,
        instance_metadata_tags: one_of(&root, "InstanceMetadataTags", &["enabled", "disabled"])?,
    };
    if a.http_tokens.is_none()
        && a.http_put_response_hop_limit.is_none()
        && a.http_endpoint.is_none()
        && a.instance_metadata_tags.is_none()
    {
        return Err(Ec2Error::invalid_parameter_combination(
            "Specify at least one of HttpTokens, HttpPutResponseHopLimit, HttpEndpoint and InstanceMetadataTags.",
        ));
    }
    Ok(a)
}

fn describe_vpc_attribute(p: &Params) -> Result<DescribeVpcAttribute, Ec2Error> {
    let vpc_id = p.required("VpcId")?.to_string();
    validate_vpc_id(&vpc_id)?;
    let attribute = p.required("Attribute")?.to_string();
    if !VPC_ATTRIBUTES.contains(&attribute.as_str()) {
        return Err(Ec2Error::invalid_value(
            "Attribute",
            &attribute,
            &format!("Expected one of: {}.", VPC_ATTRIBUTES.join(", ")),
        ));
    }
    Ok(DescribeVpcAttribute { vpc_id, attribute })
}

fn describe_addresses(p: &Params) -> Result<DescribeAddresses, Ec2Error> {
    let root = p.root();
    Ok(DescribeAddresses {
        public_ips: strings(&root, "PublicIp")?,
        allocation_ids: strings(&root, "AllocationId")?,
        filters: filters(p, filter::ADDRESS_FILTERS, true)?,
    })
}

fn describe_subnets(p: &Params) -> Result<DescribeSubnets, Ec2Error> {
    let (max_results, next_token) = paging(p, 5..=1000)?;
    Ok(DescribeSubnets {
        subnet_ids: id_list(&p.root(), "SubnetId", validate_subnet_id)?,
        filters: filters(p, filter::SUBNET_FILTERS, true)?,
        max_results,
        next_token,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Routes `query`, adding `Version=2016-11-15` unless it has one.
    fn route_query(query: &str) -> Result<Request, Ec2Error> {
        let query = if query.contains("Version=") {
            query.to_string()
        } else {
            format!("{query}&Version={API_VERSION}")
        };
        route(&Params::parse_form(query.as_bytes()).unwrap())
    }

    fn action(query: &str) -> Action {
        match route_query(query) {
            Ok(request) => request.action,
            Err(err) => panic!("{query}: {err}"),
        }
    }

    fn error(query: &str) -> Ec2Error {
        match route_query(query) {
            Ok(request) => panic!("{query}: expected an error, got {request:?}"),
            Err(err) => err,
        }
    }

    fn s(v: &str) -> String {
        v.to_string()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn tag(k: &str, v: &str) -> Tag {
        Tag {
            key: s(k),
            value: s(v),
        }
    }

    fn run(image: &str, instance_type: &str, min: u32, max: u32) -> RunInstances {
        RunInstances {
            image_id: s(image),
            instance_type: s(instance_type),
            min_count: min,
            max_count: max,
            ..Default::default()
        }
    }

    /// Example requests of the EC2 API reference (each page's "Examples" section; `AUTHPARAMS`
    /// and the version are left out there and added by `route_query`).
    #[test]
    fn documented_example_requests_route_to_typed_actions() {
        let rows: Vec<(&str, Action)> = vec![
            (
                "Action=RunInstances&ImageId=ami-0abcdef1234567890&InstanceType=t2.micro&MaxCount=1&MinCount=1&KeyName=my-key-pair",
                Action::RunInstances(RunInstances {
                    key_name: Some(s("my-key-pair")),
                    ..run("ami-0abcdef1234567890", "t2.micro", 1, 1)
                }),
            ),
            (
                "Action=RunInstances&ImageId=ami-2bb65342&MaxCount=3&MinCount=1&Placement.AvailabilityZone=us-east-1a&Monitoring.Enabled=true",
                Action::RunInstances(RunInstances {
                    availability_zone: Some(s("us-east-1a")),
                    ..run("ami-2bb65342", DEFAULT_INSTANCE_TYPE, 1, 3)
                }),
            ),
            (
                "Action=DescribeInstances&Filter.1.Name=instance-type&Filter.1.Value.1=m1.small&Filter.1.Value.2=m1.large",
                Action::DescribeInstances(DescribeInstances {
                    filters: vec![Filter::new("instance-type", ["m1.small", "m1.large"])],
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstances&Filter.1.Name=instance-type&Filter.1.Value.1=m1.small&Filter.1.Value.2=m1.large&Filter.2.Name=block-device-mapping.status&Filter.2.Value.1=attached",
                Action::DescribeInstances(DescribeInstances {
                    filters: vec![
                        Filter::new("instance-type", ["m1.small", "m1.large"]),
                        Filter::new("block-device-mapping.status", ["attached"]),
                    ],
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstances&Filter.1.Name=tag:Owner&Filter.1.Value.1=DbAdmin&Filter.2.Name=tag-key&Filter.2.Value.1=Purpose",
                Action::DescribeInstances(DescribeInstances {
                    filters: vec![
                        Filter::new("tag:Owner", ["DbAdmin"]),
                        Filter::new("tag-key", ["Purpose"]),
                    ],
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstanceStatus&InstanceId.1=i-1234567890abcdef0&InstanceId.2=i-0598c7d356eba48d7",
                Action::DescribeInstanceStatus(DescribeInstanceStatus {
                    instance_ids: strs(&["i-1234567890abcdef0", "i-0598c7d356eba48d7"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstanceStatus&Filter.1.Name=system-status.status&Filter.1.Value.1=impaired",
                Action::DescribeInstanceStatus(DescribeInstanceStatus {
                    filters: vec![Filter::new("system-status.status", ["impaired"])],
                    ..Default::default()
                }),
            ),
            (
                "Action=TerminateInstances&InstanceId.1=i-1234567890abcdef0",
                Action::TerminateInstances(InstanceIds {
                    instance_ids: strs(&["i-1234567890abcdef0"]),
                }),
            ),
            (
                "Action=StopInstances&InstanceId.1=i-1234567890abcdef0",
                Action::StopInstances(StopInstances {
                    instance_ids: strs(&["i-1234567890abcdef0"]),
                    force: false,
                }),
            ),
            (
                "Action=StartInstances&InstanceId.1=i-1234567890abcdef0",
                Action::StartInstances(InstanceIds {
                    instance_ids: strs(&["i-1234567890abcdef0"]),
                }),
            ),
            (
                "Action=RebootInstances&InstanceId.1=i-1234567890abcdef0",
                Action::RebootInstances(InstanceIds {
                    instance_ids: strs(&["i-1234567890abcdef0"]),
                }),
            ),
            (
                "Action=GetConsoleOutput&InstanceId=i-10a64379",
                Action::GetConsoleOutput(GetConsoleOutput {
                    instance_id: s("i-10a64379"),
                    latest: false,
                }),
            ),
            (
                "Action=DescribeInstanceAttribute&InstanceId=i-10a64379&Attribute=kernel",
                Action::DescribeInstanceAttribute(DescribeInstanceAttribute {
                    instance_id: s("i-10a64379"),
                    attribute: InstanceAttribute::Kernel,
                }),
            ),
            (
                "Action=ModifyInstanceAttribute&InstanceId=i-10a64379&InstanceType.Value=m1.large",
                Action::ModifyInstanceAttribute(ModifyInstanceAttribute {
                    instance_id: s("i-10a64379"),
                    change: InstanceAttributeChange::InstanceType(s("m1.large")),
                }),
            ),
            (
                "Action=ModifyInstanceAttribute&InstanceId=i-1234567890abcdef0&SourceDestCheck.Value=false",
                Action::ModifyInstanceAttribute(ModifyInstanceAttribute {
                    instance_id: s("i-1234567890abcdef0"),
                    change: InstanceAttributeChange::SourceDestCheck(false),
                }),
            ),
            (
                "Action=CreateKeyPair&KeyName=my-key-pair",
                Action::CreateKeyPair(CreateKeyPair {
                    key_name: s("my-key-pair"),
                    ..Default::default()
                }),
            ),
            (
                // "ssh-rsa AAAAB3NzaC1yc2E user@host", base64-encoded as the API wants it.
                "Action=ImportKeyPair&KeyName=my-key-pair&PublicKeyMaterial=c3NoLXJzYSBBQUFBQjNOemFDMXljMkUgdXNlckBob3N0",
                Action::ImportKeyPair(ImportKeyPair {
                    key_name: s("my-key-pair"),
                    public_key_material: s("ssh-rsa AAAAB3NzaC1yc2E user@host"),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeKeyPairs&KeyName.1=my-key-pair",
                Action::DescribeKeyPairs(DescribeKeyPairs {
                    key_names: strs(&["my-key-pair"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeKeyPairs&Filter.1.Name=key-name&Filter.1.Value.1=*Dave*",
                Action::DescribeKeyPairs(DescribeKeyPairs {
                    filters: vec![Filter::new("key-name", ["*Dave*"])],
                    ..Default::default()
                }),
            ),
            (
                "Action=DeleteKeyPair&KeyName=my-key-pair",
                Action::DeleteKeyPair(DeleteKeyPair {
                    key: KeyPairRef::Name(s("my-key-pair")),
                }),
            ),
            (
                "Action=DescribeImages&ImageId.1=ami-be3adfd7",
                Action::DescribeImages(DescribeImages {
                    image_ids: strs(&["ami-be3adfd7"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeImages&ExecutableBy.1=all",
                Action::DescribeImages(DescribeImages {
                    executable_by: strs(&["all"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeImages&Owner.1=self",
                Action::DescribeImages(DescribeImages {
                    owners: strs(&["self"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeImages&Filter.1.Name=is-public&Filter.1.Value.1=true&Filter.2.Name=architecture&Filter.2.Value.1=x86_64&Filter.3.Name=platform&Filter.3.Value.1=windows",
                Action::DescribeImages(DescribeImages {
                    filters: vec![
                        Filter::new("is-public", ["true"]),
                        Filter::new("architecture", ["x86_64"]),
                        Filter::new("platform", ["windows"]),
                    ],
                    ..Default::default()
                }),
            ),
            (
                "Action=RegisterImage&ImageLocation=mybucket/my-new-image.manifest.xml&Name=my-new-image",
                Action::RegisterImage(RegisterImage {
                    name: s("my-new-image"),
                    image_location: Some(s("mybucket/my-new-image.manifest.xml")),
                    ..Default::default()
                }),
            ),
            (
                "Action=RegisterImage&RootDeviceName=/dev/sda1&BlockDeviceMapping.1.DeviceName=/dev/sda1&BlockDeviceMapping.1.Ebs.SnapshotId=snap-1234567890abcdef0&Name=MyImage",
                Action::RegisterImage(RegisterImage {
                    name: s("MyImage"),
                    root_device_name: Some(s("/dev/sda1")),
                    block_device_mappings: vec![BlockDeviceMapping {
                        device_name: s("/dev/sda1"),
                        ebs: Some(EbsBlockDevice {
                            snapshot_id: Some(s("snap-1234567890abcdef0")),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            ),
            (
                "Action=DeregisterImage&ImageId=ami-4fa54026",
                Action::DeregisterImage(DeregisterImage {
                    image_id: s("ami-4fa54026"),
                }),
            ),
            (
                "Action=DescribeImageAttribute&ImageId=ami-61a54008&Attribute=launchPermission",
                Action::DescribeImageAttribute(DescribeImageAttribute {
                    image_id: s("ami-61a54008"),
                    attribute: ImageAttribute::LaunchPermission,
                }),
            ),
            (
                "Action=ModifyImageAttribute&ImageId=ami-61a54008&LaunchPermission.Add.1.Group=all",
                Action::ModifyImageAttribute(ModifyImageAttribute {
                    image_id: s("ami-61a54008"),
                    change: ImageAttributeChange::LaunchPermission {
                        add: vec![LaunchPermission::AllUsers],
                        remove: vec![],
                    },
                }),
            ),
            (
                "Action=ModifyImageAttribute&ImageId=ami-61a54008&LaunchPermission.Remove.1.UserId=999988887777",
                Action::ModifyImageAttribute(ModifyImageAttribute {
                    image_id: s("ami-61a54008"),
                    change: ImageAttributeChange::LaunchPermission {
                        add: vec![],
                        remove: vec![LaunchPermission::User(s("999988887777"))],
                    },
                }),
            ),
            (
                "Action=ModifyImageAttribute&ImageId=ami-61a54008&Description.Value=New_Description",
                Action::ModifyImageAttribute(ModifyImageAttribute {
                    image_id: s("ami-61a54008"),
                    change: ImageAttributeChange::Description(s("New_Description")),
                }),
            ),
            (
                "Action=CreateTags&ResourceId.1=ami-1a2b3c4d&ResourceId.2=i-1234567890abcdef0&Tag.1.Key=webserver&Tag.1.Value=&Tag.2.Key=stack&Tag.2.Value=Production",
                Action::CreateTags(CreateTags {
                    resource_ids: strs(&["ami-1a2b3c4d", "i-1234567890abcdef0"]),
                    tags: vec![tag("webserver", ""), tag("stack", "Production")],
                }),
            ),
            (
                "Action=DeleteTags&ResourceId.1=ami-1a2b3c4d&ResourceId.2=i-1234567890abcdef0&Tag.1.Key=webserver&Tag.2.Key=stack",
                Action::DeleteTags(DeleteTags {
                    resource_ids: strs(&["ami-1a2b3c4d", "i-1234567890abcdef0"]),
                    tags: vec![
                        DeleteTag { key: s("webserver"), value: None },
                        DeleteTag { key: s("stack"), value: None },
                    ],
                }),
            ),
            (
                "Action=DeleteTags&ResourceId.1=i-1234567890abcdef0&Tag.1.Key=Purpose&Tag.1.Value=Test",
                Action::DeleteTags(DeleteTags {
                    resource_ids: strs(&["i-1234567890abcdef0"]),
                    tags: vec![DeleteTag { key: s("Purpose"), value: Some(s("Test")) }],
                }),
            ),
            (
                "Action=DescribeTags&Filter.1.Name=resource-type&Filter.1.Value.1=instance",
                Action::DescribeTags(DescribeTags {
                    filters: vec![Filter::new("resource-type", ["instance"])],
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeAvailabilityZones&ZoneName.1=us-east-1d&ZoneName.2=us-east-1a",
                Action::DescribeAvailabilityZones(DescribeAvailabilityZones {
                    zone_names: strs(&["us-east-1d", "us-east-1a"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeRegions&RegionName.1=us-east-1&RegionName.2=eu-west-1",
                Action::DescribeRegions(DescribeRegions {
                    region_names: strs(&["us-east-1", "eu-west-1"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeAccountAttributes&AttributeName.1=supported-platforms",
                Action::DescribeAccountAttributes(DescribeAccountAttributes {
                    attribute_names: strs(&["supported-platforms"]),
                }),
            ),
            (
                "Action=DescribeVpcs&Filter.1.Name=dhcp-options-id&Filter.1.Value.1=dopt-7a8b9c2d&Filter.1.Value.2=dopt-2b2a3d3c&Filter.2.Name=state&Filter.2.Value.1=available",
                Action::DescribeVpcs(DescribeVpcs {
                    filters: vec![
                        Filter::new("dhcp-options-id", ["dopt-7a8b9c2d", "dopt-2b2a3d3c"]),
                        Filter::new("state", ["available"]),
                    ],
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeSubnets&Filter.1.Name=vpc-id&Filter.1.Value.1=vpc-1a2b3c4d&Filter.1.Value.2=vpc-6e7f8a92&Filter.2.Name=state&Filter.2.Value.1=available",
                Action::DescribeSubnets(DescribeSubnets {
                    filters: vec![
                        Filter::new("vpc-id", ["vpc-1a2b3c4d", "vpc-6e7f8a92"]),
                        Filter::new("state", ["available"]),
                    ],
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstanceTypes&InstanceType.1=t2.micro&InstanceType.2=m5.large",
                Action::DescribeInstanceTypes(DescribeInstanceTypes {
                    instance_types: strs(&["t2.micro", "m5.large"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstanceTypeOfferings&LocationType=availability-zone&Filter.1.Name=instance-type&Filter.1.Value.1=t2.micro&MaxResults=5",
                Action::DescribeInstanceTypeOfferings(DescribeInstanceTypeOfferings {
                    location_type: LocationType::AvailabilityZone,
                    filters: vec![Filter {
                        name: "instance-type".into(),
                        values: strs(&["t2.micro"]),
                    }],
                    max_results: Some(5),
                    next_token: None,
                }),
            ),
        ];
        for (query, expected) in rows {
            assert_eq!(action(query), expected, "{query}");
        }
    }

    /// Bodies awscli 1.46 (botocore 1.44) sends, captured with `--debug` (then URL-encoded as on
    /// the wire); ids changed to well-formed ones where the capture used placeholders.
    #[test]
    fn what_awscli_sends_routes_to_typed_actions() {
        let rows: Vec<(&str, Action)> = vec![
            (
                // aws ec2 run-instances --image-id emi-12345678 --count 3 --instance-type t2.micro
                //   --key-name my-key --tag-specifications 'ResourceType=instance,Tags=[{Key=Name,Value=web}]'
                "Action=RunInstances&Version=2016-11-15&ImageId=emi-12345678&InstanceType=t2.micro&KeyName=my-key&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=Name&TagSpecification.1.Tag.1.Value=web&MinCount=3&MaxCount=3&ClientToken=4d260bfb-3ab7-4854-826b-f508b47057f5",
                Action::RunInstances(RunInstances {
                    key_name: Some(s("my-key")),
                    tag_specifications: vec![TagSpecification {
                        resource_type: s("instance"),
                        tags: vec![tag("Name", "web")],
                    }],
                    client_token: Some(s("4d260bfb-3ab7-4854-826b-f508b47057f5")),
                    ..run("emi-12345678", "t2.micro", 3, 3)
                }),
            ),
            (
                // aws ec2 run-instances --image-id emi-12345678 --count 1 --metadata-options
                //   HttpTokens=required,HttpPutResponseHopLimit=2,InstanceMetadataTags=enabled
                "Action=RunInstances&Version=2016-11-15&ImageId=emi-12345678&MinCount=1&MaxCount=1&MetadataOptions.HttpTokens=required&MetadataOptions.HttpPutResponseHopLimit=2&MetadataOptions.InstanceMetadataTags=enabled",
                Action::RunInstances(RunInstances {
                    http_tokens: Some(s("required")),
                    http_put_response_hop_limit: Some(2),
                    instance_metadata_tags: Some(s("enabled")),
                    ..run("emi-12345678", DEFAULT_INSTANCE_TYPE, 1, 1)
                }),
            ),
            (
                // --count 2:5 --user-data "hello world" --security-group-ids … --placement
                // AvailabilityZone=… --instance-initiated-shutdown-behavior terminate --client-token tok1
                "Action=RunInstances&Version=2016-11-15&ImageId=ami-0abcdef1234567890&Placement.AvailabilityZone=us-east-1a&SecurityGroupId.1=sg-0123456789abcdef0&SecurityGroupId.2=sg-12345678&UserData=aGVsbG8gd29ybGQ%3D&InstanceInitiatedShutdownBehavior=terminate&ClientToken=tok1&MinCount=2&MaxCount=5",
                Action::RunInstances(RunInstances {
                    availability_zone: Some(s("us-east-1a")),
                    security_group_ids: strs(&["sg-0123456789abcdef0", "sg-12345678"]),
                    user_data: Some(s("aGVsbG8gd29ybGQ=")),
                    instance_initiated_shutdown_behavior: ShutdownBehavior::Terminate,
                    client_token: Some(s("tok1")),
                    ..run("ami-0abcdef1234567890", DEFAULT_INSTANCE_TYPE, 2, 5)
                }),
            ),
            (
                // --block-device-mappings … --subnet-id … --security-groups default web
                // --disable-api-termination --ebs-optimized
                "Action=RunInstances&Version=2016-11-15&BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsdh&BlockDeviceMapping.1.Ebs.VolumeSize=100&BlockDeviceMapping.1.Ebs.DeleteOnTermination=true&ImageId=ami-12345678&SecurityGroup.1=default&SecurityGroup.2=web&SubnetId=subnet-0123456789abcdef0&DisableApiTermination=true&EbsOptimized=true&MaxCount=1&MinCount=1",
                Action::RunInstances(RunInstances {
                    block_device_mappings: vec![BlockDeviceMapping {
                        device_name: s("/dev/sdh"),
                        ebs: Some(EbsBlockDevice {
                            volume_size: Some(100),
                            delete_on_termination: Some(true),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    security_groups: strs(&["default", "web"]),
                    subnet_id: Some(s("subnet-0123456789abcdef0")),
                    disable_api_termination: true,
                    ebs_optimized: true,
                    ..run("ami-12345678", DEFAULT_INSTANCE_TYPE, 1, 1)
                }),
            ),
            (
                // What Ansible's amazon.aws.ec2_instance sends: the primary interface, in a
                // subnet, with a security group, deleted with the instance, no public address.
                "Action=RunInstances&Version=2016-11-15&ImageId=ami-12345678&MaxCount=1&MinCount=1&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.SubnetId=subnet-0123456789abcdef0&NetworkInterface.1.DeleteOnTermination=true&NetworkInterface.1.AssociatePublicIpAddress=false&NetworkInterface.1.SecurityGroupId.1=sg-0123456789abcdef0&NetworkInterface.1.Description=primary",
                Action::RunInstances(RunInstances {
                    subnet_id: Some(s("subnet-0123456789abcdef0")),
                    security_group_ids: strs(&["sg-0123456789abcdef0"]),
                    ..run("ami-12345678", DEFAULT_INSTANCE_TYPE, 1, 1)
                }),
            ),
            (
                // aws ec2 describe-instances --filters Name=instance-type,Values=m1.small,m1.large
                //   Name=tag:Name,Values=web --page-size 50
                "Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=instance-type&Filter.1.Value.1=m1.small&Filter.1.Value.2=m1.large&Filter.2.Name=tag%3AName&Filter.2.Value.1=web&MaxResults=50",
                Action::DescribeInstances(DescribeInstances {
                    filters: vec![
                        Filter::new("instance-type", ["m1.small", "m1.large"]),
                        Filter::new("tag:Name", ["web"]),
                    ],
                    max_results: Some(50),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstances&Version=2016-11-15&InstanceId.1=i-1234567890abcdef0&InstanceId.2=i-0598c7d356eba48d7",
                Action::DescribeInstances(DescribeInstances {
                    instance_ids: strs(&["i-1234567890abcdef0", "i-0598c7d356eba48d7"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstances&Version=2016-11-15&NextToken=abc%2Fdef%3D%3D&MaxResults=1000",
                Action::DescribeInstances(DescribeInstances {
                    max_results: Some(1000),
                    next_token: Some(s("abc/def==")),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeInstanceStatus&Version=2016-11-15&IncludeAllInstances=true",
                Action::DescribeInstanceStatus(DescribeInstanceStatus {
                    include_all_instances: true,
                    ..Default::default()
                }),
            ),
            (
                "Action=StopInstances&Version=2016-11-15&InstanceId.1=i-1234567890abcdef0&Force=true",
                Action::StopInstances(StopInstances {
                    instance_ids: strs(&["i-1234567890abcdef0"]),
                    force: true,
                }),
            ),
            (
                "Action=GetConsoleOutput&Version=2016-11-15&InstanceId=i-1234567890abcdef0&Latest=true",
                Action::GetConsoleOutput(GetConsoleOutput {
                    instance_id: s("i-1234567890abcdef0"),
                    latest: true,
                }),
            ),
            (
                "Action=DescribeInstanceAttribute&Version=2016-11-15&InstanceId=i-1234567890abcdef0&Attribute=instanceType",
                Action::DescribeInstanceAttribute(DescribeInstanceAttribute {
                    instance_id: s("i-1234567890abcdef0"),
                    attribute: InstanceAttribute::InstanceType,
                }),
            ),
            (
                "Action=ModifyInstanceAttribute&Version=2016-11-15&InstanceId=i-1234567890abcdef0&DisableApiTermination.Value=false",
                Action::ModifyInstanceAttribute(ModifyInstanceAttribute {
                    instance_id: s("i-1234567890abcdef0"),
                    change: InstanceAttributeChange::DisableApiTermination(false),
                }),
            ),
            (
                "Action=ModifyInstanceAttribute&Version=2016-11-15&InstanceId=i-1234567890abcdef0&UserData.Value=aGVsbG8%3D",
                Action::ModifyInstanceAttribute(ModifyInstanceAttribute {
                    instance_id: s("i-1234567890abcdef0"),
                    change: InstanceAttributeChange::UserData(s("aGVsbG8=")),
                }),
            ),
            (
                "Action=ModifyInstanceAttribute&Version=2016-11-15&InstanceId=i-1234567890abcdef0&Attribute=instanceType&Value=t2.large",
                Action::ModifyInstanceAttribute(ModifyInstanceAttribute {
                    instance_id: s("i-1234567890abcdef0"),
                    change: InstanceAttributeChange::InstanceType(s("t2.large")),
                }),
            ),
            (
                "Action=ModifyInstanceAttribute&Version=2016-11-15&InstanceId=i-1234567890abcdef0&InstanceInitiatedShutdownBehavior.Value=terminate",
                Action::ModifyInstanceAttribute(ModifyInstanceAttribute {
                    instance_id: s("i-1234567890abcdef0"),
                    change: InstanceAttributeChange::InstanceInitiatedShutdownBehavior(
                        ShutdownBehavior::Terminate,
                    ),
                }),
            ),
            (
                "Action=ModifyInstanceAttribute&Version=2016-11-15&InstanceId=i-1234567890abcdef0&GroupId.1=sg-12345678&GroupId.2=sg-0123456789abcdef0",
                Action::ModifyInstanceAttribute(ModifyInstanceAttribute {
                    instance_id: s("i-1234567890abcdef0"),
                    change: InstanceAttributeChange::GroupSet(strs(&[
                        "sg-12345678",
                        "sg-0123456789abcdef0",
                    ])),
                }),
            ),
            (
                "Action=CreateKeyPair&Version=2016-11-15&KeyName=my-key&KeyType=ed25519&KeyFormat=ppk",
                Action::CreateKeyPair(CreateKeyPair {
                    key_name: s("my-key"),
                    key_type: KeyType::Ed25519,
                    key_format: KeyFormat::Ppk,
                    tag_specifications: vec![],
                }),
            ),
            (
                "Action=CreateKeyPair&Version=2016-11-15&KeyName=k&TagSpecification.1.ResourceType=key-pair&TagSpecification.1.Tag.1.Key=team&TagSpecification.1.Tag.1.Value=ops",
                Action::CreateKeyPair(CreateKeyPair {
                    key_name: s("k"),
                    tag_specifications: vec![TagSpecification {
                        resource_type: s("key-pair"),
                        tags: vec![tag("team", "ops")],
                    }],
                    ..Default::default()
                }),
            ),
            (
                // --public-key-material fileb://… of a file holding "vm\n"
                "Action=ImportKeyPair&Version=2016-11-15&KeyName=my-key&PublicKeyMaterial=dm0K",
                Action::ImportKeyPair(ImportKeyPair {
                    key_name: s("my-key"),
                    public_key_material: s("vm\n"),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeKeyPairs&Version=2016-11-15&KeyName.1=a&KeyName.2=b&KeyPairId.1=key-0123456789abcdef0&IncludePublicKey=true",
                Action::DescribeKeyPairs(DescribeKeyPairs {
                    key_names: strs(&["a", "b"]),
                    key_pair_ids: strs(&["key-0123456789abcdef0"]),
                    include_public_key: true,
                    ..Default::default()
                }),
            ),
            (
                "Action=DeleteKeyPair&Version=2016-11-15&KeyPairId=key-0123456789abcdef0",
                Action::DeleteKeyPair(DeleteKeyPair {
                    key: KeyPairRef::Id(s("key-0123456789abcdef0")),
                }),
            ),
            (
                "Action=DescribeImages&Version=2016-11-15&ExecutableBy.1=all&Owner.1=self&Owner.2=amazon",
                Action::DescribeImages(DescribeImages {
                    owners: strs(&["self", "amazon"]),
                    executable_by: strs(&["all"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=RegisterImage&Version=2016-11-15&ImageLocation=bucket%2Fx.manifest.xml&Name=my-img&Architecture=x86_64&BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsda1&BlockDeviceMapping.1.Ebs.VolumeSize=8",
                Action::RegisterImage(RegisterImage {
                    name: s("my-img"),
                    image_location: Some(s("bucket/x.manifest.xml")),
                    architecture: Some(s("x86_64")),
                    block_device_mappings: vec![BlockDeviceMapping {
                        device_name: s("/dev/sda1"),
                        ebs: Some(EbsBlockDevice {
                            volume_size: Some(8),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            ),
            (
                "Action=RegisterImage&Version=2016-11-15&ImageLocation=b%2Fm.xml&Name=img&TagSpecification.1.ResourceType=image&TagSpecification.1.Tag.1.Key=team&TagSpecification.1.Tag.1.Value=ops",
                Action::RegisterImage(RegisterImage {
                    name: s("img"),
                    image_location: Some(s("b/m.xml")),
                    tag_specifications: vec![TagSpecification {
                        resource_type: s("image"),
                        tags: vec![tag("team", "ops")],
                    }],
                    ..Default::default()
                }),
            ),
            (
                "Action=ModifyImageAttribute&Version=2016-11-15&ImageId=ami-12345678&LaunchPermission.Add.1.UserId=123456789012",
                Action::ModifyImageAttribute(ModifyImageAttribute {
                    image_id: s("ami-12345678"),
                    change: ImageAttributeChange::LaunchPermission {
                        add: vec![LaunchPermission::User(s("123456789012"))],
                        remove: vec![],
                    },
                }),
            ),
            (
                "Action=ModifyImageAttribute&Version=2016-11-15&Attribute=launchPermission&ImageId=ami-12345678&OperationType=add&UserId.1=123456789012",
                Action::ModifyImageAttribute(ModifyImageAttribute {
                    image_id: s("ami-12345678"),
                    change: ImageAttributeChange::LaunchPermission {
                        add: vec![LaunchPermission::User(s("123456789012"))],
                        remove: vec![],
                    },
                }),
            ),
            (
                "Action=ModifyImageAttribute&Version=2016-11-15&ImageId=emi-12345678&OperationType=remove&UserGroup.1=all",
                Action::ModifyImageAttribute(ModifyImageAttribute {
                    image_id: s("emi-12345678"),
                    change: ImageAttributeChange::LaunchPermission {
                        add: vec![],
                        remove: vec![LaunchPermission::AllUsers],
                    },
                }),
            ),
            (
                "Action=ModifyImageAttribute&Version=2016-11-15&Attribute=description&ImageId=ami-12345678&Value=hi",
                Action::ModifyImageAttribute(ModifyImageAttribute {
                    image_id: s("ami-12345678"),
                    change: ImageAttributeChange::Description(s("hi")),
                }),
            ),
            (
                "Action=DeleteTags&Version=2016-11-15&ResourceId.1=i-1234567890abcdef0&Tag.1.Key=Name&Tag.2.Key=env&Tag.2.Value=prod&Tag.3.Key=empty&Tag.3.Value=",
                Action::DeleteTags(DeleteTags {
                    resource_ids: strs(&["i-1234567890abcdef0"]),
                    tags: vec![
                        DeleteTag { key: s("Name"), value: None },
                        DeleteTag { key: s("env"), value: Some(s("prod")) },
                        DeleteTag { key: s("empty"), value: Some(s("")) },
                    ],
                }),
            ),
            (
                "Action=DeleteTags&Version=2016-11-15&ResourceId.1=vol-0123456789abcdef0",
                Action::DeleteTags(DeleteTags {
                    resource_ids: strs(&["vol-0123456789abcdef0"]),
                    tags: vec![],
                }),
            ),
            (
                "Action=DescribeTags&Version=2016-11-15&Filter.1.Name=resource-type&Filter.1.Value.1=instance&MaxResults=5",
                Action::DescribeTags(DescribeTags {
                    filters: vec![Filter::new("resource-type", ["instance"])],
                    max_results: Some(5),
                    next_token: None,
                }),
            ),
            (
                "Action=DescribeRegions&Version=2016-11-15&RegionName.1=us-east-1&AllRegions=true",
                Action::DescribeRegions(DescribeRegions {
                    region_names: strs(&["us-east-1"]),
                    all_regions: true,
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeAvailabilityZones&Version=2016-11-15&AllAvailabilityZones=true",
                Action::DescribeAvailabilityZones(DescribeAvailabilityZones {
                    all_availability_zones: true,
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeAccountAttributes&Version=2016-11-15&AttributeName.1=supported-platforms&AttributeName.2=default-vpc",
                Action::DescribeAccountAttributes(DescribeAccountAttributes {
                    attribute_names: strs(&["supported-platforms", "default-vpc"]),
                }),
            ),
            (
                // aws ec2 modify-instance-metadata-options --http-tokens required --http-endpoint enabled
                "Action=ModifyInstanceMetadataOptions&Version=2016-11-15&InstanceId=i-1234567890abcdef0&HttpTokens=required&HttpEndpoint=enabled",
                Action::ModifyInstanceMetadataOptions(ModifyInstanceMetadataOptions {
                    instance_id: s("i-1234567890abcdef0"),
                    http_tokens: Some(s("required")),
                    http_endpoint: Some(s("enabled")),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeVpcAttribute&Version=2016-11-15&VpcId=vpc-1a2b3c4d&Attribute=enableDnsHostnames",
                Action::DescribeVpcAttribute(DescribeVpcAttribute {
                    vpc_id: s("vpc-1a2b3c4d"),
                    attribute: s("enableDnsHostnames"),
                }),
            ),
            (
                "Action=DescribeAddresses&Version=2016-11-15&PublicIp.1=203.0.113.12&Filter.1.Name=domain&Filter.1.Value.1=vpc",
                Action::DescribeAddresses(DescribeAddresses {
                    public_ips: strs(&["203.0.113.12"]),
                    filters: vec![Filter::new("domain", ["vpc"])],
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeVpcs&Version=2016-11-15&VpcId.1=vpc-1a2b3c4d",
                Action::DescribeVpcs(DescribeVpcs {
                    vpc_ids: strs(&["vpc-1a2b3c4d"]),
                    ..Default::default()
                }),
            ),
            (
                "Action=DescribeSubnets&Version=2016-11-15&SubnetId.1=subnet-9d4a7b6c",
                Action::DescribeSubnets(DescribeSubnets {
                    subnet_ids: strs(&["subnet-9d4a7b6c"]),
                    ..Default::default()
                }),
            ),
        ];
        for (query, expected) in rows {
            assert_eq!(action(query), expected, "{query}");
        }
    }

    #[test]
    fn dry_run_version_and_ignored_parameters_are_reported_beside_the_action() {
        let request = route_query(
            "Action=RunInstances&Version=2014-06-15&ImageId=ami-12345678&MinCount=1&MaxCount=1\
             &DryRun=true&Monitoring.Enabled=true&Placement.Tenancy=default\
             &BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsda1&BlockDeviceMapping.1.Ebs.KmsKeyId=k",
        )
        .unwrap();
        assert!(request.dry_run);
        assert_eq!(request.version, "2014-06-15");
        assert_eq!(
            request.ignored_params,
            strs(&[
                "BlockDeviceMapping.1.Ebs.KmsKeyId",
                "Monitoring.Enabled",
                "Placement.Tenancy",
            ])
        );
        assert_eq!(request.action.name(), "RunInstances");
        assert_eq!(request.action.response_name(), "RunInstancesResponse");
        let plain = route_query("Action=DescribeRegions").unwrap();
        assert!(!plain.dry_run);
        assert!(plain.ignored_params.is_empty());
    }

    #[test]
    fn signature_parameters_are_not_unknown() {
        let sigv4 = "Action=DescribeRegions&Version=2016-11-15&X-Amz-Algorithm=AWS4-HMAC-SHA256\
                     &X-Amz-Credential=AKID%2F20240101%2Fus-east-1%2Fec2%2Faws4_request\
                     &X-Amz-Date=20240101T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host\
                     &X-Amz-Signature=abcdef&X-Amz-Security-Token=tok";
        assert!(route_query(sigv4).unwrap().ignored_params.is_empty());
        let sigv2 = "Action=DescribeRegions&Version=2012-12-01&AWSAccessKeyId=AKID&SignatureVersion=2\
                     &SignatureMethod=HmacSHA256&Timestamp=2024-01-01T00%3A00%3A00Z&Signature=abc%3D";
        assert!(route_query(sigv2).is_ok());
    }

    #[test]
    fn protocol_errors_have_the_aws_codes_and_messages() {
        let rows: &[(&str, &str, &str)] = &[
            ("Version=2016-11-15", "MissingAction", "The request must contain the parameter Action"),
            ("Action=&Version=2016-11-15", "MissingAction", "The request must contain the parameter Action"),
            ("Action=Foo", "InvalidAction", "The action Foo is not valid for this web service."),
            ("Action=describeinstances", "InvalidAction", "The action describeinstances is not valid for this web service."),
            ("Action=CreateVolume", "UnsupportedOperation", "The action CreateVolume is not supported by Karri yet."),
            ("Action=DescribeSecurityGroups", "UnsupportedOperation", "The action DescribeSecurityGroups is not supported by Karri yet."),
            ("Action=DescribeInstances&Version=", "MissingParameter", "The request must contain the parameter Version"),
            ("Action=DescribeRegions&DryRun=maybe", "InvalidParameterValue", "Value (maybe) for parameter DryRun is invalid. Expected a boolean: true or false."),
            ("Action=DescribeRegions&Bogus=1", "UnknownParameter", "The parameter Bogus is not recognized"),
            ("Action=DescribeRegions&RegionName.x=1", "UnknownParameter", "The parameter RegionName.x is not recognized"),
            ("Action=DescribeInstances&InstanceId.01=i-12345678", "InvalidQueryParameter", "The parameter InstanceId.01 has an invalid index: indexes are decimal numbers without leading zeros"),
        ];
        for (query, code, message) in rows {
            let query = if query.contains("Version") {
                query.to_string()
            } else {
                format!("{query}&Version=2016-11-15")
            };
            let err = route(&Params::parse_form(query.as_bytes()).unwrap()).unwrap_err();
            assert_eq!(
                (err.code.as_ref(), err.message.as_str()),
                (*code, *message),
                "{query}"
            );
        }
        // Without any Version at all.
        let err = route(&Params::parse_form(b"Action=DescribeInstances").unwrap()).unwrap_err();
        assert_eq!(
            err.message,
            "The request must contain the parameter Version"
        );
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_code_of_their_kind() {
        let rows: &[(&str, &str, &str)] = &[
            ("Action=DescribeInstances&InstanceId.1=i-123", "InvalidInstanceID.Malformed", "Invalid id: \"i-123\""),
            ("Action=DescribeInstances&InstanceId.1=i-1234567890ABCDEF0", "InvalidInstanceID.Malformed", "Invalid id: \"i-1234567890ABCDEF0\""),
            ("Action=DescribeInstances&InstanceId.1=i-1234567890abcdef", "InvalidInstanceID.Malformed", "Invalid id: \"i-1234567890abcdef\""),
            ("Action=TerminateInstances&InstanceId.1=i-12345678&InstanceId.2=ami-12345678", "InvalidInstanceID.Malformed", "Invalid id: \"ami-12345678\""),
            ("Action=GetConsoleOutput&InstanceId=x", "InvalidInstanceID.Malformed", "Invalid id: \"x\""),
            ("Action=RunInstances&ImageId=ami-xyz&MinCount=1&MaxCount=1", "InvalidAMIID.Malformed", "Invalid id: \"ami-xyz\""),
            ("Action=RunInstances&ImageId=i-12345678&MinCount=1&MaxCount=1", "InvalidAMIID.Malformed", "Invalid id: \"i-12345678\""),
            ("Action=RunInstances&ImageId=ami-12345678&KernelId=aki-nothex00&MinCount=1&MaxCount=1", "InvalidAMIID.Malformed", "Invalid id: \"aki-nothex00\""),
            ("Action=DescribeImages&ImageId.1=ami-1234567", "InvalidAMIID.Malformed", "Invalid id: \"ami-1234567\""),
            ("Action=DeregisterImage&ImageId=snap-12345678", "InvalidAMIID.Malformed", "Invalid id: \"snap-12345678\""),
            ("Action=RunInstances&ImageId=ami-12345678&MinCount=1&MaxCount=1&SecurityGroupId.1=sg-1", "InvalidGroupId.Malformed", "Invalid id: \"sg-1\""),
            ("Action=RunInstances&ImageId=ami-12345678&MinCount=1&MaxCount=1&SubnetId=subnet-1", "InvalidSubnetID.Malformed", "Invalid id: \"subnet-1\""),
            ("Action=DescribeSubnets&SubnetId.1=sub-12345678", "InvalidSubnetID.Malformed", "Invalid id: \"sub-12345678\""),
            ("Action=DescribeVpcs&VpcId.1=vpc-zz", "InvalidVpcID.Malformed", "Invalid id: \"vpc-zz\""),
            ("Action=DescribeVpcAttribute&VpcId=vpc-zz&Attribute=enableDnsSupport", "InvalidVpcID.Malformed", "Invalid id: \"vpc-zz\""),
            ("Action=RegisterImage&Name=img&BlockDeviceMapping.1.DeviceName=/dev/sda1&BlockDeviceMapping.1.Ebs.SnapshotId=snap-zz", "InvalidSnapshotID.Malformed", "Invalid id: \"snap-zz\""),
            ("Action=DescribeKeyPairs&KeyPairId.1=my-key", "InvalidParameterValue", "Value (my-key) for parameter KeyPairId is invalid. Expected: 'key-...'."),
            ("Action=DeleteKeyPair&KeyPairId=key-1", "InvalidParameterValue", "Value (key-1) for parameter KeyPairId is invalid. Expected: 'key-...'."),
            ("Action=CreateTags&ResourceId.1=foo-12345678&Tag.1.Key=a", "InvalidID", "The ID 'foo-12345678' is not valid"),
            ("Action=CreateTags&ResourceId.1=i-123&Tag.1.Key=a", "InvalidID", "The ID 'i-123' is not valid"),
            ("Action=DeleteTags&ResourceId.1=r-12345678", "InvalidID", "The ID 'r-12345678' is not valid"),
        ];
        for (query, code, message) in rows {
            let err = error(query);
            assert_eq!(
                (err.code.as_ref(), err.message.as_str()),
                (*code, *message),
                "{query}"
            );
        }
    }

    #[test]
    fn every_known_id_kind_is_taggable_in_both_lengths() {
        for prefix in TAGGABLE_ID_PREFIXES {
            for id in [
                format!("{prefix}-1a2b3c4d"),
                format!("{prefix}-0123456789abcdef0"),
            ] {
                let query =
                    format!("Action=CreateTags&ResourceId.1={id}&Tag.1.Key=k&Tag.1.Value=v");
                assert!(route_query(&query).is_ok(), "{id}");
            }
        }
        assert!(is_ec2_id("i-0123456789abcdef0", "i"));
        assert!(!is_ec2_id("i-0123456789abcdef0", "ami"));
        assert!(!is_ec2_id("i0123456789abcdef0", "i"));
        assert!(!is_ec2_id("i-", "i"));
        assert!(!is_ec2_id("i-ünïcödé", "i"));
    }

    #[test]
    fn argument_errors_have_the_aws_codes() {
        let long = |n: usize| "a".repeat(n);
        let big_user_data =
            base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_USER_DATA + 1]);
        let tags51: String = (1..=51)
            .map(|i| format!("&Tag.{i}.Key=k{i}&Tag.{i}.Value=v"))
            .collect();
        let run = "Action=RunInstances&ImageId=ami-12345678";
        let rows: Vec<(String, &str)> = vec![
            // RunInstances
            ("Action=RunInstances&MinCount=1&MaxCount=1".into(), "MissingParameter"),
            (format!("{run}&MaxCount=1"), "MissingParameter"),
            (format!("{run}&MinCount=1"), "MissingParameter"),
            (format!("{run}&MinCount=0&MaxCount=1"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=0"), "InvalidParameterValue"),
            (format!("{run}&MinCount=5&MaxCount=2"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=abc"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&InstanceType=t2%20micro"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&UserData=%21%21%21"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&UserData={big_user_data}"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&ClientToken={}", long(65)), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&InstanceInitiatedShutdownBehavior=hibernate"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&MetadataOptions.HttpTokens=always"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&MetadataOptions.HttpEndpoint=on"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&MetadataOptions.InstanceMetadataTags=on"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&MetadataOptions.HttpPutResponseHopLimit=65"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&MetadataOptions.HttpPutResponseHopLimit=0"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&KeyName=%C3%BC"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=bucket&TagSpecification.1.Tag.1.Key=a"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.Tag.1.Key=a"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=aws:cloudformation"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=AWS:x"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=a&TagSpecification.1.Tag.2.Key=a"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=a&TagSpecification.2.ResourceType=instance&TagSpecification.2.Tag.1.Key=b"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key={}", long(129)), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=k&TagSpecification.1.Tag.1.Value={}", long(257)), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&BlockDeviceMapping.1.Ebs.VolumeSize=8"), "MissingParameter"),
            (format!("{run}&MinCount=1&MaxCount=1&BlockDeviceMapping.1.DeviceName=sda&BlockDeviceMapping.1.Ebs.VolumeSize=0"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&BlockDeviceMapping.1.DeviceName=sda&BlockDeviceMapping.1.Ebs.VolumeType=fast"), "InvalidParameterValue"),
            (format!("{run}&MinCount=1&MaxCount=1&LaunchTemplate.LaunchTemplateId=lt-0123456789abcdef0"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&IamInstanceProfile.Name=web-role"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&IamInstanceProfile.Arn=arn:aws:iam::123456789012:instance-profile/web"), "UnsupportedOperation"),
            ("Action=RunInstances&LaunchTemplate.LaunchTemplateName=web&MinCount=1&MaxCount=1".into(), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.SubnetId=subnet-12345678"), "MissingParameter"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.DeviceIndex=1"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.DeviceIndex=0&NetworkInterface.2.DeviceIndex=1"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.DeleteOnTermination=false"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.AssociatePublicIpAddress=true"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.PrivateIpAddress=10.0.0.5"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.NetworkInterfaceId=eni-12345678"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.SubnetId=subnet-1"), "InvalidSubnetID.Malformed"),
            (format!("{run}&MinCount=1&MaxCount=1&SubnetId=subnet-12345678&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.SubnetId=subnet-12345678"), "InvalidParameterCombination"),
            (format!("{run}&MinCount=1&MaxCount=1&SubnetId=subnet-12345678&NetworkInterface.1.DeviceIndex=0"), "InvalidParameterCombination"),
            (format!("{run}&MinCount=1&MaxCount=1&SecurityGroup.1=default&NetworkInterface.1.DeviceIndex=0"), "InvalidParameterCombination"),
            (format!("{run}&MinCount=1&MaxCount=1&SecurityGroupId.1=sg-12345678&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.SecurityGroupId.1=sg-12345678"), "InvalidParameterCombination"),
            (format!("{run}&MinCount=1&MaxCount=1&Ipv6AddressCount=1"), "UnsupportedOperation"),
            (format!("{run}&MinCount=1&MaxCount=1&Foo=bar"), "UnknownParameter"),
            (format!("{run}&MinCount=1&MaxCount=1&ImageId.1=ami-12345678"), "UnknownParameter"),
            // Describe* paging and filters
            ("Action=DescribeInstances&MaxResults=4".into(), "InvalidParameterValue"),
            ("Action=DescribeInstances&MaxResults=1001".into(), "InvalidParameterValue"),
            ("Action=DescribeInstances&MaxResults=10&InstanceId.1=i-12345678".into(), "InvalidParameterCombination"),
            ("Action=DescribeInstanceStatus&MaxResults=10&InstanceId.1=i-12345678".into(), "InvalidParameterCombination"),
            ("Action=DescribeImages&MaxResults=10&ImageId.1=ami-12345678".into(), "InvalidParameterCombination"),
            ("Action=DescribeInstances&Filter.1.Name=foo&Filter.1.Value.1=x".into(), "InvalidParameterValue"),
            ("Action=DescribeInstances&Filter.1.Name=instance-type".into(), "MissingParameter"),
            ("Action=DescribeInstances&Filter.1.Value.1=x".into(), "MissingParameter"),
            ("Action=DescribeInstanceStatus&Filter.1.Name=tag:Name&Filter.1.Value.1=x".into(), "InvalidParameterValue"),
            ("Action=DescribeInstanceTypes&MaxResults=101".into(), "InvalidParameterValue"),
            (
                "Action=DescribeInstanceTypeOfferings&LocationType=planet".into(),
                "InvalidParameterValue",
            ),
            (
                "Action=DescribeInstanceTypeOfferings&Filter.1.Name=vcpus&Filter.1.Value.1=2".into(),
                "InvalidParameterValue",
            ),
            ("Action=DescribeRegions&Filter.1.Name=tag:x&Filter.1.Value.1=y".into(), "InvalidParameterValue"),
            ("Action=ModifyInstanceMetadataOptions&InstanceId=i-12345678".into(), "InvalidParameterCombination"),
            ("Action=ModifyInstanceMetadataOptions&HttpTokens=required".into(), "MissingParameter"),
            ("Action=ModifyInstanceMetadataOptions&InstanceId=i-12345678&HttpTokens=always".into(), "InvalidParameterValue"),
            ("Action=ModifyInstanceMetadataOptions&InstanceId=i-12345678&HttpPutResponseHopLimit=65".into(), "InvalidParameterValue"),
            ("Action=ModifyInstanceMetadataOptions&InstanceId=i-12345678&HttpTokens=required&HttpProtocolIpv6=enabled".into(), "UnsupportedOperation"),
            ("Action=DescribeVpcAttribute&VpcId=vpc-12345678".into(), "MissingParameter"),
            ("Action=DescribeVpcAttribute&Attribute=enableDnsSupport".into(), "MissingParameter"),
            ("Action=DescribeVpcAttribute&VpcId=vpc-12345678&Attribute=enableIpv6".into(), "InvalidParameterValue"),
            ("Action=DescribeAddresses&Filter.1.Name=instance-type&Filter.1.Value.1=y".into(), "InvalidParameterValue"),
            ("Action=DescribeTags&Filter.1.Name=instance-type&Filter.1.Value.1=y".into(), "InvalidParameterValue"),
            ("Action=DescribeAccountAttributes&AttributeName.1=foo".into(), "InvalidParameterValue"),
            // Instances
            ("Action=TerminateInstances".into(), "MissingParameter"),
            ("Action=StartInstances&InstanceId.1=".into(), "InvalidInstanceID.Malformed"),
            ("Action=StopInstances&InstanceId.1=i-12345678&Hibernate=true".into(), "UnsupportedOperation"),
            ("Action=DescribeInstanceAttribute&InstanceId=i-12345678".into(), "MissingParameter"),
            ("Action=DescribeInstanceAttribute&InstanceId=i-12345678&Attribute=foo".into(), "InvalidParameterValue"),
            ("Action=DescribeInstanceAttribute&Attribute=kernel".into(), "MissingParameter"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678".into(), "InvalidParameterCombination"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&InstanceType.Value=m1.small&Kernel.Value=aki-12345678".into(), "InvalidParameterCombination"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&InstanceType.Value=m1.small&Attribute=kernel&Value=aki-12345678".into(), "InvalidParameterCombination"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&Attribute=rootDeviceName&Value=/dev/sdb".into(), "InvalidParameterValue"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&Attribute=userData&Value=abc".into(), "InvalidParameterValue"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&Attribute=kernel".into(), "MissingParameter"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&Value=x".into(), "MissingParameter"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&DisableApiTermination.Value=yes".into(), "InvalidParameterValue"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&BlockDeviceMapping.1.DeviceName=/dev/sda1".into(), "UnsupportedOperation"),
            ("Action=ModifyInstanceAttribute&InstanceId=i-12345678&InstanceType=m1.small".into(), "InvalidParameterCombination"),
            // Key pairs
            ("Action=CreateKeyPair".into(), "MissingParameter"),
            ("Action=CreateKeyPair&KeyName=".into(), "MissingParameter"),
            (format!("Action=CreateKeyPair&KeyName={}", long(256)), "InvalidParameterValue"),
            ("Action=CreateKeyPair&KeyName=k&KeyType=dsa".into(), "InvalidParameterValue"),
            ("Action=CreateKeyPair&KeyName=k&KeyFormat=der".into(), "InvalidParameterValue"),
            ("Action=CreateKeyPair&KeyName=k&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=a".into(), "InvalidParameterValue"),
            ("Action=ImportKeyPair&KeyName=k".into(), "MissingParameter"),
            ("Action=ImportKeyPair&KeyName=k&PublicKeyMaterial=%21%21".into(), "InvalidParameterValue"),
            ("Action=ImportKeyPair&KeyName=k&PublicKeyMaterial=%2Fw%3D%3D".into(), "InvalidKeyPair.Format"),
            ("Action=DeleteKeyPair".into(), "MissingParameter"),
            ("Action=DeleteKeyPair&KeyName=a&KeyPairId=key-12345678".into(), "InvalidParameterCombination"),
            // Images
            ("Action=RegisterImage&ImageLocation=b/m.xml".into(), "MissingParameter"),
            ("Action=RegisterImage&Name=ab&ImageLocation=b/m.xml".into(), "InvalidAMIName.Malformed"),
            ("Action=RegisterImage&Name=bad%21name&ImageLocation=b/m.xml".into(), "InvalidAMIName.Malformed"),
            (format!("Action=RegisterImage&Name={}&ImageLocation=b/m.xml", long(129)), "InvalidAMIName.Malformed"),
            ("Action=RegisterImage&Name=img".into(), "InvalidParameterCombination"),
            ("Action=RegisterImage&Name=img&ImageLocation=b/m.xml&Architecture=sparc".into(), "InvalidParameterValue"),
            ("Action=RegisterImage&Name=img&ImageLocation=b/m.xml&VirtualizationType=hvm2".into(), "InvalidParameterValue"),
            (format!("Action=RegisterImage&Name=img&ImageLocation=b/m.xml&Description={}", long(256)), "InvalidParameterValue"),
            ("Action=RegisterImage&Name=img&ImageLocation=b/m.xml&TagSpecification.1.ResourceType=snapshot&TagSpecification.1.Tag.1.Key=a".into(), "UnsupportedOperation"),
            ("Action=RegisterImage&Name=img&ImageLocation=b/m.xml&TagSpecification.1.ResourceType=image&TagSpecification.1.Tag.1.Key=a&TagSpecification.2.ResourceType=snapshot&TagSpecification.2.Tag.1.Key=b".into(), "UnsupportedOperation"),
            ("Action=RegisterImage&Name=img&ImageLocation=b/m.xml&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=a".into(), "InvalidParameterValue"),
            ("Action=DescribeImageAttribute&ImageId=ami-12345678&Attribute=owner".into(), "InvalidParameterValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678".into(), "InvalidParameterCombination"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.Group=everyone".into(), "InvalidParameterValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.Group=all&LaunchPermission.Add.1.UserId=1".into(), "InvalidParameterCombination"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.Group=all&Description.Value=x".into(), "InvalidParameterCombination"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&Attribute=launchPermission&OperationType=delete&UserId.1=1".into(), "InvalidParameterValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&Attribute=launchPermission".into(), "MissingParameter"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&Attribute=productCodes&Value=x".into(), "InvalidParameterValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&ProductCode.1=abc".into(), "UnsupportedOperation"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.OrganizationArn=arn".into(), "UnsupportedOperation"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.UserId=12345678901".into(), "InvalidAMIAttributeItemValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.UserId=1234567890123".into(), "InvalidAMIAttributeItemValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.UserId=1234-5678-9012".into(), "InvalidAMIAttributeItemValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.UserId=%20".into(), "InvalidAMIAttributeItemValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Remove.1.UserId=alice".into(), "InvalidAMIAttributeItemValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&LaunchPermission.Add.1.UserId=123456789012&LaunchPermission.Add.2.UserId=x".into(), "InvalidAMIAttributeItemValue"),
            ("Action=ModifyImageAttribute&ImageId=ami-12345678&Attribute=launchPermission&OperationType=add&UserId.1=12345678901a".into(), "InvalidAMIAttributeItemValue"),
            // Tags
            ("Action=CreateTags&Tag.1.Key=a".into(), "MissingParameter"),
            ("Action=CreateTags&ResourceId.1=i-12345678".into(), "MissingParameter"),
            ("Action=CreateTags&ResourceId.1=i-12345678&Tag.1.Value=x".into(), "MissingParameter"),
            (format!("Action=CreateTags&ResourceId.1=i-12345678{tags51}"), "TagLimitExceeded"),
            ("Action=CreateTags&ResourceId.1=i-12345678&Tag.1.Key=aws:x&Tag.1.Value=y".into(), "InvalidParameterValue"),
            ("Action=CreateTags&ResourceId.1=i-12345678&Tag.1.Key=a&Tag.2.Key=a".into(), "InvalidParameterValue"),
            ("Action=DeleteTags&ResourceId.1=i-12345678&Tag.1.Key=aws:x".into(), "InvalidParameterValue"),
            ("Action=DeleteTags".into(), "MissingParameter"),
            (format!("Action=DescribeTags{}", (1..=17).map(|i| format!("&Filter.{i}.Name=key&Filter.{i}.Value.1=*{}", long(1023))).collect::<String>()), "InvalidParameterValue"),
        ];
        for (query, code) in &rows {
            let err = error(query);
            assert_eq!(err.code.as_ref(), *code, "{query}: {}", err.message);
            assert_eq!(err.status, 400, "{query}");
        }
    }

    #[test]
    fn user_data_is_limited_to_16_kib_decoded() {
        let encode = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![b'x'; n]);
        let query = |data: &str| {
            format!(
                "Action=RunInstances&ImageId=ami-12345678&MinCount=1&MaxCount=1&UserData={}",
                data.replace('+', "%2B")
                    .replace('=', "%3D")
                    .replace('/', "%2F")
            )
        };
        let fits = encode(MAX_USER_DATA);
        match action(&query(&fits)) {
            Action::RunInstances(r) => assert_eq!(r.user_data, Some(fits.clone())),
            other => panic!("{other:?}"),
        }
        let err = error(&query(&encode(MAX_USER_DATA + 1)));
        assert_eq!(err.message, "User data is limited to 16384 bytes");
        let err = error(&query(&"QUFB".repeat(20_000)));
        assert_eq!(err.message, "User data is limited to 16384 bytes");
        // Line-wrapped base64 (MIME style) is accepted and stored without the line breaks.
        assert_eq!(check_user_data("aGVs\nbG8=\n").unwrap(), "aGVsbG8=");
        assert_eq!(check_user_data("").unwrap(), "");
        assert_eq!(
            check_user_data("aGVsbG8").unwrap_err().message,
            "Invalid BASE64 encoding of user data."
        );
    }

    #[test]
    fn tag_boundaries_are_inclusive() {
        let key = "k".repeat(MAX_TAG_KEY_CHARS);
        let value = "ü".repeat(MAX_TAG_VALUE_CHARS);
        let tags50: String = (1..=50).map(|i| format!("&Tag.{i}.Key=k{i}")).collect();
        assert!(route_query(&format!(
            "Action=CreateTags&ResourceId.1=i-12345678&Tag.1.Key={key}&Tag.1.Value={value}"
        ))
        .is_ok());
        assert!(route_query(&format!(
            "Action=CreateTags&ResourceId.1=i-12345678{tags50}"
        ))
        .is_ok());
        let ids: String = (1..=MAX_IDS)
            .map(|i| format!("&ResourceId.{i}=i-{i:08x}"))
            .collect();
        assert!(route_query(&format!("Action=CreateTags{ids}&Tag.1.Key=k")).is_ok());
        let err = error(&format!(
            "Action=CreateTags{ids}&ResourceId.1001=i-12345678&Tag.1.Key=k"
        ));
        assert_eq!(err.code, "InvalidParameterValue");
    }

    #[test]
    fn an_id_list_holds_at_most_a_thousand_ids() {
        let ids = |n: usize, name: &str| -> String {
            (1..=n).map(|i| format!("&{name}.{i}=i-{i:08x}")).collect()
        };
        for action in ["TerminateInstances", "StopInstances", "DescribeInstances"] {
            assert!(route_query(&format!("Action={action}{}", ids(MAX_IDS, "InstanceId"))).is_ok());
            let err = error(&format!(
                "Action={action}{}",
                ids(MAX_IDS + 1, "InstanceId")
            ));
            assert_eq!(err.code, "InvalidParameterValue", "{action}");
            assert!(err.message.contains("At most 1000 IDs"), "{}", err.message);
        }
        // DescribeInstanceStatus takes a hundred.
        let status = |n: usize| format!("Action=DescribeInstanceStatus{}", ids(n, "InstanceId"));
        assert!(route_query(&status(MAX_STATUS_IDS)).is_ok());
        let err = error(&status(MAX_STATUS_IDS + 1));
        assert_eq!(err.code, "InvalidParameterValue");
        assert!(err.message.contains("At most 100 IDs"), "{}", err.message);
    }

    #[test]
    fn the_action_lists_are_sorted_disjoint_and_every_supported_action_is_routed() {
        assert!(SUPPORTED_ACTIONS.windows(2).all(|w| w[0] < w[1]));
        assert!(UNSUPPORTED_ACTIONS.windows(2).all(|w| w[0] < w[1]));
        assert!(COMMON_PARAMS.windows(2).all(|w| w[0] < w[1]));
        assert!((100..=200).contains(&UNSUPPORTED_ACTIONS.len()));
        for name in UNSUPPORTED_ACTIONS {
            assert!(SUPPORTED_ACTIONS.binary_search(name).is_err(), "{name}");
        }
        for name in SUPPORTED_ACTIONS {
            match route_query(&format!("Action={name}")) {
                Ok(request) => assert_eq!(request.action.name(), *name),
                Err(err) => assert!(
                    !matches!(err.code.as_ref(), "InvalidAction" | "UnsupportedOperation"),
                    "{name}: {err}"
                ),
            }
        }
    }

    #[test]
    fn wire_enums_round_trip_their_names() {
        for a in InstanceAttribute::ALL {
            assert_eq!(InstanceAttribute::parse(a.as_str()), Some(*a));
        }
        for a in ImageAttribute::ALL {
            assert_eq!(ImageAttribute::parse(a.as_str()), Some(*a));
        }
        assert_eq!(InstanceAttribute::ALL.len(), 16);
        assert_eq!(ImageAttribute::ALL.len(), 13);
        assert_eq!(ShutdownBehavior::default(), ShutdownBehavior::Stop);
        assert_eq!(KeyType::default().to_string(), "rsa");
        assert_eq!(KeyFormat::parse("PEM"), None);
    }

    #[test]
    fn pattern_coverage_matches_segment_prefixes() {
        let rows = [
            ("Placement", "Placement.Tenancy", true),
            ("Placement", "PlacementX", false),
            ("Placement", "Placement", true),
            (
                "BlockDeviceMapping.N.Ebs",
                "BlockDeviceMapping.3.Ebs.KmsKeyId",
                true,
            ),
            (
                "BlockDeviceMapping.N.Ebs",
                "BlockDeviceMapping.x.Ebs.KmsKeyId",
                false,
            ),
            ("BlockDeviceMapping.N.Ebs", "BlockDeviceMapping.3", false),
            (
                "LaunchPermission.Add.N.OrganizationArn",
                "LaunchPermission.Add.1.OrganizationArn",
                true,
            ),
            (
                "LaunchPermission.Add.N.OrganizationArn",
                "LaunchPermission.Add.1.UserId",
                false,
            ),
        ];
        for (pattern, key, expected) in rows {
            assert_eq!(pattern_covers(pattern, key), expected, "{pattern} {key}");
        }
    }
}
