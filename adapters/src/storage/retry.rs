//! Retries of idempotent storage calls: a wrapper around any [`Store`].
//!
//! `stat`, `list`, `delete` and the opening of `get` are repeated on errors that say
//! `is_retryable()`, with exponential backoff. `put` is never repeated here: its stream is
//! consumed by the first attempt, so a failed put fails (the caller may run the whole
//! backup again). Below this wrapper, the S3 SDK retries a failed part, whose body is in
//! memory; Swift streams its segments and does not retry them. A stream already being
//! read is not resumed either.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::{ByteStream, ObjectInfo, ObjectKey, Store};
use crate::Result;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first one included (at least 1).
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub first_delay: Duration,
    /// Upper bound of one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// A [`Store`] whose idempotent calls are retried.
#[derive(Debug)]
pub struct RetryStore {
    inner: Arc<dyn Store>,
    policy: RetryPolicy,
}

impl RetryStore {
    pub fn new(inner: Arc<dyn Store>, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    async fn retry<T, F, Fut>(&self, operation: &str, key: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut delay = self.policy.first_delay;
        let mut attempt = 1;
        loop {
            match call().await {
                Err(e) if e.is_retryable() && attempt < self.policy.attempts.max(1) => {
                    warn!(operation, key, attempt, error = %e, "Storage call failed, retrying.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.policy.max_delay);
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for RetryStore {
    async fn put(&self, key: &ObjectKey, data: ByteStream) -> Result<u64> {
        self.inner.put(key, data).await
    }

    async fn get(&self, key: &ObjectKey) -> Result<ByteStream> {
        self.retry("get", key.as_str(), || self.inner.get(key))
            .await
    }

    async fn stat(&self, key: &ObjectKey) -> Result<ObjectInfo> {
        self.retry("stat", key.as_str(), || self.inner.stat(key))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.retry("list", prefix, || self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<()> {
        self.retry("delete", key.as_str(), || self.inner.delete(key))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::Error;

    /// A store whose `stat` fails `failures` times with the given retryability. A test
    /// double: a real server cannot be made to fail on cue.
    #[derive(Debug)]
    struct Flaky {
        failures: u32,
        retryable: bool,
        calls: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Store for Flaky {
        async fn put(&self, _: &ObjectKey, _: ByteStream) -> Result<u64> {
            Ok(0)
        }
        async fn get(&self, key: &ObjectKey) -> Result<ByteStream> {
            Err(Error::NotFound {
                key: key.to_string(),
            })
        }
        async fn stat(&self, key: &ObjectKey) -> Result<ObjectInfo> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(Error::Storage {
                    message: "flaky".into(),
                    retryable: self.retryable,
                    source: None,
                });
            }
            Ok(ObjectInfo {
                key: key.clone(),
                size: 1,
                modified: None,
            })
        }
        async fn list(&self, _: &str) -> Result<Vec<ObjectInfo>> {
            Ok(Vec::new())
        }
        async fn delete(&self, _: &ObjectKey) -> Result<()> {
            Ok(())
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_until_success() {
        let flaky = Arc::new(Flaky {
            failures: 2,
            retryable: true,
            calls: AtomicU32::new(0),
        });
        let store = RetryStore::new(flaky.clone(), policy());
        let key = ObjectKey::parse("a").unwrap();
        assert_eq!(store.stat(&key).await.unwrap().size, 1);
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_stop_after_the_last_attempt() {
        let flaky = Arc::new(Flaky {
            failures: 10,
            retryable: true,
            calls: AtomicU32::new(0),
        });
        let store = RetryStore::new(flaky.clone(), policy());
        let key = ObjectKey::parse("a").unwrap();
        assert!(store.stat(&key).await.unwrap_err().is_retryable());
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let flaky = Arc::new(Flaky {
            failures: 10,
            retryable: false,
            calls: AtomicU32::new(0),
        });
        let store = RetryStore::new(flaky.clone(), policy());
        let key = ObjectKey::parse("a").unwrap();
        assert!(store.stat(&key).await.is_err());
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
    }
}
