//! A whole Karri cloud on this machine, for the cloud tests (`tests/cloud.rs`) and the
//! `bench-cloud` benchmark: a real etcd and gateway (testkit), the catalogue applied as admin
//! (`config/samples/availability-zone.yaml` and `instance-type.yaml`), real `operator` processes
//! and real `node-agent` processes (by default on libvirt's test driver, one in-process
//! hypervisor per agent), and a kube-rs admin client.
//!
//! Beside starting it, this module holds what those programs share: creating instances, waiting
//! with bounded polling ([`wait_until`]: a [`POLL_INTERVAL`] and an explicit timeout, never a
//! fixed sleep standing in for synchronisation), scraping a service's Prometheus metrics
//! ([`metric`]), signalling a process ([`signal`]) and reading its resident memory
//! ([`rss_kib`]).
//!
//! Everything listens on 127.0.0.1 on ports from [`free_ports`]. The services log into a
//! temporary directory whose path is printed on stderr when the cloud starts; it is removed with
//! the cloud unless `KARRI_KEEP_LOGS` is set or the thread is panicking (a failed assertion).
//! Timeouts of [`Cloud::wait_until`] end with the last lines of every service's log. Dropping the
//! cloud kills (SIGKILL) operators and agents first, then the gateway, then etcd.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use karri_e2e::cloud::{Cloud, Options};
//! let cloud = Cloud::start(Options { agents: 3, ..Options::default() }).await?;
//! let names = vec!["web-1".to_string(), "web-2".to_string()];
//! cloud.create_instances(&names).await?;
//! let running = cloud.wait_all_running(&names, Duration::from_secs(30)).await?;
//! assert_eq!(running.len(), 2);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use crds::common::find_condition;
use crds::{
    Condition, ConditionStatus, Image, Instance, InstanceState, Lease, Node, CONDITION_READY,
    SYSTEM_NAMESPACE,
};
use futures::future::try_join_all;
use karri_testkit::{
    free_ports, kubectl_ok, log_tail, workspace_root, AwsCredentials, Etcd, Gateway, Service,
    Tokens,
};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use tempfile::TempDir;
use tokio::time::Instant;

/// Namespace (account) the instances are created in.
pub const NS: &str = "acme";
/// Availability zone of every node agent.
pub const ZONE: &str = "karri-1a";
/// Instance type of the instances [`instance`] builds (1 vCPU, 256 MiB).
pub const INSTANCE_TYPE: &str = "t1.micro";
/// Image of the instances [`instance`] builds.
pub const IMAGE_ID: &str = "emi-0123456789abcdef0";
/// libvirt's test driver: domains live in the agent process's memory.
pub const TEST_DRIVER: &str = "test:///default";
/// Instance condition the operator keeps from its node's readiness (`False`: impaired).
pub const CONDITION_NODE_HEALTHY: &str = "NodeHealthy";
pub use crds::CONDITION_DOMAIN_RUNNING;
/// Name of the operator's leader lease in `karri-system`.
pub const LEADER_LEASE: &str = "karri-operator";
/// How often [`wait_until`] probes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The catalogue applied when the cloud starts, relative to the workspace root.
pub const CATALOGUE: [&str; 2] = [
    "config/samples/availability-zone.yaml",
    "config/samples/instance-type.yaml",
];

/// How long services get to serve metrics, and nodes to become Ready, at start.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of one metrics scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts with fresh ports when another process took a metrics port first.
const SPAWN_RETRIES: usize = 3;
/// Lines of each log in timeout errors.
const LOG_LINES: usize = 25;

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Operator replicas (identities `operator-a`, `operator-b` …).
    pub operators: usize,
    /// Node agents (nodes `node-1`, `node-2` …), all in [`ZONE`].
    pub agents: usize,
    /// The agents' `--lease-seconds`.
    pub lease_seconds: u64,
    /// The operators' `--leader-lease-seconds`.
    pub leader_lease_seconds: u64,
    /// The agents' `--resync-seconds`.
    pub resync_seconds: u64,
    /// The agents' `--libvirt-uri`.
    pub libvirt_uri: String,
    /// The operators' `--retention-seconds` (how long terminated instances stay visible).
    pub retention_seconds: u64,
    /// Extra environment variables of the agents (e.g. `RUST_LOG`); none by default.
    pub agent_env: Vec<(String, String)>,
}

impl Default for Options {
    /// One operator, one agent on the test driver, node lease 10 s, leader lease 3 s, resync 5 s,
    /// retention one hour, no extra agent environment.
    fn default() -> Self {
        Options {
            operators: 1,
            agents: 1,
            lease_seconds: 10,
            leader_lease_seconds: 3,
            resync_seconds: 5,
            libvirt_uri: TEST_DRIVER.to_owned(),
            retention_seconds: 3600,
            agent_env: Vec::new(),
        }
    }
}

/// An operator process.
#[derive(Debug)]
pub struct Operator {
    /// Its `--identity` in leader election (also its log's name).
    pub identity: String,
    /// The port of its `/metrics` on 127.0.0.1.
    pub metrics_port: u16,
    /// The process.
    pub service: Service,
}

/// A node agent process.
#[derive(Debug)]
pub struct Agent {
    /// Its `--node-name` (also its log's name).
    pub node: String,
    /// The port of its `/metrics` on 127.0.0.1.
    pub metrics_port: u16,
    /// The process.
    pub service: Service,
}

/// An error a [`wait_until`] probe returns to stop waiting at once because an invariant broke.
/// Any other error of a probe counts as "not yet" (the gateway may be restarting).
#[derive(Debug)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}

/// A [`Violation`] as an `anyhow::Error`, for `return Err(violation(..))` in a probe.
pub fn violation(message: impl Into<String>) -> anyhow::Error {
    Violation(message.into()).into()
}

/// Probes every [`POLL_INTERVAL`] until `probe` answers `Break(value)`, and returns the value.
/// `Continue(description)` means "not yet" and says what was seen. A probe error is "not yet"
/// too (with the error as what was seen), except a [`Violation`], which fails at once. After
/// `timeout` it fails with `what` and the last thing seen.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> anyhow::Result<ControlFlow<T, String>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        let last = match probe().await {
            Ok(ControlFlow::Break(value)) => return Ok(value),
            Ok(ControlFlow::Continue(seen)) => seen,
            Err(e) if e.is::<Violation>() => {
                return Err(e.context(format!(
                    "while waiting until {what} ({:.1} s in)",
                    started.elapsed().as_secs_f64()
                )))
            }
            Err(e) => format!("error: {e:#}"),
        };
        if started.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting until {what}; last seen: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// An Instance named `name` in [`NS`] of type [`INSTANCE_TYPE`] and image [`IMAGE_ID`].
pub fn instance(name: &str) -> anyhow::Result<Instance> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Instance",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"imageId": IMAGE_ID, "instanceType": INSTANCE_TYPE},
    }))?)
}

/// The EC2 state of an instance (`None` before anyone wrote its status).
pub fn state_of(instance: &Instance) -> Option<InstanceState> {
    instance.status.as_ref().map(|s| s.state)
}

/// The node an instance is bound to.
pub fn node_of(instance: &Instance) -> Option<&str> {
    instance
        .status
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
}

/// The instance condition of `type_`, if present.
pub fn condition<'a>(instance: &'a Instance, type_: &str) -> Option<&'a Condition> {
    instance
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, type_))
}

/// The status of the node's `Ready` condition, if present.
pub fn node_ready(node: &Node) -> Option<ConditionStatus> {
    node.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, CONDITION_READY))
        .map(|c| c.status)
}

/// The name of the `i`-th node (from 1): `node-<i>`.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// The sum of the samples of metric `name` (the full series name, e.g.
/// `karri_operator_placements_total`) whose labels include every `(label, value)` of `labels`,
/// in a Prometheus/OpenMetrics text exposition; `None` when no sample matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.trim().rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or(rest)),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let pairs: Vec<&str> = series_labels.split(',').map(str::trim).collect();
        let matches = labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()));
        if let (true, Ok(v)) = (matches, value.parse::<f64>()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to the running `service` with `kill -<signal> <pid>`.
pub fn signal(service: &Service, signal: &str) -> anyhow::Result<()> {
    signal_pid(service.pid().context("the service is not running")?, signal)
}

/// Sends `signal` (`STOP`, `CONT`, …) to process `pid`.
pub fn signal_pid(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    ensure!(
        status.success(),
        "kill -{signal} {pid} exited with {status}"
    );
    Ok(())
}

/// Resident memory (`VmRSS` of `/proc/<pid>/status`) in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Memory of a process: `VmRSS`, `RssAnon`, `RssFile`, `RssShmem` and `VmHWM` of
/// `/proc/<pid>/status` and `Pss` of `/proc/<pid>/smaps_rollup` (shared pages divided among the
/// processes mapping them), in KiB, and `Threads`, as `(field, value)` in that order; fields that
/// cannot be read are left out.
pub fn memory_status(pid: u32) -> Vec<(&'static str, u64)> {
    let read = |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}"));
    let status = read("status").unwrap_or_default();
    let rollup = read("smaps_rollup").unwrap_or_default();
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
    };
    [
        ("VmRSS", &status),
        ("RssAnon", &status),
        ("RssFile", &status),
        ("RssShmem", &status),
        ("VmHWM", &status),
        ("Pss", &rollup),
        ("Threads", &status),
    ]
    .into_iter()
    .filter_map(|(name, text)| Some((name, field(text, name)?)))
    .collect()
}

/// The first process (other than this one) whose command line contains `needle`.
pub fn pid_by_cmdline(needle: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(entry.path().join("cmdline")).ok()?;
            (pid != me
                && String::from_utf8_lossy(&cmd)
                    .replace('\0', " ")
                    .contains(needle))
            .then_some(pid)
        })
}

async fn kube_client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Waits until `service` answers `GET /metrics` on `port` with 200; fails early (with its log)
/// if it exits.
async fn wait_serving(
    http: &reqwest::Client,
    service: &mut Service,
    port: u16,
) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let started = Instant::now();
    loop {
        if !service.running() {
            bail!(
                "it exited before serving {url}; log:\n{}",
                service.log_tail()
            );
        }
        let last = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= STARTUP_TIMEOUT {
            bail!(
                "no metrics at {url} after {STARTUP_TIMEOUT:?} (last: {last}); log:\n{}",
                service.log_tail()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A running cloud; see the module documentation.
pub struct Cloud {
    /// Operator replicas (dropped, so killed, first).
    pub operators: Vec<Operator>,
    /// Node agents, `agents[i]` being node `node-<i+1>`.
    pub agents: Vec<Agent>,
    /// The gateway (`gateway.restart()` kills and restarts it on the same port).
    pub gateway: Gateway,
    /// The etcd behind the gateway.
    pub etcd: Etcd,
    /// Tokens of admin, operator, every node and the account owning [`NS`].
    pub tokens: Tokens,
    /// The admin's kubeconfig (default namespace [`NS`]).
    pub admin: PathBuf,
    /// A kube-rs client of the admin.
    pub client: Client,
    /// The options the cloud was started with.
    pub options: Options,
    http: reqwest::Client,
    log_dir: PathBuf,
    /// The agents' data directories (image caches, overlays), one per node.
    data: TempDir,
    // Removed when the cloud is dropped (after the services were killed), unless kept.
    _logs: Option<TempDir>,
}

/// File name of the blank image in the cloud's data directory.
const BLANK_IMAGE: &str = "blank.img";

/// Registers [`IMAGE_ID`] in namespace `ns`: a small blank raw disk (the test driver and the QEMU test
/// boot nothing from it), so that the operator can resolve the instances' launch and the agents
/// fetch and overlay a real image.
pub async fn register_blank_image(client: &Client, dir: &Path, ns: &str) -> anyhow::Result<()> {
    let path = dir.join(BLANK_IMAGE);
    std::fs::write(&path, vec![0u8; 64 * 1024]).context("writing the blank image")?;
    let image: Image = serde_json::from_value(json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Image",
        "metadata": {"name": IMAGE_ID, "namespace": ns},
        "spec": {
            "name": "blank",
            "imageLocation": path.display().to_string(),
            "format": "raw",
        }
    }))?;
    let api: Api<Image> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &image)
        .await
        .context("registering the blank image")?;
    Ok(())
}

impl Cloud {
    /// A blank raw disk image on the (simulated) nodes, to register images from.
    pub fn blank_image(&self) -> PathBuf {
        self.data.path().join(BLANK_IMAGE)
    }

    /// Puts the blank image in a new bucket `bucket` of the account of `creds` with awscli,
    /// as an account's images are kept: its image location, `<bucket>/blank.img`.
    pub async fn blank_image_in_s3(
        &self,
        creds: &AwsCredentials,
        bucket: &str,
    ) -> anyhow::Result<String> {
        let image = self.blank_image();
        let path = image.to_str().context("a non-UTF-8 path")?;
        self.gateway
            .aws(creds, &["s3api", "create-bucket", "--bucket", bucket])
            .await?;
        self.gateway
            .aws(
                creds,
                &[
                    "s3api",
                    "put-object",
                    "--bucket",
                    bucket,
                    "--key",
                    BLANK_IMAGE,
                    "--body",
                    path,
                ],
            )
            .await?;
        Ok(format!("{bucket}/{BLANK_IMAGE}"))
    }

    /// The `--data-dir` of the agent of node `node` (its image cache is `images/`, its
    /// instances' overlays `instances/<instance id>/`).
    pub fn agent_data_dir(&self, node: &str) -> PathBuf {
        self.data.path().join(node)
    }

    /// Starts etcd and the gateway, applies the catalogue, spawns the operators and the agents,
    /// and waits until every service serves its metrics and every node is Ready.
    pub async fn start(options: Options) -> anyhow::Result<Cloud> {
        let logs = tempfile::Builder::new()
            .prefix("karri-cloud-")
            .tempdir()
            .context("creating the log directory")?;
        let log_dir = logs.path().to_path_buf();
        let logs = if std::env::var_os("KARRI_KEEP_LOGS").is_some() {
            drop(logs.keep());
            None
        } else {
            Some(logs)
        };
        eprintln!("[cloud] service logs in {}", log_dir.display());
        let etcd = Etcd::start().await?;
        let nodes: Vec<String> = (1..=options.agents).map(node_name).collect();
        let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let tokens = Tokens::generate(&node_refs, &[NS]);
        let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
        let admin = gateway.kubeconfig(&tokens.admin, NS)?;
        let root = workspace_root();
        for sample in CATALOGUE {
            let path = root.join(sample);
            kubectl_ok(&admin, &["apply", "-f", &path.display().to_string()])?;
        }
        let client = kube_client(&admin).await?;
        let data = tempfile::Builder::new()
            .prefix("karri-cloud-data-")
            .tempdir()
            .context("creating the data directory")?;
        register_blank_image(&client, data.path(), NS).await?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(SCRAPE_TIMEOUT)
            .build()
            .context("building the metrics client")?;
        let mut cloud = Cloud {
            operators: Vec::new(),
            agents: Vec::new(),
            gateway,
            etcd,
            tokens,
            admin,
            client,
            options: options.clone(),
            http,
            log_dir,
            data,
            _logs: logs,
        };
        let operator_kubeconfig = cloud.gateway.kubeconfig(&cloud.tokens.operator, NS)?;
        for i in 0..options.operators {
            let letter = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
            let identity = format!("operator-{letter}");
            let kubeconfig = operator_kubeconfig.display().to_string();
            let leader_lease = options.leader_lease_seconds.to_string();
            let retention = options.retention_seconds.to_string();
            let id = identity.clone();
            let (service, metrics_port) = cloud
                .spawn_serving("operator", &identity, &[], |port| {
                    [
                        "--kubeconfig",
                        &kubeconfig,
                        "--identity",
                        &id,
                        "--metrics-listen",
                        &format!("127.0.0.1:{port}"),
                        "--leader-lease-seconds",
                        &leader_lease,
                        "--retention-seconds",
                        &retention,
                    ]
                    .map(str::to_owned)
                    .to_vec()
                })
                .await?;
            cloud.operators.push(Operator {
                identity,
                metrics_port,
                service,
            });
        }
        for node in nodes {
            let token = cloud
                .tokens
                .node(&node)
                .context("no node token")?
                .to_owned();
            let kubeconfig = cloud.gateway.kubeconfig(&token, NS)?.display().to_string();
            let data_dir = cloud.data.path().join(&node).display().to_string();
            let lease = options.lease_seconds.to_string();
            let resync = options.resync_seconds.to_string();
            let (service, metrics_port) = cloud
                .spawn_serving("node-agent", &node, &options.agent_env, |port| {
                    [
                        "--kubeconfig",
                        &kubeconfig,
                        "--node-name",
                        &node,
                        "--zone",
                        ZONE,
                        "--libvirt-uri",
                        &options.libvirt_uri,
                        "--metrics-listen",
                        &format!("127.0.0.1:{port}"),
                        "--lease-seconds",
                        &lease,
                        "--resync-seconds",
                        &resync,
                        "--vcpus",
                        "64",
                        "--memory-mib",
                        "262144",
                        "--disk-gib",
                        "1000",
                        "--data-dir",
                        &data_dir,
                    ]
                    .map(str::to_owned)
                    .to_vec()
                })
                .await?;
            cloud.agents.push(Agent {
                node,
                metrics_port,
                service,
            });
        }
        cloud.wait_nodes_ready(STARTUP_TIMEOUT).await?;
        Ok(cloud)
    }

    /// Spawns `$KARRI_BIN_DIR/<bin>` with the arguments `args(metrics port)` and the extra
    /// environment `envs` until it serves its metrics, with fresh ports when another process took
    /// the port first.
    async fn spawn_serving(
        &self,
        bin: &str,
        label: &str,
        envs: &[(String, String)],
        args: impl Fn(u16) -> Vec<String>,
    ) -> anyhow::Result<(Service, u16)> {
        let mut last = anyhow::anyhow!("{label} did not start");
        for _ in 0..SPAWN_RETRIES {
            let port = free_ports(1)?[0];
            let mut service = Service::spawn(bin, label, &self.log_dir, &args(port), envs)?;
            match wait_serving(&self.http, &mut service, port).await {
                Ok(()) => return Ok((service, port)),
                Err(e) => {
                    service.kill();
                    last = e.context(format!("starting {label}"));
                    let log = std::fs::read_to_string(self.log_path(label)).unwrap_or_default();
                    if !log.contains("cannot serve metrics") {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// The directory holding the services' logs.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The log file of the service labelled `label` (an operator identity or a node name).
    pub fn log_path(&self, label: &str) -> PathBuf {
        self.log_dir.join(format!("{label}.log"))
    }

    /// The last lines of the gateway's and of every service's log.
    pub fn log_tails(&self) -> String {
        let mut out = format!("--- api-gateway ---\n{}", self.gateway.log_tail());
        let labels = self
            .operators
            .iter()
            .map(|o| &o.identity)
            .chain(self.agents.iter().map(|a| &a.node));
        for label in labels {
            out.push_str(&format!(
                "\n--- {label} ---\n{}",
                log_tail(&self.log_path(label), LOG_LINES)
            ));
        }
        out
    }

    /// [`wait_until`], with the last lines of every log appended to a failure.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        probe: impl AsyncFnMut() -> anyhow::Result<ControlFlow<T, String>>,
    ) -> anyhow::Result<T> {
        match wait_until(what, timeout, probe).await {
            Ok(v) => Ok(v),
            Err(e) => Err(e.context(format!(
                "logs ({}):\n{}",
                self.log_dir.display(),
                self.log_tails()
            ))),
        }
    }

    /// Waits until instance `name` of namespace `ns` is terminated, failing at once if it ever
    /// runs or gets a launch time (a launch that must fail before any domain runs).
    pub async fn wait_launch_failed(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Instance> {
        let api: Api<Instance> = Api::namespaced(self.client.clone(), ns);
        self.wait_until(&format!("{name} is terminated"), timeout, async || {
            let instance = api.get(name).await?;
            let status = instance.status.clone().unwrap_or_default();
            if status.state == InstanceState::Running || status.launch_time.is_some() {
                return Err(violation(format!(
                    "{name} was launched although its launch should fail: {status:?}"
                )));
            }
            Ok(match state_of(&instance) {
                Some(InstanceState::Terminated) => ControlFlow::Break(instance),
                other => {
                    ControlFlow::Continue(format!("{other:?}, conditions {:?}", status.conditions))
                }
            })
        })
        .await
    }

    /// Kills operator `i` (SIGKILL) and starts it again with the same flags; returns once it
    /// serves its metrics.
    pub async fn restart_operator(&mut self, i: usize) -> anyhow::Result<()> {
        let op = self.operators.get_mut(i).context("no such operator")?;
        op.service.restart()?;
        wait_serving(&self.http, &mut op.service, op.metrics_port).await
    }

    /// Kills agent `i` (SIGKILL) and starts it again with the same flags; returns once it serves
    /// its metrics.
    pub async fn restart_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let agent = self.agents.get_mut(i).context("no such agent")?;
        agent.service.restart()?;
        wait_serving(&self.http, &mut agent.service, agent.metrics_port).await
    }

    /// The text of `GET http://127.0.0.1:<port>/metrics`.
    pub async fn scrape(&self, port: u16) -> anyhow::Result<String> {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        Ok(resp.text().await?)
    }

    /// The metrics of operator `i`.
    pub async fn operator_metrics(&self, i: usize) -> anyhow::Result<String> {
        let op = self.operators.get(i).context("no such operator")?;
        self.scrape(op.metrics_port).await
    }

    /// The metrics of agent `i`.
    pub async fn agent_metrics(&self, i: usize) -> anyhow::Result<String> {
        let agent = self.agents.get(i).context("no such agent")?;
        self.scrape(agent.metrics_port).await
    }

    /// The gateway's own metrics (`/metrics` needs no token).
    pub async fn gateway_metrics(&self) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.gateway.url());
        let resp = self.gateway.client()?.get(&url).send().await?;
        ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        Ok(resp.text().await?)
    }

    /// Karri's libvirt domains on agent `i` as the agent reads them from libvirt at this scrape:
    /// `(running, in any state)`.
    pub async fn agent_domains(&self, i: usize) -> anyhow::Result<(u64, u64)> {
        let text = self.agent_metrics(i).await?;
        let name = "karri_node_agent_domains";
        let running = metric(&text, name, &[("state", "running")])
            .with_context(|| format!("agent {i} reports no {name}{{state=\"running\"}}"))?;
        let total = metric(&text, name, &[]).unwrap_or(running);
        // Gauges of counts: small non-negative integers.
        Ok((running as u64, total as u64))
    }

    /// The instances in [`NS`].
    pub fn instances(&self) -> Api<Instance> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Every instance in [`NS`].
    pub async fn list_instances(&self) -> anyhow::Result<Vec<Instance>> {
        Ok(self.instances().list(&ListParams::default()).await?.items)
    }

    /// Creates an [`instance`] for each name, all requests at once.
    pub async fn create_instances(&self, names: &[String]) -> anyhow::Result<()> {
        let api = self.instances();
        let bodies = names
            .iter()
            .map(|n| instance(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        try_join_all(bodies.iter().map(|body| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), body)
                    .await
                    .with_context(|| format!("creating instance {}", body.name_any()))
            }
        }))
        .await?;
        Ok(())
    }

    /// Waits until each named instance is `running` on a node, and returns them (in the order
    /// of `names`).
    pub async fn wait_all_running(
        &self,
        names: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Vec<Instance>> {
        let what = format!("{} instances are running", names.len());
        self.wait_until(&what, timeout, async || {
            let mut by_name: BTreeMap<String, Instance> = self
                .list_instances()
                .await?
                .into_iter()
                .map(|i| (i.name_any(), i))
                .collect();
            let waiting: Vec<String> = names
                .iter()
                .filter(|n| {
                    by_name.get(*n).is_none_or(|i| {
                        state_of(i) != Some(InstanceState::Running) || node_of(i).is_none()
                    })
                })
                .map(|n| {
                    let seen = by_name.get(n).map_or("missing".to_owned(), |i| {
                        format!(
                            "{} on {}",
                            state_of(i).map_or("no status", InstanceState::as_str),
                            node_of(i).unwrap_or("no node")
                        )
                    });
                    format!("{n}: {seen}")
                })
                .collect();
            if waiting.is_empty() {
                let all = names.iter().filter_map(|n| by_name.remove(n)).collect();
                return Ok(ControlFlow::Break(all));
            }
            Ok(ControlFlow::Continue(format!(
                "{} not running yet: {}",
                waiting.len(),
                waiting.join(", ")
            )))
        })
        .await
    }

    /// The Node record `name`.
    pub async fn node(&self, name: &str) -> anyhow::Result<Node> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        Ok(nodes.get(name).await?)
    }

    /// Waits until the Node of every agent has `Ready=True`.
    pub async fn wait_nodes_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until("every node is Ready", timeout, async || {
            let mut not_ready = Vec::new();
            for agent in &self.agents {
                let nodes: Api<Node> = Api::all(self.client.clone());
                let ready = nodes
                    .get_opt(&agent.node)
                    .await?
                    .and_then(|n| node_ready(&n));
                if ready != Some(ConditionStatus::True) {
                    not_ready.push(format!("{}: {ready:?}", agent.node));
                }
            }
            Ok(if not_ready.is_empty() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(format!("not Ready: {}", not_ready.join(", ")))
            })
        })
        .await
    }

    /// The operators' leader lease (`karri-system/karri-operator`), if any.
    pub async fn leader_lease(&self) -> anyhow::Result<Option<Lease>> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE);
        Ok(leases.get_opt(LEADER_LEASE).await?)
    }

    /// The gateway's process ID (found by its tokens file on its command line).
    pub fn gateway_pid(&self) -> Option<u32> {
        pid_by_cmdline(&self.gateway.tokens_path().display().to_string())
    }

    /// etcd's process ID (found by its data directory on its command line).
    pub fn etcd_pid(&self) -> Option<u32> {
        pid_by_cmdline(&self.etcd.data_dir().display().to_string())
    }
}

impl Drop for Cloud {
    /// Keeps the logs of a test that panicked (a failed assertion), and says where they are.
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(logs) = self._logs.take() {
                eprintln!(
                    "[cloud] keeping the service logs in {}",
                    logs.keep().display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP karri_node_agent_domains Karri's domains on the host, by state.\n\
        # TYPE karri_node_agent_domains gauge\n\
        karri_node_agent_domains{state=\"running\"} 17\n\
        karri_node_agent_domains{state=\"shut-off\"} 2\n\
        karri_operator_leader 1\n\
        karri_operator_reconciles_total{controller=\"instances\"} 5\n\
        karri_operator_reconciles_total{controller=\"nodes\"} 3\n\
        # EOF\n";

    #[test]
    fn metric_sums_the_samples_whose_labels_match() {
        let running = [("state", "running")];
        assert_eq!(
            metric(TEXT, "karri_node_agent_domains", &running),
            Some(17.0)
        );
        assert_eq!(metric(TEXT, "karri_node_agent_domains", &[]), Some(19.0));
        assert_eq!(metric(TEXT, "karri_operator_leader", &[]), Some(1.0));
        assert_eq!(
            metric(TEXT, "karri_operator_reconciles_total", &[]),
            Some(8.0)
        );
        let nodes = [("controller", "nodes")];
        assert_eq!(
            metric(TEXT, "karri_operator_reconciles_total", &nodes),
            Some(3.0)
        );
        assert_eq!(metric(TEXT, "karri_operator_placements_total", &[]), None);
        let paused = [("state", "paused")];
        assert_eq!(metric(TEXT, "karri_node_agent_domains", &paused), None);
        // A name that is a prefix of another is not confused with it.
        assert_eq!(metric(TEXT, "karri_operator_reconciles", &[]), None);
    }

    #[tokio::test]
    async fn wait_until_stops_at_a_violation_and_times_out_otherwise() {
        let err = wait_until::<()>("never", Duration::from_millis(250), async || {
            Ok(ControlFlow::Continue("still".into()))
        })
        .await
        .err()
        .map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| e.contains("waiting until never") && e.contains("still")));

        let started = Instant::now();
        let err = wait_until::<()>("broken", Duration::from_secs(30), async || {
            Err(violation("two nodes"))
        })
        .await;
        assert!(err.is_err_and(|e| e.is::<Violation>()));
        assert!(started.elapsed() < Duration::from_secs(5));

        let mut n = 0;
        let got = wait_until("third probe", Duration::from_secs(30), async || {
            n += 1;
            if n < 3 {
                anyhow::bail!("transient");
            }
            Ok(ControlFlow::Break(n))
        })
        .await;
        assert_eq!(got.ok(), Some(3));
    }
}
