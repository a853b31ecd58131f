//! Snapshots of local volumes on btrfs: backups as read-only subvolume snapshots;
//! in-place restores, clones and forks from them; and shipped snapshots (`btrfs send`
//! through the backup pipeline, `btrfs receive` on any host).
//!
//! **Consistency.** A volume is one subvolume holding the whole instance (for PostgreSQL
//! the data directory with its WAL), and a subvolume snapshot is atomic: a snapshot is
//! crash-consistent, exactly what a power cut at that instant would leave, and the data
//! service recovers from it as from a crash (PostgreSQL replays its WAL from the last
//! checkpoint when it starts). The snapshot follows a checkpoint
//! ([`Engine::prepare_snapshot`]) so that replay stays short. No backup mode is entered,
//! so a broker that dies half-way leaves nothing to end.
//!
//! **Layout** under the root (`@` is in no instance ID): `@snapshots/<instance>/<backup>`
//! (read-only snapshots: backups, kept until deleted, also after a deprovision),
//! `@staging/<instance>` (a copy being made the instance's), `@previous/<instance>` (the
//! live volume during an in-place restore), `@forks/<target>` (the snapshot of a fork's
//! source) and `@receiving/<instance>/` (a shipped snapshot being received).
//!
//! **Crash safety.** An in-place restore sets the live volume aside only once the copy is
//! ready beside it, and throws it away only once the copy runs, adopted. While it is
//! aside, the instance's next locked call puts it back: an interrupted restore is a
//! failed one, and the instance ends as it was. A copy for a new instance carries an
//! `initialising` record until it runs, so an interrupted clone is wiped and redone like
//! an interrupted provision. A copy runs with TCP closed until it is adopted
//! ([`Engine::adopt_copy`]): the logins it carries from its source never get in.
//!
//! A root that is not on btrfs refuses every call here with [`Error::Invalid`]: nothing
//! is ever faked with a copy. Where volumes are EBS volumes, the same calls work on EBS
//! snapshots (`ebs_volumes.rs` holds what differs): the same flow, with mounts moved
//! instead of directories renamed, and no shipping (EC2 keeps its snapshots off the host).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use super::{LocalInfrastructure, VolumeRecord, VolumeState};
use crate::backup::{
    ProcessSink, ProcessSource, Sink, SnapshotRef, Source, SourceInfo, SourceOutput,
};
use crate::engine::{BindingLogins, Endpoint, Engine, Server};
use crate::ids::{BackupId, InstanceId};
use crate::infrastructure::btrfs::{self, Btrfs};
use crate::infrastructure::{InstanceSpec, ebs, host};
use crate::storage::ByteStream;
use crate::{Error, Result};

const SNAPSHOTS_DIR: &str = "@snapshots";
const STAGING_DIR: &str = "@staging";
const PREVIOUS_DIR: &str = "@previous";
const FORKS_DIR: &str = "@forks";
const RECEIVING_DIR: &str = "@receiving";
/// [`SnapshotRef::provider`] of these snapshots.
const PROVIDER: &str = "btrfs";
/// [`SourceInfo::strategy`] of snapshots, and the formats of one kept here (a btrfs
/// subvolume or an EBS snapshot) and of one shipped.
const STRATEGY: &str = "snapshot";
const SUBVOLUME_FORMAT: &str = "btrfs-subvolume";
/// The format of an EBS snapshot's backup.
const EBS_FORMAT: &str = "ebs-snapshot";
const SEND_FORMAT: &str = "btrfs-send";

/// What a copy (a clone, a fork, an in-place restore) is made from.
#[derive(Debug, Clone)]
pub(super) enum CopySource {
    /// A read-only btrfs snapshot at this path.
    Subvolume(PathBuf),
    /// An EBS snapshot.
    Ebs(SnapshotRef),
}

impl LocalInfrastructure {
    /// Whether snapshot plans can run here: volumes are EBS volumes, or the root is on
    /// btrfs and the btrfs tool is installed. The broker refuses a snapshot plan at
    /// provision time otherwise.
    pub fn supports_snapshots(&self) -> bool {
        self.btrfs.is_ok() || self.ebs.is_some()
    }

    /// Whether the snapshots taken here can be shipped (read as a stream): btrfs ones
    /// can, EBS ones are not (EC2 keeps them off the host already).
    pub fn ships_snapshots(&self) -> bool {
        self.btrfs.is_ok()
    }

    /// A read-only snapshot of the instance's volume as backup `backup`, after a
    /// checkpoint (see the module documentation). Idempotent: a snapshot of that backup
    /// that exists already is whole, and is returned.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the root is not on btrfs, the instance is not provisioned,
    /// or its volume is a plain directory (made before its root was on btrfs); the
    /// engine's or the tool's errors otherwise.
    pub async fn snapshot(&self, spec: &InstanceSpec, backup: &BackupId) -> Result<SnapshotRef> {
        if let Some(ebs) = &self.ebs {
            return self.snapshot_ebs(ebs, spec, backup).await;
        }
        let btrfs = self.require_btrfs()?;
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.require_ready(&server, spec).await?;
        let target = self.snapshot_path(&spec.id, backup);
        if !btrfs::is_subvolume(&target)? {
            self.snapshot_live(btrfs, spec, &server, &target).await?;
            info!(instance_id = %spec.id, backup_id = %backup, "Snapshot taken.");
        }
        Ok(self.snapshot_ref(&spec.id, backup))
    }

    /// The snapshot of `backup` as a backup [`Source`] for the pipeline's runner: opening
    /// it takes the snapshot (as [`snapshot`](Self::snapshot)) and yields its reference,
    /// which the manifest records.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the root is not on btrfs.
    pub fn snapshot_source(
        self: &Arc<Self>,
        spec: &InstanceSpec,
        backup: &BackupId,
    ) -> Result<Box<dyn Source>> {
        if self.ebs.is_none() {
            self.require_btrfs()?;
        }
        Ok(Box::new(SnapshotSource {
            infrastructure: Arc::clone(self),
            spec: spec.clone(),
            backup: backup.clone(),
        }))
    }

    /// Whether the snapshot exists here (an EBS snapshot: in this infrastructure's region).
    ///
    /// # Errors
    /// [`Error::Invalid`] when this infrastructure takes no snapshots or the reference is
    /// not one of its kind; EC2's errors for an EBS snapshot.
    pub async fn snapshot_exists(&self, snapshot: &SnapshotRef) -> Result<bool> {
        if let Some(ebs) = self.ebs_for(snapshot)? {
            return ebs.snapshots().exists(snapshot).await;
        }
        self.require_btrfs()?;
        let (_, path) = self.resolve(snapshot)?;
        btrfs::is_subvolume(&path)
    }

    /// Deletes the snapshot. Idempotent.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the root is not on btrfs or the reference is not one of
    /// this infrastructure's; the tool's errors otherwise.
    pub async fn delete_snapshot(&self, snapshot: &SnapshotRef) -> Result<()> {
        if let Some(ebs) = self.ebs_for(snapshot)? {
            return ebs.snapshots().delete(snapshot).await;
        }
        let btrfs = self.require_btrfs()?;
        let (instance, path) = self.resolve(snapshot)?;
        let guard = self.lock(&instance).await?;
        btrfs.delete(&path).await?;
        let dir = self.root.join(SNAPSHOTS_DIR).join(instance.as_str());
        // Only when it is empty; under the lock, so no snapshot is being made in it.
        let _ = std::fs::remove_dir(&dir);
        info!(instance_id = %instance, snapshot = %snapshot.id, "Snapshot deleted.");
        if !exists(&dir)? && !exists(&self.volume(&instance))? {
            self.release(&instance, guard);
        }
        Ok(())
    }

    /// Restores the snapshot into the instance in place: the live volume is replaced by a
    /// writable snapshot of it, started, and adopted with the bindings the instance has
    /// now (see [`Engine::adopt_copy`]). On any failure the instance ends exactly as it
    /// was, running its previous volume. Snapshots of other instances (of the same
    /// engine and version) restore alike.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the root is not on btrfs, the snapshot does not exist or
    /// holds another engine or version, or the instance is not provisioned; the
    /// engine's or the tool's errors otherwise.
    ///
    /// # Cancellation
    /// A restore cancelled (or whose broker died) half-way is undone by the instance's
    /// next call, which puts the previous volume back.
    pub async fn restore_snapshot(
        &self,
        spec: &InstanceSpec,
        snapshot: &SnapshotRef,
    ) -> Result<Endpoint> {
        let source = self.copy_source(snapshot)?;
        let engine = spec.engine.engine();
        engine.validate_settings(&spec.settings)?;
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        let record = self.require_ready(&server, spec).await?;
        // A btrfs snapshot is checked before the live server is touched; an EBS one can
        // be read only once a volume is made from it (in stage_copy).
        if let CopySource::Subvolume(path) = &source {
            self.check_copy(path, spec).await?;
        }
        // The live server must answer: its bindings' logins go into the copy.
        self.converge(engine, &server, spec, &record).await?;
        let logins = engine.binding_logins(&server).await?;
        let staging = self.staging(&spec.id);
        self.stage_copy(&source, &staging, spec, VolumeState::Ready)
            .await?;
        let restored = async {
            engine.stop(&server).await?;
            let previous = self.previous(&spec.id);
            private_dirs(&self.root.join(PREVIOUS_DIR))?;
            self.move_volume(&server.volume, &previous).await?;
            self.move_volume(&staging, &server.volume).await?;
            self.start_copy(engine, &server, spec, &logins).await?;
            // The commit point: once the previous volume is in the trash, nothing puts
            // it back.
            self.discard(&previous).await?;
            Ok(engine.endpoint(&server))
        }
        .await;
        match restored {
            Ok(endpoint) => {
                info!(instance_id = %spec.id, snapshot = %snapshot.id, "Snapshot restored in place.");
                Ok(endpoint)
            }
            Err(e) => {
                warn!(instance_id = %spec.id, error = %e, "Restoring a snapshot failed; bringing the instance back as it was.");
                let undone = async {
                    self.recover_interrupted_restore(&spec.id).await?;
                    self.discard(&staging).await?;
                    self.converge(engine, &server, spec, &record).await
                };
                if let Err(undo) = undone.await {
                    warn!(instance_id = %spec.id, error = %undo, "Bringing the instance back failed; its next call retries.");
                }
                Err(e)
            }
        }
    }

    /// Provisions a new instance from a writable snapshot of the snapshot (a clone):
    /// its record, port and configuration become its own, and none of its source's
    /// bindings can log in. Idempotent and crash-safe as [`provision`](Self::provision).
    ///
    /// # Errors
    /// As [`restore_snapshot`](Self::restore_snapshot), and as `provision`.
    pub async fn provision_from_snapshot(
        &self,
        spec: &InstanceSpec,
        snapshot: &SnapshotRef,
    ) -> Result<Endpoint> {
        let source = self.copy_source(snapshot)?;
        self.provision_volume(spec, Some(&source)).await
    }

    /// Provisions a new instance from a snapshot of the live instance `source` (a
    /// fork), taken as a backup snapshot is and removed once the fork runs.
    ///
    /// # Errors
    /// As [`snapshot`](Self::snapshot) for the source and
    /// [`provision_from_snapshot`](Self::provision_from_snapshot) for the fork.
    pub async fn provision_fork(
        &self,
        spec: &InstanceSpec,
        source: &InstanceSpec,
    ) -> Result<Endpoint> {
        if spec.id == source.id {
            return Err(Error::Invalid(format!(
                "instance {} cannot be forked into itself",
                spec.id
            )));
        }
        if let Some(ebs) = &self.ebs {
            return self.provision_fork_ebs(ebs, spec, source).await;
        }
        let btrfs = self.require_btrfs()?;
        let fork = self.root.join(FORKS_DIR).join(spec.id.as_str());
        {
            // Only the source's lock here, then only the fork's: never both at once.
            let server = self.server(source)?;
            let _guard = self.lock(&source.id).await?;
            self.require_ready(&server, source).await?;
            btrfs.delete(&fork).await?;
            self.snapshot_live(btrfs, source, &server, &fork).await?;
        }
        let forked = self
            .provision_volume(spec, Some(&CopySource::Subvolume(fork.clone())))
            .await;
        if let Err(e) = btrfs.delete(&fork).await {
            warn!(instance_id = %spec.id, error = %e, "Removing a fork's source snapshot failed; the next fork or deprovision retries.");
        }
        forked
    }

    /// The snapshot as a `btrfs send` stream, for a shipped backup: it goes through the
    /// backup pipeline's filters to remote storage like a dump.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the root is not on btrfs or the snapshot does not exist.
    pub async fn send_source(&self, snapshot: &SnapshotRef) -> Result<Box<dyn Source>> {
        let btrfs = self.require_shipping()?;
        let (_, path) = self.resolve(snapshot)?;
        let record = self.copy_record(&path).await?;
        let info = SourceInfo {
            strategy: STRATEGY.to_owned(),
            engine: record.engine.as_str().to_owned(),
            engine_version: Some(record.version),
            format: SEND_FORMAT.to_owned(),
            details: BTreeMap::new(),
        };
        Ok(Box::new(ProcessSource::new(
            info,
            btrfs.send_command(&path)?,
        )))
    }

    /// A sink that receives a shipped snapshot (a [`send_source`](Self::send_source)
    /// stream, from any host) as snapshot `backup` of the instance, and the reference it
    /// has once the sink succeeded: restore it with
    /// [`restore_snapshot`](Self::restore_snapshot) or clone it. It stays, as a local
    /// snapshot, until it is deleted. One receive per instance at a time; what a failed
    /// or cancelled one left is removed by the next one.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the root is not on btrfs, or `info` is not a shipped
    /// snapshot of the instance's engine and version.
    pub async fn receive_snapshot(
        &self,
        spec: &InstanceSpec,
        backup: &BackupId,
        info: &SourceInfo,
    ) -> Result<(Box<dyn Sink>, SnapshotRef)> {
        let btrfs = self.require_shipping()?;
        let version = info.engine_version.as_deref();
        if info.format != SEND_FORMAT
            || info.engine != spec.engine.as_str()
            || version != Some(spec.version.as_str())
        {
            return Err(Error::Invalid(format!(
                "a {} backup of {} {} cannot be received as a snapshot of {} {}",
                shown(&info.format),
                shown(&info.engine),
                shown(version.unwrap_or("(unknown version)")),
                spec.engine,
                spec.version
            )));
        }
        let _guard = self.lock(&spec.id).await?;
        let dir = self.root.join(RECEIVING_DIR).join(spec.id.as_str());
        clear_received(btrfs, &dir).await?;
        private_dirs(&dir)?;
        let sink = ReceiveSink {
            btrfs: btrfs.clone(),
            dir,
            target: self.snapshot_path(&spec.id, backup),
        };
        Ok((Box::new(sink), self.snapshot_ref(&spec.id, backup)))
    }

    /// Creates the volume of a new instance: an EBS volume mounted there on an EC2 host
    /// configured for it, a subvolume on btrfs (so that it can be snapshotted), a
    /// directory elsewhere.
    pub(super) async fn create_volume(&self, id: &InstanceId, volume: &Path) -> Result<()> {
        if let Some(ebs) = &self.ebs {
            return self.create_ebs_volume(ebs, id, volume).await;
        }
        if let Ok(btrfs) = &self.btrfs
            && !exists(volume)?
        {
            btrfs.create_subvolume(volume).await?;
        }
        host::create_private_dir(volume, self.run_as.as_ref())
    }

    /// Removes a volume that nothing uses any more: a subvolume at once, whatever its
    /// size; a directory file by file.
    pub(super) async fn remove_volume(&self, path: &Path) -> Result<()> {
        match &self.btrfs {
            Ok(btrfs) if btrfs::is_subvolume(path)? => btrfs.delete(path).await,
            _ => host::remove_tree(path).await,
        }
    }

    /// Makes a copy of a snapshot, at the new instance's volume path, the instance's
    /// (see [`provision_from_snapshot`](Self::provision_from_snapshot)).
    pub(super) async fn create_copy(
        &self,
        engine: &dyn Engine,
        server: &Server,
        spec: &InstanceSpec,
        source: &CopySource,
    ) -> Result<Endpoint> {
        let staging = self.staging(&spec.id);
        self.stage_copy(source, &staging, spec, VolumeState::Initialising)
            .await?;
        self.move_volume(&staging, &server.volume).await?;
        self.start_copy(engine, server, spec, &BindingLogins::default())
            .await?;
        engine.bootstrap(server).await?;
        let record = VolumeRecord {
            engine: spec.engine,
            version: spec.version.clone(),
            port: spec.port,
            state: VolumeState::Ready,
        };
        self.write_record(&server.volume, &record).await?;
        Ok(engine.endpoint(server))
    }

    /// Puts back the live volume an interrupted in-place restore set aside; whatever
    /// stands at the volume path then is the copy, never completely adopted. With
    /// nothing to put back, an EBS volume a host restart unmounted is mounted again.
    /// Called under the instance's lock by every call that needs its volume.
    pub(super) async fn recover_interrupted_restore(&self, id: &InstanceId) -> Result<()> {
        let previous = self.previous(id);
        if !self.holds_volume(&previous)? {
            self.remount_lost_volume(id).await;
            return Ok(());
        }
        warn!(instance_id = %id, "Putting back the volume an interrupted snapshot restore set aside.");
        let volume = self.volume(id);
        if exists(&volume)? {
            let record = self.read_record(&volume).await;
            self.wipe(id, record.as_ref()).await?;
        }
        self.move_volume(&previous, &volume).await
    }

    /// Removes what an interrupted copy, fork or receive of the instance left.
    pub(super) async fn clear_staging(&self, id: &InstanceId) -> Result<()> {
        if let Some(ebs) = &self.ebs {
            self.discard(&self.staging(id)).await?;
            return self.delete_fork_snapshots(ebs, id).await;
        }
        let Ok(btrfs) = &self.btrfs else {
            return Ok(());
        };
        self.discard(&self.staging(id)).await?;
        btrfs
            .delete(&self.root.join(FORKS_DIR).join(id.as_str()))
            .await?;
        clear_received(btrfs, &self.root.join(RECEIVING_DIR).join(id.as_str())).await
    }

    fn require_btrfs(&self) -> Result<&Btrfs> {
        self.btrfs
            .as_ref()
            .map_err(|reason| Error::Invalid(format!("{reason}; snapshot plans need it")))
    }

    fn require_shipping(&self) -> Result<&Btrfs> {
        if self.ebs.is_some() {
            return Err(Error::Invalid(
                "the volumes here are EBS volumes: their snapshots are not shipped (EC2 keeps \
                 them off this host already), and shipped btrfs snapshots cannot be received"
                    .to_owned(),
            ));
        }
        self.require_btrfs()
    }

    /// The EBS volumes when `snapshot` is an EBS snapshot; `None` for any other.
    fn ebs_for(&self, snapshot: &SnapshotRef) -> Result<Option<&ebs::EbsVolumes>> {
        if snapshot.provider != ebs::PROVIDER {
            return Ok(None);
        }
        self.ebs.as_ref().map(Some).ok_or_else(|| {
            Error::Invalid(format!(
                "{} is an EBS snapshot, and this host's volumes are not EBS volumes",
                shown(&snapshot.id)
            ))
        })
    }

    /// What a copy of `snapshot` is made from here.
    fn copy_source(&self, snapshot: &SnapshotRef) -> Result<CopySource> {
        if self.ebs_for(snapshot)?.is_some() {
            return Ok(CopySource::Ebs(snapshot.clone()));
        }
        self.require_btrfs()?;
        Ok(CopySource::Subvolume(self.resolve(snapshot)?.1))
    }

    fn snapshot_path(&self, id: &InstanceId, backup: &BackupId) -> PathBuf {
        self.root
            .join(SNAPSHOTS_DIR)
            .join(id.as_str())
            .join(backup.as_str())
    }

    pub(super) fn staging(&self, id: &InstanceId) -> PathBuf {
        self.root.join(STAGING_DIR).join(id.as_str())
    }

    fn previous(&self, id: &InstanceId) -> PathBuf {
        self.root.join(PREVIOUS_DIR).join(id.as_str())
    }

    fn snapshot_ref(&self, id: &InstanceId, backup: &BackupId) -> SnapshotRef {
        SnapshotRef {
            provider: PROVIDER.to_owned(),
            id: format!("{id}/{backup}"),
            location: hostname(),
            size_bytes: None,
            details: BTreeMap::new(),
        }
    }

    /// The instance a snapshot belongs to and its path here, from validated IDs only.
    fn resolve(&self, snapshot: &SnapshotRef) -> Result<(InstanceId, PathBuf)> {
        if snapshot.provider != PROVIDER {
            return Err(Error::Invalid(format!(
                "a {} snapshot is not a local btrfs snapshot",
                shown(&snapshot.provider)
            )));
        }
        if let (Some(there), Some(here)) = (&snapshot.location, hostname())
            && *there != here
        {
            return Err(Error::Invalid(format!(
                "snapshot {} is on host {}, not on {here}: restore its shipped stream instead",
                shown(&snapshot.id),
                shown(there)
            )));
        }
        let (instance, backup) = snapshot.id.split_once('/').ok_or_else(|| {
            Error::Invalid(format!(
                "{} is not a btrfs snapshot ID (instance/backup)",
                shown(&snapshot.id)
            ))
        })?;
        let instance = InstanceId::parse(instance)?;
        let path = self.snapshot_path(&instance, &BackupId::parse(backup)?);
        Ok((instance, path))
    }

    /// The record of the copy at `path`, which must be a subvolume.
    async fn copy_record(&self, path: &Path) -> Result<VolumeRecord> {
        if !btrfs::is_subvolume(path)? {
            return Err(Error::Invalid(format!(
                "the snapshot {} does not exist",
                path.display()
            )));
        }
        self.read_record(path).await.ok_or_else(|| {
            Error::Invalid(format!(
                "the snapshot {} holds no volume record",
                path.display()
            ))
        })
    }

    /// Refuses a snapshot that is missing or holds another engine or major version than
    /// `spec` (a physical copy runs only on the version that wrote it).
    async fn check_copy(&self, path: &Path, spec: &InstanceSpec) -> Result<()> {
        self.copy_record(path).await?;
        self.check_record(path, &path.display().to_string(), spec)
            .await
    }

    /// Refuses the copy at `path` of snapshot `name` when its record is missing or names
    /// another engine or major version than `spec`.
    async fn check_record(&self, path: &Path, name: &str, spec: &InstanceSpec) -> Result<()> {
        let record = self
            .read_record(path)
            .await
            .ok_or_else(|| Error::Invalid(format!("the snapshot {name} holds no volume record")))?;
        if record.engine == spec.engine && record.version == spec.version {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "the snapshot {name} holds {} {}, not {} {}",
                record.engine, record.version, spec.engine, spec.version
            )))
        }
    }

    /// A read-only snapshot of the live volume of `server` at `target`, after a
    /// checkpoint when the server answers (without one it is still crash-consistent).
    async fn snapshot_live(
        &self,
        btrfs: &Btrfs,
        spec: &InstanceSpec,
        server: &Server,
        target: &Path,
    ) -> Result<()> {
        if !btrfs::is_subvolume(&server.volume)? {
            return Err(Error::Invalid(format!(
                "the volume of instance {} is a plain directory, made before its data directory was on btrfs: it cannot be snapshotted",
                spec.id
            )));
        }
        let engine = spec.engine.engine();
        if engine.is_healthy(server).await? {
            engine.prepare_snapshot(server).await?;
        } else {
            warn!(instance_id = %spec.id, "The server does not answer; snapshotting without a checkpoint.");
        }
        if let Some(parent) = target.parent() {
            private_dirs(parent)?;
        }
        btrfs.snapshot(&server.volume, target, true).await
    }

    /// A writable snapshot of `source` at `staging` (replacing a leftover), made the
    /// instance's: its files of the source's server user handed to this one (a snapshot
    /// received from another host carries that host's user IDs), and its record.
    async fn stage_copy(
        &self,
        source: &CopySource,
        staging: &Path,
        spec: &InstanceSpec,
        state: VolumeState,
    ) -> Result<()> {
        self.discard(staging).await?;
        if let Some(parent) = staging.parent() {
            private_dirs(parent)?;
        }
        match source {
            CopySource::Subvolume(path) => {
                self.check_copy(path, spec).await?;
                self.require_btrfs()?.snapshot(path, staging, false).await?;
            }
            CopySource::Ebs(snapshot) => self.stage_ebs_copy(snapshot, staging, spec).await?,
        }
        let prepared = async {
            if let CopySource::Ebs(snapshot) = source {
                self.check_record(staging, &snapshot.id, spec).await?;
            }
            hand_over(staging, self.run_as.as_ref()).await?;
            let record = VolumeRecord {
                engine: spec.engine,
                version: spec.version.clone(),
                port: spec.port,
                state,
            };
            self.write_record(staging, &record).await
        }
        .await;
        if prepared.is_err()
            && let Err(e) = self.discard(staging).await
        {
            warn!(instance_id = %spec.id, error = %e, "Removing a staged copy failed; the next copy retries.");
        }
        prepared
    }

    /// Starts the copy at `server` with TCP closed, adopts it with `logins`, and opens
    /// it to clients with the plan's settings (a restart, as the address changed).
    async fn start_copy(
        &self,
        engine: &dyn Engine,
        server: &Server,
        spec: &InstanceSpec,
        logins: &BindingLogins,
    ) -> Result<()> {
        let closed = Server {
            listen_host: String::new(),
            ..server.clone()
        };
        engine.configure(&closed, &spec.settings).await?;
        engine.start(&closed).await?;
        Self::wait_healthy(engine, &closed).await?;
        engine.adopt_copy(&closed, logins).await?;
        engine.configure(server, &spec.settings).await?;
        engine.start(server).await?;
        Self::wait_healthy(engine, server).await
    }
}

/// See [`LocalInfrastructure::snapshot_source`].
#[derive(Debug)]
struct SnapshotSource {
    infrastructure: Arc<LocalInfrastructure>,
    spec: InstanceSpec,
    backup: BackupId,
}

#[async_trait::async_trait]
impl Source for SnapshotSource {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            strategy: STRATEGY.to_owned(),
            engine: self.spec.engine.as_str().to_owned(),
            engine_version: Some(self.spec.version.clone()),
            format: if self.infrastructure.ebs.is_some() {
                EBS_FORMAT
            } else {
                SUBVOLUME_FORMAT
            }
            .to_owned(),
            details: BTreeMap::new(),
        }
    }

    async fn open(&self) -> Result<SourceOutput> {
        let snapshot = self
            .infrastructure
            .snapshot(&self.spec, &self.backup)
            .await?;
        Ok(SourceOutput::Reference(snapshot))
    }
}

/// `btrfs receive` into a directory of its own, then kept as a read-only snapshot under
/// its backup's name (a received subvolume is named by its sender, and cannot be moved
/// out of its directory while it is read-only).
#[derive(Debug)]
struct ReceiveSink {
    btrfs: Btrfs,
    dir: PathBuf,
    target: PathBuf,
}

impl ReceiveSink {
    async fn keep(&self) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir)
            .and_then(|entries| {
                entries
                    .map(|e| e.map(|e| e.path()))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| Error::io(format!("listing {}", self.dir.display()), e))?;
        let [received] = entries.as_slice() else {
            return Err(Error::Invalid(format!(
                "the stream held {} entries, not one snapshot",
                entries.len()
            )));
        };
        if !btrfs::is_subvolume(received)? {
            return Err(Error::Invalid("the stream held no snapshot".into()));
        }
        if btrfs::is_subvolume(&self.target)? {
            info!(snapshot = %self.target.display(), "The snapshot was received before; keeping it.");
            return Ok(());
        }
        if let Some(parent) = self.target.parent() {
            private_dirs(parent)?;
        }
        self.btrfs.snapshot(received, &self.target, true).await
    }
}

#[async_trait::async_trait]
impl Sink for ReceiveSink {
    fn name(&self) -> &'static str {
        "btrfs receive"
    }

    async fn consume(self: Box<Self>, data: ByteStream) -> Result<u64> {
        let receive = Box::new(ProcessSink::new(self.btrfs.receive_command(&self.dir)?));
        let received = match receive.consume(data).await {
            Ok(bytes) => self.keep().await.map(|()| bytes),
            Err(e) => Err(e),
        };
        if let Err(e) = clear_received(&self.btrfs, &self.dir).await {
            warn!(dir = %self.dir.display(), error = %e, "Removing a received snapshot's staging failed; the next receive retries.");
        }
        received
    }
}

/// Removes the receive directory `dir` and whatever a receive left in it.
async fn clear_received(btrfs: &Btrfs, dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries {
        let path = entry
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            .path();
        if btrfs::is_subvolume(&path)? {
            btrfs.delete(&path).await?;
        } else {
            host::remove_tree(&path).await?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
    }
}

/// Hands the files of the copy at `dir` that belong to its server user (the owner of
/// `dir`) to this infrastructure's server user, without following a symlink. Files of
/// others (the broker's record) keep their owner. Nothing to do for a copy of a volume
/// of this host, the usual case.
async fn hand_over(dir: &Path, run_as: Option<&host::RunAs>) -> Result<()> {
    let io = |path: &Path, e| Error::io(format!("handing over {}", path.display()), e);
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io(dir, e))?;
    let from = (meta.uid(), meta.gid());
    let to = run_as.map_or_else(
        || {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        },
        |user| (user.uid, user.gid),
    );
    if from == to {
        return Ok(());
    }
    if from.0 == 0 {
        return Err(Error::Invalid(format!(
            "the copy {} belongs to root, not to a server user",
            dir.display()
        )));
    }
    let dir = dir.to_owned();
    let walk = move || -> Result<()> {
        let mut pending = vec![dir];
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
            let uid = if meta.uid() == from.0 {
                to.0
            } else {
                meta.uid()
            };
            let gid = if meta.gid() == from.1 {
                to.1
            } else {
                meta.gid()
            };
            if (uid, gid) != (meta.uid(), meta.gid()) {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| io(&path, e))?;
            }
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path).map_err(|e| io(&path, e))? {
                    pending.push(entry.map_err(|e| io(&path, e))?.path());
                }
            }
        }
        Ok(())
    };
    tokio::task::spawn_blocking(walk)
        .await
        .map_err(|e| Error::io("handing a copy over", std::io::Error::other(e)))?
}

/// Creates `dir` and its missing parents, mode 0700, for the broker alone.
pub(super) fn private_dirs(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
}

pub(super) fn exists(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("inspecting {}", path.display()), e)),
    }
}

/// Renames `from` to `to` durably (both directories synced).
pub(super) fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", from.display(), to.display()),
            e,
        )
    })?;
    for dir in [from.parent(), to.parent()].into_iter().flatten() {
        host::sync_dir(dir)?;
    }
    Ok(())
}

/// This host's name, which a snapshot's [`SnapshotRef::location`] records.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// A string from a manifest, cut for an error message.
fn shown(value: &str) -> String {
    format!("{:?}", value.chars().take(60).collect::<String>())
}
