//! The EC2 actions, each on real records through the registry (the same admission as the
//! resource API). This module holds what they share: the request context, record access scoped
//! to the calling account, and the default network every account sees.

mod catalog;
mod images;
mod instance_view;
mod instances;
mod keypairs;
mod tags;

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;
use sha2::Digest as _;

use super::error::Ec2Error;
use super::router::{Action, Request};
use super::service::{find_account, Caller, Ec2Settings};
use super::xml::Response;
use crate::cache::CachedObject;
use crate::error::ApiError;
use crate::kinds::Kind;
use crate::registry::{ListOptions, Registry};

/// What every action gets: the registry, who calls, the face's settings and the request ID.
pub struct Cx<'a> {
    /// The registry.
    pub registry: &'a Registry,
    /// The calling account.
    pub caller: &'a Caller,
    /// Region and endpoint.
    pub settings: &'a Ec2Settings,
    /// This request's ID, echoed in the response.
    pub request_id: &'a str,
}

/// Run one routed request; the XML response or the EC2 error.
pub async fn run(cx: &Cx<'_>, request: Request) -> Result<String, Ec2Error> {
    let dry_run = request.dry_run;
    let result = match request.action {
        Action::RunInstances(a) => instances::run_instances(cx, a, dry_run).await,
        Action::DescribeInstances(a) => instances::describe_instances(cx, a).await,
        Action::DescribeInstanceStatus(a) => instances::describe_instance_status(cx, a).await,
        Action::TerminateInstances(a) => {
            let change = instances::Change::Terminate;
            instances::change_state(cx, change, &a.instance_ids, false, dry_run).await
        }
        Action::StopInstances(a) => {
            let change = instances::Change::Stop;
            instances::change_state(cx, change, &a.instance_ids, a.force, dry_run).await
        }
        Action::StartInstances(a) => {
            let change = instances::Change::Start;
            instances::change_state(cx, change, &a.instance_ids, false, dry_run).await
        }
        Action::RebootInstances(a) => {
            instances::reboot_instances(cx, &a.instance_ids, dry_run).await
        }
        Action::DescribeInstanceAttribute(a) => instances::describe_instance_attribute(cx, a).await,
        Action::ModifyInstanceAttribute(a) => {
            instances::modify_instance_attribute(cx, a, dry_run).await
        }
        Action::ModifyInstanceMetadataOptions(a) => {
            instances::modify_instance_metadata_options(cx, a, dry_run).await
        }
        Action::GetConsoleOutput(a) => instances::get_console_output(cx, a).await,
        Action::DescribeInstanceTypes(a) => catalog::describe_instance_types(cx, a).await,
        Action::DescribeInstanceTypeOfferings(a) => {
            catalog::describe_instance_type_offerings(cx, a).await
        }
        Action::DescribeAvailabilityZones(a) => catalog::describe_availability_zones(cx, a).await,
        Action::DescribeRegions(a) => catalog::describe_regions(cx, a),
        Action::DescribeAccountAttributes(a) => catalog::describe_account_attributes(cx, a),
        Action::DescribeVpcs(a) => catalog::describe_vpcs(cx, a).await,
        Action::DescribeSubnets(a) => catalog::describe_subnets(cx, a).await,
        Action::DescribeVpcAttribute(a) => catalog::describe_vpc_attribute(cx, a),
        Action::DescribeAddresses(a) => catalog::describe_addresses(cx, a),
        Action::CreateKeyPair(a) => keypairs::create_key_pair(cx, a, dry_run).await,
        Action::ImportKeyPair(a) => keypairs::import_key_pair(cx, a, dry_run).await,
        Action::DescribeKeyPairs(a) => keypairs::describe_key_pairs(cx, a).await,
        Action::DeleteKeyPair(a) => keypairs::delete_key_pair(cx, a, dry_run).await,
        Action::DescribeImages(a) => images::describe_images(cx, a).await,
        Action::RegisterImage(a) => images::register_image(cx, a, dry_run).await,
        Action::DeregisterImage(a) => images::deregister_image(cx, a, dry_run).await,
        Action::DescribeImageAttribute(a) => images::describe_image_attribute(cx, a).await,
        Action::ModifyImageAttribute(a) => images::modify_image_attribute(cx, a, dry_run).await,
        Action::CreateTags(a) => tags::create_tags(cx, a, dry_run).await,
        Action::DeleteTags(a) => tags::delete_tags(cx, a, dry_run).await,
        Action::DescribeTags(a) => tags::describe_tags(cx, a).await,
    };
    // A dry run never answers with a result: the actions that change something stop before the
    // change; the read-only ones made their checks and would have succeeded.
    match result {
        Ok(_) if dry_run => Err(Ec2Error::dry_run_operation()),
        other => other,
    }
}

// What every Karri machine is: instances, images and instance types show these, and their
// filters match them.

/// The CPU architecture of instances and instance types.
pub const ARCHITECTURE: &str = "x86_64";
/// The hypervisor of instances, images and instance types.
pub const HYPERVISOR: &str = "xen";
/// The virtualization type of instances, images and instance types.
pub const VIRTUALIZATION_TYPE: &str = "hvm";
/// The root device type: Karri has no EBS, every root disk is instance storage.
pub const ROOT_DEVICE_TYPE: &str = "instance-store";
/// The boot mode of images and instance types.
pub const BOOT_MODE: &str = "legacy-bios";

/// The EC2 error for a registry failure. Admission refusals are the caller's fault; etcd being
/// away is `ServiceUnavailable` (SDKs retry it); anything else is an internal error.
pub fn from_api(e: ApiError) -> Ec2Error {
    match e.code {
        400 | 422 => Ec2Error::invalid_parameter_value(e.message),
        // A record gone between the lookup and the write; callers that know the kind map this
        // to its own NotFound code first.
        404 => Ec2Error::invalid_parameter_value(format!(
            "The resource no longer exists: {}",
            e.message
        )),
        403 if e.is_insufficient_capacity() => Ec2Error::insufficient_instance_capacity(e.message),
        403 => Ec2Error::unauthorized_operation(),
        // A real EC2 code ("the resource is in an incorrect state for the request", sent for
        // volumes and others): here another write changed the record first.
        409 => Ec2Error::new("IncorrectState", 400, e.message),
        503 | 504 => Ec2Error::service_unavailable(),
        _ => {
            tracing::error!(code = e.code, message = %e.message, "registry failure");
            Ec2Error::internal_error()
        }
    }
}

impl<'a> Cx<'a> {
    /// The served kind with this plural.
    pub fn kind(&self, plural: &str) -> Result<Arc<Kind>, Ec2Error> {
        self.registry.kinds.by_plural(plural).ok_or_else(|| {
            tracing::error!(plural, "kind not served");
            Ec2Error::internal_error()
        })
    }

    /// A success response document for `action`.
    pub fn response(&self, action: &'static str) -> Response {
        Response::new(format!("{action}Response"), self.request_id)
    }

    /// The caller's records of a kind (a consistent read through the watch cache).
    pub async fn own(&self, plural: &str) -> Result<Vec<Arc<CachedObject>>, Ec2Error> {
        let kind = self.kind(plural)?;
        let page = self
            .registry
            .list(
                &kind,
                Some(&self.caller.namespace),
                &self.caller.principal(),
                &ListOptions::default(),
            )
            .await
            .map_err(from_api)?;
        Ok(page.items)
    }

    /// Records of a kind in every namespace (for images shared across accounts).
    pub async fn everywhere(&self, plural: &str) -> Result<Vec<Arc<CachedObject>>, Ec2Error> {
        let kind = self.kind(plural)?;
        let page = self
            .registry
            .list(
                &kind,
                None,
                &crate::auth::Principal::Admin("ec2".into()),
                &ListOptions::default(),
            )
            .await
            .map_err(from_api)?;
        Ok(page.items)
    }

    /// The caller's record with this EC2 ID (a consistent read), or None when there is none or
    /// it belongs to another account.
    pub async fn own_by_id(&self, plural: &str, id: &str) -> Result<Option<Value>, Ec2Error> {
        let found = self.registry.lookup_id(id).await.map_err(from_api)?;
        Ok(found.filter(|v| is_kind(v, plural) && namespace(v) == self.caller.namespace))
    }

    /// The 12-digit ID of the account owning a namespace.
    pub async fn owner_of(&self, ns: &str) -> String {
        if ns == self.caller.namespace {
            return self.caller.account_id.clone();
        }
        match find_account(self.registry, ns).await {
            Ok(Some(a)) => text(&a, "/status/accountId").to_string(),
            _ => String::new(),
        }
    }
}

/// Whether a record is of the kind with this plural.
pub fn is_kind(v: &Value, plural: &str) -> bool {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    crds::kind_by_plural(plural).is_some_and(|k| k.kind == kind)
}

/// The value at JSON pointer `pointer` in `v`, exactly what `v.pointer(pointer)` finds, without
/// its cost: `Value::pointer` unescapes every segment into two new strings, and DescribeInstances
/// reads some 25 fields per instance (at 10,000 instances that was half of its time). Pointers
/// with an escape (`~`) or that step into an array take `Value::pointer` itself.
pub fn at<'v>(v: &'v Value, pointer: &str) -> Option<&'v Value> {
    let Some(path) = pointer.strip_prefix('/').filter(|_| !pointer.contains('~')) else {
        return v.pointer(pointer);
    };
    let mut here = v;
    for segment in path.split('/') {
        here = match here {
            Value::Object(map) => map.get(segment)?,
            Value::Array(_) => return v.pointer(pointer),
            _ => return None,
        };
    }
    Some(here)
}

/// A string field of a record, or "".
pub fn text<'v>(v: &'v Value, pointer: &str) -> &'v str {
    at(v, pointer).and_then(Value::as_str).unwrap_or("")
}

/// A string field of a record, or None when absent or empty.
pub fn opt<'v>(v: &'v Value, pointer: &str) -> Option<&'v str> {
    at(v, pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The record's namespace.
pub fn namespace(v: &Value) -> &str {
    text(v, "/metadata/namespace")
}

/// The record's EC2 ID (`karri.dev/id` label).
pub fn id_of(v: &Value) -> &str {
    at(v, "/metadata/labels")
        .and_then(|l| l.get(crds::ID_LABEL))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The record's tags as (key, value) pairs.
pub fn tags_of(v: &Value) -> Vec<(&str, &str)> {
    at(v, "/spec/tags")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t.get("key").and_then(Value::as_str).unwrap_or(""),
                        t.get("value").and_then(Value::as_str).unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Write a `tagSet` (empty sets included, as EC2 does).
pub fn write_tag_set(w: &mut Response, v: &Value) {
    let tags = tags_of(v);
    w.set("tagSet", tags, |w, (k, val)| {
        w.leaf("key", k).leaf("value", val);
    });
}

/// The values a tag filter (`tag:<key>`, `tag-key`, `tag-value`) sees on a record; None for
/// other filter names.
pub fn tag_values<'v>(v: &'v Value, name: &str) -> Option<Vec<Cow<'v, str>>> {
    super::filter::tag_filter_values(name, tags_of(v))
}

/// The RFC 3339 creation time of a record as EC2 shows it.
pub fn created(v: &Value) -> chrono::DateTime<chrono::Utc> {
    time_at(v, "/metadata/creationTimestamp").unwrap_or_default()
}

/// A time field of a record.
pub fn time_at(v: &Value, pointer: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    opt(v, pointer).and_then(rfc3339)
}

/// An RFC 3339 time, in UTC.
pub fn rfc3339(t: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn hash17(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(text.as_bytes());
    // The first 17 lowercase hex digits, without a string per byte (this runs per instance).
    digest
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]])
        .take(17)
        .map(char::from)
        .collect()
}

/// The default VPC every account sees in a region: a stable ID derived from the region.
pub fn default_vpc_id(region: &str) -> String {
    format!("vpc-{}", hash17(&format!("karri/default-vpc/{region}")))
}

/// CIDR block of the default VPC.
pub use crds::subnet::DEFAULT_VPC_CIDR;

/// The default subnet of a zone: a stable ID derived from the zone name.
pub fn default_subnet_id(zone: &str) -> String {
    format!("subnet-{}", hash17(&format!("karri/default-subnet/{zone}")))
}

/// A page of `items` of action `action` after `next_token` (the sort key of the last item of
/// the previous page), at most `max` long, and the token of the next page. A token names its
/// action: one of another action's is `InvalidNextToken`, as in EC2.
pub fn paginate<T>(
    action: &str,
    mut items: Vec<(String, T)>,
    next_token: Option<&str>,
    max: Option<usize>,
) -> Result<(Vec<T>, Option<String>), Ec2Error> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let start = match next_token {
        None => 0,
        Some(token) => {
            let raw = b64
                .decode(token)
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok())
                .ok_or_else(Ec2Error::invalid_next_token)?;
            let after = raw
                .strip_prefix(action)
                .and_then(|rest| rest.strip_prefix('\n'))
                .ok_or_else(Ec2Error::invalid_next_token)?;
            items.partition_point(|(key, _)| key.as_str() <= after)
        }
    };
    let rest = items.split_off(start.min(items.len()));
    let max = max.unwrap_or(usize::MAX);
    let more = rest.len() > max;
    let page: Vec<(String, T)> = rest.into_iter().take(max).collect();
    let token = if more {
        page.last()
            .map(|(key, _)| b64.encode(format!("{action}\n{key}").as_bytes()))
    } else {
        None
    };
    Ok((page.into_iter().map(|(_, t)| t).collect(), token))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_network_ids_are_stable_and_shaped_like_aws_ids() {
        let vpc = default_vpc_id("karri-1");
        assert_eq!(vpc, default_vpc_id("karri-1"));
        assert_ne!(vpc, default_vpc_id("karri-2"));
        assert!(crds::is_valid_id("vpc", &vpc), "{vpc}");
        assert!(crds::is_valid_id("subnet", &default_subnet_id("karri-1a")));
    }

    #[test]
    fn network_ids_are_the_first_17_hex_digits_of_the_sha256() {
        for text in [
            "karri/default-vpc/karri-1",
            "karri/default-subnet/karri-1a",
            "",
        ] {
            let digest = sha2::Sha256::digest(text.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hash17(text), hex[..17]);
        }
    }

    #[test]
    fn field_lookup_finds_what_a_json_pointer_finds() {
        let v = serde_json::json!({
            "metadata": {"labels": {"karri.dev/id": "i-0123456789abcdef0"}, "name": "x"},
            "spec": {"tags": [{"key": "k", "value": "v"}], "": {"": 1}, "a/b": 2, "m~n": 3},
            "status": {"state": "pending", "n": null},
        });
        let pointers = [
            "",
            "/",
            "//",
            "/metadata",
            "/metadata/labels",
            "/metadata/labels/karri.dev~1id",
            "/metadata/name",
            "/metadata/name/deeper",
            "/spec/tags",
            "/spec/tags/0",
            "/spec/tags/0/key",
            "/spec/tags/00",
            "/spec/tags/x",
            "/spec/",
            "/spec//",
            "/spec/a~1b",
            "/spec/m~0n",
            "/spec/a/b",
            "/status/n",
            "/status/n/x",
            "/missing",
            "metadata",
            "/status/state",
        ];
        for p in pointers {
            assert_eq!(at(&v, p), v.pointer(p), "{p}");
        }
        assert_eq!(text(&v, "/status/state"), "pending");
        assert_eq!(opt(&v, "/status/missing"), None);
        assert_eq!(id_of(&v), "i-0123456789abcdef0");
        assert_eq!(tags_of(&v), vec![("k", "v")]);
    }

    #[test]
    fn pages_continue_after_the_last_key_and_end_without_a_token() {
        let items: Vec<(String, u32)> = (0..7).map(|i| (format!("k{i}"), i)).collect();
        let (first, token) = paginate("DescribeThings", items.clone(), None, Some(3)).unwrap();
        assert_eq!(first, vec![0, 1, 2]);
        let (second, token) =
            paginate("DescribeThings", items.clone(), token.as_deref(), Some(3)).unwrap();
        assert_eq!(second, vec![3, 4, 5]);
        let (third, token) =
            paginate("DescribeThings", items.clone(), token.as_deref(), Some(3)).unwrap();
        assert_eq!(third, vec![6]);
        assert!(token.is_none());
        assert!(paginate("DescribeThings", items.clone(), Some("%%%"), Some(3)).is_err());
        // Another action's token is none of this one's.
        let (_, token) = paginate("DescribeOthers", items.clone(), None, Some(3)).unwrap();
        let err = paginate("DescribeThings", items, token.as_deref(), Some(3)).unwrap_err();
        assert_eq!(err.code, "InvalidNextToken");
    }
}
