//! Instance actions: RunInstances, DescribeInstances, DescribeInstanceStatus, Terminate/Stop/
//! Start/RebootInstances, Describe/ModifyInstanceAttribute and GetConsoleOutput.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize as _;
use serde_json::{json, Value};

use super::instance_view::InstanceView;
use super::{
    at, default_subnet_id, default_vpc_id, from_api, id_of, namespace, opt, paginate, text, Cx,
    ARCHITECTURE, HYPERVISOR, ROOT_DEVICE_TYPE, VIRTUALIZATION_TYPE,
};
use crate::admission::{self, Subresource};
use crate::cache::{CachedObject, Rendering};
use crate::ec2::error::Ec2Error;
use crate::ec2::filter::{self, Matcher};
use crate::ec2::router::{self, WireEnum as _};
// What every instance runs and is billed as: what its image shows.
use super::images::{PLATFORM_DETAILS, USAGE_OPERATION};
use crate::ec2::xml::{time_text, Response};
use crate::registry::WriteOptions;

/// Most instances one RunInstances call launches (one etcd transaction holds them all).
pub const MAX_INSTANCES_PER_CALL: u32 = 50;

/// EC2 state of an instance record.
fn state(v: &Value) -> crds::InstanceState {
    at(v, "/status/state")
        .and_then(|s| crds::InstanceState::deserialize(s).ok())
        .unwrap_or_default()
}

/// The state the record asks for: terminated once it is being deleted (`kubectl delete`),
/// whatever its spec says, as the operator takes it.
fn desired(v: &Value) -> crds::DesiredState {
    if at(v, "/metadata/deletionTimestamp").is_some() {
        return crds::DesiredState::Terminated;
    }
    at(v, "/spec/desiredState")
        .and_then(|s| crds::DesiredState::deserialize(s).ok())
        .unwrap_or_default()
}

/// The state EC2 shows: the reported one, moved on by a request not yet acted upon (a stop
/// asked of a running instance shows `stopping` at once, as on AWS).
pub(super) fn shown_state(v: &Value) -> crds::InstanceState {
    shown(desired(v), state(v))
}

/// The state EC2 shows for a desired and a reported state.
pub(super) fn shown(
    desired: crds::DesiredState,
    state: crds::InstanceState,
) -> crds::InstanceState {
    use crds::{DesiredState as D, InstanceState as S};
    match (desired, state) {
        (D::Terminated, S::Terminated) => S::Terminated,
        (D::Terminated, _) => S::ShuttingDown,
        (D::Stopped, S::Running | S::Pending) => S::Stopping,
        (D::Running, S::Stopped | S::Stopping) => S::Pending,
        (_, s) => s,
    }
}

fn zone_of(v: &Value) -> &str {
    opt(v, "/status/availabilityZone")
        .or_else(|| opt(v, "/spec/availabilityZone"))
        .unwrap_or("")
}

fn private_dns(ip: Option<&str>, region: &str) -> String {
    match ip {
        Some(ip) => format!("ip-{}.{region}.compute.internal", ip.replace('.', "-")),
        None => String::new(),
    }
}

/// The root device of every instance.
const ROOT_DEVICE_NAME: &str = "/dev/vda";
const TENANCY: &str = "default";
const MONITORING_STATE: &str = "disabled";
const SOURCE_DEST_CHECK: bool = true;
const EBS_OPTIMIZED: bool = false;

/// The values a DescribeInstances filter sees on an instance: what [`write_instance`] (and the
/// reservation around it, for `reservation-id` and `owner-id`) shows.
fn instance_values<'v>(
    v: &InstanceView<'v>,
    name: &str,
    owner: &str,
    region: &str,
) -> Vec<Cow<'v, str>> {
    if let Some(tags) = filter::tag_filter_values(name, v.tags()) {
        return tags;
    }
    match name {
        "instance-id" => filter::shown(v.id()),
        "instance-state-name" => filter::shown(v.shown_state().as_str()),
        "instance-state-code" => filter::shown_number(v.shown_state().code()),
        "instance-type" => filter::shown(v.instance_type()),
        "image-id" => filter::shown(v.image_id()),
        "availability-zone" => filter::shown(v.zone()),
        "key-name" => filter::shown_opt(v.key_name()),
        // The instance's one address; the response lists no network interfaces of its own.
        "private-ip-address" => filter::shown_opt(v.private_ip()),
        "ip-address" => filter::shown_opt(v.public_ip()),
        "private-dns-name" => filter::shown_owned(private_dns(v.private_ip(), region)),
        "reservation-id" => filter::shown_owned(v.reservation()),
        "owner-id" => filter::shown_owned(owner.to_string()),
        "launch-index" => filter::shown_number(v.launch_index()),
        "client-token" => filter::shown_opt(v.client_token()),
        "vpc-id" => filter::shown_owned(default_vpc_id(region)),
        "subnet-id" => subnet_of(v.zone())
            .map(filter::shown_owned)
            .unwrap_or_default(),
        "group-id" | "instance.group-id" | "group-name" | "instance.group-name" => {
            filter::shown_all(v.security_group_ids().iter().copied())
        }
        "architecture" => filter::shown(ARCHITECTURE),
        "hypervisor" => filter::shown(HYPERVISOR),
        "virtualization-type" => filter::shown(VIRTUALIZATION_TYPE),
        "root-device-type" => filter::shown(ROOT_DEVICE_TYPE),
        "root-device-name" => filter::shown(ROOT_DEVICE_NAME),
        "tenancy" => filter::shown(TENANCY),
        "monitoring-state" => filter::shown(MONITORING_STATE),
        // The time the response shows (the record's creation until the node reports).
        "launch-time" => filter::shown_owned(time_text(v.launch_time())),
        "kernel-id" => filter::shown_opt(v.kernel_id()),
        "ramdisk-id" => filter::shown_opt(v.ramdisk_id()),
        "metadata-options.http-tokens" => filter::shown(v.http_tokens()),
        "metadata-options.http-endpoint" => filter::shown(v.http_endpoint()),
        "metadata-options.instance-metadata-tags" => filter::shown(v.instance_metadata_tags()),
        "metadata-options.http-put-response-hop-limit" => {
            filter::shown_number(v.http_put_response_hop_limit())
        }
        "metadata-options.state" => filter::shown(v.metadata_options_state()),
        "source-dest-check" => filter::shown_bool(SOURCE_DEST_CHECK),
        "ebs-optimized" => filter::shown_bool(EBS_OPTIMIZED),
        // `reason` is the state transition reason the response shows as `<reason>`.
        "reason" => vec![v.transition_reason()]
            .into_iter()
            .filter(|r| !r.is_empty())
            .collect(),
        "state-reason-code" => filter::shown_opt(v.reason()),
        "state-reason-message" => match v.reason() {
            Some(_) => filter::shown(v.message()),
            None => Vec::new(),
        },
        "platform-details" => filter::shown(PLATFORM_DETAILS),
        "usage-operation" => filter::shown(USAGE_OPERATION),
        // Its one interface, as `networkInterfaceSet` shows it (once it has an address).
        n if n.starts_with("network-interface.") => interface_values(v, n, region),
        // Shown empty on every instance: no public DNS name, no placement group, no product
        // codes and no block devices (the root disk is instance storage); no `platform` (it is
        // shown only for Windows) and no `instanceLifecycle` (only spot and scheduled
        // instances have one). These match nothing.
        "platform"
        | "instance-lifecycle"
        | "dns-name"
        | "placement-group-name"
        | "product-code"
        | "product-code.type"
        | "block-device-mapping.attach-time"
        | "block-device-mapping.delete-on-termination"
        | "block-device-mapping.device-name"
        | "block-device-mapping.status"
        | "block-device-mapping.volume-id" => Vec::new(),
        _ => Vec::new(),
    }
}

/// The values a `network-interface.*` filter sees on an instance: those of the interface
/// [`write_instance`] shows in its `networkInterfaceSet`; none before it has one.
fn interface_values<'v>(v: &InstanceView<'v>, name: &str, region: &str) -> Vec<Cow<'v, str>> {
    let Some((ip, mac)) = v.private_ip().zip(v.mac_address()) else {
        return Vec::new();
    };
    let eni = v.network_interface_id();
    match name.strip_prefix("network-interface.").unwrap_or(name) {
        "network-interface-id" => filter::shown_owned(eni),
        "subnet-id" => subnet_of(v.zone())
            .map(filter::shown_owned)
            .unwrap_or_default(),
        "vpc-id" => filter::shown_owned(default_vpc_id(region)),
        "status" => filter::shown("in-use"),
        "mac-address" => filter::shown_owned(mac),
        "private-dns-name" | "addresses.private-dns-name" => {
            filter::shown_owned(private_dns(Some(ip), region))
        }
        "addresses.private-ip-address" => filter::shown(ip),
        "addresses.primary" => filter::shown_bool(true),
        "source-dest-check" => filter::shown_bool(SOURCE_DEST_CHECK),
        "group-id" | "group-name" => filter::shown_all(v.security_group_ids().iter().copied()),
        "attachment.attachment-id" => {
            filter::shown_owned(format!("eni-attach-{}", eni.trim_start_matches("eni-")))
        }
        "attachment.device-index" | "attachment.network-card-index" => filter::shown_number(0),
        "attachment.status" => filter::shown("attached"),
        "attachment.attach-time" => filter::shown_owned(time_text(v.created())),
        "attachment.delete-on-termination" => filter::shown_bool(true),
        // Shown empty: no description, no IPv6 addresses, no public address (association).
        _ => Vec::new(),
    }
}

/// The default subnet of the zone an instance runs in; none before it has one.
fn subnet_of(zone: &str) -> Option<String> {
    (!zone.is_empty()).then(|| default_subnet_id(zone))
}

/// Write one instance as an `instancesSet` item.
fn write_instance(w: &mut Response, v: &InstanceView<'_>, region: &str) {
    let st = v.shown_state();
    let ip = v.private_ip();
    let zone = v.zone();
    w.item();
    w.leaf("instanceId", v.id()).leaf("imageId", v.image_id());
    w.element("instanceState", |w| {
        w.leaf_display("code", st.code()).leaf("name", st.as_str());
    });
    w.leaf("privateDnsName", &private_dns(ip, region))
        .leaf("dnsName", "")
        .leaf("reason", &v.transition_reason())
        .leaf_opt("keyName", v.key_name())
        .leaf_display("amiLaunchIndex", v.launch_index())
        .empty("productCodes")
        .leaf("instanceType", v.instance_type())
        .leaf_opt("kernelId", v.kernel_id())
        .leaf_opt("ramdiskId", v.ramdisk_id())
        .leaf_time("launchTime", v.launch_time());
    w.element("placement", |w| {
        w.leaf("availabilityZone", zone)
            .leaf("groupName", "")
            .leaf("tenancy", TENANCY);
    });
    w.element("monitoring", |w| {
        w.leaf("state", MONITORING_STATE);
    });
    w.leaf_opt("subnetId", subnet_of(zone).as_deref());
    w.leaf("vpcId", &default_vpc_id(region))
        .leaf_opt("privateIpAddress", ip)
        .leaf_opt("ipAddress", v.public_ip())
        .leaf_bool("sourceDestCheck", SOURCE_DEST_CHECK);
    w.set("groupSet", v.security_group_ids().iter(), |w, g| {
        w.leaf("groupId", g).leaf("groupName", g);
    });
    if let Some(code) = v.reason() {
        w.element("stateReason", |w| {
            w.leaf("code", code).leaf("message", v.message());
        });
    }
    w.leaf("architecture", ARCHITECTURE)
        .leaf("rootDeviceType", ROOT_DEVICE_TYPE)
        .leaf("rootDeviceName", ROOT_DEVICE_NAME)
        .empty("blockDeviceMapping")
        .leaf("virtualizationType", VIRTUALIZATION_TYPE)
        .leaf_opt("clientToken", v.client_token());
    w.set("tagSet", v.tags(), |w, (k, val)| {
        w.leaf("key", k).leaf("value", val);
    });
    w.leaf("hypervisor", HYPERVISOR);
    // Its one interface, once it has an address: in the zone's default subnet, made and
    // deleted with the instance.
    let interface = ip.zip(v.mac_address());
    w.set("networkInterfaceSet", interface, |w, (ip, mac)| {
        let eni = v.network_interface_id();
        let dns = private_dns(Some(ip), region);
        w.leaf("networkInterfaceId", &eni)
            .leaf_opt("subnetId", subnet_of(zone).as_deref())
            .leaf("vpcId", &default_vpc_id(region))
            .leaf("description", "")
            .leaf("status", "in-use")
            .leaf("macAddress", &mac)
            .leaf("privateIpAddress", ip)
            .leaf("privateDnsName", &dns)
            .leaf_bool("sourceDestCheck", SOURCE_DEST_CHECK)
            .leaf("interfaceType", "interface");
        w.set("groupSet", v.security_group_ids().iter(), |w, g| {
            w.leaf("groupId", g).leaf("groupName", g);
        });
        w.element("attachment", |w| {
            w.leaf(
                "attachmentId",
                &format!("eni-attach-{}", eni.trim_start_matches("eni-")),
            )
            .leaf_display("deviceIndex", 0)
            .leaf_display("networkCardIndex", 0)
            .leaf("status", "attached")
            .leaf_time("attachTime", v.created())
            .leaf_bool("deleteOnTermination", true);
        });
        w.set("privateIpAddressesSet", [()], |w, ()| {
            w.leaf("privateIpAddress", ip)
                .leaf("privateDnsName", &dns)
                .leaf_bool("primary", true);
        });
        w.empty("ipv6AddressesSet");
    });
    w.leaf_bool("ebsOptimized", EBS_OPTIMIZED);
    w.leaf("platformDetails", PLATFORM_DETAILS)
        .leaf("usageOperation", USAGE_OPERATION);
    w.element("cpuOptions", |_| {});
    w.element("metadataOptions", |w| {
        w.leaf("state", v.metadata_options_state())
            .leaf("httpTokens", v.http_tokens())
            .leaf_display("httpPutResponseHopLimit", v.http_put_response_hop_limit())
            .leaf("httpEndpoint", v.http_endpoint())
            .leaf("instanceMetadataTags", v.instance_metadata_tags());
    });
    w.close();
}

/// The `instancesSet` item of `record`, where it sorts and its reservation, made once per
/// version of the record ([`CachedObject::rendering`]): a DescribeInstances of thousands of
/// instances copies what earlier ones wrote rather than writing it again.
fn rendered<'v>(record: &'v CachedObject, region: &str) -> &'v Rendering {
    record.rendering.get_or_init(|| {
        let view = InstanceView::of(&record.value);
        let (sort_key, group) = sort_key(&view);
        let mut f = Response::fragment(2048);
        write_instance(&mut f, &view, region);
        Rendering {
            sort_key,
            group,
            bytes: bytes::Bytes::from(f.fragment_bytes()),
        }
    })
}

/// Write `reservationSet` items from `(reservation ID, instance)` pairs: consecutive instances of
/// one reservation share an item.
fn write_reservations(w: &mut Response, instances: &[(String, &Rendering)], owner: &str) {
    let mut i = 0;
    while i < instances.len() {
        let reservation = &instances[i].0;
        let mut j = i;
        while j < instances.len() && instances[j].0 == *reservation {
            j += 1;
        }
        w.item();
        write_reservation_body(
            w,
            reservation,
            instances[i..j].iter().map(|(_, r)| r),
            owner,
            |w, r| {
                w.raw(&r.bytes);
            },
        );
        w.close();
        i = j;
    }
}

/// A reservation's fields, its instances written by `write_one`.
fn write_reservation_body<I>(
    w: &mut Response,
    reservation: &str,
    instances: impl IntoIterator<Item = I>,
    owner: &str,
    mut write_one: impl FnMut(&mut Response, I),
) {
    w.leaf("reservationId", reservation)
        .leaf("ownerId", owner)
        .empty("groupSet");
    w.open("instancesSet");
    for v in instances {
        write_one(w, v);
    }
    w.close();
}

/// The zone to launch in: the subnet's (each zone has one default subnet), else the one asked
/// for in `Placement.AvailabilityZone`, else none (the scheduler picks). A subnet in another
/// zone than the one asked for is refused as EC2 refuses it.
fn launch_zone(
    asked: Option<&str>,
    subnet: Option<&str>,
    zones: &[String],
) -> Result<Option<String>, Ec2Error> {
    let Some(subnet) = subnet else {
        return Ok(asked.map(str::to_string));
    };
    let Some(subnet_zone) = zones.iter().find(|z| default_subnet_id(z) == subnet) else {
        return Err(Ec2Error::subnet_not_found(subnet));
    };
    match asked {
        Some(asked) if asked != subnet_zone => Err(Ec2Error::invalid_parameter_value(format!(
            "Value ({asked}) for parameter availabilityZone is invalid. Subnet '{subnet}' is in the availability zone {subnet_zone}"
        ))),
        _ => Ok(Some(subnet_zone.clone())),
    }
}

/// Where a launch of `min_count`..=`count` instances of `instance_type` goes and how many it
/// makes, given the `room` each zone has for that type now ([`crate::capacity::launch_room`],
/// capped at `count`): the zone asked for, else the one with the most room (the first in name
/// order among equals), as many instances as fit there up to `count`. Fewer than `min_count`
/// is `InsufficientInstanceCapacity`, as EC2 answers, naming the zones that do have room. Pure.
fn launch_choice(
    asked: Option<&str>,
    room: &BTreeMap<String, u32>,
    min_count: u32,
    count: u32,
    instance_type: &str,
) -> Result<(String, u32), Ec2Error> {
    let best = room
        .iter()
        .rev()
        .max_by_key(|(_, n)| **n)
        .map(|(z, n)| (z.clone(), *n));
    let (zone, fit) = match asked {
        Some(z) => (z.to_owned(), room.get(z).copied().unwrap_or(0)),
        None => best.unwrap_or_default(),
    };
    if fit >= min_count && fit > 0 {
        return Ok((zone, fit.min(count)));
    }
    let wanted = match min_count {
        1 => "an instance".to_owned(),
        n => format!("{n} instances"),
    };
    let elsewhere: Vec<&str> = room
        .iter()
        .filter(|(z, n)| **n >= min_count.max(1) && asked != Some(z.as_str()))
        .map(|(z, _)| z.as_str())
        .collect();
    let message = match asked {
        Some(z) if elsewhere.is_empty() => format!(
            "We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested ({z}) for {wanted}, nor in any other zone."
        ),
        Some(z) => format!(
            "We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested ({z}) for {wanted}. You can currently get {instance_type} capacity by not specifying an Availability Zone in your request or choosing {}.",
            elsewhere.join(", ")
        ),
        None if room.is_empty() => format!(
            "We currently do not have sufficient {instance_type} capacity for {wanted}: no node is registered."
        ),
        None => format!(
            "We currently do not have sufficient {instance_type} capacity for {wanted}: at most {fit} fit{} now.",
            if fit == 1 { "s" } else { "" }
        ),
    };
    Err(Ec2Error::insufficient_instance_capacity(message))
}

/// Whether instance type `name` is offered: its record exists and is not being deleted (a type
/// an administrator deletes takes no new instances, while the ones it has keep it).
fn offered_type(cx: &Cx<'_>, name: &str) -> bool {
    let key = crate::store::record_key("instancetypes", None, name);
    cx.registry
        .cache
        .get("instancetypes", &key)
        .is_some_and(|t| t.value.pointer("/metadata/deletionTimestamp").is_none())
}

/// RunInstances.
pub async fn run_instances(
    cx: &Cx<'_>,
    a: router::RunInstances,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    if a.min_count > MAX_INSTANCES_PER_CALL {
        return Err(Ec2Error::instance_limit_exceeded(format!(
            "Your quota allows for {MAX_INSTANCES_PER_CALL} more running instance(s) per request. You requested at least {}",
            a.min_count
        )));
    }
    let count = a.max_count.min(MAX_INSTANCES_PER_CALL);
    // A retry with the same client token returns the first call's reservation.
    if let Some(token) = &a.client_token {
        if let Some(found) = existing_reservation(cx, token, &a).await? {
            return Ok(found);
        }
    }
    let image = super::images::launchable_machine_image(cx, &a.image_id).await?;
    let image_id = id_of(&image).to_string();
    let instance_type = a.instance_type.clone();
    if !offered_type(cx, &instance_type) {
        return Err(Ec2Error::invalid_instance_type(&instance_type));
    }
    let zone = launch_zone(
        a.availability_zone.as_deref(),
        a.subnet_id.as_deref(),
        &super::catalog::zone_names(cx),
    )?;
    if let Some(z) = &zone {
        let key = crate::store::record_key("availabilityzones", None, z);
        if cx.registry.cache.get("availabilityzones", &key).is_none() {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "Invalid availability zone: [{z}]"
            )));
        }
    }
    if let Some(key_name) = &a.key_name {
        if super::keypairs::find_by_name(cx, key_name).await?.is_none() {
            return Err(Ec2Error::key_pair_not_found(key_name));
        }
    }
    if a.disable_api_stop {
        return Err(Ec2Error::unsupported_operation(
            "DisableApiStop is not supported by Karri yet; launch without it.",
        ));
    }
    if !a.block_device_mappings.is_empty() {
        return Err(Ec2Error::unsupported_operation(
            "Block device mappings are not supported by Karri yet (EBS volumes come later).",
        ));
    }
    if a.instance_initiated_shutdown_behavior == router::ShutdownBehavior::Terminate {
        return Err(Ec2Error::unsupported_operation(
            "InstanceInitiatedShutdownBehavior=terminate is not supported by Karri yet.",
        ));
    }
    for (what, code, id, prefixes) in [
        ("kernel", "AKI", &a.kernel_id, ["eki", "aki"]),
        ("ramdisk", "ARI", &a.ramdisk_id, ["eri", "ari"]),
    ] {
        if let Some(id) = id {
            let not_found = || {
                Ec2Error::new(
                    format!("Invalid{code}ID.NotFound"),
                    400,
                    format!("The {what} image '{id}' does not exist"),
                )
            };
            // Another kind of image (a machine image given as kernel) is no kernel image, as
            // RegisterImage answers it.
            if !router::is_ec2_id_of(id, &prefixes) {
                return Err(not_found());
            }
            super::images::launchable_image(cx, id)
                .await
                .map_err(|_| not_found())?;
        }
    }
    let metadata_options = (a.http_tokens.is_some()
        || a.http_endpoint.is_some()
        || a.http_put_response_hop_limit.is_some()
        || a.instance_metadata_tags.is_some())
    .then(|| {
        let mut o = json!({
            "httpTokens": a.http_tokens.as_deref().unwrap_or("optional"),
            "httpEndpoint": a.http_endpoint.as_deref().unwrap_or("enabled"),
            "instanceMetadataTags": a.instance_metadata_tags.as_deref().unwrap_or("disabled"),
        });
        if let Some(limit) = a.http_put_response_hop_limit {
            o["httpPutResponseHopLimit"] = json!(limit);
        }
        o
    });
    if !a.security_group_ids.is_empty() || !a.security_groups.is_empty() {
        return Err(Ec2Error::unsupported_operation(
            "Security groups are not supported by Karri yet; launch without SecurityGroupId/SecurityGroup.",
        ));
    }
    let mut tags = Vec::new();
    for spec in &a.tag_specifications {
        match spec.resource_type.as_str() {
            "instance" => {
                for t in &spec.tags {
                    tags.push(json!({"key": t.key, "value": t.value}));
                }
            }
            // The volumes a launch makes: a Karri instance boots from instance storage and
            // gets no EBS volume, so there is nothing to tag (as on EC2 for an instance-store
            // image). Ansible's ec2_instance sends these tags with every named launch.
            "volume" => {}
            other => {
                return Err(Ec2Error::unsupported_operation(format!(
                    "Tagging {other} resources at launch is not supported by Karri yet."
                )))
            }
        }
    }
    let reservation = admission::new_id("r");
    let annotations = a
        .client_token
        .as_ref()
        .map(|_| json!({CLIENT_REQUEST_ANNOTATION: request_fingerprint(&a)}));
    let bodies = |zone: Option<&str>, count: u32| -> Vec<Value> {
        (0..count)
            .map(|i| {
                let id = admission::new_id("i");
                let mut metadata = json!({"name": id});
                if let Some(annotations) = &annotations {
                    metadata["annotations"] = annotations.clone();
                }
                json!({
                    "apiVersion": crds::API_VERSION,
                    "kind": "Instance",
                    "metadata": metadata,
                    "spec": {
                        "imageId": image_id,
                        "instanceType": instance_type,
                        "keyName": a.key_name,
                        "userData": a.user_data,
                        "availabilityZone": zone,
                        "clientToken": a.client_token,
                        "reservationId": reservation,
                        "launchIndex": i,
                        "disableApiTermination": a.disable_api_termination,
                        "tags": tags,
                        "kernelId": a.kernel_id,
                        "ramdiskId": a.ramdisk_id,
                        "metadataOptions": metadata_options,
                    }
                })
            })
            .map(strip_nulls)
            .collect()
    };
    let kind = cx.kind("instances")?;
    if dry_run {
        // The records the call would make go through admission, so that a launch the call
        // would refuse is refused here too; what room there is is not checked (EC2's dry run
        // does not check capacity either).
        let options = WriteOptions {
            dry_run: true,
            ..WriteOptions::by(crate::ec2::FIELD_MANAGER)
        };
        let checked = cx
            .registry
            .create_all(
                &kind,
                Some(&cx.caller.namespace),
                bodies(zone.as_deref(), 1),
                &cx.caller.principal(),
                options,
            )
            .await;
        return match checked {
            // The token was taken meanwhile (a launch with it, just made): the call is
            // answered with that launch, as it would be without DryRun.
            Err(e) if e.code == 409 && a.client_token.is_some() => {
                let token = a.client_token.as_deref().unwrap_or("");
                existing_reservation(cx, token, &a)
                    .await?
                    .ok_or_else(|| launch_refusal(e))
            }
            Err(e) => Err(launch_refusal(e)),
            Ok(_) => Err(Ec2Error::dry_run_operation()),
        };
    }
    // Records no node could take would only wait: refuse them as EC2 does, and launch as many
    // as fit between MinCount and MaxCount, all in one zone.
    // A launch answered before this one came is in the cache (see below); two launches at once
    // may still both count the same room, and the one placement cannot serve waits, pending,
    // with its reason.
    let room = crate::capacity::launch_room(&cx.registry.cache, &instance_type, count);
    let (zone, count) = launch_choice(zone.as_deref(), &room, a.min_count, count, &instance_type)?;
    let made = cx
        .registry
        .create_all(
            &kind,
            Some(&cx.caller.namespace),
            bodies(Some(&zone), count),
            &cx.caller.principal(),
            WriteOptions::by(crate::ec2::FIELD_MANAGER),
        )
        .await;
    let made = match made {
        Ok(made) => made,
        Err(e) if e.code == 409 && a.client_token.is_some() => {
            // A concurrent call with the same token won: answer with its reservation.
            let token = a.client_token.as_deref().unwrap_or("");
            return existing_reservation(cx, token, &a)
                .await?
                .ok_or_else(|| from_api(e));
        }
        Err(e) => return Err(launch_refusal(e)),
    };
    // The answer waits until the watch cache holds the new records, so that a launch sent after
    // it counts their room (no trip to etcd: the watch brings them within a moment).
    let written = made
        .iter()
        .filter_map(|w| {
            w.object
                .pointer("/metadata/resourceVersion")?
                .as_str()?
                .parse()
                .ok()
        })
        .max();
    if let Some(revision) = written {
        if !cx
            .registry
            .cache
            .wait_for(revision, LAUNCH_CACHE_WAIT)
            .await
        {
            tracing::warn!(
                revision,
                "the watch cache did not show the launched instances in time"
            );
        }
    }
    let views: Vec<InstanceView<'_>> = made.iter().map(|w| InstanceView::of(&w.object)).collect();
    let mut w = cx.response("RunInstances");
    let region = &cx.settings.region;
    write_reservation_body(
        &mut w,
        &reservation,
        &views,
        &cx.caller.account_id,
        |w, v| write_instance(w, v, region),
    );
    Ok(w.finish())
}

/// The EC2 error of a launch the registry refused: a record it found invalid is named by the
/// RunInstances parameters that made it, not by the instance record (whose ID the caller never
/// saw) and its fields.
fn launch_refusal(e: crate::error::ApiError) -> Ec2Error {
    let causes = match (&e.code, e.details.as_deref()) {
        (422, Some(details)) if !details.causes.is_empty() => &details.causes,
        _ => return from_api(e),
    };
    let message = causes
        .iter()
        .map(|(field, why)| {
            let parameter = launch_parameter(field);
            if field.is_empty() {
                why.clone()
            } else if why.starts_with(field.as_str()) {
                why.replacen(field.as_str(), parameter, 1)
            } else {
                format!("{parameter}: {why}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ec2Error::invalid_parameter_value(message)
}

/// The RunInstances parameter an Instance record's field comes from. Pure.
fn launch_parameter(field: &str) -> &str {
    const PARAMETERS: &[(&str, &str)] = &[
        ("spec.tags", "TagSpecification"),
        ("spec.kernelId", "KernelId"),
        ("spec.ramdiskId", "RamdiskId"),
        ("spec.userData", "UserData"),
        ("spec.keyName", "KeyName"),
        ("spec.instanceType", "InstanceType"),
        ("spec.imageId", "ImageId"),
        ("spec.clientToken", "ClientToken"),
        ("spec.availabilityZone", "Placement.AvailabilityZone"),
        ("spec.metadataOptions", "MetadataOptions"),
    ];
    PARAMETERS
        .iter()
        .find(|(prefix, _)| {
            field
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
        .map_or(field, |(_, parameter)| parameter)
}

/// How long a launch's answer waits for the watch cache to show its instances.
const LAUNCH_CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Annotation on the instances a RunInstances with a `ClientToken` made: the fingerprint of that
/// request ([`request_fingerprint`]), which a retry with the same token must match.
pub const CLIENT_REQUEST_ANNOTATION: &str = "karri.dev/client-token-request";

/// What identifies a RunInstances request for `ClientToken` idempotency: every parameter but
/// the token, image IDs by their hex (the `ami-` alias of an `emi-` is the same image), as
/// hex(SHA-256) of a canonical JSON. Pure.
pub fn request_fingerprint(a: &router::RunInstances) -> String {
    use sha2::{Digest as _, Sha256};
    let image = |id: &str| id.split_once('-').map_or(id, |(_, hex)| hex).to_owned();
    let canonical = json!([
        image(&a.image_id),
        a.instance_type,
        a.min_count,
        a.max_count,
        a.key_name,
        a.user_data,
        a.availability_zone,
        a.subnet_id,
        a.kernel_id.as_deref().map(image),
        a.ramdisk_id.as_deref().map(image),
        a.tag_specifications
            .iter()
            .map(|t| json!([
                t.resource_type,
                t.tags
                    .iter()
                    .map(|g| [&g.key, &g.value])
                    .collect::<Vec<_>>()
            ]))
            .collect::<Vec<_>>(),
        a.disable_api_termination,
        a.disable_api_stop,
        a.ebs_optimized,
        a.http_tokens,
        a.http_endpoint,
        a.http_put_response_hop_limit,
        a.instance_metadata_tags,
        a.security_group_ids,
        a.security_groups,
        a.block_device_mappings.len(),
        a.instance_initiated_shutdown_behavior.as_str(),
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

fn strip_nulls(mut v: Value) -> Value {
    if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
        spec.retain(|_, f| !f.is_null() && f.as_array().is_none_or(|a| !a.is_empty()));
    }
    v
}

/// The reservation a client token already created, as a RunInstances response; an error when
/// the earlier call asked for something else.
async fn existing_reservation(
    cx: &Cx<'_>,
    token: &str,
    a: &router::RunInstances,
) -> Result<Option<String>, Ec2Error> {
    let index = admission::client_token_key(&cx.caller.namespace, token);
    let Some(first) = cx.registry.find_by_index(&index).await.map_err(from_api)? else {
        return Ok(None);
    };
    let fingerprint = first
        .pointer(&format!(
            "/metadata/annotations/{}",
            CLIENT_REQUEST_ANNOTATION.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let first = InstanceView::of(&first);
    let reservation = first.reservation();
    let same = match fingerprint {
        Some(f) => f == request_fingerprint(a),
        // Made before requests were fingerprinted: what the record still shows.
        None => {
            first.instance_type() == a.instance_type
                && super::images::same_image(first.image_id(), &a.image_id)
                && first.key_name() == a.key_name.as_deref()
        }
    };
    if !same {
        return Err(Ec2Error::idempotent_parameter_mismatch());
    }
    let all = cx.own("instances").await?;
    let mut members: Vec<InstanceView<'_>> = all
        .iter()
        .map(|o| InstanceView::of(&o.value))
        .filter(|v| v.reservation() == reservation)
        .collect();
    members.sort_by_key(InstanceView::launch_index);
    let mut w = cx.response("RunInstances");
    let region = &cx.settings.region;
    write_reservation_body(
        &mut w,
        &reservation,
        &members,
        &cx.caller.account_id,
        |w, v| write_instance(w, v, region),
    );
    Ok(Some(w.finish()))
}

/// Resolve requested instance IDs to the caller's records; all must exist.
async fn own_instances(cx: &Cx<'_>, ids: &[String]) -> Result<Vec<Value>, Ec2Error> {
    let mut found = Vec::with_capacity(ids.len());
    let mut missing = Vec::new();
    for id in ids {
        match cx.own_by_id("instances", id).await? {
            Some(v) => found.push(v),
            None => missing.push(id.as_str()),
        }
    }
    if !missing.is_empty() {
        return Err(Ec2Error::instance_not_found(&missing));
    }
    Ok(found)
}

/// The order DescribeInstances lists an instance in (and its page token), with its reservation:
/// both from one visit of the record, as there are thousands.
fn sort_key(v: &InstanceView<'_>) -> (String, String) {
    let reservation = v.reservation();
    let key = format!("{reservation}/{:06}/{}", v.launch_index(), v.id());
    (key, reservation)
}

/// DescribeInstances.
pub async fn describe_instances(
    cx: &Cx<'_>,
    a: router::DescribeInstances,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::INSTANCE_FILTERS, true)?;
    let all = cx.own("instances").await?;
    let wanted: Option<std::collections::HashSet<&str>> = if a.instance_ids.is_empty() {
        None
    } else {
        let present: std::collections::HashSet<&str> =
            all.iter().map(|o| id_of(&o.value)).collect();
        let missing: Vec<&str> = a
            .instance_ids
            .iter()
            .map(String::as_str)
            .filter(|id| !present.contains(id))
            .collect();
        if !missing.is_empty() {
            return Err(Ec2Error::instance_not_found(&missing));
        }
        Some(a.instance_ids.iter().map(String::as_str).collect())
    };
    let matcher = Matcher::new(&super::images::with_emi_spellings(
        &a.filters,
        &["image-id"],
    ));
    let owner = cx.caller.account_id.as_str();
    let region = cx.settings.region.as_str();
    let unfiltered = a.filters.is_empty();
    let hits: Vec<(String, (String, &Rendering))> = all
        .iter()
        .filter(|o| wanted.as_ref().is_none_or(|w| w.contains(id_of(&o.value))))
        .filter(|o| {
            unfiltered || {
                let view = InstanceView::of(&o.value);
                matcher.matches(|name| instance_values(&view, name, owner, region))
            }
        })
        .map(|o| {
            let r = rendered(o, region);
            (r.sort_key.clone(), (r.group.clone(), r))
        })
        .collect();
    let (page, token) = paginate(
        "DescribeInstances",
        hits,
        a.next_token.as_deref(),
        a.max_results.map(|m| m as usize),
    )?;
    let mut w = Response::with_capacity(
        "DescribeInstancesResponse",
        cx.request_id,
        2048 * page.len() + 512,
    );
    w.open("reservationSet");
    write_reservations(&mut w, &page, owner);
    w.close();
    w.leaf_opt("nextToken", token.as_deref());
    Ok(w.finish())
}

fn health(v: &Value) -> (&'static str, &'static str) {
    let conditions = v
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let field_of = |t: &str, field: &str| {
        conditions
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(t))
            .and_then(|c| c.get(field).and_then(Value::as_str))
            .map(str::to_string)
    };
    // EC2 runs its status checks on running instances only: the others' are not-applicable.
    if shown_state(v) != crds::InstanceState::Running {
        return ("not-applicable", "not-applicable");
    }
    let system = match field_of("NodeHealthy", "status").as_deref() {
        Some("False") => "impaired",
        _ => "ok",
    };
    // A paused domain's guest runs nothing: it cannot be reached, as a hung guest on EC2.
    let paused = field_of(crds::CONDITION_DOMAIN_RUNNING, "reason").as_deref()
        == Some(crds::REASON_DOMAIN_PAUSED);
    let instance = match (shown_state(v), field_of("Ready", "status").as_deref()) {
        (crds::InstanceState::Running, _) if paused => "impaired",
        (crds::InstanceState::Running, Some("True")) => "ok",
        (crds::InstanceState::Running, _) => "initializing",
        _ => "not-applicable",
    };
    let instance = if system == "impaired" {
        "impaired"
    } else {
        instance
    };
    (instance, system)
}

/// DescribeInstanceStatus.
pub async fn describe_instance_status(
    cx: &Cx<'_>,
    a: router::DescribeInstanceStatus,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::INSTANCE_STATUS_FILTERS, false)?;
    let all = if a.instance_ids.is_empty() {
        cx.own("instances")
            .await?
            .iter()
            .map(|o| o.value.clone())
            .collect()
    } else {
        own_instances(cx, &a.instance_ids).await?
    };
    let matcher = Matcher::new(&a.filters);
    let hits: Vec<(String, &Value)> = all
        .iter()
        .filter(|v| a.include_all_instances || shown_state(v) == crds::InstanceState::Running)
        .filter(|v| matcher.matches(|name| instance_status_values(v, name)))
        .map(|v| (id_of(v).to_string(), v))
        .collect();
    let (page, token) = paginate(
        "DescribeInstanceStatus",
        hits,
        a.next_token.as_deref(),
        a.max_results.map(|m| m as usize),
    )?;
    let mut w = cx.response("DescribeInstanceStatus");
    w.set("instanceStatusSet", page, write_instance_status);
    w.leaf_opt("nextToken", token.as_deref());
    Ok(w.finish())
}

/// The reachability check's status behind a summary status; none for a check not run
/// (`not-applicable`).
fn reachability(status: &str) -> Option<&'static str> {
    match status {
        "ok" => Some("passed"),
        "impaired" => Some("failed"),
        "initializing" => Some("initializing"),
        "not-applicable" => None,
        _ => Some("insufficient-data"),
    }
}

/// The values a DescribeInstanceStatus filter sees on an instance: what
/// [`write_instance_status`] shows.
fn instance_status_values<'v>(v: &'v Value, name: &str) -> Vec<Cow<'v, str>> {
    let (instance, system) = health(v);
    match name {
        "availability-zone" => filter::shown(zone_of(v)),
        "instance-state-name" => filter::shown(shown_state(v).as_str()),
        "instance-state-code" => filter::shown_number(shown_state(v).code()),
        "instance-status.status" => filter::shown(instance),
        "instance-status.reachability" => reachability(instance)
            .map(filter::shown)
            .unwrap_or_default(),
        "system-status.status" => filter::shown(system),
        "system-status.reachability" => reachability(system).map(filter::shown).unwrap_or_default(),
        // No scheduled events: the response shows an empty `eventsSet`. These match nothing.
        "event.code"
        | "event.description"
        | "event.instance-event-id"
        | "event.not-after"
        | "event.not-before"
        | "event.not-before-deadline" => Vec::new(),
        _ => Vec::new(),
    }
}

/// One `instanceStatusSet` item.
fn write_instance_status(w: &mut Response, v: &Value) {
    let st = shown_state(v);
    let (instance, system) = health(v);
    w.leaf("instanceId", id_of(v))
        .leaf("availabilityZone", zone_of(v));
    w.element("instanceState", |w| {
        w.leaf_display("code", st.code()).leaf("name", st.as_str());
    });
    for (name, status) in [("systemStatus", system), ("instanceStatus", instance)] {
        w.element(name, |w| {
            w.leaf("status", status);
            if let Some(check) = reachability(status) {
                w.set("details", [check], |w, s| {
                    w.leaf("name", "reachability").leaf("status", s);
                });
            }
        });
    }
    w.empty("eventsSet");
}

/// A power-state request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// TerminateInstances.
    Terminate,
    /// StopInstances.
    Stop,
    /// StartInstances.
    Start,
}

/// Change an instance's record with compare-and-swap. `change` sees the record as stored in
/// etcd (not the cached copy the caller looked at) and may refuse it with an EC2 error, so that
/// every check holds for the state actually written over.
async fn update_spec(
    cx: &Cx<'_>,
    v: &Value,
    change: &mut (dyn FnMut(&mut Value) -> Result<(), Ec2Error> + Send),
) -> Result<Value, Ec2Error> {
    let kind = cx.kind("instances")?;
    let name = text(v, "/metadata/name").to_string();
    let uid = text(v, "/metadata/uid").to_string();
    let mut refused: Option<Ec2Error> = None;
    let written = cx
        .registry
        .update_with(
            &kind,
            Some(namespace(v)),
            &name,
            &cx.caller.principal(),
            Subresource::Main,
            None,
            WriteOptions::by(crate::ec2::FIELD_MANAGER),
            &mut |cur: &Value| {
                if text(cur, "/metadata/uid") != uid {
                    // Another record has taken the name since the lookup.
                    refused = Some(Ec2Error::instance_not_found(&[id_of(v)]));
                    return Err(crate::error::ApiError::conflict_message("refused"));
                }
                let mut next = cur.clone();
                match change(&mut next) {
                    Ok(()) => Ok(next),
                    Err(e) => {
                        refused = Some(e);
                        Err(crate::error::ApiError::conflict_message("refused"))
                    }
                }
            },
        )
        .await;
    if let Some(e) = refused {
        return Err(e);
    }
    let written = written.map_err(|e| {
        if e.code == 404 {
            Ec2Error::instance_not_found(&[id_of(v)])
        } else {
            from_api(e)
        }
    })?;
    Ok(written.object)
}

/// Whether `change` may be asked of an instance in record `v`.
fn check_change(change: Change, v: &Value) -> Result<(), Ec2Error> {
    let id = id_of(v);
    let gone = desired(v) == crds::DesiredState::Terminated;
    match change {
        Change::Terminate
            if at(v, "/spec/disableApiTermination").and_then(Value::as_bool) == Some(true) =>
        {
            Err(Ec2Error::new(
                "OperationNotPermitted",
                400,
                format!("The instance '{id}' may not be terminated. Modify its 'disableApiTermination' instance attribute and try again."),
            ))
        }
        // Started again while it shuts down, it would flip back under the node's feet. EC2
        // refuses what it shows as stopping: a stop asked of a running instance shows
        // `stopping` before its node reports anything.
        Change::Start
            if state(v) == crds::InstanceState::Stopping
                || shown_state(v) == crds::InstanceState::Stopping =>
        {
            Err(Ec2Error::incorrect_instance_state(format!(
                "The instance '{id}' is not in a state from which it can be started: it is stopping."
            )))
        }
        // As EC2: an instance on its first way up cannot be stopped (one started again after
        // a stop, pending again, can).
        Change::Stop
            if !gone
                && shown_state(v) == crds::InstanceState::Pending
                && at(v, "/status/launchTime").is_none() =>
        {
            Err(Ec2Error::incorrect_instance_state(format!(
                "Instance '{id}' cannot be stopped as it has never reached the 'running' state."
            )))
        }
        Change::Stop | Change::Start if gone => Err(Ec2Error::incorrect_instance_state(format!(
            "This instance '{id}' is not in a state from which it can be {}.",
            if change == Change::Stop {
                "stopped"
            } else {
                "started"
            }
        ))),
        _ => Ok(()),
    }
}

/// Marks `next` for a forced stop (StopInstances with `Force`: its node powers it off without
/// waiting for the guest), or clears the mark of an earlier one on any other stop or a start.
/// Pure.
fn mark_force_stop(next: &mut Value, change: Change, force: bool, at: &str) {
    use crds::FORCE_STOP_ANNOTATION;
    match change {
        Change::Stop if force => {
            next["metadata"]["annotations"][FORCE_STOP_ANNOTATION] = json!(at);
        }
        Change::Stop | Change::Start => {
            if let Some(a) = next
                .pointer_mut("/metadata/annotations")
                .and_then(Value::as_object_mut)
            {
                a.remove(FORCE_STOP_ANNOTATION);
            }
        }
        Change::Terminate => {}
    }
}

/// TerminateInstances, StopInstances (`force`: without waiting for the guest) and
/// StartInstances: set the desired power state.
pub async fn change_state(
    cx: &Cx<'_>,
    change: Change,
    ids: &[String],
    force: bool,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    use crds::{DesiredState as D, InstanceState as S};
    let instances = own_instances(cx, ids).await?;
    for v in &instances {
        check_change(change, v)?;
    }
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let target = match change {
        Change::Terminate => D::Terminated,
        Change::Stop => D::Stopped,
        Change::Start => D::Running,
    };
    let mut results = Vec::with_capacity(instances.len());
    for v in &instances {
        let previous = shown_state(v);
        // Checked again against the stored record: a terminate may have landed meanwhile.
        let asked_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let now = update_spec(cx, v, &mut |next: &mut Value| {
            check_change(change, next)?;
            next["spec"]["desiredState"] = json!(target.as_str());
            mark_force_stop(next, change, force, &asked_at);
            Ok(())
        })
        .await?;
        let mut current = shown_state(&now);
        if change == Change::Stop && current == S::Stopped && previous != S::Stopped {
            current = S::Stopping;
        }
        results.push((id_of(v).to_string(), current, previous));
    }
    let action = match change {
        Change::Terminate => "TerminateInstances",
        Change::Stop => "StopInstances",
        Change::Start => "StartInstances",
    };
    let mut w = cx.response(action);
    w.set("instancesSet", results, |w, (id, current, previous)| {
        w.leaf("instanceId", &id);
        w.element("currentState", |w| {
            w.leaf_display("code", current.code())
                .leaf("name", current.as_str());
        });
        w.element("previousState", |w| {
            w.leaf_display("code", previous.code())
                .leaf("name", previous.as_str());
        });
    });
    Ok(w.finish())
}

use crds::REBOOT_ANNOTATION;

/// RebootInstances: record the request on each instance (acted upon by its node agent).
pub async fn reboot_instances(
    cx: &Cx<'_>,
    ids: &[String],
    dry_run: bool,
) -> Result<String, Ec2Error> {
    let instances = own_instances(cx, ids).await?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for v in &instances {
        if shown_state(v) != crds::InstanceState::Running {
            // EC2 ignores reboot requests for instances that are not running.
            continue;
        }
        update_spec(cx, v, &mut |next: &mut Value| {
            next["metadata"]["annotations"][REBOOT_ANNOTATION] = json!(at);
            Ok(())
        })
        .await?;
    }
    let mut w = cx.response("RebootInstances");
    w.leaf_bool("return", true);
    Ok(w.finish())
}

/// DescribeInstanceAttribute.
pub async fn describe_instance_attribute(
    cx: &Cx<'_>,
    a: router::DescribeInstanceAttribute,
) -> Result<String, Ec2Error> {
    let v = own_instances(cx, std::slice::from_ref(&a.instance_id))
        .await?
        .remove(0);
    let mut w = cx.response("DescribeInstanceAttribute");
    w.leaf("instanceId", &a.instance_id);
    let value = |w: &mut Response, name: &'static str, value: Option<&str>| {
        w.element(name, |w| {
            if let Some(value) = value {
                w.leaf("value", value);
            }
        });
    };
    match a.attribute.as_str() {
        "enclaveOptions" => {
            w.element("enclaveOptions", |w| {
                w.leaf_bool("enabled", false);
            });
        }
        "instanceType" => value(&mut w, "instanceType", opt(&v, "/spec/instanceType")),
        "userData" => value(&mut w, "userData", opt(&v, "/spec/userData")),
        // The one the record names, else the image's own that the operator resolved.
        "kernel" => value(
            &mut w,
            "kernel",
            opt(&v, "/spec/kernelId").or_else(|| opt(&v, "/status/launch/kernel/imageId")),
        ),
        "ramdisk" => value(
            &mut w,
            "ramdisk",
            opt(&v, "/spec/ramdiskId").or_else(|| opt(&v, "/status/launch/ramdisk/imageId")),
        ),
        "rootDeviceName" => value(&mut w, "rootDeviceName", Some("/dev/vda")),
        "disableApiTermination" => {
            let on = v
                .pointer("/spec/disableApiTermination")
                .and_then(Value::as_bool)
                == Some(true);
            value(
                &mut w,
                "disableApiTermination",
                Some(if on { "true" } else { "false" }),
            )
        }
        "disableApiStop" => value(&mut w, "disableApiStop", Some("false")),
        "instanceInitiatedShutdownBehavior" => {
            value(&mut w, "instanceInitiatedShutdownBehavior", Some("stop"))
        }
        "sourceDestCheck" => value(&mut w, "sourceDestCheck", Some("true")),
        "ebsOptimized" => value(&mut w, "ebsOptimized", Some("false")),
        "enaSupport" => value(&mut w, "enaSupport", Some("false")),
        "sriovNetSupport" => value(&mut w, "sriovNetSupport", None),
        "blockDeviceMapping" => {
            w.empty("blockDeviceMapping");
        }
        "productCodes" => {
            w.empty("productCodes");
        }
        "groupSet" => {
            w.empty("groupSet");
        }
        other => {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "Value ({other}) for parameter attribute is invalid. Unknown attribute."
            )))
        }
    }
    Ok(w.finish())
}

/// ModifyInstanceAttribute: the instance type and user data while stopped, API termination
/// protection at any time.
pub async fn modify_instance_attribute(
    cx: &Cx<'_>,
    a: router::ModifyInstanceAttribute,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    use router::InstanceAttributeChange as C;
    let v = own_instances(cx, std::slice::from_ref(&a.instance_id))
        .await?
        .remove(0);
    if always_so(&a.change) {
        // What every Karri instance has: nothing to change, and no error, as EC2 answers a
        // change to the current value.
        if desired(&v) == crds::DesiredState::Terminated {
            return Err(Ec2Error::incorrect_instance_state(format!(
                "The instance '{}' is terminated: its attributes can no longer be modified.",
                a.instance_id
            )));
        }
        if dry_run {
            return Err(Ec2Error::dry_run_operation());
        }
        let mut w = cx.response("ModifyInstanceAttribute");
        w.leaf_bool("return", true);
        return Ok(w.finish());
    }
    let (field, value) = match &a.change {
        C::InstanceType(t) => {
            if !offered_type(cx, t) {
                return Err(Ec2Error::invalid_instance_type(t));
            }
            ("instanceType", json!(t))
        }
        C::UserData(u) => ("userData", json!(u)),
        C::DisableApiTermination(d) => ("disableApiTermination", json!(d)),
        other => {
            return Err(Ec2Error::unsupported_operation(format!(
                "Changing {} is not supported by Karri yet.",
                change_name(other)
            )))
        }
    };
    let needs_stopped = matches!(a.change, C::InstanceType(_) | C::UserData(_));
    let stopped_check = |v: &Value| {
        if desired(v) == crds::DesiredState::Terminated {
            Err(Ec2Error::incorrect_instance_state(format!(
                "The instance '{}' is terminated: its attributes can no longer be modified.",
                a.instance_id
            )))
        } else if needs_stopped && shown_state(v) != crds::InstanceState::Stopped {
            Err(Ec2Error::incorrect_instance_state(format!(
                "The instance '{}' is not in the 'stopped' state.",
                a.instance_id
            )))
        } else {
            Ok(())
        }
    };
    stopped_check(&v)?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    update_spec(cx, &v, &mut |next: &mut Value| {
        stopped_check(next)?;
        next["spec"][field] = value.clone();
        Ok(())
    })
    .await?;
    let mut w = cx.response("ModifyInstanceAttribute");
    w.leaf_bool("return", true);
    Ok(w.finish())
}

/// ModifyInstanceMetadataOptions: the options given replace the instance's, the others keep
/// theirs (EC2's defaults when it never had any). The node agent serves the new options from
/// its next look at the record, so the answer says `pending`, as EC2's does.
pub async fn modify_instance_metadata_options(
    cx: &Cx<'_>,
    a: router::ModifyInstanceMetadataOptions,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    let v = own_instances(cx, std::slice::from_ref(&a.instance_id))
        .await?
        .remove(0);
    let live = |v: &Value| {
        if desired(v) == crds::DesiredState::Terminated {
            Err(Ec2Error::incorrect_instance_state(format!(
                "The instance '{}' is terminated: its metadata options can no longer be modified.",
                a.instance_id
            )))
        } else {
            Ok(())
        }
    };
    live(&v)?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let written = update_spec(cx, &v, &mut |next: &mut Value| {
        live(next)?;
        let options = next["spec"]
            .as_object_mut()
            .map(|spec| {
                spec.entry("metadataOptions").or_insert_with(|| {
                    json!({
                        "httpTokens": "optional",
                        "httpEndpoint": "enabled",
                        "instanceMetadataTags": "disabled",
                    })
                })
            })
            .ok_or_else(Ec2Error::internal_error)?;
        for (field, value) in [
            ("httpTokens", a.http_tokens.as_ref().map(|t| json!(t))),
            (
                "httpPutResponseHopLimit",
                a.http_put_response_hop_limit.map(|l| json!(l)),
            ),
            ("httpEndpoint", a.http_endpoint.as_ref().map(|e| json!(e))),
            (
                "instanceMetadataTags",
                a.instance_metadata_tags.as_ref().map(|t| json!(t)),
            ),
        ] {
            if let Some(value) = value {
                let map = options
                    .as_object_mut()
                    .ok_or_else(Ec2Error::internal_error)?;
                map.insert(field.to_string(), value);
            }
        }
        Ok(())
    })
    .await?;
    let view = InstanceView::of(&written);
    let mut w = cx.response("ModifyInstanceMetadataOptions");
    w.leaf("instanceId", &a.instance_id);
    w.element("instanceMetadataOptions", |w| {
        w.leaf("state", "pending")
            .leaf("httpTokens", view.http_tokens())
            .leaf_display(
                "httpPutResponseHopLimit",
                view.http_put_response_hop_limit(),
            )
            .leaf("httpEndpoint", view.http_endpoint())
            .leaf("instanceMetadataTags", view.instance_metadata_tags());
    });
    Ok(w.finish())
}

/// Whether `c` asks for the value every Karri instance has of an attribute Karri does not let
/// change (what DescribeInstanceAttribute shows): no API stop protection, stop on an
/// instance-initiated shutdown, source/destination checking, no EBS optimisation, no ENA. Pure.
fn always_so(c: &router::InstanceAttributeChange) -> bool {
    use router::InstanceAttributeChange as C;
    matches!(
        c,
        C::DisableApiStop(false)
            | C::InstanceInitiatedShutdownBehavior(router::ShutdownBehavior::Stop)
            | C::SourceDestCheck(true)
            | C::EbsOptimized(false)
            | C::EnaSupport(false)
    )
}

fn change_name(c: &router::InstanceAttributeChange) -> &'static str {
    use router::InstanceAttributeChange as C;
    match c {
        C::InstanceType(_) => "instanceType",
        C::Kernel(_) => "kernel",
        C::Ramdisk(_) => "ramdisk",
        C::UserData(_) => "userData",
        C::DisableApiTermination(_) => "disableApiTermination",
        C::DisableApiStop(_) => "disableApiStop",
        C::InstanceInitiatedShutdownBehavior(_) => "instanceInitiatedShutdownBehavior",
        C::SourceDestCheck(_) => "sourceDestCheck",
        C::EbsOptimized(_) => "ebsOptimized",
        C::EnaSupport(_) => "enaSupport",
        C::SriovNetSupport(_) => "sriovNetSupport",
        C::GroupSet(_) => "groupSet",
    }
}

/// GetConsoleOutput: the tail of the serial console that the instance's node agent keeps in
/// `status.consoleOutput`, base64-encoded as EC2 returns it. An instance with no output yet gets
/// EC2's answer for that case: the instance ID and a timestamp, without an `output` element.
pub async fn get_console_output(
    cx: &Cx<'_>,
    a: router::GetConsoleOutput,
) -> Result<String, Ec2Error> {
    let found = own_instances(cx, std::slice::from_ref(&a.instance_id)).await?;
    let v = found
        .first()
        .ok_or_else(|| Ec2Error::instance_not_found(&[&a.instance_id]))?;
    use base64::Engine as _;
    let output = opt(v, "/status/consoleOutput")
        .map(|text| base64::engine::general_purpose::STANDARD.encode(text));
    let when = opt(v, "/status/consoleOutputTime")
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(chrono::Utc::now, |t| t.with_timezone(&chrono::Utc));
    let mut w = cx.response("GetConsoleOutput");
    w.leaf("instanceId", &a.instance_id)
        .leaf_time("timestamp", when)
        .leaf_opt("output", output.as_deref());
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::filter::answered::{check, check_values, Table};

    fn record(desired: &str, state: &str, protected: bool) -> Value {
        json!({
            "metadata": {"labels": {crds::ID_LABEL: "i-0123456789abcdef0"}},
            "spec": {"desiredState": desired, "disableApiTermination": protected},
            "status": {"state": state},
        })
    }

    #[test]
    fn a_refused_launch_names_the_runinstances_parameter_behind_each_field() {
        let rows = [
            ("spec.tags[1]", "TagSpecification"),
            ("spec.tags", "TagSpecification"),
            ("spec.kernelId", "KernelId"),
            ("spec.userData", "UserData"),
            ("spec.metadataOptions.httpTokens", "MetadataOptions"),
            ("spec.tagsX", "spec.tagsX"),
            ("metadata.name", "metadata.name"),
        ];
        for (field, parameter) in rows {
            assert_eq!(launch_parameter(field), parameter, "{field}");
        }
        let refused = launch_refusal(crate::error::ApiError::invalid(
            "Instance",
            "i-0123456789abcdef0",
            vec![(
                "spec.tags[1]".into(),
                "spec.tags[1] must hold no control characters".into(),
            )],
        ));
        assert_eq!(refused.code, "InvalidParameterValue");
        assert_eq!(
            refused.message,
            "TagSpecification must hold no control characters"
        );
    }

    #[test]
    fn a_client_token_retry_must_repeat_every_parameter_of_the_request() {
        let base = router::RunInstances {
            image_id: "emi-0123456789abcdef0".into(),
            instance_type: "t1.micro".into(),
            min_count: 1,
            max_count: 1,
            client_token: Some("t".into()),
            ..Default::default()
        };
        let fp = request_fingerprint(&base);
        let same = |f: &dyn Fn(&mut router::RunInstances)| {
            let mut a = base.clone();
            f(&mut a);
            request_fingerprint(&a) == fp
        };
        assert!(same(&|_| {}));
        assert!(same(&|a| a.client_token = Some("another".into())));
        assert!(
            same(&|a| a.image_id = "ami-0123456789abcdef0".into()),
            "the ami- alias"
        );
        type Edit<'a> = (&'a str, &'a dyn Fn(&mut router::RunInstances));
        let changes: [Edit<'_>; 9] = [
            ("image", &|a| a.image_id = "emi-0000000000000000f".into()),
            ("type", &|a| a.instance_type = "m1.small".into()),
            ("count", &|a| a.max_count = 5),
            ("user data", &|a| a.user_data = Some("aGk=".into())),
            ("key", &|a| a.key_name = Some("k".into())),
            ("zone", &|a| a.availability_zone = Some("karri-1b".into())),
            ("protection", &|a| a.disable_api_termination = true),
            ("tokens", &|a| a.http_tokens = Some("required".into())),
            ("tags", &|a| {
                a.tag_specifications = vec![router::TagSpecification {
                    resource_type: "instance".into(),
                    tags: vec![router::Tag {
                        key: "k".into(),
                        value: "v".into(),
                    }],
                }]
            }),
        ];
        for (what, change) in changes {
            assert!(!same(change), "{what} must change the fingerprint");
        }
    }

    #[test]
    fn a_launch_goes_where_there_is_room_and_is_refused_below_min_count() {
        let room: BTreeMap<String, u32> = [("karri-1a", 2), ("karri-1b", 5), ("karri-1c", 5)]
            .into_iter()
            .map(|(z, n)| (z.to_string(), n))
            .collect();
        let ok = |asked, min, count| launch_choice(asked, &room, min, count, "m1.small").ok();
        let pick = |z: &str, n| Some((z.to_string(), n));
        // Without a zone: the most room, the first in name order among equals.
        assert_eq!(ok(None, 1, 5), pick("karri-1b", 5));
        assert_eq!(ok(None, 1, 3), pick("karri-1b", 3));
        // A zone asked for: as many as fit there, at least MinCount.
        assert_eq!(ok(Some("karri-1a"), 1, 5), pick("karri-1a", 2));
        assert_eq!(ok(Some("karri-1a"), 2, 5), pick("karri-1a", 2));
        assert_eq!(ok(Some("karri-1a"), 3, 5), None);
        assert_eq!(ok(Some("karri-1z"), 1, 1), None, "a zone without nodes");
        let refusal = |asked, min, room: &BTreeMap<String, u32>| {
            let Err(e) = launch_choice(asked, room, min, 50, "m1.small") else {
                panic!("{asked:?} x{min} must be refused");
            };
            assert_eq!(
                (e.code.as_ref(), e.status),
                ("InsufficientInstanceCapacity", 500)
            );
            e.message
        };
        assert_eq!(
            refusal(Some("karri-1a"), 3, &room),
            "We currently do not have sufficient m1.small capacity in the Availability Zone you requested (karri-1a) for 3 instances. You can currently get m1.small capacity by not specifying an Availability Zone in your request or choosing karri-1b, karri-1c."
        );
        assert_eq!(
            refusal(Some("karri-1b"), 6, &room),
            "We currently do not have sufficient m1.small capacity in the Availability Zone you requested (karri-1b) for 6 instances, nor in any other zone."
        );
        assert_eq!(
            refusal(None, 6, &room),
            "We currently do not have sufficient m1.small capacity for 6 instances: at most 5 fit now."
        );
        assert_eq!(
            refusal(None, 1, &BTreeMap::new()),
            "We currently do not have sufficient m1.small capacity for an instance: no node is registered."
        );
        let full: BTreeMap<String, u32> = [("karri-1a".to_string(), 0)].into();
        assert_eq!(
            refusal(None, 1, &full),
            "We currently do not have sufficient m1.small capacity for an instance: at most 0 fit now."
        );
    }

    #[test]
    fn the_launch_zone_is_the_subnets_and_must_agree_with_the_placement() {
        let zones = vec!["karri-1a".to_string(), "karri-1b".to_string()];
        let (a, b) = (default_subnet_id("karri-1a"), default_subnet_id("karri-1b"));
        type Row<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Result<Option<&'a str>, &'a str>,
        );
        let rows: [Row<'_>; 7] = [
            (None, None, Ok(None)),
            (Some("karri-1b"), None, Ok(Some("karri-1b"))),
            (None, Some(&a), Ok(Some("karri-1a"))),
            (Some("karri-1a"), Some(&a), Ok(Some("karri-1a"))),
            (Some("karri-1a"), Some(&b), Err("InvalidParameterValue")),
            (Some("elsewhere-1a"), Some(&b), Err("InvalidParameterValue")),
            (
                None,
                Some("subnet-0123456789abcdef0"),
                Err("InvalidSubnetID.NotFound"),
            ),
        ];
        for (asked, subnet, want) in rows {
            let got = launch_zone(asked, subnet, &zones);
            let got = got
                .as_ref()
                .map(Option::as_deref)
                .map_err(|e| e.code.as_ref());
            assert_eq!(got, want, "Placement {asked:?}, subnet {subnet:?}");
        }
        let Err(err) = launch_zone(Some("karri-1a"), Some(&b), &zones) else {
            panic!("a subnet in another zone than the placement's is refused");
        };
        assert_eq!(
            err.message,
            format!("Value (karri-1a) for parameter availabilityZone is invalid. Subnet '{b}' is in the availability zone karri-1b")
        );
    }

    #[test]
    fn a_forced_stop_is_marked_and_any_other_stop_or_start_clears_the_mark() {
        let mark = |v: &Value| {
            v.pointer("/metadata/annotations")
                .and_then(|a| a.get(crds::FORCE_STOP_ANNOTATION))
                .cloned()
        };
        let mut v = json!({"metadata": {"name": "i-1", "annotations": {"team": "ops"}}});
        mark_force_stop(&mut v, Change::Stop, true, "2026-11-26T05:00:00Z");
        assert_eq!(mark(&v), Some(json!("2026-11-26T05:00:00Z")));
        mark_force_stop(&mut v, Change::Terminate, false, "later");
        assert!(
            mark(&v).is_some(),
            "a terminate leaves it (the record goes anyway)"
        );
        mark_force_stop(&mut v, Change::Start, false, "later");
        assert_eq!(mark(&v), None);
        assert_eq!(v["metadata"]["annotations"]["team"], "ops");
        mark_force_stop(&mut v, Change::Stop, true, "again");
        mark_force_stop(&mut v, Change::Stop, false, "later");
        assert_eq!(
            mark(&v),
            None,
            "a plain stop after a forced one is not forced"
        );
        let mut bare = json!({"metadata": {"name": "i-2"}});
        mark_force_stop(&mut bare, Change::Start, false, "now");
        assert_eq!(bare, json!({"metadata": {"name": "i-2"}}));
    }

    #[test]
    fn state_changes_are_refused_where_ec2_refuses_them() {
        let refused = |change, v: &Value| check_change(change, v).err().map(|e| e.code.clone());
        let rows = [
            (Change::Stop, record("running", "running", false), None),
            (Change::Start, record("stopped", "stopped", false), None),
            (
                Change::Start,
                record("stopped", "stopping", false),
                Some("IncorrectInstanceState"),
            ),
            (
                Change::Start,
                record("stopped", "running", false),
                Some("IncorrectInstanceState"),
            ),
            (
                Change::Start,
                record("stopped", "pending", false),
                Some("IncorrectInstanceState"),
            ),
            (Change::Start, record("running", "stopped", false), None),
            (Change::Start, record("running", "running", false), None),
            (Change::Stop, record("stopped", "running", false), None),
            (Change::Stop, record("stopped", "stopping", false), None),
            (
                Change::Stop,
                record("terminated", "shutting-down", false),
                Some("IncorrectInstanceState"),
            ),
            (
                Change::Start,
                record("terminated", "terminated", false),
                Some("IncorrectInstanceState"),
            ),
            (
                Change::Terminate,
                record("running", "running", true),
                Some("OperationNotPermitted"),
            ),
            (Change::Terminate, record("running", "running", false), None),
            // On its first way up (no launch time yet) it cannot be stopped; started again
            // after a stop, it can.
            (
                Change::Stop,
                record("running", "pending", false),
                Some("IncorrectInstanceState"),
            ),
            (
                Change::Stop,
                {
                    let mut v = record("running", "pending", false);
                    v["status"]["launchTime"] = json!("2026-11-26T10:00:00Z");
                    v
                },
                None,
            ),
            (Change::Terminate, record("running", "pending", false), None),
        ];
        for (change, v, want) in rows {
            assert_eq!(
                refused(change, &v).as_deref(),
                want,
                "{change:?} of {}",
                v["status"]["state"]
            );
        }
    }

    const OWNER: &str = "123456789012";
    const REGION: &str = "karri-1";

    /// An instance with every field DescribeInstances shows filled in.
    fn full_instance() -> Value {
        json!({
            "metadata": {
                "name": "i-0abc",
                "labels": {crds::ID_LABEL: "i-0abc"},
                "creationTimestamp": "2026-01-02T03:04:05Z",
            },
            "spec": {
                "imageId": "emi-1",
                "instanceType": "m1.small",
                "keyName": "deploy",
                "kernelId": "eki-2",
                "ramdiskId": "eri-3",
                "clientToken": "token-1",
                "availabilityZone": "karri-1a",
                "reservationId": "r-9",
                "launchIndex": 2,
                "desiredState": "stopped",
                "securityGroupIds": ["sg-1", "sg-2"],
                "tags": [{"key": "Name", "value": "web-*1"}, {"key": "team", "value": "ops"}],
                "metadataOptions": {
                    "httpTokens": "required",
                    "httpPutResponseHopLimit": 2,
                    "httpEndpoint": "enabled",
                },
            },
            "status": {
                "state": "stopped",
                "privateIpAddress": "10.0.0.5",
                "publicIpAddress": "198.51.100.7",
                "message": "Client.UserInitiatedShutdown: User initiated shutdown",
                "reason": "Client.UserInitiatedShutdown",
                "launchTime": "2026-01-02T03:05:06.789Z",
                "stateTransitionTime": "2026-01-02T04:00:00Z",
                "availabilityZone": "karri-1a",
            },
        })
    }

    /// A pending instance that has nothing but what RunInstances must give.
    fn bare_instance() -> Value {
        json!({
            "metadata": {"name": "i-0def", "labels": {crds::ID_LABEL: "i-0def"}},
            "spec": {"imageId": "emi-1", "instanceType": "t1.micro"},
        })
    }

    fn instance_table() -> Table<'static> {
        Table {
            accepted: filter::INSTANCE_FILTERS,
            taggable: true,
            item: "reservationSet/item",
            rows: &[
                ("architecture", "instancesSet/item/architecture"),
                (
                    "availability-zone",
                    "instancesSet/item/placement/availabilityZone",
                ),
                (
                    "block-device-mapping.attach-time",
                    "instancesSet/item/blockDeviceMapping/item/ebs/attachTime",
                ),
                (
                    "block-device-mapping.delete-on-termination",
                    "instancesSet/item/blockDeviceMapping/item/ebs/deleteOnTermination",
                ),
                (
                    "block-device-mapping.device-name",
                    "instancesSet/item/blockDeviceMapping/item/deviceName",
                ),
                (
                    "block-device-mapping.status",
                    "instancesSet/item/blockDeviceMapping/item/ebs/status",
                ),
                (
                    "block-device-mapping.volume-id",
                    "instancesSet/item/blockDeviceMapping/item/ebs/volumeId",
                ),
                ("client-token", "instancesSet/item/clientToken"),
                ("dns-name", "instancesSet/item/dnsName"),
                ("ebs-optimized", "instancesSet/item/ebsOptimized"),
                ("group-id", "instancesSet/item/groupSet/item/groupId"),
                ("group-name", "instancesSet/item/groupSet/item/groupName"),
                ("hypervisor", "instancesSet/item/hypervisor"),
                ("image-id", "instancesSet/item/imageId"),
                ("instance-id", "instancesSet/item/instanceId"),
                (
                    "instance-state-code",
                    "instancesSet/item/instanceState/code",
                ),
                (
                    "instance-state-name",
                    "instancesSet/item/instanceState/name",
                ),
                ("instance-type", "instancesSet/item/instanceType"),
                (
                    "instance.group-id",
                    "instancesSet/item/groupSet/item/groupId",
                ),
                (
                    "instance.group-name",
                    "instancesSet/item/groupSet/item/groupName",
                ),
                ("ip-address", "instancesSet/item/ipAddress"),
                ("kernel-id", "instancesSet/item/kernelId"),
                ("key-name", "instancesSet/item/keyName"),
                ("launch-index", "instancesSet/item/amiLaunchIndex"),
                ("launch-time", "instancesSet/item/launchTime"),
                (
                    "metadata-options.http-endpoint",
                    "instancesSet/item/metadataOptions/httpEndpoint",
                ),
                (
                    "metadata-options.http-put-response-hop-limit",
                    "instancesSet/item/metadataOptions/httpPutResponseHopLimit",
                ),
                (
                    "metadata-options.instance-metadata-tags",
                    "instancesSet/item/metadataOptions/instanceMetadataTags",
                ),
                (
                    "metadata-options.http-tokens",
                    "instancesSet/item/metadataOptions/httpTokens",
                ),
                (
                    "metadata-options.state",
                    "instancesSet/item/metadataOptions/state",
                ),
                ("monitoring-state", "instancesSet/item/monitoring/state"),
                (
                    "network-interface.addresses.private-ip-address",
                    "instancesSet/item/networkInterfaceSet/item/privateIpAddressesSet/item/privateIpAddress",
                ),
                (
                    "network-interface.addresses.private-dns-name",
                    "instancesSet/item/networkInterfaceSet/item/privateIpAddressesSet/item/privateDnsName",
                ),
                (
                    "network-interface.addresses.primary",
                    "instancesSet/item/networkInterfaceSet/item/privateIpAddressesSet/item/primary",
                ),
                (
                    "network-interface.addresses.association.ip-owner-id",
                    "instancesSet/item/networkInterfaceSet/item/privateIpAddressesSet/item/association/ipOwnerId",
                ),
                (
                    "network-interface.addresses.association.public-ip",
                    "instancesSet/item/networkInterfaceSet/item/privateIpAddressesSet/item/association/publicIp",
                ),
                (
                    "network-interface.association.ip-owner-id",
                    "instancesSet/item/networkInterfaceSet/item/association/ipOwnerId",
                ),
                (
                    "network-interface.association.public-ip",
                    "instancesSet/item/networkInterfaceSet/item/association/publicIp",
                ),
                (
                    "network-interface.description",
                    "instancesSet/item/networkInterfaceSet/item/description",
                ),
                (
                    "network-interface.attachment.attach-time",
                    "instancesSet/item/networkInterfaceSet/item/attachment/attachTime",
                ),
                (
                    "network-interface.attachment.attachment-id",
                    "instancesSet/item/networkInterfaceSet/item/attachment/attachmentId",
                ),
                (
                    "network-interface.attachment.delete-on-termination",
                    "instancesSet/item/networkInterfaceSet/item/attachment/deleteOnTermination",
                ),
                (
                    "network-interface.attachment.device-index",
                    "instancesSet/item/networkInterfaceSet/item/attachment/deviceIndex",
                ),
                (
                    "network-interface.attachment.network-card-index",
                    "instancesSet/item/networkInterfaceSet/item/attachment/networkCardIndex",
                ),
                (
                    "network-interface.attachment.status",
                    "instancesSet/item/networkInterfaceSet/item/attachment/status",
                ),
                (
                    "network-interface.group-id",
                    "instancesSet/item/networkInterfaceSet/item/groupSet/item/groupId",
                ),
                (
                    "network-interface.group-name",
                    "instancesSet/item/networkInterfaceSet/item/groupSet/item/groupName",
                ),
                (
                    "network-interface.ipv6-addresses.ipv6-address",
                    "instancesSet/item/networkInterfaceSet/item/ipv6AddressesSet/item/ipv6Address",
                ),
                (
                    "network-interface.mac-address",
                    "instancesSet/item/networkInterfaceSet/item/macAddress",
                ),
                (
                    "network-interface.network-interface-id",
                    "instancesSet/item/networkInterfaceSet/item/networkInterfaceId",
                ),
                (
                    "network-interface.private-dns-name",
                    "instancesSet/item/networkInterfaceSet/item/privateDnsName",
                ),
                (
                    "network-interface.source-dest-check",
                    "instancesSet/item/networkInterfaceSet/item/sourceDestCheck",
                ),
                (
                    "network-interface.status",
                    "instancesSet/item/networkInterfaceSet/item/status",
                ),
                (
                    "network-interface.subnet-id",
                    "instancesSet/item/networkInterfaceSet/item/subnetId",
                ),
                (
                    "network-interface.vpc-id",
                    "instancesSet/item/networkInterfaceSet/item/vpcId",
                ),
                ("platform", "instancesSet/item/platform"),
                ("platform-details", "instancesSet/item/platformDetails"),
                ("instance-lifecycle", "instancesSet/item/instanceLifecycle"),
                ("usage-operation", "instancesSet/item/usageOperation"),
                ("owner-id", "ownerId"),
                (
                    "placement-group-name",
                    "instancesSet/item/placement/groupName",
                ),
                ("private-dns-name", "instancesSet/item/privateDnsName"),
                ("private-ip-address", "instancesSet/item/privateIpAddress"),
                (
                    "product-code",
                    "instancesSet/item/productCodes/item/productCode",
                ),
                (
                    "product-code.type",
                    "instancesSet/item/productCodes/item/type",
                ),
                ("ramdisk-id", "instancesSet/item/ramdiskId"),
                ("reason", "instancesSet/item/reason"),
                ("reservation-id", "reservationId"),
                ("root-device-name", "instancesSet/item/rootDeviceName"),
                ("root-device-type", "instancesSet/item/rootDeviceType"),
                ("source-dest-check", "instancesSet/item/sourceDestCheck"),
                ("state-reason-code", "instancesSet/item/stateReason/code"),
                (
                    "state-reason-message",
                    "instancesSet/item/stateReason/message",
                ),
                ("subnet-id", "instancesSet/item/subnetId"),
                ("tenancy", "instancesSet/item/placement/tenancy"),
                (
                    "virtualization-type",
                    "instancesSet/item/virtualizationType",
                ),
                ("vpc-id", "instancesSet/item/vpcId"),
                ("tag-key", "instancesSet/item/tagSet/item/key"),
                ("tag-value", "instancesSet/item/tagSet/item/value"),
            ],
            none: &[
                "block-device-mapping.attach-time",
                "block-device-mapping.delete-on-termination",
                "block-device-mapping.device-name",
                "block-device-mapping.status",
                "block-device-mapping.volume-id",
                "dns-name",
                "instance-lifecycle",
                "network-interface.addresses.association.ip-owner-id",
                "network-interface.addresses.association.public-ip",
                "network-interface.association.ip-owner-id",
                "network-interface.association.public-ip",
                "network-interface.description",
                "network-interface.ipv6-addresses.ipv6-address",
                "placement-group-name",
                "platform",
                "product-code",
                "product-code.type",
            ],
        }
    }

    /// The DescribeInstances response for one instance.
    fn described(v: &InstanceView<'_>) -> String {
        let mut w = Response::new("DescribeInstancesResponse", "req-1");
        w.open("reservationSet");
        w.item();
        write_reservation_body(&mut w, &v.reservation(), [v], OWNER, |w, v| {
            write_instance(w, v, REGION)
        });
        w.finish()
    }

    #[test]
    fn every_instance_filter_matches_what_describe_instances_shows() {
        let record = full_instance();
        let v = InstanceView::of(&record);
        check(&instance_table(), &described(&v), |name| {
            instance_values(&v, name, OWNER, REGION)
        });
    }

    #[test]
    fn an_instance_without_optional_fields_matches_on_none_of_them() {
        let record = bare_instance();
        let v = InstanceView::of(&record);
        check_values(&instance_table(), &described(&v), |name| {
            instance_values(&v, name, OWNER, REGION)
        });
        for name in [
            "key-name",
            "ip-address",
            "private-dns-name",
            "reason",
            "subnet-id",
        ] {
            assert!(
                instance_values(&v, name, OWNER, REGION).is_empty(),
                "{name}"
            );
        }
    }

    #[test]
    fn an_instances_xml_is_written_once_per_version_of_its_record() {
        let record = CachedObject::from_value("k".into(), full_instance(), 7);
        let view = InstanceView::of(&record.value);
        let first = rendered(&record, REGION);
        assert_eq!(
            (first.sort_key.clone(), first.group.clone()),
            sort_key(&view)
        );
        // The second DescribeInstances copies the first one's bytes.
        assert!(std::ptr::eq(first, rendered(&record, REGION)));
        // Put into a document, they read as the item written in place.
        let document = |write: &dyn Fn(&mut Response)| {
            let mut w = Response::new("DescribeInstancesResponse", "req-1");
            w.open("reservationSet");
            write(&mut w);
            w.finish()
        };
        let copied = document(&|w| write_reservations(w, &[(first.group.clone(), first)], OWNER));
        let fresh = document(&|w| {
            w.item();
            write_reservation_body(w, &first.group, [&view], OWNER, |w, v| {
                write_instance(w, v, REGION)
            });
            w.close();
        });
        assert_eq!(copied, fresh);
    }

    #[test]
    fn the_interface_stays_attached_since_the_record_was_made_when_a_start_moves_the_launch_time() {
        let record = full_instance();
        let xml = described(&InstanceView::of(&record));
        assert!(
            xml.contains("<launchTime>2026-01-02T03:05:06.789Z</launchTime>"),
            "{xml}"
        );
        assert!(
            xml.contains("<attachTime>2026-01-02T03:04:05.000Z</attachTime>"),
            "{xml}"
        );
    }

    #[test]
    fn a_stop_by_its_owner_reads_user_initiated_with_its_time_as_ec2_writes_it() {
        let record = full_instance();
        let xml = described(&InstanceView::of(&record));
        assert!(
            xml.contains("<reason>User initiated (2026-01-02 04:00:00 GMT)</reason>"),
            "{xml}"
        );
        assert!(
            xml.contains("<stateReason><code>Client.UserInitiatedShutdown</code><message>Client.UserInitiatedShutdown: User initiated shutdown</message></stateReason>"),
            "{xml}"
        );
        // Any other reason shows its message in both.
        let mut failed = record.clone();
        failed["status"]["reason"] = json!("Server.InternalError");
        failed["status"]["message"] = json!("Server.InternalError: no image");
        let xml = described(&InstanceView::of(&failed));
        assert!(
            xml.contains("<reason>Server.InternalError: no image</reason>"),
            "{xml}"
        );
    }

    #[test]
    fn an_instance_whose_record_is_being_deleted_shows_as_shutting_down() {
        let record = |deleting: bool, state: &str| {
            let mut v = json!({"metadata": {"name": "i-0abc"},
                "spec": {"desiredState": "running"}, "status": {"state": state}});
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            v
        };
        use crds::InstanceState as S;
        for (deleting, state, want) in [
            (false, "running", S::Running),
            (true, "running", S::ShuttingDown),
            (true, "terminated", S::Terminated),
        ] {
            let v = record(deleting, state);
            // As every action reads it, and as DescribeInstances' view of it does.
            assert_eq!(shown_state(&v), want, "{v}");
            assert_eq!(InstanceView::of(&v).shown_state(), want, "{v}");
        }
    }

    fn status_record(ready: &str, node_healthy: &str) -> Value {
        json!({
            "metadata": {"labels": {crds::ID_LABEL: "i-0abc"}},
            "spec": {"desiredState": "running", "availabilityZone": "karri-1a"},
            "status": {
                "state": "running",
                "availabilityZone": "karri-1b",
                "conditions": [
                    {"type": "Ready", "status": ready},
                    {"type": "NodeHealthy", "status": node_healthy},
                ],
            },
        })
    }

    #[test]
    fn a_paused_domain_impairs_its_running_instance_status() {
        let rows = [
            ("True", "True", "Running", ("ok", "ok")),
            ("False", "True", "Running", ("initializing", "ok")),
            ("True", "False", "Running", ("impaired", "impaired")),
            (
                "True",
                "True",
                crds::REASON_DOMAIN_PAUSED,
                ("impaired", "ok"),
            ),
            (
                "False",
                "True",
                crds::REASON_DOMAIN_PAUSED,
                ("impaired", "ok"),
            ),
        ];
        for (ready, node_healthy, domain, want) in rows {
            let mut v = status_record(ready, node_healthy);
            v["status"]["conditions"]
                .as_array_mut()
                .expect("conditions")
                .push(json!({"type": "DomainRunning", "status": "True", "reason": domain}));
            assert_eq!(health(&v), want, "{ready} {node_healthy} {domain}");
        }
        let mut stopped = status_record("False", "True");
        stopped["status"]["state"] = json!("stopped");
        stopped["status"]["conditions"]
            .as_array_mut()
            .expect("conditions")
            .push(json!({"type": "DomainRunning", "status": "True", "reason": "Paused"}));
        assert_eq!(health(&stopped), ("not-applicable", "not-applicable"));
        // On a node that is down too: no check runs on a stopped instance.
        let mut stopped_on_a_down_node = stopped.clone();
        stopped_on_a_down_node["status"]["conditions"][1]["status"] = json!("False");
        assert_eq!(
            health(&stopped_on_a_down_node),
            ("not-applicable", "not-applicable")
        );
    }

    #[test]
    fn every_instance_status_filter_matches_what_describe_instance_status_shows() {
        let table = Table {
            accepted: filter::INSTANCE_STATUS_FILTERS,
            taggable: false,
            item: "instanceStatusSet/item",
            rows: &[
                ("availability-zone", "availabilityZone"),
                ("event.code", "eventsSet/item/code"),
                ("event.description", "eventsSet/item/description"),
                ("event.instance-event-id", "eventsSet/item/instanceEventId"),
                ("event.not-after", "eventsSet/item/notAfter"),
                ("event.not-before", "eventsSet/item/notBefore"),
                (
                    "event.not-before-deadline",
                    "eventsSet/item/notBeforeDeadline",
                ),
                ("instance-state-code", "instanceState/code"),
                ("instance-state-name", "instanceState/name"),
                (
                    "instance-status.reachability",
                    "instanceStatus/details/item/status",
                ),
                ("instance-status.status", "instanceStatus/status"),
                (
                    "system-status.reachability",
                    "systemStatus/details/item/status",
                ),
                ("system-status.status", "systemStatus/status"),
            ],
            none: &[
                "event.code",
                "event.description",
                "event.instance-event-id",
                "event.not-after",
                "event.not-before",
                "event.not-before-deadline",
            ],
        };
        for (ready, node_healthy) in [("True", "True"), ("False", "True"), ("True", "False")] {
            let v = status_record(ready, node_healthy);
            let mut w = Response::new("DescribeInstanceStatusResponse", "req-1");
            w.set("instanceStatusSet", [&v], write_instance_status);
            check(&table, &w.finish(), |name| instance_status_values(&v, name));
        }
        // A stopped instance shows no reachability check: its filters match nothing.
        let mut stopped = status_record("False", "True");
        stopped["status"]["state"] = json!("stopped");
        let mut w = Response::new("DescribeInstanceStatusResponse", "req-1");
        w.set("instanceStatusSet", [&stopped], write_instance_status);
        let xml = w.finish();
        assert!(!xml.contains("<details>"), "{xml}");
        check_values(&table, &xml, |name| instance_status_values(&stopped, name));
    }
}
