//! `KeyPair`: an SSH public key of an account that instances launched with its name receive
//! through the metadata service (the EC2 key pair).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Tag;
use crate::validation::{check_tags, check_text, Validate, ValidationError};

/// Desired state of a key pair: CreateKeyPair and ImportKeyPair write it; the private key of a
/// created pair is returned once and never stored.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "KeyPair",
    namespaced,
    plural = "keypairs",
    singular = "keypair",
    shortname = "kp",
    category = "karri",
    status = "KeyPairStatus",
    derive = "PartialEq",
    doc = "An SSH key pair of an account (the EC2 key pair); its ID (key- and 17 hex digits) is in the karri.dev/id label.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(name = "Key Name", type_ = "string", json_path = ".spec.keyName"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.keyType"),
    printcolumn(
        name = "Fingerprint",
        type_ = "string",
        json_path = ".spec.fingerprint",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KeyPairSpec {
    /// The key pair's name, unique within the account: 1 to 255 ASCII characters.
    pub key_name: String,
    /// The public key in OpenSSH format, e.g. `ssh-ed25519 AAAA...`.
    pub public_key: String,
    /// `rsa` or `ed25519`.
    #[serde(default)]
    pub key_type: KeyType,
    /// Fingerprint as EC2 shows it (SHA-1 of the private key for created RSA pairs, MD5 of the
    /// public key for imported RSA keys, base64 SHA-256 for ed25519).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fingerprint: Option<String>,
    /// EC2 tags.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tags: Vec<Tag>,
}

/// Kind of an SSH key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// RSA.
    #[default]
    Rsa,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// The wire form, e.g. `ed25519`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rsa => "rsa",
            Self::Ed25519 => "ed25519",
        }
    }
}

/// Observed state of a key pair (nothing is observed yet).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyPairStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub observed_generation: Option<i64>,
}

/// Whether `name` is a valid EC2 key pair name: 1 to 255 printable ASCII characters.
pub fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| (0x20..0x7f).contains(&b))
}

impl Validate for KeyPairSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if !is_valid_key_name(&self.key_name) {
            return Err(ValidationError::invalid(
                "spec.keyName",
                "be 1 to 255 printable ASCII characters",
            ));
        }
        let key_ok = self.public_key.len() <= 16 * 1024
            && (self.public_key.starts_with("ssh-rsa ")
                || self.public_key.starts_with("ssh-ed25519 "));
        if !key_ok {
            return Err(ValidationError::invalid(
                "spec.publicKey",
                "be an OpenSSH public key starting with ssh-rsa or ssh-ed25519",
            ));
        }
        if let Some(fp) = &self.fingerprint {
            check_text("spec.fingerprint", fp, 128)?;
        }
        check_tags("spec.tags", &self.tags)
    }
}

impl Validate for KeyPairStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}
