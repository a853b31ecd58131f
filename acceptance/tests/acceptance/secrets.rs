//! Secrets stay secret: binding passwords are encrypted at rest in the state store, the
//! master key file is private, and no secret reaches a log or a `last_operation`.

use std::os::unix::fs::PermissionsExt;

use crate::harness::Broker;
use crate::osb::new_id;

#[tokio::test]
async fn binding_passwords_are_not_stored_in_clear() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (binding, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let password = credentials["password"].as_str().expect("password");
    assert!(
        password.len() >= 16,
        "a binding password has at least 16 characters"
    );
    let contents = broker.state_store_contents().await;
    assert!(
        contents.contains(&binding),
        "the dump holds the binding row (else this test proves nothing)"
    );
    assert!(
        !contents.contains(password),
        "the binding password is in the state store in clear"
    );
    assert!(
        !contents.contains(credentials["uri"].as_str().expect("uri")),
        "the uri is in clear"
    );
}

#[tokio::test]
async fn the_master_key_file_is_created_private() {
    let broker = Broker::start().await;
    let key = broker.data_dir().join("master.key");
    let mode = std::fs::metadata(&key)
        .expect("master.key is created on first start")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "master.key mode {:o}", mode & 0o777);
}

#[tokio::test]
async fn secrets_never_reach_the_logs_or_last_operation() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let binding = new_id();
    let reply = osb
        .bind(
            &instance,
            &binding,
            &crate::osb::bind_body(&catalog, &catalog.small),
            true,
        )
        .await;
    reply.expect(202);
    let done = osb
        .wait_for_binding(&instance, &binding, reply.operation().as_deref())
        .await;
    let credentials = osb.fetch_binding(&instance, &binding).await.body["credentials"].clone();
    let password = credentials["password"]
        .as_str()
        .expect("password")
        .to_owned();
    let instance_op = osb.last_operation(&instance, None).await;
    // A wrong password is a secret too: it must not be logged either.
    let wrong = format!("wrong-{}", new_id());
    osb.with_credentials(Some((broker.username.clone(), wrong.clone())))
        .get("/v2/catalog")
        .await
        .expect(401);
    osb.delete_binding(&catalog, &instance, &binding, &catalog.small)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = broker.log();
    for (what, secret) in [
        ("binding password", password.as_str()),
        ("broker password", &broker.password),
        ("a wrong password", &wrong),
    ] {
        assert!(
            !log.contains(secret),
            "the {what} appears in the broker log"
        );
        assert!(
            !done.text.contains(secret) && !instance_op.text.contains(secret),
            "the {what} is in last_operation"
        );
    }
}
