//! EBS snapshots against the testbed's EC2 emulator (moto_server on 127.0.0.1): every EC2
//! call of these tests goes to the emulator. The only test doubles are waiters, named as
//! such below: moto completes every snapshot and volume at once, so a pending one cannot
//! exist there. Tests share the emulator; each tags its snapshots with its own instance
//! and backup IDs and never resets the server.

#![allow(clippy::unwrap_used)] // Tests: a failed call fails the test.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use phoenix_adapters::Error;
use phoenix_adapters::backup::SnapshotRef;
use phoenix_adapters::ids::{BackupId, InstanceId};
use phoenix_adapters::snapshot::ebs::{
    DETAIL_VOLUME, DETAIL_ZONE, EbsConfig, EbsSnapshots, Ec2Waiter, PollPolicy, Preparing,
    Progress, SnapshotTags, TAG_BACKUP, TAG_INSTANCE, TAG_RESTORED_FROM, Waiter,
};
use tokio::time::Instant;

use crate::storage_support::unique_prefix;

const GIB: u64 = 1 << 30;

/// The testbed's emulator.
pub(crate) struct Testbed {
    endpoint: String,
    pub(crate) region: String,
    access_key_id: String,
    secret_access_key: String,
    /// For the tests' own setup and checks (CreateVolume, DescribeVolumes, ...).
    pub(crate) client: aws_sdk_ec2::Client,
}

/// The EC2 emulator of the testbed; a test without it fails (tests never skip).
pub(crate) fn testbed() -> Testbed {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set; start the testbed with `scripts/testbed/up` and \
                 `source .testbed/env` (scripts/test does both)"
            )
        })
    };
    let endpoint = var("PHOENIX_TEST_EC2_ENDPOINT");
    let region = var("PHOENIX_TEST_EC2_REGION");
    let access_key_id = var("PHOENIX_TEST_EC2_ACCESS_KEY");
    let secret_access_key = var("PHOENIX_TEST_EC2_SECRET_KEY");
    let client = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(region.clone()))
            .endpoint_url(&endpoint)
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                &access_key_id,
                &secret_access_key,
                None,
                None,
                "test",
            ))
            .build(),
    );
    Testbed {
        endpoint,
        region,
        access_key_id,
        secret_access_key,
        client,
    }
}

impl Testbed {
    pub(crate) fn config(&self, poll: PollPolicy) -> EbsConfig {
        EbsConfig {
            region: self.region.clone(),
            endpoint: Some(self.endpoint.clone()),
            access_key_id: Some(self.access_key_id.clone()),
            secret_access_key: Some(self.secret_access_key.clone()),
            poll,
        }
    }

    fn snapshots(&self) -> EbsSnapshots {
        EbsSnapshots::new(self.config(fast_poll())).unwrap()
    }

    fn zone(&self, letter: char) -> String {
        format!("{}{letter}", self.region)
    }

    /// A new volume of `gib` GiB in zone `letter` of the region.
    async fn volume(&self, letter: char, gib: i32) -> String {
        let created = self
            .client
            .create_volume()
            .availability_zone(self.zone(letter))
            .size(gib)
            .send()
            .await
            .unwrap();
        created.volume_id().unwrap().to_owned()
    }

    pub(crate) async fn describe_volume(&self, id: &str) -> aws_sdk_ec2::types::Volume {
        let output = self
            .client
            .describe_volumes()
            .volume_ids(id)
            .send()
            .await
            .unwrap();
        output.volumes()[0].clone()
    }

    async fn volumes_restored_from(&self, snapshot_id: &str) -> usize {
        let output = self
            .client
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_RESTORED_FROM}"))
                    .values(snapshot_id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        output.volumes().len()
    }

    pub(crate) async fn snapshot_exists(&self, id: &str) -> bool {
        match self
            .client
            .describe_snapshots()
            .snapshot_ids(id)
            .send()
            .await
        {
            Ok(output) => !output.snapshots().is_empty(),
            Err(e) => {
                let code = aws_sdk_ec2::error::ProvideErrorMetadata::code(&e);
                assert_eq!(code, Some("InvalidSnapshot.NotFound"), "{e:?}");
                false
            }
        }
    }
}

/// Short intervals: the production waiter finds moto's snapshots complete at once.
pub(crate) fn fast_poll() -> PollPolicy {
    PollPolicy {
        first: Duration::from_millis(10),
        max_interval: Duration::from_millis(50),
        deadline: Duration::from_secs(30),
    }
}

/// Intervals of 1, 2, 4, 4, ... seconds up to `deadline` seconds, on a virtual clock.
fn virtual_poll(deadline: u64) -> PollPolicy {
    PollPolicy {
        first: Duration::from_secs(1),
        max_interval: Duration::from_secs(4),
        deadline: Duration::from_secs(deadline),
    }
}

/// Tags no other test (or earlier run) uses.
fn unique_tags() -> SnapshotTags {
    let unique = unique_prefix();
    let unique = unique.trim_end_matches('/');
    SnapshotTags {
        instance_id: InstanceId::parse(format!("instance-{unique}")).unwrap(),
        backup_id: BackupId::parse(format!("backup-{unique}")).unwrap(),
    }
}

/// The clock of the waiter test doubles: a pause advances it at once instead of
/// sleeping, and is recorded.
#[derive(Debug)]
struct VirtualClock {
    start: Instant,
    pauses: Mutex<Vec<Duration>>,
}

impl VirtualClock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            pauses: Mutex::new(Vec::new()),
        }
    }

    fn pause(&self, interval: Duration) {
        self.pauses.lock().unwrap().push(interval);
    }

    fn now(&self) -> Instant {
        self.start + self.pauses.lock().unwrap().iter().sum::<Duration>()
    }

    fn pauses_secs(&self) -> Vec<u64> {
        self.pauses
            .lock()
            .unwrap()
            .iter()
            .map(Duration::as_secs)
            .collect()
    }
}

/// TEST DOUBLE of the waiter: reports the resource as still being prepared for its first
/// `pending_looks` looks, then asks the emulator (through the production waiter), as a
/// large snapshot on real EBS would behave. Pauses take no time (a [`VirtualClock`]).
#[derive(Debug)]
struct PendingThenCompleted {
    real: Ec2Waiter,
    pending_looks: u32,
    looks: AtomicU32,
    clock: VirtualClock,
}

impl PendingThenCompleted {
    fn new(real: Ec2Waiter, pending_looks: u32) -> Arc<Self> {
        Arc::new(Self {
            real,
            pending_looks,
            looks: AtomicU32::new(0),
            clock: VirtualClock::new(),
        })
    }
}

#[async_trait::async_trait]
impl Waiter for PendingThenCompleted {
    async fn look(&self, resource: &Preparing) -> phoenix_adapters::Result<Progress> {
        let look = self.looks.fetch_add(1, Ordering::SeqCst) + 1;
        if look <= self.pending_looks {
            let state = match resource {
                Preparing::Snapshot(_) => format!("pending {}%", look * 10),
                Preparing::Volume(_) => "creating".to_owned(),
                Preparing::Attachment(_) => "attaching".to_owned(),
            };
            return Ok(Progress::Working(state));
        }
        self.real.look(resource).await
    }

    async fn pause(&self, interval: Duration) {
        self.clock.pause(interval);
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }
}

/// TEST DOUBLE of the waiter: the resource never leaves `pending`, as a snapshot of a
/// large volume on a slow day. Pauses take no time (a [`VirtualClock`]).
#[derive(Debug)]
struct StaysPending {
    clock: VirtualClock,
}

#[async_trait::async_trait]
impl Waiter for StaysPending {
    async fn look(&self, _resource: &Preparing) -> phoenix_adapters::Result<Progress> {
        Ok(Progress::Working("pending 3%".to_owned()))
    }

    async fn pause(&self, interval: Duration) {
        self.clock.pause(interval);
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }
}

/// TEST DOUBLE of the waiter: EC2 gives up on the resource (state `error`).
#[derive(Debug)]
struct EndsInError {
    clock: VirtualClock,
}

#[async_trait::async_trait]
impl Waiter for EndsInError {
    async fn look(&self, _resource: &Preparing) -> phoenix_adapters::Result<Progress> {
        Ok(Progress::Failed(
            "Internal error while copying blocks".to_owned(),
        ))
    }

    async fn pause(&self, interval: Duration) {
        self.clock.pause(interval);
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }
}

#[tokio::test]
async fn a_snapshot_is_tagged_with_its_instance_and_backup_and_restores_into_its_zone() {
    let tb = testbed();
    let ebs = tb.snapshots();
    let volume = tb.volume('a', 3).await;
    let tags = unique_tags();

    let snapshot = ebs.create(&volume, &tags).await.unwrap();
    assert_eq!(snapshot.provider, "ebs");
    assert!(snapshot.id.starts_with("snap-"), "{snapshot:?}");
    assert_eq!(snapshot.location.as_deref(), Some(tb.region.as_str()));
    assert_eq!(snapshot.size_bytes, Some(3 * GIB));
    assert_eq!(snapshot.details[DETAIL_ZONE], tb.zone('a'));
    assert_eq!(snapshot.details[DETAIL_VOLUME], volume);

    let described = tb
        .client
        .describe_snapshots()
        .snapshot_ids(&snapshot.id)
        .send()
        .await
        .unwrap();
    let on_ec2 = &described.snapshots()[0];
    let tag = |key: &str| {
        on_ec2
            .tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    assert_eq!(
        tag(TAG_INSTANCE).as_deref(),
        Some(tags.instance_id.as_str())
    );
    assert_eq!(tag(TAG_BACKUP).as_deref(), Some(tags.backup_id.as_str()));
    assert_eq!(on_ec2.volume_id(), Some(volume.as_str()));

    let restored = ebs.restore(&snapshot, &tb.zone('a')).await.unwrap();
    let volume = tb.describe_volume(&restored).await;
    assert_eq!(volume.snapshot_id(), Some(snapshot.id.as_str()));
    assert_eq!(volume.availability_zone(), Some(tb.zone('a').as_str()));
    assert_eq!(volume.size(), Some(3));
    assert_eq!(
        volume.state(),
        Some(&aws_sdk_ec2::types::VolumeState::Available)
    );
    assert_eq!(tb.volumes_restored_from(&snapshot.id).await, 1);
}

#[tokio::test]
async fn a_snapshot_restores_into_another_zone_of_its_region() {
    let tb = testbed();
    let ebs = tb.snapshots();
    let snapshot = ebs
        .create(&tb.volume('a', 1).await, &unique_tags())
        .await
        .unwrap();

    let restored = ebs.restore(&snapshot, &tb.zone('b')).await.unwrap();
    let volume = tb.describe_volume(&restored).await;
    assert_eq!(volume.availability_zone(), Some(tb.zone('b').as_str()));
    assert_eq!(volume.snapshot_id(), Some(snapshot.id.as_str()));
}

#[tokio::test]
async fn a_zone_outside_the_region_is_refused_before_any_volume_is_made() {
    let tb = testbed();
    let ebs = tb.snapshots();
    let snapshot = ebs
        .create(&tb.volume('a', 1).await, &unique_tags())
        .await
        .unwrap();

    // moto would make a volume in any zone it is given; EBS refuses one that does not
    // exist. Either way Phoenix must refuse first, with a message that names the zone.
    for zone in ["eu-west-1a", &tb.zone('z'), "US-EAST-1A", ""] {
        let err = ebs.restore(&snapshot, zone).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{zone}: {err:?}");
        let message = err.to_string();
        if zone == "eu-west-1a" {
            assert!(
                message.contains("eu-west-1a") && message.contains(&tb.region),
                "{message}"
            );
            assert!(
                message.contains(&tb.zone('a')),
                "lists the region's zones: {message}"
            );
        }
    }
    assert_eq!(tb.volumes_restored_from(&snapshot.id).await, 0);
}

#[tokio::test]
async fn a_snapshot_of_another_region_is_neither_restored_nor_reported_deleted() {
    let tb = testbed();
    let ebs = tb.snapshots();
    let snapshot = ebs
        .create(&tb.volume('a', 1).await, &unique_tags())
        .await
        .unwrap();
    let elsewhere = SnapshotRef {
        location: Some("eu-west-1".to_owned()),
        ..snapshot.clone()
    };

    let err = ebs.restore(&elsewhere, &tb.zone('a')).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(
        err.to_string().contains("eu-west-1") && err.to_string().contains("CopySnapshot"),
        "{err}"
    );
    let err = ebs.delete(&elsewhere).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(tb.snapshot_exists(&snapshot.id).await);

    let not_ebs = SnapshotRef {
        provider: "btrfs".to_owned(),
        ..snapshot.clone()
    };
    assert!(matches!(
        ebs.delete(&not_ebs).await.unwrap_err(),
        Error::Invalid(_)
    ));
    assert_eq!(tb.volumes_restored_from(&snapshot.id).await, 0);
}

#[tokio::test]
async fn deleting_a_snapshot_twice_succeeds_and_it_is_gone() {
    let tb = testbed();
    let ebs = tb.snapshots();
    let tags = unique_tags();
    let snapshot = ebs.create(&tb.volume('a', 1).await, &tags).await.unwrap();

    ebs.delete(&snapshot).await.unwrap();
    ebs.delete(&snapshot).await.unwrap();
    assert!(!tb.snapshot_exists(&snapshot.id).await);
    assert!(
        ebs.find(&tags.instance_id, None).await.unwrap().is_empty(),
        "a deleted snapshot is not found"
    );
    let err = ebs.restore(&snapshot, &tb.zone('a')).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

#[tokio::test]
async fn find_returns_an_instances_snapshots_or_one_backups() {
    let tb = testbed();
    let ebs = tb.snapshots();
    let volume = tb.volume('a', 2).await;
    let first = unique_tags();
    let second = SnapshotTags {
        backup_id: unique_tags().backup_id,
        ..first.clone()
    };
    let other_instance = unique_tags();

    let a = ebs.create(&volume, &first).await.unwrap();
    let b = ebs.create(&volume, &second).await.unwrap();
    let c = ebs.create(&volume, &other_instance).await.unwrap();
    assert!(a.id != b.id && b.id != c.id);

    let mut found = ebs.find(&first.instance_id, None).await.unwrap();
    found.sort_by(|x, y| x.id.cmp(&y.id));
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(found, expected, "the same references create() returned");
    assert_eq!(
        ebs.find(&first.instance_id, Some(&second.backup_id))
            .await
            .unwrap(),
        vec![b]
    );
    assert_eq!(
        ebs.find(&other_instance.instance_id, None).await.unwrap(),
        vec![c]
    );
}

#[tokio::test]
async fn a_retried_backup_adopts_the_snapshot_its_first_attempt_took() {
    let tb = testbed();
    let ebs = tb.snapshots();
    let volume = tb.volume('a', 1).await;
    let tags = unique_tags();

    let first = ebs.create(&volume, &tags).await.unwrap();
    let again = ebs.create(&volume, &tags).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        ebs.find(&tags.instance_id, None).await.unwrap(),
        vec![first]
    );
}

#[tokio::test]
async fn a_pending_snapshot_is_polled_with_backoff_until_it_completes() {
    let tb = testbed();
    let ebs = EbsSnapshots::new(tb.config(virtual_poll(3600))).unwrap();
    let waiter = PendingThenCompleted::new(ebs.ec2_waiter(), 5);
    let ebs = ebs.with_waiter(waiter.clone());
    let volume = tb.volume('a', 1).await;

    let snapshot = ebs.create(&volume, &unique_tags()).await.unwrap();
    assert_eq!(
        waiter.looks.load(Ordering::SeqCst),
        6,
        "five pending looks, then completed"
    );
    assert_eq!(waiter.clock.pauses_secs(), [1, 2, 4, 4, 4]);
    assert!(tb.snapshot_exists(&snapshot.id).await);
}

#[tokio::test]
async fn a_restored_volume_still_creating_is_waited_for() {
    let tb = testbed();
    let snapshot = tb
        .snapshots()
        .create(&tb.volume('a', 1).await, &unique_tags())
        .await
        .unwrap();
    let ebs = EbsSnapshots::new(tb.config(virtual_poll(3600))).unwrap();
    let waiter = PendingThenCompleted::new(ebs.ec2_waiter(), 2);
    let ebs = ebs.with_waiter(waiter.clone());

    let restored = ebs.restore(&snapshot, &tb.zone('c')).await.unwrap();
    assert_eq!(waiter.looks.load(Ordering::SeqCst), 3);
    assert_eq!(waiter.clock.pauses_secs(), [1, 2]);
    assert_eq!(
        tb.describe_volume(&restored).await.availability_zone(),
        Some(tb.zone('c').as_str())
    );
}

#[tokio::test]
async fn a_snapshot_pending_past_the_deadline_times_out_and_stays_tagged_for_retention() {
    let tb = testbed();
    let waiter = Arc::new(StaysPending {
        clock: VirtualClock::new(),
    });
    let ebs = EbsSnapshots::new(tb.config(virtual_poll(10)))
        .unwrap()
        .with_waiter(waiter.clone());
    let tags = unique_tags();

    let err = ebs
        .create(&tb.volume('a', 1).await, &tags)
        .await
        .unwrap_err();
    let Error::Timeout { what, after } = &err else {
        panic!("expected a timeout, got {err:?}");
    };
    assert_eq!(*after, Duration::from_secs(10));
    // The last pause is cut to the deadline; one more look, and the wait gives up.
    assert_eq!(waiter.clock.pauses_secs(), [1, 2, 4, 3]);
    let left = ebs
        .find(&tags.instance_id, Some(&tags.backup_id))
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "the snapshot stays for retention");
    assert!(
        what.contains(&left[0].id),
        "the error names the snapshot: {err}"
    );
    assert!(
        what.contains("pending") && what.contains(TAG_BACKUP),
        "{err}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_snapshot_ec2_gives_up_on_is_a_permanent_error_naming_it() {
    let tb = testbed();
    let ebs = EbsSnapshots::new(tb.config(virtual_poll(60)))
        .unwrap()
        .with_waiter(Arc::new(EndsInError {
            clock: VirtualClock::new(),
        }));
    let tags = unique_tags();

    let err = ebs
        .create(&tb.volume('a', 1).await, &tags)
        .await
        .unwrap_err();
    let left = ebs.find(&tags.instance_id, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert!(
        matches!(
            &err,
            Error::Cloud {
                operation: "CreateSnapshot",
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&left[0].id) && message.contains("Internal error"),
        "{message}"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_retryable_error_naming_the_call() {
    let tb = testbed();
    // A port nothing listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let ebs = EbsSnapshots::new(EbsConfig {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        ..tb.config(fast_poll())
    })
    .unwrap();

    // A bound against a hang, not a measurement.
    let err = tokio::time::timeout(
        Duration::from_secs(120),
        ebs.create("vol-0123456789abcdef0", &unique_tags()),
    )
    .await
    .expect("a refused connection must fail, not hang")
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Cloud {
                operation: "DescribeVolumes",
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("cannot reach EC2"), "{err}");
    assert!(err.to_string().contains("Connection refused"), "{err}");
}

/// A private emulator with authentication on (the shared one accepts any credentials, and
/// switching its authentication on would fail every other test using it).
struct AuthenticatingEmulator {
    endpoint: String,
    _child: tokio::process::Child,
}

impl AuthenticatingEmulator {
    async fn start() -> Self {
        let program = std::env::var("PHOENIX_TEST_EC2_MOTO_SERVER")
            .expect("PHOENIX_TEST_EC2_MOTO_SERVER is not set (scripts/testbed/s3 sets it)");
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let child = tokio::process::Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        let probe = format!("{endpoint}/moto-api/data.json");
        for _ in 0..600 {
            if reqwest::get(&probe).await.is_ok() {
                return Self {
                    endpoint,
                    _child: child,
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not answer on {endpoint}");
    }
}

#[tokio::test]
async fn refused_credentials_are_a_permanent_error_that_names_them_but_not_their_value() {
    let tb = testbed();
    let emulator = AuthenticatingEmulator::start().await;
    let ebs = EbsSnapshots::new(EbsConfig {
        endpoint: Some(emulator.endpoint.clone()),
        access_key_id: Some("AKIAPHOENIXWRONGKEY1".to_owned()),
        secret_access_key: Some("phoenix-wrong-secret-value".to_owned()),
        ..tb.config(fast_poll())
    })
    .unwrap();

    let err = ebs
        .create("vol-0123456789abcdef0", &unique_tags())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Cloud {
                operation: "DescribeVolumes",
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("AuthFailure") && message.contains("access_key_id"),
        "{message}"
    );
    assert!(
        !message.contains("AKIAPHOENIXWRONGKEY1") && !message.contains("phoenix-wrong-secret"),
        "{message}"
    );
    let err = ebs
        .find(&unique_tags().instance_id, None)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn without_credentials_in_the_configuration_no_client_is_built() {
    // Nothing to fall back on: no environment, profile or instance metadata
    // (169.254.169.254) lookup exists in the client, so there is nothing to wait for.
    let config = |access_key_id: Option<&str>, secret_access_key: Option<&str>| EbsConfig {
        region: "us-east-1".to_owned(),
        endpoint: Some("http://127.0.0.1:9".to_owned()),
        access_key_id: access_key_id.map(str::to_owned),
        secret_access_key: secret_access_key.map(str::to_owned),
        poll: fast_poll(),
    };
    let err = EbsSnapshots::new(config(None, None)).unwrap_err();
    assert!(matches!(&err, Error::Invalid(_)), "{err:?}");
    assert!(
        err.to_string().contains("credentials") && err.to_string().contains("instance metadata"),
        "{err}"
    );
    for half in [
        config(Some("id"), None),
        config(None, Some("secret")),
        config(Some(""), Some("secret")),
    ] {
        assert!(matches!(EbsSnapshots::new(half), Err(Error::Invalid(_))));
    }
    let err = EbsSnapshots::new(EbsConfig {
        region: String::new(),
        ..config(Some("id"), Some("secret"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("region"), "{err}");
    let err = EbsSnapshots::new(EbsConfig {
        endpoint: Some("127.0.0.1:9".to_owned()),
        ..config(Some("id"), Some("secret"))
    })
    .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
}
