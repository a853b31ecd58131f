//! The people's CLI for backups and restores: `phoenix backup`, `phoenix restore` and
//! `phoenix policy` call one instance's Backup API on a running broker, with a service
//! key's token or the platform's credentials.
//!
//! [`access`] says where credentials come from, [`api`] is the typed HTTP client,
//! [`commands`] runs each command, [`download`] writes checked downloads, [`render`]
//! prints. Exit status: 0 done (or, with `--wait`, succeeded), 1 failed or refused, 2 a
//! command line or key file that cannot be used, 130 a download stopped by Ctrl-C.
//! Nothing here ever prints or logs a token or password.

pub mod access;
pub mod api;
pub mod commands;
pub mod download;
pub mod render;

use std::process::ExitCode;

use crate::cli::{BackupArgs, PolicyArgs, RestoreArgs};
use crate::error::Error;
use commands::Outcome;

/// `phoenix backup ...`; returns the exit status.
pub fn backup(args: &BackupArgs) -> ExitCode {
    execute(commands::backup(args))
}

/// `phoenix restore ...`; returns the exit status.
pub fn restore(args: &RestoreArgs) -> ExitCode {
    execute(commands::restore(args))
}

/// `phoenix policy ...`; returns the exit status.
pub fn policy(args: &PolicyArgs) -> ExitCode {
    execute(commands::policy(args))
}

fn execute(command: impl Future<Output = Result<Outcome, Error>>) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
        .and_then(|runtime| runtime.block_on(command));
    match outcome {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("phoenix: {error}");
            ExitCode::from(match error {
                Error::Usage(_) => 2,
                Error::Interrupted(_) => 130,
                _ => 1,
            })
        }
    }
}
