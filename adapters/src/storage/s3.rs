//! S3 (and S3-compatible) storage with aws-sdk-s3.
//!
//! A put streams its data as a multipart upload of unknown length: one part is filled
//! while the previous one uploads, so two part buffers are in memory. Parts stay at
//! [`S3Settings::part_size`] for the first [`CONSTANT_PARTS`] parts, then double every
//! [`PARTS_PER_DOUBLING`] parts (at most 5 GiB), so that 10,000 parts still hold more than
//! 5 TiB (5.9 TiB from 5 MiB parts, 6.9 TiB from the default 8 MiB).
//!
//! Memory bound of a put, two part buffers: with the default 8 MiB parts, 16 MiB for
//! objects up to 47 GiB, 32 MiB up to 52 GiB, 64 MiB up to 63 GiB, 128 MiB up to 85 GiB,
//! 256 MiB up to 129 GiB, then doubling about every 100-200 GiB, up to 2 x 5 GiB near
//! 5 TiB (with 5 MiB parts: 10 MiB up to 29 GiB). S3's limit of 10,000 parts on an upload
//! of unknown length makes large objects need large parts; growing late keeps the common
//! sizes small. An object smaller than one part is a single PutObject. A put that fails
//! or is dropped aborts its multipart upload on the server; it must never leave a
//! completed object for a stream that failed.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::task::JoinHandle;

use super::common::{Head, read_head, storage_msg, with_backoff};
use super::{ByteStream, ObjectInfo, ObjectKey, Store, Sweep};
use crate::{Error, Result};

/// S3 refuses parts below 5 MiB (except the last one).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// S3 refuses parts above 5 GiB.
const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;
/// S3 allows at most 10,000 parts per upload.
const MAX_PARTS: i32 = 10_000;
/// Parts keep the configured size up to this part number.
pub const CONSTANT_PARTS: i32 = 6000;
/// After [`CONSTANT_PARTS`], the part size doubles every this many parts.
pub const PARTS_PER_DOUBLING: i32 = 350;
/// Default first part size.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// Default of [`S3Settings::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The slowest upload a request with a body is given time for. The SDK's read timeout is
/// one deadline from the start of the request to the response, body upload included, so
/// a fixed one would fail every large part on a slow link; a stalled upload is caught
/// sooner by the SDK's stalled-stream protection.
pub const MIN_UPLOAD_RATE: u64 = 64 * 1024;

/// How to reach a bucket.
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); AWS when `None`.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), what most S3-compatible stores need.
    pub path_style: bool,
    /// Static credentials; the default AWS chain (environment, profile, web identity,
    /// instance role) when `None`.
    pub credentials: Option<(String, String)>,
    /// Prepended to every key (`phoenix/`).
    pub prefix: String,
    /// First part size, at least [`MIN_PART_SIZE`].
    pub part_size: usize,
    /// How long a request may wait for its response; [`DEFAULT_IDLE_TIMEOUT`] in
    /// production. A request that uploads a body gets this plus the body's size at
    /// [`MIN_UPLOAD_RATE`].
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("path_style", &self.path_style)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<static>"),
            )
            .field("prefix", &self.prefix)
            .field("part_size", &self.part_size)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

/// A bucket (and key prefix) on S3 or an S3-compatible server.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    idle_timeout: Duration,
}

impl S3Store {
    /// Builds the client. Contacts nothing: a wrong bucket or credentials show on first use.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a part size below the S3 minimum.
    pub async fn new(settings: S3Settings) -> Result<Self> {
        if settings.part_size < MIN_PART_SIZE || settings.part_size > MAX_PART_SIZE {
            return Err(Error::Invalid(format!(
                "the S3 part size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes"
            )));
        }
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(settings.region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(settings.idle_timeout)
                    .build(),
            );
        if let Some((id, secret)) = &settings.credentials {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "phoenix-configuration",
            ));
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.path_style)
            // S3-compatible servers differ in their support of streaming checksum trailers;
            // integrity is checked end to end by the backup's own digest.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let mut prefix = settings.prefix;
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self {
            client: Client::from_conf(config.build()),
            bucket: settings.bucket,
            prefix,
            part_size: settings.part_size,
            idle_timeout: settings.idle_timeout,
        })
    }

    /// Per-request settings of a request that uploads `len` bytes: its response may take
    /// as long as the body needs at [`MIN_UPLOAD_RATE`], on top of the idle timeout.
    fn upload_timeouts(&self, len: usize) -> aws_sdk_s3::config::Builder {
        upload_timeouts(self.idle_timeout, len)
    }

    /// Creates the bucket unless it exists (for tests and first-time setups).
    ///
    /// # Errors
    /// When the server refuses for another reason than the bucket existing.
    pub async fn ensure_bucket(&self) -> Result<()> {
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(e, format!("creating bucket {}", self.bucket), None)),
        }
    }

    fn full_key(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    fn part_size_for(&self, part_number: i32) -> usize {
        part_size_for(self.part_size, part_number)
    }

    async fn put_small(&self, key: &str, body: Bytes) -> Result<()> {
        let len = body.len();
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .body(SdkByteStream::from(body))
            .customize()
            .config_override(self.upload_timeouts(len))
            .send()
            .await
            .map_err(|e| map_err(e, format!("storing {key}"), None))?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        key: &str,
        mut buffer: BytesMut,
        mut data: ByteStream,
        mut total: u64,
    ) -> Result<u64> {
        // The creation runs as its own task: if this future is dropped while it is under
        // way, the upload the server creates must still be known, to be aborted.
        let mut creating = Creating {
            task: Some(tokio::spawn(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .send(),
            )),
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
        };
        let created = creating
            .finish()
            .await?
            .map_err(|e| map_err(e, format!("starting the upload of {key}"), None))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        if upload_id.is_empty() {
            return Err(Error::Storage {
                message: format!("the server gave no upload id for {key}"),
                retryable: true,
                source: None,
            });
        }
        let mut upload = Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            upload_id,
            idle_timeout: self.idle_timeout,
            in_flight: None,
            parts: Vec::new(),
            armed: true,
            completing: false,
        };
        let result = async {
            let mut part_number = 1;
            let mut ended = false;
            loop {
                let size = self.part_size_for(part_number);
                while !ended && buffer.len() < size {
                    match data.next().await {
                        Some(chunk) => {
                            let chunk = chunk?;
                            total += chunk.len() as u64;
                            buffer.extend_from_slice(&chunk);
                        }
                        None => ended = true,
                    }
                }
                if buffer.is_empty() {
                    break;
                }
                let body = if buffer.len() > size {
                    buffer.split_to(size).freeze()
                } else {
                    std::mem::take(&mut buffer).freeze()
                };
                if part_number > MAX_PARTS {
                    return Err(Error::Storage {
                        message: format!("{key} needs more than {MAX_PARTS} parts"),
                        retryable: false,
                        source: None,
                    });
                }
                upload.send_part(part_number, body).await?;
                part_number += 1;
                if ended && buffer.is_empty() {
                    break;
                }
                // The next part gets a buffer of its own size; the previous one is freed when
                // its upload finishes.
                let next = self.part_size_for(part_number);
                if buffer.capacity() < next {
                    buffer.reserve(next - buffer.len());
                }
            }
            upload.complete().await
        }
        .await;
        match result {
            Ok(()) => Ok(total),
            Err(e) => {
                upload.abort().await;
                Err(e)
            }
        }
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<(String, String, Duration)>> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut uploads = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        let now = std::time::SystemTime::now();
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| map_err(e, "listing multipart uploads".to_owned(), None))?;
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                let age = upload
                    .initiated()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                uploads.push((key.to_owned(), id.to_owned(), age));
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(uploads)
    }
}

type CreateResult = std::result::Result<
    aws_sdk_s3::operation::create_multipart_upload::CreateMultipartUploadOutput,
    SdkError<
        aws_sdk_s3::operation::create_multipart_upload::CreateMultipartUploadError,
        HttpResponse,
    >,
>;

/// A CreateMultipartUpload under way. Dropped before it finished, it lets the request
/// finish in the background and aborts the upload it created.
struct Creating {
    task: Option<JoinHandle<CreateResult>>,
    client: Client,
    bucket: String,
    key: String,
}

impl Creating {
    async fn finish(&mut self) -> Result<CreateResult> {
        let Some(task) = self.task.as_mut() else {
            return Err(storage_msg("the upload was already started", false));
        };
        let result = task.await;
        self.task = None;
        result.map_err(|e| storage_msg(&format!("starting the upload of {}: {e}", self.key), true))
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.key.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Ok(created)) = task.await
                    && let Some(upload_id) = created.upload_id()
                {
                    let job = AbortJob {
                        client,
                        bucket,
                        key,
                        upload_id: upload_id.to_owned(),
                    };
                    job.run(12).await;
                }
            });
        }
    }
}

/// A multipart upload in progress. Dropped while armed (the put future was dropped), it
/// aborts the upload in a background task.
struct Upload {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    idle_timeout: Duration,
    in_flight: Option<JoinHandle<Result<CompletedPart>>>,
    parts: Vec<CompletedPart>,
    armed: bool,
    /// CompleteMultipartUpload was sent: if it failed, the object may exist anyway.
    completing: bool,
}

impl Upload {
    /// Starts uploading `body` after the previous part is done: one part uploads while the
    /// caller fills the next.
    async fn send_part(&mut self, part_number: i32, body: Bytes) -> Result<()> {
        self.finish_in_flight().await?;
        let len = body.len();
        let request = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(part_number)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .body(SdkByteStream::from(body))
            .customize()
            .config_override(upload_timeouts(self.idle_timeout, len));
        let key = self.key.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let output = request
                .send()
                .await
                .map_err(|e| map_err(e, format!("uploading part {part_number} of {key}"), None))?;
            Ok(CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(output.e_tag().map(str::to_owned))
                .build())
        }));
        Ok(())
    }

    async fn finish_in_flight(&mut self) -> Result<()> {
        if let Some(handle) = self.in_flight.take() {
            let part = handle.await.map_err(|e| Error::Storage {
                message: format!("uploading a part of {}: {e}", self.key),
                retryable: false,
                source: None,
            })??;
            self.parts.push(part);
        }
        Ok(())
    }

    async fn complete(&mut self) -> Result<()> {
        self.finish_in_flight().await?;
        self.completing = true;
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| map_err(e, format!("completing the upload of {}", self.key), None))?;
        self.armed = false;
        Ok(())
    }

    /// Aborts the upload now, a few times if the server is unreachable; if it stays
    /// unreachable, a background task keeps trying.
    async fn abort(&mut self) {
        // Armed until the abort is done or handed to a task: a put dropped while it
        // aborts (its caller gave up on a failed backup) still aborts from `drop`.
        if let Some(handle) = self.in_flight.take() {
            handle.abort();
            let _ = handle.await;
        }
        let job = AbortJob {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            upload_id: self.upload_id.clone(),
        };
        let completing = self.completing;
        let aborted = job.run(3).await;
        let deleted = !completing || job.delete_object(3).await;
        self.armed = false;
        if !aborted || !deleted {
            tokio::spawn(async move {
                if !aborted {
                    job.run(12).await;
                }
                if !deleted {
                    job.delete_object(12).await;
                }
            });
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let in_flight = self.in_flight.take();
        let completing = self.completing;
        let job = AbortJob {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            upload_id: self.upload_id.clone(),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Some(handle) = in_flight {
                    handle.abort();
                    let _ = handle.await;
                }
                job.run(12).await;
                if completing {
                    job.delete_object(12).await;
                }
            });
        }
    }
}

struct AbortJob {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
}

impl AbortJob {
    /// Tries `attempts` times with backoff; true when done.
    async fn run(&self, attempts: u32) -> bool {
        with_backoff(
            attempts,
            "aborting a multipart upload",
            &self.key,
            || async {
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(&self.upload_id)
                    .send()
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
                    Err(e) => Err(map_err(e, "aborting a multipart upload".to_owned(), None)),
                }
            },
        )
        .await
    }

    /// Deletes the object under the key, `attempts` times with backoff; true when done.
    /// For a CompleteMultipartUpload whose answer was lost: the object may exist although
    /// the put reports an error.
    async fn delete_object(&self, attempts: u32) -> bool {
        with_backoff(
            attempts,
            "deleting an object of a failed put",
            &self.key,
            || async {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| map_err(e, format!("deleting {}", self.key), None))
            },
        )
        .await
    }
}

/// Maps an SDK error: 404 is not-found, network trouble, throttling and 5xx are retryable.
fn map_err<E>(err: SdkError<E, HttpResponse>, context: String, not_found_key: Option<&str>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    if let Some(key) = not_found_key
        && (status == Some(404) || matches!(code.as_deref(), Some("NoSuchKey" | "NotFound")))
    {
        return Error::NotFound {
            key: key.to_owned(),
        };
    }
    let retryable = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            matches!(status, Some(429 | 500..=599))
                || matches!(
                    code.as_deref(),
                    Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")
                )
        }
        _ => false,
    };
    let detail = match (&code, status) {
        (Some(code), Some(status)) => format!("{code} (HTTP {status})"),
        (Some(code), None) => code.clone(),
        (None, Some(status)) => format!("HTTP {status}"),
        (None, None) => aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
    };
    Error::Storage {
        message: format!("{context}: {detail}"),
        retryable,
        source: Some(Box::new(err)),
    }
}

#[async_trait::async_trait]
impl Store for S3Store {
    async fn put(&self, key: &ObjectKey, mut data: ByteStream) -> Result<u64> {
        let full = self.full_key(key);
        let buffer = match read_head(&mut data, self.part_size_for(1) as u64).await? {
            Head::Whole(object) => {
                let total = object.len() as u64;
                self.put_small(&full, object).await?;
                return Ok(total);
            }
            Head::Partial(buffer) => buffer,
        };
        let total = buffer.len() as u64;
        self.put_multipart(&full, buffer, data, total).await
    }

    async fn get(&self, key: &ObjectKey) -> Result<ByteStream> {
        let full = self.full_key(key);
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| map_err(e, format!("reading {full}"), Some(key.as_str())))?;
        let stream = futures::stream::unfold((output.body, full), |(mut body, full)| async move {
            let item = body.next().await?;
            let item = item.map_err(|e| Error::Storage {
                message: format!("reading {full}: {e}"),
                retryable: true,
                source: Some(Box::new(e)),
            });
            Some((item, (body, full)))
        });
        Ok(Box::pin(stream))
    }

    async fn stat(&self, key: &ObjectKey) -> Result<ObjectInfo> {
        let full = self.full_key(key);
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| map_err(e, format!("reading {full}"), Some(key.as_str())))?;
        Ok(ObjectInfo {
            key: key.clone(),
            size: u64::try_from(output.content_length().unwrap_or_default()).unwrap_or_default(),
            modified: output.last_modified().and_then(to_chrono),
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| map_err(e, format!("listing {full_prefix}"), None))?;
            for object in page.contents() {
                let Some(name) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                // Objects not written by Phoenix (no valid key) are not ours to show.
                let Ok(key) = ObjectKey::parse(name) else {
                    continue;
                };
                objects.push(ObjectInfo {
                    key,
                    size: u64::try_from(object.size().unwrap_or_default()).unwrap_or_default(),
                    modified: object.last_modified().and_then(to_chrono),
                });
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let full = self.full_key(key);
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match map_err(e, format!("deleting {full}"), Some(key.as_str())) {
                Error::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

#[async_trait::async_trait]
impl Sweep for S3Store {
    async fn leftovers(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_uploads(prefix)
            .await?
            .into_iter()
            .map(|(key, id, _)| format!("{key} (multipart upload {id})"))
            .collect())
    }

    async fn sweep(&self, prefix: &str, older_than: Duration) -> Result<usize> {
        let mut removed = 0;
        for (key, upload_id, age) in self.list_uploads(prefix).await? {
            if age < older_than {
                continue;
            }
            let job = AbortJob {
                client: self.client.clone(),
                bucket: self.bucket.clone(),
                key,
                upload_id,
            };
            if job.run(1).await {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The size of part `part_number` (from 1): `first` up to part [`CONSTANT_PARTS`], then
/// doubled every [`PARTS_PER_DOUBLING`] parts, at most 5 GiB.
fn part_size_for(first: usize, part_number: i32) -> usize {
    let doublings = if part_number <= CONSTANT_PARTS {
        0
    } else {
        u32::try_from((part_number - CONSTANT_PARTS - 1) / PARTS_PER_DOUBLING + 1).unwrap_or(0)
    };
    first
        .saturating_mul(1usize << doublings.min(20))
        .min(MAX_PART_SIZE)
}

fn upload_timeouts(idle: Duration, len: usize) -> aws_sdk_s3::config::Builder {
    let upload = Duration::from_secs(u64::try_from(len).unwrap_or(u64::MAX) / MIN_UPLOAD_RATE);
    aws_sdk_s3::config::Builder::default().timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .read_timeout(idle.saturating_add(upload))
            .build(),
    )
}

fn to_chrono(t: &aws_smithy_types::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_their_size_for_six_thousand_parts_then_double() {
        assert_eq!(part_size_for(MIN_PART_SIZE, 1), MIN_PART_SIZE);
        assert_eq!(
            part_size_for(DEFAULT_PART_SIZE, CONSTANT_PARTS),
            DEFAULT_PART_SIZE
        );
        assert_eq!(
            part_size_for(DEFAULT_PART_SIZE, CONSTANT_PARTS + 1),
            2 * DEFAULT_PART_SIZE
        );
        assert_eq!(
            part_size_for(DEFAULT_PART_SIZE, CONSTANT_PARTS + PARTS_PER_DOUBLING),
            2 * DEFAULT_PART_SIZE
        );
        assert_eq!(
            part_size_for(DEFAULT_PART_SIZE, CONSTANT_PARTS + PARTS_PER_DOUBLING + 1),
            4 * DEFAULT_PART_SIZE
        );
        assert_eq!(part_size_for(MIN_PART_SIZE, MAX_PARTS), MAX_PART_SIZE);
    }

    /// The bytes an object can reach before its part size exceeds `part`.
    fn reach_at_part_size(first: usize, part: usize) -> u64 {
        (1..=MAX_PARTS)
            .map(|n| part_size_for(first, n))
            .take_while(|&size| size <= part)
            .map(|size| size as u64)
            .sum()
    }

    #[test]
    fn ten_thousand_growing_parts_hold_more_than_five_tebibytes() {
        const TIB: u64 = 1024 * 1024 * 1024 * 1024;
        for first in [MIN_PART_SIZE, DEFAULT_PART_SIZE] {
            let capacity: u64 = (1..=MAX_PARTS)
                .map(|n| part_size_for(first, n) as u64)
                .sum();
            assert!(capacity > 5 * TIB, "{first}: {capacity}");
        }
    }

    #[test]
    fn memory_stays_at_two_parts_of_the_stated_sizes() {
        const GIB: u64 = 1024 * 1024 * 1024;
        const MIB: usize = 1024 * 1024;
        // The figures of the module documentation (two buffers of one part each).
        assert!(reach_at_part_size(DEFAULT_PART_SIZE, 8 * MIB) > 46 * GIB);
        assert!(reach_at_part_size(DEFAULT_PART_SIZE, 16 * MIB) > 51 * GIB);
        assert!(reach_at_part_size(DEFAULT_PART_SIZE, 32 * MIB) > 62 * GIB);
        assert!(reach_at_part_size(DEFAULT_PART_SIZE, 64 * MIB) > 84 * GIB);
        assert!(reach_at_part_size(DEFAULT_PART_SIZE, 128 * MIB) > 128 * GIB);
        assert!(reach_at_part_size(MIN_PART_SIZE, 5 * MIB) > 29 * GIB);
        // 10,000 parts of the smallest size fit before any part grows.
        assert!(reach_at_part_size(MIN_PART_SIZE, 5 * MIB) > 10_000 * 5 * MIB as u64 / 2);
    }
}
