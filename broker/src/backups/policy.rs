//! What a client asks of an instance's backup policy (the provision parameter
//! `backup_policy`, `PUT .../backup_policy`), and the policy that results.
//!
//! A request is the backup API's policy JSON with every field optional: a field that is
//! absent keeps the base policy's value (the plan's defaults when provisioning, the
//! instance's policy afterwards), a field that is `null` removes the schedule or the
//! limit. So `{"retention": {"keep_last": 3}}` changes only the count, and a complete
//! policy replaces the base outright. This module never stores anything.

use phoenix_catalog::{BackupPolicy, Retention, Schedule};
use serde::{Deserialize, Deserializer};

/// A requested change to a backup policy, as parsed from JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    /// Absent: unchanged; `Some(None)`: no scheduled backups.
    #[serde(default, deserialize_with = "present")]
    pub schedule: Option<Option<Schedule>>,
    #[serde(default)]
    pub retention: RetentionRequest,
}

/// A requested change to a retention; each limit absent (unchanged), `null` or a number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRequest {
    #[serde(default, deserialize_with = "present")]
    pub keep_last: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    pub max_age_days: Option<Option<u32>>,
}

/// Tells a field given as `null` (`Some(None)`) from an absent one (`None`, the default).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl PolicyRequest {
    /// The policy `base` becomes with this request applied.
    ///
    /// # Errors
    /// A user-facing message naming the field when a resulting limit is out of range.
    pub fn apply_to(&self, base: &BackupPolicy) -> Result<BackupPolicy, String> {
        let keep_last = self
            .retention
            .keep_last
            .unwrap_or(base.retention.keep_last());
        let max_age_days = self
            .retention
            .max_age_days
            .unwrap_or(base.retention.max_age_days());
        Ok(BackupPolicy {
            schedule: self
                .schedule
                .clone()
                .unwrap_or_else(|| base.schedule.clone()),
            retention: Retention::new(keep_last, max_age_days)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn plan_defaults() -> BackupPolicy {
        BackupPolicy {
            schedule: Some(Schedule::parse("0 3 * * *").unwrap()),
            retention: Retention::new(Some(7), Some(30)).unwrap(),
        }
    }

    fn apply(request: Value) -> Result<Value, String> {
        let request: PolicyRequest = serde_json::from_value(request).map_err(|e| e.to_string())?;
        let policy = request.apply_to(&plan_defaults())?;
        Ok(serde_json::to_value(policy).unwrap())
    }

    #[test]
    fn an_empty_request_keeps_the_plan_defaults() {
        assert_eq!(
            apply(json!({})).unwrap(),
            json!({"schedule": "0 3 * * *", "retention": {"keep_last": 7, "max_age_days": 30}})
        );
        assert_eq!(
            apply(json!({"retention": {}})).unwrap(),
            apply(json!({})).unwrap()
        );
    }

    #[test]
    fn given_fields_replace_and_absent_ones_are_kept() {
        assert_eq!(
            apply(json!({"retention": {"keep_last": 3}})).unwrap(),
            json!({"schedule": "0 3 * * *", "retention": {"keep_last": 3, "max_age_days": 30}})
        );
        assert_eq!(
            apply(json!({"schedule": "@hourly"})).unwrap(),
            json!({"schedule": "@hourly", "retention": {"keep_last": 7, "max_age_days": 30}})
        );
    }

    #[test]
    fn null_fields_remove_the_schedule_or_the_limit() {
        assert_eq!(
            apply(json!({"schedule": null, "retention": {"max_age_days": null}})).unwrap(),
            json!({"schedule": null, "retention": {"keep_last": 7, "max_age_days": null}})
        );
    }

    #[test]
    fn a_complete_policy_replaces_the_base() {
        let policy = json!({"schedule": "30 1 * * SUN", "retention": {"keep_last": 4, "max_age_days": null}});
        assert_eq!(apply(policy.clone()).unwrap(), policy);
    }

    #[test]
    fn invalid_requests_are_refused_with_a_message_naming_the_field() {
        for (request, words) in [
            (json!({"schedule": "61 * * * *"}), "minute"),
            (
                json!({"retention": {"keep_last": 0}}),
                "retention.keep_last",
            ),
            (
                json!({"retention": {"max_age_days": 40000}}),
                "retention.max_age_days",
            ),
            (json!({"schedul": "@daily"}), "unknown field"),
            (json!({"retention": {"keep": 1}}), "unknown field"),
            (json!({"retention": {"keep_last": "7"}}), "invalid type"),
        ] {
            let err = apply(request.clone()).unwrap_err();
            assert!(err.contains(words), "{request}: {err}");
        }
    }
}
