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

/// A gateway on its own etcd with one account, `name`, and a signer of that account's key.
struct Tenant {
    etcd: Etcd,
    tokens: Tokens,
    gw: Gateway,
    account_id: String,
    signer: Signer,
}

impl Tenant {
    async fn start(name: &str) -> anyhow::Result<Tenant> {
        let etcd = Etcd::start().await?;
        let tokens = Tokens::generate(&[], &[]);
        let gw = Gateway::start(&etcd.endpoint, &tokens).await?;
        let (account_id, creds) = gw.account_with_key(&tokens.admin, name).await?;
        let signer = Signer::new(
            "karri-1",
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(&gw.ca_path()),
            Duration::from_secs(30),
        )?;
        Ok(Tenant {
            etcd,
            tokens,
            gw,
            account_id,
            signer,
        })
    }
}

#[tokio::test]
async fn buckets_made_through_s3_are_records_kubectl_sees_and_deletes_only_when_empty(
) -> anyhow::Result<()> {
    let Tenant {
        etcd: _etcd,
        tokens,
        gw,
        account_id,
        signer,
    } = Tenant::start("media").await?;
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

/// A bucket applied from a manifest belongs to the account its `spec.owner` names: the
/// account's ID is filled in (a manifest cannot know it: it is drawn when the account is made),
/// and the account's keys see and use the bucket through S3; a manifest naming another
/// account's ID, or an owner that does not exist, is refused, naming the field.
#[tokio::test]
async fn a_bucket_applied_from_a_manifest_belongs_to_the_account_it_names() -> anyhow::Result<()> {
    let Tenant {
        etcd: _etcd,
        tokens,
        gw,
        account_id,
        signer,
    } = Tenant::start("research").await?;
    let kubeconfig = gw.kubeconfig(&tokens.admin, "default")?;
    let dir = tempfile::tempdir()?;
    let apply = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        anyhow::Ok(kubectl(
            &kubeconfig,
            &["apply", "-f", &path.display().to_string()],
        ))
    };
    let bucket = |name: &str, owner: &str, owner_id: Option<&str>| {
        let id = owner_id.map_or(String::new(), |id| format!("  ownerId: \"{id}\"\n"));
        format!("apiVersion: karri.dev/v1alpha1\nkind: Bucket\nmetadata:\n  name: {name}\nspec:\n  owner: {owner}\n{id}")
    };

    // The shipped sample, as it is.
    let sample = karri_testkit::workspace_root().join("config/samples/bucket.yaml");
    let applied = apply("sample.yaml", std::fs::read_to_string(sample)?)?;
    ensure!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let owner = kubectl_ok(
        &kubeconfig,
        &[
            "get",
            "bucket",
            "research-data",
            "-o",
            "jsonpath={.spec.ownerId}",
        ],
    )?;
    ensure!(owner == account_id, "ownerId {owner}, account {account_id}");
    let url = format!("{}/research-data/notes.txt", gw.url());
    let put = signer.request(Method::PUT, &url, SignableBody::Bytes(b"notes"))?;
    let status = put.body(&b"notes"[..]).send().await?.status();
    ensure!(
        status == 200,
        "the owner's PUT into its bucket: HTTP {status}"
    );

    for (file, text, field) in [
        (
            "other-id.yaml",
            bucket("wrong-owner-id", "research", Some("123456789012")),
            "spec.ownerId",
        ),
        (
            "no-owner.yaml",
            bucket("orphan-bucket", "nobody", None),
            "spec.owner",
        ),
    ] {
        let refused = apply(file, text)?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        ensure!(
            !refused.status.success() && stderr.contains("is invalid") && stderr.contains(field),
            "{file}: {stderr}"
        );
    }
    let names = kubectl_ok(&kubeconfig, &["get", "buckets", "-o", "name"])?;
    ensure!(names.trim() == "bucket.karri.dev/research-data", "{names}");
    Ok(())
}
