//! The `phoenix` command line: `serve` runs the broker; `decrypt` and `verify` work on
//! backups without a running broker, with the same configuration as `serve`; `backup`,
//! `restore` and `policy` are the people's commands, talking to a broker's Backup API
//! (see [`crate::client`]). No option ever takes a secret: tokens come from a key file,
//! passwords from the environment.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use phoenix_adapters::ids::{BackupId, InstanceId};

/// Phoenix: an Open Service Broker for data services, with backups.
#[derive(Debug, Parser)]
#[command(name = "phoenix", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `phoenix` is asked to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the broker (OSB API, workers, supervision).
    Serve(ServeArgs),
    /// Decrypts a downloaded backup: the encrypted data object on stdin, the original
    /// stream (e.g. a pg_dump archive) on stdout. Exits non-zero, and the output must be
    /// discarded, if the backup is damaged or the key is wrong.
    ///
    /// Example: phoenix decrypt --config phoenix.yaml < backup | pg_restore -d mydb
    Decrypt(DecryptArgs),
    /// Checks a stored backup end to end without restoring it: size and SHA-256 of the
    /// stored bytes against the manifest and, with the key, every chunk decrypted and
    /// decompressed.
    Verify(VerifyArgs),
    /// Creates, lists, shows, deletes and downloads an instance's backups, through the
    /// broker's Backup API.
    Backup(BackupArgs),
    /// Restores a backup into the instance (replacing its data), through the broker's
    /// Backup API.
    Restore(RestoreArgs),
    /// Shows or changes the instance's backup schedule and retention.
    Policy(PolicyArgs),
}

/// The configuration file option every subcommand shares.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// YAML configuration file; every key can be overridden by a PHOENIX_* variable.
    #[arg(long, short, env = "PHOENIX_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Options of `phoenix serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Options of `phoenix decrypt`.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Decrypt with the instance's backup passphrase, read from this file, instead of
    /// the broker's master key.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

/// Options of `phoenix verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The instance whose backup to check.
    #[arg(long)]
    pub instance: InstanceId,
    /// The backup to check.
    #[arg(long)]
    pub backup: BackupId,
    /// Use the instance's backup passphrase, read from this file, instead of the master key.
    #[arg(long, conflicts_with = "without_key")]
    pub passphrase_file: Option<PathBuf>,
    /// Check only the stored bytes (size and SHA-256); needs no key.
    #[arg(long)]
    pub without_key: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How the backup commands reach an instance, and how they print. One of `--key-file` or
/// `--broker-url` with `--instance` is needed; the client checks that (clap's `requires`
/// and `conflicts_with` do not see a global option given before the subcommand).
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// A service key created with {"backup_access": true}: the output of
    /// `cf service-key INSTANCE KEY`, its credentials JSON, or {"credentials": {...}};
    /// `-` reads it from stdin.
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The broker's URL, for the platform operator; the broker's credentials come from
    /// PHOENIX_BROKER_USERNAME and PHOENIX_BROKER_PASSWORD in the environment.
    #[arg(long, global = true, value_name = "URL")]
    pub broker_url: Option<String>,
    /// The instance, with --broker-url.
    #[arg(long, global = true, value_name = "ID")]
    pub instance: Option<InstanceId>,
    /// Print the broker's JSON (one document) instead of text; no progress bars.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Options of `phoenix backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: BackupCommand,
}

/// What `phoenix backup` does.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Starts a backup of the instance.
    Create {
        /// Wait until it finished, with a progress bar; exit 1 if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// Lists the instance's backups, newest first.
    List,
    /// Shows one backup.
    Show {
        /// The backup.
        id: BackupId,
    },
    /// Deletes a backup from storage and from the broker.
    Delete {
        /// The backup.
        id: BackupId,
    },
    /// Downloads a backup's stored data object (encrypted), checked against its size and
    /// SHA-256. Recover it offline with the master key or the instance's passphrase:
    /// `phoenix decrypt < FILE | pg_restore -d DATABASE` (or `pg_restore -l` to list it).
    Download {
        /// The backup.
        id: BackupId,
        /// Where to write it (default ID.backup); `-` writes to stdout. A file is written
        /// as FILE.partial and renamed only when complete and checked.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// Options of `phoenix restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The backup to restore (of this instance, or one this instance may read).
    pub backup_id: BackupId,
    /// Wait until it finished, with a progress bar; exit 1 if it failed.
    #[arg(long)]
    pub wait: bool,
}

/// Options of `phoenix policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// What `phoenix policy` does.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Shows the backup schedule and retention.
    Show,
    /// Changes the backup schedule or retention; what is not given stays as it is.
    Set(PolicySetArgs),
}

/// Options of `phoenix policy set`: at least one.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["schedule", "no_schedule", "keep_last", "max_age_days"])
))]
pub struct PolicySetArgs {
    /// Back up on this cron schedule (e.g. "0 3 * * *"; the broker checks it).
    #[arg(long, value_name = "CRON", conflicts_with = "no_schedule")]
    pub schedule: Option<String>,
    /// No scheduled backups (manual ones only).
    #[arg(long)]
    pub no_schedule: bool,
    /// Keep at most this many backups.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u64>,
    /// Delete backups older than this many days.
    #[arg(long, value_name = "N")]
    pub max_age_days: Option<u64>,
}
