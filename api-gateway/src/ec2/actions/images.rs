//! Image actions: DescribeImages, RegisterImage, DeregisterImage, DescribeImageAttribute and
//! ModifyImageAttribute. An image lives in its owner's namespace; other accounts see it when it
//! is public or lists them in its launch permissions.

use std::borrow::Cow;

use serde_json::{json, Value};

use super::{
    created, from_api, id_of, namespace, opt, tag_values, text, write_tag_set, Cx, BOOT_MODE,
    HYPERVISOR, ROOT_DEVICE_TYPE, VIRTUALIZATION_TYPE,
};
use crate::admission::Subresource;
use crate::ec2::error::Ec2Error;
use crate::ec2::filter::{self, Filter, Matcher};
use crate::ec2::router::{self, WireEnum as _};
use crate::ec2::xml::time_text;
use crate::registry::{DeleteOptions, WriteOptions};

/// Whether the caller may launch (and so see) an image.
pub(super) fn visible(cx: &Cx<'_>, v: &Value) -> bool {
    namespace(v) == cx.caller.namespace || is_public(v) || shared_with(v, &cx.caller.account_id)
}

fn is_public(v: &Value) -> bool {
    v.pointer("/spec/public").and_then(Value::as_bool) == Some(true)
}

fn shared_with(v: &Value, account_id: &str) -> bool {
    v.pointer("/spec/launchPermissions")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(account_id)))
}

/// The same image under its `emi-` or `ami-` spelling (a kernel's `eki-` or a ramdisk's `eri-`
/// ID has no `ami-` spelling).
pub fn same_image(stored: &str, asked: &str) -> bool {
    stored == asked
        || matches!(
            (stored.strip_prefix("emi-"), asked.strip_prefix("ami-")),
            (Some(a), Some(b)) if a == b
        )
}

/// `filters` with every `ami-` value of the filters named in `names` also spelled `emi-`, so
/// that a filter on an image ID takes the `ami-` alias as every image action does (`ami-*`
/// then matches the `emi-` images too). The values a resource shows stay its stored IDs.
pub fn with_emi_spellings(filters: &[Filter], names: &[&str]) -> Vec<Filter> {
    filters
        .iter()
        .map(|f| {
            let mut f = f.clone();
            if names.contains(&f.name.as_str()) {
                let emi: Vec<String> = f
                    .values
                    .iter()
                    .filter_map(|v| v.strip_prefix("ami-").map(|rest| format!("emi-{rest}")))
                    .collect();
                f.values.extend(emi);
            }
            f
        })
        .collect()
}

/// The account ID Karri shows as the owner of the administrators' public images, which live in
/// a system namespace (`karri-images`) of no account; no account may have it.
pub const SYSTEM_OWNER_ID: &str = crds::SYSTEM_ACCOUNT_ID;

/// The owner alias of the administrators' images: the cloud's own images answer to
/// `Owner=amazon` and the `owner-alias` filter, as the provider's own AMIs do on EC2.
pub const SYSTEM_OWNER_ALIAS: &str = "amazon";

/// Whether an image is one of the administrators' (in a system namespace, of no account).
fn is_system_image(v: &Value) -> bool {
    crate::admission::is_system_namespace(namespace(v))
}

/// Find an image by ID, accepting the `ami-` alias of an `emi-` ID.
pub(super) async fn find_image(cx: &Cx<'_>, id: &str) -> Result<Option<Value>, Ec2Error> {
    let mut found = cx.registry.lookup_id(id).await.map_err(from_api)?;
    if found.is_none() {
        if let Some(hex) = id.strip_prefix("ami-") {
            found = cx
                .registry
                .lookup_id(&format!("emi-{hex}"))
                .await
                .map_err(from_api)?;
        }
    }
    Ok(found.filter(|v| super::is_kind(v, "images")))
}

/// The image an instance may boot: existing, visible to the caller and not failed.
pub async fn launchable_image(cx: &Cx<'_>, id: &str) -> Result<Value, Ec2Error> {
    let image = find_image(cx, id)
        .await?
        .filter(|v| visible(cx, v))
        .ok_or_else(|| Ec2Error::image_not_found(&[id]))?;
    if state(&image) == "failed" {
        return Err(Ec2Error::new(
            "InvalidAMIID.Unavailable",
            400,
            format!(
                "The image '{id}' is not available: {}",
                text(&image, "/status/message")
            ),
        ));
    }
    Ok(image)
}

/// [`launchable_image`] that is a machine image: a kernel or ramdisk image boots nothing by
/// itself (RunInstances names a machine image, which names them).
pub async fn launchable_machine_image(cx: &Cx<'_>, id: &str) -> Result<Value, Ec2Error> {
    let image = launchable_image(cx, id).await?;
    let kind = image_type(&image);
    if kind != "machine" {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "The image '{id}' is a {kind} image; RunInstances needs a machine image (emi- or ami-), whose kernel and ramdisk it names"
        )));
    }
    Ok(image)
}

/// An image the caller owns, for changes; another account's visible image is refused.
async fn owned_image(cx: &Cx<'_>, id: &str) -> Result<Value, Ec2Error> {
    let image = find_image(cx, id)
        .await?
        .filter(|v| visible(cx, v))
        .ok_or_else(|| Ec2Error::image_not_found(&[id]))?;
    if namespace(&image) != cx.caller.namespace {
        return Err(Ec2Error::new(
            "AuthFailure",
            400,
            format!("Not authorized for image:{id}"),
        ));
    }
    Ok(image)
}

/// The state EC2 shows: what the image controller reported, `available` until it reports.
fn state(v: &Value) -> &str {
    opt(v, "/status/state").unwrap_or("available")
}

fn image_type(v: &Value) -> &'static str {
    v.pointer("/spec/imageType")
        .cloned()
        .and_then(|t| serde_json::from_value::<crds::ImageType>(t).ok())
        .or_else(|| crds::ImageType::of_id(id_of(v)))
        .unwrap_or_default()
        .as_str()
}

/// What every image of Karri shows: a Linux instance-store image (so no `platform`, which EC2
/// shows for Windows images alone, and no block devices).
pub(super) const PLATFORM_DETAILS: &str = "Linux/UNIX";
pub(super) const USAGE_OPERATION: &str = "RunInstances";
/// The state reason code of an image the image controller failed.
const IMAGE_FAILURE: &str = "Client.ImageFailure";

/// The values a DescribeImages filter sees on an image: what [`write_image`] shows. Tags are the
/// owner's alone: another account's view of a shared or public image has none (EC2 does not
/// share an AMI's tags).
fn image_values<'v>(v: &'v Value, name: &str, owner: &'v str, own: bool) -> Vec<Cow<'v, str>> {
    if let Some(tags) = tag_values(v, name) {
        return if own { tags } else { Vec::new() };
    }
    match name {
        "image-id" => filter::shown(id_of(v)),
        "name" => filter::shown(text(v, "/spec/name")),
        "description" => filter::shown_opt(opt(v, "/spec/description")),
        "state" => filter::shown(state(v)),
        "owner-id" => filter::shown(owner),
        "owner-alias" => filter::shown_opt(is_system_image(v).then_some(SYSTEM_OWNER_ALIAS)),
        "is-public" => filter::shown_bool(is_public(v)),
        "architecture" => filter::shown(text(v, "/spec/architecture")),
        "image-type" => filter::shown(image_type(v)),
        "kernel-id" => filter::shown_opt(opt(v, "/spec/kernelId")),
        "ramdisk-id" => filter::shown_opt(opt(v, "/spec/ramdiskId")),
        "manifest-location" => vec![shown_location(v, owner)],
        "root-device-name" => filter::shown(text(v, "/spec/rootDeviceName")),
        "root-device-type" => filter::shown(ROOT_DEVICE_TYPE),
        "virtualization-type" => filter::shown(VIRTUALIZATION_TYPE),
        "hypervisor" => filter::shown(HYPERVISOR),
        "boot-mode" => filter::shown(BOOT_MODE),
        "platform-details" => filter::shown(PLATFORM_DETAILS),
        "usage-operation" => filter::shown(USAGE_OPERATION),
        // As `creationDate` shows it, so that `2026-*` matches.
        "creation-date" => filter::shown_owned(time_text(created(v))),
        "state-reason-code" => match opt(v, "/status/message") {
            Some(_) => filter::shown(IMAGE_FAILURE),
            None => Vec::new(),
        },
        "state-reason-message" => filter::shown_opt(opt(v, "/status/message")),
        // The response shows no platform (a Linux image) and an empty `blockDeviceMapping`
        // (an instance-store image): these match nothing.
        "platform"
        | "block-device-mapping.delete-on-termination"
        | "block-device-mapping.device-name"
        | "block-device-mapping.encrypted"
        | "block-device-mapping.snapshot-id"
        | "block-device-mapping.volume-size"
        | "block-device-mapping.volume-type" => Vec::new(),
        _ => Vec::new(),
    }
}

/// The `imageLocation` EC2 shows: an image's `bucket/key` in S3; for an image kept elsewhere
/// (the administrators' images on the nodes' disks), `<owner alias or ID>/<name>` as EC2 shows
/// an image not in S3 (`amazon/<name>`), never a path on the hosts. Pure.
fn shown_location<'v>(v: &'v Value, owner: &str) -> Cow<'v, str> {
    let location = text(v, "/spec/imageLocation");
    if crds::image::s3_location(location).is_some() {
        return Cow::Borrowed(location);
    }
    let by = if is_system_image(v) {
        SYSTEM_OWNER_ALIAS
    } else {
        owner
    };
    Cow::Owned(format!("{by}/{}", text(v, "/spec/name")))
}

fn write_image(w: &mut crate::ec2::xml::Response, v: &Value, owner: &str, own: bool) {
    w.item();
    w.leaf("imageId", id_of(v))
        .leaf("imageLocation", &shown_location(v, owner))
        .leaf("imageState", state(v))
        .leaf("imageOwnerId", owner)
        .leaf_opt(
            "imageOwnerAlias",
            is_system_image(v).then_some(SYSTEM_OWNER_ALIAS),
        )
        .leaf_time("creationDate", created(v))
        .leaf_bool("isPublic", is_public(v))
        .leaf("architecture", text(v, "/spec/architecture"))
        .leaf("imageType", image_type(v))
        .leaf_opt("kernelId", opt(v, "/spec/kernelId"))
        .leaf_opt("ramdiskId", opt(v, "/spec/ramdiskId"))
        .leaf("name", text(v, "/spec/name"))
        .leaf_opt("description", opt(v, "/spec/description"))
        .leaf("rootDeviceType", ROOT_DEVICE_TYPE)
        .leaf("rootDeviceName", text(v, "/spec/rootDeviceName"))
        .empty("blockDeviceMapping")
        .leaf("virtualizationType", VIRTUALIZATION_TYPE)
        .leaf("hypervisor", HYPERVISOR)
        .leaf("platformDetails", PLATFORM_DETAILS)
        .leaf("usageOperation", USAGE_OPERATION)
        .leaf("bootMode", BOOT_MODE);
    if let Some(reason) = opt(v, "/status/message") {
        w.element("stateReason", |w| {
            w.leaf("code", IMAGE_FAILURE).leaf("message", reason);
        });
    }
    if own {
        write_tag_set(w, v);
    } else {
        w.empty("tagSet");
    }
    w.close();
}

/// DescribeImages.
pub async fn describe_images(cx: &Cx<'_>, a: router::DescribeImages) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::IMAGE_FILTERS, true)?;
    let all = cx.everywhere("images").await?;
    let mut owners = std::collections::HashMap::new();
    for o in &all {
        let ns = namespace(&o.value).to_string();
        if let std::collections::hash_map::Entry::Vacant(slot) = owners.entry(ns) {
            // The same test as the alias's (`is_system_image`): a system namespace is no
            // account's.
            let id = if crate::admission::is_system_namespace(slot.key()) {
                SYSTEM_OWNER_ID.to_string()
            } else {
                cx.owner_of(slot.key()).await
            };
            slot.insert(id);
        }
    }
    let owner_of = |v: &Value| owners.get(namespace(v)).cloned().unwrap_or_default();
    let visible_images: Vec<&Value> = all
        .iter()
        .map(|o| &o.value)
        .filter(|v| visible(cx, v))
        .collect();
    let mut missing = Vec::new();
    for id in &a.image_ids {
        if !visible_images.iter().any(|v| same_image(id_of(v), id)) {
            missing.push(id.as_str());
        }
    }
    if !missing.is_empty() {
        return Err(Ec2Error::image_not_found(&missing));
    }
    let me = cx.caller.account_id.as_str();
    let matcher = Matcher::new(&with_emi_spellings(&a.filters, &["image-id"]));
    let mut shown: Vec<(&Value, String)> = visible_images
        .into_iter()
        .filter(|v| a.image_ids.is_empty() || a.image_ids.iter().any(|id| same_image(id_of(v), id)))
        .map(|v| (v, owner_of(v)))
        .filter(|(v, owner)| {
            a.owners.is_empty()
                || a.owners.iter().any(|o| match o.as_str() {
                    "self" => namespace(v) == cx.caller.namespace,
                    SYSTEM_OWNER_ALIAS => is_system_image(v),
                    other => other == owner,
                })
        })
        .filter(|(v, owner)| {
            let own = namespace(v) == cx.caller.namespace;
            // ExecutableBy scopes by explicit launch permissions (EC2's API reference): `self`
            // is the images others shared with the caller's account, not its own (implicit)
            // nor public ones (`all`).
            let shared_with_me = !own && owner != me && shared_with(v, me);
            a.executable_by.is_empty()
                || a.executable_by.iter().any(|e| match e.as_str() {
                    "all" => is_public(v),
                    "self" => shared_with_me,
                    account if account == me => shared_with_me,
                    // Only the caller's own images shared with that account: whom others
                    // share their images with is theirs to know.
                    account => own && shared_with(v, account),
                })
        })
        .filter(|(v, owner)| {
            let own = namespace(v) == cx.caller.namespace;
            matcher.matches(|name| image_values(v, name, owner, own))
        })
        .collect();
    shown.sort_by_key(|(v, _)| id_of(v).to_string());
    let (page, token) = super::paginate(
        "DescribeImages",
        shown
            .into_iter()
            .map(|(v, o)| (id_of(v).to_string(), (v, o)))
            .collect(),
        a.next_token.as_deref(),
        a.max_results.map(|m| m as usize),
    )?;
    let mut w = cx.response("DescribeImages");
    w.open("imagesSet");
    for (v, owner) in page {
        let own = namespace(v) == cx.caller.namespace;
        write_image(&mut w, v, &owner, own);
    }
    w.close();
    w.leaf_opt("nextToken", token.as_deref());
    Ok(w.finish())
}

/// RegisterImage: an instance-store image from a location (path, URL or bucket/key).
pub async fn register_image(
    cx: &Cx<'_>,
    a: router::RegisterImage,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    let Some(location) = a.image_location.clone() else {
        return Err(Ec2Error::missing_parameter("ImageLocation"));
    };
    // Every EC2 caller is an account: its images are in S3 (see the registry's own check).
    let wanted = serde_json::json!({"spec": {"imageLocation": location}});
    if let Some(why) =
        crate::auth::image_location_refusal(&cx.caller.principal(), "Image", None, &wanted)
    {
        return Err(Ec2Error::invalid_parameter_value(format!(
            "Invalid ImageLocation: {why}."
        )));
    }
    if !a.block_device_mappings.is_empty() {
        return Err(Ec2Error::unsupported_operation(
            "EBS-backed images (BlockDeviceMapping) are not supported by Karri yet; register an ImageLocation.",
        ));
    }
    for (what, id) in [("kernel", &a.kernel_id), ("ramdisk", &a.ramdisk_id)] {
        if let Some(id) = id {
            if find_image(cx, id)
                .await?
                .filter(|v| visible(cx, v))
                .is_none()
            {
                return Err(Ec2Error::new(
                    format!(
                        "Invalid{}ID.NotFound",
                        if what == "kernel" { "AKI" } else { "ARI" }
                    ),
                    400,
                    format!("The {what} image '{id}' does not exist"),
                ));
            }
        }
    }
    let own = cx.own("images").await?;
    if let Some(holder) = own.iter().find(|o| text(&o.value, "/spec/name") == a.name) {
        return Err(Ec2Error::image_name_duplicate(
            &a.name,
            Some(super::id_of(&holder.value)),
        ));
    }
    let mut spec = json!({
        "name": a.name,
        "imageLocation": location,
        "architecture": a.architecture.clone().unwrap_or_else(|| "x86_64".into()),
    });
    for (field, value) in [
        ("description", &a.description),
        ("kernelId", &a.kernel_id),
        ("ramdiskId", &a.ramdisk_id),
        ("rootDeviceName", &a.root_device_name),
    ] {
        if let Some(value) = value {
            spec[field] = json!(value);
        }
    }
    // Only the image's own tags: the router refuses `snapshot` specifications.
    let tags: Vec<Value> = a
        .tag_specifications
        .iter()
        .filter(|s| s.resource_type == "image")
        .flat_map(|s| s.tags.iter())
        .map(|t| json!({"key": t.key, "value": t.value}))
        .collect();
    if !tags.is_empty() {
        spec["tags"] = Value::Array(tags);
    }
    let kind = cx.kind("images")?;
    let body = json!({
        "apiVersion": crds::API_VERSION,
        "kind": "Image",
        "metadata": {"name": crate::admission::new_id("emi")},
        "spec": spec,
    });
    let opts = WriteOptions {
        dry_run,
        ..WriteOptions::by(crate::ec2::FIELD_MANAGER)
    };
    let made = cx
        .registry
        .create(
            &kind,
            Some(&cx.caller.namespace),
            body,
            &cx.caller.principal(),
            opts,
        )
        .await
        .map_err(|e| {
            let location_cause = e.details.as_ref().and_then(|d| {
                d.causes
                    .iter()
                    .find(|(field, _)| field == "spec.imageLocation")
                    .map(|(_, why)| why.clone())
            });
            match location_cause {
                // No object there that the account may read: EC2's answer to a manifest it
                // cannot read.
                Some(why) if e.code == 422 => Ec2Error::new(
                    "InvalidManifest",
                    400,
                    format!("The image location {location} cannot be registered: {why}"),
                ),
                // A concurrent RegisterImage of the same name won.
                _ if e.code == 409 => Ec2Error::image_name_duplicate(&a.name, None),
                _ => from_api(e),
            }
        })?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let mut w = cx.response("RegisterImage");
    w.leaf("imageId", id_of(&made.object));
    Ok(w.finish())
}

/// DeregisterImage.
pub async fn deregister_image(
    cx: &Cx<'_>,
    a: router::DeregisterImage,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    let image = owned_image(cx, &a.image_id).await?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let kind = cx.kind("images")?;
    match cx
        .registry
        .delete(
            &kind,
            Some(&cx.caller.namespace),
            text(&image, "/metadata/name"),
            &cx.caller.principal(),
            &DeleteOptions::default(),
        )
        .await
    {
        Ok(_) => {}
        Err(e) if e.code == 404 => return Err(Ec2Error::image_not_found(&[&a.image_id])),
        Err(e) => return Err(from_api(e)),
    }
    let mut w = cx.response("DeregisterImage");
    w.leaf_bool("return", true);
    Ok(w.finish())
}

/// DescribeImageAttribute (owner only, as on EC2 for launch permissions).
pub async fn describe_image_attribute(
    cx: &Cx<'_>,
    a: router::DescribeImageAttribute,
) -> Result<String, Ec2Error> {
    let v = owned_image(cx, &a.image_id).await?;
    let mut w = cx.response("DescribeImageAttribute");
    w.leaf("imageId", id_of(&v));
    let value = |w: &mut crate::ec2::xml::Response, name: &'static str, value: Option<&str>| {
        w.element(name, |w| {
            if let Some(value) = value {
                w.leaf("value", value);
            }
        });
    };
    match a.attribute.as_str() {
        "description" => value(&mut w, "description", opt(&v, "/spec/description")),
        "kernel" => value(&mut w, "kernel", opt(&v, "/spec/kernelId")),
        "ramdisk" => value(&mut w, "ramdisk", opt(&v, "/spec/ramdiskId")),
        "launchPermission" => {
            let mut entries: Vec<(&str, String)> = Vec::new();
            if is_public(&v) {
                entries.push(("group", "all".into()));
            }
            for id in v
                .pointer("/spec/launchPermissions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                entries.push(("userId", id.to_string()));
            }
            w.set("launchPermission", entries, |w, (field, value)| {
                w.leaf(field, &value);
            });
        }
        "productCodes" => {
            w.empty("productCodes");
        }
        "blockDeviceMapping" => {
            w.empty("blockDeviceMapping");
        }
        "sriovNetSupport" => value(&mut w, "sriovNetSupport", None),
        "bootMode" => value(&mut w, "bootMode", Some(BOOT_MODE)),
        // Valid EC2 attributes Karri has no value for: answered empty, as EC2 answers an image
        // without them.
        "tpmSupport" => value(&mut w, "tpmSupport", None),
        "uefiData" => value(&mut w, "uefiData", None),
        "lastLaunchedTime" => value(&mut w, "lastLaunchedTime", None),
        "imdsSupport" => value(&mut w, "imdsSupport", None),
        "deregistrationProtection" => value(&mut w, "deregistrationProtection", Some("disabled")),
        other => {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "Value ({other}) for parameter attribute is invalid. Unknown attribute."
            )))
        }
    }
    Ok(w.finish())
}

/// ModifyImageAttribute: launch permissions (accounts and the `all` group) and description.
pub async fn modify_image_attribute(
    cx: &Cx<'_>,
    a: router::ModifyImageAttribute,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    use router::{ImageAttributeChange as C, LaunchPermission as P};
    let v = owned_image(cx, &a.image_id).await?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let kind = cx.kind("images")?;
    cx.registry
        .update_with(
            &kind,
            Some(&cx.caller.namespace),
            text(&v, "/metadata/name"),
            &cx.caller.principal(),
            Subresource::Main,
            None,
            WriteOptions::by(crate::ec2::FIELD_MANAGER),
            &mut |cur: &Value| {
                let mut next = cur.clone();
                match &a.change {
                    C::Description(d) => next["spec"]["description"] = json!(d),
                    C::LaunchPermission { add, remove } => {
                        let mut users: Vec<String> = cur
                            .pointer("/spec/launchPermissions")
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .map(String::from)
                                    .collect()
                            })
                            .unwrap_or_default();
                        let mut public = is_public(cur);
                        for p in add {
                            match p {
                                P::User(u) if !users.contains(u) => users.push(u.clone()),
                                P::User(_) => {}
                                P::AllUsers => public = true,
                            }
                        }
                        for p in remove {
                            match p {
                                P::User(u) => users.retain(|x| x != u),
                                P::AllUsers => public = false,
                            }
                        }
                        next["spec"]["launchPermissions"] = json!(users);
                        next["spec"]["public"] = json!(public);
                    }
                }
                Ok(next)
            },
        )
        .await
        .map_err(|e| {
            if e.code == 404 {
                Ec2Error::image_not_found(&[&a.image_id])
            } else {
                from_api(e)
            }
        })?;
    let mut w = cx.response("ModifyImageAttribute");
    w.leaf_bool("return", true);
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::filter::answered::{check, check_values, Table};
    use crate::ec2::xml::Response;

    const OWNER: &str = "123456789012";

    /// A failed public image of the administrators (so with an owner alias) with every field
    /// DescribeImages shows filled in.
    fn full_image() -> Value {
        json!({
            "kind": "Image",
            "metadata": {
                "name": "emi-0abc",
                "namespace": "karri-images",
                "labels": {crds::ID_LABEL: "emi-0abc"},
                "creationTimestamp": "2026-01-02T03:04:05Z",
            },
            "spec": {
                "name": "web-image",
                "description": "The web tier [v2]",
                "imageLocation": "images/web.img",
                "architecture": "x86_64",
                "kernelId": "eki-0abc",
                "ramdiskId": "eri-0abc",
                "rootDeviceName": "/dev/vda",
                "public": true,
                "tags": [{"key": "team", "value": "ops"}],
            },
            "status": {"state": "failed", "message": "The image is not a disk."},
        })
    }

    fn image_table() -> Table<'static> {
        Table {
            accepted: filter::IMAGE_FILTERS,
            taggable: true,
            item: "imagesSet/item",
            rows: &[
                ("architecture", "architecture"),
                (
                    "block-device-mapping.delete-on-termination",
                    "blockDeviceMapping/item/ebs/deleteOnTermination",
                ),
                (
                    "block-device-mapping.device-name",
                    "blockDeviceMapping/item/deviceName",
                ),
                (
                    "block-device-mapping.encrypted",
                    "blockDeviceMapping/item/ebs/encrypted",
                ),
                (
                    "block-device-mapping.snapshot-id",
                    "blockDeviceMapping/item/ebs/snapshotId",
                ),
                (
                    "block-device-mapping.volume-size",
                    "blockDeviceMapping/item/ebs/volumeSize",
                ),
                (
                    "block-device-mapping.volume-type",
                    "blockDeviceMapping/item/ebs/volumeType",
                ),
                ("boot-mode", "bootMode"),
                ("creation-date", "creationDate"),
                ("description", "description"),
                ("hypervisor", "hypervisor"),
                ("image-id", "imageId"),
                ("image-type", "imageType"),
                ("is-public", "isPublic"),
                ("kernel-id", "kernelId"),
                ("manifest-location", "imageLocation"),
                ("name", "name"),
                ("owner-alias", "imageOwnerAlias"),
                ("owner-id", "imageOwnerId"),
                ("platform", "platform"),
                ("platform-details", "platformDetails"),
                ("usage-operation", "usageOperation"),
                ("ramdisk-id", "ramdiskId"),
                ("root-device-name", "rootDeviceName"),
                ("root-device-type", "rootDeviceType"),
                ("state", "imageState"),
                ("state-reason-code", "stateReason/code"),
                ("state-reason-message", "stateReason/message"),
                ("virtualization-type", "virtualizationType"),
                ("tag-key", "tagSet/item/key"),
                ("tag-value", "tagSet/item/value"),
            ],
            none: &[
                "block-device-mapping.delete-on-termination",
                "block-device-mapping.device-name",
                "block-device-mapping.encrypted",
                "block-device-mapping.snapshot-id",
                "block-device-mapping.volume-size",
                "block-device-mapping.volume-type",
                "platform",
            ],
        }
    }

    fn described(v: &Value, own: bool) -> String {
        let mut w = Response::new("DescribeImagesResponse", "req-1");
        w.open("imagesSet");
        write_image(&mut w, v, OWNER, own);
        w.finish()
    }

    #[test]
    fn an_image_not_in_s3_shows_its_owner_and_name_never_a_host_path() {
        let image = |ns: &str, location: &str| {
            json!({"metadata": {"name": "emi-1", "namespace": ns},
                "spec": {"name": "karri-micro", "imageLocation": location}})
        };
        let rows = [
            (
                image("karri-images", "/var/lib/karri/images/ab.raw"),
                "amazon/karri-micro",
            ),
            (
                image("acme", "https://images.example/disk.raw"),
                "111122223333/karri-micro",
            ),
            (
                image("acme", "acme-images/disk.raw"),
                "acme-images/disk.raw",
            ),
            (
                image("acme", "s3://acme-images/disk.raw"),
                "s3://acme-images/disk.raw",
            ),
        ];
        for (v, want) in rows {
            assert_eq!(shown_location(&v, "111122223333"), want, "{v}");
        }
    }

    #[test]
    fn every_image_filter_matches_what_describe_images_shows() {
        let v = full_image();
        check(&image_table(), &described(&v, true), |name| {
            image_values(&v, name, OWNER, true)
        });
    }

    #[test]
    fn another_accounts_image_shows_and_matches_no_tags() {
        let v = full_image();
        check_values(&image_table(), &described(&v, false), |name| {
            image_values(&v, name, OWNER, false)
        });
        assert!(image_values(&v, "tag:team", OWNER, false).is_empty());
    }

    #[test]
    fn an_image_without_optional_fields_matches_on_none_of_them() {
        let v = json!({
            "kind": "Image",
            "metadata": {"name": "emi-0def", "labels": {crds::ID_LABEL: "emi-0def"}},
            "spec": {"name": "bare", "imageLocation": "images/bare.img", "architecture": "x86_64"},
        });
        check_values(&image_table(), &described(&v, true), |name| {
            image_values(&v, name, OWNER, true)
        });
        for name in [
            "description",
            "owner-alias",
            "kernel-id",
            "ramdisk-id",
            "state-reason-code",
        ] {
            assert!(image_values(&v, name, OWNER, true).is_empty(), "{name}");
        }
    }

    #[test]
    fn an_ami_id_names_the_machine_image_of_its_digits_only() {
        assert!(same_image("emi-0abc", "emi-0abc"));
        assert!(same_image("emi-0abc", "ami-0abc"));
        assert!(same_image("eki-0abc", "eki-0abc"));
        for (stored, asked) in [
            ("eki-0abc", "ami-0abc"),
            ("eri-0abc", "ami-0abc"),
            ("emi-0abc", "ami-0abd"),
            ("emi-0abc", "eki-0abc"),
            ("ami-0abc", "emi-0abc"),
        ] {
            assert!(!same_image(stored, asked), "{stored} {asked}");
        }
    }

    #[test]
    fn an_ami_filter_value_also_names_the_emi_image() {
        let filters = [
            Filter::new("image-id", ["ami-0abc", "ami-*", "emi-0def", "*"]),
            Filter::new("name", ["ami-0abc"]),
        ];
        let spelled = with_emi_spellings(&filters, &["image-id"]);
        assert_eq!(
            spelled[0].values,
            ["ami-0abc", "ami-*", "emi-0def", "*", "emi-0abc", "emi-*"]
        );
        assert_eq!(
            spelled[1], filters[1],
            "other filters are left as they were"
        );
        let v = full_image();
        for value in ["ami-0abc", "ami-0a*", "emi-0abc"] {
            let m = Matcher::new(&with_emi_spellings(
                &[Filter::new("image-id", [value])],
                &["image-id"],
            ));
            assert!(
                m.matches(|name| image_values(&v, name, OWNER, true)),
                "{value}"
            );
        }
        let m = Matcher::new(&with_emi_spellings(
            &[Filter::new("image-id", ["ami-0abd", "aki-0abc"])],
            &["image-id"],
        ));
        assert!(!m.matches(|name| image_values(&v, name, OWNER, true)));
    }

    #[test]
    fn only_the_administrators_images_answer_to_the_amazon_alias() {
        let system = full_image();
        let mut account = full_image();
        account["metadata"]["namespace"] = json!("acct-1");
        assert!(is_system_image(&system));
        assert!(!is_system_image(&account));
        assert!(described(&system, false).contains("<imageOwnerAlias>amazon</imageOwnerAlias>"));
        assert!(!described(&account, false).contains("imageOwnerAlias"));
        assert!(image_values(&account, "owner-alias", OWNER, true).is_empty());
    }
}
