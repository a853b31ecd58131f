//! The stored format of a backup: the data object's header, and the manifest.
//!
//! The data object is `header || chunk 0 || chunk 1 || ... || final chunk`; the header
//! is `MAGIC (8) || format version (1) || JSON length (u32 BE) || JSON`. The manifest is
//! a JSON object stored beside the data, written last; its presence is what makes a
//! backup exist. `docs/backup-format.md` documents both for an offline recovery; any
//! change here changes that document and the format version.
//!
//! The header holds only wrapped keys, never a clear one. Parsing refuses anything it does
//! not know (unknown fields, algorithms or versions) rather than guess.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::keys::{KdfParams, SALT_LEN};
use super::source::{SnapshotRef, SourceInfo};
use crate::ids::{BackupId, InstanceId};
use crate::storage::ByteStream;
use crate::{Error, Result};

/// First bytes of every Phoenix backup data object.
pub const MAGIC: &[u8; 8] = b"PHOENIXB";

/// Version of the binary framing (header prefix and chunk layout).
pub const FORMAT_VERSION: u8 = 1;

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

/// Upper bound of a header's JSON; a larger one is refused as hostile.
pub const MAX_HEADER_JSON: usize = 64 * 1024;

const PREFIX_LEN: usize = MAGIC.len() + 1 + 4;

/// The compression inside the encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionAlgorithm {
    /// zstd frames (window at most 2^23 bytes).
    Zstd,
    /// Stored as the source produced it.
    None,
}

/// The cipher of the chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// AES-256-GCM, 96-bit nonces, 128-bit tags.
    #[serde(rename = "AES-256-GCM")]
    Aes256Gcm,
}

/// How chunks are nonced and terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Construction {
    /// Hoang-Reyhanitabar-Rogaway-Vizar STREAM: nonce = 7-byte prefix || 32-bit
    /// big-endian chunk counter || last-chunk flag byte.
    #[serde(rename = "STREAM")]
    Stream,
}

/// The key derivation of a passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kdf {
    /// Argon2id, version 0x13, 32-byte output.
    Argon2id,
}

/// The encryption parameters in a header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEncryption {
    pub cipher: Cipher,
    pub construction: Construction,
    /// Plaintext bytes per chunk (the final chunk may hold fewer).
    pub chunk_size: u32,
    /// Hex of the 7-byte random nonce prefix.
    pub nonce_prefix: String,
}

/// The data key wrapped by a passphrase-derived key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassphraseWrap {
    pub kdf: Kdf,
    pub params: KdfParams,
    /// Base64 of the 16-byte salt.
    pub salt: String,
    /// Base64 of the sealed data key.
    pub data_key: String,
}

/// Wrapped keys in a header: enough to get the data key from the master key or from the
/// passphrase, nothing in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderKeys {
    /// Fingerprint of the master key that wrapped the instance key.
    pub master_key_id: String,
    /// Fingerprint of the instance key that wrapped the data key.
    pub instance_key_id: String,
    /// Base64 of the instance key sealed by the master key.
    pub instance_key: String,
    /// Base64 of the data key sealed by the instance key.
    pub data_key: String,
    /// The data key sealed by the passphrase key, when the instance has a passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<PassphraseWrap>,
}

/// The JSON part of a data object's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub instance_id: InstanceId,
    pub backup_id: BackupId,
    pub compression: CompressionAlgorithm,
    pub encryption: HeaderEncryption,
    pub keys: HeaderKeys,
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

pub(crate) fn unb64(what: &str, text: &str) -> Result<Vec<u8>> {
    BASE64
        .decode(text)
        .map_err(|_| Error::Integrity(format!("the header's {what} is not valid base64")))
}

impl Header {
    /// The complete header bytes: magic, version, length, JSON.
    ///
    /// # Errors
    /// When the JSON would exceed [`MAX_HEADER_JSON`].
    pub fn encode(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::Invalid(format!("encoding the backup header: {e}")))?;
        if json.len() > MAX_HEADER_JSON {
            return Err(Error::Invalid("the backup header is too large".into()));
        }
        let mut out = Vec::with_capacity(PREFIX_LEN + json.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        #[allow(clippy::cast_possible_truncation)]
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(&json);
        Ok(out)
    }

    /// Parses a header at the start of `bytes`: `Ok(None)` when more bytes are needed,
    /// else the header and its length in bytes.
    ///
    /// # Errors
    /// [`Error::Integrity`] for something that is not a Phoenix backup header, or of a
    /// version or algorithm this build does not know.
    pub fn parse_prefix(bytes: &[u8]) -> Result<Option<(Self, usize)>> {
        let magic_seen = bytes.len().min(MAGIC.len());
        if bytes[..magic_seen] != MAGIC[..magic_seen] {
            return Err(Error::Integrity(
                "not a Phoenix backup (the data does not start with PHOENIXB)".into(),
            ));
        }
        if bytes.len() < PREFIX_LEN {
            return Ok(None);
        }
        let version = bytes[MAGIC.len()];
        if version != FORMAT_VERSION {
            return Err(Error::Integrity(format!(
                "backup format version {version} is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[MAGIC.len() + 1..PREFIX_LEN]);
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_HEADER_JSON {
            return Err(Error::Integrity("the backup header is too large".into()));
        }
        let Some(json) = bytes.get(PREFIX_LEN..PREFIX_LEN + len) else {
            return Ok(None);
        };
        let header: Self = serde_json::from_slice(json)
            .map_err(|e| Error::Integrity(format!("the backup header is not valid: {e}")))?;
        Ok(Some((header, PREFIX_LEN + len)))
    }

    /// The 7-byte nonce prefix.
    ///
    /// # Errors
    /// [`Error::Integrity`] when it is not 7 bytes of hex.
    pub fn nonce_prefix(&self) -> Result<[u8; 7]> {
        hex::decode(&self.encryption.nonce_prefix)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                Error::Integrity("the header's nonce prefix is not 7 bytes of hex".into())
            })
    }

    /// The passphrase salt, when there is one.
    pub(crate) fn passphrase_salt(wrap: &PassphraseWrap) -> Result<[u8; SALT_LEN]> {
        unb64("salt", &wrap.salt)?
            .try_into()
            .map_err(|_| Error::Integrity("the header's salt has the wrong length".into()))
    }
}

/// Reads the start of `stream` until a complete header is parsed, and returns the
/// header, its bytes, and a stream that yields everything from the first byte again
/// (the header included) so that a digest sees the whole object.
///
/// # Errors
/// As [`Header::parse_prefix`]; [`Error::Integrity`] when the stream ends inside the
/// header; the stream's own error.
pub async fn peek_header(mut stream: ByteStream) -> Result<(Header, Vec<u8>, ByteStream)> {
    let mut seen = BytesMut::new();
    loop {
        if let Some((header, len)) = Header::parse_prefix(&seen)? {
            let header_bytes = seen[..len].to_vec();
            let replay = futures::stream::once(async move { Ok::<Bytes, Error>(seen.freeze()) });
            return Ok((header, header_bytes, Box::pin(replay.chain(stream))));
        }
        match stream.next().await {
            Some(Ok(data)) => seen.extend_from_slice(&data),
            Some(Err(e)) => return Err(e),
            None => {
                return Err(Error::Integrity(
                    "the backup ends inside its header (empty or truncated object)".into(),
                ));
            }
        }
    }
}

/// How the data of a backup can be got back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "lowercase", deny_unknown_fields)]
pub enum ManifestSource {
    /// The bytes are in the data object beside the manifest.
    Stream {
        /// Storage key of the data object.
        data_object: String,
    },
    /// A snapshot kept on its infrastructure.
    Reference {
        /// Where the snapshot is.
        snapshot: SnapshotRef,
    },
}

/// The digest of the stored data object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestDigest {
    /// Always `sha256`.
    pub algorithm: String,
    /// Lowercase hex.
    pub value: String,
}

/// Compression of a stored backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestCompression {
    pub algorithm: CompressionAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i32>,
    /// Decompressors refuse frames with a larger window (log2 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_log_max: Option<u32>,
}

/// Encryption of a stored backup (the wrapped keys are in the data object's header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEncryption {
    pub cipher: Cipher,
    pub construction: Construction,
    pub chunk_size: u32,
    pub master_key_id: String,
    pub instance_key_id: String,
    /// True when the passphrase of the instance also opens the backup.
    pub passphrase: bool,
}

/// The record of a complete backup, written last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest layout version.
    pub version: u32,
    pub backup_id: BackupId,
    pub instance_id: InstanceId,
    /// The source: strategy, engine, engine version, format.
    pub source_info: SourceInfo,
    /// Stream or reference, and where the data is.
    pub source: ManifestSource,
    pub created_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Bytes the source produced (for a reference: the snapshot size when known, else 0).
    pub raw_bytes: u64,
    /// Bytes of the stored data object (0 for a reference).
    pub stored_bytes: u64,
    /// SHA-256 of the stored data object (absent for a reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<ManifestDigest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<ManifestCompression>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ManifestEncryption>,
}

impl Manifest {
    /// The manifest as stored (pretty JSON, so an operator can read it).
    ///
    /// # Errors
    /// Never in practice; serialization errors are reported as [`Error::Invalid`].
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("encoding the manifest: {e}")))
    }

    /// Parses a stored manifest.
    ///
    /// # Errors
    /// [`Error::Integrity`] for anything but a manifest of a known version.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let manifest: Self = serde_json::from_slice(bytes)
            .map_err(|e| Error::Integrity(format!("the manifest is not valid: {e}")))?;
        if manifest.version != MANIFEST_VERSION {
            return Err(Error::Integrity(format!(
                "manifest version {} is not supported",
                manifest.version
            )));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            instance_id: InstanceId::parse("i").unwrap(),
            backup_id: BackupId::parse("b").unwrap(),
            compression: CompressionAlgorithm::Zstd,
            encryption: HeaderEncryption {
                cipher: Cipher::Aes256Gcm,
                construction: Construction::Stream,
                chunk_size: 4096,
                nonce_prefix: "00112233445566".into(),
            },
            keys: HeaderKeys {
                master_key_id: "m".into(),
                instance_key_id: "k".into(),
                instance_key: "AA==".into(),
                data_key: "AA==".into(),
                passphrase: None,
            },
        }
    }

    #[test]
    fn a_header_parses_from_any_prefix_length() {
        let bytes = header().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(Header::parse_prefix(&bytes[..cut]).unwrap().is_none());
        }
        let (parsed, len) = Header::parse_prefix(&bytes).unwrap().unwrap();
        assert_eq!(parsed, header());
        assert_eq!(len, bytes.len());
        assert_eq!(
            parsed.nonce_prefix().unwrap(),
            [0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66]
        );
    }

    #[test]
    fn something_else_than_a_backup_is_refused_at_once() {
        assert!(Header::parse_prefix(b"-- PostgreSQL dump").is_err());
        let mut bytes = header().encode().unwrap();
        bytes[8] = 9;
        assert!(
            Header::parse_prefix(&bytes)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
    }
}
