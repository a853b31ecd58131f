//! The backup workflow: a source, a filter chain and a storage output, run concurrently.
//!
//! A backup streams `source -> zstd -> AES-256-GCM (STREAM) -> SHA-256 -> storage`, each
//! stage its own task, joined by queues bounded in bytes: memory depends on the
//! configuration, never on the data size, and nothing is written to a temporary file.
//! The bound is the sum of the queue sizes, plus about two buffers per stage (the one it
//! works on and the one it is sending: a 256 KiB read, a zstd frame of `queue_bytes`
//! input (64 KiB to 4 MiB) and its compressed copy, a `chunk_size + 16` sealed chunk),
//! plus zstd's own state (its window of at most 8 MiB, and with workers their job
//! buffers and 128 KiB outputs), plus, for a queue smaller than the buffers sent
//! into it, one parent buffer that a zero-copy split keeps alive (see `queue`). With the
//! defaults that is a few tens of MiB per running backup; the storage output's own
//! buffering (an S3 multipart part) comes on top. A backup is
//! complete only when its manifest exists; the manifest is written last, after the data
//! object is durably stored and every stage (the source's exit status included)
//! succeeded, and only if no other attempt of the same backup wrote one first. A failed
//! attempt deletes its own data object (never another attempt's) and writes no manifest.
//!
//! Metrics (Prometheus names): `phoenix_backups_total{strategy,outcome}` and
//! `phoenix_restores_total{strategy,outcome}` (outcome: succeeded|failed|cancelled),
//! `phoenix_backup_raw_bytes_total{strategy}` and
//! `phoenix_backup_stored_bytes_total{strategy}` for successful backups.
//!
//! The way back (`restore`, `decrypt`, `verify`) streams `storage -> SHA-256 -> decrypt
//! -> unzstd -> sink`, and passes a chunk on only once it authenticated.
//!
//! Storage keys derive only from validated IDs and random hex:
//! `backups/<instance>/<backup>/data-<hex>` (one per attempt) and
//! `backups/<instance>/<backup>/manifest.json`; readers take the data object's key from
//! the manifest and check it lies under that backup's prefix. This module never logs,
//! stores or returns a clear key. The stored format is documented in
//! `docs/backup-format.md`.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ids::{BackupId, InstanceId};
use crate::keys::{SecretKey, random_bytes};
use crate::storage::{ByteStream, ObjectKey, Store};
use crate::{Error, Result};

pub mod config;
pub mod filter;
pub mod format;
pub mod keys;
pub mod process;
pub mod progress;
mod queue;
mod runner;
pub mod sink;
pub mod source;
pub mod transfer;

pub use config::{CompressionConfig, PipelineConfig};
pub use format::{Header, Manifest, ManifestSource};
pub use keys::{BackupKeys, InstanceKey, KdfParams, KeySource, PassphraseKey};
pub use process::ProcessCommand;
pub use progress::{Progress, ProgressSnapshot, StageProgress};
pub use sink::{DiscardSink, ProcessSink, Sink, StoreSink, WriterSink};
pub use source::{ProcessSource, SnapshotRef, Source, SourceInfo, SourceOutput, process_stream};
pub use transfer::transfer;

use filter::Filter;
use filter::aead::{Decrypt, Encrypt, NONCE_PREFIX_LEN};
use filter::digest::{Digest, DigestResult};
use filter::zstd::ZstdDecompress;
use format::{
    Cipher, CompressionAlgorithm, Construction, HeaderEncryption, HeaderKeys, Kdf, ManifestDigest,
    ManifestEncryption, PassphraseWrap, b64, peek_header, unb64,
};
use runner::{Pipeline, SourceStage};

/// Bound of each queue on the way back (restore, decrypt, verify).
const RESTORE_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Storage prefix of everything a backup stores (ends with `/`).
fn backup_prefix(instance: &InstanceId, backup: &BackupId) -> String {
    format!("backups/{instance}/{backup}/")
}

/// Name of the manifest inside a backup's prefix.
const MANIFEST_NAME: &str = "manifest.json";

/// Name prefix of the data objects inside a backup's prefix: one per attempt.
const DATA_NAME_PREFIX: &str = "data-";

/// A fresh storage key for one attempt's data object:
/// `backups/<instance>/<backup>/data-<16 random hex>`. Every attempt of a backup (a
/// rerun after a lost lease) writes its own object, so no attempt can overwrite or
/// delete data another attempt's manifest points to.
///
/// # Errors
/// [`Error::Invalid`] if the key would be too long or the random generator fails.
pub fn new_data_object_key(instance: &InstanceId, backup: &BackupId) -> Result<ObjectKey> {
    let mut suffix = [0u8; 8];
    random_bytes(&mut suffix)?;
    ObjectKey::parse(format!(
        "{}{DATA_NAME_PREFIX}{}",
        backup_prefix(instance, backup),
        hex::encode(suffix)
    ))
}

/// The data object a manifest points to, checked to lie inside its own backup's prefix
/// (a manifest cannot make a reader fetch or a deletion remove another object).
///
/// # Errors
/// [`Error::Invalid`] for a reference backup (no data object); [`Error::Integrity`] for
/// a key outside `backups/<instance>/<backup>/` or not a valid storage key.
pub fn manifest_data_object(manifest: &Manifest) -> Result<ObjectKey> {
    match &manifest.source {
        ManifestSource::Stream { data_object } => {
            let prefix = backup_prefix(&manifest.instance_id, &manifest.backup_id);
            let name = data_object.strip_prefix(&prefix).unwrap_or_default();
            // `data` is the name before data objects were per attempt.
            let valid_name = name == "data"
                || name
                    .strip_prefix(DATA_NAME_PREFIX)
                    .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()));
            if !valid_name {
                return Err(Error::Integrity(format!(
                    "the manifest of backup {} points to {data_object:?}, which is not a data object of that backup",
                    manifest.backup_id
                )));
            }
            ObjectKey::parse(data_object.clone()).map_err(|e| {
                Error::Integrity(format!(
                    "the manifest of backup {} points to an invalid storage key: {e}",
                    manifest.backup_id
                ))
            })
        }
        ManifestSource::Reference { snapshot } => Err(Error::Invalid(format!(
            "backup {} is a {} snapshot kept on its infrastructure; it has no stored stream",
            manifest.backup_id, snapshot.provider
        ))),
    }
}

/// Storage key of a backup's manifest.
///
/// # Errors
/// Never for validated IDs; [`Error::Invalid`] if the key would be too long.
pub fn manifest_object_key(instance: &InstanceId, backup: &BackupId) -> Result<ObjectKey> {
    ObjectKey::parse(format!(
        "{}{MANIFEST_NAME}",
        backup_prefix(instance, backup)
    ))
}

/// What to back up where.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub instance_id: InstanceId,
    pub backup_id: BackupId,
    pub config: PipelineConfig,
}

/// Runs a backup of `source` into `store` and returns its manifest, written last.
///
/// A stream source goes through compression, encryption and the digest to the data
/// object; a reference source only gets a manifest. `progress` can be read while it runs.
///
/// Each call writes its own data object (`data-<random hex>`, see
/// [`new_data_object_key`]) and on failure deletes only that object, so a rerun of the
/// same backup ID (after a lost lease) never touches data another attempt's manifest
/// points to. The manifest is written only if none exists, checked right before the put
/// (two attempts finishing at the same moment can both pass that check: the last
/// manifest wins, and the other attempt's data object is left for [`sweep_orphans`]).
///
/// # Errors
/// [`Error::Invalid`] for a bad configuration, keys of another instance, or a backup ID
/// that already has a manifest (at the start, or written by another attempt while this
/// one ran: that attempt's backup is complete and stays); otherwise the first failure of
/// any stage (the source process's exit status, an empty stream, storage). After an
/// error this attempt left no manifest and, except when the manifest put itself failed,
/// no data object.
///
/// # Cancellation
/// Cancelling `cancel` (or dropping the future) stops every stage and kills the source
/// process; a cancelled backup writes no manifest (a dropped one may leave its data
/// object without a manifest, which is not a backup and which [`sweep_orphans`] removes).
pub async fn run_backup(
    source: &dyn Source,
    request: &BackupRequest,
    keys: &BackupKeys,
    store: Arc<dyn Store>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Manifest> {
    let result = attempt_backup(source, request, keys, store, progress, cancel).await;
    let strategy = source.info().strategy;
    metrics::counter!(
        "phoenix_backups_total",
        "strategy" => strategy.clone(),
        "outcome" => outcome_label(result.as_ref().map(|_| ())),
    )
    .increment(1);
    if let Ok(manifest) = &result {
        metrics::counter!("phoenix_backup_raw_bytes_total", "strategy" => strategy.clone())
            .increment(manifest.raw_bytes);
        metrics::counter!("phoenix_backup_stored_bytes_total", "strategy" => strategy)
            .increment(manifest.stored_bytes);
    }
    result
}

/// The `outcome` label of the backup and restore counters.
fn outcome_label(result: std::result::Result<(), &Error>) -> &'static str {
    match result {
        Ok(()) => "succeeded",
        Err(Error::Cancelled) => "cancelled",
        Err(_) => "failed",
    }
}

async fn attempt_backup(
    source: &dyn Source,
    request: &BackupRequest,
    keys: &BackupKeys,
    store: Arc<dyn Store>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Manifest> {
    let BackupRequest {
        instance_id,
        backup_id,
        config,
    } = request;
    config.validate()?;
    if keys.instance.instance() != instance_id {
        return Err(Error::Invalid(format!(
            "the instance key given belongs to instance {}, not {instance_id}",
            keys.instance.instance()
        )));
    }
    let manifest_key = manifest_object_key(instance_id, backup_id)?;
    refuse_existing(store.as_ref(), &manifest_key, instance_id, backup_id).await?;
    let created_at = Utc::now();
    let source_info = source.info();
    info!(
        instance_id = %instance_id,
        backup_id = %backup_id,
        strategy = %source_info.strategy,
        "Backup started."
    );
    let output = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(Error::Cancelled),
        output = source.open() => output?,
    };
    let stream = match output {
        SourceOutput::Reference(snapshot) => {
            let manifest = Manifest {
                version: format::MANIFEST_VERSION,
                backup_id: backup_id.clone(),
                instance_id: instance_id.clone(),
                source_info,
                raw_bytes: snapshot.size_bytes.unwrap_or(0),
                source: ManifestSource::Reference { snapshot },
                created_at,
                finished_at: Utc::now(),
                stored_bytes: 0,
                digest: None,
                compression: None,
                encryption: None,
            };
            refuse_existing(store.as_ref(), &manifest_key, instance_id, backup_id).await?;
            write_manifest(store.as_ref(), &manifest_key, &manifest).await?;
            info!(instance_id = %instance_id, backup_id = %backup_id, "Snapshot backup recorded.");
            return Ok(manifest);
        }
        SourceOutput::Stream(stream) => stream,
    };

    let data_key = new_data_object_key(instance_id, backup_id)?;
    let result = stream_backup(
        stream,
        request,
        keys,
        Arc::clone(&store),
        &data_key,
        progress,
        cancel,
    )
    .await;
    let (stored, digest, header) = match result {
        Ok(done) => done,
        Err(error) => {
            discard_data(store.as_ref(), &data_key, instance_id, backup_id).await;
            warn!(instance_id = %instance_id, backup_id = %backup_id, error = %error, "Backup failed.");
            return Err(error);
        }
    };
    let manifest = Manifest {
        version: format::MANIFEST_VERSION,
        backup_id: backup_id.clone(),
        instance_id: instance_id.clone(),
        source_info,
        source: ManifestSource::Stream {
            data_object: data_key.to_string(),
        },
        created_at,
        finished_at: Utc::now(),
        raw_bytes: stored.source_bytes,
        stored_bytes: stored.sink_bytes,
        digest: Some(ManifestDigest {
            algorithm: "sha256".into(),
            value: digest.sha256,
        }),
        compression: config.manifest_compression(),
        encryption: Some(ManifestEncryption {
            cipher: header.encryption.cipher,
            construction: header.encryption.construction,
            chunk_size: header.encryption.chunk_size,
            master_key_id: header.keys.master_key_id.clone(),
            instance_key_id: header.keys.instance_key_id.clone(),
            passphrase: header.keys.passphrase.is_some(),
        }),
    };
    // Another attempt of the same backup (a rerun after a lost lease) may have finished
    // meanwhile: its manifest stays, this attempt's data goes.
    if let Err(error) = refuse_existing(store.as_ref(), &manifest_key, instance_id, backup_id).await
    {
        discard_data(store.as_ref(), &data_key, instance_id, backup_id).await;
        return Err(error);
    }
    // A failed manifest put may still have stored the manifest (a lost response), so the
    // data it points to is kept; without a manifest naming it, `sweep_orphans` removes it.
    write_manifest(store.as_ref(), &manifest_key, &manifest).await?;
    info!(
        instance_id = %instance_id,
        backup_id = %backup_id,
        raw_bytes = manifest.raw_bytes,
        stored_bytes = manifest.stored_bytes,
        "Backup finished."
    );
    Ok(manifest)
}

/// The streamed part of a backup: returns the run's figures, the digest and the header.
async fn stream_backup(
    stream: ByteStream,
    request: &BackupRequest,
    keys: &BackupKeys,
    store: Arc<dyn Store>,
    data_key: &ObjectKey,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<(runner::Outcome, DigestResult, Header)> {
    let config = &request.config;
    let data_key_secret = SecretKey::generate()?;
    let mut prefix = [0u8; NONCE_PREFIX_LEN];
    random_bytes(&mut prefix)?;
    let header = Header {
        instance_id: request.instance_id.clone(),
        backup_id: request.backup_id.clone(),
        compression: config.compression_algorithm(),
        encryption: HeaderEncryption {
            cipher: Cipher::Aes256Gcm,
            construction: Construction::Stream,
            chunk_size: config.chunk_size,
            nonce_prefix: hex::encode(prefix),
        },
        keys: wrap_data_key(&data_key_secret, request, keys)?,
    };
    let header_bytes = header.encode()?;
    let mut filters: Vec<Box<dyn Filter>> = Vec::new();
    if let Some(compression) = config.build_compression()? {
        filters.push(compression);
    }
    filters.push(Box::new(Encrypt::new(
        &data_key_secret,
        header_bytes,
        prefix,
        config.chunk_size,
    )?));
    let (digest, digest_handle) = Digest::new(None);
    filters.push(Box::new(digest));
    let pipeline = Pipeline {
        source: SourceStage {
            name: "source",
            stream,
        },
        filters,
        sink: Box::new(StoreSink::new(store, data_key.clone())),
        queue_bytes: config.queue_bytes as usize,
    };
    let outcome = runner::run(pipeline, progress, cancel).await?;
    let digest = digest_handle
        .get()
        .ok_or_else(|| Error::Integrity("the digest stage did not finish".into()))?;
    if digest.bytes != outcome.sink_bytes {
        return Err(Error::Integrity(format!(
            "storage reports {} bytes stored, {} were sent",
            outcome.sink_bytes, digest.bytes
        )));
    }
    Ok((outcome, digest, header))
}

fn wrap_data_key(
    data_key: &SecretKey,
    request: &BackupRequest,
    keys: &BackupKeys,
) -> Result<HeaderKeys> {
    let instance = &request.instance_id;
    let backup = &request.backup_id;
    let sealed = keys.instance.key().seal(
        &keys::data_key_context(instance, backup),
        data_key.expose_bytes(),
    )?;
    let passphrase = match &keys.passphrase {
        Some(passphrase) => Some(PassphraseWrap {
            kdf: Kdf::Argon2id,
            params: passphrase.params(),
            salt: b64(passphrase.salt()),
            data_key: b64(&passphrase.key().seal(
                &keys::passphrase_data_key_context(instance, backup),
                data_key.expose_bytes(),
            )?),
        }),
        None => None,
    };
    Ok(HeaderKeys {
        master_key_id: keys.instance.master_key_id().to_owned(),
        instance_key_id: keys.instance.id(),
        instance_key: b64(keys.instance.sealed()),
        data_key: b64(&sealed),
        passphrase,
    })
}

/// The data key of a backup, from its header and the master key or the passphrase.
/// Argon2id runs on a blocking thread.
async fn open_data_key(header: &Header, key_source: &KeySource<'_>) -> Result<SecretKey> {
    let instance = &header.instance_id;
    let backup = &header.backup_id;
    match key_source {
        KeySource::Master(master) => {
            let sealed = unb64("instance key", &header.keys.instance_key)?;
            let instance_key = InstanceKey::open(master, instance, &sealed)?;
            let data_key = unb64("data key", &header.keys.data_key)?;
            let bytes = instance_key
                .key()
                .open(&keys::data_key_context(instance, backup), &data_key)?;
            keys::secret_key_from(&bytes)
        }
        KeySource::Passphrase(passphrase) => {
            let wrap = header.keys.passphrase.clone().ok_or_else(|| {
                Error::Invalid("this backup cannot be opened with a passphrase (none was set when it was made)".into())
            })?;
            let salt = Header::passphrase_salt(&wrap)?;
            let sealed = unb64("passphrase-wrapped data key", &wrap.data_key)?;
            let params = wrap.params;
            let passphrase = (*passphrase).to_owned();
            let kek = tokio::task::spawn_blocking(move || {
                PassphraseKey::derive_with_salt(&passphrase, params, salt)
            })
            .await
            .map_err(|e| Error::io("deriving the passphrase key", std::io::Error::other(e)))??;
            let bytes = kek.key().open(
                &keys::passphrase_data_key_context(instance, backup),
                &sealed,
            )?;
            keys::secret_key_from(&bytes)
        }
    }
}

/// Fails with [`Error::Invalid`] if the backup's manifest exists.
///
/// This check and the manifest put that follows it are not atomic (the stores offer no
/// conditional put): two attempts finishing within that window both write, and the last
/// manifest wins. Each names its own data object, so either is a complete backup; the
/// loser's data object is left without a manifest for [`sweep_orphans`].
async fn refuse_existing(
    store: &dyn Store,
    manifest_key: &ObjectKey,
    instance: &InstanceId,
    backup: &BackupId,
) -> Result<()> {
    match store.stat(manifest_key).await {
        Ok(_) => Err(Error::Invalid(format!(
            "backup {backup} of instance {instance} already exists"
        ))),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

async fn write_manifest(store: &dyn Store, key: &ObjectKey, manifest: &Manifest) -> Result<()> {
    let json = Bytes::from(manifest.to_json()?);
    let stream: ByteStream = Box::pin(futures::stream::once(async move { Ok(json) }));
    store.put(key, stream).await.map(|_| ())
}

async fn discard_data(
    store: &dyn Store,
    key: &ObjectKey,
    instance: &InstanceId,
    backup: &BackupId,
) {
    if let Err(e) = store.delete(key).await {
        warn!(instance_id = %instance, backup_id = %backup, error = %e, "Could not delete the data of a failed backup.");
    }
}

/// Reads the manifest of a backup.
///
/// # Errors
/// `is_not_found()` when the backup does not exist (or never completed);
/// [`Error::Integrity`] for a manifest that is not valid or names another backup.
pub async fn read_manifest(
    store: &dyn Store,
    instance: &InstanceId,
    backup: &BackupId,
) -> Result<Manifest> {
    let key = manifest_object_key(instance, backup)?;
    let mut stream = store.get(&key).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        bytes.extend_from_slice(&chunk?);
        if bytes.len() > 1024 * 1024 {
            return Err(Error::Integrity(format!("the manifest {key} is too large")));
        }
    }
    let manifest = Manifest::from_json(&bytes)?;
    if &manifest.instance_id != instance || &manifest.backup_id != backup {
        return Err(Error::Integrity(format!(
            "the manifest {key} describes another backup"
        )));
    }
    Ok(manifest)
}

/// The manifests of every complete backup of `instance`, oldest first.
///
/// A manifest that cannot be read (damaged, naming another backup, of a newer layout
/// this build does not know) is skipped with a warning naming it, so one bad object
/// does not hide every other backup; [`read_manifest`] on its ID reports why.
///
/// # Errors
/// Storage errors while listing.
pub async fn list_backups(store: &dyn Store, instance: &InstanceId) -> Result<Vec<Manifest>> {
    let prefix = format!("backups/{instance}/");
    let mut manifests = Vec::new();
    for object in store.list(&prefix).await? {
        let Some(rest) = object.key.as_str().strip_prefix(&prefix) else {
            continue;
        };
        let Some(backup) = rest.strip_suffix(&format!("/{MANIFEST_NAME}")) else {
            continue;
        };
        let Ok(backup) = BackupId::parse(backup) else {
            continue;
        };
        match read_manifest(store, instance, &backup).await {
            Ok(manifest) => manifests.push(manifest),
            // Deleted between the listing and the read: not a backup any more.
            Err(e) if e.is_not_found() => {}
            Err(Error::Integrity(reason)) => {
                warn!(
                    instance_id = %instance,
                    backup_id = %backup,
                    key = %object.key,
                    error = %reason,
                    "Skipping a backup whose manifest cannot be read."
                );
            }
            Err(e) => return Err(e),
        }
    }
    manifests.sort_by_key(|m| m.created_at);
    Ok(manifests)
}

/// Deletes a backup: its manifest first (so it stops existing at once), then every data
/// object under its prefix (the one the manifest named, and any left by failed attempts).
/// A snapshot a reference points to is the infrastructure's to delete.
///
/// # Errors
/// Storage errors. Deleting a backup that does not exist succeeds.
pub async fn delete_backup(
    store: &dyn Store,
    instance: &InstanceId,
    backup: &BackupId,
) -> Result<()> {
    store
        .delete(&manifest_object_key(instance, backup)?)
        .await?;
    for object in store.list(&backup_prefix(instance, backup)).await? {
        store.delete(&object.key).await?;
    }
    Ok(())
}

/// Deletes the data objects of `instance` that no manifest points to and that were
/// last written before `older_than`: what crashed or dropped attempts, and the loser of
/// two attempts finishing at once, leave behind. Returns the deleted keys.
///
/// `older_than` must lie well before the start of any backup that may still be running
/// (its data object has no manifest until it finishes): retention passes something like
/// "now minus a day". An object whose age the store does not report, and every object of
/// a backup whose manifest cannot be read, is kept.
///
/// # Errors
/// Storage errors.
pub async fn sweep_orphans(
    store: &dyn Store,
    instance: &InstanceId,
    older_than: DateTime<Utc>,
) -> Result<Vec<ObjectKey>> {
    let prefix = format!("backups/{instance}/");
    let mut deleted = Vec::new();
    for object in store.list(&prefix).await? {
        let Some(rest) = object.key.as_str().strip_prefix(&prefix) else {
            continue;
        };
        let Some((backup, name)) = rest.split_once('/') else {
            continue;
        };
        let is_data = name == "data" || name.starts_with(DATA_NAME_PREFIX);
        let old = object.modified.is_some_and(|m| m < older_than);
        if !is_data || !old {
            continue;
        }
        let Ok(backup) = BackupId::parse(backup) else {
            continue;
        };
        let referenced = match read_manifest(store, instance, &backup).await {
            Ok(manifest) => manifest_data_object(&manifest).ok(),
            Err(e) if e.is_not_found() => None,
            Err(Error::Integrity(_)) => continue,
            Err(e) => return Err(e),
        };
        if referenced.as_ref() == Some(&object.key) {
            continue;
        }
        store.delete(&object.key).await?;
        info!(instance_id = %instance, backup_id = %backup, key = %object.key, "Deleted an orphaned backup data object.");
        deleted.push(object.key);
    }
    Ok(deleted)
}

/// Figures of a finished restore or decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    /// Bytes of the stored object read.
    pub stored_bytes: u64,
    /// Bytes of the original stream delivered to the sink.
    pub raw_bytes: u64,
}

/// Figures of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Bytes of the stored object, checked against the manifest.
    pub stored_bytes: u64,
    /// SHA-256 of the stored object, equal to the manifest's.
    pub sha256: String,
    /// With a key: bytes of the original stream, equal to the manifest's `raw_bytes`.
    pub raw_bytes: Option<u64>,
}

fn expected_digest(manifest: &Manifest) -> Result<DigestResult> {
    let digest = manifest
        .digest
        .as_ref()
        .ok_or_else(|| Error::Integrity("the manifest has no digest".into()))?;
    if digest.algorithm != "sha256" {
        return Err(Error::Integrity(format!(
            "unknown digest algorithm {}",
            digest.algorithm
        )));
    }
    Ok(DigestResult {
        sha256: digest.value.clone(),
        bytes: manifest.stored_bytes,
    })
}

fn check_header_matches(header: &Header, manifest: &Manifest) -> Result<()> {
    if header.instance_id != manifest.instance_id || header.backup_id != manifest.backup_id {
        return Err(Error::Integrity(format!(
            "the stored object belongs to backup {} of instance {}, not to this manifest",
            header.backup_id, header.instance_id
        )));
    }
    Ok(())
}

/// The decoding filters for an opened header: decrypt, then decompress.
fn decoding_filters(
    header: &Header,
    header_bytes: Vec<u8>,
    data_key: &SecretKey,
) -> Result<Vec<Box<dyn Filter>>> {
    let mut filters: Vec<Box<dyn Filter>> = vec![Box::new(Decrypt::new(
        data_key,
        header_bytes,
        header.nonce_prefix()?,
        header.encryption.chunk_size,
    )?)];
    if header.compression == CompressionAlgorithm::Zstd {
        filters.push(Box::new(ZstdDecompress::new()?));
    }
    Ok(filters)
}

/// Restores a stored backup into `sink` (a [`ProcessSink`] running the engine's restore
/// tool, or any other [`Sink`]): storage -> digest -> decrypt -> decompress -> sink.
///
/// Each chunk reaches the sink only after it authenticated; a damaged chunk fails the
/// restore at that chunk, a missing final chunk or a digest mismatch at the end. The sink
/// is told of the failure (its stream ends with an error; a process sink kills its
/// child), so it must treat a restore as complete only when this returns `Ok`.
///
/// # Errors
/// [`Error::WrongKey`] when the key or passphrase does not open the backup (before any
/// byte reaches the sink); [`Error::Integrity`] for damaged data, or when the bytes
/// delivered differ from the manifest's `raw_bytes` (checked after the sink finished:
/// the restore is then reported failed); the sink's failure.
///
/// # Cancellation
/// As [`run_backup`]: every stage stops and a process sink is killed.
pub async fn restore(
    store: Arc<dyn Store>,
    manifest: &Manifest,
    key_source: KeySource<'_>,
    sink: Box<dyn Sink>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<RestoreReport> {
    let result = attempt_restore(store, manifest, key_source, sink, progress, cancel).await;
    metrics::counter!(
        "phoenix_restores_total",
        "strategy" => manifest.source_info.strategy.clone(),
        "outcome" => outcome_label(result.as_ref().map(|_| ())),
    )
    .increment(1);
    result
}

async fn attempt_restore(
    store: Arc<dyn Store>,
    manifest: &Manifest,
    key_source: KeySource<'_>,
    sink: Box<dyn Sink>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<RestoreReport> {
    let key = manifest_data_object(manifest)?;
    let expected = expected_digest(manifest)?;
    let (header, header_bytes, stream) = peek_header(store.get(&key).await?).await?;
    check_header_matches(&header, manifest)?;
    let data_key = open_data_key(&header, &key_source).await?;
    let (digest, _) = Digest::new(Some(expected));
    let mut filters: Vec<Box<dyn Filter>> = vec![Box::new(digest)];
    filters.extend(decoding_filters(&header, header_bytes, &data_key)?);
    let outcome = runner::run(
        Pipeline {
            source: SourceStage {
                name: "storage",
                stream,
            },
            filters,
            sink,
            queue_bytes: RESTORE_QUEUE_BYTES,
        },
        progress,
        cancel,
    )
    .await?;
    if outcome.sink_bytes != manifest.raw_bytes {
        return Err(Error::Integrity(format!(
            "the restore delivered {} bytes, the manifest says the backup holds {}",
            outcome.sink_bytes, manifest.raw_bytes
        )));
    }
    info!(
        instance_id = %manifest.instance_id,
        backup_id = %manifest.backup_id,
        raw_bytes = outcome.sink_bytes,
        "Restore finished."
    );
    Ok(RestoreReport {
        stored_bytes: outcome.source_bytes,
        raw_bytes: outcome.sink_bytes,
    })
}

/// Decrypts and decompresses a backup data object read from `reader` into `writer`:
/// what `phoenix decrypt < backup > dump` does, offline, with the master key or the
/// passphrase alone.
///
/// # Errors
/// As [`restore`]. Bytes already written to `writer` before an error are authenticated
/// data, but the output is incomplete: callers must report the failure.
///
/// # Cancellation
/// As [`restore`].
pub async fn decrypt<R, W>(
    reader: R,
    writer: W,
    key_source: KeySource<'_>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<RestoreReport>
where
    R: AsyncRead + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let stream: ByteStream = Box::pin(futures::StreamExt::map(
        ReaderStream::with_capacity(reader, 256 * 1024),
        |item| item.map_err(|e| Error::io("reading the backup", e)),
    ));
    let (header, header_bytes, stream) = peek_header(stream).await?;
    let data_key = open_data_key(&header, &key_source).await?;
    let outcome = runner::run(
        Pipeline {
            source: SourceStage {
                name: "input",
                stream,
            },
            filters: decoding_filters(&header, header_bytes, &data_key)?,
            sink: Box::new(WriterSink::new(writer)),
            queue_bytes: RESTORE_QUEUE_BYTES,
        },
        progress,
        cancel,
    )
    .await?;
    Ok(RestoreReport {
        stored_bytes: outcome.source_bytes,
        raw_bytes: outcome.sink_bytes,
    })
}

/// Checks a stored backup end to end without restoring it: the stored object's size and
/// SHA-256 against the manifest (no key needed) and, with a key, every chunk's
/// authentication and the decompressed length against the manifest.
///
/// # Errors
/// [`Error::Integrity`] naming what does not match; [`Error::WrongKey`]; storage errors.
///
/// # Cancellation
/// As [`restore`].
pub async fn verify(
    store: Arc<dyn Store>,
    manifest: &Manifest,
    key_source: Option<KeySource<'_>>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<VerifyReport> {
    let key = manifest_data_object(manifest)?;
    let expected = expected_digest(manifest)?;
    let (header, header_bytes, stream) = peek_header(store.get(&key).await?).await?;
    check_header_matches(&header, manifest)?;
    let (digest, digest_handle) = Digest::new(Some(expected));
    let mut filters: Vec<Box<dyn Filter>> = vec![Box::new(digest)];
    if let Some(key_source) = &key_source {
        let data_key = open_data_key(&header, key_source).await?;
        filters.extend(decoding_filters(&header, header_bytes, &data_key)?);
    }
    let outcome = runner::run(
        Pipeline {
            source: SourceStage {
                name: "storage",
                stream,
            },
            filters,
            sink: Box::new(DiscardSink),
            queue_bytes: RESTORE_QUEUE_BYTES,
        },
        progress,
        cancel,
    )
    .await?;
    let digest = digest_handle
        .get()
        .ok_or_else(|| Error::Integrity("the digest stage did not finish".into()))?;
    let raw_bytes = key_source.map(|_| outcome.sink_bytes);
    if let Some(raw) = raw_bytes
        && raw != manifest.raw_bytes
    {
        return Err(Error::Integrity(format!(
            "the backup decrypts to {raw} bytes, the manifest says {}",
            manifest.raw_bytes
        )));
    }
    Ok(VerifyReport {
        stored_bytes: digest.bytes,
        sha256: digest.sha256,
        raw_bytes,
    })
}

#[cfg(test)]
mod tests {
    use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation as _, OutBuffer};

    use super::filter::testing;
    use super::*;
    use crate::keys::MasterKey;

    /// One zstd frame of `len` zeros that asks its decoder for a 2^27-byte window.
    fn wide_window_frame(len: usize) -> Vec<u8> {
        let mut encoder = Encoder::new(3).unwrap();
        encoder.set_parameter(CParameter::WindowLog(27)).unwrap();
        let zeros = vec![0u8; len];
        let mut packed = Vec::with_capacity(len);
        let mut input = InBuffer::around(&zeros);
        while input.pos() < zeros.len() {
            let pos = packed.len();
            encoder
                .run(&mut input, &mut OutBuffer::around_pos(&mut packed, pos))
                .unwrap();
        }
        loop {
            let pos = packed.len();
            if encoder
                .finish(&mut OutBuffer::around_pos(&mut packed, pos), true)
                .unwrap()
                == 0
            {
                return packed;
            }
        }
    }

    fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_objects_hold_neither_the_data_key_nor_the_instance_or_passphrase_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::storage::local::LocalStore::new(dir.path()).unwrap());
        let master = MasterKey::from_base64(&b64(&[9u8; 32])).unwrap();
        let instance = InstanceId::parse("i").unwrap();
        let keys = BackupKeys {
            instance: InstanceKey::generate(&master, &instance).unwrap(),
            passphrase: Some(
                PassphraseKey::derive(
                    "a passphrase",
                    KdfParams {
                        m_cost_kib: 8 * 1024,
                        t_cost: 1,
                        p_cost: 1,
                    },
                )
                .unwrap(),
            ),
        };
        let source = ProcessSource::new(
            SourceInfo {
                strategy: "test".into(),
                engine: "none".into(),
                engine_version: None,
                format: "text".into(),
                details: Default::default(),
            },
            ProcessCommand::new("/bin/sh", ["-c", "seq 1 50000"]),
        );
        let request = BackupRequest {
            instance_id: instance.clone(),
            backup_id: BackupId::parse("b").unwrap(),
            config: PipelineConfig::default(),
        };
        let manifest = run_backup(
            &source,
            &request,
            &keys,
            store.clone(),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let stored = std::fs::read(
            dir.path()
                .join(manifest_data_object(&manifest).unwrap().as_str()),
        )
        .unwrap();
        let (header, _) = Header::parse_prefix(&stored).unwrap().unwrap();
        let data_key = open_data_key(&header, &KeySource::Master(&master))
            .await
            .unwrap();
        let secrets: Vec<(&str, [u8; 32])> = vec![
            ("data key", *data_key.expose_bytes()),
            ("instance key", *keys.instance.key().expose_bytes()),
            (
                "passphrase key",
                *keys.passphrase.as_ref().unwrap().key().expose_bytes(),
            ),
            ("master key", *master.key().expose_bytes()),
        ];
        let files = files_under(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            for (name, secret) in &secrets {
                for form in [
                    secret.to_vec(),
                    b64(secret).into_bytes(),
                    hex::encode(secret).into_bytes(),
                ] {
                    assert!(
                        !bytes.windows(form.len()).any(|w| w == form.as_slice()),
                        "{file:?} holds the {name}"
                    );
                }
            }
        }
    }

    /// Counters by `name{label=value,...}`, shared with the recorder installed below.
    type Counts = Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>;

    struct CountingRecorder(Counts);

    struct CountingCounter(String, Counts);

    impl metrics::CounterFn for CountingCounter {
        fn increment(&self, value: u64) {
            *self.1.lock().unwrap().entry(self.0.clone()).or_default() += value;
        }

        fn absolute(&self, value: u64) {
            self.1.lock().unwrap().insert(self.0.clone(), value);
        }
    }

    impl metrics::Recorder for CountingRecorder {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }

        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            metrics::Counter::from_arc(Arc::new(CountingCounter(name, Arc::clone(&self.0))))
        }

        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }

        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    fn counts() -> Counts {
        static COUNTS: std::sync::OnceLock<Counts> = std::sync::OnceLock::new();
        Arc::clone(COUNTS.get_or_init(|| {
            let counts = Counts::default();
            metrics::set_global_recorder(CountingRecorder(Arc::clone(&counts)))
                .expect("no other test installs a metrics recorder");
            counts
        }))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backups_and_restores_are_counted_by_outcome_with_their_bytes() {
        let counts = counts();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::storage::local::LocalStore::new(dir.path()).unwrap());
        let master = MasterKey::from_base64(&b64(&[5u8; 32])).unwrap();
        let instance = InstanceId::parse("i").unwrap();
        let keys = BackupKeys {
            instance: InstanceKey::generate(&master, &instance).unwrap(),
            passphrase: None,
        };
        // A strategy name of its own, so backups of other tests do not count here.
        let info = SourceInfo {
            strategy: "metrics-test".into(),
            engine: "none".into(),
            engine_version: None,
            format: "text".into(),
            details: Default::default(),
        };
        let request = |backup: &str| BackupRequest {
            instance_id: instance.clone(),
            backup_id: BackupId::parse(backup).unwrap(),
            config: PipelineConfig::default(),
        };
        let good = ProcessSource::new(
            info.clone(),
            ProcessCommand::new("/bin/sh", ["-c", "seq 1 1000"]),
        );
        let manifest = run_backup(
            &good,
            &request("good"),
            &keys,
            store.clone(),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let bad = ProcessSource::new(
            info,
            ProcessCommand::new("/bin/sh", ["-c", "printf x; exit 1"]),
        );
        run_backup(
            &bad,
            &request("bad"),
            &keys,
            store.clone(),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        restore(
            store.clone(),
            &manifest,
            KeySource::Master(&master),
            Box::new(DiscardSink),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();

        let counts = counts.lock().unwrap();
        let get = |key: &str| counts.get(key).copied().unwrap_or(0);
        assert_eq!(
            get("phoenix_backups_total{strategy=metrics-test,outcome=succeeded}"),
            1
        );
        assert_eq!(
            get("phoenix_backups_total{strategy=metrics-test,outcome=failed}"),
            1
        );
        assert_eq!(
            get("phoenix_restores_total{strategy=metrics-test,outcome=succeeded}"),
            1
        );
        assert_eq!(
            get("phoenix_backup_raw_bytes_total{strategy=metrics-test}"),
            manifest.raw_bytes
        );
        assert_eq!(
            get("phoenix_backup_stored_bytes_total{strategy=metrics-test}"),
            manifest.stored_bytes
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn decrypt_refuses_a_backup_whose_zstd_window_exceeds_the_bound() {
        let mut raw = [0u8; 32];
        random_bytes(&mut raw).unwrap();
        let master = MasterKey::from_base64(&base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            raw,
        ))
        .unwrap();
        let instance = InstanceId::parse("i").unwrap();
        let keys = BackupKeys {
            instance: InstanceKey::generate(&master, &instance).unwrap(),
            passphrase: None,
        };
        let request = BackupRequest {
            instance_id: instance,
            backup_id: BackupId::parse("hostile").unwrap(),
            config: PipelineConfig::default(),
        };
        // A well-formed, correctly encrypted backup whose compressed content is hostile.
        let data_key = SecretKey::generate().unwrap();
        let prefix = [3u8; NONCE_PREFIX_LEN];
        let header = Header {
            instance_id: request.instance_id.clone(),
            backup_id: request.backup_id.clone(),
            compression: CompressionAlgorithm::Zstd,
            encryption: HeaderEncryption {
                cipher: Cipher::Aes256Gcm,
                construction: Construction::Stream,
                chunk_size: 4096,
                nonce_prefix: hex::encode(prefix),
            },
            keys: wrap_data_key(&data_key, &request, &keys).unwrap(),
        };
        let mut encrypt = Encrypt::new(&data_key, header.encode().unwrap(), prefix, 4096).unwrap();
        let stored = testing::run(&mut encrypt, &wide_window_frame(1 << 20), 4096).unwrap();

        let err = decrypt(
            std::io::Cursor::new(stored),
            tokio::io::sink(),
            KeySource::Master(&master),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("window limit"), "{err}");
    }
}
