//! Pure routing of resource-API paths to endpoints.

use crate::kinds::Kinds;

/// What a path under `/apis/karri.dev/v1alpha1/` addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A collection: list, watch, create.
    Collection {
        /// Resource plural.
        plural: String,
        /// Namespace (None: cluster scope or all namespaces).
        namespace: Option<String>,
    },
    /// One record, or its status subresource.
    Object {
        /// Resource plural.
        plural: String,
        /// Namespace of a namespaced record.
        namespace: Option<String>,
        /// Name.
        name: String,
        /// `/status`.
        status: bool,
    },
}

/// Route the rest of a path (after the group-version prefix); None when nothing is there.
pub fn route(kinds: &Kinds, rest: &str) -> Option<Endpoint> {
    let segs: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let (namespace, segs) = match segs.as_slice() {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail),
        _ => (None, segs.as_slice()),
    };
    let plural = *segs.first()?;
    let kind = kinds.by_plural(plural)?;
    let has_namespace = namespace.is_some();
    if has_namespace && !kind.info.namespaced {
        return None;
    }
    let ep = match segs {
        [p] => Endpoint::Collection {
            plural: p.to_string(),
            namespace,
        },
        [p, name] if !name.is_empty() => Endpoint::Object {
            plural: p.to_string(),
            namespace,
            name: name.to_string(),
            status: false,
        },
        [p, name, "status"] if !name.is_empty() => Endpoint::Object {
            plural: p.to_string(),
            namespace,
            name: name.to_string(),
            status: true,
        },
        _ => return None,
    };
    if kind.info.namespaced && !has_namespace && matches!(ep, Endpoint::Object { .. }) {
        return None;
    }
    Some(ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(plural: &str, ns: Option<&str>, name: &str, status: bool) -> Option<Endpoint> {
        Some(Endpoint::Object {
            plural: plural.into(),
            namespace: ns.map(str::to_string),
            name: name.into(),
            status,
        })
    }

    #[test]
    fn paths_route_to_endpoints() {
        let k = Kinds::load();
        let coll = |p: &str, ns: Option<&str>| {
            Some(Endpoint::Collection {
                plural: p.into(),
                namespace: ns.map(str::to_string),
            })
        };
        let rows = [
            ("instances", coll("instances", None)),
            ("namespaces/acme/instances", coll("instances", Some("acme"))),
            (
                "namespaces/acme/instances/web",
                obj("instances", Some("acme"), "web", false),
            ),
            (
                "namespaces/acme/instances/web/status",
                obj("instances", Some("acme"), "web", true),
            ),
            ("nodes", coll("nodes", None)),
            ("nodes/node-1", obj("nodes", None, "node-1", false)),
            ("nodes/node-1/status", obj("nodes", None, "node-1", true)),
            // A namespaced record needs its namespace; a cluster-scoped one has none.
            ("instances/web", None),
            ("namespaces/acme/nodes", None),
            ("widgets", None),
            ("namespaces/acme/instances/web/scale", None),
        ];
        for (path, want) in rows {
            assert_eq!(route(&k, path), want, "{path}");
        }
    }
}
