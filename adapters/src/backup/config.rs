//! The configuration of a backup pipeline: plain data (part of a plan in the catalog),
//! validated when the catalog loads and turned into running filters by one builder.
//!
//! A configuration never allocates anything; the runner allocates the queues from
//! `queue_bytes`, so memory is a property of the pipeline, not of each filter.

use serde::{Deserialize, Serialize};

use super::filter::Filter;
use super::filter::aead::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use super::filter::zstd::{MAX_LEVEL, WINDOW_LOG_MAX, ZstdCompress};
use super::format::{CompressionAlgorithm, ManifestCompression};
use crate::{Error, Result};

/// Compression of a backup (before encryption).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum CompressionConfig {
    /// zstd at `level` (1 to 19); `workers` > 0 uses zstd's multithreaded mode with that
    /// many extra threads.
    Zstd {
        #[serde(default = "default_level")]
        level: i32,
        #[serde(default)]
        workers: u32,
    },
    /// No compression (for data that is already compressed).
    None,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self::Zstd {
            level: default_level(),
            workers: 0,
        }
    }
}

fn default_level() -> i32 {
    3
}

fn default_chunk_size() -> u32 {
    1024 * 1024
}

fn default_queue_bytes() -> u32 {
    4 * 1024 * 1024
}

/// Most zstd worker threads a pipeline may ask for.
const MAX_WORKERS: u32 = 64;

/// Smallest queue accepted.
const MIN_QUEUE_BYTES: u32 = 4096;

/// Largest queue accepted.
const MAX_QUEUE_BYTES: u32 = 1024 * 1024 * 1024;

/// A backup pipeline's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    #[serde(default)]
    pub compression: CompressionConfig,
    /// Plaintext bytes per encrypted chunk (1 KiB to 16 MiB; default 1 MiB).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    /// Bound in bytes of each queue between two stages (default 4 MiB).
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            compression: CompressionConfig::default(),
            chunk_size: default_chunk_size(),
            queue_bytes: default_queue_bytes(),
        }
    }
}

impl PipelineConfig {
    /// Checks every value; call it where the configuration is loaded.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        if let CompressionConfig::Zstd { level, workers } = self.compression {
            if !(1..=MAX_LEVEL).contains(&level) {
                return Err(Error::Invalid(format!(
                    "compression.level must be 1 to {MAX_LEVEL}, not {level}"
                )));
            }
            if workers > MAX_WORKERS {
                return Err(Error::Invalid(format!(
                    "compression.workers must be at most {MAX_WORKERS}, not {workers}"
                )));
            }
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(Error::Invalid(format!(
                "chunk_size must be {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}, not {}",
                self.chunk_size
            )));
        }
        if !(MIN_QUEUE_BYTES..=MAX_QUEUE_BYTES).contains(&self.queue_bytes) {
            return Err(Error::Invalid(format!(
                "queue_bytes must be {MIN_QUEUE_BYTES} to {MAX_QUEUE_BYTES}, not {}",
                self.queue_bytes
            )));
        }
        Ok(())
    }

    /// The compression algorithm recorded in headers.
    pub(crate) fn compression_algorithm(&self) -> CompressionAlgorithm {
        match self.compression {
            CompressionConfig::Zstd { .. } => CompressionAlgorithm::Zstd,
            CompressionConfig::None => CompressionAlgorithm::None,
        }
    }

    /// What the manifest records about compression.
    pub(crate) fn manifest_compression(&self) -> Option<ManifestCompression> {
        match self.compression {
            CompressionConfig::Zstd { level, .. } => Some(ManifestCompression {
                algorithm: CompressionAlgorithm::Zstd,
                level: Some(level),
                window_log_max: Some(WINDOW_LOG_MAX),
            }),
            CompressionConfig::None => None,
        }
    }

    /// The compression filter, if any.
    pub(crate) fn build_compression(&self) -> Result<Option<Box<dyn Filter>>> {
        Ok(match self.compression {
            CompressionConfig::Zstd { level, workers } => Some(Box::new(ZstdCompress::new(
                level,
                workers,
                self.queue_bytes as usize,
            )?)),
            CompressionConfig::None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_means_the_defaults() {
        let config: PipelineConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, PipelineConfig::default());
        config.validate().unwrap();
    }

    #[test]
    fn a_plan_can_choose_level_workers_chunk_and_queue_sizes() {
        let config: PipelineConfig = serde_json::from_str(
            r#"{"compression":{"type":"zstd","level":1,"workers":2},"chunk_size":65536,"queue_bytes":1048576}"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.compression,
            CompressionConfig::Zstd {
                level: 1,
                workers: 2
            }
        );
    }

    #[test]
    fn out_of_range_and_unknown_settings_are_refused() {
        assert!(serde_json::from_str::<PipelineConfig>(r#"{"chunk":1}"#).is_err());
        assert!(
            serde_json::from_str::<PipelineConfig>(r#"{"compression":{"type":"gzip"}}"#).is_err()
        );
        let ultra: PipelineConfig =
            serde_json::from_str(r#"{"compression":{"type":"zstd","level":22}}"#).unwrap();
        assert!(ultra.validate().is_err());
        let tiny = PipelineConfig {
            queue_bytes: 1,
            ..PipelineConfig::default()
        };
        assert!(tiny.validate().is_err());
    }
}
