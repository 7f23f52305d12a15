//! A kube-rs watcher (the machinery of every reflector and controller) against the gateway:
//! its cache stays correct across a gateway restart and across an etcd compaction, with no
//! change missed or delivered twice.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use crds::Instance;
use etcd_client::CompactionOptions;
use futures::{Stream, StreamExt};
use karri_testkit::{Etcd, Gateway, Tokens};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config, ResourceExt};
use serde_json::json;

const NS: &str = "acme";

async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn instance(name: &str) -> anyhow::Result<Instance> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small"}
    }))?)
}

/// The watcher's view, maintained exactly as a reflector maintains its store.
#[derive(Default)]
struct View {
    store: BTreeMap<String, String>,
    buffer: Option<BTreeMap<String, String>>,
    /// (name, resourceVersion) of every Apply/Delete outside a relist: must never repeat.
    delivered: Vec<(String, String)>,
    relists: usize,
}

impl View {
    fn apply(&mut self, ev: Event<Instance>) {
        match ev {
            Event::Init => self.buffer = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                if let Some(b) = self.buffer.as_mut() {
                    b.insert(o.name_any(), o.resource_version().unwrap_or_default());
                }
            }
            Event::InitDone => {
                self.store = self.buffer.take().unwrap_or_default();
                self.relists += 1;
            }
            Event::Apply(o) => {
                let rv = o.resource_version().unwrap_or_default();
                self.delivered.push((o.name_any(), rv.clone()));
                self.store.insert(o.name_any(), rv);
            }
            Event::Delete(o) => {
                self.delivered
                    .push((o.name_any(), o.resource_version().unwrap_or_default()));
                self.store.remove(&o.name_any());
            }
        }
    }

    fn assert_no_repeats(&self) -> anyhow::Result<()> {
        let mut seen = HashSet::new();
        for d in &self.delivered {
            if !seen.insert(d) {
                bail!("change {d:?} was delivered twice: {:?}", self.delivered);
            }
        }
        Ok(())
    }
}

/// How long the watcher must stay silent after the view matches the API for it to count as
/// settled: anything it still delivers then (a repeat, say) is read into the view.
const QUIET: Duration = Duration::from_millis(500);

/// Drive the watcher until the view's store equals what the API lists now and the watcher has
/// nothing more to say for [`QUIET`].
async fn converge(
    stream: &mut (impl Stream<Item = Result<Event<Instance>, watcher::Error>> + Unpin),
    view: &mut View,
    api: &Api<Instance>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let truth: BTreeMap<String, String> = api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .map(|o| (o.name_any(), o.resource_version().unwrap_or_default()))
            .collect();
        let settled = view.store == truth && view.buffer.is_none();
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the watcher did not converge: view {:?}, truth {truth:?}",
            view.store
        );
        let until = if settled {
            tokio::time::Instant::now() + QUIET
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, stream.next()).await {
            Err(_) if settled => return Ok(()),
            Err(_) => bail!(
                "the watcher did not converge: view {:?}, truth {truth:?}",
                view.store
            ),
            Ok(None) => bail!("the watcher stream ended"),
            Ok(Some(Ok(ev))) => view.apply(ev),
            Ok(Some(Err(e))) => ensure!(transient(&e), "the watcher failed: {e}"),
        }
    }
}

/// Whether a watcher error is one it recovers from by itself: the gateway unreachable while it
/// restarts (or not ready yet), or 410 Gone after a compaction, which makes it relist.
fn transient(e: &watcher::Error) -> bool {
    let retryable = |code: u16| matches!(code, 410 | 429 | 503 | 504);
    match e {
        watcher::Error::WatchError(status) => retryable(status.code),
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => match k {
            kube::Error::Api(status) => retryable(status.code),
            _ => true,
        },
        watcher::Error::NoResourceVersion => false,
    }
}

struct Cluster {
    etcd: Etcd,
    gateway: Gateway,
    tokens: Tokens,
    api: Api<Instance>,
}

async fn cluster() -> anyhow::Result<Cluster> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&["node-1"], &[NS]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let kc = gateway.kubeconfig(&tokens.admin, NS)?;
    let api = Api::namespaced(client(&kc).await?, NS);
    Ok(Cluster {
        etcd,
        gateway,
        tokens,
        api,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_cache_stays_correct_across_a_gateway_restart() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let api = c.api.clone();
    for name in ["a", "b", "c"] {
        api.create(&PostParams::default(), &instance(name)?).await?;
    }
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut view = View::default();
    converge(&mut stream, &mut view, &api).await?;
    assert_eq!(view.relists, 1);

    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"keyName": "k1"}})),
    )
    .await?;
    converge(&mut stream, &mut view, &api).await?;

    c.gateway.restart().await?;
    api.create(&PostParams::default(), &instance("d")?).await?;
    api.delete("b", &DeleteParams::default()).await?;
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await?;
    converge(&mut stream, &mut view, &api).await?;
    assert_eq!(
        view.store.keys().cloned().collect::<Vec<_>>(),
        ["a", "c", "d"]
    );
    assert_eq!(
        view.relists, 1,
        "the watch resumed from its resourceVersion without a relist"
    );
    view.assert_no_repeats()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_compaction_and_misses_nothing() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let api = c.api.clone();
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &instance(name)?).await?;
    }
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut view = View::default();
    converge(&mut stream, &mut view, &api).await?;
    assert_eq!(view.relists, 1);

    // While the watcher's gateway is down, another gateway on the same etcd changes records,
    // then etcd compacts away the history the watcher would resume from.
    // `other` starts first, so that it cannot be handed the stopped gateway's port and pass
    // for it.
    let other = Gateway::start(&c.etcd.endpoint, &c.tokens).await?;
    c.gateway.stop();
    let other_api: Api<Instance> =
        Api::namespaced(client(&other.kubeconfig(&c.tokens.admin, NS)?).await?, NS);
    other_api.delete("a", &DeleteParams::default()).await?;
    other_api
        .create(&PostParams::default(), &instance("e")?)
        .await?;
    other_api
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"keyName": "k9"}})),
        )
        .await?;
    let mut etcd = etcd_client::Client::connect([c.etcd.endpoint.clone()], None).await?;
    let rev = etcd
        .get("/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    etcd.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await?;
    drop(other);

    c.gateway.restart().await?;
    converge(&mut stream, &mut view, &api).await?;
    assert_eq!(view.relists, 2, "the 410 Gone made the watcher relist");
    assert_eq!(view.store.keys().cloned().collect::<Vec<_>>(), ["b", "e"]);

    api.create(&PostParams::default(), &instance("f")?).await?;
    converge(&mut stream, &mut view, &api).await?;
    view.assert_no_repeats()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_with_streaming_lists_gets_the_state_from_initial_events() -> anyhow::Result<()> {
    let c = cluster().await?;
    let api = c.api.clone();
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &instance(name)?).await?;
    }
    // sendInitialEvents=true: no list call, the watch itself streams the state, ending with a
    // bookmark marked k8s.io/initial-events-end.
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default().streaming_lists())
        .default_backoff()
        .boxed();
    let mut view = View::default();
    converge(&mut stream, &mut view, &api).await?;
    assert_eq!(view.relists, 1);
    assert_eq!(view.store.keys().cloned().collect::<Vec<_>>(), ["a", "b"]);
    api.delete("a", &DeleteParams::default()).await?;
    api.create(&PostParams::default(), &instance("c")?).await?;
    converge(&mut stream, &mut view, &api).await?;
    assert_eq!(view.store.keys().cloned().collect::<Vec<_>>(), ["b", "c"]);
    view.assert_no_repeats()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_asking_for_no_initial_events_gets_none_and_must_say_not_older_than(
) -> anyhow::Result<()> {
    let c = cluster().await?;
    let kc = c.gateway.kubeconfig(&c.tokens.admin, NS)?;
    let client = client(&kc).await?;
    for name in ["a", "b"] {
        c.api
            .create(&PostParams::default(), &instance(name)?)
            .await?;
    }
    let path = format!("/apis/karri.dev/v1alpha1/namespaces/{NS}/instances");
    let get = |query: &str| {
        http::Request::get(format!("{path}?{query}"))
            .body(Vec::new())
            .context("a request")
    };
    // What exists is not sent as ADDED; the watch ends by its timeout with nothing to say.
    let text = client
        .request_text(get(
            "watch=1&sendInitialEvents=false&resourceVersionMatch=NotOlderThan&timeoutSeconds=1",
        )?)
        .await?;
    ensure!(
        !text.contains("\"ADDED\""),
        "initial events were sent: {text}"
    );
    // As in Kubernetes, the parameter goes with resourceVersionMatch=NotOlderThan only.
    let refused = client
        .request_text(get("watch=1&sendInitialEvents=false&timeoutSeconds=1")?)
        .await;
    match refused {
        Err(kube::Error::Api(status)) => {
            ensure!(status.code == 422, "{status:?}");
            ensure!(status.message.contains("NotOlderThan"), "{status:?}");
        }
        other => bail!("expected 422 Invalid, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_tells_kube_rs_whether_the_record_is_gone_or_still_held() -> anyhow::Result<()> {
    let c = cluster().await?;
    // Removed at once: a Success Status naming it (kube-rs's `Right`).
    let made = c
        .api
        .create(&PostParams::default(), &instance("quick")?)
        .await?;
    let answer = c.api.delete("quick", &DeleteParams::default()).await?;
    let Some(status) = answer.right() else {
        bail!("an immediate delete answered the record, not a Status");
    };
    let details = status.details.context("a Status without details")?;
    ensure!(
        status.status == Some(kube::core::response::StatusSummary::Success)
            && details.name == "quick"
            && details.kind == "instances"
            && details.group == "karri.dev"
            && Some(details.uid.clone()) == made.uid(),
        "the Status of an immediate delete: {details:?}"
    );
    // Held by a finalizer: the record, terminating (kube-rs's `Left`).
    let mut held = instance("held")?;
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    c.api.create(&PostParams::default(), &held).await?;
    let answer = c.api.delete("held", &DeleteParams::default()).await?;
    let Some(obj) = answer.left() else {
        bail!("a delete held by a finalizer answered a Status, not the record");
    };
    ensure!(
        obj.metadata.deletion_timestamp.is_some(),
        "the held record is not terminating: {obj:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_only_clients_get_partial_object_metadata() -> anyhow::Result<()> {
    let c = cluster().await?;
    c.api
        .create(&PostParams::default(), &instance("meta-1")?)
        .await?;
    // kube-rs's metadata API asks for PartialObjectMetadata(List) and reads it.
    let listed = c.api.list_metadata(&Default::default()).await?;
    let names: Vec<String> = listed.items.iter().map(|m| m.name_any()).collect();
    ensure!(names == ["meta-1"], "list_metadata: {names:?}");
    let one = c.api.get_metadata("meta-1").await?;
    ensure!(one.name_any() == "meta-1", "get_metadata: {one:?}");
    // What it is sent is metadata only, in meta.k8s.io's kinds (client-go's metadata client
    // refuses anything else on a watch).
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            c.gateway.ca_path(),
        )?)?)
        .build()?;
    let accept =
        "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json";
    let raw: serde_json::Value = http
        .get(format!(
            "{}/apis/karri.dev/v1alpha1/namespaces/{NS}/instances",
            c.gateway.url()
        ))
        .bearer_auth(&c.tokens.admin)
        .header("Accept", accept)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        raw["kind"] == "PartialObjectMetadataList"
            && raw["apiVersion"] == "meta.k8s.io/v1"
            && raw["items"][0]["kind"] == "PartialObjectMetadata"
            && raw["items"][0].get("spec").is_none(),
        "a metadata list: {raw}"
    );
    // A watch with that Accept header sends metadata only too.
    let since = raw["metadata"]["resourceVersion"]
        .as_str()
        .context("the list has no resourceVersion")?
        .to_owned();
    c.api
        .create(&PostParams::default(), &instance("meta-2")?)
        .await?;
    let watched = http
        .get(format!(
            "{}/apis/karri.dev/v1alpha1/namespaces/{NS}/instances?watch=true&resourceVersion={since}&timeoutSeconds=1",
            c.gateway.url()
        ))
        .bearer_auth(&c.tokens.admin)
        .header(
            "Accept",
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json",
        )
        .send()
        .await?
        .text()
        .await?;
    let events: Vec<serde_json::Value> = watched
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        events.len() == 1
            && events[0]["type"] == "ADDED"
            && events[0]["object"]["kind"] == "PartialObjectMetadata"
            && events[0]["object"]["metadata"]["name"] == "meta-2"
            && events[0]["object"].get("spec").is_none(),
        "a metadata watch: {watched}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_discovery_finds_every_kind_and_drives_a_dynamic_api() -> anyhow::Result<()> {
    use kube::core::{DynamicObject, GroupVersionKind};
    use kube::discovery::{self, Discovery};
    let c = cluster().await?;
    let kc = c.gateway.kubeconfig(&c.tokens.admin, NS)?;
    let client = client(&kc).await?;
    // Discovery reads /api (the core group) as well as /apis.
    let found = Discovery::new(client.clone()).run().await?;
    let group = found
        .get(crds::GROUP)
        .context("discovery did not find karri.dev")?;
    let kinds: HashSet<String> = group
        .recommended_resources()
        .into_iter()
        .map(|(r, _)| r.kind)
        .collect();
    for kind in ["Instance", "Node", "KeyPair", "Image"] {
        ensure!(kinds.contains(kind), "discovery lacks {kind}: {kinds:?}");
    }
    // An API built from what discovery found, with no Rust type.
    let gvk = GroupVersionKind::gvk(crds::GROUP, crds::VERSION, "Instance");
    let (resource, _) = discovery::pinned_kind(&client, &gvk).await?;
    let api: Api<DynamicObject> = Api::namespaced_with(client, NS, &resource);
    let made = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::to_value(instance("dyn")?)?)?,
        )
        .await?;
    ensure!(made.name_any() == "dyn", "created {made:?}");
    ensure!(
        api.list(&Default::default()).await?.items.len() == 1,
        "the dynamic API lists what it made"
    );
    Ok(())
}
