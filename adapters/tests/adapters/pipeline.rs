//! The backup pipeline end to end on local disk storage: round trips, every kind of
//! damage a stored backup can suffer, failing and empty sources, cancellation, and the
//! numeric bound on bytes in flight under a slow storage output.

#![allow(clippy::unwrap_used)] // Tests: a failed call fails the test.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use phoenix_adapters::Error;
use phoenix_adapters::backup::{
    self, BackupKeys, BackupRequest, CompressionConfig, Header, InstanceKey, KdfParams, KeySource,
    Manifest, ManifestSource, PassphraseKey, PipelineConfig, ProcessCommand, ProcessSink,
    ProcessSource, Progress, SnapshotRef, Source, SourceInfo, SourceOutput, WriterSink,
};
use phoenix_adapters::ids::{BackupId, InstanceId};
use phoenix_adapters::keys::{MasterKey, random_bytes};
use phoenix_adapters::storage::local::LocalStore;
use phoenix_adapters::storage::{ByteStream, ObjectInfo, ObjectKey, Store};
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::storage_support::{Fixture, eventually, s3_fixture, swift_fixture};

const CHUNK: u32 = 1024;
const SEALED: usize = CHUNK as usize + 16;

fn random_master() -> MasterKey {
    let mut bytes = [0u8; 32];
    random_bytes(&mut bytes).unwrap();
    MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode(bytes)).unwrap()
}

/// Argon2id costs small enough for a debug build; the format records them either way.
fn cheap_kdf() -> KdfParams {
    KdfParams {
        m_cost_kib: 8 * 1024,
        t_cost: 1,
        p_cost: 1,
    }
}

fn info() -> SourceInfo {
    SourceInfo {
        strategy: "test-stream".into(),
        engine: "none".into(),
        engine_version: None,
        format: "bytes".into(),
        details: Default::default(),
    }
}

/// An in-memory stand-in for an engine's dump stream, handed out in pieces of a given
/// size (the real process source is tested below and in `backup::source`).
#[derive(Debug)]
struct BytesSource {
    data: Bytes,
    piece: usize,
}

#[async_trait::async_trait]
impl Source for BytesSource {
    fn info(&self) -> SourceInfo {
        info()
    }

    async fn open(&self) -> phoenix_adapters::Result<SourceOutput> {
        let data = self.data.clone();
        let piece = self.piece.max(1);
        let pieces: Vec<_> = (0..data.len())
            .step_by(piece)
            .map(|at| Ok(data.slice(at..(at + piece).min(data.len()))))
            .collect();
        Ok(SourceOutput::Stream(Box::pin(futures::stream::iter(
            pieces,
        ))))
    }
}

/// A snapshot source: a reference that needs no bytes.
#[derive(Debug)]
struct SnapshotSource;

#[async_trait::async_trait]
impl Source for SnapshotSource {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            strategy: "btrfs-snapshot".into(),
            engine: "postgresql".into(),
            engine_version: Some("15".into()),
            format: "btrfs-subvolume".into(),
            details: Default::default(),
        }
    }

    async fn open(&self) -> phoenix_adapters::Result<SourceOutput> {
        Ok(SourceOutput::Reference(SnapshotRef {
            provider: "btrfs".into(),
            id: "snapshots/i-1/b-1".into(),
            location: None,
            size_bytes: Some(4096),
            details: Default::default(),
        }))
    }
}

struct Env {
    dir: tempfile::TempDir,
    store: Arc<LocalStore>,
    master: MasterKey,
    instance: InstanceId,
    keys: BackupKeys,
}

impl Env {
    fn new(passphrase: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path().join("store")).unwrap());
        let master = random_master();
        let instance = InstanceId::parse("instance-1").unwrap();
        let keys = BackupKeys {
            instance: InstanceKey::generate(&master, &instance).unwrap(),
            passphrase: passphrase.map(|p| PassphraseKey::derive(p, cheap_kdf()).unwrap()),
        };
        Self {
            dir,
            store,
            master,
            instance,
            keys,
        }
    }

    fn request(&self, backup: &str, config: PipelineConfig) -> BackupRequest {
        BackupRequest {
            instance_id: self.instance.clone(),
            backup_id: BackupId::parse(backup).unwrap(),
            config,
        }
    }

    async fn backup(
        &self,
        source: &dyn Source,
        backup: &str,
        config: PipelineConfig,
    ) -> phoenix_adapters::Result<Manifest> {
        backup::run_backup(
            source,
            &self.request(backup, config),
            &self.keys,
            self.store.clone(),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
    }

    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    async fn stored_object(&self, manifest: &Manifest) -> Vec<u8> {
        let key = backup::manifest_data_object(manifest).unwrap();
        collect(self.store.get(&key).await.unwrap()).await.unwrap()
    }

    async fn replace_object(&self, manifest: &Manifest, bytes: Vec<u8>) {
        let key = backup::manifest_data_object(manifest).unwrap();
        let stream: ByteStream =
            Box::pin(futures::stream::once(async move { Ok(Bytes::from(bytes)) }));
        self.store.put(&key, stream).await.unwrap();
    }

    fn out_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Restores into a file through a writer sink: the result and what reached the file.
    async fn restore(
        &self,
        manifest: &Manifest,
        key: KeySource<'_>,
    ) -> (phoenix_adapters::Result<u64>, Vec<u8>) {
        let path = self.out_path("restored");
        let file = tokio::fs::File::create(&path).await.unwrap();
        let result = backup::restore(
            self.store(),
            manifest,
            key,
            Box::new(WriterSink::new(file)),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .map(|r| r.raw_bytes);
        (result, std::fs::read(&path).unwrap())
    }

    /// `phoenix decrypt < stored > out`: the result and what reached the output.
    async fn decrypt(
        &self,
        stored: Vec<u8>,
        key: KeySource<'_>,
    ) -> (phoenix_adapters::Result<u64>, Vec<u8>) {
        let path = self.out_path("decrypted");
        let file = tokio::fs::File::create(&path).await.unwrap();
        let result = backup::decrypt(
            std::io::Cursor::new(stored),
            file,
            key,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .map(|r| r.raw_bytes);
        (result, std::fs::read(&path).unwrap())
    }
}

async fn collect(mut stream: ByteStream) -> phoenix_adapters::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Lines like a plain SQL dump's COPY data: compressible, but not trivially.
fn dump_like(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut i = seed;
    while out.len() < len {
        i = i
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        out.extend_from_slice(
            format!(
                "{}\t2026-11-{:02} {:02}:{:02}:{:02}+00\t{}.{:02}\t{{\"sku\": \"A-{}\", \"qty\": {}}}\tcustomer {} ordered again\n",
                i % 1_000_000,
                i % 28 + 1,
                i % 24,
                i % 60,
                (i >> 8) % 60,
                (i >> 16) % 10_000,
                (i >> 24) % 100,
                (i >> 32) % 5000,
                (i >> 40) % 9 + 1,
                (i >> 44) % 777
            )
            .as_bytes(),
        );
    }
    out.truncate(len);
    out
}

fn random_data(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    random_bytes(&mut data).unwrap();
    data
}

fn uncompressed(chunk_size: u32) -> PipelineConfig {
    PipelineConfig {
        compression: CompressionConfig::None,
        chunk_size,
        queue_bytes: 64 * 1024,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn backup_then_restore_returns_the_source_bytes_across_chunk_boundaries(
        len in 1usize..40_000,
        piece in 1usize..5_000,
        dumpish in any::<bool>(),
        zstd_level in prop::option::of(1i32..6),
        seed in any::<u64>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let env = Env::new(None);
            let data = if dumpish { dump_like(seed, len) } else { random_data(len) };
            let config = PipelineConfig {
                compression: zstd_level.map_or(CompressionConfig::None, |level| CompressionConfig::Zstd { level, workers: 0 }),
                chunk_size: CHUNK,
                queue_bytes: 8 * 1024,
            };
            let source = BytesSource { data: Bytes::from(data.clone()), piece };
            let manifest = env.backup(&source, "b-1", config).await.unwrap();
            assert_eq!(manifest.raw_bytes, len as u64);
            let (result, restored) = env.restore(&manifest, KeySource::Master(&env.master)).await;
            assert_eq!(result.unwrap(), len as u64);
            assert!(restored == data, "restored bytes differ");
            let stored = env.stored_object(&manifest).await;
            let (result, decrypted) = env.decrypt(stored, KeySource::Master(&env.master)).await;
            result.unwrap();
            assert!(decrypted == data, "decrypted bytes differ");
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_megabyte_dump_round_trips_through_multithreaded_zstd() {
    let env = Env::new(None);
    let data = dump_like(7, 6 * 1024 * 1024 + 3);
    let config = PipelineConfig {
        compression: CompressionConfig::Zstd {
            level: 3,
            workers: 2,
        },
        ..PipelineConfig::default()
    };
    let source = BytesSource {
        data: Bytes::from(data.clone()),
        piece: 65_536,
    };
    let manifest = env.backup(&source, "big", config).await.unwrap();
    assert!(
        manifest.stored_bytes < manifest.raw_bytes / 3,
        "{manifest:?}"
    );
    let (result, restored) = env.restore(&manifest, KeySource::Master(&env.master)).await;
    result.unwrap();
    assert!(restored == data);
    let report = backup::verify(
        env.store(),
        &manifest,
        Some(KeySource::Master(&env.master)),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.raw_bytes, Some(data.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_records_the_backup_and_the_stored_bytes_hold_no_clear_key() {
    let env = Env::new(Some("a long passphrase"));
    let data = dump_like(1, 100_000);
    let manifest = env
        .backup(
            &BytesSource {
                data: Bytes::from(data),
                piece: 4096,
            },
            "b-1",
            PipelineConfig::default(),
        )
        .await
        .unwrap();
    let stored = env.stored_object(&manifest).await;
    assert_eq!(manifest.stored_bytes, stored.len() as u64);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &stored);
    assert_eq!(
        manifest.digest.as_ref().unwrap().value,
        hex::encode(digest.as_ref())
    );
    let ManifestSource::Stream { data_object } = &manifest.source else {
        panic!("a stream backup got {:?}", manifest.source);
    };
    let attempt = data_object
        .strip_prefix("backups/instance-1/b-1/data-")
        .unwrap_or_else(|| panic!("unexpected data object {data_object}"));
    assert!(attempt.len() == 16 && attempt.bytes().all(|b| b.is_ascii_hexdigit()));
    let encryption = manifest.encryption.as_ref().unwrap();
    assert_eq!(encryption.instance_key_id, env.keys.instance.id());
    assert!(encryption.passphrase);
    assert!(manifest.finished_at >= manifest.created_at);
    let (header, _) = Header::parse_prefix(&stored).unwrap().unwrap();
    assert_eq!(header.instance_id, env.instance);

    let stored_manifest =
        backup::read_manifest(env.store.as_ref(), &env.instance, &manifest.backup_id)
            .await
            .unwrap();
    assert_eq!(stored_manifest, manifest);
    let master_b64 =
        base64::engine::general_purpose::STANDARD.encode(env.master.key().expose_bytes());
    for file in files_under(env.dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes
                .windows(32)
                .any(|w| w == env.master.key().expose_bytes()),
            "{file:?}"
        );
        assert!(
            !bytes
                .windows(master_b64.len())
                .any(|w| w == master_b64.as_bytes()),
            "{file:?}"
        );
    }
    let listed = backup::list_backups(env.store.as_ref(), &env.instance)
        .await
        .unwrap();
    assert_eq!(listed, vec![manifest]);
}

/// A backup of 10,000 random bytes in 1 KiB chunks without compression: 9 full chunks
/// and a final one, so damage can be aimed at a chunk.
async fn ten_chunk_backup(env: &Env) -> (Manifest, Vec<u8>, Vec<u8>, usize) {
    let data = random_data(10_000);
    let manifest = env
        .backup(
            &BytesSource {
                data: Bytes::from(data.clone()),
                piece: 777,
            },
            "b-1",
            uncompressed(CHUNK),
        )
        .await
        .unwrap();
    let stored = env.stored_object(&manifest).await;
    let (_, header_len) = Header::parse_prefix(&stored).unwrap().unwrap();
    assert_eq!(
        stored.len(),
        header_len + 9 * SEALED + (10_000 - 9 * 1024) + 16
    );
    (manifest, data, stored, header_len)
}

fn chunk(stored: &[u8], h: usize, i: usize) -> std::ops::Range<usize> {
    h + i * SEALED..(h + (i + 1) * SEALED).min(stored.len())
}

/// The output of a failed decryption is the authenticated prefix, never more.
fn assert_only_a_good_prefix_passed(output: &[u8], data: &[u8], at_most_chunks: usize) {
    assert!(
        output.len() <= at_most_chunks * CHUNK as usize,
        "{} bytes passed on",
        output.len()
    );
    assert!(
        data.starts_with(output),
        "bytes that are not the backup's were passed on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_rejects_a_backup_with_a_flipped_byte() {
    let env = Env::new(None);
    let (manifest, data, mut stored, h) = ten_chunk_backup(&env).await;
    let at = chunk(&stored, h, 3).start + 100;
    stored[at] ^= 0x01;
    let (result, output) = env
        .decrypt(stored.clone(), KeySource::Master(&env.master))
        .await;
    assert!(
        matches!(result, Err(Error::Integrity(ref m)) if m.contains("chunk 3")),
        "{result:?}"
    );
    assert_only_a_good_prefix_passed(&output, &data, 3);

    env.replace_object(&manifest, stored).await;
    let (result, output) = env.restore(&manifest, KeySource::Master(&env.master)).await;
    assert!(matches!(result, Err(Error::Integrity(_))), "{result:?}");
    assert_only_a_good_prefix_passed(&output, &data, 3);
    let unkeyed = backup::verify(
        env.store(),
        &manifest,
        None,
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(unkeyed, Err(Error::Integrity(ref m)) if m.contains("SHA-256")),
        "{unkeyed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_rejects_a_truncated_object() {
    let env = Env::new(None);
    let (manifest, data, stored, h) = ten_chunk_backup(&env).await;
    // Cut at a chunk boundary: every remaining chunk is intact, the final one is missing.
    let at_boundary = stored[..chunk(&stored, h, 5).start].to_vec();
    let (result, output) = env
        .decrypt(at_boundary.clone(), KeySource::Master(&env.master))
        .await;
    assert!(
        matches!(result, Err(Error::Integrity(ref m)) if m.contains("without its final chunk")),
        "{result:?}"
    );
    assert_only_a_good_prefix_passed(&output, &data, 5);
    // Cut inside the final chunk.
    let (result, output) = env
        .decrypt(
            stored[..stored.len() - 10].to_vec(),
            KeySource::Master(&env.master),
        )
        .await;
    assert!(matches!(result, Err(Error::Integrity(_))), "{result:?}");
    assert_only_a_good_prefix_passed(&output, &data, 9);
    // Cut inside the header.
    let (result, output) = env
        .decrypt(stored[..h - 1].to_vec(), KeySource::Master(&env.master))
        .await;
    assert!(matches!(result, Err(Error::Integrity(_))), "{result:?}");
    assert!(output.is_empty());

    env.replace_object(&manifest, at_boundary).await;
    let unkeyed = backup::verify(
        env.store(),
        &manifest,
        None,
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await;
    assert!(matches!(unkeyed, Err(Error::Integrity(_))), "{unkeyed:?}");
    let (result, _) = env.restore(&manifest, KeySource::Master(&env.master)).await;
    assert!(matches!(result, Err(Error::Integrity(_))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_rejects_a_reordered_chunk() {
    let env = Env::new(None);
    let (_, data, stored, h) = ten_chunk_backup(&env).await;
    let mut reordered = stored[..h].to_vec();
    for i in [0, 1, 3, 2, 4, 5, 6, 7, 8, 9] {
        reordered.extend_from_slice(&stored[chunk(&stored, h, i)]);
    }
    assert_eq!(reordered.len(), stored.len());
    let (result, output) = env.decrypt(reordered, KeySource::Master(&env.master)).await;
    assert!(
        matches!(result, Err(Error::Integrity(ref m)) if m.contains("chunk 2")),
        "{result:?}"
    );
    assert_only_a_good_prefix_passed(&output, &data, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_rejects_a_duplicated_chunk() {
    let env = Env::new(None);
    let (_, data, stored, h) = ten_chunk_backup(&env).await;
    let mut duplicated = stored[..chunk(&stored, h, 5).end].to_vec();
    duplicated.extend_from_slice(&stored[chunk(&stored, h, 4).start..]);
    let (result, output) = env
        .decrypt(duplicated, KeySource::Master(&env.master))
        .await;
    assert!(
        matches!(result, Err(Error::Integrity(ref m)) if m.contains("chunk 6")),
        "{result:?}"
    );
    assert_only_a_good_prefix_passed(&output, &data, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_key_opens_nothing() {
    let env = Env::new(None);
    let (manifest, _, stored, _) = ten_chunk_backup(&env).await;
    let other = random_master();
    let (result, output) = env.decrypt(stored, KeySource::Master(&other)).await;
    assert!(matches!(result, Err(Error::WrongKey)), "{result:?}");
    assert!(output.is_empty());
    let (result, output) = env.restore(&manifest, KeySource::Master(&other)).await;
    assert!(matches!(result, Err(Error::WrongKey)), "{result:?}");
    assert!(output.is_empty());
    let keyed = backup::verify(
        env.store(),
        &manifest,
        Some(KeySource::Master(&other)),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await;
    assert!(matches!(keyed, Err(Error::WrongKey)), "{keyed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_passphrase_alone_decrypts_offline_and_a_wrong_one_opens_nothing() {
    let env = Env::new(Some("correct horse battery staple"));
    let data = dump_like(3, 50_000);
    let manifest = env
        .backup(
            &BytesSource {
                data: Bytes::from(data.clone()),
                piece: 1000,
            },
            "b-1",
            PipelineConfig::default(),
        )
        .await
        .unwrap();
    let stored = env.stored_object(&manifest).await;
    let (result, output) = env
        .decrypt(
            stored.clone(),
            KeySource::Passphrase("correct horse battery staple"),
        )
        .await;
    result.unwrap();
    assert!(output == data);
    let (result, output) = env
        .decrypt(stored, KeySource::Passphrase("incorrect horse"))
        .await;
    assert!(matches!(result, Err(Error::WrongKey)), "{result:?}");
    assert!(output.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_without_a_passphrase_refuses_one() {
    let env = Env::new(None);
    let (_, _, stored, _) = ten_chunk_backup(&env).await;
    let (result, output) = env.decrypt(stored, KeySource::Passphrase("anything")).await;
    assert!(matches!(result, Err(Error::Invalid(_))), "{result:?}");
    assert!(output.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_passphrase_key_keeps_wrapping_scheduled_backups() {
    let mut env = Env::new(None);
    // Set once by the user; the broker keeps only the sealed form.
    let sealed = PassphraseKey::derive("pass phrase", cheap_kdf())
        .unwrap()
        .seal(&env.master, &env.instance)
        .unwrap();
    env.keys.passphrase =
        Some(PassphraseKey::open_sealed(&env.master, &env.instance, &sealed).unwrap());
    let data = dump_like(4, 10_000);
    let manifest = env
        .backup(
            &BytesSource {
                data: Bytes::from(data.clone()),
                piece: 1000,
            },
            "b-1",
            PipelineConfig::default(),
        )
        .await
        .unwrap();
    let stored = env.stored_object(&manifest).await;
    let (result, output) = env
        .decrypt(stored, KeySource::Passphrase("pass phrase"))
        .await;
    result.unwrap();
    assert!(output == data);
}

async fn assert_nothing_stored(env: &Env, backup: &str) {
    let backup = BackupId::parse(backup).unwrap();
    let err = backup::read_manifest(env.store.as_ref(), &env.instance, &backup)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let files = files_under(env.store.root());
    assert!(files.is_empty(), "a failed backup left {files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_exits_non_zero_fails_the_backup_and_leaves_nothing() {
    let env = Env::new(None);
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new(
            "/bin/sh",
            [
                "-c",
                "head -c 3000000 /dev/urandom; echo 'pg_dump: error: connection lost' >&2; exit 3",
            ],
        ),
    );
    let err = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ProcessFailed { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("exit status: 3") && text.contains("connection lost"),
        "{text}"
    );
    assert_nothing_stored(&env, "b-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_writes_nothing_fails_the_backup_and_leaves_nothing() {
    let env = Env::new(None);
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new("/bin/true", Vec::<String>::new()),
    );
    let err = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ProcessFailed { .. }), "{err}");
    assert_nothing_stored(&env, "b-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_by_a_signal_fails_the_backup() {
    let env = Env::new(None);
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new("/bin/sh", ["-c", "head -c 100000 /dev/urandom; kill -9 $$"]),
    );
    let err = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("signal"), "{err}");
    assert_nothing_stored(&env, "b-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_process_source_is_backed_up_and_restored_through_a_process_sink() {
    let env = Env::new(None);
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new("/bin/sh", ["-c", "seq 1 200000"]),
    );
    let manifest = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap();
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(manifest.raw_bytes, expected.len() as u64);
    let target = env.out_path("restored-by-process");
    let sink = ProcessSink::new(
        ProcessCommand::new("/bin/sh", ["-c", "cat > \"$TARGET\""])
            .env("TARGET", target.to_str().unwrap()),
    );
    let report = backup::restore(
        env.store(),
        &manifest,
        KeySource::Master(&env.master),
        Box::new(sink),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.raw_bytes, expected.len() as u64);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_process_that_fails_fails_the_restore() {
    let env = Env::new(None);
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new("/bin/sh", ["-c", "seq 1 100000"]),
    );
    let manifest = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap();
    let sink = ProcessSink::new(ProcessCommand::new(
        "/bin/sh",
        [
            "-c",
            "head -c 1000 >/dev/null; echo 'psql: syntax error' >&2; exit 1",
        ],
    ));
    let err = backup::restore(
        env.store(),
        &manifest,
        KeySource::Master(&env.master),
        Box::new(sink),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::ProcessFailed { .. }) && err.to_string().contains("syntax error"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_backup_kills_the_source_process_and_stores_nothing() {
    let env = Env::new(None);
    let pid_file = env.out_path("source.pid");
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new(
            "/bin/sh",
            ["-c", "echo $$ > \"$PID_FILE\"; exec cat /dev/zero"],
        )
        .env("PID_FILE", pid_file.to_str().unwrap()),
    );
    let cancel = CancellationToken::new();
    let progress = Progress::new();
    let request = env.request("b-1", PipelineConfig::default());
    let running = backup::run_backup(
        &source,
        &request,
        &env.keys,
        env.store(),
        &progress,
        &cancel,
    );
    let canceller = async {
        while progress.snapshot().stages.first().map_or(0, |s| s.bytes) < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(running, canceller);
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the source process {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_nothing_stored(&env, "b-1").await;
}

/// Waits until `pid` is gone or a zombie; panics if it keeps running.
async fn assert_process_ends(pid: i32, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_restore_kills_a_restore_process_that_is_finishing_after_its_input() {
    let env = Env::new(None);
    let source = ProcessSource::new(info(), ProcessCommand::new("/bin/sh", ["-c", "seq 1 1000"]));
    let manifest = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap();
    let pid_file = env.out_path("sink.pid");
    // Reads all its input, then goes on working (as pg_restore creating indexes).
    let sink = ProcessSink::new(
        ProcessCommand::new(
            "/bin/sh",
            [
                "-c",
                "cat >/dev/null; echo $$ > \"$PID_FILE.tmp\"; mv \"$PID_FILE.tmp\" \"$PID_FILE\"; exec sleep 600",
            ],
        )
        .env("PID_FILE", pid_file.to_str().unwrap()),
    );
    let cancel = CancellationToken::new();
    let progress = Progress::new();
    let restoring = backup::restore(
        env.store(),
        &manifest,
        KeySource::Master(&env.master),
        Box::new(sink),
        &progress,
        &cancel,
    );
    let canceller = async {
        let pid: i32 = loop {
            if let Ok(text) = std::fs::read_to_string(&pid_file) {
                break text.trim().parse().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Cancel only once the input is consumed and the process runs `sleep`.
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n"
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        pid
    };
    let (result, pid) = tokio::join!(restoring, canceller);
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_process_ends(pid, "the restore process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_source_gets_a_manifest_and_no_data_object() {
    let env = Env::new(None);
    let manifest = env
        .backup(&SnapshotSource, "snap-1", PipelineConfig::default())
        .await
        .unwrap();
    assert!(
        matches!(&manifest.source, ManifestSource::Reference { snapshot } if snapshot.provider == "btrfs")
    );
    assert_eq!(manifest.stored_bytes, 0);
    let files = files_under(env.store.root());
    assert_eq!(files.len(), 1, "{files:?}");
    let (result, _) = env.restore(&manifest, KeySource::Master(&env.master)).await;
    assert!(matches!(result, Err(Error::Invalid(_))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_id_that_exists_is_not_overwritten() {
    let env = Env::new(None);
    let source = BytesSource {
        data: Bytes::from_static(b"first"),
        piece: 10,
    };
    let first = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap();
    let again = env
        .backup(&source, "b-1", PipelineConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(again, Error::Invalid(_)), "{again}");
    let (result, output) = env.restore(&first, KeySource::Master(&env.master)).await;
    result.unwrap();
    assert_eq!(output, b"first");
    backup::delete_backup(env.store.as_ref(), &env.instance, &first.backup_id)
        .await
        .unwrap();
    assert_nothing_stored(&env, "b-1").await;
}

/// A test wrapper around [`LocalStore`] that sleeps on every chunk it receives, standing
/// in for a slow network store, and records the pipeline's figures at each chunk.
#[derive(Debug)]
struct SlowStoreForBackpressureTest {
    inner: LocalStore,
    delay: Duration,
    progress: Progress,
    /// (bytes received by storage so far, bytes read by the source, bytes in flight)
    samples: Arc<Mutex<Vec<(u64, u64, u64)>>>,
}

#[async_trait::async_trait]
impl Store for SlowStoreForBackpressureTest {
    async fn put(&self, key: &ObjectKey, data: ByteStream) -> phoenix_adapters::Result<u64> {
        let delay = self.delay;
        let progress = self.progress.clone();
        // Only the data object is sampled; the manifest comes after the whole stream.
        let sampling = !key.as_str().ends_with("/manifest.json");
        let samples = Arc::clone(&self.samples);
        let mut received = 0u64;
        let slowed = data.then(move |item| {
            let progress = progress.clone();
            let samples = Arc::clone(&samples);
            if let Ok(chunk) = &item {
                received += chunk.len() as u64;
            }
            let received = received;
            async move {
                tokio::time::sleep(delay).await;
                let snapshot = progress.snapshot();
                let source = snapshot.stages.first().map_or(0, |s| s.bytes);
                if sampling {
                    samples
                        .lock()
                        .unwrap()
                        .push((received, source, snapshot.in_flight_bytes));
                }
                item
            }
        });
        self.inner.put(key, Box::pin(slowed)).await
    }

    async fn get(&self, key: &ObjectKey) -> phoenix_adapters::Result<ByteStream> {
        self.inner.get(key).await
    }

    async fn stat(&self, key: &ObjectKey) -> phoenix_adapters::Result<ObjectInfo> {
        self.inner.stat(key).await
    }

    async fn list(&self, prefix: &str) -> phoenix_adapters::Result<Vec<ObjectInfo>> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &ObjectKey) -> phoenix_adapters::Result<()> {
        self.inner.delete(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_storage_output_holds_bytes_in_flight_under_the_queue_bounds() {
    let env = Env::new(None);
    let progress = Progress::new();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(SlowStoreForBackpressureTest {
        inner: LocalStore::new(env.dir.path().join("slow")).unwrap(),
        delay: Duration::from_millis(2),
        progress: progress.clone(),
        samples: Arc::clone(&samples),
    });
    const QUEUE: u32 = 64 * 1024;
    const TOTAL: u64 = 16 << 20;
    let config = PipelineConfig {
        compression: CompressionConfig::Zstd {
            level: 1,
            workers: 0,
        },
        chunk_size: 16 * 1024,
        queue_bytes: QUEUE,
    };
    // Random bytes do not compress: what storage receives tracks what the source read.
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new("/bin/sh", ["-c", &format!("head -c {TOTAL} /dev/urandom")]),
    );
    let manifest = backup::run_backup(
        &source,
        &env.request("b-1", config),
        &env.keys,
        store,
        &progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(manifest.raw_bytes, TOTAL);

    let snapshot = progress.snapshot();
    let queues = 4; // source -> zstd -> encrypt -> digest -> storage
    assert_eq!(snapshot.queue_bound_bytes, queues * u64::from(QUEUE));
    assert!(
        snapshot.peak_in_flight_bytes <= snapshot.queue_bound_bytes,
        "peak {} above the bound {}",
        snapshot.peak_in_flight_bytes,
        snapshot.queue_bound_bytes
    );
    assert!(
        snapshot.peak_in_flight_bytes >= u64::from(QUEUE),
        "the queues never filled ({}): the storage was not the bottleneck",
        snapshot.peak_in_flight_bytes
    );
    // Besides the queues, each stage holds at most one buffer: a source read (256 KiB),
    // zstd's output buffer and internal block (128 KiB each), one encrypted chunk.
    let stage_buffers = 256 * 1024 + 2 * 128 * 1024 + 2 * 16 * 1024;
    let bound = snapshot.queue_bound_bytes + stage_buffers;
    let samples = samples.lock().unwrap();
    assert!(samples.len() > 100);
    for &(received, source, in_flight) in samples.iter() {
        assert!(
            in_flight <= snapshot.queue_bound_bytes,
            "{in_flight} bytes in flight"
        );
        assert!(
            source <= received + bound,
            "the source ran {} bytes ahead of storage (bound {bound})",
            source - received
        );
    }
}

/// The testbed's PostgreSQL: a superuser URL and the binaries of its version.
fn testbed_postgres() -> (String, PathBuf) {
    let url = std::env::var("PHOENIX_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("PHOENIX_TEST_POSTGRES_URL is not set: start the testbed with `scripts/testbed/up` and `source .testbed/env`")
    });
    let bin = std::env::var("PHOENIX_TEST_PG_BIN").unwrap_or_else(|_| {
        panic!("PHOENIX_TEST_PG_BIN is not set: start the testbed with `scripts/testbed/up` and `source .testbed/env`")
    });
    (url, PathBuf::from(bin))
}

/// A PostgreSQL client tool connecting to `database` of the server at `url`, with the
/// connection (and password) in its environment, never on its command line.
fn pg_tool(url: &str, bin: &Path, tool: &str, args: &[&str], database: &str) -> ProcessCommand {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    let mut command = ProcessCommand::new(bin.join(tool), args.iter().copied())
        .env("PGHOST", host)
        .env(
            "PGPORT",
            config
                .get_ports()
                .first()
                .copied()
                .unwrap_or(5432)
                .to_string(),
        )
        .env("PGUSER", config.get_user().unwrap_or("postgres"))
        .env("PGDATABASE", database);
    if let Some(password) = config.get_password() {
        command = command.env("PGPASSWORD", String::from_utf8_lossy(password));
    }
    command
}

async fn pg_connect(url: &str, database: Option<&str>) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    if let Some(database) = database {
        config.dbname(database);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Fresh, uniquely named databases on the testbed server, dropped at the end.
struct Databases {
    url: String,
    names: Vec<String>,
}

impl Databases {
    async fn create(url: &str, count: usize) -> Self {
        let admin = pg_connect(url, None).await;
        let mut tag = [0u8; 5];
        random_bytes(&mut tag).unwrap();
        let names: Vec<String> = (0..count)
            .map(|i| format!("pipeline_{}_{i}", hex::encode(tag)))
            .collect();
        for name in &names {
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
        }
        Self {
            url: url.to_owned(),
            names,
        }
    }

    async fn drop_all(self) {
        let admin = pg_connect(&self.url, None).await;
        for name in &self.names {
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .unwrap();
        }
    }
}

/// Row count, sums and a hash over every column: equal only if the data is.
async fn fingerprint(url: &str, database: &str) -> (i64, String) {
    let client = pg_connect(url, Some(database)).await;
    let row = client
        .query_one(
            "SELECT count(*), md5(string_agg(format('%s|%s|%s|%s|%s|%s', id, created, amount, token, doc, encode(blob, 'hex')), ',' ORDER BY id)) FROM orders",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_dump_backup_restores_into_a_fresh_database_with_pg_restore() {
    let (url, bin) = testbed_postgres();
    let databases = Databases::create(&url, 2).await;
    let (source_db, target_db) = (databases.names[0].clone(), databases.names[1].clone());
    pg_connect(&url, Some(&source_db))
        .await
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, created timestamptz, amount numeric(12,2), token text, doc jsonb, blob bytea);
             INSERT INTO orders SELECT i, timestamptz '2026-01-01' + i * interval '17 seconds', (i * 7919 % 100000) / 100.0,
                    md5(i::text), jsonb_build_object('sku', 'A-' || (i % 500), 'qty', i % 9, 'note', repeat('x', i % 50)),
                    decode(md5((i * 3)::text), 'hex')
             FROM generate_series(1, 30000) AS i;",
        )
        .await
        .unwrap();

    let env = Env::new(None);
    let source = ProcessSource::new(
        SourceInfo {
            strategy: "pg_dump".into(),
            engine: "postgresql".into(),
            engine_version: Some("15".into()),
            format: "pg_dump-custom".into(),
            details: Default::default(),
        },
        pg_tool(
            &url,
            &bin,
            "pg_dump",
            &["--format=custom", "--compress=0", "--no-owner"],
            &source_db,
        ),
    );
    let manifest = env
        .backup(&source, "pg-1", PipelineConfig::default())
        .await
        .unwrap();
    assert!(manifest.raw_bytes > 1_000_000, "{manifest:?}");
    assert!(manifest.stored_bytes < manifest.raw_bytes);

    let sink = ProcessSink::new(pg_tool(
        &url,
        &bin,
        "pg_restore",
        &["--no-owner", "--exit-on-error", "--dbname", &target_db],
        &target_db,
    ));
    let report = backup::restore(
        env.store(),
        &manifest,
        KeySource::Master(&env.master),
        Box::new(sink),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.raw_bytes, manifest.raw_bytes);
    let original = fingerprint(&url, &source_db).await;
    assert_eq!(original.0, 30_000);
    assert_eq!(fingerprint(&url, &target_db).await, original);
    databases.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_dump_that_fails_fails_the_backup_and_leaves_nothing() {
    let (url, bin) = testbed_postgres();
    let env = Env::new(None);
    let source = ProcessSource::new(
        info(),
        pg_tool(
            &url,
            &bin,
            "pg_dump",
            &["--format=custom"],
            "no_such_database_here",
        ),
    );
    let err = env
        .backup(&source, "pg-1", PipelineConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ProcessFailed { .. })
            && err.to_string().contains("no_such_database_here"),
        "{err}"
    );
    assert_nothing_stored(&env, "pg-1").await;
}

/// A backup of 12 MB that does not compress (so it crosses S3 parts and Swift segments)
/// round trips through a remote store; then a failing source leaves nothing there, not
/// even pieces of its upload; then deleting the backup empties the instance's prefix.
async fn round_trip_on(fixture: Fixture) {
    let master = random_master();
    let instance = InstanceId::parse(fixture.prefix.trim_end_matches('/')).unwrap();
    let keys = BackupKeys {
        instance: InstanceKey::generate(&master, &instance).unwrap(),
        passphrase: None,
    };
    let request = |backup: &str| BackupRequest {
        instance_id: instance.clone(),
        backup_id: BackupId::parse(backup).unwrap(),
        config: PipelineConfig {
            compression: CompressionConfig::Zstd {
                level: 1,
                workers: 0,
            },
            ..PipelineConfig::default()
        },
    };
    let data = random_data(12 << 20);
    let source = BytesSource {
        data: Bytes::from(data.clone()),
        piece: 65_536,
    };
    let manifest = backup::run_backup(
        &source,
        &request("good"),
        &keys,
        fixture.store.clone(),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(manifest.stored_bytes > 12 << 20);
    let stored_manifest =
        backup::read_manifest(fixture.store.as_ref(), &instance, &manifest.backup_id)
            .await
            .unwrap();
    assert_eq!(stored_manifest, manifest);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restored");
    let file = tokio::fs::File::create(&path).await.unwrap();
    backup::restore(
        fixture.store.clone(),
        &manifest,
        KeySource::Master(&master),
        Box::new(WriterSink::new(file)),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(
        std::fs::read(&path).unwrap() == data,
        "restored bytes differ"
    );
    let report = backup::verify(
        fixture.store.clone(),
        &manifest,
        None,
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.stored_bytes, manifest.stored_bytes);

    let failing = ProcessSource::new(
        info(),
        ProcessCommand::new("/bin/sh", ["-c", "head -c 12000000 /dev/urandom; exit 3"]),
    );
    let err = backup::run_backup(
        &failing,
        &request("bad"),
        &keys,
        fixture.store.clone(),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::ProcessFailed { .. }), "{err}");
    let backups = format!("backups/{instance}/");
    let names = |objects: Vec<ObjectInfo>| {
        objects
            .into_iter()
            .map(|o| o.key.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(fixture.store.list(&backups).await.unwrap()),
        [
            backup::manifest_data_object(&manifest).unwrap().to_string(),
            format!("{backups}good/manifest.json")
        ]
    );
    let sweeper = fixture.sweeper.clone();
    let prefix = backups.clone();
    eventually("the failed upload's pieces are removed", || {
        let sweeper = sweeper.clone();
        let prefix = prefix.clone();
        async move { Ok(sweeper.leftovers(&prefix).await?.is_empty()) }
    })
    .await;

    backup::delete_backup(fixture.store.as_ref(), &instance, &manifest.backup_id)
        .await
        .unwrap();
    assert!(fixture.store.list(&backups).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_round_trip_through_s3_and_a_failed_one_leaves_nothing() {
    round_trip_on(s3_fixture().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_round_trip_through_swift_and_a_failed_one_leaves_nothing() {
    round_trip_on(swift_fixture().await).await;
}

/// A test wrapper around [`LocalStore`] whose upload fails after `after` bytes, standing
/// in for a storage server that dies in the middle of an upload.
#[derive(Debug)]
struct StoreThatDiesMidUploadForTest {
    inner: LocalStore,
    after: u64,
}

#[async_trait::async_trait]
impl Store for StoreThatDiesMidUploadForTest {
    async fn put(&self, key: &ObjectKey, data: ByteStream) -> phoenix_adapters::Result<u64> {
        let after = self.after;
        let dying = data.scan(0u64, move |sent, item| {
            let item = match item {
                Ok(chunk) if *sent + chunk.len() as u64 > after => Err(Error::Storage {
                    message: "connection reset by the test's dying server".into(),
                    retryable: false,
                    source: None,
                }),
                other => other,
            };
            if let Ok(chunk) = &item {
                *sent += chunk.len() as u64;
            }
            futures::future::ready(Some(item))
        });
        self.inner.put(key, Box::pin(dying)).await
    }

    async fn get(&self, key: &ObjectKey) -> phoenix_adapters::Result<ByteStream> {
        self.inner.get(key).await
    }

    async fn stat(&self, key: &ObjectKey) -> phoenix_adapters::Result<ObjectInfo> {
        self.inner.stat(key).await
    }

    async fn list(&self, prefix: &str) -> phoenix_adapters::Result<Vec<ObjectInfo>> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &ObjectKey) -> phoenix_adapters::Result<()> {
        self.inner.delete(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_mid_upload_is_the_reported_error_and_stops_an_endless_source() {
    let env = Env::new(None);
    let root = env.dir.path().join("dying");
    let store = Arc::new(StoreThatDiesMidUploadForTest {
        inner: LocalStore::new(&root).unwrap(),
        after: 3 << 20,
    });
    // The source never ends by itself: only the pipeline's cancellation stops it.
    let source = ProcessSource::new(
        info(),
        ProcessCommand::new("/bin/sh", ["-c", "exec cat /dev/urandom"]),
    );
    let err = backup::run_backup(
        &source,
        &env.request("b-1", PipelineConfig::default()),
        &env.keys,
        store,
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("dying server"),
        "the reported error is {err}"
    );
    let files = files_under(&root);
    assert!(files.is_empty(), "a failed backup left {files:?}");
}

/// A source that sends some bytes, tells the test it runs, then waits for the test to
/// say whether it ends well (more bytes) or fails: one attempt of a backup overtaken by
/// another attempt of the same backup ID.
#[derive(Debug)]
struct GatedSource {
    opened: Arc<tokio::sync::Notify>,
    gate: Mutex<Option<tokio::sync::oneshot::Receiver<bool>>>,
}

impl GatedSource {
    fn new() -> (
        Self,
        Arc<tokio::sync::Notify>,
        tokio::sync::oneshot::Sender<bool>,
    ) {
        let opened = Arc::new(tokio::sync::Notify::new());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let source = Self {
            opened: Arc::clone(&opened),
            gate: Mutex::new(Some(rx)),
        };
        (source, opened, tx)
    }
}

#[async_trait::async_trait]
impl Source for GatedSource {
    fn info(&self) -> SourceInfo {
        info()
    }

    async fn open(&self) -> phoenix_adapters::Result<SourceOutput> {
        let gate = self.gate.lock().unwrap().take().unwrap();
        self.opened.notify_one();
        let tail = futures::stream::once(async move {
            match gate.await {
                Ok(true) => Ok(Bytes::from(random_data(5000))),
                _ => Err(Error::Integrity(
                    "the overtaken attempt's source failed".into(),
                )),
            }
        });
        Ok(SourceOutput::Stream(Box::pin(
            futures::stream::once(async { Ok(Bytes::from(random_data(5000))) }).chain(tail),
        )))
    }
}

/// Runs an attempt of backup `b-1` that waits while a second attempt of `b-1` completes,
/// then ends as `late_attempt_succeeds` says. Returns the late attempt's result, the
/// completed attempt's manifest and its source bytes.
async fn overtaken_attempt(
    env: &Env,
    late_attempt_succeeds: bool,
) -> (phoenix_adapters::Result<Manifest>, Manifest, Vec<u8>) {
    let (late_source, opened, gate) = GatedSource::new();
    let data = random_data(20_000);
    let late = env.backup(&late_source, "b-1", PipelineConfig::default());
    let winner = async {
        opened.notified().await;
        let manifest = env
            .backup(
                &BytesSource {
                    data: Bytes::from(data.clone()),
                    piece: 4096,
                },
                "b-1",
                PipelineConfig::default(),
            )
            .await
            .unwrap();
        gate.send(late_attempt_succeeds).unwrap();
        manifest
    };
    let (late_result, manifest) = tokio::join!(late, winner);
    (late_result, manifest, data)
}

async fn assert_only_the_completed_backup_is_stored(env: &Env, manifest: &Manifest, data: &[u8]) {
    let data_object = backup::manifest_data_object(manifest).unwrap();
    let mut files: Vec<_> = files_under(env.store.root())
        .into_iter()
        .map(|f| {
            f.strip_prefix(env.store.root())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            data_object.to_string(),
            "backups/instance-1/b-1/manifest.json".to_owned()
        ]
    );
    let stored = backup::read_manifest(env.store.as_ref(), &env.instance, &manifest.backup_id)
        .await
        .unwrap();
    assert_eq!(&stored, manifest);
    let (result, restored) = env.restore(manifest, KeySource::Master(&env.master)).await;
    assert_eq!(result.unwrap(), data.len() as u64);
    assert!(restored == data, "the completed backup does not restore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_attempt_deletes_only_its_own_data_not_that_of_a_completed_rerun() {
    let env = Env::new(None);
    let (late, manifest, data) = overtaken_attempt(&env, false).await;
    let err = late.unwrap_err();
    assert!(err.to_string().contains("overtaken attempt"), "{err}");
    assert_only_the_completed_backup_is_stored(&env, &manifest, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_finishing_after_another_completed_keeps_the_first_manifest() {
    let env = Env::new(None);
    let (late, manifest, data) = overtaken_attempt(&env, true).await;
    let err = late.unwrap_err();
    assert!(
        matches!(err, Error::Invalid(_)) && err.to_string().contains("already exists"),
        "{err}"
    );
    assert_only_the_completed_backup_is_stored(&env, &manifest, &data).await;
}

async fn put_bytes(store: &dyn Store, key: &str, bytes: Vec<u8>) {
    let stream: ByteStream = Box::pin(futures::stream::once(async move { Ok(Bytes::from(bytes)) }));
    store
        .put(&ObjectKey::parse(key).unwrap(), stream)
        .await
        .unwrap();
}

async fn small_backup(env: &Env, backup: &str) -> (Manifest, Vec<u8>) {
    let data = random_data(3000);
    let manifest = env
        .backup(
            &BytesSource {
                data: Bytes::from(data.clone()),
                piece: 1000,
            },
            backup,
            PipelineConfig::default(),
        )
        .await
        .unwrap();
    (manifest, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_pointing_outside_its_backup_is_refused() {
    let env = Env::new(None);
    let (first, _) = small_backup(&env, "b-1").await;
    let (second, _) = small_backup(&env, "b-2").await;
    let other = backup::manifest_data_object(&first).unwrap().to_string();
    for target in [
        other.as_str(),
        "backups/instance-1/b-2/manifest.json",
        "backups/instance-1/b-2/../b-1/data-00",
        "elsewhere/data-00",
    ] {
        let mut hostile = second.clone();
        hostile.source = ManifestSource::Stream {
            data_object: target.to_owned(),
        };
        let err = backup::verify(
            env.store(),
            &hostile,
            None,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, Error::Integrity(_)) && err.to_string().contains("not a data object"),
            "{target}: {err}"
        );
        let (result, restored) = env.restore(&hostile, KeySource::Master(&env.master)).await;
        assert!(matches!(result, Err(Error::Integrity(_))), "{target}");
        assert!(restored.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_delivers_another_length_than_the_manifest_fails() {
    let env = Env::new(None);
    let (mut manifest, data) = small_backup(&env, "b-1").await;
    manifest.raw_bytes += 1;
    let (result, restored) = env.restore(&manifest, KeySource::Master(&env.master)).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, Error::Integrity(_)) && err.to_string().contains("manifest says"),
        "{err}"
    );
    assert!(restored == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_skips_unreadable_manifests_and_returns_the_good_ones() {
    let env = Env::new(None);
    let (good, _) = small_backup(&env, "good").await;
    let (other, _) = small_backup(&env, "other").await;
    let store = env.store.as_ref();
    put_bytes(
        store,
        "backups/instance-1/damaged/manifest.json",
        b"{ not json".to_vec(),
    )
    .await;
    // A copy of another backup's manifest.
    put_bytes(
        store,
        "backups/instance-1/copied/manifest.json",
        good.to_json().unwrap(),
    )
    .await;
    // A manifest of a later layout, with a field this build does not know.
    let mut newer: serde_json::Value = serde_json::from_slice(&other.to_json().unwrap()).unwrap();
    newer["backup_id"] = "newer".into();
    newer["retention_class"] = "gold".into();
    put_bytes(
        store,
        "backups/instance-1/newer/manifest.json",
        serde_json::to_vec(&newer).unwrap(),
    )
    .await;
    let listed = backup::list_backups(store, &env.instance).await.unwrap();
    assert_eq!(listed, vec![good, other]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeping_deletes_old_data_objects_without_a_manifest_and_keeps_backups() {
    let env = Env::new(None);
    let (manifest, data) = small_backup(&env, "b-1").await;
    let store = env.store.as_ref();
    let orphans = [
        "backups/instance-1/b-1/data-00ff00ff00ff00ff",
        "backups/instance-1/crashed/data-0123456789abcdef",
    ];
    for orphan in orphans {
        put_bytes(store, orphan, b"debris".to_vec()).await;
    }
    put_bytes(
        store,
        "backups/instance-1/damaged/manifest.json",
        b"{".to_vec(),
    )
    .await;
    put_bytes(
        store,
        "backups/instance-1/damaged/data-aa",
        b"kept".to_vec(),
    )
    .await;

    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    let swept = backup::sweep_orphans(store, &env.instance, past)
        .await
        .unwrap();
    assert!(swept.is_empty(), "recent objects were swept: {swept:?}");

    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut swept: Vec<String> = backup::sweep_orphans(store, &env.instance, future)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.to_string())
        .collect();
    swept.sort();
    assert_eq!(swept, orphans);
    let mut left: Vec<String> = store
        .list("backups/instance-1/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key.to_string())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            backup::manifest_data_object(&manifest).unwrap().to_string(),
            "backups/instance-1/b-1/manifest.json".to_owned(),
            "backups/instance-1/damaged/data-aa".to_owned(),
            "backups/instance-1/damaged/manifest.json".to_owned(),
        ]
    );
    let (result, restored) = env.restore(&manifest, KeySource::Master(&env.master)).await;
    assert_eq!(result.unwrap(), data.len() as u64);
    assert!(restored == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_backup_removes_its_manifest_and_every_data_object_of_it() {
    let env = Env::new(None);
    let (manifest, _) = small_backup(&env, "b-1").await;
    let (kept, _) = small_backup(&env, "b-10").await;
    put_bytes(
        env.store.as_ref(),
        "backups/instance-1/b-1/data-00ff00ff00ff00ff",
        b"debris".to_vec(),
    )
    .await;
    backup::delete_backup(env.store.as_ref(), &env.instance, &manifest.backup_id)
        .await
        .unwrap();
    assert!(
        env.store
            .list("backups/instance-1/b-1/")
            .await
            .unwrap()
            .is_empty()
    );
    let listed = backup::list_backups(env.store.as_ref(), &env.instance)
        .await
        .unwrap();
    assert_eq!(listed, vec![kept]);
}
