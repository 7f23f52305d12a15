//! Point reads of single etcd keys, coalesced under load.
//!
//! Most of what etcd spends on a small read goes to the request itself (gRPC, the ReadIndex
//! round that makes it linearizable), little to the key. So while [`READS_IN_FLIGHT`] reads
//! are out at etcd, new ones queue, and the queue goes out as one read-only transaction of up
//! to [`MAX_BATCH`] ranges. Such a transaction is linearizable like a plain range: etcd serves
//! it after a ReadIndex round taken once it arrives, so every read still sees every write that
//! finished before the read was asked for. A lone read goes out at once, as a plain range.
//! A reader may ask for several keys at once ([`PointReads::get_many`]): they are read in the
//! same transaction, so at the same revision, which lets it check one key against another.

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

/// One queued read of one or more keys.
struct Pending {
    keys: Vec<Vec<u8>>,
    reply: oneshot::Sender<Reply>,
}

/// What a queued read hears.
enum Reply {
    /// One answer per key.
    Answers(Vec<GetResponse>),
    /// The batch failed: the reader reads alone (its error is then its own, with the usual
    /// retries).
    ReadAlone,
    /// etcd did not answer within [`store::ETCD_DEADLINE`]: reading alone would wait as long
    /// again.
    Stalled,
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
        let mut answers = self.get_many(vec![key.into()]).await?;
        answers.pop().ok_or_else(|| {
            etcd_client::Error::InvalidArgs("a read of one key had no answer".into())
        })
    }

    /// Reads `keys` at one revision (a linearizable read), together with whatever other reads
    /// are waiting: one answer per key, in order. At most [`MAX_BATCH`] keys.
    pub async fn get_many(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<GetResponse>, etcd_client::Error> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let queued = Pending {
            keys: keys.clone(),
            reply,
        };
        if self.queue.send(queued).is_ok() {
            // Bounded as a request is: behind reads that etcd does not answer, this one
            // would wait for a free slot first.
            match tokio::time::timeout(store::ETCD_DEADLINE, answer).await {
                Ok(Ok(Reply::Answers(resp))) => return Ok(resp),
                Ok(Ok(Reply::Stalled)) | Err(_) => return Err(store::deadline_passed()),
                Ok(Ok(Reply::ReadAlone) | Err(_)) => {}
            }
        }
        // The batch failed (its error is this read's to see, with the usual retries) or the
        // reader task is gone: read alone.
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        retry_unreached(|| {
            let mut kv = store::kv(&self.etcd);
            let keys = keys.clone();
            async move { read_alone(&mut kv, keys).await }
        })
        .await
    }

    /// Reads asked for and etcd requests sent, so far.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }
}

/// Takes reads off the queue while fewer than [`READS_IN_FLIGHT`] requests are out, each
/// time all that are waiting (up to [`MAX_BATCH`] keys).
async fn drive(etcd: Client, mut queue: mpsc::UnboundedReceiver<Pending>, stats: Arc<ReadStats>) {
    let mut in_flight = FuturesUnordered::new();
    // A read taken off the queue that did not fit into the last batch.
    let mut held: Option<Pending> = None;
    loop {
        tokio::select! {
            next = next_read(&mut queue, &mut held), if in_flight.len() < READS_IN_FLIGHT => {
                let Some(first) = next else { break };
                let mut keys = first.keys.len();
                let mut batch = vec![first];
                while let Ok(more) = queue.try_recv() {
                    if keys + more.keys.len() > MAX_BATCH {
                        held = Some(more);
                        break;
                    }
                    keys += more.keys.len();
                    batch.push(more);
                }
                stats.requests.fetch_add(1, Ordering::Relaxed);
                in_flight.push(read_batch(etcd.clone(), batch));
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.next().await.is_some() {}
}

/// The read held back from the last batch, else the next one queued.
async fn next_read(
    queue: &mut mpsc::UnboundedReceiver<Pending>,
    held: &mut Option<Pending>,
) -> Option<Pending> {
    match held.take() {
        Some(p) => Some(p),
        None => queue.recv().await,
    }
}

/// Reads `keys` in one request: a plain range for one key, a read-only transaction for more.
async fn read_alone(
    kv: &mut etcd_client::KvClient,
    mut keys: Vec<Vec<u8>>,
) -> Result<Vec<GetResponse>, etcd_client::Error> {
    if keys.len() == 1 {
        if let Some(key) = keys.pop() {
            return Ok(vec![kv.get(key, None).await?]);
        }
    }
    let n = keys.len();
    let ranges: Vec<TxnOp> = keys.into_iter().map(|k| TxnOp::get(k, None)).collect();
    let resp = kv.txn(Txn::new().and_then(ranges)).await?;
    let answers: Vec<GetResponse> = split(resp.op_responses(), n)
        .into_iter()
        .flatten()
        .collect();
    if answers.len() == n {
        Ok(answers)
    } else {
        Err(etcd_client::Error::InvalidArgs(format!(
            "etcd answered a transaction of {n} reads with another number of range answers"
        )))
    }
}

/// Sends one batch and hands each reader its answers (`None` to all when the request failed).
async fn read_batch(etcd: Client, batch: Vec<Pending>) {
    let mut kv = store::kv(&etcd);
    let mut batch = batch;
    if batch.len() == 1 {
        if let Some(p) = batch.pop() {
            let reply = match store::within_deadline(read_alone(&mut kv, p.keys)).await {
                Ok(resp) => Reply::Answers(resp),
                Err(e) if store::is_deadline_passed(&e) => Reply::Stalled,
                Err(_) => Reply::ReadAlone,
            };
            let _ = p.reply.send(reply);
        }
        return;
    }
    let ranges: Vec<TxnOp> = batch
        .iter()
        .flat_map(|p| p.keys.iter().map(|k| TxnOp::get(k.clone(), None)))
        .collect();
    let n = ranges.len();
    let answers = match store::within_deadline(kv.txn(Txn::new().and_then(ranges))).await {
        Ok(resp) => split(resp.op_responses(), n),
        Err(e) if store::is_deadline_passed(&e) => {
            for p in batch {
                let _ = p.reply.send(Reply::Stalled);
            }
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "a batch of point reads failed; each reads alone");
            Vec::new()
        }
    };
    let mut answers = answers.into_iter();
    for p in batch {
        // Exactly this reader's answers, even when one of them is missing.
        let mine: Vec<Option<GetResponse>> = answers.by_ref().take(p.keys.len()).collect();
        let mine: Option<Vec<GetResponse>> = mine.into_iter().collect();
        let reply = match mine.filter(|m| m.len() == p.keys.len()) {
            Some(m) => Reply::Answers(m),
            None => Reply::ReadAlone,
        };
        let _ = p.reply.send(reply);
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
