//! The storage conformance suite: one set of behaviours, run against every backend
//! (local disk, S3, OpenStack Swift). S3 and Swift are real servers started by
//! `scripts/testbed` (their addresses come from `PHOENIX_TEST_*` variables).
//!
//! Empty objects: a backup is never empty, but a store must still store and return an
//! object of 0 bytes faithfully (a manifest writer or a user may produce one).

#![allow(clippy::unwrap_used)] // Test helpers: a failed call fails the test.

use bytes::Bytes;
use futures::StreamExt;
use phoenix_adapters::storage::{ByteStream, ObjectKey, Store};
use phoenix_adapters::{Error, Result};
use tokio::sync::mpsc;

use crate::storage_support::{Fixture, deterministic_bytes, eventually};

fn chunked(data: Bytes, chunk: usize) -> ByteStream {
    let chunks: Vec<Result<Bytes>> = (0..data.len())
        .step_by(chunk.max(1))
        .map(|start| Ok(data.slice(start..(start + chunk).min(data.len()))))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// `data`, then an error: a source that died mid-way.
fn failing_after(data: Bytes, chunk: usize) -> ByteStream {
    let failure = futures::stream::once(async {
        Err(Error::io(
            "reading the test source",
            std::io::Error::other("the source died"),
        ))
    });
    Box::pin(chunked(data, chunk).chain(failure))
}

/// A stream fed by the test through a channel (ends when the sender is dropped).
fn fed() -> (mpsc::Sender<Result<Bytes>>, ByteStream) {
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, Box::pin(stream))
}

async fn read_all(store: &dyn Store, key: &ObjectKey) -> Result<Vec<u8>> {
    let mut stream = store.get(key).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

async fn assert_no_leftovers(fx: &Fixture) {
    let sweeper = fx.sweeper.clone();
    let prefix = fx.prefix.clone();
    eventually("every part, segment and temporary file is removed", || {
        let sweeper = sweeper.clone();
        let prefix = prefix.clone();
        async move { sweeper.leftovers(&prefix).await.map(|l| l.is_empty()) }
    })
    .await;
}

pub async fn put_then_get_returns_the_same_bytes(fx: Fixture) {
    let key = fx.key("round-trip");
    let data = deterministic_bytes(1, 1_000_003);
    let stored = fx
        .store
        .put(&key, chunked(data.clone(), 65_537))
        .await
        .unwrap();
    assert_eq!(stored, data.len() as u64);
    assert_eq!(read_all(&*fx.store, &key).await.unwrap(), data);
    assert_no_leftovers(&fx).await;
}

pub async fn an_empty_object_is_stored_and_read_back(fx: Fixture) {
    let key = fx.key("empty");
    let stored = fx.store.put(&key, chunked(Bytes::new(), 1)).await.unwrap();
    assert_eq!(stored, 0);
    assert_eq!(fx.store.stat(&key).await.unwrap().size, 0);
    assert!(read_all(&*fx.store, &key).await.unwrap().is_empty());
}

pub async fn a_large_object_crosses_several_parts_and_reads_back_whole(fx: Fixture) {
    let key = fx.key("large");
    let size = 40 * 1024 * 1024 + 12_345;
    assert!(
        size > 4 * fx.part_size,
        "the object must span several parts"
    );
    let data = deterministic_bytes(2, size);
    let stored = fx
        .store
        .put(&key, chunked(data.clone(), 1 << 20))
        .await
        .unwrap();
    assert_eq!(stored, size as u64);
    assert_eq!(fx.store.stat(&key).await.unwrap().size, size as u64);
    let back = read_all(&*fx.store, &key).await.unwrap();
    assert!(back == data, "the large object came back different");
    let listed = fx.store.list(&fx.prefix).await.unwrap();
    assert_eq!(
        listed.len(),
        1,
        "only the object is listed, no part: {listed:?}"
    );
    assert_eq!(listed[0].size, size as u64);
    assert_no_leftovers(&fx).await;
}

pub async fn list_returns_objects_under_a_prefix_in_key_order(fx: Fixture) {
    let names = ["b/2", "a/1", "b/1", "ab", "c"];
    for name in names {
        let key = fx.key(name);
        fx.store
            .put(&key, chunked(Bytes::from(name.as_bytes().to_vec()), 7))
            .await
            .unwrap();
    }
    let keys = |objects: Vec<phoenix_adapters::storage::ObjectInfo>| {
        objects
            .into_iter()
            .map(|o| o.key.as_str().trim_start_matches(&fx.prefix).to_owned())
            .collect::<Vec<_>>()
    };
    let all = keys(fx.store.list(&fx.prefix).await.unwrap());
    assert_eq!(all, ["a/1", "ab", "b/1", "b/2", "c"]);
    let b = keys(fx.store.list(&format!("{}b/", fx.prefix)).await.unwrap());
    assert_eq!(b, ["b/1", "b/2"]);
    let a = keys(fx.store.list(&format!("{}a", fx.prefix)).await.unwrap());
    assert_eq!(a, ["a/1", "ab"]);
    let none = fx.store.list(&format!("{}zz", fx.prefix)).await.unwrap();
    assert!(none.is_empty());
}

pub async fn an_object_being_written_is_invisible_until_complete(fx: Fixture) {
    let key = fx.key("in-flight");
    let (tx, stream) = fed();
    let store = fx.store.clone();
    let put_key = key.clone();
    let put = tokio::spawn(async move { store.put(&put_key, stream).await });
    // More than a part, so that backends with parts have started uploading.
    let first = deterministic_bytes(3, fx.part_size * 3 / 2);
    for chunk in first.chunks(1 << 20) {
        tx.send(Ok(Bytes::copy_from_slice(chunk))).await.unwrap();
    }
    let sweeper = fx.sweeper.clone();
    let prefix = fx.prefix.clone();
    eventually("the put has stored its first part", || {
        let sweeper = sweeper.clone();
        let prefix = prefix.clone();
        async move { sweeper.leftovers(&prefix).await.map(|l| !l.is_empty()) }
    })
    .await;
    assert!(fx.store.list(&fx.prefix).await.unwrap().is_empty());
    assert!(fx.store.stat(&key).await.unwrap_err().is_not_found());
    assert!(fx.store.get(&key).await.err().unwrap().is_not_found());
    tx.send(Ok(Bytes::from_static(b"end"))).await.unwrap();
    drop(tx);
    let stored = put.await.unwrap().unwrap();
    assert_eq!(stored, first.len() as u64 + 3);
    assert_eq!(fx.store.list(&fx.prefix).await.unwrap().len(), 1);
    assert_no_leftovers(&fx).await;
}

pub async fn stat_reports_size_and_time(fx: Fixture) {
    let key = fx.key("stat");
    fx.store
        .put(&key, chunked(deterministic_bytes(4, 4321), 1000))
        .await
        .unwrap();
    let info = fx.store.stat(&key).await.unwrap();
    assert_eq!(info.key, key);
    assert_eq!(info.size, 4321);
    assert!(info.modified.is_some());
}

pub async fn delete_removes_the_object_and_is_idempotent(fx: Fixture) {
    let key = fx.key("delete");
    let data = deterministic_bytes(5, fx.part_size * 2 + 17);
    fx.store.put(&key, chunked(data, 1 << 20)).await.unwrap();
    fx.store.delete(&key).await.unwrap();
    assert!(fx.store.stat(&key).await.unwrap_err().is_not_found());
    assert!(fx.store.list(&fx.prefix).await.unwrap().is_empty());
    fx.store.delete(&key).await.unwrap();
    fx.store.delete(&fx.key("never-existed")).await.unwrap();
    // An object smaller than a part or segment is stored whole, and deletes too.
    let small = fx.key("delete-small");
    fx.store
        .put(&small, chunked(Bytes::from_static(b"manifest"), 1 << 20))
        .await
        .unwrap();
    fx.store.delete(&small).await.unwrap();
    assert!(fx.store.stat(&small).await.unwrap_err().is_not_found());
    assert_no_leftovers(&fx).await;
}

pub async fn a_missing_object_is_not_found(fx: Fixture) {
    let key = fx.key("missing");
    let err = fx.store.get(&key).await.err().unwrap();
    assert!(err.is_not_found(), "get: {err}");
    let err = fx.store.stat(&key).await.unwrap_err();
    assert!(err.is_not_found(), "stat: {err}");
    assert!(!err.is_retryable());
}

pub async fn a_source_that_fails_midway_leaves_nothing(fx: Fixture) {
    let key = fx.key("failed");
    let data = deterministic_bytes(6, fx.part_size * 2 + 100);
    let err = fx
        .store
        .put(&key, failing_after(data, 1 << 20))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the source died"), "{err}");
    assert!(fx.store.stat(&key).await.unwrap_err().is_not_found());
    assert!(fx.store.list(&fx.prefix).await.unwrap().is_empty());
    assert_no_leftovers(&fx).await;
}

pub async fn a_small_source_that_fails_leaves_nothing(fx: Fixture) {
    let key = fx.key("failed-small");
    let err = fx
        .store
        .put(&key, failing_after(deterministic_bytes(7, 1000), 100))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the source died"), "{err}");
    assert!(fx.store.list(&fx.prefix).await.unwrap().is_empty());
    assert_no_leftovers(&fx).await;
}

pub async fn a_dropped_put_leaves_nothing(fx: Fixture) {
    let key = fx.key("dropped");
    let (tx, stream) = fed();
    let store = fx.store.clone();
    let put_key = key.clone();
    let put = tokio::spawn(async move { store.put(&put_key, stream).await });
    let data = deterministic_bytes(8, fx.part_size * 3 / 2);
    for chunk in data.chunks(1 << 20) {
        tx.send(Ok(Bytes::copy_from_slice(chunk))).await.unwrap();
    }
    let sweeper = fx.sweeper.clone();
    let prefix = fx.prefix.clone();
    eventually("the put has stored its first part", || {
        let sweeper = sweeper.clone();
        let prefix = prefix.clone();
        async move { sweeper.leftovers(&prefix).await.map(|l| !l.is_empty()) }
    })
    .await;
    put.abort();
    assert!(put.await.unwrap_err().is_cancelled());
    drop(tx);
    assert!(fx.store.list(&fx.prefix).await.unwrap().is_empty());
    assert_no_leftovers(&fx).await;
}

pub async fn overwriting_replaces_the_object_and_its_parts(fx: Fixture) {
    let key = fx.key("overwrite");
    let big = deterministic_bytes(9, fx.part_size * 2 + 5);
    fx.store.put(&key, chunked(big, 1 << 20)).await.unwrap();
    let small = Bytes::from_static(b"the second version");
    fx.store.put(&key, chunked(small.clone(), 5)).await.unwrap();
    assert_eq!(read_all(&*fx.store, &key).await.unwrap(), small);
    assert_eq!(fx.store.stat(&key).await.unwrap().size, small.len() as u64);
    assert_eq!(fx.store.list(&fx.prefix).await.unwrap().len(), 1);
    assert_no_leftovers(&fx).await;
}

/// Runs every conformance test against the backend that `$make` (an async fn returning a
/// [`Fixture`]) creates.
macro_rules! conformance_suite {
    ($backend:ident, $make:path) => {
        mod $backend {
            use crate::storage_conformance as suite;

            conformance_suite!(@tests $make;
                put_then_get_returns_the_same_bytes,
                an_empty_object_is_stored_and_read_back,
                a_large_object_crosses_several_parts_and_reads_back_whole,
                list_returns_objects_under_a_prefix_in_key_order,
                an_object_being_written_is_invisible_until_complete,
                stat_reports_size_and_time,
                delete_removes_the_object_and_is_idempotent,
                a_missing_object_is_not_found,
                a_source_that_fails_midway_leaves_nothing,
                a_small_source_that_fails_leaves_nothing,
                a_dropped_put_leaves_nothing,
                overwriting_replaces_the_object_and_its_parts,
            );
        }
    };
    (@tests $make:path; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                suite::$test($make().await).await;
            }
        )*
    };
}

conformance_suite!(local, crate::storage_support::local_fixture);
conformance_suite!(s3, crate::storage_support::s3_fixture);
conformance_suite!(swift, crate::storage_support::swift_fixture);
conformance_suite!(
    swift_keystone,
    crate::storage_support::swift_keystone_fixture
);
