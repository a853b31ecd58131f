//! Backups, restores, clones and forks as a platform and a developer use them: the Backup
//! API over HTTP (platform credentials or a service key's instance token), provision
//! parameters `clone_from` / `fork_from`, and the broker's local backup storage looked at
//! (and tampered with) from outside. Every comparison is by the dataset's fingerprint
//! (`dataset.rs`), never by dump bytes. These tests never assert on wall-clock time: they
//! poll with generous deadlines, and where a race is inherent they check the broker's
//! own timestamps instead of hoping for an ordering.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};

use crate::data::connect;
use crate::dataset::{
    Fingerprint, LARGE_BYTES, STANDARD_BYTES, assert_same_data, change_one_byte,
    connect_eventually, fill, fingerprint_of,
};
use crate::harness::Broker;
use crate::osb::{API_VERSION, Catalog, Osb, Plan, Reply, bind_body, new_id, provision_body};

/// Polling of backups and restores gives up after this long.
const DEADLINE: Duration = Duration::from_secs(180);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How a Backup API client authenticates.
#[derive(Debug, Clone)]
enum Access {
    Platform(String, String),
    Token(String),
    Anonymous,
}

/// A Backup API client for one instance: `url` is `<broker>/v2/service_instances/<id>`.
#[derive(Debug, Clone)]
pub(crate) struct BackupApi {
    http: reqwest::Client,
    url: String,
    access: Access,
}

impl BackupApi {
    fn new(url: String, access: Access) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        BackupApi { http, url, access }
    }

    /// The platform's view of an instance.
    pub(crate) fn platform(broker: &Broker, instance: &str) -> Self {
        Self::new(
            instance_url(broker, instance),
            Access::Platform(broker.username.clone(), broker.password.clone()),
        )
    }

    /// What a service key's `backup_api` opens.
    fn from_key(backup_api: &Value) -> Self {
        Self::new(
            backup_api["url"]
                .as_str()
                .expect("backup_api.url")
                .to_owned(),
            Access::Token(
                backup_api["token"]
                    .as_str()
                    .expect("backup_api.token")
                    .to_owned(),
            ),
        )
    }

    /// The same credentials aimed at another instance.
    fn aimed_at(&self, broker: &Broker, instance: &str) -> Self {
        Self::new(instance_url(broker, instance), self.access.clone())
    }

    fn with_access(&self, access: Access) -> Self {
        Self::new(self.url.clone(), access)
    }

    fn request(&self, method: Method, suffix: &str) -> RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{suffix}", self.url))
            .header("X-Broker-API-Version", API_VERSION);
        match &self.access {
            Access::Platform(user, password) => request.basic_auth(user, Some(password)),
            Access::Token(token) => request.bearer_auth(token),
            Access::Anonymous => request,
        }
    }

    pub(crate) async fn get(&self, suffix: &str) -> Reply {
        Osb::send(self.request(Method::GET, suffix)).await
    }

    async fn create_backup(&self) -> Reply {
        Osb::send(self.request(Method::POST, "/backups").json(&json!({}))).await
    }

    pub(crate) async fn backups(&self) -> Reply {
        self.get("/backups").await
    }

    pub(crate) async fn backup(&self, backup: &str) -> Reply {
        self.get(&format!("/backups/{backup}")).await
    }

    pub(crate) async fn delete_backup(&self, backup: &str) -> Reply {
        Osb::send(self.request(Method::DELETE, &format!("/backups/{backup}"))).await
    }

    async fn restore(&self, backup: &str) -> Reply {
        Osb::send(
            self.request(Method::POST, "/restores")
                .json(&json!({ "backup_id": backup })),
        )
        .await
    }

    async fn restore_status(&self, restore: &str) -> Reply {
        self.get(&format!("/restores/{restore}")).await
    }

    async fn set_policy(&self, policy: &Value) -> Reply {
        Osb::send(self.request(Method::PUT, "/backup_policy").json(policy)).await
    }

    /// Polls a backup or restore until it is no longer `in progress`.
    async fn wait(&self, suffix: &str) -> Reply {
        let started = Instant::now();
        loop {
            let reply = self.get(suffix).await;
            reply.expect(200);
            if reply.state() != "in progress" {
                return reply;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{suffix} still in progress: {}",
                reply.text
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub(crate) async fn wait_backup(&self, backup: &str) -> Reply {
        self.wait(&format!("/backups/{backup}")).await
    }

    async fn wait_restore(&self, restore: &str) -> Reply {
        self.wait(&format!("/restores/{restore}")).await
    }

    /// Polls until data flows (progress shows bytes) or the operation ended, so that a
    /// kill lands in the middle of the work rather than before it (`progress` is set
    /// from the start, while the operation still waits for a worker).
    async fn wait_working(&self, suffix: &str) -> Reply {
        let started = Instant::now();
        loop {
            let reply = self.get(suffix).await;
            reply.expect(200);
            let progress = &reply.body["progress"];
            let bytes = progress["raw_bytes"].as_u64().unwrap_or(0)
                + progress["stored_bytes"].as_u64().unwrap_or(0);
            if reply.state() != "in progress" || bytes > 0 {
                return reply;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{suffix} never started: {}",
                reply.text
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Requests a backup and returns its ID (asserting the 202 body).
    pub(crate) async fn start_backup(&self) -> String {
        let reply = self.create_backup().await;
        reply.expect(202);
        assert_eq!(reply.state(), "in progress", "{}", reply.text);
        let backup = reply.body["backup_id"]
            .as_str()
            .unwrap_or_else(|| panic!("202 without backup_id: {}", reply.text))
            .to_owned();
        assert_uuid_v4(&backup);
        backup
    }

    /// Takes a backup and waits until it succeeded; returns its record.
    pub(crate) async fn take_backup(&self) -> Value {
        let backup = self.start_backup().await;
        let done = self.wait_backup(&backup).await;
        assert_eq!(done.state(), "succeeded", "backup {backup}: {}", done.text);
        done.body
    }

    /// Requests a restore and returns its ID (asserting the 202 body).
    async fn start_restore(&self, backup: &str) -> String {
        let reply = self.restore(backup).await;
        reply.expect(202);
        assert_eq!(reply.state(), "in progress", "{}", reply.text);
        let restore = reply.body["restore_id"]
            .as_str()
            .unwrap_or_else(|| panic!("202 without restore_id: {}", reply.text))
            .to_owned();
        assert_uuid_v4(&restore);
        restore
    }

    /// Restores a backup in place and waits until the restore succeeded.
    pub(crate) async fn restore_and_wait(&self, backup: &str) -> Value {
        let restore = self.start_restore(backup).await;
        let done = self.wait_restore(&restore).await;
        assert_eq!(
            done.state(),
            "succeeded",
            "restore {restore} of {backup}: {}",
            done.text
        );
        done.body
    }

    /// The IDs the backup list shows, in its order (newest first).
    pub(crate) async fn listed(&self) -> Vec<String> {
        let reply = self.backups().await;
        reply.expect(200);
        reply.body["backups"]
            .as_array()
            .unwrap_or_else(|| panic!("no backups array: {}", reply.text))
            .iter()
            .map(|b| b["backup_id"].as_str().expect("backup_id").to_owned())
            .collect()
    }
}

fn instance_url(broker: &Broker, instance: &str) -> String {
    format!("{}/v2/service_instances/{instance}", broker.url())
}

#[track_caller]
fn assert_uuid_v4(id: &str) {
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id:?} is no UUID: {e}"));
    assert_eq!(parsed.get_version_num(), 4, "{id} is a UUIDv4");
}

fn timestamp(record: &Value, field: &str) -> DateTime<Utc> {
    let text = record[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing: {record}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{field} {text:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// An instance of plan small with a binding and the dataset, and its fingerprint.
#[derive(Debug)]
pub(crate) struct Filled {
    pub(crate) instance: String,
    pub(crate) credentials: Value,
    pub(crate) fingerprint: Fingerprint,
}

async fn filled_instance(osb: &Osb, catalog: &Catalog, filler_bytes: usize) -> Filled {
    filled_instance_of(osb, catalog, &catalog.small, filler_bytes).await
}

/// An instance of `plan` with a binding and the dataset, and its fingerprint.
pub(crate) async fn filled_instance_of(
    osb: &Osb,
    catalog: &Catalog,
    plan: &Plan,
    filler_bytes: usize,
) -> Filled {
    let instance = osb.create_instance(catalog, plan).await;
    let (_, credentials) = osb.create_binding(catalog, &instance, plan).await;
    let client = connect(&credentials).await;
    fill(&client, filler_bytes).await;
    let fingerprint = crate::dataset::fingerprint(&client).await;
    Filled {
        instance,
        credentials,
        fingerprint,
    }
}

/// Provisions an instance of plan small with these parameters and waits for the end.
async fn provision_with(osb: &Osb, catalog: &Catalog, parameters: Value) -> (String, Reply) {
    provision_plan_with(osb, catalog, &catalog.small, parameters).await
}

/// Provisions an instance of `plan` with these parameters and waits for the end.
pub(crate) async fn provision_plan_with(
    osb: &Osb,
    catalog: &Catalog,
    plan: &Plan,
    parameters: Value,
) -> (String, Reply) {
    let instance = new_id();
    let mut body = provision_body(catalog, plan);
    body["parameters"] = parameters;
    let reply = osb.provision(&instance, &body, true).await;
    reply.expect(202);
    let done = osb
        .wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    (instance, done)
}

/// Provisions a copy (`clone_from` / `fork_from`), binds it, and returns its fingerprint
/// read through the new binding (which proves that a binding on the copy works).
async fn copy_and_fingerprint(
    osb: &Osb,
    catalog: &Catalog,
    parameters: Value,
) -> (String, Value, Fingerprint) {
    copy_of_plan_and_fingerprint(osb, catalog, &catalog.small, parameters).await
}

/// [`copy_and_fingerprint`] for a copy of plan `plan`.
pub(crate) async fn copy_of_plan_and_fingerprint(
    osb: &Osb,
    catalog: &Catalog,
    plan: &Plan,
    parameters: Value,
) -> (String, Value, Fingerprint) {
    let (copy, done) = provision_plan_with(osb, catalog, plan, parameters.clone()).await;
    assert_eq!(
        done.state(),
        "succeeded",
        "provision with {parameters}: {}",
        done.text
    );
    let (_, credentials) = osb.create_binding(catalog, &copy, plan).await;
    let fingerprint = fingerprint_of(&credentials).await;
    (copy, credentials, fingerprint)
}

/// Asserts that a copy is independent of its source: a write to it is not seen there.
pub(crate) async fn assert_independent(copy: &Value, source: &Value) {
    connect_eventually(copy)
        .await
        .batch_execute(
            "CREATE TABLE only_in_the_copy (v int); INSERT INTO only_in_the_copy VALUES (1)",
        )
        .await
        .expect("the copy takes writes through its binding");
    let seen: i64 = connect_eventually(source)
        .await
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'only_in_the_copy'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(seen, 0, "a write to the copy does not reach its source");
}

// ---- the broker's local storage, looked at from outside ----

/// Where the broker's default local storage keeps a backup's objects.
fn backup_dir(broker: &Broker, instance: &str, backup: &str) -> PathBuf {
    broker
        .data_dir()
        .join("backups/backups")
        .join(instance)
        .join(backup)
}

/// The data object a stored manifest names.
fn data_object(broker: &Broker, instance: &str, backup: &str) -> PathBuf {
    let manifest_path = backup_dir(broker, instance, backup).join("manifest.json");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", manifest_path.display())),
    )
    .expect("the manifest is JSON");
    let key = manifest["source"]["data_object"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest without source.data_object: {manifest}"));
    assert!(
        key.starts_with(&format!("backups/{instance}/{backup}/data-")),
        "the data object lies under its backup: {key}"
    );
    broker.data_dir().join("backups").join(key)
}

/// Backups of an instance that still have objects in storage.
fn stored_backups(broker: &Broker, instance: &str) -> BTreeSet<String> {
    let dir = broker.data_dir().join("backups/backups").join(instance);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| has_files(&entry.path()))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

fn has_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|entry| {
            let path = entry.path();
            path.is_file() || (path.is_dir() && has_files(&path))
        })
    })
}

/// Flips one byte in the middle of a file.
fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).expect("reading the data object");
    assert!(bytes.len() > 1024, "a data object with content");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, bytes).expect("writing the data object");
}

/// A second request was sent right after the first operation was accepted; `first` is
/// the first operation's record read after the second request was answered. If the
/// first was still running then, the second must have been refused; if it had ended,
/// an accepted second operation must have been created after the first finished.
#[track_caller]
fn assert_refused_while_running(
    what: &str,
    second: &Reply,
    first: &Reply,
    second_created: Option<&Value>,
) {
    if first.state() == "in progress" {
        eprintln!("{what}: the first operation still ran, so it must be refused");
        second.expect_error(422, Some("ConcurrencyError"));
        return;
    }
    eprintln!("{what}: the first operation had ended; checking the broker's timestamps");
    match second.status.as_u16() {
        422 => {
            second.expect_error(422, Some("ConcurrencyError"));
        }
        200 | 202 => {
            let created = second_created.unwrap_or_else(|| {
                panic!(
                    "{what} was accepted while the first may have run: {}",
                    second.text
                )
            });
            assert!(
                timestamp(&first.body, "finished_at") <= timestamp(created, "created_at"),
                "{what} was accepted while the first operation ran: first {} second {created}",
                first.text
            );
        }
        other => panic!("{what} answered {other}: {}", second.text),
    }
}

// ---- the tests ----

#[tokio::test]
async fn backups_restore_in_place_brings_back_exactly_the_backed_up_data() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, STANDARD_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);

    let backup = api.take_backup().await;
    let backup_id = backup["backup_id"].as_str().expect("backup_id").to_owned();
    assert_eq!(backup["instance_id"], json!(source.instance), "{backup}");
    assert_eq!(backup["trigger"], json!("manual"), "{backup}");
    assert_eq!(backup["engine"], json!("postgresql"), "{backup}");
    assert!(backup["error"].is_null(), "{backup}");
    assert!(backup["stored_bytes"].as_u64().unwrap_or(0) > 0, "{backup}");
    assert!(backup["raw_bytes"].as_u64().unwrap_or(0) > 0, "{backup}");
    let sha = backup["sha256"].as_str().unwrap_or_default();
    assert!(
        sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
        "sha256 in hex: {backup}"
    );
    assert!(timestamp(&backup, "finished_at") >= timestamp(&backup, "created_at"));
    assert_eq!(api.listed().await, std::slice::from_ref(&backup_id));
    api.backup(&new_id()).await.expect_error(404, None);

    // Damage the live data in every way the fingerprint can see.
    connect(&source.credentials)
        .await
        .batch_execute(
            "DROP VIEW sales.customer_totals; DROP TABLE sales.orders;
             SELECT lo_unlink(blob) FROM public.blobs;
             DELETE FROM public.blobs; SELECT nextval('sales.invoice_numbers');
             SET ROLE NONE; UPDATE public.binding_notes SET body = 'overwritten';
             SET ROLE phoenix_owner;",
        )
        .await
        .expect("damaging the data");
    change_one_byte(&connect(&source.credentials).await).await;
    let damaged = fingerprint_of(&source.credentials).await;
    assert_ne!(damaged, source.fingerprint, "the damage shows");

    let restore = api.restore_and_wait(&backup_id).await;
    assert_eq!(restore["backup_id"], json!(backup_id), "{restore}");
    assert_eq!(restore["instance_id"], json!(source.instance), "{restore}");
    assert_eq!(
        restore["source_instance_id"],
        json!(source.instance),
        "{restore}"
    );
    assert!(restore["error"].is_null(), "{restore}");
    // The binding the application already has keeps working and sees the backup's data.
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "after an in-place restore",
    );
    let restores = api.get("/restores").await;
    restores.expect(200);
    assert_eq!(
        restores.body["restores"][0]["restore_id"], restore["restore_id"],
        "{}",
        restores.text
    );
    // A backup the instance does not have cannot be restored.
    api.restore(&new_id()).await.expect_error(422, None);
}

#[tokio::test]
async fn backups_clone_from_a_named_backup_or_the_latest_one_matches_that_backup() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, STANDARD_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);
    let older = api.take_backup().await;
    change_one_byte(&connect(&source.credentials).await).await;
    let newer_fingerprint = fingerprint_of(&source.credentials).await;
    api.take_backup().await;

    let (_, named_credentials, named) = copy_and_fingerprint(
        &osb,
        &catalog,
        json!({ "clone_from": {
            "instance_id": source.instance,
            "backup_id": older["backup_id"],
        }}),
    )
    .await;
    assert_same_data(
        &source.fingerprint.as_copied(),
        &named,
        "a clone of a named backup",
    );

    let (_, _, latest) = copy_and_fingerprint(
        &osb,
        &catalog,
        json!({ "clone_from": { "instance_id": source.instance } }),
    )
    .await;
    assert_same_data(
        &newer_fingerprint.as_copied(),
        &latest,
        "a clone of the latest backup",
    );
    assert_independent(&named_credentials, &source.credentials).await;
}

#[tokio::test]
async fn backups_clone_from_a_backup_of_a_deprovisioned_instance() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, STANDARD_BYTES).await;
    let backup = BackupApi::platform(&broker, &source.instance)
        .take_backup()
        .await;
    osb.delete_instance(&catalog, &source.instance, &catalog.small)
        .await;

    let (_, _, clone) = copy_and_fingerprint(
        &osb,
        &catalog,
        json!({ "clone_from": {
            "instance_id": source.instance,
            "backup_id": backup["backup_id"],
        }}),
    )
    .await;
    assert_same_data(
        &source.fingerprint.as_copied(),
        &clone,
        "a clone of a deprovisioned instance's backup",
    );
}

#[tokio::test]
async fn backups_fork_from_a_live_instance_matches_it_and_then_goes_its_own_way() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, STANDARD_BYTES).await;

    let (_, fork_credentials, fork) = copy_and_fingerprint(
        &osb,
        &catalog,
        json!({ "fork_from": { "instance_id": source.instance } }),
    )
    .await;
    assert_same_data(
        &source.fingerprint.as_copied(),
        &fork,
        "a fork of a live instance",
    );
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "the fork's source is untouched",
    );
    assert_independent(&fork_credentials, &source.credentials).await;
}

#[tokio::test]
async fn backups_service_key_token_opens_its_own_instance_only_and_dies_with_the_key() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, 64 * 1024).await;
    let other = osb.create_instance(&catalog, &catalog.small).await;

    // An application's binding carries no backup access.
    assert!(
        source.credentials.get("backup_api").is_none(),
        "an app binding has no backup_api: {}",
        source.credentials
    );
    // A backup token never goes into an application's environment.
    let mut app_binding = bind_body(&catalog, &catalog.small);
    app_binding["parameters"] = json!({ "backup_access": true });
    osb.bind(&source.instance, &new_id(), &app_binding, true)
        .await
        .expect_error(400, None);
    let key = new_id();
    let credentials = osb
        .create_binding_with(
            &source.instance,
            &key,
            &json!({
                "service_id": catalog.service_id,
                "plan_id": catalog.small.id,
                "parameters": { "backup_access": true },
                "context": { "platform": "cloudfoundry" },
            }),
        )
        .await;
    assert!(
        credentials["uri"].is_string(),
        "a service key still has a uri: {credentials}"
    );
    let backup_api = &credentials["backup_api"];
    assert_eq!(
        backup_api["url"],
        json!(instance_url(&broker, &source.instance)),
        "{credentials}"
    );
    assert_eq!(
        backup_api["instance_id"],
        json!(source.instance),
        "{credentials}"
    );
    let token = backup_api["token"].as_str().unwrap_or_default();
    assert!(
        token.starts_with("phx_") && token.len() > 20,
        "a token: {credentials}"
    );
    assert!(
        !broker.log().contains(token),
        "the token never appears in the broker's log"
    );
    assert!(
        !broker.state_store_contents().await.contains(token),
        "the token is stored hashed, never in clear"
    );

    let keyed = BackupApi::from_key(backup_api);
    keyed.backups().await.expect(200);
    keyed.get("/backup_policy").await.expect(200);
    let backup = keyed.take_backup().await;
    assert_eq!(backup["instance_id"], json!(source.instance));

    // The token opens nothing else: 403 on another instance, whatever the request.
    let elsewhere = keyed.aimed_at(&broker, &other);
    elsewhere
        .backups()
        .await
        .expect_error(403, Some("Forbidden"));
    elsewhere
        .create_backup()
        .await
        .expect_error(403, Some("Forbidden"));
    elsewhere
        .restore(backup["backup_id"].as_str().expect("backup_id"))
        .await
        .expect_error(403, Some("Forbidden"));
    elsewhere
        .get("/backup_policy")
        .await
        .expect_error(403, Some("Forbidden"));
    // The platform's credentials open both.
    BackupApi::platform(&broker, &other)
        .backups()
        .await
        .expect(200);

    // No or invalid credentials: 401; no API version: 412.
    keyed
        .with_access(Access::Anonymous)
        .backups()
        .await
        .expect_error(401, None);
    keyed
        .with_access(Access::Token(format!("{token}x")))
        .backups()
        .await
        .expect_error(401, None);
    keyed
        .with_access(Access::Platform(broker.username.clone(), "wrong".into()))
        .backups()
        .await
        .expect_error(401, None);
    let unversioned = Osb::send(
        keyed
            .http
            .get(format!("{}/backups", keyed.url))
            .bearer_auth(token),
    )
    .await;
    unversioned.expect_error(412, None);

    // Deleting the key revokes the token.
    osb.delete_binding(&catalog, &source.instance, &key, &catalog.small)
        .await;
    keyed.backups().await.expect_error(401, None);
    keyed.create_backup().await.expect_error(401, None);
}

#[tokio::test]
async fn backups_restore_rejects_a_backup_with_a_flipped_byte_and_leaves_live_data_as_it_was() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, STANDARD_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);
    let backup = api.take_backup().await;
    let backup_id = backup["backup_id"].as_str().expect("backup_id");
    // The live data moves on, so a restore that did anything would show.
    change_one_byte(&connect(&source.credentials).await).await;
    let live = fingerprint_of(&source.credentials).await;

    flip_a_byte(&data_object(&broker, &source.instance, backup_id));
    let restore = api.start_restore(backup_id).await;
    let done = api.wait_restore(&restore).await;
    assert_eq!(
        done.state(),
        "failed",
        "a tampered backup must not restore: {}",
        done.text
    );
    eprintln!("the restore of the tampered backup: {}", done.text);
    assert!(
        done.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "a failed restore says why: {}",
        done.text
    );
    assert_same_data(
        &live,
        &fingerprint_of(&source.credentials).await,
        "live data after a failed restore",
    );
    // The instance is not left locked: the next backup runs.
    api.take_backup().await;
}

#[tokio::test]
async fn backups_a_second_backup_or_restore_while_one_runs_is_a_concurrency_error() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, LARGE_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);
    let first = api.take_backup().await;
    let first_id = first["backup_id"].as_str().expect("backup_id").to_owned();

    // While a backup runs: another backup, a restore, and deleting the running backup.
    let running = api.start_backup().await;
    let second = api.create_backup().await;
    let restore = api.restore(&first_id).await;
    let running_then = api.backup(&running).await;
    running_then.expect(200);
    let delete = api.delete_backup(&running).await;
    let after_delete = api.backup(&running).await;
    let second_record = match second.body["backup_id"].as_str() {
        Some(id) => Some(api.backup(id).await.body),
        None => None,
    };
    assert_refused_while_running(
        "a second backup",
        &second,
        &running_then,
        second_record.as_ref(),
    );
    let restore_record = match restore.body["restore_id"].as_str() {
        Some(id) => Some(api.restore_status(id).await.body),
        None => None,
    };
    assert_refused_while_running(
        "a restore during a backup",
        &restore,
        &running_then,
        restore_record.as_ref(),
    );
    match delete.status.as_u16() {
        // 202: storage refused and the backup is hidden (contracts: deleted later).
        200 | 202 => after_delete.expect_error(404, None),
        _ => {
            delete.expect_error(422, Some("ConcurrencyError"));
            after_delete.expect(200)
        }
    };
    if after_delete.state() == "in progress" {
        delete.expect_error(422, Some("ConcurrencyError"));
    }
    // Whatever was accepted ends; wait for all of it before the next round.
    if delete.status.as_u16() != 200 {
        api.wait_backup(&running).await;
    }
    if let Some(record) = &second_record {
        api.wait_backup(record["backup_id"].as_str().expect("backup_id"))
            .await;
    }
    if let Some(record) = &restore_record {
        api.wait_restore(record["restore_id"].as_str().expect("restore_id"))
            .await;
    }

    // While a restore runs: a backup and another restore.
    let running = api.start_restore(&first_id).await;
    let backup = api.create_backup().await;
    let restore = api.restore(&first_id).await;
    let running_then = api.restore_status(&running).await;
    running_then.expect(200);
    let backup_record = match backup.body["backup_id"].as_str() {
        Some(id) => Some(api.backup(id).await.body),
        None => None,
    };
    assert_refused_while_running(
        "a backup during a restore",
        &backup,
        &running_then,
        backup_record.as_ref(),
    );
    let restore_record = match restore.body["restore_id"].as_str() {
        Some(id) => Some(api.restore_status(id).await.body),
        None => None,
    };
    assert_refused_while_running(
        "a second restore",
        &restore,
        &running_then,
        restore_record.as_ref(),
    );
    let done = api.wait_restore(&running).await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    if let Some(record) = &backup_record {
        api.wait_backup(record["backup_id"].as_str().expect("backup_id"))
            .await;
    }
    if let Some(record) = &restore_record {
        api.wait_restore(record["restore_id"].as_str().expect("restore_id"))
            .await;
    }
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "after the restore",
    );
}

#[tokio::test]
async fn backups_a_backup_interrupted_by_sigkill_ends_clearly_and_succeeded_means_restorable() {
    let mut broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, LARGE_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);

    let backup = api.start_backup().await;
    let seen = api.wait_working(&format!("/backups/{backup}")).await;
    eprintln!("killing the broker during the backup: {}", seen.text);
    broker.restart().await;

    let done = api.wait_backup(&backup).await;
    eprintln!("the interrupted backup after the restart: {}", done.text);
    match done.state() {
        "succeeded" => {}
        "failed" => {
            assert!(
                done.body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "a failed backup says why: {}",
                done.text
            );
            assert!(
                !backup_dir(&broker, &source.instance, &backup)
                    .join("manifest.json")
                    .exists(),
                "a failed backup has no manifest in storage"
            );
        }
        other => panic!("unexpected state {other}: {}", done.text),
    }
    // The instance kept serving its data through the crash.
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "the instance after the broker's crash",
    );
    // The instance is not left locked, and every backup listed as succeeded restores
    // (after a change, so a restore that did nothing would show).
    api.take_backup().await;
    let listed = api.backups().await;
    listed.expect(200);
    let succeeded: Vec<String> = listed.body["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter(|b| b["state"] == "succeeded")
        .map(|b| b["backup_id"].as_str().expect("backup_id").to_owned())
        .collect();
    assert!(!succeeded.is_empty(), "{}", listed.text);
    for id in succeeded {
        change_one_byte(&connect_eventually(&source.credentials).await).await;
        api.restore_and_wait(&id).await;
        assert_same_data(
            &source.fingerprint,
            &fingerprint_of(&source.credentials).await,
            &format!("restore of backup {id}"),
        );
    }
}

/// Where a restore is when the broker gets its SIGKILL.
#[derive(Debug, Clone, Copy)]
enum RestoreKillPoint {
    /// The restore has begun filling a database beside the live one.
    BesideTheLiveData,
    /// The restore reports that it swaps the restored data in.
    Swapping,
}

/// Polls until the restore reached `point` (or ended: the race is inherent, and the
/// outcome checks hold either way).
async fn wait_for_restore_point(
    api: &BackupApi,
    credentials: &Value,
    restore: &str,
    point: RestoreKillPoint,
) -> Reply {
    let client = connect_eventually(credentials).await;
    let started = Instant::now();
    loop {
        let reply = api.restore_status(restore).await;
        reply.expect(200);
        if reply.state() != "in progress" {
            return reply;
        }
        let reached = match point {
            RestoreKillPoint::BesideTheLiveData => {
                client
                    .query_one(
                        "SELECT count(*) FROM pg_database WHERE datname NOT IN \
                         (current_database(), 'postgres', 'template0', 'template1')",
                        &[],
                    )
                    .await
                    .expect("listing databases")
                    .get::<_, i64>(0)
                    > 0
            }
            RestoreKillPoint::Swapping => reply.body["progress"]["phase"] == "swapping",
        };
        if reached {
            return reply;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "restore {restore} never reached {point:?}: {}",
            reply.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn restore_kill_restart(point: RestoreKillPoint) {
    let mut broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, LARGE_BYTES).await;
    let api = BackupApi::platform(&broker, &source.instance);
    let backup = api.take_backup().await;
    let backup_id = backup["backup_id"].as_str().expect("backup_id");
    change_one_byte(&connect(&source.credentials).await).await;
    let changed = fingerprint_of(&source.credentials).await;

    let restore = api.start_restore(backup_id).await;
    let seen = wait_for_restore_point(&api, &source.credentials, &restore, point).await;
    eprintln!("killing the broker at {point:?}: {}", seen.text);
    // Progress counts what was read of the stored object and what was restored of it.
    for field in ["raw_bytes", "stored_bytes"] {
        let so_far = seen.body["progress"][field].as_u64().unwrap_or(0);
        let total = backup[field].as_u64().unwrap_or(0);
        assert!(
            so_far <= total,
            "restore progress {field} {so_far} exceeds the backup's {field} {total}: {}",
            seen.text
        );
    }
    broker.restart().await;

    let done = api.wait_restore(&restore).await;
    eprintln!("the interrupted restore after the restart: {}", done.text);
    let now = fingerprint_of(&source.credentials).await;
    match done.state() {
        "succeeded" => {
            assert_same_data(&source.fingerprint, &now, "after a restore that succeeded")
        }
        "failed" => {
            assert!(
                done.body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "a failed restore says why: {}",
                done.text
            );
            assert_same_data(&changed, &now, "after a restore that failed");
        }
        other => panic!("unexpected state {other}: {}", done.text),
    }
    // The instance is not left locked: the restore can be repeated.
    change_one_byte(&connect_eventually(&source.credentials).await).await;
    api.restore_and_wait(backup_id).await;
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "after restoring again",
    );
}

#[tokio::test]
async fn backups_a_restore_killed_beside_the_live_data_ends_clearly_and_the_data_is_whole() {
    restore_kill_restart(RestoreKillPoint::BesideTheLiveData).await;
}

#[tokio::test]
async fn backups_a_restore_killed_while_swapping_ends_clearly_and_the_data_is_whole() {
    restore_kill_restart(RestoreKillPoint::Swapping).await;
}

#[tokio::test]
async fn backups_retention_keep_last_two_keeps_only_the_newest_two_listed_and_stored() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    // A policy given at provision time is the instance's policy.
    let at_provision = json!({
        "schedule": null,
        "retention": { "keep_last": 3, "max_age_days": 30 },
    });
    let (instance, done) = provision_with(
        &osb,
        &catalog,
        json!({ "backup_policy": at_provision.clone() }),
    )
    .await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    let api = BackupApi::platform(&broker, &instance);
    let read = api.get("/backup_policy").await;
    read.expect(200);
    assert_eq!(read.body, at_provision, "the provision's policy");
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    fill(&connect(&credentials).await, 256 * 1024).await;

    api.set_policy(&json!({
        "schedule": "every tuesday",
        "retention": { "keep_last": 2, "max_age_days": null },
    }))
    .await
    .expect_error(400, None);
    let policy = json!({
        "schedule": null,
        "retention": { "keep_last": 2, "max_age_days": null },
    });
    let reply = api.set_policy(&policy).await;
    reply.expect(200);
    assert_eq!(reply.body, policy, "PUT answers the policy");
    let read = api.get("/backup_policy").await;
    read.expect(200);
    assert_eq!(read.body, policy, "GET answers the policy");

    let mut taken = Vec::new();
    for _ in 0..4 {
        change_one_byte(&connect(&credentials).await).await;
        let fingerprint = fingerprint_of(&credentials).await;
        let backup = api.take_backup().await;
        taken.push((
            backup["backup_id"].as_str().expect("backup_id").to_owned(),
            fingerprint,
        ));
    }
    let newest: Vec<String> = vec![taken[3].0.clone(), taken[2].0.clone()];
    let expected: BTreeSet<String> = newest.iter().cloned().collect();

    let started = Instant::now();
    loop {
        let listed = api.listed().await;
        let stored = stored_backups(&broker, &instance);
        if listed == newest && stored == expected {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "retention keep_last 2: listed {listed:?}, stored {stored:?}, expected {newest:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    for (old, _) in &taken[..2] {
        api.backup(old).await.expect_error(404, None);
    }
    // The older of the two kept is whole.
    api.restore_and_wait(&taken[2].0).await;
    assert_same_data(
        &taken[2].1,
        &fingerprint_of(&credentials).await,
        "restore of the older kept backup",
    );
}

#[tokio::test]
async fn backups_clone_or_fork_from_another_organization_or_space_is_refused_with_a_description() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, 64 * 1024).await;
    // A backup exists, so the only reason to refuse is where the request comes from.
    let backup = BackupApi::platform(&broker, &source.instance)
        .take_backup()
        .await;

    let elsewhere = [
        ("org-guid-other", "space-guid-other"),
        ("org-guid-acceptance", "space-guid-other"),
    ];
    for (organization, space) in elsewhere {
        for parameters in [
            json!({ "clone_from": {
                "instance_id": source.instance,
                "backup_id": backup["backup_id"],
            }}),
            json!({ "clone_from": { "instance_id": source.instance } }),
            json!({ "fork_from": { "instance_id": source.instance } }),
        ] {
            let instance = new_id();
            let mut body = provision_body(&catalog, &catalog.small);
            body["organization_guid"] = json!(organization);
            body["space_guid"] = json!(space);
            body["context"]["organization_guid"] = json!(organization);
            body["context"]["space_guid"] = json!(space);
            body["parameters"] = parameters.clone();
            let reply = osb.provision(&instance, &body, true).await;
            reply.expect_error(422, None);
            let description = reply.body["description"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase();
            assert!(
                description.contains("organization") || description.contains("space"),
                "{organization}/{space} with {parameters}: the description says why: {}",
                reply.text
            );
            osb.assert_absent(&instance).await;
        }
    }
    // The source is untouched.
    assert_same_data(
        &source.fingerprint,
        &fingerprint_of(&source.credentials).await,
        "the source of refused copies",
    );
}

#[tokio::test]
async fn backups_the_openapi_document_is_announced_in_the_catalog_and_served_with_credentials() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let announced = catalog.small.raw["metadata"]["backups"]["openapi"]
        .as_str()
        .unwrap_or_else(|| panic!("plan small announces the backup API: {}", catalog.small.raw))
        .to_owned();
    let document = osb.get(&announced).await;
    document.expect(200);
    assert!(
        document.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "an OpenAPI 3 document: {}",
        document.text
    );
    let paths = document.body["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("paths: {}", document.text));
    for resource in ["/backups", "/restores", "/backup_policy"] {
        assert!(
            paths
                .keys()
                .any(|p| p.starts_with("/v2/service_instances/{") && p.ends_with(resource)),
            "the document describes {resource}: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    osb.with_credentials(None)
        .get(&announced)
        .await
        .expect_error(401, None);
}

#[tokio::test]
async fn backups_a_schedule_starts_a_backup_when_due_and_may_not_fire_more_than_hourly() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let source = filled_instance(&osb, &catalog, 64 * 1024).await;
    let api = BackupApi::platform(&broker, &source.instance);

    let every_minute = json!({ "schedule": "* * * * *" });
    let refused = api.set_policy(&every_minute).await;
    refused.expect_error(400, None);
    assert!(
        refused.text.contains("an hour"),
        "the refusal says why: {}",
        refused.text
    );

    // Daily, at the next whole minute (UTC): due within a minute, then not for a day.
    let due = Utc::now() + chrono::TimeDelta::minutes(1);
    let schedule = due.format("%M %H * * *").to_string();
    let reply = api.set_policy(&json!({ "schedule": schedule })).await;
    reply.expect(200);
    assert_eq!(reply.body["schedule"], schedule, "{}", reply.text);

    let started = Instant::now();
    let scheduled = loop {
        let listed = api.backups().await;
        listed.expect(200);
        let found = listed.body["backups"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["trigger"] == "schedule").cloned());
        if let Some(backup) = found {
            break backup;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no scheduled backup started: {}",
            listed.text
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let id = scheduled["backup_id"].as_str().expect("backup_id");
    let done = api.wait_backup(id).await;
    assert_eq!(done.body["state"], "succeeded", "{}", done.text);
    let backups = api.backups().await;
    let count = backups.body["backups"].as_array().map_or(0, |all| {
        all.iter().filter(|b| b["trigger"] == "schedule").count()
    });
    assert_eq!(count, 1, "one due time starts one backup: {}", backups.text);
}
