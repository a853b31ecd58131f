//! Sinks: the last stage of a pipeline. A storage output for a backup; a restore
//! process's stdin, a writer (`phoenix decrypt`'s stdout) or nowhere (`phoenix verify`)
//! for the way back.
//!
//! A sink reports success only when every byte reached its destination and the
//! destination said so (a restore process's exit status, a store's durable put).

use std::fmt;
use std::sync::Arc;

use futures::StreamExt as _;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use super::process::{ProcessCommand, check_status, spawn_stderr_tail, stderr_tail};
use crate::storage::{ByteStream, ObjectKey, Store};
use crate::{Error, Result};

/// The last stage of a pipeline.
///
/// # Contract
/// - [`consume`](Sink::consume) MUST read `data` to its end and MUST return an error if
///   `data` yields one, without treating what came before as complete.
/// - It MUST return `Ok` only when every byte reached its destination durably (a process
///   sink awaits the child's exit status; a store sink returns when the object is
///   visible).
///
/// # Errors
/// The stream's error, or the destination's failure.
///
/// # Cancellation
/// The runner cancels a sink by dropping the `consume` future (whether it is reading
/// `data` or waiting for its destination after the end of `data`); dropping it MUST stop
/// the work (a child process is killed).
#[async_trait::async_trait]
pub trait Sink: Send + fmt::Debug {
    /// A short name for progress and logs.
    fn name(&self) -> &'static str;

    /// Consumes the stream, returning the bytes delivered.
    async fn consume(self: Box<Self>, data: ByteStream) -> Result<u64>;
}

/// Stores the stream as one object.
#[derive(Debug)]
pub struct StoreSink {
    store: Arc<dyn Store>,
    key: ObjectKey,
}

impl StoreSink {
    /// A sink writing `key` in `store`.
    pub fn new(store: Arc<dyn Store>, key: ObjectKey) -> Self {
        Self { store, key }
    }
}

#[async_trait::async_trait]
impl Sink for StoreSink {
    fn name(&self) -> &'static str {
        "storage"
    }

    async fn consume(self: Box<Self>, data: ByteStream) -> Result<u64> {
        self.store.put(&self.key, data).await
    }
}

/// Writes the stream to an [`AsyncWrite`] and flushes it.
pub struct WriterSink<W>(W);

impl<W> fmt::Debug for WriterSink<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WriterSink")
    }
}

impl<W: AsyncWrite + Unpin + Send> WriterSink<W> {
    /// A sink writing to `writer`.
    pub fn new(writer: W) -> Self {
        Self(writer)
    }
}

#[async_trait::async_trait]
impl<W: AsyncWrite + Unpin + Send> Sink for WriterSink<W> {
    fn name(&self) -> &'static str {
        "output"
    }

    async fn consume(mut self: Box<Self>, mut data: ByteStream) -> Result<u64> {
        let mut written = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            self.0
                .write_all(&chunk)
                .await
                .map_err(|e| Error::io("writing the output", e))?;
            written += chunk.len() as u64;
        }
        self.0
            .flush()
            .await
            .map_err(|e| Error::io("flushing the output", e))?;
        Ok(written)
    }
}

/// Counts and drops the stream (verification).
#[derive(Debug, Default)]
pub struct DiscardSink;

#[async_trait::async_trait]
impl Sink for DiscardSink {
    fn name(&self) -> &'static str {
        "discard"
    }

    async fn consume(self: Box<Self>, mut data: ByteStream) -> Result<u64> {
        let mut bytes = 0u64;
        while let Some(chunk) = data.next().await {
            bytes += chunk?.len() as u64;
        }
        Ok(bytes)
    }
}

/// Feeds the stream to a command's stdin (`pg_restore`, `psql`, `mbstream -x`) and
/// awaits its exit status. On a stream error or a cancellation (even while the child is
/// finishing after its stdin closed) the child is killed, never left to commit a partial
/// restore as if it were whole. Only the child itself is killed: a restore tool that
/// forks must not outlive its own parent (`exec` in a shell wrapper).
#[derive(Debug)]
pub struct ProcessSink {
    command: ProcessCommand,
}

impl ProcessSink {
    /// A sink running `command` (its `stdin` field is ignored: the stream is its stdin).
    pub fn new(command: ProcessCommand) -> Self {
        Self { command }
    }
}

#[async_trait::async_trait]
impl Sink for ProcessSink {
    fn name(&self) -> &'static str {
        "restore"
    }

    async fn consume(self: Box<Self>, mut data: ByteStream) -> Result<u64> {
        let program = self.command.display_name();
        let mut cmd = self.command.command();
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {program}"), e))?;
        let stderr = spawn_stderr_tail(child.stderr.take());
        let mut stdin = child.stdin.take().ok_or_else(|| {
            Error::io(
                format!("starting {program}"),
                std::io::Error::other("no stdin pipe"),
            )
        })?;
        let mut written = 0u64;
        let mut write_error = None;
        while let Some(chunk) = data.next().await {
            // An upstream error drops `child` on return, which kills it.
            let chunk = chunk?;
            if let Err(e) = stdin.write_all(&chunk).await {
                write_error = Some(e);
                break;
            }
            written += chunk.len() as u64;
        }
        if write_error.is_none() {
            write_error = stdin.shutdown().await.err();
        }
        drop(stdin);
        let status = child
            .wait()
            .await
            .map_err(|e| Error::io(format!("waiting for {program}"), e))?;
        // The exit status explains a broken pipe better than the pipe does.
        check_status(&program, status, stderr_tail(stderr).await)?;
        if let Some(e) = write_error {
            return Err(Error::io(format!("writing to {program}"), e));
        }
        Ok(written)
    }
}
