//! Helpers shared by the storage backends: error values, upload ids, the first bytes of
//! a put and the backoff loop of clean-ups. Nothing here talks to a server itself.

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use tracing::warn;

use super::ByteStream;
use crate::{Error, Result};

/// A storage error without a source error.
pub(crate) fn storage_msg(message: &str, retryable: bool) -> Error {
    Error::Storage {
        message: message.to_owned(),
        retryable,
        source: None,
    }
}

/// 16 hex digits, unique among concurrent uploads (or temporary files) of one store.
pub(crate) fn random_id() -> String {
    let mut buf = [0u8; 8];
    // Uniqueness is all that is needed: the clock is a fine fallback.
    if aws_lc_rs::rand::fill(&mut buf).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        return format!("{nanos:x}");
    }
    hex::encode(buf)
}

/// Runs a clean-up step up to `attempts` times, with exponential backoff (250 ms, doubling,
/// at most 30 s) while it fails; true when it succeeded. `what` and `key` name it in logs.
pub(crate) async fn with_backoff<F, Fut>(attempts: u32, what: &str, key: &str, mut step: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut delay = Duration::from_millis(250);
    for attempt in 1..=attempts {
        match step().await {
            Ok(()) => return true,
            Err(e) => {
                warn!(key, what, attempt, error = %e, "A storage clean-up did not succeed yet.");
            }
        }
        if attempt < attempts {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
    false
}

/// The start of a put's stream: the whole object when it ends within the limit (one plain
/// request), or more than the limit buffered (a multipart or segmented upload follows).
pub(crate) enum Head {
    Whole(Bytes),
    Partial(BytesMut),
}

/// Reads `data` until more than `limit` bytes are buffered or it ends.
pub(crate) async fn read_head(data: &mut ByteStream, limit: u64) -> Result<Head> {
    let mut buffer = BytesMut::new();
    while buffer.len() as u64 <= limit {
        match data.next().await {
            Some(chunk) => buffer.extend_from_slice(&chunk?),
            None => return Ok(Head::Whole(buffer.freeze())),
        }
    }
    Ok(Head::Partial(buffer))
}
