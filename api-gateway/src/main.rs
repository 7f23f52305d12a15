//! `api-gateway`: serve the Karri resource API on etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use api_gateway::auth::Authenticator;
use api_gateway::aws::credentials::{access_key_context, Sealer};
use api_gateway::cache::HistoryLimits;
use api_gateway::conn_limit::{CappedAcceptor, FirstBytesAcceptor};
use api_gateway::ec2::service::Ec2Settings;
use api_gateway::http::{discovery, router, AppState};
use api_gateway::kinds::Kinds;
use api_gateway::metrics::Metrics;
use api_gateway::registry::Registry;
use api_gateway::store::{self, EtcdConfig};
use api_gateway::tls;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use clap::Parser;

/// mimalloc instead of glibc malloc: glibc trimmed and refaulted the heap on every etcd
/// request (page clearing was 6 % of the gateway's CPU in a create benchmark). Transparent huge
/// pages are off for the process ([`no_huge_pages`]).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line flags.
// No `Debug`: it holds the S3 backend's secret key.
#[derive(Parser)]
#[command(version, about = "Karri API gateway: the resource API on etcd")]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:6443", env = "KARRI_LISTEN")]
    listen: SocketAddr,
    /// Address of the AWS endpoint (EC2 at `/` and `/services/compute`), the Eucalyptus port;
    /// the same TLS certificate as --listen. Every path is also served on --listen.
    #[arg(long, env = "KARRI_AWS_LISTEN")]
    aws_listen: Option<SocketAddr>,
    /// The region AWS clients sign for and DescribeRegions shows.
    #[arg(long, default_value = "karri-1", env = "KARRI_REGION")]
    region: String,
    /// Largest tolerated clock difference of a signed AWS request, in seconds.
    #[arg(long, default_value_t = 900)]
    max_clock_skew_seconds: u32,
    /// etcd client URLs, comma-separated (every member of a cluster).
    #[arg(
        long,
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ',',
        env = "KARRI_ETCD_ENDPOINTS"
    )]
    etcd_endpoints: Vec<String>,
    /// PEM CA bundle for etcd TLS.
    #[arg(long, env = "KARRI_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd mutual TLS.
    #[arg(long, env = "KARRI_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// PEM client key for etcd mutual TLS.
    #[arg(long, env = "KARRI_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// etcd user (etcd authentication).
    #[arg(long, env = "KARRI_ETCD_USER")]
    etcd_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "KARRI_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// YAML file of bearer tokens.
    #[arg(long, env = "KARRI_TOKENS_FILE")]
    tokens_file: PathBuf,
    /// Changes remembered per kind for watches that resume from a revision.
    #[arg(long, default_value_t = HistoryLimits::default().events)]
    watch_history: usize,
    /// Stored bytes of the records those changes hold (before and after each), per kind: fewer
    /// changes are remembered when records are large (a watch from before them reads etcd).
    #[arg(long, default_value_t = HistoryLimits::default().bytes)]
    watch_history_bytes: usize,
    /// PEM serving certificate (chain); with --tls-private-key-file.
    #[arg(long, env = "KARRI_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM serving key.
    #[arg(long, env = "KARRI_TLS_PRIVATE_KEY_FILE")]
    tls_private_key_file: Option<PathBuf>,
    /// Where a self-signed CA and serving certificate are kept when none is given.
    #[arg(long, default_value = "/var/lib/karri/pki", env = "KARRI_CERT_DIR")]
    cert_dir: PathBuf,
    /// Extra host names or addresses for the generated certificate.
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// File holding the key (base64 of 32 bytes) that seals access-key secrets at rest; created
    /// with a fresh key when missing. Defaults to `secrets.key` in --cert-dir.
    #[arg(long, env = "KARRI_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 3 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Most etcd lookups a second of access key IDs that the watch cache does not know
    /// (twice that at once); past it such requests are answered 503 without a lookup. Keys the
    /// cache knows are never limited.
    #[arg(long, default_value_t = api_gateway::aws::lookups::DEFAULT_LOOKUPS_PER_SECOND, env = "KARRI_UNKNOWN_KEY_LOOKUPS_PER_SECOND")]
    unknown_key_lookups_per_second: u32,
    /// Most client connections open at once (over all listeners); a connection past it is
    /// closed on arrival. Lowered to half the open-file limit if that is smaller. With
    /// --aws-listen, a quarter of it is kept for --listen (node agents, the operator, kubectl)
    /// and the rest is the AWS listener's.
    #[arg(long, default_value_t = 10_000, env = "KARRI_MAX_CONNECTIONS")]
    max_connections: usize,
    /// Directory of S3 object bytes (blobs); the S3 face is off without it or
    /// --s3-backend-url.
    #[arg(long, env = "KARRI_S3_DATA_DIR")]
    s3_data_dir: Option<PathBuf>,
    /// Keep object bytes in an existing S3-compatible cluster (Ceph RGW, MinIO, another Karri)
    /// at this endpoint URL instead of --s3-data-dir.
    #[arg(long, env = "KARRI_S3_BACKEND_URL")]
    s3_backend_url: Option<String>,
    /// The backend cluster's bucket that holds the blobs.
    #[arg(long, env = "KARRI_S3_BACKEND_BUCKET", default_value = "karri-blobs")]
    s3_backend_bucket: String,
    /// The region the backend cluster expects in signatures (another Karri: its --region,
    /// `karri-1` by default; it refuses any other).
    #[arg(long, env = "KARRI_S3_BACKEND_REGION", default_value = "us-east-1")]
    s3_backend_region: String,
    /// Access key ID for the backend cluster.
    #[arg(long, env = "KARRI_S3_BACKEND_ACCESS_KEY_ID")]
    s3_backend_access_key_id: Option<String>,
    /// Secret access key for the backend cluster (prefer the environment variable).
    #[arg(
        long,
        env = "KARRI_S3_BACKEND_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    s3_backend_secret_access_key: Option<String>,
    /// PEM CA certificate the backend cluster's TLS certificate chains to.
    #[arg(long, env = "KARRI_S3_BACKEND_CA")]
    s3_backend_ca: Option<PathBuf>,
    /// Domains under which `<bucket>.<domain>` addresses a bucket (virtual-hosted style);
    /// their wildcards are added to a generated serving certificate.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "s3.localhost,localhost",
        env = "KARRI_S3_DOMAINS"
    )]
    s3_domain: Vec<String>,
    /// Age after which an S3 blob that no object names is an orphan the sweep removes; longer
    /// than any upload takes.
    #[arg(long, default_value_t = 3600)]
    s3_sweep_grace_seconds: u64,
    /// Seconds between S3 orphan sweeps (one also runs at start).
    #[arg(long, default_value_t = 600)]
    s3_sweep_interval_seconds: u64,
    /// Seconds an S3 request body may send nothing while it is read before the request is
    /// answered RequestTimeout and its connection closed.
    #[arg(long, default_value_t = api_gateway::s3::BODY_IDLE_TIMEOUT.as_secs())]
    s3_body_idle_timeout_seconds: u64,
}

/// Raises the soft limit of open files to the hard one: a GET of an object holds one file per
/// part open (a 10 GiB upload of 8 MiB parts has 1,280), beside every connection.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(from = ?limit.current, to = ?limit.maximum, "raised the open file limit")
        }
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
    }
}

/// Warns when the bearer tokens file may be read by users other than its owner (each token is
/// a credential); it is not refused, as a mounted Kubernetes Secret is 0644 unless told
/// otherwise.
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the tokens file is readable by other users: chmod 600 it"
            );
        }
    }
}

/// Reads the tokens file again on each SIGHUP (`kill -HUP`), so that tokens can be added,
/// rotated and revoked without a restart. A file that does not parse changes nothing: the
/// tokens known before stay, and the error is logged.
fn reload_tokens_on_hangup(auth: Authenticator, path: std::path::PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match Authenticator::from_file(&path) {
                Ok(read) => {
                    let tokens = auth.replace_with(&read);
                    warn_if_readable_by_others(&path);
                    tracing::info!(path = %path.display(), tokens, "tokens file read again");
                }
                Err(error) => tracing::error!(
                    path = %path.display(),
                    %error,
                    "the tokens file does not parse; the tokens known before stay"
                ),
            }
        }
    });
    Ok(())
}

/// What is logged when `RUST_LOG` says nothing: `info`, but not the S3 library's line for
/// every error answer, which logs each client's mistake (a bad signature, a missing key) at
/// ERROR. The gateway logs the failures that are its own (`s3::service`), and every S3 answer
/// with a server error (`s3::S3Face::serve`).
const DEFAULT_LOG_FILTER: &str = "info,s3s::ops=off";

/// A future that resolves on SIGTERM (a service manager's stop, `make down`) or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas
/// (`madvise`), and the kernel then zeroes 2 MiB at the first touch of each: that was a fifth
/// of the gateway's CPU while 100 instances launched at once, in pages the many small,
/// short-lived JSON values of a request never fill.
fn no_huge_pages() {
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(%error, "cannot turn transparent huge pages off");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
    let args = Args::parse();
    raise_open_file_limit();
    no_huge_pages();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;
    let auth = Authenticator::from_file(&args.tokens_file)?;
    warn_if_readable_by_others(&args.tokens_file);
    reload_tokens_on_hangup(auth.clone(), args.tokens_file.clone())?;
    let etcd_config = EtcdConfig {
        endpoints: args.etcd_endpoints.clone(),
        ca_file: args.etcd_ca,
        cert_file: args.etcd_cert,
        key_file: args.etcd_key,
        username: args.etcd_user,
        password: args.etcd_password,
    };
    let etcd = store::connect(&etcd_config).await?;
    let metrics = Arc::new(Metrics::new());
    let connection_metrics = (
        metrics.connections.clone(),
        metrics.connections_refused.clone(),
    );
    let kinds = Kinds::load();
    let openapi = discovery::openapi_group_version(&kinds);
    let openapi_hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        openapi.to_string().hash(&mut h);
        format!("{:016X}", h.finish())
    };
    let secrets_key = args
        .secrets_key_file
        .clone()
        .unwrap_or_else(|| args.cert_dir.join("secrets.key"));
    let sealer = Arc::new(secrets_sealer(&secrets_key, etcd.clone()).await?);
    let registry = Registry::start(
        etcd,
        kinds,
        HistoryLimits {
            events: args.watch_history,
            bytes: args.watch_history_bytes,
        },
        metrics.clone(),
        Some(sealer),
    );
    registry
        .key_lookups
        .set_rate(args.unknown_key_lookups_per_second);
    let blobs: Option<Arc<dyn api_gateway::s3::blob::BlobStore>> = match (
        &args.s3_backend_url,
        &args.s3_data_dir,
    ) {
        (Some(endpoint), _) => {
            let ca_pem = match &args.s3_backend_ca {
                Some(p) => {
                    Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?)
                }
                None => None,
            };
            let config = api_gateway::s3::remote::RemoteConfig {
                endpoint: endpoint.clone(),
                bucket: args.s3_backend_bucket.clone(),
                region: args.s3_backend_region.clone(),
                access_key_id: args
                    .s3_backend_access_key_id
                    .clone()
                    .context("--s3-backend-url needs --s3-backend-access-key-id")?,
                secret_access_key: args
                    .s3_backend_secret_access_key
                    .clone()
                    .context("--s3-backend-url needs KARRI_S3_BACKEND_SECRET_ACCESS_KEY")?,
                ca_pem,
            };
            tracing::info!(endpoint = %config.endpoint, bucket = %config.bucket, "S3 object bytes in a remote S3-compatible cluster");
            Some(Arc::new(api_gateway::s3::remote::RemoteBlobs::new(
                &config,
            )?))
        }
        (None, Some(dir)) => Some(Arc::new(
            api_gateway::s3::blob::FsBlobs::open(dir)
                .with_context(|| format!("cannot use {} for S3 objects", dir.display()))?,
        )),
        (None, None) => None,
    };
    let s3 = match blobs {
        Some(blobs) => {
            tokio::spawn(api_gateway::s3::sweep::run(
                api_gateway::s3::index::ObjectIndex::new(registry.etcd_client()),
                blobs.clone(),
                std::time::Duration::from_secs(args.s3_sweep_grace_seconds),
                std::time::Duration::from_secs(args.s3_sweep_interval_seconds.max(1)),
                metrics.s3_swept.clone(),
            ));
            Some(api_gateway::s3::S3Face::new(
                registry.clone(),
                blobs,
                &api_gateway::s3::S3Settings {
                    region: args.region.clone(),
                    domains: args.s3_domain.clone(),
                    body_idle_timeout: std::time::Duration::from_secs(
                        args.s3_body_idle_timeout_seconds.max(1),
                    ),
                },
                metrics.clone(),
            ))
        }
        None => None,
    };
    let state = Arc::new(AppState {
        registry,
        auth,
        metrics,
        max_body: args.max_body_bytes,
        openapi_hash,
        openapi,
        ec2: Ec2Settings {
            region: args.region.clone(),
            max_skew: std::time::Duration::from_secs(u64::from(args.max_clock_skew_seconds)),
            public_url: args
                .aws_listen
                .map(|a| format!("https://{a}"))
                .unwrap_or_else(|| format!("https://{}", args.listen)),
        },
        s3,
    });
    let serving = match (args.tls_cert_file, args.tls_private_key_file) {
        (Some(cert), Some(key)) => tls::ServingCert {
            cert,
            key,
            ca: None,
        },
        (None, None) => {
            let mut names = args.tls_san.clone();
            for d in &args.s3_domain {
                names.push(d.clone());
                names.push(format!("*.{d}"));
            }
            tls::ensure_self_signed(&args.cert_dir, &names)?
        }
        _ => anyhow::bail!("--tls-cert-file and --tls-private-key-file go together"),
    };
    let config = RustlsConfig::from_pem_file(&serving.cert, &serving.key)
        .await
        .with_context(|| {
            format!(
                "cannot load the serving certificate {}",
                serving.cert.display()
            )
        })?;
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    let stopping = shutdown_signal()?;
    let watches = state.registry.clone();
    tokio::spawn(async move {
        stopping.await;
        tracing::info!("stopping: ending watches, finishing requests in flight (5 s at most)");
        watches.end_watches();
        shutdown.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    tracing::info!(listen = %args.listen, aws = ?args.aws_listen, region = %args.region, etcd = %args.etcd_endpoints.join(","), ca = ?serving.ca, "api-gateway serving");
    let app = router(state);
    let cap = connection_cap(args.max_connections)?;
    let (open, refused) = connection_metrics;
    let listeners = listener_caps(args.listen, args.aws_listen, cap)?;
    let mut servers = Vec::new();
    for (addr, cap) in listeners {
        // TCP_NODELAY: a response written in several TLS records must not wait for delayed ACKs.
        let capped =
            CappedAcceptor::new(NoDelayAcceptor::new(), cap, open.clone(), refused.clone());
        let acceptor = FirstBytesAcceptor::new(
            RustlsAcceptor::new(config.clone()).acceptor(capped),
            HEADER_READ_TIMEOUT,
        );
        let mut server = axum_server::bind(addr)
            .acceptor(acceptor)
            .handle(handle.clone());
        limit_slow_clients(server.http_builder());
        let server = server.serve(app.clone().into_make_service());
        servers.push(tokio::spawn(async move {
            server
                .await
                .with_context(|| format!("cannot serve on {addr}"))
        }));
    }
    for server in servers {
        server.await??;
    }
    Ok(())
}

/// Each listener with its share of the connection cap `cap`: all of it for --listen alone;
/// with --aws-listen, [`api_gateway::conn_limit::split_cap`].
fn listener_caps(
    listen: SocketAddr,
    aws_listen: Option<SocketAddr>,
    cap: usize,
) -> anyhow::Result<Vec<(SocketAddr, usize)>> {
    let Some(aws) = aws_listen else {
        return Ok(vec![(listen, cap)]);
    };
    let (resource, aws_cap) = api_gateway::conn_limit::split_cap(cap).with_context(|| {
        format!("a connection cap of {cap} cannot give --listen and --aws-listen one each")
    })?;
    tracing::info!(%listen, resource, aws_listen = %aws, aws = aws_cap, "connection cap divided between the listeners");
    Ok(vec![(listen, resource), (aws, aws_cap)])
}

/// The connection cap: `wanted`, within the open-file limit (raised at start by
/// [`raise_open_file_limit`]).
fn connection_cap(wanted: usize) -> anyhow::Result<usize> {
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let cap = api_gateway::conn_limit::connection_cap(wanted, nofile);
    anyhow::ensure!(
        cap > 0,
        "the open-file limit ({nofile:?}) leaves no room for client connections"
    );
    if cap < wanted {
        tracing::warn!(
            wanted,
            cap,
            ?nofile,
            "--max-connections lowered to half the open-file limit"
        );
    }
    Ok(cap)
}

/// How long a client may take to send a request's headers (HTTP/1.1), and a new connection
/// its first bytes after TLS ([`FirstBytesAcceptor`]). hyper starts this clock
/// as soon as it waits for the next request, so it also closes idle keep-alive connections:
/// longer than the 90 s after which hyper, reqwest and kube-rs clients drop idle pooled
/// connections themselves, so that they close first and never send on a connection being
/// closed.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// How often an HTTP/2 connection is pinged, and how long the answer may take.
const H2_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);
/// At most this many requests at once on one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 128;

/// Connections that send their headers too slowly (HTTP/1.1) or stop answering pings (HTTP/2)
/// are closed, so that slow clients cannot hold connections for ever. Without a timer hyper
/// applies no header timeout at all. Bodies have their own deadlines where they are read
/// (`api_gateway::body`).
fn limit_slow_clients(
    http: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
) {
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE)
        .max_concurrent_streams(H2_MAX_STREAMS);
}

/// The sealer of access key secrets, keyed from `path`. A key file is created only while no
/// access key is stored; otherwise the key must open a stored secret. A missing, mistyped or
/// replaced key file (an unmounted volume, a new `--cert-dir`, another replica's key) would
/// otherwise start a gateway on which every existing access key fails.
async fn secrets_sealer(
    path: &std::path::Path,
    mut etcd: etcd_client::Client,
) -> anyhow::Result<Sealer> {
    let prefix = store::kind_prefix("accesskeys");
    let stored = etcd
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix().with_limit(1)),
        )
        .await
        .context("cannot read the stored access keys")?;
    let (name, sealed) = match stored.kvs().first() {
        Some(kv) => {
            let record: serde_json::Value =
                serde_json::from_slice(kv.value()).context("a stored access key is not JSON")?;
            let text = |p: &str| {
                record
                    .pointer(p)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
            };
            // The secret and what it was sealed for.
            let sealed = text("/status/sealedSecret").map(|s| {
                let context = access_key_context(
                    &text("/status/accessKeyId").unwrap_or_default(),
                    &text("/spec/accountName").unwrap_or_default(),
                );
                (s, context)
            });
            (String::from_utf8_lossy(kv.key()).into_owned(), sealed)
        }
        None => (String::new(), None),
    };
    if sealed.is_some() && !path.exists() {
        anyhow::bail!(
            "the secrets key file {} does not exist, but access keys sealed with a key are stored \
             (such as {name}): restore the key file they were sealed with; a new key would make \
             every access key unusable",
            path.display()
        );
    }
    let sealer = Sealer::load_or_create(path)?;
    if let Some((sealed, context)) = sealed {
        sealer.open(&sealed, &context).map_err(|_| {
            anyhow::anyhow!(
                "the secrets key in {} does not open the stored access key {name}: start the \
                 gateway with the key the access keys were sealed with",
                path.display()
            )
        })?;
    }
    Ok(sealer)
}
