//! `Account`: a tenant, owning one namespace that holds its namespaced records.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::validation::{check_text, is_valid_account_id, Validate, ValidationError};

/// Desired state of an account, set by administrators.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[kube(
    group = "karri.dev",
    version = "v1alpha1",
    kind = "Account",
    plural = "accounts",
    singular = "account",
    shortname = "acct",
    category = "karri",
    status = "AccountStatus",
    derive = "PartialEq",
    doc = "A Karri account (tenant). Its instances, images and other namespaced records live in the namespace named by status.namespace.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".metadata.labels.karri\\.dev/id",
        description = "Karri ID of the record"
    ),
    printcolumn(
        name = "Account ID",
        type_ = "string",
        json_path = ".status.accountId",
        description = "12-digit AWS account id"
    ),
    printcolumn(
        name = "Namespace",
        type_ = "string",
        json_path = ".status.namespace",
        description = "Namespace holding the account's records"
    ),
    printcolumn(
        name = "Display Name",
        type_ = "string",
        json_path = ".spec.displayName"
    ),
    printcolumn(
        name = "Email",
        type_ = "string",
        json_path = ".spec.email",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AccountSpec {
    /// Human-friendly name of the account, e.g. the team or customer name.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub display_name: Option<String>,
    /// Contact email address of the account owner.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub email: Option<String>,
}

/// Observed state of an account, written by the gateway and operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccountStatus {
    /// The 12-digit AWS account id (e.g. `123456789012`) that EC2 responses show as owner.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub account_id: Option<String>,
    /// The namespace the account's namespaced records live in.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    /// Current conditions of the account, e.g. `Ready`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub conditions: Vec<Condition>,
}

impl Validate for AccountSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(name) = &self.display_name {
            check_text("spec.displayName", name, 128)?;
        }
        if let Some(email) = &self.email {
            let ok = email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && domain.contains('.') && !domain.starts_with('.')
            }) && !email.chars().any(char::is_whitespace)
                && email.len() <= 254;
            if !ok {
                return Err(ValidationError::invalid(
                    "spec.email",
                    "be an email address such as ops@example.com",
                ));
            }
        }
        Ok(())
    }
}

/// The account ID EC2 shows as the owner of the administrators' images (those of a system
/// namespace such as `karri-images`, which is no account's); no account may have it.
pub const SYSTEM_ACCOUNT_ID: &str = "000000000000";

impl Validate for AccountStatus {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(id) = &self.account_id {
            if !is_valid_account_id(id) {
                return Err(ValidationError::invalid(
                    "status.accountId",
                    "be 12 digits such as 123456789012",
                ));
            }
            if id == SYSTEM_ACCOUNT_ID {
                return Err(ValidationError::invalid(
                    "status.accountId",
                    "not be 000000000000, the owner shown for the administrators' images",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_id_is_twelve_digits_and_never_the_administrators_images_owner() {
        let with_id = |id: &str| AccountStatus {
            account_id: Some(id.to_owned()),
            ..AccountStatus::default()
        };
        assert!(with_id("123456789012").validate().is_ok());
        assert!(with_id("012345678901").validate().is_ok());
        assert!(with_id("12345678901").validate().is_err());
        let reserved = with_id(SYSTEM_ACCOUNT_ID).validate().expect_err("reserved");
        assert!(
            reserved.to_string().contains("administrators"),
            "{reserved}"
        );
    }
}
