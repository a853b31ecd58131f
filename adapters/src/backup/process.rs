//! Child processes at either end of a pipeline: a dump tool whose stdout is the backup
//! stream, or a restore tool whose stdin takes the restored stream.
//!
//! A child is always awaited for its exit status after its stream ends; a non-zero exit
//! or a signal is a failure whatever was read or written before. A child is killed when
//! the value that owns it is dropped (cancellation). Secrets reach a child only through
//! its environment or its stdin, never its arguments; the child does not inherit the
//! broker's environment (which holds the master key), only a short list of harmless
//! variables.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::Command;
use tokio::task::JoinHandle;

use crate::{Error, Result};

/// How many bytes of a child's stderr are kept for the error message.
const STDERR_TAIL: usize = 4096;

/// How long to wait for a child's stderr to close after it exited (a grandchild may hold
/// it open).
const STDERR_GRACE: Duration = Duration::from_secs(10);

/// Variables a child inherits from the broker; everything else is cleared.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"];

/// A command to run: program, arguments, environment and optional stdin.
///
/// `Debug` shows the program and arguments, and only the names of environment variables.
#[derive(Clone, Default)]
pub struct ProcessCommand {
    /// The program, ideally an absolute path.
    pub program: PathBuf,
    /// Arguments. Never a secret: arguments are visible to every user of the host.
    pub args: Vec<String>,
    /// Extra environment variables (for example `PGPASSWORD`).
    pub env: Vec<(String, String)>,
    /// Bytes written to the child's stdin, which is then closed (sources only; a sink's
    /// stdin carries the data).
    pub stdin: Option<Vec<u8>>,
    /// Working directory of the child.
    pub current_dir: Option<PathBuf>,
    /// Run the child as this user id.
    pub uid: Option<u32>,
    /// Run the child with this group id.
    pub gid: Option<u32>,
}

impl fmt::Debug for ProcessCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessCommand")
            .field("program", &self.program)
            .field("args", &self.args)
            .field(
                "env",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("stdin", &self.stdin.as_ref().map(|_| ".."))
            .field("current_dir", &self.current_dir)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish()
    }
}

impl ProcessCommand {
    /// A command running `program` with `args`.
    pub fn new(
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// The program's name for messages.
    pub(crate) fn display_name(&self) -> String {
        self.program.file_name().map_or_else(
            || self.program.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// A tokio command with the environment, directory and user set, stderr piped, and
    /// killed when dropped. Stdin and stdout are for the caller to set.
    pub(crate) fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args).env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        if let Some(uid) = self.uid {
            command.uid(uid);
        }
        if let Some(gid) = self.gid {
            command.gid(gid);
        }
        command.stderr(Stdio::piped()).kill_on_drop(true);
        command
    }
}

/// Reads a child's stderr to its end, keeping the last [`STDERR_TAIL`] bytes.
pub(crate) fn spawn_stderr_tail(
    stderr: Option<impl AsyncRead + Unpin + Send + 'static>,
) -> JoinHandle<String> {
    tokio::spawn(async move {
        let Some(mut stderr) = stderr else {
            return String::new();
        };
        let mut tail = VecDeque::with_capacity(STDERR_TAIL);
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tail.extend(&buf[..n]);
            let excess = tail.len().saturating_sub(STDERR_TAIL);
            tail.drain(..excess);
        }
        String::from_utf8_lossy(tail.make_contiguous())
            .trim()
            .to_owned()
    })
}

/// The stderr tail, waiting a bounded time for the pipe to close.
pub(crate) async fn stderr_tail(handle: JoinHandle<String>) -> String {
    match tokio::time::timeout(STDERR_GRACE, handle).await {
        Ok(Ok(tail)) => tail,
        _ => String::from("(stderr not available)"),
    }
}

/// `Ok` for a successful exit, else the error naming the program, status and stderr.
pub(crate) fn check_status(program: &str, status: ExitStatus, stderr: String) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        Err(Error::ProcessFailed {
            program: program.to_owned(),
            status: status.to_string(),
            stderr,
        })
    }
}
