//! Blobs in an existing S3-compatible cluster (Ceph RGW, MinIO, another Karri): the scale-out
//! backend, through the `object_store` crate. Each blob is one object `blobs/<id>` of a bucket
//! there. A blob up to [`SINGLE_PUT_MAX`] is one PUT; a larger one a multipart upload, which the
//! cluster makes visible only when it completes: either way a blob is whole or absent, as with
//! the filesystem backend. Multipart uploads a crash leaves incomplete are the cluster's to
//! expire (an `AbortIncompleteMultipartUpload` lifecycle rule); nothing of them is visible.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, PutPayload, WriteMultipart};

use super::blob::{BlobError, BlobStore, ByteStream, Written};

/// Largest blob written with a single PUT.
const SINGLE_PUT_MAX: usize = 8 * 1024 * 1024;
/// Parts of a multipart upload in flight at once (bounds the memory a large upload holds).
const PARTS_IN_FLIGHT: usize = 2;

/// Where the remote cluster is and who signs.
#[derive(Clone)]
pub struct RemoteConfig {
    /// Endpoint URL, e.g. `https://rgw.example:8080`.
    pub endpoint: String,
    /// The bucket holding the blobs.
    pub bucket: String,
    /// The region the cluster expects in signatures.
    pub region: String,
    /// Access key ID.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// PEM CA certificate to trust (beside the system's roots).
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RemoteConfig {
    /// Everything but the secret access key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

/// Blobs in a remote S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct RemoteBlobs {
    store: Arc<dyn ObjectStore>,
}

fn io(e: object_store::Error) -> BlobError {
    BlobError::Io(std::io::Error::other(e.to_string()))
}

fn path_of(id: &str) -> Path {
    Path::from(format!("blobs/{id}"))
}

impl RemoteBlobs {
    /// A store for `config` (path-style requests, plain HTTP allowed for `http://` endpoints).
    pub fn new(config: &RemoteConfig) -> Result<Self, BlobError> {
        let mut options =
            ClientOptions::new().with_allow_http(config.endpoint.starts_with("http://"));
        if let Some(pem) = &config.ca_pem {
            let cert = object_store::Certificate::from_pem(pem).map_err(io)?;
            options = options.with_root_certificate(cert);
        }
        let store = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .build()
            .map_err(io)?;
        Ok(Self {
            store: Arc::new(store),
        })
    }
}

#[async_trait::async_trait]
impl BlobStore for RemoteBlobs {
    async fn put(&self, mut body: ByteStream<'_>, limit: u64) -> Result<Written, BlobError> {
        let id = crate::admission::new_uuid().simple().to_string();
        let path = path_of(&id);
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let mut head = BytesMut::new();
        let mut upload: Option<WriteMultipart> = None;
        let result: Result<(), BlobError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(BlobError::TooLarge(limit));
                }
                md5.update(&chunk);
                match &mut upload {
                    Some(w) => {
                        w.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(io)?;
                        w.write(&chunk);
                    }
                    None => {
                        head.extend_from_slice(&chunk);
                        if head.len() > SINGLE_PUT_MAX {
                            let mut w = WriteMultipart::new(
                                self.store.put_multipart(&path).await.map_err(io)?,
                            );
                            w.write(&head);
                            head.clear();
                            upload = Some(w);
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        match (result, upload) {
            (Ok(()), Some(w)) => {
                w.finish().await.map_err(io)?;
            }
            (Ok(()), None) => {
                self.store
                    .put(&path, PutPayload::from(head.freeze()))
                    .await
                    .map_err(io)?;
            }
            (Err(e), Some(w)) => {
                let _ = w.abort().await;
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        }
        Ok(Written {
            id,
            size,
            md5: md5.finalize().into(),
        })
    }

    async fn get(
        &self,
        id: &str,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream<'static>, BlobError> {
        if range.start >= range.end {
            return Ok(Box::pin(futures::stream::empty()));
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        match self.store.get_opts(&path_of(id), options).await {
            Ok(found) => Ok(Box::pin(found.into_stream().map_err(io))),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::Missing(id.to_string())),
            Err(e) => Err(io(e)),
        }
    }

    async fn delete(&self, id: &str) -> Result<(), BlobError> {
        match self.store.delete(&path_of(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    async fn list(&self) -> Result<Vec<(String, SystemTime)>, BlobError> {
        let prefix = Path::from("blobs");
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(io)?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let id = m.location.filename()?.to_string();
                Some((id, SystemTime::from(m.last_modified)))
            })
            .collect())
    }

    async fn sweep_temporary(&self, _older_than: SystemTime) -> Result<usize, BlobError> {
        // Incomplete multipart uploads are invisible and expire by the cluster's lifecycle rule.
        Ok(0)
    }
}
