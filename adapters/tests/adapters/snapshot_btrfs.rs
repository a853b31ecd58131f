//! Snapshots of local volumes on a real, loop-mounted btrfs (`scripts/testbed/btrfs`
//! exports `PHOENIX_TEST_BTRFS_DIR`) with real PostgreSQL 15 servers: subvolume volumes,
//! snapshot backups of a small and a large database, in-place restores, clones, forks,
//! failed and interrupted restores, and a shipped snapshot that goes through the backup
//! pipeline and is restored under another root. Timings are printed (`--no-capture`),
//! never asserted; what makes a snapshot O(1) is (it copies no data).

#![allow(clippy::unwrap_used)] // Tests: a failed call fails the test.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use base64::Engine as _;
use futures::StreamExt as _;
use nix::sys::signal::Signal;
use phoenix_adapters::Error;
use phoenix_adapters::backup::{
    self, BackupKeys, BackupRequest, InstanceKey, KeySource, Manifest, ManifestSource,
    PipelineConfig, Progress, SnapshotRef, Source, SourceOutput,
};
use phoenix_adapters::engine::Credentials;
use phoenix_adapters::ids::BackupId;
use phoenix_adapters::infrastructure::host;
use phoenix_adapters::infrastructure::{InstanceSpec, LocalConfig, LocalInfrastructure};
use phoenix_adapters::keys::{MasterKey, random_bytes};
use phoenix_adapters::storage::local::LocalStore;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::engine_postgres::{Fixture, admin, binding, connect, spec};
use crate::engine_postgres_backup::{fingerprint, populate};

/// A directory on the test btrfs holding infrastructure roots; its servers are killed
/// and its subvolumes (read-only snapshots included) deleted when it is dropped.
struct BtrfsFixture {
    dir: tempfile::TempDir,
}

impl BtrfsFixture {
    fn new() -> Self {
        let base = std::env::var("PHOENIX_TEST_BTRFS_DIR").expect(
            "PHOENIX_TEST_BTRFS_DIR is not set: run scripts/testbed/up and source .testbed/env",
        );
        let dir = tempfile::Builder::new()
            .prefix("phx-btrfs-")
            .tempdir_in(base)
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        Self { dir }
    }

    fn root(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An infrastructure over `<fixture>/<name>`: two names stand for two hosts.
    fn infrastructure(&self, name: &str) -> LocalInfrastructure {
        let run_as = nix::unistd::Uid::effective()
            .is_root()
            .then(|| "postgres".to_owned());
        LocalInfrastructure::new(LocalConfig {
            run_as,
            ..LocalConfig::new(self.root(name))
        })
        .unwrap()
        .with_fsync(false)
    }
}

impl Drop for BtrfsFixture {
    fn drop(&mut self) {
        for pid in host::processes_in(self.dir.path()) {
            let _ = host::signal(pid, Signal::SIGKILL);
        }
        delete_subvolumes(self.dir.path());
    }
}

/// Deletes the subvolumes under `dir` (plain directories hold them; none nests).
fn delete_subvolumes(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if is_subvolume(&path) {
            let _ = std::process::Command::new("btrfs")
                .args(["subvolume", "delete"])
                .arg(&path)
                .output();
        } else if path.is_dir() && !path.is_symlink() {
            delete_subvolumes(&path);
        }
    }
}

fn is_subvolume(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir() && meta.ino() == 256)
}

/// Runs the btrfs tool and returns its stdout.
fn btrfs(args: &[&str], path: &Path) -> String {
    let output = std::process::Command::new("btrfs")
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(output.status.success(), "btrfs {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// `(total, exclusive)` bytes of the extents under `path`: exclusive ones are referenced
/// from nowhere else, so a snapshot that copied nothing has almost none.
fn extents(path: &Path) -> (u64, u64) {
    let out = btrfs(&["filesystem", "du", "-s", "--raw"], path);
    let numbers: Vec<u64> = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take(2)
        .map(|n| n.parse().unwrap())
        .collect();
    (numbers[0], numbers[1])
}

/// Bytes in use on the file system of `path`, after its pending changes are committed.
fn used_bytes(path: &Path) -> u64 {
    btrfs(&["filesystem", "sync"], path);
    let fs = nix::sys::statvfs::statvfs(path).unwrap();
    (fs.blocks() - fs.blocks_free()) * fs.fragment_size()
}

/// Gives what `from` owns under `path` to the user and group `to`, as a server user of
/// another host would own it.
fn change_owner(path: &Path, from: u32, to: u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.uid() == from {
        std::os::unix::fs::lchown(path, Some(to), Some(to)).unwrap();
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            change_owner(&entry.unwrap().path(), from, to);
        }
    }
}

/// Flips a snapshot's read-only flag (forced: a received one refuses otherwise).
fn set_read_only(path: &Path, read_only: bool) {
    let status = std::process::Command::new("btrfs")
        .args(["property", "set", "-f", "-ts"])
        .arg(path)
        .args(["ro", if read_only { "true" } else { "false" }])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A local store and the keys to back instances up into it.
struct Vault {
    _dir: tempfile::TempDir,
    store: Arc<LocalStore>,
    master: MasterKey,
}

impl Vault {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path().join("store")).unwrap());
        let mut key = [0u8; 32];
        random_bytes(&mut key).unwrap();
        let master =
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode(key)).unwrap();
        Self {
            _dir: dir,
            store,
            master,
        }
    }

    /// Backup `backup` of `spec` from `source` through the pipeline's runner.
    async fn back_up(&self, source: &dyn Source, spec: &InstanceSpec, backup: &str) -> Manifest {
        let request = BackupRequest {
            instance_id: spec.id.clone(),
            backup_id: backup_id(backup),
            config: PipelineConfig::default(),
        };
        let keys = BackupKeys {
            instance: InstanceKey::generate(&self.master, &spec.id).unwrap(),
            passphrase: None,
        };
        backup::run_backup(
            source,
            &request,
            &keys,
            self.store.clone(),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap()
    }
}

fn backup_id(id: &str) -> BackupId {
    BackupId::parse(id).unwrap()
}

fn snapshot_path(root: &Path, snapshot: &SnapshotRef) -> PathBuf {
    root.join("@snapshots").join(&snapshot.id)
}

/// Nothing of an in-place restore is left aside (`@previous`, `@staging`).
fn nothing_aside(root: &Path, spec: &InstanceSpec) {
    for dir in ["@previous", "@staging"] {
        let path = root.join(dir).join(spec.id.as_str());
        assert!(!path.exists(), "{} is left", path.display());
    }
}

async fn role_exists(client: &Client, role: &str) -> bool {
    client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_on_btrfs_is_a_subvolume_and_its_snapshots_outlive_a_deprovision() -> Result<()> {
    let fixture = BtrfsFixture::new();
    let infra = fixture.infrastructure("instances");
    assert!(infra.supports_snapshots());
    let spec = spec("subvolume");
    infra.provision(&spec).await?;
    let volume = fixture.root("instances").join("subvolume");
    assert!(is_subvolume(&volume));

    let snapshot = infra.snapshot(&spec, &backup_id("b1")).await?;
    assert_eq!(
        (snapshot.provider.as_str(), snapshot.id.as_str()),
        ("btrfs", "subvolume/b1")
    );
    let path = snapshot_path(&fixture.root("instances"), &snapshot);
    assert!(is_subvolume(&path));
    assert_eq!(btrfs(&["property", "get", "-ts"], &path).trim(), "ro=true");
    assert_eq!(infra.snapshot(&spec, &backup_id("b1")).await?, snapshot);

    infra.deprovision(&spec.id).await?;
    assert!(!volume.exists());
    assert!(
        infra.snapshot_exists(&snapshot).await?,
        "a deprovision took a backup"
    );
    infra.delete_snapshot(&snapshot).await?;
    assert!(!infra.snapshot_exists(&snapshot).await?);
    infra.delete_snapshot(&snapshot).await?;
    assert!(!path.parent().unwrap().exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restored_in_place_brings_back_the_data_with_the_bindings_of_now() -> Result<()>
{
    let fixture = BtrfsFixture::new();
    let infra = Arc::new(fixture.infrastructure("instances"));
    let spec = spec("in-place");
    infra.provision(&spec).await?;
    let kept = infra.create_credentials(&spec, &binding("kept")).await?;
    let revoked = infra.create_credentials(&spec, &binding("revoked")).await?;
    populate(&kept).await?;
    let live = admin(&infra, &spec).await;
    let data = fingerprint(&live).await;
    let vault = Vault::new();
    let source = infra.snapshot_source(&spec, &backup_id("before"))?;
    let manifest = vault.back_up(source.as_ref(), &spec, "before").await;
    assert_eq!(
        (manifest.source_info.format.as_str(), manifest.stored_bytes),
        ("btrfs-subvolume", 0)
    );
    let ManifestSource::Reference { snapshot } = &manifest.source else {
        panic!("a snapshot backup is a reference: {manifest:?}");
    };

    // After the snapshot: the data changes, a binding comes, one goes, one is renewed.
    live.batch_execute(
        "UPDATE app.notes SET body = 'changed' WHERE id <= 100; DELETE FROM billing.invoices; \
         CREATE TABLE app.after_snapshot (x int)",
    )
    .await?;
    assert_ne!(fingerprint(&live).await, data);
    drop(live);
    let added = infra.create_credentials(&spec, &binding("added")).await?;
    infra.revoke_credentials(&spec, &binding("revoked")).await?;
    let renewed = infra.create_credentials(&spec, &binding("kept")).await?;

    let started = Instant::now();
    let endpoint = infra.restore_snapshot(&spec, snapshot).await?;
    println!("in-place restore of a snapshot: {:?}", started.elapsed());
    assert_eq!(endpoint.port, spec.port);
    let live = admin(&infra, &spec).await;
    assert_eq!(fingerprint(&live).await, data);
    nothing_aside(&fixture.root("instances"), &spec);

    // The bindings are those of now, with their passwords of now.
    let client = connect(&renewed).await?;
    client.batch_execute("SET ROLE NONE").await?;
    let owned: String = client
        .query_one("SELECT secret FROM app.binding_owned", &[])
        .await?
        .get(0);
    assert_eq!(owned, "owned by the binding");
    connect(&added).await?;
    assert!(
        connect(&kept).await.is_err(),
        "a renewed password's predecessor works"
    );
    assert!(
        connect(&revoked).await.is_err(),
        "a revoked binding came back"
    );
    assert!(!role_exists(&live, &revoked.username).await);
    Ok(())
}

/// A table of `rows` rows of about 270 bytes each, frozen and left alone by autovacuum
/// (which would otherwise rewrite every page after the snapshot), and its checksum.
async fn fill(client: &Client, rows: i32) -> (i64, String) {
    client
        .batch_execute(&format!(
            "SET statement_timeout = 0;
             CREATE TABLE big WITH (autovacuum_enabled = false) AS
                 SELECT i, md5(i::text) AS h, repeat(md5((-i)::text), 6) AS pad
                 FROM generate_series(1, {rows}) AS i;"
        ))
        .await
        .unwrap();
    // Not in the same batch: VACUUM refuses to run in a transaction block.
    client.batch_execute("VACUUM (FREEZE) big").await.unwrap();
    let size: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    (size, checksum(client).await)
}

async fn checksum(client: &Client) -> String {
    client
        .query_one(
            "SELECT format('%s %s %s', count(*), md5(string_agg(h, '' ORDER BY i)),
                           sum(hashtext(pad)::bigint))
             FROM big",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_large_database_copies_no_data_and_restores_exactly() -> Result<()> {
    let fixture = BtrfsFixture::new();
    let infra = fixture.infrastructure("instances");
    let root = fixture.root("instances");
    for (name, rows) in [("small", 1_000), ("large", 800_000)] {
        let spec = spec(name);
        infra.provision(&spec).await?;
        let client = admin(&infra, &spec).await;
        let (size, sum) = fill(&client, rows).await;

        let used = used_bytes(&root);
        let started = Instant::now();
        let snapshot = infra.snapshot(&spec, &backup_id("b1")).await?;
        let took = started.elapsed();
        let (total, exclusive) = extents(&snapshot_path(&root, &snapshot));
        let grown = used_bytes(&root).saturating_sub(used);

        client
            .batch_execute("DELETE FROM big WHERE i % 3 = 0")
            .await?;
        drop(client);
        let started = Instant::now();
        infra.restore_snapshot(&spec, &snapshot).await?;
        let restored = started.elapsed();
        assert_eq!(checksum(&admin(&infra, &spec).await).await, sum);

        println!(
            "{name} database ({} MB): snapshot {took:?}, in-place restore {restored:?}; \
             snapshot extents {} MB, {} kB exclusive; file system grew {} kB",
            size >> 20,
            total >> 20,
            exclusive >> 10,
            grown >> 10
        );
        if name == "large" {
            assert!(size > 200 << 20, "{size}");
            assert!(total > 200 << 20, "the snapshot misses data: {total}");
        }
        // All but a few pages the server wrote after the snapshot are shared with the
        // live volume: nothing was copied.
        assert!(
            exclusive < total / 50,
            "{exclusive} of {total} bytes are the snapshot's own"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_and_forks_from_snapshots_give_the_data_back_without_the_sources_bindings()
-> Result<()> {
    let fixture = BtrfsFixture::new();
    let infra = fixture.infrastructure("instances");
    let root = fixture.root("instances");
    let source = spec("source");
    infra.provision(&source).await?;
    let source_app = infra.create_credentials(&source, &binding("app")).await?;
    populate(&source_app).await?;
    let source_admin = admin(&infra, &source).await;
    let data = fingerprint(&source_admin).await;
    let snapshot = infra.snapshot(&source, &backup_id("b1")).await?;

    let clone = spec("clone");
    let started = Instant::now();
    let endpoint = infra.provision_from_snapshot(&clone, &snapshot).await?;
    println!("clone from a snapshot: {:?}", started.elapsed());
    assert_eq!(endpoint.port, clone.port);
    assert_eq!(
        infra.provision_from_snapshot(&clone, &snapshot).await?,
        endpoint
    );
    let cloned = admin(&infra, &clone).await;
    assert_eq!(fingerprint(&cloned).await, data);
    // The clone is its own: port, logs, record; the source's binding is gone and what
    // it owned belongs to the owner.
    let show = |setting: &'static str| {
        let cloned = &cloned;
        async move {
            cloned
                .query_one("SELECT current_setting($1)", &[&setting])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(show("port").await, clone.port.to_string());
    assert!(
        show("log_directory")
            .await
            .starts_with(root.join("clone").to_str().unwrap())
    );
    let record = std::fs::read_to_string(root.join("clone/phoenix-volume.json"))?;
    assert!(
        record.contains(&format!("\"port\": {}", clone.port)),
        "{record}"
    );
    let as_clone = Credentials {
        port: clone.port,
        ..source_app.clone()
    };
    assert!(
        connect(&as_clone).await.is_err(),
        "a source binding logs in to the clone"
    );
    assert!(!role_exists(&cloned, &source_app.username).await);
    let owner: String = cloned
        .query_one(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'app.binding_owned'::regclass",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(owner, "phoenix_owner");
    let clone_app = infra
        .create_credentials(&clone, &binding("clone-app"))
        .await?;
    connect(&clone_app)
        .await?
        .execute(
            "INSERT INTO app.binding_owned VALUES (2, 'by the clone')",
            &[],
        )
        .await?;

    let fork = spec("fork");
    let started = Instant::now();
    infra.provision_fork(&fork, &source).await?;
    println!("fork of a live instance: {:?}", started.elapsed());
    let forked = admin(&infra, &fork).await;
    assert_eq!(fingerprint(&forked).await, data);
    assert!(!root.join("@forks/fork").exists());
    // The three go their own ways.
    source_admin
        .batch_execute("DELETE FROM billing.invoices")
        .await?;
    assert_eq!(fingerprint(&forked).await, data);
    assert_ne!(fingerprint(&cloned).await, fingerprint(&source_admin).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_restore_leaves_the_instance_as_it_was() -> Result<()> {
    let fixture = BtrfsFixture::new();
    let infra = fixture.infrastructure("instances");
    let root = fixture.root("instances");
    let spec = spec("failing");
    infra.provision(&spec).await?;
    let app = infra.create_credentials(&spec, &binding("app")).await?;
    populate(&app).await?;
    let good = infra.snapshot(&spec, &backup_id("good")).await?;
    let corrupt = infra.snapshot(&spec, &backup_id("corrupt")).await?;
    let vanished = infra.snapshot(&spec, &backup_id("vanished")).await?;
    let live = admin(&infra, &spec).await;
    let backed_up = fingerprint(&live).await;
    live.batch_execute("DELETE FROM billing.invoices").await?;
    drop(live);
    let now = fingerprint(&admin(&infra, &spec).await).await;

    btrfs(&["subvolume", "delete"], &snapshot_path(&root, &vanished));
    let err = infra.restore_snapshot(&spec, &vanished).await.unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(m) if m.contains("does not exist")),
        "{err}"
    );

    // A snapshot whose server cannot start: its control file is garbage.
    let path = snapshot_path(&root, &corrupt);
    set_read_only(&path, false);
    std::fs::write(path.join("data/global/pg_control"), b"garbage")?;
    set_read_only(&path, true);
    let err = infra.restore_snapshot(&spec, &corrupt).await.unwrap_err();
    println!("restore of a corrupt snapshot failed as it must: {err}");

    for _ in 0..2 {
        assert!(infra.is_healthy(&spec).await?);
        assert_eq!(fingerprint(&admin(&infra, &spec).await).await, now);
        connect(&app).await?.query_one("SELECT 1", &[]).await?;
        nothing_aside(&root, &spec);
        // A restarted broker finds it so too.
        fixture
            .infrastructure("instances")
            .ensure_running(&spec)
            .await?;
    }
    infra.restore_snapshot(&spec, &good).await?;
    assert_eq!(fingerprint(&admin(&infra, &spec).await).await, backed_up);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_interrupted_after_the_swap_is_undone_by_the_next_call() -> Result<()> {
    let fixture = BtrfsFixture::new();
    let infra = fixture.infrastructure("instances");
    let root = fixture.root("instances");
    let spec = spec("interrupted");
    infra.provision(&spec).await?;
    populate(&infra.create_credentials(&spec, &binding("app")).await?).await?;
    let snapshot = infra.snapshot(&spec, &backup_id("b1")).await?;
    let live = admin(&infra, &spec).await;
    live.batch_execute("DELETE FROM billing.invoices").await?;
    let now = fingerprint(&live).await;
    drop(live);

    // What a broker killed in the middle of restore_snapshot leaves: the live volume set
    // aside (its server stopped), a copy of the snapshot in its place, running.
    let volume = root.join(spec.id.as_str());
    let pid: i32 = std::fs::read_to_string(volume.join("data/postmaster.pid"))?
        .lines()
        .next()
        .unwrap()
        .parse()?;
    host::signal(pid.try_into()?, Signal::SIGINT)?;
    host::wait_gone(&[pid.try_into()?], "postgres", Duration::from_secs(30)).await?;
    std::fs::create_dir(root.join("@previous"))?;
    std::fs::rename(&volume, root.join("@previous").join(spec.id.as_str()))?;
    btrfs(
        &[
            "subvolume",
            "snapshot",
            snapshot_path(&root, &snapshot).to_str().unwrap(),
        ],
        &volume,
    );

    let restarted = fixture.infrastructure("instances");
    restarted.ensure_running(&spec).await?;
    assert_eq!(fingerprint(&admin(&restarted, &spec).await).await, now);
    nothing_aside(&root, &spec);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_on_a_root_that_is_not_btrfs_is_refused() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    assert!(!infra.supports_snapshots());
    let (spec, copy) = (spec("plain"), spec("copy"));
    infra.provision(&spec).await?;
    let refused = |err: Error| {
        assert!(
            matches!(&err, Error::Invalid(m)
                if m.contains("is not on btrfs") && m.contains("snapshot plans need it")),
            "{err}"
        );
    };
    refused(infra.snapshot(&spec, &backup_id("b1")).await.unwrap_err());
    let elsewhere = SnapshotRef {
        provider: "btrfs".into(),
        id: "plain/b1".into(),
        location: None,
        size_bytes: None,
        details: Default::default(),
    };
    refused(
        infra
            .provision_from_snapshot(&copy, &elsewhere)
            .await
            .unwrap_err(),
    );
    refused(infra.restore_snapshot(&spec, &elsewhere).await.unwrap_err());
    assert!(infra.is_healthy(&spec).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_snapshot_goes_through_the_pipeline_and_restores_under_another_root() -> Result<()>
{
    let fixture = BtrfsFixture::new();
    let here = fixture.infrastructure("instances");
    let there = fixture.infrastructure("other-host");
    // The same instance on both "hosts", each with a port of its own.
    let (spec, target) = (spec("shipped"), spec("shipped"));
    here.provision(&spec).await?;
    let app = here.create_credentials(&spec, &binding("app")).await?;
    populate(&app).await?;
    let data = fingerprint(&admin(&here, &spec).await).await;
    let snapshot = here.snapshot(&spec, &backup_id("b1")).await?;

    let vault = Vault::new();
    let source = here.send_source(&snapshot).await?;
    let info = source.info();
    assert_eq!(
        (
            info.strategy.as_str(),
            info.engine.as_str(),
            info.engine_version.as_deref(),
            info.format.as_str()
        ),
        ("snapshot", "postgresql", Some("15"), "btrfs-send")
    );
    let started = Instant::now();
    let manifest = vault.back_up(source.as_ref(), &spec, "b1").await;
    println!(
        "shipped snapshot: {} MB sent, {} MB stored, {:?}",
        manifest.raw_bytes >> 20,
        manifest.stored_bytes >> 20,
        started.elapsed()
    );

    // The other host has the instance anew (empty, with a binding of its own).
    there.provision(&target).await?;
    let there_app = there
        .create_credentials(&target, &binding("there-app"))
        .await?;
    let started = Instant::now();
    let (sink, received) = there
        .receive_snapshot(&target, &manifest.backup_id, &manifest.source_info)
        .await?;
    backup::restore(
        vault.store.clone(),
        &manifest,
        KeySource::Master(&vault.master),
        sink,
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await?;
    assert!(there.snapshot_exists(&received).await?);
    // Another host's server user has another user ID: what it owned must be handed over.
    let received_path = snapshot_path(&fixture.root("other-host"), &received);
    set_read_only(&received_path, false);
    let server_user = std::fs::metadata(&received_path)?.uid();
    change_owner(&received_path, server_user, 4242);
    set_read_only(&received_path, true);
    there.restore_snapshot(&target, &received).await?;
    println!(
        "shipped snapshot received and restored: {:?}",
        started.elapsed()
    );
    assert_eq!(fingerprint(&admin(&there, &target).await).await, data);
    connect(&there_app).await?;
    let as_there = Credentials {
        port: target.port,
        ..app.clone()
    };
    assert!(
        connect(&as_there).await.is_err(),
        "the sending host's binding got in"
    );

    // A stream cut short is refused, and leaves nothing behind.
    let SourceOutput::Stream(mut stream) = here.send_source(&snapshot).await?.open().await? else {
        panic!("btrfs send is a stream");
    };
    let mut whole = Vec::new();
    while let Some(chunk) = stream.next().await {
        whole.extend_from_slice(&chunk?);
    }
    whole.truncate(whole.len() / 2);
    let (sink, cut) = there
        .receive_snapshot(&target, &backup_id("cut"), &info)
        .await?;
    let err = sink
        .consume(Box::pin(futures::stream::iter([Ok(bytes::Bytes::from(
            whole,
        ))])))
        .await
        .unwrap_err();
    println!("a cut send stream failed as it must: {err}");
    assert!(!there.snapshot_exists(&cut).await?);
    assert!(
        !fixture
            .root("other-host")
            .join("@receiving/shipped")
            .exists()
    );
    Ok(())
}
