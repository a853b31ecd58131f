//! The local host: child processes run as the server user, files written for it, and the
//! processes that live in a volume.
//!
//! Every child is awaited for its exit status, and a failure carries the (bounded, trimmed)
//! tail of its stderr. Nothing here may ever put a secret on a command line or in the
//! environment of a child: arguments are readable by every local user in `/proc`.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::{Pid, UnlinkatFlags, User, unlinkat};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _};
use tokio::process::Command;
use tracing::warn;

use crate::{Error, Result};

/// How much of a child's stdout and stderr is kept (the tail).
const MAX_CAPTURE: usize = 8 * 1024;

/// Search path of children; their environment is otherwise empty, so nothing of the
/// broker's (a `PGPASSWORD`, a cloud credential) leaks into a data service's process.
const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The unprivileged system user that data-service processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name, e.g. `postgres`.
    pub name: String,
    /// Its user ID.
    pub uid: u32,
    /// Its primary group ID (the only group its processes keep).
    pub gid: u32,
}

impl RunAs {
    /// Looks a system user up by name.
    ///
    /// # Errors
    /// [`Error::Invalid`] when there is no such user.
    pub fn lookup(name: &str) -> Result<Self> {
        let user = User::from_name(name)
            .map_err(|e| Error::Invalid(format!("looking up the user {name:?}: {e}")))?
            .ok_or_else(|| Error::Invalid(format!("the system user {name:?} does not exist")))?;
        Ok(Self {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }
}

/// A command for `program`, run as `run_as` (or as the current user), in `cwd`, with an
/// empty environment except `PATH` and `LANG`; stdin is `/dev/null`.
///
/// `cwd` must be a directory the user can enter: servers that refuse to run as root must
/// not be left in root's home directory.
pub fn command(program: &Path, run_as: Option<&RunAs>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", CHILD_PATH)
        .env("LANG", "C.UTF-8")
        .current_dir(cwd)
        .stdin(Stdio::null());
    if let Some(user) = run_as {
        // std clears the supplementary groups when it changes the uid of a root process.
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// What a finished child wrote, bounded to its tail.
#[derive(Debug)]
pub struct Captured {
    /// The exit status.
    pub status: ExitStatus,
    /// The tail of stdout, lossily decoded.
    pub stdout: String,
    /// The tail of stderr, lossily decoded.
    pub stderr: String,
}

/// Runs `cmd` to its end, keeping the tail of its output, and returns what it wrote
/// whatever its exit status. Dropping the future kills the child.
///
/// # Errors
/// [`Error::Io`] when the child cannot be started or its output cannot be read.
pub async fn capture(program: &str, mut cmd: Command) -> Result<Captured> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("starting {program}"), e))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (stdout, stderr) = tokio::join!(read_tail(stdout), read_tail(stderr));
    let status = child
        .wait()
        .await
        .map_err(|e| Error::io(format!("waiting for {program}"), e))?;
    Ok(Captured {
        status,
        stdout: stdout.map_err(|e| Error::io(format!("reading the output of {program}"), e))?,
        stderr: stderr.map_err(|e| Error::io(format!("reading the errors of {program}"), e))?,
    })
}

/// Runs `cmd` and requires a successful exit.
///
/// # Errors
/// [`Error::ProcessFailed`] with the tail of stderr when the child fails or is killed;
/// [`Error::Io`] when it cannot be started.
pub async fn run(program: &str, cmd: Command) -> Result<Captured> {
    let captured = capture(program, cmd).await?;
    if captured.status.success() {
        Ok(captured)
    } else {
        Err(failed(program, &captured, ""))
    }
}

/// The error of a failed child, with `extra` (for example a log tail) after its stderr.
pub fn failed(program: &str, captured: &Captured, extra: &str) -> Error {
    let mut stderr = captured.stderr.trim().to_owned();
    if stderr.is_empty() {
        stderr = captured.stdout.trim().to_owned();
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        stderr.push('\n');
        stderr.push_str(extra);
    }
    Error::ProcessFailed {
        program: program.to_owned(),
        status: captured.status.to_string(),
        stderr,
    }
}

async fn read_tail<R: AsyncRead + Unpin>(reader: Option<R>) -> std::io::Result<String> {
    let Some(mut reader) = reader else {
        return Ok(String::new());
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * MAX_CAPTURE {
            kept.drain(..kept.len() - MAX_CAPTURE);
        }
    }
    if kept.len() > MAX_CAPTURE {
        kept.drain(..kept.len() - MAX_CAPTURE);
    }
    Ok(String::from_utf8_lossy(&kept).into_owned())
}

/// `O_NOFOLLOW` for `open`: the broker runs as root and works in directories the server
/// user owns, where any entry may have been replaced by a symlink to a file of root's.
fn no_follow() -> i32 {
    OFlag::O_NOFOLLOW.bits()
}

/// Reads the file `path`, refusing a symlink in its place. `Ok(None)` when it is missing.
///
/// # Errors
/// When it cannot be read (a symlink in its place is refused with `ELOOP`).
pub async fn read_file(path: &Path) -> Result<Option<Vec<u8>>> {
    let io = |e: std::io::Error| Error::io(format!("reading {}", path.display()), e);
    let mut file = match tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)
        .await
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await.map_err(io)?;
    Ok(Some(bytes))
}

/// The last `max` bytes of a text file (for example a server log), empty when unreadable
/// or a symlink. Only the tail is read, however large the file is.
pub async fn file_tail(path: &Path, max: usize) -> String {
    let tail = async {
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(no_follow())
            .open(path)
            .await?;
        let len = file.metadata().await?.len();
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        file.seek(std::io::SeekFrom::Start(len.saturating_sub(max)))
            .await?;
        let mut bytes = Vec::new();
        file.take(max).read_to_end(&mut bytes).await?;
        std::io::Result::Ok(bytes)
    };
    match tail.await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// Opens the directory `path` itself, never a symlink in its place.
fn open_dir(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW).bits())
        .open(path)
        .map_err(|e| Error::io(format!("opening the directory {}", path.display()), e))
}

/// Hands the open file `file` (named `path` in errors) to `run_as` (no-op without one).
/// Through the descriptor, so a symlink swapped in at `path` cannot redirect it.
///
/// # Errors
/// When `fchown` fails.
fn give_to(file: &std::fs::File, path: &Path, run_as: Option<&RunAs>) -> Result<()> {
    if let Some(user) = run_as {
        std::os::unix::fs::fchown(file, Some(user.uid), Some(user.gid))
            .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

/// Creates the directory `path` (its parent must exist) with mode 0700, owned by `run_as`.
/// An existing directory gets that mode and owner; a symlink in its place is refused.
///
/// # Errors
/// When the directory cannot be created, changed or handed over.
pub fn create_private_dir(path: &Path, run_as: Option<&RunAs>) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
    }
    let dir = open_dir(path)?;
    dir.set_permissions(std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    give_to(&dir, path, run_as)
}

/// Replaces `path` atomically with `contents` (mode 0600, owned by `run_as`), durably:
/// the data and the rename are synced before it returns.
///
/// The parent directory may belong to the server user, who could plant symlinks there:
/// the parent is opened without following a symlink, the temporary file is created anew
/// (never opened through a symlink) and handed over by its descriptor, and the rename
/// replaces whatever entry `path` is without following it.
///
/// # Errors
/// When a step fails; `path` then still holds its previous contents.
pub fn write_file_atomically(path: &Path, contents: &[u8], run_as: Option<&RunAs>) -> Result<()> {
    let parent = path
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent directory", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} has no file name", path.display())))?;
    let tmp_name = format!(".{}.tmp", name.to_string_lossy());
    let tmp = parent.join(&tmp_name);
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", tmp.display()), e);
    let dir = open_dir(parent)?;
    // What an interrupted write left (or anything planted there) goes; unlink never
    // follows a symlink.
    match unlinkat(&dir, tmp_name.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(io("removing", e.into())),
    }
    let fd = openat(
        &dir,
        tmp_name.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| io("creating", e.into()))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(contents).map_err(|e| io("writing", e))?;
    give_to(&file, &tmp, run_as)?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    drop(file);
    renameat(&dir, tmp_name.as_str(), &dir, name).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e.into(),
        )
    })?;
    dir.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", parent.display()), e))
}

/// Makes the entries of `dir` (a creation, a rename) durable.
///
/// # Errors
/// When the directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
}

/// Whether the process `pid` exists and is not a zombie (a zombie holds no resources).
pub fn is_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match kill(Pid::from_raw(raw), None) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(_) => return false,
    }
    // /proc/<pid>/stat: "pid (comm) S ...": the state follows the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

/// The command line of `pid` (empty when it is gone).
pub fn command_line(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
///
/// # Errors
/// [`Error::Io`] when the signal cannot be sent for another reason.
pub fn signal(pid: u32, signal: Signal) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| Error::Invalid(format!("bad pid {pid}")))?;
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(Error::io(format!("sending {signal} to {pid}"), e.into())),
    }
}

/// Waits until none of `pids` is alive.
///
/// # Errors
/// [`Error::Timeout`] when one still lives after `limit`.
pub async fn wait_gone(pids: &[u32], what: &str, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while pids.iter().any(|&pid| is_alive(pid)) {
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The processes whose working directory is `dir` or lies below it. Every child Phoenix
/// starts for a volume works inside it, and so do the servers, so this finds what a
/// killed broker left running there (an `initdb` half-way, a server nobody knows of).
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd.starts_with(dir))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills (SIGKILL) every process working inside `dir` and waits for them to go.
///
/// # Errors
/// When a process cannot be signalled or does not go away.
pub async fn kill_processes_in(dir: &Path) -> Result<()> {
    // Scanning /proc reads a file per process: not on the runtime's threads.
    let owned = dir.to_owned();
    let pids = tokio::task::spawn_blocking(move || processes_in(&owned))
        .await
        .map_err(|e| Error::io("scanning /proc", std::io::Error::other(e)))?;
    if pids.is_empty() {
        return Ok(());
    }
    for &pid in &pids {
        warn!(pid, command = ?command_line(pid), dir = %dir.display(), "Killing a leftover process of a volume.");
        signal(pid, Signal::SIGKILL)?;
    }
    wait_gone(
        &pids,
        &format!("leftover processes in {}", dir.display()),
        Duration::from_secs(30),
    )
    .await
}

/// Removes the directory tree `dir`; Ok when it does not exist.
///
/// # Errors
/// When the tree cannot be removed.
pub async fn remove_tree(dir: &Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
    }
}

/// Checks that `run_as` can reach `dir`: every directory on the way must be searchable
/// by it (servers refuse root, so a volume under `/root` would fail in a confusing way).
///
/// # Errors
/// [`Error::Invalid`] naming the first directory it cannot enter.
pub fn check_reachable(dir: &Path, run_as: &RunAs) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let mut path = PathBuf::new();
    for component in dir.components() {
        path.push(component);
        let meta = std::fs::metadata(&path)
            .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
        let mode = meta.mode();
        let searchable = if meta.uid() == run_as.uid {
            mode & 0o100 != 0
        } else if meta.gid() == run_as.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(Error::Invalid(format!(
                "the user {} cannot enter {} (mode {:o}); choose a data directory it can reach",
                run_as.name,
                path.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_child_reports_its_status_and_the_tail_of_stderr() {
        let dir = std::env::temp_dir();
        let mut cmd = command(Path::new("/bin/sh"), None, &dir);
        cmd.arg("-c")
            .arg("head -c 100000 /dev/zero | tr '\\0' x >&2; echo last words >&2; exit 3");
        let err = run("sh", cmd).await.unwrap_err();
        let Error::ProcessFailed { status, stderr, .. } = err else {
            panic!("unexpected error {err}");
        };
        assert!(status.contains('3'), "{status}");
        assert!(stderr.ends_with("last words"), "{stderr}");
        assert!(stderr.len() <= MAX_CAPTURE);
    }

    #[tokio::test]
    async fn children_see_none_of_the_brokers_environment() {
        let dir = std::env::temp_dir();
        let mut cmd = command(Path::new("/usr/bin/env"), None, &dir);
        cmd.env_remove("LANG");
        let out = run("env", cmd).await.unwrap();
        assert_eq!(out.stdout.trim(), format!("PATH={CHILD_PATH}"));
    }

    /// A directory standing for one the server user owns, and a file of root's outside it.
    fn planted() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let owned = dir.path().join("volume");
        std::fs::create_dir(&owned).unwrap();
        let outside = dir.path().join("shadow");
        std::fs::write(&outside, "root's secret\n").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o640)).unwrap();
        (dir, owned, outside)
    }

    fn unchanged(outside: &Path) {
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::read_to_string(outside).unwrap(), "root's secret\n");
        let meta = std::fs::metadata(outside).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(meta.uid(), nix::unistd::Uid::effective().as_raw());
    }

    #[test]
    fn an_atomic_write_never_writes_through_a_symlink_planted_at_its_temporary_file() {
        let (_dir, owned, outside) = planted();
        let target = owned.join("phoenix.conf");
        std::os::unix::fs::symlink(&outside, owned.join(".phoenix.conf.tmp")).unwrap();
        let nobody = RunAs::lookup("nobody").unwrap();
        let run_as = nix::unistd::Uid::effective().is_root().then_some(&nobody);
        write_file_atomically(&target, b"port = 1\n", run_as).unwrap();
        unchanged(&outside);
        assert_eq!(std::fs::read(&target).unwrap(), b"port = 1\n");
        assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
    }

    #[test]
    fn an_atomic_write_replaces_a_symlink_at_its_target_instead_of_following_it() {
        let (_dir, owned, outside) = planted();
        let target = owned.join("phoenix-volume.json");
        std::os::unix::fs::symlink(&outside, &target).unwrap();
        write_file_atomically(&target, b"{}", None).unwrap();
        unchanged(&outside);
        assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
    }

    #[test]
    fn an_atomic_write_refuses_a_parent_directory_replaced_by_a_symlink() {
        let (dir, owned, _outside) = planted();
        let elsewhere = dir.path().join("etc");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, owned.join("data")).unwrap();
        assert!(write_file_atomically(&owned.join("data/pg_hba.conf"), b"x", None).is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn a_private_directory_is_never_changed_through_a_symlink() {
        let (dir, owned, _outside) = planted();
        let elsewhere = dir.path().join("etc");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, owned.join("run")).unwrap();
        assert!(create_private_dir(&owned.join("run"), None).is_err());
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(
            std::fs::metadata(&elsewhere).unwrap().mode() & 0o7777,
            0o755
        );
        create_private_dir(&owned.join("sockets"), None).unwrap();
        let meta = std::fs::metadata(owned.join("sockets")).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o700);
    }

    #[tokio::test]
    async fn reading_a_log_or_record_never_follows_a_symlink() {
        let (_dir, owned, outside) = planted();
        let log = owned.join("postgresql.log");
        std::os::unix::fs::symlink(&outside, &log).unwrap();
        assert_eq!(file_tail(&log, 2048).await, "");
        assert!(read_file(&log).await.is_err());
        assert_eq!(read_file(&owned.join("missing")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_file_tail_is_the_last_bytes_of_the_file() {
        let (_dir, owned, _outside) = planted();
        let log = owned.join("postgresql.log");
        let mut text = "x".repeat(100_000);
        text.push_str("last line\n");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(file_tail(&log, 10).await, "last line\n");
        assert_eq!(file_tail(&log, 1_000_000).await, text);
    }

    #[test]
    fn our_own_process_is_alive_and_a_reaped_one_is_not() {
        assert!(is_alive(std::process::id()));
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!is_alive(pid));
    }
}
