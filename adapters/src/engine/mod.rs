//! Engines: a data service's own knowledge (initialise a volume, configure, start, stop,
//! health-check, create and revoke a binding's credentials).
//!
//! An engine knows *what* a data service needs; an infrastructure decides *where* it runs
//! and hands the engine a [`Server`]: the volume, the address, the user. An engine never
//! chooses a port or a directory of its own, never formats a user's string into SQL or a
//! configuration file, and never puts a secret on a command line or in a log.

pub mod postgres;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::backup::{Sink, Source, SourceInfo};
use crate::ids::{BindingId, InstanceId};
use crate::infrastructure::host::RunAs;
use crate::{Error, Result};

/// The data services Phoenix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EngineKind {
    /// PostgreSQL.
    #[serde(rename = "postgresql")]
    Postgres,
}

impl EngineKind {
    /// The engine's name as it appears in the catalog and the state store.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Postgres => "postgresql",
        }
    }

    /// The engine that implements this kind.
    pub fn engine(&self) -> &'static dyn Engine {
        match self {
            Self::Postgres => &postgres::Postgres,
        }
    }

    /// Refuses unknown or unsafe settings names/values (called when the catalog loads).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first refused setting.
    pub fn validate_settings(&self, settings: &BTreeMap<String, String>) -> Result<()> {
        self.engine().validate_settings(settings)
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = Error;
    fn from_str(value: &str) -> Result<Self> {
        match value {
            "postgresql" => Ok(Self::Postgres),
            other => Err(Error::Invalid(format!("unknown engine {other:?}"))),
        }
    }
}

/// One instance's server as an infrastructure provides it to an engine: where its volume
/// is, where it listens and as whom it runs. The engine lays its files out inside
/// `volume` as it likes.
#[derive(Debug, Clone)]
pub struct Server {
    /// The instance.
    pub instance: InstanceId,
    /// The engine's major version, digits only (validated by the infrastructure).
    pub version: String,
    /// The instance's own directory; it exists and belongs to `run_as`.
    pub volume: PathBuf,
    /// The directory of the server's unix socket, outside the volume and short enough for
    /// a socket path; it belongs to `run_as` once the server was initialised.
    pub socket_dir: PathBuf,
    /// The address the server listens on for clients; empty for none (TCP closed, only
    /// the administrator's unix socket).
    pub listen_host: String,
    /// The port the server listens on for clients.
    pub port: u16,
    /// The system user of the server's processes; `None` is the current user.
    pub run_as: Option<RunAs>,
    /// `false` turns off fsync for speed: tests only, data is lost on a host crash.
    pub durable: bool,
}

/// Where clients of an instance connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The instance's database.
    pub database: String,
}

/// What is known of a server's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// A server process of this volume runs.
    Running {
        /// Its process ID.
        pid: u32,
    },
    /// A pid file exists but names no process yet: a server is writing it (or one died
    /// while writing it; only [`Engine::start`] decides that, under the instance's lock).
    Starting,
    /// No server process of this volume runs (a pid file may remain after a crash).
    Stopped,
}

/// What a binding gets to connect to an instance. Deliberately not serializable: it
/// leaves the broker only sealed or in a binding's response.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The binding's own role.
    pub username: String,
    /// Its random password.
    pub password: String,
    /// Where the server listens.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The instance's database.
    pub database: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .finish()
    }
}

impl Credentials {
    /// `postgresql://user:password@host:port/database`, every part percent-encoded.
    pub fn uri(&self) -> String {
        format!(
            "postgresql://{}:{}@{}:{}/{}",
            percent_encode(&self.username),
            percent_encode(&self.password),
            url_host(&self.host),
            self.port,
            percent_encode(&self.database)
        )
    }

    /// `jdbc:postgresql://host:port/database?user=..&password=..`, as Cloud Foundry
    /// applications expect it.
    pub fn jdbc_url(&self) -> String {
        format!(
            "jdbc:postgresql://{}:{}/{}?user={}&password={}",
            url_host(&self.host),
            self.port,
            percent_encode(&self.database),
            percent_encode(&self.username),
            percent_encode(&self.password)
        )
    }
}

fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The bindings' logins of an instance as its data service keeps them (PostgreSQL: role
/// names and SCRAM verifiers, never a password), read from the live server to carry them
/// into a physical copy of its volume. Only engines look inside; `Debug` shows the names.
#[derive(Clone, Default)]
pub struct BindingLogins(Vec<(String, String)>);

impl fmt::Debug for BindingLogins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

/// A data service's own knowledge, used by an infrastructure to run one of its instances.
///
/// Later engines (MariaDB, Redis) implement the same steps, streaming a backup out and a
/// restore in included.
///
/// # Errors
/// Every method returns [`Error::ProcessFailed`] when one of the data service's programs
/// fails (with the tail of its stderr, and of the server log when it is the server that
/// failed), [`Error::Engine`] when the running server refuses a request,
/// [`Error::Invalid`] for refused settings, and [`Error::Io`] for files.
///
/// # Cancellation
/// Dropping a future kills the child process it waits for. A volume left half-way by a
/// cancelled [`initialise`](Engine::initialise) is not repaired by the engine: the
/// infrastructure wipes it and starts again. Every other method MUST leave the volume
/// usable when it is cancelled (configuration files are replaced atomically). A restore
/// step that is cancelled (or whose broker dies) MUST leave a state the next call of any
/// restore step takes up; the live data may stay closed to new connections until then.
#[async_trait]
pub trait Engine: fmt::Debug + Send + Sync {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;

    /// Refuses settings names the engine does not allow a plan to set, and values that
    /// are not plain, well-formed values of their setting. MUST refuse anything that could
    /// reach beyond its own line of a configuration file (quotes, newlines, escapes).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the refused setting.
    fn validate_settings(&self, settings: &BTreeMap<String, String>) -> Result<()>;

    /// Creates the data service's files in the empty volume of `server` and writes its
    /// configuration (with `settings`). The server is not started.
    async fn initialise(&self, server: &Server, settings: &BTreeMap<String, String>) -> Result<()>;

    /// Brings the configuration in the volume in line with `server` and `settings`. When
    /// the server runs and something changed it reloads, or restarts when a changed
    /// setting needs it. A configuration the data service rejects MUST leave the previous
    /// one in place.
    async fn configure(&self, server: &Server, settings: &BTreeMap<String, String>) -> Result<()>;

    /// Whether a server process of this volume runs. A pure query: it MUST change nothing
    /// (it runs without the instance's lock, from health checks).
    async fn state(&self, server: &Server) -> Result<ServerState>;

    /// Starts the server so that it outlives the broker, and returns when it accepts
    /// connections. Ok when it already runs. Clears what a dead server left behind (a
    /// stale pid file, orphaned processes) first.
    async fn start(&self, server: &Server) -> Result<()>;

    /// Stops the server (gracefully, then forcibly) and returns when its process is gone.
    /// Ok when it does not run.
    async fn stop(&self, server: &Server) -> Result<()>;

    /// Whether the server answers a query as its administrator. Ok(false) when it does
    /// not run or does not answer.
    async fn is_healthy(&self, server: &Server) -> Result<bool>;

    /// Creates what an instance owns (its database and owner) on a fresh, running server.
    /// Idempotent.
    async fn bootstrap(&self, server: &Server) -> Result<()>;

    /// Where clients connect.
    fn endpoint(&self, server: &Server) -> Endpoint;

    /// Creates the binding's own login with a fresh random password; an existing login
    /// of the binding gets a new password. Whatever the login creates MUST belong to the
    /// instance's owner so that it survives the binding.
    async fn create_credentials(&self, server: &Server, binding: &BindingId)
    -> Result<Credentials>;

    /// Ends the binding's sessions, hands what it owns to the instance's owner and removes
    /// its login. Ok when it does not exist.
    async fn revoke_credentials(&self, server: &Server, binding: &BindingId) -> Result<()>;

    /// A stream of the instance's data in the engine's own dump format, made by the
    /// tools of the server's version, uncompressed (the backup pipeline compresses). Its
    /// [`SourceInfo`] names the strategy (`stream`), the engine, the server's version and
    /// the format, and records in `details` what a restore needs to know beyond the
    /// bytes (never a secret). Nothing secret goes on the tool's command line.
    ///
    /// # Errors
    /// When the server does not answer or the tools are missing; failures of the dump
    /// itself travel in the stream.
    async fn backup_source(&self, server: &Server) -> Result<Box<dyn Source>>;

    /// Prepares a restore of a backup described by `info` beside the live data, and
    /// returns the sink that takes the backup's stream. The live data MUST stay untouched
    /// and in use until [`complete_restore`](Engine::complete_restore). Whatever an
    /// earlier restore left is undone first, as by
    /// [`abandon_restore`](Engine::abandon_restore), so calling this again starts over.
    /// The sink MUST mark the restored data complete only when its tool succeeded.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a backup of another engine or format, a dump of a newer
    /// major version than the server's, or `details` that are not well-formed; the
    /// server's errors otherwise.
    async fn begin_restore(&self, server: &Server, info: &SourceInfo) -> Result<Box<dyn Sink>>;

    /// Makes the restored data live in place of the old, in one atomic step, ending the
    /// sessions on the old data, and then removes the old data. Idempotent: after an
    /// interrupted call it finishes what is left; with nothing to complete it is Ok.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the restore's sink did not finish (nothing is swapped:
    /// abandon it); the server's errors otherwise (the live data is then the old or the
    /// new, never a mixture, and connections to it are allowed).
    async fn complete_restore(&self, server: &Server) -> Result<()>;

    /// Removes whatever a restore left and makes the data that was live before it live
    /// again, until [`complete_restore`](Engine::complete_restore) removed that data.
    /// Idempotent.
    ///
    /// # Errors
    /// The server's errors; calling it again is safe.
    async fn abandon_restore(&self, server: &Server) -> Result<()>;

    /// Readies the running server for a snapshot of its whole volume. A snapshot of the
    /// volume is crash-consistent without it (the data service recovers from it as from a
    /// crash); this only shortens that recovery (PostgreSQL: a `CHECKPOINT`).
    async fn prepare_snapshot(&self, server: &Server) -> Result<()>;

    /// The bindings' logins of the running server, to carry into a copy of its volume.
    async fn binding_logins(&self, server: &Server) -> Result<BindingLogins>;

    /// Makes a physical copy of a volume (a snapshot of this or another instance, started
    /// at `server` with TCP closed) the instance's own: its bindings' logins become
    /// exactly `logins` (the instance's before an in-place restore; none for a clone or
    /// fork), whatever a login that goes owned passes to the instance's owner, and what an
    /// unfinished restore left in the copy is undone. Idempotent.
    async fn adopt_copy(&self, server: &Server, logins: &BindingLogins) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(password: &str, host: &str) -> Credentials {
        Credentials {
            username: "b_00ff".into(),
            password: password.into(),
            host: host.into(),
            port: 15432,
            database: "phoenix".into(),
        }
    }

    #[test]
    fn urls_encode_every_part_and_bracket_ipv6_hosts() {
        let c = credentials("p@ss/w:rd?", "127.0.0.1");
        assert_eq!(
            c.uri(),
            "postgresql://b_00ff:p%40ss%2Fw%3Ard%3F@127.0.0.1:15432/phoenix"
        );
        assert_eq!(
            c.jdbc_url(),
            "jdbc:postgresql://127.0.0.1:15432/phoenix?user=b_00ff&password=p%40ss%2Fw%3Ard%3F"
        );
        assert!(credentials("x", "::1").uri().contains("@[::1]:15432/"));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let shown = format!("{:?}", credentials("hunter2hunter2", "127.0.0.1"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn the_engine_kind_is_named_postgresql() {
        assert_eq!(
            serde_json::to_string(&EngineKind::Postgres).unwrap(),
            "\"postgresql\""
        );
        assert_eq!(
            "postgresql".parse::<EngineKind>().unwrap(),
            EngineKind::Postgres
        );
        assert!("mysql".parse::<EngineKind>().is_err());
    }
}
