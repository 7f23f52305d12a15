//! The etcd transactions the gateway sends for one record it creates alone and for one S3
//! object it publishes or reads, sent straight to etcd by the benchmarks that show how much of a
//! request's latency is etcd's own (`bench-registry`, `bench-ec2`, `bench-s3`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{Compare, CompareOp, KvClient, PutOptions, Txn, TxnOp};

/// The transaction of a lone create of `value` at `key` with its ID index entry `id_key`, as the
/// gateway's combined creates build it for one record (`combined_creates::claim`): both keys
/// must be new (2 compares), then both are written (2 puts). Under load the gateway sends
/// concurrent creates together as one transaction; a create with a client token or another
/// unique value has one compare and one put more.
pub fn lone_create_txn(key: String, id_key: String, value: Vec<u8>) -> Txn {
    Txn::new()
        .when([
            Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Compare::create_revision(id_key.clone(), CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put(key.clone(), value, None),
            TxnOp::put(id_key, key, None),
        ])
}

/// Sends [`lone_create_txn`] and returns how long etcd took to answer; fails when a key was
/// taken.
pub async fn lone_create(
    kv: &mut KvClient,
    key: String,
    id_key: String,
    value: Vec<u8>,
) -> anyhow::Result<Duration> {
    timed_txn(kv, lone_create_txn(key, id_key, value))
        .await
        .context("a lone create (are its keys taken?)")
}

/// The shape of the transaction that publishes one object in the S3 index
/// (`ObjectIndex::put_object`): three compares (the bucket's record exists and is the bucket
/// the request saw; no deletion of the bucket is under way, `deleting_key` absent), then a put
/// of the object's entry that returns the entry it replaced.
pub fn index_commit_txn(
    bucket_key: String,
    deleting_key: String,
    object_key: String,
    value: Vec<u8>,
) -> Txn {
    Txn::new()
        .when([
            Compare::version(bucket_key.clone(), CompareOp::Greater, 0),
            Compare::create_revision(bucket_key, CompareOp::Less, i64::MAX),
            Compare::version(deleting_key, CompareOp::Equal, 0),
        ])
        .and_then([TxnOp::put(
            object_key,
            value,
            Some(PutOptions::new().with_prev_key()),
        )])
}

/// The shape of the read that serves one GET from the S3 index (`ObjectIndex::get_object`):
/// the object's entry and the bucket's record, at one revision, linearizable.
pub fn index_read_txn(bucket_key: String, object_key: String) -> Txn {
    Txn::new().and_then([TxnOp::get(object_key, None), TxnOp::get(bucket_key, None)])
}

/// Sends `txn` and returns how long etcd took to answer; fails when its compares failed.
pub async fn timed_txn(kv: &mut KvClient, txn: Txn) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let resp = kv.txn(txn).await?;
    if !resp.succeeded() {
        bail!("the transaction's compares failed");
    }
    Ok(t.elapsed())
}
