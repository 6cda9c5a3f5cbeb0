//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), shared by the sender and
//! by receivers: sibling services verify deliveries with [`Verifier`].
//!
//! - `webhook-id`: the message id, stable across retries (the receiver's idempotency key);
//! - `webhook-timestamp`: unix seconds of the attempt;
//! - `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, several
//!   separated by spaces while a rotated secret is still valid.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of signing secrets in their textual form.
pub const SECRET_PREFIX: &str = "whsec_";
/// Receivers refuse timestamps further than this from their clock (seconds).
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

/// A signing secret: 24 to 64 random bytes, written `whsec_<base64>`. Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// Why a secret or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the secret must be 'whsec_' followed by base64 of 24 to 64 bytes")]
    BadSecret,
    #[error("a webhook header is missing or malformed: {0}")]
    BadHeader(&'static str),
    #[error("the timestamp is outside the tolerance")]
    StaleTimestamp,
    #[error("no signature matches")]
    NoMatch,
}

impl SigningSecret {
    /// A secret from random bytes (24 to 64 of them).
    ///
    /// # Errors
    /// [`SignatureError::BadSecret`] for another length.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SignatureError> {
        if (24..=64).contains(&bytes.len()) { Ok(Self(bytes)) } else { Err(SignatureError::BadSecret) }
    }

    /// Parses `whsec_<base64>`.
    ///
    /// # Errors
    /// [`SignatureError::BadSecret`] when it is not that.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(SignatureError::BadSecret)?;
        Self::from_bytes(STANDARD.decode(encoded).map_err(|_| SignatureError::BadSecret)?)
    }

    /// The textual form, `whsec_<base64>`: show it once, store it in the secret store.
    pub fn expose(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// `v1,<base64 signature>` of one message.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", STANDARD.encode(self.mac(msg_id, timestamp, body).finalize().into_bytes()))
    }
}

/// The `webhook-signature` header value: one `v1,` signature per active secret.
pub fn signature_header(secrets: &[&SigningSecret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| s.sign(msg_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

/// Verifies deliveries: any of the secrets may have signed; the timestamp must be recent.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<SigningSecret>,
    tolerance_secs: i64,
}

impl Verifier {
    pub fn new(secrets: Vec<SigningSecret>) -> Self {
        Self { secrets, tolerance_secs: DEFAULT_TOLERANCE_SECS }
    }

    pub fn with_tolerance_secs(mut self, seconds: i64) -> Self {
        self.tolerance_secs = seconds;
        self
    }

    /// Checks the three headers against the raw body, at `now` (unix seconds).
    ///
    /// # Errors
    /// A malformed header, a timestamp outside the tolerance, or no matching signature.
    pub fn verify(&self, msg_id: &str, timestamp: &str, signatures: &str, body: &[u8], now: i64) -> Result<(), SignatureError> {
        if msg_id.is_empty() {
            return Err(SignatureError::BadHeader("webhook-id"));
        }
        let timestamp: i64 = timestamp.trim().parse().map_err(|_| SignatureError::BadHeader("webhook-timestamp"))?;
        if (now - timestamp).abs() > self.tolerance_secs {
            return Err(SignatureError::StaleTimestamp);
        }
        let candidates: Vec<Vec<u8>> =
            signatures.split(' ').filter_map(|s| s.strip_prefix("v1,")).filter_map(|b64| STANDARD.decode(b64).ok()).collect();
        if candidates.is_empty() {
            return Err(SignatureError::BadHeader("webhook-signature"));
        }
        for secret in &self.secrets {
            for candidate in &candidates {
                if secret.mac(msg_id, timestamp, body).verify_slice(candidate).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(SignatureError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector published with the Standard Webhooks specification.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specification_vector() {
        let secret = SigningSecret::parse(SECRET).unwrap();
        assert_eq!(secret.sign(MSG_ID, TIMESTAMP, BODY), SIGNATURE);
        assert_eq!(secret.expose(), SECRET);
    }

    #[test]
    fn verifies_the_specification_vector() {
        let verifier = Verifier::new(vec![SigningSecret::parse(SECRET).unwrap()]);
        assert_eq!(verifier.verify(MSG_ID, "1614265330", SIGNATURE, BODY, TIMESTAMP + 10), Ok(()));
        // a second, unknown signature beside the valid one is fine (rotation)
        let both = format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {SIGNATURE}");
        assert_eq!(verifier.verify(MSG_ID, "1614265330", &both, BODY, TIMESTAMP), Ok(()));
    }

    #[test]
    fn refuses_tampering_and_replay() {
        let verifier = Verifier::new(vec![SigningSecret::parse(SECRET).unwrap()]);
        assert_eq!(verifier.verify(MSG_ID, "1614265330", SIGNATURE, br#"{"test": 2432232315}"#, TIMESTAMP), Err(SignatureError::NoMatch));
        assert_eq!(verifier.verify("msg_other", "1614265330", SIGNATURE, BODY, TIMESTAMP), Err(SignatureError::NoMatch));
        assert_eq!(verifier.verify(MSG_ID, "1614265330", SIGNATURE, BODY, TIMESTAMP + 301), Err(SignatureError::StaleTimestamp));
        assert_eq!(verifier.verify(MSG_ID, "1614265330", SIGNATURE, BODY, TIMESTAMP - 301), Err(SignatureError::StaleTimestamp));
        assert_eq!(verifier.verify(MSG_ID, "yesterday", SIGNATURE, BODY, TIMESTAMP), Err(SignatureError::BadHeader("webhook-timestamp")));
        assert_eq!(verifier.verify(MSG_ID, "1614265330", "v2,abc", BODY, TIMESTAMP), Err(SignatureError::BadHeader("webhook-signature")));
        let other = Verifier::new(vec![SigningSecret::from_bytes(vec![1; 32]).unwrap()]);
        assert_eq!(other.verify(MSG_ID, "1614265330", SIGNATURE, BODY, TIMESTAMP), Err(SignatureError::NoMatch));
    }

    #[test]
    fn secrets_are_24_to_64_bytes_and_never_printed() {
        assert!(SigningSecret::from_bytes(vec![0; 23]).is_err());
        assert!(SigningSecret::from_bytes(vec![0; 65]).is_err());
        assert!(SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        let secret = SigningSecret::from_bytes(vec![7; 32]).unwrap();
        assert!(!format!("{secret:?}").contains(&secret.expose()[6..]));
        let header = signature_header(&[&secret, &SigningSecret::parse(SECRET).unwrap()], MSG_ID, TIMESTAMP, BODY);
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.ends_with(SIGNATURE));
    }
}
