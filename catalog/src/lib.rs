//! The catalog: the services and plans Phoenix offers, as the operator writes them in
//! YAML, validated once when they load.
//!
//! A [`Catalog`] that exists is valid: IDs and names are unique, every parameter schema
//! compiles, every plan names an engine version, an infrastructure and its resources.
//! Serialising a catalog gives exactly the OSB `GET /v2/catalog` body; Phoenix's own plan
//! fields (engine, resources, backup defaults, ...) never leave the broker. This crate must never know how
//! an engine runs: the broker turns a plan into a running instance.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod backup_policy;
pub mod schedule;

pub use backup_policy::{BackupPolicy, Retention};
pub use schedule::Schedule;

/// The catalog shipped with Phoenix, used when the operator names no other.
const EMBEDDED: &str = include_str!("../catalog.yaml");

/// Largest parameter schema the OSB spec allows.
const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Everything that makes a catalog unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The catalog file could not be read.
    #[error("reading the catalog {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The catalog is not well-formed YAML of the expected shape.
    #[error("parsing the catalog: {0}")]
    Parse(#[from] serde_norway::Error),
    /// The catalog parses but breaks a rule (duplicate ID, bad schema, ...).
    #[error("invalid catalog: {0}")]
    Invalid(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The services and plans the broker offers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub services: Vec<Service>,
}

/// An OSB service offering.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    pub bindable: bool,
    #[serde(default)]
    pub instances_retrievable: bool,
    #[serde(default)]
    pub bindings_retrievable: bool,
    #[serde(default)]
    pub allow_context_updates: bool,
    #[serde(default)]
    pub plan_updateable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    pub plans: Vec<Plan>,
}

/// Where a plan's instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Infrastructure {
    /// A supervised process with a volume directory on the broker's host.
    Local,
}

/// How a plan's instances are backed up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackupStrategy {
    /// The engine's own dump (`pg_dump`), streamed through compression, encryption and
    /// the digest into backup storage: portable, and as slow as the dump.
    #[default]
    Stream,
    /// A snapshot of the instance's volume by its infrastructure (btrfs, EBS): near
    /// instant, but it lives where the volume lives. `shipped`: it is also read once as a
    /// stream through the same filters into backup storage, so that it survives the loss
    /// of the host.
    Snapshot {
        #[serde(default)]
        shipped: bool,
    },
}

impl BackupStrategy {
    /// The strategy's name in the catalog metadata and the backup API.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Snapshot { .. } => "snapshot",
        }
    }
}

/// Where a plan announces the backup API (its OpenAPI document) to the platform.
pub const BACKUP_API_DOCUMENT: &str = "/v2/backup_api/openapi.json";

/// An OSB plan, with what Phoenix needs to provision it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(default = "default_free")]
    pub free: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bindable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_updateable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_rotatable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_polling_duration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_info: Option<MaintenanceInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schemas: Option<Schemas>,
    /// The engine's name as the adapters know it (`postgresql`).
    #[serde(skip_serializing)]
    pub engine: String,
    /// The engine's major version (`"15"`): pinned per plan, because dump tools refuse
    /// servers newer than themselves.
    #[serde(skip_serializing)]
    pub engine_version: String,
    #[serde(skip_serializing)]
    pub infrastructure: Infrastructure,
    /// Engine settings of an instance (`max_connections`, `shared_buffers`, ...).
    #[serde(skip_serializing)]
    pub resources: BTreeMap<String, String>,
    /// The backup policy a new instance starts with (none: backups only on request,
    /// all kept); checked as the catalog parses, so a bad schedule stops the broker.
    #[serde(default, skip_serializing)]
    pub backup: BackupPolicy,
    /// How instances of this plan are backed up; announced to the platform in the plan's
    /// `metadata.backups` with the backup API's document.
    #[serde(default, skip_serializing)]
    pub backup_strategy: BackupStrategy,
    #[serde(skip)]
    validators: Validators,
}

fn default_free() -> bool {
    true
}

/// OSB maintenance information of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceInfo {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// OSB parameter schemas of a plan.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schemas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_instance: Option<InstanceSchemas>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_binding: Option<BindingSchemas>,
}

/// Schemas for creating and updating an instance.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSchemas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<InputParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<InputParameters>,
}

/// Schemas for creating a binding.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSchemas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<InputParameters>,
}

/// One JSON schema for request parameters.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputParameters {
    pub parameters: Value,
}

/// Which request's parameters are being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParametersFor {
    Provision,
    Update,
    Bind,
}

impl fmt::Display for ParametersFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Provision => "provision",
            Self::Update => "update",
            Self::Bind => "bind",
        })
    }
}

/// Compiled parameter schemas of a plan (absent schema: any object is accepted).
#[derive(Debug, Default)]
struct Validators {
    provision: Option<jsonschema::Validator>,
    update: Option<jsonschema::Validator>,
    bind: Option<jsonschema::Validator>,
}

impl Catalog {
    /// The catalog shipped with Phoenix.
    ///
    /// # Errors
    /// Only if the shipped catalog is broken, which its tests rule out.
    pub fn embedded() -> Result<Self> {
        Self::from_yaml(EMBEDDED)
    }

    /// Reads and validates a catalog file.
    ///
    /// # Errors
    /// When the file cannot be read, parsed or validated.
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and validates a catalog from YAML text.
    ///
    /// # Errors
    /// When the text is not a valid catalog.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let mut catalog: Catalog = serde_norway::from_str(text)?;
        catalog.validate()?;
        Ok(catalog)
    }

    /// The service with this ID.
    pub fn service(&self, service_id: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.id == service_id)
    }

    /// The plan with this ID and its service.
    pub fn plan(&self, plan_id: &str) -> Option<(&Service, &Plan)> {
        self.services
            .iter()
            .find_map(|s| s.plan(plan_id).map(|p| (s, p)))
    }

    /// Every plan with its service.
    pub fn plans(&self) -> impl Iterator<Item = (&Service, &Plan)> {
        self.services
            .iter()
            .flat_map(|s| s.plans.iter().map(move |p| (s, p)))
    }

    fn validate(&mut self) -> Result<()> {
        if self.services.is_empty() {
            return invalid("the catalog has no service");
        }
        let mut ids = HashSet::new();
        let mut service_names = HashSet::new();
        for service in &mut self.services {
            check_id("service", &service.id)?;
            check_name("service", &service.name)?;
            check_text(&service.name, "description", &service.description)?;
            if !ids.insert(service.id.clone()) {
                return invalid(format!("the ID {} is used twice", service.id));
            }
            if !service_names.insert(service.name.clone()) {
                return invalid(format!("the service name {} is used twice", service.name));
            }
            if service.plans.is_empty() {
                return invalid(format!("the service {} has no plan", service.name));
            }
            let mut plan_names = HashSet::new();
            for plan in &mut service.plans {
                let label = format!("{}/{}", service.name, plan.name);
                check_id("plan", &plan.id)?;
                check_name("plan", &plan.name)?;
                check_text(&label, "description", &plan.description)?;
                if !ids.insert(plan.id.clone()) {
                    return invalid(format!("the ID {} is used twice", plan.id));
                }
                if !plan_names.insert(plan.name.clone()) {
                    return invalid(format!(
                        "the plan name {} is used twice in {}",
                        plan.name, service.name
                    ));
                }
                check_text(&label, "engine", &plan.engine)?;
                check_text(&label, "engine_version", &plan.engine_version)?;
                if let Some(info) = &plan.maintenance_info {
                    check_semver(&label, &info.version)?;
                }
                plan.validators = compile_schemas(&label, plan.schemas.as_ref())?;
                plan.announce_backups(&label)?;
            }
        }
        Ok(())
    }
}

impl Service {
    /// The plan of this service with this ID.
    pub fn plan(&self, plan_id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == plan_id)
    }
}

impl Plan {
    /// Writes `metadata.backups` (strategy, shipped, the backup API's document) from the
    /// plan's own fields, so that what the platform is told cannot drift from what the
    /// broker does.
    fn announce_backups(&mut self, label: &str) -> Result<()> {
        let metadata = self
            .metadata
            .get_or_insert_with(|| Value::Object(serde_json::Map::new()));
        let Some(metadata) = metadata.as_object_mut() else {
            return invalid(format!("{label}: metadata must be an object"));
        };
        if metadata.contains_key("backups") {
            return invalid(format!(
                "{label}: metadata.backups is written by Phoenix from backup_strategy; remove it"
            ));
        }
        let mut backups = serde_json::json!({
            "strategy": self.backup_strategy.name(),
            "openapi": BACKUP_API_DOCUMENT,
        });
        if let BackupStrategy::Snapshot { shipped } = self.backup_strategy {
            backups["shipped"] = Value::Bool(shipped);
        }
        metadata.insert("backups".to_owned(), backups);
        Ok(())
    }

    /// Whether instances of this plan can be bound (the plan overrides its service).
    pub fn is_bindable(&self, service: &Service) -> bool {
        self.bindable.unwrap_or(service.bindable)
    }

    /// Whether an instance of this plan may change to another plan.
    pub fn is_plan_updateable(&self, service: &Service) -> bool {
        self.plan_updateable.unwrap_or(service.plan_updateable)
    }

    /// Whether a binding of this plan may be rotated (`predecessor_binding_id`).
    pub fn is_binding_rotatable(&self) -> bool {
        self.binding_rotatable.unwrap_or(false)
    }

    /// The version of maintenance an instance of this plan gets now.
    pub fn maintenance_version(&self) -> Option<&str> {
        self.maintenance_info.as_ref().map(|m| m.version.as_str())
    }

    /// Whether the plan's instance schemas (create or update) declare a top-level
    /// parameter of this name: only such a parameter may override a plan resource.
    pub fn declares_instance_parameter(&self, name: &str) -> bool {
        let Some(schemas) = self
            .schemas
            .as_ref()
            .and_then(|s| s.service_instance.as_ref())
        else {
            return false;
        };
        [&schemas.create, &schemas.update]
            .into_iter()
            .flatten()
            .any(|input| {
                input
                    .parameters
                    .get("properties")
                    .and_then(|p| p.get(name))
                    .is_some()
            })
    }

    /// Checks request parameters against the plan's schema.
    ///
    /// # Errors
    /// One user-facing message per violation, naming where in the parameters it is.
    pub fn validate_parameters(
        &self,
        what: ParametersFor,
        parameters: &Value,
    ) -> Result<(), Vec<String>> {
        let validator = match what {
            ParametersFor::Provision => &self.validators.provision,
            ParametersFor::Update => &self.validators.update,
            ParametersFor::Bind => &self.validators.bind,
        };
        if !parameters.is_object() {
            return Err(vec!["parameters must be a JSON object".to_owned()]);
        }
        let Some(validator) = validator else {
            return Ok(());
        };
        let errors: Vec<String> = validator
            .iter_errors(parameters)
            // Where and which rule, never the value: parameters can hold secrets, and
            // this text reaches the response and the log.
            .map(|e| {
                let path = e.instance_path().to_string();
                let path = if path.is_empty() { "/" } else { path.as_str() };
                format!("{path} fails the {:?} rule", e.kind().keyword())
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn invalid<T>(message: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(message.into()))
}

/// IDs travel in URLs and query strings: RFC 3986 unreserved characters only.
fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'));
    if ok {
        Ok(())
    } else {
        invalid(format!(
            "the {what} ID {id:?} must be 1 to 255 characters of A-Z a-z 0-9 - . _ ~"
        ))
    }
}

/// Names are typed on command lines: the spec's "CLI-friendly" strings.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    if ok {
        Ok(())
    } else {
        invalid(format!(
            "the {what} name {name:?} must be 1 to 255 characters of A-Z a-z 0-9 - ."
        ))
    }
}

fn check_text(owner: &str, field: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        invalid(format!("{owner}: {field} must not be empty"))
    } else {
        Ok(())
    }
}

/// `MAJOR.MINOR.PATCH` with an optional `-pre` or `+build` suffix.
fn check_semver(owner: &str, version: &str) -> Result<()> {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    let ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        invalid(format!(
            "{owner}: maintenance_info.version {version:?} is not a semantic version"
        ))
    }
}

fn compile_schemas(owner: &str, schemas: Option<&Schemas>) -> Result<Validators> {
    let Some(schemas) = schemas else {
        return Ok(Validators::default());
    };
    let instance = schemas.service_instance.as_ref();
    Ok(Validators {
        provision: compile(owner, "provision", instance.and_then(|s| s.create.as_ref()))?,
        update: compile(owner, "update", instance.and_then(|s| s.update.as_ref()))?,
        bind: compile(
            owner,
            "bind",
            schemas
                .service_binding
                .as_ref()
                .and_then(|s| s.create.as_ref()),
        )?,
    })
}

fn compile(
    owner: &str,
    what: &str,
    input: Option<&InputParameters>,
) -> Result<Option<jsonschema::Validator>> {
    let Some(input) = input else {
        return Ok(None);
    };
    let schema = &input.parameters;
    if schema.get("$schema").and_then(Value::as_str).is_none() {
        return invalid(format!("{owner}: the {what} schema must declare $schema"));
    }
    if serde_json::to_vec(schema).map_or(0, |b| b.len()) > MAX_SCHEMA_BYTES {
        return invalid(format!("{owner}: the {what} schema is larger than 64 kB"));
    }
    if has_external_ref(schema) {
        return invalid(format!(
            "{owner}: the {what} schema must not contain external references"
        ));
    }
    jsonschema::validator_for(schema)
        .map(Some)
        .map_err(|e| Error::Invalid(format!("{owner}: the {what} schema does not compile: {e}")))
}

fn has_external_ref(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| {
            (k == "$ref" && v.as_str().is_some_and(|r| !r.starts_with('#'))) || has_external_ref(v)
        }),
        Value::Array(items) => items.iter().any(has_external_ref),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_embedded_catalog_offers_postgresql_small_and_medium() {
        let catalog = Catalog::embedded().unwrap();
        let service = catalog
            .services
            .iter()
            .find(|s| s.name == "postgresql")
            .unwrap();
        let by_name = |name: &str| service.plans.iter().find(|p| p.name == name).unwrap();
        let (small, medium) = (by_name("small"), by_name("medium"));
        for plan in [small, medium] {
            assert_eq!(plan.engine, "postgresql");
            assert_eq!(plan.engine_version, "15");
            assert_eq!(plan.infrastructure, Infrastructure::Local);
            assert!(plan.resources.contains_key("max_connections"));
            assert!(plan.is_bindable(service));
            assert!(plan.is_plan_updateable(service));
            assert_eq!(
                plan.backup.schedule.as_ref().map(Schedule::as_str),
                Some("0 3 * * *")
            );
            assert_eq!(
                plan.backup.retention,
                Retention::new(Some(7), Some(30)).unwrap()
            );
        }
    }

    #[test]
    fn the_osb_catalog_body_hides_phoenix_fields() {
        let catalog = Catalog::embedded().unwrap();
        insta::assert_json_snapshot!(serde_json::to_value(&catalog).unwrap());
    }

    #[test]
    fn parameters_are_checked_against_the_plan_schema() {
        let catalog = Catalog::embedded().unwrap();
        let (_, plan) = catalog
            .plan("af04c3f7-aa32-4ef7-b443-c85b0e21dde4")
            .unwrap();
        let provision = ParametersFor::Provision;
        assert!(plan.validate_parameters(provision, &json!({})).is_ok());
        assert!(
            plan.validate_parameters(provision, &json!({"max_connections": 80}))
                .is_ok()
        );
        let errors = plan
            .validate_parameters(provision, &json!({"max_connections": "many"}))
            .unwrap_err();
        assert!(errors[0].contains("max_connections"), "{errors:?}");
        assert!(errors[0].contains("type"), "{errors:?}");
        assert!(!errors[0].contains("many"), "a value in {errors:?}");
        assert!(
            plan.validate_parameters(provision, &json!({"bogus": 1}))
                .is_err()
        );
        assert!(plan.validate_parameters(provision, &json!([1])).is_err());
        assert!(
            plan.validate_parameters(ParametersFor::Bind, &json!({"x": 1}))
                .is_err()
        );
    }

    const MINIMAL: &str = r#"
services:
  - id: s1
    name: svc
    description: d
    bindable: true
    plans:
      - id: p1
        name: plan
        description: d
        engine: postgresql
        engine_version: "15"
        infrastructure: local
        resources: {}
"#;

    #[test]
    fn a_minimal_catalog_loads() {
        Catalog::from_yaml(MINIMAL).unwrap();
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let text = MINIMAL.replace("id: p1", "id: s1");
        let err = Catalog::from_yaml(&text).unwrap_err();
        assert!(err.to_string().contains("used twice"), "{err}");
    }

    #[test]
    fn unknown_fields_and_infrastructures_are_refused() {
        assert!(Catalog::from_yaml(&MINIMAL.replace("resources: {}", "resourcez: {}")).is_err());
        assert!(Catalog::from_yaml(&MINIMAL.replace("local", "moon")).is_err());
    }

    #[test]
    fn schemas_that_do_not_compile_are_refused() {
        let text = format!(
            "{MINIMAL}        schemas:\n          service_binding:\n            create:\n              parameters: {{\"$schema\": \"http://json-schema.org/draft-04/schema#\", \"type\": 12}}\n"
        );
        let err = Catalog::from_yaml(&text).unwrap_err();
        assert!(err.to_string().contains("does not compile"), "{err}");
    }

    #[test]
    fn maintenance_versions_must_be_semantic() {
        let text = format!("{MINIMAL}        maintenance_info: {{version: \"one\"}}\n");
        assert!(Catalog::from_yaml(&text).is_err());
        let text = format!("{MINIMAL}        maintenance_info: {{version: \"1.2.3+abc\"}}\n");
        assert!(Catalog::from_yaml(&text).is_ok());
    }

    #[test]
    fn a_plan_without_a_backup_section_has_no_schedule_and_keeps_everything() {
        let catalog = Catalog::from_yaml(MINIMAL).unwrap();
        assert_eq!(catalog.services[0].plans[0].backup, BackupPolicy::default());
    }

    #[test]
    fn a_bad_backup_section_refuses_the_catalog_naming_the_field() {
        let with = |backup: &str| format!("{MINIMAL}        backup: {backup}\n");
        let err = Catalog::from_yaml(&with(r#"{schedule: "0 25 * * *"}"#)).unwrap_err();
        assert!(err.to_string().contains("hour: \"25\""), "{err}");
        let err = Catalog::from_yaml(&with("{retention: {keep_last: 0}}")).unwrap_err();
        assert!(err.to_string().contains("retention.keep_last"), "{err}");
        assert!(Catalog::from_yaml(&with("{schedul: \"@daily\"}")).is_err());
        assert!(Catalog::from_yaml(&with("{schedule: \"@daily\"}")).is_ok());
    }

    #[test]
    fn plans_announce_their_backup_strategy_and_the_backup_api() {
        let stream = Catalog::from_yaml(MINIMAL).unwrap();
        assert_eq!(
            stream.services[0].plans[0].metadata.as_ref().unwrap()["backups"],
            serde_json::json!({"strategy": "stream", "openapi": BACKUP_API_DOCUMENT})
        );
        let text = format!("{MINIMAL}        backup_strategy: {{type: snapshot, shipped: true}}\n");
        let snapshot = Catalog::from_yaml(&text).unwrap();
        let plan = &snapshot.services[0].plans[0];
        assert_eq!(
            plan.backup_strategy,
            BackupStrategy::Snapshot { shipped: true }
        );
        assert_eq!(
            plan.metadata.as_ref().unwrap()["backups"],
            serde_json::json!({"strategy": "snapshot", "shipped": true, "openapi": BACKUP_API_DOCUMENT})
        );
        let by_hand = format!("{MINIMAL}        metadata: {{backups: {{strategy: stream}}}}\n");
        let err = Catalog::from_yaml(&by_hand).unwrap_err();
        assert!(err.to_string().contains("metadata.backups"), "{err}");
        let unknown = format!("{MINIMAL}        backup_strategy: {{type: tape}}\n");
        assert!(Catalog::from_yaml(&unknown).is_err());
    }

    #[test]
    fn names_must_be_cli_friendly() {
        assert!(Catalog::from_yaml(&MINIMAL.replace("name: svc", "name: my svc")).is_err());
    }
}
