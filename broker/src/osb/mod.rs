//! The Open Service Broker API v2.17 under `/v2`: catalog, instances, bindings and their
//! `last_operation` endpoints (and, in the same scope, the backup API of
//! [`crate::backups::api`]).
//!
//! Handlers validate everything at the edge (see [`input`]), decide inside one write
//! transaction of the state store, and leave long work to operations that workers run.
//! A 4xx answer never changes anything. Handlers never call an engine directly, except a
//! synchronous bind or unbind, which runs its operation inline.

pub mod bindings;
pub mod catalog;
pub mod input;
pub mod instances;
pub mod middleware;

use actix_web::http::StatusCode;
use actix_web::middleware::from_fn;
use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::app_state::AppState;
use crate::error::ApiError;
use crate::store::operations::{Operation, kind, state};

/// Seconds a platform should wait before polling an operation in progress again.
const RETRY_AFTER_SECONDS: &str = "2";

/// Registers the OSB routes with authentication and the version check.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v2")
            .wrap(from_fn(middleware::require_api_version))
            .wrap(from_fn(middleware::require_credentials))
            .route("/catalog", web::get().to(catalog::get_catalog))
            .service(
                web::resource("/service_instances/{instance_id}")
                    .route(web::put().to(instances::provision_instance))
                    .route(web::get().to(instances::fetch_instance))
                    .route(web::patch().to(instances::update_instance))
                    .route(web::delete().to(instances::deprovision_instance))
                    .default_service(web::to(method_not_allowed)),
            )
            .route(
                "/service_instances/{instance_id}/last_operation",
                web::get().to(instances::poll_last_operation),
            )
            .service(
                web::resource("/service_instances/{instance_id}/service_bindings/{binding_id}")
                    .route(web::put().to(bindings::create_binding))
                    .route(web::get().to(bindings::fetch_binding))
                    .route(web::delete().to(bindings::delete_binding))
                    .default_service(web::to(method_not_allowed)),
            )
            .route(
                "/service_instances/{instance_id}/service_bindings/{binding_id}/last_operation",
                web::get().to(bindings::poll_last_operation),
            )
            .configure(crate::backups::api::configure),
    );
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::method_not_allowed())
}

/// 202 with the operation to poll; wakes the workers, which may be idle.
fn accepted(state: &AppState, operation: &str) -> HttpResponse {
    state.wake.notify_waiters();
    HttpResponse::Accepted().json(json!({ "operation": operation }))
}

/// A 2xx answer with an empty object.
fn empty(status: StatusCode) -> HttpResponse {
    HttpResponse::build(status).json(json!({}))
}

/// The `last_operation` answer for an operation.
fn last_operation(operation: &Operation) -> HttpResponse {
    let mut body = json!({ "state": operation.state });
    if let Some(description) = &operation.description {
        body["description"] = json!(description);
    }
    if operation.state == state::FAILED {
        match operation.kind.as_str() {
            kind::UPDATE => {
                body["instance_usable"] = json!(true);
                body["update_repeatable"] = json!(true);
            }
            kind::DEPROVISION => body["instance_usable"] = json!(false),
            _ => {}
        }
    }
    let mut response = HttpResponse::Ok();
    if operation.state == state::IN_PROGRESS {
        response.insert_header(("Retry-After", RETRY_AFTER_SECONDS));
    }
    response.json(body)
}

/// Attempts an operation gets before it fails for good.
pub(crate) const MAX_ATTEMPTS: i32 = 3;

/// The catalog's service with this ID; 400 when there is none.
fn known_service<'a>(
    state: &'a AppState,
    service_id: &str,
) -> Result<&'a phoenix_catalog::Service, ApiError> {
    state.catalog.service(service_id).ok_or_else(|| {
        ApiError::bad_request(format!(
            "The service_id {service_id:?} is not in the catalog."
        ))
    })
}

/// The catalog's service and plan with these IDs; 400 when there is none.
fn known_plan<'a>(
    state: &'a AppState,
    service_id: &str,
    plan_id: &str,
) -> Result<(&'a phoenix_catalog::Service, &'a phoenix_catalog::Plan), ApiError> {
    let service = known_service(state, service_id)?;
    let plan = service.plan(plan_id).ok_or_else(|| {
        ApiError::bad_request(format!(
            "The plan_id {plan_id:?} is not a plan of service {}.",
            service.name
        ))
    })?;
    Ok((service, plan))
}

/// A request's JSON object field (`parameters`, `context`): None when absent or null,
/// 400 when it is not an object.
fn json_object(
    field: &str,
    value: Option<serde_json::Value>,
) -> Result<Option<serde_json::Value>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v @ serde_json::Value::Object(_)) => Ok(Some(v)),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field} must be a JSON object."
        ))),
    }
}

/// Stores a new operation; the unique index on running operations turns a race with
/// another request into `busy` (a ConcurrencyError).
pub(crate) fn insert_operation(
    conn: &mut crate::store::DbConnection,
    operation: &crate::store::operations::NewOperation,
    busy: &str,
) -> Result<(), ApiError> {
    crate::store::operations::insert(conn, operation).map_err(|e| {
        if crate::store::is_unique_violation(&e) {
            ApiError::concurrency(busy)
        } else {
            e.into()
        }
    })
}

/// Parses a stored JSON column. The broker wrote it: unreadable JSON is damage to
/// report, never something to stand in for with `{}`.
fn stored_json(text: &str) -> Result<serde_json::Value, crate::error::Error> {
    serde_json::from_str(text)
        .map_err(|e| crate::error::Error::Inconsistent(format!("stored JSON: {e}")))
}

/// Runs a store decision again when it lost a race on a unique key.
async fn with_retries<T, F, Fut>(mut decide: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let mut attempt = 0;
    loop {
        match decide().await {
            Err(error) if error.is_contended() && attempt < 3 => attempt += 1,
            other => return other,
        }
    }
}
