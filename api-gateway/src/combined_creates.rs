//! Creates, combined under load.
//!
//! A create claims keys nobody holds: one etcd transaction whose compares ask that each key was
//! never created and whose puts write them (the record, its ID index entry, its unique values).
//! Most of what etcd spends on such a small transaction goes to the request itself (gRPC, a raft
//! proposal, its apply), little to the keys. So while [`CREATES_IN_FLIGHT`] transactions are out
//! at etcd, new creates queue, and the queue goes out as one transaction holding all their
//! compares and puts. It succeeds only when every create in it could have succeeded alone, and
//! then commits them all at one revision, as a reservation's instances already share one (the
//! registry's watches never end inside a revision). When any of them cannot (a name is taken),
//! the transaction changes nothing, and each of its creates queues again to go out alone, so
//! that each hears its own answer. A lone create goes out at once, as its own transaction.
//!
//! Every transaction, combined or alone, holds one of the [`CREATES_IN_FLIGHT`] slots until it
//! comes back, or until the request that sent it is dropped (a client that went away). A
//! create whose caller gave up while it waited in the queue is never sent.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::store::{self, retry_unreached};

/// Transactions out at etcd at once.
pub const CREATES_IN_FLIGHT: usize = 2;
/// Keys claimed by one transaction (etcd refuses transactions of more than 128 operations by
/// default).
pub const MAX_KEYS: usize = 128;
/// Bytes of keys and values in one combined transaction (etcd refuses requests over 1.5 MiB by
/// default). A create larger than this alone is sent alone.
pub const MAX_BYTES: usize = 1 << 20;

/// What a create achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every key was written, at this revision.
    Committed(i64),
    /// At least one key already existed; nothing was written.
    Taken,
}

/// One queued create.
struct Pending {
    entries: Vec<(String, Vec<u8>)>,
    /// It goes out as a transaction of its own (its combined one could not commit).
    alone: bool,
    reply: oneshot::Sender<Reply>,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.entries.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// What a queued create hears.
enum Reply {
    /// What its transaction did (it went out alone, or its batch committed).
    Done(Outcome),
    /// Its batch changed nothing because one of its creates could not be made: it queues again
    /// to go alone.
    Alone,
    /// The transaction failed; the text is etcd's error.
    Failed(String),
    /// etcd did not answer within [`store::ETCD_DEADLINE`]: the outcome is unknown.
    Stalled,
}

/// How many creates were asked for and how many etcd transactions carried them.
#[derive(Debug, Default)]
pub struct CreateStats {
    /// Creates asked for.
    pub creates: AtomicU64,
    /// Transactions sent to etcd for them (a batch counts once).
    pub requests: AtomicU64,
}

/// The transactions out at etcd, shared by creates sent directly and the writer task's batches.
struct Slots {
    /// Transactions out now (at most [`CREATES_IN_FLIGHT`]).
    busy: AtomicUsize,
    /// Creates queued for the writer task and not yet taken off the queue for good.
    queued: AtomicUsize,
    /// Told when a slot comes back, so that the writer task can send what waits.
    freed: Notify,
}

impl Slots {
    /// Takes a slot if one is free; it comes back when the [`Slot`] is dropped.
    fn take(self: &Arc<Self>) -> Option<Slot> {
        self.busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b < CREATES_IN_FLIGHT).then_some(b + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// One transaction's place among the [`CREATES_IN_FLIGHT`]; given back when dropped, also when
/// the request holding it is dropped before etcd answered.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// A handle on the combining writer of one etcd client; clones share it.
#[derive(Clone)]
pub struct CombinedCreates {
    etcd: Client,
    queue: mpsc::UnboundedSender<Pending>,
    slots: Arc<Slots>,
    stats: Arc<CreateStats>,
}

impl CombinedCreates {
    /// Starts the writer on `etcd` (a task that ends when the last handle is dropped).
    pub fn start(etcd: Client) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(CreateStats::default());
        let slots = Arc::new(Slots {
            busy: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            freed: Notify::new(),
        });
        tokio::spawn(drive(etcd.clone(), rx, slots.clone(), stats.clone()));
        Self {
            etcd,
            queue,
            slots,
            stats,
        }
    }

    /// Writes every `(key, value)` of `entries` if none of the keys exists, else nothing;
    /// together with whatever other creates are waiting. The keys must differ from each other.
    /// Within [`store::ETCD_DEADLINE`] of waiting for its turn and its answer, else the outcome
    /// is unknown (a create already sent may still commit; one still queued never will).
    pub async fn create(
        &self,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<Outcome, etcd_client::Error> {
        self.stats.creates.fetch_add(1, Ordering::Relaxed);
        // Nothing waits and a slot is free: this create goes out at once, from its own task.
        if self.slots.queued.load(Ordering::Acquire) == 0 {
            if let Some(slot) = self.slots.take() {
                let sent = self.send(&entries).await;
                drop(slot);
                return sent;
            }
        }
        let deadline = tokio::time::Instant::now() + store::ETCD_DEADLINE;
        let mut alone = false;
        loop {
            let (reply, answer) = oneshot::channel();
            let queued = Pending {
                entries: entries.clone(),
                alone,
                reply,
            };
            self.slots.queued.fetch_add(1, Ordering::AcqRel);
            if self.queue.send(queued).is_err() {
                // The writer task is gone: send it from here.
                self.slots.queued.fetch_sub(1, Ordering::AcqRel);
                return self.send(&entries).await;
            }
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(Reply::Done(outcome))) => return Ok(outcome),
                Ok(Ok(Reply::Failed(text))) => {
                    return Err(etcd_client::Error::IoError(std::io::Error::other(text)))
                }
                Ok(Ok(Reply::Stalled)) | Err(_) => return Err(store::deadline_passed()),
                Ok(Ok(Reply::Alone)) => alone = true,
                // The writer task went away with it unsent: send it from here.
                Ok(Err(_)) => return self.send(&entries).await,
            }
        }
    }

    /// Sends one create as its own transaction.
    async fn send(&self, entries: &[(String, Vec<u8>)]) -> Result<Outcome, etcd_client::Error> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let txn = claim(entries.iter());
        retry_unreached(|| {
            let mut kv = store::kv(&self.etcd);
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
        .map(|resp| outcome_of(&resp))
    }

    /// Creates asked for and etcd transactions sent, so far.
    pub fn stats(&self) -> &CreateStats {
        &self.stats
    }

    /// Transactions out at etcd now.
    pub fn in_flight(&self) -> usize {
        self.slots.busy.load(Ordering::Acquire)
    }
}

/// The transaction that writes `entries` if none of their keys exists.
fn claim<'a>(entries: impl Iterator<Item = &'a (String, Vec<u8>)> + Clone) -> Txn {
    Txn::new()
        .when(
            entries
                .clone()
                .map(|(k, _)| Compare::create_revision(k.as_str(), CompareOp::Equal, 0))
                .collect::<Vec<_>>(),
        )
        .and_then(
            entries
                .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
                .collect::<Vec<_>>(),
        )
}

fn outcome_of(resp: &etcd_client::TxnResponse) -> Outcome {
    if resp.succeeded() {
        Outcome::Committed(resp.header().map(|h| h.revision()).unwrap_or(0))
    } else {
        Outcome::Taken
    }
}

/// Limits of one batch as it fills.
#[derive(Default)]
struct Batch {
    creates: Vec<Pending>,
    keys: HashSet<String>,
    bytes: usize,
}

impl Batch {
    /// Whether `p` may join: neither it nor the batch goes alone, the batch stays within
    /// [`MAX_KEYS`] and [`MAX_BYTES`], and no key is claimed twice (etcd refuses a transaction
    /// that puts one key twice).
    fn admits(&self, p: &Pending) -> bool {
        self.creates.is_empty()
            || (!p.alone
                && !self.creates.iter().any(|c| c.alone)
                && self.keys.len() + p.entries.len() <= MAX_KEYS
                && self.bytes + p.bytes() <= MAX_BYTES
                && p.entries.iter().all(|(k, _)| !self.keys.contains(k)))
    }

    fn push(&mut self, p: Pending) {
        self.bytes += p.bytes();
        self.keys.extend(p.entries.iter().map(|(k, _)| k.clone()));
        self.creates.push(p);
    }
}

/// The next create still wanted off the queue (the one held back first): those whose callers
/// gave up waiting are dropped unsent, and uncounted.
fn next_wanted(
    held: &mut Option<Pending>,
    queue: &mut mpsc::UnboundedReceiver<Pending>,
    slots: &Slots,
) -> Option<Pending> {
    loop {
        let p = held.take().or_else(|| queue.try_recv().ok())?;
        if !p.reply.is_closed() {
            return Some(p);
        }
        slots.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes creates off the queue whenever a slot is free, each time all that are waiting and fit
/// into one batch.
async fn drive(
    etcd: Client,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    slots: Arc<Slots>,
    stats: Arc<CreateStats>,
) {
    let mut in_flight = FuturesUnordered::new();
    // A create taken off the queue that is not in a batch yet (still counted in `queued`).
    let mut held: Option<Pending> = None;
    loop {
        let Some(first) = next_wanted(&mut held, &mut queue, &slots) else {
            tokio::select! {
                next = queue.recv() => match next {
                    Some(p) => held = Some(p),
                    None => break,
                },
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
            continue;
        };
        let Some(slot) = slots.take() else {
            held = Some(first);
            tokio::select! {
                () = slots.freed.notified() => {}
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
            continue;
        };
        let mut batch = Batch::default();
        batch.push(first);
        while let Some(more) = next_wanted(&mut None, &mut queue, &slots) {
            if !batch.admits(&more) {
                held = Some(more);
                break;
            }
            batch.push(more);
        }
        slots
            .queued
            .fetch_sub(batch.creates.len(), Ordering::AcqRel);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        in_flight.push(send_batch(etcd.clone(), batch.creates, slot));
    }
    while in_flight.next().await.is_some() {}
}

/// Sends one batch as one transaction and tells each create what became of it.
async fn send_batch(etcd: Client, batch: Vec<Pending>, slot: Slot) {
    let txn = claim(batch.iter().flat_map(|p| p.entries.iter()));
    let sent = retry_unreached(|| {
        let mut kv = store::kv(&etcd);
        let txn = txn.clone();
        async move { kv.txn(txn).await }
    })
    .await;
    drop(slot);
    let alone = batch.len() == 1;
    let reply = |_: &Pending| match &sent {
        Ok(resp) => match outcome_of(resp) {
            Outcome::Taken if !alone => Reply::Alone,
            outcome => Reply::Done(outcome),
        },
        Err(e) if store::is_deadline_passed(e) => Reply::Stalled,
        // etcd refused the combined request before applying any of it: alone, each may fit.
        Err(e) if !alone && refused_as_a_whole(e) => Reply::Alone,
        Err(e) => Reply::Failed(e.to_string()),
    };
    for p in batch {
        let r = reply(&p);
        let _ = p.reply.send(r);
    }
}

/// Whether etcd refused a transaction for its size or shape, before applying anything.
fn refused_as_a_whole(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    [
        "too many operations",
        "request is too large",
        "duplicate key",
    ]
    .iter()
    .any(|refusal| text.contains(refusal))
}
