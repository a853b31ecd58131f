//! AES-256-GCM in chunks, with the STREAM construction (Hoang, Reyhanitabar, Rogaway,
//! Vizar, "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance").
//!
//! Each chunk of `chunk_size` plaintext bytes is sealed with the nonce
//! `prefix (7 random bytes) || counter (u32 big-endian) || last (1 byte: 1 on the final
//! chunk, else 0)` and the whole header as associated data. The counter makes a reordered,
//! dropped or duplicated chunk fail; the last flag makes a stream cut at a chunk boundary
//! fail; the header as associated data makes any change of the header fail. Decryption
//! emits a chunk only after it authenticated, and fails at the end if the final chunk is
//! missing: it never passes on unauthenticated data.

use std::fmt;

use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
use bytes::Bytes;

use super::{Emit, Filter};
use crate::keys::SecretKey;
use crate::{Error, Result};

/// Bytes of authentication tag after each chunk.
pub const TAG_LEN: usize = 16;

/// Bytes of the random nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;

/// Smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 1024;

/// Largest chunk size accepted (a hostile header cannot make a reader buffer more).
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

/// The filter's own copy of the data key (filters run on their own threads).
fn own_key(key: &SecretKey) -> SecretKey {
    SecretKey::from_bytes(*key.expose_bytes())
}

fn nonce(prefix: &[u8; NONCE_PREFIX_LEN], counter: u32, last: bool) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    bytes[NONCE_PREFIX_LEN..NONCE_LEN - 1].copy_from_slice(&counter.to_be_bytes());
    bytes[NONCE_LEN - 1] = u8::from(last);
    Nonce::assume_unique_for_key(bytes)
}

fn check_chunk_size(chunk_size: u32) -> Result<usize> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(Error::Integrity(format!(
            "chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )));
    }
    Ok(chunk_size as usize)
}

/// Writes the header, then the plaintext sealed in chunks.
pub struct Encrypt {
    key: SecretKey,
    prefix: [u8; NONCE_PREFIX_LEN],
    counter: u32,
    chunk_size: usize,
    header: Option<Bytes>,
    aad: Bytes,
    buf: Vec<u8>,
}

impl fmt::Debug for Encrypt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encrypt")
            .field("chunk", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Encrypt {
    /// An encryptor with the data key, the complete header bytes (emitted first and
    /// authenticated with every chunk), the nonce prefix and the chunk size.
    ///
    /// # Errors
    /// When the chunk size is out of range.
    pub fn new(
        data_key: &SecretKey,
        header: Vec<u8>,
        prefix: [u8; NONCE_PREFIX_LEN],
        chunk_size: u32,
    ) -> Result<Self> {
        let chunk_size = check_chunk_size(chunk_size)?;
        let header = Bytes::from(header);
        Ok(Self {
            key: own_key(data_key),
            prefix,
            counter: 0,
            chunk_size,
            header: Some(header.clone()),
            aad: header,
            buf: Vec::with_capacity(chunk_size + TAG_LEN),
        })
    }

    fn emit_header(&mut self, emit: &mut Emit<'_>) -> Result<()> {
        match self.header.take() {
            Some(header) => emit(header),
            None => Ok(()),
        }
    }

    fn seal(&mut self, last: bool, emit: &mut Emit<'_>) -> Result<()> {
        let mut chunk = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(if last { 0 } else { self.chunk_size + TAG_LEN }),
        );
        self.key
            .aead()
            .seal_in_place_append_tag(
                nonce(&self.prefix, self.counter, last),
                Aad::from(&self.aad[..]),
                &mut chunk,
            )
            .map_err(|_| Error::Invalid("AES-256-GCM sealing failed".into()))?;
        self.counter = self.counter.checked_add(1).ok_or_else(|| {
            Error::Invalid("the stream has more chunks than the format can count".into())
        })?;
        emit(Bytes::from(chunk))
    }
}

impl Filter for Encrypt {
    fn name(&self) -> &'static str {
        "encrypt"
    }

    fn process(&mut self, input: Bytes, emit: &mut Emit<'_>) -> Result<()> {
        self.emit_header(emit)?;
        let mut input = &input[..];
        while !input.is_empty() {
            // A full chunk is sealed only once more data shows it is not the final one.
            if self.buf.len() == self.chunk_size {
                self.seal(false, emit)?;
            }
            let take = (self.chunk_size - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            input = &input[take..];
        }
        Ok(())
    }

    fn finish(&mut self, emit: &mut Emit<'_>) -> Result<()> {
        self.emit_header(emit)?;
        self.seal(true, emit)
    }
}

/// Checks the header, then opens the chunks and emits each plaintext once it
/// authenticated.
pub struct Decrypt {
    key: SecretKey,
    prefix: [u8; NONCE_PREFIX_LEN],
    counter: u32,
    sealed_size: usize,
    header: Vec<u8>,
    header_seen: usize,
    buf: Vec<u8>,
}

impl fmt::Debug for Decrypt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decrypt")
            .field("chunk", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Decrypt {
    /// A decryptor for a stream that starts with exactly `header` (already parsed by the
    /// caller, who unwrapped `data_key` from it).
    ///
    /// # Errors
    /// [`Error::Integrity`] when the chunk size is out of range.
    pub fn new(
        data_key: &SecretKey,
        header: Vec<u8>,
        prefix: [u8; NONCE_PREFIX_LEN],
        chunk_size: u32,
    ) -> Result<Self> {
        let chunk_size = check_chunk_size(chunk_size)?;
        Ok(Self {
            key: own_key(data_key),
            prefix,
            counter: 0,
            sealed_size: chunk_size + TAG_LEN,
            header,
            header_seen: 0,
            buf: Vec::with_capacity(chunk_size + TAG_LEN),
        })
    }

    fn open(&mut self, last: bool, emit: &mut Emit<'_>) -> Result<()> {
        let index = self.counter;
        let mut chunk = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(if last { 0 } else { self.sealed_size }),
        );
        // A failed open leaves the buffer unspecified; the final chunk is kept to tell a
        // missing final chunk from a damaged one.
        let copy = if last { chunk.clone() } else { Vec::new() };
        let opened = self
            .key
            .aead()
            .open_in_place(
                nonce(&self.prefix, index, last),
                Aad::from(&self.header[..]),
                &mut chunk,
            )
            .map(|plain| plain.len());
        let len = match opened {
            Ok(len) => len,
            Err(_) => {
                let mut copy = copy;
                let cut_at_boundary = last
                    && self
                        .key
                        .aead()
                        .open_in_place(
                            nonce(&self.prefix, index, false),
                            Aad::from(&self.header[..]),
                            &mut copy,
                        )
                        .is_ok();
                return Err(Error::Integrity(if cut_at_boundary {
                    format!(
                        "the backup is truncated: it ends after chunk {index} without its final chunk"
                    )
                } else {
                    format!(
                        "chunk {index} failed authentication: the backup is tampered, truncated, reordered or not this key's"
                    )
                }));
            }
        };
        self.counter = self.counter.checked_add(1).ok_or_else(|| {
            Error::Integrity("the backup has more chunks than the format can count".into())
        })?;
        chunk.truncate(len);
        if chunk.is_empty() {
            return Ok(());
        }
        emit(Bytes::from(chunk))
    }
}

impl Filter for Decrypt {
    fn name(&self) -> &'static str {
        "decrypt"
    }

    fn process(&mut self, input: Bytes, emit: &mut Emit<'_>) -> Result<()> {
        let mut input = &input[..];
        if self.header_seen < self.header.len() {
            let take = (self.header.len() - self.header_seen).min(input.len());
            if input[..take] != self.header[self.header_seen..self.header_seen + take] {
                return Err(Error::Integrity(
                    "the backup's header changed while reading it".into(),
                ));
            }
            self.header_seen += take;
            input = &input[take..];
        }
        while !input.is_empty() {
            if self.buf.len() == self.sealed_size {
                self.open(false, emit)?;
            }
            let take = (self.sealed_size - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            input = &input[take..];
        }
        Ok(())
    }

    fn finish(&mut self, emit: &mut Emit<'_>) -> Result<()> {
        if self.header_seen < self.header.len() {
            return Err(Error::Integrity(
                "the backup is truncated inside its header".into(),
            ));
        }
        if self.buf.len() < TAG_LEN {
            return Err(Error::Integrity(format!(
                "the backup is truncated: it ends after chunk {} without its final chunk",
                self.counter
            )));
        }
        self.open(true, emit)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::run;
    use super::*;

    const CHUNK: u32 = 1024;
    const SEALED: usize = CHUNK as usize + TAG_LEN;

    fn setup() -> (SecretKey, Vec<u8>, [u8; 7]) {
        (
            SecretKey::generate().unwrap(),
            b"HEADER-BYTES".to_vec(),
            [7u8; 7],
        )
    }

    fn encrypt(key: &SecretKey, header: &[u8], prefix: [u8; 7], data: &[u8]) -> Vec<u8> {
        let mut e = Encrypt::new(key, header.to_vec(), prefix, CHUNK).unwrap();
        run(&mut e, data, 700).unwrap()
    }

    fn decrypt(key: &SecretKey, header: &[u8], prefix: [u8; 7], stored: &[u8]) -> Result<Vec<u8>> {
        let mut d = Decrypt::new(key, header.to_vec(), prefix, CHUNK)?;
        run(&mut d, stored, 333)
    }

    #[test]
    fn chunks_round_trip_at_and_around_chunk_boundaries() {
        let (key, header, prefix) = setup();
        for len in [0, 1, 1023, 1024, 1025, 2048, 5000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let stored = encrypt(&key, &header, prefix, &data);
            let chunks =
                (len / CHUNK as usize) + usize::from(len % CHUNK as usize != 0 || len == 0);
            assert_eq!(
                stored.len(),
                header.len() + len + chunks * TAG_LEN,
                "len {len}"
            );
            assert_eq!(decrypt(&key, &header, prefix, &stored).unwrap(), data);
        }
    }

    #[test]
    fn a_dropped_final_chunk_is_reported_as_truncation() {
        let (key, header, prefix) = setup();
        let data = vec![1u8; 3000];
        let stored = encrypt(&key, &header, prefix, &data);
        let cut = &stored[..header.len() + 2 * SEALED];
        let err = decrypt(&key, &header, prefix, cut).unwrap_err();
        assert!(err.to_string().contains("without its final chunk"), "{err}");
    }

    #[test]
    fn a_reordered_chunk_fails_before_its_data_is_emitted() {
        let (key, header, prefix) = setup();
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let stored = encrypt(&key, &header, prefix, &data);
        let h = header.len();
        let mut swapped = stored[..h].to_vec();
        swapped.extend_from_slice(&stored[h + SEALED..h + 2 * SEALED]);
        swapped.extend_from_slice(&stored[h..h + SEALED]);
        swapped.extend_from_slice(&stored[h + 2 * SEALED..]);
        let mut d = Decrypt::new(&key, header.clone(), prefix, CHUNK).unwrap();
        let mut emitted = 0;
        let result = (|| {
            let mut emit = |b: Bytes| {
                emitted += b.len();
                Ok(())
            };
            d.process(Bytes::from(swapped), &mut emit)?;
            d.finish(&mut emit)
        })();
        assert!(matches!(result, Err(Error::Integrity(_))));
        assert_eq!(emitted, 0);
    }

    #[test]
    fn a_changed_header_fails_every_chunk() {
        let (key, header, prefix) = setup();
        let stored = encrypt(&key, &header, prefix, b"data");
        let mut other_header = header.clone();
        other_header[0] ^= 1;
        let mut altered = other_header.clone();
        altered.extend_from_slice(&stored[header.len()..]);
        assert!(decrypt(&key, &other_header, prefix, &altered).is_err());
    }
}
