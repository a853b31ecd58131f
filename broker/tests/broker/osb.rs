//! The OSB API of an in-process broker: headers, errors, bad input and a whole lifecycle
//! against a real PostgreSQL instance, on both state stores.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Backend, PASSWORD, TestBroker, USER};

const SERVICE: &str = "b6b4b8d8-c8a3-4789-9a31-b81a848a90fc";
const SMALL: &str = "af04c3f7-aa32-4ef7-b443-c85b0e21dde4";
const MEDIUM: &str = "1cf80a70-4e48-4067-9bd9-6d4eb3c60afc";

fn provision_body(plan: &str) -> Value {
    json!({
        "service_id": SERVICE,
        "plan_id": plan,
        "organization_guid": "org",
        "space_guid": "space",
        "context": {"platform": "cloudfoundry"},
        "x_unknown_field": "is ignored",
    })
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls `path` until the operation leaves `in progress`; returns the final status/body.
async fn settle(broker: &TestBroker, path: &str) -> (StatusCode, Value) {
    for _ in 0..600 {
        let (status, body) = send(broker.osb(Method::GET, path)).await;
        if status != StatusCode::OK || body["state"] != "in progress" {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{path} stayed in progress");
}

#[actix_web::test]
async fn the_catalog_needs_credentials_and_a_supported_version() {
    let broker = TestBroker::spawn(Backend::Sqlite).await;
    let url = format!("{}/v2/catalog", broker.base);
    let client = &broker.client;

    let (status, body) = send(client.get(&url).header("X-Broker-API-Version", "2.17")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["description"].is_string());
    let (status, _) = send(
        client
            .get(&url)
            .basic_auth(USER, Some("wrong"))
            .header("X-Broker-API-Version", "2.17"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(client.get(&url).basic_auth(USER, Some(PASSWORD))).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let (status, _) = send(
        client
            .get(&url)
            .basic_auth(USER, Some(PASSWORD))
            .header("X-Broker-API-Version", "2.12"),
    )
    .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);

    let response = broker
        .osb(Method::GET, "/v2/catalog")
        .header("X-Broker-API-Request-Identity", "request-42")
        .header(
            "X-Broker-API-Originating-Identity",
            "cloudfoundry eyJ1c2VyX2lkIjogImFiYyJ9",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["x-broker-api-request-identity"],
        "request-42"
    );
    let catalog: Value = response.json().await.unwrap();
    let service = &catalog["services"][0];
    assert_eq!(service["name"], "postgresql");
    let plans: Vec<&str> = service["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(plans, ["small", "medium", "small-snapshot"]);
    assert!(service["plans"][0].get("engine").is_none());
}

#[actix_web::test]
async fn bad_input_is_refused_with_json_and_changes_nothing() {
    let broker = TestBroker::spawn(Backend::Sqlite).await;
    let path = "/v2/service_instances/inst-1?accepts_incomplete=true";
    let cases: Vec<(reqwest::RequestBuilder, StatusCode)> = vec![
        (
            broker
                .osb(Method::PUT, path)
                .header("Content-Type", "application/json")
                .body("{not json"),
            StatusCode::BAD_REQUEST,
        ),
        (
            broker
                .osb(Method::PUT, path)
                .header("Content-Type", "text/plain")
                .body(provision_body(SMALL).to_string()),
            StatusCode::BAD_REQUEST,
        ),
        (
            broker.osb(Method::PUT, path).json(&json!({"plan_id": SMALL})),
            StatusCode::BAD_REQUEST,
        ),
        (
            broker.osb(Method::PUT, path).json(&provision_body("no-such-plan")),
            StatusCode::BAD_REQUEST,
        ),
        (
            broker
                .osb(Method::PUT, path)
                .json(&json!({"parameters": {"max_connections": "lots"}, "service_id": SERVICE, "plan_id": SMALL, "organization_guid": "o", "space_guid": "s"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            broker
                .osb(Method::PUT, "/v2/service_instances/bad%20id?accepts_incomplete=true")
                .json(&provision_body(SMALL)),
            StatusCode::BAD_REQUEST,
        ),
        (
            broker
                .osb(Method::PUT, &format!("/v2/service_instances/{}?accepts_incomplete=true", "x".repeat(256)))
                .json(&provision_body(SMALL)),
            StatusCode::BAD_REQUEST,
        ),
        (
            broker
                .osb(Method::PUT, path)
                .header("Content-Type", "application/json")
                .body(" ".repeat(1024 * 1024 + 1)),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            broker
                .osb(Method::PUT, "/v2/service_instances/inst-1")
                .json(&provision_body(SMALL)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (request, expected) in cases {
        let (status, body) = send(request).await;
        assert_eq!(status, expected, "{body}");
        assert!(
            body["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
    let (status, _) = send(broker.osb(Method::GET, "/v2/service_instances/inst-1")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        send(broker.osb(Method::GET, "/v2/service_instances/inst-1/last_operation")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = send(broker.osb(
        Method::DELETE,
        &format!("/v2/service_instances/inst-1?service_id={SERVICE}&plan_id={SMALL}&accepts_incomplete=true"),
    ))
    .await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(body, json!({}));
}

#[actix_web::test]
async fn lifecycle_on_sqlite() {
    lifecycle(Backend::Sqlite).await;
}

#[actix_web::test]
async fn lifecycle_on_postgres() {
    lifecycle(Backend::Postgres).await;
}

/// Provision, repeat, bind, fetch, rotate, unbind, update, deprovision: the spec's
/// answers at every step, and data that survives the rotation. (A mutation of a busy
/// instance is `a_delete_while_an_update_runs_is_a_concurrency_error`.)
async fn lifecycle(backend: Backend) {
    let broker = TestBroker::spawn(backend).await;
    let instance = "/v2/service_instances/life-1";

    let (status, body) = send(
        broker
            .osb(Method::PUT, &format!("{instance}?accepts_incomplete=true"))
            .json(&provision_body(SMALL)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let operation = body["operation"].as_str().unwrap().to_owned();

    let (status, again) = send(
        broker
            .osb(Method::PUT, &format!("{instance}?accepts_incomplete=true"))
            .json(&provision_body(SMALL)),
    )
    .await;
    if status == StatusCode::ACCEPTED {
        assert_eq!(again["operation"], operation.as_str());
    } else {
        assert_eq!(status, StatusCode::OK, "{again}");
    }
    let (status, _) = send(
        broker
            .osb(Method::PUT, &format!("{instance}?accepts_incomplete=true"))
            .json(&provision_body(MEDIUM)),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, body) = settle(
        &broker,
        &format!("{instance}/last_operation?operation={operation}"),
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::OK, Some("succeeded")),
        "{body}"
    );
    let (status, _) = send(
        broker
            .osb(Method::PUT, &format!("{instance}?accepts_incomplete=true"))
            .json(&provision_body(SMALL)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, fetched) = send(broker.osb(Method::GET, instance)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched["plan_id"], SMALL);

    // A synchronous bind answers with credentials at once.
    let bind =
        json!({"service_id": SERVICE, "plan_id": SMALL, "bind_resource": {"app_guid": "app"}});
    let (status, first) = send(
        broker
            .osb(Method::PUT, &format!("{instance}/service_bindings/bind-1"))
            .json(&bind),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let credentials = &first["credentials"];
    for field in [
        "uri", "jdbcUrl", "host", "port", "database", "username", "password",
    ] {
        assert!(!credentials[field].is_null(), "{field} missing");
    }
    let (status, repeat) = send(
        broker
            .osb(Method::PUT, &format!("{instance}/service_bindings/bind-1"))
            .json(&bind),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(repeat["credentials"], first["credentials"]);

    // An asynchronous rotation.
    let rotate =
        json!({"service_id": SERVICE, "plan_id": SMALL, "predecessor_binding_id": "bind-1"});
    let (status, body) = send(
        broker
            .osb(
                Method::PUT,
                &format!("{instance}/service_bindings/bind-2?accepts_incomplete=true"),
            )
            .json(&rotate),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, body) = settle(
        &broker,
        &format!("{instance}/service_bindings/bind-2/last_operation"),
    )
    .await;
    assert_eq!(body["state"], "succeeded", "{body}");
    let (status, second) =
        send(broker.osb(Method::GET, &format!("{instance}/service_bindings/bind-2"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(
        second["credentials"]["username"],
        first["credentials"]["username"]
    );

    // Asynchronous unbind of the first binding, then 410 on its last_operation.
    let (status, body) = send(broker.osb(
        Method::DELETE,
        &format!("{instance}/service_bindings/bind-1?service_id={SERVICE}&plan_id={SMALL}&accepts_incomplete=true"),
    ))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = settle(
        &broker,
        &format!("{instance}/service_bindings/bind-1/last_operation"),
    )
    .await;
    assert_eq!(status, StatusCode::GONE);
    let (status, _) =
        send(broker.osb(Method::GET, &format!("{instance}/service_bindings/bind-1"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Synchronous unbind of the second: 200 {}, then 404 on fetch and 410 on a repeat.
    let unbind = format!("{instance}/service_bindings/bind-2?service_id={SERVICE}&plan_id={SMALL}");
    let (status, body) = send(broker.osb(Method::DELETE, &unbind)).await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({})));
    let (status, _) =
        send(broker.osb(Method::GET, &format!("{instance}/service_bindings/bind-2"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = send(broker.osb(Method::DELETE, &unbind)).await;
    assert_eq!(status, StatusCode::GONE, "{body}");

    // Plan change; the platform polls with the old plan.
    let (status, body) = send(
        broker
            .osb(Method::PATCH, &format!("{instance}?accepts_incomplete=true"))
            .json(&json!({"service_id": SERVICE, "plan_id": MEDIUM, "previous_values": {"plan_id": SMALL}})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, body) = settle(
        &broker,
        &format!("{instance}/last_operation?plan_id={SMALL}"),
    )
    .await;
    assert_eq!(body["state"], "succeeded", "{body}");
    let (_, fetched) = send(broker.osb(Method::GET, instance)).await;
    assert_eq!(fetched["plan_id"], MEDIUM);

    // Deprovision: 202, then 410 once done, then 410 on DELETE.
    let delete =
        format!("{instance}?service_id={SERVICE}&plan_id={MEDIUM}&accepts_incomplete=true");
    let (status, body) = send(broker.osb(Method::DELETE, &delete)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = settle(&broker, &format!("{instance}/last_operation")).await;
    assert_eq!(status, StatusCode::GONE);
    let (status, _) = send(broker.osb(Method::DELETE, &delete)).await;
    assert_eq!(status, StatusCode::GONE);
    assert!(!broker.db.dir.path().join("data/instances/life-1").exists());
}

/// A provisioned instance written straight to the store, as if a broker had made it
/// (no server: the tests using it end before anything would reach one).
async fn insert_provisioned(broker: &TestBroker, id: &str, plan: &str, engine_version: &str) {
    insert_instance(
        broker,
        id,
        plan,
        engine_version,
        phoenix_broker::store::instances::state::PROVISIONED,
    )
    .await;
}

async fn insert_instance(
    broker: &TestBroker,
    id: &str,
    plan: &str,
    engine_version: &str,
    state: &str,
) {
    use phoenix_broker::store::instances::{self, Instance};
    use phoenix_broker::store::now_ms;

    let instance = Instance {
        id: id.into(),
        service_id: SERVICE.into(),
        plan_id: plan.into(),
        state: state.into(),
        parameters: "{}".into(),
        context: "{}".into(),
        organization_guid: Some("org".into()),
        space_guid: Some("space".into()),
        maintenance_version: None,
        engine: "postgresql".into(),
        engine_version: engine_version.into(),
        settings: "{}".into(),
        port: Some(i32::from(*broker.state.settings.instance_ports.start())),
        host: Some("127.0.0.1".into()),
        database_name: Some("postgres".into()),
        created_at: now_ms(),
        updated_at: now_ms(),
    };
    broker
        .store
        .run(move |conn| Ok(instances::insert(conn, &instance)?))
        .await
        .unwrap();
}

#[actix_web::test]
async fn a_delete_while_an_update_runs_is_a_concurrency_error() {
    use phoenix_broker::store::now_ms;
    use phoenix_broker::store::operations::{self as ops, NewOperation, kind};

    let broker = TestBroker::spawn(Backend::Sqlite).await;
    insert_provisioned(&broker, "busy-1", SMALL, "15").await;
    // An update another worker holds for an hour: it stays in progress all along.
    let mut update = NewOperation::new(kind::UPDATE, "busy-1", None, "{}".into(), "Updating.", 3);
    update.attempts = 1;
    update.lease_owner = Some("other-replica/1".into());
    update.lease_until = Some(now_ms() + 3_600_000);
    broker
        .store
        .run(move |conn| Ok(ops::insert(conn, &update)?))
        .await
        .unwrap();
    let (status, body) = send(broker.osb(
        Method::DELETE,
        &format!(
            "/v2/service_instances/busy-1?service_id={SERVICE}&plan_id={SMALL}&accepts_incomplete=true"
        ),
    ))
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "ConcurrencyError");

    let metrics = broker
        .client
        .get(format!("{}/metrics", broker.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("phoenix_operations_in_progress{kind=\"update\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("phoenix_operations_in_progress{kind=\"bind\"} 0"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_plan_change_to_another_engine_version_is_refused() {
    let broker = TestBroker::spawn(Backend::Sqlite).await;
    // Provisioned when the medium plan still ran PostgreSQL 14.
    insert_provisioned(&broker, "old-engine", MEDIUM, "14").await;
    let (status, body) = send(
        broker
            .osb(
                Method::PATCH,
                "/v2/service_instances/old-engine?accepts_incomplete=true",
            )
            .json(&json!({"service_id": SERVICE, "plan_id": SMALL})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["description"]
            .as_str()
            .is_some_and(|d| d.contains("another engine, version")),
        "{body}"
    );
    let (_, fetched) = send(broker.osb(Method::GET, "/v2/service_instances/old-engine")).await;
    assert_eq!(fetched["plan_id"], MEDIUM);
}

#[actix_web::test]
async fn a_copy_of_a_newer_engine_version_is_refused_at_once() {
    use phoenix_broker::store::backups::{self, Backup, state as backup_state};

    let broker = TestBroker::spawn(Backend::Sqlite).await;
    // A source from when the small plan ran PostgreSQL 16, and a backup of it.
    insert_provisioned(&broker, "newer-1", SMALL, "16").await;
    let mut backup = Backup::new("newer-1", "op-of-newer-1", "manual");
    backup.state = backup_state::SUCCEEDED.into();
    backup.strategy = Some("stream".into());
    backup.engine = Some("postgresql".into());
    backup.engine_version = Some("16".into());
    let backup_id = backup.id.clone();
    broker
        .store
        .run(move |conn| Ok(backups::insert(conn, &backup)?))
        .await
        .unwrap();
    for (target, seed) in [
        (
            "copy-1",
            json!({"clone_from": {"instance_id": "newer-1", "backup_id": backup_id}}),
        ),
        ("copy-2", json!({"fork_from": {"instance_id": "newer-1"}})),
    ] {
        let mut body = provision_body(SMALL);
        body["parameters"] = seed;
        let (status, reply) = send(
            broker
                .osb(
                    Method::PUT,
                    &format!("/v2/service_instances/{target}?accepts_incomplete=true"),
                )
                .json(&body),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
        assert!(
            reply["description"]
                .as_str()
                .is_some_and(|d| d.contains("postgresql 16") && d.contains("postgresql 15")),
            "{reply}"
        );
        let (status, _) =
            send(broker.osb(Method::GET, &format!("/v2/service_instances/{target}"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{target} was not created");
    }
}

#[actix_web::test]
async fn a_repeat_of_a_running_provision_still_requires_accepts_incomplete() {
    use phoenix_broker::store::instances::state as instance_state;
    use phoenix_broker::store::now_ms;
    use phoenix_broker::store::operations::{self as ops, NewOperation, kind};

    let broker = TestBroker::spawn(Backend::Sqlite).await;
    insert_instance(
        &broker,
        "repeat-1",
        SMALL,
        "15",
        instance_state::PROVISIONING,
    )
    .await;
    let mut provision = NewOperation::new(
        kind::PROVISION,
        "repeat-1",
        None,
        "{}".into(),
        "Provisioning.",
        3,
    );
    provision.attempts = 1;
    provision.lease_owner = Some("other-replica/1".into());
    provision.lease_until = Some(now_ms() + 3_600_000);
    let operation = provision.id.clone();
    broker
        .store
        .run(move |conn| Ok(ops::insert(conn, &provision)?))
        .await
        .unwrap();
    let body = json!({
        "service_id": SERVICE, "plan_id": SMALL, "organization_guid": "org", "space_guid": "space",
    });
    let (status, reply) = send(
        broker
            .osb(Method::PUT, "/v2/service_instances/repeat-1")
            .json(&body),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"], "AsyncRequired");
    let (status, reply) = send(
        broker
            .osb(
                Method::PUT,
                "/v2/service_instances/repeat-1?accepts_incomplete=true",
            )
            .json(&body),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["operation"], operation);
}
