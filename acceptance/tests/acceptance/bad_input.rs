//! Bad input: every malformed request gets a 4xx with a JSON error body, and changes
//! nothing (no instance, no operation, no directory).

use reqwest::Method;
use serde_json::json;

use crate::harness::Broker;
use crate::osb::{Osb, bind_body, new_id, provision_body, update_body};

/// Sends a raw provision body and checks the 4xx and that nothing was created.
async fn assert_provision_refused(
    broker: &Broker,
    instance: &str,
    request: reqwest::RequestBuilder,
) -> u16 {
    let reply = Osb::send(request).await;
    reply.expect_client_error();
    broker.osb().assert_absent(instance).await;
    assert!(
        broker.instance_dir_entries(instance).is_empty(),
        "no directory for a refused instance"
    );
    reply.status.as_u16()
}

fn put_instance(osb: &Osb, instance: &str) -> reqwest::RequestBuilder {
    osb.request(Method::PUT, &format!("/v2/service_instances/{instance}"))
        .query(&[("accepts_incomplete", "true")])
}

#[tokio::test]
async fn malformed_json_is_400() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    for body in ["{", "not json", "[]", "null", "{\"service_id\": }", ""] {
        let instance = new_id();
        let request = put_instance(&osb, &instance)
            .header("Content-Type", "application/json")
            .body(body.to_owned());
        let status = assert_provision_refused(&broker, &instance, request).await;
        assert_eq!(status, 400, "body {body:?}");
    }
}

#[tokio::test]
async fn a_wrong_content_type_is_refused() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let body = serde_json::to_string(&provision_body(&catalog, &catalog.small)).expect("json");
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
    ] {
        let instance = new_id();
        let request = put_instance(&osb, &instance)
            .header("Content-Type", content_type)
            .body(body.clone());
        let status = assert_provision_refused(&broker, &instance, request).await;
        assert!(
            status == 400 || status == 415,
            "content type {content_type}: {status}"
        );
    }
}

#[tokio::test]
async fn missing_required_fields_are_400() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    for field in ["service_id", "plan_id"] {
        let instance = new_id();
        let mut body = provision_body(&catalog, &catalog.small);
        body.as_object_mut().expect("object").remove(field);
        let status = assert_provision_refused(
            &broker,
            &instance,
            put_instance(&osb, &instance).json(&body),
        )
        .await;
        assert_eq!(status, 400, "provision without {field}");
    }
    for (field, value) in [
        ("service_id", json!(42)),
        ("plan_id", json!(null)),
        ("parameters", json!("text")),
    ] {
        let instance = new_id();
        let mut body = provision_body(&catalog, &catalog.small);
        body[field] = value;
        let status = assert_provision_refused(
            &broker,
            &instance,
            put_instance(&osb, &instance).json(&body),
        )
        .await;
        assert_eq!(status, 400, "provision with a wrongly typed {field}");
    }
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let mut bind = bind_body(&catalog, &catalog.small);
    bind.as_object_mut().expect("object").remove("plan_id");
    let binding = new_id();
    osb.bind(&instance, &binding, &bind, true)
        .await
        .expect_error(400, None);
    osb.fetch_binding(&instance, &binding).await.expect(404);
    let update = json!({ "plan_id": catalog.medium.id });
    osb.update(&instance, &update, true)
        .await
        .expect_error(400, None);
    let fetched = osb.fetch_instance(&instance).await;
    assert_eq!(
        fetched.body["plan_id"],
        catalog.small.id.as_str(),
        "a refused update changes nothing"
    );
}

#[tokio::test]
async fn an_unknown_service_or_plan_is_refused() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let mut unknown_service = provision_body(&catalog, &catalog.small);
    unknown_service["service_id"] = json!(new_id());
    let mut unknown_plan = provision_body(&catalog, &catalog.small);
    unknown_plan["plan_id"] = json!(new_id());
    for body in [unknown_service, unknown_plan] {
        let instance = new_id();
        let status = assert_provision_refused(
            &broker,
            &instance,
            put_instance(&osb, &instance).json(&body),
        )
        .await;
        assert!(
            status == 400 || status == 422,
            "unknown service or plan: {status}"
        );
    }
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let mut update = update_body(&catalog, &catalog.small, &catalog.small);
    update["plan_id"] = json!(new_id());
    osb.update(&instance, &update, true)
        .await
        .expect_client_error();
    let fetched = osb.fetch_instance(&instance).await;
    assert_eq!(
        fetched.body["plan_id"],
        catalog.small.id.as_str(),
        "a refused update changes nothing"
    );
}

#[tokio::test]
async fn ids_outside_rfc3986_unreserved_or_longer_than_255_are_400() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let body = provision_body(&catalog, &catalog.small);
    let too_long = "a".repeat(256);
    for id in [
        "bad%20id",
        "a:b",
        "a@b",
        "a%2Fb",
        "%C3%A9t%C3%A9",
        "a;b",
        "a,b",
        "a!b",
        "a*b",
        too_long.as_str(),
    ] {
        let reply = Osb::send(
            osb.request(Method::PUT, &format!("/v2/service_instances/{id}"))
                .query(&[("accepts_incomplete", "true")])
                .json(&body),
        )
        .await;
        assert_eq!(
            reply.status.as_u16(),
            400,
            "instance id {id:?}: {}",
            reply.text
        );
        reply.expect_error(400, None);
    }
    assert_eq!(
        broker.instance_volumes(),
        Vec::<String>::new(),
        "no instance directory for a refused id"
    );
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let reply = osb
        .bind(
            &instance,
            "bad:binding",
            &bind_body(&catalog, &catalog.small),
            true,
        )
        .await;
    reply.expect_error(400, None);
    let reply = osb
        .bind(
            &instance,
            &"b".repeat(256),
            &bind_body(&catalog, &catalog.small),
            true,
        )
        .await;
    reply.expect_error(400, None);
}

#[tokio::test]
async fn ids_of_255_unreserved_characters_are_accepted() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = format!("{}-._~", "A1".repeat(125));
    assert_eq!(instance.len(), 254);
    let instance = format!("{instance}z");
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    reply.expect(202);
    let done = osb
        .wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    let binding = "b".repeat(255);
    osb.create_binding_with(&instance, &binding, &bind_body(&catalog, &catalog.small))
        .await;
    osb.delete_binding(&catalog, &instance, &binding, &catalog.small)
        .await;
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn a_body_over_1_mib_is_refused() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let mut body = provision_body(&catalog, &catalog.small);
    body["context"]["padding"] = json!("x".repeat(1024 * 1024 + 1));
    let status = assert_provision_refused(
        &broker,
        &instance,
        put_instance(&osb, &instance).json(&body),
    )
    .await;
    assert!(
        status == 400 || status == 413,
        "a body over 1 MiB: {status}"
    );
    // A large body under the limit is not refused for its size.
    let instance = new_id();
    let mut body = provision_body(&catalog, &catalog.small);
    body["context"]["padding"] = json!("x".repeat(512 * 1024));
    let reply = osb.provision(&instance, &body, true).await;
    reply.expect(202);
    osb.wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn parameters_invalid_per_the_plan_schema_are_400_and_change_nothing() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let invalid = [
        json!({ "max_connections": "lots" }),
        json!({ "max_connections": 5 }),
        json!({ "max_connections": 100000 }),
        json!({ "max_connections": 1.5 }),
        json!({ "not_a_parameter": true }),
    ];
    for parameters in &invalid {
        let instance = new_id();
        let mut body = provision_body(&catalog, &catalog.small);
        body["parameters"] = parameters.clone();
        let status = assert_provision_refused(
            &broker,
            &instance,
            put_instance(&osb, &instance).json(&body),
        )
        .await;
        assert_eq!(status, 400, "parameters {parameters}");
    }
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    for parameters in &invalid {
        let mut update = update_body(&catalog, &catalog.small, &catalog.medium);
        update["parameters"] = parameters.clone();
        osb.update(&instance, &update, true)
            .await
            .expect_error(400, None);
    }
    let fetched = osb.fetch_instance(&instance).await;
    assert_eq!(
        fetched.body["plan_id"],
        catalog.small.id.as_str(),
        "a refused update changes nothing"
    );
    let mut bind = bind_body(&catalog, &catalog.small);
    bind["parameters"] = json!({ "not_a_parameter": 1 });
    let binding = new_id();
    osb.bind(&instance, &binding, &bind, true)
        .await
        .expect_error(400, None);
    osb.fetch_binding(&instance, &binding).await.expect(404);
}
