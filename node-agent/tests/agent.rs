//! The node agent as a process, against a real gateway on a real etcd, driven with kube-rs as
//! the admin: it registers its Node and renews its lease; it runs the instances bound to it as
//! domains of libvirt's test driver, following their desired state and removing a domain whose
//! record is gone; and after kill -9 it reports the same instances running again.
//!
//! The test driver keeps its domains inside the agent process, so the tests see them through
//! the agent's `/metrics`: the gauge `karri_node_agent_domains{state=...}` is refreshed from
//! libvirt (`list_ours`) on every scrape, so it is what the host holds at that moment. The
//! agent listens on `127.0.0.1:0` and logs the address it got ("metrics served addr=...").
//!
//! Every wait is bounded polling (100 ms, 20 s), never a fixed sleep.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use crds::common::find_condition;
use crds::{
    Condition, ConditionStatus, DesiredState, Instance, InstanceSpec, InstanceType,
    InstanceTypeSpec, Lease, Node, NodeResources, NODE_LEASE_NAMESPACE,
};
use karri_testkit::{Etcd, Gateway, Service, Tokens};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NODE: &str = "node-1";
const OTHER_NODE: &str = "node-2";
const ZONE: &str = "karri-1a";
const NS: &str = "acme";
const TYPE: &str = "m1.small";
const POLL: Duration = Duration::from_millis(100);
const DEADLINE: Duration = Duration::from_secs(20);

/// etcd, the gateway, an admin client and a directory for kubeconfigs and agent logs.
struct World {
    _etcd: Etcd,
    gateway: Gateway,
    tokens: Tokens,
    admin: Client,
    logs: tempfile::TempDir,
}

async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

impl World {
    async fn start() -> anyhow::Result<World> {
        let etcd = Etcd::start().await?;
        let tokens = Tokens::generate(&[NODE, OTHER_NODE], &[NS]);
        let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
        let admin = client(&gateway.kubeconfig(&tokens.admin, "default")?).await?;
        let logs = tempfile::Builder::new().prefix("karri-agent-").tempdir()?;
        Ok(World {
            _etcd: etcd,
            gateway,
            tokens,
            admin,
            logs,
        })
    }

    /// Starts a node agent for `node` on the libvirt test driver, with a fixed capacity.
    fn agent(&self, node: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        let token = self.tokens.node(node).context("no token for the node")?;
        let kubeconfig = self.gateway.kubeconfig(token, "default")?;
        let mut args: Vec<String> = [
            "--kubeconfig",
            path_str(&kubeconfig)?,
            "--node-name",
            node,
            "--zone",
            ZONE,
            "--libvirt-uri",
            "test:///default",
            "--vcpus",
            "4",
            "--memory-mib",
            "4096",
            "--disk-gib",
            "50",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let label = format!("node-agent-{node}");
        let envs = [("RUST_LOG".to_owned(), "info,node_agent=debug".to_owned())];
        let service = Service::spawn("node-agent", &label, self.logs.path(), &args, &envs)?;
        Ok(Agent {
            service,
            log: self.logs.path().join(format!("{label}.log")),
            starts: 1,
        })
    }

    async fn create_instance_type(&self) -> anyhow::Result<()> {
        let api: Api<InstanceType> = Api::all(self.admin.clone());
        let itype = InstanceType::new(
            TYPE,
            InstanceTypeSpec {
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 10,
                description: None,
            },
        );
        api.create(&PostParams::default(), &itype).await?;
        Ok(())
    }

    fn instances(&self) -> Api<Instance> {
        Api::namespaced(self.admin.clone(), NS)
    }

    /// Creates an instance as the admin, then binds it to `node` through the status
    /// subresource, as the operator's placement does.
    async fn bound_instance(&self, name: &str, node: &str) -> anyhow::Result<Instance> {
        let spec = InstanceSpec {
            image_id: "emi-0123456789abcdef0".into(),
            instance_type: TYPE.into(),
            key_name: None,
            security_group_ids: Vec::new(),
            user_data: None,
            availability_zone: Some(ZONE.into()),
            desired_state: DesiredState::Running,
            client_token: None,
            reservation_id: None,
            launch_index: None,
            disable_api_termination: false,
            tags: Vec::new(),
            kernel_id: None,
            ramdisk_id: None,
            metadata_options: None,
        };
        let api = self.instances();
        api.create(&PostParams::default(), &Instance::new(name, spec))
            .await?;
        let bound = api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"nodeName": node}})),
            )
            .await?;
        Ok(bound)
    }

    async fn set_desired(&self, name: &str, desired: &str) -> anyhow::Result<Instance> {
        Ok(self
            .instances()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"desiredState": desired}})),
            )
            .await?)
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("path is not UTF-8")
}

/// A running node agent and where it logs.
struct Agent {
    service: Service,
    log: PathBuf,
    /// How many times it was started; each start logs its metrics address once.
    starts: usize,
}

impl Agent {
    /// kill -9 and start again with the same flags.
    fn restart(&mut self) -> anyhow::Result<()> {
        self.service.restart()?;
        self.starts += 1;
        Ok(())
    }

    /// The metrics address the current process logged.
    async fn metrics_addr(&self) -> anyhow::Result<String> {
        wait_for(self, "the agent logs its metrics address", || async {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let addrs: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("metrics served"))
                .filter_map(|l| l.split("addr=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .collect();
            (addrs.len() == self.starts)
                .then(|| addrs.last().map(|a| a.to_string()))
                .flatten()
        })
        .await
    }

    /// One scrape of `/metrics`, or `None` while the agent does not answer.
    async fn scrape(&self, addr: &str) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| body.to_owned())
            .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
    }

    /// Waits until the agent's gauge of domains reads `running` running and `shut_off` shut
    /// off, and no domain is in any other state.
    async fn wait_domains(&self, running: i64, shut_off: i64) -> anyhow::Result<()> {
        let addr = self.metrics_addr().await?;
        wait_for(
            self,
            &format!("{running} running and {shut_off} shut-off domains"),
            || async {
                let text = self.scrape(&addr).await?;
                let counts = domain_counts(&text);
                let others: i64 = counts
                    .iter()
                    .filter(|(state, _)| state != "running" && state != "shut-off")
                    .map(|(_, n)| n)
                    .sum();
                let get = |state: &str| {
                    counts
                        .iter()
                        .find(|(s, _)| s == state)
                        .map_or(0, |(_, n)| *n)
                };
                (get("running") == running && get("shut-off") == shut_off && others == 0)
                    .then_some(())
            },
        )
        .await
    }

    /// The value of a metric without labels, e.g. `karri_node_agent_orphans_removed_total`.
    async fn counter(&self, name: &str) -> anyhow::Result<f64> {
        let addr = self.metrics_addr().await?;
        let text = wait_for(self, "a scrape", || self.scrape(&addr)).await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {name} in\n{text}"))
    }
}

/// `(state, count)` of every `karri_node_agent_domains{state="..."}` line.
fn domain_counts(metrics: &str) -> Vec<(String, i64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("karri_node_agent_domains{state=\""))
        .filter_map(|rest| {
            let (state, value) = rest.split_once("\"} ")?;
            Some((state.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Polls `probe` every [`POLL`] until it gives a value, failing after [`DEADLINE`] with the
/// agent's log tail.
async fn wait_for<T, F, Fut>(agent: &Agent, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if start.elapsed() > DEADLINE {
            bail!(
                "timed out after {DEADLINE:?} waiting for {what}\n{}",
                agent.service.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn domain_condition(instance: &Instance) -> Option<&Condition> {
    find_condition(&instance.status.as_ref()?.conditions, "DomainRunning")
}

/// Waits until the instance's `DomainRunning` condition has `status` and `reason` for the
/// record's current generation; returns the record.
async fn wait_reported(
    world: &World,
    agent: &Agent,
    name: &str,
    status: ConditionStatus,
    reason: &str,
) -> anyhow::Result<Instance> {
    let api = world.instances();
    wait_for(
        agent,
        &format!("{name} reported DomainRunning {status:?}/{reason}"),
        || async {
            let instance = api.get(name).await.ok()?;
            let c = domain_condition(&instance)?;
            (c.status == status
                && c.reason == reason
                && c.observed_generation == instance.metadata.generation)
                .then_some(instance)
        },
    )
    .await
}

#[tokio::test]
async fn agent_registers_its_node_with_capacity_and_renews_its_lease() -> anyhow::Result<()> {
    let world = World::start().await?;
    let agent = world.agent(NODE, &["--lease-seconds", "2", "--resync-seconds", "1"])?;
    let nodes: Api<Node> = Api::all(world.admin.clone());
    let capacity = NodeResources {
        vcpus: 4,
        memory_mib: 4096,
        disk_gib: 50,
    };

    let node = wait_for(&agent, "the Node with its capacity", || async {
        let node = nodes.get_opt(NODE).await.ok()??;
        let status = node.status.as_ref()?;
        (status.capacity == Some(capacity)).then_some(node)
    })
    .await?;
    assert_eq!(node.spec.availability_zone, ZONE);
    let status = node.status.as_ref().context("no status")?;
    assert_eq!(status.allocatable, Some(capacity));
    assert_eq!(status.hypervisor.as_deref(), Some("test"));
    assert_eq!(
        status.agent_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );

    let leases: Api<Lease> = Api::namespaced(world.admin.clone(), NODE_LEASE_NAMESPACE);
    let first = wait_for(&agent, "the node lease", || async {
        let lease = leases.get_opt(NODE).await.ok()??;
        lease.spec.renew_time.clone()
    })
    .await?;
    let lease = leases.get(NODE).await?;
    assert_eq!(lease.spec.holder_identity.as_deref(), Some(NODE));
    assert_eq!(lease.spec.lease_duration_seconds, Some(2));
    wait_for(&agent, "the lease renewed again", || async {
        let lease = leases.get_opt(NODE).await.ok()??;
        lease.spec.renew_time.filter(|t| t.0 > first.0)
    })
    .await?;
    assert!(
        agent
            .counter("karri_node_agent_lease_renewals_total")
            .await?
            >= 2.0
    );

    // The operator owns Ready: the agent re-asserting its own fields keeps it.
    let mut changed = nodes.get(NODE).await?;
    let status = changed.status.get_or_insert_with(Default::default);
    status.capacity = Some(NodeResources {
        vcpus: 1,
        ..capacity
    });
    status.allocatable = status.capacity;
    status.conditions.push(Condition::new(
        "Ready",
        ConditionStatus::True,
        "LeaseRenewed",
        "the node agent renews its lease",
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    ));
    nodes
        .replace_status(NODE, &PostParams::default(), &changed)
        .await?;
    let node = wait_for(&agent, "the capacity re-asserted", || async {
        let node = nodes.get(NODE).await.ok()?;
        (node.status.as_ref()?.capacity == Some(capacity)).then_some(node)
    })
    .await?;
    let ready = find_condition(&node.status.context("no status")?.conditions, "Ready")
        .cloned()
        .context("the agent dropped the operator's Ready condition")?;
    assert_eq!(ready.reason, "LeaseRenewed");
    Ok(())
}

#[tokio::test]
async fn bound_instance_gets_a_domain_that_follows_its_desired_state_and_goes_with_its_record(
) -> anyhow::Result<()> {
    let world = World::start().await?;
    world.create_instance_type().await?;
    let agent = world.agent(NODE, &[])?;
    // Bound to another node: never a domain here.
    world.bound_instance("elsewhere", OTHER_NODE).await?;
    world.bound_instance("web-1", NODE).await?;

    wait_reported(&world, &agent, "web-1", ConditionStatus::True, "Running").await?;
    agent.wait_domains(1, 0).await?;

    world.set_desired("web-1", "stopped").await?;
    wait_reported(&world, &agent, "web-1", ConditionStatus::False, "ShutOff").await?;
    agent.wait_domains(0, 1).await?;

    world.set_desired("web-1", "running").await?;
    let running = wait_reported(&world, &agent, "web-1", ConditionStatus::True, "Running").await?;
    agent.wait_domains(1, 0).await?;
    // The agent wrote only its condition: the binding is intact, the state is the operator's.
    let status = running.status.context("no status")?;
    assert_eq!(status.node_name.as_deref(), Some(NODE));
    assert_eq!(status.conditions.len(), 1, "{:?}", status.conditions);

    // No finalizer: the record goes at once, and the agent removes its domain.
    world
        .instances()
        .delete("web-1", &DeleteParams::default())
        .await?;
    wait_for(&agent, "web-1 gone", || async {
        matches!(world.instances().get_opt("web-1").await, Ok(None)).then_some(())
    })
    .await?;
    agent.wait_domains(0, 0).await?;
    assert_eq!(
        agent
            .counter("karri_node_agent_orphans_removed_total")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn restarted_agent_reports_its_instances_running_again() -> anyhow::Result<()> {
    let world = World::start().await?;
    world.create_instance_type().await?;
    let mut agent = world.agent(NODE, &[])?;
    let names = ["web-1", "web-2", "web-3"];
    for name in names {
        world.bound_instance(name, NODE).await?;
    }
    let mut before = Vec::new();
    for name in names {
        let instance =
            wait_reported(&world, &agent, name, ConditionStatus::True, "Running").await?;
        before.push(domain_condition(&instance).cloned());
    }
    agent.wait_domains(3, 0).await?;

    agent.restart()?;
    // The test driver's domains lived in the killed process: the new one defines and starts
    // them again from the records (on libvirtd they would still run and be adopted).
    agent.wait_domains(3, 0).await?;
    for (name, before) in names.iter().zip(before) {
        let instance = world.instances().get(name).await?;
        assert_eq!(
            domain_condition(&instance).cloned(),
            before,
            "{name} stayed reported running, same transition time"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_reboot_request_resets_the_running_domain_once_and_is_recorded() -> anyhow::Result<()> {
    let world = World::start().await?;
    world.create_instance_type().await?;
    let agent = world.agent(NODE, &["--resync-seconds", "1"])?;
    world.bound_instance("web-1", NODE).await?;
    wait_reported(&world, &agent, "web-1", ConditionStatus::True, "Running").await?;

    let asked = "2026-11-25T10:00:00.000Z";
    world
        .instances()
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {crds::REBOOT_ANNOTATION: asked}}})),
        )
        .await?;
    let api = world.instances();
    wait_for(&agent, "the reboot recorded in status", || async {
        let instance = api.get("web-1").await.ok()?;
        (instance.status?.last_reboot_request.as_deref() == Some(asked)).then_some(())
    })
    .await?;
    let reboots = r#"karri_node_agent_domain_actions_total{action="reboot"}"#;
    assert_eq!(agent.counter(reboots).await?, 1.0);
    // Later resyncs see the request done: no second reboot.
    let status_before = api.get("web-1").await?.metadata.resource_version;
    let passes = "karri_node_agent_reconciles_total";
    let passes_before = agent.counter(passes).await?;
    wait_for(&agent, "two more resyncs", || async {
        (agent.counter(passes).await.ok()? >= passes_before + 2.0).then_some(())
    })
    .await?;
    assert_eq!(agent.counter(reboots).await?, 1.0);
    assert_eq!(
        api.get("web-1").await?.metadata.resource_version,
        status_before,
        "nothing more was written"
    );
    Ok(())
}

#[tokio::test]
async fn a_launch_that_cannot_go_ahead_says_why_and_goes_ahead_once_it_can() -> anyhow::Result<()> {
    let world = World::start().await?;
    let agent = world.agent(NODE, &[])?;
    // Its instance type is not in the catalogue yet: the domain cannot be made.
    world.bound_instance("early", NODE).await?;
    let waiting = wait_reported(
        &world,
        &agent,
        "early",
        ConditionStatus::False,
        "LaunchRetrying",
    )
    .await?;
    let message = domain_condition(&waiting)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains(TYPE) && message.contains("trying again"),
        "the retry does not say why: {message:?}"
    );
    agent.wait_domains(0, 0).await?;
    // Once it can, it does.
    world.create_instance_type().await?;
    wait_reported(&world, &agent, "early", ConditionStatus::True, "Running").await?;
    agent.wait_domains(1, 0).await?;
    Ok(())
}
