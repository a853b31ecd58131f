//! What differs when the local infrastructure's volumes are EBS volumes (see
//! [`crate::infrastructure::ebs`]): a volume directory is the mount point of the
//! instance's own volume, a copy (restore, clone, fork) is a new volume made from an EBS
//! snapshot and mounted at the staging path, and where a directory would be renamed its
//! mount is moved (`mount --move`, atomic) instead.
//!
//! **Consistency** is that of the btrfs snapshots: after a checkpoint, and after the file
//! system's cached writes are flushed to the volume (a block-level snapshot sees only the
//! device), EC2 snapshots the volume as it is when CreateSnapshot returns,
//! crash-consistent, and the data service recovers from it as from a crash. No backup
//! mode is entered and the file system is not frozen (a frozen one would stay frozen if
//! the broker died), so a broker that dies half-way leaves the instance running as it
//! was.
//!
//! **The instance lock** is held while a snapshot is started, not while EC2 completes it
//! (which takes minutes to hours): binds and other calls go on meanwhile.
//!
//! **After a host restart** the volumes stay attached but nothing is mounted: the
//! instance's next call mounts its volume again, when exactly one volume is tagged with
//! the instance. Several (a restore interrupted by the restart) are left to the operator,
//! named in the log, rather than guessed at.

use std::path::Path;

use tracing::{info, warn};

use super::snapshots::{CopySource, exists, private_dirs, rename};
use super::{InstanceSpec, LocalInfrastructure};
use crate::backup::SnapshotRef;
use crate::engine::Endpoint;
use crate::ids::{BackupId, InstanceId};
use crate::infrastructure::ebs::{self, EbsVolumes};
use crate::infrastructure::host;
use crate::snapshot::ebs::SnapshotTags;
use crate::{Error, Result};

/// The backup name a fork's temporary snapshot is tagged with, beside the fork's ID.
const FORK_BACKUP: &str = "fork";

impl LocalInfrastructure {
    /// An EBS snapshot of the instance's volume as backup `backup`, after a checkpoint.
    /// Idempotent: a snapshot of that backup started before is adopted.
    pub(super) async fn snapshot_ebs(
        &self,
        ebs: &EbsVolumes,
        spec: &InstanceSpec,
        backup: &BackupId,
    ) -> Result<SnapshotRef> {
        let tags = SnapshotTags {
            instance_id: spec.id.clone(),
            backup_id: backup.clone(),
        };
        let snapshot_id = self.start_ebs_snapshot(ebs, spec, &tags).await?;
        ebs.snapshots().complete(&snapshot_id, &tags).await
    }

    /// Provisions `spec` from an EBS snapshot of the live instance `source`, tagged as
    /// the fork's and deleted once the fork runs (or, after a crash, by the fork's next
    /// provision or its deprovision).
    pub(super) async fn provision_fork_ebs(
        &self,
        ebs: &EbsVolumes,
        spec: &InstanceSpec,
        source: &InstanceSpec,
    ) -> Result<Endpoint> {
        let tags = SnapshotTags {
            instance_id: spec.id.clone(),
            backup_id: BackupId::parse(FORK_BACKUP)?,
        };
        // One an interrupted attempt left holds the source as it was then.
        self.delete_fork_snapshots(ebs, &spec.id).await?;
        let snapshot_id = self.start_ebs_snapshot(ebs, source, &tags).await?;
        let snapshot = ebs.snapshots().complete(&snapshot_id, &tags).await?;
        let forked = self
            .provision_volume(spec, Some(&CopySource::Ebs(snapshot.clone())))
            .await;
        if let Err(e) = ebs.snapshots().delete(&snapshot).await {
            warn!(instance_id = %spec.id, error = %e, "Deleting a fork's source snapshot failed; the fork's deprovision retries.");
        }
        forked
    }

    /// Deletes the temporary snapshots of forks into `id`.
    pub(super) async fn delete_fork_snapshots(
        &self,
        ebs: &EbsVolumes,
        id: &InstanceId,
    ) -> Result<()> {
        let fork = BackupId::parse(FORK_BACKUP)?;
        for snapshot in ebs.snapshots().find(id, Some(&fork)).await? {
            ebs.snapshots().delete(&snapshot).await?;
        }
        Ok(())
    }

    /// Makes, attaches, formats and mounts a new, empty volume for `id` at `volume`,
    /// handed to the server user. A failure leaves what was made tagged with `id`, for
    /// the failed provision's clean-up.
    pub(super) async fn create_ebs_volume(
        &self,
        ebs: &EbsVolumes,
        id: &InstanceId,
        volume: &Path,
    ) -> Result<()> {
        private_dirs(volume)?;
        let volume_id = ebs.create(id).await?;
        let device = ebs.attach(&volume_id).await?;
        ebs.format(&device).await?;
        ebs.mount(&device, volume).await?;
        host::create_private_dir(volume, self.run_as.as_ref())
    }

    /// A new volume made from `snapshot`, mounted at `staging` (which holds nothing).
    pub(super) async fn stage_ebs_copy(
        &self,
        snapshot: &SnapshotRef,
        staging: &Path,
        spec: &InstanceSpec,
    ) -> Result<()> {
        let ebs = self
            .ebs
            .as_ref()
            .ok_or_else(|| Error::Invalid("this host's volumes are not EBS volumes".to_owned()))?;
        private_dirs(staging)?;
        let volume_id = ebs.restore(snapshot, &spec.id).await?;
        let mounted = async {
            let device = ebs.attach(&volume_id).await?;
            ebs.mount(&device, staging).await
        };
        if let Err(e) = mounted.await {
            if let Err(cleanup) = async {
                ebs.detach(&volume_id).await?;
                ebs.delete(&volume_id).await
            }
            .await
            {
                warn!(instance_id = %spec.id, volume_id, error = %cleanup, "Deleting a volume that was not mounted failed; the instance's deprovision deletes it.");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Unmounts the volume at `path`, removes the directory, detaches the volume and
    /// deletes it.
    pub(super) async fn discard_ebs_volume(&self, ebs: &EbsVolumes, path: &Path) -> Result<()> {
        let volume_id = ebs.mounted_volume(path)?.ok_or_else(|| {
            Error::Invalid(format!(
                "{} holds a mount that is no EBS volume of this host: it is left alone",
                path.display()
            ))
        })?;
        host::kill_processes_in(path).await?;
        ebs.unmount(path).await?;
        remove_empty_dir(path)?;
        ebs.detach(&volume_id).await?;
        ebs.delete(&volume_id).await
    }

    /// Deletes what an interrupted or failed provision of `id` left on EC2: a staged
    /// copy's volume (unmounted first) and every volume tagged with the instance. A
    /// fork's source snapshot stays: this provision may be the fork.
    pub(super) async fn delete_ebs_leftovers(&self, id: &InstanceId) -> Result<()> {
        let Some(ebs) = &self.ebs else { return Ok(()) };
        self.discard(&self.staging(id)).await?;
        ebs.delete_all_of(id, None).await
    }

    /// Whether a volume stands at `path`: an EBS volume is mounted there (an empty
    /// directory a crash left is removed), or anything is, elsewhere.
    pub(super) fn holds_volume(&self, path: &Path) -> Result<bool> {
        if self.ebs.is_none() {
            return exists(path);
        }
        if ebs::is_mount_point(path)? {
            return Ok(true);
        }
        remove_empty_dir(path)?;
        Ok(false)
    }

    /// Moves the volume at `from` to `to`, which must not exist: its mount on EBS, the
    /// directory elsewhere.
    pub(super) async fn move_volume(&self, from: &Path, to: &Path) -> Result<()> {
        let Some(ebs) = &self.ebs else {
            return rename(from, to);
        };
        private_dirs(to)?;
        ebs.move_mount(from, to).await?;
        remove_empty_dir(from)
    }

    /// Mounts the instance's volume again when its directory stands without it (after a
    /// host restart). Best effort: when it cannot, the instance's call goes on and finds
    /// no complete volume.
    pub(super) async fn remount_lost_volume(&self, id: &InstanceId) {
        let Some(ebs) = &self.ebs else { return };
        let volume = self.volume(id);
        let lost =
            exists(&volume).unwrap_or(false) && !ebs::is_mount_point(&volume).unwrap_or(true);
        if !lost {
            return;
        }
        let remounted = async {
            let volumes = ebs.of_instance(id).await?;
            let [volume_id] = volumes.as_slice() else {
                return Err(Error::Invalid(format!(
                    "{} EBS volumes are tagged with the instance ({}): an operator must say which is its volume",
                    volumes.len(),
                    volumes.join(", ")
                )));
            };
            let device = ebs.attach(volume_id).await?;
            ebs.mount(&device, &volume).await?;
            info!(instance_id = %id, volume_id, "Mounted the instance's EBS volume again.");
            Ok(())
        };
        if let Err(e) = remounted.await {
            warn!(instance_id = %id, error = %e, "The instance's EBS volume is not mounted, and mounting it failed.");
        }
    }

    /// Starts the snapshot of `spec`'s volume under its lock, after a checkpoint.
    async fn start_ebs_snapshot(
        &self,
        ebs: &EbsVolumes,
        spec: &InstanceSpec,
        tags: &SnapshotTags,
    ) -> Result<String> {
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.require_ready(&server, spec).await?;
        let volume_id = ebs.mounted_volume(&server.volume)?.ok_or_else(|| {
            Error::Invalid(format!(
                "the volume of instance {} is not an EBS volume of this host",
                spec.id
            ))
        })?;
        let engine = spec.engine.engine();
        if engine.is_healthy(&server).await? {
            engine.prepare_snapshot(&server).await?;
        } else {
            warn!(instance_id = %spec.id, "The server does not answer; snapshotting without a checkpoint.");
        }
        ebs.flush(&server.volume).await?;
        ebs.snapshots().start(&volume_id, tags).await
    }
}

/// Removes `path` when it is an empty directory; Ok when it is gone.
fn remove_empty_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}
