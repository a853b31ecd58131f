//! What each kind of operation does to the infrastructure and backup storage, and how its
//! outcome changes the stored instance, binding, backup or restore.
//!
//! `execute` does the work (every step idempotent, so a repeated attempt is safe; the
//! backup and restore steps are in [`crate::backups::run`]) and returns an [`Effect`];
//! the caller records the effect in the same transaction that ends the operation, fenced
//! by its lease. A binding's password is
//! sealed here, before it goes anywhere near the store, and never logged.

use phoenix_adapters::ids::{BindingId, InstanceId};

use crate::app_state::{AppState, instance_spec};
use crate::backups::run::{self, ProvisionPayload};
use crate::backups::tokens;
use crate::error::{Error, cause_chain};
use crate::osb::bindings::sealing_context;
use crate::osb::instances::UpdatePayload;
use crate::store::DbConnection;
use crate::store::backups::{self, Completed};
use crate::store::bindings::{self, state as binding_state};
use crate::store::instances::{self, Instance, state as instance_state};
use crate::store::operations::{Operation, kind, state as op_state};
use crate::store::{restores, tokens as token_store};

/// The outcome of a successful operation, to be recorded.
#[derive(Debug)]
pub enum Effect {
    Provisioned {
        host: String,
        port: u16,
        database: String,
    },
    Updated(UpdatePayload),
    Deprovisioned,
    Bound {
        username: String,
        password_sealed: Vec<u8>,
        host: String,
        port: u16,
        database: String,
        /// The SHA-256 of the binding's backup API token, when it asked for one.
        backup_token_sha256: Option<String>,
    },
    Unbound,
    BackedUp(Completed),
    Restored,
}

impl Effect {
    /// The `last_operation` description of a success.
    pub fn description(&self) -> &'static str {
        match self {
            Self::Provisioned { .. } => "The service instance is ready.",
            Self::Updated(_) => "The service instance is updated.",
            Self::Deprovisioned => "The service instance is deleted.",
            Self::Bound { .. } => "The service binding is ready.",
            Self::Unbound => "The service binding is deleted.",
            Self::BackedUp(_) => "The backup is complete.",
            Self::Restored => "The backup is restored.",
        }
    }
}

async fn load_instance(state: &AppState, id: &str) -> Result<Instance, Error> {
    let id = id.to_owned();
    state
        .store
        .run(move |conn| {
            instances::find(conn, &id)?
                .ok_or_else(|| Error::Inconsistent(format!("instance {id} vanished")))
        })
        .await
}

/// Runs one attempt of `operation`.
///
/// # Errors
/// When the infrastructure fails or the stored state is inconsistent.
pub async fn execute(state: &AppState, operation: &Operation) -> Result<Effect, Error> {
    let instance = load_instance(state, &operation.instance_id).await?;
    let infrastructure = &state.infrastructure;
    match operation.kind.as_str() {
        kind::PROVISION => {
            let payload: ProvisionPayload = serde_json::from_str(&operation.payload)
                .map_err(|e| Error::Inconsistent(format!("provision payload: {e}")))?;
            let endpoint = run::provision(state, &instance, payload.seed.as_ref()).await?;
            Ok(Effect::Provisioned {
                host: endpoint.host,
                port: endpoint.port,
                database: endpoint.database,
            })
        }
        kind::UPDATE => {
            let target: UpdatePayload = serde_json::from_str(&operation.payload)
                .map_err(|e| Error::Inconsistent(format!("update payload: {e}")))?;
            let mut spec = instance_spec(&instance)?;
            spec.settings = target.settings.clone();
            infrastructure.update(&spec).await?;
            Ok(Effect::Updated(target))
        }
        kind::DEPROVISION => {
            infrastructure
                .deprovision(&InstanceId::parse(&instance.id)?)
                .await?;
            Ok(Effect::Deprovisioned)
        }
        kind::BIND => {
            let binding_id = binding_of(operation)?;
            let credentials = infrastructure
                .create_credentials(&instance_spec(&instance)?, &binding_id)
                .await?;
            let password_sealed = state.master_key.key().seal(
                &sealing_context(binding_id.as_str()),
                credentials.password.as_bytes(),
            )?;
            let id = binding_id.to_string();
            let binding = state
                .store
                .run(move |conn| {
                    bindings::find(conn, &id)?
                        .ok_or_else(|| Error::Inconsistent(format!("binding {id} vanished")))
                })
                .await?;
            let parameters: serde_json::Value = serde_json::from_str(&binding.parameters)
                .map_err(|e| Error::Inconsistent(format!("binding parameters: {e}")))?;
            let backup_token_sha256 = tokens::wants_backup_access(&parameters).then(|| {
                tokens::token_digest(&tokens::token(
                    &state.master_key,
                    binding_id.as_str(),
                    &password_sealed,
                ))
            });
            Ok(Effect::Bound {
                username: credentials.username,
                password_sealed,
                host: credentials.host,
                port: credentials.port,
                database: credentials.database,
                backup_token_sha256,
            })
        }
        kind::UNBIND => {
            // A failed instance has no server to revoke from; its role goes with it.
            if instance.state == instance_state::PROVISIONED {
                infrastructure
                    .revoke_credentials(&instance_spec(&instance)?, &binding_of(operation)?)
                    .await?;
            }
            Ok(Effect::Unbound)
        }
        kind::BACKUP => Ok(Effect::BackedUp(
            run::take_backup(state, operation, &instance).await?,
        )),
        kind::RESTORE => {
            run::restore_in_place(state, operation, &instance).await?;
            Ok(Effect::Restored)
        }
        other => Err(Error::Inconsistent(format!(
            "unknown operation kind {other:?}"
        ))),
    }
}

fn binding_of(operation: &Operation) -> Result<BindingId, Error> {
    let id = operation
        .binding_id
        .as_deref()
        .ok_or_else(|| Error::Inconsistent(format!("operation {} has no binding", operation.id)))?;
    Ok(BindingId::parse(id)?)
}

/// Records a success (inside the transaction that ends the operation).
///
/// # Errors
/// When the store fails.
pub fn apply_success(
    conn: &mut DbConnection,
    operation: &Operation,
    effect: Effect,
) -> Result<(), Error> {
    let instance_id = operation.instance_id.as_str();
    match effect {
        Effect::Provisioned {
            host,
            port,
            database,
        } => instances::mark_provisioned(conn, instance_id, &host, i32::from(port), &database)?,
        Effect::Updated(target) => instances::apply_update(
            conn,
            instance_id,
            &target.plan_id,
            &target.parameters.to_string(),
            &serde_json::to_string(&target.settings)
                .map_err(|e| Error::Inconsistent(format!("settings: {e}")))?,
            target.maintenance_version.as_deref(),
        )?,
        Effect::Deprovisioned => {
            token_store::delete_for_instance(conn, instance_id)?;
            bindings::delete_all_of_instance(conn, instance_id)?;
            instances::mark_deleted(conn, instance_id)?;
        }
        Effect::Bound {
            username,
            password_sealed,
            host,
            port,
            database,
            backup_token_sha256,
        } => {
            let binding = binding_of(operation)?;
            if let Some(digest) = backup_token_sha256 {
                token_store::insert(conn, &digest, instance_id, binding.as_str())?;
            }
            bindings::mark_created(
                conn,
                binding.as_str(),
                &username,
                &password_sealed,
                &host,
                i32::from(port),
                &database,
            )?;
        }
        Effect::Unbound => {
            let binding = binding_of(operation)?;
            token_store::delete_for_binding(conn, binding.as_str())?;
            bindings::mark_deleted(conn, binding.as_str())?;
        }
        Effect::BackedUp(done) => {
            let backup = backups::find_by_operation(conn, &operation.id)?.ok_or_else(|| {
                Error::Inconsistent(format!("operation {} has no backup", operation.id))
            })?;
            backups::mark_succeeded(conn, &backup.id, &done)?;
        }
        Effect::Restored => restores::finish(conn, &operation.id, op_state::SUCCEEDED, None)?,
    }
    Ok(())
}

/// Records a final failure (inside the transaction that ends the operation).
///
/// # Errors
/// When the store fails.
pub fn apply_failure(
    conn: &mut DbConnection,
    operation: &Operation,
    description: &str,
) -> Result<(), Error> {
    match operation.kind.as_str() {
        kind::BACKUP => {
            if let Some(backup) = backups::find_by_operation(conn, &operation.id)? {
                backups::mark_failed(conn, &backup.id, description)?;
            }
        }
        kind::RESTORE => {
            restores::finish(conn, &operation.id, op_state::FAILED, Some(description))?;
        }
        kind::PROVISION | kind::DEPROVISION => {
            instances::set_state(conn, &operation.instance_id, instance_state::FAILED)?;
        }
        kind::BIND | kind::UNBIND => {
            bindings::set_state(conn, binding_of(operation)?.as_str(), binding_state::FAILED)?;
        }
        _ => {}
    }
    Ok(())
}

/// Longest the clean-up after a failed provision may take.
const CLEAN_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// After an operation failed for good (and that was recorded), removes what it may have
/// left: a failed provision's server and volume, so that a failed instance holds no
/// resources until the platform deletes it; a failed backup's data objects (an attempt
/// killed mid-way leaves one), so that a failed backup leaves nothing in storage; a
/// failed restore's scratch data (or its verified, interrupted swap, finished).
pub async fn clean_up_after_failure(state: &AppState, operation: &Operation) {
    let Ok(id) = InstanceId::parse(&operation.instance_id) else {
        return;
    };
    match operation.kind.as_str() {
        kind::PROVISION => {}
        kind::BACKUP => {
            remove_failed_backup(state, &id, operation).await;
            return;
        }
        kind::RESTORE => {
            if let Ok(instance) = load_instance(state, &operation.instance_id).await {
                let settled = tokio::time::timeout(
                    CLEAN_UP_TIMEOUT,
                    run::settle_failed_restore(state, operation, &instance),
                );
                if settled.await.is_err() {
                    tracing::warn!(instance_id = %id, "Cleaning up after a failed restore timed out; the next restore cleans up.");
                }
            }
            return;
        }
        _ => return,
    }
    match tokio::time::timeout(CLEAN_UP_TIMEOUT, state.infrastructure.deprovision(&id)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(
            instance_id = %id,
            error = %cause_chain(&error),
            "Cleaning up after a failed provision failed; a deprovision will retry."
        ),
        Err(_) => tracing::warn!(
            instance_id = %id,
            "Cleaning up after a failed provision timed out; a deprovision will retry."
        ),
    }
}

async fn remove_failed_backup(state: &AppState, instance: &InstanceId, operation: &Operation) {
    let op_id = operation.id.clone();
    let found = state
        .store
        .run(move |conn| Ok(backups::find_by_operation(conn, &op_id)?))
        .await;
    let backup = match found {
        Ok(Some(backup)) => backup,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(operation = %operation.id, error = %cause_chain(&error), "Finding a failed backup failed; retention removes its data later.");
            return;
        }
    };
    let Ok(backup_id) = phoenix_adapters::ids::BackupId::parse(&backup.id) else {
        return;
    };
    let removed = tokio::time::timeout(
        CLEAN_UP_TIMEOUT,
        phoenix_adapters::backup::delete_backup(state.backup_store.as_ref(), instance, &backup_id),
    )
    .await;
    if !matches!(removed, Ok(Ok(()))) {
        tracing::warn!(
            instance_id = %instance,
            backup_id = %backup.id,
            "Removing the data of a failed backup failed; retention removes it later."
        );
    }
}
