//! Service bindings: async bind and unbind with the binding `last_operation`, fetch,
//! repeats and conflicts, and rotation with `predecessor_binding_id`.

use serde_json::{Value, json};

use crate::data::connect;
use crate::harness::Broker;
use crate::osb::{bind_body, new_id};

/// The credential fields the issue promises, each of the right type.
fn assert_credentials_shape(credentials: &Value) {
    for field in ["uri", "jdbcUrl", "host", "database", "username", "password"] {
        assert!(
            credentials[field].as_str().is_some_and(|v| !v.is_empty()),
            "credentials.{field} must be a non-empty string"
        );
    }
    let port = credentials["port"]
        .as_u64()
        .expect("credentials.port is a number");
    assert!(port > 0 && port < 65536);
    let uri = credentials["uri"].as_str().unwrap_or_default();
    assert!(
        uri.starts_with("postgres://") || uri.starts_with("postgresql://"),
        "uri scheme"
    );
    assert!(
        credentials["jdbcUrl"]
            .as_str()
            .unwrap_or_default()
            .starts_with("jdbc:postgresql://"),
        "jdbcUrl scheme"
    );
}

#[tokio::test]
async fn bind_is_async_and_the_binding_is_fetched_after_it_succeeded() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let binding = new_id();
    let reply = osb
        .bind(
            &instance,
            &binding,
            &bind_body(&catalog, &catalog.small),
            true,
        )
        .await;
    reply.expect(202);
    assert!(
        reply.body.get("credentials").is_none(),
        "a 202 for bind carries no credentials: {}",
        reply.text
    );
    let operation = reply
        .operation()
        .expect("a 202 for bind carries an operation string");
    let done = osb
        .wait_for_binding(&instance, &binding, Some(&operation))
        .await;
    done.expect(200);
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    let fetched = osb.fetch_binding(&instance, &binding).await;
    fetched.expect(200);
    assert_credentials_shape(&fetched.body["credentials"]);
    let without_operation = osb.binding_last_operation(&instance, &binding, None).await;
    without_operation.expect(200);
    assert_eq!(without_operation.state(), "succeeded");
    let client = connect(&fetched.body["credentials"]).await;
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn bind_without_accepts_incomplete_is_sync_or_422_async_required() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let binding = new_id();
    let reply = osb
        .bind(
            &instance,
            &binding,
            &bind_body(&catalog, &catalog.small),
            false,
        )
        .await;
    match reply.status.as_u16() {
        201 => assert_credentials_shape(&reply.body["credentials"]),
        422 => {
            reply.expect_error(422, Some("AsyncRequired"));
            osb.fetch_binding(&instance, &binding).await.expect(404);
        }
        other => panic!(
            "bind without accepts_incomplete answered {other}: {}",
            reply.text
        ),
    }
}

#[tokio::test]
async fn fetch_binding_is_404_for_an_unknown_binding_and_while_binding() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    osb.fetch_binding(&instance, &new_id())
        .await
        .expect_error(404, None);
    let binding = new_id();
    let reply = osb
        .bind(
            &instance,
            &binding,
            &bind_body(&catalog, &catalog.small),
            true,
        )
        .await;
    reply.expect(202);
    let fetched = osb.fetch_binding(&instance, &binding).await;
    let in_progress = osb
        .binding_last_operation(&instance, &binding, None)
        .await
        .state()
        == "in progress";
    eprintln!("binding still in progress when fetched: {in_progress}");
    if in_progress {
        fetched.expect(404);
    }
    osb.wait_for_binding(&instance, &binding, reply.operation().as_deref())
        .await;
    osb.fetch_binding(&instance, &binding).await.expect(200);
}

#[tokio::test]
async fn binding_last_operation_of_an_unknown_binding_is_404() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    osb.binding_last_operation(&instance, &new_id(), None)
        .await
        .expect_error(404, None);
    osb.binding_last_operation(&new_id(), &new_id(), None)
        .await
        .expect_error(404, None);
}

#[tokio::test]
async fn binding_an_unknown_instance_is_a_client_error() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let reply = osb
        .bind(
            &new_id(),
            &new_id(),
            &bind_body(&catalog, &catalog.small),
            true,
        )
        .await;
    reply.expect_client_error();
}

#[tokio::test]
async fn an_identical_bind_repeat_answers_200_with_the_same_credentials() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let binding = new_id();
    let body = bind_body(&catalog, &catalog.small);
    let first = osb.bind(&instance, &binding, &body, true).await;
    first.expect(202);
    let again = osb.bind(&instance, &binding, &body, true).await;
    if again.status.as_u16() == 202 {
        assert_eq!(
            again.operation(),
            first.operation(),
            "a repeat returns the original operation"
        );
    } else {
        again.expect(200);
    }
    osb.wait_for_binding(&instance, &binding, first.operation().as_deref())
        .await;
    let fetched = osb.fetch_binding(&instance, &binding).await;
    fetched.expect(200);
    let repeat = osb.bind(&instance, &binding, &body, true).await;
    repeat.expect(200);
    assert_eq!(
        repeat.body["credentials"], fetched.body["credentials"],
        "a repeat answers the same binding"
    );
}

#[tokio::test]
async fn a_conflicting_bind_with_the_same_id_is_409() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let binding = new_id();
    let body = bind_body(&catalog, &catalog.small);
    osb.create_binding_with(&instance, &binding, &body).await;
    let mut other_app = body.clone();
    other_app["bind_resource"]["app_guid"] = json!("another-app");
    osb.bind(&instance, &binding, &other_app, true)
        .await
        .expect_error(409, None);
    // The same binding id on another instance is another binding's id: also a conflict.
    let other_instance = osb.create_instance(&catalog, &catalog.small).await;
    let reply = osb.bind(&other_instance, &binding, &body, true).await;
    reply.expect_error(409, None);
}

#[tokio::test]
async fn unbind_is_async_and_revokes_the_credentials() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (binding, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    connect(&credentials).await;
    let reply = osb
        .unbind(&catalog, &instance, &binding, &catalog.small, true)
        .await;
    reply.expect(202);
    let operation = reply
        .operation()
        .expect("a 202 for unbind carries an operation string");
    let done = osb
        .wait_for_binding(&instance, &binding, Some(&operation))
        .await;
    assert!(
        done.status.as_u16() == 410 || done.state() == "succeeded",
        "unbind ended with {}",
        done.text
    );
    osb.fetch_binding(&instance, &binding).await.expect(404);
    osb.unbind(&catalog, &instance, &binding, &catalog.small, true)
        .await
        .expect(410);
    assert!(
        crate::data::try_connect(&credentials).await.is_err(),
        "revoked credentials no longer log in"
    );
}

#[tokio::test]
async fn unbind_of_an_unknown_binding_is_410() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    osb.unbind(&catalog, &instance, &new_id(), &catalog.small, true)
        .await
        .expect(410);
}

#[tokio::test]
async fn binding_rotation_with_predecessor_binding_id_gives_new_working_credentials() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (old, old_credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let mut body = bind_body(&catalog, &catalog.small);
    body["predecessor_binding_id"] = json!(old);
    let new = new_id();
    let new_credentials = osb.create_binding_with(&instance, &new, &body).await;
    assert_credentials_shape(&new_credentials);
    assert_ne!(
        new_credentials["password"], old_credentials["password"],
        "rotation yields a new secret"
    );
    // Both work until the platform deletes the predecessor ...
    connect(&old_credentials).await;
    connect(&new_credentials).await;
    osb.delete_binding(&catalog, &instance, &old, &catalog.small)
        .await;
    // ... and the successor survives it.
    let client = connect(&new_credentials).await;
    client
        .query_one("SELECT 1", &[])
        .await
        .expect("the rotated binding still works");
    assert!(
        crate::data::try_connect(&old_credentials).await.is_err(),
        "the predecessor is revoked"
    );
}

#[tokio::test]
async fn binding_rotation_from_an_unknown_predecessor_is_refused() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let other = osb.create_instance(&catalog, &catalog.small).await;
    let (foreign, _) = osb.create_binding(&catalog, &other, &catalog.small).await;
    for predecessor in [new_id(), foreign] {
        let mut body = bind_body(&catalog, &catalog.small);
        body["predecessor_binding_id"] = json!(predecessor);
        let binding = new_id();
        let reply = osb.bind(&instance, &binding, &body, true).await;
        reply.expect_client_error();
        osb.fetch_binding(&instance, &binding).await.expect(404);
    }
}
