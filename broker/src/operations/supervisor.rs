//! Supervision: at start and then periodically, every provisioned instance whose server
//! should run is checked; a running server is adopted, a stopped one is started.
//!
//! The supervisor leaves alone an instance with an operation in progress (that
//! operation owns the server for now), and never changes stored state: it only keeps
//! servers running and logs what it did.

use tokio_util::sync::CancellationToken;

use crate::app_state::{AppState, instance_spec};
use crate::error::cause_chain;
use crate::store::instances;
use crate::store::operations as ops;

/// Supervises until `cancel` fires.
pub async fn supervise(state: AppState, cancel: CancellationToken) {
    loop {
        supervise_once(&state).await;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(state.settings.supervise_interval) => {}
        }
    }
}

/// One pass over every provisioned instance.
pub async fn supervise_once(state: &AppState) {
    let listed = state
        .store
        .run(|conn| Ok(instances::list_provisioned(conn)?))
        .await;
    let listed = match listed {
        Ok(listed) => listed,
        Err(error) => {
            tracing::warn!(error = %cause_chain(&error), "Listing instances to supervise failed.");
            return;
        }
    };
    for listed in listed {
        // Read again right before acting: starting a server takes a while, and meanwhile
        // an operation may have begun on this instance (or deleted it). The
        // infrastructure's per-instance lock covers what is left of the race.
        let id = listed.id.clone();
        let current = state
            .store
            .run(move |conn| {
                let Some(instance) = instances::find(conn, &id)?
                    .filter(|i| i.state == instances::state::PROVISIONED)
                else {
                    return Ok(None);
                };
                let busy = ops::running_on_instance(conn, &instance.id)?.is_some();
                Ok((!busy).then_some(instance))
            })
            .await;
        let instance = match current {
            Ok(Some(instance)) => instance,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(instance_id = %listed.id, error = %cause_chain(&error), "Reading an instance to supervise failed.");
                continue;
            }
        };
        let spec = match instance_spec(&instance) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::error!(instance_id = %instance.id, error = %cause_chain(&error), "Cannot supervise an instance.");
                continue;
            }
        };
        match state.infrastructure.ensure_running(&spec).await {
            Ok(endpoint) => {
                tracing::debug!(instance_id = %instance.id, port = endpoint.port, "Instance is running.");
            }
            Err(error) => {
                tracing::error!(instance_id = %instance.id, error = %cause_chain(&error), "Instance could not be started.");
            }
        }
    }
}
