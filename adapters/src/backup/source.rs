//! Sources: where a backup's data comes from.
//!
//! A source has two shapes. A **stream** is a byte stream (an engine's dump, or a
//! snapshot read as a stream when it is shipped) that flows through the filters to
//! storage. A **reference** needs no bytes: a snapshot that stays on its infrastructure,
//! recorded in the manifest with what is needed to get it back. A source never decides
//! where its bytes go, never buffers more than a read's worth, and never writes a
//! temporary file.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::process::{ProcessCommand, check_status, spawn_stderr_tail, stderr_tail};
use crate::storage::ByteStream;
use crate::{Error, Result};

/// Size of a process source's read buffers: the largest piece it hands on, and how far
/// the source may run ahead of the queue it feeds.
const READ_CAPACITY: usize = 256 * 1024;

/// Kernel buffer asked for the stdout pipe. Linux's default of 64 KiB caps every read at
/// 64 KiB; with 1 MiB (the default `pipe-max-size`) the child keeps writing while the
/// reader pauses (see [`COALESCE_PAUSE`]) or the pipeline is busy.
const PIPE_SIZE: i32 = 1024 * 1024;

/// How long the reader waits after a read that emptied the pipe, so that the child's
/// small writes (`pg_dump` writes 4 KiB at a time) gather in the pipe and the next read
/// takes them at once: at 270 MB/s the child writes about half of [`PIPE_SIZE`]
/// meanwhile.
const COALESCE_PAUSE: Duration = Duration::from_millis(2);

/// How long (ms) the reader waits for output before it checks whether the stream was
/// dropped.
const CANCEL_CHECK_MS: u16 = 100;

/// Idle read buffers a process source keeps for reuse.
const POOL_BUFFERS: usize = 8;

/// Read buffers that come back once the pipeline dropped the last view of them.
///
/// A fresh buffer per read costs a page fault per 4 KiB: glibc hands freed blocks of
/// this size back to the kernel, so every read landed in new pages (6% of a level-1
/// backup's CPU). A buffer is zeroed once, when it is allocated, and then always holds
/// [`READ_CAPACITY`] initialised bytes, so reads go straight into it. A piece that fills
/// at least half a buffer travels downstream in its pooled buffer (so the memory a queue
/// pins stays within twice the bytes it counts); a smaller one is copied out and its
/// buffer reused at once.
#[derive(Clone, Default)]
struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// A read buffer and how much of it holds data.
struct ReadBuffer {
    bytes: Vec<u8>,
    filled: usize,
}

impl BufferPool {
    fn take(&self) -> ReadBuffer {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| vec![0; READ_CAPACITY]);
        ReadBuffer { bytes, filled: 0 }
    }

    fn give(&self, buffer: Vec<u8>) {
        let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < POOL_BUFFERS {
            idle.push(buffer);
        }
    }

    /// The filled part of `buffer` as [`Bytes`], leaving `buffer` empty and ready for the
    /// next read.
    fn freeze(&self, buffer: &mut ReadBuffer) -> Bytes {
        let len = std::mem::take(&mut buffer.filled);
        if len < READ_CAPACITY / 2 {
            return Bytes::copy_from_slice(&buffer.bytes[..len]);
        }
        let full = std::mem::replace(buffer, self.take());
        Bytes::from_owner(Pooled {
            buffer: full.bytes,
            len,
            pool: self.clone(),
        })
    }
}

/// A read buffer on its way downstream; returns to its pool when dropped.
struct Pooled {
    buffer: Vec<u8>,
    len: usize,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buffer));
    }
}

/// What a source produced.
pub enum SourceOutput {
    /// The backup's bytes, ending with an `Err` on any failure.
    Stream(ByteStream),
    /// A snapshot kept on its infrastructure; no bytes flow.
    Reference(SnapshotRef),
}

impl fmt::Debug for SourceOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stream(_) => f.write_str("SourceOutput::Stream(..)"),
            Self::Reference(r) => f.debug_tuple("SourceOutput::Reference").field(r).finish(),
        }
    }
}

/// A snapshot that stays where it was taken: enough for the infrastructure that made it
/// to find it, restore from it and delete it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    /// The infrastructure that holds it: `btrfs`, `ebs`, `csi`, ...
    pub provider: String,
    /// The provider's identifier (a subvolume path under the volume root, `snap-...`).
    pub id: String,
    /// Where it lives when that matters for a restore (an availability zone, a host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Size in bytes, when the provider knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Anything else the provider needs (never a secret).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// What the manifest records about a source: enough to pick the right restore tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    /// The plan's backup strategy: `pg_dump`, `pg_basebackup`, `btrfs-snapshot`, ...
    pub strategy: String,
    /// The engine: `postgresql`, `mariadb`, `redis`.
    pub engine: String,
    /// The engine's version, e.g. `15`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_version: Option<String>,
    /// The format of the stream: `pg_dump-custom`, `sql`, `tar`, `rdb`, ... (for a
    /// reference: the snapshot kind).
    pub format: String,
    /// What the engine needs to know at restore time beyond the format (never a secret),
    /// e.g. `roles`: the binding roles that existed when a PostgreSQL dump was taken.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// Where a backup's data comes from.
///
/// # Contract
/// - [`open`](Source::open) MUST return [`SourceOutput::Stream`] or
///   [`SourceOutput::Reference`] and MUST NOT write anything to backup storage.
/// - A stream MUST end with an `Err` item, never a clean end, when anything went wrong:
///   a child process that exits non-zero or on a signal, a read error, a stream that
///   produced no bytes at all. A child process MUST be awaited for its exit status after
///   its output closed before the stream ends cleanly.
/// - A stream MUST yield data as it is produced (it may gather small writes for a few
///   milliseconds) and MUST NOT buffer more than one read buffer (it is the runner's
///   bounded queues that hold data, not the source).
/// - A reference MUST only be returned once the snapshot is complete and durable.
///
/// # Errors
/// `open` fails when the source cannot start (a missing program, an infrastructure API
/// refusing a snapshot); failures after the start travel in the stream.
///
/// # Cancellation
/// Dropping the stream MUST stop the work behind it (a child process is killed), and
/// dropping the `open` future MUST NOT leave a process running.
#[async_trait::async_trait]
pub trait Source: Send + Sync + fmt::Debug {
    /// What the manifest records about this source.
    fn info(&self) -> SourceInfo;

    /// Starts the source.
    async fn open(&self) -> Result<SourceOutput>;
}

/// A source that runs a command and streams its stdout (`pg_dump`, `mariadb-dump`,
/// `redis-cli --rdb -`, `btrfs send`).
#[derive(Debug, Clone)]
pub struct ProcessSource {
    info: SourceInfo,
    command: ProcessCommand,
}

impl ProcessSource {
    /// A source running `command`, described by `info`.
    pub fn new(info: SourceInfo, command: ProcessCommand) -> Self {
        Self { info, command }
    }
}

#[async_trait::async_trait]
impl Source for ProcessSource {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    async fn open(&self) -> Result<SourceOutput> {
        process_stream(&self.command).map(SourceOutput::Stream)
    }
}

/// What the reader thread hands to the stream: a piece of output, `None` at the end of
/// the output, or the read error.
type Piece = std::io::Result<Option<Bytes>>;

/// Reads a child's stdout on a thread of its own, straight into pooled buffers.
///
/// Not on the async runtime: there every read that finds the pipe empty parks the task
/// on epoll, and each wake-up hands the task between runtime threads (a level-1 backup
/// of a 400 MB dump: 2.7 CPU-s per GB and 30,000 context switches that way, 2.2 and
/// 8,000 with this thread). After a read that emptied the pipe it sleeps
/// [`COALESCE_PAUSE`], so that the next read takes what the child wrote meanwhile. It
/// hands a piece on when its buffer is full, or when a read after a pause finds nothing
/// more: output is never held back longer than a pause.
///
/// It holds the buffer it fills; the channel to the stream holds one more piece. It stops
/// at the end of the output, at a read error, or once the stream is dropped (noticed
/// when it hands on a piece, or within [`CANCEL_CHECK_MS`] while it waits for output).
struct PipeReader {
    /// The read end of the pipe, in non-blocking mode.
    pipe: std::fs::File,
    pool: BufferPool,
    buffer: ReadBuffer,
    pause: Option<Duration>,
    pieces: mpsc::Sender<Piece>,
}

impl PipeReader {
    fn run(mut self) {
        let end = match self.read_to_end() {
            Ok(()) => Ok(None),
            Err(ReadError::Io(e)) => Err(e),
            Err(ReadError::StreamDropped) => return,
        };
        // The stream may be gone by now; then nobody needs the end.
        let _ = self.pieces.blocking_send(end);
    }

    fn read_to_end(&mut self) -> std::result::Result<(), ReadError> {
        loop {
            let ReadBuffer { bytes, filled } = &mut self.buffer;
            match self.pipe.read(&mut bytes[*filled..]) {
                Ok(0) => return self.hand_on(),
                Ok(read) => {
                    *filled += read;
                    if *filled == READ_CAPACITY {
                        self.hand_on()?;
                    } else if let Some(pause) = self.pause {
                        // A read that did not fill the buffer emptied the pipe.
                        std::thread::sleep(pause);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.hand_on()?;
                    self.wait_for_output()?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    fn hand_on(&mut self) -> std::result::Result<(), ReadError> {
        if self.buffer.filled == 0 {
            return Ok(());
        }
        let data = self.pool.freeze(&mut self.buffer);
        self.pieces
            .blocking_send(Ok(Some(data)))
            .map_err(|_| ReadError::StreamDropped)
    }

    /// Waits until the pipe has output or was closed.
    fn wait_for_output(&self) -> std::result::Result<(), ReadError> {
        loop {
            let mut fds = [PollFd::new(self.pipe.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(CANCEL_CHECK_MS)) {
                Ok(0) if self.pieces.is_closed() => return Err(ReadError::StreamDropped),
                Ok(0) | Err(Errno::EINTR) => {}
                // Readable or hung up: the next read tells which.
                Ok(_) => return Ok(()),
                Err(e) => return Err(ReadError::Io(e.into())),
            }
        }
    }
}

/// Why a [`PipeReader`] stopped before the end of the output.
enum ReadError {
    Io(std::io::Error),
    /// The stream was dropped: the reader stops quietly.
    StreamDropped,
}

struct Running {
    program: String,
    child: Child,
    pieces: mpsc::Receiver<Piece>,
    stderr: JoinHandle<String>,
    stdin: Option<JoinHandle<std::io::Result<()>>>,
    bytes: u64,
}

impl Running {
    /// The next piece of output, `None` once stdout closed and everything was handed on.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        match self.pieces.recv().await {
            Some(Ok(Some(data))) => {
                self.bytes += data.len() as u64;
                Ok(Some(data))
            }
            Some(Ok(None)) => Ok(None),
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::other(
                "the thread reading the output stopped",
            )),
        }
    }

    /// After stdout closed: the exit status decides whether the stream ends cleanly.
    async fn finish(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| Error::io(format!("waiting for {}", self.program), e))?;
        let stderr = stderr_tail(self.stderr).await;
        check_status(&self.program, status, stderr.clone())?;
        if let Some(stdin) = self.stdin {
            match stdin.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Error::io(format!("writing to {}'s stdin", self.program), e));
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("writing to {}'s stdin", self.program),
                        std::io::Error::other(e),
                    ));
                }
            }
        }
        if self.bytes == 0 {
            return Err(Error::ProcessFailed {
                program: self.program,
                status: format!(
                    "{status} without writing any data (an empty backup is a failed backup)"
                ),
                stderr,
            });
        }
        Ok(())
    }
}

/// Spawns `command` and returns its stdout as a stream that ends with an `Err` unless the
/// child wrote at least one byte and exited with status 0. Dropping the stream kills the
/// child.
///
/// # Errors
/// When the child or the thread reading its output cannot be started.
pub fn process_stream(command: &ProcessCommand) -> Result<ByteStream> {
    let program = command.display_name();
    let mut cmd = command.command();
    cmd.stdout(std::process::Stdio::piped());
    cmd.stdin(if command.stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("starting {program}"), e))?;
    let starting = |e| Error::io(format!("starting {program}"), e);
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| starting(std::io::Error::other("no stdout pipe")))?
        .into_owned_fd()
        .map_err(starting)?;
    let flags = fcntl(&stdout, FcntlArg::F_GETFL).map_err(|e| starting(e.into()))?;
    fcntl(
        &stdout,
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| starting(e.into()))?;
    // Only an optimisation: a smaller limit (`/proc/sys/fs/pipe-max-size`, an
    // unprivileged user's pipe quota) keeps the default size, and the stream works alike.
    let pause = match fcntl(&stdout, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        Ok(_) => Some(COALESCE_PAUSE),
        Err(e) => {
            debug!(program = %program, error = %e, "Keeping the default pipe size.");
            // A 64 KiB pipe would stall the child during a pause.
            None
        }
    };
    let (pieces_tx, pieces) = mpsc::channel(1);
    let pool = BufferPool::default();
    let reader = PipeReader {
        pipe: std::fs::File::from(stdout),
        buffer: pool.take(),
        pool,
        pause,
        pieces: pieces_tx,
    };
    std::thread::Builder::new()
        .name("phoenix-source".into())
        .spawn(move || reader.run())
        .map_err(|e| Error::io(format!("starting a thread to read {program}"), e))?;
    let stderr = spawn_stderr_tail(child.stderr.take());
    let stdin = match (child.stdin.take(), command.stdin.clone()) {
        (Some(mut pipe), Some(input)) => Some(tokio::spawn(async move {
            pipe.write_all(&input).await?;
            pipe.shutdown().await
        })),
        _ => None,
    };
    let running = Running {
        program,
        child,
        pieces,
        stderr,
        stdin,
        bytes: 0,
    };
    let stream = futures::stream::unfold(Some(running), |state| async move {
        let mut running = state?;
        match running.next_chunk().await {
            Ok(Some(data)) => Some((Ok::<Bytes, Error>(data), Some(running))),
            Ok(None) => match running.finish().await {
                Ok(()) => None,
                Err(e) => Some((Err(e), None)),
            },
            Err(e) => {
                let error = Error::io(format!("reading the output of {}", running.program), e);
                Some((Err(error), None))
            }
        }
    });
    Ok(Box::pin(stream))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    async fn drain(mut stream: ByteStream) -> (Vec<u8>, Option<Error>) {
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn a_process_stream_ends_cleanly_only_after_a_successful_exit() {
        let cmd = ProcessCommand::new("/bin/sh", ["-c", "printf hello"]);
        let (out, err) = drain(process_stream(&cmd).unwrap()).await;
        assert_eq!(out, b"hello");
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn a_non_zero_exit_after_output_ends_the_stream_with_an_error() {
        let cmd = ProcessCommand::new("/bin/sh", ["-c", "printf data; echo boom >&2; exit 3"]);
        let (out, err) = drain(process_stream(&cmd).unwrap()).await;
        assert_eq!(out, b"data");
        let err = err.expect("a failing process ended cleanly");
        let text = err.to_string();
        assert!(
            text.contains("exit status: 3") && text.contains("boom"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_process_killed_by_a_signal_fails_the_stream() {
        let cmd = ProcessCommand::new("/bin/sh", ["-c", "printf x; kill -9 $$"]);
        let (_, err) = drain(process_stream(&cmd).unwrap()).await;
        assert!(
            err.expect("killed process ended cleanly")
                .to_string()
                .contains("signal")
        );
    }

    #[tokio::test]
    async fn large_and_small_reads_arrive_whole_and_in_order() {
        // 3 MiB from a fast writer (full pooled buffers), then small writes (copied).
        let cmd = ProcessCommand::new(
            "/bin/sh",
            [
                "-c",
                "head -c 3145728 /dev/zero | tr '\\0' a; for i in 1 2 3; do printf b; sleep 0.01; done",
            ],
        );
        let (out, err) = drain(process_stream(&cmd).unwrap()).await;
        assert!(err.is_none());
        assert_eq!(out.len(), 3 * 1024 * 1024 + 3);
        assert!(out[..3 * 1024 * 1024].iter().all(|&b| b == b'a'));
        assert_eq!(&out[3 * 1024 * 1024..], b"bbb");
    }

    #[test]
    fn a_pooled_buffer_returns_to_its_pool_when_its_last_view_is_dropped() {
        let pool = BufferPool::default();
        let mut buffer = pool.take();
        buffer.bytes.fill(7);
        buffer.filled = READ_CAPACITY;
        let data = pool.freeze(&mut buffer);
        assert_eq!(buffer.filled, 0);
        let piece = data.slice(10..20);
        drop(data);
        assert!(pool.0.lock().unwrap().is_empty());
        drop(piece);
        assert_eq!(pool.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_process_that_writes_nothing_fails_the_stream() {
        let cmd = ProcessCommand::new("/bin/true", Vec::<String>::new());
        let (_, err) = drain(process_stream(&cmd).unwrap()).await;
        assert!(matches!(err, Some(Error::ProcessFailed { .. })));
    }

    #[tokio::test]
    async fn secrets_reach_the_child_by_environment_and_stdin_and_the_broker_env_does_not() {
        assert!(
            std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
            "cargo sets it for tests"
        );
        let cmd = ProcessCommand {
            stdin: Some(b"from-stdin".to_vec()),
            ..ProcessCommand::new(
                "/bin/sh",
                [
                    "-c",
                    "printf '%s:' \"$SECRET\"; cat; printf ':%s' \"${CARGO_MANIFEST_DIR:-unset}\"",
                ],
            )
            .env("SECRET", "from-env")
        };
        let (out, err) = drain(process_stream(&cmd).unwrap()).await;
        assert!(err.is_none());
        assert_eq!(out, b"from-env:from-stdin:unset");
        assert!(!format!("{cmd:?}").contains("from-env"));
    }
}
