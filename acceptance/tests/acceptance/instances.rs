//! Service instances: async provision, update and deprovision with `operation` strings,
//! `last_operation` (with and without `operation`, Retry-After, 404, 410), fetch, and the
//! spec's answers to repeats, conflicts and concurrent mutations.

use serde_json::json;

use crate::harness::Broker;
use crate::osb::{new_id, provision_body, update_body};

#[tokio::test]
async fn provision_is_async_and_answers_202_with_an_operation() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    reply.expect(202);
    let operation = reply
        .operation()
        .expect("a 202 for provision carries an operation string");
    assert!(
        !operation.is_empty() && operation.len() <= 10_000,
        "operation {operation:?}"
    );

    let first = osb.last_operation(&instance, Some(&operation)).await;
    first.expect(200);
    assert!(
        ["in progress", "succeeded"].contains(&first.state()),
        "state right after the 202: {}",
        first.text
    );
    let done = osb.wait_for_instance(&instance, Some(&operation)).await;
    done.expect(200);
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    if let Some(description) = done.body.get("description") {
        assert!(
            description.is_string(),
            "description is a string: {}",
            done.text
        );
    }
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn last_operation_in_progress_carries_retry_after() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    reply.expect(202);
    let operation = reply.operation();
    let mut saw_in_progress = false;
    loop {
        let poll = osb.last_operation(&instance, operation.as_deref()).await;
        poll.expect(200);
        if poll.state() != "in progress" {
            break;
        }
        saw_in_progress = true;
        let retry_after = poll
            .header("Retry-After")
            .expect("Retry-After while in progress");
        let seconds: u64 = retry_after
            .trim()
            .parse()
            .expect("Retry-After is a duration in seconds");
        assert!(seconds >= 1, "Retry-After {seconds}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        saw_in_progress,
        "a fresh provision is in progress when first polled (nothing happens synchronously)"
    );
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn last_operation_works_without_the_operation_parameter() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    osb.provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await
        .expect(202);
    let done = osb.wait_for_instance(&instance, None).await;
    done.expect(200);
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn last_operation_with_an_unknown_operation_is_a_client_error() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let reply = osb
        .last_operation(&instance, Some("no-such-operation"))
        .await;
    reply.expect_client_error();
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn last_operation_of_an_unknown_instance_is_404() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let reply = osb.last_operation(&new_id(), None).await;
    reply.expect_error(404, None);
    let reply = osb.last_operation(&new_id(), Some("some-operation")).await;
    reply.expect_error(404, None);
}

#[tokio::test]
async fn last_operation_answers_410_only_after_an_async_delete() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let provision = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    provision.expect(202);
    let provisioned = osb
        .wait_for_instance(&instance, provision.operation().as_deref())
        .await;
    assert_eq!(
        provisioned.status.as_u16(),
        200,
        "never 410 while provisioning: {}",
        provisioned.text
    );
    assert_eq!(provisioned.state(), "succeeded");

    let delete = osb
        .deprovision(&catalog, &instance, &catalog.small, true)
        .await;
    delete.expect(202);
    let operation = delete
        .operation()
        .expect("a 202 for deprovision carries an operation string");
    let deleted = osb.wait_for_instance(&instance, Some(&operation)).await;
    assert!(
        deleted.status.as_u16() == 410 || deleted.state() == "succeeded",
        "deprovision ends in 410 or succeeded: {} {}",
        deleted.status,
        deleted.text
    );
    let after = osb.last_operation(&instance, None).await;
    after.expect(410);
    osb.fetch_instance(&instance).await.expect(404);
    osb.deprovision(&catalog, &instance, &catalog.small, true)
        .await
        .expect(410);
}

#[tokio::test]
async fn deprovision_of_an_unknown_instance_is_410() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let reply = osb
        .deprovision(&catalog, &new_id(), &catalog.small, true)
        .await;
    reply.expect(410);
}

#[tokio::test]
async fn fetch_instance_returns_its_service_and_plan() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let fetched = osb.fetch_instance(&instance).await;
    fetched.expect(200);
    assert_eq!(
        fetched.body["service_id"],
        catalog.service_id.as_str(),
        "{}",
        fetched.text
    );
    assert_eq!(
        fetched.body["plan_id"],
        catalog.small.id.as_str(),
        "{}",
        fetched.text
    );
    if let Some(version) = catalog.small.maintenance_version()
        && let Some(info) = fetched.body.get("maintenance_info")
    {
        assert_eq!(info["version"], version.as_str(), "{}", fetched.text);
    }
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn fetch_instance_is_404_while_provisioning_and_for_unknown_instances() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    osb.fetch_instance(&new_id()).await.expect_error(404, None);
    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    reply.expect(202);
    let fetched = osb.fetch_instance(&instance).await;
    let poll = osb.last_operation(&instance, None).await;
    eprintln!(
        "still provisioning at the fetch: {}",
        poll.state() == "in progress"
    );
    if poll.state() == "in progress" || fetched.status.as_u16() != 200 {
        fetched.expect(404);
    }
    osb.wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    osb.fetch_instance(&instance).await.expect(200);
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn provision_without_accepts_incomplete_is_422_async_required_and_creates_nothing() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let reply = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), false)
        .await;
    reply.expect_error(422, Some("AsyncRequired"));
    osb.assert_absent(&instance).await;
    assert!(
        broker.instance_dir_entries(&instance).is_empty(),
        "no instance directory"
    );
}

#[tokio::test]
async fn update_and_deprovision_without_accepts_incomplete_are_422_async_required() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let update = osb
        .update(
            &instance,
            &update_body(&catalog, &catalog.small, &catalog.medium),
            false,
        )
        .await;
    update.expect_error(422, Some("AsyncRequired"));
    let delete = osb
        .deprovision(&catalog, &instance, &catalog.small, false)
        .await;
    delete.expect_error(422, Some("AsyncRequired"));
    let fetched = osb.fetch_instance(&instance).await;
    fetched.expect(200);
    assert_eq!(
        fetched.body["plan_id"],
        catalog.small.id.as_str(),
        "a 4xx changes nothing"
    );
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn an_identical_provision_repeat_answers_202_while_in_progress_and_200_when_done() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let body = provision_body(&catalog, &catalog.small);
    let first = osb.provision(&instance, &body, true).await;
    first.expect(202);
    let again = osb.provision(&instance, &body, true).await;
    if again.status.as_u16() == 202 {
        assert_eq!(
            again.operation(),
            first.operation(),
            "a repeat returns the original operation"
        );
    } else {
        again.expect(200);
    }
    osb.wait_for_instance(&instance, first.operation().as_deref())
        .await;
    let done = osb.provision(&instance, &body, true).await;
    done.expect(200);
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn a_conflicting_provision_of_an_existing_instance_is_409() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let first = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    first.expect(202);
    // Different attributes while it is being provisioned ...
    let other_plan = osb
        .provision(&instance, &provision_body(&catalog, &catalog.medium), true)
        .await;
    other_plan.expect_error(409, None);
    osb.wait_for_instance(&instance, first.operation().as_deref())
        .await;
    // ... and once it exists.
    let other_plan = osb
        .provision(&instance, &provision_body(&catalog, &catalog.medium), true)
        .await;
    other_plan.expect_error(409, None);
    let mut other_space = provision_body(&catalog, &catalog.small);
    other_space["space_guid"] = json!("another-space");
    other_space["context"]["space_guid"] = json!("another-space");
    osb.provision(&instance, &other_space, true)
        .await
        .expect_error(409, None);
    let fetched = osb.fetch_instance(&instance).await;
    assert_eq!(
        fetched.body["plan_id"],
        catalog.small.id.as_str(),
        "a 409 changes nothing"
    );
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn a_second_mutation_of_a_busy_instance_is_422_concurrency_error() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let provision = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    provision.expect(202);
    let update = osb
        .update(
            &instance,
            &update_body(&catalog, &catalog.small, &catalog.medium),
            true,
        )
        .await;
    let still_provisioning = osb.last_operation(&instance, None).await.state() == "in progress";
    eprintln!("still provisioning at the update: {still_provisioning}");
    if still_provisioning {
        update.expect_error(422, Some("ConcurrencyError"));
    }
    osb.wait_for_instance(&instance, provision.operation().as_deref())
        .await;

    let update = osb
        .update(
            &instance,
            &update_body(&catalog, &catalog.small, &catalog.medium),
            true,
        )
        .await;
    update.expect(202);
    let mut other = update_body(&catalog, &catalog.small, &catalog.small);
    other["parameters"] = json!({});
    let second = osb.update(&instance, &other, true).await;
    let delete = osb
        .deprovision(&catalog, &instance, &catalog.small, true)
        .await;
    let still_updating = osb.last_operation(&instance, None).await.state() == "in progress";
    eprintln!("still updating at the second mutation: {still_updating}");
    if still_updating {
        second.expect_error(422, Some("ConcurrencyError"));
        delete.expect_error(422, Some("ConcurrencyError"));
        let fetched = osb.fetch_instance(&instance).await;
        fetched.expect_error(422, Some("ConcurrencyError"));
    }
    let done = osb
        .wait_for_instance(&instance, update.operation().as_deref())
        .await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    if delete.status.as_u16() == 202 {
        osb.wait_for_instance(&instance, delete.operation().as_deref())
            .await;
    } else {
        osb.delete_instance(&catalog, &instance, &catalog.medium)
            .await;
    }
}

#[tokio::test]
async fn stale_maintenance_info_is_422_maintenance_info_conflict() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let current = catalog
        .small
        .maintenance_version()
        .expect("plan small has maintenance_info");
    let instance = new_id();
    let mut stale = provision_body(&catalog, &catalog.small);
    stale["maintenance_info"] = json!({ "version": "0.0.1-stale" });
    osb.provision(&instance, &stale, true)
        .await
        .expect_error(422, Some("MaintenanceInfoConflict"));
    osb.assert_absent(&instance).await;

    let mut matching = provision_body(&catalog, &catalog.small);
    matching["maintenance_info"] = json!({ "version": current, "description": "ignored" });
    let reply = osb.provision(&instance, &matching, true).await;
    reply.expect(202);
    osb.wait_for_instance(&instance, reply.operation().as_deref())
        .await;

    let mut stale_update = update_body(&catalog, &catalog.small, &catalog.small);
    stale_update["maintenance_info"] = json!({ "version": "99.0.0" });
    osb.update(&instance, &stale_update, true)
        .await
        .expect_error(422, Some("MaintenanceInfoConflict"));
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn plan_update_is_async_and_fetch_shows_the_new_plan() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let reply = osb
        .update(
            &instance,
            &update_body(&catalog, &catalog.small, &catalog.medium),
            true,
        )
        .await;
    reply.expect(202);
    let operation = reply
        .operation()
        .expect("a 202 for update carries an operation string");
    let done = osb.wait_for_instance(&instance, Some(&operation)).await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    let fetched = osb.fetch_instance(&instance).await;
    fetched.expect(200);
    assert_eq!(
        fetched.body["plan_id"],
        catalog.medium.id.as_str(),
        "{}",
        fetched.text
    );
    osb.delete_instance(&catalog, &instance, &catalog.medium)
        .await;
}

#[tokio::test]
async fn an_update_without_changes_succeeds() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let body =
        json!({ "service_id": catalog.service_id, "context": { "platform": "cloudfoundry" } });
    let reply = osb.update(&instance, &body, true).await;
    match reply.status.as_u16() {
        200 => assert!(
            reply.body.is_object(),
            "200 for update answers a JSON object: {}",
            reply.text
        ),
        202 => {
            let done = osb
                .wait_for_instance(&instance, reply.operation().as_deref())
                .await;
            assert_eq!(done.state(), "succeeded", "{}", done.text);
        }
        other => panic!("update without changes answered {other}: {}", reply.text),
    }
    let fetched = osb.fetch_instance(&instance).await;
    assert_eq!(
        fetched.body["plan_id"],
        catalog.small.id.as_str(),
        "no plan_id means no plan change"
    );
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}

#[tokio::test]
async fn unknown_fields_in_requests_are_ignored() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let mut body = provision_body(&catalog, &catalog.small);
    body["x_vendor_extension"] = json!({ "nested": [1, 2, 3] });
    body["context"]["x_unknown_context_field"] = json!("whatever");
    let reply = osb.provision(&instance, &body, true).await;
    reply.expect(202);
    let done = osb
        .wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    let mut bind = crate::osb::bind_body(&catalog, &catalog.small);
    bind["x_vendor_extension"] = json!(true);
    bind["bind_resource"]["x_unknown"] = json!(1);
    let credentials = osb.create_binding_with(&instance, &new_id(), &bind).await;
    assert!(credentials["uri"].is_string(), "{credentials}");
    let mut update = update_body(&catalog, &catalog.small, &catalog.medium);
    update["x_vendor_extension"] = json!("ignored");
    update["previous_values"]["x_unknown"] = json!("ignored");
    let reply = osb.update(&instance, &update, true).await;
    reply.expect(202);
    osb.wait_for_instance(&instance, reply.operation().as_deref())
        .await;
}

#[tokio::test]
async fn deprovision_answers_202_with_an_operation_and_removes_the_instance() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    assert!(
        !broker.instance_dir_entries(&instance).is_empty(),
        "an instance has its own directory under instances/"
    );
    let reply = osb
        .deprovision(&catalog, &instance, &catalog.small, true)
        .await;
    reply.expect(202);
    let operation = reply
        .operation()
        .expect("a 202 for deprovision carries an operation string");
    let again = osb
        .deprovision(&catalog, &instance, &catalog.small, true)
        .await;
    if again.status.as_u16() == 202 {
        assert_eq!(
            again.operation().as_deref(),
            Some(operation.as_str()),
            "a repeat returns the original operation"
        );
    } else {
        again.expect(410);
    }
    osb.wait_for_instance(&instance, Some(&operation)).await;
    osb.fetch_instance(&instance).await.expect(404);
    assert!(
        broker.instance_dir_entries(&instance).is_empty(),
        "the instance directory is removed"
    );
    assert!(
        broker
            .leftover_processes(&broker.instances_dir())
            .is_empty(),
        "no server process is left for a deprovisioned instance"
    );
}

#[tokio::test]
async fn deprovision_during_provisioning_is_refused_or_halts_it_without_leaks() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let provision = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    provision.expect(202);
    let delete = osb
        .deprovision(&catalog, &instance, &catalog.small, true)
        .await;
    match delete.status.as_u16() {
        422 => {
            delete.expect_error(422, Some("ConcurrencyError"));
            let done = osb
                .wait_for_instance(&instance, provision.operation().as_deref())
                .await;
            assert_eq!(
                done.state(),
                "succeeded",
                "a refused delete leaves the provision alone: {}",
                done.text
            );
            osb.delete_instance(&catalog, &instance, &catalog.small)
                .await;
        }
        202 => {
            let done = osb
                .wait_for_instance(&instance, delete.operation().as_deref())
                .await;
            assert!(
                done.status.as_u16() == 410 || done.state() == "succeeded",
                "the delete wins: {}",
                done.text
            );
        }
        other => panic!(
            "deprovision during provisioning answered {other}: {}",
            delete.text
        ),
    }
    osb.fetch_instance(&instance).await.expect(404);
    assert!(
        broker.instance_dir_entries(&instance).is_empty(),
        "no directory is left"
    );
    let instance_dir = broker.instances_dir().join(&instance);
    assert!(
        crate::harness::processes_under(&instance_dir).is_empty(),
        "no server is left"
    );
}

#[tokio::test]
async fn binding_an_instance_that_is_still_provisioning_never_fails_with_a_5xx() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let provision = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    provision.expect(202);
    let binding = new_id();
    let bind = osb
        .bind(
            &instance,
            &binding,
            &crate::osb::bind_body(&catalog, &catalog.small),
            true,
        )
        .await;
    match bind.status.as_u16() {
        202 => {
            let done = osb
                .wait_for_binding(&instance, &binding, bind.operation().as_deref())
                .await;
            assert_eq!(done.state(), "succeeded", "{}", done.text);
        }
        status if (400..500).contains(&status) => {
            bind.expect_client_error();
            osb.wait_for_instance(&instance, provision.operation().as_deref())
                .await;
            osb.fetch_binding(&instance, &binding).await.expect(404);
        }
        other => panic!("bind during provisioning answered {other}: {}", bind.text),
    }
}

#[tokio::test]
async fn successful_osb_responses_are_json_objects() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let provision = osb
        .provision(&instance, &provision_body(&catalog, &catalog.small), true)
        .await;
    let poll = osb.last_operation(&instance, None).await;
    osb.wait_for_instance(&instance, provision.operation().as_deref())
        .await;
    let fetched = osb.fetch_instance(&instance).await;
    let catalog_reply = osb.get("/v2/catalog").await;
    for reply in [&provision, &poll, &fetched, &catalog_reply] {
        assert!(
            reply.status.is_success(),
            "{}: {}",
            reply.status,
            reply.text
        );
        let content_type = reply.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "content type {content_type:?}"
        );
        assert!(reply.body.is_object(), "a JSON object: {}", reply.text);
    }
    osb.delete_instance(&catalog, &instance, &catalog.small)
        .await;
}
