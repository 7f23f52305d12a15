//! EC2 compatibility with the real AWS clients: the awscli (`.venv/bin/aws`) and boto3
//! (`e2e/python/ec2_lifecycle.py` run with `.venv/bin/python`) drive the gateway's EC2 Query API
//! through a whole instance lifecycle on an up-style cloud ([`Cloud::start`]: etcd, gateway,
//! operator and node agents on libvirt's test driver) with a short retention, so that terminated
//! instances are seen collected.
//!
//! Every client runs with the environment of `Gateway::aws_env` only (plus `PATH` and `HOME`),
//! signed with an access key of its own account; awscli answers are read with `--output json`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::ops::ControlFlow::{self, Break, Continue};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use crds::Instance;
use karri_e2e::cloud::{node_of, violation, Cloud, Options};
use karri_testkit::{workspace_root, AwsCredentials};
use kube::api::Api;
use kube::ResourceExt;
use serde_json::Value;
use tokio::process::Command;
use tokio::time::Instant;

/// Deadline of a step that waits for one piece of progress.
const STEP: Duration = Duration::from_secs(60);
/// The operator's retention of terminated instances: short, so that collection is observable.
const RETENTION_SECONDS: u64 = 6;
/// The user data of the launched instances.
const SCRIPT: &str = "#!/bin/sh\necho 'hello from the awscli' > /tmp/hello\n";
/// Annotation the gateway sets on an instance for RebootInstances.
const REBOOT_ANNOTATION: &str = "karri.dev/reboot-requested-at";

/// The awscli of the workspace's virtualenv, signed with one account's access key.
struct Aws {
    bin: PathBuf,
    env: Vec<(String, String)>,
    creds: AwsCredentials,
}

impl Aws {
    /// Creates account `name` with an access key in `cloud`: the client and the account ID.
    async fn for_new_account(cloud: &Cloud, name: &str) -> anyhow::Result<(Aws, String)> {
        let (account_id, creds) = cloud
            .gateway
            .account_with_key(&cloud.tokens.admin, name)
            .await?;
        let aws = Aws {
            bin: workspace_root().join(".venv/bin/aws"),
            env: client_env(&cloud.gateway.aws_env(&creds)),
            creds,
        };
        ensure!(
            aws.bin.exists(),
            "{} is missing; run `make setup`",
            aws.bin.display()
        );
        Ok((aws, account_id))
    }

    /// Runs `aws ec2 <args> --output json`: its status, stdout and stderr.
    async fn run(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(&self.bin)
            .arg("ec2")
            .args(args)
            .args(["--output", "json"])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running aws ec2 {}", args.join(" ")))
    }

    /// `aws ec2 <args>`, which must succeed: its JSON answer (`Null` when it prints nothing).
    async fn ok(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.run(args).await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "aws ec2 {} failed ({}):\n{stderr}{stdout}",
            args.join(" "),
            out.status
        );
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).with_context(|| {
            format!(
                "aws ec2 {} printed no JSON:\n{stdout}\nstderr:\n{stderr}",
                args.join(" ")
            )
        })
    }

    /// `aws ec2 <args>`, which must fail with an EC2 error: the error code and the message.
    async fn error(&self, args: &[&str]) -> anyhow::Result<(String, String)> {
        let out = self.run(args).await?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            !out.status.success(),
            "aws ec2 {} succeeded, an error was expected; it printed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        error_code(&stderr)
            .map(|code| (code.to_owned(), stderr.clone()))
            .with_context(|| {
                format!(
                    "aws ec2 {} failed without an EC2 error code:\n{stderr}",
                    args.join(" ")
                )
            })
    }

    /// `aws ec2 <args>`, which must fail with `code`: the message.
    async fn refused(&self, args: &[&str], code: &str) -> anyhow::Result<String> {
        let (got, stderr) = self.error(args).await?;
        ensure!(
            got == code,
            "aws ec2 {} failed with {got}, expected {code}:\n{stderr}",
            args.join(" ")
        );
        Ok(stderr)
    }
}

/// The environment of a client: `aws_env` and nothing of this machine's AWS settings.
fn client_env(aws_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["PATH", "HOME"]
        .into_iter()
        .filter_map(|k| Some((k.to_owned(), std::env::var(k).ok()?)))
        .collect();
    env.extend(aws_env.iter().cloned());
    env
}

/// The code of `An error occurred (Code) when calling …` in an awscli error.
fn error_code(stderr: &str) -> Option<&str> {
    let rest = stderr.split("An error occurred (").nth(1)?;
    rest.split_once(')').map(|(code, _)| code)
}

/// The string at JSON pointer `pointer`, or an error naming it.
fn str_at<'v>(v: &'v Value, pointer: &str) -> anyhow::Result<&'v str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .with_context(|| format!("no string at {pointer} in {v}"))
}

/// The array at JSON pointer `pointer` (an absent one is empty).
fn array_at<'v>(v: &'v Value, pointer: &str) -> &'v [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The instances of a DescribeInstances answer, across its reservations.
fn instances(answer: &Value) -> Vec<&Value> {
    array_at(answer, "/Reservations")
        .iter()
        .flat_map(|r| array_at(r, "/Instances"))
        .collect()
}

/// The instance IDs of a DescribeInstances answer, in answer order.
fn ids_of(answer: &Value) -> Vec<String> {
    instances(answer)
        .iter()
        .filter_map(|i| i.pointer("/InstanceId").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// `InstanceId → State.Name` of a DescribeInstances answer.
fn states_of(answer: &Value) -> BTreeMap<String, String> {
    instances(answer)
        .iter()
        .filter_map(|i| {
            Some((
                i.pointer("/InstanceId")?.as_str()?.to_owned(),
                i.pointer("/State/Name")?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// `Key → Value` of a `Tags` array.
fn tags_of(v: &Value) -> BTreeMap<String, String> {
    array_at(v, "/Tags")
        .iter()
        .filter_map(|t| {
            Some((
                t.get("Key")?.as_str()?.to_owned(),
                t.get("Value")?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn sorted(ids: &[String]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

/// Standard base64 with padding (what EC2 answers for user data).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether IPv4 CIDR `inner` lies within CIDR `outer`.
fn cidr_within(inner: &str, outer: &str) -> anyhow::Result<bool> {
    let parse = |cidr: &str| -> anyhow::Result<(u32, u32)> {
        let (addr, len) = cidr.split_once('/').context("no prefix length")?;
        let addr: Ipv4Addr = addr.parse()?;
        let len: u32 = len.parse()?;
        ensure!(len <= 32, "prefix length {len}");
        Ok((u32::from(addr), len))
    };
    let ((inner, inner_len), (outer, outer_len)) = (parse(inner)?, parse(outer)?);
    let mask = u32::MAX.checked_shl(32 - outer_len).unwrap_or(0);
    Ok(inner_len >= outer_len && inner & mask == outer & mask)
}

/// An ed25519 key made by `ssh-keygen` in `dir`: the `.pub` path and the SHA-256 fingerprint
/// OpenSSH shows for it (base64 without padding).
async fn ssh_keygen(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let key = dir.join("id_ed25519");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ec2-compat", "-f"])
        .arg(&key)
        .output()
        .await
        .context("running ssh-keygen")?;
    ensure!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = key.with_extension("pub");
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(&public)
        .output()
        .await?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let fingerprint = listing
        .split_whitespace()
        .find_map(|w| w.strip_prefix("SHA256:"))
        .with_context(|| format!("no SHA256 fingerprint in {listing:?}"))?
        .to_owned();
    Ok((public, fingerprint))
}

/// The Instance record of an EC2 instance (records made through EC2 are named by their ID).
async fn record(cloud: &Cloud, namespace: &str, id: &str) -> anyhow::Result<Instance> {
    let api: Api<Instance> = Api::namespaced(cloud.client.clone(), namespace);
    api.get(id)
        .await
        .with_context(|| format!("reading the record of {id}"))
}

/// Polls `aws ec2 describe-instances --instance-ids <ids>` until every instance is in `state`.
async fn wait_state(cloud: &Cloud, aws: &Aws, ids: &[String], state: &str) -> anyhow::Result<()> {
    let mut args = vec!["describe-instances", "--instance-ids"];
    args.extend(ids.iter().map(String::as_str));
    cloud
        .wait_until(
            &format!("{ids:?} are {state}"),
            STEP,
            async || -> anyhow::Result<ControlFlow<(), String>> {
                let states = states_of(&aws.ok(&args).await?);
                ensure!(states.len() == ids.len(), "described {states:?}");
                Ok(if states.values().all(|s| s == state) {
                    Break(())
                } else {
                    Continue(format!("{states:?}"))
                })
            },
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awscli_runs_stops_starts_and_terminates_instances_until_they_are_collected(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options {
        agents: 2,
        retention_seconds: RETENTION_SECONDS,
        ..Options::default()
    })
    .await?;
    let account = "awscli";
    let (aws, account_id) = Aws::for_new_account(&cloud, account).await?;
    let dir = tempfile::tempdir()?;

    // Key pair: imported from ssh-keygen, with the fingerprint OpenSSH computes.
    let (public, fingerprint) = ssh_keygen(dir.path()).await?;
    let material = format!("fileb://{}", public.display());
    let imported = aws
        .ok(&[
            "import-key-pair",
            "--key-name",
            "k",
            "--public-key-material",
            &material,
        ])
        .await?;
    ensure!(str_at(&imported, "/KeyName")? == "k", "imported {imported}");
    let key_id = str_at(&imported, "/KeyPairId")?.to_owned();
    ensure!(key_id.starts_with("key-"), "key pair ID {key_id}");
    ensure!(
        str_at(&imported, "/KeyFingerprint")?.trim_end_matches('=') == fingerprint,
        "import-key-pair fingerprint {imported} differs from ssh-keygen's SHA256:{fingerprint}"
    );
    let keys = aws.ok(&["describe-key-pairs"]).await?;
    let shown: Vec<(&str, &str, &str)> = array_at(&keys, "/KeyPairs")
        .iter()
        .filter_map(|k| {
            Some((
                k.get("KeyName")?.as_str()?,
                k.get("KeyPairId")?.as_str()?,
                k.get("KeyFingerprint")?.as_str()?,
            ))
        })
        .collect();
    ensure!(
        shown == [("k", key_id.as_str(), str_at(&imported, "/KeyFingerprint")?)],
        "describe-key-pairs shows {shown:?}"
    );
    aws.refused(
        &[
            "import-key-pair",
            "--key-name",
            "k",
            "--public-key-material",
            &material,
        ],
        "InvalidKeyPair.Duplicate",
    )
    .await?;

    // Image: registered from its S3 location (a blank disk the agent fetches through a presigned
    // URL and overlays), found among the caller's own.
    let location = cloud.blank_image_in_s3(&aws.creds, "cli-images").await?;
    let image = aws
        .ok(&[
            "register-image",
            "--name",
            "cli-image",
            "--image-location",
            &location,
        ])
        .await?;
    let image_id = str_at(&image, "/ImageId")?.to_owned();
    let own = aws.ok(&["describe-images", "--owners", "self"]).await?;
    let own_images = array_at(&own, "/Images");
    ensure!(
        own_images.len() == 1,
        "describe-images --owners self shows {own}"
    );
    let found = &own_images[0];
    ensure!(
        str_at(found, "/ImageId")? == image_id
            && str_at(found, "/Name")? == "cli-image"
            && str_at(found, "/ImageLocation")? == location
            && str_at(found, "/OwnerId")? == account_id
            && str_at(found, "/State")? == "available",
        "describe-images --owners self shows {found}, expected {image_id} of {account_id}"
    );
    // The `ami-` alias of the image's ID tags it, as every other image action takes it.
    let alias = image_id.replacen("emi-", "ami-", 1);
    aws.ok(&[
        "create-tags",
        "--resources",
        &alias,
        "--tags",
        "Key=tier,Value=base",
    ])
    .await?;
    let image_tags = aws
        .ok(&[
            "describe-tags",
            "--filters",
            &format!("Name=resource-id,Values={image_id}"),
        ])
        .await?;
    ensure!(
        array_at(&image_tags, "/Tags").len() == 1
            && str_at(&array_at(&image_tags, "/Tags")[0], "/Key")? == "tier",
        "create-tags of {alias} did not tag {image_id}: {image_tags}"
    );
    // Filters on an image ID take the alias too: DescribeTags, DescribeImages.
    let alias_tags = aws
        .ok(&[
            "describe-tags",
            "--filters",
            &format!("Name=resource-id,Values={alias}"),
        ])
        .await?;
    ensure!(
        array_at(&alias_tags, "/Tags").len() == 1,
        "describe-tags resource-id={alias} finds {alias_tags}"
    );
    let by_alias = aws
        .ok(&[
            "describe-images",
            "--filters",
            &format!("Name=image-id,Values={alias}"),
        ])
        .await?;
    ensure!(
        array_at(&by_alias, "/Images")
            .iter()
            .map(|i| str_at(i, "/ImageId"))
            .collect::<anyhow::Result<Vec<_>>>()?
            == [image_id.as_str()],
        "describe-images image-id={alias} finds {by_alias}"
    );
    aws.ok(&["delete-tags", "--resources", &alias, "--tags", "Key=tier"])
        .await?;
    // creation-date matches the CreationDate the image shows.
    let created = str_at(found, "/CreationDate")?.to_owned();
    let year = format!("Name=creation-date,Values={}*", &created[..4]);
    let by_date = aws
        .ok(&["describe-images", "--owners", "self", "--filters", &year])
        .await?;
    ensure!(
        array_at(&by_date, "/Images").len() == 1,
        "{year} finds {by_date} (CreationDate {created})"
    );
    // boot-mode matches the BootMode the image shows.
    let boot_mode = str_at(found, "/BootMode")?;
    let by_boot_mode = aws
        .ok(&[
            "describe-images",
            "--owners",
            "self",
            "--filters",
            &format!("Name=boot-mode,Values={boot_mode}"),
        ])
        .await?;
    ensure!(
        array_at(&by_boot_mode, "/Images").len() == 1,
        "boot-mode={boot_mode} finds {by_boot_mode}"
    );

    // A dry run is refused with DryRunOperation and launches nothing.
    let script = dir.path().join("script.sh");
    std::fs::write(&script, SCRIPT)?;
    let user_data = format!("file://{}", script.display());
    let launch = |count: &'static str, tags: &'static str| {
        [
            "run-instances",
            "--image-id",
            image_id.as_str(),
            "--count",
            count,
            "--instance-type",
            "t1.micro",
            "--key-name",
            "k",
            "--user-data",
            user_data.as_str(),
            "--tag-specifications",
            tags,
        ]
    };
    let web_tags = "ResourceType=instance,Tags=[{Key=Name,Value=web},{Key=team,Value=a}]";
    let mut dry = launch("3", web_tags).to_vec();
    dry.push("--dry-run");
    aws.refused(&dry, "DryRunOperation").await?;
    let none = aws.ok(&["describe-instances"]).await?;
    ensure!(ids_of(&none).is_empty(), "the dry run launched {none}");

    // Three instances, tagged, with key and user data.
    let run = aws.ok(&launch("3", web_tags)).await?;
    let reservation = str_at(&run, "/ReservationId")?.to_owned();
    ensure!(
        str_at(&run, "/OwnerId")? == account_id,
        "reservation owned by {run}"
    );
    let launched = array_at(&run, "/Instances");
    let web: Vec<String> = launched
        .iter()
        .map(|i| str_at(i, "/InstanceId").map(str::to_owned))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        web.iter().collect::<BTreeSet<_>>().len() == 3,
        "run-instances --count 3 launched {web:?}"
    );
    for (n, i) in launched.iter().enumerate() {
        ensure!(
            str_at(i, "/ImageId")? == image_id
                && str_at(i, "/InstanceType")? == "t1.micro"
                && str_at(i, "/KeyName")? == "k"
                && i.pointer("/AmiLaunchIndex").and_then(Value::as_u64) == Some(n as u64),
            "launched instance {n}: {i}"
        );
        let tags = tags_of(i);
        ensure!(
            tags.get("Name").map(String::as_str) == Some("web")
                && tags.get("team").map(String::as_str) == Some("a")
                && tags.len() == 2,
            "tags of launched instance {n}: {tags:?}"
        );
    }

    // The image-id filter takes the image's `ami-` alias (the instances show its `emi-` ID).
    let by_image = aws
        .ok(&[
            "describe-instances",
            "--filters",
            &format!("Name=image-id,Values={alias}"),
        ])
        .await?;
    ensure!(
        sorted(&ids_of(&by_image)) == sorted(&web),
        "describe-instances image-id={alias} finds {by_image}, launched {web:?}"
    );

    let web_running = [
        "describe-instances",
        "--filters",
        "Name=tag:Name,Values=web",
        "Name=instance-state-name,Values=running",
    ];
    cloud
        .wait_until(
            "the filter tag:Name=web, running finds the 3",
            STEP,
            async || {
                let answer = aws.ok(&web_running).await?;
                let found = sorted(&ids_of(&answer));
                if found.len() > 3 || found.iter().any(|id| !web.contains(id)) {
                    return Err(violation(format!("the filter found {found:?} of {web:?}")));
                }
                Ok(if found == sorted(&web) {
                    Break(())
                } else {
                    Continue(format!("found {found:?}"))
                })
            },
        )
        .await?;
    let described = aws
        .ok(&["describe-instances", "--instance-ids", &web[0]])
        .await?;
    let first = instances(&described);
    ensure!(
        first.len() == 1,
        "describe-instances {} shows {described}",
        web[0]
    );
    ensure!(
        str_at(first[0], "/Placement/AvailabilityZone")? == "karri-1a"
            && str_at(&described, "/Reservations/0/ReservationId")? == reservation,
        "{} is not in zone karri-1a of reservation {reservation}: {described}",
        web[0]
    );

    let attribute = aws
        .ok(&[
            "describe-instance-attribute",
            "--instance-id",
            &web[0],
            "--attribute",
            "userData",
        ])
        .await?;
    ensure!(
        str_at(&attribute, "/InstanceId")? == web[0]
            && str_at(&attribute, "/UserData/Value")? == base64(SCRIPT.as_bytes()),
        "userData of {}: {attribute}, expected {}",
        web[0],
        base64(SCRIPT.as_bytes())
    );

    // Three more, tagged otherwise: the tag filter still finds exactly the web ones.
    let db_tags = "ResourceType=instance,Tags=[{Key=Name,Value=db}]";
    let more = aws.ok(&launch("3", db_tags)).await?;
    let db: Vec<String> = ids_of(&serde_json::json!({"Reservations": [more]}));
    ensure!(db.len() == 3, "the second run-instances launched {db:?}");
    let all: Vec<String> = sorted(&[web.clone(), db.clone()].concat());
    let web_only = aws
        .ok(&[
            "describe-instances",
            "--filters",
            "Name=tag:Name,Values=web",
        ])
        .await?;
    ensure!(
        sorted(&ids_of(&web_only)) == sorted(&web),
        "tag:Name=web finds {:?}, expected {web:?}",
        ids_of(&web_only)
    );

    // Filters on values every instance shows (pending ones too) find every instance.
    for shown in [
        "Name=metadata-options.http-tokens,Values=optional",
        "Name=metadata-options.http-endpoint,Values=enabled",
        "Name=source-dest-check,Values=true",
        "Name=ebs-optimized,Values=false",
        "Name=launch-time,Values=20*",
    ] {
        let found = aws.ok(&["describe-instances", "--filters", shown]).await?;
        ensure!(
            sorted(&ids_of(&found)) == all,
            "{shown} finds {:?}, expected {all:?}",
            ids_of(&found)
        );
    }

    // Pagination by hand: MaxResults 5 over 6 instances gives a NextToken, and following it
    // yields the rest; together every instance exactly once.
    let page1 = aws
        .ok(&["describe-instances", "--max-results", "5"])
        .await?;
    let token = str_at(&page1, "/NextToken")
        .context("the first page of 5 out of 6 has no NextToken")?
        .to_owned();
    let page2 = aws
        .ok(&[
            "describe-instances",
            "--max-results",
            "5",
            "--next-token",
            &token,
        ])
        .await?;
    ensure!(
        page2.get("NextToken").is_none(),
        "the last page has a NextToken: {page2}"
    );
    let (first_page, second_page) = (ids_of(&page1), ids_of(&page2));
    ensure!(
        first_page.len() == 5 && second_page.len() == 1,
        "pages of {} and {} instances",
        first_page.len(),
        second_page.len()
    );
    let paged = [first_page, second_page].concat();
    ensure!(
        sorted(&paged) == all,
        "the pages hold {paged:?}, expected each of {all:?} once"
    );
    // The awscli's own pagination follows the tokens with pages of 5.
    let auto = aws.ok(&["describe-instances", "--page-size", "5"]).await?;
    let auto_ids = ids_of(&auto);
    ensure!(
        sorted(&auto_ids) == all,
        "--page-size 5 gives {auto_ids:?}, expected each of {all:?} once"
    );

    // Tags: create, describe, delete.
    let target = web[0].clone();
    aws.ok(&[
        "create-tags",
        "--resources",
        &target,
        "--tags",
        "Key=env,Value=prod",
    ])
    .await?;
    let resource = format!("Name=resource-id,Values={target}");
    let described = aws.ok(&["describe-tags", "--filters", &resource]).await?;
    let rows: BTreeSet<(String, String, String, String)> = array_at(&described, "/Tags")
        .iter()
        .map(|t| -> anyhow::Result<_> {
            Ok((
                str_at(t, "/ResourceId")?.to_owned(),
                str_at(t, "/ResourceType")?.to_owned(),
                str_at(t, "/Key")?.to_owned(),
                str_at(t, "/Value")?.to_owned(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let row = |k: &str, v: &str| (target.clone(), "instance".into(), k.into(), v.into());
    let expected: BTreeSet<_> = [row("Name", "web"), row("env", "prod"), row("team", "a")].into();
    ensure!(
        rows == expected,
        "describe-tags shows {rows:?}, expected {expected:?}"
    );
    // `tag:<key>` picks the tags of the resources carrying that tag: only `target` has env=prod.
    let by_tag = aws
        .ok(&["describe-tags", "--filters", "Name=tag:env,Values=prod"])
        .await?;
    let tagged: BTreeSet<String> = array_at(&by_tag, "/Tags")
        .iter()
        .filter_map(|t| Some(t.get("ResourceId")?.as_str()?.to_owned()))
        .collect();
    ensure!(
        tagged == BTreeSet::from([target.clone()]) && array_at(&by_tag, "/Tags").len() == 3,
        "describe-tags tag:env=prod shows {by_tag}"
    );
    aws.ok(&["delete-tags", "--resources", &target, "--tags", "Key=env"])
        .await?;
    let described = aws.ok(&["describe-tags", "--filters", &resource]).await?;
    let keys: BTreeSet<String> = array_at(&described, "/Tags")
        .iter()
        .filter_map(|t| Some(t.get("Key")?.as_str()?.to_owned()))
        .collect();
    ensure!(
        keys == BTreeSet::from(["Name".to_owned(), "team".to_owned()]),
        "after delete-tags env the keys are {keys:?}"
    );

    // The instance type changes only while stopped; start keeps the node.
    let to_small = [
        "modify-instance-attribute",
        "--instance-id",
        target.as_str(),
        "--instance-type",
        "Value=m1.small",
    ];
    aws.refused(&to_small, "IncorrectInstanceState").await?;
    let node_before = node_of(&record(&cloud, account, &target).await?)
        .context("a running instance has a node")?
        .to_owned();
    let stopping = aws
        .ok(&["stop-instances", "--instance-ids", &target])
        .await?;
    let change = &array_at(&stopping, "/StoppingInstances");
    ensure!(
        change.len() == 1
            && str_at(&change[0], "/InstanceId")? == target
            && str_at(&change[0], "/PreviousState/Name")? == "running"
            && ["stopping", "stopped"].contains(&str_at(&change[0], "/CurrentState/Name")?),
        "stop-instances answered {stopping}"
    );
    wait_state(&cloud, &aws, std::slice::from_ref(&target), "stopped").await?;
    // Why it stopped, as EC2 words it: StateTransitionReason with the time, StateReason's code.
    let stopped = aws
        .ok(&["describe-instances", "--instance-ids", &target])
        .await?;
    let item = stopped
        .pointer("/Reservations/0/Instances/0")
        .context("no instance")?;
    ensure!(
        str_at(item, "/StateTransitionReason")?.starts_with("User initiated (")
            && str_at(item, "/StateTransitionReason")?.ends_with(" GMT)")
            && str_at(item, "/StateReason/Code")? == "Client.UserInitiatedShutdown",
        "a stopped instance says why: {item}"
    );
    let others = aws
        .ok(&["describe-instances", "--instance-ids", &web[1], &web[2]])
        .await?;
    let running: BTreeMap<String, String> = [&web[1], &web[2]]
        .into_iter()
        .map(|id| (id.clone(), "running".to_owned()))
        .collect();
    ensure!(
        states_of(&others) == running,
        "stopping {target} changed the others: {others}"
    );
    aws.ok(&to_small).await?;
    let attribute = aws
        .ok(&[
            "describe-instance-attribute",
            "--instance-id",
            &target,
            "--attribute",
            "instanceType",
        ])
        .await?;
    ensure!(
        str_at(&attribute, "/InstanceType/Value")? == "m1.small",
        "instanceType after the change: {attribute}"
    );
    let starting = aws
        .ok(&["start-instances", "--instance-ids", &target])
        .await?;
    let change = &array_at(&starting, "/StartingInstances");
    ensure!(
        change.len() == 1
            && str_at(&change[0], "/InstanceId")? == target
            && str_at(&change[0], "/PreviousState/Name")? == "stopped",
        "start-instances answered {starting}"
    );
    wait_state(&cloud, &aws, std::slice::from_ref(&target), "running").await?;
    let described = aws
        .ok(&["describe-instances", "--instance-ids", &target])
        .await?;
    ensure!(
        str_at(instances(&described)[0], "/InstanceType")? == "m1.small",
        "restarted as {described}"
    );
    let node_after = node_of(&record(&cloud, account, &target).await?)
        .map(str::to_owned)
        .context("a restarted instance has a node")?;
    ensure!(
        node_after == node_before,
        "{target} ran on {node_before} and restarted on {node_after}"
    );

    // Reboot is recorded for the node agent; console output answers for the instance.
    let reboot = aws
        .ok(&["reboot-instances", "--instance-ids", &target])
        .await?;
    ensure!(reboot.is_null(), "reboot-instances printed {reboot}");
    let annotated = record(&cloud, account, &target).await?;
    ensure!(
        annotated.annotations().contains_key(REBOOT_ANNOTATION),
        "reboot-instances left no {REBOOT_ANNOTATION} on {target}: {:?}",
        annotated.annotations()
    );
    let console = aws
        .ok(&["get-console-output", "--instance-id", &target])
        .await?;
    ensure!(
        str_at(&console, "/InstanceId")? == target,
        "get-console-output answered {console}"
    );

    // Terminate all six: terminated, visible for the retention, then gone.
    let mut terminate = vec!["terminate-instances", "--instance-ids"];
    terminate.extend(all.iter().map(String::as_str));
    let asked = Instant::now();
    let answer = aws.ok(&terminate).await?;
    let changes = array_at(&answer, "/TerminatingInstances");
    let mut terminating = BTreeSet::new();
    for c in changes {
        let state = str_at(c, "/CurrentState/Name")?;
        ensure!(
            ["shutting-down", "terminated"].contains(&state),
            "terminate-instances answered {c}"
        );
        terminating.insert(str_at(c, "/InstanceId")?.to_owned());
    }
    ensure!(
        terminating.into_iter().collect::<Vec<_>>() == all,
        "terminate-instances answered {answer}"
    );
    wait_state(&cloud, &aws, &all, "terminated").await?;
    let visible = aws.ok(&["describe-instances"]).await?;
    ensure!(
        states_of(&visible).keys().cloned().collect::<Vec<_>>() == all
            && states_of(&visible).values().all(|s| s == "terminated"),
        "a plain describe-instances shows {:?}",
        states_of(&visible)
    );
    // A terminated instance's attributes no longer change; a reboot of it is ignored, as EC2
    // documents.
    let protect = [
        "modify-instance-attribute",
        "--instance-id",
        all[0].as_str(),
        "--disable-api-termination",
    ];
    aws.refused(&protect, "IncorrectInstanceState").await?;
    aws.ok(&["reboot-instances", "--instance-ids", all[0].as_str()])
        .await?;
    let retention = Duration::from_secs(RETENTION_SECONDS);
    cloud
        .wait_until(
            "the terminated instances are collected",
            retention + STEP,
            async || {
                let left = ids_of(&aws.ok(&["describe-instances"]).await?);
                Ok(if left.is_empty() {
                    Break(())
                } else {
                    Continue(format!("still described: {left:?}"))
                })
            },
        )
        .await?;
    let gone_after = asked.elapsed();
    // The transition time has whole seconds: allow one second of rounding, never more.
    ensure!(
        gone_after + Duration::from_secs(1) >= retention,
        "collected {gone_after:?} after terminate-instances, retention is {retention:?}"
    );
    let mut by_id = vec!["describe-instances", "--instance-ids"];
    by_id.extend(all.iter().map(String::as_str));
    let message = aws.refused(&by_id, "InvalidInstanceID.NotFound").await?;
    ensure!(
        message.contains(&target),
        "the NotFound error does not name {target}: {message}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awscli_describes_zones_regions_types_the_default_vpc_and_account_attributes(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let (aws, account_id) = Aws::for_new_account(&cloud, "catalogue").await?;

    let regions = aws.ok(&["describe-regions"]).await?;
    let shown = array_at(&regions, "/Regions");
    ensure!(
        shown.len() == 1
            && str_at(&shown[0], "/RegionName")? == "karri-1"
            && !str_at(&shown[0], "/Endpoint")?.is_empty(),
        "describe-regions shows {regions}"
    );

    // The zones of the catalogue (config/samples/availability-zone.yaml).
    let zones = aws.ok(&["describe-availability-zones"]).await?;
    let mut names = Vec::new();
    for z in array_at(&zones, "/AvailabilityZones") {
        ensure!(
            str_at(z, "/RegionName")? == "karri-1" && str_at(z, "/State")? == "available",
            "zone {z}"
        );
        names.push(str_at(z, "/ZoneName")?.to_owned());
    }
    ensure!(
        names == ["karri-1a", "karri-1b"],
        "describe-availability-zones shows {names:?}"
    );

    // The instance types of the catalogue (config/samples/instance-type.yaml).
    let types = aws.ok(&["describe-instance-types"]).await?;
    let shown: BTreeMap<String, (u64, u64)> = array_at(&types, "/InstanceTypes")
        .iter()
        .map(|t| -> anyhow::Result<_> {
            let number = |p: &str| t.pointer(p).and_then(Value::as_u64).unwrap_or(0);
            Ok((
                str_at(t, "/InstanceType")?.to_owned(),
                (
                    number("/VCpuInfo/DefaultVCpus"),
                    number("/MemoryInfo/SizeInMiB"),
                ),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let expected: BTreeMap<String, (u64, u64)> = [
        ("c1.medium", (2, 1024)),
        ("m1.medium", (1, 1024)),
        ("m1.small", (1, 512)),
        ("t1.micro", (1, 256)),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v))
    .collect();
    ensure!(
        shown == expected,
        "describe-instance-types shows {shown:?}, expected {expected:?}"
    );
    // Every type is offered in the region and in each zone.
    let offered = |answer: &Value| -> Vec<(String, String, String)> {
        array_at(answer, "/InstanceTypeOfferings")
            .iter()
            .map(|o| {
                let field = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or("");
                (
                    field("/InstanceType").to_owned(),
                    field("/LocationType").to_owned(),
                    field("/Location").to_owned(),
                )
            })
            .collect()
    };
    let in_region = offered(&aws.ok(&["describe-instance-type-offerings"]).await?);
    ensure!(
        in_region.len() == expected.len()
            && in_region
                .iter()
                .all(|(_, kind, at)| kind == "region" && at == "karri-1"),
        "describe-instance-type-offerings shows {in_region:?}"
    );
    let micro_in_zones = offered(
        &aws.ok(&[
            "describe-instance-type-offerings",
            "--location-type",
            "availability-zone",
            "--filters",
            "Name=instance-type,Values=t1.micro",
        ])
        .await?,
    );
    let zone = |z: &str| {
        (
            "t1.micro".to_owned(),
            "availability-zone".to_owned(),
            z.to_owned(),
        )
    };
    ensure!(
        micro_in_zones == [zone("karri-1a"), zone("karri-1b")],
        "t1.micro by zone: {micro_in_zones:?}"
    );
    // The string lists as botocore parses them: one string per <item>, never [""].
    let lists = [
        ("/ProcessorInfo/SupportedArchitectures", "x86_64"),
        ("/SupportedUsageClasses", "on-demand"),
        ("/SupportedRootDeviceTypes", "instance-store"),
        ("/SupportedVirtualizationTypes", "hvm"),
        ("/SupportedBootModes", "legacy-bios"),
    ];
    for t in array_at(&types, "/InstanceTypes") {
        for (pointer, only) in lists {
            ensure!(
                t.pointer(pointer) == Some(&serde_json::json!([only])),
                "describe-instance-types shows {pointer} = {:?} for {t}, expected [{only:?}]",
                t.pointer(pointer)
            );
        }
    }
    let one = aws
        .ok(&["describe-instance-types", "--instance-types", "m1.small"])
        .await?;
    ensure!(
        array_at(&one, "/InstanceTypes").len() == 1
            && str_at(&one, "/InstanceTypes/0/InstanceType")? == "m1.small",
        "describe-instance-types --instance-types m1.small shows {one}"
    );
    aws.refused(
        &["describe-instance-types", "--instance-types", "x9.huge"],
        "InvalidInstanceType",
    )
    .await?;
    // A filter on a value the response shows finds the types showing it; an EC2 filter on a
    // field the response does not show is refused rather than matching nothing.
    let all_types: Vec<&str> = expected.keys().map(String::as_str).collect();
    let all: &[&str] = &all_types;
    let filtered: [(&str, &[&str]); 10] = [
        ("Name=bare-metal,Values=false", all),
        ("Name=bare-metal,Values=true", &[]),
        ("Name=supported-usage-class,Values=on-demand", all),
        ("Name=instance-storage-supported,Values=true", all),
        ("Name=free-tier-eligible,Values=false", all),
        ("Name=supported-virtualization-type,Values=hvm", all),
        ("Name=supported-root-device-type,Values=instance-store", all),
        ("Name=supported-boot-mode,Values=legacy-bios", all),
        ("Name=network-info.ipv6-supported,Values=false", all),
        ("Name=vcpu-info.default-cores,Values=2", &["c1.medium"]),
    ];
    for (filter, found) in filtered {
        let answer = aws
            .ok(&["describe-instance-types", "--filters", filter])
            .await?;
        let mut names: Vec<&str> = array_at(&answer, "/InstanceTypes")
            .iter()
            .map(|t| str_at(t, "/InstanceType"))
            .collect::<anyhow::Result<_>>()?;
        names.sort_unstable();
        ensure!(
            names == found,
            "describe-instance-types --filters {filter} finds {names:?}, expected {found:?}"
        );
    }
    aws.refused(
        &[
            "describe-instance-types",
            "--filters",
            "Name=ebs-info.nvme-support,Values=required",
        ],
        "InvalidParameterValue",
    )
    .await?;

    // The default VPC, one default subnet per zone inside it.
    let vpcs = aws.ok(&["describe-vpcs"]).await?;
    let shown = array_at(&vpcs, "/Vpcs");
    ensure!(shown.len() == 1, "describe-vpcs shows {vpcs}");
    let vpc = &shown[0];
    let vpc_id = str_at(vpc, "/VpcId")?;
    let vpc_cidr = str_at(vpc, "/CidrBlock")?;
    ensure!(
        vpc_id.starts_with("vpc-")
            && vpc.get("IsDefault") == Some(&Value::Bool(true))
            && str_at(vpc, "/State")? == "available"
            && str_at(vpc, "/OwnerId")? == account_id,
        "the default VPC of {account_id}: {vpc}"
    );
    let subnets = aws.ok(&["describe-subnets"]).await?;
    let mut by_zone = BTreeMap::new();
    for s in array_at(&subnets, "/Subnets") {
        let cidr = str_at(s, "/CidrBlock")?;
        let id = str_at(s, "/SubnetId")?;
        ensure!(
            str_at(s, "/VpcId")? == vpc_id
                && id.starts_with("subnet-")
                && s.get("DefaultForAz") == Some(&Value::Bool(true))
                && cidr_within(cidr, vpc_cidr)?
                && str_at(s, "/AvailabilityZoneId")?.starts_with("karri1-az")
                && str_at(s, "/SubnetArn")?
                    == format!("arn:aws:ec2:karri-1:{account_id}:subnet/{id}"),
            "subnet {s} of the default VPC {vpc_id} ({vpc_cidr})"
        );
        // No instance yet: every address but the five EC2 reserves is free.
        let prefix: u32 = cidr
            .split_once('/')
            .and_then(|(_, p)| p.parse().ok())
            .context("a CIDR block with a prefix length")?;
        ensure!(
            s.get("AvailableIpAddressCount") == Some(&Value::from((1u64 << (32 - prefix)) - 5)),
            "subnet {cidr} shows {:?} free addresses",
            s.get("AvailableIpAddressCount")
        );
        by_zone.insert(str_at(s, "/AvailabilityZone")?.to_owned(), cidr.to_owned());
    }
    ensure!(
        by_zone.keys().collect::<Vec<_>>() == ["karri-1a", "karri-1b"]
            && by_zone.values().collect::<BTreeSet<_>>().len() == 2,
        "describe-subnets shows {by_zone:?}"
    );
    // Filters on what the default network shows find it.
    for (args, pointer, count) in [
        (
            [
                "describe-subnets",
                "--filters",
                "Name=map-public-ip-on-launch,Values=false",
            ],
            "/Subnets",
            2,
        ),
        (
            [
                "describe-subnets",
                "--filters",
                "Name=available-ip-address-count,Values=*",
            ],
            "/Subnets",
            2,
        ),
        (
            [
                "describe-vpcs",
                "--filters",
                "Name=cidr-block-association.state,Values=associated",
            ],
            "/Vpcs",
            1,
        ),
        // The 2016-11-15 spelling, which Ansible's ec2_instance sends to find the default VPC.
        (
            ["describe-vpcs", "--filters", "Name=isDefault,Values=true"],
            "/Vpcs",
            1,
        ),
        (
            [
                "describe-subnets",
                "--filters",
                "Name=availability-zone-id,Values=karri1-az2",
            ],
            "/Subnets",
            1,
        ),
        // No elastic IP addresses yet: an empty set, not an error (libcloud asks on every
        // list of nodes).
        (
            ["describe-addresses", "--filters", "Name=domain,Values=vpc"],
            "/Addresses",
            0,
        ),
        (
            [
                "describe-availability-zones",
                "--filters",
                "Name=zone-type,Values=availability-zone",
            ],
            "/AvailabilityZones",
            2,
        ),
    ] {
        let answer = aws.ok(&args).await?;
        ensure!(
            array_at(&answer, pointer).len() == count,
            "aws ec2 {} finds {answer}, expected {count}",
            args.join(" ")
        );
    }

    for attribute in ["enableDnsSupport", "enableDnsHostnames"] {
        let answer = aws
            .ok(&[
                "describe-vpc-attribute",
                "--vpc-id",
                vpc_id,
                "--attribute",
                attribute,
            ])
            .await?;
        let value = answer
            .pointer(&format!(
                "/{}{}/Value",
                &attribute[..1].to_uppercase(),
                &attribute[1..]
            ))
            .and_then(Value::as_bool);
        ensure!(
            value == Some(false),
            "describe-vpc-attribute {attribute}: {answer}"
        );
    }
    aws.refused(
        &["describe-addresses", "--public-ips", "203.0.113.7"],
        "InvalidAddress.NotFound",
    )
    .await?;

    let attributes = aws.ok(&["describe-account-attributes"]).await?;
    let values: BTreeMap<String, Vec<String>> = array_at(&attributes, "/AccountAttributes")
        .iter()
        .map(|a| -> anyhow::Result<_> {
            let values = array_at(a, "/AttributeValues")
                .iter()
                .map(|v| str_at(v, "/AttributeValue").map(str::to_owned))
                .collect::<anyhow::Result<_>>()?;
            Ok((str_at(a, "/AttributeName")?.to_owned(), values))
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        values.get("default-vpc") == Some(&vec![vpc_id.to_owned()])
            && values.get("supported-platforms") == Some(&vec!["VPC".to_owned()])
            && values
                .get("max-instances")
                .and_then(|v| v.first())
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0),
        "describe-account-attributes shows {values:?}"
    );
    Ok(())
}

/// A cloud of one node (the test agent offers 64 vCPUs), account `account` with a blank image
/// registered from S3, and instance type `type_name` of `vcpus` vCPUs: the cloud, the account's
/// awscli, the instance types and the image's ID.
async fn one_node_with_a_type(
    account: &str,
    type_name: &str,
    vcpus: u32,
) -> anyhow::Result<(Cloud, Aws, Api<crds::InstanceType>, String)> {
    let cloud = Cloud::start(Options {
        agents: 1,
        ..Options::default()
    })
    .await?;
    let (aws, _) = Aws::for_new_account(&cloud, account).await?;
    let types: Api<crds::InstanceType> = Api::all(cloud.client.clone());
    let sized: crds::InstanceType = serde_json::from_value(serde_json::json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "InstanceType",
        "metadata": {"name": type_name},
        "spec": {"vcpus": vcpus, "memoryMiB": 1024, "diskGiB": 10}
    }))?;
    types.create(&Default::default(), &sized).await?;
    let location = cloud
        .blank_image_in_s3(&aws.creds, &format!("{account}-images"))
        .await?;
    let image = aws
        .ok(&[
            "register-image",
            "--name",
            account,
            "--image-location",
            &location,
        ])
        .await?;
    let image_id = str_at(&image, "/ImageId")?.to_owned();
    Ok((cloud, aws, types, image_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_cannot_grow_past_the_room_its_node_has_left() -> anyhow::Result<()> {
    // One node, so that both instances share it, and a type as large as the whole node.
    let (cloud, aws, types, image_id) = one_node_with_a_type("grow", "x.whole", 64).await?;
    let ran = aws
        .ok(&[
            "run-instances",
            "--image-id",
            &image_id,
            "--instance-type",
            "t1.micro",
            "--count",
            "2",
        ])
        .await?;
    // RunInstances answers one reservation, not DescribeInstances' list of them.
    let ran: Vec<String> = array_at(&ran, "/Instances")
        .iter()
        .filter_map(|i| i.pointer("/InstanceId").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    let ids = sorted(&ran);
    ensure!(ids.len() == 2, "run-instances ran {ids:?}");
    wait_state(&cloud, &aws, &ids, "running").await?;
    let (target, other) = (ids[0].clone(), ids[1].clone());
    aws.ok(&["stop-instances", "--instance-ids", &target])
        .await?;
    wait_state(&cloud, &aws, std::slice::from_ref(&target), "stopped").await?;

    // Beside the other instance's vCPU, the node has 63 left: the whole-node type is refused.
    let grow = [
        "modify-instance-attribute",
        "--instance-id",
        &target,
        "--instance-type",
        "Value=x.whole",
    ];
    let said = aws.refused(&grow, "InsufficientInstanceCapacity").await?;
    ensure!(
        said.contains("63 vCPUs"),
        "the refusal does not say what is free: {said}"
    );
    let shown = aws
        .ok(&[
            "describe-instance-attribute",
            "--instance-id",
            &target,
            "--attribute",
            "instanceType",
        ])
        .await?;
    ensure!(
        str_at(&shown, "/InstanceType/Value")? == "t1.micro",
        "a refused change changed the type: {shown}"
    );
    // The resource API refuses it the same way (403, as Kubernetes refuses what a quota does not
    // allow), whoever asks.
    let api: Api<Instance> = Api::namespaced(cloud.client.clone(), "grow");
    let patched = api
        .patch(
            &target,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"instanceType": "x.whole"}})),
        )
        .await;
    match patched {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => bail!("a kubectl-style patch to x.whole answered {other:?}"),
    }

    // Once the other instance is terminated, the node has room for it.
    aws.ok(&["terminate-instances", "--instance-ids", &other])
        .await?;
    wait_state(&cloud, &aws, std::slice::from_ref(&other), "terminated").await?;
    aws.ok(&grow).await?;
    aws.ok(&["start-instances", "--instance-ids", &target])
        .await?;
    wait_state(&cloud, &aws, std::slice::from_ref(&target), "running").await?;

    // Its type cannot be deleted or shrunk under it (its node's room would be under-counted);
    // growing is the administrator's call.
    let holder = format!("grow/{target}");
    let in_use = |what: &str, result| in_use_by(what, &holder, result);
    in_use(
        "deleting",
        types
            .delete("x.whole", &Default::default())
            .await
            .map(|_| ()),
    )?;
    let shrink = kube::api::Patch::Merge(serde_json::json!({"spec": {"vcpus": 32}}));
    in_use(
        "shrinking",
        types
            .patch("x.whole", &kube::api::PatchParams::default(), &shrink)
            .await
            .map(|_| ()),
    )?;
    ensure!(
        types.get("x.whole").await?.spec.vcpus == 64,
        "the refused shrink changed it"
    );
    let grow_memory = kube::api::Patch::Merge(serde_json::json!({"spec": {"memoryMiB": 2048}}));
    types
        .patch("x.whole", &kube::api::PatchParams::default(), &grow_memory)
        .await?;
    aws.ok(&["terminate-instances", "--instance-ids", &target])
        .await?;
    wait_state(&cloud, &aws, std::slice::from_ref(&target), "terminated").await?;
    types.delete("x.whole", &Default::default()).await?;

    // A type being deleted (a finalizer holds it) takes no new instances through EC2; one made
    // through the resource API meanwhile keeps it until that instance goes.
    let held: crds::InstanceType = serde_json::from_value(serde_json::json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "InstanceType",
        "metadata": {"name": "x.held", "finalizers": ["example.com/hold"]},
        "spec": {"vcpus": 1, "memoryMiB": 256, "diskGiB": 1}
    }))?;
    types.create(&Default::default(), &held).await?;
    types.delete("x.held", &Default::default()).await?;
    let mut run_held = launch_args(&image_id);
    run_held[4] = "x.held";
    let said = aws.refused(&run_held, "InvalidParameterValue").await?;
    ensure!(said.contains("'x.held' for InstanceType"), "{said}");
    aws.refused(
        &["describe-instance-types", "--instance-types", "x.held"],
        "InvalidInstanceType",
    )
    .await?;
    // Deleting it again is no error (Kubernetes' delete of a record being deleted).
    types.delete("x.held", &Default::default()).await?;
    let mut late: Instance = serde_json::from_value(serde_json::json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
        "metadata": {"name": "late", "namespace": "grow"},
        "spec": {"imageId": image_id, "instanceType": "x.held"}
    }))?;
    late = api.create(&Default::default(), &late).await?;
    cloud
        .wait_until("late is placed", STEP, async || {
            let i = api.get("late").await?;
            Ok(match node_of(&i) {
                Some(_) => Break(()),
                None => Continue(format!("{:?}", i.status)),
            })
        })
        .await?;
    let release = kube::api::Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}}));
    in_use_by(
        "releasing",
        "grow/late",
        types
            .patch("x.held", &kube::api::PatchParams::default(), &release)
            .await
            .map(|_| ()),
    )?;
    api.delete(&late.name_any(), &Default::default()).await?;
    cloud
        .wait_until("late is gone", STEP, async || {
            Ok(match api.get_opt("late").await? {
                None => Break(()),
                Some(i) => Continue(format!("{:?}", i.status.map(|s| s.state))),
            })
        })
        .await?;
    types
        .patch("x.held", &kube::api::PatchParams::default(), &release)
        .await?;
    ensure!(
        types.get_opt("x.held").await?.is_none(),
        "x.held stayed once released"
    );
    Ok(())
}

/// The launch of one t1.micro of `image_id` (the instance type is at index 4).
fn launch_args(image_id: &str) -> [&str; 5] {
    [
        "run-instances",
        "--image-id",
        image_id,
        "--instance-type",
        "t1.micro",
    ]
}

/// Checks that `result` is the 409 refusing `what` of an instance type that `holder` holds.
fn in_use_by(what: &str, holder: &str, result: Result<(), kube::Error>) -> anyhow::Result<()> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 409 && status.message.contains(holder) => {
            Ok(())
        }
        other => bail!("{what} answered {other:?}, not a 409 naming {holder}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_runs_the_lifecycle_with_waiters_paginators_and_client_tokens() -> anyhow::Result<()>
{
    let cloud = Cloud::start(Options {
        retention_seconds: RETENTION_SECONDS,
        ..Options::default()
    })
    .await?;
    let (_, creds) = cloud
        .gateway
        .account_with_key(&cloud.tokens.admin, "boto")
        .await?;
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    let script = root.join("e2e/python/ec2_lifecycle.py");
    ensure!(
        python.exists(),
        "{} is missing; run `make setup`",
        python.display()
    );
    let started = Instant::now();
    let location = cloud.blank_image_in_s3(&creds, "boto-images").await?;
    let out = Command::new(&python)
        .arg(&script)
        .arg(RETENTION_SECONDS.to_string())
        .arg(&location)
        .env_clear()
        .envs(client_env(&cloud.gateway.aws_env(&creds)))
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{} ({:.1} s):\n{stdout}",
        script.display(),
        started.elapsed().as_secs_f64()
    );
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{stdout}\nstderr:\n{stderr}\nlogs:\n{}",
            script.display(),
            out.status,
            cloud.log_tails()
        );
    }
    // A script that stopped early without failing must not pass: it ends with its step count.
    let steps: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("passed: "))
        .and_then(|l| l.trim_end_matches(" steps").parse().ok())
        .with_context(|| format!("the script did not say it passed:\n{stdout}\n{stderr}"))?;
    let ok_lines = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    ensure!(
        steps == ok_lines && steps >= 20,
        "the script passed {steps} steps with {ok_lines} ok lines:\n{stdout}"
    );
    Ok(())
}

#[test]
fn the_helpers_encode_base64_read_awscli_error_codes_and_nest_cidrs() -> anyhow::Result<()> {
    let encoded: Vec<String> = ["", "f", "fo", "foo", "foob"]
        .iter()
        .map(|s| base64(s.as_bytes()))
        .collect();
    assert_eq!(encoded, ["", "Zg==", "Zm8=", "Zm9v", "Zm9vYg=="]);
    let stderr = "\nAn error occurred (InvalidInstanceID.NotFound) when calling the \
                  DescribeInstances operation: The instance ID 'i-1' does not exist\n";
    assert_eq!(error_code(stderr), Some("InvalidInstanceID.NotFound"));
    assert_eq!(error_code("Parameter validation failed"), None);
    assert!(cidr_within("172.31.16.0/20", "172.31.0.0/16")?);
    assert!(!cidr_within("172.32.0.0/20", "172.31.0.0/16")?);
    assert!(!cidr_within("172.0.0.0/12", "172.31.0.0/16")?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_launch_no_node_has_room_for_is_refused_and_one_between_min_and_max_launches_what_fits(
) -> anyhow::Result<()> {
    // Half of the node: two fit.
    let (cloud, aws, _, image_id) = one_node_with_a_type("room", "x.half", 32).await?;
    let run = |count: &'static str| {
        [
            "run-instances",
            "--image-id",
            image_id.as_str(),
            "--instance-type",
            "x.half",
            "--count",
            count,
        ]
    };
    let ids_of = |ran: &Value| -> Vec<String> {
        let ids: Vec<String> = array_at(ran, "/Instances")
            .iter()
            .filter_map(|i| i.pointer("/InstanceId").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        sorted(&ids)
    };

    // A zone without nodes is refused, naming the zone that has room.
    let micro_in_1b = [
        "run-instances",
        "--image-id",
        image_id.as_str(),
        "--instance-type",
        "t1.micro",
        "--placement",
        "AvailabilityZone=karri-1b",
    ];
    let said = aws
        .refused(&micro_in_1b, "InsufficientInstanceCapacity")
        .await?;
    ensure!(
        said.contains("(karri-1b)") && said.contains("choosing karri-1a"),
        "the refusal said {said:?}"
    );
    // The same zone through its subnet in a network interface specification, as Ansible's
    // ec2_instance and Terraform launch.
    let subnets = aws
        .ok(&[
            "describe-subnets",
            "--filters",
            "Name=availability-zone,Values=karri-1b",
        ])
        .await?;
    let subnet_1b = str_at(
        array_at(&subnets, "/Subnets")
            .first()
            .context("no subnet in karri-1b")?,
        "/SubnetId",
    )?
    .to_owned();
    let interface = format!(
        "DeviceIndex=0,SubnetId={subnet_1b},DeleteOnTermination=true,AssociatePublicIpAddress=false"
    );
    let said = aws
        .refused(
            &[
                "run-instances",
                "--image-id",
                image_id.as_str(),
                "--instance-type",
                "t1.micro",
                "--network-interfaces",
                &interface,
            ],
            "InsufficientInstanceCapacity",
        )
        .await?;
    ensure!(said.contains("(karri-1b)"), "the refusal said {said:?}");

    // MinCount 3 where two fit: nothing is made.
    let said = aws
        .refused(&run("3"), "InsufficientInstanceCapacity")
        .await?;
    ensure!(
        said.contains("at most 2 fit now"),
        "the refusal said {said:?}"
    );
    let described = aws.ok(&["describe-instances"]).await?;
    ensure!(
        array_at(&described, "/Reservations").is_empty(),
        "a refused launch left instances: {described}"
    );

    // MinCount 1, MaxCount 5: the two that fit, in the node's zone, shown at once.
    let ran = aws.ok(&run("1:5")).await?;
    let ids = ids_of(&ran);
    ensure!(ids.len() == 2, "run-instances --count 1:5 ran {ids:?}");
    for instance in array_at(&ran, "/Instances") {
        ensure!(
            str_at(instance, "/Placement/AvailabilityZone")? == karri_e2e::cloud::ZONE,
            "a launch without a zone shows no zone: {instance}"
        );
    }
    // The node is full (counting instances that are not placed yet): no third one, and no
    // room in any zone for even the smallest type.
    aws.refused(&run("1"), "InsufficientInstanceCapacity")
        .await?;
    // A zone without nodes is refused, and now there is nothing elsewhere to name either.
    let said = aws
        .refused(&micro_in_1b, "InsufficientInstanceCapacity")
        .await?;
    ensure!(
        said.contains("(karri-1b)") && said.contains("nor in any other zone"),
        "the refusal said {said:?}"
    );

    // Terminating one makes room again.
    wait_state(&cloud, &aws, &ids, "running").await?;
    aws.ok(&["terminate-instances", "--instance-ids", &ids[0]])
        .await?;
    wait_state(&cloud, &aws, &ids[..1], "terminated").await?;
    let again = ids_of(&aws.ok(&run("1")).await?);
    ensure!(again.len() == 1, "after a termination, ran {again:?}");
    Ok(())
}
