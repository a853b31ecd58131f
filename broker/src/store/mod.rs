//! The state store: instances, bindings and operations in SQLite (the embedded default)
//! or PostgreSQL (production, shared by several broker replicas).
//!
//! One set of queries serves both backends through diesel's `MultiConnection`; where
//! replicas share PostgreSQL, it differs: operations are claimed with `FOR UPDATE SKIP
//! LOCKED`, a decision about an instance locks its row, times come from the database's
//! clock and migrations run under an advisory lock (SQLite has one writer and one host).
//! Migrations for both are embedded and applied before the HTTP server starts. Queries are blocking:
//! async code reaches the store only through [`Store::run`], never on a runtime thread.
//! The store never holds a secret in clear: binding passwords arrive here sealed.

pub mod backups;
pub mod bindings;
pub mod instances;
pub mod operations;
pub mod policies;
pub mod restores;
pub mod schema;
pub mod tokens;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::r2d2::{ManageConnection, Pool};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection as _, ConnectionError};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};

use crate::error::Error;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
/// The PostgreSQL advisory lock key held while migrating ("phoenix\0" in ASCII).
const MIGRATION_LOCK: i64 = 0x7068_6f65_6e69_7800;

/// A connection to either backend.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

impl fmt::Debug for DbConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pg(_) => "DbConnection::Pg",
            Self::Sqlite(_) => "DbConnection::Sqlite",
        })
    }
}

/// Where the state lives.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A PostgreSQL URL can carry a password: show only that it is one.
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Self::Postgres(_) => f.write_str("postgres://.."),
        }
    }
}

impl DatabaseUrl {
    /// `postgres://` or `postgresql://` URLs select PostgreSQL; `sqlite://PATH` or a
    /// plain path selects SQLite.
    pub fn parse(text: &str) -> Self {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Self::Postgres(text.to_owned())
        } else {
            let path = text.strip_prefix("sqlite://").unwrap_or(text);
            Self::Sqlite(PathBuf::from(path))
        }
    }

    /// One connection outside the pool (migrations, tests of locking).
    ///
    /// # Errors
    /// When the database cannot be reached.
    pub fn connect(&self) -> Result<DbConnection, ConnectionError> {
        match self {
            Self::Postgres(url) => PgConnection::establish(url).map(DbConnection::Pg),
            Self::Sqlite(path) => {
                let mut conn = SqliteConnection::establish(&path.to_string_lossy())?;
                // WAL lets readers run beside the one writer; the busy timeout makes a
                // second writer wait instead of failing at once.
                conn.batch_execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                )
                .map_err(ConnectionError::CouldntSetupConfiguration)?;
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }
}

/// Builds pooled connections for r2d2.
#[derive(Debug)]
struct Manager(DatabaseUrl);

impl ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConnection, Self::Error> {
        self.0
            .connect()
            .map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), Self::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, _conn: &mut DbConnection) -> bool {
        false
    }
}

/// The state store: a connection pool and the knowledge of its backend.
#[derive(Clone)]
pub struct Store {
    pool: Pool<Manager>,
    postgres: bool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("postgres", &self.postgres)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Applies pending migrations, then opens a pool. Blocking: call it before the
    /// runtime serves requests, or from a blocking task.
    ///
    /// # Errors
    /// When the database cannot be reached or a migration fails.
    pub fn open(url: &DatabaseUrl) -> Result<Self, Error> {
        let mut conn = url.connect()?;
        fn versions<V: fmt::Display>(
            applied: diesel::migration::Result<Vec<V>>,
        ) -> Result<Vec<String>, Error> {
            applied
                .map(|versions| versions.iter().map(ToString::to_string).collect())
                .map_err(|e| Error::Migration(e.to_string()))
        }
        let applied = match &mut conn {
            DbConnection::Pg(c) => {
                // Replicas starting together would each run the pending migrations:
                // one at a time, the later ones then find nothing pending. The lock is
                // the session's, so it goes with the connection even on an error.
                c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
                let applied = versions(c.run_pending_migrations(POSTGRES_MIGRATIONS));
                c.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
                applied?
            }
            DbConnection::Sqlite(c) => versions(c.run_pending_migrations(SQLITE_MIGRATIONS))?,
        };
        for version in applied {
            tracing::info!(%version, "Applied a state store migration.");
        }
        drop(conn);
        let postgres = matches!(url, DatabaseUrl::Postgres(_));
        // SQLite has one writer at a time; a small pool keeps lock waits short.
        let max_size = if postgres { 16 } else { 8 };
        let pool = Pool::builder()
            .max_size(max_size)
            .connection_timeout(Duration::from_secs(10))
            .build(Manager(url.clone()))?;
        Ok(Self { pool, postgres })
    }

    /// True when the backend is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// Runs blocking store work on the blocking thread pool.
    ///
    /// # Errors
    /// When no connection is available, the work fails, or its thread panics.
    pub async fn run<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, Error> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            work(&mut conn)
        })
        .await
        .map_err(|e| Error::Blocking(e.to_string()))?
    }

    /// True when the database answers a trivial query.
    pub async fn is_reachable(&self) -> bool {
        self.run(|conn| Ok(conn.batch_execute("SELECT 1")?))
            .await
            .is_ok()
    }
}

/// Runs `work` in a write transaction: `BEGIN IMMEDIATE` on SQLite, so two writers
/// queue on the lock instead of failing when one upgrades a read to a write (WAL mode
/// refuses that upgrade at once); an ordinary transaction on PostgreSQL. `work` must not
/// open a transaction of its own.
///
/// # Errors
/// Whatever `work` returns (the transaction is rolled back), or a failed commit.
pub fn write_transaction<T, E, F>(conn: &mut DbConnection, work: F) -> Result<T, E>
where
    E: From<diesel::result::Error>,
    F: FnOnce(&mut DbConnection) -> Result<T, E>,
{
    if matches!(conn, DbConnection::Pg(_)) {
        return conn.transaction(work);
    }
    conn.batch_execute("BEGIN IMMEDIATE")?;
    match work(conn) {
        Ok(value) => match conn.batch_execute("COMMIT") {
            Ok(()) => Ok(value),
            Err(e) => {
                // A failed COMMIT leaves the transaction open: end it before the
                // connection goes back to the pool.
                let _ = conn.batch_execute("ROLLBACK");
                Err(e.into())
            }
        },
        Err(e) => {
            if let Err(rollback) = conn.batch_execute("ROLLBACK") {
                tracing::warn!(error = %rollback, "Rolling back a state store transaction failed.");
            }
            Err(e)
        }
    }
}

/// Milliseconds since the Unix epoch: how the store keeps time on both backends.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The store's clock, in milliseconds since the Unix epoch: the database server's clock
/// on PostgreSQL, so that the leases and backoffs of every replica are measured on one
/// clock and a replica whose clock is off neither steals a running operation nor holds
/// an expired one; this host's clock on SQLite (one host anyway).
///
/// # Errors
/// When the query fails.
pub fn store_now(conn: &mut DbConnection) -> diesel::QueryResult<i64> {
    use diesel::RunQueryDsl as _;
    match conn {
        DbConnection::Pg(pg) => diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        ))
        .get_result(pg),
        DbConnection::Sqlite(_) => Ok(now_ms()),
    }
}

/// A duration as store milliseconds.
pub fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// True when a database error is a unique constraint violation.
pub fn is_unique_violation(error: &diesel::result::Error) -> bool {
    matches!(
        error,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}
