//! What an operator watches: /healthz, /readyz and the contract metrics in /metrics.

use reqwest::Method;

use crate::harness::Broker;
use crate::osb::{Osb, new_id};

async fn metrics(broker: &Broker) -> String {
    let reply = Osb::send(broker.osb().raw_request(Method::GET, "/metrics")).await;
    reply.expect(200);
    let content_type = reply.header("content-type").unwrap_or_default().to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format, got {content_type:?}"
    );
    reply.text
}

/// The value of the first sample line of `name` whose labels contain every `label`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_without_credentials() {
    let broker = Broker::start().await;
    let anonymous = broker.osb().with_credentials(None);
    for path in ["/healthz", "/readyz"] {
        let reply = Osb::send(anonymous.raw_request(Method::GET, path)).await;
        assert_eq!(reply.status.as_u16(), 200, "{path}: {}", reply.text);
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_method_and_status() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    osb.catalog().await;
    let unknown = new_id();
    osb.fetch_instance(&unknown).await.expect(404);
    let text = metrics(&broker).await;
    let catalog_ok = sample(
        &text,
        "phoenix_http_requests_total",
        &["method=\"GET\"", "status=\"200\""],
    );
    assert!(
        catalog_ok.is_some_and(|v| v >= 1.0),
        "requests by method and status:\n{text}"
    );
    assert!(
        sample(&text, "phoenix_http_requests_total", &["status=\"404\""]).is_some_and(|v| v >= 1.0),
        "404s are counted:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("phoenix_http_requests_total{"))
        .expect("a labelled sample");
    assert!(line.contains("route=\""), "a route label: {line}");
    assert!(
        !text.contains(&unknown),
        "routes are patterns, never raw paths with IDs:\n{text}"
    );
}

#[tokio::test]
async fn metrics_count_operations_and_instances_by_plan() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    osb.create_binding(&catalog, &instance, &catalog.small)
        .await;
    let text = metrics(&broker).await;
    assert!(
        sample(
            &text,
            "phoenix_operations_total",
            &["kind=\"provision\"", "state=\"succeeded\""]
        )
        .is_some_and(|v| v >= 1.0),
        "succeeded provisions are counted:\n{text}"
    );
    let small_by_name = format!("plan=\"{}\"", catalog.small.name);
    let small_by_id = format!("plan=\"{}\"", catalog.small.id);
    let instances = sample(&text, "phoenix_instances", &[&small_by_name])
        .or_else(|| sample(&text, "phoenix_instances", &[&small_by_id]));
    assert!(instances == Some(1.0), "instances by plan:\n{text}");
    assert!(
        !text.contains(&instance),
        "metrics never carry instance IDs (unbounded label values)"
    );
}
