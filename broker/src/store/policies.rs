//! Backup policies: the schedule and retention in force for an instance, and when the
//! scheduler next starts a backup of it.
//!
//! The row holds the effective policy (the plan's defaults, overridden by the instance's
//! parameters or the backup API). Several replicas may run the scheduler: a replica starts
//! a scheduled backup only if it moved `next_run_at` from the value it read, so one due
//! time starts one backup.

use diesel::prelude::*;

use super::schema::backup_policies::dsl;
use super::{DbConnection, now_ms};

/// One instance's policy.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = super::schema::backup_policies)]
#[diesel(treat_none_as_null = true)]
pub struct PolicyRow {
    pub instance_id: String,
    /// A cron expression (UTC); None: no scheduled backups.
    pub schedule: Option<String>,
    pub keep_last: Option<i32>,
    pub max_age_days: Option<i32>,
    /// When the next scheduled backup is due (None: never).
    pub next_run_at: Option<i64>,
    pub updated_at: i64,
}

/// The policy of an instance.
pub fn find(conn: &mut DbConnection, instance_id: &str) -> QueryResult<Option<PolicyRow>> {
    dsl::backup_policies
        .filter(dsl::instance_id.eq(instance_id))
        .select(PolicyRow::as_select())
        .first(conn)
        .optional()
}

/// Stores (inserts or replaces) the policy of an instance.
pub fn upsert(conn: &mut DbConnection, row: &PolicyRow) -> QueryResult<()> {
    let row = PolicyRow {
        updated_at: now_ms(),
        ..row.clone()
    };
    let updated =
        diesel::update(dsl::backup_policies.filter(dsl::instance_id.eq(&row.instance_id)))
            .set(&row)
            .execute(conn)?;
    if updated == 0 {
        diesel::insert_into(dsl::backup_policies)
            .values(&row)
            .execute(conn)?;
    }
    Ok(())
}

/// Policies whose next scheduled backup is due at `now`.
pub fn due(conn: &mut DbConnection, now: i64) -> QueryResult<Vec<PolicyRow>> {
    dsl::backup_policies
        .filter(dsl::next_run_at.le(now))
        .order(dsl::next_run_at.asc())
        .select(PolicyRow::as_select())
        .load(conn)
}

/// Moves the next run from `seen` (what the caller read) to `next`; false when another
/// replica (or a policy change) moved it first.
pub fn advance(
    conn: &mut DbConnection,
    instance_id: &str,
    seen: i64,
    next: Option<i64>,
) -> QueryResult<bool> {
    let n = diesel::update(
        dsl::backup_policies
            .filter(dsl::instance_id.eq(instance_id))
            .filter(dsl::next_run_at.eq(seen)),
    )
    .set(dsl::next_run_at.eq(next))
    .execute(conn)?;
    Ok(n == 1)
}
