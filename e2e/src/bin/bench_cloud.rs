//! `bench-cloud`: the cloud benchmark behind `make bench`.
//!
//! Starts, through [`karri_e2e::cloud`], a real etcd, the `api-gateway`, one `operator` and
//! [`AGENTS`] `node-agent`s on libvirt's test driver, all from `$KARRI_BIN_DIR` (build them with
//! `cargo build --release -p api-gateway -p operator`, then the node agent on its own as `make
//! bench` does, its dependencies optimised for size (see the Makefile), and point
//! `KARRI_BIN_DIR` at `target/release`). Then it
//! creates [`INSTANCES`] instances at once (one task per create) and measures, for each, the
//! time from just before its create request is sent until a kube-rs
//! watcher on the instances (started and synced before the batch) receives the record with
//! `status.state == running`, timestamped on arrival.
//!
//! It prints p50/p95/p99/max of that latency, the launch rate (instances reaching running per
//! second from the first create to the last running), and the resident memory (`VmRSS` of
//! `/proc/<pid>/status`) of the gateway, the operator and one agent after the batch, with
//! PASS/MISS against the goals: p99 <= 1 s, >= 50 launches/s, agent RSS <= 30 MB (decimal,
//! 30,000,000 bytes). Informational rows, which never enter PASS/MISS, break the latency down
//! (create response, create → bound, bound → running), show CPU seconds each process spent
//! during the batch (`/proc/<pid>/stat`), the operator's and agents' reconcile counts, errors and
//! durations, and the gateway's request latency, all from their own `/metrics`.
//!
//! Percentiles are exact nearest-rank over all samples; the metrics-derived ones (reconcile and
//! gateway latency) are histogram bucket bounds. The batch is bounded ([`BATCH_TIMEOUT`]), all
//! traffic goes to 127.0.0.1, and everything started is killed when the cloud is dropped at the
//! end of `main` (or on an early error return). The report goes to stdout, progress to stderr.

use karri_e2e::report::pct;
use karri_e2e::report::{command_line, cpu_ticks, out, pass, ticks_per_second};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context};
use crds::InstanceState;
use futures::StreamExt;
use karri_e2e::cloud::{
    instance, memory_status, metric, node_of, rss_kib, state_of, Cloud, Options, INSTANCE_TYPE,
};
use karri_testkit::bin_dir;
use kube::api::PostParams;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Node agents (test driver, one process each).
const AGENTS: usize = 10;
/// Instances created at once.
const INSTANCES: usize = 100;
/// How long the batch may take before the benchmark gives up.
const BATCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the watcher gets to list before the batch.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Goals.
const P99_GOAL: Duration = Duration::from_secs(1);
const RATE_GOAL: f64 = 50.0;
const AGENT_RSS_GOAL_BYTES: u64 = 30_000_000;

/// What the watcher saw first for an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Milestone {
    /// `status.nodeName` set.
    Bound,
    /// `status.state == running`.
    Running,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// `p50 / p95 / p99 / max` of `samples`.
fn spread(samples: &mut [Duration]) -> String {
    format!(
        "p50 {}  p95 {}  p99 {}  max {}",
        ms(pct(samples, 50.0)),
        ms(pct(samples, 95.0)),
        ms(pct(samples, 99.0)),
        ms(pct(samples, 100.0))
    )
}

fn mb(kib: Option<u64>) -> String {
    kib.map_or("unknown".into(), |k| {
        format!("{:.1} MB ({k} KiB)", k as f64 * 1024.0 / 1e6)
    })
}

/// Every sample of metric `name` as `(labels, value)`.
fn series<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, v) = l.trim().rsplit_once(' ')?;
            let (n, labels) = s.split_once('{').unwrap_or((s, "}"));
            (n == name).then_some(())?;
            Some((labels.trim_end_matches('}'), v.parse().ok()?))
        })
        .collect()
}

/// Mean of a histogram (`<name>_sum / <name>_count`) over the samples matching `labels`.
fn hist_mean(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<Duration> {
    let sum = metric(text, &format!("{name}_sum"), labels)?;
    let count = metric(text, &format!("{name}_count"), labels)?;
    (count > 0.0).then(|| Duration::from_secs_f64(sum / count))
}

/// The upper bound of the histogram bucket holding quantile `q` over the samples matching
/// `labels` (buckets of series that differ in other labels are added up).
fn hist_quantile(text: &str, name: &str, labels: &[(&str, &str)], q: f64) -> Option<String> {
    let bucket = format!("{name}_bucket");
    let mut by_le: BTreeMap<u64, (String, f64)> = BTreeMap::new();
    for (l, v) in series(text, &bucket) {
        let pairs: Vec<&str> = l.split(',').map(str::trim).collect();
        if !labels
            .iter()
            .all(|(k, val)| pairs.contains(&format!("{k}=\"{val}\"").as_str()))
        {
            continue;
        }
        let Some(le) = pairs.iter().find_map(|p| p.strip_prefix("le=\"")) else {
            continue;
        };
        let le = le.trim_end_matches('"');
        let bound: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let key = if bound.is_infinite() {
            u64::MAX
        } else {
            (bound * 1e9) as u64
        };
        by_le.entry(key).or_insert_with(|| (le.to_owned(), 0.0)).1 += v;
    }
    let total = by_le.values().last()?.1;
    if total <= 0.0 {
        return None;
    }
    by_le
        .values()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| match le.parse::<f64>() {
            Ok(s) => format!("<= {}", ms(Duration::from_secs_f64(s))),
            Err(_) => format!("> the largest bucket ({le})"),
        })
}

/// Errors by label of `<name>` as `error=N` pairs, or `none`.
fn errors(text: &str, name: &str) -> String {
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    for (labels, v) in series(text, name) {
        let error = labels
            .split(',')
            .find_map(|p| p.trim().strip_prefix("error=\""))
            .map_or("?", |e| e.trim_end_matches('"'));
        *by.entry(error.to_owned()).or_default() += v;
    }
    if by.is_empty() {
        "none".into()
    } else {
        by.iter()
            .map(|(k, v)| format!("{k}={v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    progress(format!(
        "starting etcd, api-gateway, 1 operator and {AGENTS} node agents from {}",
        bin_dir().display()
    ));
    let cloud = Cloud::start(Options {
        agents: AGENTS,
        ..Options::default()
    })
    .await
    .context("starting the cloud")?;

    out("=== Karri cloud benchmark (bench-cloud) ===");
    out(format!(
        "date (UTC)      : {}",
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    ));
    out(format!("nproc           : {}", command_line("nproc", &[])));
    out(format!(
        "kernel          : {}",
        command_line("uname", &["-r"])
    ));
    out(format!("binaries        : {}", bin_dir().display()));
    out(format!(
        "cloud           : etcd, api-gateway, 1 operator, {AGENTS} node agents (libvirt test:///default, one process each, 64 vCPU / 256 GiB offered), all on 127.0.0.1 sharing the cores with this client"
    ));
    out(format!(
        "batch           : {INSTANCES} instances ({INSTANCE_TYPE}) created at once, one tokio task per create, one kube-rs client (admin)"
    ));
    out("latency         : just before the create request is sent -> a kube-rs watcher (listed before the batch) receives the record with status.state == running");
    out("percentiles     : exact nearest-rank over all samples; from /metrics: histogram bucket bounds");

    // The watcher, synced before the batch; it reports each instance's first binding and first
    // `running` with the time the event arrived.
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Milestone, Instant)>();
    let (synced_tx, synced) = oneshot::channel::<()>();
    let watch_api = cloud.instances();
    let watch = tokio::spawn(async move {
        let mut synced_tx = Some(synced_tx);
        let mut bound = HashSet::new();
        let mut running = HashSet::new();
        let mut stream = watcher::watcher(watch_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = stream.next().await {
            let at = Instant::now();
            let instance = match event {
                Ok(Event::InitDone) => {
                    if let Some(s) = synced_tx.take() {
                        let _ = s.send(());
                    }
                    continue;
                }
                Ok(Event::Apply(i) | Event::InitApply(i)) => i,
                Ok(_) | Err(_) => continue,
            };
            let name = instance.name_any();
            if node_of(&instance).is_some() && bound.insert(name.clone()) {
                let _ = tx.send((name.clone(), Milestone::Bound, at));
            }
            if state_of(&instance) == Some(InstanceState::Running) && running.insert(name.clone()) {
                let _ = tx.send((name, Milestone::Running, at));
            }
        }
    });
    tokio::time::timeout(SYNC_TIMEOUT, synced)
        .await
        .context("the watcher did not list in time")?
        .context("the watcher ended")?;

    let pids: Vec<(String, Option<u32>)> = [
        ("etcd".to_owned(), cloud.etcd_pid()),
        ("api-gateway".to_owned(), cloud.gateway_pid()),
        ("operator".to_owned(), cloud.operators[0].service.pid()),
    ]
    .into_iter()
    .chain(
        cloud
            .agents
            .iter()
            .map(|a| (a.node.clone(), a.service.pid())),
    )
    .chain([("bench client".to_owned(), Some(std::process::id()))])
    .collect();
    let ticks_before: Vec<Option<u64>> = pids
        .iter()
        .map(|(_, p)| p.and_then(|p| cpu_ticks(&format!("/proc/{p}/stat"))))
        .collect();

    // The agent's memory before the batch: registered, watching, no domains yet.
    let agent_idle = cloud.agents[0].service.pid().map(memory_status);

    progress(format!("creating {INSTANCES} instances at once"));
    let api = cloud.instances();
    let started = Instant::now();
    let mut creates = Vec::with_capacity(INSTANCES);
    for n in 1..=INSTANCES {
        let body = instance(&format!("bench-{n:03}"))?;
        let api = api.clone();
        creates.push(tokio::spawn(async move {
            let sent = Instant::now();
            let created = api.create(&PostParams::default(), &body).await;
            (body.name_any(), sent, Instant::now(), created.map(|_| ()))
        }));
    }
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut create_lat = Vec::new();
    for c in creates {
        let (name, sent, answered, created) = c.await?;
        created.with_context(|| format!("creating {name}"))?;
        create_lat.push(answered - sent);
        sent_at.insert(name, sent);
    }
    let created_all = started.elapsed();

    let deadline = started + BATCH_TIMEOUT;
    let mut bound_at: HashMap<String, Instant> = HashMap::new();
    let mut running_at: HashMap<String, Instant> = HashMap::new();
    while running_at.len() < INSTANCES {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((name, Milestone::Bound, at))) => {
                bound_at.insert(name, at);
            }
            Ok(Some((name, Milestone::Running, at))) => {
                running_at.insert(name, at);
            }
            Ok(None) => bail!("the watcher ended"),
            Err(_) => bail!(
                "only {} of {INSTANCES} instances running after {BATCH_TIMEOUT:?}",
                running_at.len()
            ),
        }
    }
    watch.abort();
    let last_running = running_at.values().max().copied().unwrap_or(started);
    let batch = last_running - started;
    progress(format!(
        "all {INSTANCES} running {:.3} s after the first create",
        batch.as_secs_f64()
    ));

    // Resident memory and CPU right after the batch.
    let ticks_per_s = ticks_per_second();
    let cpu: Vec<Option<f64>> = pids
        .iter()
        .zip(&ticks_before)
        .map(|((_, p), before)| {
            let now = p.and_then(|p| cpu_ticks(&format!("/proc/{p}/stat")))?;
            Some(now.saturating_sub((*before)?) as f64 / ticks_per_s)
        })
        .collect();
    let rss_of = |pid: Option<u32>| pid.and_then(rss_kib);
    let gateway_rss = rss_of(cloud.gateway_pid());
    let operator_rss = rss_of(cloud.operators[0].service.pid());
    let agent_rss = rss_of(cloud.agents[0].service.pid());
    let agent_rss_all: Vec<u64> = cloud
        .agents
        .iter()
        .filter_map(|a| rss_of(a.service.pid()))
        .collect();
    let operator_text = cloud.operator_metrics(0).await?;
    let mut agent_texts = Vec::new();
    for i in 0..cloud.agents.len() {
        agent_texts.push(cloud.agent_metrics(i).await?);
    }
    let gateway_text = cloud.gateway_metrics().await?;

    let mut latency: Vec<Duration> = running_at
        .iter()
        .filter_map(|(n, at)| Some(*at - *sent_at.get(n)?))
        .collect();
    let mut to_bound: Vec<Duration> = bound_at
        .iter()
        .filter_map(|(n, at)| Some(*at - *sent_at.get(n)?))
        .collect();
    let mut bound_to_running: Vec<Duration> = running_at
        .iter()
        .filter_map(|(n, at)| Some(at.saturating_duration_since(*bound_at.get(n)?)))
        .collect();
    let rate = INSTANCES as f64 / batch.as_secs_f64().max(1e-9);
    let p99 = pct(&mut latency, 99.0);

    out("");
    out(format!(
        "--- {INSTANCES} instances applied at once over {AGENTS} node agents ---"
    ));
    out(format!("create -> running   : {}", spread(&mut latency)));
    out(format!(
        "launch rate         : {rate:.1} instances/s ({INSTANCES} running {:.3} s after the first create request)",
        batch.as_secs_f64()
    ));
    out(format!("RSS api-gateway     : {}", mb(gateway_rss)));
    out(format!("RSS operator        : {}", mb(operator_rss)));
    out(format!("RSS node-agent      : {} (node-1)", mb(agent_rss)));
    out("");
    out("--- Breakdown (informational) ---");
    out(format!(
        "create response     : {}  (all {INSTANCES} answered {:.3} s after the first was sent)",
        spread(&mut create_lat),
        created_all.as_secs_f64()
    ));
    out(format!(
        "create -> bound     : {}  (operator placement, as seen by the watcher; {} seen)",
        spread(&mut to_bound),
        bound_at.len()
    ));
    out(format!(
        "bound -> running    : {}  (node agent define + start + status report)",
        spread(&mut bound_to_running)
    ));
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in cloud.list_instances().await? {
        *per_node
            .entry(node_of(&i).unwrap_or("unbound").to_owned())
            .or_default() += 1;
    }
    out(format!(
        "placement           : {}",
        per_node
            .iter()
            .map(|(n, c)| format!("{n}={c}"))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    out(format!(
        "RSS node agents     : min {} / max {} over {} agents",
        mb(agent_rss_all.iter().min().copied()),
        mb(agent_rss_all.iter().max().copied()),
        agent_rss_all.len()
    ));
    let breakdown = |m: Option<Vec<(&str, u64)>>| {
        m.filter(|m| !m.is_empty()).map_or("unknown".into(), |m| {
            m.iter()
                .map(|(f, v)| match *f {
                    "Threads" => format!("{f} {v}"),
                    _ => format!("{f} {:.1} MB", *v as f64 * 1024.0 / 1e6),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
    };
    out(format!(
        "node-1 memory       : before the batch: {}",
        breakdown(agent_idle)
    ));
    out(format!(
        "                      after the batch:  {}",
        breakdown(cloud.agents[0].service.pid().map(memory_status))
    ));
    let cpu_line = pids
        .iter()
        .zip(&cpu)
        .filter(|((n, _), _)| !n.starts_with("node-"))
        .map(|((n, _), c)| format!("{n} {}", c.map_or("?".into(), |c| format!("{c:.2} s"))))
        .collect::<Vec<_>>()
        .join(", ");
    let agents_cpu: f64 = pids
        .iter()
        .zip(&cpu)
        .filter(|((n, _), _)| n.starts_with("node-"))
        .filter_map(|(_, c)| *c)
        .sum();
    out(format!(
        "CPU during batch    : {cpu_line}, {AGENTS} node agents {agents_cpu:.2} s in total; {:.2} s wall x {} cores",
        batch.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));

    let reconcile = "karri_operator_reconcile_duration_seconds";
    for controller in ["instances", "nodes"] {
        let l = [("controller", controller)];
        out(format!(
            "operator {controller:<9}  : {:.0} reconciles, mean {}, p99 {}",
            metric(&operator_text, "karri_operator_reconciles_total", &l).unwrap_or(0.0),
            hist_mean(&operator_text, reconcile, &l).map_or("-".into(), ms),
            hist_quantile(&operator_text, reconcile, &l, 0.99).unwrap_or("-".into()),
        ));
    }
    out(format!(
        "operator            : {:.0} placements; reconcile errors: {}",
        metric(&operator_text, "karri_operator_placements_total", &[]).unwrap_or(0.0),
        errors(&operator_text, "karri_operator_reconcile_errors_total")
    ));
    let all_agents = agent_texts.join("\n");
    let agent_reconcile = "karri_node_agent_reconcile_duration_seconds";
    out(format!(
        "node agents         : {:.0} reconciles, mean {}, p99 {}; actions: define {:.0}, start {:.0}; errors: {}",
        metric(&all_agents, "karri_node_agent_reconciles_total", &[]).unwrap_or(0.0),
        hist_mean(&all_agents, agent_reconcile, &[]).map_or("-".into(), ms),
        hist_quantile(&all_agents, agent_reconcile, &[], 0.99).unwrap_or("-".into()),
        metric(&all_agents, "karri_node_agent_domain_actions_total", &[("action", "define")])
            .unwrap_or(0.0),
        metric(&all_agents, "karri_node_agent_domain_actions_total", &[("action", "start")])
            .unwrap_or(0.0),
        errors(&all_agents, "karri_node_agent_reconcile_errors_total"),
    ));
    let request = "karri_gateway_request_duration_seconds";
    for verb in ["create", "update", "get", "list", "patch"] {
        let l = [("verb", verb), ("resource", "instances")];
        let Some(count) = metric(&gateway_text, "karri_gateway_requests_total", &l) else {
            continue;
        };
        let codes: BTreeMap<String, f64> = series(&gateway_text, "karri_gateway_requests_total")
            .into_iter()
            .filter(|(labels, _)| {
                labels.contains(&format!("verb=\"{verb}\""))
                    && labels.contains("resource=\"instances\"")
            })
            .filter_map(|(labels, v)| {
                let code = labels
                    .split(',')
                    .find_map(|p| p.trim().strip_prefix("code=\""))?;
                Some((code.trim_end_matches('"').to_owned(), v))
            })
            .collect();
        out(format!(
            "gateway {verb:<7} inst : {count:.0} requests ({}), mean {}, p99 {}",
            codes
                .iter()
                .map(|(c, v)| format!("{c}: {v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            hist_mean(&gateway_text, request, &l).map_or("-".into(), ms),
            hist_quantile(&gateway_text, request, &l, 0.99).unwrap_or("-".into()),
        ));
    }
    out(format!(
        "gateway             : {:.0} etcd writes, {:.0} CAS retries, {:.0} open watches",
        metric(&gateway_text, "karri_gateway_etcd_writes_total", &[]).unwrap_or(0.0),
        metric(&gateway_text, "karri_gateway_conflict_retries_total", &[]).unwrap_or(0.0),
        metric(&gateway_text, "karri_gateway_watchers", &[]).unwrap_or(0.0),
    ));

    let agent_ok = agent_rss.is_some_and(|k| k * 1024 <= AGENT_RSS_GOAL_BYTES);
    out("");
    out("--- Goals ---");
    out(format!(
        "  [{}] create -> running p99 <= {} (measured {})",
        pass(p99 <= P99_GOAL),
        ms(P99_GOAL),
        ms(p99)
    ));
    out(format!(
        "  [{}] launch rate >= {RATE_GOAL:.0}/s (measured {rate:.1}/s)",
        pass(rate >= RATE_GOAL)
    ));
    out(format!(
        "  [{}] node agent RSS <= 30 MB (measured {})",
        pass(agent_ok),
        mb(agent_rss)
    ));
    Ok(())
}
