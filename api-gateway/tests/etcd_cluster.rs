//! The gateway uses a site's etcd cluster exactly like the single local etcd: a list of
//! members, TLS with client certificates, and etcd's own authentication.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use api_gateway::auth::Principal;
use api_gateway::cache::HistoryLimits;
use api_gateway::kinds::Kinds;
use api_gateway::metrics::Metrics;
use api_gateway::registry::{ListOptions, Registry, WriteOptions};
use api_gateway::store::{self, EtcdConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::json;

struct Members(Vec<Option<Child>>);

impl Drop for Members {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> anyhow::Result<Pki> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test-etcd-ca");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |cn: &str, sans: Vec<SanType>| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        "etcd",
        vec![
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::DnsName("localhost".try_into()?),
        ],
    )?;
    let (client_pem, client_key) = leaf("root", vec![])?;
    let out = Pki {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&out.ca, ca.pem())?;
    std::fs::write(&out.server_cert, server_pem)?;
    std::fs::write(&out.server_key, server_key)?;
    std::fs::write(&out.client_cert, client_pem)?;
    std::fs::write(&out.client_key, client_key)?;
    Ok(out)
}

fn start_members(dir: &Path, pki: &Pki) -> anyhow::Result<(Members, Vec<String>)> {
    let ports = karri_testkit::free_ports(6)?;
    let peers: Vec<String> = (0..3)
        .map(|i| format!("http://127.0.0.1:{}", ports[3 + i]))
        .collect();
    let cluster = (0..3)
        .map(|i| format!("m{i}={}", peers[i]))
        .collect::<Vec<_>>()
        .join(",");
    let endpoints: Vec<String> = (0..3)
        .map(|i| format!("https://127.0.0.1:{}", ports[i]))
        .collect();
    let mut members = Members(Vec::new());
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("m{i}.log")))?;
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &endpoints[i],
                "--advertise-client-urls",
                &endpoints[i],
            ])
            .args([
                "--listen-peer-urls",
                &peers[i],
                "--initial-advertise-peer-urls",
                &peers[i],
            ])
            .args([
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
            ])
            .arg("--cert-file")
            .arg(&pki.server_cert)
            .arg("--key-file")
            .arg(&pki.server_key)
            .arg("--trusted-ca-file")
            .arg(&pki.ca)
            .arg("--client-cert-auth")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        members.0.push(Some(child));
    }
    Ok((members, endpoints))
}

/// Starts the three members over TLS and waits until they elect a leader; gives the members,
/// the client configuration and a root client. Their ports are picked free, but another test
/// process may bind one before etcd does: when a member exits saying so, the cluster starts
/// again on new ports.
async fn start_cluster(
    dir: &Path,
    pki: &Pki,
) -> anyhow::Result<(Members, EtcdConfig, etcd_client::Client)> {
    for attempt in 0..3 {
        let data = dir.join(format!("attempt-{attempt}"));
        std::fs::create_dir_all(&data)?;
        let (mut members, endpoints) = start_members(&data, pki)?;
        let tls = EtcdConfig {
            endpoints,
            ca_file: Some(pki.ca.clone()),
            cert_file: Some(pki.client_cert.clone()),
            key_file: Some(pki.client_key.clone()),
            username: None,
            password: None,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut interval = tokio::time::interval(Duration::from_millis(100));
        loop {
            interval.tick().await;
            if members.lost_a_port(&data)? {
                break;
            }
            let up = async {
                let mut c = store::connect(&tls).await?;
                c.put("/probe", "x", None).await?;
                anyhow::Ok(c)
            };
            match up.await {
                Ok(root) => return Ok((members, tls, root)),
                Err(e) if tokio::time::Instant::now() >= deadline => bail!("cluster up: {e:#}"),
                Err(_) => {}
            }
        }
    }
    bail!("three starts of the cluster each lost a port to another process")
}

impl Members {
    /// Whether a member exited because its port was taken (its log in `dir` says so).
    fn lost_a_port(&mut self, dir: &Path) -> anyhow::Result<bool> {
        for (i, member) in self.0.iter_mut().enumerate() {
            let Some(child) = member else { continue };
            if child.try_wait()?.is_some() {
                let log = std::fs::read_to_string(dir.join(format!("m{i}.log")))?;
                if log.contains("address already in use") {
                    return Ok(true);
                }
                bail!("etcd member m{i} exited:\n{log}");
            }
        }
        Ok(false)
    }
}

async fn until_ok<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => bail!("{what}: {e:#}"),
            Err(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_over_tls_with_auth_is_used_like_one_etcd() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (mut members, tls, mut root) = start_cluster(dir.path(), &pki).await?;
    // The members elected a leader; now turn on etcd authentication.
    root.user_add("root", "root-secret", None).await?;
    root.user_grant_role("root", "root").await?;
    root.user_add("karri", "karri-secret", None).await?;
    root.role_add("karri").await?;
    root.role_grant_permission(
        "karri",
        etcd_client::Permission::read_write("/karri/").with_prefix(),
    )
    .await?;
    root.user_grant_role("karri", "karri").await?;
    root.auth_enable().await?;

    let wrong = EtcdConfig {
        username: Some("karri".into()),
        password: Some("wrong".into()),
        ..tls.clone()
    };
    let Err(refused) = store::connect(&wrong).await else {
        panic!("a wrong password is accepted");
    };
    let refused = refused.to_string();
    assert!(
        refused.contains("authentication failed"),
        "refused for another reason: {refused}"
    );

    let config = EtcdConfig {
        username: Some("karri".into()),
        password: Some("karri-secret".into()),
        ..tls
    };
    let client = store::connect(&config).await?;
    let history = HistoryLimits {
        events: 1000,
        ..HistoryLimits::default()
    };
    let registry = Registry::start(
        client,
        Kinds::load(),
        history,
        Arc::new(Metrics::new()),
        None,
    );
    let kind = registry.kinds.by_plural("instances").context("instances")?;
    let admin = Principal::Admin("admin".into());
    let body = |name: &str| {
        json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "metadata": {"name": name},
               "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small"}})
    };
    until_ok("first create", || async {
        Ok(registry
            .create(
                &kind,
                Some("acme"),
                body("web-1"),
                &admin,
                WriteOptions::default(),
            )
            .await?)
    })
    .await?;

    // One member goes away: the others keep serving through the same client.
    if let Some(mut m) = members.0[0].take() {
        m.kill()?;
        m.wait()?;
    }
    until_ok("create with a member down", || async {
        // A retry after a create that landed but whose answer was lost meets AlreadyExists.
        match registry
            .create(
                &kind,
                Some("acme"),
                body("web-2"),
                &admin,
                WriteOptions::default(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    let page = registry
        .list(&kind, Some("acme"), &admin, &ListOptions::default())
        .await?;
    let names: Vec<_> = page
        .items
        .iter()
        .map(|o| o.value["metadata"]["name"].clone())
        .collect();
    assert_eq!(names, [json!("web-1"), json!("web-2")]);
    Ok(())
}
