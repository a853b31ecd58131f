//! Storage faults against the real S3 and Swift servers of the testbed: the server
//! disappears in the middle of an upload (a TCP proxy between the store and the server is
//! killed), and a process dies mid-upload (its runtime is dropped, so no clean-up runs).

#![allow(clippy::unwrap_used)] // Test helpers: a failed call fails the test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use phoenix_adapters::Result;
use phoenix_adapters::storage::{ByteStream, StorageConfig, Store, Sweep};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use phoenix_adapters::storage::s3::MIN_PART_SIZE as MIN_PART_SIZE_FOR_TESTS;

use crate::storage_support::{
    SWIFT_SEGMENT, deterministic_bytes, eventually, s3_config, swift_config, testbed_var,
    unique_prefix,
};

/// What a proxy does to the traffic besides passing it on.
#[derive(Clone, Copy, Default)]
struct Shaping {
    /// Bytes per second passed from the client to the server; unlimited when `None`.
    rate: Option<u64>,
    /// Once a request containing these bytes has passed, the server's answer on that
    /// connection is never passed on: the connection is closed instead.
    cut_after: Option<&'static [u8]>,
    /// After passing this many bytes from the client on one connection, stop passing
    /// anything on it, either way (the server hangs without closing).
    stall_after: Option<usize>,
}

/// A TCP proxy in front of a server that can be killed (every connection dropped, the
/// port closed) and brought back on the same port.
struct Proxy {
    addr: SocketAddr,
    upstream: String,
    shaping: Shaping,
    tasks: Option<JoinSet<()>>,
}

impl Proxy {
    async fn start(upstream: &str) -> Self {
        Self::start_with(upstream, Shaping::default()).await
    }

    async fn start_with(upstream: &str, shaping: Shaping) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut proxy = Self {
            addr: listener.local_addr().unwrap(),
            upstream: upstream.to_owned(),
            shaping,
            tasks: None,
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let shaping = self.shaping;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    if shaping.rate.is_none()
                        && shaping.cut_after.is_none()
                        && shaping.stall_after.is_none()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                    relay(client, server, shaping).await;
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Drops the listener and every connection (the connections' JoinSet is dropped with
    /// the accept task, which aborts them).
    async fn kill(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    async fn revive(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

/// Passes bytes both ways, shaped.
async fn relay(client: TcpStream, server: TcpStream, shaping: Shaping) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let cut = std::sync::atomic::AtomicBool::new(false);
    let stalled = std::sync::atomic::AtomicBool::new(false);
    let upload = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut passed = 0;
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if shaping.stall_after.is_some_and(|limit| passed > limit) {
                stalled.store(true, std::sync::atomic::Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            passed += n;
            if let Some(pattern) = shaping.cut_after
                && buf[..n].windows(pattern.len()).any(|w| w == pattern)
            {
                cut.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            if let Some(rate) = shaping.rate {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let download = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = server_read.read(&mut buf).await {
            if n == 0
                || cut.load(std::sync::atomic::Ordering::SeqCst)
                || stalled.load(std::sync::atomic::Ordering::SeqCst)
            {
                break;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // A hung server neither answers nor closes, even when the real one gives up.
        if stalled.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let _ = client_write.shutdown().await;
    };
    // A cut answer closes the client's side: the client sees the connection end.
    tokio::join!(upload, download);
}

fn authority_and_path(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("an http:// testbed URL");
    match rest.split_once('/') {
        Some((authority, path)) => (authority.to_owned(), format!("/{path}")),
        None => (rest.to_owned(), String::new()),
    }
}

fn fed() -> (mpsc::Sender<Result<Bytes>>, ByteStream) {
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, Box::pin(stream))
}

/// Feeds `data` in 1 MiB chunks, over and over, until the receiver ends: an upload is
/// always in flight when the server goes away, however fast the earlier parts were
/// stored, so the put can only end by the server's failure, never by the data.
fn feed(tx: mpsc::Sender<Result<Bytes>>, data: Bytes) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for start in (0..data.len()).step_by(1 << 20) {
                let end = (start + (1 << 20)).min(data.len());
                if tx.send(Ok(data.slice(start..end))).await.is_err() {
                    return;
                }
            }
        }
    })
}

async fn wait_for_leftovers(sweeper: &Arc<dyn Sweep>, prefix: &str) {
    eventually("the upload has stored its first part or segment", || {
        let sweeper = sweeper.clone();
        let prefix = prefix.to_owned();
        async move { sweeper.leftovers(&prefix).await.map(|l| !l.is_empty()) }
    })
    .await;
}

async fn assert_nothing_left(direct: &Arc<dyn Store>, sweeper: &Arc<dyn Sweep>, prefix: &str) {
    assert!(direct.list(prefix).await.unwrap().is_empty());
    eventually("every part or segment is removed", || {
        let sweeper = sweeper.clone();
        let prefix = prefix.to_owned();
        async move { sweeper.leftovers(&prefix).await.map(|l| l.is_empty()) }
    })
    .await;
}

async fn server_killed_mid_upload(
    config: fn(Option<String>) -> StorageConfig,
    server_url: String,
    proxied_url: fn(SocketAddr, &str) -> String,
    part_size: usize,
) {
    let (authority, path) = authority_and_path(&server_url);
    let mut proxy = Proxy::start(&authority).await;
    let through_proxy = config(Some(proxied_url(proxy.addr, &path)));
    let store = through_proxy.build().await.unwrap();
    let direct_backend = config(None).build_backend().await.unwrap();
    if let phoenix_adapters::storage::Backend::S3(s3) = &direct_backend {
        s3.ensure_bucket().await.unwrap();
    }
    let (direct, sweeper) = (direct_backend.store(), direct_backend.sweeper());
    let prefix = unique_prefix();
    let key = phoenix_adapters::storage::ObjectKey::parse(format!("{prefix}backup")).unwrap();

    let (tx, stream) = fed();
    let feeder = feed(tx, deterministic_bytes(11, part_size * 4));
    let put_key = key.clone();
    let put = tokio::spawn(async move { store.put(&put_key, stream).await });
    wait_for_leftovers(&sweeper, &prefix).await;

    proxy.kill().await;
    let err = put.await.unwrap().unwrap_err();
    assert!(!err.is_not_found(), "{err}");
    feeder.abort();
    assert!(direct.stat(&key).await.unwrap_err().is_not_found());
    assert!(direct.list(&prefix).await.unwrap().is_empty());

    // The store's clean-up keeps trying until the server is reachable again.
    proxy.revive().await;
    assert_nothing_left(&direct, &sweeper, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_killed_mid_upload_fails_the_put_and_leaves_no_parts() {
    server_killed_mid_upload(
        s3_config,
        testbed_var("PHOENIX_TEST_S3_ENDPOINT"),
        |addr, _| format!("http://{addr}"),
        MIN_PART_SIZE_FOR_TESTS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swift_server_killed_mid_upload_fails_the_put_and_leaves_no_segments() {
    server_killed_mid_upload(
        swift_config,
        testbed_var("PHOENIX_TEST_SWIFT_AUTH_URL"),
        |addr, path| format!("http://{addr}{path}"),
        SWIFT_SEGMENT,
    )
    .await;
}

/// A process killed mid-upload runs no clean-up at all: its leftovers stay until a sweep.
/// `upload_times`: whether the server reports when an upload began (moto reports a fixed
/// date in 2010 for every multipart upload, so age limits cannot be checked there).
async fn sweep_removes_what_a_killed_process_left(
    config: StorageConfig,
    part_size: usize,
    upload_times: bool,
) {
    let backend = config.build_backend().await.unwrap();
    if let phoenix_adapters::storage::Backend::S3(s3) = &backend {
        s3.ensure_bucket().await.unwrap();
    }
    let (store, sweeper) = (backend.store(), backend.sweeper());
    let prefix = unique_prefix();
    let key = phoenix_adapters::storage::ObjectKey::parse(format!("{prefix}backup")).unwrap();

    // The "process": a runtime of its own, dropped while the put runs.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, stream) = fed();
    let data = deterministic_bytes(12, part_size * 3);
    let put_store = store.clone();
    let put_key = key.clone();
    doomed.spawn(async move {
        let _ = put_store.put(&put_key, stream).await;
    });
    let feeder = doomed.spawn(async move {
        for start in (0..data.len()).step_by(1 << 20) {
            let end = (start + (1 << 20)).min(data.len());
            if tx.send(Ok(data.slice(start..end))).await.is_err() {
                return;
            }
        }
        tx.closed().await;
    });
    wait_for_leftovers(&sweeper, &prefix).await;
    doomed.shutdown_background();
    drop(feeder);

    // Nothing cleaned them: they are still there, and nothing is visible.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sweeper.leftovers(&prefix).await.unwrap().is_empty());
    assert!(store.list(&prefix).await.unwrap().is_empty());
    // A sweep with a long age limit spares them (they may be a live upload)...
    if upload_times {
        assert_eq!(
            sweeper
                .sweep(&prefix, Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
    }
    // ...one without removes them.
    assert!(sweeper.sweep(&prefix, Duration::ZERO).await.unwrap() > 0);
    assert!(sweeper.leftovers(&prefix).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_sweep_removes_the_parts_a_killed_process_left() {
    sweep_removes_what_a_killed_process_left(s3_config(None), MIN_PART_SIZE_FOR_TESTS, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swift_sweep_removes_the_segments_a_killed_process_left() {
    sweep_removes_what_a_killed_process_left(swift_config(None), SWIFT_SEGMENT, true).await;
}

/// Data read back through the proxy is whole (the proxy itself does not corrupt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_proxy_passes_data_unchanged() {
    let (authority, _) = authority_and_path(&testbed_var("PHOENIX_TEST_S3_ENDPOINT"));
    let proxy = Proxy::start(&authority).await;
    let store = s3_config(Some(format!("http://{}", proxy.addr)))
        .build_backend()
        .await
        .unwrap();
    if let phoenix_adapters::storage::Backend::S3(s3) = &store {
        s3.ensure_bucket().await.unwrap();
    }
    let store = store.store();
    let key =
        phoenix_adapters::storage::ObjectKey::parse(format!("{}proxied", unique_prefix())).unwrap();
    let data = deterministic_bytes(13, 3_000_000);
    let chunks: Vec<Result<Bytes>> = vec![Ok(data.clone())];
    store
        .put(&key, Box::pin(futures::stream::iter(chunks)))
        .await
        .unwrap();
    let mut back = Vec::new();
    let mut stream = store.get(&key).await.unwrap();
    while let Some(chunk) = stream.next().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert!(back == data);
}

/// An S3 part whose upload takes longer than the idle timeout (the link is slow, not
/// stalled) is stored: the SDK's read timeout runs from the start of the request, body
/// upload included, so a part's deadline grows with its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_parts_slower_to_upload_than_the_idle_timeout_are_stored() {
    use phoenix_adapters::storage::s3::{S3Settings, S3Store};
    let (authority, _) = authority_and_path(&testbed_var("PHOENIX_TEST_S3_ENDPOINT"));
    // 2 MiB/s: each 5 MiB part takes about 2.5 s to reach the server, more than the 1 s
    // idle timeout.
    let proxy = Proxy::start_with(
        &authority,
        Shaping {
            rate: Some(2 * 1024 * 1024),
            ..Shaping::default()
        },
    )
    .await;
    let settings = |endpoint: String| S3Settings {
        bucket: "phoenix-test".to_owned(),
        region: testbed_var("PHOENIX_TEST_S3_REGION"),
        endpoint: Some(endpoint),
        path_style: true,
        credentials: Some((
            testbed_var("PHOENIX_TEST_S3_ACCESS_KEY"),
            testbed_var("PHOENIX_TEST_S3_SECRET_KEY"),
        )),
        prefix: "phoenix/".to_owned(),
        part_size: MIN_PART_SIZE_FOR_TESTS,
        idle_timeout: Duration::from_secs(1),
    };
    let direct = S3Store::new(settings(testbed_var("PHOENIX_TEST_S3_ENDPOINT")))
        .await
        .unwrap();
    direct.ensure_bucket().await.unwrap();
    let slow = S3Store::new(settings(format!("http://{}", proxy.addr)))
        .await
        .unwrap();
    let key = phoenix_adapters::storage::ObjectKey::parse(format!("{}slow-link", unique_prefix()))
        .unwrap();
    let data = deterministic_bytes(14, MIN_PART_SIZE_FOR_TESTS + 1_000_000);
    let chunks: Vec<Result<Bytes>> = vec![Ok(data.clone())];
    slow.put(&key, Box::pin(futures::stream::iter(chunks)))
        .await
        .unwrap();
    let mut back = Vec::new();
    let mut stream = direct.get(&key).await.unwrap();
    while let Some(chunk) = stream.next().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert!(back == data, "the object read back differs");
    direct.delete(&key).await.unwrap();
}

/// The request that makes an object visible (Swift's manifest PUT, S3's
/// CompleteMultipartUpload) reaches the server, but its answer is lost: the put reports an
/// error, so the object must not stay visible, and nothing of it may stay behind.
async fn answer_to_the_final_request_lost(
    config: fn(Option<String>) -> StorageConfig,
    server_url: String,
    proxied_url: fn(SocketAddr, &str) -> String,
    part_size: usize,
    final_request: &'static [u8],
) {
    let (authority, path) = authority_and_path(&server_url);
    let proxy = Proxy::start_with(
        &authority,
        Shaping {
            cut_after: Some(final_request),
            ..Shaping::default()
        },
    )
    .await;
    let store = config(Some(proxied_url(proxy.addr, &path)))
        .build()
        .await
        .unwrap();
    let direct_backend = config(None).build_backend().await.unwrap();
    if let phoenix_adapters::storage::Backend::S3(s3) = &direct_backend {
        s3.ensure_bucket().await.unwrap();
    }
    let (direct, sweeper) = (direct_backend.store(), direct_backend.sweeper());
    let prefix = unique_prefix();
    let key = phoenix_adapters::storage::ObjectKey::parse(format!("{prefix}backup")).unwrap();
    let data = deterministic_bytes(15, part_size * 2 + 1000);
    let chunks: Vec<Result<Bytes>> = vec![Ok(data)];
    let err = store
        .put(&key, Box::pin(futures::stream::iter(chunks)))
        .await
        .unwrap_err();
    assert!(!err.is_not_found(), "{err}");
    assert!(
        direct.stat(&key).await.unwrap_err().is_not_found(),
        "the put failed, but its object is visible"
    );
    assert_nothing_left(&direct, &sweeper, &prefix).await;
    // Nothing comes back later either (a second clean-up pass runs after 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(direct.stat(&key).await.unwrap_err().is_not_found());
    assert!(sweeper.leftovers(&prefix).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_lost_answer_to_complete_multipart_upload_leaves_no_object() {
    answer_to_the_final_request_lost(
        s3_config,
        testbed_var("PHOENIX_TEST_S3_ENDPOINT"),
        |addr, _| format!("http://{addr}"),
        MIN_PART_SIZE_FOR_TESTS,
        b"CompleteMultipartUpload",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swift_a_lost_answer_to_the_manifest_put_leaves_no_object() {
    answer_to_the_final_request_lost(
        swift_config,
        testbed_var("PHOENIX_TEST_SWIFT_AUTH_URL"),
        |addr, path| format!("http://{addr}{path}"),
        SWIFT_SEGMENT,
        b"multipart-manifest=put",
    )
    .await;
}

/// Swift stops reading a segment's body and never answers: the put fails after the idle
/// timeout instead of hanging, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swift_a_server_that_stops_reading_a_segment_fails_the_put() {
    use phoenix_adapters::storage::ObjectKey;
    use phoenix_adapters::storage::swift::{SwiftAuth, SwiftSettings, SwiftStore};
    let (authority, path) = authority_and_path(&testbed_var("PHOENIX_TEST_SWIFT_AUTH_URL"));
    let proxy = Proxy::start_with(
        &authority,
        Shaping {
            stall_after: Some(1024 * 1024),
            ..Shaping::default()
        },
    )
    .await;
    let store = SwiftStore::new(SwiftSettings {
        auth_url: format!("http://{}{path}", proxy.addr),
        auth: SwiftAuth::Tempauth {
            user: testbed_var("PHOENIX_TEST_SWIFT_USER"),
            key: testbed_var("PHOENIX_TEST_SWIFT_KEY"),
        },
        container: "phoenix-test".to_owned(),
        prefix: "phoenix/".to_owned(),
        segment_size: SWIFT_SEGMENT as u64,
        idle_timeout: Duration::from_secs(1),
    })
    .unwrap();
    let direct_backend = swift_config(None).build_backend().await.unwrap();
    let (direct, sweeper) = (direct_backend.store(), direct_backend.sweeper());
    let prefix = unique_prefix();
    let key = ObjectKey::parse(format!("{prefix}backup")).unwrap();
    let (tx, stream) = fed();
    let feeder = feed(tx, deterministic_bytes(16, SWIFT_SEGMENT * 8));
    let err = store.put(&key, stream).await.unwrap_err();
    feeder.abort();
    assert!(err.is_retryable(), "{err}");
    assert!(direct.stat(&key).await.unwrap_err().is_not_found());
    assert_nothing_left(&direct, &sweeper, &prefix).await;
}
