//! Streaming backups, in-place restores, clones and forks of PostgreSQL instances, against
//! real PostgreSQL 15 servers run by the local infrastructure (as the `postgres` system
//! user when the tests run as root).
//!
//! The data set holds what a partial or lossy restore would miss: several schemas (one
//! with a quoted name), quotes, backslashes and non-ASCII text, bytea, jsonb, a view, a
//! GIN and a descending index, a sequence's position, large objects, and a table and a
//! large object owned by a binding's own role. It is compared by a fingerprint query.

#![allow(clippy::unwrap_used)] // Tests: a failed call fails the test.

use std::sync::Arc;

use anyhow::Result;
use base64::Engine as _;
use bytes::Bytes;
use phoenix_adapters::Error;
use phoenix_adapters::backup::{
    self, BackupKeys, BackupRequest, InstanceKey, KeySource, Manifest, PipelineConfig, Progress,
    Source, SourceOutput,
};
use phoenix_adapters::engine::Credentials;
use phoenix_adapters::engine::postgres::backup::{PREVIOUS, SCRATCH};
use phoenix_adapters::ids::BackupId;
use phoenix_adapters::infrastructure::{InstanceSpec, LocalInfrastructure};
use phoenix_adapters::keys::{MasterKey, random_bytes};
use phoenix_adapters::storage::ByteStream;
use phoenix_adapters::storage::local::LocalStore;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::engine_postgres::{Fixture, admin, binding, connect, spec};

/// Creates the data set through a binding (whose sessions act as the owner role), with
/// one table and one large object created as the binding's own role.
pub(crate) async fn populate(credentials: &Credentials) -> Result<()> {
    let client = connect(credentials).await?;
    client
        .batch_execute(
            r#"
            CREATE SCHEMA app;
            CREATE SCHEMA billing;
            CREATE SCHEMA "Mixed ""Case"" schema";
            CREATE TABLE app.notes (
                id bigint PRIMARY KEY, body text NOT NULL, blob bytea, doc jsonb,
                created timestamptz);
            INSERT INTO app.notes
            SELECT i,
                   'note ' || i || E' quote '' dq " backslash \\ tab \t ünïcödé ✓ 日本',
                   decode(md5(i::text), 'hex') || '\x00ff5c27'::bytea,
                   jsonb_build_object('i', i, 'tags', jsonb_build_array('a', 'b"c', E'd\\e'),
                                      'nested', jsonb_build_object('x', i % 7)),
                   timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute'
            FROM generate_series(1, 20000) AS i;
            CREATE INDEX notes_doc_idx ON app.notes USING gin (doc);
            CREATE INDEX notes_created_idx ON app.notes (created DESC);
            CREATE SEQUENCE billing.invoice_no START 1000;
            CREATE TABLE billing.invoices (
                no bigint PRIMARY KEY DEFAULT nextval('billing.invoice_no'),
                note_id bigint REFERENCES app.notes (id), amount numeric(12, 2));
            INSERT INTO billing.invoices (note_id, amount)
            SELECT i, i * 1.25 FROM generate_series(1, 500) AS i;
            SELECT nextval('billing.invoice_no') FROM generate_series(1, 37);
            CREATE VIEW app.summary AS
                SELECT n.id % 10 AS bucket, count(*) AS notes, sum(i.amount) AS total
                FROM app.notes n LEFT JOIN billing.invoices i ON i.note_id = n.id GROUP BY 1;
            CREATE TABLE "Mixed ""Case"" schema"."Weird 'table'" (k text PRIMARY KEY, v text);
            INSERT INTO "Mixed ""Case"" schema"."Weird 'table'" VALUES
                ('', NULL), ('é', E'line 1\nline 2'), ('\', '\\'), ('"', '''');
            SELECT lo_from_bytea(0, convert_to(repeat('large object ✓ ', 5000), 'UTF8'));
            SET ROLE NONE;
            CREATE TABLE app.binding_owned (id int PRIMARY KEY, secret text);
            INSERT INTO app.binding_owned VALUES (1, 'owned by the binding');
            SELECT lo_from_bytea(0, '\xdeadbeef'::bytea);
            "#,
        )
        .await?;
    Ok(())
}

/// One digest per part of the data set, read as the superuser.
pub(crate) async fn fingerprint(client: &Client) -> Vec<(String, String)> {
    let rows = client
        .query(
            r#"
            SELECT 'notes', md5(string_agg(format('%s|%s|%s|%s|%s', id, body, encode(blob, 'hex'),
                                                  doc, created), E'\n' ORDER BY id))
            FROM app.notes
            UNION ALL
            SELECT 'invoices', md5(string_agg(format('%s|%s|%s', no, note_id, amount), E'\n' ORDER BY no))
            FROM billing.invoices
            UNION ALL
            SELECT 'summary', md5(string_agg(format('%s|%s|%s', bucket, notes, total), E'\n' ORDER BY bucket))
            FROM app.summary
            UNION ALL
            SELECT 'weird', md5(string_agg(format('%s|%s', k, v), E'\n' ORDER BY k))
            FROM "Mixed ""Case"" schema"."Weird 'table'"
            UNION ALL
            SELECT 'binding owned', md5(string_agg(format('%s|%s', id, secret), E'\n' ORDER BY id))
            FROM app.binding_owned
            UNION ALL
            SELECT 'sequence', format('%s|%s', last_value, is_called) FROM billing.invoice_no
            UNION ALL
            SELECT 'large objects', string_agg(format('%s:%s', oid, md5(lo_get(oid))), ',' ORDER BY oid)
            FROM pg_largeobject_metadata
            UNION ALL
            SELECT 'indexes', string_agg(indexdef, E'\n' ORDER BY indexdef)
            FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
            UNION ALL
            SELECT 'views', string_agg(viewname || ': ' || definition, E'\n' ORDER BY viewname)
            FROM pg_views WHERE schemaname = 'app'
            "#,
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            (
                row.get::<_, String>(0),
                row.get::<_, Option<String>>(1).unwrap_or_default(),
            )
        })
        .collect()
}

/// Who owns each schema, relation and large object.
async fn owners(client: &Client) -> Vec<(String, String)> {
    let rows = client
        .query(
            "SELECT format('%s.%s', n.nspname, c.relname), pg_get_userbyid(c.relowner)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
             UNION ALL
             SELECT 'schema ' || nspname, pg_get_userbyid(nspowner) FROM pg_namespace
             WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
             UNION ALL
             SELECT 'large object ' || oid, pg_get_userbyid(lomowner) FROM pg_largeobject_metadata
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

/// The instance database's own settings, the databases that exist, and the roles that
/// are not built in.
async fn cluster_state(client: &Client) -> (String, Vec<String>, Vec<String>) {
    let database: String = client
        .query_one(
            "SELECT format('owner=%s acl=%s allowconn=%s connlimit=%s comment=%s',
                           pg_get_userbyid(datdba), datacl, datallowconn, datconnlimit,
                           shobj_description(oid, 'pg_database'))
             FROM pg_database WHERE datname = 'phoenix'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let names = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter().map(|row| row.get(0)).collect()
    };
    let databases = names(
        client
            .query("SELECT datname::text FROM pg_database ORDER BY 1", &[])
            .await
            .unwrap(),
    );
    let roles = names(
        client
            .query(
                "SELECT format('%s login=%s comment=%s', rolname, rolcanlogin,
                               shobj_description(oid, 'pg_authid'))
                 FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1",
                &[],
            )
            .await
            .unwrap(),
    );
    (database, databases, roles)
}

async fn maintenance(infra: &LocalInfrastructure, spec: &InstanceSpec) -> Client {
    infra
        .admin_connection(spec)
        .unwrap()
        .connect("postgres")
        .await
        .unwrap()
}

/// Changes that a restore of an earlier backup must undo.
async fn change_after_backup(client: &Client) {
    client
        .batch_execute(
            "DELETE FROM billing.invoices WHERE no % 3 = 0;
             UPDATE app.notes SET body = 'changed' WHERE id <= 100;
             SELECT nextval('billing.invoice_no');
             CREATE OR REPLACE VIEW app.summary AS
                 SELECT n.id % 10 AS bucket, count(*) AS notes, sum(i.amount) * 2 AS total
                 FROM app.notes n LEFT JOIN billing.invoices i ON i.note_id = n.id GROUP BY 1;
             CREATE TABLE app.after_backup (x int);
             SELECT lo_unlink(min(oid)) FROM pg_largeobject_metadata;",
        )
        .await
        .unwrap();
}

/// A local store and the keys to back an instance up into it.
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

    /// A full backup of `spec` through the pipeline into the store.
    async fn back_up(&self, infra: &LocalInfrastructure, spec: &InstanceSpec) -> Manifest {
        let source = infra.backup_source(spec).await.unwrap();
        self.back_up_from(source.as_ref(), spec).await
    }

    /// A full backup of `spec` from `source` (made by its infrastructure).
    async fn back_up_from(&self, source: &dyn Source, spec: &InstanceSpec) -> Manifest {
        let keys = BackupKeys {
            instance: InstanceKey::generate(&self.master, &spec.id).unwrap(),
            passphrase: None,
        };
        let request = BackupRequest {
            instance_id: spec.id.clone(),
            backup_id: BackupId::parse("backup-1").unwrap(),
            config: PipelineConfig::default(),
        };
        let manifest = backup::run_backup(
            source,
            &request,
            &keys,
            self.store.clone(),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let stored = backup::read_manifest(self.store.as_ref(), &spec.id, &manifest.backup_id)
            .await
            .unwrap();
        assert_eq!(stored, manifest);
        manifest
    }

    /// Restores `manifest` into `spec` through the pipeline, and completes it.
    async fn restore(&self, infra: &LocalInfrastructure, spec: &InstanceSpec, manifest: &Manifest) {
        let sink = infra
            .begin_restore(spec, &manifest.source_info)
            .await
            .unwrap();
        let report = backup::restore(
            self.store.clone(),
            manifest,
            KeySource::Master(&self.master),
            sink,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(report.raw_bytes, manifest.raw_bytes);
        infra.complete_restore(spec).await.unwrap();
    }
}

/// The whole dump of `source` in memory (small test data only).
async fn dump(source: &dyn Source) -> Vec<u8> {
    let SourceOutput::Stream(mut stream) = source.open().await.unwrap() else {
        panic!("a pg_dump source is a stream");
    };
    let mut out = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

fn stream_of(data: Vec<u8>) -> ByteStream {
    Box::pin(futures::stream::iter(
        data.chunks(64 * 1024)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_in_place_brings_back_every_object_with_its_owner() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("in-place");
    infra.provision(&spec).await?;
    let credentials = infra.create_credentials(&spec, &binding("app")).await?;
    populate(&credentials).await?;
    let live = admin(&infra, &spec).await;
    let (data, owned) = (fingerprint(&live).await, owners(&live).await);
    assert!(
        owned.contains(&("app.binding_owned".into(), credentials.username.clone())),
        "{owned:?}"
    );
    let state = cluster_state(&maintenance(&infra, &spec).await).await;

    let vault = Vault::new();
    let manifest = vault.back_up(&infra, &spec).await;
    let info = &manifest.source_info;
    assert_eq!(
        (
            info.strategy.as_str(),
            info.engine.as_str(),
            info.engine_version.as_deref(),
            info.format.as_str()
        ),
        ("stream", "postgresql", Some("15"), "pg_dump-custom")
    );
    assert_eq!(info.details["roles"], credentials.username);

    change_after_backup(&live).await;
    assert_ne!(fingerprint(&live).await, data);
    drop(live);
    vault.restore(&infra, &spec, &manifest).await;

    let live = admin(&infra, &spec).await;
    assert_eq!(fingerprint(&live).await, data);
    assert_eq!(owners(&live).await, owned);
    assert_eq!(
        cluster_state(&maintenance(&infra, &spec).await).await,
        state
    );
    // The binding logs in as before and, as its own role, reads what it owns and (as a
    // member of the owner role) what the owner owns.
    let client = connect(&credentials).await?;
    client.batch_execute("SET ROLE NONE").await?;
    let row = client
        .query_one(
            "SELECT (SELECT secret FROM app.binding_owned), (SELECT count(*) FROM app.notes), \
             current_user::text",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "owned by the binding");
    assert_eq!(row.get::<_, i64>(1), 20_000);
    assert_eq!(row.get::<_, String>(2), credentials.username);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_hands_what_source_bindings_owned_to_the_owner_and_leaves_no_placeholder()
-> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let (source, target) = (spec("clone-source"), spec("clone-target"));
    infra.provision(&source).await?;
    infra.provision(&target).await?;
    let source_binding = infra
        .create_credentials(&source, &binding("source-app"))
        .await?;
    populate(&source_binding).await?;
    let source_admin = admin(&infra, &source).await;
    let data = fingerprint(&source_admin).await;
    let expected_owners: Vec<(String, String)> = owners(&source_admin)
        .await
        .into_iter()
        .map(|(object, owner)| {
            let owner = if owner == source_binding.username {
                "phoenix_owner".to_owned()
            } else {
                owner
            };
            (object, owner)
        })
        .collect();
    let target_binding = infra
        .create_credentials(&target, &binding("target-app"))
        .await?;
    let state = cluster_state(&maintenance(&infra, &target).await).await;

    let vault = Vault::new();
    let manifest = vault.back_up(&infra, &source).await;
    vault.restore(&infra, &target, &manifest).await;

    let cloned = admin(&infra, &target).await;
    assert_eq!(fingerprint(&cloned).await, data);
    assert_eq!(owners(&cloned).await, expected_owners);
    // Same databases, database settings and roles as before: no placeholder is left.
    assert_eq!(
        cluster_state(&maintenance(&infra, &target).await).await,
        state
    );
    // The target's binding, a member of the owner role, writes to the formerly
    // binding-owned table.
    let client = connect(&target_binding).await?;
    client
        .execute(
            "INSERT INTO app.binding_owned VALUES (2, 'by the clone')",
            &[],
        )
        .await?;
    assert_eq!(
        client
            .query_one("SELECT count(*) FROM app.binding_owned", &[])
            .await?
            .get::<_, i64>(0),
        2
    );
    Ok(())
}

/// The source is made, then a new binding creates a table of its own, then the dump
/// runs: the dump and its role list must both be of the moment the source was made. (A
/// dump of the later moment would hold a table whose owner the list misses, and its
/// restore would fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_and_its_role_list_are_of_the_same_moment() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let (source, target) = (spec("moment-source"), spec("moment-target"));
    infra.provision(&source).await?;
    infra.provision(&target).await?;
    populate(&infra.create_credentials(&source, &binding("early")).await?).await?;
    let data = fingerprint(&admin(&infra, &source).await).await;

    let dump = infra.backup_source(&source).await?;
    let late = infra.create_credentials(&source, &binding("late")).await?;
    connect(&late)
        .await?
        .batch_execute(
            "SET ROLE NONE; CREATE TABLE app.late_owned (id int); \
             INSERT INTO app.late_owned VALUES (1)",
        )
        .await?;
    let vault = Vault::new();
    let manifest = vault.back_up_from(dump.as_ref(), &source).await;
    assert!(
        !manifest.source_info.details["roles"].contains(&late.username),
        "{:?}",
        manifest.source_info.details
    );
    vault.restore(&infra, &target, &manifest).await;

    let cloned = admin(&infra, &target).await;
    assert_eq!(fingerprint(&cloned).await, data);
    let late_table: Option<String> = cloned
        .query_one("SELECT to_regclass('app.late_owned')::text", &[])
        .await?
        .get(0);
    assert_eq!(
        late_table, None,
        "the table made after the source is not in the dump"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_streams_a_live_instance_into_a_new_one() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let (source, target) = (spec("fork-source"), spec("fork-target"));
    infra.provision(&source).await?;
    infra.provision(&target).await?;
    populate(&infra.create_credentials(&source, &binding("app")).await?).await?;
    let source_admin = admin(&infra, &source).await;
    let data = fingerprint(&source_admin).await;

    let dump = infra.backup_source(&source).await?;
    let sink = infra.begin_restore(&target, &dump.info()).await?;
    let progress = Progress::new();
    let bytes = backup::transfer(dump.as_ref(), sink, &progress, &CancellationToken::new()).await?;
    assert!(bytes > 1_000_000, "{bytes}");
    assert!(progress.snapshot().stages.iter().all(|s| s.bytes == bytes));
    infra.complete_restore(&target).await?;

    let fork = admin(&infra, &target).await;
    assert_eq!(fingerprint(&fork).await, data);
    // The two instances go their own ways.
    change_after_backup(&source_admin).await;
    assert_eq!(fingerprint(&fork).await, data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pg_restore_fails_its_sink_and_abandoning_it_leaves_the_live_data() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("failing-restore");
    infra.provision(&spec).await?;
    let credentials = infra.create_credentials(&spec, &binding("app")).await?;
    populate(&credentials).await?;
    let live = admin(&infra, &spec).await;
    let (data, owned) = (fingerprint(&live).await, owners(&live).await);
    let state = cluster_state(&maintenance(&infra, &spec).await).await;
    let source = infra.backup_source(&spec).await?;
    let info = source.info();
    let whole = dump(source.as_ref()).await;

    // Garbage: pg_restore refuses it.
    let sink = infra.begin_restore(&spec, &info).await?;
    let err = sink
        .consume(stream_of(b"this is not a pg_dump archive".repeat(1000)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ProcessFailed { program, .. } if program == "pg_restore"),
        "{err}"
    );
    // A cut dump: pg_restore may have restored much of it before it fails.
    let sink = infra.begin_restore(&spec, &info).await?;
    let err = sink
        .consume(stream_of(whole[..whole.len() * 2 / 3].to_vec()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ProcessFailed { .. }), "{err}");
    // Nothing half restored is ever swapped in.
    let refused = infra.complete_restore(&spec).await.unwrap_err();
    assert!(matches!(refused, Error::Invalid(_)), "{refused}");
    assert_eq!(fingerprint(&live).await, data);

    infra.abandon_restore(&spec).await?;
    infra.abandon_restore(&spec).await?;
    assert_eq!(fingerprint(&live).await, data);
    assert_eq!(owners(&live).await, owned);
    assert_eq!(
        cluster_state(&maintenance(&infra, &spec).await).await,
        state
    );
    let client = connect(&credentials).await?;
    client.batch_execute("SET ROLE NONE").await?;
    client
        .query_one("SELECT 1 FROM app.binding_owned", &[])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_a_restore_ends_live_sessions_and_a_second_completion_changes_nothing()
-> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("busy-swap");
    infra.provision(&spec).await?;
    let credentials = infra.create_credentials(&spec, &binding("app")).await?;
    populate(&credentials).await?;
    let vault = Vault::new();
    let live = admin(&infra, &spec).await;
    let data = fingerprint(&live).await;
    let manifest = vault.back_up(&infra, &spec).await;
    change_after_backup(&live).await;
    drop(live);

    let sink = infra.begin_restore(&spec, &manifest.source_info).await?;
    backup::restore(
        vault.store.clone(),
        &manifest,
        KeySource::Master(&vault.master),
        sink,
        &Progress::new(),
        &CancellationToken::new(),
    )
    .await?;
    // One idle session, one in the middle of a transaction holding a lock.
    let idle = connect(&credentials).await?;
    idle.query_one("SELECT 1", &[]).await?;
    let mut busy = connect(&credentials).await?;
    let transaction = busy.transaction().await?;
    transaction
        .execute("LOCK TABLE app.notes IN ACCESS EXCLUSIVE MODE", &[])
        .await?;

    infra.complete_restore(&spec).await?;
    assert!(idle.query_one("SELECT 1", &[]).await.is_err());
    assert!(transaction.query_one("SELECT 1", &[]).await.is_err());
    drop(transaction);
    let live = admin(&infra, &spec).await;
    assert_eq!(fingerprint(&live).await, data);

    let state = cluster_state(&maintenance(&infra, &spec).await).await;
    infra.complete_restore(&spec).await?;
    assert_eq!(fingerprint(&live).await, data);
    assert_eq!(
        cluster_state(&maintenance(&infra, &spec).await).await,
        state
    );
    Ok(())
}

/// What a broker killed right after the swap leaves: the restored database live and the
/// old one beside it under its temporary name.
async fn swap_by_hand(infra: &LocalInfrastructure, spec: &InstanceSpec) {
    maintenance(infra, spec)
        .await
        .batch_execute(&format!(
            "BEGIN; ALTER DATABASE phoenix RENAME TO {PREVIOUS}; \
             ALTER DATABASE {SCRATCH} RENAME TO phoenix; COMMIT"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_interrupted_before_the_clean_up_is_reverted_by_abandon_or_finished_by_complete()
-> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("interrupted-swap");
    infra.provision(&spec).await?;
    let credentials = infra.create_credentials(&spec, &binding("app")).await?;
    populate(&credentials).await?;
    let vault = Vault::new();
    let manifest = vault.back_up(&infra, &spec).await;
    let state = cluster_state(&maintenance(&infra, &spec).await).await;
    let live = admin(&infra, &spec).await;
    let backed_up = fingerprint(&live).await;
    change_after_backup(&live).await;
    let changed = fingerprint(&live).await;
    drop(live);

    let restore_and_swap = async || {
        let sink = infra
            .begin_restore(&spec, &manifest.source_info)
            .await
            .unwrap();
        backup::restore(
            vault.store.clone(),
            &manifest,
            KeySource::Master(&vault.master),
            sink,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        swap_by_hand(&infra, &spec).await;
        assert_eq!(fingerprint(&admin(&infra, &spec).await).await, backed_up);
    };

    restore_and_swap().await;
    infra.abandon_restore(&spec).await?;
    assert_eq!(fingerprint(&admin(&infra, &spec).await).await, changed);
    assert_eq!(
        cluster_state(&maintenance(&infra, &spec).await).await,
        state
    );

    restore_and_swap().await;
    infra.complete_restore(&spec).await?;
    assert_eq!(fingerprint(&admin(&infra, &spec).await).await, backed_up);
    assert_eq!(
        cluster_state(&maintenance(&infra, &spec).await).await,
        state
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_refuses_a_dump_of_a_newer_version_or_a_forged_role_list() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("refusing");
    infra.provision(&spec).await?;
    let info = infra.backup_source(&spec).await?.info();
    let state = cluster_state(&maintenance(&infra, &spec).await).await;
    let newer = phoenix_adapters::backup::SourceInfo {
        engine_version: Some("16".into()),
        ..info.clone()
    };
    let mut forged = info.clone();
    forged.details.insert(
        "roles".into(),
        "b_00,\"postgres\"; DROP DATABASE phoenix".into(),
    );
    for refused in [newer, forged] {
        let err = infra.begin_restore(&spec, &refused).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }
    assert_eq!(
        cluster_state(&maintenance(&infra, &spec).await).await,
        state
    );
    Ok(())
}
