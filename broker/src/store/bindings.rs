//! Service bindings: one database role per binding, its password sealed with the
//! master key before it reaches this table.

use diesel::prelude::*;

use super::schema::bindings::dsl;
use super::{DbConnection, now_ms};

/// Lifecycle states of a binding.
pub mod state {
    /// The bind operation is running.
    pub const CREATING: &str = "creating";
    /// The role exists; credentials can be fetched.
    pub const CREATED: &str = "created";
    /// Binding or unbinding failed; only an unbind is accepted.
    pub const FAILED: &str = "failed";
    /// The unbind operation is running.
    pub const DELETING: &str = "deleting";
    /// Unbound; kept so that polling answers 410 Gone.
    pub const DELETED: &str = "deleted";
}

/// One service binding.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::bindings)]
pub struct Binding {
    pub id: String,
    pub instance_id: String,
    pub service_id: String,
    pub plan_id: String,
    pub state: String,
    pub parameters: String,
    pub bind_resource: String,
    pub context: String,
    pub predecessor_binding_id: Option<String>,
    pub username: Option<String>,
    /// The role's password sealed with the master key (context `binding:<id>`).
    pub password_sealed: Option<Vec<u8>>,
    pub host: Option<String>,
    pub port: Option<i32>,
    pub database_name: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The binding with this ID, deleted or not.
pub fn find(conn: &mut DbConnection, id: &str) -> QueryResult<Option<Binding>> {
    dsl::bindings
        .filter(dsl::id.eq(id))
        .select(Binding::as_select())
        .first(conn)
        .optional()
}

/// Stores a new binding.
pub fn insert(conn: &mut DbConnection, binding: &Binding) -> QueryResult<()> {
    diesel::insert_into(dsl::bindings)
        .values(binding)
        .execute(conn)
        .map(drop)
}

/// Removes the row of a deleted binding whose ID the platform reuses.
pub fn purge_deleted(conn: &mut DbConnection, id: &str) -> QueryResult<()> {
    diesel::delete(
        dsl::bindings
            .filter(dsl::id.eq(id))
            .filter(dsl::state.eq(state::DELETED)),
    )
    .execute(conn)
    .map(drop)
}

/// Sets a binding's lifecycle state.
pub fn set_state(conn: &mut DbConnection, id: &str, new_state: &str) -> QueryResult<()> {
    diesel::update(dsl::bindings.filter(dsl::id.eq(id)))
        .set((dsl::state.eq(new_state), dsl::updated_at.eq(now_ms())))
        .execute(conn)
        .map(drop)
}

/// Records created credentials.
pub fn mark_created(
    conn: &mut DbConnection,
    id: &str,
    username: &str,
    password_sealed: &[u8],
    host: &str,
    port: i32,
    database: &str,
) -> QueryResult<()> {
    diesel::update(dsl::bindings.filter(dsl::id.eq(id)))
        .set((
            dsl::state.eq(state::CREATED),
            dsl::username.eq(username),
            dsl::password_sealed.eq(password_sealed),
            dsl::host.eq(host),
            dsl::port.eq(port),
            dsl::database_name.eq(database),
            dsl::updated_at.eq(now_ms()),
        ))
        .execute(conn)
        .map(drop)
}

/// Records a finished unbind and forgets the sealed password.
pub fn mark_deleted(conn: &mut DbConnection, id: &str) -> QueryResult<()> {
    diesel::update(dsl::bindings.filter(dsl::id.eq(id)))
        .set((
            dsl::state.eq(state::DELETED),
            dsl::password_sealed.eq(None::<Vec<u8>>),
            dsl::updated_at.eq(now_ms()),
        ))
        .execute(conn)
        .map(drop)
}

/// Marks every live binding of an instance deleted (its server is gone).
pub fn delete_all_of_instance(conn: &mut DbConnection, instance_id: &str) -> QueryResult<()> {
    diesel::update(
        dsl::bindings
            .filter(dsl::instance_id.eq(instance_id))
            .filter(dsl::state.ne(state::DELETED)),
    )
    .set((
        dsl::state.eq(state::DELETED),
        dsl::password_sealed.eq(None::<Vec<u8>>),
        dsl::updated_at.eq(now_ms()),
    ))
    .execute(conn)
    .map(drop)
}
