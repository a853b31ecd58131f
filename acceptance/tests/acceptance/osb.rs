//! An OSB v2.17 client as a platform would use it, with the polling loops and the small
//! assertions every test needs. It reports what the broker said; it must never hide a
//! status code or retry a request that a platform would not retry.

use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

/// The version every request carries unless a test says otherwise.
pub const API_VERSION: &str = "2.17";
/// Polling gives up after this long: a hung operation fails the test instead of hanging it.
const OPERATION_DEADLINE: Duration = Duration::from_secs(180);
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What the broker answered.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn state(&self) -> &str {
        self.body["state"].as_str().unwrap_or_default()
    }

    pub fn operation(&self) -> Option<String> {
        self.body["operation"].as_str().map(str::to_owned)
    }

    /// Asserts the status and returns self, showing the body when it differs.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Asserts an OSB error: this status, a JSON body with a non-empty `error` and
    /// `description`, and the given `error` code when there is one.
    #[track_caller]
    pub fn expect_error(&self, status: u16, error: Option<&str>) -> &Self {
        self.expect(status);
        self.expect_json_error_body(error)
    }

    /// Asserts any 4xx with an OSB JSON error body.
    #[track_caller]
    pub fn expect_client_error(&self) -> &Self {
        assert!(
            self.status.is_client_error(),
            "expected a 4xx, got {}: {}",
            self.status,
            self.text
        );
        self.expect_json_error_body(None)
    }

    #[track_caller]
    fn expect_json_error_body(&self, error: Option<&str>) -> &Self {
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "error body must be JSON, content-type was {content_type:?}; body: {}",
            self.text
        );
        let description = self.body["description"].as_str().unwrap_or_default();
        assert!(
            !description.is_empty(),
            "error body needs a non-empty description: {}",
            self.text
        );
        assert!(
            self.body["error"].as_str().is_some_and(|c| !c.is_empty()),
            "error body needs a non-empty `error`: {}",
            self.text
        );
        if let Some(expected) = error {
            assert_eq!(
                self.body["error"].as_str(),
                Some(expected),
                "error code; body: {}",
                self.text
            );
        }
        self
    }
}

/// A plan as the catalog announces it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub raw: Value,
}

impl Plan {
    pub fn maintenance_version(&self) -> Option<String> {
        self.raw["maintenance_info"]["version"]
            .as_str()
            .map(str::to_owned)
    }
}

/// The contract part of the catalog: service `postgresql`, plans `small` and `medium`.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub raw: Value,
    pub service_id: String,
    pub small: Plan,
    pub medium: Plan,
}

impl Catalog {
    pub fn service(&self) -> &Value {
        self.raw["services"]
            .as_array()
            .and_then(|services| services.iter().find(|s| s["name"] == "postgresql"))
            .expect("service postgresql")
    }

    /// Any plan of service `postgresql` by name (`small-snapshot`, ...).
    pub fn plan(&self, name: &str) -> Plan {
        let service = self.service();
        let plan = service["plans"]
            .as_array()
            .and_then(|plans| plans.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("service postgresql has no plan {name}: {service}"));
        Plan {
            id: plan["id"].as_str().expect("plan id").to_owned(),
            name: name.to_owned(),
            raw: plan.clone(),
        }
    }
}

/// An OSB client for one broker.
#[derive(Debug, Clone)]
pub struct Osb {
    pub base: String,
    credentials: Option<(String, String)>,
    http: reqwest::Client,
}

impl Osb {
    pub fn new(base: String, credentials: Option<(String, String)>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        Osb {
            base,
            credentials,
            http,
        }
    }

    /// The same broker with other (or no) credentials.
    pub fn with_credentials(&self, credentials: Option<(String, String)>) -> Self {
        Osb {
            credentials,
            ..self.clone()
        }
    }

    /// A request with the API version header and the platform's credentials.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.raw_request(method, path)
            .header("X-Broker-API-Version", API_VERSION)
    }

    /// A request with credentials but without the version header.
    pub fn raw_request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{}", self.base, path));
        match &self.credentials {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        }
    }

    pub async fn send(request: RequestBuilder) -> Reply {
        let response = request.send().await.expect("request to the broker");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            text,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::send(self.request(Method::GET, path)).await
    }

    pub async fn catalog(&self) -> Catalog {
        let reply = self.get("/v2/catalog").await;
        reply.expect(200);
        let raw = reply.body;
        let service = raw["services"]
            .as_array()
            .and_then(|services| services.iter().find(|s| s["name"] == "postgresql"))
            .unwrap_or_else(|| panic!("catalog has no service named postgresql: {raw}"))
            .clone();
        let plan = |name: &str| {
            let plan = service["plans"]
                .as_array()
                .and_then(|plans| plans.iter().find(|p| p["name"] == name))
                .unwrap_or_else(|| panic!("service postgresql has no plan {name}: {service}"))
                .clone();
            Plan {
                id: plan["id"].as_str().expect("plan id").to_owned(),
                name: name.to_owned(),
                raw: plan,
            }
        };
        Catalog {
            service_id: service["id"].as_str().expect("service id").to_owned(),
            small: plan("small"),
            medium: plan("medium"),
            raw,
        }
    }

    // ---- service instances ----

    pub async fn provision(&self, instance: &str, body: &Value, accepts_incomplete: bool) -> Reply {
        Self::send(
            self.request(Method::PUT, &format!("/v2/service_instances/{instance}"))
                .query(&incomplete(accepts_incomplete))
                .json(body),
        )
        .await
    }

    pub async fn update(&self, instance: &str, body: &Value, accepts_incomplete: bool) -> Reply {
        Self::send(
            self.request(Method::PATCH, &format!("/v2/service_instances/{instance}"))
                .query(&incomplete(accepts_incomplete))
                .json(body),
        )
        .await
    }

    pub async fn deprovision(
        &self,
        catalog: &Catalog,
        instance: &str,
        plan: &Plan,
        accepts_incomplete: bool,
    ) -> Reply {
        let mut query = vec![
            ("service_id", catalog.service_id.clone()),
            ("plan_id", plan.id.clone()),
        ];
        query.extend(
            incomplete(accepts_incomplete)
                .into_iter()
                .map(|(k, v)| (k, v.to_owned())),
        );
        Self::send(
            self.request(Method::DELETE, &format!("/v2/service_instances/{instance}"))
                .query(&query),
        )
        .await
    }

    pub async fn fetch_instance(&self, instance: &str) -> Reply {
        self.get(&format!("/v2/service_instances/{instance}")).await
    }

    pub async fn last_operation(&self, instance: &str, operation: Option<&str>) -> Reply {
        let mut request = self.request(
            Method::GET,
            &format!("/v2/service_instances/{instance}/last_operation"),
        );
        if let Some(operation) = operation {
            request = request.query(&[("operation", operation)]);
        }
        Self::send(request).await
    }

    /// Polls until the operation is no longer `in progress` (or the instance is gone).
    pub async fn wait_for_instance(&self, instance: &str, operation: Option<&str>) -> Reply {
        let started = Instant::now();
        loop {
            let reply = self.last_operation(instance, operation).await;
            let done = reply.status != StatusCode::OK || reply.state() != "in progress";
            assert!(
                reply.status == StatusCode::OK || reply.status == StatusCode::GONE,
                "last_operation of {instance} answered {}: {}",
                reply.status,
                reply.text
            );
            if done {
                return reply;
            }
            assert!(
                started.elapsed() < OPERATION_DEADLINE,
                "operation on {instance} still in progress: {}",
                reply.text
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Provisions an instance of `plan` and waits until it succeeded.
    pub async fn create_instance(&self, catalog: &Catalog, plan: &Plan) -> String {
        let instance = new_id();
        let reply = self
            .provision(&instance, &provision_body(catalog, plan), true)
            .await;
        reply.expect(202);
        let done = self
            .wait_for_instance(&instance, reply.operation().as_deref())
            .await;
        assert_eq!(
            done.state(),
            "succeeded",
            "provision of {instance}: {}",
            done.text
        );
        instance
    }

    /// Deprovisions an instance and waits until it is gone.
    pub async fn delete_instance(&self, catalog: &Catalog, instance: &str, plan: &Plan) {
        let reply = self.deprovision(catalog, instance, plan, true).await;
        assert!(
            reply.status == StatusCode::ACCEPTED || reply.status == StatusCode::OK,
            "deprovision of {instance}: {} {}",
            reply.status,
            reply.text
        );
        if reply.status == StatusCode::ACCEPTED {
            let done = self
                .wait_for_instance(instance, reply.operation().as_deref())
                .await;
            assert!(
                done.status == StatusCode::GONE || done.state() == "succeeded",
                "deprovision of {instance} ended with {} {}",
                done.status,
                done.text
            );
        }
    }

    // ---- service bindings ----

    pub async fn bind(
        &self,
        instance: &str,
        binding: &str,
        body: &Value,
        accepts_incomplete: bool,
    ) -> Reply {
        Self::send(
            self.request(Method::PUT, &binding_path(instance, binding))
                .query(&incomplete(accepts_incomplete))
                .json(body),
        )
        .await
    }

    pub async fn unbind(
        &self,
        catalog: &Catalog,
        instance: &str,
        binding: &str,
        plan: &Plan,
        accepts_incomplete: bool,
    ) -> Reply {
        let mut query = vec![
            ("service_id", catalog.service_id.clone()),
            ("plan_id", plan.id.clone()),
        ];
        query.extend(
            incomplete(accepts_incomplete)
                .into_iter()
                .map(|(k, v)| (k, v.to_owned())),
        );
        Self::send(
            self.request(Method::DELETE, &binding_path(instance, binding))
                .query(&query),
        )
        .await
    }

    pub async fn fetch_binding(&self, instance: &str, binding: &str) -> Reply {
        self.get(&binding_path(instance, binding)).await
    }

    pub async fn binding_last_operation(
        &self,
        instance: &str,
        binding: &str,
        operation: Option<&str>,
    ) -> Reply {
        let mut request = self.request(
            Method::GET,
            &format!("{}/last_operation", binding_path(instance, binding)),
        );
        if let Some(operation) = operation {
            request = request.query(&[("operation", operation)]);
        }
        Self::send(request).await
    }

    pub async fn wait_for_binding(
        &self,
        instance: &str,
        binding: &str,
        operation: Option<&str>,
    ) -> Reply {
        let started = Instant::now();
        loop {
            let reply = self
                .binding_last_operation(instance, binding, operation)
                .await;
            assert!(
                reply.status == StatusCode::OK || reply.status == StatusCode::GONE,
                "last_operation of binding {binding} answered {}: {}",
                reply.status,
                reply.text
            );
            if reply.status != StatusCode::OK || reply.state() != "in progress" {
                return reply;
            }
            assert!(
                started.elapsed() < OPERATION_DEADLINE,
                "binding {binding} still in progress: {}",
                reply.text
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Binds (async when the broker wants it) and returns the binding's credentials.
    pub async fn create_binding_with(&self, instance: &str, binding: &str, body: &Value) -> Value {
        let reply = self.bind(instance, binding, body, true).await;
        match reply.status.as_u16() {
            201 | 200 => reply.body["credentials"].clone(),
            202 => {
                let done = self
                    .wait_for_binding(instance, binding, reply.operation().as_deref())
                    .await;
                assert_eq!(
                    done.state(),
                    "succeeded",
                    "binding {binding}: {}",
                    done.text
                );
                let fetched = self.fetch_binding(instance, binding).await;
                fetched.expect(200);
                fetched.body["credentials"].clone()
            }
            _ => panic!("bind {binding} answered {}: {}", reply.status, reply.text),
        }
    }

    pub async fn create_binding(
        &self,
        catalog: &Catalog,
        instance: &str,
        plan: &Plan,
    ) -> (String, Value) {
        let binding = new_id();
        let credentials = self
            .create_binding_with(instance, &binding, &bind_body(catalog, plan))
            .await;
        (binding, credentials)
    }

    pub async fn delete_binding(
        &self,
        catalog: &Catalog,
        instance: &str,
        binding: &str,
        plan: &Plan,
    ) {
        let reply = self.unbind(catalog, instance, binding, plan, true).await;
        match reply.status.as_u16() {
            200 => {}
            202 => {
                let done = self
                    .wait_for_binding(instance, binding, reply.operation().as_deref())
                    .await;
                assert!(
                    done.status == StatusCode::GONE || done.state() == "succeeded",
                    "unbind of {binding} ended with {} {}",
                    done.status,
                    done.text
                );
            }
            _ => panic!("unbind {binding} answered {}: {}", reply.status, reply.text),
        }
    }

    /// Asserts that the instance does not exist for the broker (nothing was created).
    pub async fn assert_absent(&self, instance: &str) {
        let fetched = self.fetch_instance(instance).await;
        assert_eq!(
            fetched.status.as_u16(),
            404,
            "instance {instance} must not exist: {}",
            fetched.text
        );
        let last = self.last_operation(instance, None).await;
        assert_eq!(
            last.status.as_u16(),
            404,
            "instance {instance} must have no operation: {}",
            last.text
        );
    }
}

fn incomplete(accepts_incomplete: bool) -> Vec<(&'static str, &'static str)> {
    if accepts_incomplete {
        vec![("accepts_incomplete", "true")]
    } else {
        Vec::new()
    }
}

fn binding_path(instance: &str, binding: &str) -> String {
    format!("/v2/service_instances/{instance}/service_bindings/{binding}")
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A provision request as Cloud Foundry sends it.
pub fn provision_body(catalog: &Catalog, plan: &Plan) -> Value {
    json!({
        "service_id": catalog.service_id,
        "plan_id": plan.id,
        "organization_guid": "org-guid-acceptance",
        "space_guid": "space-guid-acceptance",
        "context": {
            "platform": "cloudfoundry",
            "organization_guid": "org-guid-acceptance",
            "space_guid": "space-guid-acceptance",
            "instance_name": "acceptance-db"
        }
    })
}

pub fn update_body(catalog: &Catalog, from: &Plan, to: &Plan) -> Value {
    json!({
        "service_id": catalog.service_id,
        "plan_id": to.id,
        "previous_values": { "plan_id": from.id, "service_id": catalog.service_id },
        "context": { "platform": "cloudfoundry", "instance_name": "acceptance-db" }
    })
}

pub fn bind_body(catalog: &Catalog, plan: &Plan) -> Value {
    json!({
        "service_id": catalog.service_id,
        "plan_id": plan.id,
        "bind_resource": { "app_guid": "app-guid-acceptance" },
        "context": { "platform": "cloudfoundry" }
    })
}
