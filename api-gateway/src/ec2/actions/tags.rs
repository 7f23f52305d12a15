//! Tag actions: CreateTags, DeleteTags and DescribeTags over the caller's instances, images and
//! key pairs (tags live in each record's `spec.tags`).

use std::borrow::Cow;

use serde_json::{json, Value};

use super::{from_api, id_of, namespace, tags_of, text, Cx};
use crate::admission::Subresource;
use crate::ec2::error::Ec2Error;
use crate::ec2::filter::{self, Filter, Matcher};
use crate::ec2::router;
use crate::ec2::xml::Response;
use crate::registry::WriteOptions;

/// Tags as (key, value) pairs, in order.
type Tags = Vec<(String, String)>;

/// A DescribeTags row: resource ID, resource type, key, value.
type TagRow = (String, &'static str, String, String);

/// The plural and EC2 resource type of a taggable resource ID.
fn resource_of(id: &str) -> Option<(&'static str, &'static str)> {
    match id.split_once('-')?.0 {
        "i" => Some(("instances", "instance")),
        "emi" | "ami" | "eki" | "aki" | "eri" | "ari" => Some(("images", "image")),
        "key" => Some(("keypairs", "key-pair")),
        _ => None,
    }
}

fn not_found(plural: &str, id: &str) -> Ec2Error {
    match plural {
        "instances" => Ec2Error::instance_not_found(&[id]),
        "images" => Ec2Error::image_not_found(&[id]),
        _ => Ec2Error::new(
            "InvalidKeyPair.NotFound",
            400,
            format!("The key pair ID '{id}' does not exist"),
        ),
    }
}

/// Resolve every resource ID to the caller's record (all or nothing).
async fn resources(cx: &Cx<'_>, ids: &[String]) -> Result<Vec<(&'static str, Value)>, Ec2Error> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let Some((plural, _)) = resource_of(id) else {
            if id.starts_with("vpc-") || id.starts_with("subnet-") {
                return Err(Ec2Error::unsupported_operation(format!(
                    "Tagging {id} is not supported by Karri yet."
                )));
            }
            return Err(Ec2Error::invalid_id(id));
        };
        let found = if plural == "images" {
            // As every image action: an `ami-` ID names the `emi-` image of the same digits.
            super::images::find_image(cx, id).await?
        } else {
            cx.registry.lookup_id(id).await.map_err(from_api)?
        };
        match found {
            Some(v) if super::is_kind(&v, plural) && namespace(&v) == cx.caller.namespace => {
                out.push((plural, v));
            }
            // On EC2 an account may tag an image shared with it or public, and those tags are
            // its own; Karri keeps one set of tags per image, its owner's.
            Some(v) if plural == "images" && super::images::visible(cx, &v) => {
                return Err(Ec2Error::unsupported_operation(format!(
                    "Tagging {id}, an image another account owns, is not supported by Karri yet: Karri keeps only its owner's tags."
                )))
            }
            _ => return Err(not_found(plural, id)),
        }
    }
    Ok(out)
}

async fn retag(
    cx: &Cx<'_>,
    plural: &str,
    v: &Value,
    change: &(dyn Fn(Tags) -> Tags + Sync),
) -> Result<(), Ec2Error> {
    let kind = cx.kind(plural)?;
    cx.registry
        .update_with(
            &kind,
            Some(&cx.caller.namespace),
            text(v, "/metadata/name"),
            &cx.caller.principal(),
            Subresource::Main,
            None,
            WriteOptions::by(crate::ec2::FIELD_MANAGER),
            &mut |cur: &Value| {
                let tags: Vec<(String, String)> = tags_of(cur)
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let tags = change(tags);
                if tags.len() > crds::common::MAX_TAGS {
                    return Err(crate::error::ApiError::bad_request("TagLimitExceeded"));
                }
                let mut next = cur.clone();
                next["spec"]["tags"] = json!(tags
                    .into_iter()
                    .map(|(key, value)| json!({"key": key, "value": value}))
                    .collect::<Vec<_>>());
                Ok(next)
            },
        )
        .await
        .map_err(|e| {
            if e.code == 400 && e.message == "TagLimitExceeded" {
                Ec2Error::tag_limit_exceeded()
            } else if e.code == 404 {
                not_found(plural, id_of(v))
            } else {
                from_api(e)
            }
        })?;
    Ok(())
}

/// CreateTags: add or overwrite tags on every resource.
pub async fn create_tags(
    cx: &Cx<'_>,
    a: router::CreateTags,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    let targets = resources(cx, &a.resource_ids).await?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let add: Vec<(String, String)> = a
        .tags
        .iter()
        .map(|t| (t.key.clone(), t.value.clone()))
        .collect();
    // Every resource is checked before any is changed: a call refused for one resource's tag
    // limit leaves the others as they were (each write checks again against the stored record).
    for (_, v) in &targets {
        let have = tags_of(v);
        let new_keys = add
            .iter()
            .filter(|(k, _)| !have.iter().any(|(key, _)| key == k))
            .count();
        if have.len() + new_keys > crds::common::MAX_TAGS {
            return Err(Ec2Error::tag_limit_exceeded());
        }
    }
    for (plural, v) in &targets {
        retag(cx, plural, v, &|mut tags| {
            for (k, val) in &add {
                match tags.iter_mut().find(|(key, _)| key == k) {
                    Some(t) => t.1 = val.clone(),
                    None => tags.push((k.clone(), val.clone())),
                }
            }
            tags
        })
        .await?;
    }
    let mut w = cx.response("CreateTags");
    w.leaf_bool("return", true);
    Ok(w.finish())
}

/// DeleteTags: remove the named tags (only where the value matches, when one is given), or
/// every tag when none is named.
pub async fn delete_tags(
    cx: &Cx<'_>,
    a: router::DeleteTags,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    let targets = resources(cx, &a.resource_ids).await?;
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    for (plural, v) in &targets {
        retag(cx, plural, v, &|tags| {
            if a.tags.is_empty() {
                return Vec::new();
            }
            tags.into_iter()
                .filter(|(k, val)| {
                    !a.tags
                        .iter()
                        .any(|d| d.key == *k && d.value.as_ref().is_none_or(|want| want == val))
                })
                .collect()
        })
        .await?;
    }
    let mut w = cx.response("DeleteTags");
    w.leaf_bool("return", true);
    Ok(w.finish())
}

/// DescribeTags.
pub async fn describe_tags(cx: &Cx<'_>, a: router::DescribeTags) -> Result<String, Ec2Error> {
    // `tag:<key>` picks the tags of the resources that carry that tag; `tag-key` and
    // `tag-value` are not DescribeTags filters (`key` and `value` are).
    filter::validate_names(&a.filters, filter::TAG_FILTERS, true)?;
    if let Some(f) = a
        .filters
        .iter()
        .find(|f| matches!(f.name.as_str(), "tag-key" | "tag-value"))
    {
        return Err(Ec2Error::invalid_filter(&f.name));
    }
    // The filters on the resource (`resource-id`, `resource-type`, `tag:<key>`) are matched
    // once per resource, those on the tag (`key`, `value`) once per tag.
    let (per_tag, per_resource): (Vec<Filter>, Vec<Filter>) = a
        .filters
        .iter()
        .cloned()
        .partition(|f| matches!(f.name.as_str(), "key" | "value"));
    // An `ami-` resource ID names the `emi-` image, as everywhere else.
    let per_resource = super::images::with_emi_spellings(&per_resource, &["resource-id"]);
    let (tag_matcher, resource_matcher) = (Matcher::new(&per_tag), Matcher::new(&per_resource));
    let mut rows: Vec<(String, TagRow)> = Vec::new();
    for (plural, kind) in [
        ("instances", "instance"),
        ("images", "image"),
        ("keypairs", "key-pair"),
    ] {
        for o in cx.own(plural).await? {
            let id = id_of(&o.value).to_string();
            let tags = tags_of(&o.value);
            let resource_kept =
                resource_matcher.matches(|name| resource_values(&id, kind, &tags, name));
            if !resource_kept {
                continue;
            }
            for (k, v) in &tags {
                let keep = tag_matcher.matches(|name| tag_values(k, v, name));
                if keep {
                    rows.push((
                        format!("{id}\u{0}{k}"),
                        (id.clone(), kind, k.to_string(), v.to_string()),
                    ));
                }
            }
        }
    }
    let (page, token) = super::paginate(
        "DescribeTags",
        rows,
        a.next_token.as_deref(),
        a.max_results.map(|m| m as usize),
    )?;
    let mut w = cx.response("DescribeTags");
    w.set("tagSet", page, |w, row| write_tag_row(w, &row));
    w.leaf_opt("nextToken", token.as_deref());
    Ok(w.finish())
}

/// The values a DescribeTags filter on the resource (`resource-id`, `resource-type`,
/// `tag:<key>`) sees on a resource with these tags: what [`write_tag_row`] shows of each of its
/// rows.
fn resource_values<'a>(
    id: &'a str,
    kind: &'a str,
    tags: &[(&'a str, &'a str)],
    name: &str,
) -> Vec<Cow<'a, str>> {
    if let Some(values) = filter::tag_filter_values(name, tags.iter().copied()) {
        return values;
    }
    match name {
        "resource-id" => filter::shown(id),
        "resource-type" => filter::shown(kind),
        _ => Vec::new(),
    }
}

/// The values a DescribeTags filter on the tag (`key`, `value`) sees on one tag.
fn tag_values<'a>(key: &'a str, value: &'a str, name: &str) -> Vec<Cow<'a, str>> {
    match name {
        "key" => vec![Cow::Borrowed(key)],
        // An empty value is a value: the row shows `<value></value>`.
        "value" => vec![Cow::Borrowed(value)],
        _ => Vec::new(),
    }
}

/// One `tagSet` item.
fn write_tag_row(w: &mut Response, (id, kind, k, v): &TagRow) {
    w.leaf("resourceId", id)
        .leaf("resourceType", kind)
        .leaf("key", k)
        .leaf("value", v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::filter::answered::{check, Table};

    #[test]
    fn every_tag_filter_matches_what_describe_tags_shows() {
        let tags = [("Name", "web-1")];
        let row: TagRow = ("i-0abc".into(), "instance", "Name".into(), "web-1".into());
        let mut w = Response::new("DescribeTagsResponse", "req-1");
        w.set("tagSet", [&row], write_tag_row);
        let table = Table {
            accepted: filter::TAG_FILTERS,
            taggable: false,
            item: "tagSet/item",
            rows: &[
                ("key", "key"),
                ("resource-id", "resourceId"),
                ("resource-type", "resourceType"),
                ("value", "value"),
            ],
            none: &[],
        };
        check(&table, &w.finish(), |name| match name {
            "key" | "value" => tag_values(&row.2, &row.3, name),
            _ => resource_values(&row.0, row.1, &tags, name),
        });
    }
}
