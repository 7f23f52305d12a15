//! The real kubectl binary against a real gateway on real etcd: apply (client- and server-side),
//! get (tables, YAML, selectors, watch), delete (with and without finalizers), diff, explain and
//! server-side dry runs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context};
use karri_e2e::support::{
    instance_yaml, kubectl_err, kubectl_json, kubectl_names, kubectl_refused, parse_table, Cluster,
    KubectlStream, API, NODES,
};
use karri_testkit::{kubectl, kubectl_ok, workspace_root};
use serde_json::Value;

/// How long a `kubectl get -w` gets to show an expected line.
const WATCH_WAIT: Duration = Duration::from_secs(20);

/// Every Karri kind, through the CRD category they all share.
const ALL_KINDS: &str = "karri";

fn samples_dir() -> PathBuf {
    workspace_root().join("config").join("samples")
}

fn sample(file: &str) -> anyhow::Result<(PathBuf, String)> {
    let path = samples_dir().join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path, text))
}

fn path_str(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// `(kind, name)` of every object in `config/samples/*.yaml`.
fn sample_objects() -> anyhow::Result<Vec<(String, String)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(samples_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let mut doc = String::new();
        let mut docs = Vec::new();
        for line in text.lines() {
            if line.trim_end() == "---" {
                docs.push(std::mem::take(&mut doc));
            } else {
                doc.push_str(line);
                doc.push('\n');
            }
        }
        docs.push(doc);
        for d in docs {
            let v: Value = serde_norway::from_str(&d)
                .with_context(|| format!("parsing a document of {}", file.display()))?;
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().context("a sample without kind")?;
            let name = v["metadata"]["name"]
                .as_str()
                .context("a sample without name")?;
            objects.push((kind.to_string(), name.to_string()));
        }
    }
    Ok(objects)
}

/// `kind/name` → resourceVersion of every record, as the admin sees them.
fn resource_versions(c: &Cluster) -> anyhow::Result<Vec<(String, String)>> {
    let list = kubectl_json(&c.admin, &["get", ALL_KINDS, "-A"])?;
    let mut out: Vec<(String, String)> = list["items"]
        .as_array()
        .context("no items")?
        .iter()
        .map(|o| {
            (
                format!(
                    "{}/{}/{}",
                    o["kind"].as_str().unwrap_or(""),
                    o["metadata"]["namespace"].as_str().unwrap_or(""),
                    o["metadata"]["name"].as_str().unwrap_or("")
                ),
                o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_creates_every_sample_and_reapply_is_unchanged() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let dir = samples_dir();
    let expected = sample_objects()?;
    ensure!(
        expected.len() >= 6,
        "config/samples holds too few objects: {expected:?}"
    );

    let out = kubectl_ok(&c.admin, &["apply", "-f", path_str(&dir)?])?;
    for (kind, name) in &expected {
        let line = format!("{}.karri.dev/{name} created", kind.to_lowercase());
        ensure!(
            out.lines().any(|l| l == line),
            "apply output lacks {line:?}:\n{out}"
        );
    }
    ensure!(
        out.lines().count() == expected.len(),
        "one line per object expected:\n{out}"
    );
    let stored = resource_versions(&c)?;
    ensure!(
        stored.len() == expected.len(),
        "every sample is stored once: {stored:?}"
    );

    let again = kubectl_ok(&c.admin, &["apply", "-f", path_str(&dir)?])?;
    for (kind, name) in &expected {
        let line = format!("{}.karri.dev/{name} unchanged", kind.to_lowercase());
        ensure!(
            again.lines().any(|l| l == line),
            "second apply output lacks {line:?}:\n{again}"
        );
    }
    ensure!(
        again.lines().count() == expected.len(),
        "one line per object expected:\n{again}"
    );
    ensure!(
        resource_versions(&c)? == stored,
        "an unchanged apply must not write any record"
    );
    // A key pair applied as a record is what ImportKeyPair makes of its key: its fingerprint
    // as EC2 shows it, beside the type the key is.
    let pair = kubectl_json(&c.admin, &["get", "keypair", "laptop"])?;
    let fingerprint = str_at(&pair, "/spec/fingerprint");
    ensure!(
        str_at(&pair, "/spec/keyType") == "ed25519"
            && fingerprint.len() == 44
            && fingerprint.ends_with('='),
        "the applied key pair: {pair}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reapply_after_editing_a_field_changes_only_that_field() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (path, text) = sample("instance.yaml")?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&path)?])?;
    let before = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    ensure!(before["spec"]["instanceType"] == "m1.small", "{before}");

    let edited = text.replace("instanceType: m1.small", "instanceType: c1.medium");
    ensure!(
        edited != text,
        "the sample changed: no instanceType m1.small"
    );
    let edited_path = c.manifest("web-1-edited.yaml", &edited)?;
    let out = kubectl_ok(&c.admin, &["apply", "-f", path_str(&edited_path)?])?;
    ensure!(
        out.trim() == "instance.karri.dev/web-1 configured",
        "apply output: {out}"
    );

    let shown = kubectl_ok(
        &c.admin,
        &[
            "get",
            "instance",
            "web-1",
            "-o",
            "jsonpath={.spec.instanceType}",
        ],
    )?;
    ensure!(shown == "c1.medium", "instanceType shown as {shown:?}");
    let after = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    ensure!(
        before["metadata"]["generation"] == 1 && after["metadata"]["generation"] == 2,
        "generation {} -> {}",
        before["metadata"]["generation"],
        after["metadata"]["generation"]
    );
    ensure!(
        str_at(&after, "/metadata/resourceVersion") != str_at(&before, "/metadata/resourceVersion"),
        "resourceVersion did not change"
    );
    ensure!(
        !str_at(&after, "/metadata/uid").is_empty()
            && str_at(&after, "/metadata/uid") == str_at(&before, "/metadata/uid"),
        "uid changed"
    );
    ensure!(
        after["metadata"]["labels"]["karri.dev/id"] == before["metadata"]["labels"]["karri.dev/id"],
        "the ID label changed"
    );
    let mut spec = after["spec"].clone();
    spec["instanceType"] = Value::from("m1.small");
    ensure!(
        spec == before["spec"],
        "other spec fields changed:\nbefore {}\nafter  {}",
        before["spec"],
        after["spec"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_creates_updates_and_removes_dropped_fields() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let first = c.manifest(
        "ssa-1.yaml",
        &format!("{}  keyName: ops-key\n", instance_yaml("ssa-1", "m1.small")),
    )?;
    let out = kubectl_ok(
        &c.admin,
        &["apply", "--server-side", "-f", path_str(&first)?],
    )?;
    ensure!(
        out.trim() == "instance.karri.dev/ssa-1 serverside-applied",
        "{out}"
    );
    let created = kubectl_json(&c.admin, &["get", "instance", "ssa-1"])?;
    ensure!(created["spec"]["keyName"] == "ops-key", "{created}");
    ensure!(created["spec"]["instanceType"] == "m1.small", "{created}");

    // The same manager applies again without keyName and with another type.
    let second = c.manifest("ssa-2.yaml", &instance_yaml("ssa-1", "m1.medium"))?;
    kubectl_ok(
        &c.admin,
        &["apply", "--server-side", "-f", path_str(&second)?],
    )?;
    let updated = kubectl_json(&c.admin, &["get", "instance", "ssa-1"])?;
    ensure!(
        updated["spec"].get("keyName").is_none(),
        "keyName was dropped from the applied config but is still there: {}",
        updated["spec"]
    );
    ensure!(updated["spec"]["instanceType"] == "m1.medium", "{updated}");
    ensure!(
        updated["spec"]["imageId"] == "emi-0123456789abcdef0",
        "{updated}"
    );
    ensure!(
        str_at(&updated, "/metadata/uid") == str_at(&created, "/metadata/uid"),
        "uid changed"
    );
    // Applying the same manifest again (what a GitOps loop does) writes nothing.
    kubectl_ok(
        &c.admin,
        &["apply", "--server-side", "-f", path_str(&second)?],
    )?;
    let again = kubectl_json(&c.admin, &["get", "instance", "ssa-1"])?;
    ensure!(
        str_at(&again, "/metadata/resourceVersion")
            == str_at(&updated, "/metadata/resourceVersion"),
        "a repeated apply wrote the record: {} then {}",
        str_at(&updated, "/metadata/resourceVersion"),
        str_at(&again, "/metadata/resourceVersion")
    );

    // Another manager changing a field the first one owns conflicts...
    let other = c.manifest("ssa-3.yaml", &instance_yaml("ssa-1", "c1.medium"))?;
    let other_args = [
        "apply",
        "--server-side",
        "--field-manager=other",
        "-f",
        path_str(&other)?,
    ];
    let stderr = kubectl_err(&c.admin, &other_args)?;
    ensure!(
        stderr.to_lowercase().contains("conflict"),
        "the refusal does not mention a conflict:\n{stderr}"
    );
    ensure!(
        stderr.contains(
            "Apply failed with 1 conflict: conflict with \"kubectl\": .spec.instanceType"
        ),
        "the conflict is not worded as kube-apiserver words it:\n{stderr}"
    );
    let unchanged = kubectl_json(&c.admin, &["get", "instance", "ssa-1"])?;
    ensure!(
        unchanged["spec"]["instanceType"] == "m1.medium"
            && str_at(&unchanged, "/metadata/resourceVersion")
                == str_at(&updated, "/metadata/resourceVersion"),
        "a conflicting apply changed the record: {unchanged}"
    );

    // ...unless it forces, and then it owns the field.
    let mut forced = other_args.to_vec();
    forced.insert(2, "--force-conflicts");
    kubectl_ok(&c.admin, &forced)?;
    let taken = kubectl_json(
        &c.admin,
        &["get", "instance", "ssa-1", "--show-managed-fields"],
    )?;
    ensure!(taken["spec"]["instanceType"] == "c1.medium", "{taken}");
    let managers = taken["metadata"]["managedFields"]
        .as_array()
        .context("no managedFields")?;
    let owns_type = |m: &Value| {
        m.pointer("/fieldsV1/f:spec/f:instanceType").is_some()
            || m.pointer("/fieldsV1/f:spec")
                .is_some_and(|s| s.get("f:instanceType").is_some())
    };
    let owners: Vec<&str> = managers
        .iter()
        .filter(|m| owns_type(m))
        .filter_map(|m| m["manager"].as_str())
        .collect();
    ensure!(
        owners == ["other"],
        "after a forced apply only \"other\" owns spec.instanceType, owners: {owners:?}"
    );
    Ok(())
}

/// The managers that own `spec.<field>` in `v`'s managed fields.
fn spec_owners(v: &Value, field: &str) -> Vec<String> {
    v["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m.pointer(&format!("/fieldsV1/f:spec/f:{field}")).is_some())
        .filter_map(|m| m["manager"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_conflicts_with_a_field_kubectl_patch_changed() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let manifest = c.manifest("edit-1.yaml", &instance_yaml("edit-1", "m1.small"))?;
    let apply = ["apply", "--server-side", "-f", path_str(&manifest)?];
    kubectl_ok(&c.admin, &apply)?;
    kubectl_ok(
        &c.admin,
        &[
            "patch",
            "instance",
            "edit-1",
            "--type=merge",
            "-p",
            r#"{"spec":{"instanceType":"m1.medium"}}"#,
        ],
    )?;
    let patched = kubectl_json(
        &c.admin,
        &["get", "instance", "edit-1", "--show-managed-fields"],
    )?;
    ensure!(
        spec_owners(&patched, "instanceType") == ["kubectl-patch"]
            && spec_owners(&patched, "imageId") == ["kubectl"],
        "after the patch, owners of instanceType {:?}, of imageId {:?}: {}",
        spec_owners(&patched, "instanceType"),
        spec_owners(&patched, "imageId"),
        patched["metadata"]["managedFields"]
    );
    let entry = patched["metadata"]["managedFields"]
        .as_array()
        .and_then(|m| m.iter().find(|e| e["manager"] == "kubectl-patch"))
        .context("no entry for kubectl-patch")?;
    ensure!(entry["operation"] == "Update", "{entry}");

    // Applying the old manifest again would undo the patch: refused, naming who changed it.
    let stderr = kubectl_err(&c.admin, &apply)?;
    // As kube-apiserver names an update's manager: with the version and time of its write.
    let named = format!(
        "Apply failed with 1 conflict: conflict with \"kubectl-patch\" using {} at {}: .spec.instanceType",
        str_at(entry, "/apiVersion"),
        str_at(entry, "/time")
    );
    ensure!(
        stderr.contains(&named),
        "the refusal does not name the patch's manager as kube does ({named}):\n{stderr}"
    );
    let kept = kubectl_json(&c.admin, &["get", "instance", "edit-1"])?;
    ensure!(kept["spec"]["instanceType"] == "m1.medium", "{kept}");
    let mut forced = apply.to_vec();
    forced.insert(2, "--force-conflicts");
    kubectl_ok(&c.admin, &forced)?;
    let taken = kubectl_json(
        &c.admin,
        &["get", "instance", "edit-1", "--show-managed-fields"],
    )?;
    ensure!(taken["spec"]["instanceType"] == "m1.small", "{taken}");
    ensure!(
        spec_owners(&taken, "instanceType") == ["kubectl"],
        "after the forced apply, owners {:?}",
        spec_owners(&taken, "instanceType")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_side_apply_then_server_side_apply_takes_over_without_conflict() -> anyhow::Result<()>
{
    let c = Cluster::start().await?;
    let first = c.manifest("csa-1.yaml", &instance_yaml("csa-1", "m1.small"))?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&first)?])?;
    let created = kubectl_json(
        &c.admin,
        &["get", "instance", "csa-1", "--show-managed-fields"],
    )?;
    ensure!(
        spec_owners(&created, "instanceType") == ["kubectl-client-side-apply"],
        "a client-side apply's create is recorded under its manager: {}",
        created["metadata"]["managedFields"]
    );
    // kubectl moves the client-side manager's fields to its server-side one, so the change is
    // no conflict, and the server-side apply owns the fields from then on.
    let second = c.manifest("csa-2.yaml", &instance_yaml("csa-1", "m1.medium"))?;
    kubectl_ok(
        &c.admin,
        &["apply", "--server-side", "-f", path_str(&second)?],
    )?;
    let moved = kubectl_json(
        &c.admin,
        &["get", "instance", "csa-1", "--show-managed-fields"],
    )?;
    ensure!(moved["spec"]["instanceType"] == "m1.medium", "{moved}");
    ensure!(
        spec_owners(&moved, "instanceType") == ["kubectl"],
        "owners after the server-side apply: {:?}",
        spec_owners(&moved, "instanceType")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_owns_each_owner_reference_apart() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let mut uids = Vec::new();
    for owner in ["owner-a", "owner-b"] {
        let m = c.manifest(&format!("{owner}.yaml"), &instance_yaml(owner, "m1.small"))?;
        kubectl_ok(&c.admin, &["apply", "-f", path_str(&m)?])?;
        let got = kubectl_json(&c.admin, &["get", "instance", owner])?;
        uids.push(str_at(&got, "/metadata/uid").to_string());
    }
    let owner_ref = |name: &str, uid: &str| {
        format!(
            "  - apiVersion: karri.dev/v1alpha1\n    kind: Instance\n    name: {name}\n    uid: {uid}\n"
        )
    };
    let child = |owners: &str| {
        format!(
            "apiVersion: karri.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: child\n{owners}spec:\n  imageId: emi-0123456789abcdef0\n  instanceType: m1.small\n"
        )
    };
    // Server-side apply of `manifest` as field manager `manager`.
    let apply_as = |manager: &str, manifest: &PathBuf| -> anyhow::Result<String> {
        let manager = format!("--field-manager={manager}");
        kubectl_ok(
            &c.admin,
            &[
                "apply",
                "--server-side",
                &manager,
                "-f",
                path_str(manifest)?,
            ],
        )
    };
    let with_a = c.manifest(
        "child-a.yaml",
        &child(&format!(
            "  ownerReferences:\n{}",
            owner_ref("owner-a", &uids[0])
        )),
    )?;
    apply_as("team-a", &with_a)?;
    // Another manager applies its own owner: no conflict, both are kept.
    let with_b = c.manifest(
        "child-b.yaml",
        &child(&format!(
            "  ownerReferences:\n{}",
            owner_ref("owner-b", &uids[1])
        )),
    )?;
    apply_as("team-b", &with_b)?;
    let owners = |v: &Value| -> Vec<String> {
        v["metadata"]["ownerReferences"]
            .as_array()
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| r["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let both = kubectl_json(&c.admin, &["get", "instance", "child"])?;
    ensure!(
        owners(&both) == ["owner-a", "owner-b"],
        "the second manager's apply did not keep the first one's owner: {}",
        both["metadata"]
    );
    // team-b stops naming its owner: only that owner goes.
    let without = c.manifest("child-none.yaml", &child(""))?;
    apply_as("team-b", &without)?;
    let after = kubectl_json(&c.admin, &["get", "instance", "child"])?;
    ensure!(
        owners(&after) == ["owner-a"],
        "dropping team-b's owner did not leave exactly team-a's: {}",
        after["metadata"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn get_sorts_by_a_field_of_the_spec() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (_, text) = sample("instance.yaml")?;
    // Names in the opposite order of their types.
    for (name, itype) in [
        ("a-large", "m1.large"),
        ("b-small", "m1.small"),
        ("c-micro", "t1.micro"),
    ] {
        let m = c.manifest(
            &format!("{name}.yaml"),
            &text
                .replace("name: web-1", &format!("name: {name}"))
                .replace("instanceType: m1.small", &format!("instanceType: {itype}")),
        )?;
        kubectl_ok(&c.admin, &["apply", "-f", path_str(&m)?])?;
    }
    // kubectl asks for the rows' whole objects (includeObject=Object) to sort by a field
    // outside the metadata.
    let sorted = kubectl_ok(
        &c.admin,
        &[
            "get",
            "instances",
            "--sort-by=.spec.instanceType",
            "-o",
            "custom-columns=NAME:.metadata.name,TYPE:.spec.instanceType",
            "--no-headers",
        ],
    )?;
    let names: Vec<&str> = sorted
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    ensure!(
        names == ["a-large", "b-small", "c-micro"],
        "sorted by type:\n{sorted}"
    );
    let by_table = kubectl_ok(
        &c.admin,
        &["get", "instances", "--sort-by=.spec.instanceType"],
    )?;
    let rows = parse_table(&by_table)?;
    let names: Vec<String> = rows
        .iter()
        .filter_map(|r| r.iter().find(|(n, _)| n == "NAME").map(|(_, v)| v.clone()))
        .collect();
    ensure!(
        names == ["a-large", "b-small", "c-micro"],
        "the table sorted by type:\n{by_table}"
    );
    let reversed = kubectl_ok(
        &c.admin,
        &["get", "instances", "--sort-by=.metadata.name", "-o", "name"],
    )?;
    ensure!(reversed.lines().count() == 3, "{reversed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_saved_with_get_applies_again_and_a_list_manifest_creates_and_deletes_its_items(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (_, text) = sample("instance.yaml")?;
    // A `kind: List` of two records, as people write them (and as `kubectl get a b -o yaml`
    // saves them).
    let items: Vec<String> = ["list-a", "list-b"]
        .iter()
        .map(|name| {
            text.replace("name: web-1", &format!("name: {name}"))
                .lines()
                .filter(|l| !l.starts_with('#') && *l != "---")
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
                .replacen("    ", "  - ", 1)
        })
        .collect();
    let list = c.manifest(
        "list.yaml",
        &format!("apiVersion: v1\nkind: List\nitems:\n{}\n", items.join("\n")),
    )?;
    kubectl_ok(&c.admin, &["create", "-f", path_str(&list)?])?;
    let names = kubectl_ok(&c.admin, &["get", "instances", "-o", "name"])?;
    ensure!(
        names.contains("list-a") && names.contains("list-b"),
        "created from the List: {names}"
    );
    let saved = kubectl_ok(
        &c.admin,
        &["get", "instances", "list-a", "list-b", "-o", "yaml"],
    )?;
    ensure!(
        saved.contains("kind: List"),
        "kubectl saves a List: {saved}"
    );
    let saved = c.manifest("saved.yaml", &saved.replace("m1.small", "m1.large"))?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&saved)?])?;
    let types = kubectl_ok(
        &c.admin,
        &[
            "get",
            "instances",
            "-o",
            "jsonpath={.items[*].spec.instanceType}",
        ],
    )?;
    ensure!(types.trim() == "m1.large m1.large", "re-applied: {types}");
    kubectl_ok(&c.admin, &["delete", "-f", path_str(&list)?])?;
    let left = kubectl_ok(&c.admin, &["get", "instances", "-o", "name"])?;
    ensure!(left.trim().is_empty(), "deleted from the List: {left}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn get_shows_useful_columns_yaml_and_label_selection() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&samples_dir())?])?;

    let table = kubectl_ok(&c.admin, &["get", "instances"])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .context("no header")?
        .split_whitespace()
        .collect();
    ensure!(
        header.starts_with(&["NAME", "ID", "STATE", "TYPE", "IMAGE", "NODE"]),
        "header columns: {header:?}"
    );
    let rows = parse_table(&table)?;
    ensure!(rows.len() == 1, "one instance expected:\n{table}");
    let cell = |col: &str| {
        rows[0]
            .iter()
            .find(|(n, _)| n == col)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    ensure!(cell("NAME") == "web-1", "{table}");
    let id = cell("ID");
    let hex = id.strip_prefix("i-").unwrap_or("");
    ensure!(
        hex.len() == 17
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "ID column {id:?} is not i- and 17 hex digits:\n{table}"
    );
    ensure!(cell("TYPE") == "m1.small", "{table}");
    ensure!(cell("IMAGE") == "emi-0123456789abcdef0", "{table}");

    let yaml = kubectl_ok(&c.admin, &["get", "instance", "web-1", "-o", "yaml"])?;
    let obj: Value = serde_norway::from_str(&yaml).context("-o yaml is not YAML")?;
    ensure!(obj["apiVersion"] == "karri.dev/v1alpha1", "{yaml}");
    ensure!(obj["kind"] == "Instance", "{yaml}");
    for field in ["resourceVersion", "uid", "creationTimestamp"] {
        ensure!(
            obj["metadata"][field]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "metadata.{field} missing:\n{yaml}"
        );
    }
    ensure!(
        obj["metadata"]["labels"]["karri.dev/id"] == id.as_str(),
        "the karri.dev/id label is not the ID column {id}:\n{yaml}"
    );

    let labeled = kubectl_ok(&c.admin, &["label", "instance", "web-1", "tier=web"])?;
    ensure!(
        labeled.trim() == "instance.karri.dev/web-1 labeled",
        "{labeled}"
    );
    ensure!(
        kubectl_names(&c.admin, &["get", "instances", "-l", "tier=web"])?
            == ["instance.karri.dev/web-1"],
        "-l tier=web does not select web-1"
    );
    let none = kubectl(&c.admin, &["get", "instances", "-l", "tier=none"]);
    ensure!(none.status.success(), "-l tier=none failed: {none:?}");
    ensure!(
        none.stdout.is_empty(),
        "-l tier=none shows: {}",
        String::from_utf8_lossy(&none.stdout)
    );
    ensure!(
        String::from_utf8_lossy(&none.stderr).contains("No resources found"),
        "{none:?}"
    );

    let all = kubectl_ok(&c.admin, &["get", "instances", "-A"])?;
    let all_rows = parse_table(&all)?;
    ensure!(
        all.lines()
            .next()
            .is_some_and(|h| h.starts_with("NAMESPACE ")),
        "-A has no NAMESPACE column:\n{all}"
    );
    ensure!(
        all_rows.len() == 1
            && all_rows[0].first().map(|(_, v)| v.as_str()) == Some("acme")
            && all_rows[0].get(1).map(|(_, v)| v.as_str()) == Some("web-1"),
        "-A rows:\n{all}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn get_watch_stays_open_and_shows_later_changes() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let early = c.manifest("early.yaml", &instance_yaml("early", "m1.small"))?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&early)?])?;

    let mut table = KubectlStream::spawn(&c.admin, &["get", "instances", "-w"])?;
    let mut events = KubectlStream::spawn(
        &c.admin,
        &[
            "get",
            "instances",
            "-w",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.metadata.name} {.object.metadata.labels.tier}{\"\\n\"}",
        ],
    )?;
    let starts_with = |word: &'static str| move |l: &str| l.split_whitespace().next() == Some(word);
    // Both show what exists first: the watch is established.
    table.next_line("the header", WATCH_WAIT, starts_with("NAME"))?;
    table.next_line("early", WATCH_WAIT, starts_with("early"))?;
    events.next_line("ADDED early", WATCH_WAIT, |l| l.trim() == "ADDED early")?;

    let later = c.manifest("later.yaml", &instance_yaml("later", "m1.small"))?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&later)?])?;
    table.next_line("later (created)", WATCH_WAIT, starts_with("later"))?;
    events.next_line("ADDED later", WATCH_WAIT, |l| l.trim() == "ADDED later")?;
    ensure!(table.running()? && events.running()?, "a watch ended");

    kubectl_ok(&c.admin, &["label", "instance", "later", "tier=web"])?;
    table.next_line("later (labeled)", WATCH_WAIT, starts_with("later"))?;
    events.next_line("MODIFIED later web", WATCH_WAIT, |l| {
        l.trim() == "MODIFIED later web"
    })?;
    ensure!(table.running()? && events.running()?, "a watch ended");

    kubectl_ok(&c.admin, &["delete", "instance", "later"])?;
    table.next_line("later (deleted)", WATCH_WAIT, starts_with("later"))?;
    events.next_line("DELETED later", WATCH_WAIT, |l| {
        l.starts_with("DELETED later")
    })?;
    ensure!(table.running()? && events.running()?, "a watch ended");

    let table_lines: Vec<&String> = table
        .seen()
        .iter()
        .filter(|l| l.starts_with("later "))
        .collect();
    ensure!(
        table_lines.len() == 3,
        "one table line per change of later expected: {:?}",
        table.seen()
    );
    ensure!(
        !events
            .seen()
            .iter()
            .any(|l| l.contains("early") && !l.starts_with("ADDED")),
        "early never changed but shows events: {:?}",
        events.seen()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_returns_when_the_record_is_gone() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (path, _) = sample("instance.yaml")?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&path)?])?;

    let out = kubectl_ok(&c.admin, &["delete", "-f", path_str(&path)?])?;
    ensure!(
        out.trim() == "instance.karri.dev \"web-1\" deleted",
        "{out}"
    );
    kubectl_refused(&c.admin, &["get", "instance", "web-1"], "NotFound")?;
    ensure!(
        kubectl_names(&c.admin, &["get", "instances", "-A"])?.is_empty(),
        "web-1 is still listed"
    );
    let raw = c
        .admin_api()?
        .request(
            reqwest::Method::GET,
            &format!("{API}/namespaces/acme/instances/web-1"),
        )
        .send()
        .await?;
    karri_e2e::support::expect_status(raw, 404, "NotFound").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_with_termination_protection_is_neither_deleted_nor_terminated_by_kubectl(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (_, text) = sample("instance.yaml")?;
    let protected = c.manifest(
        "protected.yaml",
        &text.replace(
            "  desiredState: running",
            "  desiredState: running\n  disableApiTermination: true",
        ),
    )?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&protected)?])?;
    // Neither a delete, nor a prune (a delete as well), nor asking it to terminate.
    let stderr = kubectl_refused(&c.admin, &["delete", "instance", "web-1"], "Forbidden")?;
    ensure!(stderr.contains("has termination protection"), "{stderr}");
    let terminate = r#"{"spec":{"desiredState":"terminated"}}"#;
    let patch = [
        "patch", "instance", "web-1", "--type", "merge", "-p", terminate,
    ];
    let stderr = kubectl_err(&c.admin, &patch)?;
    ensure!(
        stderr.contains("spec.desiredState") && stderr.contains("termination protection"),
        "{stderr}"
    );
    let state = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    ensure!(
        str_at(&state, "/spec/desiredState") == "running"
            && state.pointer("/metadata/deletionTimestamp").is_none(),
        "a refused request changed web-1: {state}"
    );
    // Lifted, it goes as any other.
    let lift = r#"{"spec":{"disableApiTermination":false}}"#;
    kubectl_ok(
        &c.admin,
        &["patch", "instance", "web-1", "--type", "merge", "-p", lift],
    )?;
    kubectl_ok(&c.admin, &["delete", "instance", "web-1"])?;
    kubectl_refused(&c.admin, &["get", "instance", "web-1"], "NotFound")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn get_of_a_deleted_record_says_that_record_is_not_found() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (path, _) = sample("instance.yaml")?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&path)?])?;
    kubectl_ok(&c.admin, &["delete", "-f", path_str(&path)?])?;

    // kubectl checks that the namespace exists when a namespaced get answers 404
    // (GET /api/v1/namespaces/acme) and prints that error instead when it is missing too.
    let stderr = kubectl_refused(&c.admin, &["get", "instance", "web-1"], "NotFound")?;
    ensure!(
        stderr.contains("instances.karri.dev \"web-1\" not found"),
        "kubectl get does not say web-1 is not found:\n{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_with_a_finalizer_stays_terminating_until_it_is_removed() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (path, _) = sample("instance.yaml")?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&path)?])?;
    kubectl_ok(
        &c.admin,
        &[
            "patch",
            "instance",
            "web-1",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"finalizers":["karri.dev/hold"]}}"#,
        ],
    )?;

    let out = kubectl_ok(&c.admin, &["delete", "instance", "web-1", "--wait=false"])?;
    ensure!(
        out.trim() == "instance.karri.dev \"web-1\" deleted",
        "{out}"
    );
    let held = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    ensure!(
        held["metadata"]["deletionTimestamp"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "no deletionTimestamp: {held}"
    );
    ensure!(
        held["metadata"]["finalizers"] == serde_json::json!(["karri.dev/hold"]),
        "{held}"
    );

    // As Kubernetes refuses it: invalid, with a Forbidden cause on metadata.finalizers.
    let stderr = kubectl_err(
        &c.admin,
        &[
            "patch",
            "instance",
            "web-1",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"finalizers":["karri.dev/hold","karri.dev/more"]}}"#,
        ],
    )?;
    ensure!(
        stderr.contains("is invalid: metadata.finalizers: Forbidden: no new finalizers"),
        "the refusal does not explain itself: {stderr}"
    );
    let still = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    ensure!(
        still == held,
        "a refused patch changed the record:\n{held}\n{still}"
    );

    kubectl_ok(
        &c.admin,
        &[
            "patch",
            "instance",
            "web-1",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ],
    )?;
    kubectl_refused(&c.admin, &["get", "instance", "web-1"], "NotFound")?;
    ensure!(
        kubectl_names(&c.admin, &["get", "instances", "-A"])?.is_empty(),
        "web-1 is still listed after its last finalizer was removed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_with_foreground_cascade_removes_the_dependents_before_the_owner(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let owner = c.manifest("owner.yaml", &instance_yaml("owner", "m1.small"))?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&owner)?])?;
    let uid = kubectl_json(&c.admin, &["get", "instance", "owner"])?["metadata"]["uid"]
        .as_str()
        .context("no uid")?
        .to_string();
    let child = format!(
        "apiVersion: karri.dev/v1alpha1
kind: Instance
metadata:
  name: child
  ownerReferences:
  - apiVersion: karri.dev/v1alpha1
    kind: Instance
    name: owner
    uid: {uid}
    blockOwnerDeletion: true
  finalizers:
  - example.com/hold
spec:
  imageId: emi-0123456789abcdef0
  instanceType: m1.small
"
    );
    let child = c.manifest("child.yaml", &child)?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&child)?])?;
    let refs = kubectl_json(&c.admin, &["get", "instance", "child"])?["metadata"]
        ["ownerReferences"]
        .clone();
    ensure!(
        refs[0]["uid"] == uid.as_str(),
        "the child names no owner: {refs}"
    );

    let out = kubectl_ok(
        &c.admin,
        &[
            "delete",
            "instance",
            "owner",
            "--cascade=foreground",
            "--wait=false",
        ],
    )?;
    ensure!(
        out.trim() == "instance.karri.dev \"owner\" deleted",
        "{out}"
    );
    // The dependent is deleted first (its finalizer holds it, terminating) ...
    kubectl_ok(
        &c.admin,
        &[
            "wait",
            "--for=jsonpath={.metadata.deletionTimestamp}",
            "instance/child",
            "--timeout=20s",
        ],
    )?;
    // ... and the owner waits for it.
    let owner = kubectl_json(&c.admin, &["get", "instance", "owner"])?;
    ensure!(
        owner["metadata"]["finalizers"] == serde_json::json!(["foregroundDeletion"]),
        "the owner does not wait for its dependent: {owner}"
    );
    kubectl_ok(
        &c.admin,
        &[
            "patch",
            "instance",
            "child",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ],
    )?;
    kubectl_ok(
        &c.admin,
        &["wait", "--for=delete", "instance/owner", "--timeout=60s"],
    )?;
    ensure!(
        kubectl_names(&c.admin, &["get", "instances", "-A"])?.is_empty(),
        "the owner or its dependent is still listed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn diff_shows_the_change_and_stores_nothing() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (path, text) = sample("instance.yaml")?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&path)?])?;
    let before = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;

    let edited = c.manifest(
        "web-1-edited.yaml",
        &text.replace("instanceType: m1.small", "instanceType: c1.medium"),
    )?;
    let out = kubectl(&c.admin, &["diff", "-f", path_str(&edited)?]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1),
        "kubectl diff of a change exits 1, got {:?}; stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout
            .lines()
            .any(|l| l.starts_with('-') && l.contains("instanceType: m1.small"))
            && stdout
                .lines()
                .any(|l| l.starts_with('+') && l.contains("instanceType: c1.medium")),
        "the diff does not show the instanceType change:\n{stdout}"
    );
    let after = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    ensure!(after == before, "diff changed the live record");

    let fresh = c.manifest("fresh.yaml", &instance_yaml("fresh", "m1.small"))?;
    let out = kubectl(&c.admin, &["diff", "-f", path_str(&fresh)?]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1),
        "kubectl diff of a new object exits 1, got {:?}; stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.lines().any(|l| l == "+  name: fresh"),
        "the diff does not show the new object:\n{stdout}"
    );
    ensure!(
        kubectl_names(&c.admin, &["get", "instances", "-A"])? == ["instance.karri.dev/web-1"],
        "diff of a new object created it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_describes_instance_spec_fields() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let crd = crds::crd_for_kind("Instance").context("no Instance CRD")?;
    let crd = serde_json::to_value(crd)?;
    let spec_props = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties")
        .context("no spec properties in the Instance CRD")?;
    // The first words of a description (explain wraps long lines).
    let opening = |field: &str| -> anyhow::Result<String> {
        let d = spec_props[field]["description"]
            .as_str()
            .with_context(|| format!("spec.{field} has no description in the CRD"))?;
        Ok(d.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
    };

    let out = kubectl_ok(&c.admin, &["explain", "instance.spec"])?;
    let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
    for field in ["imageId", "instanceType", "userData"] {
        ensure!(
            out.lines().any(|l| l.trim_start().starts_with(field)),
            "explain instance.spec does not list {field}:\n{out}"
        );
        let words = opening(field)?;
        ensure!(
            flat.contains(&words),
            "explain instance.spec lacks the description of {field} ({words:?}):\n{out}"
        );
    }

    let one = kubectl_ok(&c.admin, &["explain", "instance.spec.imageId"])?;
    ensure!(
        one.contains("FIELD: imageId <string>"),
        "explain instance.spec.imageId:\n{one}"
    );
    let flat = one.split_whitespace().collect::<Vec<_>>().join(" ");
    ensure!(
        flat.contains(&opening("imageId")?),
        "explain instance.spec.imageId has no description:\n{one}"
    );

    // Every kind has the fields of every Kubernetes object, as kube-apiserver publishes a
    // CRD's: apiVersion, kind and metadata.
    let top = kubectl_ok(&c.admin, &["explain", "instance"])?;
    for field in ["apiVersion", "kind", "metadata", "spec", "status"] {
        ensure!(
            top.lines().any(|l| l.trim_start().starts_with(field)),
            "explain instance does not list {field}:\n{top}"
        );
    }
    let meta = kubectl_ok(&c.admin, &["explain", "instance.metadata"])?;
    for field in [
        "name",
        "namespace",
        "labels",
        "annotations",
        "finalizers",
        "ownerReferences",
    ] {
        ensure!(
            meta.lines().any(|l| l.trim_start().starts_with(field)),
            "explain instance.metadata does not list {field}:\n{meta}"
        );
    }
    let labels = kubectl_ok(&c.admin, &["explain", "keypair.metadata.labels"])?;
    ensure!(
        labels.contains("map[string]string"),
        "explain keypair.metadata.labels:\n{labels}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_server_stores_nothing() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let (path, text) = sample("instance.yaml")?;
    let p = path_str(&path)?;

    let out = kubectl_ok(&c.admin, &["apply", "--dry-run=server", "-f", p])?;
    ensure!(
        out.trim() == "instance.karri.dev/web-1 created (server dry run)",
        "{out}"
    );
    let out = kubectl_ok(&c.admin, &["create", "--dry-run=server", "-f", p])?;
    ensure!(
        out.trim() == "instance.karri.dev/web-1 created (server dry run)",
        "{out}"
    );
    ensure!(
        kubectl_names(&c.admin, &["get", "instances", "-A"])?.is_empty(),
        "a dry run stored a record"
    );
    ensure!(
        c.admin_api()?
            .items(&format!("{API}/instances"))
            .await?
            .is_empty(),
        "a dry run stored a record"
    );

    // The dry runs reserved nothing: the real create works.
    kubectl_ok(&c.admin, &["create", "-f", p])?;
    let before = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    let edited = c.manifest(
        "web-1-edited.yaml",
        &text.replace("instanceType: m1.small", "instanceType: c1.medium"),
    )?;
    let out = kubectl_ok(
        &c.admin,
        &["apply", "--dry-run=server", "-f", path_str(&edited)?],
    )?;
    ensure!(
        out.trim() == "instance.karri.dev/web-1 configured (server dry run)",
        "{out}"
    );
    // A dry-run create of a name that is taken fails as the real one would.
    let taken = kubectl_err(&c.admin, &["create", "--dry-run=server", "-f", p])?;
    ensure!(
        taken.contains("AlreadyExists") || taken.contains("already exists"),
        "a dry-run create of an existing name: {taken}"
    );
    let out = kubectl_ok(
        &c.admin,
        &["delete", "instance", "web-1", "--dry-run=server"],
    )?;
    ensure!(
        out.trim() == "instance.karri.dev \"web-1\" deleted (server dry run)",
        "{out}"
    );
    let after = kubectl_json(&c.admin, &["get", "instance", "web-1"])?;
    ensure!(
        after == before,
        "a dry-run update or delete changed the record:\n{before}\n{after}"
    );
    Ok(())
}

/// Debian 12's own kubectl (1.20), which `make setup` unpacks into `.cache/debian-kubectl`: the
/// kubectl of a machine that had none (setup installs Debian's `kubernetes-client` then).
fn debian_kubectl() -> anyhow::Result<PathBuf> {
    let bin = workspace_root().join(".cache/debian-kubectl/usr/bin/kubectl");
    ensure!(bin.is_file(), "{} missing: run `make setup`", bin.display());
    Ok(bin)
}

/// Runs Debian's kubectl with the admin kubeconfig; its stdout, or an error with its stderr.
fn debian_kubectl_ok(c: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(debian_kubectl()?)
        .arg("--kubeconfig")
        .arg(&c.admin)
        .args(args)
        .output()
        .context("running Debian's kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl 1.20 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn debian_12s_kubectl_does_what_make_up_asks_of_it() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let version = debian_kubectl_ok(&c, &["version", "--client", "--short"])?;
    ensure!(
        version.contains("v1.20"),
        "not Debian 12's kubectl: {version}"
    );
    // What scripts/up.sh does with kubectl: apply manifests (kubectl 1.20 validates them
    // against /openapi/v2 first), get by name and with jsonpath, delete.
    let zone = workspace_root().join("config/samples/availability-zone.yaml");
    let types = workspace_root().join("config/samples/instance-type.yaml");
    debian_kubectl_ok(
        &c,
        &["apply", "-f", path_str(&zone)?, "-f", path_str(&types)?],
    )?;
    let names = debian_kubectl_ok(&c, &["get", "instancetypes", "-o", "name"])?;
    ensure!(
        names.contains("instancetype.karri.dev/t1.micro"),
        "kubectl 1.20 get: {names}"
    );
    let listed = debian_kubectl_ok(
        &c,
        &[
            "get",
            "availabilityzones",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
        ],
    )?;
    ensure!(
        !listed.trim().is_empty(),
        "kubectl 1.20 jsonpath: {listed:?}"
    );
    let (instance, _) = sample("instance.yaml")?;
    debian_kubectl_ok(&c, &["apply", "-f", path_str(&instance)?])?;
    debian_kubectl_ok(&c, &["delete", "-f", path_str(&instance)?, "--wait=true"])?;
    ensure!(
        kubectl_names(&c.admin, &["get", "instances", "-A"])?.is_empty(),
        "the instance kubectl 1.20 deleted is still listed"
    );
    Ok(())
}

/// The official Python client (`e2e/python/kube_client.py`, run with `.venv/bin/python` as an
/// account): its discovery, the dynamic client, patches, server-side apply and a watch.
#[tokio::test(flavor = "multi_thread")]
async fn the_official_python_client_discovers_creates_patches_applies_watches_and_deletes(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    let script = root.join("e2e/python/kube_client.py");
    ensure!(
        python.exists(),
        "{} is missing; run `make setup`",
        python.display()
    );
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("acme")
        .env_clear()
        .env("KUBECONFIG", c.account_kubeconfig("acme")?)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    ensure!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\nstderr:\n{}\ngateway log:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        c.gateway.log_tail()
    );
    Ok(())
}

/// The events of the watch at `path` (an admin's, with a `timeoutSeconds` that ends it), each
/// as `"<type> <name>"`.
async fn watch_events(c: &Cluster, path: &str) -> anyhow::Result<Vec<String>> {
    let body = c
        .admin_api()?
        .request(reqwest::Method::GET, path)
        .send()
        .await?
        .text()
        .await?;
    let events: Vec<Value> = body
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    Ok(events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                str_at(e, "/type"),
                str_at(e, "/object/metadata/name")
            )
        })
        .collect())
}

/// Namespaces are served, the core group's one resource: kubectl's discovery is complete
/// (`api-resources` succeeds), `get ns` lists the accounts' namespaces and Karri's own, a watch
/// sees an account's namespace come and go (selectors pick namespaces), an account sees its
/// own and karri-images, a node none.
#[tokio::test(flavor = "multi_thread")]
async fn namespaces_are_listed_and_watched_as_accounts_come_and_go() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let resources = kubectl_ok(&c.admin, &["api-resources", "-o", "name"])?;
    ensure!(
        resources.lines().any(|l| l == "namespaces")
            && resources.lines().any(|l| l == "instances.karri.dev"),
        "{resources}"
    );
    let account = |name: &str| {
        format!("apiVersion: karri.dev/v1alpha1\nkind: Account\nmetadata:\n  name: {name}\nspec:\n  displayName: {name}\n")
    };
    let acme = c.manifest("acme.yaml", &account("acme"))?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&acme)?])?;
    let names = kubectl_names(&c.admin, &["get", "ns"])?;
    ensure!(
        names == ["namespace/acme", "namespace/karri-images"],
        "{names:?}"
    );

    let mut watch = KubectlStream::spawn(
        &c.admin,
        &[
            "get",
            "ns",
            "-w",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.metadata.name}{\"\\n\"}",
        ],
    )?;
    // kubectl lists first (in name order), then watches from the list's version.
    for shown in ["ADDED acme", "ADDED karri-images"] {
        watch.next_line(shown, WATCH_WAIT, |l| l.trim() == shown)?;
    }
    let later = c.manifest("later.yaml", &account("later"))?;
    kubectl_ok(&c.admin, &["apply", "-f", path_str(&later)?])?;
    watch.next_line("ADDED later", WATCH_WAIT, |l| l.trim() == "ADDED later")?;
    kubectl_ok(&c.admin, &["delete", "account", "later"])?;
    watch.next_line("DELETED later", WATCH_WAIT, |l| l.trim() == "DELETED later")?;
    ensure!(watch.running()?, "the watch ended: {:?}", watch.seen());

    // A watch from no version starts with what exists, Karri's own namespace among them.
    let mut started = watch_events(&c, "/api/v1/namespaces?watch=true&timeoutSeconds=1").await?;
    started.sort();
    ensure!(
        started == ["ADDED acme", "ADDED karri-images"],
        "{started:?}"
    );

    // Selectors pick namespaces: by label, and by name (`kubectl get ns <name> -w`).
    let labelled = kubectl_names(
        &c.admin,
        &["get", "ns", "-l", "kubernetes.io/metadata.name=acme"],
    )?;
    ensure!(labelled == ["namespace/acme"], "{labelled:?}");
    let names = watch_events(
        &c,
        "/api/v1/namespaces?watch=true&fieldSelector=metadata.name%3Dacme&timeoutSeconds=1",
    )
    .await?;
    ensure!(names == ["ADDED acme"], "{names:?}");

    let acme_kubeconfig = c.account_kubeconfig("acme")?;
    let own = kubectl_names(&acme_kubeconfig, &["get", "ns"])?;
    ensure!(
        own == ["namespace/acme", "namespace/karri-images"],
        "{own:?}"
    );
    kubectl_ok(&acme_kubeconfig, &["get", "ns", "karri-images"])?;
    let refused = kubectl_err(&c.node_kubeconfig(NODES[0])?, &["get", "ns"])?;
    ensure!(refused.contains("forbidden"), "{refused}");
    Ok(())
}

/// The CustomResourceDefinitions can be watched, as kopf and `kubectl get crd -w` do: the
/// watch shows them (or, from their version, nothing) and stays open until its time is up.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_of_the_crds_shows_them_and_stays_open() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    let kinds = crds::kind_infos().len();
    let watch = |query: &'static str| {
        let api = api.clone();
        async move {
            let started = std::time::Instant::now();
            let resp = api
                .request(reqwest::Method::GET, &format!("{crds}?watch=true&{query}"))
                .send()
                .await?;
            ensure!(resp.status() == 200, "{query}: HTTP {}", resp.status());
            let body = resp.text().await?;
            let events: Vec<Value> = body
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?;
            anyhow::Ok((events, started.elapsed()))
        }
    };
    let types = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // From no version: each CRD once, then nothing until the watch's time is up.
    let (events, took) = watch("timeoutSeconds=2").await?;
    ensure!(
        types(&events) == vec!["ADDED".to_string(); kinds],
        "{:?}",
        types(&events)
    );
    ensure!(
        took >= Duration::from_secs(2),
        "the watch ended after {took:?}"
    );
    ensure!(
        events
            .iter()
            .any(|e| e["object"]["metadata"]["name"] == "instances.karri.dev"),
        "{events:?}"
    );
    // From the list's version, kopf's way: nothing has changed.
    let list = api.get_json(crds).await?;
    let version = list["metadata"]["resourceVersion"].as_str().unwrap_or("");
    ensure!(version == "1", "the CRDs' list is at version {version:?}");
    let (events, _) = watch("resourceVersion=1&allowWatchBookmarks=true&timeoutSeconds=1").await?;
    ensure!(events.is_empty(), "{events:?}");
    // Initial events, closed by a bookmark; one CRD by its name.
    let (events, _) = watch(
        "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1",
    )
    .await?;
    let mut expected = vec!["ADDED".to_string(); kinds];
    expected.push("BOOKMARK".into());
    ensure!(types(&events) == expected, "{:?}", types(&events));
    ensure!(
        events[kinds]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"] == "true",
        "{}",
        events[kinds]
    );
    let (events, _) =
        watch("fieldSelector=metadata.name%3Dinstances.karri.dev&timeoutSeconds=1").await?;
    ensure!(
        events.len() == 1 && events[0]["object"]["metadata"]["name"] == "instances.karri.dev",
        "{events:?}"
    );
    // kubectl's watch lists the CRD and stays open.
    let mut kubectl_watch =
        KubectlStream::spawn(&c.admin, &["get", "crd", "instances.karri.dev", "-w"])?;
    kubectl_watch.next_line("instances.karri.dev", WATCH_WAIT, |l| {
        l.starts_with("instances.karri.dev")
    })?;
    ensure!(
        kubectl_watch.running()?,
        "kubectl's watch ended: {:?}",
        kubectl_watch.seen()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_reads_the_crds_of_every_kind_and_cannot_change_them() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let names = kubectl_ok(&c.admin, &["get", "crds", "-o", "name"])?;
    let listed: Vec<&str> = names.lines().collect();
    for kind in crds::kind_infos() {
        let name = format!(
            "customresourcedefinition.apiextensions.k8s.io/{}.{}",
            kind.plural,
            crds::GROUP
        );
        ensure!(listed.contains(&name.as_str()), "{name} not in {listed:?}");
    }
    let established = kubectl_ok(
        &c.admin,
        &[
            "get",
            "crd",
            "instances.karri.dev",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ],
    )?;
    ensure!(established.trim() == "True", "Established: {established:?}");
    let out = kubectl(&c.admin, &["delete", "crd", "instances.karri.dev"]);
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("cannot be changed"),
        "kubectl delete crd: {} {said}",
        out.status
    );
    let kept = kubectl_ok(
        &c.admin,
        &["get", "crd", "instances.karri.dev", "-o", "name"],
    )?;
    ensure!(!kept.trim().is_empty(), "the CRD is gone");
    Ok(())
}
