//! The runner: a source stream, a chain of filters and a sink, each stage its own task,
//! joined by queues bounded in bytes.
//!
//! Async stages (the source, the sink) are tokio tasks; filters run on blocking threads
//! so compression and encryption never starve the runtime. All stages share one
//! cancellation token. The first stage to fail records its error and cancels the others;
//! that error, not the "cancelled" of a stage stopped because of it, is what the run
//! returns. A run never returns until every stage has stopped.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::filter::Filter;
use super::progress::{Progress, StageCounter};
use super::queue::{QueueReceiver, QueueSender, queue};
use super::sink::Sink;
use crate::storage::ByteStream;
use crate::{Error, Result};

/// A linear pipeline, ready to run.
#[derive(Debug)]
pub(crate) struct Pipeline {
    pub(crate) source: SourceStage,
    pub(crate) filters: Vec<Box<dyn Filter>>,
    pub(crate) sink: Box<dyn Sink>,
    /// Bound of each queue between two stages.
    pub(crate) queue_bytes: usize,
}

/// The first stage.
pub(crate) struct SourceStage {
    pub(crate) name: &'static str,
    /// A stream that ends cleanly without any byte fails the run: no pipeline has a
    /// use for an empty stream (an empty backup is a failed backup).
    pub(crate) stream: ByteStream,
}

impl std::fmt::Debug for SourceStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceStage")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Figures of a finished run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Bytes the source produced.
    pub(crate) source_bytes: u64,
    /// Bytes the sink delivered.
    pub(crate) sink_bytes: u64,
}

/// The first real failure of a run, shared by its stages.
#[derive(Clone)]
struct Failure {
    first: Arc<Mutex<Option<Error>>>,
    /// A stage whose downstream stopped reading: only an error if nothing else failed.
    downstream_stopped: Arc<Mutex<Option<Error>>>,
    cancel: CancellationToken,
}

impl Failure {
    fn report(&self, stage: &str, error: Error) {
        if !matches!(error, Error::Cancelled) {
            let mut first = lock(&self.first);
            if first.is_none() {
                debug!(stage, error = %error, "Backup stage failed; cancelling the others.");
                *first = Some(error);
            }
        }
        self.cancel.cancel();
    }

    /// A stage ended with `error` while sending to `downstream`. When the downstream
    /// stage stopped reading (a store whose put failed, still cleaning up), that stage
    /// reports its own error: cancelling the run now could pre-empt it with a mere
    /// "cancelled". The stages upstream stop by themselves as their queues close.
    fn report_sending(&self, stage: &str, error: Error, downstream: &QueueSender) {
        if matches!(error, Error::Cancelled)
            && downstream.is_closed()
            && !self.cancel.is_cancelled()
        {
            lock(&self.downstream_stopped).get_or_insert_with(|| {
                Error::io(
                    format!("the stage after {stage} stopped reading before the end of the data"),
                    std::io::ErrorKind::BrokenPipe.into(),
                )
            });
        } else {
            self.report(stage, error);
        }
    }

    fn take(&self) -> Option<Error> {
        lock(&self.first)
            .take()
            .or_else(|| lock(&self.downstream_stopped).take())
    }
}

fn lock(slot: &Mutex<Option<Error>>) -> std::sync::MutexGuard<'_, Option<Error>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `pipeline` to its end.
///
/// # Errors
/// The first stage failure; [`Error::Cancelled`] when `cancel` was cancelled by the
/// caller and no stage failed before.
pub(crate) async fn run(
    pipeline: Pipeline,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Outcome> {
    let token = cancel.child_token();
    // Dropping the run future must stop every stage, blocking ones included.
    let _stop_on_drop = token.clone().drop_guard();
    let failure = Failure {
        first: Arc::new(Mutex::new(None)),
        downstream_stopped: Arc::new(Mutex::new(None)),
        cancel: token.clone(),
    };
    let Pipeline {
        source,
        filters,
        sink,
        queue_bytes,
    } = pipeline;
    progress.start();

    let mut tasks: JoinSet<Option<u64>> = JoinSet::new();
    let source_counter = progress.stage(source.name);
    let (tx, mut rx) = queue(queue_bytes, progress, &token);
    {
        let failure = failure.clone();
        let token = token.clone();
        let counter = Arc::clone(&source_counter);
        tasks.spawn(async move {
            let name = source.name;
            let ended = match run_source(source, &tx, &counter, &token).await {
                Ok(()) => tx.finish().await,
                Err(e) => Err(e),
            };
            if let Err(e) = ended {
                failure.report_sending(name, e, &tx);
            }
            None
        });
    }
    let handle = Handle::current();
    for filter in filters {
        let (next_tx, next_rx) = queue(queue_bytes, progress, &token);
        let input = std::mem::replace(&mut rx, next_rx);
        let counter = progress.stage(filter.name());
        let failure = failure.clone();
        let handle = handle.clone();
        tasks.spawn_blocking(move || {
            let name = filter.name();
            let ended = match run_filter(filter, input, &next_tx, &counter, &handle) {
                Ok(()) => handle.block_on(next_tx.finish()),
                Err(e) => Err(e),
            };
            if let Err(e) = ended {
                failure.report_sending(name, e, &next_tx);
            }
            None
        });
    }
    {
        let counter = progress.stage(sink.name());
        let failure = failure.clone();
        let token = token.clone();
        tasks.spawn(async move {
            let name = sink.name();
            let stream = receiver_stream(rx, counter);
            // Once its input ended, a sink may still wait for its destination (a restore
            // process finishing): cancellation drops it there, which kills a child.
            let consumed = tokio::select! {
                biased;
                () = token.cancelled() => Err(Error::Cancelled),
                consumed = sink.consume(stream) => consumed,
            };
            match consumed {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    failure.report(name, e);
                    None
                }
            }
        });
    }

    let mut sink_bytes = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Some(bytes)) => sink_bytes = Some(bytes),
            Ok(None) => {}
            Err(e) => failure.report(
                "runner",
                Error::io(
                    "a backup stage",
                    std::io::Error::other(format!("stage panicked: {e}")),
                ),
            ),
        }
    }
    if let Some(error) = failure.take() {
        return Err(error);
    }
    match sink_bytes {
        Some(sink_bytes) if !token.is_cancelled() => Ok(Outcome {
            source_bytes: source_counter.get(),
            sink_bytes,
        }),
        _ => Err(Error::Cancelled),
    }
}

async fn run_source(
    mut source: SourceStage,
    tx: &QueueSender,
    counter: &StageCounter,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut any = false;
    loop {
        let item = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(Error::Cancelled),
            item = source.stream.next() => item,
        };
        match item {
            Some(Ok(data)) if data.is_empty() => {}
            Some(Ok(data)) => {
                any = true;
                counter.add(data.len());
                tx.send(data).await?;
            }
            Some(Err(e)) => return Err(e),
            None if !any => {
                return Err(Error::Integrity(
                    "the source ended without producing any data; an empty backup is a failed backup".into(),
                ));
            }
            None => return Ok(()),
        }
    }
}

fn run_filter(
    mut filter: Box<dyn Filter>,
    mut input: QueueReceiver,
    output: &QueueSender,
    counter: &StageCounter,
    handle: &Handle,
) -> Result<()> {
    let mut emit = |data: Bytes| {
        if data.is_empty() {
            return Ok(());
        }
        counter.add(data.len());
        handle.block_on(output.send(data))
    };
    while let Some(data) = handle.block_on(input.recv())? {
        filter.process(data, &mut emit)?;
    }
    filter.finish(&mut emit)
}

fn receiver_stream(rx: QueueReceiver, counter: Arc<StageCounter>) -> ByteStream {
    Box::pin(futures::stream::unfold(Some(rx), move |state| {
        let counter = Arc::clone(&counter);
        async move {
            let mut rx = state?;
            match rx.recv().await {
                Ok(Some(data)) => {
                    counter.add(data.len());
                    Some((Ok(data), Some(rx)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::super::filter::digest::Digest;
    use super::super::sink::DiscardSink;
    use super::*;

    fn stream_of(items: Vec<Result<Bytes>>) -> ByteStream {
        Box::pin(futures::stream::iter(items))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_delivers_every_byte_and_counts_each_stage() {
        let progress = Progress::new();
        let items = (0..100)
            .map(|i| Ok(Bytes::from(vec![i as u8; 1000])))
            .collect();
        let (digest, _) = Digest::new(None);
        let outcome = run(
            Pipeline {
                source: SourceStage {
                    name: "source",
                    stream: stream_of(items),
                },
                filters: vec![Box::new(digest)],
                sink: Box::new(DiscardSink),
                queue_bytes: 4096,
            },
            &progress,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            outcome,
            Outcome {
                source_bytes: 100_000,
                sink_bytes: 100_000
            }
        );
        let snapshot = progress.snapshot();
        assert_eq!(
            snapshot.stages.iter().map(|s| s.bytes).collect::<Vec<_>>(),
            [100_000; 3]
        );
        assert!(snapshot.peak_in_flight_bytes <= snapshot.queue_bound_bytes);
        assert_eq!(snapshot.in_flight_bytes, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_failure_is_reported_not_the_cancellation_it_caused() {
        let items = vec![
            Ok(Bytes::from_static(b"some")),
            Err(Error::Integrity("boom at the source".into())),
        ];
        let (digest, _) = Digest::new(None);
        let err = run(
            Pipeline {
                source: SourceStage {
                    name: "source",
                    stream: stream_of(items),
                },
                filters: vec![Box::new(digest)],
                sink: Box::new(DiscardSink),
                queue_bytes: 4096,
            },
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("boom at the source"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_source_fails_the_run() {
        let err = run(
            Pipeline {
                source: SourceStage {
                    name: "source",
                    stream: stream_of(vec![]),
                },
                filters: vec![],
                sink: Box::new(DiscardSink),
                queue_bytes: 4096,
            },
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Integrity(_)));
    }

    /// A sink that drops its input at once and takes a while to report why, as a store
    /// does whose upload failed and which is still cleaning up.
    #[derive(Debug)]
    struct FailingSlowly;

    #[async_trait::async_trait]
    impl Sink for FailingSlowly {
        fn name(&self) -> &'static str {
            "storage"
        }

        async fn consume(self: Box<Self>, data: ByteStream) -> Result<u64> {
            drop(data);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            Err(Error::Storage {
                message: "the disk is full".into(),
                retryable: false,
                source: None,
            })
        }
    }

    /// A sink that breaks its contract: it reads one chunk and claims success.
    #[derive(Debug)]
    struct StopsEarly;

    #[async_trait::async_trait]
    impl Sink for StopsEarly {
        fn name(&self) -> &'static str {
            "storage"
        }

        async fn consume(self: Box<Self>, mut data: ByteStream) -> Result<u64> {
            let first = data.next().await.transpose()?.map_or(0, |b| b.len());
            Ok(first as u64)
        }
    }

    fn endless() -> ByteStream {
        Box::pin(futures::stream::repeat_with(|| {
            Ok(Bytes::from(vec![7u8; 4096]))
        }))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_that_stops_reading_reports_its_own_error_not_a_cancellation() {
        let (digest, _) = Digest::new(None);
        let error = run(
            Pipeline {
                source: SourceStage {
                    name: "source",
                    stream: endless(),
                },
                filters: vec![Box::new(digest)],
                sink: Box::new(FailingSlowly),
                queue_bytes: 16 * 1024,
            },
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .err()
        .unwrap();
        assert!(error.to_string().contains("the disk is full"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_that_returns_before_the_end_of_the_data_fails_the_run() {
        let error = run(
            Pipeline {
                source: SourceStage {
                    name: "source",
                    stream: endless(),
                },
                filters: vec![],
                sink: Box::new(StopsEarly),
                queue_bytes: 16 * 1024,
            },
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .err()
        .unwrap();
        assert!(error.to_string().contains("stopped reading"), "{error}");
    }
}
