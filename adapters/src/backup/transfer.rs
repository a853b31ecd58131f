//! A transfer: a source streamed straight into a sink, without filters or storage, for a
//! fork (one instance's dump restored into another while it is made).
//!
//! It runs on the backup runner, so the bytes in flight are bounded by its queue and the
//! first failing side stops the other. Nothing is stored and no manifest is written: a
//! transfer that fails leaves only what the sink itself leaves (a restore's scratch data,
//! for its engine to abandon).

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::progress::Progress;
use super::runner::{self, Pipeline, SourceStage};
use super::sink::Sink;
use super::source::{Source, SourceOutput};
use crate::{Error, Result};

/// Bound of the queue between the source and the sink.
const TRANSFER_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Streams `source` into `sink` and returns the bytes the sink delivered. `progress` has
/// two stages, `source` and the sink's name.
///
/// # Errors
/// [`Error::Invalid`] for a source that is a snapshot reference (no bytes to stream); the
/// first failure of either side (the dump's exit status, an empty stream, the restore
/// tool's exit status); [`Error::Integrity`] when the sink reports another byte count
/// than the source produced.
///
/// # Cancellation
/// Cancelling `cancel` (or dropping the future) stops both sides and kills their child
/// processes; the error is then [`Error::Cancelled`].
pub async fn transfer(
    source: &dyn Source,
    sink: Box<dyn Sink>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<u64> {
    let output = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(Error::Cancelled),
        output = source.open() => output?,
    };
    let stream = match output {
        SourceOutput::Stream(stream) => stream,
        SourceOutput::Reference(snapshot) => {
            return Err(Error::Invalid(format!(
                "a {} snapshot has no stream to transfer",
                snapshot.provider
            )));
        }
    };
    let outcome = runner::run(
        Pipeline {
            source: SourceStage {
                name: "source",
                stream,
            },
            filters: Vec::new(),
            sink,
            queue_bytes: TRANSFER_QUEUE_BYTES,
        },
        progress,
        cancel,
    )
    .await?;
    if outcome.sink_bytes != outcome.source_bytes {
        return Err(Error::Integrity(format!(
            "the sink took {} bytes of the {} the source produced",
            outcome.sink_bytes, outcome.source_bytes
        )));
    }
    info!(
        strategy = %source.info().strategy,
        bytes = outcome.sink_bytes,
        "Transfer finished."
    );
    Ok(outcome.sink_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{ProcessCommand, ProcessSource, SourceInfo, WriterSink};

    fn source(script: &str) -> ProcessSource {
        ProcessSource::new(
            SourceInfo {
                strategy: "test".into(),
                engine: "none".into(),
                engine_version: None,
                format: "text".into(),
                details: Default::default(),
            },
            ProcessCommand::new("/bin/sh", ["-c", script]),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transfer_delivers_every_byte_of_the_source() {
        let (writer, mut reader) = tokio::io::duplex(64 * 1024);
        let collect = tokio::spawn(async move {
            let mut out = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut out)
                .await
                .map(|_| out)
        });
        let progress = Progress::new();
        let bytes = transfer(
            &source("seq 1 200000"),
            Box::new(WriterSink::new(writer)),
            &progress,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let out = collect.await.unwrap().unwrap();
        let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
        assert_eq!(out, expected.as_bytes());
        assert_eq!(bytes, expected.len() as u64);
        let stages = progress.snapshot().stages;
        assert_eq!(stages.len(), 2);
        assert!(stages.iter().all(|s| s.bytes == bytes));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_source_fails_the_transfer() {
        let err = transfer(
            &source("printf partial; exit 4"),
            Box::new(crate::backup::DiscardSink),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("exit status: 4"), "{err}");
    }
}
