//! The scale-out blob backend: a gateway that keeps object bytes in an existing S3-compatible
//! cluster — here another Karri gateway on its own etcd — instead of its data directory. Objects
//! written to the first gateway (a small one, and one large enough for a multipart upload to the
//! backend) read back whole and by range, their bytes live in the backend's bucket as
//! `blobs/<id>`, none in the first gateway's directory, and a delete removes the backend object.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context};
use aws_sigv4::http_request::SignableBody;
use karri_e2e::s3::Signer;
use karri_testkit::{Etcd, Gateway, Tokens};
use reqwest::Method;
use sha2::{Digest, Sha256};

const BACKEND_BUCKET: &str = "karri-blobs";
const BUCKET: &str = "photos";
/// Past the remote backend's single-PUT limit (8 MiB): written as a multipart upload there.
const LARGE: usize = 12 * 1024 * 1024;

struct S3 {
    base: String,
    signer: Signer,
}

impl S3 {
    fn new(gw: &Gateway, key: &str, secret: &str) -> anyhow::Result<S3> {
        Ok(S3 {
            base: gw.url(),
            signer: Signer::new(
                "karri-1",
                key,
                secret,
                Some(&gw.ca_path()),
                Duration::from_secs(120),
            )?,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        range: Option<&str>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .signer
            .request(method, &url, SignableBody::Bytes(&body))?
            .body(body);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }

    async fn ok(&self, method: Method, path: &str, body: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let (status, out) = self.call(method.clone(), path, body, None).await?;
        ensure!(
            status < 300,
            "{method} {path}: HTTP {status}: {}",
            String::from_utf8_lossy(&out)
        );
        Ok(out)
    }
}

fn keys_in(xml: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(xml)
        .split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        files_under(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_can_live_in_another_s3_cluster() -> anyhow::Result<()> {
    // The backend: another Karri, with an account and the bucket for the blobs.
    let backend_etcd = Etcd::start().await?;
    let backend_tokens = Tokens::generate(&[], &[]);
    let backend = Gateway::start(&backend_etcd.endpoint, &backend_tokens).await?;
    let (_, backend_creds) = backend
        .account_with_key(&backend_tokens.admin, "storage")
        .await?;
    let storage = S3::new(
        &backend,
        &backend_creds.access_key_id,
        &backend_creds.secret_access_key,
    )?;
    storage
        .ok(Method::PUT, &format!("/{BACKEND_BUCKET}"), Vec::new())
        .await?;

    // The front gateway, its blobs in the backend.
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let ca = backend.ca_path().display().to_string();
    let gw = Gateway::start_with_args(
        &etcd.endpoint,
        &tokens,
        &[
            "--s3-backend-url",
            &backend.url(),
            "--s3-backend-bucket",
            BACKEND_BUCKET,
            "--s3-backend-region",
            "karri-1",
            "--s3-backend-access-key-id",
            &backend_creds.access_key_id,
            "--s3-backend-secret-access-key",
            &backend_creds.secret_access_key,
            "--s3-backend-ca",
            &ca,
        ],
    )
    .await?;
    let (_, creds) = gw.account_with_key(&tokens.admin, "tenant").await?;
    let s3 = S3::new(&gw, &creds.access_key_id, &creds.secret_access_key)?;
    s3.ok(Method::PUT, &format!("/{BUCKET}"), Vec::new())
        .await?;

    let small = b"a small object".to_vec();
    let large: Vec<u8> = (0..LARGE).map(|i| (i % 251) as u8).collect();
    s3.ok(Method::PUT, &format!("/{BUCKET}/small"), small.clone())
        .await?;
    s3.ok(Method::PUT, &format!("/{BUCKET}/large"), large.clone())
        .await?;

    let got = s3
        .ok(Method::GET, &format!("/{BUCKET}/large"), Vec::new())
        .await?;
    ensure!(
        Sha256::digest(&got) == Sha256::digest(&large),
        "the large object read back differs ({} bytes)",
        got.len()
    );
    let (status, part) = s3
        .call(
            Method::GET,
            &format!("/{BUCKET}/large"),
            Vec::new(),
            Some("bytes=9000000-9000009"),
        )
        .await?;
    ensure!(
        status == 206 && part == large[9_000_000..9_000_010],
        "range read: HTTP {status}, {} bytes",
        part.len()
    );
    ensure!(
        s3.ok(Method::GET, &format!("/{BUCKET}/small"), Vec::new())
            .await?
            == small
    );
    let listed = keys_in(
        &s3.ok(Method::GET, &format!("/{BUCKET}?list-type=2"), Vec::new())
            .await?,
    );
    ensure!(
        listed == BTreeSet::from(["large".to_string(), "small".to_string()]),
        "listed {listed:?}"
    );

    // The bytes are in the backend's bucket, none in the front gateway's directory.
    let blobs = |xml: Vec<u8>| -> BTreeSet<String> {
        keys_in(&xml)
            .into_iter()
            .filter(|k| k.starts_with("blobs/"))
            .collect()
    };
    let stored = blobs(
        storage
            .ok(
                Method::GET,
                &format!("/{BACKEND_BUCKET}?list-type=2"),
                Vec::new(),
            )
            .await?,
    );
    ensure!(
        stored.len() == 2,
        "backend holds {stored:?}; front local blob files: {}",
        files_under(&gw.s3_data_dir().join("blobs"))
    );
    ensure!(
        files_under(&gw.s3_data_dir().join("blobs")) == 0,
        "the front gateway wrote blobs locally"
    );

    // A delete removes the backend object too.
    s3.ok(Method::DELETE, &format!("/{BUCKET}/small"), Vec::new())
        .await?;
    let stored = blobs(
        storage
            .ok(
                Method::GET,
                &format!("/{BACKEND_BUCKET}?list-type=2"),
                Vec::new(),
            )
            .await?,
    );
    ensure!(
        stored.len() == 1,
        "after the delete the backend holds {stored:?}"
    );
    let (status, _) = s3
        .call(Method::GET, &format!("/{BUCKET}/small"), Vec::new(), None)
        .await
        .context("GET of the deleted object")?;
    ensure!(status == 404, "the deleted object answers HTTP {status}");
    Ok(())
}
