"""The official Kubernetes Python client (PyPI `kubernetes`, what Ansible's kubernetes.core
modules use) against Karri's resource API.

Usage: kube_client.py <namespace>, with KUBECONFIG naming a kubeconfig for the gateway whose
user may write in <namespace>. Prints one line per check and exits 0 when all hold, 1 with the
reason at the first that does not.

Checks: the version and core discovery calls the client makes on its own, the dynamic client's
lookup of a kind without its group (which reads every group, the core one included), create,
get, list by label, merge patch, server-side apply, a watch from a list's resourceVersion,
a refused bad label, self reviews (who am I, what may I do), delete, and delete of a
collection by label.
"""

import sys

from kubernetes import client, config, dynamic
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.exceptions import NotFoundError, UnprocessibleEntityError

GROUP_VERSION = "karri.dev/v1alpha1"


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def ok(what):
    print(f"ok: {what}", flush=True)


def lease(name, holder, labels):
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "Lease",
        "metadata": {"name": name, "labels": labels},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 30},
    }


def main(namespace):
    config.load_kube_config()
    api_client = client.ApiClient()

    version = client.VersionApi(api_client).get_code()
    check("karri" in version.git_version, f"VersionApi().get_code() said {version}")
    ok(f"VersionApi().get_code(): {version.git_version}")
    core = client.CoreV1Api(api_client).get_api_resources()
    check(core.group_version == "v1", f"CoreV1Api().get_api_resources() said {core}")
    ok("CoreV1Api().get_api_resources() answers the core group")

    crds = client.ApiextensionsV1Api(api_client).list_custom_resource_definition()
    names = {c.metadata.name for c in crds.items}
    check("instances.karri.dev" in names, f"the CRDs are {names}")
    ok(f"ApiextensionsV1Api lists the {len(names)} CRDs")

    dyn = dynamic.DynamicClient(api_client)
    instances = dyn.resources.get(kind="Instance")
    check(
        (instances.group_version, instances.name) == (GROUP_VERSION, "instances"),
        f"resources.get(kind='Instance') found {instances.group_version} {instances.name}",
    )
    ok("dynamic discovery finds Instance by its kind alone")

    leases = dyn.resources.get(api_version=GROUP_VERSION, kind="Lease")
    before = leases.get(namespace=namespace)
    since = before.metadata.resourceVersion
    made = leases.create(body=lease("py-lock", "alice", {"app": "py"}), namespace=namespace)
    check(made.spec.holderIdentity == "alice", f"created {made}")
    got = leases.get(name="py-lock", namespace=namespace)
    check(got.metadata.uid == made.metadata.uid, f"get answered {got}")
    listed = leases.get(namespace=namespace, label_selector="app=py")
    check([i.metadata.name for i in listed.items] == ["py-lock"], f"list by label: {listed}")
    ok("create, get and list by label")

    patched = leases.patch(
        name="py-lock",
        namespace=namespace,
        body={"spec": {"holderIdentity": "bob"}},
        content_type="application/merge-patch+json",
    )
    check(patched.spec.holderIdentity == "bob", f"merge patch: {patched}")
    applied = leases.server_side_apply(
        body=lease("py-lock", "carol", {"app": "py"}),
        name="py-lock",
        namespace=namespace,
        field_manager="py-client",
        force_conflicts=True,
    )
    check(applied.spec.holderIdentity == "carol", f"server-side apply: {applied}")
    ok("merge patch and server-side apply")

    seen = []
    for event in dyn.watch(leases, namespace=namespace, resource_version=since, timeout=10):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 3:
            break
    check(
        seen == [("ADDED", "py-lock"), ("MODIFIED", "py-lock"), ("MODIFIED", "py-lock")],
        f"a watch from the list's resourceVersion saw {seen}",
    )
    ok("a watch from the list's resourceVersion sees the create and both changes")

    try:
        leases.patch(
            name="py-lock",
            namespace=namespace,
            body={"metadata": {"labels": "oops"}},
            content_type="application/merge-patch+json",
        )
        raise Failure("labels that are not a map were accepted")
    except UnprocessibleEntityError as e:
        check("metadata.labels" in str(e.body), f"the refusal said {e.body}")
    kept = leases.get(name="py-lock", namespace=namespace)
    check(kept.metadata.labels.get("app") == "py", f"after the refusal: {kept.metadata.labels}")
    ok("labels that are not a map are refused (422) and the labels kept")

    who = client.AuthenticationV1Api(api_client).create_self_subject_review(
        body=client.V1SelfSubjectReview()
    )
    check(
        f"karri:account:{namespace}" in (who.status.user_info.groups or []),
        f"a self review answered {who.status}",
    )
    ok(f"a self review names the user {who.status.user_info.username}")
    authorization = client.AuthorizationV1Api(api_client)

    def can(verb, resource, ns):
        attrs = {"verb": verb, "group": "karri.dev", "resource": resource, "namespace": ns}
        review = authorization.create_self_subject_access_review(
            body={"spec": {"resourceAttributes": attrs}}
        )
        return review.status.allowed

    check(can("create", "instances", namespace), "may not create instances at home")
    check(not can("list", "instances", "kube-system"), "may list another namespace")
    check(not can("delete", "nodes", None), "may delete nodes")
    check(can("deletecollection", "leases", namespace), "may not delete a collection at home")
    ok("self access reviews answer what the account may do")

    leases.delete(name="py-lock", namespace=namespace)
    try:
        leases.get(name="py-lock", namespace=namespace)
        raise Failure("the deleted lease is still there")
    except NotFoundError:
        pass
    ok("delete")

    for name, batch in (("py-a", "py"), ("py-b", "py"), ("py-keep", "other")):
        leases.create(body=lease(name, "dave", {"batch": batch}), namespace=namespace)
    gone = leases.delete(namespace=namespace, label_selector="batch=py")
    gone_names = sorted(i.metadata.name for i in gone.items)
    check(gone_names == ["py-a", "py-b"], f"deletecollection answered {gone}")
    left = leases.get(namespace=namespace, label_selector="batch")
    check([i.metadata.name for i in left.items] == ["py-keep"], f"after deletecollection: {left}")
    ok("delete a collection by label selector")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except (Failure, ApiException) as e:
        print(f"FAILED: {e}", flush=True)
        sys.exit(1)
