//! The harness: runs the real `phoenix` binary the way an operator would, one broker per
//! test, each with its own temporary data directory (on the testbed's btrfs,
//! `PHOENIX_TEST_BTRFS_DIR`, when a test asks for it), listen port, instance port range,
//! credentials and state store (SQLite, or a fresh database on the testbed's PostgreSQL
//! when `PHOENIX_TEST_STATE_STORE=postgres`). It must never touch a server it did not
//! start: cleanup finds leftover processes only by this broker's own directory.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::osb::Osb;

/// Ports per broker: the first is the broker's listener, the rest its instance range.
const PORTS_PER_BROKER: u16 = 20;
const PORT_BASE: u16 = 20000;
const PORT_BLOCKS: u16 = 500;
/// How long a broker may take to answer /healthz after it is spawned.
const STARTUP_DEADLINE: Duration = Duration::from_secs(90);

/// The binary under test: `PHOENIX_BIN`, else the workspace's debug build.
pub fn phoenix_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PHOENIX_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/phoenix");
    assert!(
        path.exists(),
        "the phoenix binary is missing at {}: build it first (`cargo build -p phoenix-broker`) or set PHOENIX_BIN",
        path.display()
    );
    path
}

/// Which state store the broker under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateStore {
    Sqlite,
    Postgres,
}

impl StateStore {
    pub fn from_env() -> Self {
        match std::env::var("PHOENIX_TEST_STATE_STORE").as_deref() {
            Ok("postgres") | Ok("postgresql") => StateStore::Postgres,
            Ok("sqlite") | Ok("") | Err(_) => StateStore::Sqlite,
            Ok(other) => panic!("PHOENIX_TEST_STATE_STORE={other}: expected sqlite or postgres"),
        }
    }
}

/// A block of free ports held for the life of one broker (a lock file per block, so
/// concurrent test processes never share a range).
#[derive(Debug)]
pub struct PortBlock {
    first: u16,
    _lock: Flock<File>,
}

impl PortBlock {
    pub fn acquire() -> Result<Self> {
        let dir = std::env::temp_dir().join("phoenix-acceptance-ports");
        fs::create_dir_all(&dir)?;
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .subsec_nanos() as u64;
        for attempt in 0..PORT_BLOCKS as u64 {
            let block = ((seed + attempt * 7) % PORT_BLOCKS as u64) as u16;
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{block}.lock")))?;
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            let first = PORT_BASE + block * PORTS_PER_BROKER;
            if (first..first + PORTS_PER_BROKER).all(port_is_free) {
                return Ok(PortBlock { first, _lock: lock });
            }
        }
        bail!(
            "no free block of {PORTS_PER_BROKER} ports between {PORT_BASE} and the ephemeral range"
        )
    }

    pub fn listen_port(&self) -> u16 {
        self.first
    }

    /// The `PHOENIX_INSTANCE_PORTS` range.
    pub fn instance_range(&self) -> String {
        format!("{}-{}", self.first + 1, self.first + PORTS_PER_BROKER - 1)
    }
}

pub fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// True when something accepts TCP connections on 127.0.0.1:port.
pub fn port_is_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
        .is_ok()
}

/// How a broker is configured before it starts.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub credentials: bool,
    pub listen_host: String,
    pub env: Vec<(String, String)>,
    /// None: the store `PHOENIX_TEST_STATE_STORE` names.
    pub state_store: Option<StateStore>,
    /// The broker's directory (its data dir with it) lies on the testbed's btrfs
    /// (`PHOENIX_TEST_BTRFS_DIR`) instead of the system's temporary directory.
    pub on_btrfs: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            credentials: true,
            listen_host: "127.0.0.1".into(),
            env: Vec::new(),
            state_store: None,
            on_btrfs: false,
        }
    }
}

/// One running (or stopped) broker and everything it owns.
#[derive(Debug)]
pub struct Broker {
    pub username: String,
    pub password: String,
    pub port: u16,
    _ports: PortBlock,
    instance_ports: String,
    root: Root,
    log_file: PathBuf,
    database_url: Option<String>,
    config: BrokerConfig,
    child: Option<Child>,
}

/// A broker's temporary directory: its own, or its primary's for a replica.
#[derive(Debug)]
enum Root {
    Owned(TempDir),
    Shared(PathBuf),
}

impl Root {
    fn path(&self) -> &Path {
        match self {
            Root::Owned(dir) => dir.path(),
            Root::Shared(path) => path,
        }
    }
}

impl Broker {
    /// A broker with credentials on a loopback port, ready (answering /healthz).
    pub async fn start() -> Broker {
        Self::start_with(BrokerConfig::default()).await
    }

    /// A broker whose data dir is a fresh directory on the testbed's btrfs, ready.
    pub async fn start_on_btrfs() -> Broker {
        Self::start_with(BrokerConfig {
            on_btrfs: true,
            ..BrokerConfig::default()
        })
        .await
    }

    pub async fn start_with(config: BrokerConfig) -> Broker {
        let mut broker = Self::prepare(config).await.expect("preparing a broker");
        broker.spawn_and_wait().await.expect("starting the broker");
        broker
    }

    /// Everything but the process: directories, ports, credentials, state store.
    pub async fn prepare(config: BrokerConfig) -> Result<Broker> {
        let root = if config.on_btrfs {
            tempfile::Builder::new()
                .prefix("phx-")
                .tempdir_in(btrfs_dir()?)?
        } else {
            tempfile::Builder::new().prefix("phx-").tempdir()?
        };
        // Instance servers run as the postgres user: it must be able to reach the data dir.
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
        let data = root.path().join("data");
        fs::create_dir(&data)?;
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755))?;
        let database_url = match config.state_store.unwrap_or_else(StateStore::from_env) {
            StateStore::Sqlite => None,
            StateStore::Postgres => Some(fresh_postgres_database().await?),
        };
        let ports = PortBlock::acquire()?;
        Ok(Broker {
            username: "platform".into(),
            password: format!("pw-{}", uuid::Uuid::new_v4().simple()),
            port: ports.listen_port(),
            instance_ports: ports.instance_range(),
            _ports: ports,
            log_file: root.path().join("broker.log"),
            root: Root::Owned(root),
            database_url,
            config,
            child: None,
        })
    }

    /// A second broker process (a replica) on the same data directory, state store,
    /// credentials and instance ports, listening on its own port; ready.
    pub async fn start_replica(&self) -> Broker {
        let ports = PortBlock::acquire().expect("ports for a replica");
        let mut replica = Broker {
            username: self.username.clone(),
            password: self.password.clone(),
            port: ports.listen_port(),
            instance_ports: self.instance_ports.clone(),
            _ports: ports,
            log_file: self
                .root
                .path()
                .join(format!("replica-{}.log", uuid::Uuid::new_v4().simple())),
            root: Root::Shared(self.root.path().to_path_buf()),
            database_url: self.database_url.clone(),
            config: self.config.clone(),
            child: None,
        };
        replica.spawn_and_wait().await.expect("starting a replica");
        replica
    }

    /// The first port of this broker's instance range.
    pub fn first_instance_port(&self) -> u16 {
        self.port + 1
    }

    /// Sets (or overrides) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.config.env.push((key.to_owned(), value.to_owned()));
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn instances_dir(&self) -> PathBuf {
        self.data_dir().join("instances")
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_file.clone()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn osb(&self) -> Osb {
        Osb::new(
            self.url(),
            Some((self.username.clone(), self.password.clone())),
        )
    }

    /// The command `phoenix serve` with this broker's environment (and nothing inherited
    /// but PATH, so a developer's own PHOENIX_* variables never leak into a test).
    pub fn command(&self) -> Result<Command> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = Command::new(phoenix_bin());
        command
            .arg("serve")
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.root.path())
            .env("RUST_BACKTRACE", "1")
            .env(
                "PHOENIX_LISTEN",
                format!("{}:{}", self.config.listen_host, self.port),
            )
            .env("PHOENIX_DATA_DIR", self.data_dir())
            .env("PHOENIX_INSTANCE_PORTS", &self.instance_ports)
            .env("PHOENIX_OPERATION_LEASE", "3s")
            .env("PHOENIX_WORKER_POLL", "200ms")
            .env("PHOENIX_SUPERVISE_INTERVAL", "1s")
            .env("PHOENIX_LOG", "info")
            .current_dir(self.root.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(url) = &self.database_url {
            command.env("PHOENIX_DATABASE_URL", url);
        }
        if self.config.credentials {
            command
                .env("PHOENIX_BROKER_USERNAME", &self.username)
                .env("PHOENIX_BROKER_PASSWORD", &self.password);
        }
        for (key, value) in &self.config.env {
            command.env(key, value);
        }
        Ok(command)
    }

    /// Spawns the broker and waits until /healthz answers 200; fails with the log if the
    /// process exits first.
    pub async fn spawn_and_wait(&mut self) -> Result<()> {
        let mut child = self.command()?.spawn().context("spawning phoenix")?;
        let http = reqwest::Client::new();
        let health = format!("{}/healthz", self.url());
        let started = Instant::now();
        let outcome = loop {
            tokio::select! {
                status = child.wait() => {
                    break Err(anyhow::anyhow!("phoenix exited before it was healthy: {:?}", status?));
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if let Ok(reply) = http
                .get(&health)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && reply.status().is_success()
            {
                break Ok(());
            }
            if started.elapsed() > STARTUP_DEADLINE {
                break Err(anyhow::anyhow!(
                    "phoenix did not answer /healthz within {STARTUP_DEADLINE:?}"
                ));
            }
        };
        self.child = Some(child);
        outcome.with_context(|| format!("broker log:\n{}", tail(&self.log(), 60)))
    }

    /// SIGKILL: the broker gets no chance to clean up (its instance servers live on).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.wait().await;
        }
    }

    /// SIGKILL, then a new process on the same data directory, port and state store.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn_and_wait().await.expect("restarting the broker");
    }

    /// Waits for a broker process that is expected to exit on its own (refusing to start).
    pub async fn wait_for_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self
            .command()
            .expect("broker command")
            .spawn()
            .expect("spawning phoenix");
        match tokio::time::timeout(deadline, child.wait()).await {
            Ok(status) => Some(status.expect("waiting for phoenix")),
            Err(_) => {
                self.child = Some(child);
                None
            }
        }
    }

    /// Processes (instance servers included) whose command line or working directory lies
    /// in this broker's temporary directory, the broker itself excluded.
    pub fn leftover_processes(&self, under: &Path) -> Vec<i32> {
        let broker_pid = self.child.as_ref().and_then(Child::id).map(|p| p as i32);
        processes_under(under)
            .into_iter()
            .filter(|pid| Some(*pid) != broker_pid)
            .collect()
    }

    /// Everything the state store holds, as text: every row of every table (PostgreSQL),
    /// or the bytes of the SQLite files (database, WAL, journal).
    pub async fn state_store_contents(&self) -> String {
        match &self.database_url {
            Some(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .expect("connecting to the state store");
                tokio::spawn(connection);
                let tables = client
                    .query(
                        "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) \
                         FROM information_schema.tables \
                         WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
                        &[],
                    )
                    .await
                    .expect("listing tables");
                let mut text = String::new();
                for table in tables {
                    let name: String = table.get(0);
                    for row in client
                        .query(&format!("SELECT t::text FROM {name} t"), &[])
                        .await
                        .expect("reading a table")
                    {
                        text.push_str(row.get::<_, &str>(0));
                        text.push('\n');
                    }
                }
                text
            }
            None => {
                let mut text = String::new();
                for entry in fs::read_dir(self.data_dir())
                    .expect("data dir")
                    .filter_map(|e| e.ok())
                {
                    if entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with("phoenix.db")
                    {
                        let bytes = fs::read(entry.path()).expect("reading the SQLite state store");
                        text.push_str(&String::from_utf8_lossy(&bytes));
                    }
                }
                assert!(
                    !text.is_empty(),
                    "no SQLite state store found in {}",
                    self.data_dir().display()
                );
                text
            }
        }
    }

    /// What the instances directory holds besides its lock files: volumes (top-level
    /// entries) and the contents of housekeeping directories (`@...`: trash, sockets).
    /// Lock files (`@locks`) stay by design, one small empty file per instance ID.
    pub fn instance_volumes(&self) -> Vec<String> {
        let names = |dir: &Path| -> Vec<String> {
            fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(|entry| entry.ok())
                        .map(|entry| entry.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut found = Vec::new();
        for name in names(&self.instances_dir()) {
            if name == "@locks" {
                continue;
            }
            if name.starts_with('@') {
                found.extend(
                    names(&self.instances_dir().join(&name))
                        .into_iter()
                        .map(|n| format!("{name}/{n}")),
                );
            } else {
                found.push(name);
            }
        }
        found
    }

    /// Entries of the instances directory that belong to an instance id.
    pub fn instance_dir_entries(&self, instance_id: &str) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.instances_dir()) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(instance_id))
            .collect()
    }

    /// Stops whatever this broker left running: instance servers get SIGQUIT (PostgreSQL's
    /// immediate shutdown), then SIGKILL.
    fn reap_leftovers(&self) {
        let root = self.root.path().to_path_buf();
        let pids = processes_under(&root);
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGQUIT);
        }
        let started = Instant::now();
        while !processes_under(&root).is_empty() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in processes_under(&root) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        // What the brokers leave running belongs to the primary (the owner of the directory).
        if let Root::Owned(_) = self.root {
            self.reap_leftovers();
            if self.config.on_btrfs {
                // Subvolumes (read-only snapshots among them) outlive a plain removal.
                delete_subvolumes(self.root.path());
            }
            if let Some(url) = &self.database_url {
                drop_postgres_database(url);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- broker log ({}) ----\n{}\n---- end of broker log ----",
                self.log_path().display(),
                tail(&self.log(), 200)
            );
        }
    }
}

/// The testbed's btrfs (`PHOENIX_TEST_BTRFS_DIR`), checked to be one.
pub fn btrfs_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("PHOENIX_TEST_BTRFS_DIR")
        .map(PathBuf::from)
        .context(
            "a broker on btrfs needs PHOENIX_TEST_BTRFS_DIR (a mounted btrfs): run \
         `scripts/testbed/up` and `. .testbed/env` (scripts/test does both)",
        )?;
    if !is_btrfs(&dir)? {
        bail!(
            "PHOENIX_TEST_BTRFS_DIR={} is not on btrfs (is scripts/testbed/btrfs started?)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Whether `path` lies on a btrfs file system.
pub fn is_btrfs(path: &Path) -> Result<bool> {
    let fs =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(fs.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

/// Whether `path` is a btrfs subvolume (its root directory has inode 256).
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir() && meta.ino() == 256)
}

/// Deletes the subvolumes under `dir`, nested ones first (best effort: this runs in
/// `Drop`).
fn delete_subvolumes(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        delete_subvolumes(&path);
        if is_subvolume(&path) {
            let deleted = std::process::Command::new("btrfs")
                .args(["subvolume", "delete"])
                .arg(&path)
                .output();
            if !deleted.as_ref().is_ok_and(|out| out.status.success()) {
                eprintln!("could not delete subvolume {}: {deleted:?}", path.display());
            }
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// PIDs whose command line mentions `dir` or whose working directory is inside it.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let own = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                .unwrap_or_default();
            let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            cmdline.contains(&needle) || cwd.starts_with(dir)
        })
        .collect()
}

/// Creates an empty database on `PHOENIX_TEST_POSTGRES_URL` and returns its URL.
async fn fresh_postgres_database() -> Result<String> {
    let server = std::env::var("PHOENIX_TEST_POSTGRES_URL").context(
        "the PostgreSQL state store needs PHOENIX_TEST_POSTGRES_URL: run `scripts/testbed/up` \
         and `. .testbed/env` (scripts/test does both)",
    )?;
    let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .with_context(|| "connecting to PHOENIX_TEST_POSTGRES_URL")?;
    tokio::spawn(connection);
    let name = format!("phoenix_test_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(replace_database(&server, &name))
}

/// Drops a database made by [`fresh_postgres_database`] (from a thread of its own: this
/// runs in `Drop`, possibly inside the test's runtime).
fn drop_postgres_database(url: &str) {
    let Ok(server) = std::env::var("PHOENIX_TEST_POSTGRES_URL") else {
        return;
    };
    let Some(name) = url
        .rsplit('/')
        .next()
        .map(|n| n.split('?').next().unwrap_or(n).to_owned())
    else {
        return;
    };
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (client, connection) =
                tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
            anyhow::Ok(())
        })
    })
    .join();
    if let Ok(Err(error)) = dropped {
        eprintln!("could not drop the test database: {error:#}");
    }
}

/// `postgres://u@h:p/db?x` with another database name.
fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

#[test]
fn replace_database_swaps_only_the_path() {
    assert_eq!(
        replace_database("postgres://p@127.0.0.1:5/postgres", "x"),
        "postgres://p@127.0.0.1:5/x"
    );
    assert_eq!(
        replace_database("postgres://p@h:5", "x"),
        "postgres://p@h:5/x"
    );
    assert_eq!(
        replace_database("postgres://p@h:5/d?sslmode=disable", "x"),
        "postgres://p@h:5/x?sslmode=disable"
    );
}
