//! SHA-256 of the stored bytes, passed through unchanged.
//!
//! The digest covers exactly what storage holds (header and ciphertext), so anyone can
//! check a stored backup against its manifest without the key. On the way back it checks
//! the digest at the end of the stream; chunk authentication has already refused any
//! altered chunk by then, so this check catches what authentication cannot see, such as
//! a manifest paired with the wrong object.

use std::fmt;
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest::{Context, SHA256};
use bytes::Bytes;

use super::{Emit, Filter};
use crate::{Error, Result};

/// The result of a finished digest: lowercase hex SHA-256 and the byte count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestResult {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Bytes digested.
    pub bytes: u64,
}

/// Where a [`Digest`] filter leaves its result once it finished.
#[derive(Debug, Clone, Default)]
pub struct DigestHandle(Arc<Mutex<Option<DigestResult>>>);

impl DigestHandle {
    /// The result, once the filter finished.
    pub fn get(&self) -> Option<DigestResult> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Computes SHA-256 of the bytes passing through; optionally checks it at the end.
pub struct Digest {
    context: Context,
    bytes: u64,
    expected: Option<DigestResult>,
    handle: DigestHandle,
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Digest")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Digest {
    /// A digest that records its result in the returned handle; with `expected`, `finish`
    /// fails unless the stream had exactly that digest and length.
    pub fn new(expected: Option<DigestResult>) -> (Self, DigestHandle) {
        let handle = DigestHandle::default();
        (
            Self {
                context: Context::new(&SHA256),
                bytes: 0,
                expected,
                handle: handle.clone(),
            },
            handle,
        )
    }
}

impl Filter for Digest {
    fn name(&self) -> &'static str {
        "digest"
    }

    fn process(&mut self, input: Bytes, emit: &mut Emit<'_>) -> Result<()> {
        self.context.update(&input);
        self.bytes += input.len() as u64;
        emit(input)
    }

    fn finish(&mut self, _emit: &mut Emit<'_>) -> Result<()> {
        let context = std::mem::replace(&mut self.context, Context::new(&SHA256));
        let result = DigestResult {
            sha256: hex::encode(context.finish().as_ref()),
            bytes: self.bytes,
        };
        if let Some(expected) = &self.expected {
            if expected.bytes != result.bytes {
                return Err(Error::Integrity(format!(
                    "the stored object has {} bytes, the manifest says {}",
                    result.bytes, expected.bytes
                )));
            }
            if expected.sha256 != result.sha256 {
                return Err(Error::Integrity(format!(
                    "the stored object's SHA-256 is {}, the manifest says {}",
                    result.sha256, expected.sha256
                )));
            }
        }
        *self
            .handle
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::run;
    use super::*;

    #[test]
    fn the_digest_passes_data_through_and_matches_sha256() {
        let (mut d, handle) = Digest::new(None);
        assert_eq!(run(&mut d, b"abc", 1).unwrap(), b"abc");
        let result = handle.get().unwrap();
        assert_eq!(
            result.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(result.bytes, 3);
    }

    #[test]
    fn a_different_stream_fails_the_expected_digest() {
        let (mut d, handle) = Digest::new(None);
        run(&mut d, b"abc", 2).unwrap();
        let (mut check, _) = Digest::new(handle.get());
        assert!(matches!(
            run(&mut check, b"abd", 2),
            Err(Error::Integrity(_))
        ));
    }
}
