//! `bench-registry`: the registry benchmark behind `make bench`.
//!
//! Starts a real etcd (temp data dir, loopback ports) and the real `api-gateway` binary from
//! `$KARRI_BIN_DIR` (build it with `cargo build --release -p api-gateway` first) through
//! `karri-testkit`, then measures, in one run on one machine:
//!
//! 1. raw etcd puts (etcd-client, values the size of a stored Instance record) with 1 and 32
//!    concurrent clients: the peer the gateway is compared with;
//! 2. Instance creates through the resource API with 1 and 32 concurrent clients, and the
//!    ratio of their p50/p99 latency to the raw puts (goal: ratio <= 2.0);
//! 3. watch fan-out delay from a create to 100 concurrent watchers receiving its ADDED event;
//! 4. list latency over 10,000 records, full and paginated (goal: full list p99 <= 100 ms).
//!
//! Informational rows help read the create ratio: the etcd transaction a create really sends
//! (two compares, two puts), the same with a prefix watch open (as the gateway's watch cache
//! has), CPU time of etcd, the gateway and this client per operation (from `/proc/<pid>/stat`),
//! etcd's WAL fsyncs per operation (etcd's `/metrics`) and the gateway handler's own mean
//! create time (the gateway's `/metrics`). They never enter the PASS/MISS lines.
//!
//! It prints a plain-text report on stdout (progress goes to stderr). Percentiles are exact
//! nearest-rank percentiles over all samples (no histogram bucketing; with 50 samples p99 is the
//! maximum). Every phase is bounded in operations and time, and all traffic goes to 127.0.0.1.
//! The testkit handles kill etcd and the gateway when they are dropped at the end of `main` (or
//! on an early error return).

use karri_e2e::cloud::pid_by_cmdline;
use karri_e2e::raw_etcd::lone_create;
use karri_e2e::report::pct;
use karri_e2e::report::{command_line, cpu_model, cpu_ticks, out, pass, ticks_per_second};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{GetOptions, WatchOptions};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use karri_testkit::{bin_dir, http_client, Etcd, Gateway, Tokens};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The resource API's group/version path.
const API: &str = "/apis/karri.dev/v1alpha1";
/// Stored size the Instance records are padded to (bytes of the JSON value in etcd).
const TARGET_RECORD_BYTES: usize = 1024;
/// Concurrency levels of the put/create comparison.
const CONCURRENCY: [usize; 2] = [1, 32];
/// Measured operations per (kind, concurrency) run, and the time cap of one run.
const OPS_C1: usize = 3000;
const OPS_C32: usize = 20_000;
const RUN_TIME_CAP: Duration = Duration::from_secs(15);
/// Watch fan-out: watchers, records created one at a time, per-record wait cap.
const WATCHERS: usize = 100;
const FANOUT_RECORDS: usize = 200;
const FANOUT_WAIT_CAP: Duration = Duration::from_secs(10);
/// List benchmark: records, creators, timed full lists, timed paginated walks, page size.
const LIST_RECORDS: usize = 10_000;
const LIST_CREATORS: usize = 32;
const LIST_CREATE_CAP: Duration = Duration::from_secs(150);
const FULL_LISTS: usize = 50;
const CACHE_LISTS: usize = 20;
const PAGED_WALKS: usize = 10;
const PAGE_LIMIT: usize = 500;
/// Goals.
const CREATE_RATIO_GOAL: f64 = 2.0;
const LIST_P99_GOAL: Duration = Duration::from_millis(100);

/// One operation of a closed-loop run: `(worker, index)` → latency of the timed part.
type Op = Arc<dyn Fn(usize, usize) -> BoxFuture<'static, anyhow::Result<Duration>> + Send + Sync>;

/// What a closed-loop run measured.
struct Run {
    /// Latencies of the successful operations.
    lat: Vec<Duration>,
    /// Wall time from the start of the run until the last worker finished.
    wall: Duration,
    /// Failed operations and the first error.
    errors: usize,
    first_error: Option<String>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.lat.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs `op` from `concurrency` workers until `max_ops` operations were started or `cap`
/// elapsed, whichever comes first.
async fn closed_loop(concurrency: usize, max_ops: usize, cap: Duration, op: Op) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let next = next.clone();
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errs = Vec::new();
            while start.elapsed() < cap {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max_ops {
                    break;
                }
                match op(w, i).await {
                    Ok(d) => lat.push(d),
                    Err(e) => errs.push(format!("{e:#}")),
                }
            }
            (lat, errs)
        }));
    }
    let mut run = Run {
        lat: Vec::new(),
        wall: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    for h in handles {
        match h.await {
            Ok((lat, errs)) => {
                run.lat.extend(lat);
                run.errors += errs.len();
                if run.first_error.is_none() {
                    run.first_error = errs.into_iter().next();
                }
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    run.wall = start.elapsed();
    run
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

/// The etcd binary testkit starts (same resolution rules).
fn etcd_bin() -> PathBuf {
    match std::env::var_os("KARRI_ETCD_BIN").filter(|b| !b.is_empty()) {
        Some(b) => PathBuf::from(b),
        None if std::path::Path::new("/usr/bin/etcd").is_file() => PathBuf::from("/usr/bin/etcd"),
        None => PathBuf::from("etcd"),
    }
}

/// Pids of the etcd and gateway children (found by a path unique to each in their command
/// line) and the clock tick rate, for CPU accounting from `/proc`.
struct Procs {
    etcd: Option<u32>,
    gateway: Option<u32>,
    ticks_per_s: f64,
    /// etcd's own `/metrics` (WAL fsyncs and backend commits).
    etcd_metrics: String,
    http: reqwest::Client,
}

/// CPU seconds used so far by etcd, the gateway and this process, and etcd's disk counters.
#[derive(Clone, Copy, Default)]
struct Cpu {
    etcd: f64,
    gateway: f64,
    client: f64,
    /// WAL fsyncs: count and total seconds.
    fsyncs: f64,
    fsync_s: f64,
    /// bbolt backend commits: count and total seconds.
    commits: f64,
    commit_s: f64,
}

impl Procs {
    fn find(etcd: &Etcd, gateway_needle: &str) -> anyhow::Result<Procs> {
        let etcd_needle = etcd.data_dir().display().to_string();
        let mut procs = Procs {
            etcd: None,
            gateway: None,
            ticks_per_s: ticks_per_second(),
            etcd_metrics: format!("{}/metrics", etcd.endpoint),
            http: http_client(None)?,
        };
        procs.etcd = pid_by_cmdline(&etcd_needle);
        procs.gateway = pid_by_cmdline(gateway_needle);
        Ok(procs)
    }

    /// utime + stime of `/proc/<pid>/stat` in seconds.
    fn cpu_of(&self, stat_path: &str) -> f64 {
        cpu_ticks(stat_path).map_or(0.0, |t| t as f64 / self.ticks_per_s)
    }

    async fn snapshot(&self) -> Cpu {
        let text = match self.http.get(&self.etcd_metrics).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let metric = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let of = |pid: Option<u32>| pid.map_or(0.0, |p| self.cpu_of(&format!("/proc/{p}/stat")));
        Cpu {
            etcd: of(self.etcd),
            gateway: of(self.gateway),
            client: self.cpu_of("/proc/self/stat"),
            fsyncs: metric("etcd_disk_wal_fsync_duration_seconds_count"),
            fsync_s: metric("etcd_disk_wal_fsync_duration_seconds_sum"),
            commits: metric("etcd_disk_backend_commit_duration_seconds_count"),
            commit_s: metric("etcd_disk_backend_commit_duration_seconds_sum"),
        }
    }

    /// CPU and etcd disk work between `before` and now, per operation (two lines).
    async fn line(&self, before: Cpu, ops: usize, wall: Duration) -> String {
        let now = self.snapshot().await;
        let fsyncs = now.fsyncs - before.fsyncs;
        let commits = now.commits - before.commits;
        let disk = format!(
            "      etcd disk: {fsyncs:.0} WAL fsyncs ({:.3} per op, mean {:.3} ms), {commits:.0} backend commits (mean {:.3} ms)",
            fsyncs / ops.max(1) as f64,
            1e3 * (now.fsync_s - before.fsync_s) / fsyncs.max(1.0),
            1e3 * (now.commit_s - before.commit_s) / commits.max(1.0),
        );
        let (e, g, c) = (
            now.etcd - before.etcd,
            now.gateway - before.gateway,
            now.client - before.client,
        );
        let per = |x: f64| x * 1e6 / ops.max(1) as f64;
        format!(
            "      cpu: etcd {e:.2} s, gateway {g:.2} s, bench client {c:.2} s in {:.2} s wall ({:.0}% of the machine); per op: etcd {:.0} us, gateway {:.0} us, client {:.0} us",
            wall.as_secs_f64(),
            100.0 * (e + g + c)
                / (wall.as_secs_f64().max(1e-9)
                    * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)),
            per(e),
            per(g),
            per(c)
        ) + "\n"
            + &disk
    }
}

/// Mean time the gateway's handler spent on successful Instance creates so far, from its
/// own `/metrics` (sum and count of `request_duration_seconds`): (sum seconds, count).
async fn handler_create_time(api: &Api, client: &reqwest::Client) -> (f64, f64) {
    let Ok(resp) = client.get(format!("{}/metrics", api.base)).send().await else {
        return (0.0, 0.0);
    };
    let text = resp.text().await.unwrap_or_default();
    let pick = |suffix: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "karri_gateway_request_duration_seconds_{suffix}{{"
                )) && l.contains("verb=\"create\"")
                    && l.contains("resource=\"instances\"")
                    && l.contains("code=\"201\"")
            })
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    (pick("sum"), pick("count"))
}

/// An Instance body named `name` whose annotation `pad` bytes long brings the stored record to
/// about [`TARGET_RECORD_BYTES`].
fn instance_body(name: &str, pad: usize) -> Value {
    json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Instance",
        "metadata": {
            "name": name,
            "labels": {"app": "bench", "tier": "web"},
            "annotations": {"bench.karri.dev/padding": "x".repeat(pad)},
        },
        "spec": {
            "imageId": "emi-0123456789abcdef0",
            "instanceType": "m1.small",
            "keyName": "ops-key",
            "securityGroupIds": ["sg-0123456789abcdef0"],
            "userData": "IyEvYmluL3NoCmVjaG8gImhlbGxvIGZyb20ga2FycmkiID4gL3RtcC9oZWxsbwo=",
            "availabilityZone": "karri-1a",
            "desiredState": "running",
        },
    })
}

/// Talks to the gateway's resource API as admin.
#[derive(Clone)]
struct Api {
    base: String,
    token: Arc<String>,
}

impl Api {
    fn collection(&self, ns: &str) -> String {
        format!("{}{API}/namespaces/{ns}/instances", self.base)
    }

    /// POSTs a pre-serialized body; returns the latency from just before sending until the
    /// whole 201 response was read.
    async fn create(
        &self,
        client: &reqwest::Client,
        ns: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Duration> {
        let url = self.collection(ns);
        let started = Instant::now();
        let resp = client
            .post(&url)
            .bearer_auth(self.token.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .context("sending create")?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading create response")?;
        let took = started.elapsed();
        if status != reqwest::StatusCode::CREATED {
            bail!(
                "create answered {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            );
        }
        Ok(took)
    }

    /// GETs `url`; returns the latency until the whole body was read, and the body.
    async fn get(
        &self,
        client: &reqwest::Client,
        url: &str,
    ) -> anyhow::Result<(Duration, Vec<u8>)> {
        let started = Instant::now();
        let resp = client
            .get(url)
            .bearer_auth(self.token.as_str())
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading list body")?;
        let took = started.elapsed();
        if !status.is_success() {
            bail!(
                "GET {url} answered {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            );
        }
        Ok((took, bytes.to_vec()))
    }
}

/// Prints the summary line of a closed-loop run; returns its p50 and p99.
fn run_line(label: &str, run: &mut Run) -> (Duration, Duration) {
    let p50 = pct(&mut run.lat, 50.0);
    let p99 = pct(&mut run.lat, 99.0);
    let errs = match &run.first_error {
        Some(e) => format!("  errors {} (first: {e})", run.errors),
        None => String::new(),
    };
    let line = format!(
        "  {label:<34} ops {:>5} in {:>6.2} s  {:>8.1} ops/s  p50 {:>10}  p99 {:>10}{errs}",
        run.lat.len(),
        run.wall.as_secs_f64(),
        run.rate(),
        ms(p50),
        ms(p99),
    );
    out(line);
    (p50, p99)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = Instant::now();

    progress("starting etcd and the gateway");
    let etcd = Etcd::start().await.context("starting etcd")?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens)
        .await
        .context("starting the gateway")?;
    let etcd_client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .context("connecting to etcd")?;
    let api = Api {
        base: gateway.url(),
        token: Arc::new(tokens.admin.clone()),
    };
    let ca = gateway.ca_path();
    let procs = Procs::find(&etcd, &gateway.tokens_path().display().to_string())?;

    // Header.
    let etcd_version = command_line(&etcd_bin().display().to_string(), &["--version"]);
    let etcd_dir_fs = command_line(
        "stat",
        &["-f", "-c", "%T", &etcd.dir().display().to_string()],
    );
    out("=== Karri registry benchmark (bench-registry) ===");
    out(format!(
        "date (UTC)      : {}",
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    ));
    out(format!(
        "host            : {}",
        command_line("hostname", &[])
    ));
    out(format!("nproc           : {}", command_line("nproc", &[])));
    out(format!("cpu             : {}", cpu_model()));
    out(format!(
        "kernel          : {}",
        command_line("uname", &["-r"])
    ));
    out(format!(
        "etcd --version  : {}",
        etcd_version.lines().collect::<Vec<_>>().join("; ")
    ));
    out(format!(
        "etcd data dir   : {} (filesystem {etcd_dir_fs})",
        etcd.data_dir().display()
    ));
    out(format!(
        "api-gateway     : {}",
        bin_dir().join("api-gateway").display()
    ));
    out(format!(
        "pids            : etcd {:?}, api-gateway {:?}, bench client {} (CPU from /proc/<pid>/stat)",
        procs.etcd,
        procs.gateway,
        std::process::id()
    ));
    out("client          : this process (tokio multi-thread), etcd + gateway + client share the cores");
    out("percentiles     : exact nearest-rank over all samples; latency = just before sending -> full response read");

    // Record size: create a probe record and read back what the gateway stored.
    let probe_client = http_client(Some(&ca))?;
    let probe = serde_json::to_vec(&instance_body("probe-0", 0))?;
    api.create(&probe_client, "bench", probe)
        .await
        .context("probe create")?;
    let stored_len = |name: &'static str| {
        let mut kv = etcd_client.kv_client();
        async move {
            let resp = kv
                .get("/karri/registry/", Some(GetOptions::new().with_prefix()))
                .await?;
            resp.kvs()
                .iter()
                .find(|kv| {
                    kv.key_str()
                        .is_ok_and(|k| k.ends_with(&format!("/bench/{name}")))
                })
                .map(|kv| kv.value().to_vec())
                .ok_or_else(|| anyhow::anyhow!("stored record {name} not found in etcd"))
        }
    };
    let bare = stored_len("probe-0").await?.len();
    let pad = TARGET_RECORD_BYTES.saturating_sub(bare);
    let probe = serde_json::to_vec(&instance_body("probe-1", pad))?;
    api.create(&probe_client, "bench", probe)
        .await
        .context("probe create")?;
    let record = stored_len("probe-1").await?;
    let body_len = serde_json::to_vec(&instance_body("c32-00000", pad))?.len();
    out(
        format!(
            "record size     : {} bytes stored in etcd per Instance (request body {body_len} bytes); raw puts use a copy of that stored value",
            record.len()
        ),
    );

    // 1 + 2: raw etcd puts vs gateway creates.
    out("");
    out("--- 1/2. Raw etcd put vs create through the resource API ---");
    out("  raw: etcd-client put of the stored-record bytes to a new key under /bench/raw/<run>/; N tasks share one etcd-client (one gRPC/HTTP2 channel, like the gateway)");
    out("  gateway: POST /apis/karri.dev/v1alpha1/namespaces/bench/instances, admin token, one reqwest client (HTTP/1.1 keep-alive, TLS) per worker");
    out("  each run is preceded by an untimed warm-up of max(3*N, 20) operations");
    let record = Arc::new(record);
    let mut goal_lines = Vec::new();
    let metrics_client = http_client(Some(&ca))?;
    for &c in &CONCURRENCY {
        let max_ops = if c == 1 { OPS_C1 } else { OPS_C32 };
        let warm = (3 * c).max(20);

        // Raw put.
        let raw_op = |tag: String| -> Op {
            let client = etcd_client.clone();
            let value = record.clone();
            Arc::new(move |_w, i| {
                let mut kv = client.kv_client();
                let key = format!("/bench/raw/{tag}/{i:06}");
                let value = value.as_ref().clone();
                async move {
                    let t = Instant::now();
                    kv.put(key, value, None).await?;
                    Ok(t.elapsed())
                }
                .boxed()
            })
        };
        progress(format!("raw etcd put, {c} concurrent"));
        closed_loop(c, warm, RUN_TIME_CAP, raw_op(format!("warm-c{c}"))).await;
        let before = procs.snapshot().await;
        let mut raw = closed_loop(c, max_ops, RUN_TIME_CAP, raw_op(format!("c{c}"))).await;
        let (raw50, raw99) = run_line(&format!("raw etcd put, {c:>2} concurrent"), &mut raw);
        out(procs.line(before, raw.lat.len(), raw.wall).await);

        // Gateway create.
        progress(format!("gateway create, {c} concurrent"));
        let clients = Arc::new(
            (0..c)
                .map(|_| http_client(Some(&ca)))
                .collect::<anyhow::Result<Vec<_>>>()?,
        );
        let create_op = |tag: String| -> Op {
            let api = api.clone();
            let clients = clients.clone();
            Arc::new(move |w, i| {
                let api = api.clone();
                let client = clients[w % clients.len()].clone();
                let name = format!("{tag}-{i:05}");
                async move {
                    let body = serde_json::to_vec(&instance_body(&name, pad))?;
                    api.create(&client, "bench", body).await
                }
                .boxed()
            })
        };
        closed_loop(c, warm, RUN_TIME_CAP, create_op(format!("warm-c{c}"))).await;
        let (h_sum0, h_count0) = handler_create_time(&api, &metrics_client).await;
        let before = procs.snapshot().await;
        let mut gw = closed_loop(c, max_ops, RUN_TIME_CAP, create_op(format!("c{c}"))).await;
        let cpu = procs.line(before, gw.lat.len(), gw.wall).await;
        let (h_sum1, h_count1) = handler_create_time(&api, &metrics_client).await;
        let (gw50, gw99) = run_line(&format!("gateway create, {c:>2} concurrent"), &mut gw);
        out(cpu);
        let client_mean =
            gw.lat.iter().map(Duration::as_secs_f64).sum::<f64>() / gw.lat.len().max(1) as f64;
        out(format!(
            "      mean create: {} seen by the client vs {} inside the gateway's handler (its /metrics, {} creates)",
            ms(Duration::from_secs_f64(client_mean)),
            ms(Duration::from_secs_f64(
                (h_sum1 - h_sum0) / (h_count1 - h_count0).max(1.0)
            )),
            h_count1 - h_count0
        ));
        if gw.errors > 0 || raw.errors > 0 {
            out(format!(
                "  WARNING: {} raw / {} gateway operations failed",
                raw.errors, gw.errors
            ));
        }
        let r50 = ratio(gw50, raw50);
        let r99 = ratio(gw99, raw99);
        let line = format!(
            "  ratio gateway/raw @{c:>2}: p50 {r50:.2}x [{}]  p99 {r99:.2}x [{}]   (goal <= {CREATE_RATIO_GOAL:.1}x{})",
            pass(r50 <= CREATE_RATIO_GOAL),
            pass(r99 <= CREATE_RATIO_GOAL),
            if r50.max(r99) > CREATE_RATIO_GOAL {
                format!(
                    ", worst ratio is {:.2}x the goal",
                    r50.max(r99) / CREATE_RATIO_GOAL
                )
            } else {
                String::new()
            }
        );
        out(&line);
        goal_lines.push((
            format!("create latency <= {CREATE_RATIO_GOAL:.1}x raw etcd put @{c:>2} concurrent (p50 {r50:.2}x, p99 {r99:.2}x)"),
            r50 <= CREATE_RATIO_GOAL && r99 <= CREATE_RATIO_GOAL,
        ));

        // Informational: the transaction a create actually sends (2 compares, 2 puts).
        progress(format!(
            "raw etcd create-txn, {c} concurrent (informational)"
        ));
        let txn_op = |tag: String| -> Op {
            let client = etcd_client.clone();
            let value = record.clone();
            Arc::new(move |_w, i| {
                let mut kv = client.kv_client();
                let key = format!("/bench/rawtxn/{tag}/{i:06}");
                let id = format!("/bench/rawtxn-ids/{tag}/i-{i:017x}");
                let value = value.as_ref().clone();
                async move { lone_create(&mut kv, key, id, value).await }.boxed()
            })
        };
        closed_loop(c, warm, RUN_TIME_CAP, txn_op(format!("warm-c{c}"))).await;
        let before = procs.snapshot().await;
        let mut txn = closed_loop(
            c,
            if c == 1 { 1000 } else { 8000 },
            RUN_TIME_CAP,
            txn_op(format!("c{c}")),
        )
        .await;
        let t50 = pct(&mut txn.lat, 50.0);
        let t99 = pct(&mut txn.lat, 99.0);
        let cpu = procs.line(before, txn.lat.len(), txn.wall).await;
        out(format!(
            "  informational, not the goal's peer: raw etcd create-txn (the txn a lone create sends: 2 compares, 2 puts; under load the gateway sends concurrent creates together as one), {c:>2} concurrent: {} ops, {:.1} ops/s, p50 {}, p99 {}; gateway/txn p50 {:.2}x, p99 {:.2}x",
            txn.lat.len(),
            txn.rate(),
            ms(t50),
            ms(t99),
            ratio(gw50, t50),
            ratio(gw99, t99)
        ));
        out(cpu);

        // Informational: the same txn while a prefix watch drains its events, as the gateway's
        // watch cache does for every record (without prev_kv: the cache knows each previous
        // value itself).
        let prefix = format!("/bench/rawtxn/w{c}/");
        let mut stream = etcd_client
            .clone()
            .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
            .await
            .context("opening the raw etcd watch")?;
        let seen = Arc::new(AtomicUsize::new(0));
        let drain = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok(Some(r)) = stream.message().await {
                    seen.fetch_add(r.events().len(), Ordering::Relaxed);
                }
            })
        };
        closed_loop(c, warm, RUN_TIME_CAP, txn_op(format!("w{c}/warm"))).await;
        let before = procs.snapshot().await;
        let mut txw = closed_loop(
            c,
            if c == 1 { 1000 } else { 8000 },
            RUN_TIME_CAP,
            txn_op(format!("w{c}/run")),
        )
        .await;
        let cpu = procs.line(before, txw.lat.len(), txw.wall).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        drain.abort();
        let w50 = pct(&mut txw.lat, 50.0);
        let w99 = pct(&mut txw.lat, 99.0);
        out(format!(
            "  informational: the same create-txn with an etcd prefix watch (no prev_kv) open on its keys, like the gateway's cache, {c:>2} concurrent: {} ops, {:.1} ops/s, p50 {}, p99 {}; gateway/this p50 {:.2}x, p99 {:.2}x; the watch received {} events (warm-up included)",
            txw.lat.len(),
            txw.rate(),
            ms(w50),
            ms(w99),
            ratio(gw50, w50),
            ratio(gw99, w99),
            seen.load(Ordering::Relaxed)
        ));
        out(cpu);
    }

    // 3: watch fan-out.
    out("");
    out(format!("--- 3. Watch fan-out to {WATCHERS} watchers ---"));
    progress("watch fan-out");
    let fan = watch_fanout(&api, &ca, pad).await;
    if let Err(e) = fan {
        out(format!("  FAILED: {e:#}"));
    }

    // 4: list over 10,000 records.
    out("");
    out(format!(
        "--- 4. List over {LIST_RECORDS} records (namespace list10k) ---"
    ));
    progress("list benchmark");
    match list_bench(&api, &ca, pad, &procs).await {
        Ok(ok) => goal_lines.push((
            format!(
                "full list of {LIST_RECORDS} records p99 <= {} ms",
                LIST_P99_GOAL.as_millis()
            ),
            ok,
        )),
        Err(e) => {
            out(format!("  FAILED: {e:#}"));
            goal_lines.push((
                format!("full list of {LIST_RECORDS} records (not measured)"),
                false,
            ));
        }
    }

    out("");
    out("--- Goals ---");
    for (text, ok) in &goal_lines {
        out(format!("  [{}] {text}", pass(*ok)));
    }
    out(format!(
        "total benchmark time: {:.1} s",
        total.elapsed().as_secs_f64()
    ));
    drop(gateway);
    drop(etcd);
    Ok(())
}

/// What one watcher saw: (watcher, record name, when the chunk holding its ADDED line arrived).
type Seen = (usize, String, Instant);

/// Reads a watch stream, splitting it into lines, and reports every ADDED event's name.
async fn watcher(
    id: usize,
    resp: reqwest::Response,
    tx: mpsc::UnboundedSender<Seen>,
    other: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("watch stream")?;
        let at = Instant::now();
        let mut scanned = buf.len();
        buf.extend_from_slice(&chunk);
        let mut line_start = 0;
        while let Some(pos) = buf[scanned..].iter().position(|b| *b == b'\n') {
            let end = scanned + pos;
            let line = &buf[line_start..end];
            if !line.iter().all(u8::is_ascii_whitespace) {
                let ev: Value = serde_json::from_slice(line).context("watch line is not JSON")?;
                let name = ev
                    .pointer("/object/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if ev.get("type").and_then(Value::as_str) == Some("ADDED") {
                    if tx.send((id, name.to_string(), at)).is_err() {
                        return Ok(());
                    }
                } else {
                    other.fetch_add(1, Ordering::Relaxed);
                }
            }
            line_start = end + 1;
            scanned = line_start;
        }
        buf.drain(..line_start);
    }
    Ok(())
}

/// Waits until all watchers reported `name`; returns their arrival times (fewer on timeout).
async fn wait_seen(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    pending: &mut HashMap<String, Vec<Instant>>,
    name: &str,
    cap: Duration,
) -> Vec<Instant> {
    let deadline = tokio::time::Instant::now() + cap;
    while pending.get(name).map_or(0, Vec::len) < WATCHERS {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((_, n, at))) => pending.entry(n).or_default().push(at),
            Ok(None) | Err(_) => break,
        }
    }
    pending.remove(name).unwrap_or_default()
}

async fn watch_fanout(api: &Api, ca: &std::path::Path, pad: usize) -> anyhow::Result<()> {
    let ns = "fanout";
    let client = http_client(Some(ca))?;
    let (_, body) = api.get(&client, &api.collection(ns)).await?;
    let list: Value = serde_json::from_slice(&body)?;
    let rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .context("list without resourceVersion")?
        .to_string();
    // Watch streams live longer than testkit's 30 s request timeout: own client, no timeout.
    let pem = std::fs::read(ca)?;
    let watch_client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .build()?;
    let url = format!(
        "{}?watch=1&resourceVersion={rv}&allowWatchBookmarks=false",
        api.collection(ns)
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let other = Arc::new(AtomicUsize::new(0));
    let opened = Instant::now();
    let responses = futures::future::join_all((0..WATCHERS).map(|_| {
        watch_client
            .get(&url)
            .bearer_auth(api.token.as_str())
            .send()
    }))
    .await;
    let mut tasks = Vec::new();
    for (i, r) in responses.into_iter().enumerate() {
        let r = r.context("opening a watch")?;
        if !r.status().is_success() {
            bail!("watch answered {}", r.status());
        }
        tasks.push(tokio::spawn(watcher(i, r, tx.clone(), other.clone())));
    }
    drop(tx);
    let open_time = opened.elapsed();

    // Warm-up record: proves every stream delivers before anything is timed.
    let mut pending: HashMap<String, Vec<Instant>> = HashMap::new();
    let warm = serde_json::to_vec(&instance_body("warmup", pad))?;
    api.create(&client, ns, warm).await?;
    let seen = wait_seen(&mut rx, &mut pending, "warmup", Duration::from_secs(30)).await;
    if seen.len() < WATCHERS {
        bail!(
            "only {} of {WATCHERS} watchers saw the warm-up record within 30 s",
            seen.len()
        );
    }
    out(
        format!("  {WATCHERS} watch streams opened in {} (headers received), all {WATCHERS} saw the warm-up record", ms(open_time)),
    );

    let mut delays = Vec::with_capacity(FANOUT_RECORDS * WATCHERS);
    let mut first = Vec::with_capacity(FANOUT_RECORDS);
    let mut last = Vec::with_capacity(FANOUT_RECORDS);
    let mut creates = Vec::with_capacity(FANOUT_RECORDS);
    let mut missing = 0usize;
    for i in 0..FANOUT_RECORDS {
        let name = format!("fan-{i:04}");
        let body = serde_json::to_vec(&instance_body(&name, pad))?;
        let sent = Instant::now();
        creates.push(api.create(&client, ns, body).await?);
        let seen = wait_seen(&mut rx, &mut pending, &name, FANOUT_WAIT_CAP).await;
        missing += WATCHERS - seen.len().min(WATCHERS);
        let mut per: Vec<Duration> = seen
            .iter()
            .map(|t| t.saturating_duration_since(sent))
            .collect();
        per.sort_unstable();
        if let (Some(f), Some(l)) = (per.first(), per.last()) {
            first.push(*f);
            last.push(*l);
        }
        delays.extend(per);
    }
    for t in &tasks {
        t.abort();
    }
    out(format!("  {FANOUT_RECORDS} records created one at a time (next create after all watchers got the previous one or {}s passed)", FANOUT_WAIT_CAP.as_secs()));
    out("  delay = from just before the create request is sent until a watcher has read the chunk with its ADDED line");
    out(format!(
        "  delay over {} (record, watcher) pairs: p50 {}  p99 {}  max {}",
        delays.len(),
        ms(pct(&mut delays, 50.0)),
        ms(pct(&mut delays, 99.0)),
        ms(pct(&mut delays, 100.0))
    ));
    out(
        format!(
            "  per record: first watcher p50 {}, last (100th) watcher p50 {} p99 {}; create request itself p50 {} p99 {}",
            ms(pct(&mut first, 50.0)),
            ms(pct(&mut last, 50.0)),
            ms(pct(&mut last, 99.0)),
            ms(pct(&mut creates, 50.0)),
            ms(pct(&mut creates, 99.0))
        ),
    );
    out(format!(
        "  missing deliveries: {missing}; non-ADDED events received: {}",
        other.load(Ordering::Relaxed)
    ));
    Ok(())
}

fn count_items(body: &[u8]) -> anyhow::Result<(usize, Option<String>)> {
    let v: Value = serde_json::from_slice(body).context("list body is not JSON")?;
    let n = v
        .get("items")
        .and_then(Value::as_array)
        .map(Vec::len)
        .context("list body has no items array")?;
    let cont = v
        .pointer("/metadata/continue")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    Ok((n, cont))
}

/// Returns whether the full-list p99 goal was met.
async fn list_bench(
    api: &Api,
    ca: &std::path::Path,
    pad: usize,
    procs: &Procs,
) -> anyhow::Result<bool> {
    let ns = "list10k";
    let clients = Arc::new(
        (0..LIST_CREATORS)
            .map(|_| http_client(Some(ca)))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let op: Op = {
        let api = api.clone();
        let clients = clients.clone();
        Arc::new(move |w, i| {
            let api = api.clone();
            let client = clients[w % clients.len()].clone();
            async move {
                let body = serde_json::to_vec(&instance_body(&format!("rec-{i:05}"), pad))?;
                api.create(&client, ns, body).await
            }
            .boxed()
        })
    };
    let before = procs.snapshot().await;
    let mut run = closed_loop(LIST_CREATORS, LIST_RECORDS, LIST_CREATE_CAP, op).await;
    let create_cpu = procs.line(before, run.lat.len(), run.wall).await;
    out(
        format!(
            "  created {} records with {LIST_CREATORS} workers in {:.2} s ({:.1} creates/s, p50 {}, p99 {}){}",
            run.lat.len(),
            run.wall.as_secs_f64(),
            run.rate(),
            ms(pct(&mut run.lat, 50.0)),
            ms(pct(&mut run.lat, 99.0)),
            match &run.first_error {
                Some(e) => format!("; {} errors, first: {e}", run.errors),
                None => String::new(),
            }
        ),
    );
    out(create_cpu);
    if run.lat.len() != LIST_RECORDS {
        bail!(
            "only {} of {LIST_RECORDS} records were created",
            run.lat.len()
        );
    }

    let client = http_client(Some(ca))?;
    let full_url = api.collection(ns);
    // Full lists (no limit): served from the watch cache after a revision check.
    let (_, warm) = api.get(&client, &full_url).await?;
    let (n, _) = count_items(&warm)?;
    if n != LIST_RECORDS {
        bail!("warm-up list returned {n} items, not {LIST_RECORDS}");
    }
    let mut full = Vec::with_capacity(FULL_LISTS);
    let mut size = 0;
    let lists_started = Instant::now();
    let before = procs.snapshot().await;
    for _ in 0..FULL_LISTS {
        let (d, body) = api.get(&client, &full_url).await?;
        let (n, _) = count_items(&body)?;
        if n != LIST_RECORDS {
            bail!("a full list returned {n} items, not {LIST_RECORDS}");
        }
        size = body.len();
        full.push(d);
    }
    let list_cpu = procs
        .line(before, FULL_LISTS, lists_started.elapsed())
        .await;
    let f50 = pct(&mut full, 50.0);
    let f99 = pct(&mut full, 99.0);
    out(
        format!(
            "  full list (GET .../namespaces/list10k/instances, no limit) x{FULL_LISTS} after 1 warm-up: p50 {}  p99 {}  max {}; {size} bytes ({:.1} MB), every list had exactly {LIST_RECORDS} items",
            ms(f50),
            ms(f99),
            ms(pct(&mut full, 100.0)),
            size as f64 / 1e6
        ),
    );
    out(list_cpu);
    out("      (the bench client's CPU above includes parsing every list to count its items, outside the timed part)");

    // Informational: resourceVersion=0 skips the etcd revision read before the cache answers.
    let rv0_url = format!("{full_url}?resourceVersion=0");
    let mut rv0 = Vec::with_capacity(CACHE_LISTS);
    for _ in 0..CACHE_LISTS {
        let (d, body) = api.get(&client, &rv0_url).await?;
        let (n, _) = count_items(&body)?;
        if n != LIST_RECORDS {
            bail!("a resourceVersion=0 list returned {n} items, not {LIST_RECORDS}");
        }
        rv0.push(d);
    }
    out(
        format!(
            "  informational: full list with resourceVersion=0 (cache, no etcd read) x{CACHE_LISTS}: p50 {}  p99 {}",
            ms(pct(&mut rv0, 50.0)),
            ms(pct(&mut rv0, 99.0))
        ),
    );

    // Paginated walks: served from etcd at one revision, page by page.
    let mut walks = Vec::with_capacity(PAGED_WALKS);
    let mut pages = Vec::new();
    let mut first_pages = Vec::new();
    let mut fetch_sums = Vec::new();
    let mut pages_per_walk = 0;
    for w in 0..=PAGED_WALKS {
        let started = Instant::now();
        let mut url = format!("{full_url}?limit={PAGE_LIMIT}");
        let mut items = 0;
        let mut page_count = 0;
        let mut page_times = Vec::new();
        loop {
            let (d, body) = api.get(&client, &url).await?;
            page_times.push(d);
            let (n, cont) = count_items(&body)?;
            items += n;
            page_count += 1;
            if page_count > 2 * LIST_RECORDS / PAGE_LIMIT + 2 {
                bail!("pagination did not end after {page_count} pages");
            }
            match cont {
                Some(c) => url = format!("{full_url}?limit={PAGE_LIMIT}&continue={c}"),
                None => break,
            }
        }
        let took = started.elapsed();
        if items != LIST_RECORDS {
            bail!("a paginated walk returned {items} items, not {LIST_RECORDS}");
        }
        if w > 0 {
            walks.push(took);
            fetch_sums.push(page_times.iter().sum::<Duration>());
            first_pages.extend(page_times.first().copied());
            pages.extend(page_times);
            pages_per_walk = page_count;
        }
    }
    out(
        format!(
            "  paginated walk (limit={PAGE_LIMIT}, {pages_per_walk} pages, follow continue to the end) x{PAGED_WALKS} after 1 warm-up: p50 {}  p99 {} per walk (includes client-side JSON parsing of each page to read continue); per page p50 {} p99 {}; every walk had exactly {LIST_RECORDS} items",
            ms(pct(&mut walks, 50.0)),
            ms(pct(&mut walks, 99.0)),
            ms(pct(&mut pages, 50.0)),
            ms(pct(&mut pages, 99.0))
        ),
    );
    let slow: Vec<Duration> = pages
        .iter()
        .copied()
        .filter(|d| *d > Duration::from_millis(20))
        .collect();
    let slow_range = match (slow.iter().min(), slow.iter().max()) {
        (Some(lo), Some(hi)) => format!(" (those took {} to {})", ms(*lo), ms(*hi)),
        _ => String::new(),
    };
    out(format!(
        "      walk time spent waiting for pages (request sent -> page read): p50 {} p99 {}; first page of a walk p50 {} max {}; {} of {} pages took > 20 ms{slow_range}",
        ms(pct(&mut fetch_sums, 50.0)),
        ms(pct(&mut fetch_sums, 99.0)),
        ms(pct(&mut first_pages, 50.0)),
        ms(pct(&mut first_pages, 100.0)),
        slow.len(),
        pages.len()
    ));
    let ok = f99 <= LIST_P99_GOAL;
    out(format!(
        "  goal full list p99 <= {} ms: {} (p99 {}{})",
        LIST_P99_GOAL.as_millis(),
        pass(ok),
        ms(f99),
        if ok {
            String::new()
        } else {
            format!(", {:.2}x over", ratio(f99, LIST_P99_GOAL))
        }
    ));
    Ok(ok)
}
