//! Validated identifiers: the only values from outside that may become part of a path,
//! a storage key or an SQL identifier.
//!
//! OSB IDs are chosen by the platform. The spec allows any string; Phoenix accepts
//! RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`), 1 to 255 of them, and refuses
//! `.` and `..` so that an ID used as a path component can never leave its directory.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

const MAX_ID_LEN: usize = 255;

fn validate(kind: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(Error::Invalid(format!(
            "{kind} must be 1 to {MAX_ID_LEN} characters long"
        )));
    }
    if value == "." || value == ".." {
        return Err(Error::Invalid(format!("{kind} must not be '.' or '..'")));
    }
    let unreserved = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~');
    if !value.chars().all(unreserved) {
        return Err(Error::Invalid(format!(
            "{kind} may only contain the characters A-Z a-z 0-9 - . _ ~"
        )));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates an ID.
            ///
            /// # Errors
            /// [`Error::Invalid`] when the value is empty, too long, `.`/`..`, or holds a
            /// character outside RFC 3986's unreserved set.
            pub fn parse(value: impl Into<String>) -> Result<Self, Error> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            /// The ID as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(value: String) -> Result<Self, Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(value: &str) -> Result<Self, Error> {
                Self::parse(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A service instance's ID, as chosen by the platform.
    InstanceId,
    "instance_id"
);
id_type!(
    /// A service binding's ID, as chosen by the platform.
    BindingId,
    "binding_id"
);
id_type!(
    /// A backup's ID, chosen by the broker.
    BackupId,
    "backup_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_guids_and_unreserved_characters() {
        assert!(InstanceId::parse("9b2b7a52-8f58-4b0e-a3a1-0c9f2b9d7a11").is_ok());
        assert!(InstanceId::parse("a.b_c~d-E9").is_ok());
        assert!(InstanceId::parse("x".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_what_could_escape_a_path_or_a_query() {
        for bad in [
            "", ".", "..", "a/b", "a b", "a%2F", "é", "a'b", "a;b", "a\0b",
        ] {
            assert!(InstanceId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(BindingId::parse("x".repeat(256)).is_err());
    }
}
