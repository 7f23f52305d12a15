//! S3 compatibility with the real clients: `e2e/python/s3_compat.py`, run with the workspace
//! virtualenv's Python, drives the gateway's S3 REST API with boto3 (in process), the awscli and
//! s3cmd (subprocesses) and curl (presigned URLs, anonymous requests): buckets, objects, ranges,
//! conditional requests, metadata, copies, listings v1/v2 and versions, multipart uploads,
//! presigned URLs, canned ACLs with anonymous access, tagging, the error codes, path-style and
//! virtual-hosted addressing, the Eucalyptus prefix `/services/objectstorage`, and the isolation
//! of two accounts. Each check prints `ok <group>.<check>` or `FAIL <group>.<check>: <reason>`.
//!
//! The gateway runs on a real etcd with two accounts, each with an access key; the script gets
//! `Gateway::aws_env` of account A plus account B's key (`KARRI_S3_B_*`), and nothing of this
//! machine's AWS settings.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use karri_testkit::{workspace_root, AwsCredentials, Etcd, Gateway, Tokens};
use tokio::process::Command;
use tokio::time::Instant;

/// How long the whole script may take (nextest ends a test after 5 minutes).
const DEADLINE: Duration = Duration::from_secs(240);
/// The S3 domain of the virtual-hosted checks: bucket `b` at `b.s3.localhost:<port>`. The
/// gateway serves `localhost` as well, but OpenSSL (Python, curl, s3cmd) never matches a
/// wildcard of one label such as `*.localhost`, so TLS to `b.localhost` cannot verify.
const S3_DOMAIN: &str = "s3.localhost";
/// Fewer checks than this means groups of the script did not run.
const MIN_CHECKS: usize = 267;

/// `passed: P, failed: F, skipped: S (...)`, the script's last line: `(P, F, S)`.
fn summary(stdout: &str) -> Option<(usize, usize, usize)> {
    let line = stdout.lines().rev().find(|l| l.starts_with("passed: "))?;
    let mut counts = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let mut next = || counts.next()?.parse().ok();
    Some((next()?, next()?, next()?))
}

/// The environment of the script: `PATH`, `HOME`, account A's `aws_env`, account B's key and
/// the S3 domain.
fn script_env(gateway: &Gateway, a: &AwsCredentials, b: &AwsCredentials) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["PATH", "HOME"]
        .into_iter()
        .filter_map(|k| Some((k.to_owned(), std::env::var(k).ok()?)))
        .collect();
    env.extend(gateway.aws_env(a));
    env.extend([
        (
            "KARRI_S3_B_ACCESS_KEY_ID".to_owned(),
            b.access_key_id.clone(),
        ),
        (
            "KARRI_S3_B_SECRET_ACCESS_KEY".to_owned(),
            b.secret_access_key.clone(),
        ),
        ("KARRI_S3_DOMAIN".to_owned(), S3_DOMAIN.to_owned()),
    ]);
    env
}

/// Runs `python script` with `env`, its output into `log`, within [`DEADLINE`]: the exit
/// status and the output (what it printed so far when it had to be killed).
async fn run_script(
    python: &Path,
    script: &Path,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<(Option<std::process::ExitStatus>, String)> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(python)
        .arg("-u")
        .arg(script)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", script.display()))?;
    let status = match tokio::time::timeout(DEADLINE, child.wait()).await {
        Ok(status) => Some(status?),
        Err(_) => {
            child.kill().await?;
            None
        }
    };
    let output =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    Ok((status, output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_s3_clients_work_against_karri_and_keep_accounts_apart() -> anyhow::Result<()> {
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    let script = root.join("e2e/python/s3_compat.py");
    for tool in [
        &python,
        &root.join(".venv/bin/aws"),
        &root.join(".venv/bin/s3cmd"),
    ] {
        ensure!(
            tool.exists(),
            "{} is missing; run `make setup`",
            tool.display()
        );
    }
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let (a_id, a) = gateway.account_with_key(&tokens.admin, "alpha").await?;
    let (b_id, b) = gateway.account_with_key(&tokens.admin, "bravo").await?;
    ensure!(a_id != b_id, "two accounts share the ID {a_id}");

    let dir = tempfile::tempdir()?;
    let log = dir.path().join("s3_compat.log");
    let started = Instant::now();
    let (status, output) =
        run_script(&python, &script, &script_env(&gateway, &a, &b), &log).await?;
    eprintln!(
        "{} ({:.1} s):\n{output}",
        script.display(),
        started.elapsed().as_secs_f64()
    );
    let failures: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("FAIL ") || l.starts_with("skip "))
        .collect();
    let Some(status) = status else {
        bail!(
            "{} did not finish within {DEADLINE:?}; it printed:\n{output}\ngateway log:\n{}",
            script.display(),
            gateway.log_tail()
        );
    };
    if !status.success() {
        bail!(
            "{} failed ({status}), {} checks failed or were skipped:\n{}\n\nwhole output:\n\
             {output}\ngateway log:\n{}",
            script.display(),
            failures.len(),
            failures.join("\n"),
            gateway.log_tail()
        );
    }
    // A script that stopped early without failing must not pass: it ends with its counts.
    let (passed, failed, skipped) = summary(&output)
        .with_context(|| format!("the script printed no summary line:\n{output}"))?;
    let ok_lines = output.lines().filter(|l| l.starts_with("ok ")).count();
    ensure!(
        failed == 0 && skipped == 0 && failures.is_empty(),
        "the script exited 0 with {failed} failed and {skipped} skipped checks:\n{output}"
    );
    ensure!(
        passed == ok_lines && passed >= MIN_CHECKS,
        "the script passed {passed} checks with {ok_lines} ok lines (at least {MIN_CHECKS} \
         expected):\n{output}"
    );
    Ok(())
}

#[test]
fn the_summary_line_gives_passed_failed_and_skipped_counts() {
    let out = "ok a.b\nFAIL a.c: no\npassed: 231, failed: 1, skipped: 4 (52.3 s)\n";
    assert_eq!(summary(out), Some((231, 1, 4)));
    assert_eq!(summary("ok a.b\n"), None);
    assert_eq!(summary("passed: 3\n"), None);
}
