//! Combined creates against a real etcd.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use api_gateway::combined_creates::{CombinedCreates, Outcome, MAX_BYTES};
use etcd_client::{Client, GetOptions};
use futures::future::join_all;
use karri_testkit::Etcd;

/// Every key under `/t/` and its value.
async fn stored(client: &Client) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let resp = client
        .kv_client()
        .get("/t/", Some(GetOptions::new().with_prefix()))
        .await?;
    resp.kvs()
        .iter()
        .map(|kv| Ok((kv.key_str()?.to_string(), kv.value().to_vec())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_share_transactions_and_each_commits_all_of_its_keys(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let creates = CombinedCreates::start(client.clone());
    // 300 creates of three keys each (a record, its ID entry, a unique value), at once.
    let asks: Vec<Vec<(String, Vec<u8>)>> = (0..300)
        .map(|i| {
            vec![
                (
                    format!("/t/records/r{i}"),
                    format!("record {i}").into_bytes(),
                ),
                (
                    format!("/t/ids/i{i}"),
                    format!("/t/records/r{i}").into_bytes(),
                ),
                (
                    format!("/t/unique/u{i}"),
                    format!("/t/records/r{i}").into_bytes(),
                ),
            ]
        })
        .collect();
    let outcomes = join_all(asks.iter().map(|a| creates.create(a.clone()))).await;
    let keys = stored(&client).await?;
    for (ask, outcome) in asks.iter().zip(outcomes) {
        let Outcome::Committed(rev) = outcome? else {
            panic!("{} was not committed", ask[0].0);
        };
        for (key, value) in ask {
            assert_eq!(keys.get(key), Some(value), "{key}");
        }
        // The outcome's revision is the one its keys were written at.
        let written = client.kv_client().get(ask[0].0.as_str(), None).await?;
        let mod_rev = written.kvs().first().map(|kv| kv.mod_revision());
        assert_eq!(mod_rev, Some(rev), "{}", ask[0].0);
    }
    assert_eq!(keys.len(), 900);
    let stats = creates.stats();
    let (asked, sent) = (
        stats.creates.load(Ordering::Relaxed),
        stats.requests.load(Ordering::Relaxed),
    );
    assert_eq!(asked, 300);
    assert!(sent * 3 <= asked, "{sent} transactions for {asked} creates");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_key_is_taken_writes_nothing_and_the_others_of_its_batch_commit(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    client
        .kv_client()
        .put("/t/records/taken", "first", None)
        .await?;
    let creates = CombinedCreates::start(client.clone());
    // Among 200 creates at once: every tenth names a record that already exists, and
    // creates 1 and 2 (and 3 and 4 …) claim the same unique value.
    let asks: Vec<Vec<(String, Vec<u8>)>> = (0..200)
        .map(|i| {
            let record = if i % 10 == 0 {
                "/t/records/taken".to_string()
            } else {
                format!("/t/records/r{i}")
            };
            vec![
                (record, format!("record {i}").into_bytes()),
                (format!("/t/ids/i{i}"), b"id".to_vec()),
                (
                    format!("/t/unique/u{}", (i + 1) / 2),
                    format!("{i}").into_bytes(),
                ),
            ]
        })
        .collect();
    let outcomes: Vec<Outcome> = join_all(asks.iter().map(|a| creates.create(a.clone())))
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let keys = stored(&client).await?;
    assert_eq!(keys.get("/t/records/taken"), Some(&b"first".to_vec()));
    for (i, (ask, outcome)) in asks.iter().zip(&outcomes).enumerate() {
        match outcome {
            Outcome::Committed(_) => {
                assert_ne!(i % 10, 0, "create {i} named a taken record");
                for (key, value) in ask {
                    assert_eq!(keys.get(key), Some(value), "create {i}: {key}");
                }
            }
            Outcome::Taken => {
                // Nothing of it is written: its ID entry is not there.
                assert_eq!(keys.get(&ask[1].0), None, "create {i} left its ID entry");
            }
        }
    }
    // Of two creates claiming one unique value, exactly one holds it, unless the record
    // of both was taken.
    for pair in 1..100 {
        let (a, b) = (2 * pair - 1, 2 * pair);
        let committed = [a, b]
            .iter()
            .filter(|&&i| outcomes[i] != Outcome::Taken)
            .count();
        let possible = [a, b].iter().filter(|&&i| i % 10 != 0).count().min(1);
        assert_eq!(committed, possible, "creates {a} and {b}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_too_large_to_combine_goes_alone_among_small_ones() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let creates = CombinedCreates::start(client.clone());
    let big = vec![b'x'; MAX_BYTES + 1024];
    let mut asks: Vec<Vec<(String, Vec<u8>)>> = (0..40)
        .map(|i| vec![(format!("/t/small/s{i}"), b"small".to_vec())])
        .collect();
    asks.insert(20, vec![("/t/big".to_string(), big.clone())]);
    asks.insert(21, vec![("/t/big2".to_string(), big.clone())]);
    let outcomes = join_all(asks.iter().map(|a| creates.create(a.clone()))).await;
    let mut revisions = Vec::new();
    for (ask, outcome) in asks.iter().zip(outcomes) {
        let Outcome::Committed(rev) = outcome? else {
            panic!("{} was not committed", ask[0].0);
        };
        revisions.push((ask[0].0.clone(), rev));
    }
    let keys = stored(&client).await?;
    assert_eq!(keys.get("/t/big"), Some(&big));
    assert_eq!(keys.get("/t/big2"), Some(&big));
    assert_eq!(keys.len(), 42);
    // Each big one went in a transaction of its own.
    for big_key in ["/t/big", "/t/big2"] {
        let (_, big_rev) = revisions
            .iter()
            .find(|(k, _)| k == big_key)
            .expect("the big create is among the asks");
        let shared: Vec<&String> = revisions
            .iter()
            .filter(|(k, rev)| k != big_key && rev == big_rev)
            .map(|(k, _)| k)
            .collect();
        assert!(
            shared.is_empty(),
            "{big_key} shared its revision with {shared:?}"
        );
    }
    Ok(())
}

/// Sends SIGSTOP or SIGCONT to `pid`.
fn signal(pid: u32, which: &str) -> anyhow::Result<()> {
    let done = std::process::Command::new("kill")
        .args([format!("-{which}"), pid.to_string()])
        .status()?;
    anyhow::ensure!(done.success(), "kill -{which} {pid} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_dropped_while_etcd_works_on_them_give_their_slots_back() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let creates = CombinedCreates::start(client.clone());
    // Each of these takes a slot, sends its transaction and is dropped before etcd answers
    // (a client that went away): more of them than there are slots.
    let mut dropped = 0;
    for i in 0..100 {
        let entry = vec![(format!("/t/dropped/d{i}"), b"d".to_vec())];
        if tokio::time::timeout(Duration::ZERO, creates.create(entry))
            .await
            .is_err()
        {
            dropped += 1;
        }
        if dropped == 10 {
            break;
        }
    }
    assert_eq!(dropped, 10, "creates kept finishing at their first poll");
    assert_eq!(creates.in_flight(), 0, "dropped creates kept their slots");
    // Creates still go through, promptly.
    let later = (0..20).map(|i| {
        let creates = creates.clone();
        async move {
            let entry = vec![(format!("/t/later/l{i}"), b"l".to_vec())];
            tokio::time::timeout(Duration::from_secs(5), creates.create(entry)).await
        }
    });
    for (i, outcome) in join_all(later).await.into_iter().enumerate() {
        assert!(
            matches!(outcome, Ok(Ok(Outcome::Committed(_)))),
            "create {i} after the dropped ones: {outcome:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_create_whose_caller_gave_up_is_never_written() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint.clone()], None).await?;
    let creates = CombinedCreates::start(client.clone());
    let pid = etcd.pid().expect("etcd runs");
    signal(pid, "STOP")?;
    // Two creates hold both slots while etcd is stopped; a third queues behind them and its
    // caller gives up.
    let holders: Vec<_> = (0..2)
        .map(|i| {
            let creates = creates.clone();
            tokio::spawn(async move {
                creates
                    .create(vec![(format!("/t/held/h{i}"), b"h".to_vec())])
                    .await
            })
        })
        .collect();
    while creates.in_flight() < 2 {
        tokio::task::yield_now().await;
    }
    let given_up = tokio::time::timeout(
        Duration::from_millis(200),
        creates.create(vec![("/t/given-up".to_string(), b"g".to_vec())]),
    )
    .await;
    assert!(
        given_up.is_err(),
        "the queued create answered: {given_up:?}"
    );
    signal(pid, "CONT")?;
    for h in holders {
        assert!(matches!(h.await?, Ok(Outcome::Committed(_))));
    }
    // A create queued after it goes out after it would have.
    let after = creates
        .create(vec![("/t/after".to_string(), b"a".to_vec())])
        .await?;
    assert!(matches!(after, Outcome::Committed(_)));
    let keys = stored(&client).await?;
    assert!(keys.contains_key("/t/after"));
    assert!(
        !keys.contains_key("/t/given-up"),
        "a create whose caller gave up was written"
    );
    Ok(())
}
