//! `node-agent`: converges the libvirt domains of one hypervisor host toward the Instance
//! records bound to its node, as a client of the gateway's resource API (never etcd).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use crds::NodeResources;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use node_agent::agent::{self, Settings};
use node_agent::host;
use node_agent::hypervisor::LibvirtHypervisor;
use node_agent::metrics::{self, Metrics};
use node_agent::node::NodeFacts;

/// Memory reported when `/proc/meminfo` cannot be read, in MiB.
const FALLBACK_MEMORY_MIB: u64 = 1024;

/// Command-line flags; each has an environment fallback.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Karri node agent: runs the instances bound to this node as libvirt domains"
)]
struct Args {
    /// kubeconfig with this node's token for the gateway.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Name of this node (its Node record and lease).
    #[arg(long, env = "KARRI_NODE_NAME")]
    node_name: String,
    /// Availability zone of this node, set when the Node record is created.
    #[arg(long, env = "KARRI_ZONE")]
    zone: String,
    /// libvirt connection URI (`test:///default` for libvirt's test driver).
    #[arg(long, env = "KARRI_LIBVIRT_URI", default_value = "qemu:///system")]
    libvirt_uri: String,
    /// vCPUs offered to instances (default: the CPUs this process may use).
    #[arg(long, env = "KARRI_VCPUS")]
    vcpus: Option<u32>,
    /// Memory offered to instances in MiB (default: MemTotal of /proc/meminfo).
    #[arg(long, env = "KARRI_MEMORY_MIB")]
    memory_mib: Option<u64>,
    /// Instance disk space in GiB (default: the size of the file system of --data-dir, or 20).
    #[arg(long, env = "KARRI_DISK_GIB")]
    disk_gib: Option<u64>,
    /// Directory that holds instance disks; its file system sizes the disk capacity.
    #[arg(long, env = "KARRI_DATA_DIR", default_value = "/var/lib/karri")]
    data_dir: PathBuf,
    /// Lease duration in seconds; the lease is renewed every quarter of it.
    #[arg(long, env = "KARRI_LEASE_SECONDS", default_value_t = 40,
          value_parser = clap::value_parser!(u64).range(1..))]
    lease_seconds: u64,
    /// How long a guest may take to shut down before it is forced off, in seconds.
    #[arg(long, env = "KARRI_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 60)]
    shutdown_timeout_seconds: u64,
    /// Where to serve /metrics (port 0: any free port, logged at startup).
    #[arg(long, env = "KARRI_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    metrics_listen: SocketAddr,
    /// Period of the orphan sweep and of each instance's re-observation, in seconds.
    #[arg(long, env = "KARRI_RESYNC_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    resync_seconds: u64,
}

impl Args {
    /// What the host offers: flags first, else read from the host.
    fn capacity(&self) -> NodeResources {
        let memory_mib = self
            .memory_mib
            .or_else(host::memory_mib)
            .unwrap_or_else(|| {
                tracing::warn!(
                    fallback = FALLBACK_MEMORY_MIB,
                    "cannot read /proc/meminfo; set --memory-mib"
                );
                FALLBACK_MEMORY_MIB
            });
        let disk_gib = self
            .disk_gib
            .or_else(|| host::disk_gib(&self.data_dir))
            .unwrap_or_else(|| {
                tracing::warn!(
                    data_dir = %self.data_dir.display(),
                    fallback = host::DEFAULT_DISK_GIB,
                    "cannot measure the data directory; set --disk-gib"
                );
                host::DEFAULT_DISK_GIB
            });
        NodeResources {
            vcpus: self.vcpus.unwrap_or_else(host::cpus),
            memory_mib,
            disk_gib,
        }
    }
}

async fn client(path: &PathBuf) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Connects to libvirt for `node`, retrying until it answers (libvirtd may start after the
/// agent).
async fn connect(uri: &str, node: &str) -> LibvirtHypervisor {
    let mut backoff = Duration::from_millis(500);
    loop {
        match LibvirtHypervisor::connect(uri, node).await {
            Ok(hv) => return hv,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot connect to libvirt");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Blocking threads for libvirt calls: a host's libvirt work is serialised by libvirtd anyway,
/// and every extra thread costs its own malloc arena (tens of MB under a burst of launches).
const LIBVIRT_THREADS: usize = 2;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(LIBVIRT_THREADS)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let args = Args::parse();
    let capacity = args.capacity();
    let client = client(&args.kubeconfig).await?;
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_listen))?;

    let hypervisor = Arc::new(connect(&args.libvirt_uri, &args.node_name).await);
    tracing::info!(uri = %args.libvirt_uri, node = %args.node_name, "connected to libvirt");
    tokio::spawn(metrics::serve(
        listener,
        metrics.clone(),
        hypervisor.clone(),
    ));

    let base = NodeFacts {
        name: args.node_name.clone(),
        zone: args.zone.clone(),
        capacity,
        hypervisor: String::new(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let work = async {
        let (facts, domain_type) =
            agent::register(&client, &base, &args.libvirt_uri, host::kvm_usable()).await;
        tracing::info!(
            node = %facts.name,
            zone = %facts.zone,
            domain_type = domain_type.as_str(),
            "node agent started"
        );
        let settings = Settings {
            node: args.node_name.clone(),
            lease_duration: Duration::from_secs(args.lease_seconds),
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_seconds),
            resync: Duration::from_secs(args.resync_seconds),
            domain_type,
        };
        agent::run(client.clone(), hypervisor, settings, facts, metrics).await;
    };
    tokio::select! {
        () = work => anyhow::bail!("the agent stopped"),
        signal = tokio::signal::ctrl_c() => {
            signal.context("waiting for Ctrl-C")?;
            tracing::info!("interrupted; stopping (domains keep running)");
            Ok(())
        }
    }
}
