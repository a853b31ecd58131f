//! btrfs as the local infrastructure uses it: whether a directory is on btrfs or is a
//! subvolume, and the `btrfs` tool's subvolume, snapshot, send and receive commands.
//!
//! A subvolume snapshot is atomic and O(1): it shares every extent with its source until
//! one of them is written. This module never decides what to snapshot or where: callers
//! pass paths they built from validated IDs under the infrastructure's root. The tool
//! runs as the broker's own user (creating and deleting subvolumes needs root), never
//! through a shell, with an empty environment, in the root's directory (never inside a
//! volume, whose processes a wipe kills).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{BTRFS_SUPER_MAGIC, statfs};

use super::host;
use crate::backup::ProcessCommand;
use crate::{Error, Result};

/// Where Debian (and most distributions) install `btrfs` from btrfs-progs.
const TOOL_PATHS: &[&str] = &[
    "/usr/bin/btrfs",
    "/bin/btrfs",
    "/usr/sbin/btrfs",
    "/sbin/btrfs",
];

/// The inode number of every subvolume's top directory (`BTRFS_FIRST_FREE_OBJECTID`).
const SUBVOLUME_INODE: u64 = 256;

/// Whether `path` lies on a btrfs file system.
///
/// # Errors
/// When `path` cannot be inspected.
pub fn is_on_btrfs(path: &Path) -> Result<bool> {
    let fs = statfs(path).map_err(|e| Error::io(format!("statfs {}", path.display()), e.into()))?;
    Ok(fs.filesystem_type() == BTRFS_SUPER_MAGIC)
}

/// Whether `path` is the top directory of a btrfs subvolume (a snapshot is one). A
/// symlink is not; a missing path is Ok(false).
///
/// # Errors
/// When `path` cannot be inspected.
pub fn is_subvolume(path: &Path) -> Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("inspecting {}", path.display()), e)),
    };
    Ok(meta.is_dir() && meta.ino() == SUBVOLUME_INODE && is_on_btrfs(path)?)
}

/// The `btrfs` tool, for a root on btrfs.
#[derive(Debug, Clone)]
pub struct Btrfs {
    program: PathBuf,
    /// The working directory of the tool.
    cwd: PathBuf,
}

impl Btrfs {
    /// The tool for `root`, or why there is none: `root` is not on btrfs, or btrfs-progs
    /// is not installed.
    pub fn detect(root: &Path) -> std::result::Result<Self, String> {
        match is_on_btrfs(root) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "the data directory {} is not on btrfs",
                    root.display()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
        TOOL_PATHS
            .iter()
            .map(Path::new)
            .find(|path| path.is_file())
            .map(|program| Self {
                program: program.to_owned(),
                cwd: root.to_owned(),
            })
            .ok_or_else(|| {
                format!(
                    "the data directory {} is on btrfs, but the btrfs tool (btrfs-progs) is not installed",
                    root.display()
                )
            })
    }

    async fn run(&self, what: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let mut cmd = host::command(&self.program, None, &self.cwd);
        cmd.args(args);
        host::run(what, cmd).await.map(drop)
    }

    /// Creates an empty subvolume at `path` (its parent must exist, `path` must not).
    ///
    /// # Errors
    /// When the tool fails.
    pub async fn create_subvolume(&self, path: &Path) -> Result<()> {
        self.run(
            "btrfs subvolume create",
            &["subvolume".as_ref(), "create".as_ref(), path.as_os_str()],
        )
        .await
    }

    /// Snapshots the subvolume `from` at `to` (which must not exist), read-only or not.
    /// Atomic; durable when it returns (the tool commits a transaction for it).
    ///
    /// # Errors
    /// When the tool fails (`from` is not a subvolume, `to` exists).
    pub async fn snapshot(&self, from: &Path, to: &Path, read_only: bool) -> Result<()> {
        let mut args: Vec<&std::ffi::OsStr> = vec!["subvolume".as_ref(), "snapshot".as_ref()];
        if read_only {
            args.push("-r".as_ref());
        }
        args.extend([from.as_os_str(), to.as_os_str()]);
        self.run("btrfs subvolume snapshot", &args).await
    }

    /// Deletes the subvolume at `path`, read-only or not; Ok when nothing is there. The
    /// file system frees its extents in the background.
    ///
    /// # Errors
    /// When `path` is something other than a subvolume, or the tool fails.
    pub async fn delete(&self, path: &Path) -> Result<()> {
        if std::fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        if !is_subvolume(path)? {
            return Err(Error::Invalid(format!(
                "{} is not a btrfs subvolume",
                path.display()
            )));
        }
        self.run(
            "btrfs subvolume delete",
            &["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()],
        )
        .await
    }

    /// `btrfs send` of the read-only snapshot `snapshot` to stdout.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a path that is not UTF-8.
    pub fn send_command(&self, snapshot: &Path) -> Result<ProcessCommand> {
        Ok(self.process_command(["send", "--quiet", utf8(snapshot)?]))
    }

    /// `btrfs receive` of a send stream on stdin into the directory `dir`, confined to
    /// it (`--chroot`): whatever the stream says, nothing is written outside `dir`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a path that is not UTF-8.
    pub fn receive_command(&self, dir: &Path) -> Result<ProcessCommand> {
        Ok(self.process_command(["receive", "--quiet", "--chroot", utf8(dir)?]))
    }

    fn process_command<'a>(&self, args: impl IntoIterator<Item = &'a str>) -> ProcessCommand {
        let mut command = ProcessCommand::new(&self.program, args);
        command.current_dir = Some(self.cwd.clone());
        command
    }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| Error::Invalid(format!("{} is not valid UTF-8", path.display())))
}
