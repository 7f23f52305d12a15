//! The node's image cache (DESIGN §4): content-addressed, checksum-verified base images, and the
//! copy-on-write overlays the domains' disks are.
//!
//! Layout under the cache directory:
//! - `sha256/<hex>`: a verified image, named by the SHA-256 of its bytes, read-only (0444);
//! - `tmp/<random>.part`: a fetch in progress. A fetch hashes while it writes, syncs, verifies
//!   and only then renames into `sha256/`, so an image is either complete and verified or absent;
//!   [`ImageCache::open`] deletes what a crashed run left in `tmp/`;
//! - `overlay-templates/<hex>.<format>`: an empty qcow2 overlay over `sha256/<hex>`, which each
//!   instance's overlay is a copy of ([`ImageCache::create_overlay`]); made in `tmp/` by
//!   `qemu-img`, removed with its image and when the cache opens.
//!
//! A source is a path on the node, an `http(s)://` URL, or an object in the gateway's S3
//! (`s3://bucket/key` or `bucket/key`), which is downloaded through a short-lived presigned URL
//! the cache asks its [`Presign`] for (the gateway, with the node's token); the download client
//! trusts the roots given with [`ImageCache::with_root_certificates`] (the gateway's CA) beside
//! the default ones.
//!
//! Concurrent [`ImageCache::get`]s of one source share a single fetch. Use order is kept in
//! memory and in each image's mtime (touched on use), so least-recently-used eviction survives a
//! restart. Eviction never removes an image the caller says is in use.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, FutureExt, Shared};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::domain::DiskFormat;
use crate::presign::{Presign, PresignError};

/// How long an HTTP fetch may take to connect, unless [`ImageCache::with_timeouts`] says.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP fetch may wait for the response or its next bytes, unless
/// [`ImageCache::with_timeouts`] says.
pub const DEFAULT_READ_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one `qemu-img` run may take before it is killed.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);

/// Read size when copying a local image.
const COPY_BUFFER_BYTES: usize = 128 << 10;

/// How much of an S3 error answer is read for its error code.
const S3_ERROR_BODY_BYTES: usize = 4 << 10;

/// Where an image's bytes come from and what they must hash to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageSource {
    /// Absolute path on the node, an `http://` or `https://` URL, or an S3 location
    /// (`s3://bucket/key` or `bucket/key`).
    pub location: String,
    /// SHA-256 of the image, lower-case hex; without it the image is stored under the hash of
    /// what was fetched.
    pub sha256: Option<String>,
    /// Declared format: trusted for raw, checked with `qemu-img info` for qcow2.
    pub format: DiskFormat,
}

/// A verified image in the cache.
#[derive(Clone, Debug)]
pub struct CachedImage {
    /// Absolute path of the read-only image file, `<dir>/sha256/<hex>`.
    pub path: PathBuf,
    /// SHA-256 of the image, lower-case hex.
    pub sha256: String,
    /// Size of the image file in bytes.
    pub size: u64,
    /// Format of the image, as its source declared it.
    pub format: DiskFormat,
}

/// Why an image could not be cached, or an overlay created or removed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CacheError {
    /// The location is neither an absolute path, an HTTP(S) URL nor an S3 bucket and key.
    #[error(
        "image location {location} is neither an absolute path, an http(s) URL nor an S3 bucket/key"
    )]
    InvalidLocation {
        /// The location given.
        location: String,
    },
    /// The declared checksum is not a SHA-256 in hex.
    #[error("declared sha256 {value} is not 64 hex digits")]
    InvalidSha256 {
        /// The checksum given.
        value: String,
    },
    /// The local image file does not exist.
    #[error("image {location} does not exist")]
    NotFound {
        /// The location given.
        location: String,
    },
    /// The local image file exists but cannot be read.
    #[error("image {location} cannot be read")]
    Unreadable {
        /// The location given.
        location: String,
        /// The I/O error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The HTTP server answered with a status other than 2xx.
    #[error("image {location} was answered with HTTP status {status}")]
    HttpStatus {
        /// The URL.
        location: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The image is in S3 but the cache has no [`Presign`] to ask for its URL.
    #[error("image {location} is in S3, but this node has no gateway to ask for its URL")]
    NoPresigner {
        /// The S3 location.
        location: String,
    },
    /// The gateway gave no presigned URL of the image, e.g. because no instance of this node
    /// boots from it (HTTP 403).
    #[error("no presigned URL of image {location}")]
    Presign {
        /// The S3 location.
        location: String,
        /// Why.
        #[source]
        source: PresignError,
    },
    /// S3 answered the presigned URL with a status other than 2xx: the object does not exist
    /// (404), or the URL was refused (403, e.g. expired).
    #[error(
        "image {location} was answered by S3 with HTTP status {status}{}{}",
        .code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(),
        s3_status_hint(*.status)
    )]
    S3Status {
        /// The S3 location (never the URL, whose signature is a credential).
        location: String,
        /// The HTTP status code.
        status: u16,
        /// S3's error code, e.g. `NoSuchKey`, when the answer has one.
        code: Option<String>,
    },
    /// The HTTP request failed: connection refused or timed out, invalid URL, broken body.
    #[error("image {location} cannot be fetched")]
    Http {
        /// The URL.
        location: String,
        /// The client's error.
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// The HTTP server sent nothing for longer than the read-idle timeout.
    #[error("image {location} stalled: nothing received for {idle:?}")]
    Stalled {
        /// The URL.
        location: String,
        /// The read-idle timeout that ran out.
        idle: Duration,
    },
    /// The HTTP server sends so slowly that the image would take hours: less than
    /// [`MIN_FETCH_RATE`] bytes a second on average once the read-idle timeout has passed.
    #[error("image {location} comes too slowly: {received} bytes in {elapsed:?}")]
    TooSlow {
        /// The URL.
        location: String,
        /// Bytes received.
        received: u64,
        /// Since the request was sent.
        elapsed: Duration,
    },
    /// The image is larger than the whole cache may hold.
    #[error("image {location} is larger than the image cache ({limit} bytes)")]
    TooLarge {
        /// The URL.
        location: String,
        /// The cache's size limit.
        limit: u64,
    },
    /// The cache's filesystem has no room for the image beside what fetches under way will
    /// write and the free space kept for the instances' disks.
    #[error(
        "no room for image {location}: {needed} bytes needed, {free} bytes free beside the \
         fetches under way"
    )]
    NoRoom {
        /// The location given.
        location: String,
        /// Its length.
        needed: u64,
        /// Free bytes not held by other fetches.
        free: u64,
    },
    /// The body ended before the length the server announced (a cut connection).
    #[error("image {location} ended after {received} of the {announced} bytes announced")]
    Truncated {
        /// The URL.
        location: String,
        /// Bytes received.
        received: u64,
        /// The `Content-Length`.
        announced: u64,
    },
    /// The fetched bytes do not hash to the declared SHA-256; nothing was cached.
    #[error("image {location} has sha256 {actual}, not the declared {expected}")]
    ChecksumMismatch {
        /// The declared SHA-256.
        expected: String,
        /// The SHA-256 of the bytes fetched.
        actual: String,
        /// The location given.
        location: String,
    },
    /// The image is not in the format its source declares.
    #[error("image {location} is declared {declared} but is {actual}")]
    FormatMismatch {
        /// The location given.
        location: String,
        /// The declared format.
        declared: &'static str,
        /// The format `qemu-img info` found.
        actual: String,
    },
    /// A qcow2 image names a backing file, which would let it read any file on the node.
    #[error("qcow2 image {location} names a backing file {backing}")]
    BackingFile {
        /// The location given.
        location: String,
        /// The backing file it names.
        backing: String,
    },
    /// A qcow2 image names an external data file, which would let it read any file on the node.
    #[error("qcow2 image {location} names an external data file {data_file}")]
    DataFile {
        /// The location given.
        location: String,
        /// The data file it names.
        data_file: String,
    },
    /// `qemu-img` failed, timed out or answered something unreadable.
    #[error("qemu-img {action} of {} failed: {detail}", .path.display())]
    QemuImg {
        /// The subcommand, `info` or `create`.
        action: &'static str,
        /// The image or overlay it was run on.
        path: PathBuf,
        /// Its error output, or what else went wrong.
        detail: String,
        /// Whether qemu-img ran to its end (and refused, or answered nonsense), rather than
        /// could not be started or ran out of time: only then does it say anything of the image.
        ran: bool,
    },
    /// The overlay exists but is not a qcow2 over the given base.
    #[error("overlay {} already exists over another backing file", .overlay.display())]
    OverlayConflict {
        /// The overlay path.
        overlay: PathBuf,
        /// The backing file it has, if any.
        backing: Option<String>,
    },
    /// A file operation in the cache or on an overlay failed.
    #[error("cannot {action} {}", .path.display())]
    Io {
        /// What was being done, e.g. `create`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The HTTP client cannot be built.
    #[error("the HTTP client for image fetches cannot be built")]
    HttpClient {
        /// The client's error.
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// A background fetch or file task ended without a result (it panicked).
    #[error("an image cache task ended without a result")]
    TaskFailed,
}

impl CacheError {
    /// Whether the image itself is wrong or missing for sure (a bad location or checksum, a
    /// 4xx answer, bytes that do not match what was declared), so that trying again cannot
    /// help; `false` for what may pass (a network error, a stall, a 5xx, a full disk).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::InvalidLocation { .. }
            | Self::InvalidSha256 { .. }
            | Self::NotFound { .. }
            | Self::NoPresigner { .. }
            | Self::ChecksumMismatch { .. }
            | Self::FormatMismatch { .. }
            | Self::BackingFile { .. }
            | Self::DataFile { .. }
            | Self::TooLarge { .. } => true,
            Self::HttpStatus { status, .. }
            | Self::S3Status { status, .. }
            | Self::Presign {
                source: PresignError::Refused { status, .. },
                ..
            } => refused_for_good(*status),
            Self::Presign { source, .. } => {
                matches!(source, PresignError::BadAnswer(_) | PresignError::NoBase(_))
            }
            Self::Unreadable { .. }
            | Self::Http { .. }
            | Self::Stalled { .. }
            | Self::TooSlow { .. }
            | Self::Truncated { .. }
            | Self::QemuImg { .. }
            | Self::NoRoom { .. }
            | Self::OverlayConflict { .. }
            | Self::Io { .. }
            | Self::HttpClient { .. }
            | Self::TaskFailed => false,
        }
    }

    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            action,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

/// The sha256s of the images that must not be evicted; see [`ImageCache::with_in_use`].
/// Whether an HTTP refusal is final: a 4xx other than a timeout or a rate limit.
fn refused_for_good(status: u16) -> bool {
    (400..500).contains(&status) && status != 408 && status != 429
}

type InUseFn = Arc<dyn Fn() -> HashSet<String> + Send + Sync>;

/// One fetch in flight, awaited by every `get` of its source.
type Flight = Shared<BoxFuture<'static, Result<CachedImage, CacheError>>>;

/// The node's content-addressed image cache. Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct ImageCache {
    config: Arc<Config>,
    inner: Arc<Inner>,
}

/// What does not change while the cache runs.
#[derive(Clone)]
struct Config {
    dir: PathBuf,
    max_bytes: u64,
    connect: Duration,
    read_idle: Duration,
    /// Trusted beside the default roots by `client`.
    roots: Vec<reqwest::Certificate>,
    client: reqwest::Client,
    in_use: Option<InUseFn>,
    presigner: Option<Arc<dyn Presign>>,
}

/// What the clones share.
struct Inner {
    state: Mutex<State>,
    flights: Mutex<Flights>,
    /// Serialises publishing into and deleting from `sha256/` and [`TEMPLATES_DIR`], so an
    /// eviction never deletes a file a fetch has just published under the same name, and
    /// launches of one image at once make its overlay template once.
    publish: tokio::sync::Mutex<()>,
    /// Bytes the fetches under way will still write (their announced lengths), counted against
    /// the filesystem's free space before another fetch starts.
    reserved: Mutex<u64>,
    /// Serialises writes of [`CONTENTS_FILE`], each writing the latest map.
    contents_file: tokio::sync::Mutex<()>,
}

/// Disk room a fetch holds until it ends (see [`ImageCache::reserve`]).
struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reserved = lock(&self.inner.reserved);
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

/// Whether a fetch of `needed` bytes may start on a filesystem with `free` bytes available, of
/// which fetches under way will still write `reserved`, keeping `floor` bytes free for the
/// instances' disks (their overlays grow on the same filesystem by default). Pure.
pub fn room_for(free: u64, reserved: u64, needed: u64, floor: u64) -> bool {
    reserved.saturating_add(needed).saturating_add(floor) <= free
}

/// The free space a fetch leaves for the instances' disks: 5 % of the filesystem, at most 1 GiB.
fn floor_of(filesystem: u64) -> u64 {
    (filesystem / 20).min(1 << 30)
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    total: u64,
    /// The next use tick; a larger tick is a more recent use.
    tick: u64,
    /// The `in_use` of the last [`ImageCache::evict`], protected by automatic eviction when no
    /// [`ImageCache::with_in_use`] function is given.
    last_in_use: HashSet<String>,
    /// The S3 locations each cached image (by SHA-256) was fetched from and verified against
    /// since the cache opened: an S3 source is a hit only from one of these, so that an image
    /// record naming a readable object and another image's checksum gets that object (and its
    /// checksum mismatch), not the other image.
    s3_sources: HashMap<String, HashSet<String>>,
    /// The SHA-256 of the stored S3 bytes each content ID names (the ID a presigned URL names,
    /// [`crds::image::PRESIGNED_CONTENT_PARAM`]), for the bytes fetched and verified here;
    /// kept in [`CONTENTS_FILE`] across restarts. A URL naming known bytes is a hit without
    /// a fetch, a declared checksum or not.
    s3_contents: HashMap<String, String>,
}

/// The file in the cache directory that keeps [`State::s3_contents`].
const CONTENTS_FILE: &str = "s3-contents.json";

/// The directory in the cache directory that keeps, for each cached image an instance's root
/// disk was made from, its overlay template: an empty qcow2 overlay over it, named
/// `<sha256>.<format>` (the format the image is read as), removed with the image, and all of
/// them when the cache opens (each names its image by the cache's absolute path then).
const TEMPLATES_DIR: &str = "overlay-templates";

#[derive(Clone, Copy)]
struct Entry {
    size: u64,
    last_used: u64,
    /// `qemu-img info` confirmed it a qcow2 without backing or data file.
    qcow2_verified: bool,
}

#[derive(Default)]
struct Flights {
    by_source: HashMap<ImageSource, (u64, Flight)>,
    next_id: u64,
}

/// What a `get` does after looking at the flights and the index.
enum Step {
    Cached(String),
    Fetch(Flight),
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCache")
            .field("dir", &self.config.dir)
            .field("max_bytes", &self.config.max_bytes)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ImageCache {
    /// Opens the cache in `dir`, holding at most about `max_bytes`: creates the directories,
    /// deletes the temporary files of a crashed run and indexes the images already there.
    pub fn open(dir: PathBuf, max_bytes: u64) -> Result<Self, CacheError> {
        let dir = std::path::absolute(&dir).map_err(CacheError::io("resolve", &dir))?;
        let images = dir.join("sha256");
        let tmp = dir.join("tmp");
        let templates = dir.join(TEMPLATES_DIR);
        for d in [&images, &tmp, &templates] {
            std::fs::create_dir_all(d).map_err(CacheError::io("create", d))?;
        }
        for entry in std::fs::read_dir(&tmp).map_err(CacheError::io("list", &tmp))? {
            let path = entry.map_err(CacheError::io("list", &tmp))?.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(CacheError::io("remove", &path))?;
            info!(path = %path.display(), "removed a leftover temporary file");
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&images).map_err(CacheError::io("list", &images))? {
            let entry = entry.map_err(CacheError::io("list", &images))?;
            let path = entry.path();
            let name = entry.file_name();
            let sha = match name.to_str() {
                Some(name) if is_sha256(name) => name.to_owned(),
                _ => {
                    warn!(path = %path.display(), "ignoring a file not named by a sha256");
                    continue;
                }
            };
            let meta = std::fs::metadata(&path).map_err(CacheError::io("inspect", &path))?;
            if !meta.is_file() {
                warn!(path = %path.display(), "ignoring a cache entry that is not a file");
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, sha, meta.len()));
        }
        found.sort();
        let mut state = State::default();
        for (_, sha, size) in found {
            state.tick += 1;
            state.total += size;
            let entry = Entry {
                size,
                last_used: state.tick,
                qcow2_verified: false,
            };
            state.entries.insert(sha, entry);
        }
        state.tick += 1;
        // Templates are made again as they are needed: each names its image by the absolute
        // path the cache had when it was made, which a moved or remounted cache directory no
        // longer has (and an eviction cut short leaves one for an image no longer here).
        for entry in std::fs::read_dir(&templates).map_err(CacheError::io("list", &templates))? {
            let path = entry.map_err(CacheError::io("list", &templates))?.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(error) = removed {
                // Only a template of the last run: it is replaced when its image is next used.
                warn!(path = %path.display(), %error, "cannot remove an old overlay template");
            }
        }
        state.s3_contents = read_contents(&dir.join(CONTENTS_FILE))
            .into_iter()
            .filter(|(_, sha)| state.entries.contains_key(sha))
            .collect();
        info!(
            dir = %dir.display(),
            images = state.entries.len(),
            bytes = state.total,
            s3_contents = state.s3_contents.len(),
            "image cache opened"
        );
        Ok(Self {
            config: Arc::new(Config {
                dir,
                max_bytes,
                connect: DEFAULT_CONNECT_TIMEOUT,
                read_idle: DEFAULT_READ_IDLE_TIMEOUT,
                roots: Vec::new(),
                client: http_client(DEFAULT_CONNECT_TIMEOUT, &[])?,
                in_use: None,
                presigner: None,
            }),
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                flights: Mutex::new(Flights::default()),
                publish: tokio::sync::Mutex::new(()),
                reserved: Mutex::new(0),
                contents_file: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Sets the HTTP timeouts: for connecting, and for waiting on the response or its next
    /// bytes. Call before sharing the cache: clones made earlier keep the old timeouts.
    pub fn with_timeouts(
        mut self,
        connect: Duration,
        read_idle: Duration,
    ) -> Result<Self, CacheError> {
        let mut config = (*self.config).clone();
        config.client = http_client(connect, &config.roots)?;
        config.connect = connect;
        config.read_idle = read_idle;
        self.config = Arc::new(config);
        Ok(self)
    }

    /// Trusts the root certificates `der` (DER, e.g. the gateway's CA from the node's
    /// kubeconfig) beside the default roots for downloads. Call before sharing.
    pub fn with_root_certificates(mut self, der: &[Vec<u8>]) -> Result<Self, CacheError> {
        let mut config = (*self.config).clone();
        for cert in der {
            let cert =
                reqwest::Certificate::from_der(cert).map_err(|e| CacheError::HttpClient {
                    source: Arc::new(e),
                })?;
            config.roots.push(cert);
        }
        config.client = http_client(config.connect, &config.roots)?;
        self.config = Arc::new(config);
        Ok(self)
    }

    /// Gives the cache what it asks for presigned URLs of images in S3. Without it, an S3
    /// location fails with [`CacheError::NoPresigner`]. Call before sharing.
    pub fn with_presigner(mut self, presigner: Arc<dyn Presign>) -> Self {
        let mut config = (*self.config).clone();
        config.presigner = Some(presigner);
        self.config = Arc::new(config);
        self
    }

    /// Gives the function automatic eviction (after a fetch overfills the cache) calls for the
    /// sha256s that must be kept, e.g. the bases of live overlays. Without it, automatic
    /// eviction keeps the `in_use` of the last [`evict`](Self::evict). Call before sharing.
    pub fn with_in_use(
        mut self,
        in_use: impl Fn() -> HashSet<String> + Send + Sync + 'static,
    ) -> Self {
        let mut config = (*self.config).clone();
        config.in_use = Some(Arc::new(in_use));
        self.config = Arc::new(config);
        self
    }

    /// Bytes held by the cached images.
    pub fn size(&self) -> u64 {
        lock(&self.inner.state).total
    }

    /// The verified image of `source`: from the cache when its declared sha256 is there,
    /// otherwise fetched, verified and published. Concurrent calls for one source share one
    /// fetch, which runs to its end even if its callers go away.
    ///
    /// An image in S3 is a hit only if it was fetched from that same location since the cache
    /// opened (see [`ImageCache::get_pinned`]); the caller asks first whether the instance may
    /// read it ([`ImageCache::authorize`]).
    pub async fn get(&self, source: &ImageSource) -> Result<CachedImage, CacheError> {
        self.get_checked(source, false, None).await
    }

    /// [`ImageCache::get`] with the presigned URL [`ImageCache::authorize`] gave (`None` for
    /// a location that needs none): a fetch this get starts uses it instead of asking again.
    pub async fn get_authorized(
        &self,
        source: &ImageSource,
        url: Option<String>,
    ) -> Result<CachedImage, CacheError> {
        self.get_checked(source, false, url).await
    }

    /// [`ImageCache::get`] for an instance that launched from the image `source` pins (its
    /// SHA-256 is the one fetched for it then): any cached copy is a hit, wherever it came
    /// from, and its owner's access to the location is not asked again (as an EC2 instance
    /// keeps its root volume when its AMI's permissions change).
    pub async fn get_pinned(&self, source: &ImageSource) -> Result<CachedImage, CacheError> {
        self.get_checked(source, true, None).await
    }

    async fn get_checked(
        &self,
        source: &ImageSource,
        pinned: bool,
        url: Option<String>,
    ) -> Result<CachedImage, CacheError> {
        let source = normalise(source)?;
        let span = info_span!(
            "image_get",
            location = %source.location,
            sha256 = source.sha256.as_deref().unwrap_or("undeclared"),
            format = source.format.as_str(),
        );
        self.get_normalised(source, pinned, url)
            .instrument(span)
            .await
    }

    /// Whether `instance` (`<namespace>/<name>`) may use the S3 `location`: the gateway's answer
    /// for that instance alone (its image's owner may read the object), a presigned URL of it
    /// (for [`ImageCache::get_authorized`]). Other locations need no asking (`None`): only
    /// administrators register them.
    pub async fn authorize(
        &self,
        location: &str,
        instance: &str,
    ) -> Result<Option<String>, CacheError> {
        if kind(location) != Some(Kind::S3) {
            return Ok(None);
        }
        self.presigned_url(location, Some(instance)).await.map(Some)
    }

    async fn get_normalised(
        &self,
        source: ImageSource,
        pinned: bool,
        url: Option<String>,
    ) -> Result<CachedImage, CacheError> {
        loop {
            match self.join_or_start(&source, pinned, url.clone()) {
                Step::Fetch(flight) => return flight.await,
                Step::Cached(sha) => {
                    if let Some(image) = self.use_cached(&source, &sha).await? {
                        debug!("cache hit");
                        return Ok(image);
                    }
                }
            }
        }
    }

    /// Joins the fetch of `source` in flight, or finds its image in the index, or starts its
    /// fetch. The flight lock is held throughout, and a fetch publishes before it leaves the
    /// flights, so no `get` can miss both and start a second fetch.
    fn join_or_start(&self, source: &ImageSource, pinned: bool, url: Option<String>) -> Step {
        let mut flights = lock(&self.inner.flights);
        if let Some((_, flight)) = flights.by_source.get(source) {
            debug!("joining the fetch in flight");
            return Step::Fetch(flight.clone());
        }
        {
            let state = lock(&self.inner.state);
            // The bytes the URL names, when they were fetched here before.
            let content_sha = url
                .as_deref()
                .and_then(crds::image::presigned_content)
                .and_then(|c| state.s3_contents.get(c));
            if let Some(sha) = source.sha256.as_ref().or(content_sha) {
                let vouched = pinned
                    || kind(&source.location) != Some(Kind::S3)
                    || content_sha == Some(sha)
                    || state
                        .s3_sources
                        .get(sha)
                        .is_some_and(|l| l.contains(&source.location));
                if state.entries.contains_key(sha) && vouched {
                    return Step::Cached(sha.clone());
                }
            }
        }
        let id = flights.next_id;
        flights.next_id += 1;
        let span = info_span!(
            "image_fetch",
            location = %source.location,
            sha256 = source.sha256.as_deref().unwrap_or("undeclared"),
        );
        let cache = self.clone();
        let task_source = source.clone();
        let task = tokio::spawn(
            async move {
                let result = cache.fetch(&task_source, url).await;
                cache.end_flight(&task_source, id);
                result
            }
            .instrument(span),
        );
        let flight = async move { task.await.unwrap_or(Err(CacheError::TaskFailed)) }
            .boxed()
            .shared();
        flights
            .by_source
            .insert(source.clone(), (id, flight.clone()));
        Step::Fetch(flight)
    }

    fn end_flight(&self, source: &ImageSource, id: u64) {
        let mut flights = lock(&self.inner.flights);
        if flights.by_source.get(source).is_some_and(|(i, _)| *i == id) {
            flights.by_source.remove(source);
        }
    }

    /// Marks a cached image used and checks its declared format; `None` if its file has gone
    /// (it is dropped from the index, and the caller fetches it again).
    async fn use_cached(
        &self,
        source: &ImageSource,
        sha: &str,
    ) -> Result<Option<CachedImage>, CacheError> {
        let path = self.image_path(sha);
        let touch_path = path.clone();
        match blocking(move || touch(&touch_path)).await? {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!(path = %path.display(), "a cached image file has gone; fetching it again");
                let mut state = lock(&self.inner.state);
                if let Some(entry) = state.entries.remove(sha) {
                    state.total -= entry.size;
                }
                state.s3_sources.remove(sha);
                return Ok(None);
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot record the use of a cached image")
            }
        }
        let entry = {
            let mut state = lock(&self.inner.state);
            let tick = next_tick(&mut state);
            match state.entries.get_mut(sha) {
                Some(entry) => {
                    entry.last_used = tick;
                    *entry
                }
                None => return Ok(None),
            }
        };
        if source.format == DiskFormat::Qcow2 && !entry.qcow2_verified {
            verify_qcow2(source, &path).await?;
            if let Some(entry) = lock(&self.inner.state).entries.get_mut(sha) {
                entry.qcow2_verified = true;
            }
        }
        Ok(Some(CachedImage {
            path,
            sha256: sha.to_owned(),
            size: entry.size,
            format: source.format,
        }))
    }

    /// Holds `needed` bytes of the cache's filesystem for a fetch of `location`, or says there is
    /// no room for it (tried again later: room frees as images are evicted and instances go).
    fn reserve(&self, location: &str, needed: u64) -> Result<Reservation, CacheError> {
        let stat = rustix::fs::statvfs(&self.config.dir)
            .map_err(|e| CacheError::io("measure", &self.config.dir)(e.into()))?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let floor = floor_of(stat.f_blocks.saturating_mul(stat.f_frsize));
        let mut reserved = lock(&self.inner.reserved);
        if !room_for(free, *reserved, needed, floor) {
            return Err(CacheError::NoRoom {
                location: location.to_owned(),
                needed,
                free: free.saturating_sub(*reserved),
            });
        }
        *reserved += needed;
        Ok(Reservation {
            inner: Arc::clone(&self.inner),
            bytes: needed,
        })
    }

    /// Fetches `source` into a temporary file, verifies it, publishes it and evicts if the cache
    /// is over its limit. The temporary file is removed on every way out but publication.
    async fn fetch(
        &self,
        source: &ImageSource,
        presigned: Option<String>,
    ) -> Result<CachedImage, CacheError> {
        let part = TempFile(Some(
            self.config
                .dir
                .join("tmp")
                .join(format!("{}.part", uuid::Uuid::new_v4().simple())),
        ));
        let path = part.path().to_path_buf();
        let location = &source.location;
        let mut content = None;
        let (sha, size) = match kind(location) {
            Some(Kind::Http) => self.download(location, location, &path, false).await?,
            Some(Kind::S3) => {
                let url = match presigned {
                    Some(url) => url,
                    None => self.presigned_url(location, None).await?,
                };
                content = crds::image::presigned_content(&url).map(str::to_owned);
                self.download(&url, location, &path, true).await?
            }
            Some(Kind::Path) | None => {
                // A length that cannot be read is copy_local's to report.
                let length = tokio::fs::metadata(location).await.map_or(0, |m| m.len());
                let _room = self.reserve(location, length)?;
                let location = location.clone();
                let limit = self.config.max_bytes;
                blocking(move || copy_local(&location, &path, limit)).await??
            }
        };
        if let Some(expected) = &source.sha256 {
            if *expected != sha {
                warn!(expected = %expected, actual = %sha, "checksum mismatch; discarding the image");
                return Err(CacheError::ChecksumMismatch {
                    expected: expected.clone(),
                    actual: sha,
                    location: source.location.clone(),
                });
            }
        }
        let qcow2_verified = source.format == DiskFormat::Qcow2;
        if qcow2_verified {
            verify_qcow2(source, part.path()).await?;
        }
        let s3 = (kind(location) == Some(Kind::S3)).then_some(location.as_str());
        let image = self
            .publish(part, &sha, size, source.format, qcow2_verified, s3)
            .await?;
        if let Some(content) = content {
            self.remember_content(content, &sha).await;
        }
        info!(sha256 = %sha, bytes = size, "image fetched and verified");
        if self.size() > self.config.max_bytes {
            self.auto_evict(&sha).await;
        }
        Ok(image)
    }

    /// Records that content ID `content` names the bytes of `sha`, and keeps the record in
    /// [`CONTENTS_FILE`] (written whole, then renamed into place); a record that cannot be
    /// written costs a fetch after a restart, nothing more.
    async fn remember_content(&self, content: String, sha: &str) {
        let _writing = self.inner.contents_file.lock().await;
        let snapshot = {
            let mut state = lock(&self.inner.state);
            state.s3_contents.insert(content, sha.to_owned());
            let live: HashMap<String, String> = state
                .s3_contents
                .iter()
                .filter(|(_, s)| state.entries.contains_key(*s))
                .map(|(c, s)| (c.clone(), s.clone()))
                .collect();
            state.s3_contents = live.clone();
            live
        };
        let path = self.config.dir.join(CONTENTS_FILE);
        let written = blocking(move || write_contents(&path, &snapshot)).await;
        if let Err(e) = written.and_then(|r| r) {
            warn!(error = %e, "cannot keep which S3 bytes the cache holds; they are fetched again after a restart");
        }
    }

    /// A presigned URL of the S3 `location` (for `instance` when named), from the cache's
    /// [`Presign`], within the read-idle timeout.
    async fn presigned_url(
        &self,
        location: &str,
        instance: Option<&str>,
    ) -> Result<String, CacheError> {
        let presigner = self
            .config
            .presigner
            .as_ref()
            .ok_or_else(|| CacheError::NoPresigner {
                location: location.to_owned(),
            })?;
        let failed = |source| CacheError::Presign {
            location: location.to_owned(),
            source,
        };
        info!("asking the gateway for a presigned URL");
        let idle = self.config.read_idle;
        let url = tokio::time::timeout(idle, presigner.presign(location, instance))
            .await
            .map_err(|_| failed(PresignError::Timeout(idle)))?
            .map_err(failed)?;
        debug!("downloading through the presigned URL");
        Ok(url)
    }

    /// Streams `url` into `part`, hashing as it writes; every wait is bounded by the read-idle
    /// timeout. Errors name `location`, never `url` (a presigned URL's signature is a
    /// credential); `s3` reads S3's error code from an error answer.
    async fn download(
        &self,
        url: &str,
        location: &str,
        part: &Path,
        s3: bool,
    ) -> Result<(String, u64), CacheError> {
        let idle = self.config.read_idle;
        let stalled = || CacheError::Stalled {
            location: location.to_owned(),
            idle,
        };
        let failed = |e: reqwest::Error| CacheError::Http {
            location: location.to_owned(),
            source: Arc::new(e.without_url()),
        };
        let started = std::time::Instant::now();
        let mut response = tokio::time::timeout(idle, self.config.client.get(url).send())
            .await
            .map_err(|_| stalled())?
            .map_err(failed)?;
        let status = response.status();
        if !status.is_success() {
            if !s3 {
                return Err(CacheError::HttpStatus {
                    location: location.to_owned(),
                    status: status.as_u16(),
                });
            }
            // The error body, as much of it as comes within one idle timeout.
            let mut body = Vec::new();
            let _ = tokio::time::timeout(idle, async {
                while body.len() < S3_ERROR_BODY_BYTES {
                    match response.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
            })
            .await;
            return Err(CacheError::S3Status {
                location: location.to_owned(),
                status: status.as_u16(),
                code: s3_error_code(&body),
            });
        }
        let limit = self.config.max_bytes;
        let too_large = || CacheError::TooLarge {
            location: location.to_owned(),
            limit,
        };
        let announced = response.content_length();
        if announced.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let _room = self.reserve(location, announced.unwrap_or(0))?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(part)
            .await
            .map_err(CacheError::io("create", part))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = tokio::time::timeout(idle, response.chunk())
            .await
            .map_err(|_| stalled())?
            .map_err(failed)?
        {
            size += chunk.len() as u64;
            if size > limit {
                return Err(too_large());
            }
            // A server that sends a little before each idle timeout would never stall.
            let elapsed = started.elapsed();
            if too_slow(size, elapsed, idle) {
                return Err(CacheError::TooSlow {
                    location: location.to_owned(),
                    received: size,
                    elapsed,
                });
            }
            hasher.update(&chunk);
            if is_zero(&chunk) {
                // Left a hole: a sparse raw image stays sparse in the cache.
                file.seek(io::SeekFrom::Current(chunk.len() as i64))
                    .await
                    .map_err(CacheError::io("write", part))?;
            } else {
                file.write_all(&chunk)
                    .await
                    .map_err(CacheError::io("write", part))?;
            }
        }
        if let Some(announced) = announced.filter(|n| *n != size) {
            return Err(CacheError::Truncated {
                location: location.to_owned(),
                received: size,
                announced,
            });
        }
        file.flush().await.map_err(CacheError::io("write", part))?;
        // A hole at the end is made a length by setting it.
        file.set_len(size)
            .await
            .map_err(CacheError::io("write", part))?;
        file.sync_all()
            .await
            .map_err(CacheError::io("sync", part))?;
        Ok((hex(&hasher.finalize()), size))
    }

    /// Renames a verified temporary file into `sha256/` (read-only, directory synced) and
    /// indexes it; if the image is already there, the temporary file is dropped instead.
    async fn publish(
        &self,
        part: TempFile,
        sha: &str,
        size: u64,
        format: DiskFormat,
        qcow2_verified: bool,
        s3_location: Option<&str>,
    ) -> Result<CachedImage, CacheError> {
        let path = self.image_path(sha);
        let _publishing = self.inner.publish.lock().await;
        let present = lock(&self.inner.state).entries.contains_key(sha);
        if present {
            let touch_path = path.clone();
            match blocking(move || touch(&touch_path)).await? {
                Ok(()) => {
                    debug!(sha256 = %sha, "already cached; dropping the fetched copy");
                    drop(part);
                }
                // Deleted behind the cache's back: the copy just verified takes its place.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    warn!(path = %path.display(), "a cached image's file was gone; storing the fetched copy");
                    let target = path.clone();
                    blocking(move || publish_file(part, &target)).await??;
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot record the use of a cached image");
                    drop(part);
                }
            }
        } else {
            let target = path.clone();
            blocking(move || publish_file(part, &target)).await??;
        }
        let mut state = lock(&self.inner.state);
        let tick = next_tick(&mut state);
        let entry = state.entries.entry(sha.to_owned()).or_insert(Entry {
            size,
            last_used: tick,
            qcow2_verified,
        });
        entry.last_used = tick;
        entry.qcow2_verified |= qcow2_verified;
        let size = entry.size;
        if let Some(location) = s3_location {
            state
                .s3_sources
                .entry(sha.to_owned())
                .or_default()
                .insert(location.to_owned());
        }
        if !present {
            state.total += size;
        }
        Ok(CachedImage {
            path,
            sha256: sha.to_owned(),
            size,
            format,
        })
    }

    /// Eviction after a fetch: keeps the image just fetched and those in use.
    async fn auto_evict(&self, fresh: &str) {
        let mut keep = match &self.config.in_use {
            Some(in_use) => in_use(),
            None => lock(&self.inner.state).last_in_use.clone(),
        };
        keep.insert(fresh.to_owned());
        match self.evict_keeping(&keep).await {
            Ok(freed) => debug!(bytes = freed, "evicted after a fetch"),
            Err(e) => warn!(error = %e, "eviction after a fetch failed"),
        }
    }

    /// Deletes least-recently-used images not in `in_use` (sha256s) until the cache holds at
    /// most its `max_bytes`; returns the bytes freed. Images in `in_use` are never removed.
    pub async fn evict(&self, in_use: &HashSet<String>) -> Result<u64, CacheError> {
        lock(&self.inner.state).last_in_use = in_use.clone();
        self.evict_keeping(in_use).await
    }

    async fn evict_keeping(&self, in_use: &HashSet<String>) -> Result<u64, CacheError> {
        let _publishing = self.inner.publish.lock().await;
        let victims: Vec<(String, Entry)> = {
            let mut state = lock(&self.inner.state);
            let entries: Vec<(String, u64, u64)> = state
                .entries
                .iter()
                .map(|(sha, e)| (sha.clone(), e.size, e.last_used))
                .collect();
            let chosen = choose_evictions(&entries, in_use, self.config.max_bytes);
            let mut victims = Vec::with_capacity(chosen.len());
            for sha in chosen {
                if let Some(entry) = state.entries.remove(&sha) {
                    state.total -= entry.size;
                    state.s3_sources.remove(&sha);
                    victims.push((sha, entry));
                }
            }
            victims
        };
        let mut freed = 0;
        let mut first_error = None;
        for (sha, entry) in victims {
            let path = self.image_path(&sha);
            let remove_path = path.clone();
            match blocking(move || std::fs::remove_file(&remove_path)).await? {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot evict an image");
                    let mut state = lock(&self.inner.state);
                    state.total += entry.size;
                    state.entries.insert(sha, entry);
                    first_error.get_or_insert(CacheError::io("remove", &path)(e));
                    continue;
                }
            }
            for format in [DiskFormat::Raw, DiskFormat::Qcow2] {
                let template = self.template_path(&sha, format);
                let remove_path = template.clone();
                match blocking(move || std::fs::remove_file(&remove_path)).await? {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // Removed at the next start; reused (the same bytes) if the image comes back.
                    Err(e) => {
                        warn!(path = %template.display(), error = %e, "cannot remove an overlay template")
                    }
                }
            }
            info!(sha256 = %sha, bytes = entry.size, "evicted an image");
            freed += entry.size;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(freed),
        }
    }

    /// Creates the qcow2 overlay `overlay` over `base`, by absolute path. Nothing to do if it
    /// already exists over that base; an error if it exists over anything else. The overlay is
    /// written under a temporary name and linked into place, so it is complete or absent and an
    /// existing one is never replaced.
    ///
    /// It is a copy of the base's overlay template ([`TEMPLATES_DIR`]): every empty overlay
    /// over one file in one format is the same bytes, so `qemu-img` makes one per cached image
    /// instead of one per instance (a `qemu-img` run costs more CPU than the rest of a launch
    /// on the test driver, and a batch of launches starts one each).
    pub async fn create_overlay(
        &self,
        base: &CachedImage,
        overlay: &Path,
    ) -> Result<(), CacheError> {
        let overlay = std::path::absolute(overlay).map_err(CacheError::io("resolve", overlay))?;
        let span =
            info_span!("create_overlay", overlay = %overlay.display(), base = %base.path.display());
        async {
            if overlay_exists(base, &overlay).await? {
                debug!("the overlay already exists");
                return Ok(());
            }
            let (Some(dir), Some(name)) = (overlay.parent(), overlay.file_name()) else {
                return Err(CacheError::io("create", &overlay)(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an overlay path needs a directory and a file name",
                )));
            };
            let prefix = format!(".{}.", name.to_string_lossy());
            remove_stale_temps(dir, &prefix).await;
            let template = self.overlay_template(base).await?;
            let tmp = TempFile(Some(
                dir.join(format!("{prefix}{}.tmp", uuid::Uuid::new_v4().simple())),
            ));
            let target = overlay.clone();
            let linked = blocking(move || {
                copy_template(&template, tmp.path())?;
                link_file(tmp, &target)
            })
            .await?;
            match linked {
                Ok(()) => {
                    info!("overlay created");
                    Ok(())
                }
                // Another caller created it meanwhile: fine if over the same base.
                Err(CacheError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    if overlay_exists(base, &overlay).await? {
                        Ok(())
                    } else {
                        Err(CacheError::OverlayConflict {
                            overlay,
                            backing: None,
                        })
                    }
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
    }

    /// The overlay template of `base`, made if it is not there yet (under the publishing lock,
    /// so that launches of one image at once make it once, and no eviction runs meanwhile).
    /// Its backing file is the cache's own path of the image, the path `base` has.
    async fn overlay_template(&self, base: &CachedImage) -> Result<PathBuf, CacheError> {
        let path = self.template_path(&base.sha256, base.format);
        async fn there(p: &Path) -> bool {
            tokio::fs::symlink_metadata(p)
                .await
                .is_ok_and(|m| m.is_file())
        }
        if there(&path).await {
            return Ok(path);
        }
        let _publishing = self.inner.publish.lock().await;
        if there(&path).await {
            return Ok(path);
        }
        let tmp =
            TempFile(Some(self.config.dir.join("tmp").join(format!(
                "template-{}.qcow2",
                uuid::Uuid::new_v4().simple()
            ))));
        let backing = self.image_path(&base.sha256);
        qemu_img_overlay(&backing, base.format, tmp.path(), &path).await?;
        let target = path.clone();
        blocking(move || {
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o444))
                .map_err(CacheError::io("make read-only", tmp.path()))?;
            link_file(tmp, &target)
        })
        .await??;
        info!(template = %path.display(), "overlay template created");
        Ok(path)
    }

    /// Where the overlay template of image `sha` read as `format` is kept.
    fn template_path(&self, sha: &str, format: DiskFormat) -> PathBuf {
        self.config
            .dir
            .join(TEMPLATES_DIR)
            .join(format!("{sha}.{}", format.as_str()))
    }

    fn image_path(&self, sha: &str) -> PathBuf {
        self.config.dir.join("sha256").join(sha)
    }
}

/// The slowest average an image download may keep once the read-idle timeout has passed.
pub const MIN_FETCH_RATE: u64 = 64 * 1024;

/// Whether `received` bytes in `elapsed` is slower than [`MIN_FETCH_RATE`], judged only once
/// `idle` has passed (a slow start is not a slow download). Pure.
fn too_slow(received: u64, elapsed: Duration, idle: Duration) -> bool {
    elapsed > idle && (received as f64) < MIN_FETCH_RATE as f64 * elapsed.as_secs_f64()
}

/// Which images to evict, least recently used first, so that the rest fit in `max_bytes`.
/// `entries` are `(sha256, size, last_used)`, a larger `last_used` being a more recent use;
/// images in `in_use` are never chosen, even if the rest cannot fit.
pub fn choose_evictions(
    entries: &[(String, u64, u64)],
    in_use: &HashSet<String>,
    max_bytes: u64,
) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
    let mut candidates: Vec<&(String, u64, u64)> = entries
        .iter()
        .filter(|(sha, _, _)| !in_use.contains(sha))
        .collect();
    candidates.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
    let mut chosen = Vec::new();
    for (sha, size, _) in candidates {
        if total <= max_bytes {
            break;
        }
        total -= size;
        chosen.push(sha.clone());
    }
    chosen
}

/// Removes the temporary overlays (`<prefix><uuid>.tmp`) in `dir` that an agent killed while it
/// made them left behind: older than any qemu-img may run, so none is still being written.
async fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    let stale_after = QEMU_IMG_TIMEOUT * 2;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if !(file.starts_with(prefix) && file.ends_with(".tmp")) {
            continue;
        }
        let old = entry
            .metadata()
            .await
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > stale_after));
        if old {
            if let Err(error) = tokio::fs::remove_file(entry.path()).await {
                debug!(%error, file = %file, "cannot remove a stale temporary overlay");
            }
        }
    }
}

/// Makes the empty qcow2 overlay `path` over `backing` (read as `format`) with `qemu-img`.
async fn qemu_img_overlay(
    backing: &Path,
    format: DiskFormat,
    path: &Path,
    reported_as: &Path,
) -> Result<(), CacheError> {
    let mut create = tokio::process::Command::new("qemu-img");
    create
        .args(["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
        .arg(backing)
        .arg(path);
    run_qemu_img(create, "create", reported_as).await?;
    Ok(())
}

/// Copies the overlay template `template` to the new file `to`, made as any new file of the
/// agent's is (the template itself is read-only).
fn copy_template(template: &Path, to: &Path) -> Result<(), CacheError> {
    let mut from = std::fs::File::open(template).map_err(CacheError::io("read", template))?;
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(CacheError::io("create", to))?;
    io::copy(&mut from, &mut file).map_err(CacheError::io("write", to))?;
    Ok(())
}

/// Removes an overlay; an overlay already absent is fine.
pub async fn remove_overlay(overlay: &Path) -> Result<(), CacheError> {
    match tokio::fs::remove_file(overlay).await {
        Ok(()) => {
            info!(overlay = %overlay.display(), "overlay removed");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::io("remove", overlay)(e)),
    }
}

/// Whether `overlay` exists as a qcow2 over `base`; an error if it exists as anything else.
async fn overlay_exists(base: &CachedImage, overlay: &Path) -> Result<bool, CacheError> {
    match tokio::fs::symlink_metadata(overlay).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(CacheError::io("inspect", overlay)(e)),
    }
    // --force-share: a running domain holds the overlay's write lock.
    let info = qemu_img_info(overlay, true).await?;
    let over_base = info.format == "qcow2"
        && info.backing.as_deref().map(Path::new) == Some(base.path.as_path())
        && info
            .backing_format
            .as_deref()
            .is_none_or(|f| f == base.format.as_str());
    if over_base {
        Ok(true)
    } else {
        Err(CacheError::OverlayConflict {
            overlay: overlay.to_path_buf(),
            backing: info.backing,
        })
    }
}

/// A temporary file, removed when dropped unless [`keep`](TempFile::keep) was called.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0
            .as_deref()
            .expect("a TempFile holds its path until it is kept")
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(path = %path.display(), "removed a temporary file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot remove a temporary file")
                }
            }
        }
    }
}

/// Copies a local image into `part`, hashing as it goes, and syncs it.
fn copy_local(location: &str, part: &Path, limit: u64) -> Result<(String, u64), CacheError> {
    let unreadable = |e: io::Error| {
        if e.kind() == io::ErrorKind::NotFound {
            CacheError::NotFound {
                location: location.to_owned(),
            }
        } else {
            CacheError::Unreadable {
                location: location.to_owned(),
                source: Arc::new(e),
            }
        }
    };
    let mut src = std::fs::File::open(location).map_err(unreadable)?;
    // Larger than the whole cache: copying it would evict every image not in use, and then
    // not fit (as a download announcing that length is refused).
    if src.metadata().map_err(unreadable)?.len() > limit {
        return Err(CacheError::TooLarge {
            location: location.to_owned(),
            limit,
        });
    }
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(part)
        .map_err(CacheError::io("create", part))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; COPY_BUFFER_BYTES];
    let mut size = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(unreadable(e)),
        };
        size += n as u64;
        // A file that grows, or a device that reports no length, stops at the limit too.
        if size > limit {
            return Err(CacheError::TooLarge {
                location: location.to_owned(),
                limit,
            });
        }
        hasher.update(&buf[..n]);
        if is_zero(&buf[..n]) {
            // Left a hole: a sparse raw image stays sparse in the cache.
            io::Seek::seek(&mut dst, io::SeekFrom::Current(n as i64))
                .map_err(CacheError::io("write", part))?;
        } else {
            dst.write_all(&buf[..n])
                .map_err(CacheError::io("write", part))?;
        }
    }
    dst.set_len(size).map_err(CacheError::io("write", part))?;
    dst.sync_all().map_err(CacheError::io("sync", part))?;
    Ok((hex(&hasher.finalize()), size))
}

/// Whether `bytes` are all zero (written as a hole instead).
fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Makes `part` read-only, renames it to `target` and syncs the directory.
fn publish_file(part: TempFile, target: &Path) -> Result<(), CacheError> {
    let from = part.path();
    std::fs::set_permissions(from, std::fs::Permissions::from_mode(0o444))
        .map_err(CacheError::io("make read-only", from))?;
    std::fs::rename(from, target).map_err(CacheError::io("publish", target))?;
    part.keep();
    sync_parent(target)
}

/// Syncs `tmp` and links it to `target`, failing if `target` exists; `tmp` is then removed.
fn link_file(tmp: TempFile, target: &Path) -> Result<(), CacheError> {
    let from = tmp.path();
    std::fs::File::open(from)
        .and_then(|f| f.sync_all())
        .map_err(CacheError::io("sync", from))?;
    std::fs::hard_link(from, target).map_err(CacheError::io("publish", target))?;
    drop(tmp);
    sync_parent(target)
}

fn sync_parent(path: &Path) -> Result<(), CacheError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(CacheError::io("sync", dir))
}

/// Sets the mtime of a cached image to now: its last use, read back by [`ImageCache::open`].
/// The content IDs and checksums kept in `path` ([`CONTENTS_FILE`]); none when it is missing
/// or unreadable (its bytes are then fetched again, nothing worse).
fn read_contents(path: &Path) -> HashMap<String, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<HashMap<String, String>>(&bytes)
            .map(|m| m.into_iter().filter(|(_, sha)| is_sha256(sha)).collect())
            .unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "ignoring an unreadable record of S3 bytes");
                HashMap::new()
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the record of S3 bytes");
            HashMap::new()
        }
    }
}

/// Writes `contents` to `path` whole: to a temporary file, synced, then renamed into place.
fn write_contents(path: &Path, contents: &HashMap<String, String>) -> Result<(), CacheError> {
    let tmp = path.with_extension("json.part");
    let bytes = serde_json::to_vec(contents).map_err(|e| {
        CacheError::io("encode", path)(io::Error::new(io::ErrorKind::InvalidData, e))
    })?;
    let mut file = std::fs::File::create(&tmp).map_err(CacheError::io("create", &tmp))?;
    io::Write::write_all(&mut file, &bytes).map_err(CacheError::io("write", &tmp))?;
    file.sync_all().map_err(CacheError::io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(CacheError::io("publish", path))?;
    sync_parent(path)
}

fn touch(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.set_modified(SystemTime::now())
}

fn next_tick(state: &mut State) -> u64 {
    state.tick += 1;
    state.tick
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| CacheError::TaskFailed)
}

/// What `qemu-img info` says of an image.
#[derive(Debug, PartialEq, Eq)]
struct ImageInfo {
    format: String,
    backing: Option<String>,
    backing_format: Option<String>,
    data_file: Option<String>,
}

/// The first bytes of every qcow2 file.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Checks that the file at `path`, declared qcow2 by `source`, is a qcow2 image that names no
/// other file. qemu-img is told the format rather than left to guess it: what it guesses from
/// untrusted bytes (a vmdk descriptor) may make it open other files of the node. Bytes that
/// are not a readable qcow2 are a wrong image for good.
async fn verify_qcow2(source: &ImageSource, path: &Path) -> Result<(), CacheError> {
    let mismatch = |actual: String| CacheError::FormatMismatch {
        location: source.location.clone(),
        declared: source.format.as_str(),
        actual,
    };
    let head = {
        let file = path.to_path_buf();
        blocking(move || -> io::Result<Vec<u8>> {
            let mut head = Vec::with_capacity(QCOW2_MAGIC.len());
            io::Read::read_to_end(
                &mut io::Read::take(std::fs::File::open(file)?, QCOW2_MAGIC.len() as u64),
                &mut head,
            )?;
            Ok(head)
        })
        .await?
        .map_err(CacheError::io("read", path))?
    };
    if head != QCOW2_MAGIC {
        return Err(mismatch(
            "not qcow2 (no qcow2 magic at its start)".to_owned(),
        ));
    }
    let info = match qemu_img_info_as(path, false, Some("qcow2")).await {
        Ok(info) => info,
        // Only an answer about the bytes: a qemu-img that timed out on a busy node, or could
        // not be started, is tried again.
        Err(CacheError::QemuImg {
            detail, ran: true, ..
        }) => return Err(mismatch(format!("not a readable qcow2 ({detail})"))),
        Err(e) => return Err(e),
    };
    check_format(source, &info)
}

/// Runs `qemu-img info --output=json` on `path`. It does not open backing files.
async fn qemu_img_info(path: &Path, force_share: bool) -> Result<ImageInfo, CacheError> {
    qemu_img_info_as(path, force_share, None).await
}

/// [`qemu_img_info`], reading the file as `format` when given instead of guessing it.
async fn qemu_img_info_as(
    path: &Path,
    force_share: bool,
    format: Option<&str>,
) -> Result<ImageInfo, CacheError> {
    let mut info = tokio::process::Command::new("qemu-img");
    info.args(["info", "--output=json"]);
    if let Some(format) = format {
        info.args(["-f", format]);
    }
    if force_share {
        info.arg("--force-share");
    }
    info.arg(path);
    let stdout = run_qemu_img(info, "info", path).await?;
    parse_info(&stdout).ok_or_else(|| CacheError::QemuImg {
        action: "info",
        path: path.to_path_buf(),
        detail: "its output is not the JSON expected".to_owned(),
        ran: true,
    })
}

fn parse_info(json: &[u8]) -> Option<ImageInfo> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    Some(ImageInfo {
        format: text("/format")?,
        backing: text("/backing-filename"),
        backing_format: text("/backing-filename-format"),
        data_file: text("/format-specific/data/data-file"),
    })
}

/// Runs `qemu-img` with a time limit; its stdout, or its stderr as the error.
async fn run_qemu_img(
    mut command: tokio::process::Command,
    action: &'static str,
    path: &Path,
) -> Result<Vec<u8>, CacheError> {
    let failed = |detail: String, ran: bool| CacheError::QemuImg {
        action,
        path: path.to_path_buf(),
        detail,
        ran,
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .map_err(|e| failed(format!("cannot start it: {e}"), false))?;
    let output = tokio::time::timeout(QEMU_IMG_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| failed(format!("no answer within {QEMU_IMG_TIMEOUT:?}"), false))?
        .map_err(|e| failed(e.to_string(), false))?;
    if !output.status.success() {
        // Killed by a signal (the OOM killer, say) is not an answer about the image either.
        let ran = output.status.code().is_some();
        return Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ran,
        ));
    }
    Ok(output.stdout)
}

/// Checks what `qemu-img info` says against the declared format: a declared qcow2 must be a
/// qcow2 with neither backing file nor external data file. A declared raw is trusted: it is
/// always read as raw.
fn check_format(source: &ImageSource, info: &ImageInfo) -> Result<(), CacheError> {
    if source.format != DiskFormat::Qcow2 {
        return Ok(());
    }
    if info.format != "qcow2" {
        return Err(CacheError::FormatMismatch {
            location: source.location.clone(),
            declared: source.format.as_str(),
            actual: info.format.clone(),
        });
    }
    if let Some(backing) = &info.backing {
        return Err(CacheError::BackingFile {
            location: source.location.clone(),
            backing: backing.clone(),
        });
    }
    if let Some(data_file) = &info.data_file {
        return Err(CacheError::DataFile {
            location: source.location.clone(),
            data_file: data_file.clone(),
        });
    }
    Ok(())
}

fn http_client(
    connect: Duration,
    roots: &[reqwest::Certificate],
) -> Result<reqwest::Client, CacheError> {
    roots
        .iter()
        .fold(
            reqwest::Client::builder().connect_timeout(connect),
            |builder, root| builder.add_root_certificate(root.clone()),
        )
        .build()
        .map_err(|e| CacheError::HttpClient {
            source: Arc::new(e),
        })
}

/// Where a location's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An absolute path on the node.
    Path,
    /// An `http://` or `https://` URL.
    Http,
    /// An object in the gateway's S3: `s3://bucket/key` or `bucket/key`.
    S3,
}

/// What kind of location `location` is; `None` for none the cache fetches. Pure.
pub fn kind(location: &str) -> Option<Kind> {
    if location.starts_with("http://") || location.starts_with("https://") {
        Some(Kind::Http)
    } else if Path::new(location).is_absolute() {
        Some(Kind::Path)
    } else if crds::image::s3_location(location).is_some() {
        Some(Kind::S3)
    } else {
        None
    }
}

/// What an S3 error status of a presigned image URL means, for messages. S3 answers a reader
/// who may not list the bucket 403 for a missing object, not 404. Pure.
pub fn s3_status_hint(status: u16) -> &'static str {
    match status {
        404 => ": the object or its bucket does not exist",
        403 => ": the object does not exist, or its presigned URL was refused (expired?)",
        _ => "",
    }
}

/// The `<Code>` of an S3 error answer, e.g. `NoSuchKey`. Pure.
pub fn s3_error_code(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let (_, rest) = text.split_once("<Code>")?;
    let (code, _) = rest.split_once("</Code>")?;
    let code = code.trim();
    (!code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| code.to_owned())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks the location and lower-cases the declared sha256.
fn normalise(source: &ImageSource) -> Result<ImageSource, CacheError> {
    if kind(&source.location).is_none() {
        return Err(CacheError::InvalidLocation {
            location: source.location.clone(),
        });
    }
    let sha256 = match &source.sha256 {
        None => None,
        Some(value) => {
            let lower = value.to_ascii_lowercase();
            if !is_sha256(&lower) {
                return Err(CacheError::InvalidSha256 {
                    value: value.clone(),
                });
            }
            Some(lower)
        }
    };
    Ok(ImageSource {
        location: source.location.clone(),
        sha256,
        format: source.format,
    })
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_is_too_slow_only_below_the_minimum_rate_after_the_idle_timeout() {
        let s = Duration::from_secs;
        let idle = s(30);
        for (received, elapsed, slow) in [
            // A slow start is not judged.
            (0, s(10), false),
            (1, s(29), false),
            // One byte every 25 s: caught after the first idle period.
            (2, s(50), true),
            (MIN_FETCH_RATE * 31, s(31), false),
            (MIN_FETCH_RATE * 30, s(31), true),
            (1 << 30, s(60), false),
        ] {
            assert_eq!(
                too_slow(received, elapsed, idle),
                slow,
                "{received} in {elapsed:?}"
            );
        }
    }

    #[test]
    fn only_errors_about_the_image_itself_fail_an_instance_for_good() {
        let at = || "http://images.example/x".to_string();
        let refused = |status| CacheError::Presign {
            location: at(),
            source: PresignError::Refused {
                status,
                message: "no".into(),
            },
        };
        let http = |status| CacheError::HttpStatus {
            location: at(),
            status,
        };
        for (error, permanent) in [
            (http(404), true),
            (http(403), true),
            (http(429), false),
            (http(503), false),
            (refused(403), true),
            (refused(502), false),
            (
                CacheError::Presign {
                    location: at(),
                    source: PresignError::Timeout(Duration::from_secs(5)),
                },
                false,
            ),
            (
                CacheError::Stalled {
                    location: at(),
                    idle: Duration::from_secs(30),
                },
                false,
            ),
            (
                CacheError::ChecksumMismatch {
                    expected: "a".into(),
                    actual: "b".into(),
                    location: at(),
                },
                true,
            ),
            (CacheError::NotFound { location: at() }, true),
            (CacheError::TaskFailed, false),
        ] {
            assert_eq!(error.is_permanent(), permanent, "{error}");
        }
    }

    fn sha_of(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    fn raw(location: &Path, sha256: Option<String>) -> ImageSource {
        ImageSource {
            location: location.to_str().expect("test paths are UTF-8").to_owned(),
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

    fn set(shas: &[&str]) -> HashSet<String> {
        shas.iter().map(|s| (*s).to_owned()).collect()
    }

    fn qemu_img(args: &[&str]) {
        let status = std::process::Command::new("qemu-img")
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("qemu-img runs");
        assert!(status.success(), "qemu-img {args:?} failed");
    }

    #[test]
    fn choose_evictions_picks_least_recently_used_not_in_use_until_under_the_limit() {
        let e = |sha: &str, size, used| (sha.to_owned(), size, used);
        let entries = [e("a", 10, 3), e("b", 10, 1), e("c", 10, 2), e("d", 10, 4)];
        let cases: &[(&str, &[&str], u64, &[&str])] = &[
            ("under the limit: nothing", &[], 40, &[]),
            ("over by one image: the oldest", &[], 30, &["b"]),
            (
                "over by two: the two oldest, oldest first",
                &[],
                20,
                &["b", "c"],
            ),
            (
                "the oldest in use: the next oldest instead",
                &["b"],
                30,
                &["c"],
            ),
            (
                "limit zero: everything not in use",
                &["a", "d"],
                0,
                &["b", "c"],
            ),
            ("everything in use: nothing", &["a", "b", "c", "d"], 0, &[]),
        ];
        for (case, in_use, max, want) in cases {
            let got = choose_evictions(&entries, &set(in_use), *max);
            assert_eq!(got, want.to_vec(), "{case}");
        }
    }

    #[test]
    fn choose_evictions_breaks_ties_by_sha_and_stops_once_under_the_limit() {
        let entries = [
            ("y".to_owned(), 5, 1),
            ("x".to_owned(), 5, 1),
            ("z".to_owned(), 100, 9),
        ];
        assert_eq!(
            choose_evictions(&entries, &HashSet::new(), 105),
            vec!["x".to_owned()]
        );
        assert!(choose_evictions(&[], &HashSet::new(), 0).is_empty());
    }

    #[test]
    fn locations_are_paths_urls_or_s3_objects() {
        let cases = [
            ("/var/lib/karri/images/a.raw", Some(Kind::Path)),
            ("http://127.0.0.1:8080/a.raw", Some(Kind::Http)),
            ("https://images.example/a.raw", Some(Kind::Http)),
            ("images/a.raw", Some(Kind::S3)),
            ("images/micro/disk.img", Some(Kind::S3)),
            ("s3://images/micro/disk.img", Some(Kind::S3)),
            ("a.raw", None),
            ("images/", None),
            ("Bad_Bucket/a.raw", None),
            ("ftp://images.example/a.raw", None),
            ("s3:///images/a.raw", None),
            ("", None),
        ];
        for (location, want) in cases {
            assert_eq!(kind(location), want, "{location}");
        }
    }

    #[test]
    fn s3_error_answers_give_their_code() {
        let cases: [(&[u8], Option<&str>); 5] = [
            (
                b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>",
                Some("NoSuchKey"),
            ),
            (
                b"<Error><Code>AccessDenied</Code></Error>",
                Some("AccessDenied"),
            ),
            (b"<Error><Code></Code></Error>", None),
            (b"<Error><Code>a<b>c</Code></Error>", None),
            (b"not found", None),
        ];
        for (body, want) in cases {
            assert_eq!(
                s3_error_code(body).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_location_of_no_kind_or_a_malformed_sha256_is_refused() {
        let relative = ImageSource {
            location: "a.raw".to_owned(),
            sha256: None,
            format: DiskFormat::Raw,
        };
        assert!(matches!(
            normalise(&relative),
            Err(CacheError::InvalidLocation { .. })
        ));
        let short = raw(Path::new("/a.raw"), Some("abc".to_owned()));
        assert!(matches!(
            normalise(&short),
            Err(CacheError::InvalidSha256 { .. })
        ));
        let upper = raw(Path::new("/a.raw"), Some(sha_of(b"x").to_uppercase()));
        assert_eq!(normalise(&upper).expect("valid").sha256, Some(sha_of(b"x")));
    }

    #[test]
    fn qemu_img_info_json_is_read_for_format_backing_and_data_file() {
        let json =
            br#"{"format": "qcow2", "backing-filename": "/b", "backing-filename-format": "raw",
            "format-specific": {"type": "qcow2", "data": {"data-file": "/d"}}}"#;
        let want = ImageInfo {
            format: "qcow2".to_owned(),
            backing: Some("/b".to_owned()),
            backing_format: Some("raw".to_owned()),
            data_file: Some("/d".to_owned()),
        };
        assert_eq!(parse_info(json), Some(want));
        assert_eq!(parse_info(b"{}"), None);
    }

    #[tokio::test]
    async fn only_a_qemu_img_that_ran_to_its_end_says_anything_of_the_image() {
        let path = Path::new("/nonexistent/image");
        let missing = tokio::process::Command::new("/nonexistent/qemu-img");
        match run_qemu_img(missing, "info", path).await {
            Err(CacheError::QemuImg { ran, .. }) => assert!(!ran, "could not be started"),
            other => panic!("expected a qemu-img error, got {other:?}"),
        }
        let refusing = tokio::process::Command::new("false");
        match run_qemu_img(refusing, "info", path).await {
            Err(CacheError::QemuImg { ran, .. }) => assert!(ran, "exited non-zero"),
            other => panic!("expected a qemu-img error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_local_image_without_declared_sha_is_stored_read_only_under_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.raw");
        std::fs::write(&src, b"image bytes").expect("write");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");

        let image = cache.get(&raw(&src, None)).await.expect("get");

        assert_eq!(image.sha256, sha_of(b"image bytes"));
        assert_eq!(
            image.path,
            dir.path().join("cache/sha256").join(&image.sha256)
        );
        assert_eq!(image.size, 11);
        assert_eq!(std::fs::read(&image.path).expect("read"), b"image bytes");
        let mode = std::fs::metadata(&image.path)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
        assert_eq!(cache.size(), 11);
        assert!(names(&dir.path().join("cache/tmp")).is_empty());
    }

    #[tokio::test]
    async fn a_local_image_larger_than_the_cache_is_refused_for_good_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.raw");
        std::fs::write(&src, vec![7u8; 2048]).expect("write");
        let cache = ImageCache::open(dir.path().join("cache"), 1024).expect("open");
        let err = cache.get(&raw(&src, None)).await.expect_err("too large");
        assert!(
            matches!(err, CacheError::TooLarge { limit: 1024, .. }),
            "{err}"
        );
        assert!(err.is_permanent());
        // A device reporting no length stops at the limit too.
        let zero = cache
            .get(&raw(Path::new("/dev/zero"), None))
            .await
            .expect_err("endless");
        assert!(matches!(zero, CacheError::TooLarge { .. }), "{zero}");
        assert!(names(&dir.path().join("cache/tmp")).is_empty());
        assert_eq!(cache.size(), 0);
    }

    #[tokio::test]
    async fn a_sparse_image_stays_sparse_in_the_cache_with_its_bytes_and_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("sparse.raw");
        let mut bytes = vec![0u8; 8 << 20];
        bytes[4096] = 1;
        let last = bytes.len() - 1;
        bytes[last] = 0; // ends in a hole
        std::fs::write(&src, &bytes).expect("write");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 30).expect("open");
        let image = cache.get(&raw(&src, None)).await.expect("get");
        assert_eq!(image.sha256, sha_of(&bytes));
        assert_eq!(image.size, bytes.len() as u64);
        assert_eq!(std::fs::read(&image.path).expect("read"), bytes);
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image.path).expect("meta"))
                * 512;
        assert!(
            allocated < (1 << 20),
            "{allocated} bytes allocated for 8 MiB of mostly zeros"
        );
    }

    #[tokio::test]
    async fn a_checksum_mismatch_leaves_no_file_in_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.raw");
        std::fs::write(&src, b"tampered").expect("write");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let declared = sha_of(b"original");

        let err = cache
            .get(&raw(&src, Some(declared.clone())))
            .await
            .expect_err("mismatch");

        match err {
            CacheError::ChecksumMismatch {
                expected,
                actual,
                location,
            } => {
                assert_eq!(expected, declared);
                assert_eq!(actual, sha_of(b"tampered"));
                assert_eq!(location, src.to_str().expect("UTF-8"));
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(names(&dir.path().join("cache/sha256")).is_empty());
        assert!(names(&dir.path().join("cache/tmp")).is_empty());
        assert_eq!(cache.size(), 0);
    }

    #[tokio::test]
    async fn a_missing_local_image_is_not_found_with_its_location() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let missing = dir.path().join("missing.raw");

        let err = cache.get(&raw(&missing, None)).await.expect_err("missing");

        assert!(
            matches!(&err, CacheError::NotFound { location } if location == missing.to_str().expect("UTF-8"))
        );
        assert!(err.to_string().contains("missing.raw"), "{err}");
        assert!(names(&dir.path().join("cache/tmp")).is_empty());
    }

    #[tokio::test]
    async fn a_declared_sha_already_cached_is_returned_without_reading_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.raw");
        std::fs::write(&src, b"bytes").expect("write");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let source = raw(&src, Some(sha_of(b"bytes")));
        let first = cache.get(&source).await.expect("first get");
        std::fs::remove_file(&src).expect("remove the source");

        let second = cache.get(&source).await.expect("a hit needs no source");

        assert_eq!(second.path, first.path);
        assert_eq!(second.sha256, first.sha256);
    }

    #[tokio::test]
    async fn reopening_indexes_cached_images_and_deletes_leftover_temporary_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.raw");
        std::fs::write(&src, b"kept").expect("write");
        let cache_dir = dir.path().join("cache");
        let source = raw(&src, Some(sha_of(b"kept")));
        ImageCache::open(cache_dir.clone(), 1 << 20)
            .expect("open")
            .get(&source)
            .await
            .expect("get");
        std::fs::write(cache_dir.join("tmp/crashed.part"), b"half").expect("write");
        std::fs::remove_file(&src).expect("remove the source");

        let reopened = ImageCache::open(cache_dir.clone(), 1 << 20).expect("reopen");

        assert!(names(&cache_dir.join("tmp")).is_empty());
        assert_eq!(reopened.size(), 4);
        let image = reopened.get(&source).await.expect("a hit after restart");
        assert_eq!(image.size, 4);
    }

    #[tokio::test]
    async fn a_cache_hit_is_remembered_across_a_restart_for_eviction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache_dir = dir.path().join("cache");
        let cache = ImageCache::open(cache_dir.clone(), 1 << 20).expect("open");
        let mut images = Vec::new();
        for name in ["a", "b"] {
            let path = dir.path().join(name);
            std::fs::write(&path, name.repeat(10)).expect("write");
            images.push(
                cache
                    .get(&raw(&path, Some(sha_of(name.repeat(10).as_bytes()))))
                    .await
                    .expect("get"),
            );
        }
        for (image, secs) in images.iter().zip([100, 200]) {
            std::fs::File::open(&image.path)
                .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
                .expect("age the image");
        }
        let a = dir.path().join("a");
        cache
            .get(&raw(&a, Some(images[0].sha256.clone())))
            .await
            .expect("a hit on a, the older");

        let restarted = ImageCache::open(cache_dir, 10).expect("reopen with room for one");
        let freed = restarted.evict(&HashSet::new()).await.expect("evict");

        assert_eq!(freed, 10);
        assert!(images[0].path.exists(), "a was used last");
        assert!(!images[1].path.exists());
    }

    #[tokio::test]
    async fn a_fetch_over_the_limit_evicts_the_least_recently_used_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 20).expect("open");
        let mut sources = Vec::new();
        for name in ["a", "b", "c"] {
            let path = dir.path().join(name);
            std::fs::write(&path, name.repeat(10)).expect("write");
            sources.push(raw(&path, Some(sha_of(name.repeat(10).as_bytes()))));
        }
        let a = cache.get(&sources[0]).await.expect("a");
        let b = cache.get(&sources[1]).await.expect("b");
        cache
            .get(&sources[0])
            .await
            .expect("a again, now the most recent");

        let c = cache.get(&sources[2]).await.expect("c");

        assert_eq!(cache.size(), 20);
        assert!(a.path.exists());
        assert!(!b.path.exists(), "b was the least recently used");
        assert!(c.path.exists());
    }

    #[tokio::test]
    async fn evict_never_removes_an_image_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let mut images = Vec::new();
        for name in ["a", "b"] {
            let path = dir.path().join(name);
            std::fs::write(&path, name.repeat(10)).expect("write");
            images.push(cache.get(&raw(&path, None)).await.expect("get"));
        }
        let limited = ImageCache::open(dir.path().join("cache"), 0).expect("reopen with no room");

        let freed = limited
            .evict(&set(&[&images[0].sha256]))
            .await
            .expect("evict");

        assert_eq!(freed, 10);
        assert!(images[0].path.exists());
        assert!(!images[1].path.exists());
        assert_eq!(limited.size(), 10);
        assert_eq!(
            limited
                .evict(&set(&[&images[0].sha256]))
                .await
                .expect("evict"),
            0
        );
    }

    #[tokio::test]
    async fn a_cached_file_deleted_behind_the_cache_is_replaced_by_the_next_fetch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.img");
        std::fs::write(&src, b"some image bytes").expect("write");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let first = cache.get(&raw(&src, None)).await.expect("fetched");
        std::fs::remove_file(&first.path).expect("deleted behind the cache");
        let again = cache.get(&raw(&src, None)).await.expect("fetched again");
        assert_eq!(again.path, first.path);
        assert_eq!(
            std::fs::read(&again.path).expect("the file is there again"),
            b"some image bytes"
        );
    }

    #[tokio::test]
    async fn a_declared_qcow2_that_is_raw_is_refused_and_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.img");
        std::fs::write(&src, vec![0u8; 4096]).expect("write");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let mut source = raw(&src, None);
        source.format = DiskFormat::Qcow2;

        let err = cache.get(&source).await.expect_err("not a qcow2");

        assert!(
            matches!(&err, CacheError::FormatMismatch { declared: "qcow2", actual, .. } if actual.starts_with("not qcow2")),
            "{err}"
        );
        assert!(err.is_permanent());
        assert!(names(&dir.path().join("cache/sha256")).is_empty());
        assert!(names(&dir.path().join("cache/tmp")).is_empty());
    }

    #[tokio::test]
    async fn a_declared_qcow2_that_is_corrupt_or_a_vmdk_fails_for_good_without_a_guess() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        // The qcow2 magic, then garbage: qemu-img cannot read it as qcow2.
        let corrupt = dir.path().join("corrupt.img");
        let mut bytes = QCOW2_MAGIC.to_vec();
        bytes.extend_from_slice(&[0xffu8; 4092]);
        std::fs::write(&corrupt, bytes).expect("write");
        // A vmdk descriptor naming a file of the node as its extent: never opened.
        let vmdk = dir.path().join("descriptor.vmdk");
        std::fs::write(
            &vmdk,
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/hostname\" 0\n",
        )
        .expect("write");
        for path in [&corrupt, &vmdk] {
            let mut source = raw(path, None);
            source.format = DiskFormat::Qcow2;
            let err = cache.get(&source).await.expect_err("not a qcow2");
            assert!(
                matches!(
                    &err,
                    CacheError::FormatMismatch {
                        declared: "qcow2",
                        ..
                    }
                ),
                "{}: {err}",
                path.display()
            );
            assert!(err.is_permanent(), "{err}");
        }
        assert!(names(&dir.path().join("cache/sha256")).is_empty());
    }

    #[tokio::test]
    async fn a_qcow2_with_a_backing_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret.raw");
        std::fs::write(&secret, vec![0u8; 65536]).expect("write");
        let src = dir.path().join("evil.qcow2");
        let (secret_s, src_s) = (
            secret.to_str().expect("UTF-8"),
            src.to_str().expect("UTF-8"),
        );
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret_s, src_s,
        ]);
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let mut source = raw(&src, None);
        source.format = DiskFormat::Qcow2;

        let err = cache.get(&source).await.expect_err("a backing file");

        assert!(
            matches!(&err, CacheError::BackingFile { backing, .. } if backing == secret_s),
            "{err}"
        );
        assert!(names(&dir.path().join("cache/sha256")).is_empty());
    }

    #[tokio::test]
    async fn a_plain_qcow2_is_cached_and_an_overlay_over_it_names_it_as_backing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("base.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            src.to_str().expect("UTF-8"),
            "1M",
        ]);
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let mut source = raw(&src, None);
        source.format = DiskFormat::Qcow2;
        let base = cache.get(&source).await.expect("a plain qcow2");
        let overlay = dir.path().join("vm/disk.qcow2");
        std::fs::create_dir_all(overlay.parent().expect("has a parent")).expect("mkdir");

        cache.create_overlay(&base, &overlay).await.expect("create");

        let info = qemu_img_info(&overlay, false).await.expect("info");
        assert_eq!(info.format, "qcow2");
        assert_eq!(
            info.backing.as_deref().map(Path::new),
            Some(base.path.as_path())
        );
        assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(names(&dir.path().join("vm")), vec!["disk.qcow2".to_owned()]);
    }

    #[tokio::test]
    async fn creating_an_overlay_twice_keeps_the_first_and_another_base_conflicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let mut bases = Vec::new();
        for (name, byte) in [("a.raw", 0u8), ("b.raw", 1u8)] {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![byte; 65536]).expect("write");
            bases.push(cache.get(&raw(&path, None)).await.expect("get"));
        }
        let overlay = dir.path().join("disk.qcow2");
        cache
            .create_overlay(&bases[0], &overlay)
            .await
            .expect("create");
        let first = std::fs::metadata(&overlay).expect("meta");

        cache
            .create_overlay(&bases[0], &overlay)
            .await
            .expect("idempotent");
        let err = cache
            .create_overlay(&bases[1], &overlay)
            .await
            .expect_err("another base");

        let again = std::fs::metadata(&overlay).expect("meta");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&again),
            std::os::unix::fs::MetadataExt::ino(&first)
        );
        assert!(
            matches!(&err, CacheError::OverlayConflict { backing: Some(b), .. } if Path::new(b) == bases[0].path)
        );
    }

    #[tokio::test]
    async fn overlays_of_one_image_are_copies_of_one_template_that_qemu_img_made_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let path = dir.path().join("a.raw");
        std::fs::write(&path, vec![7u8; 65536]).expect("write");
        let base = cache.get(&raw(&path, None)).await.expect("get");
        let (first, second) = (dir.path().join("1.qcow2"), dir.path().join("2.qcow2"));

        cache.create_overlay(&base, &first).await.expect("create");
        let template = cache.template_path(&base.sha256, DiskFormat::Raw);
        let made = std::fs::metadata(&template).expect("the template is kept");
        cache.create_overlay(&base, &second).await.expect("create");

        let again = std::fs::metadata(&template).expect("the template is kept");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&again),
            std::os::unix::fs::MetadataExt::ino(&made),
            "the template was made again"
        );
        assert_eq!(
            made.permissions().mode() & 0o222,
            0,
            "the template is writable"
        );
        let fresh = dir.path().join("fresh.qcow2");
        let backing = base.path.to_str().expect("UTF-8");
        let fresh_path = fresh.to_str().expect("UTF-8");
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, fresh_path,
        ]);
        let want = std::fs::read(&fresh).expect("read");
        for overlay in [&first, &second] {
            assert_eq!(
                std::fs::read(overlay).expect("read"),
                want,
                "{} is not what qemu-img makes",
                overlay.display()
            );
            let mode = std::fs::metadata(overlay)
                .expect("meta")
                .permissions()
                .mode();
            assert_ne!(mode & 0o200, 0, "{} is read-only", overlay.display());
            let info = qemu_img_info(overlay, false).await.expect("info");
            assert_eq!(
                info.backing.as_deref().map(Path::new),
                Some(base.path.as_path())
            );
        }
    }

    #[tokio::test]
    async fn an_evicted_image_takes_its_overlay_template_along_and_a_reopened_cache_makes_them_again(
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 100_000).expect("open");
        let mut bases = Vec::new();
        for (name, byte) in [("a.raw", 1u8), ("b.raw", 2u8)] {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![byte; 65536]).expect("write");
            let base = cache.get(&raw(&path, None)).await.expect("get");
            cache
                .create_overlay(&base, &dir.path().join(format!("{name}.qcow2")))
                .await
                .expect("create");
            bases.push(base);
        }
        let templates = dir.path().join("cache").join(TEMPLATES_DIR);

        // Fetching b evicted a (the cache holds one of them): a's template went with it.
        assert!(!bases[0].path.exists(), "a was not evicted");
        assert_eq!(names(&templates), vec![format!("{}.raw", bases[1].sha256)]);

        // Reopened, the cache makes its templates again: they name the image by the path the
        // cache had (a cache moved elsewhere would otherwise give overlays a backing file that
        // is not there).
        let orphan = templates.join(format!("{}.qcow2", "0".repeat(64)));
        std::fs::write(&orphan, b"an overlay over an image not cached").expect("write");
        drop(cache);
        std::fs::rename(dir.path().join("cache"), dir.path().join("moved")).expect("move");
        let moved = ImageCache::open(dir.path().join("moved"), 100_000).expect("reopen");
        assert!(names(&dir.path().join("moved").join(TEMPLATES_DIR)).is_empty());
        let source = raw(&dir.path().join("b.raw"), None);
        let base = moved.get(&source).await.expect("still cached");
        let overlay = dir.path().join("after-the-move.qcow2");
        moved.create_overlay(&base, &overlay).await.expect("create");
        let info = qemu_img_info(&overlay, false).await.expect("info");
        assert_eq!(
            info.backing.as_deref().map(Path::new),
            Some(base.path.as_path())
        );
        assert!(base.path.starts_with(dir.path().join("moved")));
    }

    #[test]
    fn a_fetch_starts_only_with_room_beside_the_fetches_under_way_and_the_disks_floor() {
        const GIB: u64 = 1 << 30;
        let rows = [
            // free, reserved by others, needed, floor, starts
            (20 * GIB, 0, 15 * GIB, GIB, true),
            (20 * GIB, 15 * GIB, 15 * GIB, GIB, false),
            (20 * GIB, 0, 19 * GIB, GIB, true),
            (20 * GIB, 0, 19 * GIB + 1, GIB, false),
            (GIB / 2, 0, 0, GIB, false),
            (GIB, 0, 0, GIB, true),
            (GIB, 5 * GIB, 1, 0, false),
        ];
        for (free, reserved, needed, floor, starts) in rows {
            assert_eq!(
                room_for(free, reserved, needed, floor),
                starts,
                "free {free}, reserved {reserved}, needed {needed}, floor {floor}"
            );
        }
        assert_eq!(floor_of(10 * GIB), GIB / 2);
        assert_eq!(floor_of(100 * GIB), GIB);
    }

    #[tokio::test]
    async fn a_temporary_overlay_left_by_a_killed_agent_goes_at_the_next_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("cache"), 1 << 20).expect("open");
        let path = dir.path().join("a.raw");
        std::fs::write(&path, vec![0u8; 65536]).expect("write");
        let base = cache.get(&raw(&path, None)).await.expect("get");
        let stale = dir.path().join(".disk.qcow2.0123abcd.tmp");
        let fresh = dir.path().join(".disk.qcow2.4567ef01.tmp");
        for file in [&stale, &fresh] {
            std::fs::write(file, b"half an overlay").expect("write");
        }
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(an_hour_ago))
            .expect("aged");
        cache
            .create_overlay(&base, &dir.path().join("disk.qcow2"))
            .await
            .expect("create");
        assert!(
            !stale.exists(),
            "the stale temporary overlay is still there"
        );
        assert!(fresh.exists(), "one that may still be written was removed");
    }

    #[tokio::test]
    async fn removing_an_overlay_twice_is_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let overlay = dir.path().join("disk.qcow2");
        std::fs::write(&overlay, b"x").expect("write");

        remove_overlay(&overlay).await.expect("remove");
        remove_overlay(&overlay).await.expect("absent is fine");

        assert!(!overlay.exists());
    }
}
