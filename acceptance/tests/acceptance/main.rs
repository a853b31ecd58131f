//! Phoenix end to end: the real `phoenix` binary, driven over HTTP like a platform
//! (Cloud Foundry) would, with real PostgreSQL instances and both state stores
//! (`PHOENIX_TEST_STATE_STORE=sqlite|postgres`; `scripts/test` runs the suite with each).
//! These tests never use a test double and never touch servers they did not start.

mod backups;
mod bad_input;
mod bindings;
mod catalog;
mod cli;
mod crash;
mod data;
mod dataset;
mod harness;
mod headers;
mod instances;
mod operability;
mod osb;
mod replicas;
mod secrets;
mod snapshots;
mod snapshots_ebs;
