//! The gateway's connection cap (`--max-connections`), against the real binary: past the cap a
//! new connection is closed on arrival while the open ones keep working, the refusal is
//! counted in `/metrics`, and a connection that closes makes room for the next.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use karri_testkit::{http_client, Etcd, Gateway, Tokens};

/// How long a closed connection may take to be released by the gateway.
const DEADLINE: Duration = Duration::from_secs(20);

/// A client of its own, so that it holds a connection of its own (HTTP/1.1 keep-alive).
fn client(gw: &Gateway) -> anyhow::Result<reqwest::Client> {
    http_client(Some(&gw.ca_path()))
}

async fn healthy(client: &reqwest::Client, gw: &Gateway) -> anyhow::Result<()> {
    let resp = client.get(format!("{}/readyz", gw.url())).send().await?;
    ensure!(resp.status() == 200, "readyz answered {}", resp.status());
    Ok(())
}

/// The value of the metric `name` (no labels) in the gateway's `/metrics`, read on `client`'s
/// connection.
async fn metric(
    client: &reqwest::Client,
    gw: &Gateway,
    token: &str,
    name: &str,
) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{}/metrics", gw.url()))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let Some(value) = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
    else {
        bail!("no {name} in /metrics:\n{text}");
    };
    value
        .trim()
        .parse()
        .with_context(|| format!("{name} = {value:?}"))
}

/// Waits until the gateway counts `n` open connections, asking over `client`'s own one: a
/// client dropped just before is released once the gateway has read its close.
async fn until_open(
    client: &reqwest::Client,
    gw: &Gateway,
    token: &str,
    n: f64,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let open = metric(client, gw, token, "karri_gateway_connections").await?;
        if open == n {
            return Ok(());
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "karri_gateway_connections = {open}, not {n}, after {DEADLINE:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_cap_is_closed_and_a_closed_one_makes_room() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gw = Gateway::start_with_args(&etcd.endpoint, &tokens, &["--max-connections", "2"]).await?;

    // The first finds a permit whether or not the start-up's readiness check still holds one;
    // then only it is open.
    let first = client(&gw)?;
    healthy(&first, &gw).await?;
    until_open(&first, &gw, &tokens.admin, 1.0).await?;
    let second = client(&gw)?;
    healthy(&second, &gw).await?;

    // Both permits are held by open keep-alive connections: a third is closed on arrival.
    let third = client(&gw)?;
    let refused = healthy(&third, &gw).await;
    ensure!(
        refused.is_err(),
        "a third connection was served with a cap of 2"
    );
    // The open ones still work, and the gateway counted what it did.
    healthy(&second, &gw).await?;
    let open = metric(&first, &gw, &tokens.admin, "karri_gateway_connections").await?;
    let closed = metric(
        &first,
        &gw,
        &tokens.admin,
        "karri_gateway_connections_refused_total",
    )
    .await?;
    ensure!(
        open == 2.0,
        "karri_gateway_connections = {open}, expected 2"
    );
    ensure!(
        closed >= 1.0,
        "karri_gateway_connections_refused_total = {closed}, expected at least 1"
    );

    // Closing one makes room for the next.
    drop(second);
    until_open(&first, &gw, &tokens.admin, 1.0).await?;
    healthy(&third, &gw).await?;
    healthy(&first, &gw).await?;
    Ok(())
}
