//! What the CLI shows: text for people (tables, details, one-line results), the broker's
//! JSON as is for `--json`, and progress bars on stderr.
//!
//! Text functions return strings so that tests can compare them; callers print. A
//! progress bar is drawn only when stderr is a terminal and `--json` is not given, so
//! scripts and pipes never see one.

use std::io::IsTerminal as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::api::{Backup, Policy, Restore};

/// One JSON document, pretty-printed.
pub fn json(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The backups as a table: id, state, trigger, created, raw size, stored size.
pub fn backup_table(backups: &[Backup]) -> String {
    if backups.is_empty() {
        return "No backups.\n".to_owned();
    }
    let header = ["ID", "STATE", "TRIGGER", "CREATED", "RAW", "STORED"].map(str::to_owned);
    let rows: Vec<[String; 6]> = backups
        .iter()
        .map(|b| {
            [
                b.backup_id.to_string(),
                b.state.as_str().to_owned(),
                b.trigger.clone(),
                time(&b.created_at),
                size(b.raw_bytes.or(b.progress.map(|p| p.raw_bytes))),
                size(b.stored_bytes.or(b.progress.map(|p| p.stored_bytes))),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    // Sizes are right-aligned so that magnitudes line up.
    let line = |cells: &[String; 6]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            if i >= 4 {
                text.push_str(&format!("{cell:>width$}"));
            } else {
                text.push_str(&format!("{cell:<width$}"));
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut table = line(&header);
    for row in &rows {
        table.push_str(&line(row));
    }
    table
}

/// A backup's details, one `name: value` line each.
pub fn backup_details(b: &Backup) -> String {
    let mut lines = vec![
        ("backup", b.backup_id.to_string()),
        ("instance", b.instance_id.to_string()),
        ("state", b.state.as_str().to_owned()),
        ("trigger", b.trigger.clone()),
    ];
    if let Some(engine) = &b.engine {
        let version = b.engine_version.as_deref().unwrap_or_default();
        lines.push((
            "engine",
            format!("{engine} {version}").trim_end().to_owned(),
        ));
    }
    if let Some(format) = &b.format {
        lines.push(("format", format.clone()));
    }
    lines.push(("created", time(&b.created_at)));
    if let Some(at) = &b.started_at {
        lines.push(("started", time(at)));
    }
    if let Some(at) = &b.finished_at {
        lines.push(("finished", time(at)));
    }
    match (b.raw_bytes, b.stored_bytes, b.progress) {
        (None, None, Some(progress)) => {
            lines.push(("raw so far", size(Some(progress.raw_bytes))));
            lines.push(("stored so far", size(Some(progress.stored_bytes))));
        }
        (raw, stored, _) => {
            lines.push(("raw size", size(raw)));
            lines.push(("stored size", size(stored)));
        }
    }
    if let Some(sha256) = &b.sha256 {
        lines.push(("sha256", sha256.clone()));
    }
    if let Some(error) = &b.error {
        lines.push(("error", error.clone()));
    }
    name_value_lines(&lines)
}

/// A restore's details, one `name: value` line each.
pub fn restore_details(r: &Restore) -> String {
    let mut lines = vec![
        ("restore", r.restore_id.to_string()),
        ("instance", r.instance_id.to_string()),
        ("backup", r.backup_id.to_string()),
        ("backup of", r.source_instance_id.to_string()),
        ("state", r.state.as_str().to_owned()),
        ("created", time(&r.created_at)),
    ];
    if let Some(at) = &r.finished_at {
        lines.push(("finished", time(at)));
    }
    if let Some(progress) = &r.progress {
        lines.push(("phase", progress.phase.clone()));
        lines.push(("restored so far", size(Some(progress.raw_bytes))));
    }
    if let Some(error) = &r.error {
        lines.push(("error", error.clone()));
    }
    name_value_lines(&lines)
}

/// The backup policy in words.
pub fn policy_details(p: &Policy) -> String {
    let schedule = p
        .schedule
        .clone()
        .unwrap_or_else(|| "none (manual backups only)".to_owned());
    let keep_last = p
        .retention
        .keep_last
        .map_or_else(|| "no limit".to_owned(), |n| format!("{n} backups"));
    let max_age = p
        .retention
        .max_age_days
        .map_or_else(|| "no limit".to_owned(), |n| format!("{n} days"));
    name_value_lines(&[
        ("schedule", schedule),
        ("keep last", keep_last),
        ("max age", max_age),
    ])
}

fn name_value_lines(lines: &[(&str, String)]) -> String {
    let width = lines
        .iter()
        .map(|(name, _)| name.len() + 1)
        .max()
        .unwrap_or(0);
    lines
        .iter()
        .map(|(name, value)| format!("{:<width$} {value}\n", format!("{name}:")))
        .collect()
}

/// A size in binary units, `-` when unknown.
pub fn size(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), |b| HumanBytes(b).to_string())
}

fn time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// True when progress bars are drawn: not `--json`, and stderr is a terminal.
pub fn bars_visible(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A progress bar on stderr, or nothing at all.
#[derive(Debug)]
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar when [`bars_visible`]`(json)`; a hidden one else. With a known `total` it
    /// fills up; without, it spins and counts.
    pub fn new(json: bool, total: Option<u64>, message: &str) -> Self {
        if !bars_visible(json) {
            return Self(ProgressBar::hidden());
        }
        let (bar, template) = match total {
            Some(total) => (
                ProgressBar::new(total),
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            ),
            None => (
                ProgressBar::new_spinner(),
                "{spinner} {msg}: {bytes} ({bytes_per_sec}, {elapsed})",
            ),
        };
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(template)
                .map(|style| style.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(bar)
    }

    /// Sets the bytes done so far; a total that turns out too small grows with them.
    pub fn set(&self, bytes: u64) {
        if self.0.length().is_some_and(|total| bytes > total) {
            self.0.set_length(bytes);
        }
        self.0.set_position(bytes);
    }

    /// Adds bytes done.
    pub fn add(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    /// Changes the words before the bar.
    pub fn say(&self, message: &str) {
        self.0.set_message(message.to_owned());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(json: Value) -> Backup {
        serde_json::from_value(json).unwrap()
    }

    fn succeeded() -> Backup {
        backup(serde_json::json!({
            "backup_id": "0f7c2b1e-8d4a-4c1b-9f3e-2a6d5b7c8e90",
            "instance_id": "inst-1",
            "state": "succeeded",
            "trigger": "manual",
            "strategy": "stream",
            "engine": "postgresql",
            "engine_version": "15",
            "format": "pg_dump-custom",
            "raw_bytes": 10_485_760,
            "stored_bytes": 2_202_009,
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "created_at": "2025-03-01T03:00:00Z",
            "started_at": "2025-03-01T03:00:01Z",
            "finished_at": "2025-03-01T03:00:09Z",
            "progress": null,
            "error": null
        }))
    }

    fn in_progress() -> Backup {
        backup(serde_json::json!({
            "backup_id": "5a1d",
            "instance_id": "inst-1",
            "state": "in progress",
            "trigger": "schedule",
            "raw_bytes": null,
            "stored_bytes": null,
            "sha256": null,
            "created_at": "2025-03-02T03:00:00Z",
            "started_at": "2025-03-02T03:00:00Z",
            "finished_at": null,
            "progress": {"raw_bytes": 1024, "stored_bytes": 300},
            "error": null
        }))
    }

    #[test]
    fn the_backup_table_has_one_aligned_row_per_backup() {
        insta::assert_snapshot!(backup_table(&[in_progress(), succeeded()]), @r"
        ID                                    STATE        TRIGGER   CREATED                        RAW    STORED
        5a1d                                  in progress  schedule  2025-03-02 03:00:00 UTC   1.00 KiB     300 B
        0f7c2b1e-8d4a-4c1b-9f3e-2a6d5b7c8e90  succeeded    manual    2025-03-01 03:00:00 UTC  10.00 MiB  2.10 MiB
        ");
        assert_eq!(backup_table(&[]), "No backups.\n");
    }

    #[test]
    fn backup_details_show_sizes_digest_and_error() {
        insta::assert_snapshot!(backup_details(&succeeded()), @r"
        backup:      0f7c2b1e-8d4a-4c1b-9f3e-2a6d5b7c8e90
        instance:    inst-1
        state:       succeeded
        trigger:     manual
        engine:      postgresql 15
        format:      pg_dump-custom
        created:     2025-03-01 03:00:00 UTC
        started:     2025-03-01 03:00:01 UTC
        finished:    2025-03-01 03:00:09 UTC
        raw size:    10.00 MiB
        stored size: 2.10 MiB
        sha256:      9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        ");
        let mut failed = in_progress();
        failed.state = super::super::api::State::Failed;
        failed.progress = None;
        failed.error = Some("pg_dump exited with status 1".into());
        let text = backup_details(&failed);
        assert!(text.contains("state:       failed\n"), "{text}");
        assert!(
            text.contains("error:       pg_dump exited with status 1\n"),
            "{text}"
        );
        assert!(text.contains("raw size:    -\n"), "{text}");
    }

    #[test]
    fn policy_details_say_what_an_empty_field_means() {
        let policy: Policy = serde_json::from_value(serde_json::json!({
            "schedule": null,
            "retention": {"keep_last": 7, "max_age_days": null}
        }))
        .unwrap();
        insta::assert_snapshot!(policy_details(&policy), @r"
        schedule:  none (manual backups only)
        keep last: 7 backups
        max age:   no limit
        ");
    }

    #[test]
    fn restore_details_name_the_backup_and_its_instance() {
        let restore: Restore = serde_json::from_value(serde_json::json!({
            "restore_id": "3e0b9d0c-2f0c-4a55-8d7e-6f1f4b8a9c21",
            "instance_id": "inst-2",
            "backup_id": "0f7c2b1e",
            "source_instance_id": "inst-1",
            "state": "in progress",
            "created_at": "2025-03-03T10:00:00Z",
            "finished_at": null,
            "progress": {"raw_bytes": 2048, "stored_bytes": 512, "phase": "restoring"},
            "error": null
        }))
        .unwrap();
        insta::assert_snapshot!(restore_details(&restore), @r"
        restore:         3e0b9d0c-2f0c-4a55-8d7e-6f1f4b8a9c21
        instance:        inst-2
        backup:          0f7c2b1e
        backup of:       inst-1
        state:           in progress
        created:         2025-03-03 10:00:00 UTC
        phase:           restoring
        restored so far: 2.00 KiB
        ");
    }

    #[test]
    fn json_output_is_the_document_unchanged() {
        let value = serde_json::json!({"backups": [], "extra": {"kept": true}});
        let text = json(&value);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }
}
