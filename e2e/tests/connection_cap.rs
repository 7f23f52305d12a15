//! The gateway's connection cap (`--max-connections`), against the real binary: past the cap a
//! new connection is closed on arrival while the open ones keep working, the refusal is
//! counted in `/metrics`, a connection that closes makes room for the next, and with a separate
//! AWS listener (`--aws-listen`) AWS clients cannot take the connections kept for the resource
//! API.
//!
//! Each connection of these tests is one TLS stream carrying one HTTP/1.1 connection, so that
//! the connections the gateway counts are exactly those the test opened (a pooling client may
//! open a second connection while its first is on its way back to the pool).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use karri_testkit::{Etcd, Gateway, Tokens};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long a closed connection may take to be released by the gateway.
const DEADLINE: Duration = Duration::from_secs(20);

/// A TLS connector that trusts the gateway's CA.
fn tls(ca: &Path) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("reading the gateway's CA")? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One connection to a gateway listener, open while the value lives.
struct Conn {
    send: SendRequest<Empty<Bytes>>,
    host: String,
}

impl Conn {
    /// Connects to `addr` and completes TLS; fails when the gateway closes the connection on
    /// arrival.
    async fn open(tls: &TlsConnector, addr: SocketAddr) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        let stream = tls
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Ends, closing the connection, once `send` is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            send,
            host: addr.to_string(),
        })
    }

    async fn get(&mut self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
        let mut req = http::Request::get(path).header("host", &self.host);
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        // The previous exchange must be over before the next request goes out.
        self.send.ready().await?;
        let resp = self.send.send_request(req.body(Empty::new())?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        let (status, body) = self.get("/readyz", None).await?;
        ensure!(status == 200, "readyz answered {status}: {body}");
        Ok(())
    }

    /// The value of the metric `name` (no labels) in the gateway's `/metrics`.
    async fn metric(&mut self, token: &str, name: &str) -> anyhow::Result<f64> {
        let (status, text) = self.get("/metrics", Some(token)).await?;
        ensure!(status == 200, "/metrics answered {status}: {text}");
        let Some(value) = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        else {
            bail!("no {name} in /metrics:\n{text}");
        };
        value
            .trim()
            .parse()
            .with_context(|| format!("{name} = {value:?}"))
    }

    /// Waits until the gateway counts `n` open connections: one closed just before is
    /// released once the gateway has read its close.
    async fn until_open(&mut self, token: &str, n: f64) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let open = self.metric(token, "karri_gateway_connections").await?;
            if open == n {
                return Ok(());
            }
            ensure!(
                started.elapsed() < DEADLINE,
                "karri_gateway_connections = {open}, not {n}, after {DEADLINE:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_cap_is_closed_and_a_closed_one_makes_room() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gw = Gateway::start_with_args(&etcd.endpoint, &tokens, &["--max-connections", "2"]).await?;
    let tls = tls(&gw.ca_path())?;
    let addr: SocketAddr = format!("127.0.0.1:{}", gw.port).parse()?;

    // The first finds a permit whether or not the start-up's readiness check still holds one;
    // then only it is open.
    let mut first = Conn::open(&tls, addr).await?;
    first.ready().await?;
    first.until_open(&tokens.admin, 1.0).await?;
    let mut second = Conn::open(&tls, addr).await?;
    second.ready().await?;

    // Both permits are held by open connections: a third is closed on arrival.
    ensure!(
        Conn::open(&tls, addr).await.is_err(),
        "a third connection was served with a cap of 2"
    );
    // The open ones still work, and the gateway counted what it did.
    second.ready().await?;
    let open = first
        .metric(&tokens.admin, "karri_gateway_connections")
        .await?;
    let closed = first
        .metric(&tokens.admin, "karri_gateway_connections_refused_total")
        .await?;
    ensure!(
        open == 2.0,
        "karri_gateway_connections = {open}, expected 2"
    );
    ensure!(
        closed >= 1.0,
        "karri_gateway_connections_refused_total = {closed}, expected at least 1"
    );

    // Closing one makes room for the next.
    drop(second);
    first.until_open(&tokens.admin, 1.0).await?;
    Conn::open(&tls, addr).await?.ready().await?;
    first.ready().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_clients_filling_their_listener_leave_the_resource_api_its_own_connections(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    // The AWS listener on 127.0.0.2, an address no other test's gateway listens on: a free
    // port of 127.0.0.1 picked here could be taken by another test's gateway first.
    let aws: SocketAddr = std::net::TcpListener::bind("127.0.0.2:0")?.local_addr()?;
    // A cap of 8: two connections kept for --listen, six for the AWS listener.
    let gw = Gateway::start_with_args(
        &etcd.endpoint,
        &tokens,
        &[
            "--max-connections",
            "8",
            "--aws-listen",
            &aws.to_string(),
            "--tls-san",
            "127.0.0.2",
        ],
    )
    .await?;
    let tls = tls(&gw.ca_path())?;
    let resource: SocketAddr = format!("127.0.0.1:{}", gw.port).parse()?;

    // One of the resource API's two connections; the start-up's readiness check may hold the
    // other until the gateway has read its close.
    let mut control = Conn::open(&tls, resource).await?;
    control.ready().await?;
    control.until_open(&tokens.admin, 1.0).await?;

    // AWS clients take every connection of their listener; one more is closed on arrival.
    let mut aws_conns = Vec::new();
    for _ in 0..6 {
        let mut conn = Conn::open(&tls, aws).await?;
        conn.ready().await?;
        aws_conns.push(conn);
    }
    ensure!(
        Conn::open(&tls, aws).await.is_err(),
        "a seventh AWS connection was served with six for the AWS listener"
    );

    // The control plane still gets the second connection kept for it, and no more: the AWS
    // clients did not take it, nor it theirs.
    control.ready().await?;
    let mut second = Conn::open(&tls, resource).await?;
    second.ready().await?;
    ensure!(
        Conn::open(&tls, resource).await.is_err(),
        "a third resource API connection was served with two kept for it"
    );
    control.until_open(&tokens.admin, 8.0).await?;

    // An AWS connection that closes makes room on its own listener.
    drop(aws_conns.pop());
    control.until_open(&tokens.admin, 7.0).await?;
    Conn::open(&tls, aws).await?.ready().await?;
    Ok(())
}
