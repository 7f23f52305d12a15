//! Bearer-token authentication and the authorization rules of the resource API. Pure.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use serde::Deserialize;
use serde_json::Value;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Everything, everywhere.
    Admin(String),
    /// The operator's controllers: every record.
    Operator(String),
    /// A node agent: its own Node record and the instances bound to it.
    Node(String),
    /// An account's user: the records of the account's namespace.
    Account {
        /// User name.
        user: String,
        /// The account's namespace.
        namespace: String,
    },
}

impl Principal {
    /// The user name, as Kubernetes would print it.
    pub fn user(&self) -> &str {
        match self {
            Principal::Admin(u) | Principal::Operator(u) => u,
            Principal::Node(n) => n,
            Principal::Account { user, .. } => user,
        }
    }

    /// The groups the principal is in, as a Kubernetes authenticator would report them.
    pub fn groups(&self) -> Vec<String> {
        let role = match self {
            Principal::Admin(_) => "system:masters".to_owned(),
            Principal::Operator(_) => "karri:operators".to_owned(),
            Principal::Node(_) => "karri:nodes".to_owned(),
            Principal::Account { namespace, .. } => format!("karri:account:{namespace}"),
        };
        vec![role, "system:authenticated".to_owned()]
    }
}

/// What a request's `Impersonate-*` headers ask for (Kubernetes' user impersonation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Impersonation {
    /// `Impersonate-User`.
    pub user: Option<String>,
    /// `Impersonate-Group`, each header once.
    pub groups: Vec<String>,
    /// `Impersonate-Uid`.
    pub uid: Option<String>,
    /// Whether any `Impersonate-Extra-*` header came.
    pub extra: bool,
}

impl Impersonation {
    /// Whether no impersonation was asked for.
    pub fn is_empty(&self) -> bool {
        self == &Impersonation::default()
    }
}

/// Why a request may not act as the user it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImpersonationError {
    /// Groups, a UID or extras without a user (Kubernetes refuses these too).
    #[error("requested impersonation of {0} without impersonating a user")]
    WithoutUser(&'static str),
    /// The caller may not impersonate at all, or not this.
    #[error("{resource} {name:?} is forbidden: User {caller:?} cannot impersonate resource {resource:?} in API group \"\" at the cluster scope{why}")]
    Forbidden {
        /// `users`, `groups`, `uids` or `userextras`.
        resource: &'static str,
        /// What was named.
        name: String,
        /// The caller's user name.
        caller: String,
        /// Why, after a colon, or nothing.
        why: String,
    },
}

/// The principal a request acts as. Without `Impersonate-*` headers, `caller`. With them, as
/// in Kubernetes: only an administrator may impersonate, and the request then acts as the user
/// named, with that user's rights alone. `known` gives the principals some token names with a
/// user name, each once (asked only once the caller may impersonate). The groups asked for must
/// all be the user's, and pick among principals of the same name; Karri's rights do not depend
/// on UIDs or extras, so impersonating those is refused rather than ignored. Pure.
pub fn impersonate(
    caller: Principal,
    asked: &Impersonation,
    known: impl FnOnce(&str) -> Vec<Principal>,
) -> Result<Principal, ImpersonationError> {
    if asked.is_empty() {
        return Ok(caller);
    }
    let forbidden = |resource: &'static str, name: &str, why: &str| ImpersonationError::Forbidden {
        resource,
        name: name.to_owned(),
        caller: caller.user().to_owned(),
        why: if why.is_empty() {
            String::new()
        } else {
            format!(": {why}")
        },
    };
    let Some(user) = &asked.user else {
        let what = if !asked.groups.is_empty() {
            "groups"
        } else if asked.uid.is_some() {
            "a UID"
        } else {
            "extras"
        };
        return Err(ImpersonationError::WithoutUser(what));
    };
    if !matches!(caller, Principal::Admin(_)) {
        return Err(forbidden("users", user, ""));
    }
    if let Some(uid) = &asked.uid {
        return Err(forbidden("uids", uid, "Karri does not impersonate UIDs"));
    }
    if asked.extra {
        return Err(forbidden(
            "userextras",
            user,
            "Karri does not impersonate user extras",
        ));
    }
    let mut fits = known(user);
    if fits.is_empty() {
        return Err(forbidden(
            "users",
            user,
            "no token of this gateway has that user",
        ));
    }
    for group in &asked.groups {
        fits.retain(|p| p.groups().contains(group));
        if fits.is_empty() {
            return Err(forbidden(
                "groups",
                group,
                &format!("user {user:?} is not in it"),
            ));
        }
    }
    match fits.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(forbidden(
            "users",
            user,
            "that name has more than one role or account here; name one of its groups too",
        )),
    }
}

/// A request verb, as in Kubernetes RBAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Read one record.
    Get,
    /// List records.
    List,
    /// Watch records.
    Watch,
    /// Create a record.
    Create,
    /// Replace a record.
    Update,
    /// Patch a record (allowed wherever [`Verb::Update`] is).
    Patch,
    /// Delete a record.
    Delete,
    /// Delete every record of a collection that a selector matches.
    DeleteCollection,
}

impl Verb {
    /// The RBAC name of the verb.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }
    fn reads(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape.
    #[error("the tokens file {path} is malformed: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    user: String,
    role: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// The known bearer tokens. Clones share one table, which [`Authenticator::replace_with`]
/// swaps as a whole (a tokens file read again).
#[derive(Clone, Default)]
pub struct Authenticator {
    tokens: Arc<RwLock<Arc<HashMap<String, Principal>>>>,
}

impl std::fmt::Debug for Authenticator {
    /// The principals only: a token in a log is a credential given away.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = self.table();
        f.debug_struct("Authenticator")
            .field("principals", &tokens.values().collect::<Vec<_>>())
            .finish()
    }
}

impl Authenticator {
    /// Parse a tokens file (`tokens: [{token, user, role, node?, namespace?}]`).
    pub fn from_yaml(text: &str, path: &str) -> Result<Self, TokenFileError> {
        let parse_err = |message: String| TokenFileError::Parse {
            path: path.to_string(),
            message,
        };
        let file: TokenFile = serde_norway::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut tokens = HashMap::new();
        for (i, e) in file.tokens.into_iter().enumerate() {
            if e.token.len() < 16 {
                return Err(parse_err(format!(
                    "token {i} is shorter than 16 characters"
                )));
            }
            let principal = match e.role.as_str() {
                "admin" => Principal::Admin(e.user),
                "operator" => Principal::Operator(e.user),
                "node" => Principal::Node(
                    e.node
                        .ok_or_else(|| parse_err(format!("token {i} has role node but no node")))?,
                ),
                "account" => Principal::Account {
                    user: e.user,
                    namespace: e.namespace.ok_or_else(|| {
                        parse_err(format!("token {i} has role account but no namespace"))
                    })?,
                },
                other => return Err(parse_err(format!("token {i} has unknown role {other:?}"))),
            };
            if tokens.insert(e.token, principal).is_some() {
                // One token for two principals: whichever came last would silently win.
                return Err(parse_err(format!(
                    "token {i} repeats an earlier token; each token must be unique"
                )));
            }
        }
        Ok(Self {
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
        })
    }

    /// The table now.
    fn table(&self) -> Arc<HashMap<String, Principal>> {
        self.tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `other`'s tokens the only ones this authenticator (and every clone of it) knows,
    /// at once: a request sees the old table or the new one, never a mix. Returns how many
    /// tokens it knows now.
    pub fn replace_with(&self, other: &Authenticator) -> usize {
        let table = other.table();
        let n = table.len();
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = table;
        n
    }

    /// Read and parse a tokens file.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// The principals some token names with user name `user`, once each.
    pub fn principals_named(&self, user: &str) -> Vec<Principal> {
        let mut named: Vec<Principal> = Vec::new();
        for p in self.table().values().filter(|p| p.user() == user) {
            if !named.contains(p) {
                named.push(p.clone());
            }
        }
        named
    }

    /// The principal of an `Authorization` header value, if the token is known.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Principal> {
        let token = authorization?.strip_prefix("Bearer ")?.trim();
        self.table().get(token).cloned()
    }
}

/// What a request touches.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Kind name (`Instance`).
    pub kind: &'a str,
    /// Resource plural (`instances`).
    pub plural: &'a str,
    /// Namespace, for namespaced kinds (None for all namespaces).
    pub namespace: Option<&'a str>,
    /// Whether the kind is namespaced.
    pub namespaced: bool,
    /// The record's name, for single-record verbs.
    pub name: Option<&'a str>,
}

fn bound_node(obj: &Value) -> Option<&str> {
    obj.pointer("/status/nodeName").and_then(Value::as_str)
}

/// Kinds every account may read: the public catalogue.
const CATALOGUE: &[&str] = &["InstanceType", "AvailabilityZone"];

/// Whether `principal` may perform `verb` on `target` at all (before looking at records).
pub fn allowed(principal: &Principal, verb: Verb, target: &Target<'_>) -> bool {
    match principal {
        Principal::Admin(_) | Principal::Operator(_) => true,
        Principal::Node(node) => match target.kind {
            // Reads are filtered to bound instances; writes are checked per record.
            "Instance" => matches!(
                verb,
                Verb::Get | Verb::List | Verb::Watch | Verb::Update | Verb::Patch
            ),
            "Node" => match verb {
                Verb::List | Verb::Watch => true,
                Verb::Delete | Verb::DeleteCollection => false,
                _ => target.name.is_none_or(|n| n == node),
            },
            // The catalogue a host needs to size domains and address guests; read-only.
            "InstanceType" | "AvailabilityZone" => verb.reads(),
            // Its heartbeat: the lease named as the node in the node-lease namespace.
            "Lease" => {
                matches!(verb, Verb::Get | Verb::Create | Verb::Update | Verb::Patch)
                    && target.namespace == Some(crds::NODE_LEASE_NAMESPACE)
                    && target.name.is_none_or(|n| n == node)
            }
            _ => false,
        },
        Principal::Account { namespace, .. } => {
            if target.namespaced {
                target.namespace == Some(namespace.as_str())
            } else {
                verb.reads() && CATALOGUE.contains(&target.kind)
            }
        }
    }
}

/// Whether `principal` may update or patch the `status` subresource of a `kind` record
/// (`status`), or the rest of it (`!status`), where [`allowed`] lets it write the kind at all.
/// Status is what Karri observed: accounts only read it. A node reports the status of its
/// instances and of its own Node record and changes nothing else of them (a host's zone,
/// cordon and instance cap are the administrators').
pub fn may_write(principal: &Principal, kind: &str, status: bool) -> bool {
    match principal {
        Principal::Account { .. } => !status,
        Principal::Node(_) if matches!(kind, "Instance" | "Node") => status,
        _ => true,
    }
}

/// Whether `principal` may see this record (list/watch results are filtered by it).
pub fn can_see(principal: &Principal, kind: &str, obj: &Value) -> bool {
    match principal {
        Principal::Node(node) => match kind {
            "Instance" => bound_node(obj) == Some(node.as_str()),
            "Node" => obj.pointer("/metadata/name").and_then(Value::as_str) == Some(node),
            "InstanceType" | "AvailabilityZone" => true,
            "Lease" => {
                obj.pointer("/metadata/name").and_then(Value::as_str) == Some(node)
                    && obj.pointer("/metadata/namespace").and_then(Value::as_str)
                        == Some(crds::NODE_LEASE_NAMESPACE)
            }
            _ => false,
        },
        _ => true,
    }
}

/// Whether `principal` may change a record from `before` to `after`.
pub fn can_write(principal: &Principal, kind: &str, before: Option<&Value>, after: &Value) -> bool {
    match principal {
        Principal::Node(_) => {
            before.is_none_or(|b| can_see(principal, kind, b)) && can_see(principal, kind, after)
        }
        _ => true,
    }
}

/// Why `principal` may not give an Image the location `after` holds, if it may not: an
/// account's images live in S3 (`bucket/key`), whose access the gateway checks for each node
/// fetch. A path is read by a node agent as root and a URL fetched from inside the cloud, so
/// either from a tenant would boot any file of a hypervisor host, or a node-local service, as
/// that tenant's disk: only the cloud's administrators register those. A location an update
/// leaves as it was is not judged again.
pub fn image_location_refusal(
    principal: &Principal,
    kind: &str,
    before: Option<&Value>,
    after: &Value,
) -> Option<String> {
    if kind != "Image" || !matches!(principal, Principal::Account { .. }) {
        return None;
    }
    fn location(v: &Value) -> Option<&str> {
        v.pointer("/spec/imageLocation").and_then(Value::as_str)
    }
    let wanted = location(after)?;
    if before.and_then(location) == Some(wanted) || crds::image::s3_location(wanted).is_some() {
        return None;
    }
    Some(format!(
        "the image location {wanted:?} is not in S3: an account registers images as bucket/key \
         (upload it with `aws s3 cp` first); paths on a node and URLs are for the cloud's \
         administrators"
    ))
}

/// The fields of an instance's status a node agent reports: its domain's condition, the
/// console, and the reboot it carried out. Placement, addresses, the launch spec and the EC2
/// state are the operator's.
pub const NODE_STATUS_FIELDS: &[&str] = &[
    "conditions",
    "consoleOutput",
    "consoleOutputTime",
    "lastRebootRequest",
];

/// Whether a node's status write takes an instance's status from `before` to `after` changing
/// only what the node reports ([`NODE_STATUS_FIELDS`], and of the conditions only
/// `DomainRunning`): a node must not point the launch spec at other objects, take addresses or
/// forge the operator's conditions.
pub fn node_status_change_allowed(before: &Value, after: &Value) -> bool {
    fn rest(obj: &Value) -> serde_json::Map<String, Value> {
        let mut status = obj
            .get("status")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let others: Vec<Value> = status
            .get("conditions")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter(|c| {
                        c.get("type").and_then(Value::as_str)
                            != Some(crds::CONDITION_DOMAIN_RUNNING)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for f in NODE_STATUS_FIELDS {
            status.remove(*f);
        }
        if !others.is_empty() {
            status.insert("conditions".into(), Value::Array(others));
        }
        status
    }
    rest(before) == rest(after)
}

/// The Kubernetes-style message of a refusal.
pub fn forbidden_message(principal: &Principal, verb: Verb, target: &Target<'_>) -> String {
    let what = match target.name {
        Some(n) => format!("{}.{} {n:?} is forbidden", target.plural, crds::GROUP),
        None => format!("{}.{} is forbidden", target.plural, crds::GROUP),
    };
    let scope = match target.namespace {
        Some(ns) => format!(" in the namespace {ns:?}"),
        None if target.namespaced => " at the cluster scope".to_string(),
        None => String::new(),
    };
    format!(
        "{what}: User {:?} cannot {} resource {:?} in API group {:?}{scope}",
        principal.user(),
        verb.as_str(),
        target.plural,
        crds::GROUP
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alpha() -> Principal {
        Principal::Account {
            user: "alpha-user".into(),
            namespace: "alpha".into(),
        }
    }

    fn known() -> Vec<Principal> {
        vec![
            Principal::Admin("admin".into()),
            Principal::Operator("operator".into()),
            Principal::Node("node-1".into()),
            alpha(),
            // One user name in two accounts.
            Principal::Account {
                user: "shared".into(),
                namespace: "a".into(),
            },
            Principal::Account {
                user: "shared".into(),
                namespace: "b".into(),
            },
        ]
    }

    fn named(user: &str) -> Vec<Principal> {
        known().into_iter().filter(|p| p.user() == user).collect()
    }

    fn asking(user: Option<&str>, groups: &[&str]) -> Impersonation {
        Impersonation {
            user: user.map(str::to_owned),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Impersonation::default()
        }
    }

    #[test]
    fn an_administrator_impersonating_a_user_gets_that_users_rights_alone() {
        let admin = Principal::Admin("admin".into());
        let rows: Vec<(&str, Impersonation, Result<Principal, &str>)> = vec![
            ("no headers: the caller", Impersonation::default(), Ok(admin.clone())),
            ("an account's user", asking(Some("alpha-user"), &[]), Ok(alpha())),
            (
                "with its own groups",
                asking(Some("alpha-user"), &["karri:account:alpha", "system:authenticated"]),
                Ok(alpha()),
            ),
            (
                "a group picks among accounts of one user name",
                asking(Some("shared"), &["karri:account:b"]),
                Ok(Principal::Account {
                    user: "shared".into(),
                    namespace: "b".into(),
                }),
            ),
            (
                "one user name in two accounts needs a group",
                asking(Some("shared"), &[]),
                Err("users \"shared\" is forbidden: User \"admin\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope: that name has more than one role or account here; name one of its groups too"),
            ),
            (
                "a group the user is not in, such as the administrators'",
                asking(Some("alpha-user"), &["system:masters"]),
                Err("groups \"system:masters\" is forbidden: User \"admin\" cannot impersonate resource \"groups\" in API group \"\" at the cluster scope: user \"alpha-user\" is not in it"),
            ),
            (
                "an unknown user",
                asking(Some("nobody"), &[]),
                Err("users \"nobody\" is forbidden: User \"admin\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope: no token of this gateway has that user"),
            ),
            (
                "groups without a user",
                asking(None, &["karri:account:alpha"]),
                Err("requested impersonation of groups without impersonating a user"),
            ),
            (
                "a UID",
                Impersonation {
                    uid: Some("1234".into()),
                    ..asking(Some("alpha-user"), &[])
                },
                Err("uids \"1234\" is forbidden: User \"admin\" cannot impersonate resource \"uids\" in API group \"\" at the cluster scope: Karri does not impersonate UIDs"),
            ),
            (
                "extras",
                Impersonation {
                    extra: true,
                    ..asking(Some("alpha-user"), &[])
                },
                Err("userextras \"alpha-user\" is forbidden: User \"admin\" cannot impersonate resource \"userextras\" in API group \"\" at the cluster scope: Karri does not impersonate user extras"),
            ),
        ];
        for (what, asked, want) in rows {
            let got = impersonate(admin.clone(), &asked, named).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_owned), "{what}");
        }
    }

    #[test]
    fn only_an_administrator_may_impersonate() {
        for caller in [
            alpha(),
            Principal::Operator("operator".into()),
            Principal::Node("node-1".into()),
        ] {
            let user = caller.user().to_owned();
            for target in ["admin", "alpha-user", "operator"] {
                let got = impersonate(caller.clone(), &asking(Some(target), &[]), |_| {
                    panic!("the principals are looked up for a caller who may not impersonate")
                })
                .map_err(|e| e.to_string());
                assert_eq!(
                    got,
                    Err(format!("users {target:?} is forbidden: User {user:?} cannot impersonate resource \"users\" in API group \"\" at the cluster scope")),
                    "{user} as {target}"
                );
            }
            // Without impersonation headers the caller stays itself.
            assert_eq!(
                impersonate(caller.clone(), &Impersonation::default(), named),
                Ok(caller)
            );
        }
    }

    fn t<'a>(kind: &'a str, ns: Option<&'a str>, name: Option<&'a str>) -> Target<'a> {
        let namespaced = !matches!(
            kind,
            "Node" | "Account" | "AvailabilityZone" | "InstanceType"
        );
        Target {
            kind,
            plural: "x",
            namespace: ns,
            namespaced,
            name,
        }
    }

    #[test]
    fn the_authenticator_never_shows_its_tokens() {
        let auth = Authenticator::from_yaml(
            "tokens: [{token: s3cr3t-token-0123456789, user: admin, role: admin}]",
            "tokens.yaml",
        )
        .expect("a tokens file");
        let shown = format!("{auth:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("admin"), "{shown}");
    }

    #[test]
    fn an_account_registers_images_only_from_s3_and_administrators_from_anywhere() {
        let account = Principal::Account {
            user: "111111111111:alice".into(),
            namespace: "acme".into(),
        };
        let admin = Principal::Admin("admin".into());
        let image = |location: &str| json!({"spec": {"imageLocation": location}});
        for (location, allowed) in [
            ("images/disk.raw", true),
            ("s3://images/micro/disk.qcow2", true),
            ("/var/lib/karri/instances/i-0123/root.qcow2", false),
            ("/etc/shadow", false),
            ("http://127.0.0.1:8080/disk.raw", false),
            ("https://example.com/disk.raw", false),
            ("file:///etc/shadow", false),
            ("images", false),
        ] {
            let after = image(location);
            assert_eq!(
                image_location_refusal(&account, "Image", None, &after).is_none(),
                allowed,
                "{location}"
            );
            assert_eq!(
                image_location_refusal(&admin, "Image", None, &after),
                None,
                "{location}"
            );
        }
        // An account may update an image an administrator gave it a path, leaving the path.
        let given = image("/srv/images/micro.raw");
        let mut tagged = given.clone();
        tagged["metadata"] = json!({"labels": {"team": "a"}});
        assert_eq!(
            image_location_refusal(&account, "Image", Some(&given), &tagged),
            None
        );
        assert!(
            image_location_refusal(&account, "Image", Some(&given), &image("/etc/shadow"))
                .is_some()
        );
        // Other kinds are not judged.
        assert_eq!(
            image_location_refusal(&account, "Instance", None, &image("/etc/shadow")),
            None
        );
    }

    #[test]
    fn authorization_table() {
        let node = Principal::Node("node-1".into());
        let acct = Principal::Account {
            user: "acme".into(),
            namespace: "acme".into(),
        };
        let admin = Principal::Admin("admin".into());
        let rows: Vec<(&Principal, Verb, Target<'_>, bool)> = vec![
            (&admin, Verb::Delete, t("Node", None, Some("node-9")), true),
            (
                &node,
                Verb::Get,
                t("Instance", Some("acme"), Some("i-1")),
                true,
            ),
            (
                &node,
                Verb::Create,
                t("Instance", Some("acme"), None),
                false,
            ),
            (
                &node,
                Verb::Delete,
                t("Instance", Some("acme"), Some("i-1")),
                false,
            ),
            (&node, Verb::Update, t("Node", None, Some("node-1")), true),
            (&node, Verb::Update, t("Node", None, Some("node-2")), false),
            (&node, Verb::Patch, t("Node", None, Some("node-1")), true),
            (&node, Verb::Patch, t("Node", None, Some("node-2")), false),
            (
                &node,
                Verb::Patch,
                t("Instance", Some("acme"), Some("i-1")),
                true,
            ),
            (
                &node,
                Verb::Patch,
                t("Lease", Some("karri-node-lease"), Some("node-1")),
                true,
            ),
            (&node, Verb::Create, t("Node", None, Some("node-1")), true),
            (
                &node,
                Verb::Get,
                t("Image", Some("acme"), Some("emi-1")),
                false,
            ),
            (&node, Verb::List, t("InstanceType", None, None), true),
            (
                &node,
                Verb::Update,
                t("InstanceType", None, Some("m1")),
                false,
            ),
            (
                &node,
                Verb::Update,
                t("Lease", Some("karri-node-lease"), Some("node-1")),
                true,
            ),
            (
                &node,
                Verb::Create,
                t("Lease", Some("karri-node-lease"), Some("node-1")),
                true,
            ),
            (
                &node,
                Verb::Update,
                t("Lease", Some("karri-node-lease"), Some("node-2")),
                false,
            ),
            (
                &node,
                Verb::Update,
                t("Lease", Some("karri-system"), Some("node-1")),
                false,
            ),
            (
                &node,
                Verb::Delete,
                t("Lease", Some("karri-node-lease"), Some("node-1")),
                false,
            ),
            (&acct, Verb::List, t("Instance", Some("acme"), None), true),
            (
                &acct,
                Verb::DeleteCollection,
                t("Instance", Some("acme"), None),
                true,
            ),
            (
                &acct,
                Verb::DeleteCollection,
                t("Instance", Some("other"), None),
                false,
            ),
            (&node, Verb::DeleteCollection, t("Node", None, None), false),
            (
                &node,
                Verb::DeleteCollection,
                t("Instance", Some("acme"), None),
                false,
            ),
            (
                &node,
                Verb::DeleteCollection,
                t("Lease", Some("karri-node-lease"), None),
                false,
            ),
            (&acct, Verb::List, t("Instance", Some("other"), None), false),
            (&acct, Verb::List, t("Instance", None, None), false),
            (&acct, Verb::List, t("InstanceType", None, None), true),
            (&acct, Verb::Create, t("InstanceType", None, None), false),
            (&acct, Verb::Get, t("Node", None, Some("node-1")), false),
        ];
        for (p, verb, target, want) in rows {
            assert_eq!(allowed(p, verb, &target), want, "{p:?} {verb:?} {target:?}");
        }
    }

    #[test]
    fn a_refusal_names_the_verb_asked_for() {
        let account = Principal::Account {
            user: "alice".into(),
            namespace: "acme".into(),
        };
        let zone = t("AvailabilityZone", None, Some("karri-1a"));
        assert_eq!(
            forbidden_message(&account, Verb::Patch, &zone),
            "x.karri.dev \"karri-1a\" is forbidden: User \"alice\" cannot patch resource \"x\" in API group \"karri.dev\""
        );
        assert!(forbidden_message(&account, Verb::Update, &zone).contains("cannot update"));
    }

    #[test]
    fn node_sees_and_writes_only_instances_bound_to_it() {
        let node = Principal::Node("node-1".into());
        let mine = json!({"status": {"nodeName": "node-1"}});
        let other = json!({"status": {"nodeName": "node-2"}});
        assert!(can_see(&node, "Instance", &mine));
        assert!(!can_see(&node, "Instance", &other));
        assert!(can_write(&node, "Instance", Some(&mine), &mine));
        assert!(!can_write(&node, "Instance", Some(&other), &mine));
        assert!(!can_write(&node, "Instance", Some(&mine), &other));
    }

    #[test]
    fn tokens_file_parses_and_authenticates() {
        let yaml = "tokens:\n- token: aaaaaaaaaaaaaaaaaaaa\n  user: admin\n  role: admin\n- token: bbbbbbbbbbbbbbbbbbbb\n  user: n1\n  role: node\n  node: node-1\n";
        let a = Authenticator::from_yaml(yaml, "t.yaml").expect("valid file");
        assert_eq!(
            a.authenticate(Some("Bearer bbbbbbbbbbbbbbbbbbbb")),
            Some(Principal::Node("node-1".into()))
        );
        assert_eq!(a.authenticate(Some("Bearer nope")), None);
        assert_eq!(a.authenticate(None), None);
        let bad = "tokens:\n- token: short\n  user: x\n  role: admin\n";
        assert!(Authenticator::from_yaml(bad, "t.yaml").is_err());
        let twice = "tokens:\n- token: aaaaaaaaaaaaaaaaaaaa\n  user: admin\n  role: admin\n- token: aaaaaaaaaaaaaaaaaaaa\n  user: n1\n  role: node\n  node: node-1\n";
        let err = Authenticator::from_yaml(twice, "t.yaml").expect_err("a repeated token");
        assert!(err.to_string().contains("token 1 repeats"), "{err}");
    }

    #[test]
    fn replacing_the_tokens_changes_every_clone_at_once() {
        let first = "tokens:\n- token: aaaaaaaaaaaaaaaaaaaa\n  user: admin\n  role: admin\n";
        let second = "tokens:\n- token: cccccccccccccccccccc\n  user: root\n  role: admin\n- token: dddddddddddddddddddd\n  user: o\n  role: operator\n";
        let a = Authenticator::from_yaml(first, "t.yaml").expect("valid file");
        let served = a.clone();
        let read = Authenticator::from_yaml(second, "t.yaml").expect("valid file");
        assert_eq!(a.replace_with(&read), 2);
        assert_eq!(
            served.authenticate(Some("Bearer aaaaaaaaaaaaaaaaaaaa")),
            None
        );
        assert_eq!(
            served.authenticate(Some("Bearer cccccccccccccccccccc")),
            Some(Principal::Admin("root".into()))
        );
    }

    #[test]
    fn a_node_may_change_only_what_it_reports_of_an_instances_status() {
        let before = json!({"status": {
            "nodeName": "node-1", "state": "pending", "privateIpAddress": "172.31.0.5",
            "conditions": [{"type": "Scheduled", "status": "True"}]
        }});
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = before.clone();
            f(&mut v);
            v
        };
        let rows: [(&str, Value, bool); 8] = [
            ("nothing", before.clone(), true),
            (
                "console",
                with(&|v| v["status"]["consoleOutput"] = json!("boot")),
                true,
            ),
            (
                "reboot done",
                with(&|v| v["status"]["lastRebootRequest"] = json!("t1")),
                true,
            ),
            (
                "DomainRunning added",
                with(&|v| {
                    v["status"]["conditions"] = json!([
                        {"type": "Scheduled", "status": "True"},
                        {"type": "DomainRunning", "status": "True"}
                    ])
                }),
                true,
            ),
            (
                "state",
                with(&|v| v["status"]["state"] = json!("running")),
                false,
            ),
            (
                "address",
                with(&|v| v["status"]["privateIpAddress"] = json!("172.31.0.6")),
                false,
            ),
            (
                "launch spec",
                with(&|v| v["status"]["launch"] = json!({"root": {"location": "b/k"}})),
                false,
            ),
            (
                "operator's condition dropped",
                with(&|v| v["status"]["conditions"] = json!([{"type": "DomainRunning"}])),
                false,
            ),
        ];
        for (what, after, allowed) in rows {
            assert_eq!(
                node_status_change_allowed(&before, &after),
                allowed,
                "{what}"
            );
        }
    }
}
