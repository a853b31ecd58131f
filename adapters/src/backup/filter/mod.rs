//! Filters: the transformations between a source and a storage output (compression,
//! encryption, digest) and back again for a restore.
//!
//! A filter is synchronous, CPU-bound code: the runner runs each one on its own blocking
//! thread, feeds it the upstream queue's buffers and hands what it emits to the
//! downstream queue, so a filter never allocates a queue and never blocks the async
//! runtime. A filter must never pass on data it has not checked when checking is its job
//! (decryption emits a chunk only after the chunk authenticated).

use std::fmt;

use bytes::Bytes;

use crate::Result;

pub mod aead;
pub mod digest;
pub mod zstd;

/// Where a filter puts its output; returns [`crate::Error::Cancelled`] once the pipeline
/// is cancelled, and the filter must then stop and return that error.
pub type Emit<'a> = dyn FnMut(Bytes) -> Result<()> + 'a;

/// A transformation of a byte stream.
///
/// # Contract
/// - [`process`](Filter::process) is called with every upstream buffer in order, then
///   [`finish`](Filter::finish) exactly once at the clean end of the input. A filter
///   MUST emit its output through `emit` in order and MUST NOT hold more than a bounded
///   amount of data (one chunk or one codec window) whatever the stream's length.
/// - A filter MUST NOT emit data it is meant to check before the check passed.
/// - `finish` MUST fail when the input ended where it could not end (a truncated
///   compressed frame, a missing final encrypted chunk).
/// - When the input ends with an upstream failure, `finish` is not called: the filter is
///   dropped.
///
/// # Errors
/// [`crate::Error::Integrity`] for data that is corrupt, tampered or truncated; any error
/// `emit` returned, unchanged.
///
/// # Cancellation
/// A filter is cancelled by being dropped (between calls) or by `emit` returning
/// [`crate::Error::Cancelled`]; it holds no resource that outlives it.
pub trait Filter: Send + fmt::Debug {
    /// A short name for progress and logs: `zstd`, `encrypt`, `digest`, ...
    fn name(&self) -> &'static str;

    /// Transforms one buffer of input.
    fn process(&mut self, input: Bytes, emit: &mut Emit<'_>) -> Result<()>;

    /// Flushes what is left at the clean end of the input.
    fn finish(&mut self, emit: &mut Emit<'_>) -> Result<()>;
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Runs `filter` over `input` cut into `piece`-sized buffers, collecting the output.
    pub(crate) fn run(filter: &mut dyn Filter, input: &[u8], piece: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut emit = |b: Bytes| {
            out.extend_from_slice(&b);
            Ok(())
        };
        for chunk in input.chunks(piece.max(1)) {
            filter.process(Bytes::copy_from_slice(chunk), &mut emit)?;
        }
        filter.finish(&mut emit)?;
        Ok(out)
    }
}
