//! The guest network for real, as root (DESIGN §5: everything inside namespaces the test creates):
//!
//! - a bridge and dnsmasq inside one namespace (the "host"), a "guest" that is the far end of a
//!   veth pair moved into a second namespace: busybox `udhcpc` there gets the static lease, and
//!   `curl` there reaches a listener that [`netns::bind_tcp`] put on 169.254.169.254 inside the
//!   host namespace; dnsmasq restarts when it dies and forgets removed hosts;
//! - the port guard ([`PortGuard`], nftables in the host namespace): a guest that takes another
//!   guest's address, or its MAC and address, is not answered, while on an unguarded port the
//!   same spoof works; DHCP and the guest's own address pass;
//! - a simulated host ([`SimHost`], a private libvirtd in its own namespace): a domain with a
//!   bridge interface gets its tap on `karri0` inside that namespace, not in the root one.
//!
//! Needs `ip`, `nft` (nftables), `/usr/sbin/dnsmasq` (dnsmasq-base), `busybox` (udhcpc,
//! arping), `curl`, and libvirt + QEMU for the last test (busybox 1.35's `wget` crashes on this
//! machine). Every wait is bounded polling or a bounded client timeout, never a fixed sleep.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use karri_testkit::simhost::{run_ok, Netns};
use karri_testkit::SimHost;
use node_agent::guestnet::{self, Dhcp, GuestNetConfig, METADATA_IP};
use node_agent::netns;
use node_agent::portguard::{self, PortGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SUBNET: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 0);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 5);
const DOMAIN: &str = "karri-1.compute.internal";
const POLL: Duration = Duration::from_millis(20);
const DEADLINE: Duration = Duration::from_secs(10);

/// The udhcpc event script: configures the lease on the interface and writes what it got.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    if [ -n "$router" ]; then ip route replace default via "$router" dev "$interface"; fi
    echo "ip=$ip subnet=$subnet router=$router hostname=$hostname domain=$domain" > "$LEASE_OUT"
    ;;
esac
exit 0
"#;

fn config(netns: &str, state_dir: &Path) -> anyhow::Result<GuestNetConfig> {
    Ok(GuestNetConfig::new(
        Some(netns.to_string()),
        SUBNET,
        24,
        state_dir.to_path_buf(),
        DOMAIN,
    )?)
}

/// A host namespace with the bridge, and a guest namespace whose `eth0` is a veth peer of a port
/// on that bridge, with MAC `mac`.
struct Wire {
    host: Netns,
    guest: Netns,
    state: tempfile::TempDir,
    cfg: GuestNetConfig,
}

impl Wire {
    async fn new(mac: &str) -> anyhow::Result<Wire> {
        let host = Netns::new()?;
        let guest = Netns::new()?;
        let state = tempfile::Builder::new()
            .prefix("karri-guestnet-")
            .tempdir()?;
        let cfg = config(host.name(), state.path())?;
        guestnet::ensure_bridge(&cfg).await?;
        // The veth pair is created inside the host namespace, one end then moves to the guest.
        run_ok(&mut host.ip([
            "link", "add", "vh0", "type", "veth", "peer", "name", "eth0", "address", mac,
        ]))?;
        run_ok(&mut host.ip(["link", "set", "vh0", "master", &cfg.bridge, "up"]))?;
        run_ok(&mut host.ip(["link", "set", "eth0", "netns", guest.name()]))?;
        run_ok(&mut guest.ip(["link", "set", "eth0", "up"]))?;
        Ok(Wire {
            host,
            guest,
            state,
            cfg,
        })
    }

    /// Runs busybox udhcpc on the guest's `eth0` (at most `tries` discovers, one second apart);
    /// what the lease script recorded, or `None` when no lease came.
    async fn udhcpc(&self, tries: u32) -> anyhow::Result<Option<String>> {
        let script = self.state.path().join("udhcpc.sh");
        let out = self.state.path().join("lease.txt");
        std::fs::write(&script, UDHCPC_SCRIPT)?;
        run_ok(Command::new("chmod").arg("+x").arg(&script))?;
        let _ = std::fs::remove_file(&out);
        let tries = tries.to_string();
        let status = tokio::time::timeout(
            Duration::from_secs(30),
            netns::command(Some(self.guest.name()), "busybox")
                .args(["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", &tries])
                .args(["-T", "1", "-A", "1", "-s"])
                .arg(&script)
                .env("LEASE_OUT", &out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status(),
        )
        .await
        .context("udhcpc did not finish within 30 s")??;
        if !status.success() {
            return Ok(None);
        }
        Ok(Some(std::fs::read_to_string(&out)?.trim().to_string()))
    }

    /// The dnsmasq log, for failure messages.
    fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.cfg.log_file()).unwrap_or_default()
    }
}

/// Serves one-line HTTP answers naming the client's address, on a listener inside `netns`.
fn serve_metadata(netns: &str, port: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = netns::bind_tcp(Some(netns), SocketAddr::new(IpAddr::V4(METADATA_IP), port))?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut conn, peer)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let body = format!("hello {}", peer.ip());
            let reply = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        }
    }))
}

/// Polls `ensure_running` until it reports a restart.
async fn restarted(dhcp: &mut Dhcp) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if dhcp.ensure_running().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("dnsmasq was not seen dead within {DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether process `pid` is gone or a zombie.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(true)
}

#[tokio::test]
async fn a_guest_gets_its_static_lease_and_reaches_the_metadata_address_inside_the_namespace(
) -> anyhow::Result<()> {
    let mac = guestnet::mac_for(GUEST_IP);
    let wire = Wire::new(&mac).await?;
    let dhcp = Dhcp::start(&wire.cfg).await?;
    dhcp.set_host(&mac, GUEST_IP, &guestnet::hostname_for(GUEST_IP))
        .await?;

    let lease = wire
        .udhcpc(10)
        .await?
        .with_context(|| format!("no lease; dnsmasq log:\n{}", wire.dnsmasq_log()))?;
    assert_eq!(
        lease,
        format!(
            "ip=172.31.0.5 subnet=255.255.255.0 router=172.31.0.1 \
             hostname=ip-172-31-0-5 domain={DOMAIN}"
        )
    );

    let server = serve_metadata(wire.host.name(), 80)?;
    let out = netns::command(Some(wire.guest.name()), "curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{METADATA_IP}/latest/meta-data/local-ipv4"))
        .stdin(Stdio::null())
        .output()
        .await?;
    server.abort();
    ensure!(
        out.status.success(),
        "curl from the guest failed ({}): {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello 172.31.0.5");

    // None of it is in the root namespace: the metadata address cannot be bound here.
    let err = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(METADATA_IP), 0))
        .expect_err("169.254.169.254 must exist only inside the host namespace");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrNotAvailable);
    dhcp.stop().await?;
    Ok(())
}

#[tokio::test]
async fn dnsmasq_is_restarted_when_it_dies_and_forgets_removed_hosts() -> anyhow::Result<()> {
    let mac = guestnet::mac_for(GUEST_IP);
    let wire = Wire::new(&mac).await?;
    let mut dhcp = Dhcp::start(&wire.cfg).await?;
    dhcp.set_host(&mac, GUEST_IP, &guestnet::hostname_for(GUEST_IP))
        .await?;
    // Idempotent: the same record again changes nothing.
    dhcp.set_host(&mac, GUEST_IP, &guestnet::hostname_for(GUEST_IP))
        .await?;
    assert_eq!(dhcp.hosts()?, [mac.as_str()]);

    let first = dhcp.pid();
    run_ok(Command::new("kill").args(["-KILL", &first.to_string()]))?;
    restarted(&mut dhcp).await?;
    assert_ne!(dhcp.pid(), first);
    let lease = wire
        .udhcpc(10)
        .await?
        .with_context(|| format!("no lease after restart; log:\n{}", wire.dnsmasq_log()))?;
    assert!(lease.starts_with("ip=172.31.0.5 "), "{lease}");

    // retain_hosts keeps the listed MACs and removes the rest; dnsmasq forgets them (SIGHUP).
    let other = guestnet::mac_for(Ipv4Addr::new(172, 31, 0, 6));
    dhcp.set_host(&other, Ipv4Addr::new(172, 31, 0, 6), "ip-172-31-0-6")
        .await?;
    dhcp.retain_hosts(&HashSet::from([other.to_uppercase()]))
        .await?;
    assert_eq!(dhcp.hosts()?, [other.as_str()]);
    assert_eq!(
        wire.udhcpc(2).await?,
        None,
        "a removed host still got a lease"
    );
    dhcp.remove_host(&other).await?;
    assert!(dhcp.hosts()?.is_empty());
    dhcp.stop().await?;
    Ok(())
}

#[tokio::test]
async fn starting_dhcp_again_stops_the_dnsmasq_left_by_an_earlier_run() -> anyhow::Result<()> {
    let wire = Wire::new(&guestnet::mac_for(GUEST_IP)).await?;
    let earlier = Dhcp::start(&wire.cfg).await?;
    let stale = earlier.pid();
    // The earlier handle is leaked, as when the agent crashed: its dnsmasq keeps running.
    std::mem::forget(earlier);
    let dhcp = Dhcp::start(&wire.cfg).await?;
    assert_ne!(dhcp.pid(), stale);
    ensure!(exited(stale), "the stale dnsmasq (pid {stale}) still runs");
    dhcp.stop().await?;
    Ok(())
}

#[tokio::test]
async fn ensure_bridge_is_idempotent_and_plans_nothing_in_the_root_namespace() -> anyhow::Result<()>
{
    let ns = Netns::new()?;
    let state = tempfile::tempdir()?;
    let cfg = config(ns.name(), state.path())?;
    guestnet::ensure_bridge(&cfg).await?;
    guestnet::ensure_bridge(&cfg).await?;
    let addrs = run_ok(&mut ns.ip(["-o", "addr", "show", "dev", "karri0"]))?;
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains("inet 172.31.0.1/24"), "{addrs}");
    assert!(addrs.contains("inet 169.254.169.254/32"), "{addrs}");
    assert_eq!(addrs.matches("inet ").count(), 2, "{addrs}");
    let link = run_ok(&mut ns.ip(["-o", "link", "show", "dev", "karri0"]))?;
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains(",UP"), "{link}");
    assert!(link.contains("02:00:ac:1f:00:01"), "{link}");
    Ok(())
}

#[tokio::test]
async fn a_domain_on_a_simulated_host_gets_its_tap_on_the_bridge_inside_the_host_namespace(
) -> anyhow::Result<()> {
    let host = tokio::task::spawn_blocking(|| SimHost::start("guestnet")).await??;
    let state = tempfile::tempdir()?;
    let cfg = config(host.netns(), state.path())?;
    guestnet::ensure_bridge(&cfg).await?;

    let suffix = host.netns().trim_start_matches("karri-t-");
    let tap = format!("kt-{suffix}");
    let xml = format!(
        "<domain type='qemu'>
  <name>karri-t-{suffix}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <target dev='{tap}'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
  </devices>
</domain>",
        bridge = cfg.bridge,
        mac = guestnet::mac_for(GUEST_IP),
    );
    let xml_path = state.path().join("domain.xml");
    std::fs::write(&xml_path, xml)?;
    run_ok(&mut host.virsh([std::ffi::OsStr::new("create"), xml_path.as_os_str()]))
        .with_context(|| format!("libvirtd log:\n{}", host.log_tail()))?;

    let ports = run_ok(&mut host.ip(["-o", "link", "show", "master", &cfg.bridge]))?;
    let ports = String::from_utf8_lossy(&ports.stdout);
    assert!(ports.contains(&format!(" {tap}:")), "{ports}");
    let root = run_ok(Command::new("ip").args(["-o", "link", "show"]))?;
    let root = String::from_utf8_lossy(&root.stdout);
    assert!(
        !root.contains(&tap),
        "the tap is in the root namespace:\n{root}"
    );

    tokio::task::spawn_blocking(move || {
        let mut host = host;
        host.stop()
    })
    .await??;
    Ok(())
}

/// A guest namespace whose `eth0` (MAC `mac`) is the far end of a port named `port` on the
/// host's bridge, as libvirt names a guarded guest's tap.
fn plug(host: &Netns, bridge: &str, port: &str, mac: &str) -> anyhow::Result<Netns> {
    let guest = Netns::new()?;
    run_ok(&mut host.ip([
        "link", "add", port, "type", "veth", "peer", "name", "eth0", "address", mac,
    ]))?;
    run_ok(&mut host.ip(["link", "set", port, "master", bridge, "up"]))?;
    run_ok(&mut host.ip(["link", "set", "eth0", "netns", guest.name()]))?;
    run_ok(&mut guest.ip(["link", "set", "eth0", "up"]))?;
    Ok(guest)
}

/// Gives the guest's `eth0` exactly `mac` and `ip`/24, with the bridge as its gateway.
fn take(guest: &Netns, mac: &str, ip: Option<Ipv4Addr>) -> anyhow::Result<()> {
    run_ok(&mut guest.ip(["link", "set", "eth0", "down"]))?;
    run_ok(&mut guest.ip(["link", "set", "eth0", "address", mac]))?;
    run_ok(&mut guest.ip(["link", "set", "eth0", "up"]))?;
    run_ok(&mut guest.ip(["addr", "flush", "dev", "eth0"]))?;
    if let Some(ip) = ip {
        run_ok(&mut guest.ip(["addr", "add", &format!("{ip}/24"), "dev", "eth0"]))?;
        run_ok(&mut guest.ip(["route", "replace", "default", "via", "172.31.0.1"]))?;
    }
    Ok(())
}

/// What the metadata listener answers the guest (`hello <the address it saw>`), or `None` when
/// no answer comes within two seconds.
async fn ask_metadata(guest: &Netns) -> anyhow::Result<Option<String>> {
    let out = netns::command(Some(guest.name()), "curl")
        .args(["-sS", "--max-time", "2"])
        .arg(format!("http://{METADATA_IP}/latest/meta-data/instance-id"))
        .stdin(Stdio::null())
        .output()
        .await?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[tokio::test]
async fn a_guarded_guest_is_answered_only_with_its_own_address_and_mac() -> anyhow::Result<()> {
    const VICTIM_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 7);
    const ATTACKER_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 9);
    let victim_mac = guestnet::mac_for(VICTIM_IP);
    let attacker_mac = guestnet::mac_for(ATTACKER_IP);
    let host = Netns::new()?;
    let state = tempfile::tempdir()?;
    let cfg = config(host.name(), state.path())?;
    guestnet::ensure_bridge(&cfg).await?;
    let guard = PortGuard::install(Some(host.name()), &cfg.bridge).await?;
    // Installing again (an agent restart) keeps what it guards.
    let victim_tap = guard.bind(&victim_mac, VICTIM_IP).await?;
    let guard = PortGuard::install(Some(host.name()), &cfg.bridge).await?;
    let taps = || -> anyhow::Result<String> {
        let out = run_ok(&mut host.exec(["nft", "list", "set", "bridge", guard.table(), "taps"]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(
        taps()?.contains(&victim_tap),
        "installing again dropped the guarded taps: {}",
        taps()?
    );
    let attacker_tap = portguard::tap_for(&attacker_mac)?;
    let victim = plug(&host, &cfg.bridge, &victim_tap, &victim_mac)?;
    let attacker = plug(&host, &cfg.bridge, &attacker_tap, &attacker_mac)?;
    let server = serve_metadata(host.name(), 80)?;
    take(&victim, &victim_mac, Some(VICTIM_IP))?;
    assert_eq!(
        ask_metadata(&victim).await?.as_deref(),
        Some("hello 172.31.0.7")
    );

    // Unguarded, the attacker's port lets it pass for the victim by taking its MAC and address:
    // the spoof below is one the test can see succeed.
    take(&attacker, &victim_mac, Some(VICTIM_IP))?;
    assert_eq!(
        ask_metadata(&attacker).await?.as_deref(),
        Some("hello 172.31.0.7"),
        "an unguarded port must let the spoof through, or this test proves nothing"
    );
    take(&attacker, &attacker_mac, None)?;
    assert_eq!(
        ask_metadata(&victim).await?.as_deref(),
        Some("hello 172.31.0.7")
    );

    // Guarded: DHCP (from 0.0.0.0) and the attacker's own address pass.
    guard.bind(&attacker_mac, ATTACKER_IP).await?;
    let dhcp = Dhcp::start(&cfg).await?;
    dhcp.set_host(&attacker_mac, ATTACKER_IP, "ip-172-31-0-9")
        .await?;
    let lease = netns::command(Some(attacker.name()), "busybox")
        .args([
            "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "10", "-T", "1", "-A", "1",
        ])
        .args(["-s", "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    let lease = tokio::time::timeout(Duration::from_secs(30), lease).await??;
    ensure!(lease.success(), "the guarded guest got no DHCP lease");
    dhcp.stop().await?;
    take(&attacker, &attacker_mac, Some(ATTACKER_IP))?;
    assert_eq!(
        ask_metadata(&attacker).await?.as_deref(),
        Some("hello 172.31.0.9")
    );

    // The victim's address, with the attacker's MAC and then with the victim's: no answer.
    let dropped_before = guard.dropped().await?;
    take(&attacker, &attacker_mac, Some(VICTIM_IP))?;
    // It also claims the address with a gratuitous ARP (checked below).
    attacker
        .exec([
            "busybox",
            "arping",
            "-U",
            "-c",
            "1",
            "-I",
            "eth0",
            &VICTIM_IP.to_string(),
        ])
        .output()?;
    assert_eq!(
        ask_metadata(&attacker).await?,
        None,
        "spoofed address answered"
    );
    take(&attacker, &victim_mac, Some(VICTIM_IP))?;
    assert_eq!(
        ask_metadata(&attacker).await?,
        None,
        "spoofed MAC and address answered"
    );
    // What the guard dropped is counted (for the agent's metrics).
    let dropped = guard.dropped().await?;
    ensure!(
        dropped.packets > dropped_before.packets && dropped.bytes > dropped_before.bytes,
        "the spoofed frames were not counted: {dropped_before:?} then {dropped:?}"
    );
    // Nor did its ARP claims move the victim's address to the attacker's MAC on the host.
    let neigh = run_ok(&mut host.ip(["neigh", "show", &VICTIM_IP.to_string()]))?;
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    ensure!(
        !neigh.contains(&attacker_mac),
        "the host's ARP entry was poisoned: {neigh}"
    );

    // Both are served again as themselves.
    take(&attacker, &attacker_mac, Some(ATTACKER_IP))?;
    assert_eq!(
        ask_metadata(&attacker).await?.as_deref(),
        Some("hello 172.31.0.9")
    );
    assert_eq!(
        ask_metadata(&victim).await?.as_deref(),
        Some("hello 172.31.0.7")
    );

    // A sync keeps the live guests and any bound after its mark, and forgets the rest.
    let mark = guard.mark();
    let late_ip = Ipv4Addr::new(172, 31, 0, 11);
    guard.bind(&guestnet::mac_for(late_ip), late_ip).await?;
    guard.sync(mark, &[(VICTIM_IP, victim_mac.clone())]).await?;
    let set = taps()?;
    ensure!(
        set.contains(&victim_tap),
        "the live guest lost its guard: {set}"
    );
    ensure!(
        set.contains("k0200ac1f000b"),
        "a guest bound after the mark was dropped: {set}"
    );
    ensure!(
        !set.contains(&attacker_tap),
        "a gone guest kept its guard: {set}"
    );
    server.abort();
    Ok(())
}

/// The metadata the service would serve `id` at [`GUEST_IP`].
fn metadata_at_guest_ip(id: &str) -> node_agent::imds::InstanceMetadata {
    node_agent::imds::InstanceMetadata {
        instance_id: id.into(),
        image_id: "emi-0123456789abcdef0".into(),
        instance_type: "t1.micro".into(),
        account_id: "000000000001".into(),
        region: "karri-1".into(),
        availability_zone: "karri-1a".into(),
        local_ipv4: GUEST_IP,
        mac: guestnet::mac_for(GUEST_IP),
        hostname: "ip-172-31-0-5.karri-1.compute.internal".into(),
        reservation_id: "r-0123456789abcdef0".into(),
        launch_index: 0,
        kernel_id: None,
        ramdisk_id: None,
        public_keys: Vec::new(),
        user_data: None,
        launch_time: "2026-11-26T00:00:00Z".into(),
        security_groups: Vec::new(),
        subnet_cidr: "172.31.0.0/24".into(),
        http_tokens_required: false,
        http_endpoint_enabled: true,
        hop_limit: 1,
        tags: None,
    }
}

#[tokio::test]
async fn releasing_a_terminated_instance_keeps_the_bindings_of_the_instance_holding_its_address_now(
) -> anyhow::Result<()> {
    let host = Netns::new()?;
    let state = tempfile::tempdir()?;
    let cfg = config(host.name(), state.path())?;
    guestnet::ensure_bridge(&cfg).await?;
    let ports = PortGuard::install(Some(host.name()), &cfg.bridge).await?;
    let table = ports.table().to_owned();
    let dhcp = Dhcp::start(&cfg).await?;
    let mac = guestnet::mac_for(GUEST_IP);
    // Instance B was given the address that terminated instance A had.
    let tap = ports.bind(&mac, GUEST_IP).await?;
    dhcp.set_host(&mac, GUEST_IP, "ip-172-31-0-5").await?;
    let directory = node_agent::imds::Directory::default();
    directory.set(metadata_at_guest_ip("i-0bbbbbbbbbbbbbbbb"));
    let cache = node_agent::images::ImageCache::open(state.path().join("cache"), 1 << 30)?;
    let guests = node_agent::guest::Guests::new(
        cache,
        state.path().join("instances"),
        state.path().join("console"),
        String::new(),
        Some(node_agent::guest::GuestNetwork {
            bridge: cfg.bridge.clone(),
            dhcp: tokio::sync::Mutex::new(dhcp),
            ports,
            directory: directory.clone(),
            region: "karri-1".into(),
            subnet_cidr: "172.31.0.0/24".into(),
        }),
    );
    let host_file = cfg.hosts_dir().join(&mac);
    let guarded = || -> anyhow::Result<bool> {
        let out = run_ok(&mut host.exec(["nft", "list", "set", "bridge", &table, "taps"]))?;
        Ok(String::from_utf8_lossy(&out.stdout).contains(&tap))
    };
    let served = || {
        directory
            .get(GUEST_IP)
            .map(|p| p.metadata.instance_id.clone())
            .unwrap_or_default()
    };
    ensure!(host_file.exists() && guarded()? && served() == "i-0bbbbbbbbbbbbbbbb");

    // A's record, kept for retention, is released again while B holds the address.
    guests
        .release("i-0aaaaaaaaaaaaaaaa", Some((GUEST_IP, mac.clone())), |ip| {
            ip == GUEST_IP
        })
        .await?;
    assert!(host_file.exists(), "B's DHCP host entry was removed");
    assert!(guarded()?, "B's port guard binding was removed");
    assert_eq!(
        served(),
        "i-0bbbbbbbbbbbbbbbb",
        "B's metadata was withdrawn"
    );

    // Told that no live instance holds the address, A's release removes its DHCP entry and
    // binding, but never the metadata of another instance.
    guests
        .release("i-0aaaaaaaaaaaaaaaa", Some((GUEST_IP, mac.clone())), |_| {
            false
        })
        .await?;
    assert!(!host_file.exists() && !guarded()?);
    assert_eq!(
        served(),
        "i-0bbbbbbbbbbbbbbbb",
        "A's release withdrew B's metadata"
    );
    guests
        .release("i-0bbbbbbbbbbbbbbbb", Some((GUEST_IP, mac)), |_| false)
        .await?;
    assert_eq!(served(), "");
    Ok(())
}
