//! Turning what a platform sends into validated values, at the edge: JSON bodies (size,
//! content type, shape), query strings and path IDs. Everything refused here is a 4xx
//! with a description that says what to fix; nothing has been changed yet.

use actix_web::HttpRequest;
use actix_web::http::header;
use actix_web::web;
use futures::StreamExt as _;
use phoenix_adapters::ids::{BindingId, InstanceId};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body the broker reads.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Reads a JSON body of at most [`MAX_BODY_BYTES`] into `T`. A missing Content-Type is
/// accepted (the spec allows it); any other type than JSON is refused.
///
/// # Errors
/// 400 for a wrong content type or malformed JSON, 413 for a body that is too large.
pub async fn json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<T, ApiError> {
    if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::unsupported_media_type());
        }
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::payload_too_large(MAX_BODY_BYTES));
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("Reading the body failed: {e}")))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::payload_too_large(MAX_BODY_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "The request body is empty; send a JSON object.",
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid: {e}.")))
}

/// Parses the query string into `T`.
///
/// # Errors
/// 400 naming the offending parameter.
pub fn query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::bad_request(format!("The query string is not valid: {e}.")))
}

/// The instance ID from the path.
///
/// # Errors
/// 400 when it is not 1 to 255 RFC 3986 unreserved characters.
pub fn instance_id(text: &str) -> Result<InstanceId, ApiError> {
    InstanceId::parse(text).map_err(invalid_id)
}

/// The binding ID from the path.
///
/// # Errors
/// 400 when it is not 1 to 255 RFC 3986 unreserved characters.
pub fn binding_id(text: &str) -> Result<BindingId, ApiError> {
    BindingId::parse(text).map_err(invalid_id)
}

fn invalid_id(error: phoenix_adapters::Error) -> ApiError {
    match error {
        phoenix_adapters::Error::Invalid(message) => {
            ApiError::bad_request(format!("Invalid ID: {message}."))
        }
        other => ApiError::bad_request(format!("Invalid ID: {other}.")),
    }
}

/// A required, non-empty string field.
///
/// # Errors
/// 400 naming the field.
pub fn required<'a>(name: &str, value: Option<&'a str>) -> Result<&'a str, ApiError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(ApiError::bad_request(format!("{name} must not be empty."))),
        None => Err(ApiError::bad_request(format!("{name} is missing."))),
    }
}

/// The `accepts_incomplete` query parameter (absent: false).
#[derive(Debug, serde::Deserialize)]
pub struct AsyncQuery {
    #[serde(default)]
    pub accepts_incomplete: bool,
}

/// Query parameters of `DELETE` requests.
#[derive(Debug, serde::Deserialize)]
pub struct DeleteQuery {
    #[serde(default)]
    pub accepts_incomplete: bool,
    pub service_id: Option<String>,
    pub plan_id: Option<String>,
}

/// Query parameters of `last_operation` requests.
#[derive(Debug, serde::Deserialize)]
pub struct PollQuery {
    pub service_id: Option<String>,
    pub plan_id: Option<String>,
    pub operation: Option<String>,
}
