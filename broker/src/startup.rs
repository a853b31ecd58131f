//! The application as a value: [`Application::build`] loads the catalog and the master
//! key, migrates the state store, binds the listener (port 0 picks a free one) and starts
//! the workers, the supervisor and the backup scheduler; [`Application::run_until_stopped`] serves.
//!
//! Migrations run before the HTTP server exists, on a blocking thread, never inside an
//! actix worker.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use phoenix_adapters::infrastructure::{LocalConfig, LocalInfrastructure};
use phoenix_adapters::keys::MasterKey;
use phoenix_catalog::Catalog;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app_state::{AppState, Running, engine_kind};
use crate::config::{EbsSettings, Settings};
use crate::error::{ApiError, Error};
use crate::store::{DatabaseUrl, Store};
use crate::{backups, operability, operations, osb};

/// A built broker: listening, not yet serving.
pub struct Application {
    address: SocketAddr,
    server: Server,
    state: AppState,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

async fn no_route() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::no_route())
}

impl Application {
    /// Builds the broker from its settings.
    ///
    /// # Errors
    /// When the data directory, master key, catalog, state store or listener cannot be
    /// set up.
    pub async fn build(settings: Settings) -> Result<Self, Error> {
        std::fs::create_dir_all(&settings.data_dir)
            .map_err(|e| Error::io(format!("creating {}", settings.data_dir.display()), e))?;
        let master_key = load_master_key(&settings)?;
        let catalog = match &settings.catalog {
            Some(path) => Catalog::from_path(path)?,
            None => Catalog::embedded()?,
        };
        for (service, plan) in catalog.plans() {
            engine_kind(&plan.engine)?
                .validate_settings(&plan.resources)
                .map_err(|e| {
                    Error::Config(format!("catalog plan {}/{}: {e}", service.name, plan.name))
                })?;
        }
        let database = settings.database.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&database))
            .await
            .map_err(|e| Error::Blocking(e.to_string()))??;
        let run_as = nix::unistd::Uid::effective()
            .is_root()
            .then(|| "postgres".to_owned());
        let infrastructure = LocalInfrastructure::new(LocalConfig {
            root: settings.data_dir.join("instances"),
            bind_host: settings.instance_host.clone(),
            run_as,
            ebs: settings.ebs.as_ref().map(EbsSettings::host_config),
        })?;
        let (backup_store, backup_sweeper) = settings.storage.build_with_sweeper().await?;
        let listener = TcpListener::bind(settings.listen)
            .map_err(|e| Error::io(format!("binding {}", settings.listen), e))?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::io("reading the listener's address", e))?;
        if settings.credentials.is_none() {
            tracing::warn!(%address, "No broker credentials are configured: the OSB API is open to anyone who can reach this loopback address.");
        }
        let worker_id = format!(
            "phoenix-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let catalog_json = serde_json::to_vec(&catalog)
            .map_err(|e| Error::Config(format!("serialising the catalog: {e}")))?
            .into();
        let state = AppState {
            store,
            catalog: Arc::new(catalog),
            catalog_json,
            infrastructure: Arc::new(infrastructure),
            master_key: Arc::new(master_key),
            backup_store,
            backup_sweeper,
            public_url: settings
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{address}"))
                .trim_end_matches('/')
                .into(),
            settings: Arc::new(settings),
            metrics: operability::prometheus()?,
            worker_id: worker_id.into(),
            wake: Arc::new(tokio::sync::Notify::new()),
            running: Running::default(),
        };
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .wrap(from_fn(osb::middleware::request_context))
                .configure(operability::configure)
                .configure(osb::configure)
                .default_service(web::to(no_route))
        })
        .listen(listener)
        .map_err(|e| Error::io("starting the HTTP server", e))?
        .shutdown_timeout(10)
        .run();
        let cancel = CancellationToken::new();
        let mut tasks = operations::spawn_workers(&state, &cancel);
        if let DatabaseUrl::Postgres(url) = &state.settings.database {
            tasks.push(operations::spawn_listener(&state, url.clone(), &cancel));
        }
        tasks.push(tokio::spawn(operations::supervisor::supervise(
            state.clone(),
            cancel.clone(),
        )));
        tasks.push(tokio::spawn(backups::scheduler::run(
            state.clone(),
            cancel.clone(),
        )));
        tracing::info!(
            %address,
            postgres_store = state.store.is_postgres(),
            worker_id = %state.worker_id,
            "Phoenix is listening."
        );
        Ok(Self {
            address,
            server,
            state,
            cancel,
            tasks,
        })
    }

    /// The port the broker listens on.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The shared state (store, catalog, ...), for tests and subcommands.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the server stops (SIGINT/SIGTERM), then stops the workers and hands
    /// back the leases of the operations they were running, so that the next broker
    /// takes them over at once.
    ///
    /// # Errors
    /// When the HTTP server fails.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        self.cancel.cancel();
        let running = self.state.running.snapshot();
        for task in self.tasks {
            task.abort();
        }
        operations::release_leases(&self.state, running).await;
        tracing::info!("Phoenix stopped.");
        served
    }
}

fn load_master_key(settings: &Settings) -> Result<MasterKey, Error> {
    if let Some(text) = &settings.master_key {
        return Ok(MasterKey::from_base64(&text.0)?);
    }
    let path = settings.data_dir.join("master.key");
    let (key, created) = MasterKey::load_or_create(&path)?;
    if created {
        tracing::warn!(
            path = %path.display(),
            "Created a new master key. Back it up now, apart from the backups: whoever loses it loses every backup and every binding secret it protects."
        );
    }
    Ok(key)
}
