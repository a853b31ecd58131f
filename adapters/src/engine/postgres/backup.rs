//! Streaming backup and in-place restore of a PostgreSQL instance.
//!
//! A backup is `pg_dump` of the instance database in the custom format, uncompressed (the
//! pipeline compresses), streamed from the tool's stdout. A restore never touches the
//! live database until the new data is complete: `pg_restore` fills a scratch database
//! beside it ([`SCRATCH`], owned by the superuser, so no binding can reach it half-way),
//! which marks itself complete when `pg_restore` succeeded; completing the restore then
//! swaps the two databases by renaming both in one transaction, and drops the old one.
//!
//! Objects keep their owners. A dump records the binding roles that existed at the
//! moment it sees: they are listed in a transaction whose snapshot `pg_dump` then takes
//! over (`--snapshot`), so a role created or dropped while a backup starts can never own
//! an object of the dump that the list misses. A restore creates a marked, `NOLOGIN` placeholder for each of them that does
//! not exist here (a clone's target, or a binding revoked since the dump), and before the
//! swap hands what the placeholders own to the owner role, whose members the target's
//! bindings are, and drops them. Role names from a manifest are checked against the
//! binding-role pattern before they reach SQL, and then quoted.
//!
//! Every step works out where an earlier, interrupted call stopped from the databases and
//! roles that exist, so each can be run again: [`begin`] first undoes whatever an earlier
//! restore left (as [`abandon`] does), [`complete`] finishes a swap that already
//! happened, and [`abandon`] brings the data that was live before the restore back, up
//! to the moment [`complete`] dropped it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

use tokio_postgres::Client;
use tracing::{info, warn};

use super::{
    AdminConnection, DATABASE, ENGINE, OWNER_ROLE, installed_bin_dir, quote_ident, quote_literal,
    sql_error,
};
use crate::backup::{ProcessSink, ProcessSource, Sink, Source, SourceInfo, SourceOutput};
use crate::engine::Server;
use crate::storage::ByteStream;
use crate::{Error, Result};

/// The database a restore fills before it is swapped in.
pub const SCRATCH: &str = "phoenix_restore";
/// The name of the live database between the swap and its removal.
pub const PREVIOUS: &str = "phoenix_previous";
/// The backup strategy and stream format recorded in a manifest.
const STRATEGY: &str = "stream";
const FORMAT: &str = "pg_dump-custom";
/// The [`SourceInfo::details`] entry listing the binding roles at dump time.
const ROLES_DETAIL: &str = "roles";
/// The comment that marks a role as a restore's placeholder.
const PLACEHOLDER_MARK: &str = "phoenix: restore placeholder";
/// The comment that marks the scratch database as completely restored.
const RESTORED_MARK: &str = "phoenix: restore complete";
/// The binding-role pattern (see [`super::role_name`]) as a PostgreSQL regular expression.
pub(super) const BINDING_ROLE_REGEX: &str = "^b_[0-9a-f]{32}$";

/// `PGOPTIONS` for the dump and restore tools: a plan's timeouts are for applications,
/// not for a dump or a restore that waits on a slow storage.
const TOOL_OPTIONS: &str = "-c statement_timeout=0 -c lock_timeout=0 \
     -c idle_in_transaction_session_timeout=0 -c idle_session_timeout=0";

/// Whether `name` is the name of a binding role: `b_` and 32 lower-case hex digits.
pub(super) fn is_binding_role(name: &str) -> bool {
    name.len() == 34
        && name.starts_with("b_")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn major(version: &str, what: &str) -> Result<u32> {
    version
        .parse()
        .map_err(|_| Error::Invalid(format!("{what} {version:?} is not a major version number")))
}

/// The binding roles listed in `info`, each checked against the pattern.
fn recorded_roles(info: &SourceInfo) -> Result<Vec<String>> {
    let Some(list) = info.details.get(ROLES_DETAIL) else {
        return Ok(Vec::new());
    };
    list.split(',')
        .filter(|name| !name.is_empty())
        .map(|name| {
            if is_binding_role(name) {
                Ok(name.to_owned())
            } else {
                let shown: String = name.chars().take(40).collect();
                Err(Error::Invalid(format!(
                    "the backup lists {shown:?} as a binding role, which is not a binding role name"
                )))
            }
        })
        .collect()
}

/// Refuses a backup that this server cannot restore.
fn check_restorable(server: &Server, info: &SourceInfo) -> Result<()> {
    if info.engine != ENGINE {
        return Err(Error::Invalid(format!(
            "a backup of {:?} cannot be restored into PostgreSQL",
            info.engine.chars().take(40).collect::<String>()
        )));
    }
    if info.format != FORMAT {
        return Err(Error::Invalid(format!(
            "a PostgreSQL backup in the format {:?} cannot be restored by streaming",
            info.format.chars().take(40).collect::<String>()
        )));
    }
    let server_version = major(&server.version, "the server version")?;
    let dump_version = info
        .engine_version
        .as_deref()
        .ok_or_else(|| Error::Invalid("the backup does not say its PostgreSQL version".into()))
        .and_then(|v| major(v, "the backup's PostgreSQL version"))?;
    if dump_version > server_version {
        return Err(Error::Invalid(format!(
            "a backup of PostgreSQL {dump_version} cannot be restored into PostgreSQL {server_version}"
        )));
    }
    Ok(())
}

/// A superuser session on the maintenance database, without a statement timeout
/// (dropping a large database takes its time).
pub(super) async fn maintenance_session(admin: &AdminConnection) -> Result<Client> {
    let client = admin.connect("postgres").await?;
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .map_err(|e| sql_error("preparing the maintenance session", &e))?;
    Ok(client)
}

async fn database_exists(client: &Client, name: &str) -> Result<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(|e| sql_error("looking up a database", &e))?
        .is_some())
}

/// The binding roles that exist, sorted.
pub(super) async fn binding_roles(client: &Client) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname ~ $1::text ORDER BY 1",
            &[&BINDING_ROLE_REGEX],
        )
        .await
        .map_err(|e| sql_error("listing the binding roles", &e))?;
    Ok(rows
        .iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|name| is_binding_role(name))
        .collect())
}

/// The placeholders a restore created: marked and unable to log in (a binding created
/// meanwhile under the same name can log in). They are members of the owner role, as
/// the bindings they stand for were, so that what they own can be created in the owner's
/// schemas.
async fn placeholders(client: &Client) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT rolname::text FROM pg_roles \
             WHERE rolname ~ $1::text AND NOT rolcanlogin \
               AND shobj_description(oid, 'pg_authid') = $2::text \
             ORDER BY 1",
            &[&BINDING_ROLE_REGEX, &PLACEHOLDER_MARK],
        )
        .await
        .map_err(|e| sql_error("listing restore placeholders", &e))?;
    Ok(rows
        .iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|name| is_binding_role(name))
        .collect())
}

/// Ends every session on `database` but this one's.
async fn end_sessions(client: &Client, database: &str) -> Result<()> {
    for _ in 0..50 {
        let rows = client
            .query(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&database],
            )
            .await
            .map_err(|e| sql_error("ending sessions", &e))?;
        if rows.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Engine {
        engine: ENGINE,
        message: format!("the sessions on database {database} do not end"),
    })
}

/// Drops `name`, ending its sessions (a `pg_restore` left by a dead broker included).
async fn drop_database(client: &Client, name: &str) -> Result<()> {
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .await
        .map_err(|e| sql_error("dropping a database", &e))
}

/// Puts the live database's own settings back as bootstrap made them: owned by the owner
/// role, closed to `PUBLIC`, open to connections without a limit, no restore mark. A
/// restored database (owned by the superuser until now) gets them in the swap; after an
/// interrupted step they are applied again.
fn live_settings() -> String {
    let live = quote_ident(DATABASE);
    format!(
        "ALTER DATABASE {live} OWNER TO {owner}; \
         REVOKE ALL ON DATABASE {live} FROM PUBLIC; \
         ALTER DATABASE {live} WITH ALLOW_CONNECTIONS true CONNECTION LIMIT -1; \
         COMMENT ON DATABASE {live} IS NULL",
        owner = quote_ident(OWNER_ROLE)
    )
}

/// Opens the live database to connections again, with its bootstrap settings.
async fn open_live(client: &Client) -> Result<()> {
    client
        .batch_execute(&live_settings())
        .await
        .map_err(|e| sql_error("restoring the instance database's settings", &e))
}

/// Drops the placeholder roles; they must own nothing any more.
async fn drop_placeholders(client: &Client, roles: &[String]) -> Result<()> {
    for role in roles {
        client
            .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(role)))
            .await
            .map_err(|e| sql_error("dropping a restore placeholder", &e))?;
    }
    Ok(())
}

/// Swaps `incoming` in as the live database and the live one out to `outgoing`, in one
/// transaction: a failure (or a crash) leaves both names as they were. The live database
/// is closed and its sessions ended first; on failure it is opened again.
async fn swap(client: &mut Client, incoming: &str, outgoing: &str) -> Result<()> {
    let live = quote_ident(DATABASE);
    client
        .batch_execute(&format!(
            "ALTER DATABASE {live} WITH ALLOW_CONNECTIONS false"
        ))
        .await
        .map_err(|e| sql_error("closing the instance database to connections", &e))?;
    let swapped = async {
        end_sessions(client, DATABASE).await?;
        let transaction = client
            .transaction()
            .await
            .map_err(|e| sql_error("starting the swap", &e))?;
        transaction
            .batch_execute(&format!(
                "ALTER DATABASE {live} RENAME TO {outgoing}; \
                 ALTER DATABASE {incoming} RENAME TO {live}; {settings}",
                outgoing = quote_ident(outgoing),
                incoming = quote_ident(incoming),
                settings = live_settings(),
            ))
            .await
            .map_err(|e| sql_error("swapping the databases", &e))?;
        transaction
            .commit()
            .await
            .map_err(|e| sql_error("committing the swap", &e))
    }
    .await;
    if swapped.is_err()
        && let Err(e) = open_live(client).await
    {
        warn!(error = %e, "Opening the instance database again after a failed swap failed.");
    }
    swapped
}

/// Undoes whatever a restore left, so the data that was live before it is live (again):
/// the scratch database and the placeholders go, and a swap that happened but whose old
/// database is still there is reverted.
pub(super) async fn reset(server: &Server, client: &mut Client) -> Result<()> {
    drop_database(client, SCRATCH).await?;
    if database_exists(client, PREVIOUS).await? {
        if !database_exists(client, DATABASE).await? {
            return Err(Error::Engine {
                engine: ENGINE,
                message: format!(
                    "database {DATABASE} is missing while {PREVIOUS} exists; not touching either"
                ),
            });
        }
        warn!(instance_id = %server.instance, "Reverting the swap of an unfinished restore.");
        swap(client, PREVIOUS, SCRATCH).await?;
        drop_database(client, SCRATCH).await?;
    }
    drop_placeholders(client, &placeholders(client).await?).await?;
    open_live(client).await
}

/// See [`Engine::backup_source`](crate::engine::Engine::backup_source).
pub(super) async fn backup_source(server: &Server) -> Result<Box<dyn Source>> {
    installed_bin_dir(&server.version)?;
    let admin = AdminConnection::for_server(server);
    // A snapshot can only be taken over in the database it was exported from.
    let exporter = admin.connect(DATABASE).await?;
    let snapshot = export_snapshot(&exporter).await?;
    let roles = binding_roles(&exporter).await?;
    let mut details = BTreeMap::new();
    if !roles.is_empty() {
        details.insert(ROLES_DETAIL.to_owned(), roles.join(","));
    }
    let info = SourceInfo {
        strategy: STRATEGY.to_owned(),
        engine: ENGINE.to_owned(),
        engine_version: Some(server.version.clone()),
        format: FORMAT.to_owned(),
        details,
    };
    let command = admin
        .process_command(
            "pg_dump",
            [
                "--format=custom",
                "--compress=0",
                "--no-password",
                "--lock-wait-timeout=120s",
                &format!("--snapshot={snapshot}"),
            ],
        )
        .env("PGOPTIONS", TOOL_OPTIONS);
    Ok(Box::new(SnapshotDump {
        dump: ProcessSource::new(info, command),
        exporter: Arc::new(exporter),
    }))
}

/// Opens a read-only repeatable-read transaction on `client` and exports its snapshot.
/// The transaction lasts as long as the connection: idle for as long as the dump runs,
/// whatever timeouts the plan sets for applications.
async fn export_snapshot(client: &Client) -> Result<String> {
    client
        .batch_execute(
            "SET idle_in_transaction_session_timeout = 0; SET idle_session_timeout = 0;
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        )
        .await
        .map_err(|e| sql_error("starting the dump's transaction", &e))?;
    let row = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| sql_error("exporting the dump's snapshot", &e))?;
    Ok(row.get(0))
}

/// `pg_dump` of an exported snapshot: the exporting connection lives as long as this
/// source or a stream it opened, so that the snapshot exists when `pg_dump` takes it.
#[derive(Debug)]
struct SnapshotDump {
    dump: ProcessSource,
    exporter: Arc<Client>,
}

#[async_trait::async_trait]
impl Source for SnapshotDump {
    fn info(&self) -> SourceInfo {
        self.dump.info()
    }

    async fn open(&self) -> Result<SourceOutput> {
        Ok(match self.dump.open().await? {
            SourceOutput::Stream(stream) => SourceOutput::Stream(Box::pin(Holding {
                stream,
                _exporter: self.exporter.clone(),
            })),
            reference => reference,
        })
    }
}

/// A dump's stream that keeps the snapshot's exporting connection until it is dropped.
struct Holding {
    stream: ByteStream,
    _exporter: Arc<Client>,
}

impl Stream for Holding {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

/// See [`Engine::begin_restore`](crate::engine::Engine::begin_restore).
pub(super) async fn begin(server: &Server, info: &SourceInfo) -> Result<Box<dyn Sink>> {
    check_restorable(server, info)?;
    let roles = recorded_roles(info)?;
    installed_bin_dir(&server.version)?;
    let admin = AdminConnection::for_server(server);
    let mut client = maintenance_session(&admin).await?;
    reset(server, &mut client).await?;
    let scratch = quote_ident(SCRATCH);
    // Owned by the owner role, as the live database is, because pg_restore creates every
    // object as its owner (`--use-set-session-authorization`), and they need the
    // owner's rights on the database and its public schema. A connection limit of zero
    // keeps every binding out until the swap (the superuser is exempt); the broker swaps
    // only a database whose pg_restore it saw succeed and whose data it verified.
    client
        .batch_execute(&format!(
            "CREATE DATABASE {scratch} OWNER {} TEMPLATE template0 CONNECTION LIMIT 0",
            quote_ident(OWNER_ROLE)
        ))
        .await
        .map_err(|e| sql_error("creating the restore database", &e))?;
    client
        .batch_execute(&format!("REVOKE ALL ON DATABASE {scratch} FROM PUBLIC"))
        .await
        .map_err(|e| sql_error("restricting the restore database", &e))?;
    let existing = binding_roles(&client).await?;
    let mark = quote_literal(PLACEHOLDER_MARK)?;
    let mut created = 0usize;
    for role in roles.iter().filter(|role| !existing.contains(role)) {
        let ident = quote_ident(role);
        client
            .batch_execute(&format!(
                "BEGIN; CREATE ROLE {ident} NOLOGIN; COMMENT ON ROLE {ident} IS {mark}; \
                 GRANT {owner} TO {ident}; COMMIT",
                owner = quote_ident(OWNER_ROLE)
            ))
            .await
            .map_err(|e| sql_error("creating a restore placeholder", &e))?;
        created += 1;
    }
    info!(instance_id = %server.instance, placeholders = created, "Restore database ready.");
    let scratch_admin = AdminConnection {
        database: SCRATCH.to_owned(),
        ..admin.clone()
    };
    let command = scratch_admin
        .process_command(
            "pg_restore",
            [
                "--exit-on-error",
                "--no-password",
                // Each object, its data included, is restored as its owner, never as the
                // superuser: a binding's function in a CHECK constraint or a domain runs
                // during the data load, and must not run with the superuser's rights.
                "--use-set-session-authorization",
                &format!("--dbname={SCRATCH}"),
            ],
        )
        .env("PGOPTIONS", TOOL_OPTIONS);
    Ok(Box::new(RestoreSink {
        restore: ProcessSink::new(command),
        admin,
    }))
}

/// See [`Engine::complete_restore`](crate::engine::Engine::complete_restore).
pub(super) async fn complete(server: &Server) -> Result<()> {
    let admin = AdminConnection::for_server(server);
    let mut client = maintenance_session(&admin).await?;
    if database_exists(&client, SCRATCH).await? {
        if !database_exists(&client, DATABASE).await? || database_exists(&client, PREVIOUS).await? {
            // No step of a restore leaves this (a new one reverts an unfinished swap first).
            return Err(Error::Engine {
                engine: ENGINE,
                message: format!(
                    "{SCRATCH} cannot be swapped in: {DATABASE} is missing or {PREVIOUS} exists; \
                     abandon the restore"
                ),
            });
        }
        let marked = client
            .query_one(
                "SELECT shobj_description(oid, 'pg_database') IS NOT DISTINCT FROM $2 \
                 FROM pg_database WHERE datname = $1",
                &[&SCRATCH, &RESTORED_MARK],
            )
            .await
            .map_err(|e| sql_error("checking the restore database", &e))?
            .get::<_, bool>(0);
        if !marked {
            return Err(Error::Invalid(format!(
                "the restore into {SCRATCH} did not finish; abandon it and start again"
            )));
        }
        let roles = placeholders(&client).await?;
        if !roles.is_empty() {
            let scratch = admin.connect(SCRATCH).await?;
            let owner = quote_ident(OWNER_ROLE);
            for role in &roles {
                let ident = quote_ident(role);
                scratch
                    .batch_execute(&format!(
                        "SET statement_timeout = 0; BEGIN; REASSIGN OWNED BY {ident} TO {owner}; \
                         DROP OWNED BY {ident}; COMMIT"
                    ))
                    .await
                    .map_err(|e| sql_error("handing a placeholder's objects to the owner", &e))?;
            }
            drop(scratch);
            drop_placeholders(&client, &roles).await?;
        }
        swap(&mut client, SCRATCH, PREVIOUS).await?;
        info!(instance_id = %server.instance, placeholders = roles.len(), "Restored database swapped in.");
    } else if !database_exists(&client, PREVIOUS).await? {
        // Finished before, or nothing was begun: the live database stays as it is.
        open_live(&client).await?;
        return Ok(());
    }
    open_live(&client).await?;
    drop_database(&client, PREVIOUS).await?;
    info!(instance_id = %server.instance, "Restore complete.");
    Ok(())
}

/// See [`Engine::abandon_restore`](crate::engine::Engine::abandon_restore).
pub(super) async fn abandon(server: &Server) -> Result<()> {
    let admin = AdminConnection::for_server(server);
    let mut client = maintenance_session(&admin).await?;
    reset(server, &mut client).await?;
    info!(instance_id = %server.instance, "Restore abandoned.");
    Ok(())
}

/// `pg_restore` into the scratch database, which is marked complete once the tool
/// succeeded: [`complete`] swaps in nothing else.
#[derive(Debug)]
struct RestoreSink {
    restore: ProcessSink,
    admin: AdminConnection,
}

#[async_trait::async_trait]
impl Sink for RestoreSink {
    fn name(&self) -> &'static str {
        "restore"
    }

    async fn consume(self: Box<Self>, data: ByteStream) -> Result<u64> {
        let Self { restore, admin } = *self;
        let bytes = Box::new(restore).consume(data).await?;
        let client = admin.connect("postgres").await?;
        client
            .batch_execute(&format!(
                "COMMENT ON DATABASE {} IS {}",
                quote_ident(SCRATCH),
                quote_literal(RESTORED_MARK)?
            ))
            .await
            .map_err(|e| sql_error("marking the restore database complete", &e))?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(version: &str, roles: Option<&str>) -> SourceInfo {
        SourceInfo {
            strategy: STRATEGY.into(),
            engine: ENGINE.into(),
            engine_version: Some(version.into()),
            format: FORMAT.into(),
            details: roles
                .map(|r| BTreeMap::from([(ROLES_DETAIL.to_owned(), r.to_owned())]))
                .unwrap_or_default(),
        }
    }

    #[test]
    fn every_binding_role_matches_the_pattern() {
        for id in ["a", "app-1", &"x".repeat(255)] {
            let role = super::super::role_name(&crate::ids::BindingId::parse(id).unwrap());
            assert!(is_binding_role(&role), "{role}");
        }
    }

    #[test]
    fn only_binding_role_names_are_accepted_from_a_manifest() {
        let good = "b_0123456789abcdef0123456789abcdef";
        assert_eq!(
            recorded_roles(&info("15", Some(&format!("{good},{good}")))).unwrap(),
            [good, good]
        );
        assert!(recorded_roles(&info("15", None)).unwrap().is_empty());
        for bad in [
            "postgres",
            "b_0123456789ABCDEF0123456789abcdef",
            "b_0123456789abcdef0123456789abcde",
            "b_0123456789abcdef0123456789abcdef\"; DROP ROLE x; --",
            "phoenix_owner",
        ] {
            assert!(
                matches!(
                    recorded_roles(&info("15", Some(bad))),
                    Err(Error::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_newer_dump_or_another_engine_is_refused() {
        let server = Server {
            instance: crate::ids::InstanceId::parse("i").unwrap(),
            version: "15".into(),
            volume: "/nonexistent".into(),
            socket_dir: "/nonexistent".into(),
            listen_host: "127.0.0.1".into(),
            port: 1,
            run_as: None,
            durable: false,
        };
        check_restorable(&server, &info("15", None)).unwrap();
        check_restorable(&server, &info("13", None)).unwrap();
        assert!(matches!(
            check_restorable(&server, &info("16", None)),
            Err(Error::Invalid(_))
        ));
        let mariadb = SourceInfo {
            engine: "mariadb".into(),
            ..info("15", None)
        };
        assert!(matches!(
            check_restorable(&server, &mariadb),
            Err(Error::Invalid(_))
        ));
        let unversioned = SourceInfo {
            engine_version: None,
            ..info("15", None)
        };
        assert!(check_restorable(&server, &unversioned).is_err());
    }
}
