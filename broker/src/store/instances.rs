//! Service instances: what the platform asked for and what Phoenix runs for it.
//!
//! A row outlives its instance (state `deleted`) so that `last_operation` can answer
//! `410 Gone` after an asynchronous deprovision; a deleted row gives its port back.

use diesel::prelude::*;

use super::schema::instances::dsl;
use super::{DbConnection, now_ms};

/// Lifecycle states of an instance.
pub mod state {
    /// The provision operation is running.
    pub const PROVISIONING: &str = "provisioning";
    /// The server exists and serves.
    pub const PROVISIONED: &str = "provisioned";
    /// Provisioning or deprovisioning failed; only a deprovision is accepted.
    pub const FAILED: &str = "failed";
    /// The deprovision operation is running.
    pub const DEPROVISIONING: &str = "deprovisioning";
    /// Deprovisioned; kept so that polling answers 410 Gone.
    pub const DELETED: &str = "deleted";
}

/// One service instance.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::instances)]
pub struct Instance {
    pub id: String,
    pub service_id: String,
    pub plan_id: String,
    pub state: String,
    /// The parameters of the provision or last successful update (JSON object).
    pub parameters: String,
    pub context: String,
    pub organization_guid: Option<String>,
    pub space_guid: Option<String>,
    pub maintenance_version: Option<String>,
    pub engine: String,
    pub engine_version: String,
    /// The engine settings in force (JSON object of strings).
    pub settings: String,
    pub port: Option<i32>,
    pub host: Option<String>,
    pub database_name: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The instance with this ID, deleted or not.
pub fn find(conn: &mut DbConnection, id: &str) -> QueryResult<Option<Instance>> {
    dsl::instances
        .filter(dsl::id.eq(id))
        .select(Instance::as_select())
        .first(conn)
        .optional()
}

/// Serialises decisions about one instance: on PostgreSQL, locks the instance's row
/// until the transaction ends (`FOR UPDATE`), so that two requests (a bind and a
/// deprovision, say) never both see it idle and both start an operation. SQLite needs
/// nothing: [`super::write_transaction`] already admits one writer at a time. Call it
/// first in a write transaction; an instance that does not exist locks nothing (two
/// provisions of one ID meet at the primary key instead).
pub fn lock(conn: &mut DbConnection, id: &str) -> QueryResult<()> {
    if let DbConnection::Pg(pg) = conn {
        dsl::instances
            .filter(dsl::id.eq(id))
            .select(dsl::id)
            .for_update()
            .load::<String>(pg)?;
    }
    Ok(())
}

/// Stores a new instance.
pub fn insert(conn: &mut DbConnection, instance: &Instance) -> QueryResult<()> {
    diesel::insert_into(dsl::instances)
        .values(instance)
        .execute(conn)
        .map(drop)
}

/// Removes the row of a deleted instance whose ID the platform reuses.
pub fn purge_deleted(conn: &mut DbConnection, id: &str) -> QueryResult<()> {
    diesel::delete(
        dsl::instances
            .filter(dsl::id.eq(id))
            .filter(dsl::state.eq(state::DELETED)),
    )
    .execute(conn)
    .map(drop)
}

/// Ports held by instances that are not deleted.
pub fn used_ports(conn: &mut DbConnection) -> QueryResult<Vec<i32>> {
    dsl::instances
        .filter(dsl::port.is_not_null())
        .select(dsl::port.assume_not_null())
        .load(conn)
}

/// Sets an instance's lifecycle state.
pub fn set_state(conn: &mut DbConnection, id: &str, new_state: &str) -> QueryResult<()> {
    diesel::update(dsl::instances.filter(dsl::id.eq(id)))
        .set((dsl::state.eq(new_state), dsl::updated_at.eq(now_ms())))
        .execute(conn)
        .map(drop)
}

/// Records a successful provision: where the server listens.
pub fn mark_provisioned(
    conn: &mut DbConnection,
    id: &str,
    host: &str,
    port: i32,
    database: &str,
) -> QueryResult<()> {
    diesel::update(dsl::instances.filter(dsl::id.eq(id)))
        .set((
            dsl::state.eq(state::PROVISIONED),
            dsl::host.eq(host),
            dsl::port.eq(port),
            dsl::database_name.eq(database),
            dsl::updated_at.eq(now_ms()),
        ))
        .execute(conn)
        .map(drop)
}

/// Records a successful update: the plan, parameters and settings now in force.
pub fn apply_update(
    conn: &mut DbConnection,
    id: &str,
    plan_id: &str,
    parameters: &str,
    settings: &str,
    maintenance_version: Option<&str>,
) -> QueryResult<()> {
    diesel::update(dsl::instances.filter(dsl::id.eq(id)))
        .set((
            dsl::plan_id.eq(plan_id),
            dsl::parameters.eq(parameters),
            dsl::settings.eq(settings),
            dsl::maintenance_version.eq(maintenance_version),
            dsl::updated_at.eq(now_ms()),
        ))
        .execute(conn)
        .map(drop)
}

/// Records a finished deprovision and gives the port back.
pub fn mark_deleted(conn: &mut DbConnection, id: &str) -> QueryResult<()> {
    diesel::update(dsl::instances.filter(dsl::id.eq(id)))
        .set((
            dsl::state.eq(state::DELETED),
            dsl::port.eq(None::<i32>),
            dsl::updated_at.eq(now_ms()),
        ))
        .execute(conn)
        .map(drop)
}

/// Instances whose server should be running.
pub fn list_provisioned(conn: &mut DbConnection) -> QueryResult<Vec<Instance>> {
    dsl::instances
        .filter(dsl::state.eq(state::PROVISIONED))
        .order(dsl::created_at.asc())
        .select(Instance::as_select())
        .load(conn)
}

/// The instance's backup key, sealed by the master key (None: no backup yet).
pub fn backup_key(conn: &mut DbConnection, id: &str) -> QueryResult<Option<Vec<u8>>> {
    dsl::instances
        .filter(dsl::id.eq(id))
        .select(dsl::backup_key_sealed)
        .first::<Option<Vec<u8>>>(conn)
        .optional()
        .map(Option::flatten)
}

/// Stores the instance's sealed backup key unless it has one, and returns the one it has
/// now: two first backups racing agree on one key.
pub fn set_backup_key_if_absent(
    conn: &mut DbConnection,
    id: &str,
    sealed: &[u8],
) -> QueryResult<Vec<u8>> {
    diesel::update(
        dsl::instances
            .filter(dsl::id.eq(id))
            .filter(dsl::backup_key_sealed.is_null()),
    )
    .set(dsl::backup_key_sealed.eq(sealed))
    .execute(conn)?;
    backup_key(conn, id)?.ok_or(diesel::result::Error::NotFound)
}
