//! Buckets are records: one made through S3 shows in `kubectl get buckets` with its owner, ACL
//! and region; `kubectl delete` of a bucket that still holds objects is refused with a
//! Kubernetes Status (as S3's DeleteBucket answers BucketNotEmpty), and once it is empty the
//! delete goes through and S3 no longer finds the bucket.

use std::time::Duration;

use anyhow::ensure;
use aws_sigv4::http_request::SignableBody;
use karri_e2e::s3::Signer;
use karri_testkit::{kubectl, kubectl_ok, Etcd, Gateway, Tokens};
use reqwest::Method;

#[tokio::test]
async fn buckets_made_through_s3_are_records_kubectl_sees_and_deletes_only_when_empty(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gw = Gateway::start(&etcd.endpoint, &tokens).await?;
    let (account_id, creds) = gw.account_with_key(&tokens.admin, "media").await?;
    let signer = Signer::new(
        "karri-1",
        &creds.access_key_id,
        &creds.secret_access_key,
        Some(&gw.ca_path()),
        Duration::from_secs(30),
    )?;
    let call = |method: Method, path: &str, body: &'static [u8]| {
        let url = format!("{}{path}", gw.url());
        let req = signer.request(method, &url, SignableBody::Bytes(body));
        async move {
            let resp = req?.body(body).send().await?;
            anyhow::Ok(resp.status().as_u16())
        }
    };
    ensure!(call(Method::PUT, "/media-library", b"").await? == 200);
    ensure!(call(Method::PUT, "/media-library/cover.jpg", b"jpeg bytes").await? == 200);

    let kubeconfig = gw.kubeconfig(&tokens.admin, "default")?;
    let table = kubectl_ok(&kubeconfig, &["get", "buckets"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("media-library"))
        .unwrap_or_default();
    ensure!(
        row.contains("bkt-")
            && row.contains("media")
            && row.contains("private")
            && row.contains("karri-1"),
        "kubectl get buckets:\n{table}"
    );
    let owner = kubectl_ok(
        &kubeconfig,
        &[
            "get",
            "bucket",
            "media-library",
            "-o",
            "jsonpath={.spec.ownerId}",
        ],
    )?;
    ensure!(owner == account_id, "ownerId {owner}, account {account_id}");

    let refused = kubectl(&kubeconfig, &["delete", "bucket", "media-library"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("not empty"),
        "kubectl delete of a bucket with an object: {stderr}"
    );
    ensure!(call(Method::HEAD, "/media-library", b"").await? == 200);

    ensure!(call(Method::DELETE, "/media-library/cover.jpg", b"").await? == 204);
    kubectl_ok(&kubeconfig, &["delete", "bucket", "media-library"])?;
    ensure!(call(Method::HEAD, "/media-library", b"").await? == 404);
    Ok(())
}
