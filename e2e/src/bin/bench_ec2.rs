//! `bench-ec2`: Karri's EC2 Query API against moto's server, behind `make bench`.
//!
//! In one run on one machine it starts
//! - Karri: a real etcd and the real `api-gateway` from `$KARRI_BIN_DIR` (build it with
//!   `cargo build --release -p api-gateway` and point `KARRI_BIN_DIR` at `target/release`)
//!   through `karri-testkit`, with the instance-type catalogue and availability zones of
//!   `config/samples/` applied, a Ready node record with room for every instance, an account
//!   with an access key and one registered image. No operator or node agent runs, so the
//!   instances stay `pending`, which is all the two measured actions need;
//! - moto: `<workspace>/.venv/bin/moto_server` (`moto[server]` from PyPI, installed by
//!   `make setup`) as a child process on a free loopback port, with one registered image.
//!
//! and sends both the same SigV4-signed EC2 form POSTs (`Action=...&Version=2016-11-15`),
//! signed with the `aws-sigv4` crate (the AWS SDK for Rust's signer) for each endpoint's own
//! region (`karri-1` for Karri, `us-east-1` for moto), over one keep-alive `reqwest` client per
//! endpoint (HTTPS trusting the gateway's CA for Karri, plain HTTP for moto):
//!
//! 1. DescribeInstances with [`DESCRIBE_INSTANCES`] instances present (created through
//!    RunInstances in batches of 50 on each side, and counted in a response before timing);
//! 2. RunInstances, one instance per call;
//!
//! each from 1 and 16 concurrent clients ([`CONCURRENCY`]), for a fixed number of requests or a
//! time cap, whichever comes first; then
//! 3. DescribeInstances over [`BIG_INSTANCES`] instances on Karri alone, from one client.
//!
//! Beside the RunInstances rows it measures etcd alone, from this program: the transaction one
//! RunInstances of one instance commits ([`lone_create`], with a stored Instance record as its
//! value, under keys no watch follows), from 1 client after an untimed warm-up, so the report
//! shows how much of a launch's p99 is the durable write every launch waits for (a launch also
//! waits for the gateway's watch to bring the record back, which the floor leaves out). Its keys
//! are deleted afterwards; a failure there is reported and the run goes on.
//!
//! It prints requests per second and p50/p99 latency of every run, the ratio Karri/moto of rps
//! and of p99, and PASS/MISS against the goals: Karri at least 10x moto on both actions (rps
//! ratio >= 10 and p99 ratio <= 0.1 at every concurrency), and DescribeInstances over 10,000
//! instances p99 <= 100 ms. Informational rows (which never enter PASS/MISS) show the CPU time
//! the gateway, etcd, moto and this client spent per request (`/proc/<pid>/stat`) and the
//! response size, to tell where the time goes.
//!
//! A request's latency runs from just before it is signed until its whole response was read;
//! only 200 answers whose body is the expected response document count, anything else is an
//! error (counted and shown). Percentiles are exact nearest-rank over all samples (with fewer
//! than 100 samples p99 is the maximum). Before each timed run every client opens its
//! connection with a cheap DescribeRegions, so connection set-up (TLS for Karri) is not timed.
//! Every phase is bounded in requests and time, all traffic goes to 127.0.0.1, and etcd, the
//! gateway and moto are killed when their handles are dropped at the end of `main` (or on an
//! early error return). The report goes to stdout, progress to stderr.

use karri_e2e::closed_loop::{closed_loop, ms, Op, Procs, Run};
use karri_e2e::moto::Moto;
use karri_e2e::raw_etcd::lone_create;
use karri_e2e::report::{command_line, cpu_model, loadavg, out, pass};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use futures::FutureExt;
use karri_testkit::{kubectl_ok, workspace_root, Etcd, Gateway, Tokens};

/// The EC2 API version every request names.
const EC2_VERSION: &str = "2016-11-15";
/// Regions the two endpoints are signed for.
const KARRI_REGION: &str = "karri-1";
const MOTO_REGION: &str = "us-east-1";
/// Instance type launched on both sides (in Karri's sample catalogue and in moto's).
const INSTANCE_TYPE: &str = "t1.micro";
/// Instances per RunInstances call when filling up (Karri's per-call maximum).
const BATCH: usize = 50;
/// Concurrent clients of the compared runs.
const CONCURRENCY: [usize; 2] = [1, 16];
/// DescribeInstances comparison: instances present, requests per run, time cap per run.
const DESCRIBE_INSTANCES: usize = 1000;
const DESCRIBE_OPS: usize = 300;
const DESCRIBE_CAP: Duration = Duration::from_secs(15);
/// RunInstances comparison: requests per run (by concurrency), time cap per run.
const RUN_OPS: [usize; 2] = [1000, 3000];
const RUN_CAP: Duration = Duration::from_secs(10);
/// Karri alone: instances present, requests, time cap.
const BIG_INSTANCES: usize = 10_000;
const BIG_OPS: usize = 100;
const BIG_CAP: Duration = Duration::from_secs(30);
/// Concurrent RunInstances batches while filling up.
const FILL_CLIENTS: usize = 4;
/// etcd alone: transactions of one launch, from 1 client, after untimed ones.
const FLOOR_OPS: usize = 1000;
const FLOOR_WARM_OPS: usize = 50;
/// Where the etcd floor writes (no watch of the gateway's follows it).
const FLOOR_PREFIX: &str = "/bench/floor/";
/// Per-request timeout (moto answers 16 concurrent describes of 1,000 instances one by one).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long moto and Karri's caches get to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Goals.
const SPEEDUP_GOAL: f64 = 10.0;
const BIG_P99_GOAL: Duration = Duration::from_millis(100);

/// One EC2 endpoint: where, which region, who signs, and the keep-alive client.
struct Endpoint {
    name: &'static str,
    url: String,
    region: &'static str,
    identity: Identity,
    client: reqwest::Client,
}

impl Endpoint {
    fn new(
        name: &'static str,
        url: String,
        region: &'static str,
        access_key_id: &str,
        secret: &str,
        ca: Option<&Path>,
    ) -> anyhow::Result<Endpoint> {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(300));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(Endpoint {
            name,
            url: format!("{url}/"),
            region,
            identity: Credentials::new(access_key_id, secret, None, None, "bench-ec2").into(),
            client: b.build().context("building the HTTP client")?,
        })
    }

    /// The SigV4 headers (`authorization`, `x-amz-date`) for a form POST of `body` now.
    fn sign(&self, body: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .context("SigV4 signing parameters")?
            .into();
        let request = SignableRequest::new(
            "POST",
            self.url.as_str(),
            [("content-type", FORM)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )?;
        let (instructions, _) = sign(request, &params)?.into_parts();
        let (headers, _) = instructions.into_parts();
        Ok(headers
            .into_iter()
            .map(|h| (h.name(), h.value().to_string()))
            .collect())
    }

    /// Signs `body` and sends it.
    async fn send(&self, body: &str) -> anyhow::Result<reqwest::Response> {
        let mut req = self
            .client
            .post(&self.url)
            .header("content-type", FORM)
            .body(body.to_string());
        for (name, value) in self.sign(body)? {
            req = req.header(name, value);
        }
        req.send().await.context("sending")
    }

    /// An error unless the answer is a 200 whose body is a `<{root}` document.
    fn check(
        &self,
        body: &str,
        root: &str,
        status: reqwest::StatusCode,
        answer: &[u8],
    ) -> anyhow::Result<()> {
        let head = &answer[..answer.len().min(600)];
        let want = format!("<{root}");
        if !status.is_success() || !head.windows(want.len()).any(|w| w == want.as_bytes()) {
            bail!(
                "{} {}: HTTP {status}: {}",
                self.name,
                action_of(body),
                String::from_utf8_lossy(head)
            );
        }
        Ok(())
    }

    /// Signs and sends `body`, expecting a `<{root}` document: the latency from before signing
    /// until the whole response was read, and the response's size.
    async fn call(&self, body: &str, root: &str) -> anyhow::Result<(Duration, usize)> {
        let started = Instant::now();
        let resp = self.send(body).await?;
        let status = resp.status();
        let answer = resp.bytes().await.context("reading the response")?;
        let took = started.elapsed();
        self.check(body, root, status, &answer)?;
        Ok((took, answer.len()))
    }

    /// Like [`Endpoint::call`], returning the response text.
    async fn call_text(&self, body: &str, root: &str) -> anyhow::Result<String> {
        let resp = self.send(body).await?;
        let status = resp.status();
        let answer = resp.bytes().await.context("reading the response")?;
        self.check(body, root, status, &answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
}

const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

fn action_of(body: &str) -> &str {
    body.split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("?")
}

/// A form body: `Action=<action>&Version=2016-11-15` followed by `extra` (already encoded).
fn form(action: &str, extra: &[(&str, &str)]) -> String {
    let mut s = format!("Action={action}&Version={EC2_VERSION}");
    for (k, v) in extra {
        s.push('&');
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    s
}

/// The text of the first `<tag>…</tag>` in `xml`.
fn first_tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))?;
    Some(&xml[start..start + end])
}

/// CPU seconds (utime + stime) of the processes that serve the benchmark, for per-request CPU.
/// An [`Op`] sending `body` (re-signed on every call) to `ep`, expecting a `<{root}` answer.
fn op_for(ep: &Arc<Endpoint>, body: String, root: &'static str) -> Op {
    let ep = ep.clone();
    let body = Arc::new(body);
    Arc::new(move |_| {
        let ep = ep.clone();
        let body = body.clone();
        async move { ep.call(&body, root).await }.boxed()
    })
}

/// Opens `n` pooled connections to `ep` with concurrent cheap requests.
async fn warm(ep: &Arc<Endpoint>, n: usize) -> anyhow::Result<()> {
    let body = form("DescribeRegions", &[]);
    let calls = (0..n).map(|_| ep.call(&body, "DescribeRegionsResponse"));
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(())
}

/// Launches `count` instances of `image` on `ep` in RunInstances batches of up to [`BATCH`],
/// [`FILL_CLIENTS`] batches at a time.
async fn fill(ep: &Arc<Endpoint>, image: &str, count: usize) -> anyhow::Result<()> {
    let mut sizes = Vec::new();
    let mut left = count;
    while left > 0 {
        let n = left.min(BATCH);
        sizes.push(n);
        left -= n;
    }
    for chunk in sizes.chunks(FILL_CLIENTS) {
        let calls = chunk.iter().map(|n| {
            let n = n.to_string();
            let body = form(
                "RunInstances",
                &[
                    ("ImageId", image),
                    ("InstanceType", INSTANCE_TYPE),
                    ("MinCount", &n),
                    ("MaxCount", &n),
                ],
            );
            async move { ep.call(&body, "RunInstancesResponse").await }
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
    }
    Ok(())
}

/// Instances a DescribeInstances on `ep` shows (`<instanceId>` elements), and the size of the
/// response in bytes.
async fn count_instances(ep: &Endpoint) -> anyhow::Result<(usize, usize)> {
    let xml = ep
        .call_text(&form("DescribeInstances", &[]), "DescribeInstancesResponse")
        .await?;
    Ok((xml.matches("<instanceId>").count(), xml.len()))
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench-ec2] {}", msg.as_ref());
}

/// A compared row: both runs and the ratios, plus whether Karri met the 10x goal.
/// CPU per request of a run on `side`, with its mean response size.
fn cpu_line(side: &str, run: &Run) -> String {
    let n = run.lat.len().max(1) as f64;
    format!(
        "{}; response {:.0} bytes",
        run.cpu_line(side, "request"),
        run.bytes as f64 / n
    )
}

struct Compared {
    label: String,
    rps_ratio: f64,
    p99_ratio: f64,
    /// moto's p99, when its run succeeded.
    moto_p99: Option<Duration>,
}

impl Compared {
    fn met(&self) -> bool {
        self.rps_ratio >= SPEEDUP_GOAL && self.p99_ratio <= 1.0 / SPEEDUP_GOAL
    }
}

/// Measures etcd alone for the write of one launch (see the module doc) and prints its row and
/// what the RunInstances p99 goal at 1 client asks beside it (`moto_p99`: moto's p99 there).
async fn etcd_floor(procs: &Procs, etcd: &Etcd, moto_p99: Option<Duration>) -> anyhow::Result<()> {
    let client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .context("connecting to etcd")?;
    // A stored Instance record, through the ID index of one launched instance.
    let mut kv = client.kv_client();
    let index = kv
        .get(
            "/karri/index/ids/i-",
            Some(etcd_client::GetOptions::new().with_prefix().with_limit(1)),
        )
        .await
        .context("reading the instance ID index")?;
    let record_key = index
        .kvs()
        .first()
        .context("etcd holds no instance ID index entry")?
        .value()
        .to_vec();
    let record = kv
        .get(record_key, None)
        .await
        .context("reading an instance record")?;
    let value = record
        .kvs()
        .first()
        .context("an instance ID index entry names no record")?
        .value()
        .to_vec();
    let size = value.len();
    let value = Arc::new(value);
    progress(format!(
        "etcd alone: the transaction of one launch, 1 client, {FLOOR_OPS} times"
    ));
    let op = |run: &'static str| -> Op {
        let (client, value) = (client.clone(), value.clone());
        Arc::new(move |i| {
            let mut kv = client.kv_client();
            let key = format!("{FLOOR_PREFIX}{run}/instances/{i:06}");
            let id = format!("{FLOOR_PREFIX}{run}/ids/i-{i:017x}");
            let value = value.as_ref().clone();
            async move { Ok((lone_create(&mut kv, key, id, value).await?, 0)) }.boxed()
        })
    };
    let warm = closed_loop(procs, 1, FLOOR_WARM_OPS, RUN_CAP, op("warm")).await;
    if let Some(e) = warm.first_error {
        bail!("the warm-up failed: {e}");
    }
    let mut floor = closed_loop(procs, 1, FLOOR_OPS, RUN_CAP, op("run")).await;
    kv.delete(
        FLOOR_PREFIX,
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .context("deleting the floor's keys")?;
    out(format!(
        "{:<30} {:>3} | {}",
        "etcd alone: one launch's txn",
        1,
        floor.cells(9)
    ));
    out(format!(
        "      (from this program: 2 compares, 2 puts, a stored Instance record of {size} bytes, no watch on the keys; etcd cpu per txn {:.0} us)",
        floor.cpu.etcd * 1e6 / floor.lat.len().max(1) as f64
    ));
    if let Some(e) = &floor.first_error {
        out(format!("      errors: {}, first: {e}", floor.errors));
    }
    if let Some(moto_p99) = moto_p99 {
        let asked = moto_p99.as_secs_f64() / SPEEDUP_GOAL;
        let own = floor.p(99.0).as_secs_f64();
        out(format!(
            "      RunInstances at 1 client: the goal asks Karri for p99 <= {:.2} ms (moto's / {SPEEDUP_GOAL}); etcd alone took p99 {:.2} ms for the write each launch waits for ({:.2}x what the goal allows)",
            asked * 1e3,
            own * 1e3,
            own / asked.max(1e-12)
        ));
    }
    Ok(())
}

/// Runs `body` at `concurrency` on both endpoints (Karri first), prints the row, and returns
/// the ratios.
#[allow(clippy::too_many_arguments)]
async fn compare(
    procs: &Procs,
    label: &str,
    karri: (&Arc<Endpoint>, String),
    moto: (&Arc<Endpoint>, String),
    root: &'static str,
    concurrency: usize,
    max_ops: usize,
    cap: Duration,
) -> anyhow::Result<Compared> {
    let mut runs = Vec::new();
    for (ep, body) in [karri, moto] {
        progress(format!(
            "{label}, {concurrency} client(s), {}: up to {max_ops} requests or {cap:?}",
            ep.name
        ));
        warm(ep, concurrency).await?;
        let run = closed_loop(procs, concurrency, max_ops, cap, op_for(ep, body, root)).await;
        if let Some(e) = &run.first_error {
            progress(format!("{}: {} errors, first: {e}", ep.name, run.errors));
        }
        runs.push(run);
    }
    let [mut k, mut m]: [Run; 2] = runs
        .try_into()
        .map_err(|_| anyhow::anyhow!("two runs expected"))?;
    let rps_ratio = k.rate() / m.rate().max(1e-9);
    let p99_ratio = k.p(99.0).as_secs_f64() / m.p(99.0).as_secs_f64().max(1e-12);
    out(format!(
        "{label:<30} {concurrency:>3} | {} | {} | {:>8.1} {:>8.3}",
        k.cells(9),
        m.cells(9),
        rps_ratio,
        p99_ratio
    ));
    out(cpu_line("Karri", &k));
    out(cpu_line("moto", &m));
    for (name, run) in [("Karri", &k), ("moto", &m)] {
        if let Some(e) = &run.first_error {
            out(format!(
                "      {name} errors: {}, first: {}",
                run.errors,
                e.chars().take(300).collect::<String>()
            ));
        }
    }
    let ok = k.errors == 0 && m.errors == 0 && !k.lat.is_empty() && !m.lat.is_empty();
    Ok(Compared {
        label: format!("{label}, {concurrency} client(s)"),
        moto_p99: ok.then(|| m.p(99.0)),
        // A run with errors or no samples cannot meet the goal.
        rps_ratio: if ok { rps_ratio } else { 0.0 },
        p99_ratio: if ok { p99_ratio } else { f64::INFINITY },
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = Instant::now();
    let root = workspace_root();

    progress("starting etcd, the gateway and moto_server");
    let etcd = Etcd::start().await.context("starting etcd")?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens)
        .await
        .context("starting the gateway")?;
    let moto = Moto::start().await.context("starting moto_server")?;
    let procs = Procs::find(&etcd, &gateway, &moto);

    // Karri: catalogue, zones, an account with a key, an image.
    let admin = gateway.kubeconfig(&tokens.admin, "default")?;
    for sample in ["availability-zone.yaml", "instance-type.yaml"] {
        let path = root.join("config/samples").join(sample);
        kubectl_ok(&admin, &["apply", "-f", &path.display().to_string()])?;
    }
    // No operator places the instances, but a launch needs a Ready node with room for them.
    gateway
        .register_ready_node(&tokens.admin, "bench-node", "karri-1a", 1 << 20, 1 << 40)
        .await?;
    let (account_id, creds) = gateway.account_with_key(&tokens.admin, "bench").await?;
    let karri = Arc::new(Endpoint::new(
        "Karri",
        gateway.url(),
        KARRI_REGION,
        &creds.access_key_id,
        &creds.secret_access_key,
        Some(&gateway.ca_path()),
    )?);
    // moto signs nothing back and checks no signature, but gets the same signed requests.
    let moto_ep = Arc::new(Endpoint::new(
        "moto",
        moto.url.clone(),
        MOTO_REGION,
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
    )?);
    // The image's object must be there for Karri to register it (moto checks nothing).
    let disk = tempfile::NamedTempFile::new()?;
    std::fs::write(disk.path(), b"bench disk")?;
    let disk_path = disk.path().to_str().context("a non-UTF-8 temporary path")?;
    gateway
        .aws(
            &creds,
            &["s3api", "create-bucket", "--bucket", "bench-images"],
        )
        .await?;
    gateway
        .aws(
            &creds,
            &[
                "s3api",
                "put-object",
                "--bucket",
                "bench-images",
                "--key",
                "bench.img",
                "--body",
                disk_path,
            ],
        )
        .await?;
    let register = form(
        "RegisterImage",
        &[
            ("Name", "bench-image"),
            ("ImageLocation", "bench-images%2Fbench.img"),
        ],
    );
    let mut images = Vec::new();
    for ep in [&karri, &moto_ep] {
        let xml = ep.call_text(&register, "RegisterImageResponse").await?;
        images.push(
            first_tag(&xml, "imageId")
                .context("no imageId")?
                .to_string(),
        );
    }
    let (karri_image, moto_image) = (images[0].clone(), images[1].clone());
    // The gateway's watch cache must hold the catalogue before RunInstances can check it.
    let started = Instant::now();
    let check = form(
        "DescribeInstanceTypes",
        &[("InstanceType.1", INSTANCE_TYPE)],
    );
    while let Err(e) = karri.call(&check, "DescribeInstanceTypesResponse").await {
        if started.elapsed() > READY_DEADLINE {
            return Err(e.context("the gateway never showed the instance-type catalogue"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    out("=== Karri vs moto: EC2 Query API (bench-ec2) ===");
    out(format!(
        "date (UTC)    : {}",
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    ));
    out(format!(
        "machine       : {} cores, {}",
        command_line("nproc", &[]),
        cpu_model()
    ));
    out(format!(
        "Karri         : {}/api-gateway (release build expected) on etcd {}, region {KARRI_REGION}, HTTPS (rustls), account {account_id}",
        karri_testkit::bin_dir().display(),
        command_line("etcd", &["--version"]).lines().next().unwrap_or("?")
    ));
    out(format!(
        "moto          : moto_server {} (Werkzeug, threaded), region {MOTO_REGION}, plain HTTP",
        command_line(
            &root.join(".venv/bin/python").display().to_string(),
            &["-c", "import moto; print(moto.__version__)"]
        )
    ));
    out(format!(
        "requests      : SigV4 (aws-sigv4) form POSTs, Version={EC2_VERSION}, one keep-alive client per endpoint; instance type {INSTANCE_TYPE}; images {karri_image} (Karri), {moto_image} (moto)"
    ));
    out("latency       : from before signing to the whole response read; exact nearest-rank percentiles in ms");
    out(format!(
        "load average  : {} (other work on the machine skews the figures)",
        loadavg()
    ));
    out("");

    // 1. DescribeInstances over 1,000 instances on each side.
    progress(format!(
        "launching {DESCRIBE_INSTANCES} instances on each side"
    ));
    fill(&karri, &karri_image, DESCRIBE_INSTANCES).await?;
    fill(&moto_ep, &moto_image, DESCRIBE_INSTANCES).await?;
    for ep in [&karri, &moto_ep] {
        let (n, _) = count_instances(ep).await?;
        if n != DESCRIBE_INSTANCES {
            bail!(
                "{} shows {n} instances, expected {DESCRIBE_INSTANCES}",
                ep.name
            );
        }
    }

    out(format!(
        "{:<30} {:>3} | {:^41} | {:^41} | {:^17}",
        "", "", "Karri", "moto", "Karri/moto"
    ));
    out(format!(
        "{:<30} {:>3} | {:>6} {:>4} {:>9} {:>9} {:>9} | {:>6} {:>4} {:>9} {:>9} {:>9} | {:>8} {:>8}",
        "action", "c", "reqs", "err", "rps", "p50", "p99", "reqs", "err", "rps", "p50", "p99", "rps", "p99"
    ));
    let mut compared = Vec::new();
    let describe = form("DescribeInstances", &[]);
    for c in CONCURRENCY {
        compared.push(
            compare(
                &procs,
                &format!("DescribeInstances ({DESCRIBE_INSTANCES} inst)"),
                (&karri, describe.clone()),
                (&moto_ep, describe.clone()),
                "DescribeInstancesResponse",
                c,
                DESCRIBE_OPS,
                DESCRIBE_CAP,
            )
            .await?,
        );
    }

    // 2. RunInstances, one instance per call.
    let run_body = |image: &str| {
        form(
            "RunInstances",
            &[
                ("ImageId", image),
                ("InstanceType", INSTANCE_TYPE),
                ("MinCount", "1"),
                ("MaxCount", "1"),
            ],
        )
    };
    let mut moto_run_p99 = None;
    for (c, max_ops) in CONCURRENCY.into_iter().zip(RUN_OPS) {
        compared.push(
            compare(
                &procs,
                "RunInstances (1 per call)",
                (&karri, run_body(&karri_image)),
                (&moto_ep, run_body(&moto_image)),
                "RunInstancesResponse",
                c,
                max_ops,
                RUN_CAP,
            )
            .await?,
        );
        if c == 1 {
            moto_run_p99 = compared.last().and_then(|c| c.moto_p99);
        }
    }
    drop(moto_ep);
    drop(moto);
    if let Err(e) = etcd_floor(&procs, &etcd, moto_run_p99).await {
        out(format!("etcd alone: not measured: {e:#}"));
    }

    // 3. DescribeInstances over 10,000 instances, Karri alone.
    let (present, _) = count_instances(&karri).await?;
    let missing = BIG_INSTANCES.saturating_sub(present);
    progress(format!(
        "launching {missing} more instances on Karri (to {BIG_INSTANCES})"
    ));
    fill(&karri, &karri_image, missing).await?;
    let (present, size) = count_instances(&karri).await?;
    if present < BIG_INSTANCES {
        bail!("Karri shows {present} instances, expected {BIG_INSTANCES}");
    }
    progress(format!(
        "DescribeInstances over {present} instances, 1 client: up to {BIG_OPS} requests or {BIG_CAP:?}"
    ));
    warm(&karri, 1).await?;
    let mut big = closed_loop(
        &procs,
        1,
        BIG_OPS,
        BIG_CAP,
        op_for(&karri, describe.clone(), "DescribeInstancesResponse"),
    )
    .await;
    out("");
    out(format!(
        "{:<30} {:>3} | {:>6} {:>4} {:>9} {:>9} {:>9} {:>9}",
        "Karri alone", "c", "reqs", "err", "rps", "p50", "p99", "max"
    ));
    let big_p99 = big.p(99.0);
    let big_max = big.p(100.0);
    out(format!(
        "{:<30} {:>3} | {} {:>9}",
        format!("DescribeInstances ({present} inst)"),
        1,
        big.cells(9),
        ms(big_max)
    ));
    out(cpu_line("Karri", &big));
    out(format!(
        "      response: {size} bytes ({:.0} bytes per instance)",
        size as f64 / present as f64
    ));
    if let Some(e) = &big.first_error {
        out(format!("      errors: {}, first: {e}", big.errors));
    }

    // Goals.
    let speedup_ok = compared.iter().all(Compared::met);
    let big_ok = big.errors == 0 && !big.lat.is_empty() && big_p99 <= BIG_P99_GOAL;
    out("");
    out(
        "=== goals: >= 10x moto on both, DescribeInstances over 10,000 instances p99 <= 100 ms ===",
    );
    out(format!(
        "[{}] >= 10x moto on both (DescribeInstances over {DESCRIBE_INSTANCES} instances and RunInstances: rps Karri/moto >= 10 and p99 Karri/moto <= 0.1, at 1 and 16 clients)",
        pass(speedup_ok)
    ));
    for c in &compared {
        out(format!(
            "       {}: {} rps x{:.1}, p99 x{:.3} (moto/Karri p99 = {:.1}x)",
            pass(c.met()),
            c.label,
            c.rps_ratio,
            c.p99_ratio,
            1.0 / c.p99_ratio.max(1e-12)
        ));
    }
    out(format!(
        "[{}] DescribeInstances over {BIG_INSTANCES} instances p99 <= {} ms: p99 {} ms ({} requests, 1 client)",
        pass(big_ok),
        BIG_P99_GOAL.as_millis(),
        ms(big_p99),
        big.lat.len()
    ));
    out(format!(
        "total time: {:.0} s; load average at the end: {}",
        total.elapsed().as_secs_f64(),
        loadavg()
    ));
    Ok(())
}
