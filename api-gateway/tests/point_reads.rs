//! Coalesced point reads against a real etcd.

use std::sync::atomic::Ordering;

use api_gateway::point_reads::PointReads;
use etcd_client::Client;
use futures::future::join_all;
use karri_testkit::Etcd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_point_reads_share_requests_and_each_gets_its_own_answer() -> anyhow::Result<()>
{
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let mut kv = client.kv_client();
    let mut last_write = 0;
    for i in 0..300 {
        let w = kv.put(format!("/t/k{i}"), format!("v{i}"), None).await?;
        last_write = w.header().map(|h| h.revision()).unwrap_or(i64::MAX);
    }
    let reads = PointReads::start(client.clone());
    // 300 keys that exist, 50 that do not, and one read etcd refuses (an empty key), all at
    // once: the refused one fails its batch, and the others of that batch read alone.
    let mut keys: Vec<String> = (0..350).map(|i| format!("/t/k{i}")).collect();
    keys.insert(123, String::new());
    let answers = join_all(keys.iter().map(|k| reads.get(k.clone()))).await;
    for (key, answer) in keys.iter().zip(&answers) {
        if key.is_empty() {
            assert!(answer.is_err(), "etcd refuses a read of the empty key");
            continue;
        }
        let resp = answer.as_ref().map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        let read_at = resp.header().map(|h| h.revision()).unwrap_or(0);
        assert!(read_at >= last_write, "{key} read at {read_at}");
        let i: usize = key["/t/k".len()..].parse()?;
        match resp.kvs().first() {
            Some(kv) => {
                assert!(i < 300, "{key} does not exist");
                assert_eq!(kv.key(), key.as_bytes());
                assert_eq!(kv.value(), format!("v{i}").as_bytes());
            }
            None => assert!(i >= 300, "{key} exists"),
        }
    }
    let stats = reads.stats();
    let (asked, sent) = (
        stats.reads.load(Ordering::Relaxed),
        stats.requests.load(Ordering::Relaxed),
    );
    assert_eq!(asked, 351);
    // Alone each read would be a request of its own; the failed batch's reads are counted
    // again when they read alone.
    assert!(sent * 3 <= asked, "{sent} requests for {asked} reads");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_read_sees_every_write_that_finished_before_it() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let reads = PointReads::start(client.clone());
    let mut kv = client.kv_client();
    for round in 0..50 {
        let written = kv.put("/t/counter", round.to_string(), None).await?;
        let written_at = written.header().map(|h| h.revision()).unwrap_or(i64::MAX);
        // Other reads keep the reader busy, so this one may go out in a batch.
        let (mine, _others) = tokio::join!(
            reads.get("/t/counter"),
            join_all((0..20).map(|i| reads.get(format!("/t/other{i}"))))
        );
        let resp = mine?;
        let value = resp.kvs().first().map(|kv| kv.value().to_vec());
        assert_eq!(value, Some(round.to_string().into_bytes()), "round {round}");
        // Its header carries etcd's revision at the read, in a batch too (the registry's
        // read-your-writes waits for the cache to reach it).
        let read_at = resp.header().map(|h| h.revision()).unwrap_or(0);
        assert!(
            read_at >= written_at,
            "read at {read_at}, written at {written_at}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_several_keys_share_batches_and_answer_each_key_in_order() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let mut kv = client.kv_client();
    for i in 0..100 {
        kv.put(format!("/t/k{i}"), format!("v{i}"), None).await?;
    }
    let reads = PointReads::start(client.clone());
    // Pairs, triples and single keys at once, more keys than one batch holds: each reader
    // gets the answers of its own keys, in the order it asked for them, all from one
    // revision.
    let asks: Vec<Vec<String>> = (0..100)
        .map(|i| {
            (0..=i % 3)
                .map(|j| format!("/t/k{}", (i * 7 + j * 13) % 120))
                .collect()
        })
        .collect();
    let answers = join_all(
        asks.iter()
            .map(|keys| reads.get_many(keys.iter().map(|k| k.clone().into_bytes()).collect())),
    )
    .await;
    for (keys, answer) in asks.iter().zip(answers) {
        let answer = answer?;
        assert_eq!(answer.len(), keys.len(), "{keys:?}");
        let revisions: Vec<i64> = answer
            .iter()
            .map(|r| r.header().map(|h| h.revision()).unwrap_or(0))
            .collect();
        assert!(
            revisions.windows(2).all(|w| w[0] == w[1]),
            "{keys:?} {revisions:?}"
        );
        for (key, resp) in keys.iter().zip(&answer) {
            let i: usize = key["/t/k".len()..].parse()?;
            let value = resp.kvs().first().map(|kv| kv.value().to_vec());
            let expected = (i < 100).then(|| format!("v{i}").into_bytes());
            assert_eq!(value, expected, "{key}");
        }
    }
    let sent = reads.stats().requests.load(Ordering::Relaxed);
    assert!(sent <= 50, "{sent} requests for 100 reads of 200 keys");
    Ok(())
}
