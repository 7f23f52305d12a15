//! Starts a real etcd and checks it answers, survives a restart with its data, and is gone on drop.

use std::time::Duration;

use karri_testkit::{kubectl_ok, write_kubeconfig, Etcd, Tokens};

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?)
}

async fn put(endpoint: &str) -> anyhow::Result<()> {
    // etcd's v3 JSON gateway: base64("karri") = a2FycmE=, base64("ok") = b2s=
    let put = client()?
        .post(format!("{endpoint}/v3/kv/put"))
        .body(r#"{"key":"a2FycmE=","value":"b2s="}"#)
        .send()
        .await?;
    anyhow::ensure!(put.status().is_success(), "put: {}", put.status());
    Ok(())
}

async fn get(endpoint: &str) -> anyhow::Result<String> {
    Ok(client()?
        .post(format!("{endpoint}/v3/kv/range"))
        .body(r#"{"key":"a2FycmE="}"#)
        .send()
        .await?
        .text()
        .await?)
}

#[tokio::test]
async fn etcd_starts_and_answers_health() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    assert!(etcd.endpoint.starts_with("http://127.0.0.1:"));
    let body = client()?
        .get(format!("{}/health", etcd.endpoint))
        .send()
        .await?
        .text()
        .await?;
    assert!(body.contains("true"), "health body: {body}");

    put(&etcd.endpoint).await?;
    etcd.restart().await?;
    let range = get(&etcd.endpoint).await?;
    assert!(range.contains("b2s="), "value lost across restart: {range}");

    let port = etcd.port;
    drop(etcd);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "etcd still listening after drop"
    );
    Ok(())
}

#[test]
fn tokens_yaml_has_the_gateway_format() {
    let t = Tokens::generate(&["node-1"], &["team-a"]);
    assert_eq!(t.admin.len(), 36);
    assert_ne!(t.admin, t.operator);
    let expected = format!(
        "tokens:\n  - token: {}\n    user: admin\n    role: admin\n  - token: {}\n    user: operator\n    role: operator\n  - token: {}\n    user: node-1\n    role: node\n    node: node-1\n  - token: {}\n    user: team-a\n    role: account\n    namespace: team-a\n",
        t.admin,
        t.operator,
        t.node("node-1").unwrap_or_default(),
        t.account("team-a").unwrap_or_default(),
    );
    assert_eq!(t.to_yaml(), expected);
}

#[test]
fn kubeconfig_is_written() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = write_kubeconfig(dir.path(), "http://127.0.0.1:1", None, "abc123", "default")?;
    let b = write_kubeconfig(dir.path(), "http://127.0.0.1:1", None, "def456", "team-a")?;
    assert_ne!(a, b);
    let text = std::fs::read_to_string(&b)?;
    assert!(text.contains("server: http://127.0.0.1:1"));
    assert!(text.contains("token: def456"));
    assert!(text.contains("namespace: team-a"));
    assert!(text.contains("current-context: karri"));
    // kubectl itself parses it (no server needed for `config view`).
    let ns = kubectl_ok(
        &b,
        &[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.contexts[0].context.namespace}",
        ],
    )?;
    assert_eq!(ns, "team-a");
    Ok(())
}
