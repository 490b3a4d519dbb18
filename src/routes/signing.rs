//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>): the receiver verifies
//! `webhook-signature` with the official libraries of its language.
//!
//! A secret is written `whsec_` + base64 of its bytes. The signed content is
//! `{webhook-id}.{webhook-timestamp}.{body}`; the signature is `v1,` + base64 of its
//! HMAC-SHA256 under the secret's bytes. During a rotation a route has several secrets and
//! sends one signature per secret, separated by spaces.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::Secret;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing key, decoded from its `whsec_…` form (kept as the HMAC keyed with it). `Debug`
/// never shows it.
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

/// Why a secret is not a Standard Webhooks secret. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a signing secret starts with \"whsec_\" followed by base64")]
    NoPrefix,
    #[error("the part after \"whsec_\" is not base64")]
    NotBase64,
    #[error("a signing secret holds 24 to 64 bytes; this one holds {0}")]
    Length(usize),
}

impl SigningKey {
    pub fn parse(secret: &Secret) -> Result<Self, SecretError> {
        let text = secret.expose().trim();
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::NoPrefix)?;
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(SecretError::Length(bytes.len()));
        }
        let mac =
            Hmac::<Sha256>::new_from_slice(&bytes).map_err(|_| SecretError::Length(bytes.len()))?;
        Ok(SigningKey(mac))
    }

    /// `v1,<base64 signature>` of `body` sent as message `id` at `timestamp` (Unix seconds).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = self.0.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` header value: one signature per key, space-separated.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| key.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_whsec_base64_of_a_sane_length() {
        let parse = |s: &str| SigningKey::parse(&Secret::new(s)).map(|_| ());
        assert_eq!(
            parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::NoPrefix)
        );
        assert_eq!(parse("whsec_not base64!"), Err(SecretError::NotBase64));
        assert_eq!(parse("whsec_c2hvcnQ="), Err(SecretError::Length(5)));
        assert!(parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let key =
            SigningKey::parse(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        assert!(!format!("{key:?}").contains("MfKQ"));
    }
}
