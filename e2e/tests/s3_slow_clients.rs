//! An S3 upload whose body stops arriving, against a real gateway on real etcd: the gateway
//! answers `RequestTimeout` once the body has sent nothing for its idle timeout (2 s here,
//! `--s3-body-idle-timeout-seconds`), closes the connection, and stores nothing.

use std::time::Duration;

use anyhow::{ensure, Context};
use aws_sigv4::http_request::SignableBody;
use karri_e2e::s3::Signer;
use karri_testkit::{Etcd, Gateway, Tokens};
use reqwest::Method;

/// How long the test waits for the gateway's answer before calling it a hang: far past the
/// gateway's idle timeout of 2 s.
const HANG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_whose_body_stops_arriving_is_answered_request_timeout_and_stores_nothing(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gw = Gateway::start_with_args(
        &etcd.endpoint,
        &tokens,
        &["--s3-body-idle-timeout-seconds", "2"],
    )
    .await?;
    let (signer, bucket) = Signer::with_bucket(&gw, &tokens.admin, "slow", "slow-uploads").await?;

    // 300 bytes announced, 200 sent, then nothing, with the body never ending.
    use futures::StreamExt as _;
    let part: Result<bytes::Bytes, std::io::Error> = Ok(bytes::Bytes::from(vec![b'x'; 200]));
    let body =
        reqwest::Body::wrap_stream(futures::stream::iter([part]).chain(futures::stream::pending()));
    let object = format!("{bucket}/stalled.bin");
    let sent = signer
        .request(Method::PUT, &object, SignableBody::UnsignedPayload)?
        .header(reqwest::header::CONTENT_LENGTH, "300")
        .body(body)
        .send();
    let answer = tokio::time::timeout(HANG, sent)
        .await
        .context("the gateway never answered an upload whose body stopped")??;
    let status = answer.status();
    let closes = answer
        .headers()
        .get(reqwest::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let text = answer.text().await?;
    ensure!(
        status == 400 && text.contains("<Code>RequestTimeout</Code>"),
        "the stalled upload was answered {status}: {text}"
    );
    ensure!(closes, "the connection of a stalled upload is not closed");

    let read = signer
        .request(Method::GET, &object, SignableBody::Bytes(&[]))?
        .send()
        .await?;
    ensure!(
        read.status() == 404,
        "a stalled upload stored an object: GET answered {}",
        read.status()
    );
    Ok(())
}
