//! The object index in etcd: one key per object, per multipart upload and per uploaded part,
//! beside the Bucket records. An object is visible exactly when its index key exists, and its
//! key is written only after every blob it names is durable, in a transaction that also
//! checks the bucket still exists: a crash leaves an object whole or absent, never listed
//! without data. Blobs no key names are orphans for the sweep.
//!
//! Layout (bucket names hold no `/`, so every prefix is unambiguous):
//! - `/karri/s3/objects/<bucket>/<key>` → [`ObjectMeta`]
//! - `/karri/s3/uploads/<bucket>/<upload id>` → [`UploadMeta`]
//! - `/karri/s3/parts/<upload id>/<part number, 5 digits>` → [`PartMeta`]

use std::collections::BTreeMap;

use crds::CannedAcl;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use crate::point_reads::PointReads;
use crate::store;

/// Prefix of every S3 index key.
pub const S3_PREFIX: &str = "/karri/s3/";

/// Why an index operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The bucket is gone (deleted while the request ran).
    #[error("the bucket does not exist")]
    NoBucket,
    /// The bucket is being deleted right now.
    #[error("the bucket is being deleted")]
    BucketBusy,
    /// The bucket record the request was authorized against is gone or was created again
    /// since (the watch cache had not seen the change yet): authorize against the record now
    /// there before trying again.
    #[error("the bucket was deleted or created again while the request ran")]
    BucketReplaced,
    /// The multipart upload is gone (completed or aborted).
    #[error("the multipart upload does not exist")]
    NoUpload,
    /// The object is not as the write expected (written or deleted meanwhile).
    #[error("the object changed while the request ran")]
    Changed,
    /// A part of the multipart upload was written again while it was being completed.
    #[error("a part changed while the upload was completed")]
    PartsChanged,
    /// etcd failed.
    #[error("the object index is unavailable: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// etcd's answer did not have the shape of the request (never seen; a bug or a proxy).
    #[error("etcd answered {0} with an answer of another shape")]
    Unexpected(&'static str),
    /// A stored entry does not parse.
    #[error("index entry {key} is corrupt: {reason}")]
    Corrupt {
        /// The etcd key.
        key: String,
        /// Why.
        reason: String,
    },
}

impl IndexError {
    /// Whether the index surely refused the write (a compare failed), so that nothing names
    /// the blobs it would have published. After an etcd error the write may still have
    /// committed: those blobs are left to the sweep.
    pub fn refused_for_sure(&self) -> bool {
        matches!(
            self,
            Self::NoBucket
                | Self::BucketBusy
                | Self::BucketReplaced
                | Self::NoUpload
                | Self::Changed
                | Self::PartsChanged
        )
    }
}

/// What a publish expects to find at the object's key, checked in its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (a plain PUT replaces it).
    Anything,
    /// No object (`If-None-Match: *`).
    Absent,
    /// The entry read at this mod revision, unchanged since.
    Version(i64),
}

/// What must still hold when a multipart upload is completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionHolds {
    /// The revision the parts were read at: no part may have been written since.
    pub parts_read_at: i64,
    /// What the completion expects at the object's key (`If-Match`, `If-None-Match`).
    pub expect: Expect,
}

/// One run of bytes of an object: a whole blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The blob's ID.
    pub blob: String,
    /// Its size in bytes.
    pub size: u64,
}

/// HTTP headers stored with an object and returned on GET and HEAD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemHeaders {
    /// `Content-Type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `Cache-Control`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    /// `Content-Disposition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_disposition: Option<String>,
    /// `Content-Encoding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// `Content-Language`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_language: Option<String>,
    /// `Expires`, as Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

/// An object's index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The bytes, in order.
    pub segments: Vec<Segment>,
    /// Total size.
    pub size: u64,
    /// The ETag without quotes: MD5 hex, or `<md5 of part md5s>-<parts>` for multipart.
    pub etag: String,
    /// Last modification, Unix milliseconds.
    pub last_modified_ms: i64,
    /// System headers.
    #[serde(default)]
    pub headers: SystemHeaders,
    /// User metadata (`x-amz-meta-*`), keys lower-case without the prefix.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Canned ACL of the object.
    #[serde(default)]
    pub acl: CannedAcl,
    /// Object tags.
    #[serde(default)]
    pub tags: Vec<(String, String)>,
    /// Number of parts of a multipart object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts_count: Option<u32>,
    /// The multipart upload the object was completed from, so that a retried completion of
    /// it is answered as the first was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// The additional checksum the object was uploaded with in one piece
    /// (`x-amz-checksum-*`, checked then), returned to reads that ask for it
    /// (`x-amz-checksum-mode: ENABLED`) so that clients check what they download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
}

/// An additional checksum of a whole object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    /// Its algorithm.
    pub algorithm: super::checksum::Algorithm,
    /// Its value, base64 as S3 writes it.
    pub value: String,
}

impl ObjectMeta {
    /// Every blob the object names.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().map(|s| s.blob.as_str())
    }

    /// An identity of the object's bytes as stored: a SHA-256 (hex) of its blobs' IDs and
    /// sizes. Every write of bytes makes new blobs under random IDs, so an object written
    /// again (even with the same bytes) gets another; a change of tags or ACL keeps it. No
    /// client can choose it. Pure.
    pub fn content_id(&self) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for s in &self.segments {
            h.update(s.blob.as_bytes());
            h.update(b":");
            h.update(s.size.to_string().as_bytes());
            h.update(b";");
        }
        hex::encode(h.finalize())
    }
}

/// A multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadMeta {
    /// The object key it will become.
    pub key: String,
    /// When it was created, Unix milliseconds.
    pub initiated_ms: i64,
    /// Access key ID of the initiator.
    pub initiator: String,
    /// Headers, metadata, ACL and tags of the object to be.
    pub headers: SystemHeaders,
    /// User metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// ACL.
    #[serde(default)]
    pub acl: CannedAcl,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<(String, String)>,
}

/// An uploaded part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartMeta {
    /// The blob holding it.
    pub blob: String,
    /// Size in bytes.
    pub size: u64,
    /// MD5 hex (the part's ETag).
    pub etag: String,
    /// Upload time, Unix milliseconds.
    pub last_modified_ms: i64,
}

/// Index key of an object.
pub fn object_key(bucket: &str, key: &str) -> String {
    format!("{S3_PREFIX}objects/{bucket}/{key}")
}

/// Prefix of every object of a bucket.
pub fn objects_prefix(bucket: &str) -> String {
    format!("{S3_PREFIX}objects/{bucket}/")
}

/// Marker of a bucket being deleted (under a lease, so that a crash cannot leave it behind):
/// writes that would add an object or upload compare it absent.
pub fn deleting_key(bucket: &str) -> String {
    format!("{S3_PREFIX}deleting/{bucket}")
}

/// Seconds a deletion marker outlives a gateway that died while deleting.
const DELETING_TTL: i64 = 30;

/// Index key of a multipart upload.
pub fn upload_key(bucket: &str, upload_id: &str) -> String {
    format!("{S3_PREFIX}uploads/{bucket}/{upload_id}")
}

/// Prefix of every upload of a bucket.
pub fn uploads_prefix(bucket: &str) -> String {
    format!("{S3_PREFIX}uploads/{bucket}/")
}

/// Index key of one part.
pub fn part_key(upload_id: &str, part: u32) -> String {
    format!("{S3_PREFIX}parts/{upload_id}/{part:05}")
}

/// Prefix of every part of an upload.
pub fn parts_prefix(upload_id: &str) -> String {
    format!("{S3_PREFIX}parts/{upload_id}/")
}

/// The smallest key greater than every key that starts with `prefix` (etcd's range end of a
/// prefix); empty means "to the end of the keyspace".
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A bucket's record as a request saw it when it was authorized: its etcd key and the
/// revision it was seen at (its mod revision then). A write into the bucket holds only while
/// that record is there, not a record of the same name created since (another owner's bucket,
/// made after this one was deleted during a long upload).
#[derive(Debug, Clone, Copy)]
pub struct BucketSeen<'a> {
    /// The Bucket record's etcd key.
    pub record: &'a str,
    /// The revision the record was seen at.
    pub revision: i64,
}

/// The conditions under which a request still acts on the bucket it was authorized against:
/// the record seen exists, created at or before the revision it was seen at (not a record of
/// the same name created since, perhaps by another account).
fn same_bucket(seen: BucketSeen<'_>) -> [Compare; 2] {
    [
        Compare::version(seen.record, CompareOp::Greater, 0),
        Compare::create_revision(
            seen.record,
            CompareOp::Less,
            seen.revision.saturating_add(1),
        ),
    ]
}

/// Whether `record`, read in the same transaction as an index entry, is the bucket `seen`
/// (what [`same_bucket`] compares, checked on a read).
fn is_same_bucket(seen: BucketSeen<'_>, record: &etcd_client::GetResponse) -> bool {
    record
        .kvs()
        .first()
        .is_some_and(|kv| kv.create_revision() <= seen.revision)
}

/// The conditions of a write that adds to a bucket: [`same_bucket`], and no deletion of it is
/// under way.
fn bucket_open(seen: BucketSeen<'_>, bucket: &str) -> [Compare; 3] {
    let [exists, created] = same_bucket(seen);
    [
        exists,
        created,
        Compare::version(deleting_key(bucket), CompareOp::Equal, 0),
    ]
}

/// The compare that holds a write to what it expects at the object's etcd key `k`.
fn expect_compare(k: &str, expect: Expect) -> Option<Compare> {
    match expect {
        Expect::Anything => None,
        Expect::Absent => Some(Compare::create_revision(k, CompareOp::Equal, 0)),
        Expect::Version(v) => Some(Compare::mod_revision(k, CompareOp::Equal, v)),
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, IndexError> {
    serde_json::from_slice(value).map_err(|e| IndexError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// The object entry in a read of one object's key ([`object_key`]), if there is one.
pub fn object_of(resp: &etcd_client::GetResponse) -> Result<Option<ObjectMeta>, IndexError> {
    resp.kvs()
        .first()
        .map(|kv| parse(kv.key(), kv.value()))
        .transpose()
}

/// The value a transaction's put replaced (its `prev_kv`), if any.
fn replaced<T: serde::de::DeserializeOwned>(
    resp: &etcd_client::TxnResponse,
) -> Result<Option<T>, IndexError> {
    for op in resp.op_responses() {
        if let TxnOpResponse::Put(put) = op {
            if let Some(prev) = put.prev_key() {
                return Ok(Some(parse(prev.key(), prev.value())?));
            }
        }
    }
    Ok(None)
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_vec(v).expect("index entries always serialize")
}

/// The object index: typed operations on the etcd keys above.
#[derive(Clone)]
pub struct ObjectIndex {
    etcd: Client,
    /// Single-key reads, coalesced under load.
    reads: PointReads,
}

impl ObjectIndex {
    /// An index on the gateway's etcd client.
    pub fn new(etcd: Client) -> Self {
        Self {
            reads: PointReads::start(etcd.clone()),
            etcd,
        }
    }

    async fn get_raw(
        &self,
        key: Vec<u8>,
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, IndexError> {
        if opts.is_none() {
            return Ok(self.reads.get(key).await?);
        }
        Ok(store::retry_unreached(|| {
            let mut kv = store::kv(&self.etcd);
            let (key, opts) = (key.clone(), opts.clone());
            async move { kv.get(key, opts).await }
        })
        .await?)
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, IndexError> {
        Ok(store::retry_unreached(|| {
            let mut kv = store::kv(&self.etcd);
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?)
    }

    /// Reads `key` together with the bucket's record, at one revision;
    /// [`IndexError::BucketReplaced`] unless that record is the bucket `seen`.
    async fn get_in(
        &self,
        seen: BucketSeen<'_>,
        key: String,
    ) -> Result<etcd_client::GetResponse, IndexError> {
        let mut answers = self
            .reads
            .get_many(vec![key.into_bytes(), seen.record.as_bytes().to_vec()])
            .await?
            .into_iter();
        match (answers.next(), answers.next()) {
            (Some(entry), Some(record)) if is_same_bucket(seen, &record) => Ok(entry),
            (Some(_), Some(_)) => Err(IndexError::BucketReplaced),
            _ => Err(IndexError::Unexpected("a read of two keys")),
        }
    }

    /// Runs `op` (a range or a delete under the bucket) only while the bucket `seen` is there;
    /// [`IndexError::BucketReplaced`] otherwise.
    async fn op_in(
        &self,
        seen: BucketSeen<'_>,
        op: TxnOp,
    ) -> Result<etcd_client::TxnOpResponse, IndexError> {
        let resp = self
            .txn(Txn::new().when(same_bucket(seen)).and_then([op]))
            .await?;
        if !resp.succeeded() {
            return Err(IndexError::BucketReplaced);
        }
        resp.op_responses()
            .into_iter()
            .next()
            .ok_or(IndexError::Unexpected("a transaction of one operation"))
    }

    /// One object's entry (a linearizable read: strong read-after-write), if the bucket `seen`
    /// is still the one there.
    pub async fn get_object(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectMeta>, IndexError> {
        let resp = self.get_in(seen, object_key(bucket, key)).await?;
        resp.kvs()
            .first()
            .map(|kv| parse(kv.key(), kv.value()))
            .transpose()
    }

    /// One object's entry with its mod revision (for [`Expect::Version`]), if the bucket
    /// `seen` is still the one there.
    pub async fn get_object_versioned(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(ObjectMeta, i64)>, IndexError> {
        let resp = self.get_in(seen, object_key(bucket, key)).await?;
        resp.kvs()
            .first()
            .map(|kv| parse(kv.key(), kv.value()).map(|m| (m, kv.mod_revision())))
            .transpose()
    }

    /// Publishes an object if the bucket `seen` is still there; returns the entry it replaced,
    /// whose blobs the caller deletes.
    pub async fn put_object(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        key: &str,
        meta: &ObjectMeta,
    ) -> Result<Option<ObjectMeta>, IndexError> {
        self.put_object_expecting(seen, bucket, key, meta, Expect::Anything)
            .await
    }

    /// [`ObjectIndex::put_object`] only if the key holds what `expect` says, in the same
    /// transaction (so two `If-None-Match: *` PUTs never both win); [`IndexError::Changed`]
    /// otherwise.
    pub async fn put_object_expecting(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        key: &str,
        meta: &ObjectMeta,
        expect: Expect,
    ) -> Result<Option<ObjectMeta>, IndexError> {
        let k = object_key(bucket, key);
        let mut when = bucket_open(seen, bucket).to_vec();
        when.extend(expect_compare(&k, expect));
        let txn = Txn::new().when(when).and_then([TxnOp::put(
            k.clone(),
            json(meta),
            Some(PutOptions::new().with_prev_key()),
        )]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            if expect != Expect::Anything && self.bucket_open_now(seen, bucket).await? {
                return Err(IndexError::Changed);
            }
            return Err(self.why_closed(seen, bucket).await);
        }
        replaced(&resp)
    }

    /// Whether the bucket exists and is not being deleted.
    async fn bucket_open_now(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
    ) -> Result<bool, IndexError> {
        let txn = Txn::new().when(bucket_open(seen, bucket));
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Removes an object's entry, if the bucket `seen` is still the one there; returns it (its
    /// blobs are the caller's to delete).
    pub async fn delete_object(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectMeta>, IndexError> {
        self.delete_object_expecting(seen, bucket, key, Expect::Anything)
            .await
    }

    /// [`ObjectIndex::delete_object`] only if the key holds what `expect` says, in the same
    /// transaction (a DeleteObject with `If-Match`); [`IndexError::Changed`] otherwise.
    pub async fn delete_object_expecting(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        key: &str,
        expect: Expect,
    ) -> Result<Option<ObjectMeta>, IndexError> {
        let k = object_key(bucket, key);
        let mut when = same_bucket(seen).to_vec();
        when.extend(expect_compare(&k, expect));
        let op = TxnOp::delete(k, Some(DeleteOptions::new().with_prev_key()));
        let resp = self.txn(Txn::new().when(when).and_then([op])).await?;
        if !resp.succeeded() {
            let bucket_there = self
                .txn(Txn::new().when(same_bucket(seen)))
                .await?
                .succeeded();
            return Err(if expect != Expect::Anything && bucket_there {
                IndexError::Changed
            } else {
                IndexError::BucketReplaced
            });
        }
        let Some(etcd_client::TxnOpResponse::Delete(resp)) = resp.op_responses().into_iter().next()
        else {
            return Err(IndexError::Unexpected("a delete"));
        };
        resp.prev_kvs()
            .first()
            .map(|kv| parse(kv.key(), kv.value()))
            .transpose()
    }

    /// Up to `limit` objects of `bucket` whose keys (relative to the bucket) are at least
    /// `start` and start with `prefix`, in key order, if the bucket `seen` is still the one
    /// there.
    pub async fn list_objects(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        prefix: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(String, ObjectMeta)>, IndexError> {
        let base = objects_prefix(bucket);
        let mut from = base.clone().into_bytes();
        let wanted = {
            let mut p = base.clone().into_bytes();
            p.extend_from_slice(prefix.as_bytes());
            p
        };
        if start > prefix.as_bytes() {
            from.extend_from_slice(start);
        } else {
            from = wanted.clone();
        }
        let opts = GetOptions::new()
            .with_range(prefix_end(&wanted))
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let etcd_client::TxnOpResponse::Get(resp) =
            self.op_in(seen, TxnOp::get(from, Some(opts))).await?
        else {
            return Err(IndexError::Unexpected("a range"));
        };
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let rel = &kv.key()[base.len()..];
            let Ok(rel) = std::str::from_utf8(rel) else {
                continue;
            };
            out.push((rel.to_string(), parse(kv.key(), kv.value())?));
        }
        Ok(out)
    }

    /// Why a write compared against the bucket `seen` failed: it is being deleted, it was
    /// created again since (authorize against the new record), or it is gone.
    async fn why_closed(&self, seen: BucketSeen<'_>, bucket: &str) -> IndexError {
        let keys = vec![
            deleting_key(bucket).into_bytes(),
            seen.record.as_bytes().to_vec(),
        ];
        let answers = match self.reads.get_many(keys).await {
            Ok(answers) => answers,
            Err(e) => return e.into(),
        };
        match answers.as_slice() {
            [marker, _] if !marker.kvs().is_empty() => IndexError::BucketBusy,
            [_, record] if record.kvs().is_empty() => IndexError::NoBucket,
            [_, record] if !is_same_bucket(seen, record) => IndexError::BucketReplaced,
            // The same record, no marker now: a deletion was tried meanwhile and failed.
            [_, _] => IndexError::BucketBusy,
            _ => IndexError::Unexpected("a read of two keys"),
        }
    }

    /// Marks `bucket` as being deleted (for [`DELETING_TTL`] at most); returns the marker's
    /// lease, for [`ObjectIndex::unmark_deleting`]. Writes that add objects or uploads fail
    /// from the moment it is committed, so an emptiness check after it stays true.
    pub async fn mark_deleting(&self, bucket: &str) -> Result<i64, IndexError> {
        let lease = store::retry_unreached(|| {
            let mut leases = self.etcd.lease_client();
            async move { leases.grant(DELETING_TTL, None).await }
        })
        .await?
        .id();
        let key = deleting_key(bucket);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                "",
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if self.txn(txn).await?.succeeded() {
            Ok(lease)
        } else {
            let _ = self.unmark_deleting(lease).await;
            Err(IndexError::BucketBusy)
        }
    }

    /// Removes a deletion marker (revoking its lease deletes it).
    pub async fn unmark_deleting(&self, lease: i64) -> Result<(), IndexError> {
        store::retry_unreached(|| {
            let mut leases = self.etcd.lease_client();
            async move { leases.revoke(lease).await }
        })
        .await?;
        Ok(())
    }

    /// Whether the bucket holds any object or upload.
    pub async fn bucket_in_use(&self, bucket: &str) -> Result<bool, IndexError> {
        for prefix in [objects_prefix(bucket), uploads_prefix(bucket)] {
            let resp = self
                .get_raw(
                    prefix.into_bytes(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                )
                .await?;
            if !resp.kvs().is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records a new multipart upload (if the bucket exists).
    pub async fn create_upload(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        upload_id: &str,
        meta: &UploadMeta,
    ) -> Result<(), IndexError> {
        let txn = Txn::new()
            .when(bucket_open(seen, bucket))
            .and_then([TxnOp::put(upload_key(bucket, upload_id), json(meta), None)]);
        if self.txn(txn).await?.succeeded() {
            Ok(())
        } else {
            Err(self.why_closed(seen, bucket).await)
        }
    }

    /// One upload's entry, if the bucket `seen` is still the one there.
    pub async fn get_upload(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
        upload_id: &str,
    ) -> Result<Option<UploadMeta>, IndexError> {
        let resp = self.get_in(seen, upload_key(bucket, upload_id)).await?;
        resp.kvs()
            .first()
            .map(|kv| parse(kv.key(), kv.value()))
            .transpose()
    }

    /// Every upload of a bucket: (upload ID, entry), in no particular order, if the bucket
    /// `seen` is still the one there.
    pub async fn list_uploads(
        &self,
        seen: BucketSeen<'_>,
        bucket: &str,
    ) -> Result<Vec<(String, UploadMeta)>, IndexError> {
        let prefix = uploads_prefix(bucket);
        let range = TxnOp::get(prefix.clone(), Some(GetOptions::new().with_prefix()));
        let etcd_client::TxnOpResponse::Get(resp) = self.op_in(seen, range).await? else {
            return Err(IndexError::Unexpected("a range"));
        };
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let id = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            out.push((id, parse(kv.key(), kv.value())?));
        }
        Ok(out)
    }

    /// Records a part if its upload still exists; returns the part it replaced.
    pub async fn put_part(
        &self,
        bucket: &str,
        upload_id: &str,
        part: u32,
        meta: &PartMeta,
    ) -> Result<Option<PartMeta>, IndexError> {
        let txn = Txn::new()
            .when([Compare::version(
                upload_key(bucket, upload_id),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(
                part_key(upload_id, part),
                json(meta),
                Some(PutOptions::new().with_prev_key()),
            )]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(IndexError::NoUpload);
        }
        replaced(&resp)
    }

    /// Every part of an upload, by part number.
    pub async fn list_parts(&self, upload_id: &str) -> Result<BTreeMap<u32, PartMeta>, IndexError> {
        Ok(self.list_parts_versioned(upload_id).await?.0)
    }

    /// An upload's parts and the etcd revision they were read at (for
    /// [`ObjectIndex::complete_upload`]).
    pub async fn list_parts_versioned(
        &self,
        upload_id: &str,
    ) -> Result<(BTreeMap<u32, PartMeta>, i64), IndexError> {
        let prefix = parts_prefix(upload_id);
        let resp = self
            .get_raw(
                prefix.clone().into_bytes(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            let number = std::str::from_utf8(&kv.key()[prefix.len()..])
                .ok()
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(number) = number {
                out.insert(number, parse(kv.key(), kv.value())?);
            }
        }
        let read_at = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((out, read_at))
    }

    /// Completes an upload in one transaction: the object appears, the upload and all its part
    /// entries disappear, or nothing happens. Returns the replaced object, if any;
    /// [`IndexError::PartsChanged`] when a part was written after the parts were read, and
    /// [`IndexError::Changed`] when the object at `key` is not what the completion expects.
    pub async fn complete_upload(
        &self,
        bucket_record: &str,
        bucket: &str,
        upload_id: &str,
        meta: &ObjectMeta,
        key: &str,
        holds: CompletionHolds,
    ) -> Result<Option<ObjectMeta>, IndexError> {
        let CompletionHolds {
            parts_read_at,
            expect,
        } = holds;
        let k = object_key(bucket, key);
        let mut when = vec![
            Compare::version(bucket_record, CompareOp::Greater, 0),
            Compare::version(deleting_key(bucket), CompareOp::Equal, 0),
            Compare::version(upload_key(bucket, upload_id), CompareOp::Greater, 0),
            // No part written since they were read: a part uploaded again meanwhile
            // deleted the blob `meta` names.
            Compare::mod_revision(parts_prefix(upload_id), CompareOp::Less, parts_read_at + 1)
                .with_prefix(),
        ];
        let expected = expect_compare(&k, expect);
        when.extend(expected.clone());
        let txn = Txn::new().when(when).and_then([
            TxnOp::put(
                object_key(bucket, key),
                json(meta),
                Some(PutOptions::new().with_prev_key()),
            ),
            TxnOp::delete(upload_key(bucket, upload_id), None),
            TxnOp::delete(
                parts_prefix(upload_id),
                Some(DeleteOptions::new().with_prefix()),
            ),
        ]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            let upload = self
                .get_raw(upload_key(bucket, upload_id).into_bytes(), None)
                .await?;
            // The upload holds its bucket (a bucket with uploads is not deleted): whichever
            // record of that name is there now is the one the upload was made in.
            let held = BucketSeen {
                record: bucket_record,
                revision: i64::MAX - 1,
            };
            if upload.kvs().is_empty() {
                return Err(IndexError::NoUpload);
            }
            if !self.bucket_open_now(held, bucket).await? {
                // The upload is there: its bucket is being checked for deletion (which fails
                // while the upload holds it), and the completion may be tried again.
                return Err(match self.why_closed(held, bucket).await {
                    IndexError::NoBucket => IndexError::NoUpload,
                    other => other,
                });
            }
            if let Some(compare) = expected {
                if !self.txn(Txn::new().when([compare])).await?.succeeded() {
                    return Err(IndexError::Changed);
                }
            }
            return Err(IndexError::PartsChanged);
        }
        replaced(&resp)
    }

    /// Aborts an upload: removes it and its parts; returns the parts (their blobs are the
    /// caller's to delete), or [`IndexError::NoUpload`].
    pub async fn abort_upload(
        &self,
        bucket: &str,
        upload_id: &str,
    ) -> Result<Vec<PartMeta>, IndexError> {
        let txn = Txn::new()
            .when([Compare::version(
                upload_key(bucket, upload_id),
                CompareOp::Greater,
                0,
            )])
            .and_then([
                TxnOp::delete(upload_key(bucket, upload_id), None),
                TxnOp::delete(
                    parts_prefix(upload_id),
                    Some(DeleteOptions::new().with_prefix().with_prev_key()),
                ),
            ]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(IndexError::NoUpload);
        }
        let mut parts = Vec::new();
        for op in resp.op_responses() {
            if let TxnOpResponse::Delete(del) = op {
                for kv in del.prev_kvs() {
                    parts.push(parse(kv.key(), kv.value())?);
                }
            }
        }
        Ok(parts)
    }

    /// Every blob ID the index names (objects and parts), read page by page, every page at
    /// the revision of the first: a snapshot, so a blob that moves while the pages are read
    /// (a multipart completion moves part blobs from `parts/` to `objects/`) is in it.
    pub async fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>, IndexError> {
        let mut out = std::collections::HashSet::new();
        let mut at: Option<i64> = None;
        for (prefix, is_object) in [
            (format!("{S3_PREFIX}objects/"), true),
            (format!("{S3_PREFIX}parts/"), false),
        ] {
            let end = prefix_end(prefix.as_bytes());
            let mut from = prefix.clone().into_bytes();
            loop {
                let mut opts = GetOptions::new().with_range(end.clone()).with_limit(1000);
                if let Some(rev) = at {
                    opts = opts.with_revision(rev);
                }
                let resp = self.get_raw(from.clone(), Some(opts)).await?;
                if at.is_none() {
                    at = resp.header().map(|h| h.revision());
                }
                for kv in resp.kvs() {
                    if is_object {
                        let meta: ObjectMeta = parse(kv.key(), kv.value())?;
                        out.extend(meta.segments.into_iter().map(|s| s.blob));
                    } else {
                        let part: PartMeta = parse(kv.key(), kv.value())?;
                        out.insert(part.blob);
                    }
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"abc/"), b"abc0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn index_keys_keep_buckets_and_uploads_apart() {
        assert_eq!(object_key("b", "dir/k"), "/karri/s3/objects/b/dir/k");
        assert!(object_key("b", "k").starts_with(&objects_prefix("b")));
        assert!(!object_key("bb", "k").starts_with(&objects_prefix("b")));
        assert_eq!(part_key("u1", 7), "/karri/s3/parts/u1/00007");
        assert!(part_key("u1", 10000).starts_with(&parts_prefix("u1")));
    }
}
