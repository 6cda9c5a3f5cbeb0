//! OAuth2 for connections: the token endpoint port ([`OAuth2Client`]), PKCE (S256) and the
//! signed `state` of an authorization.
//!
//! The `state` of an authorization is `base64url(payload).base64url(HMAC-SHA256(key, payload))`
//! where the payload names the tenant, integration, connection and user it was issued for, a
//! random nonce and its expiry ([`STATE_LIFETIME`]). The PKCE verifier is derived from the
//! server key and the nonce ([`StateKey::pkce_verifier`]), so it is never stored anywhere: only
//! the service holding the key can compute it, the authorization server sees the challenge only.
//! The connection's secret keeps a hash of the nonce while the authorization is pending; the
//! callback consumes it with a conditional write, which makes each state single use.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::DomainError;

/// How long an authorization `state` is accepted by default (`oauth2.state_ttl`).
pub const STATE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Fewest bytes of a state key.
pub const MIN_STATE_KEY_BYTES: usize = 32;

/// A tenant's OAuth app at a provider. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuth2App {
    pub client_id: String,
    pub client_secret: String,
}

impl fmt::Debug for OAuth2App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2App").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

/// What a token endpoint granted. `Debug` never shows a token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// `expires_in` of the answer, when the server said.
    pub expires_in: Option<Duration>,
    /// The scopes granted, when the server said (else those asked for).
    pub scopes: Option<Vec<String>>,
}

impl fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenGrant")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "<redacted>"))
            .field("expires_in", &self.expires_in)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// An authorization URL to build: the provider's authorization endpoint with the app, the
/// callback, the scopes, the state and the S256 challenge of `pkce_verifier`.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizationRequest<'a> {
    pub client_id: &'a str,
    pub authorization_url: &'a str,
    pub redirect_url: &'a str,
    pub scopes: &'a [String],
    pub state: &'a str,
    pub pkce_verifier: &'a str,
}

/// Talks to providers' OAuth2 token endpoints (RFC 6749, PKCE per RFC 7636). The adapter
/// connects to token URLs through the same destination policy as every provider call and never
/// puts a secret or token in a log, span or error. Tests use the real adapter against
/// `im_testkit::fake_oauth2` rather than a mock.
#[async_trait]
pub trait OAuth2Client: Send + Sync {
    /// Builds the URL the user opens to authorize (pure: nothing is sent).
    ///
    /// # Errors
    /// - MUST return [`DomainError::Validation`] on field `authorizationUrl` or `redirectUrl` when
    ///   the URL does not parse.
    fn authorization_url(&self, request: &AuthorizationRequest<'_>) -> Result<String, DomainError>;

    /// Exchanges an authorization code, sending the PKCE verifier.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Conflict`] naming the OAuth2 error code (`invalid_grant`...)
    ///   when the token endpoint refused the grant, and never quoting a secret.
    /// - MUST return [`DomainError::Unavailable`] when the endpoint cannot be reached, answers
    ///   5xx or something that is not a token response.
    /// - MUST return [`DomainError::Validation`] when the token URL is refused by the destination policy.
    async fn exchange_code(
        &self,
        app: &OAuth2App,
        token_url: &str,
        redirect_url: &str,
        code: &str,
        pkce_verifier: &str,
    ) -> Result<TokenGrant, DomainError>;

    /// Exchanges a refresh token for a new access token.
    ///
    /// # Errors
    /// As [`OAuth2Client::exchange_code`]; `invalid_grant` (a revoked or expired refresh token)
    /// is a [`DomainError::Conflict`].
    async fn refresh(&self, app: &OAuth2App, token_url: &str, refresh_token: &str) -> Result<TokenGrant, DomainError>;

    /// Asks for a token with the client-credentials grant.
    ///
    /// # Errors
    /// As [`OAuth2Client::exchange_code`].
    async fn client_credentials(&self, app: &OAuth2App, token_url: &str, scopes: &[String]) -> Result<TokenGrant, DomainError>;

    /// Waits `duration` (while another caller or instance holds a connection's refresh lease).
    async fn pause(&self, duration: Duration);
}

/// What a `state` carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationState {
    #[serde(rename = "t")]
    pub tenant: String,
    #[serde(rename = "i")]
    pub integration: String,
    #[serde(rename = "c")]
    pub connection: String,
    #[serde(rename = "u")]
    pub user: String,
    /// Random, base64url.
    #[serde(rename = "n")]
    pub nonce: String,
    /// Unix seconds.
    #[serde(rename = "e")]
    pub expires_at: i64,
}

/// The server key that signs states and derives PKCE verifiers. `Debug` never shows it.
#[derive(Clone)]
pub struct StateKey(Vec<u8>);

impl fmt::Debug for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateKey(<redacted>)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl StateKey {
    /// # Errors
    /// `Validation` on `key` when it is shorter than [`MIN_STATE_KEY_BYTES`].
    pub fn new(bytes: Vec<u8>) -> Result<Self, DomainError> {
        if bytes.len() < MIN_STATE_KEY_BYTES {
            return Err(DomainError::invalid("key", format!("must be at least {MIN_STATE_KEY_BYTES} bytes")));
        }
        Ok(Self(bytes))
    }

    fn mac(&self, label: &[u8], data: &[u8]) -> Vec<u8> {
        #[allow(clippy::expect_used)]
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }

    /// The signed state for `state`.
    pub fn sign(&self, state: &AuthorizationState) -> String {
        let payload = serde_json::to_vec(state).unwrap_or_default();
        let signature = self.mac(b"state:", &payload);
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(signature))
    }

    /// Reads a state this key signed; `None` for anything else (malformed, forged, another
    /// key's). Expiry is the caller's check.
    pub fn verify(&self, token: &str) -> Option<AuthorizationState> {
        let (payload, signature) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        #[allow(clippy::expect_used)]
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(b"state:");
        mac.update(&payload);
        mac.verify_slice(&signature).ok()?;
        serde_json::from_slice(&payload).ok()
    }

    /// The PKCE verifier of the authorization with `nonce`: 43 characters of base64url.
    pub fn pkce_verifier(&self, nonce: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(b"pkce-verifier:", nonce.as_bytes()))
    }
}

/// The S256 code challenge of a PKCE verifier.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A new random nonce (16 bytes, base64url).
///
/// # Errors
/// `Unexpected` when the system has no randomness.
pub fn new_nonce() -> Result<String, DomainError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| DomainError::Unexpected(anyhow::anyhow!("no randomness: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The hash of a nonce kept while an authorization is pending.
pub fn nonce_hash(nonce: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(nonce.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StateKey {
        StateKey::new(vec![7u8; 32]).expect("key")
    }

    fn state() -> AuthorizationState {
        AuthorizationState {
            tenant: "t1".into(),
            integration: "i".into(),
            connection: "c".into(),
            user: "u".into(),
            nonce: new_nonce().expect("nonce"),
            expires_at: 1_700_000_000,
        }
    }

    #[test]
    fn a_signed_state_reads_back_and_a_changed_one_does_not() {
        let s = state();
        let token = key().sign(&s);
        assert_eq!(key().verify(&token), Some(s.clone()));
        let (payload, signature) = token.split_once('.').expect("two parts");
        let mut forged = s.clone();
        forged.tenant = "t2".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
        assert_eq!(key().verify(&format!("{forged_payload}.{signature}")), None);
        assert_eq!(key().verify(payload), None);
        let other = StateKey::new(vec![8u8; 32]).expect("key");
        assert_eq!(other.verify(&token), None);
        assert!(StateKey::new(vec![1u8; 31]).is_err());
    }

    #[test]
    fn verifiers_are_valid_pkce_and_differ_per_nonce() {
        let k = key();
        let a = k.pkce_verifier("n1");
        assert_eq!(a.len(), 43);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(a, k.pkce_verifier("n2"));
        assert_eq!(a, k.pkce_verifier("n1"));
        // RFC 7636, appendix B.
        assert_eq!(pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let app = OAuth2App { client_id: "id".into(), client_secret: "s3cr3t-value".into() };
        assert!(!format!("{app:?}").contains("s3cr3t"));
        let grant =
            TokenGrant { access_token: "tok-value".into(), refresh_token: Some("ref-value".into()), expires_in: None, scopes: None };
        let text = format!("{grant:?}");
        assert!(!text.contains("tok-value") && !text.contains("ref-value"));
    }
}
