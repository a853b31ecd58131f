//! The PostgreSQL engine: one cluster per instance, initialised with `initdb`, run with
//! `pg_ctl`, administered over its unix socket.
//!
//! Layout of a volume: `data/` (the cluster; `phoenix.conf` there holds everything Phoenix
//! sets and is included last from `postgresql.conf`), `run/` (the unix socket, mode 0700,
//! so only the server's user and root reach the trusted administrator login),
//! `postgresql.log` (start-up output) and `log/` (the logging collector's files, one per
//! hour of the day, reused daily, so the logs stay bounded). Clients come over TCP with SCRAM-SHA-256 only; the superuser cannot
//! log in over TCP at all.
//!
//! Bindings get one role each. Their password is turned into a SCRAM verifier here, so
//! the cleartext never reaches the server (nor its log). Each binding role is a member of
//! the instance's owner role and starts its sessions as that role, so whatever an
//! application creates belongs to the owner and survives the binding. This module never
//! formats a user's string into SQL: role names are derived from validated binding IDs
//! by a hash, and every identifier is quoted.

pub mod backup;
mod copy;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::digest::{SHA256, digest};
use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio_postgres::{Client, NoTls};
use tracing::{debug, info, warn};

use super::{BindingLogins, Credentials, Endpoint, Engine, EngineKind, Server, ServerState};
use crate::backup::{ProcessCommand, Sink, Source, SourceInfo};
use crate::ids::BindingId;
use crate::infrastructure::host::{self, RunAs};
use crate::keys::random_bytes;
use crate::{Error, Result};

/// The database every instance holds; bindings connect to it.
pub const DATABASE: &str = "phoenix";
/// The role that owns the instance's database and everything bindings create in it.
pub const OWNER_ROLE: &str = "phoenix_owner";
/// The cluster's superuser: reachable only over the unix socket.
pub const SUPERUSER: &str = "postgres";
/// Where Debian installs the versioned PostgreSQL binaries.
const BIN_ROOT: &str = "/usr/lib/postgresql";
/// The file in the data directory that holds what Phoenix sets.
const CONFIG_FILE: &str = "phoenix.conf";
const INCLUDE_LINE: &str = "include = 'phoenix.conf'";
/// Longest unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Settings that change where the server listens: the running server cannot be asked
/// about them on its new address, and all of them need a restart.
const LISTEN_SETTINGS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_permissions",
];
const PASSWORD_LEN: usize = 40;
const ENGINE: &str = "postgresql";

/// The PostgreSQL engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Postgres;

/// How a plan setting's value must look.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Integer { min: u64, max: u64 },
    Memory,
    Duration,
    Real { max: f64 },
    Boolean,
}

/// The settings a plan may set. Everything else (addresses, files, authentication,
/// logging, durability) is Phoenix's business.
const PLAN_SETTINGS: &[(&str, Kind)] = &[
    (
        "max_connections",
        Kind::Integer {
            min: 5,
            max: 10_000,
        },
    ),
    ("shared_buffers", Kind::Memory),
    ("effective_cache_size", Kind::Memory),
    ("work_mem", Kind::Memory),
    ("maintenance_work_mem", Kind::Memory),
    ("temp_buffers", Kind::Memory),
    ("wal_buffers", Kind::Memory),
    ("max_wal_size", Kind::Memory),
    ("min_wal_size", Kind::Memory),
    ("checkpoint_timeout", Kind::Duration),
    ("checkpoint_completion_target", Kind::Real { max: 1.0 }),
    ("random_page_cost", Kind::Real { max: 1e6 }),
    ("seq_page_cost", Kind::Real { max: 1e6 }),
    (
        "effective_io_concurrency",
        Kind::Integer { min: 0, max: 1000 },
    ),
    (
        "default_statistics_target",
        Kind::Integer {
            min: 1,
            max: 10_000,
        },
    ),
    ("max_worker_processes", Kind::Integer { min: 0, max: 1024 }),
    ("max_parallel_workers", Kind::Integer { min: 0, max: 1024 }),
    (
        "max_parallel_workers_per_gather",
        Kind::Integer { min: 0, max: 1024 },
    ),
    (
        "max_parallel_maintenance_workers",
        Kind::Integer { min: 0, max: 1024 },
    ),
    (
        "max_locks_per_transaction",
        Kind::Integer {
            min: 10,
            max: 1_000_000,
        },
    ),
    (
        "max_prepared_transactions",
        Kind::Integer {
            min: 0,
            max: 10_000,
        },
    ),
    ("max_wal_senders", Kind::Integer { min: 0, max: 100 }),
    ("autovacuum_max_workers", Kind::Integer { min: 1, max: 100 }),
    ("statement_timeout", Kind::Duration),
    ("lock_timeout", Kind::Duration),
    ("idle_in_transaction_session_timeout", Kind::Duration),
    ("idle_session_timeout", Kind::Duration),
    ("jit", Kind::Boolean),
];

fn value_is_valid(kind: Kind, value: &str) -> bool {
    if value.is_empty() || value.len() > 24 {
        return false;
    }
    let with_unit = |units: &[&str]| {
        let digits = value.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && units.contains(&&value[digits..])
    };
    match kind {
        Kind::Integer { min, max } => {
            value.bytes().all(|b| b.is_ascii_digit())
                && value.parse::<u64>().is_ok_and(|v| (min..=max).contains(&v))
        }
        Kind::Memory => with_unit(&["", "B", "kB", "MB", "GB", "TB"]),
        Kind::Duration => with_unit(&["", "us", "ms", "s", "min", "h", "d"]),
        Kind::Real { max } => {
            value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && value.parse::<f64>().is_ok_and(|v| (0.0..=max).contains(&v))
        }
        Kind::Boolean => matches!(value, "on" | "off" | "true" | "false"),
    }
}

fn shown(value: &str) -> String {
    let cut: String = value.chars().take(40).collect();
    format!("{cut:?}")
}

/// Validates plan settings for PostgreSQL.
///
/// # Errors
/// [`Error::Invalid`] for a name that is not a plan setting or a malformed value.
fn validate(settings: &BTreeMap<String, String>) -> Result<()> {
    for (name, value) in settings {
        let Some((_, kind)) = PLAN_SETTINGS.iter().find(|(n, _)| n == name) else {
            return Err(Error::Invalid(format!(
                "PostgreSQL setting {} is not one a plan may set",
                shown(name)
            )));
        };
        if !value_is_valid(*kind, value) {
            return Err(Error::Invalid(format!(
                "PostgreSQL setting {name} has an invalid value {}",
                shown(value)
            )));
        }
    }
    Ok(())
}

/// The directory of the PostgreSQL `version` binaries (`initdb`, `pg_ctl`, `pg_dump`...).
pub fn bin_dir(version: &str) -> PathBuf {
    Path::new(BIN_ROOT).join(version).join("bin")
}

fn installed_bin_dir(version: &str) -> Result<PathBuf> {
    let dir = bin_dir(version);
    if dir.join("postgres").is_file() {
        Ok(dir)
    } else {
        Err(Error::Invalid(format!(
            "PostgreSQL {version} is not installed ({} is missing)",
            dir.join("postgres").display()
        )))
    }
}

fn data_dir(server: &Server) -> PathBuf {
    server.volume.join("data")
}

fn socket_dir(server: &Server) -> PathBuf {
    server.socket_dir.clone()
}

/// The socket directory lives outside the volume: (re)made before every start.
fn create_socket_dir(server: &Server) -> Result<()> {
    let dir = &server.socket_dir;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    host::create_private_dir(dir, server.run_as.as_ref())
}

/// What the server writes before its logging collector runs (`pg_ctl -l`).
fn log_file(server: &Server) -> PathBuf {
    server.volume.join("postgresql.log")
}

/// The logging collector's directory: one file per hour of the day, each truncated when
/// its hour comes round again, so the logs of the last day are kept and no more.
fn log_dir(server: &Server) -> PathBuf {
    server.volume.join("log")
}

/// The configuration the server was last started or reloaded with (kept by the broker).
fn applied_config(server: &Server) -> PathBuf {
    server.volume.join("phoenix.conf.applied")
}

/// A file the broker reads in the server user's directories (never through a symlink).
async fn read_optional(path: &Path) -> Result<Option<String>> {
    Ok(host::read_file(path)
        .await?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
}

/// A string in postgresql.conf syntax.
fn conf_string(value: &str) -> Result<String> {
    if value.chars().any(|c| c.is_control()) {
        return Err(Error::Invalid(format!(
            "{} cannot be written to a PostgreSQL configuration file",
            shown(value)
        )));
    }
    Ok(format!(
        "'{}'",
        value.replace('\\', "\\\\").replace('\'', "''")
    ))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| Error::Invalid(format!("{} is not valid UTF-8", path.display())))
}

/// `phoenix.conf` for `server` with the plan's `settings` (validated).
fn render_config(server: &Server, settings: &BTreeMap<String, String>) -> Result<String> {
    validate(settings)?;
    let sockets = socket_dir(server);
    let socket_path_len = path_str(&sockets)?.len() + "/.s.PGSQL.".len() + 5 + ".lock".len();
    if socket_path_len > MAX_SOCKET_PATH {
        return Err(Error::Invalid(format!(
            "the socket directory {} is too long for a unix socket; use a shorter data directory",
            sockets.display()
        )));
    }
    let mut lines: Vec<(&str, String)> = vec![
        ("listen_addresses", conf_string(&server.listen_host)?),
        ("port", server.port.to_string()),
        ("unix_socket_directories", conf_string(path_str(&sockets)?)?),
        ("unix_socket_permissions", "0700".into()),
        ("password_encryption", "'scram-sha-256'".into()),
        ("logging_collector", "on".into()),
        ("log_directory", conf_string(path_str(&log_dir(server))?)?),
        ("log_filename", "'postgresql-%H.log'".into()),
        ("log_rotation_age", "'1h'".into()),
        ("log_rotation_size", "'10MB'".into()),
        ("log_truncate_on_rotation", "on".into()),
    ];
    if !server.durable {
        // Commits still reach the OS, so a killed server loses nothing; a host crash may.
        lines.push(("fsync", "off".into()));
    }
    for (name, value) in settings {
        lines.push((name, conf_string(value)?));
    }
    let mut text = String::from(
        "# Managed by Phoenix: rewritten from the instance's plan on every change. Do not edit.\n",
    );
    for (name, value) in lines {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{name} = {value}");
    }
    Ok(text)
}

fn parse_config(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(" = "))
        .collect()
}

/// The names whose value differs between two renderings of `phoenix.conf`.
fn changed_names(old: &str, new: &str) -> Vec<String> {
    let (old, new) = (parse_config(old), parse_config(new));
    let mut names: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|name| old.get(*name) != new.get(*name))
        .map(|name| (*name).to_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

const PG_HBA: &str = "\
# Managed by Phoenix.
# The administrator (the broker) comes over the unix socket, whose directory only the
# server's user and root may enter. Every client comes over TCP with SCRAM-SHA-256; the
# superuser never logs in over TCP.
local   all             all                             trust
local   replication     all                             trust
host    all             postgres        0.0.0.0/0       reject
host    all             postgres        ::/0            reject
host    all             all             0.0.0.0/0       scram-sha-256
host    all             all             ::/0            scram-sha-256
";

/// The role of a binding: `b_` and 32 hex digits of SHA-256 of its ID (fits PostgreSQL's
/// 63-byte limit whatever the ID, and needs no quoting).
pub fn role_name(binding: &BindingId) -> String {
    let hash = digest(&SHA256, binding.as_str().as_bytes());
    format!("b_{}", hex::encode(&hash.as_ref()[..16]))
}

/// A random password of letters and digits (about 238 bits), safe in any URL.
fn random_password() -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // Bytes at or above this bound would make some characters more likely than others.
    let bound = u8::try_from(256 - 256 % ALPHABET.len()).unwrap_or(u8::MAX);
    let mut password = String::with_capacity(PASSWORD_LEN);
    let mut buf = [0u8; 64];
    while password.len() < PASSWORD_LEN {
        random_bytes(&mut buf)?;
        for &b in buf.iter().filter(|&&b| b < bound) {
            if password.len() < PASSWORD_LEN {
                password.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    Ok(password)
}

/// The statements that make `role` a binding's login with the SCRAM `verifier` (creating
/// the role unless it `exists`), a member of the owner role whose sessions start as the
/// owner, in one transaction.
fn login_statements(role: &str, verifier: &str, exists: bool) -> Result<String> {
    let ident = quote_ident(role);
    let verifier = quote_literal(verifier)?;
    let create = if exists {
        format!("ALTER ROLE {ident} WITH LOGIN PASSWORD {verifier}")
    } else {
        format!(
            "CREATE ROLE {ident} WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE \
             NOREPLICATION PASSWORD {verifier}"
        )
    };
    Ok(format!(
        "BEGIN; {create}; GRANT {owner} TO {ident}; ALTER ROLE {ident} SET role = {owner_literal}; \
         COMMIT",
        owner = quote_ident(OWNER_ROLE),
        owner_literal = quote_literal(OWNER_ROLE)?,
    ))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal for values Phoenix made itself (constants, SCRAM verifiers).
fn quote_literal(value: &str) -> Result<String> {
    if value.contains('\\') || value.contains('\0') {
        return Err(Error::Invalid(
            "refusing to quote a value with a backslash or NUL".into(),
        ));
    }
    Ok(format!("'{}'", value.replace('\'', "''")))
}

fn sql_error(context: &str, error: &tokio_postgres::Error) -> Error {
    let detail = match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                let _ = write!(text, ": {cause}");
                source = cause.source();
            }
            text
        }
    };
    Error::Engine {
        engine: ENGINE,
        message: format!("{context}: {detail}"),
    }
}

/// How to reach one instance as its administrator: over the unix socket as the
/// superuser, and with the engine's own tools. The backup workflow uses it to run
/// `pg_dump` and `pg_restore` against an instance.
#[derive(Debug, Clone)]
pub struct AdminConnection {
    /// The instance's PostgreSQL binaries (`pg_dump`, `pg_restore`, `psql` of its version).
    pub bin_dir: PathBuf,
    /// The directory of the server's unix socket.
    pub socket_dir: PathBuf,
    /// The server's port (names the socket file).
    pub port: u16,
    /// The superuser.
    pub user: String,
    /// The instance's database.
    pub database: String,
    /// The user the tools must run as to enter the socket directory (None: current user).
    pub run_as: Option<RunAs>,
    /// A directory the tools may use as their working directory.
    pub work_dir: PathBuf,
}

impl AdminConnection {
    /// The administrator's access to `server`.
    pub fn for_server(server: &Server) -> Self {
        Self {
            bin_dir: bin_dir(&server.version),
            socket_dir: socket_dir(server),
            port: server.port,
            user: SUPERUSER.to_owned(),
            database: DATABASE.to_owned(),
            run_as: server.run_as.clone(),
            work_dir: server.volume.clone(),
        }
    }

    /// A command for the tool `tool` (a file name in [`bin_dir`](Self::bin_dir), such as
    /// `pg_dump`), run as the server's user with `PGHOST`, `PGPORT`, `PGUSER` and
    /// `PGDATABASE` pointing at the instance. No password is needed or passed.
    pub fn command(&self, tool: &str) -> Command {
        let mut cmd = host::command(
            &self.bin_dir.join(tool),
            self.run_as.as_ref(),
            &self.work_dir,
        );
        cmd.env("PGHOST", &self.socket_dir)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", &self.user)
            .env("PGDATABASE", &self.database);
        cmd
    }

    /// The tool `tool` with `args` as a [`ProcessCommand`] for a backup's source or a
    /// restore's sink: the same user, working directory and `PG*` environment as
    /// [`command`](Self::command), and no password.
    pub fn process_command(
        &self,
        tool: &str,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> ProcessCommand {
        let mut command = ProcessCommand::new(self.bin_dir.join(tool), args)
            .env("PGHOST", self.socket_dir.display().to_string())
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", &self.user)
            .env("PGDATABASE", &self.database);
        command.current_dir = Some(self.work_dir.clone());
        command.uid = self.run_as.as_ref().map(|user| user.uid);
        command.gid = self.run_as.as_ref().map(|user| user.gid);
        command
    }

    /// A connection to `database` as the superuser. Its statements are kept out of the
    /// server log even when they fail (they may carry password verifiers), and limited to
    /// 30 s of lock waits and 120 s each (`SET statement_timeout = 0` for longer work).
    ///
    /// # Errors
    /// [`Error::Engine`] when the server does not accept the connection in time.
    pub async fn connect(&self, database: &str) -> Result<Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.user)
            .dbname(database)
            .application_name("phoenix")
            .connect_timeout(Duration::from_secs(10));
        let limit = Duration::from_secs(15);
        let (client, connection) = tokio::time::timeout(limit, config.connect(NoTls))
            .await
            .map_err(|_| Error::Timeout {
                what: format!("connecting to {}", self.socket_dir.display()),
                after: limit,
            })?
            .map_err(|e| sql_error("connecting as administrator", &e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "Administrator connection ended.");
            }
        });
        client
            .batch_execute(
                "SET log_statement = 'none'; SET log_min_error_statement = 'panic'; \
                 SET lock_timeout = '30s'; SET statement_timeout = '120s'",
            )
            .await
            .map_err(|e| sql_error("preparing the administrator session", &e))?;
        Ok(client)
    }
}

impl Postgres {
    fn tool(server: &Server, bin: &Path, name: &str) -> Command {
        host::command(&bin.join(name), server.run_as.as_ref(), &server.volume)
    }

    /// Runs `postgres -C` on the configuration files, which fails on any value the server
    /// would refuse at start.
    async fn check_config(server: &Server) -> Result<()> {
        let bin = installed_bin_dir(&server.version)?;
        let mut cmd = Self::tool(server, &bin, "postgres");
        cmd.arg("-D")
            .arg(data_dir(server))
            .args(["-C", "max_connections"]);
        host::run("postgres -C", cmd).await.map(drop)
    }

    async fn pg_ctl(server: &Server, args: &[&str], what: &str) -> Result<()> {
        let bin = installed_bin_dir(&server.version)?;
        let mut cmd = Self::tool(server, &bin, "pg_ctl");
        cmd.arg("-D").arg(data_dir(server)).args(args);
        host::run(what, cmd).await.map(drop)
    }

    async fn needs_restart(&self, server: &Server, changed: &[String]) -> Result<bool> {
        if changed
            .iter()
            .any(|name| LISTEN_SETTINGS.contains(&name.as_str()))
        {
            return Ok(true);
        }
        let client = match AdminConnection::for_server(server)
            .connect("postgres")
            .await
        {
            Ok(client) => client,
            Err(e) => {
                // A server that cannot be asked (still starting, say) gets a restart, which
                // applies every setting.
                warn!(instance_id = %server.instance, error = %e, "Cannot ask PostgreSQL which settings need a restart.");
                return Ok(true);
            }
        };
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_settings \
                 WHERE name::text = ANY($1::text[]) AND context = 'postmaster'",
                &[&changed],
            )
            .await
            .map_err(|e| sql_error("reading setting contexts", &e))?;
        Ok(row.get::<_, i64>(0) > 0)
    }

    fn write_server_file(server: &Server, name: &str, contents: &str) -> Result<()> {
        let path = data_dir(server).join(name);
        // Synchronous on purpose (a small file): a write on a blocking thread would go on
        // after its caller was cancelled and race with the next call's write.
        host::write_file_atomically(&path, contents.as_bytes(), server.run_as.as_ref())
    }

    async fn ensure_included(server: &Server) -> Result<()> {
        let path = data_dir(server).join("postgresql.conf");
        let text = read_optional(&path).await?.ok_or_else(|| {
            Error::io(
                format!("reading {}", path.display()),
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
        if text.lines().any(|line| line.trim() == INCLUDE_LINE) {
            return Ok(());
        }
        let mut text = text;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("\n# Phoenix's settings, last so that they win.\n");
        text.push_str(INCLUDE_LINE);
        text.push('\n');
        Self::write_server_file(server, "postgresql.conf", &text)
    }

    /// Removes what a dead server left behind so that the next start is not refused.
    async fn clear_stale_files(server: &Server) -> Result<()> {
        let pid_file = data_dir(server).join("postmaster.pid");
        match tokio::fs::remove_file(&pid_file).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", pid_file.display()), e)),
        }
        let sockets = socket_dir(server);
        if let Ok(mut entries) = tokio::fs::read_dir(&sockets).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                    let _ = tokio::fs::remove_file(entry.path()).await;
                }
            }
        }
        Ok(())
    }

    /// Clears what a dead server left (its pid file, orphaned backends, sockets) so that
    /// a start is not refused. Only under the instance's lock, from [`Engine::start`].
    async fn clear_if_stale(&self, server: &Server) -> Result<()> {
        let data = data_dir(server);
        let pid_file = data.join("postmaster.pid");
        let mut state = self.state(server).await?;
        // A postmaster fills its pid file right after creating it: give an empty or
        // partial one a moment before calling it stale.
        for _ in 0..50 {
            if state != ServerState::Starting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            state = self.state(server).await?;
        }
        if let ServerState::Running { .. } = state {
            return Ok(());
        }
        match tokio::fs::symlink_metadata(&pid_file).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("inspecting {}", pid_file.display()), e)),
        }
        warn!(instance_id = %server.instance, "Removing the stale pid file of a dead PostgreSQL server.");
        // Backends of a killed postmaster still hold its shared memory, and the next
        // postmaster refuses to start beside them.
        host::kill_processes_in(&data).await?;
        Self::clear_stale_files(server).await
    }
}

#[async_trait]
impl Engine for Postgres {
    fn kind(&self) -> EngineKind {
        EngineKind::Postgres
    }

    fn validate_settings(&self, settings: &BTreeMap<String, String>) -> Result<()> {
        validate(settings)
    }

    async fn initialise(&self, server: &Server, settings: &BTreeMap<String, String>) -> Result<()> {
        render_config(server, settings)?;
        let bin = installed_bin_dir(&server.version)?;
        create_socket_dir(server)?;
        let mut cmd = Self::tool(server, &bin, "initdb");
        cmd.arg("-D").arg(data_dir(server)).args([
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        if !server.durable {
            cmd.arg("-N");
        }
        host::run("initdb", cmd).await?;
        Self::write_server_file(server, "pg_hba.conf", PG_HBA)?;
        Self::ensure_included(server).await?;
        self.configure(server, settings).await
    }

    async fn configure(&self, server: &Server, settings: &BTreeMap<String, String>) -> Result<()> {
        let text = render_config(server, settings)?;
        let path = data_dir(server).join(CONFIG_FILE);
        let current = read_optional(&path).await?;
        if current.as_deref() != Some(text.as_str()) {
            Self::write_server_file(server, CONFIG_FILE, &text)?;
            if let Err(e) = Self::check_config(server).await {
                match &current {
                    Some(old) => Self::write_server_file(server, CONFIG_FILE, old)?,
                    None => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                return Err(e);
            }
        }
        // What the running server uses may lag behind the file when an earlier call was
        // interrupted between writing it and restarting: compare with what was applied.
        let applied_path = applied_config(server);
        let applied = read_optional(&applied_path)
            .await?
            .or(current)
            .unwrap_or_default();
        if applied == text {
            return Ok(());
        }
        if self.state(server).await? != ServerState::Stopped {
            let changed = changed_names(&applied, &text);
            if self.needs_restart(server, &changed).await? {
                info!(instance_id = %server.instance, ?changed, "Restarting PostgreSQL to apply settings.");
                self.stop(server).await?;
                self.start(server).await?;
            } else {
                info!(instance_id = %server.instance, ?changed, "Reloading PostgreSQL settings.");
                Self::pg_ctl(server, &["reload"], "pg_ctl reload").await?;
            }
        }
        host::write_file_atomically(&applied_path, text.as_bytes(), None)
    }

    async fn state(&self, server: &Server) -> Result<ServerState> {
        let data = data_dir(server);
        let Some(text) = read_optional(&data.join("postmaster.pid")).await? else {
            return Ok(ServerState::Stopped);
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            return Ok(ServerState::Starting);
        };
        // A postmaster works in its data directory; a pid reused by anything else is not it.
        let ours = host::is_alive(pid)
            && host::command_line(pid)
                .first()
                .is_some_and(|program| program.ends_with("postgres"))
            && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == data);
        Ok(if ours {
            ServerState::Running { pid }
        } else {
            ServerState::Stopped
        })
    }

    async fn start(&self, server: &Server) -> Result<()> {
        self.clear_if_stale(server).await?;
        if let ServerState::Running { .. } = self.state(server).await? {
            return Ok(());
        }
        let bin = installed_bin_dir(&server.version)?;
        create_socket_dir(server)?;
        let log = log_file(server);
        let mut cmd = Self::tool(server, &bin, "pg_ctl");
        cmd.arg("-D")
            .arg(data_dir(server))
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "120", "start"]);
        let captured = host::capture("pg_ctl start", cmd).await?;
        if captured.status.success() {
            info!(instance_id = %server.instance, port = server.port, "PostgreSQL started.");
            Ok(())
        } else if let ServerState::Running { pid } = self.state(server).await? {
            // A start that was interrupted earlier (its pg_ctl killed) won the race.
            info!(instance_id = %server.instance, pid, "PostgreSQL was started already.");
            Ok(())
        } else {
            let tail = host::file_tail(&log, 2048).await;
            Err(host::failed(
                "pg_ctl start",
                &captured,
                &format!("server log: {tail}"),
            ))
        }
    }

    async fn stop(&self, server: &Server) -> Result<()> {
        let data = data_dir(server);
        let pid = match self.state(server).await? {
            ServerState::Running { pid } => pid,
            ServerState::Stopped => return Ok(()),
            ServerState::Starting => {
                // No pid to ask pg_ctl about: whatever runs in the data directory goes.
                warn!(instance_id = %server.instance, "Killing a PostgreSQL server that has not written its pid.");
                host::kill_processes_in(&data).await?;
                return Self::clear_stale_files(server).await;
            }
        };
        for mode in ["fast", "immediate"] {
            match Self::pg_ctl(
                server,
                &["-m", mode, "-w", "-t", "60", "stop"],
                "pg_ctl stop",
            )
            .await
            {
                Ok(()) => break,
                Err(e) => {
                    warn!(instance_id = %server.instance, mode, error = %e, "Stopping PostgreSQL failed.")
                }
            }
        }
        if host::is_alive(pid) {
            warn!(instance_id = %server.instance, pid, "Killing PostgreSQL.");
            host::signal(pid, Signal::SIGKILL)?;
        }
        host::wait_gone(&[pid], "PostgreSQL to exit", Duration::from_secs(30)).await?;
        // Backends of a killed postmaster live on; the pid file goes only after them, or
        // the next start would run beside them.
        host::kill_processes_in(&data).await?;
        Self::clear_stale_files(server).await?;
        info!(instance_id = %server.instance, "PostgreSQL stopped.");
        Ok(())
    }

    async fn is_healthy(&self, server: &Server) -> Result<bool> {
        if !matches!(self.state(server).await?, ServerState::Running { .. }) {
            return Ok(false);
        }
        let client = match AdminConnection::for_server(server)
            .connect("postgres")
            .await
        {
            Ok(client) => client,
            Err(e) => {
                debug!(instance_id = %server.instance, error = %e, "PostgreSQL does not answer.");
                return Ok(false);
            }
        };
        Ok(client.simple_query("SELECT 1").await.is_ok())
    }

    async fn bootstrap(&self, server: &Server) -> Result<()> {
        let client = AdminConnection::for_server(server)
            .connect("postgres")
            .await?;
        let owner = quote_ident(OWNER_ROLE);
        let database = quote_ident(DATABASE);
        let has_owner = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&OWNER_ROLE])
            .await
            .map_err(|e| sql_error("looking up the owner role", &e))?
            .is_some();
        if !has_owner {
            client
                .batch_execute(&format!("CREATE ROLE {owner} NOLOGIN"))
                .await
                .map_err(|e| sql_error("creating the owner role", &e))?;
        }
        let has_database = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
            .await
            .map_err(|e| sql_error("looking up the database", &e))?
            .is_some();
        if !has_database {
            client
                .batch_execute(&format!("CREATE DATABASE {database} OWNER {owner}"))
                .await
                .map_err(|e| sql_error("creating the database", &e))?;
        }
        // Bindings reach their own database only (as members of its owner).
        client
            .batch_execute(&format!(
                "REVOKE ALL ON DATABASE {database} FROM PUBLIC; \
                 REVOKE CONNECT ON DATABASE postgres FROM PUBLIC; \
                 REVOKE CONNECT ON DATABASE template1 FROM PUBLIC"
            ))
            .await
            .map_err(|e| sql_error("restricting database access", &e))?;
        info!(instance_id = %server.instance, "PostgreSQL instance database created.");
        Ok(())
    }

    fn endpoint(&self, server: &Server) -> Endpoint {
        Endpoint {
            host: server.listen_host.clone(),
            port: server.port,
            database: DATABASE.to_owned(),
        }
    }

    async fn create_credentials(
        &self,
        server: &Server,
        binding: &BindingId,
    ) -> Result<Credentials> {
        let role = role_name(binding);
        let password = random_password()?;
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let client = AdminConnection::for_server(server)
            .connect(DATABASE)
            .await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(|e| sql_error("looking up the binding role", &e))?
            .is_some();
        client
            .batch_execute(&login_statements(&role, &verifier, exists)?)
            .await
            .map_err(|e| sql_error("creating the binding role", &e))?;
        info!(instance_id = %server.instance, binding_id = %binding, role, renewed = exists, "Binding role ready.");
        Ok(Credentials {
            username: role,
            password,
            host: server.listen_host.clone(),
            port: server.port,
            database: DATABASE.to_owned(),
        })
    }

    async fn revoke_credentials(&self, server: &Server, binding: &BindingId) -> Result<()> {
        let role = role_name(binding);
        let ident = quote_ident(&role);
        let owner = quote_ident(OWNER_ROLE);
        let client = AdminConnection::for_server(server)
            .connect(DATABASE)
            .await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(|e| sql_error("looking up the binding role", &e))?
            .is_some();
        if !exists {
            return Ok(());
        }
        client
            .batch_execute(&format!("ALTER ROLE {ident} NOLOGIN"))
            .await
            .map_err(|e| sql_error("disabling the binding role", &e))?;
        let mut ended = false;
        for _ in 0..20 {
            let rows = client
                .query(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                     WHERE usename = $1 AND pid <> pg_backend_pid()",
                    &[&role],
                )
                .await
                .map_err(|e| sql_error("ending the binding's sessions", &e))?;
            if rows.is_empty() {
                ended = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ended {
            return Err(Error::Engine {
                engine: ENGINE,
                message: format!("sessions of {role} do not end"),
            });
        }
        client
            .batch_execute(&format!(
                "BEGIN; REASSIGN OWNED BY {ident} TO {owner}; DROP OWNED BY {ident}; \
                 DROP ROLE {ident}; COMMIT"
            ))
            .await
            .map_err(|e| sql_error("dropping the binding role", &e))?;
        info!(instance_id = %server.instance, binding_id = %binding, role, "Binding role dropped.");
        Ok(())
    }

    async fn backup_source(&self, server: &Server) -> Result<Box<dyn Source>> {
        backup::backup_source(server).await
    }

    async fn begin_restore(&self, server: &Server, info: &SourceInfo) -> Result<Box<dyn Sink>> {
        backup::begin(server, info).await
    }

    async fn complete_restore(&self, server: &Server) -> Result<()> {
        backup::complete(server).await
    }

    async fn abandon_restore(&self, server: &Server) -> Result<()> {
        backup::abandon(server).await
    }

    async fn prepare_snapshot(&self, server: &Server) -> Result<()> {
        copy::checkpoint(server).await
    }

    async fn binding_logins(&self, server: &Server) -> Result<BindingLogins> {
        copy::binding_logins(server).await
    }

    async fn adopt_copy(&self, server: &Server, logins: &BindingLogins) -> Result<()> {
        copy::adopt(server, logins).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn plan_settings_with_plain_values_are_accepted() {
        let ok = settings(&[
            ("max_connections", "100"),
            ("shared_buffers", "128MB"),
            ("work_mem", "4096kB"),
            ("effective_cache_size", "1GB"),
            ("checkpoint_timeout", "5min"),
            ("checkpoint_completion_target", "0.9"),
            ("jit", "off"),
        ]);
        validate(&ok).unwrap();
    }

    #[test]
    fn unknown_names_and_injected_values_are_refused() {
        for (name, value) in [
            ("listen_addresses", "*"),
            ("archive_command", "rm -rf /"),
            ("shared_preload_libraries", "evil"),
            ("max_connections\nfsync", "off"),
            ("work_mem", "4MB'\nssl = 'off"),
            ("work_mem", "4MB\nlisten_addresses = '*'"),
            ("work_mem", "4 MB"),
            ("work_mem", "4mb"),
            ("work_mem", "-1"),
            ("work_mem", ""),
            ("statement_timeout", "1s;"),
            ("max_connections", "0"),
            ("max_connections", "+100"),
            ("max_connections", "100000"),
            ("checkpoint_completion_target", "2"),
            ("checkpoint_completion_target", "1e0"),
            ("jit", "yes'"),
        ] {
            let err = validate(&settings(&[(name, value)])).unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{name}={value:?}: {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn role_names_are_short_hex_and_differ_per_binding() {
        let a = role_name(&BindingId::parse("a").unwrap());
        let b = role_name(&BindingId::parse("b").unwrap());
        let long = role_name(&BindingId::parse("x".repeat(255)).unwrap());
        assert_ne!(a, b);
        assert_eq!(a, role_name(&BindingId::parse("a").unwrap()));
        for name in [&a, &b, &long] {
            assert_eq!(name.len(), 34);
            assert!(name.starts_with("b_"));
            assert!(name[2..].bytes().all(|c| c.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn passwords_are_long_random_and_url_safe() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn configuration_strings_are_quoted_and_control_characters_refused() {
        assert_eq!(conf_string("a'b\\c").unwrap(), "'a''b\\\\c'");
        assert!(conf_string("a\nb").is_err());
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert!(quote_literal("a\\b").is_err());
    }

    #[test]
    fn changed_names_include_added_removed_and_changed_settings() {
        let old = "# x\nport = 1\nwork_mem = '4MB'\njit = 'on'\n";
        let new = "# y\nport = 1\nwork_mem = '8MB'\nmax_connections = '50'\n";
        assert_eq!(
            changed_names(old, new),
            vec!["jit", "max_connections", "work_mem"]
        );
    }
}
