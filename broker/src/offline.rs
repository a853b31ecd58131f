//! Commands on a backup that need no running broker: `phoenix decrypt` turns a downloaded
//! data object (on stdin) back into the source's original stream (on stdout), and
//! `phoenix verify` checks a stored backup end to end without restoring it.
//!
//! Both read the configuration of `phoenix serve` (master key, storage). They never create
//! anything: a missing master key is an error here, never a new key, and nothing secret
//! is printed or taken from the command line (a passphrase comes from a file).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use phoenix_adapters::backup::{self, KeySource, Progress, VerifyReport};
use phoenix_adapters::ids::{BackupId, InstanceId};
use phoenix_adapters::keys::MasterKey;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::error::Error;

/// The key to decrypt with: the instance's passphrase, or the broker's master key.
enum Key {
    Master(MasterKey),
    Passphrase(String),
}

impl Key {
    fn load(settings: &Settings, passphrase_file: Option<&Path>) -> Result<Self, Error> {
        match passphrase_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                    context: format!("reading the passphrase file {}", path.display()),
                    source,
                })?;
                Ok(Self::Passphrase(
                    text.trim_end_matches(['\r', '\n']).to_owned(),
                ))
            }
            None => existing_master_key(settings).map(Self::Master),
        }
    }

    fn source(&self) -> KeySource<'_> {
        match self {
            Self::Master(key) => KeySource::Master(key),
            Self::Passphrase(text) => KeySource::Passphrase(text),
        }
    }
}

/// The configured master key, or the data directory's key file; never a new one.
fn existing_master_key(settings: &Settings) -> Result<MasterKey, Error> {
    if let Some(text) = &settings.master_key {
        return Ok(MasterKey::from_base64(&text.0)?);
    }
    let path = settings.data_dir.join("master.key");
    if !path.exists() {
        return Err(Error::Config(format!(
            "no master key: PHOENIX_MASTER_KEY is not set and {} does not exist \
             (use the broker's --config or PHOENIX_DATA_DIR, or --passphrase-file)",
            path.display()
        )));
    }
    Ok(MasterKey::load(&path)?)
}

/// `phoenix decrypt`: stdin (an encrypted data object) to stdout (the original stream).
/// Returns the number of bytes written. Only a successful return means the output is
/// complete and authentic; on error, what was written must be thrown away.
///
/// # Errors
/// A missing or wrong key, a damaged, truncated or reordered backup, or an I/O failure.
pub async fn decrypt(settings: &Settings, passphrase_file: Option<&Path>) -> Result<u64, Error> {
    let key = Key::load(settings, passphrase_file)?;
    let progress = Progress::new();
    let _bar = ProgressBarTask::start("decrypting", &progress);
    let report = backup::decrypt(
        tokio::io::stdin(),
        tokio::io::stdout(),
        key.source(),
        &progress,
        &CancellationToken::new(),
    )
    .await?;
    Ok(report.raw_bytes)
}

/// `phoenix verify`: the stored size and SHA-256 of a backup against its manifest and,
/// unless `without_key`, every chunk authenticated and decompressed to nowhere.
///
/// # Errors
/// A missing backup, a storage failure, or any mismatch or damage.
pub async fn verify(
    settings: &Settings,
    instance: &InstanceId,
    backup_id: &BackupId,
    passphrase_file: Option<&Path>,
    without_key: bool,
) -> Result<VerifyReport, Error> {
    let key = if without_key {
        None
    } else {
        Some(Key::load(settings, passphrase_file)?)
    };
    let store = settings.storage.build().await?;
    let manifest = backup::read_manifest(store.as_ref(), instance, backup_id).await?;
    let progress = Progress::new();
    let _bar = ProgressBarTask::start("verifying", &progress);
    Ok(backup::verify(
        Arc::clone(&store),
        &manifest,
        key.as_ref().map(Key::source),
        &progress,
        &CancellationToken::new(),
    )
    .await?)
}

/// A spinner on stderr with the bytes read so far; indicatif draws nothing when stderr
/// is not a terminal, so scripts see clean output.
struct ProgressBarTask {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressBarTask {
    fn start(what: &'static str, progress: &Progress) -> Self {
        let bar = ProgressBar::new_spinner().with_message(what);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}: {bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let progress = progress.clone();
        let ticking = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                let read = progress.snapshot().stages.first().map_or(0, |s| s.bytes);
                ticking.set_position(read);
                ticking.tick();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { bar, task }
    }
}

impl Drop for ProgressBarTask {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
