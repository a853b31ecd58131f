//! Backup policies: when an instance is backed up on its own and how long its backups
//! are kept. A plan carries the defaults of new instances (its `backup` section); the
//! backup API reads and replaces an instance's policy in the same JSON shape:
//! `{"schedule": "0 3 * * *"|null, "retention": {"keep_last": int|null, "max_age_days": int|null}}`.
//!
//! Values are checked when they are parsed, so a [`BackupPolicy`] that exists is valid.
//! This module only describes policy; which backups go is decided by the broker.

use serde::{Deserialize, Serialize};

use crate::schedule::Schedule;

/// The most backups a policy can ask to keep by count.
pub const MAX_KEEP_LAST: u32 = 1000;

/// The oldest a policy can let a backup grow, in days (a hundred years).
pub const MAX_AGE_DAYS: u32 = 36_500;

/// An instance's backup schedule and retention.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupPolicy {
    /// When scheduled backups run (UTC); `None`: only on request.
    #[serde(default)]
    pub schedule: Option<Schedule>,
    /// Which succeeded backups are kept.
    #[serde(default)]
    pub retention: Retention,
}

/// Which succeeded backups are kept. Each rule that is set keeps some backups; a backup
/// no rule keeps may be deleted. With no rule set, every backup is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RetentionFields", into = "RetentionFields")]
pub struct Retention {
    keep_last: Option<u32>,
    max_age_days: Option<u32>,
}

/// The JSON shape of [`Retention`], before its checks.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFields {
    #[serde(default)]
    keep_last: Option<u32>,
    #[serde(default)]
    max_age_days: Option<u32>,
}

impl Retention {
    /// A retention that keeps the newest `keep_last` succeeded backups and those younger
    /// than `max_age_days` days.
    ///
    /// # Errors
    /// A user-facing message when `keep_last` is not 1 to 1000 or `max_age_days` not 1
    /// to 36500.
    pub fn new(keep_last: Option<u32>, max_age_days: Option<u32>) -> Result<Self, String> {
        check_range("retention.keep_last", keep_last, MAX_KEEP_LAST)?;
        check_range("retention.max_age_days", max_age_days, MAX_AGE_DAYS)?;
        Ok(Self {
            keep_last,
            max_age_days,
        })
    }

    /// How many of the newest succeeded backups are kept, whatever their age.
    pub fn keep_last(&self) -> Option<u32> {
        self.keep_last
    }

    /// Succeeded backups at most this many days old are kept.
    pub fn max_age_days(&self) -> Option<u32> {
        self.max_age_days
    }
}

fn check_range(name: &str, value: Option<u32>, max: u32) -> Result<(), String> {
    match value {
        Some(value) if !(1..=max).contains(&value) => Err(format!(
            "{name} must be from 1 to {max} (or null for no limit), not {value}"
        )),
        _ => Ok(()),
    }
}

impl TryFrom<RetentionFields> for Retention {
    type Error = String;

    fn try_from(fields: RetentionFields) -> Result<Self, String> {
        Self::new(fields.keep_last, fields.max_age_days)
    }
}

impl From<Retention> for RetentionFields {
    fn from(retention: Retention) -> Self {
        Self {
            keep_last: retention.keep_last,
            max_age_days: retention.max_age_days,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_policy_serialises_to_the_backup_api_shape() {
        let policy = BackupPolicy {
            schedule: Some(Schedule::parse("0 3 * * *").unwrap()),
            retention: Retention::new(Some(7), None).unwrap(),
        };
        let value = serde_json::to_value(&policy).unwrap();
        assert_eq!(
            value,
            json!({"schedule": "0 3 * * *", "retention": {"keep_last": 7, "max_age_days": null}})
        );
        assert_eq!(
            serde_json::from_value::<BackupPolicy>(value).unwrap(),
            policy
        );
        assert_eq!(
            serde_json::to_value(BackupPolicy::default()).unwrap(),
            json!({"schedule": null, "retention": {"keep_last": null, "max_age_days": null}})
        );
    }

    #[test]
    fn missing_fields_mean_no_schedule_and_no_limit() {
        let policy: BackupPolicy = serde_json::from_value(json!({})).unwrap();
        assert_eq!(policy, BackupPolicy::default());
        let policy: BackupPolicy =
            serde_json::from_value(json!({"retention": {"max_age_days": 30}})).unwrap();
        assert_eq!(policy.retention.max_age_days(), Some(30));
        assert_eq!(policy.retention.keep_last(), None);
    }

    #[test]
    fn out_of_range_retention_is_refused_naming_the_field() {
        for (retention, field) in [
            (json!({"keep_last": 0}), "retention.keep_last"),
            (json!({"keep_last": 1001}), "retention.keep_last"),
            (json!({"max_age_days": 0}), "retention.max_age_days"),
            (json!({"max_age_days": 36501}), "retention.max_age_days"),
        ] {
            let err = serde_json::from_value::<BackupPolicy>(json!({ "retention": retention }))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
        assert!(Retention::new(Some(1), Some(1)).is_ok());
        assert!(Retention::new(Some(MAX_KEEP_LAST), Some(MAX_AGE_DAYS)).is_ok());
    }

    #[test]
    fn unknown_fields_bad_schedules_and_negative_counts_are_refused() {
        for body in [
            json!({"schedule": "0 3 * * *", "retention": {}, "extra": 1}),
            json!({"retention": {"keep_lats": 3}}),
            json!({"retention": {"keep_last": -1}}),
            json!({"schedule": 3}),
        ] {
            assert!(
                serde_json::from_value::<BackupPolicy>(body.clone()).is_err(),
                "{body}"
            );
        }
        let err = serde_json::from_value::<BackupPolicy>(json!({"schedule": "0 3 * *"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 fields"), "{err}");
    }
}
