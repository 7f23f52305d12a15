//! The agent's libvirt connection against a real libvirtd (a simulated host, DESIGN §5): a
//! libvirtd that stops answering fails the calls waiting on it instead of hanging them, and
//! the connection comes back by itself once libvirtd answers again.

use std::time::Duration;

use anyhow::{ensure, Context as _};
use karri_testkit::SimHost;
use node_agent::hypervisor::{Hypervisor as _, KeepAlive, LibvirtHypervisor};

/// Far beyond the keepalive's give-up time (about 3 s below): reaching it means the call hung.
const HUNG: Duration = Duration::from_secs(60);

/// Sends `signal` to the simulated host's libvirtd.
fn signal_libvirtd(host: &SimHost, signal: &str) -> anyhow::Result<()> {
    let pid_file = host.dir().join("libvirtd.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?;
    let status = std::process::Command::new("kill")
        .args([signal, pid.trim()])
        .status()?;
    ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

/// Resumes a stopped libvirtd when dropped, so that a failing test leaves a host that stops.
struct Resume<'a>(&'a SimHost);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        let _ = signal_libvirtd(self.0, "-CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirtd_that_stops_answering_fails_the_call_instead_of_hanging_it() -> anyhow::Result<()>
{
    let host = tokio::task::spawn_blocking(|| SimHost::start("keepalive")).await??;
    let keepalive = KeepAlive {
        interval: Duration::from_secs(1),
        count: 2,
    };
    let hv = LibvirtHypervisor::connect_with(host.uri(), "node-keepalive", keepalive).await?;
    ensure!(hv.list_ours().await?.is_empty());

    signal_libvirtd(&host, "-STOP")?;
    let resume = Resume(&host);
    let call = tokio::time::timeout(HUNG, hv.list_ours())
        .await
        .context("a call to a libvirtd that stopped answering hung")?;
    ensure!(
        call.is_err(),
        "a call to a stopped libvirtd succeeded: {call:?}"
    );
    drop(resume);

    // The next call opens the connection again.
    let again = tokio::time::timeout(HUNG, hv.list_ours())
        .await
        .context("the call after libvirtd resumed hung")?;
    ensure!(
        again.is_ok(),
        "the connection did not come back after libvirtd resumed: {again:?}\n{}",
        host.log_tail()
    );
    Ok(())
}
