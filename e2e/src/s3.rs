//! A SigV4-signing S3 client for tests and benchmarks that need raw requests (many at once, or
//! to a gateway being killed) rather than the AWS CLIs: every request is signed for service
//! `s3` with the body's SHA-256, path-style.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use reqwest::Method;

/// Who signs, for which region, and the keep-alive HTTP client that sends.
pub struct Signer {
    region: String,
    identity: Identity,
    /// The HTTP client (HTTP/1.1, trusting `ca` when given).
    pub client: reqwest::Client,
}

impl Signer {
    /// A signer for a new account `account` of `gateway` (made with the admin token), with a
    /// new bucket `bucket` of it, made by the account: the signer and the bucket's URL.
    pub async fn with_bucket(
        gateway: &karri_testkit::Gateway,
        admin_token: &str,
        account: &str,
        bucket: &str,
    ) -> anyhow::Result<(Signer, String)> {
        let (_, creds) = gateway.account_with_key(admin_token, account).await?;
        let signer = Signer::new(
            "karri-1",
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(&gateway.ca_path()),
            Duration::from_secs(60),
        )?;
        let url = format!("{}/{bucket}", gateway.url());
        let made = signer
            .request(Method::PUT, &url, SignableBody::Bytes(&[]))?
            .send()
            .await?;
        anyhow::ensure!(
            made.status().is_success(),
            "CreateBucket {bucket}: {}",
            made.status()
        );
        Ok((signer, url))
    }

    /// A signer for `region` with an access key, over a client that trusts `ca` and gives up
    /// on a request after `timeout`.
    pub fn new(
        region: &str,
        access_key_id: &str,
        secret: &str,
        ca: Option<&Path>,
        timeout: Duration,
    ) -> anyhow::Result<Signer> {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(300));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(Signer {
            region: region.to_string(),
            identity: Credentials::new(access_key_id, secret, None, None, "karri-e2e").into(),
            client: b.build().context("building the HTTP client")?,
        })
    }

    /// A request of `method` to `url` with the SigV4 headers (`authorization`, `x-amz-date`,
    /// `x-amz-content-sha256`) for `body`, signed now.
    pub fn request(
        &self,
        method: Method,
        url: &str,
        body: SignableBody<'_>,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .context("SigV4 signing parameters")?
            .into();
        let signable = SignableRequest::new(method.as_str(), url, std::iter::empty(), body)?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        let (headers, _) = instructions.into_parts();
        let mut req = self.client.request(method, url);
        for h in headers {
            req = req.header(h.name(), h.value());
        }
        Ok(req)
    }
}
