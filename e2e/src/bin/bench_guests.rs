//! `bench-guests`: how long Karri takes to launch real guests, behind `make bench`.
//!
//! Starts a [`GuestCloud`] (etcd, `api-gateway`, `operator` and one `node-agent` from
//! `$KARRI_BIN_DIR`, the agent's host a simulated one: a network namespace with a private
//! libvirtd, guests on QEMU TCG) with a fresh, cold image cache, and launches [`INSTANCES`]
//! micro-image guests on its one node with ONE RunInstances call (`MinCount = MaxCount = 10`, the
//! EC2 way), sent by this program as a SigV4-signed EC2 Query POST (the request awscli sends;
//! awscli itself is not used for it because its own start-up, shown in the report, would be
//! charged to placement).
//!
//! Every timestamp is taken by this program (tokio `Instant`, printed in milliseconds since T0),
//! except the two read from the agent's own log (its tracing timestamps, wall clock, converted
//! with the wall clock read together with T0):
//!
//! - `T0`: just before the RunInstances request is signed and sent;
//! - `placed`: a kube-rs watcher on the account's instances (listed before T0) receives the
//!   record with `status.nodeName` set (the operator writes node, launch spec and address in one
//!   status write);
//! - `overlay`: `<data_dir>/instances/<id>/root.qcow2` exists (the agent fetches the root image
//!   into the cache, then `qemu-img create`s the overlay beside and links it into place);
//! - `prepared`: the agent logs `applying plan` for the instance: everything `Guests::prepare`
//!   does is done (root image fetched, overlay made, kernel and ramdisk fetched, DHCP host entry
//!   and metadata written) and the domain XML rendered; the next step is `virDomainDefineXML`;
//! - `defined`: libvirtd's persistent definition `<simhost>/etc/libvirt/qemu/karri-<id>.xml`
//!   exists (written by the define call);
//! - `qemu`: the QEMU pid file `<simhost>/state/run/qemu/karri-<id>.pid` exists (simhost.sh
//!   bind-mounts `<simhost>/state/run` on the private libvirtd's `/run/libvirt`): QEMU was
//!   spawned by `virDomainCreate`;
//! - `resumed`: libvirt's status file `<simhost>/state/run/qemu/karri-<id>.xml` says
//!   `state='running'`: QEMU is set up and its vCPUs resumed, the end of `virDomainCreate`;
//! - `started`: the watcher receives the record with the agent's `DomainRunning` condition True
//!   (`virDomainCreate` returned, the agent observed the domain running and wrote the status);
//! - `console`: the console log `<data_dir>/console/<id>.log` (written by virtlogd as QEMU
//!   prints) first has a byte;
//! - `ready`: `karri-micro: ready` is in that file;
//! - `api console`: the watcher receives the record with a non-empty `status.consoleOutput`,
//!   which is what GetConsoleOutput serves (the agent reports consoles once a second);
//!   `GetConsoleOutput` itself is polled every 100 ms for the first [`GET_CONSOLE_SAMPLES`]
//!   instances (signed EC2 calls) to show what a user sees.
//!
//! Files are polled every [`POLL`] (5 ms); CPU use of the machine and of each part (QEMU, libvirtd,
//! virtlogd, agent, gateway, etcd, operator, this program) is sampled every [`CPU_BUCKET`] for the
//! timeline. The goal: everything but the guest's own boot, `started - T0` (API, placement, image
//! fetch and overlay, kernel/ramdisk fetch, define, QEMU start, the agent's status write and its
//! delivery to a watcher), p99 <= 1 s. At the end the instances are terminated through awscli, the
//! benchmark waits until their records say terminated and their domains and files are gone, then
//! measures the floor under `domain start`: the same definitions (taken from libvirt before the
//! termination, made independent of Karri by [`floor_definition`]) defined and started at once
//! by this program alone through libvirt's API on the same libvirtd, so the report shows how much
//! of the goal libvirt and QEMU take by themselves on this machine. Then it drops
//! the cloud and checks that neither the simulated host's network namespace nor a QEMU process of
//! this run is left. With `KARRI_BENCH_LOGS=<dir>` the logs of the agent, operator, libvirtd,
//! QEMU and the consoles are copied there before termination; `KARRI_BENCH_INSTANCES=<n>`
//! launches n guests instead of 10 (for diagnosis, e.g. one guest alone). All traffic goes to
//! 127.0.0.1 or into the simulated host's namespace. The report goes to stdout, progress to
//! stderr.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use crds::common::find_condition;
use crds::{ConditionStatus, Instance, InstanceState, ID_LABEL};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use karri_e2e::cloud::pid_by_cmdline;
use karri_e2e::guests::{micro_image, GuestCloud, MicroImage, ACCOUNT};
use karri_e2e::libvirt_floor::{define_and_start_at_once, floor_definition, FloorStart};
use karri_e2e::report::{command_line, cpu_model, cpu_ticks, loadavg, out, pass, ticks_per_second};
use karri_testkit::bin_dir;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Guests launched by the one RunInstances call (`KARRI_BENCH_INSTANCES` overrides it, for
/// diagnosis; the goal is stated for 10).
const INSTANCES: usize = 10;
/// Instance type (1 vCPU, 256 MiB in the sample catalogue).
const INSTANCE_TYPE: &str = "t1.micro";
/// How often files are polled.
const POLL: Duration = Duration::from_millis(5);
/// CPU timeline bucket.
const CPU_BUCKET: Duration = Duration::from_millis(500);
/// Instances whose GetConsoleOutput is polled.
const GET_CONSOLE_SAMPLES: usize = 3;
/// How often GetConsoleOutput is polled.
const GET_CONSOLE_POLL: Duration = Duration::from_millis(100);
/// How long the batch gets until every guest printed `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long termination gets.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the watcher gets to list.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// The line the micro image prints when it has booted.
const READY_MARKER: &str = "karri-micro: ready";
/// The EC2 API version.
const EC2_VERSION: &str = "2016-11-15";
/// The region the gateway signs for.
const REGION: &str = "karri-1";
/// Goal: everything but the guest's own boot, p99.
const GOAL: Duration = Duration::from_secs(1);

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

/// What was seen of one instance, and when.
#[derive(Clone, Debug, Default)]
struct Seen {
    placed: Option<Instant>,
    overlay: Option<Instant>,
    defined: Option<Instant>,
    qemu: Option<Instant>,
    resumed: Option<Instant>,
    /// QEMU's CPU time (ticks) when it was seen resumed: what its set-up cost.
    resume_cpu: Option<u64>,
    started: Option<Instant>,
    console: Option<Instant>,
    ready: Option<Instant>,
    api_console: Option<Instant>,
    get_console: Option<Instant>,
    /// Bytes of the console log read so far, and their text.
    console_read: u64,
    console_text: String,
}

/// A named phase: its value for one row.
type Phase = (&'static str, fn(&Row) -> Option<f64>);

type Board = Arc<Mutex<BTreeMap<String, Seen>>>;

fn board_of(board: &Board) -> std::sync::MutexGuard<'_, BTreeMap<String, Seen>> {
    board.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sets `slot` to `at` unless it was set before.
fn first(slot: &mut Option<Instant>, at: Instant) {
    if slot.is_none() {
        *slot = Some(at);
    }
}

/// T0 on both clocks.
#[derive(Clone, Copy)]
struct Clock {
    t0: Instant,
    wall: SystemTime,
}

impl Clock {
    /// Milliseconds from T0 to `at`.
    fn ms(&self, at: Instant) -> f64 {
        if at >= self.t0 {
            (at - self.t0).as_secs_f64() * 1e3
        } else {
            -(self.t0 - at).as_secs_f64() * 1e3
        }
    }

    /// Milliseconds from T0 to the wall-clock time `at`.
    fn wall_ms(&self, at: SystemTime) -> f64 {
        match at.duration_since(self.wall) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(e) => -e.duration().as_secs_f64() * 1e3,
        }
    }
}

/// The timestamps of one instance in ms since T0.
#[derive(Clone, Debug, Default)]
struct Row {
    id: String,
    placed: Option<f64>,
    overlay: Option<f64>,
    prepared: Option<f64>,
    defined: Option<f64>,
    qemu: Option<f64>,
    resumed: Option<f64>,
    resume_cpu: Option<f64>,
    reported: Option<f64>,
    started: Option<f64>,
    console: Option<f64>,
    ready: Option<f64>,
    api_console: Option<f64>,
    get_console: Option<f64>,
    first_line: String,
}

/// Nearest-rank percentile of `samples` (sorted in place).
fn pct(samples: &mut [f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// `p50 / p99 / max (n)` of the differences `to - from` over the rows having both.
fn spread(rows: &[Row], f: impl Fn(&Row) -> Option<f64>) -> String {
    let mut s: Vec<f64> = rows.iter().filter_map(f).collect();
    let n = s.len();
    let min = s.iter().copied().reduce(f64::min);
    format!(
        "p50 {:>6} ms  p99 {:>6} ms  max {:>6} ms  min {:>6} ms  (n={n})",
        ms(pct(&mut s, 50.0)),
        ms(pct(&mut s, 99.0)),
        ms(pct(&mut s, 100.0)),
        ms(min),
    )
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

/// One SigV4-signing EC2 client of the gateway, as the account.
struct Ec2 {
    url: String,
    identity: Identity,
    client: reqwest::Client,
}

impl Ec2 {
    fn new(cloud: &GuestCloud) -> anyhow::Result<Ec2> {
        Ok(Ec2 {
            url: format!("{}/", cloud.gateway.url()),
            identity: Credentials::new(
                &cloud.credentials.access_key_id,
                &cloud.credentials.secret_access_key,
                None,
                None,
                "bench-guests",
            )
            .into(),
            client: cloud.gateway.client()?,
        })
    }

    /// Signs and POSTs the form `body`; the response text, which must be a 200.
    async fn call(&self, body: &str) -> anyhow::Result<String> {
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(REGION)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .context("SigV4 signing parameters")?
            .into();
        let form = "application/x-www-form-urlencoded; charset=utf-8";
        let request = SignableRequest::new(
            "POST",
            self.url.as_str(),
            [("content-type", form)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )?;
        let (instructions, _) = sign(request, &params)?.into_parts();
        let (headers, _) = instructions.into_parts();
        let mut req = self
            .client
            .post(&self.url)
            .header("content-type", form)
            .body(body.to_owned());
        for h in headers {
            req = req.header(h.name(), h.value().to_string());
        }
        let resp = req.send().await.context("sending")?;
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        ensure!(status.is_success(), "HTTP {status}: {text}");
        Ok(text)
    }
}

/// Every text between `<tag>` and `</tag>` in `xml`.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        found.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    found
}

/// Polls GetConsoleOutput of `ids` until each shows output; records when on the board.
async fn poll_get_console(ec2: Ec2, ids: Vec<String>, board: Board, deadline: Instant) {
    let mut left = ids;
    while !left.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for id in left {
            let body = format!("Action=GetConsoleOutput&Version={EC2_VERSION}&InstanceId={id}");
            let shown = match ec2.call(&body).await {
                Ok(text) => elements(&text, "output")
                    .first()
                    .is_some_and(|o| !o.trim().is_empty()),
                Err(e) => {
                    progress(format!("GetConsoleOutput {id}: {e:#}"));
                    false
                }
            };
            if shown {
                let at = Instant::now();
                if let Some(s) = board_of(&board).get_mut(&id) {
                    first(&mut s.get_console, at);
                }
            } else {
                still.push(id);
            }
        }
        left = still;
        tokio::time::sleep(GET_CONSOLE_POLL).await;
    }
}

/// The instance's ID (the record's name for EC2-created records).
fn id_of(i: &Instance) -> String {
    i.labels()
        .get(ID_LABEL)
        .cloned()
        .unwrap_or_else(|| i.name_any())
}

fn domain_running(i: &Instance) -> bool {
    i.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, "DomainRunning"))
        .is_some_and(|c| c.status == ConditionStatus::True)
}

/// Where the benchmark looks.
struct Paths {
    instances: PathBuf,
    console: PathBuf,
    images: PathBuf,
    definitions: PathBuf,
    pids: PathBuf,
}

/// File names in `dir` (empty when it does not exist yet).
fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One poll of the files: overlays, definitions, pid files, console logs, cached images.
fn scan(paths: &Paths, board: &Board, images: &mut BTreeMap<String, Instant>) {
    let overlays: Vec<String> = names(&paths.instances)
        .into_iter()
        .filter(|id| paths.instances.join(id).join("root.qcow2").exists())
        .collect();
    let defined = names(&paths.definitions);
    let pids = names(&paths.pids);
    let consoles = names(&paths.console);
    let at = Instant::now();
    for name in names(&paths.images) {
        images.entry(name).or_insert(at);
    }
    let mut board = board_of(board);
    for id in overlays {
        if let Some(s) = board.get_mut(&id) {
            first(&mut s.overlay, at);
        }
    }
    for file in defined {
        let id = file
            .strip_prefix("karri-")
            .and_then(|f| f.strip_suffix(".xml"));
        if let Some(s) = id.and_then(|id| board.get_mut(id)) {
            first(&mut s.defined, at);
        }
    }
    for file in pids {
        let id = file
            .strip_prefix("karri-")
            .and_then(|f| f.strip_suffix(".pid"));
        if let Some(s) = id.and_then(|id| board.get_mut(id)) {
            first(&mut s.qemu, at);
        }
    }
    // libvirt rewrites its status file `<name>.xml` beside the pid file (tmp + rename); it says
    // `state='running'` once the vCPUs were resumed, at the end of virDomainCreate.
    for (id, s) in board.iter_mut() {
        if s.qemu.is_none() || s.resumed.is_some() {
            continue;
        }
        let mut head = [0u8; 1024];
        let n = std::fs::File::open(paths.pids.join(format!("karri-{id}.xml")))
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .unwrap_or(0);
        if String::from_utf8_lossy(&head[..n]).contains("<domstatus state='running'") {
            first(&mut s.resumed, Instant::now());
            s.resume_cpu = pid_file(&paths.pids.join(format!("karri-{id}.pid")))
                .and_then(|p| cpu_ticks(&format!("/proc/{p}/stat")));
        }
    }
    for file in consoles {
        let Some(id) = file.strip_suffix(".log") else {
            continue;
        };
        let Some(s) = board.get_mut(id) else { continue };
        if s.ready.is_some() {
            continue;
        }
        let path = paths.console.join(&file);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.len() > s.console_read {
            let at = Instant::now();
            first(&mut s.console, at);
            if let Ok(bytes) = std::fs::read(&path) {
                let from = usize::try_from(s.console_read).unwrap_or(usize::MAX);
                if let Some(new) = bytes.get(from..) {
                    s.console_text.push_str(&String::from_utf8_lossy(new));
                }
                s.console_read = bytes.len() as u64;
                if s.console_text.contains(READY_MARKER) {
                    first(&mut s.ready, at);
                }
            }
        }
    }
}

/// `(busy, total)` jiffies of all CPUs (`/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 8 {
        return None;
    }
    let total: u64 = f.iter().sum();
    Some((total - f[3] - f[4], total))
}

/// The pid in a pid file.
fn pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `Cpus_allowed_list` of a process.
fn affinity(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

/// The processes whose CPU time is followed.
struct Parts {
    named: Vec<(&'static str, Option<u32>)>,
    qemu_pid_dir: PathBuf,
}

/// CPU ticks at one moment: the machine's busy and total, QEMU's (all of this host's), and each
/// named part's.
#[derive(Clone, Debug)]
struct CpuSample {
    at: Instant,
    machine: Option<(u64, u64)>,
    qemu: u64,
    qemu_procs: usize,
    parts: Vec<Option<u64>>,
    started: usize,
    placed: usize,
    defined: usize,
}

impl Parts {
    fn qemu_pids(&self) -> Vec<u32> {
        names(&self.qemu_pid_dir)
            .iter()
            // `driver.pid` there is libvirtd's own.
            .filter(|n| n.starts_with("karri-") && n.ends_with(".pid"))
            .filter_map(|n| pid_file(&self.qemu_pid_dir.join(n)))
            .collect()
    }

    fn sample(&self, board: &Board) -> CpuSample {
        let pids = self.qemu_pids();
        let qemu = pids
            .iter()
            .filter_map(|p| cpu_ticks(&format!("/proc/{p}/stat")))
            .sum();
        let (started, placed, defined) = {
            let b = board_of(board);
            (
                b.values().filter(|s| s.started.is_some()).count(),
                b.values().filter(|s| s.placed.is_some()).count(),
                b.values().filter(|s| s.defined.is_some()).count(),
            )
        };
        CpuSample {
            at: Instant::now(),
            machine: machine_ticks(),
            qemu,
            qemu_procs: pids.len(),
            parts: self
                .named
                .iter()
                .map(|(_, p)| p.and_then(|p| cpu_ticks(&format!("/proc/{p}/stat"))))
                .collect(),
            started,
            placed,
            defined,
        }
    }
}

/// The first `applying plan` and `reported the domain ... running` of each instance in the
/// agent's log, as wall-clock times.
fn agent_log_times(log: &Path) -> HashMap<String, (Option<SystemTime>, Option<SystemTime>)> {
    let mut times: HashMap<String, (Option<SystemTime>, Option<SystemTime>)> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(log) else {
        return times;
    };
    for line in text.lines() {
        let plan = line.contains("applying plan") && line.contains("Start");
        let reported = line.contains("reported the domain") && line.contains("running");
        if !plan && !reported {
            continue;
        }
        let Some(stamp) = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<Timestamp>().ok())
        else {
            continue;
        };
        // The reconcile span's `id` field: `id=i-...` or `id="i-..."`.
        let Some(id) = [" id=i-", "{id=i-", " id=\"i-", "{id=\"i-"]
            .iter()
            .find_map(|key| Some(&line[line.find(key)? + key.len() - 2..]))
            .map(|rest| {
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect::<String>()
            })
        else {
            continue;
        };
        let entry = times.entry(id).or_default();
        let wall = SystemTime::from(stamp);
        if plan && entry.0.is_none() {
            entry.0 = Some(wall);
        }
        if reported && entry.1.is_none() {
            entry.1 = Some(wall);
        }
    }
    times
}

/// Copies the `*.log` files of `dirs` into `dest` (for a look after the run, with
/// `KARRI_BENCH_LOGS=<dir>`); how many were copied.
fn keep_logs(dest: &Path, dirs: &[&Path]) -> usize {
    if std::fs::create_dir_all(dest).is_err() {
        return 0;
    }
    let mut kept = 0;
    for dir in dirs {
        for name in names(dir).iter().filter(|n| n.ends_with(".log")) {
            if std::fs::copy(dir.join(name), dest.join(name)).is_ok() {
                kept += 1;
            }
        }
    }
    kept
}

/// qemu-system processes: `(pid, command line)`.
fn qemu_processes() -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with("qemu-system").then_some(())?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")))
        })
        .collect()
}

/// libvirt's definitions (`dumpxml --inactive`) of the batch's domains, by instance ID.
fn karri_definitions(cloud: &GuestCloud, ids: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    ids.iter()
        .map(|id| {
            let name = format!("karri-{id}");
            let out = cloud
                .host
                .virsh(["dumpxml", "--inactive", name.as_str()])
                .output()
                .context("running virsh dumpxml")?;
            ensure!(
                out.status.success(),
                "virsh dumpxml {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok((id.clone(), String::from_utf8(out.stdout)?))
        })
        .collect()
}

/// Defines and starts, all at once and without Karri, one domain per definition of Karri's
/// batch (its instances gone by now) on the simulated host's libvirtd: each on a fresh overlay
/// of the cached root image and with a console log of its own (in a directory beside the
/// agent's data, removed afterwards), otherwise as Karri defined it.
async fn run_floor(
    cloud: &GuestCloud,
    data_dir: &Path,
    micro: &MicroImage,
    definitions: Vec<(String, String)>,
) -> anyhow::Result<(std::time::Instant, Vec<FloorStart>)> {
    let root = data_dir
        .join("images")
        .join("sha256")
        .join(&micro.disk.sha256);
    // Removed when dropped, whatever fails before the end.
    let floor_dir = tempfile::Builder::new()
        .prefix("floor-")
        .tempdir_in(data_dir.parent().context("the data dir has no parent")?)
        .context("creating the floor's directory")?;
    let dir = floor_dir.path();
    let mut domains = Vec::new();
    for (i, (id, xml)) in definitions.iter().enumerate() {
        let overlay = dir.join(format!("root-{i}.qcow2"));
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&root)
            .arg(&overlay)
            .output()
            .context("running qemu-img")?;
        ensure!(
            made.status.success(),
            "qemu-img create {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&made.stderr).trim()
        );
        let karri_overlay = data_dir.join("instances").join(id).join("root.qcow2");
        let karri_console = data_dir.join("console").join(format!("{id}.log"));
        let console = dir.join(format!("console-{i}.log"));
        let moves = [
            (
                karri_overlay.display().to_string(),
                overlay.display().to_string(),
            ),
            (
                karri_console.display().to_string(),
                console.display().to_string(),
            ),
        ];
        let name = format!("floor-{i}");
        domains.push((name.clone(), floor_definition(xml, &name, &moves)?));
    }
    let uri = cloud.host.uri().to_owned();
    tokio::task::spawn_blocking(move || define_and_start_at_once(&uri, domains))
        .await
        .context("the floor run")
}

/// Prints the floor run's section and returns its p99 (define and start, ms since the threads
/// were let go) when every domain ran.
fn report_floor(
    floor: &anyhow::Result<(std::time::Instant, Vec<FloorStart>)>,
    instances: usize,
) -> Option<f64> {
    out("");
    out("--- libvirt alone (the floor under `domain start`; informational) ---");
    out(format!(
        "the same {instances} domain definitions (libvirt's own, taken before termination; new overlays and console logs, Karri's metadata and UUIDs removed), defined and started at once through libvirt's API by this program (one thread and connection each, opened before), on the same libvirtd, after Karri's instances were gone; no Karri process involved"
    ));
    let (t0, starts) = match floor {
        Ok(run) => run,
        Err(e) => {
            out(format!("FAILED: {e:#}"));
            return None;
        }
    };
    let since = |at: Option<std::time::Instant>| {
        at.map(|at| at.saturating_duration_since(*t0).as_secs_f64() * 1e3)
    };
    let mut running: Vec<f64> = starts.iter().filter_map(|s| since(s.running)).collect();
    let mut defined: Vec<f64> = starts.iter().filter_map(|s| since(s.defined)).collect();
    for s in starts.iter().filter(|s| s.error.is_some()) {
        out(format!(
            "{}: {}",
            s.name,
            s.error.as_deref().unwrap_or_default()
        ));
    }
    let line = |what: &str, v: &mut Vec<f64>| {
        let n = v.len();
        out(format!(
            "{what:<44}: p50 {:>6} ms  p99 {:>6} ms  max {:>6} ms  (n={n})",
            ms(pct(v, 50.0)),
            ms(pct(v, 99.0)),
            ms(pct(v, 100.0))
        ));
    };
    line("go -> defined (virDomainDefineXML)", &mut defined);
    line("go -> running (virDomainCreate returned)", &mut running);
    if running.len() == instances {
        pct(&mut running, 99.0)
    } else {
        None
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    progress(format!(
        "building the micro image and starting etcd, api-gateway, operator, one node agent and a simulated host from {}",
        bin_dir().display()
    ));
    let instances: usize = match std::env::var("KARRI_BENCH_INSTANCES") {
        Ok(v) if !v.is_empty() => v.parse().context("KARRI_BENCH_INSTANCES")?,
        _ => INSTANCES,
    };
    ensure!(instances >= 1, "KARRI_BENCH_INSTANCES must be at least 1");
    let cloud = GuestCloud::start("bench-guests")
        .await
        .context("starting the guest cloud")?;
    let micro = tokio::task::spawn_blocking(micro_image).await??;
    let netns = cloud.host.netns().to_owned();
    let data_dir = cloud.data_dir.clone();
    let host_dir = cloud.host.dir().to_path_buf();
    let agent_log = data_dir
        .parent()
        .map(|d| d.join("logs").join("node-agent.log"))
        .context("the data dir has no parent")?;

    out("=== Karri guest launch benchmark (bench-guests) ===");
    out(format!(
        "date (UTC)      : {}",
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    ));
    out(format!(
        "machine         : {} cores, {}, kernel {}, load average {} before the batch",
        command_line("nproc", &[]),
        cpu_model(),
        command_line("uname", &["-r"]),
        loadavg()
    ));
    out(format!("binaries        : {}", bin_dir().display()));
    out(format!(
        "cloud           : etcd, api-gateway, operator, 1 node agent on 127.0.0.1; the node's host is simulated: netns {netns} with a private libvirtd; guests on QEMU TCG (--domain-type qemu)"
    ));
    out(format!(
        "batch           : ONE RunInstances, MinCount=MaxCount={instances}, {INSTANCE_TYPE} (1 vCPU, 256 MiB), image {} (micro: kernel + busybox initramfs + raw root disk), sent as a SigV4-signed EC2 Query POST by this program",
        cloud.image_id
    ));
    out(format!(
        "image cache     : cold (fresh agent data dir); the agent copies and sha256-verifies kernel {} B, ramdisk {} B, root {} B from local files (page cache warm)",
        micro.kernel.size, micro.ramdisk.size, micro.disk.size
    ));
    out("timestamps      : taken by this program, ms since T0 (just before RunInstances is signed and sent); files polled every 5 ms; `prepared`/`reported` from the agent's log");

    // The watcher: placement, DomainRunning and the record's console output.
    let board: Board = Arc::default();
    let (synced_tx, synced) = oneshot::channel::<()>();
    let watch_board = board.clone();
    let api: Api<Instance> = Api::namespaced(cloud.client.clone(), ACCOUNT);
    let watch = tokio::spawn(async move {
        let mut synced_tx = Some(synced_tx);
        let mut stream = watcher::watcher(api, watcher::Config::default())
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
            let id = id_of(&instance);
            let mut board = board_of(&watch_board);
            let seen = board.entry(id).or_default();
            let status = instance.status.as_ref();
            if status.and_then(|s| s.node_name.as_ref()).is_some() {
                first(&mut seen.placed, at);
            }
            if domain_running(&instance) {
                first(&mut seen.started, at);
            }
            if status
                .and_then(|s| s.console_output.as_deref())
                .is_some_and(|c| !c.is_empty())
            {
                first(&mut seen.api_console, at);
            }
        }
    });
    tokio::time::timeout(SYNC_TIMEOUT, synced)
        .await
        .context("the watcher did not list in time")?
        .context("the watcher ended")?;

    // What awscli costs per call on this machine (informational: why it does not send the batch).
    let aws_started = Instant::now();
    cloud.aws(&["describe-regions"]).await?;
    let aws_call = aws_started.elapsed();

    let ec2 = Ec2::new(&cloud)?;
    // Opens the connection (TLS) before T0.
    ec2.call(&format!("Action=DescribeRegions&Version={EC2_VERSION}"))
        .await
        .context("DescribeRegions")?;

    let paths = Paths {
        instances: data_dir.join("instances"),
        console: data_dir.join("console"),
        images: data_dir.join("images").join("sha256"),
        definitions: host_dir.join("etc").join("libvirt").join("qemu"),
        pids: host_dir.join("state").join("run").join("qemu"),
    };
    let parts = Parts {
        named: vec![
            ("libvirtd", pid_file(&host_dir.join("libvirtd.pid"))),
            ("virtlogd", pid_file(&host_dir.join("virtlogd.pid"))),
            ("node-agent", cloud.agent.pid()),
            (
                "api-gateway",
                pid_by_cmdline(&cloud.gateway.tokens_path().display().to_string()),
            ),
            (
                "etcd",
                pid_by_cmdline(&cloud.etcd.data_dir().display().to_string()),
            ),
            ("operator", cloud.operator.pid()),
            ("bench", Some(std::process::id())),
        ],
        qemu_pid_dir: paths.pids.clone(),
    };
    let mut cpu = vec![parts.sample(&board)];

    // T0: the batch.
    progress(format!(
        "RunInstances MinCount=MaxCount={instances} (cold image cache)"
    ));
    let clock = Clock {
        t0: Instant::now(),
        wall: SystemTime::now(),
    };
    let run = ec2
        .call(&format!(
            "Action=RunInstances&Version={EC2_VERSION}&ImageId={}&InstanceType={INSTANCE_TYPE}&MinCount={instances}&MaxCount={instances}",
            cloud.image_id
        ))
        .await
        .context("RunInstances")?;
    let answered = Instant::now();
    let mut ids: Vec<String> = elements(&run, "instanceId")
        .into_iter()
        .map(str::to_owned)
        .collect();
    ids.dedup();
    ensure!(
        ids.len() == instances,
        "RunInstances gave {} instance IDs: {run}",
        ids.len()
    );
    {
        let mut b = board_of(&board);
        for id in &ids {
            b.entry(id.clone()).or_default();
        }
        // Anything else in the namespace is not this batch's.
        b.retain(|k, _| ids.contains(k));
    }
    let deadline = clock.t0 + READY_TIMEOUT;
    let sampler = tokio::spawn(poll_get_console(
        Ec2::new(&cloud)?,
        ids.iter().take(GET_CONSOLE_SAMPLES).cloned().collect(),
        board.clone(),
        deadline,
    ));

    // Poll until every guest printed `ready`.
    let mut images: BTreeMap<String, Instant> = BTreeMap::new();
    let mut next_cpu = clock.t0 + CPU_BUCKET;
    let mut all_started: Option<CpuSample> = None;
    let mut qemu_affinity = String::new();
    let mut timed_out = false;
    loop {
        scan(&paths, &board, &mut images);
        let now = Instant::now();
        if now >= next_cpu {
            cpu.push(parts.sample(&board));
            next_cpu += CPU_BUCKET;
        }
        let (started, ready) = {
            let b = board_of(&board);
            (
                b.values().filter(|s| s.started.is_some()).count(),
                b.values().filter(|s| s.ready.is_some()).count(),
            )
        };
        if started == instances && all_started.is_none() {
            let s = parts.sample(&board);
            progress(format!(
                "all {instances} domains running {:.0} ms after T0",
                clock.ms(s.at)
            ));
            qemu_affinity = parts
                .qemu_pids()
                .iter()
                .map(|p| affinity(*p))
                .collect::<Vec<_>>()
                .join(" ");
            all_started = Some(s);
        }
        if ready == instances {
            break;
        }
        if now > deadline {
            timed_out = true;
            progress(format!(
                "only {ready} of {instances} guests printed `ready` within {READY_TIMEOUT:?}"
            ));
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let all_ready = Instant::now();
    cpu.push(parts.sample(&board));
    progress(format!(
        "all guests ready {:.1} s after T0; waiting for the API's console output",
        clock.ms(all_ready) / 1e3
    ));
    // The record's console output follows within the agent's report period.
    let api_deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < api_deadline
        && board_of(&board)
            .values()
            .any(|s| s.api_console.is_none() || s.get_console.is_none())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sampler.abort();
    watch.abort();

    // Rows.
    let logged = agent_log_times(&agent_log);
    let seen = board_of(&board).clone();
    let t = |v: Option<Instant>| v.map(|at| clock.ms(at));
    let mut rows: Vec<Row> = ids
        .iter()
        .map(|id| {
            let s = seen.get(id).cloned().unwrap_or_default();
            let (plan, reported) = logged.get(id).copied().unwrap_or_default();
            Row {
                id: id.clone(),
                placed: t(s.placed),
                overlay: t(s.overlay),
                prepared: plan.map(|w| clock.wall_ms(w)),
                defined: t(s.defined),
                qemu: t(s.qemu),
                resumed: t(s.resumed),
                resume_cpu: s.resume_cpu.map(|t| t as f64 / ticks_per_second() * 1e3),
                reported: reported.map(|w| clock.wall_ms(w)),
                started: t(s.started),
                console: t(s.console),
                ready: t(s.ready),
                api_console: t(s.api_console),
                get_console: t(s.get_console),
                first_line: s
                    .console_text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default()
                    .chars()
                    .take(60)
                    .collect(),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        a.started
            .unwrap_or(f64::MAX)
            .total_cmp(&b.started.unwrap_or(f64::MAX))
    });

    out(format!(
        "RunInstances    : answered {:.0} ms after T0 with {} IDs; one awscli call (describe-regions) takes {:.0} ms on this machine",
        clock.ms(answered),
        ids.len(),
        aws_call.as_secs_f64() * 1e3
    ));
    let image_line = [
        ("root", &micro.disk.sha256),
        ("kernel", &micro.kernel.sha256),
        ("ramdisk", &micro.ramdisk.sha256),
    ]
    .iter()
    .map(|(n, sha)| format!("{n} {}", ms(images.get(*sha).map(|at| clock.ms(*at)))))
    .collect::<Vec<_>>()
    .join(", ");
    out(format!(
        "image cache     : verified image in the cache (ms since T0): {image_line}"
    ));
    out("");
    out("--- Per instance (ms since T0; sorted by started) ---");
    out(format!(
        "{:<20} {:>6} {:>7} {:>8} {:>7} {:>6} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "instance",
        "placed",
        "overlay",
        "prepared",
        "defined",
        "qemu",
        "resumed",
        "reported",
        "started",
        "console",
        "ready",
        "api-con",
        "GetCon"
    ));
    for r in &rows {
        out(format!(
            "{:<20} {:>6} {:>7} {:>8} {:>7} {:>6} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
            r.id,
            ms(r.placed),
            ms(r.overlay),
            ms(r.prepared),
            ms(r.defined),
            ms(r.qemu),
            ms(r.resumed),
            ms(r.reported),
            ms(r.started),
            ms(r.console),
            ms(r.ready),
            ms(r.api_console),
            ms(r.get_console)
        ));
    }
    out("  placed   = watcher saw status.nodeName     overlay = root.qcow2 exists        prepared = agent logged `applying plan` (fetches, overlay, DHCP, XML done)");
    out("  defined  = libvirt's karri-<id>.xml exists  qemu    = QEMU pid file exists      resumed = libvirt's status file says state='running' (vCPUs resumed)");
    out("  reported = agent logged the DomainRunning status write");
    out("  started  = watcher saw DomainRunning True  console = first byte in the console log  ready = `karri-micro: ready` in it");
    out("  api-con  = watcher saw status.consoleOutput (what GetConsoleOutput serves)  GetCon = GetConsoleOutput showed output (first 3 only)");
    if let Some(r) = rows.first() {
        out(format!(
            "  first console line ({}): {:?}",
            r.id, r.first_line
        ));
    }

    out("");
    out(format!(
        "--- Phases (nearest-rank over the {instances} instances) ---"
    ));
    let everything: Vec<f64> = rows.iter().filter_map(|r| r.started).collect();
    let phases: [Phase; 6] = [
        ("placement                 placed - T0", |r| r.placed),
        ("image fetch + overlay     prepared - placed", |r| {
            diff(r.placed, r.prepared)
        }),
        ("domain start              started - prepared", |r| {
            diff(r.prepared, r.started)
        }),
        ("guest boot to 1st console console - started", |r| {
            diff(r.started, r.console)
        }),
        ("total to 1st console      console - T0", |r| r.console),
        ("everything but guest boot started - T0", |r| r.started),
    ];
    for (name, f) in &phases {
        out(format!("{name:<44}: {}", spread(&rows, *f)));
    }
    out("  everything but guest boot = T0 -> the watcher sees DomainRunning True: gateway admission + etcd write, operator placement");
    out("  (status write), the agent's watch event, image fetch + verify (cold), qemu-img overlay, kernel/ramdisk fetch, DHCP entry,");
    out("  domain XML, virDomainDefineXML, virDomainCreate (QEMU spawn, QMP set-up, vCPUs resumed), observe, status write, watch delivery.");

    out("");
    out("--- Breakdown (informational) ---");
    let breakdown: [Phase; 14] = [
        ("placed -> overlay (root fetch + qemu-img)", |r| {
            diff(r.placed, r.overlay)
        }),
        ("overlay -> prepared (kernel+ramdisk, DHCP)", |r| {
            diff(r.overlay, r.prepared)
        }),
        ("prepared -> defined (define call)", |r| {
            diff(r.prepared, r.defined)
        }),
        ("defined -> qemu pid (start: spawn)", |r| {
            diff(r.defined, r.qemu)
        }),
        ("qemu pid -> resumed (rest of the start)", |r| {
            diff(r.qemu, r.resumed)
        }),
        ("prepared -> resumed (define + whole start)", |r| {
            diff(r.prepared, r.resumed)
        }),
        ("QEMU CPU time spawn -> resumed", |r| r.resume_cpu),
        ("resumed -> reported (observe, status write)", |r| {
            diff(r.resumed, r.reported)
        }),
        ("reported -> started (watch delivery)", |r| {
            diff(r.reported, r.started)
        }),
        ("prepared -> reported (agent's log)", |r| {
            diff(r.prepared, r.reported)
        }),
        ("qemu pid -> 1st console byte", |r| diff(r.qemu, r.console)),
        ("started -> ready (guest boot)", |r| {
            diff(r.started, r.ready)
        }),
        ("console -> api console (record)", |r| {
            diff(r.console, r.api_console)
        }),
        ("T0 -> ready", |r| r.ready),
    ];
    for (name, f) in &breakdown {
        out(format!("{name:<44}: {}", spread(&rows, *f)));
    }
    let get_con: Vec<String> = rows
        .iter()
        .filter(|r| r.get_console.is_some())
        .map(|r| {
            format!(
                "{} console->GetConsoleOutput {} ms",
                r.id,
                ms(diff(r.console, r.get_console))
            )
        })
        .collect();
    out(format!(
        "GetConsoleOutput (polled every {} ms): {}",
        GET_CONSOLE_POLL.as_millis(),
        if get_con.is_empty() {
            "no output seen".into()
        } else {
            get_con.join("; ")
        }
    ));
    // Serialisation: how the domain starts spread out in time.
    let mut qemu_at: Vec<f64> = rows.iter().filter_map(|r| r.qemu).collect();
    qemu_at.sort_by(f64::total_cmp);
    let gaps: Vec<String> = qemu_at
        .windows(2)
        .map(|w| format!("{:.0}", w[1] - w[0]))
        .collect();
    out(format!(
        "QEMU spawns     : first {} ms, last {} ms after T0; gaps between consecutive spawns (ms): {}",
        ms(qemu_at.first().copied()),
        ms(qemu_at.last().copied()),
        gaps.join(" ")
    ));

    // CPU.
    let tps = ticks_per_second();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let fmt_window = |from: &CpuSample, to: &CpuSample| -> String {
        let secs = (to.at - from.at).as_secs_f64().max(1e-9);
        let busy = match (from.machine, to.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                format!(
                    "{:.2} of {cores:.0} cores busy",
                    (b1 - b0) as f64 / (t1 - t0) as f64 * cores
                )
            }
            _ => "? cores busy".into(),
        };
        let mut items = vec![format!(
            "qemu ({} procs) {:.2} s",
            to.qemu_procs,
            to.qemu.saturating_sub(from.qemu) as f64 / tps
        )];
        for (i, (name, _)) in parts.named.iter().enumerate() {
            let d = match (
                from.parts.get(i).copied().flatten(),
                to.parts.get(i).copied().flatten(),
            ) {
                (Some(a), Some(b)) => format!("{:.2} s", b.saturating_sub(a) as f64 / tps),
                _ => "?".into(),
            };
            items.push(format!("{name} {d}"));
        }
        format!("{secs:.2} s wall, {busy}; CPU: {}", items.join(", "))
    };
    out("");
    out("--- CPU ---");
    if let Some(s) = &all_started {
        out(format!("T0 -> all running : {}", fmt_window(&cpu[0], s)));
        out(format!(
            "affinity          : libvirtd {}, virtlogd {}, node-agent {}, qemu {}",
            parts.named[0].1.map_or("?".into(), affinity),
            parts.named[1].1.map_or("?".into(), affinity),
            parts.named[2].1.map_or("?".into(), affinity),
            qemu_affinity
        ));
    }
    if let Some(last) = cpu.last() {
        out(format!("T0 -> all ready   : {}", fmt_window(&cpu[0], last)));
    }
    out(format!(
        "timeline ({} ms buckets; CPU in cores of {cores:.0}: the machine, this host's QEMUs, libvirtd, node-agent, gateway, etcd,",
        CPU_BUCKET.as_millis()
    ));
    out("  this program, and other = the rest of the machine (other work, short-lived qemu-img); counts at the bucket's end):");
    out(format!(
        "  {:>6} {:>5} {:>5} {:>6} {:>5} {:>6} {:>5} {:>5} {:>5}  {:>6} {:>7} {:>7} {:>7}",
        "t ms",
        "busy",
        "qemu",
        "lvirtd",
        "agent",
        "gatewy",
        "etcd",
        "bench",
        "other",
        "placed",
        "defined",
        "spawned",
        "started"
    ));
    let end_of_start = all_started
        .as_ref()
        .map_or(clock.t0 + Duration::from_secs(10), |s| s.at)
        + Duration::from_secs(2);
    for w in cpu.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.at > end_of_start {
            break;
        }
        let secs = (b.at - a.at).as_secs_f64().max(1e-9);
        let busy = match (a.machine, b.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64 * cores)
            }
            _ => None,
        };
        let part = |i: usize| -> Option<f64> {
            let (x, y) = (
                a.parts.get(i).copied().flatten()?,
                b.parts.get(i).copied().flatten()?,
            );
            Some(y.saturating_sub(x) as f64 / tps / secs)
        };
        let qemu = b.qemu.saturating_sub(a.qemu) as f64 / tps / secs;
        let known: f64 = qemu + (0..parts.named.len()).filter_map(part).sum::<f64>();
        let c = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.2}"));
        out(format!(
            "  {:>6.0} {:>5} {:>5.2} {:>6} {:>5} {:>6} {:>5} {:>5} {:>5}  {:>6} {:>7} {:>7} {:>7}",
            clock.ms(b.at),
            c(busy),
            qemu,
            c(part(0)),
            c(part(2)),
            c(part(3)),
            c(part(4)),
            c(part(6)),
            c(busy.map(|b| (b - known).max(0.0))),
            b.placed,
            b.defined,
            b.qemu_procs,
            b.started
        ));
    }

    // Cleanup: terminate, wait until gone, drop the cloud, check for leftovers.
    if let Some(dest) = std::env::var_os("KARRI_BENCH_LOGS").filter(|d| !d.is_empty()) {
        let dest = PathBuf::from(dest);
        let logs = data_dir.parent().map(|d| d.join("logs"));
        let kept = keep_logs(
            &dest,
            &[
                logs.as_deref().unwrap_or(&data_dir),
                &paths.console,
                &host_dir,
                &host_dir.join("state").join("log").join("qemu"),
            ],
        );
        progress(format!("kept {kept} log files in {}", dest.display()));
    }
    // Goal (printed before the instances are terminated, so that a failure there keeps it).
    let mut everything = everything;
    let p99 = if everything.len() == instances {
        pct(&mut everything, 99.0)
    } else {
        None
    };
    let goal_ms = GOAL.as_secs_f64() * 1e3;
    out("");
    out("--- Goals ---");
    out(format!(
        "GOAL everything-but-guest-boot p99 <= 1 s: {} (measured {} ms)",
        pass(p99.is_some_and(|p| p <= goal_ms)),
        p99.map_or(
            format!("- ({} of {instances} started)", everything.len()),
            |p| format!("{p:.0}")
        )
    ));

    // Karri's definitions, for the floor run after the instances are gone.
    let definitions = karri_definitions(&cloud, &ids);
    progress("terminating the instances");
    let mut args = vec!["terminate-instances", "--instance-ids"];
    args.extend(ids.iter().map(String::as_str));
    cloud.aws(&args).await.context("terminate-instances")?;
    let api: Api<Instance> = Api::namespaced(cloud.client.clone(), ACCOUNT);
    let gone_deadline = Instant::now() + TERMINATE_TIMEOUT;
    let terminated_at = Instant::now();
    loop {
        let mut terminated = 0;
        for id in &ids {
            let i = api.get_opt(id).await?;
            if i.as_ref().is_none_or(|i| {
                i.status
                    .as_ref()
                    .is_some_and(|s| s.state == InstanceState::Terminated)
            }) {
                terminated += 1;
            }
        }
        let domains = cloud.host.virsh(["list", "--all", "--name"]).output()?;
        let domains = String::from_utf8_lossy(&domains.stdout);
        let left_domains = ids
            .iter()
            .filter(|id| domains.contains(id.as_str()))
            .count();
        let left_files = names(&paths.instances).len();
        if terminated == ids.len() && left_domains == 0 && left_files == 0 {
            break;
        }
        if Instant::now() > gone_deadline {
            bail!(
                "after {TERMINATE_TIMEOUT:?}: {terminated} of {} terminated, {left_domains} domains and {left_files} instance dirs left",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let terminate_took = terminated_at.elapsed();

    // The floor: the same domains, started at once by libvirt alone.
    progress(format!(
        "libvirt alone: defining and starting the same {instances} domains at once, without Karri"
    ));
    let floor = match definitions {
        Ok(definitions) => run_floor(&cloud, &data_dir, &micro, definitions).await,
        Err(e) => Err(e),
    };
    let floor_p99 = report_floor(&floor, instances);
    match (p99, floor_p99) {
        (Some(p99), Some(floor)) => out(format!(
            "floor vs goal   : libvirt alone took {floor:.0} ms at p99 to define and start the same domains at once, {:.2}x the {goal_ms:.0} ms the goal allows everything; Karri's launch took {:.0} ms more (p99 - p99)",
            floor / goal_ms,
            p99 - floor
        )),
        _ => out("floor vs goal   : no figure (see above)"),
    }

    drop(cloud);
    let netns_left = command_line("ip", &["netns", "list"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(netns.as_str()));
    let data = data_dir.display().to_string();
    // Ours: started for one of this run's instances, from this run's data directory.
    let ours: Vec<u32> = qemu_processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(&data) || ids.iter().any(|id| cmd.contains(id.as_str())))
        .map(|(p, _)| p)
        .collect();
    let others = qemu_processes().len() - ours.len();
    out("");
    out("--- Cleanup ---");
    out(format!(
        "terminate       : all {} terminated, domains undefined, overlays removed {:.1} s after TerminateInstances",
        ids.len(),
        terminate_took.as_secs_f64()
    ));
    out(format!(
        "leftovers       : netns {netns} {}; qemu-system processes of this run: {} {:?} (other qemu-system processes on the machine, not ours: {others})",
        if netns_left { "STILL LISTED" } else { "gone" },
        ours.len(),
        ours
    ));
    ensure!(
        !netns_left,
        "the simulated host's namespace {netns} is left"
    );
    ensure!(
        ours.is_empty(),
        "QEMU processes of this run are left: {ours:?}"
    );
    if timed_out {
        bail!("not every guest printed `{READY_MARKER}` within {READY_TIMEOUT:?}");
    }
    Ok(())
}
