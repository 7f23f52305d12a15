//! Kubernetes' self-reviews, which `kubectl auth can-i` and `kubectl auth whoami` send: what the
//! caller may do, answered by the same rules that authorize every request ([`auth::allowed`]),
//! and who the caller is. Pure. A node token's writes of instances are checked per record
//! (only those bound to it): a review, which names no record's binding, answers for the kind.

use serde_json::{json, Value};

use crate::auth::{self, Principal, Target, Verb};
use crate::error::ApiError;
use crate::kinds::Kinds;

/// `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`.
pub const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";

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

/// A SelfSubjectAccessReview in Kubernetes' protobuf encoding, as the JSON object it stands
/// for (its spec: the attributes a review reads).
pub fn access_review_from_protobuf(bytes: &[u8]) -> Result<Value, ApiError> {
    use prost::Message as _;
    let bad = |why: String| ApiError::bad_request(format!("the protobuf body is malformed: {why}"));
    let body = bytes
        .strip_prefix(PROTOBUF_MAGIC)
        .ok_or_else(|| bad("it does not start with Kubernetes' magic number".into()))?;
    let raw = Envelope::decode(body)
        .map_err(|e| bad(e.to_string()))?
        .raw
        .unwrap_or_default();
    let spec = AccessReview::decode(raw.as_slice())
        .map_err(|e| bad(e.to_string()))?
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

/// The groups a principal is in, as a Kubernetes authenticator would report them.
fn groups(who: &Principal) -> Vec<String> {
    let role = match who {
        Principal::Admin(_) => "system:masters".to_owned(),
        Principal::Operator(_) => "karri:operators".to_owned(),
        Principal::Node(_) => "karri:nodes".to_owned(),
        Principal::Account { namespace, .. } => format!("karri:account:{namespace}"),
    };
    vec![role, "system:authenticated".to_owned()]
}

/// The answer to a SelfSubjectReview of `api_version`: the caller's user name and groups.
pub fn self_review(who: &Principal, api_version: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": "SelfSubjectReview",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {"username": who.user(), "groups": groups(who)}},
    })
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

/// Paths every caller may read without a resource: discovery, the schemas, health and metrics.
fn public_path(path: &str) -> bool {
    ["/api", "/apis", "/openapi", "/version"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
        || ["/healthz", "/livez", "/readyz", "/metrics"].contains(&path)
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
        let allowed = matches!(who, Principal::Admin(_)) || (verb == "get" && public_path(path));
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
    let verbs: Vec<Verb> = if verb == "*" {
        VERBS.to_vec()
    } else {
        match verb_of(verb) {
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
        verbs.iter().all(|v| auth::allowed(who, *v, &target))
    });
    (allowed, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (
                &node,
                json!({"verb": "patch", "resource": "nodes", "name": "node-1"}),
                true,
            ),
            (
                &node,
                json!({"verb": "patch", "resource": "nodes", "name": "node-2"}),
                false,
            ),
        ];
        for (who, attrs, want) in rows {
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
