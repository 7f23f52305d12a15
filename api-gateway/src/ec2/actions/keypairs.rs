//! Key pair actions: CreateKeyPair, ImportKeyPair, DescribeKeyPairs and DeleteKeyPair.

use std::borrow::Cow;

use base64::Engine as _;
use serde_json::{json, Value};

use super::{created, from_api, id_of, opt, tag_values, text, write_tag_set, Cx};
use crate::ec2::error::Ec2Error;
use crate::ec2::filter::{self, Matcher};
use crate::ec2::keys::{self, KeyType};
use crate::ec2::router;
use crate::ec2::xml::Response;
use crate::registry::{DeleteOptions, WriteOptions};

/// The caller's key pair with this name.
pub async fn find_by_name(cx: &Cx<'_>, name: &str) -> Result<Option<Value>, Ec2Error> {
    Ok(cx
        .own("keypairs")
        .await?
        .iter()
        .find(|o| text(&o.value, "/spec/keyName") == name)
        .map(|o| o.value.clone()))
}

fn tags_json(specs: &[router::TagSpecification], resource: &str) -> Result<Vec<Value>, Ec2Error> {
    let mut tags = Vec::new();
    for spec in specs {
        if spec.resource_type != resource {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "'{}' is not a valid taggable resource type for this operation.",
                spec.resource_type
            )));
        }
        tags.extend(
            spec.tags
                .iter()
                .map(|t| json!({"key": t.key, "value": t.value})),
        );
    }
    Ok(tags)
}

async fn store_key_pair(
    cx: &Cx<'_>,
    name: &str,
    public_key: &str,
    key_type: KeyType,
    fingerprint: &str,
    tags: Vec<Value>,
) -> Result<Value, Ec2Error> {
    let kind = cx.kind("keypairs")?;
    let mut spec = json!({
        "keyName": name,
        "publicKey": public_key,
        "keyType": key_type.as_str(),
        "fingerprint": fingerprint,
    });
    if !tags.is_empty() {
        spec["tags"] = Value::Array(tags);
    }
    let id = crate::admission::new_id("key");
    let body = json!({
        "apiVersion": crds::API_VERSION,
        "kind": "KeyPair",
        "metadata": {"name": id},
        "spec": spec,
    });
    match cx
        .registry
        .create(
            &kind,
            Some(&cx.caller.namespace),
            body,
            &cx.caller.principal(),
            WriteOptions::by(crate::ec2::FIELD_MANAGER),
        )
        .await
    {
        Ok(w) => Ok(w.object),
        Err(e) if e.code == 409 => Err(Ec2Error::key_pair_duplicate(name)),
        Err(e) => Err(from_api(e)),
    }
}

fn check_name(name: &str) -> Result<(), Ec2Error> {
    if crds::key_pair::is_valid_key_name(name) {
        Ok(())
    } else {
        Err(Ec2Error::invalid_parameter_value(
            "Key pair names are 1 to 255 ASCII characters.",
        ))
    }
}

/// CreateKeyPair: the private key is in the response only.
pub async fn create_key_pair(
    cx: &Cx<'_>,
    a: router::CreateKeyPair,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    check_name(&a.key_name)?;
    if a.key_format != router::KeyFormat::Pem {
        return Err(Ec2Error::unsupported_operation(
            "Only the pem key format is supported by Karri.",
        ));
    }
    let key_type = match a.key_type {
        router::KeyType::Rsa => KeyType::Rsa,
        router::KeyType::Ed25519 => KeyType::Ed25519,
    };
    let tags = tags_json(&a.tag_specifications, "key-pair")?;
    if find_by_name(cx, &a.key_name).await?.is_some() {
        return Err(Ec2Error::key_pair_duplicate(&a.key_name));
    }
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    // An RSA key takes tens to hundreds of milliseconds of CPU: off the async workers.
    let made = tokio::task::spawn_blocking(move || keys::create(key_type))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the key generation task failed");
            Ec2Error::internal_error()
        })?
        .map_err(|e| {
            tracing::error!(error = %e, "key generation failed");
            Ec2Error::internal_error()
        })?;
    let stored = store_key_pair(
        cx,
        &a.key_name,
        &made.public_key,
        key_type,
        &made.fingerprint,
        tags,
    )
    .await?;
    let mut w = cx.response("CreateKeyPair");
    w.leaf("keyName", &a.key_name)
        .leaf("keyFingerprint", &made.fingerprint)
        .leaf("keyMaterial", &made.private_key)
        .leaf("keyPairId", id_of(&stored));
    write_tag_set(&mut w, &stored);
    Ok(w.finish())
}

/// ImportKeyPair.
pub async fn import_key_pair(
    cx: &Cx<'_>,
    a: router::ImportKeyPair,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    check_name(&a.key_name)?;
    // The SDKs send the key base64-encoded; accept the raw text too, as EC2 does.
    let material = base64::engine::general_purpose::STANDARD
        .decode(a.public_key_material.trim())
        .unwrap_or_else(|_| a.public_key_material.as_bytes().to_vec());
    let imported = keys::import(&material)
        .map_err(|e| Ec2Error::new("InvalidKey.Format", 400, e.to_string()))?;
    let tags = tags_json(&a.tag_specifications, "key-pair")?;
    if find_by_name(cx, &a.key_name).await?.is_some() {
        return Err(Ec2Error::key_pair_duplicate(&a.key_name));
    }
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let stored = store_key_pair(
        cx,
        &a.key_name,
        &imported.public_key,
        imported.key_type,
        &imported.fingerprint,
        tags,
    )
    .await?;
    let mut w = cx.response("ImportKeyPair");
    w.leaf("keyFingerprint", &imported.fingerprint)
        .leaf("keyName", &a.key_name)
        .leaf("keyPairId", id_of(&stored));
    write_tag_set(&mut w, &stored);
    Ok(w.finish())
}

/// DescribeKeyPairs.
pub async fn describe_key_pairs(
    cx: &Cx<'_>,
    a: router::DescribeKeyPairs,
) -> Result<String, Ec2Error> {
    filter::validate_names(&a.filters, filter::KEY_PAIR_FILTERS, true)?;
    let all = cx.own("keypairs").await?;
    for name in &a.key_names {
        if !all.iter().any(|o| text(&o.value, "/spec/keyName") == name) {
            return Err(Ec2Error::key_pair_not_found(name));
        }
    }
    for id in &a.key_pair_ids {
        if !all.iter().any(|o| id_of(&o.value) == id) {
            return Err(Ec2Error::new(
                "InvalidKeyPair.NotFound",
                400,
                format!("The key pair ID '{id}' does not exist"),
            ));
        }
    }
    let matcher = Matcher::new(&a.filters);
    let mut shown: Vec<&Value> = all
        .iter()
        .map(|o| &o.value)
        .filter(|v| {
            a.key_names.is_empty() || a.key_names.iter().any(|n| n == text(v, "/spec/keyName"))
        })
        .filter(|v| a.key_pair_ids.is_empty() || a.key_pair_ids.iter().any(|n| n == id_of(v)))
        .filter(|v| matcher.matches(|name| key_pair_values(v, name)))
        .collect();
    shown.sort_by_key(|v| text(v, "/spec/keyName"));
    let mut w = cx.response("DescribeKeyPairs");
    w.set("keySet", shown, |w, v| {
        write_key_pair(w, v, a.include_public_key);
    });
    Ok(w.finish())
}

/// The values a DescribeKeyPairs filter sees on a key pair: what [`write_key_pair`] shows.
fn key_pair_values<'v>(v: &'v Value, name: &str) -> Vec<Cow<'v, str>> {
    if let Some(tags) = tag_values(v, name) {
        return tags;
    }
    match name {
        "key-name" => filter::shown(text(v, "/spec/keyName")),
        "key-pair-id" => filter::shown(id_of(v)),
        "fingerprint" => filter::shown(text(v, "/spec/fingerprint")),
        _ => Vec::new(),
    }
}

/// One `keySet` item.
fn write_key_pair(w: &mut Response, v: &Value, include_public_key: bool) {
    w.leaf("keyPairId", id_of(v))
        .leaf("keyType", text(v, "/spec/keyType"))
        .leaf("keyName", text(v, "/spec/keyName"))
        .leaf("keyFingerprint", text(v, "/spec/fingerprint"));
    if include_public_key {
        w.leaf_opt("publicKey", opt(v, "/spec/publicKey"));
    }
    w.leaf_time("createTime", created(v));
    write_tag_set(w, v);
}

/// DeleteKeyPair: deleting a key pair that does not exist succeeds, as on EC2.
pub async fn delete_key_pair(
    cx: &Cx<'_>,
    a: router::DeleteKeyPair,
    dry_run: bool,
) -> Result<String, Ec2Error> {
    // By name, a key pair that does not exist is deleted already (EC2 answers success); by ID,
    // EC2 answers that the ID does not exist.
    let target = match &a.key {
        router::KeyPairRef::Id(id) => {
            Some(cx.own_by_id("keypairs", id).await?.ok_or_else(|| {
                Ec2Error::new(
                    "InvalidKeyPair.NotFound",
                    400,
                    format!("The key pair ID '{id}' does not exist"),
                )
            })?)
        }
        router::KeyPairRef::Name(name) => find_by_name(cx, name).await?,
    };
    if dry_run {
        return Err(Ec2Error::dry_run_operation());
    }
    let mut w = cx.response("DeleteKeyPair");
    if let Some(v) = &target {
        let kind = cx.kind("keypairs")?;
        match cx
            .registry
            .delete(
                &kind,
                Some(&cx.caller.namespace),
                text(v, "/metadata/name"),
                &cx.caller.principal(),
                &DeleteOptions::default(),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(from_api(e)),
        }
        w.leaf("keyPairId", id_of(v));
    }
    w.leaf_bool("return", true);
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::filter::answered::{check, Table};

    #[test]
    fn every_key_pair_filter_matches_what_describe_key_pairs_shows() {
        let v = json!({
            "metadata": {
                "name": "key-0abc",
                "labels": {crds::ID_LABEL: "key-0abc"},
                "creationTimestamp": "2026-01-02T03:04:05Z",
            },
            "spec": {
                "keyName": "deploy key",
                "keyType": "ed25519",
                "fingerprint": "SHA256:abc+def/ghi=",
                "publicKey": "ssh-ed25519 AAAA",
                "tags": [{"key": "team", "value": "ops"}],
            },
        });
        let mut w = Response::new("DescribeKeyPairsResponse", "req-1");
        w.set("keySet", [&v], |w, v| write_key_pair(w, v, true));
        let table = Table {
            accepted: filter::KEY_PAIR_FILTERS,
            taggable: true,
            item: "keySet/item",
            rows: &[
                ("fingerprint", "keyFingerprint"),
                ("key-name", "keyName"),
                ("key-pair-id", "keyPairId"),
                ("tag-key", "tagSet/item/key"),
                ("tag-value", "tagSet/item/value"),
            ],
            none: &[],
        };
        check(&table, &w.finish(), |name| key_pair_values(&v, name));
    }
}
