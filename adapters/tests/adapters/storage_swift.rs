//! Swift-specific behaviour on the testbed's Swift: token renewal, and the segment
//! container staying out of sight.

#![allow(clippy::unwrap_used)] // Test helpers: a failed call fails the test.

use bytes::Bytes;
use phoenix_adapters::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::storage_support::{
    SWIFT_SEGMENT, deterministic_bytes, swift_fixture, testbed_var, unique_prefix,
};

/// Forgets every tempauth token: they live in memcached only.
async fn expire_all_tokens() {
    let addr = testbed_var("PHOENIX_TEST_SWIFT_MEMCACHED");
    let mut memcached = tokio::net::TcpStream::connect(addr).await.unwrap();
    memcached.write_all(b"flush_all\r\n").await.unwrap();
    let mut reply = [0u8; 4];
    memcached.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_renewed_once_and_the_call_succeeds() {
    let fx = swift_fixture().await;
    let key = fx.key("renewal");
    let one = |data: Bytes| -> phoenix_adapters::storage::ByteStream {
        Box::pin(futures::stream::iter(vec![Result::Ok(data)]))
    };
    fx.store
        .put(&key, one(Bytes::from_static(b"before")))
        .await
        .unwrap();
    expire_all_tokens().await;
    assert_eq!(fx.store.stat(&key).await.unwrap().size, 6);
    expire_all_tokens().await;
    assert_eq!(fx.store.list(&fx.prefix).await.unwrap().len(), 1);
    expire_all_tokens().await;
    // A segmented put after expiry: its first request renews the token.
    let data = deterministic_bytes(21, SWIFT_SEGMENT * 2 + 3);
    fx.store.put(&key, one(data)).await.unwrap();
    assert_eq!(
        fx.store.stat(&key).await.unwrap().size,
        (SWIFT_SEGMENT * 2 + 3) as u64
    );
    expire_all_tokens().await;
    fx.store.delete(&key).await.unwrap();
    assert!(fx.store.list(&fx.prefix).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_the_whole_store_shows_no_segment() {
    let fx = swift_fixture().await;
    let key = fx.key("segmented");
    let data = deterministic_bytes(22, SWIFT_SEGMENT * 3);
    let stream: phoenix_adapters::storage::ByteStream =
        Box::pin(futures::stream::iter(vec![Result::Ok(data)]));
    fx.store.put(&key, stream).await.unwrap();
    let everything = fx.store.list("").await.unwrap();
    assert!(everything.iter().any(|o| o.key == key));
    assert!(
        everything.iter().all(|o| !o.key.as_str().contains("/+")),
        "a segment is listed"
    );
    fx.store.delete(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_a_permanent_error_that_names_the_step() {
    use phoenix_adapters::storage::{StorageConfig, SwiftAuthConfig};
    let mut keystone = crate::storage_support::swift_keystone_config();
    if let StorageConfig::Swift {
        auth: SwiftAuthConfig::Keystone { password, .. },
        ..
    } = &mut keystone
    {
        *password = "not-the-password".to_owned();
    }
    let mut tempauth = crate::storage_support::swift_config(None);
    if let StorageConfig::Swift {
        auth: SwiftAuthConfig::Tempauth { key, .. },
        ..
    } = &mut tempauth
    {
        *key = "not-the-key".to_owned();
    }
    for (config, step) in [(keystone, "Keystone"), (tempauth, "Swift")] {
        let store = config.build().await.unwrap();
        let err = store.list("").await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(!err.is_not_found(), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("authenticating with {step}")),
            "{message}"
        );
        assert!(message.contains("401"), "{message}");
        assert!(
            !message.contains("not-the-"),
            "a secret in an error: {message}"
        );
    }
}

/// A source slower than the idle timeout (a slow pg_dump): each segment's body takes
/// about three idle timeouts to send, and the put still succeeds. No response byte
/// arrives while a body is sent, so a read timeout must not run then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_that_takes_longer_than_the_idle_timeout_to_send_is_stored() {
    use futures::StreamExt;
    use phoenix_adapters::storage::swift::{SwiftAuth, SwiftSettings, SwiftStore};
    use phoenix_adapters::storage::{ObjectKey, Store};
    const MIB: usize = 1024 * 1024;
    let store = SwiftStore::new(SwiftSettings {
        auth_url: testbed_var("PHOENIX_TEST_SWIFT_AUTH_URL"),
        auth: SwiftAuth::Tempauth {
            user: testbed_var("PHOENIX_TEST_SWIFT_USER"),
            key: testbed_var("PHOENIX_TEST_SWIFT_KEY"),
        },
        container: "phoenix-test".to_owned(),
        prefix: "phoenix/".to_owned(),
        segment_size: MIB as u64,
        idle_timeout: std::time::Duration::from_secs(1),
    })
    .unwrap();
    let key = ObjectKey::parse(format!("{}dripped", unique_prefix())).unwrap();
    let data = deterministic_bytes(24, 2 * MIB + 100_000);
    // 32 KiB every 100 ms: a 1 MiB segment takes about 3 s.
    let pieces: Vec<Bytes> = (0..data.len())
        .step_by(32 * 1024)
        .map(|start| data.slice(start..(start + 32 * 1024).min(data.len())))
        .collect();
    let stream = futures::stream::iter(pieces).then(|piece| async move {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        Result::Ok(piece)
    });
    assert_eq!(
        store.put(&key, Box::pin(stream)).await.unwrap(),
        data.len() as u64
    );
    let mut back = Vec::new();
    let mut stream = store.get(&key).await.unwrap();
    while let Some(chunk) = stream.next().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert!(back == data, "the object read back differs");
    store.delete(&key).await.unwrap();
}
