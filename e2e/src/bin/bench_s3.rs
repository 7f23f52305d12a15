//! `bench-s3`: Karri's S3 REST API against moto's server and against the raw disk, behind
//! `make bench`.
//!
//! In one run on one machine it starts
//! - Karri: a real etcd and the real `api-gateway` from `$KARRI_BIN_DIR` (build it with
//!   `cargo build --release -p api-gateway` and point `KARRI_BIN_DIR` at `target/release`)
//!   through `karri-testkit`, and an account with an access key. S3 is served on the gateway's
//!   HTTPS listener, path-style; its blob files live where the gateway keeps them (testkit
//!   points `--s3-data-dir` into the gateway's temporary directory);
//! - moto: `<workspace>/.venv/bin/moto_server` (`moto[server]` from PyPI, installed by
//!   `make setup`) as a child process on a free loopback port, plain HTTP;
//!
//! creates bucket [`BUCKET`] on both and sends both the same path-style requests (`PUT /bucket`,
//! `PUT /bucket/key`, `GET /bucket/key`), SigV4-signed with the `aws-sigv4` crate (the AWS SDK
//! for Rust's signer) for service `s3` and each endpoint's region (`karri-1` for Karri,
//! `us-east-1` for moto), the payload signed (`x-amz-content-sha256` is the hex SHA-256 of the
//! body), over one keep-alive HTTP/1.1 `reqwest` client per endpoint (HTTPS trusting the
//! gateway's CA for Karri, plain HTTP for moto):
//!
//! 1. 4 KiB objects: PUT of new keys and GET of [`GET_OBJECTS`] stored keys, from 1 and 16
//!    concurrent clients ([`CONCURRENCY`]), each run after an untimed warm-up, for
//!    [`SMALL_CAP`] or [`SMALL_MAX_OPS`] operations, whichever comes first. Every object has
//!    its own pseudo-random content: a GET counts only if the body is byte for byte the
//!    object's, and after every PUT run up to [`VERIFY_SAMPLE`] of the written keys are read
//!    back and compared (a mismatch counts as an error of the run).
//! 2. 1 GiB objects (`BENCH_S3_LARGE_MIB` MiB to change the size), Karri against the raw disk:
//!    after a 64 MiB warm-up, [`LARGE_RUNS`] rounds of
//!    - Karri: PUT of the object, streamed in 1 MiB pieces with `Content-Length` and the
//!      SHA-256 computed before the clock starts; `sync` at once when it answered (timed);
//!      `posix_fadvise(DONTNEED)` of every file under the gateway's directory, so the next
//!      GET reads the blob from the disk (the blob is found there as the newest file of at
//!      least the object's size; if none is, the report says so and the GET goal is missed);
//!      a GET (cold); a second GET (warm: page cache);
//!    - raw: `write` of the same bytes in 1 MiB pieces to a new file in the same filesystem
//!      (the system temp directory, which also holds the gateway's directory) and `fsync`;
//!      `posix_fadvise(DONTNEED)`, a `read` of it in 1 MiB pieces (cold); a second read (warm).
//!
//!    Before every write (Karri's and raw) `sync` flushes what earlier phases left dirty. A
//!    Karri PUT counts until durable: the time of the PUT plus that of the `sync` after it
//!    (near zero when the gateway synced before answering), against the raw write including
//!    its `fsync`. Every GET and every raw read compares each byte against the
//!    pattern as it arrives (the object is a 1 MiB pseudo-random block, each MiB stamped with
//!    its index), so neither side can report speed for wrong bytes; the reported figure is the
//!    median of the rounds.
//!
//! Before 2., moto gets the large object as well (for the Karri/moto ratios only; the goal is
//! against the disk; a failure there is reported, not fatal): a 64 MiB PUT and GET first, then
//! the full size if that is expected to take at most [`MOTO_LARGE_BUDGET`], else the full size
//! halved until it is (the report says which size it measured); moto is stopped before 2.
//!
//! It prints ops/s and p50/p99 latency of every small-object run with the ratios Karri/moto,
//! MB/s (10^6 bytes per second) of the large transfers with the ratios to the raw disk, and
//! PASS/MISS against the goals: Karri at least 20x moto's ops/s on 4 KiB PUT and GET at 1 and
//! 16 clients, and a 1 GiB PUT and GET at least 80 % of the raw sequential write and (cold)
//! read. Informational rows show the CPU time the gateway, etcd, moto and this client spent
//! per operation (`/proc/<pid>/stat`).
//!
//! Before the goals it measures floors, each part alone from 1 client on the same machine
//! ([`FLOOR_OPS`] after [`FLOOR_WARM_OPS`] untimed): a 4 KiB append plus `fdatasync` to the
//! raw file's filesystem (the least a durable write costs) and a blob published as the
//! gateway's store does it; an object's index commit and index read sent straight to etcd in
//! the gateway's shapes ([`index_commit_txn`], [`index_read_txn`]); and MD5 over the large
//! object's size in memory on one core (a single PUT's ETag). Each is set beside what the goal
//! needs: the 1-client ops/s it allows against moto's, and MD5's MB/s against the raw write.
//!
//! A small operation's latency runs from just before it is signed (signing hashes the body)
//! until its whole response was read; only 2xx answers count, anything else is an error
//! (counted and shown). Percentiles are exact nearest-rank over all samples. All traffic goes
//! to 127.0.0.1; etcd, the gateway and moto are killed when their handles are dropped at the
//! end of `main` (or on an early error return), and the raw file's directory is removed. The
//! report goes to stdout, progress to stderr.

use karri_e2e::closed_loop::{closed_loop, ms, Op, Procs, Run};
use karri_e2e::moto::Moto;
use karri_e2e::raw_etcd::{index_commit_txn, index_read_txn, timed_txn};
use karri_e2e::report::{self, command_line, cpu_model, loadavg, out, pass};
use md5::Md5;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use aws_sigv4::http_request::SignableBody;
use futures::FutureExt;
use karri_e2e::s3::Signer;
use karri_testkit::{workspace_root, Etcd, Gateway, Tokens};
use reqwest::Method;
use sha2::{Digest, Sha256};

/// The bucket made on both sides.
const BUCKET: &str = "karri-bench";
/// Regions the two endpoints are signed for.
const KARRI_REGION: &str = "karri-1";
const MOTO_REGION: &str = "us-east-1";
/// Size of a small object.
const SMALL: usize = 4096;
/// Concurrent clients of the compared runs.
const CONCURRENCY: [usize; 2] = [1, 16];
/// A small-object run: time cap and operation cap.
const SMALL_CAP: Duration = Duration::from_secs(5);
const SMALL_MAX_OPS: usize = 50_000;
/// Untimed operations before every small-object run (at least 8 per client).
const WARM_OPS: usize = 200;
/// Objects stored for the GET runs (read round-robin).
const GET_OBJECTS: usize = 1000;
/// Keys of a PUT run read back and compared afterwards.
const VERIFY_SAMPLE: usize = 100;
/// Piece of a large transfer (and the period of its pattern).
const CHUNK: usize = 1 << 20;
/// Large object size in MiB unless `BENCH_S3_LARGE_MIB` says otherwise.
const LARGE_MIB: u64 = 1024;
/// Measured rounds of the large-object comparison (the median is reported).
const LARGE_RUNS: usize = 3;
/// Size of the untimed large warm-up and of moto's probe, MiB.
const LARGE_WARM_MIB: u64 = 64;
/// The longest moto's large PUT + GET may be expected to take.
const MOTO_LARGE_BUDGET: Duration = Duration::from_secs(120);
/// Per-request timeout (a 1 GiB transfer to moto takes a while).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// How long moto and Karri get to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Goals.
const SPEEDUP_GOAL: f64 = 20.0;
const DISK_GOAL: f64 = 0.8;
/// Seeds of the object contents.
const GET_SEED: u64 = 0x6765_7400;
const PUT_SEED: u64 = 0x7075_7400;
const WARM_SEED: u64 = 0x7761_726d;
const PATTERN_SEED: u64 = 0x6c61_7267_6500;
/// Stamped into every MiB of a large object after the MiB's index.
const PATTERN_TAG: u64 = 0x4b41_5252_4953_3342;

/// One S3 endpoint: where, and who signs (with the keep-alive client).
struct Endpoint {
    name: &'static str,
    base: String,
    signer: Signer,
}

impl Endpoint {
    fn new(
        name: &'static str,
        base: String,
        region: &'static str,
        access_key_id: &str,
        secret: &str,
        ca: Option<&Path>,
    ) -> anyhow::Result<Endpoint> {
        Ok(Endpoint {
            name,
            base,
            signer: Signer::new(region, access_key_id, secret, ca, REQUEST_TIMEOUT)?,
        })
    }

    /// `<base>/<bucket>` or `<base>/<bucket>/<key>` (keys here need no percent-encoding).
    fn url(&self, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("{}/{BUCKET}/{k}", self.base),
            None => format!("{}/{BUCKET}", self.base),
        }
    }

    /// A signed request (see [`Signer::request`]).
    fn request(
        &self,
        method: Method,
        url: &str,
        body: SignableBody<'_>,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        self.signer.request(method, url, body)
    }

    /// The whole body of a 200 answer; an error naming `what` otherwise.
    async fn read_ok(&self, what: &str, resp: reqwest::Response) -> anyhow::Result<Vec<u8>> {
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("{} {what}: reading the response", self.name))?;
        if !status.is_success() {
            bail!(
                "{} {what}: HTTP {status}: {}",
                self.name,
                String::from_utf8_lossy(&body[..body.len().min(400)])
            );
        }
        Ok(body.to_vec())
    }

    /// `PUT /bucket` (empty body).
    async fn create_bucket(&self) -> anyhow::Result<()> {
        let url = self.url(None);
        let resp = self
            .request(Method::PUT, &url, SignableBody::Bytes(&[]))?
            .send()
            .await
            .with_context(|| format!("{} PUT /{BUCKET}", self.name))?;
        let status = resp.status();
        match self.read_ok(&format!("PUT /{BUCKET}"), resp).await {
            Ok(_) => Ok(()),
            // A retry after an answer that got lost.
            Err(e) if status.as_u16() == 409 && format!("{e}").contains("AlreadyOwnedByYou") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `PUT /bucket/key` of `body`.
    async fn put(&self, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
        let url = self.url(Some(key));
        let resp = self
            .request(Method::PUT, &url, SignableBody::Bytes(&body))?
            .body(body)
            .send()
            .await
            .with_context(|| format!("{} PUT {key}", self.name))?;
        self.read_ok(&format!("PUT {key}"), resp).await?;
        Ok(())
    }

    /// `GET /bucket/key`, which must answer exactly `expect`.
    async fn get_expect(&self, key: &str, expect: &[u8]) -> anyhow::Result<()> {
        let url = self.url(Some(key));
        let resp = self
            .request(Method::GET, &url, SignableBody::Bytes(&[]))?
            .send()
            .await
            .with_context(|| format!("{} GET {key}", self.name))?;
        let body = self.read_ok(&format!("GET {key}"), resp).await?;
        if body != expect {
            bail!(
                "{} GET {key}: wrong body ({} bytes, expected {} bytes{})",
                self.name,
                body.len(),
                expect.len(),
                if body.len() == expect.len() {
                    ", different content"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// `PUT /bucket/key` of `size` bytes of `pattern`, streamed in 1 MiB pieces with
    /// `Content-Length` and the payload hash `sha256` (hex). Returns the time from signing
    /// until the answer was read.
    async fn put_large(
        &self,
        key: &str,
        pattern: &Arc<Pattern>,
        size: u64,
        sha256: &str,
    ) -> anyhow::Result<Duration> {
        self.put_large_as(
            key,
            pattern,
            size,
            SignableBody::Precomputed(sha256.to_string()),
        )
        .await
    }

    /// [`Endpoint::put_large`] with the payload signed as `payload` says (the SHA-256, or
    /// `UNSIGNED-PAYLOAD` as awscli and boto3 send over HTTPS).
    async fn put_large_as(
        &self,
        key: &str,
        pattern: &Arc<Pattern>,
        size: u64,
        payload: SignableBody<'static>,
    ) -> anyhow::Result<Duration> {
        let url = self.url(Some(key));
        let p = pattern.clone();
        let pieces = futures::stream::iter(
            (0..chunks(size)).map(move |k| Ok::<Vec<u8>, std::io::Error>(p.chunk(k, size))),
        );
        let started = Instant::now();
        let resp = self
            .request(Method::PUT, &url, payload)?
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(pieces))
            .send()
            .await
            .with_context(|| format!("{} PUT {key} ({size} bytes)", self.name))?;
        self.read_ok(&format!("PUT {key}"), resp).await?;
        Ok(started.elapsed())
    }

    /// `GET /bucket/key`, whose body must be `size` bytes of `pattern` (each piece compared as
    /// it arrives). Returns the time from signing until the last byte was read and compared.
    async fn get_large(&self, key: &str, pattern: &Pattern, size: u64) -> anyhow::Result<Duration> {
        let url = self.url(Some(key));
        let started = Instant::now();
        let mut resp = self
            .request(Method::GET, &url, SignableBody::Bytes(&[]))?
            .send()
            .await
            .with_context(|| format!("{} GET {key}", self.name))?;
        if !resp.status().is_success() {
            self.read_ok(&format!("GET {key}"), resp).await?;
            bail!("{} GET {key}: not a success", self.name);
        }
        let mut at = 0u64;
        while let Some(piece) = resp
            .chunk()
            .await
            .with_context(|| format!("{} GET {key}: reading the body at byte {at}", self.name))?
        {
            let end = at + piece.len() as u64;
            ensure!(
                end <= size,
                "{} GET {key}: more than the {size} bytes stored",
                self.name
            );
            ensure!(
                pattern.matches(at, &piece),
                "{} GET {key}: wrong bytes in [{at}, {end})",
                self.name
            );
            at = end;
        }
        ensure!(
            at == size,
            "{} GET {key}: {at} bytes, expected {size}",
            self.name
        );
        Ok(started.elapsed())
    }
}

/// Pieces of `CHUNK` bytes (the last one shorter) in `size` bytes.
fn chunks(size: u64) -> u64 {
    size.div_ceil(CHUNK as u64)
}

/// splitmix64: a fast, well-mixed pseudo-random sequence.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` pseudo-random bytes from `seed`.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The content of small object `index` of the set `seed`: 4 KiB of its own.
fn small_body(seed: u64, index: usize) -> Vec<u8> {
    random_bytes(seed.rotate_left(32) ^ index as u64, SMALL)
}

/// The content of a large object: a 1 MiB pseudo-random block repeated, the first 16 bytes of
/// every MiB replaced by the MiB's index and [`PATTERN_TAG`], so a piece at a wrong offset
/// does not match.
struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    fn new() -> Pattern {
        Pattern {
            base: random_bytes(PATTERN_SEED, CHUNK),
        }
    }

    fn stamp(k: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&k.to_le_bytes());
        h[8..].copy_from_slice(&PATTERN_TAG.to_le_bytes());
        h
    }

    /// Piece `k` of an object of `size` bytes into `buf`.
    fn fill(&self, k: u64, size: u64, buf: &mut Vec<u8>) {
        let n = (size - k * CHUNK as u64).min(CHUNK as u64) as usize;
        buf.clear();
        buf.extend_from_slice(&self.base[..n]);
        let m = n.min(16);
        buf[..m].copy_from_slice(&Self::stamp(k)[..m]);
    }

    fn chunk(&self, k: u64, size: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(CHUNK);
        self.fill(k, size, &mut v);
        v
    }

    /// Whether `data` is what the object holds from byte `offset` on.
    fn matches(&self, offset: u64, data: &[u8]) -> bool {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let k = pos / CHUNK as u64;
            let within = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - within).min(rest.len());
            let (seg, tail) = rest.split_at(n);
            let stamped = 16usize.saturating_sub(within).min(n);
            let stamp = Self::stamp(k);
            let stamp_part = stamp.get(within..within + stamped).unwrap_or(&[]);
            if seg[..stamped] != *stamp_part
                || seg[stamped..] != self.base[within + stamped..within + n]
            {
                return false;
            }
            pos += n as u64;
            rest = tail;
        }
        true
    }

    /// Hex SHA-256 of the first `size` bytes.
    fn sha256(&self, size: u64) -> String {
        let mut h = Sha256::new();
        let mut buf = Vec::with_capacity(CHUNK);
        for k in 0..chunks(size) {
            self.fill(k, size, &mut buf);
            h.update(&buf);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// PUT of 4 KiB object `i` of set `seed` as `<prefix>/<i>`.
fn put_op(ep: &Arc<Endpoint>, prefix: &str, seed: u64) -> Op {
    let ep = ep.clone();
    let prefix: Arc<str> = prefix.into();
    Arc::new(move |i| {
        let ep = ep.clone();
        let prefix = prefix.clone();
        async move {
            let body = small_body(seed, i);
            let key = format!("{prefix}/{i:07}");
            let started = Instant::now();
            ep.put(&key, body).await?;
            Ok((started.elapsed(), 0))
        }
        .boxed()
    })
}

/// GET of stored object `get/<i mod GET_OBJECTS>`, compared with its content.
fn get_op(ep: &Arc<Endpoint>) -> Op {
    let ep = ep.clone();
    Arc::new(move |i| {
        let ep = ep.clone();
        async move {
            let j = i % GET_OBJECTS;
            let expect = small_body(GET_SEED, j);
            let key = format!("get/{j:07}");
            let started = Instant::now();
            ep.get_expect(&key, &expect).await?;
            Ok((started.elapsed(), expect.len()))
        }
        .boxed()
    })
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench-s3] {}", msg.as_ref());
}

/// A compared small-object row: the ops/s and p99 ratios, and whether the runs were clean.
struct Compared {
    label: String,
    kind: Kind,
    concurrency: usize,
    moto_rate: f64,
    ratio: f64,
    p99_ratio: f64,
    clean: bool,
}

impl Compared {
    fn met(&self) -> bool {
        self.clean && self.ratio >= SPEEDUP_GOAL
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Put,
    Get,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Put => "PUT",
            Kind::Get => "GET",
        }
    }
}

/// Reads back up to [`VERIFY_SAMPLE`] keys a PUT run wrote (spread over them) and counts every
/// mismatch as an error of the run.
async fn verify_puts(ep: &Endpoint, run: &mut Run, prefix: &str, seed: u64) {
    let n = run.done.len();
    let step = n.div_ceil(VERIFY_SAMPLE).max(1);
    let picked: Vec<usize> = run.done.iter().copied().step_by(step).collect();
    for i in picked {
        let key = format!("{prefix}/{i:07}");
        if let Err(e) = ep.get_expect(&key, &small_body(seed, i)).await {
            run.error(format!("read-back: {e:#}"));
        }
    }
}

/// 4 KiB `kind` from `concurrency` clients on both endpoints (Karri first), each after an
/// untimed warm-up; prints the row and returns the ratios.
async fn compare_small(
    procs: &Procs,
    endpoints: [&Arc<Endpoint>; 2],
    kind: Kind,
    concurrency: usize,
) -> anyhow::Result<Compared> {
    let mut runs = Vec::new();
    for ep in endpoints {
        let warm_ops = WARM_OPS.max(8 * concurrency);
        let warm_op = match kind {
            Kind::Put => put_op(ep, &format!("warm-{concurrency}"), WARM_SEED),
            Kind::Get => get_op(ep),
        };
        let warm = closed_loop(procs, concurrency, warm_ops, READY_DEADLINE, warm_op).await;
        if let Some(e) = warm.first_error {
            bail!(
                "{} {} warm-up: {} errors, first: {e}",
                ep.name,
                kind.name(),
                warm.errors
            );
        }
        progress(format!(
            "4 KiB {}, {concurrency} client(s), {}: up to {SMALL_MAX_OPS} ops or {SMALL_CAP:?}",
            kind.name(),
            ep.name
        ));
        let prefix = format!("put-{concurrency}");
        let seed = PUT_SEED + concurrency as u64;
        let op = match kind {
            Kind::Put => put_op(ep, &prefix, seed),
            Kind::Get => get_op(ep),
        };
        let mut run = closed_loop(procs, concurrency, SMALL_MAX_OPS, SMALL_CAP, op).await;
        if kind == Kind::Put {
            verify_puts(ep, &mut run, &prefix, seed).await;
        }
        if let Some(e) = &run.first_error {
            progress(format!("{}: {} errors, first: {e}", ep.name, run.errors));
        }
        runs.push(run);
    }
    let [mut k, mut m]: [Run; 2] = runs
        .try_into()
        .map_err(|_| anyhow::anyhow!("two runs expected"))?;
    let ratio = k.rate() / m.rate().max(1e-9);
    let p99_ratio = k.p(99.0).as_secs_f64() / m.p(99.0).as_secs_f64().max(1e-12);
    let label = format!("{} 4 KiB", kind.name());
    out(format!(
        "{label:<12} {concurrency:>3} | {} | {} | {:>8.1} {:>8.3}",
        k.cells(8),
        m.cells(8),
        ratio,
        p99_ratio
    ));
    out(k.cpu_line("Karri", "op"));
    out(m.cpu_line("moto", "op"));
    for (name, run) in [("Karri", &k), ("moto", &m)] {
        if let Some(e) = &run.first_error {
            out(format!(
                "      {name} errors: {}, first: {}",
                run.errors,
                e.chars().take(300).collect::<String>()
            ));
        }
    }
    Ok(Compared {
        label: format!("{label}, {concurrency} client(s)"),
        kind,
        concurrency,
        moto_rate: m.rate(),
        ratio,
        p99_ratio,
        clean: k.clean() && m.clean(),
    })
}

/// Untimed operations before a floor is timed, and timed ones.
const FLOOR_WARM_OPS: usize = 50;
const FLOOR_OPS: usize = 1000;
/// Where the etcd floors write (no watch of the gateway's follows it).
const FLOOR_PREFIX: &str = "/bench/s3-floor/";

/// The mean of `lat` (zero when empty).
fn mean(lat: &[Duration]) -> Duration {
    lat.iter().sum::<Duration>() / u32::try_from(lat.len().max(1)).unwrap_or(u32::MAX)
}

/// Mean, p50 and p99 of `lat` as a row's cells.
fn floor_cells(lat: &mut [Duration]) -> String {
    format!(
        "mean {:>6} ms  p50 {:>6} ms  p99 {:>6} ms  (n={})",
        ms(mean(lat)),
        ms(report::pct(lat, 50.0)),
        ms(report::pct(lat, 99.0)),
        lat.len()
    )
}

/// Ops/s of one client whose ops take `lat` on average and nothing else.
fn one_client_rate(lat: &[Duration]) -> f64 {
    1.0 / mean(lat).as_secs_f64().max(1e-12)
}

/// Times `FLOOR_OPS` calls of `op` after `FLOOR_WARM_OPS` untimed ones, on this thread.
fn time_blocking(mut op: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<Vec<Duration>> {
    for i in 0..FLOOR_WARM_OPS {
        op(i)?;
    }
    let mut lat = Vec::with_capacity(FLOOR_OPS);
    for i in FLOOR_WARM_OPS..FLOOR_WARM_OPS + FLOOR_OPS {
        let t = Instant::now();
        op(i)?;
        lat.push(t.elapsed());
    }
    Ok(lat)
}

/// The least a durable 4 KiB write costs on `dir`'s disk: appending it to one file and
/// `fdatasync`ing, as a write-ahead log would.
fn disk_append(dir: &Path) -> anyhow::Result<Vec<Duration>> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("floor-append");
    let file = File::create(&path).context("creating the append floor's file")?;
    let body = small_body(PUT_SEED, 0);
    let lat = time_blocking(|i| {
        file.write_all_at(&body, (i * SMALL) as u64)?;
        file.sync_data()?;
        Ok(())
    });
    std::fs::remove_file(&path).context("removing the append floor's file")?;
    lat
}

/// What publishing a 4 KiB blob costs on `dir`'s disk, done as the gateway's blob store does it:
/// a new file written and `fdatasync`ed, renamed into place, the directory `fsync`ed.
fn disk_publish(dir: &Path) -> anyhow::Result<Vec<Duration>> {
    let floor = dir.join("floor-publish");
    std::fs::create_dir_all(&floor).context("creating the publish floor's directory")?;
    let body = small_body(PUT_SEED, 0);
    let lat = time_blocking(|i| {
        let tmp = floor.join(format!("tmp-{i}"));
        let mut file = File::create(&tmp)?;
        file.write_all(&body)?;
        file.sync_data()?;
        drop(file);
        std::fs::rename(&tmp, floor.join(format!("blob-{i}")))?;
        File::open(&floor)?.sync_all()?;
        Ok(())
    });
    std::fs::remove_dir_all(&floor).context("removing the publish floor's directory")?;
    lat
}

/// MB/s of MD5 (the ETag AWS computes for a single PUT, with the `md-5` crate the gateway
/// uses) over `size` bytes in memory, on this thread.
fn md5_rate(pattern: &Pattern, size: u64) -> f64 {
    let t = Instant::now();
    let mut md5 = Md5::new();
    for _ in 0..chunks(size) {
        md5.update(&pattern.base);
    }
    std::hint::black_box(md5.finalize());
    mbps(size, t.elapsed())
}

/// The index commit and the index read of one object, sent straight to etcd from 1 client.
/// Unlike the gateway's keys (under `/karri/`), these have no watch of the gateway's cache on
/// them, which costs etcd a little per write.
async fn etcd_floors(procs: &Procs, etcd: &Etcd) -> anyhow::Result<(Run, Run)> {
    let client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .context("connecting to etcd")?;
    let mut kv = client.kv_client();
    let bucket: Arc<str> = format!("{FLOOR_PREFIX}buckets/{BUCKET}").into();
    kv.put(bucket.as_ref(), r#"{"owner":"floor"}"#, None)
        .await
        .context("writing the floor's bucket record")?;
    // About what the index holds for a 4 KiB object.
    let entry: Arc<[u8]> = format!(
        r#"{{"blob":"{:032x}","size":{SMALL},"etag":"{:032x}","modified":"2026-11-27T00:00:00Z","contentType":"application/octet-stream","owner":"000000000000"}}"#,
        1u128, 2u128
    )
    .into_bytes()
    .into();
    let object = |i: usize| format!("{FLOOR_PREFIX}objects/{BUCKET}/{:07}", i % GET_OBJECTS);
    let commit: Op = {
        let (client, bucket, entry) = (client.clone(), bucket.clone(), entry.clone());
        Arc::new(move |i| {
            let mut kv = client.kv_client();
            let txn = index_commit_txn(
                bucket.to_string(),
                format!("{FLOOR_PREFIX}deleting/{BUCKET}"),
                object(i),
                entry.to_vec(),
            );
            async move { Ok((timed_txn(&mut kv, txn).await?, 0)) }.boxed()
        })
    };
    let read: Op = {
        let (client, bucket) = (client.clone(), bucket.clone());
        Arc::new(move |i| {
            let mut kv = client.kv_client();
            let txn = index_read_txn(bucket.to_string(), object(i));
            async move { Ok((timed_txn(&mut kv, txn).await?, 0)) }.boxed()
        })
    };
    let mut runs = Vec::new();
    for op in [commit, read] {
        let warm = closed_loop(procs, 1, FLOOR_WARM_OPS, READY_DEADLINE, op.clone()).await;
        if let Some(e) = warm.first_error {
            bail!("the warm-up failed: {e}");
        }
        let run = closed_loop(procs, 1, FLOOR_OPS, SMALL_CAP, op).await;
        if let Some(e) = &run.first_error {
            bail!("{} errors, first: {e}", run.errors);
        }
        runs.push(run);
    }
    kv.delete(
        FLOOR_PREFIX,
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .context("deleting the floor's keys")?;
    let [commit, read]: [Run; 2] = runs
        .try_into()
        .map_err(|_| anyhow::anyhow!("two runs expected"))?;
    Ok((commit, read))
}

/// Prints what each part alone allows (disk, etcd, MD5), measured in this run, beside moto's
/// 1-client rates and the raw write the goals compare with.
fn report_floors(
    disk: &anyhow::Result<(Vec<Duration>, Vec<Duration>)>,
    etcd: &mut anyhow::Result<(Run, Run)>,
    md5: f64,
    write: f64,
    compared: &[Compared],
    large_mib: u64,
) {
    let moto = |kind: Kind| {
        compared
            .iter()
            .find(|c| c.kind == kind && c.concurrency == 1)
            .map(|c| c.moto_rate)
    };
    let versus = |rate: f64, kind: Kind| {
        match moto(kind) {
        Some(m) => format!(
            "at most {rate:.0} ops/s from 1 client = x{:.1} moto's 1-client {} (goal x{SPEEDUP_GOAL:.0})",
            rate / m.max(1e-9),
            kind.name()
        ),
        None => format!("at most {rate:.0} ops/s from 1 client"),
    }
    };
    out("");
    out("--- floors: one part alone, measured in this run (informational) ---");
    let mut publish_mean = None;
    match disk {
        Ok((append, publish)) => {
            let (mut append, mut publish) = (append.clone(), publish.clone());
            out(format!(
                "{:<58}: {}",
                "disk: append 4 KiB to one file + fdatasync",
                floor_cells(&mut append)
            ));
            out(format!(
                "      the least any durable PUT pays: {}",
                versus(one_client_rate(&append), Kind::Put)
            ));
            out(format!(
                "{:<58}: {}",
                "disk: publish a 4 KiB blob as Karri does (write, fdatasync, rename, fsync dir)",
                floor_cells(&mut publish)
            ));
            publish_mean = Some(mean(&publish));
        }
        Err(e) => out(format!("disk floors FAILED: {e:#}")),
    }
    match etcd {
        Ok((commit, read)) => {
            out(format!(
                "{:<58}: {}",
                "etcd: an object's index commit (3 compares, 1 put)",
                floor_cells(&mut commit.lat)
            ));
            out(format!(
                "{:<58}: {}",
                "etcd: an object's index read (2 keys, linearizable)",
                floor_cells(&mut read.lat)
            ));
            if let Some(publish) = publish_mean {
                let both = publish + mean(&commit.lat);
                out(format!(
                    "      a Karri PUT publishes its blob, then commits its entry: {}",
                    versus(1.0 / both.as_secs_f64().max(1e-12), Kind::Put)
                ));
            }
            out(format!(
                "      a Karri GET reads its entry (strong read-after-write across gateways): {}",
                versus(one_client_rate(&read.lat), Kind::Get)
            ));
        }
        Err(e) => out(format!("etcd floors FAILED: {e:#}")),
    }
    out(format!(
        "{:<58}: {md5:.1} MB/s = {:.0} % of the raw write + fsync (goal {:.0} %)",
        format!("MD5 of {large_mib} MiB in memory, one core (a PUT's ETag)"),
        md5 / write.max(1e-9) * 100.0,
        DISK_GOAL * 100.0
    ));
    out("      a single PUT is answered with the MD5 of all its bytes, which one core computes in order");
}

/// Every regular file under `dir` (not following symbolic links), with its size.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                todo.push(entry.path());
            } else if meta.is_file() {
                found.push((entry.path(), meta.len()));
            }
        }
    }
    found
}

/// The newest file under `dir` of at least `size` bytes: where the gateway put the object.
fn find_blob(dir: &Path, size: u64) -> Option<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|(_, len)| *len >= size)
        .filter_map(|(p, _)| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

/// `fsync`s `path` and drops its pages from the page cache (`posix_fadvise(DONTNEED)`, which
/// drops clean pages only, hence the `fsync`).
fn drop_cache(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("posix_fadvise of {}", path.display()))?;
    Ok(())
}

/// Drops every file under `dir` from the page cache after a `sync` (no `fsync` per file: the
/// small-object runs leave many files there); files that vanish meanwhile are skipped.
fn drop_cache_under(dir: &Path) {
    sync_all_filesystems();
    for (path, _) in files_under(dir) {
        if let Ok(f) = File::open(&path) {
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
}

/// Flushes every filesystem's dirty pages (`sync`), so a timed write does not pay for earlier
/// ones.
fn sync_all_filesystems() {
    let _ = Command::new("sync").status();
}

/// Writes `size` bytes of `pattern` to a new file at `path` in 1 MiB pieces and `fsync`s it:
/// the time from creating the file until the `fsync` returned.
fn raw_write(path: &Path, pattern: &Pattern, size: u64) -> anyhow::Result<Duration> {
    let _ = std::fs::remove_file(path);
    let mut buf = Vec::with_capacity(CHUNK);
    let started = Instant::now();
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for k in 0..chunks(size) {
        pattern.fill(k, size, &mut buf);
        f.write_all(&buf)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    Ok(started.elapsed())
}

/// Reads the file at `path` in 1 MiB pieces, comparing each with `pattern`: the time from
/// opening it until the last byte was compared.
fn raw_read(path: &Path, pattern: &Pattern, size: u64) -> anyhow::Result<Duration> {
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut at = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        let end = at + n as u64;
        ensure!(
            end <= size && pattern.matches(at, &buf[..n]),
            "{}: wrong bytes in [{at}, {end})",
            path.display()
        );
        at = end;
    }
    ensure!(
        at == size,
        "{}: {at} bytes, expected {size}",
        path.display()
    );
    Ok(started.elapsed())
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking task panicked")?
}

/// One round of the large-object comparison.
#[derive(Clone, Copy)]
struct LargeRound {
    /// Karri's PUT, and the `sync` right after it answered.
    put: Duration,
    sync_after: Duration,
    /// Karri's PUT with `UNSIGNED-PAYLOAD` (no SHA-256 for the server to check), and its sync.
    put_unsigned: Duration,
    sync_after_unsigned: Duration,
    get_cold: Duration,
    get_warm: Duration,
    write: Duration,
    read_cold: Duration,
    read_warm: Duration,
}

impl LargeRound {
    /// Karri's PUT until durable: the PUT and the `sync` after it.
    fn put_durable(&self) -> Duration {
        self.put + self.sync_after
    }

    /// The unsigned-payload PUT until durable.
    fn put_unsigned_durable(&self) -> Duration {
        self.put_unsigned + self.sync_after_unsigned
    }
}

/// One round of Karri against the raw disk with `size` bytes; `raw` is the raw file's path.
async fn large_round(
    karri: &Endpoint,
    gateway_dir: &Path,
    raw: &Path,
    pattern: &Arc<Pattern>,
    size: u64,
    sha256: &str,
    key: &str,
) -> anyhow::Result<(LargeRound, Option<PathBuf>)> {
    blocking(|| {
        sync_all_filesystems();
        Ok(())
    })
    .await?;
    let put = karri.put_large(key, pattern, size, sha256).await?;
    let dir = gateway_dir.to_path_buf();
    let (sync_after, blob) = blocking(move || {
        let started = Instant::now();
        sync_all_filesystems();
        let sync_after = started.elapsed();
        let blob = find_blob(&dir, size);
        drop_cache_under(&dir);
        Ok((sync_after, blob))
    })
    .await?;
    let get_cold = karri.get_large(key, pattern, size).await?;
    let get_warm = karri.get_large(key, pattern, size).await?;
    let unsigned_key = format!("{key}-unsigned");
    let put_unsigned = karri
        .put_large_as(&unsigned_key, pattern, size, SignableBody::UnsignedPayload)
        .await?;
    let sync_after_unsigned = blocking(|| {
        let started = Instant::now();
        sync_all_filesystems();
        Ok(started.elapsed())
    })
    .await?;

    let (path, p) = (raw.to_path_buf(), pattern.clone());
    let (write, read_cold, read_warm) = blocking(move || {
        sync_all_filesystems();
        let write = raw_write(&path, &p, size)?;
        drop_cache(&path)?;
        let read_cold = raw_read(&path, &p, size)?;
        let read_warm = raw_read(&path, &p, size)?;
        Ok((write, read_cold, read_warm))
    })
    .await?;
    Ok((
        LargeRound {
            put,
            sync_after,
            put_unsigned,
            sync_after_unsigned,
            get_cold,
            get_warm,
            write,
            read_cold,
            read_warm,
        },
        blob,
    ))
}

/// MB/s (10^6 bytes per second) of `size` bytes in `d`.
fn mbps(size: u64, d: Duration) -> f64 {
    size as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

/// The median of `f` over `rounds`.
fn median(rounds: &[LargeRound], f: impl Fn(&LargeRound) -> Duration) -> Duration {
    let mut v: Vec<Duration> = rounds.iter().map(f).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A large-object table row: label, MB/s of the median, and each round's MB/s.
fn large_row(
    label: &str,
    size: u64,
    rounds: &[LargeRound],
    f: impl Fn(&LargeRound) -> Duration,
) -> f64 {
    let m = mbps(size, median(rounds, &f));
    let each: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.0}", mbps(size, f(r))))
        .collect();
    out(format!(
        "{label:<40} {m:>9.1} {:>9.2}   {}",
        median(rounds, &f).as_secs_f64(),
        each.join(" ")
    ));
    m
}

/// What moto did with a large object.
struct MotoLarge {
    size: u64,
    put: Duration,
    get: Duration,
    /// Seconds per byte of PUT + GET in the probe.
    per_byte: f64,
}

/// A PUT and GET of `probe` bytes on moto, then of `large` bytes (hash `large_sha`) if that
/// is expected to take at most [`MOTO_LARGE_BUDGET`], else of `large` halved until it is (at
/// least `probe` bytes).
async fn moto_large(
    moto: &Endpoint,
    pattern: &Arc<Pattern>,
    probe: u64,
    large: u64,
    large_sha: &str,
) -> anyhow::Result<MotoLarge> {
    progress(format!(
        "moto: {} MiB PUT and GET to size its large-object run",
        probe >> 20
    ));
    let probe_put = moto
        .put_large("large-probe", pattern, probe, &pattern.sha256(probe))
        .await?;
    let probe_get = moto.get_large("large-probe", pattern, probe).await?;
    let per_byte = (probe_put + probe_get).as_secs_f64() / probe as f64;
    let mut size = large;
    while size > probe && per_byte * size as f64 > MOTO_LARGE_BUDGET.as_secs_f64() {
        size /= 2;
    }
    let size = size.max(probe);
    progress(format!(
        "moto: {} MiB PUT and GET (expected to take about {:.0} s)",
        size >> 20,
        per_byte * size as f64
    ));
    let sha = if size == large {
        large_sha.to_string()
    } else {
        pattern.sha256(size)
    };
    let put = moto.put_large("large", pattern, size, &sha).await?;
    let get = moto.get_large("large", pattern, size).await?;
    Ok(MotoLarge {
        size,
        put,
        get,
        per_byte,
    })
}

/// The filesystem holding `path`, as `df` names it (`source fstype size avail`).
fn filesystem_of(path: &Path) -> String {
    command_line(
        "df",
        &[
            "-h",
            "--output=source,fstype,size,avail",
            &path.display().to_string(),
        ],
    )
    .lines()
    .last()
    .unwrap_or("?")
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = Instant::now();
    let root = workspace_root();
    let large_mib: u64 = match std::env::var("BENCH_S3_LARGE_MIB") {
        Ok(v) if !v.is_empty() => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .context("BENCH_S3_LARGE_MIB must be a positive number of MiB")?,
        _ => LARGE_MIB,
    };
    let large = large_mib << 20;
    let warm_size = LARGE_WARM_MIB.min(large_mib) << 20;

    progress("starting etcd, the gateway and moto_server");
    let etcd = Etcd::start().await.context("starting etcd")?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens)
        .await
        .context("starting the gateway")?;
    let moto = Moto::start().await.context("starting moto_server")?;
    let procs = Procs::find(&etcd, &gateway, &moto);

    let (account_id, creds) = gateway.account_with_key(&tokens.admin, "bench").await?;
    let karri = Arc::new(Endpoint::new(
        "Karri",
        gateway.url(),
        KARRI_REGION,
        &creds.access_key_id,
        &creds.secret_access_key,
        Some(&gateway.ca_path()),
    )?);
    // moto checks no signature, but gets the same signed requests.
    let moto_ep = Arc::new(Endpoint::new(
        "moto",
        moto.url.clone(),
        MOTO_REGION,
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
    )?);
    // The gateway may need a moment to know the new access key.
    let started = Instant::now();
    while let Err(e) = karri.create_bucket().await {
        if started.elapsed() > READY_DEADLINE {
            return Err(e.context(format!(
                "creating bucket {BUCKET} on Karri; gateway log:\n{}",
                gateway.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    moto_ep.create_bucket().await?;

    let raw_dir = tempfile::Builder::new()
        .prefix("karri-bench-s3-raw-")
        .tempdir()
        .context("creating the raw-disk directory")?;
    let raw_path = raw_dir.path().join("raw-sequential");
    let same_fs = match (
        std::fs::metadata(raw_dir.path()),
        std::fs::metadata(gateway.dir()),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    };

    out("=== Karri vs moto and the raw disk: S3 REST API (bench-s3) ===");
    out(format!(
        "date (UTC)    : {}",
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    ));
    out(format!(
        "machine       : {} cores, {}, {} MiB memory",
        command_line("nproc", &[]),
        cpu_model(),
        command_line("free", &["-m"])
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
    ));
    out(format!(
        "Karri         : {}/api-gateway (release build expected) on etcd {}, region {KARRI_REGION}, HTTPS (rustls), path-style, account {account_id}",
        karri_testkit::bin_dir().display(),
        command_line("etcd", &["--version"]).lines().next().unwrap_or("?")
    ));
    out(format!(
        "moto          : moto_server {} (Werkzeug, threaded), region {MOTO_REGION}, plain HTTP, path-style",
        command_line(
            &root.join(".venv/bin/python").display().to_string(),
            &["-c", "import moto; print(moto.__version__)"]
        )
    ));
    out("requests      : SigV4 (aws-sigv4, service s3), payload signed (x-amz-content-sha256 = SHA-256 of the body); HTTP/1.1 keep-alive, one connection per client");
    out("latency       : from before signing to the whole response read; exact nearest-rank percentiles in ms");
    out(format!(
        "disk          : {} (gateway dir {}, raw file {}, same filesystem: {})",
        filesystem_of(raw_dir.path()),
        gateway.dir().display(),
        raw_path.display(),
        if same_fs { "yes" } else { "NO" }
    ));
    out(format!(
        "load average  : {} (other work on the machine skews the figures)",
        loadavg()
    ));
    out("");

    // 1. 4 KiB objects.
    progress(format!("storing {GET_OBJECTS} 4 KiB objects on each side"));
    for ep in [&karri, &moto_ep] {
        let run = closed_loop(
            &procs,
            16,
            GET_OBJECTS,
            REQUEST_TIMEOUT,
            put_op(ep, "get", GET_SEED),
        )
        .await;
        if let Some(e) = run.first_error {
            bail!("{}: storing the GET objects: {e}", ep.name);
        }
        ensure!(
            run.done.len() == GET_OBJECTS,
            "{}: stored {} of {GET_OBJECTS} objects",
            ep.name,
            run.done.len()
        );
    }
    out(format!(
        "4 KiB objects: {SMALL_CAP:?} or {SMALL_MAX_OPS} ops per run after {WARM_OPS}+ untimed ones; PUT of new keys (up to {VERIFY_SAMPLE} read back afterwards), GET round-robin over {GET_OBJECTS} keys, every body compared"
    ));
    out(format!(
        "{:<12} {:>3} | {:^39} | {:^39} | {:^17}",
        "", "", "Karri", "moto", "Karri/moto"
    ));
    out(format!(
        "{:<12} {:>3} | {:>6} {:>4} {:>9} {:>8} {:>8} | {:>6} {:>4} {:>9} {:>8} {:>8} | {:>8} {:>8}",
        "op", "c", "ops", "err", "ops/s", "p50", "p99", "ops", "err", "ops/s", "p50", "p99", "ops/s", "p99"
    ));
    let mut compared = Vec::new();
    for kind in [Kind::Put, Kind::Get] {
        for c in CONCURRENCY {
            compared.push(compare_small(&procs, [&karri, &moto_ep], kind, c).await?);
        }
    }
    out("");

    // 2. moto with a large object (informational; a failure there is reported, not fatal).
    let pattern = Arc::new(Pattern::new());
    progress(format!(
        "computing the SHA-256 of the {large_mib} MiB object"
    ));
    let large_sha = pattern.sha256(large);
    let moto_large = moto_large(&moto_ep, &pattern, warm_size, large, &large_sha).await;
    if let Err(e) = &moto_large {
        progress(format!("moto's large-object run failed: {e:#}"));
    }
    drop(moto_ep);
    drop(moto);

    // 3. Karri against the raw disk.
    progress(format!(
        "large-object warm-up: {} MiB through Karri and the raw file",
        warm_size >> 20
    ));
    let warm_sha = pattern.sha256(warm_size);
    karri
        .put_large("large-warm", &pattern, warm_size, &warm_sha)
        .await?;
    karri.get_large("large-warm", &pattern, warm_size).await?;
    {
        let (path, p) = (raw_path.clone(), pattern.clone());
        blocking(move || {
            raw_write(&path, &p, warm_size)?;
            raw_read(&path, &p, warm_size)?;
            Ok(())
        })
        .await?;
    }
    let mut rounds = Vec::new();
    let mut blob = None;
    for round in 1..=LARGE_RUNS {
        progress(format!(
            "large objects, round {round} of {LARGE_RUNS}: {large_mib} MiB Karri PUT, GET cold and warm; raw write, read cold and warm"
        ));
        let (r, b) = large_round(
            &karri,
            gateway.dir(),
            &raw_path,
            &pattern,
            large,
            &large_sha,
            "large",
        )
        .await?;
        rounds.push(r);
        blob = b;
    }
    let _ = std::fs::remove_file(&raw_path);

    out(format!(
        "{large_mib} MiB objects: median of {LARGE_RUNS} rounds after a {} MiB warm-up; MB/s = 10^6 bytes/s; every byte read compared with what was written",
        warm_size >> 20
    ));
    match &blob {
        Some(b) => {
            let same = match (std::fs::metadata(b), std::fs::metadata(raw_dir.path())) {
                (Ok(x), Ok(y)) => x.dev() == y.dev(),
                _ => false,
            };
            out(format!(
                "Karri's blob  : {} ({}; same filesystem as the raw file: {})",
                b.display(),
                filesystem_of(b),
                if same { "yes" } else { "NO" }
            ))
        }
        None => out(format!(
            "Karri's blob  : NOT FOUND under {} (no file of >= {large} bytes): the cold GET may read from the page cache",
            gateway.dir().display()
        )),
    }
    out(format!(
        "{:<40} {:>9} {:>9}   {}",
        "", "MB/s", "s", "MB/s per round"
    ));
    let put = large_row("Karri PUT (answered)", large, &rounds, |r| r.put);
    let put_durable = large_row(
        "Karri PUT + sync after it (durable)",
        large,
        &rounds,
        LargeRound::put_durable,
    );
    let put_unsigned = large_row(
        "Karri PUT, UNSIGNED-PAYLOAD (durable)",
        large,
        &rounds,
        LargeRound::put_unsigned_durable,
    );
    let write = large_row("raw write + fsync", large, &rounds, |r| r.write);
    let get_cold = large_row("Karri GET, cold cache", large, &rounds, |r| r.get_cold);
    let read_cold = large_row("raw read, cold cache", large, &rounds, |r| r.read_cold);
    let get_warm = large_row("Karri GET, warm cache", large, &rounds, |r| r.get_warm);
    let read_warm = large_row("raw read, warm cache", large, &rounds, |r| r.read_warm);
    let sync_after: Vec<String> = rounds.iter().map(|r| ms(r.sync_after)).collect();
    out(format!(
        "      sync after Karri's PUT answered, ms per round: {} (near 0 when the gateway synced before answering)",
        sync_after.join(" ")
    ));
    let moto_ratios = match &moto_large {
        Ok(m) => {
            let (put_mbps, get_mbps) = (mbps(m.size, m.put), mbps(m.size, m.get));
            out(format!(
                "{:<40} {put_mbps:>9.1} {:>9.2}   (one run)",
                format!("moto PUT ({} MiB)", m.size >> 20),
                m.put.as_secs_f64()
            ));
            out(format!(
                "{:<40} {get_mbps:>9.1} {:>9.2}   (one run, from moto's memory)",
                format!("moto GET ({} MiB)", m.size >> 20),
                m.get.as_secs_f64()
            ));
            if m.size != large {
                out(format!(
                    "      moto measured at {} MiB: {large_mib} MiB would take about {:.0} s (budget {MOTO_LARGE_BUDGET:?})",
                    m.size >> 20,
                    m.per_byte * large as f64
                ));
            }
            format!(
                "PUT x{:.1}, GET (warm) x{:.1}",
                put_durable / put_mbps.max(1e-9),
                get_warm / get_mbps.max(1e-9)
            )
        }
        Err(e) => {
            out(format!(
                "moto          : large-object run failed: {}",
                format!("{e:#}").chars().take(300).collect::<String>()
            ));
            "-".to_string()
        }
    };
    let put_ratio = put_durable / write.max(1e-9);
    let put_unsigned_ratio = put_unsigned / write.max(1e-9);
    let get_ratio = get_cold / read_cold.max(1e-9);
    out(format!(
        "ratios        : Karri PUT durable / raw write {:.0} % (answered: {:.0} %); Karri GET / raw read: cold {:.0} %, warm {:.0} %; Karri/moto: {moto_ratios}",
        put_ratio * 100.0,
        put / write.max(1e-9) * 100.0,
        get_ratio * 100.0,
        get_warm / read_warm.max(1e-9) * 100.0
    ));

    // Floors.
    progress("floors: the disk, etcd and MD5 alone");
    let disk = {
        let dir = raw_dir.path().to_path_buf();
        blocking(move || Ok((disk_append(&dir)?, disk_publish(&dir)?))).await
    };
    let mut etcd_floor = etcd_floors(&procs, &etcd).await;
    let md5 = {
        let (p, size) = (pattern.clone(), large);
        blocking(move || Ok(md5_rate(&p, size))).await?
    };
    report_floors(&disk, &mut etcd_floor, md5, write, &compared, large_mib);

    // Goals.
    let speedup_ok = compared.iter().all(Compared::met);
    out("");
    out(format!(
        "=== goals: >= 20x moto on 4 KiB objects, >= 80 % of the raw disk on {large_mib} MiB objects ==="
    ));
    out(format!(
        "[{}] >= 20x moto ops/s on 4 KiB PUT and GET at 1 and 16 clients (no errors, every body right)",
        pass(speedup_ok)
    ));
    for c in &compared {
        out(format!(
            "       {}: {}: ops/s x{:.1}, p99 x{:.3} (moto/Karri p99 = {:.1}x){}",
            pass(c.met()),
            c.label,
            c.ratio,
            c.p99_ratio,
            1.0 / c.p99_ratio.max(1e-12),
            if c.clean { "" } else { ", with errors" }
        ));
    }
    out(format!(
        "[{}] {large_mib} MiB PUT >= 80 % of a raw sequential write + fsync: {put_durable:.1} MB/s (until durable) vs {write:.1} MB/s = {:.0} %",
        pass(put_ratio >= DISK_GOAL),
        put_ratio * 100.0
    ));
    out(format!(
        "[{}] {large_mib} MiB PUT with UNSIGNED-PAYLOAD (what awscli and boto3 send over HTTPS) >= 80 % of the raw write: {put_unsigned:.1} MB/s vs {write:.1} MB/s = {:.0} %",
        pass(put_unsigned_ratio >= DISK_GOAL),
        put_unsigned_ratio * 100.0
    ));
    out(format!(
        "[{}] {large_mib} MiB GET >= 80 % of a raw sequential read, both from disk (page cache dropped): {get_cold:.1} MB/s vs {read_cold:.1} MB/s = {:.0} %{}",
        pass(get_ratio >= DISK_GOAL && blob.is_some()),
        get_ratio * 100.0,
        if blob.is_some() {
            ""
        } else {
            " (MISS: Karri's blob was not found, so its cache could not be dropped)"
        }
    ));
    out(format!(
        "total time: {:.0} s; load average at the end: {}",
        total.elapsed().as_secs_f64(),
        loadavg()
    ));
    Ok(())
}
