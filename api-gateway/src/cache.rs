//! The watch cache: one etcd watch over every record feeds an in-memory copy of each kind,
//! a bounded history of events, and any number of API watchers.
//!
//! A hundred `kubectl get -w` or controller watches of a kind cost one etcd watch. Lists
//! without a `limit` are served from here once the cache has caught up with etcd's current
//! revision (a consistent read), the way kube-apiserver serves them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use tokio::sync::watch;

use crate::capacity::Claim;
use crate::store::{plural_of_key, KARRI_PREFIX, REGISTRY_PREFIX};

/// One record as the cache holds it: parsed, with its resourceVersion set (serialized once it is
/// first sent).
#[derive(Debug)]
pub struct CachedObject {
    /// The etcd key.
    pub key: String,
    /// The object, `metadata.resourceVersion` set to its mod revision.
    pub value: Value,
    /// `value` serialized, for lists and watch events: made the first time one asks for it
    /// ([`CachedObject::json`]), as most records of a busy moment are never listed or watched
    /// before they change again, and then kept.
    json: std::sync::OnceLock<Bytes>,
    /// The etcd mod revision.
    pub revision: i64,
    /// Bytes of the stored value (0 when not known), what the history's byte budget counts.
    pub stored_size: usize,
    /// A face's rendering of the record (EC2's `instancesSet` item of an Instance), made the
    /// first time it is asked for. It may depend on the record and the gateway's fixed settings
    /// alone: a changed record is a new object, so it never goes stale.
    pub rendering: std::sync::OnceLock<Rendering>,
}

/// A record as a face renders it in lists: where it sorts, the group it is listed under, and
/// its bytes.
#[derive(Debug, Clone)]
pub struct Rendering {
    /// The key the list sorts by.
    pub sort_key: String,
    /// The group the record is listed under (an EC2 instance's reservation).
    pub group: String,
    /// The rendered record.
    pub bytes: Bytes,
}

impl CachedObject {
    /// Build from a stored value and the revision it is seen at.
    pub fn from_stored(key: String, raw: &[u8], revision: i64) -> Option<Self> {
        let mut value: Value = serde_json::from_slice(raw).ok()?;
        set_resource_version(&mut value, revision);
        Some(Self::from_value(key, value, revision).with_stored_size(raw.len()))
    }

    /// Build from a value whose resourceVersion is already set.
    pub fn from_value(key: String, value: Value, revision: i64) -> Self {
        CachedObject {
            key,
            value,
            json: std::sync::OnceLock::new(),
            revision,
            stored_size: 0,
            rendering: std::sync::OnceLock::new(),
        }
    }

    /// The same, counted as `n` bytes of stored value.
    pub fn with_stored_size(mut self, n: usize) -> Self {
        self.stored_size = n;
        self
    }

    /// The object serialized, as lists and watch events send it.
    pub fn json(&self) -> &Bytes {
        self.json
            .get_or_init(|| Bytes::from(serde_json::to_vec(&self.value).unwrap_or_default()))
    }

    /// The object's UID.
    pub fn uid(&self) -> Option<&str> {
        self.value.pointer("/metadata/uid").and_then(Value::as_str)
    }
}

/// Set `metadata.resourceVersion`.
pub fn set_resource_version(value: &mut Value, revision: i64) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".to_string(),
            Value::String(revision.to_string()),
        );
    }
}

/// A change to one record.
#[derive(Debug)]
pub struct CacheEvent {
    /// The etcd revision of the change.
    pub revision: i64,
    /// The object after the change; for a deletion, the last state with the deletion revision.
    pub object: Arc<CachedObject>,
    /// The object before the change, if it existed.
    pub prev: Option<Arc<CachedObject>>,
    /// Whether the record was deleted.
    pub deleted: bool,
}

impl CacheEvent {
    /// What the event counts against the history's byte budget: the stored bytes of the record
    /// after and before the change, as it holds both (the one before may outlive its own event).
    fn cost(&self) -> usize {
        self.object.stored_size + self.prev.as_ref().map_or(0, |p| p.stored_size)
    }
}

#[derive(Default)]
struct KindState {
    objects: BTreeMap<String, Arc<CachedObject>>,
    history: VecDeque<Arc<CacheEvent>>,
    /// What the events in `history` count against the byte budget ([`CacheEvent::cost`]).
    history_bytes: usize,
    /// Every change after this revision is in `history`.
    oldest: i64,
}

#[derive(Default)]
struct State {
    kinds: HashMap<String, KindState>,
    /// The etcd revision the cache has processed.
    revision: i64,
    /// Record UID → key, for owner lookups.
    uids: HashMap<String, String>,
    /// EC2-style ID (`karri.dev/id` label) → key, for lookups by ID without a trip to etcd;
    /// also an access key's ID (`status.accessKeyId`, `AKIK…`, never an EC2-style ID) → its
    /// AccessKey record, which every signed request looks up.
    ids: HashMap<String, String>,
    /// Owner UID → keys of dependents.
    dependents: HashMap<String, HashSet<String>>,
    /// Keys of the records being deleted in the foreground (the garbage collector's work).
    foreground: HashSet<String>,
    /// How many Instance records make each claim on the nodes' room, for EC2 launches.
    claims: HashMap<Claim, u32>,
    synced: bool,
}

/// Asked for a start revision older than the cache remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooOld {
    /// The oldest revision the cache can resume after.
    pub oldest: i64,
}

/// How the cache's etcd watch ended.
enum WatchEnd {
    /// The stream closed: resume it.
    Closed,
    /// etcd canceled it (compacted past its revision): list again.
    Canceled,
}

/// How much history each kind keeps for watches that resume from a revision: the newest
/// `events` changes, fewer when their records' stored bytes pass `bytes` (large records changed
/// often must not hold the gateway's memory). A watch that resumes from before what is kept is
/// served from etcd instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Changes kept per kind (at least 16).
    pub events: usize,
    /// Stored bytes of the records the kept changes hold per kind (each change its record
    /// before and after; parsed, they take a few times that); the newest change is always
    /// kept.
    pub bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            events: 10_000,
            bytes: 64 << 20,
        }
    }
}

impl KindState {
    /// Adds `event` to the history and forgets the oldest changes past `limits`.
    fn remember(&mut self, event: Arc<CacheEvent>, limits: HistoryLimits) {
        self.history_bytes += event.cost();
        self.history.push_back(event);
        while self.history.len() > limits.events
            || (self.history_bytes > limits.bytes && self.history.len() > 1)
        {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes = self.history_bytes.saturating_sub(old.cost());
            self.oldest = old.revision;
        }
    }
}

/// The shared watch cache.
pub struct WatchCache {
    state: RwLock<State>,
    revision: watch::Sender<i64>,
    limits: HistoryLimits,
}

fn unpoison<T>(r: Result<T, std::sync::PoisonError<T>>) -> T {
    r.unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WatchCache {
    /// An empty cache keeping the history `limits` allow per kind.
    pub fn new(plurals: &[&str], limits: HistoryLimits) -> Arc<Self> {
        let mut state = State::default();
        for p in plurals {
            state.kinds.insert(p.to_string(), KindState::default());
        }
        let (revision, _) = watch::channel(0);
        Arc::new(WatchCache {
            state: RwLock::new(state),
            revision,
            limits: HistoryLimits {
                events: limits.events.max(16),
                bytes: limits.bytes,
            },
        })
    }

    /// The revision the cache has processed.
    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Whether the cache has completed its first list.
    pub fn synced(&self) -> bool {
        unpoison(self.state.read()).synced
    }

    /// Keep the cache in step with etcd forever: list, then watch. A watch that breaks (etcd
    /// restarted, a member failed) is resumed after the last revision the cache applied, so
    /// its history and the watchers reading it carry on; only when etcd compacted past that
    /// revision (or canceled the watch) does the cache list everything again. `relists`
    /// counts the lists.
    pub async fn run(self: Arc<Self>, client: Client, relists: Counter) {
        let mut resume_after: Option<i64> = None;
        loop {
            if resume_after.is_none() {
                relists.inc();
            }
            resume_after = match self.clone().sync_once(client.clone(), resume_after).await {
                Ok(WatchEnd::Closed) => {
                    tracing::warn!("etcd watch ended; resuming it");
                    Some(self.revision())
                }
                Ok(WatchEnd::Canceled) => {
                    tracing::warn!("etcd watch canceled; relisting");
                    None
                }
                Err(e) => {
                    // Resumable only once a list is in and its watch was opened.
                    let synced = self.synced();
                    tracing::warn!(error = %e, resuming = synced, "etcd watch failed");
                    synced.then(|| self.revision())
                }
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn sync_once(
        self: Arc<Self>,
        client: Client,
        resume_after: Option<i64>,
    ) -> Result<WatchEnd, etcd_client::Error> {
        // The records are listed; all of Karri's keys are watched, index entries and the S3
        // object index too: every write of Karri's then reaches the cache as an event, whose
        // revision is the only one trusted (see `apply`). The object index is not listed: it
        // can be far larger than the records and the cache keeps nothing of it.
        let start = match resume_after {
            Some(after) => after,
            None => {
                let resp = crate::store::kv(&client)
                    .get(REGISTRY_PREFIX, Some(GetOptions::new().with_prefix()))
                    .await?;
                let start = resp.header().map(|h| h.revision()).unwrap_or(0);
                self.reset(resp.kvs(), start);
                start
            }
        };
        // The cache knows each previous value itself: no prev_kv, so etcd reads nothing extra.
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start + 1);
        let mut stream = crate::store::watcher(&client)
            .watch(KARRI_PREFIX, Some(options))
            .await?;
        // Ready only now: the list is in and the watch that keeps it current is open.
        self.mark_synced();
        while let Some(resp) = stream.message().await? {
            if resp.canceled() || resp.compact_revision() > 0 {
                tracing::warn!(
                    compact = resp.compact_revision(),
                    reason = resp.cancel_reason(),
                    "etcd watch canceled"
                );
                return Ok(WatchEnd::Canceled);
            }
            // Only events move the cache's revision, to their own mod_revision. A response's
            // header revision is etcd's current one, possibly ahead of events still to come (a
            // watch that starts unsynced, and etcd before 3.4.25 sends progress notifications
            // ahead of events), so created responses and progress notifications move nothing.
            let Some(rev) = resp
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max()
            else {
                continue;
            };
            self.apply(resp.events(), rev);
        }
        Ok(WatchEnd::Closed)
    }

    fn reset(&self, kvs: &[KeyValue], revision: i64) {
        let mut state = unpoison(self.state.write());
        for kind in state.kinds.values_mut() {
            kind.objects.clear();
            kind.history.clear();
            kind.history_bytes = 0;
            kind.oldest = revision;
        }
        state.uids.clear();
        state.ids.clear();
        state.dependents.clear();
        state.foreground.clear();
        state.claims.clear();
        for kv in kvs {
            let Ok(key) = kv.key_str() else { continue };
            if !key.starts_with(REGISTRY_PREFIX) {
                continue;
            }
            let Some(obj) =
                CachedObject::from_stored(key.to_string(), kv.value(), kv.mod_revision())
            else {
                tracing::error!(key, "unparsable record in etcd; skipped");
                continue;
            };
            let obj = Arc::new(obj);
            index_add(&mut state, &obj);
            let Some(plural) = plural_of_key(key) else {
                continue;
            };
            if let Some(kind) = state.kinds.get_mut(plural) {
                kind.objects.insert(obj.key.clone(), obj);
            }
        }
        state.revision = revision;
        state.synced = false;
        drop(state);
        self.revision.send_replace(revision);
    }

    fn mark_synced(&self) {
        let mut state = unpoison(self.state.write());
        state.synced = true;
        let rev = state.revision;
        drop(state);
        self.revision.send_replace(rev);
    }

    fn apply(&self, events: &[etcd_client::Event], revision: i64) {
        let mut state = unpoison(self.state.write());
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let Some(plural) = plural_of_key(key).map(str::to_string) else {
                continue;
            };
            let ev_rev = kv.mod_revision();
            let prev = state
                .kinds
                .get(&plural)
                .and_then(|k| k.objects.get(key).cloned());
            let event = match ev.event_type() {
                EventType::Put => {
                    let Some(obj) = CachedObject::from_stored(key.to_string(), kv.value(), ev_rev)
                    else {
                        tracing::error!(key, "unparsable record in etcd; skipped");
                        continue;
                    };
                    let obj = Arc::new(obj);
                    if let Some(p) = &prev {
                        index_remove(&mut state, p);
                    }
                    index_add(&mut state, &obj);
                    if let Some(kind) = state.kinds.get_mut(&plural) {
                        kind.objects.insert(key.to_string(), obj.clone());
                    }
                    CacheEvent {
                        revision: ev_rev,
                        object: obj,
                        prev,
                        deleted: false,
                    }
                }
                EventType::Delete => {
                    let Some(p) = prev else { continue };
                    index_remove(&mut state, &p);
                    if let Some(kind) = state.kinds.get_mut(&plural) {
                        kind.objects.remove(key);
                    }
                    let mut last = p.value.clone();
                    set_resource_version(&mut last, ev_rev);
                    let object = CachedObject::from_value(key.to_string(), last, ev_rev)
                        .with_stored_size(p.stored_size);
                    CacheEvent {
                        revision: ev_rev,
                        object: Arc::new(object),
                        prev: Some(p),
                        deleted: true,
                    }
                }
            };
            if let Some(kind) = state.kinds.get_mut(&plural) {
                kind.remember(Arc::new(event), self.limits);
            }
        }
        if revision > state.revision {
            state.revision = revision;
        }
        let rev = state.revision;
        drop(state);
        self.revision.send_replace(rev);
    }

    /// Wait until the cache has processed `revision`; false if it did not within `timeout`.
    pub async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.revision.subscribe();
        if *rx.borrow_and_update() >= revision && self.synced() {
            return true;
        }
        let wait = async {
            loop {
                if rx.changed().await.is_err() {
                    return false;
                }
                if *rx.borrow_and_update() >= revision && self.synced() {
                    return true;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// What the Instance records claim of the nodes' room, with how many make each claim.
    pub fn claims(&self) -> Vec<(Claim, u32)> {
        let state = unpoison(self.state.read());
        state.claims.iter().map(|(c, n)| (c.clone(), *n)).collect()
    }

    /// A snapshot of one kind's records under `prefix`, and the revision it is at.
    pub fn list(&self, plural: &str, prefix: &str) -> (Vec<Arc<CachedObject>>, i64) {
        let state = unpoison(self.state.read());
        let items = state
            .kinds
            .get(plural)
            .map(|k| {
                k.objects
                    .range(prefix.to_string()..)
                    .take_while(|(key, _)| key.starts_with(prefix))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default();
        (items, state.revision)
    }

    /// One record by key.
    pub fn get(&self, plural: &str, key: &str) -> Option<Arc<CachedObject>> {
        let state = unpoison(self.state.read());
        state.kinds.get(plural)?.objects.get(key).cloned()
    }

    /// The record whose EC2-style ID is `id`, as far as the cache has seen.
    pub fn by_id(&self, id: &str) -> Option<Arc<CachedObject>> {
        let state = unpoison(self.state.read());
        let key = state.ids.get(id)?;
        let plural = crate::store::plural_of_key(key)?;
        state.kinds.get(plural)?.objects.get(key).cloned()
    }

    /// The record with this UID, as far as the cache has seen.
    pub fn by_uid(&self, uid: &str) -> Option<Arc<CachedObject>> {
        let state = unpoison(self.state.read());
        let key = state.uids.get(uid)?;
        let plural = crate::store::plural_of_key(key)?;
        state.kinds.get(plural)?.objects.get(key).cloned()
    }

    /// Whether a record with this UID exists.
    pub fn uid_exists(&self, uid: &str) -> bool {
        unpoison(self.state.read()).uids.contains_key(uid)
    }

    /// Keys of the records that name `uid` as an owner.
    pub fn dependents_of(&self, uid: &str) -> Vec<String> {
        let state = unpoison(self.state.read());
        state
            .dependents
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Keys of the records marked for deletion in the foreground, whose dependents the garbage
    /// collector deletes first.
    pub fn foreground_deletions(&self) -> Vec<String> {
        unpoison(self.state.read())
            .foreground
            .iter()
            .cloned()
            .collect()
    }

    /// Keys of records that name an owner which no longer exists: the garbage collector's
    /// work. Costs one lookup per distinct owner, not one per record.
    pub fn orphan_candidates(&self) -> Vec<String> {
        let state = unpoison(self.state.read());
        state
            .dependents
            .iter()
            .filter(|(owner, _)| !state.uids.contains_key(*owner))
            .flat_map(|(_, keys)| keys.iter().cloned())
            .collect()
    }

    /// Events of one kind after revision `after`, or `TooOld` when the history does not reach
    /// back: at most `max` of them and then the rest of the last one's revision, so that a
    /// watch that has sent them resumes after that revision, and a slow watcher holds only a
    /// few events the history has since forgotten. Also returns the revision the cache has
    /// processed (for bookmarks; `None` when events were left out).
    pub fn events_after(
        &self,
        plural: &str,
        after: i64,
        max: usize,
    ) -> Result<(Vec<Arc<CacheEvent>>, Option<i64>), TooOld> {
        let state = unpoison(self.state.read());
        let Some(kind) = state.kinds.get(plural) else {
            return Ok((Vec::new(), Some(state.revision)));
        };
        if after < kind.oldest {
            return Err(TooOld {
                oldest: kind.oldest,
            });
        }
        let start = kind.history.partition_point(|e| e.revision <= after);
        let mut end = (start + max.max(1)).min(kind.history.len());
        if let Some(last) = end.checked_sub(1).and_then(|i| kind.history.get(i)) {
            while kind
                .history
                .get(end)
                .is_some_and(|e| e.revision == last.revision)
            {
                end += 1;
            }
        }
        let complete = end == kind.history.len();
        Ok((
            kind.history.range(start..end).cloned().collect(),
            complete.then_some(state.revision),
        ))
    }

    /// A receiver that changes whenever the processed revision advances.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }
}

fn owner_uids(obj: &CachedObject) -> Vec<String> {
    obj.value
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The claim of an Instance record on the nodes' room.
fn claim_of(obj: &CachedObject) -> Option<Claim> {
    (plural_of_key(&obj.key) == Some("instances"))
        .then(|| crate::capacity::claim_of(&obj.value))
        .flatten()
}

/// The IDs a record is found by: its EC2-style ID label, and an access key's ID.
fn ids_of(obj: &CachedObject) -> impl Iterator<Item = &str> {
    let label = obj
        .value
        .pointer("/metadata/labels")
        .and_then(|l| l.get(crds::ID_LABEL))
        .and_then(Value::as_str);
    let access_key = obj
        .value
        .pointer("/status/accessKeyId")
        .and_then(Value::as_str);
    label.into_iter().chain(access_key)
}

fn index_add(state: &mut State, obj: &CachedObject) {
    if let Some(uid) = obj.uid() {
        state.uids.insert(uid.to_string(), obj.key.clone());
    }
    for id in ids_of(obj) {
        state.ids.insert(id.to_string(), obj.key.clone());
    }
    for owner in owner_uids(obj) {
        state
            .dependents
            .entry(owner)
            .or_default()
            .insert(obj.key.clone());
    }
    if crate::admission::deleting_in_foreground(&obj.value) {
        state.foreground.insert(obj.key.clone());
    }
    if let Some(claim) = claim_of(obj) {
        *state.claims.entry(claim).or_default() += 1;
    }
}

fn index_remove(state: &mut State, obj: &CachedObject) {
    if let Some(claim) = claim_of(obj) {
        if let Some(count) = state.claims.get_mut(&claim) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.claims.remove(&claim);
            }
        }
    }
    if let Some(uid) = obj.uid() {
        state.uids.remove(uid);
    }
    state.foreground.remove(&obj.key);
    for id in ids_of(obj) {
        if state.ids.get(id) == Some(&obj.key) {
            state.ids.remove(id);
        }
    }
    for owner in owner_uids(obj) {
        if let Some(set) = state.dependents.get_mut(&owner) {
            set.remove(&obj.key);
            if set.is_empty() {
                state.dependents.remove(&owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: i64, size: usize) -> Arc<CacheEvent> {
        let object = CachedObject::from_value("/k".into(), serde_json::json!({}), revision)
            .with_stored_size(size);
        Arc::new(CacheEvent {
            revision,
            object: Arc::new(object),
            prev: None,
            deleted: false,
        })
    }

    /// The revisions a kind's history keeps after changes of these stored sizes (revisions 1,
    /// 2, ...), and the revision after which it has every change.
    fn kept(sizes: &[usize], limits: HistoryLimits) -> (Vec<i64>, i64) {
        let mut kind = KindState::default();
        for (i, size) in sizes.iter().enumerate() {
            let revision = i64::try_from(i).expect("a short table") + 1;
            kind.remember(event(revision, *size), limits);
        }
        let bytes: usize = kind.history.iter().map(|e| e.cost()).sum();
        assert_eq!(kind.history_bytes, bytes, "the byte count drifted");
        (
            kind.history.iter().map(|e| e.revision).collect(),
            kind.oldest,
        )
    }

    #[test]
    fn a_watch_takes_events_in_batches_that_end_with_a_whole_revision() {
        let cache = WatchCache::new(&["instances"], HistoryLimits::default());
        {
            let mut state = unpoison(cache.state.write());
            state.revision = 9;
            let kind = state
                .kinds
                .get_mut("instances")
                .expect("the kind made above");
            for revision in [1, 2, 2, 2, 3, 4] {
                kind.remember(event(revision, 1), HistoryLimits::default());
            }
        }
        let revisions = |after, max| {
            let (events, processed) = cache
                .events_after("instances", after, max)
                .expect("within the history");
            let revs: Vec<i64> = events.iter().map(|e| e.revision).collect();
            (revs, processed)
        };
        // The batch of 2 reaches into revision 2, so it takes all of revision 2.
        assert_eq!(revisions(0, 2), (vec![1, 2, 2, 2], None));
        assert_eq!(revisions(2, 2), (vec![3, 4], Some(9)));
        assert_eq!(revisions(0, 100), (vec![1, 2, 2, 2, 3, 4], Some(9)));
        assert_eq!(revisions(4, 2), (vec![], Some(9)));
        // A batch of 0 still moves on.
        assert_eq!(revisions(3, 0), (vec![4], Some(9)));
    }

    #[test]
    fn a_change_counts_its_record_before_and_after() {
        let before =
            CachedObject::from_value("/k".into(), serde_json::json!({}), 1).with_stored_size(30);
        let mut change = Arc::try_unwrap(event(2, 10)).expect("only this reference");
        assert_eq!(change.cost(), 10);
        change.prev = Some(Arc::new(before));
        assert_eq!(change.cost(), 40);
    }

    #[test]
    fn the_history_forgets_the_oldest_changes_past_its_count_or_its_bytes() {
        let limits = |events, bytes| HistoryLimits { events, bytes };
        type Kept = (Vec<i64>, i64);
        let rows: Vec<(&str, Vec<usize>, HistoryLimits, Kept)> = vec![
            (
                "within both",
                vec![10, 10, 10],
                limits(3, 30),
                (vec![1, 2, 3], 0),
            ),
            (
                "past the count",
                vec![1, 1, 1, 1],
                limits(3, 1000),
                (vec![2, 3, 4], 1),
            ),
            (
                "past the bytes",
                vec![10, 10, 10],
                limits(100, 25),
                (vec![2, 3], 1),
            ),
            (
                "one large change pushes out many small ones",
                vec![1, 1, 1, 1, 100],
                limits(100, 102),
                (vec![3, 4, 5], 2),
            ),
            (
                "the newest change stays, however large",
                vec![10, 500],
                limits(100, 100),
                (vec![2], 1),
            ),
            (
                "unknown sizes count nothing",
                vec![0; 5],
                limits(100, 0),
                (vec![1, 2, 3, 4, 5], 0),
            ),
        ];
        for (what, sizes, limits, want) in rows {
            assert_eq!(kept(&sizes, limits), want, "{what}");
        }
    }
}
