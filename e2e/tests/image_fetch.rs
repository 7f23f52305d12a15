//! Instances boot from images fetched by the real node agent into its content-addressed cache
//! (`<data-dir>/images/sha256/<hex>`, fetches in progress under `<data-dir>/images/tmp/`), on a
//! [`Cloud`] with one agent on libvirt's test driver.
//!
//! Images are served by an HTTP server inside the test, on 127.0.0.1, that counts the requests
//! reaching it and can hold its answers until the test releases them; a launch that cannot
//! fetch its image fails the instance with the EC2 state reason `Server.InternalError` and a
//! message saying why.

use std::ops::ControlFlow::{Break, Continue};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use crds::{Image, Instance, ID_LABEL};
use karri_e2e::cloud::{metric, node_name, node_of, violation, Cloud, Options, INSTANCE_TYPE, NS};
use karri_testkit::workspace_root;
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;

/// Deadline of a step that waits for one piece of progress.
const STEP: Duration = Duration::from_secs(60);
/// How long the server may hold the first fetch while the second launch catches up. Below the
/// agent's read-idle timeout of image fetches (30 s), so a held fetch never stalls.
const HOLD: Duration = Duration::from_secs(20);
/// Size of the image of the single-flight test.
const IMAGE_BYTES: usize = 1 << 20;
/// The agents' log filter: the image cache's debug lines say when a launch joins a fetch.
const AGENT_LOG_FILTER: &str = "info,node_agent::images=debug";
/// What the image cache logs (debug) when a `get` joins the fetch of its source in flight.
const JOINED_LINE: &str = "joining the fetch in flight";
/// The EC2 state reason code of an instance that failed to launch.
const LAUNCH_FAILED_CODE: &str = "Server.InternalError";
/// Path of the image on the test's HTTP server.
const IMAGE_PATH: &str = "/images/disk.raw";

/// An HTTP/1.1 server on 127.0.0.1 serving one image at [`IMAGE_PATH`] (404 elsewhere). It
/// counts every request that reaches it, and answers only once released. Dropping it stops it.
struct ImageServer {
    /// `http://127.0.0.1:<port>`.
    base: String,
    requests: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ImageServer {
    /// Serves `body`; answers are held until [`ImageServer::release`] when `held`.
    async fn start(body: Vec<u8>, held: bool) -> anyhow::Result<ImageServer> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the image server")?;
        let base = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(!held);
        let body = Arc::new(body);
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (body, counter, released) = (body.clone(), counter.clone(), released.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &body, &counter, released).await {
                        eprintln!("[image server] a connection failed: {e}");
                    }
                });
            }
        });
        Ok(ImageServer {
            base,
            requests,
            release,
            task,
        })
    }

    /// The URL of the image.
    fn url(&self) -> String {
        format!("{}{IMAGE_PATH}", self.base)
    }

    /// Requests received so far.
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Lets held and future requests be answered.
    fn release(&self) {
        self.release.send_replace(true);
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head, counts it, waits until released and answers it (`Connection:
/// close`: one request per connection).
async fn answer(
    mut stream: TcpStream,
    body: &[u8],
    requests: &AtomicUsize,
    mut released: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default();
    // A dropped sender (the test ended) answers at once.
    let _ = released.wait_for(|r| *r).await;
    let found = line.starts_with(&format!("GET {IMAGE_PATH} "));
    let (status, payload) = if found {
        ("200 OK", body)
    } else {
        ("404 Not Found", &b"no such image\n"[..])
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(payload).await?;
    stream.shutdown().await
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

/// The SHA-256 of `bytes` in lower-case hex, as `sha256sum` computes it.
async fn sha256_hex(bytes: &[u8]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bytes");
    std::fs::write(&path, bytes)?;
    let out = Command::new("sha256sum")
        .arg(&path)
        .output()
        .await
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum failed: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    let hex = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    ensure!(hex.len() == 64, "sha256sum printed {text:?}");
    Ok(hex)
}

/// Registers the raw machine image `id` in namespace `ns` (admin client) at `location`.
async fn register_image(
    cloud: &Cloud,
    ns: &str,
    id: &str,
    location: &str,
    sha256: Option<&str>,
) -> anyhow::Result<()> {
    // EC2 image names are unique in an account: each image is named after its ID.
    let mut spec =
        json!({"name": format!("fetch-test-{id}"), "imageLocation": location, "format": "raw"});
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
        .await
        .with_context(|| format!("registering image {id} at {location}"))?;
    Ok(())
}

/// Creates the instances `names` of image `image_id` in namespace `ns`, all requests at once.
async fn create_instances(
    cloud: &Cloud,
    ns: &str,
    names: &[&str],
    image_id: &str,
) -> anyhow::Result<()> {
    let api: Api<Instance> = Api::namespaced(cloud.client.clone(), ns);
    let bodies = names
        .iter()
        .map(|name| {
            serde_json::from_value(json!({
                "apiVersion": "karri.dev/v1alpha1",
                "kind": "Instance",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"imageId": image_id, "instanceType": INSTANCE_TYPE},
            }))
        })
        .collect::<Result<Vec<Instance>, _>>()?;
    futures::future::try_join_all(bodies.iter().map(|body| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), body)
                .await
                .with_context(|| format!("creating instance {}", body.name_any()))
        }
    }))
    .await?;
    Ok(())
}

/// The EC2 ID (`i-…`) of an instance.
fn id_of(instance: &Instance) -> anyhow::Result<String> {
    instance
        .labels()
        .get(ID_LABEL)
        .cloned()
        .with_context(|| format!("instance {} has no {ID_LABEL} label", instance.name_any()))
}

/// The reason and message of a failed instance, checked to be the launch failure's.
fn launch_failure(instance: &Instance) -> anyhow::Result<String> {
    let status = instance.status.as_ref().context("no status")?;
    ensure!(
        status.reason.as_deref() == Some(LAUNCH_FAILED_CODE),
        "{} should be terminated with reason {LAUNCH_FAILED_CODE}: {status:?}",
        instance.name_any()
    );
    ensure!(
        status.launch_time.is_none(),
        "{} never ran yet has a launch time: {status:?}",
        instance.name_any()
    );
    status
        .message
        .clone()
        .with_context(|| format!("{} has no status.message", instance.name_any()))
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

/// The `backing-filename` of a qcow2 overlay, from `qemu-img info --output=json`.
async fn backing_file(overlay: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new("qemu-img")
        .args(["info", "--force-share", "--output=json"])
        .arg(overlay)
        .output()
        .await
        .context("running qemu-img info")?;
    ensure!(
        out.status.success(),
        "qemu-img info {} failed: {}",
        overlay.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        info["format"] == "qcow2",
        "{} is not a qcow2: {info}",
        overlay.display()
    );
    info["backing-filename"]
        .as_str()
        .map(PathBuf::from)
        .with_context(|| format!("{} has no backing file: {info}", overlay.display()))
}

/// Lines of `path` containing `needle`.
fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_started_at_once_from_an_uncached_image_cause_one_fetch() -> anyhow::Result<()>
{
    let started = Instant::now();
    let cloud = Cloud::start(Options {
        agent_env: vec![("RUST_LOG".to_owned(), AGENT_LOG_FILTER.to_owned())],
        ..Options::default()
    })
    .await?;
    let node = node_name(1);
    let data = cloud.agent_data_dir(&node);
    let image = random_bytes(IMAGE_BYTES)?;
    let sha = sha256_hex(&image).await?;
    let server = ImageServer::start(image, true).await?;
    let image_id = "emi-0f0e0d0c0b0a09081";
    register_image(&cloud, NS, image_id, &server.url(), Some(&sha)).await?;
    let names = ["shared-1", "shared-2"];
    let cloud_up = started.elapsed();

    create_instances(&cloud, NS, &names, image_id).await?;

    // The first launch's fetch is held at the server until both instances are bound to the
    // node and the second launch has joined that fetch (the cache logs it), so the two
    // launches certainly overlap.
    let api = cloud.instances();
    let log = cloud.log_path(&node);
    let overlapped = cloud
        .wait_until(
            "both instances are bound and the second launch joined the first's fetch",
            HOLD,
            async || {
                let requests = server.requests();
                if requests > 1 {
                    return Err(violation(format!(
                        "{requests} requests reached the server while the first was held"
                    )));
                }
                let mut bound = Vec::new();
                for name in names {
                    let instance = api.get(name).await?;
                    if node_of(&instance) == Some(node.as_str()) {
                        bound.push(name);
                    }
                }
                let joined = count_lines(&log, JOINED_LINE);
                Ok(
                    if bound.len() == names.len() && requests == 1 && joined >= 1 {
                        Break(())
                    } else {
                        Continue(format!(
                            "bound: {bound:?}, requests: {requests}, joins logged: {joined}"
                        ))
                    },
                )
            },
        )
        .await;
    server.release();
    overlapped?;
    let held_for = started.elapsed() - cloud_up;

    let names_owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let running = cloud.wait_all_running(&names_owned, STEP).await?;
    let all_running = started.elapsed() - cloud_up;

    assert_eq!(
        server.requests(),
        1,
        "two launches of one uncached image must fetch it once"
    );
    let cached = data.join("images/sha256").join(&sha);
    assert_eq!(
        entries(&data.join("images/sha256"))?,
        vec![sha.clone()],
        "the cache holds the image once, named by its sha256"
    );
    let meta = std::fs::metadata(&cached)?;
    assert_eq!(meta.len(), IMAGE_BYTES as u64);
    assert_eq!(
        sha256_hex(&std::fs::read(&cached)?).await?,
        sha,
        "the cached file holds the bytes served"
    );
    let mut backings = Vec::new();
    for instance in &running {
        let overlay = data
            .join("instances")
            .join(id_of(instance)?)
            .join("root.qcow2");
        assert!(overlay.is_file(), "{} has no overlay", instance.name_any());
        backings.push(backing_file(&overlay).await?);
    }
    assert_eq!(
        backings,
        vec![cached.clone(), cached],
        "both overlays back onto the one cached image"
    );
    assert_eq!(
        entries(&data.join("images/tmp"))?,
        Vec::<String>::new(),
        "no temporary file is left"
    );
    eprintln!(
        "[image_fetch] cloud up in {:.1} s; overlap reached after {:.1} s; both running {:.1} s \
         after creation",
        cloud_up.as_secs_f64(),
        held_for.as_secs_f64(),
        all_running.as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_checksum_fails_the_instance_with_a_reason_and_leaves_no_partial_file(
) -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let node = node_name(1);
    let data = cloud.agent_data_dir(&node);
    // An account of its own, so that its awscli can describe the instance.
    let account = "fetchcheck";
    let (_, creds) = cloud
        .gateway
        .account_with_key(&cloud.tokens.admin, account)
        .await?;
    let image = random_bytes(256 * 1024)?;
    let actual = sha256_hex(&image).await?;
    let mut other = image.clone();
    other[0] ^= 0xff;
    let declared = sha256_hex(&other).await?;
    let server = ImageServer::start(image, false).await?;
    let image_id = "emi-0badc0ffee0000001";
    register_image(&cloud, account, image_id, &server.url(), Some(&declared)).await?;
    let created = Instant::now();

    create_instances(&cloud, account, &["tampered"], image_id).await?;
    let failed = cloud.wait_launch_failed(account, "tampered", STEP).await?;
    let took = created.elapsed();

    let message = launch_failure(&failed)?;
    for part in ["sha256", &declared, &actual, image_id, &server.url()] {
        assert!(
            message.contains(part),
            "the message should mention {part}: {message}"
        );
    }
    assert_eq!(
        server.requests(),
        1,
        "a failed image is fetched once: the agent does not retry a launch it reported failed"
    );
    let metrics = cloud.agent_metrics(0).await?;
    let defined = metric(
        &metrics,
        "karri_node_agent_domain_actions_total",
        &[("action", "define")],
    );
    assert_eq!(
        defined.unwrap_or(0.0),
        0.0,
        "no domain may be defined from an image failing its checksum:\n{metrics}"
    );
    assert_eq!(cloud.agent_domains(0).await?, (0, 0));
    let failures = metric(
        &metrics,
        "karri_node_agent_reconcile_errors_total",
        &[("error", "launch_failed")],
    );
    assert!(
        failures.unwrap_or(0.0) >= 1.0,
        "the agent should count the launch failure:\n{metrics}"
    );
    assert_eq!(
        entries(&data.join("images/tmp"))?,
        Vec::<String>::new(),
        "no partial file is left"
    );
    let cached = entries(&data.join("images/sha256"))?;
    assert!(
        !cached.contains(&actual) && !cached.contains(&declared),
        "nothing may be cached from a mismatching image: {cached:?}"
    );

    // EC2's view: the state reason of the failed instance.
    let aws = workspace_root().join(".venv/bin/aws");
    ensure!(
        aws.exists(),
        "{} is missing; run `make setup`",
        aws.display()
    );
    let id = id_of(&failed)?;
    let env: Vec<(String, String)> = ["PATH", "HOME"]
        .into_iter()
        .filter_map(|k| Some((k.to_owned(), std::env::var(k).ok()?)))
        .chain(cloud.gateway.aws_env(&creds))
        .collect();
    let out = Command::new(&aws)
        .args(["ec2", "describe-instances", "--instance-ids", &id])
        .args(["--output", "json"])
        .env_clear()
        .envs(env)
        .kill_on_drop(true)
        .output()
        .await
        .context("running aws ec2 describe-instances")?;
    ensure!(
        out.status.success(),
        "aws ec2 describe-instances failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let described: Value = serde_json::from_slice(&out.stdout)?;
    let shown = &described["Reservations"][0]["Instances"][0];
    assert_eq!(shown["InstanceId"], id.as_str(), "{described}");
    assert_eq!(shown["State"]["Name"], "terminated", "{described}");
    assert_eq!(
        shown["StateReason"]["Code"], LAUNCH_FAILED_CODE,
        "{described}"
    );
    let ec2_message = shown["StateReason"]["Message"].as_str().unwrap_or_default();
    assert!(ec2_message.contains(&declared), "{described}");
    eprintln!(
        "[image_fetch] the tampered image failed its instance {:.1} s after creation, after {} \
         request(s): {message}",
        took.as_secs_f64(),
        server.requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_the_instance_with_a_clear_reason() -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let data = cloud.agent_data_dir(&node_name(1));
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("no-such-image.raw").display().to_string();
    register_image(&cloud, NS, "emi-0000000000000dead", &missing, None).await?;
    // The server has no such path: a 404.
    let server = ImageServer::start(Vec::new(), false).await?;
    let not_served = format!("{}/images/gone.raw", server.base);
    register_image(&cloud, NS, "emi-0000000000000f404", &not_served, None).await?;
    let created = Instant::now();

    create_instances(&cloud, NS, &["no-file"], "emi-0000000000000dead").await?;
    create_instances(&cloud, NS, &["no-url"], "emi-0000000000000f404").await?;
    let no_file = cloud.wait_launch_failed(NS, "no-file", STEP).await?;
    let no_url = cloud.wait_launch_failed(NS, "no-url", STEP).await?;
    let took = created.elapsed();

    let file_message = launch_failure(&no_file)?;
    assert!(
        file_message.contains(&missing) && file_message.contains("does not exist"),
        "the message should name the missing location {missing}: {file_message}"
    );
    let url_message = launch_failure(&no_url)?;
    assert!(
        url_message.contains(&not_served) && url_message.contains("404"),
        "the message should name the URL {not_served} and its HTTP status: {url_message}"
    );
    assert_eq!(entries(&data.join("images/tmp"))?, Vec::<String>::new());
    assert_eq!(entries(&data.join("images/sha256"))?, Vec::<String>::new());
    eprintln!(
        "[image_fetch] both instances of missing images failed {:.1} s after creation: \
         {file_message} / {url_message}",
        took.as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_deleted_while_its_image_downloads_never_boots() -> anyhow::Result<()> {
    let cloud = Cloud::start(Options::default()).await?;
    let node = node_name(1);
    let image = random_bytes(IMAGE_BYTES)?;
    let sha = sha256_hex(&image).await?;
    let server = ImageServer::start(image, true).await?;
    let image_id = "emi-0f0e0d0c0b0a09082";
    register_image(&cloud, NS, image_id, &server.url(), Some(&sha)).await?;
    let name = "late-1";
    create_instances(&cloud, NS, &[name], image_id).await?;
    let api = cloud.instances();
    // The agent is fetching its image (held at the server) when the instance is deleted.
    let id = cloud
        .wait_until("the agent is fetching the image", HOLD, async || {
            let instance = api.get(name).await?;
            Ok(if server.requests() == 1 {
                Break(id_of(&instance)?)
            } else {
                Continue(format!(
                    "requests: {}, bound to {:?}",
                    server.requests(),
                    node_of(&instance)
                ))
            })
        })
        .await?;
    api.delete(name, &kube::api::DeleteParams::default())
        .await?;
    server.release();
    cloud
        .wait_until("the deleted instance is gone", STEP, async || {
            Ok(match api.get_opt(name).await? {
                None => Break(()),
                Some(i) => Continue(format!("{:?}", i.status.map(|s| s.state))),
            })
        })
        .await?;
    let domain = format!("karri-{id}");
    let plans: Vec<String> = std::fs::read_to_string(cloud.log_path(&node))?
        .lines()
        .filter(|l| l.contains("applying plan") && l.contains(&domain))
        .map(str::to_owned)
        .collect();
    ensure!(
        plans.is_empty(),
        "the agent acted on the domain of an instance deleted before its guest was ready: {plans:?}"
    );
    ensure!(
        cloud.agent_domains(0).await? == (0, 0),
        "a domain is left on the node"
    );
    Ok(())
}
