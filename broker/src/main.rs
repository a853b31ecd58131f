//! The `phoenix` binary: parses the command line, then hands over to the library.

use std::process::ExitCode;

use clap::Parser as _;
use phoenix_broker::cli::{Cli, Command, DecryptArgs, VerifyArgs};
use phoenix_broker::config::Settings;
use phoenix_broker::startup::Application;
use phoenix_broker::{client, offline, telemetry};

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Serve(args) => serve(&Settings::load(args.config.config.as_deref())?),
        Command::Decrypt(args) => decrypt(&args),
        Command::Verify(args) => verify(&args),
        Command::Backup(args) => return Ok(client::backup(&args)),
        Command::Restore(args) => return Ok(client::restore(&args)),
        Command::Policy(args) => return Ok(client::policy(&args)),
    }?;
    Ok(ExitCode::SUCCESS)
}

fn serve(settings: &Settings) -> anyhow::Result<()> {
    telemetry::init(&settings.log)?;
    let settings = settings.clone();
    actix_web::rt::System::new().block_on(async move {
        let application = Application::build(settings).await?;
        application.run_until_stopped().await?;
        Ok(())
    })
}

/// Offline commands log warnings only: stdout may be data, stderr is for people.
fn offline_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    telemetry::init("warn")?;
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn decrypt(args: &DecryptArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args.config.config.as_deref())?;
    offline_runtime()?.block_on(offline::decrypt(&settings, args.passphrase_file.as_deref()))?;
    Ok(())
}

fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args.config.config.as_deref())?;
    let report = offline_runtime()?.block_on(offline::verify(
        &settings,
        &args.instance,
        &args.backup,
        args.passphrase_file.as_deref(),
        args.without_key,
    ))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "instance_id": args.instance,
                "backup_id": args.backup,
                "stored_bytes": report.stored_bytes,
                "sha256": report.sha256,
                "raw_bytes": report.raw_bytes,
                "decrypted": report.raw_bytes.is_some(),
            })
        );
    } else {
        let checked = match report.raw_bytes {
            Some(raw) => format!("every chunk authenticated, {raw} bytes of original stream"),
            None => "stored bytes only (no key)".to_owned(),
        };
        println!(
            "backup {} of instance {}: OK: {} bytes stored, sha256 {}; {checked}",
            args.backup, args.instance, report.stored_bytes, report.sha256
        );
    }
    Ok(())
}
