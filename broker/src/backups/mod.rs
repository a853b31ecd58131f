//! Backups of service instances: the backup API, the operations that take and restore
//! backups (and seed clones and forks), the API tokens of service keys, the scheduler
//! that starts scheduled backups and applies retention, what a client may ask of a policy
//! and which backups a policy lets go. Schedules and policies themselves are catalog
//! types ([`phoenix_catalog::Schedule`], [`phoenix_catalog::BackupPolicy`]), because a
//! plan's defaults are parsed with the catalog.

pub mod api;
pub mod policy;
pub mod retention;
pub mod run;
pub mod scheduler;
pub mod tokens;
