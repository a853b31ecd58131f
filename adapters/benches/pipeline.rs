//! Throughput, CPU and memory of the backup pipeline on a real source command, for
//! `docs/benchmarks.md`. Not a micro-benchmark: it runs one whole backup (source process
//! -> zstd -> AES-256-GCM -> SHA-256 -> local store) and, with `--verify`, reads it back
//! through decryption and decompression, then prints one JSON line of figures.
//!
//! ```sh
//! cargo bench -p phoenix-adapters --bench pipeline -- \
//!     --source 'pg_dump -Fp' --store /var/tmp/phoenix-bench --level 1 [--workers 2] [--verify]
//! ```
//!
//! `--store-config JSON` replaces `--store DIR` with any storage output (the broker's
//! `storage` setting, e.g. `{"type": "swift", ...}`).
//!
//! The source runs under `/bin/sh -c`, with the `PG*` variables of this process (never a
//! password on the command line). CPU figures are this process's own (`/proc/self/stat`),
//! apart from the source process and the database server; peak RSS is `VmHWM`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use phoenix_adapters::backup::{
    self, BackupKeys, BackupRequest, CompressionConfig, InstanceKey, KeySource, PipelineConfig,
    ProcessCommand, ProcessSource, Progress, SourceInfo,
};
use phoenix_adapters::ids::{BackupId, InstanceId};
use phoenix_adapters::keys::{MasterKey, random_bytes};
use phoenix_adapters::storage::{StorageConfig, Store};
use tokio_util::sync::CancellationToken;

struct Args {
    source: String,
    store: StorageConfig,
    config: PipelineConfig,
    verify: bool,
}

fn parse_args() -> Result<Args> {
    let mut source = None;
    let mut store = None;
    let mut level = 3;
    let mut workers = 0;
    let mut compress = true;
    let mut config = PipelineConfig::default();
    let mut verify = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--source" => source = Some(value()?),
            "--store" => {
                store = Some(StorageConfig::Local {
                    path: PathBuf::from(value()?),
                });
            }
            "--store-config" => store = Some(serde_json::from_str(&value()?)?),
            "--level" => level = value()?.parse()?,
            "--workers" => workers = value()?.parse()?,
            "--no-compression" => compress = false,
            "--chunk-size" => config.chunk_size = value()?.parse()?,
            "--queue-bytes" => config.queue_bytes = value()?.parse()?,
            "--verify" => verify = true,
            // cargo bench appends it.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    config.compression = if compress {
        CompressionConfig::Zstd { level, workers }
    } else {
        CompressionConfig::None
    };
    config.validate()?;
    Ok(Args {
        source: source.context("--source COMMAND is required")?,
        store: store.context("--store DIR or --store-config JSON is required")?,
        config,
        verify,
    })
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("odd /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    let ticks = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    Ok((utime + stime) / ticks)
}

/// Peak resident set size of this process, in MiB.
fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("odd VmHWM")?
        .parse()?;
    Ok(kib / 1024.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    if let StorageConfig::Local { path } = &args.store {
        std::fs::create_dir_all(path)?;
    }
    let store: Arc<dyn Store> = args.store.build().await?;
    let mut raw_key = [0u8; 32];
    random_bytes(&mut raw_key)?;
    let master =
        MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode(raw_key))?;
    let instance = InstanceId::parse("bench")?;
    let mut tag = [0u8; 6];
    random_bytes(&mut tag)?;
    let request = BackupRequest {
        instance_id: instance.clone(),
        backup_id: BackupId::parse(format!("bench-{}", hex::encode(tag)))?,
        config: args.config.clone(),
    };
    let keys = BackupKeys {
        instance: InstanceKey::generate(&master, &instance)?,
        passphrase: None,
    };
    let mut command = ProcessCommand::new("/bin/sh", ["-c", args.source.as_str()]);
    for (name, value) in std::env::vars().filter(|(k, _)| k.starts_with("PG")) {
        command = command.env(name, value);
    }
    let source = ProcessSource::new(
        SourceInfo {
            strategy: "bench".into(),
            engine: "bench".into(),
            engine_version: None,
            format: "stream".into(),
            details: Default::default(),
        },
        command,
    );

    let progress = Progress::new();
    let cpu_before = cpu_seconds()?;
    let started = Instant::now();
    let manifest = backup::run_backup(
        &source,
        &request,
        &keys,
        Arc::clone(&store),
        &progress,
        &CancellationToken::new(),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu_before;
    let snapshot = progress.snapshot();
    #[allow(clippy::cast_precision_loss)]
    let raw_gb = manifest.raw_bytes as f64 / 1e9;
    let mut figures = serde_json::json!({
        "config": args.config,
        "raw_bytes": manifest.raw_bytes,
        "stored_bytes": manifest.stored_bytes,
        "seconds": seconds,
        "raw_mb_per_s": raw_gb * 1000.0 / seconds,
        "cpu_seconds": cpu,
        "cpu_seconds_per_gb": cpu / raw_gb,
        "peak_rss_mib": peak_rss_mib()?,
        "peak_in_flight_bytes": snapshot.peak_in_flight_bytes,
        "queue_bound_bytes": snapshot.queue_bound_bytes,
    });
    if args.verify {
        let cpu_before = cpu_seconds()?;
        let started = Instant::now();
        let report = backup::verify(
            Arc::clone(&store),
            &manifest,
            Some(KeySource::Master(&master)),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        figures["verify_seconds"] = serde_json::json!(seconds);
        figures["verify_raw_mb_per_s"] = serde_json::json!(raw_gb * 1000.0 / seconds);
        figures["verify_cpu_seconds"] = serde_json::json!(cpu_seconds()? - cpu_before);
        figures["verify_raw_bytes"] = serde_json::json!(report.raw_bytes);
    }
    backup::delete_backup(store.as_ref(), &request.instance_id, &request.backup_id).await?;
    println!("{figures}");
    Ok(())
}
