//! Snapshot plans on an EC2 host: a broker configured with `PHOENIX_EBS` gives each
//! instance an EBS volume of its own, and plan `small-snapshot` backs up as EBS
//! snapshots, through the same Backup API as on btrfs. Restore in place, clone and fork
//! give the data back; deleting the backup deletes its snapshot, and deprovisioning
//! deletes the volumes.
//!
//! EC2 is the testbed's emulator (moto, behind `scripts/testbed/ec2_hypervisor.py`, a
//! TEST DOUBLE of EC2's hypervisor that gives attached volumes loop devices). The test
//! runs its own EC2 instance in moto to stand for the broker's host, and reads EC2's
//! state over its query API, as an operator's console would.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::backups::{BackupApi, copy_of_plan_and_fingerprint, filled_instance_of};
use crate::data::connect;
use crate::dataset::{STANDARD_BYTES, assert_same_data, change_one_byte, fingerprint_of};
use crate::harness::Broker;

const SNAPSHOT_PLAN: &str = "small-snapshot";
/// A deleted backup's snapshot, a deprovisioned instance's volume, must be gone by then.
const DEADLINE: Duration = Duration::from_secs(60);
const ZONE: &str = "us-east-1a";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start scripts/testbed/up and source .testbed/env")
    })
}

/// The EC2 query API of the testbed (moto accepts any signature).
struct Ec2 {
    endpoint: String,
    http: reqwest::Client,
}

impl Ec2 {
    fn new() -> Self {
        Self {
            endpoint: env("PHOENIX_TEST_EBS_ENDPOINT"),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, params: &[(&str, &str)]) -> String {
        let mut form = vec![("Version", "2016-11-15")];
        form.extend_from_slice(params);
        let reply = self
            .http
            .post(&self.endpoint)
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=phoenix-test/20260101/us-east-1/ec2/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .query(&form)
            .send()
            .await
            .expect("calling EC2");
        let status = reply.status();
        let text = reply.text().await.expect("reading EC2's answer");
        assert!(status.is_success(), "EC2 {params:?}: {status} {text}");
        text
    }

    /// A new EC2 instance: the broker's host.
    async fn run_instance(&self) -> String {
        let answer = self
            .call(&[
                ("Action", "RunInstances"),
                ("ImageId", "ami-12345678"),
                ("MinCount", "1"),
                ("MaxCount", "1"),
                ("Placement.AvailabilityZone", ZONE),
            ])
            .await;
        values(&answer, "instanceId").remove(0)
    }

    /// The ids of the snapshots or volumes (`what`) tagged with `instance`.
    async fn tagged(&self, what: &str, instance: &str) -> Vec<String> {
        let (action, id) = match what {
            "snapshots" => ("DescribeSnapshots", "snapshotId"),
            _ => ("DescribeVolumes", "volumeId"),
        };
        let answer = self
            .call(&[
                ("Action", action),
                ("Filter.1.Name", "tag:phoenix:instance"),
                ("Filter.1.Value.1", instance),
            ])
            .await;
        let mut ids = values(&answer, id);
        ids.sort();
        ids.dedup();
        ids
    }

    /// Waits until nothing of `what` is tagged with `instance`.
    async fn wait_none(&self, what: &str, instance: &str) {
        let started = Instant::now();
        loop {
            let left = self.tagged(what, instance).await;
            if left.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{what} of {instance} are left after {DEADLINE:?}: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The text of every `<tag>` element of an EC2 answer.
fn values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split('<').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn snapshots_on_ebs_volumes_back_up_restore_clone_fork_and_delete_through_the_broker() {
    let ec2 = Ec2::new();
    let host = ec2.run_instance().await;
    let mut broker = Broker::prepare(Default::default())
        .await
        .expect("preparing a broker");
    broker.set_env(
        "PHOENIX_EBS",
        &json!({
            "region": env("PHOENIX_TEST_EC2_REGION"),
            "endpoint": env("PHOENIX_TEST_EBS_ENDPOINT"),
            "access_key_id": env("PHOENIX_TEST_EC2_ACCESS_KEY"),
            "secret_access_key": env("PHOENIX_TEST_EC2_SECRET_KEY"),
            "instance_id": host,
            "availability_zone": ZONE,
            "device_dir": env("PHOENIX_TEST_EBS_DEVICE_DIR"),
            "volume_size_gib": 1,
        })
        .to_string(),
    );
    broker.spawn_and_wait().await.expect("starting the broker");
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let plan = catalog.plan(SNAPSHOT_PLAN);

    let source = filled_instance_of(&osb, &catalog, &plan, STANDARD_BYTES).await;
    assert_eq!(
        ec2.tagged("volumes", &source.instance).await.len(),
        1,
        "the instance has an EBS volume of its own"
    );
    let api = BackupApi::platform(&broker, &source.instance);
    let backup = api.take_backup().await;
    let backup_id = backup["backup_id"].as_str().expect("backup_id").to_owned();
    assert_eq!(backup["strategy"], json!("snapshot"), "{backup}");
    assert_eq!(backup["format"], json!("ebs-snapshot"), "{backup}");
    let snapshots = ec2.tagged("snapshots", &source.instance).await;
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");

    change_one_byte(&connect(&source.credentials).await).await;
    api.restore_and_wait(&backup_id).await;
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "an in-place restore of an EBS snapshot",
    );
    assert_eq!(
        ec2.tagged("volumes", &source.instance).await.len(),
        1,
        "the volume a restore replaced is left"
    );

    let (clone, _, cloned) = copy_of_plan_and_fingerprint(
        &osb,
        &catalog,
        &plan,
        json!({ "clone_from": { "instance_id": source.instance, "backup_id": backup_id } }),
    )
    .await;
    assert_same_data(
        &source.fingerprint.as_copied(),
        &cloned,
        "a clone of an EBS snapshot",
    );
    let (fork, _, forked) = copy_of_plan_and_fingerprint(
        &osb,
        &catalog,
        &plan,
        json!({ "fork_from": { "instance_id": source.instance } }),
    )
    .await;
    assert_same_data(
        &source.fingerprint.as_copied(),
        &forked,
        "a fork through an EBS snapshot",
    );
    ec2.wait_none("snapshots", &fork).await;

    let reply = api.delete_backup(&backup_id).await;
    assert!(
        matches!(reply.status.as_u16(), 200 | 202),
        "DELETE of backup {backup_id}: {} {}",
        reply.status,
        reply.text
    );
    ec2.wait_none("snapshots", &source.instance).await;

    for instance in [&source.instance, &clone, &fork] {
        osb.delete_instance(&catalog, instance, &plan).await;
        ec2.wait_none("volumes", instance).await;
    }
}
