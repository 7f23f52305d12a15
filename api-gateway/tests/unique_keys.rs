//! Values the gateway keeps unique across records (account IDs, access key IDs, key pair names,
//! RunInstances client tokens) and the secrets it seals, against a real etcd.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use api_gateway::auth::Principal;
use api_gateway::aws::credentials::Sealer;
use api_gateway::cache::HistoryLimits;
use api_gateway::kinds::Kinds;
use api_gateway::metrics::Metrics;
use api_gateway::registry::{DeleteOptions, Registry, WriteOptions};
use etcd_client::Client;
use karri_testkit::Etcd;
use serde_json::{json, Value};

fn admin() -> Principal {
    Principal::Admin("admin".into())
}

const KEY: [u8; 32] = [9; 32];

async fn registry() -> anyhow::Result<(Etcd, Client, Arc<Registry>)> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let registry = Registry::start(
        client.clone(),
        Kinds::load(),
        HistoryLimits {
            events: 1000,
            ..HistoryLimits::default()
        },
        Arc::new(Metrics::new()),
        Some(Arc::new(Sealer::new(&KEY))),
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
    Ok((etcd, client, registry))
}

fn key_pair(name: &str, key_name: &str) -> Value {
    json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "KeyPair",
        "metadata": {"name": name},
        "spec": {"keyName": key_name, "keyType": "ed25519",
                 "publicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKHnc2vSLJAEqjplP3WP12DlDNrh0g1XYeMkmjX4NKfx"}
    })
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_gets_a_twelve_digit_id_and_its_own_namespace() -> anyhow::Result<()> {
    let (_etcd, _client, registry) = registry().await?;
    let kind = registry.kinds.by_kind("Account").context("kind")?;
    let body = json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Account",
                      "metadata": {"name": "research"}, "spec": {}});
    let made = registry
        .create(&kind, None, body, &admin(), WriteOptions::default())
        .await?
        .object;
    let id = text(&made, "/status/accountId");
    ensure!(crds::is_valid_account_id(id), "account ID {id:?}");
    ensure!(text(&made, "/status/namespace") == "research");
    let stored = registry.get(&kind, None, "research", &admin()).await?;
    ensure!(text(&stored, "/status/accountId") == id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_key_secret_is_shown_once_and_stored_only_sealed() -> anyhow::Result<()> {
    let (_etcd, client, registry) = registry().await?;
    let kind = registry.kinds.by_kind("AccessKey").context("kind")?;
    let body = json!({"apiVersion": "karri.dev/v1alpha1", "kind": "AccessKey",
                      "metadata": {"name": "ci"}, "spec": {"accountName": "research"}});
    // No key for an account that does not exist.
    let refused = registry
        .create(&kind, None, body.clone(), &admin(), WriteOptions::default())
        .await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.code == 422 && e.message.contains("no account")),
        "{refused:?}"
    );
    let accounts = registry.kinds.by_kind("Account").context("kind")?;
    let account = registry
        .create(
            &accounts,
            None,
            json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Account",
                   "metadata": {"name": "research"}, "spec": {}}),
            &admin(),
            WriteOptions::default(),
        )
        .await?
        .object;
    let made = registry
        .create(&kind, None, body, &admin(), WriteOptions::default())
        .await?
        .object;
    ensure!(
        text(&made, "/status/accountUid") == text(&account, "/metadata/uid"),
        "the key is not bound to the account's UID"
    );
    let id = text(&made, "/status/accessKeyId").to_string();
    let secret = text(&made, "/status/secretAccessKey").to_string();
    ensure!(id.starts_with("AKIK") && id.len() == 20, "key id {id:?}");
    ensure!(secret.len() == 40, "secret {secret:?}");
    let stored = registry.get(&kind, None, "ci", &admin()).await?;
    ensure!(stored.pointer("/status/secretAccessKey").is_none());
    let sealed = text(&stored, "/status/sealedSecret");
    let account_name = text(&stored, "/spec/accountName");
    let context = api_gateway::aws::credentials::access_key_context(&id, account_name);
    let opened = Sealer::new(&KEY).open(sealed, &context)?;
    ensure!(opened.secret == secret && !opened.legacy);
    // Sealed for this key alone: for another ID it does not open.
    let other =
        api_gateway::aws::credentials::access_key_context("AKIKAAAAAAAAAAAAAAAA", account_name);
    ensure!(Sealer::new(&KEY).open(sealed, &other).is_err());
    // Nowhere in etcd is the secret in the clear.
    let mut kv = client.kv_client();
    let all = kv
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await?;
    for pair in all.kvs() {
        ensure!(
            !String::from_utf8_lossy(pair.value()).contains(&secret),
            "the secret is stored in the clear under {}",
            String::from_utf8_lossy(pair.key())
        );
    }
    // Every signed request looks its key up: the watch cache finds it by its ID.
    let rev: i64 = text(&made, "/metadata/resourceVersion").parse()?;
    ensure!(registry.cache.wait_for(rev, Duration::from_secs(5)).await);
    let cached = registry
        .cache
        .by_id(&id)
        .context("the key is not in the cache by ID")?;
    ensure!(text(&cached.value, "/status/sealedSecret") == sealed);

    // A secret sealed before secrets were bound to their key still signs in, and is sealed
    // again, bound, on that first use.
    let legacy = {
        use aes_gcm::aead::{Aead as _, KeyInit as _};
        use base64::Engine as _;
        let nonce = [5u8; 12];
        let body = aes_gcm::Aes256Gcm::new((&KEY).into())
            .encrypt(aes_gcm::Nonce::from_slice(&nonce), secret.as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        base64::engine::general_purpose::STANDARD.encode([nonce.to_vec(), body].concat())
    };
    registry
        .update_with(
            &kind,
            None,
            "ci",
            &admin(),
            api_gateway::admission::Subresource::Status,
            None,
            WriteOptions::default(),
            &mut |current: &serde_json::Value| {
                let mut next = current.clone();
                next["status"]["sealedSecret"] = json!(legacy);
                Ok(next)
            },
        )
        .await?;
    registry.catch_up().await?;
    let (_, caller) = api_gateway::ec2::service::resolve_access_key(&registry, &id)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(caller.account == "research", "{caller:?}");
    let resealed = registry.get(&kind, None, "ci", &admin()).await?;
    let now = text(&resealed, "/status/sealedSecret");
    ensure!(now != legacy, "the legacy secret was not sealed again");
    let opened = Sealer::new(&KEY).open(now, &context)?;
    ensure!(opened.secret == secret && !opened.legacy);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_pair_name_is_unique_per_namespace_and_freed_by_deletion() -> anyhow::Result<()> {
    let (_etcd, _client, registry) = registry().await?;
    let kind = registry.kinds.by_kind("KeyPair").context("kind")?;
    let opts = WriteOptions::default();
    registry
        .create(
            &kind,
            Some("a"),
            key_pair("one", "my key"),
            &admin(),
            opts.clone(),
        )
        .await?;
    let again = registry
        .create(
            &kind,
            Some("a"),
            key_pair("two", "my key"),
            &admin(),
            opts.clone(),
        )
        .await;
    match again {
        Err(e) => ensure!(
            e.code == 409 && e.message.contains("key pair name \"my key\""),
            "{e:?}"
        ),
        Ok(_) => bail!("a second key pair named \"my key\" was created"),
    }
    registry
        .create(
            &kind,
            Some("b"),
            key_pair("one", "my key"),
            &admin(),
            opts.clone(),
        )
        .await
        .context("the same name in another namespace")?;
    registry
        .delete(&kind, Some("a"), "one", &admin(), &DeleteOptions::default())
        .await?;
    registry
        .create(
            &kind,
            Some("a"),
            key_pair("two", "my key"),
            &admin(),
            opts.clone(),
        )
        .await
        .context("the name is free again after deletion")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_images_of_one_name_in_a_namespace_cannot_both_be_made() -> anyhow::Result<()> {
    let (_etcd, _client, registry) = registry().await?;
    let kind = registry.kinds.by_kind("Image").context("kind")?;
    let image = |id: &str| {
        json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Image",
               "metadata": {"name": id},
               "spec": {"name": "web-2026", "imageLocation": "/images/web.img",
                        "architecture": "x86_64"}})
    };
    let opts = WriteOptions::default();
    let who = admin();
    let (one, two) = tokio::join!(
        registry.create(
            &kind,
            Some("a"),
            image("emi-00000000000000001"),
            &who,
            opts.clone()
        ),
        registry.create(
            &kind,
            Some("a"),
            image("emi-00000000000000002"),
            &who,
            opts.clone()
        ),
    );
    let refused: Vec<_> = [one, two].into_iter().filter_map(Result::err).collect();
    ensure!(
        refused.len() == 1
            && refused[0].code == 409
            && refused[0].message.contains("image name \"web-2026\""),
        "{refused:?}"
    );
    registry
        .create(
            &kind,
            Some("b"),
            image("emi-00000000000000003"),
            &who,
            opts.clone(),
        )
        .await
        .context("the same name in another namespace")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_created_whole_or_not_at_all() -> anyhow::Result<()> {
    let (_etcd, _client, registry) = registry().await?;
    let kind = registry.kinds.by_kind("Instance").context("kind")?;
    let instance = |i: u32| {
        json!({"apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
               "metadata": {"generateName": "web-"},
               "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small",
                        "clientToken": "token-1", "reservationId": "r-0123456789abcdef0",
                        "launchIndex": i}})
    };
    let made = registry
        .create_all(
            &kind,
            Some("a"),
            (0..3).map(instance).collect(),
            &admin(),
            WriteOptions::default(),
        )
        .await?;
    ensure!(made.len() == 3);
    // The same client token again: nothing of the second batch is stored.
    let again = registry
        .create_all(
            &kind,
            Some("a"),
            (0..3).map(instance).collect(),
            &admin(),
            WriteOptions::default(),
        )
        .await;
    ensure!(again.is_err_and(|e| e.code == 409));
    let listed = registry
        .list(&kind, Some("a"), &admin(), &Default::default())
        .await?;
    ensure!(listed.items.len() == 3, "{} instances", listed.items.len());
    // The token may not be changed afterwards.
    let name = text(&made[0].object, "/metadata/name").to_string();
    let changed = registry
        .update_with(
            &kind,
            Some("a"),
            &name,
            &admin(),
            api_gateway::admission::Subresource::Main,
            None,
            WriteOptions::default(),
            &mut |cur: &Value| {
                let mut next = cur.clone();
                next["spec"]["clientToken"] = json!("token-2");
                Ok(next)
            },
        )
        .await;
    ensure!(changed.is_err_and(|e| e.code == 422), "the token changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_cache_finds_records_by_id_until_they_are_deleted() -> anyhow::Result<()> {
    let (_etcd, _client, registry) = registry().await?;
    let kind = registry.kinds.by_kind("KeyPair").context("kind")?;
    let made = registry
        .create(
            &kind,
            Some("a"),
            key_pair("one", "k"),
            &admin(),
            WriteOptions::default(),
        )
        .await?
        .object;
    let id = made
        .pointer("/metadata/labels/karri.dev~1id")
        .and_then(Value::as_str)
        .context("id label")?
        .to_string();
    let rev: i64 = text(&made, "/metadata/resourceVersion").parse()?;
    ensure!(registry.cache.wait_for(rev, Duration::from_secs(5)).await);
    let cached = registry
        .cache
        .by_id(&id)
        .context("not in the cache by ID")?;
    ensure!(text(&cached.value, "/spec/keyName") == "k");
    registry
        .delete(&kind, Some("a"), "one", &admin(), &DeleteOptions::default())
        .await?;
    let now = registry.current_revision().await?;
    ensure!(registry.cache.wait_for(now, Duration::from_secs(5)).await);
    ensure!(
        registry.cache.by_id(&id).is_none(),
        "still found after deletion"
    );
    ensure!(registry.lookup_id(&id).await?.is_none());
    Ok(())
}
