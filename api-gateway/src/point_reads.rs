//! Point reads of single etcd keys, coalesced under load.
//!
//! Most of what etcd spends on a small read goes to the request itself (gRPC, the ReadIndex
//! round that makes it linearizable), little to the key. So while [`READS_IN_FLIGHT`] reads
//! are out at etcd, new ones queue, and the queue goes out as one read-only transaction of up
//! to [`MAX_BATCH`] ranges. Such a transaction is linearizable like a plain range: etcd serves
//! it after a ReadIndex round taken once it arrives, so every read still sees every write that
//! finished before the read was asked for. A lone read goes out at once, as a plain range.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use etcd_client::{Client, GetResponse, Txn, TxnOp, TxnOpResponse};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::store::{self, retry_unreached};

/// Requests (single ranges or batches) out at etcd at once.
pub const READS_IN_FLIGHT: usize = 2;
/// Ranges in one batch (etcd refuses transactions of more than 128 operations by default).
pub const MAX_BATCH: usize = 64;

/// One queued read; `None` as the answer means the batch failed and the reader reads alone.
struct Pending {
    key: Vec<u8>,
    reply: oneshot::Sender<Option<GetResponse>>,
}

/// How many reads were asked for and how many etcd requests carried them.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Reads asked for.
    pub reads: AtomicU64,
    /// Requests sent to etcd for them (a batch counts once).
    pub requests: AtomicU64,
}

/// A handle on the coalescing reader of one etcd client; clones share it.
#[derive(Clone)]
pub struct PointReads {
    etcd: Client,
    queue: mpsc::UnboundedSender<Pending>,
    stats: Arc<ReadStats>,
}

impl PointReads {
    /// Starts the reader on `etcd` (a task that ends when the last handle is dropped).
    pub fn start(etcd: Client) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ReadStats::default());
        tokio::spawn(drive(etcd.clone(), rx, stats.clone()));
        Self { etcd, queue, stats }
    }

    /// Reads `key` (a linearizable read), together with whatever other reads are waiting.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<GetResponse, etcd_client::Error> {
        let key = key.into();
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let queued = Pending {
            key: key.clone(),
            reply,
        };
        if self.queue.send(queued).is_ok() {
            if let Ok(Some(resp)) = answer.await {
                return Ok(resp);
            }
        }
        // The batch failed (its error is this read's to see, with the usual retries) or the
        // reader task is gone: read alone.
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        retry_unreached(|| {
            let mut kv = store::kv(&self.etcd);
            let key = key.clone();
            async move { kv.get(key, None).await }
        })
        .await
    }

    /// Reads asked for and etcd requests sent, so far.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }
}

/// Takes reads off the queue while fewer than [`READS_IN_FLIGHT`] requests are out, each
/// time all that are waiting (up to [`MAX_BATCH`]).
async fn drive(etcd: Client, mut queue: mpsc::UnboundedReceiver<Pending>, stats: Arc<ReadStats>) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = queue.recv(), if in_flight.len() < READS_IN_FLIGHT => {
                let Some(first) = next else { break };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                stats.requests.fetch_add(1, Ordering::Relaxed);
                in_flight.push(read_batch(etcd.clone(), batch));
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Sends one batch and hands each reader its answer (`None` to all when the request failed).
async fn read_batch(etcd: Client, batch: Vec<Pending>) {
    let mut kv = store::kv(&etcd);
    let mut batch = batch;
    if batch.len() == 1 {
        if let Some(p) = batch.pop() {
            let resp = kv.get(p.key, None).await.ok();
            let _ = p.reply.send(resp);
        }
        return;
    }
    let ranges: Vec<TxnOp> = batch
        .iter()
        .map(|p| TxnOp::get(p.key.clone(), None))
        .collect();
    let answers = match kv.txn(Txn::new().and_then(ranges)).await {
        Ok(resp) => split(resp.op_responses(), batch.len()),
        Err(e) => {
            tracing::debug!(error = %e, "a batch of point reads failed; each reads alone");
            Vec::new()
        }
    };
    let mut answers = answers.into_iter();
    for p in batch {
        let _ = p.reply.send(answers.next().flatten());
    }
}

/// The range answers of a read-only transaction of `n` ranges, in order; empty when it does
/// not hold exactly `n` of them (then every reader reads alone).
fn split(responses: Vec<TxnOpResponse>, n: usize) -> Vec<Option<GetResponse>> {
    if responses.len() != n {
        return Vec::new();
    }
    responses
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}
