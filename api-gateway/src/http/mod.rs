//! The Kubernetes-compatible resource API over HTTP (axum).

pub mod discovery;
pub mod review;
pub mod route;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use futures::StreamExt;

use crate::body::BodyError;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::admission::{FieldValidation, Subresource};
use crate::auth::{self, Authenticator, Principal, Target, Verb};
use crate::error::{ApiError, ApiResult};
use crate::kinds::Kind;
use crate::metrics::{Metrics, RequestLabels};
use crate::registry::{
    self, bookmark_object, event_type, DeleteOptions, ListOptions, Propagation, Registry,
    WatchEvent, WatchOptions2, WriteOptions,
};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::ssa;
use crate::table::{self, View};
use route::Endpoint;

/// Shared state of the HTTP layer.
pub struct AppState {
    /// The registry.
    pub registry: Arc<Registry>,
    /// Known tokens.
    pub auth: Authenticator,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Largest accepted request body.
    pub max_body: usize,
    /// Hash of the OpenAPI document (changes when the schemas do).
    pub openapi_hash: String,
    /// The OpenAPI group-version document.
    pub openapi: Value,
    /// Settings of the EC2 face.
    pub ec2: crate::ec2::service::Ec2Settings,
    /// The S3 face, when the gateway stores objects.
    pub s3: Option<crate::s3::S3Face>,
}

type St = State<Arc<AppState>>;

/// The router of every path the gateway serves.
pub fn router(state: Arc<AppState>) -> Router {
    std::sync::LazyLock::force(&STARTED);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/version",
            get(|| async { axum::Json(discovery::version()) }),
        )
        .route(
            "/version/",
            get(|| async { axum::Json(discovery::version()) }),
        )
        .route("/karri/v1/image-url", get(image_url))
        .route("/services/compute", any(crate::ec2::service::serve))
        .route("/services/compute/", any(crate::ec2::service::serve))
        .route("/", any(root))
        .fallback(any(authenticated))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            s3_first,
        ))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// S3 requests (by signature scope, virtual host, the Eucalyptus path, or an unsigned request
/// for a bucket) go to the S3 face before any route of the other faces sees them. Other
/// AWS-signed requests, at whatever path their client's endpoint URL has, go to the EC2 face,
/// so that an AWS client always gets an AWS answer, never the resource API's.
async fn s3_first(State(s): St, req: Request, next: axum::middleware::Next) -> Response {
    if let Some(face) = &s.s3 {
        if face.claims(&req) {
            return face.serve(req).await;
        }
    }
    if aws_signed(&req) {
        let domains = s.s3.as_ref().map_or(&[][..], |f| f.domains());
        match crate::s3::classify(req.method(), req.uri(), req.headers(), domains) {
            // Only without an S3 face: one would have claimed it.
            crate::s3::Face::S3 => {
                let refusal = crate::s3::Refusal::no_s3_face();
                let request_id = crate::admission::new_uuid().simple().to_string();
                return (
                    refusal.status,
                    [(header::CONTENT_TYPE, "application/xml")],
                    refusal.xml(&request_id),
                )
                    .into_response();
            }
            crate::s3::Face::Ec2 => return crate::ec2::service::serve(State(s), req).await,
            crate::s3::Face::Kube => {}
        }
    }
    next.run(req).await
}

/// Whether a request carries an AWS signature or an EC2 `Action` (never a resource API request).
fn aws_signed(req: &Request) -> bool {
    let signed = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.starts_with("AWS4-HMAC-SHA256 ") || h.starts_with("AWS "));
    signed
        || req.uri().query().is_some_and(|q| {
            q.split('&').any(|pair| {
                let name = pair.split_once('=').map_or(pair, |(n, _)| n);
                matches!(name, "X-Amz-Credential" | "AWSAccessKeyId" | "Action")
            })
        })
}

/// `/` serves AWS requests (an `Action`, a form POST or a SigV4 signature) and otherwise the
/// resource API's answer for `/`.
async fn root(state: St, req: Request) -> Response {
    if crate::ec2::service::looks_like_aws(&req) {
        crate::ec2::service::serve(state, req).await
    } else {
        authenticated(state, req).await
    }
}

/// `GET /karri/v1/image-url?location=<bucket/key>&base=<https://host:port>[&instance=<ns>/<name>]`:
/// a node agent's presigned URL of an image in S3 that an instance bound to the node boots
/// from, and whose image's owner may read it. With `instance`, that instance must be one (the
/// agent asks so for each instance before it uses the image, cached or not); without, any.
async fn image_url(State(s): St, req: Request) -> Response {
    let principal = s.auth.authenticate(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok()),
    );
    let Some(crate::auth::Principal::Node(node)) = principal else {
        return ApiError::forbidden("only a node agent's token may ask for image URLs")
            .into_response();
    };
    if !impersonation_of(req.headers()).is_empty() {
        return ApiError::forbidden(format!(
            "User {node:?} cannot impersonate: only an administrator may, and not for image URLs"
        ))
        .into_response();
    }
    let Some(face) = &s.s3 else {
        return ApiError::bad_request("this gateway stores no S3 objects (--s3-data-dir is unset)")
            .into_response();
    };
    let q = query_map(req.uri().query());
    let (Some(location), Some(base)) = (q.get("location"), q.get("base")) else {
        return ApiError::bad_request("location and base are required").into_response();
    };
    let Some((bucket, key)) = crate::s3::presign::parse_location(location) else {
        return ApiError::bad_request(format!("{location:?} is not an S3 location (bucket/key)"))
            .into_response();
    };
    // The URL is signed for a path-style request to `base`: a base whose host the S3 face reads
    // as a bucket's virtual host would make the same path name another bucket's object.
    let base_host = base
        .split_once("://")
        .map_or(base.as_str(), |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if crate::s3::virtual_bucket(face.domains(), base_host).is_some() {
        return ApiError::bad_request(format!(
            "{base:?} names a bucket's virtual host: the base must be the gateway's own address"
        ))
        .into_response();
    }
    if let Err(e) = s.registry.catch_up().await {
        return e.into_response();
    }
    let (instances, _) = s
        .registry
        .cache
        .list("instances", &crate::store::kind_prefix("instances"));
    let named = q.get("instance").map(String::as_str);
    let wanted = |v: &Value| {
        let is_named = named.is_none_or(|n| {
            let ns = v.pointer("/metadata/namespace").and_then(Value::as_str);
            let name = v.pointer("/metadata/name").and_then(Value::as_str);
            n.split_once('/') == ns.zip(name)
        });
        is_named
            && v.pointer("/status/nodeName").and_then(Value::as_str) == Some(node.as_str())
            && ["root", "kernel", "ramdisk"].iter().any(|a| {
                v.pointer(&format!("/status/launch/{a}/location"))
                    .and_then(Value::as_str)
                    == Some(location.as_str())
            })
    };
    let candidates: Vec<&Value> = instances
        .iter()
        .map(|i| &i.value)
        .filter(|v| wanted(v))
        .collect();
    if candidates.is_empty() {
        let which = named.map_or_else(
            || "no instance".to_string(),
            |n| format!("instance {n} is not one that"),
        );
        return ApiError::forbidden(format!("{which} on node {node} boots from {location}"))
            .into_response();
    }
    // The image's owner must be able to read the object: registering another account's
    // private object as one's image must not make it readable. One instance whose owner may
    // read it is enough for the node to fetch it; each instance is asked about by name before
    // it uses the image.
    let mut allowed = None;
    for instance in candidates {
        match image_owner_may_read(&s, face, instance, location, bucket, key).await {
            Ok(Some(image)) => {
                allowed = Some(image);
                break;
            }
            Ok(None) => {}
            Err(e) => return e.into_response(),
        }
    }
    let Some(image) = allowed else {
        return ApiError::forbidden(format!(
            "the account that registered the image may not read {location}"
        ))
        .into_response();
    };
    // The URL is for the bytes stored now alone, and they must be the image's own: an image
    // does not change, so an object written again since it was registered is not the image.
    let content = match face.content_id(bucket, key).await {
        Ok(Some(content)) => content,
        Ok(None) => {
            return ApiError::not_found_message(format!(
                "image {location}: the object does not exist (NoSuchKey)"
            ))
            .into_response()
        }
        Err(e) => return s3_lookup_error(e, location, bucket).into_response(),
    };
    if image.content.as_ref().is_some_and(|c| *c != content) {
        return ApiError::conflict_message(format!(
            "the object {location} was written again since image {} was registered from it, and an image does not change: register the image again",
            image.id
        ))
        .into_response();
    }
    let access_key = crate::s3::presign::node_access_key(&node);
    let Some(secret) = s
        .registry
        .derived_secret(&crate::s3::presign::node_secret_label(&node))
    else {
        return ApiError::internal("the gateway has no secrets key").into_response();
    };
    const EXPIRES_SECS: u32 = 300;
    let now = chrono::Utc::now();
    match crate::s3::presign::presign_get(
        base,
        (bucket, key, &content),
        &s.ec2.region,
        (&access_key, &secret),
        now,
        EXPIRES_SECS,
    ) {
        Some(url) => axum::Json(serde_json::json!({
            "url": url,
            "expiresAt": (now + chrono::TimeDelta::seconds(EXPIRES_SECS.into())).to_rfc3339(),
        }))
        .into_response(),
        None => ApiError::bad_request(format!("{base:?} is not an http(s)://host[:port] base URL"))
            .into_response(),
    }
}

/// The image an instance boots from an object, as it was registered.
struct RegisteredImage {
    /// Its ID.
    id: String,
    /// The stored bytes of the object it was registered from
    /// ([`crds::image::OBJECT_CONTENT_ANNOTATION`]; none on images registered before it).
    content: Option<String>,
}

/// The image `instance` boots from `location`, if the account owning it may read that object.
/// Images in namespaces of no account (the public images an administrator keeps in
/// `karri-images`) were put there by an administrator and may.
async fn image_owner_may_read(
    s: &AppState,
    face: &crate::s3::S3Face,
    instance: &Value,
    location: &str,
    bucket: &str,
    key: &str,
) -> Result<Option<RegisteredImage>, ApiError> {
    let image_id = ["root", "kernel", "ramdisk"].iter().find_map(|a| {
        let artifact = instance.pointer(&format!("/status/launch/{a}"))?;
        (artifact.pointer("/location").and_then(Value::as_str) == Some(location))
            .then(|| artifact.pointer("/imageId").and_then(Value::as_str))
            .flatten()
    });
    // The ID must name an Image whose own location is the one asked for: a launch spec that
    // names some other record, or an image registered elsewhere, vouches for nothing.
    let Some(image) = image_id
        .and_then(|id| s.registry.cache.by_id(id))
        .filter(|i| {
            i.value.pointer("/kind").and_then(Value::as_str) == Some("Image")
                && i.value
                    .pointer("/spec/imageLocation")
                    .and_then(Value::as_str)
                    == Some(location)
        })
    else {
        return Err(ApiError::forbidden(format!(
            "no image registered at {location} boots this instance"
        )));
    };
    // A bucket deleted and made again since the image was registered (by whoever took the
    // name) is not the one the image's owner registered it from.
    let registered_in = image
        .value
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(crds::image::BUCKET_UID_ANNOTATION))
        .and_then(Value::as_str);
    if let Some(registered_in) = registered_in {
        let now = s.registry.cache.get(
            "buckets",
            &crate::store::record_key("buckets", None, bucket),
        );
        // (A bucket that is gone is NoSuchBucket, below.)
        if now.is_some_and(|b| b.uid() != Some(registered_in)) {
            return Err(ApiError::forbidden(format!(
                "the bucket {bucket} was deleted, and made again, since the image was registered from {location}: register the image again"
            )));
        }
    }
    let registered = RegisteredImage {
        id: image
            .value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        content: image
            .value
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(crds::image::OBJECT_CONTENT_ANNOTATION))
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    let namespace = image
        .value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(account_id) = s.registry.account_id_of(namespace) else {
        // No account: the administrators' images of a system namespace (karri-images) are
        // fetched as registered. Any other namespace without an account is one whose account
        // was deleted, and its images vouch for nothing.
        return Ok(crate::admission::is_system_namespace(namespace).then_some(registered));
    };
    let may = face
        .account_may_read(&account_id, bucket, key)
        .await
        .map_err(|e| s3_lookup_error(e, location, bucket))?;
    Ok(may.then_some(registered))
}

/// The answer to a node when the S3 face could not look `location` up.
fn s3_lookup_error(e: s3s::S3Error, location: &str, bucket: &str) -> ApiError {
    if *e.code() == s3s::S3ErrorCode::NoSuchBucket {
        ApiError::not_found_message(format!(
            "image {location}: the bucket {bucket} does not exist (NoSuchBucket)"
        ))
    } else {
        ApiError::internal(format!("cannot check access to {location}: {e:?}"))
    }
}

/// How long `/readyz` waits for etcd to answer before it says the gateway is not ready.
const READYZ_ETCD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Ready: the watch cache has listed etcd, and etcd answers now (as kube-apiserver's `/readyz`
/// checks etcd): a load balancer sends nothing to a gateway that could only fail.
async fn readyz(State(s): St) -> Response {
    if !s.registry.ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "watch cache not synced").into_response();
    }
    match tokio::time::timeout(READYZ_ETCD_TIMEOUT, s.registry.current_revision()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok").into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("etcd: {}", e.message),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("etcd: no answer within {} s", READYZ_ETCD_TIMEOUT.as_secs()),
        )
            .into_response(),
    }
}

async fn metrics(State(s): St) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response {
    let mut resp = (code, axum::Json(v)).into_response();
    for w in warnings {
        let text = format!(
            "299 - \"unknown field \\\"{}\\\"\"",
            w.trim_start_matches('.')
        );
        if let Ok(h) = HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, h);
        }
    }
    resp
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(q.unwrap_or(""))
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    matches!(q.get(name).map(String::as_str), Some("true" | "1"))
}

/// A boolean query parameter read as Kubernetes reads one (Go's `ParseBool`); another value is
/// a 400.
fn query_bool(q: &HashMap<String, String>, name: &str) -> ApiResult<Option<bool>> {
    match q.get(name).map(String::as_str) {
        None => Ok(None),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{name} must be true or false, not {other:?}"
        ))),
    }
}

/// The kind of options a request carries, named in a 422 on a bad one (`CreateOptions` …).
#[derive(Clone, Copy, Debug)]
enum Options {
    Create,
    Update,
    Patch,
    Delete,
}

impl Options {
    fn kind(self) -> &'static str {
        match self {
            Options::Create => "CreateOptions",
            Options::Update => "UpdateOptions",
            Options::Patch => "PatchOptions",
            Options::Delete => "DeleteOptions",
        }
    }
}

/// The cause types of kube-apiserver's field errors.
const NOT_SUPPORTED: &str = "FieldValueNotSupported";
const REQUIRED: &str = "FieldValueRequired";
const FORBIDDEN: &str = "FieldValueForbidden";
const INVALID: &str = "FieldValueInvalid";

/// Whether `dryRun` values (the query's, or a DeleteOptions body's) ask for a dry run: `All`,
/// the one value Kubernetes knows; any other (an empty one too) is a 422 on the request's
/// options, worded as kube-apiserver words it.
fn dry_run_of<'a>(values: impl IntoIterator<Item = &'a str>, options: Options) -> ApiResult<bool> {
    let values: Vec<&str> = values.into_iter().collect();
    if values.iter().all(|v| *v == "All") {
        return Ok(!values.is_empty());
    }
    let listed: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    Err(ApiError::invalid_options(
        options.kind(),
        "dryRun",
        NOT_SUPPORTED,
        format!(
            "Unsupported value: []string{{{}}}: supported values: \"All\"",
            listed.join(", ")
        ),
    ))
}

/// `dryRun`, `fieldValidation` and `fieldManager` of a create, update or patch; a value
/// Kubernetes does not know is a 422 on the request's options, as kube-apiserver answers it.
fn write_options(
    q: &HashMap<String, String>,
    options: Options,
    headers: &HeaderMap,
) -> ApiResult<WriteOptions> {
    let dry_run = dry_run_of(q.get("dryRun").map(String::as_str), options)?;
    let field_validation = FieldValidation::parse(q.get("fieldValidation").map(String::as_str))
        .map_err(|why| {
            ApiError::invalid_options(options.kind(), "fieldValidation", NOT_SUPPORTED, why)
        })?;
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|h| h.to_str().ok());
    let manager = field_manager(q.get("fieldManager").map(String::as_str), user_agent)
        .map_err(|why| ApiError::invalid_options(options.kind(), "fieldManager", INVALID, why))?;
    Ok(WriteOptions {
        dry_run,
        field_validation,
        manager: Some(manager),
    })
}

/// Most bytes a field manager's name may have, as in Kubernetes.
const MAX_FIELD_MANAGER: usize = 128;

/// The field manager a write is recorded under: `fieldManager` when given (at most 128 bytes of
/// printable characters, or why not), else the `User-Agent` up to its first `/` (`kubectl`,
/// `kube-rs`), cut to 128 characters, as kube-apiserver names it. Pure.
fn field_manager(given: Option<&str>, user_agent: Option<&str>) -> Result<String, String> {
    match given.filter(|m| !m.is_empty()) {
        Some(m) if m.len() > MAX_FIELD_MANAGER => Err(format!(
            "Invalid value: {m:?}: must be no more than {MAX_FIELD_MANAGER} characters"
        )),
        Some(m) if m.chars().any(char::is_control) => Err(format!(
            "Invalid value: {m:?}: must only contain printable characters"
        )),
        Some(m) => Ok(m.to_string()),
        None => Ok(user_agent
            .unwrap_or_default()
            .split('/')
            .next()
            .unwrap_or_default()
            .chars()
            .take(MAX_FIELD_MANAGER)
            .collect()),
    }
}

fn verb_label(method: &Method, ep: &Endpoint, q: &HashMap<String, String>) -> &'static str {
    match (method.as_str(), ep) {
        ("GET", Endpoint::Collection { .. }) if flag(q, "watch") => "watch",
        ("GET", Endpoint::Collection { .. }) => "list",
        ("GET", _) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Endpoint::Collection { .. }) => "deletecollection",
        ("DELETE", _) => "delete",
        _ => "other",
    }
}

/// Every authenticated path: discovery, OpenAPI and the resources.
async fn authenticated(State(s): St, req: Request) -> Response {
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), user = tracing::field::Empty);
    serve(s, req).instrument(span).await
}

/// What a request's `Impersonate-*` headers ask for; an empty one asks for nothing, as in
/// Kubernetes. A header that is not text names nothing anyone has, so it is kept as it reads
/// lossily (and refused as an unknown user).
fn impersonation_of(headers: &HeaderMap) -> auth::Impersonation {
    let text = |v: &HeaderValue| {
        Some(String::from_utf8_lossy(v.as_bytes()).into_owned()).filter(|t| !t.is_empty())
    };
    auth::Impersonation {
        user: headers.get("impersonate-user").and_then(text),
        groups: headers
            .get_all("impersonate-group")
            .iter()
            .filter_map(text)
            .collect(),
        uid: headers.get("impersonate-uid").and_then(text),
        extra: headers
            .keys()
            .any(|k| k.as_str().starts_with("impersonate-extra-")),
    }
}

async fn serve(s: Arc<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let principal = s.auth.authenticate(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok()),
    );
    let Some(principal) = principal else {
        tracing::info!("refused: no valid bearer token");
        return ApiError::unauthorized("Unauthorized: a valid bearer token is required")
            .into_response();
    };
    let asked = impersonation_of(req.headers());
    let caller = principal.user().to_owned();
    let principal = match auth::impersonate(principal, &asked, |user| s.auth.principals_named(user))
    {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(user = %caller, "refused impersonation: {e}");
            return match e {
                auth::ImpersonationError::WithoutUser(_) => ApiError::bad_request(e.to_string()),
                auth::ImpersonationError::Forbidden { .. } => ApiError::forbidden(e.to_string()),
            }
            .into_response();
        }
    };
    if asked.is_empty() {
        tracing::Span::current().record("user", principal.user());
    } else {
        tracing::Span::current().record(
            "user",
            format!("{} (impersonated by {caller})", principal.user()),
        );
    }
    let q = query_map(req.uri().query());
    let prefix = format!("/apis/{}/", crds::API_VERSION);
    let rest = path.strip_prefix(&prefix).filter(|rest| !rest.is_empty());
    let crds_prefix = format!("{}/", discovery::CRDS_PATH);
    let (resp, verb, resource) = if let Some(rest) = rest {
        match route::route(&s.registry.kinds, rest) {
            Some(ep) => {
                let verb = verb_label(&method, &ep, &q);
                let resource = match &ep {
                    Endpoint::Collection { plural, .. } | Endpoint::Object { plural, .. } => {
                        plural.clone()
                    }
                };
                let resp = resource_request(&s, &principal, ep, method.clone(), q, req)
                    .await
                    .unwrap_or_else(IntoResponse::into_response);
                (resp, verb, resource)
            }
            None => (
                ApiError::no_route(&path).into_response(),
                "other",
                String::new(),
            ),
        }
    } else if method == Method::POST
        && (path == review::ACCESS_REVIEWS
            || path == review::RULES_REVIEWS
            || path == review::TOKEN_REVIEWS
            || review::is_self_review(&path))
    {
        let resp = self_reviews(&s, &principal, &path, req)
            .await
            .unwrap_or_else(IntoResponse::into_response);
        (resp, "create", String::new())
    } else {
        let resp = match (method.as_str(), path.trim_end_matches('/')) {
            ("GET", "/api") => axum::Json(discovery::core_versions()).into_response(),
            ("GET", "/api/v1") => axum::Json(discovery::core_resource_list()).into_response(),
            ("GET", "/apis/apiextensions.k8s.io") => {
                axum::Json(discovery::crd_api_group()).into_response()
            }
            ("GET", "/apis/apiextensions.k8s.io/v1") => {
                axum::Json(discovery::crd_resource_list()).into_response()
            }
            (m, p) if p == discovery::CRDS_PATH || p.starts_with(&crds_prefix) => {
                crd_request(&s, m, p, &q)
            }
            ("GET", "/api/v1/namespaces") => namespaces(&s, &principal, &q)
                .await
                .unwrap_or_else(IntoResponse::into_response),
            ("GET", p) if p.starts_with("/api/v1/namespaces/") => {
                namespace(&principal, &p["/api/v1/namespaces/".len()..])
            }
            ("GET", "/apis") => axum::Json(discovery::group_list()).into_response(),
            ("GET", "/apis/karri.dev") => axum::Json(discovery::api_group()).into_response(),
            ("GET", p) if p == format!("/apis/{}", crds::API_VERSION) => {
                axum::Json(discovery::resource_list(&s.registry.kinds)).into_response()
            }
            ("GET", "/openapi/v3") => {
                axum::Json(discovery::openapi_root(&s.openapi_hash)).into_response()
            }
            ("GET", "/openapi/v2") => openapi_v2(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|h| h.to_str().ok()),
            ),
            ("GET", p) if p == format!("/openapi/v3/apis/{}", crds::API_VERSION) => {
                axum::Json(s.openapi.clone()).into_response()
            }
            _ => ApiError::no_route(&path).into_response(),
        };
        let trimmed = path.trim_end_matches('/');
        let resource = if trimmed == discovery::CRDS_PATH || trimmed.starts_with(&crds_prefix) {
            "customresourcedefinitions"
        } else if trimmed == "/api/v1/namespaces" || trimmed.starts_with("/api/v1/namespaces/") {
            "namespaces"
        } else {
            ""
        };
        let verb = if !resource.is_empty() && flag(&q, "watch") {
            "watch"
        } else {
            "get"
        };
        (resp, verb, resource.to_string())
    };
    let labels = RequestLabels {
        verb: verb.to_string(),
        resource,
        code: resp.status().as_u16().to_string(),
    };
    s.metrics.requests.get_or_create(&labels).inc();
    if verb != "watch" {
        s.metrics
            .latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
    tracing::debug!(code = resp.status().as_u16(), "served");
    resp
}

/// The resourceVersion a body names (`metadata.resourceVersion`), which the write it asks for
/// must find: `None` when it names none.
fn precondition_of(body: &Value) -> ApiResult<Option<i64>> {
    match body
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        Some(rv) if !rv.is_empty() => Ok(Some(registry::parse_rv(rv)?)),
        _ => Ok(None),
    }
}

/// When the gateway started serving: the time its CustomResourceDefinitions were established.
static STARTED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
});

/// The CustomResourceDefinitions of Karri's kinds, which every caller may get and list (their
/// schemas are public at `/openapi/v3` too), and nobody may change: they come with the binary.
fn crd_request(s: &AppState, method: &str, path: &str, q: &HashMap<String, String>) -> Response {
    let since = STARTED.as_str();
    if method != "GET" {
        return ApiError::method_not_allowed(format!(
            "CustomResourceDefinitions come with Karri's binaries and cannot be changed ({method} {path})"
        ))
        .into_response();
    }
    let name = path.strip_prefix(&format!("{}/", discovery::CRDS_PATH));
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        // They change only with Karri's binaries: a watch sees them and then nothing. One
        // CRD is watched at its path or with `kubectl get crd <name> -w`'s field selector.
        let named = match (name, q.get("fieldSelector").map(String::as_str)) {
            (Some(name), _) => Some(name),
            (None, None | Some("")) => None,
            (None, Some(selector)) => match selector
                .strip_prefix("metadata.name==")
                .or_else(|| selector.strip_prefix("metadata.name="))
            {
                Some(name) => Some(name),
                None => {
                    return ApiError::bad_request(format!(
                        "field selector {selector:?} is not supported for CustomResourceDefinitions: only metadata.name=<name>"
                    ))
                    .into_response()
                }
            },
        };
        let list = discovery::crd_list(&s.registry.kinds, since);
        let records: Vec<Value> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|crd| {
                named.is_none_or(|n| {
                    crd.pointer("/metadata/name").and_then(Value::as_str) == Some(n)
                })
            })
            .cloned()
            .collect();
        let bookmark = registry::bookmark_of(
            &format!("{}/v1", discovery::CRD_GROUP),
            "CustomResourceDefinition",
            discovery::CRDS_VERSION,
            true,
        );
        return unchanging_watch(s, q, "CustomResourceDefinition", records, bookmark)
            .unwrap_or_else(IntoResponse::into_response);
    }
    match name {
        None => axum::Json(discovery::crd_list(&s.registry.kinds, since)).into_response(),
        Some(name) => match discovery::crd_named(&s.registry.kinds, name, since) {
            Some(crd) => axum::Json(crd).into_response(),
            None => ApiError::not_found_message(format!(
                "customresourcedefinitions.{} {name:?} not found",
                discovery::CRD_GROUP
            ))
            .into_response(),
        },
    }
}

/// `kubectl auth can-i` (with `--list`) and `kubectl auth whoami`: a SelfSubjectAccessReview, a
/// SelfSubjectRulesReview or a SelfSubjectReview posted by the caller, answered about the caller,
/// or a TokenReview ([`review`]).
async fn self_reviews(
    s: &AppState,
    who: &Principal,
    path: &str,
    req: Request,
) -> ApiResult<Response> {
    let (headers, bytes) = read_body(req, s.max_body).await?;
    let body = match content_type(&headers).as_str() {
        review::PROTOBUF if path == review::ACCESS_REVIEWS => {
            review::access_review_from_protobuf(&bytes)?
        }
        review::PROTOBUF if path == review::RULES_REVIEWS => {
            review::rules_review_from_protobuf(&bytes)?
        }
        // A self review says nothing but who asks: its body is not read.
        review::PROTOBUF => Value::Null,
        ct => parse_body(&bytes, ct)?,
    };
    let answer = if path == review::ACCESS_REVIEWS {
        review::access_review(who, &s.registry.kinds, &body)?
    } else if path == review::TOKEN_REVIEWS {
        review::token_review(who, &body, |token| {
            s.auth.authenticate(Some(&format!("Bearer {token}")))
        })?
    } else if path == review::RULES_REVIEWS {
        review::rules_review(who, &s.registry.kinds, &body)?
    } else {
        let version = path
            .trim_start_matches("/apis/")
            .trim_end_matches("/selfsubjectreviews");
        review::self_review(who, version)
    };
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// Media type of an OpenAPI v2 document in protobuf, which kubectl asks for.
const OPENAPI_V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

/// `GET /openapi/v2`: an OpenAPI v2 document that defines nothing. Older kubectl (Debian 12's
/// 1.20) fetches it to validate manifests itself and gives up without it; finding no
/// definition of a kind it validates nothing and leaves that to the server, which checks every
/// record against its schema (the schemas are at `/openapi/v3`). In protobuf when asked (an
/// empty message: every field at its default), else in JSON.
fn openapi_v2(accept: Option<&str>) -> Response {
    if accept.is_some_and(|a| a.contains(OPENAPI_V2_PROTOBUF)) {
        // Not the media type asked for, whose `@` Go's MIME parser refuses (kube-openapi
        // answers octet-stream too).
        return (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Vec::<u8>::new(),
        )
            .into_response();
    }
    axum::Json(discovery::openapi_v2_document()).into_response()
}

/// `GET /api/v1/namespaces/<ns>`: kubectl asks after a 404 to tell a missing record from a
/// missing namespace. Namespaces are implicit here (an account owns one), so any valid name is.
fn namespace(who: &Principal, ns: &str) -> Response {
    if ns.contains('/') || crate::schema::namespace_problem(ns).is_some() {
        return ApiError::no_route(&format!("/api/v1/namespaces/{ns}")).into_response();
    }
    if let Principal::Account { .. } = who {
        if !namespace_visible(who, ns) {
            return ApiError::forbidden(format!(
                "namespaces {ns:?} is forbidden: User {:?} cannot get resource \"namespaces\" in API group \"\" in the namespace {ns:?}",
                who.user()
            ))
            .into_response();
        }
    }
    axum::Json(discovery::namespace(ns)).into_response()
}

/// `GET /api/v1/namespaces`, a list or a watch: the accounts' namespaces, which come and go
/// with their accounts, and Karri's own ([`discovery::SYSTEM_NAMESPACE`]), as label and field
/// selectors pick them. An account sees its own and Karri's; a node none (403).
async fn namespaces(
    s: &Arc<AppState>,
    who: &Principal,
    q: &HashMap<String, String>,
) -> ApiResult<Response> {
    if matches!(who, Principal::Node(_)) {
        return Err(ApiError::forbidden(format!(
            "namespaces is forbidden: User {:?} cannot list resource \"namespaces\" in API group \"\" at the cluster scope",
            who.user()
        )));
    }
    let accounts = s
        .registry
        .kinds
        .by_plural("accounts")
        .ok_or_else(|| ApiError::internal("accounts are not served"))?;
    let lo = list_options(q)?;
    let (labels, fields) = (lo.labels.clone(), lo.fields.clone());
    let who = who.clone();
    let shown = move |ns: &Value| {
        let name = ns
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        namespace_visible(&who, name) && labels.matches(ns) && fields.matches(ns)
    };
    let system = discovery::namespace_record(discovery::SYSTEM_NAMESPACE, None);
    let reader = Principal::Admin("system:namespaces".into());
    if !flag(q, "watch") {
        let page = s
            .registry
            .list(&accounts, None, &reader, &registry::ListOptions::default())
            .await?;
        let mut items: Vec<Value> = std::iter::once(system)
            .chain(
                page.items
                    .iter()
                    .map(|a| discovery::namespace_record_of_account(&a.value)),
            )
            .filter(|ns| shown(ns))
            .collect();
        items.sort_by(|a, b| {
            a["metadata"]["name"]
                .as_str()
                .cmp(&b["metadata"]["name"].as_str())
        });
        return Ok(axum::Json(json!({
            "apiVersion": "v1",
            "kind": "NamespaceList",
            "metadata": {"resourceVersion": page.revision.to_string()},
            "items": items,
        }))
        .into_response());
    }
    // The selectors pick namespaces, not the accounts they come from.
    let opts = WatchOptions2 {
        labels: Default::default(),
        fields: Default::default(),
        ..watch_options(s, q, "Namespace").await?
    };
    // Karri's own namespace never changes: it is shown among what exists at the start.
    let first = opts
        .from
        .is_none()
        .then(|| system.clone())
        .filter(|ns| shown(ns))
        .map(|ns| event_line("ADDED", &ns));
    let rx = s.registry.watch(accounts, None, reader, opts);
    let events = ReceiverStream::new(rx).filter_map(move |ev| {
        let object = match &ev {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                Some(discovery::namespace_record_of_account(&o.value)).filter(|ns| shown(ns))
            }
            WatchEvent::Bookmark {
                revision,
                initial_events_end,
            } => Some(registry::bookmark_of(
                "v1",
                "Namespace",
                *revision,
                *initial_events_end,
            )),
            WatchEvent::Error(e) => Some(e.status()),
        };
        std::future::ready(object.map(|o| event_line(event_type(&ev), &o)))
    });
    Ok(watch_response(futures::stream::iter(first).chain(events)))
}

/// Whether `who` may see namespace `name`: an account its own and Karri's (which holds public
/// records), a node none, anyone else every one.
fn namespace_visible(who: &Principal, name: &str) -> bool {
    match who {
        Principal::Account { namespace, .. } => {
            name == namespace || name == discovery::SYSTEM_NAMESPACE
        }
        Principal::Node(_) => false,
        Principal::Admin(_) | Principal::Operator(_) => true,
    }
}

/// One line of a watch's answer: `{"type": …, "object": …}` and a line break.
fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": event, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A watch's answer: the lines of `events` as they come.
fn watch_response(events: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(
            events.map(Ok::<_, std::convert::Infallible>),
        ))
        .unwrap_or_else(|_| {
            ApiError::internal("could not build the watch response").into_response()
        })
}

async fn read_body(req: Request, limit: usize) -> ApiResult<(HeaderMap, Bytes)> {
    let (parts, body) = req.into_parts();
    let bytes = crate::body::read_limited(body, limit)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { .. } => ApiError::too_large(limit),
            BodyError::Unreadable | BodyError::Stalled => ApiError::bad_request(e.to_string()),
        })?;
    Ok((parts.headers, bytes))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Parse a JSON or YAML body into a value. Another media type (CBOR, protobuf, a patch type on
/// a create) is 415, as kube-apiserver answers it, so that clients fall back to JSON.
fn parse_body(bytes: &[u8], ct: &str) -> ApiResult<Value> {
    let yaml = match ct {
        "" | "application/json" => false,
        "application/yaml" | "application/x-yaml" | "text/yaml" => true,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let v: Value = if yaml {
        serde_norway::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML: {e}")))?
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be an object"));
    }
    Ok(v)
}

struct Ctx<'a> {
    s: &'a AppState,
    who: &'a Principal,
    kind: Arc<Kind>,
    ns: Option<String>,
    /// Whether the request's `Accept` header names something served.
    acceptable: bool,
}

impl Ctx<'_> {
    /// Whether the caller may `verb` the target; then whether it can be answered in what it
    /// accepts (kube-apiserver authorizes before it negotiates, so a caller without the right
    /// learns that first).
    fn authorize(&self, verb: Verb, name: Option<&str>) -> ApiResult<()> {
        let target = Target {
            kind: self.kind.info.kind,
            plural: self.kind.info.plural,
            namespace: self.ns.as_deref(),
            namespaced: self.kind.info.namespaced,
            name,
        };
        if !auth::allowed(self.who, verb, &target) {
            Err(ApiError::forbidden(auth::forbidden_message(
                self.who, verb, &target,
            )))
        } else if self.acceptable {
            Ok(())
        } else {
            Err(ApiError::not_acceptable(matches!(verb, Verb::Watch)))
        }
    }
}

/// A request of the resource API, answered in the media its `Accept` header negotiates
/// ([`table::negotiate`]): JSON, or YAML made from it.
async fn resource_request(
    s: &Arc<AppState>,
    who: &Principal,
    ep: Endpoint,
    method: Method,
    q: HashMap<String, String>,
    req: Request,
) -> ApiResult<Response> {
    let watch =
        matches!(ep, Endpoint::Collection { .. }) && method == Method::GET && flag(&q, "watch");
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok());
    // Refused (406) once the request is authorized.
    let negotiated = table::negotiate(accept, watch);
    let view = negotiated.map(|(view, _)| view);
    let served = serve_resource(s, who, ep, method, q, req, view).await;
    match negotiated.map_or(table::Media::Json, |(_, media)| media) {
        table::Media::Json => served,
        table::Media::Yaml => Ok(as_yaml(served.unwrap_or_else(IntoResponse::into_response)).await),
    }
}

/// A JSON response written again in YAML, its status and other headers kept.
async fn as_yaml(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => return ApiError::internal(format!("reading the answer: {e}")).into_response(),
    };
    let text = serde_json::from_slice::<Value>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|v| serde_norway::to_string(&v).map_err(|e| e.to_string()));
    match text {
        Ok(text) => {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/yaml"),
            );
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(text))
        }
        Err(e) => ApiError::internal(format!("writing the answer as YAML: {e}")).into_response(),
    }
}

/// [`resource_request`] once its answer's `view` is negotiated (`None`: nothing the client
/// accepts is served).
async fn serve_resource(
    s: &Arc<AppState>,
    who: &Principal,
    ep: Endpoint,
    method: Method,
    q: HashMap<String, String>,
    req: Request,
    view: Option<View>,
) -> ApiResult<Response> {
    let (plural, ns) = match &ep {
        Endpoint::Collection { plural, namespace }
        | Endpoint::Object {
            plural, namespace, ..
        } => (plural.clone(), namespace.clone()),
    };
    if let Some(ns) = &ns {
        if let Some(problem) = crate::schema::namespace_problem(ns) {
            return Err(ApiError::bad_request(format!("namespace {problem}")));
        }
    }
    let kind = s
        .registry
        .kinds
        .by_plural(&plural)
        .ok_or_else(|| ApiError::no_route(&plural))?;
    let acceptable = view.is_some();
    let view = match view.unwrap_or(View::Full) {
        View::Table(_) => View::Table(
            table::IncludeObject::parse(q.get("includeObject").map(String::as_str))
                .map_err(ApiError::bad_request)?,
        ),
        other => other,
    };
    let ctx = Ctx {
        s,
        who,
        kind: kind.clone(),
        ns: ns.clone(),
        acceptable,
    };
    match (ep, method.as_str()) {
        (Endpoint::Collection { .. }, "GET") if flag(&q, "watch") => {
            ctx.authorize(Verb::Watch, None)?;
            watch(s, who, kind, ns, &q, view).await
        }
        (Endpoint::Collection { .. }, "GET") => {
            ctx.authorize(Verb::List, None)?;
            list(&ctx, &q, view).await
        }
        // A namespaced record is created in its namespace's collection, as Kubernetes serves
        // the all-namespaces path for list and watch only.
        (Endpoint::Collection { .. }, "POST") if kind.info.namespaced && ns.is_none() => {
            Err(ApiError::method_not_allowed(format!(
                "{} are namespaced: create them at .../namespaces/<namespace>/{}",
                kind.info.plural, kind.info.plural
            )))
        }
        (Endpoint::Collection { .. }, "POST") => {
            let (headers, bytes) = read_body(req, s.max_body).await?;
            let body = parse_body(&bytes, &content_type(&headers))?;
            let name = body
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string);
            ctx.authorize(Verb::Create, name.as_deref())?;
            let opts = write_options(&q, Options::Create, &headers)?;
            let w = s
                .registry
                .create(&kind, ns.as_deref(), body, who, opts)
                .await?;
            Ok(json_response(StatusCode::CREATED, &w.object, &w.warnings))
        }
        // As kube-apiserver serves deletecollection: in a namespace for namespaced kinds.
        (Endpoint::Collection { .. }, "DELETE") if kind.info.namespaced && ns.is_none() => {
            Err(ApiError::method_not_allowed(format!(
                "{} are namespaced: delete a collection of them at .../namespaces/<namespace>/{}",
                kind.info.plural, kind.info.plural
            )))
        }
        (Endpoint::Collection { .. }, "DELETE") => {
            ctx.authorize(Verb::DeleteCollection, None)?;
            let opts = delete_request_options(req, s.max_body, &q).await?;
            Box::pin(delete_collection(&ctx, &q, &opts)).await
        }
        (Endpoint::Object { name, .. }, "GET") => {
            ctx.authorize(Verb::Get, Some(&name))?;
            let obj = s.registry.get(&kind, ns.as_deref(), &name, who).await?;
            match view {
                View::Full => Ok(axum::Json(obj).into_response()),
                View::Table(include) => {
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0);
                    Ok(axum::Json(table::table(
                        &kind,
                        std::iter::once(&obj),
                        rv,
                        None,
                        include,
                    ))
                    .into_response())
                }
                View::Metadata(version) => {
                    Ok(axum::Json(table::partial_metadata(&obj, version)).into_response())
                }
            }
        }
        (Endpoint::Object { name, status, .. }, "PUT") => {
            ctx.authorize(Verb::Update, Some(&name))?;
            let (headers, bytes) = read_body(req, s.max_body).await?;
            let body = parse_body(&bytes, &content_type(&headers))?;
            // As for Kubernetes' custom resources, an update says which version it replaces:
            // one without would silently undo whatever was written since it was read.
            let precondition = match body
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            {
                Some(rv) if !rv.is_empty() => Some(registry::parse_rv(rv)?),
                _ => {
                    // A record that is not there (or not the caller's to see) is NotFound
                    // first, as kube-apiserver answers a custom resource's update.
                    s.registry.get(&kind, ns.as_deref(), &name, who).await?;
                    return Err(ApiError::invalid(
                        kind.info.kind,
                        &name,
                        vec![(
                            "metadata.resourceVersion".into(),
                            "Invalid value: 0x0: must be specified for an update".into(),
                        )],
                    ));
                }
            };
            let sub = if status {
                Subresource::Status
            } else {
                Subresource::Main
            };
            let opts = write_options(&q, Options::Update, &headers)?;
            let mut change = |_: &Value| Ok(body.clone());
            let w = s
                .registry
                .update_with(
                    &kind,
                    ns.as_deref(),
                    &name,
                    who,
                    sub,
                    precondition,
                    opts,
                    &mut change,
                )
                .await?;
            Ok(json_response(StatusCode::OK, &w.object, &w.warnings))
        }
        (Endpoint::Object { name, status, .. }, "PATCH") => {
            ctx.authorize(Verb::Patch, Some(&name))?;
            let (headers, bytes) = read_body(req, s.max_body).await?;
            patch(&ctx, &name, status, &q, &headers, &bytes).await
        }
        (
            Endpoint::Object {
                name,
                status: false,
                ..
            },
            "DELETE",
        ) => {
            ctx.authorize(Verb::Delete, Some(&name))?;
            let opts = delete_request_options(req, s.max_body, &q).await?;
            // Boxed: a delete's future is large, and inline it would make every request's as
            // large (copied through each layer of the HTTP stack).
            let (obj, gone) =
                Box::pin(
                    s.registry
                        .delete_reporting(&kind, ns.as_deref(), &name, who, &opts),
                )
                .await?;
            if gone {
                // As kube-apiserver answers for a custom resource removed at once: a Success
                // Status naming it (clients tell it from a deletion still pending, which
                // returns the record).
                return Ok(axum::Json(deleted_status(kind.info.plural, &obj)).into_response());
            }
            Ok(axum::Json(obj).into_response())
        }
        (_, m) => Err(ApiError::method_not_allowed(format!(
            "the server does not allow the method {m} on this resource"
        ))),
    }
}

/// The `Status` kube-apiserver answers a deletion that removed `obj` (of resource `plural`)
/// at once: `Success`, with the record's name, group, resource and UID. Pure.
fn deleted_status(plural: &str, obj: &Value) -> Value {
    let text = |p: &str| obj.pointer(p).cloned().unwrap_or(Value::Null);
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": text("/metadata/name"),
            "group": crds::GROUP,
            "kind": plural,
            "uid": text("/metadata/uid"),
        },
    })
}

/// The options of a DELETE: its query and its body (a `DeleteOptions`, or nothing).
async fn delete_request_options(
    req: Request,
    max_body: usize,
    q: &HashMap<String, String>,
) -> ApiResult<DeleteOptions> {
    let (headers, bytes) = read_body(req, max_body).await?;
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_body(&bytes, &content_type(&headers))?
    };
    delete_options(q, &body)
}

fn delete_options(q: &HashMap<String, String>, body: &Value) -> ApiResult<DeleteOptions> {
    // A delete has no fieldValidation (kube-apiserver ignores it there).
    let dry_run = dry_run_of(q.get("dryRun").map(String::as_str), Options::Delete)?
        || match body.get("dryRun") {
            None | Some(Value::Null) => false,
            Some(Value::Array(values)) => {
                let texts: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
                if texts.len() != values.len() {
                    return Err(ApiError::bad_request(
                        "DeleteOptions.dryRun must be a list of strings",
                    ));
                }
                dry_run_of(texts, Options::Delete)?
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "DeleteOptions.dryRun must be a list of strings",
                ))
            }
        };
    let policy = q.get("propagationPolicy").cloned().or_else(|| {
        body.get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    // The deprecated orphanDependents (query or body) stands for a policy when none is given,
    // as in Kubernetes: true orphans the dependents, false deletes them.
    let orphan_dependents = query_bool(q, "orphanDependents")?
        .or_else(|| body.get("orphanDependents").and_then(Value::as_bool));
    if policy.as_deref().is_some_and(|p| !p.is_empty()) && orphan_dependents.is_some() {
        return Err(ApiError::invalid_options(
            Options::Delete.kind(),
            "propagationPolicy",
            "FieldValueInvalid",
            "orphanDependents and propagationPolicy cannot both be set",
        ));
    }
    let policy = policy.or_else(|| {
        orphan_dependents.map(|orphan| if orphan { "Orphan" } else { "Background" }.to_string())
    });
    let propagation = match policy.as_deref() {
        None | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::invalid_options(
                Options::Delete.kind(),
                "propagationPolicy",
                NOT_SUPPORTED,
                format!("Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""),
            ))
        }
    };
    let pre = body.get("preconditions");
    let resource_version = match pre
        .and_then(|p| p.get("resourceVersion"))
        .and_then(Value::as_str)
    {
        Some(rv) => Some(registry::parse_rv(rv)?),
        None => None,
    };
    Ok(DeleteOptions {
        dry_run,
        uid: pre
            .and_then(|p| p.get("uid"))
            .and_then(Value::as_str)
            .map(str::to_string),
        resource_version,
        propagation,
    })
}

async fn patch(
    ctx: &Ctx<'_>,
    name: &str,
    status: bool,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    bytes: &[u8],
) -> ApiResult<Response> {
    let s = ctx.s;
    let kind = &ctx.kind;
    let ns = ctx.ns.as_deref();
    let ct = content_type(headers);
    let ct = ct.as_str();
    let mut opts = write_options(q, Options::Patch, headers)?;
    let sub = if status {
        Subresource::Status
    } else {
        Subresource::Main
    };
    let invalid = |msg: String| ApiError::invalid(kind.info.kind, name, vec![(String::new(), msg)]);
    match ct {
        "application/merge-patch+json" | "application/json-patch+json"
            if q.contains_key("force") =>
        {
            Err(ApiError::invalid_options(
                Options::Patch.kind(),
                "force",
                FORBIDDEN,
                "Forbidden: may not be specified for non-apply patch",
            ))
        }
        "application/merge-patch+json" | "application/json-patch+json" => {
            let patch_value: Value = serde_json::from_slice(bytes)
                .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
            let precondition = precondition_of(&patch_value)?;
            let json_patch: Option<json_patch::Patch> = if ct == "application/json-patch+json" {
                let p: json_patch::Patch =
                    serde_json::from_value(patch_value.clone()).map_err(|e| {
                        ApiError::bad_request(format!("the JSON patch is malformed: {e}"))
                    })?;
                if p.0.len() > MAX_JSON_PATCH_OPS {
                    return Err(ApiError::too_many_patch_operations(
                        p.0.len(),
                        MAX_JSON_PATCH_OPS,
                    ));
                }
                Some(p)
            } else {
                if !patch_value.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                None
            };
            let mut change = |cur: &Value| {
                let mut doc = cur.clone();
                match &json_patch {
                    Some(p) => apply_json_patch(&mut doc, p, s.max_body).map_err(|e| match e {
                        JsonPatchError::Grows { limit } => ApiError::too_large(limit),
                        JsonPatchError::Op(e) => invalid(e.to_string()),
                    })?,
                    None => json_patch::merge(&mut doc, &patch_value),
                }
                // A patch that sets the resourceVersion (a JSON patch's `replace`, as kubectl
                // sends when it rewrites managedFields) asks for that version, as in Kubernetes.
                let version = |v: &Value| {
                    v.pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .filter(|rv| !rv.is_empty())
                        .map(str::to_string)
                };
                if let Some(asked) = version(&doc) {
                    if Some(&asked) != version(cur).as_ref() {
                        return Err(ApiError::conflict(kind.info.plural, name));
                    }
                }
                Ok(doc)
            };
            let w = s
                .registry
                .update_with(
                    kind,
                    ns,
                    name,
                    ctx.who,
                    sub,
                    precondition,
                    opts,
                    &mut change,
                )
                .await?;
            Ok(json_response(StatusCode::OK, &w.object, &w.warnings))
        }
        "application/apply-patch+yaml" | "application/apply-patch+json" => {
            let manager = q
                .get("fieldManager")
                .filter(|m| !m.is_empty())
                .cloned()
                .ok_or_else(|| {
                    ApiError::invalid_options(
                        Options::Patch.kind(),
                        "fieldManager",
                        REQUIRED,
                        "Required value: is required for apply patch",
                    )
                })?;
            // An apply records its own managed fields (an `Apply` entry), not an update's; one
            // of the status, merged into it, is recorded as the manager's update of it.
            opts.manager = status.then(|| manager.clone());
            let force = query_bool(q, "force")?.unwrap_or(false);
            let applied = parse_body(bytes, "application/yaml")?;
            crate::admission::check_type(kind, &applied)?;
            let body_name = crate::admission::name_of(&applied);
            if body_name != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            // A resourceVersion in the applied configuration is a precondition, as in
            // Kubernetes: applying over a record that changed since is a conflict.
            let precondition = precondition_of(&applied)?;
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let conflict_error = |c: Vec<ssa::Conflict>| {
                let pairs: Vec<(String, String)> =
                    c.into_iter().map(|c| (c.described, c.field)).collect();
                ApiError::apply_conflict(&pairs)
            };
            if status {
                let mut change = |cur: &Value| {
                    let mut next = cur.clone();
                    if let Some(st) = applied.get("status") {
                        let mut merged = next.get("status").cloned().unwrap_or(json!({}));
                        json_patch::merge(&mut merged, st);
                        next["status"] = merged;
                    }
                    Ok(next)
                };
                let w = s
                    .registry
                    .update_with(
                        kind,
                        ns,
                        name,
                        ctx.who,
                        sub,
                        precondition,
                        opts,
                        &mut change,
                    )
                    .await?;
                return Ok(json_response(StatusCode::OK, &w.object, &w.warnings));
            }
            let mut change = |cur: &Value| {
                ssa::apply(Some(cur), &applied, &manager, force, &now).map_err(conflict_error)
            };
            match s
                .registry
                .update_with(
                    kind,
                    ns,
                    name,
                    ctx.who,
                    sub,
                    precondition,
                    opts.clone(),
                    &mut change,
                )
                .await
            {
                Ok(w) => Ok(json_response(StatusCode::OK, &w.object, &w.warnings)),
                Err(e) if e.code == 404 && precondition.is_some() => Err(ApiError::bad_request(
                    "resourceVersion should not be set on objects to be created",
                )),
                Err(e) if e.code == 404 => {
                    ctx.authorize(Verb::Create, Some(name))?;
                    let created = ssa::apply(None, &applied, &manager, force, &now)
                        .map_err(conflict_error)?;
                    let w = s.registry.create(kind, ns, created, ctx.who, opts).await?;
                    Ok(json_response(StatusCode::CREATED, &w.object, &w.warnings))
                }
                Err(e) => Err(e),
            }
        }
        other => Err(ApiError::unsupported_patch_type(other)),
    }
}

/// Most operations one JSON patch may hold, as in Kubernetes.
const MAX_JSON_PATCH_OPS: usize = 10_000;

/// Why a JSON patch was not applied.
#[derive(Debug, thiserror::Error)]
enum JsonPatchError {
    /// An operation failed (a missing path, a failed test ...).
    #[error(transparent)]
    Op(#[from] json_patch::PatchError),
    /// Its `copy` operations would add more than `limit` bytes: a few ops that each copy what
    /// the last one doubled would otherwise take all the gateway's memory.
    #[error("the JSON patch copies more than {limit} bytes")]
    Grows {
        /// The most its copies may add, the request body limit.
        limit: usize,
    },
}

/// RFC 6902 as Kubernetes applies it: a `test` that a path is `null` also passes when the path
/// does not exist (kube-rs' finalizer helper relies on it to add the first finalizer). The
/// values `copy` operations add may come to `max_growth` bytes in all (values that `add` and
/// `replace` carry are bounded by the request body already).
fn apply_json_patch(
    doc: &mut Value,
    patch: &json_patch::Patch,
    max_growth: usize,
) -> Result<(), JsonPatchError> {
    let mut copied = 0usize;
    // Op by op on the caller's copy: a failure leaves the copy half-patched, and it is dropped.
    for op in &patch.0 {
        match op {
            json_patch::PatchOperation::Test(t)
                if t.value.is_null() && doc.pointer(t.path.as_str()).is_none_or(Value::is_null) =>
            {
                continue;
            }
            json_patch::PatchOperation::Copy(c) => {
                let size = doc
                    .pointer(c.from.as_str())
                    .map_or(0, |v| json_size(v, max_growth.saturating_sub(copied) + 1));
                copied = copied.saturating_add(size);
                if copied > max_growth {
                    return Err(JsonPatchError::Grows { limit: max_growth });
                }
            }
            _ => {}
        }
        json_patch::patch(doc, std::slice::from_ref(op))?;
    }
    Ok(())
}

/// The length of `value` serialised as JSON, counted up to `cap` (past it, the count stops and
/// at least `cap` is returned), without building the text.
fn json_size(value: &Value, cap: usize) -> usize {
    struct Count {
        bytes: usize,
        cap: usize,
    }
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes = self.bytes.saturating_add(buf.len());
            if self.bytes > self.cap {
                return Err(std::io::Error::other("past the cap"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count { bytes: 0, cap };
    // An error only means the cap was passed.
    let _ = serde_json::to_writer(&mut count, value);
    count.bytes
}

fn list_options(q: &HashMap<String, String>) -> ApiResult<ListOptions> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid labelSelector: {e}")))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid fieldSelector: {e}")))?;
    let limit = match q.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(l) => l.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("limit must be a non-negative integer, not {l:?}"))
        })?,
    };
    Ok(ListOptions {
        labels,
        fields,
        limit,
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
        resource_version: q.get("resourceVersion").cloned(),
        resource_version_match: q
            .get("resourceVersionMatch")
            .filter(|c| !c.is_empty())
            .cloned(),
    })
}

/// Deletes every record of the collection that the selectors of `q` match and the caller may
/// see, each as a DELETE of it would (finalizers, propagation, dry run), and answers the list
/// of what it deleted: each record as it was removed, or marked while finalizers hold it. A
/// record deleted by someone else meanwhile is left out; the first other error ends it.
async fn delete_collection(
    ctx: &Ctx<'_>,
    q: &HashMap<String, String>,
    opts: &DeleteOptions,
) -> ApiResult<Response> {
    let list = ListOptions {
        limit: 0,
        continue_token: None,
        ..list_options(q)?
    };
    let page = ctx
        .s
        .registry
        .list(&ctx.kind, ctx.ns.as_deref(), ctx.who, &list)
        .await?;
    let mut deleted = Vec::with_capacity(page.items.len());
    for item in &page.items {
        let text = |p: &str| item.value.pointer(p).and_then(Value::as_str);
        let name = text("/metadata/name").unwrap_or_default();
        // The record listed, not one made again under its name since: unless the caller
        // asked for a UID itself, this record's UID is a precondition.
        let mine = DeleteOptions {
            uid: opts
                .uid
                .clone()
                .or_else(|| text("/metadata/uid").map(str::to_string)),
            ..opts.clone()
        };
        let caller_uid = opts.uid.is_some();
        match Box::pin(ctx.s.registry.delete_reporting(
            &ctx.kind,
            ctx.ns.as_deref(),
            name,
            ctx.who,
            &mine,
        ))
        .await
        {
            Ok((obj, _gone)) => deleted.push(obj),
            // Deleted, or deleted and made again, by someone else meanwhile.
            Err(e) if e.code == 404 => {}
            Err(e) if !caller_uid && e.is_uid_precondition_failure() => {}
            Err(e) => return Err(e),
        }
    }
    let revision = ctx.s.registry.cache.revision();
    Ok(axum::Json(json!({
        "apiVersion": crds::API_VERSION,
        "kind": ctx.kind.list_kind(),
        "metadata": {"resourceVersion": revision.to_string()},
        "items": deleted,
    }))
    .into_response())
}

async fn list(ctx: &Ctx<'_>, q: &HashMap<String, String>, view: View) -> ApiResult<Response> {
    let opts = list_options(q)?;
    let page = ctx
        .s
        .registry
        .list(&ctx.kind, ctx.ns.as_deref(), ctx.who, &opts)
        .await?;
    match view {
        View::Full => {}
        View::Table(include) => {
            let t = table::table(
                &ctx.kind,
                page.items.iter().map(|o| &o.value),
                page.revision,
                page.continue_token.as_deref(),
                include,
            );
            return Ok(axum::Json(t).into_response());
        }
        View::Metadata(version) => {
            let l = table::partial_metadata_list(
                page.items.iter().map(|o| &o.value),
                page.revision,
                page.continue_token.as_deref(),
                version,
            );
            return Ok(axum::Json(l).into_response());
        }
    }
    // Stream the pre-serialized records into the list body without re-encoding them.
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(c) = &page.continue_token {
        meta["continue"] = Value::String(c.clone());
    }
    let head = format!(
        "{{\"apiVersion\":\"{}\",\"kind\":\"{}\",\"metadata\":{},\"items\":[",
        crds::API_VERSION,
        ctx.kind.list_kind(),
        meta
    );
    let total: usize = page.items.iter().map(|o| o.json().len() + 1).sum();
    let mut body = Vec::with_capacity(head.len() + total + 2);
    body.extend_from_slice(head.as_bytes());
    for (i, o) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(o.json());
    }
    body.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// How long a watch runs: `timeoutSeconds`, where unset or 0 means the default of 30 minutes
/// (as in Kubernetes).
fn watch_timeout(param: Option<&str>) -> ApiResult<Duration> {
    const DEFAULT: Duration = Duration::from_secs(1800);
    match param {
        None | Some("") | Some("0") => Ok(DEFAULT),
        Some(t) => t.parse::<u64>().map(Duration::from_secs).map_err(|_| {
            ApiError::bad_request(format!(
                "timeoutSeconds must be a non-negative integer, not {t:?}"
            ))
        }),
    }
}

/// A watch's `sendInitialEvents` as asked (`None`: not given) and whether it asks for them;
/// refused as Kubernetes' list options validation refuses it (on `kind`'s options).
fn initial_events_of<'q>(
    q: &'q HashMap<String, String>,
    kind: &str,
) -> ApiResult<(Option<&'q str>, bool)> {
    let asked = q
        .get("sendInitialEvents")
        .map(String::as_str)
        .filter(|v| !v.is_empty());
    let rv_match = q
        .get("resourceVersionMatch")
        .map(String::as_str)
        .filter(|v| !v.is_empty());
    let refused =
        |why: &str| ApiError::invalid(kind, "", vec![("resourceVersionMatch".into(), why.into())]);
    if asked.is_some() && rv_match != Some("NotOlderThan") {
        return Err(refused(
            "sendInitialEvents requires resourceVersionMatch=NotOlderThan",
        ));
    }
    if asked.is_none() && rv_match.is_some() {
        return Err(refused(
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    match asked {
        None | Some("false") => Ok((asked, false)),
        Some("true") => Ok((asked, true)),
        Some(other) => Err(ApiError::bad_request(format!(
            "sendInitialEvents must be true or false, not {other:?}"
        ))),
    }
}

/// A watch of records that do not change while the gateway runs (the CustomResourceDefinitions):
/// ADDED for each of `records` when the watch starts from no version (or asks for initial
/// events, which `bookmark`, marked as their end, then closes), then nothing until its time is
/// up or the gateway stops.
fn unchanging_watch(
    s: &AppState,
    q: &HashMap<String, String>,
    kind: &str,
    records: Vec<Value>,
    bookmark: Value,
) -> ApiResult<Response> {
    let (asked, send_initial_events) = initial_events_of(q, kind)?;
    let from = q
        .get("resourceVersion")
        .map(String::as_str)
        .filter(|rv| !rv.is_empty() && *rv != "0");
    if let Some(rv) = from {
        registry::parse_rv(rv)?;
        if send_initial_events {
            return Err(ApiError::bad_request(
                "sendInitialEvents=true with a resourceVersion other than 0 or unset is not supported",
            ));
        }
    }
    let timeout = watch_timeout(q.get("timeoutSeconds").map(String::as_str))?;
    let mut lines = Vec::new();
    if from.is_none() && asked != Some("false") {
        lines.extend(records.iter().map(|r| event_line("ADDED", r)));
    }
    if send_initial_events {
        lines.push(event_line("BOOKMARK", &bookmark));
    }
    let registry = s.registry.clone();
    let quiet = futures::stream::once(async move { registry.watch_ends(timeout).await })
        .filter_map(|()| std::future::ready(None));
    Ok(watch_response(futures::stream::iter(lines).chain(quiet)))
}

/// The options of a watch of `kind` from its query, refused as Kubernetes refuses them.
async fn watch_options(
    s: &AppState,
    q: &HashMap<String, String>,
    kind: &str,
) -> ApiResult<WatchOptions2> {
    let lo = list_options(q)?;
    let (asked, send_initial_events) = initial_events_of(q, kind)?;
    let from = match lo.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(registry::parse_rv(rv)?),
    };
    // sendInitialEvents=false from no version: only what changes from now on, no ADDED for
    // what is there already.
    let from = match (asked, from) {
        (Some("false"), None) => Some(s.registry.current_revision().await?),
        (_, from) => from,
    };
    if send_initial_events && from.is_some() {
        return Err(ApiError::bad_request(
            "sendInitialEvents=true with a resourceVersion other than 0 or unset is not supported",
        ));
    }
    let timeout = watch_timeout(q.get("timeoutSeconds").map(String::as_str))?;
    let opts = WatchOptions2 {
        from,
        labels: lo.labels,
        fields: lo.fields,
        bookmarks: flag(q, "allowWatchBookmarks") || send_initial_events,
        send_initial_events,
        timeout,
    };
    Ok(opts)
}

async fn watch(
    s: &Arc<AppState>,
    who: &Principal,
    kind: Arc<Kind>,
    ns: Option<String>,
    q: &HashMap<String, String>,
    view: View,
) -> ApiResult<Response> {
    let opts = watch_options(s, q, kind.info.kind).await?;
    let rx = s.registry.watch(kind.clone(), ns, who.clone(), opts);
    let stream = ReceiverStream::new(rx).map(move |ev| {
        let object = match &ev {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => match view {
                View::Table(include) => {
                    table::table(&kind, std::iter::once(&o.value), o.revision, None, include)
                }
                View::Metadata(version) => table::partial_metadata(&o.value, version),
                View::Full => {
                    let mut line =
                        format!("{{\"type\":\"{}\",\"object\":", event_type(&ev)).into_bytes();
                    line.extend_from_slice(o.json());
                    line.extend_from_slice(b"}\n");
                    return Bytes::from(line);
                }
            },
            WatchEvent::Bookmark {
                revision,
                initial_events_end,
            } => {
                let bookmark = bookmark_object(&kind, *revision, *initial_events_end);
                match view {
                    View::Metadata(version) => table::partial_metadata(&bookmark, version),
                    _ => bookmark,
                }
            }
            WatchEvent::Error(e) => e.status(),
        };
        event_line(event_type(&ev), &object)
    });
    Ok(watch_response(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_recorded_under_its_field_manager_or_its_user_agent() {
        let long = "m".repeat(MAX_FIELD_MANAGER + 1);
        // (fieldManager, User-Agent, the manager or why it is refused)
        type Row<'a> = (Option<&'a str>, Option<&'a str>, Result<&'a str, &'a str>);
        let rows: &[Row] = &[
            (
                Some("argo"),
                Some("kubectl/v1.32.4 (linux/amd64)"),
                Ok("argo"),
            ),
            (None, Some("kubectl/v1.32.4 (linux/amd64)"), Ok("kubectl")),
            (Some(""), Some("kube-rs/0.99"), Ok("kube-rs")),
            (None, Some("curl"), Ok("curl")),
            (None, None, Ok("")),
            (
                Some(&long),
                None,
                Err("must be no more than 128 characters"),
            ),
            (
                Some("a\tb"),
                None,
                Err("must only contain printable characters"),
            ),
        ];
        for (given, agent, want) in rows {
            let got = field_manager(*given, *agent);
            match (want, &got) {
                (Ok(name), Ok(m)) => assert_eq!(m, name, "{given:?} {agent:?}"),
                (Err(why), Err(e)) => assert!(e.contains(why), "{given:?}: {e}"),
                _ => panic!("{given:?} {agent:?}: {got:?}, wanted {want:?}"),
            }
        }
        // A long user agent is cut, not refused.
        let agent = "u".repeat(300);
        assert_eq!(
            field_manager(None, Some(&agent)).map(|m| m.len()),
            Ok(MAX_FIELD_MANAGER)
        );
    }

    #[test]
    fn the_deprecated_orphan_dependents_stands_for_a_propagation_policy() {
        let query = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let policy = |q: &[(&str, &str)], body: Value| {
            delete_options(&query(q), &body).map(|o| o.propagation)
        };
        let none = || serde_json::json!({});
        assert_eq!(policy(&[], none()).ok(), Some(Propagation::Background));
        for yes in ["true", "1", "True", "t"] {
            assert_eq!(
                policy(&[("orphanDependents", yes)], none()).ok(),
                Some(Propagation::Orphan),
                "{yes}"
            );
        }
        assert!(policy(&[("orphanDependents", "yes")], none()).is_err());
        assert_eq!(
            policy(&[], serde_json::json!({"orphanDependents": true})).ok(),
            Some(Propagation::Orphan)
        );
        assert_eq!(
            policy(&[], serde_json::json!({"orphanDependents": false})).ok(),
            Some(Propagation::Background)
        );
        assert_eq!(
            policy(&[("propagationPolicy", "Foreground")], none()).ok(),
            Some(Propagation::Foreground)
        );
        assert!(policy(
            &[
                ("propagationPolicy", "Orphan"),
                ("orphanDependents", "false")
            ],
            none()
        )
        .is_err());
    }

    fn patch(ops: Value) -> json_patch::Patch {
        serde_json::from_value(ops).expect("valid patch")
    }

    #[test]
    fn a_watch_timeout_of_zero_or_none_is_the_default_and_any_integer_is_taken() {
        let secs = |p| watch_timeout(p).map(|d| d.as_secs()).map_err(|e| e.code);
        assert_eq!(secs(None), Ok(1800));
        assert_eq!(secs(Some("")), Ok(1800));
        assert_eq!(secs(Some("0")), Ok(1800));
        assert_eq!(secs(Some("30")), Ok(30));
        assert_eq!(secs(Some("18446744073709551615")), Ok(u64::MAX));
        assert_eq!(secs(Some("-1")), Err(400));
        assert_eq!(secs(Some("soon")), Err(400));
    }

    #[test]
    fn a_null_test_passes_on_a_missing_path_as_in_kubernetes() {
        let mut doc = json!({"metadata": {"name": "a"}});
        let p = patch(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}
        ]));
        apply_json_patch(&mut doc, &p, 1 << 20).expect("kube-rs finalizer patch applies");
        assert_eq!(doc["metadata"]["finalizers"], json!(["x"]));
    }

    #[test]
    fn a_failing_test_refuses_the_whole_patch() {
        let mut doc = json!({"metadata": {"finalizers": ["x"]}});
        let p = patch(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "remove", "path": "/metadata/finalizers"}
        ]));
        assert!(apply_json_patch(&mut doc, &p, 1 << 20).is_err());
        let p = patch(json!([{"op": "test", "path": "/metadata/finalizers", "value": ["y"]}]));
        assert!(apply_json_patch(&mut doc, &p, 1 << 20).is_err());
    }

    #[test]
    fn copies_may_add_no_more_than_the_limit() {
        let mut doc = json!({"spec": {"a": "x".repeat(100)}});
        let doubling: Vec<Value> = (0..40)
            .map(|n| json!({"op": "copy", "from": "/spec", "path": format!("/spec/c{n}")}))
            .collect();
        let p = patch(Value::Array(doubling));
        assert!(matches!(
            apply_json_patch(&mut doc, &p, 1 << 20),
            Err(JsonPatchError::Grows { limit }) if limit == 1 << 20
        ));
        let mut doc = json!({"spec": {"a": "x".repeat(100)}});
        let p = patch(json!([{"op": "copy", "from": "/spec/a", "path": "/spec/b"}]));
        apply_json_patch(&mut doc, &p, 1 << 20).expect("a small copy applies");
        assert_eq!(doc["spec"]["b"], doc["spec"]["a"]);
        assert_eq!(json_size(&doc, usize::MAX), doc.to_string().len());
    }
}
