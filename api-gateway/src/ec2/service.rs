//! The EC2 face over HTTP: read the form, verify the SigV4 signature against the access key's
//! secret, resolve the calling account, route the form to a typed action, run it on the
//! registry and answer in EC2's XML.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tracing::Instrument;

use super::error::Ec2Error;
use super::params::Params;
use super::{actions, router};
use crate::auth::Principal;
use crate::aws::credentials;
use crate::aws::sigv4::{self, SigV4Error, SignedRequest, VerifyPolicy};
use crate::body::BodyError;
use crate::http::AppState;
use crate::metrics::RequestLabels;
use crate::registry::Registry;
use crate::store;

/// Largest EC2 request body accepted (a RunInstances with 16 KiB of user data is far smaller).
pub const MAX_EC2_BODY: usize = 1024 * 1024;

/// Settings of the EC2 face.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    /// The region clients sign for, e.g. `karri-1`.
    pub region: String,
    /// Largest tolerated clock difference of a signed request.
    pub max_skew: Duration,
    /// The endpoint URL DescribeRegions shows, e.g. `https://127.0.0.1:8773`.
    pub public_url: String,
}

/// Who is calling, resolved from the access key that signed the request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The account's record name.
    pub account: String,
    /// The 12-digit account ID.
    pub account_id: String,
    /// The namespace holding the account's records.
    pub namespace: String,
    /// The user the access key belongs to.
    pub user: String,
}

impl Caller {
    /// The principal the registry checks: an account user, confined to its namespace.
    pub fn principal(&self) -> Principal {
        Principal::Account {
            user: format!("{}:{}", self.account, self.user),
            namespace: self.namespace.clone(),
        }
    }
}

/// Whether a request at `/` is an AWS (EC2) request rather than a resource-API one: it names an
/// `Action`, is a form POST, or carries a SigV4 signature.
pub fn looks_like_aws(req: &Request) -> bool {
    let query = req.uri().query().unwrap_or("");
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let sigv4 = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256"));
    form || sigv4 || query.contains("Action=") || query.contains("X-Amz-Signature=")
}

/// The axum handler of the EC2 face.
pub async fn serve(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let request_id = crate::admission::new_uuid().to_string();
    let span = tracing::info_span!("ec2", request_id = %request_id, action = tracing::field::Empty, account = tracing::field::Empty);
    handle(s, req, request_id).instrument(span).await
}

async fn handle(s: Arc<AppState>, req: Request, request_id: String) -> Response {
    let started = Instant::now();
    let (action, result) = match answer(&s, req, &request_id).await {
        Ok((action, xml)) => (action, Ok(xml)),
        Err((action, e)) => (action, Err(e)),
    };
    let code = match &result {
        Ok(_) => "200".to_string(),
        Err(e) => e.status.to_string(),
    };
    let labels = RequestLabels {
        verb: format!("ec2:{}", metric_action(&action)),
        resource: "ec2".into(),
        code,
    };
    s.metrics.requests.get_or_create(&labels).inc();
    s.metrics
        .latency
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(xml) => xml_response(StatusCode::OK, xml, &request_id),
        Err(e) => {
            if e.is_server_error() {
                tracing::error!(code = %e.code, message = %e.message, "EC2 request failed");
            } else {
                tracing::info!(code = %e.code, message = %e.message, "EC2 request refused");
            }
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            xml_response(status, e.to_xml(&request_id), &request_id)
        }
    }
}

/// The action as a metrics label: a real EC2 action name, or `unknown` for anything else, so
/// that clients cannot grow the metrics without bound.
fn metric_action(action: &str) -> &str {
    if router::SUPPORTED_ACTIONS.contains(&action) || router::UNSUPPORTED_ACTIONS.contains(&action)
    {
        action
    } else {
        "unknown"
    }
}

fn xml_response(status: StatusCode, body: String, request_id: &str) -> Response {
    let mut resp = (status, Body::from(body)).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/xml;charset=UTF-8"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-amzn-requestid", v);
    }
    resp
}

type Answer = Result<(String, String), (String, Ec2Error)>;

async fn answer(s: &AppState, req: Request, request_id: &str) -> Answer {
    let unknown = |e| ("unknown".to_string(), e);
    let (mut parts, body) = req.into_parts();
    // HTTP/2 carries the host in the `:authority` pseudo-header, not in `Host`; SigV4 signs it
    // as `host` either way.
    if !parts.headers.contains_key(header::HOST) {
        let authority = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        if let Some(authority) = authority {
            parts.headers.insert(header::HOST, authority);
        }
    }
    let body = crate::body::read_limited(body, MAX_EC2_BODY)
        .await
        .map_err(|e| {
            unknown(Ec2Error::invalid_parameter_value(match e {
                BodyError::TooLarge { limit } => {
                    format!("The request body is larger than {limit} bytes.")
                }
                BodyError::Unreadable => "The request body could not be read.".to_string(),
                BodyError::Stalled => "The request body did not arrive in time.".to_string(),
            }))
        })?;
    let query = parts.uri.query().unwrap_or("");
    let params = Params::from_request(Some(query), &body).map_err(unknown)?;
    let action = params.get("Action").unwrap_or("unknown").to_string();
    tracing::Span::current().record("action", action.as_str());
    let fail = |e| (action.clone(), e);
    let payload_hash = sigv4::payload_sha256_hex(&body);
    let signed = SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query,
        headers: &parts.headers,
        payload_hash: &payload_hash,
    };
    let caller = authenticate(s, &signed).await.map_err(fail)?;
    tracing::Span::current().record("account", caller.account.as_str());
    let request = router::route(&params).map_err(fail)?;
    if !request.ignored_params.is_empty() {
        tracing::info!(ignored = ?request.ignored_params, "EC2 parameters Karri does not act on");
    }
    let cx = actions::Cx {
        registry: &s.registry,
        caller: &caller,
        settings: &s.ec2,
        request_id,
    };
    if reads_only(&action) {
        // A Describe right after a Modify must see it: the cache catches up with etcd first.
        s.registry
            .catch_up()
            .await
            .map_err(|e| fail(actions::from_api(e)))?;
    }
    let xml = actions::run(&cx, request).await.map_err(fail)?;
    Ok((action, xml))
}

/// Whether an action only reads (Describe*, Get*): it answers from the watch cache, which must
/// first catch up with every write already acknowledged.
fn reads_only(action: &str) -> bool {
    action.starts_with("Describe") || action.starts_with("Get")
}

fn sigv4_error(e: &SigV4Error) -> Ec2Error {
    match e.aws_code() {
        "SignatureDoesNotMatch" => Ec2Error::signature_does_not_match(),
        "RequestExpired" => Ec2Error::request_expired(e.to_string()),
        "MissingAuthenticationToken" => Ec2Error::missing_authentication_token(),
        "IncompleteSignature" => Ec2Error::incomplete_signature(e.to_string()),
        code => Ec2Error::new(code.to_string(), 401, e.to_string()),
    }
}

/// Verify the signature and resolve the calling account.
async fn authenticate(s: &AppState, req: &SignedRequest<'_>) -> Result<Caller, Ec2Error> {
    let parsed = match sigv4::parse(req) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(Ec2Error::missing_authentication_token()),
        Err(e) => return Err(sigv4_error(&e)),
    };
    if parsed.security_token.is_some() {
        // Karri issues no temporary credentials, so no session token can be valid; ignoring
        // it would accept a request AWS refuses.
        return Err(Ec2Error::new(
            "AuthFailure",
            401,
            "The security token included in the request is invalid: Karri issues no temporary credentials; sign with an access key and no X-Amz-Security-Token.",
        ));
    }
    let (secret, caller) = resolve_access_key(&s.registry, &parsed.access_key_id)
        .await
        .map_err(|e| match e {
            KeyError::Unknown => Ec2Error::auth_failure(),
            KeyError::Unavailable => Ec2Error::service_unavailable(),
            KeyError::Sealed => Ec2Error::internal_error(),
        })?;
    let mut policy = VerifyPolicy::ec2(s.ec2.region.clone());
    policy.max_skew = chrono::TimeDelta::from_std(s.ec2.max_skew).unwrap_or(policy.max_skew);
    sigv4::verify(&parsed, req, &secret, chrono::Utc::now(), &policy)
        .map_err(|e| sigv4_error(&e))?;
    Ok(caller)
}

/// Why an access key does not resolve to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No such key, an inactive one, or one whose account is gone or was recreated.
    #[error("the access key is unknown or inactive")]
    Unknown,
    /// The registry could not be read.
    #[error("the registry is unavailable")]
    Unavailable,
    /// The key's secret cannot be opened with the gateway's secrets key.
    #[error("the access key's secret cannot be opened")]
    Sealed,
}

/// The secret of access key `id` and the caller it signs for (used by the EC2 and S3 faces).
pub async fn resolve_access_key(
    registry: &Registry,
    id: &str,
) -> Result<(String, Caller), KeyError> {
    let key = find_access_key(registry, id)
        .await
        .map_err(|_| KeyError::Unavailable)?
        .ok_or(KeyError::Unknown)?;
    let text = |p: &str| {
        key.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    if key.pointer("/spec/active").and_then(Value::as_bool) == Some(false) {
        return Err(KeyError::Unknown);
    }
    let account_name = text("/spec/accountName");
    let sealed = text("/status/sealedSecret");
    let context = credentials::access_key_context(id, &account_name);
    let opened = registry.open_secret(&sealed, &context).map_err(|e| {
        tracing::error!(error = %e, "an access key's secret cannot be opened");
        KeyError::Sealed
    })?;
    if opened.legacy {
        // Sealed before secrets were bound to their record: sealed again, bound, once.
        let name = text("/metadata/name");
        match registry
            .reseal_access_key(&name, &sealed, &opened.secret, &context)
            .await
        {
            Ok(()) => tracing::info!(
                access_key = id,
                "sealed an access key's secret again, bound to it"
            ),
            Err(e) => {
                tracing::warn!(access_key = id, error = %e.message, "could not seal an access key's secret again")
            }
        }
    }
    let secret = opened.secret;
    let account = find_account(registry, &account_name)
        .await
        .map_err(|_| KeyError::Unavailable)?
        .ok_or(KeyError::Unknown)?;
    let account_text = |p: &str| {
        account
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    // The key signs only for the account it was made for, not a later one of the same name.
    if account_text("/metadata/uid") != text("/status/accountUid") {
        return Err(KeyError::Unknown);
    }
    let account_id = account_text("/status/accountId");
    let namespace = account_text("/status/namespace");
    if account_id.is_empty() || namespace.is_empty() {
        return Err(KeyError::Unknown);
    }
    Ok((
        secret,
        Caller {
            account: account_name,
            account_id,
            namespace,
            user: text("/spec/userName"),
        },
    ))
}

/// The AccessKey record of an access key ID: from the watch cache, or from etcd through the
/// unique index when the cache has not seen a brand-new key yet.
async fn find_access_key(registry: &Registry, id: &str) -> crate::error::ApiResult<Option<Value>> {
    let cached = registry.cache.by_id(id).filter(|k| {
        store::plural_of_key(&k.key) == Some("accesskeys")
            && k.value
                .pointer("/status/accessKeyId")
                .and_then(Value::as_str)
                == Some(id)
    });
    if let Some(found) = cached {
        return Ok(Some(found.value.clone()));
    }
    if !registry.key_lookups.take() {
        registry.count_refused_key_lookup();
        return Err(crate::error::ApiError::unavailable(
            "too many requests with unknown access keys",
        ));
    }
    registry
        .find_by_index(&crate::admission::access_key_key(id))
        .await
}

/// An Account record by name: from the watch cache, else from etcd.
pub async fn find_account(
    registry: &Registry,
    name: &str,
) -> crate::error::ApiResult<Option<Value>> {
    let key = store::record_key("accounts", None, name);
    if let Some(found) = registry.cache.get("accounts", &key) {
        return Ok(Some(found.value.clone()));
    }
    registry.read_key(&key).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_ec2_action_names_become_metric_labels() {
        assert_eq!(metric_action("RunInstances"), "RunInstances");
        assert_eq!(metric_action("CreateVolume"), "CreateVolume");
        assert_eq!(metric_action("Frobnicate-12345"), "unknown");
        assert_eq!(metric_action(""), "unknown");
    }
}
