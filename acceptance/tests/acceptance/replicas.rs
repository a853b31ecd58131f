//! Several broker replicas on one PostgreSQL state store (the production setup): work is
//! claimed through the database, so each operation runs once, and a killed replica's
//! operation is finished by another. These tests always use the PostgreSQL state store
//! (`PHOENIX_TEST_POSTGRES_URL`), whatever `PHOENIX_TEST_STATE_STORE` says.

use std::time::{Duration, Instant};

use crate::crash::{deprovision_and_assert_nothing_leaks, postmasters_under};
use crate::data::connect;
use crate::harness::{Broker, BrokerConfig, StateStore};
use crate::osb::{new_id, provision_body};

async fn primary() -> Broker {
    Broker::start_with(BrokerConfig {
        state_store: Some(StateStore::Postgres),
        ..BrokerConfig::default()
    })
    .await
}

#[tokio::test]
async fn a_replica_finishes_the_provision_of_a_killed_broker() {
    let mut first = primary().await;
    let osb = first.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    reply.expect(202);
    let started = Instant::now();
    while first.instance_dir_entries(&instance).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the provision never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().await;

    let second = first.start_replica().await;
    let osb = second.osb();
    let done = osb
        .wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    done.expect(200);
    assert_eq!(
        done.state(),
        "succeeded",
        "the replica finishes the work: {}",
        done.text
    );
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    connect(&credentials)
        .await
        .query_one("SELECT 1", &[])
        .await
        .expect("usable");
    let port = credentials["port"].as_u64().map(|p| p as u16);
    deprovision_and_assert_nothing_leaks(&second, &osb, &catalog, &instance, port).await;
}

#[tokio::test]
async fn two_replicas_run_each_operation_exactly_once() {
    let first = primary().await;
    let second = first.start_replica().await;
    let brokers = [first.osb(), second.osb()];
    let catalog = brokers[0].catalog().await;
    let mut accepted = Vec::new();
    for i in 0..4 {
        let instance = new_id();
        let reply = brokers[i % 2]
            .provision(&instance, &provision_body(&catalog, &catalog.small), true)
            .await;
        reply.expect(202);
        accepted.push((instance, reply.operation()));
    }
    for (i, (instance, operation)) in accepted.iter().enumerate() {
        // Either replica answers for any instance: the state is shared.
        let done = brokers[(i + 1) % 2]
            .wait_for_instance(instance, operation.as_deref())
            .await;
        assert_eq!(done.state(), "succeeded", "{}", done.text);
        let postmasters = postmasters_under(&first.instances_dir().join(instance));
        assert_eq!(
            postmasters.len(),
            1,
            "exactly one server for {instance}: {postmasters:?}"
        );
    }
    let mut ports = Vec::new();
    for (i, (instance, _)) in accepted.iter().enumerate() {
        let (_, credentials) = brokers[i % 2]
            .create_binding(&catalog, instance, &catalog.small)
            .await;
        connect(&credentials)
            .await
            .query_one("SELECT 1", &[])
            .await
            .expect("usable");
        ports.push(credentials["port"].as_u64().expect("port"));
    }
    let count = ports.len();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), count, "every instance has its own port");
}
