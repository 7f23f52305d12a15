//! The etcd transaction the gateway commits for one record it creates alone, sent straight to
//! etcd by the benchmarks that show how much of a create's latency is etcd's own (`bench-registry`,
//! `bench-ec2`).

use std::time::{Duration, Instant};

use anyhow::bail;
use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp};

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
    let t = Instant::now();
    let resp = kv.txn(lone_create_txn(key, id_key, value)).await?;
    if !resp.succeeded() {
        bail!("the transaction found its keys taken");
    }
    Ok(t.elapsed())
}
