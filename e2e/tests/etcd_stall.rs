//! A stalled etcd (SIGSTOP: its connections open and silent, as a stalled disk or a network
//! partition leaves them) must not hang the gateway: every face answers that the service is
//! unavailable, in its own error shape, `/readyz` says not ready, and all is well once etcd
//! answers again.

mod ec2_support;

use anyhow::{ensure, Context};
use ec2_support::Driver;
use karri_e2e::cloud::signal_pid as signal;
use karri_testkit::{Etcd, Gateway, Tokens};
use serde_json::json;

/// Lets a stopped etcd go on however the test ends.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = signal(self.0, "CONT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_face_answers_unavailable_while_etcd_is_stalled_and_serves_again_after(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let (_, creds) = gateway.account_with_key(&tokens.admin, "stall").await?;
    let mut aws = Driver::start(&gateway, &creds, "stall")?;
    aws.ok("describe_instances", json!({}))?;
    aws.s3_ok("create_bucket", json!({"Bucket": "stall-bucket"}))?;
    let http = gateway.client()?;
    let readyz = format!("{}/readyz", gateway.url());
    ensure!(
        http.get(&readyz).send().await?.status() == 200,
        "not ready before"
    );

    let pid = etcd.pid().context("etcd is not running")?;
    signal(pid, "STOP")?;
    let resume = Resume(pid);
    // boto3 gives up after 60 s without an answer (and tries once): an answer is what counts.
    let t = std::time::Instant::now();
    let ec2 = aws.call("describe_instances", json!({}))?;
    eprintln!("[etcd_stall] EC2 answered after {:?}", t.elapsed());
    let refused = ec2.refusal("DescribeInstances while etcd is stalled")?;
    ensure!(
        refused == ("ServiceUnavailable".into(), 503),
        "EC2: {refused:?}"
    );
    let t = std::time::Instant::now();
    let s3 = aws.request(&json!({"op": "call", "service": "s3", "method": "list_objects_v2", "params": {"Bucket": "stall-bucket"}}))?;
    ensure!(
        s3["ok"] == false && s3["status"] == 503 && s3["code"] == "ServiceUnavailable",
        "S3: {s3}"
    );
    eprintln!("[etcd_stall] S3 answered after {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let api = http
        .get(format!(
            "{}/apis/karri.dev/v1alpha1/namespaces/stall/instances/web-1",
            gateway.url()
        ))
        .bearer_auth(&tokens.admin)
        .send()
        .await?;
    ensure!(api.status() == 503, "the resource API: {}", api.status());
    // A Status that says what happened, and nothing of where etcd is.
    let status: serde_json::Value = api.json().await?;
    let message = status["message"].as_str().unwrap_or_default();
    ensure!(
        status["reason"] == "ServiceUnavailable"
            && message.starts_with("etcd is unavailable")
            && !message.contains("127.0.0.1"),
        "the resource API's answer while etcd stalls: {status}"
    );
    eprintln!(
        "[etcd_stall] the resource API answered after {:?}",
        t.elapsed()
    );
    let t = std::time::Instant::now();
    let ready = http.get(&readyz).send().await?;
    eprintln!("[etcd_stall] /readyz answered after {:?}", t.elapsed());
    ensure!(
        ready.status() == 503,
        "/readyz with etcd stalled: {}",
        ready.status()
    );

    drop(resume);
    let t = std::time::Instant::now();
    aws.ok("describe_instances", json!({}))?;
    eprintln!("[etcd_stall] EC2 served again after {:?}", t.elapsed());
    aws.s3_ok("list_objects_v2", json!({"Bucket": "stall-bucket"}))?;
    ensure!(
        http.get(&readyz).send().await?.status() == 200,
        "not ready after"
    );
    Ok(())
}
