//! Isolation between two accounts on the EC2 face, end to end: a cloud with an operator and a
//! node agent (libvirt's test driver) so that account A's instances really run, and two boto3
//! drivers (`e2e/python/ec2_driver.py`), one per account.
//!
//! A owns two running instances, a key pair, a private image and tags on all of them. Account B
//! then tries every EC2 action on them — one row of a table per try, with the exact AWS code the
//! gateway must answer, or "hidden" for a call that succeeds without showing anything of A's.
//! After every row A's resources are read back through A (and their records through the admin,
//! for what EC2 does not show, such as a reboot request) and must not have changed. Then A
//! shares the image with B, takes the share back, and makes the image public; B's view and
//! rights follow each step, and B never gains more than launching.

mod ec2_support;

use std::collections::BTreeMap;
use std::ops::ControlFlow::{Break, Continue};
use std::time::Duration;

use anyhow::{ensure, Context};
use ec2_support::Driver;
use karri_e2e::cloud::{Cloud, Options};
use karri_testkit::Gateway;
use serde_json::{json, Value};

/// Deadline for A's instances to run.
const STEP: Duration = Duration::from_secs(60);
/// A's key pair name (B later makes its own key pair of the same name).
const A_KEY: &str = "alpha-deploy";
/// A's image name.
const A_IMAGE: &str = "alpha-image";
/// The value of A's `team` tags.
const A_TAG: &str = "alpha-secret";
/// The value of the extra tag on A's first instance.
const A_ROLE: &str = "alpha-web";
/// A's image description.
const A_DESCRIPTION: &str = "alpha-private image";
/// The client token of A's launch (B reuses it for its own).
const A_TOKEN: &str = "alpha-token";
/// Annotation the gateway sets on an instance for RebootInstances.
const REBOOT_ANNOTATION: &str = "karri.dev/reboot-requested-at";

/// What B's call must get.
#[derive(Debug, Clone)]
enum Expect {
    /// Refused with this AWS code and HTTP status.
    Refused(&'static str, u16),
    /// Succeeds, showing nothing of A's.
    Hidden,
}
use Expect::{Hidden, Refused};

/// One try of B's: a name for reports, a boto3 method and its parameters, the expected answer.
struct Row {
    name: &'static str,
    method: &'static str,
    params: Value,
    expect: Expect,
}

fn row(name: &'static str, method: &'static str, params: Value, expect: Expect) -> Row {
    Row {
        name,
        method,
        params,
        expect,
    }
}

/// A's resources, as created.
struct Alpha {
    account_id: String,
    /// A's private image object, `bucket/key`.
    location: String,
    instances: Vec<String>,
    reservation: String,
    image: String,
    key_id: String,
    fingerprint: String,
    public_key: String,
}

impl Alpha {
    /// The `ami-` spelling of A's `emi-` image ID.
    fn ami_alias(&self) -> String {
        format!("ami-{}", self.image.trim_start_matches("emi-"))
    }

    /// Strings that identify A's resources: none may appear in a "hidden" answer to B.
    fn markers(&self) -> Vec<String> {
        let mut m = self.instances.clone();
        m.extend([
            self.reservation.clone(),
            self.image.clone(),
            self.ami_alias(),
            self.key_id.clone(),
            self.fingerprint.clone(),
            self.account_id.clone(),
            A_KEY.into(),
            A_IMAGE.into(),
            A_TAG.into(),
            A_ROLE.into(),
            A_DESCRIPTION.into(),
        ]);
        m
    }
}

/// Every action of B's on A's resources while A shares nothing.
#[rustfmt::skip]
fn private_matrix(a: &Alpha, b_image: &str) -> Vec<Row> {
    let (i0, i1, img, ami, key) = (&a.instances[0], &a.instances[1], &a.image, a.ami_alias(), &a.key_id);
    let filter = |name: &str, value: &str| json!({"Filters": [{"Name": name, "Values": [value]}]});
    let not_found_i = Refused("InvalidInstanceID.NotFound", 400);
    let not_found_ami = Refused("InvalidAMIID.NotFound", 400);
    let not_found_key = Refused("InvalidKeyPair.NotFound", 400);
    let tags = json!([{"Key": "team", "Value": "bravo"}]);
    vec![
        // Instances.
        row("DescribeInstances by A's ID", "describe_instances", json!({"InstanceIds": [i0]}), not_found_i.clone()),
        row("DescribeInstances by both of A's IDs", "describe_instances", json!({"InstanceIds": [i0, i1]}), not_found_i.clone()),
        row("DescribeInstances list", "describe_instances", json!({}), Hidden),
        row("DescribeInstances filter instance-id", "describe_instances", filter("instance-id", i0), Hidden),
        row("DescribeInstances filter reservation-id", "describe_instances", filter("reservation-id", &a.reservation), Hidden),
        row("DescribeInstances filter tag:team", "describe_instances", filter("tag:team", A_TAG), Hidden),
        row("DescribeInstances filter key-name", "describe_instances", filter("key-name", A_KEY), Hidden),
        row("DescribeInstances filter client-token", "describe_instances", filter("client-token", A_TOKEN), Hidden),
        row("DescribeInstances filter instance-state-name", "describe_instances", filter("instance-state-name", "running"), Hidden),
        row("DescribeInstanceStatus by A's ID", "describe_instance_status", json!({"InstanceIds": [i0], "IncludeAllInstances": true}), not_found_i.clone()),
        row("DescribeInstanceStatus list", "describe_instance_status", json!({"IncludeAllInstances": true}), Hidden),
        row("TerminateInstances", "terminate_instances", json!({"InstanceIds": [i0]}), not_found_i.clone()),
        row("TerminateInstances of both", "terminate_instances", json!({"InstanceIds": [i0, i1]}), not_found_i.clone()),
        row("StopInstances", "stop_instances", json!({"InstanceIds": [i0]}), not_found_i.clone()),
        row("StopInstances forced", "stop_instances", json!({"InstanceIds": [i1], "Force": true}), not_found_i.clone()),
        row("StartInstances", "start_instances", json!({"InstanceIds": [i0]}), not_found_i.clone()),
        row("RebootInstances", "reboot_instances", json!({"InstanceIds": [i0]}), not_found_i.clone()),
        row("DescribeInstanceAttribute userData", "describe_instance_attribute", json!({"InstanceId": i0, "Attribute": "userData"}), not_found_i.clone()),
        row("DescribeInstanceAttribute instanceType", "describe_instance_attribute", json!({"InstanceId": i0, "Attribute": "instanceType"}), not_found_i.clone()),
        row("ModifyInstanceAttribute disableApiTermination", "modify_instance_attribute", json!({"InstanceId": i0, "DisableApiTermination": {"Value": true}}), not_found_i.clone()),
        row("GetConsoleOutput", "get_console_output", json!({"InstanceId": i0}), not_found_i.clone()),
        // Launching with what is A's.
        row("RunInstances with A's private image", "run_instances", json!({"ImageId": img, "InstanceType": "t1.micro", "MinCount": 1, "MaxCount": 1}), not_found_ami.clone()),
        row("RunInstances with A's private image as ami-", "run_instances", json!({"ImageId": ami, "InstanceType": "t1.micro", "MinCount": 1, "MaxCount": 1}), not_found_ami.clone()),
        row("RunInstances with A's key name", "run_instances", json!({"ImageId": b_image, "InstanceType": "t1.micro", "MinCount": 1, "MaxCount": 1, "KeyName": A_KEY}), not_found_key.clone()),
        row("RunInstances with A's client token launches B's own", "run_instances", json!({"ImageId": b_image, "InstanceType": "m1.small", "MinCount": 1, "MaxCount": 1, "ClientToken": A_TOKEN}), Hidden),
        // Key pairs.
        row("DescribeKeyPairs by A's name", "describe_key_pairs", json!({"KeyNames": [A_KEY]}), not_found_key.clone()),
        row("DescribeKeyPairs by A's ID", "describe_key_pairs", json!({"KeyPairIds": [key]}), not_found_key.clone()),
        row("DescribeKeyPairs list", "describe_key_pairs", json!({"IncludePublicKey": true}), Hidden),
        row("DescribeKeyPairs filter key-name", "describe_key_pairs", filter("key-name", A_KEY), Hidden),
        row("DescribeKeyPairs filter fingerprint", "describe_key_pairs", filter("fingerprint", &a.fingerprint), Hidden),
        row("DescribeKeyPairs filter tag:team", "describe_key_pairs", filter("tag:team", A_TAG), Hidden),
        row("DeleteKeyPair by A's name", "delete_key_pair", json!({"KeyName": A_KEY}), Hidden),
        row(
            "DeleteKeyPair by A's ID",
            "delete_key_pair",
            json!({"KeyPairId": key}),
            Refused("InvalidKeyPair.NotFound", 400),
        ),
        // Images.
        row("DescribeImages by A's ID", "describe_images", json!({"ImageIds": [img]}), not_found_ami.clone()),
        row("DescribeImages by A's ID as ami-", "describe_images", json!({"ImageIds": [ami]}), not_found_ami.clone()),
        row("DescribeImages list", "describe_images", json!({}), Hidden),
        row("DescribeImages Owners=A", "describe_images", json!({"Owners": [&a.account_id]}), Hidden),
        row("DescribeImages ExecutableUsers=self", "describe_images", json!({"ExecutableUsers": ["self"]}), Hidden),
        row("DescribeImages ExecutableUsers=all", "describe_images", json!({"ExecutableUsers": ["all"]}), Hidden),
        row("DescribeImages filter name", "describe_images", filter("name", A_IMAGE), Hidden),
        row("DescribeImages filter image-id", "describe_images", filter("image-id", img), Hidden),
        row("DescribeImages filter tag:team", "describe_images", filter("tag:team", A_TAG), Hidden),
        row("DescribeImageAttribute launchPermission", "describe_image_attribute", json!({"ImageId": img, "Attribute": "launchPermission"}), not_found_ami.clone()),
        row("DescribeImageAttribute description", "describe_image_attribute", json!({"ImageId": img, "Attribute": "description"}), not_found_ami.clone()),
        row("ModifyImageAttribute grants B", "modify_image_attribute", json!({"ImageId": img, "LaunchPermission": {"Add": [{"UserId": "000000000000"}]}}), not_found_ami.clone()),
        row("ModifyImageAttribute makes public", "modify_image_attribute", json!({"ImageId": img, "LaunchPermission": {"Add": [{"Group": "all"}]}}), not_found_ami.clone()),
        row("ModifyImageAttribute description", "modify_image_attribute", json!({"ImageId": img, "Description": {"Value": "bravo was here"}}), not_found_ami.clone()),
        row("DeregisterImage", "deregister_image", json!({"ImageId": img}), not_found_ami.clone()),
        row("DeregisterImage as ami-", "deregister_image", json!({"ImageId": ami}), not_found_ami.clone()),
        // A's private object is no image of B's, and whether A has some key is not B's to learn.
        row("RegisterImage of A's private object", "register_image", json!({"Name": "bravo-steal", "ImageLocation": a.location}), Refused("InvalidManifest", 400)),
        row("RegisterImage of a missing key in A's bucket", "register_image", json!({"Name": "bravo-probe", "ImageLocation": format!("{}.missing", a.location)}), Refused("InvalidManifest", 400)),
        row("RegisterImage with A's image as kernel", "register_image", json!({"Name": "bravo-kernel-try", "ImageLocation": "bravo-images/b2.img", "KernelId": img}), Refused("InvalidAKIID.NotFound", 400)),
        // Tags.
        row("CreateTags on A's instance", "create_tags", json!({"Resources": [i0], "Tags": tags}), not_found_i.clone()),
        row("CreateTags on A's image", "create_tags", json!({"Resources": [img], "Tags": tags}), not_found_ami.clone()),
        row("CreateTags on A's key pair", "create_tags", json!({"Resources": [key], "Tags": tags}), not_found_key.clone()),
        row("CreateTags on B's image and A's instance", "create_tags", json!({"Resources": [b_image, i1], "Tags": tags}), not_found_i.clone()),
        row("DeleteTags on A's instance", "delete_tags", json!({"Resources": [i0]}), not_found_i.clone()),
        row("DeleteTags of A's tag on A's instance", "delete_tags", json!({"Resources": [i0], "Tags": [{"Key": "team", "Value": A_TAG}]}), not_found_i.clone()),
        row("DeleteTags on A's image", "delete_tags", json!({"Resources": [img]}), not_found_ami.clone()),
        row("DeleteTags on A's key pair", "delete_tags", json!({"Resources": [key]}), not_found_key.clone()),
        row("DescribeTags list", "describe_tags", json!({}), Hidden),
        row("DescribeTags filter resource-id", "describe_tags", filter("resource-id", i0), Hidden),
        row("DescribeTags filter value", "describe_tags", filter("value", A_TAG), Hidden),
        row("DescribeTags filter resource-type", "describe_tags", filter("resource-type", "image"), Hidden),
    ]
}

/// What B may still not do on A's image once it is shared with B (or public).
#[rustfmt::skip]
fn shared_matrix(a: &Alpha, b_id: &str) -> Vec<Row> {
    let img = &a.image;
    let not_owner = Refused("AuthFailure", 400);
    let not_kept = Refused("UnsupportedOperation", 400);
    vec![
        row("DeregisterImage of a shared image", "deregister_image", json!({"ImageId": img}), not_owner.clone()),
        row("DescribeImageAttribute launchPermission of a shared image", "describe_image_attribute", json!({"ImageId": img, "Attribute": "launchPermission"}), not_owner.clone()),
        row("ModifyImageAttribute removes A's grant to B", "modify_image_attribute", json!({"ImageId": img, "LaunchPermission": {"Remove": [{"UserId": b_id}]}}), not_owner.clone()),
        row("ModifyImageAttribute grants a third account", "modify_image_attribute", json!({"ImageId": img, "LaunchPermission": {"Add": [{"UserId": "000000000000"}]}}), not_owner.clone()),
        row("ModifyImageAttribute description of a shared image", "modify_image_attribute", json!({"ImageId": img, "Description": {"Value": "bravo was here"}}), not_owner.clone()),
        // EC2 keeps an account's own tags on an image shared with it; Karri keeps only the
        // owner's, and says so rather than that the image B can launch does not exist.
        row("CreateTags on a shared image", "create_tags", json!({"Resources": [img], "Tags": [{"Key": "team", "Value": "bravo"}]}), not_kept.clone()),
        row("DeleteTags on a shared image", "delete_tags", json!({"Resources": [img]}), not_kept.clone()),
        row("DescribeTags of a shared image", "describe_tags", json!({"Filters": [{"Name": "resource-id", "Values": [img]}]}), Hidden),
    ]
}

/// A's resources read back after each of B's tries: A's driver, what A created, and the admin
/// token for the records.
struct Watch<'g> {
    a: Driver,
    alpha: Alpha,
    gw: &'g Gateway,
    admin: &'g str,
}

impl Watch<'_> {
    /// A's resources as A sees them through EC2, and as their records hold what EC2 does not
    /// show (generation, reboot requests): the parts no call of B's may change.
    async fn snapshot(&mut self) -> anyhow::Result<Value> {
        let a = &mut self.a;
        let described = a.ok("describe_instances", json!({}))?;
        let mut instances = Vec::new();
        for r in described["Reservations"]
            .as_array()
            .context("no Reservations")?
        {
            for i in r["Instances"].as_array().context("no Instances")? {
                instances.push(json!({
                    "reservation": r["ReservationId"], "id": i["InstanceId"],
                    "state": i["State"]["Name"], "type": i["InstanceType"], "image": i["ImageId"],
                    "key": i["KeyName"], "token": i["ClientToken"], "tags": i["Tags"],
                }));
            }
        }
        let mut attributes = Vec::new();
        for id in &self.alpha.instances {
            for attribute in ["userData", "disableApiTermination"] {
                let v = a.ok(
                    "describe_instance_attribute",
                    json!({"InstanceId": id, "Attribute": attribute}),
                )?;
                attributes.push(v);
            }
        }
        let images = a.ok("describe_images", json!({"Owners": ["self"]}))?;
        let images: Vec<Value> = images["Images"]
            .as_array()
            .context("no Images")?
            .iter()
            .map(|i| {
                json!({
                    "id": i["ImageId"], "name": i["Name"], "description": i["Description"],
                    "public": i["Public"], "state": i["State"], "location": i["ImageLocation"],
                    "tags": i["Tags"],
                })
            })
            .collect();
        let permissions = a.ok(
            "describe_image_attribute",
            json!({"ImageId": self.alpha.image, "Attribute": "launchPermission"}),
        )?;
        let keys = a.ok("describe_key_pairs", json!({"IncludePublicKey": true}))?;
        let tags = a.ok("describe_tags", json!({}))?;
        Ok(json!({
            "instances": instances,
            "attributes": attributes,
            "images": images,
            "launchPermission": permissions["LaunchPermissions"],
            "keys": keys["KeyPairs"],
            "tags": tags["Tags"],
            "records": records(self.gw, self.admin, "alpha").await?,
        }))
    }
}

/// For each of A's instance, image and key pair records: its generation (bumped by any spec
/// change) and its reboot request, read by the admin.
async fn records(gw: &Gateway, admin: &str, namespace: &str) -> anyhow::Result<Value> {
    let mut out = BTreeMap::new();
    for plural in ["instances", "images", "keypairs"] {
        let url = format!(
            "{}/apis/karri.dev/v1alpha1/namespaces/{namespace}/{plural}",
            gw.url()
        );
        let resp = gw.client()?.get(&url).bearer_auth(admin).send().await?;
        ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        let list: Value = resp.json().await?;
        for item in list["items"].as_array().context("no items")? {
            let meta = &item["metadata"];
            out.insert(
                format!("{plural}/{}", meta["name"].as_str().unwrap_or_default()),
                json!({
                    "generation": meta["generation"],
                    "reboot": meta["annotations"][REBOOT_ANNOTATION],
                }),
            );
        }
    }
    Ok(serde_json::to_value(out)?)
}

/// Runs each row as B and checks its answer (a "hidden" answer may show none of `markers`),
/// then re-reads A's resources and checks they are still `baseline`; returns one line per
/// failure, naming the row.
async fn run_rows(
    rows: Vec<Row>,
    b: &mut Driver,
    watch: &mut Watch<'_>,
    markers: &[String],
    baseline: &Value,
) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let checked = rows.len();
    for Row {
        name,
        method,
        params,
        expect,
    } in rows
    {
        let answer = b.call(method, params.clone())?;
        match (&expect, answer.ok) {
            (Refused(code, status), false) => {
                let got = (answer.code.as_deref(), answer.status);
                if got != (Some(*code), Some(*status)) {
                    failures.push(format!(
                        "{name}: expected {code}/{status}, got {:?}/{:?}: {}",
                        got.0, got.1, answer.message
                    ));
                }
            }
            (Refused(code, status), true) => failures.push(format!(
                "{name}: expected {code}/{status}, but it succeeded: {}",
                answer.result
            )),
            (Hidden, true) => {
                let text = answer.result.to_string();
                let leaked: Vec<&String> = markers
                    .iter()
                    .filter(|m| text.contains(m.as_str()))
                    .collect();
                if !leaked.is_empty() {
                    failures.push(format!("{name}: shows A's {leaked:?}: {text}"));
                }
            }
            (Hidden, false) => failures.push(format!(
                "{name}: expected success, got {:?}/{:?}: {}",
                answer.code, answer.status, answer.message
            )),
        }
        let now = watch.snapshot().await?;
        if now != *baseline {
            failures.push(format!(
                "{name} ({method} {params}) changed A's resources:\nbefore: {baseline:#}\nafter: {now:#}"
            ));
        }
    }
    eprintln!(
        "[isolation] {checked} rows of B's tries checked, {} failed",
        failures.len()
    );
    Ok(failures)
}

/// The image IDs of a DescribeImages answer.
fn image_ids(described: &Value) -> Vec<String> {
    described["Images"]
        .as_array()
        .map(|images| {
            images
                .iter()
                .filter_map(|i| i["ImageId"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether B's view of A's image is bare of A's tags and names A as the owner.
fn shows_image_without_tags(described: &Value, alpha: &Alpha) -> anyhow::Result<()> {
    let image = described["Images"]
        .as_array()
        .and_then(|images| images.iter().find(|i| i["ImageId"] == json!(alpha.image)))
        .with_context(|| format!("B does not see A's image: {described}"))?;
    ensure!(
        image["OwnerId"] == json!(alpha.account_id),
        "A's image shows owner {}: {image}",
        image["OwnerId"]
    );
    let tags = image.get("Tags").cloned().unwrap_or(json!([]));
    ensure!(
        tags == json!([]),
        "B sees A's tags on A's image (tags are not shared with an image): {image}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_can_neither_see_nor_change_an_accounts_resources_except_a_shared_image(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let gw = &cloud.gateway;
    let admin = cloud.tokens.admin.as_str();
    let (a_id, a_creds) = gw.account_with_key(admin, "alpha").await?;
    let (b_id, b_creds) = gw.account_with_key(admin, "bravo").await?;
    let mut a = Driver::start(gw, &a_creds, "A")?;
    let mut b = Driver::start(gw, &b_creds, "B")?;

    // A's resources: a key pair, an image, two running instances, tags on each.
    let team = |value: &str| json!([{"Key": "team", "Value": value}]);
    let key = a.ok(
        "create_key_pair",
        json!({"KeyName": A_KEY, "TagSpecifications": [{"ResourceType": "key-pair", "Tags": team(A_TAG)}]}),
    )?;
    let location = cloud.blank_image_in_s3(&a_creds, "alpha-images").await?;
    let image = a.ok(
        "register_image",
        json!({"Name": A_IMAGE, "ImageLocation": location, "Description": A_DESCRIPTION}),
    )?;
    let image_id = image["ImageId"].as_str().context("no ImageId")?.to_string();
    a.ok(
        "create_tags",
        json!({"Resources": [image_id], "Tags": team(A_TAG)}),
    )?;
    let run = a.ok(
        "run_instances",
        json!({
            "ImageId": image_id, "InstanceType": "t1.micro", "MinCount": 2, "MaxCount": 2,
            "KeyName": A_KEY, "UserData": "#!/bin/sh\necho alpha\n", "ClientToken": A_TOKEN,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": team(A_TAG)}],
        }),
    )?;
    let instances: Vec<String> = run["Instances"]
        .as_array()
        .context("no Instances")?
        .iter()
        .filter_map(|i| i["InstanceId"].as_str().map(str::to_string))
        .collect();
    ensure!(instances.len() == 2, "A launched {instances:?}");
    a.ok(
        "create_tags",
        json!({"Resources": [instances[0]], "Tags": [{"Key": "role", "Value": A_ROLE}]}),
    )?;
    let public_key = a.ok(
        "describe_key_pairs",
        json!({"KeyNames": [A_KEY], "IncludePublicKey": true}),
    )?["KeyPairs"][0]["PublicKey"]
        .as_str()
        .context("no PublicKey")?
        .to_string();
    let alpha = Alpha {
        account_id: a_id.clone(),
        location: location.clone(),
        reservation: run["ReservationId"]
            .as_str()
            .context("no ReservationId")?
            .to_string(),
        instances,
        image: image_id.clone(),
        key_id: key["KeyPairId"]
            .as_str()
            .context("no KeyPairId")?
            .to_string(),
        fingerprint: key["KeyFingerprint"]
            .as_str()
            .context("no KeyFingerprint")?
            .to_string(),
        public_key,
    };
    // B's refusals for A's object and for a key A lacks read alike, but for the key.
    let refused = |b: &mut Driver, name: &str, location: &str| -> anyhow::Result<String> {
        let answer = b.call(
            "register_image",
            json!({"Name": name, "ImageLocation": location}),
        )?;
        answer.refusal(&format!("B registers {location}"))?;
        Ok(answer.message.replace(location, "<location>"))
    };
    let missing = format!("{location}.missing");
    let (present, absent) = (
        refused(&mut b, "probe-present", &location)?,
        refused(&mut b, "probe-absent", &missing)?,
    );
    ensure!(
        present == absent.replace(".missing", ""),
        "B tells A's object from a missing one: {present:?} vs {absent:?}"
    );
    b.upload_image_object("bravo-images/bravo.img")?;
    let b_image = b.ok(
        "register_image",
        json!({"Name": "bravo-image", "ImageLocation": "bravo-images/bravo.img"}),
    )?["ImageId"]
        .as_str()
        .context("no ImageId")?
        .to_string();

    let running = alpha.instances.clone();
    cloud
        .wait_until("A's instances are running", STEP, async || {
            let d = a.ok(
                "describe_instances",
                json!({"InstanceIds": running, "Filters": [{"Name": "instance-state-name", "Values": ["running"]}]}),
            )?;
            let n = d["Reservations"][0]["Instances"]
                .as_array()
                .map_or(0, Vec::len);
            Ok(if n == running.len() {
                Break(())
            } else {
                Continue(format!("{n} running"))
            })
        })
        .await?;
    let markers = alpha.markers();
    let mut w = Watch {
        a,
        alpha,
        gw,
        admin,
    };
    let baseline = w.snapshot().await?;
    let count = |key: &str| baseline[key].as_array().map_or(0, Vec::len);
    ensure!(
        (
            count("instances"),
            count("attributes"),
            count("images"),
            count("keys"),
            count("tags")
        ) == (2, 4, 1, 1, 5)
            && baseline["records"].as_object().map(|r| r.len()) == Some(4)
            && baseline["instances"][0]["state"] == json!("running"),
        "A's baseline lacks what A created: {baseline:#}"
    );

    // 1. Nothing shared: B sees and changes nothing of A's.
    let rows = private_matrix(&w.alpha, &b_image);
    let mut failures = run_rows(rows, &mut b, &mut w, &markers, &baseline).await?;

    // 2. A grants B launch permission: B sees the image (without A's tags) and launches it,
    //    and can do nothing else with it.
    let image = w.alpha.image.clone();
    let grant = |change: Value| json!({"ImageId": image, "LaunchPermission": change});
    w.a.ok(
        "modify_image_attribute",
        grant(json!({"Add": [{"UserId": b_id}]})),
    )?;
    let shared = w.snapshot().await?;
    ensure!(
        shared["launchPermission"] == json!([{"UserId": b_id}]),
        "A's grant is not in the launch permissions: {}",
        shared["launchPermission"]
    );
    let executable = b.ok("describe_images", json!({"ExecutableUsers": ["self"]}))?;
    shows_image_without_tags(&executable, &w.alpha)?;
    // ExecutableBy scopes by explicit launch permissions: B's own image is not among them.
    ensure!(
        image_ids(&executable) == [image.clone()],
        "ExecutableUsers=self shows other than the image shared with B: {executable}"
    );
    let by_id = b.ok("describe_images", json!({"ImageIds": [image]}))?;
    shows_image_without_tags(&by_id, &w.alpha)?;
    let launch =
        json!({"ImageId": image, "InstanceType": "t1.micro", "MinCount": 1, "MaxCount": 1});
    let launched = b.ok("run_instances", launch.clone())?;
    ensure!(
        launched["OwnerId"] == json!(b_id) && launched["Instances"][0]["ImageId"] == json!(image),
        "B's launch of the shared image: {launched}"
    );
    ensure!(
        w.snapshot().await? == shared,
        "B's launch of the shared image changed A's resources"
    );
    let by_tag = json!({"Filters": [{"Name": "tag:team", "Values": [A_TAG]}]});
    let tagged = b.ok("describe_images", by_tag.clone())?;
    ensure!(
        image_ids(&tagged).is_empty(),
        "B finds the shared image by A's tag: {tagged}"
    );
    let shared_markers: Vec<String> = markers
        .iter()
        .filter(|m| **m != image && **m != w.alpha.account_id)
        .cloned()
        .collect();
    let rows = shared_matrix(&w.alpha, &b_id);
    failures.extend(run_rows(rows, &mut b, &mut w, &shared_markers, &shared).await?);

    // Whom else A shares the image with is A's business: B asking for the images a third
    //    account may run does not learn that A granted it.
    const THIRD: &str = "000000000000";
    w.a.ok(
        "modify_image_attribute",
        grant(json!({"Add": [{"UserId": THIRD}]})),
    )?;
    let third = b.ok("describe_images", json!({"ExecutableUsers": [THIRD]}))?;
    ensure!(
        !image_ids(&third).contains(&image),
        "B learns that A shared its image with {THIRD}: {third}"
    );
    // B's own ID is "self".
    let as_self = b.ok("describe_images", json!({"ExecutableUsers": [&b_id]}))?;
    shows_image_without_tags(&as_self, &w.alpha)?;
    w.a.ok(
        "modify_image_attribute",
        grant(json!({"Remove": [{"UserId": THIRD}]})),
    )?;
    let after = w.snapshot().await?;
    ensure!(
        after["launchPermission"] == json!([{"UserId": b_id}]),
        "A's launch permissions after granting and taking back {THIRD}: {}",
        after["launchPermission"]
    );

    // 3. A takes the grant back: B can neither launch nor see the image.
    w.a.ok(
        "modify_image_attribute",
        grant(json!({"Remove": [{"UserId": b_id}]})),
    )?;
    let revoked = w.snapshot().await?;
    ensure!(
        revoked["launchPermission"] == json!([]),
        "A's launch permissions after taking the grant back: {}",
        revoked["launchPermission"]
    );
    let refused = b
        .call("run_instances", launch.clone())?
        .refusal("B's launch after the grant was taken back")?;
    ensure!(
        refused == ("InvalidAMIID.NotFound".to_string(), 400),
        "B's launch after the grant was taken back: {refused:?}"
    );
    let executable = b.ok("describe_images", json!({"ExecutableUsers": ["self"]}))?;
    ensure!(
        !image_ids(&executable).contains(&image),
        "B still sees the image after the grant was taken back: {executable}"
    );

    // 4. A makes the image public: B sees it (still without A's tags), among all images too,
    //    and still may only launch it.
    w.a.ok(
        "modify_image_attribute",
        grant(json!({"Add": [{"Group": "all"}]})),
    )?;
    let public = w.snapshot().await?;
    ensure!(
        public["launchPermission"] == json!([{"Group": "all"}]),
        "A's public grant: {}",
        public["launchPermission"]
    );
    for params in [
        json!({}),
        json!({"ExecutableUsers": ["all"]}),
        json!({"Owners": [a_id]}),
    ] {
        let seen = b.ok("describe_images", params.clone())?;
        shows_image_without_tags(&seen, &w.alpha).with_context(|| format!("{params}"))?;
    }
    // A public image is launchable by everyone, but not shared with B explicitly:
    // ExecutableUsers=self (explicit launch permissions, as on EC2) does not show it.
    let explicit = b.ok("describe_images", json!({"ExecutableUsers": ["self"]}))?;
    ensure!(
        !image_ids(&explicit).contains(&image),
        "ExecutableUsers=self shows a public image not shared with B: {explicit}"
    );
    let all = b.ok("describe_images", json!({"ExecutableUsers": ["all"]}))?;
    ensure!(
        image_ids(&all) == vec![image.clone()],
        "ExecutableUsers=all shows more than the public image: {all}"
    );
    let tagged = b.ok("describe_images", by_tag)?;
    ensure!(
        image_ids(&tagged).is_empty(),
        "B finds the public image by A's tag: {tagged}"
    );
    b.ok("run_instances", launch)?;
    ensure!(
        w.snapshot().await? == public,
        "B's launch of the public image changed A's resources"
    );
    let rows = shared_matrix(&w.alpha, &b_id);
    failures.extend(run_rows(rows, &mut b, &mut w, &shared_markers, &public).await?);

    // 5. B's own key pair of A's key name: imported (A's public key), deleted, created; A's
    //    key pair stays A's throughout.
    let imported = b.ok(
        "import_key_pair",
        json!({"KeyName": A_KEY, "PublicKeyMaterial": w.alpha.public_key}),
    )?;
    ensure!(
        imported["KeyPairId"] != json!(w.alpha.key_id),
        "B's import reused A's key pair: {imported}"
    );
    let b_keys = b.ok("describe_key_pairs", json!({}))?;
    ensure!(
        b_keys["KeyPairs"].as_array().map(Vec::len) == Some(1)
            && b_keys["KeyPairs"][0]["KeyPairId"] == imported["KeyPairId"],
        "B's key pairs after its import: {b_keys}"
    );
    ensure!(
        w.snapshot().await? == public,
        "B's import of a key pair named like A's changed A's resources"
    );
    b.ok("delete_key_pair", json!({"KeyName": A_KEY}))?;
    ensure!(
        w.snapshot().await? == public,
        "B's deletion of its key pair named like A's changed A's resources"
    );
    let created = b.ok("create_key_pair", json!({"KeyName": A_KEY}))?;
    ensure!(
        created["KeyPairId"] != json!(w.alpha.key_id)
            && created["KeyFingerprint"] != json!(w.alpha.fingerprint),
        "B's created key pair is A's: {created}"
    );
    ensure!(
        w.snapshot().await? == public,
        "B's creation of a key pair named like A's changed A's resources"
    );

    // The re-reading sees what EC2 does not show: A's own reboot request changes A's records.
    w.a.ok(
        "reboot_instances",
        json!({"InstanceIds": [w.alpha.instances[0]]}),
    )?;
    let rebooted = w.snapshot().await?;
    ensure!(
        rebooted["records"] != public["records"],
        "A's reboot request is not seen in A's records: {:#}",
        rebooted["records"]
    );

    ensure!(
        failures.is_empty(),
        "{} isolation failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
