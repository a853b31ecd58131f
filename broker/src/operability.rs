//! Operability endpoints: `/healthz` (the process serves), `/readyz` (the state store
//! answers) and `/metrics` (Prometheus text). None of them needs credentials, so none
//! of them may reveal anything but counts and states.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use actix_web::{HttpResponse, web};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::app_state::AppState;
use crate::error::Error;
use crate::store::instances;
use crate::store::operations as ops;

/// The process-wide Prometheus recorder (a process has one global recorder; every
/// application built in it, tests included, shares it).
///
/// # Errors
/// When another recorder was installed first.
pub fn prometheus() -> Result<PrometheusHandle, Error> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| Error::Config(format!("installing the metrics recorder: {e}")))?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Registers the operability routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(render_metrics));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.store.is_reachable().await {
        HttpResponse::Ok().json(json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable().json(
            json!({ "status": "unavailable", "description": "The state store does not answer." }),
        )
    }
}

async fn render_metrics(state: web::Data<AppState>) -> HttpResponse {
    let counted = state
        .store
        .run(|conn| Ok(instances::list_provisioned(conn)?))
        .await;
    match counted {
        Ok(provisioned) => {
            let mut by_plan: BTreeMap<String, u32> = state
                .catalog
                .plans()
                .map(|(_, plan)| (plan.name.clone(), 0))
                .collect();
            for instance in provisioned {
                if let Some((_, plan)) = state.catalog.plan(&instance.plan_id) {
                    *by_plan.entry(plan.name.clone()).or_default() += 1;
                }
            }
            for (plan, count) in by_plan {
                metrics::gauge!("phoenix_instances", "plan" => plan).set(f64::from(count));
            }
        }
        Err(error) => {
            tracing::warn!(error = %crate::error::cause_chain(&error), "Counting instances for /metrics failed.");
        }
    }
    // From the store, like the instances: the operations of every replica.
    let running = state
        .store
        .run(|conn| Ok(ops::count_in_progress_by_kind(conn)?))
        .await;
    match running {
        Ok(running) => {
            for kind in ops::kind::ALL {
                let count = running
                    .iter()
                    .find(|(k, _)| k == kind)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!("phoenix_operations_in_progress", "kind" => kind)
                    .set(f64::from(u32::try_from(count).unwrap_or(u32::MAX)));
            }
        }
        Err(error) => {
            tracing::warn!(error = %crate::error::cause_chain(&error), "Counting running operations for /metrics failed.");
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
