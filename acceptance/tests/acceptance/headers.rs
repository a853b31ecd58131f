//! The headers every OSB request carries: `X-Broker-API-Version` (412), basic auth (401),
//! the request identity (echoed) and the originating identity (parsed and logged).

use reqwest::Method;

use crate::harness::{Broker, BrokerConfig};
use crate::osb::{Osb, new_id};

#[tokio::test]
async fn requests_without_api_version_are_rejected_with_412() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    for path in [
        "/v2/catalog",
        &format!("/v2/service_instances/{}", new_id()),
    ] {
        let reply = Osb::send(osb.raw_request(Method::GET, path)).await;
        reply.expect_error(412, None);
    }
}

#[tokio::test]
async fn requests_with_an_unsupported_api_version_are_rejected_with_412() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    for version in ["1.0", "2.12", "2.0", "3.0", "3.17", "two", ""] {
        let reply = Osb::send(
            osb.raw_request(Method::GET, "/v2/catalog")
                .header("X-Broker-API-Version", version),
        )
        .await;
        assert_eq!(
            reply.status.as_u16(),
            412,
            "version {version:?}: {}",
            reply.text
        );
        reply.expect_error(412, None);
        assert!(
            reply.body["description"]
                .as_str()
                .unwrap_or_default()
                .contains("2."),
            "the description tells the operator which version to use: {}",
            reply.text
        );
    }
}

#[tokio::test]
async fn api_versions_from_2_13_to_later_minors_are_accepted() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    for version in ["2.13", "2.14", "2.15", "2.16", "2.17", "2.18"] {
        let reply = Osb::send(
            osb.raw_request(Method::GET, "/v2/catalog")
                .header("X-Broker-API-Version", version),
        )
        .await;
        assert_eq!(
            reply.status.as_u16(),
            200,
            "version {version}: {}",
            reply.text
        );
    }
}

#[tokio::test]
async fn requests_without_credentials_are_rejected_with_401() {
    let broker = Broker::start().await;
    let anonymous = broker.osb().with_credentials(None);
    for path in [
        "/v2/catalog",
        &format!("/v2/service_instances/{}/last_operation", new_id()),
    ] {
        let reply = anonymous.get(path).await;
        reply.expect_error(401, None);
        let challenge = reply.header("WWW-Authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Basic"),
            "a 401 carries a Basic challenge (RFC 7235), got {challenge:?}"
        );
    }
}

#[tokio::test]
async fn requests_with_wrong_credentials_are_rejected_with_401() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    for (user, password) in [
        (broker.username.clone(), "wrong".to_owned()),
        ("someone-else".to_owned(), broker.password.clone()),
        (broker.username.clone(), String::new()),
        (broker.username.clone(), format!("{}x", broker.password)),
    ] {
        let reply = osb
            .with_credentials(Some((user.clone(), password)))
            .get("/v2/catalog")
            .await;
        assert_eq!(reply.status.as_u16(), 401, "user {user}: {}", reply.text);
        reply.expect_error(401, None);
    }
    let garbage = Osb::send(
        osb.with_credentials(None)
            .request(Method::GET, "/v2/catalog")
            .header("Authorization", "Basic !!!"),
    )
    .await;
    garbage.expect_error(401, None);
}

#[tokio::test]
async fn the_request_identity_is_echoed_on_success_and_on_errors() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let identity = new_id();
    let ok = Osb::send(
        osb.request(Method::GET, "/v2/catalog")
            .header("X-Broker-API-Request-Identity", &identity),
    )
    .await;
    ok.expect(200);
    assert_eq!(
        ok.header("X-Broker-API-Request-Identity"),
        Some(identity.as_str())
    );

    let missing = Osb::send(
        osb.request(Method::GET, &format!("/v2/service_instances/{}", new_id()))
            .header("X-Broker-API-Request-Identity", &identity),
    )
    .await;
    missing.expect(404);
    assert_eq!(
        missing.header("X-Broker-API-Request-Identity"),
        Some(identity.as_str())
    );

    let unauthorized = Osb::send(
        osb.with_credentials(None)
            .request(Method::GET, "/v2/catalog")
            .header("X-Broker-API-Request-Identity", &identity),
    )
    .await;
    unauthorized.expect(401);
    assert_eq!(
        unauthorized.header("X-Broker-API-Request-Identity"),
        Some(identity.as_str())
    );
}

#[tokio::test]
async fn logs_carry_the_request_identity() {
    let broker = Broker::start().await;
    let identity = format!("trace-{}", new_id());
    Osb::send(
        broker
            .osb()
            .request(Method::GET, "/v2/catalog")
            .header("X-Broker-API-Request-Identity", &identity),
    )
    .await
    .expect(200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        broker.log().contains(&identity),
        "the broker log must mention the request identity {identity}"
    );
}

#[tokio::test]
async fn the_originating_identity_is_parsed_and_logged() {
    let broker = Broker::start().await;
    // base64 of {"user_id":"683ea748-3092-4ff4-b656-39cacc4d5360"}
    let value = "eyJ1c2VyX2lkIjoiNjgzZWE3NDgtMzA5Mi00ZmY0LWI2NTYtMzljYWNjNGQ1MzYwIn0=";
    let reply = Osb::send(broker.osb().request(Method::GET, "/v2/catalog").header(
        "X-Broker-API-Originating-Identity",
        format!("cloudfoundry {value}"),
    ))
    .await;
    reply.expect(200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = broker.log();
    assert!(
        log.contains("683ea748-3092-4ff4-b656-39cacc4d5360"),
        "the decoded originating identity (user_id) must be logged"
    );
}

#[tokio::test]
async fn a_malformed_originating_identity_is_rejected_or_ignored_but_never_a_5xx() {
    let broker = Broker::start().await;
    for header in [
        "cloudfoundry",
        "cloudfoundry not-base64!!",
        " ",
        "cloudfoundry bm90IGpzb24=",
    ] {
        let reply = Osb::send(
            broker
                .osb()
                .request(Method::GET, "/v2/catalog")
                .header("X-Broker-API-Originating-Identity", header),
        )
        .await;
        assert!(
            reply.status.as_u16() == 200 || reply.status.as_u16() == 400,
            "{header:?}: {}",
            reply.text
        );
        if reply.status.as_u16() == 400 {
            reply.expect_error(400, None);
        }
    }
}

#[tokio::test]
async fn without_configured_credentials_a_loopback_broker_serves_without_auth() {
    let broker = Broker::start_with(BrokerConfig {
        credentials: false,
        ..BrokerConfig::default()
    })
    .await;
    let reply = broker.osb().with_credentials(None).get("/v2/catalog").await;
    reply.expect(200);
}

#[tokio::test]
async fn without_credentials_the_broker_refuses_a_non_loopback_address() {
    let mut broker = Broker::prepare(BrokerConfig {
        credentials: false,
        listen_host: "0.0.0.0".into(),
        ..BrokerConfig::default()
    })
    .await
    .expect("preparing a broker");
    let status = broker
        .wait_for_exit(std::time::Duration::from_secs(60))
        .await;
    let status = status.expect(
        "the broker must refuse to start on 0.0.0.0 without credentials, but it kept running",
    );
    assert!(
        !status.success(),
        "refusing to start is a failure exit, got {status}"
    );
    assert!(!broker.log().is_empty(), "the broker says why it refused");
}
