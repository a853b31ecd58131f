//! The scheduler: starts scheduled backups when they are due, applies retention, and
//! finishes the deletions that storage refused before. It runs in every replica; the
//! state store makes sure one due time starts one backup.
//!
//! Deletion is always storage first, record second: a backup is marked `deleting`
//! (hidden at once), its objects are removed, then its record. A failure leaves the mark,
//! and the next tick retries, so a record never points at data that is gone and data
//! never outlives its record unnoticed. Data objects that no manifest names (what a
//! killed attempt leaves) and the pieces of interrupted uploads are swept once they are a
//! day old.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use phoenix_adapters::backup;
use phoenix_adapters::ids::{BackupId, InstanceId};
use phoenix_catalog::{BackupPolicy, Retention, Schedule};
use tokio_util::sync::CancellationToken;

use crate::app_state::AppState;
use crate::backups::api::start_backup;
use crate::backups::retention::{self, BackupState, BackupSummary};
use crate::backups::run::{self, ProvisionPayload, Seed};
use crate::error::{Error, cause_chain};
use crate::store::backups::{self, Backup, state as backup_state, trigger};
use crate::store::instances::{self, state as instance_state};
use crate::store::policies::{self, PolicyRow};
use crate::store::{DbConnection, now_ms, operations, restores, write_transaction};

/// How often the scheduler looks for due work.
const TICK: Duration = Duration::from_secs(10);

/// How often orphaned data and unfinished uploads are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Age after which unreferenced data is an orphan: far longer than any attempt may run
/// without renewing its lease.
const ORPHAN_AGE: TimeDelta = TimeDelta::days(1);

/// When a scheduled backup finds its instance busy, it is tried again this much later
/// instead of waiting for the next scheduled time.
const BUSY_RETRY: TimeDelta = TimeDelta::minutes(1);

/// How long the backups of a deleted instance stay when its policy sets no age limit.
const DELETED_INSTANCE_DEFAULT_DAYS: u32 = 30;

/// The policy a row holds.
///
/// # Errors
/// [`Error::Inconsistent`] for a stored value the broker could not have written.
pub fn stored_policy(row: &PolicyRow) -> Result<BackupPolicy, Error> {
    let count = |v: Option<i32>| v.and_then(|n| u32::try_from(n).ok());
    Ok(BackupPolicy {
        schedule: row
            .schedule
            .as_deref()
            .map(Schedule::parse)
            .transpose()
            .map_err(Error::Inconsistent)?,
        retention: Retention::new(count(row.keep_last), count(row.max_age_days))
            .map_err(Error::Inconsistent)?,
    })
}

/// The row of a policy set at `now`: the next scheduled backup is the first one after it.
pub fn policy_row(instance_id: &str, policy: &BackupPolicy, now: DateTime<Utc>) -> PolicyRow {
    let count = |v: Option<u32>| v.and_then(|n| i32::try_from(n).ok());
    PolicyRow {
        instance_id: instance_id.to_owned(),
        schedule: policy.schedule.as_ref().map(|s| s.as_str().to_owned()),
        keep_last: count(policy.retention.keep_last()),
        max_age_days: count(policy.retention.max_age_days()),
        next_run_at: next_run(policy.schedule.as_ref(), now),
        updated_at: now.timestamp_millis(),
    }
}

/// The shortest time a schedule may leave between two backups: a backup makes its
/// instance busy (no update or deprovision meanwhile) and takes storage, so a policy a
/// service key can set must not keep it busy all the time.
pub const MIN_INTERVAL: TimeDelta = TimeDelta::hours(1);

/// Refuses a schedule that fires more often than [`MIN_INTERVAL`] (checked over its next
/// few hundred times, which covers every pattern of a week).
///
/// # Errors
/// A user-facing message.
pub fn check_frequency(policy: &BackupPolicy) -> Result<(), String> {
    let Some(schedule) = &policy.schedule else {
        return Ok(());
    };
    let mut at = Utc::now();
    let mut previous: Option<DateTime<Utc>> = None;
    for _ in 0..400 {
        let Some(next) = schedule.next_after(at) else {
            break;
        };
        if let Some(previous) = previous
            && next - previous < MIN_INTERVAL
        {
            return Err(format!(
                "the schedule {:?} starts backups less than an hour apart; at most one an hour",
                schedule.as_str()
            ));
        }
        previous = Some(next);
        at = next;
    }
    Ok(())
}

fn next_run(schedule: Option<&Schedule>, after: DateTime<Utc>) -> Option<i64> {
    schedule
        .and_then(|s| s.next_after(after))
        .map(|t| t.timestamp_millis())
}

/// Runs until `cancel` fires.
pub async fn run(state: AppState, cancel: CancellationToken) {
    let mut last_sweep: Option<tokio::time::Instant> = None;
    loop {
        if let Err(error) = start_due_backups(&state).await {
            tracing::warn!(error = %cause_chain(&error), "Starting scheduled backups failed.");
        }
        if let Err(error) = apply_all_retention(&state).await {
            tracing::warn!(error = %cause_chain(&error), "Applying backup retention failed.");
        }
        if let Err(error) = finish_deletions(&state).await {
            tracing::warn!(error = %cause_chain(&error), "Deleting backups failed; retrying.");
        }
        if last_sweep.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            last_sweep = Some(tokio::time::Instant::now());
            if let Err(error) = sweep_orphans(&state).await {
                tracing::warn!(error = %cause_chain(&error), "Sweeping orphaned backup data failed.");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

async fn start_due_backups(state: &AppState) -> Result<(), Error> {
    let due = state
        .store
        .run(|conn| Ok(policies::due(conn, now_ms())?))
        .await?;
    for row in due {
        let Some(seen) = row.next_run_at else {
            continue;
        };
        let policy = stored_policy(&row)?;
        let instance_id = row.instance_id.clone();
        let started = state
            .store
            .run(move |conn| {
                write_transaction(conn, |conn| {
                    instances::lock(conn, &instance_id)?;
                    let now = Utc::now();
                    let serving = instances::find(conn, &instance_id)?
                        .is_some_and(|i| i.state == instance_state::PROVISIONED);
                    if !serving {
                        // Deleted or failed: no more scheduled backups.
                        policies::advance(conn, &instance_id, seen, None)?;
                        return Ok(None);
                    }
                    // Busy (a restore, an update, a backup running): try again soon,
                    // never queue behind it.
                    let busy = operations::running_on_instance(conn, &instance_id)?.is_some();
                    let next = if busy {
                        Some((now + BUSY_RETRY).timestamp_millis())
                    } else {
                        next_run(policy.schedule.as_ref(), now)
                    };
                    // The due time is taken before the backup starts: another replica
                    // (or a policy change) that moved it first wins.
                    let taken = policies::advance(conn, &instance_id, seen, next)?;
                    if busy || !taken {
                        return Ok(None);
                    }
                    Ok::<_, Error>(
                        start_backup(conn, &instance_id, trigger::SCHEDULE)?.map(|b| b.id),
                    )
                })
            })
            .await;
        match started {
            Ok(Some(backup_id)) => {
                state.wake.notify_waiters();
                tracing::info!(instance_id = %row.instance_id, backup_id, "Scheduled backup started.");
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(instance_id = %row.instance_id, error = %cause_chain(&error), "Starting a scheduled backup failed.");
            }
        }
    }
    Ok(())
}

fn summary(backup: &Backup) -> Option<BackupSummary> {
    let state = match backup.state.as_str() {
        backup_state::IN_PROGRESS => BackupState::InProgress,
        backup_state::SUCCEEDED => BackupState::Succeeded,
        backup_state::FAILED => BackupState::Failed,
        _ => return None,
    };
    Some(BackupSummary {
        id: BackupId::parse(&backup.id).ok()?,
        state,
        created_at: DateTime::from_timestamp_millis(backup.created_at)?,
    })
}

async fn apply_all_retention(state: &AppState) -> Result<(), Error> {
    let instances = state
        .store
        .run(|conn| Ok(backups::instances_with_backups(conn)?))
        .await?;
    for instance in instances {
        if let Err(error) = apply_retention(state, &instance).await {
            tracing::warn!(instance_id = %instance, error = %cause_chain(&error), "Applying retention failed.");
        }
    }
    Ok(())
}

/// The backups a running restore or clone reads: never deleted under it.
///
/// # Errors
/// When the store fails.
pub fn backups_in_use(conn: &mut DbConnection) -> Result<Vec<String>, Error> {
    let mut in_use = restores::backups_being_restored(conn)?;
    for payload in operations::running_payloads(conn, operations::kind::PROVISION)? {
        if let Ok(ProvisionPayload {
            seed: Some(Seed::Clone { backup_id, .. }),
        }) = serde_json::from_str(&payload)
        {
            in_use.push(backup_id);
        }
    }
    Ok(in_use)
}

/// Deletes the backups of one instance that its retention lets go. A deleted instance
/// keeps its backups (even the newest) until they are older than its age limit, or loses
/// them at once when the operator configured so.
///
/// # Errors
/// When the store fails; a storage failure leaves the backup marked for the next tick.
pub async fn apply_retention(state: &AppState, instance_id: &str) -> Result<(), Error> {
    let id = instance_id.to_owned();
    let (instance, row, all) = state
        .store
        .run(move |conn| {
            Ok((
                instances::find(conn, &id)?,
                policies::find(conn, &id)?,
                backups::list(conn, &id)?,
            ))
        })
        .await?;
    let policy = row
        .as_ref()
        .map(stored_policy)
        .transpose()?
        .unwrap_or_default();
    let now = Utc::now();
    let deleted = instance.is_none_or(|i| i.state == instance_state::DELETED);
    let expired: Vec<String> = if deleted {
        let days = policy
            .retention
            .max_age_days()
            .unwrap_or(DELETED_INSTANCE_DEFAULT_DAYS);
        let limit = (now - TimeDelta::days(i64::from(days))).timestamp_millis();
        all.iter()
            .filter(|b| b.state != backup_state::IN_PROGRESS)
            .filter(|b| state.settings.delete_backups_with_instance || b.created_at < limit)
            .map(|b| b.id.clone())
            .collect()
    } else {
        let summaries: Vec<BackupSummary> = all.iter().filter_map(summary).collect();
        retention::expired(&summaries, &policy.retention, now)
            .into_iter()
            .map(|id| id.to_string())
            .collect()
    };
    for backup in all.into_iter().filter(|b| expired.contains(&b.id)) {
        let (id, instance) = (backup.id.clone(), instance_id.to_owned());
        // Under the instance's lock, which a restore or a clone of it takes too: a backup
        // one of them has just started to read is never marked.
        let marked = state
            .store
            .run(move |conn| {
                write_transaction(conn, |conn| {
                    instances::lock(conn, &instance)?;
                    if backups_in_use(conn)?.contains(&id) {
                        return Ok(false);
                    }
                    Ok::<_, Error>(backups::mark_deleting(conn, &id)?)
                })
            })
            .await?;
        if !marked {
            continue;
        }
        match remove_backup(state, &backup).await {
            Ok(()) => {
                tracing::info!(instance_id, backup_id = %backup.id, "Backup deleted by retention.");
            }
            Err(error) => {
                tracing::warn!(instance_id, backup_id = %backup.id, error = %cause_chain(&error), "Deleting a backup failed; retrying.");
            }
        }
    }
    Ok(())
}

/// Removes a backup marked `deleting`: its snapshot if it made one (the mark already
/// hides it, so no backup points at a snapshot that is gone), its objects in storage,
/// then its record.
///
/// # Errors
/// When the infrastructure, storage or the store fails (the mark stays, and the next
/// tick retries).
pub async fn remove_backup(state: &AppState, backup: &Backup) -> Result<(), Error> {
    let instance = InstanceId::parse(&backup.instance_id)?;
    let id = BackupId::parse(&backup.id)?;
    match backup::read_manifest(state.backup_store.as_ref(), &instance, &id).await {
        Ok(manifest) => {
            if let Some(snapshot) = run::local_snapshot(&manifest)
                && state.infrastructure.snapshot_exists(&snapshot).await?
            {
                state.infrastructure.delete_snapshot(&snapshot).await?;
            }
        }
        // No manifest: a failed backup, or a deletion that got past this point before.
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    backup::delete_backup(state.backup_store.as_ref(), &instance, &id).await?;
    let record = backup.id.clone();
    state
        .store
        .run(move |conn| Ok(backups::delete(conn, &record)?))
        .await
}

async fn finish_deletions(state: &AppState) -> Result<(), Error> {
    let marked = state
        .store
        .run(|conn| Ok(backups::list_deleting(conn)?))
        .await?;
    // One object that storage refuses must not hold up the others.
    for backup in marked {
        match remove_backup(state, &backup).await {
            Ok(()) => {
                tracing::info!(instance_id = %backup.instance_id, backup_id = %backup.id, "Finished deleting a backup.");
            }
            Err(error) => {
                tracing::warn!(instance_id = %backup.instance_id, backup_id = %backup.id, error = %cause_chain(&error), "Deleting a backup failed; retrying.");
            }
        }
    }
    Ok(())
}

async fn sweep_orphans(state: &AppState) -> Result<(), Error> {
    let instances = state
        .store
        .run(|conn| Ok(backups::instances_with_backups(conn)?))
        .await?;
    let older_than = Utc::now() - ORPHAN_AGE;
    for instance in instances {
        let id = InstanceId::parse(&instance)?;
        match backup::sweep_orphans(state.backup_store.as_ref(), &id, older_than).await {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => {
                tracing::info!(instance_id = %instance, objects = removed.len(), "Swept orphaned backup data.");
            }
            Err(error) => {
                tracing::warn!(instance_id = %instance, %error, "Sweeping orphaned backup data failed; retrying later.");
            }
        }
    }
    let age = ORPHAN_AGE.to_std().unwrap_or(Duration::from_secs(86_400));
    let pieces = state.backup_sweeper.sweep("backups/", age).await?;
    if pieces > 0 {
        tracing::info!(pieces, "Swept the pieces of interrupted uploads.");
    }
    Ok(())
}
