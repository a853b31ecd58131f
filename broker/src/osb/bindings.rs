//! Service binding endpoints: bind, fetch, unbind, last_operation.
//!
//! With `accepts_incomplete=true` binding and unbinding are asynchronous operations;
//! without it they run inline and answer when done. A rotation (`predecessor_binding_id`)
//! creates a new role with the predecessor's parameters; both stay valid until the
//! predecessor is unbound. Credentials are opened from their sealed form only to be sent.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use phoenix_adapters::engine::Credentials;
use phoenix_catalog::ParametersFor;
use serde::Deserialize;
use serde_json::{Value, json};

use super::input::{self, AsyncQuery, DeleteQuery, PollQuery};
use super::{
    MAX_ATTEMPTS, accepted, empty, insert_operation, json_object, known_plan, last_operation,
    stored_json, with_retries,
};

const BINDING_BUSY: &str = "Another operation on this service binding is in progress.";
use crate::app_state::AppState;
use crate::backups::tokens;
use crate::error::{ApiError, Error};
use crate::operations;
use crate::store::bindings::{self, Binding, state as binding_state};
use crate::store::instances::{self, state as instance_state};
use crate::store::operations::{self as ops, NewOperation, Operation, kind, state as op_state};
use crate::store::{DbConnection, is_unique_violation, ms, now_ms, write_transaction};

#[derive(Debug, Deserialize)]
struct BindRequest {
    service_id: Option<String>,
    plan_id: Option<String>,
    context: Option<Value>,
    app_guid: Option<String>,
    bind_resource: Option<Value>,
    parameters: Option<Value>,
    predecessor_binding_id: Option<String>,
}

/// The sealing context of a binding's password: a sealed value copied to another row
/// does not open there.
pub fn sealing_context(binding_id: &str) -> Vec<u8> {
    format!("binding:{binding_id}").into_bytes()
}

/// The credentials of a created binding, opened for the platform.
fn credentials_body(state: &AppState, binding: &Binding) -> Result<Value, ApiError> {
    let missing = || Error::Inconsistent(format!("binding {} has no credentials", binding.id));
    let sealed = binding.password_sealed.as_deref().ok_or_else(missing)?;
    let password = state
        .master_key
        .key()
        .open(&sealing_context(&binding.id), sealed)
        .map_err(Error::from)?;
    let credentials = Credentials {
        username: binding.username.clone().ok_or_else(missing)?,
        password: String::from_utf8(password)
            .map_err(|_| Error::Inconsistent(format!("binding {} password", binding.id)))?,
        host: binding.host.clone().ok_or_else(missing)?,
        port: binding
            .port
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(missing)?,
        database: binding.database_name.clone().ok_or_else(missing)?,
    };
    let mut body = json!({
        "credentials": {
            "uri": credentials.uri(),
            "jdbcUrl": credentials.jdbc_url(),
            "host": credentials.host,
            "port": credentials.port,
            "database": credentials.database,
            "username": credentials.username,
            "password": credentials.password,
        },
        "endpoints": [{
            "host": credentials.host,
            "ports": [credentials.port.to_string()],
            "protocol": "tcp",
        }],
    });
    let parameters = super::stored_json(&binding.parameters)?;
    if tokens::wants_backup_access(&parameters) {
        body["credentials"]["backup_api"] = json!({
            "url": format!("{}/v2/service_instances/{}", state.public_url, binding.instance_id),
            "instance_id": binding.instance_id,
            "token": tokens::token(&state.master_key, &binding.id, sealed),
        });
    }
    Ok(body)
}

enum Bound {
    Accepted(String),
    /// Created earlier with identical attributes (200), or just now (201).
    Created(Box<Binding>, StatusCode),
    /// Claimed for inline execution (a synchronous bind).
    RunNow(String),
}

/// `PUT /v2/service_instances/{instance_id}/service_bindings/{binding_id}`
pub async fn create_binding(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance_id = input::instance_id(&path.0)?;
    let binding_id = input::binding_id(&path.1)?;
    let query: AsyncQuery = input::query(&req)?;
    let body: BindRequest = input::json_body(&req, payload).await?;
    let service_id = input::required("service_id", body.service_id.as_deref())?.to_owned();
    let plan_id = input::required("plan_id", body.plan_id.as_deref())?.to_owned();
    let (service, plan) = known_plan(&state, &service_id, &plan_id)?;
    if !plan.is_bindable(service) {
        return Err(ApiError::bad_request(format!(
            "Plan {} is not bindable.",
            plan.name
        )));
    }
    let predecessor = match body.predecessor_binding_id.as_deref() {
        None => None,
        Some(p) => {
            if !plan.is_binding_rotatable() {
                return Err(ApiError::unprocessable(format!(
                    "Bindings of plan {} cannot be rotated.",
                    plan.name
                )));
            }
            Some(input::binding_id(p)?.to_string())
        }
    };
    let parameters = json_object("parameters", body.parameters)?.unwrap_or_else(|| json!({}));
    if predecessor.is_none() {
        plan.validate_parameters(ParametersFor::Bind, &parameters)
            .map_err(|errors| {
                ApiError::bad_request(format!(
                    "The bind parameters are not valid for plan {}: {}.",
                    plan.name,
                    errors.join("; ")
                ))
            })?;
    }
    let mut bind_resource = match body.bind_resource {
        Some(v @ Value::Object(_)) => v,
        None | Some(Value::Null) => json!({}),
        Some(_) => {
            return Err(ApiError::bad_request(
                "bind_resource must be a JSON object.",
            ));
        }
    };
    if let Some(app_guid) = body.app_guid
        && bind_resource.get("app_guid").is_none()
    {
        bind_resource["app_guid"] = json!(app_guid);
    }
    // A backup token belongs to a person (a service key), never to an application's
    // environment, where every process of the app could read it.
    if tokens::wants_backup_access(&parameters)
        && (bind_resource.get("app_guid").is_some() || bind_resource.get("route").is_some())
    {
        return Err(ApiError::bad_request(
            "backup_access is for service keys (cf create-service-key), not for bindings of an \
             application or a route.",
        ));
    }
    let context = match body.context {
        Some(v @ Value::Object(_)) => v,
        _ => json!({}),
    };
    let now = now_ms();
    let binding = Binding {
        id: binding_id.to_string(),
        instance_id: instance_id.to_string(),
        service_id,
        plan_id,
        state: binding_state::CREATING.to_owned(),
        parameters: parameters.to_string(),
        bind_resource: bind_resource.to_string(),
        context: context.to_string(),
        predecessor_binding_id: predecessor,
        username: None,
        password_sealed: None,
        host: None,
        port: None,
        database_name: None,
        created_at: now,
        updated_at: now,
    };
    let sync_token = (!query.accepts_incomplete)
        .then(|| format!("{}/{}", state.worker_id, uuid::Uuid::new_v4()));
    let outcome = with_retries(|| {
        let state = state.clone();
        let binding = binding.clone();
        let sync_token = sync_token.clone();
        async move {
            let store = state.store.clone();
            let lease = ms(state.settings.operation_lease);
            store
                .run(move |conn| {
                    Ok(write_transaction(conn, |conn| {
                        instances::lock(conn, &binding.instance_id)?;
                        decide_bind(conn, binding, sync_token.as_deref(), lease)
                    }))
                })
                .await?
        }
    })
    .await?;
    match outcome {
        Bound::Accepted(operation) => {
            tracing::info!(%instance_id, %binding_id, operation, "Bind accepted.");
            Ok(accepted(&state, &operation))
        }
        Bound::Created(binding, status) => {
            Ok(HttpResponse::build(status).json(credentials_body(&state, &binding)?))
        }
        Bound::RunNow(operation) => {
            let succeeded = run_inline(&state, &operation).await?;
            let id = binding_id.to_string();
            let binding = state
                .store
                .run(move |conn| Ok(bindings::find(conn, &id)?))
                .await?
                .filter(|_| succeeded)
                .filter(|b| b.state == binding_state::CREATED)
                .ok_or_else(|| {
                    ApiError::from(Error::Inconsistent(format!(
                        "binding {binding_id} failed; operation {operation}"
                    )))
                })?;
            Ok(HttpResponse::Created().json(credentials_body(&state, &binding)?))
        }
    }
}

/// Runs an operation this request has claimed, to its end.
async fn run_inline(state: &AppState, operation_id: &str) -> Result<bool, ApiError> {
    let id = operation_id.to_owned();
    let operation: Operation = state
        .store
        .run(move |conn| Ok(ops::find(conn, &id)?))
        .await?
        .ok_or_else(|| Error::Inconsistent(format!("operation {operation_id} vanished")))?;
    Ok(operations::run_claimed(state, operation).await?)
}

fn new_operation(
    kind_name: &str,
    binding: &Binding,
    description: &str,
    sync_token: Option<&str>,
    lease_ms: i64,
) -> NewOperation {
    let mut operation = NewOperation::new(
        kind_name,
        &binding.instance_id,
        Some(&binding.id),
        "{}".to_owned(),
        description,
        MAX_ATTEMPTS,
    );
    if let Some(token) = sync_token {
        // Claimed at birth by this request; if the request dies, the lease expires and a
        // worker finishes the operation.
        operation.lease_owner = Some(token.to_owned());
        operation.lease_until = Some(now_ms().saturating_add(lease_ms));
        operation.attempts = 1;
        operation.max_attempts = 1;
    }
    operation
}

fn decide_bind(
    conn: &mut DbConnection,
    mut binding: Binding,
    sync_token: Option<&str>,
    lease_ms: i64,
) -> Result<Bound, ApiError> {
    let instance = instances::find(conn, &binding.instance_id)?
        .filter(|i| i.state != instance_state::DELETED)
        .ok_or_else(|| ApiError::not_found("There is no such service instance."))?;
    if instance.service_id != binding.service_id || instance.plan_id != binding.plan_id {
        return Err(ApiError::bad_request(
            "The service_id and plan_id must be those of the service instance.",
        ));
    }
    if let Some(existing) = bindings::find(conn, &binding.id)? {
        if existing.state == binding_state::DELETED && existing.instance_id == binding.instance_id {
            bindings::purge_deleted(conn, &existing.id)?;
        } else {
            let identical = existing.instance_id == binding.instance_id
                && existing.service_id == binding.service_id
                && existing.plan_id == binding.plan_id
                // A rotation takes its parameters from the predecessor, not the request.
                && (binding.predecessor_binding_id.is_some()
                    || stored_json(&existing.parameters)? == stored_json(&binding.parameters)?)
                && stored_json(&existing.bind_resource)? == stored_json(&binding.bind_resource)?
                && existing.predecessor_binding_id == binding.predecessor_binding_id;
            if !identical {
                return Err(ApiError::conflict(
                    "A service binding with this ID already exists with different attributes.",
                ));
            }
            return match existing.state.as_str() {
                binding_state::CREATED => Ok(Bound::Created(Box::new(existing), StatusCode::OK)),
                binding_state::CREATING => {
                    let operation = ops::latest_for_binding(conn, &existing.id)?
                        .filter(|op| op.kind == kind::BIND && op.state == op_state::IN_PROGRESS)
                        .ok_or_else(|| ApiError::concurrency("The binding is busy."))?;
                    if sync_token.is_some() {
                        Err(ApiError::concurrency("The binding is still being created."))
                    } else {
                        Ok(Bound::Accepted(operation.id))
                    }
                }
                _ => Err(ApiError::conflict(
                    "A service binding with this ID exists but failed or is being deleted.",
                )),
            };
        }
    }
    // A repeat of an existing binding is answered above even while the instance is busy.
    match instance.state.as_str() {
        instance_state::PROVISIONED => {}
        instance_state::FAILED => {
            return Err(ApiError::unprocessable(
                "The service instance failed; it cannot be bound.",
            ));
        }
        _ => {
            return Err(ApiError::concurrency(
                "The service instance is being provisioned or deleted.",
            ));
        }
    }
    if ops::lifecycle_running_on_instance(conn, &instance.id)?.is_some() {
        return Err(ApiError::concurrency(
            "The service instance is being updated.",
        ));
    }
    if let Some(predecessor_id) = binding.predecessor_binding_id.clone() {
        let predecessor = bindings::find(conn, &predecessor_id)?
            .filter(|p| p.instance_id == binding.instance_id && p.state == binding_state::CREATED)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "predecessor_binding_id is not a binding of this service instance.",
                )
            })?;
        binding.parameters = predecessor.parameters;
    }
    bindings::insert(conn, &binding).map_err(|e| {
        if is_unique_violation(&e) {
            ApiError::contended()
        } else {
            e.into()
        }
    })?;
    let operation = new_operation(
        kind::BIND,
        &binding,
        "Creating the service binding.",
        sync_token,
        lease_ms,
    );
    insert_operation(conn, &operation, BINDING_BUSY)?;
    Ok(if sync_token.is_some() {
        Bound::RunNow(operation.id)
    } else {
        Bound::Accepted(operation.id)
    })
}

/// `GET /v2/service_instances/{instance_id}/service_bindings/{binding_id}`
pub async fn fetch_binding(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance_id = input::instance_id(&path.0)?.to_string();
    let binding_id = input::binding_id(&path.1)?.to_string();
    let binding = state
        .store
        .run(move |conn| Ok(bindings::find(conn, &binding_id)?))
        .await?
        .filter(|b| b.instance_id == instance_id)
        .filter(|b| b.state == binding_state::CREATED)
        .ok_or_else(|| {
            ApiError::not_found("There is no such service binding (or it is not ready).")
        })?;
    let mut body = credentials_body(&state, &binding)?;
    body["parameters"] = stored_json(&binding.parameters)?;
    Ok(HttpResponse::Ok().json(body))
}

enum Unbound {
    Accepted(String),
    RunNow(String),
    Gone,
}

/// `DELETE /v2/service_instances/{instance_id}/service_bindings/{binding_id}`
pub async fn delete_binding(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance_id = input::instance_id(&path.0)?.to_string();
    let binding_id = input::binding_id(&path.1)?.to_string();
    let query: DeleteQuery = input::query(&req)?;
    let service_id = input::required("service_id", query.service_id.as_deref())?.to_owned();
    let plan_id = input::required("plan_id", query.plan_id.as_deref())?.to_owned();
    // A plan the catalog no longer offers is still accepted for the binding that has it.
    let catalog_check = known_plan(&state, &service_id, &plan_id).map(drop);
    let sync_token = (!query.accepts_incomplete)
        .then(|| format!("{}/{}", state.worker_id, uuid::Uuid::new_v4()));
    let lease = ms(state.settings.operation_lease);
    let outcome = state
        .store
        .run({
            let binding_id = binding_id.clone();
            move |conn| {
                Ok(write_transaction(conn, |conn| {
                    instances::lock(conn, &instance_id)?;
                    let Some(binding) = bindings::find(conn, &binding_id)?
                        .filter(|b| b.instance_id == instance_id)
                        .filter(|b| b.state != binding_state::DELETED)
                    else {
                        catalog_check?;
                        return Ok(Unbound::Gone);
                    };
                    if binding.service_id != service_id {
                        return Err(ApiError::bad_request(
                            "The service_id does not match the service binding.",
                        ));
                    }
                    if binding.plan_id != plan_id {
                        catalog_check?;
                    }
                    if let Some(running) = ops::latest_for_binding(conn, &binding.id)?
                        .filter(|op| op.state == op_state::IN_PROGRESS)
                    {
                        return if running.kind == kind::UNBIND && sync_token.is_none() {
                            Ok(Unbound::Accepted(running.id))
                        } else {
                            Err(ApiError::concurrency(
                                "Another operation on this service binding is in progress.",
                            ))
                        };
                    }
                    if ops::lifecycle_running_on_instance(conn, &binding.instance_id)?.is_some() {
                        return Err(ApiError::concurrency(
                            "The service instance is being updated or deleted.",
                        ));
                    }
                    let operation = new_operation(
                        kind::UNBIND,
                        &binding,
                        "Deleting the service binding.",
                        sync_token.as_deref(),
                        lease,
                    );
                    insert_operation(conn, &operation, BINDING_BUSY)?;
                    bindings::set_state(conn, &binding.id, binding_state::DELETING)?;
                    Ok(if sync_token.is_some() {
                        Unbound::RunNow(operation.id)
                    } else {
                        Unbound::Accepted(operation.id)
                    })
                }))
            }
        })
        .await??;
    match outcome {
        Unbound::Accepted(operation) => {
            tracing::info!(%binding_id, operation, "Unbind accepted.");
            Ok(accepted(&state, &operation))
        }
        Unbound::RunNow(operation) => {
            if run_inline(&state, &operation).await? {
                Ok(empty(StatusCode::OK))
            } else {
                Err(Error::Inconsistent(format!(
                    "unbinding {binding_id} failed; operation {operation}"
                ))
                .into())
            }
        }
        Unbound::Gone => Ok(empty(StatusCode::GONE)),
    }
}

/// `GET /v2/service_instances/{instance_id}/service_bindings/{binding_id}/last_operation`
pub async fn poll_last_operation(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance_id = input::instance_id(&path.0)?.to_string();
    let binding_id = input::binding_id(&path.1)?.to_string();
    let query: PollQuery = input::query(&req)?;
    if query.operation.as_deref() == Some("") {
        return Err(ApiError::bad_request("operation must not be empty."));
    }
    let (binding, operation) = state
        .store
        .run(move |conn| {
            let binding =
                bindings::find(conn, &binding_id)?.filter(|b| b.instance_id == instance_id);
            let operation = match (&binding, &query.operation) {
                (None, _) => None,
                (Some(_), Some(op_id)) => ops::find(conn, op_id)?,
                (Some(b), None) => ops::latest_for_binding(conn, &b.id)?,
            };
            Ok((binding, operation))
        })
        .await?;
    let Some(binding) = binding else {
        return Err(ApiError::not_found("There is no such service binding."));
    };
    let operation = operation
        .filter(|op| op.binding_id.as_deref() == Some(binding.id.as_str()))
        .ok_or_else(|| {
            ApiError::bad_request("There is no such operation for this service binding.")
        })?;
    if binding.state == binding_state::DELETED
        && operation.kind == kind::UNBIND
        && operation.state == op_state::SUCCEEDED
    {
        return Ok(empty(StatusCode::GONE));
    }
    Ok(last_operation(&operation))
}
