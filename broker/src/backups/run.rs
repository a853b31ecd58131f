//! What the backup, restore, clone and fork operations do: the engine's stream through
//! the backup pipeline into backup storage, and back into an instance.
//!
//! Every function here runs inside an operation attempt whose lease the caller renews
//! and may run again after a crash, so each is idempotent: a backup attempt writes its
//! own data object and the manifest only once (a manifest found at the start means an
//! earlier attempt finished), and a restore loads into a scratch database beside the live
//! one, dropped and loaded again by a new attempt, and swapped in only when complete.
//! While they run, progress goes to the backup or restore record every few seconds.

use std::sync::Arc;
use std::time::Duration;

use phoenix_adapters::backup::{
    self, BackupKeys, BackupRequest, InstanceKey, KeySource, Manifest, ManifestSource,
    PipelineConfig, Progress, Sink, SnapshotRef,
};
use phoenix_adapters::ids::{BackupId, InstanceId};
use phoenix_adapters::infrastructure::Endpoint;
use phoenix_adapters::infrastructure::InstanceSpec;
use phoenix_catalog::BackupStrategy;
use tokio_util::sync::CancellationToken;

use crate::app_state::{AppState, instance_spec};
use crate::error::Error;
use crate::store::backups::{self, Completed};
use crate::store::instances::{self, Instance};
use crate::store::operations::Operation;
use crate::store::restores::{self, phase};

/// How often a running backup or restore records its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Where a new instance's data comes from, as its provision operation records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Seed {
    /// A stored backup (of any instance, deleted ones included).
    Clone {
        instance_id: String,
        backup_id: String,
    },
    /// The live data of another instance, copied straight across.
    Fork { instance_id: String },
}

/// The payload of a provision operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProvisionPayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<Seed>,
}

/// The instance's backup key, created (and stored sealed by the master key) on first use.
/// Two attempts creating it at once agree on the stored one.
async fn instance_key(state: &AppState, instance: &InstanceId) -> Result<InstanceKey, Error> {
    let id = instance.to_string();
    let stored = state
        .store
        .run(move |conn| Ok(instances::backup_key(conn, &id)?))
        .await?;
    let sealed = match stored {
        Some(sealed) => sealed,
        None => {
            let fresh = InstanceKey::generate(&state.master_key, instance)?;
            let (id, sealed) = (instance.to_string(), fresh.sealed().to_vec());
            state
                .store
                .run(move |conn| Ok(instances::set_backup_key_if_absent(conn, &id, &sealed)?))
                .await?
        }
    };
    Ok(InstanceKey::open(&state.master_key, instance, &sealed)?)
}

/// Runs `work` while recording `progress` through `record` every few seconds, with the
/// bytes of the pipeline's first and last stages.
async fn with_progress<T, W, R, F>(progress: &Progress, work: W, record: R) -> T
where
    W: std::future::Future<Output = T>,
    R: Fn(u64, u64) -> F,
    F: std::future::Future<Output = Result<(), Error>>,
{
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = tick.tick() => {
                let snapshot = progress.snapshot();
                let first = snapshot.stages.first().map_or(0, |s| s.bytes);
                let last = snapshot.stages.last().map_or(0, |s| s.bytes);
                // Progress is a courtesy: a failed write must not fail the backup.
                if let Err(error) = record(first, last).await {
                    tracing::debug!(%error, "Recording progress failed.");
                }
            }
        }
    }
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Takes the backup that `operation` was created for.
///
/// # Errors
/// When the instance is not running, the source fails, or storage fails; nothing is
/// then left in storage under this attempt's name.
pub async fn take_backup(
    state: &AppState,
    operation: &Operation,
    instance: &Instance,
) -> Result<Completed, Error> {
    let op_id = operation.id.clone();
    let record = state
        .store
        .run(move |conn| Ok(backups::find_by_operation(conn, &op_id)?))
        .await?
        .ok_or_else(|| Error::Inconsistent(format!("operation {} has no backup", operation.id)))?;
    let instance_id = InstanceId::parse(&instance.id)?;
    let backup_id = BackupId::parse(&record.id)?;
    // An earlier attempt may have written the manifest and died before recording it.
    match backup::read_manifest(state.backup_store.as_ref(), &instance_id, &backup_id).await {
        Ok(manifest) => return Ok(completed(&manifest)),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    let id = record.id.clone();
    state
        .store
        .run(move |conn| Ok(backups::mark_started(conn, &id)?))
        .await?;
    let keys = BackupKeys {
        instance: instance_key(state, &instance_id).await?,
        passphrase: None,
    };
    let spec = instance_spec(instance)?;
    let source = match plan_strategy(state, instance)? {
        BackupStrategy::Stream => state.infrastructure.backup_source(&spec).await?,
        BackupStrategy::Snapshot { shipped: false } => {
            state.infrastructure.snapshot_source(&spec, &backup_id)?
        }
        // Kept here and read once into backup storage: restorable on another host.
        BackupStrategy::Snapshot { shipped: true } => {
            let snapshot = state.infrastructure.snapshot(&spec, &backup_id).await?;
            state.infrastructure.send_source(&snapshot).await?
        }
    };
    let request = BackupRequest {
        instance_id,
        backup_id,
        config: PipelineConfig::default(),
    };
    let progress = Progress::new();
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let manifest = with_progress(
        &progress,
        backup::run_backup(
            source.as_ref(),
            &request,
            &keys,
            Arc::clone(&state.backup_store),
            &progress,
            &cancel,
        ),
        |raw, stored| {
            let id = record.id.clone();
            state.store.run(move |conn| {
                Ok(backups::set_progress(
                    conn,
                    &id,
                    as_i64(raw),
                    as_i64(stored),
                )?)
            })
        },
    )
    .await?;
    Ok(completed(&manifest))
}

fn completed(manifest: &Manifest) -> Completed {
    Completed {
        strategy: manifest.source_info.strategy.clone(),
        engine: manifest.source_info.engine.clone(),
        engine_version: manifest.source_info.engine_version.clone(),
        format: manifest.source_info.format.clone(),
        raw_bytes: as_i64(manifest.raw_bytes),
        stored_bytes: as_i64(manifest.stored_bytes),
        sha256: manifest.digest.as_ref().map(|d| d.value.clone()),
    }
}

/// Restores the backup that `operation`'s restore record names into `instance`, in place.
///
/// # Errors
/// When the backup is missing, damaged or of another engine, or the engine fails; the
/// live data is then as it was.
pub async fn restore_in_place(
    state: &AppState,
    operation: &Operation,
    instance: &Instance,
) -> Result<(), Error> {
    let op_id = operation.id.clone();
    let record = state
        .store
        .run(move |conn| Ok(restores::find_by_operation(conn, &op_id)?))
        .await?
        .ok_or_else(|| Error::Inconsistent(format!("operation {} has no restore", operation.id)))?;
    let target = instance_spec(instance)?;
    let restore_id = record.id.clone();
    // The restore pipeline reads stored bytes first and delivers raw bytes last.
    let record_phase = |phase: &'static str| {
        let id = restore_id.clone();
        move |stored: u64, raw: u64| {
            let id = id.clone();
            state.store.run(move |conn| {
                Ok(restores::set_progress(
                    conn,
                    &id,
                    phase,
                    as_i64(raw),
                    as_i64(stored),
                )?)
            })
        }
    };
    let manifest = read_backup(state, &record.source_instance_id, &record.backup_id).await?;
    if let Some(kind) = SnapshotKind::of(&manifest) {
        // A snapshot restore swaps volumes, crash-safe on its own: an interrupted one is
        // undone by the infrastructure and simply run again.
        if let Err(error) = record_phase(phase::RESTORING)(0, 0).await {
            tracing::debug!(%error, "Recording restore progress failed.");
        }
        let snapshot = match kind {
            SnapshotKind::Kept(snapshot) => snapshot,
            SnapshotKind::Shipped => {
                receive_shipped(state, &target, &manifest, record_phase(phase::RESTORING)).await?
            }
        };
        state
            .infrastructure
            .restore_snapshot(&target, &snapshot)
            .await?;
        return Ok(());
    }
    // `swapping` is recorded only once the backup was loaded and verified, before the
    // swap: an attempt that finds it rolls forward (the swap may have happened and the
    // application written since), never loads the backup again.
    if record.phase.as_deref() != Some(phase::SWAPPING) {
        if let Err(error) = record_phase(phase::RESTORING)(0, 0).await {
            tracing::debug!(%error, "Recording restore progress failed.");
        }
        load_backup(state, &target, &manifest, record_phase(phase::RESTORING)).await?;
        record_phase(phase::SWAPPING)(manifest.stored_bytes, manifest.raw_bytes).await?;
    }
    state.infrastructure.complete_restore(&target).await?;
    Ok(())
}

/// After a restore failed for good: rolls a verified restore forward (it may already be
/// swapped in), or drops what a restore left beside the live data and lets connections
/// in again, so the instance never stays half-restored or closed.
pub async fn settle_failed_restore(state: &AppState, operation: &Operation, instance: &Instance) {
    let op_id = operation.id.clone();
    let record = match state
        .store
        .run(move |conn| Ok(restores::find_by_operation(conn, &op_id)?))
        .await
    {
        Ok(Some(record)) => record,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(operation = %operation.id, %error, "Reading a failed restore failed; the next restore cleans up.");
            return;
        }
    };
    let Ok(target) = instance_spec(instance) else {
        return;
    };
    if record.phase.as_deref() == Some(phase::SWAPPING) {
        match state.infrastructure.complete_restore(&target).await {
            Ok(()) => {
                tracing::warn!(instance_id = %target.id, restore_id = %record.id, "A failed restore had been verified; it was swapped in.");
                return;
            }
            Err(error) => {
                tracing::warn!(instance_id = %target.id, %error, "Completing a verified restore failed; dropping it.");
            }
        }
    }
    abandon(state, &target).await;
}

/// The manifest of a stored backup.
///
/// # Errors
/// [`phoenix_adapters::Error::NotFound`] when the backup is not in storage.
pub async fn read_backup(
    state: &AppState,
    instance_id: &str,
    backup_id: &str,
) -> Result<Manifest, Error> {
    Ok(backup::read_manifest(
        state.backup_store.as_ref(),
        &InstanceId::parse(instance_id)?,
        &BackupId::parse(backup_id)?,
    )
    .await?)
}

/// Loads a stored backup into a scratch database beside `target`'s live data; abandons
/// the scratch database (the live data untouched) when anything fails. Every chunk is
/// authenticated before it reaches the engine and the digest is checked at the end, so
/// only a verified backup is ever swapped in.
async fn load_backup<R, F>(
    state: &AppState,
    target: &InstanceSpec,
    manifest: &Manifest,
    record: R,
) -> Result<(), Error>
where
    R: Fn(u64, u64) -> F,
    F: std::future::Future<Output = Result<(), Error>>,
{
    let infrastructure = &state.infrastructure;
    let loaded = async {
        let sink = infrastructure
            .begin_restore(target, &manifest.source_info)
            .await?;
        stream_into(state, manifest, sink, record).await
    }
    .await;
    if let Err(error) = loaded {
        abandon(state, target).await;
        return Err(error);
    }
    Ok(())
}

/// Drops what a failed restore left beside the live data; a failure here is logged (the
/// next attempt or restore drops it again).
async fn abandon(state: &AppState, target: &InstanceSpec) {
    if let Err(error) = state.infrastructure.abandon_restore(target).await {
        tracing::warn!(instance_id = %target.id, %error, "Dropping the data of a failed restore failed; the next restore drops it.");
    }
}

/// How the plan of `instance` backs it up.
fn plan_strategy(state: &AppState, instance: &Instance) -> Result<BackupStrategy, Error> {
    state
        .catalog
        .plan(&instance.plan_id)
        .map(|(_, plan)| plan.backup_strategy)
        .ok_or_else(|| {
            Error::Inconsistent(format!(
                "the plan of instance {} is no longer in the catalog",
                instance.id
            ))
        })
}

/// The format of a shipped snapshot's stream.
const SHIPPED_FORMAT: &str = "btrfs-send";

/// What kind of snapshot a backup is, if it is one.
enum SnapshotKind {
    /// Kept where it was taken: the manifest points at it.
    Kept(SnapshotRef),
    /// Shipped: its `btrfs send` stream is in backup storage.
    Shipped,
}

impl SnapshotKind {
    fn of(manifest: &Manifest) -> Option<Self> {
        match &manifest.source {
            ManifestSource::Reference { snapshot } => Some(Self::Kept(snapshot.clone())),
            ManifestSource::Stream { .. } if manifest.source_info.format == SHIPPED_FORMAT => {
                Some(Self::Shipped)
            }
            ManifestSource::Stream { .. } => None,
        }
    }
}

/// The local snapshot a backup made (a kept one, or the one a shipped backup leaves on
/// the host it was taken on): what deleting the backup must delete.
pub fn local_snapshot(manifest: &Manifest) -> Option<SnapshotRef> {
    match SnapshotKind::of(manifest)? {
        SnapshotKind::Kept(snapshot) => Some(snapshot),
        SnapshotKind::Shipped => Some(SnapshotRef {
            provider: "btrfs".to_owned(),
            id: format!("{}/{}", manifest.instance_id, manifest.backup_id),
            location: None,
            size_bytes: None,
            details: std::collections::BTreeMap::new(),
        }),
    }
}

/// Receives a shipped snapshot from backup storage as a local snapshot of `target`
/// (authenticated chunk by chunk like any restore), unless this host still has it.
async fn receive_shipped<R, F>(
    state: &AppState,
    target: &InstanceSpec,
    manifest: &Manifest,
    record: R,
) -> Result<SnapshotRef, Error>
where
    R: Fn(u64, u64) -> F,
    F: std::future::Future<Output = Result<(), Error>>,
{
    if let Some(local) = local_snapshot(manifest)
        && manifest.instance_id == target.id
        && state.infrastructure.snapshot_exists(&local).await?
    {
        return Ok(local);
    }
    let (sink, snapshot) = state
        .infrastructure
        .receive_snapshot(target, &manifest.backup_id, &manifest.source_info)
        .await?;
    stream_into(state, manifest, sink, record).await?;
    Ok(snapshot)
}

/// Streams a stored backup into `sink` (storage, digest, decryption, decompression),
/// recording progress: every chunk is authenticated before the sink sees it.
async fn stream_into<R, F>(
    state: &AppState,
    manifest: &Manifest,
    sink: Box<dyn Sink>,
    record: R,
) -> Result<(), Error>
where
    R: Fn(u64, u64) -> F,
    F: std::future::Future<Output = Result<(), Error>>,
{
    let progress = Progress::new();
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    with_progress(
        &progress,
        backup::restore(
            Arc::clone(&state.backup_store),
            manifest,
            KeySource::Master(&state.master_key),
            sink,
            &progress,
            &cancel,
        ),
        record,
    )
    .await?;
    Ok(())
}

/// Provisions `instance`: a new server, filled from its seed if it has one. A clone of a
/// snapshot backup and a fork of a snapshot plan's instance are copies of a volume
/// snapshot (near-instant); every other seed is streamed into the new server.
///
/// # Errors
/// When the infrastructure or the seed's source fails.
pub async fn provision(
    state: &AppState,
    instance: &Instance,
    seed: Option<&Seed>,
) -> Result<Endpoint, Error> {
    let spec = instance_spec(instance)?;
    let infrastructure = &state.infrastructure;
    match seed {
        None => Ok(infrastructure.provision(&spec).await?),
        Some(Seed::Clone {
            instance_id,
            backup_id,
        }) => {
            let manifest = read_backup(state, instance_id, backup_id).await?;
            let snapshot = match SnapshotKind::of(&manifest) {
                Some(SnapshotKind::Kept(snapshot)) => snapshot,
                Some(SnapshotKind::Shipped) => {
                    receive_shipped(state, &spec, &manifest, |_, _| async { Ok(()) }).await?
                }
                None => {
                    let endpoint = infrastructure.provision(&spec).await?;
                    load_backup(state, &spec, &manifest, |_, _| async { Ok(()) }).await?;
                    infrastructure.complete_restore(&spec).await?;
                    return Ok(endpoint);
                }
            };
            Ok(infrastructure
                .provision_from_snapshot(&spec, &snapshot)
                .await?)
        }
        Some(Seed::Fork { instance_id }) => {
            let id = instance_id.clone();
            let source = state
                .store
                .run(move |conn| Ok(instances::find(conn, &id)?))
                .await?
                .filter(|i| i.state == instances::state::PROVISIONED)
                .ok_or_else(|| {
                    phoenix_adapters::Error::Invalid(format!(
                        "the instance {instance_id} to fork is not running"
                    ))
                })?;
            let source_spec = instance_spec(&source)?;
            if matches!(
                plan_strategy(state, &source)?,
                BackupStrategy::Snapshot { .. }
            ) {
                return Ok(infrastructure.provision_fork(&spec, &source_spec).await?);
            }
            let endpoint = infrastructure.provision(&spec).await?;
            fork_stream(state, &spec, &source_spec).await?;
            Ok(endpoint)
        }
    }
}

/// Streams the live data of `source` (its engine's dump) straight into `target`.
async fn fork_stream(
    state: &AppState,
    target: &InstanceSpec,
    source: &InstanceSpec,
) -> Result<(), Error> {
    let source = state.infrastructure.backup_source(source).await?;
    let info = source.info();
    let copied = async {
        let sink = state.infrastructure.begin_restore(target, &info).await?;
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        backup::transfer(source.as_ref(), sink, &Progress::new(), &cancel).await?;
        Ok::<_, Error>(())
    }
    .await;
    if let Err(error) = copied {
        abandon(state, target).await;
        return Err(error);
    }
    state.infrastructure.complete_restore(target).await?;
    Ok(())
}
