//! The S3 face (the Walrus role of Eucalyptus): the S3 REST API on the gateway's listeners, at
//! `/` (path-style and virtual-hosted-style) and under `/services/objectstorage`.
//!
//! The protocol (routing, XML, SigV4 header, presigned and `aws-chunked` streaming payloads,
//! error XML) is the `s3s` crate's; Karri supplies the operations ([`service::KarriS3`]),
//! the secret of each access key, virtual-host parsing, and the Eucalyptus path. Buckets are
//! records, objects an index in etcd ([`index`]) over blobs ([`blob`]).

pub mod access;
pub mod blob;
pub mod checksum;
pub mod chunked;
pub mod cond;
pub mod index;
pub mod listing;
pub mod presign;
pub mod remote;
pub mod service;
pub mod sweep;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use s3s::auth::{S3Auth, SecretKey};
use s3s::host::{S3Host, VirtualHost};
use s3s::route::S3Route;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{s3_error, S3Request, S3Response, S3Result};
use tracing::Instrument;

use crate::ec2::service::{resolve_access_key, KeyError};
use crate::metrics::{Metrics, RequestLabels};
use crate::registry::Registry;

/// The field manager S3 calls (a bucket made, its ACL or tags changed) are recorded under in
/// a bucket record's `metadata.managedFields`.
pub const FIELD_MANAGER: &str = "karri-s3";

/// The Eucalyptus path of the object store.
pub const EUCA_PREFIX: &str = "/services/objectstorage";

/// Settings of the S3 face.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// The region buckets are created in.
    pub region: String,
    /// Domains under which `<bucket>.<domain>` is a virtual-hosted bucket, e.g. `s3.localhost`.
    pub domains: Vec<String>,
    /// How long a request body may send nothing while it is read ([`BODY_IDLE_TIMEOUT`] by
    /// default).
    pub body_idle_timeout: std::time::Duration,
}

/// The S3 face: the s3s service and what the gateway needs to route to it.
#[derive(Clone)]
pub struct S3Face {
    service: S3Service,
    ops: service::KarriS3,
    domains: Arc<Vec<String>>,
    region: Arc<str>,
    metrics: Arc<Metrics>,
    body_idle_timeout: std::time::Duration,
}

/// A request the gateway answers itself, before s3s verifies its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// S3 error code.
    pub code: &'static str,
    /// Error message.
    pub message: String,
    /// The region to sign for, when the request named another: in the error's `<Region>` and
    /// the `x-amz-bucket-region` header, which botocore and s3cmd read to sign again.
    pub region: Option<String>,
    /// The `x-amz-*` headers the request carried without signing them (`<HeadersNotSigned>`).
    pub headers_not_signed: Option<String>,
}

impl Refusal {
    /// The answer to an S3 request on a gateway without an S3 face (no object storage set).
    pub fn no_s3_face() -> Self {
        Self {
            status: StatusCode::NOT_IMPLEMENTED,
            code: "NotImplemented",
            message: "This gateway stores no S3 objects: it runs without --s3-data-dir or --s3-backend-url.".into(),
            region: None,
            headers_not_signed: None,
        }
    }

    fn bad_request(code: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            message,
            region: None,
            headers_not_signed: None,
        }
    }

    /// The S3 error document.
    pub fn xml(&self, request_id: &str) -> String {
        let region = self.region.as_deref().map_or(String::new(), |r| {
            format!("<Region>{}</Region>", quick_xml::escape::escape(r))
        });
        let unsigned = self
            .headers_not_signed
            .as_deref()
            .map_or(String::new(), |h| {
                format!(
                    "<HeadersNotSigned>{}</HeadersNotSigned>",
                    quick_xml::escape::escape(h)
                )
            });
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message>{region}{unsigned}<RequestId>{}</RequestId></Error>",
            self.code,
            quick_xml::escape::escape(self.message.as_str()),
            quick_xml::escape::escape(request_id)
        )
    }
}

/// What the gateway refuses before s3s sees a request, which s3s would accept: signature
/// version 2 (s3s checks neither its `Date` nor a limit on its expiry, and its signature does
/// not cover the body), two authentication mechanisms in one request (s3s would check the one
/// it looks at first, possibly the weaker), presigned URLs valid for more than a week,
/// credentials scoped to another region or service, signatures that do not cover `host`, and
/// requests carrying `x-amz-*` headers their signature does not cover (s3s would obey them: a
/// presigned PUT URL would take an ACL or a copy source from whoever holds it). A listing of
/// buckets or a bucket's location may be signed for `us-east-1` too, as on AWS, where clients
/// ask it to learn the region. Anything else (no signature, a malformed one, a good one) is left
/// to s3s. Pure.
pub fn auth_refusal(
    method: &str,
    path: &str,
    query: &str,
    headers: &http::HeaderMap,
    region: &str,
    virtual_host: bool,
) -> Option<Refusal> {
    use crate::aws::sigv4::{self, AuthLocation, SigV4Error, SignedRequest};
    let request = SignedRequest {
        method,
        path,
        query,
        headers,
        payload_hash: "",
    };
    let parsed = match sigv4::parse(&request) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return None,
        Err(SigV4Error::UnsupportedAlgorithm(_)) => {
            return Some(Refusal::bad_request(
                "InvalidRequest",
                "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.".into(),
            ))
        }
        Err(e @ SigV4Error::InvalidExpires(_)) => {
            return Some(Refusal::bad_request(
                "AuthorizationQueryParametersError",
                e.to_string(),
            ))
        }
        Err(SigV4Error::ConflictingAuthentication) => {
            return Some(Refusal::bad_request(
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified".into(),
            ))
        }
        Err(_) => return None,
    };
    if parsed.security_token.is_some() {
        // Karri issues no temporary credentials, so no session token can be valid.
        return Some(Refusal::bad_request(
            "InvalidToken",
            "The provided token is malformed or otherwise invalid: Karri issues no temporary credentials.".into(),
        ));
    }
    let (code, what) = match parsed.location {
        AuthLocation::Header => (
            "AuthorizationHeaderMalformed",
            "The authorization header is malformed;",
        ),
        AuthLocation::Query { expires_secs } => {
            if !(1..=sigv4::MAX_PRESIGNED_EXPIRES).contains(&expires_secs) {
                return Some(Refusal::bad_request(
                    "AuthorizationQueryParametersError",
                    SigV4Error::InvalidExpires(expires_secs.to_string()).to_string(),
                ));
            }
            (
                "AuthorizationQueryParametersError",
                "Error parsing the X-Amz-Credential parameter;",
            )
        }
    };
    if parsed.scope.region != region
        && !(parsed.scope.region == GLOBAL_REGION && asks_where(method, path, query, virtual_host))
    {
        return Some(Refusal {
            region: Some(region.to_owned()),
            ..Refusal::bad_request(
                code,
                format!(
                    "{what} the region '{}' is wrong; expecting '{region}'",
                    parsed.scope.region
                ),
            )
        });
    }
    if parsed.scope.service != "s3" {
        return Some(Refusal::bad_request(
            code,
            format!(
                "{what} incorrect service '{}'. This endpoint belongs to 's3'.",
                parsed.scope.service
            ),
        ));
    }
    // The Host header names the bucket in virtual-hosted style: unsigned, a captured request
    // could be replayed against another bucket. AWS requires it signed; s3s does not check.
    if !parsed.signed_headers.iter().any(|h| h == "host") {
        return Some(Refusal::bad_request(
            code,
            format!("{what} the host header must be signed"),
        ));
    }
    let mut unsigned: Vec<&str> = headers
        .keys()
        .map(http::HeaderName::as_str)
        .filter(|h| h.starts_with("x-amz-") && !parsed.signed_headers.iter().any(|s| s == h))
        .collect();
    if !unsigned.is_empty() {
        unsigned.sort_unstable();
        unsigned.dedup();
        return Some(Refusal {
            status: StatusCode::FORBIDDEN,
            code: "AccessDenied",
            message: "There were headers present in the request which were not signed".into(),
            region: None,
            headers_not_signed: Some(unsigned.join(", ")),
        });
    }
    None
}

/// What the gateway refuses before s3s sees a request because Karri cannot do what a header
/// (or a presigned URL's query header) asks, and s3s would let the write go through without it:
/// Object Lock (a locked object would be deletable at once) and appends at an offset (the object
/// would be overwritten). Pure.
pub fn feature_refusal(query: &str, headers: &http::HeaderMap) -> Option<Refusal> {
    let in_query = |name: &str| {
        query.split('&').any(|p| {
            p.split('=')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(name))
        })
    };
    let asked = |name: &str| headers.contains_key(name) || in_query(name);
    if headers
        .get("x-amz-bucket-object-lock-enabled")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    {
        return Some(Refusal {
            status: StatusCode::NOT_IMPLEMENTED,
            ..Refusal::bad_request(
                "NotImplemented",
                "Object Lock is not supported by Karri: a bucket cannot be made with it.".into(),
            )
        });
    }
    if [
        "x-amz-object-lock-mode",
        "x-amz-object-lock-retain-until-date",
        "x-amz-object-lock-legal-hold",
    ]
    .iter()
    .any(|h| asked(h))
    {
        return Some(Refusal::bad_request(
            "InvalidRequest",
            "Bucket is missing Object Lock Configuration: Karri does not support Object Lock, so no object can be locked.".into(),
        ));
    }
    if asked("x-amz-write-offset-bytes") {
        return Some(Refusal {
            status: StatusCode::NOT_IMPLEMENTED,
            ..Refusal::bad_request(
                "NotImplemented",
                "A header you provided implies functionality that is not implemented: appending to an object (x-amz-write-offset-bytes) is not supported by Karri.".into(),
            )
        });
    }
    None
}

/// The region AWS clients sign for when they do not know a bucket's region yet.
const GLOBAL_REGION: &str = "us-east-1";

/// Whether a request lists the buckets or asks a bucket's location: what clients that do not
/// know the region yet send (minio-py asks `GET /<bucket>?location` signed for `us-east-1`).
/// `GET /` with no parameters (not on a bucket's virtual host, where it lists the bucket), or
/// a bucket with `location` alone; the newer SDKs' `x-id` naming either operation is allowed
/// beside them. A percent-encoded `/` counts as one. Pure.
fn asks_where(method: &str, path: &str, query: &str, virtual_host: bool) -> bool {
    if method != "GET" {
        return false;
    }
    let mut location = false;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        match name {
            "location" => location = true,
            "x-id" if value == "ListBuckets" || value == "GetBucketLocation" => {}
            n if n.starts_with("X-Amz-") => {}
            _ => return false,
        }
    }
    let rest = path.strip_prefix(EUCA_PREFIX).unwrap_or(path);
    let rest = rest.trim_start_matches('/');
    let encoded_slash = rest.to_ascii_lowercase().contains("%2f");
    let bucket = rest.trim_end_matches('/');
    match (location, virtual_host) {
        (false, false) => rest.is_empty(),
        (true, false) => !bucket.is_empty() && !bucket.contains('/') && !encoded_slash,
        (true, true) => rest.is_empty(),
        (false, true) => false,
    }
}

struct Secrets {
    registry: Arc<Registry>,
}

#[async_trait::async_trait]
impl S3Auth for Secrets {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        if let Some(node) = presign::node_of_key(access_key) {
            return self
                .registry
                .derived_secret(&presign::node_secret_label(&node))
                .map(SecretKey::from)
                .ok_or_else(|| {
                    s3_error!(
                        InvalidAccessKeyId,
                        "The AWS Access Key Id you provided does not exist in our records."
                    )
                });
        }
        match resolve_access_key(&self.registry, access_key).await {
            Ok((secret, _)) => Ok(SecretKey::from(secret)),
            Err(KeyError::Unknown) => Err(s3_error!(
                InvalidAccessKeyId,
                "The AWS Access Key Id you provided does not exist in our records."
            )),
            Err(KeyError::Unavailable) => Err(s3_error!(
                ServiceUnavailable,
                "Please reduce your request rate."
            )),
            Err(KeyError::Sealed) => Err(s3_error!(
                InternalError,
                "We encountered an internal error. Please try again."
            )),
        }
    }
}

/// Authorization happens in the operations, which know the bucket's owner and ACLs; anonymous
/// requests reach them too (public buckets and objects). Checked here, before any operation:
/// `x-amz-expected-bucket-owner` and `x-amz-source-expected-bucket-owner`, with which a client
/// refuses to act on a bucket (or copy from one) that another account owns, say one recreated
/// under the same name after its own was deleted.
struct AclsInOperations {
    registry: Arc<Registry>,
}

impl AclsInOperations {
    /// AccessDenied unless bucket `name` is owned by account `expected`; a bucket that does not
    /// exist is left to the operation (NoSuchBucket).
    async fn owned_by(&self, name: &str, expected: &str) -> S3Result<()> {
        let key = crate::store::record_key("buckets", None, name);
        let value = match self.registry.cache.get("buckets", &key) {
            Some(found) => Some(found.value.clone()),
            None => self
                .registry
                .read_key_versioned(&key)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, bucket = name, "reading a bucket's owner");
                    s3_error!(
                        InternalError,
                        "We encountered an internal error. Please try again."
                    )
                })?
                .map(|(value, _)| value),
        };
        match value {
            Some(v)
                if v.pointer("/spec/ownerId")
                    .and_then(serde_json::Value::as_str)
                    != Some(expected) =>
            {
                Err(s3_error!(AccessDenied, "Access Denied"))
            }
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl s3s::access::S3Access for AclsInOperations {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
        let header = |name: &str| cx.headers().get(name).and_then(|v| v.to_str().ok());
        if let (Some(expected), Some(bucket)) = (
            header("x-amz-expected-bucket-owner"),
            cx.s3_path().get_bucket_name(),
        ) {
            self.owned_by(bucket, expected).await?;
        }
        if let (Some(expected), Some(source)) = (
            header("x-amz-source-expected-bucket-owner"),
            header("x-amz-copy-source"),
        ) {
            if let Ok(s3s::dto::CopySource::Bucket { bucket, .. }) =
                s3s::dto::CopySource::parse(source)
            {
                self.owned_by(&bucket, expected).await?;
            }
        }
        Ok(())
    }
}

/// The bucket a `Host` header names in virtual-hosted style: `<bucket>.<domain>[:port]` for
/// one of `domains` (the longest that matches). Pure.
pub fn virtual_bucket<'a>(domains: &[String], host: &'a str) -> Option<&'a str> {
    let host = strip_port(host);
    let mut best: Option<(&str, usize)> = None;
    for d in domains {
        if let Some(bucket) = host
            .strip_suffix(d.as_str())
            .and_then(|h| h.strip_suffix('.'))
            .filter(|b| !b.is_empty())
        {
            if best.is_none_or(|(_, len)| d.len() > len) {
                best = Some((bucket, d.len()));
            }
        }
    }
    // A host that is itself a longer domain (s3.localhost under localhost) names no bucket.
    if domains.iter().any(|d| d == host) {
        return None;
    }
    best.map(|(b, _)| b)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // `[v6 address]:port`: the address with its brackets.
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Virtual-host parsing for s3s: `<bucket>.<domain>` for the configured domains, path-style
/// for anything else (IP addresses, `localhost`, unknown names).
pub struct Hosts {
    domains: Arc<Vec<String>>,
}

impl Hosts {
    /// Parsing for `domains`.
    pub fn new(domains: Vec<String>) -> Self {
        Self {
            domains: Arc::new(domains),
        }
    }
}

impl S3Host for Hosts {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        match virtual_bucket(&self.domains, host) {
            Some(bucket) => Ok(
                VirtualHost::new(strip_port(host)[bucket.len() + 1..].to_string())
                    .with_bucket(bucket),
            ),
            None => Ok(VirtualHost::new(strip_port(host))),
        }
    }
}

/// The Eucalyptus path: s3s has verified the signature over the full path; the request goes on
/// to a second service without the prefix and without the (already checked) signature, the
/// signer's access key riding along as a [`service::ForwardedIdentity`].
struct EucaPath {
    inner: S3Service,
}

/// Query parameters of a presigned request, dropped once the signature is checked.
const SIGNING_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "Signature",
    "Expires",
];

/// `uri` without the Eucalyptus prefix and without signing parameters. Pure.
pub fn strip_euca_uri(uri: &Uri) -> Option<Uri> {
    let rest = uri.path().strip_prefix(EUCA_PREFIX)?;
    let path = if rest.is_empty() { "/" } else { rest };
    if !path.starts_with('/') {
        return None;
    }
    let query: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split('=').next().unwrap_or("");
            !SIGNING_PARAMS.contains(&name)
        })
        .collect();
    let pq = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    };
    pq.parse().ok()
}

#[async_trait::async_trait]
impl S3Route for EucaPath {
    fn is_match(
        &self,
        _method: &Method,
        uri: &Uri,
        _headers: &HeaderMap,
        _ext: &mut http::Extensions,
    ) -> bool {
        let p = uri.path();
        p == EUCA_PREFIX || p.starts_with(&format!("{EUCA_PREFIX}/"))
    }

    async fn check_access(&self, _req: &mut S3Request<s3s::Body>) -> S3Result<()> {
        Ok(())
    }

    async fn call(&self, req: S3Request<s3s::Body>) -> S3Result<S3Response<s3s::Body>> {
        let uri = strip_euca_uri(&req.uri)
            .ok_or_else(|| s3_error!(InvalidURI, "Couldn't parse the specified URI."))?;
        let presigned = req
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("X-Amz-Signature=")));
        let mut headers = req.headers;
        for h in [
            "authorization",
            "x-amz-content-sha256",
            "x-amz-date",
            "x-amz-security-token",
        ] {
            headers.remove(h);
        }
        // s3s decoded a signed aws-chunked body already; the inner service sees plain bytes. An
        // anonymous one comes as it was sent, framing and all, and the inner service decodes it
        // as it does on the plain path.
        let decoded = req.credentials.is_some();
        if let Some(length) = headers
            .remove("x-amz-decoded-content-length")
            .filter(|_| decoded)
        {
            headers.insert(http::header::CONTENT_LENGTH, length);
        }
        if let Some(enc) = headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .filter(|_| decoded)
        {
            let rest: Vec<&str> = enc
                .split(',')
                .map(str::trim)
                .filter(|e| *e != "aws-chunked")
                .collect();
            if rest.is_empty() {
                headers.remove(http::header::CONTENT_ENCODING);
            } else if let Ok(v) = http::HeaderValue::from_str(&rest.join(", ")) {
                headers.insert(http::header::CONTENT_ENCODING, v);
            }
        }
        let mut inner = http::Request::new(req.input);
        *inner.method_mut() = req.method;
        *inner.uri_mut() = uri;
        *inner.headers_mut() = headers;
        *inner.extensions_mut() = req.extensions;
        if let Some(c) = req.credentials {
            inner
                .extensions_mut()
                .insert(service::ForwardedIdentity(c.access_key));
        }
        if let Some(t) = req.trailing_headers {
            inner.extensions_mut().insert(service::ForwardedTrailers(t));
        }
        if presigned {
            inner.extensions_mut().insert(service::ForwardedPresigned);
        }
        let resp = self
            .inner
            .call(inner)
            .await
            .map_err(|e| s3_error!(InternalError, "{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let mut out = S3Response::new(body);
        out.status = Some(parts.status);
        out.headers = parts.headers;
        Ok(out)
    }
}

impl S3Face {
    /// The face over `registry` and `blobs`.
    pub fn new(
        registry: Arc<Registry>,
        blobs: Arc<dyn blob::BlobStore>,
        settings: &S3Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let domains = Arc::new(settings.domains.clone());
        let ops = service::KarriS3::new(
            registry.clone(),
            blobs,
            settings.region.clone(),
            domains.clone(),
        );
        let inner = {
            let mut b = S3ServiceBuilder::new(ops.clone());
            b.set_host(Hosts {
                domains: domains.clone(),
            });
            b.build()
        };
        let mut b = S3ServiceBuilder::new(ops.clone());
        b.set_auth(Secrets {
            registry: registry.clone(),
        });
        b.set_access(AclsInOperations { registry });
        b.set_host(Hosts {
            domains: domains.clone(),
        });
        b.set_route(EucaPath { inner });
        Self {
            service: b.build(),
            ops,
            domains,
            region: Arc::from(settings.region.as_str()),
            metrics,
            body_idle_timeout: settings.body_idle_timeout,
        }
    }

    /// Whether account `account_id` may read object `bucket/key` (see
    /// [`service::KarriS3::account_may_read`]).
    pub async fn account_may_read(
        &self,
        account_id: &str,
        bucket: &str,
        key: &str,
    ) -> S3Result<bool> {
        self.ops.account_may_read(account_id, bucket, key).await
    }

    /// The content ID of object `bucket/key` (see [`index::ObjectMeta::content_id`]), if it
    /// exists.
    pub async fn content_id(&self, bucket: &str, key: &str) -> S3Result<Option<String>> {
        self.ops.content_id(bucket, key).await
    }

    /// Whether `req` is an S3 request rather than an EC2 or resource-API one.
    pub fn claims(&self, req: &Request) -> bool {
        classify(req.method(), req.uri(), req.headers(), &self.domains) == Face::S3
    }

    /// The domains under which buckets are virtual hosts.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// Serves one S3 request.
    pub async fn serve(&self, req: Request) -> Response {
        let started = Instant::now();
        let has_body = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
            || req.headers().contains_key(http::header::TRANSFER_ENCODING);
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let method = req.method().clone();
        let req = req.map(|b| {
            Body::new(Tracked {
                inner: b,
                finished: finished.clone(),
                stalled: stalled.clone(),
                idle: self.body_idle_timeout,
                deadline: None,
                // A POST's body may be a form with a file (POST Object).
                piece: (method == Method::POST).then_some(POST_PIECE),
                rest: bytes::Bytes::new(),
            })
        });
        let request_id = crate::admission::new_uuid().simple().to_string();
        let span = tracing::info_span!("s3", request_id = %request_id, method = %method, path = %req.uri().path(), account = tracing::field::Empty, status = tracing::field::Empty);
        let virtual_host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(http::uri::Authority::as_str))
            .is_some_and(|host| virtual_bucket(&self.domains, host).is_some());
        let asks_location = asks_bucket_location(req.uri(), virtual_host);
        let refusal = auth_refusal(
            method.as_str(),
            req.uri().path(),
            req.uri().query().unwrap_or(""),
            req.headers(),
            &self.region,
            virtual_host,
        )
        .or_else(|| feature_refusal(req.uri().query().unwrap_or(""), req.headers()));
        let mut resp = if let Some(refusal) = refusal {
            tracing::info!(parent: &span, code = refusal.code, message = %refusal.message, "refused before the signature check");
            let mut resp = (
                refusal.status,
                [(http::header::CONTENT_TYPE, "application/xml")],
                refusal.xml(&request_id),
            )
                .into_response();
            if let Some(v) = refusal
                .region
                .as_deref()
                .and_then(|r| http::HeaderValue::from_str(r).ok())
            {
                resp.headers_mut().insert("x-amz-bucket-region", v);
            }
            resp
        } else {
            let service = self.service.clone();
            let result = async move { service.call(req.map(s3s::Body::http_body_unsync)).await }
                .instrument(span.clone())
                .await;
            match result {
                Ok(resp) => resp.map(Body::new),
                Err(e) => {
                    tracing::error!(parent: &span, error = ?e, "S3 request failed outside the protocol");
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
                }
            }
        };
        // As AWS, a HEAD of a range or a part answers 206, like the GET would (s3s says 200).
        if method == Method::HEAD
            && resp.status() == StatusCode::OK
            && resp.headers().contains_key(http::header::CONTENT_RANGE)
        {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        if resp.status() == StatusCode::NOT_MODIFIED {
            // No body, though s3s writes its error document into the answer.
            resp.headers_mut().remove(http::header::CONTENT_TYPE);
            resp.headers_mut().remove(http::header::CONTENT_LENGTH);
            *resp.body_mut() = Body::empty();
        }
        if stalled.load(std::sync::atomic::Ordering::Acquire) {
            // Whatever the handler made of the body's failure, the client stopped sending.
            tracing::info!(parent: &span, idle = ?self.body_idle_timeout, "the request body stopped arriving");
            resp = (
                StatusCode::BAD_REQUEST,
                [(http::header::CONTENT_TYPE, "application/xml")],
                Refusal::bad_request(
                    "RequestTimeout",
                    "Your socket connection to the server was not read from or written to within the timeout period. Idle connections will be closed.".into(),
                )
                .xml(&request_id),
            )
                .into_response();
        }
        if method != Method::HEAD
            && (resp.status().is_client_error() || resp.status().is_server_error())
        {
            resp = complete_error(resp, &request_id).await;
        } else if method == Method::GET && resp.status() == StatusCode::OK && asks_location {
            resp = location_on_its_own_line(resp).await;
        }
        if let Ok(v) = http::HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-amz-request-id", v);
        }
        // An answer given before the body was read (an early error): the unread rest would be
        // taken for the next request, so the connection closes, and says so.
        if has_body && !finished.load(std::sync::atomic::Ordering::Acquire) {
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        span.record("status", resp.status().as_u16());
        if resp.status().is_server_error() {
            tracing::warn!(parent: &span, status = resp.status().as_u16(), "S3 request answered with a server error");
        }
        let labels = RequestLabels {
            verb: format!("s3:{method}"),
            resource: "s3".into(),
            code: resp.status().as_u16().to_string(),
        };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        resp
    }
}

/// A GetBucketLocation answer with its document on the line after the XML declaration, as
/// AWS sends it: the AWS SDK for JavaScript (v2) reads the region with a pattern that takes the
/// whole of one line (`/>(.+)<\/Location/`), and got `<LocationConstraint …>karri-1` from a
/// document on one line. Any other answer as it was.
async fn location_on_its_own_line(resp: Response) -> Response {
    // A location document is a few hundred bytes, its size known: anything else passes as it is.
    let small = http_body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n <= MAX_LOCATION_DOCUMENT as u64);
    if !small {
        return resp;
    }
    rewrite_document(
        resp,
        MAX_LOCATION_DOCUMENT,
        location_document_on_its_own_line,
    )
    .await
}

/// `resp` with its XML document (read up to `limit` bytes) as `rewrite` makes it, or as it was
/// when `rewrite` leaves it; an answer whose document cannot be read loses its body (it is
/// logged).
async fn rewrite_document(
    resp: Response,
    limit: usize,
    rewrite: impl FnOnce(&str) -> Option<String>,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "an S3 answer's XML document could not be read");
            parts.headers.remove(http::header::CONTENT_LENGTH);
            return Response::from_parts(parts, Body::empty());
        }
    };
    match std::str::from_utf8(&bytes).ok().and_then(rewrite) {
        Some(text) => {
            parts.headers.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(text.len()),
            );
            Response::from_parts(parts, Body::from(text))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// The largest answer [`location_on_its_own_line`] reads.
const MAX_LOCATION_DOCUMENT: usize = 1024;

/// Whether a request asks for a bucket's location: `?location` on a bucket (path-style
/// `/<bucket>`, at the root or under the Eucalyptus path, or `/` on a virtual host), not on an
/// object, whose GET s3s serves whatever its query. Pure.
pub fn asks_bucket_location(uri: &Uri, virtual_host: bool) -> bool {
    let asks = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "location" || p == "location="));
    let path = uri.path();
    let rest = path.strip_prefix(EUCA_PREFIX).unwrap_or(path);
    let segments = rest.trim_matches('/');
    let bucket_level = if virtual_host {
        segments.is_empty()
    } else {
        !segments.is_empty() && !segments.contains('/')
    };
    asks && bucket_level
}

/// `xml`, a `LocationConstraint` document right after its XML declaration, with a line break
/// between them; `None` for anything else. Pure.
pub fn location_document_on_its_own_line(xml: &str) -> Option<String> {
    let end = xml.find("?>")? + 2;
    let (declaration, document) = xml.split_at(end);
    (declaration.starts_with("<?xml") && document.starts_with("<LocationConstraint"))
        .then(|| format!("{declaration}\n{document}"))
}

/// The largest error document [`complete_error`] reads (s3s's are a few hundred bytes).
const MAX_ERROR_DOCUMENT: usize = 64 * 1024;

/// An error answer whose XML document has a `Message` and the `RequestId` (see
/// [`complete_error_xml`]); any other answer as it was.
async fn complete_error(resp: Response, request_id: &str) -> Response {
    let xml = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("xml"));
    if !xml {
        return resp;
    }
    rewrite_document(resp, MAX_ERROR_DOCUMENT, |text| {
        complete_error_xml(text, request_id)
    })
    .await
}

/// S3's message for an error code that came without one (s3s's own refusals of a bucket name
/// or a key, say), from S3's table of error codes; a plain sentence naming the code otherwise.
fn default_message(code: &str) -> String {
    let known = match code {
        "AccessDenied" => "Access Denied",
        "InvalidArgument" => "Invalid Argument",
        "InvalidBucketName" => "The specified bucket is not valid.",
        "InvalidRequest" => "Invalid Request",
        "InvalidURI" => "Couldn't parse the specified URI.",
        "KeyTooLongError" => "Your key is too long.",
        "MalformedXML" => "The XML you provided was not well-formed or did not validate against our published schema.",
        "MethodNotAllowed" => "The specified method is not allowed against this resource.",
        "MissingContentLength" => "You must provide the Content-Length HTTP header.",
        "NoSuchBucket" => "The specified bucket does not exist.",
        "NoSuchKey" => "The specified key does not exist.",
        "NotImplemented" => "A header you provided implies functionality that is not implemented.",
        "SignatureDoesNotMatch" => "The request signature we calculated does not match the signature you provided.",
        _ => return format!("The request failed: {code}."),
    };
    known.to_string()
}

/// `xml`, an S3 error document (`<Error><Code>…</Code>…</Error>`), with a `Message` (S3's for
/// its code when it had none or an empty one) and a `RequestId` (`request_id`) when it lacked
/// them; `None` when it needs neither or is no error document. Pure.
pub fn complete_error_xml(xml: &str, request_id: &str) -> Option<String> {
    let code_start = xml.find("<Code>")? + "<Code>".len();
    let code = &xml[code_start..code_start + xml[code_start..].find("</Code>")?];
    let has_message = xml
        .find("<Message>")
        .is_some_and(|i| !xml[i..].starts_with("<Message></Message>"));
    let has_request_id = xml.contains("<RequestId>");
    if has_message && has_request_id {
        return None;
    }
    // An empty Message goes, for S3's to take its place.
    let doc = if has_message {
        xml.to_string()
    } else {
        xml.replacen("<Message></Message>", "", 1)
            .replacen("<Message/>", "", 1)
    };
    let after_code = doc.find("</Code>")? + "</Code>".len();
    let close = doc.rfind("</Error>")?;
    if close < after_code {
        return None;
    }
    let mut out = String::with_capacity(doc.len() + 128);
    out.push_str(&doc[..after_code]);
    if !has_message {
        out.push_str("<Message>");
        out.push_str(&xml_escape(&default_message(code)));
        out.push_str("</Message>");
    }
    out.push_str(&doc[after_code..close]);
    if !has_request_id {
        out.push_str("<RequestId>");
        out.push_str(&xml_escape(request_id));
        out.push_str("</RequestId>");
    }
    out.push_str(&doc[close..]);
    Some(out)
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// How long an S3 request body may send nothing while it is read before the request is given
/// up (AWS answers `RequestTimeout` after about 20 s): a client that stops sending must not
/// hold its connection, and the upload's temporary file, for ever. Large objects have no
/// deadline in all.
pub const BODY_IDLE_TIMEOUT: std::time::Duration = crate::body::BODY_IDLE_TIMEOUT;

/// The body of a request that stopped arriving ([`BODY_IDLE_TIMEOUT`]).
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of the request body for {0:?}")]
struct BodyStalled(std::time::Duration);

/// The largest piece of a POST's body handed to `s3s` at once. Its form parser fails a file
/// whose data is cut, in a piece that ends with a carriage return, before a piece of more than
/// 64 KiB ("failed to read file stream"), and HTTP/1.1 bodies arrive in pieces that large: in
/// pieces of at most an HTTP/2 frame's size (16 KiB), as HTTP/2 delivers them, it never does.
const POST_PIECE: usize = 16 * 1024;

/// A request body that records when it has been read to its end, and fails when it sends
/// nothing for `idle` while it is read (recorded in `stalled`); with `piece`, it hands its
/// data on in pieces of at most that many bytes.
struct Tracked {
    inner: Body,
    finished: Arc<std::sync::atomic::AtomicBool>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    idle: std::time::Duration,
    /// Armed while the reader waits for the next frame.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The largest piece of data handed on at once (none: as it arrives).
    piece: Option<usize>,
    /// What is left of a frame cut into pieces.
    rest: bytes::Bytes,
}

impl Tracked {
    /// `data`, or its first piece when it is larger than `piece` (the rest kept for the next
    /// polls).
    fn cut(&mut self, mut data: bytes::Bytes) -> bytes::Bytes {
        match self.piece {
            Some(piece) if data.len() > piece => {
                self.rest = data.split_off(piece);
                data
            }
            _ => data,
        }
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::sync::atomic::Ordering;
        use std::task::Poll;
        if self.stalled.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err(axum::Error::new(BodyStalled(self.idle)))));
        }
        if !self.rest.is_empty() {
            let rest = std::mem::take(&mut self.rest);
            let piece = self.cut(rest);
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.finished.store(true, Ordering::Release);
        }
        if let Poll::Ready(frame) = polled {
            self.deadline = None;
            return Poll::Ready(frame.map(|frame| {
                frame.map(|frame| match frame.into_data() {
                    Ok(data) => http_body::Frame::data(self.cut(data)),
                    Err(other) => other,
                })
            }));
        }
        let idle = self.idle;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
            self.deadline = None;
            self.stalled.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(BodyStalled(idle)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// Which face of the gateway a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    /// The Kubernetes-compatible resource API (and health, metrics).
    Kube,
    /// The EC2 Query API.
    Ec2,
    /// The S3 REST API.
    S3,
}

/// The service a SigV4 credential scope names: `<key>/<date>/<region>/<service>/aws4_request`.
fn scope_service(credential: &str) -> Option<&str> {
    let mut parts = credential.rsplit('/');
    let _terminator = parts.next()?;
    parts.next()
}

/// Decides the face of a request from its signature scope, path, query and host. Pure.
pub fn classify(method: &Method, uri: &Uri, headers: &HeaderMap, domains: &[String]) -> Face {
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth.starts_with("Bearer ") {
        return Face::Kube;
    }
    if path == EUCA_PREFIX || path.starts_with(&format!("{EUCA_PREFIX}/")) {
        return Face::S3;
    }
    if path == "/services/compute" || path == "/services/compute/" {
        return Face::Ec2;
    }
    if let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") {
        let credential = rest
            .split(',')
            .map(str::trim)
            .find_map(|p| p.strip_prefix("Credential="))
            .unwrap_or("");
        return if scope_service(credential) == Some("s3") {
            Face::S3
        } else {
            Face::Ec2
        };
    }
    if auth.starts_with("AWS ") {
        // SigV2 is S3's only (EC2 clients sign with SigV4).
        return Face::S3;
    }
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "X-Amz-Credential" => {
                let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
                return if scope_service(&decoded) == Some("s3") {
                    Face::S3
                } else {
                    Face::Ec2
                };
            }
            "Action" => return Face::Ec2,
            "AWSAccessKeyId" => return Face::S3,
            _ => {}
        }
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.host());
    if host.is_some_and(|h| virtual_bucket(domains, h).is_some()) {
        return Face::S3;
    }
    let form = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if path == "/" {
        return if form && method == Method::POST {
            Face::Ec2
        } else {
            Face::Kube
        };
    }
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if service::RESERVED_BUCKETS.contains(&first) {
        Face::Kube
    } else {
        // An unsigned request for a bucket: anonymous S3 access (public buckets and objects).
        Face::S3
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A body fed by the returned sender, tracked with an idle timeout of `idle`.
    fn tracked(
        idle: std::time::Duration,
    ) -> (
        Tracked,
        tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let body = Tracked {
            inner: Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
            finished: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            stalled: stalled.clone(),
            idle,
            deadline: None,
            piece: None,
            rest: bytes::Bytes::new(),
        };
        (body, tx, stalled)
    }

    #[test]
    fn only_a_bucket_is_asked_its_location() {
        let asks = |uri: &str, virtual_host: bool| {
            asks_bucket_location(&uri.parse::<Uri>().expect("a URI"), virtual_host)
        };
        assert!(asks("/photos?location", false));
        assert!(asks("/photos/?location=", false));
        assert!(asks("/services/objectstorage/photos?location", false));
        assert!(asks("/?location", true));
        // An object's GET, whatever its query; no location asked; the bucket list.
        assert!(!asks("/photos/big.iso?location=", false));
        assert!(!asks("/big.iso?location", true));
        assert!(!asks("/photos?locations", false));
        assert!(!asks("/photos", false));
        assert!(!asks("/?location", false));
    }

    #[test]
    fn a_location_document_goes_on_the_line_after_its_declaration() {
        let decl = r#"<?xml version="1.0" encoding="UTF-8"?>"#;
        let doc = r#"<LocationConstraint xmlns="http://s3.amazonaws.com/doc/2006-03-01/">karri-1</LocationConstraint>"#;
        let fixed = location_document_on_its_own_line(&format!("{decl}{doc}")).expect("moved");
        assert_eq!(fixed, format!("{decl}\n{doc}"));
        // What the AWS SDK for JavaScript (v2) reads from it: the region alone.
        let line = fixed.lines().nth(1).expect("a second line");
        let region = line
            .split_once('>')
            .and_then(|(_, rest)| rest.rsplit_once("</Location"))
            .map(|(region, _)| region);
        assert_eq!(region, Some("karri-1"));
        // Already on its own line, another document, an object's body: as they were.
        assert_eq!(location_document_on_its_own_line(&fixed), None);
        assert_eq!(
            location_document_on_its_own_line(&format!("{decl}<ListBucketResult/>")),
            None
        );
        assert_eq!(
            location_document_on_its_own_line("plain text ?> <LocationConstraint"),
            None
        );
    }

    #[tokio::test]
    async fn a_post_body_is_handed_on_in_pieces_no_larger_than_an_http2_frame() {
        use http_body_util::BodyExt as _;
        let (mut body, tx, _) = tracked(std::time::Duration::from_secs(20));
        body.piece = Some(POST_PIECE);
        let large: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        tx.send(Ok(bytes::Bytes::from(large.clone())))
            .await
            .expect("sent");
        tx.send(Ok(bytes::Bytes::from_static(b"\r\ntail")))
            .await
            .expect("sent");
        drop(tx);
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            pieces.push(frame.expect("a frame").into_data().expect("data"));
        }
        assert!(
            pieces.iter().all(|p| p.len() <= POST_PIECE),
            "{:?}",
            pieces.iter().map(bytes::Bytes::len).collect::<Vec<_>>()
        );
        assert_eq!(pieces.len(), 100_000 / POST_PIECE + 2);
        let whole: Vec<u8> = pieces.concat();
        assert_eq!(&whole[..100_000], &large[..]);
        assert_eq!(&whole[100_000..], b"\r\ntail");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_body_that_stops_arriving_fails_after_the_idle_timeout() {
        use http_body_util::BodyExt as _;
        let idle = std::time::Duration::from_secs(20);
        let (mut body, tx, stalled) = tracked(idle);
        tx.send(Ok(bytes::Bytes::from_static(b"part")))
            .await
            .expect("sent");
        let first = body
            .frame()
            .await
            .expect("a frame")
            .expect("the first part");
        assert_eq!(
            first.into_data().ok(),
            Some(bytes::Bytes::from_static(b"part"))
        );
        let started = tokio::time::Instant::now();
        let next = body.frame().await.expect("an answer");
        assert!(next.is_err(), "a stalled body fails");
        assert_eq!(started.elapsed(), idle);
        assert!(stalled.load(std::sync::atomic::Ordering::Acquire));
        // It stays failed: the rest of the request is not waited for.
        assert!(body.frame().await.expect("an answer").is_err());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_body_that_keeps_arriving_is_read_whole_however_long_it_takes() {
        use http_body_util::BodyExt as _;
        let idle = std::time::Duration::from_secs(20);
        let (body, tx, stalled) = tracked(idle);
        // A part just inside the idle timeout, ten times: far longer than the timeout in all.
        let sender = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(idle - std::time::Duration::from_secs(1)).await;
                tx.send(Ok(bytes::Bytes::from_static(b"x")))
                    .await
                    .expect("sent");
            }
        });
        let got = body.collect().await.expect("the whole body").to_bytes();
        assert_eq!(got.len(), 10);
        assert!(!stalled.load(std::sync::atomic::Ordering::Acquire));
        sender.await.expect("the sender does not panic");
    }

    #[test]
    fn every_error_document_gets_a_message_and_the_request_id() {
        let head = r#"<?xml version="1.0" encoding="UTF-8"?>"#;
        let rows = [
            // s3s's refusal of a bucket name: no message.
            (
                format!("{head}<Error><Code>InvalidBucketName</Code></Error>"),
                Some(format!("{head}<Error><Code>InvalidBucketName</Code><Message>The specified bucket is not valid.</Message><RequestId>r1</RequestId></Error>")),
            ),
            // An empty message is replaced; what follows the code stays.
            (
                "<Error><Code>KeyTooLongError</Code><Message></Message><Key>k</Key></Error>".into(),
                Some("<Error><Code>KeyTooLongError</Code><Message>Your key is too long.</Message><Key>k</Key><RequestId>r1</RequestId></Error>".into()),
            ),
            // A message of its own is kept; only the request ID is added.
            (
                "<Error><Code>NoSuchKey</Code><Message>gone &amp; away</Message></Error>".into(),
                Some("<Error><Code>NoSuchKey</Code><Message>gone &amp; away</Message><RequestId>r1</RequestId></Error>".into()),
            ),
            // An unknown code gets a sentence naming it.
            (
                "<Error><Code>Weird</Code></Error>".into(),
                Some("<Error><Code>Weird</Code><Message>The request failed: Weird.</Message><RequestId>r1</RequestId></Error>".into()),
            ),
            // Complete already, or no error document: nothing to do.
            (
                "<Error><Code>X</Code><Message>m</Message><RequestId>q</RequestId></Error>".into(),
                None,
            ),
            ("<ListBucketResult></ListBucketResult>".into(), None),
            ("<Error><Code>X</Code>".into(), None),
        ];
        for (xml, want) in rows {
            assert_eq!(complete_error_xml(&xml, "r1"), want, "{xml}");
        }
    }

    fn domains() -> Vec<String> {
        vec!["localhost".into(), "s3.localhost".into()]
    }

    #[test]
    fn version_2_signatures_long_presigned_urls_foreign_scopes_and_unsigned_hosts_are_refused_up_front(
    ) {
        let v4 = |region: &str, service: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/{region}/{service}/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature={}",
                "0".repeat(64)
            )
        };
        let presigned = |region: &str, expires: &str| {
            format!(
                "X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=AKIDEXAMPLE%2F20261125%2F{region}%2Fs3%2Faws4_request\
                 &X-Amz-Date=20261125T120000Z&X-Amz-Expires={expires}\
                 &X-Amz-SignedHeaders=host&X-Amz-Signature={}",
                "0".repeat(64)
            )
        };
        // (what, Authorization header, query, refusal: code and a part of its message)
        type Row<'a> = (&'a str, Option<String>, String, Option<(&'a str, &'a str)>);
        let rows: Vec<Row<'_>> = vec![
            ("anonymous", None, String::new(), None),
            ("v4 header", Some(v4("karri-1", "s3")), String::new(), None),
            (
                "v4 presigned, a week",
                None,
                presigned("karri-1", "604800"),
                None,
            ),
            (
                "v2 header",
                Some("AWS AKIDEXAMPLE:c2lnbmF0dXJl".into()),
                String::new(),
                Some(("InvalidRequest", "Please use AWS4-HMAC-SHA256")),
            ),
            (
                "v2 presigned",
                None,
                "AWSAccessKeyId=AKIDEXAMPLE&Expires=4102444800&Signature=c2ln".into(),
                Some(("InvalidRequest", "Please use AWS4-HMAC-SHA256")),
            ),
            (
                "presigned for more than a week",
                None,
                presigned("karri-1", "604801"),
                Some(("AuthorizationQueryParametersError", "604800")),
            ),
            (
                "presigned for 136 years",
                None,
                presigned("karri-1", "4294967295"),
                Some(("AuthorizationQueryParametersError", "604800")),
            ),
            (
                "presigned in another region",
                None,
                presigned("us-east-1", "60"),
                Some((
                    "AuthorizationQueryParametersError",
                    "the region 'us-east-1' is wrong; expecting 'karri-1'",
                )),
            ),
            (
                "header in another region",
                Some(v4("us-east-1", "s3")),
                String::new(),
                Some((
                    "AuthorizationHeaderMalformed",
                    "the region 'us-east-1' is wrong; expecting 'karri-1'",
                )),
            ),
            (
                "a session token",
                None,
                format!(
                    "{}&X-Amz-Security-Token=FQoGZXIvYXdz",
                    presigned("karri-1", "60")
                ),
                Some(("InvalidToken", "no temporary credentials")),
            ),
            (
                "header for another service",
                Some(v4("karri-1", "ec2")),
                String::new(),
                Some(("AuthorizationHeaderMalformed", "incorrect service 'ec2'")),
            ),
            (
                "header that does not sign host",
                Some(v4("karri-1", "s3").replace("host;x-amz-date", "x-amz-date")),
                String::new(),
                Some((
                    "AuthorizationHeaderMalformed",
                    "the host header must be signed",
                )),
            ),
            (
                "presigned without host",
                None,
                presigned("karri-1", "60")
                    .replace("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=x-amz-date"),
                Some((
                    "AuthorizationQueryParametersError",
                    "the host header must be signed",
                )),
            ),
            // Two mechanisms: s3s would check one of them, maybe the weaker.
            (
                "a presigned URL with an Authorization header too",
                Some("x".to_owned()),
                presigned("karri-1", "60"),
                Some(("InvalidArgument", "Only one auth mechanism allowed")),
            ),
            (
                "a version 2 header beside a version 4 credential",
                Some("AWS AKIAIOSFODNN7EXAMPLE:c2lnbmF0dXJl".to_owned()),
                "X-Amz-Credential=x".to_owned(),
                Some(("InvalidArgument", "Only one auth mechanism allowed")),
            ),
            (
                "a version 4 header beside a version 2 query signature",
                Some(v4("karri-1", "s3")),
                "AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=4000000000&Signature=c2ln".to_owned(),
                Some(("InvalidArgument", "Only one auth mechanism allowed")),
            ),
        ];
        for (what, authorization, query, want) in rows {
            let mut headers = http::HeaderMap::new();
            headers.insert("host", "localhost:8773".parse().unwrap());
            if let Some(a) = authorization {
                headers.insert("x-amz-date", "20261125T120000Z".parse().unwrap());
                headers.insert("authorization", a.parse().unwrap());
            }
            let got = auth_refusal("GET", "/b/k", &query, &headers, "karri-1", false);
            match (want, got) {
                (None, None) => {}
                (Some((code, text)), Some(r)) => {
                    assert_eq!(r.code, code, "{what}: {}", r.message);
                    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}");
                    assert!(r.message.contains(text), "{what}: {}", r.message);
                    let xml = r.xml("req-1");
                    assert!(xml.contains(&format!("<Code>{code}</Code>")), "{xml}");
                    // Clients sign again for the region the error names.
                    let wrong_region = r.message.contains("is wrong; expecting");
                    assert_eq!(
                        xml.contains("<Region>karri-1</Region>"),
                        wrong_region,
                        "{xml}"
                    );
                }
                (want, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn unsigned_amz_headers_are_refused_and_us_east_1_may_only_ask_where() {
        let header_auth = |region: &str, signed: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/{region}/s3/aws4_request, \
                 SignedHeaders={signed}, Signature={}",
                "0".repeat(64)
            )
        };
        let presigned = "X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIDEXAMPLE%2F20261125%2Fkarri-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20261125T120000Z&X-Amz-Expires=60\
             &X-Amz-SignedHeaders=host&X-Amz-Signature=00";
        // (what, method, path, query, Authorization, extra headers, refusal code, unsigned);
        // a path starting `vhost:` is sent to a bucket's virtual host.
        type Row<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a str,
            Option<String>,
            &'a [(&'a str, &'a str)],
            Option<&'a str>,
            Option<&'a str>,
        );
        let signed = "host;x-amz-acl;x-amz-content-sha256;x-amz-date";
        let rows: Vec<Row<'_>> = vec![
            (
                "every x-amz header signed",
                "PUT",
                "/b/k",
                "",
                Some(header_auth("karri-1", signed)),
                &[("x-amz-acl", "private")],
                None,
                None,
            ),
            (
                "an ACL added after signing",
                "PUT",
                "/b/k",
                "",
                Some(header_auth(
                    "karri-1",
                    "host;x-amz-content-sha256;x-amz-date",
                )),
                &[("x-amz-acl", "public-read"), ("x-amz-meta-a", "1")],
                Some("AccessDenied"),
                Some("x-amz-acl, x-amz-meta-a"),
            ),
            (
                "a copy source added to a presigned PUT",
                "PUT",
                "/b/k",
                presigned,
                None,
                &[("x-amz-copy-source", "/secret/k")],
                Some("AccessDenied"),
                Some("x-amz-copy-source"),
            ),
            (
                "a presigned GET with ordinary headers",
                "GET",
                "/b/k",
                presigned,
                None,
                &[("range", "bytes=0-1"), ("user-agent", "curl")],
                None,
                None,
            ),
            (
                "buckets listed for us-east-1",
                "GET",
                "/",
                "",
                Some(header_auth("us-east-1", signed)),
                &[],
                None,
                None,
            ),
            (
                "a location asked for us-east-1 (path style)",
                "GET",
                "/b",
                "location",
                Some(header_auth("us-east-1", signed)),
                &[],
                None,
                None,
            ),
            (
                "a location asked for us-east-1 at the Eucalyptus path",
                "GET",
                "/services/objectstorage/b/",
                "location=",
                Some(header_auth("us-east-1", signed)),
                &[],
                None,
                None,
            ),
            (
                "an object read for us-east-1",
                "GET",
                "/b/k",
                "",
                Some(header_auth("us-east-1", signed)),
                &[],
                Some("AuthorizationHeaderMalformed"),
                None,
            ),
            (
                "a bucket made for us-east-1",
                "PUT",
                "/b",
                "",
                Some(header_auth("us-east-1", signed)),
                &[],
                Some("AuthorizationHeaderMalformed"),
                None,
            ),
            (
                "a listing with parameters for us-east-1",
                "GET",
                "/b",
                "list-type=2",
                Some(header_auth("us-east-1", signed)),
                &[],
                Some("AuthorizationHeaderMalformed"),
                None,
            ),
            (
                "buckets listed for us-east-1 by a newer SDK",
                "GET",
                "/",
                "x-id=ListBuckets",
                Some(header_auth("us-east-1", signed)),
                &[],
                None,
                None,
            ),
            (
                "a location asked for us-east-1 at a bucket's virtual host",
                "GET",
                "vhost:/",
                "location",
                Some(header_auth("us-east-1", signed)),
                &[],
                None,
                None,
            ),
            (
                "a bucket listed for us-east-1 at its virtual host",
                "GET",
                "vhost:/",
                "",
                Some(header_auth("us-east-1", signed)),
                &[],
                Some("AuthorizationHeaderMalformed"),
                None,
            ),
            (
                "an object read for us-east-1 through an encoded slash",
                "GET",
                "/b%2Fk",
                "location",
                Some(header_auth("us-east-1", signed)),
                &[],
                Some("AuthorizationHeaderMalformed"),
                None,
            ),
            (
                "an object read for us-east-1 under another x-id",
                "GET",
                "/b",
                "location&x-id=GetObject",
                Some(header_auth("us-east-1", signed)),
                &[],
                Some("AuthorizationHeaderMalformed"),
                None,
            ),
            (
                "buckets listed for another region",
                "GET",
                "/",
                "",
                Some(header_auth("eu-west-1", signed)),
                &[],
                Some("AuthorizationHeaderMalformed"),
                None,
            ),
        ];
        for (what, method, path, query, authorization, extra, code, unsigned) in rows {
            let (path, vhost) = match path.strip_prefix("vhost:") {
                Some(p) => (p, true),
                None => (path, false),
            };
            let mut headers = http::HeaderMap::new();
            headers.insert("host", "localhost:8773".parse().unwrap());
            if let Some(a) = authorization {
                headers.insert("authorization", a.parse().unwrap());
                headers.insert("x-amz-date", "20261125T120000Z".parse().unwrap());
                headers.insert("x-amz-content-sha256", "UNSIGNED-PAYLOAD".parse().unwrap());
            }
            for (name, value) in extra {
                headers.insert(*name, value.parse().unwrap());
            }
            let got = auth_refusal(method, path, query, &headers, "karri-1", vhost);
            assert_eq!(got.as_ref().map(|r| r.code), code, "{what}: {got:?}");
            let got_unsigned = got.as_ref().and_then(|r| r.headers_not_signed.as_deref());
            assert_eq!(got_unsigned, unsigned, "{what}");
            if let Some(r) = got.filter(|r| r.code == "AccessDenied") {
                assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}");
                let xml = r.xml("req-1");
                assert!(xml.contains("<HeadersNotSigned>"), "{xml}");
            }
        }
    }

    #[test]
    fn object_lock_and_appends_are_refused_before_they_could_be_ignored() {
        // (what, headers, query, code and status)
        type Row<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            &'a str,
            Option<(&'a str, u16)>,
        );
        let rows: Vec<Row<'_>> = vec![
            ("a plain PUT", &[("content-type", "text/plain")], "", None),
            (
                "a bucket with Object Lock",
                &[("x-amz-bucket-object-lock-enabled", "True")],
                "",
                Some(("NotImplemented", 501)),
            ),
            (
                "a bucket without Object Lock",
                &[("x-amz-bucket-object-lock-enabled", "false")],
                "",
                None,
            ),
            (
                "a locked object",
                &[("x-amz-object-lock-mode", "COMPLIANCE")],
                "",
                Some(("InvalidRequest", 400)),
            ),
            (
                "a legal hold",
                &[("x-amz-object-lock-legal-hold", "ON")],
                "",
                Some(("InvalidRequest", 400)),
            ),
            (
                "a retention date in a presigned query",
                &[],
                "X-Amz-Algorithm=AWS4-HMAC-SHA256&x-amz-object-lock-retain-until-date=2030-01-01T00%3A00%3A00Z",
                Some(("InvalidRequest", 400)),
            ),
            (
                "an append",
                &[("x-amz-write-offset-bytes", "6")],
                "",
                Some(("NotImplemented", 501)),
            ),
        ];
        for (what, headers, query, want) in rows {
            let mut map = http::HeaderMap::new();
            for (name, value) in headers {
                map.insert(*name, value.parse().unwrap());
            }
            let got = feature_refusal(query, &map).map(|r| (r.code, r.status.as_u16()));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn virtual_hosts_name_buckets_under_the_longest_domain() {
        let d = domains();
        let rows = [
            ("photos.s3.localhost:8773", Some("photos")),
            ("photos.localhost", Some("photos")),
            ("s3.localhost:8773", None),
            ("localhost:8773", None),
            ("127.0.0.1:8773", None),
            ("my.dotted.bucket.s3.localhost", Some("my.dotted.bucket")),
            ("example.com", None),
            ("[::1]:8773", None),
        ];
        for (host, want) in rows {
            assert_eq!(virtual_bucket(&d, host), want, "{host}");
        }
        assert_eq!(strip_port("[::1]:8773"), "[::1]");
        assert_eq!(strip_port("s3.localhost:8773"), "s3.localhost");
        assert_eq!(strip_port("s3.localhost"), "s3.localhost");
    }

    #[test]
    fn requests_reach_the_face_their_signature_or_shape_names() {
        let d = domains();
        let sig = |service: &str| {
            format!("AWS4-HMAC-SHA256 Credential=AKID/20260101/karri-1/{service}/aws4_request, SignedHeaders=host, Signature=00")
        };
        // (method, uri, authorization, host, content type, face)
        let rows: Vec<(Method, &str, String, &str, &str, Face)> = vec![
            (Method::GET, "/bucket/key", sig("s3"), "127.0.0.1", "", Face::S3),
            (Method::POST, "/", sig("ec2"), "127.0.0.1", "application/x-www-form-urlencoded", Face::Ec2),
            (Method::GET, "/", sig("s3"), "127.0.0.1", "", Face::S3),
            (Method::GET, "/api/v1/namespaces", "Bearer t".into(), "127.0.0.1", "", Face::Kube),
            (Method::GET, "/apis", String::new(), "127.0.0.1", "", Face::Kube),
            (Method::GET, "/healthz", String::new(), "127.0.0.1", "", Face::Kube),
            (Method::GET, "/", String::new(), "127.0.0.1", "", Face::Kube),
            (Method::GET, "/?Action=DescribeRegions&X-Amz-Credential=AKID%2F20260101%2Fkarri-1%2Fec2%2Faws4_request", String::new(), "127.0.0.1", "", Face::Ec2),
            (Method::GET, "/b/k?X-Amz-Credential=AKID%2F20260101%2Fkarri-1%2Fs3%2Faws4_request&X-Amz-Signature=00", String::new(), "127.0.0.1", "", Face::S3),
            (Method::GET, "/public-bucket/object", String::new(), "127.0.0.1", "", Face::S3),
            (Method::GET, "/", String::new(), "photos.s3.localhost:8773", "", Face::S3),
            (Method::GET, "/services/objectstorage/b", String::new(), "127.0.0.1", "", Face::S3),
            (Method::POST, "/services/compute", sig("ec2"), "127.0.0.1", "", Face::Ec2),
            (Method::GET, "/b/k", "AWS AKID:sig".into(), "127.0.0.1", "", Face::S3),
        ];
        for (method, uri, auth, host, ctype, want) in rows {
            let mut headers = HeaderMap::new();
            if !auth.is_empty() {
                headers.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
            }
            headers.insert(http::header::HOST, host.parse().unwrap());
            if !ctype.is_empty() {
                headers.insert(http::header::CONTENT_TYPE, ctype.parse().unwrap());
            }
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(
                classify(&method, &uri, &headers, &d),
                want,
                "{method} {uri} {auth:?} {host}"
            );
        }
    }

    #[test]
    fn the_eucalyptus_prefix_and_signing_parameters_are_dropped() {
        let rows = [
            ("/services/objectstorage/b/k", Some("/b/k")),
            ("/services/objectstorage", Some("/")),
            (
                "/services/objectstorage/b?uploads&X-Amz-Signature=00&X-Amz-Date=1",
                Some("/b?uploads"),
            ),
            ("/services/objectstoragex/b", None),
        ];
        for (from, want) in rows {
            let uri: Uri = from.parse().unwrap();
            assert_eq!(
                strip_euca_uri(&uri).map(|u| u.to_string()),
                want.map(str::to_string),
                "{from}"
            );
        }
    }
}
