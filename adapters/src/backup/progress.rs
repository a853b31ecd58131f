//! Progress of a running pipeline: bytes per stage, rate, and bytes in flight between
//! stages, readable at any moment by whoever holds a [`Progress`] handle.
//!
//! Counters are atomics updated by the stages themselves; reading never blocks a stage
//! and never takes a lock the data path needs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A shared, cheap-to-clone handle on a pipeline's counters.
///
/// Create one per run, pass it to the backup, restore, decrypt or verify call, and read
/// [`snapshot`](Self::snapshot) from anywhere, through a clone (a progress bar, an
/// operation's status). A handle reused for a second run accumulates that run's stages
/// after the first's.
#[derive(Clone, Default)]
pub struct Progress(Arc<Inner>);

#[derive(Default)]
struct Inner {
    started: OnceLock<Instant>,
    stages: Mutex<Vec<Arc<StageCounter>>>,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    queue_bound: AtomicU64,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// Bytes one stage has emitted so far.
#[derive(Debug)]
pub(crate) struct StageCounter {
    name: &'static str,
    bytes: AtomicU64,
}

impl StageCounter {
    pub(crate) fn add(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// One stage's figures in a [`ProgressSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageProgress {
    /// The stage's name (`source`, `zstd`, `encrypt`, `digest`, `storage`, ...).
    pub name: &'static str,
    /// Bytes the stage has emitted (for the last stage: bytes it has consumed).
    pub bytes: u64,
}

/// A consistent-enough picture of a pipeline at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressSnapshot {
    /// Stages in pipeline order.
    pub stages: Vec<StageProgress>,
    /// Time since the pipeline started (zero before it starts).
    pub elapsed: Duration,
    /// Bytes per second read by the first stage since the start.
    pub bytes_per_second: f64,
    /// Bytes currently queued between stages.
    pub in_flight_bytes: u64,
    /// The most bytes ever queued between stages at once.
    pub peak_in_flight_bytes: u64,
    /// The sum of every queue's bound: `peak_in_flight_bytes` never exceeds it.
    pub queue_bound_bytes: u64,
}

impl Progress {
    /// A fresh handle with no stages.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current figures.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let stages: Vec<StageProgress> = self
            .0
            .stages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|s| StageProgress {
                name: s.name,
                bytes: s.get(),
            })
            .collect();
        let elapsed = self
            .0
            .started
            .get()
            .map_or(Duration::ZERO, Instant::elapsed);
        let first = stages.first().map_or(0, |s| s.bytes);
        let secs = elapsed.as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let bytes_per_second = if secs > 0.0 { first as f64 / secs } else { 0.0 };
        ProgressSnapshot {
            stages,
            elapsed,
            bytes_per_second,
            in_flight_bytes: self.0.in_flight.load(Ordering::Relaxed),
            peak_in_flight_bytes: self.0.peak_in_flight.load(Ordering::Relaxed),
            queue_bound_bytes: self.0.queue_bound.load(Ordering::Relaxed),
        }
    }

    /// Bytes currently queued between stages.
    pub fn in_flight_bytes(&self) -> u64 {
        self.0.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn start(&self) {
        let _ = self.0.started.set(Instant::now());
    }

    pub(crate) fn stage(&self, name: &'static str) -> Arc<StageCounter> {
        let counter = Arc::new(StageCounter {
            name,
            bytes: AtomicU64::new(0),
        });
        self.0
            .stages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&counter));
        counter
    }

    pub(crate) fn add_queue_bound(&self, bytes: usize) {
        self.0
            .queue_bound
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn enqueued(&self, bytes: usize) {
        let now = self.0.in_flight.fetch_add(bytes as u64, Ordering::SeqCst) + bytes as u64;
        self.0.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    }

    pub(crate) fn dequeued(&self, bytes: usize) {
        self.0.in_flight.fetch_sub(bytes as u64, Ordering::SeqCst);
    }
}
