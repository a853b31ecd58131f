//! Operations: every asynchronous OSB action, backup and restore as a row with a state
//! machine and a lease.
//!
//! A worker claims a due operation by writing its lease token and an expiry; it renews
//! the lease while it works and every later write is fenced by that token, so a worker
//! whose lease expired (a killed or stalled broker) can no longer change the operation
//! another worker has taken over. An operation never stays `in progress` without a
//! lease that some worker will either renew or let expire.

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;

use super::schema::operations::dsl;
use super::{DbConnection, now_ms, store_now, write_transaction};

/// OSB states of an operation (the strings `last_operation` returns).
pub mod state {
    pub const IN_PROGRESS: &str = "in progress";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
}

/// Kinds of operation (the `kind` label of `phoenix_operations_total`).
pub mod kind {
    pub const PROVISION: &str = "provision";
    pub const UPDATE: &str = "update";
    pub const DEPROVISION: &str = "deprovision";
    pub const BIND: &str = "bind";
    pub const UNBIND: &str = "unbind";
    pub const BACKUP: &str = "backup";
    pub const RESTORE: &str = "restore";

    /// Every kind.
    pub const ALL: [&str; 7] = [
        PROVISION,
        UPDATE,
        DEPROVISION,
        BIND,
        UNBIND,
        BACKUP,
        RESTORE,
    ];
}

/// One operation.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = super::schema::operations)]
pub struct Operation {
    pub seq: i64,
    /// The `operation` string the platform polls with.
    pub id: String,
    pub kind: String,
    pub instance_id: String,
    pub binding_id: Option<String>,
    pub state: String,
    /// User-facing; never a secret, never an internal error text.
    pub description: Option<String>,
    /// What the operation is to do (JSON; the target plan of an update, ...).
    pub payload: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_after: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

/// A new operation.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = super::schema::operations)]
pub struct NewOperation {
    pub id: String,
    pub kind: String,
    pub instance_id: String,
    pub binding_id: Option<String>,
    pub state: String,
    pub description: Option<String>,
    pub payload: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_after: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl NewOperation {
    /// An operation due now, unclaimed.
    pub fn new(
        kind: &str,
        instance_id: &str,
        binding_id: Option<&str>,
        payload: String,
        description: &str,
        max_attempts: i32,
    ) -> Self {
        let now = now_ms();
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            kind: kind.to_owned(),
            instance_id: instance_id.to_owned(),
            binding_id: binding_id.map(str::to_owned),
            state: state::IN_PROGRESS.to_owned(),
            description: Some(description.to_owned()),
            payload,
            attempts: 0,
            max_attempts,
            run_after: now,
            lease_owner: None,
            lease_until: None,
            created_at: now,
            updated_at: now,
        }
    }
}

/// Stores a new operation. A unique violation means another operation is already
/// running on the same instance or binding.
///
/// On PostgreSQL the insert also notifies [`CHANNEL`], so that idle workers of every
/// replica wake up when the transaction commits.
pub fn insert(conn: &mut DbConnection, operation: &NewOperation) -> QueryResult<()> {
    // Times were taken on this host's clock; the store's clock decides when the
    // operation is due and when its lease ends.
    let offset = store_now(conn)?.saturating_sub(now_ms());
    let operation = NewOperation {
        run_after: operation.run_after.saturating_add(offset),
        lease_until: operation.lease_until.map(|t| t.saturating_add(offset)),
        ..operation.clone()
    };
    diesel::insert_into(dsl::operations)
        .values(&operation)
        .execute(conn)?;
    if let DbConnection::Pg(pg) = conn {
        pg.batch_execute(&format!("NOTIFY {CHANNEL}"))?;
    }
    Ok(())
}

/// The PostgreSQL notification channel of due operations.
pub const CHANNEL: &str = "phoenix_operations";

/// The operation with this ID.
pub fn find(conn: &mut DbConnection, id: &str) -> QueryResult<Option<Operation>> {
    dsl::operations
        .filter(dsl::id.eq(id))
        .select(Operation::as_select())
        .first(conn)
        .optional()
}

/// The latest operation on the instance itself (not on one of its bindings).
pub fn latest_for_instance(
    conn: &mut DbConnection,
    instance_id: &str,
) -> QueryResult<Option<Operation>> {
    dsl::operations
        .filter(dsl::instance_id.eq(instance_id))
        .filter(dsl::binding_id.is_null())
        .order(dsl::seq.desc())
        .select(Operation::as_select())
        .first(conn)
        .optional()
}

/// The operation running on the instance itself, if any (not one on a binding).
pub fn running_on_instance(
    conn: &mut DbConnection,
    instance_id: &str,
) -> QueryResult<Option<Operation>> {
    Ok(latest_for_instance(conn, instance_id)?.filter(|op| op.state == state::IN_PROGRESS))
}

/// The provision, update or deprovision running on the instance, if any: what a fetch
/// of the instance or a bind must wait for (a backup or a restore stops neither).
pub fn lifecycle_running_on_instance(
    conn: &mut DbConnection,
    instance_id: &str,
) -> QueryResult<Option<Operation>> {
    Ok(running_on_instance(conn, instance_id)?.filter(|op| {
        [kind::PROVISION, kind::UPDATE, kind::DEPROVISION].contains(&op.kind.as_str())
    }))
}

/// The latest operation on a binding.
pub fn latest_for_binding(
    conn: &mut DbConnection,
    binding_id: &str,
) -> QueryResult<Option<Operation>> {
    dsl::operations
        .filter(dsl::binding_id.eq(binding_id))
        .order(dsl::seq.desc())
        .select(Operation::as_select())
        .first(conn)
        .optional()
}

/// How many operations of each kind are in progress (kinds with none are absent).
pub fn count_in_progress_by_kind(conn: &mut DbConnection) -> QueryResult<Vec<(String, i64)>> {
    dsl::operations
        .filter(dsl::state.eq(state::IN_PROGRESS))
        .group_by(dsl::kind)
        .select((dsl::kind, diesel::dsl::count_star()))
        .load(conn)
}

/// Whether any operation (on the instance or one of its bindings) is running.
pub fn any_in_progress_on_instance(
    conn: &mut DbConnection,
    instance_id: &str,
) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        dsl::operations
            .filter(dsl::instance_id.eq(instance_id))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    ))
    .get_result(conn)
}

/// Claims the oldest due operation for `token` until `now + lease_ms`.
///
/// PostgreSQL: `FOR UPDATE SKIP LOCKED`, so replicas never wait on each other's rows.
/// SQLite: a conditional update (SQLite has one writer at a time).
pub fn claim(
    conn: &mut DbConnection,
    token: &str,
    lease_ms: i64,
) -> QueryResult<Option<Operation>> {
    let now = store_now(conn)?;
    // A plain read first: an idle poll takes no write lock (SQLite has only one).
    let any_due: bool = diesel::select(diesel::dsl::exists(
        dsl::operations
            .filter(dsl::state.eq(state::IN_PROGRESS))
            .filter(dsl::run_after.le(now))
            .filter(dsl::lease_until.is_null().or(dsl::lease_until.lt(now))),
    ))
    .get_result(conn)?;
    if !any_due {
        return Ok(None);
    }
    write_transaction(conn, |conn| {
        let due = dsl::operations
            .filter(dsl::state.eq(state::IN_PROGRESS))
            .filter(dsl::run_after.le(now))
            .filter(dsl::lease_until.is_null().or(dsl::lease_until.lt(now)))
            .order(dsl::seq.asc())
            .select(dsl::seq);
        let seq: Option<i64> = match conn {
            DbConnection::Pg(pg) => due.for_update().skip_locked().first(pg).optional()?,
            DbConnection::Sqlite(_) => due.first(conn).optional()?,
        };
        let Some(seq) = seq else {
            return Ok(None);
        };
        let claimed = diesel::update(
            dsl::operations
                .filter(dsl::seq.eq(seq))
                .filter(dsl::state.eq(state::IN_PROGRESS))
                .filter(dsl::lease_until.is_null().or(dsl::lease_until.lt(now))),
        )
        .set((
            dsl::lease_owner.eq(token),
            dsl::lease_until.eq(now.saturating_add(lease_ms)),
            dsl::attempts.eq(dsl::attempts + 1),
            dsl::updated_at.eq(now),
        ))
        .execute(conn)?;
        if claimed == 0 {
            return Ok(None);
        }
        dsl::operations
            .filter(dsl::seq.eq(seq))
            .select(Operation::as_select())
            .first(conn)
            .optional()
    })
}

/// Extends the lease held by `token`. False when the lease was lost.
pub fn renew(conn: &mut DbConnection, id: &str, token: &str, lease_ms: i64) -> QueryResult<bool> {
    let now = store_now(conn)?;
    let n = diesel::update(
        dsl::operations
            .filter(dsl::id.eq(id))
            .filter(dsl::lease_owner.eq(token))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    )
    .set((
        dsl::lease_until.eq(now.saturating_add(lease_ms)),
        dsl::updated_at.eq(now),
    ))
    .execute(conn)?;
    Ok(n == 1)
}

/// Ends the operation held by `token` in `new_state`. False when the lease was lost.
pub fn finish(
    conn: &mut DbConnection,
    id: &str,
    token: &str,
    new_state: &str,
    description: &str,
) -> QueryResult<bool> {
    let now = store_now(conn)?;
    let n = diesel::update(
        dsl::operations
            .filter(dsl::id.eq(id))
            .filter(dsl::lease_owner.eq(token))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    )
    .set((
        dsl::state.eq(new_state),
        dsl::description.eq(description),
        dsl::lease_owner.eq(None::<String>),
        dsl::lease_until.eq(None::<i64>),
        dsl::updated_at.eq(now),
        dsl::finished_at.eq(now),
    ))
    .execute(conn)?;
    Ok(n == 1)
}

/// Gives the operation back for another attempt `delay_ms` from now (on the store's
/// clock). False when the lease was lost.
pub fn reschedule(
    conn: &mut DbConnection,
    id: &str,
    token: &str,
    delay_ms: i64,
    description: &str,
) -> QueryResult<bool> {
    let now = store_now(conn)?;
    let run_after = now.saturating_add(delay_ms);
    let n = diesel::update(
        dsl::operations
            .filter(dsl::id.eq(id))
            .filter(dsl::lease_owner.eq(token))
            .filter(dsl::state.eq(state::IN_PROGRESS)),
    )
    .set((
        dsl::run_after.eq(run_after),
        dsl::description.eq(description),
        dsl::lease_owner.eq(None::<String>),
        dsl::lease_until.eq(None::<i64>),
        dsl::updated_at.eq(now),
    ))
    .execute(conn)?;
    Ok(n == 1)
}

/// The payloads of the running operations of one kind.
pub fn running_payloads(conn: &mut DbConnection, of_kind: &str) -> QueryResult<Vec<String>> {
    dsl::operations
        .filter(dsl::state.eq(state::IN_PROGRESS))
        .filter(dsl::kind.eq(of_kind))
        .select(dsl::payload)
        .load(conn)
}
