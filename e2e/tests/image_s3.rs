//! Images in the gateway's S3 boot instances, on a [`Cloud`] whose agents run on libvirt's test
//! driver. `karri image register --bucket` (or awscli's put-object and RegisterImage) puts an
//! image into a bucket and registers its location `bucket/key`; the agent of the instance's
//! node asks the gateway, with its node token, for a presigned URL of that object, downloads it
//! over the gateway's TLS into its content-addressed cache, and the instance runs.
//!
//! A node is refused URLs of objects that no instance of its own boots from, and a presigned
//! URL reads only the object it was signed for. An instance of an object or bucket that does not
//! exist fails with the EC2 state reason `Server.InternalError` and a message naming the
//! location and S3's answer (403 AccessDenied for a missing object, as S3 answers a reader who
//! may not list the bucket; 404 NoSuchBucket for a missing bucket).

use std::ops::ControlFlow::{Break, Continue};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use crds::{Image, Instance, InstanceState, ID_LABEL};
use karri_e2e::cloud::{metric, node_name, node_of, state_of, violation, Cloud, Options, NS};
use karri_e2e::karri;
use kube::api::{Api, ListParams, PostParams};
use kube::ResourceExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Deadline of a step that waits for one piece of progress.
const STEP: Duration = Duration::from_secs(60);
/// The agents' log filter: the image cache says when it asks for a presigned URL.
const AGENT_LOG_FILTER: &str = "info,node_agent::images=debug";
/// What the agent logs when it asks the gateway for a presigned URL.
const ASKING_LINE: &str = "asking the gateway for a presigned URL";
/// What the agent logs when the gateway issued it one.
const ISSUED_LINE: &str = "the gateway issued a presigned URL";
/// The EC2 state reason code of an instance that failed to launch.
const LAUNCH_FAILED_CODE: &str = "Server.InternalError";
/// The gateway's request counter.
const REQUESTS: &str = "karri_gateway_requests_total";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `n` random bytes (from `/dev/urandom`).
fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

/// Lines of `path` containing `needle`.
fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// The names of the entries of `dir` (none if it does not exist).
fn entries(dir: &Path) -> anyhow::Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(list) => {
            let mut names = list
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<Vec<_>>>()?;
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("listing {}", dir.display())),
    }
}

/// S3 requests of `method` the gateway answered with `code`, from its metrics.
async fn s3_requests(cloud: &Cloud, method: &str, code: &str) -> anyhow::Result<f64> {
    let text = cloud.gateway_metrics().await?;
    let verb = format!("s3:{method}");
    Ok(metric(&text, REQUESTS, &[("verb", &verb), ("code", code)]).unwrap_or(0.0))
}

/// The image record with ID `id`.
async fn image_record(cloud: &Cloud, id: &str) -> anyhow::Result<Image> {
    Api::<Image>::all(cloud.client.clone())
        .list(&ListParams::default().labels(&format!("{ID_LABEL}={id}")))
        .await?
        .items
        .into_iter()
        .next()
        .with_context(|| format!("no image record has ID {id}"))
}

/// Creates instance `name` of image `image_id` in namespace `ns` (admin client).
async fn create_instance(
    cloud: &Cloud,
    ns: &str,
    name: &str,
    image_id: &str,
) -> anyhow::Result<()> {
    let instance: Instance = serde_json::from_value(json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Instance",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"imageId": image_id, "instanceType": "t1.micro"},
    }))?;
    Api::<Instance>::namespaced(cloud.client.clone(), ns)
        .create(&PostParams::default(), &instance)
        .await
        .with_context(|| format!("creating instance {name}"))?;
    Ok(())
}

/// Waits until the instance of namespace `ns` that `pick` finds is running on a node, failing
/// at once if it is terminated.
async fn wait_running(
    cloud: &Cloud,
    ns: &str,
    what: &str,
    pick: impl Fn(&Instance) -> bool,
) -> anyhow::Result<Instance> {
    let api: Api<Instance> = Api::namespaced(cloud.client.clone(), ns);
    cloud
        .wait_until(&format!("{what} is running"), STEP, async || {
            let list = api.list(&ListParams::default()).await?.items;
            let Some(instance) = list.into_iter().find(|i| pick(i)) else {
                return Ok(Continue("not created yet".to_owned()));
            };
            let status = instance.status.clone().unwrap_or_default();
            match state_of(&instance) {
                Some(InstanceState::Running) if node_of(&instance).is_some() => Ok(Break(instance)),
                Some(InstanceState::Terminated) => Err(violation(format!(
                    "{what} was terminated: {:?} {:?}",
                    status.reason, status.message
                ))),
                other => Ok(Continue(format!(
                    "{other:?}, conditions {:?}",
                    status.conditions
                ))),
            }
        })
        .await
}

/// `GET /karri/v1/image-url?location=…&base=<the gateway>` with bearer `token`: the status and
/// JSON body.
async fn ask_image_url(
    cloud: &Cloud,
    token: &str,
    location: &str,
) -> anyhow::Result<(StatusCode, Value)> {
    ask_image_url_at(cloud, token, location, &cloud.gateway.url()).await
}

/// [`ask_image_url`] for a URL based at `base`.
async fn ask_image_url_at(
    cloud: &Cloud,
    token: &str,
    location: &str,
    base: &str,
) -> anyhow::Result<(StatusCode, Value)> {
    let resp = cloud
        .gateway
        .client()?
        .get(format!("{}/karri/v1/image-url", cloud.gateway.url()))
        .query(&[("location", location), ("base", base)])
        .bearer_auth(token)
        .send()
        .await
        .context("asking for an image URL")?;
    let status = resp.status();
    let text = resp.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_uploaded_to_a_bucket_by_karri_image_register_boots_through_a_presigned_url(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options {
        agent_env: vec![("RUST_LOG".to_owned(), AGENT_LOG_FILTER.to_owned())],
        ..Options::default()
    })
    .await?;
    let account = "s3boot";
    let bucket = "images-s3boot";
    let key = "boot/disk.raw";
    let location = format!("{bucket}/{key}");
    let (_, creds) = cloud
        .gateway
        .account_with_key(&cloud.tokens.admin, account)
        .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("disk.raw");
    let bytes = random_bytes(3 << 20)?;
    let sha = sha256_hex(&bytes);
    std::fs::write(&file, &bytes)?;
    let gets_before = s3_requests(&cloud, "GET", "200").await?;

    let registered = karri::image_register(
        &cloud.gateway,
        &creds,
        &cloud.admin,
        &[
            "--file",
            path_str(&file)?,
            "--bucket",
            bucket,
            "--key",
            key,
            "--name",
            "s3-boot",
            "--namespace",
            account,
        ],
    )
    .await?;

    for said in [
        format!("created bucket {bucket}"),
        format!(
            "uploaded s3://{location} ({} bytes, raw, sha256 {sha})",
            bytes.len()
        ),
        format!("as {} in namespace {account}", registered.id),
    ] {
        ensure!(
            registered.stderr.contains(&said),
            "karri should say {said:?}:\n{}",
            registered.stderr
        );
    }
    let image = image_record(&cloud, &registered.id).await?;
    assert_eq!(image.spec.image_location, location);
    assert_eq!(image.spec.checksum_sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(image.spec.size_bytes, Some(bytes.len() as u64));
    assert_eq!(image.namespace().as_deref(), Some(account));
    let head = cloud
        .gateway
        .aws(
            &creds,
            &["s3api", "head-object", "--bucket", bucket, "--key", key],
        )
        .await?;
    assert_eq!(head["ContentLength"], json!(bytes.len()), "{head}");
    assert_eq!(head["Metadata"]["sha256"], json!(sha), "{head}");

    let created = tokio::time::Instant::now();
    create_instance(&cloud, account, "from-s3", &registered.id).await?;
    let running = wait_running(&cloud, account, "from-s3", |i| i.name_any() == "from-s3").await?;
    let took = created.elapsed();

    let node = node_of(&running).context("bound")?.to_owned();
    let data = cloud.agent_data_dir(&node);
    let cached = data.join("images/sha256").join(&sha);
    assert_eq!(
        entries(&data.join("images/sha256"))?,
        vec![sha.clone()],
        "the cache holds the object once, named by its sha256"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&cached)?),
        sha,
        "the cached file holds the object's bytes"
    );
    assert_eq!(entries(&data.join("images/tmp"))?, Vec::<String>::new());
    let log = cloud.log_path(&node);
    assert_eq!(
        count_lines(&log, ASKING_LINE),
        1,
        "the agent asks for one presigned URL"
    );
    let issued = std::fs::read_to_string(&log)?
        .lines()
        .filter(|l| l.contains(ISSUED_LINE))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    ensure!(
        issued.len() == 1 && issued[0].contains(&location),
        "the agent should log one URL issued for {location}: {issued:?}"
    );
    let gets = s3_requests(&cloud, "GET", "200").await? - gets_before;
    assert_eq!(
        gets, 1.0,
        "the object was downloaded once from the gateway's S3"
    );

    // The same file again: nothing is uploaded, another image of the same object is registered.
    let puts_before = s3_requests(&cloud, "PUT", "200").await?;
    let again = karri::image_register(
        &cloud.gateway,
        &creds,
        &cloud.admin,
        &[
            "--file",
            path_str(&file)?,
            "--bucket",
            bucket,
            "--key",
            key,
            "--name",
            "s3-boot-again",
            "--namespace",
            account,
        ],
    )
    .await?;
    ensure!(
        again
            .stderr
            .contains(&format!("already uploaded: s3://{location}")),
        "{}",
        again.stderr
    );
    assert_ne!(again.id, registered.id);
    assert_eq!(s3_requests(&cloud, "PUT", "200").await?, puts_before);
    eprintln!(
        "[image_s3] {} ran on {node} {:.1} s after creation, from s3://{location}:\n{}",
        running.name_any(),
        took.as_secs_f64(),
        registered.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_presigned_urls_only_for_objects_its_own_instances_boot_from(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options {
        agents: 2,
        ..Options::default()
    })
    .await?;
    let account = "s3guard";
    let bucket = "images-s3guard";
    let (_, creds) = cloud
        .gateway
        .account_with_key(&cloud.tokens.admin, account)
        .await?;
    let dir = tempfile::tempdir()?;
    let disk = random_bytes(1 << 20)?;
    let other = random_bytes(64 << 10)?;
    let (disk_path, other_path) = (dir.path().join("disk.raw"), dir.path().join("other.raw"));
    std::fs::write(&disk_path, &disk)?;
    std::fs::write(&other_path, &other)?;
    // awscli this time: put-object, then EC2 RegisterImage and RunInstances.
    let aws = async |args: &[&str]| cloud.gateway.aws(&creds, args).await;
    aws(&["s3api", "create-bucket", "--bucket", bucket]).await?;
    for (key, path) in [("disk.raw", &disk_path), ("other.raw", &other_path)] {
        put_object(&cloud, &creds, (bucket, key), path).await?;
    }
    let location = format!("{bucket}/disk.raw");
    let other_location = format!("{bucket}/other.raw");
    let registered = aws(&[
        "ec2",
        "register-image",
        "--name",
        "s3-guard",
        "--image-location",
        &location,
    ])
    .await?;
    let image_id = registered["ImageId"]
        .as_str()
        .with_context(|| format!("no ImageId in {registered}"))?
        .to_owned();
    let run = aws(&[
        "ec2",
        "run-instances",
        "--image-id",
        &image_id,
        "--instance-type",
        "t1.micro",
    ])
    .await?;
    let instance_id = run
        .pointer("/Instances/0/InstanceId")
        .and_then(Value::as_str)
        .with_context(|| format!("no InstanceId in {run}"))?
        .to_owned();
    let running = wait_running(&cloud, account, &instance_id, |i| {
        i.labels().get(ID_LABEL) == Some(&instance_id)
    })
    .await?;
    let owner = node_of(&running).context("bound")?.to_owned();
    let stranger = [node_name(1), node_name(2)]
        .into_iter()
        .find(|n| *n != owner)
        .context("two nodes")?;
    let token = |node: &str| {
        cloud
            .tokens
            .node(node)
            .map(str::to_owned)
            .with_context(|| format!("no token of {node}"))
    };
    let data = cloud.agent_data_dir(&owner);
    assert_eq!(
        entries(&data.join("images/sha256"))?,
        vec![sha256_hex(&disk)],
        "the owner's cache holds the object"
    );

    // The owner's node gets a URL of its instance's object, which serves the object's bytes.
    let (status, answer) = ask_image_url(&cloud, &token(&owner)?, &location).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let url = answer["url"].as_str().context("a url")?.to_owned();
    ensure!(
        url.starts_with(&format!("{}/{bucket}/disk.raw?", cloud.gateway.url()))
            && url.contains("X-Amz-Expires=300"),
        "{url}"
    );
    ensure!(answer["expiresAt"].is_string(), "{answer}");
    // A node may not impersonate, here as anywhere: the same request acting as another user
    // is refused, not served as the node.
    let impersonating = cloud
        .gateway
        .client()?
        .get(format!("{}/karri/v1/image-url", cloud.gateway.url()))
        .query(&[
            ("location", location.as_str()),
            ("base", &cloud.gateway.url()),
        ])
        .bearer_auth(token(&owner)?)
        .header("Impersonate-User", "admin")
        .send()
        .await?;
    assert_eq!(impersonating.status(), StatusCode::FORBIDDEN);
    let said = impersonating.text().await?;
    ensure!(said.contains("cannot impersonate"), "{said}");
    // Not for a base the S3 face would read as another bucket's virtual host: the same path
    // would name that bucket's object.
    let port = cloud
        .gateway
        .url()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let (status, answer) = ask_image_url_at(
        &cloud,
        &token(&owner)?,
        &location,
        &format!("https://corp.localhost:{port}"),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let http = cloud.gateway.client()?;
    let got = http.get(&url).send().await?;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(sha256_hex(&got.bytes().await?), sha256_hex(&disk));
    // Its signature covers that object and reading only.
    let tampered = url.replacen("/disk.raw?", "/other.raw?", 1);
    let refused = http.get(&tampered).send().await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "another object");
    let refused = http.put(&url).body("overwritten").send().await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "a write");

    // Refused: another object of the same bucket, the instance's object asked by another node,
    // and an account's token.
    let cases = [
        (
            "the owner, for an object no instance boots from",
            token(&owner)?,
            &other_location,
            format!("no instance on node {owner} boots from {other_location}"),
        ),
        (
            "another node, for the instance's object",
            token(&stranger)?,
            &location,
            format!("no instance on node {stranger} boots from {location}"),
        ),
        (
            "an account",
            cloud
                .tokens
                .account(NS)
                .context("an account token")?
                .to_owned(),
            &location,
            "only a node agent's token may ask for image URLs".to_owned(),
        ),
    ];
    for (who, token, asked, message) in cases {
        let (status, answer) = ask_image_url(&cloud, &token, asked).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{who}: {answer}");
        ensure!(
            answer.to_string().contains(&message),
            "{who}: the answer should say {message:?}: {answer}"
        );
    }
    assert_eq!(
        entries(&cloud.agent_data_dir(&stranger).join("images/sha256"))?,
        Vec::<String>::new(),
        "the other node fetched nothing"
    );

    // A launch spec whose location is not the location of the image it names vouches for
    // nothing, even when the image's owner could read that object (written here by the admin:
    // a node may not write the launch spec at all).
    let api: Api<Instance> = Api::namespaced(cloud.client.clone(), account);
    let patch = serde_json::json!({"status": {"launch": {"root": {"location": other_location}}}});
    api.patch_status(
        running.name_any().as_str(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    let (status, answer) = ask_image_url(&cloud, &token(&owner)?, &other_location).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let message = format!("no image registered at {other_location} boots this instance");
    ensure!(answer.to_string().contains(&message), "{answer}");

    // An image does not change. Once its object is written again (even with the same bytes),
    // a URL issued before no longer reads it, and the image no longer launches...
    put_object(&cloud, &creds, (bucket, "disk.raw"), &disk_path).await?;
    let stale = http.get(&url).send().await?;
    assert_eq!(
        stale.status(),
        StatusCode::PRECONDITION_FAILED,
        "a URL of the old bytes"
    );
    let rerun = |image: &str| {
        let image = image.to_owned();
        async move {
            let run = aws(&[
                "ec2",
                "run-instances",
                "--image-id",
                &image,
                "--instance-type",
                "t1.micro",
            ])
            .await?;
            run.pointer("/Instances/0/InstanceId")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("no InstanceId in {run}"))
        }
    };
    let again = rerun(&image_id).await?;
    let failed = cloud
        .wait_until(&format!("{again} fails"), STEP, async || {
            let list = api.list(&ListParams::default()).await?.items;
            let status = list
                .into_iter()
                .find(|i| i.labels().get(ID_LABEL) == Some(&again))
                .and_then(|i| i.status);
            Ok(
                match status.and_then(|s| {
                    s.message
                        .filter(|_| s.reason.as_deref() == Some(LAUNCH_FAILED_CODE))
                }) {
                    Some(message) => Break(message),
                    None => Continue("not failed yet".to_owned()),
                },
            )
        })
        .await?;
    let written_again = format!(
        "the object {location} was written again since image {image_id} was registered from it"
    );
    ensure!(failed.contains(&written_again), "{failed}");
    // ... until it is registered again: a new image of the new bytes.
    let registered = aws(&[
        "ec2",
        "register-image",
        "--name",
        "s3-guard-2",
        "--image-location",
        &location,
    ])
    .await?;
    let renewed = registered["ImageId"]
        .as_str()
        .context("no ImageId")?
        .to_owned();
    let fresh = rerun(&renewed).await?;
    wait_running(&cloud, account, &fresh, |i| {
        i.labels().get(ID_LABEL) == Some(&fresh)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_of_an_s3_object_that_does_not_exist_fails_with_a_reason_naming_it(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let account = "s3missing";
    let bucket = "images-s3missing";
    let (_, creds) = cloud
        .gateway
        .account_with_key(&cloud.tokens.admin, account)
        .await?;
    cloud
        .gateway
        .aws(&creds, &["s3api", "create-bucket", "--bucket", bucket])
        .await?;
    // An image of nothing is refused outright, by the resource API as by EC2.
    let images: Api<Image> = Api::namespaced(cloud.client.clone(), account);
    let image_of = |id: &str, name: &str, location: &str| -> anyhow::Result<Image> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "karri.dev/v1alpha1",
            "kind": "Image",
            "metadata": {"name": id, "namespace": account},
            "spec": {"name": format!("missing-{name}"), "imageLocation": location, "format": "raw"},
        }))?)
    };
    let never = format!("{bucket}/never-uploaded.raw");
    match images
        .create(
            &PostParams::default(),
            &image_of("emi-0000000000000a404", "never", &never)?,
        )
        .await
    {
        Err(kube::Error::Api(e))
            if e.code == 422 && e.message.contains("upload the image first") => {}
        other => anyhow::bail!("registering {never} (never uploaded): {other:?}"),
    }
    // Objects that were there when their images were registered, and are gone since: the
    // object, and its whole bucket.
    let gone_bucket = "gone-s3missing";
    let cases = [
        (
            "no-key",
            "emi-0000000000000b404",
            format!("{bucket}/missing.raw"),
            "HTTP status 404: image images-s3missing/missing.raw: the object does not exist (NoSuchKey)",
        ),
        (
            // No URL is issued for a bucket that does not exist (one made later could be
            // another account's): the gateway refuses the node's ask with a 404.
            "no-bucket",
            "emi-0000000000000c404",
            format!("{gone_bucket}/disk.raw"),
            "HTTP status 404: image gone-s3missing/disk.raw: the bucket gone-s3missing does not exist (NoSuchBucket)",
        ),
    ];
    cloud
        .gateway
        .aws(&creds, &["s3api", "create-bucket", "--bucket", gone_bucket])
        .await?;
    let disk = tempfile::NamedTempFile::new()?;
    std::fs::write(disk.path(), b"soon gone")?;
    for (name, id, location, _) in &cases {
        let (b, key) = location.split_once('/').context("bucket/key")?;
        put_object(&cloud, &creds, (b, key), disk.path()).await?;
        images
            .create(&PostParams::default(), &image_of(id, name, location)?)
            .await?;
        let delete = ["s3api", "delete-object", "--bucket", b, "--key", key];
        cloud.gateway.aws(&creds, &delete).await?;
    }
    cloud
        .gateway
        .aws(&creds, &["s3api", "delete-bucket", "--bucket", gone_bucket])
        .await?;
    for (name, id, _, _) in &cases {
        create_instance(&cloud, account, name, id).await?;
    }

    for (name, _, location, code) in &cases {
        let failed = cloud.wait_launch_failed(account, name, STEP).await?;
        let status = failed.status.clone().unwrap_or_default();
        assert_eq!(
            status.reason.as_deref(),
            Some(LAUNCH_FAILED_CODE),
            "{status:?}"
        );
        let message = status.message.unwrap_or_default();
        for part in [location.as_str(), "does not exist", code] {
            ensure!(
                message.contains(part),
                "the message of {name} should mention {part}: {message}"
            );
        }
        ensure!(
            !message.contains("X-Amz-Signature"),
            "the message shows the presigned URL: {message}"
        );
        eprintln!("[image_s3] {name}: {message}");
    }
    let data = cloud.agent_data_dir(&node_name(1));
    assert_eq!(entries(&data.join("images/sha256"))?, Vec::<String>::new());
    assert_eq!(entries(&data.join("images/tmp"))?, Vec::<String>::new());
    Ok(())
}

/// Puts the file at `path` as object `bucket/key`, as `who` (awscli's put-object).
async fn put_object(
    cloud: &Cloud,
    who: &karri_testkit::AwsCredentials,
    (bucket, key): (&str, &str),
    path: &Path,
) -> anyhow::Result<()> {
    let args = [
        "s3api",
        "put-object",
        "--bucket",
        bucket,
        "--key",
        key,
        "--body",
        path_str(path)?,
    ];
    cloud.gateway.aws(who, &args).await?;
    Ok(())
}

/// Puts random bytes at `bucket/disk.raw` (a new private bucket) as `who`: the location and
/// their SHA-256.
async fn private_object(
    cloud: &Cloud,
    who: &karri_testkit::AwsCredentials,
    bucket: &str,
) -> anyhow::Result<(String, String)> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.raw");
    let bytes = random_bytes(64 * 1024)?;
    std::fs::write(&disk, &bytes)?;
    cloud
        .gateway
        .aws(who, &["s3api", "create-bucket", "--bucket", bucket])
        .await?;
    put_object(cloud, who, (bucket, "disk.raw"), &disk).await?;
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((format!("{bucket}/disk.raw"), sha))
}

/// Accounts `victim` and `thief`, with an access key each.
async fn victim_and_thief(
    cloud: &Cloud,
) -> anyhow::Result<(karri_testkit::AwsCredentials, karri_testkit::AwsCredentials)> {
    let mut keys = Vec::new();
    for account in ["victim", "thief"] {
        let (_, key) = cloud
            .gateway
            .account_with_key(&cloud.tokens.admin, account)
            .await?;
        keys.push(key);
    }
    let thief = keys.pop().context("the thief's key")?;
    let victim = keys.pop().context("the victim's key")?;
    Ok((victim, thief))
}

/// Accounts `victim` and `thief`, and the victim's private object `victim-private/disk.raw`:
/// its location and SHA-256, and the thief's credentials.
async fn victims_private_object(
    cloud: &Cloud,
) -> anyhow::Result<(String, String, karri_testkit::AwsCredentials)> {
    let (victim, thief) = victim_and_thief(cloud).await?;
    let (location, sha) = private_object(cloud, &victim, "victim-private").await?;
    Ok((location, sha, thief))
}

/// Registers image `id` (`name`) at `location` in namespace `ns`, declaring `sha256` if given.
async fn register(
    cloud: &Cloud,
    ns: &str,
    id: &str,
    name: &str,
    location: &str,
    sha256: Option<&str>,
) -> anyhow::Result<()> {
    let mut spec = json!({"name": name, "imageLocation": location, "format": "raw"});
    if let Some(sha) = sha256 {
        spec["checksumSha256"] = json!(sha);
    }
    let image: Image = serde_json::from_value(json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Image",
        "metadata": {"name": id, "namespace": ns},
        "spec": spec,
    }))?;
    Api::<Image>::namespaced(cloud.client.clone(), ns)
        .create(&PostParams::default(), &image)
        .await?;
    Ok(())
}

/// Launches `name` of image `id` in namespace `ns` and checks that it fails saying `why`.
async fn launch_fails(
    cloud: &Cloud,
    ns: &str,
    name: &str,
    id: &str,
    why: &str,
) -> anyhow::Result<()> {
    create_instance(cloud, ns, name, id).await?;
    let failed = cloud.wait_launch_failed(ns, name, STEP).await?;
    let message = failed
        .status
        .clone()
        .unwrap_or_default()
        .message
        .unwrap_or_default();
    ensure!(
        message.contains(why),
        "the failed launch should say {why:?}: {message}"
    );
    eprintln!("[image_s3] {name}: {message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_naming_another_accounts_private_object_does_not_boot() -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let (location, _, _) = victims_private_object(&cloud).await?;
    // The thief registers the victim's private object as its own image and launches it.
    let id = "emi-00000000000007e1f";
    register(&cloud, "thief", id, "stolen", &location, None).await?;
    launch_fails(&cloud, "thief", "stolen", id, "may not read").await?;
    let data = cloud.agent_data_dir(&node_name(1));
    assert_eq!(entries(&data.join("images/sha256"))?, Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_its_owner_booted_on_a_node_does_not_boot_there_for_another_account(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let (location, sha, thief) = victims_private_object(&cloud).await?;
    // The victim boots its own image: the node fetches it, and keeps it in its cache.
    let own = "emi-00000000000000de1";
    register(&cloud, "victim", own, "own", &location, None).await?;
    create_instance(&cloud, "victim", "own", own).await?;
    wait_running(&cloud, "victim", "the victim's instance", |i| {
        i.name_any() == "own"
    })
    .await?;
    let data = cloud.agent_data_dir(&node_name(1));
    assert_eq!(entries(&data.join("images/sha256"))?, vec![sha.clone()]);
    // With the victim's instance on the node, an image of the thief naming the same object
    // is refused for the thief's instance ...
    let same_object = "emi-00000000000007e1f";
    register(&cloud, "thief", same_object, "same-object", &location, None).await?;
    launch_fails(&cloud, "thief", "same-object", same_object, "may not read").await?;
    // ... and one naming the thief's own object but declaring the cached image's checksum gets
    // that object, which does not match, not the victim's cached disk.
    let (own_location, _) = private_object(&cloud, &thief, "thief-own").await?;
    let same_sum = "emi-00000000000007e2f";
    register(
        &cloud,
        "thief",
        same_sum,
        "same-sum",
        &own_location,
        Some(&sha),
    )
    .await?;
    launch_fails(&cloud, "thief", "same-sum", same_sum, "not the declared").await?;
    assert_eq!(entries(&data.join("images/sha256"))?, vec![sha]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_bucket_another_account_made_again_does_not_boot_that_accounts_object(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let (victim, thief) = victim_and_thief(&cloud).await?;
    let bucket = "reclaimed";
    let (location, _) = private_object(&cloud, &victim, bucket).await?;
    let id = "emi-000000000000000b1";
    register(&cloud, "victim", id, "mine", &location, None).await?;
    let registered = image_record(&cloud, id).await?;
    ensure!(
        registered
            .annotations()
            .contains_key(crds::image::BUCKET_UID_ANNOTATION),
        "the image records its bucket: {:?}",
        registered.annotations()
    );
    // The victim empties and deletes the bucket; the thief takes the name and puts its own
    // disk, readable by anyone, where the image points.
    for args in [
        &[
            "s3api",
            "delete-object",
            "--bucket",
            bucket,
            "--key",
            "disk.raw",
        ][..],
        &["s3api", "delete-bucket", "--bucket", bucket],
    ] {
        cloud.gateway.aws(&victim, args).await?;
    }
    private_object(&cloud, &thief, bucket).await?;
    cloud
        .gateway
        .aws(
            &thief,
            &[
                "s3api",
                "put-object-acl",
                "--bucket",
                bucket,
                "--key",
                "disk.raw",
                "--acl",
                "public-read",
            ],
        )
        .await?;
    launch_fails(&cloud, "victim", "mine", id, "made again").await?;
    let data = cloud.agent_data_dir(&node_name(1));
    assert_eq!(entries(&data.join("images/sha256"))?, Vec::<String>::new());
    Ok(())
}
