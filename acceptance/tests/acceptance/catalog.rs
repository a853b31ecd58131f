//! The catalog as a platform reads it: the contract names, the v2.17 fields, and its
//! exact JSON shape (an insta snapshot; IDs included, since a platform keys on them).

use serde_json::Value;

use crate::harness::Broker;

#[tokio::test]
async fn catalog_offers_service_postgresql_with_plans_small_and_medium() {
    let broker = Broker::start().await;
    let catalog = broker.osb().catalog().await;
    assert_ne!(catalog.small.id, catalog.medium.id);
    let service = catalog.service();
    assert!(
        !service["description"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "service description"
    );
    for plan in [&catalog.small, &catalog.medium] {
        assert!(
            !plan.raw["description"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "plan {} description",
            plan.name
        );
    }
}

#[tokio::test]
async fn catalog_declares_retrievable_instances_and_bindings_rotation_and_plan_updates() {
    let broker = Broker::start().await;
    let catalog = broker.osb().catalog().await;
    let service = catalog.service();
    assert_eq!(service["bindable"], true, "bindable: {service}");
    assert_eq!(
        service["instances_retrievable"], true,
        "instances_retrievable: {service}"
    );
    assert_eq!(
        service["bindings_retrievable"], true,
        "bindings_retrievable: {service}"
    );
    for plan in [&catalog.small, &catalog.medium] {
        let updateable = plan
            .raw
            .get("plan_updateable")
            .unwrap_or(&service["plan_updateable"]);
        assert_eq!(
            updateable,
            &Value::Bool(true),
            "plan_updateable for {}: {service}",
            plan.name
        );
        let rotatable = plan
            .raw
            .get("binding_rotatable")
            .unwrap_or(&service["binding_rotatable"]);
        assert_eq!(
            rotatable,
            &Value::Bool(true),
            "binding_rotatable for {}: {service}",
            plan.name
        );
    }
}

#[tokio::test]
async fn catalog_plans_carry_maintenance_info_and_parameter_schemas() {
    let broker = Broker::start().await;
    let catalog = broker.osb().catalog().await;
    for plan in [&catalog.small, &catalog.medium] {
        let version = plan
            .maintenance_version()
            .unwrap_or_else(|| panic!("maintenance_info.version of {}", plan.name));
        let core = version.split(['-', '+']).next().unwrap_or_default();
        let parts: Vec<&str> = core.split('.').collect();
        assert!(
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())),
            "maintenance_info.version must be a semantic version, got {version:?}"
        );
        let schemas = &plan.raw["schemas"];
        for schema in [
            &schemas["service_instance"]["create"]["parameters"],
            &schemas["service_instance"]["update"]["parameters"],
            &schemas["service_binding"]["create"]["parameters"],
        ] {
            assert!(
                schema.is_object(),
                "plan {} lacks a parameters schema: {schemas}",
                plan.name
            );
            assert!(
                schema["$schema"].is_string(),
                "a parameters schema must declare $schema: {schema}"
            );
            assert_eq!(
                schema["type"], "object",
                "parameters are an object: {schema}"
            );
            assert!(
                serde_json::to_vec(schema).expect("schema").len() < 64 * 1024,
                "schemas stay under 64 kB"
            );
        }
    }
}

#[tokio::test]
async fn catalog_names_are_cli_friendly_and_ids_unique() {
    let broker = Broker::start().await;
    let catalog = broker.osb().catalog().await;
    let mut ids = Vec::new();
    for service in catalog.raw["services"].as_array().expect("services") {
        ids.push(service["id"].as_str().expect("service id").to_owned());
        let plans = service["plans"].as_array().expect("plans");
        assert!(!plans.is_empty(), "a service needs at least one plan");
        for plan in plans {
            ids.push(plan["id"].as_str().expect("plan id").to_owned());
            let name = plan["name"].as_str().expect("plan name");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
                "plan name {name:?}"
            );
        }
        let name = service["name"].as_str().expect("service name");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
            "service name {name:?}"
        );
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "service and plan IDs must be unique");
}

#[tokio::test]
async fn catalog_json_matches_the_snapshot() {
    let broker = Broker::start().await;
    let catalog = broker.osb().catalog().await;
    insta::assert_json_snapshot!("catalog", catalog.raw);
}
