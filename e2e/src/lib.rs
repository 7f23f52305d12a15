//! End-to-end tests of Karri with real clients (kubectl, kube-rs) against a real gateway on real
//! etcd. The tests live in `tests/`; [`support`] holds what several of them share, and [`cloud`]
//! brings up a whole cloud (operators and node agents as real processes) for the cloud tests and
//! the `bench-cloud` benchmark.

pub mod closed_loop;
pub mod cloud;
pub mod guests;
pub mod karri;
pub mod libvirt_floor;
pub mod moto;
pub mod raw_etcd;
pub mod report;
pub mod s3;

pub mod support {
    //! Helpers shared by the kubectl, bad-input and authorization tests: a fresh cluster (etcd,
    //! gateway, tokens, kubeconfigs), kubectl runs that must fail, long-running kubectl processes
    //! read line by line, and raw HTTPS calls whose refusals are checked to be Kubernetes
    //! `Status` objects.

    use std::io::{BufRead, BufReader, Read};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Stdio};
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context};
    use karri_testkit::{kubectl, kubectl_ok, Etcd, Gateway, Tokens};
    use serde_json::Value;

    /// Path prefix of the resource API.
    pub const API: &str = "/apis/karri.dev/v1alpha1";

    /// Node names that get a token in every [`Cluster`].
    pub const NODES: [&str; 2] = ["node-1", "node-2"];

    /// Account namespaces that get a token in every [`Cluster`].
    pub const ACCOUNTS: [&str; 2] = ["acme", "globex"];

    /// A fresh etcd and gateway of one test, with tokens for admin, operator, the nodes in
    /// [`NODES`] and the accounts in [`ACCOUNTS`].
    pub struct Cluster {
        /// The gateway (declared before etcd, so it is stopped first).
        pub gateway: Gateway,
        /// The etcd the gateway stores into.
        pub etcd: Etcd,
        /// The tokens the gateway knows.
        pub tokens: Tokens,
        /// A kubeconfig of the admin user, default namespace `acme`.
        pub admin: PathBuf,
        manifests: tempfile::TempDir,
    }

    impl Cluster {
        /// Starts etcd and the gateway and writes the admin kubeconfig.
        pub async fn start() -> anyhow::Result<Cluster> {
            let etcd = Etcd::start().await?;
            let tokens = Tokens::generate(&NODES, &ACCOUNTS);
            let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
            let admin = gateway.kubeconfig(&tokens.admin, "acme")?;
            let manifests = tempfile::Builder::new()
                .prefix("karri-manifests-")
                .tempdir()
                .context("creating the manifest dir")?;
            Ok(Cluster {
                gateway,
                etcd,
                tokens,
                admin,
                manifests,
            })
        }

        /// A kubeconfig for node `node` (one of [`NODES`]), default namespace `acme`.
        pub fn node_kubeconfig(&self, node: &str) -> anyhow::Result<PathBuf> {
            let token = self
                .tokens
                .node(node)
                .with_context(|| format!("no token for node {node}"))?;
            self.gateway.kubeconfig(token, "acme")
        }

        /// A kubeconfig for the account owning `namespace` (one of [`ACCOUNTS`]), default
        /// namespace `namespace`.
        pub fn account_kubeconfig(&self, namespace: &str) -> anyhow::Result<PathBuf> {
            let token = self
                .tokens
                .account(namespace)
                .with_context(|| format!("no token for account {namespace}"))?;
            self.gateway.kubeconfig(token, namespace)
        }

        /// Writes `text` as `name` into this test's manifest directory and returns its path.
        pub fn manifest(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
            let path = self.manifests.path().join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        }

        /// A raw HTTPS client of the resource API authenticating with `token` (`None`: no
        /// `Authorization` header).
        pub fn api(&self, token: Option<&str>) -> anyhow::Result<Api> {
            Ok(Api {
                client: self.gateway.client()?,
                base: self.gateway.url(),
                token: token.map(str::to_string),
            })
        }

        /// A raw HTTPS client with the admin token.
        pub fn admin_api(&self) -> anyhow::Result<Api> {
            self.api(Some(&self.tokens.admin))
        }
    }

    /// A minimal valid Instance manifest (YAML) named `name` of type `instance_type`, without a
    /// namespace.
    pub fn instance_yaml(name: &str, instance_type: &str) -> String {
        format!(
            "apiVersion: karri.dev/v1alpha1\n\
             kind: Instance\n\
             metadata:\n\
             \x20 name: {name}\n\
             spec:\n\
             \x20 imageId: emi-0123456789abcdef0\n\
             \x20 instanceType: {instance_type}\n"
        )
    }

    /// A minimal valid Instance as a JSON value named `name` of type `m1.small`.
    pub fn instance_json(name: &str) -> Value {
        serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1",
            "kind": "Instance",
            "metadata": {"name": name},
            "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small"}
        })
    }

    /// Text of a kubectl run for error messages.
    fn describe(args: &[&str], out: &std::process::Output) -> String {
        format!(
            "kubectl {} ({}):\nstderr:\n{}\nstdout:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end()
        )
    }

    /// Runs kubectl and fails unless it exits non-zero; returns its stderr.
    pub fn kubectl_err(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
        let out = kubectl(kubeconfig, args);
        if out.status.success() || out.status.code() == Some(127) {
            bail!("expected failure of {}", describe(args, &out));
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Runs kubectl, which must fail with `Error from server (<reason>)`; returns its stderr.
    pub fn kubectl_refused(
        kubeconfig: &Path,
        args: &[&str],
        reason: &str,
    ) -> anyhow::Result<String> {
        let stderr = kubectl_err(kubeconfig, args)?;
        let want = format!("Error from server ({reason})");
        ensure!(
            stderr.contains(&want),
            "kubectl {} should fail with {want:?}, stderr was:\n{stderr}",
            args.join(" ")
        );
        Ok(stderr)
    }

    /// Runs kubectl with `-o json` appended and parses its output.
    pub fn kubectl_json(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = kubectl_ok(kubeconfig, &all)?;
        serde_json::from_str(&out)
            .with_context(|| format!("kubectl {} printed no JSON:\n{out}", all.join(" ")))
    }

    /// The names printed by `kubectl get <what> -o name` (e.g. `instance.karri.dev/web-1`).
    pub fn kubectl_names(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut all = args.to_vec();
        all.extend(["-o", "name"]);
        let out = kubectl_ok(kubeconfig, &all)?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// Splits the output of `kubectl get` (a table) into rows of `(column, cell)`, using the
    /// header's column positions (kubectl aligns every cell under its header).
    pub fn parse_table(text: &str) -> anyhow::Result<Vec<Vec<(String, String)>>> {
        let mut lines = text.lines();
        let header = lines.next().context("the table has no header")?;
        let bytes = header.as_bytes();
        let mut starts = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            let after_gap = i == 0 || (i >= 2 && bytes[i - 1] == b' ' && bytes[i - 2] == b' ');
            if *b != b' ' && after_gap {
                starts.push(i);
            }
        }
        let cell = |line: &str, from: usize, to: Option<usize>| -> String {
            let end = to.unwrap_or(line.len()).min(line.len());
            line.get(from.min(end)..end)
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let names: Vec<String> = starts
            .iter()
            .enumerate()
            .map(|(i, s)| cell(header, *s, starts.get(i + 1).copied()))
            .collect();
        Ok(lines
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                starts
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (names[i].clone(), cell(line, *s, starts.get(i + 1).copied())))
                    .collect()
            })
            .collect())
    }

    /// A long-running kubectl (such as `kubectl get -w`) whose stdout is read line by line.
    /// Dropping it kills the process.
    pub struct KubectlStream {
        child: Child,
        lines: mpsc::Receiver<String>,
        seen: Vec<String>,
        stderr: Arc<Mutex<String>>,
        args: String,
    }

    impl KubectlStream {
        /// Starts `kubectl --kubeconfig <kubeconfig> <args...>` the way
        /// [`karri_testkit::kubectl`] runs it (same binary and discovery cache).
        pub fn spawn(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<KubectlStream> {
            let mut child = karri_testkit::kubectl_command(kubeconfig, args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawning kubectl")?;
            let stdout = child.stdout.take().context("kubectl has no stdout")?;
            let mut err_pipe = child.stderr.take().context("kubectl has no stderr")?;
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let stderr = Arc::new(Mutex::new(String::new()));
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err_pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
            Ok(KubectlStream {
                child,
                lines,
                seen: Vec::new(),
                stderr,
                args: args.join(" "),
            })
        }

        /// Waits up to `timeout` for the next line accepted by `matches` (lines before it are
        /// skipped) and returns it; fails with everything seen so far otherwise.
        pub fn next_line(
            &mut self,
            what: &str,
            timeout: Duration,
            matches: impl Fn(&str) -> bool,
        ) -> anyhow::Result<String> {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(line) => {
                        self.seen.push(line.clone());
                        if matches(&line) {
                            return Ok(line);
                        }
                    }
                    Err(e) => {
                        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
                        bail!(
                            "kubectl {} showed no line with {what} within {timeout:?} ({e}); \
                             lines so far:\n{}\nstderr:\n{stderr}",
                            self.args,
                            self.seen.join("\n")
                        );
                    }
                }
            }
        }

        /// Whether the process is still running.
        pub fn running(&mut self) -> anyhow::Result<bool> {
            Ok(self.child.try_wait().context("polling kubectl")?.is_none())
        }

        /// Every line read so far.
        pub fn seen(&self) -> &[String] {
            &self.seen
        }
    }

    impl Drop for KubectlStream {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Raw HTTPS access to the gateway with one bearer token.
    #[derive(Clone)]
    pub struct Api {
        client: reqwest::Client,
        base: String,
        token: Option<String>,
    }

    impl Api {
        /// A request to `path` (e.g. `/apis/karri.dev/v1alpha1/instances`) with the token.
        pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
            let req = self.client.request(method, format!("{}{path}", self.base));
            match &self.token {
                Some(t) => req.bearer_auth(t),
                None => req,
            }
        }

        /// GETs `path`, which must answer 200 with JSON.
        pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
            let resp = self
                .request(reqwest::Method::GET, path)
                .send()
                .await
                .with_context(|| format!("GET {path}"))?;
            let code = resp.status();
            let text = resp.text().await.context("reading the body")?;
            ensure!(code == 200, "GET {path} answered {code}: {text}");
            serde_json::from_str(&text).with_context(|| format!("GET {path} is not JSON: {text}"))
        }

        /// The `items` of the list at `path`.
        pub async fn items(&self, path: &str) -> anyhow::Result<Vec<Value>> {
            let list = self.get_json(path).await?;
            list.get("items")
                .and_then(Value::as_array)
                .cloned()
                .with_context(|| format!("GET {path} has no items: {list}"))
        }

        /// The names of the items of the list at `path`.
        pub async fn names(&self, path: &str) -> anyhow::Result<Vec<String>> {
            Ok(self
                .items(path)
                .await?
                .iter()
                .filter_map(|o| o.pointer("/metadata/name").and_then(Value::as_str))
                .map(str::to_string)
                .collect())
        }
    }

    /// Checks that `resp` answered `code` with a Kubernetes `Status` body (`kind: Status`,
    /// `status: Failure`, the same `code`, `reason` and a non-empty message) and returns the
    /// body.
    pub async fn expect_status(
        resp: reqwest::Response,
        code: u16,
        reason: &str,
    ) -> anyhow::Result<Value> {
        let got = resp.status().as_u16();
        let text = resp.text().await.context("reading the body")?;
        ensure!(got == code, "expected HTTP {code}, got {got}: {text}");
        let body: Value =
            serde_json::from_str(&text).with_context(|| format!("the body is not JSON: {text}"))?;
        ensure!(body["kind"] == "Status", "not a Status: {body}");
        ensure!(
            body["apiVersion"] == "v1",
            "Status apiVersion is not v1: {body}"
        );
        ensure!(body["status"] == "Failure", "Status is not Failure: {body}");
        ensure!(body["code"] == code, "Status code is not {code}: {body}");
        ensure!(
            body["reason"] == reason,
            "Status reason is not {reason}: {body}"
        );
        ensure!(
            body["message"]
                .as_str()
                .is_some_and(|m| !m.trim().is_empty()),
            "Status has no message: {body}"
        );
        Ok(body)
    }

    /// The `message` of a `Status` body.
    pub fn message(status: &Value) -> &str {
        status["message"].as_str().unwrap_or("")
    }
}
