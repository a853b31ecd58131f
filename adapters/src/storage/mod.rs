//! Storage outputs: where backups live (local disk, S3, OpenStack Swift).
//!
//! Every backend implements [`Store`] and passes the same conformance suite
//! (`adapters/tests/adapters/storage_conformance.rs`). Retries and metrics are wrappers
//! around a backend, never code inside one. Keys are [`ObjectKey`]s, built from validated
//! IDs only: no user string ever becomes a path or an object name.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;

use crate::{Error, Result};

mod common;
pub mod local;
pub mod metrics;
pub mod retry;
pub mod s3;
pub mod swift;

/// A stream of bytes that carries its failure: a producer that fails ends the stream with
/// an `Err`, never with a clean end.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

const MAX_KEY_LEN: usize = 1024;

/// A storage object's name: `/`-separated segments of RFC 3986 unreserved characters,
/// none of them empty, `.` or `..`. Safe as a relative path and as a URL path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Parses and validates a key.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty or over-long key, or a bad segment.
    pub fn parse(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Error::Invalid(format!(
                "an object key must be 1 to {MAX_KEY_LEN} bytes long"
            )));
        }
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'))
        };
        if !key.split('/').all(segment_ok) {
            return Err(Error::Invalid(format!("{key:?} is not a valid object key")));
        }
        Ok(Self(key))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This key with `segment` appended (`a/b` + `c` = `a/b/c`).
    ///
    /// # Errors
    /// When the segment is not a valid key segment.
    pub fn join(&self, segment: &str) -> Result<Self> {
        Self::parse(format!("{}/{segment}", self.0))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a backend knows of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: ObjectKey,
    /// Size in bytes of the stored object.
    pub size: u64,
    /// When the object was last written, where the backend says.
    pub modified: Option<DateTime<Utc>>,
}

/// A storage backend.
///
/// # Contract
/// - `put` MUST consume `data` to its end and MUST make the object visible (to `get`,
///   `stat` and `list`) only when every byte is durably stored. If `data` yields an
///   `Err`, or the backend fails, `put` MUST return an error and MUST leave nothing
///   visible under `key` and no partial data behind (temporary files, multipart uploads,
///   Swift segments): it cleans up before it returns.
/// - `put` MUST NOT buffer more than a bounded amount of `data` in memory (a part or a
///   segment buffer at most), whatever the object's size, and MUST NOT write temporary
///   files outside the backend's own storage.
/// - `get` returns a stream of the object's bytes; a failure while reading ends the
///   stream with an `Err`.
/// - `list` returns every object whose key starts with `prefix` (a plain string prefix),
///   in key order, never an incomplete one.
/// - `delete` of an object that does not exist succeeds (deletion is idempotent), and it
///   removes everything the object consists of (segments, parts).
/// - A missing object is reported as an error for which `is_not_found()` is true;
///   transient failures set `is_retryable()`.
///
/// # Cancellation
/// Dropping a `put` future before it completes MUST NOT leave a visible object; a
/// backend that holds server-side state (a multipart upload, segments) starts its
/// clean-up in a background task when dropped.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Stores `data` under `key`, returning the number of bytes stored.
    async fn put(&self, key: &ObjectKey, data: ByteStream) -> Result<u64>;

    /// Reads the object under `key` as a stream.
    async fn get(&self, key: &ObjectKey) -> Result<ByteStream>;

    /// Describes the object under `key`.
    async fn stat(&self, key: &ObjectKey) -> Result<ObjectInfo>;

    /// Lists the complete objects whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Deletes the object under `key` and everything it consists of.
    async fn delete(&self, key: &ObjectKey) -> Result<()>;
}

/// Finds and removes the server-side pieces of puts that never finished: multipart
/// uploads, Swift segments, temporary files. A put cleans up after itself, even when
/// dropped; these pieces remain only when the process was killed or the server was
/// unreachable for the whole clean-up.
///
/// # Contract
/// - `leftovers` MUST list every piece of an unfinished put under `prefix` (the key
///   prefix the put was given), and nothing that belongs to a complete object.
/// - `sweep` MUST remove only pieces older than `older_than`, so that it never breaks a
///   put that another process is running; it returns how many it removed.
#[async_trait::async_trait]
pub trait Sweep: Send + Sync + fmt::Debug {
    /// Names of the pieces of unfinished puts under `prefix`.
    async fn leftovers(&self, prefix: &str) -> Result<Vec<String>>;

    /// Removes pieces of unfinished puts under `prefix` older than `older_than`.
    async fn sweep(&self, prefix: &str, older_than: std::time::Duration) -> Result<usize>;
}

/// Where backups are stored: a closed serde enum tagged by `type` (contract of the broker
/// configuration and the catalog). Secrets in it are redacted from `Debug`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// A directory on local disk.
    Local { path: std::path::PathBuf },
    /// An S3 bucket (AWS or S3-compatible).
    S3 {
        bucket: String,
        region: String,
        /// An S3-compatible endpoint URL; AWS when absent.
        #[serde(default)]
        endpoint: Option<String>,
        /// Path-style addressing, needed by most S3-compatible servers.
        #[serde(default)]
        path_style: bool,
        /// Static credentials; the default AWS chain when absent.
        #[serde(default)]
        access_key_id: Option<String>,
        #[serde(default)]
        secret_access_key: Option<String>,
        #[serde(default)]
        prefix: Option<String>,
        /// First multipart part size in bytes (default 8 MiB, at least 5 MiB).
        #[serde(default)]
        part_size: Option<u64>,
    },
    /// An OpenStack Swift container.
    Swift {
        auth_url: String,
        auth: SwiftAuthConfig,
        container: String,
        #[serde(default)]
        prefix: Option<String>,
        /// Segment size in bytes of large objects (default 1 GiB, at least 1 MiB).
        #[serde(default)]
        segment_size: Option<u64>,
    },
}

/// Swift authentication, tagged by `type`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SwiftAuthConfig {
    Tempauth {
        user: String,
        key: String,
    },
    Keystone {
        username: String,
        password: String,
        project: String,
        domain: String,
    },
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local { path } => f.debug_struct("Local").field("path", path).finish(),
            Self::S3 {
                bucket,
                region,
                endpoint,
                path_style,
                access_key_id,
                prefix,
                part_size,
                ..
            } => f
                .debug_struct("S3")
                .field("bucket", bucket)
                .field("region", region)
                .field("endpoint", endpoint)
                .field("path_style", path_style)
                .field("access_key_id", access_key_id)
                .field("prefix", prefix)
                .field("part_size", part_size)
                .finish_non_exhaustive(),
            Self::Swift {
                auth_url,
                auth,
                container,
                prefix,
                segment_size,
            } => f
                .debug_struct("Swift")
                .field("auth_url", auth_url)
                .field("auth", &swift::SwiftAuth::from(auth.clone()))
                .field("container", container)
                .field("prefix", prefix)
                .field("segment_size", segment_size)
                .finish(),
        }
    }
}

impl fmt::Debug for SwiftAuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&swift::SwiftAuth::from(self.clone()), f)
    }
}

impl From<SwiftAuthConfig> for swift::SwiftAuth {
    fn from(auth: SwiftAuthConfig) -> Self {
        match auth {
            SwiftAuthConfig::Tempauth { user, key } => Self::Tempauth { user, key },
            SwiftAuthConfig::Keystone {
                username,
                password,
                project,
                domain,
            } => Self::Keystone {
                username,
                password,
                project,
                domain,
            },
        }
    }
}

impl StorageConfig {
    /// The backend's name in metrics and logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Local { .. } => "local",
            Self::S3 { .. } => "s3",
            Self::Swift { .. } => "swift",
        }
    }

    /// Builds the backend alone, without the retry and metrics wrappers (tests, sweeps).
    ///
    /// # Errors
    /// [`Error::Invalid`] for unusable settings; an I/O error when a local root cannot be
    /// created. Remote backends are not contacted here.
    pub async fn build_backend(&self) -> Result<Backend> {
        match self {
            Self::Local { path } => Ok(Backend::Local(Arc::new(local::LocalStore::new(path)?))),
            Self::S3 {
                bucket,
                region,
                endpoint,
                path_style,
                access_key_id,
                secret_access_key,
                prefix,
                part_size,
            } => {
                let credentials = match (access_key_id, secret_access_key) {
                    (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
                    (None, None) => None,
                    _ => {
                        return Err(Error::Invalid(
                            "S3 storage needs both access_key_id and secret_access_key, or neither"
                                .to_owned(),
                        ));
                    }
                };
                let part_size = match part_size {
                    Some(size) => usize::try_from(*size)
                        .map_err(|_| Error::Invalid("the S3 part size is too large".to_owned()))?,
                    None => s3::DEFAULT_PART_SIZE,
                };
                let store = s3::S3Store::new(s3::S3Settings {
                    bucket: bucket.clone(),
                    region: region.clone(),
                    endpoint: endpoint.clone(),
                    path_style: *path_style,
                    credentials,
                    prefix: prefix.clone().unwrap_or_default(),
                    part_size,
                    idle_timeout: s3::DEFAULT_IDLE_TIMEOUT,
                })
                .await?;
                Ok(Backend::S3(Arc::new(store)))
            }
            Self::Swift {
                auth_url,
                auth,
                container,
                prefix,
                segment_size,
            } => {
                let store = swift::SwiftStore::new(swift::SwiftSettings {
                    auth_url: auth_url.clone(),
                    auth: auth.clone().into(),
                    container: container.clone(),
                    prefix: prefix.clone().unwrap_or_default(),
                    segment_size: segment_size.unwrap_or(swift::DEFAULT_SEGMENT_SIZE),
                    idle_timeout: swift::DEFAULT_IDLE_TIMEOUT,
                })?;
                Ok(Backend::Swift(Arc::new(store)))
            }
        }
    }

    /// Builds the store: the backend wrapped with retries and metrics.
    ///
    /// # Errors
    /// As [`StorageConfig::build_backend`].
    pub async fn build(&self) -> Result<Arc<dyn Store>> {
        Ok(self.build_with_sweeper().await?.0)
    }

    /// Builds the store as [`build`](Self::build) does, with the backend's sweeper of
    /// unfinished puts (one connection set for both).
    ///
    /// # Errors
    /// As [`StorageConfig::build_backend`].
    pub async fn build_with_sweeper(&self) -> Result<(Arc<dyn Store>, Arc<dyn Sweep>)> {
        let backend = self.build_backend().await?;
        let retrying = retry::RetryStore::new(backend.store(), retry::RetryPolicy::default());
        let store = Arc::new(metrics::MetricsStore::new(
            Arc::new(retrying),
            self.backend(),
        ));
        Ok((store, backend.sweeper()))
    }
}

/// A bare backend, for what only it can do (sweeping leftovers, creating a bucket).
#[derive(Debug, Clone)]
pub enum Backend {
    Local(Arc<local::LocalStore>),
    S3(Arc<s3::S3Store>),
    Swift(Arc<swift::SwiftStore>),
}

impl Backend {
    /// The backend as a plain store.
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Local(s) => s.clone(),
            Self::S3(s) => s.clone(),
            Self::Swift(s) => s.clone(),
        }
    }

    /// The backend's leftovers finder.
    pub fn sweeper(&self) -> Arc<dyn Sweep> {
        match self {
            Self::Local(s) => s.clone(),
            Self::S3(s) => s.clone(),
            Self::Swift(s) => s.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_config_parses_the_documented_shapes() {
        let swift: StorageConfig = serde_json::from_value(serde_json::json!({
            "type": "swift", "auth_url": "http://127.0.0.1:8080/auth/v1.0",
            "auth": {"type": "tempauth", "user": "test:tester", "key": "hush"},
            "container": "backups"
        }))
        .unwrap();
        assert_eq!(swift.backend(), "swift");
        assert!(!format!("{swift:?}").contains("hush"), "a secret in Debug");
        let s3: StorageConfig = serde_json::from_value(serde_json::json!({
            "type": "s3", "bucket": "b", "region": "us-east-1", "path_style": true,
            "endpoint": "http://127.0.0.1:9000", "access_key_id": "id",
            "secret_access_key": "hush", "prefix": "phoenix/"
        }))
        .unwrap();
        assert!(!format!("{s3:?}").contains("hush"), "a secret in Debug");
        let local: StorageConfig =
            serde_json::from_value(serde_json::json!({"type": "local", "path": "/tmp/x"})).unwrap();
        assert_eq!(local.backend(), "local");
        assert!(
            serde_json::from_value::<StorageConfig>(serde_json::json!({"type": "ftp"})).is_err()
        );
        let typo = serde_json::json!({"type": "local", "path": "/tmp/x", "pth": "/tmp/y"});
        assert!(serde_json::from_value::<StorageConfig>(typo).is_err());
    }

    #[test]
    fn keys_are_relative_paths_that_cannot_escape() {
        assert!(ObjectKey::parse("backups/inst-1/b-2/data").is_ok());
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/./b", "a/b c", "a\\b", "ä",
        ] {
            assert!(ObjectKey::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
