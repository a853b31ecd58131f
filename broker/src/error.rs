//! Errors of the broker.
//!
//! Policy:
//! - [`Error`] is the crate's one error enum: configuration, state store, adapters,
//!   I/O. Startup, the store, the workers and the supervisor return it. It may carry
//!   internal detail (SQL, paths) for the logs; it never carries a secret.
//! - [`ApiError`] is the only type an HTTP handler returns as an error. It implements
//!   actix's `ResponseError` and maps to the OSB spec's status codes and `error` strings
//!   (`AsyncRequired`, `ConcurrencyError`, `MaintenanceInfoConflict`, ...). Client
//!   mistakes (4xx) carry a user-facing description written where they are detected. An
//!   [`Error`] that reaches a handler becomes a 500 whose body says only that the broker
//!   failed: the whole cause chain goes to the log, never into the response.
//! - The people's CLI (`phoenix backup|restore|policy`, [`crate::client`]) returns
//!   [`Error`] too: [`Error::Usage`] for a command line or key file it cannot use (exit
//!   status 2), [`Error::Refused`] for the broker's own error answer (its `description`
//!   shown as is), [`Error::Unreachable`] and [`Error::Protocol`] for a broker that cannot
//!   be reached or answers outside the contract, [`Error::Download`] for a download that
//!   does not match its size or digest, [`Error::Interrupted`] for Ctrl-C (exit status
//!   130, as a shell reports SIGINT). None of them ever holds a token or password.

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// Everything that can fail inside the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is incomplete, contradictory or malformed.
    #[error("configuration: {0}")]
    Config(String),

    /// The catalog could not be loaded.
    #[error(transparent)]
    Catalog(#[from] phoenix_catalog::Error),

    /// A state store query failed.
    #[error("state store query: {0}")]
    Database(#[from] diesel::result::Error),

    /// No state store connection could be had.
    #[error("state store connection: {0}")]
    Pool(#[from] diesel::r2d2::PoolError),

    /// The state store could not be reached.
    #[error("connecting to the state store: {0}")]
    Connection(#[from] diesel::ConnectionError),

    /// A state store migration failed.
    #[error("state store migration: {0}")]
    Migration(String),

    /// An engine, infrastructure or key operation failed.
    #[error(transparent)]
    Adapters(#[from] phoenix_adapters::Error),

    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// Stored state is not what the broker wrote (a missing row, unreadable JSON).
    #[error("inconsistent state: {0}")]
    Inconsistent(String),

    /// A blocking task panicked or was cancelled.
    #[error("blocking task: {0}")]
    Blocking(String),

    /// The CLI's command line or key file cannot be used.
    #[error("{0}")]
    Usage(String),

    /// The broker could not be reached, or the connection broke during a request.
    /// `url` never holds credentials: the CLI refuses URLs with a user or password.
    #[error("cannot reach the broker at {url}: {reason}")]
    Unreachable { url: String, reason: String },

    /// The broker refused a request; `description` is its own words.
    #[error("{description} (HTTP {status}{})", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Refused {
        status: u16,
        code: Option<String>,
        description: String,
    },

    /// The broker answered something the Backup API contract does not allow.
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),

    /// A downloaded backup does not match its announced size or SHA-256.
    #[error("download failed its check: {0}")]
    Download(String),

    /// The user stopped the command (Ctrl-C); what it leaves behind is said.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    /// True when repeating the same work cannot succeed: a refused argument, a broken
    /// configuration, inconsistent stored state. Operations fail at once on these.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::Inconsistent(_)
                | Self::Adapters(
                    phoenix_adapters::Error::Invalid(_)
                        | phoenix_adapters::Error::Integrity(_)
                        | phoenix_adapters::Error::WrongKey
                        | phoenix_adapters::Error::NotFound { .. }
                )
        )
    }

    /// What a user may be told of this error: the kinds whose text the adapters write
    /// for people and that name nothing internal (a damaged backup, a wrong key, a
    /// missing backup, a refused argument). None for the rest: their cause goes to the log.
    pub fn user_summary(&self) -> Option<String> {
        use phoenix_adapters::Error as A;
        match self {
            Self::Adapters(A::Integrity(detail)) => {
                Some(format!("the backup is damaged or was altered ({detail})."))
            }
            Self::Adapters(A::WrongKey) => {
                Some("the broker's keys do not open this backup.".to_owned())
            }
            Self::Adapters(A::NotFound { .. }) => {
                Some("the backup is not in backup storage.".to_owned())
            }
            Self::Adapters(A::Invalid(detail)) => Some(format!("{detail}.")),
            _ => None,
        }
    }

    /// An I/O error with the context of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// An OSB error response: a status, an error code and a description.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    /// The spec's code (`AsyncRequired`, ...) where it has one; otherwise the body's
    /// `error` is the status's name (see [`ApiError::code`]).
    code: Option<&'static str>,
    description: String,
    /// Boxed: an error answer stays small on every handler's return path.
    cause: Option<Box<Error>>,
    /// A write lost a race on a unique key; the whole decision may be taken again.
    contended: bool,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    description: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: Option<&'static str>, description: impl Into<String>) -> Self {
        Self {
            status,
            code,
            description: description.into(),
            cause: None,
            contended: false,
        }
    }

    /// A `ConcurrencyError` for a write that lost a race on a unique key: another
    /// request created the same row or took the same port first.
    pub fn contended() -> Self {
        Self {
            contended: true,
            ..Self::concurrency("Another request for this resource is being processed; retry.")
        }
    }

    /// True for [`contended`](Self::contended) errors.
    pub fn is_contended(&self) -> bool {
        self.contended
    }

    /// 400: the request is malformed or misses mandatory data.
    pub fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, None, description)
    }

    /// 401: missing or wrong credentials.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            None,
            "Missing or wrong credentials: use HTTP basic authentication, or a backup API \
             token on its instance's backup API.",
        )
    }

    /// 403: the credentials are valid but do not open this resource.
    pub fn forbidden(description: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, Some("Forbidden"), description)
    }

    /// 503: a service the broker depends on (backup storage) failed; retry later.
    pub fn unavailable(description: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, None, description)
    }

    /// 404: the resource does not exist (or is not ready to be fetched).
    pub fn not_found(description: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, None, description)
    }

    /// 409: the resource exists with different attributes.
    pub fn conflict(description: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, None, description)
    }

    /// 412: the X-Broker-API-Version header is missing or unsupported.
    pub fn precondition_failed(description: impl Into<String>) -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, None, description)
    }

    /// 413: the body is larger than the broker accepts.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            format!("The request body is larger than {limit} bytes."),
        )
    }

    /// 400 (as the spec asks, not 415): the body is not declared as JSON.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            None,
            "The request body must be JSON (Content-Type: application/json).",
        )
    }

    /// 422 `AsyncRequired`.
    pub fn async_required() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("AsyncRequired"),
            "This service plan requires client support for asynchronous service operations.",
        )
    }

    /// 422 `ConcurrencyError`.
    pub fn concurrency(description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("ConcurrencyError"),
            description,
        )
    }

    /// 422 `MaintenanceInfoConflict`.
    pub fn maintenance_info_conflict() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("MaintenanceInfoConflict"),
            "The maintenance information for the requested service plan has changed; \
             fetch the catalog again.",
        )
    }

    /// 422 without a spec error code: the request is understood but cannot be done.
    pub fn unprocessable(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, None, description)
    }

    /// 404 for an unknown route.
    pub fn no_route() -> Self {
        Self::not_found("There is no such endpoint.")
    }

    /// 405 for a known route with another method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            "This endpoint does not support this method.",
        )
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body's `error`: the spec's code, or the status's name in the spec's camel case,
    /// so that every error body has both `error` and `description`.
    fn code(&self) -> &'static str {
        if let Some(code) = self.code {
            return code;
        }
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequest",
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
            StatusCode::CONFLICT => "Conflict",
            StatusCode::PRECONDITION_FAILED => "PreconditionFailed",
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLarge",
            StatusCode::UNPROCESSABLE_ENTITY => "UnprocessableEntity",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
            _ => "InternalError",
        }
    }
}

impl From<Error> for ApiError {
    fn from(cause: Error) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: None,
            description: "The broker failed to handle this request; its logs say why.".into(),
            cause: Some(Box::new(cause)),
            contended: false,
        }
    }
}

impl From<diesel::result::Error> for ApiError {
    fn from(cause: diesel::result::Error) -> Self {
        Error::from(cause).into()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.description)
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// The whole chain of causes, outermost first, for the log.
pub fn cause_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        if let Some(cause) = &self.cause {
            tracing::error!(error = %cause_chain(cause), "Request failed.");
        } else {
            tracing::info!(
                status = self.status.as_u16(),
                error = self.code(),
                description = %self.description,
                "Request refused."
            );
        }
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header(("WWW-Authenticate", "Basic realm=\"phoenix\""));
        }
        response.json(ErrorBody {
            error: self.code(),
            description: &self.description,
        })
    }
}

#[cfg(test)]
mod tests {
    use actix_web::body::to_bytes;

    use super::*;

    async fn body_of(error: ApiError) -> serde_json::Value {
        let bytes = to_bytes(error.error_response().into_body()).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[actix_web::test]
    async fn spec_errors_carry_their_code_and_a_description() {
        insta::assert_json_snapshot!(body_of(ApiError::async_required()).await, @r#"
        {
          "description": "This service plan requires client support for asynchronous service operations.",
          "error": "AsyncRequired"
        }
        "#);
        let body = body_of(ApiError::concurrency("busy")).await;
        assert_eq!(body["error"], "ConcurrencyError");
        let body = body_of(ApiError::maintenance_info_conflict()).await;
        assert_eq!(body["error"], "MaintenanceInfoConflict");
    }

    #[actix_web::test]
    async fn errors_without_a_spec_code_name_their_status() {
        let body = body_of(ApiError::bad_request("no plan_id")).await;
        assert_eq!(body["error"], "BadRequest");
        assert_eq!(body["description"], "no plan_id");
        assert_eq!(
            body_of(ApiError::unauthorized()).await["error"],
            "Unauthorized"
        );
        assert_eq!(
            body_of(ApiError::unprocessable("x")).await["error"],
            "UnprocessableEntity"
        );
    }

    #[test]
    fn refused_arguments_and_broken_state_are_permanent_and_timeouts_are_not() {
        assert!(Error::Adapters(phoenix_adapters::Error::Invalid("x".into())).is_permanent());
        assert!(Error::Inconsistent("x".into()).is_permanent());
        let timeout = phoenix_adapters::Error::Timeout {
            what: "x".into(),
            after: std::time::Duration::from_secs(1),
        };
        assert!(!Error::Adapters(timeout).is_permanent());
    }

    #[actix_web::test]
    async fn internal_errors_do_not_leak_their_cause() {
        let error = ApiError::from(Error::Inconsistent("row 42 of secret_table".into()));
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = body_of(error).await;
        assert_eq!(body["error"], "InternalError");
        assert!(
            !body["description"]
                .as_str()
                .unwrap()
                .contains("secret_table")
        );
    }
}
