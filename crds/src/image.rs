//! `Image`: a registered machine image (the EC2 AMI, Eucalyptus EMI).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Tag};
use crate::validation::{
    check_boot_ids, check_tags, check_text, is_valid_account_id, Validate, ValidationError,
};

/// Root device name of images that do not say otherwise.
pub const DEFAULT_ROOT_DEVICE_NAME: &str = "/dev/vda";

fn default_root_device_name() -> String {
    DEFAULT_ROOT_DEVICE_NAME.to_owned()
}

/// Desired state of an image: where its disk comes from and how it boots (the RegisterImage
/// parameters).
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "Image",
    namespaced,
    plural = "images",
    singular = "image",
    shortname = "img",
    category = "karri",
    status = "ImageStatus",
    derive = "PartialEq",
    doc = "A registered machine image (EC2 AMI, Eucalyptus EMI). Its ID (emi- and 17 hex digits, in the karri.dev/id label) is the imageId instances boot from.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "Image Name", type_ = "string", json_path = ".spec.name"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Arch", type_ = "string", json_path = ".spec.architecture"),
    printcolumn(name = "Public", type_ = "boolean", json_path = ".spec.public"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".spec.sizeBytes",
        priority = 1
    ),
    printcolumn(
        name = "Location",
        type_ = "string",
        json_path = ".spec.imageLocation",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// EC2 image name: 3 to 128 letters, digits and `()[] ./-'@_`.
    pub name: String,
    /// Free-form description, at most 255 characters.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
    /// CPU architecture of the image.
    #[serde(default)]
    pub architecture: Architecture,
    /// Where the disk image is fetched from: an `http(s)://` URL, an S3-style `bucket/key`, or an
    /// absolute path on the nodes.
    pub image_location: String,
    /// Expected SHA-256 of the image file, 64 lowercase hex digits; nodes refuse a mismatch.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub checksum_sha256: Option<String>,
    /// Device name of the root disk inside the guest.
    #[serde(default = "default_root_device_name")]
    pub root_device_name: String,
    /// When true, every account may launch the image.
    #[serde(default)]
    pub public: bool,
    /// Kernel image ID (`eki-`/`aki-`) for images that boot an external kernel.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kernel_id: Option<String>,
    /// Ramdisk image ID (`eri-`/`ari-`) used with `kernelId`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ramdisk_id: Option<String>,
    /// 12-digit IDs of the other accounts allowed to launch the image (ModifyImageAttribute
    /// launch permissions); `public` opens it to every account.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub launch_permissions: Vec<String>,
    /// EC2 tags.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tags: Vec<Tag>,
    /// `machine` (a bootable disk, ID `emi-`), `kernel` (`eki-`) or `ramdisk` (`eri-`): the
    /// Eucalyptus EMI/EKI/ERI triple.
    #[serde(default)]
    pub image_type: ImageType,
    /// On-disk format of the file at `imageLocation`: `raw` or `qcow2`.
    #[serde(default)]
    pub format: DiskImageFormat,
    /// Size of the file at `imageLocation` in bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size_bytes: Option<u64>,
}

/// The bucket and key of an image location in S3: `s3://bucket/key` or `bucket/key` (neither an
/// absolute path nor a URL of another scheme), the bucket named by S3's rules and the key not
/// empty. The same rules as the gateway's presigned image URLs. Pure.
pub fn s3_location(location: &str) -> Option<(&str, &str)> {
    let rest = location.strip_prefix("s3://").unwrap_or(location);
    if rest.starts_with('/') || rest.contains("://") {
        return None;
    }
    let (bucket, key) = rest.split_once('/')?;
    (crate::bucket::is_valid_bucket_name(bucket) && !key.is_empty()).then_some((bucket, key))
}

/// The annotation in which the gateway records the UID of the bucket an image in S3 was
/// registered in: a bucket deleted and made again (by anyone) since is not the image's.
pub const BUCKET_UID_ANNOTATION: &str = "karri.dev/bucket-uid";

/// The annotation in which the gateway records which stored bytes of its S3 object an image
/// was registered from (an opaque ID the gateway derives; no client chooses it). As an AMI
/// never changes, an object written again since is no longer the image: launches from it fail
/// until the image is registered again.
pub const OBJECT_CONTENT_ANNOTATION: &str = "karri.dev/object-content";

/// The signed query parameter of a node's presigned image URL that names the stored bytes it
/// reads (an opaque ID the gateway derives from the object as stored): the same ID is the same
/// bytes, so a node that fetched them once need not fetch them again.
pub const PRESIGNED_CONTENT_PARAM: &str = "x-karri-object-content";

/// The stored bytes a presigned image URL names ([`PRESIGNED_CONTENT_PARAM`]), if it names
/// any. Pure.
pub fn presigned_content(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == PRESIGNED_CONTENT_PARAM && !v.is_empty()).then_some(v)
    })
}

/// What an image holds, as EC2's `imageType` names it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    /// A bootable root disk (`emi-`).
    #[default]
    Machine,
    /// A kernel booted directly by the hypervisor (`eki-`).
    Kernel,
    /// An initial ramdisk booted with a kernel (`eri-`).
    Ramdisk,
}

impl ImageType {
    /// The EC2 spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Machine => "machine",
            Self::Kernel => "kernel",
            Self::Ramdisk => "ramdisk",
        }
    }

    /// Prefix of the IDs of images of this type.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Self::Machine => "emi",
            Self::Kernel => "eki",
            Self::Ramdisk => "eri",
        }
    }

    /// The type an image ID's prefix names (`ami-`/`aki-`/`ari-` are accepted too).
    pub fn of_id(id: &str) -> Option<Self> {
        match id.split_once('-')?.0 {
            "emi" | "ami" => Some(Self::Machine),
            "eki" | "aki" => Some(Self::Kernel),
            "eri" | "ari" => Some(Self::Ramdisk),
            _ => None,
        }
    }
}

/// On-disk format of an image file.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskImageFormat {
    /// A plain disk image (kernels and ramdisks are raw files too).
    #[default]
    Raw,
    /// A QEMU copy-on-write image without a backing file.
    Qcow2,
}

impl DiskImageFormat {
    /// The name `qemu-img` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// CPU architecture, named as EC2 names it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum Architecture {
    /// 64-bit x86.
    #[default]
    #[serde(rename = "x86_64")]
    X86_64,
    /// 32-bit x86.
    #[serde(rename = "i386")]
    I386,
    /// 64-bit ARM.
    #[serde(rename = "arm64")]
    Arm64,
}

impl Architecture {
    /// The wire form, e.g. `x86_64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::I386 => "i386",
            Self::Arm64 => "arm64",
        }
    }
}

/// Lifecycle state of an image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// Registered; not yet verified.
    #[default]
    Pending,
    /// Verified and launchable.
    Available,
    /// Could not be fetched or verified; see the conditions.
    Failed,
}

impl ImageState {
    /// The wire form, e.g. `available`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Available => "available",
            Self::Failed => "failed",
        }
    }
}

/// Observed state of an image; reserved: nothing writes it yet (DescribeImages shows
/// `available` while it is unset).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// `pending`, `available` or `failed`.
    #[serde(default)]
    pub state: ImageState,
    /// Size of the image file in bytes, once known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size_bytes: Option<u64>,
    /// The `metadata.generation` this status was computed from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub observed_generation: Option<i64>,
    /// Current conditions of the image, e.g. `Ready`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub conditions: Vec<Condition>,
}

impl Validate for ImageSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        let name_ok = (3..=128).contains(&self.name.chars().count())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c));
        if !name_ok {
            return Err(ValidationError::invalid(
                "spec.name",
                "be 3 to 128 letters, digits or ()[] ./-'@_",
            ));
        }
        if let Some(description) = &self.description {
            check_text("spec.description", description, 255)?;
        }
        // A path on the node may hold spaces (a state directory such as `/srv/my cloud`); a
        // URL or bucket/key may not, nor anything other whitespace or control characters.
        let is_path = self.image_location.starts_with('/');
        if self.image_location.is_empty()
            || self.image_location.len() > 2048
            || self
                .image_location
                .chars()
                .any(|c| (c.is_whitespace() && !(is_path && c == ' ')) || c.is_control())
        {
            return Err(ValidationError::invalid(
                "spec.imageLocation",
                "be a URL or bucket/key without spaces, or an absolute path",
            ));
        }
        if let Some(sum) = &self.checksum_sha256 {
            if sum.len() != 64
                || !sum
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(ValidationError::invalid(
                    "spec.checksumSha256",
                    "be 64 lowercase hex digits",
                ));
            }
        }
        let device_ok = self
            .root_device_name
            .strip_prefix("/dev/")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric()));
        if !device_ok {
            return Err(ValidationError::invalid(
                "spec.rootDeviceName",
                "look like /dev/vda",
            ));
        }
        check_boot_ids(self.kernel_id.as_deref(), self.ramdisk_id.as_deref())?;
        if self.ramdisk_id.is_some() && self.kernel_id.is_none() {
            return Err(ValidationError::invalid(
                "spec.ramdiskId",
                "come with spec.kernelId",
            ));
        }
        for (i, account) in self.launch_permissions.iter().enumerate() {
            if !is_valid_account_id(account) {
                return Err(ValidationError::invalid(
                    format!("spec.launchPermissions[{i}]"),
                    "be a 12-digit account ID",
                ));
            }
        }
        check_tags("spec.tags", &self.tags)
    }
}

impl Validate for ImageStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presigned_url_names_the_stored_bytes_it_reads() {
        let rows = [
            (
                "https://gw:8773/b/k?X-Amz-Date=1&x-karri-object-content=ab12&X-Amz-Signature=f",
                Some("ab12"),
            ),
            (
                "https://gw:8773/b/k?x-karri-object-content=ab12",
                Some("ab12"),
            ),
            ("https://gw:8773/b/k?X-Amz-Date=1&X-Amz-Signature=f", None),
            ("https://gw:8773/b/k?x-karri-object-content=", None),
            ("https://gw:8773/b/x-karri-object-content=ab12", None),
        ];
        for (url, want) in rows {
            assert_eq!(presigned_content(url), want, "{url}");
        }
    }

    #[test]
    fn s3_locations_are_a_valid_bucket_and_a_key() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("images/micro/disk.img", Some(("images", "micro/disk.img"))),
            ("s3://images/disk.img", Some(("images", "disk.img"))),
            ("my.bucket-1/k", Some(("my.bucket-1", "k"))),
            ("images/a b+c.img", Some(("images", "a b+c.img"))),
            ("/var/lib/images/disk.img", None),
            ("s3:///images/disk.img", None),
            ("https://example.com/disk.img", None),
            ("http://example.com/disk.img", None),
            ("ftp://example.com/disk.img", None),
            ("s3://images/nested://x", None),
            ("images/", None),
            ("images", None),
            ("s3://images", None),
            ("Bad_Bucket/disk.img", None),
            ("ab/disk.img", None),
            ("192.168.1.1/disk.img", None),
            ("", None),
        ];
        for (location, want) in cases {
            assert_eq!(s3_location(location), *want, "{location:?}");
        }
    }
}
