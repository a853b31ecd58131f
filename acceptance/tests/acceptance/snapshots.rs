//! Snapshot plans end to end: plan `small-snapshot` backs up as a read-only btrfs
//! subvolume snapshot of the instance's volume when the broker's data dir is on btrfs
//! (the testbed's loop-mounted one, `PHOENIX_TEST_BTRFS_DIR`), through the same Backup
//! API as stream plans; restores in place, clones and forks work from those snapshots;
//! and on a data dir that is not btrfs the plan is refused at provision time. A catalog
//! whose snapshot plan ships restores and clones from backup storage alone. Data is
//! compared by the dataset's fingerprint (`dataset.rs`). Durations are printed, never
//! asserted: that a snapshot copies no data is read from the file system's extents.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backups::{
    BackupApi, assert_independent, copy_of_plan_and_fingerprint, filled_instance_of,
};
use crate::data::connect;
use crate::dataset::{
    STANDARD_BYTES, assert_same_data, change_one_byte, connect_eventually, fingerprint_of,
};
use crate::harness::{Broker, BrokerConfig, is_btrfs, is_subvolume};
use crate::osb::{new_id, provision_body, update_body};

/// The default catalog's snapshot plan.
const SNAPSHOT_PLAN: &str = "small-snapshot";
/// A database large enough that copying it would show in its snapshot's extents.
const LARGE_DATABASE_BYTES: usize = 128 * 1024 * 1024;
/// A deleted backup's snapshot must be gone within this long.
const DEADLINE: Duration = Duration::from_secs(60);

/// Where the broker keeps the snapshot of a backup (see the adapters'
/// `infrastructure/local/snapshots.rs`: `<data dir>/instances/@snapshots/<instance>/<backup>`).
fn snapshot_path(broker: &Broker, instance: &str, backup: &str) -> PathBuf {
    broker
        .instances_dir()
        .join("@snapshots")
        .join(instance)
        .join(backup)
}

fn backup_id(backup: &Value) -> String {
    backup["backup_id"]
        .as_str()
        .unwrap_or_else(|| panic!("backup_id: {backup}"))
        .to_owned()
}

/// A succeeded backup record of a snapshot plan's instance.
#[track_caller]
fn assert_snapshot_backup(backup: &Value, instance: &str) {
    assert_eq!(backup["state"], json!("succeeded"), "{backup}");
    assert_eq!(backup["instance_id"], json!(instance), "{backup}");
    assert_eq!(backup["strategy"], json!("snapshot"), "{backup}");
    assert_eq!(backup["format"], json!("btrfs-subvolume"), "{backup}");
    assert_eq!(backup["engine"], json!("postgresql"), "{backup}");
    assert!(backup["error"].is_null(), "{backup}");
}

/// The snapshot exists as a btrfs subvolume, and nothing can be written into it.
#[track_caller]
fn assert_read_only_snapshot(path: &Path) {
    assert!(
        is_subvolume(path),
        "{} is not a btrfs subvolume (exists: {})",
        path.display(),
        path.exists()
    );
    let probe = std::fs::write(path.join("phoenix-acceptance-probe"), b"x");
    assert!(
        probe
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(nix::libc::EROFS)),
        "{} takes writes: a snapshot backup must be read-only ({probe:?})",
        path.display()
    );
}

/// `(total, exclusive)` bytes of the extents under `path` (`btrfs filesystem du`):
/// exclusive extents are referenced from nowhere else, so a snapshot that copied nothing
/// has almost none; a copy would have them all.
fn extents(path: &Path) -> (u64, u64) {
    let output = std::process::Command::new("btrfs")
        .args(["filesystem", "du", "-s", "--raw"])
        .arg(path)
        .output()
        .expect("running btrfs (btrfs-progs; scripts/testbed/btrfs installs it)");
    assert!(
        output.status.success(),
        "btrfs filesystem du {}: {output:?}",
        path.display()
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let numbers: Vec<u64> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .take(2)
        .map(|n| n.parse().unwrap_or_else(|e| panic!("{n:?} in {text}: {e}")))
        .collect();
    assert_eq!(numbers.len(), 2, "btrfs filesystem du printed: {text}");
    (numbers[0], numbers[1])
}

/// Freezes what the dataset wrote, so that no autovacuum rewrites its pages just after a
/// snapshot (which would make the snapshot's old extents its own).
async fn vacuum_freeze(credentials: &Value) {
    connect(credentials)
        .await
        .batch_execute("VACUUM (FREEZE, ANALYZE)")
        .await
        .expect("VACUUM (FREEZE) as the owner role");
}

async fn database_size(credentials: &Value) -> u64 {
    let size: i64 = connect(credentials)
        .await
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .expect("pg_database_size")
        .get(0);
    u64::try_from(size).expect("a size")
}

/// The broker's own measure of a backup: `finished_at - started_at`.
fn broker_duration(backup: &Value) -> String {
    let at = |field: &str| {
        backup[field]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    match (at("started_at"), at("finished_at")) {
        (Some(started), Some(finished)) => {
            format!("{} ms", (finished - started).num_milliseconds())
        }
        _ => format!("unknown ({backup})"),
    }
}

#[tokio::test]
async fn snapshots_restore_in_place_brings_back_the_snapshot_and_bindings_keep_working() {
    let broker = Broker::start_on_btrfs().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let plan = catalog.plan(SNAPSHOT_PLAN);
    assert_eq!(
        plan.raw["metadata"]["backups"]["strategy"],
        json!("snapshot"),
        "the plan announces its strategy: {}",
        plan.raw
    );
    let source = filled_instance_of(&osb, &catalog, &plan, STANDARD_BYTES).await;
    assert!(
        is_subvolume(&broker.instances_dir().join(&source.instance)),
        "the volume of a snapshot plan's instance on btrfs is a subvolume"
    );
    let api = BackupApi::platform(&broker, &source.instance);

    let backup = api.take_backup().await;
    let backup_id = backup_id(&backup);
    assert_snapshot_backup(&backup, &source.instance);
    assert_eq!(backup["trigger"], json!("manual"), "{backup}");
    assert_read_only_snapshot(&snapshot_path(&broker, &source.instance, &backup_id));
    assert_eq!(api.listed().await, std::slice::from_ref(&backup_id));
    let shown = api.backup(&backup_id).await;
    shown.expect(200);
    assert_snapshot_backup(&shown.body, &source.instance);

    // A binding made after the backup exists when the restore runs: it must keep working.
    let (_, later) = osb.create_binding(&catalog, &source.instance, &plan).await;
    connect(&source.credentials)
        .await
        .batch_execute(
            "DROP VIEW sales.customer_totals; DROP TABLE sales.orders;
             SELECT lo_unlink(blob) FROM public.blobs;
             DELETE FROM public.blobs; SELECT nextval('sales.invoice_numbers');
             SET ROLE NONE; UPDATE public.binding_notes SET body = 'overwritten';
             SET ROLE phoenix_owner;",
        )
        .await
        .expect("damaging the data");
    change_one_byte(&connect(&source.credentials).await).await;
    let damaged = fingerprint_of(&source.credentials).await;
    assert_ne!(damaged, source.fingerprint, "the damage shows");

    let restore = api.restore_and_wait(&backup_id).await;
    assert_eq!(restore["backup_id"], json!(backup_id), "{restore}");
    assert_eq!(restore["instance_id"], json!(source.instance), "{restore}");
    assert!(restore["error"].is_null(), "{restore}");
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "after an in-place restore of a snapshot, through the binding made before it",
    );
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&later).await,
        "after an in-place restore of a snapshot, through a binding made after it",
    );
    for credentials in [&source.credentials, &later] {
        connect_eventually(credentials)
            .await
            .batch_execute(&format!(
                "CREATE TABLE after_restore_{} (v int); INSERT INTO after_restore_{0} VALUES (1)",
                new_id().replace('-', "")
            ))
            .await
            .expect("the restored instance takes writes through an existing binding");
    }
    // A restore does not use its snapshot up.
    assert_read_only_snapshot(&snapshot_path(&broker, &source.instance, &backup_id));
}

#[tokio::test]
async fn snapshots_clone_and_fork_of_a_snapshot_instance_hold_exactly_the_data() {
    let broker = Broker::start_on_btrfs().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let plan = catalog.plan(SNAPSHOT_PLAN);
    let source = filled_instance_of(&osb, &catalog, &plan, STANDARD_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);
    let backup = api.take_backup().await;
    assert_snapshot_backup(&backup, &source.instance);
    // The live data moves on: the clone must be the backup's, the fork the live data.
    change_one_byte(&connect(&source.credentials).await).await;
    let live = fingerprint_of(&source.credentials).await;

    let (clone, clone_credentials, cloned) = copy_of_plan_and_fingerprint(
        &osb,
        &catalog,
        &plan,
        json!({ "clone_from": {
            "instance_id": source.instance,
            "backup_id": backup["backup_id"],
        }}),
    )
    .await;
    assert_same_data(
        &source.fingerprint.as_copied(),
        &cloned,
        "a clone of a snapshot backup",
    );
    let (fork, fork_credentials, forked) = copy_of_plan_and_fingerprint(
        &osb,
        &catalog,
        &plan,
        json!({ "fork_from": { "instance_id": source.instance } }),
    )
    .await;
    assert_same_data(
        &live.as_copied(),
        &forked,
        "a fork of a live snapshot-plan instance",
    );
    for copy in [&clone, &fork] {
        assert!(
            is_subvolume(&broker.instances_dir().join(copy)),
            "the copy {copy} is a subvolume of its own"
        );
    }
    assert_same_data(
        &live,
        &fingerprint_of(&source.credentials).await,
        "the source after a clone and a fork",
    );
    assert_independent(&clone_credentials, &source.credentials).await;
    assert_independent(&fork_credentials, &source.credentials).await;
}

#[tokio::test]
async fn snapshots_a_snapshot_of_a_large_database_copies_no_data() {
    let broker = Broker::start_on_btrfs().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let plan = catalog.plan(SNAPSHOT_PLAN);
    for (name, filler) in [("small", 64 * 1024), ("large", LARGE_DATABASE_BYTES)] {
        let source = filled_instance_of(&osb, &catalog, &plan, filler).await;
        vacuum_freeze(&source.credentials).await;
        let size = database_size(&source.credentials).await;
        let api = BackupApi::platform(&broker, &source.instance);

        let started = Instant::now();
        let backup = api.take_backup().await;
        let took = started.elapsed();
        assert_snapshot_backup(&backup, &source.instance);
        let path = snapshot_path(&broker, &source.instance, &backup_id(&backup));
        assert_read_only_snapshot(&path);
        // The file system's used bytes would say the same, but other tests write to the
        // same btrfs meanwhile; the snapshot's own extents are its alone to measure.
        let (total, exclusive) = extents(&path);

        change_one_byte(&connect(&source.credentials).await).await;
        let started = Instant::now();
        api.restore_and_wait(&backup_id(&backup)).await;
        let restored = started.elapsed();
        assert_same_data(
            &source.fingerprint,
            &fingerprint_of(&source.credentials).await,
            &format!("after restoring the {name} database's snapshot"),
        );
        eprintln!(
            "{name} database ({} MB): snapshot backup {took:?} (broker: {}), in-place \
             restore {restored:?}; snapshot extents {} MB, {} kB exclusive",
            size >> 20,
            broker_duration(&backup),
            total >> 20,
            exclusive >> 10
        );
        assert!(
            total >= size,
            "the snapshot of the {name} database ({size} bytes) references only {total} bytes"
        );
        // All but the few pages the server wrote after the snapshot are shared with the
        // live volume: nothing was copied.
        assert!(
            exclusive < total / 50,
            "{exclusive} of the {total} bytes of the {name} database's snapshot are its own: \
             the backup copied data"
        );
    }
}

#[tokio::test]
async fn snapshots_a_snapshot_plan_on_a_data_dir_not_on_btrfs_is_refused_at_once() {
    let broker = Broker::start().await;
    assert!(
        !is_btrfs(&broker.data_dir()).expect("statfs of the data dir"),
        "this test needs a temporary directory that is not on btrfs: {}",
        broker.data_dir().display()
    );
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let plan = catalog.plan(SNAPSHOT_PLAN);

    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &plan), true)
        .await;
    reply.expect_error(422, None);
    assert!(
        reply.body["description"]
            .as_str()
            .is_some_and(|d| d.to_lowercase().contains("btrfs")),
        "the refusal names btrfs: {}",
        reply.text
    );
    osb.assert_absent(&instance).await;
    assert_eq!(
        broker.instance_volumes(),
        Vec::<String>::new(),
        "a refused provision leaves no volume"
    );
    // The refusal is the plan's: a stream plan provisions on the same broker, and may
    // not become a snapshot plan here either.
    let small = osb.create_instance(&catalog, &catalog.small).await;
    let update = osb
        .update(&small, &update_body(&catalog, &catalog.small, &plan), true)
        .await;
    update.expect_error(422, None);
    assert!(
        update.text.to_lowercase().contains("btrfs"),
        "the refusal names btrfs: {}",
        update.text
    );
    let fetched = osb.fetch_instance(&small).await;
    fetched.expect(200);
    assert_eq!(
        fetched.body["plan_id"],
        json!(catalog.small.id),
        "the refused update left the plan as it was: {}",
        fetched.text
    );
}

#[tokio::test]
async fn snapshots_deleting_a_snapshot_backup_removes_its_snapshot_and_only_that() {
    let broker = Broker::start_on_btrfs().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let plan = catalog.plan(SNAPSHOT_PLAN);
    let source = filled_instance_of(&osb, &catalog, &plan, 64 * 1024).await;
    let api = BackupApi::platform(&broker, &source.instance);
    let first = backup_id(&api.take_backup().await);
    change_one_byte(&connect(&source.credentials).await).await;
    let kept_fingerprint = fingerprint_of(&source.credentials).await;
    let kept = backup_id(&api.take_backup().await);
    let first_path = snapshot_path(&broker, &source.instance, &first);
    let kept_path = snapshot_path(&broker, &source.instance, &kept);
    assert_read_only_snapshot(&first_path);
    assert_read_only_snapshot(&kept_path);

    let reply = api.delete_backup(&first).await;
    assert!(
        matches!(reply.status.as_u16(), 200 | 202),
        "DELETE of backup {first} answered {}: {}",
        reply.status,
        reply.text
    );
    api.backup(&first).await.expect_error(404, None);
    assert_eq!(api.listed().await, std::slice::from_ref(&kept));
    let started = Instant::now();
    while first_path.exists() {
        assert!(
            started.elapsed() < DEADLINE,
            "the deleted backup's snapshot {} is still there {DEADLINE:?} after DELETE \
             answered {}",
            first_path.display(),
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the snapshot was gone {:?} after DELETE answered {}",
        started.elapsed(),
        reply.status
    );

    // The other backup is untouched and whole.
    assert_read_only_snapshot(&kept_path);
    change_one_byte(&connect(&source.credentials).await).await;
    api.restore_and_wait(&kept).await;
    assert_same_data(
        &kept_fingerprint,
        &fingerprint_of(&source.credentials).await,
        "a restore of the backup that was kept",
    );
}

/// The default catalog, with `small-snapshot` shipping its snapshots to backup storage.
fn catalog_with_shipped_snapshots() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalog/catalog.yaml");
    let catalog = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let kept = "backup_strategy: {type: snapshot, shipped: false}";
    assert!(
        catalog.contains(kept),
        "{} no longer says `{kept}`",
        path.display()
    );
    catalog.replace(kept, "backup_strategy: {type: snapshot, shipped: true}")
}

#[tokio::test]
async fn snapshots_shipped_to_storage_restore_and_clone_after_the_host_lost_them() {
    let mut broker = Broker::prepare(BrokerConfig {
        on_btrfs: true,
        ..BrokerConfig::default()
    })
    .await
    .expect("preparing a broker");
    let catalog_file = broker.data_dir().with_file_name("catalog.yaml");
    std::fs::write(&catalog_file, catalog_with_shipped_snapshots()).expect("writing the catalog");
    broker.set_env(
        "PHOENIX_CATALOG",
        catalog_file.to_str().expect("a UTF-8 path"),
    );
    broker.spawn_and_wait().await.expect("starting the broker");
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let plan = catalog.plan(SNAPSHOT_PLAN);
    let source = filled_instance_of(&osb, &catalog, &plan, STANDARD_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);
    let backup = api.take_backup().await;
    let backup_id = backup_id(&backup);
    assert_eq!(backup["strategy"], json!("snapshot"), "{backup}");
    assert_eq!(backup["format"], json!("btrfs-send"), "{backup}");
    assert!(
        backup["stored_bytes"].as_u64().is_some_and(|n| n > 0),
        "a shipped snapshot is in backup storage: {backup}"
    );

    // The host loses its snapshot: only the copy in backup storage is left.
    let local = snapshot_path(&broker, &source.instance, &backup_id);
    assert_read_only_snapshot(&local);
    let deleted = std::process::Command::new("btrfs")
        .args(["subvolume", "delete"])
        .arg(&local)
        .output()
        .expect("running btrfs");
    assert!(
        deleted.status.success(),
        "btrfs subvolume delete: {deleted:?}"
    );

    change_one_byte(&connect(&source.credentials).await).await;
    api.restore_and_wait(&backup_id).await;
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "an in-place restore of a shipped snapshot, received from backup storage",
    );
    let (_, _, cloned) = copy_of_plan_and_fingerprint(
        &osb,
        &catalog,
        &plan,
        json!({ "clone_from": { "instance_id": source.instance, "backup_id": backup_id } }),
    )
    .await;
    assert_same_data(
        &source.fingerprint.as_copied(),
        &cloned,
        "a clone of a shipped snapshot",
    );
}
