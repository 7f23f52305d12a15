//! What every account sees of the cloud itself: instance types, zones, the region, account
//! attributes and the default VPC with one default subnet per zone.

use std::borrow::Cow;

use serde_json::Value;

use super::{
    default_subnet_id, default_vpc_id, opt, paginate, text, Cx, ARCHITECTURE, BOOT_MODE,
    DEFAULT_VPC_CIDR, HYPERVISOR, ROOT_DEVICE_TYPE, VIRTUALIZATION_TYPE,
};
use crate::ec2::error::Ec2Error;
use crate::ec2::filter::{self, Matcher};
use crate::ec2::router;
use crate::ec2::xml::Response;
use crate::store;

/// Names of the zones of the caller's region, in name order.
pub fn zone_names(cx: &Cx<'_>) -> Vec<String> {
    let (zones, _) = cx.registry.cache.list(
        "availabilityzones",
        &store::kind_prefix("availabilityzones"),
    );
    zones
        .iter()
        .filter(|z| text(&z.value, "/spec/region") == cx.settings.region)
        .map(|z| text(&z.value, "/metadata/name").to_string())
        .collect()
}

/// Each zone of the region with its subnet (`spec.subnetCidr`, else the default of its
/// position among all zones: the same rule the operator allocates addresses by).
pub fn zone_subnets(cx: &Cx<'_>) -> Vec<(String, crds::subnet::Subnet)> {
    let (zones, _) = cx.registry.cache.list(
        "availabilityzones",
        &store::kind_prefix("availabilityzones"),
    );
    let region_of: std::collections::HashMap<&str, &str> = zones
        .iter()
        .map(|z| {
            (
                text(&z.value, "/metadata/name"),
                text(&z.value, "/spec/region"),
            )
        })
        .collect();
    crds::subnet::zone_subnets(zones.iter().map(|z| {
        (
            text(&z.value, "/metadata/name"),
            opt(&z.value, "/spec/subnetCidr"),
        )
    }))
    .into_iter()
    .filter(|(name, _)| region_of.get(name.as_str()) == Some(&cx.settings.region.as_str()))
    .collect()
}

/// An instance type as DescribeInstanceTypes shows it: the sizes its record gives and what every
/// Karri type has in common. The response and the filters both read it.
struct TypeView<'v> {
    name: &'v str,
    vcpus: u64,
    memory_mib: u64,
    disk_gib: u64,
}

/// Every type is of the current generation.
const CURRENT_GENERATION: bool = true;
const FREE_TIER_ELIGIBLE: bool = false;
const BARE_METAL: bool = false;
const USAGE_CLASS: &str = "on-demand";
/// One thread per core: a type's cores are its vCPUs.
const THREADS_PER_CORE: u64 = 1;
/// Every type has local storage (its root disk).
const INSTANCE_STORAGE_SUPPORTED: bool = true;
const NETWORK_PERFORMANCE: &str = "Moderate";
const MAXIMUM_NETWORK_INTERFACES: u64 = 1;
const IPV4_ADDRESSES_PER_INTERFACE: u64 = 1;
const IPV6_SUPPORTED: bool = false;

impl<'v> TypeView<'v> {
    fn of(v: &'v Value) -> Self {
        let number = |pointer: &str| v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
        TypeView {
            name: text(v, "/metadata/name"),
            vcpus: number("/spec/vcpus"),
            memory_mib: number("/spec/memoryMiB"),
            disk_gib: number("/spec/diskGiB"),
        }
    }

    fn cores(&self) -> u64 {
        self.vcpus / THREADS_PER_CORE
    }
}

/// The values a DescribeInstanceTypes filter sees on a type: what [`write_instance_type`] shows.
fn instance_type_values<'v>(t: &TypeView<'v>, name: &str) -> Vec<Cow<'v, str>> {
    match name {
        "instance-type" => filter::shown(t.name),
        "current-generation" => filter::shown_bool(CURRENT_GENERATION),
        "free-tier-eligible" => filter::shown_bool(FREE_TIER_ELIGIBLE),
        "supported-usage-class" => filter::shown(USAGE_CLASS),
        "supported-root-device-type" => filter::shown(ROOT_DEVICE_TYPE),
        "supported-virtualization-type" => filter::shown(VIRTUALIZATION_TYPE),
        "bare-metal" => filter::shown_bool(BARE_METAL),
        "hypervisor" => filter::shown(HYPERVISOR),
        "processor-info.supported-architecture" => filter::shown(ARCHITECTURE),
        "vcpu-info.default-vcpus" => filter::shown_number(t.vcpus),
        "vcpu-info.default-cores" => filter::shown_number(t.cores()),
        "vcpu-info.default-threads-per-core" => filter::shown_number(THREADS_PER_CORE),
        "memory-info.size-in-mib" => filter::shown_number(t.memory_mib),
        "instance-storage-supported" => filter::shown_bool(INSTANCE_STORAGE_SUPPORTED),
        "instance-storage-info.total-size-in-gb" => filter::shown_number(t.disk_gib),
        "network-info.network-performance" => filter::shown(NETWORK_PERFORMANCE),
        "network-info.maximum-network-interfaces" => {
            filter::shown_number(MAXIMUM_NETWORK_INTERFACES)
        }
        "network-info.ipv4-addresses-per-interface" => {
            filter::shown_number(IPV4_ADDRESSES_PER_INTERFACE)
        }
        "network-info.ipv6-supported" => filter::shown_bool(IPV6_SUPPORTED),
        "supported-boot-mode" => filter::shown(BOOT_MODE),
        _ => Vec::new(),
    }
}

/// One `instanceTypeSet` item.
fn write_instance_type(w: &mut Response, t: &TypeView<'_>) {
    w.leaf("instanceType", t.name)
        .leaf_bool("currentGeneration", CURRENT_GENERATION)
        .leaf_bool("freeTierEligible", FREE_TIER_ELIGIBLE)
        .string_set("supportedUsageClasses", [USAGE_CLASS])
        .string_set("supportedRootDeviceTypes", [ROOT_DEVICE_TYPE])
        .string_set("supportedVirtualizationTypes", [VIRTUALIZATION_TYPE])
        .leaf_bool("bareMetal", BARE_METAL)
        .leaf("hypervisor", HYPERVISOR);
    w.element("processorInfo", |w| {
        w.string_set("supportedArchitectures", [ARCHITECTURE]);
    });
    w.element("vCpuInfo", |w| {
        w.leaf_display("defaultVCpus", t.vcpus)
            .leaf_display("defaultCores", t.cores())
            .leaf_display("defaultThreadsPerCore", THREADS_PER_CORE);
    });
    w.element("memoryInfo", |w| {
        w.leaf_display("sizeInMiB", t.memory_mib);
    });
    w.leaf_bool("instanceStorageSupported", INSTANCE_STORAGE_SUPPORTED);
    w.element("instanceStorageInfo", |w| {
        w.leaf_display("totalSizeInGB", t.disk_gib);
    });
    w.element("networkInfo", |w| {
        w.leaf("networkPerformance", NETWORK_PERFORMANCE)
            .leaf_display("maximumNetworkInterfaces", MAXIMUM_NETWORK_INTERFACES)
            .leaf_display("ipv4AddressesPerInterface", IPV4_ADDRESSES_PER_INTERFACE)
            .leaf_bool("ipv6Supported", IPV6_SUPPORTED);
    });
    w.string_set("supportedBootModes", [BOOT_MODE]);
}

/// DescribeInstanceTypes.
pub async fn describe_instance_types(
    cx: &Cx<'_>,
    a: router::DescribeInstanceTypes,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::INSTANCE_TYPE_FILTERS, false)?;
    // A type being deleted is offered no more (RunInstances refuses it too).
    let all: Vec<_> = cx
        .everywhere("instancetypes")
        .await?
        .into_iter()
        .filter(|o| o.value.pointer("/metadata/deletionTimestamp").is_none())
        .collect();
    for t in &a.instance_types {
        if !all.iter().any(|o| text(&o.value, "/metadata/name") == t) {
            return Err(Ec2Error::new(
                "InvalidInstanceType",
                400,
                format!("The following supplied instance types do not exist: [{t}]"),
            ));
        }
    }
    let matcher = Matcher::new(&a.filters);
    let hits: Vec<(String, TypeView<'_>)> = all
        .iter()
        .map(|o| TypeView::of(&o.value))
        .filter(|t| a.instance_types.is_empty() || a.instance_types.iter().any(|n| n == t.name))
        .filter(|t| matcher.matches(|name| instance_type_values(t, name)))
        .map(|t| (t.name.to_string(), t))
        .collect();
    let (page, token) = paginate(
        "DescribeInstanceTypes",
        hits,
        a.next_token.as_deref(),
        a.max_results.map(|m| m as usize),
    )?;
    let mut w = cx.response("DescribeInstanceTypes");
    w.set("instanceTypeSet", page, |w, t| write_instance_type(w, &t));
    w.leaf_opt("nextToken", token.as_deref());
    Ok(w.finish())
}

/// The locations of one kind where every instance type is offered, sorted: the region, or
/// each zone of the region by name or by ID. Every type Karri offers is offered everywhere:
/// placement puts any type on any node with room. Pure.
fn offering_locations(
    location_type: router::LocationType,
    region: &str,
    zones: &[&Value],
) -> Vec<String> {
    let mut out: Vec<String> = match location_type {
        router::LocationType::Region => vec![region.to_owned()],
        router::LocationType::AvailabilityZone => zones
            .iter()
            .map(|z| text(z, "/metadata/name").to_owned())
            .collect(),
        router::LocationType::AvailabilityZoneId => zones.iter().map(|z| zone_id(z)).collect(),
    };
    out.sort();
    out
}

/// DescribeInstanceTypeOfferings: each instance type offered (not being deleted) in each
/// location of the kind asked for.
pub async fn describe_instance_type_offerings(
    cx: &Cx<'_>,
    a: router::DescribeInstanceTypeOfferings,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::INSTANCE_TYPE_OFFERING_FILTERS, false)?;
    let types = cx.everywhere("instancetypes").await?;
    let zones = cx.everywhere("availabilityzones").await?;
    let region = cx.settings.region.as_str();
    let in_region: Vec<&Value> = zones
        .iter()
        .map(|z| &z.value)
        .filter(|z| text(z, "/spec/region") == region)
        .collect();
    let locations = offering_locations(a.location_type, region, &in_region);
    let matcher = Matcher::new(&a.filters);
    let mut offerings = Vec::new();
    for t in types
        .iter()
        .filter(|o| o.value.pointer("/metadata/deletionTimestamp").is_none())
    {
        let name = text(&t.value, "/metadata/name");
        for location in &locations {
            let values = |filter: &str| match filter {
                "instance-type" => vec![Cow::Borrowed(name)],
                "location" => vec![Cow::Borrowed(location.as_str())],
                _ => Vec::new(),
            };
            if matcher.matches(values) {
                offerings.push((format!("{name}\u{0}{location}"), (name, location.clone())));
            }
        }
    }
    let (page, token) = paginate(
        "DescribeInstanceTypeOfferings",
        offerings,
        a.next_token.as_deref(),
        a.max_results.map(|m| m as usize),
    )?;
    let mut w = cx.response("DescribeInstanceTypeOfferings");
    w.set("instanceTypeOfferingSet", page, |w, (name, location)| {
        w.leaf("instanceType", name)
            .leaf("locationType", a.location_type.as_str())
            .leaf("location", &location);
    });
    w.leaf_opt("nextToken", token.as_deref());
    Ok(w.finish())
}

/// Every zone is an availability zone (no local or wavelength zones).
const ZONE_TYPE: &str = "availability-zone";
/// Zones and the region need no opt-in.
const OPT_IN_STATUS: &str = "opt-in-not-required";

/// A zone as DescribeAvailabilityZones shows it; the response and the filters both read it.
struct ZoneView<'v> {
    name: &'v str,
    region: &'v str,
    id: String,
    state: &'static str,
    /// The zone's message (its description), when it has one.
    message: Option<&'v str>,
}

impl<'v> ZoneView<'v> {
    fn of(z: &'v Value) -> Self {
        ZoneView {
            name: text(z, "/metadata/name"),
            region: text(z, "/spec/region"),
            id: zone_id(z),
            state: zone_state(z),
            message: opt(z, "/spec/description"),
        }
    }

    /// The zone group: the region, as for every availability zone of EC2.
    fn group(&self) -> &'v str {
        self.region
    }
}

/// The values a DescribeAvailabilityZones filter sees on a zone: what [`write_zone`] shows.
fn zone_values<'v>(z: &'v ZoneView<'_>, name: &str) -> Vec<Cow<'v, str>> {
    match name {
        "zone-name" => filter::shown(z.name),
        "zone-id" => filter::shown(&z.id),
        "region-name" => filter::shown(z.region),
        "state" => filter::shown(z.state),
        "zone-type" => filter::shown(ZONE_TYPE),
        "group-name" => filter::shown(z.group()),
        "opt-in-status" => filter::shown(OPT_IN_STATUS),
        "message" => filter::shown_opt(z.message),
        _ => Vec::new(),
    }
}

/// One `availabilityZoneInfo` item.
fn write_zone(w: &mut Response, z: &ZoneView<'_>) {
    w.leaf("zoneName", z.name)
        .leaf("zoneState", z.state)
        .leaf("regionName", z.region)
        .leaf("zoneId", &z.id)
        .leaf("zoneType", ZONE_TYPE)
        .leaf("optInStatus", OPT_IN_STATUS)
        .leaf("groupName", z.group())
        .leaf("networkBorderGroup", z.group())
        .set("messageSet", z.message, |w, m| {
            w.leaf("message", m);
        });
}

/// DescribeAvailabilityZones.
pub async fn describe_availability_zones(
    cx: &Cx<'_>,
    a: router::DescribeAvailabilityZones,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::AVAILABILITY_ZONE_FILTERS, false)?;
    let all = cx.everywhere("availabilityzones").await?;
    let region = cx.settings.region.as_str();
    let zones: Vec<ZoneView<'_>> = all
        .iter()
        .map(|o| &o.value)
        .filter(|v| text(v, "/spec/region") == region)
        .map(ZoneView::of)
        .collect();
    for name in a.zone_names.iter().chain(&a.zone_ids) {
        if !zones.iter().any(|z| z.name == name || z.id == *name) {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "The zone '{name}' does not exist."
            )));
        }
    }
    let matcher = Matcher::new(&a.filters);
    let shown: Vec<ZoneView<'_>> = zones
        .into_iter()
        .filter(|z| {
            (a.zone_names.is_empty() && a.zone_ids.is_empty())
                || a.zone_names.iter().any(|n| n == z.name)
                || a.zone_ids.contains(&z.id)
        })
        .filter(|z| matcher.matches(|name| zone_values(z, name)))
        .collect();
    let mut w = cx.response("DescribeAvailabilityZones");
    w.set("availabilityZoneInfo", shown, |w, z| write_zone(w, &z));
    Ok(w.finish())
}

fn zone_state(z: &Value) -> &'static str {
    match opt(z, "/status/state") {
        Some("impaired") => "impaired",
        Some("unavailable") => "unavailable",
        _ => "available",
    }
}

/// A zone's ID as EC2 shows it: the region's short form and the zone letter, e.g. `karri1-az1`.
fn zone_id(z: &Value) -> String {
    let name = text(z, "/metadata/name");
    let region = text(z, "/spec/region");
    let suffix = name.strip_prefix(region).unwrap_or(name);
    let n = suffix
        .chars()
        .last()
        .filter(char::is_ascii_lowercase)
        .map(|c| u32::from(c) - u32::from('a') + 1)
        .unwrap_or(1);
    format!("{}-az{n}", region.replace('-', ""))
}

/// The values a DescribeRegions filter sees on the region: what [`write_region`] shows.
fn region_values<'a>(region: &'a str, endpoint: &'a str, name: &str) -> Vec<Cow<'a, str>> {
    match name {
        "region-name" => filter::shown(region),
        "endpoint" => filter::shown(endpoint),
        "opt-in-status" => filter::shown(OPT_IN_STATUS),
        _ => Vec::new(),
    }
}

/// The `regionInfo` item of the region.
fn write_region(w: &mut Response, region: &str, endpoint: &str) {
    w.leaf("regionName", region)
        .leaf("regionEndpoint", endpoint)
        .leaf("optInStatus", OPT_IN_STATUS);
}

/// DescribeRegions: the one region this cloud serves.
pub fn describe_regions(cx: &Cx<'_>, a: router::DescribeRegions) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::REGION_FILTERS, false)?;
    let region = cx.settings.region.as_str();
    if let Some(other) = a.region_names.iter().find(|r| *r != region) {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "Invalid region: {other}"
        )));
    }
    let endpoint = cx.settings.public_url.trim_start_matches("https://");
    let shown = Matcher::new(&a.filters).matches(|name| region_values(region, endpoint, name));
    let mut w = cx.response("DescribeRegions");
    w.set("regionInfo", shown.then_some(()), |w, ()| {
        write_region(w, region, endpoint);
    });
    Ok(w.finish())
}

/// Account attributes every account has (quotas are fixed until IAM and quotas land).
const ACCOUNT_ATTRIBUTES: &[&str] = &[
    "supported-platforms",
    "default-vpc",
    "max-instances",
    "vpc-max-security-groups-per-interface",
    "max-elastic-ips",
    "vpc-max-elastic-ips",
];

/// DescribeAccountAttributes.
pub fn describe_account_attributes(
    cx: &Cx<'_>,
    a: router::DescribeAccountAttributes,
) -> Result<String, Ec2Error> {
    if let Some(bad) = a
        .attribute_names
        .iter()
        .find(|n| !ACCOUNT_ATTRIBUTES.contains(&n.as_str()))
    {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "Value ({bad}) for parameter attributeName is invalid. Unknown attribute."
        )));
    }
    let vpc = default_vpc_id(&cx.settings.region);
    let shown: Vec<&str> = ACCOUNT_ATTRIBUTES
        .iter()
        .copied()
        .filter(|n| a.attribute_names.is_empty() || a.attribute_names.iter().any(|x| x == n))
        .collect();
    let mut w = cx.response("DescribeAccountAttributes");
    w.set("accountAttributeSet", shown, |w, name| {
        let value = match name {
            "supported-platforms" => "VPC".to_string(),
            "default-vpc" => vpc.clone(),
            "max-instances" => "20".to_string(),
            "vpc-max-security-groups-per-interface" => "5".to_string(),
            _ => "5".to_string(),
        };
        w.leaf("attributeName", name);
        w.set("attributeValueSet", [value], |w, v| {
            w.leaf("attributeValue", &v);
        });
    });
    Ok(w.finish())
}

/// The default VPC as DescribeVpcs shows it; the response and the filters both read it.
struct VpcView<'a> {
    id: String,
    owner: &'a str,
}

const VPC_STATE: &str = "available";
const CIDR_BLOCK_STATE: &str = "associated";
const DHCP_OPTIONS_ID: &str = "default";
const INSTANCE_TENANCY: &str = "default";

impl VpcView<'_> {
    /// The association of its one CIDR block.
    fn association_id(&self) -> String {
        self.id.replace("vpc-", "vpc-cidr-assoc-")
    }
}

/// The values a DescribeVpcs filter sees on the VPC: what [`write_vpc`] shows. It has no tags.
fn vpc_values<'v>(v: &'v VpcView<'_>, name: &str) -> Vec<Cow<'v, str>> {
    if let Some(tags) = filter::tag_filter_values(name, std::iter::empty()) {
        return tags;
    }
    match name {
        "vpc-id" => filter::shown(&v.id),
        "cidr" | "cidr-block-association.cidr-block" => filter::shown(DEFAULT_VPC_CIDR),
        "cidr-block-association.association-id" => filter::shown_owned(v.association_id()),
        "cidr-block-association.state" => filter::shown(CIDR_BLOCK_STATE),
        "is-default" | "isDefault" => filter::shown_bool(true),
        "state" => filter::shown(VPC_STATE),
        "owner-id" => filter::shown(v.owner),
        "dhcp-options-id" => filter::shown(DHCP_OPTIONS_ID),
        _ => Vec::new(),
    }
}

/// The `vpcSet` item of the default VPC.
fn write_vpc(w: &mut Response, v: &VpcView<'_>) {
    w.leaf("vpcId", &v.id)
        .leaf("ownerId", v.owner)
        .leaf("state", VPC_STATE)
        .leaf("cidrBlock", DEFAULT_VPC_CIDR)
        .set("cidrBlockAssociationSet", [()], |w, ()| {
            w.leaf("cidrBlock", DEFAULT_VPC_CIDR)
                .leaf("associationId", &v.association_id());
            w.element("cidrBlockState", |w| {
                w.leaf("state", CIDR_BLOCK_STATE);
            });
        })
        .leaf("dhcpOptionsId", DHCP_OPTIONS_ID)
        .leaf("instanceTenancy", INSTANCE_TENANCY)
        .leaf_bool("isDefault", true)
        .empty("tagSet");
}

/// DescribeVpcs: the default VPC.
pub async fn describe_vpcs(cx: &Cx<'_>, a: router::DescribeVpcs) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::VPC_FILTERS, true)?;
    let vpc = VpcView {
        id: default_vpc_id(&cx.settings.region),
        owner: cx.caller.account_id.as_str(),
    };
    if let Some(other) = a.vpc_ids.iter().find(|v| **v != vpc.id) {
        return Err(Ec2Error::vpc_not_found(other));
    }
    let shown = Matcher::new(&a.filters).matches(|name| vpc_values(&vpc, name));
    let mut w = cx.response("DescribeVpcs");
    w.set("vpcSet", shown.then_some(()), |w, ()| write_vpc(w, &vpc));
    Ok(w.finish())
}

/// DescribeVpcAttribute of the default VPC: Karri runs no DNS server for guests (so no
/// hostnames from it either) and keeps no network address usage metrics, so each is `false`.
pub fn describe_vpc_attribute(
    cx: &Cx<'_>,
    a: router::DescribeVpcAttribute,
) -> Result<String, Ec2Error> {
    if a.vpc_id != default_vpc_id(&cx.settings.region) {
        return Err(Ec2Error::vpc_not_found(&a.vpc_id));
    }
    let mut w = cx.response("DescribeVpcAttribute");
    w.leaf("vpcId", &a.vpc_id);
    w.element(a.attribute.clone(), |w| {
        w.leaf_bool("value", false);
    });
    Ok(w.finish())
}

/// DescribeAddresses: Karri allocates no elastic IP addresses yet, so the set is empty and any
/// address or allocation asked for by name does not exist.
pub fn describe_addresses(cx: &Cx<'_>, a: router::DescribeAddresses) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::ADDRESS_FILTERS, true)?;
    if let Some(ip) = a.public_ips.first() {
        return Err(Ec2Error::address_not_found(ip));
    }
    if let Some(id) = a.allocation_ids.first() {
        return Err(Ec2Error::allocation_not_found(id));
    }
    let mut w = cx.response("DescribeAddresses");
    w.set("addressesSet", std::iter::empty::<()>(), |_, ()| {});
    Ok(w.finish())
}

/// A default subnet as DescribeSubnets shows it; the response and the filters both read it.
struct SubnetView<'a> {
    id: String,
    zone: String,
    zone_id: String,
    arn: String,
    cidr: String,
    /// Its assignable addresses the caller's live instances do not hold.
    available: u64,
    vpc: &'a str,
    owner: &'a str,
}

const SUBNET_STATE: &str = "available";
/// Instances get no public address unless they ask (Karri has no public addresses yet).
const MAP_PUBLIC_IP_ON_LAUNCH: bool = false;

/// The values a DescribeSubnets filter sees on a subnet: what [`write_subnet`] shows. Subnets
/// have no tags.
fn subnet_values<'v>(s: &'v SubnetView<'_>, name: &str) -> Vec<Cow<'v, str>> {
    if let Some(tags) = filter::tag_filter_values(name, std::iter::empty()) {
        return tags;
    }
    match name {
        "subnet-id" => filter::shown(&s.id),
        "availability-zone" | "availabilityZone" => filter::shown(&s.zone),
        "availability-zone-id" | "availabilityZoneId" => filter::shown(&s.zone_id),
        "cidr-block" | "cidr" | "cidrBlock" => filter::shown(&s.cidr),
        "vpc-id" => filter::shown(s.vpc),
        "default-for-az" | "defaultForAz" => filter::shown_bool(true),
        "state" => filter::shown(SUBNET_STATE),
        "owner-id" => filter::shown(s.owner),
        "available-ip-address-count" => filter::shown_number(s.available),
        "map-public-ip-on-launch" => filter::shown_bool(MAP_PUBLIC_IP_ON_LAUNCH),
        _ => Vec::new(),
    }
}

/// One `subnetSet` item.
fn write_subnet(w: &mut Response, s: &SubnetView<'_>) {
    w.leaf("subnetId", &s.id)
        .leaf("state", SUBNET_STATE)
        .leaf("vpcId", s.vpc)
        .leaf("cidrBlock", &s.cidr)
        .leaf_display("availableIpAddressCount", s.available)
        .leaf("availabilityZone", &s.zone)
        .leaf("availabilityZoneId", &s.zone_id)
        .leaf_bool("defaultForAz", true)
        .leaf_bool("mapPublicIpOnLaunch", MAP_PUBLIC_IP_ON_LAUNCH)
        .leaf("ownerId", s.owner)
        .empty("tagSet")
        .leaf("subnetArn", &s.arn);
}

/// DescribeSubnets: one default subnet per zone of the region.
pub async fn describe_subnets(cx: &Cx<'_>, a: router::DescribeSubnets) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::SUBNET_FILTERS, true)?;
    let vpc = default_vpc_id(&cx.settings.region);
    let owner = cx.caller.account_id.as_str();
    let (zones, _) = cx.registry.cache.list(
        "availabilityzones",
        &store::kind_prefix("availabilityzones"),
    );
    let zone_ids: std::collections::HashMap<&str, String> = zones
        .iter()
        .map(|z| (text(&z.value, "/metadata/name"), zone_id(&z.value)))
        .collect();
    let region = &cx.settings.region;
    // The addresses the caller's instances hold (every one but a terminated one's). Each
    // account sees its own default subnets, as on EC2: other accounts' instances are not
    // counted (nor revealed).
    let (instances, _) = cx.registry.cache.list(
        "instances",
        &store::namespace_prefix("instances", &cx.caller.namespace),
    );
    let held: Vec<std::net::Ipv4Addr> = instances
        .iter()
        .filter(|i| opt(&i.value, "/status/state") != Some("terminated"))
        .filter_map(|i| opt(&i.value, "/status/privateIpAddress")?.parse().ok())
        .collect();
    let subnets: Vec<SubnetView<'_>> = zone_subnets(cx)
        .into_iter()
        .map(|(zone, cidr)| {
            let id = default_subnet_id(&zone);
            let used = held.iter().filter(|ip| cidr.is_assignable(**ip)).count();
            SubnetView {
                available: cidr.assignable().saturating_sub(used as u64),
                arn: format!("arn:aws:ec2:{region}:{owner}:subnet/{id}"),
                id,
                zone_id: zone_ids.get(zone.as_str()).cloned().unwrap_or_default(),
                zone,
                cidr: cidr.to_string(),
                vpc: &vpc,
                owner,
            }
        })
        .collect();
    for id in &a.subnet_ids {
        if !subnets.iter().any(|s| s.id == *id) {
            return Err(Ec2Error::subnet_not_found(id));
        }
    }
    let matcher = Matcher::new(&a.filters);
    let shown: Vec<&SubnetView<'_>> = subnets
        .iter()
        .filter(|s| a.subnet_ids.is_empty() || a.subnet_ids.contains(&s.id))
        .filter(|s| matcher.matches(|name| subnet_values(s, name)))
        .collect();
    let mut w = cx.response("DescribeSubnets");
    w.set("subnetSet", shown, |w, s| write_subnet(w, s));
    Ok(w.finish())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ec2::filter::answered::{check, Table};
    use crate::ec2::filter::Filter;
    use serde_json::json;

    /// A response document with the body `write` writes.
    fn rendered(root: &'static str, write: impl FnOnce(&mut Response)) -> String {
        let mut w = Response::new(root, "req-1");
        write(&mut w);
        w.finish()
    }

    fn instance_type() -> Value {
        json!({
            "metadata": {"name": "c1.medium"},
            "spec": {"vcpus": 2, "memoryMiB": 1024, "diskGiB": 20},
        })
    }

    #[test]
    fn every_instance_type_filter_matches_what_describe_instance_types_shows() {
        let record = instance_type();
        let t = TypeView::of(&record);
        let xml = rendered("DescribeInstanceTypesResponse", |w| {
            w.set("instanceTypeSet", [&t], |w, t| write_instance_type(w, t));
        });
        let table = Table {
            accepted: filter::INSTANCE_TYPE_FILTERS,
            taggable: false,
            item: "instanceTypeSet/item",
            rows: &[
                ("bare-metal", "bareMetal"),
                ("current-generation", "currentGeneration"),
                ("free-tier-eligible", "freeTierEligible"),
                ("hypervisor", "hypervisor"),
                (
                    "instance-storage-info.total-size-in-gb",
                    "instanceStorageInfo/totalSizeInGB",
                ),
                ("instance-storage-supported", "instanceStorageSupported"),
                ("instance-type", "instanceType"),
                ("memory-info.size-in-mib", "memoryInfo/sizeInMiB"),
                (
                    "network-info.ipv4-addresses-per-interface",
                    "networkInfo/ipv4AddressesPerInterface",
                ),
                ("network-info.ipv6-supported", "networkInfo/ipv6Supported"),
                (
                    "network-info.maximum-network-interfaces",
                    "networkInfo/maximumNetworkInterfaces",
                ),
                (
                    "network-info.network-performance",
                    "networkInfo/networkPerformance",
                ),
                (
                    "processor-info.supported-architecture",
                    "processorInfo/supportedArchitectures/item",
                ),
                ("supported-boot-mode", "supportedBootModes/item"),
                (
                    "supported-root-device-type",
                    "supportedRootDeviceTypes/item",
                ),
                ("supported-usage-class", "supportedUsageClasses/item"),
                (
                    "supported-virtualization-type",
                    "supportedVirtualizationTypes/item",
                ),
                ("vcpu-info.default-cores", "vCpuInfo/defaultCores"),
                (
                    "vcpu-info.default-threads-per-core",
                    "vCpuInfo/defaultThreadsPerCore",
                ),
                ("vcpu-info.default-vcpus", "vCpuInfo/defaultVCpus"),
            ],
            none: &[],
        };
        check(&table, &xml, |name| instance_type_values(&t, name));
    }

    #[test]
    fn instance_type_filters_on_values_every_type_shows_find_the_type() {
        let record = instance_type();
        let t = TypeView::of(&record);
        let rows = [
            ("bare-metal", "false", true),
            ("bare-metal", "true", false),
            ("supported-usage-class", "on-demand", true),
            ("supported-usage-class", "spot", false),
            ("instance-storage-supported", "true", true),
            ("free-tier-eligible", "false", true),
            ("supported-virtualization-type", "hvm", true),
            ("supported-virtualization-type", "paravirtual", false),
            ("supported-root-device-type", "instance-store", true),
            ("supported-root-device-type", "ebs", false),
            ("supported-boot-mode", "legacy-bios", true),
            ("supported-boot-mode", "uefi", false),
            ("vcpu-info.default-cores", "2", true),
            ("vcpu-info.default-threads-per-core", "1", true),
            ("network-info.ipv6-supported", "false", true),
            ("instance-storage-info.total-size-in-gb", "20", true),
            ("instance-type", "c1.*", true),
        ];
        for (name, value, found) in rows {
            let matcher = Matcher::new(&[Filter::new(name, [value])]);
            assert_eq!(
                matcher.matches(|n| instance_type_values(&t, n)),
                found,
                "{name}={value}"
            );
        }
    }

    #[test]
    fn every_zone_filter_matches_what_describe_availability_zones_shows() {
        let record = json!({
            "metadata": {"name": "karri-1b"},
            "spec": {"region": "karri-1", "description": "Maintenance tonight."},
            "status": {"state": "impaired"},
        });
        let z = ZoneView::of(&record);
        let xml = rendered("DescribeAvailabilityZonesResponse", |w| {
            w.set("availabilityZoneInfo", [&z], |w, z| write_zone(w, z));
        });
        let table = Table {
            accepted: filter::AVAILABILITY_ZONE_FILTERS,
            taggable: false,
            item: "availabilityZoneInfo/item",
            rows: &[
                ("group-name", "groupName"),
                ("message", "messageSet/item/message"),
                ("opt-in-status", "optInStatus"),
                ("region-name", "regionName"),
                ("state", "zoneState"),
                ("zone-id", "zoneId"),
                ("zone-name", "zoneName"),
                ("zone-type", "zoneType"),
            ],
            none: &[],
        };
        check(&table, &xml, |name| zone_values(&z, name));
        assert_eq!(z.id, "karri1-az2");
    }

    #[test]
    fn every_region_filter_matches_what_describe_regions_shows() {
        let (region, endpoint) = ("karri-1", "ec2.karri.example:8443");
        let xml = rendered("DescribeRegionsResponse", |w| {
            w.set("regionInfo", [()], |w, ()| {
                write_region(w, region, endpoint)
            });
        });
        let table = Table {
            accepted: filter::REGION_FILTERS,
            taggable: false,
            item: "regionInfo/item",
            rows: &[
                ("endpoint", "regionEndpoint"),
                ("opt-in-status", "optInStatus"),
                ("region-name", "regionName"),
            ],
            none: &[],
        };
        check(&table, &xml, |name| region_values(region, endpoint, name));
    }

    #[test]
    fn every_vpc_filter_matches_what_describe_vpcs_shows() {
        let vpc = VpcView {
            id: default_vpc_id("karri-1"),
            owner: "123456789012",
        };
        let xml = rendered("DescribeVpcsResponse", |w| {
            w.set("vpcSet", [()], |w, ()| write_vpc(w, &vpc));
        });
        let table = Table {
            accepted: filter::VPC_FILTERS,
            taggable: true,
            item: "vpcSet/item",
            rows: &[
                ("cidr", "cidrBlock"),
                (
                    "cidr-block-association.association-id",
                    "cidrBlockAssociationSet/item/associationId",
                ),
                (
                    "cidr-block-association.cidr-block",
                    "cidrBlockAssociationSet/item/cidrBlock",
                ),
                (
                    "cidr-block-association.state",
                    "cidrBlockAssociationSet/item/cidrBlockState/state",
                ),
                ("dhcp-options-id", "dhcpOptionsId"),
                ("is-default", "isDefault"),
                ("isDefault", "isDefault"),
                ("owner-id", "ownerId"),
                ("state", "state"),
                ("vpc-id", "vpcId"),
                ("tag-key", "tagSet/item/key"),
                ("tag-value", "tagSet/item/value"),
            ],
            // The default VPC has no tags.
            none: &["tag-key", "tag-value"],
        };
        check(&table, &xml, |name| vpc_values(&vpc, name));
    }

    #[test]
    fn every_subnet_filter_matches_what_describe_subnets_shows() {
        let vpc = default_vpc_id("karri-1");
        let subnet = SubnetView {
            id: default_subnet_id("karri-1a"),
            zone: "karri-1a".into(),
            zone_id: "karri1-az1".into(),
            arn: "arn:aws:ec2:karri-1:123456789012:subnet/subnet-1".into(),
            cidr: "172.31.0.0/20".into(),
            available: 4089,
            vpc: &vpc,
            owner: "123456789012",
        };
        let xml = rendered("DescribeSubnetsResponse", |w| {
            w.set("subnetSet", [&subnet], |w, s| write_subnet(w, s));
        });
        let table = Table {
            accepted: filter::SUBNET_FILTERS,
            taggable: true,
            item: "subnetSet/item",
            rows: &[
                ("availability-zone", "availabilityZone"),
                ("availability-zone-id", "availabilityZoneId"),
                ("availabilityZone", "availabilityZone"),
                ("availabilityZoneId", "availabilityZoneId"),
                ("available-ip-address-count", "availableIpAddressCount"),
                ("cidr", "cidrBlock"),
                ("cidr-block", "cidrBlock"),
                ("cidrBlock", "cidrBlock"),
                ("default-for-az", "defaultForAz"),
                ("defaultForAz", "defaultForAz"),
                ("map-public-ip-on-launch", "mapPublicIpOnLaunch"),
                ("owner-id", "ownerId"),
                ("state", "state"),
                ("subnet-id", "subnetId"),
                ("vpc-id", "vpcId"),
                ("tag-key", "tagSet/item/key"),
                ("tag-value", "tagSet/item/value"),
            ],
            // Default subnets have no tags.
            none: &["tag-key", "tag-value"],
        };
        check(&table, &xml, |name| subnet_values(&subnet, name));
    }
}
