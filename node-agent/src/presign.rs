//! Presigned URLs of images stored in S3. An instance's artifact may live in the gateway's S3
//! face (`s3://bucket/key` or `bucket/key`, see [`crds::image::s3_location`]); the node has no
//! S3 credential of its own, so the image cache asks the gateway, with the node's token, for a
//! short-lived presigned GET URL of that one object (`GET /karri/v1/image-url`). The gateway
//! answers only for locations an instance bound to this node boots from, and signs the URL for
//! the host the node reaches it at, `base`.
//!
//! [`request_path`], [`gateway_base`] and [`url_of_answer`] are pure; [`GatewayPresigner`] asks
//! the gateway through the node's kube client.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use serde_json::Value;
use tracing::{info, info_span, Instrument};

/// The gateway's endpoint of presigned image URLs.
pub const IMAGE_URL_PATH: &str = "/karri/v1/image-url";

/// How long the gateway may take to answer, unless [`GatewayPresigner::with_timeout`] says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Characters left as they are in a query value: RFC 3986's unreserved ones.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why no presigned URL was had.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PresignError {
    /// The gateway answered with an error status, e.g. 403 when no instance of this node boots
    /// from the location.
    #[error("the gateway refused it with HTTP status {status}: {message}")]
    Refused {
        /// The HTTP status code.
        status: u16,
        /// The gateway's message.
        message: String,
    },
    /// The request did not reach the gateway, or its answer could not be read.
    #[error("the gateway cannot be asked")]
    Request {
        /// The client's error.
        #[source]
        source: Arc<kube::Error>,
    },
    /// The gateway did not answer in time.
    #[error("the gateway did not answer within {0:?}")]
    Timeout(Duration),
    /// The gateway answered 2xx without a usable URL.
    #[error("the gateway's answer holds no http(s) URL: {0}")]
    BadAnswer(String),
    /// The kube client's server URL is no `http(s)://host[:port]` a URL can be signed for.
    #[error("the gateway's URL {0} has no http(s) origin to sign a URL for")]
    NoBase(String),
}

/// Asks for a presigned GET URL of an S3 location. The image cache holds one.
pub trait Presign: Send + Sync {
    /// A URL that GETs the object of `location` (as the instance's launch spells it), for
    /// instance `instance` (`<namespace>/<name>`) when named: the gateway then answers only if
    /// that instance's image owner may read it. Unnamed, for any instance of the node.
    fn presign<'a>(
        &'a self,
        location: &'a str,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, PresignError>>;
}

/// Any function from a location and instance to a future URL presigns (for tests and other
/// callers).
impl<F> Presign for F
where
    F: Fn(String, Option<String>) -> BoxFuture<'static, Result<String, PresignError>> + Send + Sync,
{
    fn presign<'a>(
        &'a self,
        location: &'a str,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, PresignError>> {
        self(location.to_owned(), instance.map(str::to_owned))
    }
}

/// The path and query of the gateway's presigned URL of `location` at `base`, for `instance`
/// when named. Pure.
pub fn request_path(location: &str, base: &str, instance: Option<&str>) -> String {
    let enc = |s| percent_encoding::utf8_percent_encode(s, QUERY_VALUE);
    let mut path = format!(
        "{IMAGE_URL_PATH}?location={}&base={}",
        enc(location),
        enc(base)
    );
    if let Some(instance) = instance {
        path.push_str(&format!("&instance={}", enc(instance)));
    }
    path
}

/// The origin (`scheme://host[:port]`, the default port left out as an HTTP client leaves it out
/// of `Host`) of the gateway's URL `server`, which the presigned URL is signed for. Pure.
pub fn gateway_base(server: &str) -> Option<String> {
    let url = reqwest::Url::parse(server).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    Some(url.origin().ascii_serialization())
}

/// The URL in the gateway's answer `{"url": …, "expiresAt": …}`. Pure.
pub fn url_of_answer(answer: &Value) -> Result<String, PresignError> {
    match answer.get("url").and_then(Value::as_str) {
        Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
            Ok(url.to_owned())
        }
        _ => Err(PresignError::BadAnswer(answer.to_string())),
    }
}

/// Asks the gateway the node's kube client talks to.
#[derive(Clone)]
pub struct GatewayPresigner {
    client: kube::Client,
    server: String,
    timeout: Duration,
}

impl std::fmt::Debug for GatewayPresigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayPresigner")
            .field("server", &self.server)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl GatewayPresigner {
    /// Asks through `client`, whose server URL (the kubeconfig's) is `server`: the URLs are
    /// signed for that URL's host, which this node reaches.
    pub fn new(client: kube::Client, server: String) -> Self {
        Self {
            client,
            server,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets how long the gateway may take to answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn ask(&self, location: &str, instance: Option<&str>) -> Result<String, PresignError> {
        let base =
            gateway_base(&self.server).ok_or_else(|| PresignError::NoBase(self.server.clone()))?;
        let request = http::Request::get(request_path(location, &base, instance))
            .body(Vec::new())
            .map_err(|e| PresignError::Request {
                source: Arc::new(kube::Error::HttpError(e)),
            })?;
        let answer = tokio::time::timeout(self.timeout, self.client.request::<Value>(request))
            .await
            .map_err(|_| PresignError::Timeout(self.timeout))?
            .map_err(|e| match e {
                kube::Error::Api(status) => PresignError::Refused {
                    status: status.code,
                    message: status.message.clone(),
                },
                other => PresignError::Request {
                    source: Arc::new(other),
                },
            })?;
        let url = url_of_answer(&answer)?;
        let expires_at = answer
            .get("expiresAt")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        info!(expires_at, "the gateway issued a presigned URL");
        Ok(url)
    }
}

impl Presign for GatewayPresigner {
    fn presign<'a>(
        &'a self,
        location: &'a str,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, PresignError>> {
        let span = info_span!("presign", %location, instance = instance.unwrap_or("any"));
        self.ask(location, instance).instrument(span).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_location_and_base_percent_encoded() {
        let cases = [
            (
                "images/micro/disk.img",
                "https://127.0.0.1:6443",
                "/karri/v1/image-url?location=images%2Fmicro%2Fdisk.img&base=https%3A%2F%2F127.0.0.1%3A6443",
            ),
            (
                "s3://images/a b+c&d=e.img",
                "https://gw.example",
                "/karri/v1/image-url?location=s3%3A%2F%2Fimages%2Fa%20b%2Bc%26d%3De.img&base=https%3A%2F%2Fgw.example",
            ),
            (
                "images/k~_-.raw",
                "http://[::1]:8773",
                "/karri/v1/image-url?location=images%2Fk~_-.raw&base=http%3A%2F%2F%5B%3A%3A1%5D%3A8773",
            ),
        ];
        for (location, base, want) in cases {
            assert_eq!(
                request_path(location, base, None),
                want,
                "{location} at {base}"
            );
        }
        // An instance named is asked about alone.
        assert_eq!(
            request_path("images/x.img", "https://gw", Some("acme/web-1")),
            "/karri/v1/image-url?location=images%2Fx.img&base=https%3A%2F%2Fgw&instance=acme%2Fweb-1"
        );
    }

    #[test]
    fn the_base_is_the_origin_of_the_gateways_url() {
        let cases = [
            ("https://127.0.0.1:6443", Some("https://127.0.0.1:6443")),
            ("https://127.0.0.1:6443/", Some("https://127.0.0.1:6443")),
            (
                "https://gw.example:6443/some/prefix",
                Some("https://gw.example:6443"),
            ),
            ("https://gw.example:443/", Some("https://gw.example")),
            ("http://gw.example:80", Some("http://gw.example")),
            ("https://[::1]:6443/", Some("https://[::1]:6443")),
            ("https://GW.Example:6443", Some("https://gw.example:6443")),
            ("unix:///run/gateway.sock", None),
            ("not a url", None),
        ];
        for (server, want) in cases {
            assert_eq!(gateway_base(server).as_deref(), want, "{server}");
        }
    }

    #[test]
    fn the_answer_must_hold_an_http_url() {
        let url = "https://127.0.0.1:6443/images/disk.img?X-Amz-Signature=ab";
        assert_eq!(
            url_of_answer(&serde_json::json!({"url": url, "expiresAt": "x"})).ok(),
            Some(url.to_owned())
        );
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"url": 3}),
            serde_json::json!({"url": "file:///etc/shadow"}),
            serde_json::json!({"url": "/images/disk.img"}),
        ] {
            assert!(
                matches!(url_of_answer(&bad), Err(PresignError::BadAnswer(_))),
                "{bad}"
            );
        }
    }
}
