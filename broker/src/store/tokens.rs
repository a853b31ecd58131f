//! Backup API tokens of service keys created with `backup_access`: each opens the backup
//! API of one instance. Only the token's SHA-256 is stored, so the store alone never
//! grants access; deleting the service key deletes its token.

use diesel::prelude::*;

use super::schema::backup_tokens::dsl;
use super::{DbConnection, now_ms};

/// Stores the digest of a binding's token (replacing one from an earlier attempt).
pub fn insert(
    conn: &mut DbConnection,
    token_sha256: &str,
    instance_id: &str,
    binding_id: &str,
) -> QueryResult<()> {
    delete_for_binding(conn, binding_id)?;
    diesel::insert_into(dsl::backup_tokens)
        .values((
            dsl::token_sha256.eq(token_sha256),
            dsl::instance_id.eq(instance_id),
            dsl::binding_id.eq(binding_id),
            dsl::created_at.eq(now_ms()),
        ))
        .execute(conn)
        .map(drop)
}

/// The instance a token digest opens.
pub fn instance_of(conn: &mut DbConnection, token_sha256: &str) -> QueryResult<Option<String>> {
    dsl::backup_tokens
        .filter(dsl::token_sha256.eq(token_sha256))
        .select(dsl::instance_id)
        .first(conn)
        .optional()
}

/// Revokes a binding's token.
pub fn delete_for_binding(conn: &mut DbConnection, binding_id: &str) -> QueryResult<()> {
    diesel::delete(dsl::backup_tokens.filter(dsl::binding_id.eq(binding_id)))
        .execute(conn)
        .map(drop)
}

/// Revokes every token of an instance (it was deleted).
pub fn delete_for_instance(conn: &mut DbConnection, instance_id: &str) -> QueryResult<()> {
    diesel::delete(dsl::backup_tokens.filter(dsl::instance_id.eq(instance_id)))
        .execute(conn)
        .map(drop)
}
