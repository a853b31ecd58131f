//! OpenStack Swift storage, spoken directly over reqwest.
//!
//! Authentication: tempauth v1 or Keystone v3 password; a token is renewed before it
//! expires and once more on a 401. A put buffers up to one small-object threshold: a
//! stream that ends within it is one plain PUT; a longer one is streamed (chunked, no
//! buffering) into segments of [`SwiftSettings::segment_size`] bytes in the segment
//! container (`<container>+segments`, never listed), then a Static Large Object manifest
//! is written under the key, last. The manifest carries the upload's id, which tells
//! complete segment groups from leftovers. A put that fails or is dropped deletes its
//! segments, and its manifest when that was stored although its answer was lost; a put
//! that replaces an object deletes the replaced object's segments. A segment upload fails
//! after [`SwiftSettings::idle_timeout`] without progress, never for its duration alone.
//! It must never write the manifest for a stream that failed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::{Mutex, mpsc};
use tracing::warn;

use super::common::{Head, random_id, read_head, storage_msg, with_backoff};
use super::{ByteStream, ObjectInfo, ObjectKey, Store, Sweep};
use crate::{Error, Result};

/// Default first segment size. Segments are streamed, not buffered, so their size costs no
/// memory; doubling every 250 segments up to 5 GiB, Swift's default limit of 1000
/// segments per manifest holds about 3 TiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 1024 * 1024 * 1024;
/// Swift's default `max_manifest_segments`.
const MAX_SEGMENTS: usize = 1000;
/// Swift's default `max_file_size`: no segment may be larger.
const MAX_SEGMENT_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Segments double in size every this many segments (streamed, so it costs no memory).
const SEGMENTS_PER_SIZE: usize = 250;
/// A stream that ends within this many bytes (or one segment, if smaller) is one PUT.
const SMALL_OBJECT: u64 = 8 * 1024 * 1024;
/// Renew a token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);
const UPLOAD_META: &str = "x-object-meta-phoenix-upload";
/// Default of [`SwiftSettings::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Segment bodies are handed to the HTTP client in pieces of at most this size, so that
/// each piece taken is progress the idle timer sees.
const MAX_PIECE: usize = 1024 * 1024;

/// How to authenticate.
#[derive(Clone)]
pub enum SwiftAuth {
    /// Swift's tempauth (v1): `GET auth_url` with `X-Auth-User`/`X-Auth-Key`.
    Tempauth { user: String, key: String },
    /// Keystone v3 password authentication, scoped to a project.
    Keystone {
        username: String,
        password: String,
        project: String,
        domain: String,
    },
}

impl std::fmt::Debug for SwiftAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tempauth { user, .. } => f
                .debug_struct("Tempauth")
                .field("user", user)
                .finish_non_exhaustive(),
            Self::Keystone {
                username,
                project,
                domain,
                ..
            } => f
                .debug_struct("Keystone")
                .field("username", username)
                .field("project", project)
                .field("domain", domain)
                .finish_non_exhaustive(),
        }
    }
}

/// Where the objects go.
#[derive(Debug, Clone)]
pub struct SwiftSettings {
    /// tempauth: `http://host:8080/auth/v1.0`; Keystone: `https://host:5000/v3`.
    pub auth_url: String,
    pub auth: SwiftAuth,
    pub container: String,
    /// Prepended to every object name (`phoenix/`).
    pub prefix: String,
    /// Bytes per segment of a large object.
    pub segment_size: u64,
    /// How long a request may make no progress (no response byte, or no body piece taken
    /// by a segment upload) before it fails; [`DEFAULT_IDLE_TIMEOUT`] in production.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
struct Session {
    token: String,
    storage_url: String,
    expires: Option<Instant>,
}

/// A container (and name prefix) on OpenStack Swift.
#[derive(Debug, Clone)]
pub struct SwiftStore {
    http: reqwest::Client,
    /// For streamed segment PUTs: no read timeout, which in reqwest also runs while the
    /// body is being sent (seanmonstar/reqwest#2784) and would fail every segment upload
    /// longer than the timeout. `put_segment` times the feeding and the response instead.
    upload_http: reqwest::Client,
    settings: SwiftSettings,
    segments: String,
    session: Arc<Mutex<Option<Session>>>,
    containers_ready: Arc<Mutex<bool>>,
}

#[derive(Deserialize)]
struct ListEntry {
    name: Option<String>,
    bytes: Option<u64>,
    last_modified: Option<String>,
}

impl SwiftStore {
    /// Prepares the client. Contacts nothing: credentials are checked on first use.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unusable container name or segment size.
    pub fn new(mut settings: SwiftSettings) -> Result<Self> {
        // Names go into URL paths unencoded: only RFC 3986 unreserved characters.
        let unreserved = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~');
        let c = &settings.container;
        if c.is_empty() || c.len() > 200 || !c.chars().all(unreserved) {
            return Err(Error::Invalid(format!(
                "{c:?} is not a usable Swift container name (1 to 200 of A-Z a-z 0-9 - . _ ~)"
            )));
        }
        let p = &settings.prefix;
        if !p.chars().all(|c| unreserved(c) || c == '/') || p.starts_with('/') {
            return Err(Error::Invalid(format!(
                "{p:?} is not a usable Swift object prefix (A-Z a-z 0-9 - . _ ~ /)"
            )));
        }
        if settings.segment_size < 1024 * 1024 || settings.segment_size > MAX_SEGMENT_SIZE {
            return Err(Error::Invalid(format!(
                "the Swift segment size must be between 1 MiB and {MAX_SEGMENT_SIZE} bytes"
            )));
        }
        if !settings.prefix.is_empty() && !settings.prefix.ends_with('/') {
            settings.prefix.push('/');
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(settings.idle_timeout)
            .build()
            .map_err(|e| storage_error("building the HTTP client", false, e))?;
        let upload_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| storage_error("building the HTTP client", false, e))?;
        Ok(Self {
            http,
            upload_http,
            segments: format!("{}+segments", settings.container),
            settings,
            session: Arc::new(Mutex::new(None)),
            containers_ready: Arc::new(Mutex::new(false)),
        })
    }

    fn full_name(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.settings.prefix, key.as_str())
    }

    async fn authenticate(&self) -> Result<Session> {
        match &self.settings.auth {
            SwiftAuth::Tempauth { user, key } => {
                let response = self
                    .http
                    .get(&self.settings.auth_url)
                    .header("X-Auth-User", user)
                    .header("X-Auth-Key", key)
                    .send()
                    .await
                    .map_err(|e| transport_error("authenticating with Swift", e))?;
                let response = check(response, "authenticating with Swift").await?;
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let (Some(token), Some(storage_url)) =
                    (header("x-auth-token"), header("x-storage-url"))
                else {
                    return Err(storage_msg("tempauth gave no token or storage URL", false));
                };
                let expires = header("x-auth-token-expires")
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|secs| Instant::now() + Duration::from_secs(secs));
                Ok(Session {
                    token,
                    storage_url,
                    expires,
                })
            }
            SwiftAuth::Keystone {
                username,
                password,
                project,
                domain,
            } => {
                let base = self.settings.auth_url.trim_end_matches('/');
                let url = if base.ends_with("/auth/tokens") {
                    base.to_owned()
                } else {
                    format!("{base}/auth/tokens")
                };
                let body = serde_json::json!({"auth": {
                    "identity": {"methods": ["password"], "password": {"user": {
                        "name": username, "domain": {"name": domain}, "password": password}}},
                    "scope": {"project": {"name": project, "domain": {"name": domain}}}
                }});
                let response = self
                    .http
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| transport_error("authenticating with Keystone", e))?;
                let response = check(response, "authenticating with Keystone").await?;
                let token = response
                    .headers()
                    .get("x-subject-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .ok_or_else(|| storage_msg("Keystone gave no X-Subject-Token", false))?;
                let body: KeystoneResponse = response
                    .json()
                    .await
                    .map_err(|e| storage_error("reading Keystone's token", true, e))?;
                let storage_url = body
                    .token
                    .catalog
                    .iter()
                    .filter(|s| s.kind == "object-store")
                    .flat_map(|s| &s.endpoints)
                    .find(|e| e.interface == "public")
                    .map(|e| e.url.clone())
                    .ok_or_else(|| {
                        storage_msg("Keystone's catalog has no public object-store", false)
                    })?;
                let expires = body
                    .token
                    .expires_at
                    .as_deref()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .and_then(|t| {
                        (t.with_timezone(&chrono::Utc) - chrono::Utc::now())
                            .to_std()
                            .ok()
                    })
                    .map(|left| Instant::now() + left);
                Ok(Session {
                    token,
                    storage_url,
                    expires,
                })
            }
        }
    }

    /// The current session, renewed when it is about to expire (or `renew` says so).
    async fn session(&self, renew: bool) -> Result<Session> {
        let mut guard = self.session.lock().await;
        if let Some(session) = guard.as_ref() {
            let fresh = session
                .expires
                .is_none_or(|e| e > Instant::now() + TOKEN_MARGIN);
            if fresh && !renew {
                return Ok(session.clone());
            }
        }
        let session = self.authenticate().await?;
        *guard = Some(session.clone());
        Ok(session)
    }

    /// Sends a request built by `build` (from the storage URL), re-authenticating once on
    /// a 401. The request must have a re-sendable body.
    async fn send<F>(&self, what: &str, build: F) -> Result<Response>
    where
        F: Fn(&reqwest::Client, &str) -> RequestBuilder,
    {
        let mut renewed = false;
        loop {
            let session = self.session(renewed).await?;
            let response = build(&self.http, &session.storage_url)
                .header("X-Auth-Token", &session.token)
                .send()
                .await
                .map_err(|e| transport_error(what, e))?;
            if response.status() == StatusCode::UNAUTHORIZED && !renewed {
                renewed = true;
                continue;
            }
            return Ok(response);
        }
    }

    async fn ensure_containers(&self) -> Result<()> {
        let mut ready = self.containers_ready.lock().await;
        if *ready {
            return Ok(());
        }
        for container in [&self.settings.container, &self.segments] {
            let what = format!("creating container {container}");
            let response = self
                .send(&what, |http, url| http.put(format!("{url}/{container}")))
                .await?;
            check(response, &what).await?;
        }
        *ready = true;
        Ok(())
    }

    /// Lists a container under a name prefix (all pages).
    async fn list_container(&self, container: &str, prefix: &str) -> Result<Vec<ListEntry>> {
        let mut entries = Vec::new();
        let mut marker = String::new();
        loop {
            let what = format!("listing {container}");
            let response = self
                .send(&what, |http, url| {
                    http.get(format!(
                        "{url}/{container}?format=json&prefix={}&marker={}",
                        encode(prefix),
                        encode(&marker)
                    ))
                })
                .await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(entries);
            }
            let response = check(response, &what).await?;
            let page: Vec<ListEntry> = response
                .json()
                .await
                .map_err(|e| storage_error(&what, true, e))?;
            let Some(last) = page.last().and_then(|e| e.name.clone()) else {
                return Ok(entries);
            };
            marker = last;
            entries.extend(page);
        }
    }

    /// Deletes one object; `query` is `""` or `"multipart-manifest=delete"`.
    async fn delete_object(&self, container: &str, name: &str, query: &str) -> Result<()> {
        let what = format!("deleting {container}/{name}");
        let response = self
            .send(&what, |http, url| {
                http.delete(format!("{url}/{container}/{name}?{query}"))
                    .header("Accept", "application/json")
            })
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        let response = check(response, &what).await?;
        if query.is_empty() {
            return Ok(());
        }
        // A manifest delete answers 200 with its own status and errors in the body.
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let status = body["Response Status"].as_str().unwrap_or("200 OK");
        let errors = body["Errors"].as_array().map_or(0, Vec::len);
        if (status.starts_with('2') || status.starts_with("404")) && errors == 0 {
            return Ok(());
        }
        Err(storage_msg(
            &format!("{what}: {status}, {errors} segment errors"),
            true,
        ))
    }

    /// Deletes every segment whose name starts with `group` (`<name>/+<upload id>/` or
    /// `<name>/+`), except those under `keep`.
    async fn delete_segments(&self, group: &str, keep: Option<&str>) -> Result<usize> {
        let mut deleted = 0;
        for entry in self.list_container(&self.segments, group).await? {
            let Some(name) = entry.name else { continue };
            if keep.is_some_and(|k| name.starts_with(k)) {
                continue;
            }
            self.delete_object(&self.segments, &name, "").await?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// The headers of the complete object `name`, or `None` when it does not exist.
    async fn head(&self, name: &str) -> Result<Option<reqwest::header::HeaderMap>> {
        let container = &self.settings.container;
        let what = format!("reading {container}/{name}");
        let response = self
            .send(&what, |http, url| {
                http.head(format!("{url}/{container}/{name}"))
            })
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(check(response, &what).await?.headers().clone()))
    }

    /// Whether `name` is a Static Large Object manifest (false when it does not exist).
    async fn is_large_object(&self, name: &str) -> Result<bool> {
        Ok(self.head(name).await?.is_some_and(|headers| {
            headers
                .get("x-static-large-object")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        }))
    }

    /// The upload id of the complete object `name`, if it is a segmented one.
    async fn current_upload(&self, name: &str) -> Result<Option<String>> {
        Ok(self.head(name).await?.and_then(|headers| {
            headers
                .get(UPLOAD_META)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }))
    }

    async fn put_plain(&self, name: &str, body: Bytes) -> Result<()> {
        let container = &self.settings.container;
        let what = format!("storing {container}/{name}");
        let response = self
            .send(&what, |http, url| {
                http.put(format!("{url}/{container}/{name}"))
                    // reqwest sends no Content-Length for an empty body; Swift needs one.
                    .header("Content-Length", body.len())
                    .body(body.clone())
            })
            .await?;
        check(response, &what).await?;
        Ok(())
    }

    /// Streams one segment: `first`, then chunks of `data` until `limit` bytes. Returns
    /// the segment's manifest entry and what was read past the segment's end.
    async fn put_segment(
        &self,
        segment: &str,
        first: Bytes,
        data: &mut ByteStream,
        limit: u64,
        total: &mut u64,
    ) -> Result<(SegmentEntry, Bytes, bool)> {
        // A streamed body cannot be sent twice, so a 401 must not happen on it: a cheap
        // request first renews an expired or revoked token.
        let what = format!("checking the token before segment {segment}");
        let response = self
            .send(&what, |http, url| {
                http.head(format!("{url}/{}", self.segments))
            })
            .await?;
        check(response, &what).await?;
        let session = self.session(false).await?;
        let (tx, rx) = mpsc::channel::<Piece>(4);
        // The body ends cleanly only on `Piece::End`: if the feeding side stops for any
        // other reason (a failed source, a stall, the put dropped), the body fails and the
        // server discards the segment instead of storing a truncated one.
        let body = reqwest::Body::wrap_stream(futures::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(Piece::Data(bytes)) => Some((Ok(bytes), Some(rx))),
                Some(Piece::End) => None,
                None => Some((Err(Error::Cancelled), None)),
            }
        }));
        let request = self
            .upload_http
            .put(format!(
                "{}/{}/{segment}",
                session.storage_url, self.segments
            ))
            .header("X-Auth-Token", &session.token)
            .body(body)
            .send();
        let idle = self.settings.idle_timeout;
        let stalled = || Error::Timeout {
            what: format!("uploading segment {segment} (no progress)"),
            after: idle,
        };
        let mut pending = first;
        let mut size = 0u64;
        let mut ended = false;
        let feed = async {
            while size < limit {
                if pending.is_empty() {
                    match data.next().await {
                        Some(Ok(chunk)) => pending = chunk,
                        Some(Err(e)) => return Err(e),
                        None => {
                            ended = true;
                            break;
                        }
                    }
                    continue;
                }
                let room = usize::try_from(limit - size)
                    .unwrap_or(usize::MAX)
                    .min(MAX_PIECE);
                let piece = if pending.len() > room {
                    pending.split_to(room)
                } else {
                    std::mem::take(&mut pending)
                };
                size += piece.len() as u64;
                *total += piece.len() as u64;
                match tokio::time::timeout(idle, tx.send(Piece::Data(piece))).await {
                    Ok(Ok(())) => {}
                    // The request ended early; its response says why.
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => return Err(stalled()),
                }
            }
            match tokio::time::timeout(idle, tx.send(Piece::End)).await {
                Ok(_) => Ok(()),
                Err(_) => Err(stalled()),
            }
        };
        let response = {
            let mut request = std::pin::pin!(request);
            let mut feed = std::pin::pin!(feed);
            let (fed, response) = tokio::select! {
                fed = &mut feed => (fed, None),
                response = &mut request => (feed.await, Some(response)),
            };
            fed?;
            match response {
                Some(response) => response,
                // The body is handed over: the server has one idle period to answer.
                None => tokio::time::timeout(idle, request)
                    .await
                    .map_err(|_| Error::Timeout {
                        what: format!("waiting for Swift to store segment {segment}"),
                        after: idle,
                    })?,
            }
        };
        let what = format!("storing segment {segment}");
        let response = response.map_err(|e| transport_error(&what, e))?;
        let response = check(response, &what).await?;
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim_matches('"').to_owned());
        Ok((
            SegmentEntry {
                path: format!("/{}/{segment}", self.segments),
                etag,
                size_bytes: size,
            },
            pending,
            ended,
        ))
    }

    async fn put_segmented(
        &self,
        name: &str,
        upload: &str,
        first: Bytes,
        data: &mut ByteStream,
        mut total: u64,
    ) -> Result<u64> {
        let mut entries = Vec::new();
        let mut pending = first;
        loop {
            if entries.len() >= MAX_SEGMENTS {
                return Err(storage_msg(
                    &format!("{name} needs more than {MAX_SEGMENTS} segments"),
                    false,
                ));
            }
            let segment = format!("{}{:08}", segment_group(name, upload), entries.len() + 1);
            let limit = segment_size_for(self.settings.segment_size, entries.len());
            let (entry, rest, ended) = self
                .put_segment(&segment, pending, data, limit, &mut total)
                .await?;
            entries.push(entry);
            pending = rest;
            if ended {
                break;
            }
            // Never an empty last segment: look ahead for more data first.
            while pending.is_empty() {
                match data.next().await {
                    Some(chunk) => pending = chunk?,
                    None => break,
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        let container = &self.settings.container;
        let what = format!("storing the manifest of {container}/{name}");
        let manifest = serde_json::to_vec(&entries).map_err(|e| storage_error(&what, false, e))?;
        let manifest = Bytes::from(manifest);
        let response = self
            .send(&what, |http, url| {
                http.put(format!("{url}/{container}/{name}?multipart-manifest=put"))
                    .header(UPLOAD_META, upload)
                    .body(manifest.clone())
            })
            .await?;
        check(response, &what).await?;
        Ok(total)
    }

    /// Deletes the segments of replaced versions of `name` (all but the current one).
    /// Assumes no other put of the same key runs at the same time: it would delete that
    /// put's segments. Phoenix's keys name one backup attempt each, so they never meet.
    async fn delete_replaced_segments(&self, name: &str) -> Result<()> {
        let current = self.current_upload(name).await?;
        let keep = current.map(|id| segment_group(name, &id));
        self.delete_segments(&format!("{name}/+"), keep.as_deref())
            .await
            .map(|_| ())
    }

    /// Segment groups (`<name>/<upload>/`) under `prefix` that no complete object uses,
    /// with their segments and their age.
    async fn orphan_groups(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, (Vec<String>, Duration)>> {
        let full = format!("{}{prefix}", self.settings.prefix);
        let mut groups: BTreeMap<String, (Vec<String>, Duration)> = BTreeMap::new();
        let now = chrono::Utc::now();
        for entry in self.list_container(&self.segments, &full).await? {
            let Some(name) = entry.name else { continue };
            let mut parts = name.rsplitn(3, '/');
            let (Some(_n), Some(upload), Some(object)) = (
                parts.next(),
                parts.next().and_then(|u| u.strip_prefix('+')),
                parts.next(),
            ) else {
                continue;
            };
            let age = entry
                .last_modified
                .as_deref()
                .and_then(parse_listing_time)
                .and_then(|t| (now - t).to_std().ok())
                .unwrap_or_default();
            let group = groups
                .entry(segment_group(object, upload))
                .or_insert_with(|| (Vec::new(), age));
            group.0.push(name.clone());
            group.1 = group.1.min(age);
        }
        let mut orphans = BTreeMap::new();
        for (group, value) in groups {
            let mut parts = group.trim_end_matches('/').rsplitn(2, "/+");
            let (Some(upload), Some(object)) = (parts.next(), parts.next()) else {
                continue;
            };
            if self.current_upload(object).await?.as_deref() != Some(upload) {
                orphans.insert(group, value);
            }
        }
        Ok(orphans)
    }
}

impl SwiftStore {
    /// Removes what the failed or dropped upload `upload` of `name` left: its manifest, if
    /// the manifest PUT reached the server although its answer was lost (the object would
    /// be visible while the put reports an error), then its segments. `attempts` times with
    /// backoff while Swift fails; true when done.
    async fn clean_upload(&self, name: &str, upload: &str, attempts: u32) -> bool {
        let group = segment_group(name, upload);
        with_backoff(attempts, "deleting a failed upload", &group, || async {
            if self.current_upload(name).await?.as_deref() == Some(upload) {
                self.delete_object(&self.settings.container, name, "multipart-manifest=delete")
                    .await?;
            }
            self.delete_segments(&group, None).await.map(|_| ())
        })
        .await
    }

    /// Cleans up after a failed or dropped put, in the background where it must wait.
    fn clean_upload_later(&self, name: String, upload: String) {
        let store = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                store.clean_upload(&name, &upload, 12).await;
                // A request whose answer was lost (a segment or the manifest) may still be
                // committed by the server after the first pass.
                tokio::time::sleep(Duration::from_secs(2)).await;
                store.clean_upload(&name, &upload, 3).await
            });
        }
    }
}

fn not_found(key: &ObjectKey) -> Error {
    Error::NotFound {
        key: key.to_string(),
    }
}

fn parse_listing_time(t: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

#[async_trait::async_trait]
impl Store for SwiftStore {
    async fn put(&self, key: &ObjectKey, mut data: ByteStream) -> Result<u64> {
        let name = self.full_name(key);
        self.ensure_containers().await?;
        let small = SMALL_OBJECT.min(self.settings.segment_size);
        let buffer = match read_head(&mut data, small).await? {
            Head::Whole(object) => {
                let total = object.len() as u64;
                self.put_plain(&name, object).await?;
                if let Err(e) = self.delete_replaced_segments(&name).await {
                    warn!(key = %key, error = %e, "Could not delete the segments of a replaced object.");
                }
                return Ok(total);
            }
            Head::Partial(buffer) => buffer,
        };
        let upload = random_id();
        let mut guard = PutGuard {
            store: self.clone(),
            name: name.clone(),
            upload: upload.clone(),
            armed: true,
        };
        let result = self
            // Every byte, the buffered ones included, is counted as it goes into a segment.
            .put_segmented(&name, &upload, buffer.freeze(), &mut data, 0)
            .await;
        guard.armed = false;
        match result {
            Ok(total) => {
                if let Err(e) = self.delete_replaced_segments(&name).await {
                    warn!(key = %key, error = %e, "Could not delete the segments of a replaced object.");
                }
                Ok(total)
            }
            Err(e) => {
                // Inline first, so that the put returns with nothing visible whenever Swift
                // answers; then again in the background, as a lost answer may still be
                // committed.
                self.clean_upload(&name, &upload, 3).await;
                self.clean_upload_later(name, upload);
                Err(e)
            }
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<ByteStream> {
        let name = self.full_name(key);
        let container = &self.settings.container;
        let what = format!("reading {container}/{name}");
        let response = self
            .send(&what, |http, url| {
                http.get(format!("{url}/{container}/{name}"))
            })
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(not_found(key));
        }
        let response = check(response, &what).await?;
        let stream = response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|e| storage_error(&what, true, e)));
        Ok(Box::pin(stream))
    }

    async fn stat(&self, key: &ObjectKey) -> Result<ObjectInfo> {
        let name = self.full_name(key);
        let container = &self.settings.container;
        let what = format!("reading {container}/{name}");
        let response = self
            .send(&what, |http, url| {
                http.head(format!("{url}/{container}/{name}"))
            })
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(not_found(key));
        }
        let response = check(response, &what).await?;
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok());
        Ok(ObjectInfo {
            key: key.clone(),
            size: header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or_default(),
            modified: header("last-modified")
                .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
                .map(|t| t.with_timezone(&chrono::Utc)),
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = format!("{}{prefix}", self.settings.prefix);
        let mut objects = Vec::new();
        for entry in self.list_container(&self.settings.container, &full).await? {
            let Some(name) = entry.name else { continue };
            let Some(Ok(key)) = name
                .strip_prefix(&self.settings.prefix)
                .map(ObjectKey::parse)
            else {
                continue;
            };
            objects.push(ObjectInfo {
                key,
                size: entry.bytes.unwrap_or_default(),
                modified: entry.last_modified.as_deref().and_then(parse_listing_time),
            });
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let name = self.full_name(key);
        // Swift refuses `?multipart-manifest=delete` on a plain object (400, "Not an SLO
        // manifest"), and a plain DELETE of a manifest would leave its segments.
        let query = if self.is_large_object(&name).await? {
            "multipart-manifest=delete"
        } else {
            ""
        };
        self.delete_object(&self.settings.container, &name, query)
            .await?;
        // Segments a failed clean-up left behind belong to the object too.
        self.delete_segments(&format!("{name}/+"), None).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sweep for SwiftStore {
    async fn leftovers(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .orphan_groups(prefix)
            .await?
            .into_values()
            .flat_map(|(names, _)| names)
            .collect())
    }

    async fn sweep(&self, prefix: &str, older_than: Duration) -> Result<usize> {
        let mut removed = 0;
        for (group, (names, age)) in self.orphan_groups(prefix).await? {
            if age >= older_than {
                self.delete_segments(&group, None).await?;
                removed += names.len();
            }
        }
        Ok(removed)
    }
}

/// The size of segment `index` (from 0): `first`, doubled every [`SEGMENTS_PER_SIZE`]
/// segments, at most [`MAX_SEGMENT_SIZE`].
fn segment_size_for(first: u64, index: usize) -> u64 {
    let doublings = u32::try_from(index / SEGMENTS_PER_SIZE)
        .unwrap_or(u32::MAX)
        .min(20);
    first
        .saturating_mul(1 << doublings)
        .min(MAX_SEGMENT_SIZE.max(first))
}

/// The segment name prefix of one upload: `+` is no key character, so the group of key
/// `a` never contains the segments of key `a/b`.
fn segment_group(name: &str, upload: &str) -> String {
    format!("{name}/+{upload}/")
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Deletes a dropped put's manifest and segments when armed (the put future was dropped).
struct PutGuard {
    store: SwiftStore,
    name: String,
    upload: String,
    armed: bool,
}

impl Drop for PutGuard {
    fn drop(&mut self) {
        if self.armed {
            self.store.clean_upload_later(
                std::mem::take(&mut self.name),
                std::mem::take(&mut self.upload),
            );
        }
    }
}

/// What the feeding side of a segment upload hands to the request body.
enum Piece {
    Data(Bytes),
    End,
}

#[derive(serde::Serialize)]
struct SegmentEntry {
    path: String,
    etag: Option<String>,
    size_bytes: u64,
}

#[derive(Deserialize)]
struct KeystoneResponse {
    token: KeystoneToken,
}

#[derive(Deserialize)]
struct KeystoneToken {
    expires_at: Option<String>,
    #[serde(default)]
    catalog: Vec<KeystoneService>,
}

#[derive(Deserialize)]
struct KeystoneService {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    endpoints: Vec<KeystoneEndpoint>,
}

#[derive(Deserialize)]
struct KeystoneEndpoint {
    interface: String,
    url: String,
}

fn storage_error(
    what: &str,
    retryable: bool,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Storage {
        message: format!("{what}: {source}"),
        retryable,
        source: Some(Box::new(source)),
    }
}

fn transport_error(what: &str, e: reqwest::Error) -> Error {
    let retryable = e.is_connect() || e.is_timeout() || e.is_request() || e.is_body();
    storage_error(what, retryable, e)
}

/// Turns a non-success status into an error: 5xx, 408 and 429 may succeed later.
async fn check(response: Response, what: &str) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retryable = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    let body = response.text().await.unwrap_or_default();
    let body: String = body.chars().take(200).collect();
    Err(storage_msg(
        &format!("{what}: HTTP {status} {body}"),
        retryable,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_grow_so_one_manifest_holds_terabytes() {
        assert_eq!(
            segment_size_for(DEFAULT_SEGMENT_SIZE, 0),
            DEFAULT_SEGMENT_SIZE
        );
        assert_eq!(
            segment_size_for(DEFAULT_SEGMENT_SIZE, 250),
            2 * DEFAULT_SEGMENT_SIZE
        );
        assert_eq!(
            segment_size_for(DEFAULT_SEGMENT_SIZE, 999),
            MAX_SEGMENT_SIZE
        );
        let capacity: u64 = (0..MAX_SEGMENTS)
            .map(|i| segment_size_for(DEFAULT_SEGMENT_SIZE, i))
            .sum();
        assert!(capacity > 2 * 1024 * 1024 * 1024 * 1024, "{capacity}");
    }

    #[test]
    fn a_segment_group_never_contains_another_keys_segments() {
        let group = segment_group("a", "id");
        assert!(!segment_group("a/b", "id").starts_with(&group));
        assert!(!"a/b/+id/00000001".starts_with("a/+"));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("a b/c+d"), "a%20b%2Fc%2Bd");
        assert_eq!(encode("t-1_x.~"), "t-1_x.~");
    }
}
