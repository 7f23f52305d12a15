//! The error of the EC2 face: an AWS error code, a message and the HTTP status, rendered in the
//! shape EC2 uses (and botocore's `EC2QueryParser` reads):
//!
//! ```text
//! <?xml version="1.0" encoding="UTF-8"?>
//! <Response><Errors><Error><Code>…</Code><Message>…</Message></Error></Errors><RequestID>…</RequestID></Response>
//! ```
//!
//! Codes and statuses follow the EC2 API reference ("Error codes for the Amazon EC2 API" and the
//! common errors of AWS query APIs). Client errors are 4xx; the few server errors (5xx) have their
//! own constructors so that they are only ever produced deliberately.

use std::borrow::Cow;

use super::xml::Response;

/// A failed EC2 call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Ec2Error {
    /// The AWS error code, e.g. `InvalidInstanceID.NotFound`.
    pub code: Cow<'static, str>,
    /// The message for people.
    pub message: String,
    /// The HTTP status the response is sent with.
    pub status: u16,
}

/// Formats a list of ids the way EC2 messages do: `'a'` for one, `'a, b'` for several.
fn quoted_ids(ids: &[&str]) -> String {
    format!("'{}'", ids.join(", "))
}

impl Ec2Error {
    /// Any code, status and message.
    pub fn new(
        code: impl Into<Cow<'static, str>>,
        status: u16,
        message: impl Into<String>,
    ) -> Self {
        Ec2Error {
            code: code.into(),
            message: message.into(),
            status,
        }
    }

    fn client(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(code, 400, message)
    }

    /// Whether this is a server error (5xx), which SDKs retry.
    pub fn is_server_error(&self) -> bool {
        self.status >= 500
    }

    /// The error document, exactly in EC2's shape, with the text escaped.
    pub fn to_xml(&self, request_id: &str) -> String {
        let mut doc = Response::document("Response");
        doc.open("Errors")
            .open("Error")
            .leaf("Code", &self.code)
            .leaf("Message", &self.message)
            .close()
            .close()
            .leaf("RequestID", request_id);
        doc.finish()
    }

    // ----- The request itself -------------------------------------------------------------

    /// `MissingAction` (400): no `Action` parameter.
    pub fn missing_action() -> Self {
        Self::client(
            "MissingAction",
            "The request must contain the parameter Action",
        )
    }

    /// `InvalidAction` (400): an action name EC2 does not have.
    pub fn invalid_action(action: &str) -> Self {
        Self::client(
            "InvalidAction",
            format!("The action {action} is not valid for this web service."),
        )
    }

    /// `UnsupportedOperation` (400) for a real EC2 action Karri does not implement yet.
    pub fn unsupported_action(action: &str) -> Self {
        Self::unsupported_operation(format!(
            "The action {action} is not supported by Karri yet."
        ))
    }

    /// `UnsupportedOperation` (400) for a real EC2 parameter Karri does not implement yet.
    pub fn unsupported_parameter(name: &str) -> Self {
        Self::unsupported_operation(format!(
            "The parameter {name} is not supported by Karri yet."
        ))
    }

    /// `UnsupportedOperation` (400) with any message.
    pub fn unsupported_operation(message: impl Into<String>) -> Self {
        Self::client("UnsupportedOperation", message)
    }

    /// `MissingParameter` (400): "The request must contain the parameter X".
    pub fn missing_parameter(name: &str) -> Self {
        Self::client(
            "MissingParameter",
            format!("The request must contain the parameter {name}"),
        )
    }

    /// `InvalidParameterValue` (400) with any message.
    pub fn invalid_parameter_value(message: impl Into<String>) -> Self {
        Self::client("InvalidParameterValue", message)
    }

    /// `InvalidParameterValue` (400) in EC2's usual wording:
    /// "Value (v) for parameter P is invalid. {reason}".
    pub fn invalid_value(name: &str, value: &str, reason: &str) -> Self {
        let message = if reason.is_empty() {
            format!("Value ({value}) for parameter {name} is invalid.")
        } else {
            format!("Value ({value}) for parameter {name} is invalid. {reason}")
        };
        Self::invalid_parameter_value(message)
    }

    /// `InvalidParameterValue` (400) for an unknown instance type: "Invalid value 'x' for InstanceType."
    pub fn invalid_instance_type(instance_type: &str) -> Self {
        Self::invalid_parameter_value(format!("Invalid value '{instance_type}' for InstanceType."))
    }

    /// `InvalidParameterValue` (400) for a filter name the action does not know.
    pub fn invalid_filter(name: &str) -> Self {
        Self::invalid_parameter_value(format!("The filter '{name}' is invalid"))
    }

    /// `InvalidParameter` (400) with any message.
    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::client("InvalidParameter", message)
    }

    /// `InvalidParameterCombination` (400) with any message.
    pub fn invalid_parameter_combination(message: impl Into<String>) -> Self {
        Self::client("InvalidParameterCombination", message)
    }

    /// `UnknownParameter` (400): a parameter the action does not have.
    pub fn unknown_parameter(name: &str) -> Self {
        Self::client(
            "UnknownParameter",
            format!("The parameter {name} is not recognized"),
        )
    }

    /// `InvalidQueryParameter` (400): a parameter the query string cannot carry (too many, a name
    /// too long …).
    pub fn invalid_query_parameter(message: impl Into<String>) -> Self {
        Self::client("InvalidQueryParameter", message)
    }

    /// `MalformedQueryString` (400): the form does not decode (bad `%` escape, not UTF-8).
    /// AWS's common-errors table gives 404 for this code; Karri answers 400 since the endpoint
    /// exists and the request is at fault.
    pub fn malformed_query_string(detail: &str) -> Self {
        Self::client(
            "MalformedQueryString",
            format!("The query string contains a syntax error: {detail}"),
        )
    }

    /// `InvalidNextToken` (400): a pagination token that is not one Karri handed out, or expired.
    pub fn invalid_next_token() -> Self {
        Self::client("InvalidNextToken", "The specified NextToken is not valid.")
    }

    /// `IdempotentParameterMismatch` (400): a `ClientToken` reused with different parameters.
    pub fn idempotent_parameter_mismatch() -> Self {
        Self::client(
            "IdempotentParameterMismatch",
            "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
        )
    }

    /// `DryRunOperation` (412): the request would have succeeded.
    pub fn dry_run_operation() -> Self {
        Self::new(
            "DryRunOperation",
            412,
            "Request would have succeeded, but DryRun flag is set.",
        )
    }

    // ----- Authentication and authorization -------------------------------------------------

    /// `UnauthorizedOperation` (403): authenticated, but not allowed to do this.
    pub fn unauthorized_operation() -> Self {
        Self::new(
            "UnauthorizedOperation",
            403,
            "You are not authorized to perform this operation.",
        )
    }

    /// `AuthFailure` (401): the credentials could not be validated (unknown access key …).
    pub fn auth_failure() -> Self {
        Self::new(
            "AuthFailure",
            401,
            "AWS was not able to validate the provided access credentials",
        )
    }

    /// `SignatureDoesNotMatch` (403).
    pub fn signature_does_not_match() -> Self {
        Self::new(
            "SignatureDoesNotMatch",
            403,
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
        )
    }

    /// `RequestExpired` (400): the signature's date is too far from now, or a presigned URL expired.
    pub fn request_expired(message: impl Into<String>) -> Self {
        Self::client("RequestExpired", message)
    }

    /// `MissingAuthenticationToken` (401): the request is not signed at all. (AWS's common-errors
    /// table says 403; EC2 answers unsigned requests with 401, and so does Karri.)
    pub fn missing_authentication_token() -> Self {
        Self::new(
            "MissingAuthenticationToken",
            401,
            "The request must contain either a valid (registered) AWS access key ID or X.509 certificate.",
        )
    }

    /// `IncompleteSignature` (400): a SigV4 header or query signature lacks a part.
    pub fn incomplete_signature(message: impl Into<String>) -> Self {
        Self::client("IncompleteSignature", message)
    }

    /// `OptInRequired` (403): the account may not use the service.
    pub fn opt_in_required() -> Self {
        Self::new(
            "OptInRequired",
            403,
            "You are not subscribed to this service. Please contact your cloud administrator.",
        )
    }

    // ----- Resources --------------------------------------------------------------------------

    /// `InvalidInstanceID.Malformed` (400): `Invalid id: "i-123"`.
    pub fn instance_id_malformed(id: &str) -> Self {
        Self::client(
            "InvalidInstanceID.Malformed",
            format!("Invalid id: \"{id}\""),
        )
    }

    /// `InvalidInstanceID.NotFound` (400) for one or more ids.
    pub fn instance_not_found(ids: &[&str]) -> Self {
        let message = if ids.len() == 1 {
            format!("The instance ID {} does not exist", quoted_ids(ids))
        } else {
            format!("The instance IDs {} do not exist", quoted_ids(ids))
        };
        Self::client("InvalidInstanceID.NotFound", message)
    }

    /// `InvalidAMIID.Malformed` (400): `Invalid id: "ami-xyz"`.
    pub fn image_id_malformed(id: &str) -> Self {
        Self::client("InvalidAMIID.Malformed", format!("Invalid id: \"{id}\""))
    }

    /// `InvalidAMIID.NotFound` (400) for one or more ids.
    pub fn image_not_found(ids: &[&str]) -> Self {
        Self::client(
            "InvalidAMIID.NotFound",
            format!("The image id '[{}]' does not exist", ids.join(", ")),
        )
    }

    /// `InvalidAMIName.Malformed` (400): an image name outside EC2's rules.
    pub fn image_name_malformed() -> Self {
        Self::client(
            "InvalidAMIName.Malformed",
            "AMI names must be between 3 and 128 characters long, and may contain letters, numbers, '(', ')', '[', ']', ' ', '.', '/', '-', ''', '@' and '_'",
        )
    }

    /// `InvalidAMIName.Duplicate` (400): the account already has an image with that name
    /// (`holder`, when known).
    pub fn image_name_duplicate(name: &str, holder: Option<&str>) -> Self {
        let by = holder.map_or_else(|| "another AMI".to_string(), |id| format!("AMI {id}"));
        Self::client(
            "InvalidAMIName.Duplicate",
            format!("AMI name {name} is already in use by {by}"),
        )
    }

    /// `InvalidKeyPair.NotFound` (400).
    pub fn key_pair_not_found(name: &str) -> Self {
        Self::client(
            "InvalidKeyPair.NotFound",
            format!("The key pair '{name}' does not exist"),
        )
    }

    /// `InvalidKeyPair.Duplicate` (400).
    pub fn key_pair_duplicate(name: &str) -> Self {
        Self::client(
            "InvalidKeyPair.Duplicate",
            format!("The keypair '{name}' already exists."),
        )
    }

    /// `InvalidKeyPair.Format` (400): imported key material that is not an OpenSSH public key.
    pub fn key_pair_format() -> Self {
        Self::client(
            "InvalidKeyPair.Format",
            "Key is not in valid OpenSSH public key format",
        )
    }

    /// `InvalidID` (400): a resource id of no known kind (CreateTags, DeleteTags …).
    pub fn invalid_id(id: &str) -> Self {
        Self::client("InvalidID", format!("The ID '{id}' is not valid"))
    }

    /// `InvalidGroupId.Malformed` (400).
    pub fn group_id_malformed(id: &str) -> Self {
        Self::client("InvalidGroupId.Malformed", format!("Invalid id: \"{id}\""))
    }

    /// `InvalidGroup.NotFound` (400).
    pub fn group_not_found(group: &str) -> Self {
        Self::client(
            "InvalidGroup.NotFound",
            format!("The security group '{group}' does not exist"),
        )
    }

    /// `InvalidVpcID.Malformed` (400).
    pub fn vpc_id_malformed(id: &str) -> Self {
        Self::client("InvalidVpcID.Malformed", format!("Invalid id: \"{id}\""))
    }

    /// `InvalidVpcID.NotFound` (400).
    pub fn vpc_not_found(id: &str) -> Self {
        Self::client(
            "InvalidVpcID.NotFound",
            format!("The vpc ID '{id}' does not exist"),
        )
    }

    /// `InvalidAddress.NotFound` (400): an elastic IP address that does not exist.
    pub fn address_not_found(ip: &str) -> Self {
        Self::client(
            "InvalidAddress.NotFound",
            format!("Address '{ip}' not found."),
        )
    }

    /// `InvalidAllocationID.NotFound` (400): an elastic IP allocation that does not exist.
    pub fn allocation_not_found(id: &str) -> Self {
        Self::client(
            "InvalidAllocationID.NotFound",
            format!("The allocation ID '{id}' does not exist"),
        )
    }

    /// `InvalidSubnetID.Malformed` (400).
    pub fn subnet_id_malformed(id: &str) -> Self {
        Self::client("InvalidSubnetID.Malformed", format!("Invalid id: \"{id}\""))
    }

    /// `InvalidSubnetID.NotFound` (400).
    pub fn subnet_not_found(id: &str) -> Self {
        Self::client(
            "InvalidSubnetID.NotFound",
            format!("The subnet ID '{id}' does not exist"),
        )
    }

    /// `InvalidSnapshotID.Malformed` (400).
    pub fn snapshot_id_malformed(id: &str) -> Self {
        Self::client(
            "InvalidSnapshotID.Malformed",
            format!("Invalid id: \"{id}\""),
        )
    }

    /// `InvalidSnapshot.NotFound` (400).
    pub fn snapshot_not_found(id: &str) -> Self {
        Self::client(
            "InvalidSnapshot.NotFound",
            format!("The snapshot '{id}' does not exist."),
        )
    }

    /// `InvalidZone.NotFound` (400).
    pub fn zone_not_found(zone: &str) -> Self {
        Self::client(
            "InvalidZone.NotFound",
            format!("The zone '{zone}' does not exist."),
        )
    }

    /// `InvalidParameterValue` (400) for an unknown region name.
    pub fn invalid_region(region: &str) -> Self {
        Self::invalid_parameter_value(format!("Invalid region: {region}"))
    }

    /// `IncorrectInstanceState` (400), e.g. "The instance 'i-…' is not in a state from which it
    /// can be started."
    pub fn incorrect_instance_state(message: impl Into<String>) -> Self {
        Self::client("IncorrectInstanceState", message)
    }

    /// `InstanceLimitExceeded` (400): the account's instance quota would be exceeded.
    pub fn instance_limit_exceeded(message: impl Into<String>) -> Self {
        Self::client("InstanceLimitExceeded", message)
    }

    /// `TagLimitExceeded` (400): more than 50 tags on one resource.
    pub fn tag_limit_exceeded() -> Self {
        Self::client(
            "TagLimitExceeded",
            "The maximum number of Tags for a resource has been reached.",
        )
    }

    /// `ResourceLimitExceeded` (400): some other per-account quota.
    pub fn resource_limit_exceeded(message: impl Into<String>) -> Self {
        Self::client("ResourceLimitExceeded", message)
    }

    // ----- Server errors (only ever produced deliberately) -------------------------------------

    /// `InsufficientInstanceCapacity` (500, a server error in EC2): no node can take the instances.
    pub fn insufficient_instance_capacity(message: impl Into<String>) -> Self {
        Self::new("InsufficientInstanceCapacity", 500, message)
    }

    /// `InternalError` (500).
    pub fn internal_error() -> Self {
        Self::new("InternalError", 500, "An internal error has occurred")
    }

    /// `ServiceUnavailable` (503): a dependency (etcd …) is down; SDKs retry.
    pub fn service_unavailable() -> Self {
        Self::new(
            "ServiceUnavailable",
            503,
            "The service is unavailable. Try again later.",
        )
    }

    /// `RequestLimitExceeded` (503): throttled; SDKs back off and retry.
    pub fn request_limit_exceeded() -> Self {
        Self::new("RequestLimitExceeded", 503, "Request limit exceeded.")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_error_document_has_exactly_the_ec2_shape() {
        let xml = Ec2Error::instance_id_malformed("i-123").to_xml("req-1");
        assert_eq!(
            xml,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <Response><Errors><Error><Code>InvalidInstanceID.Malformed</Code>\
             <Message>Invalid id: &quot;i-123&quot;</Message></Error></Errors>\
             <RequestID>req-1</RequestID></Response>"
        );
    }

    #[test]
    fn messages_and_request_ids_are_escaped() {
        let xml = Ec2Error::invalid_action("<Foo&Bar>").to_xml("a<b");
        assert!(xml.contains(
            "<Message>The action &lt;Foo&amp;Bar&gt; is not valid for this web service.</Message>"
        ));
        assert!(xml.contains("<RequestID>a&lt;b</RequestID>"));
    }

    #[test]
    fn codes_statuses_and_messages_follow_aws() {
        let rows: Vec<(Ec2Error, &str, u16, &str)> = vec![
            (
                Ec2Error::missing_action(),
                "MissingAction",
                400,
                "The request must contain the parameter Action",
            ),
            (
                Ec2Error::invalid_action("Foo"),
                "InvalidAction",
                400,
                "The action Foo is not valid for this web service.",
            ),
            (
                Ec2Error::unsupported_action("CreateVolume"),
                "UnsupportedOperation",
                400,
                "The action CreateVolume is not supported by Karri yet.",
            ),
            (
                Ec2Error::missing_parameter("ImageId"),
                "MissingParameter",
                400,
                "The request must contain the parameter ImageId",
            ),
            (
                Ec2Error::invalid_value("MaxCount", "0", "Expected a positive integer."),
                "InvalidParameterValue",
                400,
                "Value (0) for parameter MaxCount is invalid. Expected a positive integer.",
            ),
            (
                Ec2Error::invalid_filter("foo"),
                "InvalidParameterValue",
                400,
                "The filter 'foo' is invalid",
            ),
            (
                Ec2Error::unknown_parameter("Foo"),
                "UnknownParameter",
                400,
                "The parameter Foo is not recognized",
            ),
            (
                Ec2Error::dry_run_operation(),
                "DryRunOperation",
                412,
                "Request would have succeeded, but DryRun flag is set.",
            ),
            (
                Ec2Error::unauthorized_operation(),
                "UnauthorizedOperation",
                403,
                "You are not authorized to perform this operation.",
            ),
            (
                Ec2Error::auth_failure(),
                "AuthFailure",
                401,
                "AWS was not able to validate the provided access credentials",
            ),
            (
                Ec2Error::instance_id_malformed("i-123"),
                "InvalidInstanceID.Malformed",
                400,
                "Invalid id: \"i-123\"",
            ),
            (
                Ec2Error::instance_not_found(&["i-1234567890abcdef0"]),
                "InvalidInstanceID.NotFound",
                400,
                "The instance ID 'i-1234567890abcdef0' does not exist",
            ),
            (
                Ec2Error::instance_not_found(&["i-12345678", "i-87654321"]),
                "InvalidInstanceID.NotFound",
                400,
                "The instance IDs 'i-12345678, i-87654321' do not exist",
            ),
            (
                Ec2Error::image_not_found(&["ami-12345678"]),
                "InvalidAMIID.NotFound",
                400,
                "The image id '[ami-12345678]' does not exist",
            ),
            (
                Ec2Error::key_pair_not_found("k"),
                "InvalidKeyPair.NotFound",
                400,
                "The key pair 'k' does not exist",
            ),
            (
                Ec2Error::key_pair_duplicate("k"),
                "InvalidKeyPair.Duplicate",
                400,
                "The keypair 'k' already exists.",
            ),
            (
                Ec2Error::invalid_id("foo-1"),
                "InvalidID",
                400,
                "The ID 'foo-1' is not valid",
            ),
            (
                Ec2Error::invalid_instance_type("x1.huge"),
                "InvalidParameterValue",
                400,
                "Invalid value 'x1.huge' for InstanceType.",
            ),
        ];
        for (err, code, status, message) in rows {
            assert_eq!(
                (err.code.as_ref(), err.status, err.message.as_str()),
                (code, status, message)
            );
        }
    }

    #[test]
    fn only_the_server_error_constructors_give_5xx() {
        let server = [
            Ec2Error::insufficient_instance_capacity("no capacity"),
            Ec2Error::internal_error(),
            Ec2Error::service_unavailable(),
            Ec2Error::request_limit_exceeded(),
        ];
        assert!(server.iter().all(Ec2Error::is_server_error));
        let client = [
            Ec2Error::invalid_parameter_value("x"),
            Ec2Error::incorrect_instance_state("x"),
            Ec2Error::instance_limit_exceeded("x"),
            Ec2Error::signature_does_not_match(),
            Ec2Error::missing_authentication_token(),
            Ec2Error::request_expired("x"),
        ];
        assert!(client.iter().all(|e| !e.is_server_error()));
        assert_eq!(Ec2Error::insufficient_instance_capacity("x").status, 500);
        assert_eq!(Ec2Error::request_limit_exceeded().status, 503);
    }
}
