//! Service instance endpoints: provision, fetch, update, deprovision, last_operation.
//!
//! Provision, update and deprovision are asynchronous only (`AsyncRequired` without
//! `accepts_incomplete=true`). One operation at a time runs on an instance: a second
//! mutation gets `ConcurrencyError`, except the identical request, which gets the running
//! operation again (202).

use std::collections::BTreeMap;
use std::net::TcpListener;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use phoenix_catalog::{BackupStrategy, ParametersFor, Plan};
use serde::Deserialize;
use serde_json::{Value, json};

use super::input::{self, AsyncQuery, DeleteQuery, PollQuery};
use super::{
    MAX_ATTEMPTS, accepted, empty, insert_operation, json_object, known_plan, known_service,
    last_operation, stored_json, with_retries,
};

const INSTANCE_BUSY: &str = "Another operation on this service instance is in progress.";
use crate::app_state::AppState;
use crate::backups::policy::PolicyRequest;
use crate::backups::run::{ProvisionPayload, Seed};
use crate::backups::scheduler;
use crate::config::CloneScope;
use crate::error::{ApiError, Error};
use crate::store::backups::{self as backup_store, state as backup_state};
use crate::store::instances::{self, Instance, state as instance_state};
use crate::store::operations::{self, NewOperation, kind, state as op_state};
use crate::store::policies::{self, PolicyRow};
use crate::store::{DbConnection, is_unique_violation, now_ms, write_transaction};

#[derive(Debug, Deserialize)]
struct MaintenanceInfoRequest {
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ProvisionRequest {
    service_id: Option<String>,
    plan_id: Option<String>,
    context: Option<Value>,
    organization_guid: Option<String>,
    space_guid: Option<String>,
    parameters: Option<Value>,
    maintenance_info: Option<MaintenanceInfoRequest>,
}

#[derive(Debug, Deserialize)]
struct UpdateRequest {
    service_id: Option<String>,
    plan_id: Option<String>,
    parameters: Option<Value>,
    maintenance_info: Option<MaintenanceInfoRequest>,
}

/// What an update operation is to bring the instance to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct UpdatePayload {
    pub plan_id: String,
    pub parameters: Value,
    pub settings: BTreeMap<String, String>,
    pub maintenance_version: Option<String>,
}

/// The plan's resources, with each parameter that names a resource and that the plan's
/// schema declares overriding it (an undeclared one is never checked, so it may not
/// change what the operator set).
pub fn plan_settings(plan: &Plan, parameters: &Value) -> BTreeMap<String, String> {
    let mut settings = plan.resources.clone();
    if let Some(parameters) = parameters.as_object() {
        for (name, value) in parameters {
            if !plan.declares_instance_parameter(name) {
                continue;
            }
            if let Some(setting) = settings.get_mut(name) {
                *setting = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
            }
        }
    }
    settings
}

fn check_parameters(plan: &Plan, what: ParametersFor, parameters: &Value) -> Result<(), ApiError> {
    plan.validate_parameters(what, parameters)
        .map_err(|errors| {
            ApiError::bad_request(format!(
                "The {what} parameters are not valid for plan {}: {}.",
                plan.name,
                errors.join("; ")
            ))
        })
}

fn check_maintenance(
    plan: &Plan,
    requested: Option<&MaintenanceInfoRequest>,
) -> Result<(), ApiError> {
    match requested.and_then(|m| m.version.as_deref()) {
        Some(version) if plan.maintenance_version() != Some(version) => {
            Err(ApiError::maintenance_info_conflict())
        }
        _ => Ok(()),
    }
}

/// A snapshot plan needs an infrastructure that takes snapshots: refused at once, never
/// faked with a copy later.
fn refuse_unsupported_strategy(state: &AppState, plan: &Plan) -> Result<(), ApiError> {
    let BackupStrategy::Snapshot { shipped } = plan.backup_strategy else {
        return Ok(());
    };
    if !state.infrastructure.supports_snapshots() {
        return Err(ApiError::unprocessable(format!(
            "Plan {} backs up by snapshots, and this broker's volumes can take none (its data \
             directory is not on btrfs, and it has no EBS volumes); choose a plan with stream \
             backups.",
            plan.name
        )));
    }
    if shipped && !state.infrastructure.ships_snapshots() {
        return Err(ApiError::unprocessable(format!(
            "Plan {} ships its snapshots to backup storage, and this broker's volumes are EBS \
             volumes, whose snapshots EC2 keeps off the host already; choose a snapshot plan \
             that is not shipped.",
            plan.name
        )));
    }
    Ok(())
}

/// The first port of the range that no instance holds and that can be bound now.
fn allocate_port(conn: &mut DbConnection, state: &AppState) -> Result<u16, ApiError> {
    let used: std::collections::HashSet<i32> = instances::used_ports(conn)?.into_iter().collect();
    let host = state.settings.instance_host.as_str();
    state
        .settings
        .instance_ports
        .clone()
        .find(|port| !used.contains(&i32::from(*port)) && TcpListener::bind((host, *port)).is_ok())
        .ok_or_else(|| {
            ApiError::unprocessable(
                "No port is free for a new instance; the operator must widen PHOENIX_INSTANCE_PORTS.",
            )
        })
}

enum Provisioned {
    Accepted(String),
    Exists,
}

/// `PUT /v2/service_instances/{instance_id}`
pub async fn provision_instance(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?;
    let query: AsyncQuery = input::query(&req)?;
    let body: ProvisionRequest = input::json_body(&req, payload).await?;
    let service_id = input::required("service_id", body.service_id.as_deref())?.to_owned();
    let plan_id = input::required("plan_id", body.plan_id.as_deref())?.to_owned();
    let organization_guid =
        input::required("organization_guid", body.organization_guid.as_deref())?.to_owned();
    let space_guid = input::required("space_guid", body.space_guid.as_deref())?.to_owned();
    let (_, plan) = known_plan(&state, &service_id, &plan_id)?;
    check_maintenance(plan, body.maintenance_info.as_ref())?;
    refuse_unsupported_strategy(&state, plan)?;
    let parameters = json_object("parameters", body.parameters)?.unwrap_or_else(|| json!({}));
    check_parameters(plan, ParametersFor::Provision, &parameters)?;
    let context = json_object("context", body.context)?.unwrap_or_else(|| json!({}));
    let settings = plan_settings(plan, &parameters);
    let policy = match parameters.get("backup_policy") {
        Some(requested) => serde_json::from_value::<PolicyRequest>(requested.clone())
            .map_err(|e| ApiError::bad_request(format!("backup_policy: {e}")))?
            .apply_to(&plan.backup)
            .map_err(|e| ApiError::bad_request(format!("backup_policy: {e}")))?,
        None => plan.backup.clone(),
    };
    scheduler::check_frequency(&policy).map_err(ApiError::bad_request)?;
    let policy = scheduler::policy_row(id.as_str(), &policy, chrono::Utc::now());
    let instance = Instance {
        id: id.to_string(),
        service_id,
        plan_id,
        state: instance_state::PROVISIONING.to_owned(),
        parameters: parameters.to_string(),
        context: context.to_string(),
        organization_guid: Some(organization_guid),
        space_guid: Some(space_guid),
        maintenance_version: plan.maintenance_version().map(str::to_owned),
        engine: plan.engine.clone(),
        engine_version: plan.engine_version.clone(),
        settings: serde_json::to_string(&settings)
            .map_err(|e| ApiError::from(Error::Inconsistent(format!("settings: {e}"))))?,
        port: None,
        host: None,
        database_name: None,
        created_at: now_ms(),
        updated_at: now_ms(),
    };
    let accepts_incomplete = query.accepts_incomplete;
    let outcome = with_retries(|| {
        let state = state.clone();
        let instance = instance.clone();
        let parameters = parameters.clone();
        let policy = policy.clone();
        async move {
            let store = state.store.clone();
            store
                .run(move |conn| {
                    Ok(write_transaction(conn, |conn| {
                        instances::lock(conn, &instance.id)?;
                        decide_provision(
                            conn,
                            &state,
                            instance,
                            &parameters,
                            &policy,
                            accepts_incomplete,
                        )
                    }))
                })
                .await?
        }
    })
    .await?;
    match outcome {
        Provisioned::Accepted(operation) => {
            tracing::info!(instance_id = %id, operation, "Provision accepted.");
            Ok(accepted(&state, &operation))
        }
        Provisioned::Exists => Ok(empty(StatusCode::OK)),
    }
}

fn decide_provision(
    conn: &mut DbConnection,
    state: &AppState,
    mut instance: Instance,
    parameters: &Value,
    policy: &PolicyRow,
    accepts_incomplete: bool,
) -> Result<Provisioned, ApiError> {
    if let Some(existing) = instances::find(conn, &instance.id)? {
        if existing.state == instance_state::DELETED {
            // The backups of the deleted instance stay hers (clones may still use them):
            // a new instance under her ID would list, restore and govern them.
            if !backup_store::list(conn, &existing.id)?.is_empty() {
                return Err(ApiError::conflict(
                    "A deleted service instance with this ID still has backups (kept for \
                     their retention period); provision under another ID.",
                ));
            }
            instances::purge_deleted(conn, &existing.id)?;
        } else {
            let identical = existing.service_id == instance.service_id
                && existing.plan_id == instance.plan_id
                && stored_json(&existing.parameters)? == *parameters
                && existing.organization_guid == instance.organization_guid
                && existing.space_guid == instance.space_guid;
            if !identical {
                return Err(ApiError::conflict(
                    "A service instance with this ID already exists with different attributes.",
                ));
            }
            return match existing.state.as_str() {
                instance_state::PROVISIONED => Ok(Provisioned::Exists),
                instance_state::PROVISIONING => {
                    // A repeat is answered as the first request was: asynchronously.
                    if !accepts_incomplete {
                        return Err(ApiError::async_required());
                    }
                    let operation = operations::running_on_instance(conn, &existing.id)?
                        .filter(|op| op.kind == kind::PROVISION)
                        .ok_or_else(|| ApiError::concurrency("The instance is busy."))?;
                    Ok(Provisioned::Accepted(operation.id))
                }
                _ => Err(ApiError::conflict(
                    "A service instance with this ID exists but failed or is being deleted.",
                )),
            };
        }
    }
    if !accepts_incomplete {
        return Err(ApiError::async_required());
    }
    let payload = ProvisionPayload {
        seed: seed_of(conn, state, &instance, parameters)?,
    };
    let port = allocate_port(conn, state)?;
    instance.port = Some(i32::from(port));
    instances::insert(conn, &instance).map_err(|e| {
        if is_unique_violation(&e) {
            ApiError::contended()
        } else {
            e.into()
        }
    })?;
    let operation = NewOperation::new(
        kind::PROVISION,
        &instance.id,
        None,
        serde_json::to_string(&payload)
            .map_err(|e| Error::Inconsistent(format!("provision payload: {e}")))?,
        match payload.seed {
            None => "Provisioning the service instance.",
            Some(Seed::Clone { .. }) => "Provisioning the service instance from a backup.",
            Some(Seed::Fork { .. }) => "Provisioning the service instance as a fork.",
        },
        MAX_ATTEMPTS,
    );
    insert_operation(conn, &operation, INSTANCE_BUSY)?;
    policies::upsert(conn, policy)?;
    Ok(Provisioned::Accepted(operation.id))
}

#[derive(Debug, Deserialize)]
struct SourceRequest {
    instance_id: String,
    backup_id: Option<String>,
}

/// Where a new instance's data comes from (`clone_from` or `fork_from`), checked now so
/// that a request the operation could never carry out gets a 4xx. The source must be in
/// the organization, and the space unless the operator allows organization-wide clones;
/// an instance outside that scope is answered exactly like one that does not exist.
fn seed_of(
    conn: &mut DbConnection,
    state: &AppState,
    instance: &Instance,
    parameters: &Value,
) -> Result<Option<Seed>, ApiError> {
    let parse = |name: &str| -> Result<Option<SourceRequest>, ApiError> {
        parameters
            .get(name)
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
    };
    let (clone_from, fork_from) = (parse("clone_from")?, parse("fork_from")?);
    let (request, fork) = match (clone_from, fork_from) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "Give clone_from or fork_from, not both.",
            ));
        }
        (Some(request), None) => (request, false),
        (None, Some(request)) => (request, true),
    };
    let scope = match state.settings.clone_scope {
        CloneScope::Space => "space",
        CloneScope::Organization => "organization",
    };
    let what = if fork { "fork" } else { "clone" };
    let unknown = || {
        ApiError::unprocessable(format!(
            "There is no service instance {:?} in this {scope} to {what} from.",
            request.instance_id
        ))
    };
    // The source's lock keeps retention from marking the chosen backup for deletion
    // before this provision (which then protects it) commits.
    instances::lock(conn, &request.instance_id)?;
    let source = instances::find(conn, &request.instance_id)?.ok_or_else(unknown)?;
    let same_scope = source.organization_guid == instance.organization_guid
        && (state.settings.clone_scope == CloneScope::Organization
            || source.space_guid == instance.space_guid);
    if !same_scope {
        return Err(unknown());
    }
    if source.service_id != instance.service_id {
        return Err(ApiError::unprocessable(format!(
            "Service instance {:?} is of another service; only an instance of the same \
             service can be the source.",
            request.instance_id
        )));
    }
    if fork {
        if source.state != instance_state::PROVISIONED {
            return Err(ApiError::unprocessable(format!(
                "Service instance {:?} is not running; only a running instance can be forked \
                 (clone_from starts from one of its backups).",
                request.instance_id
            )));
        }
        // A fork of a snapshot plan's instance is a snapshot of its volume.
        let by_snapshot = state
            .catalog
            .plan(&source.plan_id)
            .is_some_and(|(_, plan)| {
                matches!(plan.backup_strategy, BackupStrategy::Snapshot { .. })
            });
        check_copy_version(
            "The instance to fork",
            &source.engine_version,
            instance,
            if by_snapshot {
                CopyBy::Snapshot
            } else {
                CopyBy::Dump
            },
        )?;
        return Ok(Some(Seed::Fork {
            instance_id: source.id,
        }));
    }
    let backup = match &request.backup_id {
        Some(id) => backup_store::find(conn, &source.id, id)?
            .filter(|b| b.state == backup_state::SUCCEEDED)
            .ok_or_else(|| {
                ApiError::unprocessable(format!(
                    "Service instance {:?} has no succeeded backup {id:?}.",
                    request.instance_id
                ))
            })?,
        None => backup_store::latest_succeeded(conn, &source.id)?.ok_or_else(|| {
            ApiError::unprocessable(format!(
                "Service instance {:?} has no succeeded backup to clone from.",
                request.instance_id
            ))
        })?,
    };
    check_copy_version(
        "The backup",
        backup
            .engine_version
            .as_deref()
            .unwrap_or(&source.engine_version),
        instance,
        if backup.strategy.as_deref() == Some("snapshot") {
            CopyBy::Snapshot
        } else {
            CopyBy::Dump
        },
    )?;
    Ok(Some(Seed::Clone {
        instance_id: source.id,
        backup_id: backup.id,
    }))
}

/// How a copy carries its source's data to a new instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyBy {
    /// A data directory: only its own major version opens it.
    Snapshot,
    /// A dump: pg_restore loads one of its own or an older server, never a newer one.
    Dump,
}

/// Refuses now a PostgreSQL copy its operation could never make. `what` names the
/// source for the message. Versions that are not numbers are left to the operation.
fn check_copy_version(
    what: &str,
    source_version: &str,
    target: &Instance,
    by: CopyBy,
) -> Result<(), ApiError> {
    if target.engine != "postgresql" {
        return Ok(());
    }
    let (Some(from), Some(to)) = (
        postgres_major(source_version),
        postgres_major(&target.engine_version),
    ) else {
        return Ok(());
    };
    let opens = match by {
        CopyBy::Snapshot => from == to,
        CopyBy::Dump => from <= to,
    };
    if opens {
        return Ok(());
    }
    let (carried, choose) = match by {
        CopyBy::Snapshot => ("a snapshot", "the same version"),
        CopyBy::Dump => ("a dump", "the same version or a newer one"),
    };
    Err(ApiError::unprocessable(format!(
        "{what} is of postgresql {source_version}; this plan's postgresql {} cannot open {carried} \
         of it. Choose a plan of {choose}.",
        target.engine_version
    )))
}

/// PostgreSQL's major version: 15 of "15.4"; before 10, the first two numbers (9.6).
fn postgres_major(version: &str) -> Option<(u32, u32)> {
    let mut numbers = version.split('.').map(str::parse::<u32>);
    let first = numbers.next()?.ok()?;
    if first >= 10 {
        return Some((first, 0));
    }
    Some((first, numbers.next()?.ok()?))
}

/// `GET /v2/service_instances/{instance_id}`
pub async fn fetch_instance(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let found = state
        .store
        .run(move |conn| {
            let instance = instances::find(conn, &id)?;
            let busy = match &instance {
                Some(i) => operations::lifecycle_running_on_instance(conn, &i.id)?.is_some(),
                None => false,
            };
            Ok((instance, busy))
        })
        .await?;
    let instance = match found {
        (Some(instance), busy) => match instance.state.as_str() {
            instance_state::PROVISIONED if !busy => instance,
            instance_state::PROVISIONED | instance_state::DEPROVISIONING => {
                return Err(ApiError::concurrency(
                    "The service instance is being updated or deleted.",
                ));
            }
            instance_state::PROVISIONING => {
                return Err(ApiError::not_found(
                    "The service instance is still being provisioned.",
                ));
            }
            instance_state::FAILED => {
                return Err(ApiError::not_found(
                    "The service instance failed; it can only be deleted.",
                ));
            }
            _ => return Err(ApiError::not_found("There is no such service instance.")),
        },
        (None, _) => return Err(ApiError::not_found("There is no such service instance.")),
    };
    let mut body = json!({
        "service_id": instance.service_id,
        "plan_id": instance.plan_id,
        "parameters": stored_json(&instance.parameters)?,
    });
    if let Some(version) = instance.maintenance_version {
        body["maintenance_info"] = json!({ "version": version });
    }
    Ok(HttpResponse::Ok().json(body))
}

enum Updated {
    Accepted(String),
    Unchanged,
}

/// `PATCH /v2/service_instances/{instance_id}`
pub async fn update_instance(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?;
    let query: AsyncQuery = input::query(&req)?;
    let body: UpdateRequest = input::json_body(&req, payload).await?;
    let service_id = input::required("service_id", body.service_id.as_deref())?.to_owned();
    let service = known_service(&state, &service_id)?;
    if let Some(plan_id) = body.plan_id.as_deref() {
        known_plan(&state, &service_id, plan_id)?;
    }
    let requested_parameters = json_object("parameters", body.parameters)?;
    let target_plan_id = body.plan_id.clone();
    let maintenance = body.maintenance_info.and_then(|m| m.version);
    let accepts_incomplete = query.accepts_incomplete;
    let instance_id = id.to_string();
    let service_name = service.name.clone();
    let outcome = state
        .store
        .clone()
        .run({
            let state = state.clone();
            move |conn| {
                Ok(write_transaction(conn, |conn| {
                    instances::lock(conn, &instance_id)?;
                    let instance = instances::find(conn, &instance_id)?
                        .filter(|i| i.state != instance_state::DELETED)
                        .ok_or_else(|| ApiError::not_found("There is no such service instance."))?;
                    if instance.service_id != service_id {
                        return Err(ApiError::bad_request(format!(
                            "The instance belongs to another service than {service_name}."
                        )));
                    }
                    let (service, current_plan) =
                        known_plan(&state, &service_id, &instance.plan_id).map_err(|_| {
                            ApiError::unprocessable(
                                "The instance's plan is no longer in the catalog.",
                            )
                        })?;
                    let plan_id = target_plan_id
                        .clone()
                        .unwrap_or_else(|| instance.plan_id.clone());
                    let (_, plan) = known_plan(&state, &service_id, &plan_id)?;
                    if plan.id != current_plan.id && !current_plan.is_plan_updateable(service) {
                        return Err(ApiError::unprocessable(format!(
                            "Plan {} cannot be changed to another plan.",
                            current_plan.name
                        )));
                    }
                    // An update applies settings to the server the instance has; moving
                    // it to another engine, version or infrastructure would need a
                    // migration of its data, which an update does not do.
                    if plan.engine != instance.engine
                        || plan.engine_version != instance.engine_version
                        || plan.infrastructure != current_plan.infrastructure
                    {
                        return Err(ApiError::unprocessable(format!(
                            "Plan {} runs {} {} and the instance runs {} {}: a plan change \
                             cannot move an instance to another engine, version or \
                             infrastructure.",
                            plan.name,
                            plan.engine,
                            plan.engine_version,
                            instance.engine,
                            instance.engine_version
                        )));
                    }
                    if let Some(version) = maintenance.as_deref()
                        && plan.maintenance_version() != Some(version)
                    {
                        return Err(ApiError::maintenance_info_conflict());
                    }
                    refuse_unsupported_strategy(&state, plan)?;
                    let mut parameters = stored_json(&instance.parameters)?;
                    if let Some(requested) = &requested_parameters {
                        check_parameters(plan, ParametersFor::Update, requested)?;
                        if let Some(policy) = requested.get("backup_policy") {
                            // Takes effect at once; it needs no work on the server.
                            change_policy(conn, &instance, plan, policy)?;
                        }
                        if let (Some(current), Some(new)) =
                            (parameters.as_object_mut(), requested.as_object())
                        {
                            for (k, v) in new {
                                current.insert(k.clone(), v.clone());
                            }
                        }
                    }
                    let target = UpdatePayload {
                        plan_id: plan.id.clone(),
                        settings: plan_settings(plan, &parameters),
                        parameters,
                        maintenance_version: plan.maintenance_version().map(str::to_owned),
                    };
                    decide_update(conn, &instance, target, accepts_incomplete)
                }))
            }
        })
        .await??;
    match outcome {
        Updated::Accepted(operation) => {
            tracing::info!(instance_id = %id, operation, "Update accepted.");
            Ok(accepted(&state, &operation))
        }
        Updated::Unchanged => Ok(empty(StatusCode::OK)),
    }
}

/// Applies a `backup_policy` parameter to the instance's policy in force (the plan's
/// defaults if it has none yet).
fn change_policy(
    conn: &mut DbConnection,
    instance: &Instance,
    plan: &Plan,
    requested: &Value,
) -> Result<(), ApiError> {
    let request: PolicyRequest = serde_json::from_value(requested.clone())
        .map_err(|e| ApiError::bad_request(format!("backup_policy: {e}")))?;
    let current = match policies::find(conn, &instance.id)? {
        Some(row) => scheduler::stored_policy(&row)?,
        None => plan.backup.clone(),
    };
    let policy = request
        .apply_to(&current)
        .map_err(|e| ApiError::bad_request(format!("backup_policy: {e}")))?;
    scheduler::check_frequency(&policy).map_err(ApiError::bad_request)?;
    policies::upsert(
        conn,
        &scheduler::policy_row(&instance.id, &policy, chrono::Utc::now()),
    )?;
    Ok(())
}

fn decide_update(
    conn: &mut DbConnection,
    instance: &Instance,
    target: UpdatePayload,
    accepts_incomplete: bool,
) -> Result<Updated, ApiError> {
    match instance.state.as_str() {
        instance_state::PROVISIONED => {}
        instance_state::FAILED => {
            return Err(ApiError::unprocessable(
                "The service instance failed; it can only be deleted.",
            ));
        }
        _ => {
            return Err(ApiError::concurrency(
                "The service instance is being provisioned or deleted.",
            ));
        }
    }
    if let Some(running) = operations::running_on_instance(conn, &instance.id)? {
        let same = running.kind == kind::UPDATE
            && serde_json::from_str::<UpdatePayload>(&running.payload).ok() == Some(target.clone());
        return if same && !accepts_incomplete {
            Err(ApiError::async_required())
        } else if same {
            Ok(Updated::Accepted(running.id))
        } else {
            Err(ApiError::concurrency(
                "Another operation on this service instance is in progress.",
            ))
        };
    }
    if operations::any_in_progress_on_instance(conn, &instance.id)? {
        return Err(ApiError::concurrency(
            "A binding of this service instance is being created or deleted.",
        ));
    }
    let current_settings: BTreeMap<String, String> = serde_json::from_str(&instance.settings)
        .map_err(|e| {
            crate::error::Error::Inconsistent(format!("settings of instance {}: {e}", instance.id))
        })?;
    let unchanged = target.plan_id == instance.plan_id
        && target.parameters == stored_json(&instance.parameters)?
        && target.settings == current_settings
        && target.maintenance_version == instance.maintenance_version;
    if unchanged {
        return Ok(Updated::Unchanged);
    }
    if !accepts_incomplete {
        return Err(ApiError::async_required());
    }
    let payload = serde_json::to_string(&target)
        .map_err(|e| ApiError::from(crate::error::Error::Inconsistent(format!("payload: {e}"))))?;
    let operation = NewOperation::new(
        kind::UPDATE,
        &instance.id,
        None,
        payload,
        "Updating the service instance.",
        MAX_ATTEMPTS,
    );
    insert_operation(conn, &operation, INSTANCE_BUSY)?;
    Ok(Updated::Accepted(operation.id))
}

enum Deprovisioned {
    Accepted(String),
    Gone,
}

/// `DELETE /v2/service_instances/{instance_id}`
pub async fn deprovision_instance(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?;
    let query: DeleteQuery = input::query(&req)?;
    let service_id = input::required("service_id", query.service_id.as_deref())?.to_owned();
    let plan_id = input::required("plan_id", query.plan_id.as_deref())?.to_owned();
    // A plan the catalog no longer offers is still accepted for the instance that has it:
    // removing a plan must not make its instances undeletable.
    let catalog_check = known_plan(&state, &service_id, &plan_id).map(drop);
    let accepts_incomplete = query.accepts_incomplete;
    let instance_id = id.to_string();
    let outcome = state
        .store
        .run(move |conn| {
            Ok(write_transaction(conn, |conn| {
                instances::lock(conn, &instance_id)?;
                let Some(instance) = instances::find(conn, &instance_id)?
                    .filter(|i| i.state != instance_state::DELETED)
                else {
                    catalog_check?;
                    return Ok(Deprovisioned::Gone);
                };
                if instance.service_id != service_id {
                    return Err(ApiError::bad_request(
                        "The service_id does not match the service instance.",
                    ));
                }
                if instance.plan_id != plan_id {
                    catalog_check?;
                }
                if let Some(running) = operations::running_on_instance(conn, &instance.id)? {
                    return if running.kind == kind::DEPROVISION {
                        if !accepts_incomplete {
                            return Err(ApiError::async_required());
                        }
                        Ok(Deprovisioned::Accepted(running.id))
                    } else {
                        Err(ApiError::concurrency(
                            "Another operation on this service instance is in progress.",
                        ))
                    };
                }
                if operations::any_in_progress_on_instance(conn, &instance.id)? {
                    return Err(ApiError::concurrency(
                        "A binding of this service instance is being created or deleted.",
                    ));
                }
                if !accepts_incomplete {
                    return Err(ApiError::async_required());
                }
                let operation = NewOperation::new(
                    kind::DEPROVISION,
                    &instance.id,
                    None,
                    "{}".to_owned(),
                    "Deleting the service instance.",
                    MAX_ATTEMPTS,
                );
                insert_operation(conn, &operation, INSTANCE_BUSY)?;
                instances::set_state(conn, &instance.id, instance_state::DEPROVISIONING)?;
                Ok(Deprovisioned::Accepted(operation.id))
            }))
        })
        .await??;
    match outcome {
        Deprovisioned::Accepted(operation) => {
            tracing::info!(instance_id = %id, operation, "Deprovision accepted.");
            Ok(accepted(&state, &operation))
        }
        Deprovisioned::Gone => Ok(empty(StatusCode::GONE)),
    }
}

/// `GET /v2/service_instances/{instance_id}/last_operation`
pub async fn poll_last_operation(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let query: PollQuery = input::query(&req)?;
    if query.operation.as_deref() == Some("") {
        return Err(ApiError::bad_request("operation must not be empty."));
    }
    let (instance, operation) = state
        .store
        .run(move |conn| {
            let instance = instances::find(conn, &id)?;
            let operation = match (&instance, &query.operation) {
                (None, _) => None,
                (Some(_), Some(op_id)) => operations::find(conn, op_id)?,
                (Some(i), None) => operations::latest_for_instance(conn, &i.id)?,
            };
            let progress = match &operation {
                Some(op) if op.state == op_state::IN_PROGRESS => {
                    crate::backups::api::progress_note(conn, op)?
                }
                _ => None,
            };
            Ok((instance, operation.map(|op| (op, progress))))
        })
        .await?;
    let Some(instance) = instance else {
        return Err(ApiError::not_found("There is no such service instance."));
    };
    let (mut operation, progress) = operation
        .filter(|(op, _)| op.instance_id == instance.id && op.binding_id.is_none())
        .ok_or_else(|| {
            ApiError::bad_request("There is no such operation for this service instance.")
        })?;
    if let Some(progress) = progress {
        let base = operation.description.take().unwrap_or_default();
        operation.description = Some(format!("{base} {progress}").trim_start().to_owned());
    }
    if instance.state == instance_state::DELETED
        && operation.kind == kind::DEPROVISION
        && operation.state == op_state::SUCCEEDED
    {
        return Ok(empty(StatusCode::GONE));
    }
    Ok(last_operation(&operation))
}

#[cfg(test)]
mod tests {
    use phoenix_catalog::Catalog;

    use super::*;

    #[test]
    fn parameters_that_name_a_resource_override_it() {
        let catalog = Catalog::embedded().unwrap();
        let (_, plan) = catalog
            .plan("af04c3f7-aa32-4ef7-b443-c85b0e21dde4")
            .unwrap();
        let settings = plan_settings(plan, &json!({"max_connections": 80, "other": 1}));
        assert_eq!(settings["max_connections"], "80");
        assert_eq!(settings["shared_buffers"], "32MB");
        assert!(!settings.contains_key("other"));
        // A resource the schema does not offer stays as the operator set it.
        let settings = plan_settings(plan, &json!({"shared_buffers": "16GB"}));
        assert_eq!(settings["shared_buffers"], "32MB");
    }

    fn instance_of(engine_version: &str) -> Instance {
        Instance {
            id: "target".into(),
            service_id: "service".into(),
            plan_id: "plan".into(),
            state: instance_state::PROVISIONING.into(),
            parameters: "{}".into(),
            context: "{}".into(),
            organization_guid: None,
            space_guid: None,
            maintenance_version: None,
            engine: "postgresql".into(),
            engine_version: engine_version.into(),
            settings: "{}".into(),
            port: None,
            host: None,
            database_name: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn a_dump_goes_to_its_own_or_a_newer_major_and_a_snapshot_only_to_its_own() {
        let fifteen = instance_of("15");
        let check = |source: &str, target: &Instance, by| {
            check_copy_version("The backup", source, target, by).is_ok()
        };
        assert!(check("15", &fifteen, CopyBy::Dump));
        assert!(check("15.4", &fifteen, CopyBy::Dump));
        assert!(check("14", &fifteen, CopyBy::Dump));
        assert!(check("9.6", &fifteen, CopyBy::Dump));
        assert!(!check("16", &fifteen, CopyBy::Dump));
        assert!(check("15", &fifteen, CopyBy::Snapshot));
        assert!(!check("14", &fifteen, CopyBy::Snapshot));
        assert!(!check("16", &fifteen, CopyBy::Snapshot));
        // Before 10, a major version is two numbers.
        assert!(!check("9.6", &instance_of("9.5"), CopyBy::Dump));
        assert!(!check("9.5", &instance_of("9.6"), CopyBy::Snapshot));
        // What is not a version is left to the operation.
        assert!(check("devel", &fifteen, CopyBy::Snapshot));
        let refused = check_copy_version("The instance to fork", "16", &fifteen, CopyBy::Dump)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("The instance to fork is of postgresql 16"),
            "{refused}"
        );
    }
}
