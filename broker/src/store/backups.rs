//! Backups: the broker's record of each backup of an instance, beside the manifest in
//! backup storage that makes it restorable.
//!
//! A row exists from the moment a backup is asked for (`in progress`) and ends
//! `succeeded` only after the manifest was written, so the API never shows a success that
//! storage cannot back. Deleting is two steps, storage first and the record second: a
//! row marked `deleting` is hidden from the API and retried by the retention sweep until
//! its objects are gone, so a record never outlives the data it names by accident, and
//! data never outlives its record unnoticed.

use diesel::prelude::*;

use super::schema::backups::dsl;
use super::{DbConnection, now_ms};

/// States of a backup (the API shows all but `deleting`).
pub mod state {
    pub const IN_PROGRESS: &str = "in progress";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    /// Its storage is being removed; the record goes once that succeeded.
    pub const DELETING: &str = "deleting";
}

/// Why a backup was taken.
pub mod trigger {
    pub const MANUAL: &str = "manual";
    pub const SCHEDULE: &str = "schedule";
}

/// One backup.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::backups)]
pub struct Backup {
    pub id: String,
    pub instance_id: String,
    pub operation_id: Option<String>,
    pub triggered_by: String,
    pub state: String,
    pub strategy: Option<String>,
    pub engine: Option<String>,
    pub engine_version: Option<String>,
    pub format: Option<String>,
    pub raw_bytes: Option<i64>,
    pub stored_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub progress_raw_bytes: Option<i64>,
    pub progress_stored_bytes: Option<i64>,
    /// User-facing; never an internal error text.
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl Backup {
    /// A backup about to be taken by operation `operation_id`.
    pub fn new(instance_id: &str, operation_id: &str, triggered_by: &str) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            instance_id: instance_id.to_owned(),
            operation_id: Some(operation_id.to_owned()),
            triggered_by: triggered_by.to_owned(),
            state: state::IN_PROGRESS.to_owned(),
            strategy: None,
            engine: None,
            engine_version: None,
            format: None,
            raw_bytes: None,
            stored_bytes: None,
            sha256: None,
            progress_raw_bytes: None,
            progress_stored_bytes: None,
            error: None,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
        }
    }
}

/// What a finished backup's manifest says, for its record.
#[derive(Debug, Clone)]
pub struct Completed {
    pub strategy: String,
    pub engine: String,
    pub engine_version: Option<String>,
    pub format: String,
    pub raw_bytes: i64,
    pub stored_bytes: i64,
    pub sha256: Option<String>,
}

/// Stores a new backup.
pub fn insert(conn: &mut DbConnection, backup: &Backup) -> QueryResult<()> {
    diesel::insert_into(dsl::backups)
        .values(backup)
        .execute(conn)
        .map(drop)
}

/// The backup `id` of `instance_id`, unless it is being deleted.
pub fn find(conn: &mut DbConnection, instance_id: &str, id: &str) -> QueryResult<Option<Backup>> {
    dsl::backups
        .filter(dsl::id.eq(id))
        .filter(dsl::instance_id.eq(instance_id))
        .filter(dsl::state.ne(state::DELETING))
        .select(Backup::as_select())
        .first(conn)
        .optional()
}

/// The backups of an instance, newest first, without those being deleted.
pub fn list(conn: &mut DbConnection, instance_id: &str) -> QueryResult<Vec<Backup>> {
    dsl::backups
        .filter(dsl::instance_id.eq(instance_id))
        .filter(dsl::state.ne(state::DELETING))
        .order((dsl::created_at.desc(), dsl::id.desc()))
        .select(Backup::as_select())
        .load(conn)
}

/// The newest succeeded backup of an instance.
pub fn latest_succeeded(conn: &mut DbConnection, instance_id: &str) -> QueryResult<Option<Backup>> {
    dsl::backups
        .filter(dsl::instance_id.eq(instance_id))
        .filter(dsl::state.eq(state::SUCCEEDED))
        .order((dsl::created_at.desc(), dsl::id.desc()))
        .select(Backup::as_select())
        .first(conn)
        .optional()
}

/// The backup an operation takes.
pub fn find_by_operation(
    conn: &mut DbConnection,
    operation_id: &str,
) -> QueryResult<Option<Backup>> {
    dsl::backups
        .filter(dsl::operation_id.eq(operation_id))
        .select(Backup::as_select())
        .first(conn)
        .optional()
}

/// Records that an attempt started (again, after an interrupted one).
pub fn mark_started(conn: &mut DbConnection, id: &str) -> QueryResult<()> {
    diesel::update(dsl::backups.filter(dsl::id.eq(id)))
        .set((
            dsl::started_at.eq(now_ms()),
            dsl::progress_raw_bytes.eq(0),
            dsl::progress_stored_bytes.eq(0),
        ))
        .execute(conn)
        .map(drop)
}

/// Records the progress of the running attempt.
pub fn set_progress(conn: &mut DbConnection, id: &str, raw: i64, stored: i64) -> QueryResult<()> {
    diesel::update(
        dsl::backups
            .filter(dsl::id.eq(id))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    )
    .set((
        dsl::progress_raw_bytes.eq(raw),
        dsl::progress_stored_bytes.eq(stored),
    ))
    .execute(conn)
    .map(drop)
}

/// Records a success (in the transaction that ends the operation).
pub fn mark_succeeded(conn: &mut DbConnection, id: &str, done: &Completed) -> QueryResult<()> {
    diesel::update(dsl::backups.filter(dsl::id.eq(id)))
        .set((
            dsl::state.eq(state::SUCCEEDED),
            dsl::strategy.eq(&done.strategy),
            dsl::engine.eq(&done.engine),
            dsl::engine_version.eq(&done.engine_version),
            dsl::format.eq(&done.format),
            dsl::raw_bytes.eq(done.raw_bytes),
            dsl::stored_bytes.eq(done.stored_bytes),
            dsl::sha256.eq(&done.sha256),
            dsl::progress_raw_bytes.eq(None::<i64>),
            dsl::progress_stored_bytes.eq(None::<i64>),
            dsl::finished_at.eq(now_ms()),
        ))
        .execute(conn)
        .map(drop)
}

/// Records a failure (in the transaction that ends the operation).
pub fn mark_failed(conn: &mut DbConnection, id: &str, error: &str) -> QueryResult<()> {
    diesel::update(
        dsl::backups
            .filter(dsl::id.eq(id))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    )
    .set((
        dsl::state.eq(state::FAILED),
        dsl::error.eq(error),
        dsl::progress_raw_bytes.eq(None::<i64>),
        dsl::progress_stored_bytes.eq(None::<i64>),
        dsl::finished_at.eq(now_ms()),
    ))
    .execute(conn)
    .map(drop)
}

/// Marks a finished backup for deletion; false when it is running or already gone.
pub fn mark_deleting(conn: &mut DbConnection, id: &str) -> QueryResult<bool> {
    let n = diesel::update(
        dsl::backups
            .filter(dsl::id.eq(id))
            .filter(dsl::state.eq_any([state::SUCCEEDED, state::FAILED])),
    )
    .set(dsl::state.eq(state::DELETING))
    .execute(conn)?;
    Ok(n == 1)
}

/// Backups whose storage is to be removed.
pub fn list_deleting(conn: &mut DbConnection) -> QueryResult<Vec<Backup>> {
    dsl::backups
        .filter(dsl::state.eq(state::DELETING))
        .order(dsl::created_at.asc())
        .select(Backup::as_select())
        .load(conn)
}

/// Removes the record (after its storage is gone).
pub fn delete(conn: &mut DbConnection, id: &str) -> QueryResult<()> {
    diesel::delete(dsl::backups.filter(dsl::id.eq(id)))
        .execute(conn)
        .map(drop)
}

/// Instances that have backups (deleted instances included): what retention looks at.
pub fn instances_with_backups(conn: &mut DbConnection) -> QueryResult<Vec<String>> {
    dsl::backups
        .filter(dsl::state.ne(state::DELETING))
        .select(dsl::instance_id)
        .distinct()
        .load(conn)
}
