//! The local infrastructure with the PostgreSQL engine, against real PostgreSQL 15
//! servers on free ports. As root (CI) the servers run as the `postgres` system user.
//!
//! Every fixture kills whatever still runs in its directory when it is dropped, so a
//! failing test leaves no server behind.

#![allow(clippy::unwrap_used)] // Tests: a failed call fails the test.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use phoenix_adapters::Error;
use phoenix_adapters::engine::{Credentials, EngineKind};
use phoenix_adapters::ids::{BindingId, InstanceId};
use phoenix_adapters::infrastructure::host;
use phoenix_adapters::infrastructure::{InstanceSpec, LocalConfig, LocalInfrastructure};
use tokio_postgres::{Client, NoTls};

/// A directory of instances, cleaned of processes and files when dropped.
pub(crate) struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("phx-pg-")
            .tempdir()
            .unwrap();
        // The server user must be able to pass through the test's directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        Self { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("instances")
    }

    /// A fresh infrastructure over the same root, as a restarted broker would build it.
    pub(crate) fn infrastructure(&self) -> LocalInfrastructure {
        let run_as = nix::unistd::Uid::effective()
            .is_root()
            .then(|| "postgres".to_owned());
        LocalInfrastructure::new(LocalConfig {
            root: self.root(),
            bind_host: "127.0.0.1".to_owned(),
            run_as,
            ebs: None,
        })
        .unwrap()
        .with_fsync(false)
    }

    fn volume(&self, spec: &InstanceSpec) -> PathBuf {
        self.root().join(spec.id.as_str())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for pid in host::processes_in(self.dir.path()) {
            let _ = host::signal(pid, Signal::SIGKILL);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub(crate) fn spec(id: &str) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId::parse(id).unwrap(),
        engine: EngineKind::Postgres,
        version: "15".to_owned(),
        port: free_port(),
        settings: settings(&[("max_connections", "20"), ("shared_buffers", "16MB")]),
    }
}

pub(crate) fn binding(id: &str) -> BindingId {
    BindingId::parse(id).unwrap()
}

pub(crate) async fn connect(credentials: &Credentials) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(&credentials.uri(), NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

pub(crate) async fn admin(infra: &LocalInfrastructure, spec: &InstanceSpec) -> Client {
    infra
        .admin_connection(spec)
        .unwrap()
        .connect("phoenix")
        .await
        .unwrap()
}

async fn show(client: &Client, setting: &str) -> String {
    let rows = client
        .simple_query(&format!("SHOW {setting}"))
        .await
        .unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

async fn started_at(client: &Client) -> String {
    client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0)
}

fn postmaster_pid(volume: &Path) -> u32 {
    let text = std::fs::read_to_string(volume.join("data/postmaster.pid")).unwrap();
    text.lines().next().unwrap().parse().unwrap()
}

/// Every byte under `dir` contains `needle` nowhere.
fn assert_nowhere_in(dir: &Path, needle: &[u8]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            assert_nowhere_in(&path, needle);
        } else if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} contains the password",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn a_binding_connects_over_tcp_and_round_trips_data() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("round-trip");
    let endpoint = infra.provision(&spec).await?;
    assert_eq!(
        (
            endpoint.host.as_str(),
            endpoint.port,
            endpoint.database.as_str()
        ),
        ("127.0.0.1", spec.port, "phoenix")
    );
    assert!(infra.is_healthy(&spec).await?);

    let credentials = infra.create_credentials(&spec, &binding("bind-a")).await?;
    assert_eq!(credentials.port, spec.port);
    assert!(credentials.password.len() >= 32);
    let client = connect(&credentials).await?;
    client
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .await?;
    let body = "quotes ' \" backslash \\ and ünïcödé";
    client
        .execute("INSERT INTO notes VALUES ($1, $2)", &[&1i32, &body])
        .await?;
    let row = client
        .query_one(
            "SELECT body, session_user::text, current_user::text FROM notes WHERE id = 1",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), body);
    assert_eq!(row.get::<_, String>(1), credentials.username);
    assert_eq!(row.get::<_, String>(2), "phoenix_owner");

    // The cleartext password exists only in the credentials, never in the volume.
    assert_nowhere_in(&fixture.volume(&spec), credentials.password.as_bytes());

    // The superuser cannot log in over TCP even with its right password (pg_hba rejects
    // it before any password is asked), and a binding cannot reach another database.
    admin(&infra, &spec)
        .await
        .batch_execute("ALTER ROLE postgres PASSWORD 'superuser-secret-1'")
        .await?;
    let superuser = format!(
        "postgresql://postgres:superuser-secret-1@127.0.0.1:{}/postgres",
        spec.port
    );
    let err = tokio_postgres::connect(&superuser, NoTls)
        .await
        .err()
        .context("the superuser logged in over TCP")?;
    let db = err.as_db_error().context("not refused by the server")?;
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "{db}"
    );
    assert!(db.message().contains("pg_hba.conf rejects"), "{db}");
    let other_db = Credentials {
        database: "postgres".to_owned(),
        ..credentials.clone()
    };
    assert!(connect(&other_db).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_table_created_through_one_binding_survives_its_revocation() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("survives");
    infra.provision(&spec).await?;

    let a = infra.create_credentials(&spec, &binding("bind-a")).await?;
    let client = connect(&a).await?;
    client
        .batch_execute(
            "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('through a'); \
             SET ROLE NONE; CREATE TABLE owned_by_a (v text); INSERT INTO owned_by_a VALUES ('mine')",
        )
        .await?;
    drop(client);

    let b = infra.create_credentials(&spec, &binding("bind-b")).await?;
    infra.revoke_credentials(&spec, &binding("bind-a")).await?;
    infra.revoke_credentials(&spec, &binding("bind-a")).await?;

    let client = connect(&b).await?;
    let row = client
        .query_one(
            "SELECT (SELECT v FROM kept), (SELECT v FROM owned_by_a), \
             (SELECT tableowner::text FROM pg_tables WHERE tablename = 'owned_by_a')",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "through a");
    assert_eq!(row.get::<_, String>(1), "mine");
    assert_eq!(row.get::<_, String>(2), "phoenix_owner");
    client
        .batch_execute("INSERT INTO kept VALUES ('through b')")
        .await?;
    assert!(
        connect(&a).await.is_err(),
        "a revoked binding still logs in"
    );
    Ok(())
}

#[tokio::test]
async fn revoking_a_binding_ends_its_open_sessions() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("ends-sessions");
    infra.provision(&spec).await?;
    let a = infra.create_credentials(&spec, &binding("bind-a")).await?;
    let open = connect(&a).await?;
    let other = infra
        .create_credentials(&spec, &binding("bind-other"))
        .await?;
    let bystander = connect(&other).await?;
    open.simple_query("SELECT 1").await?;

    infra.revoke_credentials(&spec, &binding("bind-a")).await?;

    assert!(
        open.simple_query("SELECT 1").await.is_err(),
        "the session lives on"
    );
    bystander.simple_query("SELECT 1").await?;
    Ok(())
}

#[tokio::test]
async fn creating_credentials_again_rotates_the_password() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("rotation");
    infra.provision(&spec).await?;
    let first = infra.create_credentials(&spec, &binding("bind-a")).await?;
    let second = infra.create_credentials(&spec, &binding("bind-a")).await?;
    assert_eq!(first.username, second.username);
    assert_ne!(first.password, second.password);
    assert!(
        connect(&first).await.is_err(),
        "the old password still works"
    );
    connect(&second).await?.simple_query("SELECT 1").await?;
    Ok(())
}

#[tokio::test]
async fn update_restarts_for_max_connections_and_only_reloads_for_work_mem() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let mut spec = spec("update");
    infra.provision(&spec).await?;
    let client = admin(&infra, &spec).await;
    assert_eq!(show(&client, "max_connections").await, "20");
    let before = started_at(&client).await;

    spec.settings.insert("max_connections".into(), "30".into());
    infra.update(&spec).await?;
    let client = admin(&infra, &spec).await;
    assert_eq!(show(&client, "max_connections").await, "30");
    let restarted = started_at(&client).await;
    assert_ne!(before, restarted, "max_connections needs a restart");

    spec.settings.insert("work_mem".into(), "8MB".into());
    infra.update(&spec).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // A reload reaches new sessions once the postmaster has handled its signal.
    while show(&admin(&infra, &spec).await, "work_mem").await != "8MB" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "work_mem never changed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(started_at(&admin(&infra, &spec).await).await, restarted);

    // A value PostgreSQL refuses leaves the running configuration as it was.
    let mut refused = spec.clone();
    refused
        .settings
        .insert("shared_buffers".into(), "1kB".into());
    let err = infra.update(&refused).await.unwrap_err();
    assert!(matches!(err, Error::ProcessFailed { .. }), "{err}");
    infra.ensure_running(&spec).await?;
    let client = admin(&infra, &spec).await;
    assert_eq!(show(&client, "shared_buffers").await, "16MB");
    assert_eq!(started_at(&client).await, restarted);
    Ok(())
}

#[tokio::test]
async fn an_interrupted_update_is_completed_by_the_next_one() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let mut spec = spec("interrupted-update");
    infra.provision(&spec).await?;
    // Interrupted before writing, between writing and restarting, while stopping and
    // while starting: the next update must leave the server running the new settings.
    for (i, delay_ms) in [1u64, 20, 60, 120, 200, 300, 500].into_iter().enumerate() {
        let wanted = (30 + i).to_string();
        spec.settings
            .insert("max_connections".into(), wanted.clone());
        let _ = tokio::time::timeout(Duration::from_millis(delay_ms), infra.update(&spec)).await;
        infra
            .update(&spec)
            .await
            .with_context(|| format!("update after an interruption at {delay_ms} ms"))?;
        assert_eq!(
            show(&admin(&infra, &spec).await, "max_connections").await,
            wanted
        );
    }
    Ok(())
}

#[tokio::test]
async fn deprovision_stops_the_server_and_removes_its_directory() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    // A neighbour whose ID starts like it must not be touched.
    let neighbour = spec("deprovision-2");
    let spec = spec("deprovision");
    infra.provision(&spec).await?;
    infra.provision(&neighbour).await?;
    let volume = fixture.volume(&spec);
    let pid = postmaster_pid(&volume);
    assert!(!host::processes_in(&volume).is_empty());

    assert_eq!(
        infra.volumes().await?,
        vec![spec.id.clone(), neighbour.id.clone()]
    );
    infra.deprovision(&spec.id).await?;

    assert_eq!(infra.volumes().await?, vec![neighbour.id.clone()]);
    assert!(infra.is_healthy(&neighbour).await?);
    assert!(!host::is_alive(pid), "the server still runs");
    assert!(host::processes_in(&volume).is_empty());
    assert!(!volume.exists(), "the volume is still there");
    assert!(std::net::TcpStream::connect(("127.0.0.1", spec.port)).is_err());
    assert!(!infra.is_healthy(&spec).await?);
    infra.deprovision(&spec.id).await?;
    infra
        .deprovision(&InstanceId::parse("never-provisioned")?)
        .await?;
    infra
        .revoke_credentials(&spec, &binding("bind-of-a-gone-instance"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn provision_redoes_a_volume_left_half_way() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("half-way");

    // A directory without a record (a broker killed right after creating it).
    std::fs::create_dir_all(fixture.volume(&spec).join("data"))?;
    std::fs::write(fixture.volume(&spec).join("data/PG_VERSION"), "15\n")?;
    infra.provision(&spec).await?;

    // A running server whose volume was never marked complete (a broker killed after the
    // start, before the database existed): it is stopped and the volume made anew.
    let credentials = infra.create_credentials(&spec, &binding("b")).await?;
    connect(&credentials)
        .await?
        .batch_execute("CREATE TABLE from_before (v int)")
        .await?;
    let old_pid = postmaster_pid(&fixture.volume(&spec));
    let record = fixture.volume(&spec).join("phoenix-volume.json");
    let text = std::fs::read_to_string(&record)?.replace("\"ready\"", "\"initialising\"");
    std::fs::write(&record, text)?;
    infra.provision(&spec).await?;
    assert!(!host::is_alive(old_pid), "the old server still runs");
    let tables: i64 = admin(&infra, &spec)
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'from_before'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(tables, 0, "the half-made volume was kept");
    infra.deprovision(&spec.id).await?;

    // A provision interrupted at different points: during initdb, while the server
    // starts, before the database exists. The next provision must always succeed.
    for delay_ms in [50, 400, 1000, 1250, 1500, 2000] {
        let interrupted =
            tokio::time::timeout(Duration::from_millis(delay_ms), infra.provision(&spec)).await;
        if let Ok(result) = interrupted {
            result.context("an uninterrupted provision")?;
        }
        infra
            .provision(&spec)
            .await
            .with_context(|| format!("provision after an interruption at {delay_ms} ms"))?;
        assert!(infra.is_healthy(&spec).await?);
        let credentials = infra.create_credentials(&spec, &binding("b")).await?;
        connect(&credentials)
            .await?
            .simple_query("SELECT 1")
            .await?;
        infra.deprovision(&spec.id).await?;
        let leftovers = host::processes_in(&fixture.root());
        if !leftovers.is_empty() {
            bail!("processes left after deprovision: {leftovers:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn ensure_running_adopts_a_running_server_and_restarts_a_stopped_one() -> Result<()> {
    let fixture = Fixture::new();
    let spec = spec("supervised");
    let volume = fixture.volume(&spec);
    {
        let infra = fixture.infrastructure();
        infra.provision(&spec).await?;
        let credentials = infra.create_credentials(&spec, &binding("bind-a")).await?;
        connect(&credentials)
            .await?
            .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
            .await?;
    }

    // A restarted broker finds the server running and keeps it.
    let infra = fixture.infrastructure();
    let started = started_at(&admin(&infra, &spec).await).await;
    infra.ensure_running(&spec).await?;
    infra.provision(&spec).await?;
    assert_eq!(started_at(&admin(&infra, &spec).await).await, started);

    // Stopped cleanly behind the broker's back.
    let pid = postmaster_pid(&volume);
    host::signal(pid, Signal::SIGINT)?;
    host::wait_gone(&[pid], "postgres", Duration::from_secs(60)).await?;
    assert!(!infra.is_healthy(&spec).await?);
    infra.ensure_running(&spec).await?;
    assert!(infra.is_healthy(&spec).await?);

    // Killed: a stale pid file and orphaned backends stay behind.
    let pid = postmaster_pid(&volume);
    host::signal(pid, Signal::SIGKILL)?;
    host::wait_gone(&[pid], "postgres", Duration::from_secs(60)).await?;
    infra.ensure_running(&spec).await?;

    // A pid file naming a live process that is not PostgreSQL (its pid was reused).
    let pid = postmaster_pid(&volume);
    host::signal(pid, Signal::SIGKILL)?;
    host::wait_gone(&[pid], "postgres", Duration::from_secs(60)).await?;
    let pid_file = volume.join("data/postmaster.pid");
    let text = std::fs::read_to_string(&pid_file)?;
    let (_, rest) = text.split_once('\n').unwrap();
    std::fs::write(&pid_file, format!("1\n{rest}"))?;
    infra.ensure_running(&spec).await?;

    let value: i32 = admin(&infra, &spec)
        .await
        .query_one("SELECT v FROM kept", &[])
        .await?
        .get(0);
    assert_eq!(value, 42);
    Ok(())
}

#[tokio::test]
async fn a_health_check_leaves_a_stale_or_empty_pid_file_to_the_next_start() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("pure-state");
    infra.provision(&spec).await?;
    let volume = fixture.volume(&spec);
    let pid_file = volume.join("data/postmaster.pid");

    // Killed: the health check only looks; the start under the lock clears up.
    let pid = postmaster_pid(&volume);
    host::signal(pid, Signal::SIGKILL)?;
    host::wait_gone(&[pid], "postgres", Duration::from_secs(60)).await?;
    let stale = std::fs::read(&pid_file)?;
    assert!(!infra.is_healthy(&spec).await?);
    assert_eq!(
        std::fs::read(&pid_file)?,
        stale,
        "a health check changed the pid file"
    );
    infra.ensure_running(&spec).await?;
    assert!(infra.is_healthy(&spec).await?);

    // An empty pid file is a server writing it, not a stale one: nothing is removed or
    // killed by a health check; a start finds it stale when it stays empty.
    let pid = postmaster_pid(&volume);
    host::signal(pid, Signal::SIGINT)?;
    host::wait_gone(&[pid], "postgres", Duration::from_secs(60)).await?;
    std::fs::write(&pid_file, "")?;
    assert!(!infra.is_healthy(&spec).await?);
    assert!(pid_file.exists(), "a health check removed the pid file");
    infra.ensure_running(&spec).await?;
    assert!(infra.is_healthy(&spec).await?);
    Ok(())
}

#[tokio::test]
async fn server_logs_go_to_files_inside_the_volume_that_are_reused_every_day() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("logs");
    infra.provision(&spec).await?;
    let client = admin(&infra, &spec).await;
    let log_dir = fixture.volume(&spec).join("log");
    assert_eq!(show(&client, "logging_collector").await, "on");
    assert_eq!(
        show(&client, "log_directory").await,
        log_dir.to_str().unwrap()
    );
    assert_eq!(show(&client, "log_filename").await, "postgresql-%H.log");
    assert_eq!(show(&client, "log_truncate_on_rotation").await, "on");
    assert_eq!(show(&client, "log_rotation_size").await, "10MB");
    let current: String = client
        .query_one("SELECT pg_current_logfile()", &[])
        .await?
        .get(0);
    let current = Path::new(&current);
    assert_eq!(current.parent(), Some(log_dir.as_path()));
    let name = current.file_name().unwrap().to_str().unwrap();
    assert!(
        name.len() == "postgresql-00.log".len() && name.starts_with("postgresql-"),
        "{name}"
    );
    Ok(())
}

#[tokio::test]
async fn ensure_running_refuses_an_instance_that_was_never_provisioned() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    let spec = spec("unknown");
    let err = infra.ensure_running(&spec).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(!fixture.volume(&spec).exists());
    Ok(())
}

#[tokio::test]
async fn provision_refuses_settings_that_could_inject_configuration() -> Result<()> {
    let fixture = Fixture::new();
    let infra = fixture.infrastructure();
    for (name, value) in [
        ("work_mem", "1MB'\nlisten_addresses = '*"),
        ("work_mem", "1MB' ssl = 'off"),
        ("archive_command", "/bin/sh -c 'curl evil'"),
        ("listen_addresses", "*"),
    ] {
        let mut spec = spec("injection");
        spec.settings.insert(name.to_owned(), value.to_owned());
        assert!(
            EngineKind::Postgres
                .validate_settings(&spec.settings)
                .is_err()
        );
        let err = infra.provision(&spec).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{name}={value:?}: {err}");
        assert!(!fixture.volume(&spec).exists());
    }
    Ok(())
}

#[test]
fn the_infrastructure_refuses_a_configuration_its_servers_could_not_run_with() {
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let invalid = |config: LocalConfig| match LocalInfrastructure::new(config) {
        Err(Error::Invalid(message)) => message,
        other => panic!("accepted or failed otherwise: {other:?}"),
    };
    if nix::unistd::Uid::effective().is_root() {
        let message = invalid(LocalConfig::new(private.path().join("instances")));
        assert!(message.contains("run_as"), "{message}");
        let message = invalid(LocalConfig {
            run_as: Some("postgres".to_owned()),
            ..LocalConfig::new(private.path().join("instances"))
        });
        assert!(message.contains("cannot enter"), "{message}");
    } else {
        let message = invalid(LocalConfig {
            run_as: Some("root".to_owned()),
            ..LocalConfig::new(private.path().join("instances"))
        });
        assert!(message.contains("only root"), "{message}");
    }
    let message = invalid(LocalConfig {
        bind_host: "127.0.0.1' port=5432".to_owned(),
        ..LocalConfig::new(private.path().join("instances"))
    });
    assert!(message.contains("bind_host"), "{message}");
}
