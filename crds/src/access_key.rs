//! `AccessKey`: an AWS-style credential (access key ID and secret) of an account, used to sign
//! EC2 and S3 requests with SigV4.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{check_record_name, check_text, Validate, ValidationError};

/// Desired state of an access key, set by administrators. The gateway generates the key ID and
/// the secret when the record is created; the secret is returned once, in the create response,
/// and stored only sealed (encrypted with the gateway's secrets key).
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "AccessKey",
    plural = "accesskeys",
    singular = "accesskey",
    shortname = "akey",
    category = "karri",
    status = "AccessKeyStatus",
    derive = "PartialEq",
    doc = "An access key of an account: the access key ID and secret that AWS clients sign requests with. The secret is shown once, when the key is created.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(
        name = "Access Key ID",
        type_ = "string",
        json_path = ".status.accessKeyId"
    ),
    printcolumn(name = "Account", type_ = "string", json_path = ".spec.accountName"),
    printcolumn(name = "User", type_ = "string", json_path = ".spec.userName"),
    printcolumn(name = "Active", type_ = "boolean", json_path = ".spec.active"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AccessKeySpec {
    /// Name of the Account the key signs for.
    pub account_name: String,
    /// Name of the account's user the key belongs to (shown in logs), e.g. `admin`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_name: Option<String>,
    /// Whether the key is accepted; an inactive key is refused with `AuthFailure`.
    #[serde(default = "active_by_default")]
    pub active: bool,
    /// What the key is for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
}

fn active_by_default() -> bool {
    true
}

/// Observed state of an access key, written by the gateway when it creates the key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessKeyStatus {
    /// The access key ID, e.g. `AKIK0123456789ABCDEF` (20 characters).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub access_key_id: Option<String>,
    /// The secret access key sealed with the gateway's secrets key (AES-256-GCM, base64 of nonce
    /// and ciphertext). Never the plain secret.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sealed_secret: Option<String>,
    /// UID of the Account the key was made for: a later account of the same name is another
    /// tenant, and the key does not sign for it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub account_uid: Option<String>,
    /// The plain secret access key: present only in the response to the create request, never
    /// stored.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secret_access_key: Option<String>,
}

/// Whether `id` looks like a Karri access key ID: 20 characters, uppercase letters and digits.
pub fn is_valid_access_key_id(id: &str) -> bool {
    id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

impl Validate for AccessKeySpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_record_name("spec.accountName", &self.account_name, "research")?;
        if let Some(user) = &self.user_name {
            check_text("spec.userName", user, 64)?;
        }
        if let Some(description) = &self.description {
            check_text("spec.description", description, 255)?;
        }
        Ok(())
    }
}

impl Validate for AccessKeyStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(id) = &self.access_key_id {
            if !is_valid_access_key_id(id) {
                return Err(ValidationError::invalid(
                    "status.accessKeyId",
                    "be 20 uppercase letters or digits",
                ));
            }
        }
        Ok(())
    }
}
