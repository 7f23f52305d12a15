//! The S3 upload of `karri image register --bucket`: the image file goes into a bucket of the
//! gateway's S3 face (created when missing) as one streamed, SigV4-signed PUT whose payload
//! SHA-256 the gateway checks, with a progress bar; the Image record then names `bucket/key`,
//! which nodes fetch through presigned URLs.
//!
//! The endpoint and access key come from the environment `make up` writes into `karri.env`
//! (the AWS CLI's names): `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` or `AWS_DEFAULT_REGION` and `AWS_CA_BUNDLE`.
//!
//! [`S3Settings::from_lookup`], [`object_url`], [`bucket_url`] and [`error_code`] are pure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use indicatif::ProgressBar;
use reqwest::{Method, StatusCode};
use tokio::io::AsyncReadExt as _;

/// The region when the environment names none (`make up`'s).
pub const DEFAULT_REGION: &str = "karri-1";

/// The largest object one PUT may carry (S3's limit).
pub const MAX_PUT_BYTES: u64 = 5 << 30;

/// The user metadata that records an uploaded image's SHA-256, so a second upload of the same
/// bytes is skipped.
pub const SHA256_METADATA: &str = "x-amz-meta-sha256";

/// The SHA-256 of an empty payload.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Read size of the upload stream.
const CHUNK_BYTES: usize = 1 << 20;

/// How long connecting, and waiting for any answer or progress, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Characters of a key segment left as they are in a URL path: RFC 3986's unreserved ones, as
/// S3 clients encode keys.
const KEY_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// A variable the upload needs is not set.
    #[error("{0} is not set: source karri.env (or export the account's AWS credentials)")]
    MissingEnv(&'static str),
    /// The endpoint is not an http(s) URL.
    #[error("the S3 endpoint {0} is not an http(s) URL")]
    BadEndpoint(String),
    /// The CA bundle cannot be read.
    #[error("cannot read the CA bundle {}", .path.display())]
    CaBundle {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client cannot be built (or the CA bundle holds no certificate).
    #[error("cannot build the HTTP client for S3")]
    Client(#[source] reqwest::Error),
    /// The request could not be signed.
    #[error("cannot sign the request to {0}")]
    Sign(String),
    /// The request failed before an answer.
    #[error("{what} failed")]
    Request {
        /// The operation, e.g. `PUT s3://bucket/key`.
        what: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// S3 answered with an error.
    #[error("{what}: HTTP {status}{}{}", .code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(), .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// S3's error code, e.g. `AccessDenied`.
        code: Option<String>,
        /// S3's message.
        message: Option<String>,
    },
    /// The bucket exists and belongs to another account.
    #[error("bucket {0} belongs to another account; choose another --bucket")]
    NotOurs(String),
    /// The file is larger than one PUT may carry.
    #[error("{} is {size} bytes, more than the {MAX_PUT_BYTES} one S3 upload may carry", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Ctrl-C was pressed during the request.
    #[error("{0}: interrupted")]
    Interrupted(String),
    /// An upload stopped moving: the gateway took no bytes, or did not answer after the last,
    /// for this long.
    #[error("{what}: no progress for {seconds} s (is the gateway overloaded or stopped?)")]
    Stalled {
        /// The request.
        what: String,
        /// How long it stood still.
        seconds: u64,
    },
    /// The file cannot be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where and as whom to upload.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// The endpoint, e.g. `https://127.0.0.1:8773` (no trailing `/`).
    pub endpoint: String,
    /// The region requests are signed for.
    pub region: String,
    /// The access key ID.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// A PEM bundle of CAs to trust beside the default roots.
    pub ca_bundle: Option<PathBuf>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("ca_bundle", &self.ca_bundle)
            .finish_non_exhaustive()
    }
}

impl S3Settings {
    /// The settings from the process environment.
    pub fn from_env() -> Result<Self, S3Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The settings from `lookup` (an environment); empty values count as unset. Pure.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, S3Error> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let endpoint = get("AWS_ENDPOINT_URL_S3")
            .or_else(|| get("AWS_ENDPOINT_URL"))
            .ok_or(S3Error::MissingEnv("AWS_ENDPOINT_URL"))?;
        let parsed =
            reqwest::Url::parse(&endpoint).map_err(|_| S3Error::BadEndpoint(endpoint.clone()))?;
        if !matches!(parsed.scheme(), "http" | "https")
            || parsed.host_str().is_none()
            || parsed.query().is_some()
        {
            return Err(S3Error::BadEndpoint(endpoint));
        }
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            region: get("AWS_REGION")
                .or_else(|| get("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| DEFAULT_REGION.to_owned()),
            access_key_id: get("AWS_ACCESS_KEY_ID")
                .ok_or(S3Error::MissingEnv("AWS_ACCESS_KEY_ID"))?,
            secret_access_key: get("AWS_SECRET_ACCESS_KEY")
                .ok_or(S3Error::MissingEnv("AWS_SECRET_ACCESS_KEY"))?,
            ca_bundle: get("AWS_CA_BUNDLE").map(PathBuf::from),
        })
    }
}

/// The path-style URL of bucket `bucket` at `endpoint`. Pure.
pub fn bucket_url(endpoint: &str, bucket: &str) -> String {
    format!("{}/{bucket}", endpoint.trim_end_matches('/'))
}

/// The path-style URL of object `key` of `bucket` at `endpoint`, each key segment
/// percent-encoded as S3 clients encode them. Pure.
pub fn object_url(endpoint: &str, bucket: &str, key: &str) -> String {
    let segments: Vec<String> = key
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, KEY_SEGMENT).to_string())
        .collect();
    format!("{}/{}", bucket_url(endpoint, bucket), segments.join("/"))
}

/// The `<Code>` and `<Message>` of an S3 error answer. Pure.
pub fn error_code(body: &str) -> (Option<String>, Option<String>) {
    let element = |name: &str| {
        let (_, rest) = body.split_once(&format!("<{name}>"))?;
        let (value, _) = rest.split_once(&format!("</{name}>"))?;
        let value = value.trim();
        (!value.is_empty()).then(|| value.to_owned())
    };
    (element("Code"), element("Message"))
}

/// What [`S3Client::ensure_bucket`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketOutcome {
    /// The bucket was made now.
    Created,
    /// The account already had it.
    Existing,
}

/// An object's size and recorded SHA-256, from a HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHead {
    /// Its size in bytes.
    pub size: Option<u64>,
    /// The SHA-256 recorded in its metadata at upload, if any.
    pub sha256: Option<String>,
}

/// A SigV4-signing S3 client of one account.
pub struct S3Client {
    settings: S3Settings,
    identity: Identity,
    /// Short requests: no answer or progress within [`READ_TIMEOUT`] fails them.
    http: reqwest::Client,
    /// Uploads, watched by `put_file` instead.
    uploads: reqwest::Client,
    /// How long an upload may stand still ([`READ_TIMEOUT`]).
    stall_timeout: Duration,
}

impl S3Client {
    /// A client for `settings`, trusting its CA bundle beside the default roots.
    pub fn new(settings: S3Settings) -> Result<Self, S3Error> {
        let roots = match &settings.ca_bundle {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| S3Error::CaBundle {
                    path: path.clone(),
                    source,
                })?;
                reqwest::Certificate::from_pem_bundle(&pem).map_err(S3Error::Client)?
            }
            None => Vec::new(),
        };
        let client = |read_timeout: Option<Duration>| {
            let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
            if let Some(timeout) = read_timeout {
                builder = builder.read_timeout(timeout);
            }
            for cert in &roots {
                builder = builder.add_root_certificate(cert.clone());
            }
            builder.build().map_err(S3Error::Client)
        };
        // reqwest's read timeout runs from the start of a request until its answer, so an
        // upload gets a client without one and a watchdog of its own (`put_file`).
        let uploads = client(None)?;
        let identity = Credentials::new(
            &settings.access_key_id,
            &settings.secret_access_key,
            None,
            None,
            "karri-cli",
        )
        .into();
        Ok(Self {
            http: client(Some(READ_TIMEOUT))?,
            uploads,
            stall_timeout: READ_TIMEOUT,
            identity,
            settings,
        })
    }

    /// A request of `method` to `url` with `headers`, signed now for a payload of SHA-256
    /// `payload_sha256`.
    fn signed(
        &self,
        http: &reqwest::Client,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        payload_sha256: &str,
    ) -> Result<reqwest::RequestBuilder, S3Error> {
        let failed = || S3Error::Sign(url.to_owned());
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.settings.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|_| failed())?
            .into();
        let signable = SignableRequest::new(
            method.as_str(),
            url,
            headers.iter().copied(),
            SignableBody::Precomputed(payload_sha256.to_owned()),
        )
        .map_err(|_| failed())?;
        let (instructions, _) = sign(signable, &params).map_err(|_| failed())?.into_parts();
        let (signed_headers, _) = instructions.into_parts();
        let mut request = http.request(method, url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        for h in signed_headers {
            request = request.header(h.name(), h.value());
        }
        Ok(request)
    }

    /// Sends `request` for `what`; an error status becomes [`S3Error::Status`].
    async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, S3Error> {
        let response = request.send().await.map_err(|source| S3Error::Request {
            what: what.to_owned(),
            source,
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        let (code, message) = error_code(&body);
        Err(S3Error::Status {
            what: what.to_owned(),
            status,
            code,
            message,
        })
    }

    /// Creates `bucket` unless the account has it already.
    pub async fn ensure_bucket(&self, bucket: &str) -> Result<BucketOutcome, S3Error> {
        let url = bucket_url(&self.settings.endpoint, bucket);
        let what = format!("creating bucket {bucket}");
        let request = self
            .signed(&self.http, Method::PUT, &url, &[], EMPTY_SHA256)?
            .header(reqwest::header::CONTENT_LENGTH, "0");
        match self.send(&what, request).await {
            Ok(_) => Ok(BucketOutcome::Created),
            Err(S3Error::Status { code, .. })
                if code.as_deref() == Some("BucketAlreadyOwnedByYou") =>
            {
                Ok(BucketOutcome::Existing)
            }
            Err(S3Error::Status { code, .. }) if code.as_deref() == Some("BucketAlreadyExists") => {
                Err(S3Error::NotOurs(bucket.to_owned()))
            }
            Err(e) => Err(e),
        }
    }

    /// The size and recorded SHA-256 of `bucket/key`; `None` if there is no such object.
    pub async fn head_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectHead>, S3Error> {
        let url = object_url(&self.settings.endpoint, bucket, key);
        let what = format!("HEAD s3://{bucket}/{key}");
        let request = self.signed(&self.http, Method::HEAD, &url, &[], EMPTY_SHA256)?;
        let response = request.send().await.map_err(|source| S3Error::Request {
            what: what.clone(),
            source,
        })?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                Ok(Some(ObjectHead {
                    size: header("content-length").and_then(|v| v.parse().ok()),
                    sha256: header(SHA256_METADATA),
                }))
            }
            s => Err(S3Error::Status {
                what,
                status: s.as_u16(),
                code: None,
                message: None,
            }),
        }
    }

    /// Uploads `path` (`size` bytes of SHA-256 `sha256`) as `bucket/key` in one streamed PUT,
    /// advancing `progress` as bytes are read. The gateway refuses the object if what it
    /// receives does not hash to `sha256` (the file changed meanwhile).
    pub async fn put_file(
        &self,
        (bucket, key): (&str, &str),
        path: &Path,
        (size, sha256): (u64, &str),
        progress: ProgressBar,
    ) -> Result<(), S3Error> {
        if size > MAX_PUT_BYTES {
            return Err(S3Error::TooLarge {
                path: path.to_owned(),
                size,
            });
        }
        let read_error = |source| S3Error::Read {
            path: path.to_owned(),
            source,
        };
        let file = tokio::fs::File::open(path).await.map_err(read_error)?;
        // When the gateway last took a chunk (or, once all is sent, when the last was taken).
        let moved = Arc::new(Mutex::new(Instant::now()));
        let mark = moved.clone();
        let body = futures::stream::try_unfold((file, progress), move |(mut file, progress)| {
            let mark = mark.clone();
            async move {
                if crate::interrupt::interrupted() {
                    return Err(std::io::Error::other("interrupted"));
                }
                let mut chunk = vec![0u8; CHUNK_BYTES];
                let n = file.read(&mut chunk).await?;
                *mark.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
                if n == 0 {
                    return Ok::<_, std::io::Error>(None);
                }
                chunk.truncate(n);
                progress.inc(n as u64);
                Ok(Some((chunk, (file, progress))))
            }
        });
        let url = object_url(&self.settings.endpoint, bucket, key);
        let what = format!("PUT s3://{bucket}/{key}");
        let headers = [
            ("content-type", "application/octet-stream"),
            (SHA256_METADATA, sha256),
        ];
        let request = self
            .signed(&self.uploads, Method::PUT, &url, &headers, sha256)?
            .header(reqwest::header::CONTENT_LENGTH, size.to_string())
            .body(reqwest::Body::wrap_stream(body));
        // However long the upload, the gateway must keep taking bytes, and answer within
        // READ_TIMEOUT of the last one.
        let watchdog = async {
            loop {
                let last = *moved.lock().unwrap_or_else(PoisonError::into_inner);
                let deadline = last + self.stall_timeout;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline.into()).await;
            }
        };
        tokio::select! {
            sent = self.send(&what, request) => sent.map(|_| ()),
            () = watchdog => Err(S3Error::Stalled {
                what,
                seconds: self.stall_timeout.as_secs(),
            }),
            () = crate::interrupt::pressed() => Err(S3Error::Interrupted(what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const KEYS: [(&str, &str); 2] = [
        ("AWS_ACCESS_KEY_ID", "AKIKEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
    ];

    /// A stand-in S3 endpoint that reads one request's body at `bytes_per_second` (`None`:
    /// not at all) and then answers 200.
    async fn endpoint_reading_at(bytes_per_second: Option<usize>) -> String {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback has a free port");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let Some(rate) = bytes_per_second else {
                std::future::pending::<()>().await;
                return;
            };
            // Headers and body alike, a tenth of the rate every 100 ms until the client is done.
            let mut buf = vec![0u8; rate / 10];
            let mut seen = Vec::new();
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
                if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if seen.len() - end - 4 >= length {
                        let _ = socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        format!("http://{addr}")
    }

    fn upload_client(endpoint: String, stall: Duration) -> S3Client {
        let mut client = S3Client::new(S3Settings {
            endpoint,
            region: "karri-1".into(),
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: "secret".into(),
            ca_bundle: None,
        })
        .expect("a client");
        client.stall_timeout = stall;
        client
    }

    fn file_of(size: usize) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::io::Write::write_all(&mut file, &vec![1u8; size]).expect("written");
        file
    }

    #[tokio::test]
    async fn an_upload_slower_than_the_stall_timeout_but_moving_succeeds() {
        // 64 MiB at 12 MiB/s: about 5 s, more than the stall timeout, never still for long
        // (the socket buffers the stand-in drains after the last chunk take well under it).
        let size = 64 << 20;
        let file = file_of(size);
        let client = upload_client(
            endpoint_reading_at(Some(12 << 20)).await,
            Duration::from_secs(3),
        );
        let sha = "0".repeat(64);
        let sent = client
            .put_file(
                ("b", "k"),
                file.path(),
                (size as u64, &sha),
                ProgressBar::hidden(),
            )
            .await;
        assert!(sent.is_ok(), "{sent:?}");
    }

    #[tokio::test]
    async fn an_upload_the_gateway_stops_taking_fails_as_stalled() {
        let size = 24 << 20;
        let file = file_of(size);
        let client = upload_client(endpoint_reading_at(None).await, Duration::from_secs(1));
        let sha = "0".repeat(64);
        let sent = tokio::time::timeout(
            Duration::from_secs(30),
            client.put_file(
                ("b", "k"),
                file.path(),
                (size as u64, &sha),
                ProgressBar::hidden(),
            ),
        )
        .await
        .expect("the watchdog ends it");
        assert!(matches!(sent, Err(S3Error::Stalled { .. })), "{sent:?}");
    }

    #[test]
    fn settings_come_from_the_aws_environment_of_karri_env() {
        let vars = [
            KEYS[0],
            KEYS[1],
            ("AWS_ENDPOINT_URL", "https://127.0.0.1:8773/"),
            ("AWS_DEFAULT_REGION", "karri-2"),
            ("AWS_CA_BUNDLE", "/state/pki/ca.crt"),
        ];
        let s = S3Settings::from_lookup(env(&vars)).expect("complete");
        assert_eq!(s.endpoint, "https://127.0.0.1:8773");
        assert_eq!(s.region, "karri-2");
        assert_eq!(s.access_key_id, "AKIKEXAMPLE");
        assert_eq!(s.secret_access_key, "secret");
        assert_eq!(s.ca_bundle, Some(PathBuf::from("/state/pki/ca.crt")));
        assert!(!format!("{s:?}").contains("secret"), "{s:?}");
    }

    #[test]
    fn the_s3_endpoint_and_aws_region_win_and_the_region_defaults_to_karri_1() {
        let vars = [
            KEYS[0],
            KEYS[1],
            ("AWS_ENDPOINT_URL", "https://127.0.0.1:8773"),
            (
                "AWS_ENDPOINT_URL_S3",
                "https://s3.example:9000/services/objectstorage",
            ),
            ("AWS_REGION", "eu-1"),
            ("AWS_DEFAULT_REGION", "karri-2"),
        ];
        let s = S3Settings::from_lookup(env(&vars)).expect("complete");
        assert_eq!(s.endpoint, "https://s3.example:9000/services/objectstorage");
        assert_eq!(s.region, "eu-1");
        let bare = [
            KEYS[0],
            KEYS[1],
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:8773"),
        ];
        let s = S3Settings::from_lookup(env(&bare)).expect("complete");
        assert_eq!(s.region, DEFAULT_REGION);
        assert_eq!(s.ca_bundle, None);
    }

    #[test]
    fn missing_or_bad_settings_are_named() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&KEYS, "AWS_ENDPOINT_URL is not set"),
            (
                &[KEYS[0], ("AWS_ENDPOINT_URL", "https://gw")],
                "AWS_SECRET_ACCESS_KEY is not set",
            ),
            (
                &[
                    KEYS[1],
                    ("AWS_ENDPOINT_URL", "https://gw"),
                    ("AWS_ACCESS_KEY_ID", ""),
                ],
                "AWS_ACCESS_KEY_ID is not set",
            ),
            (
                &[KEYS[0], KEYS[1], ("AWS_ENDPOINT_URL", "ftp://gw")],
                "ftp://gw is not an http(s) URL",
            ),
            (
                &[KEYS[0], KEYS[1], ("AWS_ENDPOINT_URL", "gw:8773")],
                "gw:8773 is not an http(s) URL",
            ),
        ];
        for (vars, want) in cases {
            let err = S3Settings::from_lookup(env(vars)).expect_err("incomplete");
            assert!(err.to_string().contains(want), "{err} should say {want}");
        }
    }

    #[test]
    fn object_urls_are_path_style_with_each_key_segment_encoded() {
        let cases = [
            (
                "https://gw:8773",
                "images",
                "disk.img",
                "https://gw:8773/images/disk.img",
            ),
            (
                "https://gw:8773/",
                "images",
                "micro/disk.img",
                "https://gw:8773/images/micro/disk.img",
            ),
            (
                "https://gw/services/objectstorage",
                "images",
                "a b+c/d~e_f.raw",
                "https://gw/services/objectstorage/images/a%20b%2Bc/d~e_f.raw",
            ),
            (
                "https://gw",
                "images",
                "ü=1",
                "https://gw/images/%C3%BC%3D1",
            ),
        ];
        for (endpoint, bucket, key, want) in cases {
            assert_eq!(object_url(endpoint, bucket, key), want, "{key}");
        }
        assert_eq!(bucket_url("https://gw/", "images"), "https://gw/images");
    }

    #[test]
    fn s3_error_answers_give_their_code_and_message() {
        let body = "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
        assert_eq!(
            error_code(body),
            (Some("AccessDenied".into()), Some("Access Denied".into()))
        );
        assert_eq!(error_code(""), (None, None));
        assert_eq!(error_code("<Error><Code></Code></Error>"), (None, None));
    }
}
