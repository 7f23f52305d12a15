//! `operator`: the Karri controllers (placement, EC2 lifecycle, node health) as a client of the
//! gateway's resource API, with leader election so that only one replica acts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use operator::controllers::{self, Settings};
use operator::election::{self, Timing};
use operator::metrics::{self, Metrics};
use operator::placement::Policy;
use tokio::sync::watch;

/// How long a shutting-down leader tries to hand its lease over.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Karri operator: placement, lifecycle and node health"
)]
struct Args {
    /// kubeconfig with the operator token for the gateway.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// This replica's identity in leader election (default: host name and process ID).
    #[arg(long)]
    identity: Option<String>,
    /// Leader lease duration in seconds.
    #[arg(long, default_value_t = 6)]
    leader_lease_seconds: u64,
    /// Node lease duration assumed when a node's lease does not say, in seconds.
    #[arg(long, default_value_t = 40)]
    node_lease_seconds: u64,
    /// How long terminated instances stay visible, in seconds.
    #[arg(long, default_value_t = 3600)]
    retention_seconds: u64,
    /// Placement policy of zones that name none: ROUNDROBIN, GREEDY, PACK or SPREAD.
    #[arg(long, default_value = "ROUNDROBIN")]
    placement_policy: Policy,
    /// Where to serve /metrics.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
}

async fn client(path: &PathBuf) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    // No answer to a request waits forever (kube-client sets no read timeout): a reconcile's
    // write to a gateway that stopped answering ends. Longer than the 290 s a watch asks the
    // server to end it after, counted from when the request is sent.
    config.read_timeout = Some(std::time::Duration::from_secs(295));
    config.reset_reader_on_write = true;
    // Its writes are recorded under this name in records' managedFields.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("karri-operator/", env!("CARGO_PKG_VERSION"))),
    ));
    Ok(Client::try_from(config)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "operator".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let client = client(&args.kubeconfig).await?;
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_listen))?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));
    let settings = Settings {
        policy: args.placement_policy,
        retention: Duration::from_secs(args.retention_seconds),
        node_lease_duration: Duration::from_secs(args.node_lease_seconds),
    };
    let (leading_tx, mut leading) = watch::channel(false);
    let timing = Timing::from_duration(Duration::from_secs(args.leader_lease_seconds));
    let campaign = tokio::spawn(election::run(
        client.clone(),
        identity.clone(),
        timing,
        leading_tx,
    ));
    tracing::info!(%identity, "operator started; campaigning for leadership");
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    'campaign: loop {
        tokio::select! {
            led = leading.wait_for(|l| *l) => { led?; }
            signal = &mut shutdown => { signal?; break 'campaign; }
        }
        metrics.leader.set(1);
        let work = async {
            // Placement waits for a judgement of every node's lease (see run_instances).
            let (nodes_checked, checked) = tokio::sync::watch::channel(false);
            tokio::join!(
                controllers::run_instances(
                    client.clone(),
                    settings.clone(),
                    metrics.clone(),
                    checked
                ),
                controllers::run_nodes(
                    client.clone(),
                    settings.clone(),
                    metrics.clone(),
                    nodes_checked
                ),
            )
        };
        tokio::select! {
            _ = work => tracing::warn!("controllers ended"),
            lost = leading.wait_for(|l| !*l) => { lost?; tracing::warn!("lost leadership; controllers stopped"); }
            signal = &mut shutdown => {
                signal?;
                metrics.leader.set(0);
                break 'campaign;
            }
        }
        metrics.leader.set(0);
    }
    // The controllers have stopped (their futures were dropped); stop campaigning, then hand
    // the lease over so that a standby need not wait for it to run out.
    campaign.abort();
    // Wait until it has stopped: a renewal still in flight would race the release.
    let _ = campaign.await;
    // Bounded: an unreachable gateway must not hold the shutdown; the lease then runs out.
    let release = tokio::time::timeout(RELEASE_TIMEOUT, election::release(client, &identity));
    match release.await {
        Ok(Ok(true)) => tracing::info!(%identity, "released the leader lease; shutting down"),
        Ok(Ok(false)) => tracing::info!(%identity, "shutting down"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not release the leader lease; shutting down")
        }
        Err(_) => tracing::warn!(
            timeout_s = RELEASE_TIMEOUT.as_secs(),
            "releasing the leader lease took too long; shutting down (it runs out by itself)"
        ),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        interrupted = tokio::signal::ctrl_c() => interrupted.context("cannot watch for SIGINT")?,
    }
    Ok(())
}
