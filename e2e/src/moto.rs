//! moto's server (the peer the EC2 and S3 benchmarks measure Karri against) as a child
//! process on a loopback port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use karri_testkit::{free_ports, log_tail, workspace_root};

/// How long moto gets to answer its first request.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// moto's server as a child process on a loopback port; killed and reaped when dropped.
pub struct Moto {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts `.venv/bin/moto_server` and waits until it answers.
    pub async fn start() -> anyhow::Result<Moto> {
        let bin = workspace_root().join(".venv/bin/moto_server");
        if !bin.is_file() {
            bail!(
                "{} not found: run `make setup` (it installs moto[server] into .venv)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("karri-moto-").tempdir()?;
        let log = dir.path().join("moto.log");
        let port = free_ports(1)?[0];
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut moto = Moto {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        // Any HTTP answer means the server is up.
        let probe = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let started = Instant::now();
        loop {
            if let Some(c) = moto.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "moto_server exited with {status}; log:\n{}",
                        log_tail(&moto.log, 40)
                    );
                }
            }
            if probe.get(format!("{}/", moto.url)).send().await.is_ok() {
                return Ok(moto);
            }
            if started.elapsed() > READY_DEADLINE {
                bail!(
                    "moto_server did not answer at {} within {READY_DEADLINE:?}; log:\n{}",
                    moto.url,
                    log_tail(&moto.log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
