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
use node_agent::guest::{self, GuestNetwork, Guests};
use node_agent::guestnet::{self, Dhcp, GuestNetConfig};
use node_agent::host;
use node_agent::hypervisor::LibvirtHypervisor;
use node_agent::images::ImageCache;
use node_agent::metrics::{self, Metrics};
use node_agent::node::NodeFacts;
use node_agent::portguard::PortGuard;
use node_agent::presign::GatewayPresigner;
use node_agent::{imds, netns};

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
    /// Most libvirt calls at once: at most one less than libvirtd's `max_client_requests`
    /// (5 by default). libvirtd reads nothing more from a client with that many calls in
    /// flight, keepalive answers included, so a busy libvirtd's connection would be closed as
    /// dead. Raise both together to start more domains at once. Default: 4, and no limit for
    /// libvirt's in-process test driver.
    #[arg(long, env = "KARRI_LIBVIRT_MAX_CALLS")]
    libvirt_max_calls: Option<usize>,
    /// vCPUs offered to instances (default: the CPUs this process may use).
    #[arg(long, env = "KARRI_VCPUS")]
    vcpus: Option<u32>,
    /// Memory offered to instances in MiB (default: MemTotal of /proc/meminfo).
    #[arg(long, env = "KARRI_MEMORY_MIB")]
    memory_mib: Option<u64>,
    /// Instance disk space in GiB (default: what is free on the file system of --data-dir plus
    /// what --data-dir holds already, measured again every --resync-seconds; or 20).
    #[arg(long, env = "KARRI_DISK_GIB")]
    disk_gib: Option<u64>,
    /// Directory that holds instance disks; its free space sizes the disk capacity.
    #[arg(long, env = "KARRI_DATA_DIR", default_value = "/var/lib/karri")]
    data_dir: PathBuf,
    /// Lease duration in seconds; the lease is renewed every quarter of it.
    #[arg(long, env = "KARRI_LEASE_SECONDS", default_value_t = 40,
          value_parser = clap::value_parser!(u64).range(1..))]
    lease_seconds: u64,
    /// How long a guest may take to shut down before it is forced off, in seconds.
    #[arg(long, env = "KARRI_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 60)]
    shutdown_timeout_seconds: u64,
    /// How long the guest of a terminated or deleted instance may take to shut down before it
    /// is forced off, in seconds (0: forced off at once).
    #[arg(long, env = "KARRI_TERMINATE_TIMEOUT_SECONDS", default_value_t = 30)]
    terminate_timeout_seconds: u64,
    /// Where to serve /metrics (port 0: any free port, logged at startup).
    #[arg(long, env = "KARRI_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    metrics_listen: SocketAddr,
    /// Directory of the image cache (default: `<data-dir>/images`).
    #[arg(long, env = "KARRI_IMAGE_CACHE_DIR")]
    image_cache_dir: Option<PathBuf>,
    /// Size limit of the image cache in GiB; least recently used images beyond it are evicted.
    #[arg(long, env = "KARRI_IMAGE_CACHE_GIB", default_value_t = 20)]
    image_cache_gib: u64,
    /// Kernel command line of instances that boot a kernel image directly.
    #[arg(long, env = "KARRI_KERNEL_CMDLINE", default_value = guest::DEFAULT_CMDLINE)]
    kernel_cmdline: String,
    /// Network namespace that holds the guests' bridge, DHCP and metadata service (the one the
    /// libvirtd of `--libvirt-uri` runs in). Unset: guests get no network interface.
    #[arg(long, env = "KARRI_GUEST_NETNS")]
    guest_netns: Option<String>,
    /// Name of the guests' bridge.
    #[arg(long, env = "KARRI_GUEST_BRIDGE", default_value = "karri0")]
    guest_bridge: String,
    /// Port of the metadata service on 169.254.169.254 (EC2's is 80).
    #[arg(long, env = "KARRI_METADATA_PORT", default_value_t = 80)]
    metadata_port: u16,
    /// Accelerator of guests: `auto` (KVM when `/dev/kvm` opens, else TCG), `kvm`, or `qemu`
    /// (TCG, software emulation: for hosts whose KVM opens but does not run guests, such as
    /// nested virtualisation that hangs). A Node's hypervisor hint overrides it.
    #[arg(long, env = "KARRI_DOMAIN_TYPE", default_value = "auto",
          value_parser = ["auto", "kvm", "qemu"])]
    domain_type: String,
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

/// Whether guests should run on KVM, from `--domain-type`.
fn kvm_wanted(domain_type: &str) -> bool {
    match domain_type {
        "kvm" => true,
        "qemu" => false,
        _ => host::kvm_usable(),
    }
}

/// The metadata service's address.
const METADATA_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

/// The zone's subnet and region, read from the AvailabilityZone records (retrying until the
/// gateway answers and the zone exists).
async fn zone_subnet(client: &Client, zone: &str) -> (crds::subnet::Subnet, String) {
    let api: kube::Api<crds::AvailabilityZone> = kube::Api::all(client.clone());
    let mut backoff = Duration::from_millis(500);
    loop {
        match api.list(&kube::api::ListParams::default()).await {
            Ok(list) => {
                let subnets = crds::subnet::zone_subnets(list.items.iter().map(|z| {
                    (
                        z.metadata.name.as_deref().unwrap_or_default(),
                        z.spec.subnet_cidr.as_deref(),
                    )
                }));
                let region = list
                    .items
                    .iter()
                    .find(|z| z.metadata.name.as_deref() == Some(zone))
                    .map(|z| z.spec.region.clone());
                if let (Some((_, subnet)), Some(region)) =
                    (subnets.into_iter().find(|(name, _)| name == zone), region)
                {
                    return (subnet, region);
                }
                tracing::warn!(zone, retry_in = ?backoff, "the zone does not exist yet");
            }
            Err(error) => tracing::warn!(%error, retry_in = ?backoff, "cannot list the zones"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Sets up the guests' bridge, DHCP server and metadata service in `netns`.
async fn guest_network(
    args: &Args,
    client: &Client,
    netns_name: &str,
) -> anyhow::Result<GuestNetwork> {
    let (subnet, region) = zone_subnet(client, &args.zone).await;
    let cfg = GuestNetConfig {
        netns: Some(netns_name.to_owned()),
        bridge: args.guest_bridge.clone(),
        subnet: subnet.network(),
        prefix: subnet.prefix(),
        gateway: subnet.gateway(),
        metadata_ip: METADATA_IP,
        state_dir: args.data_dir.join("network"),
        domain: format!("{region}.compute.internal"),
    };
    guestnet::ensure_bridge(&cfg)
        .await
        .with_context(|| format!("cannot set up bridge {} in {netns_name}", cfg.bridge))?;
    let ports = PortGuard::install(Some(netns_name), &cfg.bridge)
        .await
        .with_context(|| format!("cannot guard the ports of bridge {}", cfg.bridge))?;
    let dhcp = Dhcp::start(&cfg)
        .await
        .context("cannot start the DHCP server")?;
    let directory = imds::Directory::default();
    let addr = std::net::SocketAddr::from((METADATA_IP, args.metadata_port));
    let listener = netns::bind_tcp(Some(netns_name), addr)
        .with_context(|| format!("cannot serve the metadata service on {addr} in {netns_name}"))?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(imds::serve(
        listener,
        directory.clone(),
        imds::Tokens::new(),
    ));
    tracing::info!(netns = netns_name, bridge = %cfg.bridge, %subnet, "guest network ready");
    Ok(GuestNetwork {
        bridge: cfg.bridge,
        dhcp: tokio::sync::Mutex::new(dhcp),
        ports,
        directory,
        region,
        subnet_cidr: subnet.to_string(),
    })
}

async fn kube_config(path: &PathBuf) -> anyhow::Result<Config> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    // No answer to a request waits forever (kube-client sets no read timeout): a status write
    // or lease renewal to a gateway that stopped answering ends. Longer than the 290 s a watch
    // asks the server to end it after, counted from when the request is sent.
    config.read_timeout = Some(std::time::Duration::from_secs(295));
    config.reset_reader_on_write = true;
    // Its writes are recorded under this name in records' managedFields.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("karri-node-agent/", env!("CARGO_PKG_VERSION"))),
    ));
    Ok(config)
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

/// Blocking threads for libvirt calls (and image hashing, console reads). A domain start holds
/// its thread for as long as QEMU takes to come up (a second under load), and libvirtd runs many
/// at once: with 2 threads, ten launches queued behind each other for seconds (bench-guests: p99
/// 4.9–6.4 s, 3.0 s with 8); with 8, the ninth and tenth start and every short call after a start
/// (observing the domain it started) waited for one of the eight to finish. Threads are made
/// only when all are busy and leave after 10 s idle; malloc gives them no arenas of their own
/// (see [`MALLOC_ARENA_ENV`]). libvirtd works on at most `max_client_requests` calls of one
/// client at once (5 by default, 32 on the simulated hosts), and `--libvirt-max-calls` keeps the
/// agent below that.
const LIBVIRT_THREADS: usize = 32;

/// glibc's malloc gives each thread that allocates its own arena, and the agent's blocking
/// threads (libvirt calls, image copies) each kept megabytes of it: bench-cloud measured 36.6 MB
/// of anonymous memory per agent after a burst of launches, 8.5 MB with one arena.
const MALLOC_ARENA_ENV: &str = "MALLOC_ARENA_MAX";

/// Runs the agent again in this process with one malloc arena, unless the environment already
/// chooses (glibc reads it only at start). Returns only when that is not possible.
fn with_one_malloc_arena() {
    use std::os::unix::process::CommandExt as _;
    if std::env::var_os(MALLOC_ARENA_ENV).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(MALLOC_ARENA_ENV, "1")
        .exec();
    eprintln!("node-agent: cannot run again with {MALLOC_ARENA_ENV}=1 ({error}); going on without");
}

fn main() -> anyhow::Result<()> {
    with_one_malloc_arena();
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
    // Made before it is measured: a fresh data directory is this host's disk all the same.
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let capacity = args.capacity();
    let config = kube_config(&args.kubeconfig).await?;
    // Images in S3 are downloaded from the gateway itself, through presigned URLs signed for
    // the URL this node reaches it at, over TLS its kubeconfig's CA vouches for.
    let gateway_url = config.cluster_url.to_string();
    let gateway_roots = config.root_cert.clone().unwrap_or_default();
    let client = Client::try_from(config)?;
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_listen))?;

    let connected = connect(&args.libvirt_uri, &args.node_name).await;
    let hypervisor = Arc::new(match args.libvirt_max_calls {
        Some(max_calls) => connected.with_max_calls(max_calls),
        None => connected,
    });
    tracing::info!(uri = %args.libvirt_uri, node = %args.node_name, max_calls = ?args.libvirt_max_calls, "connected to libvirt");
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
        disk_from: args.disk_gib.is_none().then(|| args.data_dir.clone()),
    };
    let work = async {
        let (facts, domain_type) = agent::register(
            &client,
            &base,
            &args.libvirt_uri,
            kvm_wanted(&args.domain_type),
        )
        .await;
        tracing::info!(
            node = %facts.name,
            zone = %facts.zone,
            domain_type = domain_type.as_str(),
            "node agent started"
        );
        let network = match &args.guest_netns {
            Some(ns) => Some(guest_network(&args, &client, ns).await?),
            None => None,
        };
        let cache_dir = args
            .image_cache_dir
            .clone()
            .unwrap_or_else(|| args.data_dir.join("images"));
        let presigner = GatewayPresigner::new(client.clone(), gateway_url.clone());
        let cache = ImageCache::open(cache_dir, args.image_cache_gib.saturating_mul(1 << 30))
            .context("cannot open the image cache")?
            .with_root_certificates(&gateway_roots)
            .context("cannot trust the kubeconfig's certificate authority for image downloads")?
            .with_presigner(Arc::new(presigner));
        let guests = Arc::new(Guests::new(
            cache,
            args.data_dir.join("instances"),
            args.data_dir.join("console"),
            args.kernel_cmdline.clone(),
            network,
        ));
        let settings = Settings {
            node: args.node_name.clone(),
            lease_duration: Duration::from_secs(args.lease_seconds),
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_seconds),
            terminate_timeout: Duration::from_secs(args.terminate_timeout_seconds),
            resync: Duration::from_secs(args.resync_seconds),
            domain_type,
        };
        agent::run(
            client.clone(),
            hypervisor,
            settings,
            facts,
            metrics,
            Some(guests),
        )
        .await;
        anyhow::Ok(())
    };
    tokio::select! {
        result = work => {
            result?;
            anyhow::bail!("the agent stopped")
        }
        signal = shutdown_signal() => {
            signal?;
            tracing::info!("stopping (domains keep running)");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM (a service manager's stop, `make down`) or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        interrupted = tokio::signal::ctrl_c() => interrupted.context("cannot watch for SIGINT")?,
    }
    Ok(())
}
