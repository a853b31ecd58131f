//! The broker's master key, and authenticated sealing of small secrets with it.
//!
//! The master key is the root of every key Phoenix holds: binding passwords in the state
//! store and the keys that wrap each backup's data key are sealed with it. It comes from
//! configuration (`PHOENIX_MASTER_KEY`, base64 of 32 bytes) or from a file created with
//! mode 0600 on first start. It is never logged, never written to backup storage and
//! never passed on a command line; `Debug` prints nothing of it.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::{Error, Result};

/// Length in bytes of every AES-256 key Phoenix uses.
pub const KEY_LEN: usize = 32;

/// First byte of a sealed secret; a new layout gets a new version.
const SEALED_VERSION: u8 = 1;

/// Fills `buf` from the operating system's secure random generator.
///
/// # Errors
/// [`Error::Invalid`] if the generator fails, which only a broken system does.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::Invalid("the system random generator failed".into()))
}

/// A 256-bit AES-GCM key that seals and opens small secrets (at most a few KiB).
pub struct SecretKey {
    key: LessSafeKey,
    bytes: [u8; KEY_LEN],
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A key from its raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        #[allow(clippy::expect_used)]
        let unbound =
            UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte key is valid for AES-256-GCM");
        Self {
            key: LessSafeKey::new(unbound),
            bytes,
        }
    }

    /// A fresh random key.
    ///
    /// # Errors
    /// When the system random generator fails.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; KEY_LEN];
        random_bytes(&mut bytes)?;
        Ok(Self::from_bytes(bytes))
    }

    /// The raw key bytes, for wrapping this key under another one.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// The key ready for AES-256-GCM, for the backup chunk cipher (built once, here).
    pub(crate) fn aead(&self) -> &LessSafeKey {
        &self.key
    }

    /// Encrypts and authenticates `plaintext`, binding it to `context` (for example
    /// `"binding:<id>"`), so a sealed value copied to another row does not open there.
    ///
    /// Layout: version (1 byte) | random nonce (12) | ciphertext | tag (16).
    ///
    /// # Errors
    /// When the random generator or the cipher fails.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let mut in_out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut in_out,
            )
            .map_err(|_| Error::Invalid("sealing a secret failed".into()))?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + in_out.len());
        sealed.push(SEALED_VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    /// Opens what [`seal`](Self::seal) produced with the same `context`.
    ///
    /// # Errors
    /// [`Error::WrongKey`] when the key or context differ or the value was altered;
    /// [`Error::Integrity`] when the value is too short or of an unknown version.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        let Some((&version, rest)) = sealed.split_first() else {
            return Err(Error::Integrity("sealed secret is empty".into()));
        };
        if version != SEALED_VERSION || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(Error::Integrity(
                "sealed secret has an unknown layout".into(),
            ));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| Error::Integrity("sealed secret has a bad nonce".into()))?;
        let mut in_out = ciphertext.to_vec();
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(context), &mut in_out)
            .map_err(|_| Error::WrongKey)?;
        Ok(plaintext.to_vec())
    }
}

/// The broker's master key.
#[derive(Debug)]
pub struct MasterKey(SecretKey);

impl MasterKey {
    /// The key from its base64 text (44 characters for 32 bytes).
    ///
    /// # Errors
    /// [`Error::Invalid`] when the text is not base64 of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| Error::Invalid("the master key is not valid base64".into()))?;
        let bytes: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| Error::Invalid(format!("the master key must be {KEY_LEN} bytes")))?;
        Ok(Self(SecretKey::from_bytes(bytes)))
    }

    /// Reads the key file at `path`; never creates it (`phoenix decrypt` must not leave a
    /// new, useless key behind).
    ///
    /// # Errors
    /// `is_not_found()`-style [`Error::Io`] when the file does not exist;
    /// [`Error::Invalid`] when it is readable by group or others (the fix is
    /// `chmod 600`) or holds no valid key.
    pub fn load(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let mode = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::Invalid(format!(
                "the master key file {} is readable by other users (mode {:o}); \
                 restrict it with `chmod 600 {}` and check who may have read it",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Self::from_base64(&text)
    }

    /// Reads the key file at `path` (as [`load`](Self::load)), or creates it (mode
    /// 0600) with a fresh random key when it does not exist. Returns the key and whether
    /// it was created now.
    ///
    /// Creation writes a temporary file beside it, syncs it, renames it into place and
    /// syncs the directory, so a crash leaves either no key file or a complete one, never
    /// an empty one. Of two processes creating it at once, the first rename wins and the
    /// other reads that key.
    ///
    /// # Errors
    /// As [`load`](Self::load); when the file cannot be created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool)> {
        match Self::load(path) {
            Ok(key) => return Ok((key, false)),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let key = SecretKey::generate()?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{} is not a file path", path.display())))?;
        let mut suffix = [0u8; 8];
        random_bytes(&mut suffix)?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
        let tmp = dir.join(tmp_name);
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(BASE64.encode(key.expose_bytes()).as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            // A hard link never replaces an existing file: a key another process created
            // meanwhile is kept, and this one is dropped.
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok((Self::load(path)?, false));
            }
            Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing the directory of {}", path.display()), e))?;
        Ok((Self(key), true))
    }

    /// The key as a [`SecretKey`] for sealing and opening.
    pub fn key(&self) -> &SecretKey {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_context() {
        let key = SecretKey::generate().unwrap();
        let sealed = key.seal(b"binding:a", b"s3cret").unwrap();
        assert_eq!(key.open(b"binding:a", &sealed).unwrap(), b"s3cret");
        assert!(matches!(
            key.open(b"binding:b", &sealed),
            Err(Error::WrongKey)
        ));
        let other = SecretKey::generate().unwrap();
        assert!(matches!(
            other.open(b"binding:a", &sealed),
            Err(Error::WrongKey)
        ));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            key.open(b"binding:a", &flipped),
            Err(Error::WrongKey)
        ));
    }

    #[test]
    fn the_key_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (first, created) = MasterKey::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created) = MasterKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.key().expose_bytes(), second.key().expose_bytes());
    }

    #[test]
    fn creating_the_key_file_leaves_no_temporary_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        MasterKey::load_or_create(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("master.key")]);
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (key, _) = MasterKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        for err in [
            MasterKey::load(&path).unwrap_err(),
            MasterKey::load_or_create(&path).unwrap_err(),
        ] {
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("chmod 600"), "{text}");
            assert!(!text.contains(&BASE64.encode(key.key().expose_bytes())));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = MasterKey::load(&path).unwrap();
        assert_eq!(loaded.key().expose_bytes(), key.key().expose_bytes());
    }

    #[test]
    fn loading_a_missing_key_file_fails_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let err = MasterKey::load(&path).unwrap_err();
        assert!(
            matches!(err, Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(!path.exists());
    }

    #[test]
    fn a_master_key_must_be_32_bytes_of_base64() {
        assert!(MasterKey::from_base64("not base64!").is_err());
        assert!(MasterKey::from_base64(&BASE64.encode([0u8; 16])).is_err());
        assert!(MasterKey::from_base64(&BASE64.encode([7u8; 32])).is_ok());
    }
}
