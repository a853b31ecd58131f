//! Which of an instance's backups its retention lets go. Pure: the caller deletes what
//! [`expired`] names (storage first, record second); nothing here reads the clock or
//! touches storage.
//!
//! The rules, in order of precedence:
//! - a backup in progress is never touched;
//! - the newest succeeded backup is always kept, whatever the policy says: a policy must
//!   never leave an instance with nothing to restore;
//! - any other succeeded backup is kept when a rule of the [`Retention`] keeps it (one of
//!   the newest `keep_last` succeeded, or at most `max_age_days` old), and goes when none
//!   does; with no rule set, all are kept;
//! - a failed backup holds no data, only a record of why it failed: it goes once it is
//!   older than [`FAILED_RECORD_TTL`], unless it is the instance's latest outcome (newer
//!   than every succeeded backup), which stays so that the failure remains visible until
//!   a backup succeeds. Failed backups never count towards `keep_last`.
//!
//! Backups are ordered and aged by `created_at`: a dump is a snapshot taken as it starts,
//! so that is the time of its data. Equal times are ordered by ID, so the answer never
//! depends on the order of the input.

use std::cmp::Ordering;

use chrono::{DateTime, TimeDelta, Utc};
use phoenix_adapters::ids::BackupId;
use phoenix_catalog::Retention;
use serde::{Deserialize, Serialize};

/// How long the record of a failed backup is kept (unless it is the latest outcome).
pub const FAILED_RECORD_TTL: TimeDelta = TimeDelta::days(1);

/// Where a backup is in its life, as the backup API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackupState {
    #[serde(rename = "in progress")]
    InProgress,
    #[serde(rename = "succeeded")]
    Succeeded,
    #[serde(rename = "failed")]
    Failed,
}

/// What retention needs to know of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub id: BackupId,
    pub state: BackupState,
    pub created_at: DateTime<Utc>,
}

impl BackupSummary {
    fn newer_first(&self, other: &Self) -> Ordering {
        (other.created_at, &other.id).cmp(&(self.created_at, &self.id))
    }
}

/// The backups `retention` lets go at `now`, oldest first.
pub fn expired(
    backups: &[BackupSummary],
    retention: &Retention,
    now: DateTime<Utc>,
) -> Vec<BackupId> {
    let mut succeeded: Vec<&BackupSummary> = backups
        .iter()
        .filter(|b| b.state == BackupState::Succeeded)
        .collect();
    succeeded.sort_by(|a, b| a.newer_first(b));
    let latest_outcome = backups
        .iter()
        .filter(|b| b.state != BackupState::InProgress)
        .min_by(|a, b| a.newer_first(b));

    let mut gone: Vec<&BackupSummary> = succeeded
        .iter()
        .enumerate()
        .skip(1)
        .filter(|&(rank, backup)| !kept(retention, rank, backup, now))
        .map(|(_, backup)| *backup)
        .collect();
    gone.extend(backups.iter().filter(|b| {
        b.state == BackupState::Failed
            && now.signed_duration_since(b.created_at) > FAILED_RECORD_TTL
            && !latest_outcome.is_some_and(|latest| std::ptr::eq(latest, *b))
    }));
    gone.sort_by(|a, b| b.newer_first(a));
    gone.into_iter().map(|b| b.id.clone()).collect()
}

/// Whether a rule keeps the succeeded backup of this rank (0 is the newest).
fn kept(retention: &Retention, rank: usize, backup: &BackupSummary, now: DateTime<Utc>) -> bool {
    let (keep_last, max_age_days) = (retention.keep_last(), retention.max_age_days());
    if keep_last.is_none() && max_age_days.is_none() {
        return true;
    }
    let by_count = keep_last.is_some_and(|n| usize::try_from(n).is_ok_and(|n| rank < n));
    let by_age = max_age_days.is_some_and(|days| {
        now.signed_duration_since(backup.created_at) <= TimeDelta::days(i64::from(days))
    });
    by_count || by_age
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-05-31T12:00:00Z")
            .unwrap()
            .to_utc()
    }

    fn backup(id: &str, state: BackupState, hours_ago: i64) -> BackupSummary {
        BackupSummary {
            id: BackupId::parse(id).unwrap(),
            state,
            created_at: now() - TimeDelta::hours(hours_ago),
        }
    }

    /// One succeeded backup a day, `d0` today to `d{n-1}` n-1 days ago.
    fn daily(n: i64) -> Vec<BackupSummary> {
        (0..n)
            .map(|d| backup(&format!("d{d}"), BackupState::Succeeded, d * 24))
            .collect()
    }

    fn retention(keep_last: Option<u32>, max_age_days: Option<u32>) -> Retention {
        Retention::new(keep_last, max_age_days).unwrap()
    }

    fn ids(list: &[&str]) -> Vec<BackupId> {
        list.iter()
            .map(|id| BackupId::parse(*id).unwrap())
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest_and_lets_the_rest_go_oldest_first() {
        let gone = expired(&daily(5), &retention(Some(3), None), now());
        assert_eq!(gone, ids(&["d4", "d3"]));
    }

    #[test]
    fn keep_last_and_max_age_keep_what_either_keeps() {
        // d0..d2 by count, d0..d4 by age (at most 4 days old): d5.. go.
        let gone = expired(&daily(8), &retention(Some(3), Some(4)), now());
        assert_eq!(gone, ids(&["d7", "d6", "d5"]));
        // Five by count outlast a one-day age limit.
        let gone = expired(&daily(8), &retention(Some(5), Some(1)), now());
        assert_eq!(gone, ids(&["d7", "d6", "d5"]));
    }

    #[test]
    fn the_newest_succeeded_backup_stays_however_old() {
        let backups = [
            backup("old", BackupState::Succeeded, 24 * 400),
            backup("older", BackupState::Succeeded, 24 * 500),
            backup("running", BackupState::InProgress, 1),
            backup("broken", BackupState::Failed, 2),
        ];
        let gone = expired(&backups, &retention(None, Some(30)), now());
        assert_eq!(gone, ids(&["older"]));
    }

    #[test]
    fn without_a_rule_every_succeeded_backup_is_kept() {
        assert!(expired(&daily(50), &Retention::default(), now()).is_empty());
    }

    #[test]
    fn backups_in_progress_are_never_touched() {
        let backups = [
            backup("stuck", BackupState::InProgress, 24 * 90),
            backup("d0", BackupState::Succeeded, 0),
            backup("d1", BackupState::Succeeded, 25),
        ];
        let gone = expired(&backups, &retention(Some(1), Some(1)), now());
        assert_eq!(gone, ids(&["d1"]));
    }

    #[test]
    fn failed_records_go_after_a_day_unless_they_are_the_latest_outcome() {
        let backups = [
            backup("failed-latest", BackupState::Failed, 48),
            backup("ok", BackupState::Succeeded, 72),
            backup("failed-old", BackupState::Failed, 96),
            backup("failed-recent", BackupState::Failed, 23),
        ];
        // failed-recent is the latest outcome and young; failed-latest is older than a
        // day and no longer the latest.
        let gone = expired(&backups, &Retention::default(), now());
        assert_eq!(gone, ids(&["failed-old", "failed-latest"]));
        let gone = expired(&backups[..3], &Retention::default(), now());
        assert_eq!(gone, ids(&["failed-old"]));
    }

    #[test]
    fn equal_times_are_ordered_by_id() {
        let backups = [
            backup("a", BackupState::Succeeded, 5),
            backup("c", BackupState::Succeeded, 5),
            backup("b", BackupState::Succeeded, 5),
        ];
        let gone = expired(&backups, &retention(Some(1), None), now());
        assert_eq!(gone, ids(&["a", "b"]));
    }

    fn any_backups() -> impl Strategy<Value = Vec<BackupSummary>> {
        let state = prop_oneof![
            Just(BackupState::InProgress),
            Just(BackupState::Succeeded),
            Just(BackupState::Failed),
        ];
        // Minutes ago: mostly spread over 60 days, sometimes bunched to force ties;
        // a few in the future, as a skewed clock would write them.
        let minutes_ago = prop_oneof![-60i64..60 * 24 * 60, 0i64..3];
        prop::collection::vec((state, minutes_ago), 0..40).prop_map(|items| {
            items
                .into_iter()
                .enumerate()
                .map(|(i, (state, minutes))| BackupSummary {
                    id: BackupId::parse(format!("b{i}")).unwrap(),
                    state,
                    created_at: now() - TimeDelta::minutes(minutes),
                })
                .collect()
        })
    }

    fn any_retention() -> impl Strategy<Value = Retention> {
        (
            proptest::option::of(1u32..=12),
            proptest::option::of(1u32..=45),
        )
            .prop_map(|(keep_last, max_age_days)| retention(keep_last, max_age_days))
    }

    fn newest_succeeded(backups: &[BackupSummary]) -> Option<&BackupSummary> {
        backups
            .iter()
            .filter(|b| b.state == BackupState::Succeeded)
            .max_by_key(|b| (b.created_at, &b.id))
    }

    proptest! {
        #[test]
        fn expired_backups_are_a_subset_of_the_input_named_once(
            backups in any_backups(), retention in any_retention()
        ) {
            let gone = expired(&backups, &retention, now());
            let input: HashSet<&BackupId> = backups.iter().map(|b| &b.id).collect();
            let unique: HashSet<&BackupId> = gone.iter().collect();
            prop_assert_eq!(unique.len(), gone.len());
            prop_assert!(unique.is_subset(&input));
        }

        #[test]
        fn the_newest_succeeded_and_those_in_progress_are_never_expired(
            backups in any_backups(), retention in any_retention()
        ) {
            let gone: HashSet<BackupId> = expired(&backups, &retention, now()).into_iter().collect();
            if let Some(newest) = newest_succeeded(&backups) {
                prop_assert!(!gone.contains(&newest.id));
            }
            for backup in backups.iter().filter(|b| b.state == BackupState::InProgress) {
                prop_assert!(!gone.contains(&backup.id));
            }
        }

        #[test]
        fn at_least_keep_last_succeeded_backups_remain(
            backups in any_backups(), retention in any_retention()
        ) {
            let gone: HashSet<BackupId> = expired(&backups, &retention, now()).into_iter().collect();
            let succeeded = backups.iter().filter(|b| b.state == BackupState::Succeeded);
            let total = succeeded.clone().count();
            let remaining = succeeded.filter(|b| !gone.contains(&b.id)).count();
            // Without keep_last, the newest succeeded is still kept.
            let floor = total.min(retention.keep_last().map_or(1, |n| n as usize));
            prop_assert!(remaining >= floor, "{remaining} of {total} remain");
        }

        #[test]
        fn young_succeeded_and_failed_backups_remain(
            backups in any_backups(), retention in any_retention()
        ) {
            let gone: HashSet<BackupId> = expired(&backups, &retention, now()).into_iter().collect();
            for backup in backups.iter().filter(|b| gone.contains(&b.id)) {
                let age = now().signed_duration_since(backup.created_at);
                match backup.state {
                    BackupState::Failed => prop_assert!(age > FAILED_RECORD_TTL),
                    _ => {
                        let max_age = retention.max_age_days().map(|d| TimeDelta::days(d.into()));
                        prop_assert!(max_age.is_none_or(|max| age > max));
                    }
                }
            }
        }

        #[test]
        fn the_answer_does_not_depend_on_the_input_order(
            backups in any_backups(), retention in any_retention()
        ) {
            let mut reversed = backups.clone();
            reversed.reverse();
            prop_assert_eq!(
                expired(&backups, &retention, now()),
                expired(&reversed, &retention, now())
            );
        }
    }
}
