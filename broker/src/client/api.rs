//! A typed HTTP client for one instance's Backup API (team contract, issue 4): backups,
//! restores and the backup policy under `<broker>/v2/service_instances/<id>`.
//!
//! Every call sends `X-Broker-API-Version` and the access's credentials, and returns
//! both the typed value and the broker's JSON as it came (`--json` prints the latter).
//! Calls that return a document have a total timeout; the download has none (a backup
//! may take hours to transfer) but fails when the broker stops sending. An error never
//! holds the token or password: transport errors are reported without reqwest's URL and
//! with the access's URL instead, which cannot carry credentials.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{Stream, TryStreamExt as _};
use phoenix_adapters::ids::{BackupId, InstanceId};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

use super::access::{Access, Auth};
use crate::error::{Error, cause_chain};

/// The OSB version the Backup API shares with the rest of the broker.
const API_VERSION: &str = "2.17";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Total time for a call that returns a JSON document.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence while a download streams.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Error bodies longer than this are cut in messages.
const MAX_ERROR_TEXT: usize = 500;

/// A typed answer and the JSON it was read from.
#[derive(Debug, Clone)]
pub struct Document<T> {
    pub value: T,
    pub json: Value,
}

/// The state of a backup or a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum State {
    #[serde(rename = "in progress")]
    InProgress,
    #[serde(rename = "succeeded")]
    Succeeded,
    #[serde(rename = "failed")]
    Failed,
}

impl State {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in progress",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// The answer to `POST .../backups`.
#[derive(Debug, Clone, Deserialize)]
pub struct BackupStarted {
    pub backup_id: BackupId,
    pub state: State,
}

/// Bytes so far of a backup in progress.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct BackupProgress {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// A backup, as the contract's `Backup` JSON. Fields the CLI does not show are left out.
#[derive(Debug, Clone, Deserialize)]
pub struct Backup {
    pub backup_id: BackupId,
    pub instance_id: InstanceId,
    pub state: State,
    pub trigger: String,
    pub engine: Option<String>,
    pub engine_version: Option<String>,
    pub format: Option<String>,
    pub raw_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    pub sha256: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub progress: Option<BackupProgress>,
    pub error: Option<String>,
}

/// The answer to `GET .../backups`, newest first.
#[derive(Debug, Clone, Deserialize)]
pub struct BackupList {
    pub backups: Vec<Backup>,
}

/// The answer to `DELETE .../backups/{id}`: `{}` (200) when storage and record are gone,
/// or a `description` (202) when the backup is hidden and its data is removed later.
#[derive(Debug, Clone, Deserialize)]
pub struct Deleted {
    pub description: Option<String>,
}

/// The answer to `POST .../restores`.
#[derive(Debug, Clone, Deserialize)]
pub struct RestoreStarted {
    pub restore_id: Uuid,
    pub state: State,
}

/// Bytes so far and phase of a restore in progress.
#[derive(Debug, Clone, Deserialize)]
pub struct RestoreProgress {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub phase: String,
}

/// A restore, as the contract's `Restore` JSON.
#[derive(Debug, Clone, Deserialize)]
pub struct Restore {
    pub restore_id: Uuid,
    pub instance_id: InstanceId,
    pub backup_id: BackupId,
    pub source_instance_id: InstanceId,
    pub state: State,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub progress: Option<RestoreProgress>,
    pub error: Option<String>,
}

/// How long backups are kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Retention {
    pub keep_last: Option<u64>,
    pub max_age_days: Option<u64>,
}

/// An instance's backup policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Policy {
    pub schedule: Option<String>,
    pub retention: Retention,
}

/// A download that has started: the broker accepted it and announced size and digest.
#[derive(Debug)]
pub struct Download {
    /// `Content-Length`: the stored bytes.
    pub length: u64,
    /// `X-Phoenix-Backup-Sha256`, lowercase hex.
    pub sha256: String,
    response: Response,
    url: String,
}

impl Download {
    /// The body, chunk by chunk, never held whole. A connection that breaks or goes
    /// silent ends the stream with an error.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Error>> {
        let url = self.url;
        self.response
            .bytes_stream()
            .map_err(move |e| transport_error(&url, e))
    }
}

/// The Backup API of one instance.
#[derive(Debug)]
pub struct BackupApi {
    http: reqwest::Client,
    access: Access,
}

impl BackupApi {
    /// A client for the instance `access` opens.
    ///
    /// # Errors
    /// [`Error::Config`] when the HTTP client cannot be built (no TLS roots).
    pub fn new(access: Access) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("phoenix-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))?;
        Ok(Self { http, access })
    }

    /// Where the calls go: `<broker>/v2/service_instances/<id>`.
    pub fn instance_url(&self) -> &str {
        self.access.instance_url()
    }

    /// The instance the calls act on.
    pub fn instance(&self) -> &InstanceId {
        self.access.instance()
    }

    /// `POST .../backups`: starts a backup.
    ///
    /// # Errors
    /// [`Error::Refused`] with the broker's description (e.g. a `ConcurrencyError` while
    /// another operation runs), [`Error::Unreachable`], [`Error::Protocol`].
    pub async fn create_backup(&self) -> Result<Document<BackupStarted>, Error> {
        self.document(Method::POST, "/backups", Some(&json!({})))
            .await
    }

    /// `GET .../backups`, newest first.
    ///
    /// # Errors
    /// As [`create_backup`](Self::create_backup).
    pub async fn list_backups(&self) -> Result<Document<BackupList>, Error> {
        self.document(Method::GET, "/backups", None).await
    }

    /// `GET .../backups/{id}`.
    ///
    /// # Errors
    /// As [`create_backup`](Self::create_backup); an unknown backup is a 404 refusal.
    pub async fn backup(&self, id: &BackupId) -> Result<Document<Backup>, Error> {
        self.document(Method::GET, &format!("/backups/{id}"), None)
            .await
    }

    /// `DELETE .../backups/{id}`.
    ///
    /// # Errors
    /// As [`backup`](Self::backup); a backup in progress is a 422 refusal.
    pub async fn delete_backup(&self, id: &BackupId) -> Result<Document<Deleted>, Error> {
        self.document(Method::DELETE, &format!("/backups/{id}"), None)
            .await
    }

    /// `GET .../backups/{id}/download`: the response head, with the announced length and
    /// digest; the body streams from [`Download::into_stream`].
    ///
    /// # Errors
    /// As [`backup`](Self::backup); [`Error::Protocol`] when `Content-Length` or
    /// `X-Phoenix-Backup-Sha256` is missing or malformed.
    pub async fn download(&self, id: &BackupId) -> Result<Download, Error> {
        let url = self.url(&format!("/backups/{id}/download"));
        let response = self.send(self.request(Method::GET, &url)).await?;
        let length = response
            .content_length()
            .ok_or_else(|| Error::Protocol("the download has no Content-Length".into()))?;
        let sha256 = response
            .headers()
            .get("x-phoenix-backup-sha256")
            .and_then(|value| value.to_str().ok())
            .map(str::to_ascii_lowercase)
            .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                Error::Protocol("the download has no valid X-Phoenix-Backup-Sha256 header".into())
            })?;
        Ok(Download {
            length,
            sha256,
            response,
            url,
        })
    }

    /// `POST .../restores`: restores `backup` into this instance.
    ///
    /// # Errors
    /// As [`create_backup`](Self::create_backup); an unknown backup is a 422 refusal.
    pub async fn create_restore(
        &self,
        backup: &BackupId,
    ) -> Result<Document<RestoreStarted>, Error> {
        self.document(
            Method::POST,
            "/restores",
            Some(&json!({ "backup_id": backup })),
        )
        .await
    }

    /// `GET .../restores/{id}`.
    ///
    /// # Errors
    /// As [`backup`](Self::backup).
    pub async fn restore(&self, id: &Uuid) -> Result<Document<Restore>, Error> {
        self.document(Method::GET, &format!("/restores/{id}"), None)
            .await
    }

    /// `GET .../backup_policy`.
    ///
    /// # Errors
    /// As [`create_backup`](Self::create_backup).
    pub async fn policy(&self) -> Result<Document<Policy>, Error> {
        self.document(Method::GET, "/backup_policy", None).await
    }

    /// `PUT .../backup_policy` with `policy` (only the fields to change: the broker keeps
    /// what is absent and removes what is null): the policy as the broker stored it.
    ///
    /// # Errors
    /// As [`create_backup`](Self::create_backup); a bad cron expression is a 400 refusal.
    pub async fn set_policy(&self, policy: &Value) -> Result<Document<Policy>, Error> {
        self.document(Method::PUT, "/backup_policy", Some(policy))
            .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.access.instance_url())
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let request = self
            .http
            .request(method, url)
            .header("X-Broker-API-Version", API_VERSION);
        // reqwest marks both Authorization values as sensitive.
        match self.access.auth() {
            Auth::Bearer(token) => request.bearer_auth(token.expose()),
            Auth::Basic { username, password } => {
                request.basic_auth(username, Some(password.expose()))
            }
        }
    }

    /// Sends a request; any answer but a 2xx becomes [`Error::Refused`].
    async fn send(&self, request: RequestBuilder) -> Result<Response, Error> {
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(self.access.instance_url(), e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(refusal(response).await)
        }
    }

    async fn document<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Document<T>, Error> {
        let url = self.url(path);
        let mut request = self.request(method, &url).timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = self.send(request).await?;
        let text = response
            .text()
            .await
            .map_err(|e| transport_error(&url, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Protocol(format!("{path}: the body is not JSON: {e}")))?;
        let value = T::deserialize(&json).map_err(|e| Error::Protocol(format!("{path}: {e}")))?;
        Ok(Document { value, json })
    }
}

/// A failed request as one line naming the URL; reqwest's own URL is dropped so that
/// nothing but the access's (credential-free) URL is ever shown.
fn transport_error(url: &str, error: reqwest::Error) -> Error {
    let reason = if error.is_timeout() {
        "no answer in time".to_owned()
    } else {
        let chain = cause_chain(&error.without_url());
        // reqwest's outer layers ("error sending request", "client error (Connect)") say
        // less than the innermost cause ("Connection refused (os error 111)").
        chain.rsplit(": ").next().unwrap_or(&chain).to_owned()
    };
    Error::Unreachable {
        url: url.to_owned(),
        reason,
    }
}

/// The broker's error answer: its `description` (and `error` code) when the body is
/// the contract's JSON, else the start of the body or the status's reason.
async fn refusal(response: Response) -> Error {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    #[derive(Deserialize)]
    struct Body {
        error: Option<String>,
        description: Option<String>,
    }
    let body = serde_json::from_str::<Body>(&text).ok();
    let description = body
        .as_ref()
        .and_then(|b| b.description.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| fallback_description(status, &text));
    Error::Refused {
        status: status.as_u16(),
        code: body.and_then(|b| b.error),
        description,
    }
}

fn fallback_description(status: StatusCode, text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return status
            .canonical_reason()
            .unwrap_or("the broker refused the request")
            .to_owned();
    }
    let mut end = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
