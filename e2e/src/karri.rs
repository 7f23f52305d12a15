//! The `karri` admin command as tests run it: `karri image register --bucket` uploads an image
//! into the gateway's S3 as an account (the AWS environment `make up` writes into karri.env)
//! and registers it with an admin kubeconfig.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use karri_testkit::{bin_dir, AwsCredentials, Gateway};

/// How long one `karri` run may take (an upload of the micro image over loopback takes a
/// second or two).
const KARRI_TIMEOUT: Duration = Duration::from_secs(120);

/// What `karri image register` printed.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The image ID, its last line on stdout.
    pub id: String,
    /// What it said on stderr (where it uploaded, what it registered).
    pub stderr: String,
}

/// Runs `karri --kubeconfig <kubeconfig> image register <args>` with the AWS environment of
/// `creds` at `gateway` (its S3 face): it must succeed. Nothing of this machine's environment
/// but `PATH` reaches it.
pub async fn image_register(
    gateway: &Gateway,
    creds: &AwsCredentials,
    kubeconfig: &Path,
    args: &[&str],
) -> anyhow::Result<Registered> {
    let bin = bin_dir().join("karri");
    ensure!(
        bin.is_file(),
        "{} missing: run `cargo build --workspace --bins`",
        bin.display()
    );
    let run = tokio::process::Command::new(&bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["image", "register"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", gateway.dir())
        .envs(gateway.aws_env(creds))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(KARRI_TIMEOUT, run)
        .await
        .with_context(|| format!("karri image register {args:?} ran over {KARRI_TIMEOUT:?}"))?
        .with_context(|| format!("running karri image register {args:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        out.status.success(),
        "karri image register {args:?} failed ({}):\n{stderr}{stdout}",
        out.status
    );
    let id = stdout
        .lines()
        .last()
        .map(str::to_owned)
        .with_context(|| format!("karri image register printed no ID:\n{stderr}"))?;
    Ok(Registered { id, stderr })
}
