//! The one error type of the adapters crate.
//!
//! Policy: every fallible function in this crate returns [`Result`]. A variant says what
//! kind of failure it is, so callers can decide (retry, 404, fail the operation) without
//! parsing messages; the message carries the detail an operator needs. Secrets never
//! appear in a message.

use std::time::Duration;

/// Everything that can go wrong in an adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file-system or pipe operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A child process (initdb, pg_dump, ...) exited unsuccessfully or was killed.
    #[error("{program} failed ({status}): {stderr}")]
    ProcessFailed {
        program: String,
        status: String,
        stderr: String,
    },

    /// A storage object does not exist.
    #[error("object {key} not found")]
    NotFound { key: String },

    /// A storage backend failed; `retryable` says whether the same call may succeed later.
    #[error("storage: {message}")]
    Storage {
        message: String,
        retryable: bool,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A cloud provider's API (EC2) refused or failed a call; `retryable` says whether the
    /// same call may succeed later.
    #[error("{service} {operation}: {message}")]
    Cloud {
        service: &'static str,
        operation: &'static str,
        message: String,
        retryable: bool,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// Stored data is not what was written: tampered, truncated, reordered or corrupt.
    #[error("integrity check failed: {0}")]
    Integrity(String),

    /// Decryption failed because the key or passphrase is not the one that encrypted.
    #[error("wrong key or passphrase")]
    WrongKey,

    /// An argument or configuration value is not acceptable.
    #[error("invalid: {0}")]
    Invalid(String),

    /// A data service refused or failed a request.
    #[error("{engine}: {message}")]
    Engine {
        engine: &'static str,
        message: String,
    },

    /// The work was cancelled because another stage failed or the caller gave up.
    #[error("cancelled")]
    Cancelled,

    /// Something did not happen within its deadline.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with the context of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the object or resource does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// True when repeating the same call may succeed (network trouble, throttling, 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage { retryable, .. } | Self::Cloud { retryable, .. } => *retryable,
            Self::Timeout { .. } => true,
            _ => false,
        }
    }
}
