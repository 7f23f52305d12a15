//! `Bucket`: an S3 bucket (the Walrus bucket of Eucalyptus). Names are global, so the kind is
//! cluster-scoped; the owning account is in the spec. Objects are not records: their index
//! lives beside the bucket in etcd and their bytes in the gateway's blob store.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Tag;
use crate::validation::{check_tags, check_text, Validate, ValidationError};

/// Desired state of a bucket: CreateBucket writes it, PutBucketAcl and PutBucketTagging change
/// it, DeleteBucket removes it once no object is left.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "Bucket",
    plural = "buckets",
    singular = "bucket",
    shortname = "bkt",
    category = "karri",
    status = "BucketStatus",
    derive = "PartialEq",
    doc = "An S3 bucket; its name is the bucket name, global across accounts.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner"),
    printcolumn(name = "ACL", type_ = "string", json_path = ".spec.acl"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BucketSpec {
    /// Name of the owning Account record.
    pub owner: String,
    /// The owning account's 12-digit account ID (the canonical owner S3 shows). Filled in from
    /// the owner's Account record when a manifest leaves it out; it must be that account's.
    #[serde(default)]
    pub owner_id: String,
    /// Canned ACL: `private` (default), `public-read`, `public-read-write` or
    /// `authenticated-read`.
    #[serde(default)]
    pub acl: CannedAcl,
    /// The region the bucket was created in (its LocationConstraint).
    #[serde(default)]
    pub region: String,
    /// Bucket tags (PutBucketTagging).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tags: Vec<Tag>,
}

/// A canned ACL: who besides the owner may read or write.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CannedAcl {
    /// Only the owner.
    #[default]
    Private,
    /// Anyone may read.
    PublicRead,
    /// Anyone may read and write.
    PublicReadWrite,
    /// Any signed-in account may read.
    AuthenticatedRead,
}

impl CannedAcl {
    /// The wire form, e.g. `public-read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::PublicRead => "public-read",
            Self::PublicReadWrite => "public-read-write",
            Self::AuthenticatedRead => "authenticated-read",
        }
    }

    /// The ACL named `s` (the `x-amz-acl` header), if it is one Karri supports.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Private,
            Self::PublicRead,
            Self::PublicReadWrite,
            Self::AuthenticatedRead,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// Observed state of a bucket (nothing is observed yet).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct BucketStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub observed_generation: Option<i64>,
}

/// Whether `name` follows S3's bucket naming rules: 3 to 63 characters of lower-case letters,
/// digits, `.` and `-`, starting and ending with a letter or digit, no `..`, not shaped like an
/// IPv4 address, no `xn--` prefix and no `-s3alias` suffix.
pub fn is_valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (3..=63).contains(&b.len())
        && b.iter().all(|&c| edge(c) || c == b'.' || c == b'-')
        && b.first().copied().is_some_and(edge)
        && b.last().copied().is_some_and(edge)
        && !name.contains("..")
        && !name.contains(".-")
        && !name.contains("-.")
        && name.parse::<std::net::Ipv4Addr>().is_err()
        && !name.starts_with("xn--")
        && !name.ends_with("-s3alias")
}

impl Validate for BucketSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_text("spec.owner", &self.owner, 253)?;
        // Empty in a manifest: the gateway fills it in from the owner's Account record.
        if !self.owner_id.is_empty() && !crate::validation::is_valid_account_id(&self.owner_id) {
            return Err(ValidationError::invalid(
                "spec.ownerId",
                "be a 12-digit account ID",
            ));
        }
        check_text("spec.region", &self.region, 64)?;
        check_tags("spec.tags", &self.tags)
    }
}

impl Validate for BucketStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_s3_rules() {
        for ok in ["abc", "my-bucket", "my.bucket.1", "a1b", &"a".repeat(63)] {
            assert!(is_valid_bucket_name(ok), "{ok} should be valid");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "Bad_Name",
            "UPPER",
            "-abc",
            "abc-",
            "a..b",
            "a.-b",
            "192.168.1.1",
            "xn--abc",
            "abc-s3alias",
            "has space",
        ] {
            assert!(!is_valid_bucket_name(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn canned_acls_round_trip_their_wire_names() {
        for acl in [
            "private",
            "public-read",
            "public-read-write",
            "authenticated-read",
        ] {
            assert_eq!(CannedAcl::parse(acl).map(CannedAcl::as_str), Some(acl));
        }
        assert_eq!(CannedAcl::parse("aws-exec-read"), None);
    }
}
