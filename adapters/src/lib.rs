//! Phoenix adapters: everything that touches a data service, an infrastructure or a
//! storage backend, and the backup workflow that joins them.
//!
//! This crate knows nothing of HTTP servers, the OSB API or the state store: the broker
//! drives it. Every path, SQL identifier or storage key it builds comes from the
//! validated IDs in [`ids`], never from a user's string.

pub mod backup;
pub mod engine;
pub mod error;
pub mod ids;
pub mod infrastructure;
pub mod keys;
pub mod snapshot;
pub mod storage;

pub use error::{Error, Result};
