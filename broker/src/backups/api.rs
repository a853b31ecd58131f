//! The backup API, an OSB extension under `/v2/service_instances/{instance_id}`:
//! backups, restores and the backup policy of one instance, documented by the OpenAPI
//! document at [`OPENAPI_PATH`].
//!
//! Same rules as the OSB routes: the version header, authentication (here also an
//! instance token, checked by the middleware), JSON errors, validation at the edge, and
//! decisions inside one write transaction that locks the instance. A backup and a restore
//! are operations of the instance, so the one-running-operation index makes a second
//! mutation (backup, restore, update, deprovision) a `ConcurrencyError`.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use phoenix_adapters::backup::{self, ManifestSource};
use phoenix_adapters::ids::{BackupId, InstanceId};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app_state::AppState;
use crate::backups::policy::PolicyRequest;
use crate::backups::scheduler;
use crate::error::ApiError;
use crate::osb::{MAX_ATTEMPTS, input, insert_operation};
use crate::store::backups::{self as backup_store, Backup, state as backup_state, trigger};
use crate::store::instances::{self, Instance, state as instance_state};
use crate::store::operations::{self, NewOperation, kind};
use crate::store::restores::{self, Restore};
use crate::store::{DbConnection, is_unique_violation, policies, write_transaction};

/// Where the OpenAPI document of this API is served.
pub const OPENAPI_PATH: &str = phoenix_catalog::BACKUP_API_DOCUMENT;

const OPENAPI: &str = include_str!("openapi.json");

const INSTANCE_BUSY: &str = "Another operation on this service instance is in progress \
                             (a backup, restore, update or deletion); retry when it ended.";

/// Registers the routes (inside the `/v2` scope, after its middleware).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/backup_api/openapi.json", web::get().to(openapi))
        .service(
            web::resource("/service_instances/{instance_id}/backups")
                .route(web::post().to(create_backup))
                .route(web::get().to(list_backups)),
        )
        .service(
            web::resource("/service_instances/{instance_id}/backups/{backup_id}")
                .route(web::get().to(show_backup))
                .route(web::delete().to(delete_backup)),
        )
        .route(
            "/service_instances/{instance_id}/backups/{backup_id}/download",
            web::get().to(download_backup),
        )
        .service(
            web::resource("/service_instances/{instance_id}/restores")
                .route(web::post().to(create_restore))
                .route(web::get().to(list_restores)),
        )
        .route(
            "/service_instances/{instance_id}/restores/{restore_id}",
            web::get().to(show_restore),
        )
        .service(
            web::resource("/service_instances/{instance_id}/backup_policy")
                .route(web::get().to(show_policy))
                .route(web::put().to(replace_policy)),
        );
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

fn time(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// A backup as the API shows it.
#[derive(Debug, Serialize)]
struct BackupView {
    backup_id: String,
    instance_id: String,
    state: String,
    trigger: String,
    strategy: Option<String>,
    engine: Option<String>,
    engine_version: Option<String>,
    format: Option<String>,
    raw_bytes: Option<i64>,
    stored_bytes: Option<i64>,
    sha256: Option<String>,
    created_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    progress: Option<serde_json::Value>,
    error: Option<String>,
}

impl From<Backup> for BackupView {
    fn from(b: Backup) -> Self {
        let progress = (b.state == backup_state::IN_PROGRESS).then(|| {
            json!({
                "raw_bytes": b.progress_raw_bytes.unwrap_or(0),
                "stored_bytes": b.progress_stored_bytes.unwrap_or(0),
            })
        });
        Self {
            backup_id: b.id,
            instance_id: b.instance_id,
            state: b.state,
            trigger: b.triggered_by,
            strategy: b.strategy,
            engine: b.engine,
            engine_version: b.engine_version,
            format: b.format,
            raw_bytes: b.raw_bytes,
            stored_bytes: b.stored_bytes,
            sha256: b.sha256,
            created_at: time(b.created_at),
            started_at: b.started_at.and_then(time),
            finished_at: b.finished_at.and_then(time),
            progress,
            error: b.error,
        }
    }
}

/// A restore as the API shows it.
#[derive(Debug, Serialize)]
struct RestoreView {
    restore_id: String,
    instance_id: String,
    backup_id: String,
    source_instance_id: String,
    state: String,
    created_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    progress: Option<serde_json::Value>,
    error: Option<String>,
}

impl From<Restore> for RestoreView {
    fn from(r: Restore) -> Self {
        let progress = (r.state == operations::state::IN_PROGRESS).then(|| {
            json!({
                "phase": r.phase.as_deref().unwrap_or(restores::phase::RESTORING),
                "raw_bytes": r.progress_raw_bytes.unwrap_or(0),
                "stored_bytes": r.progress_stored_bytes.unwrap_or(0),
            })
        });
        Self {
            restore_id: r.id,
            instance_id: r.instance_id,
            backup_id: r.backup_id,
            source_instance_id: r.source_instance_id,
            state: r.state,
            created_at: time(r.created_at),
            finished_at: r.finished_at.and_then(time),
            progress,
            error: r.error,
        }
    }
}

/// What a running backup or restore has done so far, for `last_operation`
/// ("Restored 120.0 MB of 480.5 MB."); None for other operations.
///
/// # Errors
/// When the store fails.
pub fn progress_note(
    conn: &mut DbConnection,
    operation: &operations::Operation,
) -> Result<Option<String>, crate::error::Error> {
    let mb = |bytes: Option<i64>| bytes.unwrap_or(0) as f64 / 1e6;
    Ok(match operation.kind.as_str() {
        kind::BACKUP => backup_store::find_by_operation(conn, &operation.id)?.map(|b| {
            format!(
                "{:.1} MB dumped, {:.1} MB stored.",
                mb(b.progress_raw_bytes),
                mb(b.progress_stored_bytes)
            )
        }),
        kind::RESTORE => {
            restores::find_by_operation(conn, &operation.id)?.map(|r| match r.phase.as_deref() {
                Some(restores::phase::SWAPPING) => {
                    "Restored; swapping the restored data in.".to_owned()
                }
                _ => format!(
                    "{:.1} MB of the backup read, {:.1} MB restored.",
                    mb(r.progress_stored_bytes),
                    mb(r.progress_raw_bytes)
                ),
            })
        }
        _ => None,
    })
}

/// The instance of a request path, which must exist (deleted instances included: their
/// backups stay readable until retention removes them).
fn known_instance(conn: &mut DbConnection, id: &str) -> Result<Instance, ApiError> {
    instances::find(conn, id)?
        .ok_or_else(|| ApiError::not_found("There is no such service instance."))
}

/// Runs `read` about the instance `id` on the store, after checking that it exists
/// (404 otherwise).
async fn read_about<T, F>(state: &AppState, id: String, read: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut DbConnection, &str) -> Result<T, ApiError> + Send + 'static,
{
    state
        .store
        .run(move |conn| Ok(known_instance(conn, &id).and_then(|_| read(conn, &id))))
        .await?
}

/// The instance must serve to be backed up or restored into.
fn serving(instance: &Instance) -> Result<(), ApiError> {
    match instance.state.as_str() {
        instance_state::PROVISIONED => Ok(()),
        instance_state::PROVISIONING | instance_state::DEPROVISIONING => {
            Err(ApiError::concurrency(INSTANCE_BUSY))
        }
        _ => Err(ApiError::unprocessable(
            "The service instance failed or was deleted; it has no data to back up or \
             restore into.",
        )),
    }
}

/// `POST /v2/service_instances/{instance_id}/backups`
async fn create_backup(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let backup = state
        .store
        .run(move |conn| {
            Ok(write_transaction(conn, |conn| {
                instances::lock(conn, &id)?;
                let instance = known_instance(conn, &id)?;
                serving(&instance)?;
                start_backup(conn, &instance.id, trigger::MANUAL)?
                    .ok_or_else(|| ApiError::concurrency(INSTANCE_BUSY))
            }))
        })
        .await??;
    state.wake.notify_waiters();
    tracing::info!(instance_id = %backup.instance_id, backup_id = %backup.id, "Backup accepted.");
    Ok(HttpResponse::Accepted().json(json!({"backup_id": backup.id, "state": backup.state})))
}

/// Creates a backup record and the operation that takes it (the caller locked the
/// instance); None when an operation is running on the instance.
pub(crate) fn start_backup(
    conn: &mut DbConnection,
    instance_id: &str,
    triggered_by: &str,
) -> Result<Option<Backup>, crate::error::Error> {
    if operations::running_on_instance(conn, instance_id)?.is_some() {
        return Ok(None);
    }
    let operation = NewOperation::new(
        kind::BACKUP,
        instance_id,
        None,
        "{}".to_owned(),
        "Backing up the service instance.",
        MAX_ATTEMPTS,
    );
    match operations::insert(conn, &operation) {
        Ok(()) => {}
        Err(e) if is_unique_violation(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let backup = Backup::new(instance_id, &operation.id, triggered_by);
    backup_store::insert(conn, &backup)?;
    Ok(Some(backup))
}

/// `GET /v2/service_instances/{instance_id}/backups`
async fn list_backups(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let backups = read_about(&state, id, |conn, id| Ok(backup_store::list(conn, id)?)).await?;
    let views: Vec<BackupView> = backups.into_iter().map(BackupView::from).collect();
    Ok(HttpResponse::Ok().json(json!({ "backups": views })))
}

/// The backup of a request path.
async fn find_backup(
    state: &AppState,
    instance_id: &str,
    backup_id: &str,
) -> Result<Backup, ApiError> {
    let backup_id = backup_id.to_owned();
    read_about(state, instance_id.to_owned(), move |conn, id| {
        backup_store::find(conn, id, &backup_id)?
            .ok_or_else(|| ApiError::not_found("There is no such backup."))
    })
    .await
}

fn backup_path(path: &(String, String)) -> Result<(InstanceId, BackupId), ApiError> {
    let instance = input::instance_id(&path.0)?;
    let backup =
        BackupId::parse(&path.1).map_err(|_| ApiError::not_found("There is no such backup."))?;
    Ok((instance, backup))
}

/// `GET /v2/service_instances/{instance_id}/backups/{backup_id}`
async fn show_backup(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (instance, backup) = backup_path(&path)?;
    let found = find_backup(&state, instance.as_str(), backup.as_str()).await?;
    Ok(HttpResponse::Ok().json(BackupView::from(found)))
}

/// `DELETE /v2/service_instances/{instance_id}/backups/{backup_id}`: storage first, the
/// record second. When storage fails, the backup is already hidden and the retention
/// sweep finishes the deletion (202).
async fn delete_backup(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (instance, backup) = backup_path(&path)?;
    let found = find_backup(&state, instance.as_str(), backup.as_str()).await?;
    if found.state == backup_state::IN_PROGRESS {
        return Err(ApiError::concurrency(
            "The backup is still being taken; delete it when it ended.",
        ));
    }
    let (id, instance_id) = (found.id.clone(), found.instance_id.clone());
    state
        .store
        .run(move |conn| {
            Ok(write_transaction(conn, |conn| {
                instances::lock(conn, &instance_id)?;
                if scheduler::backups_in_use(conn)?.contains(&id) {
                    return Err(ApiError::concurrency(
                        "A restore or clone is reading this backup; delete it when it ended.",
                    ));
                }
                if backup_store::mark_deleting(conn, &id)? {
                    Ok(())
                } else {
                    Err(ApiError::not_found("There is no such backup."))
                }
            }))
        })
        .await??;
    match scheduler::remove_backup(&state, &found).await {
        Ok(()) => {
            tracing::info!(instance_id = %instance, backup_id = %backup, "Backup deleted.");
            Ok(HttpResponse::Ok().json(json!({})))
        }
        Err(error) => {
            tracing::warn!(instance_id = %instance, backup_id = %backup, error = %crate::error::cause_chain(&error), "Deleting a backup's data failed; retention retries.");
            Ok(HttpResponse::Accepted().json(json!({
                "description": "The backup is deleted; its data is removed from storage shortly."
            })))
        }
    }
}

/// `GET /v2/service_instances/{instance_id}/backups/{backup_id}/download`: the stored
/// (encrypted) data object, streamed; `phoenix decrypt` opens it offline.
async fn download_backup(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (instance, backup) = backup_path(&path)?;
    let found = find_backup(&state, instance.as_str(), backup.as_str()).await?;
    if found.state != backup_state::SUCCEEDED {
        return Err(ApiError::unprocessable(
            "Only a succeeded backup can be downloaded.",
        ));
    }
    let storage = state.backup_store.as_ref();
    let manifest = backup::read_manifest(storage, &instance, &backup)
        .await
        .map_err(storage_error)?;
    if matches!(manifest.source, ManifestSource::Reference { .. }) {
        return Err(ApiError::unprocessable(
            "This backup is a snapshot kept on its infrastructure; it has no stream to \
             download (a plan with shipped snapshots or stream backups has).",
        ));
    }
    let key = backup::manifest_data_object(&manifest).map_err(storage_error)?;
    let body = storage.get(&key).await.map_err(storage_error)?;
    let mut response = HttpResponse::Ok();
    response.content_type("application/octet-stream");
    response.insert_header((
        "Content-Disposition",
        format!("attachment; filename=\"{backup}.phoenix\""),
    ));
    if let Some(digest) = &manifest.digest {
        response.insert_header(("X-Phoenix-Backup-Sha256", digest.value.clone()));
    }
    let length = manifest.stored_bytes;
    // A storage failure mid-way ends the body early: the client sees fewer bytes than
    // Content-Length (and a wrong digest), never a short file taken for whole.
    Ok(response.no_chunking(length).streaming(body.map_err(|e| {
        tracing::warn!(error = %e, "Streaming a backup download failed.");
        std::io::Error::other(e)
    })))
}

fn storage_error(error: phoenix_adapters::Error) -> ApiError {
    if error.is_not_found() {
        return ApiError::unprocessable(
            "The backup is recorded but its data is not in backup storage.",
        );
    }
    tracing::warn!(error = %crate::error::cause_chain(&error), "Backup storage failed.");
    ApiError::unavailable("Backup storage is not available; retry later.")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    backup_id: Option<String>,
}

/// `POST /v2/service_instances/{instance_id}/restores`
async fn create_restore(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let body: RestoreRequest = input::json_body(&req, payload).await?;
    let backup_id = input::required("backup_id", body.backup_id.as_deref())?.to_owned();
    let restore = state
        .store
        .run(move |conn| {
            Ok(write_transaction(conn, |conn| {
                instances::lock(conn, &id)?;
                let instance = known_instance(conn, &id)?;
                serving(&instance)?;
                let backup = backup_store::find(conn, &id, &backup_id)?
                    .filter(|b| b.state == backup_state::SUCCEEDED)
                    .ok_or_else(|| {
                        ApiError::unprocessable(
                            "There is no succeeded backup with this backup_id for this instance.",
                        )
                    })?;
                if operations::running_on_instance(conn, &id)?.is_some() {
                    return Err(ApiError::concurrency(INSTANCE_BUSY));
                }
                let operation = NewOperation::new(
                    kind::RESTORE,
                    &id,
                    None,
                    "{}".to_owned(),
                    "Restoring a backup into the service instance.",
                    MAX_ATTEMPTS,
                );
                insert_operation(conn, &operation, INSTANCE_BUSY)?;
                let restore = Restore::new(&id, &backup.id, &backup.instance_id, &operation.id);
                restores::insert(conn, &restore)?;
                Ok(restore)
            }))
        })
        .await??;
    state.wake.notify_waiters();
    tracing::info!(instance_id = %restore.instance_id, restore_id = %restore.id, backup_id = %restore.backup_id, "Restore accepted.");
    Ok(HttpResponse::Accepted().json(json!({"restore_id": restore.id, "state": restore.state})))
}

/// `GET /v2/service_instances/{instance_id}/restores`
async fn list_restores(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let found = read_about(&state, id, |conn, id| Ok(restores::list(conn, id)?)).await?;
    let views: Vec<RestoreView> = found.into_iter().map(RestoreView::from).collect();
    Ok(HttpResponse::Ok().json(json!({ "restores": views })))
}

/// `GET /v2/service_instances/{instance_id}/restores/{restore_id}`
async fn show_restore(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path.0)?.to_string();
    let restore_id = path.1.clone();
    let found = read_about(&state, id, move |conn, id| {
        restores::find(conn, id, &restore_id)?
            .ok_or_else(|| ApiError::not_found("There is no such restore."))
    })
    .await?;
    Ok(HttpResponse::Ok().json(RestoreView::from(found)))
}

/// `GET /v2/service_instances/{instance_id}/backup_policy`
async fn show_policy(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let row = read_about(&state, id, |conn, id| Ok(policies::find(conn, id)?)).await?;
    let policy = row
        .as_ref()
        .map(scheduler::stored_policy)
        .transpose()?
        .unwrap_or_default();
    Ok(HttpResponse::Ok().json(policy))
}

/// `PUT /v2/service_instances/{instance_id}/backup_policy`: the fields given replace
/// those of the policy in force (a complete policy replaces it outright).
async fn replace_policy(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = input::instance_id(&path)?.to_string();
    let request: PolicyRequest = input::json_body(&req, payload).await?;
    let policy = state
        .store
        .run(move |conn| {
            Ok(write_transaction(conn, |conn| {
                instances::lock(conn, &id)?;
                let instance = known_instance(conn, &id)?;
                if instance.state != instance_state::PROVISIONED {
                    return Err(ApiError::unprocessable(
                        "Only the policy of a service instance that serves can be changed.",
                    ));
                }
                let current = policies::find(conn, &id)?
                    .as_ref()
                    .map(scheduler::stored_policy)
                    .transpose()?
                    .unwrap_or_default();
                let policy = request.apply_to(&current).map_err(ApiError::bad_request)?;
                scheduler::check_frequency(&policy).map_err(ApiError::bad_request)?;
                policies::upsert(conn, &scheduler::policy_row(&id, &policy, Utc::now()))?;
                Ok(policy)
            }))
        })
        .await??;
    Ok(HttpResponse::build(StatusCode::OK).json(policy))
}
