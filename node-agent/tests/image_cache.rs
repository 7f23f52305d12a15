//! The image cache against real files, a real loopback HTTP server and the real `qemu-img`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use futures::future::join_all;
use futures::future::BoxFuture;
use futures::FutureExt as _;
use node_agent::domain::DiskFormat;
use node_agent::images::{CacheError, ImageCache, ImageSource};
use node_agent::presign::{Presign, PresignError};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// A loopback HTTP server serving one image at `/image`, counting requests; `/image` answers
/// only once released.
struct ImageServer {
    base: String,
    requests: Arc<AtomicUsize>,
    arrived: Arc<Notify>,
    release: watch::Sender<bool>,
}

impl ImageServer {
    async fn start(body: Vec<u8>, released: bool) -> Self {
        let requests = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(Notify::new());
        let (release, released_rx) = watch::channel(released);
        let handler = {
            let (requests, arrived) = (requests.clone(), arrived.clone());
            move || {
                let (requests, arrived, mut released_rx, body) = (
                    requests.clone(),
                    arrived.clone(),
                    released_rx.clone(),
                    body.clone(),
                );
                async move {
                    requests.fetch_add(1, Ordering::SeqCst);
                    arrived.notify_one();
                    released_rx
                        .wait_for(|released| *released)
                        .await
                        .expect("the test holds the sender");
                    body
                }
            }
        };
        let no_such_key = || async {
            (
                axum::http::StatusCode::NOT_FOUND,
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code>\
                 <Message>The specified key does not exist.</Message></Error>",
            )
        };
        let router = Router::new()
            .route("/image", get(handler))
            .route("/images/gone.img", get(no_such_key));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            base: format!("http://{addr}"),
            requests,
            arrived,
            release,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn sha_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn raw(location: String, sha256: Option<String>) -> ImageSource {
    ImageSource {
        location,
        sha256,
        format: DiskFormat::Raw,
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("the directory exists")
        .map(|e| {
            e.expect("listable")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn assert_nothing_cached(cache_dir: &Path) {
    assert!(
        names(&cache_dir.join("sha256")).is_empty(),
        "sha256/ holds nothing"
    );
    assert!(
        names(&cache_dir.join("tmp")).is_empty(),
        "tmp/ holds nothing"
    );
}

#[tokio::test]
async fn five_concurrent_gets_of_an_uncached_url_make_one_request() {
    let body = b"a disk image served once".to_vec();
    let server = ImageServer::start(body.clone(), false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20).expect("open");
    let source = raw(server.url("/image"), Some(sha_of(&body)));

    // The server holds its answer until the first request has arrived; by then all five gets
    // have been polled once and have found the fetch in flight.
    let (results, ()) = tokio::join!(join_all((0..5).map(|_| cache.get(&source))), async {
        server.arrived.notified().await;
        server.release.send_replace(true);
    });

    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    let images: Vec<_> = results.into_iter().map(|r| r.expect("get")).collect();
    assert!(images
        .iter()
        .all(|i| i.path == images[0].path && i.sha256 == sha_of(&body)));
    assert_eq!(names(&dir.path().join("sha256")), vec![sha_of(&body)]);
    assert!(names(&dir.path().join("tmp")).is_empty());
    cache.get(&source).await.expect("a later get is a hit");
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn two_concurrent_gets_of_a_local_image_publish_one_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("image.raw");
    std::fs::write(&src, vec![7u8; 3 << 20]).expect("write");
    let cache_dir = dir.path().join("cache");
    let cache = ImageCache::open(cache_dir.clone(), 1 << 30).expect("open");
    let source = raw(src.to_str().expect("UTF-8").to_owned(), None);

    let (a, b) = tokio::join!(cache.get(&source), cache.get(&source));

    let (a, b) = (a.expect("first get"), b.expect("second get"));
    assert_eq!(a.path, b.path);
    assert_eq!(names(&cache_dir.join("sha256")), vec![a.sha256.clone()]);
    assert!(names(&cache_dir.join("tmp")).is_empty());
    assert_eq!(cache.size(), 3 << 20);
}

#[tokio::test]
async fn an_http_error_status_is_reported_with_its_status_and_caches_nothing() {
    let server = ImageServer::start(Vec::new(), true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20).expect("open");

    let err = cache
        .get(&raw(server.url("/missing"), None))
        .await
        .expect_err("not found");

    assert!(
        matches!(&err, CacheError::HttpStatus { status: 404, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("404"), "{err}");
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn a_checksum_mismatch_over_http_leaves_no_partial_file() {
    let server = ImageServer::start(b"not what was declared".to_vec(), true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20).expect("open");

    let err = cache
        .get(&raw(server.url("/image"), Some(sha_of(b"declared"))))
        .await
        .expect_err("mismatch");

    assert!(
        matches!(&err, CacheError::ChecksumMismatch { actual, .. } if *actual == sha_of(b"not what was declared"))
    );
    assert_nothing_cached(dir.path());
    assert_eq!(cache.size(), 0);
}

#[tokio::test]
async fn a_server_that_accepts_and_never_answers_fails_after_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_timeouts(Duration::from_secs(5), Duration::from_millis(200))
        .expect("client");

    let err = cache
        .get(&raw(format!("http://{addr}/image"), None))
        .await
        .expect_err("stalled");

    assert!(
        matches!(&err, CacheError::Stalled { idle, .. } if *idle == Duration::from_millis(200)),
        "{err}"
    );
    assert_nothing_cached(dir.path());
}

/// The next connection to `listener`, its request head read.
async fn accept_one_request(listener: &TcpListener) -> tokio::net::TcpStream {
    let (mut socket, _) = listener.accept().await.expect("accept");
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.expect("read the request");
        request.extend_from_slice(&buf[..n]);
    }
    socket
}

#[tokio::test]
async fn a_server_that_stalls_mid_body_leaves_no_partial_file() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        let mut socket = accept_one_request(&listener).await;
        socket
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst bytes")
            .await
            .expect("write");
        std::future::pending::<()>().await;
        drop(socket);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_timeouts(Duration::from_secs(5), Duration::from_millis(200))
        .expect("client");

    let err = cache
        .get(&raw(format!("http://{addr}/image"), None))
        .await
        .expect_err("stalled");

    assert!(matches!(&err, CacheError::Stalled { .. }), "{err}");
    assert_nothing_cached(dir.path());
}

/// A server that answers `head` and then `piece` of body every `every`, for ever.
async fn trickling_server(head: &'static [u8], piece: &'static [u8], every: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        let mut socket = accept_one_request(&listener).await;
        if socket.write_all(head).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if socket.write_all(piece).await.is_err() {
                return;
            }
        }
    });
    format!("http://{addr}/image")
}

#[tokio::test]
async fn a_server_that_trickles_bytes_fails_the_fetch_as_too_slow() {
    // A byte before every idle timeout: never a stall, but hours for a real image.
    let url = trickling_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n",
        b"x",
        Duration::from_millis(100),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 30)
        .expect("open")
        .with_timeouts(Duration::from_secs(5), Duration::from_millis(500))
        .expect("client");

    let err = tokio::time::timeout(Duration::from_secs(30), cache.get(&raw(url, None)))
        .await
        .expect("the fetch ended")
        .expect_err("too slow");

    assert!(matches!(&err, CacheError::TooSlow { .. }), "{err}");
    assert!(!err.is_permanent());
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn an_image_larger_than_the_cache_is_refused_for_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20).expect("open");
    // Announced too large: refused before any byte is stored.
    let url = trickling_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2097152\r\n\r\n",
        b"x",
        Duration::from_millis(10),
    )
    .await;
    let err = cache.get(&raw(url, None)).await.expect_err("too large");
    assert!(matches!(&err, CacheError::TooLarge { .. }), "{err}");
    assert!(err.is_permanent());
    // Sent without a length, endlessly: stopped at the limit.
    let url = trickling_server(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        &[7u8; 64 * 1024],
        Duration::from_millis(1),
    )
    .await;
    let err = cache.get(&raw(url, None)).await.expect_err("too large");
    assert!(matches!(&err, CacheError::TooLarge { .. }), "{err}");
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn a_refused_connection_is_an_http_error_naming_the_url() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "http://{}/image",
        listener.local_addr().expect("local address")
    );
    drop(listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20).expect("open");

    let err = cache
        .get(&raw(url.clone(), None))
        .await
        .expect_err("refused");

    assert!(
        matches!(&err, CacheError::Http { location, .. } if *location == url),
        "{err}"
    );
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn an_overlay_over_an_image_fetched_over_http_names_it_as_backing_file() {
    let body = vec![0u8; 1 << 20];
    let server = ImageServer::start(body.clone(), true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().join("cache"), 1 << 30).expect("open");
    let base = cache
        .get(&raw(server.url("/image"), Some(sha_of(&body))))
        .await
        .expect("get");
    let overlay = dir.path().join("i-0123456789abcdef0.qcow2");

    cache
        .create_overlay(&base, &overlay)
        .await
        .expect("create the overlay");

    let output = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .expect("qemu-img runs");
    assert!(output.status.success());
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"], base.path.to_str().expect("UTF-8"));
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], 1 << 20);
    cache
        .create_overlay(&base, &overlay)
        .await
        .expect("creating it again is a no-op");
}

/// What a [`FakePresigner`] answers for a location.
type Answer = Box<dyn Fn(&str) -> Result<String, PresignError> + Send + Sync>;

/// A presigner standing in for the gateway: records the locations it is asked for and answers
/// `answer(location)`.
struct FakePresigner {
    asked: std::sync::Mutex<Vec<String>>,
    answer: Answer,
}

impl FakePresigner {
    fn new(
        answer: impl Fn(&str) -> Result<String, PresignError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            asked: std::sync::Mutex::new(Vec::new()),
            answer: Box::new(answer),
        })
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("not poisoned").clone()
    }
}

impl Presign for FakePresigner {
    fn presign<'a>(
        &'a self,
        location: &'a str,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, PresignError>> {
        self.asked
            .lock()
            .expect("not poisoned")
            .push(match instance {
                Some(i) => format!("{location} for {i}"),
                None => location.to_owned(),
            });
        let answer = (self.answer)(location);
        async move { answer }.boxed()
    }
}

/// What a presigned URL's query looks like: its signature must never reach an error message.
const SIGNATURE: &str = "X-Amz-Signature=0123456789abcdef";

#[tokio::test]
async fn three_concurrent_gets_of_an_s3_object_ask_for_one_url_and_fetch_once() {
    let body = b"a disk image in a bucket".to_vec();
    let server = ImageServer::start(body.clone(), false).await;
    let url = server.url(&format!("/image?{SIGNATURE}"));
    let presigner = FakePresigner::new(move |_| Ok(url.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_presigner(presigner.clone());
    let source = raw("images/micro/disk.img".to_owned(), Some(sha_of(&body)));

    // The server holds its answer until the first request arrives, so the three gets overlap.
    let (results, ()) = tokio::join!(join_all((0..3).map(|_| cache.get(&source))), async {
        server.arrived.notified().await;
        server.release.send_replace(true);
    });

    for result in results {
        let image = result.expect("get");
        assert_eq!(image.sha256, sha_of(&body));
        assert_eq!(std::fs::read(&image.path).expect("read"), body);
    }
    assert_eq!(presigner.asked(), vec!["images/micro/disk.img".to_owned()]);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    assert_eq!(names(&dir.path().join("sha256")), vec![sha_of(&body)]);
    assert!(names(&dir.path().join("tmp")).is_empty());
    cache.get(&source).await.expect("a later get is a hit");
    assert_eq!(presigner.asked().len(), 1, "a hit asks for no URL");
}

#[tokio::test]
async fn an_s3_image_cached_from_one_object_is_no_hit_for_another_object_claiming_its_checksum() {
    let theirs = b"another account's private disk".to_vec();
    let mine = b"the caller's own disk".to_vec();
    let their_server = ImageServer::start(theirs.clone(), true).await;
    let my_server = ImageServer::start(mine.clone(), true).await;
    let (their_url, my_url) = (
        their_server.url(&format!("/image?{SIGNATURE}")),
        my_server.url(&format!("/image?{SIGNATURE}")),
    );
    let presigner = FakePresigner::new(move |location| {
        Ok(if location == "theirs/disk.img" {
            their_url.clone()
        } else {
            my_url.clone()
        })
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_presigner(presigner.clone());
    cache
        .get(&raw("theirs/disk.img".to_owned(), Some(sha_of(&theirs))))
        .await
        .expect("their image is fetched");

    // An image record naming the caller's own object with their checksum: the object is
    // fetched, and its bytes do not match, rather than their cached disk being handed out.
    let claim = raw("mine/disk.img".to_owned(), Some(sha_of(&theirs)));
    let err = cache.get(&claim).await.expect_err("not their disk");
    assert!(
        matches!(&err, CacheError::ChecksumMismatch { actual, .. } if *actual == sha_of(&mine)),
        "{err:?}"
    );
    assert_eq!(my_server.requests.load(Ordering::SeqCst), 1);
    // The same object again is a hit, from where it was fetched.
    cache
        .get(&raw("theirs/disk.img".to_owned(), Some(sha_of(&theirs))))
        .await
        .expect("a hit");
    assert_eq!(their_server.requests.load(Ordering::SeqCst), 1);
    // An instance that launched from that checksum uses the copy, wherever it came from.
    cache.get_pinned(&claim).await.expect("a pinned hit");
    assert_eq!(my_server.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn stored_s3_bytes_fetched_once_are_a_hit_for_later_instances_and_after_a_restart() {
    let body = b"a disk image an account registered from its bucket".to_vec();
    let server = ImageServer::start(body.clone(), true).await;
    let url = |content: &str| {
        server.url(&format!(
            "/image?x-karri-object-content={content}&{SIGNATURE}"
        ))
    };
    let presigner = FakePresigner::new(|location| Ok(format!("http://127.0.0.1:9/{location}")));
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        ImageCache::open(dir.path().to_path_buf(), 1 << 20)
            .expect("open")
            .with_presigner(presigner.clone())
    };
    // An image registered through EC2 declares no checksum.
    let source = raw("mine/disk.img".to_owned(), None);
    let cache = open();
    let first = cache
        .get_authorized(&source, Some(url("c1")))
        .await
        .expect("fetched");
    assert_eq!(first.sha256, sha_of(&body));
    cache
        .get_authorized(&source, Some(url("c1")))
        .await
        .expect("a hit");
    assert_eq!(server.requests.load(Ordering::SeqCst), 1, "one fetch");
    // The cache opened again (the agent restarted) still knows those bytes.
    drop(cache);
    let cache = open();
    let again = cache
        .get_authorized(&source, Some(url("c1")))
        .await
        .expect("a hit after a restart");
    assert_eq!(again.sha256, sha_of(&body));
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        1,
        "no fetch after a restart"
    );
    // The object written again is other stored bytes: fetched.
    cache
        .get_authorized(&source, Some(url("c2")))
        .await
        .expect("fetched again");
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    // Known bytes are no hit for a record declaring another checksum: what the fetch finds
    // decides, and it is a mismatch.
    let claim = raw("mine/disk.img".to_owned(), Some(sha_of(b"something else")));
    let err = cache
        .get_authorized(&claim, Some(url("c1")))
        .await
        .expect_err("not those bytes");
    assert!(
        matches!(err, CacheError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(presigner.asked().len(), 0, "every URL came with the get");
}

#[tokio::test]
async fn each_instance_is_asked_about_by_name_before_it_uses_an_image_in_s3() {
    let presigner = FakePresigner::new(|location| {
        if location == "theirs/disk.img" {
            Err(PresignError::Refused {
                status: 403,
                message: "the account that registered the image may not read theirs/disk.img"
                    .into(),
            })
        } else {
            Ok(format!("http://127.0.0.1:9/{location}?{SIGNATURE}"))
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_presigner(presigner.clone());
    let url = cache
        .authorize("mine/disk.img", "acme/i-1")
        .await
        .expect("allowed");
    assert!(url.is_some_and(|u| u.contains("mine/disk.img")));
    let err = cache
        .authorize("theirs/disk.img", "acme/i-2")
        .await
        .expect_err("refused");
    assert!(err.is_permanent(), "{err:?}");
    assert!(err.to_string().contains("theirs/disk.img"), "{err}");
    // Paths and URLs are the administrators': nothing to ask.
    let none = cache
        .authorize("/var/lib/images/x.img", "acme/i-3")
        .await
        .expect("a path");
    assert_eq!(none, None);
    assert_eq!(
        presigner.asked(),
        ["mine/disk.img for acme/i-1", "theirs/disk.img for acme/i-2"]
    );
}

#[tokio::test]
async fn a_refused_presigned_url_fails_with_the_gateways_reason_and_caches_nothing() {
    let presigner = FakePresigner::new(|location| {
        Err(PresignError::Refused {
            status: 403,
            message: format!("no instance on node node-1 boots from {location}"),
        })
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_presigner(presigner);

    let err = cache
        .get(&raw("s3://images/other.img".to_owned(), None))
        .await
        .expect_err("refused");

    assert!(
        matches!(&err, CacheError::Presign { location, source: PresignError::Refused { status: 403, .. } } if location == "s3://images/other.img"),
        "{err}"
    );
    let text = node_agent::guest::chain(&err);
    assert!(
        text.contains("403")
            && text.contains("no instance on node node-1 boots from s3://images/other.img"),
        "{text}"
    );
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn a_missing_s3_object_is_reported_with_its_location_and_code_never_the_url() {
    let server = ImageServer::start(Vec::new(), true).await;
    let url = server.url(&format!("/images/gone.img?{SIGNATURE}"));
    let presigner = FakePresigner::new(move |_| Ok(url.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_presigner(presigner);

    let err = cache
        .get(&raw("images/gone.img".to_owned(), None))
        .await
        .expect_err("no such key");

    assert!(
        matches!(&err, CacheError::S3Status { location, status: 404, code: Some(code) } if location == "images/gone.img" && code == "NoSuchKey"),
        "{err}"
    );
    let text = node_agent::guest::chain(&err);
    assert_eq!(
        text,
        "image images/gone.img was answered by S3 with HTTP status 404 (NoSuchKey): the object \
         or its bucket does not exist"
    );
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn a_refused_connection_to_a_presigned_url_does_not_show_its_signature() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "http://{}/images/disk.img?{SIGNATURE}",
        listener.local_addr().expect("local address")
    );
    drop(listener);
    let presigner = FakePresigner::new(move |_| Ok(url.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_presigner(presigner);

    let err = cache
        .get(&raw("images/disk.img".to_owned(), None))
        .await
        .expect_err("refused");

    let text = node_agent::guest::chain(&err);
    assert!(
        matches!(&err, CacheError::Http { location, .. } if location == "images/disk.img"),
        "{text}"
    );
    assert!(!text.contains("Signature"), "{text}");
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn a_presigner_that_never_answers_fails_after_the_idle_timeout() {
    let presigner: Arc<dyn Presign> =
        Arc::new(|_: String, _: Option<String>| -> BoxFuture<'static, _> {
            std::future::pending::<Result<String, PresignError>>().boxed()
        });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20)
        .expect("open")
        .with_timeouts(Duration::from_secs(5), Duration::from_millis(200))
        .expect("client")
        .with_presigner(presigner);

    let err = cache
        .get(&raw("images/disk.img".to_owned(), None))
        .await
        .expect_err("no answer");

    assert!(
        matches!(&err, CacheError::Presign { source: PresignError::Timeout(idle), .. } if *idle == Duration::from_millis(200)),
        "{err}"
    );
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn an_s3_location_without_a_presigner_fails_plainly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ImageCache::open(dir.path().to_path_buf(), 1 << 20).expect("open");

    let err = cache
        .get(&raw("images/disk.img".to_owned(), None))
        .await
        .expect_err("no presigner");

    assert!(
        matches!(&err, CacheError::NoPresigner { location } if location == "images/disk.img"),
        "{err}"
    );
    assert_nothing_cached(dir.path());
}

/// A tmpfs of `size` (mount's syntax, such as `16m`) on a fresh directory: a small real
/// filesystem to fill. Unmounted when dropped.
struct SmallFilesystem {
    dir: tempfile::TempDir,
}

impl SmallFilesystem {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs (the tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free for an unprivileged writer.
    fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(self.path()).expect("statvfs");
        st.f_bavail * st.f_frsize
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_filesystem_fails_the_fetch_plainly_and_leaves_the_cache_usable() {
    let fs = SmallFilesystem::mount("16m");
    let cache_dir = fs.path().join("cache");
    let cache = ImageCache::open(cache_dir.clone(), 1 << 30).expect("open");
    let empty = fs.free();

    // A local image larger than the room: refused before a byte is copied.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let big = elsewhere.path().join("big.img");
    std::fs::write(&big, vec![7u8; 20 << 20]).expect("write the image");
    let err = cache
        .get(&raw(big.display().to_string(), None))
        .await
        .expect_err("no room");
    assert!(matches!(&err, CacheError::NoRoom { .. }), "{err}");
    assert!(!err.is_permanent(), "room frees as images go: tried again");
    assert!(err.to_string().contains("no room for image"), "{err}");
    assert_nothing_cached(&cache_dir);

    // Sent without a length, so no room is known ahead: the disk fills mid-download.
    let url = trickling_server(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        &[7u8; 64 * 1024],
        Duration::from_millis(1),
    )
    .await;
    let err = cache.get(&raw(url, None)).await.expect_err("disk full");
    let why = node_agent::guest::chain(&err);
    assert!(why.contains("No space left on device"), "{why}");
    assert!(!err.is_permanent(), "{why}");
    assert_nothing_cached(&cache_dir);
    assert!(
        fs.free() + (64 << 10) >= empty,
        "the partial file's room is given back: {} of {empty} bytes free",
        fs.free()
    );

    // And an image that fits is fetched as ever.
    let small = elsewhere.path().join("small.img");
    std::fs::write(&small, vec![9u8; 1 << 20]).expect("write the image");
    let cached = cache
        .get(&raw(
            small.display().to_string(),
            Some(sha_of(&vec![9u8; 1 << 20])),
        ))
        .await
        .expect("an image that fits");
    assert!(
        cached.path.starts_with(&cache_dir),
        "{}",
        cached.path.display()
    );
    assert_eq!(
        std::fs::read(&cached.path).expect("read back").len(),
        1 << 20
    );
}
