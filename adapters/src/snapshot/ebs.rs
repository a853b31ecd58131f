//! EBS snapshots of an instance's volume, through the EC2 API (aws-sdk-ec2).
//!
//! The client is built from explicit configuration only: a region, an optional endpoint
//! and static credentials. It never builds the AWS default provider chain, so it never
//! asks the instance metadata service (169.254.169.254), a profile file, the environment
//! or a container endpoint for credentials or a region; configuration without
//! credentials is refused when the client is built.
//!
//! Snapshots are regional: a snapshot of a volume in one availability zone restores into
//! any zone of its region, so a zone mismatch between the snapshot's source volume and the
//! instance is no error. A snapshot from another region is refused with
//! [`Error::Invalid`] rather than copied: a CopySnapshot makes a second snapshot that no
//! manifest records (and that retention would never delete), and a cross-region copy of
//! a large snapshot takes hours; copying is an operator's deliberate step. A zone that is
//! not in the region is refused before CreateVolume is called.
//!
//! Real snapshots stay `pending` for minutes to hours. Every wait polls with backoff up
//! to [`PollPolicy::deadline`]; a wait that ends (deadline, error) leaves the resource in
//! place, tagged, for retention and crash recovery to find. A snapshot is never reported
//! taken before EC2 says `completed`, and a deletion is never reported for a snapshot
//! that belongs to another region (EC2 would answer "not found" there).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, ResourceType, Snapshot, SnapshotState, Tag, TagSpecification, Volume,
    VolumeAttachmentState, VolumeState,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backup::SnapshotRef;
use crate::ids::{BackupId, InstanceId};
use crate::{Error, Result};

/// [`SnapshotRef::provider`] of an EBS snapshot.
pub const PROVIDER: &str = "ebs";
/// Tag key of a snapshot: the instance whose volume it copies.
pub const TAG_INSTANCE: &str = "phoenix:instance";
/// Tag key of a snapshot: the backup it is.
pub const TAG_BACKUP: &str = "phoenix:backup";
/// Tag key of a snapshot: the availability zone of its source volume.
pub const TAG_ZONE: &str = "phoenix:availability-zone";
/// Tag key of a restored volume: the snapshot it was made from.
pub const TAG_RESTORED_FROM: &str = "phoenix:restored-from";
/// [`SnapshotRef::details`] key: the availability zone of the source volume.
pub const DETAIL_ZONE: &str = "availability_zone";
/// [`SnapshotRef::details`] key: the source volume.
pub const DETAIL_VOLUME: &str = "volume_id";

const SERVICE: &str = "ec2";
const GIB: u64 = 1 << 30;

/// How long and how often a wait for EC2 polls: `first`, then doubling up to
/// `max_interval`, until `deadline` has passed since the wait began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPolicy {
    pub first: Duration,
    pub max_interval: Duration,
    pub deadline: Duration,
}

impl Default for PollPolicy {
    /// 5 s, then up to a minute between looks, for six hours: the first snapshot of a
    /// large volume copies every block and can take hours.
    fn default() -> Self {
        Self {
            first: Duration::from_secs(5),
            max_interval: Duration::from_secs(60),
            deadline: Duration::from_secs(6 * 3600),
        }
    }
}

impl PollPolicy {
    fn validate(&self) -> Result<()> {
        if self.first.is_zero() || self.max_interval < self.first || self.deadline < self.first {
            return Err(Error::Invalid(format!(
                "the EBS poll policy needs 0 < first <= max_interval and first <= deadline \
                 (got {self:?})"
            )));
        }
        Ok(())
    }

    /// The pause after one of `interval`.
    fn next(&self, interval: Duration) -> Duration {
        interval.saturating_mul(2).min(self.max_interval)
    }
}

/// How to reach EC2. Credentials are required (see the module documentation).
#[derive(Clone)]
pub struct EbsConfig {
    pub region: String,
    /// An EC2-compatible endpoint (`http://127.0.0.1:5000`); AWS when `None`.
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub poll: PollPolicy,
}

impl fmt::Debug for EbsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "<redacted>");
        f.debug_struct("EbsConfig")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &redacted(&self.access_key_id))
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("poll", &self.poll)
            .finish()
    }
}

/// What a snapshot's tags say it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTags {
    pub instance_id: InstanceId,
    pub backup_id: BackupId,
}

/// A resource EC2 prepares in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preparing {
    /// A snapshot, ready when `completed`.
    Snapshot(String),
    /// A volume, ready when `available`.
    Volume(String),
    /// A volume's attachment to an instance, ready when `attached`.
    Attachment(String),
}

impl Preparing {
    fn operation(&self) -> &'static str {
        match self {
            Self::Snapshot(_) => "CreateSnapshot",
            Self::Volume(_) => "CreateVolume",
            Self::Attachment(_) => "AttachVolume",
        }
    }
}

impl fmt::Display for Preparing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Snapshot(id) => write!(f, "EBS snapshot {id}"),
            Self::Volume(id) => write!(f, "EBS volume {id}"),
            Self::Attachment(id) => write!(f, "the attachment of EBS volume {id}"),
        }
    }
}

/// What one look at a [`Preparing`] resource found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Still being prepared: the state EC2 reports (`pending 42%`, `creating`).
    Working(String),
    /// Ready to use.
    Ready,
    /// EC2 gave up on it (state `error`), with its message.
    Failed(String),
}

/// How [`EbsSnapshots`] waits for a resource EC2 prepares in the background: one look at
/// its state, a pause between two looks, and the clock the deadline is measured on.
///
/// The production waiter is [`Ec2Waiter`]. Any other implementation exists to test the
/// poll (an emulator completes snapshots at once) and MUST be named as a test double.
/// `pause` MUST NOT return before `now` has advanced by the interval, or the deadline
/// never comes.
///
/// # Errors
/// `look` returns the EC2 error of its call. The wait looks past retryable ones until the
/// deadline, and past [`Error::NotFound`] until the resource has been seen once (EC2's
/// API is eventually consistent: a new snapshot may not be visible at once); any other
/// error ends the wait.
///
/// # Cancellation
/// Dropping a wait stops the polling; the resource stays on EC2, tagged.
#[async_trait::async_trait]
pub trait Waiter: Send + Sync + fmt::Debug {
    /// Looks at the resource once.
    async fn look(&self, resource: &Preparing) -> Result<Progress>;
    /// Waits `interval` before the next look.
    async fn pause(&self, interval: Duration);
    /// The clock of the deadline.
    fn now(&self) -> Instant;
}

/// The production [`Waiter`]: DescribeSnapshots or DescribeVolumes, and tokio's clock.
#[derive(Debug, Clone)]
pub struct Ec2Waiter {
    client: Client,
}

#[async_trait::async_trait]
impl Waiter for Ec2Waiter {
    async fn look(&self, resource: &Preparing) -> Result<Progress> {
        match resource {
            Preparing::Snapshot(id) => {
                let snapshot = describe_snapshot(&self.client, id).await?;
                Ok(match snapshot.state() {
                    Some(SnapshotState::Completed) => Progress::Ready,
                    Some(SnapshotState::Error) => Progress::Failed(
                        snapshot.state_message().unwrap_or("no message").to_owned(),
                    ),
                    state => Progress::Working(format!(
                        "{} {}",
                        state.map_or("unknown", SnapshotState::as_str),
                        snapshot.progress().unwrap_or_default()
                    )),
                })
            }
            Preparing::Volume(id) => {
                let volume = describe_volume(&self.client, id).await?;
                Ok(match volume.state() {
                    Some(VolumeState::Available) => Progress::Ready,
                    Some(
                        state @ (VolumeState::Error | VolumeState::Deleting | VolumeState::Deleted),
                    ) => Progress::Failed(format!("the volume is {}", state.as_str())),
                    state => {
                        Progress::Working(state.map_or("unknown", VolumeState::as_str).to_owned())
                    }
                })
            }
            Preparing::Attachment(id) => {
                let volume = describe_volume(&self.client, id).await?;
                let state = volume.attachments().first().and_then(|a| a.state());
                Ok(match state {
                    Some(VolumeAttachmentState::Attached) => Progress::Ready,
                    Some(VolumeAttachmentState::Detached) => {
                        Progress::Failed("the volume was detached".to_owned())
                    }
                    state => Progress::Working(
                        state
                            .map_or("not attached yet", VolumeAttachmentState::as_str)
                            .to_owned(),
                    ),
                })
            }
        }
    }

    async fn pause(&self, interval: Duration) {
        tokio::time::sleep(interval).await;
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// EBS snapshots in one region.
#[derive(Debug, Clone)]
pub struct EbsSnapshots {
    client: Client,
    region: String,
    poll: PollPolicy,
    waiter: Arc<dyn Waiter>,
}

impl EbsSnapshots {
    /// Builds the client. Contacts nothing: a wrong endpoint or refused credentials show
    /// on first use.
    ///
    /// # Errors
    /// [`Error::Invalid`] without a region or credentials, with an endpoint that is not an
    /// `http(s)://` URL, or with a poll policy that makes no sense.
    pub fn new(config: EbsConfig) -> Result<Self> {
        config.poll.validate()?;
        if config.region.is_empty() {
            return Err(Error::Invalid(
                "EBS snapshots need an EC2 region".to_owned(),
            ));
        }
        let credentials = match (config.access_key_id, config.secret_access_key) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                Credentials::new(id, secret, None, None, "phoenix-configuration")
            }
            (None, None) => {
                return Err(Error::Invalid(
                    "EBS snapshots need credentials in the configuration (access_key_id and \
                     secret_access_key); Phoenix never asks the instance metadata service or \
                     the environment for them"
                        .to_owned(),
                ));
            }
            _ => {
                return Err(Error::Invalid(
                    "EBS snapshots need both access_key_id and secret_access_key".to_owned(),
                ));
            }
        };
        let mut builder = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(Error::Invalid(format!(
                    "the EC2 endpoint must be an http:// or https:// URL, not {endpoint:?}"
                )));
            }
            builder = builder.endpoint_url(endpoint);
        }
        let client = Client::from_conf(builder.build());
        Ok(Self {
            waiter: Arc::new(Ec2Waiter {
                client: client.clone(),
            }),
            client,
            region: config.region,
            poll: config.poll,
        })
    }

    /// The same snapshots, waited for by `waiter` instead of [`Ec2Waiter`].
    #[must_use]
    pub fn with_waiter(mut self, waiter: Arc<dyn Waiter>) -> Self {
        self.waiter = waiter;
        self
    }

    /// The production waiter on this client (for a waiter that wraps it).
    pub fn ec2_waiter(&self) -> Ec2Waiter {
        Ec2Waiter {
            client: self.client.clone(),
        }
    }

    /// The EC2 client, for the volumes of an EC2 host (`infrastructure::ebs`).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The configured region: [`SnapshotRef::location`] of every snapshot taken here.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Snapshots `volume_id`, tagged with `tags`, and waits until EC2 says `completed`:
    /// [`start`](Self::start), then [`complete`](Self::complete).
    ///
    /// # Errors
    /// As `start` and `complete`.
    pub async fn create(&self, volume_id: &str, tags: &SnapshotTags) -> Result<SnapshotRef> {
        let snapshot_id = self.start(volume_id, tags).await?;
        self.complete(&snapshot_id, tags).await
    }

    /// Starts a snapshot of `volume_id`, tagged with `tags`, and returns its id. The
    /// snapshot holds the volume as it was when this call returned; EC2 copies it in the
    /// background ([`complete`](Self::complete) waits for that).
    ///
    /// A snapshot of the same volume already tagged with the same instance and backup
    /// (a retried backup after a crash) is returned instead of taking a second one.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a volume EC2 does not know; [`Error::Cloud`] for a refused
    /// call ([`Error::is_retryable`] says whether trying again may help).
    pub async fn start(&self, volume_id: &str, tags: &SnapshotTags) -> Result<String> {
        check_id("volume", "vol-", volume_id)?;
        let zone = self.volume_zone(volume_id).await?;
        let adopted = self
            .tagged(&tags.instance_id, Some(&tags.backup_id))
            .await?
            .into_iter()
            .find(|s| s.volume_id() == Some(volume_id) && s.state() != Some(&SnapshotState::Error))
            .and_then(|s| s.snapshot_id().map(str::to_owned));
        match adopted {
            Some(id) => {
                info!(
                    snapshot_id = %id, volume_id, instance_id = %tags.instance_id,
                    backup_id = %tags.backup_id,
                    "Adopting the EBS snapshot an earlier attempt took."
                );
                Ok(id)
            }
            None => self.start_snapshot(volume_id, &zone, tags).await,
        }
    }

    /// Waits until the snapshot `snapshot_id` (of backup `tags`) is `completed`, and
    /// returns its reference.
    ///
    /// # Errors
    /// [`Error::Timeout`] naming the snapshot past the poll deadline, and
    /// [`Error::Cloud`] for a snapshot in state `error` (in both cases the snapshot
    /// stays, tagged, for retention); [`Error::Cloud`] for a refused call.
    pub async fn complete(&self, snapshot_id: &str, tags: &SnapshotTags) -> Result<SnapshotRef> {
        check_id("snapshot", "snap-", snapshot_id)?;
        let resource = Preparing::Snapshot(snapshot_id.to_owned());
        self.wait(
            &resource,
            &format!(
                "left in place, tagged {TAG_BACKUP}={}, for retention",
                tags.backup_id
            ),
        )
        .await?;
        let snapshot = describe_snapshot(&self.client, snapshot_id).await?;
        let reference = self.reference(&snapshot).ok_or_else(|| {
            malformed(
                "DescribeSnapshots",
                format!("EC2 described {snapshot_id} without its id"),
            )
        })?;
        info!(
            snapshot_id, volume_id = snapshot.volume_id(), instance_id = %tags.instance_id,
            backup_id = %tags.backup_id, size_bytes = reference.size_bytes,
            "EBS snapshot completed."
        );
        Ok(reference)
    }

    /// Whether the snapshot exists (in any state but `error`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a reference that is not an EBS snapshot of this region;
    /// [`Error::Cloud`] for a refused call.
    pub async fn exists(&self, snapshot: &SnapshotRef) -> Result<bool> {
        let snapshot_id = self.check_ref(snapshot)?;
        match describe_snapshot(&self.client, snapshot_id).await {
            Ok(found) => Ok(found.state() != Some(&SnapshotState::Error)),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes a new volume from `snapshot` in `availability_zone` and waits until EC2 says
    /// `available`; returns the volume's id. Any zone of the snapshot's region will do.
    ///
    /// # Errors
    /// [`Error::Invalid`], before EC2 is asked to create anything, for a reference that is
    /// not an EBS snapshot of this region or a zone that is not in this region;
    /// [`Error::NotFound`] for a snapshot EC2 does not know; [`Error::Timeout`] or
    /// [`Error::Cloud`] when the volume does not become available (it stays, tagged
    /// [`TAG_RESTORED_FROM`]).
    pub async fn restore(&self, snapshot: &SnapshotRef, availability_zone: &str) -> Result<String> {
        self.restore_tagged(snapshot, availability_zone, &[]).await
    }

    /// [`restore`](Self::restore), with `tags` on the new volume besides
    /// [`TAG_RESTORED_FROM`].
    ///
    /// # Errors
    /// As `restore`.
    pub async fn restore_tagged(
        &self,
        snapshot: &SnapshotRef,
        availability_zone: &str,
        tags: &[(&str, &str)],
    ) -> Result<String> {
        let snapshot_id = self.check_ref(snapshot)?;
        self.check_zone(availability_zone).await?;
        let created = self
            .client
            .create_volume()
            .availability_zone(availability_zone)
            .snapshot_id(snapshot_id)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(
                        tags.iter()
                            .map(|(key, value)| tag(key, value))
                            .chain(std::iter::once(tag(TAG_RESTORED_FROM, snapshot_id)))
                            .collect(),
                    ))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| ec2_error(e, "CreateVolume", snapshot_id, "InvalidSnapshot.NotFound"))?;
        let volume_id = created
            .volume_id()
            .ok_or_else(|| {
                malformed(
                    "CreateVolume",
                    format!("EC2 gave no volume id for a volume from {snapshot_id}"),
                )
            })?
            .to_owned();
        self.wait(
            &Preparing::Volume(volume_id.clone()),
            &format!("left in place, tagged {TAG_RESTORED_FROM}={snapshot_id}"),
        )
        .await?;
        info!(
            snapshot_id,
            volume_id, availability_zone, "EBS volume restored from a snapshot."
        );
        Ok(volume_id)
    }

    /// Deletes `snapshot`; one that is already gone is success.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a reference that is not an EBS snapshot of this region (EC2
    /// would call it "not found" here, which must not pass for deleted); [`Error::Cloud`]
    /// for a refused call (e.g. a snapshot an AMI uses).
    pub async fn delete(&self, snapshot: &SnapshotRef) -> Result<()> {
        let snapshot_id = self.check_ref(snapshot)?;
        match self
            .client
            .delete_snapshot()
            .snapshot_id(snapshot_id)
            .send()
            .await
        {
            Ok(_) => {
                info!(snapshot_id, "EBS snapshot deleted.");
                Ok(())
            }
            Err(e) => match ec2_error(e, "DeleteSnapshot", snapshot_id, "InvalidSnapshot.NotFound")
            {
                Error::NotFound { .. } => {
                    debug!(snapshot_id, "EBS snapshot already deleted.");
                    Ok(())
                }
                other => Err(other),
            },
        }
    }

    /// This account's snapshots in this region tagged with `instance_id` (and `backup_id`
    /// when given), in any state, oldest first: what retention and crash recovery work on.
    ///
    /// # Errors
    /// [`Error::Cloud`] for a refused call.
    pub async fn find(
        &self,
        instance_id: &InstanceId,
        backup_id: Option<&BackupId>,
    ) -> Result<Vec<SnapshotRef>> {
        let mut snapshots = self.tagged(instance_id, backup_id).await?;
        snapshots.sort_by(|a, b| {
            let key = |s: &Snapshot| {
                (
                    s.start_time().map(|t| (t.secs(), t.subsec_nanos())),
                    s.snapshot_id().map(str::to_owned),
                )
            };
            key(a).cmp(&key(b))
        });
        Ok(snapshots.iter().filter_map(|s| self.reference(s)).collect())
    }

    async fn volume_zone(&self, volume_id: &str) -> Result<String> {
        describe_volume(&self.client, volume_id)
            .await?
            .availability_zone()
            .map(str::to_owned)
            .ok_or_else(|| {
                malformed(
                    "DescribeVolumes",
                    format!("EC2 gave no zone for {volume_id}"),
                )
            })
    }

    async fn start_snapshot(
        &self,
        volume_id: &str,
        zone: &str,
        tags: &SnapshotTags,
    ) -> Result<String> {
        let output = self
            .client
            .create_snapshot()
            .volume_id(volume_id)
            .description("Phoenix backup")
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .tags(tag(TAG_INSTANCE, tags.instance_id.as_str()))
                    .tags(tag(TAG_BACKUP, tags.backup_id.as_str()))
                    .tags(tag(TAG_ZONE, zone))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| ec2_error(e, "CreateSnapshot", volume_id, "InvalidVolume.NotFound"))?;
        let snapshot_id = output.snapshot_id().ok_or_else(|| {
            malformed(
                "CreateSnapshot",
                format!("EC2 gave no snapshot id for {volume_id}"),
            )
        })?;
        info!(snapshot_id, volume_id, instance_id = %tags.instance_id,
            backup_id = %tags.backup_id, "EBS snapshot started.");
        Ok(snapshot_id.to_owned())
    }

    /// Polls `resource` until it is ready, with backoff, up to the deadline. `left` says
    /// what becomes of the resource when the wait fails.
    pub(crate) async fn wait(&self, resource: &Preparing, left: &str) -> Result<()> {
        let waiter = &*self.waiter;
        let started = waiter.now();
        let mut interval = self.poll.first;
        let mut seen = false;
        let mut last = "not visible yet".to_owned();
        loop {
            match waiter.look(resource).await {
                Ok(Progress::Ready) => return Ok(()),
                Ok(Progress::Failed(message)) => {
                    return Err(Error::Cloud {
                        service: SERVICE,
                        operation: resource.operation(),
                        message: format!("{resource} failed: {message} ({left})"),
                        retryable: false,
                        source: None,
                    });
                }
                Ok(Progress::Working(state)) => {
                    debug!(%resource, state, "Waiting for EC2.");
                    seen = true;
                    last = state;
                }
                Err(e) if e.is_not_found() && !seen => {}
                Err(e) if e.is_not_found() => {
                    return Err(Error::Cloud {
                        service: SERVICE,
                        operation: resource.operation(),
                        message: format!("{resource} disappeared while Phoenix waited for it"),
                        retryable: false,
                        source: Some(Box::new(e)),
                    });
                }
                Err(e) if e.is_retryable() => {
                    warn!(%resource, error = %e, "Looking at a resource failed; trying again.");
                }
                Err(e) => return Err(e),
            }
            let waited = waiter.now().saturating_duration_since(started);
            if waited >= self.poll.deadline {
                return Err(Error::Timeout {
                    what: format!("{resource} (still {}; {left})", last.trim_end()),
                    after: waited,
                });
            }
            waiter
                .pause(interval.min(self.poll.deadline - waited))
                .await;
            interval = self.poll.next(interval);
        }
    }

    /// Snapshots of this account tagged with the instance (and backup).
    async fn tagged(
        &self,
        instance_id: &InstanceId,
        backup_id: Option<&BackupId>,
    ) -> Result<Vec<Snapshot>> {
        let tag_filter = |key: &str, value: &str| {
            Filter::builder()
                .name(format!("tag:{key}"))
                .values(value)
                .build()
        };
        let mut request = self
            .client
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag_filter(TAG_INSTANCE, instance_id.as_str()));
        if let Some(backup_id) = backup_id {
            request = request.filters(tag_filter(TAG_BACKUP, backup_id.as_str()));
        }
        let mut pages = request.into_paginator().send();
        let mut snapshots = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| ec2_error(e, "DescribeSnapshots", instance_id.as_str(), ""))?;
            snapshots.extend(page.snapshots().iter().cloned());
        }
        Ok(snapshots)
    }

    fn reference(&self, snapshot: &Snapshot) -> Option<SnapshotRef> {
        let id = snapshot.snapshot_id()?;
        let mut details = BTreeMap::new();
        if let Some(volume_id) = snapshot.volume_id() {
            details.insert(DETAIL_VOLUME.to_owned(), volume_id.to_owned());
        }
        if let Some(zone) = snapshot
            .tags()
            .iter()
            .find(|t| t.key() == Some(TAG_ZONE))
            .and_then(Tag::value)
        {
            details.insert(DETAIL_ZONE.to_owned(), zone.to_owned());
        }
        Some(SnapshotRef {
            provider: PROVIDER.to_owned(),
            id: id.to_owned(),
            location: Some(self.region.clone()),
            size_bytes: snapshot
                .volume_size()
                .and_then(|gib| u64::try_from(gib).ok())
                .map(|gib| gib * GIB),
            details,
        })
    }

    /// The snapshot id of a reference this client may act on.
    fn check_ref<'a>(&self, snapshot: &'a SnapshotRef) -> Result<&'a str> {
        if snapshot.provider != PROVIDER {
            return Err(Error::Invalid(format!(
                "{} is a {} snapshot, not an EBS one",
                snapshot.id, snapshot.provider
            )));
        }
        check_id("snapshot", "snap-", &snapshot.id)?;
        match snapshot.location.as_deref() {
            Some(region) if region == self.region => Ok(&snapshot.id),
            Some(region) => Err(Error::Invalid(format!(
                "EBS snapshot {} is in region {region}, and this broker's EC2 region is {}: \
                 copy it into {} (CopySnapshot) and record the copy, or use a broker \
                 configured for {region}",
                snapshot.id, self.region, self.region
            ))),
            None => Err(Error::Invalid(format!(
                "EBS snapshot {} records no region",
                snapshot.id
            ))),
        }
    }

    async fn check_zone(&self, zone: &str) -> Result<()> {
        let valid = !zone.is_empty()
            && zone.len() <= 64
            && zone
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(Error::Invalid(format!(
                "{zone:?} is not an availability zone name"
            )));
        }
        let output = self
            .client
            .describe_availability_zones()
            .send()
            .await
            .map_err(|e| ec2_error(e, "DescribeAvailabilityZones", &self.region, ""))?;
        let zones: Vec<&str> = output
            .availability_zones()
            .iter()
            .filter_map(|z| z.zone_name())
            .collect();
        if zones.contains(&zone) {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "availability zone {zone} is not in region {} (its zones: {})",
            self.region,
            zones.join(", ")
        )))
    }
}

pub(crate) async fn describe_volume(client: &Client, id: &str) -> Result<Volume> {
    let output = client
        .describe_volumes()
        .volume_ids(id)
        .send()
        .await
        .map_err(|e| ec2_error(e, "DescribeVolumes", id, "InvalidVolume.NotFound"))?;
    output
        .volumes()
        .first()
        .cloned()
        .ok_or_else(|| Error::NotFound { key: id.to_owned() })
}

async fn describe_snapshot(client: &Client, id: &str) -> Result<Snapshot> {
    let output = client
        .describe_snapshots()
        .snapshot_ids(id)
        .send()
        .await
        .map_err(|e| ec2_error(e, "DescribeSnapshots", id, "InvalidSnapshot.NotFound"))?;
    output
        .snapshots()
        .first()
        .cloned()
        .ok_or_else(|| Error::NotFound { key: id.to_owned() })
}

/// An answer of EC2 that lacks what the call exists for.
pub(crate) fn malformed(operation: &'static str, message: String) -> Error {
    Error::Cloud {
        service: SERVICE,
        operation,
        message,
        retryable: false,
        source: None,
    }
}

pub(crate) fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// Refuses an id that is not `prefix` and hex digits (what EC2 hands out), so that a
/// reference from elsewhere never becomes part of a request.
pub(crate) fn check_id(kind: &str, prefix: &str, id: &str) -> Result<()> {
    let valid = id.strip_prefix(prefix).is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 32 && rest.chars().all(|c| c.is_ascii_hexdigit())
    });
    if valid {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{id:?} is not an EBS {kind} id")))
    }
}

/// How an EC2 error is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    NotFound,
    Credentials,
    Permission,
    Retryable,
    Permanent,
}

/// The class of a service error with `code` and HTTP `status`; `not_found` is the code
/// that means the subject of the call does not exist.
fn classify(code: Option<&str>, status: Option<u16>, not_found: &str) -> Class {
    match code {
        Some(code) if !not_found.is_empty() && code == not_found => Class::NotFound,
        Some(
            "AuthFailure"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken",
        ) => Class::Credentials,
        Some("UnauthorizedOperation" | "OptInRequired" | "Blocked") => Class::Permission,
        Some(
            "RequestLimitExceeded"
            | "Throttling"
            | "ThrottlingException"
            | "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
            | "RequestExpired"
            | "IncorrectState"
            | "SnapshotCreationPerVolumeRateExceeded"
            | "ConcurrentSnapshotLimitExceeded",
        ) => Class::Retryable,
        _ if matches!(status, Some(429 | 500..=599)) => Class::Retryable,
        _ => Class::Permanent,
    }
}

/// Maps an SDK error of `operation` on `subject` (a volume, snapshot or region); the
/// message names both and never holds a credential.
pub(crate) fn ec2_error<E>(
    err: SdkError<E, HttpResponse>,
    operation: &'static str,
    subject: &str,
    not_found: &str,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (class, detail) = match &err {
        SdkError::ServiceError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            let code = err.code().unwrap_or("no error code");
            let mut detail = match status {
                Some(status) => format!("{code} (HTTP {status})"),
                None => code.to_owned(),
            };
            if let Some(message) = err.message() {
                detail = format!("{detail}: {message}");
            }
            (classify(err.code(), status, not_found), detail)
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => (
            Class::Retryable,
            format!("cannot reach EC2: {}", causes(&err)),
        ),
        _ => (Class::Permanent, causes(&err)),
    };
    let message = match class {
        Class::NotFound => {
            return Error::NotFound {
                key: subject.to_owned(),
            };
        }
        Class::Credentials => format!(
            "{subject}: {detail} (the configured access_key_id and secret_access_key were refused)"
        ),
        Class::Permission => {
            format!("{subject}: {detail} (the configured credentials may not call {operation})")
        }
        Class::Retryable | Class::Permanent => format!("{subject}: {detail}"),
    };
    Error::Cloud {
        service: SERVICE,
        operation,
        message,
        retryable: class == Class::Retryable,
        source: Some(Box::new(err)),
    }
}

/// An error and its causes, one line, without the debug dumps of `DisplayErrorContext`.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_credentials_are_permanent_and_throttling_is_retryable() {
        let snap = "InvalidSnapshot.NotFound";
        assert_eq!(
            classify(Some("AuthFailure"), Some(401), snap),
            Class::Credentials
        );
        assert_eq!(
            classify(Some("UnauthorizedOperation"), Some(403), snap),
            Class::Permission
        );
        assert_eq!(classify(Some(snap), Some(400), snap), Class::NotFound);
        // Another resource's absence is not the subject's.
        assert_eq!(
            classify(Some("InvalidZone.NotFound"), Some(400), snap),
            Class::Permanent
        );
        assert_eq!(classify(Some(snap), Some(400), ""), Class::Permanent);
        assert_eq!(
            classify(Some("RequestLimitExceeded"), Some(503), snap),
            Class::Retryable
        );
        assert_eq!(classify(None, Some(502), snap), Class::Retryable);
        assert_eq!(
            classify(Some("InvalidParameterValue"), Some(400), snap),
            Class::Permanent
        );
    }

    #[test]
    fn the_poll_interval_doubles_up_to_its_maximum() {
        let policy = PollPolicy {
            first: Duration::from_secs(5),
            max_interval: Duration::from_secs(60),
            deadline: Duration::from_secs(3600),
        };
        let mut interval = policy.first;
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(interval.as_secs());
            interval = policy.next(interval);
        }
        assert_eq!(seen, [5, 10, 20, 40, 60, 60]);
        assert!(PollPolicy::default().validate().is_ok());
        let backwards = PollPolicy {
            max_interval: Duration::from_secs(1),
            ..policy
        };
        assert!(backwards.validate().is_err());
    }

    #[test]
    fn only_ec2_shaped_ids_pass() {
        assert!(check_id("snapshot", "snap-", "snap-0123456789abcdef0").is_ok());
        for bad in [
            "",
            "snap-",
            "vol-0123",
            "snap-../x",
            "snap-0123 ",
            "snap-xyz",
        ] {
            assert!(check_id("snapshot", "snap-", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_output_hides_the_credentials() {
        let config = EbsConfig {
            region: "us-east-1".to_owned(),
            endpoint: None,
            access_key_id: Some("AKIDEXAMPLE".to_owned()),
            secret_access_key: Some("wJalrXUtnFEMI".to_owned()),
            poll: PollPolicy::default(),
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("AKIDEXAMPLE") && !shown.contains("wJalrXUtnFEMI"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }
}
