//! Requests signed with access key IDs that do not exist, against the real gateway: each costs
//! an etcd lookup, so they are rationed (`--unknown-key-lookups-per-second`); past the budget
//! they are answered 503 (which the AWS SDKs retry) without one, counted in `/metrics`, while
//! a key the gateway knows keeps working.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use aws_sigv4::http_request::SignableBody;
use karri_e2e::s3::Signer;
use karri_testkit::{random_token, Etcd, Gateway, Tokens};
use reqwest::Method;

/// The unknown-key lookups the test's gateway allows a second (twice that at once).
const PER_SECOND: u64 = 1;
/// Requests with unknown keys sent in a row.
const SPRAY: u64 = 12;

fn signer(gw: &Gateway, id: &str, secret: &str) -> anyhow::Result<Signer> {
    Signer::new(
        "karri-1",
        id,
        secret,
        Some(&gw.ca_path()),
        Duration::from_secs(30),
    )
}

/// ListBuckets signed by `signer`: the HTTP status and the body.
async fn list_buckets(gw: &Gateway, signer: &Signer) -> anyhow::Result<(u16, String)> {
    let resp = signer
        .request(
            Method::GET,
            &format!("{}/", gw.url()),
            SignableBody::Bytes(b""),
        )?
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_unknown_access_keys_are_rationed_and_known_keys_are_not(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gw = Gateway::start_with_args(
        &etcd.endpoint,
        &tokens,
        &["--unknown-key-lookups-per-second", &PER_SECOND.to_string()],
    )
    .await?;
    gw.create_account(&tokens.admin, "alice").await?;
    let key = gw.create_access_key(&tokens.admin, "alice").await?;
    let known = signer(&gw, &key.access_key_id, &key.secret_access_key)?;
    // The known key works (its first use may take one lookup, if the cache has not seen it).
    let (status, body) = list_buckets(&gw, &known).await?;
    ensure!(status == 200, "the known key got {status}: {body}");

    // Well-formed IDs that do not exist: looked up while the budget lasts (InvalidAccessKeyId),
    // then refused without a lookup.
    let started = Instant::now();
    let (mut looked_up, mut refused) = (0u64, 0u64);
    for _ in 0..SPRAY {
        let unknown = format!("AKIK{}", &random_token()[..16].to_uppercase());
        let (status, body) = list_buckets(&gw, &signer(&gw, &unknown, "not-a-secret")?).await?;
        match status {
            403 if body.contains("InvalidAccessKeyId") => looked_up += 1,
            503 if body.contains("reduce your request rate") => refused += 1,
            _ => anyhow::bail!("an unknown key got {status}: {body}"),
        }
    }
    let elapsed = started.elapsed();
    // The burst (two seconds' worth, less what the known key may have used) and the refill.
    let allowed = 2 * PER_SECOND + elapsed.as_secs() * PER_SECOND + PER_SECOND;
    ensure!(
        looked_up <= allowed,
        "{looked_up} unknown keys were looked up in {elapsed:?}; at most {allowed} may be"
    );
    ensure!(
        refused >= SPRAY.saturating_sub(allowed) && refused > 0,
        "only {refused} of {SPRAY} requests with unknown keys were refused in {elapsed:?}"
    );

    // A known key is not rationed: it works while the budget is spent.
    let (status, body) = list_buckets(&gw, &known).await?;
    ensure!(
        status == 200,
        "the known key got {status} after the spray: {body}"
    );

    // The refusals are counted.
    let metrics = gw
        .client()?
        .get(format!("{}/metrics", gw.url()))
        .bearer_auth(&tokens.admin)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let counted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("karri_gateway_unknown_key_lookups_refused_total "))
        .context("no karri_gateway_unknown_key_lookups_refused_total in /metrics")?
        .trim()
        .parse()?;
    ensure!(
        counted >= refused as f64,
        "{counted} refusals counted, {refused} seen"
    );
    Ok(())
}
