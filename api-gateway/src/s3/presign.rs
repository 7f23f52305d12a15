//! Presigned image URLs for node agents. A node agent that boots an image stored in S3 asks
//! the gateway (with its node token) for a short-lived presigned GET URL of that one object.
//! The URL is signed with the node's S3 credential: an access key `KARRINODE<hex of the node
//! name>` whose secret is derived from the gateway's secrets key, never stored and never
//! handed out. That credential may only read objects, and only through URLs the gateway signed
//! after checking that an instance bound to the node boots from the object.

use chrono::{DateTime, Utc};

use crate::aws::sigv4::{self, CredentialScope, ParsedAuth, PathStyle, SignedRequest};

/// Prefix of node agents' S3 access keys.
pub const NODE_KEY_PREFIX: &str = "KARRINODE";

/// The account ID S3 operations see for a node's credential (no account has it: account IDs are
/// 12 digits).
pub const NODE_READER: &str = "karri-node";

/// The signed query parameter of a node's presigned URL that names the stored bytes it was
/// issued for (an [`ObjectMeta::content_id`](super::index::ObjectMeta::content_id)): an
/// object written again since does not answer it.
pub const CONTENT_PARAM: &str = crds::image::PRESIGNED_CONTENT_PARAM;

/// The access key of node `node`.
pub fn node_access_key(node: &str) -> String {
    format!("{NODE_KEY_PREFIX}{}", hex::encode_upper(node.as_bytes()))
}

/// The node an access key belongs to, if it is a node key.
pub fn node_of_key(key: &str) -> Option<String> {
    let hexed = key.strip_prefix(NODE_KEY_PREFIX)?;
    let bytes = hex::decode(hexed).ok()?;
    String::from_utf8(bytes).ok().filter(|n| !n.is_empty())
}

/// The label the secret of node `node` is derived for.
pub fn node_secret_label(node: &str) -> String {
    format!("s3-node:{node}")
}

/// An S3 location of an image: `s3://bucket/key` or `bucket/key` (not a path, not a URL); the
/// same rules as the node agent's (`crds::image::s3_location`).
pub fn parse_location(location: &str) -> Option<(&str, &str)> {
    crds::image::s3_location(location)
}

/// The path of `bucket/key`, each key segment percent-encoded as S3 clients encode it.
fn object_path(bucket: &str, key: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    let segments: Vec<String> = key
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, SET).to_string())
        .collect();
    format!("/{bucket}/{}", segments.join("/"))
}

/// A presigned GET URL of `bucket/key` at `base` (`https://host:port`, as the node reaches the
/// gateway) while it holds the bytes `content` (see [`CONTENT_PARAM`]), valid `expires_secs`
/// from `now`. Pure.
pub fn presign_get(
    base: &str,
    (bucket, key, content): (&str, &str, &str),
    region: &str,
    (access_key, secret): (&str, &str),
    now: DateTime<Utc>,
    expires_secs: u32,
) -> Option<String> {
    let host = base
        .strip_prefix("https://")
        .or_else(|| base.strip_prefix("http://"))?
        .trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return None;
    }
    let date = now.format("%Y%m%d").to_string();
    let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let scope = CredentialScope {
        date: date.clone(),
        region: region.to_string(),
        service: "s3".into(),
        terminator: "aws4_request".into(),
    };
    let credential = format!("{access_key}/{scope}");
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let query = format!(
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={}&X-Amz-Date={amz_date}&X-Amz-Expires={expires_secs}&X-Amz-SignedHeaders=host&{CONTENT_PARAM}={}",
        enc(&credential),
        enc(content)
    );
    let path = object_path(bucket, key);
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, http::HeaderValue::from_str(host).ok()?);
    let parsed = ParsedAuth {
        access_key_id: access_key.to_string(),
        scope: scope.clone(),
        signed_headers: vec!["host".into()],
        signature: String::new(),
        amz_date: amz_date.clone(),
        request_time: now,
        location: sigv4::AuthLocation::Query {
            expires_secs: expires_secs.into(),
        },
        security_token: None,
    };
    let request = SignedRequest {
        method: "GET",
        path: &path,
        query: &query,
        headers: &headers,
        payload_hash: "UNSIGNED-PAYLOAD",
    };
    let canonical = sigv4::canonical_request(&parsed, &request, PathStyle::S3).ok()?;
    let to_sign = sigv4::string_to_sign(&amz_date, &scope, &canonical);
    let key = sigv4::signing_key(secret, &date, region, "s3");
    let signature = sigv4::signature_hex(&key, &to_sign);
    Some(format!(
        "{}{path}?{query}&X-Amz-Signature={signature}",
        base.trim_end_matches('/')
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn node_keys_round_trip_and_other_keys_are_not_nodes() {
        assert_eq!(
            node_of_key(&node_access_key("node-1")).as_deref(),
            Some("node-1")
        );
        assert_eq!(node_of_key("AKIAIOSFODNN7EXAMPLE"), None);
        assert_eq!(node_of_key("KARRINODEzz"), None);
        assert_eq!(node_of_key(NODE_KEY_PREFIX), None);
    }

    #[test]
    fn s3_locations_are_bucket_and_key() {
        assert_eq!(
            parse_location("images/micro/disk.img"),
            Some(("images", "micro/disk.img"))
        );
        assert_eq!(
            parse_location("s3://images/disk.img"),
            Some(("images", "disk.img"))
        );
        assert_eq!(parse_location("/var/lib/images/disk.img"), None);
        assert_eq!(parse_location("https://example.com/disk.img"), None);
        assert_eq!(parse_location("images/"), None);
        assert_eq!(parse_location("Bad_Bucket/disk.img"), None);
    }

    #[test]
    fn a_presigned_url_verifies_with_the_gateways_own_verifier() {
        let now = Utc::now();
        let url = presign_get(
            "https://127.0.0.1:8773",
            ("images", "micro/disk one.img", "ab12"),
            "karri-1",
            ("KARRINODE6E6F6465", "secret"),
            now,
            300,
        )
        .unwrap();
        let rest = url.strip_prefix("https://127.0.0.1:8773").unwrap();
        let (path, query) = rest.split_once('?').unwrap();
        assert_eq!(path, "/images/micro/disk%20one.img");
        assert!(query.contains(&format!("&{CONTENT_PARAM}=ab12")), "{query}");
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, "127.0.0.1:8773".parse().unwrap());
        let request = SignedRequest {
            method: "GET",
            path,
            query,
            headers: &headers,
            payload_hash: "UNSIGNED-PAYLOAD",
        };
        let parsed = sigv4::parse(&request).unwrap().unwrap();
        let policy = sigv4::VerifyPolicy::s3("karri-1");
        sigv4::verify(&parsed, &request, "secret", now, &policy).unwrap();
        assert!(sigv4::verify(&parsed, &request, "other", now, &policy).is_err());
        // The bytes it names are signed: a node cannot point it at other ones.
        let swapped = query.replace("=ab12", "=cd34");
        let tampered = SignedRequest {
            query: &swapped,
            ..request
        };
        assert!(sigv4::verify(&parsed, &tampered, "secret", now, &policy).is_err());
    }
}
