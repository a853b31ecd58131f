//! Acceptance tests live in tests/acceptance/.
