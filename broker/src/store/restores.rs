//! Restores: the record of each restore of a backup into an instance (in place) and its
//! progress, beside the operation that runs it.

use diesel::prelude::*;

use super::schema::restores::dsl;
use super::{DbConnection, now_ms};

/// States of a restore (the operation's states).
pub use super::operations::state;

/// Phases of a running restore, as the API shows them.
pub mod phase {
    /// Reading, authenticating and loading the backup beside the live data.
    pub const RESTORING: &str = "restoring";
    /// Swapping the restored data in.
    pub const SWAPPING: &str = "swapping";
}

/// One restore.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::restores)]
pub struct Restore {
    pub id: String,
    pub instance_id: String,
    pub backup_id: String,
    /// The instance the backup was taken of (this one, for a restore in place).
    pub source_instance_id: String,
    pub operation_id: String,
    pub state: String,
    pub phase: Option<String>,
    pub progress_raw_bytes: Option<i64>,
    pub progress_stored_bytes: Option<i64>,
    /// User-facing; never an internal error text.
    pub error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

impl Restore {
    /// A restore about to be run by operation `operation_id`.
    pub fn new(
        instance_id: &str,
        backup_id: &str,
        source_instance_id: &str,
        operation_id: &str,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            instance_id: instance_id.to_owned(),
            backup_id: backup_id.to_owned(),
            source_instance_id: source_instance_id.to_owned(),
            operation_id: operation_id.to_owned(),
            state: state::IN_PROGRESS.to_owned(),
            phase: None,
            progress_raw_bytes: None,
            progress_stored_bytes: None,
            error: None,
            created_at: now_ms(),
            finished_at: None,
        }
    }
}

/// Stores a new restore.
pub fn insert(conn: &mut DbConnection, restore: &Restore) -> QueryResult<()> {
    diesel::insert_into(dsl::restores)
        .values(restore)
        .execute(conn)
        .map(drop)
}

/// The restore `id` into `instance_id`.
pub fn find(conn: &mut DbConnection, instance_id: &str, id: &str) -> QueryResult<Option<Restore>> {
    dsl::restores
        .filter(dsl::id.eq(id))
        .filter(dsl::instance_id.eq(instance_id))
        .select(Restore::as_select())
        .first(conn)
        .optional()
}

/// The restore an operation runs.
pub fn find_by_operation(
    conn: &mut DbConnection,
    operation_id: &str,
) -> QueryResult<Option<Restore>> {
    dsl::restores
        .filter(dsl::operation_id.eq(operation_id))
        .select(Restore::as_select())
        .first(conn)
        .optional()
}

/// The restores into an instance, newest first.
pub fn list(conn: &mut DbConnection, instance_id: &str) -> QueryResult<Vec<Restore>> {
    dsl::restores
        .filter(dsl::instance_id.eq(instance_id))
        .order((dsl::created_at.desc(), dsl::id.desc()))
        .select(Restore::as_select())
        .load(conn)
}

/// Records the phase and progress of the running attempt.
pub fn set_progress(
    conn: &mut DbConnection,
    id: &str,
    phase: &str,
    raw: i64,
    stored: i64,
) -> QueryResult<()> {
    diesel::update(
        dsl::restores
            .filter(dsl::id.eq(id))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    )
    .set((
        dsl::phase.eq(phase),
        dsl::progress_raw_bytes.eq(raw),
        dsl::progress_stored_bytes.eq(stored),
    ))
    .execute(conn)
    .map(drop)
}

/// Ends the restore of operation `operation_id` (in the transaction that ends the
/// operation).
pub fn finish(
    conn: &mut DbConnection,
    operation_id: &str,
    new_state: &str,
    error: Option<&str>,
) -> QueryResult<()> {
    diesel::update(
        dsl::restores
            .filter(dsl::operation_id.eq(operation_id))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    )
    .set((
        dsl::state.eq(new_state),
        dsl::error.eq(error),
        dsl::phase.eq(None::<String>),
        dsl::finished_at.eq(now_ms()),
    ))
    .execute(conn)
    .map(drop)
}

/// The backups that running restores read (retention must leave them alone).
pub fn backups_being_restored(conn: &mut DbConnection) -> QueryResult<Vec<String>> {
    dsl::restores
        .filter(dsl::state.eq(state::IN_PROGRESS))
        .select(dsl::backup_id)
        .load(conn)
}
