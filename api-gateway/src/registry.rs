//! The registry: records with Kubernetes semantics on etcd. Every face of the gateway (the
//! resource API, EC2 and S3) reads and writes records only through here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{SecondsFormat, Utc};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::admission::{self, FieldValidation, NewRecord, Subresource};
use crate::auth::{self, Principal};
use crate::aws::credentials::{self, Sealer};
use crate::aws::lookups::{KeyLookups, DEFAULT_LOOKUPS_PER_SECOND};
use crate::cache::{set_resource_version, CacheEvent, CachedObject, HistoryLimits, WatchCache};
use crate::combined_creates::{CombinedCreates, Outcome};
use crate::error::{ApiError, ApiResult};
use crate::kinds::{Kind, Kinds};
use crate::metrics::Metrics;
use crate::point_reads::PointReads;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::ssa::Scope;
use crate::store::{self, id_key, namespace_prefix, record_key};

/// Events a watch takes from the cache's history at once (more when its last revision holds
/// more): a watcher that does not read holds at most these and [`WATCH_QUEUE`], not the whole
/// history as it was when it fell behind.
const WATCH_BATCH: usize = 64;
/// Events waiting for a watch's response to take them.
const WATCH_QUEUE: usize = 64;

/// How long a read waits for the watch cache to catch up with etcd before giving up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(3);

/// Options common to writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `dryRun=All`: run admission, store nothing.
    pub dry_run: bool,
    /// Unknown-field handling.
    pub field_validation: FieldValidation,
    /// The field manager a create or update is recorded under in `metadata.managedFields`
    /// (see [`crate::ssa::record_update`]); `None` leaves them as the change made them (a
    /// server-side apply records its own; the gateway's own bookkeeping records nothing).
    pub manager: Option<String>,
}

impl WriteOptions {
    /// Options for a write by one of Karri's own faces, recorded under `manager`.
    pub fn by(manager: &str) -> Self {
        WriteOptions {
            manager: Some(manager.to_string()),
            ..WriteOptions::default()
        }
    }
}

/// A write's result: the record and warnings for the client.
#[derive(Debug)]
pub struct Written {
    /// The record as stored (or as it would be, for a dry run).
    pub object: Value,
    /// `Warning` headers (unknown fields dropped).
    pub warnings: Vec<String>,
    /// Whether a new record was created.
    pub created: bool,
}

/// How dependents are treated when their owner is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// Delete dependents in the background (the default).
    #[default]
    Background,
    /// Delete the dependents first: the owner is marked with the `foregroundDeletion`
    /// finalizer and removed once no dependent blocking its deletion is left.
    Foreground,
    /// Keep dependents and remove their owner reference.
    Orphan,
}

/// Options of a delete.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// Store nothing.
    pub dry_run: bool,
    /// Only if the UID is this.
    pub uid: Option<String>,
    /// Only if the resourceVersion is this.
    pub resource_version: Option<i64>,
    /// Dependents policy.
    pub propagation: Propagation,
}

/// Options of a list.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
    /// Page size (0 = everything).
    pub limit: usize,
    /// Continue token from a previous page.
    pub continue_token: Option<String>,
    /// `resourceVersion` parameter.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch` parameter.
    pub resource_version_match: Option<String>,
}

/// A page of records.
#[derive(Debug)]
pub struct ListPage {
    /// The records, in key order.
    pub items: Vec<Arc<CachedObject>>,
    /// The revision the list is at.
    pub revision: i64,
    /// Token for the next page.
    pub continue_token: Option<String>,
}

/// One event of an API watch.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// A record appeared (or started matching the selectors).
    Added(Arc<CachedObject>),
    /// A record changed.
    Modified(Arc<CachedObject>),
    /// A record disappeared (or stopped matching).
    Deleted(Arc<CachedObject>),
    /// Progress: everything up to this revision was delivered.
    Bookmark {
        /// The revision.
        revision: i64,
        /// Marks the end of `sendInitialEvents`.
        initial_events_end: bool,
    },
    /// The watch ends with this error (410 Gone after compaction).
    Error(ApiError),
}

/// Options of a watch.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions2 {
    /// Resume after this revision; None or 0 = start with the current state as ADDED events.
    pub from: Option<i64>,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
    /// Send BOOKMARK events.
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: initial ADDED events end with a marked bookmark.
    pub send_initial_events: bool,
    /// End the watch after this long.
    pub timeout: Duration,
}

/// The registry.
pub struct Registry {
    etcd: Client,
    /// Single-key reads, coalesced under load.
    reads: PointReads,
    /// Creates, combined under load.
    creates: CombinedCreates,
    /// The watch cache.
    pub cache: Arc<WatchCache>,
    /// The served kinds.
    pub kinds: Kinds,
    metrics: Arc<Metrics>,
    bookmark_interval: Duration,
    sealer: Option<Arc<Sealer>>,
    /// The budget of etcd lookups of access key IDs the cache does not know.
    pub key_lookups: KeyLookups,
    /// Set when the gateway stops: every watch ends (between revisions), as kube-apiserver
    /// ends its watches on shutdown, so that clients resume elsewhere or later instead of
    /// having their streams reset when the drain period runs out.
    stopping: tokio::sync::watch::Sender<bool>,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn is_kind_key(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix)
}

/// Where a continue token resumes.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    /// The revision the list reads; [`AT_LATEST`] for the one an expired token's answer gives.
    rv: i64,
    start: String,
}

/// The revision of a continue token that goes on at the latest revision: what the 410 of an
/// expired token carries, as in Kubernetes (which marks it so too).
const AT_LATEST: i64 = -1;

fn encode_continue(rv: i64, start: &str) -> String {
    let t = ContinueToken {
        rv,
        start: start.to_string(),
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&t).unwrap_or_default())
}

fn decode_continue(token: &str, prefix: &str) -> ApiResult<ContinueToken> {
    let bad = || ApiError::bad_request("continue key is not valid: malformed token");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let t: ContinueToken = serde_json::from_slice(&raw).map_err(|_| bad())?;
    if !t.start.starts_with(prefix) || (t.rv <= 0 && t.rv != AT_LATEST) {
        return Err(bad());
    }
    Ok(t)
}

/// End of the key range of a prefix.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// How long a watch from a revision the cache has not reached waits for it before asking etcd
/// whether that revision exists at all.
const RV_CATCH_UP: Duration = Duration::from_millis(250);

/// Parse a resourceVersion parameter.
pub fn parse_rv(rv: &str) -> ApiResult<i64> {
    rv.parse::<i64>()
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| ApiError::bad_request(format!("invalid resource version {rv:?}")))
}

/// Turn a cache event into what one watcher sees, given its filter. An object that stops
/// matching the filter (or that the watcher may no longer see) is DELETED for that watcher
/// with its previous state, at the event's resourceVersion, as Kubernetes does: the new state
/// is not the watcher's to see.
pub fn view_event(ev: &CacheEvent, visible: &dyn Fn(&Value) -> bool) -> Option<WatchEvent> {
    let now_visible = !ev.deleted && visible(&ev.object.value);
    let was_visible = ev.prev.as_ref().filter(|p| visible(&p.value));
    match (was_visible, now_visible) {
        (None, true) => Some(WatchEvent::Added(ev.object.clone())),
        (Some(_), true) => Some(WatchEvent::Modified(ev.object.clone())),
        (Some(_), false) if ev.deleted => Some(WatchEvent::Deleted(ev.object.clone())),
        (Some(prev), false) => {
            let mut last = prev.value.clone();
            set_resource_version(&mut last, ev.revision);
            Some(WatchEvent::Deleted(Arc::new(CachedObject::from_value(
                prev.key.clone(),
                last,
                ev.revision,
            ))))
        }
        (None, false) => None,
    }
}

impl Registry {
    /// A registry over `etcd`; starts the watch cache and the garbage collector.
    /// `sealer` seals the secrets of new access keys; without one, creating an access key is
    /// refused.
    pub fn start(
        etcd: Client,
        kinds: Kinds,
        history: HistoryLimits,
        metrics: Arc<Metrics>,
        sealer: Option<Arc<Sealer>>,
    ) -> Arc<Self> {
        let plurals: Vec<&str> = kinds.all().iter().map(|k| k.info.plural).collect();
        let cache = WatchCache::new(&plurals, history);
        tokio::spawn(
            cache
                .clone()
                .run(etcd.clone(), metrics.cache_relists.clone()),
        );
        let registry = Arc::new(Registry {
            reads: PointReads::start(etcd.clone()),
            creates: CombinedCreates::start(etcd.clone()),
            etcd,
            cache,
            kinds,
            metrics,
            bookmark_interval: Duration::from_secs(5),
            sealer,
            key_lookups: KeyLookups::new(DEFAULT_LOOKUPS_PER_SECOND),
            stopping: tokio::sync::watch::Sender::new(false),
        });
        tokio::spawn(registry.clone().collect_garbage());
        registry
    }

    /// Ends every watch, now and from now on (the gateway is stopping): each ends its stream
    /// at the next revision boundary, which a client resumes from.
    pub fn end_watches(&self) {
        self.stopping.send_replace(true);
    }

    /// Whether a watch with `deadline` must end now (its time is up, or the gateway stops).
    fn watch_over(&self, deadline: tokio::time::Instant) -> bool {
        tokio::time::Instant::now() >= deadline || *self.stopping.borrow()
    }

    /// Resolves once a watch of `timeout` must end: its time is up or the gateway stops.
    pub async fn watch_ends(&self, timeout: Duration) {
        tokio::select! {
            () = tokio::time::sleep(timeout) => {}
            () = self.stopped() => {}
        }
    }

    /// Resolves once [`Registry::end_watches`] was called.
    async fn stopped(&self) {
        let mut stopping = self.stopping.subscribe();
        // An error means the sender is gone, which it never is while `self` lives.
        let _ = stopping.wait_for(|s| *s).await;
    }

    /// Counts a request refused because the budget of unknown-key lookups was spent.
    pub fn count_refused_key_lookup(&self) {
        self.metrics.key_lookups_refused.inc();
    }

    /// The etcd client, for the S3 object index (which lives beside the records).
    pub fn etcd_client(&self) -> Client {
        self.etcd.clone()
    }

    /// Whether the registry can serve: the cache has listed etcd.
    pub fn ready(&self) -> bool {
        self.cache.synced()
    }

    async fn etcd_get(
        &self,
        key: &str,
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        if opts.is_none() {
            return self.reads.get(key).await;
        }
        store::retry_unreached(|| {
            let mut kv = store::kv(&self.etcd);
            let opts = opts.clone();
            async move { kv.get(key, opts).await }
        })
        .await
    }

    async fn etcd_txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        store::retry_unreached(|| {
            let mut kv = store::kv(&self.etcd);
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// A Bucket's `spec.ownerId` from its owner's Account record (`spec.owner`): filled in when
    /// the manifest leaves it out (an account's ID is drawn at its creation, so a manifest
    /// cannot know it); refused when it names another account's ID, or leaves it out for an
    /// owner no account has. Checked when a bucket is made and when a write changes its owner, so
    /// that status writes and finalizer removals never depend on its account. Any other
    /// record as it is.
    async fn bind_bucket_owner(
        &self,
        kind: &Kind,
        current: Option<&Value>,
        mut body: Value,
    ) -> ApiResult<Value> {
        if kind.info.kind != "Bucket" {
            return Ok(body);
        }
        let text = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
        let owner_of = |v: &Value| (text(v, "/spec/owner"), text(v, "/spec/ownerId"));
        if current.is_some_and(|c| owner_of(c) == owner_of(&body)) {
            return Ok(body);
        }
        let Some(owner) = text(&body, "/spec/owner") else {
            return Ok(body);
        };
        let given = text(&body, "/spec/ownerId").filter(|id| !id.is_empty());
        // An account made a moment ago (the same `kubectl apply`) is known.
        self.catch_up().await?;
        let (accounts, _) = self.cache.list("accounts", &store::kind_prefix("accounts"));
        let known = accounts
            .iter()
            .find(|a| text(&a.value, "/metadata/name").as_deref() == Some(owner.as_str()))
            .and_then(|a| text(&a.value, "/status/accountId"));
        let name = admission::name_of(&body).to_string();
        let refused = |field: &str, why: String| {
            ApiError::invalid("Bucket", &name, vec![(field.to_string(), why)])
        };
        match (given, known) {
            (None, Some(id)) => body["spec"]["ownerId"] = Value::String(id),
            (Some(given), Some(id)) if given != id => {
                return Err(refused(
                    "spec.ownerId",
                    format!("Invalid value: {given:?}: account {owner:?} has account ID {id:?} (leave spec.ownerId out to have it filled in)"),
                ))
            }
            (None, None) => {
                return Err(refused(
                    "spec.owner",
                    format!("Not found: {owner:?}: no account has this name, whose ID spec.ownerId would be"),
                ))
            }
            // An ID given for an owner the cache does not know (yet) is taken as it is: S3
            // decides by the ID.
            (Some(_), _) => {}
        }
        Ok(body)
    }

    /// Binds an Image in S3 to what it was registered from: records the UID of its bucket
    /// ([`crds::image::BUCKET_UID_ANNOTATION`]), as the cache has it once it has every write
    /// before (a bucket made just before counts), and which stored bytes of the object it is
    /// ([`crds::image::OBJECT_CONTENT_ANNOTATION`]). Both are set when the image is made or its
    /// location changes, kept as they were by any other write, never as a writer puts them.
    /// An image in S3 whose bucket or object does not exist is refused (as EC2 refuses a
    /// manifest it cannot read): there would be nothing to boot, and an object uploaded later
    /// would become an image nobody registered.
    async fn bind_image_bucket(
        &self,
        kind: &Kind,
        who: &Principal,
        current: Option<&Value>,
        next: &mut Value,
    ) -> ApiResult<()> {
        const PINS: [&str; 2] = [
            crds::image::BUCKET_UID_ANNOTATION,
            crds::image::OBJECT_CONTENT_ANNOTATION,
        ];
        if kind.info.kind != "Image" {
            return Ok(());
        }
        let location = |v: &Value| {
            v.pointer("/spec/imageLocation")
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let wanted = location(next);
        let kept = current.filter(|cur| location(cur) == wanted);
        let pins: Vec<(&str, Option<Value>)> = match (kept, wanted.as_deref()) {
            (Some(cur), _) => PINS
                .iter()
                .map(|a| {
                    let v = cur
                        .pointer("/metadata/annotations")
                        .and_then(|m| m.get(*a))
                        .cloned();
                    (*a, v)
                })
                .collect(),
            (None, Some(location)) => match crds::image::s3_location(location) {
                Some((bucket, key)) => {
                    let (uid, content) = self.image_object(kind, who, next, bucket, key).await?;
                    vec![(PINS[0], Some(uid.into())), (PINS[1], Some(content.into()))]
                }
                None => PINS.iter().map(|a| (*a, None)).collect(),
            },
            (None, None) => PINS.iter().map(|a| (*a, None)).collect(),
        };
        let Some(meta) = next.get_mut("metadata").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Some(map) = annotations.as_object_mut() {
            for (annotation, value) in pins {
                match value {
                    Some(v) => map.insert(annotation.into(), v),
                    None => map.remove(annotation),
                };
            }
            if map.is_empty() {
                meta.remove("annotations");
            }
        }
        Ok(())
    }

    /// The UID of bucket `bucket` and the [content ID](crate::s3::index::ObjectMeta::content_id)
    /// of its object `key`, which image `image` is being registered from by `who`; 422 when
    /// either does not exist. An account must be able to read the object, and learns no more
    /// than S3 would tell it: an object it may not read, and one missing from a bucket it may
    /// not list, are refused alike.
    async fn image_object(
        &self,
        kind: &Kind,
        who: &Principal,
        image: &Value,
        bucket: &str,
        key: &str,
    ) -> ApiResult<(String, String)> {
        use crate::s3::access::{allowed, Action, Who};
        let refuse = |what: String| {
            let name = image
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            ApiError::invalid(
                kind.info.kind,
                name,
                vec![("spec.imageLocation".into(), what)],
            )
        };
        self.catch_up().await?;
        let Some(record) = self
            .cache
            .get("buckets", &record_key("buckets", None, bucket))
        else {
            return Err(refuse(format!(
                "Not found: the bucket {bucket:?} does not exist, so the image has no object to boot"
            )));
        };
        let uid = record.uid().unwrap_or_default().to_string();
        let bucket_spec = record
            .value
            .get("spec")
            .cloned()
            .and_then(|v| serde_json::from_value::<crds::BucketSpec>(v).ok());
        let resp = self
            .etcd_get(&crate::s3::index::object_key(bucket, key), None)
            .await?;
        let meta = crate::s3::index::object_of(&resp)
            .map_err(|e| ApiError::internal(format!("cannot read the object index: {e}")))?;
        // The account an account's user registers for, which must be able to read it.
        let reader = match who {
            Principal::Account { namespace, .. } => Some(self.account_id_of(namespace)),
            _ => None,
        };
        if let Some(reader) = reader {
            let may = |action, object_acl| match (reader.as_deref(), bucket_spec.as_ref()) {
                (Some(id), Some(b)) => {
                    allowed(Who::Account(id), action, &b.owner_id, b.acl, object_acl)
                }
                _ => false,
            };
            let readable = match &meta {
                Some(m) => may(Action::ReadObject, Some(m.acl)),
                None => may(Action::ListBucket, None),
            };
            if !readable {
                return Err(refuse(format!(
                    "Forbidden: your account may not read {key:?} in bucket {bucket:?}, or it does not exist"
                )));
            }
        }
        match meta {
            Some(meta) => Ok((uid, meta.content_id())),
            None => Err(refuse(format!(
                "Not found: no object {key:?} in bucket {bucket:?}: upload the image first"
            ))),
        }
    }

    /// The 12-digit ID of the account whose namespace is `namespace`, as the cache has it.
    pub fn account_id_of(&self, namespace: &str) -> Option<String> {
        let (accounts, _) = self.cache.list("accounts", &store::kind_prefix("accounts"));
        accounts.iter().find_map(|a| {
            (a.value.pointer("/status/namespace").and_then(Value::as_str) == Some(namespace))
                .then(|| a.value.pointer("/status/accountId").and_then(Value::as_str))
                .flatten()
                .map(str::to_string)
        })
    }

    /// Waits until the watch cache has seen every write committed before this call, so that
    /// reads from the cache that follow see them (read-your-writes across requests, as a
    /// consistent read of etcd would). The cache moves only on Karri's own events: when the
    /// latest revision is another program's write to a shared etcd, it waits
    /// [`CATCH_UP_TIMEOUT`] and reads what it has.
    pub async fn catch_up(&self) -> ApiResult<()> {
        let revision = self.current_revision().await?;
        if !self.cache.wait_for(revision, CATCH_UP_TIMEOUT).await {
            tracing::warn!(
                revision,
                cache = self.cache.revision(),
                "the watch cache did not reach etcd's revision; reading what it has"
            );
        }
        Ok(())
    }

    /// etcd's current revision (one round trip).
    pub async fn current_revision(&self) -> ApiResult<i64> {
        let resp = self.etcd_get("/karri/revision", None).await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn read(&self, key: &str) -> ApiResult<Option<(Value, i64)>> {
        let resp = self.etcd_get(key, None).await?;
        let Some(kvp) = resp.kvs().first() else {
            return Ok(None);
        };
        let mut v: Value = serde_json::from_slice(kvp.value())
            .map_err(|e| ApiError::internal(format!("record {key} is not valid JSON: {e}")))?;
        set_resource_version(&mut v, kvp.mod_revision());
        Ok(Some((v, kvp.mod_revision())))
    }

    /// Read one record (a consistent read from etcd).
    pub async fn get(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        who: &Principal,
    ) -> ApiResult<Value> {
        let key = record_key(kind.info.plural, ns, name);
        match self.read(&key).await? {
            Some((v, _)) if auth::can_see(who, kind.info.kind, &v) => Ok(v),
            // A record the caller may not see is not there for it: a 403 would tell a node
            // token which names exist on other nodes.
            _ => Err(ApiError::not_found(kind.info.plural, name)),
        }
    }

    /// Find a record by its EC2-style ID, in O(1) through the ID index.
    pub async fn find_by_id(&self, id: &str) -> ApiResult<Option<Value>> {
        self.find_by_index(&id_key(id)).await
    }

    /// Find a record by its EC2-style ID through the watch cache, falling back to etcd when the
    /// cache has not seen it (a record created a moment ago elsewhere). Cheaper than
    /// [`Registry::find_by_id`]; may briefly return a record just deleted.
    pub async fn lookup_id(&self, id: &str) -> ApiResult<Option<Value>> {
        if let Some(found) = self.cache.by_id(id) {
            return Ok(Some(found.value.clone()));
        }
        self.find_by_id(id).await
    }

    /// Find the record an index entry (ID or unique key) points to.
    pub async fn find_by_index(&self, index_key: &str) -> ApiResult<Option<Value>> {
        let resp = self.etcd_get(index_key, None).await?;
        let Some(idx) = resp.kvs().first() else {
            return Ok(None);
        };
        let key = String::from_utf8_lossy(idx.value()).to_string();
        Ok(self.read(&key).await?.map(|(v, _)| v))
    }

    /// Read one record by its etcd key (a consistent read), without authorization checks.
    pub async fn read_key(&self, key: &str) -> ApiResult<Option<Value>> {
        Ok(self.read(key).await?.map(|(v, _)| v))
    }

    /// [`Registry::read_key`] with the record's mod revision.
    pub async fn read_key_versioned(&self, key: &str) -> ApiResult<Option<(Value, i64)>> {
        self.read(key).await
    }

    /// Open an access key's sealed secret with the gateway's secrets key, for its `context`
    /// ([`credentials::access_key_context`]).
    pub fn open_secret(
        &self,
        sealed: &str,
        context: &str,
    ) -> Result<credentials::Opened, credentials::SealError> {
        match &self.sealer {
            Some(sealer) => sealer.open(sealed, context),
            None => Err(credentials::SealError::Open),
        }
    }

    /// Seals access key `name`'s secret `secret` again, bound to `context`: for a secret sealed
    /// before secrets were bound to their record. Only while the record still holds `legacy`.
    pub async fn reseal_access_key(
        &self,
        name: &str,
        legacy: &str,
        secret: &str,
        context: &str,
    ) -> ApiResult<()> {
        let sealer = self
            .sealer
            .as_ref()
            .ok_or_else(|| ApiError::unavailable("this gateway has no secrets key"))?;
        let kind = self
            .kinds
            .by_plural("accesskeys")
            .ok_or_else(|| ApiError::internal("access keys are not served"))?;
        let sealed = sealer
            .seal(secret, context)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.update_with(
            &kind,
            None,
            name,
            &Principal::Admin("system:secrets".into()),
            Subresource::Status,
            None,
            WriteOptions::by("karri-secrets"),
            &mut |current: &Value| {
                if current
                    .pointer("/status/sealedSecret")
                    .and_then(Value::as_str)
                    != Some(legacy)
                {
                    return Err(ApiError::conflict_message(format!(
                        "access key {name} changed while its secret was sealed again"
                    )));
                }
                let mut next = current.clone();
                next["status"]["sealedSecret"] = json!(sealed);
                Ok(next)
            },
        )
        .await
        .map(|_| ())
    }

    /// Whether the S3 index holds an object or multipart upload of bucket `name`.
    async fn bucket_holds_objects(&self, name: &str) -> ApiResult<bool> {
        for prefix in [
            crate::s3::index::objects_prefix(name),
            crate::s3::index::uploads_prefix(name),
        ] {
            let opts = GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_limit(1);
            if !self.etcd_get(&prefix, Some(opts)).await?.kvs().is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A secret derived from the gateway's secrets key for `label` (see [`Sealer::derive`]).
    pub fn derived_secret(&self, label: &str) -> Option<String> {
        self.sealer.as_ref().map(|s| s.derive(label))
    }

    /// Create a record through admission.
    pub async fn create(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        body: Value,
        who: &Principal,
        opts: WriteOptions,
    ) -> ApiResult<Written> {
        let mut written = self.create_all(kind, ns, vec![body], who, opts).await?;
        written
            .pop()
            .ok_or_else(|| ApiError::internal("a create wrote no record"))
    }

    /// Create several records of one kind in one etcd transaction: all of them or none (a
    /// RunInstances reservation). Each goes through admission; IDs, account IDs and access keys
    /// are allocated here, and every unique key is claimed in the same transaction.
    pub async fn create_all(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        bodies: Vec<Value>,
        who: &Principal,
        opts: WriteOptions,
    ) -> ApiResult<Vec<Written>> {
        let ns = ns.filter(|_| kind.info.namespaced);
        let account_uid = if kind.info.kind == "AccessKey" {
            Some(self.account_uid_for_keys(&bodies).await?)
        } else {
            None
        };
        'attempt: for _ in 0..5 {
            let mut prepared = Vec::with_capacity(bodies.len());
            for body in &bodies {
                let name = admission::name_of(body).to_string();
                let prefix = kind.info.id_prefix_of(body.get("spec"));
                let id = if crds::is_valid_id(prefix, &name) {
                    name.clone()
                } else {
                    admission::new_id(prefix)
                };
                let new = NewRecord {
                    now: now(),
                    uid: crate::admission::new_uuid().to_string(),
                    id: id.clone(),
                };
                let body = self.bind_bucket_owner(kind, None, body.clone()).await?;
                let (mut obj, warnings) =
                    admission::prepare_create(kind, ns, body, &new, opts.field_validation)?;
                self.bind_image_bucket(kind, who, None, &mut obj).await?;
                if let Some(manager) = &opts.manager {
                    crate::ssa::record_update(None, &mut obj, manager, Scope::Main, &new.now);
                }
                let secret = self.generate_system_fields(kind, &mut obj)?;
                if let Some(uid) = &account_uid {
                    obj["status"]["accountUid"] = Value::String(uid.clone());
                }
                if !auth::can_write(who, kind.info.kind, None, &obj) {
                    return Err(ApiError::forbidden(format!(
                        "User {:?} cannot create this {}",
                        who.user(),
                        kind.info.kind
                    )));
                }
                if let Some(why) = admission::nesting_problem(&obj) {
                    return Err(ApiError::invalid(
                        kind.info.kind,
                        admission::name_of(&obj),
                        vec![(String::new(), why)],
                    ));
                }
                if let Some(why) = auth::image_location_refusal(who, kind.info.kind, None, &obj) {
                    return Err(ApiError::forbidden(format!(
                        "User {:?} cannot create this {}: {why}",
                        who.user(),
                        kind.info.kind
                    )));
                }
                let name = admission::name_of(&obj).to_string();
                let key = record_key(kind.info.plural, ns, &name);
                let unique = admission::unique_keys(kind.info.kind, &obj);
                prepared.push((obj, warnings, secret, key, id, name, unique));
            }
            if opts.dry_run {
                // As kube-apiserver's dry run: a name that is taken is a conflict, not a success;
                // so is a unique value the caller chose (an image name, a client token).
                for (_, _, _, key, _, name, unique) in &prepared {
                    if self.etcd_get(key, None).await?.count() > 0 {
                        return Err(ApiError::already_exists(kind.info.plural, name));
                    }
                    for u in unique.iter().filter(|u| !u.generated) {
                        if self.etcd_get(&u.key, None).await?.count() > 0 {
                            return Err(ApiError::taken(kind.info.plural, name, &u.what));
                        }
                    }
                }
                return Ok(prepared
                    .into_iter()
                    .map(|(object, warnings, ..)| Written {
                        object,
                        warnings,
                        created: true,
                    })
                    .collect());
            }
            let mut entries = Vec::new();
            for (obj, _, _, key, id, _, unique) in &prepared {
                let raw = serde_json::to_vec(obj).map_err(|e| ApiError::internal(e.to_string()))?;
                entries.push((key.clone(), raw));
                entries.push((id_key(id), key.clone().into_bytes()));
                for u in unique {
                    entries.push((u.key.clone(), key.clone().into_bytes()));
                }
            }
            if let Outcome::Committed(rev) = self.creates.create(entries).await? {
                self.metrics.writes.inc();
                return Ok(prepared
                    .into_iter()
                    .map(|(mut object, warnings, secret, ..)| {
                        set_resource_version(&mut object, rev);
                        if let Some(secret) = secret {
                            object["status"]["secretAccessKey"] = Value::String(secret);
                        }
                        Written {
                            object,
                            warnings,
                            created: true,
                        }
                    })
                    .collect());
            }
            // Find what was taken: a name or a unique value the caller chose is a conflict; a
            // random ID or generated value that collided is drawn again.
            for (_, _, _, key, id, name, unique) in &prepared {
                if self.etcd_get(key, None).await?.count() > 0 {
                    return Err(ApiError::already_exists(kind.info.plural, name));
                }
                if self.etcd_get(&id_key(id), None).await?.count() > 0 {
                    if id == name {
                        return Err(ApiError::already_exists(kind.info.plural, name));
                    }
                    continue 'attempt;
                }
                for u in unique {
                    if self.etcd_get(&u.key, None).await?.count() > 0 {
                        if u.generated {
                            continue 'attempt;
                        }
                        return Err(ApiError::taken(kind.info.plural, name, &u.what));
                    }
                }
            }
            // Two records of this batch claimed the same value.
            return Err(ApiError::bad_request(format!(
                "the {} of one request must not repeat a name or unique value",
                kind.info.plural
            )));
        }
        Err(ApiError::internal("could not allocate a unique ID"))
    }

    /// The UID of the one existing Account the access keys of a create name; an access key for
    /// an account that does not exist is refused.
    async fn account_uid_for_keys(&self, bodies: &[Value]) -> ApiResult<String> {
        let mut uid: Option<String> = None;
        for body in bodies {
            let name = body
                .pointer("/spec/accountName")
                .and_then(Value::as_str)
                .unwrap_or("");
            let found = self
                .read(&record_key("accounts", None, name))
                .await?
                .and_then(|(a, _)| {
                    a.pointer("/metadata/uid")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                });
            let Some(found) = found else {
                return Err(ApiError::invalid(
                    "AccessKey",
                    admission::name_of(body),
                    vec![(
                        "spec.accountName".into(),
                        format!("there is no account {name:?}"),
                    )],
                ));
            };
            if uid.as_ref().is_some_and(|u| *u != found) {
                return Err(ApiError::bad_request(
                    "the access keys of one request must be for one account",
                ));
            }
            uid = Some(found);
        }
        uid.ok_or_else(|| ApiError::bad_request("no access key to create"))
    }

    /// Fill what the gateway generates at creation: an account's 12-digit ID and namespace, an
    /// access key's ID and sealed secret. Returns the plain secret of a new access key, which
    /// only the create response carries.
    fn generate_system_fields(&self, kind: &Kind, obj: &mut Value) -> ApiResult<Option<String>> {
        match kind.info.kind {
            "Account" => {
                let name = admission::name_of(obj).to_string();
                if let Some(problem) = admission::account_name_problem(&name) {
                    return Err(ApiError::invalid(
                        "Account",
                        &name,
                        vec![("metadata.name".into(), problem)],
                    ));
                }
                obj["status"] = json!({
                    "accountId": credentials::new_account_id(),
                    "namespace": name,
                });
                Ok(None)
            }
            "AccessKey" => {
                let sealer = self.sealer.as_ref().ok_or_else(|| {
                    ApiError::unavailable(
                        "this gateway has no secrets key to seal access keys with",
                    )
                })?;
                let secret = credentials::new_secret_access_key();
                let id = credentials::new_access_key_id();
                let account = obj
                    .pointer("/spec/accountName")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let sealed = sealer
                    .seal(&secret, &credentials::access_key_context(&id, account))
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                obj["status"] = json!({
                    "accessKeyId": id,
                    "sealedSecret": sealed,
                });
                Ok(Some(secret))
            }
            _ => Ok(None),
        }
    }

    /// Read-modify-write with compare-and-swap: `change` gets the current record and returns
    /// the desired one; retried on a concurrent write unless `precondition` pins a version.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_with(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        who: &Principal,
        sub: Subresource,
        precondition: Option<i64>,
        opts: WriteOptions,
        change: &mut (dyn FnMut(&Value) -> ApiResult<Value> + Send),
    ) -> ApiResult<Written> {
        let status = sub == Subresource::Status;
        if status && !auth::may_write(who, kind.info.kind, true) {
            // Status is what Karri observed (placement, addresses, state): tenants read it only.
            return Err(ApiError::forbidden(format!(
                "{}.{}/status {name:?} is forbidden: User {:?} may not write status, which Karri's controllers own",
                kind.info.plural,
                crds::GROUP,
                who.user()
            )));
        }
        let node_instance = matches!(who, Principal::Node(_)) && kind.info.kind == "Instance";
        if node_instance && !status && !auth::may_write(who, kind.info.kind, false) {
            // A node reports; it never changes what an instance is (spec, labels, owners,
            // finalizers).
            return Err(ApiError::forbidden(format!(
                "{}.{} {name:?} is forbidden: User {:?} may write only the status of the instances bound to it",
                kind.info.plural,
                crds::GROUP,
                who.user()
            )));
        }
        if matches!(who, Principal::Node(_))
            && !status
            && !auth::may_write(who, kind.info.kind, false)
        {
            // A host reports its facts; its zone, cordon and instance cap are the
            // administrators' (a compromised host must not uncordon itself or change zones).
            return Err(ApiError::forbidden(format!(
                "{}.{} {name:?} is forbidden: User {:?} may write only the status of its Node record; administrators set its spec",
                kind.info.plural,
                crds::GROUP,
                who.user()
            )));
        }
        let key = record_key(kind.info.plural, ns, name);
        for _ in 0..16 {
            let Some((current, rev)) = self
                .read(&key)
                .await?
                .filter(|(current, _)| auth::can_see(who, kind.info.kind, current))
            else {
                // Missing, or not the caller's to see: the same answer either way.
                return Err(ApiError::not_found(kind.info.plural, name));
            };
            if precondition.is_some_and(|p| p != rev) {
                return Err(ApiError::conflict(kind.info.plural, name));
            }
            let desired = self
                .bind_bucket_owner(kind, Some(&current), change(&current)?)
                .await?;
            let (mut next, warnings) =
                admission::prepare_update(kind, &current, desired, sub, opts.field_validation)?;
            self.bind_image_bucket(kind, who, Some(&current), &mut next)
                .await?;
            if let Some(manager) = &opts.manager {
                let scope = match sub {
                    Subresource::Main => Scope::Main,
                    Subresource::Status => Scope::Status,
                };
                crate::ssa::record_update(Some(&current), &mut next, manager, scope, &now());
            }
            if matches!(who, Principal::Account { .. })
                && kind.info.kind == "Instance"
                && admission::finalizers(&current).contains(&crds::INSTANCE_FINALIZER)
                && !admission::finalizers(&next).contains(&crds::INSTANCE_FINALIZER)
            {
                // Without it the record (its ID, its address) would go while its domain runs.
                return Err(ApiError::forbidden(format!(
                    "{}.{} {name:?} is forbidden: User {:?} may not remove the finalizer {}, which Karri's operator removes once the domain is gone; delete or terminate the instance instead",
                    kind.info.plural,
                    crds::GROUP,
                    who.user(),
                    crds::INSTANCE_FINALIZER
                )));
            }
            if node_instance && !auth::node_status_change_allowed(&current, &next) {
                return Err(ApiError::forbidden(format!(
                    "{}.{}/status {name:?} is forbidden: User {:?} may report only {} and the {} condition",
                    kind.info.plural,
                    crds::GROUP,
                    who.user(),
                    auth::NODE_STATUS_FIELDS.join(", "),
                    crds::CONDITION_DOMAIN_RUNNING
                )));
            }
            if !auth::can_write(who, kind.info.kind, Some(&current), &next) {
                return Err(ApiError::forbidden(format!(
                    "{}.{} {name:?} is forbidden: User {:?} may not bind it elsewhere",
                    kind.info.plural,
                    crds::GROUP,
                    who.user()
                )));
            }
            if let Some(why) =
                auth::image_location_refusal(who, kind.info.kind, Some(&current), &next)
            {
                return Err(ApiError::forbidden(format!(
                    "{}.{} {name:?} is forbidden: {why}",
                    kind.info.plural,
                    crds::GROUP
                )));
            }
            if let Some(why) = admission::nesting_problem(&next) {
                return Err(ApiError::invalid(
                    kind.info.kind,
                    name,
                    vec![(String::new(), why)],
                ));
            }
            // A check that reads other instances (the room a type holds, a node's room for a
            // resize) reads the cache once it has every write committed before it, and the
            // write is fenced on what it read: it fails, and is tried again, if an instance
            // changed since (a placement or a launch of the same moment).
            let fence = if crate::capacity::reads_instances(kind.info.kind, &current, &next) {
                self.catch_up().await?;
                Some(self.cache.revision())
            } else {
                None
            };
            let fence_compare = fence.map(instances_unchanged_since);
            let refusal = match kind.info.kind {
                "Instance" => crate::capacity::resize_refusal(&self.cache, &current, &next),
                "InstanceType" => {
                    crate::capacity::type_change_refusal(&self.cache, &current, &next)
                }
                _ => None,
            };
            if let Some(refusal) = refusal {
                return Err(refusal);
            }
            // Only once every check passed: the dependents are orphaned for a change that is made.
            if admission::only_orphan_finalizer_left(&next) && !opts.dry_run {
                // The last other finalizer went: orphan the dependents, then let the record go.
                if let Some(uid) = current.pointer("/metadata/uid").and_then(Value::as_str) {
                    self.orphan_dependents(uid).await?;
                }
                next = admission::with_finalizer(&next, admission::ORPHAN_FINALIZER, false);
            }
            let unchanged = admission::comparable(&next) == admission::comparable(&current)
                && next.pointer("/metadata/managedFields")
                    == current.pointer("/metadata/managedFields");
            if unchanged {
                return Ok(Written {
                    object: current,
                    warnings,
                    created: false,
                });
            }
            if opts.dry_run {
                set_resource_version(&mut next, rev);
                return Ok(Written {
                    object: next,
                    warnings,
                    created: false,
                });
            }
            let cmp = Compare::mod_revision(key.clone(), CompareOp::Equal, rev);
            // Unique keys the change claims (a status write of an address) or gives up.
            let held = admission::unique_keys(kind.info.kind, &current);
            let wanted = admission::unique_keys(kind.info.kind, &next);
            let claimed: Vec<&admission::UniqueKey> = wanted
                .iter()
                .filter(|u| !held.iter().any(|h| h.key == u.key))
                .collect();
            let txn = if admission::ready_to_delete(&next) {
                // A bucket's deletion marker keeps objects out from its mark to its removal;
                // this looks once more, for one marked without it (before it was kept).
                if kind.info.plural == "buckets" && self.bucket_holds_objects(name).await? {
                    return Err(ApiError::conflict_message(format!(
                        "bucket {name} is not empty: its objects would be left without a bucket"
                    )));
                }
                // An instance type deleted while a finalizer held it may have been launched
                // since: it stays until no instance holds room by it.
                if kind.info.plural == "instancetypes" {
                    if let Some(refusal) = crate::capacity::type_delete_refusal(&self.cache, name) {
                        return Err(refusal);
                    }
                }
                Txn::new()
                    .when(
                        [Some(cmp), fence_compare.clone()]
                            .into_iter()
                            .flatten()
                            .collect::<Vec<_>>(),
                    )
                    .and_then(removal_ops(kind, &key, &current))
            } else {
                let raw =
                    serde_json::to_vec(&next).map_err(|e| ApiError::internal(e.to_string()))?;
                let mut compares = vec![cmp];
                compares.extend(fence_compare.clone());
                let mut ops = vec![TxnOp::put(key.clone(), raw, None)];
                for u in &claimed {
                    compares.push(Compare::create_revision(u.key.clone(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(u.key.clone(), key.clone(), None));
                }
                for h in held
                    .iter()
                    .filter(|h| !wanted.iter().any(|u| u.key == h.key))
                {
                    ops.push(TxnOp::delete(h.key.clone(), None));
                }
                Txn::new().when(compares).and_then(ops)
            };
            let resp = self.etcd_txn(txn).await?;
            if resp.succeeded() {
                self.metrics.writes.inc();
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                set_resource_version(&mut next, rev);
                return Ok(Written {
                    object: next,
                    warnings,
                    created: false,
                });
            }
            for u in &claimed {
                // Taken by another record; one this record holds by a concurrent write of it
                // is seen as held on the next try.
                let holder = self.etcd_get(&u.key, None).await?;
                if holder
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.value() != key.as_bytes())
                {
                    return Err(ApiError::conflict_message(format!(
                        "{}.{} {name:?} cannot be updated: {} is already taken",
                        kind.info.plural,
                        crds::GROUP,
                        u.what
                    )));
                }
            }
            let moved = fence.is_some()
                && self
                    .etcd_get(&key, None)
                    .await?
                    .kvs()
                    .first()
                    .is_none_or(|kv| kv.mod_revision() != rev);
            if precondition.is_some() && (fence.is_none() || moved) {
                return Err(ApiError::conflict(kind.info.plural, name));
            }
            self.metrics.conflict_retries.inc();
        }
        Err(ApiError::conflict(kind.info.plural, name))
    }

    /// Delete a record: marked while finalizers hold it (or, in the foreground, its
    /// dependents), removed (with its ID index) otherwise.
    /// A bucket is deleted under S3's deletion marker, as DeleteBucket deletes it: no object
    /// can be added between the check that it is empty and the removal of its record.
    pub async fn delete(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        who: &Principal,
        opts: &DeleteOptions,
    ) -> ApiResult<Value> {
        // Boxed, as every call below: a delete's future is large (tens of KiB), and it would
        // otherwise make the future of every request that may delete as large, moved (copied)
        // through each layer of the HTTP stack on every request, creates included.
        Ok(Box::pin(self.delete_reporting(kind, ns, name, who, opts))
            .await?
            .0)
    }

    /// [`Registry::delete`], saying also whether the record is gone (removed, or for a dry run
    /// would be) rather than marked while finalizers or dependents hold it.
    pub async fn delete_reporting(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        who: &Principal,
        opts: &DeleteOptions,
    ) -> ApiResult<(Value, bool)> {
        if kind.info.plural != "buckets" {
            return Box::pin(self.delete_record(kind, ns, name, who, opts)).await;
        }
        let marker = match self.mark_bucket(name).await {
            Ok(marker) => Some(marker),
            // A bucket marked for deletion keeps its marker until it goes: deleting it again
            // changes at most its finalizers, and no object can be added meanwhile anyway.
            Err(e) if e.code == 409 && self.bucket_marked_deleted(name).await? => None,
            Err(e) => return Err(e),
        };
        let result = Box::pin(self.delete_record(kind, ns, name, who, opts)).await;
        if let Some(marker) = marker {
            unmark_bucket(marker, name).await;
        }
        result
    }

    /// Whether bucket `name`'s record is marked for deletion (a consistent read).
    async fn bucket_marked_deleted(&self, name: &str) -> ApiResult<bool> {
        Ok(self
            .read(&record_key("buckets", None, name))
            .await?
            .is_some_and(|(v, _)| v.pointer("/metadata/deletionTimestamp").is_some()))
    }

    /// Takes bucket `name`'s deletion marker: no object can be added while it is held.
    async fn mark_bucket(&self, name: &str) -> ApiResult<BucketMarker> {
        let index = crate::s3::index::ObjectIndex::new(self.etcd_client());
        let lease = index.mark_deleting(name).await.map_err(|e| match e {
            crate::s3::index::IndexError::BucketBusy => ApiError::conflict_message(format!(
                "bucket {name} is being deleted or emptied by another request; try again"
            )),
            other => ApiError::unavailable(other.to_string()),
        })?;
        Ok((index, lease))
    }

    /// [`Registry::delete`] without taking a bucket's deletion marker: for a caller that holds
    /// it already (S3's DeleteBucket).
    pub async fn delete_record(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        who: &Principal,
        opts: &DeleteOptions,
    ) -> ApiResult<(Value, bool)> {
        let key = record_key(kind.info.plural, ns, name);
        if kind.info.plural == "buckets" && self.bucket_holds_objects(name).await? {
            // As S3's DeleteBucket: the objects would be left without a bucket.
            return Err(ApiError::conflict_message(format!(
                "bucket {name} is not empty: delete its objects and multipart uploads first (aws s3 rm s3://{name} --recursive)"
            )));
        }
        // The record as this call last saw it, once it orphaned its dependents: if the record
        // is gone when the call tries again (the garbage collector removed it, having seen no
        // dependent left), it is gone as asked.
        let mut orphaned: Option<Value> = None;
        for _ in 0..16 {
            let Some((current, rev)) = self
                .read(&key)
                .await?
                .filter(|(current, _)| auth::can_see(who, kind.info.kind, current))
            else {
                return match orphaned {
                    Some(last) => Ok((last, true)),
                    None => Err(ApiError::not_found(kind.info.plural, name)),
                };
            };
            let uid = current
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if let Some(asked) = opts.uid.as_ref().filter(|u| **u != uid) {
                return Err(ApiError::precondition_failed(
                    kind.info.plural,
                    name,
                    "UID",
                    asked,
                    &uid,
                ));
            }
            if let Some(asked) = opts.resource_version.filter(|r| *r != rev) {
                return Err(ApiError::precondition_failed(
                    kind.info.plural,
                    name,
                    "ResourceVersion",
                    &asked.to_string(),
                    &rev.to_string(),
                ));
            }
            if *who != collector() {
                if let Some(refusal) = admission::delete_refusal(kind.info.kind, &current, who) {
                    return Err(refusal);
                }
            }
            // A type already being deleted is deleted again as Kubernetes does it (its last
            // finalizer is where the in-use check waits for it).
            // Read once the cache has every write before it; a removal at once is fenced on it
            // (as in `update_with`).
            let mut fence = None;
            if kind.info.plural == "instancetypes"
                && current.pointer("/metadata/deletionTimestamp").is_none()
            {
                self.catch_up().await?;
                fence = Some(self.cache.revision());
                if let Some(refusal) = crate::capacity::type_delete_refusal(&self.cache, name) {
                    return Err(refusal);
                }
            }
            let finalizers = admission::finalizers(&current);
            let foreground = opts.propagation == Propagation::Foreground;
            if !finalizers.is_empty() || foreground {
                // With other finalizers holding it, an orphaning delete is remembered as the
                // orphan finalizer, acted on when the others are gone (see `update_with`). A
                // foreground delete always waits, on its own finalizer, for the garbage
                // collector to delete the dependents (see `collect_foreground`).
                let add_orphan = opts.propagation == Propagation::Orphan
                    && !finalizers.contains(&admission::ORPHAN_FINALIZER);
                let add_foreground =
                    foreground && !finalizers.contains(&admission::FOREGROUND_FINALIZER);
                if current.pointer("/metadata/deletionTimestamp").is_some()
                    && !add_orphan
                    && !add_foreground
                {
                    return Ok((current, false));
                }
                let mut marked = admission::mark_deleted(&current, &now());
                // The policy asked last is the one carried out, as in Kubernetes: the other
                // garbage-collection finalizer goes.
                if add_orphan {
                    marked =
                        admission::with_finalizer(&marked, admission::FOREGROUND_FINALIZER, false);
                    marked = admission::with_finalizer(&marked, admission::ORPHAN_FINALIZER, true);
                }
                if add_foreground {
                    marked = admission::with_finalizer(&marked, admission::ORPHAN_FINALIZER, false);
                    marked =
                        admission::with_finalizer(&marked, admission::FOREGROUND_FINALIZER, true);
                }
                if admission::only_orphan_finalizer_left(&marked) {
                    // An orphaning delete replaced a foreground one on a record nothing else
                    // holds: carried out now, as without finalizers.
                    if opts.dry_run {
                        return Ok((current, true));
                    }
                    self.orphan_dependents(&uid).await?;
                    let txn = Txn::new()
                        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                        .and_then(removal_ops(kind, &key, &current));
                    if self.etcd_txn(txn).await?.succeeded() {
                        self.metrics.writes.inc();
                        return Ok((current, true));
                    }
                    orphaned = Some(current);
                    continue;
                }
                if opts.dry_run {
                    set_resource_version(&mut marked, rev);
                    return Ok((marked, false));
                }
                let raw =
                    serde_json::to_vec(&marked).map_err(|e| ApiError::internal(e.to_string()))?;
                let mut compares = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)];
                let mut ops = vec![TxnOp::put(key.clone(), raw, None)];
                if kind.info.plural == "buckets" {
                    // The caller's deletion marker (see `delete`), still held, stays off its
                    // lease until the record goes (`removal_ops`): no object is added to a
                    // bucket being deleted, so it is still empty when its last finalizer goes.
                    let marker = crate::s3::index::deleting_key(name);
                    compares.push(Compare::version(marker.clone(), CompareOp::Greater, 0));
                    ops.push(TxnOp::put(marker, "", None));
                }
                let txn = Txn::new().when(compares).and_then(ops);
                let resp = self.etcd_txn(txn).await?;
                if resp.succeeded() {
                    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                    set_resource_version(&mut marked, rev);
                    return Ok((marked, false));
                }
                continue;
            }
            if opts.dry_run {
                return Ok((current, true));
            }
            if opts.propagation == Propagation::Orphan {
                self.orphan_dependents(&uid).await?;
            }
            let mut compares = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)];
            compares.extend(fence.map(instances_unchanged_since));
            let txn = Txn::new()
                .when(compares)
                .and_then(removal_ops(kind, &key, &current));
            let resp = self.etcd_txn(txn).await?;
            if resp.succeeded() {
                self.metrics.writes.inc();
                return Ok((current, true));
            }
        }
        Err(ApiError::conflict(kind.info.plural, name))
    }

    fn scope_prefix(kind: &Kind, ns: Option<&str>) -> String {
        match ns {
            Some(ns) if kind.info.namespaced => namespace_prefix(kind.info.plural, ns),
            _ => store::kind_prefix(kind.info.plural),
        }
    }

    /// List records: from the watch cache when no page size is asked (after it caught up
    /// with etcd), from etcd at one revision page by page otherwise.
    pub async fn list(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        who: &Principal,
        opts: &ListOptions,
    ) -> ApiResult<ListPage> {
        let prefix = Self::scope_prefix(kind, ns);
        let visible = |v: &Value| {
            opts.labels.matches(v)
                && opts.fields.matches(v)
                && auth::can_see(who, kind.info.kind, v)
        };
        let rv = opts.resource_version.as_deref().filter(|s| !s.is_empty());
        let exact = opts.resource_version_match.as_deref() == Some("Exact");
        if let Some(m) = opts.resource_version_match.as_deref() {
            if !matches!(m, "Exact" | "NotOlderThan") {
                return Err(ApiError::bad_request(format!(
                    "resourceVersionMatch must be Exact or NotOlderThan, not {m:?}"
                )));
            }
            if rv.is_none() {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            // "0" means "any version": there is no exact one to read (422, as Kubernetes).
            if exact && rv == Some("0") {
                return Err(ApiError::invalid_options(
                    "ListOptions",
                    "resourceVersionMatch",
                    "FieldValueForbidden",
                    "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
        }
        // As the Kubernetes API server: a continue token carries its own revision.
        if opts.continue_token.is_some() {
            if opts.resource_version_match.is_some() {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
            if rv.is_some_and(|r| r != "0") {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
        }
        let paged = opts.continue_token.is_some() || (opts.limit > 0 && rv != Some("0"));
        if !paged && !exact {
            let target = match rv {
                Some("0") => 0,
                Some(r) => parse_rv(r)?,
                None => self.current_revision().await?,
            };
            if self.cache.wait_for(target, Duration::from_secs(3)).await {
                let (items, revision) = self.cache.list(kind.info.plural, &prefix);
                self.metrics.cache_lists.inc();
                return Ok(ListPage {
                    items: items.into_iter().filter(|o| visible(&o.value)).collect(),
                    revision,
                    continue_token: None,
                });
            }
            if rv.is_some() && target > self.current_revision().await? {
                return Err(ApiError::resource_version_too_large(format!(
                    "Too large resource version: {target}, the server has not seen it yet"
                )));
            }
        }
        // Paged or exact: read etcd at one revision.
        // Where the request's own token resumes: an expired one goes on from there.
        let mut resumes_at = None;
        let (mut revision, mut start) = match &opts.continue_token {
            Some(t) => {
                let t = decode_continue(t, &prefix)?;
                resumes_at = Some(t.start.clone());
                (t.rv.max(0), t.start)
            }
            None => {
                // A first page of a given version without resourceVersionMatch is read at
                // exactly that version, as kube-apiserver reads it (410 once compacted).
                let exact_read = exact || (opts.resource_version_match.is_none() && opts.limit > 0);
                let r = match rv {
                    Some(r) if exact_read => parse_rv(r)?,
                    _ => 0,
                };
                (r, prefix.clone())
            }
        };
        let end = prefix_end(&prefix);
        let mut items = Vec::new();
        loop {
            let want = if opts.limit > 0 {
                opts.limit - items.len()
            } else {
                1000
            };
            let mut go = GetOptions::new()
                .with_range(end.clone())
                .with_limit(i64::try_from(want).unwrap_or(1000));
            if revision > 0 {
                go = go.with_revision(revision);
            }
            let resp = match self
                .etcd_get(&start, Some(go))
                .await
                .map_err(ApiError::from)
            {
                // The revision a continue token holds is compacted away: what this request
                // read so far is dropped, so the new token resumes where the old one did.
                Err(e) if e.code == 410 && resumes_at.is_some() => {
                    let from = resumes_at.as_deref().unwrap_or(&start);
                    return Err(ApiError::continue_expired(encode_continue(AT_LATEST, from)));
                }
                other => other?,
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let kvs = resp.kvs();
            let mut last_key = None;
            for kvp in kvs {
                let Ok(k) = kvp.key_str() else { continue };
                last_key = Some(k.to_string());
                if let Some(obj) =
                    CachedObject::from_stored(k.to_string(), kvp.value(), kvp.mod_revision())
                {
                    if visible(&obj.value) {
                        items.push(Arc::new(obj));
                    }
                }
            }
            let more = resp.more();
            match last_key {
                Some(k) if more => start = format!("{k}\0"),
                _ => {
                    return Ok(ListPage {
                        items,
                        revision,
                        continue_token: None,
                    })
                }
            }
            if opts.limit > 0 && items.len() >= opts.limit {
                return Ok(ListPage {
                    items,
                    revision,
                    continue_token: Some(encode_continue(revision, &start)),
                });
            }
        }
    }

    /// Watch one kind: events after `from`, from the cache; from etcd directly when `from` is
    /// older than the cache remembers (which answers 410 Gone once compacted).
    pub fn watch(
        self: &Arc<Self>,
        kind: Arc<Kind>,
        ns: Option<String>,
        who: Principal,
        opts: WatchOptions2,
    ) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let this = self.clone();
        self.metrics.watchers.inc();
        tokio::spawn(async move {
            // A timeout past what the clock can count runs for a year instead.
            let now = tokio::time::Instant::now();
            let deadline = now
                .checked_add(opts.timeout)
                .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
            this.clone()
                .run_watch(kind, ns, who, opts, deadline, tx)
                .await;
            this.metrics.watchers.dec();
        });
        rx
    }

    /// Sends the events of one watch until `deadline`, which it checks only between
    /// revisions: records written in one transaction share a revision, and a client resumes
    /// from the last resourceVersion it saw, so a watch cut inside a revision would make it
    /// miss the rest of that revision for good. (The initial ADDED events are sent whole.)
    async fn run_watch(
        self: Arc<Self>,
        kind: Arc<Kind>,
        ns: Option<String>,
        who: Principal,
        opts: WatchOptions2,
        deadline: tokio::time::Instant,
        tx: mpsc::Sender<WatchEvent>,
    ) {
        let prefix = Self::scope_prefix(&kind, ns.as_deref());
        let kind_name = kind.info.kind;
        let visible = |v: &Value| {
            opts.labels.matches(v) && opts.fields.matches(v) && auth::can_see(&who, kind_name, v)
        };
        let mut rev_rx = self.cache.subscribe();
        let mut start = match opts.from {
            Some(r) if r > 0 => {
                // A revision etcd has not reached (a typo, another cluster's, an etcd restored
                // from a backup) would silently skip every change up to it.
                // Usually the cache is just behind a write the client saw; etcd is asked only
                // when it does not catch up, and an etcd it cannot reach refuses nothing.
                if r > self.cache.revision() && !self.cache.wait_for(r, RV_CATCH_UP).await {
                    if let Ok(current) = self.current_revision().await {
                        if r > current {
                            let too_large = ApiError::resource_version_too_large(format!(
                                "Too large resource version: {r}, current: {current}"
                            ));
                            let _ = tx.send(WatchEvent::Error(too_large)).await;
                            return;
                        }
                    }
                }
                r
            }
            _ => {
                // The current state, as a consistent read gives it: a write the client just
                // made is among the first events, not an ADDED after the initial-events-end
                // bookmark. An etcd that cannot be reached leaves the cache's state.
                let target = match opts.from {
                    None => self.current_revision().await.unwrap_or(1).max(1),
                    Some(_) => 1,
                };
                let ready = tokio::select! {
                    ready = self.cache.wait_for(target, Duration::from_secs(30)) => ready,
                    // The gateway stops: the watch ends before it began.
                    _ = self.stopped() => return,
                };
                if !ready {
                    let _ = tx
                        .send(WatchEvent::Error(ApiError::timeout(
                            "the watch cache is not ready",
                        )))
                        .await;
                    return;
                }
                let (items, rev) = self.cache.list(kind.info.plural, &prefix);
                for o in items.into_iter().filter(|o| visible(&o.value)) {
                    if tx.send(WatchEvent::Added(o)).await.is_err() {
                        return;
                    }
                }
                if opts.send_initial_events {
                    let end = WatchEvent::Bookmark {
                        revision: rev,
                        initial_events_end: true,
                    };
                    if tx.send(end).await.is_err() {
                        return;
                    }
                }
                rev
            }
        };
        let mut last_bookmark = tokio::time::Instant::now();
        loop {
            rev_rx.borrow_and_update();
            match self
                .cache
                .events_after(kind.info.plural, start, WATCH_BATCH)
            {
                Ok((events, cache_rev)) => {
                    let mut sent_revision = None;
                    for ev in events
                        .iter()
                        .filter(|e| is_kind_key(&e.object.key, &prefix))
                    {
                        if let Some(out) = view_event(ev, &visible) {
                            if sent_revision != Some(ev.revision) && self.watch_over(deadline) {
                                return;
                            }
                            sent_revision = Some(ev.revision);
                            if tx.send(out).await.is_err() {
                                return;
                            }
                        }
                    }
                    match cache_rev {
                        Some(rev) => start = start.max(rev),
                        // More events wait: on with them (the batch ended with a whole
                        // revision).
                        None => {
                            if let Some(last) = events.last() {
                                start = start.max(last.revision);
                            }
                            continue;
                        }
                    }
                }
                Err(_) => {
                    self.watch_from_etcd(&prefix, start, &visible, opts.bookmarks, deadline, &tx)
                        .await;
                    return;
                }
            }
            if self.watch_over(deadline) {
                return;
            }
            if opts.bookmarks && last_bookmark.elapsed() >= self.bookmark_interval {
                let b = WatchEvent::Bookmark {
                    revision: start,
                    initial_events_end: false,
                };
                if tx.send(b).await.is_err() {
                    return;
                }
                last_bookmark = tokio::time::Instant::now();
            }
            tokio::select! {
                changed = rev_rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(self.bookmark_interval) => {},
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.stopped() => return,
                _ = tx.closed() => return,
            }
        }
    }

    /// Sends the events after `after` straight from an etcd watch until `deadline`, checked
    /// between etcd's responses (each holds whole revisions). With `bookmarks`, a bookmark
    /// every bookmark interval names the last revision whose events were all sent (the start
    /// while none came): etcd 3.4's on-demand progress reports may name a revision whose
    /// events are still to come, so they are not asked for.
    async fn watch_from_etcd(
        &self,
        prefix: &str,
        after: i64,
        visible: &(dyn Fn(&Value) -> bool + Sync),
        bookmarks: bool,
        deadline: tokio::time::Instant,
        tx: &mpsc::Sender<WatchEvent>,
    ) {
        self.metrics.etcd_direct_watches.inc();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1)
            .with_prev_key();
        let mut stream = match store::watcher(&self.etcd)
            .watch(prefix, Some(options))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(WatchEvent::Error(e.into())).await;
                return;
            }
        };
        // Every event of the prefix up to this revision was sent (or not the watcher's to see).
        let mut sent_through = after;
        let mut bookmark_at = tokio::time::Instant::now() + self.bookmark_interval;
        loop {
            if self.watch_over(deadline) {
                return;
            }
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep_until(bookmark_at), if bookmarks => {
                    let b = WatchEvent::Bookmark {
                        revision: sent_through,
                        initial_events_end: false,
                    };
                    if tx.send(b).await.is_err() {
                        return;
                    }
                    bookmark_at = tokio::time::Instant::now() + self.bookmark_interval;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.stopped() => return,
                _ = tx.closed() => return,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(WatchEvent::Error(e.into())).await;
                    return;
                }
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                let gone = ApiError::gone(format!(
                    "too old resource version: {after} ({})",
                    resp.compact_revision()
                ));
                let _ = tx.send(WatchEvent::Error(gone)).await;
                return;
            }
            for ev in resp.events() {
                let Some(kvp) = ev.kv() else { continue };
                let Ok(key) = kvp.key_str() else { continue };
                let rev = kvp.mod_revision();
                let prev = ev.prev_kv().and_then(|p| {
                    CachedObject::from_stored(key.to_string(), p.value(), p.mod_revision())
                        .map(Arc::new)
                });
                let deleted = ev.event_type() == etcd_client::EventType::Delete;
                let object = if deleted {
                    let Some(p) = &prev else { continue };
                    let mut last = p.value.clone();
                    set_resource_version(&mut last, rev);
                    Arc::new(CachedObject::from_value(key.to_string(), last, rev))
                } else {
                    match CachedObject::from_stored(key.to_string(), kvp.value(), rev) {
                        Some(o) => Arc::new(o),
                        None => continue,
                    }
                };
                let ce = CacheEvent {
                    revision: rev,
                    object,
                    prev,
                    deleted,
                };
                if let Some(out) = view_event(&ce, visible) {
                    if tx.send(out).await.is_err() {
                        return;
                    }
                }
            }
            // A response holds whole revisions: all of its last one is sent.
            if let Some(last) = resp.events().iter().filter_map(|e| e.kv()).next_back() {
                sent_through = sent_through.max(last.mod_revision());
            }
        }
    }

    /// Drops the owner references to `owner_uid` from its dependents, found in the cache once
    /// it caught up with etcd (a dependent created just before must not be missed).
    async fn orphan_dependents(&self, owner_uid: &str) -> ApiResult<()> {
        self.catch_up().await?;
        for key in self.cache.dependents_of(owner_uid) {
            self.drop_owner_reference(&key, owner_uid).await?;
        }
        Ok(())
    }

    /// Removes the owner reference to `owner_uid` from the record at `key` (compare-and-swap,
    /// retried on a concurrent write); a record that is gone or holds no such reference is
    /// left as it is. Written directly, not through [`Registry::update_with`], which orphans
    /// through this.
    async fn drop_owner_reference(&self, key: &str, owner_uid: &str) -> ApiResult<()> {
        for _ in 0..16 {
            let Some((current, rev)) = self.read(key).await? else {
                return Ok(());
            };
            let mut next = current.clone();
            let Some(refs) = next
                .pointer_mut("/metadata/ownerReferences")
                .and_then(Value::as_array_mut)
            else {
                return Ok(());
            };
            let before = refs.len();
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
            if refs.len() == before {
                return Ok(());
            }
            if let Some(meta) = next.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
            }
            let raw = serde_json::to_vec(&next).map_err(|e| ApiError::internal(e.to_string()))?;
            let txn = Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key, raw, None)]);
            if self.etcd_txn(txn).await?.succeeded() {
                self.metrics.writes.inc();
                return Ok(());
            }
            self.metrics.conflict_retries.inc();
        }
        Err(ApiError::conflict_message(format!(
            "could not drop the owner reference of {key}: it kept changing"
        )))
    }

    /// (kind, namespace, name) of a record key.
    fn locate(&self, key: &str) -> Option<(Arc<Kind>, Option<String>, String)> {
        let plural = store::plural_of_key(key)?;
        let kind = self.kinds.by_plural(plural)?;
        let rest = key.strip_prefix(&store::kind_prefix(plural))?;
        if kind.info.namespaced {
            let (ns, name) = rest.split_once('/')?;
            Some((kind, Some(ns.to_string()), name.to_string()))
        } else {
            Some((kind, None, rest.to_string()))
        }
    }

    /// Delete dependents whose owners are all gone; drop references to gone owners otherwise.
    async fn collect_dependent(&self, key: &str) -> ApiResult<()> {
        let Some((kind, ns, name)) = self.locate(key) else {
            return Ok(());
        };
        let Some(obj) = self.cache.get(kind.info.plural, key) else {
            return Ok(());
        };
        let refs: Vec<String> = obj
            .value
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if refs.is_empty() {
            return Ok(());
        }
        let dead: Vec<String> = refs
            .iter()
            .filter(|u| !self.cache.uid_exists(u))
            .cloned()
            .collect();
        let system = collector();
        if dead.len() == refs.len() {
            if obj.value.pointer("/metadata/deletionTimestamp").is_some() {
                // Being deleted already: its own finalizers finish it.
                return Ok(());
            }
            tracing::info!(key, "owner gone; deleting dependent");
            // Only the version decided on: a dependent given a live owner since is kept (the
            // conflict brings its change, and the next pass looks again).
            let unchanged = DeleteOptions {
                resource_version: Some(obj.revision),
                uid: obj.uid().map(str::to_string),
                ..Default::default()
            };
            match self
                .delete(&kind, ns.as_deref(), &name, &system, &unchanged)
                .await
            {
                Ok(_) => Ok(()),
                // A conflict (the dependent changed, a bucket is not empty) is tried again.
                Err(e) if e.code == 404 => Ok(()),
                Err(e) => Err(e),
            }
        } else if !dead.is_empty() {
            // Only the references to gone owners go; one added meanwhile stays.
            let mut drop_dead = |cur: &Value| {
                let mut next = cur.clone();
                if let Some(r) = next
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    r.retain(|x| {
                        x.get("uid")
                            .and_then(Value::as_str)
                            .is_none_or(|u| !dead.iter().any(|d| d == u))
                    });
                }
                Ok(next)
            };
            self.collector_update(&kind, ns.as_deref(), &name, &mut drop_dead)
                .await
        } else {
            Ok(())
        }
    }

    /// The garbage collector's change of a record: as `system:garbage-collector`, at whatever
    /// version it has (retried on a concurrent write).
    async fn collector_update(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        change: &mut (dyn FnMut(&Value) -> ApiResult<Value> + Send),
    ) -> ApiResult<()> {
        self.update_with(
            kind,
            ns,
            name,
            &collector(),
            Subresource::Main,
            None,
            // Removes only: prunes what managers owned of it, adds no entry.
            WriteOptions::by(GARBAGE_COLLECTOR),
            change,
        )
        .await
        .map(|_| ())
    }

    /// Whether `dependent` names an owner other than `owner_uid` that exists and is not waiting
    /// for its own dependents' deletion (Kubernetes' "solid" owner).
    fn has_solid_owner_besides(&self, dependent: &Value, owner_uid: &str) -> bool {
        let refs = dependent
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array);
        refs.into_iter().flatten().any(|r| {
            r.get("uid")
                .and_then(Value::as_str)
                .filter(|u| *u != owner_uid)
                .and_then(|u| self.cache.by_uid(u))
                .is_some_and(|o| !admission::deleting_in_foreground(&o.value))
        })
    }

    /// A record deleted in the foreground: deletes its dependents that are not being deleted
    /// yet (but for those another owner keeps, which only lose their reference to it), and
    /// once none that blocks its deletion (`blockOwnerDeletion: true`) is left, removes its
    /// `foregroundDeletion` finalizer (which removes it when no other holds it).
    async fn collect_foreground(&self, key: &str) -> ApiResult<()> {
        let Some((kind, ns, name)) = self.locate(key) else {
            return Ok(());
        };
        let Some(owner) = self.cache.get(kind.info.plural, key) else {
            return Ok(());
        };
        let Some(uid) = owner.uid().map(str::to_string) else {
            return Ok(());
        };
        let system = collector();
        let mut blocking = 0usize;
        // One dependent that cannot be deleted (a bucket that is not empty) does not hold up
        // the others; the first failure is returned after all of them, to be tried again.
        let mut failed = None;
        for dep_key in self.cache.dependents_of(&uid) {
            if dep_key == key {
                // A record that owns itself does not wait for itself.
                continue;
            }
            let Some((dep_kind, dep_ns, dep_name)) = self.locate(&dep_key) else {
                continue;
            };
            let Some(dep) = self.cache.get(dep_kind.info.plural, &dep_key) else {
                continue;
            };
            if self.has_solid_owner_besides(&dep.value, &uid) {
                // Another owner that stays keeps it, as in Kubernetes: only the reference to
                // the owner being deleted goes.
                tracing::info!(
                    owner = key,
                    dependent = dep_key,
                    "keeping a dependent another owner holds"
                );
                if let Err(e) = self.drop_owner_reference(&dep_key, &uid).await {
                    failed.get_or_insert(e);
                }
                continue;
            }
            if blocks_owner_deletion(&dep.value, &uid) {
                blocking += 1;
            }
            if dep.value.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            tracing::info!(
                owner = key,
                dependent = dep_key,
                "deleting a dependent first"
            );
            // A dependent with dependents of its own goes in the foreground too, so that the
            // owner waits for the whole blocking subtree; but in the background when one of
            // them is being deleted already (the owner itself, in a cycle of references),
            // which would otherwise wait for it in turn, for ever.
            let grandchildren: Vec<String> = dep
                .uid()
                .map(|u| self.cache.dependents_of(u))
                .unwrap_or_default();
            let in_foreground = !grandchildren.is_empty()
                && grandchildren.iter().all(|g| {
                    self.locate(g)
                        .and_then(|(k, _, _)| self.cache.get(k.info.plural, g))
                        .is_some_and(|o| o.value.pointer("/metadata/deletionTimestamp").is_none())
                });
            let this_one = DeleteOptions {
                uid: dep.uid().map(str::to_string),
                propagation: if in_foreground {
                    Propagation::Foreground
                } else {
                    Propagation::Background
                },
                ..Default::default()
            };
            match self
                .delete(&dep_kind, dep_ns.as_deref(), &dep_name, &system, &this_one)
                .await
            {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if blocking > 0 {
            return failed.map_or(Ok(()), Err);
        }
        tracing::info!(
            key,
            "no blocking dependent left; removing the foreground finalizer"
        );
        let mut release = |cur: &Value| {
            Ok(admission::with_finalizer(
                cur,
                admission::FOREGROUND_FINALIZER,
                false,
            ))
        };
        match self
            .collector_update(&kind, ns.as_deref(), &name, &mut release)
            .await
        {
            Ok(()) => failed.map_or(Ok(()), Err),
            Err(e) if e.code == 404 => failed.map_or(Ok(()), Err),
            Err(e) => Err(e),
        }
    }

    /// The garbage collector: level-triggered on every cache change, it collects records whose
    /// owners no longer exist (cascading deletion) and the dependents of records deleted in
    /// the foreground.
    ///
    /// A record whose collection failed (a bucket that is not empty, a conflict) is tried again
    /// only after [`GC_RETRY`]: each try writes (a bucket's deletion marker), and every write
    /// wakes the collector again.
    async fn collect_garbage(self: Arc<Self>) {
        let mut rx = self.cache.subscribe();
        let mut failed: HashMap<String, tokio::time::Instant> = HashMap::new();
        loop {
            // Woken by a change, or, while a failure waits, when the first is due again.
            let due = failed.values().min().copied();
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                () = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            let now = tokio::time::Instant::now();
            failed.retain(|_, retry_at| *retry_at > now);
            for key in self.cache.orphan_candidates() {
                if failed.contains_key(&key) {
                    continue;
                }
                if let Err(e) = self.collect_dependent(&key).await {
                    tracing::warn!(key, error = %e, "garbage collection failed; will retry");
                    failed.insert(key, now + GC_RETRY);
                }
            }
            for key in self.cache.foreground_deletions() {
                if failed.contains_key(&key) {
                    continue;
                }
                if let Err(e) = self.collect_foreground(&key).await {
                    tracing::warn!(key, error = %e, "foreground deletion failed; will retry");
                    failed.insert(key, now + GC_RETRY);
                }
            }
        }
    }
}

/// The compare that fences a write on the instances a check read at cache revision `seen`: no
/// instance changed after it.
fn instances_unchanged_since(seen: i64) -> Compare {
    Compare::mod_revision(
        store::kind_prefix("instances"),
        CompareOp::Less,
        seen.saturating_add(1),
    )
    .with_prefix()
}

/// The field manager the garbage collector's writes are recorded under.
const GARBAGE_COLLECTOR: &str = "karri-garbage-collector";

/// The principal the garbage collector acts as.
fn collector() -> Principal {
    Principal::Admin("system:garbage-collector".into())
}

/// How long the garbage collector leaves a record whose collection failed before trying again.
const GC_RETRY: Duration = Duration::from_secs(5);

/// A bucket's deletion marker as held: the index that took it and the lease it lives on.
type BucketMarker = (crate::s3::index::ObjectIndex, i64);

/// Gives a bucket's deletion marker back; one that cannot be given back lapses with its lease.
async fn unmark_bucket((index, lease): BucketMarker, name: &str) {
    if let Err(e) = index.unmark_deleting(lease).await {
        tracing::warn!(error = %e, bucket = name, "the deletion marker stays until its lease expires");
    }
}

/// Whether `dependent` names `owner_uid` as an owner with `blockOwnerDeletion: true`. Pure.
fn blocks_owner_deletion(dependent: &Value, owner_uid: &str) -> bool {
    dependent
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter().any(|r| {
                r.get("uid").and_then(Value::as_str) == Some(owner_uid)
                    && r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true)
            })
        })
}

/// The operations that remove a record with its ID index and unique keys.
fn removal_ops(kind: &Kind, key: &str, current: &Value) -> Vec<TxnOp> {
    let mut ops = vec![TxnOp::delete(key, None)];
    if kind.info.plural == "buckets" {
        // The deletion marker a bucket kept while its finalizers held it.
        let name = admission::name_of(current);
        ops.push(TxnOp::delete(crate::s3::index::deleting_key(name), None));
    }
    if let Some(id) = id_of(current) {
        ops.push(TxnOp::delete(id_key(id), None));
    }
    for u in admission::unique_keys(kind.info.kind, current) {
        ops.push(TxnOp::delete(u.key, None));
    }
    ops
}

fn id_of(v: &Value) -> Option<&str> {
    v.pointer("/metadata/labels")
        .and_then(|l| l.get(crds::ID_LABEL))
        .and_then(Value::as_str)
}

/// The `"type"` of an event on the wire.
pub fn event_type(ev: &WatchEvent) -> &'static str {
    match ev {
        WatchEvent::Added(_) => "ADDED",
        WatchEvent::Modified(_) => "MODIFIED",
        WatchEvent::Deleted(_) => "DELETED",
        WatchEvent::Bookmark { .. } => "BOOKMARK",
        WatchEvent::Error(_) => "ERROR",
    }
}

/// A bookmark object for a kind.
pub fn bookmark_object(kind: &Kind, revision: i64, initial_events_end: bool) -> Value {
    bookmark_of(
        crds::API_VERSION,
        kind.info.kind,
        revision,
        initial_events_end,
    )
}

/// A bookmark object of `kind` in `api_version` at `revision`, marked as the end of the
/// initial events when `initial_events_end`.
pub fn bookmark_of(
    api_version: &str,
    kind: &str,
    revision: i64,
    initial_events_end: bool,
) -> Value {
    let mut meta = json!({"resourceVersion": revision.to_string()});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"apiVersion": api_version, "kind": kind, "metadata": meta})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(app: &str, rev: i64) -> Arc<CachedObject> {
        let mut v = json!({"metadata": {"name": "i-1", "labels": {"app": app}}});
        set_resource_version(&mut v, rev);
        Arc::new(CachedObject::from_value("/k/i-1".into(), v, rev))
    }

    fn event(prev: Option<&str>, now: &str, deleted: bool) -> CacheEvent {
        CacheEvent {
            revision: 20,
            object: obj(now, 20),
            prev: prev.map(|p| obj(p, 10)),
            deleted,
        }
    }

    /// (type, app label, resourceVersion) of what a watcher of `app=web` sees.
    fn seen(ev: &CacheEvent) -> Option<(&'static str, String, String)> {
        let web = |v: &Value| v.pointer("/metadata/labels/app") == Some(&json!("web"));
        let out = view_event(ev, &web)?;
        let (kind, o) = match &out {
            WatchEvent::Added(o) => ("ADDED", o),
            WatchEvent::Modified(o) => ("MODIFIED", o),
            WatchEvent::Deleted(o) => ("DELETED", o),
            _ => panic!("a change is never a bookmark or an error"),
        };
        let json: Value = serde_json::from_slice(o.json()).expect("the event's JSON parses");
        assert_eq!(json, o.value, "the sent JSON is the object");
        Some((
            kind,
            o.value["metadata"]["labels"]["app"]
                .as_str()
                .expect("every test object has an app label")
                .to_string(),
            o.value["metadata"]["resourceVersion"]
                .as_str()
                .expect("every cached object has a resourceVersion")
                .to_string(),
        ))
    }

    #[test]
    fn each_watcher_sees_a_change_as_its_filter_makes_it() {
        let s = |k: &'static str, app: &str, rv: &str| Some((k, app.to_string(), rv.to_string()));
        assert_eq!(seen(&event(None, "web", false)), s("ADDED", "web", "20"));
        assert_eq!(
            seen(&event(Some("db"), "web", false)),
            s("ADDED", "web", "20")
        );
        assert_eq!(
            seen(&event(Some("web"), "web", false)),
            s("MODIFIED", "web", "20")
        );
        assert_eq!(
            seen(&event(Some("web"), "web", true)),
            s("DELETED", "web", "20")
        );
        assert_eq!(seen(&event(Some("db"), "db", false)), None);
        assert_eq!(seen(&event(None, "db", false)), None);
    }

    #[test]
    fn an_object_that_stops_matching_is_deleted_with_its_last_matching_state() {
        // Its new state is not the watcher's to see (for a node's token: an instance moved
        // to another node); the DELETED carries the state it saw last, at the new revision.
        let ev = event(Some("web"), "db", false);
        assert_eq!(
            seen(&ev),
            Some(("DELETED", "web".to_string(), "20".to_string()))
        );
    }
}
