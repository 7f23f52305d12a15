//! The EC2 instance metadata service (IMDS) the node agent serves to the guests on its node at
//! `169.254.169.254:80`: a faithful subset of AWS's, enough for cloud-init's EC2 datasource and
//! the AWS SDKs.
//!
//! - The caller is identified only by the TCP peer address: an address that is not one of the
//!   [`Directory`]'s instances is refused (403), so an instance only ever sees its own data.
//! - IMDSv2: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..=21600`
//!   returns a session token bound to the instance that asked for it (its instance ID and
//!   address) and expiring after the TTL; a GET presenting it in `X-aws-ec2-metadata-token` is
//!   served, a GET presenting an invalid, expired or foreign token is refused (401). A token PUT
//!   carrying `X-Forwarded-For` is refused (403), and the token's response is sent with the
//!   instance's hop limit as its IP TTL, as AWS does, so that it does not travel further.
//! - IMDSv1: a GET without a token is served unless the instance requires tokens (401).
//! - An instance whose metadata endpoint is disabled is refused everything (403).
//!
//! Tokens are stateless: HMAC-SHA256 under a random per-process secret over the instance ID, its
//! address, the session it was issued in and the expiry, so they do not outlive the agent
//! process. A session begins each time an instance appears in the [`Directory`] (the agent
//! withdraws an instance before each start of its domain), so a token from before a stop and
//! start is refused, as on AWS.
//!
//! What is served for a path is the pure function [`answer`]; the HTTP layer only decides who
//! may ask.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::{Arc, PoisonError, RwLock};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use sha2::Sha256;
use tower::ServiceExt as _;
use tracing::{debug, info_span, warn};

/// What the metadata service knows of one instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceMetadata {
    /// The instance ID, e.g. `i-0123456789abcdef0`.
    pub instance_id: String,
    /// The image the instance was launched from, e.g. `ami-0123456789abcdef0`.
    pub image_id: String,
    /// The instance type, e.g. `t3.micro`.
    pub instance_type: String,
    /// The owner's account ID (twelve digits).
    pub account_id: String,
    /// The region, e.g. `karri-1`.
    pub region: String,
    /// The availability zone, e.g. `karri-1a`.
    pub availability_zone: String,
    /// The private IPv4 address, by which the instance is recognised when it calls.
    pub local_ipv4: Ipv4Addr,
    /// The MAC address of the primary interface, lower case: `02:00:ac:1f:00:05`.
    pub mac: String,
    /// The private DNS name: `ip-172-31-0-5.karri-1.compute.internal`.
    pub hostname: String,
    /// The reservation ID, e.g. `r-0123456789abcdef0`.
    pub reservation_id: String,
    /// The instance's place among those its RunInstances launched (0 for the first).
    pub launch_index: u32,
    /// The kernel image, if the instance was launched with one.
    pub kernel_id: Option<String>,
    /// The RAM disk image, if the instance was launched with one.
    pub ramdisk_id: Option<String>,
    /// The public keys: key name and OpenSSH public key line.
    pub public_keys: Vec<(String, String)>,
    /// The user data, raw (already base64-decoded), if any.
    pub user_data: Option<Vec<u8>>,
    /// When the instance was launched, RFC 3339.
    pub launch_time: String,
    /// The names of the instance's security groups.
    pub security_groups: Vec<String>,
    /// The CIDR block of the instance's subnet, e.g. `172.31.0.0/20`.
    pub subnet_cidr: String,
    /// Whether IMDSv2 is required (`HttpTokens: required`): a GET without a token is refused.
    pub http_tokens_required: bool,
    /// Whether the metadata endpoint is enabled (`HttpEndpoint: enabled`).
    pub http_endpoint_enabled: bool,
    /// The IP TTL of the token's response (`HttpPutResponseHopLimit`, 1 to 64).
    pub hop_limit: u8,
    /// The instance's tags, key and value, when it serves them (`InstanceMetadataTags:
    /// enabled`) under `meta-data/tags/instance/`.
    pub tags: Option<Vec<(String, String)>>,
}

/// An instance as the [`Directory`] publishes it: its metadata and the session its tokens are
/// bound to. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Published {
    /// What is served to the instance.
    pub metadata: Arc<InstanceMetadata>,
    /// Drawn at random when the instance appears at its address, kept while it stays there.
    session: u64,
}

/// The instances of this node by private address; cheap to clone, shared with the agent.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    instances: Arc<RwLock<HashMap<Ipv4Addr, Published>>>,
}

impl Directory {
    /// Records an instance under its private address, replacing what held that address. An
    /// instance already there keeps its session (its tokens stay good); one that was not there
    /// (new, or started again after a stop withdrew it) begins a new one.
    pub fn set(&self, md: InstanceMetadata) {
        let mut instances = self.write();
        let session = instances
            .get(&md.local_ipv4)
            .filter(|p| p.metadata.instance_id == md.instance_id)
            .map_or_else(rand::random, |p| p.session);
        instances.insert(
            md.local_ipv4,
            Published {
                metadata: Arc::new(md),
                session,
            },
        );
    }

    /// Forgets the instance `instance_id` at an address; another instance given that address
    /// since stays.
    pub fn remove(&self, ip: Ipv4Addr, instance_id: &str) {
        let mut instances = self.write();
        if instances
            .get(&ip)
            .is_some_and(|p| p.metadata.instance_id == instance_id)
        {
            instances.remove(&ip);
        }
    }

    /// Keeps only the instances for which `keep` holds.
    pub fn retain(&self, keep: impl Fn(&InstanceMetadata) -> bool) {
        self.write().retain(|_, p| keep(&p.metadata));
    }

    /// The instance at an address.
    pub fn get(&self, ip: Ipv4Addr) -> Option<Published> {
        self.read().get(&ip).cloned()
    }

    /// How many instances are recorded.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no instance is recorded.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    // A panic while holding the lock cannot leave the map half-updated (every write is one
    // HashMap call), so a poisoned lock is still good to use.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Ipv4Addr, Published>> {
        self.instances
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Ipv4Addr, Published>> {
        self.instances
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The longest TTL a session token may be asked for, in seconds (six hours, as on AWS).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21_600;

/// The path of the IMDSv2 token request.
const TOKEN_PATH: &str = "/latest/api/token";
/// The header carrying a session token on a GET.
const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token");
/// The header carrying a token's TTL: asked for on the PUT, remaining on a GET's answer.
const TTL_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");
/// A token request carrying this header came through a proxy and is refused.
const FORWARDED_HEADER: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Bytes of a token: the expiry (seconds since the epoch, big-endian) then the HMAC tag.
const TOKEN_LEN: usize = 8 + 32;
/// Pause after a failed accept (out of descriptors, say) before the next.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a session token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is not of the shape this service issues.
    #[error("the token is malformed")]
    Malformed,
    /// The token was issued to another instance, by another process, or was altered.
    #[error("the token was not issued to this instance")]
    NotIssuedToCaller,
    /// The token's TTL has run out.
    #[error("the token has expired")]
    Expired,
}

/// IMDSv2 session tokens: stateless, HMAC-SHA256 under a random per-process secret over the
/// instance's ID, address and session and the token's expiry. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    key: Arc<[u8; 32]>,
    clock: Clock,
}

impl Tokens {
    /// Tokens under a fresh random secret, on the system clock.
    pub fn new() -> Self {
        Self {
            key: Arc::new(rand::random()),
            clock: Clock::System,
        }
    }

    /// A token for the instance `p`, valid for `ttl_seconds` while its session lasts.
    pub fn issue(&self, p: &Published, ttl_seconds: u32) -> String {
        let expiry = self.clock.now().saturating_add(u64::from(ttl_seconds));
        let mut bytes = Vec::with_capacity(TOKEN_LEN);
        bytes.extend_from_slice(&expiry.to_be_bytes());
        bytes.extend_from_slice(&self.tag(p, expiry).finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Checks that `token` was issued to the instance `p` in its current session and has not
    /// expired; its remaining seconds.
    pub fn verify(&self, p: &Published, token: &str) -> Result<u64, TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| TokenError::Malformed)?;
        if bytes.len() != TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (expiry, tag) = bytes.split_at(8);
        let expiry = u64::from_be_bytes(expiry.try_into().expect("split at 8 bytes"));
        self.tag(p, expiry)
            .verify_slice(tag)
            .map_err(|_| TokenError::NotIssuedToCaller)?;
        let now = self.clock.now();
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(expiry - now)
    }

    fn tag(&self, p: &Published, expiry: u64) -> Hmac<Sha256> {
        let md = &p.metadata;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key[..])
            .expect("HMAC accepts keys of any length");
        mac.update(b"karri-imds-token-v2");
        // Length-prefixed, so that no two (ID, address) pairs are signed alike.
        mac.update(&(md.instance_id.len() as u64).to_be_bytes());
        mac.update(md.instance_id.as_bytes());
        mac.update(&md.local_ipv4.octets());
        mac.update(&p.session.to_be_bytes());
        mac.update(&expiry.to_be_bytes());
        mac
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

/// The clock of token expiry, in whole seconds since the epoch.
#[derive(Clone)]
enum Clock {
    System,
    #[cfg(test)]
    Manual(Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    fn now(&self) -> u64 {
        match self {
            Self::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs()),
            #[cfg(test)]
            Self::Manual(now) => now.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

/// What the service answers for a path: a body and its content type.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// A value or a directory listing, `text/plain`.
    Text(String),
    /// The instance identity document, `application/json`.
    Json(String),
    /// The user data, raw, `application/octet-stream`.
    Bytes(Vec<u8>),
}

impl Answer {
    fn content_type(&self) -> &'static str {
        match self {
            Self::Text(_) => "text/plain",
            Self::Json(_) => "application/json",
            Self::Bytes(_) => "application/octet-stream",
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Text(text) | Self::Json(text) => text.len(),
            Self::Bytes(bytes) => bytes.len(),
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let content_type = [(CONTENT_TYPE, self.content_type())];
        match self {
            Self::Text(text) | Self::Json(text) => (content_type, text).into_response(),
            Self::Bytes(bytes) => (content_type, bytes).into_response(),
        }
    }
}

/// The metadata versions `GET /` lists; every one is served as `latest`.
const VERSIONS: [&str; 27] = [
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-01",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
];

/// The device the root disk is attached as (see [`crate::domain`]).
const ROOT_DEVICE: &str = "/dev/vda";

/// What `md`'s instance is answered for a GET of `path` (the URI path, without the query), or
/// `None` when there is nothing there (404).
///
/// A directory answers with its listing, one name a line, sub-directories with a trailing
/// `/`, with or without a trailing `/` in the path; a value answers only without one.
pub fn answer(md: &InstanceMetadata, path: &str) -> Option<Answer> {
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        let versions: Vec<&str> = VERSIONS.iter().copied().chain(["latest"]).collect();
        return Some(Answer::Text(versions.join("\n")));
    }
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    if version != "latest" && !VERSIONS.contains(&version) {
        return None;
    }
    let (rest, trailing_slash) = match rest.strip_suffix('/') {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let mut node = tree(md);
    if !rest.is_empty() {
        for segment in rest.split('/') {
            node = match node {
                Node::Dir(entries) => entries.into_iter().find(|e| e.name == segment)?.node,
                Node::Leaf(_) => return None,
            };
        }
    }
    match node {
        Node::Dir(entries) => Some(Answer::Text(listing(&entries))),
        Node::Leaf(_) if trailing_slash => None,
        Node::Leaf(answer) => Some(answer),
    }
}

/// One node of the metadata tree.
enum Node {
    Dir(Vec<Entry>),
    Leaf(Answer),
}

/// A named node in a directory; `label` replaces the name in the listing (`0=my-key`).
struct Entry {
    name: String,
    label: Option<String>,
    node: Node,
}

fn value(name: &str, text: impl Into<String>) -> Entry {
    Entry {
        name: name.to_owned(),
        label: None,
        node: Node::Leaf(Answer::Text(text.into())),
    }
}

fn dir(name: &str, entries: Vec<Entry>) -> Entry {
    Entry {
        name: name.to_owned(),
        label: None,
        node: Node::Dir(entries),
    }
}

fn listing(entries: &[Entry]) -> String {
    let names: Vec<String> = entries
        .iter()
        .map(|entry| match (&entry.label, &entry.node) {
            (Some(label), _) => label.clone(),
            (None, Node::Dir(_)) => format!("{}/", entry.name),
            (None, Node::Leaf(_)) => entry.name.clone(),
        })
        .collect();
    names.join("\n")
}

/// The whole tree under a version, e.g. `/latest/`.
fn tree(md: &InstanceMetadata) -> Node {
    let mut top = vec![
        dir(
            "dynamic",
            vec![dir(
                "instance-identity",
                vec![Entry {
                    name: "document".to_owned(),
                    label: None,
                    node: Node::Leaf(Answer::Json(identity_document(md))),
                }],
            )],
        ),
        dir("meta-data", meta_data(md)),
    ];
    if let Some(user_data) = &md.user_data {
        top.push(Entry {
            name: "user-data".to_owned(),
            label: None,
            node: Node::Leaf(Answer::Bytes(user_data.clone())),
        });
    }
    Node::Dir(top)
}

/// The `meta-data/` directory, in AWS's (alphabetical) order.
fn meta_data(md: &InstanceMetadata) -> Vec<Entry> {
    let local_ipv4 = md.local_ipv4.to_string();
    let security_groups = md.security_groups.join("\n");
    let mut entries = vec![
        value("ami-id", &md.image_id),
        value("ami-launch-index", md.launch_index.to_string()),
        value("ami-manifest-path", "(unknown)"),
        dir(
            "block-device-mapping",
            vec![value("ami", ROOT_DEVICE), value("root", ROOT_DEVICE)],
        ),
        value("hostname", &md.hostname),
        value("instance-action", "none"),
        value("instance-id", &md.instance_id),
        value("instance-life-cycle", "on-demand"),
        value("instance-type", &md.instance_type),
    ];
    if let Some(kernel_id) = &md.kernel_id {
        entries.push(value("kernel-id", kernel_id));
    }
    entries.extend([
        value("local-hostname", &md.hostname),
        value("local-ipv4", &local_ipv4),
        value("mac", &md.mac),
        dir(
            "network",
            vec![dir(
                "interfaces",
                vec![dir(
                    "macs",
                    vec![dir(
                        &md.mac,
                        vec![
                            value("device-number", "0"),
                            value("local-hostname", &md.hostname),
                            value("local-ipv4s", &local_ipv4),
                            value("mac", &md.mac),
                            value("owner-id", &md.account_id),
                            value("security-groups", &security_groups),
                            value("subnet-ipv4-cidr-block", &md.subnet_cidr),
                        ],
                    )],
                )],
            )],
        ),
        dir(
            "placement",
            vec![
                value("availability-zone", &md.availability_zone),
                value("region", &md.region),
            ],
        ),
        value("profile", "default-hvm"),
    ]);
    if !md.public_keys.is_empty() {
        let keys = md
            .public_keys
            .iter()
            .enumerate()
            .map(|(index, (name, key))| Entry {
                name: index.to_string(),
                label: Some(format!("{index}={name}")),
                node: Node::Dir(vec![value("openssh-key", key)]),
            })
            .collect();
        entries.push(dir("public-keys", keys));
    }
    if let Some(ramdisk_id) = &md.ramdisk_id {
        entries.push(value("ramdisk-id", ramdisk_id));
    }
    entries.extend([
        value("reservation-id", &md.reservation_id),
        value("security-groups", security_groups),
        dir(
            "services",
            vec![value("domain", "amazonaws.com"), value("partition", "aws")],
        ),
    ]);
    if let Some(tags) = &md.tags {
        // A key is a path segment and a line of the listing here: one with a slash or
        // whitespace (which EC2 refuses when tags are served), a control character, or none
        // at all cannot be one.
        let mut keys: Vec<&(String, String)> = tags
            .iter()
            .filter(|(k, _)| {
                !k.is_empty()
                    && !k.contains('/')
                    && !k.chars().any(|c| c.is_whitespace() || c.is_control())
                    && k != "."
                    && k != ".."
            })
            .collect();
        keys.sort();
        let instance = keys.into_iter().map(|(k, v)| value(k, v)).collect();
        entries.push(dir("tags", vec![dir("instance", instance)]));
    }
    entries
}

/// The instance identity document, in AWS's shape.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IdentityDocument<'a> {
    account_id: &'a str,
    architecture: &'a str,
    availability_zone: &'a str,
    billing_products: Option<Vec<String>>,
    devpay_product_codes: Option<Vec<String>>,
    marketplace_product_codes: Option<Vec<String>>,
    image_id: &'a str,
    instance_id: &'a str,
    instance_type: &'a str,
    kernel_id: Option<&'a str>,
    pending_time: String,
    private_ip: String,
    ramdisk_id: Option<&'a str>,
    region: &'a str,
    version: &'a str,
}

fn identity_document(md: &InstanceMetadata) -> String {
    // AWS writes the launch time as `2016-11-19T16:32:11Z`; any other RFC 3339 form is
    // normalised to it, and a time that does not parse is passed through.
    let pending_time = chrono::DateTime::parse_from_rfc3339(&md.launch_time).map_or_else(
        |_| md.launch_time.clone(),
        |time| {
            time.with_timezone(&chrono::Utc)
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        },
    );
    let document = IdentityDocument {
        account_id: &md.account_id,
        architecture: "x86_64",
        availability_zone: &md.availability_zone,
        billing_products: None,
        devpay_product_codes: None,
        marketplace_product_codes: None,
        image_id: &md.image_id,
        instance_id: &md.instance_id,
        instance_type: &md.instance_type,
        kernel_id: md.kernel_id.as_deref(),
        pending_time,
        private_ip: md.local_ipv4.to_string(),
        ramdisk_id: md.ramdisk_id.as_deref(),
        region: &md.region,
        version: "2017-09-30",
    };
    serde_json::to_string_pretty(&document).expect("a struct of strings serialises")
}

/// Why a request was not answered; each maps to the status AWS gives.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0} is not an instance of this node")]
    UnknownCaller(IpAddr),
    #[error("the metadata endpoint of {0} is disabled")]
    EndpointDisabled(String),
    #[error("{0} requires a session token")]
    TokenRequired(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("a token request carried X-Forwarded-For")]
    Forwarded,
    #[error("missing or invalid token TTL (1 to 21600 seconds)")]
    BadTtl,
    #[error("method not allowed here; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("nothing at this path")]
    NotFound,
    #[error("the token's response cannot be limited to the instance's hop limit: {0}")]
    HopLimit(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::UnknownCaller(_) | Self::EndpointDisabled(_) | Self::Forwarded => {
                StatusCode::FORBIDDEN
            }
            Self::TokenRequired(_) | Self::Token(_) => StatusCode::UNAUTHORIZED,
            Self::BadTtl => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::HopLimit(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = self.status();
        let title = format!(
            "{} - {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default()
        );
        let page = format!(
            "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
             <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
             \t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
             <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
             <head>\n  <title>{title}</title>\n </head>\n \
             <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
        );
        let mut response = (status, [(CONTENT_TYPE, "text/html")], page).into_response();
        if let Self::MethodNotAllowed { allow } = self {
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// The shared state of the router.
#[derive(Clone)]
struct Service {
    directory: Directory,
    tokens: Tokens,
}

/// The metadata service as an axum router; it expects `ConnectInfo<SocketAddr>` (the caller),
/// e.g. from `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(directory: Directory, tokens: Tokens) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(Service { directory, tokens })
}

/// Serves the metadata service on `listener` until the future is dropped.
///
/// Unlike a bare [`router`], this sends each token's response with the instance's hop limit
/// as its IP TTL, and answers clients that half-close their side once the request is sent (as
/// `nc` does): HTTP/1 only, as EC2's metadata service.
pub async fn serve(
    listener: tokio::net::TcpListener,
    directory: Directory,
    tokens: Tokens,
) -> io::Result<()> {
    serve_with(listener, directory, tokens, Limits::default()).await
}

/// What one guest may hold of the metadata service.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A connection that sends no complete request head for this long is closed (idle
    /// keep-alive connections included).
    pub idle: std::time::Duration,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections one caller (source address) may hold at once, so that one guest cannot take
    /// every connection from the others.
    pub per_caller: usize,
    /// The largest request head read, in bytes (at least 8 KiB, hyper's read buffer).
    pub max_head: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle: std::time::Duration::from_secs(10),
            max_connections: 512,
            per_caller: 16,
            max_head: 16 * 1024,
        }
    }
}

/// The connections each caller holds, for [`Limits::per_caller`].
#[derive(Clone, Default)]
struct Callers(Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>);

/// One caller's connection; dropping it gives the place back.
struct CallerSlot {
    callers: Callers,
    ip: IpAddr,
}

impl Callers {
    fn enter(&self, ip: IpAddr, limit: usize) -> Option<CallerSlot> {
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(ip).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(CallerSlot {
            callers: self.clone(),
            ip,
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut held = self
            .callers
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// [`serve`] with other [`Limits`]: guests could otherwise hold idle connections until the
/// agent, which also holds its libvirt and gateway connections, runs out of descriptors.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    directory: Directory,
    tokens: Tokens,
    limits: Limits,
) -> io::Result<()> {
    let app = router(directory, tokens);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let callers = Callers::default();
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(%error, "cannot accept a metadata connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(mine) = callers.enter(addr.ip().to_canonical(), limits.per_caller) else {
            debug!(%addr, "this caller holds too many metadata connections; closing this one");
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%addr, "too many metadata connections; closing this one");
            drop(stream);
            continue;
        };
        // Without it no token could be sent with its hop limit: refuse the connection instead.
        let socket = match PeerSocket::of(&stream) {
            Ok(socket) => Some(socket),
            Err(error) => {
                warn!(%error, %addr, "cannot hold the connection's socket; closing it");
                drop(stream);
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(addr));
                if let Some(socket) = &socket {
                    request.extensions_mut().insert(socket.clone());
                }
                app.clone().oneshot(request)
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.half_close(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.idle)
                // hyper refuses (panics on) less than its 8 KiB read buffer.
                .max_buf_size(limits.max_head.max(8192));
            if let Err(error) = http.serve_connection(TokioIo::new(stream), service).await {
                debug!(%error, %addr, "metadata connection ended with an error");
            }
            drop(slot);
            drop(mine);
        });
    }
}

async fn handle(
    State(service): State<Service>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    socket: Option<Extension<PeerSocket>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let span = info_span!("imds", caller = %peer.ip(), %method, path = uri.path());
    span.in_scope(|| {
        let socket = socket.as_ref().map(|Extension(socket)| socket);
        match respond(&service, peer, &method, uri.path(), &headers, socket) {
            Ok(response) => {
                debug!(status = response.status().as_u16(), "answered");
                response
            }
            Err(refusal) => {
                debug!(status = refusal.status().as_u16(), %refusal, "refused");
                refusal.into_response()
            }
        }
    })
}

/// The caller's IPv4 address, also when it arrives mapped into IPv6 on a dual-stack socket.
fn caller_ipv4(peer: SocketAddr) -> Option<Ipv4Addr> {
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

fn respond(
    service: &Service,
    peer: SocketAddr,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    socket: Option<&PeerSocket>,
) -> Result<Response, Refusal> {
    let published = caller_ipv4(peer)
        .and_then(|ip| service.directory.get(ip))
        .ok_or(Refusal::UnknownCaller(peer.ip()))?;
    let md = &published.metadata;
    if !md.http_endpoint_enabled {
        return Err(Refusal::EndpointDisabled(md.instance_id.clone()));
    }
    if path == TOKEN_PATH {
        if method != Method::PUT {
            return Err(Refusal::MethodNotAllowed { allow: "PUT" });
        }
        return issue_token(service, &published, headers, socket);
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(Refusal::MethodNotAllowed { allow: "GET, HEAD" });
    }
    let remaining = match headers.get(TOKEN_HEADER) {
        Some(token) => {
            let token = token.to_str().map_err(|_| TokenError::Malformed)?;
            Some(service.tokens.verify(&published, token)?)
        }
        None if md.http_tokens_required => {
            return Err(Refusal::TokenRequired(md.instance_id.clone()))
        }
        None => None,
    };
    let answer = answer(md, path).ok_or(Refusal::NotFound)?;
    let len = answer.len();
    let mut response = answer.into_response();
    if let Some(remaining) = remaining {
        response.headers_mut().insert(TTL_HEADER, remaining.into());
    }
    if method == Method::HEAD {
        response.headers_mut().insert(CONTENT_LENGTH, len.into());
        *response.body_mut() = Body::empty();
    }
    Ok(response)
}

fn issue_token(
    service: &Service,
    published: &Published,
    headers: &HeaderMap,
    socket: Option<&PeerSocket>,
) -> Result<Response, Refusal> {
    if headers.contains_key(FORWARDED_HEADER) {
        return Err(Refusal::Forwarded);
    }
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|ttl| ttl.to_str().ok())
        .and_then(|ttl| ttl.trim().parse::<u32>().ok())
        .filter(|ttl| (1..=MAX_TOKEN_TTL_SECONDS).contains(ttl))
        .ok_or(Refusal::BadTtl)?;
    if let Some(socket) = socket {
        // No token leaves without its hop limit: it must not reach past the instance.
        socket
            .limit_hops(published.metadata.hop_limit)
            .map_err(|error| Refusal::HopLimit(error.to_string()))?;
    }
    let token = service.tokens.issue(published, ttl);
    let mut response = ([(CONTENT_TYPE, "text/plain")], [(TTL_HEADER, ttl)], token).into_response();
    // The TTL stays on the socket: the connection ends with this response, so that later
    // answers on it do not go out with the token's hop limit.
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        HeaderValue::from_static("close"),
    );
    Ok(response)
}

/// A handle on an accepted connection's socket (a duplicate descriptor), to set its IP TTL.
#[derive(Clone, Debug)]
struct PeerSocket(Arc<std::net::TcpStream>);

impl PeerSocket {
    fn of(stream: &tokio::net::TcpStream) -> io::Result<Self> {
        let fd = stream.as_fd().try_clone_to_owned()?;
        Ok(Self(Arc::new(std::net::TcpStream::from(fd))))
    }

    /// Sends what follows on the connection with `hops` as its IP TTL (at least 1).
    fn limit_hops(&self, hops: u8) -> io::Result<()> {
        self.0.set_ttl(u32::from(hops.max(1)))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;
    use std::sync::atomic::{AtomicU64, Ordering};

    use axum::http::Request as HttpRequest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE8z laptop";

    fn sample() -> InstanceMetadata {
        InstanceMetadata {
            instance_id: "i-0123456789abcdef0".into(),
            image_id: "ami-0abcdef1234567890".into(),
            instance_type: "t3.micro".into(),
            account_id: "123456789012".into(),
            region: "karri-1".into(),
            availability_zone: "karri-1a".into(),
            local_ipv4: Ipv4Addr::new(172, 31, 0, 5),
            mac: "02:00:ac:1f:00:05".into(),
            hostname: "ip-172-31-0-5.karri-1.compute.internal".into(),
            reservation_id: "r-0fedcba9876543210".into(),
            launch_index: 2,
            kernel_id: None,
            ramdisk_id: None,
            public_keys: vec![("laptop".into(), KEY.into())],
            user_data: Some(b"#cloud-config\npackages: [nginx]\n".to_vec()),
            launch_time: "2026-01-02T03:04:05+00:00".into(),
            security_groups: vec!["default".into(), "web".into()],
            subnet_cidr: "172.31.0.0/20".into(),
            http_tokens_required: false,
            http_endpoint_enabled: true,
            hop_limit: 1,
            tags: None,
        }
    }

    fn other() -> InstanceMetadata {
        InstanceMetadata {
            instance_id: "i-0aaaaaaaaaaaaaaaa".into(),
            local_ipv4: Ipv4Addr::new(172, 31, 0, 6),
            mac: "02:00:ac:1f:00:06".into(),
            hostname: "ip-172-31-0-6.karri-1.compute.internal".into(),
            ..sample()
        }
    }

    fn text(body: &str) -> Option<Answer> {
        Some(Answer::Text(body.to_owned()))
    }

    // --- the pure tree ---

    #[test]
    fn every_value_is_served_at_its_aws_path() {
        let md = sample();
        let cases = [
            ("ami-id", "ami-0abcdef1234567890"),
            ("ami-launch-index", "2"),
            ("ami-manifest-path", "(unknown)"),
            ("block-device-mapping/ami", "/dev/vda"),
            ("block-device-mapping/root", "/dev/vda"),
            ("hostname", "ip-172-31-0-5.karri-1.compute.internal"),
            ("instance-action", "none"),
            ("instance-id", "i-0123456789abcdef0"),
            ("instance-life-cycle", "on-demand"),
            ("instance-type", "t3.micro"),
            ("local-hostname", "ip-172-31-0-5.karri-1.compute.internal"),
            ("local-ipv4", "172.31.0.5"),
            ("mac", "02:00:ac:1f:00:05"),
            (
                "network/interfaces/macs/02:00:ac:1f:00:05/device-number",
                "0",
            ),
            (
                "network/interfaces/macs/02:00:ac:1f:00:05/local-hostname",
                "ip-172-31-0-5.karri-1.compute.internal",
            ),
            (
                "network/interfaces/macs/02:00:ac:1f:00:05/local-ipv4s",
                "172.31.0.5",
            ),
            (
                "network/interfaces/macs/02:00:ac:1f:00:05/mac",
                "02:00:ac:1f:00:05",
            ),
            (
                "network/interfaces/macs/02:00:ac:1f:00:05/owner-id",
                "123456789012",
            ),
            (
                "network/interfaces/macs/02:00:ac:1f:00:05/security-groups",
                "default\nweb",
            ),
            (
                "network/interfaces/macs/02:00:ac:1f:00:05/subnet-ipv4-cidr-block",
                "172.31.0.0/20",
            ),
            ("placement/availability-zone", "karri-1a"),
            ("placement/region", "karri-1"),
            ("profile", "default-hvm"),
            ("public-keys/0/openssh-key", KEY),
            ("reservation-id", "r-0fedcba9876543210"),
            ("security-groups", "default\nweb"),
            ("services/domain", "amazonaws.com"),
            ("services/partition", "aws"),
        ];
        for (path, want) in cases {
            let path = format!("/latest/meta-data/{path}");
            assert_eq!(answer(&md, &path), text(want), "{path}");
        }
    }

    #[test]
    fn directories_list_their_entries_one_a_line_with_sub_directories_slashed() {
        let md = sample();
        let cases = [
            (
                "/latest/meta-data/",
                "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\n\
                 instance-action\ninstance-id\ninstance-life-cycle\ninstance-type\n\
                 local-hostname\nlocal-ipv4\nmac\nnetwork/\nplacement/\nprofile\npublic-keys/\n\
                 reservation-id\nsecurity-groups\nservices/",
            ),
            ("/latest/", "dynamic/\nmeta-data/\nuser-data"),
            ("/latest/meta-data/block-device-mapping/", "ami\nroot"),
            ("/latest/meta-data/network/", "interfaces/"),
            ("/latest/meta-data/network/interfaces/", "macs/"),
            (
                "/latest/meta-data/network/interfaces/macs/",
                "02:00:ac:1f:00:05/",
            ),
            (
                "/latest/meta-data/network/interfaces/macs/02:00:ac:1f:00:05/",
                "device-number\nlocal-hostname\nlocal-ipv4s\nmac\nowner-id\nsecurity-groups\n\
                 subnet-ipv4-cidr-block",
            ),
            ("/latest/meta-data/placement/", "availability-zone\nregion"),
            ("/latest/meta-data/public-keys/", "0=laptop"),
            ("/latest/meta-data/public-keys/0/", "openssh-key"),
            ("/latest/meta-data/services/", "domain\npartition"),
            ("/latest/dynamic/", "instance-identity/"),
            ("/latest/dynamic/instance-identity/", "document"),
        ];
        for (path, want) in cases {
            assert_eq!(answer(&md, path), text(want), "{path}");
        }
    }

    #[test]
    fn the_instances_tags_are_served_only_when_it_asked_for_them() {
        let mut md = sample();
        assert_eq!(answer(&md, "/latest/meta-data/tags/instance/"), None);
        md.tags = Some(vec![
            ("Name".into(), "web".into()),
            ("env".into(), "prod".into()),
            ("a/b".into(), "no path has it".into()),
            ("two\nlines".into(), "no listing line has it".into()),
            ("a key".into(), "nor one with a space".into()),
            ("empty".into(), String::new()),
        ]);
        let listing = answer(&md, "/latest/meta-data/");
        assert!(
            matches!(&listing, Some(Answer::Text(t)) if t.ends_with("services/\ntags/")),
            "{listing:?}"
        );
        let cases = [
            ("/latest/meta-data/tags/", "instance/"),
            ("/latest/meta-data/tags/instance/", "Name\nempty\nenv"),
            ("/latest/meta-data/tags/instance/Name", "web"),
            ("/latest/meta-data/tags/instance/env", "prod"),
            ("/latest/meta-data/tags/instance/empty", ""),
        ];
        for (path, want) in cases {
            assert_eq!(answer(&md, path), text(want), "{path}");
        }
        assert_eq!(answer(&md, "/latest/meta-data/tags/instance/Missing"), None);
    }

    #[test]
    fn a_directory_is_listed_with_or_without_its_trailing_slash() {
        let md = sample();
        for path in [
            "/latest",
            "/latest/meta-data",
            "/latest/meta-data/placement",
        ] {
            assert_eq!(
                answer(&md, path),
                answer(&md, &format!("{path}/")),
                "{path}"
            );
        }
    }

    #[test]
    fn the_root_lists_every_version_and_latest() {
        let Some(Answer::Text(versions)) = answer(&sample(), "/") else {
            panic!("the root is a listing");
        };
        let versions: Vec<&str> = versions.lines().collect();
        assert_eq!(versions.first(), Some(&"1.0"));
        assert_eq!(versions.last(), Some(&"latest"));
        for version in ["2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23"] {
            assert!(versions.contains(&version), "{version}");
        }
    }

    #[test]
    fn a_dated_version_is_served_as_latest() {
        let md = sample();
        for version in ["2009-04-04", "2021-03-23", "1.0"] {
            let path = format!("/{version}/meta-data/instance-id");
            assert_eq!(answer(&md, &path), text("i-0123456789abcdef0"), "{path}");
        }
    }

    #[test]
    fn optional_entries_appear_only_when_the_instance_has_them() {
        let bare = InstanceMetadata {
            public_keys: vec![],
            user_data: None,
            ..sample()
        };
        let Some(Answer::Text(listing)) = answer(&bare, "/latest/meta-data/") else {
            panic!("meta-data is a listing");
        };
        for absent in ["kernel-id", "ramdisk-id", "public-keys/"] {
            assert!(!listing.lines().any(|l| l == absent), "{absent}");
        }
        assert_eq!(answer(&bare, "/latest/"), text("dynamic/\nmeta-data/"));
        for path in [
            "/latest/user-data",
            "/latest/meta-data/public-keys/",
            "/latest/meta-data/kernel-id",
            "/latest/meta-data/ramdisk-id",
        ] {
            assert_eq!(answer(&bare, path), None, "{path}");
        }

        let full = InstanceMetadata {
            kernel_id: Some("aki-0123".into()),
            ramdisk_id: Some("ari-0456".into()),
            ..sample()
        };
        assert_eq!(
            answer(&full, "/latest/meta-data/kernel-id"),
            text("aki-0123")
        );
        assert_eq!(
            answer(&full, "/latest/meta-data/ramdisk-id"),
            text("ari-0456")
        );
        let Some(Answer::Text(listing)) = answer(&full, "/latest/meta-data/") else {
            panic!("meta-data is a listing");
        };
        let lines: Vec<&str> = listing.lines().collect();
        assert!(lines.contains(&"kernel-id") && lines.contains(&"ramdisk-id"));
    }

    #[test]
    fn every_public_key_is_listed_by_index_and_name() {
        let md = InstanceMetadata {
            public_keys: vec![
                ("laptop".into(), KEY.into()),
                ("ci".into(), "ssh-rsa AAAAB3 ci".into()),
            ],
            ..sample()
        };
        assert_eq!(
            answer(&md, "/latest/meta-data/public-keys/"),
            text("0=laptop\n1=ci")
        );
        assert_eq!(
            answer(&md, "/latest/meta-data/public-keys/1/openssh-key"),
            text("ssh-rsa AAAAB3 ci")
        );
        assert_eq!(answer(&md, "/latest/meta-data/public-keys/2/"), None);
    }

    #[test]
    fn user_data_is_served_raw() {
        let md = InstanceMetadata {
            user_data: Some(vec![0x1f, 0x8b, 0x00, 0xff]),
            ..sample()
        };
        assert_eq!(
            answer(&md, "/latest/user-data"),
            Some(Answer::Bytes(vec![0x1f, 0x8b, 0x00, 0xff]))
        );
    }

    #[test]
    fn paths_with_nothing_there_are_not_found() {
        let md = sample();
        for path in [
            "",
            "/nope",
            "/2099-01-01/meta-data/",
            "/latest/meta-data/nope",
            "/latest/meta-data/instance-id/",
            "/latest/meta-data/instance-id/x",
            "/latest/meta-data//instance-id",
            "/latest/meta-data/public-keys/0=laptop",
            "/latest/meta-data/network/interfaces/macs/02:00:ac:1f:00:06/",
            "/latest/user-data/",
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/api/token",
        ] {
            assert_eq!(answer(&md, path), None, "{path:?}");
        }
    }

    #[test]
    fn the_identity_document_has_aws_shape() {
        let Some(Answer::Json(document)) =
            answer(&sample(), "/latest/dynamic/instance-identity/document")
        else {
            panic!("the document is JSON");
        };
        let document: serde_json::Value =
            serde_json::from_str(&document).expect("the document parses");
        assert_eq!(
            document,
            serde_json::json!({
                "accountId": "123456789012",
                "architecture": "x86_64",
                "availabilityZone": "karri-1a",
                "billingProducts": null,
                "devpayProductCodes": null,
                "marketplaceProductCodes": null,
                "imageId": "ami-0abcdef1234567890",
                "instanceId": "i-0123456789abcdef0",
                "instanceType": "t3.micro",
                "kernelId": null,
                "pendingTime": "2026-01-02T03:04:05Z",
                "privateIp": "172.31.0.5",
                "ramdiskId": null,
                "region": "karri-1",
                "version": "2017-09-30",
            })
        );
    }

    #[test]
    fn the_identity_document_names_the_kernel_and_ram_disk_when_set() {
        let md = InstanceMetadata {
            kernel_id: Some("aki-0123".into()),
            ramdisk_id: Some("ari-0456".into()),
            launch_time: "2026-01-02T05:04:05.123+02:00".into(),
            ..sample()
        };
        let Some(Answer::Json(document)) =
            answer(&md, "/latest/dynamic/instance-identity/document")
        else {
            panic!("the document is JSON");
        };
        let document: serde_json::Value =
            serde_json::from_str(&document).expect("the document parses");
        assert_eq!(document["kernelId"], "aki-0123");
        assert_eq!(document["ramdiskId"], "ari-0456");
        assert_eq!(document["pendingTime"], "2026-01-02T03:04:05Z");
    }

    /// Walks the tree as cloud-init's EC2 crawler does, checking every listed entry resolves.
    fn crawl(md: &InstanceMetadata, path: &str, visited: &mut usize) {
        *visited += 1;
        let Some(Answer::Text(listing)) = answer(md, path) else {
            panic!("{path} is not a listing");
        };
        for line in listing.lines() {
            if let Some((index, _name)) = line.split_once('=') {
                crawl(md, &format!("{path}{index}/"), visited);
            } else if line.ends_with('/') {
                crawl(md, &format!("{path}{line}"), visited);
            } else {
                *visited += 1;
                assert!(
                    answer(md, &format!("{path}{line}")).is_some(),
                    "{path}{line}"
                );
            }
        }
    }

    #[test]
    fn every_listed_entry_resolves() {
        let mut visited = 0;
        crawl(&sample(), "/latest/", &mut visited);
        assert!(visited > 30, "crawled only {visited} paths");
    }

    // --- tokens ---

    /// `md` as published in session `session`.
    fn at(md: InstanceMetadata, session: u64) -> Published {
        Published {
            metadata: Arc::new(md),
            session,
        }
    }

    fn tokens_at(now: &Arc<AtomicU64>) -> Tokens {
        Tokens {
            key: Arc::new([7; 32]),
            clock: Clock::Manual(Arc::clone(now)),
        }
    }

    #[test]
    fn a_token_is_valid_for_its_ttl_and_no_longer() {
        let now = Arc::new(AtomicU64::new(1_000));
        let tokens = tokens_at(&now);
        let token = tokens.issue(&at(sample(), 1), 10);
        assert_eq!(tokens.verify(&at(sample(), 1), &token), Ok(10));
        now.store(1_009, Ordering::SeqCst);
        assert_eq!(tokens.verify(&at(sample(), 1), &token), Ok(1));
        now.store(1_010, Ordering::SeqCst);
        assert_eq!(
            tokens.verify(&at(sample(), 1), &token),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_is_refused_for_another_instance_even_at_the_same_address() {
        let tokens = Tokens::new();
        let token = tokens.issue(&at(sample(), 1), 60);
        assert_eq!(
            tokens.verify(&at(other(), 1), &token),
            Err(TokenError::NotIssuedToCaller)
        );
        let successor = InstanceMetadata {
            instance_id: "i-0bbbbbbbbbbbbbbbb".into(),
            ..sample()
        };
        assert_eq!(
            tokens.verify(&at(successor, 1), &token),
            Err(TokenError::NotIssuedToCaller)
        );
    }

    #[test]
    fn a_token_from_another_process_is_refused() {
        let token = Tokens::new().issue(&at(sample(), 1), 60);
        assert_eq!(
            Tokens::new().verify(&at(sample(), 1), &token),
            Err(TokenError::NotIssuedToCaller)
        );
    }

    #[test]
    fn an_altered_or_malformed_token_is_refused() {
        let now = Arc::new(AtomicU64::new(1_000));
        let tokens = tokens_at(&now);
        let token = tokens.issue(&at(sample(), 1), 10);
        // Push the expiry forward: the tag no longer matches.
        let mut bytes = URL_SAFE_NO_PAD
            .decode(&token)
            .expect("a token is base64url");
        bytes[7] = bytes[7].wrapping_add(100);
        let extended = URL_SAFE_NO_PAD.encode(bytes);
        assert_eq!(
            tokens.verify(&at(sample(), 1), &extended),
            Err(TokenError::NotIssuedToCaller)
        );
        for malformed in ["", "not a token!", &token[..20], &format!("{token}AAAA")] {
            assert_eq!(
                tokens.verify(&at(sample(), 1), malformed),
                Err(TokenError::Malformed),
                "{malformed:?}"
            );
        }
    }

    #[test]
    fn a_token_from_an_earlier_session_of_the_same_instance_is_refused() {
        let tokens = Tokens::new();
        let token = tokens.issue(&at(sample(), 1), 60);
        assert_eq!(
            tokens.verify(&at(sample(), 2), &token),
            Err(TokenError::NotIssuedToCaller)
        );
    }

    #[test]
    fn tokens_survive_a_metadata_update_but_not_a_stop_and_start() {
        let directory = Directory::default();
        let tokens = Tokens::new();
        let ip = sample().local_ipv4;
        directory.set(sample());
        let token = tokens.issue(&directory.get(ip).expect("published"), 60);
        // Running: the agent publishes again (user data or options changed).
        directory.set(InstanceMetadata {
            user_data: Some(b"changed".to_vec()),
            ..sample()
        });
        let current = directory.get(ip).expect("still published");
        assert_eq!(current.metadata.user_data.as_deref(), Some(&b"changed"[..]));
        assert!(tokens.verify(&current, &token).is_ok());
        // Stopped (withdrawn once its domain is down), then started again.
        directory.remove(ip, &sample().instance_id);
        directory.set(sample());
        assert_eq!(
            tokens.verify(&directory.get(ip).expect("published again"), &token),
            Err(TokenError::NotIssuedToCaller)
        );
        // Another instance given the address begins its own session too.
        directory.set(InstanceMetadata {
            instance_id: "i-0bbbbbbbbbbbbbbbb".into(),
            ..sample()
        });
        let fresh = tokens.issue(&directory.get(ip).expect("published"), 60);
        directory.set(sample());
        assert_eq!(
            tokens.verify(&directory.get(ip).expect("published"), &fresh),
            Err(TokenError::NotIssuedToCaller)
        );
    }

    // --- the HTTP layer ---

    const A: [u8; 4] = [172, 31, 0, 5];
    const B: [u8; 4] = [172, 31, 0, 6];

    fn app_with(tokens: Tokens, instances: impl IntoIterator<Item = InstanceMetadata>) -> Router {
        let directory = Directory::default();
        for md in instances {
            directory.set(md);
        }
        router(directory, tokens)
    }

    fn app(instances: impl IntoIterator<Item = InstanceMetadata>) -> Router {
        app_with(Tokens::new(), instances)
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Reply {
        fn text(&self) -> &str {
            std::str::from_utf8(&self.body).expect("a text body")
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .get(name)
                .map(|value| value.to_str().expect("an ASCII header"))
        }
    }

    async fn call(
        app: &Router,
        from: impl Into<IpAddr>,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = HttpRequest::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(Body::empty()).expect("a valid request");
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(from.into(), 40_000)));
        let response = app
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .expect("a full body")
            .to_vec();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn get(app: &Router, from: [u8; 4], path: &str, headers: &[(&str, &str)]) -> Reply {
        call(app, from, Method::GET, path, headers).await
    }

    async fn put_token(app: &Router, from: [u8; 4], ttl: &str) -> Reply {
        call(
            app,
            from,
            Method::PUT,
            TOKEN_PATH,
            &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
        )
        .await
    }

    #[tokio::test]
    async fn a_request_without_a_token_is_served_when_tokens_are_optional() {
        let app = app([sample()]);
        let reply = get(&app, A, "/latest/meta-data/instance-id", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "i-0123456789abcdef0");
        assert_eq!(reply.header("content-type"), Some("text/plain"));
        assert_eq!(reply.header("x-aws-ec2-metadata-token-ttl-seconds"), None);
    }

    #[tokio::test]
    async fn a_request_without_a_token_is_refused_when_tokens_are_required() {
        let app = app([InstanceMetadata {
            http_tokens_required: true,
            ..sample()
        }]);
        for path in ["/latest/meta-data/instance-id", "/latest/nope", "/"] {
            let reply = get(&app, A, path, &[]).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
            assert!(reply.text().contains("401 - Unauthorized"));
        }
    }

    #[tokio::test]
    async fn a_token_obtained_with_a_put_opens_the_metadata() {
        let app = app([InstanceMetadata {
            http_tokens_required: true,
            ..sample()
        }]);
        let reply = put_token(&app, A, "21600").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("x-aws-ec2-metadata-token-ttl-seconds"),
            Some("21600")
        );
        assert_eq!(reply.header("content-type"), Some("text/plain"));
        let token = reply.text().to_owned();

        let reply = get(
            &app,
            A,
            "/latest/meta-data/placement/availability-zone",
            &[("X-aws-ec2-metadata-token", &token)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "karri-1a");
        let remaining: u64 = reply
            .header("x-aws-ec2-metadata-token-ttl-seconds")
            .expect("the remaining TTL")
            .parse()
            .expect("a number");
        assert!((21_599..=21_600).contains(&remaining), "{remaining}");
    }

    #[tokio::test]
    async fn a_token_obtained_by_another_instance_is_refused() {
        let app = app([sample(), other()]);
        let token = put_token(&app, A, "60").await.text().to_owned();
        let reply = get(
            &app,
            B,
            "/latest/meta-data/instance-id",
            &[("X-aws-ec2-metadata-token", &token)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn an_expired_token_is_refused() {
        let now = Arc::new(AtomicU64::new(5_000));
        let app = app_with(tokens_at(&now), [sample()]);
        let token = put_token(&app, A, "30").await.text().to_owned();
        let with_token = [("X-aws-ec2-metadata-token", token.as_str())];

        now.store(5_029, Ordering::SeqCst);
        let reply = get(&app, A, "/latest/meta-data/instance-id", &with_token).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("x-aws-ec2-metadata-token-ttl-seconds"),
            Some("1")
        );

        now.store(5_030, Ordering::SeqCst);
        let reply = get(&app, A, "/latest/meta-data/instance-id", &with_token).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn an_invalid_token_is_refused_even_when_tokens_are_optional() {
        let app = app([sample()]);
        let reply = get(
            &app,
            A,
            "/latest/meta-data/instance-id",
            &[("X-aws-ec2-metadata-token", "forged")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_caller_that_is_not_an_instance_of_the_node_is_refused_everything() {
        let app = app([sample()]);
        let stranger = [172, 31, 0, 99];
        assert_eq!(
            get(&app, stranger, "/latest/meta-data/", &[]).await.status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            put_token(&app, stranger, "60").await.status,
            StatusCode::FORBIDDEN
        );
        let v6 = call(&app, Ipv6Addr::LOCALHOST, Method::GET, "/", &[]).await;
        assert_eq!(v6.status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn an_instance_calling_over_ipv4_mapped_ipv6_is_recognised() {
        let app = app([sample()]);
        let mapped = Ipv4Addr::from(A).to_ipv6_mapped();
        let reply = call(
            &app,
            mapped,
            Method::GET,
            "/latest/meta-data/local-ipv4",
            &[],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "172.31.0.5");
    }

    #[tokio::test]
    async fn an_instance_whose_endpoint_is_disabled_is_refused_everything() {
        let app = app([InstanceMetadata {
            http_endpoint_enabled: false,
            ..sample()
        }]);
        assert_eq!(
            get(&app, A, "/latest/meta-data/", &[]).await.status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(put_token(&app, A, "60").await.status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_token_request_carrying_x_forwarded_for_is_refused() {
        let app = app([sample()]);
        let reply = call(
            &app,
            A,
            Method::PUT,
            TOKEN_PATH,
            &[
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("X-Forwarded-For", "10.0.0.1"),
            ],
        )
        .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_token_request_without_a_valid_ttl_is_a_bad_request() {
        let app = app([sample()]);
        for ttl in ["0", "21601", "-1", "abc", "", "1.5"] {
            assert_eq!(
                put_token(&app, A, ttl).await.status,
                StatusCode::BAD_REQUEST,
                "{ttl:?}"
            );
        }
        let reply = call(&app, A, Method::PUT, TOKEN_PATH, &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(put_token(&app, A, "1").await.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn methods_other_than_get_head_and_the_token_put_are_not_allowed() {
        let app = app([sample()]);
        let cases = [
            (Method::POST, "/latest/meta-data/", "GET, HEAD"),
            (Method::DELETE, "/latest/meta-data/instance-id", "GET, HEAD"),
            (Method::PUT, "/latest/meta-data/instance-id", "GET, HEAD"),
            (Method::GET, TOKEN_PATH, "PUT"),
            (Method::POST, TOKEN_PATH, "PUT"),
        ];
        for (method, path, allow) in cases {
            let reply = call(&app, A, method.clone(), path, &[]).await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
        }
    }

    #[tokio::test]
    async fn an_unknown_path_is_not_found_with_an_aws_like_page() {
        let app = app([sample()]);
        let reply = get(&app, A, "/latest/meta-data/iam/info", &[]).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(reply.header("content-type"), Some("text/html"));
        assert!(reply.text().contains("<title>404 - Not Found</title>"));
    }

    #[tokio::test]
    async fn each_answer_carries_its_content_type() {
        let app = app([sample()]);
        let cases = [
            ("/latest/meta-data/", "text/plain"),
            (
                "/latest/dynamic/instance-identity/document",
                "application/json",
            ),
            ("/latest/user-data", "application/octet-stream"),
        ];
        for (path, content_type) in cases {
            let reply = get(&app, A, path, &[]).await;
            assert_eq!(reply.status, StatusCode::OK, "{path}");
            assert_eq!(reply.header("content-type"), Some(content_type), "{path}");
        }
        let user_data = get(&app, A, "/latest/user-data", &[]).await;
        assert_eq!(user_data.body, b"#cloud-config\npackages: [nginx]\n");
    }

    #[tokio::test]
    async fn a_head_request_has_the_headers_of_a_get_and_no_body() {
        let app = app([sample()]);
        let reply = call(&app, A, Method::HEAD, "/latest/meta-data/instance-id", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-length"), Some("19"));
        assert!(reply.body.is_empty());
    }

    #[tokio::test]
    async fn an_instance_removed_from_the_directory_is_refused_at_once() {
        let directory = Directory::default();
        directory.set(sample());
        directory.set(other());
        let app = router(directory.clone(), Tokens::new());
        assert_eq!(get(&app, A, "/latest/", &[]).await.status, StatusCode::OK);
        directory.retain(|md| md.instance_id != "i-0123456789abcdef0");
        assert_eq!(directory.len(), 1);
        assert_eq!(
            get(&app, A, "/latest/", &[]).await.status,
            StatusCode::FORBIDDEN
        );
        directory.remove(Ipv4Addr::from(B), "i-0123456789abcdef0");
        assert_eq!(directory.len(), 1, "another instance's address stays");
        directory.remove(Ipv4Addr::from(B), &other().instance_id);
        assert!(directory.is_empty());
        assert_eq!(
            get(&app, B, "/latest/", &[]).await.status,
            StatusCode::FORBIDDEN
        );
    }

    // --- over a real socket ---

    /// One HTTP/1.1 exchange on a fresh connection: the status, the headers, the body.
    async fn exchange(server: SocketAddr, request: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(server)
            .await
            .expect("the server listens");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("the request is sent");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("the response is read");
        let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|status| status.parse().ok())
            .expect("a status line");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn the_token_flow_works_over_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let server = listener.local_addr().expect("a bound address");
        let directory = Directory::default();
        directory.set(InstanceMetadata {
            local_ipv4: Ipv4Addr::LOCALHOST,
            http_tokens_required: true,
            hop_limit: 2,
            tags: None,
            ..sample()
        });
        let serving = tokio::spawn(serve(listener, directory, Tokens::new()));

        let (status, _, _) = exchange(
            server,
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\
             Connection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 401);

        let (status, head, token) = exchange(
            server,
            "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
             X-aws-ec2-metadata-token-ttl-seconds: 300\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            head.contains("x-aws-ec2-metadata-token-ttl-seconds: 300"),
            "{head}"
        );
        // A keep-alive token request: the server ends the connection after the token (its
        // socket keeps the hop limit as IP TTL), so that reading to the end finishes.
        let (status, head, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            exchange(
                server,
                "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
                 X-aws-ec2-metadata-token-ttl-seconds: 300\r\nContent-Length: 0\r\n\r\n",
            ),
        )
        .await
        .expect("the connection ends after a token");
        assert_eq!(status, 200);
        assert!(head.contains("connection: close"), "{head}");

        let (status, _, body) = exchange(
            server,
            &format!(
                "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\
                 X-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body, "i-0123456789abcdef0");

        serving.abort();
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_too_many_are_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let server = listener.local_addr().expect("a bound address");
        let limits = Limits {
            idle: std::time::Duration::from_millis(300),
            max_connections: 1,
            ..Limits::default()
        };
        let serving = tokio::spawn(serve_with(
            listener,
            Directory::default(),
            Tokens::new(),
            limits,
        ));
        let mut idle = tokio::net::TcpStream::connect(server)
            .await
            .expect("the server listens");
        // One request on a keep-alive connection, which then stays idle.
        idle.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("the request is sent");
        // The second connection finds the only slot taken and is closed at once (the idle one
        // holds it for 300 ms at most, far less than the 5 s this waits).
        let mut second = tokio::net::TcpStream::connect(server)
            .await
            .expect("the server listens");
        let mut seen = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            second.read_to_end(&mut seen),
        )
        .await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        // The idle one gets its answer, then is closed 300 ms after it.
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            idle.read_to_end(&mut answer),
        )
        .await;
        assert!(
            closed.is_ok(),
            "the idle connection is still open after 5 s"
        );
        assert!(answer.starts_with(b"HTTP/1.1 "), "{answer:?}");
        serving.abort();
    }

    /// A connection to `server` from `source` (a loopback address of the caller's choosing).
    async fn connect_from(source: Ipv4Addr, server: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket
            .bind(SocketAddr::from((source, 0)))
            .expect("a loopback source address");
        socket.connect(server).await.expect("the server listens")
    }

    #[tokio::test]
    async fn one_caller_cannot_take_every_connection_and_request_heads_are_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let server = listener.local_addr().expect("a bound address");
        let victim = Ipv4Addr::new(127, 0, 0, 3);
        let directory = Directory::default();
        directory.set(InstanceMetadata {
            local_ipv4: victim,
            ..sample()
        });
        let limits = Limits {
            per_caller: 2,
            max_head: 8192,
            ..Limits::default()
        };
        let serving = tokio::spawn(serve_with(listener, directory, Tokens::new(), limits));
        // The hog holds its two connections open (no request yet); its third is closed at once.
        let hog = Ipv4Addr::new(127, 0, 0, 2);
        let _held = [
            connect_from(hog, server).await,
            connect_from(hog, server).await,
        ];
        let mut third = connect_from(hog, server).await;
        let mut seen = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            third.read_to_end(&mut seen),
        )
        .await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "{closed:?}: {seen:?}"
        );
        // Another caller is still served.
        let mut other = connect_from(victim, server).await;
        other
            .write_all(b"GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .expect("the request is sent");
        let mut answer = String::new();
        other
            .read_to_string(&mut answer)
            .await
            .expect("the answer is read");
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        // A request head over the bound is refused, not buffered.
        let mut big = connect_from(victim, server).await;
        let padding = "a".repeat(32 * 1024);
        big.write_all(
            format!("GET /latest/meta-data/ HTTP/1.0\r\nHost: x\r\nX-Pad: {padding}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("the request is sent");
        let mut answer = Vec::new();
        let _ = big.read_to_end(&mut answer).await;
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 431"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        serving.abort();
    }

    #[tokio::test]
    async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let server = listener.local_addr().expect("a bound address");
        let directory = Directory::default();
        directory.set(InstanceMetadata {
            local_ipv4: Ipv4Addr::LOCALHOST,
            ..sample()
        });
        // What busybox nc does: an HTTP/1.0 request, then its side shut at stdin's end. The
        // clients finish before the server starts, so it reads each request and the end of
        // its input at once.
        let mut clients = Vec::new();
        for _ in 0..5 {
            let mut stream = tokio::net::TcpStream::connect(server)
                .await
                .expect("the server listens");
            stream
                .write_all(b"GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: x\r\n\r\n")
                .await
                .expect("the request is sent");
            stream.shutdown().await.expect("the write side shuts");
            clients.push(stream);
        }
        let serving = tokio::spawn(serve(listener, directory, Tokens::new()));
        for mut stream in clients {
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .await
                .expect("the response is read");
            assert!(
                response.starts_with("HTTP/1.0 200") && response.ends_with("i-0123456789abcdef0"),
                "{response:?}"
            );
        }
        serving.abort();
    }

    #[tokio::test]
    async fn limiting_hops_sets_the_ttl_of_the_connection_itself() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("bound"));
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_client, (accepted, _)) = (client.expect("connected"), accepted.expect("accepted"));
        let socket = PeerSocket::of(&accepted).expect("a duplicate descriptor");
        socket.limit_hops(3).expect("the TTL is set");
        assert_eq!(accepted.ttl().expect("the TTL is readable"), 3);
        socket.limit_hops(0).expect("the TTL is set");
        assert_eq!(accepted.ttl().expect("the TTL is readable"), 1);
    }
}
