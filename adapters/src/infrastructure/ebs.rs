//! EBS volumes as the volumes of the local infrastructure, when the broker runs on an EC2
//! instance: each data-service instance gets a volume of its own, attached to this host,
//! formatted ext4 and mounted where its volume directory would be. Backups of snapshot
//! plans are then EBS snapshots ([`EbsSnapshots`]), restores and clones new volumes made
//! from them, in this host's availability zone.
//!
//! **Devices.** A Nitro host shows an attached volume as
//! `<device_dir>/nvme-Amazon_Elastic_Block_Store_vol<hex>` (`/dev/disk/by-id` by
//! default): that link, never the device name given to AttachVolume (the kernel does not
//! keep it), says which block device is which volume, both after an attach and when a
//! mount is traced back to its volume. Xen instance types (no by-id link) are not
//! supported.
//!
//! **What is tagged.** Every volume made for an instance carries [`TAG_INSTANCE`] with
//! its ID, so that a deprovision, or a provision redone after a crash, finds and deletes
//! what an interrupted call left on EC2 (a volume still mounted here is never detached).
//!
//! **Mounts.** The root of the volumes is made a private mount of its own
//! ([`make_private_mount`]): the kernel refuses to move a mount (`mount --move`, how a
//! restored volume takes the live one's place atomically) out of a shared parent, and
//! systemd mounts `/` shared.
//!
//! Tools (`mkfs.ext4`, `mount`, `umount`, `blkid`) run as the broker's own user (root),
//! never through a shell, with an empty environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, ResourceType, TagSpecification, VolumeType};
use tracing::{info, warn};

use super::host;
use crate::backup::SnapshotRef;
use crate::ids::InstanceId;
pub use crate::snapshot::ebs::PROVIDER;
use crate::snapshot::ebs::{
    EbsConfig, EbsSnapshots, Preparing, TAG_INSTANCE, check_id, describe_volume, ec2_error,
    malformed, tag,
};
use crate::{Error, Result};

/// The name of a Nitro host's link to an attached EBS volume, before the volume id's hex.
const NITRO_LINK_PREFIX: &str = "nvme-Amazon_Elastic_Block_Store_vol";
/// How long an attached volume's block device may take to show up.
const DEVICE_WITHIN: Duration = Duration::from_secs(60);
/// The device names AttachVolume is given; EC2 wants one that is free on the instance.
/// They bound a host to 21 volumes at once.
const DEVICE_NAMES: std::ops::RangeInclusive<char> = 'f'..='z';
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The EC2 host the local infrastructure runs on, and the volumes it makes.
#[derive(Debug, Clone)]
pub struct EbsHostConfig {
    /// How to reach EC2 (region, endpoint, credentials, polling).
    pub ec2: EbsConfig,
    /// The EC2 instance this broker runs on (`i-...`): volumes are attached to it.
    pub instance_id: String,
    /// Its availability zone: volumes are made there.
    pub availability_zone: String,
    /// Where attached volumes show up; `/dev/disk/by-id` on a Nitro host.
    pub device_dir: PathBuf,
    /// The size of a new instance's volume.
    pub volume_size_gib: i32,
    /// The type of a new instance's volume (`gp3`).
    pub volume_type: String,
}

/// The EBS volumes of this host. See the module documentation.
#[derive(Debug)]
pub struct EbsVolumes {
    snapshots: EbsSnapshots,
    instance_id: String,
    zone: String,
    device_dir: PathBuf,
    size_gib: i32,
    volume_type: VolumeType,
    /// One attachment at a time, so that two never pick the same device name.
    attaching: tokio::sync::Mutex<()>,
}

impl EbsVolumes {
    /// Checks the configuration; contacts nothing.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a malformed instance id, zone, size or volume type, or EC2
    /// configuration [`EbsSnapshots::new`] refuses.
    pub fn new(config: EbsHostConfig) -> Result<Self> {
        check_id("instance", "i-", &config.instance_id)?;
        if !(1..=16_384).contains(&config.volume_size_gib) {
            return Err(Error::Invalid(format!(
                "an EBS volume holds 1 to 16384 GiB, not {}",
                config.volume_size_gib
            )));
        }
        if !VolumeType::values().contains(&config.volume_type.as_str()) {
            return Err(Error::Invalid(format!(
                "{:?} is not an EBS volume type (gp3, gp2, io2, ...)",
                config.volume_type
            )));
        }
        let zone_valid = !config.availability_zone.is_empty()
            && config
                .availability_zone
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !zone_valid {
            return Err(Error::Invalid(format!(
                "{:?} is not an availability zone",
                config.availability_zone
            )));
        }
        Ok(Self {
            snapshots: EbsSnapshots::new(config.ec2)?,
            instance_id: config.instance_id,
            zone: config.availability_zone,
            device_dir: config.device_dir,
            size_gib: config.volume_size_gib,
            volume_type: VolumeType::from(config.volume_type.as_str()),
            attaching: tokio::sync::Mutex::new(()),
        })
    }

    /// The snapshots of these volumes.
    pub fn snapshots(&self) -> &EbsSnapshots {
        &self.snapshots
    }

    /// A new, empty volume for `instance`, tagged with it, once EC2 says `available`.
    ///
    /// # Errors
    /// [`Error::Cloud`] or [`Error::Timeout`] from EC2 (a volume made but not available
    /// stays, tagged, for [`of_instance`](Self::of_instance) to find).
    pub async fn create(&self, instance: &InstanceId) -> Result<String> {
        let created = self
            .client()
            .create_volume()
            .availability_zone(&self.zone)
            .size(self.size_gib)
            .volume_type(self.volume_type.clone())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .tags(tag(TAG_INSTANCE, instance.as_str()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| ec2_error(e, "CreateVolume", instance.as_str(), ""))?;
        let volume_id = created
            .volume_id()
            .ok_or_else(|| malformed("CreateVolume", "EC2 gave no volume id".to_owned()))?
            .to_owned();
        self.snapshots
            .wait(
                &Preparing::Volume(volume_id.clone()),
                &format!("left in place, tagged {TAG_INSTANCE}={instance}"),
            )
            .await?;
        info!(instance_id = %instance, volume_id, zone = %self.zone, "EBS volume created.");
        Ok(volume_id)
    }

    /// A new volume for `instance` made from `snapshot` in this host's zone (any zone of
    /// the snapshot's region will do), tagged with the instance.
    ///
    /// # Errors
    /// As [`EbsSnapshots::restore`].
    pub async fn restore(&self, snapshot: &SnapshotRef, instance: &InstanceId) -> Result<String> {
        self.snapshots
            .restore_tagged(snapshot, &self.zone, &[(TAG_INSTANCE, instance.as_str())])
            .await
    }

    /// Attaches `volume_id` to this host and returns its block device, once the kernel
    /// shows it.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a volume attached to another instance; [`Error::Cloud`]
    /// when EC2 refuses, [`Error::Timeout`] when the attachment or the device does not
    /// come.
    pub async fn attach(&self, volume_id: &str) -> Result<PathBuf> {
        check_id("volume", "vol-", volume_id)?;
        let volume = describe_volume(self.client(), volume_id).await?;
        let attached_to: Vec<&str> = volume
            .attachments()
            .iter()
            .filter_map(|a| a.instance_id())
            .collect();
        // EC2 refuses it too; never rely on that for a volume with data on it.
        if let Some(other) = attached_to.iter().find(|i| **i != self.instance_id) {
            return Err(Error::Invalid(format!(
                "EBS volume {volume_id} is attached to EC2 instance {other}, not to this host ({})",
                self.instance_id
            )));
        }
        if attached_to.is_empty() {
            let _one_at_a_time = self.attaching.lock().await;
            let mut tries = 0;
            loop {
                let device = self.free_device_name().await?;
                let attached = self
                    .client()
                    .attach_volume()
                    .volume_id(volume_id)
                    .instance_id(&self.instance_id)
                    .device(&device)
                    .send()
                    .await;
                match attached
                    .map_err(|e| ec2_error(e, "AttachVolume", volume_id, "InvalidVolume.NotFound"))
                {
                    Ok(_) => break,
                    // Another process attached a volume under that name meanwhile.
                    Err(Error::Cloud { message, .. })
                        if message.contains("already in use") && tries < 3 =>
                    {
                        tries += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.snapshots
            .wait(
                &Preparing::Attachment(volume_id.to_owned()),
                "left attached to this host",
            )
            .await?;
        let link = self.device_link(volume_id);
        let deadline = tokio::time::Instant::now() + DEVICE_WITHIN;
        loop {
            match std::fs::canonicalize(&link) {
                Ok(device) => {
                    info!(volume_id, device = %device.display(), "EBS volume attached.");
                    return Ok(device);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("resolving {}", link.display()), e)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "the block device of EBS volume {volume_id} ({})",
                        link.display()
                    ),
                    after: DEVICE_WITHIN,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Detaches `volume_id` from this host (it must not be mounted) and waits until it is
    /// `available`. Ok when it is not attached, or gone.
    ///
    /// # Errors
    /// [`Error::Cloud`] or [`Error::Timeout`] from EC2.
    pub async fn detach(&self, volume_id: &str) -> Result<()> {
        check_id("volume", "vol-", volume_id)?;
        if let Ok(device) = std::fs::canonicalize(self.device_link(volume_id))
            && let Some(mount_point) = mount_point_of(&device)?
        {
            return Err(Error::Invalid(format!(
                "EBS volume {volume_id} is mounted at {}: it is not detached",
                mount_point.display()
            )));
        }
        let volume = match describe_volume(self.client(), volume_id).await {
            Ok(volume) => volume,
            Err(Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let attached_here = volume
            .attachments()
            .iter()
            .any(|a| a.instance_id() == Some(self.instance_id.as_str()));
        if !attached_here {
            return Ok(());
        }
        let detached = self
            .client()
            .detach_volume()
            .volume_id(volume_id)
            .instance_id(&self.instance_id)
            .send()
            .await;
        match detached
            .map_err(|e| ec2_error(e, "DetachVolume", volume_id, "InvalidVolume.NotFound"))
        {
            Ok(_) => {}
            Err(Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        self.snapshots
            .wait(
                &Preparing::Volume(volume_id.to_owned()),
                "left detaching from this host",
            )
            .await?;
        info!(volume_id, "EBS volume detached.");
        Ok(())
    }

    /// Deletes `volume_id` (it must be detached). Ok when it is gone already.
    ///
    /// # Errors
    /// [`Error::Cloud`] from EC2.
    pub async fn delete(&self, volume_id: &str) -> Result<()> {
        check_id("volume", "vol-", volume_id)?;
        match self
            .client()
            .delete_volume()
            .volume_id(volume_id)
            .send()
            .await
        {
            Ok(_) => {
                info!(volume_id, "EBS volume deleted.");
                Ok(())
            }
            Err(e) => match ec2_error(e, "DeleteVolume", volume_id, "InvalidVolume.NotFound") {
                Error::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Detaches and deletes every volume tagged with `instance`, except `keep`: what an
    /// interrupted provision, clone or restore left, or a deprovisioned instance's last
    /// volume. Each must be unmounted already.
    ///
    /// # Errors
    /// The first refused call; the others are still tried.
    pub async fn delete_all_of(&self, instance: &InstanceId, keep: Option<&str>) -> Result<()> {
        let mut first_error = None;
        for volume_id in self.of_instance(instance).await? {
            if Some(volume_id.as_str()) == keep {
                continue;
            }
            warn!(instance_id = %instance, volume_id, "Deleting an EBS volume of the instance.");
            let deleted = async {
                self.detach(&volume_id).await?;
                self.delete(&volume_id).await
            };
            if let Err(e) = deleted.await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The volumes tagged with `instance`, in any state but deleted.
    ///
    /// # Errors
    /// [`Error::Cloud`] from EC2.
    pub async fn of_instance(&self, instance: &InstanceId) -> Result<Vec<String>> {
        let mut pages = self
            .client()
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_INSTANCE}"))
                    .values(instance.as_str())
                    .build(),
            )
            .into_paginator()
            .send();
        let mut ids = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| ec2_error(e, "DescribeVolumes", instance.as_str(), ""))?;
            ids.extend(
                page.volumes()
                    .iter()
                    .filter_map(|v| v.volume_id().map(str::to_owned)),
            );
        }
        ids.sort();
        Ok(ids)
    }

    /// The EBS volume mounted at `path`, if a volume of this host is.
    ///
    /// # Errors
    /// When the mount table or the device links cannot be read.
    pub fn mounted_volume(&self, path: &Path) -> Result<Option<String>> {
        let Some(source) = mount_source(path)? else {
            return Ok(None);
        };
        let Ok(device) = std::fs::canonicalize(&source) else {
            return Ok(None);
        };
        let entries = match std::fs::read_dir(&self.device_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    format!("listing {}", self.device_dir.display()),
                    e,
                ));
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(hex) = name
                .to_str()
                .and_then(|n| n.strip_prefix(NITRO_LINK_PREFIX))
            else {
                continue;
            };
            if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue; // a partition's link
            }
            if std::fs::canonicalize(entry.path()).is_ok_and(|d| d == device) {
                return Ok(Some(format!("vol-{hex}")));
            }
        }
        Ok(None)
    }

    /// Makes an ext4 file system on a new volume's `device`. Refuses a device that holds
    /// one already: a volume with data is never formatted.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a device with a file system; the tool's errors otherwise.
    pub async fn format(&self, device: &Path) -> Result<()> {
        let probed = host::capture("blkid", tool_command("blkid", [device.as_os_str()])?).await?;
        // blkid exits 2 when it finds nothing on the device.
        if probed.status.code() != Some(2) {
            return Err(Error::Invalid(format!(
                "{} holds data already ({}): a new volume is never formatted over it",
                device.display(),
                probed.stdout.trim()
            )));
        }
        let mut cmd = tool_command(
            "mkfs.ext4",
            ["-q".as_ref(), "-L".as_ref(), "phoenix".as_ref()],
        )?;
        cmd.arg(device);
        host::run("mkfs.ext4", cmd).await.map(drop)
    }

    /// Mounts `device` at `path` (a directory).
    ///
    /// # Errors
    /// When `mount` fails.
    pub async fn mount(&self, device: &Path, path: &Path) -> Result<()> {
        let cmd = tool_command(
            "mount",
            [
                "-o".as_ref(),
                "noatime".as_ref(),
                device.as_os_str(),
                path.as_os_str(),
            ],
        )?;
        host::run("mount", cmd).await.map(drop)
    }

    /// Moves the mount at `from` to `to` (a directory), atomically.
    ///
    /// # Errors
    /// When `mount --move` fails.
    pub async fn move_mount(&self, from: &Path, to: &Path) -> Result<()> {
        let cmd = tool_command(
            "mount",
            ["--move".as_ref(), from.as_os_str(), to.as_os_str()],
        )?;
        host::run("mount --move", cmd).await.map(drop)
    }

    /// Writes what the file system mounted at `path` holds in memory to its volume
    /// (`syncfs`): a block-level snapshot sees only what reached the device.
    ///
    /// # Errors
    /// When `sync` fails.
    pub async fn flush(&self, path: &Path) -> Result<()> {
        host::run(
            "sync -f",
            tool_command("sync", ["-f".as_ref(), path.as_os_str()])?,
        )
        .await
        .map(drop)
    }

    /// Unmounts `path`. Nothing may work inside it any more.
    ///
    /// # Errors
    /// When `umount` fails.
    pub async fn unmount(&self, path: &Path) -> Result<()> {
        host::run("umount", tool_command("umount", [path.as_os_str()])?)
            .await
            .map(drop)
    }

    fn client(&self) -> &aws_sdk_ec2::Client {
        self.snapshots.client()
    }

    fn device_link(&self, volume_id: &str) -> PathBuf {
        self.device_dir.join(format!(
            "{NITRO_LINK_PREFIX}{}",
            volume_id.trim_start_matches("vol-")
        ))
    }

    /// A device name no volume attached to this host uses.
    async fn free_device_name(&self) -> Result<String> {
        let output = self
            .client()
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name("attachment.instance-id")
                    .values(&self.instance_id)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| ec2_error(e, "DescribeVolumes", &self.instance_id, ""))?;
        let used: Vec<&str> = output
            .volumes()
            .iter()
            .flat_map(|v| v.attachments())
            .filter_map(|a| a.device())
            .collect();
        DEVICE_NAMES
            .map(|letter| format!("/dev/sd{letter}"))
            .find(|name| !used.contains(&name.as_str()))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "EC2 instance {} has no free device name for another volume",
                    self.instance_id
                ))
            })
    }
}

/// Makes `root` a mount point of its own with private propagation (a bind mount of
/// itself, unless it is a mount point already), so that mounts under it can be moved.
///
/// # Errors
/// When `mount` fails (the broker must run as root to manage EBS volumes).
pub fn make_private_mount(root: &Path) -> Result<()> {
    let run = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let output = std::process::Command::new(tool("mount")?)
            .args(args)
            .env_clear()
            .output()
            .map_err(|e| Error::io("running mount", e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "mount {args:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    };
    if !is_mount_point(root)? {
        run(&["--bind".as_ref(), root.as_os_str(), root.as_os_str()])?;
    }
    run(&["--make-private".as_ref(), root.as_os_str()])
}

/// Where `device` is mounted, if anywhere.
fn mount_point_of(device: &Path) -> Result<Option<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .find(|(_, source)| std::fs::canonicalize(source).is_ok_and(|d| d == device))
        .map(|(mount_point, _)| mount_point))
}

/// Whether `path` is a mount point.
///
/// # Errors
/// When the mount table cannot be read.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(mount_source(path)?.is_some())
}

/// The source (device) of the mount at exactly `path`.
fn mount_source(path: &Path) -> Result<Option<PathBuf>> {
    // The last mount at a path hides the earlier ones.
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|(mount_point, _)| mount_point == path)
        .map(|(_, source)| source))
}

/// `(mount point, source)` of every mount, in mount order, from `/proc/self/mountinfo`.
fn mounts() -> Result<Vec<(PathBuf, PathBuf)>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            let mount_point = unescape(fields.get(4)?);
            let source = unescape(fields.get(separator + 2)?);
            Some((PathBuf::from(mount_point), PathBuf::from(source)))
        })
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |n, d| n.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A command for the system tool `name` with `args`, from the standard directories.
fn tool_command<'a>(
    name: &str,
    args: impl IntoIterator<Item = &'a std::ffi::OsStr>,
) -> Result<tokio::process::Command> {
    let mut cmd = host::command(&tool(name)?, None, Path::new("/"));
    cmd.args(args);
    Ok(cmd)
}

/// The system tool `name`, from the standard directories.
fn tool(name: &str) -> Result<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| Error::Invalid(format!("{name} is not installed (util-linux, e2fsprogs)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/x\\y"), r"/x\\y");
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_missing_path_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap_or(false));
        assert!(!is_mount_point(Path::new("/no/such/mount")).unwrap_or(true));
    }
}
