//! PostgreSQL in physical copies of a volume (snapshots): the checkpoint before one is
//! taken, and what makes a started copy an instance's own.
//!
//! A copy carries its source's whole cluster, binding roles and their password verifiers
//! included. Adopting it sets the binding logins to exactly those the instance has now:
//! before an in-place restore, the live server's, with their current verifiers (every
//! binding keeps working, and one revoked since the snapshot does not come back); for a
//! clone or a fork, none (the source's bindings must never reach the copy). A binding
//! role that goes hands what it owns to the owner role first, as a streamed restore does
//! with its placeholders. Verifiers go from the live server into the copy in memory,
//! never into a log (administrator sessions do not log their statements).

use tracing::info;

use super::backup::{
    BINDING_ROLE_REGEX, binding_roles, is_binding_role, maintenance_session, reset,
};
use super::{AdminConnection, DATABASE, OWNER_ROLE, login_statements, quote_ident, sql_error};
use crate::engine::{BindingLogins, Server};
use crate::{Error, Result};

/// See [`Engine::prepare_snapshot`](crate::engine::Engine::prepare_snapshot).
pub(super) async fn checkpoint(server: &Server) -> Result<()> {
    let client = maintenance_session(&AdminConnection::for_server(server)).await?;
    client
        .batch_execute("CHECKPOINT")
        .await
        .map_err(|e| sql_error("checkpointing before a snapshot", &e))
}

/// See [`Engine::binding_logins`](crate::engine::Engine::binding_logins).
pub(super) async fn binding_logins(server: &Server) -> Result<BindingLogins> {
    let client = AdminConnection::for_server(server)
        .connect("postgres")
        .await?;
    let rows = client
        .query(
            "SELECT rolname::text, rolpassword FROM pg_authid \
             WHERE rolname ~ $1::text AND rolcanlogin AND rolpassword IS NOT NULL ORDER BY 1",
            &[&BINDING_ROLE_REGEX],
        )
        .await
        .map_err(|e| sql_error("reading the binding logins", &e))?;
    Ok(BindingLogins(
        rows.iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
            .filter(|(name, _)| is_binding_role(name))
            .collect(),
    ))
}

/// See [`Engine::adopt_copy`](crate::engine::Engine::adopt_copy).
pub(super) async fn adopt(server: &Server, logins: &BindingLogins) -> Result<()> {
    let admin = AdminConnection::for_server(server);
    let mut maintenance = maintenance_session(&admin).await?;
    reset(server, &mut maintenance).await?;
    let present = binding_roles(&maintenance).await?;
    let gone: Vec<&String> = present
        .iter()
        .filter(|role| !logins.0.iter().any(|(name, _)| name == *role))
        .collect();
    if !gone.is_empty() {
        let database = admin.connect(DATABASE).await?;
        let owner = quote_ident(OWNER_ROLE);
        for role in &gone {
            let ident = quote_ident(role);
            database
                .batch_execute(&format!(
                    "SET statement_timeout = 0; BEGIN; REASSIGN OWNED BY {ident} TO {owner}; \
                     DROP OWNED BY {ident}; COMMIT"
                ))
                .await
                .map_err(|e| sql_error("handing a copied login's objects to the owner", &e))?;
            maintenance
                .batch_execute(&format!("DROP ROLE {ident}"))
                .await
                .map_err(|e| sql_error("dropping a copied login", &e))?;
        }
    }
    for (role, verifier) in &logins.0 {
        if !is_binding_role(role) {
            return Err(Error::Invalid(format!(
                "{role:?} is not a binding role name"
            )));
        }
        maintenance
            .batch_execute(&login_statements(role, verifier, present.contains(role))?)
            .await
            .map_err(|e| sql_error("carrying a binding login into the copy", &e))?;
    }
    info!(
        instance_id = %server.instance,
        logins = logins.0.len(),
        dropped = gone.len(),
        "Copied volume adopted."
    );
    Ok(())
}
