//! Waking workers: an operation is run as soon as it is created, not at the next poll,
//! whether it was created by this broker or (PostgreSQL) by another replica.

use std::time::Duration;

use phoenix_broker::store::instances::{self, Instance, state as instance_state};
use phoenix_broker::store::now_ms;
use phoenix_broker::store::operations::{self as ops, NewOperation, kind, state};

use crate::support::{Backend, TestBroker};

/// Waits for an operation to end; the broker polls every hour, so only a wake-up ends it.
async fn wait_until_done(broker: &TestBroker, id: &str) -> String {
    for _ in 0..300 {
        let op_id = id.to_owned();
        let operation = broker
            .store
            .run(move |conn| Ok(ops::find(conn, &op_id)?))
            .await
            .unwrap()
            .unwrap();
        if operation.state != state::IN_PROGRESS {
            return operation.state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("operation {id} was not run: the workers were not woken");
}

#[actix_web::test]
async fn an_operation_inserted_by_another_replica_wakes_idle_workers_through_postgres_notify() {
    let broker = TestBroker::spawn_with(Backend::Postgres, &[("PHOENIX_WORKER_POLL", "1h")]).await;
    // Let the workers go idle and the listener subscribe.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // "Another replica": a row written straight to the shared store. Deprovisioning an
    // instance that has nothing on disk succeeds.
    let operation = NewOperation::new(
        kind::DEPROVISION,
        "ghost",
        None,
        "{}".into(),
        "Deleting.",
        3,
    );
    let id = operation.id.clone();
    broker
        .store
        .run(move |conn| {
            instances::insert(
                conn,
                &Instance {
                    id: "ghost".into(),
                    service_id: "s".into(),
                    plan_id: "p".into(),
                    state: instance_state::DEPROVISIONING.into(),
                    parameters: "{}".into(),
                    context: "{}".into(),
                    organization_guid: None,
                    space_guid: None,
                    maintenance_version: None,
                    engine: "postgresql".into(),
                    engine_version: "15".into(),
                    settings: "{}".into(),
                    port: Some(1),
                    host: None,
                    database_name: None,
                    created_at: now_ms(),
                    updated_at: now_ms(),
                },
            )?;
            ops::insert(conn, &operation)?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(wait_until_done(&broker, &id).await, state::SUCCEEDED);
}

#[actix_web::test]
async fn an_accepted_request_wakes_idle_workers_at_once() {
    use reqwest::{Method, StatusCode};
    use serde_json::{Value, json};

    let broker = TestBroker::spawn_with(Backend::Sqlite, &[("PHOENIX_WORKER_POLL", "1h")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let service = "b6b4b8d8-c8a3-4789-9a31-b81a848a90fc";
    let plan = "af04c3f7-aa32-4ef7-b443-c85b0e21dde4";
    let response = broker
        .osb(Method::PUT, "/v2/service_instances/woken?accepts_incomplete=true")
        .json(&json!({"service_id": service, "plan_id": plan, "organization_guid": "o", "space_guid": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    let provision = body["operation"].as_str().unwrap().to_owned();
    assert_eq!(wait_until_done(&broker, &provision).await, state::SUCCEEDED);

    let response = broker
        .osb(
            Method::DELETE,
            &format!("/v2/service_instances/woken?service_id={service}&plan_id={plan}&accepts_incomplete=true"),
        )
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    let deprovision = body["operation"].as_str().unwrap().to_owned();
    assert_eq!(
        wait_until_done(&broker, &deprovision).await,
        state::SUCCEEDED
    );
}

#[actix_web::test]
async fn an_operation_interrupted_more_often_than_its_attempts_fails_clearly() {
    let broker = TestBroker::spawn(Backend::Sqlite).await;
    // A provision whose brokers were killed three times: its last lease has expired.
    let mut operation = NewOperation::new(
        kind::PROVISION,
        "crashy",
        None,
        "{}".into(),
        "Provisioning.",
        3,
    );
    operation.attempts = 3;
    operation.lease_owner = Some("killed-broker/1".into());
    operation.lease_until = Some(now_ms() - 1);
    let id = operation.id.clone();
    broker
        .store
        .run(move |conn| {
            instances::insert(
                conn,
                &Instance {
                    id: "crashy".into(),
                    service_id: "s".into(),
                    plan_id: "p".into(),
                    state: instance_state::PROVISIONING.into(),
                    parameters: "{}".into(),
                    context: "{}".into(),
                    organization_guid: None,
                    space_guid: None,
                    maintenance_version: None,
                    engine: "postgresql".into(),
                    engine_version: "15".into(),
                    settings: "{}".into(),
                    port: Some(2),
                    host: None,
                    database_name: None,
                    created_at: now_ms(),
                    updated_at: now_ms(),
                },
            )?;
            ops::insert(conn, &operation)?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(wait_until_done(&broker, &id).await, state::FAILED);
    let (operation, instance) = broker
        .store
        .run(move |conn| {
            Ok((
                ops::find(conn, &id)?.unwrap(),
                instances::find(conn, "crashy")?.unwrap(),
            ))
        })
        .await
        .unwrap();
    assert!(
        operation
            .description
            .as_deref()
            .is_some_and(|d| d.contains("interrupted")),
        "{operation:?}"
    );
    assert_eq!(instance.state, instance_state::FAILED);
}

/// A provision whose instance row exists, as a request would have written it.
fn provisioning_instance(id: &str, port: u16) -> Instance {
    Instance {
        id: id.into(),
        service_id: "s".into(),
        plan_id: "p".into(),
        state: instance_state::PROVISIONING.into(),
        parameters: "{}".into(),
        context: "{}".into(),
        organization_guid: None,
        space_guid: None,
        maintenance_version: None,
        engine: "postgresql".into(),
        engine_version: "15".into(),
        settings: "{}".into(),
        port: Some(i32::from(port)),
        host: None,
        database_name: None,
        created_at: now_ms(),
        updated_at: now_ms(),
    }
}

async fn lease_until(broker: &TestBroker, id: &str) -> Option<i64> {
    let id = id.to_owned();
    broker
        .store
        .run(move |conn| Ok(ops::find(conn, &id)?))
        .await
        .unwrap()
        .unwrap()
        .lease_until
}

#[actix_web::test]
async fn a_dropped_attempt_stops_renewing_its_lease() {
    // Workers that never poll again: this test claims the operation itself.
    let broker = TestBroker::spawn_with(
        Backend::Sqlite,
        &[
            ("PHOENIX_WORKER_POLL", "1h"),
            ("PHOENIX_OPERATION_LEASE", "1s"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = *broker.state.settings.instance_ports.start();
    let operation = NewOperation::new(
        kind::PROVISION,
        "dropped",
        None,
        "{}".into(),
        "Provisioning.",
        3,
    );
    let id = operation.id.clone();
    let claimed = broker
        .store
        .run(move |conn| {
            instances::insert(conn, &provisioning_instance("dropped", port))?;
            ops::insert(conn, &operation)?;
            Ok(ops::claim(conn, "test-worker/1", 1000)?)
        })
        .await
        .unwrap()
        .expect("the operation is due");
    assert_eq!(claimed.id, id);
    let state = broker.state.clone();
    let attempt =
        tokio::spawn(async move { phoenix_broker::operations::run_claimed(&state, claimed).await });
    // Long enough for renewals (every quarter lease) while the provision runs.
    tokio::time::sleep(Duration::from_millis(600)).await;
    attempt.abort();
    let _ = attempt.await;
    let after_drop = lease_until(&broker, &id).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        lease_until(&broker, &id).await,
        after_drop,
        "the lease was renewed after its attempt was dropped"
    );
    clean_up(&broker, "dropped").await;
}

/// Removes what an abandoned provision left (a volume, perhaps a server).
async fn clean_up(broker: &TestBroker, id: &str) {
    let id = phoenix_adapters::ids::InstanceId::parse(id).unwrap();
    broker.state.infrastructure.deprovision(&id).await.unwrap();
}

#[actix_web::test]
async fn an_attempt_whose_lease_was_taken_over_records_nothing() {
    let broker = TestBroker::spawn_with(
        Backend::Sqlite,
        &[
            ("PHOENIX_WORKER_POLL", "1h"),
            ("PHOENIX_OPERATION_LEASE", "1s"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = *broker.state.settings.instance_ports.start();
    let operation = NewOperation::new(
        kind::PROVISION,
        "taken",
        None,
        "{}".into(),
        "Provisioning.",
        3,
    );
    let id = operation.id.clone();
    let claimed = broker
        .store
        .run(move |conn| {
            instances::insert(conn, &provisioning_instance("taken", port))?;
            ops::insert(conn, &operation)?;
            Ok(ops::claim(conn, "test-worker/1", 1000)?)
        })
        .await
        .unwrap()
        .expect("the operation is due");
    // "Another replica" takes the operation over while the attempt runs.
    let steal_id = id.clone();
    broker
        .store
        .run(move |conn| {
            use diesel::prelude::*;
            use phoenix_broker::store::schema::operations::dsl;
            diesel::update(dsl::operations.filter(dsl::id.eq(&steal_id)))
                .set((
                    dsl::lease_owner.eq("other-replica/1"),
                    dsl::lease_until.eq(now_ms() + 3_600_000),
                ))
                .execute(conn)?;
            Ok(())
        })
        .await
        .unwrap();
    let succeeded = phoenix_broker::operations::run_claimed(&broker.state, claimed)
        .await
        .unwrap();
    assert!(!succeeded);
    let (operation, instance) = broker
        .store
        .run(move |conn| {
            Ok((
                ops::find(conn, &id)?.unwrap(),
                instances::find(conn, "taken")?.unwrap(),
            ))
        })
        .await
        .unwrap();
    assert_eq!(operation.state, state::IN_PROGRESS);
    assert_eq!(operation.lease_owner.as_deref(), Some("other-replica/1"));
    assert_eq!(instance.state, instance_state::PROVISIONING);
    clean_up(&broker, "taken").await;
}
