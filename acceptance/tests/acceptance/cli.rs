//! The people's CLI (`phoenix backup|restore|policy`) as a user runs it: the real binary,
//! a service key created with `backup_access` (in `cf service-key` form), a real broker
//! and PostgreSQL instance; a download decrypted offline back into a pg_dump archive.
//! Exit statuses, messages and the absence of the token in any output are the contract.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::Command;

use crate::data::connect;
use crate::dataset::{assert_same_data, change_one_byte, fill, fingerprint_of};
use crate::harness::{Broker, phoenix_bin};
use crate::osb::{Catalog, Osb, new_id};

/// A CLI run that takes longer than this hangs, and fails the test.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// What one `phoenix` run did.
#[derive(Debug, Clone)]
struct Run {
    args: String,
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`phoenix {}` printed no JSON ({e}): {}",
                self.args,
                self.text()
            )
        })
    }

    #[track_caller]
    fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code,
            code,
            "`phoenix {}` exit status; stdout:\n{}\nstderr:\n{}",
            self.args,
            self.text(),
            self.stderr
        );
        self
    }
}

/// Runs the CLI the way a user's shell would, in `dir`, with only PATH, HOME and `env`
/// (a developer's own PHOENIX_* variables never leak in), stdin from `stdin` or empty.
/// Every run is kept in `runs` so that the test can check all output for secrets.
struct Shell {
    dir: TempDir,
    runs: Vec<Run>,
}

impl Shell {
    fn new() -> Self {
        Shell {
            dir: tempfile::tempdir().expect("a directory for the CLI"),
            runs: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn run(&mut self, args: &[&str]) -> Run {
        self.run_with(args, &[], None).await
    }

    async fn run_with(&mut self, args: &[&str], env: &[(&str, &str)], stdin: Option<&Path>) -> Run {
        let mut command = Command::new(phoenix_bin());
        command
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        match stdin {
            Some(path) => command.stdin(std::fs::File::open(path).expect("stdin file")),
            None => command.stdin(Stdio::null()),
        };
        let output = tokio::time::timeout(RUN_DEADLINE, command.output())
            .await
            .unwrap_or_else(|_| panic!("`phoenix {}` did not finish", args.join(" ")))
            .expect("running phoenix");
        let run = Run {
            args: args.join(" "),
            code: output.status.code().unwrap_or(-1),
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        self.runs.push(run.clone());
        run
    }

    #[track_caller]
    fn assert_never_printed(&self, secret: &str) {
        for run in &self.runs {
            assert!(
                !run.text().contains(secret) && !run.stderr.contains(secret),
                "`phoenix {}` printed a secret",
                run.args
            );
        }
    }
}

/// A service key with backup access, as `cf create-service-key -c '{"backup_access": true}'`
/// makes it: a binding without app_guid or bind_resource.
async fn service_key(osb: &Osb, catalog: &Catalog, instance: &str) -> Value {
    let body = json!({
        "service_id": catalog.service_id,
        "plan_id": catalog.small.id,
        "parameters": { "backup_access": true },
        "context": { "platform": "cloudfoundry" }
    });
    let credentials = osb.create_binding_with(instance, &new_id(), &body).await;
    assert!(
        credentials["backup_api"]["token"].is_string(),
        "a service key with backup_access carries backup_api: {credentials}"
    );
    credentials
}

/// `cf service-key` output: a header line, a blank line, then the JSON.
fn cf_service_key_output(credentials: &Value) -> String {
    format!(
        "Getting key backups for service instance acceptance-db as admin...\n\n{}\n",
        serde_json::to_string_pretty(credentials).expect("key JSON")
    )
}

fn pg_bin() -> PathBuf {
    PathBuf::from(
        std::env::var("PHOENIX_TEST_PG_BIN")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    )
}

async fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .await
        .expect("sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

#[tokio::test]
async fn the_cli_backs_up_downloads_decrypts_restores_and_deletes_with_a_service_key() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, app) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    fill(&connect(&app).await, 256 * 1024).await;
    let backed_up = fingerprint_of(&app).await;

    let key = service_key(&osb, &catalog, &instance).await;
    let token = key["backup_api"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut shell = Shell::new();
    let key_file = shell.path("key.txt");
    std::fs::write(&key_file, cf_service_key_output(&key)).expect("key file");
    let key_file = key_file.to_str().expect("utf-8 path").to_owned();

    // create --wait --json: one JSON document, the finished backup.
    let backup = shell
        .run(&[
            "backup",
            "create",
            "--wait",
            "--json",
            "--key-file",
            &key_file,
        ])
        .await
        .expect(0)
        .json();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    assert_eq!(backup["instance_id"], instance.as_str());
    let id = backup["backup_id"].as_str().expect("backup_id").to_owned();
    let stored = backup["stored_bytes"].as_u64().expect("stored_bytes");
    assert!(stored > 0);

    // list: a table with a header and the backup; --json is the API's document.
    let table = shell
        .run(&["backup", "list", "--key-file", &key_file])
        .await
        .expect(0)
        .text();
    let header = table.lines().next().unwrap_or_default();
    for column in ["ID", "STATE", "TRIGGER", "CREATED", "RAW", "STORED"] {
        assert!(header.contains(column), "{table}");
    }
    let row = table
        .lines()
        .find(|line| line.starts_with(&id))
        .unwrap_or_else(|| panic!("backup {id} missing from:\n{table}"));
    assert!(row.contains("succeeded") && row.contains("manual"), "{row}");
    let listed = shell
        .run(&["backup", "--json", "--key-file", &key_file, "list"])
        .await
        .expect(0)
        .json();
    assert_eq!(listed["backups"][0]["backup_id"], id.as_str(), "{listed}");

    // show: text details and the same JSON as create --wait ended with.
    let details = shell
        .run(&["backup", "show", &id, "--key-file", &key_file])
        .await
        .expect(0)
        .text();
    assert!(
        details.contains("backup:") && details.contains(&id),
        "{details}"
    );
    assert!(details.contains("succeeded"), "{details}");
    let shown = shell
        .run(&["backup", "show", &id, "--json", "--key-file", &key_file])
        .await
        .expect(0)
        .json();
    assert_eq!(shown["sha256"], backup["sha256"]);

    // download -o FILE: complete, checked, renamed; then decrypted offline into a
    // pg_dump archive that pg_restore reads.
    let file = shell.path("backup.bin");
    let file_arg = file.to_str().expect("utf-8 path").to_owned();
    shell
        .run(&[
            "backup",
            "download",
            &id,
            "-o",
            &file_arg,
            "--key-file",
            &key_file,
        ])
        .await
        .expect(0);
    assert_eq!(
        std::fs::metadata(&file).expect("downloaded file").len(),
        stored
    );
    assert!(!shell.path("backup.bin.partial").exists());
    assert_eq!(
        Some(sha256_of(&file).await.as_str()),
        backup["sha256"].as_str()
    );
    let data_dir = broker.data_dir();
    let decrypt = shell
        .run_with(
            &["decrypt"],
            &[("PHOENIX_DATA_DIR", data_dir.to_str().expect("utf-8 path"))],
            Some(&file),
        )
        .await
        .expect(0);
    let dump = shell.path("dump");
    std::fs::write(&dump, &decrypt.stdout).expect("dump file");
    assert_eq!(
        Some(decrypt.stdout.len() as u64),
        backup["raw_bytes"].as_u64(),
        "decrypt delivers the raw bytes"
    );
    let listing = Command::new(pg_bin().join("pg_restore"))
        .arg("-l")
        .arg(&dump)
        .output()
        .await
        .expect("pg_restore -l");
    let listing_text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.status.success(),
        "pg_restore -l: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    assert!(
        listing_text.contains("TABLE public customers"),
        "{listing_text}"
    );

    // download -o -: the same bytes on stdout.
    let piped = shell
        .run(&[
            "backup",
            "download",
            &id,
            "-o",
            "-",
            "--key-file",
            &key_file,
        ])
        .await
        .expect(0);
    assert_eq!(piped.stdout, std::fs::read(&file).expect("downloaded file"));

    // restore --wait brings the backed-up data back.
    change_one_byte(&connect(&app).await).await;
    let restored = shell
        .run(&["restore", &id, "--wait", "--key-file", &key_file])
        .await
        .expect(0)
        .text();
    assert!(restored.contains("succeeded"), "{restored}");
    assert_same_data(
        &backed_up,
        &fingerprint_of(&app).await,
        "after phoenix restore --wait",
    );

    // delete: gone for show, which prints the broker's description and exits 1.
    shell
        .run(&["backup", "delete", &id, "--key-file", &key_file])
        .await
        .expect(0);
    let gone = shell
        .run(&["backup", "show", &id, "--key-file", &key_file])
        .await
        .expect(1);
    assert!(gone.stderr.contains("HTTP 404"), "{}", gone.stderr);

    shell.assert_never_printed(&token);
}

#[tokio::test]
async fn the_cli_manages_the_policy_and_refuses_unusable_access_clearly() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let key = service_key(&osb, &catalog, &instance).await;
    let token = key["backup_api"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut shell = Shell::new();
    let url = broker.url();
    let platform = [
        ("PHOENIX_BROKER_USERNAME", broker.username.as_str()),
        ("PHOENIX_BROKER_PASSWORD", broker.password.as_str()),
    ];

    // The operator's way in: --broker-url/--instance, credentials from the environment.
    let set = shell
        .run_with(
            &[
                "policy",
                "set",
                "--broker-url",
                &url,
                "--instance",
                &instance,
                "--schedule",
                "0 3 * * *",
                "--keep-last",
                "5",
                "--json",
            ],
            &platform,
            None,
        )
        .await
        .expect(0)
        .json();
    assert_eq!(set["schedule"], "0 3 * * *", "{set}");
    assert_eq!(set["retention"]["keep_last"], 5, "{set}");

    // The user's way in: the bare credentials JSON on stdin.
    let bare = shell.path("bare.json");
    std::fs::write(&bare, key.to_string()).expect("key file");
    let shown = shell
        .run_with(&["policy", "show", "--key-file", "-"], &[], Some(&bare))
        .await
        .expect(0)
        .text();
    assert!(
        shown.contains("0 3 * * *") && shown.contains("5 backups"),
        "{shown}"
    );

    // {"credentials": {...}} works too; only --max-age-days changes.
    let wrapped = shell.path("wrapped.json");
    std::fs::write(&wrapped, json!({ "credentials": key }).to_string()).expect("key file");
    let wrapped_arg = wrapped.to_str().expect("utf-8 path").to_owned();
    let changed = shell
        .run(&[
            "policy",
            "set",
            "--max-age-days",
            "30",
            "--json",
            "--key-file",
            &wrapped_arg,
        ])
        .await
        .expect(0)
        .json();
    assert_eq!(
        changed,
        json!({"schedule": "0 3 * * *", "retention": {"keep_last": 5, "max_age_days": 30}})
    );

    // A schedule the broker refuses: its description, exit 1.
    let refused = shell
        .run(&[
            "policy",
            "set",
            "--schedule",
            "not a cron",
            "--key-file",
            &wrapped_arg,
        ])
        .await
        .expect(1);
    assert!(refused.stderr.contains("HTTP 400"), "{}", refused.stderr);

    // Usage errors exit 2 with a clear message, before any request.
    let (_, app) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let plain = shell.path("app-binding.json");
    std::fs::write(&plain, app.to_string()).expect("key file");
    let plain_arg = plain.to_str().expect("utf-8 path").to_owned();
    let no_access = shell
        .run(&["backup", "list", "--key-file", &plain_arg])
        .await
        .expect(2);
    assert!(
        no_access.stderr.contains("backup_access"),
        "{}",
        no_access.stderr
    );
    let garbage = shell.path("garbage.txt");
    std::fs::write(&garbage, "No service key named backups found.\n").expect("key file");
    let garbage_arg = garbage.to_str().expect("utf-8 path").to_owned();
    let not_a_key = shell
        .run(&["backup", "list", "--key-file", &garbage_arg])
        .await
        .expect(2);
    assert!(
        not_a_key.stderr.contains("no service key"),
        "{}",
        not_a_key.stderr
    );
    let missing_env = shell
        .run(&[
            "backup",
            "list",
            "--broker-url",
            &url,
            "--instance",
            &instance,
        ])
        .await
        .expect(2);
    assert!(
        missing_env.stderr.contains("PHOENIX_BROKER_PASSWORD"),
        "{}",
        missing_env.stderr
    );
    shell.run(&["backup", "list"]).await.expect(2);
    shell
        .run(&["backup", "show", "../etc", "--key-file", &wrapped_arg])
        .await
        .expect(2);

    // A wrong token is the broker's 401, exit 1.
    let mut forged = key.clone();
    forged["backup_api"]["token"] = json!("phx_forged");
    let forged_file = shell.path("forged.json");
    std::fs::write(&forged_file, forged.to_string()).expect("key file");
    let forged_arg = forged_file.to_str().expect("utf-8 path").to_owned();
    let unauthorized = shell
        .run(&["backup", "list", "--key-file", &forged_arg])
        .await
        .expect(1);
    assert!(
        unauthorized.stderr.contains("HTTP 401"),
        "{}",
        unauthorized.stderr
    );

    // An unreachable broker: one line naming the URL, exit 1.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        listener.local_addr().expect("address").port()
    };
    let mut unreachable = key.clone();
    let unreachable_url = format!("http://127.0.0.1:{closed_port}/v2/service_instances/{instance}");
    unreachable["backup_api"]["url"] = json!(unreachable_url);
    let unreachable_file = shell.path("unreachable.json");
    std::fs::write(&unreachable_file, unreachable.to_string()).expect("key file");
    let unreachable_arg = unreachable_file.to_str().expect("utf-8 path").to_owned();
    let down = shell
        .run(&["backup", "list", "--key-file", &unreachable_arg])
        .await
        .expect(1);
    assert_eq!(down.stderr.lines().count(), 1, "{}", down.stderr);
    assert!(
        down.stderr.contains(&unreachable_url) && down.stderr.contains("cannot reach"),
        "{}",
        down.stderr
    );

    shell.assert_never_printed(&token);
    shell.assert_never_printed(&broker.password);
}
