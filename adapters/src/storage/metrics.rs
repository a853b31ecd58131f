//! Storage metrics: a wrapper around any [`Store`] that counts operations by backend and
//! outcome, their duration, and the bytes written and read. It must never change what the
//! wrapped store returns.
//!
//! Metric names: `phoenix_storage_operations_total{backend,operation,outcome}` (outcome:
//! `ok`, `not_found`, `error`), `phoenix_storage_operation_seconds{backend,operation}`,
//! `phoenix_storage_bytes_total{backend,direction}` (direction: `written`, `read`).

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;

use super::{ByteStream, ObjectInfo, ObjectKey, Store};
use crate::Result;

/// A [`Store`] that records metrics of every call.
#[derive(Debug)]
pub struct MetricsStore {
    inner: Arc<dyn Store>,
    backend: &'static str,
}

impl MetricsStore {
    /// `backend` labels the metrics (`local`, `s3`, `swift`).
    pub fn new(inner: Arc<dyn Store>, backend: &'static str) -> Self {
        Self { inner, backend }
    }

    fn record<T>(&self, operation: &'static str, started: Instant, result: &Result<T>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) if e.is_not_found() => "not_found",
            Err(_) => "error",
        };
        metrics::counter!(
            "phoenix_storage_operations_total",
            "backend" => self.backend,
            "operation" => operation,
            "outcome" => outcome,
        )
        .increment(1);
        metrics::histogram!(
            "phoenix_storage_operation_seconds",
            "backend" => self.backend,
            "operation" => operation,
        )
        .record(started.elapsed().as_secs_f64());
    }
}

fn bytes_counter(backend: &'static str, direction: &'static str) -> metrics::Counter {
    metrics::counter!("phoenix_storage_bytes_total", "backend" => backend, "direction" => direction)
}

#[async_trait::async_trait]
impl Store for MetricsStore {
    async fn put(&self, key: &ObjectKey, data: ByteStream) -> Result<u64> {
        let started = Instant::now();
        let result = self.inner.put(key, data).await;
        if let Ok(bytes) = &result {
            bytes_counter(self.backend, "written").increment(*bytes);
        }
        self.record("put", started, &result);
        result
    }

    async fn get(&self, key: &ObjectKey) -> Result<ByteStream> {
        let started = Instant::now();
        let result = self.inner.get(key).await;
        self.record("get", started, &result);
        let counter = bytes_counter(self.backend, "read");
        result.map(|stream| -> ByteStream {
            Box::pin(stream.inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    counter.increment(chunk.len() as u64);
                }
            }))
        })
    }

    async fn stat(&self, key: &ObjectKey) -> Result<ObjectInfo> {
        let started = Instant::now();
        let result = self.inner.stat(key).await;
        self.record("stat", started, &result);
        result
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let started = Instant::now();
        let result = self.inner.list(prefix).await;
        self.record("list", started, &result);
        result
    }

    async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.delete(key).await;
        self.record("delete", started, &result);
        result
    }
}
