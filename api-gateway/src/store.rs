//! The etcd connection and the key layout of records and indexes.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// Prefix of every key Karri writes.
pub const KARRI_PREFIX: &str = "/karri/";
/// Where every record lives: `/karri/registry/<group>/<plural>/[<namespace>/]<name>`.
pub const REGISTRY_PREFIX: &str = "/karri/registry/";
/// EC2-style ID index: `/karri/index/ids/<id>` → record key.
pub const ID_INDEX_PREFIX: &str = "/karri/index/ids/";
/// Unique secondary keys (account IDs, access key IDs, key pair names, client tokens):
/// `/karri/index/unique/<what>/...` → record key.
pub const UNIQUE_INDEX_PREFIX: &str = "/karri/index/unique/";

/// How to reach etcd: a list of endpoints (one local member or a 3/5-member cluster),
/// optional TLS and optional authentication.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379` or three `https://` members.
    pub endpoints: Vec<String>,
    /// PEM CA bundle that signs the members' certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM client key for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// etcd user name (etcd's own authentication).
    pub username: Option<String>,
    /// etcd password.
    pub password: Option<String>,
}

/// Why etcd could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A client certificate was given without a key, or the reverse.
    #[error("an etcd client certificate needs both --etcd-cert and --etcd-key")]
    HalfIdentity,
    /// No endpoint was given.
    #[error("no etcd endpoint given")]
    NoEndpoints,
    /// The client failed to connect.
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// The cause.
        source: etcd_client::Error,
    },
}

fn read(path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::ReadFile {
        path: path.clone(),
        source,
    })
}

/// Connect to etcd with the configured endpoints, TLS and credentials.
pub async fn connect(config: &EtcdConfig) -> Result<Client, StoreError> {
    if config.endpoints.is_empty() {
        return Err(StoreError::NoEndpoints);
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    let uses_tls = config.endpoints.iter().any(|e| e.starts_with("https://"))
        || config.ca_file.is_some()
        || config.cert_file.is_some();
    if uses_tls {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err(StoreError::HalfIdentity),
        }
        options = options.with_tls(tls);
    }
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|source| StoreError::Connect {
            endpoints: config.endpoints.join(","),
            source,
        })
}

/// Whether an etcd error means the request never reached a member (connection refused or
/// reset before sending), so that sending it again, to another member, cannot apply it twice.
pub fn never_reached_etcd(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("tcp connect error")
        || text.contains("Connection refused")
        || text.contains("error trying to connect")
}

/// Largest etcd response the gateway reads (gRPC's default is 4 MiB): the watch cache's
/// list holds every record, and one transaction's watch event can carry a whole reservation.
pub const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// A KV client of `etcd` that reads responses up to [`MAX_RESPONSE_BYTES`].
pub fn kv(etcd: &Client) -> etcd_client::KvClient {
    etcd.kv_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// A watch client of `etcd` that reads responses up to [`MAX_RESPONSE_BYTES`].
pub fn watcher(etcd: &Client) -> etcd_client::WatchClient {
    etcd.watch_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// How long the gateway waits for etcd to answer one request. A stalled member (a stalled
/// disk, a partition: its connection open and silent) would otherwise hold every request that
/// reads or writes, and the client's reconnection to it can wait for ever; past this, the
/// request fails and its client hears that etcd is unavailable (503, `ServiceUnavailable`).
pub const ETCD_DEADLINE: Duration = Duration::from_secs(10);

/// `request`, failed with a timeout when etcd has not answered it within [`ETCD_DEADLINE`].
/// A write that times out may still have been applied: the error says the outcome is unknown,
/// and the request is not sent again.
pub async fn within_deadline<T>(
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(ETCD_DEADLINE, request).await {
        Ok(answer) => answer,
        Err(_) => Err(deadline_passed()),
    }
}

/// The error of a request etcd did not answer within [`ETCD_DEADLINE`].
pub fn deadline_passed() -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("etcd did not answer within {} s", ETCD_DEADLINE.as_secs()),
    ))
}

/// Whether `e` is [`deadline_passed`]'s.
pub fn is_deadline_passed(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::IoError(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// Run an etcd request within [`ETCD_DEADLINE`], sending it again (up to 8 times over about two
/// seconds) while it cannot reach a member: with one member of a cluster down, the client's
/// balancer may try the dead member first.
pub async fn retry_unreached<T, F, Fut>(mut op: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(20);
    // Boxed: an etcd client's request future is large (KiBs of gRPC state), and inline it would
    // make every future awaiting one as large, copied through each layer of the HTTP stack on
    // every request (a create's was about 38 KiB).
    for _ in 0..7 {
        match within_deadline(Box::pin(op())).await {
            Err(e) if never_reached_etcd(&e) => {
                tracing::debug!(error = %e, "etcd member unreachable; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
    within_deadline(Box::pin(op())).await
}

/// Key prefix of every record of one kind (all namespaces).
pub fn kind_prefix(plural: &str) -> String {
    format!("{REGISTRY_PREFIX}{}/{plural}/", crds::GROUP)
}

/// Key prefix of the records of one kind in one namespace.
pub fn namespace_prefix(plural: &str, namespace: &str) -> String {
    format!("{}{namespace}/", kind_prefix(plural))
}

/// The key of one record.
pub fn record_key(plural: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{}{name}", namespace_prefix(plural, ns)),
        None => format!("{}{name}", kind_prefix(plural)),
    }
}

/// The index key of an EC2-style ID.
pub fn id_key(id: &str) -> String {
    format!("{ID_INDEX_PREFIX}{id}")
}

/// The key of a unique secondary index entry; `parts` are joined with `/` (callers hex-encode
/// free text).
pub fn unique_key(parts: &[&str]) -> String {
    format!("{UNIQUE_INDEX_PREFIX}{}", parts.join("/"))
}

/// The plural of the kind a record key belongs to.
pub fn plural_of_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(REGISTRY_PREFIX)?;
    let rest = rest.strip_prefix(crds::GROUP)?.strip_prefix('/')?;
    rest.split('/').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_kubernetes_layout() {
        assert_eq!(
            record_key("instances", Some("acme"), "web"),
            "/karri/registry/karri.dev/instances/acme/web"
        );
        assert_eq!(
            record_key("nodes", None, "node-1"),
            "/karri/registry/karri.dev/nodes/node-1"
        );
        assert_eq!(
            plural_of_key("/karri/registry/karri.dev/instances/acme/web"),
            Some("instances")
        );
        assert_eq!(plural_of_key("/other/x"), None);
        assert_eq!(id_key("i-0123"), "/karri/index/ids/i-0123");
    }
}
