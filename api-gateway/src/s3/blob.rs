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
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

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
const READ_CHUNK: usize = 256 * 1024;
/// Bytes gathered before each write of a PUT.
const WRITE_BUFFER: usize = 1024 * 1024;

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

fn new_blob_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[async_trait::async_trait]
impl BlobStore for FsBlobs {
    async fn put(&self, mut body: ByteStream<'_>, limit: u64) -> Result<Written, BlobError> {
        let id = new_blob_id();
        let tmp = self.dir.join("tmp").join(&id);
        let result = async {
            // Writes go to the disk in large pieces: one blocking call per MiB, not per chunk.
            let mut file = tokio::io::BufWriter::with_capacity(
                WRITE_BUFFER,
                tokio::fs::File::create(&tmp).await?,
            );
            let mut md5 = Md5::new();
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(BlobError::TooLarge(limit));
                }
                md5.update(&chunk);
                file.write_all(&chunk).await?;
            }
            file.flush().await?;
            let file = file.into_inner();
            file.sync_data().await?;
            drop(file);
            let Some(path) = self.path_of(&id) else {
                return Err(BlobError::Missing(id.clone()));
            };
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::rename(&tmp, &path).await?;
            // The rename is durable once the directory is.
            if let Some(parent) = path.parent() {
                tokio::fs::File::open(parent).await?.sync_all().await?;
            }
            Ok(Written {
                id: id.clone(),
                size,
                md5: md5.finalize().into(),
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn get(
        &self,
        id: &str,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream<'static>, BlobError> {
        let path = self
            .path_of(id)
            .ok_or_else(|| BlobError::Missing(id.to_string()))?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::Missing(id.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        file.seek(SeekFrom::Start(range.start)).await?;
        let remaining = range.end.saturating_sub(range.start);
        let stream =
            futures::stream::try_unfold((file, remaining), |(mut file, left)| async move {
                if left == 0 {
                    return Ok(None);
                }
                let want = usize::try_from(left.min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
                let mut buf = vec![0u8; want];
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Err(BlobError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "blob is shorter than its index says",
                    )));
                }
                buf.truncate(n);
                Ok(Some((Bytes::from(buf), (file, left - n as u64))))
            });
        Ok(Box::pin(stream))
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
                    let modified = entry.metadata()?.modified()?;
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
                if entry.metadata()?.modified()? < older_than {
                    std::fs::remove_file(entry.path())?;
                    removed += 1;
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
    async fn ids_that_are_not_ours_name_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        assert!(matches!(
            store.get("../../etc/passwd", 0..1).await,
            Err(BlobError::Missing(_))
        ));
    }
}
