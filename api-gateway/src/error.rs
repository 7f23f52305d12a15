//! The one error type of the resource API, rendered as a Kubernetes `Status`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A failed API call: HTTP code, Kubernetes reason and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Kubernetes `StatusReason` (`NotFound`, `Conflict`, `Invalid` …).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Optional details: the kind and name the error is about, and field causes.
    pub details: Option<Box<StatusDetails>>,
    /// A continue token the `Status` carries in its `metadata` (a list whose own token expired
    /// goes on with it, inconsistently).
    pub list_continue: Option<String>,
}

/// The words that begin a failed precondition's account, as in Kubernetes.
const PRECONDITION_FAILED: &str = "Precondition failed:";

/// The cause reason of [`ApiError::insufficient_capacity`].
const INSUFFICIENT_CAPACITY: &str = "InsufficientCapacity";

/// The `details` of a Kubernetes `Status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusDetails {
    /// Name of the object, if any.
    pub name: String,
    /// API group.
    pub group: String,
    /// Resource plural.
    pub kind: String,
    /// Field-level causes: (field, message).
    pub causes: Vec<(String, String)>,
    /// The `reason` of every cause; when empty, each cause's own, read from its words.
    pub cause_reason: &'static str,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            list_continue: None,
        }
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    /// 401 Unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "Unauthorized", message)
    }
    /// 403 Forbidden.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }
    /// 404 NotFound with a message of its own (something that is not a record, such as a
    /// bucket an image names).
    pub fn not_found_message(message: impl Into<String>) -> Self {
        Self::new(404, "NotFound", message)
    }
    /// 404 NotFound for a named object.
    pub fn not_found(plural: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{plural}.{} \"{name}\" not found", crds::GROUP),
        )
        .with_details(plural, name)
    }
    /// 404 NotFound for a path that serves nothing.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }
    /// 405 MethodNotAllowed.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    /// 406 NotAcceptable: the `Accept` header names no media the gateway serves (for a watch,
    /// when `watch`), in kube-apiserver's words.
    pub fn not_acceptable(watch: bool) -> Self {
        let served = if watch {
            "application/json;stream=watch"
        } else {
            "application/json, application/yaml"
        };
        Self::new(
            406,
            "NotAcceptable",
            format!("only the following media types are accepted: {served}"),
        )
    }
    /// 409 AlreadyExists.
    pub fn already_exists(plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{plural}.{} \"{name}\" already exists", crds::GROUP),
        )
        .with_details(plural, name)
    }
    /// 409 AlreadyExists because a unique value (`what`) another record holds was asked for.
    pub fn taken(plural: &str, name: &str, what: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!(
                "{plural}.{} {name:?} cannot be created: {what} is already taken",
                crds::GROUP
            ),
        )
        .with_details(plural, name)
    }
    /// 409 Conflict on a stale resourceVersion.
    pub fn conflict(plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {plural}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                crds::GROUP
            ),
        )
        .with_details(plural, name)
    }
    /// 409 Conflict: a delete's or update's precondition (`what`: `UID` or `ResourceVersion`)
    /// names `asked`, the record has `found`; worded as kube-apiserver frames it.
    pub fn precondition_failed(
        plural: &str,
        name: &str,
        what: &str,
        asked: &str,
        found: &str,
    ) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {plural}.{} \"{name}\": {PRECONDITION_FAILED} {what} in precondition: {asked}, {what} in object meta: {found}",
                crds::GROUP
            ),
        )
        .with_details(plural, name)
    }
    /// Whether this is [`ApiError::precondition_failed`] for a UID.
    pub fn is_uid_precondition_failure(&self) -> bool {
        self.code == 409
            && self
                .message
                .contains(&format!("{PRECONDITION_FAILED} UID in precondition"))
    }
    /// 409 Conflict with a custom message (server-side apply conflicts).
    pub fn conflict_message(message: impl Into<String>) -> Self {
        Self::new(409, "Conflict", message)
    }
    /// 409 Conflict for a server-side apply that would change fields other managers own,
    /// `(manager, field)` each (the manager as [`crate::ssa::describe_manager`] names it, the
    /// field dotted, `.spec.instanceType`), as kube-apiserver answers it: its message, and a
    /// `FieldManagerConflict` cause for each field.
    pub fn apply_conflict(conflicts: &[(String, String)]) -> Self {
        let message = match conflicts {
            [(manager, field)] => {
                format!("Apply failed with 1 conflict: conflict with {manager}: {field}")
            }
            _ => {
                let mut by_manager: std::collections::BTreeMap<&str, Vec<&str>> =
                    std::collections::BTreeMap::new();
                for (manager, field) in conflicts {
                    by_manager.entry(manager).or_default().push(field);
                }
                let lines: Vec<String> = by_manager
                    .iter()
                    .flat_map(|(manager, fields)| {
                        std::iter::once(format!("conflicts with {manager}:"))
                            .chain(fields.iter().map(|f| format!("- {f}")))
                    })
                    .collect();
                format!(
                    "Apply failed with {} conflicts: {}",
                    conflicts.len(),
                    lines.join("\n")
                )
            }
        };
        let mut e = Self::new(409, "Conflict", message);
        e.details = Some(Box::new(StatusDetails {
            causes: conflicts
                .iter()
                .map(|(manager, field)| (field.clone(), format!("conflict with {manager}")))
                .collect(),
            cause_reason: "FieldManagerConflict",
            ..StatusDetails::default()
        }));
        e
    }
    /// 410 Gone: the requested resourceVersion is compacted away.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    /// 410 Expired for a list continued from a revision compacted away, as kube-apiserver
    /// answers it: with `list_continue`, a token that goes on from where the expired one would
    /// have, at the latest revision.
    pub fn continue_expired(list_continue: String) -> Self {
        let mut e = Self::gone(
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
        );
        e.list_continue = Some(list_continue);
        e
    }
    /// 413 RequestEntityTooLarge.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }
    /// 413 RequestEntityTooLarge for a JSON patch of `ops` operations, more than `max`, as
    /// kube-apiserver answers it.
    pub fn too_many_patch_operations(ops: usize, max: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("The allowed maximum operations in a JSON patch is {max}, got {ops}"),
        )
    }
    /// 415 UnsupportedMediaType.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::media_type_refused(content_type, "application/json, application/yaml")
    }
    /// 415 for a PATCH whose body is not one of the patch types custom resources take (a
    /// strategic merge patch among them), worded as kube-apiserver words it.
    pub fn unsupported_patch_type(content_type: &str) -> Self {
        Self::media_type_refused(
            content_type,
            "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        )
    }
    fn media_type_refused(content_type: &str, accepted: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: {accepted} (got {content_type:?})"),
        )
    }
    /// 422 Invalid, with field causes.
    pub fn invalid(kind: &str, name: &str, causes: Vec<(String, String)>) -> Self {
        Self::invalid_in(crds::GROUP, kind, name, causes)
    }
    /// 422 Invalid for a request's options (`CreateOptions`, `UpdateOptions`, `PatchOptions`,
    /// `DeleteOptions` of group `meta.k8s.io`), as kube-apiserver answers a bad `dryRun`,
    /// `fieldValidation`, `propagationPolicy` or `fieldManager`.
    /// `cause_reason` is Kubernetes' cause type (`FieldValueNotSupported`, `FieldValueRequired`,
    /// `FieldValueForbidden` …); `message` starts as Kubernetes words it (`Unsupported value: …`).
    pub fn invalid_options(
        kind: &str,
        field: &str,
        cause_reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::invalid_in(
            "meta.k8s.io",
            kind,
            "",
            vec![(field.to_string(), message.into())],
        );
        if let Some(details) = e.details.as_mut() {
            details.cause_reason = cause_reason;
        }
        e
    }
    fn invalid_in(group: &str, kind: &str, name: &str, causes: Vec<(String, String)>) -> Self {
        let summary = causes
            .iter()
            .map(|(field, msg)| {
                if field.is_empty() || msg.starts_with(field.as_str()) {
                    msg.clone()
                } else {
                    format!("{field}: {msg}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{kind}.{group} \"{name}\" is invalid: {summary}"),
        );
        e.details = Some(Box::new(StatusDetails {
            name: name.to_string(),
            group: group.to_string(),
            kind: kind.to_string(),
            causes,
            cause_reason: "",
        }));
        e
    }
    /// 500 InternalError: something went wrong that the caller cannot fix.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }
    /// 503 ServiceUnavailable: etcd could not be reached.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message)
    }
    /// 504 Timeout.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "Timeout", message)
    }
    /// 504 Timeout for a resourceVersion the server has not reached, with the cause client-go
    /// looks for (`ResourceVersionTooLarge`) to list afresh instead of retrying it for ever.
    pub fn resource_version_too_large(message: impl Into<String>) -> Self {
        let mut e = Self::timeout(message);
        e.details = Some(Box::new(StatusDetails {
            causes: vec![(String::new(), "Too large resource version".to_owned())],
            cause_reason: "ResourceVersionTooLarge",
            ..StatusDetails::default()
        }));
        e
    }

    /// 403 Forbidden for an instance type that the instance's node has no room for, as
    /// Kubernetes refuses what a quota does not allow; the EC2 face answers it with
    /// `InsufficientInstanceCapacity` (the cause `InsufficientCapacity` tells it apart).
    pub fn insufficient_capacity(message: impl Into<String>) -> Self {
        let message = message.into();
        let mut e = Self::forbidden(message.clone());
        e.details = Some(Box::new(StatusDetails {
            causes: vec![("spec.instanceType".to_owned(), message)],
            cause_reason: INSUFFICIENT_CAPACITY,
            ..StatusDetails::default()
        }));
        e
    }

    /// Whether this is [`ApiError::insufficient_capacity`].
    pub fn is_insufficient_capacity(&self) -> bool {
        self.details
            .as_ref()
            .is_some_and(|d| d.cause_reason == INSUFFICIENT_CAPACITY)
    }

    fn with_details(mut self, plural: &str, name: &str) -> Self {
        self.details = Some(Box::new(StatusDetails {
            name: name.to_string(),
            group: crds::GROUP.to_string(),
            kind: plural.to_string(),
            causes: Vec::new(),
            cause_reason: "",
        }));
        self
    }

    /// The Kubernetes `Status` object for this error.
    pub fn status(&self) -> serde_json::Value {
        let metadata = match &self.list_continue {
            Some(token) => json!({ "continue": token }),
            None => json!({}),
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": metadata,
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            let mut details = json!({ "name": d.name, "group": d.group, "kind": d.kind });
            if !d.causes.is_empty() {
                details["causes"] = d
                    .causes
                    .iter()
                    .map(|(field, msg)| {
                        let reason = if d.cause_reason.is_empty() {
                            cause_type(field, msg)
                        } else {
                            d.cause_reason
                        };
                        let mut cause = json!({"reason": reason, "message": msg});
                        if !field.is_empty() {
                            cause["field"] = json!(field);
                        }
                        cause
                    })
                    .collect();
            }
            status["details"] = details;
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if code.is_server_error() {
            tracing::warn!(code = self.code, reason = self.reason, "{}", self.message);
        }
        let mut resp = (code, axum::Json(self.status())).into_response();
        if self.code == 413 {
            // The unread rest of the body makes the connection unusable: say so.
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

impl From<etcd_client::Error> for ApiError {
    fn from(e: etcd_client::Error) -> Self {
        let text = e.to_string();
        if text.contains("required revision has been compacted") {
            ApiError::gone(
                "The resourceVersion for the provided list is too old: it has been compacted.",
            )
        } else if text.contains("required revision is a future revision") {
            ApiError::resource_version_too_large(
                "Too large resource version: the server has not seen it yet.",
            )
        } else {
            // The cause (etcd's address, gRPC's words) is the operators' to read, in the log;
            // a client hears only that the store is unavailable, and whether it timed out.
            tracing::warn!(error = %text, "an etcd request failed");
            let why = match &e {
                _ if crate::store::is_deadline_passed(&e) => "it did not answer in time".into(),
                // etcd's own answer (a request too large, too many operations, a timeout):
                // its words, which name nothing of the machine.
                etcd_client::Error::GRpcStatus(status)
                    if status.message().starts_with("etcdserver:") =>
                {
                    status.message().to_string()
                }
                _ => "it cannot be reached".to_string(),
            };
            ApiError::unavailable(format!("etcd is unavailable ({why}); try again"))
        }
    }
}

/// Result of the API layer.
pub type ApiResult<T> = Result<T, ApiError>;

/// The words that begin a field error's message in Kubernetes, with the cause type each one is
/// (`field.ErrorType`).
const CAUSE_TYPES: [(&str, &str); 8] = [
    ("Required value", "FieldValueRequired"),
    ("Unsupported value", "FieldValueNotSupported"),
    ("Too long", "FieldValueTooLong"),
    ("Too many", "FieldValueTooMany"),
    ("Duplicate value", "FieldValueDuplicate"),
    ("Forbidden", "FieldValueForbidden"),
    ("Not found", "FieldValueNotFound"),
    ("Internal error", "InternalError"),
];

/// The cause type of the field error `message` about `field`, read from its words as
/// Kubernetes words them (`Required value`, `Too long: …`), after the field's name when the
/// message begins with it; `FieldValueInvalid` for any other.
fn cause_type(field: &str, message: &str) -> &'static str {
    let body = message
        .strip_prefix(field)
        .and_then(|rest| rest.strip_prefix(": "))
        .filter(|_| !field.is_empty())
        .unwrap_or(message);
    CAUSE_TYPES
        .iter()
        .find(|(words, _)| {
            body.strip_prefix(words)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        })
        .map_or("FieldValueInvalid", |(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apply_conflict_names_each_field_and_its_manager_as_kube_does() {
        let pair = |m: &str, f: &str| (format!("{m:?}"), f.to_string());
        let one = ApiError::apply_conflict(&[pair("kubectl", ".spec.instanceType")]).status();
        assert_eq!(one["code"], 409);
        assert_eq!(one["reason"], "Conflict");
        assert_eq!(
            one["message"],
            "Apply failed with 1 conflict: conflict with \"kubectl\": .spec.instanceType"
        );
        assert_eq!(
            one["details"]["causes"],
            json!([{"reason": "FieldManagerConflict", "message": "conflict with \"kubectl\"",
                    "field": ".spec.instanceType"}])
        );
        // Several: grouped by manager, managers sorted, fields in the order found.
        let many = ApiError::apply_conflict(&[
            pair("m2", ".spec.a"),
            pair("m1", ".metadata.labels.own"),
            pair("m2", ".spec.b"),
        ])
        .status();
        assert_eq!(
            many["message"],
            "Apply failed with 3 conflicts: conflicts with \"m1\":\n- .metadata.labels.own\nconflicts with \"m2\":\n- .spec.a\n- .spec.b"
        );
        assert_eq!(many["details"]["causes"].as_array().map(Vec::len), Some(3));
        assert_eq!(many["details"]["causes"][0]["field"], ".spec.a");
    }

    #[test]
    fn each_field_cause_has_the_type_its_words_name_as_in_kubernetes() {
        let e = ApiError::invalid(
            "Instance",
            "a",
            vec![
                ("spec.imageId".into(), "Required value".into()),
                (
                    "metadata.annotations".into(),
                    "Too long: must have at most 262144 bytes".into(),
                ),
                (
                    "spec.desiredState".into(),
                    "Unsupported value: \"x\": supported values: \"running\"".into(),
                ),
                (
                    "metadata.ownerReferences".into(),
                    "Duplicate value: an owner is named once".into(),
                ),
                (
                    "metadata.finalizers".into(),
                    "Forbidden: no new finalizers can be added if the object is being deleted"
                        .into(),
                ),
                (
                    "spec.imageId".into(),
                    "Invalid value: \"x\": not an image ID".into(),
                ),
                // The field's name first, then the words.
                (
                    "includeObject".into(),
                    "includeObject: Unsupported value: \"y\"".into(),
                ),
                // Words that only begin like a type's are not that type.
                ("spec.x".into(), "Forbiddenness is not a word".into()),
                ("".into(), "Required value".into()),
                ("spec.y".into(), "must be a number".into()),
            ],
        )
        .status();
        let reasons: Vec<&str> = e["details"]["causes"]
            .as_array()
            .expect("causes")
            .iter()
            .map(|c| c["reason"].as_str().expect("a reason"))
            .collect();
        assert_eq!(
            reasons,
            [
                "FieldValueRequired",
                "FieldValueTooLong",
                "FieldValueNotSupported",
                "FieldValueDuplicate",
                "FieldValueForbidden",
                "FieldValueInvalid",
                "FieldValueNotSupported",
                "FieldValueInvalid",
                "FieldValueRequired",
                "FieldValueInvalid",
            ]
        );
        // A type the caller names is every cause's.
        let options = ApiError::invalid_options(
            "CreateOptions",
            "dryRun",
            "FieldValueNotSupported",
            "Required value",
        );
        assert_eq!(
            options.status()["details"]["causes"][0]["reason"],
            "FieldValueNotSupported"
        );
    }

    #[test]
    fn an_unreachable_etcd_is_unavailable_without_naming_its_address() {
        let refused = etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "tcp connect error: 127.0.0.1:2379: Connection refused (os error 111)",
        ));
        let e = ApiError::from(refused);
        assert_eq!(e.code, 503);
        assert_eq!(
            e.message,
            "etcd is unavailable (it cannot be reached); try again"
        );
        let late = ApiError::from(crate::store::deadline_passed());
        assert_eq!(e.code, late.code);
        assert_eq!(
            late.message,
            "etcd is unavailable (it did not answer in time); try again"
        );
    }
}
