//! The guest network of a node: a Linux bridge that the guests' taps join, with the subnet's
//! gateway address and the metadata address (169.254.169.254/32) on it, and one dnsmasq that
//! hands every guest its static DHCP lease. Everything lives inside the node's network namespace
//! when it has one (a simulated host, DESIGN §5), else in the agent's own.
//!
//! What can be decided without the machine is pure and table-tested: [`bridge_plan`] (the `ip`
//! commands), [`dnsmasq_args`], [`mac_for`], [`hostname_for`] and [`host_line`]. The edges run
//! `ip` and `dnsmasq` through [`crate::netns::command`].
//!
//! Leases come from one file per guest MAC in `<state_dir>/dhcp-hosts`, written atomically;
//! dnsmasq reads new and changed files by itself (inotify). It forgets removed or changed records
//! only on SIGHUP, which [`Dhcp`] sends when a record goes away or changes.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};

use crate::netns;

/// The bridge the guests' taps join.
pub const DEFAULT_BRIDGE: &str = "karri0";
/// The instance metadata service's address.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The dnsmasq binary (Debian package `dnsmasq-base`).
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// Lease time handed to guests; they renew at half of it, and their address never changes.
pub const LEASE_TIME: &str = "1h";
/// The longest Linux interface name (`IFNAMSIZ` less the NUL).
const MAX_IFNAME: usize = 15;
/// How long dnsmasq gets to write its pid file after it was spawned.
const DNSMASQ_READY_DEADLINE: Duration = Duration::from_secs(10);
/// How long a stale dnsmasq gets to exit after SIGTERM before SIGKILL.
const STALE_EXIT_DEADLINE: Duration = Duration::from_secs(5);
/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(20);
/// Lines of dnsmasq's log that go into errors.
const LOG_TAIL: usize = 20;

/// What went wrong setting up or running the guest network.
#[derive(Debug, thiserror::Error)]
pub enum GuestNetError {
    /// The configuration cannot describe a guest network.
    #[error("invalid guest network configuration: {0}")]
    Config(String),
    /// A MAC address is not six colon-separated hex octets.
    #[error("{0:?} is not a MAC address")]
    Mac(String),
    /// A host name is not a DNS label.
    #[error("{0:?} is not a valid host name")]
    Hostname(String),
    /// A guest address is not a host address of the subnet, or is the gateway.
    #[error("{ip} is not a guest address of {subnet}/{prefix}")]
    NotInSubnet {
        /// The refused address.
        ip: Ipv4Addr,
        /// The subnet's network address.
        subnet: Ipv4Addr,
        /// The subnet's prefix length.
        prefix: u8,
    },
    /// A program could not be started.
    #[error("could not run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// A command exited with a failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A blocking file task ended without an answer (it panicked or was cancelled).
    #[error("a file task of the DHCP server's hosts failed: {0}")]
    Task(String),
    /// A file operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// dnsmasq exited before it wrote its pid file.
    #[error("dnsmasq exited ({status}) before it was ready; its log ends with:\n{log}")]
    DnsmasqExited {
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// dnsmasq did not write its pid file in time.
    #[error("dnsmasq did not become ready within {deadline:?}; its log ends with:\n{log}")]
    DnsmasqNotReady {
        /// How long it was given.
        deadline: Duration,
        /// The end of its log.
        log: String,
    },
    /// A signal could not be sent to dnsmasq.
    #[error("could not signal dnsmasq (pid {pid}): {source}")]
    Signal {
        /// dnsmasq's pid.
        pid: u32,
        /// Why.
        source: io::Error,
    },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> GuestNetError + 'a {
    move |source| GuestNetError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The guest network of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNetConfig {
    /// The network namespace everything lives in (`ip netns add`); `None` for the agent's own.
    pub netns: Option<String>,
    /// The bridge the guests' taps join, e.g. `karri0`.
    pub bridge: String,
    /// The subnet's network address, e.g. 172.31.0.0.
    pub subnet: Ipv4Addr,
    /// The subnet's prefix length, e.g. 24.
    pub prefix: u8,
    /// The guests' router, on the bridge: the first host of the subnet.
    pub gateway: Ipv4Addr,
    /// The metadata service's address, on the bridge as a /32: 169.254.169.254.
    pub metadata_ip: Ipv4Addr,
    /// Where dnsmasq's hosts directory, lease file, pid file and log go.
    pub state_dir: PathBuf,
    /// The DNS suffix handed to guests, e.g. `karri-1.compute.internal`.
    pub domain: String,
}

impl GuestNetConfig {
    /// A configuration with the defaults: bridge `karri0`, the gateway at the subnet's first host,
    /// the metadata address 169.254.169.254.
    pub fn new(
        netns: Option<String>,
        subnet: Ipv4Addr,
        prefix: u8,
        state_dir: PathBuf,
        domain: &str,
    ) -> Result<GuestNetConfig, GuestNetError> {
        let cfg = GuestNetConfig {
            netns,
            bridge: DEFAULT_BRIDGE.to_string(),
            subnet,
            prefix,
            gateway: Ipv4Addr::from(u32::from(subnet).wrapping_add(1)),
            metadata_ip: METADATA_IP,
            state_dir,
            domain: domain.to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The subnet mask, e.g. 255.255.255.0 for /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask_bits(self.prefix))
    }

    /// Whether `ip` is a host address of the subnet (not its network or broadcast address).
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        let mask = mask_bits(self.prefix);
        let net = u32::from(self.subnet) & mask;
        let ip = u32::from(ip);
        ip & mask == net && ip != net && ip != net | !mask
    }

    /// Whether `ip` may be handed to a guest: a host address of the subnet, not the gateway.
    pub fn is_guest_address(&self, ip: Ipv4Addr) -> bool {
        self.is_host(ip) && ip != self.gateway
    }

    /// The directory of per-guest DHCP host files, `<state_dir>/dhcp-hosts`.
    pub fn hosts_dir(&self) -> PathBuf {
        self.state_dir.join("dhcp-hosts")
    }

    /// dnsmasq's pid file, `<state_dir>/dnsmasq.pid`.
    pub fn pid_file(&self) -> PathBuf {
        self.state_dir.join("dnsmasq.pid")
    }

    /// dnsmasq's lease file, `<state_dir>/dnsmasq.leases`.
    pub fn lease_file(&self) -> PathBuf {
        self.state_dir.join("dnsmasq.leases")
    }

    /// dnsmasq's log (its stdout and stderr), `<state_dir>/dnsmasq.log`.
    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("dnsmasq.log")
    }

    /// Checks that the configuration describes a usable network.
    pub fn validate(&self) -> Result<(), GuestNetError> {
        let bad = |why: String| Err(GuestNetError::Config(why));
        if !(8..=30).contains(&self.prefix) {
            return bad(format!("prefix /{} is not between /8 and /30", self.prefix));
        }
        if u32::from(self.subnet) & !mask_bits(self.prefix) != 0 {
            return bad(format!(
                "{} is not the network address of a /{} subnet",
                self.subnet, self.prefix
            ));
        }
        if !self.is_host(self.gateway) {
            return bad(format!(
                "gateway {} is not a host of {}/{}",
                self.gateway, self.subnet, self.prefix
            ));
        }
        if self.bridge.is_empty()
            || self.bridge.len() > MAX_IFNAME
            || !self
                .bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!("{:?} is not an interface name", self.bridge));
        }
        if self.domain.is_empty()
            || !self
                .domain
                .split('.')
                .all(|label| valid_label(label).is_ok())
        {
            return bad(format!("{:?} is not a DNS domain", self.domain));
        }
        if let Some(ns) = &self.netns {
            netns::path(ns).map_err(|e| GuestNetError::Config(e.to_string()))?;
        }
        Ok(())
    }
}

/// The bits of a /`prefix` mask.
fn mask_bits(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - p),
    }
}

pub use crds::subnet::{hostname_for, mac_for};

/// `mac` in lower case if it is six colon-separated two-digit hex octets.
pub fn normalize_mac(mac: &str) -> Result<String, GuestNetError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(mac.to_ascii_lowercase())
    } else {
        Err(GuestNetError::Mac(mac.to_string()))
    }
}

/// Whether `label` is one DNS label: 1–63 letters, digits and inner hyphens.
fn valid_label(label: &str) -> Result<(), GuestNetError> {
    let ok = !label.is_empty()
        && label.len() <= 63
        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(GuestNetError::Hostname(label.to_string()))
    }
}

/// The dnsmasq `dhcp-host` line for one guest: `<mac>,<ip>,<hostname>`.
pub fn host_line(mac: &str, ip: Ipv4Addr, hostname: &str) -> Result<String, GuestNetError> {
    let mac = normalize_mac(mac)?;
    valid_label(hostname)?;
    Ok(format!("{mac},{ip},{hostname}\n"))
}

/// The `ip` commands (arguments after `ip`, without `-n`) that bring the bridge to its wanted
/// state: created when it does not exist yet (with a fixed MAC, so the gateway's MAC does not
/// follow the taps that come and go), the gateway's address and the metadata address on it
/// (`addr replace` is idempotent), and up. Loopback comes up too inside a namespace.
pub fn bridge_plan(cfg: &GuestNetConfig, bridge_exists: bool) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let br = cfg.bridge.as_str();
    let mut plan = Vec::new();
    if cfg.netns.is_some() {
        plan.push(s(&["link", "set", "dev", "lo", "up"]));
    }
    if !bridge_exists {
        plan.push(s(&[
            "link",
            "add",
            "name",
            br,
            "address",
            &mac_for(cfg.gateway),
            "type",
            "bridge",
            "stp_state",
            "0",
        ]));
    }
    plan.push(s(&[
        "addr",
        "replace",
        &format!("{}/{}", cfg.gateway, cfg.prefix),
        "dev",
        br,
    ]));
    plan.push(s(&[
        "addr",
        "replace",
        &format!("{}/32", cfg.metadata_ip),
        "dev",
        br,
    ]));
    plan.push(s(&["link", "set", "dev", br, "up"]));
    plan
}

/// The `ip` arguments that tell whether the bridge exists (exit status 0).
fn bridge_show_args(cfg: &GuestNetConfig) -> Vec<String> {
    ["link", "show", "dev", cfg.bridge.as_str()]
        .iter()
        .map(|a| a.to_string())
        .collect()
}

/// Runs `ip <args>` in the configuration's namespace; the output on success.
async fn ip(cfg: &GuestNetConfig, args: &[String]) -> Result<std::process::Output, GuestNetError> {
    let out = netns::command(cfg.netns.as_deref(), "ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| GuestNetError::Spawn {
            program: "ip".into(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(GuestNetError::Command {
            command: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Creates the bridge if needed, puts the gateway's and the metadata addresses on it and brings
/// it up, inside the configuration's namespace. Idempotent.
pub async fn ensure_bridge(cfg: &GuestNetConfig) -> Result<(), GuestNetError> {
    cfg.validate()?;
    let exists = ip(cfg, &bridge_show_args(cfg)).await.is_ok();
    for args in bridge_plan(cfg, exists) {
        match ip(cfg, &args).await {
            Ok(_) => {}
            // Someone else created it between the check and the add: fine.
            Err(_) if args.get(1).map(String::as_str) == Some("add") => {
                ip(cfg, &bridge_show_args(cfg)).await?;
            }
            Err(e) => return Err(e),
        }
    }
    if !exists {
        tracing::info!(
            netns = cfg.netns.as_deref().unwrap_or("-"),
            bridge = %cfg.bridge,
            gateway = %cfg.gateway,
            "created the guest bridge"
        );
    }
    Ok(())
}

/// The dnsmasq command line for the configuration (without the program): DHCP only (no DNS:
/// `--port=0`), on the bridge only, static leases only from the hosts directory, the gateway as
/// router, the domain as DNS suffix, in the foreground with its log on stderr.
pub fn dnsmasq_args(cfg: &GuestNetConfig) -> Vec<String> {
    let p = |path: PathBuf| path.display().to_string();
    vec![
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-hosts".into(),
        "--no-resolv".into(),
        "--port=0".into(),
        "--user=root".into(),
        "--group=root".into(),
        "--log-facility=-".into(),
        "--log-dhcp".into(),
        format!("--interface={}", cfg.bridge),
        "--bind-interfaces".into(),
        "--except-interface=lo".into(),
        format!(
            "--dhcp-range={},static,{},{LEASE_TIME}",
            cfg.subnet,
            cfg.netmask()
        ),
        format!("--dhcp-hostsdir={}", p(cfg.hosts_dir())),
        format!("--dhcp-leasefile={}", p(cfg.lease_file())),
        format!("--dhcp-option=option:router,{}", cfg.gateway),
        format!("--dhcp-option=option:domain-name,{}", cfg.domain),
        "--dhcp-authoritative".into(),
        format!("--pid-file={}", p(cfg.pid_file())),
    ]
}

/// The pid in `pid_file` if that process is a dnsmasq started with that pid file.
fn stale_dnsmasq(pid_file: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let wanted = format!("--pid-file={}", pid_file.display());
    let mut args = cmdline.split(|b| *b == 0);
    let is_dnsmasq = args.next().is_some_and(|a| a.ends_with(b"dnsmasq"));
    let has_pid_file = args.any(|a| a == wanted.as_bytes());
    (is_dnsmasq && has_pid_file).then_some(pid)
}

/// Whether process `pid` is gone (or a zombie waiting for its parent).
fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn signal(pid: u32, sig: Signal) -> Result<(), GuestNetError> {
    let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Err(GuestNetError::Signal {
            pid,
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a pid"),
        });
    };
    match kill_process(raw, sig) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(GuestNetError::Signal {
            pid,
            source: e.into(),
        }),
    }
}

/// Stops a dnsmasq left behind by an earlier run with the same pid file: SIGTERM, then SIGKILL
/// when it lingers past [`STALE_EXIT_DEADLINE`].
async fn kill_stale_dnsmasq(pid_file: &Path) -> Result<(), GuestNetError> {
    let Some(pid) = stale_dnsmasq(pid_file) else {
        return Ok(());
    };
    tracing::info!(pid, "stopping a dnsmasq left by an earlier run");
    signal(pid, Signal::TERM)?;
    let deadline = tokio::time::Instant::now() + STALE_EXIT_DEADLINE;
    while !exited(pid) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(pid, "the stale dnsmasq ignored SIGTERM; killing it");
            signal(pid, Signal::KILL)?;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let _ = fs::remove_file(pid_file);
    Ok(())
}

/// The last `n` lines of a file, or an empty string.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One dnsmasq serving the guest network's static leases. Dropping it kills dnsmasq.
#[derive(Debug)]
pub struct Dhcp {
    cfg: GuestNetConfig,
    child: tokio::process::Child,
    pid: u32,
}

impl Dhcp {
    /// Starts dnsmasq in the configuration's namespace, after stopping one that an earlier run
    /// left with the same pid file, and waits until it has written its pid file. The bridge
    /// must exist ([`ensure_bridge`]).
    pub async fn start(cfg: &GuestNetConfig) -> Result<Dhcp, GuestNetError> {
        cfg.validate()?;
        let hosts = cfg.hosts_dir();
        fs::create_dir_all(&hosts).map_err(io_err("create", &hosts))?;
        kill_stale_dnsmasq(&cfg.pid_file()).await?;
        let (child, pid) = spawn_dnsmasq(cfg).await?;
        tracing::info!(
            netns = cfg.netns.as_deref().unwrap_or("-"),
            bridge = %cfg.bridge,
            pid,
            "dnsmasq serves the guest network"
        );
        Ok(Dhcp {
            cfg: cfg.clone(),
            child,
            pid,
        })
    }

    /// The configuration it serves.
    pub fn config(&self) -> &GuestNetConfig {
        &self.cfg
    }

    /// dnsmasq's process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Gives the guest with `mac` the address `ip` and host name `hostname`. Writes nothing when
    /// the record is already there; when it replaces a different one, dnsmasq is told to reread.
    /// The file work (an fsync) runs on a blocking thread, off the async workers.
    pub async fn set_host(
        &self,
        mac: &str,
        ip: Ipv4Addr,
        hostname: &str,
    ) -> Result<(), GuestNetError> {
        if !self.cfg.is_guest_address(ip) {
            return Err(GuestNetError::NotInSubnet {
                ip,
                subnet: self.cfg.subnet,
                prefix: self.cfg.prefix,
            });
        }
        let line = host_line(mac, ip, hostname)?;
        let (dir, file) = (self.cfg.hosts_dir(), normalize_mac(mac)?);
        let wrote = blocking(move || write_host_file(&dir, &file, &line)).await?;
        match wrote {
            HostWrite::Unchanged => {}
            HostWrite::Added => tracing::debug!(mac, %ip, "added a DHCP host"),
            HostWrite::Replaced => {
                tracing::debug!(mac, %ip, "replaced a DHCP host");
                self.reload()?;
            }
        }
        Ok(())
    }

    /// Forgets the guest with `mac` (nothing happens when it is unknown).
    pub async fn remove_host(&self, mac: &str) -> Result<(), GuestNetError> {
        let mac = normalize_mac(mac)?;
        let path = self.cfg.hosts_dir().join(&mac);
        let removing = path.clone();
        match blocking(move || Ok(fs::remove_file(&removing))).await? {
            Ok(()) => {
                tracing::debug!(mac, "removed a DHCP host");
                self.reload()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Forgets every guest whose MAC is not in `keep` (MACs in any case).
    pub async fn retain_hosts(&self, keep: &HashSet<String>) -> Result<(), GuestNetError> {
        let keep: HashSet<String> = keep.iter().map(|m| m.to_ascii_lowercase()).collect();
        let dir = self.cfg.hosts_dir();
        let removed = blocking(move || retain_host_files(&dir, &keep)).await?;
        if removed > 0 {
            tracing::debug!(removed, "removed DHCP hosts");
            self.reload()?;
        }
        Ok(())
    }

    /// The MACs that have a record, sorted.
    pub fn hosts(&self) -> Result<Vec<String>, GuestNetError> {
        host_files(&self.cfg.hosts_dir())
    }

    /// Starts dnsmasq again if it died. Returns whether it had to.
    pub async fn ensure_running(&mut self) -> Result<bool, GuestNetError> {
        let status = match self.child.try_wait() {
            Ok(None) => return Ok(false),
            Ok(Some(status)) => status.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            pid = self.pid,
            %status,
            log = %tail(&self.cfg.log_file(), LOG_TAIL),
            "dnsmasq died; starting it again"
        );
        kill_stale_dnsmasq(&self.cfg.pid_file()).await?;
        let (child, pid) = spawn_dnsmasq(&self.cfg).await?;
        self.child = child;
        self.pid = pid;
        Ok(true)
    }

    /// Stops dnsmasq and waits for it.
    pub async fn stop(mut self) -> Result<(), GuestNetError> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = fs::remove_file(self.cfg.pid_file());
        Ok(())
    }

    /// Makes dnsmasq reread the hosts directory (SIGHUP), which drops removed records.
    fn reload(&self) -> Result<(), GuestNetError> {
        signal(self.pid, Signal::HUP)
    }
}

/// Spawns dnsmasq and waits until it has written its pid into the pid file.
async fn spawn_dnsmasq(
    cfg: &GuestNetConfig,
) -> Result<(tokio::process::Child, u32), GuestNetError> {
    let pid_file = cfg.pid_file();
    let _ = fs::remove_file(&pid_file);
    let log_path = cfg.log_file();
    let log = File::create(&log_path).map_err(io_err("create", &log_path))?;
    let log2 = log.try_clone().map_err(io_err("reopen", &log_path))?;
    let mut child = netns::command(cfg.netns.as_deref(), DNSMASQ)
        .args(dnsmasq_args(cfg))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| GuestNetError::Spawn {
            program: DNSMASQ.into(),
            source,
        })?;
    let deadline = tokio::time::Instant::now() + DNSMASQ_READY_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Err(GuestNetError::DnsmasqExited {
                status: status.to_string(),
                log: tail(&log_path, LOG_TAIL),
            });
        }
        // `ip netns exec` execs dnsmasq in place: the child's pid is dnsmasq's.
        let written = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let (Some(pid), Some(child_pid)) = (written, child.id()) {
            if pid == child_pid {
                return Ok((child, pid));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.start_kill();
            return Err(GuestNetError::DnsmasqNotReady {
                deadline: DNSMASQ_READY_DEADLINE,
                log: tail(&log_path, LOG_TAIL),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs file work on a blocking thread: an fsync on a slow disk must not stall an async worker
/// (the agent has two, which also serve the metadata service and renew the node's lease).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, GuestNetError> + Send + 'static,
) -> Result<T, GuestNetError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| GuestNetError::Task(e.to_string()))?
}

/// What [`write_host_file`] did.
#[derive(Debug, PartialEq, Eq)]
enum HostWrite {
    /// The same record was there.
    Unchanged,
    /// A new record.
    Added,
    /// A different record for the MAC was replaced.
    Replaced,
}

/// Writes `line` as the hosts file of `mac` atomically: a dot file (dnsmasq ignores those)
/// renamed into place.
fn write_host_file(dir: &Path, mac: &str, line: &str) -> Result<HostWrite, GuestNetError> {
    let path = dir.join(mac);
    let previous = match fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    if previous.as_deref() == Some(line) {
        return Ok(HostWrite::Unchanged);
    }
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{mac}.{}.{n}.tmp", std::process::id()));
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("rename into", &path))?;
    Ok(if previous.is_some() {
        HostWrite::Replaced
    } else {
        HostWrite::Added
    })
}

/// The MACs with a hosts file in `dir`, sorted (dot files, i.e. unfinished writes, excluded).
fn host_files(dir: &Path) -> Result<Vec<String>, GuestNetError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut macs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            if !name.starts_with('.') {
                macs.push(name.to_string());
            }
        }
    }
    macs.sort();
    Ok(macs)
}

/// Removes the hosts files of MACs not in `keep` (lower case); how many it removed.
fn retain_host_files(dir: &Path, keep: &HashSet<String>) -> Result<usize, GuestNetError> {
    let mut removed = 0;
    for mac in host_files(dir)? {
        if !keep.contains(&mac) {
            let path = dir.join(&mac);
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(netns: Option<&str>) -> GuestNetConfig {
        GuestNetConfig::new(
            netns.map(str::to_string),
            Ipv4Addr::new(172, 31, 0, 0),
            24,
            PathBuf::from("/var/lib/karri/net"),
            "karri-1.compute.internal",
        )
        .expect("valid configuration")
    }

    #[test]
    fn mac_for_puts_the_four_octets_in_hex_after_a_local_prefix() {
        for (ip, mac) in [
            ([172, 31, 0, 5], "02:00:ac:1f:00:05"),
            ([10, 0, 255, 254], "02:00:0a:00:ff:fe"),
            ([0, 0, 0, 0], "02:00:00:00:00:00"),
        ] {
            assert_eq!(mac_for(Ipv4Addr::from(ip)), mac);
        }
    }

    #[test]
    fn hostname_for_spells_the_address_with_hyphens() {
        for (ip, name) in [
            ([172, 31, 0, 5], "ip-172-31-0-5"),
            ([10, 0, 255, 254], "ip-10-0-255-254"),
        ] {
            assert_eq!(hostname_for(Ipv4Addr::from(ip)), name);
        }
    }

    #[test]
    fn new_puts_the_gateway_on_the_first_host_and_metadata_on_the_link_local_address() {
        let c = cfg(Some("ns1"));
        assert_eq!(c.gateway, Ipv4Addr::new(172, 31, 0, 1));
        assert_eq!(c.metadata_ip, Ipv4Addr::new(169, 254, 169, 254));
        assert_eq!(c.bridge, "karri0");
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            c.hosts_dir(),
            PathBuf::from("/var/lib/karri/net/dhcp-hosts")
        );
    }

    #[test]
    fn validate_refuses_configurations_that_cannot_describe_a_network() {
        let ok = cfg(None);
        let cases: Vec<(&str, GuestNetConfig)> = vec![
            (
                "host bits set",
                GuestNetConfig {
                    subnet: Ipv4Addr::new(172, 31, 0, 1),
                    ..ok.clone()
                },
            ),
            (
                "prefix too long",
                GuestNetConfig {
                    prefix: 31,
                    ..ok.clone()
                },
            ),
            (
                "gateway outside",
                GuestNetConfig {
                    gateway: Ipv4Addr::new(172, 31, 1, 1),
                    ..ok.clone()
                },
            ),
            (
                "bridge name too long",
                GuestNetConfig {
                    bridge: "a-very-long-bridge-name".into(),
                    ..ok.clone()
                },
            ),
            (
                "bad domain",
                GuestNetConfig {
                    domain: "bad domain".into(),
                    ..ok.clone()
                },
            ),
            (
                "bad namespace",
                GuestNetConfig {
                    netns: Some("../x".into()),
                    ..ok.clone()
                },
            ),
        ];
        for (what, c) in cases {
            assert!(
                matches!(c.validate(), Err(GuestNetError::Config(_))),
                "{what}"
            );
        }
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn guest_addresses_exclude_network_broadcast_and_gateway() {
        let c = cfg(None);
        for (ip, guest) in [
            ([172, 31, 0, 5], true),
            ([172, 31, 0, 254], true),
            ([172, 31, 0, 0], false),
            ([172, 31, 0, 255], false),
            ([172, 31, 0, 1], false),
            ([172, 31, 1, 5], false),
        ] {
            assert_eq!(c.is_guest_address(Ipv4Addr::from(ip)), guest, "{ip:?}");
        }
    }

    #[test]
    fn bridge_plan_creates_only_a_missing_bridge_and_always_sets_addresses_and_state() {
        let join = |plan: Vec<Vec<String>>| -> Vec<String> {
            plan.into_iter().map(|args| args.join(" ")).collect()
        };
        let cases = [
            (
                Some("ns1"),
                false,
                vec![
                    "link set dev lo up",
                    "link add name karri0 address 02:00:ac:1f:00:01 type bridge stp_state 0",
                    "addr replace 172.31.0.1/24 dev karri0",
                    "addr replace 169.254.169.254/32 dev karri0",
                    "link set dev karri0 up",
                ],
            ),
            (
                Some("ns1"),
                true,
                vec![
                    "link set dev lo up",
                    "addr replace 172.31.0.1/24 dev karri0",
                    "addr replace 169.254.169.254/32 dev karri0",
                    "link set dev karri0 up",
                ],
            ),
            (
                None,
                true,
                vec![
                    "addr replace 172.31.0.1/24 dev karri0",
                    "addr replace 169.254.169.254/32 dev karri0",
                    "link set dev karri0 up",
                ],
            ),
        ];
        for (netns, exists, want) in cases {
            assert_eq!(
                join(bridge_plan(&cfg(netns), exists)),
                want,
                "{netns:?} {exists}"
            );
        }
    }

    #[test]
    fn dnsmasq_args_serve_static_dhcp_only_on_the_bridge() {
        let mut c = cfg(Some("ns1"));
        let want = [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-hosts",
            "--no-resolv",
            "--port=0",
            "--user=root",
            "--group=root",
            "--log-facility=-",
            "--log-dhcp",
            "--interface=karri0",
            "--bind-interfaces",
            "--except-interface=lo",
            "--dhcp-range=172.31.0.0,static,255.255.255.0,1h",
            "--dhcp-hostsdir=/var/lib/karri/net/dhcp-hosts",
            "--dhcp-leasefile=/var/lib/karri/net/dnsmasq.leases",
            "--dhcp-option=option:router,172.31.0.1",
            "--dhcp-option=option:domain-name,karri-1.compute.internal",
            "--dhcp-authoritative",
            "--pid-file=/var/lib/karri/net/dnsmasq.pid",
        ];
        assert_eq!(dnsmasq_args(&c), want);

        c.subnet = Ipv4Addr::new(10, 1, 0, 0);
        c.prefix = 16;
        c.gateway = Ipv4Addr::new(10, 1, 0, 1);
        c.bridge = "br-x".into();
        let args = dnsmasq_args(&c);
        assert!(args.contains(&"--dhcp-range=10.1.0.0,static,255.255.0.0,1h".to_string()));
        assert!(args.contains(&"--interface=br-x".to_string()));
        assert!(args.contains(&"--dhcp-option=option:router,10.1.0.1".to_string()));
    }

    #[test]
    fn host_line_normalizes_the_mac_and_refuses_malformed_input() {
        let ip = Ipv4Addr::new(172, 31, 0, 5);
        assert_eq!(
            host_line("02:00:AC:1F:00:05", ip, "ip-172-31-0-5").expect("valid"),
            "02:00:ac:1f:00:05,172.31.0.5,ip-172-31-0-5\n"
        );
        for mac in [
            "",
            "02:00:ac:1f:00",
            "02:00:ac:1f:00:5",
            "zz:00:ac:1f:00:05",
            "../x",
        ] {
            assert!(matches!(
                host_line(mac, ip, "h"),
                Err(GuestNetError::Mac(_))
            ));
        }
        for name in ["", "a,b", "a b", "-a", "a\nb", &"x".repeat(64)] {
            assert!(matches!(
                host_line("02:00:ac:1f:00:05", ip, name),
                Err(GuestNetError::Hostname(_))
            ));
        }
    }

    #[test]
    fn host_files_are_written_once_replaced_when_different_and_retained_by_mac() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = "02:00:ac:1f:00:05";
        let b = "02:00:ac:1f:00:06";
        let line_a = "02:00:ac:1f:00:05,172.31.0.5,ip-172-31-0-5\n";
        assert_eq!(
            write_host_file(dir.path(), a, line_a).expect("write"),
            HostWrite::Added
        );
        assert_eq!(
            write_host_file(dir.path(), a, line_a).expect("write"),
            HostWrite::Unchanged
        );
        assert_eq!(
            write_host_file(dir.path(), a, "02:00:ac:1f:00:05,172.31.0.7,x\n").expect("write"),
            HostWrite::Replaced
        );
        write_host_file(dir.path(), b, "02:00:ac:1f:00:06,172.31.0.6,y\n").expect("write");
        assert_eq!(
            fs::read_to_string(dir.path().join(a)).expect("read"),
            "02:00:ac:1f:00:05,172.31.0.7,x\n"
        );
        // No temporary files are left, and unfinished ones are not hosts.
        fs::write(dir.path().join(".02:00:00:00:00:09.tmp"), "partial").expect("write");
        assert_eq!(host_files(dir.path()).expect("list"), [a, b]);

        let keep: HashSet<String> = [b.to_string()].into();
        assert_eq!(retain_host_files(dir.path(), &keep).expect("retain"), 1);
        assert_eq!(host_files(dir.path()).expect("list"), [b]);
        assert_eq!(retain_host_files(dir.path(), &keep).expect("retain"), 0);
    }

    #[test]
    fn stale_dnsmasq_ignores_pid_files_of_other_processes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("dnsmasq.pid");
        assert_eq!(stale_dnsmasq(&pid_file), None);
        // This test process is alive but is not a dnsmasq with that pid file.
        fs::write(&pid_file, format!("{}\n", std::process::id())).expect("write");
        assert_eq!(stale_dnsmasq(&pid_file), None);
    }
}
