//! Where the CLI's access to one instance's Backup API comes from: a service key created
//! with `backup_access` (its `backup_api` block: URL, instance, token), or the platform's
//! broker URL with the broker's own credentials from the environment.
//!
//! Nothing here may ever show a token or password: [`Secret`] redacts itself in `Debug`,
//! errors about a key file name the file and the missing field, never a value, and a
//! broker URL carrying a user or password is refused (secrets never go on a command line).

use std::fmt;

use phoenix_adapters::ids::InstanceId;
use reqwest::Url;
use serde_json::Value;

use crate::error::Error;

/// A token or password. Only [`Secret::expose`] shows it, for the request header.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself; for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How requests authenticate.
#[derive(Debug, Clone)]
pub enum Auth {
    /// A service key's instance token: opens only its own instance.
    Bearer(Secret),
    /// The platform's broker credentials: open every instance.
    Basic { username: String, password: Secret },
}

/// Everything needed to call one instance's Backup API.
#[derive(Debug, Clone)]
pub struct Access {
    /// `<broker>/v2/service_instances/<id>`, without a trailing slash.
    instance_url: String,
    instance: InstanceId,
    auth: Auth,
}

impl Access {
    /// Access from a service key's text: `cf service-key` output (anything before the
    /// first `{` is ignored), the credentials JSON, or `{"credentials": {...}}`; its
    /// `backup_api` block at the top level or under `credentials`. `origin` names where
    /// the text came from, for the error messages.
    ///
    /// # Errors
    /// [`Error::Usage`] when the text holds no JSON object, no `backup_api` block (a key
    /// created without `backup_access`), or a block with a missing or malformed field.
    pub fn from_service_key(text: &str, origin: &str) -> Result<Self, Error> {
        let key = first_json_object(text).ok_or_else(|| {
            Error::Usage(format!(
                "{origin} holds no service key: expected the JSON of `cf service-key` \
                 (a JSON object)"
            ))
        })?;
        let api = key
            .get("backup_api")
            .or_else(|| key.get("credentials")?.get("backup_api"))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "the service key in {origin} has no `backup_api`: it was created \
                     without backup access; create one with the parameter \
                     {{\"backup_access\": true}} (e.g. cf create-service-key INSTANCE KEY \
                     -c '{{\"backup_access\": true}}')"
                ))
            })?;
        let field = |name: &str| {
            api.get(name)
                .and_then(Value::as_str)
                .filter(|value| !value.is_empty())
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "the service key in {origin}: `backup_api.{name}` is missing or \
                         not a string"
                    ))
                })
        };
        let instance = InstanceId::parse(field("instance_id")?).map_err(|e| {
            Error::Usage(format!(
                "the service key in {origin}: `backup_api.instance_id`: {e}"
            ))
        })?;
        let instance_url = http_url(field("url")?).map_err(|e| {
            Error::Usage(format!("the service key in {origin}: `backup_api.url` {e}"))
        })?;
        Ok(Self {
            instance_url,
            instance,
            auth: Auth::Bearer(Secret::new(field("token")?)),
        })
    }

    /// Access with the platform's credentials: the broker's base URL, the instance, and
    /// the username and password (from `PHOENIX_BROKER_USERNAME` and
    /// `PHOENIX_BROKER_PASSWORD`; the caller reads the environment).
    ///
    /// # Errors
    /// [`Error::Usage`] for a URL that is not plain http(s) or carries credentials, or a
    /// missing username or password.
    pub fn from_broker(
        broker_url: &str,
        instance: InstanceId,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Self, Error> {
        let base = http_url(broker_url).map_err(|e| Error::Usage(format!("--broker-url {e}")))?;
        let (Some(username), Some(password)) = (
            username.filter(|u| !u.is_empty()),
            password.filter(|p| !p.is_empty()),
        ) else {
            return Err(Error::Usage(
                "--broker-url needs the broker's credentials in the environment: set \
                 PHOENIX_BROKER_USERNAME and PHOENIX_BROKER_PASSWORD (or use --key-file \
                 with a service key)"
                    .into(),
            ));
        };
        Ok(Self {
            instance_url: format!("{base}/v2/service_instances/{instance}"),
            instance,
            auth: Auth::Basic {
                username,
                password: Secret::new(password),
            },
        })
    }

    /// `<broker>/v2/service_instances/<id>`: the base of every Backup API path.
    pub fn instance_url(&self) -> &str {
        &self.instance_url
    }

    /// The instance this access opens.
    pub fn instance(&self) -> &InstanceId {
        &self.instance
    }

    /// How requests authenticate.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }
}

/// The first JSON object in `text`, starting at its first `{`; text after it is ignored.
fn first_json_object(text: &str) -> Option<serde_json::Map<String, Value>> {
    let start = text.find('{')?;
    let mut values = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
    match values.next()? {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    }
}

/// A plain http(s) URL without credentials, query or fragment, as a string without a
/// trailing slash. The error completes a sentence that starts with the URL's name.
fn http_url(text: &str) -> Result<String, String> {
    let url = Url::parse(text).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be http:// or https://, not {}://",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry a user or password (credentials come from the \
                    environment or a service key, never from the command line)"
                .into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTANCE: &str = "9b2b7a52-8f58-4b0e-a3a1-0c9f2b9d7a11";
    const TOKEN: &str = "phx_s3cr3t-token-value";

    fn credentials() -> String {
        format!(
            r#"{{
  "uri": "postgresql://u:dbpassword@10.0.0.1:5432/db",
  "username": "u",
  "password": "dbpassword",
  "backup_api": {{
    "url": "https://broker.example.com/v2/service_instances/{INSTANCE}",
    "instance_id": "{INSTANCE}",
    "token": "{TOKEN}"
  }}
}}"#
        )
    }

    fn assert_parsed(access: &Access) {
        assert_eq!(
            access.instance_url(),
            format!("https://broker.example.com/v2/service_instances/{INSTANCE}")
        );
        assert_eq!(access.instance().as_str(), INSTANCE);
        match access.auth() {
            Auth::Bearer(token) => assert_eq!(token.expose(), TOKEN),
            Auth::Basic { .. } => panic!("a service key authenticates with its token"),
        }
    }

    fn usage_message(result: Result<Access, Error>) -> String {
        match result {
            Err(Error::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn reads_the_bare_credentials_json() {
        assert_parsed(&Access::from_service_key(&credentials(), "key.json").unwrap());
    }

    #[test]
    fn reads_credentials_wrapped_in_a_credentials_object() {
        let wrapped = format!(r#"{{"credentials": {}}}"#, credentials());
        assert_parsed(&Access::from_service_key(&wrapped, "key.json").unwrap());
    }

    #[test]
    fn reads_cf_service_key_output_with_its_header_line() {
        let output = format!(
            "Getting key backups for service instance mydb as admin...\n\n{}\n",
            credentials()
        );
        assert_parsed(&Access::from_service_key(&output, "key.txt").unwrap());
        let wrapped = format!(
            "Getting key backups for service instance mydb as admin...\n\n{{\"credentials\": {}}}\n",
            credentials()
        );
        assert_parsed(&Access::from_service_key(&wrapped, "key.txt").unwrap());
    }

    #[test]
    fn a_key_without_backup_api_names_backup_access() {
        let plain = r#"{"uri": "postgresql://u:p@h/db", "password": "dbpassword"}"#;
        let message = usage_message(Access::from_service_key(plain, "key.json"));
        assert!(message.contains("backup_access"), "{message}");
        assert!(message.contains("key.json"), "{message}");
        assert!(!message.contains("dbpassword"), "{message}");
    }

    #[test]
    fn text_without_json_is_a_usage_error() {
        let message = usage_message(Access::from_service_key("No service key found", "-"));
        assert!(message.contains("no service key"), "{message}");
        let message = usage_message(Access::from_service_key("header\n[1, 2]", "k"));
        assert!(message.contains("no service key"), "{message}");
    }

    #[test]
    fn a_malformed_backup_api_block_names_the_field_and_never_the_token() {
        let no_token = credentials().replace(r#""token""#, r#""tokn""#);
        let bad_instance = credentials().replace(
            &format!(r#""instance_id": "{INSTANCE}""#),
            r#""instance_id": "../etc""#,
        );
        let bad_url = credentials().replace("https://broker", "ftp://broker");
        for (key, field) in [
            (no_token, "backup_api.token"),
            (bad_instance, "backup_api.instance_id"),
            (bad_url, "backup_api.url"),
        ] {
            let message = usage_message(Access::from_service_key(&key, "k"));
            assert!(message.contains(field), "{message}");
            assert!(!message.contains(TOKEN), "{message}");
        }
    }

    #[test]
    fn debug_never_shows_the_token_or_the_password() {
        let access = Access::from_service_key(&credentials(), "k").unwrap();
        let debug = format!("{access:?}");
        assert!(!debug.contains(TOKEN), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let access = Access::from_broker(
            "http://127.0.0.1:8080/",
            InstanceId::parse(INSTANCE).unwrap(),
            Some("platform".into()),
            Some("pl4tform-pw".into()),
        )
        .unwrap();
        let debug = format!("{access:?}");
        assert!(!debug.contains("pl4tform-pw"), "{debug}");
        assert!(debug.contains("platform"), "{debug}");
    }

    #[test]
    fn broker_access_builds_the_instance_url_and_needs_both_variables() {
        let instance = InstanceId::parse(INSTANCE).unwrap();
        let access = Access::from_broker(
            "http://127.0.0.1:8080/",
            instance.clone(),
            Some("platform".into()),
            Some("pw".into()),
        )
        .unwrap();
        assert_eq!(
            access.instance_url(),
            format!("http://127.0.0.1:8080/v2/service_instances/{INSTANCE}")
        );
        let message = usage_message(Access::from_broker(
            "http://127.0.0.1:8080",
            instance.clone(),
            Some("platform".into()),
            None,
        ));
        assert!(message.contains("PHOENIX_BROKER_PASSWORD"), "{message}");
        let message = usage_message(Access::from_broker(
            "http://platform:pw@127.0.0.1:8080",
            instance,
            Some("platform".into()),
            Some("pw".into()),
        ));
        assert!(
            message.contains("must not carry a user or password"),
            "{message}"
        );
    }
}
