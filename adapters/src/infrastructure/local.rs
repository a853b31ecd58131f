//! The local infrastructure: every instance is a server process on this host, with its
//! own volume directory `<root>/<instance_id>/` and its own port, run as an unprivileged
//! user when the broker is root.
//!
//! Servers are started detached (they outlive the broker) and found again through their
//! volume after a broker restart. A volume holds a record (`phoenix-volume.json`) written
//! before anything else and marked `ready` only when the instance is complete, so a volume
//! a killed broker left half-way is recognised, emptied of its processes and wiped. This
//! module must never remove anything outside `<root>/<instance_id>/` (and the instance's
//! own entries of the `@` directories beside the volumes), and never kill a process that
//! does not work inside that directory. On btrfs, volumes are subvolumes and can be
//! snapshotted (`local/snapshots.rs`); on an EC2 host configured for it, volumes are EBS
//! volumes mounted at the volume directories, snapshotted by EC2 (`local/ebs_volumes.rs`).

mod ebs_volumes;
mod snapshots;

use snapshots::CopySource;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::btrfs::Btrfs;
use super::ebs::{EbsHostConfig, EbsVolumes};
use super::host::{self, RunAs};
use crate::backup::{Sink, Source, SourceInfo};
use crate::engine::postgres::AdminConnection;
use crate::engine::{Credentials, Endpoint, Engine, EngineKind, Server};
use crate::ids::{BindingId, InstanceId};
use crate::keys::random_bytes;
use crate::{Error, Result};

/// The record of a volume, next to the engine's files.
const RECORD_FILE: &str = "phoenix-volume.json";
/// Where volumes go to be removed; `@` is in no instance ID, so no volume can be named so.
const TRASH_DIR: &str = "@deleting";
/// Parent of the servers' unix socket directories. A socket path must stay under 108
/// bytes, so a socket directory is named by a short hash of the ID, never by the ID
/// (up to 255 characters) itself.
const SOCKETS_DIR: &str = "@sockets";
/// One lock file per instance (named by a hash of the ID), so that two broker processes
/// sharing a root never work on one volume at once. A deprovision removes the file while
/// it holds the lock; whoever then gets the lock of the removed file sees that its path
/// names another file (or none) and locks again.
const LOCKS_DIR: &str = "@locks";
/// How long a started or adopted server may take to answer.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// Configuration of the local infrastructure.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// `<data_dir>/instances`: one subdirectory per instance.
    pub root: PathBuf,
    /// The address instances listen on; default `127.0.0.1`.
    pub bind_host: String,
    /// The system user of the server processes; `None` is the current user. The broker
    /// passes `Some("postgres")` when it runs as root.
    pub run_as: Option<String>,
    /// On an EC2 host: every instance's volume is an EBS volume of its own, and
    /// snapshots are EBS snapshots. `None`: volumes are directories (subvolumes on btrfs).
    pub ebs: Option<EbsHostConfig>,
}

impl LocalConfig {
    /// Instances under `root`, listening on 127.0.0.1, run as the current user.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            bind_host: "127.0.0.1".to_owned(),
            run_as: None,
            ebs: None,
        }
    }
}

/// What an instance is, as the broker persists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// The instance.
    pub id: InstanceId,
    /// Its data service.
    pub engine: EngineKind,
    /// The engine's major version, e.g. "15" (selects `/usr/lib/postgresql/15/bin`).
    pub version: String,
    /// Chosen and persisted by the broker.
    pub port: u16,
    /// Plan resources (`max_connections`, `shared_buffers`, ...).
    pub settings: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum VolumeState {
    Initialising,
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VolumeRecord {
    engine: EngineKind,
    version: String,
    port: u16,
    state: VolumeState,
}

/// Instances as local server processes. See the module documentation.
#[derive(Debug)]
pub struct LocalInfrastructure {
    root: PathBuf,
    bind_host: String,
    run_as: Option<RunAs>,
    durable: bool,
    /// The btrfs tool when the root is on btrfs, or why btrfs snapshots cannot be taken.
    btrfs: std::result::Result<Btrfs, String>,
    /// The EBS volumes of this host, when volumes are EBS volumes.
    ebs: Option<EbsVolumes>,
    /// One lock per instance, so that two calls never work on one volume at once. Within
    /// the process; the lock files in [`LOCKS_DIR`] extend it across processes.
    locks: Mutex<HashMap<InstanceId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held for every mutating call on an instance: the in-process mutex, then the
/// cross-process `flock` on the instance's lock file (released when the file closes).
#[derive(Debug)]
struct InstanceLock {
    _file: nix::fcntl::Flock<std::fs::File>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// Opens (creating it and its directory when missing) and `flock`s the lock file at
/// `path`, again until the locked file is the one the path names.
fn lock_file(path: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", path.display()), e);
    loop {
        if let Some(dir) = path.parent() {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("creating the directory of", e)),
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io("opening", e))?;
        let locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io("locking", std::io::Error::from(errno)))?;
        let held = locked.metadata().map_err(|e| io("reading", e))?;
        match std::fs::metadata(path) {
            Ok(named) if named.dev() == held.dev() && named.ino() == held.ino() => {
                return Ok(locked);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("reading", e)),
        }
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
}

fn valid_version(version: &str) -> bool {
    (1..=3).contains(&version.len()) && version.bytes().all(|b| b.is_ascii_digit())
}

impl LocalInfrastructure {
    /// Checks the configuration and prepares the root directory.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad bind address, an unknown `run_as` user, a root
    /// without `run_as` (servers refuse to run as root), or a root the server user cannot
    /// reach; [`Error::Io`] when the root cannot be created.
    pub fn new(config: LocalConfig) -> Result<Self> {
        if !valid_host(&config.bind_host) {
            return Err(Error::Invalid(format!(
                "bind_host {:?} is not a host name or IP address",
                config.bind_host
            )));
        }
        let run_as = config.run_as.as_deref().map(RunAs::lookup).transpose()?;
        let me = nix::unistd::Uid::effective();
        if let Some(user) = &run_as
            && !me.is_root()
            && user.uid != me.as_raw()
        {
            return Err(Error::Invalid(format!(
                "only root can run data services as {}: unset run_as",
                user.name
            )));
        }
        if run_as.is_none() && me.is_root() {
            return Err(Error::Invalid(
                "data services refuse to run as root: set run_as to an unprivileged user (e.g. postgres)"
                    .into(),
            ));
        }
        std::fs::create_dir_all(&config.root)
            .map_err(|e| Error::io(format!("creating {}", config.root.display()), e))?;
        let root = std::fs::canonicalize(&config.root)
            .map_err(|e| Error::io(format!("resolving {}", config.root.display()), e))?;
        if let Some(user) = &run_as {
            use std::os::unix::fs::PermissionsExt as _;
            // Searchable, not listable: the server user reaches its own volume only.
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| Error::io(format!("chmod {}", root.display()), e))?;
            host::check_reachable(&root, user)?;
        }
        let ebs = config.ebs.map(EbsVolumes::new).transpose()?;
        if ebs.is_some() {
            super::ebs::make_private_mount(&root)?;
        }
        let btrfs = if ebs.is_some() {
            info!(root = %root.display(), "Volumes are EBS volumes; snapshots are EBS snapshots.");
            Err("the volumes here are EBS volumes".to_owned())
        } else {
            let btrfs = Btrfs::detect(&root);
            match &btrfs {
                Ok(_) => {
                    info!(root = %root.display(), "Volumes are btrfs subvolumes; snapshots are available.")
                }
                Err(reason) => {
                    info!(root = %root.display(), reason, "Snapshots are not available.")
                }
            }
            btrfs
        };
        Ok(Self {
            root,
            bind_host: config.bind_host,
            run_as,
            durable: true,
            btrfs,
            ebs,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// With `false`, servers run without fsync: much faster, and an instance is lost when
    /// the host crashes. For tests only.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.durable = fsync;
        self
    }

    /// Idempotent: a half-initialised volume left by a killed broker is wiped and redone;
    /// a server already running for this instance is adopted.
    ///
    /// # Errors
    /// [`Error::Invalid`] for refused settings or an instance that exists with another
    /// engine or version; the engine's errors otherwise (the half-made volume is then
    /// removed).
    pub async fn provision(&self, spec: &InstanceSpec) -> Result<Endpoint> {
        self.provision_volume(spec, None).await
    }

    /// [`provision`](Self::provision) with a new volume that is empty, or a copy of the
    /// snapshot `copy_of`.
    async fn provision_volume(
        &self,
        spec: &InstanceSpec,
        copy_of: Option<&CopySource>,
    ) -> Result<Endpoint> {
        let engine = spec.engine.engine();
        engine.validate_settings(&spec.settings)?;
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.recover_interrupted_restore(&spec.id).await?;
        match self.read_record(&server.volume).await {
            Some(record) if record.state == VolumeState::Ready => {
                Self::check_same(&record, spec)?;
                info!(instance_id = %spec.id, "Instance exists already; adopting it.");
                return self.converge(engine, &server, spec, &record).await;
            }
            record => {
                if tokio::fs::try_exists(&server.volume).await.unwrap_or(true) {
                    warn!(instance_id = %spec.id, "Wiping a half-initialised volume.");
                    self.wipe(&spec.id, record.as_ref()).await?;
                }
                self.delete_ebs_leftovers(&spec.id).await?;
            }
        }
        let created = match copy_of {
            None => self.create(engine, &server, spec).await,
            Some(source) => self.create_copy(engine, &server, spec, source).await,
        };
        match created {
            Ok(endpoint) => {
                info!(instance_id = %spec.id, port = spec.port, "Instance provisioned.");
                Ok(endpoint)
            }
            Err(e) => {
                warn!(instance_id = %spec.id, error = %e, "Provisioning failed; removing the volume.");
                let record = self.read_record(&server.volume).await;
                if let Err(cleanup) = self.wipe(&spec.id, record.as_ref()).await {
                    warn!(instance_id = %spec.id, error = %cleanup, "Removing the failed volume failed.");
                } else if let Err(cleanup) = self.delete_ebs_leftovers(&spec.id).await {
                    warn!(instance_id = %spec.id, error = %cleanup, "Deleting the failed EBS volume failed; a retry or deprovision deletes it.");
                }
                Err(e)
            }
        }
    }

    /// Applies `spec.settings` (and port), restarting the server when a setting needs it.
    ///
    /// # Errors
    /// When the instance is not provisioned, the settings are refused (the running
    /// configuration then stays as it was) or the server does not come back.
    pub async fn update(&self, spec: &InstanceSpec) -> Result<Endpoint> {
        let _guard = self.lock(&spec.id).await?;
        self.converge_existing(spec).await
    }

    /// Stops the server and removes the instance's directory. Ok if nothing exists.
    ///
    /// # Errors
    /// When the server or a leftover process cannot be stopped, or the directory cannot
    /// be removed.
    pub async fn deprovision(&self, id: &InstanceId) -> Result<()> {
        let guard = self.lock(id).await?;
        self.recover_interrupted_restore(id).await?;
        let volume = self.volume(id);
        if tokio::fs::try_exists(&volume).await.unwrap_or(true) {
            let record = self.read_record(&volume).await;
            self.wipe(id, record.as_ref()).await?;
            info!(instance_id = %id, "Instance deprovisioned.");
        }
        self.clear_staging(id).await?;
        if let Some(ebs) = &self.ebs {
            ebs.delete_all_of(id, None).await?;
        }
        self.release(id, guard);
        Ok(())
    }

    /// Forgets the instance's lock: removes its lock file and, when nobody else holds or
    /// waits for it, its entry. For an instance that has nothing left here.
    fn release(&self, id: &InstanceId, guard: InstanceLock) {
        // Under the lock (see LOCKS_DIR): a waiter on this file locks the new one.
        match std::fs::remove_file(self.lock_file(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(instance_id = %id, error = %e, "Removing an instance lock file failed.")
            }
        }
        drop(guard);
        // The entry goes only when nobody else holds or waits for it: a waiter's clone
        // keeps its count above one, and new ones clone it under this same mutex.
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks
            .get(id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(id);
        }
    }

    /// After a broker restart or a crash: adopts a running server or starts a stopped one
    /// (clearing what a crashed server left behind), with `spec`'s settings.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the instance has no complete volume (it must be provisioned
    /// or rebuilt, never silently recreated empty); the engine's errors otherwise.
    pub async fn ensure_running(&self, spec: &InstanceSpec) -> Result<Endpoint> {
        let _guard = self.lock(&spec.id).await?;
        self.converge_existing(spec).await
    }

    /// Whether the instance's server runs and answers.
    ///
    /// # Errors
    /// Only for unexpected failures (an unreadable volume); a stopped or silent server is
    /// Ok(false).
    pub async fn is_healthy(&self, spec: &InstanceSpec) -> Result<bool> {
        let server = self.server(spec)?;
        match self.read_record(&server.volume).await {
            Some(record) if record.state == VolumeState::Ready => {
                spec.engine.engine().is_healthy(&server).await
            }
            _ => Ok(false),
        }
    }

    /// One database role per binding, random password. Idempotent (an existing role gets
    /// a new password).
    ///
    /// # Errors
    /// When the instance is not provisioned or its server does not answer.
    pub async fn create_credentials(
        &self,
        spec: &InstanceSpec,
        binding: &BindingId,
    ) -> Result<Credentials> {
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.require_ready(&server, spec).await?;
        spec.engine
            .engine()
            .create_credentials(&server, binding)
            .await
    }

    /// Ends the role's sessions, reassigns what it owns to the instance owner, drops it.
    /// Idempotent; Ok when the instance does not exist any more.
    ///
    /// # Errors
    /// When the instance's server does not answer or refuses.
    pub async fn revoke_credentials(&self, spec: &InstanceSpec, binding: &BindingId) -> Result<()> {
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        // Before looking: an interrupted snapshot restore may have the volume aside.
        self.recover_interrupted_restore(&spec.id).await?;
        if !tokio::fs::try_exists(&server.volume).await.unwrap_or(true) {
            return Ok(());
        }
        self.require_ready(&server, spec).await?;
        spec.engine
            .engine()
            .revoke_credentials(&server, binding)
            .await
    }

    /// A stream of the instance's data for a backup (or a fork), described by its
    /// [`Source::info`]. The lock is held while the source is made, not while it streams.
    ///
    /// # Errors
    /// When the instance is not provisioned or its server does not answer.
    pub async fn backup_source(&self, spec: &InstanceSpec) -> Result<Box<dyn Source>> {
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.require_ready(&server, spec).await?;
        spec.engine.engine().backup_source(&server).await
    }

    /// Prepares a restore beside the live data (see [`Engine::begin_restore`]) and
    /// returns the sink for the backup's stream, which runs without the lock.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a backup this instance cannot restore or an instance that
    /// is not provisioned; the engine's errors otherwise.
    pub async fn begin_restore(
        &self,
        spec: &InstanceSpec,
        info: &SourceInfo,
    ) -> Result<Box<dyn Sink>> {
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.require_ready(&server, spec).await?;
        spec.engine.engine().begin_restore(&server, info).await
    }

    /// Swaps the restored data in (see [`Engine::complete_restore`]). Idempotent.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the restore's sink did not finish or the instance is not
    /// provisioned; the engine's errors otherwise.
    pub async fn complete_restore(&self, spec: &InstanceSpec) -> Result<()> {
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.require_ready(&server, spec).await?;
        spec.engine.engine().complete_restore(&server).await
    }

    /// Undoes an unfinished restore (see [`Engine::abandon_restore`]). Idempotent.
    ///
    /// # Errors
    /// When the instance is not provisioned or its server does not answer.
    pub async fn abandon_restore(&self, spec: &InstanceSpec) -> Result<()> {
        let server = self.server(spec)?;
        let _guard = self.lock(&spec.id).await?;
        self.require_ready(&server, spec).await?;
        spec.engine.engine().abandon_restore(&server).await
    }

    /// How to reach a PostgreSQL instance as its administrator (unix socket, superuser,
    /// the binaries of its version), for `pg_dump` and `pg_restore`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a malformed version.
    pub fn admin_connection(&self, spec: &InstanceSpec) -> Result<AdminConnection> {
        let server = self.server(spec)?;
        match spec.engine {
            EngineKind::Postgres => Ok(AdminConnection::for_server(&server)),
        }
    }

    /// The instances that have a volume here, complete or not: after a crash the broker
    /// compares them with its records and deprovisions the ones it does not know.
    ///
    /// # Errors
    /// When the root cannot be read.
    pub async fn volumes(&self) -> Result<Vec<InstanceId>> {
        let mut entries = match tokio::fs::read_dir(&self.root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", self.root.display()), e)),
        };
        let mut ids = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| Error::io(format!("listing {}", self.root.display()), e))?
        {
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|name| InstanceId::parse(name).ok())
            {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn volume(&self, id: &InstanceId) -> PathBuf {
        self.root.join(id.as_str())
    }

    fn socket_dir(&self, id: &InstanceId) -> PathBuf {
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_str().as_bytes());
        self.root
            .join(SOCKETS_DIR)
            .join(hex::encode(&hash.as_ref()[..8]))
    }

    fn server_for(&self, id: &InstanceId, version: &str, port: u16) -> Result<Server> {
        if !valid_version(version) {
            return Err(Error::Invalid(format!(
                "engine version {version:?} must be a major version number"
            )));
        }
        Ok(Server {
            instance: id.clone(),
            version: version.to_owned(),
            volume: self.volume(id),
            socket_dir: self.socket_dir(id),
            listen_host: self.bind_host.clone(),
            port,
            run_as: self.run_as.clone(),
            durable: self.durable,
        })
    }

    fn server(&self, spec: &InstanceSpec) -> Result<Server> {
        self.server_for(&spec.id, &spec.version, spec.port)
    }

    /// Takes the instance's lock, in this process and across processes.
    async fn lock(&self, id: &InstanceId) -> Result<InstanceLock> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        let path = self.lock_file(id);
        // flock blocks: wait on a blocking thread. A caller cancelled meanwhile leaves
        // that thread to take the lock and drop it again.
        let file = tokio::task::spawn_blocking(move || lock_file(&path))
            .await
            .map_err(|e| Error::io("waiting for an instance lock", std::io::Error::other(e)))??;
        Ok(InstanceLock {
            _file: file,
            _guard: guard,
        })
    }

    fn lock_file(&self, id: &InstanceId) -> PathBuf {
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_str().as_bytes());
        self.root
            .join(LOCKS_DIR)
            .join(format!("{}.lock", hex::encode(hash.as_ref())))
    }

    /// The volume's record; None when there is none or it cannot be read (either way
    /// the volume is not known to be complete).
    async fn read_record(&self, volume: &std::path::Path) -> Option<VolumeRecord> {
        let path = volume.join(RECORD_FILE);
        let text = host::read_file(&path).await.ok()??;
        match serde_json::from_slice(&text) {
            Ok(record) => Some(record),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "Ignoring an unreadable volume record.");
                None
            }
        }
    }

    async fn write_record(&self, volume: &std::path::Path, record: &VolumeRecord) -> Result<()> {
        let path = volume.join(RECORD_FILE);
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::Invalid(format!("encoding the volume record: {e}")))?;
        // Synchronous on purpose, like every small write here: a blocking task would
        // outlive a cancelled caller and race with the next call.
        host::write_file_atomically(&path, &bytes, None)
    }

    fn check_same(record: &VolumeRecord, spec: &InstanceSpec) -> Result<()> {
        if record.engine == spec.engine && record.version == spec.version {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "instance {} holds {} {}, not {} {}",
                spec.id, record.engine, record.version, spec.engine, spec.version
            )))
        }
    }

    /// The record of the instance's complete volume, after putting back a volume an
    /// interrupted snapshot restore set aside. Under the instance's lock only.
    async fn require_ready(&self, server: &Server, spec: &InstanceSpec) -> Result<VolumeRecord> {
        self.recover_interrupted_restore(&spec.id).await?;
        match self.read_record(&server.volume).await {
            Some(record) if record.state == VolumeState::Ready => {
                Self::check_same(&record, spec)?;
                Ok(record)
            }
            _ => Err(Error::Invalid(format!(
                "instance {} has no complete volume under {}",
                spec.id,
                self.root.display()
            ))),
        }
    }

    async fn create(
        &self,
        engine: &dyn Engine,
        server: &Server,
        spec: &InstanceSpec,
    ) -> Result<Endpoint> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| Error::io(format!("creating {}", self.root.display()), e))?;
        self.create_volume(&spec.id, &server.volume).await?;
        host::sync_dir(&self.root)?;
        let mut record = VolumeRecord {
            engine: spec.engine,
            version: spec.version.clone(),
            port: spec.port,
            state: VolumeState::Initialising,
        };
        self.write_record(&server.volume, &record).await?;
        engine.initialise(server, &spec.settings).await?;
        engine.start(server).await?;
        Self::wait_healthy(engine, server).await?;
        engine.bootstrap(server).await?;
        record.state = VolumeState::Ready;
        self.write_record(&server.volume, &record).await?;
        Ok(engine.endpoint(server))
    }

    async fn converge_existing(&self, spec: &InstanceSpec) -> Result<Endpoint> {
        let engine = spec.engine.engine();
        engine.validate_settings(&spec.settings)?;
        let server = self.server(spec)?;
        let record = self.require_ready(&server, spec).await?;
        self.converge(engine, &server, spec, &record).await
    }

    /// Makes a complete volume's server run with `spec`'s settings.
    async fn converge(
        &self,
        engine: &dyn Engine,
        server: &Server,
        spec: &InstanceSpec,
        record: &VolumeRecord,
    ) -> Result<Endpoint> {
        engine.configure(server, &spec.settings).await?;
        engine.start(server).await?;
        Self::wait_healthy(engine, server).await?;
        if record.port != spec.port {
            let mut record = record.clone();
            record.port = spec.port;
            self.write_record(&server.volume, &record).await?;
        }
        Ok(engine.endpoint(server))
    }

    async fn wait_healthy(engine: &dyn Engine, server: &Server) -> Result<()> {
        let deadline = tokio::time::Instant::now() + HEALTHY_WITHIN;
        while !engine.is_healthy(server).await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("instance {} to accept connections", server.instance),
                    after: HEALTHY_WITHIN,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Stops the volume's server (when the record says which engine runs there), kills
    /// whatever else still works inside the volume, and removes it.
    async fn wipe(&self, id: &InstanceId, record: Option<&VolumeRecord>) -> Result<()> {
        let volume = self.volume(id);
        if let Some(record) = record {
            let server = self.server_for(id, &record.version, record.port)?;
            if let Err(e) = record.engine.engine().stop(&server).await {
                warn!(instance_id = %id, error = %e, "Stopping the server failed; killing it.");
            }
        }
        host::kill_processes_in(&volume).await?;
        host::remove_tree(&self.socket_dir(id)).await?;
        self.discard(&volume).await
    }

    /// Moves `path` (a volume, or a copy of one) into the trash and removes it; Ok when
    /// it does not exist. An EBS volume mounted at `path` is unmounted, detached and
    /// deleted instead. It is moved aside first: the removal of a large directory may
    /// outlive a cancelled caller, and must never race with a new volume at that path.
    async fn discard(&self, path: &Path) -> Result<()> {
        if let Some(ebs) = &self.ebs
            && super::ebs::is_mount_point(path)?
        {
            return self.discard_ebs_volume(ebs, path).await;
        }
        let trash = self.root.join(TRASH_DIR);
        std::fs::create_dir_all(&trash)
            .map_err(|e| Error::io(format!("creating {}", trash.display()), e))?;
        let mut name = [0u8; 8];
        random_bytes(&mut name)?;
        let aside = trash.join(hex::encode(name));
        match std::fs::rename(path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("moving {} aside", path.display()), e)),
        }
        if let Some(parent) = path.parent() {
            host::sync_dir(parent)?;
        }
        // Out of the way once renamed; its removal, and the sweep of what an interrupted
        // removal left, may race with another sweep: never fail them.
        if let Err(e) = self.remove_volume(&aside).await {
            warn!(path = %path.display(), error = %e, "Removing a volume set aside failed; a later wipe retries.");
        }
        if let Ok(entries) = std::fs::read_dir(&trash) {
            for entry in entries.flatten() {
                if let Err(e) = self.remove_volume(&entry.path()).await {
                    debug!(path = %entry.path().display(), error = %e, "Leftover volume not removed yet.");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_versions_are_plain() {
        assert!(valid_host("127.0.0.1"));
        assert!(valid_host("::1"));
        assert!(valid_host("db.example.org"));
        assert!(!valid_host("127.0.0.1' port=1"));
        assert!(!valid_host(""));
        assert!(valid_version("15"));
        assert!(!valid_version("15/../../bin"));
        assert!(!valid_version(""));
    }

    #[tokio::test]
    async fn an_instance_lock_holds_across_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let config = LocalConfig {
            run_as: nix::unistd::Uid::effective()
                .is_root()
                .then(|| "postgres".to_owned()),
            ..LocalConfig::new(dir.path().join("instances"))
        };
        let infrastructure = LocalInfrastructure::new(config).expect("infrastructure");
        let id = InstanceId::parse("locked-instance").expect("id");
        let held = infrastructure.lock(&id).await.expect("lock");
        let lock_files: Vec<_> = std::fs::read_dir(infrastructure.root.join(LOCKS_DIR))
            .expect("locks dir")
            .map(|entry| entry.expect("entry").path())
            .collect();
        assert_eq!(lock_files.len(), 1);
        // Another open file description stands for another process.
        let other = std::fs::File::open(&lock_files[0]).expect("open");
        let refused = nix::fcntl::Flock::lock(other, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(
            refused.is_err(),
            "a second process took a held instance lock"
        );
        drop(held);
        let other = std::fs::File::open(&lock_files[0]).expect("open");
        assert!(
            nix::fcntl::Flock::lock(other, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
            "the instance lock outlived its holder"
        );
        infrastructure.deprovision(&id).await.expect("deprovision");
        assert!(
            !lock_files[0].exists(),
            "a deprovision leaves the instance's lock file"
        );
        // A lock taken after the file went is a lock on a new file.
        drop(infrastructure.lock(&id).await.expect("lock again"));
        assert!(lock_files[0].exists());
    }
}
