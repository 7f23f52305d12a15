//! The gateway's connection cap (`--max-connections`), against the real binary: past the cap a
//! new connection is closed on arrival while the open ones keep working, the refusal is
//! counted in `/metrics`, and a connection that closes makes room for the next.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use karri_testkit::{http_client, Etcd, Gateway, Tokens};

/// How long a freed connection may take to be noticed by the gateway.
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

/// Retries `healthy` until it succeeds: the connection of a client dropped just before is
/// released once the gateway reads its close.
async fn healthy_once_room(client: &reqwest::Client, gw: &Gateway) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        match healthy(client, gw).await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > DEADLINE => {
                return Err(e.context(format!("no room for a connection after {DEADLINE:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_cap_is_closed_and_a_closed_one_makes_room() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gw = Gateway::start_with_args(&etcd.endpoint, &tokens, &["--max-connections", "2"]).await?;

    let first = client(&gw)?;
    healthy_once_room(&first, &gw).await?;
    let second = client(&gw)?;
    healthy_once_room(&second, &gw).await?;

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
    healthy_once_room(&third, &gw).await?;
    healthy(&first, &gw).await?;
    Ok(())
}
