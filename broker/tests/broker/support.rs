//! Test support: a fresh state store per test on either backend, and an in-process
//! broker listening on a free port.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicU16, Ordering};

use diesel::{Connection as _, RunQueryDsl as _};
use phoenix_broker::app_state::AppState;
use phoenix_broker::config::Settings;
use phoenix_broker::startup::Application;
use phoenix_broker::store::{DatabaseUrl, Store};
use tempfile::TempDir;

/// Which state store a test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty database that disappears with the value.
pub struct TestDb {
    pub url: DatabaseUrl,
    pub dir: TempDir,
    postgres: Option<(String, String)>,
}

fn postgres_admin_url() -> String {
    std::env::var("PHOENIX_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "PHOENIX_TEST_POSTGRES_URL is not set: PostgreSQL state-store tests need a \
             PostgreSQL superuser URL (run scripts/testbed/up and source .testbed/env)"
        )
    })
}

/// A temporary directory that the `postgres` user (instance servers) can traverse.
pub fn shared_tempdir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("phx")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        let dir = shared_tempdir();
        match backend {
            Backend::Sqlite => Self {
                url: DatabaseUrl::Sqlite(dir.path().join("phoenix.db")),
                dir,
                postgres: None,
            },
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("phoenix_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = diesel::PgConnection::establish(&admin).unwrap();
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .unwrap();
                let (base, _) = admin
                    .split_once('?')
                    .map_or((admin.as_str(), ""), |(b, q)| (b, q));
                let root = base.rsplit_once('/').map_or(base, |(r, _)| r);
                let root = if root.ends_with('/') || root.ends_with(':') {
                    base
                } else {
                    root
                };
                Self {
                    url: DatabaseUrl::Postgres(format!("{root}/{name}")),
                    dir,
                    postgres: Some((admin, name)),
                }
            }
        }
    }

    pub fn open(&self) -> Store {
        Store::open(&self.url).unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.postgres
            && let Ok(mut conn) = diesel::PgConnection::establish(admin)
        {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn);
        }
    }
}

/// A distinct port range per test. Nextest runs each test in its own process, so the
/// process ID spreads the ranges (30000-39999, above the acceptance suite's 20000-29999).
fn next_port_range() -> String {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 10;
    let block = u16::try_from(std::process::id() % 100).unwrap() * 10 + n;
    let start = 30000 + block * 10;
    format!("{start}-{}", start + 9)
}

/// A broker running in this process.
pub struct TestBroker {
    pub base: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    /// The broker's own state store.
    pub store: Store,
    /// The broker's shared state, for tests that drive operations themselves.
    pub state: AppState,
}

pub const USER: &str = "platform";
pub const PASSWORD: &str = "s3cret-platform-password";

impl TestBroker {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, &[]).await
    }

    /// A broker with some settings overridden (`("PHOENIX_WORKER_POLL", "1h")`, ...).
    pub async fn spawn_with(backend: Backend, overrides: &[(&str, &str)]) -> Self {
        let db = TestDb::new(backend);
        let url = match &db.url {
            DatabaseUrl::Sqlite(path) => path.display().to_string(),
            DatabaseUrl::Postgres(url) => url.clone(),
        };
        let vars = [
            ("PHOENIX_LISTEN", "127.0.0.1:0".to_owned()),
            (
                "PHOENIX_DATA_DIR",
                db.dir.path().join("data").display().to_string(),
            ),
            ("PHOENIX_DATABASE_URL", url),
            ("PHOENIX_BROKER_USERNAME", USER.to_owned()),
            ("PHOENIX_BROKER_PASSWORD", PASSWORD.to_owned()),
            ("PHOENIX_INSTANCE_PORTS", next_port_range()),
            ("PHOENIX_WORKER_POLL", "100ms".to_owned()),
            ("PHOENIX_OPERATION_LEASE", "10s".to_owned()),
        ];
        let settings = Settings::from_sources(None, |name| {
            overrides
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
                .or_else(|| {
                    vars.iter()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| v.clone())
                })
        })
        .unwrap();
        let app = Application::build(settings).await.unwrap();
        let base = format!("http://127.0.0.1:{}", app.port());
        let store = app.state().store.clone();
        let state = app.state().clone();
        tokio::spawn(app.run_until_stopped());
        Self {
            base,
            client: reqwest::Client::new(),
            db,
            store,
            state,
        }
    }

    /// A request with credentials and the API version header.
    pub fn osb(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .basic_auth(USER, Some(PASSWORD))
            .header("X-Broker-API-Version", "2.17")
    }
}
