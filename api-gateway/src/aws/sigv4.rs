//! AWS Signature Version 4 verification (pure).
//!
//! The AWS-protocol faces (EC2, and S3 for what s3s leaves to it) authenticate requests with
//! [SigV4](https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv.html).
//! This module is the pure part of that: it finds the signature in a request
//! ([`parse`]), rebuilds the canonical request and string to sign, and compares
//! signatures in constant time ([`verify`]). It does no I/O: the caller looks
//! up the secret access key for [`ParsedAuth::access_key_id`], computes the
//! payload hash, and passes the current time in.
//!
//! Two path rules exist ([`PathStyle`]): every service but S3 normalizes `.`,
//! `..` and empty segments and encodes the path as received once more (the
//! spec's "double encoding"); S3 keeps the path as it is and encodes each
//! decoded segment once.
//!
//! The `host` header must be signed. Over HTTP/2 there is no `Host` header,
//! so the caller must insert one from the `:authority` before calling in.
//! Authentication parameters are read from the `Authorization` header and the
//! query string only, never from a form body.

use std::fmt;

use axum::http::{HeaderMap, HeaderValue};
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

/// The only signing algorithm accepted: `AWS4-HMAC-SHA256`.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The last element of every credential scope.
pub const TERMINATOR: &str = "aws4_request";

/// The longest lifetime of a presigned URL, in seconds (seven days).
pub const MAX_PRESIGNED_EXPIRES: u64 = 604_800;

/// The clock skew AWS tolerates between a signed request and the server.
pub const DEFAULT_MAX_SKEW: TimeDelta = TimeDelta::minutes(15);

/// `hex(sha256(""))`: the payload hash of an empty body.
pub const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The payload hash S3 clients send when the body is not signed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// The payload hash S3 clients send for `aws-chunked` signed streaming uploads.
pub const STREAMING_PAYLOAD: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";

/// The `yyyyMMdd'T'HHmmss'Z'` form of `X-Amz-Date` and of the string to sign.
const AMZ_DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// Everything but the SigV4 unreserved characters `A-Z a-z 0-9 - _ . ~`.
const SIGV4_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

type HmacSha256 = Hmac<Sha256>;

/// Why a request's signature was not accepted.
///
/// [`SigV4Error::aws_code`] gives the EC2 error code of each; the S3 face maps
/// them on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// The request carries no authentication at all (for callers that refuse
    /// anonymous requests after [`parse`] returned `Ok(None)`).
    #[error("Request is missing Authentication Token.")]
    MissingAuthentication,
    /// The `Authorization` header (or a presigned URL's `X-Amz-SignedHeaders`)
    /// is not well-formed SigV4.
    #[error("The signature information is malformed: {0}.")]
    MalformedAuthorization(String),
    /// The credential is not `<access key>/<yyyymmdd>/<region>/<service>/<terminator>`.
    #[error(
        "The credential '{0}' is malformed; expected <access key>/<yyyymmdd>/<region>/<service>/aws4_request."
    )]
    MalformedCredential(String),
    /// A presigned URL lacks one of its `X-Amz-*` parameters.
    #[error("Query-string authentication requires the {0} parameter.")]
    MissingQueryParameter(&'static str),
    /// A presigned URL repeats one of its `X-Amz-*` parameters.
    #[error("The {0} query parameter appears more than once.")]
    DuplicateQueryParameter(&'static str),
    /// Neither `X-Amz-Date` nor `Date` is present.
    #[error("Authorization requires either an X-Amz-Date or a Date header.")]
    MissingDate,
    /// The request date cannot be read.
    #[error("The request date '{0}' is not in the ISO 8601 basic format yyyyMMdd'T'HHmmss'Z'.")]
    MalformedDate(String),
    /// The request is signed with something other than `AWS4-HMAC-SHA256`,
    /// such as signature version 2 (`AWS AKID:signature`).
    #[error(
        "The signature algorithm '{0}' is not supported; sign requests with AWS4-HMAC-SHA256."
    )]
    UnsupportedAlgorithm(String),
    /// Both the `Authorization` header and presigned query parameters are present.
    #[error("Only one authentication method is allowed: the Authorization header or the X-Amz-* query parameters.")]
    ConflictingAuthentication,
    /// `X-Amz-Expires` is not a whole number of seconds in `1..=604800`.
    #[error("X-Amz-Expires must be a number of seconds from 1 to 604800, not '{0}'.")]
    InvalidExpires(String),
    /// The credential scope's date is not the request's date.
    #[error(
        "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{scope_date}' != '{request_date}'."
    )]
    ScopeDateMismatch {
        /// The date in the credential scope.
        scope_date: String,
        /// The `yyyymmdd` of the request time.
        request_date: String,
    },
    /// The credential is scoped to another region.
    #[error("Credential should be scoped to a valid region, not '{0}'.")]
    WrongRegion(String),
    /// The credential is scoped to another service.
    #[error("Credential should be scoped to correct service: '{expected}'.")]
    WrongService {
        /// The service (or services) this face accepts.
        expected: String,
        /// The service in the credential scope.
        got: String,
    },
    /// The credential scope does not end in `aws4_request`.
    #[error("Credential should be scoped with a valid terminator: 'aws4_request', not '{0}'.")]
    WrongTerminator(String),
    /// `host` is not among the signed headers.
    #[error("The host header must be signed.")]
    HostNotSigned,
    /// A header listed in the signed headers is absent from the request.
    #[error("The signed header '{0}' is not present in the request.")]
    SignedHeaderMissing(String),
    /// The request time is too far from the server time.
    #[error(
        "Request has expired: the request time {} is more than {} minutes away from the server time {}.",
        amz_date(.request_time), .max_skew.num_minutes(), amz_date(.now)
    )]
    RequestTimeSkewed {
        /// When the request says it was signed.
        request_time: DateTime<Utc>,
        /// The server time.
        now: DateTime<Utc>,
        /// The tolerated skew.
        max_skew: TimeDelta,
    },
    /// A presigned URL is past its expiry.
    #[error("Request has expired: the presigned URL expired at {}, and it is now {}.", amz_date(.expired_at), amz_date(.now))]
    PresignedUrlExpired {
        /// Signing time plus `X-Amz-Expires`.
        expired_at: DateTime<Utc>,
        /// The server time.
        now: DateTime<Utc>,
    },
    /// The signature is not the one computed with the secret key.
    ///
    /// The canonical request and string to sign are kept for logs and for
    /// S3's error body; they are not part of the message.
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method."
    )]
    SignatureDoesNotMatch {
        /// The canonical request the server computed.
        canonical_request: String,
        /// The string to sign the server computed.
        string_to_sign: String,
    },
}

impl SigV4Error {
    /// The EC2 Query API error code for this error.
    pub fn aws_code(&self) -> &'static str {
        match self {
            Self::MissingAuthentication => "MissingAuthenticationToken",
            Self::MalformedAuthorization(_)
            | Self::MalformedCredential(_)
            | Self::MissingQueryParameter(_)
            | Self::DuplicateQueryParameter(_)
            | Self::MissingDate
            | Self::MalformedDate(_)
            | Self::UnsupportedAlgorithm(_)
            | Self::ConflictingAuthentication
            | Self::InvalidExpires(_)
            | Self::SignedHeaderMissing(_) => "IncompleteSignature",
            Self::ScopeDateMismatch { .. }
            | Self::WrongRegion(_)
            | Self::WrongService { .. }
            | Self::WrongTerminator(_)
            | Self::HostNotSigned => "AuthFailure",
            Self::RequestTimeSkewed { .. } | Self::PresignedUrlExpired { .. } => "RequestExpired",
            Self::SignatureDoesNotMatch { .. } => "SignatureDoesNotMatch",
        }
    }
}

/// The parts of an HTTP request that SigV4 covers, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// The method, e.g. `POST`.
    pub method: &'a str,
    /// The path as received, still percent-encoded, without the query.
    pub path: &'a str,
    /// The query string as received, without the `?` (empty if none).
    pub query: &'a str,
    /// The request headers; `host` must be present.
    pub headers: &'a HeaderMap,
    /// The payload hash to sign with: `hex(sha256(body))` (see
    /// [`payload_sha256_hex`]) or, for S3, the `x-amz-content-sha256` value
    /// such as [`UNSIGNED_PAYLOAD`].
    pub payload_hash: &'a str,
}

/// Where the signature was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthLocation {
    /// In the `Authorization` header.
    Header,
    /// In the query string (a presigned URL).
    Query {
        /// `X-Amz-Expires`, in seconds (checked by [`verify`]).
        expires_secs: u64,
    },
}

/// The credential scope: `<yyyymmdd>/<region>/<service>/aws4_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialScope {
    /// The signing date, `yyyymmdd`.
    pub date: String,
    /// The region, e.g. `karri-1`.
    pub region: String,
    /// The service, e.g. `ec2`.
    pub service: String,
    /// The terminator; valid only if it is [`TERMINATOR`].
    pub terminator: String,
}

impl fmt::Display for CredentialScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.date, self.region, self.service, self.terminator
        )
    }
}

/// The SigV4 authentication found in a request by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAuth {
    /// The access key id that signed the request.
    pub access_key_id: String,
    /// The credential scope.
    pub scope: CredentialScope,
    /// The signed header names, lower-cased, in the order given.
    pub signed_headers: Vec<String>,
    /// The signature, as given (hex).
    pub signature: String,
    /// The request time as it enters the string to sign (`yyyyMMdd'T'HHmmss'Z'`).
    pub amz_date: String,
    /// The request time.
    pub request_time: DateTime<Utc>,
    /// Where the signature was found.
    pub location: AuthLocation,
    /// The session token (`X-Amz-Security-Token`), if any; checking it is the caller's job.
    pub security_token: Option<String>,
}

impl ParsedAuth {
    /// Whether the signature came from presigned query parameters.
    pub fn is_presigned(&self) -> bool {
        matches!(self.location, AuthLocation::Query { .. })
    }

    /// When a presigned URL expires (`None` for header signatures or an
    /// out-of-range `X-Amz-Expires`).
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        match self.location {
            AuthLocation::Header => None,
            AuthLocation::Query { expires_secs } => {
                let secs = i64::try_from(expires_secs).ok()?;
                self.request_time
                    .checked_add_signed(TimeDelta::try_seconds(secs)?)
            }
        }
    }
}

/// How the canonical URI is built from the received path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStyle {
    /// Every service but S3: remove `.`, `..` and empty segments, then encode
    /// the path as received once more (so `%20` becomes `%2520`).
    Normalized,
    /// S3: keep every segment, decode it and encode it once.
    S3,
}

/// What [`verify`] accepts besides a correct signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// The region credentials must be scoped to, e.g. `karri-1`.
    pub region: String,
    /// The service names credentials may be scoped to, e.g. `ec2`.
    pub services: Vec<String>,
    /// The largest tolerated distance between request and server time (for
    /// presigned URLs: how far the signing time may be in the future).
    pub max_skew: TimeDelta,
    /// How the canonical URI is built.
    pub path_style: PathStyle,
}

impl VerifyPolicy {
    /// The EC2 face's policy: service `ec2`, 15 minutes of skew, normalized paths.
    pub fn ec2(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            services: vec!["ec2".to_owned()],
            max_skew: DEFAULT_MAX_SKEW,
            path_style: PathStyle::Normalized,
        }
    }

    /// The S3 face's policy: service `s3`, 15 minutes of skew, S3 paths.
    pub fn s3(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            services: vec!["s3".to_owned()],
            max_skew: DEFAULT_MAX_SKEW,
            path_style: PathStyle::S3,
        }
    }
}

/// Finds the SigV4 authentication of a request.
///
/// Returns `Ok(None)` when the request carries no authentication at all (no
/// `Authorization` header, no `X-Amz-*` signature parameters and no
/// version 2 signature), so the caller can answer `MissingAuthenticationToken`
/// or serve an anonymous S3 request.
pub fn parse(request: &SignedRequest<'_>) -> Result<Option<ParsedAuth>, SigV4Error> {
    let params = query_params(request.query);
    let presigned = params.iter().any(|(k, _)| {
        matches!(
            k.as_str(),
            "X-Amz-Algorithm" | "X-Amz-Credential" | "X-Amz-Signature" | "X-Amz-SignedHeaders"
        )
    });
    let mut authorization = request
        .headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter();
    let header = authorization.next();
    if authorization.next().is_some() {
        return Err(SigV4Error::MalformedAuthorization(
            "the Authorization header appears more than once".to_owned(),
        ));
    }
    let version2 = version2_query(&params);
    match (header, presigned) {
        (Some(_), true) => Err(SigV4Error::ConflictingAuthentication),
        // A signature version 2 query beside a header or a version 4 query is a second
        // mechanism too: refused, so that no checker down the line picks the weaker one.
        (Some(_), false) | (None, true) if version2.is_some() => {
            Err(SigV4Error::ConflictingAuthentication)
        }
        (Some(value), false) => parse_header(value, request.headers).map(Some),
        (None, true) => parse_presigned(&params).map(Some),
        (None, false) => match version2 {
            Some(algorithm) => Err(SigV4Error::UnsupportedAlgorithm(algorithm)),
            None => Ok(None),
        },
    }
}

/// Verifies a parsed signature against the request and the secret access key.
///
/// Checks, in order: the presigned expiry range, the credential scope (date,
/// region, service, terminator), that `host` is signed, the request time
/// against `now`, and finally the signature itself (in constant time).
pub fn verify(
    parsed: &ParsedAuth,
    request: &SignedRequest<'_>,
    secret_access_key: &str,
    now: DateTime<Utc>,
    policy: &VerifyPolicy,
) -> Result<(), SigV4Error> {
    if let AuthLocation::Query { expires_secs } = parsed.location {
        if !(1..=MAX_PRESIGNED_EXPIRES).contains(&expires_secs) {
            return Err(SigV4Error::InvalidExpires(expires_secs.to_string()));
        }
    }
    check_scope(parsed, policy)?;
    if !parsed.signed_headers.iter().any(|h| h == "host") {
        return Err(SigV4Error::HostNotSigned);
    }
    check_time(parsed, now, policy.max_skew)?;

    let canonical_request = canonical_request(parsed, request, policy.path_style)?;
    let string_to_sign = string_to_sign(&parsed.amz_date, &parsed.scope, &canonical_request);
    let key = signing_key(
        secret_access_key,
        &parsed.scope.date,
        &parsed.scope.region,
        &parsed.scope.service,
    );
    if signature_matches(&key, &string_to_sign, &parsed.signature) {
        Ok(())
    } else {
        Err(SigV4Error::SignatureDoesNotMatch {
            canonical_request,
            string_to_sign,
        })
    }
}

/// Builds the canonical request of `request` as the signer should have.
///
/// Fails only when a signed header is absent from the request.
pub fn canonical_request(
    parsed: &ParsedAuth,
    request: &SignedRequest<'_>,
    path_style: PathStyle,
) -> Result<String, SigV4Error> {
    let headers = canonical_headers(request.headers, &parsed.signed_headers)?;
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method,
        canonical_uri(request.path, path_style),
        canonical_query_string(request.query, parsed.is_presigned()),
        headers,
        parsed.signed_headers.join(";"),
        request.payload_hash,
    ))
}

/// The canonical URI of a path as received (percent-encoded).
///
/// [`PathStyle::Normalized`] removes `.` and `..` segments and repeated
/// slashes (keeping a trailing slash, as botocore does) and encodes the
/// received segments once more; [`PathStyle::S3`] keeps all segments and
/// encodes each decoded segment once. An empty path is `/`.
pub fn canonical_uri(path: &str, style: PathStyle) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    match style {
        PathStyle::S3 => path
            .split('/')
            .map(|segment| {
                let decoded: Vec<u8> = percent_decode_str(segment).collect();
                encode(&decoded)
            })
            .collect::<Vec<_>>()
            .join("/"),
        PathStyle::Normalized => {
            let mut segments: Vec<&str> = Vec::new();
            for segment in path.split('/') {
                match segment {
                    "" | "." => {}
                    ".." => {
                        segments.pop();
                    }
                    other => segments.push(other),
                }
            }
            let mut uri = String::with_capacity(path.len() + 8);
            for segment in &segments {
                uri.push('/');
                uri.push_str(&encode(segment.as_bytes()));
            }
            if segments.is_empty() || path.ends_with('/') {
                uri.push('/');
            }
            uri
        }
    }
}

/// The canonical query string of a query as received.
///
/// Each name and value is decoded and encoded again with the SigV4
/// unreserved set (`+` is a literal plus, not a space); pairs are sorted by
/// encoded name, then value. `X-Amz-Signature` is left out when
/// `exclude_signature` is set (presigned URLs).
pub fn canonical_query_string(query: &str, exclude_signature: bool) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name: Vec<u8> = percent_decode_str(name).collect();
            if exclude_signature && name == b"X-Amz-Signature" {
                return None;
            }
            let value: Vec<u8> = percent_decode_str(value).collect();
            Some((encode(&name), encode(&value)))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The string to sign: algorithm, request time, scope and the hash of the
/// canonical request, one per line.
pub fn string_to_sign(amz_date: &str, scope: &CredentialScope, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

/// The SigV4 signing key for a secret, a `yyyymmdd` date, a region and a service.
pub fn signing_key(secret_access_key: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_secret = format!("AWS4{secret_access_key}");
    let k_date = hmac_sha256(k_secret.as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, TERMINATOR.as_bytes())
}

/// The signature of a string to sign, as lower-case hex.
pub fn signature_hex(signing_key: &[u8; 32], string_to_sign: &str) -> String {
    hex::encode(hmac_sha256(signing_key, string_to_sign.as_bytes()))
}

/// Whether `provided_hex` is the signature of `string_to_sign`, compared in
/// constant time. A signature that is not hex never matches.
pub fn signature_matches(signing_key: &[u8; 32], string_to_sign: &str, provided_hex: &str) -> bool {
    let Ok(provided) = hex::decode(provided_hex) else {
        return false;
    };
    let mut mac = new_mac(signing_key);
    mac.update(string_to_sign.as_bytes());
    mac.verify_slice(&provided).is_ok()
}

/// `hex(sha256(body))`: the payload hash of a body.
pub fn payload_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = new_mac(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn encode(bytes: &[u8]) -> String {
    percent_encode(bytes, SIGV4_ENCODE).to_string()
}

fn amz_date(time: &DateTime<Utc>) -> String {
    time.format(AMZ_DATE_FORMAT).to_string()
}

/// The query's `(name, value)` pairs, decoded (lossily, for reading the
/// `X-Amz-*` parameters; the canonical form works on bytes).
fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode_str(name).decode_utf8_lossy().into_owned(),
                percent_decode_str(value).decode_utf8_lossy().into_owned(),
            )
        })
        .collect()
}

/// The algorithm named by a signature version 2 query (EC2's
/// `SignatureVersion=2`, S3's `AWSAccessKeyId`+`Signature`), if any.
fn version2_query(params: &[(String, String)]) -> Option<String> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    get("Signature")?;
    if let Some(version) = get("SignatureVersion") {
        return Some(match get("SignatureMethod") {
            Some(method) => format!("SignatureVersion {version} ({method})"),
            None => format!("SignatureVersion {version}"),
        });
    }
    get("AWSAccessKeyId").map(|_| "AWS".to_owned())
}

fn parse_header(value: &HeaderValue, headers: &HeaderMap) -> Result<ParsedAuth, SigV4Error> {
    let malformed = |why: &str| SigV4Error::MalformedAuthorization(why.to_owned());
    let value = value
        .to_str()
        .map_err(|_| {
            malformed("the Authorization header contains characters that are not visible ASCII")
        })?
        .trim();
    let (scheme, rest) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((value, ""));
    if scheme != ALGORITHM {
        if !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(SigV4Error::UnsupportedAlgorithm(scheme.to_owned()));
        }
        return Err(malformed(
            "the Authorization header must start with AWS4-HMAC-SHA256",
        ));
    }

    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for component in rest.split(',').map(str::trim) {
        if component.is_empty() {
            continue;
        }
        let Some((key, val)) = component.split_once('=') else {
            return Err(SigV4Error::MalformedAuthorization(format!(
                "'{component}' is not a key=value pair"
            )));
        };
        let slot = match key.trim() {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => continue,
        };
        if slot.replace(val.trim()).is_some() {
            return Err(SigV4Error::MalformedAuthorization(format!(
                "{} is given more than once",
                key.trim()
            )));
        }
    }
    let credential = credential
        .ok_or_else(|| malformed("the Authorization header requires a Credential parameter"))?;
    let signed_headers = signed_headers
        .ok_or_else(|| malformed("the Authorization header requires a SignedHeaders parameter"))?;
    let signature = signature
        .ok_or_else(|| malformed("the Authorization header requires a Signature parameter"))?;
    if signature.is_empty() {
        return Err(malformed("the Signature is empty"));
    }
    let (access_key_id, scope) = parse_credential(credential)?;
    let signed_headers = parse_signed_headers(signed_headers).ok_or_else(|| {
        malformed("SignedHeaders must be a non-empty list of names separated by ';'")
    })?;
    let (amz_date, request_time) = header_date(headers)?;
    let security_token = headers
        .get("x-amz-security-token")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());

    Ok(ParsedAuth {
        access_key_id,
        scope,
        signed_headers,
        signature: signature.to_owned(),
        amz_date,
        request_time,
        location: AuthLocation::Header,
        security_token,
    })
}

fn parse_presigned(params: &[(String, String)]) -> Result<ParsedAuth, SigV4Error> {
    let get = |name: &'static str| -> Result<Option<&str>, SigV4Error> {
        let mut found = params.iter().filter(|(k, _)| k == name);
        let first = found.next();
        if found.next().is_some() {
            return Err(SigV4Error::DuplicateQueryParameter(name));
        }
        Ok(first.map(|(_, v)| v.as_str()))
    };
    let require = |name: &'static str| -> Result<&str, SigV4Error> {
        get(name)?.ok_or(SigV4Error::MissingQueryParameter(name))
    };

    let algorithm = require("X-Amz-Algorithm")?;
    if algorithm != ALGORITHM {
        return Err(SigV4Error::UnsupportedAlgorithm(algorithm.to_owned()));
    }
    let credential = require("X-Amz-Credential")?;
    let date = require("X-Amz-Date")?;
    let expires = require("X-Amz-Expires")?;
    let signed_headers = require("X-Amz-SignedHeaders")?;
    let signature = require("X-Amz-Signature")?;
    let security_token = get("X-Amz-Security-Token")?.map(str::to_owned);

    let (access_key_id, scope) = parse_credential(credential)?;
    let signed_headers = parse_signed_headers(signed_headers).ok_or_else(|| {
        SigV4Error::MalformedAuthorization(
            "X-Amz-SignedHeaders must be a non-empty list of names separated by ';'".to_owned(),
        )
    })?;
    if signature.is_empty() {
        return Err(SigV4Error::MissingQueryParameter("X-Amz-Signature"));
    }
    let expires_secs = if !expires.is_empty() && expires.bytes().all(|b| b.is_ascii_digit()) {
        expires
            .parse::<u64>()
            .map_err(|_| SigV4Error::InvalidExpires(expires.to_owned()))?
    } else {
        return Err(SigV4Error::InvalidExpires(expires.to_owned()));
    };
    let request_time = parse_amz_date(date)?;

    Ok(ParsedAuth {
        access_key_id,
        scope,
        signed_headers,
        signature: signature.to_owned(),
        amz_date: date.to_owned(),
        request_time,
        location: AuthLocation::Query { expires_secs },
        security_token,
    })
}

fn parse_credential(credential: &str) -> Result<(String, CredentialScope), SigV4Error> {
    let malformed = || SigV4Error::MalformedCredential(credential.to_owned());
    let parts: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = parts.as_slice() else {
        return Err(malformed());
    };
    if [access_key_id, region, service, terminator]
        .iter()
        .any(|part| part.is_empty())
        || date.len() != 8
        || !date.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(malformed());
    }
    Ok((
        (*access_key_id).to_owned(),
        CredentialScope {
            date: (*date).to_owned(),
            region: (*region).to_owned(),
            service: (*service).to_owned(),
            terminator: (*terminator).to_owned(),
        },
    ))
}

/// The signed header names, lower-cased; `None` if the list or a name is empty.
fn parse_signed_headers(list: &str) -> Option<Vec<String>> {
    if list.is_empty() {
        return None;
    }
    list.split(';')
        .map(|name| (!name.is_empty()).then(|| name.to_ascii_lowercase()))
        .collect()
}

/// The request time from `X-Amz-Date`, or else from `Date` (RFC 1123).
fn header_date(headers: &HeaderMap) -> Result<(String, DateTime<Utc>), SigV4Error> {
    if let Some(value) = headers.get("x-amz-date") {
        let text = value
            .to_str()
            .map_err(|_| {
                SigV4Error::MalformedDate(String::from_utf8_lossy(value.as_bytes()).into_owned())
            })?
            .trim();
        return Ok((text.to_owned(), parse_amz_date(text)?));
    }
    let Some(value) = headers.get(axum::http::header::DATE) else {
        return Err(SigV4Error::MissingDate);
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let time = DateTime::parse_from_rfc2822(text.trim())
        .map_err(|_| SigV4Error::MalformedDate(text.clone().into_owned()))?
        .with_timezone(&Utc);
    Ok((amz_date(&time), time))
}

fn parse_amz_date(text: &str) -> Result<DateTime<Utc>, SigV4Error> {
    let malformed = || SigV4Error::MalformedDate(text.to_owned());
    if text.len() != 16 || !text.is_ascii() {
        return Err(malformed());
    }
    NaiveDateTime::parse_from_str(text, AMZ_DATE_FORMAT)
        .map(|naive| naive.and_utc())
        .map_err(|_| malformed())
}

fn check_scope(parsed: &ParsedAuth, policy: &VerifyPolicy) -> Result<(), SigV4Error> {
    let scope = &parsed.scope;
    let request_date = parsed.request_time.format("%Y%m%d").to_string();
    if scope.date != request_date {
        return Err(SigV4Error::ScopeDateMismatch {
            scope_date: scope.date.clone(),
            request_date,
        });
    }
    if scope.region != policy.region {
        return Err(SigV4Error::WrongRegion(scope.region.clone()));
    }
    if !policy.services.contains(&scope.service) {
        return Err(SigV4Error::WrongService {
            expected: policy.services.join("' or '"),
            got: scope.service.clone(),
        });
    }
    if scope.terminator != TERMINATOR {
        return Err(SigV4Error::WrongTerminator(scope.terminator.clone()));
    }
    Ok(())
}

fn check_time(
    parsed: &ParsedAuth,
    now: DateTime<Utc>,
    max_skew: TimeDelta,
) -> Result<(), SigV4Error> {
    let ahead = parsed.request_time.signed_duration_since(now);
    let skewed = SigV4Error::RequestTimeSkewed {
        request_time: parsed.request_time,
        now,
        max_skew,
    };
    match parsed.location {
        AuthLocation::Header => {
            if ahead.abs() > max_skew {
                return Err(skewed);
            }
        }
        AuthLocation::Query { expires_secs } => {
            if ahead > max_skew {
                return Err(skewed);
            }
            let expired_at = parsed
                .expires_at()
                .ok_or_else(|| SigV4Error::InvalidExpires(expires_secs.to_string()))?;
            if now > expired_at {
                return Err(SigV4Error::PresignedUrlExpired { expired_at, now });
            }
        }
    }
    Ok(())
}

/// The canonical headers block: `name:value\n` for each signed header, values
/// trimmed with inner whitespace runs collapsed, repeated headers joined by `,`.
fn canonical_headers(headers: &HeaderMap, signed: &[String]) -> Result<String, SigV4Error> {
    let mut block = String::new();
    for name in signed {
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|value| {
                String::from_utf8_lossy(value.as_bytes())
                    .split_ascii_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(SigV4Error::SignedHeaderMissing(name.clone()));
        }
        block.push_str(name);
        block.push(':');
        block.push_str(&values.join(","));
        block.push('\n');
    }
    Ok(block)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::http::HeaderName;
    use chrono::TimeZone;

    /// A request read from a test-vector file: request line, headers, blank
    /// line, body.
    #[derive(Clone)]
    struct RawRequest {
        method: String,
        path: String,
        query: String,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl RawRequest {
        fn parse(text: &str) -> Self {
            let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
            let mut lines = head.lines();
            let request_line = lines.next().unwrap();
            let (method, rest) = request_line.split_once(' ').unwrap();
            let (target, _version) = rest.rsplit_once(' ').unwrap();
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let mut headers = HeaderMap::new();
            for line in lines {
                let (name, value) = line.split_once(':').unwrap();
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            Self {
                method: method.to_owned(),
                path: path.to_owned(),
                query: query.to_owned(),
                headers,
                body: body.as_bytes().to_vec(),
            }
        }

        fn view<'a>(&'a self, payload_hash: &'a str) -> SignedRequest<'a> {
            SignedRequest {
                method: &self.method,
                path: &self.path,
                query: &self.query,
                headers: &self.headers,
                payload_hash,
            }
        }

        fn set_header(&mut self, name: &'static str, value: &str) {
            self.headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_str(value).unwrap(),
            );
        }

        fn authorization(&self) -> String {
            self.headers["authorization"].to_str().unwrap().to_owned()
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn parsed(request: &SignedRequest<'_>) -> ParsedAuth {
        parse(request).unwrap().expect("the request is signed")
    }

    fn tamper_last_hex_digit(signature: &str) -> String {
        let mut tampered = signature.to_owned();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        tampered
    }

    // ---------------------------------------------------------------------
    // AWS's published test suite (see tests/data/sigv4/README.md).

    mod aws_suite {
        use super::*;

        const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

        struct Case {
            req: &'static str,
            creq: &'static str,
            sts: &'static str,
            authz: &'static str,
        }

        fn policy() -> VerifyPolicy {
            VerifyPolicy {
                region: "us-east-1".to_owned(),
                services: vec!["service".to_owned()],
                max_skew: DEFAULT_MAX_SKEW,
                path_style: PathStyle::Normalized,
            }
        }

        fn now() -> DateTime<Utc> {
            utc(2015, 8, 30, 12, 36, 0)
        }

        fn assert_rejected(raw: &RawRequest, payload_hash: &str, what: &str) {
            let request = raw.view(payload_hash);
            let auth = parsed(&request);
            let err = verify(&auth, &request, SECRET, now(), &policy()).unwrap_err();
            assert!(
                matches!(err, SigV4Error::SignatureDoesNotMatch { .. }),
                "{what}: expected SignatureDoesNotMatch, got {err:?}"
            );
            assert_eq!(err.aws_code(), "SignatureDoesNotMatch");
        }

        /// Checks the canonical request, string to sign and signature of a
        /// case, that `verify` accepts it, and that it rejects the request
        /// once the signature, a signed header, the query, the path, the
        /// method or the payload hash changes.
        fn check(case: &Case) {
            let mut raw = RawRequest::parse(case.req);
            raw.set_header("authorization", case.authz);
            let payload_hash = payload_sha256_hex(&raw.body);
            let request = raw.view(&payload_hash);

            let auth = parsed(&request);
            assert_eq!(auth.access_key_id, "AKIDEXAMPLE");
            assert_eq!(
                auth.scope.to_string(),
                "20150830/us-east-1/service/aws4_request"
            );
            assert_eq!(auth.location, AuthLocation::Header);
            assert_eq!(auth.request_time, now());

            let creq = canonical_request(&auth, &request, PathStyle::Normalized).unwrap();
            assert_eq!(creq, case.creq, "canonical request");
            let sts = string_to_sign(&auth.amz_date, &auth.scope, &creq);
            assert_eq!(sts, case.sts, "string to sign");
            let key = signing_key(SECRET, "20150830", "us-east-1", "service");
            assert_eq!(signature_hex(&key, &sts), auth.signature, "signature");

            verify(&auth, &request, SECRET, now(), &policy()).unwrap();

            // Unsigned headers added on the way do not matter.
            let mut extra = raw.clone();
            extra.set_header("x-unsigned-extra", "anything");
            let extra_request = extra.view(&payload_hash);
            verify(&auth, &extra_request, SECRET, now(), &policy()).unwrap();

            // One hex digit of the signature.
            let mut tampered = raw.clone();
            let authz = case
                .authz
                .replace(&auth.signature, &tamper_last_hex_digit(&auth.signature));
            tampered.set_header("authorization", &authz);
            assert_rejected(&tampered, &payload_hash, "signature");

            // Each signed header but the date (which has checks of its own).
            for name in auth.signed_headers.iter().filter(|n| *n != "x-amz-date") {
                let mut tampered = raw.clone();
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                tampered
                    .headers
                    .insert(name.clone(), HeaderValue::from_static("tampered"));
                assert_rejected(&tampered, &payload_hash, &format!("header {name}"));
            }

            let mut tampered = raw.clone();
            tampered.query = if raw.query.is_empty() {
                "Tampered=1".to_owned()
            } else {
                format!("{}&Tampered=1", raw.query)
            };
            assert_rejected(&tampered, &payload_hash, "query");

            let mut tampered = raw.clone();
            tampered.path = "/tampered".to_owned();
            assert_rejected(&tampered, &payload_hash, "path");

            let mut tampered = raw.clone();
            tampered.method = if raw.method == "GET" { "HEAD" } else { "PUT" }.to_owned();
            assert_rejected(&tampered, &payload_hash, "method");

            assert_rejected(&raw, &payload_sha256_hex(b"tampered"), "payload hash");
        }

        macro_rules! suite_cases {
            ($($test:ident => $name:literal,)*) => {$(
                #[test]
                fn $test() {
                    macro_rules! file {
                        ($ext:literal) => {
                            include_str!(concat!(
                                env!("CARGO_MANIFEST_DIR"),
                                "/tests/data/sigv4/aws-sig-v4-test-suite/",
                                $name, "/", $name, ".", $ext
                            ))
                        };
                    }
                    check(&Case {
                        req: file!("req"),
                        creq: file!("creq"),
                        sts: file!("sts"),
                        authz: file!("authz"),
                    });
                }
            )*};
        }

        suite_cases! {
            get_vanilla_verifies_and_rejects_tampering => "get-vanilla",
            get_vanilla_query_verifies_and_rejects_tampering => "get-vanilla-query",
            get_vanilla_empty_query_key_verifies_and_rejects_tampering => "get-vanilla-empty-query-key",
            get_vanilla_query_order_key_sorts_by_value_and_rejects_tampering => "get-vanilla-query-order-key",
            get_vanilla_query_order_key_case_sorts_by_key_and_rejects_tampering => "get-vanilla-query-order-key-case",
            get_vanilla_query_order_value_sorts_by_value_and_rejects_tampering => "get-vanilla-query-order-value",
            get_vanilla_query_unreserved_leaves_unreserved_characters_alone => "get-vanilla-query-unreserved",
            get_vanilla_utf8_query_encodes_utf8_names => "get-vanilla-utf8-query",
            get_unreserved_leaves_unreserved_path_characters_alone => "get-unreserved",
            get_utf8_encodes_a_utf8_path => "get-utf8",
            get_space_encodes_a_space_as_percent_20 => "get-space",
            get_relative_resolves_dot_dot => "get-relative",
            get_relative_relative_resolves_nested_dot_dots => "get-relative-relative",
            get_slash_collapses_a_double_slash => "get-slash",
            get_slash_dot_slash_removes_a_dot_segment => "get-slash-dot-slash",
            get_slash_pointless_dot_removes_a_leading_dot_segment => "get-slash-pointless-dot",
            get_slashes_collapses_repeated_slashes_and_keeps_the_trailing_one => "get-slashes",
            get_header_key_duplicate_joins_repeated_headers_with_commas => "get-header-key-duplicate",
            get_header_value_order_keeps_the_order_of_repeated_headers => "get-header-value-order",
            get_header_value_trim_trims_and_collapses_whitespace => "get-header-value-trim",
            post_vanilla_verifies_and_rejects_tampering => "post-vanilla",
            post_vanilla_query_verifies_and_rejects_tampering => "post-vanilla-query",
            post_vanilla_empty_query_value_verifies_and_rejects_tampering => "post-vanilla-empty-query-value",
            post_header_key_case_lower_cases_header_names => "post-header-key-case",
            post_header_key_sort_sorts_header_names => "post-header-key-sort",
            post_header_value_case_keeps_the_case_of_values => "post-header-value-case",
            post_x_www_form_urlencoded_signs_the_body_hash => "post-x-www-form-urlencoded",
            post_x_www_form_urlencoded_parameters_signs_the_content_type => "post-x-www-form-urlencoded-parameters",
            post_sts_header_before_signs_the_session_token => "post-sts-header-before",
            post_sts_header_after_verifies_without_the_token_signed => "post-sts-header-after",
        }

        #[test]
        fn a_signed_session_token_is_reported_to_the_caller() {
            let mut raw = RawRequest::parse(include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/sigv4/aws-sig-v4-test-suite/post-sts-header-before/post-sts-header-before.req"
            )));
            raw.set_header(
                "authorization",
                include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/data/sigv4/aws-sig-v4-test-suite/post-sts-header-before/post-sts-header-before.authz"
                )),
            );
            let auth = parsed(&raw.view(EMPTY_PAYLOAD_SHA256));
            let token = auth.security_token.unwrap();
            assert!(token.starts_with("AQoDYXdzEPT//////////wEXAMPLE"));
        }
    }

    // ---------------------------------------------------------------------
    // Requests signed by botocore (see tests/data/sigv4/botocore/generate.py).

    const BOTO_SECRET: &str = "KarriTestSecretKey/0123456789abcdefghijKLMN";
    const BOTO_AKID: &str = "AKIAKARRITESTKEY0001";

    fn boto_time() -> DateTime<Utc> {
        utc(2024, 5, 1, 12, 0, 0)
    }

    fn ec2_post() -> RawRequest {
        RawRequest::parse(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sigv4/botocore/ec2-post-header.req"
        )))
    }

    fn ec2_post_date_header() -> RawRequest {
        RawRequest::parse(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sigv4/botocore/ec2-post-date-header-token.req"
        )))
    }

    fn ec2_presigned() -> RawRequest {
        RawRequest::parse(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sigv4/botocore/ec2-presigned-get.req"
        )))
    }

    fn s3_presigned() -> RawRequest {
        RawRequest::parse(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sigv4/botocore/s3-presigned-get.req"
        )))
    }

    fn s3_put() -> RawRequest {
        RawRequest::parse(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sigv4/botocore/s3-put-header.req"
        )))
    }

    /// Parses and verifies an EC2 request the way the EC2 face does.
    fn verify_ec2(raw: &RawRequest, secret: &str, now: DateTime<Utc>) -> Result<(), SigV4Error> {
        let payload_hash = payload_sha256_hex(&raw.body);
        let request = raw.view(&payload_hash);
        let auth = parse(&request)?.ok_or(SigV4Error::MissingAuthentication)?;
        verify(&auth, &request, secret, now, &VerifyPolicy::ec2("karri-1"))
    }

    #[test]
    fn a_botocore_header_signed_ec2_post_verifies() {
        let raw = ec2_post();
        let payload_hash = payload_sha256_hex(&raw.body);
        let request = raw.view(&payload_hash);
        let auth = parsed(&request);
        assert_eq!(auth.access_key_id, BOTO_AKID);
        assert_eq!(auth.scope.to_string(), "20240501/karri-1/ec2/aws4_request");
        assert_eq!(auth.signed_headers, ["content-type", "host", "x-amz-date"]);
        assert_eq!(auth.request_time, boto_time());
        assert_eq!(auth.security_token, None);
        let creq = canonical_request(&auth, &request, PathStyle::Normalized).unwrap();
        assert_eq!(
            creq,
            "POST\n/\n\ncontent-type:application/x-www-form-urlencoded; charset=utf-8\n\
             host:127.0.0.1:8773\nx-amz-date:20240501T120000Z\n\n\
             content-type;host;x-amz-date\n"
                .to_owned()
                + &payload_sha256_hex(b"Action=DescribeInstances&Version=2016-11-15")
        );
        verify(
            &auth,
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::ec2("karri-1"),
        )
        .unwrap();
    }

    #[test]
    fn a_botocore_request_dated_by_the_date_header_with_a_session_token_verifies() {
        let raw = ec2_post_date_header();
        let payload_hash = payload_sha256_hex(&raw.body);
        let request = raw.view(&payload_hash);
        let auth = parsed(&request);
        assert_eq!(auth.amz_date, "20240501T120000Z");
        assert_eq!(auth.request_time, boto_time());
        assert_eq!(
            auth.security_token.as_deref(),
            Some("karri-session-token/1+2==")
        );
        assert_eq!(
            canonical_uri(&raw.path, PathStyle::Normalized),
            "/services/compute"
        );
        verify(
            &auth,
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::ec2("karri-1"),
        )
        .unwrap();
    }

    #[test]
    fn a_botocore_presigned_ec2_get_verifies_until_it_expires() {
        let raw = ec2_presigned();
        let request = raw.view(EMPTY_PAYLOAD_SHA256);
        let auth = parsed(&request);
        assert_eq!(auth.access_key_id, BOTO_AKID);
        assert_eq!(auth.location, AuthLocation::Query { expires_secs: 900 });
        assert_eq!(auth.signed_headers, ["host"]);
        assert_eq!(auth.expires_at(), Some(utc(2024, 5, 1, 12, 15, 0)));
        let creq = canonical_request(&auth, &request, PathStyle::Normalized).unwrap();
        assert!(!creq.contains("X-Amz-Signature"), "{creq}");
        assert!(creq.contains(
            "X-Amz-Credential=AKIAKARRITESTKEY0001%2F20240501%2Fkarri-1%2Fec2%2Faws4_request"
        ));

        let policy = VerifyPolicy::ec2("karri-1");
        for now in [
            boto_time(),
            utc(2024, 5, 1, 11, 50, 0), // signed a little in the future
            utc(2024, 5, 1, 12, 15, 0), // the last valid second
        ] {
            verify(&auth, &request, BOTO_SECRET, now, &policy).unwrap();
        }
    }

    #[test]
    fn a_botocore_presigned_s3_get_verifies_with_s3_paths_only() {
        let raw = s3_presigned();
        let request = raw.view(UNSIGNED_PAYLOAD);
        let auth = parsed(&request);
        assert_eq!(auth.scope.service, "s3");
        assert_eq!(
            canonical_uri(&raw.path, PathStyle::S3),
            "/photos/2024/my%20cat%2Bdog%20%281%29.jpg"
        );
        verify(
            &auth,
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::s3("karri-1"),
        )
        .unwrap();

        // The normalizing rules encode the received path again: %20 -> %2520.
        let mut double_encoding = VerifyPolicy::s3("karri-1");
        double_encoding.path_style = PathStyle::Normalized;
        let err = verify(&auth, &request, BOTO_SECRET, boto_time(), &double_encoding).unwrap_err();
        assert!(
            matches!(err, SigV4Error::SignatureDoesNotMatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_botocore_header_signed_s3_put_verifies_with_its_content_sha256() {
        let raw = s3_put();
        let content_sha256 = raw.headers["x-amz-content-sha256"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_sha256, payload_sha256_hex(&raw.body));
        let request = raw.view(&content_sha256);
        let auth = parsed(&request);
        assert_eq!(auth.scope.service, "s3");
        assert_eq!(
            canonical_uri(&raw.path, PathStyle::S3),
            "/photos/2024/notes%20~v1.txt"
        );
        verify(
            &auth,
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::s3("karri-1"),
        )
        .unwrap();

        let tampered = raw.view(UNSIGNED_PAYLOAD);
        let err = verify(
            &auth,
            &tampered,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::s3("karri-1"),
        )
        .unwrap_err();
        assert!(
            matches!(err, SigV4Error::SignatureDoesNotMatch { .. }),
            "{err:?}"
        );
    }

    // ---------------------------------------------------------------------
    // Negative cases.

    #[test]
    fn a_wrong_secret_fails_with_signature_does_not_match() {
        let err = verify_ec2(&ec2_post(), "not-the-secret", boto_time()).unwrap_err();
        assert_eq!(err.aws_code(), "SignatureDoesNotMatch");
        assert_eq!(
            err.to_string(),
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method."
        );
        let SigV4Error::SignatureDoesNotMatch {
            canonical_request,
            string_to_sign,
        } = err
        else {
            unreachable!()
        };
        assert!(canonical_request.starts_with("POST\n/\n\n"));
        assert!(string_to_sign.starts_with("AWS4-HMAC-SHA256\n20240501T120000Z\n"));
    }

    #[test]
    fn a_tampered_body_fails_with_signature_does_not_match() {
        let mut raw = ec2_post();
        raw.body = b"Action=TerminateInstances&Version=2016-11-15".to_vec();
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err.aws_code(), "SignatureDoesNotMatch");
    }

    #[test]
    fn a_tampered_query_string_fails_with_signature_does_not_match() {
        let mut raw = ec2_presigned();
        raw.query = raw.query.replace("DescribeInstances", "TerminateInstances");
        let request = raw.view(EMPTY_PAYLOAD_SHA256);
        let err = verify(
            &parsed(&request),
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::ec2("karri-1"),
        )
        .unwrap_err();
        assert_eq!(err.aws_code(), "SignatureDoesNotMatch");
    }

    #[test]
    fn a_signature_that_is_not_hex_fails_with_signature_does_not_match() {
        let mut raw = ec2_post();
        let authz = raw.authorization();
        let (head, _) = authz.split_once("Signature=").unwrap();
        raw.set_header("authorization", &format!("{head}Signature=not-hex"));
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err.aws_code(), "SignatureDoesNotMatch");
    }

    #[test]
    fn a_request_time_16_minutes_off_fails_with_request_expired() {
        for now in [utc(2024, 5, 1, 12, 16, 0), utc(2024, 5, 1, 11, 44, 0)] {
            let err = verify_ec2(&ec2_post(), BOTO_SECRET, now).unwrap_err();
            assert!(
                matches!(err, SigV4Error::RequestTimeSkewed { .. }),
                "{err:?}"
            );
            assert_eq!(err.aws_code(), "RequestExpired");
            assert!(err.to_string().starts_with("Request has expired"), "{err}");
            assert!(err.to_string().contains("20240501T120000Z"), "{err}");
        }
    }

    #[test]
    fn a_request_time_14_minutes_off_is_accepted() {
        for now in [utc(2024, 5, 1, 12, 14, 0), utc(2024, 5, 1, 11, 46, 0)] {
            verify_ec2(&ec2_post(), BOTO_SECRET, now).unwrap();
        }
    }

    #[test]
    fn a_presigned_url_past_its_expiry_fails_with_request_expired() {
        let raw = ec2_presigned();
        let request = raw.view(EMPTY_PAYLOAD_SHA256);
        let now = utc(2024, 5, 1, 12, 15, 1);
        let err = verify(
            &parsed(&request),
            &request,
            BOTO_SECRET,
            now,
            &VerifyPolicy::ec2("karri-1"),
        )
        .unwrap_err();
        assert_eq!(
            err,
            SigV4Error::PresignedUrlExpired {
                expired_at: utc(2024, 5, 1, 12, 15, 0),
                now
            }
        );
        assert_eq!(err.aws_code(), "RequestExpired");
        assert_eq!(
            err.to_string(),
            "Request has expired: the presigned URL expired at 20240501T121500Z, and it is now 20240501T121501Z."
        );
    }

    #[test]
    fn a_presigned_url_signed_too_far_in_the_future_fails_with_request_expired() {
        let raw = ec2_presigned();
        let request = raw.view(EMPTY_PAYLOAD_SHA256);
        let now = utc(2024, 5, 1, 11, 44, 0);
        let err = verify(
            &parsed(&request),
            &request,
            BOTO_SECRET,
            now,
            &VerifyPolicy::ec2("karri-1"),
        )
        .unwrap_err();
        assert!(
            matches!(err, SigV4Error::RequestTimeSkewed { .. }),
            "{err:?}"
        );
        assert_eq!(err.aws_code(), "RequestExpired");
    }

    #[test]
    fn x_amz_expires_outside_one_second_to_seven_days_is_rejected() {
        for expires in ["0", "604801", "99999999999999999999999", "-1", "1e3", ""] {
            let mut raw = ec2_presigned();
            raw.query = raw
                .query
                .replace("X-Amz-Expires=900", &format!("X-Amz-Expires={expires}"));
            let request = raw.view(EMPTY_PAYLOAD_SHA256);
            let err = parse(&request)
                .and_then(|auth| {
                    let auth = auth.unwrap();
                    verify(
                        &auth,
                        &request,
                        BOTO_SECRET,
                        boto_time(),
                        &VerifyPolicy::ec2("karri-1"),
                    )
                })
                .unwrap_err();
            assert_eq!(
                err,
                SigV4Error::InvalidExpires(expires.to_owned()),
                "{expires}"
            );
            assert_eq!(err.aws_code(), "IncompleteSignature");
        }
    }

    #[test]
    fn x_amz_expires_of_seven_days_passes_the_range_check() {
        let mut raw = ec2_presigned();
        raw.query = raw
            .query
            .replace("X-Amz-Expires=900", "X-Amz-Expires=604800");
        let request = raw.view(EMPTY_PAYLOAD_SHA256);
        let auth = parsed(&request);
        // The range is fine; the signature was made for 900 seconds.
        let err = verify(
            &auth,
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::ec2("karri-1"),
        )
        .unwrap_err();
        assert!(
            matches!(err, SigV4Error::SignatureDoesNotMatch { .. }),
            "{err:?}"
        );
    }

    /// The botocore EC2 POST with `from` replaced by `to` in its Authorization header.
    fn ec2_post_with_authorization(from: &str, to: &str) -> RawRequest {
        let mut raw = ec2_post();
        let authz = raw.authorization();
        assert!(authz.contains(from), "{authz} lacks {from}");
        raw.set_header("authorization", &authz.replacen(from, to, 1));
        raw
    }

    #[test]
    fn a_credential_scoped_to_another_region_fails_with_auth_failure() {
        let raw = ec2_post_with_authorization("/karri-1/", "/us-east-1/");
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err, SigV4Error::WrongRegion("us-east-1".to_owned()));
        assert_eq!(err.aws_code(), "AuthFailure");
        assert_eq!(
            err.to_string(),
            "Credential should be scoped to a valid region, not 'us-east-1'."
        );
    }

    #[test]
    fn the_region_is_configurable() {
        let raw = ec2_post();
        let payload_hash = payload_sha256_hex(&raw.body);
        let request = raw.view(&payload_hash);
        let err = verify(
            &parsed(&request),
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::ec2("karri-2"),
        )
        .unwrap_err();
        assert_eq!(err, SigV4Error::WrongRegion("karri-1".to_owned()));
    }

    #[test]
    fn a_credential_scoped_to_another_service_fails_with_auth_failure() {
        let raw = ec2_post_with_authorization("/ec2/", "/s3/");
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(
            err,
            SigV4Error::WrongService {
                expected: "ec2".to_owned(),
                got: "s3".to_owned()
            }
        );
        assert_eq!(err.aws_code(), "AuthFailure");
        assert_eq!(
            err.to_string(),
            "Credential should be scoped to correct service: 'ec2'."
        );
    }

    #[test]
    fn a_policy_may_allow_several_services() {
        let raw = ec2_post();
        let payload_hash = payload_sha256_hex(&raw.body);
        let request = raw.view(&payload_hash);
        let mut policy = VerifyPolicy::s3("karri-1");
        policy.path_style = PathStyle::Normalized;
        policy.services = vec!["s3".to_owned(), "ec2".to_owned()];
        verify(
            &parsed(&request),
            &request,
            BOTO_SECRET,
            boto_time(),
            &policy,
        )
        .unwrap();
    }

    #[test]
    fn a_credential_with_a_bad_terminator_fails_with_auth_failure() {
        let raw = ec2_post_with_authorization("/aws4_request", "/aws5_request");
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err, SigV4Error::WrongTerminator("aws5_request".to_owned()));
        assert_eq!(err.aws_code(), "AuthFailure");
    }

    #[test]
    fn a_scope_date_other_than_the_request_date_fails_with_auth_failure() {
        let raw = ec2_post_with_authorization("/20240501/", "/20240502/");
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(
            err,
            SigV4Error::ScopeDateMismatch {
                scope_date: "20240502".to_owned(),
                request_date: "20240501".to_owned()
            }
        );
        assert_eq!(err.aws_code(), "AuthFailure");
    }

    #[test]
    fn a_request_without_host_among_the_signed_headers_is_rejected() {
        let raw = ec2_post_with_authorization(
            "SignedHeaders=content-type;host;x-amz-date",
            "SignedHeaders=content-type;x-amz-date",
        );
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err, SigV4Error::HostNotSigned);
        assert_eq!(err.aws_code(), "AuthFailure");
    }

    #[test]
    fn a_signed_header_absent_from_the_request_is_rejected() {
        let raw = ec2_post_with_authorization(
            "SignedHeaders=content-type;host;x-amz-date",
            "SignedHeaders=content-type;host;x-amz-date;x-karri-missing",
        );
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(
            err,
            SigV4Error::SignedHeaderMissing("x-karri-missing".to_owned())
        );
        assert_eq!(err.aws_code(), "IncompleteSignature");
    }

    #[test]
    fn a_request_without_any_date_fails_with_missing_date() {
        let mut raw = ec2_post();
        raw.headers.remove("x-amz-date");
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err, SigV4Error::MissingDate);
        assert_eq!(err.aws_code(), "IncompleteSignature");
    }

    #[test]
    fn a_malformed_x_amz_date_fails_with_malformed_date() {
        for date in [
            "2024-05-01T12:00:00Z",
            "20240501T120000",
            "20241301T120000Z",
            "ñ",
        ] {
            let mut raw = ec2_post();
            raw.set_header("x-amz-date", date);
            let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
            assert_eq!(err, SigV4Error::MalformedDate(date.to_owned()), "{date}");
            assert_eq!(err.aws_code(), "IncompleteSignature");
        }
    }

    #[test]
    fn x_amz_date_takes_precedence_over_date() {
        let mut raw = ec2_post();
        raw.set_header("date", "Thu, 01 Jan 1970 00:00:00 GMT");
        verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap();
    }

    #[test]
    fn an_rfc_1123_date_header_enters_the_string_to_sign_in_iso_8601_basic_form() {
        let mut raw = ec2_post_date_header();
        raw.set_header("date", "Wed, 01 May 2024 12:00:00 GMT");
        let request = raw.view(EMPTY_PAYLOAD_SHA256);
        let auth = parsed(&request);
        assert_eq!(auth.amz_date, "20240501T120000Z");
        assert_eq!(auth.request_time, boto_time());
    }

    const MALFORMED_AUTHORIZATIONS: &[&str] = &[
        "",
        "AWS4-HMAC-SHA256",
        "AWS4-HMAC-SHA256 ",
        "AWS4-HMAC-SHA256 garbage",
        "AWS4-HMAC-SHA256 =,=,=",
        "AWS4-HMAC-SHA256 SignedHeaders=host;x-amz-date, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1/ec2/aws4_request, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1/ec2/aws4_request, SignedHeaders=host",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1/ec2/aws4_request, SignedHeaders=, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1/ec2/aws4_request, SignedHeaders=host;;x-amz-date, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1/ec2/aws4_request, SignedHeaders=host, Signature=",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1/ec2/aws4_request, Credential=AKID/20240501/karri-1/ec2/aws4_request, SignedHeaders=host, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1, SignedHeaders=host, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID/20240501/karri-1/ec2/aws4_request/extra, SignedHeaders=host, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=/20240501/karri-1/ec2/aws4_request, SignedHeaders=host, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID/2024-05-01/karri-1/ec2/aws4_request, SignedHeaders=host, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential=AKID//karri-1/ec2/aws4_request, SignedHeaders=host, Signature=abcd",
        "AWS4-HMAC-SHA256 Credential, SignedHeaders, Signature",
        "AWS4-HMAC-SHA256, Credential=AKID/20240501/karri-1/ec2/aws4_request",
        "!!! Credential=AKID/20240501/karri-1/ec2/aws4_request",
    ];

    #[test]
    fn malformed_authorization_headers_fail_with_incomplete_signature() {
        for value in MALFORMED_AUTHORIZATIONS {
            let mut raw = ec2_post();
            raw.set_header("authorization", value);
            let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
            assert!(
                matches!(
                    err,
                    SigV4Error::MalformedAuthorization(_) | SigV4Error::MalformedCredential(_)
                ),
                "{value:?} gave {err:?}"
            );
            assert_eq!(err.aws_code(), "IncompleteSignature", "{value:?}");
        }
    }

    #[test]
    fn an_authorization_header_that_is_not_ascii_fails_with_incomplete_signature() {
        let mut raw = ec2_post();
        raw.headers.insert(
            "authorization",
            HeaderValue::from_bytes(b"AWS4-HMAC-SHA256 Credential=\xff\xfe").unwrap(),
        );
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert!(
            matches!(err, SigV4Error::MalformedAuthorization(_)),
            "{err:?}"
        );
    }

    #[test]
    fn two_authorization_headers_fail_with_incomplete_signature() {
        let mut raw = ec2_post();
        let authz = raw.authorization();
        raw.headers
            .append("authorization", HeaderValue::from_str(&authz).unwrap());
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert!(
            matches!(err, SigV4Error::MalformedAuthorization(_)),
            "{err:?}"
        );
    }

    #[test]
    fn the_authorization_header_tolerates_missing_spaces_after_commas() {
        let raw = ec2_post();
        let compact = raw.authorization().replace(", ", ",");
        let mut compact_raw = raw.clone();
        compact_raw.set_header("authorization", &compact);
        verify_ec2(&compact_raw, BOTO_SECRET, boto_time()).unwrap();
    }

    #[test]
    fn a_version_2_authorization_header_fails_with_unsupported_algorithm() {
        let mut raw = ec2_post();
        raw.set_header(
            "authorization",
            "AWS AKIAKARRITESTKEY0001:frJIUN8DYpKDtOLCwo//yllqDzg=",
        );
        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err, SigV4Error::UnsupportedAlgorithm("AWS".to_owned()));
        assert_eq!(err.aws_code(), "IncompleteSignature");
    }

    #[test]
    fn other_authorization_schemes_fail_with_unsupported_algorithm() {
        for (value, scheme) in [
            (
                "AWS4-ECDSA-P256-SHA256 Credential=AKID/20240501/ec2/aws4_request",
                "AWS4-ECDSA-P256-SHA256",
            ),
            ("Bearer abc", "Bearer"),
            ("garbage", "garbage"),
        ] {
            let mut raw = ec2_post();
            raw.set_header("authorization", value);
            let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
            assert_eq!(err, SigV4Error::UnsupportedAlgorithm(scheme.to_owned()));
        }
    }

    #[test]
    fn version_2_query_signatures_fail_with_unsupported_algorithm() {
        let headers = HeaderMap::new();
        for (query, algorithm) in [
            (
                "AWSAccessKeyId=AKID&Expires=1141889120&Signature=vjbyPxybdZaNmGa%2ByT272YEAiv4%3D",
                "AWS",
            ),
            (
                "Action=DescribeInstances&AWSAccessKeyId=AKID&SignatureMethod=HmacSHA256&SignatureVersion=2&Timestamp=2024-05-01T12%3A00%3A00Z&Version=2016-11-15&Signature=abc%3D",
                "SignatureVersion 2 (HmacSHA256)",
            ),
        ] {
            let request = SignedRequest {
                method: "GET",
                path: "/",
                query,
                headers: &headers,
                payload_hash: EMPTY_PAYLOAD_SHA256,
            };
            let err = parse(&request).unwrap_err();
            assert_eq!(err, SigV4Error::UnsupportedAlgorithm(algorithm.to_owned()));
        }
    }

    #[test]
    fn a_presigned_algorithm_other_than_aws4_fails_with_unsupported_algorithm() {
        let mut raw = ec2_presigned();
        raw.query = raw.query.replace(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Algorithm=AWS4-HMAC-SHA512",
        );
        let err = parse(&raw.view(EMPTY_PAYLOAD_SHA256)).unwrap_err();
        assert_eq!(
            err,
            SigV4Error::UnsupportedAlgorithm("AWS4-HMAC-SHA512".to_owned())
        );
    }

    #[test]
    fn a_request_without_authentication_parses_to_none() {
        let mut raw = ec2_post();
        raw.headers.remove("authorization");
        let payload_hash = payload_sha256_hex(&raw.body);
        assert_eq!(parse(&raw.view(&payload_hash)), Ok(None));

        raw.query = "Action=DescribeInstances&Version=2016-11-15&Signature=".to_owned();
        assert_eq!(parse(&raw.view(&payload_hash)), Ok(None));

        let err = verify_ec2(&raw, BOTO_SECRET, boto_time()).unwrap_err();
        assert_eq!(err, SigV4Error::MissingAuthentication);
        assert_eq!(err.aws_code(), "MissingAuthenticationToken");
    }

    #[test]
    fn a_header_signature_and_presigned_parameters_together_are_rejected() {
        let mut raw = ec2_presigned();
        raw.set_header("authorization", &ec2_post().authorization());
        let err = parse(&raw.view(EMPTY_PAYLOAD_SHA256)).unwrap_err();
        assert_eq!(err, SigV4Error::ConflictingAuthentication);
        assert_eq!(err.aws_code(), "IncompleteSignature");
    }

    #[test]
    fn a_presigned_url_missing_a_parameter_fails_with_incomplete_signature() {
        for name in [
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature",
        ] {
            let mut raw = ec2_presigned();
            raw.query = raw
                .query
                .split('&')
                .filter(|pair| !pair.starts_with(&format!("{name}=")))
                .collect::<Vec<_>>()
                .join("&");
            let err = parse(&raw.view(EMPTY_PAYLOAD_SHA256)).unwrap_err();
            assert_eq!(err, SigV4Error::MissingQueryParameter(name));
            assert_eq!(err.aws_code(), "IncompleteSignature");
        }
    }

    #[test]
    fn a_presigned_url_repeating_a_parameter_fails_with_incomplete_signature() {
        let mut raw = ec2_presigned();
        raw.query.push_str("&X-Amz-Date=20240501T120000Z");
        let err = parse(&raw.view(EMPTY_PAYLOAD_SHA256)).unwrap_err();
        assert_eq!(err, SigV4Error::DuplicateQueryParameter("X-Amz-Date"));
    }

    #[test]
    fn a_presigned_security_token_is_signed_and_reported() {
        // Sign a presigned URL carrying a session token with the primitives.
        let headers = {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("127.0.0.1:8773"));
            h
        };
        let query_unsigned = "Action=DescribeInstances&Version=2016-11-15\
             &X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAKARRITESTKEY0001%2F20240501%2Fkarri-1%2Fec2%2Faws4_request\
             &X-Amz-Date=20240501T120000Z&X-Amz-Expires=60\
             &X-Amz-Security-Token=tok%2Fen%3D%3D&X-Amz-SignedHeaders=host";
        let scope = CredentialScope {
            date: "20240501".to_owned(),
            region: "karri-1".to_owned(),
            service: "ec2".to_owned(),
            terminator: TERMINATOR.to_owned(),
        };
        let creq = format!(
            "GET\n/\n{}\nhost:127.0.0.1:8773\n\nhost\n{EMPTY_PAYLOAD_SHA256}",
            canonical_query_string(query_unsigned, true)
        );
        assert!(creq.contains("X-Amz-Security-Token=tok%2Fen%3D%3D"));
        let sts = string_to_sign("20240501T120000Z", &scope, &creq);
        let sig = signature_hex(
            &signing_key(BOTO_SECRET, "20240501", "karri-1", "ec2"),
            &sts,
        );
        let query = format!("{query_unsigned}&X-Amz-Signature={sig}");
        let request = SignedRequest {
            method: "GET",
            path: "/",
            query: &query,
            headers: &headers,
            payload_hash: EMPTY_PAYLOAD_SHA256,
        };
        let auth = parsed(&request);
        assert_eq!(auth.security_token.as_deref(), Some("tok/en=="));
        verify(
            &auth,
            &request,
            BOTO_SECRET,
            boto_time(),
            &VerifyPolicy::ec2("karri-1"),
        )
        .unwrap();
    }

    #[test]
    fn parsing_never_panics_on_truncated_or_mangled_input() {
        let policy = VerifyPolicy::ec2("karri-1");
        let header = ec2_post().authorization();
        let presigned = ec2_presigned().query;
        let specials = [",", "=", "/", ";", " ", "\t", "%", "%zz", "&", "é"];
        let mut headers_to_try = Vec::new();
        let mut queries_to_try = Vec::new();
        for end in 0..=header.len() {
            headers_to_try.push(header[..end].to_owned());
        }
        for end in 0..=presigned.len() {
            queries_to_try.push(presigned[..end].to_owned());
        }
        for (i, _) in header.char_indices() {
            for special in specials {
                headers_to_try.push(format!("{}{special}{}", &header[..i], &header[i + 1..]));
            }
        }
        for (i, _) in presigned.char_indices() {
            for special in specials {
                queries_to_try.push(format!(
                    "{}{special}{}",
                    &presigned[..i],
                    &presigned[i + 1..]
                ));
            }
        }

        let base = ec2_post();
        let payload_hash = payload_sha256_hex(&base.body);
        for value in &headers_to_try {
            let mut raw = base.clone();
            let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) else {
                continue;
            };
            raw.headers.insert("authorization", value);
            let request = raw.view(&payload_hash);
            if let Ok(Some(auth)) = parse(&request) {
                let _ = verify(&auth, &request, BOTO_SECRET, boto_time(), &policy);
            }
        }
        let base = ec2_presigned();
        for query in &queries_to_try {
            let mut raw = base.clone();
            raw.query = query.clone();
            let request = raw.view(EMPTY_PAYLOAD_SHA256);
            if let Ok(Some(auth)) = parse(&request) {
                let _ = verify(&auth, &request, BOTO_SECRET, boto_time(), &policy);
            }
        }
    }

    // ---------------------------------------------------------------------
    // Canonical forms and primitives.

    #[test]
    fn the_signing_key_matches_the_aws_documentation_example() {
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20120215",
            "us-east-1",
            "iam",
        );
        assert_eq!(
            hex::encode(key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn signature_matches_accepts_only_the_exact_signature() {
        let key = signing_key("secret", "20240501", "karri-1", "ec2");
        let sig = signature_hex(&key, "string to sign");
        assert!(signature_matches(&key, "string to sign", &sig));
        assert!(!signature_matches(
            &key,
            "string to sign",
            &tamper_last_hex_digit(&sig)
        ));
        assert!(!signature_matches(&key, "string to sign", &sig[..62]));
        assert!(!signature_matches(&key, "string to sign", ""));
        assert!(!signature_matches(&key, "string to sign", "zz"));
        assert!(!signature_matches(&key, "another string", &sig));
    }

    #[test]
    fn the_empty_payload_hash_is_the_sha256_of_nothing() {
        assert_eq!(payload_sha256_hex(b""), EMPTY_PAYLOAD_SHA256);
    }

    #[test]
    fn normalized_paths_are_encoded_once_more_as_received() {
        assert_eq!(canonical_uri("", PathStyle::Normalized), "/");
        assert_eq!(canonical_uri("/", PathStyle::Normalized), "/");
        assert_eq!(
            canonical_uri("/services/compute", PathStyle::Normalized),
            "/services/compute"
        );
        assert_eq!(canonical_uri("/a%20b", PathStyle::Normalized), "/a%2520b");
        assert_eq!(canonical_uri("/a/b/..", PathStyle::Normalized), "/a");
        assert_eq!(canonical_uri("/a/./b/", PathStyle::Normalized), "/a/b/");
        assert_eq!(canonical_uri("/../..", PathStyle::Normalized), "/");
        assert_eq!(canonical_uri("/a:b@c", PathStyle::Normalized), "/a%3Ab%40c");
    }

    #[test]
    fn s3_paths_keep_every_segment_and_are_encoded_once() {
        assert_eq!(canonical_uri("", PathStyle::S3), "/");
        assert_eq!(canonical_uri("/", PathStyle::S3), "/");
        assert_eq!(
            canonical_uri("/bucket/my%20key", PathStyle::S3),
            "/bucket/my%20key"
        );
        assert_eq!(
            canonical_uri("/bucket/my key", PathStyle::S3),
            "/bucket/my%20key"
        );
        assert_eq!(canonical_uri("/bucket/a+b", PathStyle::S3), "/bucket/a%2Bb");
        assert_eq!(
            canonical_uri("/bucket/%e1%88%b4", PathStyle::S3),
            "/bucket/%E1%88%B4"
        );
        assert_eq!(
            canonical_uri("/bucket/%7Etilde", PathStyle::S3),
            "/bucket/~tilde"
        );
        assert_eq!(
            canonical_uri("/bucket//a/./b/../c/", PathStyle::S3),
            "/bucket//a/./b/../c/"
        );
    }

    #[test]
    fn query_strings_are_decoded_reencoded_and_sorted() {
        assert_eq!(canonical_query_string("", false), "");
        assert_eq!(canonical_query_string("b=2&a=1&a=0", false), "a=0&a=1&b=2");
        assert_eq!(canonical_query_string("acl", false), "acl=");
        assert_eq!(canonical_query_string("a=&b", false), "a=&b=");
        assert_eq!(canonical_query_string("k=a+b%20c", false), "k=a%2Bb%20c");
        assert_eq!(canonical_query_string("k=%2f%7E*", false), "k=%2F~%2A");
        assert_eq!(canonical_query_string("&&a=1&", false), "a=1");
        // Sorting is by encoded name: "%" sorts before letters.
        assert_eq!(
            canonical_query_string("b=1&%C3%A9=2", false),
            "%C3%A9=2&b=1"
        );
        assert_eq!(
            canonical_query_string("X-Amz-Signature=abc&Action=X", true),
            "Action=X"
        );
        assert_eq!(
            canonical_query_string("X-Amz-Signature=abc&Action=X", false),
            "Action=X&X-Amz-Signature=abc"
        );
    }

    #[test]
    fn every_error_has_an_ec2_code() {
        let t = boto_time();
        let cases = [
            (
                SigV4Error::MissingAuthentication,
                "MissingAuthenticationToken",
            ),
            (
                SigV4Error::MalformedAuthorization(String::new()),
                "IncompleteSignature",
            ),
            (
                SigV4Error::MalformedCredential(String::new()),
                "IncompleteSignature",
            ),
            (
                SigV4Error::MissingQueryParameter("X-Amz-Date"),
                "IncompleteSignature",
            ),
            (
                SigV4Error::DuplicateQueryParameter("X-Amz-Date"),
                "IncompleteSignature",
            ),
            (SigV4Error::MissingDate, "IncompleteSignature"),
            (
                SigV4Error::MalformedDate(String::new()),
                "IncompleteSignature",
            ),
            (
                SigV4Error::UnsupportedAlgorithm(String::new()),
                "IncompleteSignature",
            ),
            (SigV4Error::ConflictingAuthentication, "IncompleteSignature"),
            (
                SigV4Error::InvalidExpires(String::new()),
                "IncompleteSignature",
            ),
            (
                SigV4Error::SignedHeaderMissing(String::new()),
                "IncompleteSignature",
            ),
            (
                SigV4Error::ScopeDateMismatch {
                    scope_date: String::new(),
                    request_date: String::new(),
                },
                "AuthFailure",
            ),
            (SigV4Error::WrongRegion(String::new()), "AuthFailure"),
            (
                SigV4Error::WrongService {
                    expected: String::new(),
                    got: String::new(),
                },
                "AuthFailure",
            ),
            (SigV4Error::WrongTerminator(String::new()), "AuthFailure"),
            (SigV4Error::HostNotSigned, "AuthFailure"),
            (
                SigV4Error::RequestTimeSkewed {
                    request_time: t,
                    now: t,
                    max_skew: DEFAULT_MAX_SKEW,
                },
                "RequestExpired",
            ),
            (
                SigV4Error::PresignedUrlExpired {
                    expired_at: t,
                    now: t,
                },
                "RequestExpired",
            ),
            (
                SigV4Error::SignatureDoesNotMatch {
                    canonical_request: String::new(),
                    string_to_sign: String::new(),
                },
                "SignatureDoesNotMatch",
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.aws_code(), code, "{err:?}");
            assert!(err.to_string().ends_with('.'), "{err}");
        }
    }
}
