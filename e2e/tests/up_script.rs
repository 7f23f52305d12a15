//! `scripts/up.sh`, the README's first command, on libvirt's test driver (`HYPERVISOR=test`):
//! it brings up etcd, the gateway, the operator and a node agent, registers the micro image,
//! and only then writes `STATE_DIR/karri.env`, after which `. karri.env` is all kubectl and
//! awscli need. A second `up` reuses the state, and `scripts/down.sh` stops everything.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use karri_testkit::{bin_dir, free_ports, workspace_root};

/// The micro image's well-known EMI, which `up` registers.
const MICRO_EMI: &str = "emi-0123456789abcdef0";

/// One `up` state directory and its ports; `down.sh` runs when it is dropped.
struct Up {
    state: tempfile::TempDir,
    ports: Vec<u16>,
}

impl Up {
    fn new() -> anyhow::Result<Self> {
        let state = tempfile::tempdir()?;
        // The micro image is built once for all tests; `up` finds it up to date here.
        let micro = karri_e2e::guests::micro_image()?;
        let built = micro
            .disk
            .path
            .parent()
            .context("the micro image has a directory")?
            .to_path_buf();
        let dir = state.path().join("micro-image");
        std::fs::create_dir_all(&dir)?;
        for name in ["vmlinuz", "initrd.img", "disk.img", "manifest", "packages"] {
            std::fs::copy(built.join(name), dir.join(name))
                .with_context(|| format!("copying the micro image's {name}"))?;
        }
        Ok(Up {
            state,
            ports: free_ports(6)?,
        })
    }

    fn dir(&self) -> &Path {
        self.state.path()
    }

    /// Runs `scripts/<script>` with this state directory, its ports and a plain environment.
    fn script(&self, script: &str) -> anyhow::Result<Output> {
        let p = &self.ports;
        let out = Command::new("bash")
            .arg(workspace_root().join("scripts").join(script))
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", self.dir())
            .env("STATE_DIR", self.dir())
            .env("HYPERVISOR", "test")
            .env("KARRI_DETACH", "1")
            .env("KARRI_BIN_DIR", bin_dir())
            .env("KARRI_ETCD_PORT", p[0].to_string())
            .env("KARRI_ETCD_PEER_PORT", p[1].to_string())
            .env("KARRI_API_PORT", p[2].to_string())
            .env("KARRI_AWS_PORT", p[3].to_string())
            .env("KARRI_OPERATOR_METRICS_PORT", p[4].to_string())
            .env("KARRI_AGENT_METRICS_PORT", p[5].to_string())
            .output()
            .with_context(|| format!("running scripts/{script}"))?;
        Ok(out)
    }

    /// A first `up` in a new state directory. Its ports are picked free, but another process
    /// may take one before `up` binds it: `up` then says so, and it is tried again on others.
    fn start() -> anyhow::Result<(Self, String)> {
        for _ in 0..3 {
            // A new state directory each time: etcd's data must not remember other ports.
            let up = Up::new()?;
            let out = up.script("up.sh")?;
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                return Ok((up, said));
            }
            ensure!(
                said.contains("is taken by another process"),
                "up.sh failed ({}):\n{said}\n{}",
                out.status,
                up.logs()
            );
        }
        bail!("three runs of up.sh each lost a port to another process")
    }

    /// Runs `up.sh`, which must succeed: its output.
    fn up(&self) -> anyhow::Result<String> {
        let out = self.script("up.sh")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "up.sh failed ({}):\n{stdout}\n{stderr}\n{}",
                out.status,
                self.logs()
            );
        }
        Ok(format!("{stdout}{stderr}"))
    }

    /// Runs `command` in bash after `. $STATE_DIR/karri.env`, with nothing else in the
    /// environment but a PATH without the project's venv: what a user's shell has.
    fn with_env(&self, command: &str) -> anyhow::Result<String> {
        let env = self.dir().join("karri.env");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(". {} && {command}", env.display()))
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.dir())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "`{command}` after . karri.env failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    fn logs(&self) -> String {
        ["etcd", "api-gateway", "operator", "node-agent"]
            .iter()
            .map(|name| {
                let log = self.dir().join("logs").join(format!("{name}.log"));
                format!("--- {name}\n{}", karri_testkit::log_tail(&log, 15))
            })
            .collect()
    }

    /// The processes named by the pid files.
    fn pids(&self) -> anyhow::Result<Vec<(PathBuf, i32)>> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(self.dir().join("pids"))? {
            let path = entry?.path();
            let pid = std::fs::read_to_string(&path)?.trim().parse()?;
            pids.push((path, pid));
        }
        Ok(pids)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.script("down.sh");
    }
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

#[test]
fn up_brings_up_a_cloud_that_kubectl_and_awscli_use_from_karri_env_and_a_second_up_reuses_it(
) -> anyhow::Result<()> {
    let (up, first) = Up::start()?;
    ensure!(first.contains("Karri is up."), "up said:\n{first}");

    // karri.env holds the admin secret: only its owner may read it.
    let env = up.dir().join("karri.env");
    let mode = std::fs::metadata(&env)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "karri.env has mode {mode:o}");
    let text = std::fs::read_to_string(&env)?;
    ensure!(
        text.starts_with("export KUBECONFIG="),
        "karri.env starts with:\n{text}"
    );
    // The test driver lives inside the agent: no libvirt URI for virsh.
    ensure!(
        !text.contains("LIBVIRT_DEFAULT_URI"),
        "karri.env names a libvirt URI no virsh reaches:\n{text}"
    );

    // kubectl and awscli work with nothing but karri.env.
    let nodes = up.with_env("kubectl get nodes.karri.dev -o name")?;
    ensure!(nodes.trim() == "node.karri.dev/node-1", "kubectl: {nodes}");
    up.with_env("kubectl get instances -A")?;
    let images = up.with_env(
        "aws ec2 describe-images --image-ids \"$KARRI_MICRO_EMI\" \
         --query 'Images[].[ImageId,ImageType,Public]' --output text",
    )?;
    ensure!(
        images.split_whitespace().collect::<Vec<_>>() == [MICRO_EMI, "machine", "True"],
        "describe-images: {images}"
    );

    // The micro image launches: the operator places it on node-1, whose agent runs it.
    let id = up.with_env(
        "aws ec2 run-instances --image-id \"$KARRI_MICRO_EMI\" --instance-type t1.micro \
         --query 'Instances[0].InstanceId' --output text",
    )?;
    let id = id.trim().to_owned();
    let running = until_state(&up, &id, "running")?;
    ensure!(
        running.split_whitespace().nth(1) == Some("karri-1a"),
        "{id}: {running}"
    );
    // The admin's kubeconfig is in the admin account's namespace: its EC2 instances are there.
    let listed = up.with_env("kubectl get instances -o name")?;
    ensure!(
        listed
            .lines()
            .any(|l| l.trim() == format!("instance.karri.dev/{id}")),
        "kubectl get instances (the kubeconfig's namespace) lacks {id}: {listed}"
    );

    // A second up reuses the state: the same etcd, access key and images, the instance kept.
    let second = up.up()?;
    for reused in [
        "etcd already running",
        "restarting api-gateway",
        "micro image: emi-",
    ] {
        ensure!(
            second.contains(reused),
            "the second up lacks {reused:?}:\n{second}"
        );
    }
    for redone in [
        "generating",
        "creating the admin account's access key",
        "registered ",
    ] {
        ensure!(
            !second.contains(redone),
            "the second up did {redone:?} again:\n{second}"
        );
    }
    until_state(&up, &id, "running")?;

    // down stops every process and removes karri.env; the state stays.
    let pids = up.pids()?;
    ensure!(pids.len() == 4, "pid files: {pids:?}");
    let down = up.script("down.sh")?;
    ensure!(
        down.status.success(),
        "down.sh: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    for (file, pid) in &pids {
        ensure!(!alive(*pid), "{} (pid {pid}) still runs", file.display());
        ensure!(!file.exists(), "{} is left", file.display());
    }
    ensure!(!env.exists(), "karri.env is left after down");
    ensure!(up.dir().join("etcd").is_dir(), "down removed the etcd data");

    // Without its pid files, down still finds and stops this state dir's processes.
    up.up()?;
    let pids = up.pids()?;
    ensure!(pids.len() == 4, "pid files: {pids:?}");
    std::fs::remove_dir_all(up.dir().join("pids"))?;
    let down = up.script("down.sh")?;
    let said = String::from_utf8_lossy(&down.stdout).into_owned();
    ensure!(
        down.status.success() && said.contains("no pid files"),
        "down.sh without pid files: {said}{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for (file, pid) in &pids {
        ensure!(
            !alive(*pid),
            "{} (pid {pid}) still runs after down without pid files",
            file.display()
        );
    }
    Ok(())
}

/// Polls DescribeInstances (as the user would, through karri.env) until `id` is in `state`:
/// its availability zone and private address, as text.
fn until_state(up: &Up, id: &str, state: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let shown = up.with_env(&format!(
            "aws ec2 describe-instances --instance-ids {id} --query \
             'Reservations[0].Instances[0].[State.Name,Placement.AvailabilityZone]' --output text"
        ))?;
        if shown.split_whitespace().next() == Some(state) {
            return Ok(shown);
        }
        ensure!(
            Instant::now() < deadline,
            "{id} is not {state} after 90 s: {shown}\n{}",
            up.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
