//! The gateway reads its tokens file again on SIGHUP, against the real binary: a token added
//! works, a token removed is refused, and a file that does not parse changes nothing.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use karri_testkit::{random_token, Etcd, Gateway, Tokens};

/// How long the gateway may take to act on a SIGHUP.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often its log is read meanwhile.
const POLL: Duration = Duration::from_millis(50);

/// Replaces the file at `path` with `text` in one step (a reader sees the old file or the new).
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The status of a list of instances in `namespace` with `token`.
async fn status(gw: &Gateway, token: &str, namespace: &str) -> anyhow::Result<u16> {
    Ok(gw
        .client()?
        .get(format!(
            "{}/apis/karri.dev/v1alpha1/namespaces/{namespace}/instances",
            gw.url()
        ))
        .bearer_auth(token)
        .send()
        .await?
        .status()
        .as_u16())
}

/// Waits until the gateway's log says `what`: it acted on the SIGHUP.
async fn until_logged(gw: &Gateway, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(gw.log_path())?;
        if log.contains(what) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "the gateway did not log {what:?} {DEADLINE:?} after SIGHUP:\n{}",
            gw.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_reads_the_tokens_file_again_and_a_broken_file_changes_nothing(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &["acme"]);
    let gw = Gateway::start(&etcd.endpoint, &tokens).await?;
    let acme = tokens.accounts[0].1.clone();
    let beta = random_token();
    ensure!(
        status(&gw, &acme, "acme").await? == 200,
        "acme's token works"
    );
    ensure!(
        status(&gw, &beta, "beta").await? == 401,
        "a token not in the file is refused"
    );

    // acme's token revoked, beta's added.
    let next = Tokens {
        admin: tokens.admin.clone(),
        operator: tokens.operator.clone(),
        nodes: Vec::new(),
        accounts: vec![("beta".to_string(), beta.clone())],
    };
    replace_file(gw.tokens_path(), &next.to_yaml())?;
    gw.hang_up()?;
    until_logged(&gw, "tokens file read again").await?;
    ensure!(
        status(&gw, &beta, "beta").await? == 200,
        "the added token is refused"
    );
    ensure!(
        status(&gw, &acme, "acme").await? == 401,
        "the revoked token still works"
    );
    ensure!(status(&gw, &tokens.admin, "acme").await? == 200);

    // A file that does not parse: the gateway says so and keeps the tokens it knew.
    replace_file(gw.tokens_path(), "tokens: [oops\n")?;
    gw.hang_up()?;
    until_logged(&gw, "the tokens file does not parse").await?;
    ensure!(
        status(&gw, &beta, "beta").await? == 200,
        "a broken file dropped the tokens known before"
    );
    ensure!(status(&gw, &acme, "acme").await? == 401);
    Ok(())
}
