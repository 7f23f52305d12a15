//! What every account sees of the cloud itself: instance types, zones, the region, account
//! attributes and the default VPC with one default subnet per zone.

use std::borrow::Cow;

use serde_json::Value;

use super::{default_subnet_id, default_vpc_id, opt, paginate, text, Cx, DEFAULT_VPC_CIDR};
use crate::ec2::error::Ec2Error;
use crate::ec2::filter::{self, Matcher};
use crate::ec2::router;
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

fn one(s: &str) -> Vec<Cow<'_, str>> {
    vec![Cow::Borrowed(s)]
}

/// DescribeInstanceTypes.
pub async fn describe_instance_types(
    cx: &Cx<'_>,
    a: router::DescribeInstanceTypes,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::INSTANCE_TYPE_FILTERS, false)?;
    let all = cx.everywhere("instancetypes").await?;
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
    let hits: Vec<(String, &Value)> = all
        .iter()
        .map(|o| &o.value)
        .filter(|v| {
            a.instance_types.is_empty()
                || a.instance_types
                    .iter()
                    .any(|t| t == text(v, "/metadata/name"))
        })
        .filter(|v| {
            matcher.matches(|name| match name {
                "instance-type" => one(text(v, "/metadata/name")),
                "vcpu-info.default-vcpus" => vec![Cow::Owned(
                    v.pointer("/spec/vcpus")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        .to_string(),
                )],
                "memory-info.size-in-mib" => vec![Cow::Owned(
                    v.pointer("/spec/memoryMiB")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        .to_string(),
                )],
                "current-generation" => one("true"),
                "processor-info.supported-architecture" => one("x86_64"),
                "hypervisor" => one("xen"),
                _ => Vec::new(),
            })
        })
        .map(|v| (text(v, "/metadata/name").to_string(), v))
        .collect();
    let (page, token) = paginate(
        hits,
        a.next_token.as_deref(),
        a.max_results.map(|m| m as usize),
    )?;
    let mut w = cx.response("DescribeInstanceTypes");
    w.set("instanceTypeSet", page, |w, v| {
        let vcpus = v
            .pointer("/spec/vcpus")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mem = v
            .pointer("/spec/memoryMiB")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let disk = v
            .pointer("/spec/diskGiB")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        w.leaf("instanceType", text(v, "/metadata/name"))
            .leaf_bool("currentGeneration", true)
            .leaf_bool("freeTierEligible", false)
            .string_set("supportedUsageClasses", ["on-demand"])
            .string_set("supportedRootDeviceTypes", ["instance-store"])
            .string_set("supportedVirtualizationTypes", ["hvm"])
            .leaf_bool("bareMetal", false)
            .leaf("hypervisor", "xen");
        w.element("processorInfo", |w| {
            w.string_set("supportedArchitectures", ["x86_64"]);
        });
        w.element("vCpuInfo", |w| {
            w.leaf_display("defaultVCpus", vcpus)
                .leaf_display("defaultCores", vcpus)
                .leaf_display("defaultThreadsPerCore", 1);
        });
        w.element("memoryInfo", |w| {
            w.leaf_display("sizeInMiB", mem);
        });
        w.leaf_bool("instanceStorageSupported", true);
        w.element("instanceStorageInfo", |w| {
            w.leaf_display("totalSizeInGB", disk);
        });
        w.element("networkInfo", |w| {
            w.leaf("networkPerformance", "Moderate")
                .leaf_display("maximumNetworkInterfaces", 1)
                .leaf_display("ipv4AddressesPerInterface", 1)
                .leaf_bool("ipv6Supported", false);
        });
        w.string_set("supportedBootModes", ["legacy-bios"]);
    });
    w.leaf_opt("nextToken", token.as_deref());
    Ok(w.finish())
}

/// DescribeAvailabilityZones.
pub async fn describe_availability_zones(
    cx: &Cx<'_>,
    a: router::DescribeAvailabilityZones,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::AVAILABILITY_ZONE_FILTERS, false)?;
    let all = cx.everywhere("availabilityzones").await?;
    let region = cx.settings.region.as_str();
    let zones: Vec<&Value> = all
        .iter()
        .map(|o| &o.value)
        .filter(|v| text(v, "/spec/region") == region)
        .collect();
    for name in a.zone_names.iter().chain(&a.zone_ids) {
        if !zones
            .iter()
            .any(|z| text(z, "/metadata/name") == name || zone_id(z) == *name)
        {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "The zone '{name}' does not exist."
            )));
        }
    }
    let matcher = Matcher::new(&a.filters);
    let mut w = cx.response("DescribeAvailabilityZones");
    let shown: Vec<&Value> = zones
        .into_iter()
        .filter(|z| {
            (a.zone_names.is_empty() && a.zone_ids.is_empty())
                || a.zone_names.iter().any(|n| n == text(z, "/metadata/name"))
                || a.zone_ids.iter().any(|n| *n == zone_id(z))
        })
        .filter(|z| {
            let state = zone_state(z);
            matcher.matches(|name| match name {
                "zone-name" => one(text(z, "/metadata/name")),
                "zone-id" => vec![Cow::Owned(zone_id(z))],
                "region-name" => one(region),
                "state" => one(state),
                "zone-type" => one("availability-zone"),
                "group-name" | "network-border-group" => one(region),
                "opt-in-status" => one("opt-in-not-required"),
                "message" => Vec::new(),
                _ => Vec::new(),
            })
        })
        .collect();
    w.set("availabilityZoneInfo", shown, |w, z| {
        w.leaf("zoneName", text(z, "/metadata/name"))
            .leaf("zoneState", zone_state(z))
            .leaf("regionName", region)
            .leaf("zoneId", &zone_id(z))
            .leaf("zoneType", "availability-zone")
            .leaf("optInStatus", "opt-in-not-required")
            .leaf("groupName", region)
            .leaf("networkBorderGroup", region)
            .set("messageSet", opt(z, "/spec/description"), |w, m| {
                w.leaf("message", m);
            });
    });
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
    let shown = Matcher::new(&a.filters).matches(|name| match name {
        "region-name" => one(region),
        "endpoint" => one(endpoint),
        "opt-in-status" => one("opt-in-not-required"),
        _ => Vec::new(),
    });
    let mut w = cx.response("DescribeRegions");
    w.set("regionInfo", shown.then_some(()), |w, ()| {
        w.leaf("regionName", region)
            .leaf("regionEndpoint", endpoint)
            .leaf("optInStatus", "opt-in-not-required");
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

/// DescribeVpcs: the default VPC.
pub async fn describe_vpcs(cx: &Cx<'_>, a: router::DescribeVpcs) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::VPC_FILTERS, true)?;
    let vpc = default_vpc_id(&cx.settings.region);
    if let Some(other) = a.vpc_ids.iter().find(|v| **v != vpc) {
        return Err(Ec2Error::vpc_not_found(other));
    }
    let owner = cx.caller.account_id.as_str();
    let shown = Matcher::new(&a.filters).matches(|name| match name {
        "vpc-id" => one(&vpc),
        "cidr" | "cidr-block-association.cidr-block" => one(DEFAULT_VPC_CIDR),
        "is-default" => one("true"),
        "state" => one("available"),
        "owner-id" => one(owner),
        "dhcp-options-id" => one("default"),
        "instance-tenancy" => one("default"),
        _ => Vec::new(),
    });
    let mut w = cx.response("DescribeVpcs");
    w.set("vpcSet", shown.then_some(()), |w, ()| {
        w.leaf("vpcId", &vpc)
            .leaf("ownerId", owner)
            .leaf("state", "available")
            .leaf("cidrBlock", DEFAULT_VPC_CIDR)
            .set("cidrBlockAssociationSet", [()], |w, ()| {
                w.leaf("cidrBlock", DEFAULT_VPC_CIDR)
                    .leaf("associationId", &vpc.replace("vpc-", "vpc-cidr-assoc-"));
                w.element("cidrBlockState", |w| {
                    w.leaf("state", "associated");
                });
            })
            .leaf("dhcpOptionsId", "default")
            .leaf("instanceTenancy", "default")
            .leaf_bool("isDefault", true)
            .empty("tagSet");
    });
    Ok(w.finish())
}

/// DescribeSubnets: one default subnet per zone of the region.
pub async fn describe_subnets(cx: &Cx<'_>, a: router::DescribeSubnets) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::SUBNET_FILTERS, true)?;
    let vpc = default_vpc_id(&cx.settings.region);
    let subnets: Vec<(String, String, String)> = zone_subnets(cx)
        .into_iter()
        .map(|(z, subnet)| (default_subnet_id(&z), z, subnet.to_string()))
        .collect();
    for id in &a.subnet_ids {
        if !subnets.iter().any(|(s, _, _)| s == id) {
            return Err(Ec2Error::subnet_not_found(id));
        }
    }
    let owner = cx.caller.account_id.as_str();
    let matcher = Matcher::new(&a.filters);
    let shown: Vec<&(String, String, String)> = subnets
        .iter()
        .filter(|(id, _, _)| a.subnet_ids.is_empty() || a.subnet_ids.contains(id))
        .filter(|(id, zone, cidr)| {
            matcher.matches(|name| match name {
                "subnet-id" => one(id),
                "availability-zone" => one(zone),
                "cidr-block" | "cidr" | "cidrBlock" => one(cidr),
                "vpc-id" => one(&vpc),
                "default-for-az" | "defaultForAz" => one("true"),
                "state" => one("available"),
                "owner-id" => one(owner),
                _ => Vec::new(),
            })
        })
        .collect();
    let mut w = cx.response("DescribeSubnets");
    w.set("subnetSet", shown, |w, (id, zone, cidr)| {
        w.leaf("subnetId", id)
            .leaf("state", "available")
            .leaf("vpcId", &vpc)
            .leaf("cidrBlock", cidr)
            .leaf_display("availableIpAddressCount", 4091)
            .leaf("availabilityZone", zone)
            .leaf_bool("defaultForAz", true)
            .leaf_bool("mapPublicIpOnLaunch", false)
            .leaf("ownerId", owner)
            .empty("tagSet");
    });
    Ok(w.finish())
}
