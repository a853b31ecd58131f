//! Request middleware: request identity, structured request logs and metrics for every
//! route; authentication (the platform's basic credentials, or a backup API token on its
//! instance's backup API) and the API version check for the `/v2` routes.
//!
//! Credentials are compared in constant time. Nothing here logs a header's secret part:
//! the `Authorization` header is never logged.

use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{ResponseError as _, web};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use subtle::ConstantTimeEq as _;
use tracing::Instrument as _;

use crate::app_state::AppState;
use crate::backups::tokens;
use crate::error::ApiError;
use crate::store::tokens as token_store;

/// SHA-256 of a credential, for a comparison in constant time.
fn digest(value: &str) -> [u8; 32] {
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(hash.as_ref());
    out
}

const REQUEST_IDENTITY: &str = "x-broker-api-request-identity";
const ORIGINATING_IDENTITY: &str = "x-broker-api-originating-identity";
const API_VERSION: &str = "x-broker-api-version";

/// Oldest OSB minor version of major 2 the broker accepts (fetch endpoints, async bind).
const MIN_MINOR: u32 = 13;

/// The platform user behind a request, from `X-Broker-API-Originating-Identity`.
#[derive(Debug, Clone)]
pub struct OriginatingIdentity {
    pub platform: String,
    /// The decoded JSON value (for example `{"user_id": "..."}`).
    pub value: serde_json::Value,
}

/// Parses `Platform base64(JSON)`; None when absent or malformed.
pub fn parse_originating_identity(text: &str) -> Option<OriginatingIdentity> {
    let (platform, encoded) = text.trim().split_once(' ')?;
    if platform.is_empty() {
        return None;
    }
    let decoded = BASE64.decode(encoded.trim()).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&decoded).ok()?;
    value.is_object().then(|| OriginatingIdentity {
        platform: platform.to_owned(),
        value,
    })
}

/// Logs each request with its identities, echoes the request identity and counts the
/// request in `phoenix_http_requests_total`.
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(REQUEST_IDENTITY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let origin_header = req
        .headers()
        .get(ORIGINATING_IDENTITY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let origin = origin_header
        .as_deref()
        .and_then(parse_originating_identity);
    let span = tracing::info_span!(
        "request",
        request_id = request_id.as_deref().unwrap_or("-"),
        method = %req.method(),
        path = %req.path(),
        platform = origin.as_ref().map(|o| o.platform.as_str()),
        user = origin.as_ref().map(|o| o.value.to_string()),
    );
    if origin_header.is_some() && origin.is_none() {
        span.in_scope(|| {
            tracing::warn!("Ignoring a malformed X-Broker-API-Originating-Identity header.");
        });
    }
    let method = req.method().to_string();
    // Routing needs the only reference to the request: never clone it before `next`.
    // Every handler and middleware of this app answers errors as responses, so an `Err`
    // here is actix's own and passes through unchanged.
    let mut response = next.call(req).instrument(span.clone()).await?;
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(REQUEST_IDENTITY), id);
    }
    let status = response.status().as_u16();
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    metrics::counter!(
        "phoenix_http_requests_total",
        "route" => route,
        "method" => method,
        "status" => status.to_string()
    )
    .increment(1);
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    span.in_scope(|| tracing::info!(status, elapsed_ms, "Request handled."));
    Ok(response)
}

/// Refuses requests without valid credentials: the platform's basic credentials open
/// every route (when configured; without them the loopback broker is open), a backup
/// API token opens the backup API of its own instance only (401 for an unknown token,
/// 403 for another instance's).
pub async fn require_credentials(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let verdict = match req.app_data::<web::Data<AppState>>() {
        Some(state) => {
            let authorization = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            authorize(state, req.path(), authorization).await
        }
        None => Err(ApiError::unauthorized()),
    };
    if let Err(error) = verdict {
        let response = error.error_response();
        return Ok(req.into_response(response).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

async fn authorize(
    state: &AppState,
    path: &str,
    authorization: Option<&str>,
) -> Result<(), ApiError> {
    if let Some(token) = authorization.and_then(tokens::bearer) {
        let Some(scope) = backup_api_scope(path) else {
            return Err(ApiError::unauthorized());
        };
        // Looked up by its SHA-256: the lookup time says nothing of the token itself.
        let digest = tokens::token_digest(token);
        let opens = state
            .store
            .run(move |conn| Ok(token_store::instance_of(conn, &digest)?))
            .await?;
        return match (opens, scope) {
            (None, _) => Err(ApiError::unauthorized()),
            (Some(_), BackupApiScope::Document) => Ok(()),
            (Some(opens), BackupApiScope::Instance(wanted)) if opens == wanted => Ok(()),
            (Some(_), BackupApiScope::Instance(_)) => Err(ApiError::forbidden(
                "This token opens the backup API of another service instance only.",
            )),
        };
    }
    let Some(expected) = &state.settings.credentials else {
        return Ok(());
    };
    let given = authorization.and_then(decode_basic);
    let ok = given.is_some_and(|(user, password)| {
        // Digests of equal length: comparing the raw values would tell their length.
        let user_ok = digest(&user).ct_eq(&digest(&expected.username));
        let password_ok = digest(&password).ct_eq(&digest(&expected.password));
        bool::from(user_ok & password_ok)
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// What a backup API token may reach on a path.
#[derive(Debug, PartialEq, Eq)]
enum BackupApiScope<'a> {
    /// The backup API of this instance (the raw path segment).
    Instance(&'a str),
    /// The backup API's OpenAPI document.
    Document,
}

/// The backup API scope of a request path; None for every other route (OSB routes are
/// the platform's only).
fn backup_api_scope(path: &str) -> Option<BackupApiScope<'_>> {
    if path == crate::backups::api::OPENAPI_PATH {
        return Some(BackupApiScope::Document);
    }
    let rest = path.strip_prefix("/v2/service_instances/")?;
    let (instance, rest) = rest.split_once('/')?;
    let section = rest.split('/').next()?;
    (!instance.is_empty() && ["backups", "restores", "backup_policy"].contains(&section))
        .then_some(BackupApiScope::Instance(instance))
}

fn decode_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Refuses OSB requests without a supported `X-Broker-API-Version` (412).
pub async fn require_api_version(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let version = req
        .headers()
        .get(API_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Err(error) = check_api_version(version.as_deref()) {
        let response = error.error_response();
        return Ok(req.into_response(response).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn check_api_version(version: Option<&str>) -> Result<(), ApiError> {
    let Some(version) = version else {
        return Err(ApiError::precondition_failed(format!(
            "The X-Broker-API-Version header is missing; this broker speaks 2.{MIN_MINOR} to 2.17."
        )));
    };
    let supported = version
        .trim()
        .split_once('.')
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)))
        .is_some_and(|(major, minor)| major == 2 && minor >= MIN_MINOR);
    if supported {
        Ok(())
    } else {
        Err(ApiError::precondition_failed(format!(
            "X-Broker-API-Version {version:?} is not supported; this broker speaks 2.{MIN_MINOR} to 2.17."
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_from_2_13_of_major_2_are_accepted() {
        for ok in ["2.13", "2.14", "2.17", "2.20"] {
            assert!(check_api_version(Some(ok)).is_ok(), "{ok}");
        }
        for bad in [
            None,
            Some(""),
            Some("2.12"),
            Some("3.0"),
            Some("1.17"),
            Some("two"),
        ] {
            assert!(check_api_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn originating_identity_is_platform_and_base64_json() {
        let value = BASE64.encode(br#"{"user_id":"683ea748"}"#);
        let parsed = parse_originating_identity(&format!("cloudfoundry {value}")).unwrap();
        assert_eq!(parsed.platform, "cloudfoundry");
        assert_eq!(parsed.value["user_id"], "683ea748");
        assert!(parse_originating_identity("cloudfoundry").is_none());
        assert!(parse_originating_identity("cloudfoundry !!!").is_none());
        let not_object = BASE64.encode(b"42");
        assert!(parse_originating_identity(&format!("k8s {not_object}")).is_none());
    }

    #[test]
    fn tokens_reach_only_the_backup_api_of_an_instance_and_its_document() {
        let scope = |p| backup_api_scope(p);
        assert_eq!(
            scope("/v2/service_instances/a/backups"),
            Some(BackupApiScope::Instance("a"))
        );
        assert_eq!(
            scope("/v2/service_instances/a/backups/b/download"),
            Some(BackupApiScope::Instance("a"))
        );
        assert_eq!(
            scope("/v2/service_instances/a/restores"),
            Some(BackupApiScope::Instance("a"))
        );
        assert_eq!(
            scope("/v2/service_instances/a/backup_policy"),
            Some(BackupApiScope::Instance("a"))
        );
        assert_eq!(
            scope("/v2/backup_api/openapi.json"),
            Some(BackupApiScope::Document)
        );
        for osb in [
            "/v2/catalog",
            "/v2/service_instances/a",
            "/v2/service_instances/a/last_operation",
            "/v2/service_instances/a/service_bindings/b",
            "/v2/service_instances//backups",
            "/v2/service_instances/a/backupsx",
        ] {
            assert_eq!(scope(osb), None, "{osb}");
        }
    }

    #[test]
    fn basic_credentials_are_decoded() {
        let header = format!("Basic {}", BASE64.encode("user:pa:ss"));
        assert_eq!(
            decode_basic(&header),
            Some(("user".to_owned(), "pa:ss".to_owned()))
        );
        assert!(decode_basic("Bearer abc").is_none());
    }
}
