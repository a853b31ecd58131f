//! The local infrastructure on EBS volumes, with real PostgreSQL 15 servers: each
//! instance on an EBS volume of its own, backups as EBS snapshots, in-place restores,
//! clones (also on a host in another zone) and forks from them, and deletion.
//!
//! EC2 is the testbed's emulator (moto_server on 127.0.0.1). Its volumes get block
//! devices from `scripts/testbed/ec2_hypervisor.py`, a TEST DOUBLE of EC2's hypervisor
//! standing between the broker and moto: a loop device per attached volume, linked as a
//! Nitro host names it, and reflink copies of the images for snapshots and the volumes
//! made from them. Everything above the block device (ext4, mounts, PostgreSQL, the data)
//! is real. Each test runs EC2 instances of its own in moto, standing for its hosts (tests
//! run in parallel processes, which must not share a host's device names).

#![allow(clippy::unwrap_used)] // Tests: a failed call fails the test.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use aws_sdk_ec2::types::{Filter, Placement};
use nix::sys::signal::Signal;
use phoenix_adapters::Error;
use phoenix_adapters::backup::SnapshotRef;
use phoenix_adapters::ids::BackupId;
use phoenix_adapters::infrastructure::ebs::{EbsHostConfig, is_mount_point};
use phoenix_adapters::infrastructure::{InstanceSpec, LocalConfig, LocalInfrastructure, host};
use phoenix_adapters::snapshot::ebs::{TAG_BACKUP, TAG_INSTANCE};

use crate::engine_postgres::{admin, binding, spec};
use crate::engine_postgres_backup::{fingerprint, populate};
use crate::snapshot_ebs::{Testbed, fast_poll, testbed};
use crate::storage_support::unique_prefix;

/// A broker host: an EC2 instance of moto and its zone.
struct Host {
    instance_id: String,
    zone: String,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start scripts/testbed/up and source .testbed/env")
    })
}

/// Roots of infrastructures on EBS volumes; what a failed test left mounted under them
/// is unmounted when it is dropped (the testbed's `stop` detaches the loop devices).
struct EbsFixture {
    dir: tempfile::TempDir,
    testbed: Testbed,
    unique: String,
}

impl EbsFixture {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("phx-ebs-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // Shared, as systemd mounts `/`: a mount cannot be moved out of a shared parent,
        // which the infrastructure must handle.
        let path = dir.path().as_os_str();
        for args in [
            vec!["--bind".as_ref(), path, path],
            vec!["--make-shared".as_ref(), path],
        ] {
            let status = std::process::Command::new("mount")
                .args(&args)
                .status()
                .unwrap();
            assert!(status.success(), "mount {args:?}");
        }
        let unique = unique_prefix().trim_end_matches('/').to_owned();
        Self {
            dir,
            testbed: testbed(),
            unique,
        }
    }

    fn root(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new host in zone `letter` of the region.
    async fn host(&self, letter: char) -> Host {
        let zone = format!("{}{letter}", self.testbed.region);
        let output = self
            .testbed
            .client
            .run_instances()
            .image_id("ami-12345678")
            .min_count(1)
            .max_count(1)
            .placement(Placement::builder().availability_zone(&zone).build())
            .send()
            .await
            .unwrap();
        Host {
            instance_id: output.instances()[0].instance_id().unwrap().to_owned(),
            zone,
        }
    }

    /// An infrastructure over `<fixture>/<name>` on `host`.
    fn infrastructure(&self, name: &str, host: &Host) -> LocalInfrastructure {
        self.infrastructure_through(name, host, env("PHOENIX_TEST_EBS_ENDPOINT"))
    }

    /// An infrastructure over `<fixture>/<name>` on `host`, reaching EC2 at `endpoint`.
    fn infrastructure_through(
        &self,
        name: &str,
        host: &Host,
        endpoint: String,
    ) -> LocalInfrastructure {
        let run_as = nix::unistd::Uid::effective()
            .is_root()
            .then(|| "postgres".to_owned());
        LocalInfrastructure::new(LocalConfig {
            run_as,
            ebs: Some(EbsHostConfig {
                ec2: phoenix_adapters::snapshot::ebs::EbsConfig {
                    endpoint: Some(endpoint),
                    ..self.testbed.config(fast_poll())
                },
                instance_id: host.instance_id.clone(),
                availability_zone: host.zone.clone(),
                device_dir: env("PHOENIX_TEST_EBS_DEVICE_DIR").into(),
                volume_size_gib: 1,
                volume_type: "gp3".to_owned(),
            }),
            ..LocalConfig::new(self.root(name))
        })
        .unwrap()
        .with_fsync(false)
    }

    /// An instance spec with an ID no other test (or earlier run) uses.
    fn spec(&self, name: &str) -> InstanceSpec {
        spec(&format!("{name}-{}", self.unique))
    }

    /// The EBS volumes tagged with the instance, and their zones.
    async fn volumes_of(&self, spec: &InstanceSpec) -> Vec<(String, String)> {
        let output = self
            .testbed
            .client
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_INSTANCE}"))
                    .values(spec.id.as_str())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        output
            .volumes()
            .iter()
            .map(|v| {
                (
                    v.volume_id().unwrap().to_owned(),
                    v.availability_zone().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for EbsFixture {
    fn drop(&mut self) {
        for pid in host::processes_in(self.dir.path()) {
            let _ = host::signal(pid, Signal::SIGKILL);
        }
        let mounts = std::process::Command::new("findmnt")
            .args(["-rn", "-o", "TARGET"])
            .output()
            .unwrap();
        let mut inside: Vec<String> = String::from_utf8_lossy(&mounts.stdout)
            .lines()
            .filter(|m| Path::new(m).starts_with(self.dir.path()))
            .map(str::to_owned)
            .collect();
        inside.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in inside {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(mount)
                .status();
        }
    }
}

fn backup_id(id: &str) -> BackupId {
    BackupId::parse(id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_on_its_own_ebs_volume_restores_clones_and_forks_from_ebs_snapshots()
-> Result<()> {
    let fixture = EbsFixture::new();
    let host = fixture.host('a').await;
    let infra = fixture.infrastructure("instances", &host);
    let root = fixture.root("instances");
    let source = fixture.spec("source");
    infra.provision(&source).await?;
    let volumes = fixture.volumes_of(&source).await;
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    assert_eq!(volumes[0].1, host.zone);
    assert!(is_mount_point(&root.join(source.id.as_str()))?);

    let app = infra.create_credentials(&source, &binding("app")).await?;
    populate(&app).await?;
    let live = admin(&infra, &source).await;
    let backed_up = fingerprint(&live).await;
    let snapshot = infra.snapshot(&source, &backup_id("b1")).await?;
    assert_eq!(snapshot.provider, "ebs");
    assert_eq!(
        snapshot.location.as_deref(),
        Some(fixture.testbed.region.as_str())
    );
    let described = fixture
        .testbed
        .client
        .describe_snapshots()
        .snapshot_ids(&snapshot.id)
        .send()
        .await?;
    let tags: Vec<(String, String)> = described.snapshots()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect();
    assert!(
        tags.contains(&(TAG_INSTANCE.to_owned(), source.id.to_string())),
        "{tags:?}"
    );
    assert!(
        tags.contains(&(TAG_BACKUP.to_owned(), "b1".to_owned())),
        "{tags:?}"
    );
    assert!(infra.snapshot_exists(&snapshot).await?);
    // Taken again (a retried backup): the same snapshot.
    assert_eq!(
        infra.snapshot(&source, &backup_id("b1")).await?.id,
        snapshot.id
    );

    live.batch_execute(
        "UPDATE app.notes SET body = 'changed' WHERE id <= 100; DELETE FROM billing.invoices",
    )
    .await?;
    let changed = fingerprint(&live).await;
    assert_ne!(changed, backed_up);
    drop(live);

    // In place: a new volume from the snapshot replaces the live one, which is deleted.
    infra.restore_snapshot(&source, &snapshot).await?;
    assert_eq!(fingerprint(&admin(&infra, &source).await).await, backed_up);
    let after = fixture.volumes_of(&source).await;
    assert_eq!(after.len(), 1, "the replaced volume is left: {after:?}");
    assert_ne!(after[0].0, volumes[0].0);
    for aside in ["@previous", "@staging"] {
        assert!(
            !root.join(aside).join(source.id.as_str()).exists(),
            "{aside} is left"
        );
    }
    // The binding of now still works on the restored volume.
    crate::engine_postgres::connect(&app).await?;

    let clone = fixture.spec("clone");
    infra.provision_from_snapshot(&clone, &snapshot).await?;
    assert_eq!(fingerprint(&admin(&infra, &clone).await).await, backed_up);
    assert_eq!(fixture.volumes_of(&clone).await.len(), 1);

    admin(&infra, &source)
        .await
        .batch_execute("DELETE FROM app.binding_owned")
        .await?;
    let now = fingerprint(&admin(&infra, &source).await).await;
    let fork = fixture.spec("fork");
    infra.provision_fork(&fork, &source).await?;
    assert_eq!(fingerprint(&admin(&infra, &fork).await).await, now);
    let fork_snapshots = fixture
        .testbed
        .client
        .describe_snapshots()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_INSTANCE}"))
                .values(fork.id.as_str())
                .build(),
        )
        .send()
        .await?;
    assert!(
        fork_snapshots.snapshots().is_empty(),
        "a fork's snapshot is left"
    );

    infra.delete_snapshot(&snapshot).await?;
    assert!(!infra.snapshot_exists(&snapshot).await?);
    assert!(!fixture.testbed.snapshot_exists(&snapshot.id).await);
    infra.delete_snapshot(&snapshot).await?;

    for spec in [&source, &clone, &fork] {
        infra.deprovision(&spec.id).await?;
        assert_eq!(
            fixture.volumes_of(spec).await,
            vec![],
            "{} left a volume",
            spec.id
        );
        assert!(!root.join(spec.id.as_str()).exists());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_in_one_zone_clones_on_a_host_in_another() -> Result<()> {
    let fixture = EbsFixture::new();
    let (host_a, host_b) = (fixture.host('a').await, fixture.host('b').await);
    let here = fixture.infrastructure("a", &host_a);
    let there = fixture.infrastructure("b", &host_b);
    let source = fixture.spec("zone-a");
    here.provision(&source).await?;
    populate(&here.create_credentials(&source, &binding("app")).await?).await?;
    let data = fingerprint(&admin(&here, &source).await).await;
    let snapshot = here.snapshot(&source, &backup_id("b1")).await?;
    assert_eq!(
        snapshot
            .details
            .get("availability_zone")
            .map(String::as_str),
        Some(host_a.zone.as_str())
    );

    let clone = fixture.spec("zone-b");
    there.provision_from_snapshot(&clone, &snapshot).await?;
    assert_eq!(fingerprint(&admin(&there, &clone).await).await, data);
    let volumes = fixture.volumes_of(&clone).await;
    assert_eq!(volumes.len(), 1);
    assert_eq!(
        volumes[0].1, host_b.zone,
        "the clone's volume is not in its host's zone"
    );

    there.deprovision(&clone.id).await?;
    here.deprovision(&source.id).await?;
    here.delete_snapshot(&snapshot).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_be_restored_leaves_the_instance_as_it_was() -> Result<()> {
    let fixture = EbsFixture::new();
    let infra = fixture.infrastructure("instances", &fixture.host('a').await);
    let spec = fixture.spec("kept");
    infra.provision(&spec).await?;
    populate(&infra.create_credentials(&spec, &binding("app")).await?).await?;
    let data = fingerprint(&admin(&infra, &spec).await).await;
    let volumes = fixture.volumes_of(&spec).await;
    let snapshot = infra.snapshot(&spec, &backup_id("b1")).await?;

    let elsewhere = SnapshotRef {
        location: Some("eu-west-1".to_owned()),
        ..snapshot.clone()
    };
    let gone = SnapshotRef {
        id: "snap-0123456789abcdef0".to_owned(),
        ..snapshot.clone()
    };
    let btrfs = SnapshotRef {
        provider: "btrfs".to_owned(),
        id: format!("{}/b1", spec.id),
        ..snapshot.clone()
    };
    for (what, bad) in [
        ("another region", &elsewhere),
        ("a deleted snapshot", &gone),
        ("a btrfs snapshot", &btrfs),
    ] {
        let refused = infra.restore_snapshot(&spec, bad).await;
        assert!(refused.is_err(), "{what} was restored");
        assert_eq!(
            fingerprint(&admin(&infra, &spec).await).await,
            data,
            "{what}"
        );
        assert_eq!(
            fixture.volumes_of(&spec).await,
            volumes,
            "{what} left a volume"
        );
    }
    assert!(matches!(
        infra.restore_snapshot(&spec, &elsewhere).await,
        Err(Error::Invalid(message)) if message.contains("eu-west-1")
    ));
    // EC2 keeps its snapshots off the host already: they are never shipped.
    assert!(matches!(
        infra.send_source(&snapshot).await,
        Err(Error::Invalid(message)) if message.contains("not shipped")
    ));
    infra.deprovision(&spec.id).await?;
    infra.delete_snapshot(&snapshot).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_host_restart_the_instance_mounts_its_volume_again() -> Result<()> {
    let fixture = EbsFixture::new();
    let host = fixture.host('a').await;
    let infra = fixture.infrastructure("instances", &host);
    let spec = fixture.spec("restarted");
    infra.provision(&spec).await?;
    populate(&infra.create_credentials(&spec, &binding("app")).await?).await?;
    let data = fingerprint(&admin(&infra, &spec).await).await;

    // A restart: the server dies with the host, the mount is gone, the volume stays
    // attached.
    let volume = fixture.root("instances").join(spec.id.as_str());
    for pid in host::processes_in(&volume) {
        host::signal(pid, Signal::SIGKILL)?;
    }
    host::wait_gone(
        &host::processes_in(&volume),
        "the server",
        std::time::Duration::from_secs(10),
    )
    .await?;
    let unmounted = std::process::Command::new("umount").arg(&volume).status()?;
    assert!(unmounted.success());
    assert!(!infra.is_healthy(&spec).await?);

    // Another host never takes the volume over while it is attached here.
    let elsewhere = fixture.infrastructure("instances", &fixture.host('a').await);
    assert!(elsewhere.ensure_running(&spec).await.is_err());
    assert!(!is_mount_point(&volume)?);
    let [(volume_id, _)] = <[_; 1]>::try_from(fixture.volumes_of(&spec).await).unwrap();
    let attached: Vec<String> = fixture
        .testbed
        .describe_volume(&volume_id)
        .await
        .attachments()
        .iter()
        .map(|a| a.instance_id().unwrap().to_owned())
        .collect();
    assert_eq!(attached, std::slice::from_ref(&host.instance_id));
    // This host, restarted, mounts it again.
    let restarted = fixture.infrastructure("instances", &host);
    restarted.ensure_running(&spec).await?;
    assert!(is_mount_point(&volume)?);
    // A sequence jumps ahead after a crash (PostgreSQL logs values in advance); the rest
    // is as it was.
    let without_sequences = |print: Vec<(String, String)>| {
        print
            .into_iter()
            .filter(|(part, _)| part != "sequence")
            .collect::<Vec<_>>()
    };
    assert_eq!(
        without_sequences(fingerprint(&admin(&infra, &spec).await).await),
        without_sequences(data)
    );
    infra.deprovision(&spec.id).await?;
    assert_eq!(fixture.volumes_of(&spec).await, vec![]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_ec2_refuses_fails_clearly_and_leaves_nothing() -> Result<()> {
    let fixture = EbsFixture::new();
    let host = fixture.host('a').await;
    let root = fixture.root("instances");
    // EC2 unreachable: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let unreachable =
        fixture.infrastructure_through("instances", &host, format!("http://127.0.0.1:{closed}"));
    let spec = fixture.spec("unreachable");
    let refused = unreachable.provision(&spec).await;
    assert!(
        matches!(&refused, Err(e @ Error::Cloud { .. }) if e.is_retryable() && e.to_string().contains("cannot reach EC2")),
        "{refused:?}"
    );
    assert!(
        !root.join(spec.id.as_str()).exists(),
        "a failed provision left its volume directory"
    );

    // An instance EC2 does not run: AttachVolume is refused, and the volume made for
    // the provision is deleted again.
    let homeless = fixture.infrastructure(
        "instances",
        &Host {
            instance_id: "i-0123456789abcdef0".to_owned(),
            zone: host.zone.clone(),
        },
    );
    let refused = homeless.provision(&spec).await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("AttachVolume")),
        "{refused:?}"
    );
    assert!(!root.join(spec.id.as_str()).exists());
    assert_eq!(
        fixture.volumes_of(&spec).await,
        vec![],
        "a failed provision left its EBS volume"
    );
    Ok(())
}
