//! End to end on libvirtd + QEMU (`qemu:///system`): etcd, the gateway, the operator and a node
//! agent as real processes, five instances as real QEMU domains, and a kill -9 of the agent.
//!
//! After the agent comes back, the four domains whose records still want them run on untouched
//! (same libvirt domain IDs, same QEMU processes), nothing is defined twice, and the record
//! deleted while the agent was down has its domain shut down (the power button first, then,
//! as nothing in it obeys, forced off) and undefined, and then goes.
//!
//! libvirtd must answer on `qemu:///system` (`bash scripts/libvirtd.sh`, which `make test` runs).
//! The node name is unique per run (`qemu-<8 hex>`), and every domain the agent defines names it
//! in its metadata, so parallel runs on the same libvirtd — or anybody else's domains — are never
//! touched: the agent manages only its node's domains, and the test's cleanup destroys and
//! undefines only domains whose XML names its node. A domain of another node (a "neighbour" on
//! the same libvirtd) runs through the whole test and must come out untouched too.
//!
//! Every wait is bounded polling, never a fixed sleep. The test prints its phase timings
//! (`--no-capture` shows them).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use crds::{Instance, InstanceState, ID_LABEL};
use karri_testkit::{kubectl_ok, random_token, workspace_root, Etcd, Gateway, Service, Tokens};
use kube::api::{Api, DeleteParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const URI: &str = "qemu:///system";
const ZONE: &str = "karri-1a";
const NS: &str = "qemu-e2e";
const INSTANCES: usize = 5;
/// The instance deleted while the agent is down.
const DELETED: &str = "vm-3";
/// Deadline for the five instances to run, from the apply.
const RUNNING_DEADLINE: Duration = Duration::from_secs(120);
/// Deadline for anything else the test waits for.
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
/// Where libvirtd's QEMU driver writes each running domain's QEMU process ID.
const PID_DIR: &str = "/run/libvirt/qemu";

/// `virsh -c qemu:///system <args>`: stdout, or an error with stderr.
fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .context("cannot run virsh (install libvirt-clients: make setup)")?;
    ensure!(
        out.status.success(),
        "virsh {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails the test at once, saying how to fix it, when libvirtd does not answer.
fn require_libvirtd() {
    if let Err(error) = virsh(&["version"]) {
        panic!(
            "libvirtd does not answer on {URI}: {error:#}\n\
             start it with `bash scripts/libvirtd.sh` (`make test` does), \
             or install it with `make setup`"
        );
    }
}

/// Whether a domain's XML names `node` as its owner's node (Karri's `<node>` element, whatever
/// prefix libvirt writes it with).
fn names_node(xml: &str, node: &str) -> bool {
    xml.contains("https://karri.dev/xmlns/domain/1")
        && (xml.contains(&format!(":node>{node}</")) || xml.contains(&format!("<node>{node}</")))
}

/// Every domain, running or not, whose XML names `node`, by name.
fn domains_of(node: &str) -> anyhow::Result<Vec<String>> {
    let mut ours = Vec::new();
    for name in virsh(&["list", "--all", "--name"])?.lines().map(str::trim) {
        if name.is_empty() {
            continue;
        }
        // A domain may vanish between the listing and the look: it is not ours then.
        if virsh(&["dumpxml", name]).is_ok_and(|xml| names_node(&xml, node)) {
            ours.push(name.to_owned());
        }
    }
    ours.sort();
    Ok(ours)
}

/// Every domain name libvirt knows, running or not.
fn all_domains() -> anyhow::Result<Vec<String>> {
    Ok(virsh(&["list", "--all", "--name"])?
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect())
}

/// A running domain's identity as the host knows it: libvirt's domain ID and its QEMU process
/// (PID and start time, so that a reused PID is not mistaken for the same process).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Running {
    domain_id: u32,
    pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    started: u64,
}

/// What runs for domain `name`; an error if it does not run.
fn running(name: &str) -> anyhow::Result<Running> {
    let state = virsh(&["domstate", name])?;
    ensure!(state.trim() == "running", "{name} is {}", state.trim());
    let domain_id = virsh(&["domid", name])?
        .trim()
        .parse()
        .with_context(|| format!("{name} has no domain ID"))?;
    let pid_file = Path::new(PID_DIR).join(format!("{name}.pid"));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no PID", pid_file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("QEMU process {pid} of {name} is gone"))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    ensure!(
        cmdline.contains("qemu-system") && cmdline.contains(&format!("guest={name},")),
        "process {pid} is not {name}'s QEMU: {cmdline}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let started = after
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no start time in /proc/{pid}/stat"))?;
    Ok(Running {
        domain_id,
        pid,
        started,
    })
}

/// Destroys and undefines, when dropped, every domain whose XML names one of its nodes — only
/// those, checked right before each one — so a failed run leaves nothing behind on libvirtd.
struct DomainGuard {
    nodes: Vec<String>,
}

impl DomainGuard {
    /// Destroys and undefines its nodes' domains; returns what it removed.
    fn sweep(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for node in &self.nodes {
            for name in domains_of(node).unwrap_or_default() {
                // Only a domain that still names the node, looked at once more.
                if !virsh(&["dumpxml", &name]).is_ok_and(|xml| names_node(&xml, node)) {
                    continue;
                }
                let _ = virsh(&["destroy", &name]);
                let _ = virsh(&["undefine", &name, "--managed-save"]);
                removed.push(name);
            }
        }
        removed
    }
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let removed = self.sweep();
        if !removed.is_empty() {
            eprintln!("cleanup: left behind, now destroyed and undefined with virsh: {removed:?}");
        }
    }
}

/// A domain of another node on the same libvirtd, as a second agent would define it: Karri's
/// metadata naming `node`. Runs under TCG with 64 MiB and no disk.
fn neighbour_xml(node: &str) -> (String, String) {
    let hex = random_token();
    let instance_id = format!("i-{}", &hex[..17]);
    let name = format!("karri-{instance_id}");
    let uuid = format!(
        "{}-{}-4{}-8{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..15],
        &hex[15..18],
        &hex[18..30]
    );
    let xml = format!(
        r#"<domain type="qemu">
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <karri:instance xmlns:karri="https://karri.dev/xmlns/domain/1">
      <karri:uid>{uuid}</karri:uid>
      <karri:instanceId>{instance_id}</karri:instanceId>
      <karri:namespace>{NS}</karri:namespace>
      <karri:node>{node}</karri:node>
    </karri:instance>
  </metadata>
  <memory unit="MiB">64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
  </os>
  <on_poweroff>destroy</on_poweroff>
</domain>
"#
    );
    (name, xml)
}

async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// etcd, the gateway, the operator and the node agent of one run.
struct World {
    // Dropped first to last: the agent and operator die before the gateway and etcd.
    agent: Service,
    operator: Service,
    gateway: Gateway,
    _etcd: Etcd,
    node: String,
    admin: PathBuf,
    instances: Api<Instance>,
    logs: tempfile::TempDir,
    agent_starts: usize,
}

impl World {
    async fn start(node: &str) -> anyhow::Result<World> {
        let etcd = Etcd::start().await?;
        let tokens = Tokens::generate(&[node], &[]);
        let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
        let admin = gateway.kubeconfig(&tokens.admin, NS)?;
        let samples = workspace_root().join("config").join("samples");
        for sample in ["availability-zone.yaml", "instance-type.yaml"] {
            let path = samples.join(sample);
            kubectl_ok(&admin, &["apply", "-f", path_str(&path)?])?;
        }
        let logs = tempfile::Builder::new().prefix("karri-qemu-").tempdir()?;
        // QEMU runs as libvirt-qemu under the system libvirtd: the agent's data directory (image
        // cache, overlays) must be reachable for it.
        std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o755))?;
        let data_dir = logs.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        karri_e2e::cloud::register_blank_image(&client(&admin).await?, &data_dir, NS).await?;
        let envs = [("RUST_LOG".to_owned(), "info,node_agent=debug".to_owned())];
        let operator_kc = gateway.kubeconfig(&tokens.operator, "default")?;
        let operator = Service::spawn(
            "operator",
            "operator",
            logs.path(),
            &strings(&[
                "--kubeconfig",
                path_str(&operator_kc)?,
                "--metrics-listen",
                "127.0.0.1:0",
                "--leader-lease-seconds",
                "3",
            ]),
            &envs,
        )?;
        let node_kc = gateway.kubeconfig(tokens.node(node).context("no node token")?, "default")?;
        // This machine has 2 CPUs: offer more vCPUs than that (idle guests share them), and a
        // fixed memory and disk, so that placement has room for the five t1.micro.
        let agent = Service::spawn(
            "node-agent",
            "node-agent",
            logs.path(),
            &strings(&[
                "--kubeconfig",
                path_str(&node_kc)?,
                "--node-name",
                node,
                "--zone",
                ZONE,
                "--libvirt-uri",
                URI,
                "--metrics-listen",
                "127.0.0.1:0",
                "--vcpus",
                "8",
                "--memory-mib",
                "4096",
                "--disk-gib",
                "100",
                // These domains boot no OS, so nothing obeys the power button a terminate
                // presses first: they are forced off after this.
                "--terminate-timeout-seconds",
                "3",
                "--data-dir",
                path_str(&data_dir)?,
            ]),
            &envs,
        )?;
        let instances = Api::namespaced(client(&admin).await?, NS);
        Ok(World {
            agent,
            operator,
            gateway,
            _etcd: etcd,
            node: node.to_owned(),
            admin,
            instances,
            logs,
            agent_starts: 1,
        })
    }

    /// The last lines of the agent's, the operator's and the gateway's logs.
    fn logs(&self) -> String {
        format!(
            "{}\n{}\n--- api-gateway ---\n{}\n(logs in {})",
            self.agent.log_tail(),
            self.operator.log_tail(),
            self.gateway.log_tail(),
            self.logs.path().display()
        )
    }

    /// Polls `probe` every [`POLL`] until it gives a value, failing after `deadline` with what
    /// it last saw and the logs.
    async fn wait_for<T, F, Fut>(
        &self,
        what: &str,
        deadline: Duration,
        mut probe: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let start = Instant::now();
        loop {
            let last = match probe().await {
                Ok(value) => return Ok(value),
                Err(last) => last,
            };
            if start.elapsed() > deadline {
                bail!(
                    "timed out after {deadline:?} waiting for {what}; last: {last}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The agent's metrics address, as the current process logged it.
    async fn agent_metrics_addr(&self) -> anyhow::Result<String> {
        let log = self.logs.path().join("node-agent.log");
        self.wait_for("the agent's metrics address", DEADLINE, || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let addrs: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("metrics served"))
                .filter_map(|l| l.split("addr=").nth(1)?.split_whitespace().next())
                .collect();
            match addrs.last() {
                Some(addr) if addrs.len() == self.agent_starts => Ok(addr.to_string()),
                _ => Err(format!("{} addresses logged", addrs.len())),
            }
        })
        .await
    }

    /// The agent's counters, by the line's name and labels, e.g.
    /// `karri_node_agent_domain_actions_total{action="define"}`.
    async fn agent_counters(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let addr = self.agent_metrics_addr().await?;
        let text = self
            .wait_for("a scrape of the agent", DEADLINE, || async {
                scrape(&addr).await.ok_or_else(|| "no answer".to_owned())
            })
            .await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_owned(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// Deletes every instance and waits until the agent has removed their domains; the
    /// graceful cleanup, run whether the scenario passed or not.
    async fn delete_all(&mut self) -> anyhow::Result<()> {
        if !self.agent.running() {
            self.agent.restart()?;
            self.agent_starts += 1;
        }
        for instance in self.instances.list(&ListParams::default()).await? {
            self.instances
                .delete(&instance.name_any(), &DeleteParams::default())
                .await?;
        }
        let node = self.node.clone();
        self.wait_for("the agent to remove every domain", DEADLINE, || async {
            match domains_of(&node) {
                Ok(left) if left.is_empty() => Ok(()),
                Ok(left) => Err(format!("{left:?} still defined")),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("non-UTF-8 path")
}

/// One scrape of `/metrics`, or `None` while nothing answers.
async fn scrape(addr: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// The manifest of the five instances.
fn manifest() -> String {
    (1..=INSTANCES)
        .map(|i| {
            format!(
                "apiVersion: karri.dev/v1alpha1\n\
                 kind: Instance\n\
                 metadata:\n  name: vm-{i}\n  namespace: {NS}\n\
                 spec:\n  imageId: emi-0123456789abcdef0\n  instanceType: t1.micro\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// An instance's domain name, `karri-<its karri.dev/id label>`.
fn domain_of(instance: &Instance) -> anyhow::Result<String> {
    let id = instance
        .labels()
        .get(ID_LABEL)
        .with_context(|| format!("{} has no {ID_LABEL} label", instance.name_any()))?;
    Ok(format!("karri-{id}"))
}

fn state_of(instance: &Instance) -> Option<InstanceState> {
    instance.status.as_ref().map(|s| s.state)
}

#[tokio::test]
async fn agent_killed_with_five_running_domains_adopts_them_untouched() -> anyhow::Result<()> {
    let started = Instant::now();
    require_libvirtd();
    let node = format!("qemu-{}", &random_token()[..8]);
    let neighbour = format!("{node}-neighbour");
    // Created first, dropped last: after every process of the run is dead.
    let guard = DomainGuard {
        nodes: vec![node.clone(), neighbour.clone()],
    };

    // Another node's domain on the same libvirtd, running before our agent starts.
    let (neighbours_domain, xml) = neighbour_xml(&neighbour);
    let xml_path = std::env::temp_dir().join(format!("{neighbours_domain}.xml"));
    std::fs::write(&xml_path, xml)?;
    virsh(&["define", path_str(&xml_path)?])?;
    let _ = std::fs::remove_file(&xml_path);
    virsh(&["start", &neighbours_domain])?;
    let neighbour_before = running(&neighbours_domain)?;

    let mut world = World::start(&node).await?;
    eprintln!(
        "etcd, gateway, catalogue, operator and agent started in {:?}",
        started.elapsed()
    );
    let result = scenario(&mut world, &neighbours_domain, &neighbour_before).await;
    let cleanup_started = Instant::now();
    let cleanup = world.delete_all().await;
    match &cleanup {
        Ok(()) => eprintln!(
            "cleanup: every record deleted, the agent removed the domains in {:?}",
            cleanup_started.elapsed()
        ),
        Err(error) => eprintln!("cleanup through the agent failed: {error:#}"),
    }
    drop(world);
    // The neighbour's domain is the test's own too.
    let _ = virsh(&["destroy", &neighbours_domain]);
    let _ = virsh(&["undefine", &neighbours_domain]);
    let guard_started = Instant::now();
    drop(guard);
    eprintln!(
        "cleanup: last-resort virsh pass in {:?}; total {:?}",
        guard_started.elapsed(),
        started.elapsed()
    );
    result?;
    cleanup?;
    Ok(())
}

async fn scenario(
    world: &mut World,
    neighbours_domain: &str,
    neighbour_before: &Running,
) -> anyhow::Result<()> {
    let node = world.node.clone();
    let t0 = Instant::now();

    // Five instances, applied as a user would.
    let manifest_path = world.logs.path().join("instances.yaml");
    std::fs::write(&manifest_path, manifest())?;
    kubectl_ok(&world.admin, &["apply", "-f", path_str(&manifest_path)?])?;
    let applied = Instant::now();
    let instances = world
        .wait_for("the five instances to run", RUNNING_DEADLINE, || async {
            let list = world
                .instances
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let states: Vec<_> = list
                .items
                .iter()
                .map(|i| (i.name_any(), state_of(i)))
                .collect();
            let all_running = list.items.len() == INSTANCES
                && list
                    .items
                    .iter()
                    .all(|i| state_of(i) == Some(InstanceState::Running));
            if all_running {
                Ok(list.items)
            } else {
                Err(format!("{states:?}"))
            }
        })
        .await?;
    eprintln!(
        "apply → {INSTANCES} running: {:?} (kubectl apply itself took {:?})",
        applied.elapsed(),
        applied - t0
    );

    let mut before = BTreeMap::new();
    let mut domains = BTreeMap::new();
    for instance in &instances {
        let name = instance.name_any();
        let status = instance.status.as_ref().context("no status")?;
        ensure!(
            status.node_name.as_deref() == Some(node.as_str()),
            "{name} is on {:?}, not {node}",
            status.node_name
        );
        let domain = domain_of(instance)?;
        let uuid = virsh(&["domuuid", &domain])?;
        ensure!(
            Some(uuid.trim()) == instance.uid().as_deref(),
            "{domain} has UUID {uuid}, not the record's UID"
        );
        before.insert(name.clone(), running(&domain)?);
        domains.insert(name, domain);
    }
    let ours = domains_of(&node)?;
    let mut expected: Vec<String> = domains.values().cloned().collect();
    expected.sort();
    ensure!(
        ours == expected,
        "the node's domains {ours:?} are not the instances' {domains:?}"
    );
    eprintln!("running: {before:?}");
    ensure!(
        running(neighbours_domain)? == *neighbour_before,
        "the neighbour's domain was touched"
    );

    // kill -9 the agent; while it is down, delete one record.
    world.agent.kill();
    let killed = Instant::now();
    world
        .instances
        .delete(DELETED, &DeleteParams::default())
        .await?;
    // The operator's finalizer keeps the record until the agent has removed the domain.
    let deleting = world
        .wait_for("the deleted record to be terminating", DEADLINE, || async {
            match world.instances.get_opt(DELETED).await {
                Ok(Some(i)) if i.metadata.deletion_timestamp.is_some() => Ok(i),
                Ok(Some(_)) => Err("no deletion timestamp yet".into()),
                Ok(None) => Err("the record is gone while the agent is down".into()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
    ensure!(
        !deleting.finalizers().is_empty(),
        "no finalizer holds {DELETED}"
    );
    let deleted_domain = domains[DELETED].clone();
    ensure!(
        running(&deleted_domain)? == before[DELETED],
        "{deleted_domain} changed while the agent was down"
    );

    world.agent.restart()?;
    world.agent_starts += 1;
    let restarted = Instant::now();

    // The deleted record's domain is shut down (the power button, then forced off, as nothing
    // in it obeys the button) and undefined, then the record goes.
    world
        .wait_for(
            "the deleted record's domain removed and the record gone",
            DEADLINE,
            || async {
                let listed = all_domains().map_err(|e| format!("{e:#}"))?;
                if listed.contains(&deleted_domain) {
                    return Err(format!("{deleted_domain} is still defined"));
                }
                match world.instances.get_opt(DELETED).await {
                    Ok(None) => Ok(()),
                    Ok(Some(i)) => Err(format!("{DELETED} is still there: {:?}", state_of(&i))),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await?;
    eprintln!(
        "restart → deleted domain removed and record gone: {:?} (agent down for {:?})",
        restarted.elapsed(),
        restarted - killed
    );

    // The new agent has looked at every record (4 live, the deleted one at least once) ...
    let counters = world
        .wait_for("the restarted agent to reconcile", DEADLINE, || async {
            let counters = world.agent_counters().await.map_err(|e| format!("{e:#}"))?;
            let reconciles = counters
                .get("karri_node_agent_reconciles_total")
                .copied()
                .unwrap_or(0.0);
            if reconciles >= INSTANCES as f64 {
                Ok(counters)
            } else {
                Err(format!("{reconciles} reconciles"))
            }
        })
        .await?;
    // ... and did nothing but remove the deleted record's domain: the power button, then the
    // forced stop after the terminate timeout.
    let action = |name: &str| {
        counters
            .get(&format!(
                "karri_node_agent_domain_actions_total{{action=\"{name}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    let actions: Vec<(&str, f64)> = ["define", "start", "shutdown", "destroy", "undefine"]
        .into_iter()
        .map(|a| (a, action(a)))
        .collect();
    ensure!(
        actions
            == [
                ("define", 0.0),
                ("start", 0.0),
                ("shutdown", 1.0),
                ("destroy", 1.0),
                ("undefine", 1.0)
            ],
        "the restarted agent's actions: {actions:?}"
    );

    // The four others: same domain IDs, same QEMU processes, one domain each, nothing else.
    let mut left: Vec<String> = Vec::new();
    for (name, was) in &before {
        if name == DELETED {
            continue;
        }
        let domain = &domains[name];
        let now = running(domain)?;
        ensure!(
            now == *was,
            "{name}'s domain {domain} was touched: {was:?} then {now:?}"
        );
        left.push(domain.clone());
    }
    let ours = domains_of(&node)?;
    left.sort();
    ensure!(
        ours == left,
        "exactly one domain per remaining instance: {ours:?}, expected {left:?}"
    );
    let listed = all_domains()?;
    for domain in &left {
        let count = listed.iter().filter(|d| *d == domain).count();
        ensure!(count == 1, "{domain} is listed {count} times");
    }
    let remaining = world.instances.list(&ListParams::default()).await?;
    ensure!(
        remaining.items.len() == INSTANCES - 1
            && remaining
                .items
                .iter()
                .all(|i| state_of(i) == Some(InstanceState::Running)),
        "the remaining records: {:?}",
        remaining
            .items
            .iter()
            .map(|i| (i.name_any(), state_of(i)))
            .collect::<Vec<_>>()
    );

    // Another node's domain on the same libvirtd: never listed, touched or swept.
    ensure!(
        running(neighbours_domain)? == *neighbour_before,
        "the neighbour's domain was touched"
    );
    eprintln!("scenario: {:?}", t0.elapsed());
    Ok(())
}
