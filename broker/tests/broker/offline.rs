//! `phoenix decrypt` and `phoenix verify`, run as the real binary on a backup made by the
//! pipeline into the broker's configured storage (local disk under the data dir).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use phoenix_adapters::backup::{
    self, BackupKeys, BackupRequest, InstanceKey, KdfParams, ManifestSource, PassphraseKey,
    PipelineConfig, ProcessCommand, ProcessSource, Progress, SourceInfo,
};
use phoenix_adapters::ids::{BackupId, InstanceId};
use phoenix_adapters::keys::{MasterKey, SecretKey};
use phoenix_adapters::storage::Store;
use phoenix_adapters::storage::local::LocalStore;
use tokio_util::sync::CancellationToken;

const PASSPHRASE: &str = "correct horse battery staple";

struct Backup {
    data_dir: tempfile::TempDir,
    original: Vec<u8>,
    instance: InstanceId,
    backup: BackupId,
    data_object: PathBuf,
}

/// Three MB of dump-like text backed up with the data dir's master key and a passphrase.
async fn make_backup() -> Backup {
    let data_dir = tempfile::tempdir().unwrap();
    let (master, _) = MasterKey::load_or_create(&data_dir.path().join("master.key")).unwrap();
    let original: Vec<u8> = (0..60_000)
        .flat_map(|i| {
            format!("INSERT INTO t VALUES ({i}, 'row {i}', '\\\\x{i:08x}');\n").into_bytes()
        })
        .collect();
    let input = data_dir.path().join("input.sql");
    std::fs::write(&input, &original).unwrap();

    let store: Arc<dyn Store> = Arc::new(LocalStore::new(data_dir.path().join("backups")).unwrap());
    let instance = InstanceId::parse("offline-instance").unwrap();
    let backup = BackupId::parse("offline-backup").unwrap();
    // The cheapest parameters a reader accepts: the test is about the CLI, not the KDF.
    let cheap = KdfParams {
        m_cost_kib: 8 * 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let keys = BackupKeys {
        instance: InstanceKey::generate(&master, &instance).unwrap(),
        passphrase: Some(PassphraseKey::derive(PASSPHRASE, cheap).unwrap()),
    };
    let source = ProcessSource::new(
        SourceInfo {
            strategy: "stream".into(),
            engine: "test".into(),
            engine_version: None,
            format: "sql".into(),
            details: Default::default(),
        },
        ProcessCommand::new("cat", [input.to_str().unwrap()]),
    );
    let request = BackupRequest {
        instance_id: instance.clone(),
        backup_id: backup.clone(),
        config: PipelineConfig::default(),
    };
    let manifest = backup::run_backup(
        &source,
        &request,
        &keys,
        Arc::clone(&store),
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let ManifestSource::Stream { data_object } = &manifest.source else {
        panic!("a stream backup has a data object");
    };
    let data_object = data_dir.path().join("backups").join(data_object);
    Backup {
        data_dir,
        original,
        instance,
        backup,
        data_object,
    }
}

/// Runs the real binary with only this test's configuration in its environment.
fn phoenix(data_dir: &Path, args: &[&str], stdin: &[u8], extra_env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phoenix"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PHOENIX_DATA_DIR", data_dir)
        .envs(extra_env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // Written from a thread: the child fills its stdout pipe while we feed it.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    output
}

fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes[at] ^= 0x01;
    bytes
}

#[tokio::test]
async fn decrypt_turns_a_downloaded_backup_back_into_the_original_stream() {
    let b = make_backup().await;
    let stored = std::fs::read(&b.data_object).unwrap();
    let out = phoenix(b.data_dir.path(), &["decrypt"], &stored, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == b.original,
        "decrypted output differs from the source stream"
    );
}

#[tokio::test]
async fn decrypt_with_the_passphrase_needs_no_master_key() {
    let b = make_backup().await;
    let stored = std::fs::read(&b.data_object).unwrap();
    std::fs::remove_file(b.data_dir.path().join("master.key")).unwrap();
    let passphrase_file = b.data_dir.path().join("passphrase");
    std::fs::write(&passphrase_file, format!("{PASSPHRASE}\n")).unwrap();
    let out = phoenix(
        b.data_dir.path(),
        &[
            "decrypt",
            "--passphrase-file",
            passphrase_file.to_str().unwrap(),
        ],
        &stored,
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == b.original);
}

#[tokio::test]
async fn decrypt_fails_on_a_flipped_byte_and_never_passes_the_damaged_chunk_on() {
    let b = make_backup().await;
    let stored = std::fs::read(&b.data_object).unwrap();
    let damaged = flipped(&stored, stored.len() - 100);
    let out = phoenix(b.data_dir.path(), &["decrypt"], &damaged, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("integrity") || stderr.contains("authentication"),
        "{stderr}"
    );
    assert!(out.stdout.len() < b.original.len());
    assert!(
        b.original.starts_with(&out.stdout),
        "only authenticated data may be written"
    );
}

#[tokio::test]
async fn decrypt_with_another_master_key_says_the_key_is_wrong() {
    let b = make_backup().await;
    let stored = std::fs::read(&b.data_object).unwrap();
    let other = SecretKey::generate().unwrap();
    let other = base64_of(other.expose_bytes());
    let out = phoenix(
        b.data_dir.path(),
        &["decrypt"],
        &stored,
        &[("PHOENIX_MASTER_KEY", &other)],
    );
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong key"));
}

#[tokio::test]
async fn decrypt_without_any_key_fails_and_creates_no_key_file() {
    let b = make_backup().await;
    let stored = std::fs::read(&b.data_object).unwrap();
    std::fs::remove_file(b.data_dir.path().join("master.key")).unwrap();
    let out = phoenix(b.data_dir.path(), &["decrypt"], &stored, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no master key"));
    assert!(!b.data_dir.path().join("master.key").exists());
}

#[tokio::test]
async fn verify_checks_a_stored_backup_with_and_without_the_key() {
    let b = make_backup().await;
    let args = [
        "verify",
        "--instance",
        b.instance.as_str(),
        "--backup",
        b.backup.as_str(),
        "--json",
    ];
    let out = phoenix(b.data_dir.path(), &args, b"", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["raw_bytes"], b.original.len() as u64);
    assert_eq!(report["decrypted"], true);

    std::fs::remove_file(b.data_dir.path().join("master.key")).unwrap();
    let mut keyless = args.to_vec();
    keyless.push("--without-key");
    let out = phoenix(b.data_dir.path(), &keyless, b"", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["decrypted"], false);
}

#[tokio::test]
async fn verify_fails_on_a_stored_backup_with_a_flipped_byte() {
    let b = make_backup().await;
    let stored = std::fs::read(&b.data_object).unwrap();
    std::fs::write(&b.data_object, flipped(&stored, stored.len() / 2)).unwrap();
    for extra in [&[][..], &["--without-key"][..]] {
        let mut args = vec![
            "verify",
            "--instance",
            b.instance.as_str(),
            "--backup",
            b.backup.as_str(),
        ];
        args.extend_from_slice(extra);
        let out = phoenix(b.data_dir.path(), &args, b"", &[]);
        assert!(
            !out.status.success(),
            "verify {extra:?} accepted a damaged backup"
        );
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
