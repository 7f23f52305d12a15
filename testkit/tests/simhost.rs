//! Simulated hosts for real, as root: a private libvirtd inside a test-created network namespace
//! answers from the root namespace, `simhost.sh start` is idempotent, commands run inside the
//! namespace, and stopping leaves neither the namespace nor the daemons behind. A bare [`Netns`]
//! goes away on drop with what runs inside it.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context as _};
use karri_testkit::simhost::{netns_exists, netns_pids, run_ok, simhost_script, Netns};
use karri_testkit::SimHost;

fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&run_ok(cmd)?.stdout)
        .trim()
        .to_string())
}

fn pid_in(dir: &Path, file: &str) -> anyhow::Result<u32> {
    let text =
        std::fs::read_to_string(dir.join(file)).with_context(|| format!("reading {file}"))?;
    Ok(text.trim().parse()?)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_simulated_host_answers_from_the_root_namespace_and_stops_without_leftovers(
) -> anyhow::Result<()> {
    let mut host = SimHost::start("lifecycle")?;
    assert!(host.netns().starts_with("karri-t-"), "{}", host.netns());
    assert_eq!(
        host.uri(),
        format!(
            "qemu+unix:///system?socket={}/run/libvirt-sock",
            host.dir().display()
        )
    );
    let version = stdout(&mut host.virsh(["version"]))?;
    ensure!(version.contains("QEMU"), "{version}");

    // The daemon lives in the host's network namespace, not in the root one.
    let libvirtd = pid_in(host.dir(), "libvirtd.pid")?;
    let daemon_ns = std::fs::read_link(format!("/proc/{libvirtd}/ns/net"))?;
    let inside = stdout(&mut host.exec(["readlink", "/proc/self/ns/net"]))?;
    let root = std::fs::read_link("/proc/self/ns/net")?;
    assert_eq!(daemon_ns.to_string_lossy(), inside);
    assert_ne!(daemon_ns, root);

    // Starting again while it answers only prints the URI.
    let again = stdout(
        Command::new("bash")
            .arg(simhost_script())
            .arg("start")
            .arg(host.dir())
            .arg(host.netns()),
    )?;
    assert_eq!(again.lines().last(), Some(host.uri()));
    assert_eq!(pid_in(host.dir(), "libvirtd.pid")?, libvirtd);

    let virtlogd = pid_in(host.dir(), "virtlogd.pid")?;
    let netns = host.netns().to_string();
    host.stop()?;
    assert!(!netns_exists(&netns), "{netns} still exists");
    assert!(!alive(libvirtd), "libvirtd {libvirtd} still runs");
    assert!(!alive(virtlogd), "virtlogd {virtlogd} still runs");
    // Stopping twice is harmless.
    host.stop()?;
    Ok(())
}

#[test]
fn a_test_namespace_goes_away_on_drop_with_what_runs_inside() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let name = ns.name().to_string();
    assert!(netns_exists(&name));
    let lo = stdout(&mut ns.ip(["-o", "link", "show", "dev", "lo"]))?;
    ensure!(lo.contains("UP"), "{lo}");
    let mut sleeper = ns.exec(["sleep", "600"]).spawn()?;
    let pid = sleeper.id();
    // `ip netns exec` enters the namespace and then execs `sleep` (same PID): wait until it is
    // inside, or the drop races with its entering.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !netns_pids(&name).contains(&pid.to_string()) {
        if std::time::Instant::now() > deadline {
            let _ = sleeper.kill();
            anyhow::bail!("sleep {pid} never showed up in {name}");
        }
        std::thread::yield_now();
    }
    drop(ns);
    assert!(!netns_exists(&name), "{name} still exists");
    let status = sleeper.wait()?;
    assert!(!status.success(), "sleep {pid} was not killed");
    Ok(())
}

/// Undefines a domain of the system libvirtd when dropped.
struct SystemDomain(String);

impl Drop for SystemDomain {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "undefine", &self.0])
            .output();
    }
}

#[test]
fn a_simulated_host_starts_without_the_system_libvirtds_domains() -> anyhow::Result<()> {
    // A domain the machine's own libvirtd keeps in /etc/libvirt/qemu.
    let name = format!("karri-simhost-probe-{}", std::process::id());
    let xml_dir = tempfile::tempdir()?;
    let xml = xml_dir.path().join("domain.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>16</memory>\
             <os><type arch='x86_64'>hvm</type></os></domain>"
        ),
    )?;
    run_ok(
        Command::new("virsh")
            .args(["-c", "qemu:///system", "define"])
            .arg(&xml),
    )
    .context("the system libvirtd must answer (`bash scripts/libvirtd.sh`, as make test does)")?;
    let _defined = SystemDomain(name.clone());

    let mut host = SimHost::start("own-config")?;
    let listed = stdout(&mut host.virsh(["list", "--all", "--name"]))?;
    ensure!(
        !listed.contains(&name),
        "the simulated host took the system libvirtd's domain: {listed}"
    );
    ensure!(
        listed.is_empty(),
        "a fresh simulated host has no domains: {listed}"
    );
    host.stop()?;
    Ok(())
}

#[test]
fn a_simulated_host_in_a_directory_too_long_for_socket_paths_answers_on_a_short_one(
) -> anyhow::Result<()> {
    let base = tempfile::tempdir()?;
    // Well past the 107 bytes of a Unix socket's path.
    host_answers_on_a_short_socket_path(&base.path().join("d".repeat(100)).join("host"))
}

#[test]
fn a_simulated_host_in_a_directory_with_a_space_answers_and_logs() -> anyhow::Result<()> {
    let base = tempfile::tempdir()?;
    let dir = base.path().join("my cloud").join("host");
    host_answers_on_a_short_socket_path(&dir)?;
    // libvirtd could log to its private /var/log/libvirt: DIR/libvirtd.log leads there.
    let log = std::fs::canonicalize(dir.join("libvirtd.log"))
        .context("DIR/libvirtd.log leads nowhere: libvirtd did not log")?;
    ensure!(
        log.starts_with(std::fs::canonicalize(&dir)?.join("state").join("log")),
        "{}",
        log.display()
    );
    Ok(())
}

/// Starts a simulated host in `dir`, which a libvirt socket URI cannot name: it answers on a
/// socket under /run/karri-simhost, which stopping removes.
fn host_answers_on_a_short_socket_path(dir: &Path) -> anyhow::Result<()> {
    let netns = karri_testkit::simhost::unique_netns_name();
    let script = simhost_script();
    let simhost = |action: &str| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(action).arg(dir).arg(&netns);
        cmd
    };
    let started = stdout(&mut simhost("start"));
    let result = (|| {
        let uri = started?;
        let uri = uri.lines().last().unwrap_or_default().to_string();
        ensure!(
            uri.starts_with("qemu+unix:///system?socket=/run/karri-simhost/"),
            "{uri}"
        );
        let socket = uri.trim_start_matches("qemu+unix:///system?socket=");
        ensure!(socket.len() <= 107, "{socket}");
        let version = stdout(Command::new("virsh").args(["-c", &uri, "version"]))?;
        ensure!(version.contains("QEMU"), "{version}");
        // DIR/run leads to the sockets, as for any other host.
        ensure!(
            dir.join("run").join("libvirt-sock").exists(),
            "{}/run does not lead to the sockets",
            dir.display()
        );
        anyhow::Ok(socket.to_string())
    })();
    let stopped = run_ok(&mut simhost("stop"));
    let socket = result?;
    stopped?;
    ensure!(!netns_exists(&netns), "{netns} still exists");
    let sock_dir = Path::new(&socket)
        .parent()
        .context("the socket has a directory")?;
    ensure!(!sock_dir.exists(), "{} is left behind", sock_dir.display());
    Ok(())
}
