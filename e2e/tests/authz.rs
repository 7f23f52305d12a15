//! Who may do what, shown with kubectl (and the raw HTTPS answer behind each refusal) against a
//! real gateway on real etcd: a node token sees and writes only its own Node record and the
//! instances bound to it; an account token works only in its own namespace and reads the public
//! catalogue. Every refusal is a `Status` 403 Forbidden that leaves the data unchanged.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use karri_e2e::support::{
    expect_status, instance_json, instance_yaml, kubectl_err, kubectl_json, kubectl_refused,
    message, Api, Cluster, KubectlStream, API,
};
use karri_testkit::kubectl_ok;
use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};

const MERGE: &str = "application/merge-patch+json";

/// Records every test starts with, created by the admin:
///
/// | record | namespace | bound to |
/// |---|---|---|
/// | Node node-1, node-2 | | |
/// | Instance on-1 | acme | node-1 |
/// | Instance on-2 | acme | node-2 |
/// | Instance unbound | acme | |
/// | Instance far-1 | globex | node-1 |
/// | Instance far-2 | globex | node-2 |
/// | Image karri-micro (the sample) | acme | |
/// | InstanceTypes (the samples) | | |
async fn world() -> anyhow::Result<Cluster> {
    let c = Cluster::start().await?;
    let nodes = c.manifest(
        "nodes.yaml",
        "apiVersion: karri.dev/v1alpha1\nkind: Node\nmetadata:\n  name: node-1\nspec:\n  availabilityZone: karri-1a\n\
         ---\n\
         apiVersion: karri.dev/v1alpha1\nkind: Node\nmetadata:\n  name: node-2\nspec:\n  availabilityZone: karri-1a\n",
    )?;
    apply(&c.admin, &nodes, "acme")?;
    let samples = karri_testkit::workspace_root()
        .join("config")
        .join("samples");
    for sample in ["image.yaml", "instance-type.yaml"] {
        apply(&c.admin, &samples.join(sample), "acme")?;
    }
    for (ns, name, node) in [
        ("acme", "on-1", Some("node-1")),
        ("acme", "on-2", Some("node-2")),
        ("acme", "unbound", None),
        ("globex", "far-1", Some("node-1")),
        ("globex", "far-2", Some("node-2")),
    ] {
        let m = c.manifest(
            &format!("{ns}-{name}.yaml"),
            &instance_yaml(name, "m1.small"),
        )?;
        apply(&c.admin, &m, ns)?;
        if let Some(node) = node {
            bind(&c, ns, name, node)?;
        }
    }
    Ok(c)
}

fn apply(kubeconfig: &Path, file: &Path, ns: &str) -> anyhow::Result<String> {
    let f = file.to_str().context("path is not UTF-8")?;
    kubectl_ok(kubeconfig, &["apply", "-n", ns, "-f", f])
}

/// Binds an instance to a node the way the scheduler does: through the status subresource.
fn bind(c: &Cluster, ns: &str, name: &str, node: &str) -> anyhow::Result<()> {
    let patch = json!({"status": {"nodeName": node}}).to_string();
    kubectl_ok(
        &c.admin,
        &[
            "patch",
            "instance",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            &patch,
        ],
    )?;
    Ok(())
}

/// Everything stored, as the admin sees it, for "the data is unchanged" checks.
async fn snapshot(c: &Cluster) -> anyhow::Result<Vec<Value>> {
    let api = c.admin_api()?;
    let mut all = Vec::new();
    for plural in [
        "accounts",
        "availabilityzones",
        "nodes",
        "instancetypes",
        "images",
        "instances",
        "leases",
    ] {
        all.extend(api.items(&format!("{API}/{plural}")).await?);
    }
    Ok(all)
}

/// `namespace/name` of the instances a `kubectl get instances ... -o json` lists, sorted.
fn listed(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut all = vec!["get", "instances"];
    all.extend(args);
    let list = kubectl_json(kubeconfig, &all)?;
    let mut names: Vec<String> = list["items"]
        .as_array()
        .context("no items")?
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Sends a raw request, which must be refused with a Status 403 Forbidden; returns the Status.
async fn forbidden(
    api: &Api,
    method: Method,
    path: &str,
    body: Option<(&str, Value)>,
) -> anyhow::Result<Value> {
    let mut req = api.request(method.clone(), path);
    if let Some((ct, body)) = body {
        req = req
            .header(CONTENT_TYPE, ct)
            .body(serde_json::to_vec(&body)?);
    }
    let resp = req.send().await?;
    expect_status(resp, 403, "Forbidden")
        .await
        .with_context(|| format!("{method} {path}"))
}

fn inst(ns: &str, name: &str) -> String {
    format!("{API}/namespaces/{ns}/instances/{name}")
}

fn node_api(c: &Cluster, node: &str) -> anyhow::Result<Api> {
    c.api(Some(c.tokens.node(node).context("no node token")?))
}

fn account_api(c: &Cluster, ns: &str) -> anyhow::Result<Api> {
    c.api(Some(c.tokens.account(ns).context("no account token")?))
}

#[tokio::test(flavor = "multi_thread")]
async fn node_sees_only_the_instances_bound_to_it() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    ensure!(
        listed(&node, &["-A"])? == ["acme/on-1", "globex/far-1"],
        "node-1 lists {:?}",
        listed(&node, &["-A"])?
    );
    ensure!(
        listed(&node, &["-A", "--field-selector", "status.nodeName=node-1"])?
            == ["acme/on-1", "globex/far-1"],
        "the field selector status.nodeName=node-1 does not give node-1 its instances"
    );
    ensure!(
        listed(&node, &["-A", "--field-selector", "status.nodeName=node-2"])?.is_empty(),
        "node-1 sees node-2's instances through a field selector"
    );
    ensure!(
        listed(&node, &[])? == ["acme/on-1"],
        "node-1 lists in acme: {:?}",
        listed(&node, &[])?
    );
    let table = kubectl_ok(&node, &["get", "instances", "-A"])?;
    ensure!(
        table.lines().count() == 3 && !table.contains("on-2") && !table.contains("unbound"),
        "node-1's table shows other instances:\n{table}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_watch_shows_an_instance_once_it_is_bound_to_it() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let mut watch = KubectlStream::spawn(
        &node,
        &[
            "get",
            "instances",
            "-A",
            "-w",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.metadata.namespace}/{.object.metadata.name}{\"\\n\"}",
        ],
    )?;
    let wait = Duration::from_secs(20);
    watch.next_line("ADDED acme/on-1", wait, |l| l == "ADDED acme/on-1")?;
    watch.next_line("ADDED globex/far-1", wait, |l| l == "ADDED globex/far-1")?;
    // Binding one instance elsewhere and then one to node-1: only the second shows.
    bind(&c, "acme", "unbound", "node-2")?;
    let extra = c.manifest("late.yaml", &instance_yaml("late", "m1.small"))?;
    apply(&c.admin, &extra, "acme")?;
    bind(&c, "acme", "late", "node-1")?;
    watch.next_line("ADDED acme/late", wait, |l| l == "ADDED acme/late")?;
    ensure!(watch.running()?, "the watch ended");
    ensure!(
        watch
            .seen()
            .iter()
            .all(|l| ["acme/on-1", "globex/far-1", "acme/late"]
                .iter()
                .any(|n| l.ends_with(n))),
        "node-1's watch shows other instances: {:?}",
        watch.seen()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_cannot_read_another_nodes_instance() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let before = snapshot(&c).await?;
    let stderr = kubectl_err(&node, &["get", "instance", "on-2", "-n", "acme"])?;
    // Another node's instance is invisible: 404, so that its existence does not leak.
    ensure!(stderr.contains("Error from server (NotFound)"), "{stderr}");
    let resp = node_api(&c, "node-1")?
        .request(Method::GET, &inst("acme", "on-2"))
        .send()
        .await?;
    expect_status(resp, 404, "NotFound").await?;
    ensure!(snapshot(&c).await? == before, "a refused read changed data");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_cannot_patch_another_nodes_instance() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let api = node_api(&c, "node-1")?;
    let before = snapshot(&c).await?;
    let refusals = async {
        // The raw answers first: kubectl's own message hides a 404 behind its namespace check.
        forbidden(
            &api,
            Method::PATCH,
            &inst("acme", "on-2"),
            Some((MERGE, json!({"spec": {"instanceType": "c1.medium"}}))),
        )
        .await?;
        // Another node's instance is not there for this node: the answer of a name that does
        // not exist, so that existence does not leak.
        let resp = api
            .request(Method::PATCH, &format!("{}/status", inst("acme", "on-2")))
            .header(CONTENT_TYPE, MERGE)
            .body(serde_json::to_vec(
                &json!({"status": {"nodeName": "node-1"}}),
            )?)
            .send()
            .await?;
        expect_status(resp, 404, "NotFound").await?;
        let resp = api
            .request(Method::GET, &inst("acme", "on-2"))
            .send()
            .await?;
        expect_status(resp, 404, "NotFound").await?;
        // kubectl reads the record first, and finds none.
        kubectl_refused(
            &node,
            &[
                "patch",
                "instance",
                "on-2",
                "-n",
                "acme",
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"instanceType":"c1.medium"}}"#,
            ],
            "NotFound",
        )?;
        anyhow::Ok(())
    }
    .await;
    // Whatever the answers were, nothing may have changed.
    ensure!(
        snapshot(&c).await? == before,
        "a refused patch changed data"
    );
    refusals
}

#[tokio::test(flavor = "multi_thread")]
async fn node_cannot_rebind_its_instance_to_another_node() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let api = node_api(&c, "node-1")?;
    let before = snapshot(&c).await?;
    kubectl_refused(
        &node,
        &[
            "patch",
            "instance",
            "on-1",
            "-n",
            "acme",
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"nodeName":"node-2"}}"#,
        ],
        "Forbidden",
    )?;
    forbidden(
        &api,
        Method::PATCH,
        &format!("{}/status", inst("acme", "on-1")),
        Some((MERGE, json!({"status": {"nodeName": "node-2"}}))),
    )
    .await?;
    let mut current = api.get_json(&inst("acme", "on-1")).await?;
    current["status"]["nodeName"] = json!("node-2");
    let put = forbidden(
        &api,
        Method::PUT,
        &format!("{}/status", inst("acme", "on-1")),
        Some(("application/json", current)),
    )
    .await?;
    ensure!(
        message(&put).contains("node-1"),
        "the refusal does not say who was refused: {put}"
    );
    ensure!(
        snapshot(&c).await? == before,
        "a refused re-bind changed data"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_can_update_the_status_of_its_own_instance() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let before = kubectl_json(&c.admin, &["get", "instance", "on-1"])?;
    kubectl_ok(
        &node,
        &[
            "patch",
            "instance",
            "on-1",
            "-n",
            "acme",
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"consoleOutput":"hello","conditions":[{"type":"DomainRunning","status":"True","reason":"Running","message":"the domain runs","lastTransitionTime":"2026-11-25T12:00:00Z"}]}}"#,
        ],
    )?;
    let after = kubectl_json(&c.admin, &["get", "instance", "on-1"])?;
    ensure!(after["status"]["consoleOutput"] == "hello", "{after}");
    ensure!(
        after["status"]["conditions"][0]["type"] == "DomainRunning",
        "{after}"
    );
    ensure!(after["status"]["nodeName"] == "node-1", "{after}");
    ensure!(
        after["metadata"]["generation"] == before["metadata"]["generation"]
            && after["spec"] == before["spec"],
        "a status write changed spec or generation:\n{before}\n{after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_reports_on_its_instance_but_cannot_change_what_the_operator_or_the_owner_set(
) -> anyhow::Result<()> {
    let c = world().await?;
    let api = node_api(&c, "node-1")?;
    let before = snapshot(&c).await?;
    let status = format!("{}/status", inst("acme", "on-1"));
    let refusals = async {
        for patch in [
            // The EC2 state, the address and the launch spec are the operator's.
            json!({"status": {"state": "running"}}),
            json!({"status": {"privateIpAddress": "172.31.0.99"}}),
            json!({"status": {"launch": {"root": {
                "imageId": "emi-0123456789abcdef0",
                "location": "someone-elses-bucket/secret.img",
                "sha256": "00",
                "format": "raw"
            }}}}),
            // So are conditions other than DomainRunning.
            json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "Forged", "message": "",
                "lastTransitionTime": "2026-11-25T12:00:00Z"
            }]}}),
        ] {
            let refused = forbidden(&api, Method::PATCH, &status, Some((MERGE, patch))).await?;
            ensure!(message(&refused).contains("may report only"), "{refused}");
        }
        // The record itself (labels, owners, finalizers, spec) is the owner's.
        for patch in [
            json!({"metadata": {"labels": {"stolen": "yes"}}}),
            json!({"metadata": {"finalizers": null}}),
            json!({"metadata": {"ownerReferences": [{
                "apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "x",
                "uid": "00000000-0000-0000-0000-000000000000"
            }]}}),
        ] {
            forbidden(
                &api,
                Method::PATCH,
                &inst("acme", "on-1"),
                Some((MERGE, patch)),
            )
            .await?;
        }
        anyhow::Ok(())
    }
    .await;
    ensure!(
        snapshot(&c).await? == before,
        "a refused write changed data"
    );
    refusals
}

#[tokio::test(flavor = "multi_thread")]
async fn node_reads_and_updates_only_its_own_node_record() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let api = node_api(&c, "node-1")?;

    let own = kubectl_json(&node, &["get", "node.karri.dev", "node-1"])?;
    ensure!(own["metadata"]["name"] == "node-1", "{own}");
    // Its status is its own to report; its spec (zone, cordon, instance cap) is the
    // administrators'.
    kubectl_ok(
        &node,
        &[
            "patch",
            "node.karri.dev",
            "node-1",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"allocatable":{"vcpus":3,"memoryMiB":1024,"diskGiB":10}}}"#,
        ],
    )?;
    let patched = kubectl_json(&c.admin, &["get", "node.karri.dev", "node-1"])?;
    ensure!(patched["status"]["allocatable"]["vcpus"] == 3, "{patched}");
    let own_spec = snapshot(&c).await?;
    kubectl_refused(
        &node,
        &[
            "patch",
            "node.karri.dev",
            "node-1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"unschedulable":false,"availabilityZone":"karri-1b"}}"#,
        ],
        "Forbidden",
    )?;
    ensure!(
        snapshot(&c).await? == own_spec,
        "a refused write of its own spec changed data"
    );
    let names: Vec<String> = kubectl_json(&node, &["get", "nodes.karri.dev"])?["items"]
        .as_array()
        .context("no items")?
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    ensure!(names == ["node-1"], "node-1 lists nodes {names:?}");

    let before = snapshot(&c).await?;
    kubectl_refused(&node, &["get", "node.karri.dev", "node-2"], "Forbidden")?;
    kubectl_refused(
        &node,
        &[
            "patch",
            "node.karri.dev",
            "node-2",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"unschedulable":true}}"#,
        ],
        "Forbidden",
    )?;
    kubectl_refused(&node, &["delete", "node.karri.dev", "node-1"], "Forbidden")?;
    forbidden(&api, Method::GET, &format!("{API}/nodes/node-2"), None).await?;
    forbidden(
        &api,
        Method::PATCH,
        &format!("{API}/nodes/node-2"),
        Some((MERGE, json!({"spec": {"unschedulable": true}}))),
    )
    .await?;
    forbidden(
        &api,
        Method::PATCH,
        &format!("{API}/nodes/node-2/status"),
        Some((MERGE, json!({"status": {"phase": "Ready"}}))),
    )
    .await?;
    forbidden(&api, Method::DELETE, &format!("{API}/nodes/node-2"), None).await?;
    ensure!(
        snapshot(&c).await? == before,
        "a refused node write changed data"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_cannot_create_or_delete_instances() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let api = node_api(&c, "node-1")?;
    let before = snapshot(&c).await?;
    let m = c.manifest("new.yaml", &instance_yaml("new", "m1.small"))?;
    kubectl_refused(
        &node,
        &["create", "-f", m.to_str().context("path")?],
        "Forbidden",
    )?;
    kubectl_refused(
        &node,
        &["delete", "instance", "on-1", "-n", "acme"],
        "Forbidden",
    )?;
    forbidden(
        &api,
        Method::POST,
        &format!("{API}/namespaces/acme/instances"),
        Some(("application/json", instance_json("new"))),
    )
    .await?;
    forbidden(&api, Method::DELETE, &inst("acme", "on-1"), None).await?;
    forbidden(
        &api,
        Method::DELETE,
        &format!("{API}/namespaces/acme/instances"),
        None,
    )
    .await?;
    forbidden(&api, Method::DELETE, &format!("{API}/nodes"), None).await?;
    ensure!(
        snapshot(&c).await? == before,
        "a refused create or delete changed data"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_cannot_read_images() -> anyhow::Result<()> {
    let c = world().await?;
    let node = c.node_kubeconfig("node-1")?;
    let api = node_api(&c, "node-1")?;
    kubectl_refused(&node, &["get", "images"], "Forbidden")?;
    kubectl_refused(&node, &["get", "images", "-A"], "Forbidden")?;
    kubectl_refused(&node, &["get", "image", "karri-micro"], "Forbidden")?;
    forbidden(&api, Method::GET, &format!("{API}/images"), None).await?;
    forbidden(
        &api,
        Method::GET,
        &format!("{API}/namespaces/acme/images/karri-micro"),
        None,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn account_can_create_and_list_instances_in_its_namespace() -> anyhow::Result<()> {
    let c = world().await?;
    let acme = c.account_kubeconfig("acme")?;
    let m = c.manifest("mine.yaml", &instance_yaml("mine", "m1.small"))?;
    let out = kubectl_ok(&acme, &["apply", "-f", m.to_str().context("path")?])?;
    ensure!(out.trim() == "instance.karri.dev/mine created", "{out}");
    ensure!(
        listed(&acme, &[])? == ["acme/mine", "acme/on-1", "acme/on-2", "acme/unbound"],
        "acme lists {:?}",
        listed(&acme, &[])?
    );
    let stored = kubectl_json(&c.admin, &["get", "instance", "mine", "-n", "acme"])?;
    ensure!(stored["metadata"]["namespace"] == "acme", "{stored}");
    let names = account_api(&c, "acme")?
        .names(&format!("{API}/namespaces/acme/instances"))
        .await?;
    ensure!(names.iter().any(|n| n == "mine"), "{names:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn account_cannot_write_the_status_of_its_own_instances() -> anyhow::Result<()> {
    let c = world().await?;
    let api = account_api(&c, "acme")?;
    let before = snapshot(&c).await?;
    // Binding an instance to a node of its choosing would bypass placement.
    forbidden(
        &api,
        Method::PATCH,
        &format!("{}/status", inst("acme", "unbound")),
        Some((
            "application/merge-patch+json",
            json!({"status": {"nodeName": "node-b", "state": "running"}}),
        )),
    )
    .await?;
    ensure!(
        snapshot(&c).await? == before,
        "a refused write changed records"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn account_registers_images_only_from_s3_never_a_node_path_or_url() -> anyhow::Result<()> {
    let c = world().await?;
    let api = account_api(&c, "acme")?;
    let before = snapshot(&c).await?;
    let images = "/apis/karri.dev/v1alpha1/namespaces/acme/images";
    let image = |name: &str, location: &str| {
        json!({
            "apiVersion": "karri.dev/v1alpha1", "kind": "Image",
            "metadata": {"name": name},
            "spec": {"name": name, "imageLocation": location, "format": "raw"}
        })
    };
    // A node agent reads a path as root and fetches a URL from inside the cloud.
    for (name, location) in [
        ("host-file", "/etc/shadow"),
        (
            "other-disk",
            "/var/lib/karri/instances/i-0123456789abcdef0/root.qcow2",
        ),
        ("node-service", "http://127.0.0.1:9100/metrics"),
    ] {
        let status = forbidden(
            &api,
            Method::POST,
            images,
            Some(("application/json", image(name, location))),
        )
        .await?;
        ensure!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.contains("is not in S3")),
            "{status}"
        );
    }
    ensure!(snapshot(&c).await? == before, "a refused image was stored");
    // From a bucket it is taken, once the object is there: an image of nothing is refused.
    let (_, creds) = c.gateway.account_with_key(&c.tokens.admin, "acme").await?;
    c.gateway
        .aws(
            &creds,
            &["s3api", "create-bucket", "--bucket", "acme-images"],
        )
        .await?;
    let post = |name: &str| {
        api.request(Method::POST, images)
            .header(CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&image(name, "acme-images/disk.raw")).unwrap_or_default())
            .send()
    };
    let early = post("too-early").await?;
    expect_status(early, 422, "Invalid")
        .await
        .context("an image of an object not uploaded yet")?;
    let disk = c.manifest("disk.raw", "a disk")?;
    let disk = disk.to_str().context("path is not UTF-8")?;
    c.gateway
        .aws(
            &creds,
            &[
                "s3api",
                "put-object",
                "--bucket",
                "acme-images",
                "--key",
                "disk.raw",
                "--body",
                disk,
            ],
        )
        .await?;
    let made = post("from-s3").await?;
    ensure!(made.status() == 201, "{:?}", made.text().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn account_cannot_strip_the_operators_finalizer_from_its_instance() -> anyhow::Result<()> {
    let c = world().await?;
    let api = account_api(&c, "acme")?;
    let admin = c.api(Some(&c.tokens.admin))?;
    // The operator's finalizer, as the operator puts it on every instance.
    let path = inst("acme", "unbound");
    let resp = admin
        .request(Method::PATCH, &path)
        .header(CONTENT_TYPE, MERGE)
        .body(serde_json::to_vec(
            &json!({"metadata": {"finalizers": ["karri.dev/instance"]}}),
        )?)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "admin patch: {}", resp.status());
    let before = snapshot(&c).await?;
    for patch in [
        json!({"metadata": {"finalizers": null}}),
        json!({"metadata": {"finalizers": ["example.com/mine"]}}),
    ] {
        let refused = forbidden(&api, Method::PATCH, &path, Some((MERGE, patch))).await?;
        ensure!(
            message(&refused).contains("may not remove the finalizer karri.dev/instance"),
            "{refused}"
        );
    }
    ensure!(
        snapshot(&c).await? == before,
        "a refused write changed records"
    );
    // Deleting it is the owner's right: the record stays, terminating, for the operator.
    let resp = api.request(Method::DELETE, &path).send().await?;
    ensure!(resp.status().is_success(), "delete: {}", resp.status());
    let after = kubectl_json(&c.admin, &["get", "instance", "unbound", "-n", "acme"])?;
    ensure!(
        after["metadata"]["deletionTimestamp"].is_string()
            && after["metadata"]["finalizers"] == json!(["karri.dev/instance"]),
        "{after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn account_is_forbidden_in_other_namespaces_and_at_cluster_scope() -> anyhow::Result<()> {
    let c = world().await?;
    let acme = c.account_kubeconfig("acme")?;
    let api = account_api(&c, "acme")?;
    let before = snapshot(&c).await?;

    kubectl_refused(&acme, &["get", "instances", "-n", "globex"], "Forbidden")?;
    kubectl_refused(
        &acme,
        &["get", "instance", "far-1", "-n", "globex"],
        "Forbidden",
    )?;
    kubectl_refused(&acme, &["get", "instances", "-A"], "Forbidden")?;
    let m = c.manifest("intruder.yaml", &instance_yaml("intruder", "m1.small"))?;
    kubectl_refused(
        &acme,
        &["create", "-n", "globex", "-f", m.to_str().context("path")?],
        "Forbidden",
    )?;
    kubectl_refused(
        &acme,
        &["delete", "instance", "far-1", "-n", "globex"],
        "Forbidden",
    )?;

    forbidden(
        &api,
        Method::GET,
        &format!("{API}/namespaces/globex/instances"),
        None,
    )
    .await?;
    forbidden(&api, Method::GET, &inst("globex", "far-1"), None).await?;
    forbidden(&api, Method::GET, &format!("{API}/instances"), None).await?;
    forbidden(
        &api,
        Method::GET,
        &format!("{API}/instances?watch=true"),
        None,
    )
    .await?;
    forbidden(
        &api,
        Method::POST,
        &format!("{API}/namespaces/globex/instances"),
        Some(("application/json", instance_json("intruder"))),
    )
    .await?;
    forbidden(
        &api,
        Method::PATCH,
        &inst("globex", "far-1"),
        Some((MERGE, json!({"spec": {"instanceType": "c1.medium"}}))),
    )
    .await?;
    forbidden(&api, Method::DELETE, &inst("globex", "far-1"), None).await?;
    forbidden(
        &api,
        Method::DELETE,
        &format!("{API}/namespaces/globex/instances"),
        None,
    )
    .await?;
    forbidden(&api, Method::DELETE, &format!("{API}/instancetypes"), None).await?;
    ensure!(
        snapshot(&c).await? == before,
        "a refused request changed data"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn account_reads_instance_types_but_not_nodes_or_accounts() -> anyhow::Result<()> {
    let c = world().await?;
    let acme = c.account_kubeconfig("acme")?;
    let api = account_api(&c, "acme")?;
    let names = |list: Value| -> Vec<String> {
        list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let all_types = names(kubectl_json(&c.admin, &["get", "instancetypes"])?);
    let seen = names(kubectl_json(&acme, &["get", "instancetypes"])?);
    ensure!(
        !all_types.is_empty() && seen == all_types,
        "acme sees instance types {seen:?} of {all_types:?}"
    );
    kubectl_ok(&acme, &["get", "instancetype", "m1.small"])?;

    let before = snapshot(&c).await?;
    kubectl_refused(&acme, &["get", "nodes.karri.dev"], "Forbidden")?;
    kubectl_refused(&acme, &["get", "node.karri.dev", "node-1"], "Forbidden")?;
    kubectl_refused(&acme, &["get", "accounts"], "Forbidden")?;
    kubectl_refused(
        &acme,
        &[
            "patch",
            "instancetype",
            "m1.small",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"vcpus":8}}"#,
        ],
        "Forbidden",
    )?;
    forbidden(&api, Method::GET, &format!("{API}/nodes"), None).await?;
    forbidden(&api, Method::GET, &format!("{API}/nodes/node-1"), None).await?;
    forbidden(&api, Method::GET, &format!("{API}/accounts"), None).await?;
    forbidden(
        &api,
        Method::DELETE,
        &format!("{API}/instancetypes/m1.small"),
        None,
    )
    .await?;
    ensure!(
        snapshot(&c).await? == before,
        "a refused request changed data"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_renews_only_its_own_lease_and_reads_instance_types() -> anyhow::Result<()> {
    let c = world().await?;
    let api = node_api(&c, "node-1")?;
    let lease = |name: &str| {
        json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Lease", "metadata": {"name": name},
               "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}})
    };
    let node_leases = format!("{API}/namespaces/karri-node-lease/leases");
    let created = api
        .request(Method::POST, &node_leases)
        .json(&lease("node-1"))
        .send()
        .await?;
    ensure!(
        created.status() == 201,
        "own lease: {}",
        created.text().await?
    );
    let before = snapshot(&c).await?;
    forbidden(
        &api,
        Method::POST,
        &node_leases,
        Some(("application/json", lease("node-2"))),
    )
    .await?;
    forbidden(
        &api,
        Method::POST,
        &format!("{API}/namespaces/karri-system/leases"),
        Some(("application/json", lease("node-1"))),
    )
    .await?;
    forbidden(&api, Method::DELETE, &format!("{node_leases}/node-1"), None).await?;
    let types = api.items(&format!("{API}/instancetypes")).await?;
    ensure!(!types.is_empty(), "the instance type catalogue is readable");
    forbidden(
        &api,
        Method::DELETE,
        &format!("{API}/instancetypes/m1.small"),
        None,
    )
    .await?;
    ensure!(snapshot(&c).await? == before, "refusals changed data");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_auth_can_i_answers_what_each_token_may_do() -> anyhow::Result<()> {
    let c = world().await?;
    let acme = c.account_kubeconfig("acme")?;
    let node = c.node_kubeconfig("node-1")?;
    // `kubectl auth can-i` prints yes or no, and exits 0 only for yes.
    let can = |kubeconfig: &Path, args: &[&str]| -> anyhow::Result<bool> {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let out = karri_testkit::kubectl(kubeconfig, &all);
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match (said.as_str(), out.status.success()) {
            ("yes", true) => Ok(true),
            ("no", false) => Ok(false),
            _ => anyhow::bail!(
                "kubectl auth can-i {args:?} said {said:?} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    let rows: [(&Path, &[&str], bool); 13] = [
        (&c.admin, &["delete", "nodes"], true),
        (&c.admin, &["*", "*"], true),
        (&acme, &["create", "instances"], true),
        (&acme, &["create", "instances", "-n", "globex"], false),
        (&acme, &["list", "instancetypes"], true),
        (&acme, &["create", "instancetypes"], false),
        (&acme, &["delete", "nodes"], false),
        // Status is Karri's: an account reads it, and writing it is refused.
        (&acme, &["get", "instances", "--subresource=status"], true),
        (
            &acme,
            &["patch", "instances", "--subresource=status"],
            false,
        ),
        // A node writes its own Node record's status, not its spec, nor another node's.
        (
            &node,
            &["patch", "node/node-1", "--subresource=status"],
            true,
        ),
        (&node, &["patch", "node/node-1"], false),
        (
            &node,
            &["patch", "node/node-2", "--subresource=status"],
            false,
        ),
        (&node, &["patch", "instances", "--subresource=status"], true),
    ];
    for (kubeconfig, args, want) in rows {
        ensure!(
            can(kubeconfig, args)? == want,
            "{} may {args:?}: expected {want}",
            kubeconfig.display()
        );
    }
    // `kubectl auth can-i --list` prints a line per resource: its names and verbs.
    let list = |kubeconfig: &Path, namespace: &str| -> anyhow::Result<(String, String)> {
        let out = karri_testkit::kubectl(kubeconfig, &["auth", "can-i", "--list", "-n", namespace]);
        ensure!(
            out.status.success(),
            "kubectl auth can-i --list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let line = |listing: &str, resource: &str| -> Option<String> {
        listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(resource))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let (own, _) = list(&acme, "acme")?;
    ensure!(
        line(&own, "instances.karri.dev")
            .is_some_and(|l| l.contains("create") && l.contains("deletecollection")),
        "acme in its namespace: {own}"
    );
    ensure!(
        line(&own, "instancetypes.karri.dev").is_some_and(|l| l.ends_with("[get list watch]")),
        "acme reads the catalogue: {own}"
    );
    ensure!(
        line(&own, "nodes.karri.dev").is_none(),
        "acme sees no node: {own}"
    );
    ensure!(
        line(&own, "instances.karri.dev/status").is_some_and(|l| l.ends_with("[get]")),
        "acme only reads status: {own}"
    );
    let (other, _) = list(&acme, "globex")?;
    ensure!(
        line(&other, "instances.karri.dev").is_none()
            && line(&other, "instancetypes.karri.dev").is_some(),
        "acme in another namespace: {other}"
    );
    let (own_node, warning) = list(&node, "default")?;
    ensure!(
        own_node
            .lines()
            .any(|l| l.starts_with("nodes.karri.dev/status")
                && l.contains("[node-1]")
                && l.contains("patch")),
        "a node may write its own Node record: {own_node}"
    );
    ensure!(
        warning.contains("bound to it"),
        "kubectl warns that a node's list is incomplete: {warning}"
    );
    // `kubectl auth whoami` (kubectl 1.28 and later) names the account's group.
    let me = kubectl_json(&acme, &["auth", "whoami", "-o", "json"])?;
    ensure!(
        me["status"]["userInfo"]["groups"]
            .as_array()
            .is_some_and(|g| g.contains(&json!("karri:account:acme"))),
        "kubectl auth whoami: {me}"
    );
    Ok(())
}

/// What a token's SelfSubjectRulesReview lists, the gateway serves, and a kind it lists no read
/// of, the gateway refuses: each kind's list (allowed exactly when a rule lists `list` on it,
/// named or not), each named `get`, and the namespaces. Reads only; writes are checked
/// against the same functions by the unit tables of `auth` and `review`.
#[tokio::test(flavor = "multi_thread")]
async fn what_a_rules_review_lists_is_served_and_what_it_leaves_out_is_refused(
) -> anyhow::Result<()> {
    let c = world().await?;
    let admin = c.admin_api()?;
    let kinds: Vec<(String, bool)> = admin.get_json(API).await?["resources"]
        .as_array()
        .context("no resources in discovery")?
        .iter()
        .filter_map(|r| Some((r["name"].as_str()?.to_owned(), r["namespaced"].as_bool()?)))
        .filter(|(name, _)| !name.contains('/'))
        .collect();
    ensure!(kinds.len() > 5, "discovery lists {kinds:?}");
    for (who, api, ns) in [
        ("acme", account_api(&c, "acme")?, "acme"),
        ("acme", account_api(&c, "acme")?, "globex"),
        ("node-1", node_api(&c, "node-1")?, "acme"),
        (
            "node-1",
            node_api(&c, "node-1")?,
            crds::NODE_LEASE_NAMESPACE,
        ),
    ] {
        let review = api
            .request(
                Method::POST,
                "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
            )
            .json(&json!({"apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectRulesReview", "spec": {"namespace": ns}}))
            .send()
            .await?;
        ensure!(review.status() == 201, "{who} review: {}", review.status());
        let review: Value = review.json().await?;
        let rules: Vec<&Value> = review["status"]["resourceRules"]
            .as_array()
            .context("no rules")?
            .iter()
            .collect();
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
        let on = |group: &str, resource: &str, verb: &str| -> Vec<Vec<String>> {
            rules
                .iter()
                .filter(|r| strings(&r["apiGroups"]).iter().any(|g| g == group))
                .filter(|r| strings(&r["resources"]).iter().any(|x| x == resource))
                .filter(|r| strings(&r["verbs"]).iter().any(|v| v == verb))
                .map(|r| strings(&r["resourceNames"]))
                .collect()
        };
        for (plural, namespaced) in &kinds {
            let path = if *namespaced {
                format!("{API}/namespaces/{ns}/{plural}")
            } else {
                format!("{API}/{plural}")
            };
            let listed = !on(crds::GROUP, plural, "list").is_empty();
            let status = api.request(Method::GET, &path).send().await?.status();
            ensure!(
                (status != 403) == listed,
                "{who} in {ns}: list {plural} answered {status}, the review lists it: {listed}"
            );
            for names in on(crds::GROUP, plural, "get") {
                for name in names {
                    let status = api
                        .request(Method::GET, &format!("{path}/{name}"))
                        .send()
                        .await?
                        .status();
                    ensure!(
                        status != 403,
                        "{who} in {ns}: get {plural}/{name} is listed but answered {status}"
                    );
                }
            }
        }
        for names in on("", "namespaces", "get") {
            let shown = if names.is_empty() {
                vec![ns.to_owned()]
            } else {
                names
            };
            for name in shown {
                let status = api
                    .request(Method::GET, &format!("/api/v1/namespaces/{name}"))
                    .send()
                    .await?
                    .status();
                ensure!(
                    status == 200,
                    "{who}: namespace {name} is listed but answered {status}"
                );
            }
        }
    }
    // What the account's review does not name is refused.
    let acme = account_api(&c, "acme")?;
    let other = acme
        .request(Method::GET, "/api/v1/namespaces/globex")
        .send()
        .await?
        .status();
    ensure!(other == 403, "acme reads namespace globex: {other}");
    Ok(())
}

/// `kind: Lease` JSON with labels and finalizers.
fn lease_json(name: &str, labels: Value, finalizers: &[&str]) -> Value {
    json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "Lease",
        "metadata": {"name": name, "labels": labels, "finalizers": finalizers},
        "spec": {"holderIdentity": "someone", "leaseDurationSeconds": 30},
    })
}

/// The sorted names of the `items` of a list body.
fn item_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|o| o.pointer("/metadata/name").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn account_deletes_a_collection_by_label_and_a_finalizer_keeps_one_terminating(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let admin = c.admin_api()?;
    let acme = account_api(&c, "acme")?;
    for (ns, name, batch, finalizers) in [
        ("acme", "a", "x", &[][..]),
        ("acme", "b", "x", &["example.com/hold"][..]),
        ("acme", "c", "y", &[][..]),
        ("globex", "g", "x", &[][..]),
    ] {
        let resp = admin
            .request(Method::POST, &format!("{API}/namespaces/{ns}/leases"))
            .json(&lease_json(name, json!({"batch": batch}), finalizers))
            .send()
            .await?;
        ensure!(
            resp.status() == 201,
            "creating {ns}/{name}: {}",
            resp.status()
        );
    }
    let collection = format!("{API}/namespaces/acme/leases");
    let delete = |query: &str| {
        acme.request(Method::DELETE, &format!("{collection}?{query}"))
            .send()
    };

    // A dry run names what it would delete and deletes nothing.
    let resp = delete("labelSelector=batch%3Dx&dryRun=All").await?;
    ensure!(resp.status() == 200, "dry run answered {}", resp.status());
    let would: Value = resp.json().await?;
    ensure!(would["kind"] == "LeaseList", "{would}");
    ensure!(item_names(&would) == ["a", "b"], "{would}");
    ensure!(
        acme.names(&collection).await?.len() == 3,
        "the dry run deleted"
    );

    let resp = delete("labelSelector=batch%3Dx").await?;
    ensure!(
        resp.status() == 200,
        "deletecollection answered {}",
        resp.status()
    );
    let gone: Value = resp.json().await?;
    ensure!(item_names(&gone) == ["a", "b"], "{gone}");
    let held = gone["items"]
        .as_array()
        .and_then(|items| items.iter().find(|o| o["metadata"]["name"] == "b"))
        .context("b is not in the answer")?;
    ensure!(
        held["metadata"]["deletionTimestamp"].is_string(),
        "b, held by a finalizer, is not shown terminating: {held}"
    );
    let left = acme.items(&collection).await?;
    let mut left_names: Vec<&str> = left
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    left_names.sort();
    ensure!(left_names == ["b", "c"], "left: {left_names:?}");
    ensure!(
        admin
            .names(&format!("{API}/namespaces/globex/leases"))
            .await?
            == ["g"],
        "another namespace's record was deleted"
    );

    // Namespaced kinds have no collection to delete across namespaces.
    let resp = admin
        .request(Method::DELETE, &format!("{API}/leases"))
        .send()
        .await?;
    expect_status(resp, 405, "MethodNotAllowed").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_acting_as_an_account_with_kubectl_as_has_only_that_accounts_rights(
) -> anyhow::Result<()> {
    let c = world().await?;
    // Who the gateway takes the caller for, as kubectl asks it.
    let who = kubectl_json(&c.admin, &["auth", "whoami", "--as", "acme"])?;
    ensure!(
        who["status"]["userInfo"]["username"] == "acme"
            && who["status"]["userInfo"]["groups"]
                == json!(["karri:account:acme", "system:authenticated"]),
        "whoami --as acme answered {who}"
    );
    // Its own namespace works; another namespace and cluster scope are refused, as for acme's
    // own token, and nothing changes.
    ensure!(
        listed(&c.admin, &["-n", "acme", "--as", "acme"])?
            == ["acme/on-1", "acme/on-2", "acme/unbound"],
        "acting as acme lists {:?}",
        listed(&c.admin, &["-n", "acme", "--as", "acme"])?
    );
    let before = snapshot(&c).await?;
    kubectl_refused(
        &c.admin,
        &["get", "instances", "-n", "globex", "--as", "acme"],
        "Forbidden",
    )?;
    kubectl_refused(&c.admin, &["get", "nodes", "--as", "acme"], "Forbidden")?;
    kubectl_refused(
        &c.admin,
        &[
            "label",
            "instance",
            "far-1",
            "-n",
            "globex",
            "taken=yes",
            "--as",
            "acme",
        ],
        "Forbidden",
    )?;
    kubectl_refused(
        &c.admin,
        &[
            "delete", "instance", "far-1", "-n", "globex", "--as", "acme",
        ],
        "Forbidden",
    )?;
    // `kubectl auth can-i` prints yes or no, and exits 0 only for yes.
    for (ns, want) in [("acme", "yes"), ("globex", "no")] {
        let out = karri_testkit::kubectl(
            &c.admin,
            &[
                "auth",
                "can-i",
                "delete",
                "instances",
                "-n",
                ns,
                "--as",
                "acme",
            ],
        );
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(
            said == want && out.status.success() == (want == "yes"),
            "can-i delete instances in {ns} as acme said {said:?} ({})",
            out.status
        );
    }
    // Naming a group acme is not in (the administrators') does not lift it.
    let refused = kubectl_refused(
        &c.admin,
        &[
            "get",
            "instances",
            "-n",
            "globex",
            "--as",
            "acme",
            "--as-group",
            "system:masters",
        ],
        "Forbidden",
    )?;
    ensure!(
        refused.contains("cannot impersonate resource \"groups\""),
        "the refusal does not say which group: {refused}"
    );
    // Only an administrator may impersonate: acme cannot act as the admin, or as globex.
    let acme = c.account_kubeconfig("acme")?;
    for target in ["admin", "globex"] {
        let refused = kubectl_refused(
            &acme,
            &["get", "instances", "-n", "acme", "--as", target],
            "Forbidden",
        )?;
        ensure!(
            refused.contains("User \"acme\" cannot impersonate resource \"users\""),
            "acme --as {target}: {refused}"
        );
    }
    // An unknown user is refused, not served as the caller.
    kubectl_refused(
        &c.admin,
        &["get", "instances", "-n", "acme", "--as", "nobody"],
        "Forbidden",
    )?;
    ensure!(
        snapshot(&c).await? == before,
        "a refused impersonated request changed records"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_review_says_who_a_token_is_to_an_admin_and_to_the_tokens_owner_alone(
) -> anyhow::Result<()> {
    let c = world().await?;
    let acme_token = c
        .tokens
        .account("acme")
        .context("no account token")?
        .to_owned();
    let review = |token: &str| {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "spec": {"token": token}})
    };
    let post = |api: Api, body: Value| async move {
        let resp = api
            .request(Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews")
            .json(&body)
            .send()
            .await?;
        let code = resp.status().as_u16();
        let answer: Value = serde_json::from_str(&resp.text().await?)?;
        anyhow::Ok((code, answer))
    };
    let acme_is =
        json!({"username": "acme", "groups": ["karri:account:acme", "system:authenticated"]});
    // The admin reviews acme's token; acme reviews its own (what kr8s' whoami does).
    for api in [c.admin_api()?, account_api(&c, "acme")?] {
        let (code, answer) = post(api, review(&acme_token)).await?;
        ensure!(code == 201, "{code}: {answer}");
        ensure!(
            answer["status"]["authenticated"] == true && answer["status"]["user"] == acme_is,
            "{answer}"
        );
    }
    // An unknown token is not authenticated; only the admin may learn that.
    let (code, answer) = post(c.admin_api()?, review("no-such-token")).await?;
    ensure!(
        code == 201 && answer["status"]["authenticated"] == false,
        "{code}: {answer}"
    );
    // acme may not review another's token, or probe for tokens.
    for other in [c.tokens.admin.clone(), "no-such-token".to_owned()] {
        let (code, answer) = post(account_api(&c, "acme")?, review(&other)).await?;
        ensure!(
            code == 403 && answer["reason"] == "Forbidden",
            "{code}: {answer}"
        );
    }
    let (code, answer) = post(c.admin_api()?, json!({"spec": {}})).await?;
    ensure!(
        code == 400 && answer["kind"] == "Status",
        "{code}: {answer}"
    );
    Ok(())
}
