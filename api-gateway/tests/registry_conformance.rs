//! Conformance of the registry with Kubernetes record semantics, against a real etcd.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use api_gateway::admission::Subresource;
use api_gateway::auth::Principal;
use api_gateway::cache::HistoryLimits;
use api_gateway::error::ApiError;
use api_gateway::kinds::{Kind, Kinds};
use api_gateway::metrics::Metrics;
use api_gateway::registry::{
    DeleteOptions, ListOptions, ListPage, Propagation, Registry, WatchEvent, WatchOptions2,
    WriteOptions,
};
use etcd_client::{Client, CompactionOptions};
use karri_testkit::Etcd;
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;

fn admin() -> Principal {
    Principal::Admin("admin".into())
}

fn instance(name: &str) -> Value {
    json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small"}
    })
}

struct Harness {
    etcd: Etcd,
    client: Client,
    registry: Arc<Registry>,
    instances: Arc<Kind>,
    metrics: Arc<Metrics>,
}

async fn start_registry(client: &Client) -> anyhow::Result<(Arc<Registry>, Arc<Metrics>)> {
    start_registry_keeping(
        client,
        HistoryLimits {
            events: 1000,
            ..HistoryLimits::default()
        },
    )
    .await
}

/// A registry whose watch cache keeps `history` events per kind.
async fn start_registry_keeping(
    client: &Client,
    history: HistoryLimits,
) -> anyhow::Result<(Arc<Registry>, Arc<Metrics>)> {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::start(
        client.clone(),
        Kinds::load(),
        history,
        metrics.clone(),
        None,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut rx = registry.cache.subscribe();
    while !registry.ready() {
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            bail!("the watch cache did not sync");
        }
    }
    Ok((registry, metrics))
}

async fn harness() -> anyhow::Result<Harness> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let (registry, metrics) = start_registry(&client).await?;
    harness_of(etcd, client, registry, metrics)
}

/// A harness whose registry's watch cache keeps the history `limits` allow.
async fn harness_keeping(limits: HistoryLimits) -> anyhow::Result<Harness> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let (registry, metrics) = start_registry_keeping(&client, limits).await?;
    harness_of(etcd, client, registry, metrics)
}

fn harness_of(
    etcd: Etcd,
    client: Client,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Harness> {
    let instances = registry
        .kinds
        .by_plural("instances")
        .context("instances kind")?;
    Ok(Harness {
        etcd,
        client,
        registry,
        instances,
        metrics,
    })
}

impl Harness {
    /// Creates an instance of each of `names`, then lists the first page of one.
    async fn first_page_of_one(&self, names: &[&str]) -> anyhow::Result<ListPage> {
        for name in names {
            self.create(name).await?;
        }
        let one = ListOptions {
            limit: 1,
            ..Default::default()
        };
        Ok(self
            .registry
            .list(&self.instances, Some("acme"), &admin(), &one)
            .await?)
    }

    /// Instance `name` of namespace `acme`, as an admin reads it.
    async fn get(&self, name: &str) -> Result<Value, ApiError> {
        self.registry
            .get(&self.instances, Some("acme"), name, &admin())
            .await
    }

    async fn create(&self, name: &str) -> anyhow::Result<Value> {
        Ok(self
            .registry
            .create(
                &self.instances,
                Some("acme"),
                instance(name),
                &admin(),
                WriteOptions::default(),
            )
            .await?
            .object)
    }

    /// Creates `n` records, `r<r>-0` to `r<r>-<n-1>`, in one transaction: they share a
    /// revision.
    async fn create_together(&self, r: usize, n: usize) -> anyhow::Result<Vec<Value>> {
        let bodies = (0..n).map(|i| instance(&format!("r{r}-{i}"))).collect();
        let written = self
            .registry
            .create_all(
                &self.instances,
                Some("acme"),
                bodies,
                &admin(),
                WriteOptions::default(),
            )
            .await?;
        Ok(written.into_iter().map(|w| w.object).collect())
    }

    async fn set_spec(
        &self,
        name: &str,
        field: &str,
        value: &str,
        pin: Option<i64>,
    ) -> Result<Value, ApiError> {
        let (field, value) = (field.to_string(), value.to_string());
        let mut change = move |cur: &Value| {
            let mut next = cur.clone();
            next["spec"][&field] = json!(value);
            Ok(next)
        };
        self.registry
            .update_with(
                &self.instances,
                Some("acme"),
                name,
                &admin(),
                Subresource::Main,
                pin,
                WriteOptions::default(),
                &mut change,
            )
            .await
            .map(|w| w.object)
    }

    async fn update(
        &self,
        name: &str,
        sub: Subresource,
        change: &mut (dyn FnMut(&Value) -> Result<Value, ApiError> + Send),
    ) -> Result<Value, ApiError> {
        self.registry
            .update_with(
                &self.instances,
                Some("acme"),
                name,
                &admin(),
                sub,
                None,
                WriteOptions::default(),
                change,
            )
            .await
            .map(|w| w.object)
    }

    fn watch(&self, from: Option<i64>) -> Receiver<WatchEvent> {
        self.registry.watch(
            self.instances.clone(),
            Some("acme".into()),
            admin(),
            WatchOptions2 {
                from,
                timeout: Duration::from_secs(60),
                ..Default::default()
            },
        )
    }
}

/// An empty object's index entry.
fn object_meta() -> api_gateway::s3::index::ObjectMeta {
    api_gateway::s3::index::ObjectMeta {
        segments: Vec::new(),
        size: 0,
        etag: "d41d8cd98f00b204e9800998ecf8427e".into(),
        last_modified_ms: 0,
        headers: Default::default(),
        metadata: Default::default(),
        acl: Default::default(),
        tags: Vec::new(),
        parts_count: None,
        upload_id: None,
        checksum: None,
    }
}

fn rv(v: &Value) -> i64 {
    v.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .expect("every stored record has a resourceVersion")
}

fn generation(v: &Value) -> i64 {
    v.pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .expect("generation is set")
}

async fn next_event(rx: &mut Receiver<WatchEvent>) -> anyhow::Result<WatchEvent> {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(ev)) => Ok(ev),
        Ok(None) => bail!("the watch ended"),
        Err(_) => bail!("no watch event within 10 s"),
    }
}

fn describe(ev: &WatchEvent) -> String {
    match ev {
        WatchEvent::Added(o) => format!("ADDED {} {}", o.value["metadata"]["name"], o.revision),
        WatchEvent::Modified(o) => {
            format!("MODIFIED {} {}", o.value["metadata"]["name"], o.revision)
        }
        WatchEvent::Deleted(o) => format!("DELETED {} {}", o.value["metadata"]["name"], o.revision),
        WatchEvent::Bookmark { revision, .. } => format!("BOOKMARK {revision}"),
        WatchEvent::Error(e) => format!("ERROR {} {}", e.code, e.message),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_version_is_the_etcd_mod_revision_and_stale_updates_conflict() -> anyhow::Result<()>
{
    let h = harness().await?;
    let created = h.create("web").await?;
    let mut kv = h.client.kv_client();
    let stored = kv
        .get("/karri/registry/karri.dev/instances/acme/web", None)
        .await?;
    assert_eq!(rv(&created), stored.kvs()[0].mod_revision());

    let updated = h
        .set_spec("web", "keyName", "k1", Some(rv(&created)))
        .await?;
    assert!(rv(&updated) > rv(&created));
    let stale = h
        .set_spec("web", "keyName", "k2", Some(rv(&created)))
        .await
        .expect_err("stale version");
    assert_eq!((stale.code, stale.reason), (409, "Conflict"));
    let now = h
        .registry
        .get(&h.instances, Some("acme"), "web", &admin())
        .await?;
    assert_eq!(
        now["spec"]["keyName"], "k1",
        "a conflicting update changes nothing"
    );

    // Unpinned concurrent writers are serialised by compare-and-swap: none is lost.
    let values: Vec<String> = (0..8).map(|i| format!("key-{i}")).collect();
    let writes = values.iter().map(|v| h.set_spec("web", "keyName", v, None));
    let results = futures::future::join_all(writes).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let last = h
        .registry
        .get(&h.instances, Some("acme"), "web", &admin())
        .await?;
    // Each of the 8 writes changed the spec once on top of generation 2: none was lost.
    assert_eq!(generation(&last), 2 + 8, "{last}");
    assert!(
        values.iter().any(|v| last["spec"]["keyName"] == v.as_str()),
        "{last}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_counts_spec_changes_and_status_writes_never_bump_it() -> anyhow::Result<()> {
    let h = harness().await?;
    let created = h.create("web").await?;
    assert_eq!(generation(&created), 1);
    assert!(created["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty()));
    assert!(created["metadata"]["creationTimestamp"].is_string());

    let mut relabel = |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["labels"]["tier"] = json!("front");
        Ok(next)
    };
    let relabeled = h.update("web", Subresource::Main, &mut relabel).await?;
    assert_eq!(
        generation(&relabeled),
        1,
        "metadata changes keep the generation"
    );

    // A spec that is the same once pruned and defaulted (a misspelt field, a defaulted field
    // left out) is no change.
    let mut same_once_admitted = |cur: &Value| {
        let mut next = cur.clone();
        next["spec"]["instanceTyp"] = json!("misspelt");
        if let Some(spec) = next["spec"].as_object_mut() {
            spec.remove("desiredState");
        }
        Ok(next)
    };
    let unchanged = h
        .update("web", Subresource::Main, &mut same_once_admitted)
        .await?;
    assert_eq!(
        generation(&unchanged),
        1,
        "a spec equal once admitted keeps the generation"
    );

    let spec = h.set_spec("web", "keyName", "k1", None).await?;
    assert_eq!(generation(&spec), 2);

    let mut status = |cur: &Value| {
        let mut next = cur.clone();
        next["status"] = json!({"state": "running", "nodeName": "node-1", "observedGeneration": 2});
        next["spec"]["keyName"] = json!("ignored-by-status-writes");
        Ok(next)
    };
    let with_status = h.update("web", Subresource::Status, &mut status).await?;
    assert_eq!(generation(&with_status), 2);
    assert_eq!(with_status["status"]["state"], "running");
    assert_eq!(
        with_status["spec"]["keyName"], "k1",
        "a status write leaves spec alone"
    );

    let mut spec_write_with_status = |cur: &Value| {
        let mut next = cur.clone();
        next["status"] = json!({"state": "terminated"});
        Ok(next)
    };
    let after = h
        .update("web", Subresource::Main, &mut spec_write_with_status)
        .await?;
    assert_eq!(
        after["status"]["state"], "running",
        "a spec write ignores status"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_a_revision_with_every_later_change_in_order() -> anyhow::Result<()> {
    let h = harness().await?;
    let a = h.create("a").await?;
    let start = rv(&a);
    h.create("b").await?;
    h.set_spec("a", "keyName", "k", None).await?;
    h.registry
        .delete(
            &h.instances,
            Some("acme"),
            "b",
            &admin(),
            &DeleteOptions::default(),
        )
        .await?;

    let mut rx = h.watch(Some(start));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next_event(&mut rx).await?));
    }
    let kinds: Vec<&str> = seen
        .iter()
        .map(|s| s.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"], "{seen:?}");
    let revs: Vec<i64> = seen
        .iter()
        .filter_map(|s| s.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "in order: {revs:?}");
    assert!(
        revs.iter().all(|r| *r > start),
        "nothing at or before {start}: {revs:?}"
    );

    // Changes after the watch started arrive too, exactly once.
    h.create("c").await?;
    let ev = describe(&next_event(&mut rx).await?);
    assert!(ev.starts_with("ADDED \"c\""), "{ev}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "no repeats"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_times_out_ends_between_revisions_never_inside_one() -> anyhow::Result<()> {
    // Records written in one transaction (a RunInstances reservation) share a revision. A
    // client resumes from the last resourceVersion it saw, so a watch cut inside a revision
    // would make it miss the rest of that revision for good.
    // 600 events, many times what a watch queues (64) or takes from the history at once: the
    // watch is still sending when its timeout comes, and stops after the revision it is in.
    const PER_REVISION: usize = 60;
    const REVISIONS: usize = 10;
    let h = harness().await?;
    let start = rv(&h.create("first").await?);
    for r in 0..REVISIONS {
        h.create_together(r, PER_REVISION).await?;
    }
    let mut rx = h.registry.watch(
        h.instances.clone(),
        Some("acme".into()),
        admin(),
        WatchOptions2 {
            from: Some(start),
            timeout: Duration::from_secs(1),
            ..Default::default()
        },
    );
    // The reader stalls past the watch's timeout, with more events due than the watch queues
    // for it, so the timeout comes while the watch waits to hand over the next event.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut per_revision = std::collections::BTreeMap::<i64, usize>::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(WatchEvent::Added(o))) => *per_revision.entry(o.revision).or_default() += 1,
            Ok(Some(other)) => bail!("unexpected event {}", describe(&other)),
            Ok(None) => break,
            Err(_) => bail!("the watch did not end within 10 s of its timeout"),
        }
    }
    assert!(!per_revision.is_empty(), "the watch delivered nothing");
    assert!(
        per_revision.len() < REVISIONS,
        "the timeout cut the watch short: {per_revision:?}"
    );
    assert!(
        per_revision.values().all(|n| *n == PER_REVISION),
        "every revision whole: {per_revision:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_far_behind_gets_every_event_once_in_order_across_shared_revisions(
) -> anyhow::Result<()> {
    // 30 revisions of 7 records each (210 events): a watch takes the history in batches, each
    // ending with a whole revision, so none is skipped or repeated at a batch's edge.
    let h = harness().await?;
    let start = rv(&h.create("first").await?);
    let mut want = Vec::new();
    for r in 0..30 {
        let written = h.create_together(r, 7).await?;
        want.extend(
            written
                .iter()
                .map(|w| format!("ADDED {} {}", w["metadata"]["name"], rv(w))),
        );
    }
    h.registry.catch_up().await?;
    let mut rx = h.watch(Some(start));
    let mut got = Vec::new();
    while got.len() < want.len() {
        got.push(describe(&next_event(&mut rx).await?));
    }
    let mut sorted_want = want.clone();
    sorted_want.sort();
    let mut sorted_got = got.clone();
    sorted_got.sort();
    assert_eq!(sorted_got, sorted_want, "every event once");
    let order: Vec<i64> = got
        .iter()
        .filter_map(|e| e.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "in revision order");
    assert_eq!(
        h.metrics.etcd_direct_watches.get(),
        0,
        "served by the cache"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_with_a_timeout_beyond_the_clock_still_runs() -> anyhow::Result<()> {
    let h = harness().await?;
    let start = rv(&h.create("a").await?);
    let mut rx = h.registry.watch(
        h.instances.clone(),
        Some("acme".into()),
        admin(),
        WatchOptions2 {
            from: Some(start),
            timeout: Duration::from_secs(u64::MAX),
            ..Default::default()
        },
    );
    h.create("b").await?;
    let ev = describe(&next_event(&mut rx).await?);
    assert!(ev.starts_with("ADDED \"b\""), "{ev}");
    assert_eq!(
        h.metrics.watchers.get(),
        1,
        "the watch is counted while it runs"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_etcd_restart_the_cache_resumes_and_its_watchers_stay_on_it() -> anyhow::Result<()>
{
    let mut h = harness().await?;
    let a = h.create("a").await?;
    let mut rx = h.watch(Some(rv(&a)));
    h.etcd.restart().await?;
    h.create("b").await?;
    let ev = describe(&next_event(&mut rx).await?);
    assert!(ev.starts_with("ADDED \"b\""), "{ev}");
    // The cache resumed its etcd watch after the last revision it had, keeping its history,
    // so the watcher did not have to fall back to an etcd watch of its own.
    assert_eq!(h.metrics.cache_relists.get(), 1, "only the first list");
    assert_eq!(h.metrics.etcd_direct_watches.get(), 0);
    h.create("c").await?;
    let ev = describe(&next_event(&mut rx).await?);
    assert!(ev.starts_with("ADDED \"c\""), "{ev}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_before_the_cache_history_reads_etcd_and_still_sends_bookmarks(
) -> anyhow::Result<()> {
    // The smallest history the cache keeps; more records than that are created after the
    // watch's start, so the cache cannot serve it.
    const HISTORY: usize = 16;
    let h = harness().await?;
    let (registry, metrics) = start_registry_keeping(
        &h.client,
        HistoryLimits {
            events: HISTORY,
            ..HistoryLimits::default()
        },
    )
    .await?;
    let start = rv(&h.create("first").await?);
    let mut last = start;
    for i in 0..HISTORY * 2 {
        last = rv(&h.create(&format!("later-{i}")).await?);
    }
    registry.catch_up().await?;
    let mut rx = registry.watch(
        h.instances.clone(),
        Some("acme".into()),
        admin(),
        WatchOptions2 {
            from: Some(start),
            bookmarks: true,
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
    );
    for i in 0..HISTORY * 2 {
        let ev = describe(&next_event(&mut rx).await?);
        assert!(ev.starts_with(&format!("ADDED \"later-{i}\"")), "{ev}");
    }
    assert_eq!(metrics.etcd_direct_watches.get(), 1, "served from etcd");
    // A bookmark (the registry sends one every 5 s) names the last revision sent.
    let bookmark = match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
        Ok(Some(WatchEvent::Bookmark { revision, .. })) => revision,
        Ok(Some(other)) => bail!("unexpected event {}", describe(&other)),
        Ok(None) => bail!("the watch ended"),
        Err(_) => bail!("no bookmark within 20 s"),
    };
    assert_eq!(bookmark, last, "the bookmark names the last revision sent");
    // The watch goes on past its bookmark.
    let next = rv(&h.create("after-bookmark").await?);
    let ev = describe(&next_event(&mut rx).await?);
    assert_eq!(ev, format!("ADDED \"after-bookmark\" {next}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_records_changed_often_shorten_the_cache_history_and_older_watches_read_etcd(
) -> anyhow::Result<()> {
    // 20 changes of a record holding 4 KiB of annotation (each counts the record before and
    // after, about 9 KiB) pass a history budget of 32 KiB: the cache keeps the last three, and a
    // watch from the first reads etcd and misses nothing.
    let h = harness_keeping(HistoryLimits {
        events: 1000,
        bytes: 32 << 10,
    })
    .await?;
    let start = rv(&h.create("big").await?);
    let mut revisions = Vec::new();
    for i in 0..20 {
        let mut change = |cur: &Value| {
            let mut next = cur.clone();
            next["metadata"]["annotations"] = json!({"blob": format!("{i:04}").repeat(1024)});
            Ok(next)
        };
        revisions.push(rv(&h.update("big", Subresource::Main, &mut change).await?));
    }
    h.registry.catch_up().await?;
    let mut rx = h.watch(Some(start));
    for revision in &revisions {
        let ev = describe(&next_event(&mut rx).await?);
        assert_eq!(ev, format!("MODIFIED \"big\" {revision}"));
    }
    assert_eq!(h.metrics.etcd_direct_watches.get(), 1, "served from etcd");
    // The newest changes are still the cache's to serve.
    let mut rx = h.watch(Some(revisions[17]));
    for revision in &revisions[18..] {
        let ev = describe(&next_event(&mut rx).await?);
        assert_eq!(ev, format!("MODIFIED \"big\" {revision}"));
    }
    assert_eq!(
        h.metrics.etcd_direct_watches.get(),
        1,
        "the cache served the second watch"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_revision_etcd_has_not_reached_is_refused() -> anyhow::Result<()> {
    let h = harness().await?;
    let a = h.create("a").await?;
    let mut rx = h.watch(Some(rv(&a) + 1000));
    let event = next_event(&mut rx).await?;
    let ev = describe(&event);
    assert!(
        ev.starts_with("ERROR 504 Too large resource version"),
        "{ev}"
    );
    // With the cause client-go looks for before it lists afresh.
    let WatchEvent::Error(e) = event else {
        unreachable!("described as an error")
    };
    assert_eq!(
        e.status()["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );
    // A revision etcd has reached (only its latest write being another program's) is fine.
    let mut raw = h.client.kv_client();
    let elsewhere = raw.put("/elsewhere/key", "x", None).await?;
    let current = elsewhere.header().map(|x| x.revision()).context("header")?;
    let mut rx = h.watch(Some(current));
    h.create("b").await?;
    let ev = describe(&next_event(&mut rx).await?);
    assert!(ev.starts_with("ADDED \"b\""), "{ev}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_starts_over_more_records_than_one_grpc_message_holds_by_default(
) -> anyhow::Result<()> {
    // gRPC reads at most 4 MiB per message unless told otherwise; the cache's first list
    // holds every record.
    const RECORDS: usize = 80;
    const PAD: usize = 64 * 1024;
    let h = harness().await?;
    for i in 0..RECORDS {
        let mut body = instance(&format!("big-{i}"));
        body["metadata"]["annotations"] = json!({"example.com/pad": "x".repeat(PAD)});
        h.registry
            .create(
                &h.instances,
                Some("acme"),
                body,
                &admin(),
                WriteOptions::default(),
            )
            .await?;
    }
    // A second gateway's registry, started on these records.
    let (again, _) = start_registry(&h.client).await?;
    let page = again
        .list(
            &h.instances,
            Some("acme"),
            &admin(),
            &ListOptions::default(),
        )
        .await?;
    assert_eq!(page.items.len(), RECORDS);
    Ok(())
}

/// A continue token whose revision is compacted away is 410 Expired with kube-apiserver's
/// words, and the Status carries a token that goes on at the latest revision from where the
/// expired one would have: the rest of the list, changes made meanwhile included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_continue_token_is_gone_with_a_token_that_goes_on_at_the_latest_revision(
) -> anyhow::Result<()> {
    let h = harness().await?;
    let first = h.first_page_of_one(&["a", "b", "c"]).await?;
    let names = |page: &ListPage| -> Vec<String> {
        page.items
            .iter()
            .filter_map(|o| o.value["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(names(&first), ["a"]);
    // Meanwhile: "b" changes, "d" is made; then the first page's revision is compacted.
    h.set_spec("b", "keyName", "changed", None).await?;
    h.create("d").await?;
    let current = h.registry.current_revision().await?;
    h.client
        .clone()
        .compact(current, Some(CompactionOptions::new().with_physical()))
        .await?;

    let expired = ListOptions {
        continue_token: first.continue_token.clone(),
        ..Default::default()
    };
    let err = h
        .registry
        .list(&h.instances, Some("acme"), &admin(), &expired)
        .await
        .expect_err("the token's revision is compacted");
    assert_eq!((err.code, err.reason), (410, "Expired"));
    assert!(
        err.message.starts_with(
            "The provided continue parameter is too old to display a consistent list result."
        ),
        "{}",
        err.message
    );
    let status = err.status();
    let token = status["metadata"]["continue"]
        .as_str()
        .expect("the Status carries a continue token")
        .to_string();
    assert_ne!(Some(&token), first.continue_token.as_ref());

    // The rest, read at the latest revision: "b" as it is now, and "d".
    let rest = h
        .registry
        .list(
            &h.instances,
            Some("acme"),
            &admin(),
            &ListOptions {
                continue_token: Some(token),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(names(&rest), ["b", "c", "d"]);
    assert_eq!(rest.items[0].value["spec"]["keyName"], "changed");
    assert!(
        rest.revision >= current,
        "read at {} before {current}",
        rest.revision
    );
    assert!(rest.continue_token.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_is_gone_and_a_relist_recovers() -> anyhow::Result<()> {
    let h = harness().await?;
    let first = h.create("a").await?;
    let old = rv(&first);
    for i in 0..5 {
        h.set_spec("a", "keyName", &format!("k{i}"), None).await?;
    }
    h.create("b").await?;
    let current = h.registry.current_revision().await?;
    h.client
        .clone()
        .compact(current, Some(CompactionOptions::new().with_physical()))
        .await?;

    // A fresh gateway (as after a restart) remembers nothing before its own start.
    let (fresh, _) = start_registry(&h.client).await?;
    let mut rx = fresh.watch(
        h.instances.clone(),
        Some("acme".into()),
        admin(),
        WatchOptions2 {
            from: Some(old),
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
    );
    match next_event(&mut rx).await? {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason), (410, "Expired"), "{}", e.message),
        other => bail!("expected 410 Gone, got {}", describe(&other)),
    }

    // A paginated list pinned to the compacted revision is gone too.
    let exact = ListOptions {
        resource_version: Some(old.to_string()),
        resource_version_match: Some("Exact".into()),
        ..Default::default()
    };
    let err = fresh
        .list(&h.instances, Some("acme"), &admin(), &exact)
        .await
        .expect_err("compacted");
    assert_eq!(err.code, 410);
    // So is a first page of that version without resourceVersionMatch: with a limit, a
    // version is read exactly, as kube-apiserver reads it.
    let first_page = ListOptions {
        resource_version: Some(old.to_string()),
        limit: 1,
        ..Default::default()
    };
    let err = fresh
        .list(&h.instances, Some("acme"), &admin(), &first_page)
        .await
        .expect_err("compacted");
    assert_eq!(err.code, 410);

    // Relist and watch from the list's revision: the current state, then only new changes.
    let page = fresh
        .list(
            &h.instances,
            Some("acme"),
            &admin(),
            &ListOptions::default(),
        )
        .await?;
    let names: Vec<&str> = page
        .items
        .iter()
        .filter_map(|o| o.value["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(page.items[0].value["spec"]["keyName"], "k4");
    let mut rx = fresh.watch(
        h.instances.clone(),
        Some("acme".into()),
        admin(),
        WatchOptions2 {
            from: Some(page.revision),
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
    );
    h.create("c").await?;
    let ev = describe(&next_event(&mut rx).await?);
    assert!(ev.starts_with("ADDED \"c\""), "{ev}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finalizer_holds_deletion_until_the_last_one_is_removed() -> anyhow::Result<()> {
    let h = harness().await?;
    let mut body = instance("web");
    body["metadata"]["finalizers"] = json!(["karri.dev/a", "karri.dev/b"]);
    h.registry
        .create(
            &h.instances,
            Some("acme"),
            body,
            &admin(),
            WriteOptions::default(),
        )
        .await?;
    let marked = h
        .registry
        .delete(
            &h.instances,
            Some("acme"),
            "web",
            &admin(),
            &DeleteOptions::default(),
        )
        .await?;
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let still = h
        .registry
        .get(&h.instances, Some("acme"), "web", &admin())
        .await?;
    assert!(
        still["metadata"]["deletionTimestamp"].is_string(),
        "still there, terminating"
    );

    let mut add = |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["finalizers"] = json!(["karri.dev/a", "karri.dev/b", "karri.dev/c"]);
        Ok(next)
    };
    let refused = h
        .update("web", Subresource::Main, &mut add)
        .await
        .expect_err("no new finalizers while terminating");
    // Kubernetes: 422 Invalid, a Forbidden cause on metadata.finalizers.
    assert_eq!(refused.code, 422);

    for remaining in [json!(["karri.dev/b"]), json!([])] {
        let mut drop_one = move |cur: &Value| {
            let mut next = cur.clone();
            next["metadata"]["finalizers"] = remaining.clone();
            Ok(next)
        };
        h.update("web", Subresource::Main, &mut drop_one).await?;
    }
    let gone = h
        .registry
        .get(&h.instances, Some("acme"), "web", &admin())
        .await
        .expect_err("deleted");
    assert_eq!(gone.code, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_owner_cascades_to_its_dependents_and_orphan_keeps_them() -> anyhow::Result<()>
{
    let h = harness().await?;
    let owner = h.create("owner").await?;
    let uid = owner["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    for name in ["child-1", "child-2", "orphan-me"] {
        let mut body = instance(name);
        body["metadata"]["ownerReferences"] = json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "owner", "uid": uid}]);
        if name == "orphan-me" {
            let other = h.create("owner-2").await?;
            let uid2 = other["metadata"]["uid"]
                .as_str()
                .context("uid")?
                .to_string();
            body["metadata"]["ownerReferences"] = json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "owner-2", "uid": uid2}]);
        }
        h.registry
            .create(
                &h.instances,
                Some("acme"),
                body,
                &admin(),
                WriteOptions::default(),
            )
            .await?;
    }
    let mut rx = h.watch(Some(rv(&h
        .registry
        .get(&h.instances, Some("acme"), "orphan-me", &admin())
        .await?)));
    h.registry
        .delete(
            &h.instances,
            Some("acme"),
            "owner",
            &admin(),
            &DeleteOptions::default(),
        )
        .await?;
    let mut deleted = std::collections::BTreeSet::new();
    while deleted.len() < 3 {
        if let WatchEvent::Deleted(o) = next_event(&mut rx).await? {
            deleted.insert(
                o.value["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    assert_eq!(
        deleted.into_iter().collect::<Vec<_>>(),
        ["child-1", "child-2", "owner"]
    );

    let orphan_policy = DeleteOptions {
        propagation: Propagation::Orphan,
        ..Default::default()
    };
    h.registry
        .delete(
            &h.instances,
            Some("acme"),
            "owner-2",
            &admin(),
            &orphan_policy,
        )
        .await?;
    let kept = h
        .registry
        .get(&h.instances, Some("acme"), "orphan-me", &admin())
        .await?;
    assert!(
        kept["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "the orphan lost its owner reference: {kept}"
    );
    Ok(())
}

/// A delete whose preconditions name another UID or resourceVersion than the record's is a
/// 409 Conflict on the record that says which precondition failed, with both values, as
/// kube-apiserver says it; the record stays. With both right, it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_preconditions_fail_keeps_the_record_and_says_which_failed(
) -> anyhow::Result<()> {
    let h = harness().await?;
    let created = h.create("pinned").await?;
    let uid = created["metadata"]["uid"]
        .as_str()
        .expect("a uid")
        .to_string();
    let at = rv(&created);
    let delete = |uid: Option<String>, resource_version: Option<i64>| {
        let registry = &h.registry;
        let instances = &h.instances;
        async move {
            let opts = DeleteOptions {
                uid,
                resource_version,
                ..Default::default()
            };
            registry
                .delete(instances, Some("acme"), "pinned", &admin(), &opts)
                .await
        }
    };
    let frame =
        "Operation cannot be fulfilled on instances.karri.dev \"pinned\": Precondition failed:";
    let stale = delete(None, Some(at - 1))
        .await
        .expect_err("a stale version");
    assert_eq!((stale.code, stale.reason), (409, "Conflict"));
    assert_eq!(
        stale.message,
        format!(
            "{frame} ResourceVersion in precondition: {}, ResourceVersion in object meta: {at}",
            at - 1
        )
    );
    let other = delete(Some("not-its-uid".into()), None)
        .await
        .expect_err("another UID");
    assert_eq!((other.code, other.reason), (409, "Conflict"));
    assert_eq!(
        other.message,
        format!("{frame} UID in precondition: not-its-uid, UID in object meta: {uid}")
    );
    assert!(other.is_uid_precondition_failure() && !stale.is_uid_precondition_failure());
    assert_eq!(other.status()["details"]["name"], "pinned");
    h.get("pinned")
        .await
        .expect("a failed precondition deletes nothing");
    delete(Some(uid), Some(at)).await?;
    let gone = h.get("pinned").await.expect_err("deleted");
    assert_eq!(gone.code, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaning_delete_held_by_a_finalizer_orphans_when_the_finalizer_goes(
) -> anyhow::Result<()> {
    let h = harness().await?;
    let mut owner = instance("owner");
    owner["metadata"]["finalizers"] = json!(["example.com/hold"]);
    let owner = h
        .registry
        .create(
            &h.instances,
            Some("acme"),
            owner,
            &admin(),
            WriteOptions::default(),
        )
        .await?
        .object;
    let uid = owner["metadata"]["uid"].as_str().context("uid")?;
    let mut child = instance("child");
    child["metadata"]["ownerReferences"] = json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "owner", "uid": uid}]);
    h.registry
        .create(
            &h.instances,
            Some("acme"),
            child,
            &admin(),
            WriteOptions::default(),
        )
        .await?;

    let orphan_policy = DeleteOptions {
        propagation: Propagation::Orphan,
        ..Default::default()
    };
    let marked = h
        .registry
        .delete(
            &h.instances,
            Some("acme"),
            "owner",
            &admin(),
            &orphan_policy,
        )
        .await?;
    assert_eq!(
        marked["metadata"]["finalizers"],
        json!(["example.com/hold", "orphan"]),
        "the policy is kept as Kubernetes keeps it: {marked}"
    );
    assert!(marked["metadata"]["deletionTimestamp"].is_string());

    // The controller releases its finalizer: the dependent is orphaned, then the owner goes.
    h.update("owner", Subresource::Main, &mut |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["finalizers"] = json!(["orphan"]);
        Ok(next)
    })
    .await?;
    let gone = h
        .registry
        .get(&h.instances, Some("acme"), "owner", &admin())
        .await;
    assert!(
        matches!(&gone, Err(e) if e.code == 404),
        "the owner is gone: {gone:?}"
    );
    let kept = h
        .registry
        .get(&h.instances, Some("acme"), "child", &admin())
        .await?;
    assert!(
        kept["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "the dependent is kept without its owner reference: {kept}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreground_delete_removes_the_owner_only_after_its_blocking_dependents_are_gone(
) -> anyhow::Result<()> {
    let h = harness().await?;
    let owner = h.create("owner").await?;
    let uid = owner["metadata"]["uid"].as_str().context("uid")?;
    // Both dependents are held by a finalizer of their own, so that they stay, terminating,
    // until the test lets them go; only one blocks its owner's deletion.
    for (name, blocks) in [("blocking", true), ("plain", false)] {
        let mut child = instance(name);
        child["metadata"]["ownerReferences"] = json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "owner", "uid": uid, "blockOwnerDeletion": blocks}]);
        child["metadata"]["finalizers"] = json!(["example.com/hold"]);
        h.registry
            .create(
                &h.instances,
                Some("acme"),
                child,
                &admin(),
                WriteOptions::default(),
            )
            .await?;
    }
    let mut rx = h.watch(Some(rv(&h
        .registry
        .get(&h.instances, Some("acme"), "plain", &admin())
        .await?)));

    let foreground = DeleteOptions {
        propagation: Propagation::Foreground,
        ..Default::default()
    };
    let marked = h
        .registry
        .delete(&h.instances, Some("acme"), "owner", &admin(), &foreground)
        .await?;
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(
        marked["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );

    // The garbage collector deletes both dependents (they are marked, held by their finalizer).
    let mut terminating = std::collections::BTreeSet::new();
    while terminating.len() < 2 {
        if let WatchEvent::Modified(o) = next_event(&mut rx).await? {
            let name = o.value["metadata"]["name"].as_str().unwrap_or("");
            if name != "owner" && o.value["metadata"]["deletionTimestamp"].is_string() {
                terminating.insert(name.to_string());
            }
        }
    }
    // The blocking dependent is still there: so is its owner.
    let still = h
        .registry
        .get(&h.instances, Some("acme"), "owner", &admin())
        .await?;
    assert_eq!(
        still["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );

    // The blocking dependent goes; then the owner, while the other dependent still terminates.
    h.update("blocking", Subresource::Main, &mut |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["finalizers"] = json!([]);
        Ok(next)
    })
    .await?;
    let mut deleted = Vec::new();
    while !deleted.iter().any(|n| n == "owner") {
        if let WatchEvent::Deleted(o) = next_event(&mut rx).await? {
            deleted.push(
                o.value["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    assert_eq!(deleted, ["blocking", "owner"]);
    let plain = h
        .registry
        .get(&h.instances, Some("acme"), "plain", &admin())
        .await?;
    assert!(plain["metadata"]["deletionTimestamp"].is_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_address_is_held_by_one_live_instance_of_its_zone_at_a_time() -> anyhow::Result<()>
{
    let h = harness().await?;
    h.create("a").await?;
    h.create("b").await?;
    let address = |state: &'static str| {
        move |cur: &Value| {
            let mut next = cur.clone();
            next["status"] = json!({
                "state": state,
                "availabilityZone": "karri-1a",
                "privateIpAddress": "172.31.0.5",
            });
            Ok(next)
        }
    };
    h.update("a", Subresource::Status, &mut address("pending"))
        .await?;
    let taken = h
        .update("b", Subresource::Status, &mut address("pending"))
        .await;
    match &taken {
        Err(e) => {
            assert_eq!(e.code, 409);
            assert!(e.message.contains("172.31.0.5"), "{}", e.message);
        }
        Ok(v) => panic!("a second instance got the address: {v}"),
    }
    // Terminated, the first gives it up.
    h.update("a", Subresource::Status, &mut address("terminated"))
        .await?;
    h.update("b", Subresource::Status, &mut address("pending"))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_indexed_in_the_same_transaction_and_removed_with_the_record() -> anyhow::Result<()>
{
    let h = harness().await?;
    let created = h.create("web").await?;
    let id = created["metadata"]["labels"]["karri.dev/id"]
        .as_str()
        .context("id label")?
        .to_string();
    assert!(
        id.starts_with("i-") && id.len() == 19 && id[2..].chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let found = h.registry.find_by_id(&id).await?.context("found by id")?;
    assert_eq!(found["metadata"]["name"], "web");
    let mut kv = h.client.kv_client();
    let idx = kv.get(format!("/karri/index/ids/{id}"), None).await?;
    assert_eq!(
        idx.kvs()[0].mod_revision(),
        rv(&created),
        "index written in the record's transaction"
    );

    // The ID is immutable.
    let mut change_id = |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["labels"]["karri.dev/id"] = json!("i-00000000000000000");
        Ok(next)
    };
    let err = h
        .update("web", Subresource::Main, &mut change_id)
        .await
        .expect_err("immutable");
    assert_eq!(err.code, 422);

    // A record named by its ID (as EC2 creates them) keeps that ID.
    let named = h.create("i-0123456789abcdef0").await?;
    assert_eq!(
        named["metadata"]["labels"]["karri.dev/id"],
        "i-0123456789abcdef0"
    );

    h.registry
        .delete(
            &h.instances,
            Some("acme"),
            "web",
            &admin(),
            &DeleteOptions::default(),
        )
        .await?;
    assert!(h.registry.find_by_id(&id).await?.is_none());
    assert!(kv
        .get(format!("/karri/index/ids/{id}"), None)
        .await?
        .kvs()
        .is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paginated_lists_read_one_revision_and_selectors_filter() -> anyhow::Result<()> {
    let h = harness().await?;
    for i in 0..7 {
        h.create(&format!("web-{i}")).await?;
    }
    let mut opts = ListOptions {
        limit: 3,
        ..Default::default()
    };
    let first = h
        .registry
        .list(&h.instances, Some("acme"), &admin(), &opts)
        .await?;
    assert_eq!(first.items.len(), 3);
    // A write between pages does not show up in the rest of the walk.
    h.create("web-late").await?;
    let mut names: Vec<String> = first
        .items
        .iter()
        .map(|o| o.value["metadata"]["name"].to_string())
        .collect();
    let mut token = first.continue_token.clone();
    while let Some(t) = token {
        opts.continue_token = Some(t);
        let page = h
            .registry
            .list(&h.instances, Some("acme"), &admin(), &opts)
            .await?;
        assert_eq!(page.revision, first.revision);
        names.extend(
            page.items
                .iter()
                .map(|o| o.value["metadata"]["name"].to_string()),
        );
        token = page.continue_token;
    }
    assert_eq!(names.len(), 7, "{names:?}");

    let everything = h
        .registry
        .list(
            &h.instances,
            Some("acme"),
            &admin(),
            &ListOptions::default(),
        )
        .await?;
    assert_eq!(
        everything.items.len(),
        8,
        "an unpaged list is consistent with the latest write"
    );
    // A first page of the first walk's version is read at exactly that version.
    let then = h
        .registry
        .list(
            &h.instances,
            Some("acme"),
            &admin(),
            &ListOptions {
                resource_version: Some(first.revision.to_string()),
                limit: 100,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        (then.items.len(), then.revision),
        (7, first.revision),
        "a paged list of a given version shows that version"
    );

    let mut relabel = |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["labels"]["tier"] = json!("db");
        Ok(next)
    };
    h.update("web-2", Subresource::Main, &mut relabel).await?;
    let selected = ListOptions {
        labels: api_gateway::selectors::LabelSelector::parse("app=web,tier in (db)")?,
        ..Default::default()
    };
    let db = h
        .registry
        .list(&h.instances, Some("acme"), &admin(), &selected)
        .await?;
    assert_eq!(db.items.len(), 1);
    let other_ns = h
        .registry
        .list(
            &h.instances,
            Some("globex"),
            &admin(),
            &ListOptions::default(),
        )
        .await?;
    assert!(other_ns.items.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continue_token_with_a_resource_version_is_a_bad_request() -> anyhow::Result<()> {
    let h = harness().await?;
    let page = h.first_page_of_one(&["web-0", "web-1", "web-2"]).await?;
    let token = page
        .continue_token
        .clone()
        .expect("3 records at limit 1 continue");
    let rows: [(Option<&str>, Option<&str>, Option<&str>); 4] = [
        (
            Some("1"),
            None,
            Some("specifying resource version is not allowed when using continue"),
        ),
        (
            Some("1"),
            Some("NotOlderThan"),
            Some("resourceVersionMatch is forbidden when continue"),
        ),
        (Some("0"), None, None),
        (None, None, None),
    ];
    for (rv, rv_match, refusal) in rows {
        let opts = ListOptions {
            limit: 1,
            continue_token: Some(token.clone()),
            resource_version: rv.map(str::to_string),
            resource_version_match: rv_match.map(str::to_string),
            ..Default::default()
        };
        let got = h
            .registry
            .list(&h.instances, Some("acme"), &admin(), &opts)
            .await;
        match (refusal, got) {
            (Some(message), Err(e)) => {
                assert_eq!(e.code, 400, "{rv:?} {rv_match:?}: {e:?}");
                assert!(e.message.contains(message), "{rv:?} {rv_match:?}: {e:?}");
            }
            (None, Ok(next)) => assert_eq!(next.revision, page.revision),
            (want, got) => panic!("{rv:?} {rv_match:?}: wanted {want:?}, got {got:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_list_at_resource_version_zero_is_a_bad_request() -> anyhow::Result<()> {
    let h = harness().await?;
    h.create("web").await?;
    let opts = ListOptions {
        resource_version: Some("0".into()),
        resource_version_match: Some("Exact".into()),
        ..Default::default()
    };
    let Err(e) = h
        .registry
        .list(&h.instances, Some("acme"), &admin(), &opts)
        .await
    else {
        panic!("an exact list at version 0 was served");
    };
    assert_eq!(e.code, 422, "{e:?}");
    assert!(
        e.message.contains("resourceVersionMatch: Forbidden")
            && e.message.contains("forbidden for resourceVersion \"0\""),
        "{e:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_field_selector_watch_sees_bindings_come_and_go() -> anyhow::Result<()> {
    let h = harness().await?;
    let created = h.create("web").await?;
    let mut rx = h.registry.watch(
        h.instances.clone(),
        None,
        Principal::Node("node-1".into()),
        WatchOptions2 {
            from: Some(rv(&created)),
            fields: api_gateway::selectors::FieldSelector::parse("status.nodeName=node-1")?,
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
    );
    for node in ["node-1", "node-2"] {
        let mut bind = move |cur: &Value| {
            let mut next = cur.clone();
            next["status"] = json!({"nodeName": node});
            Ok(next)
        };
        h.update("web", Subresource::Status, &mut bind).await?;
    }
    assert!(describe(&next_event(&mut rx).await?).starts_with("ADDED"));
    assert!(
        describe(&next_event(&mut rx).await?).starts_with("DELETED"),
        "moving away reads as a deletion"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_watchers_of_a_kind_cost_one_etcd_watch() -> anyhow::Result<()> {
    let h = harness().await?;
    let etcd_watchers = || async {
        let body = reqwest::get(format!("{}/metrics", h.etcd.endpoint))
            .await?
            .text()
            .await?;
        let line = body
            .lines()
            .find(|l| l.starts_with("etcd_debugging_mvcc_watcher_total "))
            .context("etcd reports its watcher count")?
            .to_string();
        anyhow::Ok(line.rsplit(' ').next().unwrap_or("0").parse::<f64>()?)
    };
    let before = etcd_watchers().await?;
    let start = h.create("warm").await?;
    let mut watchers: Vec<_> = (0..100).map(|_| h.watch(Some(rv(&start)))).collect();
    h.create("web").await?;
    for rx in watchers.iter_mut() {
        assert!(describe(&next_event(rx).await?).starts_with("ADDED \"web\""));
    }
    let during = etcd_watchers().await?;
    assert_eq!(
        during, before,
        "100 API watches opened no etcd watch of their own"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_is_deleted_under_the_s3_deletion_marker_so_no_object_slips_in(
) -> anyhow::Result<()> {
    let h = harness().await?;
    let buckets = h
        .registry
        .kinds
        .by_plural("buckets")
        .context("buckets kind")?;
    let bucket = json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Bucket",
        "metadata": {"name": "research-data"},
        "spec": {"owner": "research", "ownerId": "123456789012", "acl": "private", "region": "karri-1"},
    });
    h.registry
        .create(&buckets, None, bucket, &admin(), WriteOptions::default())
        .await?;
    let index = api_gateway::s3::index::ObjectIndex::new(h.client.clone());
    // An S3 DeleteBucket (or another delete) of it is under way: this one waits its turn.
    let lease = index.mark_deleting("research-data").await?;
    let refused = h
        .registry
        .delete(
            &buckets,
            None,
            "research-data",
            &admin(),
            &DeleteOptions::default(),
        )
        .await
        .expect_err("deleted beside another deletion");
    assert_eq!(refused.code, 409, "{refused:?}");
    assert!(refused.message.contains("being deleted"), "{refused:?}");
    index.unmark_deleting(lease).await?;

    h.registry
        .delete(
            &buckets,
            None,
            "research-data",
            &admin(),
            &DeleteOptions::default(),
        )
        .await?;
    // The delete's own marker is gone with it: the next bucket of that name can be deleted.
    index.mark_deleting("research-data").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_held_by_a_finalizer_takes_no_object_until_it_goes() -> anyhow::Result<()> {
    let h = harness().await?;
    let buckets = h
        .registry
        .kinds
        .by_plural("buckets")
        .context("buckets kind")?;
    let bucket = json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Bucket",
        "metadata": {"name": "held-data", "finalizers": ["example.com/backup"]},
        "spec": {"owner": "research", "ownerId": "123456789012", "acl": "private", "region": "karri-1"},
    });
    let created = h
        .registry
        .create(&buckets, None, bucket, &admin(), WriteOptions::default())
        .await?
        .object;
    // An upload authorized against the bucket before its deletion commits after it.
    let record = api_gateway::store::record_key("buckets", None, "held-data");
    let seen = api_gateway::s3::index::BucketSeen {
        record: &record,
        revision: rv(&created),
    };
    let marked = h
        .registry
        .delete(
            &buckets,
            None,
            "held-data",
            &admin(),
            &DeleteOptions::default(),
        )
        .await?;
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let index = api_gateway::s3::index::ObjectIndex::new(h.client.clone());
    let late = index
        .put_object(seen, "held-data", "late.txt", &object_meta())
        .await;
    assert!(
        matches!(late, Err(api_gateway::s3::index::IndexError::BucketBusy)),
        "an object landed in a bucket being deleted: {late:?}"
    );
    // Deleting it again is no conflict: it is being deleted already.
    let again = h
        .registry
        .delete(
            &buckets,
            None,
            "held-data",
            &admin(),
            &DeleteOptions::default(),
        )
        .await?;
    assert_eq!(
        again["metadata"]["finalizers"],
        json!(["example.com/backup"])
    );

    // Its last finalizer goes: the bucket goes, and its deletion marker with it.
    let mut release = |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["finalizers"] = json!([]);
        Ok(next)
    };
    h.registry
        .update_with(
            &buckets,
            None,
            "held-data",
            &admin(),
            Subresource::Main,
            None,
            WriteOptions::default(),
            &mut release,
        )
        .await?;
    let gone = h.registry.get(&buckets, None, "held-data", &admin()).await;
    assert!(matches!(&gone, Err(e) if e.code == 404), "{gone:?}");
    let lease = index.mark_deleting("held-data").await?;
    index.unmark_deleting(lease).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreground_delete_spares_a_dependent_another_owner_keeps_and_waits_for_grandchildren(
) -> anyhow::Result<()> {
    let h = harness().await?;
    let owner = h.create("owner").await?;
    let keeper = h.create("keeper").await?;
    let reference = |name: &str, of: &Value| json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": name, "uid": of["metadata"]["uid"], "blockOwnerDeletion": true});
    let make = |name: &str, refs: Value, finalizers: Value| {
        let mut body = instance(name);
        body["metadata"]["ownerReferences"] = refs;
        body["metadata"]["finalizers"] = finalizers;
        body
    };
    let shared = make(
        "shared",
        json!([reference("owner", &owner), reference("keeper", &keeper)]),
        json!([]),
    );
    let child = make("child", json!([reference("owner", &owner)]), json!([]));
    for body in [shared, child] {
        h.registry
            .create(
                &h.instances,
                Some("acme"),
                body,
                &admin(),
                WriteOptions::default(),
            )
            .await?;
    }
    let child = h
        .registry
        .get(&h.instances, Some("acme"), "child", &admin())
        .await?;
    let grandchild = make(
        "grandchild",
        json!([reference("child", &child)]),
        json!(["example.com/hold"]),
    );
    h.registry
        .create(
            &h.instances,
            Some("acme"),
            grandchild,
            &admin(),
            WriteOptions::default(),
        )
        .await?;
    let mut rx = h.watch(Some(rv(&h
        .registry
        .get(&h.instances, Some("acme"), "grandchild", &admin())
        .await?)));

    let foreground = DeleteOptions {
        propagation: Propagation::Foreground,
        ..Default::default()
    };
    h.registry
        .delete(&h.instances, Some("acme"), "owner", &admin(), &foreground)
        .await?;
    // The child, which has a dependent of its own, is deleted in the foreground too; the
    // grandchild is deleted and held by its finalizer.
    loop {
        if let WatchEvent::Modified(o) = next_event(&mut rx).await? {
            if o.value["metadata"]["name"] == "grandchild"
                && o.value["metadata"]["deletionTimestamp"].is_string()
            {
                break;
            }
        }
    }
    let child = h
        .registry
        .get(&h.instances, Some("acme"), "child", &admin())
        .await?;
    assert_eq!(
        child["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    let owner = h
        .registry
        .get(&h.instances, Some("acme"), "owner", &admin())
        .await?;
    assert_eq!(
        owner["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    // The dependent that the keeper holds too stays, without its reference to the owner.
    let shared = h
        .registry
        .get(&h.instances, Some("acme"), "shared", &admin())
        .await?;
    assert!(
        shared["metadata"]["deletionTimestamp"].is_null(),
        "{shared}"
    );
    assert_eq!(
        shared["metadata"]["ownerReferences"]
            .as_array()
            .map(|r| r.iter().map(|r| r["name"].clone()).collect::<Vec<_>>()),
        Some(vec![json!("keeper")])
    );

    // The grandchild goes: then the child, then the owner.
    h.update("grandchild", Subresource::Main, &mut |cur: &Value| {
        let mut next = cur.clone();
        next["metadata"]["finalizers"] = json!([]);
        Ok(next)
    })
    .await?;
    let mut deleted = Vec::new();
    while !deleted.iter().any(|n| n == "owner") {
        if let WatchEvent::Deleted(o) = next_event(&mut rx).await? {
            deleted.push(
                o.value["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    assert_eq!(deleted, ["grandchild", "child", "owner"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_propagation_policy_asked_last_replaces_the_one_before() -> anyhow::Result<()> {
    let h = harness().await?;
    let mut body = instance("held");
    body["metadata"]["finalizers"] = json!(["example.com/hold"]);
    h.registry
        .create(
            &h.instances,
            Some("acme"),
            body,
            &admin(),
            WriteOptions::default(),
        )
        .await?;
    let finalizers_after = |propagation: Propagation| {
        let opts = DeleteOptions {
            propagation,
            ..Default::default()
        };
        let registry = h.registry.clone();
        let kind = h.instances.clone();
        async move {
            let marked = registry
                .delete(&kind, Some("acme"), "held", &admin(), &opts)
                .await?;
            anyhow::Ok(marked["metadata"]["finalizers"].clone())
        }
    };
    assert_eq!(
        finalizers_after(Propagation::Orphan).await?,
        json!(["example.com/hold", "orphan"])
    );
    assert_eq!(
        finalizers_after(Propagation::Foreground).await?,
        json!(["example.com/hold", "foregroundDeletion"])
    );
    assert_eq!(
        finalizers_after(Propagation::Orphan).await?,
        json!(["example.com/hold", "orphan"])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaning_delete_of_a_record_waiting_in_the_foreground_orphans_and_removes_it(
) -> anyhow::Result<()> {
    let h = harness().await?;
    let owner = h.create("owner").await?;
    let mut child = instance("child");
    child["metadata"]["ownerReferences"] = json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "owner", "uid": owner["metadata"]["uid"], "blockOwnerDeletion": true}]);
    // Held, so that the owner keeps waiting for it.
    child["metadata"]["finalizers"] = json!(["example.com/hold"]);
    h.registry
        .create(
            &h.instances,
            Some("acme"),
            child,
            &admin(),
            WriteOptions::default(),
        )
        .await?;
    let foreground = DeleteOptions {
        propagation: Propagation::Foreground,
        ..Default::default()
    };
    h.registry
        .delete(&h.instances, Some("acme"), "owner", &admin(), &foreground)
        .await?;
    let orphan = DeleteOptions {
        propagation: Propagation::Orphan,
        ..Default::default()
    };
    h.registry
        .delete(&h.instances, Some("acme"), "owner", &admin(), &orphan)
        .await?;
    let gone = h
        .registry
        .get(&h.instances, Some("acme"), "owner", &admin())
        .await;
    assert!(matches!(&gone, Err(e) if e.code == 404), "{gone:?}");
    let child = h
        .registry
        .get(&h.instances, Some("acme"), "child", &admin())
        .await?;
    assert!(
        child["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|r| r.is_empty()),
        "the dependent kept its owner reference: {child}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreground_delete_through_a_cycle_of_owners_completes() -> anyhow::Result<()> {
    let h = harness().await?;
    let a = h.create("a").await?;
    let mut b = instance("b");
    b["metadata"]["ownerReferences"] = json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "a", "uid": a["metadata"]["uid"], "blockOwnerDeletion": true}]);
    let b = h
        .registry
        .create(
            &h.instances,
            Some("acme"),
            b,
            &admin(),
            WriteOptions::default(),
        )
        .await?
        .object;
    // a is owned by b in turn.
    let b_ref = json!([{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "name": "b", "uid": b["metadata"]["uid"], "blockOwnerDeletion": true}]);
    let a = h
        .update("a", Subresource::Main, &mut |cur: &Value| {
            let mut next = cur.clone();
            next["metadata"]["ownerReferences"] = b_ref.clone();
            Ok(next)
        })
        .await?;
    let mut rx = h.watch(Some(rv(&a)));
    let foreground = DeleteOptions {
        propagation: Propagation::Foreground,
        ..Default::default()
    };
    h.registry
        .delete(&h.instances, Some("acme"), "a", &admin(), &foreground)
        .await?;
    let mut deleted = std::collections::BTreeSet::new();
    while deleted.len() < 2 {
        if let WatchEvent::Deleted(o) = next_event(&mut rx).await? {
            deleted.insert(
                o.value["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    assert_eq!(deleted.into_iter().collect::<Vec<_>>(), ["a", "b"]);
    Ok(())
}

/// Sets the state of instance `acme/name` to `state` on node-1, through `registry`.
async fn report(
    registry: &Registry,
    instances: &Kind,
    name: &str,
    state: &str,
) -> Result<(), ApiError> {
    let state = state.to_string();
    let mut change = move |cur: &Value| {
        let mut next = cur.clone();
        next["status"] = json!({"state": state, "nodeName": "node-1"});
        Ok(next)
    };
    registry
        .update_with(
            instances,
            Some("acme"),
            name,
            &admin(),
            Subresource::Status,
            None,
            WriteOptions::default(),
            &mut change,
        )
        .await
        .map(drop)
}

/// Shrinks instance type `t.fence` to one vCPU through `registry`, running `meanwhile` inside
/// the write, after the type was read and before the check of what holds room by it.
async fn shrink_fence(
    registry: &Registry,
    types: &Kind,
    mut meanwhile: impl FnMut() -> Result<(), ApiError> + Send,
) -> Result<Value, ApiError> {
    let mut change = move |cur: &Value| {
        meanwhile()?;
        let mut next = cur.clone();
        next["spec"]["vcpus"] = json!(1);
        Ok(next)
    };
    registry
        .update_with(
            types,
            None,
            "t.fence",
            &admin(),
            Subresource::Main,
            None,
            WriteOptions::default(),
            &mut change,
        )
        .await
        .map(|w| w.object)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_shrink_sees_an_instance_another_gateway_placed_while_it_was_prepared(
) -> anyhow::Result<()> {
    let h = harness().await?;
    // A second gateway on the same etcd: its writes reach this one's cache only by the watch.
    let (other, _) = start_registry(&h.client).await?;
    let types = h
        .registry
        .kinds
        .by_plural("instancetypes")
        .context("instancetypes kind")?;
    let size = json!({"apiVersion": "karri.dev/v1alpha1", "kind": "InstanceType",
        "metadata": {"name": "t.fence"},
        "spec": {"vcpus": 2, "memoryMiB": 512, "diskGiB": 1}});
    h.registry
        .create(&types, None, size, &admin(), WriteOptions::default())
        .await?;
    let runtime = tokio::runtime::Handle::current();
    for round in 0..20 {
        let name = format!("placed-{round}");
        let mut body = instance(&name);
        body["spec"]["instanceType"] = json!("t.fence");
        other
            .create(
                &h.instances,
                Some("acme"),
                body,
                &admin(),
                WriteOptions::default(),
            )
            .await?;
        // The other gateway places the instance while this one prepares the shrink.
        let mut placed = false;
        let place = || {
            if !placed {
                placed = true;
                tokio::task::block_in_place(|| {
                    runtime.block_on(report(&other, &h.instances, &name, "pending"))
                })?;
            }
            Ok(())
        };
        let refused = shrink_fence(&h.registry, &types, place).await;
        assert!(
            matches!(&refused, Err(e) if e.code == 409 && e.message.contains(&name)),
            "round {round}: {refused:?}"
        );
        // Terminated, it holds no room: the next round starts with none.
        report(&other, &h.instances, &name, "terminated").await?;
    }
    // With every instance terminated, the shrink goes through (its fence holds).
    let shrunk = shrink_fence(&h.registry, &types, || Ok(())).await?;
    assert_eq!(shrunk["spec"]["vcpus"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_instance_keeps_its_image_and_changes_type_only_when_stopped() -> anyhow::Result<()>
{
    let h = harness().await?;
    h.create("placed").await?;
    // Unplaced, anything may change.
    h.set_spec("placed", "imageId", "emi-0000000000000000a", None)
        .await?;
    report(&h.registry, &h.instances, "placed", "running").await?;
    for (field, value) in [
        ("imageId", "emi-0000000000000000b"),
        ("instanceType", "m1.medium"),
    ] {
        let refused = h.set_spec("placed", field, value, None).await;
        assert!(
            matches!(&refused, Err(e) if e.code == 422 && e.message.contains(&format!("spec.{field}"))),
            "{field}: {refused:?}"
        );
    }
    report(&h.registry, &h.instances, "placed", "stopped").await?;
    let resized = h
        .set_spec("placed", "instanceType", "m1.medium", None)
        .await?;
    assert_eq!(resized["spec"]["instanceType"], "m1.medium");
    let refused = h
        .set_spec("placed", "imageId", "emi-0000000000000000b", None)
        .await;
    assert!(matches!(&refused, Err(e) if e.code == 422), "{refused:?}");
    Ok(())
}
