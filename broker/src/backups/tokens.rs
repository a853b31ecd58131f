//! Backup API tokens of service keys created with `backup_access`.
//!
//! A token is derived, never stored: an HMAC of the binding's ID and its sealed password,
//! which is random per creation. So the same binding always shows the same token (a
//! fetch of the service key gives it again), a binding created anew under the same ID
//! gets another one, and the state store keeps only the token's SHA-256 to look it up: a
//! copy of the store opens nothing. The HMAC's key is derived from the master key for
//! this use only (HKDF-SHA256), so the master key itself never keys two primitives.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::{hkdf, hmac};
use phoenix_adapters::keys::MasterKey;

/// Prefix of every token: recognisable in a leaked-secret scan.
const PREFIX: &str = "phx_";

/// True when a binding's parameters (stored JSON) ask for backup access.
pub fn wants_backup_access(parameters: &serde_json::Value) -> bool {
    parameters.get("backup_access") == Some(&serde_json::Value::Bool(true))
}

/// The token of a binding.
pub fn token(master: &MasterKey, binding_id: &str, password_sealed: &[u8]) -> String {
    let key = hmac::Key::from(
        hkdf::Salt::new(hkdf::HKDF_SHA256, &[])
            .extract(master.key().expose_bytes())
            .expand(&[b"phoenix/backup-token/v2"], hmac::HMAC_SHA256)
            .expect("an HMAC-SHA256 key is within what HKDF-SHA256 can expand"),
    );
    let mut context = hmac::Context::with_key(&key);
    context.update(binding_id.as_bytes());
    context.update(b"\0");
    context.update(password_sealed);
    format!("{PREFIX}{}", hex::encode(context.sign().as_ref()))
}

/// What the state store keeps of a token (lowercase hex SHA-256).
pub fn token_digest(token: &str) -> String {
    hex::encode(digest(&SHA256, token.as_bytes()).as_ref())
}

/// The token of an `Authorization: Bearer` header value, if it is one of ours.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(PREFIX)).then_some(token)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32]))
            .unwrap()
    }

    #[test]
    fn a_token_is_stable_per_binding_and_differs_across_bindings_and_keys() {
        let a = token(&master(1), "b-1", b"sealed-1");
        assert_eq!(a, token(&master(1), "b-1", b"sealed-1"));
        assert_ne!(a, token(&master(1), "b-2", b"sealed-1"));
        assert_ne!(a, token(&master(1), "b-1", b"sealed-2"));
        assert_ne!(a, token(&master(2), "b-1", b"sealed-1"));
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 64);
        assert_ne!(token_digest(&a), a);
    }

    /// Computed apart from this code (Python's hmac: HKDF-SHA256 with an empty salt and
    /// the info "phoenix/backup-token/v2", then HMAC-SHA256 of "b-1\0sealed-1"): a change
    /// of the derivation would silently invalidate every token given out.
    #[test]
    fn the_derivation_is_pinned() {
        assert_eq!(
            token(&master(1), "b-1", b"sealed-1"),
            "phx_98638fb116a1790923e571973eddb166af2234b3385f0e5685695b4fe7a214a0"
        );
    }

    #[test]
    fn only_bearer_tokens_with_our_prefix_are_taken() {
        assert_eq!(bearer("Bearer phx_abc"), Some("phx_abc"));
        assert_eq!(bearer("bearer  phx_abc "), Some("phx_abc"));
        assert_eq!(bearer("Bearer other"), None);
        assert_eq!(bearer("Basic phx_abc"), None);
    }

    #[test]
    fn backup_access_must_be_true() {
        assert!(wants_backup_access(
            &serde_json::json!({"backup_access": true})
        ));
        assert!(!wants_backup_access(
            &serde_json::json!({"backup_access": "true"})
        ));
        assert!(!wants_backup_access(&serde_json::json!({})));
    }
}
