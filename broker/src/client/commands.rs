//! The people's commands: `phoenix backup ...`, `phoenix restore ...`,
//! `phoenix policy ...`, each a few calls to the [`BackupApi`] and their output.
//!
//! Results go to stdout (text, or the broker's JSON with `--json`); progress bars,
//! failures and hints go to stderr. A command that waits polls once a second and never
//! gives up on its own: the broker's operation is the one with a deadline.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_adapters::ids::BackupId;
use serde_json::{Value, json};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::access::Access;
use super::api::{Backup, BackupApi, Document, Restore, State};
use super::download::{self, Expected};
use super::render::{self, Bar};
use crate::cli::{
    BackupArgs, BackupCommand, ClientArgs, PolicyArgs, PolicyCommand, PolicySetArgs, RestoreArgs,
};
use crate::error::Error;

const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A key file is a few hundred bytes; anything this large is not one.
const MAX_KEY_FILE: u64 = 1024 * 1024;

/// How a command ended, when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or, without `--wait`, accepted).
    Done,
    /// The backup or restore waited for failed (exit status 1).
    Failed,
}

/// `phoenix backup ...`.
///
/// # Errors
/// [`Error::Usage`] for unusable access options or key file, the API's errors.
pub async fn backup(args: &BackupArgs) -> Result<Outcome, Error> {
    let json = args.client.json;
    let api = connect(&args.client)?;
    match &args.command {
        BackupCommand::Create { wait } => create_backup(&api, *wait, json).await,
        BackupCommand::List => {
            let list = api.list_backups().await?;
            print(json, &list.json, || {
                render::backup_table(&list.value.backups)
            });
            Ok(Outcome::Done)
        }
        BackupCommand::Show { id } => {
            let backup = api.backup(id).await?;
            print(json, &backup.json, || render::backup_details(&backup.value));
            Ok(Outcome::Done)
        }
        BackupCommand::Delete { id } => {
            let deleted = api.delete_backup(id).await?;
            print(json, &deleted.json, || match &deleted.value.description {
                None => format!("Backup {id} deleted.\n"),
                Some(later) => format!("Backup {id} deleted: {later}\n"),
            });
            Ok(Outcome::Done)
        }
        BackupCommand::Download { id, output } => {
            download_backup(&api, id, output.as_deref(), json).await
        }
    }
}

/// `phoenix restore BACKUP_ID [--wait]`.
///
/// # Errors
/// As [`backup`].
pub async fn restore(args: &RestoreArgs) -> Result<Outcome, Error> {
    let json = args.client.json;
    let api = connect(&args.client)?;
    let started = api.create_restore(&args.backup_id).await?;
    let id = started.value.restore_id;
    if !args.wait {
        print(json, &started.json, || {
            format!(
                "Restore {id} of backup {} into instance {} started ({}).\n",
                args.backup_id,
                api.instance(),
                started.value.state.as_str()
            )
        });
        return Ok(Outcome::Done);
    }
    // The bar fills up to the backup's stored size when this instance can see the
    // backup; a backup of another instance leaves it a counter.
    let total = if render::bars_visible(json) {
        api.backup(&args.backup_id)
            .await
            .ok()
            .and_then(|b| b.value.stored_bytes)
    } else {
        None
    };
    let bar = Bar::new(json, total, "restoring");
    let finished = wait_for_restore(&api, &id, &bar).await;
    drop(bar);
    let finished = finished.inspect_err(|_| {
        eprintln!(
            "The restore {id} may go on at the broker: GET {}/restores/{id} shows how it \
             ends.",
            api.instance_url()
        );
    })?;
    let restore = &finished.value;
    print(json, &finished.json, || render::restore_details(restore));
    Ok(report(
        restore.state,
        &format!("restore {id} of backup {}", restore.backup_id),
        restore.error.as_deref(),
    ))
}

/// `phoenix policy show|set`.
///
/// # Errors
/// As [`backup`]; a schedule the broker refuses is its 400 with its description.
pub async fn policy(args: &PolicyArgs) -> Result<Outcome, Error> {
    let json = args.client.json;
    let api = connect(&args.client)?;
    let policy = match &args.command {
        PolicyCommand::Show => api.policy().await?,
        // The broker merges a partial policy onto the current one (absent keeps, null
        // removes), so only the changes are sent: nothing read first can go stale.
        PolicyCommand::Set(change) => api.set_policy(&policy_change(change)).await?,
    };
    print(json, &policy.json, || render::policy_details(&policy.value));
    Ok(Outcome::Done)
}

/// The access the options describe, as a client.
fn connect(args: &ClientArgs) -> Result<BackupApi, Error> {
    let access = match (&args.key_file, &args.broker_url, &args.instance) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(Error::Usage(
                "--key-file and --broker-url/--instance exclude each other: give one".into(),
            ));
        }
        (Some(path), None, None) => {
            let (text, origin) = read_key_file(path)?;
            Access::from_service_key(&text, &origin)?
        }
        (None, Some(url), Some(instance)) => Access::from_broker(
            url,
            instance.clone(),
            std::env::var("PHOENIX_BROKER_USERNAME").ok(),
            std::env::var("PHOENIX_BROKER_PASSWORD").ok(),
        )?,
        (None, Some(_), None) => {
            return Err(Error::Usage("--broker-url needs --instance ID".into()));
        }
        (None, None, Some(_)) => {
            return Err(Error::Usage(
                "--instance needs --broker-url URL (or use --key-file)".into(),
            ));
        }
        (None, None, None) => {
            return Err(Error::Usage(
                "which instance? Give --key-file FILE (a service key created with \
                 {\"backup_access\": true}) or --broker-url URL --instance ID"
                    .into(),
            ));
        }
    };
    BackupApi::new(access)
}

/// The key file's text and how to name it in messages; `-` is stdin.
fn read_key_file(path: &Path) -> Result<(String, String), Error> {
    use std::io::Read as _;
    let (reader, origin): (Box<dyn std::io::Read>, String) = if path == Path::new("-") {
        (Box::new(std::io::stdin()), "the key on stdin".to_owned())
    } else {
        let file = std::fs::File::open(path).map_err(|e| {
            Error::Usage(format!("cannot read the key file {}: {e}", path.display()))
        })?;
        (Box::new(file), format!("the key file {}", path.display()))
    };
    let mut text = String::new();
    reader
        .take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(|e| Error::Usage(format!("cannot read {origin}: {e}")))?;
    Ok((text, origin))
}

async fn create_backup(api: &BackupApi, wait: bool, json: bool) -> Result<Outcome, Error> {
    let started = api.create_backup().await?;
    let id = started.value.backup_id.clone();
    if !wait {
        print(json, &started.json, || {
            format!(
                "Backup {id} of instance {} started ({}); `phoenix backup show {id}` \
                 follows it.\n",
                api.instance(),
                started.value.state.as_str()
            )
        });
        return Ok(Outcome::Done);
    }
    let bar = Bar::new(json, None, "backing up");
    let finished = wait_for_backup(api, &id, &bar).await;
    drop(bar);
    let finished = finished.inspect_err(|_| {
        eprintln!(
            "The backup {id} goes on at the broker: `phoenix backup show {id}` shows how \
             it ends."
        );
    })?;
    let backup = &finished.value;
    print(json, &finished.json, || render::backup_details(backup));
    Ok(report(
        backup.state,
        &format!("backup {id}"),
        backup.error.as_deref(),
    ))
}

async fn wait_for_backup(
    api: &BackupApi,
    id: &BackupId,
    bar: &Bar,
) -> Result<Document<Backup>, Error> {
    let mut ticks = poll_ticks();
    loop {
        ticks.tick().await;
        let backup = api.backup(id).await?;
        if backup.value.state != State::InProgress {
            return Ok(backup);
        }
        if let Some(progress) = backup.value.progress {
            bar.set(progress.raw_bytes);
            bar.say(&format!(
                "backing up ({} stored)",
                render::size(Some(progress.stored_bytes))
            ));
        }
    }
}

async fn wait_for_restore(
    api: &BackupApi,
    id: &Uuid,
    bar: &Bar,
) -> Result<Document<Restore>, Error> {
    let mut ticks = poll_ticks();
    loop {
        ticks.tick().await;
        let restore = api.restore(id).await?;
        if restore.value.state != State::InProgress {
            return Ok(restore);
        }
        if let Some(progress) = &restore.value.progress {
            bar.set(progress.stored_bytes);
            bar.say(&progress.phase);
        }
    }
}

/// Once a second, the first at once; a slow answer delays the next poll, never bunches.
fn poll_ticks() -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks
}

async fn download_backup(
    api: &BackupApi,
    id: &BackupId,
    output: Option<&Path>,
    json: bool,
) -> Result<Outcome, Error> {
    let output = output.map_or_else(|| PathBuf::from(format!("{id}.backup")), Path::to_path_buf);
    let to_stdout = output == Path::new("-");
    if to_stdout && std::io::stdout().is_terminal() {
        return Err(Error::Usage(
            "refusing to write a backup to a terminal: redirect stdout or use -o FILE".into(),
        ));
    }
    let download = api.download(id).await?;
    let expected = Expected {
        length: download.length,
        sha256: download.sha256.clone(),
    };
    let bar = Bar::new(json, Some(expected.length), "downloading");
    let body = download.into_stream();
    let written = if to_stdout {
        download::copy_checked(body, &expected, &mut tokio::io::stdout(), &bar).await
    } else {
        // Ctrl-C must not leave FILE.partial behind; on stdout there is nothing to clean.
        let interrupt = CancellationToken::new();
        let watcher = tokio::spawn({
            let interrupt = interrupt.clone();
            async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    interrupt.cancel();
                }
            }
        });
        let written = download::to_file(body, &expected, &output, &bar, &interrupt).await;
        watcher.abort();
        written
    };
    drop(bar);
    written?;
    let summary = format!(
        "Downloaded backup {id}: {} bytes, SHA-256 {} verified.",
        expected.length, expected.sha256
    );
    match (to_stdout, json) {
        (true, true) => {}
        (true, false) => eprintln!("{summary}"),
        (false, true) => println!(
            "{}",
            render::json(&json!({
                "backup_id": id,
                "file": output,
                "bytes": expected.length,
                "sha256": expected.sha256,
            }))
        ),
        (false, false) => println!(
            "{summary}\nWritten to {}; recover it offline with \
             `phoenix decrypt < {} | pg_restore ...`.",
            output.display(),
            output.display()
        ),
    }
    Ok(Outcome::Done)
}

/// The partial policy that makes the requested changes.
fn policy_change(change: &PolicySetArgs) -> Value {
    let mut policy = json!({});
    if let Some(schedule) = &change.schedule {
        policy["schedule"] = json!(schedule);
    }
    if change.no_schedule {
        policy["schedule"] = Value::Null;
    }
    let mut retention = json!({});
    if let Some(n) = change.keep_last {
        retention["keep_last"] = json!(n);
    }
    if let Some(n) = change.max_age_days {
        retention["max_age_days"] = json!(n);
    }
    if retention != json!({}) {
        policy["retention"] = retention;
    }
    policy
}

/// The document (`--json`) or the text, on stdout.
fn print(json: bool, document: &Value, text: impl FnOnce() -> String) {
    if json {
        println!("{}", render::json(document));
    } else {
        print!("{}", text());
    }
}

/// The exit outcome of a finished backup or restore; a failure is also said on stderr.
fn report(state: State, what: &str, error: Option<&str>) -> Outcome {
    match state {
        State::Succeeded => Outcome::Done,
        State::Failed | State::InProgress => {
            eprintln!(
                "phoenix: {what} failed: {}",
                error.unwrap_or("the broker gave no reason")
            );
            Outcome::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(args: &[&str]) -> PolicySetArgs {
        use clap::Parser as _;
        let mut argv = vec!["phoenix", "policy", "--key-file", "k", "set"];
        argv.extend_from_slice(args);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Policy(PolicyArgs {
                command: PolicyCommand::Set(change),
                ..
            }) => change,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn policy_set_sends_only_what_is_given() {
        assert_eq!(
            policy_change(&change(&["--keep-last", "3"])),
            json!({"retention": {"keep_last": 3}})
        );
        assert_eq!(
            policy_change(&change(&["--no-schedule", "--max-age-days", "9"])),
            json!({"schedule": null, "retention": {"max_age_days": 9}})
        );
        assert_eq!(
            policy_change(&change(&["--schedule", "0 3 * * *"])),
            json!({"schedule": "0 3 * * *"})
        );
    }

    #[test]
    fn policy_set_needs_a_change_and_one_schedule_option() {
        use clap::Parser as _;
        for argv in [
            vec!["phoenix", "policy", "--key-file", "k", "set"],
            vec![
                "phoenix",
                "policy",
                "set",
                "--key-file",
                "k",
                "--schedule",
                "0 3 * * *",
                "--no-schedule",
            ],
        ] {
            let error = crate::cli::Cli::try_parse_from(&argv).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{argv:?}");
        }
    }

    fn client_args(argv: &[&str]) -> ClientArgs {
        use clap::Parser as _;
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Backup(args) => args.client,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn usage_error(args: &ClientArgs) -> String {
        match connect(args) {
            Err(Error::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn access_options_exclude_each_other_and_come_in_pairs() {
        let both = client_args(&[
            "phoenix",
            "backup",
            "--key-file",
            "k",
            "list",
            "--broker-url",
            "http://b",
            "--instance",
            "i",
        ]);
        assert!(usage_error(&both).contains("exclude each other"));
        let url_only = client_args(&["phoenix", "backup", "list", "--broker-url", "http://b"]);
        assert!(usage_error(&url_only).contains("needs --instance"));
        let instance_only = client_args(&["phoenix", "backup", "--instance", "i", "list"]);
        assert!(usage_error(&instance_only).contains("needs --broker-url"));
        let neither = client_args(&["phoenix", "backup", "list"]);
        assert!(usage_error(&neither).contains("--key-file"));
        // Global options are accepted before or after the subcommand.
        let split = client_args(&[
            "phoenix",
            "backup",
            "--broker-url",
            "http://b",
            "list",
            "--instance",
            "i",
        ]);
        assert_eq!(split.broker_url.as_deref(), Some("http://b"));
        assert_eq!(split.instance.map(String::from).as_deref(), Some("i"));
    }

    #[test]
    fn ids_are_validated_by_the_command_line() {
        use clap::Parser as _;
        let error = crate::cli::Cli::try_parse_from([
            "phoenix",
            "backup",
            "show",
            "../etc",
            "--key-file",
            "k",
        ])
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn a_missing_key_file_is_a_usage_error_naming_it() {
        let args = ClientArgs {
            key_file: Some(PathBuf::from("/nonexistent/phoenix-key.json")),
            broker_url: None,
            instance: None,
            json: false,
        };
        assert!(
            matches!(connect(&args), Err(Error::Usage(m)) if m.contains("/nonexistent/phoenix-key.json"))
        );
    }
}
