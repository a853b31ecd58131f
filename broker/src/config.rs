//! Configuration: an optional YAML file, every key overridden by a `PHOENIX_*`
//! environment variable (`listen` by `PHOENIX_LISTEN`, ...), resolved into [`Settings`].
//!
//! With nothing configured the broker serves on 127.0.0.1:8080 with SQLite and local
//! storage under `./phoenix-data`. It refuses to start on a non-loopback address without
//! platform credentials. Secrets (broker password, master key, a database URL with a
//! password) are never printed: `Debug` redacts them.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_adapters::infrastructure::EbsHostConfig;
use phoenix_adapters::snapshot::ebs::{EbsConfig, PollPolicy};
use phoenix_adapters::storage::StorageConfig;
use serde::Deserialize;

use crate::error::Error;
use crate::store::DatabaseUrl;

/// The configuration file's keys (all optional; environment variables override them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    broker_username: Option<String>,
    broker_password: Option<String>,
    catalog: Option<PathBuf>,
    master_key: Option<String>,
    instance_ports: Option<String>,
    instance_host: Option<String>,
    operation_lease: Option<String>,
    worker_poll: Option<String>,
    supervise_interval: Option<String>,
    log: Option<String>,
    storage: Option<StorageConfig>,
    public_url: Option<String>,
    clone_scope: Option<String>,
    delete_backups_with_instance: Option<bool>,
    ebs: Option<EbsSettings>,
}

/// On an EC2 host: instance volumes are EBS volumes of their own (`ebs:` in the file, or
/// `PHOENIX_EBS` as YAML). Credentials come from here only, never from the instance
/// metadata service.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EbsSettings {
    pub region: String,
    /// An EC2-compatible endpoint; AWS's when absent.
    pub endpoint: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The EC2 instance the broker runs on.
    pub instance_id: String,
    /// Its availability zone.
    pub availability_zone: String,
    /// Where attached volumes show up.
    #[serde(default = "default_device_dir")]
    pub device_dir: PathBuf,
    #[serde(default = "default_volume_size_gib")]
    pub volume_size_gib: i32,
    #[serde(default = "default_volume_type")]
    pub volume_type: String,
}

fn default_device_dir() -> PathBuf {
    PathBuf::from("/dev/disk/by-id")
}

fn default_volume_size_gib() -> i32 {
    20
}

fn default_volume_type() -> String {
    "gp3".to_owned()
}

impl fmt::Debug for EbsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EbsSettings")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &"..")
            .field("secret_access_key", &"..")
            .field("instance_id", &self.instance_id)
            .field("availability_zone", &self.availability_zone)
            .field("device_dir", &self.device_dir)
            .field("volume_size_gib", &self.volume_size_gib)
            .field("volume_type", &self.volume_type)
            .finish()
    }
}

impl EbsSettings {
    /// The local infrastructure's view of these settings.
    pub fn host_config(&self) -> EbsHostConfig {
        EbsHostConfig {
            ec2: EbsConfig {
                region: self.region.clone(),
                endpoint: self.endpoint.clone(),
                access_key_id: Some(self.access_key_id.clone()),
                secret_access_key: Some(self.secret_access_key.clone()),
                poll: PollPolicy::default(),
            },
            instance_id: self.instance_id.clone(),
            availability_zone: self.availability_zone.clone(),
            device_dir: self.device_dir.clone(),
            volume_size_gib: self.volume_size_gib,
            volume_type: self.volume_type.clone(),
        }
    }
}

/// The platform's credentials for HTTP basic authentication.
#[derive(Clone)]
pub struct BrokerCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for BrokerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerCredentials")
            .field("username", &self.username)
            .field("password", &"..")
            .finish()
    }
}

/// The master key's text from configuration; never printed.
#[derive(Clone)]
pub struct MasterKeyText(pub String);

impl fmt::Debug for MasterKeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKeyText(..)")
    }
}

/// The resolved configuration of the broker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address of the HTTP server (port 0: any free port).
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database: DatabaseUrl,
    /// None: no authentication (allowed on a loopback address only).
    pub credentials: Option<BrokerCredentials>,
    /// None: the embedded catalog.
    pub catalog: Option<PathBuf>,
    /// None: `<data_dir>/master.key`, created on first start.
    pub master_key: Option<MasterKeyText>,
    pub instance_ports: RangeInclusive<u16>,
    /// Address instance servers listen on and bindings point to.
    pub instance_host: String,
    pub operation_lease: Duration,
    pub worker_poll: Duration,
    pub supervise_interval: Duration,
    pub log: String,
    /// Where backups are stored; default: local disk under `<data_dir>/backups`.
    pub storage: StorageConfig,
    /// The broker's URL as clients reach it (the backup API URL in service keys);
    /// None: `http://` and the address the broker listens on.
    pub public_url: Option<String>,
    /// Which instances a clone or fork may start from.
    pub clone_scope: CloneScope,
    /// Whether deprovisioning an instance deletes its backups at once (default: they
    /// stay until their retention ends, so a deleted instance can still be cloned).
    pub delete_backups_with_instance: bool,
    /// None: instance volumes are directories under the data directory.
    pub ebs: Option<EbsSettings>,
}

/// Which instances a clone or fork may start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneScope {
    /// Instances of the same space (the default).
    Space,
    /// Instances of the same organization.
    Organization,
}

impl Settings {
    /// Reads the file (if any) and the process environment.
    ///
    /// # Errors
    /// [`Error::Config`] for an unreadable file, a malformed value or an unsafe setup.
    pub fn load(file: Option<&Path>) -> Result<Self, Error> {
        Self::from_sources(file, |name| std::env::var(name).ok())
    }

    /// Reads the file (if any) and the variables `env` returns.
    ///
    /// # Errors
    /// [`Error::Config`] for an unreadable file, a malformed value or an unsafe setup.
    pub fn from_sources(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let file_config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
                serde_norway::from_str(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            None => FileConfig::default(),
        };
        let pick = |name: &str, from_file: Option<String>| -> Option<String> {
            env(&format!("PHOENIX_{}", name.to_ascii_uppercase()))
                .filter(|v| !v.is_empty())
                .or(from_file)
        };
        let path_text = |p: Option<PathBuf>| p.map(|p| p.to_string_lossy().into_owned());

        let listen_text =
            pick("listen", file_config.listen).unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = parse_listen(&listen_text)?;
        let data_dir = PathBuf::from(
            pick("data_dir", path_text(file_config.data_dir))
                .unwrap_or_else(|| "./phoenix-data".into()),
        );
        let database = match pick("database_url", file_config.database_url) {
            Some(url) => DatabaseUrl::parse(&url),
            None => DatabaseUrl::Sqlite(data_dir.join("phoenix.db")),
        };
        let username = pick("broker_username", file_config.broker_username);
        let password = pick("broker_password", file_config.broker_password);
        let credentials = match (username, password) {
            (Some(username), Some(password)) => Some(BrokerCredentials { username, password }),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "set both PHOENIX_BROKER_USERNAME and PHOENIX_BROKER_PASSWORD, or neither"
                        .into(),
                ));
            }
        };
        if credentials.is_none() && !listen.ip().is_loopback() {
            return Err(Error::Config(format!(
                "refusing to serve on the non-loopback address {listen} without credentials: \
                 set PHOENIX_BROKER_USERNAME and PHOENIX_BROKER_PASSWORD"
            )));
        }
        let instance_ports = parse_ports(
            &pick("instance_ports", file_config.instance_ports)
                .unwrap_or_else(|| "15432-16431".into()),
        )?;
        let duration = |name: &str, value: Option<String>, default: &str| {
            let text = pick(name, value).unwrap_or_else(|| default.into());
            let parsed = humantime::parse_duration(&text).map_err(|e| {
                Error::Config(format!(
                    "PHOENIX_{}: {text:?}: {e}",
                    name.to_ascii_uppercase()
                ))
            })?;
            if parsed.is_zero() {
                return Err(Error::Config(format!(
                    "PHOENIX_{} must be longer than zero",
                    name.to_ascii_uppercase()
                )));
            }
            Ok::<_, Error>(parsed)
        };
        Ok(Self {
            listen,
            database,
            credentials,
            catalog: pick("catalog", path_text(file_config.catalog)).map(PathBuf::from),
            master_key: pick("master_key", file_config.master_key).map(MasterKeyText),
            instance_ports,
            instance_host: pick("instance_host", file_config.instance_host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            operation_lease: duration("operation_lease", file_config.operation_lease, "30s")?,
            worker_poll: duration("worker_poll", file_config.worker_poll, "1s")?,
            supervise_interval: duration(
                "supervise_interval",
                file_config.supervise_interval,
                "30s",
            )?,
            log: pick("log", file_config.log).unwrap_or_else(|| "info".into()),
            public_url: pick("public_url", file_config.public_url),
            clone_scope: match pick("clone_scope", file_config.clone_scope).as_deref() {
                None | Some("space") => CloneScope::Space,
                Some("organization") => CloneScope::Organization,
                Some(other) => {
                    return Err(Error::Config(format!(
                        "PHOENIX_CLONE_SCOPE: {other:?} is neither \"space\" nor \"organization\""
                    )));
                }
            },
            delete_backups_with_instance: match env("PHOENIX_DELETE_BACKUPS_WITH_INSTANCE")
                .filter(|v| !v.is_empty())
            {
                Some(text) => text.parse().map_err(|_| {
                    Error::Config(format!(
                        "PHOENIX_DELETE_BACKUPS_WITH_INSTANCE: {text:?} is neither true nor false"
                    ))
                })?,
                None => file_config.delete_backups_with_instance.unwrap_or(false),
            },
            ebs: match env("PHOENIX_EBS").filter(|v| !v.is_empty()) {
                Some(text) => Some(
                    serde_norway::from_str(&text)
                        .map_err(|e| Error::Config(format!("PHOENIX_EBS: {e}")))?,
                ),
                None => file_config.ebs,
            },
            storage: match env("PHOENIX_STORAGE").filter(|v| !v.is_empty()) {
                Some(text) => serde_norway::from_str(&text)
                    .map_err(|e| Error::Config(format!("PHOENIX_STORAGE: {e}")))?,
                None => file_config.storage.unwrap_or_else(|| StorageConfig::Local {
                    path: data_dir.join("backups"),
                }),
            },
            data_dir,
        })
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, Error> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Error::Config(format!("PHOENIX_LISTEN: {text:?} is not HOST:PORT")))
}

fn parse_ports(text: &str) -> Result<RangeInclusive<u16>, Error> {
    let bad = || Error::Config(format!("PHOENIX_INSTANCE_PORTS: {text:?} is not START-END"));
    let (start, end) = text.split_once('-').ok_or_else(bad)?;
    let start: u16 = start.trim().parse().map_err(|_| bad())?;
    let end: u16 = end.trim().parse().map_err(|_| bad())?;
    if start == 0 || start > end {
        return Err(bad());
    }
    Ok(start..=end)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, Error> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_sources(None, |name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_serve_on_loopback_with_sqlite_under_phoenix_data() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            s.database,
            DatabaseUrl::Sqlite("./phoenix-data/phoenix.db".into())
        );
        assert!(s.credentials.is_none());
        assert_eq!(s.instance_ports, 15432..=16431);
        assert_eq!(s.operation_lease, Duration::from_secs(30));
        assert_eq!(s.worker_poll, Duration::from_secs(1));
        assert_eq!(
            s.storage,
            StorageConfig::Local {
                path: "./phoenix-data/backups".into()
            }
        );
    }

    #[test]
    fn storage_comes_from_the_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("phoenix.yaml");
        std::fs::write(&file, "storage:\n  type: local\n  path: /srv/backups\n").unwrap();
        let s = Settings::from_sources(Some(&file), |_| None).unwrap();
        assert_eq!(
            s.storage,
            StorageConfig::Local {
                path: "/srv/backups".into()
            }
        );
        let s = Settings::from_sources(Some(&file), |name| {
            (name == "PHOENIX_STORAGE")
                .then(|| r#"{"type": "local", "path": "/elsewhere"}"#.to_owned())
        })
        .unwrap();
        assert_eq!(
            s.storage,
            StorageConfig::Local {
                path: "/elsewhere".into()
            }
        );
        assert!(settings(&[("PHOENIX_STORAGE", "{type: tape}")]).is_err());
    }

    #[test]
    fn a_non_loopback_address_without_credentials_is_refused() {
        let err = settings(&[("PHOENIX_LISTEN", "0.0.0.0:8080")]).unwrap_err();
        assert!(err.to_string().contains("without credentials"), "{err}");
        let ok = settings(&[
            ("PHOENIX_LISTEN", "0.0.0.0:8080"),
            ("PHOENIX_BROKER_USERNAME", "u"),
            ("PHOENIX_BROKER_PASSWORD", "p"),
        ]);
        assert!(ok.is_ok());
    }

    #[test]
    fn half_credentials_are_refused() {
        assert!(settings(&[("PHOENIX_BROKER_USERNAME", "u")]).is_err());
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("phoenix.yaml");
        std::fs::write(
            &file,
            "listen: 127.0.0.1:9000\ninstance_ports: 20000-20010\noperation_lease: 5s\n",
        )
        .unwrap();
        let s = Settings::from_sources(Some(&file), |name| {
            (name == "PHOENIX_LISTEN").then(|| "127.0.0.1:0".to_owned())
        })
        .unwrap();
        assert_eq!(s.listen.port(), 0);
        assert_eq!(s.instance_ports, 20000..=20010);
        assert_eq!(s.operation_lease, Duration::from_secs(5));
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("phoenix.yaml");
        std::fs::write(&file, "lisen: 127.0.0.1:9000\n").unwrap();
        assert!(Settings::from_sources(Some(&file), |_| None).is_err());
        assert!(settings(&[("PHOENIX_INSTANCE_PORTS", "9-1")]).is_err());
        assert!(settings(&[("PHOENIX_OPERATION_LEASE", "soon")]).is_err());
    }

    #[test]
    fn the_example_configuration_in_manifests_loads() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/phoenix.example.yaml");
        let s = Settings::from_sources(Some(&file), |name| {
            (name == "PHOENIX_BROKER_PASSWORD").then(|| "from-the-environment".to_owned())
        })
        .unwrap();
        assert_eq!(s.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(s.credentials.unwrap().username, "platform");
        assert_eq!(s.supervise_interval, Duration::from_secs(30));
        assert_eq!(
            s.storage,
            StorageConfig::Local {
                path: "/var/lib/phoenix/backups".into()
            }
        );
    }

    #[test]
    fn database_urls_select_the_backend() {
        let s = settings(&[("PHOENIX_DATABASE_URL", "postgres://u:secret@h/db")]).unwrap();
        assert!(matches!(s.database, DatabaseUrl::Postgres(_)));
        assert!(!format!("{s:?}").contains("secret"));
        let s = settings(&[("PHOENIX_DATABASE_URL", "sqlite:///tmp/x.db")]).unwrap();
        assert_eq!(s.database, DatabaseUrl::Sqlite("/tmp/x.db".into()));
    }
}
