//! The S3 operations Karri implements, on Bucket records, the object index and the blob
//! store. s3s has already routed the request, parsed it into typed input and verified its
//! signature; every operation here resolves the caller, checks the ACLs, then acts. An
//! operation not implemented here answers `NotImplemented` (s3s's default), never a false
//! success.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crds::{BucketSpec, CannedAcl};
use futures::StreamExt;
use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};
use serde_json::{json, Value};

use super::access::{allowed, Action, Who};
use super::blob::{BlobError, BlobStore, ByteStream};
use super::checksum;
use super::cond::{self, Outcome, Preconditions};
use super::index::{
    BucketSeen, Checksum, CompletionHolds, Expect, IndexError, ObjectIndex, ObjectMeta, PartMeta,
    Segment, SystemHeaders, UploadMeta,
};
use super::listing::{list_page, KeySource, ListRequest};
use crate::auth::Principal;
use crate::ec2::service::{resolve_access_key, Caller, KeyError};
use crate::registry::{DeleteOptions, Registry, WriteOptions};
use crate::store;

/// Largest object a single PUT (or one part) may carry: 5 GiB, as in AWS.
pub const MAX_PUT_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Smallest part of a multipart upload other than the last: 5 MiB.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Most parts of one upload.
pub const MAX_PARTS: i32 = 10_000;
/// Bucket names that the gateway's other paths use (path-style requests to them would not
/// reach S3 unsigned).
pub const RESERVED_BUCKETS: &[&str] = &[
    "api", "apis", "openapi", "version", "services", "healthz", "livez", "readyz", "metrics",
];

/// Marks a request the Eucalyptus path forwards whose presigned signature it checked and took
/// off its query: the rest of the query still counts as the signed request's headers.
#[derive(Clone, Copy, Debug)]
pub struct ForwardedPresigned;

/// The identity of a request forwarded from the Eucalyptus path after s3s verified its
/// signature there: the access key that signed it.
#[derive(Debug, Clone)]
pub struct ForwardedIdentity(pub String);

/// The trailers of a body s3s decoded on the Eucalyptus path, forwarded with its identity.
#[derive(Debug, Clone)]
pub struct ForwardedTrailers(pub s3s::TrailingHeaders);

/// What an upload's body brings besides its bytes: the trailers s3s read (a signed
/// `aws-chunked` body), or the ones read here (an unsigned one).
enum BodyTrailers {
    S3s(Option<s3s::TrailingHeaders>),
    Decoded(super::chunked::Trailers),
}

impl BodyTrailers {
    /// The trailers, once the body has been read.
    fn read(self) -> Option<http::HeaderMap> {
        match self {
            BodyTrailers::S3s(t) => t.and_then(|t| t.take()),
            BodyTrailers::Decoded(t) => Some(t.get()),
        }
    }
}

/// An upload's body as the blob store takes it, hashed for the checksum it asks for.
struct UploadBody {
    stream: ByteStream<'static>,
    trailers: BodyTrailers,
    asked: Option<checksum::Asked>,
    running: Option<checksum::Running>,
}

impl UploadBody {
    /// The body of `req` (whose input holds `body`).
    fn of<T>(req: &S3Request<T>, body: Option<StreamingBlob>) -> S3Result<UploadBody> {
        let asked = checksum::asked(&req.headers).map_err(checksum_error)?;
        let framed = req.credentials.is_none() && super::chunked::is_aws_chunked(&req.headers);
        let (stream, trailers) = body_stream(body, framed);
        let trailers = trailers.map_or_else(
            || {
                BodyTrailers::S3s(req.trailing_headers.clone().or_else(|| {
                    req.extensions
                        .get::<ForwardedTrailers>()
                        .map(|f| f.0.clone())
                }))
            },
            BodyTrailers::Decoded,
        );
        let (stream, running) = match &asked {
            Some(a) => {
                let (stream, running) = checksum::hashing(stream, a.algorithm);
                (stream, Some(running))
            }
            None => (stream, None),
        };
        Ok(UploadBody {
            stream,
            trailers,
            asked,
            running,
        })
    }
}

/// The checksum an upload asked for checked against its bytes, once they are all read: its
/// algorithm and value, to answer with.
fn verified_checksum(
    asked: Option<checksum::Asked>,
    running: Option<checksum::Running>,
    trailers: BodyTrailers,
) -> S3Result<Option<(checksum::Algorithm, String)>> {
    let Some(asked) = asked else {
        return Ok(None);
    };
    let computed = running.and_then(|r| r.value(asked.algorithm));
    checksum::verify(&asked, trailers.read().as_ref(), computed)
        .map(|value| Some((asked.algorithm, value)))
        .map_err(checksum_error)
}

fn checksum_error(e: checksum::ChecksumError) -> S3Error {
    let code = match e {
        checksum::ChecksumError::Mismatch(_) => S3ErrorCode::BadDigest,
        _ => S3ErrorCode::InvalidRequest,
    };
    S3Error::with_message(code, e.to_string())
}

/// The one of `crc32, crc32c, crc64nvme, sha1, sha256` that `sum` is, for an answer's fields.
type ChecksumFields = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn checksum_fields(sum: Option<(checksum::Algorithm, String)>) -> ChecksumFields {
    use checksum::Algorithm as A;
    let mut fields: ChecksumFields = Default::default();
    if let Some((algorithm, value)) = sum {
        let slot = match algorithm {
            A::Crc32 => &mut fields.0,
            A::Crc32c => &mut fields.1,
            A::Crc64Nvme => &mut fields.2,
            A::Sha1 => &mut fields.3,
            A::Sha256 => &mut fields.4,
        };
        *slot = Some(value);
    }
    fields
}

/// The checksum fields a read returns: the object's stored checksum when the read asks for it
/// (`x-amz-checksum-mode: ENABLED`) and reads the `whole` object, which it is the checksum of.
/// With them, the checksum's type: a checksum of the full object.
fn read_checksum(
    meta: &ObjectMeta,
    mode: Option<&ChecksumMode>,
    whole: bool,
) -> (ChecksumFields, Option<ChecksumType>) {
    let asked = mode.is_some_and(|m| m.as_str() == ChecksumMode::ENABLED);
    let sum = meta
        .checksum
        .as_ref()
        .filter(|_| asked && whole)
        .map(|c| (c.algorithm, c.value.clone()));
    let kind = sum
        .is_some()
        .then(|| ChecksumType::from_static(ChecksumType::FULL_OBJECT));
    (checksum_fields(sum), kind)
}

/// Karri's S3 implementation (cheap to clone: it holds shared handles).
#[derive(Clone)]
pub struct KarriS3 {
    registry: Arc<Registry>,
    index: ObjectIndex,
    blobs: Arc<dyn BlobStore>,
    region: String,
    /// The domains virtual-hosted-style requests name buckets under.
    domains: Arc<Vec<String>>,
    /// Striped locks that queue this gateway's ACL and tag changes of one key, so that
    /// concurrent ones do not defeat each other's compare-and-swap (other gateways' are still
    /// caught by it).
    update_locks: Arc<[tokio::sync::Mutex<()>]>,
}

/// How many stripes [`KarriS3::update_locks`] has.
const UPDATE_LOCK_STRIPES: usize = 64;

/// A bucket as the operations need it.
struct BucketInfo {
    name: String,
    spec: BucketSpec,
    record_key: String,
    /// The revision the record was read at (its mod revision).
    seen_revision: i64,
    /// The record's UID, which DeleteBucket deletes only.
    uid: Option<String>,
}

impl BucketInfo {
    /// The record as this request authorized it, for the writes that add to the bucket.
    fn seen(&self) -> BucketSeen<'_> {
        BucketSeen {
            record: &self.record_key,
            revision: self.seen_revision,
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

/// A stored time as S3 shows it: in whole seconds, in listings (`…T10:20:30.000Z`) as in the
/// `Last-Modified` header, so that a client sees one time for an object either way.
fn timestamp(ms: i64) -> Timestamp {
    let seconds = u64::try_from(ms.div_euclid(1000)).unwrap_or(0);
    Timestamp::from(UNIX_EPOCH + Duration::from_secs(seconds))
}

/// The `Content-Type` S3 answers for an object stored without one.
const DEFAULT_CONTENT_TYPE: &str = "binary/octet-stream";

/// The `Content-Type` of an object as GET and HEAD answer it.
fn shown_content_type(h: &SystemHeaders) -> Option<ContentType> {
    h.content_type
        .as_deref()
        .unwrap_or(DEFAULT_CONTENT_TYPE)
        .parse()
        .ok()
}

fn ms_of(t: &Timestamp) -> i64 {
    let odt = time::OffsetDateTime::from(t.clone());
    i64::try_from(odt.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn internal(e: impl std::fmt::Display) -> S3Error {
    tracing::error!(error = %e, "S3 request failed");
    S3Error::with_message(
        S3ErrorCode::InternalError,
        "We encountered an internal error. Please try again.",
    )
}

/// Tries of a read-modify-write of an object's entry before giving up.
const UPDATE_ATTEMPTS: usize = 8;

/// `e` as a caller that may (`may_list`) or may not list the bucket sees it: without that
/// right a missing key is AccessDenied, as in AWS, so that keys cannot be probed; other errors
/// (a 503 to retry) stay as they are.
fn hide_missing_key(e: S3Error, may_list: bool) -> S3Error {
    if !may_list && e.code() == &S3ErrorCode::NoSuchKey {
        access_denied()
    } else {
        e
    }
}

fn index_error(e: IndexError) -> S3Error {
    match e {
        IndexError::NoBucket => s3_error!(NoSuchBucket, "The specified bucket does not exist."),
        // Retried by SDKs (503): the bucket's deletion is being tried, and fails if it holds
        // anything.
        IndexError::BucketBusy => s3_error!(
            ServiceUnavailable,
            "The bucket is being checked for deletion. Please try again."
        ),
        // Retried by SDKs (503): by then the watch cache has seen the new record, and the
        // request is authorized against it.
        IndexError::BucketReplaced => s3_error!(
            ServiceUnavailable,
            "The bucket was deleted or created again just now. Please try again."
        ),
        // The condition held when it was checked; the object changed before the write
        // committed. AWS answers this race 409 for the client to retry (and the retry sees 412
        // if the condition fails now).
        IndexError::Changed => s3_error!(
            ConditionalRequestConflict,
            "A conflicting operation occurred. If using PutObject you can retry the request. If using multipart upload you should initiate another CreateMultipartUpload request and re-upload each part."
        ),
        IndexError::NoUpload => s3_error!(
            NoSuchUpload,
            "The specified multipart upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed."
        ),
        IndexError::Etcd(e) => {
            tracing::error!(error = %e, "etcd failed under S3");
            S3Error::with_message(S3ErrorCode::ServiceUnavailable, "Please reduce your request rate.")
        }
        other => internal(other),
    }
}

fn blob_error(e: BlobError) -> S3Error {
    match e {
        BlobError::TooLarge(limit) => S3Error::with_message(
            S3ErrorCode::EntityTooLarge,
            format!("Your proposed upload exceeds the maximum allowed size of {limit} bytes."),
        ),
        BlobError::Body(reason) => S3Error::with_message(
            S3ErrorCode::IncompleteBody,
            format!("The request body ended before it was complete: {reason}"),
        ),
        BlobError::ChunkSignature => s3_error!(
            SignatureDoesNotMatch,
            "The request signature we calculated does not match the signature you provided. Check your key and signing method."
        ),
        BlobError::Sha256Mismatch => {
            let mut e = S3Error::with_message(
                S3ErrorCode::Custom("XAmzContentSHA256Mismatch".into()),
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            );
            e.set_status_code(http::StatusCode::BAD_REQUEST);
            e
        }
        other => internal(other),
    }
}

fn no_such_key() -> S3Error {
    s3_error!(NoSuchKey, "The specified key does not exist.")
}

fn access_denied() -> S3Error {
    s3_error!(AccessDenied, "Access Denied")
}

fn quoted(etag: &str) -> ETag {
    ETag::Strong(etag.to_string())
}

fn owner_of(spec: &BucketSpec) -> Owner {
    Owner {
        display_name: Some(spec.owner.clone()),
        id: Some(spec.owner_id.clone()),
    }
}

fn object_acl_of(acl: Option<&ObjectCannedACL>) -> S3Result<CannedAcl> {
    match acl {
        None => Ok(CannedAcl::Private),
        // They grant the bucket owner what it has here anyway: it owns every object of its
        // buckets, whoever wrote them (`aws s3 cp --acl bucket-owner-full-control`, Hadoop s3a).
        Some(a)
            if matches!(
                a.as_str(),
                "bucket-owner-full-control" | "bucket-owner-read"
            ) =>
        {
            Ok(CannedAcl::Private)
        }
        Some(a) => CannedAcl::parse(a.as_str()).ok_or_else(|| {
            S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                format!("The canned ACL {} is not supported.", a.as_str()),
            )
        }),
    }
}

fn bucket_acl_of(acl: Option<&BucketCannedACL>) -> S3Result<CannedAcl> {
    match acl {
        None => Ok(CannedAcl::Private),
        Some(a) => CannedAcl::parse(a.as_str()).ok_or_else(|| {
            S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                format!("The canned ACL {} is not supported.", a.as_str()),
            )
        }),
    }
}

/// Grants a canned ACL stands for, as GetBucketAcl/GetObjectAcl show them.
fn grants_of(owner: &Owner, acl: CannedAcl) -> Vec<Grant> {
    let group = |uri: &str, permission: &'static str| Grant {
        grantee: Some(Grantee {
            display_name: None,
            email_address: None,
            id: None,
            type_: Type::from_static(Type::GROUP),
            uri: Some(uri.to_string()),
        }),
        permission: Some(Permission::from_static(permission)),
    };
    const ALL_USERS: &str = "http://acs.amazonaws.com/groups/global/AllUsers";
    const AUTH_USERS: &str = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers";
    let mut grants = vec![Grant {
        grantee: Some(Grantee {
            display_name: owner.display_name.clone(),
            email_address: None,
            id: owner.id.clone(),
            type_: Type::from_static(Type::CANONICAL_USER),
            uri: None,
        }),
        permission: Some(Permission::from_static(Permission::FULL_CONTROL)),
    }];
    match acl {
        CannedAcl::Private => {}
        CannedAcl::PublicRead => grants.push(group(ALL_USERS, Permission::READ)),
        CannedAcl::PublicReadWrite => {
            grants.push(group(ALL_USERS, Permission::READ));
            grants.push(group(ALL_USERS, Permission::WRITE));
        }
        CannedAcl::AuthenticatedRead => grants.push(group(AUTH_USERS, Permission::READ)),
    }
    grants
}

/// Whom an ACL grant names, as far as Karri's canned ACLs tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantTo {
    /// Everyone, anonymous included (`.../groups/global/AllUsers`).
    AllUsers,
    /// Any signed-in account (`.../groups/global/AuthenticatedUsers`).
    AuthenticatedUsers,
    /// The bucket's owner, who has every permission anyway.
    Owner,
    /// Another account, an email address or another group: not expressible here.
    Someone,
}

/// Whom a grantee URI names.
fn grant_to_uri(uri: &str) -> GrantTo {
    match uri {
        "http://acs.amazonaws.com/groups/global/AllUsers" => GrantTo::AllUsers,
        "http://acs.amazonaws.com/groups/global/AuthenticatedUsers" => GrantTo::AuthenticatedUsers,
        _ => GrantTo::Someone,
    }
}

/// The canned ACL that `grants` (grantee, permission) amount to: the owner's grants add
/// nothing, and everyone's or signed-in accounts' read (and everyone's write) are the public
/// ACLs. Grants to anyone else are refused as NotImplemented rather than dropped. Pure.
fn canned_from_grants<'a>(
    grants: impl IntoIterator<Item = (GrantTo, &'a str)>,
) -> S3Result<CannedAcl> {
    let (mut all_read, mut all_write, mut auth_read) = (false, false, false);
    let unsupported = || {
        s3_error!(
            NotImplemented,
            "Only grants that match a canned ACL are supported: READ (and WRITE, for a bucket) to AllUsers, READ to AuthenticatedUsers, and the owner's own."
        )
    };
    for (to, permission) in grants {
        match (to, permission) {
            (GrantTo::Owner, _) => {}
            (GrantTo::AllUsers, "READ") => all_read = true,
            (GrantTo::AllUsers, "WRITE") => all_write = true,
            (GrantTo::AuthenticatedUsers, "READ") => auth_read = true,
            _ => return Err(unsupported()),
        }
    }
    Ok(match (all_read, all_write, auth_read) {
        (true, true, _) => CannedAcl::PublicReadWrite,
        (true, false, _) => CannedAcl::PublicRead,
        (false, false, true) => CannedAcl::AuthenticatedRead,
        (false, false, false) => CannedAcl::Private,
        (false, true, _) => return Err(unsupported()),
    })
}

/// The canned ACL an AccessControlPolicy body expresses (see [`canned_from_grants`]), for a
/// bucket owned by `owner_id`.
fn canned_from_policy(policy: &AccessControlPolicy, owner_id: &str) -> S3Result<CannedAcl> {
    let grants = policy.grants.iter().flatten().map(|g| {
        let to = match g.grantee.as_ref() {
            Some(Grantee { uri: Some(uri), .. }) => grant_to_uri(uri),
            Some(Grantee { id: Some(id), .. }) if id == owner_id => GrantTo::Owner,
            _ => GrantTo::Someone,
        };
        (
            to,
            g.permission.as_ref().map(Permission::as_str).unwrap_or(""),
        )
    });
    canned_from_grants(grants)
}

/// The `x-amz-grant-*` headers of a request.
#[derive(Debug, Default, Clone, Copy)]
struct HeaderGrants<'a> {
    full_control: Option<&'a str>,
    read: Option<&'a str>,
    read_acp: Option<&'a str>,
    write: Option<&'a str>,
    write_acp: Option<&'a str>,
}

impl HeaderGrants<'_> {
    fn is_empty(&self) -> bool {
        [
            self.full_control,
            self.read,
            self.read_acp,
            self.write,
            self.write_acp,
        ]
        .iter()
        .all(Option::is_none)
    }

    /// Each grantee of each header with the permission the header gives, for a bucket owned by
    /// `owner_id`. A header is a comma-separated list of `uri="…"`, `id="…"` or
    /// `emailAddress="…"`.
    fn grants(&self, owner_id: &str) -> S3Result<Vec<(GrantTo, &'static str)>> {
        let mut out = Vec::new();
        for (header, permission) in [
            (self.full_control, "FULL_CONTROL"),
            (self.read, "READ"),
            (self.read_acp, "READ_ACP"),
            (self.write, "WRITE"),
            (self.write_acp, "WRITE_ACP"),
        ] {
            for grantee in header.into_iter().flat_map(|h| h.split(',')) {
                let Some((kind, value)) = grantee.trim().split_once('=') else {
                    return Err(s3_error!(
                        InvalidArgument,
                        "A grant header names its grantees as uri=\"…\", id=\"…\" or emailAddress=\"…\"."
                    ));
                };
                let value = value.trim().trim_matches('"');
                let to = match kind.trim() {
                    "uri" => grant_to_uri(value),
                    "id" if value == owner_id => GrantTo::Owner,
                    "id" | "emailAddress" => GrantTo::Someone,
                    other => {
                        return Err(S3Error::with_message(
                            S3ErrorCode::InvalidArgument,
                            format!("Unknown grantee type {other:?} in a grant header: it is uri, id or emailAddress."),
                        ))
                    }
                };
                out.push((to, permission));
            }
        }
        Ok(out)
    }
}

/// The ACL a request asks for with its canned ACL header (`canned`, already read) or its grant
/// headers, for a bucket owned by `owner_id`; `None` when it asks for neither. Both at once
/// are refused, as AWS refuses them.
fn requested_acl(
    canned: Option<CannedAcl>,
    grants: HeaderGrants<'_>,
    owner_id: &str,
) -> S3Result<Option<CannedAcl>> {
    if grants.is_empty() {
        return Ok(canned);
    }
    if canned.is_some() {
        return Err(s3_error!(
            InvalidRequest,
            "Specifying both Canned ACLs and Header Grants is not allowed"
        ));
    }
    canned_from_grants(grants.grants(owner_id)?).map(Some)
}

/// The `x-amz-grant-*` headers of an s3s input (`grant_write` only where the input has one:
/// `header_grants!(input, write)`).
macro_rules! header_grants {
    ($i:expr) => {
        HeaderGrants {
            full_control: $i.grant_full_control.as_deref(),
            read: $i.grant_read.as_deref(),
            read_acp: $i.grant_read_acp.as_deref(),
            write: None,
            write_acp: $i.grant_write_acp.as_deref(),
        }
    };
    ($i:expr, write) => {
        HeaderGrants {
            write: $i.grant_write.as_deref(),
            ..header_grants!($i)
        }
    };
}

/// The ACL a new object gets (PutObject, CopyObject, CreateMultipartUpload): its canned ACL
/// header or grant headers, private without either, for a bucket owned by `owner_id`.
fn new_object_acl(
    canned: Option<&ObjectCannedACL>,
    grants: HeaderGrants<'_>,
    owner_id: &str,
) -> S3Result<CannedAcl> {
    let canned = canned.map(|a| object_acl_of(Some(a))).transpose()?;
    Ok(requested_acl(canned, grants, owner_id)?.unwrap_or(CannedAcl::Private))
}

/// The ACL a PutBucketAcl or PutObjectAcl sets: its canned ACL header (`canned`, already read),
/// its grant headers or its AccessControlPolicy body, for a bucket owned by `owner_id`.
fn acl_to_set(
    canned: Option<CannedAcl>,
    grants: HeaderGrants<'_>,
    policy: Option<&AccessControlPolicy>,
    owner_id: &str,
) -> S3Result<CannedAcl> {
    match (requested_acl(canned, grants, owner_id)?, policy) {
        (Some(acl), _) => Ok(acl),
        (None, Some(policy)) => canned_from_policy(policy, owner_id),
        (None, None) => Err(s3_error!(
            MissingSecurityHeader,
            "Your request was missing a required header: x-amz-acl, an x-amz-grant-* header or an AccessControlPolicy body."
        )),
    }
}

fn tags_from_header(header: Option<&str>) -> S3Result<Vec<(String, String)>> {
    let Some(h) = header.filter(|h| !h.is_empty()) else {
        return Ok(Vec::new());
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(h).map_err(|_| {
        S3Error::with_message(
            S3ErrorCode::InvalidArgument,
            "The x-amz-tagging header is not a query string.",
        )
    })?;
    check_tags(&pairs, MAX_OBJECT_TAGS)?;
    Ok(pairs)
}

/// At most this many tags on an object (AWS's limit).
const MAX_OBJECT_TAGS: usize = 10;
/// At most this many tags on a bucket (AWS's limit).
const MAX_BUCKET_TAGS: usize = 50;
/// At most this many bytes of user metadata (keys and values, UTF-8) on an object, as in AWS.
const MAX_USER_METADATA: usize = 2048;
/// At most this many bytes of stored system headers (Content-Type, Cache-Control …): AWS takes
/// at most 8 KiB of request headers in all.
const MAX_SYSTEM_HEADERS: usize = 8192;

fn check_tags(tags: &[(String, String)], max: usize) -> S3Result<()> {
    if tags.len() > max {
        return Err(if max == MAX_BUCKET_TAGS {
            s3_error!(InvalidTag, "Bucket tag count cannot be greater than {max}")
        } else {
            // AWS's code for it, which s3s does not name.
            let mut e = S3Error::with_message(
                S3ErrorCode::Custom("BadRequest".into()),
                format!("Object tags cannot be greater than {max}"),
            );
            e.set_status_code(http::StatusCode::BAD_REQUEST);
            e
        });
    }
    // Letters, digits and spaces of any script, and + - = . _ : / @ (AWS's tag rules).
    let allowed = |t: &str| {
        t.chars()
            .all(|c| c.is_alphanumeric() || c.is_whitespace() || "+-=._:/@".contains(c))
    };
    let mut seen = std::collections::HashSet::new();
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || !allowed(k) {
            return Err(s3_error!(
                InvalidTag,
                "The TagKey you have provided is invalid: 1 to 128 letters, digits, spaces or + - = . _ : / @"
            ));
        }
        if v.chars().count() > 256 || !allowed(v) {
            return Err(s3_error!(
                InvalidTag,
                "The TagValue you have provided is invalid: at most 256 letters, digits, spaces or + - = . _ : / @"
            ));
        }
        if k.to_ascii_lowercase().starts_with("aws:") {
            return Err(s3_error!(
                InvalidTag,
                "Your TagKey cannot be prefixed with aws:"
            ));
        }
        if !seen.insert(k) {
            return Err(s3_error!(
                InvalidTag,
                "Cannot provide multiple Tags with the same key"
            ));
        }
    }
    Ok(())
}

fn tags_from_dto(tagging: &Tagging, max: usize) -> S3Result<Vec<(String, String)>> {
    let tags: Vec<(String, String)> = tagging
        .tag_set
        .iter()
        .map(|t| {
            (
                t.key.clone().unwrap_or_default(),
                t.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    check_tags(&tags, max)?;
    Ok(tags)
}

fn tags_to_dto(tags: &[(String, String)]) -> TagSet {
    tags.iter()
        .map(|(k, v)| Tag {
            key: Some(k.clone()),
            value: Some(v.clone()),
        })
        .collect()
}

/// Buckets are never versioned, so the one version of an object is `null`: a request naming
/// another version is refused (AWS: 400 InvalidArgument), never served or applied to the
/// current object.
fn only_null_version(version_id: Option<&str>) -> S3Result<()> {
    match version_id {
        None | Some("null") => Ok(()),
        Some(_) => Err(s3_error!(InvalidArgument, "Invalid version id specified")),
    }
}

/// The user metadata (`x-amz-meta-*`) to store, keys in lower case; refused above
/// [`MAX_USER_METADATA`] bytes, as AWS refuses it.
fn metadata_of(m: Option<&Metadata>) -> S3Result<BTreeMap<String, String>> {
    let metadata: BTreeMap<String, String> = m
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let size: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_USER_METADATA {
        return Err(s3_error!(
            MetadataTooLarge,
            "Your metadata headers exceed the maximum allowed metadata size: {size} bytes, at most {MAX_USER_METADATA}."
        ));
    }
    Ok(metadata)
}

fn metadata_to_dto(m: &BTreeMap<String, String>) -> Option<Metadata> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The multipart ETag: MD5 of the concatenated binary MD5s of the parts, `-` and their count.
pub fn multipart_etag(part_md5_hex: &[&str]) -> String {
    let mut md5 = Md5::new();
    for p in part_md5_hex {
        if let Ok(bytes) = hex::decode(p) {
            md5.update(bytes);
        }
    }
    format!("{}-{}", hex::encode(md5.finalize()), part_md5_hex.len())
}

fn check_content_md5(expected_b64: Option<&str>, md5: &[u8; 16]) -> S3Result<()> {
    use base64::Engine as _;
    let Some(expected) = expected_b64 else {
        return Ok(());
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(expected)
        .map_err(|_| s3_error!(InvalidDigest, "The Content-MD5 you specified was invalid."))?;
    if decoded.as_slice() != md5 {
        return Err(s3_error!(
            BadDigest,
            "The Content-MD5 you specified did not match what we received."
        ));
    }
    Ok(())
}

/// What a body stream's error means: s3s verifies chunk signatures and the signed SHA-256 as
/// the body streams, and says which check failed only in its errors' text.
fn body_failure(e: &dyn std::error::Error) -> BlobError {
    let text = e.to_string();
    if text.contains("SignatureMismatch") {
        BlobError::ChunkSignature
    } else if text.contains("Sha256Mismatch") {
        BlobError::Sha256Mismatch
    } else {
        BlobError::Body(text)
    }
}

/// The bytes of a body; `framed` when it is `aws-chunked` framing s3s left as it came (an
/// unsigned request), decoded here with its trailers.
fn body_stream(
    body: Option<StreamingBlob>,
    framed: bool,
) -> (ByteStream<'static>, Option<super::chunked::Trailers>) {
    let raw: ByteStream<'static> = match body {
        Some(blob) => Box::pin(blob.map(|r| r.map_err(|e| body_failure(e.as_ref())))),
        None => Box::pin(futures::stream::empty()),
    };
    if framed {
        let (stream, trailers) = super::chunked::decode(raw);
        (stream, Some(trailers))
    } else {
        (raw, None)
    }
}

/// The `x-amz-decoded-content-length` of a streaming (aws-chunked) upload: how many bytes its
/// chunks must carry.
fn decoded_content_length(headers: &http::HeaderMap) -> S3Result<Option<u64>> {
    let Some(value) = headers.get("x-amz-decoded-content-length") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            s3_error!(
                InvalidArgument,
                "x-amz-decoded-content-length must be a number of bytes"
            )
        })
}

/// Refuses a body whose announced length is over [`MAX_PUT_SIZE`] before any of it is read:
/// the decoded length of an `aws-chunked` body (its Content-Length counts the framing too),
/// else its Content-Length.
fn announced_fits(decoded_length: Option<u64>, content_length: Option<i64>) -> S3Result<()> {
    let announced = match decoded_length {
        Some(n) => Some(n),
        None => content_length.map(|n| u64::try_from(n).unwrap_or(u64::MAX)),
    };
    if announced.is_some_and(|n| n > MAX_PUT_SIZE) {
        return Err(blob_error(BlobError::TooLarge(MAX_PUT_SIZE)));
    }
    Ok(())
}

/// A streaming upload must deliver every byte it announced: a body cut short between chunks
/// (the final signed chunk missing) is refused, never stored shortened. Pure.
fn check_decoded_length(announced: Option<u64>, received: u64) -> S3Result<()> {
    match announced {
        Some(n) if n != received => Err(s3_error!(
            IncompleteBody,
            "You did not provide the number of bytes specified by the x-amz-decoded-content-length header: {n} announced, {received} received"
        )),
        _ => Ok(()),
    }
}

/// The blobs and in-blob ranges that make up bytes `range` of an object made of `segments`.
/// Pure.
fn pieces_of(
    segments: &[Segment],
    range: std::ops::Range<u64>,
) -> Vec<(String, std::ops::Range<u64>)> {
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    for seg in segments {
        let (start, end) = (offset, offset + seg.size);
        offset = end;
        let lo = range.start.max(start);
        let hi = range.end.min(end);
        if lo < hi {
            pieces.push((seg.blob.clone(), (lo - start)..(hi - start)));
        }
    }
    pieces
}

/// Bytes `range` of an object as one stream. Where opening a blob pins its bytes
/// ([`BlobStore::get_pins`]), every blob is opened before this returns, so a concurrent
/// overwrite that deletes them cannot cut the stream short (an open file outlives its name);
/// elsewhere the first is opened now and the others when the stream reaches them, so that an
/// object of thousands of parts holds one connection at a time. A first blob already gone is
/// [`BlobError::Missing`], and the caller reads the index again.
async fn open_segments(
    blobs: &Arc<dyn BlobStore>,
    segments: &[Segment],
    range: std::ops::Range<u64>,
) -> Result<ByteStream<'static>, BlobError> {
    let mut pieces = pieces_of(segments, range).into_iter();
    let mut streams = Vec::new();
    if let Some((blob, r)) = pieces.next() {
        streams.push(blobs.get(&blob, r).await?);
    }
    if blobs.get_pins() {
        for (blob, r) in pieces {
            streams.push(blobs.get(&blob, r).await?);
        }
        return Ok(Box::pin(futures::stream::iter(streams).flatten()));
    }
    let blobs = blobs.clone();
    let rest = futures::stream::iter(pieces)
        .then(move |(blob, r)| {
            let blobs = blobs.clone();
            async move {
                match blobs.get(&blob, r).await {
                    Ok(stream) => stream,
                    Err(e) => Box::pin(futures::stream::once(async move { Err(e) })),
                }
            }
        })
        .flatten();
    Ok(Box::pin(
        futures::stream::iter(streams).flatten().chain(rest),
    ))
}

/// Reads of an object that race with overwrites retry this many times.
const READ_ATTEMPTS: usize = 3;

struct IndexSource<'a> {
    index: &'a ObjectIndex,
    bucket: &'a BucketInfo,
}

#[async_trait::async_trait]
impl KeySource<ObjectMeta> for IndexSource<'_> {
    type Error = IndexError;
    async fn fetch(
        &self,
        prefix: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(String, ObjectMeta)>, IndexError> {
        self.index
            .list_objects(self.bucket.seen(), &self.bucket.name, prefix, start, limit)
            .await
    }
}

fn max_keys_of(m: Option<i32>) -> S3Result<usize> {
    match m {
        None => Ok(1000),
        Some(n) if n < 0 => Err(s3_error!(
            InvalidArgument,
            "max-keys must be a non-negative integer."
        )),
        Some(n) => Ok(usize::try_from(n.min(1000)).unwrap_or(1000)),
    }
}

/// Where a completed multipart upload's object is (its `Location`), as AWS gives it: an absolute
/// URL on the host the request named, `https://<host>/<bucket>/<key>`, or `https://<host>/<key>`
/// when the host names the bucket under one of `domains` (virtual-hosted style); the key
/// URL-encoded. Without a host, the path alone. Pure.
fn object_location(domains: &[String], host: Option<&str>, bucket: &str, key: &str) -> String {
    let key = url_encode_key(key);
    match host.filter(|h| !h.is_empty()) {
        Some(h) if super::virtual_bucket(domains, h) == Some(bucket) => {
            format!("https://{h}/{key}")
        }
        Some(h) => format!("https://{h}/{bucket}/{key}"),
        None => format!("/{bucket}/{key}"),
    }
}

/// The host a request named: its `Host` header, or (HTTP/2, which has none) its URI's
/// authority.
fn request_host(headers: &http::HeaderMap, uri: &http::Uri) -> Option<String> {
    headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
}

fn url_encode_key(k: &str) -> String {
    // encoding-type=url: like AWS, every byte but unreserved characters and `/` is encoded.
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(k, SET).to_string()
}

/// How a listing writes keys: as they are, or URL-encoded for `encoding-type=url` (the one
/// encoding S3 knows; any other is refused, as S3 refuses it).
fn encode_with(encoding: Option<&EncodingType>) -> S3Result<impl Fn(&str) -> String> {
    let url = match encoding.map(EncodingType::as_str) {
        None => false,
        Some(EncodingType::URL) => true,
        Some(_) => {
            return Err(s3_error!(
                InvalidArgument,
                "Invalid Encoding Method specified in Request"
            ))
        }
    };
    Ok(move |k: &str| {
        if url {
            url_encode_key(k)
        } else {
            k.to_string()
        }
    })
}

fn token_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn token_decode(s: &str) -> S3Result<String> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            s3_error!(
                InvalidArgument,
                "The continuation token provided is incorrect"
            )
        })
}

impl KarriS3 {
    /// Operations on `registry`'s etcd and `blobs`, in `region`.
    pub fn new(
        registry: Arc<Registry>,
        blobs: Arc<dyn BlobStore>,
        region: String,
        domains: Arc<Vec<String>>,
    ) -> Self {
        let index = ObjectIndex::new(registry.etcd_client());
        Self {
            registry,
            index,
            blobs,
            region,
            domains,
            update_locks: (0..UPDATE_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// The signed caller, or `None` for an anonymous request.
    async fn caller<T>(&self, req: &S3Request<T>) -> S3Result<Option<Caller>> {
        let key = req
            .credentials
            .as_ref()
            .map(|c| c.access_key.clone())
            .or_else(|| {
                req.extensions
                    .get::<ForwardedIdentity>()
                    .map(|f| f.0.clone())
            });
        let Some(key) = key else {
            return Ok(None);
        };
        if let Some(node) = super::presign::node_of_key(&key) {
            // A node agent's presigned image URL: it reads objects, nothing else.
            return Ok(Some(Caller {
                account: format!("node:{node}"),
                account_id: super::presign::NODE_READER.to_string(),
                namespace: String::new(),
                user: node,
            }));
        }
        match resolve_access_key(&self.registry, &key).await {
            Ok((_, caller)) => {
                tracing::Span::current().record("account", caller.account.as_str());
                Ok(Some(caller))
            }
            Err(KeyError::Unknown) => Err(s3_error!(
                InvalidAccessKeyId,
                "The AWS Access Key Id you provided does not exist in our records."
            )),
            Err(KeyError::Unavailable) => Err(s3_error!(
                ServiceUnavailable,
                "Please reduce your request rate."
            )),
            Err(e @ KeyError::Sealed) => Err(internal(e)),
        }
    }

    async fn signed_caller<T>(&self, req: &S3Request<T>) -> S3Result<Caller> {
        self.caller(req).await?.ok_or_else(access_denied)
    }

    async fn bucket(&self, name: &str) -> S3Result<BucketInfo> {
        let key = store::record_key("buckets", None, name);
        let (value, seen_revision) = match self.registry.cache.get("buckets", &key) {
            Some(found) => (found.value.clone(), found.revision),
            None => self
                .registry
                .read_key_versioned(&key)
                .await
                .map_err(internal)?
                .ok_or_else(|| s3_error!(NoSuchBucket, "The specified bucket does not exist."))?,
        };
        // A bucket whose DeleteBucket (or kubectl delete) waits on a finalizer is gone for S3:
        // nothing more is written to it, and its name is not served.
        if value.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(s3_error!(
                NoSuchBucket,
                "The specified bucket does not exist."
            ));
        }
        let spec: BucketSpec = serde_json::from_value(value["spec"].clone()).map_err(internal)?;
        let uid = value
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(BucketInfo {
            name: name.to_string(),
            spec,
            record_key: key,
            seen_revision,
            uid,
        })
    }

    /// Checks that the caller of `req` may read the configuration of bucket `name`.
    async fn bucket_config_read<T>(&self, req: &S3Request<T>, name: &str) -> S3Result<()> {
        let caller = self.caller(req).await?;
        self.authorized_bucket(caller.as_ref(), name, Action::BucketConfig)
            .await
            .map(|_| ())
    }

    /// The bucket, if `who` may do `action` in it (object ACL for object reads).
    async fn authorized_bucket(
        &self,
        caller: Option<&Caller>,
        name: &str,
        action: Action,
    ) -> S3Result<BucketInfo> {
        let bucket = self.bucket(name).await?;
        if action != Action::ReadObject && !permits(caller, action, &bucket, None) {
            return Err(access_denied());
        }
        Ok(bucket)
    }

    async fn object(&self, bucket: &BucketInfo, key: &str) -> S3Result<ObjectMeta> {
        self.index
            .get_object(bucket.seen(), &bucket.name, key)
            .await
            .map_err(index_error)?
            .ok_or_else(no_such_key)
    }

    async fn delete_blobs<'a>(&self, blobs: impl Iterator<Item = &'a str>) {
        for b in blobs {
            if let Err(e) = self.blobs.delete(b).await {
                // The sweep reclaims it later.
                tracing::warn!(blob = b, error = %e, "could not delete a replaced blob");
            }
        }
    }

    /// Stores an upload's body as a new blob and checks it against what the request announced
    /// (`Content-MD5`, the decoded length of an `aws-chunked` body, a flexible checksum); a blob
    /// that fails a check is deleted. Returns the blob and the checksum to show, if one was
    /// asked for.
    async fn receive(
        &self,
        body: UploadBody,
        content_md5: Option<&str>,
        decoded_length: Option<u64>,
    ) -> S3Result<(super::blob::Written, Option<(checksum::Algorithm, String)>)> {
        let written = self
            .blobs
            .put(body.stream, MAX_PUT_SIZE)
            .await
            .map_err(blob_error)?;
        let checked = check_content_md5(content_md5, &written.md5)
            .and_then(|()| check_decoded_length(decoded_length, written.size))
            .and_then(|()| verified_checksum(body.asked, body.running, body.trailers));
        match checked {
            Ok(sum) => Ok((written, sum)),
            Err(e) => {
                self.delete_blobs(std::iter::once(written.id.as_str()))
                    .await;
                Err(e)
            }
        }
    }

    /// What a conditional write (`If-Match`, `If-None-Match`) expects at `key`, to hold in its
    /// publishing transaction; refused at once when the conditions fail already.
    async fn write_conditions(
        &self,
        bucket: &BucketInfo,
        key: &str,
        if_match: Option<&ETagCondition>,
        if_none_match: Option<&ETagCondition>,
    ) -> S3Result<Expect> {
        if if_match.is_none() && if_none_match.is_none() {
            return Ok(Expect::Anything);
        }
        let existing = self
            .index
            .get_object_versioned(bucket.seen(), &bucket.name, key)
            .await
            .map_err(index_error)?;
        let expect = match &existing {
            Some((_, version)) => Expect::Version(*version),
            None => Expect::Absent,
        };
        match (existing.map(|(meta, _)| meta), if_none_match) {
            (Some(_), Some(ETagCondition::Any)) => {
                return Err(s3_error!(
                    PreconditionFailed,
                    "At least one of the pre-conditions you specified did not hold"
                ))
            }
            (None, _) if if_match.is_some() => return Err(no_such_key()),
            (Some(meta), _) => precondition_outcome(
                &Preconditions {
                    if_match: if_match.cloned(),
                    if_none_match: if_none_match.cloned(),
                    ..Default::default()
                },
                &meta,
                false,
            )?,
            _ => {}
        }
        Ok(expect)
    }

    /// The answer to a CompleteMultipartUpload of an upload that is gone, when that upload
    /// became the object now at `key`: a retry whose first answer was lost, or one that raced
    /// the completion, is answered as the completion was.
    async fn completed_already(
        &self,
        bucket: &BucketInfo,
        key: &str,
        upload_id: &str,
        host: Option<&str>,
    ) -> S3Result<Option<CompleteMultipartUploadOutput>> {
        let current = self
            .index
            .get_object(bucket.seen(), &bucket.name, key)
            .await
            .map_err(index_error)?;
        Ok(current
            .filter(|meta| meta.upload_id.as_deref() == Some(upload_id))
            .map(|meta| CompleteMultipartUploadOutput {
                bucket: Some(bucket.name.clone()),
                e_tag: Some(quoted(&meta.etag)),
                key: Some(key.to_owned()),
                location: Some(object_location(&self.domains, host, &bucket.name, key)),
                ..Default::default()
            }))
    }

    /// Publishes `meta` at `key` if the key holds what `expect` says, deleting its blobs again
    /// when it is refused for sure, and the replaced object's blobs once it is no longer visible.
    async fn publish_expecting(
        &self,
        bucket: &BucketInfo,
        key: &str,
        meta: &ObjectMeta,
        expect: Expect,
    ) -> S3Result<()> {
        match self
            .index
            .put_object_expecting(bucket.seen(), &bucket.name, key, meta, expect)
            .await
        {
            Ok(prev) => {
                if let Some(prev) = prev {
                    self.delete_blobs(prev.blobs().filter(|b| !meta.blobs().any(|n| n == *b)))
                        .await;
                }
                Ok(())
            }
            Err(e) => {
                if e.refused_for_sure() {
                    self.delete_blobs(meta.blobs()).await;
                }
                Err(index_error(e))
            }
        }
    }

    /// A copy of `meta`'s bytes in `range` as one new blob.
    async fn copy_bytes(
        &self,
        meta: &ObjectMeta,
        range: std::ops::Range<u64>,
    ) -> S3Result<super::blob::Written> {
        Ok(self.copy_bytes_hashing(meta, range, None).await?.0)
    }

    /// [`Self::copy_bytes`], with the checksum of the bytes copied by `algorithm` when one is
    /// given (what a copy that asks for a checksum stores and answers).
    async fn copy_bytes_hashing(
        &self,
        meta: &ObjectMeta,
        range: std::ops::Range<u64>,
        algorithm: Option<checksum::Algorithm>,
    ) -> S3Result<(super::blob::Written, Option<Checksum>)> {
        // Refused before a byte moves, as AWS refuses it, rather than after copying 5 GiB.
        if range.end.saturating_sub(range.start) > MAX_PUT_SIZE {
            return Err(s3_error!(
                InvalidRequest,
                "The specified copy source is larger than the maximum allowable size for a copy source: {MAX_PUT_SIZE}"
            ));
        }
        let stream = open_segments(&self.blobs, &meta.segments, range)
            .await
            .map_err(|e| match e {
                BlobError::Missing(_) => s3_error!(
                    OperationAborted,
                    "The source object changed while it was being copied. Please try again."
                ),
                other => blob_error(other),
            })?;
        let (stream, running) = match algorithm {
            Some(a) => {
                let (stream, running) = checksum::hashing(stream, a);
                (stream, Some((a, running)))
            }
            None => (stream, None),
        };
        let written = self
            .blobs
            .put(stream, MAX_PUT_SIZE)
            .await
            .map_err(blob_error)?;
        let sum = running.and_then(|(algorithm, running)| {
            running
                .value(algorithm)
                .map(|value| Checksum { algorithm, value })
        });
        Ok((written, sum))
    }

    async fn copy_source(
        &self,
        caller: Option<&Caller>,
        source: &CopySource,
    ) -> S3Result<ObjectMeta> {
        let CopySource::Bucket {
            bucket,
            key,
            version_id,
        } = source
        else {
            return Err(s3_error!(
                NotImplemented,
                "Access point copy sources are not supported."
            ));
        };
        only_null_version(version_id.as_deref())?;
        let src_bucket = self.bucket(bucket).await?;
        let meta = self.object(&src_bucket, key).await.map_err(|e| {
            // As for a GET: without read access to the source bucket, a missing key is
            // AccessDenied, so a copy cannot probe another account's private keys.
            hide_missing_key(e, permits(caller, Action::ListBucket, &src_bucket, None))
        })?;
        if !permits(caller, Action::ReadObject, &src_bucket, Some(meta.acl)) {
            return Err(access_denied());
        }
        Ok(meta)
    }
}

/// The stored bytes (an [`ObjectMeta::content_id`]) that a node's presigned image URL was
/// issued for: its signed query parameter [`super::presign::CONTENT_PARAM`].
fn node_pin(uri: &http::Uri) -> Option<String> {
    // The value is hex: nothing to decode.
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == super::presign::CONTENT_PARAM).then(|| v.to_string())
    })
}

/// Refuses a storage class other than `STANDARD`, the one class Karri stores every object in
/// (as MinIO refuses the classes it lacks): an object asked for in another would be reported in
/// a class it is not in.
fn stored_class(class: Option<&StorageClass>) -> S3Result<()> {
    match class.map(StorageClass::as_str) {
        None | Some(StorageClass::STANDARD) => Ok(()),
        Some(other) => Err(s3_error!(
            InvalidStorageClass,
            "The storage class you specified is not valid: Karri stores every object in STANDARD, not {other}"
        )),
    }
}

/// Refuses server-side encryption Karri cannot give: with KMS keys (there is no KMS) and with
/// customer-provided keys (SSE-C: an object stored without the key would be readable without
/// it). `AES256` (SSE-S3, which AWS applies to every object anyway) is taken; the disks under
/// Karri's object store are the operator's to encrypt.
fn encryption_refusal(
    sse: Option<&ServerSideEncryption>,
    customer_algorithm: Option<&str>,
) -> S3Result<()> {
    if customer_algorithm.is_some() {
        return Err(s3_error!(
            NotImplemented,
            "Server-side encryption with customer-provided keys (SSE-C) is not supported by Karri."
        ));
    }
    match sse.map(ServerSideEncryption::as_str) {
        None | Some(ServerSideEncryption::AES256) => Ok(()),
        Some(kms) if kms.starts_with("aws:kms") => Err(s3_error!(
            NotImplemented,
            "Server-side encryption with KMS keys ({kms}) is not supported by Karri: there is no KMS. Use AES256 or none."
        )),
        Some(other) => Err(s3_error!(
            InvalidArgument,
            "The encryption method specified is not supported: {other}"
        )),
    }
}

/// The `x-amz-*` headers a presigned URL carries in its query (lower-cased names, decoded
/// values), which the signature covers and S3 applies as if they were headers: SDKs put a
/// presigned PUT's metadata, tagging and ACL there. The signing parameters and checksums are
/// not among them. Empty for a request that is not presigned. Pure.
fn presigned_headers<T>(req: &S3Request<T>) -> Vec<(String, String)> {
    let forwarded = req.extensions.get::<ForwardedPresigned>().is_some();
    query_headers(&req.uri, forwarded)
}

/// A presigned request's `x-amz-*` query headers ([`presigned_headers`]), from its `uri`;
/// `presigned` when its signature was checked and taken off before it came here (the
/// Eucalyptus path). Pure.
fn query_headers(uri: &http::Uri, presigned: bool) -> Vec<(String, String)> {
    let pairs: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    let decode = |s: &str| {
                        percent_encoding::percent_decode_str(s)
                            .decode_utf8_lossy()
                            .into_owned()
                    };
                    (decode(k).to_ascii_lowercase(), decode(v))
                })
                .collect()
        })
        .unwrap_or_default();
    if !presigned && !pairs.iter().any(|(k, _)| k == "x-amz-signature") {
        return Vec::new();
    }
    pairs
        .into_iter()
        .filter(|(k, _)| k.starts_with("x-amz-") && !k.starts_with("x-amz-checksum"))
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "x-amz-algorithm"
                    | "x-amz-credential"
                    | "x-amz-date"
                    | "x-amz-expires"
                    | "x-amz-signedheaders"
                    | "x-amz-signature"
                    | "x-amz-security-token"
                    | "x-amz-content-sha256"
                    | "x-amz-sdk-checksum-algorithm"
            )
        })
        .collect()
}

/// A PUT's input with the headers its presigned URL carries ([`presigned_headers`]) where the
/// request itself has none: user metadata, tagging, canned ACL, storage class and encryption.
fn with_presigned_headers(input: &mut PutObjectInput, found: &[(String, String)]) {
    for (name, value) in found {
        if let Some(key) = name.strip_prefix("x-amz-meta-") {
            input
                .metadata
                .get_or_insert_with(Default::default)
                .entry(key.to_owned())
                .or_insert_with(|| value.clone());
            continue;
        }
        match name.as_str() {
            "x-amz-tagging" if input.tagging.is_none() => input.tagging = Some(value.clone()),
            "x-amz-acl" if input.acl.is_none() => {
                input.acl = Some(ObjectCannedACL::from(value.clone()));
            }
            "x-amz-storage-class" if input.storage_class.is_none() => {
                input.storage_class = Some(StorageClass::from(value.clone()));
            }
            "x-amz-server-side-encryption" if input.server_side_encryption.is_none() => {
                input.server_side_encryption = Some(ServerSideEncryption::from(value.clone()));
            }
            "x-amz-server-side-encryption-customer-algorithm" => {
                input.sse_customer_algorithm = Some(value.clone());
            }
            _ => {}
        }
    }
}

/// Refuses the encryption a presigned request's query asks for that Karri cannot give (see
/// [`encryption_refusal`]), for the operations that do not otherwise read their query headers.
fn presigned_encryption_refusal(found: &[(String, String)]) -> S3Result<()> {
    let value = |name: &str| {
        found
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    encryption_refusal(
        value("x-amz-server-side-encryption")
            .map(|v| ServerSideEncryption::from(v.to_owned()))
            .as_ref(),
        value("x-amz-server-side-encryption-customer-algorithm"),
    )
}

/// Refuses customer-provided encryption keys on a read: no object Karri holds was written
/// with one (they are refused), so the parameters do not apply, as S3 answers.
fn no_customer_key(customer_algorithm: Option<&str>) -> S3Result<()> {
    match customer_algorithm {
        None => Ok(()),
        Some(_) => Err(s3_error!(
            InvalidRequest,
            "The encryption parameters are not applicable to this object."
        )),
    }
}

fn permits(
    caller: Option<&Caller>,
    action: Action,
    bucket: &BucketInfo,
    object_acl: Option<CannedAcl>,
) -> bool {
    let who = match caller {
        Some(c) if c.account_id == super::presign::NODE_READER => {
            return action == Action::ReadObject
        }
        Some(c) => Who::Account(&c.account_id),
        None => Who::Anonymous,
    };
    allowed(
        who,
        action,
        &bucket.spec.owner_id,
        bucket.spec.acl,
        object_acl,
    )
}

fn precondition_outcome(p: &Preconditions, meta: &ObjectMeta, read: bool) -> S3Result<()> {
    match cond::evaluate(p, &meta.etag, meta.last_modified_ms, read) {
        Outcome::Proceed => Ok(()),
        Outcome::NotModified => {
            // As RFC 9110 asks of a 304: the validators a 200 would have sent.
            let mut e = S3Error::new(S3ErrorCode::NotModified);
            let mut headers = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", meta.etag)) {
                headers.insert(http::header::ETAG, v);
            }
            if let Some(v) = chrono::DateTime::from_timestamp_millis(meta.last_modified_ms)
                .map(|t| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
                .and_then(|t| http::HeaderValue::from_str(&t).ok())
            {
                headers.insert(http::header::LAST_MODIFIED, v);
            }
            e.set_headers(headers);
            Err(e)
        }
        Outcome::Failed => Err(s3_error!(
            PreconditionFailed,
            "At least one of the pre-conditions you specified did not hold"
        )),
    }
}

/// An object found readable, and the bytes of it to send.
struct Readable {
    meta: ObjectMeta,
    /// The bytes asked for (the whole object unless a range or a part was).
    span: std::ops::Range<u64>,
    /// `Content-Range` when a range or a part was asked for.
    content_range: Option<String>,
    /// `x-amz-mp-parts-count`, sent (as AWS does) only when a part was asked for.
    parts_count: Option<i32>,
}

/// The bytes of part `n` of `meta` and its parts count, as a GET or HEAD with `partNumber`
/// reads them: the part as uploaded for an object completed from parts, the whole object as
/// part 1 of any other.
fn part_span(meta: &ObjectMeta, n: i32) -> S3Result<(std::ops::Range<u64>, i32)> {
    if !(1..=10_000).contains(&n) {
        return Err(s3_error!(
            InvalidArgument,
            "Part number must be an integer between 1 and 10000, inclusive"
        ));
    }
    let from_parts = meta
        .parts_count
        .is_some_and(|c| usize::try_from(c).is_ok_and(|c| c == meta.segments.len()));
    let sizes: Vec<u64> = if from_parts {
        meta.segments.iter().map(|s| s.size).collect()
    } else {
        vec![meta.size]
    };
    let count = i32::try_from(sizes.len()).unwrap_or(i32::MAX);
    let index = usize::try_from(n - 1).unwrap_or(usize::MAX);
    let Some(size) = sizes.get(index) else {
        let mut e = S3Error::with_message(
            S3ErrorCode::Custom("InvalidPartNumber".into()),
            "The requested partnumber is not satisfiable",
        );
        e.set_status_code(http::StatusCode::RANGE_NOT_SATISFIABLE);
        return Err(e);
    };
    let start: u64 = sizes[..index].iter().sum();
    Ok((start..start + size, count))
}

fn resolve_range(range: Option<&Range>, size: u64) -> S3Result<Option<std::ops::Range<u64>>> {
    match range {
        None => Ok(None),
        Some(r) => r
            .check(size)
            .map(Some)
            .map_err(|_| s3_error!(InvalidRange, "The requested range is not satisfiable")),
    }
}

/// A `Content-Encoding` without `aws-chunked`, which only framed the upload (S3 drops it).
fn without_aws_chunked(encoding: &str) -> Option<String> {
    let rest: Vec<&str> = encoding
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("aws-chunked"))
        .collect();
    (!rest.is_empty()).then(|| rest.join(","))
}

/// The system headers to store with an object; refused above [`MAX_SYSTEM_HEADERS`] bytes.
fn system_headers(
    content_type: Option<&ContentType>,
    cache_control: Option<&CacheControl>,
    content_disposition: Option<&ContentDisposition>,
    content_encoding: Option<&ContentEncoding>,
    content_language: Option<&ContentLanguage>,
    expires: Option<&Expires>,
) -> S3Result<SystemHeaders> {
    let headers = SystemHeaders {
        content_type: content_type.map(ToString::to_string),
        cache_control: cache_control.cloned(),
        content_disposition: content_disposition.cloned(),
        content_encoding: content_encoding.and_then(|e| without_aws_chunked(e)),
        content_language: content_language.cloned(),
        expires_ms: expires.map(ms_of),
    };
    let size: usize = [
        &headers.content_type,
        &headers.cache_control,
        &headers.content_disposition,
        &headers.content_encoding,
        &headers.content_language,
    ]
    .into_iter()
    .map(|h| h.as_ref().map_or(0, String::len))
    .sum();
    if size > MAX_SYSTEM_HEADERS {
        return Err(s3_error!(
            RequestHeaderSectionTooLarge,
            "Your request header section exceeds the maximum allowed size: {size} bytes of Content-* and Cache-Control headers, at most {MAX_SYSTEM_HEADERS}."
        ));
    }
    Ok(headers)
}

#[async_trait::async_trait]
impl S3 for KarriS3 {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let caller = self.signed_caller(&req).await?;
        // As AWS: a request with any parameter is answered with each bucket's region.
        let input = &req.input;
        let region = (input.prefix.is_some()
            || input.max_buckets.is_some()
            || input.continuation_token.is_some()
            || input.bucket_region.is_some())
        .then(|| self.region.clone());
        // Every bucket is in this region: a filter for another one lists none.
        let other_region = input
            .bucket_region
            .as_deref()
            .is_some_and(|r| r != self.region);
        self.registry.catch_up().await.map_err(internal)?;
        let (records, _) = self
            .registry
            .cache
            .list("buckets", &store::kind_prefix("buckets"));
        let mut buckets: Vec<Bucket> = records
            .iter()
            .filter(|_| !other_region)
            .filter(|r| {
                r.value.pointer("/spec/ownerId").and_then(Value::as_str)
                    == Some(caller.account_id.as_str())
                    && r.value.pointer("/metadata/deletionTimestamp").is_none()
            })
            .map(|r| Bucket {
                bucket_region: region.clone(),
                creation_date: r
                    .value
                    .pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| timestamp(t.timestamp_millis())),
                name: r
                    .value
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
            .filter(|b| {
                req.input
                    .prefix
                    .as_deref()
                    .is_none_or(|p| b.name.as_deref().unwrap_or("").starts_with(p))
            })
            .collect();
        buckets.sort_by(|a, b| a.name.cmp(&b.name));
        // Pages of MaxBuckets (1 to 10,000), resumed after the last name a page showed.
        let max = match req.input.max_buckets {
            None => usize::MAX,
            Some(n @ 1..=10_000) => usize::try_from(n).unwrap_or(usize::MAX),
            Some(_) => {
                return Err(s3_error!(
                    InvalidArgument,
                    "max-buckets must be an integer between 1 and 10000"
                ))
            }
        };
        if let Some(token) = req.input.continuation_token.as_deref() {
            let after = token_decode(token)?;
            buckets.retain(|b| b.name.as_deref().is_some_and(|n| n > after.as_str()));
        }
        let continuation_token = (buckets.len() > max)
            .then(|| buckets[max - 1].name.as_deref().map(token_encode))
            .flatten();
        buckets.truncate(max);
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(Owner {
                display_name: Some(caller.account.clone()),
                id: Some(caller.account_id.clone()),
            }),
            continuation_token,
            prefix: req.input.prefix.clone(),
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let caller = self.signed_caller(&req).await?;
        let name = req.input.bucket.clone();
        if !crds::is_valid_bucket_name(&name) {
            return Err(s3_error!(
                InvalidBucketName,
                "The specified bucket is not valid."
            ));
        }
        if RESERVED_BUCKETS.contains(&name.as_str()) {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidBucketName,
                format!("The bucket name {name} is reserved by Karri."),
            ));
        }
        if let Some(loc) = req
            .input
            .create_bucket_configuration
            .as_ref()
            .and_then(|c| c.location_constraint.as_ref())
        {
            if loc.as_str() != self.region {
                return Err(S3Error::with_message(
                    S3ErrorCode::InvalidLocationConstraint,
                    format!(
                        "The specified location-constraint is not valid: this region is {}.",
                        self.region
                    ),
                ));
            }
        }
        let i = &req.input;
        let acl = requested_acl(
            i.acl.as_ref().map(|a| bucket_acl_of(Some(a))).transpose()?,
            header_grants!(i, write),
            &caller.account_id,
        )?
        .unwrap_or(CannedAcl::Private);
        let body = json!({
            "apiVersion": crds::API_VERSION,
            "kind": "Bucket",
            "metadata": {"name": name},
            "spec": {
                "owner": caller.account,
                "ownerId": caller.account_id,
                "acl": acl.as_str(),
                "region": self.region,
            },
        });
        let kind = self
            .registry
            .kinds
            .by_plural("buckets")
            .ok_or_else(|| internal("the Bucket kind is not served"))?;
        match self
            .registry
            .create(
                &kind,
                None,
                body,
                &Principal::Admin("s3".into()),
                WriteOptions::by(crate::s3::FIELD_MANAGER),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.code == 409 => {
                let existing = self.bucket(&name).await?;
                return Err(if existing.spec.owner_id == caller.account_id {
                    s3_error!(BucketAlreadyOwnedByYou, "Your previous request to create the named bucket succeeded and you already own it.")
                } else {
                    s3_error!(BucketAlreadyExists, "The requested bucket name is not available. The bucket namespace is shared by all users of the system. Please select a different name and try again.")
                });
            }
            Err(e) => return Err(internal(e)),
        }
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{name}")),
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let caller = self.caller(&req).await?;
        self.authorized_bucket(caller.as_ref(), &req.input.bucket, Action::ListBucket)
            .await?;
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(self.region.clone()),
            ..Default::default()
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        // Writes that would add an object fail from the marker on, so the bucket stays empty
        // between the check and the delete.
        let lease = self
            .index
            .mark_deleting(&bucket.name)
            .await
            .map_err(index_error)?;
        let result = self.delete_empty_bucket(&bucket).await;
        if let Err(e) = self.index.unmark_deleting(lease).await {
            tracing::warn!(error = %e, bucket = %bucket.name, "the deletion marker stays until its lease expires");
        }
        result?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint: Some(BucketLocationConstraint::from(bucket.spec.region.clone())),
        }))
    }

    async fn get_bucket_versioning(
        &self,
        req: S3Request<GetBucketVersioningInput>,
    ) -> S3Result<S3Response<GetBucketVersioningOutput>> {
        let caller = self.caller(&req).await?;
        self.authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        // Versioning has never been enabled: S3 answers with no Status.
        Ok(S3Response::new(GetBucketVersioningOutput::default()))
    }

    // ----- Bucket configurations Karri does not keep ----------------------------------------
    //
    // What S3 answers for a bucket where the configuration was never set, so that clients that
    // read every configuration of a bucket (Ansible's s3_bucket, minio-py's getters, Terraform)
    // see "none" instead of an error. Setting any of them stays NotImplemented.

    async fn get_bucket_encryption(
        &self,
        req: S3Request<GetBucketEncryptionInput>,
    ) -> S3Result<S3Response<GetBucketEncryptionOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        // Karri does not encrypt objects at rest itself: no default encryption is configured.
        let mut e = s3_error!(
            ServerSideEncryptionConfigurationNotFoundError,
            "The server side encryption configuration was not found"
        );
        // AWS answers it with 404, as every other "configuration not found" (s3s says 400).
        e.set_status_code(http::StatusCode::NOT_FOUND);
        Err(e)
    }

    async fn get_bucket_request_payment(
        &self,
        req: S3Request<GetBucketRequestPaymentInput>,
    ) -> S3Result<S3Response<GetBucketRequestPaymentOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Ok(S3Response::new(GetBucketRequestPaymentOutput {
            payer: Some(Payer::from_static(Payer::BUCKET_OWNER)),
        }))
    }

    async fn get_bucket_accelerate_configuration(
        &self,
        req: S3Request<GetBucketAccelerateConfigurationInput>,
    ) -> S3Result<S3Response<GetBucketAccelerateConfigurationOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Ok(S3Response::new(
            GetBucketAccelerateConfigurationOutput::default(),
        ))
    }

    async fn get_bucket_ownership_controls(
        &self,
        req: S3Request<GetBucketOwnershipControlsInput>,
    ) -> S3Result<S3Response<GetBucketOwnershipControlsOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            OwnershipControlsNotFoundError,
            "The bucket ownership controls were not found"
        ))
    }

    async fn get_object_lock_configuration(
        &self,
        req: S3Request<GetObjectLockConfigurationInput>,
    ) -> S3Result<S3Response<GetObjectLockConfigurationOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            ObjectLockConfigurationNotFoundError,
            "Object Lock configuration does not exist for this bucket"
        ))
    }

    async fn get_object_retention(
        &self,
        req: S3Request<GetObjectRetentionInput>,
    ) -> S3Result<S3Response<GetObjectRetentionOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            InvalidRequest,
            "Bucket is missing Object Lock Configuration"
        ))
    }

    async fn get_object_legal_hold(
        &self,
        req: S3Request<GetObjectLegalHoldInput>,
    ) -> S3Result<S3Response<GetObjectLegalHoldOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            InvalidRequest,
            "Bucket is missing Object Lock Configuration"
        ))
    }

    async fn get_bucket_lifecycle_configuration(
        &self,
        req: S3Request<GetBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<GetBucketLifecycleConfigurationOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            NoSuchLifecycleConfiguration,
            "The lifecycle configuration does not exist"
        ))
    }

    async fn get_bucket_replication(
        &self,
        req: S3Request<GetBucketReplicationInput>,
    ) -> S3Result<S3Response<GetBucketReplicationOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            ReplicationConfigurationNotFoundError,
            "The replication configuration was not found"
        ))
    }

    async fn get_bucket_notification_configuration(
        &self,
        req: S3Request<GetBucketNotificationConfigurationInput>,
    ) -> S3Result<S3Response<GetBucketNotificationConfigurationOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Ok(S3Response::new(
            GetBucketNotificationConfigurationOutput::default(),
        ))
    }

    async fn get_bucket_logging(
        &self,
        req: S3Request<GetBucketLoggingInput>,
    ) -> S3Result<S3Response<GetBucketLoggingOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Ok(S3Response::new(GetBucketLoggingOutput::default()))
    }

    async fn list_bucket_inventory_configurations(
        &self,
        req: S3Request<ListBucketInventoryConfigurationsInput>,
    ) -> S3Result<S3Response<ListBucketInventoryConfigurationsOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Ok(S3Response::new(ListBucketInventoryConfigurationsOutput {
            is_truncated: Some(false),
            ..Default::default()
        }))
    }

    async fn get_bucket_policy(
        &self,
        req: S3Request<GetBucketPolicyInput>,
    ) -> S3Result<S3Response<GetBucketPolicyOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            NoSuchBucketPolicy,
            "The bucket policy does not exist"
        ))
    }

    async fn get_bucket_policy_status(
        &self,
        req: S3Request<GetBucketPolicyStatusInput>,
    ) -> S3Result<S3Response<GetBucketPolicyStatusOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            NoSuchBucketPolicy,
            "The bucket policy does not exist"
        ))
    }

    async fn get_bucket_cors(
        &self,
        req: S3Request<GetBucketCorsInput>,
    ) -> S3Result<S3Response<GetBucketCorsOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            NoSuchCORSConfiguration,
            "The CORS configuration does not exist"
        ))
    }

    async fn get_bucket_website(
        &self,
        req: S3Request<GetBucketWebsiteInput>,
    ) -> S3Result<S3Response<GetBucketWebsiteOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        Err(s3_error!(
            NoSuchWebsiteConfiguration,
            "The specified bucket does not have a website configuration"
        ))
    }

    async fn get_public_access_block(
        &self,
        req: S3Request<GetPublicAccessBlockInput>,
    ) -> S3Result<S3Response<GetPublicAccessBlockOutput>> {
        self.bucket_config_read(&req, &req.input.bucket).await?;
        let mut e = s3s::S3Error::with_message(
            s3s::S3ErrorCode::Custom("NoSuchPublicAccessBlockConfiguration".into()),
            "The public access block configuration was not found",
        );
        e.set_status_code(http::StatusCode::NOT_FOUND);
        Err(e)
    }

    async fn get_bucket_acl(
        &self,
        req: S3Request<GetBucketAclInput>,
    ) -> S3Result<S3Response<GetBucketAclOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        let owner = owner_of(&bucket.spec);
        Ok(S3Response::new(GetBucketAclOutput {
            grants: Some(grants_of(&owner, bucket.spec.acl)),
            owner: Some(owner),
        }))
    }

    async fn put_bucket_acl(
        &self,
        req: S3Request<PutBucketAclInput>,
    ) -> S3Result<S3Response<PutBucketAclOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        let i = &req.input;
        let acl = acl_to_set(
            i.acl.as_ref().map(|a| bucket_acl_of(Some(a))).transpose()?,
            header_grants!(i, write),
            i.access_control_policy.as_ref(),
            &bucket.spec.owner_id,
        )?;
        self.update_bucket(&bucket, move |spec| spec["acl"] = json!(acl.as_str()))
            .await?;
        Ok(S3Response::new(PutBucketAclOutput::default()))
    }

    async fn get_bucket_tagging(
        &self,
        req: S3Request<GetBucketTaggingInput>,
    ) -> S3Result<S3Response<GetBucketTaggingOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        if bucket.spec.tags.is_empty() {
            return Err(s3_error!(NoSuchTagSet, "The TagSet does not exist"));
        }
        let tags: Vec<(String, String)> = bucket
            .spec
            .tags
            .iter()
            .map(|t| (t.key.clone(), t.value.clone()))
            .collect();
        Ok(S3Response::new(GetBucketTaggingOutput {
            tag_set: tags_to_dto(&tags),
        }))
    }

    async fn put_bucket_tagging(
        &self,
        req: S3Request<PutBucketTaggingInput>,
    ) -> S3Result<S3Response<PutBucketTaggingOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        let tags = tags_from_dto(&req.input.tagging, MAX_BUCKET_TAGS)?;
        let tags: Vec<Value> = tags
            .into_iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        self.update_bucket(&bucket, move |spec| spec["tags"] = json!(tags))
            .await?;
        Ok(S3Response::new(PutBucketTaggingOutput::default()))
    }

    async fn delete_bucket_tagging(
        &self,
        req: S3Request<DeleteBucketTaggingInput>,
    ) -> S3Result<S3Response<DeleteBucketTaggingOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::BucketConfig)
            .await?;
        self.update_bucket(&bucket, |spec| spec["tags"] = json!([]))
            .await?;
        Ok(S3Response::new(DeleteBucketTaggingOutput::default()))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let caller = self.caller(&req).await?;
        let decoded_length = decoded_content_length(&req.headers)?;
        let mut req = req;
        let taken = req.input.body.take();
        let body = UploadBody::of(&req, taken)?;
        let presigned = presigned_headers(&req);
        let mut input = req.input;
        with_presigned_headers(&mut input, &presigned);
        stored_class(input.storage_class.as_ref())?;
        encryption_refusal(
            input.server_side_encryption.as_ref(),
            input.sse_customer_algorithm.as_deref(),
        )?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        let acl = new_object_acl(
            input.acl.as_ref(),
            header_grants!(input),
            &bucket.spec.owner_id,
        )?;
        let tags = tags_from_header(input.tagging.as_deref())?;
        let headers = system_headers(
            input.content_type.as_ref(),
            input.cache_control.as_ref(),
            input.content_disposition.as_ref(),
            input.content_encoding.as_ref(),
            input.content_language.as_ref(),
            input.expires.as_ref(),
        )?;
        let metadata = metadata_of(input.metadata.as_ref())?;
        announced_fits(decoded_length, input.content_length)?;
        // The conditions are checked now, to refuse before the body is received, and held in
        // the publishing transaction: the entry must still be the one they were checked on.
        let expect = self
            .write_conditions(
                &bucket,
                &input.key,
                input.if_match.as_ref(),
                input.if_none_match.as_ref(),
            )
            .await?;
        let (written, sum) = self
            .receive(body, input.content_md5.as_deref(), decoded_length)
            .await?;
        let etag = hex::encode(written.md5);
        let meta = ObjectMeta {
            segments: vec![Segment {
                blob: written.id.clone(),
                size: written.size,
            }],
            size: written.size,
            etag: etag.clone(),
            last_modified_ms: now_ms(),
            headers,
            metadata,
            acl,
            tags,
            parts_count: None,
            upload_id: None,
            checksum: sum
                .clone()
                .map(|(algorithm, value)| Checksum { algorithm, value }),
        };
        self.publish_expecting(&bucket, &input.key, &meta, expect)
            .await?;
        let (crc32, crc32c, crc64nvme, sha1, sha256) = checksum_fields(sum);
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(quoted(&etag)),
            size: i64::try_from(written.size).ok(),
            checksum_crc32: crc32,
            checksum_crc32c: crc32c,
            checksum_crc64nvme: crc64nvme,
            checksum_sha1: sha1,
            checksum_sha256: sha256,
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let caller = self.caller(&req).await?;
        let pin = node_pin(&req.uri);
        let input = req.input;
        only_null_version(input.version_id.as_deref())?;
        // Refused once the object is known to exist: a missing key is NoSuchKey, as on S3.
        let customer_algorithm = input.sse_customer_algorithm.clone();
        // Anyone may read a public object, but not have it served as something else (say
        // text/html on the S3 origin): AWS refuses response-* overrides without a signature.
        let overrides = [
            input.response_cache_control.is_some(),
            input.response_content_disposition.is_some(),
            input.response_content_encoding.is_some(),
            input.response_content_language.is_some(),
            input.response_content_type.is_some(),
            input.response_expires.is_some(),
        ];
        if caller.is_none() && overrides.contains(&true) {
            return Err(s3_error!(
                InvalidRequest,
                "Request specific response headers cannot be used for anonymous GET requests."
            ));
        }
        let bucket = self.bucket(&input.bucket).await?;
        let pre = Preconditions {
            if_match: input.if_match.clone(),
            if_none_match: input.if_none_match.clone(),
            if_modified_since_ms: input.if_modified_since.as_ref().map(ms_of),
            if_unmodified_since_ms: input.if_unmodified_since.as_ref().map(ms_of),
        };
        let mut attempt = 0;
        let (found, stream) = loop {
            attempt += 1;
            let found = self
                .readable(
                    (caller.as_ref(), pin.as_deref()),
                    &bucket,
                    &input.key,
                    &pre,
                    input.range.as_ref(),
                    input.part_number,
                )
                .await?;
            no_customer_key(customer_algorithm.as_deref())?;
            match open_segments(&self.blobs, &found.meta.segments, found.span.clone()).await {
                Ok(stream) => break (found, stream),
                // Overwritten between the index read and the open: read the index again.
                Err(BlobError::Missing(_)) if attempt < READ_ATTEMPTS => continue,
                Err(e) => return Err(blob_error(e)),
            }
        };
        let Readable {
            meta,
            span,
            content_range,
            parts_count,
        } = found;
        let len = span.end - span.start;
        let body = StreamingBlob::wrap(sync_wrapper::SyncStream::new(stream));
        let h = &meta.headers;
        let whole = input.range.is_none() && input.part_number.is_none();
        let ((crc32, crc32c, crc64nvme, sha1, sha256), checksum_type) =
            read_checksum(&meta, input.checksum_mode.as_ref(), whole);
        Ok(S3Response::new(GetObjectOutput {
            accept_ranges: Some("bytes".into()),
            body: Some(body),
            checksum_type,
            checksum_crc32: crc32,
            checksum_crc32c: crc32c,
            checksum_crc64nvme: crc64nvme,
            checksum_sha1: sha1,
            checksum_sha256: sha256,
            cache_control: input
                .response_cache_control
                .or_else(|| h.cache_control.clone()),
            content_disposition: input
                .response_content_disposition
                .or_else(|| h.content_disposition.clone()),
            content_encoding: input
                .response_content_encoding
                .or_else(|| h.content_encoding.clone()),
            content_language: input
                .response_content_language
                .or_else(|| h.content_language.clone()),
            content_length: i64::try_from(len).ok(),
            content_range,
            content_type: input
                .response_content_type
                .or_else(|| shown_content_type(h)),
            e_tag: Some(quoted(&meta.etag)),
            expires: input
                .response_expires
                .or_else(|| h.expires_ms.map(timestamp)),
            last_modified: Some(timestamp(meta.last_modified_ms)),
            metadata: metadata_to_dto(&meta.metadata),
            parts_count,
            tag_count: (!meta.tags.is_empty()).then(|| i32::try_from(meta.tags.len()).unwrap_or(0)),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let caller = self.caller(&req).await?;
        let pin = node_pin(&req.uri);
        let input = req.input;
        only_null_version(input.version_id.as_deref())?;
        // Refused once the object is known to exist: a missing key is NoSuchKey, as on S3.
        let customer_algorithm = input.sse_customer_algorithm.clone();
        let bucket = self.bucket(&input.bucket).await?;
        let pre = Preconditions {
            if_match: input.if_match.clone(),
            if_none_match: input.if_none_match.clone(),
            if_modified_since_ms: input.if_modified_since.as_ref().map(ms_of),
            if_unmodified_since_ms: input.if_unmodified_since.as_ref().map(ms_of),
        };
        let Readable {
            meta,
            span,
            content_range,
            parts_count,
        } = self
            .readable(
                (caller.as_ref(), pin.as_deref()),
                &bucket,
                &input.key,
                &pre,
                input.range.as_ref(),
                input.part_number,
            )
            .await?;
        no_customer_key(customer_algorithm.as_deref())?;
        let len = span.end - span.start;
        let h = &meta.headers;
        let whole = input.range.is_none() && input.part_number.is_none();
        let ((crc32, crc32c, crc64nvme, sha1, sha256), checksum_type) =
            read_checksum(&meta, input.checksum_mode.as_ref(), whole);
        Ok(S3Response::new(HeadObjectOutput {
            accept_ranges: Some("bytes".into()),
            checksum_type,
            checksum_crc32: crc32,
            checksum_crc32c: crc32c,
            checksum_crc64nvme: crc64nvme,
            checksum_sha1: sha1,
            checksum_sha256: sha256,
            cache_control: h.cache_control.clone(),
            content_disposition: h.content_disposition.clone(),
            content_encoding: h.content_encoding.clone(),
            content_language: h.content_language.clone(),
            content_length: i64::try_from(len).ok(),
            content_range,
            content_type: shown_content_type(h),
            e_tag: Some(quoted(&meta.etag)),
            expires: h.expires_ms.map(timestamp),
            last_modified: Some(timestamp(meta.last_modified_ms)),
            metadata: metadata_to_dto(&meta.metadata),
            parts_count,
            ..Default::default()
        }))
    }

    async fn get_object_attributes(
        &self,
        req: S3Request<GetObjectAttributesInput>,
    ) -> S3Result<S3Response<GetObjectAttributesOutput>> {
        let caller = self.caller(&req).await?;
        let pin = node_pin(&req.uri);
        let input = req.input;
        only_null_version(input.version_id.as_deref())?;
        // Refused once the object is known to exist: a missing key is NoSuchKey, as on S3.
        let customer_algorithm = input.sse_customer_algorithm.clone();
        let bucket = self.bucket(&input.bucket).await?;
        let Readable { meta, .. } = self
            .readable(
                (caller.as_ref(), pin.as_deref()),
                &bucket,
                &input.key,
                &Preconditions::default(),
                None,
                None,
            )
            .await?;
        no_customer_key(customer_algorithm.as_deref())?;
        // One `x-amz-object-attributes` header lists them all, comma-separated.
        let asked = |a: &str| {
            input
                .object_attributes
                .iter()
                .flat_map(|x| x.as_str().split(','))
                .any(|x| x.trim() == a)
        };
        let checksum = meta
            .checksum
            .as_ref()
            .filter(|_| asked(ObjectAttributes::CHECKSUM))
            .map(|c| {
                let (crc32, crc32c, crc64nvme, sha1, sha256) =
                    checksum_fields(Some((c.algorithm, c.value.clone())));
                s3s::dto::Checksum {
                    checksum_crc32: crc32,
                    checksum_crc32c: crc32c,
                    checksum_crc64nvme: crc64nvme,
                    checksum_sha1: sha1,
                    checksum_sha256: sha256,
                    checksum_type: Some(ChecksumType::from_static(ChecksumType::FULL_OBJECT)),
                }
            });
        // Karri keeps a multipart object's part count, not each part's size or checksum.
        let object_parts = meta
            .parts_count
            .and_then(|n| i32::try_from(n).ok())
            .filter(|_| asked(ObjectAttributes::OBJECT_PARTS))
            .map(|n| GetObjectAttributesParts {
                total_parts_count: Some(n),
                is_truncated: Some(false),
                ..Default::default()
            });
        Ok(S3Response::new(GetObjectAttributesOutput {
            checksum,
            e_tag: asked(ObjectAttributes::ETAG).then(|| quoted(&meta.etag)),
            last_modified: Some(timestamp(meta.last_modified_ms)),
            object_parts,
            object_size: asked(ObjectAttributes::OBJECT_SIZE)
                .then(|| i64::try_from(meta.size).ok())
                .flatten(),
            storage_class: asked(ObjectAttributes::STORAGE_CLASS)
                .then(|| StorageClass::from_static(StorageClass::STANDARD)),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let caller = self.caller(&req).await?;
        only_null_version(req.input.version_id.as_deref())?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::WriteObject)
            .await?;
        let expect = self
            .write_conditions(&bucket, &req.input.key, req.input.if_match.as_ref(), None)
            .await
            .map_err(|e| {
                hide_missing_key(
                    e,
                    permits(caller.as_ref(), Action::ListBucket, &bucket, None),
                )
            })?;
        if let Some(prev) = self
            .index
            .delete_object_expecting(bucket.seen(), &bucket.name, &req.input.key, expect)
            .await
            .map_err(index_error)?
        {
            self.delete_blobs(prev.blobs()).await;
        }
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let caller = self.caller(&req).await?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::WriteObject)
            .await?;
        if req.input.delete.objects.len() > 1000 {
            return Err(s3_error!(
                MalformedXML,
                "A DeleteObjects request may name at most 1000 keys."
            ));
        }
        let quiet = req.input.delete.quiet.unwrap_or(false);
        let may_list = permits(caller.as_ref(), Action::ListBucket, &bucket, None);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for obj in &req.input.delete.objects {
            if let Err(e) = only_null_version(obj.version_id.as_deref()) {
                errors.push(Error {
                    code: Some(e.code().as_str().to_string()),
                    key: Some(obj.key.clone()),
                    message: e.message().map(str::to_string),
                    version_id: obj.version_id.clone(),
                });
                continue;
            }
            // A key's `<ETag>` deletes it only if it still has that ETag, as `If-Match` does.
            let if_match = obj.e_tag.clone().map(ETagCondition::ETag);
            let expect = match self
                .write_conditions(&bucket, &obj.key, if_match.as_ref(), None)
                .await
                .map_err(|e| hide_missing_key(e, may_list))
            {
                Ok(expect) => expect,
                Err(e) if e.code() == &S3ErrorCode::ServiceUnavailable => return Err(e),
                Err(e) => {
                    errors.push(Error {
                        code: Some(e.code().as_str().to_string()),
                        key: Some(obj.key.clone()),
                        message: e.message().map(str::to_string),
                        version_id: None,
                    });
                    continue;
                }
            };
            match self
                .index
                .delete_object_expecting(bucket.seen(), &bucket.name, &obj.key, expect)
                .await
            {
                Ok(prev) => {
                    if let Some(prev) = prev {
                        self.delete_blobs(prev.blobs()).await;
                    }
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(obj.key.clone()),
                            ..Default::default()
                        });
                    }
                }
                // The bucket authorized is not the one there now: the whole request is answered
                // 503, and the SDK's retry is authorized against the new record.
                Err(e @ IndexError::BucketReplaced) => return Err(index_error(e)),
                Err(e) => {
                    let e = index_error(e);
                    errors.push(Error {
                        code: Some(e.code().as_str().to_string()),
                        key: Some(obj.key.clone()),
                        message: e.message().map(str::to_string),
                        version_id: None,
                    });
                }
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let caller = self.caller(&req).await?;
        presigned_encryption_refusal(&presigned_headers(&req))?;
        let input = req.input;
        stored_class(input.storage_class.as_ref())?;
        encryption_refusal(
            input.server_side_encryption.as_ref(),
            input
                .sse_customer_algorithm
                .as_deref()
                .or(input.copy_source_sse_customer_algorithm.as_deref()),
        )?;
        // Conditions on the object the copy replaces (`If-None-Match: *` to create only), which
        // s3s does not parse for CopyObject; held in the publishing transaction, as a PUT's.
        let [if_match, if_none_match] =
            [http::header::IF_MATCH, http::header::IF_NONE_MATCH].map(|name| {
                req.headers
                    .get(&name)
                    .map(|v| {
                        ETagCondition::parse_http_header(v.as_bytes()).map_err(|_| {
                            s3_error!(
                                InvalidArgument,
                                "The {name} header is not a valid ETag condition."
                            )
                        })
                    })
                    .transpose()
            });
        let (if_match, if_none_match) = (if_match?, if_none_match?);
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        let source = self
            .copy_source(caller.as_ref(), &input.copy_source)
            .await?;
        copy_source_holds(copy_source_conditions!(input), &source)?;
        for (header, value) in [
            (
                "x-amz-metadata-directive",
                input
                    .metadata_directive
                    .as_ref()
                    .map(MetadataDirective::as_str),
            ),
            (
                "x-amz-tagging-directive",
                input
                    .tagging_directive
                    .as_ref()
                    .map(TaggingDirective::as_str),
            ),
        ] {
            if let Some(v) = value.filter(|v| !matches!(*v, "COPY" | "REPLACE")) {
                return Err(s3_error!(
                    InvalidArgument,
                    "Unknown {header} value {v:?}: it is COPY or REPLACE."
                ));
            }
        }
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let asked_sum = match input.checksum_algorithm.as_ref() {
            None => None,
            Some(a) => Some(checksum::Algorithm::named(a.as_str()).ok_or_else(|| {
                s3_error!(
                    InvalidRequest,
                    "Value for x-amz-checksum-algorithm header is invalid."
                )
            })?),
        };
        let same = matches!(&input.copy_source, CopySource::Bucket { bucket: b, key: k, .. } if **b == *input.bucket && **k == *input.key);
        // A copy onto itself that asks for a checksum adds one, as S3 documents.
        if same && !replace && asked_sum.is_none() {
            return Err(s3_error!(InvalidRequest, "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes."));
        }
        let (headers, metadata) = if replace {
            (
                system_headers(
                    input.content_type.as_ref(),
                    input.cache_control.as_ref(),
                    input.content_disposition.as_ref(),
                    input.content_encoding.as_ref(),
                    input.content_language.as_ref(),
                    input.expires.as_ref(),
                )?,
                metadata_of(input.metadata.as_ref())?,
            )
        } else {
            (source.headers.clone(), source.metadata.clone())
        };
        let tags = match input
            .tagging_directive
            .as_ref()
            .map(TaggingDirective::as_str)
        {
            Some(TaggingDirective::REPLACE) => tags_from_header(input.tagging.as_deref())?,
            _ => source.tags.clone(),
        };
        // Everything refusable is refused before a byte is copied.
        let acl = new_object_acl(
            input.acl.as_ref(),
            header_grants!(input),
            &bucket.spec.owner_id,
        )?;
        let expect = self
            .write_conditions(
                &bucket,
                &input.key,
                if_match.as_ref(),
                if_none_match.as_ref(),
            )
            .await?;
        let (written, sum) = self
            .copy_bytes_hashing(&source, 0..source.size, asked_sum)
            .await?;
        let meta = ObjectMeta {
            segments: vec![Segment {
                blob: written.id.clone(),
                size: written.size,
            }],
            size: written.size,
            // A copy keeps the source's ETag (a multipart source's too), as in AWS.
            etag: source.etag.clone(),
            last_modified_ms: now_ms(),
            headers,
            metadata,
            acl,
            tags,
            // One blob: the source's part boundaries are not kept, so its parts are not served.
            parts_count: None,
            upload_id: None,
            // The one asked for, else the source's: the same bytes.
            checksum: sum.or_else(|| source.checksum.clone()),
        };
        self.publish_expecting(&bucket, &input.key, &meta, expect)
            .await?;
        let (crc32, crc32c, crc64nvme, sha1, sha256) = checksum_fields(
            meta.checksum
                .as_ref()
                .map(|c| (c.algorithm, c.value.clone())),
        );
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(quoted(&meta.etag)),
                last_modified: Some(timestamp(meta.last_modified_ms)),
                checksum_crc32: crc32,
                checksum_crc32c: crc32c,
                checksum_crc64nvme: crc64nvme,
                checksum_sha1: sha1,
                checksum_sha256: sha256,
                checksum_type: meta
                    .checksum
                    .as_ref()
                    .map(|_| ChecksumType::from_static(ChecksumType::FULL_OBJECT)),
            }),
            ..Default::default()
        }))
    }

    async fn get_object_acl(
        &self,
        req: S3Request<GetObjectAclInput>,
    ) -> S3Result<S3Response<GetObjectAclOutput>> {
        let caller = self.caller(&req).await?;
        only_null_version(req.input.version_id.as_deref())?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::ObjectConfig)
            .await?;
        let meta = self.object(&bucket, &req.input.key).await?;
        let owner = owner_of(&bucket.spec);
        Ok(S3Response::new(GetObjectAclOutput {
            grants: Some(grants_of(&owner, meta.acl)),
            owner: Some(owner),
            ..Default::default()
        }))
    }

    async fn put_object_acl(
        &self,
        req: S3Request<PutObjectAclInput>,
    ) -> S3Result<S3Response<PutObjectAclOutput>> {
        let caller = self.caller(&req).await?;
        only_null_version(req.input.version_id.as_deref())?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::ObjectConfig)
            .await?;
        let i = &req.input;
        let acl = acl_to_set(
            i.acl.as_ref().map(|a| object_acl_of(Some(a))).transpose()?,
            header_grants!(i, write),
            i.access_control_policy.as_ref(),
            &bucket.spec.owner_id,
        )?;
        self.update_object(&bucket, &req.input.key, |m| m.acl = acl)
            .await?;
        Ok(S3Response::new(PutObjectAclOutput::default()))
    }

    async fn get_object_tagging(
        &self,
        req: S3Request<GetObjectTaggingInput>,
    ) -> S3Result<S3Response<GetObjectTaggingOutput>> {
        let caller = self.caller(&req).await?;
        only_null_version(req.input.version_id.as_deref())?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::ObjectConfig)
            .await?;
        let meta = self.object(&bucket, &req.input.key).await?;
        Ok(S3Response::new(GetObjectTaggingOutput {
            tag_set: tags_to_dto(&meta.tags),
            version_id: None,
        }))
    }

    async fn put_object_tagging(
        &self,
        req: S3Request<PutObjectTaggingInput>,
    ) -> S3Result<S3Response<PutObjectTaggingOutput>> {
        let caller = self.caller(&req).await?;
        only_null_version(req.input.version_id.as_deref())?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::ObjectConfig)
            .await?;
        let tags = tags_from_dto(&req.input.tagging, MAX_OBJECT_TAGS)?;
        self.update_object(&bucket, &req.input.key, move |m| m.tags = tags.clone())
            .await?;
        Ok(S3Response::new(PutObjectTaggingOutput::default()))
    }

    async fn delete_object_tagging(
        &self,
        req: S3Request<DeleteObjectTaggingInput>,
    ) -> S3Result<S3Response<DeleteObjectTaggingOutput>> {
        let caller = self.caller(&req).await?;
        only_null_version(req.input.version_id.as_deref())?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &req.input.bucket, Action::ObjectConfig)
            .await?;
        self.update_object(&bucket, &req.input.key, |m| m.tags.clear())
            .await?;
        Ok(S3Response::new(DeleteObjectTaggingOutput::default()))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let caller = self.caller(&req).await?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::ListBucket)
            .await?;
        let max_keys = max_keys_of(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let page = self
            .list(
                &bucket,
                &prefix,
                input.delimiter.as_deref(),
                input.marker.as_deref().filter(|m| !m.is_empty()),
                max_keys,
            )
            .await?;
        let enc = encode_with(input.encoding_type.as_ref())?;
        let owner = owner_of(&bucket.spec);
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(bucket.name.clone()),
            prefix: Some(enc(&prefix)),
            marker: Some(input.marker.as_deref().map(&enc).unwrap_or_default()),
            max_keys: i32::try_from(max_keys).ok(),
            is_truncated: Some(page.truncated),
            next_marker: if page.truncated && input.delimiter.is_some() {
                page.last.as_deref().map(&enc)
            } else {
                None
            },
            contents: Some(
                page.contents
                    .iter()
                    .map(|(k, m)| object_entry(&enc(k), m, Some(&owner)))
                    .collect(),
            ),
            common_prefixes: Some(
                page.common_prefixes
                    .iter()
                    .map(|p| CommonPrefix {
                        prefix: Some(enc(p)),
                    })
                    .collect(),
            ),
            delimiter: input.delimiter.as_deref().map(&enc),
            encoding_type: input.encoding_type.clone(),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let caller = self.caller(&req).await?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::ListBucket)
            .await?;
        let max_keys = max_keys_of(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let after = match input.continuation_token.as_deref() {
            Some(t) => Some(token_decode(t)?),
            None => input.start_after.clone().filter(|s| !s.is_empty()),
        };
        let page = self
            .list(
                &bucket,
                &prefix,
                input.delimiter.as_deref(),
                after.as_deref(),
                max_keys,
            )
            .await?;
        let enc = encode_with(input.encoding_type.as_ref())?;
        let owner = owner_of(&bucket.spec);
        let fetch_owner = input.fetch_owner.unwrap_or(false);
        let count = page.contents.len() + page.common_prefixes.len();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(bucket.name.clone()),
            prefix: Some(enc(&prefix)),
            max_keys: i32::try_from(max_keys).ok(),
            key_count: i32::try_from(count).ok(),
            continuation_token: input.continuation_token.clone(),
            is_truncated: Some(page.truncated),
            next_continuation_token: if page.truncated {
                page.last.as_deref().map(token_encode)
            } else {
                None
            },
            contents: Some(
                page.contents
                    .iter()
                    .map(|(k, m)| object_entry(&enc(k), m, fetch_owner.then_some(&owner)))
                    .collect(),
            ),
            common_prefixes: Some(
                page.common_prefixes
                    .iter()
                    .map(|p| CommonPrefix {
                        prefix: Some(enc(p)),
                    })
                    .collect(),
            ),
            delimiter: input.delimiter.as_deref().map(&enc),
            encoding_type: input.encoding_type.clone(),
            start_after: input.start_after.as_deref().map(&enc),
            ..Default::default()
        }))
    }

    async fn list_object_versions(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        let caller = self.caller(&req).await?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::ListBucket)
            .await?;
        let max_keys = max_keys_of(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let page = self
            .list(
                &bucket,
                &prefix,
                input.delimiter.as_deref(),
                input.key_marker.as_deref().filter(|m| !m.is_empty()),
                max_keys,
            )
            .await?;
        let enc = encode_with(input.encoding_type.as_ref())?;
        let owner = owner_of(&bucket.spec);
        // Versioning is never enabled: every object is its one current version, ID "null".
        let versions = page
            .contents
            .iter()
            .map(|(k, m)| ObjectVersion {
                e_tag: Some(quoted(&m.etag)),
                is_latest: Some(true),
                key: Some(enc(k)),
                last_modified: Some(timestamp(m.last_modified_ms)),
                owner: Some(owner.clone()),
                size: i64::try_from(m.size).ok(),
                storage_class: Some(ObjectVersionStorageClass::from_static(
                    ObjectVersionStorageClass::STANDARD,
                )),
                version_id: Some("null".into()),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListObjectVersionsOutput {
            common_prefixes: Some(
                page.common_prefixes
                    .iter()
                    .map(|p| CommonPrefix {
                        prefix: Some(enc(p)),
                    })
                    .collect(),
            ),
            delimiter: input.delimiter.as_deref().map(&enc),
            encoding_type: input.encoding_type.clone(),
            is_truncated: Some(page.truncated),
            key_marker: Some(input.key_marker.as_deref().map(&enc).unwrap_or_default()),
            max_keys: i32::try_from(max_keys).ok(),
            name: Some(bucket.name.clone()),
            next_key_marker: if page.truncated {
                page.last.as_deref().map(&enc)
            } else {
                None
            },
            next_version_id_marker: page.truncated.then(|| "null".to_string()),
            prefix: Some(enc(&prefix)),
            version_id_marker: input.version_id_marker.clone(),
            versions: Some(versions),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let caller = self.caller(&req).await?;
        let initiator = caller
            .as_ref()
            .map(|c| c.account_id.clone())
            .unwrap_or_else(|| "anonymous".into());
        presigned_encryption_refusal(&presigned_headers(&req))?;
        let input = req.input;
        stored_class(input.storage_class.as_ref())?;
        encryption_refusal(
            input.server_side_encryption.as_ref(),
            input.sse_customer_algorithm.as_deref(),
        )?;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        let upload_id = crate::admission::new_uuid().simple().to_string();
        let meta = UploadMeta {
            key: input.key.clone(),
            initiated_ms: now_ms(),
            initiator,
            headers: system_headers(
                input.content_type.as_ref(),
                input.cache_control.as_ref(),
                input.content_disposition.as_ref(),
                input.content_encoding.as_ref(),
                input.content_language.as_ref(),
                input.expires.as_ref(),
            )?,
            metadata: metadata_of(input.metadata.as_ref())?,
            acl: new_object_acl(
                input.acl.as_ref(),
                header_grants!(input),
                &bucket.spec.owner_id,
            )?,
            tags: tags_from_header(input.tagging.as_deref())?,
        };
        self.index
            .create_upload(bucket.seen(), &bucket.name, &upload_id, &meta)
            .await
            .map_err(index_error)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(bucket.name.clone()),
            key: Some(input.key.clone()),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let caller = self.caller(&req).await?;
        let decoded_length = decoded_content_length(&req.headers)?;
        let mut req = req;
        let taken = req.input.body.take();
        let body = UploadBody::of(&req, taken)?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        let part = part_number(input.part_number)?;
        announced_fits(decoded_length, input.content_length)?;
        self.upload_of(&bucket, &input.upload_id, &input.key)
            .await?;
        let (written, sum) = self
            .receive(body, input.content_md5.as_deref(), decoded_length)
            .await?;
        let etag = hex::encode(written.md5);
        self.record_part(&bucket.name, &input.upload_id, part, &written, &etag)
            .await?;
        let (crc32, crc32c, crc64nvme, sha1, sha256) = checksum_fields(sum);
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(quoted(&etag)),
            checksum_crc32: crc32,
            checksum_crc32c: crc32c,
            checksum_crc64nvme: crc64nvme,
            checksum_sha1: sha1,
            checksum_sha256: sha256,
            ..Default::default()
        }))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let caller = self.caller(&req).await?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        let part = part_number(input.part_number)?;
        self.upload_of(&bucket, &input.upload_id, &input.key)
            .await?;
        let source = self
            .copy_source(caller.as_ref(), &input.copy_source)
            .await?;
        copy_source_holds(copy_source_conditions!(input), &source)?;
        let range = match input.copy_source_range.as_deref() {
            None => 0..source.size,
            Some(r) => copy_source_range(r, source.size).map_err(|e| match e {
                CopyRange::Malformed => s3_error!(
                    InvalidArgument,
                    "The x-amz-copy-source-range value must be of the form bytes=first-last where first and last are the zero-based offsets of the first and last bytes to copy"
                ),
                CopyRange::PastTheEnd => s3_error!(
                    InvalidArgument,
                    "Range specified is not valid for source object of size: {}",
                    source.size
                ),
            })?,
        };
        let written = self.copy_bytes(&source, range).await?;
        let etag = hex::encode(written.md5);
        self.record_part(&bucket.name, &input.upload_id, part, &written, &etag)
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(quoted(&etag)),
                last_modified: Some(timestamp(now_ms())),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let caller = self.caller(&req).await?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        let upload = self
            .upload_of(&bucket, &input.upload_id, &input.key)
            .await?;
        let parts = self
            .index
            .list_parts(&input.upload_id)
            .await
            .map_err(index_error)?;
        let marker = input.part_number_marker.unwrap_or(0);
        let max = input.max_parts.unwrap_or(1000).clamp(0, 1000);
        let after: Vec<(u32, PartMeta)> = parts
            .into_iter()
            .filter(|(n, _)| i64::from(*n) > i64::from(marker))
            .collect();
        let truncated = after.len() > usize::try_from(max).unwrap_or(0);
        let shown: Vec<&(u32, PartMeta)> = after
            .iter()
            .take(usize::try_from(max).unwrap_or(0))
            .collect();
        let owner = owner_of(&bucket.spec);
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(bucket.name.clone()),
            initiator: Some(Initiator {
                display_name: None,
                id: Some(upload.initiator.clone()),
            }),
            is_truncated: Some(truncated),
            key: Some(input.key.clone()),
            max_parts: Some(max),
            next_part_number_marker: shown.last().and_then(|(n, _)| i32::try_from(*n).ok()),
            owner: Some(owner),
            part_number_marker: input.part_number_marker,
            parts: Some(
                shown
                    .iter()
                    .map(|(n, p)| Part {
                        e_tag: Some(quoted(&p.etag)),
                        last_modified: Some(timestamp(p.last_modified_ms)),
                        part_number: i32::try_from(*n).ok(),
                        size: i64::try_from(p.size).ok(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
            upload_id: Some(input.upload_id.clone()),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let caller = self.caller(&req).await?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::ListBucket)
            .await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let mut uploads: Vec<(String, UploadMeta)> = self
            .index
            .list_uploads(bucket.seen(), &bucket.name)
            .await
            .map_err(index_error)?
            .into_iter()
            .filter(|(_, u)| u.key.starts_with(&prefix))
            .collect();
        uploads.sort_by(|a, b| {
            (&a.1.key, a.1.initiated_ms, &a.0).cmp(&(&b.1.key, b.1.initiated_ms, &b.0))
        });
        let key_marker = input.key_marker.clone().unwrap_or_default();
        let id_marker = input.upload_id_marker.clone().unwrap_or_default();
        let max = usize::try_from(input.max_uploads.unwrap_or(1000).clamp(0, 1000)).unwrap_or(1000);
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let page = uploads_page(
            &uploads,
            &UploadsQuery {
                prefix: &prefix,
                key_marker: &key_marker,
                id_marker: &id_marker,
                delimiter: delimiter.as_deref(),
                max,
            },
        );
        let (shown, prefixes, truncated) = (page.uploads, page.prefixes, page.truncated);
        let enc = encode_with(input.encoding_type.as_ref())?;
        let owner = owner_of(&bucket.spec);
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(bucket.name.clone()),
            common_prefixes: Some(
                prefixes
                    .iter()
                    .map(|p| CommonPrefix {
                        prefix: Some(enc(p)),
                    })
                    .collect(),
            ),
            delimiter: input.delimiter.as_deref().map(&enc),
            encoding_type: input.encoding_type.clone(),
            is_truncated: Some(truncated),
            key_marker: Some(enc(&key_marker)),
            max_uploads: i32::try_from(max).ok(),
            next_key_marker: page.next_key_marker.as_deref().map(&enc),
            next_upload_id_marker: page.next_upload_id_marker.clone(),
            prefix: Some(enc(&prefix)),
            upload_id_marker: Some(id_marker.clone()),
            uploads: Some(
                shown
                    .iter()
                    .map(|(id, u)| MultipartUpload {
                        initiated: Some(timestamp(u.initiated_ms)),
                        initiator: Some(Initiator {
                            display_name: None,
                            id: Some(u.initiator.clone()),
                        }),
                        key: Some(enc(&u.key)),
                        owner: Some(owner.clone()),
                        storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
                        upload_id: Some(id.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            request_charged: None,
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let caller = self.caller(&req).await?;
        let host = request_host(&req.headers, &req.uri);
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        let upload = match self.upload_of(&bucket, &input.upload_id, &input.key).await {
            Ok(upload) => upload,
            Err(no_upload) => {
                return match self
                    .completed_already(&bucket, &input.key, &input.upload_id, host.as_deref())
                    .await?
                {
                    Some(done) => Ok(S3Response::new(done)),
                    None => Err(no_upload),
                };
            }
        };
        // Conditions on the object the completion replaces (`If-None-Match: *` to create only),
        // held in the completing transaction like a PUT's.
        let expect = self
            .write_conditions(
                &bucket,
                &input.key,
                input.if_match.as_ref(),
                input.if_none_match.as_ref(),
            )
            .await?;
        let requested: Vec<CompletedPart> = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        // Retried when a part is uploaded again while completing: the parts are read anew
        // and checked against the ETags asked for.
        let mut attempt = 0;
        let (stored, meta, etag, prev) = loop {
            attempt += 1;
            let (stored, read_at) = self
                .index
                .list_parts_versioned(&input.upload_id)
                .await
                .map_err(index_error)?;
            let chosen = choose_parts(&requested, &stored)?;
            let etags: Vec<&str> = chosen.iter().map(|p| p.etag.as_str()).collect();
            let etag = multipart_etag(&etags);
            let meta = ObjectMeta {
                segments: chosen
                    .iter()
                    .map(|p| Segment {
                        blob: p.blob.clone(),
                        size: p.size,
                    })
                    .collect(),
                size: chosen.iter().map(|p| p.size).sum(),
                etag: etag.clone(),
                last_modified_ms: now_ms(),
                headers: upload.headers.clone(),
                metadata: upload.metadata.clone(),
                acl: upload.acl,
                tags: upload.tags.clone(),
                parts_count: u32::try_from(chosen.len()).ok(),
                upload_id: Some(input.upload_id.clone()),
                // Multipart checksums (composite, of the parts' checksums) are not kept.
                checksum: None,
            };
            match self
                .index
                .complete_upload(
                    &bucket.record_key,
                    &bucket.name,
                    &input.upload_id,
                    &meta,
                    &input.key,
                    CompletionHolds {
                        parts_read_at: read_at,
                        expect,
                    },
                )
                .await
            {
                Ok(prev) => break (stored, meta, etag, prev),
                Err(IndexError::PartsChanged) if attempt < UPDATE_ATTEMPTS => continue,
                Err(IndexError::PartsChanged) => {
                    return Err(s3_error!(
                    OperationAborted,
                    "Parts kept being uploaded while the upload was completed. Please try again."
                ))
                }
                Err(IndexError::NoUpload) => {
                    // Another completion of this upload won the race: answered as it was.
                    return match self
                        .completed_already(&bucket, &input.key, &input.upload_id, host.as_deref())
                        .await?
                    {
                        Some(done) => Ok(S3Response::new(done)),
                        None => Err(index_error(IndexError::NoUpload)),
                    };
                }
                Err(e) => return Err(index_error(e)),
            }
        };
        // Parts uploaded but not named in the completion are no longer referenced.
        let used: std::collections::HashSet<&str> = meta.blobs().collect();
        let unused: Vec<&str> = stored
            .values()
            .map(|p| p.blob.as_str())
            .filter(|b| !used.contains(b))
            .collect();
        self.delete_blobs(unused.into_iter()).await;
        if let Some(prev) = prev {
            self.delete_blobs(prev.blobs().filter(|b| !used.contains(b)))
                .await;
        }
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(bucket.name.clone()),
            e_tag: Some(quoted(&etag)),
            key: Some(input.key.clone()),
            location: Some(object_location(
                &self.domains,
                host.as_deref(),
                &bucket.name,
                &input.key,
            )),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let caller = self.caller(&req).await?;
        let input = req.input;
        let bucket = self
            .authorized_bucket(caller.as_ref(), &input.bucket, Action::WriteObject)
            .await?;
        self.upload_of(&bucket, &input.upload_id, &input.key)
            .await?;
        let parts = self
            .index
            .abort_upload(&bucket.name, &input.upload_id)
            .await
            .map_err(index_error)?;
        self.delete_blobs(parts.iter().map(|p| p.blob.as_str()))
            .await;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}

/// Why an `x-amz-copy-source-range` is refused.
#[derive(Debug, PartialEq, Eq)]
enum CopyRange {
    /// Not `bytes=first-last` with `first <= last`.
    Malformed,
    /// It ends past the source object (AWS neither shortens it nor takes open ranges).
    PastTheEnd,
}

/// The bytes an UploadPartCopy takes from a source of `size` bytes: exactly `bytes=first-last`,
/// inside the source. Pure.
fn copy_source_range(text: &str, size: u64) -> Result<std::ops::Range<u64>, CopyRange> {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let (first, last) = text
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((number(a)?, number(b)?)))
        .filter(|(a, b)| a <= b)
        .ok_or(CopyRange::Malformed)?;
    if last >= size {
        return Err(CopyRange::PastTheEnd);
    }
    Ok(first..last + 1)
}

/// What a ListMultipartUploads page asks for.
struct UploadsQuery<'a> {
    prefix: &'a str,
    key_marker: &'a str,
    id_marker: &'a str,
    delimiter: Option<&'a str>,
    max: usize,
}

/// One page of ListMultipartUploads.
#[derive(Debug, PartialEq)]
struct UploadsPage {
    /// The uploads shown, as `(upload ID, upload)`.
    uploads: Vec<(String, UploadMeta)>,
    /// The common prefixes shown.
    prefixes: Vec<String>,
    truncated: bool,
    /// Where the next page starts: the last key or common prefix shown, when truncated.
    next_key_marker: Option<String>,
    /// With [`UploadsPage::next_key_marker`] when the last entry shown was an upload.
    next_upload_id_marker: Option<String>,
}

/// Pages `uploads` (sorted by key, then initiation, then ID) as S3 does: entries after the
/// markers, uploads under a delimiter grouped into one common prefix, at most `max` entries
/// (uploads and prefixes together). A key marker that is a common prefix (it ends with the
/// delimiter) skips that whole prefix, so a prefix that ended a page is not shown again.
fn uploads_page(uploads: &[(String, UploadMeta)], q: &UploadsQuery<'_>) -> UploadsPage {
    let skip_prefix = q
        .delimiter
        .filter(|d| q.id_marker.is_empty() && !q.key_marker.is_empty() && q.key_marker.ends_with(d))
        .map(|_| q.key_marker);
    let mut page = UploadsPage {
        uploads: Vec::new(),
        prefixes: Vec::new(),
        truncated: false,
        next_key_marker: None,
        next_upload_id_marker: None,
    };
    // Uploads of one key are in initiation order, not ID order: the page goes on from where
    // the marker's upload stands (by ID only when that upload is gone).
    let marker_at = uploads
        .iter()
        .position(|(id, u)| u.key == q.key_marker && id == q.id_marker);
    for (at, (id, u)) in uploads.iter().enumerate() {
        if !u.key.starts_with(q.prefix) {
            continue;
        }
        let after_id_marker = !q.id_marker.is_empty()
            && marker_at.map_or(id.as_str() > q.id_marker, |marker| at > marker);
        let after_marker = q.key_marker.is_empty()
            || u.key.as_str() > q.key_marker
            || (u.key == q.key_marker && after_id_marker);
        if !after_marker || skip_prefix.is_some_and(|p| u.key.starts_with(p)) {
            continue;
        }
        let group = q.delimiter.and_then(|d| {
            u.key[q.prefix.len()..]
                .find(d)
                .map(|i| u.key[..q.prefix.len() + i + d.len()].to_string())
        });
        if group.is_some() && page.prefixes.last() == group.as_ref() {
            continue;
        }
        if page.uploads.len() + page.prefixes.len() == q.max {
            page.truncated = true;
            break;
        }
        match group {
            Some(cp) => {
                page.next_key_marker = Some(cp.clone());
                page.next_upload_id_marker = None;
                page.prefixes.push(cp);
            }
            None => {
                page.next_key_marker = Some(u.key.clone());
                page.next_upload_id_marker = Some(id.clone());
                page.uploads.push((id.clone(), u.clone()));
            }
        }
    }
    if !page.truncated {
        page.next_key_marker = None;
        page.next_upload_id_marker = None;
    }
    page
}

/// The `x-amz-copy-source-if-*` headers of a CopyObject or UploadPartCopy input (two s3s types
/// with the same four fields) as [`Preconditions`].
macro_rules! copy_source_conditions {
    ($input:expr) => {
        Preconditions {
            if_match: $input.copy_source_if_match.clone(),
            if_none_match: $input.copy_source_if_none_match.clone(),
            if_modified_since_ms: $input.copy_source_if_modified_since.as_ref().map(ms_of),
            if_unmodified_since_ms: $input.copy_source_if_unmodified_since.as_ref().map(ms_of),
        }
    };
}
use copy_source_conditions;

/// The `x-amz-copy-source-if-*` conditions of a copy, against its source: any that fails is
/// 412 PreconditionFailed (a copy never answers 304).
fn copy_source_holds(conditions: Preconditions, source: &ObjectMeta) -> S3Result<()> {
    precondition_outcome(&conditions, source, false)
}

fn part_number(n: i32) -> S3Result<u32> {
    if (1..=MAX_PARTS).contains(&n) {
        Ok(u32::try_from(n).unwrap_or(1))
    } else {
        Err(s3_error!(
            InvalidArgument,
            "Part number must be an integer between 1 and 10000, inclusive"
        ))
    }
}

/// The stored parts a completion names, checked as AWS checks them: ascending part numbers,
/// each uploaded with the ETag given, every part but the last at least 5 MiB.
fn choose_parts(
    requested: &[CompletedPart],
    stored: &BTreeMap<u32, PartMeta>,
) -> S3Result<Vec<PartMeta>> {
    if requested.is_empty() {
        return Err(s3_error!(MalformedXML, "The XML you provided was not well-formed or did not validate against our published schema: it names no part."));
    }
    let mut chosen = Vec::with_capacity(requested.len());
    let mut last = 0i32;
    for p in requested {
        let n = p.part_number.unwrap_or(0);
        if n <= last {
            return Err(s3_error!(InvalidPartOrder, "The list of parts was not in ascending order. The parts list must be specified in order by part number."));
        }
        last = n;
        let invalid = || {
            s3_error!(InvalidPart, "One or more of the specified parts could not be found. The part might not have been uploaded, or the specified entity tag might not have matched the part's entity tag.")
        };
        let stored_part = u32::try_from(n)
            .ok()
            .and_then(|n| stored.get(&n))
            .ok_or_else(invalid)?;
        // Every part names the ETag it was answered with, as AWS requires: a completion cannot
        // take whatever was uploaded last under a number without saying which.
        let given = p
            .e_tag
            .as_ref()
            .map(|e| e.value().trim_matches('"').to_string());
        if given.as_deref() != Some(stored_part.etag.as_str()) {
            return Err(invalid());
        }
        chosen.push(stored_part.clone());
    }
    if let Some((_, init)) = chosen.split_last() {
        if init.iter().any(|p| p.size < MIN_PART_SIZE) {
            return Err(s3_error!(
                EntityTooSmall,
                "Your proposed upload is smaller than the minimum allowed object size."
            ));
        }
    }
    Ok(chosen)
}

fn object_entry(key: &str, m: &ObjectMeta, owner: Option<&Owner>) -> Object {
    Object {
        e_tag: Some(quoted(&m.etag)),
        key: Some(key.to_string()),
        last_modified: Some(timestamp(m.last_modified_ms)),
        owner: owner.cloned(),
        size: i64::try_from(m.size).ok(),
        storage_class: Some(ObjectStorageClass::from_static(
            ObjectStorageClass::STANDARD,
        )),
        ..Default::default()
    }
}

impl KarriS3 {
    /// One page of a bucket's keys and common prefixes.
    async fn list(
        &self,
        bucket: &BucketInfo,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> S3Result<super::listing::Page<ObjectMeta>> {
        let source = IndexSource {
            index: &self.index,
            bucket,
        };
        let request = ListRequest {
            prefix,
            delimiter,
            start_after,
            max_keys,
        };
        list_page(&source, &request).await.map_err(index_error)
    }

    /// The object a GET or HEAD reads, once the caller may read it and its preconditions hold:
    /// its entry, the bytes asked for and the `Content-Range` to answer with. A node reads
    /// only the bytes its URL was issued for (`pin`, see [`node_pin`]).
    async fn readable(
        &self,
        (caller, pin): (Option<&Caller>, Option<&str>),
        bucket: &BucketInfo,
        key: &str,
        pre: &Preconditions,
        range: Option<&Range>,
        part_number: Option<i32>,
    ) -> S3Result<Readable> {
        let meta = self.object(bucket, key).await.map_err(|e| {
            // Without read access to the bucket, a missing key is AccessDenied, as in AWS.
            hide_missing_key(e, permits(caller, Action::ListBucket, bucket, None))
        })?;
        if !permits(caller, Action::ReadObject, bucket, Some(meta.acl)) {
            return Err(access_denied());
        }
        if caller.is_some_and(|c| c.account_id == super::presign::NODE_READER)
            && pin != Some(meta.content_id().as_str())
        {
            return Err(s3_error!(
                PreconditionFailed,
                "The object was written again since this URL was issued for the image it held"
            ));
        }
        precondition_outcome(pre, &meta, true)?;
        let (span, parts_count) = match (part_number, range) {
            (Some(_), Some(_)) => {
                return Err(s3_error!(
                    InvalidRequest,
                    "Cannot specify both Range header and partNumber query parameter"
                ))
            }
            (Some(n), None) => {
                let (span, count) = part_span(&meta, n)?;
                (Some(span), Some(count))
            }
            (None, range) => (resolve_range(range, meta.size)?, None),
        };
        let content_range = span
            .as_ref()
            .filter(|r| !r.is_empty())
            .map(|r| format!("bytes {}-{}/{}", r.start, r.end - 1, meta.size));
        let span = span.unwrap_or(0..meta.size);
        Ok(Readable {
            meta,
            span,
            content_range,
            parts_count,
        })
    }

    /// The [content ID](ObjectMeta::content_id) of object `bucket/key`, if it exists.
    pub async fn content_id(&self, bucket: &str, key: &str) -> S3Result<Option<String>> {
        let bucket = self.bucket(bucket).await?;
        Ok(self
            .index
            .get_object(bucket.seen(), &bucket.name, key)
            .await
            .map_err(index_error)?
            .map(|m| m.content_id()))
    }

    /// Whether account `account_id` may read `bucket/key` (an image it registered there): the
    /// bucket's owner, or what the ACLs grant a signed-in account. A missing object is as
    /// readable as its bucket is listable (the download then reports it missing); a missing
    /// bucket is a `NoSuchBucket` error (no URL is issued for a bucket someone may make later).
    pub async fn account_may_read(
        &self,
        account_id: &str,
        bucket: &str,
        key: &str,
    ) -> S3Result<bool> {
        let bucket = self.bucket(bucket).await?;
        let who = Who::Account(account_id);
        let owner = &bucket.spec.owner_id;
        match self
            .index
            .get_object(bucket.seen(), &bucket.name, key)
            .await
            .map_err(index_error)?
        {
            Some(meta) => Ok(allowed(
                who,
                Action::ReadObject,
                owner,
                bucket.spec.acl,
                Some(meta.acl),
            )),
            None => Ok(allowed(
                who,
                Action::ListBucket,
                owner,
                bucket.spec.acl,
                None,
            )),
        }
    }

    /// Deletes the bucket record the request was authorized against (by its UID: not one of
    /// the same name made since), once it holds nothing.
    async fn delete_empty_bucket(&self, bucket: &BucketInfo) -> S3Result<()> {
        let name = bucket.name.as_str();
        if self.index.bucket_in_use(name).await.map_err(index_error)? {
            return Err(s3_error!(
                BucketNotEmpty,
                "The bucket you tried to delete is not empty"
            ));
        }
        let kind = self
            .registry
            .kinds
            .by_plural("buckets")
            .ok_or_else(|| internal("the Bucket kind is not served"))?;
        // The caller holds the bucket's deletion marker.
        match self
            .registry
            .delete_record(
                &kind,
                None,
                name,
                &Principal::Admin("s3".into()),
                &DeleteOptions {
                    uid: bucket.uid.clone(),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code == 404 => Err(s3_error!(
                NoSuchBucket,
                "The specified bucket does not exist."
            )),
            // The UID precondition failed: the record there now is another bucket of the name
            // (the registry's own emptiness check cannot fail under the marker; if it did, the
            // retry finds the bucket in use and answers BucketNotEmpty).
            Err(e) if e.code == 409 => Err(index_error(IndexError::BucketReplaced)),
            Err(e) => Err(internal(e)),
        }
    }

    async fn upload_of(
        &self,
        bucket: &BucketInfo,
        upload_id: &str,
        key: &str,
    ) -> S3Result<UploadMeta> {
        match self
            .index
            .get_upload(bucket.seen(), &bucket.name, upload_id)
            .await
            .map_err(index_error)?
        {
            Some(u) if u.key == key => Ok(u),
            _ => Err(index_error(IndexError::NoUpload)),
        }
    }

    async fn record_part(
        &self,
        bucket: &str,
        upload_id: &str,
        part: u32,
        written: &super::blob::Written,
        etag: &str,
    ) -> S3Result<()> {
        let meta = PartMeta {
            blob: written.id.clone(),
            size: written.size,
            etag: etag.to_string(),
            last_modified_ms: now_ms(),
        };
        match self.index.put_part(bucket, upload_id, part, &meta).await {
            Ok(prev) => {
                if let Some(prev) = prev {
                    self.delete_blobs(std::iter::once(prev.blob.as_str())).await;
                }
                Ok(())
            }
            Err(e) => {
                if e.refused_for_sure() {
                    self.delete_blobs(std::iter::once(written.id.as_str()))
                        .await;
                }
                Err(index_error(e))
            }
        }
    }

    /// Changes a bucket's spec (ACL, tags) with a compare-and-swap update.
    /// Changes the spec of `bucket`, the record the request was authorized on: if the name
    /// now holds another account's bucket (deleted and made again meanwhile), or one being
    /// deleted, nothing changes and the answer is NoSuchBucket.
    async fn update_bucket(
        &self,
        bucket: &BucketInfo,
        change: impl Fn(&mut Value) + Send + Sync,
    ) -> S3Result<()> {
        let name = bucket.name.as_str();
        let kind = self
            .registry
            .kinds
            .by_plural("buckets")
            .ok_or_else(|| internal("the Bucket kind is not served"))?;
        let mut apply = |current: &Value| -> crate::error::ApiResult<Value> {
            let same_owner = current.pointer("/spec/ownerId").and_then(Value::as_str)
                == Some(bucket.spec.owner_id.as_str());
            if !same_owner || current.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(crate::error::ApiError::not_found("buckets", name));
            }
            let mut next = current.clone();
            change(&mut next["spec"]);
            Ok(next)
        };
        self.registry
            .update_with(
                &kind,
                None,
                name,
                &Principal::Admin("s3".into()),
                crate::admission::Subresource::Main,
                None,
                WriteOptions::by(crate::s3::FIELD_MANAGER),
                &mut apply,
            )
            .await
            .map_err(|e| match e.code {
                404 => s3_error!(NoSuchBucket, "The specified bucket does not exist."),
                // What the record's own validation refuses is the request's fault.
                400 | 422 => s3_error!(InvalidArgument, "{}", e.message),
                409 => s3_error!(OperationAborted, "{}", e.message),
                _ => internal(e),
            })?;
        // Buckets are read from the watch cache: the next request must see this change.
        self.registry.catch_up().await.map_err(internal)?;
        Ok(())
    }

    /// Changes an object's ACL or tags, retrying if the object changed meanwhile.
    async fn update_object(
        &self,
        bucket: &BucketInfo,
        key: &str,
        change: impl Fn(&mut ObjectMeta),
    ) -> S3Result<()> {
        // This gateway's changes of one key take turns; compare-and-swap on the entry catches
        // the rest: a write back over a delete or an overwrite that came in between would bring
        // back an entry whose blobs are gone.
        let stripe = {
            use std::hash::{Hash as _, Hasher as _};
            // Fixed keys: the same key always takes the same stripe.
            let mut h = std::hash::DefaultHasher::new();
            (&bucket.name, key).hash(&mut h);
            usize::try_from(h.finish() % UPDATE_LOCK_STRIPES as u64).unwrap_or(0)
        };
        let _turn = match self.update_locks.get(stripe) {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        for _ in 0..UPDATE_ATTEMPTS {
            let Some((mut meta, version)) = self
                .index
                .get_object_versioned(bucket.seen(), &bucket.name, key)
                .await
                .map_err(index_error)?
            else {
                return Err(no_such_key());
            };
            change(&mut meta);
            match self
                .index
                .put_object_expecting(
                    bucket.seen(),
                    &bucket.name,
                    key,
                    &meta,
                    Expect::Version(version),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(IndexError::Changed) => continue,
                Err(e) => return Err(index_error(e)),
            }
        }
        Err(s3_error!(
            OperationAborted,
            "The object kept changing while its ACL or tags were set. Please try again."
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_key_is_hidden_from_callers_who_may_not_list() {
        let rows = [
            (no_such_key(), true, S3ErrorCode::NoSuchKey),
            (no_such_key(), false, S3ErrorCode::AccessDenied),
            (
                index_error(IndexError::BucketReplaced),
                false,
                S3ErrorCode::ServiceUnavailable,
            ),
            (
                index_error(IndexError::NoBucket),
                false,
                S3ErrorCode::NoSuchBucket,
            ),
        ];
        for (e, may_list, code) in rows {
            assert_eq!(hide_missing_key(e, may_list).code(), &code, "{may_list}");
        }
    }

    #[test]
    fn index_refusals_answer_with_the_s3_code_clients_act_on() {
        // 503s are retried by the SDKs; a 409 ConditionalRequestConflict (a race with another
        // write) is for the client to retry, as AWS documents; the others are final.
        let rows = [
            (IndexError::NoBucket, S3ErrorCode::NoSuchBucket),
            (IndexError::BucketBusy, S3ErrorCode::ServiceUnavailable),
            (IndexError::BucketReplaced, S3ErrorCode::ServiceUnavailable),
            (IndexError::Changed, S3ErrorCode::ConditionalRequestConflict),
            (IndexError::NoUpload, S3ErrorCode::NoSuchUpload),
            (
                IndexError::Unexpected("a range"),
                S3ErrorCode::InternalError,
            ),
        ];
        for (e, code) in rows {
            let what = e.to_string();
            assert_eq!(index_error(e).code(), &code, "{what}");
        }
    }

    #[test]
    fn a_streaming_upload_must_deliver_every_byte_it_announced() {
        assert!(check_decoded_length(None, 5).is_ok());
        assert!(check_decoded_length(Some(5), 5).is_ok());
        for (announced, received) in [(5, 4), (5, 0), (5, 6)] {
            let err = check_decoded_length(Some(announced), received).unwrap_err();
            assert_eq!(
                *err.code(),
                S3ErrorCode::IncompleteBody,
                "{announced} vs {received}"
            );
        }
        let mut headers = http::HeaderMap::new();
        assert_eq!(decoded_content_length(&headers).ok(), Some(None));
        headers.insert("x-amz-decoded-content-length", "66560".parse().unwrap());
        assert_eq!(decoded_content_length(&headers).ok(), Some(Some(66560)));
        headers.insert("x-amz-decoded-content-length", "lots".parse().unwrap());
        assert!(decoded_content_length(&headers).is_err());
    }

    fn upload(key: &str) -> UploadMeta {
        UploadMeta {
            key: key.into(),
            initiated_ms: 0,
            initiator: "111111111111".into(),
            headers: Default::default(),
            metadata: BTreeMap::new(),
            acl: Default::default(),
            tags: Vec::new(),
        }
    }

    /// Every entry of every page (`P:` a common prefix, `U:` an upload's key), following the
    /// next markers as a client does.
    fn walk(keys: &[&str], delimiter: Option<&str>, max: usize) -> Vec<String> {
        let uploads: Vec<(String, UploadMeta)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("id{i}"), upload(k)))
            .collect();
        let (mut key_marker, mut id_marker) = (String::new(), String::new());
        let mut seen = Vec::new();
        for _ in 0..100 {
            let page = uploads_page(
                &uploads,
                &UploadsQuery {
                    prefix: "",
                    key_marker: &key_marker,
                    id_marker: &id_marker,
                    delimiter,
                    max,
                },
            );
            // Prefixes and uploads of one page, in key order.
            let mut entries: Vec<String> = page.prefixes.iter().map(|p| format!("P:{p}")).collect();
            entries.extend(page.uploads.iter().map(|(_, u)| format!("U:{}", u.key)));
            entries.sort_by(|a, b| a[2..].cmp(&b[2..]));
            seen.extend(entries);
            if !page.truncated {
                return seen;
            }
            key_marker = page
                .next_key_marker
                .expect("a truncated page says where to go on");
            id_marker = page.next_upload_id_marker.unwrap_or_default();
        }
        panic!("the pages never ended: {seen:?}");
    }

    #[test]
    fn uploads_of_one_key_page_in_initiation_order_whatever_their_ids() {
        // Initiated in this order; their random IDs sort the other way round.
        let uploads: Vec<(String, UploadMeta)> = [("f00", 1), ("a00", 2), ("000", 3)]
            .into_iter()
            .map(|(id, at)| {
                let mut u = upload("k");
                u.initiated_ms = at;
                (id.to_string(), u)
            })
            .collect();
        let (mut key_marker, mut id_marker) = (String::new(), String::new());
        let mut seen = Vec::new();
        loop {
            let page = uploads_page(
                &uploads,
                &UploadsQuery {
                    prefix: "",
                    key_marker: &key_marker,
                    id_marker: &id_marker,
                    delimiter: None,
                    max: 1,
                },
            );
            seen.extend(page.uploads.iter().map(|(id, _)| id.clone()));
            if !page.truncated || seen.len() > 3 {
                break;
            }
            key_marker = page.next_key_marker.unwrap_or_default();
            id_marker = page.next_upload_id_marker.unwrap_or_default();
        }
        assert_eq!(seen, ["f00", "a00", "000"]);
    }

    #[test]
    fn a_copy_source_range_is_exactly_first_to_last_inside_the_source() {
        let rows = [
            ("bytes=0-99", Ok(0..100)),
            ("bytes=10-10", Ok(10..11)),
            ("bytes=0-100", Err(CopyRange::PastTheEnd)),
            ("bytes=0-199", Err(CopyRange::PastTheEnd)),
            ("bytes=100-100", Err(CopyRange::PastTheEnd)),
            ("bytes=50-", Err(CopyRange::Malformed)),
            ("bytes=-50", Err(CopyRange::Malformed)),
            ("bytes=20-10", Err(CopyRange::Malformed)),
            ("bytes=0-9,20-29", Err(CopyRange::Malformed)),
            ("bytes=+1-5", Err(CopyRange::Malformed)),
            ("0-9", Err(CopyRange::Malformed)),
            ("", Err(CopyRange::Malformed)),
        ];
        for (text, want) in rows {
            assert_eq!(copy_source_range(text, 100), want, "{text:?}");
        }
    }

    #[test]
    fn upload_pages_with_a_delimiter_show_each_prefix_and_upload_once() {
        let keys = ["a/1", "a/2", "b", "c/1", "c/2", "d"];
        let all = ["P:a/", "U:b", "P:c/", "U:d"];
        for max in [1, 2, 3, 1000] {
            assert_eq!(walk(&keys, Some("/"), max), all, "max-uploads {max}");
        }
        let flat = ["U:a/1", "U:a/2", "U:b", "U:c/1", "U:c/2", "U:d"];
        for max in [1, 4, 1000] {
            assert_eq!(walk(&keys, None, max), flat, "max-uploads {max}");
        }
        // Two uploads of one key page by upload ID.
        assert_eq!(walk(&["k", "k"], None, 1), ["U:k", "U:k"]);
    }

    #[test]
    fn multipart_etags_are_the_md5_of_the_part_md5s() {
        // Two parts "a" and "b": md5(md5("a") ++ md5("b")) with the part count.
        let a = hex::encode(Md5::digest(b"a"));
        let b = hex::encode(Md5::digest(b"b"));
        let mut joined = Md5::digest(b"a").to_vec();
        joined.extend_from_slice(&Md5::digest(b"b"));
        assert_eq!(
            multipart_etag(&[&a, &b]),
            format!("{}-2", hex::encode(Md5::digest(&joined)))
        );
    }

    fn part(size: u64, etag: &str) -> PartMeta {
        PartMeta {
            blob: format!("blob{etag}"),
            size,
            etag: etag.into(),
            last_modified_ms: 0,
        }
    }

    fn done(n: i32, etag: &str) -> CompletedPart {
        CompletedPart {
            e_tag: Some(ETag::Strong(etag.into())),
            part_number: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn completion_checks_order_etags_and_part_sizes() {
        let big = MIN_PART_SIZE;
        let stored: BTreeMap<u32, PartMeta> = [
            (1, part(big, "aa")),
            (2, part(big, "bb")),
            (3, part(10, "cc")),
        ]
        .into();
        let code = |r: S3Result<Vec<PartMeta>>| {
            r.map(|v| v.len())
                .map_err(|e| e.code().as_str().to_string())
        };
        assert_eq!(
            code(choose_parts(
                &[done(1, "aa"), done(2, "bb"), done(3, "cc")],
                &stored
            )),
            Ok(3)
        );
        assert_eq!(
            code(choose_parts(&[done(1, "aa"), done(3, "cc")], &stored)),
            Ok(2)
        );
        assert_eq!(
            code(choose_parts(&[done(2, "bb"), done(1, "aa")], &stored)),
            Err("InvalidPartOrder".into())
        );
        assert_eq!(
            code(choose_parts(&[done(1, "aa"), done(1, "aa")], &stored)),
            Err("InvalidPartOrder".into())
        );
        assert_eq!(
            code(choose_parts(&[done(1, "zz")], &stored)),
            Err("InvalidPart".into())
        );
        assert_eq!(
            code(choose_parts(&[done(4, "dd")], &stored)),
            Err("InvalidPart".into())
        );
        let without_etag = CompletedPart {
            part_number: Some(1),
            ..Default::default()
        };
        assert_eq!(
            code(choose_parts(&[without_etag], &stored)),
            Err("InvalidPart".into())
        );
        assert_eq!(
            code(choose_parts(&[done(3, "cc"), done(4, "dd")], &stored)),
            Err("InvalidPart".into())
        );
        let small: BTreeMap<u32, PartMeta> = [(1, part(10, "aa")), (2, part(10, "bb"))].into();
        assert_eq!(
            code(choose_parts(&[done(1, "aa"), done(2, "bb")], &small)),
            Err("EntityTooSmall".into())
        );
        assert_eq!(code(choose_parts(&[], &stored)), Err("MalformedXML".into()));
    }

    #[test]
    fn grant_headers_that_amount_to_a_canned_acl_are_taken_and_others_refused() {
        const ALL: &str = r#"uri="http://acs.amazonaws.com/groups/global/AllUsers""#;
        const AUTH: &str = "uri=http://acs.amazonaws.com/groups/global/AuthenticatedUsers";
        let owner = "111111111111";
        let code = |r: S3Result<Option<CannedAcl>>| r.map_err(|e| e.code().as_str().to_owned());
        let none = HeaderGrants::default();
        let all_and_someone = format!(r#"{ALL}, emailAddress="x@example.com""#);
        type Row<'a> = (
            Option<CannedAcl>,
            HeaderGrants<'a>,
            Result<Option<CannedAcl>, String>,
        );
        let rows: Vec<Row<'_>> = vec![
            (None, none, Ok(None)),
            (
                Some(CannedAcl::PublicRead),
                none,
                Ok(Some(CannedAcl::PublicRead)),
            ),
            (
                None,
                HeaderGrants {
                    read: Some(ALL),
                    ..none
                },
                Ok(Some(CannedAcl::PublicRead)),
            ),
            (
                None,
                HeaderGrants {
                    read: Some(ALL),
                    write: Some(ALL),
                    ..none
                },
                Ok(Some(CannedAcl::PublicReadWrite)),
            ),
            (
                None,
                HeaderGrants {
                    read: Some(AUTH),
                    ..none
                },
                Ok(Some(CannedAcl::AuthenticatedRead)),
            ),
            // The owner's own grant, beside another: it adds nothing.
            (
                None,
                HeaderGrants {
                    full_control: Some(r#"id="111111111111""#),
                    read: Some(ALL),
                    ..none
                },
                Ok(Some(CannedAcl::PublicRead)),
            ),
            (
                None,
                HeaderGrants {
                    full_control: Some(r#"id="111111111111""#),
                    ..none
                },
                Ok(Some(CannedAcl::Private)),
            ),
            // Grants to others cannot be kept: refused, never dropped.
            (
                None,
                HeaderGrants {
                    read: Some(r#"id="222222222222""#),
                    ..none
                },
                Err("NotImplemented".into()),
            ),
            (
                None,
                HeaderGrants {
                    read: Some(&all_and_someone),
                    ..none
                },
                Err("NotImplemented".into()),
            ),
            (
                None,
                HeaderGrants {
                    write_acp: Some(ALL),
                    ..none
                },
                Err("NotImplemented".into()),
            ),
            (
                None,
                HeaderGrants {
                    write: Some(ALL),
                    ..none
                },
                Err("NotImplemented".into()),
            ),
            (
                None,
                HeaderGrants {
                    read: Some("AllUsers"),
                    ..none
                },
                Err("InvalidArgument".into()),
            ),
            (
                None,
                HeaderGrants {
                    read: Some(r#"group="x""#),
                    ..none
                },
                Err("InvalidArgument".into()),
            ),
            (
                Some(CannedAcl::Private),
                HeaderGrants {
                    read: Some(ALL),
                    ..none
                },
                Err("InvalidRequest".into()),
            ),
        ];
        for (canned, grants, want) in rows {
            assert_eq!(
                code(requested_acl(canned, grants, owner)),
                want,
                "{canned:?} {grants:?}"
            );
        }
    }

    #[test]
    fn a_policy_granting_another_account_is_refused_not_dropped() {
        let user = |id: &str, permission: &'static str| Grant {
            grantee: Some(Grantee {
                display_name: None,
                email_address: None,
                id: Some(id.into()),
                type_: Type::from_static(Type::CANONICAL_USER),
                uri: None,
            }),
            permission: Some(Permission::from_static(permission)),
        };
        let policy = |grants| AccessControlPolicy {
            grants: Some(grants),
            owner: None,
        };
        let owner_only = policy(vec![user("111111111111", Permission::FULL_CONTROL)]);
        assert_eq!(
            canned_from_policy(&owner_only, "111111111111").unwrap(),
            CannedAcl::Private
        );
        let other = policy(vec![
            user("111111111111", Permission::FULL_CONTROL),
            user("222222222222", Permission::READ),
        ]);
        let refused = canned_from_policy(&other, "111111111111").unwrap_err();
        assert_eq!(refused.code(), &S3ErrorCode::NotImplemented);
    }

    #[test]
    fn canned_acls_show_as_aws_grants_and_read_back() {
        let owner = Owner {
            display_name: Some("a".into()),
            id: Some("111111111111".into()),
        };
        for acl in [
            CannedAcl::Private,
            CannedAcl::PublicRead,
            CannedAcl::PublicReadWrite,
            CannedAcl::AuthenticatedRead,
        ] {
            let policy = AccessControlPolicy {
                grants: Some(grants_of(&owner, acl)),
                owner: Some(owner.clone()),
            };
            assert_eq!(canned_from_policy(&policy, "111111111111").unwrap(), acl);
        }
    }

    #[test]
    fn ranges_map_onto_the_segments_they_cover() {
        let seg = |b: &str, size| Segment {
            blob: b.into(),
            size,
        };
        let segs = [seg("a", 10), seg("b", 5), seg("c", 10)];
        type Row<'a> = (std::ops::Range<u64>, Vec<(&'a str, std::ops::Range<u64>)>);
        let rows: [Row<'_>; 5] = [
            (0..25, vec![("a", 0..10), ("b", 0..5), ("c", 0..10)]),
            (3..7, vec![("a", 3..7)]),
            (8..12, vec![("a", 8..10), ("b", 0..2)]),
            (15..16, vec![("c", 0..1)]),
            (25..25, vec![]),
        ];
        for (range, want) in rows {
            let got = pieces_of(&segs, range.clone());
            let got: Vec<(&str, std::ops::Range<u64>)> =
                got.iter().map(|(b, r)| (b.as_str(), r.clone())).collect();
            assert_eq!(got, want, "{range:?}");
        }
    }

    #[test]
    fn a_completed_uploads_location_is_an_absolute_url_on_the_host_asked() {
        let rows = [
            (
                Some("127.0.0.1:8773"),
                "b",
                "dir/a b+c.bin",
                "https://127.0.0.1:8773/b/dir/a%20b%2Bc.bin",
            ),
            (
                Some("b.s3.localhost:8773"),
                "b",
                "k",
                "https://b.s3.localhost:8773/k",
            ),
            (Some("s3.localhost"), "b", "k", "https://s3.localhost/b/k"),
            (None, "b", "a b", "/b/a%20b"),
            // A bucket named like the host's first label, addressed path-style.
            (
                Some("127.0.0.1:8773"),
                "127",
                "k",
                "https://127.0.0.1:8773/127/k",
            ),
        ];
        let domains = vec!["s3.localhost".to_owned()];
        for (host, bucket, key, want) in rows {
            assert_eq!(
                object_location(&domains, host, bucket, key),
                want,
                "{host:?}"
            );
        }
    }

    #[test]
    fn a_presigned_urls_query_headers_are_read_and_its_signing_parameters_are_not() {
        let uri: http::Uri = "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIK%2F20261127%2Fkarri-1%2Fs3%2Faws4_request&x-amz-meta-Colour=dark%20blue&x-amz-tagging=a%3D1&x-amz-checksum-crc32=AAAAAA%3D%3D&X-Amz-Signature=ab"
            .parse()
            .expect("a URI");
        assert_eq!(
            query_headers(&uri, false),
            vec![
                ("x-amz-meta-colour".to_owned(), "dark blue".to_owned()),
                ("x-amz-tagging".to_owned(), "a=1".to_owned()),
            ]
        );
        let signed_by_header: http::Uri = "/b/k?x-amz-meta-colour=red".parse().expect("a URI");
        assert!(query_headers(&signed_by_header, false).is_empty());
        // Forwarded by the Eucalyptus path, which checked the signature and took it off.
        assert_eq!(query_headers(&signed_by_header, true).len(), 1);
        let mut input = PutObjectInput::builder()
            .bucket("b".into())
            .key("k".into())
            .tagging(Some("own=1".into()))
            .build()
            .expect("an input");
        with_presigned_headers(&mut input, &query_headers(&uri, false));
        assert_eq!(
            input.tagging.as_deref(),
            Some("own=1"),
            "the request's own wins"
        );
        assert_eq!(
            input
                .metadata
                .and_then(|m| m.get("colour").cloned())
                .as_deref(),
            Some("dark blue")
        );
    }

    #[test]
    fn url_encoding_keeps_slashes_and_unreserved_characters() {
        assert_eq!(url_encode_key("a b/c+d~é"), "a%20b/c%2Bd~%C3%A9");
    }

    #[test]
    fn tagging_headers_parse_as_query_strings() {
        assert_eq!(
            tags_from_header(Some("a=1&b=two%20words")).unwrap(),
            vec![("a".into(), "1".into()), ("b".into(), "two words".into())]
        );
        assert!(tags_from_header(Some("a=1&a=2")).is_err());
    }
}
