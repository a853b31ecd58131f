//! The broker killed with SIGKILL at awkward moments: after a restart on the same data
//! directory and state store every operation finishes or fails cleanly (never "in
//! progress" forever), instance servers are re-adopted or restarted, and nothing leaks:
//! no server process and no data directory outlives its instance.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::data::{connect, try_connect};
use crate::harness::{Broker, port_is_open, processes_under};
use crate::osb::{Catalog, Osb, new_id, provision_body};

/// Waits until the broker has started working on the instance (its directory exists).
async fn wait_for_instance_dir(broker: &Broker, instance: &str) {
    let started = Instant::now();
    while broker.instance_dir_entries(instance).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the provision never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PostgreSQL postmasters serving from `dir` (children rename themselves, the postmaster
/// keeps its command line).
pub fn postmasters_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    processes_under(dir)
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let program = cmdline.split('\0').next().unwrap_or_default();
            program.ends_with("/postgres") && cmdline.contains(&needle)
        })
        .collect()
}

/// Deprovisions (as a platform's orphan mitigation would after a failure) and asserts that
/// no process, port or directory of the instance is left.
pub async fn deprovision_and_assert_nothing_leaks(
    broker: &Broker,
    osb: &Osb,
    catalog: &Catalog,
    instance: &str,
    port: Option<u16>,
) {
    let reply = osb
        .deprovision(catalog, instance, &catalog.small, true)
        .await;
    match reply.status.as_u16() {
        202 => {
            let done = osb
                .wait_for_instance(instance, reply.operation().as_deref())
                .await;
            assert!(
                done.status.as_u16() == 410 || done.state() == "succeeded",
                "deprovision: {}",
                done.text
            );
        }
        200 | 410 => {}
        other => panic!("deprovision answered {other}: {}", reply.text),
    }
    let instance_dir = broker.instances_dir().join(instance);
    let started = Instant::now();
    while !processes_under(&instance_dir).is_empty() && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        processes_under(&instance_dir).is_empty(),
        "no process of the deprovisioned instance survives"
    );
    assert!(
        broker.instance_dir_entries(instance).is_empty(),
        "no data directory of the deprovisioned instance survives"
    );
    if let Some(port) = port {
        assert!(
            !port_is_open(port),
            "nothing listens on the deprovisioned instance's port {port}"
        );
    }
    assert!(
        broker
            .leftover_processes(&broker.instances_dir())
            .is_empty(),
        "no instance server at all is left running"
    );
    let remaining = broker.instance_volumes();
    assert!(
        remaining.is_empty(),
        "the instances directory holds no volume, socket or trash any more: {remaining:?}"
    );
}

async fn provision_kill_restart(kill_after_work_started: bool) {
    let mut broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    reply.expect(202);
    let operation = reply.operation();
    if kill_after_work_started {
        wait_for_instance_dir(&broker, &instance).await;
    }
    broker.restart().await;

    let done = osb.wait_for_instance(&instance, operation.as_deref()).await;
    done.expect(200);
    let mut port = None;
    match done.state() {
        "succeeded" => {
            let instance_dir = broker.instances_dir().join(&instance);
            let postmasters = postmasters_under(&instance_dir);
            assert!(
                postmasters.len() <= 1,
                "one server per instance, found {postmasters:?}"
            );
            let (_, credentials): (String, Value) = osb
                .create_binding(&catalog, &instance, &catalog.small)
                .await;
            let client = connect(&credentials).await;
            client
                .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
                .await
                .expect("usable");
            port = credentials["port"].as_u64().map(|p| p as u16);
        }
        "failed" => {
            let description = done.body["description"].as_str().unwrap_or_default();
            assert!(
                !description.is_empty(),
                "a failed operation says why: {}",
                done.text
            );
        }
        other => panic!("unexpected state {other}: {}", done.text),
    }
    deprovision_and_assert_nothing_leaks(&broker, &osb, &catalog, &instance, port).await;
}

#[tokio::test]
async fn a_provision_interrupted_by_sigkill_mid_work_finishes_or_fails_cleanly_after_restart() {
    provision_kill_restart(true).await;
}

#[tokio::test]
async fn a_provision_accepted_just_before_sigkill_finishes_or_fails_cleanly_after_restart() {
    provision_kill_restart(false).await;
}

#[tokio::test]
async fn a_deprovision_interrupted_by_sigkill_completes_after_restart_and_leaks_nothing() {
    let mut broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let port = credentials["port"].as_u64().map(|p| p as u16);
    let reply = osb
        .deprovision(&catalog, &instance, &catalog.small, true)
        .await;
    reply.expect(202);
    broker.restart().await;
    let done = osb
        .wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    assert!(
        done.status.as_u16() == 410 || done.state() == "succeeded",
        "deprovision after restart: {}",
        done.text
    );
    deprovision_and_assert_nothing_leaks(&broker, &osb, &catalog, &instance, port).await;
}

#[tokio::test]
async fn instance_servers_survive_a_broker_sigkill_and_are_readopted() {
    let mut broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let client = connect(&credentials).await;
    client
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .await
        .expect("data");
    let before = postmasters_under(&broker.instances_dir().join(&instance));
    broker.restart().await;
    let v: i32 = client
        .query_one("SELECT v FROM t", &[])
        .await
        .expect("the session survives the broker")
        .get(0);
    assert_eq!(v, 1);
    osb.fetch_instance(&instance).await.expect(200);
    let (_, again) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    connect(&again)
        .await
        .query_one("SELECT v FROM t", &[])
        .await
        .expect("a new binding after restart");
    let after = postmasters_under(&broker.instances_dir().join(&instance));
    assert_eq!(before, after, "the running server is adopted, not replaced");
    deprovision_and_assert_nothing_leaks(
        &broker,
        &osb,
        &catalog,
        &instance,
        credentials["port"].as_u64().map(|p| p as u16),
    )
    .await;
}

#[tokio::test]
async fn a_stopped_instance_server_is_restarted_when_the_broker_restarts() {
    let mut broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    connect(&credentials)
        .await
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (9)")
        .await
        .expect("data");
    broker.kill().await;
    // The machine "reboots": the instance server is gone too (SIGINT: fast shutdown).
    let instance_dir = broker.instances_dir().join(&instance);
    let postmasters = postmasters_under(&instance_dir);
    assert_eq!(postmasters.len(), 1, "one server for the instance");
    for pid in &postmasters {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("stopping");
    }
    let started = Instant::now();
    while !postmasters_under(&instance_dir).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the instance server did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker
        .spawn_and_wait()
        .await
        .expect("restarting the broker");
    let started = Instant::now();
    let client = loop {
        if let Ok(client) = try_connect(&credentials).await {
            break client;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the broker never restarted the stopped instance"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let v: i32 = client
        .query_one("SELECT v FROM t", &[])
        .await
        .expect("data after restart")
        .get(0);
    assert_eq!(v, 9);
    deprovision_and_assert_nothing_leaks(
        &broker,
        &osb,
        &catalog,
        &instance,
        credentials["port"].as_u64().map(|p| p as u16),
    )
    .await;
}

#[tokio::test]
async fn a_provision_that_fails_is_reported_failed_and_its_deprovision_leaves_nothing() {
    let mut broker = Broker::prepare(crate::harness::BrokerConfig::default())
        .await
        .expect("preparing a broker");
    // The only instance port is taken by someone else: the server cannot start.
    let port = broker.first_instance_port();
    let squatter =
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("occupying the instance port");
    broker.set_env("PHOENIX_INSTANCE_PORTS", &format!("{port}-{port}"));
    broker.spawn_and_wait().await.expect("starting the broker");
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    if reply.status.as_u16() == 202 {
        let done = osb
            .wait_for_instance(&instance, reply.operation().as_deref())
            .await;
        done.expect(200);
        assert_eq!(
            done.state(),
            "failed",
            "a server that cannot start fails the provision: {}",
            done.text
        );
        let description = done.body["description"].as_str().unwrap_or_default();
        assert!(
            !description.is_empty(),
            "a failed operation says why: {}",
            done.text
        );
    } else {
        assert!(
            reply.status.is_client_error() || reply.status.as_u16() == 503,
            "{}: {}",
            reply.status,
            reply.text
        );
    }
    deprovision_and_assert_nothing_leaks(&broker, &osb, &catalog, &instance, None).await;
    assert!(port_is_open(port), "the squatter is untouched");
    drop(squatter);
    // The failed instance holds no port: the next one gets it.
    let next = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb.create_binding(&catalog, &next, &catalog.small).await;
    assert_eq!(credentials["port"].as_u64(), Some(u64::from(port)));
    deprovision_and_assert_nothing_leaks(&broker, &osb, &catalog, &next, Some(port)).await;
}
