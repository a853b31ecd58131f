//! What every handler, worker and the supervisor share: the state store, the catalog, the
//! infrastructure, backup storage, the master key and the settings. Cloning is cheap
//! (`Arc`s).

use std::collections::BTreeMap;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use phoenix_adapters::engine::EngineKind;
use phoenix_adapters::ids::InstanceId;
use phoenix_adapters::infrastructure::{InstanceSpec, LocalInfrastructure};
use phoenix_adapters::keys::MasterKey;
use phoenix_adapters::storage::{Store as BackupStore, Sweep};
use phoenix_catalog::Catalog;

use crate::config::Settings;
use crate::error::Error;
use crate::store::Store;
use crate::store::instances::Instance;

/// The broker's shared services.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    /// The OSB catalog body, serialised once: the catalog never changes while serving.
    pub catalog_json: actix_web::web::Bytes,
    pub infrastructure: Arc<LocalInfrastructure>,
    pub master_key: Arc<MasterKey>,
    /// Where backups are stored (with retries and metrics).
    pub backup_store: Arc<dyn BackupStore>,
    /// Removes what interrupted puts left in backup storage.
    pub backup_sweeper: Arc<dyn Sweep>,
    pub settings: Arc<Settings>,
    /// The broker's URL as clients reach it, without a trailing slash.
    pub public_url: Arc<str>,
    pub metrics: PrometheusHandle,
    /// This broker process among the replicas (lease tokens start with it).
    pub worker_id: Arc<str>,
    /// Wakes idle workers when an operation is due now (after an insert here, or a
    /// PostgreSQL notification from another replica); polling is the fallback.
    pub wake: Arc<tokio::sync::Notify>,
    /// Operations this process runs now, by ID, with their lease tokens: handed back at
    /// shutdown so the next broker need not wait for the leases to expire.
    pub running: Running,
}

/// The operations a process is running, with their lease tokens.
#[derive(Debug, Clone, Default)]
pub struct Running(Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>);

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an operation as running until the guard is dropped.
    pub fn track(&self, id: &str, token: &str) -> RunningGuard {
        self.lock().insert(id.to_owned(), token.to_owned());
        RunningGuard {
            running: self.clone(),
            id: id.to_owned(),
        }
    }

    /// The operations running now and their tokens.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Removes its operation from [`Running`] when dropped (finished, failed or aborted).
#[derive(Debug)]
pub struct RunningGuard {
    running: Running,
    id: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.running.lock().remove(&self.id);
    }
}

/// The engine a catalog plan names.
///
/// # Errors
/// [`Error::Config`] for an engine the adapters do not know.
pub fn engine_kind(name: &str) -> Result<EngineKind, Error> {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|_| Error::Config(format!("unknown engine {name:?}")))
}

/// What the infrastructure needs to know of a stored instance.
///
/// # Errors
/// [`Error::Inconsistent`] when the row lacks a port or holds unreadable settings.
pub fn instance_spec(instance: &Instance) -> Result<InstanceSpec, Error> {
    let id = InstanceId::parse(&instance.id)?;
    let port = instance
        .port
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| Error::Inconsistent(format!("instance {} has no port", instance.id)))?;
    let settings: BTreeMap<String, String> = serde_json::from_str(&instance.settings)
        .map_err(|e| Error::Inconsistent(format!("settings of instance {}: {e}", instance.id)))?;
    Ok(InstanceSpec {
        id,
        engine: engine_kind(&instance.engine)?,
        version: instance.engine_version.clone(),
        port,
        settings,
    })
}
