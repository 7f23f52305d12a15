//! Object bytes: a blob store behind a trait. The default keeps each blob in a file of the
//! gateway's data directory, written to a temporary file, fsynced, then renamed into place, so
//! a blob is either whole or absent. Blobs are named by random IDs; the object index in etcd
//! says which blobs make up which object.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use md5::{Digest, Md5};

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob does not exist (deleted by an overwrite that raced the read).
    #[error("blob {0} does not exist")]
    Missing(String),
    /// The client's body ended early or could not be read.
    #[error("the request body could not be read: {0}")]
    Body(String),
    /// A streaming chunk's signature does not match (the body was altered on its way).
    #[error("a chunk signature of the body does not match")]
    ChunkSignature,
    /// The body's SHA-256 is not the signed `x-amz-content-sha256`.
    #[error("the body's SHA-256 does not match x-amz-content-sha256")]
    Sha256Mismatch,
    /// The body is longer than allowed.
    #[error("the object is larger than {0} bytes")]
    TooLarge(u64),
    /// The disk failed.
    #[error("blob storage failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A blob just written: its ID, size and MD5.
#[derive(Debug, Clone)]
pub struct Written {
    /// Random ID naming the blob.
    pub id: String,
    /// Bytes written.
    pub size: u64,
    /// MD5 of the bytes (the S3 ETag of a single-part object).
    pub md5: [u8; 16],
}

/// A stream of body chunks, as s3s hands them over.
pub type ByteStream<'a> =
    std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, BlobError>> + Send + 'a>>;

/// Where object bytes live. Every write is all-or-nothing: a crash leaves no visible partial
/// blob, only unnamed temporary data that [`BlobStore::sweep_temporary`] reclaims.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Writes `body` as a new blob, durably, and returns its ID, size and MD5; fails with
    /// [`BlobError::TooLarge`] past `limit` bytes.
    async fn put(&self, body: ByteStream<'_>, limit: u64) -> Result<Written, BlobError>;
    /// Reads `range` (byte offsets within the blob) as a stream.
    async fn get(
        &self,
        id: &str,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream<'static>, BlobError>;
    /// Whether [`BlobStore::get`] pins the bytes it will stream (an open file outlives its
    /// name), so that a blob deleted after `get` returned is still read whole. A store that
    /// pins cheaply has every part of an object opened up front; one that does not has its
    /// parts after the first asked for one after another.
    fn get_pins(&self) -> bool {
        false
    }
    /// Deletes a blob; deleting a missing blob is not an error.
    async fn delete(&self, id: &str) -> Result<(), BlobError>;
    /// Every blob with its modification time (for the orphan sweep).
    async fn list(&self) -> Result<Vec<(String, SystemTime)>, BlobError>;
    /// Removes temporary data older than `older_than` left by writes that never finished;
    /// returns how many were removed.
    async fn sweep_temporary(&self, older_than: SystemTime) -> Result<usize, BlobError>;
}

/// Blobs as files: `<dir>/blobs/<first two hex digits>/<id>`, written through `<dir>/tmp`.
#[derive(Debug, Clone)]
pub struct FsBlobs {
    dir: PathBuf,
}

/// Size of the reads of a GET.
const READ_CHUNK: usize = 1024 * 1024;
/// Reads a GET's reader thread may be ahead of the network.
const READS_IN_FLIGHT: usize = 8;
/// Bytes gathered before each write of a PUT.
const WRITE_BUFFER: usize = 1024 * 1024;
/// Bodies up to this size are hashed by the receiving task (about 0.1 ms of MD5), larger ones
/// on a thread of their own.
const INLINE_HASH_MAX: usize = 64 * 1024;

impl FsBlobs {
    /// A store in `dir`, creating its folders.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        std::fs::create_dir_all(dir.join("blobs"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path_of(&self, id: &str) -> Option<PathBuf> {
        // IDs are ours (hex); anything else names no blob, never a path elsewhere.
        if id.len() < 3 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(self.dir.join("blobs").join(&id[..2]).join(id))
    }
}

/// What the receiving task hands the writer thread.
enum Piece {
    Data(Bytes),
    End,
}

/// Pieces queued for the writer thread (bounds the memory one upload holds).
const PIECES_IN_FLIGHT: usize = 16;

fn writer_gone() -> BlobError {
    BlobError::Io(std::io::Error::other("the blob writer or hasher stopped"))
}

/// A blocking task that panicked or was cancelled.
fn joined(e: tokio::task::JoinError) -> BlobError {
    BlobError::Io(std::io::Error::other(e.to_string()))
}

/// Writes the pieces to `tmp`, and once `End` comes fsyncs the file, renames it to `path` and
/// fsyncs the directory. Without `End` (the body failed) nothing is published.
fn write_blob(
    tmp: &Path,
    path: &Path,
    mut rx: tokio::sync::mpsc::Receiver<Piece>,
) -> Result<(), BlobError> {
    use std::io::Write as _;
    let result = (|| {
        let mut file = std::io::BufWriter::with_capacity(WRITE_BUFFER, std::fs::File::create(tmp)?);
        loop {
            match rx.blocking_recv() {
                Some(Piece::Data(bytes)) => file.write_all(&bytes)?,
                Some(Piece::End) => break,
                None => return Err(BlobError::Body("the upload stopped".into())),
            }
        }
        let file = file
            .into_inner()
            .map_err(|e| BlobError::Io(e.into_error()))?;
        file.sync_data()?;
        drop(file);
        if let Some(parent) = path.parent().filter(|p| !p.is_dir()) {
            std::fs::create_dir_all(parent)?;
            // A new shard directory is durable once the directory that holds it is.
            if let Some(grandparent) = parent.parent() {
                std::fs::File::open(grandparent)?.sync_all()?;
            }
        }
        std::fs::rename(tmp, path)?;
        // The rename is durable once the directory is.
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// The MD5 of the pieces up to `End`; `None` when the upload stopped before it.
fn hash_blob(mut rx: tokio::sync::mpsc::Receiver<Piece>) -> Option<[u8; 16]> {
    let mut md5 = Md5::new();
    loop {
        match rx.blocking_recv()? {
            Piece::Data(bytes) => md5.update(&bytes),
            Piece::End => return Some(md5.finalize().into()),
        }
    }
}

/// Sends `piece()` to the writer and, unless the body is small, to the hasher; `Err` when one of them
/// stopped.
async fn feed(
    writer: &tokio::sync::mpsc::Sender<Piece>,
    hasher: Option<&tokio::sync::mpsc::Sender<Piece>>,
    piece: impl Fn() -> Piece,
) -> Result<(), ()> {
    writer.send(piece()).await.map_err(|_| ())?;
    if let Some(hasher) = hasher {
        hasher.send(piece()).await.map_err(|_| ())?;
    }
    Ok(())
}

fn short_blob(e: std::io::Error) -> BlobError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        BlobError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "blob is shorter than its index says",
        ))
    } else {
        e.into()
    }
}

/// Sends `len` bytes of `file` from its position in [`READ_CHUNK`] pieces, stopping when the
/// receiver is gone (the client went away).
fn read_ahead(
    mut file: std::fs::File,
    mut len: u64,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, BlobError>>,
) {
    while len > 0 {
        let want = usize::try_from(len.min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
        let mut buf = vec![0u8; want];
        let piece = std::io::Read::read_exact(&mut file, &mut buf)
            .map(|()| Bytes::from(buf))
            .map_err(short_blob);
        let failed = piece.is_err();
        if tx.blocking_send(piece).is_err() || failed {
            return;
        }
        len -= want as u64;
    }
}

/// The modification time of a directory entry, `None` when the file went away since the
/// directory was read (the sweep runs beside writes, overwrites and deletes).
fn modified_unless_gone(entry: &std::fs::DirEntry) -> Result<Option<SystemTime>, BlobError> {
    match entry.metadata().and_then(|m| m.modified()) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn new_blob_id() -> String {
    crate::admission::new_uuid().simple().to_string()
}

#[async_trait::async_trait]
impl BlobStore for FsBlobs {
    async fn put(&self, mut body: ByteStream<'_>, limit: u64) -> Result<Written, BlobError> {
        let id = new_blob_id();
        let tmp = self.dir.join("tmp").join(&id);
        let path = self
            .path_of(&id)
            .ok_or_else(|| BlobError::Missing(id.clone()))?;
        // A small body is gathered and written, synced and published in one blocking call.
        let mut head = bytes::BytesMut::new();
        let mut size = 0u64;
        let mut large = false;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(BlobError::TooLarge(limit));
            }
            head.extend_from_slice(&chunk);
            if head.len() >= WRITE_BUFFER {
                large = true;
                break;
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(PIECES_IN_FLIGHT);
        // A large one streams to a writer thread while this task receives (and s3s verifies)
        // the next pieces, and the MD5 of any but a small one is computed on a third thread
        // beside the writer: MD5 is the slowest step of a large PUT (a core spends about
        // 1.3 ms per MB on it), so the work spreads over the cores.
        let writer = tokio::task::spawn_blocking({
            let (tmp, path) = (tmp.clone(), path.clone());
            move || write_blob(&tmp, &path, rx)
        });
        let (hash_tx, hasher) = if head.len() > INLINE_HASH_MAX {
            let (hash_tx, hash_rx) = tokio::sync::mpsc::channel::<Piece>(PIECES_IN_FLIGHT);
            let hasher = tokio::task::spawn_blocking(move || hash_blob(hash_rx));
            (Some(hash_tx), Some(hasher))
        } else {
            (None, None)
        };
        // A small body is hashed here, where it already is.
        let small_md5: Option<[u8; 16]> = hasher.is_none().then(|| Md5::digest(&head).into());
        // `Err(None)`: the writer or the hasher stopped first (their results say why).
        let fed: Result<(), Option<BlobError>> = async {
            let head = head.freeze();
            feed(&tx, hash_tx.as_ref(), || Piece::Data(head.clone()))
                .await
                .map_err(|()| None)?;
            if large {
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(Some)?;
                    size += chunk.len() as u64;
                    if size > limit {
                        return Err(Some(BlobError::TooLarge(limit)));
                    }
                    feed(&tx, hash_tx.as_ref(), || Piece::Data(chunk.clone()))
                        .await
                        .map_err(|()| None)?;
                }
            }
            feed(&tx, hash_tx.as_ref(), || Piece::End)
                .await
                .map_err(|()| None)
        }
        .await;
        // Without `End` the writer discards what it wrote and the hasher stops.
        drop(tx);
        drop(hash_tx);
        let written = writer.await.map_err(joined)?;
        let md5 = match hasher {
            Some(hasher) => hasher.await.map_err(joined)?,
            None => small_md5,
        };
        match (fed, written, md5) {
            (Ok(()), Ok(()), Some(md5)) => Ok(Written { id, size, md5 }),
            (Ok(()) | Err(None), Err(e), _) => Err(e),
            (Err(Some(e)), written, _) => {
                if written.is_ok() {
                    let _ = tokio::fs::remove_file(&path).await;
                }
                Err(e)
            }
            (Ok(()) | Err(None), Ok(()), _) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(writer_gone())
            }
        }
    }

    async fn get(
        &self,
        id: &str,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream<'static>, BlobError> {
        let path = self
            .path_of(id)
            .ok_or_else(|| BlobError::Missing(id.to_string()))?;
        let open = tokio::task::spawn_blocking(move || -> Result<_, BlobError> {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            std::io::Seek::seek(&mut file, SeekFrom::Start(range.start))?;
            let len = range.end.saturating_sub(range.start);
            // A small range is read right away, in the same blocking call as the open.
            if len <= READ_CHUNK as u64 {
                let mut buf = vec![0u8; usize::try_from(len).unwrap_or(READ_CHUNK)];
                std::io::Read::read_exact(&mut file, &mut buf).map_err(short_blob)?;
                return Ok(Some(Err(Bytes::from(buf))));
            }
            // A whole large range is read front to back: the kernel may read ahead further.
            let _ = rustix::fs::fadvise(
                &file,
                range.start,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::Sequential,
            );
            Ok(Some(Ok((file, len))))
        });
        let opened = open
            .await
            .map_err(|e| BlobError::Io(std::io::Error::other(e.to_string())))??;
        let (file, len) = match opened {
            None => return Err(BlobError::Missing(id.to_string())),
            Some(Err(small)) => {
                return Ok(Box::pin(futures::stream::once(async move { Ok(small) })))
            }
            Some(Ok(file)) => file,
        };
        // A large one is read ahead by a thread of its own while the network sends, started
        // when the stream is first polled: an object of many parts opens every part at once
        // (see `open_segments`), and only the part being sent may hold a thread and buffers.
        let stream = futures::stream::once(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, BlobError>>(READS_IN_FLIGHT);
            tokio::task::spawn_blocking(move || read_ahead(file, len, &tx));
            futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            })
        })
        .flatten();
        Ok(Box::pin(stream))
    }

    fn get_pins(&self) -> bool {
        true
    }

    async fn delete(&self, id: &str) -> Result<(), BlobError> {
        let Some(path) = self.path_of(id) else {
            return Ok(());
        };
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self) -> Result<Vec<(String, SystemTime)>, BlobError> {
        let dir = self.dir.join("blobs");
        tokio::task::spawn_blocking(move || -> Result<_, BlobError> {
            let mut out = Vec::new();
            for shard in std::fs::read_dir(&dir)? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(shard.path())? {
                    let entry = entry?;
                    // Deleted (overwritten, swept) since the directory was read: not a blob.
                    let Some(modified) = modified_unless_gone(&entry)? else {
                        continue;
                    };
                    if let Some(name) = entry.file_name().to_str() {
                        out.push((name.to_string(), modified));
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| BlobError::Io(std::io::Error::other(e.to_string())))?
    }

    async fn sweep_temporary(&self, older_than: SystemTime) -> Result<usize, BlobError> {
        let dir = self.dir.join("tmp");
        tokio::task::spawn_blocking(move || -> Result<usize, BlobError> {
            let mut removed = 0;
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                // Published or discarded since the directory was read: nothing to remove.
                let Some(modified) = modified_unless_gone(&entry)? else {
                    continue;
                };
                if modified < older_than {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Ok(removed)
        })
        .await
        .map_err(|e| BlobError::Io(std::io::Error::other(e.to_string())))?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> ByteStream<'static> {
        let items: Vec<Result<Bytes, BlobError>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        Box::pin(futures::stream::iter(items))
    }

    async fn read_all(mut s: ByteStream<'static>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        out
    }

    #[test]
    fn many_large_reads_opened_at_once_hold_no_thread_until_they_are_read() {
        // Two blocking threads, far fewer than the reads opened at once (an object of many
        // parts is opened whole before its first byte is sent).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = FsBlobs::open(dir.path()).unwrap();
            // Larger than what a reader thread reads ahead before it waits for the network.
            let big: &'static [u8] = vec![7u8; (READS_IN_FLIGHT + 4) * READ_CHUNK].leak();
            let w = store.put(body(&[big]), 1 << 30).await.unwrap();
            let opened = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                let mut streams = Vec::new();
                for _ in 0..6 {
                    streams.push(store.get(&w.id, 0..w.size).await.unwrap());
                }
                streams
            })
            .await
            .expect("six reads of one blob opened with two blocking threads");
            for stream in opened {
                assert_eq!(read_all(stream).await.len(), big.len());
            }
        });
    }

    #[tokio::test]
    async fn a_written_blob_reads_back_whole_and_by_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        let w = store
            .put(body(&[b"hello ", b"world"]), 1 << 20)
            .await
            .unwrap();
        assert_eq!(w.size, 11);
        assert_eq!(hex::encode(w.md5), "5eb63bbbe01eeed093cb22bb8f5acdc3");
        assert_eq!(
            read_all(store.get(&w.id, 0..11).await.unwrap()).await,
            b"hello world"
        );
        assert_eq!(
            read_all(store.get(&w.id, 6..9).await.unwrap()).await,
            b"wor"
        );
        assert_eq!(store.list().await.unwrap().len(), 1);
        store.delete(&w.id).await.unwrap();
        assert!(matches!(
            store.get(&w.id, 0..1).await,
            Err(BlobError::Missing(_))
        ));
        store.delete(&w.id).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_leaves_no_blob_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        let failing: ByteStream<'static> = Box::pin(futures::stream::iter(vec![
            Ok(Bytes::from_static(b"part")),
            Err(BlobError::Body("connection reset".into())),
        ]));
        assert!(store.put(failing, 1 << 20).await.is_err());
        assert!(matches!(
            store.put(body(&[b"0123456789"]), 4).await,
            Err(BlobError::TooLarge(4))
        ));
        assert!(store.list().await.unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn a_large_body_streams_through_the_writer_and_its_failure_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        let mib = Bytes::from(vec![7u8; 1 << 20]);
        let chunks: Vec<Result<Bytes, BlobError>> = (0..3).map(|_| Ok(mib.clone())).collect();
        let w = store
            .put(Box::pin(futures::stream::iter(chunks)), 1 << 30)
            .await
            .unwrap();
        assert_eq!(w.size, 3 << 20);
        assert_eq!(
            read_all(store.get(&w.id, 0..(3 << 20)).await.unwrap())
                .await
                .len(),
            3 << 20
        );

        let failing: Vec<Result<Bytes, BlobError>> = vec![
            Ok(mib.clone()),
            Ok(mib.clone()),
            Err(BlobError::ChunkSignature),
        ];
        assert!(matches!(
            store
                .put(Box::pin(futures::stream::iter(failing)), 1 << 30)
                .await,
            Err(BlobError::ChunkSignature)
        ));
        let too_big: Vec<Result<Bytes, BlobError>> = (0..3).map(|_| Ok(mib.clone())).collect();
        assert!(matches!(
            store
                .put(Box::pin(futures::stream::iter(too_big)), 2 << 20)
                .await,
            Err(BlobError::TooLarge(_))
        ));
        assert_eq!(store.list().await.unwrap().len(), 1);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn every_body_size_gets_the_md5_of_its_bytes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        // Small (hashed inline), medium (hashed on its own thread, written at once) and large
        // (streamed to the writer and the hasher), cut into uneven chunks of varying bytes.
        for len in [
            1,
            INLINE_HASH_MAX,
            INLINE_HASH_MAX + 1,
            3 * WRITE_BUFFER + 12_345,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let chunks: Vec<Result<Bytes, BlobError>> = data
                .chunks(70_001)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let w = store
                .put(Box::pin(futures::stream::iter(chunks)), 1 << 30)
                .await
                .unwrap();
            assert_eq!(w.size, len as u64);
            assert_eq!(w.md5, <[u8; 16]>::from(Md5::digest(&data)), "{len} bytes");
            let back = read_all(store.get(&w.id, 0..len as u64).await.unwrap()).await;
            assert!(back == data, "{len} bytes read back differ");
        }
    }

    #[test]
    fn a_file_deleted_after_its_directory_was_read_is_skipped_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gone"), b"x").unwrap();
        let entry = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert!(modified_unless_gone(&entry).unwrap().is_some());
        std::fs::remove_file(dir.path().join("gone")).unwrap();
        assert!(modified_unless_gone(&entry).unwrap().is_none());
    }

    #[tokio::test]
    async fn ids_that_are_not_ours_name_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        assert!(matches!(
            store.get("../../etc/passwd", 0..1).await,
            Err(BlobError::Missing(_))
        ));
    }
}
