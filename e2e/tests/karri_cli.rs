//! The `karri` admin command against a real gateway on a real etcd: it creates accounts and
//! access keys, prints the secret once, and the printed credentials work with the real awscli.

use std::process::Output;

use anyhow::{bail, ensure, Context};
use karri_testkit::{bin_dir, workspace_root, AwsCredentials, Etcd, Gateway, Tokens};

fn karri(kubeconfig: &std::path::Path, args: &[&str]) -> anyhow::Result<Output> {
    let bin = bin_dir().join("karri");
    ensure!(
        bin.is_file(),
        "{} missing: run `cargo build --workspace --bins`",
        bin.display()
    );
    std::process::Command::new(&bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .with_context(|| format!("running karri {args:?}"))
}

fn ok(out: Output) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "karri failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn export(text: &str, name: &str) -> anyhow::Result<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}=")))
        .map(str::to_string)
        .with_context(|| format!("no {name} in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_makes_accounts_and_keys_that_awscli_can_use() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let admin = gateway.kubeconfig(&tokens.admin, "default")?;

    let made = ok(karri(&admin, &["account", "create", "research"])?)?;
    let id = made
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .context("no account id printed")?
        .to_string();
    ensure!(crds::is_valid_account_id(&id), "printed {made:?}");
    ensure!(made.contains("namespace research"), "printed {made:?}");
    // A second create is refused; --if-missing accepts the existing account.
    let twice = karri(&admin, &["account", "create", "research"])?;
    let said = String::from_utf8_lossy(&twice.stderr);
    ensure!(
        !twice.status.success() && said.contains("already exists"),
        "a second create of the account: {}: {said}",
        twice.status
    );
    let again = ok(karri(
        &admin,
        &["account", "create", "research", "--if-missing"],
    )?)?;
    ensure!(again.contains(&id), "{again:?}");

    let printed = ok(karri(
        &admin,
        &["access-key", "create", "--account", "research", "--env"],
    )?)?;
    let creds = AwsCredentials {
        access_key_id: export(&printed, "AWS_ACCESS_KEY_ID")?,
        secret_access_key: export(&printed, "AWS_SECRET_ACCESS_KEY")?,
    };
    // The listing shows the key but never its secret.
    let listed = ok(karri(&admin, &["access-key", "list"])?)?;
    ensure!(listed.contains(&creds.access_key_id), "{listed:?}");
    ensure!(
        !listed.contains(&creds.secret_access_key),
        "the secret is listed"
    );
    // No key for an account that does not exist.
    let missing = karri(&admin, &["access-key", "create", "--account", "nope"])?;
    ensure!(!missing.status.success());
    ensure!(String::from_utf8_lossy(&missing.stderr).contains("no account nope"));

    // The printed credentials sign requests awscli makes, as that account.
    let answer = gateway.aws(&creds, &["ec2", "describe-vpcs"]).await?;
    ensure!(
        answer["Vpcs"][0]["OwnerId"] == id.as_str(),
        "the VPC is not shown as the account's: {answer}"
    );

    // A later account of the same name is another tenant: the old key does not sign for it.
    let kubectl = karri_testkit::kubectl(&admin, &["delete", "account", "research"]);
    ensure!(kubectl.status.success(), "{kubectl:?}");
    ok(karri(&admin, &["account", "create", "research"])?)?;
    let out = tokio::process::Command::new(workspace_root().join(".venv/bin/aws"))
        .args(["ec2", "describe-vpcs", "--output", "json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", gateway.dir())
        .envs(gateway.aws_env(&creds))
        .output()
        .await?;
    ensure!(!out.status.success(), "the old key still signs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("AuthFailure"), "{stderr}");
    Ok(())
}
