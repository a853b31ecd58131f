//! Logging: JSON lines on stderr, filtered by `PHOENIX_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, before anything logs.
///
/// # Errors
/// When the filter is malformed or a subscriber is already installed.
pub fn init(filter: &str) -> Result<(), crate::error::Error> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| crate::error::Error::Config(format!("PHOENIX_LOG {filter:?}: {e}")))?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| crate::error::Error::Config(format!("installing the logger: {e}")))
}
