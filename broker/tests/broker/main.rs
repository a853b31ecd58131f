//! Integration tests of the broker: the state store on both backends, and the OSB API
//! of an application built in-process (port 0) on both backends.
//!
//! PostgreSQL tests need `PHOENIX_TEST_POSTGRES_URL` (a superuser URL; `scripts/testbed`
//! sets it) and fail without it. Each test gets a fresh database.

// Test helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

mod offline;
mod operations;
mod osb;
mod store;
mod support;
