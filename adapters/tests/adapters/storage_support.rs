//! Fixtures of the storage tests: one per backend, each with a unique key prefix so that
//! tests run in parallel against one shared server, and a view of the backend's
//! leftovers (parts, segments, temporary files) to check clean-up on the server itself.

#![allow(clippy::unwrap_used)] // Test helpers: a failed call fails the test.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use phoenix_adapters::Result;
use phoenix_adapters::storage::s3::MIN_PART_SIZE;
use phoenix_adapters::storage::{Backend, ObjectKey, StorageConfig, Store, Sweep, SwiftAuthConfig};

/// One backend, ready for one test.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub sweeper: Arc<dyn Sweep>,
    /// Every key of the test starts with it (ends with `/`).
    pub prefix: String,
    /// The backend's part or segment size: tests write more than that to cross parts.
    pub part_size: usize,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    pub fn key(&self, name: &str) -> ObjectKey {
        ObjectKey::parse(format!("{}{name}", self.prefix)).unwrap()
    }
}

/// A prefix no other test (or earlier run) uses.
pub fn unique_prefix() -> String {
    let mut buf = [0u8; 6];
    aws_lc_rs::rand::fill(&mut buf).unwrap();
    format!("t-{}/", hex::encode(buf))
}

/// Pseudo-random bytes that do not compress and differ per `seed`.
pub fn deterministic_bytes(seed: u64, len: usize) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Polls `check` until it returns true; fails the test after a generous deadline (clean-up
/// runs in background tasks, so it completes shortly after the call that started it).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let last = match check().await {
            Ok(true) => return,
            Ok(false) => None,
            Err(e) => Some(e.to_string()),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what} (last error: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a testbed variable, failing with instructions when it is missing.
pub fn testbed_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the testbed with `scripts/testbed/up` and \
             `source .testbed/env` before running the storage tests"
        )
    })
}

/// A fixture from a configuration: the store as the broker builds it (retries, metrics),
/// the bare backend to look for leftovers.
pub async fn fixture_from(
    config: StorageConfig,
    part_size: usize,
    dir: Option<tempfile::TempDir>,
) -> Fixture {
    let backend = config.build_backend().await.unwrap();
    if let Backend::S3(s3) = &backend {
        s3.ensure_bucket().await.unwrap();
    }
    Fixture {
        store: config.build().await.unwrap(),
        sweeper: backend.sweeper(),
        prefix: unique_prefix(),
        part_size,
        _dir: dir,
    }
}

pub async fn local_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig::Local {
        path: dir.path().to_owned(),
    };
    fixture_from(config, 1 << 20, Some(dir)).await
}

/// The testbed's S3 server (moto), with the smallest part size S3 allows; `endpoint`
/// replaces the server's address (a proxy in front of it).
pub fn s3_config(endpoint: Option<String>) -> StorageConfig {
    StorageConfig::S3 {
        bucket: "phoenix-test".to_owned(),
        region: testbed_var("PHOENIX_TEST_S3_REGION"),
        endpoint: Some(endpoint.unwrap_or_else(|| testbed_var("PHOENIX_TEST_S3_ENDPOINT"))),
        path_style: true,
        access_key_id: Some(testbed_var("PHOENIX_TEST_S3_ACCESS_KEY")),
        secret_access_key: Some(testbed_var("PHOENIX_TEST_S3_SECRET_KEY")),
        prefix: Some("phoenix/".to_owned()),
        part_size: Some(MIN_PART_SIZE as u64),
    }
}

pub async fn s3_fixture() -> Fixture {
    fixture_from(s3_config(None), MIN_PART_SIZE, None).await
}

/// Segment size of the Swift tests: small, so that 40 MB crosses ten segments.
pub const SWIFT_SEGMENT: usize = 4 * 1024 * 1024;

/// The testbed's Swift (tempauth); `auth_url` replaces the server's (a proxy in front).
pub fn swift_config(auth_url: Option<String>) -> StorageConfig {
    StorageConfig::Swift {
        auth_url: auth_url.unwrap_or_else(|| testbed_var("PHOENIX_TEST_SWIFT_AUTH_URL")),
        auth: SwiftAuthConfig::Tempauth {
            user: testbed_var("PHOENIX_TEST_SWIFT_USER"),
            key: testbed_var("PHOENIX_TEST_SWIFT_KEY"),
        },
        container: "phoenix-test".to_owned(),
        prefix: Some("phoenix/".to_owned()),
        segment_size: Some(SWIFT_SEGMENT as u64),
    }
}

pub async fn swift_fixture() -> Fixture {
    fixture_from(swift_config(None), SWIFT_SEGMENT, None).await
}

/// The testbed's second Swift proxy, authenticated by Keystone v3 (the catalog names it).
pub fn swift_keystone_config() -> StorageConfig {
    StorageConfig::Swift {
        auth_url: testbed_var("PHOENIX_TEST_SWIFT_KEYSTONE_URL"),
        auth: SwiftAuthConfig::Keystone {
            username: testbed_var("PHOENIX_TEST_SWIFT_KEYSTONE_USER"),
            password: testbed_var("PHOENIX_TEST_SWIFT_KEYSTONE_PASSWORD"),
            project: testbed_var("PHOENIX_TEST_SWIFT_KEYSTONE_PROJECT"),
            domain: testbed_var("PHOENIX_TEST_SWIFT_KEYSTONE_DOMAIN"),
        },
        container: "phoenix-test".to_owned(),
        prefix: Some("phoenix/".to_owned()),
        segment_size: Some(SWIFT_SEGMENT as u64),
    }
}

pub async fn swift_keystone_fixture() -> Fixture {
    fixture_from(swift_keystone_config(), SWIFT_SEGMENT, None).await
}
