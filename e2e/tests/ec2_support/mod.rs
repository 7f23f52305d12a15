//! What the EC2 end-to-end tests (`ec2_isolation`, `ec2_errors`, `ec2_client_token`) share:
//! a real boto3/botocore process driven over JSON lines (`e2e/python/ec2_driver.py`), raw signed
//! HTTP requests sent with reqwest, and the AWS error document read back from XML.
//!
//! Each test file uses part of it, hence the `dead_code` allowance.
#![allow(
    dead_code,
    reason = "each EC2 test crate uses a part of this support module"
)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use karri_testkit::{kubectl_ok, workspace_root, AwsCredentials, Gateway};
use serde_json::{json, Value};

/// The EC2 API version every raw request names.
pub const VERSION: &str = "2016-11-15";

/// How long one driver request may take (a 50-thread batch included).
const DRIVER_TIMEOUT: Duration = Duration::from_secs(120);

/// A boto3 process signing with one account's access key (`ec2_driver.py`).
pub struct Driver {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    label: String,
}

/// What one boto3 call answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status (None when no response arrived).
    pub status: Option<u16>,
    /// The AWS error code of a failed call.
    pub code: Option<String>,
    /// The error message of a failed call.
    pub message: String,
    /// The parsed response of a successful call (`Value::Null` for a failed one).
    pub result: Value,
    /// Whether the call succeeded.
    pub ok: bool,
    /// When a concurrent call started and finished (the driver's monotonic clock, seconds).
    pub span: Option<(f64, f64)>,
}

impl Answer {
    fn from_json(v: &Value) -> anyhow::Result<Answer> {
        if let Some(e) = v.get("driver_error") {
            bail!("the driver failed: {}", e.as_str().unwrap_or_default());
        }
        Ok(Answer {
            ok: v.get("ok").and_then(Value::as_bool).context("no ok")?,
            status: v
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok()),
            code: v.get("code").and_then(Value::as_str).map(str::to_string),
            message: v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            result: v.get("result").cloned().unwrap_or(Value::Null),
            span: v
                .get("started")
                .and_then(Value::as_f64)
                .zip(v.get("finished").and_then(Value::as_f64)),
        })
    }

    /// The result of a call that must have succeeded.
    pub fn success(self, what: &str) -> anyhow::Result<Value> {
        ensure!(
            self.ok,
            "{what} failed: {:?} {:?} {}",
            self.status,
            self.code,
            self.message
        );
        Ok(self.result)
    }

    /// `(code, status)` of a call that must have failed with an AWS error.
    pub fn refusal(&self, what: &str) -> anyhow::Result<(String, u16)> {
        ensure!(!self.ok, "{what} succeeded: {}", self.result);
        match (&self.code, self.status) {
            (Some(code), Some(status)) => Ok((code.clone(), status)),
            _ => bail!("{what} failed without an AWS error: {}", self.message),
        }
    }
}

impl Driver {
    /// Starts `<workspace>/.venv/bin/python -u e2e/python/ec2_driver.py` with the environment of
    /// `gateway.aws_env(creds)`.
    pub fn start(gateway: &Gateway, creds: &AwsCredentials, label: &str) -> anyhow::Result<Driver> {
        let root = workspace_root();
        let python = root.join(".venv/bin/python");
        ensure!(
            python.is_file(),
            "{} is missing: run `make setup`",
            python.display()
        );
        let mut cmd = Command::new(&python);
        cmd.arg("-u")
            .arg(root.join("e2e/python/ec2_driver.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for var in ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"] {
            cmd.env_remove(var);
        }
        cmd.envs(gateway.aws_env(creds));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Driver {
            child,
            stdin: Some(stdin),
            lines,
            label: label.to_string(),
        })
    }

    /// Sends one request and returns the driver's JSON answer.
    pub fn request(&mut self, request: &Value) -> anyhow::Result<Value> {
        let stdin = self.stdin.as_mut().context("the driver is closed")?;
        writeln!(stdin, "{request}").context("writing to the driver")?;
        stdin.flush()?;
        let line = self.lines.recv_timeout(DRIVER_TIMEOUT).with_context(|| {
            format!(
                "driver {} gave no answer to {request} within {DRIVER_TIMEOUT:?}",
                self.label
            )
        })?;
        let answer: Value = serde_json::from_str(&line)
            .with_context(|| format!("driver {} answered {line:?}", self.label))?;
        if let Some(e) = answer.get("driver_error") {
            bail!(
                "driver {} failed on {request}: {}",
                self.label,
                e.as_str().unwrap_or_default()
            );
        }
        Ok(answer)
    }

    /// One boto3 EC2 call, e.g. `call("describe_instances", json!({"InstanceIds": [id]}))`.
    pub fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Answer> {
        let answer = self.request(&json!({"op": "call", "method": method, "params": params}))?;
        Answer::from_json(&answer)
    }

    /// A call that must succeed; its parsed response.
    pub fn ok(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let what = format!("{} {method} {params}", self.label);
        self.call(method, params)?.success(&what)
    }

    /// One boto3 S3 call (path-style), e.g. `s3_ok("create_bucket", json!({"Bucket": "b"}))`,
    /// which must succeed.
    pub fn s3_ok(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let what = format!("{} s3 {method} {params}", self.label);
        let answer = self
            .request(&json!({"op": "call", "service": "s3", "method": method, "params": params}))?;
        Answer::from_json(&answer)?.success(&what)
    }

    /// Uploads a small object at image location `bucket/key` (making the bucket when this
    /// account has not yet), so that an image can be registered from it.
    pub fn upload_image_object(&mut self, location: &str) -> anyhow::Result<()> {
        let (bucket, key) = location
            .split_once('/')
            .with_context(|| format!("{location} is no bucket/key"))?;
        let made = self.request(&json!({"op": "call", "service": "s3", "method": "create_bucket", "params": {"Bucket": bucket}}))?;
        let made = Answer::from_json(&made)?;
        ensure!(
            made.ok || made.code.as_deref() == Some("BucketAlreadyOwnedByYou"),
            "{}: create_bucket {bucket} failed: {:?} {}",
            self.label,
            made.code,
            made.message
        );
        self.s3_ok(
            "put_object",
            json!({"Bucket": bucket, "Key": key, "Body": format!("disk image at {location}")}),
        )?;
        Ok(())
    }

    /// The same call `calls` times at once from that many threads, each on a connection opened
    /// beforehand by a `warm_up` call (e.g. `describe_regions`).
    pub fn concurrent(
        &mut self,
        method: &str,
        params: Value,
        calls: usize,
        warm_up: &str,
    ) -> anyhow::Result<Vec<Answer>> {
        let answer = self.request(&json!({
            "op": "concurrent", "method": method, "params": params, "calls": calls,
            "warm_up": warm_up,
        }))?;
        answer
            .get("answers")
            .and_then(Value::as_array)
            .context("no answers")?
            .iter()
            .map(Answer::from_json)
            .collect()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Closing stdin ends the driver's loop; kill it anyway in case it is stuck.
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP request to send with reqwest.
#[derive(Debug, Clone)]
pub struct Raw {
    /// `GET` or `POST`.
    pub method: reqwest::Method,
    /// The full URL (with the query of a GET).
    pub url: String,
    /// Headers to send (a signature's included).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// What the gateway answered a raw request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The body as text.
    pub body: String,
}

impl Reply {
    /// `(code, status)` of an AWS error document; fails when the body is not one.
    pub fn error(&self) -> anyhow::Result<(String, u16)> {
        let code = aws_error_code(&self.body)
            .with_context(|| format!("HTTP {} without an AWS error: {}", self.status, self.body))?;
        Ok((code, self.status))
    }
}

/// A form POST to the gateway's EC2 endpoint signed by `driver` with botocore's `SigV4Auth`;
/// `overrides` may set `access_key`, `secret_key` and `skew_seconds`.
pub fn signed_post(
    driver: &mut Driver,
    gateway: &Gateway,
    body: &str,
    overrides: Value,
) -> anyhow::Result<Raw> {
    signed_post_to(driver, format!("{}/", gateway.url()), body, overrides)
}

/// [`signed_post`] to `url`, e.g. an endpoint URL with a path.
pub fn signed_post_to(
    driver: &mut Driver,
    url: String,
    body: &str,
    overrides: Value,
) -> anyhow::Result<Raw> {
    let mut request = json!({"op": "sign", "method": "POST", "url": url, "body": body});
    if let (Some(req), Some(extra)) = (request.as_object_mut(), overrides.as_object()) {
        req.extend(extra.clone());
    }
    let answer = driver.request(&request)?;
    let headers = answer
        .get("headers")
        .and_then(Value::as_object)
        .context("no headers")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    Ok(Raw {
        method: reqwest::Method::POST,
        url,
        headers,
        body: body.as_bytes().to_vec(),
    })
}

/// An unsigned form POST.
pub fn unsigned_post(gateway: &Gateway, body: &str) -> Raw {
    Raw {
        method: reqwest::Method::POST,
        url: format!("{}/", gateway.url()),
        headers: vec![(
            "Content-Type".into(),
            "application/x-www-form-urlencoded; charset=utf-8".into(),
        )],
        body: body.as_bytes().to_vec(),
    }
}

/// Sends `raw` with a client that trusts the gateway's CA.
pub async fn send(gateway: &Gateway, raw: &Raw) -> anyhow::Result<Reply> {
    let mut req = gateway
        .client()?
        .request(raw.method.clone(), &raw.url)
        .body(raw.body.clone());
    for (k, v) in &raw.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{} {}", raw.method, raw.url))?;
    let status = resp.status().as_u16();
    let body = resp.text().await?;
    Ok(Reply { status, body })
}

/// The text of every element at `path` (e.g. `["Response", "Errors", "Error", "Code"]`) of an
/// XML document, read with a small tag walker (no attributes or CDATA in EC2's documents).
pub fn xml_texts(xml: &str, path: &[&str]) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        if stack.iter().map(String::as_str).eq(path.iter().copied()) && !text.trim().is_empty() {
            found.push(unescape(text));
        }
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        let tag = &rest[open + 1..open + close];
        rest = &rest[open + close + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            if stack.last().map(String::as_str) == Some(name.trim()) {
                stack.pop();
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let name = tag
            .trim_end_matches('/')
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    found
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The code of an EC2 error document `<Response><Errors><Error><Code>`, if the body is one.
pub fn aws_error_code(xml: &str) -> Option<String> {
    let codes = xml_texts(xml, &["Response", "Errors", "Error", "Code"]);
    match codes.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Applies the availability zones and instance types of `config/samples` as the admin, and
/// registers a Ready node (`node-1` in `karri-1a`, room for hundreds of instances) so that EC2
/// launches have room; with no operator running, their instances stay `pending`.
pub async fn apply_catalogue(gateway: &Gateway, admin_token: &str) -> anyhow::Result<()> {
    let kubeconfig = gateway.kubeconfig(admin_token, "default")?;
    let root = workspace_root();
    for sample in [
        "config/samples/availability-zone.yaml",
        "config/samples/instance-type.yaml",
    ] {
        let path = root.join(sample).display().to_string();
        kubectl_ok(&kubeconfig, &["apply", "-f", &path])?;
    }
    gateway
        .register_ready_node(admin_token, "node-1", "karri-1a", 1024, 1024 * 1024)
        .await
}
