//! The queue between two pipeline stages, bounded in bytes.
//!
//! A semaphore holds one permit per byte of capacity (as vector's `limited_queue`): a
//! sender acquires as many permits as its buffer has bytes and the receiver releases them
//! when it takes the buffer, so a fast stage waits for a slow one. A buffer larger than
//! the whole queue is split (zero-copy) rather than let through, so the *queued byte
//! count* never exceeds the capacity.
//!
//! That count is not the memory a queue pins: a zero-copy split keeps its whole parent
//! buffer alive until its last piece is dropped, so a queue smaller than the buffers
//! sent into it (an encrypted chunk of `chunk_size + 16` bytes into a smaller queue)
//! holds up to one parent buffer beyond its capacity. Copying the pieces instead would
//! not lower the peak (the sender holds the parent until every piece is queued), so the
//! bound is stated rather than chased; see the module documentation of `backup` for the
//! pipeline's total.
//!
//! Only the runner creates queues; stages never do. A queue never carries an empty
//! buffer, and never signals a clean end unless the sender says so with
//! [`QueueSender::finish`]: a sender dropped without it reads as a failure upstream.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::progress::Progress;
use crate::{Error, Result};

enum Message {
    Data(Bytes, OwnedSemaphorePermit),
    End,
}

/// The sending half; owned by the upstream stage.
#[derive(Debug)]
pub(crate) struct QueueSender {
    tx: mpsc::Sender<Message>,
    permits: Arc<Semaphore>,
    capacity: usize,
    progress: Progress,
    cancel: CancellationToken,
}

/// The receiving half; owned by the downstream stage.
#[derive(Debug)]
pub(crate) struct QueueReceiver {
    rx: mpsc::Receiver<Message>,
    progress: Progress,
    cancel: CancellationToken,
    ended: bool,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Data(b, _) => write!(f, "Data({} bytes)", b.len()),
            Self::End => f.write_str("End"),
        }
    }
}

/// A queue holding at most `capacity` bytes (at least 1, at most `u32::MAX`).
pub(crate) fn queue(
    capacity: usize,
    progress: &Progress,
    cancel: &CancellationToken,
) -> (QueueSender, QueueReceiver) {
    let capacity = capacity.clamp(1, u32::MAX as usize);
    // Every message but `End` holds at least one byte, so the byte bound also bounds the
    // message count; tokio's channel allocates its slots lazily.
    let (tx, rx) = mpsc::channel(capacity + 1);
    progress.add_queue_bound(capacity);
    (
        QueueSender {
            tx,
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            progress: progress.clone(),
            cancel: cancel.clone(),
        },
        QueueReceiver {
            rx,
            progress: progress.clone(),
            cancel: cancel.clone(),
            ended: false,
        },
    )
}

impl QueueSender {
    /// Queues `data`, waiting while the queue is full.
    ///
    /// # Errors
    /// [`Error::Cancelled`] when the pipeline is cancelled or the receiver is gone.
    pub(crate) async fn send(&self, mut data: Bytes) -> Result<()> {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(self.capacity));
            #[allow(clippy::cast_possible_truncation)]
            let wanted = piece.len() as u32;
            let permit = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Err(Error::Cancelled),
                permit = Arc::clone(&self.permits).acquire_many_owned(wanted) => {
                    permit.map_err(|_| Error::Cancelled)?
                }
            };
            self.progress.enqueued(piece.len());
            let len = piece.len();
            if self.tx.send(Message::Data(piece, permit)).await.is_err() {
                self.progress.dequeued(len);
                return Err(Error::Cancelled);
            }
        }
        Ok(())
    }

    /// Whether the receiver is gone: the stage after this queue stopped reading.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Marks the clean end of the data.
    ///
    /// # Errors
    /// [`Error::Cancelled`] when the receiver is gone.
    pub(crate) async fn finish(&self) -> Result<()> {
        self.tx
            .send(Message::End)
            .await
            .map_err(|_| Error::Cancelled)
    }
}

impl QueueReceiver {
    /// The next buffer, `None` at the clean end.
    ///
    /// # Errors
    /// [`Error::Cancelled`] when the pipeline is cancelled or the sender went away
    /// without finishing (the upstream stage failed and reports why itself).
    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>> {
        if self.ended {
            return Ok(None);
        }
        let message = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return Err(Error::Cancelled),
            message = self.rx.recv() => message,
        };
        match message {
            Some(Message::Data(data, permit)) => {
                self.progress.dequeued(data.len());
                drop(permit);
                Ok(Some(data))
            }
            Some(Message::End) => {
                self.ended = true;
                Ok(None)
            }
            None => Err(Error::Cancelled),
        }
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        // Buffers still queued leave memory with the receiver: keep the gauge honest.
        self.rx.close();
        while let Ok(message) = self.rx.try_recv() {
            if let Message::Data(data, _) = message {
                self.progress.dequeued(data.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sender_waits_while_the_queue_holds_its_bound() {
        let progress = Progress::new();
        let cancel = CancellationToken::new();
        let (tx, mut rx) = queue(10, &progress, &cancel);
        tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            tx.send(Bytes::from_static(b"x")),
        )
        .await;
        assert!(blocked.is_err(), "a full queue accepted more bytes");
        assert_eq!(progress.in_flight_bytes(), 10);
        assert_eq!(rx.recv().await.unwrap().unwrap().len(), 10);
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        tx.finish().await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), Bytes::from_static(b"x"));
        assert!(rx.recv().await.unwrap().is_none());
        assert_eq!(progress.snapshot().peak_in_flight_bytes, 10);
    }

    #[tokio::test]
    async fn a_buffer_larger_than_the_queue_is_split() {
        let progress = Progress::new();
        let cancel = CancellationToken::new();
        let (tx, mut rx) = queue(4, &progress, &cancel);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(b) = rx.recv().await.unwrap() {
                assert!(b.len() <= 4);
                got.extend_from_slice(&b);
            }
            got
        });
        tx.send(Bytes::from_static(b"abcdefghij")).await.unwrap();
        tx.finish().await.unwrap();
        assert_eq!(reader.await.unwrap(), b"abcdefghij");
        assert!(progress.snapshot().peak_in_flight_bytes <= 4);
    }

    #[tokio::test]
    async fn a_sender_dropped_without_finishing_is_not_a_clean_end() {
        let progress = Progress::new();
        let cancel = CancellationToken::new();
        let (tx, mut rx) = queue(8, &progress, &cancel);
        tx.send(Bytes::from_static(b"ab")).await.unwrap();
        drop(tx);
        assert!(rx.recv().await.unwrap().is_some());
        assert!(matches!(rx.recv().await, Err(Error::Cancelled)));
    }
}
