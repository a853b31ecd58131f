//! The Phoenix broker: the OSB API, the operations that provision and bind, the state
//! store, supervision, and the `phoenix` command line (its backup commands included).
//!
//! `main` only wires telemetry, configuration and the [`startup::Application`]; all
//! behaviour lives here so that tests can build the application with port 0.

pub mod app_state;
pub mod backups;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod offline;
pub mod operability;
pub mod operations;
pub mod osb;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use error::{ApiError, Error};
