//! S3 crash safety against a real gateway on real etcd: the gateway is killed with SIGKILL while
//! 100 uploads run, and again while multipart uploads complete. After a restart every object is
//! either listed, readable and byte-for-byte what was sent, or absent; nothing is listed without
//! its data; and the start-up sweep (grace 0 here) removes every blob and temporary file that
//! no object or upload names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use aws_sigv4::http_request::SignableBody;
use karri_e2e::s3::Signer;
use karri_testkit::{Etcd, Gateway, Tokens};
use reqwest::Method;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

const BUCKET: &str = "crash-test";
const UPLOADS: usize = 100;
/// Acknowledged uploads after which the gateway is killed.
const KILL_AFTER: usize = 25;
const OBJECT_SIZE: usize = 256 * 1024;
const PART_SIZE: usize = 5 * 1024 * 1024;
const MULTIPARTS: usize = 12;
/// Completions sent at once in the multipart phase.
const COMPLETIONS_IN_FLIGHT: usize = 3;
const DEADLINE: Duration = Duration::from_secs(60);

/// Deterministic content of `key` (so that what is read back can be checked).
fn content(key: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(key.as_bytes()).to_vec();
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

struct S3 {
    base: String,
    signer: Signer,
}

impl S3 {
    fn url(&self, rest: &str) -> String {
        format!("{}/{BUCKET}{rest}", self.base)
    }

    async fn call(
        &self,
        method: Method,
        rest: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let url = self.url(rest);
        let resp = self
            .signer
            .request(method, &url, SignableBody::Bytes(&body))?
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }

    async fn ok(&self, method: Method, rest: &str, body: Vec<u8>) -> anyhow::Result<String> {
        let (status, out) = self.call(method.clone(), rest, body).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        ensure!(status < 300, "{method} {rest}: HTTP {status}: {text}");
        Ok(text)
    }

    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let (status, body) = self
            .call(Method::GET, &format!("/{key}"), Vec::new())
            .await?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            other => bail!(
                "GET {key}: HTTP {other}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// Every key of the bucket (ListObjectsV2, all pages).
    async fn keys(&self) -> anyhow::Result<BTreeSet<String>> {
        let mut keys = BTreeSet::new();
        let mut token: Option<String> = None;
        loop {
            let rest = match &token {
                Some(t) => format!("?list-type=2&continuation-token={t}"),
                None => "?list-type=2".to_string(),
            };
            let xml = self.ok(Method::GET, &rest, Vec::new()).await?;
            keys.extend(elements(&xml, "Key"));
            match elements(&xml, "NextContinuationToken").pop() {
                Some(t) => token = Some(t),
                None => return Ok(keys),
            }
        }
    }

    /// Upload IDs of the bucket's multipart uploads in progress.
    async fn uploads(&self) -> anyhow::Result<BTreeSet<String>> {
        let xml = self.ok(Method::GET, "?uploads", Vec::new()).await?;
        Ok(elements(&xml, "UploadId").into_iter().collect())
    }
}

/// The text of every `<name>` element of `xml` (flat, as S3 answers are).
fn elements(xml: &str, name: &str) -> Vec<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split(&close).next())
        .map(str::to_string)
        .collect()
}

/// Blob files and temporary files under the gateway's S3 data directory.
fn files(dir: &Path) -> (usize, usize) {
    let count = |d: &Path| -> usize { walk(d).len() };
    (count(&dir.join("blobs")), count(&dir.join("tmp")))
}

fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

async fn client(gw: &Gateway, key_id: &str, secret: &str) -> anyhow::Result<S3> {
    Ok(S3 {
        base: gw.url(),
        signer: Signer::new(
            "karri-1",
            key_id,
            secret,
            Some(&gw.ca_path()),
            Duration::from_secs(60),
        )?,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_gateway_leaves_every_object_whole_or_absent_and_the_sweep_reclaims_orphans(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    // Grace 0: the sweep at each start treats every unnamed blob as an orphan (nothing is in
    // flight then); no periodic sweep during the test.
    let mut gw = Gateway::start_with_args(
        &etcd.endpoint,
        &tokens,
        &[
            "--s3-sweep-grace-seconds",
            "0",
            "--s3-sweep-interval-seconds",
            "86400",
        ],
    )
    .await?;
    let (_, creds) = gw.account_with_key(&tokens.admin, "crash").await?;
    let s3 = Arc::new(client(&gw, &creds.access_key_id, &creds.secret_access_key).await?);
    s3.ok(Method::PUT, "", Vec::new()).await?;

    // Multipart uploads with two parts each, ready to complete.
    let mut multiparts = BTreeMap::new();
    for i in 0..MULTIPARTS {
        let key = format!("multi/{i}");
        let xml = s3
            .ok(Method::POST, &format!("/{key}?uploads"), Vec::new())
            .await?;
        let id = elements(&xml, "UploadId").pop().context("no UploadId")?;
        let whole = content(&key, PART_SIZE + 1024);
        let mut etags = Vec::new();
        for (n, part) in [&whole[..PART_SIZE], &whole[PART_SIZE..]]
            .into_iter()
            .enumerate()
        {
            let url = s3.url(&format!("/{key}?partNumber={}&uploadId={id}", n + 1));
            let resp = s3
                .signer
                .request(Method::PUT, &url, SignableBody::Bytes(part))?
                .body(part.to_vec())
                .send()
                .await?;
            ensure!(resp.status().is_success(), "UploadPart: {}", resp.status());
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .context("no ETag")?
                .to_string();
            etags.push(etag);
        }
        multiparts.insert(key, (id, etags, whole));
    }

    // 1. SIGKILL while 100 uploads run.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, bool)>();
    let mut tasks = Vec::new();
    for i in 0..UPLOADS {
        let (s3, done) = (s3.clone(), done_tx.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("obj/{i:03}");
            let ok = s3
                .call(Method::PUT, &format!("/{key}"), content(&key, OBJECT_SIZE))
                .await
                .is_ok_and(|(status, _)| status == 200);
            let _ = done.send((key, ok));
        }));
    }
    drop(done_tx);
    let mut acknowledged = BTreeSet::new();
    while let Some((key, ok)) = done_rx.recv().await {
        if ok {
            acknowledged.insert(key);
        }
        if acknowledged.len() == KILL_AFTER {
            gw.stop();
        }
    }
    ensure!(
        acknowledged.len() < UPLOADS,
        "the kill came after every upload had finished"
    );
    for t in tasks {
        t.await?;
    }

    // 2. SIGKILL while the multipart uploads complete: as soon as the first completion answers.
    // At most COMPLETIONS_IN_FLIGHT are sent at a time, so that some are still to come when the
    // kill lands, however fast the others complete.
    gw.restart().await?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(COMPLETIONS_IN_FLIGHT));
    let mut completions = Vec::new();
    for (key, (id, etags, _)) in &multiparts {
        let body = format!(
            "<CompleteMultipartUpload>{}</CompleteMultipartUpload>",
            etags
                .iter()
                .enumerate()
                .map(|(n, e)| format!(
                    "<Part><PartNumber>{}</PartNumber><ETag>{e}</ETag></Part>",
                    n + 1
                ))
                .collect::<String>()
        );
        let (s3, done, rest) = (s3.clone(), done_tx.clone(), format!("/{key}?uploadId={id}"));
        let in_flight = in_flight.clone();
        completions.push(tokio::spawn(async move {
            let Ok(_permit) = in_flight.acquire_owned().await else {
                return;
            };
            let _ = s3.call(Method::POST, &rest, body.into_bytes()).await;
            let _ = done.send(());
        }));
    }
    drop(done_tx);
    if done_rx.recv().await.is_some() {
        gw.stop();
    }
    for c in completions {
        c.await?;
    }

    // An orphan the test plants itself: a blob no object names.
    let planted = gw
        .s3_data_dir()
        .join("blobs/ff/ff00000000000000000000000000beef");
    std::fs::create_dir_all(planted.parent().context("blob dir")?)?;
    std::fs::write(&planted, b"orphan")?;

    gw.restart().await?;

    // Every listed object is whole; every acknowledged upload is listed.
    let keys = s3.keys().await?;
    for key in &acknowledged {
        ensure!(
            keys.contains(key),
            "{key} was acknowledged but is not listed"
        );
    }
    let mut blobs_named = 0;
    for key in &keys {
        let body = s3
            .get(key)
            .await?
            .with_context(|| format!("{key} is listed but GET finds nothing"))?;
        let expected = match multiparts.get(key) {
            Some((_, _, whole)) => {
                blobs_named += 2;
                whole.clone()
            }
            None => {
                blobs_named += 1;
                content(key, OBJECT_SIZE)
            }
        };
        ensure!(
            Sha256::digest(&body) == Sha256::digest(&expected),
            "{key} is listed but its bytes differ ({} bytes read)",
            body.len()
        );
    }
    // A multipart upload either became its object or is still there to complete again.
    let uploads = s3.uploads().await?;
    for (key, (id, _, _)) in &multiparts {
        let completed = keys.contains(key);
        let pending = uploads.contains(id);
        ensure!(
            completed != pending,
            "{key}: completed {completed}, upload still listed {pending}"
        );
        if pending {
            blobs_named += 2;
        }
    }
    let completed = multiparts.keys().filter(|k| keys.contains(*k)).count();
    ensure!(
        completed < MULTIPARTS,
        "the kill came after every multipart completion had finished"
    );

    // The start-up sweep leaves exactly the named blobs and no temporary file.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (blobs, tmp) = files(&gw.s3_data_dir());
        if blobs == blobs_named && tmp == 0 && !planted.exists() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after the sweep: {blobs} blob files for {blobs_named} named, {tmp} temporary files, planted orphan present: {}\n{}",
            planted.exists(),
            gw.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "acknowledged {} of {UPLOADS} before the kill; {} objects listed after restart, all intact; {} multipart uploads completed before the second kill",
        acknowledged.len(),
        keys.len(),
        completed
    );
    Ok(())
}
