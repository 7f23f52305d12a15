//! Kubernetes' self-reviews, which `kubectl auth can-i` (with `--list`) and `kubectl auth whoami`
//! send: what the caller may do, answered by the same rules that authorize every request
//! ([`auth::allowed`]), and who the caller is. Pure. A node token's writes of instances are checked per record
//! (only those bound to it): a review, which names no record's binding, answers for the kind.

use serde_json::{json, Value};

use crate::auth::{self, Principal, Target, Verb};
use crate::error::ApiError;
use crate::kinds::Kinds;

/// `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`.
pub const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";

/// `POST /apis/authorization.k8s.io/v1/selfsubjectrulesreviews` (`kubectl auth can-i --list`).
pub const RULES_REVIEWS: &str = "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews";

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: who a bearer token is (kr8s'
/// `whoami` asks so).
pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// `POST /apis/authentication.k8s.io/<version>/selfsubjectreviews` (v1, and the beta and alpha
/// versions older kubectl asks for).
pub fn is_self_review(path: &str) -> bool {
    ["v1", "v1beta1", "v1alpha1"]
        .iter()
        .any(|v| path == format!("/apis/authentication.k8s.io/{v}/selfsubjectreviews"))
}

/// The media type of Kubernetes' protobuf encoding, in which kubectl sends the objects of
/// Kubernetes' own groups (a self-review among them).
pub const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// The prefix of every object in Kubernetes' protobuf encoding.
const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

/// Kubernetes' `runtime.Unknown`: the envelope of an object in protobuf.
#[derive(Clone, PartialEq, prost::Message)]
struct Envelope {
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
}

/// `authorization.k8s.io/v1` SelfSubjectAccessReview, its spec only.
#[derive(Clone, PartialEq, prost::Message)]
struct AccessReview {
    #[prost(message, optional, tag = "2")]
    spec: Option<AccessReviewSpec>,
}

/// `authorization.k8s.io/v1` SelfSubjectRulesReview, its spec only.
#[derive(Clone, PartialEq, prost::Message)]
struct RulesReview {
    #[prost(message, optional, tag = "2")]
    spec: Option<RulesReviewSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RulesReviewSpec {
    #[prost(string, optional, tag = "1")]
    namespace: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AccessReviewSpec {
    #[prost(message, optional, tag = "1")]
    resource_attributes: Option<ResourceAttributes>,
    #[prost(message, optional, tag = "2")]
    non_resource_attributes: Option<NonResourceAttributes>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceAttributes {
    #[prost(string, optional, tag = "1")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
    #[prost(string, optional, tag = "3")]
    group: Option<String>,
    #[prost(string, optional, tag = "4")]
    version: Option<String>,
    #[prost(string, optional, tag = "5")]
    resource: Option<String>,
    #[prost(string, optional, tag = "6")]
    subresource: Option<String>,
    #[prost(string, optional, tag = "7")]
    name: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NonResourceAttributes {
    #[prost(string, optional, tag = "1")]
    path: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
}

fn malformed(why: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the protobuf body is malformed: {why}"))
}

/// The object inside a body in Kubernetes' protobuf encoding, still encoded.
fn protobuf_object(bytes: &[u8]) -> Result<Vec<u8>, ApiError> {
    use prost::Message as _;
    let body = bytes
        .strip_prefix(PROTOBUF_MAGIC)
        .ok_or_else(|| malformed("it does not start with Kubernetes' magic number"))?;
    Ok(Envelope::decode(body)
        .map_err(malformed)?
        .raw
        .unwrap_or_default())
}

/// A SelfSubjectRulesReview in Kubernetes' protobuf encoding, as the JSON object it stands for
/// (its spec: the namespace asked about).
pub fn rules_review_from_protobuf(bytes: &[u8]) -> Result<Value, ApiError> {
    use prost::Message as _;
    let spec = RulesReview::decode(protobuf_object(bytes)?.as_slice())
        .map_err(malformed)?
        .spec
        .unwrap_or_default();
    Ok(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": spec.namespace},
    }))
}

/// A SelfSubjectAccessReview in Kubernetes' protobuf encoding, as the JSON object it stands
/// for (its spec: the attributes a review reads).
pub fn access_review_from_protobuf(bytes: &[u8]) -> Result<Value, ApiError> {
    use prost::Message as _;
    let spec = AccessReview::decode(protobuf_object(bytes)?.as_slice())
        .map_err(malformed)?
        .spec
        .unwrap_or_default();
    let mut out = json!({});
    if let Some(r) = spec.resource_attributes {
        out["resourceAttributes"] = json!({
            "namespace": r.namespace, "verb": r.verb, "group": r.group, "version": r.version,
            "resource": r.resource, "subresource": r.subresource, "name": r.name,
        });
    }
    if let Some(n) = spec.non_resource_attributes {
        out["nonResourceAttributes"] = json!({"path": n.path, "verb": n.verb});
    }
    Ok(
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": out}),
    )
}

/// The answer to a SelfSubjectReview of `api_version`: the caller's user name and groups.
pub fn self_review(who: &Principal, api_version: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": "SelfSubjectReview",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {"username": who.user(), "groups": who.groups()}},
    })
}

/// The answer to a TokenReview (`body`) posted by `who`: whether this gateway knows
/// `spec.token` and, if it does, its user and groups. An administrator may review any token;
/// anyone else only its own, and is refused another as Kubernetes refuses a caller without the
/// right to create TokenReviews. `principal_of` gives a token's principal. Pure.
pub fn token_review(
    who: &Principal,
    body: &Value,
    principal_of: impl Fn(&str) -> Option<Principal>,
) -> Result<Value, ApiError> {
    let Some(token) = body
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    else {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    };
    let reviewed = principal_of(token);
    if !matches!(who, Principal::Admin(_)) && reviewed.as_ref() != Some(who) {
        return Err(ApiError::forbidden(format!(
            "tokenreviews.authentication.k8s.io is forbidden: User {:?} cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope: only an administrator may review another's token",
            who.user()
        )));
    }
    let status = match &reviewed {
        Some(p) => json!({
            "authenticated": true,
            "user": {"username": p.user(), "groups": p.groups()},
        }),
        None => json!({"authenticated": false, "user": {}, "error": "the token is not known"}),
    };
    Ok(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {"creationTimestamp": null},
        "spec": body.get("spec").cloned().unwrap_or(Value::Null),
        "status": status,
    }))
}

fn verb_of(name: &str) -> Option<Verb> {
    Some(match name {
        "get" => Verb::Get,
        "list" => Verb::List,
        "watch" => Verb::Watch,
        "create" => Verb::Create,
        "update" => Verb::Update,
        "patch" => Verb::Patch,
        "delete" => Verb::Delete,
        "deletecollection" => Verb::DeleteCollection,
        _ => return None,
    })
}

const VERBS: [Verb; 8] = [
    Verb::Get,
    Verb::List,
    Verb::Watch,
    Verb::Create,
    Verb::Update,
    Verb::Patch,
    Verb::Delete,
    Verb::DeleteCollection,
];

/// The path from which a node agent gets presigned URLs of S3 images (`http::image_url`).
const IMAGE_URL: &str = "/karri/v1/image-url";

/// The verbs of the `status` subresource.
const STATUS_VERBS: [Verb; 3] = [Verb::Get, Verb::Update, Verb::Patch];

/// Whether `who` may use `verb` on `target`, or on its status subresource (`status`): the rule
/// of [`auth::allowed`], and for writes the one of [`auth::may_write`].
fn may(who: &Principal, verb: Verb, target: &Target<'_>, status: bool) -> bool {
    let writes = matches!(verb, Verb::Update | Verb::Patch);
    auth::allowed(who, verb, target) && (!writes || auth::may_write(who, target.kind, status))
}

/// Paths every caller may read, with all below them: discovery and the schemas.
const PUBLIC_TREES: [&str; 4] = ["/api", "/apis", "/openapi", "/version"];

/// Paths every caller may read, alone: health and metrics.
const PUBLIC_PATHS: [&str; 4] = ["/healthz", "/livez", "/readyz", "/metrics"];

/// Paths every caller may read without a resource: discovery, the schemas, health and metrics.
fn public_path(path: &str) -> bool {
    PUBLIC_TREES
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
        || PUBLIC_PATHS.contains(&path)
}

/// [`public_path`] as the non-resource URLs of an RBAC rule.
fn public_urls() -> Vec<String> {
    let trees = PUBLIC_TREES
        .iter()
        .flat_map(|p| [p.to_string(), format!("{p}/*")]);
    trees.chain(PUBLIC_PATHS.map(String::from)).collect()
}

/// The answer to a SelfSubjectAccessReview `body` from `who`: its spec, and whether the request
/// it describes would be allowed, with the reason when not. A verb or resource Karri does not
/// serve is not allowed. A malformed body is a bad request.
pub fn access_review(who: &Principal, kinds: &Kinds, body: &Value) -> Result<Value, ApiError> {
    let spec = body
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| ApiError::bad_request("a SelfSubjectAccessReview needs a spec"))?;
    let (allowed, reason) = if let Some(attrs) = spec.get("resourceAttributes") {
        resource_decision(who, kinds, attrs)
    } else if let Some(attrs) = spec.get("nonResourceAttributes") {
        let (verb, path) = (text(attrs, "verb"), text(attrs, "path"));
        let node_path = matches!(who, Principal::Node(_)) && path == IMAGE_URL;
        let allowed = matches!(who, Principal::Admin(_))
            || (verb == "get" && (public_path(path) || node_path));
        (allowed, String::new())
    } else {
        return Err(ApiError::invalid(
            "SelfSubjectAccessReview",
            "",
            vec![(
                "spec.resourceAttributes".into(),
                "exactly one of resourceAttributes or nonResourceAttributes must be set".into(),
            )],
        ));
    };
    let mut status = json!({"allowed": allowed});
    if !reason.is_empty() {
        status["reason"] = json!(reason);
    }
    Ok(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    }))
}

/// The answer to a SelfSubjectRulesReview `body` from `who`: every verb the caller may use on
/// each kind in the namespace the spec names, as RBAC rules (kinds with the same verbs share a
/// rule), by the rules that authorize requests. Records a caller sees only by name (a node's
/// own Node and Lease) are named. What rules cannot say is reported as `incomplete`, with the
/// reason: a node's rules on instances name the kind, though it sees and writes only the
/// instances bound to it, and of their status only what it reports.
pub fn rules_review(who: &Principal, kinds: &Kinds, body: &Value) -> Result<Value, ApiError> {
    let spec = body
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| ApiError::bad_request("a SelfSubjectRulesReview needs a spec"))?;
    let namespace = text(spec, "namespace");
    if namespace.is_empty() {
        return Err(ApiError::bad_request(
            "a SelfSubjectRulesReview needs spec.namespace",
        ));
    }
    let own_name = match who {
        Principal::Node(node) => Some(node.as_str()),
        _ => None,
    };
    // A rule's verbs and resource names, with its resources, in the order kinds are served.
    type Grant<'a> = (Vec<&'a str>, Vec<&'a str>);
    let mut grouped: Vec<(Grant, Vec<String>)> = Vec::new();
    for kind in kinds.all() {
        let target = |name| Target {
            kind: kind.info.kind,
            plural: kind.info.plural,
            namespace: Some(namespace).filter(|_| kind.info.namespaced),
            namespaced: kind.info.namespaced,
            name,
        };
        // Whether the caller sees only the record named as itself (a node's Node and Lease).
        let record = |name: &str| json!({"metadata": {"name": name, "namespace": namespace}});
        let by_own_name = own_name.is_some_and(|n| {
            !auth::can_see(who, kind.info.kind, &record(""))
                && auth::can_see(who, kind.info.kind, &record(n))
        });
        let status_resource = format!("{}/status", kind.info.plural);
        for (resource, verbs, status) in [
            (kind.info.plural, &VERBS[..], false),
            (status_resource.as_str(), &STATUS_VERBS[..], true),
        ] {
            let (mut any, mut own) = (Vec::new(), Vec::new());
            for &verb in verbs {
                // A name no record can have stands for "any record".
                if !by_own_name
                    && may(who, verb, &target(None), status)
                    && may(who, verb, &target(Some("")), status)
                {
                    any.push(verb.as_str());
                } else if own_name.is_some_and(|n| may(who, verb, &target(Some(n)), status)) {
                    own.push(verb.as_str());
                }
            }
            for key in [(any, vec![]), (own, own_name.into_iter().collect())] {
                if key.0.is_empty() {
                    continue;
                }
                match grouped.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, resources)) => resources.push(resource.to_owned()),
                    None => grouped.push((key, vec![resource.to_owned()])),
                }
            }
        }
    }
    let mut rules: Vec<Value> = grouped
        .into_iter()
        .map(|((verbs, names), resources)| {
            let mut rule =
                json!({"verbs": verbs, "apiGroups": [crds::GROUP], "resources": resources});
            if !names.is_empty() {
                rule["resourceNames"] = json!(names);
            }
            rule
        })
        .collect();
    rules.push(
        json!({"verbs": ["get", "list"], "apiGroups": [crate::http::discovery::CRD_GROUP],
        "resources": ["customresourcedefinitions"]}),
    );
    // `GET /api/v1/namespaces/<ns>`: an account its own, others any.
    let mut namespaces = json!({"verbs": ["get"], "apiGroups": [""], "resources": ["namespaces"]});
    if let Principal::Account { namespace, .. } = who {
        namespaces["resourceNames"] = json!([namespace]);
    }
    rules.push(namespaces);
    rules.push(
        json!({"verbs": ["create"], "apiGroups": ["authorization.k8s.io"],
        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"]}),
    );
    rules.push(
        json!({"verbs": ["create"], "apiGroups": ["authentication.k8s.io"],
        "resources": ["selfsubjectreviews"]}),
    );
    let non_resource = match who {
        Principal::Admin(_) => json!([{"verbs": ["*"], "nonResourceURLs": ["*"]}]),
        Principal::Node(_) => {
            let mut urls = public_urls();
            urls.push(IMAGE_URL.to_owned());
            json!([{"verbs": ["get"], "nonResourceURLs": urls}])
        }
        _ => json!([{"verbs": ["get"], "nonResourceURLs": public_urls()}]),
    };
    let mut status = json!({"resourceRules": rules, "nonResourceRules": non_resource,
        "incomplete": false});
    if own_name.is_some() {
        status["incomplete"] = json!(true);
        status["evaluationError"] = json!(
            "a node sees and writes only the instances bound to it, and of their status only what it reports; these rules name the kind"
        );
    }
    Ok(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "metadata": {"creationTimestamp": null},
        "spec": {"namespace": namespace},
        "status": status,
    }))
}

/// The string `field` of `v`, `""` when absent.
fn text<'v>(v: &'v Value, field: &str) -> &'v str {
    v.get(field).and_then(Value::as_str).unwrap_or("")
}

fn resource_decision(who: &Principal, kinds: &Kinds, attrs: &Value) -> (bool, String) {
    let group = text(attrs, "group");
    let resource = text(attrs, "resource");
    let verb = text(attrs, "verb");
    let namespace = Some(text(attrs, "namespace")).filter(|n| !n.is_empty());
    let name = Some(text(attrs, "name")).filter(|n| !n.is_empty());
    // `GET /api/v1/namespaces/<ns>`, which kubectl asks after a 404: an account its own, others
    // any.
    if group.is_empty() && resource == "namespaces" {
        let readable = verb == "get"
            && match who {
                Principal::Account { namespace, .. } => name == Some(namespace.as_str()),
                _ => true,
            };
        return (readable, String::new());
    }
    // The CustomResourceDefinitions every caller may read, and nothing else of that group.
    if group == crate::http::discovery::CRD_GROUP {
        let readable = resource == "customresourcedefinitions" && matches!(verb, "get" | "list");
        return (readable, String::new());
    }
    if !matches!(group, "" | "*") && group != crds::GROUP {
        return (false, format!("Karri serves no API group {group:?}"));
    }
    let targets: Vec<_> = if resource == "*" {
        kinds.all().to_vec()
    } else {
        match kinds.by_plural(resource) {
            Some(kind) => vec![kind],
            None => {
                return (
                    false,
                    format!("Karri serves no resource {resource:?} in {}", crds::GROUP),
                )
            }
        }
    };
    let status = match text(attrs, "subresource") {
        "" => false,
        "status" => true,
        other => return (false, format!("Karri serves no subresource {other:?}")),
    };
    let verbs: Vec<Verb> = if verb == "*" && status {
        STATUS_VERBS.to_vec()
    } else if verb == "*" {
        VERBS.to_vec()
    } else {
        match verb_of(verb) {
            Some(v) if status && !STATUS_VERBS.contains(&v) => {
                return (
                    false,
                    format!("the status subresource does not serve {verb:?}"),
                )
            }
            Some(v) => vec![v],
            None => return (false, format!("Karri does not serve the verb {verb:?}")),
        }
    };
    let allowed = targets.iter().all(|kind| {
        let target = Target {
            kind: kind.info.kind,
            plural: kind.info.plural,
            namespace: namespace.filter(|_| kind.info.namespaced),
            namespaced: kind.info.namespaced,
            name,
        };
        verbs.iter().all(|v| may(who, *v, &target, status))
    });
    (allowed, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_review_names_the_tokens_user_to_an_admin_or_to_the_tokens_owner() {
        let admin = Principal::Admin("admin".into());
        let acme = Principal::Account {
            user: "acme".into(),
            namespace: "acme".into(),
        };
        let principal_of = |t: &str| match t {
            "admin-token" => Some(admin.clone()),
            "acme-token" => Some(acme.clone()),
            _ => None,
        };
        let review = |token: &str| {
            json!({"apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview", "spec": {"token": token}})
        };
        let status_of = |who: &Principal, token: &str| {
            token_review(who, &review(token), principal_of).map(|a| a["status"].clone())
        };
        let acme_is = json!({"authenticated": true,
            "user": {"username": "acme", "groups": ["karri:account:acme", "system:authenticated"]}});
        assert_eq!(status_of(&admin, "acme-token").ok(), Some(acme_is.clone()));
        assert_eq!(status_of(&acme, "acme-token").ok(), Some(acme_is));
        assert_eq!(
            status_of(&admin, "nobody").ok(),
            Some(json!({"authenticated": false, "user": {}, "error": "the token is not known"}))
        );
        for other in ["admin-token", "nobody"] {
            let refused = status_of(&acme, other).expect_err("not acme's token");
            assert_eq!(refused.status()["code"], 403, "{other}");
        }
        let missing =
            token_review(&admin, &json!({"spec": {}}), principal_of).expect_err("no token");
        assert_eq!(missing.status()["code"], 400);
        let answer = token_review(&admin, &review("acme-token"), principal_of).expect("reviewed");
        assert_eq!(answer["kind"], "TokenReview");
        assert_eq!(answer["spec"]["token"], "acme-token");
    }

    fn review(who: &Principal, attrs: Value) -> (bool, String) {
        let kinds = Kinds::load();
        let answer = access_review(who, &kinds, &json!({"spec": {"resourceAttributes": attrs}}))
            .expect("a well-formed review");
        (
            answer["status"]["allowed"] == json!(true),
            answer["status"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }

    #[test]
    fn an_access_review_answers_by_the_rules_that_authorize_requests() {
        let admin = Principal::Admin("admin".into());
        let acme = Principal::Account {
            user: "alice".into(),
            namespace: "acme".into(),
        };
        let node = Principal::Node("node-1".into());
        let rows = [
            (&admin, json!({"verb": "delete", "resource": "nodes"}), true),
            (&admin, json!({"verb": "*", "resource": "*"}), true),
            (
                &acme,
                json!({"verb": "create", "group": "karri.dev", "resource": "instances", "namespace": "acme"}),
                true,
            ),
            (
                &acme,
                json!({"verb": "get", "resource": "instances", "namespace": "globex"}),
                false,
            ),
            (
                &acme,
                json!({"verb": "list", "resource": "instancetypes"}),
                true,
            ),
            (
                &acme,
                json!({"verb": "create", "resource": "instancetypes"}),
                false,
            ),
            (&acme, json!({"verb": "delete", "resource": "nodes"}), false),
            (
                &acme,
                json!({"verb": "*", "resource": "keypairs", "namespace": "acme"}),
                true,
            ),
            // A node writes the status of its own Node record; its spec is the administrators'.
            (
                &node,
                json!({"verb": "patch", "resource": "nodes", "subresource": "status", "name": "node-1"}),
                true,
            ),
            (
                &node,
                json!({"verb": "patch", "resource": "nodes", "name": "node-1"}),
                false,
            ),
            (
                &node,
                json!({"verb": "patch", "resource": "nodes", "subresource": "status", "name": "node-2"}),
                false,
            ),
        ];
        for (who, attrs, want) in rows {
            assert_eq!(review(who, attrs.clone()).0, want, "{who:?} {attrs}");
        }
        // Status is written by Karri's controllers and nodes, never by an account; a node
        // writes nothing of an instance but its status.
        let status_rows = [
            (&acme, "get", "instances", "status", true),
            (&acme, "patch", "instances", "status", false),
            (&acme, "update", "keypairs", "status", false),
            (&acme, "patch", "instances", "", true),
            (&node, "patch", "instances", "status", true),
            (&node, "patch", "instances", "", false),
            (&node, "update", "nodes", "status", true),
            (&admin, "patch", "instances", "status", true),
            (&admin, "delete", "instances", "status", false),
            (&admin, "get", "instances", "scale", false),
        ];
        // `GET /api/v1/namespaces/<ns>`: an account its own, others any.
        let namespace_rows = [
            (&acme, "acme", true),
            (&acme, "globex", false),
            (&admin, "globex", true),
            (&node, "globex", true),
        ];
        for (who, ns, want) in namespace_rows {
            let attrs = json!({"verb": "get", "group": "", "resource": "namespaces", "name": ns});
            assert_eq!(review(who, attrs.clone()).0, want, "{who:?} {attrs}");
        }
        let kinds = Kinds::load();
        let image_urls = |who: &Principal| {
            let body =
                json!({"spec": {"nonResourceAttributes": {"verb": "get", "path": IMAGE_URL}}});
            access_review(who, &kinds, &body).expect("well-formed")["status"]["allowed"]
                == json!(true)
        };
        assert!(image_urls(&node) && !image_urls(&acme));
        for (who, verb, resource, subresource, want) in status_rows {
            let attrs = json!({"verb": verb, "resource": resource, "subresource": subresource,
                "namespace": "acme"});
            assert_eq!(review(who, attrs.clone()).0, want, "{who:?} {attrs}");
        }
        let crds = |verb: &str| {
            review(
                &acme,
                json!({"verb": verb, "group": "apiextensions.k8s.io", "resource": "customresourcedefinitions"}),
            )
            .0
        };
        assert!(crds("list") && crds("get") && !crds("delete"));
        let (allowed, reason) = review(&admin, json!({"verb": "get", "resource": "pods"}));
        assert!(!allowed);
        assert!(reason.contains("no resource \"pods\""), "{reason}");
        let (allowed, reason) = review(
            &admin,
            json!({"verb": "get", "group": "apps", "resource": "deployments"}),
        );
        assert!(!allowed);
        assert!(reason.contains("no API group \"apps\""), "{reason}");
        let (allowed, reason) =
            review(&admin, json!({"verb": "escalate", "resource": "instances"}));
        assert!(!allowed);
        assert!(reason.contains("escalate"), "{reason}");
        let (allowed, _) = review(
            &admin,
            json!({"verb": "deletecollection", "resource": "instances"}),
        );
        assert!(allowed);
    }

    #[test]
    fn a_review_without_attributes_is_refused_and_paths_are_public_to_read() {
        let kinds = Kinds::load();
        let acme = Principal::Account {
            user: "alice".into(),
            namespace: "acme".into(),
        };
        let err = access_review(&acme, &kinds, &json!({"spec": {}})).expect_err("no attributes");
        assert_eq!(err.code, 422);
        assert!(access_review(&acme, &kinds, &json!({})).is_err());
        let path = |verb: &str, path: &str| {
            let body = json!({"spec": {"nonResourceAttributes": {"verb": verb, "path": path}}});
            access_review(&acme, &kinds, &body).expect("well-formed")["status"]["allowed"]
                == json!(true)
        };
        assert!(path("get", "/version"));
        assert!(path("get", "/apis/karri.dev/v1alpha1"));
        assert!(!path("post", "/version"));
        assert!(!path("get", "/debug/pprof"));
    }

    /// The resource rules of a rules review: (verbs, resources, resource names), by verbs.
    fn rules(who: &Principal, namespace: &str) -> (Vec<(String, Vec<String>, String)>, Value) {
        let kinds = Kinds::load();
        let body = json!({"spec": {"namespace": namespace}});
        let answer = rules_review(who, &kinds, &body).expect("a well-formed review");
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        let rules = answer["status"]["resourceRules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| r["apiGroups"] == json!([crds::GROUP]))
            .map(|r| {
                (
                    strings(&r["verbs"]).join(","),
                    strings(&r["resources"]),
                    strings(&r["resourceNames"]).join(","),
                )
            })
            .collect();
        (rules, answer["status"].clone())
    }

    #[test]
    fn a_rules_review_lists_what_each_token_may_do_in_a_namespace() {
        let kinds = Kinds::load();
        let every: Vec<String> = kinds
            .all()
            .iter()
            .map(|k| k.info.plural.to_string())
            .collect();
        let namespaced: Vec<String> = kinds
            .all()
            .iter()
            .filter(|k| k.info.namespaced)
            .map(|k| k.info.plural.to_string())
            .collect();
        let all_verbs = "get,list,watch,create,update,patch,delete,deletecollection".to_string();
        let reads = "get,list,watch".to_string();
        let catalogue = vec!["availabilityzones".to_string(), "instancetypes".to_string()];
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };

        let status_of = |plurals: &[String]| -> Vec<String> {
            plurals.iter().map(|p| format!("{p}/status")).collect()
        };
        let strings = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };

        let (admin, status) = rules(&Principal::Admin("admin".into()), "default");
        assert_eq!(
            admin,
            vec![
                (all_verbs.clone(), every.clone(), String::new()),
                ("get,update,patch".into(), status_of(&every), String::new()),
            ]
        );
        assert_eq!(
            status["nonResourceRules"][0]["nonResourceURLs"],
            json!(["*"])
        );
        assert_eq!(status["incomplete"], json!(false));

        let acme = Principal::Account {
            user: "alice".into(),
            namespace: "acme".into(),
        };
        let (own, status) = rules(&acme, "acme");
        assert_eq!(own.len(), 3, "{own:?}");
        assert!(
            status["resourceRules"]
                .as_array()
                .is_some_and(|r| r.contains(&json!({
                "verbs": ["get"], "apiGroups": [""], "resources": ["namespaces"],
                "resourceNames": ["acme"]}))),
            "an account reads its own namespace: {status}"
        );
        let resources_for = |rules: &[(String, Vec<String>, String)], verbs: &str| {
            rules
                .iter()
                .find(|(v, _, _)| v == verbs)
                .map(|(_, r, _)| sorted(r.clone()))
        };
        assert_eq!(
            resources_for(&own, &all_verbs),
            Some(sorted(namespaced.clone()))
        );
        assert_eq!(resources_for(&own, &reads), Some(catalogue.clone()));
        // Status is Karri's to write: an account only reads it.
        let readable_status = [status_of(&namespaced), status_of(&catalogue)].concat();
        assert_eq!(resources_for(&own, "get"), Some(sorted(readable_status)));
        let urls = &status["nonResourceRules"][0];
        assert_eq!(urls["verbs"], json!(["get"]));
        assert!(urls["nonResourceURLs"]
            .as_array()
            .is_some_and(|u| u.contains(&json!("/apis/*")) && u.contains(&json!("/version"))));
        // In another account's namespace, only the public catalogue.
        let (other, _) = rules(&acme, "globex");
        assert_eq!(other.len(), 2, "{other:?}");
        assert_eq!(resources_for(&other, &reads), Some(catalogue.clone()));
        assert_eq!(resources_for(&other, "get"), Some(status_of(&catalogue)));

        let (node, status) = rules(&Principal::Node("node-1".into()), "default");
        let find = |verbs: &str, names: &str| {
            node.iter()
                .find(|(v, _, n)| v == verbs && n == names)
                .map(|(_, r, _)| sorted(r.clone()))
        };
        // A node reads its instances and the catalogue, and writes only instances' status.
        assert_eq!(
            find("get,list,watch", ""),
            Some(strings(&[
                "availabilityzones",
                "instances",
                "instancetypes"
            ]))
        );
        assert_eq!(
            find("get,update,patch", ""),
            Some(strings(&["instances/status"]))
        );
        // It sees only its own Node record, by name.
        assert_eq!(find("list,watch", ""), None);
        assert_eq!(
            find("get,list,watch,create", "node-1"),
            Some(strings(&["nodes"]))
        );
        assert_eq!(
            find("get,update,patch", "node-1"),
            Some(strings(&["nodes/status"]))
        );
        assert!(
            !node
                .iter()
                .any(|(_, r, _)| r.contains(&"leases".to_string())),
            "a node's lease is in the node-lease namespace only: {node:?}"
        );
        assert_eq!(status["incomplete"], json!(true));
        assert!(
            status["evaluationError"]
                .as_str()
                .is_some_and(|e| e.contains("bound to it")),
            "{status}"
        );
        assert!(
            status["nonResourceRules"][0]["nonResourceURLs"]
                .as_array()
                .is_some_and(|u| u.contains(&json!(IMAGE_URL))),
            "a node gets image URLs: {status}"
        );
        let (in_leases, _) = rules(
            &Principal::Node("node-1".into()),
            crds::NODE_LEASE_NAMESPACE,
        );
        assert!(in_leases
            .iter()
            .any(|(v, r, n)| v == "get,create,update,patch"
                && r.contains(&"leases".to_string())
                && n == "node-1"));

        let err = rules_review(&acme, &kinds, &json!({"spec": {}})).expect_err("no namespace");
        assert_eq!(err.code, 400);
        assert!(rules_review(&acme, &kinds, &json!({})).is_err());
    }

    #[test]
    fn a_self_review_names_the_user_and_its_groups() {
        let acme = Principal::Account {
            user: "alice".into(),
            namespace: "acme".into(),
        };
        let answer = self_review(&acme, "authentication.k8s.io/v1");
        assert_eq!(answer["status"]["userInfo"]["username"], "alice");
        assert_eq!(
            answer["status"]["userInfo"]["groups"],
            json!(["karri:account:acme", "system:authenticated"])
        );
        assert!(is_self_review(
            "/apis/authentication.k8s.io/v1beta1/selfsubjectreviews"
        ));
        assert!(!is_self_review(
            "/apis/authentication.k8s.io/v2/selfsubjectreviews"
        ));
    }
}
