//! Test support for Karri: starts REAL processes (etcd, the api-gateway binary, kubectl) for
//! integration and end-to-end tests.
//!
//! Everything listens on loopback only, on ports picked at run time, with state in temporary
//! directories that disappear when the handle is dropped. Child processes are killed (SIGKILL)
//! and reaped when their handle is dropped.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use karri_testkit::{kubectl_ok, write_kubeconfig, Etcd, Gateway, Tokens};
//! let etcd = Etcd::start().await?;
//! let tokens = Tokens::generate(&["node-1"], &["team-a"]);
//! let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
//! let dir = tempfile::tempdir()?;
//! let kubeconfig = write_kubeconfig(dir.path(), &gateway.url(), &tokens.admin, "default")?;
//! let out = kubectl_ok(&kubeconfig, &["get", "instances", "-A"])?;
//! # let _ = out; Ok(())
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tempfile::TempDir;

pub mod simhost;
pub use simhost::SimHost;

/// How often readiness endpoints are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a child process gets to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How many lines of a child's log go into error messages.
const LOG_TAIL_LINES: usize = 40;
/// How often `start` retries with fresh ports when another process grabbed a port first.
const PORT_RETRIES: usize = 3;

/// A real etcd server running as a child process on loopback ports, with its data in a
/// temporary directory.
///
/// The binary is `$KARRI_ETCD_BIN` if set, else `/usr/bin/etcd` if it exists, else `etcd` from
/// `PATH`. Dropping the handle kills the process and removes the data directory.
#[derive(Debug)]
pub struct Etcd {
    /// Client URL, e.g. `http://127.0.0.1:41234`.
    pub endpoint: String,
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
    child: Option<Child>,
    bin: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    // Removed when the handle is dropped (after Drop::drop killed the process).
    dir: TempDir,
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data directory and waits until
    /// `GET /health` reports `"health":"true"` (deadline 30 s).
    pub async fn start() -> anyhow::Result<Etcd> {
        let bin = etcd_bin();
        let dir = tempfile::Builder::new()
            .prefix("karri-etcd-")
            .tempdir()
            .context("creating etcd temp dir")?;
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("etcd.log");
        let mut last_err = anyhow::anyhow!("etcd did not start");
        for _ in 0..PORT_RETRIES {
            let ports = free_ports(2)?;
            let _ = std::fs::remove_file(&log_path);
            let mut child = None;
            match spawn_etcd(&bin, &data_dir, ports[0], ports[1], &log_path, &mut child).await {
                Ok(()) => {
                    return Ok(Etcd {
                        endpoint: format!("http://127.0.0.1:{}", ports[0]),
                        port: ports[0],
                        peer_port: ports[1],
                        child,
                        bin,
                        data_dir,
                        log_path,
                        dir,
                    })
                }
                Err(e) => {
                    kill_and_reap(&mut child);
                    last_err = e;
                    if !log_says_port_taken(&log_path) {
                        break;
                    }
                    // Another process grabbed a port between probing and binding: retry with
                    // fresh ports and a fresh data dir (a member dir remembers its peer URL).
                    let _ = std::fs::remove_dir_all(&data_dir);
                }
            }
        }
        Err(last_err)
    }

    /// Kills the etcd process (SIGKILL) and waits for it. The data directory is kept, so
    /// [`Etcd::restart`] brings back the same data. Calling it twice is harmless.
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Stops etcd if it runs and starts it again on the same ports with the same data
    /// directory, then waits for health.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        spawn_etcd(
            &self.bin,
            &self.data_dir,
            self.port,
            self.peer_port,
            &self.log_path,
            &mut self.child,
        )
        .await
    }

    /// The etcd process's ID while it runs (to pause it with SIGSTOP, as a stalled disk or a
    /// partition would leave it: connected, silent).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temporary directory holding the data directory and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The etcd data directory (inside the temp dir).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file that receives etcd's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last lines of etcd's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, LOG_TAIL_LINES)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// The real `api-gateway` binary running as a child process on a loopback port.
///
/// The binary is `$KARRI_BIN_DIR/api-gateway`, by default `<workspace>/target/debug/api-gateway`
/// (build it with `cargo build --workspace --bins`). Dropping the handle kills the process.
#[derive(Debug)]
pub struct Gateway {
    /// Port on 127.0.0.1 the gateway listens on.
    pub port: u16,
    /// The etcd endpoint(s) passed to `--etcd-endpoints`.
    pub etcd_endpoint: String,
    child: Option<Child>,
    bin: PathBuf,
    tokens_path: PathBuf,
    log_path: PathBuf,
    extra_args: Vec<String>,
    // Removed when the handle is dropped (after Drop::drop killed the process).
    dir: TempDir,
}

impl Gateway {
    /// Writes `tokens` to a tokens file, starts the gateway on a free loopback port against
    /// `etcd_endpoint` and waits until `GET /readyz` answers 200 (deadline 30 s).
    pub async fn start(etcd_endpoint: &str, tokens: &Tokens) -> anyhow::Result<Gateway> {
        Self::start_with_args(etcd_endpoint, tokens, &[]).await
    }

    /// [`Gateway::start`] with extra command-line flags (kept across [`Gateway::restart`]).
    pub async fn start_with_args(
        etcd_endpoint: &str,
        tokens: &Tokens,
        extra_args: &[&str],
    ) -> anyhow::Result<Gateway> {
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        let bin = bin_dir().join("api-gateway");
        if !bin.is_file() {
            bail!(
                "{} not found: run `cargo build --workspace --bins` first \
                 (or point KARRI_BIN_DIR at a directory containing api-gateway)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("karri-gateway-")
            .tempdir()
            .context("creating gateway temp dir")?;
        let tokens_path = dir.path().join("tokens.yaml");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // Readable by its owner alone, as the gateway wants a file of credentials.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tokens_path)
                .and_then(|mut f| f.write_all(tokens.to_yaml().as_bytes()))
                .with_context(|| format!("writing {}", tokens_path.display()))?;
        }
        let log_path = dir.path().join("api-gateway.log");
        let mut last_err = anyhow::anyhow!("api-gateway did not start");
        for _ in 0..PORT_RETRIES {
            let port = free_ports(1)?[0];
            let _ = std::fs::remove_file(&log_path);
            let mut child = None;
            let spawned = spawn_gateway(
                &bin,
                port,
                etcd_endpoint,
                &tokens_path,
                &log_path,
                &extra_args,
                &mut child,
            )
            .await;
            match spawned {
                Ok(()) => {
                    return Ok(Gateway {
                        port,
                        etcd_endpoint: etcd_endpoint.to_string(),
                        child,
                        bin,
                        tokens_path,
                        log_path,
                        extra_args,
                        dir,
                    })
                }
                Err(e) => {
                    kill_and_reap(&mut child);
                    last_err = e;
                    if !log_says_port_taken(&log_path) {
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    /// Base URL, e.g. `https://127.0.0.1:41235`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate that signed the gateway's serving certificate.
    pub fn ca_path(&self) -> PathBuf {
        pki_dir(&self.tokens_path).join("ca.crt")
    }

    /// A kubeconfig for this gateway with `token`, default namespace `namespace`.
    pub fn kubeconfig(&self, token: &str, namespace: &str) -> anyhow::Result<PathBuf> {
        write_kubeconfig(
            self.dir(),
            &self.url(),
            Some(&self.ca_path()),
            token,
            namespace,
        )
    }

    /// An HTTP client that trusts the gateway's CA.
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        http_client(Some(&self.ca_path()))
    }

    /// Creates account `name` (admin token) and returns its 12-digit account ID; the account's
    /// namespace is `name`.
    pub async fn create_account(&self, admin_token: &str, name: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1", "kind": "Account",
            "metadata": {"name": name}, "spec": {}
        });
        let made = self
            .post_json(admin_token, "/apis/karri.dev/v1alpha1/accounts", &body)
            .await?;
        made.pointer("/status/accountId")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .context("the created account has no status.accountId")
    }

    /// Creates an access key for `account` (admin token): `(access key ID, secret)`.
    pub async fn create_access_key(
        &self,
        admin_token: &str,
        account: &str,
    ) -> anyhow::Result<AwsCredentials> {
        let body = serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1", "kind": "AccessKey",
            "metadata": {"generateName": format!("{account}-")},
            "spec": {"accountName": account, "userName": "test"}
        });
        let made = self
            .post_json(admin_token, "/apis/karri.dev/v1alpha1/accesskeys", &body)
            .await?;
        let field = |p: &str| {
            made.pointer(p)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("the created access key has no {p}"))
        };
        Ok(AwsCredentials {
            access_key_id: field("/status/accessKeyId")?,
            secret_access_key: field("/status/secretAccessKey")?,
        })
    }

    /// An account with an access key: `(account ID, credentials)`.
    pub async fn account_with_key(
        &self,
        admin_token: &str,
        name: &str,
    ) -> anyhow::Result<(String, AwsCredentials)> {
        let id = self.create_account(admin_token, name).await?;
        let key = self.create_access_key(admin_token, name).await?;
        Ok((id, key))
    }

    async fn post_json(
        &self,
        token: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = self
            .client()?
            .post(format!("{}{path}", self.url()))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Registers node `name` in `zone` as a Ready host offering `vcpus` vCPUs and `memory_mib`
    /// MiB (admin token), its record as an agent and the operator would leave it. For tests and
    /// benchmarks that run the gateway alone: EC2 launches need a node with room, and with no
    /// operator running nothing is ever placed on it.
    pub async fn register_ready_node(
        &self,
        admin_token: &str,
        name: &str,
        zone: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> anyhow::Result<()> {
        let path = "/apis/karri.dev/v1alpha1/nodes";
        let body = serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1", "kind": "Node",
            "metadata": {"name": name}, "spec": {"availabilityZone": zone}
        });
        self.post_json(admin_token, path, &body).await?;
        let resources = serde_json::json!({"vcpus": vcpus, "memoryMiB": memory_mib, "diskGiB": 0});
        let status = serde_json::json!({"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentHeartbeat",
                            "message": "registered by a test", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }});
        let status_path = format!("{path}/{name}/status");
        let resp = self
            .client()?
            .patch(format!("{}{status_path}", self.url()))
            .bearer_auth(admin_token)
            .header("content-type", "application/merge-patch+json")
            .body(status.to_string())
            .send()
            .await
            .with_context(|| format!("PATCH {status_path}"))?;
        let code = resp.status();
        ensure!(
            code.is_success(),
            "PATCH {status_path}: {code}: {}",
            resp.text().await.unwrap_or_default()
        );
        // A list waits for the gateway's watch cache to reach etcd's revision, so the launches
        // that follow (which read the cache) see the node.
        let listed = self
            .client()?
            .get(format!("{}{path}", self.url()))
            .bearer_auth(admin_token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        ensure!(
            listed.status().is_success(),
            "GET {path}: {}",
            listed.status()
        );
        Ok(())
    }

    /// Environment for awscli/boto3 against this gateway's EC2 endpoint (region `karri-1`),
    /// signed with `creds`: `AWS_ENDPOINT_URL`, the keys, `AWS_DEFAULT_REGION`, `AWS_CA_BUNDLE`,
    /// and settings that keep the clients from reading this machine's AWS configuration.
    pub fn aws_env(&self, creds: &AwsCredentials) -> Vec<(String, String)> {
        let dir = self.dir().display().to_string();
        vec![
            ("AWS_ENDPOINT_URL".into(), self.url()),
            ("AWS_ACCESS_KEY_ID".into(), creds.access_key_id.clone()),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                creds.secret_access_key.clone(),
            ),
            ("AWS_DEFAULT_REGION".into(), "karri-1".into()),
            ("AWS_CA_BUNDLE".into(), self.ca_path().display().to_string()),
            ("AWS_CONFIG_FILE".into(), format!("{dir}/aws-config")),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                format!("{dir}/aws-credentials"),
            ),
            ("AWS_PAGER".into(), String::new()),
            ("AWS_MAX_ATTEMPTS".into(), "1".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// `aws <args> --output json` (the project venv's awscli) as the account of `creds`, which
    /// must succeed: its JSON answer (`Null` when it prints nothing).
    pub async fn aws(
        &self,
        creds: &AwsCredentials,
        args: &[&str],
    ) -> anyhow::Result<serde_json::Value> {
        let bin = workspace_root().join(".venv/bin/aws");
        ensure!(
            bin.exists(),
            "{} is missing; run `make setup`",
            bin.display()
        );
        let out = tokio::process::Command::new(&bin)
            .args(args)
            .args(["--output", "json"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir())
            .envs(self.aws_env(creds))
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running aws {}", args.join(" ")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "aws {} failed ({}):\n{}{stdout}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if stdout.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&stdout).with_context(|| format!("aws printed {stdout}"))
    }

    /// Kills the gateway (SIGKILL) and waits for it. Calling it twice is harmless.
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Kills the gateway and starts it again on the same port with the same tokens file and
    /// etcd endpoint, then waits for `/readyz`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        spawn_gateway(
            &self.bin,
            self.port,
            &self.etcd_endpoint,
            &self.tokens_path,
            &self.log_path,
            &self.extra_args,
            &mut self.child,
        )
        .await
    }

    /// Asks the gateway to stop (SIGTERM, as `make down` and service managers do) without
    /// waiting for it: see [`Gateway::wait_exit`].
    pub fn ask_to_stop(&self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the gateway is not running")?;
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// Waits at most `deadline` for the gateway to exit, polling; SIGKILLs it after that.
    /// Returns whether it exited by itself.
    pub fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<bool> {
        wait_exit(&mut self.child, deadline)
    }

    /// Sends the gateway SIGHUP (`kill -HUP`), which makes it read its tokens file again.
    pub fn hang_up(&self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the gateway is not running")?;
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-HUP", &pid]).status()?;
        anyhow::ensure!(sent.success(), "kill -HUP {pid} failed");
        Ok(())
    }

    /// The directory of the gateway's S3 blobs (`--s3-data-dir`).
    pub fn s3_data_dir(&self) -> PathBuf {
        s3_dir(&self.tokens_path)
    }

    /// The temporary directory holding the tokens file and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The tokens file the gateway was started with.
    pub fn tokens_path(&self) -> &Path {
        &self.tokens_path
    }

    /// The file that receives the gateway's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last lines of the gateway's log, for error messages and assertions.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, LOG_TAIL_LINES)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// An AWS access key: what awscli, boto3 and SigV4 signers need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    /// The access key ID (`AKIK...`).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

/// Bearer tokens for a test cluster, written as the gateway's tokens file by
/// [`Tokens::to_yaml`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Token of user `admin` (role `admin`).
    pub admin: String,
    /// Token of user `operator` (role `operator`).
    pub operator: String,
    /// `(node name, token)` for each node agent (role `node`, user = node name).
    pub nodes: Vec<(String, String)>,
    /// `(namespace, token)` for each account (role `account`, user = namespace).
    pub accounts: Vec<(String, String)>,
}

impl Tokens {
    /// Fresh random tokens for admin, operator, one per node and one per account namespace.
    pub fn generate(nodes: &[&str], account_namespaces: &[&str]) -> Tokens {
        Tokens {
            admin: random_token(),
            operator: random_token(),
            nodes: nodes
                .iter()
                .map(|n| (n.to_string(), random_token()))
                .collect(),
            accounts: account_namespaces
                .iter()
                .map(|ns| (ns.to_string(), random_token()))
                .collect(),
        }
    }

    /// The token of node `node`, if it has one.
    pub fn node(&self, node: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, t)| t.as_str())
    }

    /// The token of the account owning namespace `namespace`, if it has one.
    pub fn account(&self, namespace: &str) -> Option<&str> {
        self.accounts
            .iter()
            .find(|(ns, _)| ns == namespace)
            .map(|(_, t)| t.as_str())
    }

    /// The gateway's tokens file:
    ///
    /// ```yaml
    /// tokens:
    ///   - token: <t>
    ///     user: admin
    ///     role: admin
    ///   - token: <t>
    ///     user: node-1
    ///     role: node
    ///     node: node-1
    ///   - token: <t>
    ///     user: team-a
    ///     role: account
    ///     namespace: team-a
    /// ```
    pub fn to_yaml(&self) -> String {
        let mut out = String::from("tokens:\n");
        let mut entry = |token: &str, user: &str, role: &str, extra: Option<(&str, &str)>| {
            out.push_str(&format!(
                "  - token: {}\n    user: {}\n    role: {role}\n",
                yaml_scalar(token),
                yaml_scalar(user)
            ));
            if let Some((key, value)) = extra {
                out.push_str(&format!("    {key}: {}\n", yaml_scalar(value)));
            }
        };
        entry(&self.admin, "admin", "admin", None);
        entry(&self.operator, "operator", "operator", None);
        for (node, token) in &self.nodes {
            entry(token, node, "node", Some(("node", node)));
        }
        for (ns, token) in &self.accounts {
            entry(token, ns, "account", Some(("namespace", ns)));
        }
        out
    }
}

/// Writes a kubeconfig for `server` authenticating with bearer `token`, default namespace
/// `namespace`, into `dir` and returns its path.
///
/// Cluster, user and context are all named `karri`. The file name is derived from the token
/// (`kubeconfig-<token prefix>`), so kubeconfigs for different tokens can share one directory.
pub fn write_kubeconfig(
    dir: &Path,
    server: &str,
    ca: Option<&Path>,
    token: &str,
    namespace: &str,
) -> anyhow::Result<PathBuf> {
    let tag: String = token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    let name = if tag.is_empty() {
        "kubeconfig".to_string()
    } else {
        format!("kubeconfig-{tag}")
    };
    let path = dir.join(name);
    let yaml = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: karri\n\
         \x20 cluster:\n\
         \x20   server: {server}\n\
         {ca_line}\
         users:\n\
         - name: karri\n\
         \x20 user:\n\
         \x20   token: {token}\n\
         contexts:\n\
         - name: karri\n\
         \x20 context:\n\
         \x20   cluster: karri\n\
         \x20   user: karri\n\
         \x20   namespace: {namespace}\n\
         current-context: karri\n",
        server = yaml_scalar(server),
        ca_line = ca
            .map(|c| format!(
                "    certificate-authority: {}\n",
                yaml_scalar(&c.display().to_string())
            ))
            .unwrap_or_default(),
        token = yaml_scalar(token),
        namespace = yaml_scalar(namespace),
    );
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs `kubectl --kubeconfig <kubeconfig> <args...>` and returns its output.
///
/// The binary is `$KARRI_KUBECTL` if set, else `kubectl` from `PATH`. kubectl's discovery
/// cache goes into `kubectl-cache/` next to the kubeconfig, so a port reused by a later test
/// never sees stale API discovery. If kubectl cannot be started the output has exit code 127
/// and the reason in stderr.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    let bin = kubectl_bin();
    let result = kubectl_command(kubeconfig, args).output();
    match result {
        Ok(out) => out,
        Err(e) => {
            use std::os::unix::process::ExitStatusExt;
            Output {
                status: std::process::ExitStatus::from_raw(127 << 8),
                stdout: Vec::new(),
                stderr: format!("cannot run {}: {e}", Path::new(&bin).display()).into_bytes(),
            }
        }
    }
}

/// The kubectl binary: `$KARRI_KUBECTL`, else `kubectl` from `PATH`.
fn kubectl_bin() -> std::ffi::OsString {
    std::env::var_os("KARRI_KUBECTL").unwrap_or_else(|| "kubectl".into())
}

/// A `kubectl --kubeconfig <kubeconfig> --cache-dir <dir>/kubectl-cache <args...>` command with
/// standard input closed, for callers that need to stream its output.
pub fn kubectl_command(kubeconfig: &Path, args: &[&str]) -> Command {
    let cache_dir = kubeconfig
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("kubectl-cache");
    let mut cmd = Command::new(kubectl_bin());
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&cache_dir)
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// Like [`kubectl`], but returns stdout and fails (with args, exit status, stderr and stdout in
/// the message) when kubectl exits non-zero.
pub fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl(kubeconfig, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}):\nstderr:\n{}\nstdout:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            stdout.trim_end()
        );
    }
    Ok(stdout)
}

/// The workspace root (the directory holding the workspace `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest);
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

/// Where the workspace binaries are: `$KARRI_BIN_DIR`, else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("KARRI_BIN_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target").join("debug"),
    }
}

/// A random token: 18 bytes from `/dev/urandom`, hex-encoded (36 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 18];
    let from_urandom = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_urandom.is_err() {
        // Not expected on Linux; fall back to std's per-process random hash keys.
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default(),
            );
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` distinct free TCP ports on 127.0.0.1 (bound together, then released).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding 127.0.0.1:0 to find a free port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("<cannot read {}: {e}>", path.display()),
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn etcd_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("KARRI_ETCD_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let debian = Path::new("/usr/bin/etcd");
    if debian.is_file() {
        debian.to_path_buf()
    } else {
        PathBuf::from("etcd")
    }
}

fn log_files(path: &Path) -> anyhow::Result<(File, File)> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))?;
    let err = out.try_clone().context("cloning log file handle")?;
    Ok((out, err))
}

fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn log_says_port_taken(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|s| s.contains("address already in use") || s.contains("Address already in use"))
        .unwrap_or(false)
}

/// Quotes a YAML scalar when it is not a plain safe word.
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
        && !s.starts_with(['-', ':', '.'])
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~"
        )
        && s.parse::<f64>().is_err();
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Spawns etcd into `child` and waits for `/health`.
async fn spawn_etcd(
    bin: &Path,
    data_dir: &Path,
    port: u16,
    peer_port: u16,
    log_path: &Path,
    child: &mut Option<Child>,
) -> anyhow::Result<()> {
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let (stdout, stderr) = log_files(log_path)?;
    let spawned = Command::new(bin)
        .arg("--name")
        .arg("karri-test")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen-client-urls")
        .arg(&client)
        .arg("--advertise-client-urls")
        .arg(&client)
        .arg("--listen-peer-urls")
        .arg(&peer)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer)
        .arg("--initial-cluster")
        .arg(format!("karri-test={peer}"))
        .arg("--initial-cluster-state")
        .arg("new")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| {
            format!(
                "spawning {} (install Debian's etcd-server or set KARRI_ETCD_BIN)",
                bin.display()
            )
        })?;
    *child = Some(spawned);
    let url = format!("{client}/health");
    let healthy = |body: &str| body.replace(' ', "").contains("\"health\":\"true\"");
    wait_ready("etcd", &url, healthy, child, log_path).await
}

/// The directory where the gateway keeps its generated CA and serving certificate: `pki/`
/// beside the given file in the gateway's temp dir.
fn s3_dir(sibling: &Path) -> PathBuf {
    sibling
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("objects")
}

fn pki_dir(sibling: &Path) -> PathBuf {
    sibling
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("pki")
}

/// An HTTP client trusting `ca` (the gateway's generated CA) when given.
pub fn http_client(ca: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).context("parsing the CA")?);
    }
    b.build().context("building HTTP client")
}

/// A client for readiness checks that keeps no connection open after its answer: a pooled
/// keep-alive connection of a dropped client could stay open for a while and hold one of a
/// gateway's capped connections (tests count them).
fn readiness_client(ca: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).context("parsing the CA")?);
    }
    b.build().context("building HTTP client")
}

/// Spawns the gateway into `child` and waits for `/readyz`.
async fn spawn_gateway(
    bin: &Path,
    port: u16,
    etcd_endpoint: &str,
    tokens_path: &Path,
    log_path: &Path,
    extra_args: &[String],
    child: &mut Option<Child>,
) -> anyhow::Result<()> {
    let (stdout, stderr) = log_files(log_path)?;
    let spawned = Command::new(bin)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--etcd-endpoints")
        .arg(etcd_endpoint)
        .arg("--tokens-file")
        .arg(tokens_path)
        .arg("--cert-dir")
        .arg(pki_dir(tokens_path))
        .arg("--s3-data-dir")
        .arg(s3_dir(tokens_path))
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    *child = Some(spawned);
    let url = format!("https://127.0.0.1:{port}/readyz");
    wait_ready("api-gateway", &url, |_| true, child, log_path).await
}

/// Polls `url` every [`POLL_INTERVAL`] until it answers 200 with a body accepted by `ok`,
/// failing early if the child exits and after [`READY_DEADLINE`] otherwise.
async fn wait_ready(
    what: &str,
    url: &str,
    ok: impl Fn(&str) -> bool,
    child: &mut Option<Child>,
    log_path: &Path,
) -> anyhow::Result<()> {
    let ca = url
        .starts_with("https://")
        .then(|| pki_dir(log_path).join("ca.crt"));
    let start = Instant::now();
    loop {
        let client = readiness_client(ca.as_deref().filter(|c| c.exists()))?;
        if let Some(c) = child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                child.take();
                bail!(
                    "{what} exited with {status} before becoming ready ({url}); log tail:\n{}",
                    log_tail(log_path, LOG_TAIL_LINES)
                );
            }
        }
        let last = match client.get(url).send().await {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                if status.is_success() && ok(&body) {
                    return Ok(());
                }
                format!("HTTP {status}: {}", body.trim())
            }
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= READY_DEADLINE {
            bail!(
                "{what} not ready at {url} after {:?} (last: {last}); log tail:\n{}",
                READY_DEADLINE,
                log_tail(log_path, LOG_TAIL_LINES)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A project binary (operator, node agent …) running as a child process with its output in a
/// log file; killed with SIGKILL on drop, like a crash.
#[derive(Debug)]
pub struct Service {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Service {
    /// Start `$KARRI_BIN_DIR/<name>` with `args` and `envs`, logging to `<log_dir>/<label>.log`.
    /// It does not wait for readiness: tests observe what the service does through the API.
    pub fn spawn(
        name: &str,
        label: &str,
        log_dir: &Path,
        args: &[String],
        envs: &[(String, String)],
    ) -> anyhow::Result<Service> {
        let bin = bin_dir().join(name);
        if !bin.is_file() {
            bail!(
                "{} not found: run `cargo build --workspace --bins` first",
                bin.display()
            );
        }
        let mut s = Service {
            name: label.to_string(),
            bin,
            args: args.to_vec(),
            envs: envs.to_vec(),
            child: None,
            log_path: log_dir.join(format!("{label}.log")),
        };
        s.start()?;
        Ok(s)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let (stdout, stderr) = log_files(&self.log_path)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL the process and reap it (a crash, `kill -9`). Harmless when already stopped.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Asks the process to stop (SIGTERM, as `make down` does) and waits at most `deadline`
    /// for it to exit, polling; SIGKILLs it after that. Returns whether it exited by itself.
    pub fn terminate(&mut self, deadline: Duration) -> anyhow::Result<bool> {
        let Some(child) = self.child.as_mut() else {
            return Ok(true);
        };
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        wait_exit(&mut self.child, deadline)
    }

    /// Kill and start again with the same arguments.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start()
    }

    /// The process ID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (it may have exited on its own).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        format!(
            "--- {} ---\n{}",
            self.name,
            log_tail(&self.log_path, LOG_TAIL_LINES)
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Waits at most `deadline` for `child` to exit (its pidfd becomes readable when it does);
/// SIGKILLs and reaps it after that. Returns whether it exited by itself (`child` is `None`
/// afterwards either way).
fn wait_exit(child: &mut Option<Child>, deadline: Duration) -> anyhow::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let Some(running) = child.as_mut() else {
        return Ok(true);
    };
    if running.try_wait()?.is_some() {
        *child = None;
        return Ok(true);
    }
    // Not reaped yet, so the pid is still this child's.
    let pid = i32::try_from(running.id())
        .ok()
        .and_then(Pid::from_raw)
        .context("the child's pid is not a valid pid")?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).context("pidfd_open of the child")?;
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let timeout = rustix::event::Timespec::try_from(left).context("the deadline is too far")?;
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => break,
            Ok(_) => {
                running.wait()?;
                *child = None;
                return Ok(true);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e).context("waiting for the child's exit"),
        }
    }
    kill_and_reap(child);
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_exits_is_seen_at_once_and_one_that_does_not_is_killed_at_the_deadline() {
        let mut quick = Some(Command::new("true").spawn().expect("true runs"));
        let started = Instant::now();
        assert!(wait_exit(&mut quick, Duration::from_secs(30)).expect("waiting works"));
        assert!(quick.is_none());
        assert!(started.elapsed() < Duration::from_secs(10));

        let mut stuck = Some(Command::new("sleep").arg("60").spawn().expect("sleep runs"));
        let pid = stuck.as_ref().map(Child::id).expect("it was spawned");
        assert!(!wait_exit(&mut stuck, Duration::from_millis(200)).expect("waiting works"));
        assert!(stuck.is_none());
        // Killed and reaped: no process of that pid is left, not even a zombie.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
