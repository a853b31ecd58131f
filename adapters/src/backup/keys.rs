//! The key hierarchy of backups.
//!
//! Every backup has its own random data key. It is wrapped (sealed with AES-256-GCM) by
//! the instance's key, and the instance key is wrapped by the broker's master key; both
//! wrapped values travel in the backup's header, so the master key alone decrypts a
//! downloaded backup offline. Optionally the data key is also wrapped by a key derived
//! from the instance's passphrase (Argon2id, parameters and salt in the header), so the
//! passphrase alone decrypts it too. Each wrapping is bound to its instance and backup
//! IDs, so a wrapped key moved to another backup does not open there.
//!
//! A clear key never leaves memory: never storage, logs, errors or command lines.
//! `Debug` of every type here prints no key material.

use std::fmt;

use argon2::{Algorithm, Argon2, Params, Version};
use aws_lc_rs::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use crate::ids::{BackupId, InstanceId};
use crate::keys::{KEY_LEN, MasterKey, SecretKey, random_bytes};
use crate::{Error, Result};

/// Length of a passphrase salt.
pub const SALT_LEN: usize = 16;

/// A short, non-secret fingerprint of a key: which key wrapped what, for error messages
/// and manifests. Derived by SHA-256 with a domain prefix, so it reveals nothing of the key.
pub fn key_id(key: &SecretKey) -> String {
    let mut input = b"phoenix key id v1\0".to_vec();
    input.extend_from_slice(key.expose_bytes());
    let hash = digest(&SHA256, &input);
    hex::encode(&hash.as_ref()[..8])
}

pub(crate) fn instance_key_context(instance: &InstanceId) -> Vec<u8> {
    format!("phoenix/instance-key/v1/{instance}").into_bytes()
}

pub(crate) fn data_key_context(instance: &InstanceId, backup: &BackupId) -> Vec<u8> {
    format!("phoenix/data-key/v1/{instance}/{backup}").into_bytes()
}

pub(crate) fn passphrase_data_key_context(instance: &InstanceId, backup: &BackupId) -> Vec<u8> {
    format!("phoenix/data-key/passphrase/v1/{instance}/{backup}").into_bytes()
}

fn passphrase_key_context(instance: &InstanceId) -> Vec<u8> {
    format!("phoenix/passphrase-key/v1/{instance}").into_bytes()
}

/// A key from opened key bytes.
pub(crate) fn secret_key_from(bytes: &[u8]) -> Result<SecretKey> {
    let bytes: [u8; KEY_LEN] = bytes
        .try_into()
        .map_err(|_| Error::Integrity("a wrapped key has the wrong length".into()))?;
    Ok(SecretKey::from_bytes(bytes))
}

/// An instance's backup key, with its wrapped (sealed by the master key) form that the
/// broker persists per instance.
pub struct InstanceKey {
    instance: InstanceId,
    key: SecretKey,
    sealed: Vec<u8>,
    master_key_id: String,
}

impl fmt::Debug for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceKey")
            .field("instance", &self.instance)
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl InstanceKey {
    /// A fresh random key for `instance`, wrapped by `master`.
    ///
    /// # Errors
    /// When the random generator or the cipher fails.
    pub fn generate(master: &MasterKey, instance: &InstanceId) -> Result<Self> {
        let key = SecretKey::generate()?;
        let sealed = master
            .key()
            .seal(&instance_key_context(instance), key.expose_bytes())?;
        Ok(Self {
            instance: instance.clone(),
            key,
            sealed,
            master_key_id: key_id(master.key()),
        })
    }

    /// The key of `instance` from its wrapped form.
    ///
    /// # Errors
    /// [`Error::WrongKey`] when `master` is not the key that wrapped it or the wrapped
    /// value belongs to another instance; [`Error::Integrity`] for a damaged value.
    pub fn open(master: &MasterKey, instance: &InstanceId, sealed: &[u8]) -> Result<Self> {
        let bytes = master.key().open(&instance_key_context(instance), sealed)?;
        Ok(Self {
            instance: instance.clone(),
            key: secret_key_from(&bytes)?,
            sealed: sealed.to_vec(),
            master_key_id: key_id(master.key()),
        })
    }

    /// The wrapped form to persist (safe to store: useless without the master key).
    pub fn sealed(&self) -> &[u8] {
        &self.sealed
    }

    /// The instance this key belongs to.
    pub fn instance(&self) -> &InstanceId {
        &self.instance
    }

    /// The key's fingerprint.
    pub fn id(&self) -> String {
        key_id(&self.key)
    }

    /// The fingerprint of the master key that wrapped it.
    pub fn master_key_id(&self) -> &str {
        &self.master_key_id
    }

    pub(crate) fn key(&self) -> &SecretKey {
        &self.key
    }
}

/// Argon2id cost parameters, recorded in every backup header that uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Parallelism.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: about a second on a small server, as OWASP suggests.
    fn default() -> Self {
        Self {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

/// Largest Argon2id memory a reader accepts (KiB): 256 MiB.
pub const MAX_KDF_MEMORY_KIB: u32 = 256 * 1024;
/// Smallest Argon2id memory accepted (KiB): 8 MiB.
pub const MIN_KDF_MEMORY_KIB: u32 = 8 * 1024;
/// Most Argon2id passes accepted.
pub const MAX_KDF_PASSES: u32 = 10;
/// Most Argon2id lanes accepted.
pub const MAX_KDF_LANES: u32 = 4;

impl KdfParams {
    /// Refuses parameters a hostile header could use to exhaust memory or time: the
    /// header is untrusted until its key opened, and the key derivation comes first.
    ///
    /// # Errors
    /// [`Error::Invalid`] outside 8 to 256 MiB of memory, 1 to 10 passes, 1 to 4 lanes.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_KDF_MEMORY_KIB..=MAX_KDF_MEMORY_KIB).contains(&self.m_cost_kib)
            || !(1..=MAX_KDF_PASSES).contains(&self.t_cost)
            || !(1..=MAX_KDF_LANES).contains(&self.p_cost)
        {
            return Err(Error::Invalid(format!(
                "Argon2id parameters refused: {} KiB of memory, {} passes, {} lanes \
                 (accepted: 8 to 256 MiB of memory, 1 to {MAX_KDF_PASSES} passes, 1 to {MAX_KDF_LANES} lanes)",
                self.m_cost_kib, self.t_cost, self.p_cost
            )));
        }
        Ok(())
    }
}

/// A key derived from an instance's passphrase (Argon2id), which can also unwrap that
/// instance's backups.
pub struct PassphraseKey {
    params: KdfParams,
    salt: [u8; SALT_LEN],
    kek: SecretKey,
}

impl fmt::Debug for PassphraseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassphraseKey")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl PassphraseKey {
    /// Derives a key from `passphrase` with a fresh random salt. CPU- and memory-heavy:
    /// call it from a blocking thread.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty passphrase or parameters out of range.
    pub fn derive(passphrase: &str, params: KdfParams) -> Result<Self> {
        let mut salt = [0u8; SALT_LEN];
        random_bytes(&mut salt)?;
        Self::derive_with_salt(passphrase, params, salt)
    }

    pub(crate) fn derive_with_salt(
        passphrase: &str,
        params: KdfParams,
        salt: [u8; SALT_LEN],
    ) -> Result<Self> {
        if passphrase.is_empty() {
            return Err(Error::Invalid("the passphrase is empty".into()));
        }
        params.validate()?;
        let argon_params = Params::new(
            params.m_cost_kib,
            params.t_cost,
            params.p_cost,
            Some(KEY_LEN),
        )
        .map_err(|e| Error::Invalid(format!("Argon2id parameters: {e}")))?;
        let mut kek = [0u8; KEY_LEN];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params)
            .hash_password_into(passphrase.as_bytes(), &salt, &mut kek)
            .map_err(|e| Error::Invalid(format!("Argon2id: {e}")))?;
        Ok(Self {
            params,
            salt,
            kek: SecretKey::from_bytes(kek),
        })
    }

    /// The cost parameters.
    pub fn params(&self) -> KdfParams {
        self.params
    }

    pub(crate) fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    pub(crate) fn key(&self) -> &SecretKey {
        &self.kek
    }

    /// This key sealed by the master key for `instance`, so that scheduled backups can
    /// wrap data keys for the passphrase without asking for it again.
    ///
    /// # Errors
    /// When the cipher fails.
    pub fn seal(&self, master: &MasterKey, instance: &InstanceId) -> Result<Vec<u8>> {
        let mut plain = Vec::with_capacity(SALT_LEN + 12 + KEY_LEN);
        plain.extend_from_slice(&self.salt);
        plain.extend_from_slice(&self.params.m_cost_kib.to_be_bytes());
        plain.extend_from_slice(&self.params.t_cost.to_be_bytes());
        plain.extend_from_slice(&self.params.p_cost.to_be_bytes());
        plain.extend_from_slice(self.kek.expose_bytes());
        master.key().seal(&passphrase_key_context(instance), &plain)
    }

    /// Opens what [`seal`](Self::seal) produced.
    ///
    /// # Errors
    /// [`Error::WrongKey`] for another master key or instance; [`Error::Integrity`] for a
    /// damaged value.
    pub fn open_sealed(master: &MasterKey, instance: &InstanceId, sealed: &[u8]) -> Result<Self> {
        let plain = master
            .key()
            .open(&passphrase_key_context(instance), sealed)?;
        if plain.len() != SALT_LEN + 12 + KEY_LEN {
            return Err(Error::Integrity(
                "a sealed passphrase key has the wrong length".into(),
            ));
        }
        let (salt, rest) = plain.split_at(SALT_LEN);
        let (costs, kek) = rest.split_at(12);
        let word = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&costs[i * 4..i * 4 + 4]);
            u32::from_be_bytes(b)
        };
        let mut salt_bytes = [0u8; SALT_LEN];
        salt_bytes.copy_from_slice(salt);
        Ok(Self {
            params: KdfParams {
                m_cost_kib: word(0),
                t_cost: word(1),
                p_cost: word(2),
            },
            salt: salt_bytes,
            kek: secret_key_from(kek)?,
        })
    }
}

/// The keys a backup is written with.
#[derive(Debug)]
pub struct BackupKeys {
    /// The instance's key (required).
    pub instance: InstanceKey,
    /// The instance's passphrase key, when the instance has a passphrase.
    pub passphrase: Option<PassphraseKey>,
}

/// What opens a backup: the master key, or the instance's passphrase.
pub enum KeySource<'a> {
    /// The broker's master key (the header carries the wrapped instance key).
    Master(&'a MasterKey),
    /// The instance's passphrase.
    Passphrase(&'a str),
}

impl fmt::Debug for KeySource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Master(_) => f.write_str("KeySource::Master(..)"),
            Self::Passphrase(_) => f.write_str("KeySource::Passphrase(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap()
    }

    fn cheap_params() -> KdfParams {
        KdfParams {
            m_cost_kib: 8 * 1024,
            t_cost: 1,
            p_cost: 1,
        }
    }

    #[test]
    fn an_instance_key_opens_only_with_its_master_key_and_instance() {
        let a = InstanceId::parse("a").unwrap();
        let key = InstanceKey::generate(&master(), &a).unwrap();
        let again = InstanceKey::open(&master(), &a, key.sealed()).unwrap();
        assert_eq!(key.id(), again.id());
        let b = InstanceId::parse("b").unwrap();
        assert!(matches!(
            InstanceKey::open(&master(), &b, key.sealed()),
            Err(Error::WrongKey)
        ));
        let other = MasterKey::from_base64("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        assert!(matches!(
            InstanceKey::open(&other, &a, key.sealed()),
            Err(Error::WrongKey)
        ));
        assert!(!format!("{key:?}").contains(&hex::encode(key.key().expose_bytes())));
    }

    #[test]
    fn a_passphrase_key_is_reproducible_from_its_salt_and_survives_sealing() {
        let a = InstanceId::parse("a").unwrap();
        let key = PassphraseKey::derive("correct horse", cheap_params()).unwrap();
        let again =
            PassphraseKey::derive_with_salt("correct horse", cheap_params(), *key.salt()).unwrap();
        assert_eq!(key.key().expose_bytes(), again.key().expose_bytes());
        let wrong =
            PassphraseKey::derive_with_salt("wrong horse", cheap_params(), *key.salt()).unwrap();
        assert_ne!(key.key().expose_bytes(), wrong.key().expose_bytes());
        let sealed = key.seal(&master(), &a).unwrap();
        let opened = PassphraseKey::open_sealed(&master(), &a, &sealed).unwrap();
        assert_eq!(opened.key().expose_bytes(), key.key().expose_bytes());
        assert_eq!(opened.params(), cheap_params());
    }

    #[test]
    fn hostile_kdf_parameters_are_refused() {
        let huge = KdfParams {
            m_cost_kib: u32::MAX,
            t_cost: 1,
            p_cost: 1,
        };
        assert!(PassphraseKey::derive("x", huge).is_err());
    }

    #[test]
    fn kdf_parameters_above_the_documented_maximum_are_refused_with_a_clear_error() {
        let ok = KdfParams {
            m_cost_kib: MAX_KDF_MEMORY_KIB,
            t_cost: MAX_KDF_PASSES,
            p_cost: MAX_KDF_LANES,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            KdfParams {
                m_cost_kib: 1024 * 1024,
                ..ok
            },
            KdfParams { t_cost: 16, ..ok },
            KdfParams { p_cost: 16, ..ok },
            KdfParams {
                m_cost_kib: 1024,
                ..ok
            },
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains("Argon2id parameters refused"), "{err}");
            assert!(err.contains("256 MiB"), "{err}");
        }
    }
}
