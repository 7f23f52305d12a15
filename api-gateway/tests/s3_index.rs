//! The S3 object index on a real etcd: writes that add to a bucket need its record and no
//! deletion under way; a multipart completion swaps the upload for the object in one
//! transaction; an abort hands back the parts whose blobs must go.

use std::collections::BTreeMap;

use api_gateway::s3::index::{
    BucketSeen, CompletionHolds, Expect, IndexError, ObjectIndex, ObjectMeta, PartMeta, Segment,
    UploadMeta,
};
use api_gateway::store;
use etcd_client::Client;
use karri_testkit::Etcd;

fn object(blob: &str, size: u64) -> ObjectMeta {
    ObjectMeta {
        segments: vec![Segment {
            blob: blob.into(),
            size,
        }],
        size,
        etag: "d41d8cd98f00b204e9800998ecf8427e".into(),
        last_modified_ms: 0,
        headers: Default::default(),
        metadata: BTreeMap::new(),
        acl: Default::default(),
        tags: Vec::new(),
        parts_count: None,
        upload_id: None,
        checksum: None,
    }
}

fn part(blob: &str) -> PartMeta {
    PartMeta {
        blob: blob.into(),
        size: 5 << 20,
        etag: "aa".into(),
        last_modified_ms: 0,
    }
}

fn upload(key: &str) -> UploadMeta {
    UploadMeta {
        key: key.into(),
        initiated_ms: 0,
        initiator: "111111111111".into(),
        headers: Default::default(),
        metadata: BTreeMap::new(),
        acl: Default::default(),
        tags: Vec::new(),
    }
}

/// The bucket record `photos` as a request sees it: its key and the revision it was read at.
struct Seen {
    record: String,
    revision: i64,
}

impl Seen {
    fn it(&self) -> BucketSeen<'_> {
        BucketSeen {
            record: &self.record,
            revision: self.revision,
        }
    }
}

async fn setup() -> anyhow::Result<(Etcd, ObjectIndex, Client, Seen)> {
    let etcd = Etcd::start().await?;
    let mut client = Client::connect([etcd.endpoint.as_str()], None).await?;
    let record = store::record_key("buckets", None, "photos");
    let put = client.put(record.clone(), "{}", None).await?;
    let revision = put.header().map(|h| h.revision()).unwrap_or(0);
    Ok((
        etcd,
        ObjectIndex::new(client.clone()),
        client,
        Seen { record, revision },
    ))
}

#[tokio::test]
async fn objects_are_published_only_into_an_existing_bucket_not_being_deleted() -> anyhow::Result<()>
{
    let (_etcd, index, mut client, seen) = setup().await?;
    assert_eq!(
        index
            .put_object(seen.it(), "photos", "a", &object("b1", 1))
            .await?,
        None
    );
    let replaced = index
        .put_object(seen.it(), "photos", "a", &object("b2", 2))
        .await?;
    assert_eq!(
        replaced.map(|m| m.segments[0].blob.clone()).as_deref(),
        Some("b1")
    );

    let lease = index.mark_deleting("photos").await?;
    assert!(matches!(
        index.mark_deleting("photos").await,
        Err(IndexError::BucketBusy)
    ));
    assert!(matches!(
        index
            .put_object(seen.it(), "photos", "b", &object("b3", 1))
            .await,
        Err(IndexError::BucketBusy)
    ));
    index.unmark_deleting(lease).await?;
    index
        .put_object(seen.it(), "photos", "b", &object("b3", 1))
        .await?;

    client.delete(seen.record.clone(), None).await?;
    assert!(matches!(
        index
            .put_object(seen.it(), "photos", "c", &object("b4", 1))
            .await,
        Err(IndexError::NoBucket)
    ));
    // Another owner makes a bucket of the same name: a write authorized against the deleted
    // one does not land in it (the request is to be authorized again, against the new
    // record), a write that saw the new one does.
    let again = client.put(seen.record.clone(), "{}", None).await?;
    assert!(matches!(
        index
            .put_object(seen.it(), "photos", "c", &object("b4", 1))
            .await,
        Err(IndexError::BucketReplaced)
    ));
    let new_seen = BucketSeen {
        record: &seen.record,
        revision: again.header().map(|h| h.revision()).unwrap_or(0),
    };
    index
        .put_object(new_seen, "photos", "d", &object("b5", 1))
        .await?;
    let listed: Vec<String> = index
        .list_objects(new_seen, "photos", "", b"", 10)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, ["a", "b", "d"]);
    Ok(())
}

#[tokio::test]
async fn reads_and_deletes_hold_only_for_the_bucket_record_they_were_authorized_against(
) -> anyhow::Result<()> {
    let (_etcd, index, mut client, seen) = setup().await?;
    index
        .put_object(seen.it(), "photos", "a", &object("b1", 1))
        .await?;
    index
        .create_upload(seen.it(), "photos", "u1", &upload("a"))
        .await?;
    // While the record seen is there, every read and delete acts.
    assert!(index.get_object(seen.it(), "photos", "a").await?.is_some());
    assert!(index
        .get_object_versioned(seen.it(), "photos", "a")
        .await?
        .is_some());
    assert_eq!(
        index
            .list_objects(seen.it(), "photos", "", b"", 10)
            .await?
            .len(),
        1
    );
    assert_eq!(index.list_uploads(seen.it(), "photos").await?.len(), 1);
    assert!(index.get_upload(seen.it(), "photos", "u1").await?.is_some());

    // The bucket is deleted and another account creates one of the same name (its index
    // entries here stand for what it wrote): a request authorized against the old record, by
    // a watch cache that has not seen the change yet, neither reads nor deletes them.
    client.delete(seen.record.clone(), None).await?;
    let again = client.put(seen.record.clone(), "{}", None).await?;
    let replaced = |r: Result<_, IndexError>| matches!(r, Err(IndexError::BucketReplaced));
    assert!(replaced(
        index.get_object(seen.it(), "photos", "a").await.map(|_| ())
    ));
    assert!(replaced(
        index
            .get_object_versioned(seen.it(), "photos", "a")
            .await
            .map(|_| ())
    ));
    assert!(replaced(
        index
            .list_objects(seen.it(), "photos", "", b"", 10)
            .await
            .map(|_| ())
    ));
    assert!(replaced(
        index.list_uploads(seen.it(), "photos").await.map(|_| ())
    ));
    assert!(replaced(
        index
            .get_upload(seen.it(), "photos", "u1")
            .await
            .map(|_| ())
    ));
    assert!(replaced(
        index
            .delete_object(seen.it(), "photos", "a")
            .await
            .map(|_| ())
    ));

    // Authorized against the new record, the same requests act; the refused delete deleted
    // nothing.
    let new_seen = BucketSeen {
        record: &seen.record,
        revision: again.header().map(|h| h.revision()).unwrap_or(0),
    };
    assert!(index.get_object(new_seen, "photos", "a").await?.is_some());
    assert!(index
        .delete_object(new_seen, "photos", "a")
        .await?
        .is_some());
    assert!(index.get_object(new_seen, "photos", "a").await?.is_none());

    // With no record at all, reads are refused the same way.
    client.delete(seen.record.clone(), None).await?;
    assert!(replaced(
        index.get_object(new_seen, "photos", "a").await.map(|_| ())
    ));
    Ok(())
}

#[tokio::test]
async fn a_completed_upload_becomes_its_object_in_one_step() -> anyhow::Result<()> {
    let (_etcd, index, _client, seen) = setup().await?;
    let upload = upload("big");
    index
        .create_upload(seen.it(), "photos", "u1", &upload)
        .await?;
    index.put_part("photos", "u1", 1, &part("p1")).await?;
    index.put_part("photos", "u1", 2, &part("p2")).await?;
    assert!(index.bucket_in_use("photos").await?);
    let (parts, read_at) = index.list_parts_versioned("u1").await?;
    assert_eq!(parts.len(), 2);

    // A part uploaded again after the parts were read: the completion would name a blob
    // the new upload replaced, so it is refused until the parts are read again.
    index.put_part("photos", "u1", 2, &part("p2-again")).await?;
    assert!(matches!(
        index
            .complete_upload(
                &seen.record,
                "photos",
                "u1",
                &object("p1", 10),
                "big",
                CompletionHolds {
                    parts_read_at: read_at,
                    expect: Expect::Anything,
                },
            )
            .await,
        Err(IndexError::PartsChanged)
    ));
    assert!(index
        .get_object(seen.it(), "photos", "big")
        .await?
        .is_none());
    let (_, read_at) = index.list_parts_versioned("u1").await?;
    // A completion that expects no object (If-None-Match: *) meets one written meanwhile.
    index
        .put_object(seen.it(), "photos", "big", &object("other", 1))
        .await?;
    assert!(matches!(
        index
            .complete_upload(
                &seen.record,
                "photos",
                "u1",
                &object("p1", 10),
                "big",
                CompletionHolds {
                    parts_read_at: read_at,
                    expect: Expect::Absent,
                },
            )
            .await,
        Err(IndexError::Changed)
    ));
    assert!(index.get_upload(seen.it(), "photos", "u1").await?.is_some());
    index
        .complete_upload(
            &seen.record,
            "photos",
            "u1",
            &object("p1", 10),
            "big",
            CompletionHolds {
                parts_read_at: read_at,
                expect: Expect::Anything,
            },
        )
        .await?;
    assert!(index
        .get_object(seen.it(), "photos", "big")
        .await?
        .is_some());
    assert!(index.get_upload(seen.it(), "photos", "u1").await?.is_none());
    assert!(index.list_parts("u1").await?.is_empty());
    // Completing again, or adding a part, finds no upload.
    assert!(matches!(
        index
            .complete_upload(
                &seen.record,
                "photos",
                "u1",
                &object("p1", 10),
                "big",
                CompletionHolds {
                    parts_read_at: read_at,
                    expect: Expect::Anything,
                },
            )
            .await,
        Err(IndexError::NoUpload)
    ));
    assert!(matches!(
        index.put_part("photos", "u1", 3, &part("p3")).await,
        Err(IndexError::NoUpload)
    ));

    index
        .create_upload(seen.it(), "photos", "u2", &upload)
        .await?;
    index.put_part("photos", "u2", 1, &part("q1")).await?;
    let parts = index.abort_upload("photos", "u2").await?;
    assert_eq!(
        parts.iter().map(|p| p.blob.as_str()).collect::<Vec<_>>(),
        ["q1"]
    );
    let referenced = index.referenced_blobs().await?;
    assert!(referenced.contains("p1") && !referenced.contains("q1"));
    Ok(())
}

#[tokio::test]
async fn conditional_publishes_hold_in_their_own_transaction() -> anyhow::Result<()> {
    use api_gateway::s3::index::Expect;
    let (_etcd, index, mut client, seen) = setup().await?;
    // Two create-only writes: the first wins, the second finds the object there.
    index
        .put_object_expecting(
            seen.it(),
            "photos",
            "lock",
            &object("b1", 1),
            Expect::Absent,
        )
        .await?;
    assert!(matches!(
        index
            .put_object_expecting(
                seen.it(),
                "photos",
                "lock",
                &object("b2", 1),
                Expect::Absent
            )
            .await,
        Err(IndexError::Changed)
    ));
    // A write back of the version read succeeds once; a second one with the same version
    // finds it changed.
    let (_, version) = index
        .get_object_versioned(seen.it(), "photos", "lock")
        .await?
        .expect("just published");
    index
        .put_object_expecting(
            seen.it(),
            "photos",
            "lock",
            &object("b1", 1),
            Expect::Version(version),
        )
        .await?;
    assert!(matches!(
        index
            .put_object_expecting(
                seen.it(),
                "photos",
                "lock",
                &object("b1", 1),
                Expect::Version(version),
            )
            .await,
        Err(IndexError::Changed)
    ));
    // Deleted in between: the write back does not bring the entry back.
    let (_, version) = index
        .get_object_versioned(seen.it(), "photos", "lock")
        .await?
        .expect("still there");
    index.delete_object(seen.it(), "photos", "lock").await?;
    assert!(matches!(
        index
            .put_object_expecting(
                seen.it(),
                "photos",
                "lock",
                &object("b1", 1),
                Expect::Version(version),
            )
            .await,
        Err(IndexError::Changed)
    ));
    assert!(index
        .get_object(seen.it(), "photos", "lock")
        .await?
        .is_none());
    // A conditional delete takes only the version it read.
    index
        .put_object(seen.it(), "photos", "lock", &object("b4", 1))
        .await?;
    let (_, version) = index
        .get_object_versioned(seen.it(), "photos", "lock")
        .await?
        .expect("just published");
    index
        .put_object(seen.it(), "photos", "lock", &object("b5", 1))
        .await?;
    assert!(matches!(
        index
            .delete_object_expecting(seen.it(), "photos", "lock", Expect::Version(version))
            .await,
        Err(IndexError::Changed)
    ));
    let (_, version) = index
        .get_object_versioned(seen.it(), "photos", "lock")
        .await?
        .expect("a failed conditional delete left it");
    let gone = index
        .delete_object_expecting(seen.it(), "photos", "lock", Expect::Version(version))
        .await?;
    assert_eq!(
        gone.map(|m| m.segments[0].blob.clone()).as_deref(),
        Some("b5")
    );
    // Without the bucket, the bucket is what is wrong.
    client.delete(seen.record.clone(), None).await?;
    assert!(matches!(
        index
            .put_object_expecting(seen.it(), "photos", "new", &object("b3", 1), Expect::Absent)
            .await,
        Err(IndexError::NoBucket)
    ));
    Ok(())
}
