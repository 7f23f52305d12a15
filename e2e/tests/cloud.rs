//! The whole cloud under failure: real etcd, gateway, operators and node agents (libvirt's test
//! driver, one process per node) started by [`karri_e2e::cloud`], driven through the resource
//! API with kube-rs, and checked against what the agents read from libvirt
//! (`karri_node_agent_domains{state}` is listed from libvirt on every scrape).
//!
//! With the test driver a node agent's domains live in its own process: an agent killed with -9
//! loses them, and the restarted agent defines and starts them again from the records.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow::{Break, Continue};
use std::time::Duration;

use anyhow::{ensure, Context};
use crds::{ConditionStatus, Instance, InstanceState, Node};
use karri_e2e::cloud::{
    condition, metric, node_of, node_ready, signal, state_of, violation, Cloud, Options,
    CONDITION_DOMAIN_RUNNING, CONDITION_NODE_HEALTHY,
};
use kube::api::{Api, DeleteParams, ListParams};
use kube::ResourceExt;
use tokio::time::Instant;

/// Deadline of a step that waits for one piece of progress.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// A few seconds beyond a lease for the operator to notice and write.
const LEASE_SLACK: Duration = Duration::from_secs(5);

/// `instances`, `running` and `bound` counts of the records, for the progress log.
/// How far the instances have come: records, bound to a node, running.
struct Progress {
    records: usize,
    bound: usize,
    running: usize,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records, {} bound, {} running",
            self.records, self.bound, self.running
        )
    }
}

async fn counts(cloud: &Cloud) -> anyhow::Result<Progress> {
    let records = cloud.list_instances().await?;
    Ok(Progress {
        records: records.len(),
        bound: records.iter().filter(|i| node_of(i).is_some()).count(),
        running: records
            .iter()
            .filter(|i| state_of(i) == Some(InstanceState::Running))
            .count(),
    })
}

/// Prints the progress at a kill and fails when the instances had already converged: the kill
/// must come while they converge.
async fn before_kill(
    cloud: &Cloud,
    what: &str,
    created: Instant,
    instances: usize,
) -> anyhow::Result<()> {
    let now = counts(cloud).await?;
    eprintln!(
        "kill -9 {what} at {:.2} s: {now}",
        created.elapsed().as_secs_f64()
    );
    ensure!(
        now.running < instances,
        "{what} was to be killed while the instances converge, but all {instances} run already"
    );
    Ok(())
}

/// The named instances, in the order of `names`.
async fn named(cloud: &Cloud, names: &[String]) -> anyhow::Result<Vec<Instance>> {
    let mut by_name: BTreeMap<String, Instance> = cloud
        .list_instances()
        .await?
        .into_iter()
        .map(|i| (i.name_any(), i))
        .collect();
    names
        .iter()
        .map(|n| {
            by_name
                .remove(n)
                .with_context(|| format!("instance {n} is gone"))
        })
        .collect()
}

fn condition_status(instance: &Instance, type_: &str) -> Option<ConditionStatus> {
    condition(instance, type_).map(|c| c.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_instances_converge_while_operator_agent_and_gateway_are_killed() -> anyhow::Result<()>
{
    const INSTANCES: usize = 50;
    const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
    const NODE_2: usize = 1;
    let mut cloud = Cloud::start(Options {
        agents: 3,
        ..Options::default()
    })
    .await?;
    let nodes: Vec<String> = cloud.agents.iter().map(|a| a.node.clone()).collect();
    let names: Vec<String> = (1..=INSTANCES).map(|i| format!("vm-{i:02}")).collect();
    let created = Instant::now();
    cloud.create_instances(&names).await?;

    // The operator dies as soon as it has placed an instance.
    cloud
        .wait_until(
            "the operator placed an instance",
            STEP_TIMEOUT,
            async || {
                let records = cloud.list_instances().await?;
                let bound = records.iter().filter(|i| node_of(i).is_some()).count();
                Ok(if bound > 0 {
                    Break(())
                } else {
                    Continue(format!("{bound} bound"))
                })
            },
        )
        .await?;
    before_kill(&cloud, "the operator", created, INSTANCES).await?;
    cloud.restart_operator(0).await?;

    // node-2's agent dies once it runs a domain: its domains die with it (test driver).
    cloud
        .wait_until("node-2 runs a domain", STEP_TIMEOUT, async || {
            let (running, all) = cloud.agent_domains(NODE_2).await?;
            Ok(if running > 0 {
                Break(())
            } else {
                Continue(format!("node-2: {running} running of {all} domains"))
            })
        })
        .await?;
    before_kill(&cloud, "node-2's agent", created, INSTANCES).await?;
    cloud.restart_agent(NODE_2).await?;

    // The gateway dies while node-2's restarted agent has its domains to define again.
    before_kill(&cloud, "the gateway", created, INSTANCES).await?;
    cloud.gateway.restart().await?;

    // Converge. On every probe the agents are scraped before the records are listed: a binding
    // precedes its domain and is never undone, so every domain an agent holds must belong to an
    // instance bound to that node in the listing that follows.
    let mut first_binding: BTreeMap<String, String> = BTreeMap::new();
    let what = format!("all {INSTANCES} instances run, each as one domain on its node");
    let timeout = CONVERGE_TIMEOUT.saturating_sub(created.elapsed());
    cloud
        .wait_until(&what, timeout, async || {
            let mut domains = Vec::new();
            for i in 0..nodes.len() {
                domains.push(cloud.agent_domains(i).await?);
            }
            let records = cloud.list_instances().await?;
            if records.len() > INSTANCES {
                return Err(violation(format!("{} records", records.len())));
            }
            let mut bound: BTreeMap<&str, u64> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
            for r in &records {
                let Some(node) = node_of(r) else { continue };
                let Some(count) = bound.get_mut(node) else {
                    return Err(violation(format!("{} bound to unknown {node}", r.name_any())));
                };
                *count += 1;
                let first = first_binding
                    .entry(r.name_any())
                    .or_insert_with(|| node.to_owned());
                if first != node {
                    return Err(violation(format!(
                        "{} moved from {first} to {node}",
                        r.name_any()
                    )));
                }
            }
            for (node, (_, all)) in nodes.iter().zip(&domains) {
                let bound_here = bound.get(node.as_str()).copied().unwrap_or(0);
                if *all > bound_here {
                    return Err(violation(format!(
                        "{node} holds {all} domains but only {bound_here} instances are bound to it"
                    )));
                }
            }
            let running = records
                .iter()
                .filter(|i| state_of(i) == Some(InstanceState::Running))
                .count();
            let settled = nodes.iter().zip(&domains).all(|(node, (run, all))| {
                let bound_here = bound.get(node.as_str()).copied().unwrap_or(0);
                *run == bound_here && *all == bound_here
            });
            let bound_total: u64 = bound.values().sum();
            let seen = format!(
                "{} records, {running} running, bound {bound:?}, domains (running, all) {domains:?}",
                records.len()
            );
            Ok(
                if records.len() == INSTANCES
                    && running == INSTANCES
                    && bound_total == INSTANCES as u64
                    && settled
                {
                    Break(())
                } else {
                    Continue(seen)
                },
            )
        })
        .await?;
    eprintln!(
        "converged {:.2} s after the creates",
        created.elapsed().as_secs_f64()
    );

    // 0 records lost, each bound to exactly one node, the one it was first bound to.
    let records = cloud.list_instances().await?;
    let listed: BTreeSet<String> = records.iter().map(ResourceExt::name_any).collect();
    let expected: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(listed, expected, "every record survived, none was added");
    let mut bound: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &records {
        let name = r.name_any();
        assert_eq!(state_of(r), Some(InstanceState::Running), "{name}");
        let node = node_of(r).with_context(|| format!("{name} has no status.nodeName"))?;
        assert!(nodes.iter().any(|n| n == node), "{name} is on {node}");
        assert_eq!(
            first_binding.get(&name).map(String::as_str),
            Some(node),
            "{name} stayed where it was first placed"
        );
        bound.entry(node.to_owned()).or_default().insert(name);
    }
    // The field selector the agents watch through agrees: every instance under one node only.
    let mut selected = BTreeSet::new();
    for node in &nodes {
        let params = ListParams::default().fields(&format!("status.nodeName={node}"));
        let here: BTreeSet<String> = cloud
            .instances()
            .list(&params)
            .await?
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        assert_eq!(
            Some(&here),
            bound.get(node).or(Some(&BTreeSet::new())),
            "status.nodeName={node} selects the instances bound to {node}"
        );
        for name in here {
            assert!(selected.insert(name.clone()), "{name} is on two nodes");
        }
    }
    assert_eq!(selected.len(), INSTANCES);
    // libvirt holds exactly the bound instances on each node, all running: 0 orphans, 0
    // duplicates.
    let mut total_running = 0;
    for (i, node) in nodes.iter().enumerate() {
        let (running, all) = cloud.agent_domains(i).await?;
        let bound_here = bound.get(node).map_or(0, BTreeSet::len) as u64;
        assert_eq!(running, bound_here, "running domains on {node}");
        assert_eq!(all, running, "domains on {node} that are not running");
        total_running += running;
        // Each agent process (node-2's since its restart) defined each of its instances once
        // and removed nothing.
        let text = cloud.agent_metrics(i).await?;
        let actions = |action: &str| {
            let name = "karri_node_agent_domain_actions_total";
            metric(&text, name, &[("action", action)]).unwrap_or(0.0)
        };
        assert_eq!(actions("define"), bound_here as f64, "defines on {node}");
        assert_eq!(actions("undefine"), 0.0, "undefines on {node}");
        assert_eq!(actions("destroy"), 0.0, "destroys on {node}");
        eprintln!("{node}: {bound_here} instances bound, {running} domains running");
    }
    assert_eq!(total_running, INSTANCES as u64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_goes_not_ready_and_its_instances_impaired_then_recovers(
) -> anyhow::Result<()> {
    const LEASE: Duration = Duration::from_secs(4);
    let cloud = Cloud::start(Options {
        lease_seconds: LEASE.as_secs(),
        ..Options::default()
    })
    .await?;
    let node = cloud.agents[0].node.clone();
    let names: Vec<String> = vec!["quiet-1".into(), "quiet-2".into()];
    cloud.create_instances(&names).await?;
    cloud.wait_all_running(&names, STEP_TIMEOUT).await?;
    let before = cloud
        .wait_until("both instances are healthy", STEP_TIMEOUT, async || {
            let list = named(&cloud, &names).await?;
            let healthy = list
                .iter()
                .filter(|i| {
                    condition_status(i, CONDITION_NODE_HEALTHY) == Some(ConditionStatus::True)
                })
                .count();
            Ok(if healthy == list.len() {
                Break(list)
            } else {
                Continue(format!("{healthy} healthy"))
            })
        })
        .await?;
    let actions = async || -> anyhow::Result<f64> {
        let text = cloud.agent_metrics(0).await?;
        Ok(metric(&text, "karri_node_agent_domain_actions_total", &[]).unwrap_or(0.0))
    };
    let actions_before = actions().await?;

    // Both instances must stay running on the node throughout (impaired, never rescheduled).
    let check = |list: &[Instance]| -> anyhow::Result<()> {
        for i in list {
            if state_of(i) != Some(InstanceState::Running) || node_of(i) != Some(node.as_str()) {
                return Err(violation(format!(
                    "{} is {:?} on {:?}",
                    i.name_any(),
                    state_of(i),
                    node_of(i)
                )));
            }
        }
        Ok(())
    };

    signal(&cloud.agents[0].service, "STOP")?;
    let stopped = Instant::now();
    let impaired = cloud
        .wait_until(
            &format!("{node} is NotReady and both instances impaired"),
            LEASE + LEASE_SLACK,
            async || {
                let ready = node_ready(&cloud.node(&node).await?);
                let list = named(&cloud, &names).await?;
                check(&list)?;
                let impaired = list
                    .iter()
                    .filter(|i| {
                        condition_status(i, CONDITION_NODE_HEALTHY) == Some(ConditionStatus::False)
                    })
                    .count();
                Ok(
                    if ready == Some(ConditionStatus::False) && impaired == list.len() {
                        Break(list)
                    } else {
                        Continue(format!("node Ready {ready:?}, {impaired} impaired"))
                    },
                )
            },
        )
        .await?;
    eprintln!(
        "{node} NotReady and its instances impaired {:.2} s after SIGSTOP",
        stopped.elapsed().as_secs_f64()
    );
    for i in &impaired {
        let reason = condition(i, CONDITION_NODE_HEALTHY).map(|c| c.reason.as_str());
        assert_eq!(reason, Some("NodeNotReady"), "{}", i.name_any());
    }

    signal(&cloud.agents[0].service, "CONT")?;
    let resumed = Instant::now();
    let after = cloud
        .wait_until(
            &format!("{node} is Ready and both instances healthy again"),
            LEASE + LEASE_SLACK,
            async || {
                let ready = node_ready(&cloud.node(&node).await?);
                let list = named(&cloud, &names).await?;
                check(&list)?;
                let healthy = list
                    .iter()
                    .filter(|i| {
                        condition_status(i, CONDITION_NODE_HEALTHY) == Some(ConditionStatus::True)
                    })
                    .count();
                Ok(
                    if ready == Some(ConditionStatus::True) && healthy == list.len() {
                        Break(list)
                    } else {
                        Continue(format!("node Ready {ready:?}, {healthy} healthy"))
                    },
                )
            },
        )
        .await?;
    eprintln!(
        "{node} Ready and its instances healthy {:.2} s after SIGCONT",
        resumed.elapsed().as_secs_f64()
    );

    // Not restarted: the domains kept running all along.
    for (b, a) in before.iter().zip(&after) {
        let name = a.name_any();
        let since = |i: &Instance| condition(i, CONDITION_DOMAIN_RUNNING).cloned();
        let (was, is) = (since(b), since(a));
        assert_eq!(
            was.as_ref().map(|c| c.status),
            Some(ConditionStatus::True),
            "{name} DomainRunning before"
        );
        assert_eq!(
            is.as_ref().map(|c| (c.status, &c.last_transition_time)),
            was.as_ref().map(|c| (c.status, &c.last_transition_time)),
            "{name}'s domain kept running (DomainRunning lastTransitionTime unchanged)"
        );
        let launched = |i: &Instance| i.status.as_ref().and_then(|s| s.launch_time.clone());
        assert_eq!(launched(a), launched(b), "{name} launchTime unchanged");
    }
    assert_eq!(
        actions().await?,
        actions_before,
        "the agent carried out no hypervisor action"
    );
    assert_eq!(cloud.agent_domains(0).await?, (2, 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_deleted_on_a_lost_host_goes_once_the_hosts_node_record_is_deleted(
) -> anyhow::Result<()> {
    const LEASE: Duration = Duration::from_secs(4);
    let cloud = Cloud::start(Options {
        lease_seconds: LEASE.as_secs(),
        ..Options::default()
    })
    .await?;
    let node = cloud.agents[0].node.clone();
    let name = "lost-1";
    cloud.create_instances(&[name.to_owned()]).await?;
    cloud
        .wait_all_running(&[name.to_owned()], STEP_TIMEOUT)
        .await?;

    // The host goes silent (its agent frozen, its domain still defined there) and the
    // instance is deleted: it waits, shutting down, for its host.
    signal(&cloud.agents[0].service, "STOP")?;
    cloud
        .instances()
        .delete(name, &DeleteParams::default())
        .await?;
    let still_there = |i: Option<Instance>| {
        i.ok_or_else(|| violation("the instance went while its host may still run its domain"))
    };
    let waiting = cloud
        .wait_until(
            &format!("{node} is NotReady while the deleted instance waits"),
            LEASE + LEASE_SLACK,
            async || {
                let ready = node_ready(&cloud.node(&node).await?);
                let i = still_there(cloud.instances().get_opt(name).await?)?;
                Ok(if ready == Some(ConditionStatus::False) {
                    Break(i)
                } else {
                    Continue(format!("node Ready {ready:?}, {:?}", state_of(&i)))
                })
            },
        )
        .await?;
    ensure!(
        state_of(&waiting) == Some(InstanceState::ShuttingDown),
        "the deleted instance on the silent host is {:?}",
        state_of(&waiting)
    );

    // The administrator gives the host up: its Node record goes, and the instance with it once
    // the agent's lease has stood still for a whole lease by the operator's clock.
    Api::<Node>::all(cloud.client.clone())
        .delete(&node, &DeleteParams::default())
        .await?;
    let given_up = Instant::now();
    cloud
        .wait_until(
            "the instance record is gone",
            2 * LEASE + LEASE_SLACK,
            async || {
                Ok(match cloud.instances().get_opt(name).await? {
                    None => Break(()),
                    Some(i) => Continue(format!("{:?}", state_of(&i))),
                })
            },
        )
        .await?;
    eprintln!(
        "the instance went {:.2} s after its Node record",
        given_up.elapsed().as_secs_f64()
    );

    // The host comes back: its agent removes the guest whose record is gone.
    signal(&cloud.agents[0].service, "CONT")?;
    cloud
        .wait_until(
            "the returned agent removed the orphaned domain",
            STEP_TIMEOUT,
            async || {
                Ok(match cloud.agent_domains(0).await? {
                    (0, 0) => Break(()),
                    seen => Continue(format!("(running, defined) domains {seen:?}")),
                })
            },
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_never_both_act_and_the_standby_takes_over() -> anyhow::Result<()> {
    let mut cloud = Cloud::start(Options {
        operators: 2,
        ..Options::default()
    })
    .await?;
    let leader_lease = Duration::from_secs(cloud.options.leader_lease_seconds);
    let gauge = async |cloud: &Cloud, i: usize| -> anyhow::Result<Option<f64>> {
        Ok(metric(
            &cloud.operator_metrics(i).await?,
            "karri_operator_leader",
            &[],
        ))
    };
    // Waits until operator `i` reports the leader gauge `want` (1: leads, 0: stands by).
    let reports = async |cloud: &Cloud, i: usize, want: f64, what: String, within: Duration| {
        cloud
            .wait_until(&what, within, async || {
                let g = gauge(cloud, i).await?;
                Ok(if g == Some(want) {
                    Break(())
                } else {
                    Continue(format!("leader gauge {g:?}"))
                })
            })
            .await
    };
    let leader = cloud
        .wait_until("exactly one operator leads", STEP_TIMEOUT, async || match (
            gauge(&cloud, 0).await?,
            gauge(&cloud, 1).await?,
        ) {
            (Some(1.0), Some(0.0)) => Ok(Break(0)),
            (Some(0.0), Some(1.0)) => Ok(Break(1)),
            (Some(1.0), Some(1.0)) => Err(violation("both operators report leader 1")),
            seen => Ok(Continue(format!("leader gauges {seen:?}"))),
        })
        .await?;
    let standby = 1 - leader;
    let (leader_id, standby_id) = (
        cloud.operators[leader].identity.clone(),
        cloud.operators[standby].identity.clone(),
    );
    eprintln!("{leader_id} leads, {standby_id} stands by");

    let first: Vec<String> = (1..=10).map(|i| format!("first-{i:02}")).collect();
    cloud.create_instances(&first).await?;
    cloud.wait_all_running(&first, STEP_TIMEOUT).await?;
    let counter = |text: &str, name: &str| metric(text, name, &[]).unwrap_or(0.0);
    let leader_text = cloud.operator_metrics(leader).await?;
    let standby_text = cloud.operator_metrics(standby).await?;
    assert_eq!(gauge(&cloud, leader).await?, Some(1.0), "{leader_id} leads");
    assert_eq!(gauge(&cloud, standby).await?, Some(0.0), "{standby_id}");
    assert_eq!(
        counter(&leader_text, "karri_operator_placements_total"),
        10.0,
        "{leader_id} placed the 10 instances, each once"
    );
    assert_eq!(
        counter(&standby_text, "karri_operator_placements_total"),
        0.0,
        "{standby_id} placed nothing"
    );
    assert_eq!(
        counter(&standby_text, "karri_operator_reconciles_total"),
        0.0,
        "{standby_id} reconciled nothing"
    );

    cloud.operators[leader].service.kill();
    let killed = Instant::now();
    reports(
        &cloud,
        standby,
        1.0,
        format!("{standby_id} leads"),
        leader_lease + LEASE_SLACK,
    )
    .await?;
    eprintln!(
        "{standby_id} took over {:.2} s after kill -9 of {leader_id}",
        killed.elapsed().as_secs_f64()
    );

    let second: Vec<String> = (1..=5).map(|i| format!("second-{i:02}")).collect();
    cloud.create_instances(&second).await?;
    let running = cloud.wait_all_running(&second, STEP_TIMEOUT).await?;
    assert_eq!(running.len(), 5);
    let standby_text = cloud.operator_metrics(standby).await?;
    assert_eq!(
        counter(&standby_text, "karri_operator_placements_total"),
        5.0,
        "{standby_id} placed the 5 new instances, each once"
    );
    let lease = cloud.leader_lease().await?.context("no leader lease")?;
    assert_eq!(
        lease.spec.holder_identity.as_deref(),
        Some(standby_id.as_str()),
        "karri-system/karri-operator is held by the standby"
    );
    // The first ten are untouched by the change of leader.
    let all = named(&cloud, &first).await?;
    assert!(all
        .iter()
        .all(|i| state_of(i) == Some(InstanceState::Running)));

    // The killed replica comes back as the standby; the leader, stopped as `make down` stops
    // it (SIGTERM), hands the lease over on its way out: the standby leads well before the
    // lease could have run out.
    cloud.restart_operator(leader).await?;
    reports(
        &cloud,
        leader,
        0.0,
        format!("{leader_id} stands by"),
        STEP_TIMEOUT,
    )
    .await?;
    let stopped = Instant::now();
    ensure!(
        cloud.operators[standby]
            .service
            .terminate(Duration::from_secs(10))?,
        "{standby_id} did not exit on SIGTERM"
    );
    let handover = leader_lease.saturating_sub(Duration::from_secs(1));
    reports(
        &cloud,
        leader,
        1.0,
        format!("{leader_id} leads after {standby_id} stopped"),
        handover,
    )
    .await?;
    eprintln!(
        "{leader_id} took over {:.2} s after SIGTERM to {standby_id}",
        stopped.elapsed().as_secs_f64()
    );
    let lease = cloud.leader_lease().await?.context("no leader lease")?;
    assert_eq!(
        lease.spec.holder_identity.as_deref(),
        Some(leader_id.as_str())
    );

    // A leader stopped while the gateway hangs (stopped, so connections open but nothing is
    // answered) gives up handing the lease over and exits anyway; the lease then runs out.
    let gateway = cloud.gateway_pid().context("the gateway is not running")?;
    let kill = |sig: &str| -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([sig, &gateway.to_string()])
            .status()?;
        ensure!(status.success(), "kill {sig} {gateway} failed");
        Ok(())
    };
    kill("-STOP")?;
    let stopped = Instant::now();
    let exited = cloud.operators[leader]
        .service
        .terminate(Duration::from_secs(15));
    kill("-CONT")?;
    ensure!(
        exited?,
        "{leader_id} did not exit within 15 s of SIGTERM while the gateway hung"
    );
    eprintln!(
        "{leader_id} exited {:.2} s after SIGTERM while the gateway hung",
        stopped.elapsed().as_secs_f64()
    );
    Ok(())
}
