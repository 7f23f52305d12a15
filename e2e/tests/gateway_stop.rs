//! A gateway asked to stop with SIGTERM (`make down`, a service manager's stop), against a real
//! etcd: it finishes the requests in flight (an S3 upload still sending its body) and ends its
//! watch streams cleanly, where it used to die at once and cut both.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use aws_sigv4::http_request::SignableBody;
use karri_e2e::s3::Signer;
use karri_testkit::{Etcd, Gateway, Tokens};
use reqwest::Method;

/// How long the test waits for anything it expects before calling it a hang.
const HANG: Duration = Duration::from_secs(30);

/// Bytes of each half of the upload.
const HALF: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_told_to_stop_finishes_an_upload_in_flight_and_ends_its_watches_cleanly(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let mut gw = Gateway::start(&etcd.endpoint, &tokens).await?;
    let (signer, bucket) = Signer::with_bucket(&gw, &tokens.admin, "stopping", "stopping").await?;

    // A watch, as the operator and the agents always hold one.
    let watch = gw
        .client()?
        .get(format!(
            "{}/apis/karri.dev/v1alpha1/namespaces/stopping/instances?watch=1",
            gw.url()
        ))
        .bearer_auth(&tokens.admin)
        .send()
        .await?;
    ensure!(watch.status() == 200, "the watch: {}", watch.status());

    // An upload whose second half is sent only once the gateway was told to stop.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let object = format!("{bucket}/halves.bin");
    let upload = tokio::spawn(
        signer
            .request(Method::PUT, &object, SignableBody::UnsignedPayload)?
            .header(reqwest::header::CONTENT_LENGTH, (2 * HALF).to_string())
            .body(body)
            .send(),
    );
    tx.send(Ok(bytes::Bytes::from(vec![b'a'; HALF])))
        .await
        .context("the upload's body is gone")?;
    // The gateway is receiving it once its partial file is there.
    let partial = gw.s3_data_dir().join("tmp");
    let arrived = tokio::task::spawn_blocking(move || first_entry_in(&partial, HANG)).await??;
    ensure!(arrived, "the upload never reached the gateway");

    gw.ask_to_stop()?;
    // The watch ends as a finished response, not a reset stream.
    let ended = tokio::time::timeout(HANG, watch.bytes())
        .await
        .context("the watch did not end when the gateway was told to stop")?;
    let events = match ended {
        Ok(events) => events,
        Err(e) => anyhow::bail!("the watch was cut instead of ended: {e}"),
    };
    ensure!(
        !String::from_utf8_lossy(&events).contains("\"ERROR\""),
        "the watch ended with an error event: {}",
        String::from_utf8_lossy(&events)
    );
    tx.send(Ok(bytes::Bytes::from(vec![b'b'; HALF])))
        .await
        .context("the upload's body is gone")?;
    drop(tx);
    let answer = tokio::time::timeout(HANG, upload)
        .await
        .context("the upload in flight was never answered")???;
    ensure!(
        answer.status() == 200,
        "the upload in flight when the gateway was told to stop was answered {}: {}",
        answer.status(),
        answer.text().await.unwrap_or_default()
    );
    let exited = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)))?;
    ensure!(exited, "the gateway did not exit within 10 s of SIGTERM");

    // What it answered 200 for is stored.
    gw.restart().await?;
    let read = signer
        .request(Method::GET, &object, SignableBody::Bytes(&[]))?
        .send()
        .await?;
    ensure!(
        read.status() == 200,
        "GET after the restart: {}",
        read.status()
    );
    let bytes = read.bytes().await?;
    ensure!(
        bytes.len() == 2 * HALF
            && bytes[..HALF].iter().all(|&b| b == b'a')
            && bytes[HALF..].iter().all(|&b| b == b'b'),
        "the stored object is {} bytes, not the two halves sent",
        bytes.len()
    );
    Ok(())
}

/// Waits at most `deadline` for `dir` to hold an entry, woken by inotify when one is made there;
/// whether one came.
fn first_entry_in(dir: &std::path::Path, deadline: Duration) -> anyhow::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::fs::inotify;
    let events = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    inotify::add_watch(
        &events,
        dir,
        inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
    )
    .with_context(|| format!("watching {}", dir.display()))?;
    let until = Instant::now() + deadline;
    // Looked at once the watch is set, so an entry made before it is not missed.
    while std::fs::read_dir(dir)?.next().is_none() {
        let left = Timespec::try_from(until.saturating_duration_since(Instant::now()))?;
        let mut fds = [PollFd::new(&events, PollFlags::IN)];
        match poll(&mut fds, Some(&left)) {
            Ok(0) => return Ok(false),
            Ok(_) => {
                // Drained, so that an entry made and gone again does not wake the next poll.
                let mut buf = [0u8; 4096];
                while rustix::io::read(&events, &mut buf).is_ok_and(|n| n > 0) {}
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}
