//! Simulated hypervisor hosts (DESIGN §5): network namespaces that tests create and delete.
//!
//! - [`Netns`]: a bare network namespace (`ip netns add`), deleted on drop with everything still
//!   running in it.
//! - [`SimHost`]: a namespace with a private libvirtd inside (`scripts/simhost.sh`), so the taps of
//!   its guests and the guests' bridge never live in the machine's root namespace.
//!
//! Both need root, and `ip` (iproute2); [`SimHost`] also needs libvirt and util-linux.

use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

/// How long the processes of a namespace get to go away after SIGKILL before it is deleted.
const KILL_DEADLINE: Duration = Duration::from_secs(5);
/// How often [`Netns`]'s drop polls for processes left in the namespace.
const KILL_POLL: Duration = Duration::from_millis(20);

/// A fresh network namespace name, `karri-t-<8 hex digits>`.
pub fn unique_netns_name() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("karri-t-{:08x}", h.finish() as u32)
}

/// A command running `args` inside network namespace `netns` (`ip netns exec`).
fn exec_in<I, S>(netns: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args(args);
    cmd
}

/// An `ip` command acting on network namespace `netns` (`ip -n <netns> ...`).
fn ip_in<I, S>(netns: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns]).args(args);
    cmd
}

/// Runs `cmd`, failing with its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Whether network namespace `name` exists (has a handle in `/run/netns`).
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// The pids of the processes in network namespace `name` (`ip netns pids`).
/// The PIDs of the processes inside network namespace `name` (`ip netns pids`).
pub fn netns_pids(name: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Kills (SIGKILL) every process in network namespace `name`, waiting a bounded time for them
/// to go, then deletes the namespace. Harmless when it does not exist.
fn delete_netns(name: &str) {
    if !netns_exists(name) {
        return;
    }
    let start = Instant::now();
    loop {
        let pids = netns_pids(name);
        if pids.is_empty() || start.elapsed() > KILL_DEADLINE {
            break;
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(KILL_POLL);
    }
    if let Err(e) = run_ok(Command::new("ip").args(["netns", "delete", name])) {
        eprintln!("testkit: deleting network namespace {name}: {e:#}");
    }
}

/// A network namespace created for a test (`ip netns add`, loopback up). Dropping it kills every
/// process still inside and deletes it, so it also goes when a test fails.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a fresh name ([`unique_netns_name`]) and brings its loopback up.
    pub fn new() -> anyhow::Result<Netns> {
        let name = unique_netns_name();
        run_ok(Command::new("ip").args(["netns", "add", &name]))
            .context("creating a network namespace (needs root and iproute2)")?;
        let ns = Netns { name };
        run_ok(&mut ns.ip(["link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command running `args` inside the namespace (`ip netns exec <name> args...`).
    pub fn exec<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec_in(&self.name, args)
    }

    /// An `ip` command acting on the namespace (`ip -n <name> args...`).
    pub fn ip<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ip_in(&self.name, args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

/// A simulated hypervisor host: network namespace [`SimHost::netns`] with a private libvirtd in
/// it, started by `scripts/simhost.sh`, reachable from the root namespace at [`SimHost::uri`].
/// Dropping it runs `simhost.sh stop` (domains destroyed, daemons stopped, namespace deleted)
/// and removes its directory.
#[derive(Debug)]
pub struct SimHost {
    netns: String,
    uri: String,
    script: PathBuf,
    stopped: bool,
    // Removed on drop, after `stop`.
    dir: TempDir,
}

impl SimHost {
    /// Starts a simulated host: a fresh namespace `karri-t-<hex>`, a temporary directory named
    /// after `name_hint`, and a private libvirtd answering on the returned handle's
    /// [`uri`](SimHost::uri). Blocks until libvirtd answers (the script waits up to 30 s; the
    /// first start on a machine probes QEMU's capabilities, later ones reuse them).
    pub fn start(name_hint: &str) -> anyhow::Result<SimHost> {
        let script = simhost_script();
        if !script.is_file() {
            bail!("{} not found", script.display());
        }
        let hint: String = name_hint
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(12)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("karri-sim-{hint}-"))
            .tempdir()
            .context("creating the simulated host's directory")?;
        let mut host = SimHost {
            netns: unique_netns_name(),
            uri: String::new(),
            script,
            stopped: false,
            dir,
        };
        let out = run_ok(
            Command::new("bash")
                .arg(&host.script)
                .arg("start")
                .arg(host.dir.path())
                .arg(&host.netns),
        )
        .context("scripts/simhost.sh start")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        host.uri = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .context("scripts/simhost.sh start printed no URI")?;
        Ok(host)
    }

    /// The libvirt URI of the host's libvirtd,
    /// `qemu+unix:///system?socket=<dir>/run/libvirt-sock` (under `/run/karri-simhost` for a
    /// directory too long for a socket's path).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The host's network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's directory: daemon configuration, state, logs and sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A command running `args` inside the host's namespace (`ip netns exec <netns> args...`).
    pub fn exec<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec_in(&self.netns, args)
    }

    /// An `ip` command acting on the host's namespace (`ip -n <netns> args...`).
    pub fn ip<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ip_in(&self.netns, args)
    }

    /// A `virsh -c <uri> args...` command against the host's libvirtd (run from the root
    /// namespace: the socket is reachable from there).
    pub fn virsh<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("virsh");
        cmd.args(["-c", &self.uri]).args(args);
        cmd
    }

    /// The last lines of the private libvirtd's log, for error messages.
    pub fn log_tail(&self) -> String {
        crate::log_tail(&self.dir().join("libvirtd.log"), 40)
    }

    /// Runs `simhost.sh stop`: destroys and undefines every domain, stops the daemons and
    /// deletes the namespace. Calling it again does nothing.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let stopped = run_ok(
            Command::new("bash")
                .arg(&self.script)
                .arg("stop")
                .arg(self.dir.path())
                .arg(&self.netns),
        );
        // Whatever the script left, the namespace goes.
        delete_netns(&self.netns);
        stopped.map(|_| ())
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("testkit: stopping simulated host {}: {e:#}", self.netns);
        }
    }
}

/// `scripts/simhost.sh` of this workspace, or `$KARRI_SIMHOST_SCRIPT` when set.
pub fn simhost_script() -> PathBuf {
    match std::env::var_os("KARRI_SIMHOST_SCRIPT") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::workspace_root().join("scripts").join("simhost.sh"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_netns_names_differ_and_fit_the_pattern() {
        let a = unique_netns_name();
        let b = unique_netns_name();
        assert_ne!(a, b);
        let hex = a.strip_prefix("karri-t-").expect("prefix");
        assert_eq!(hex.len(), 8);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
