//! Caller authentication with JSON Web Tokens.
//!
//! [`LocalJwt`] is the embedded default: HS256 tokens signed with a key from configuration or
//! from a key file the app creates (mode 0600) in the data directory on first run. It verifies tokens
//! and mints them for the `token` subcommand, with the same key, so a minted token works
//! against a running server.
//!
//! [`JwksAuthenticator`] verifies User Management's RS256 and ES256 tokens against its JSON Web
//! Key Set (`auth.mode = "jwks"`).

mod jwks;

pub use jwks::{FetchError, JwksAuthenticator, JwksConfig};

use async_trait::async_trait;
use im_domain::auth::{AuthError, Authenticator};
use im_domain::cache::{self, BoundedCache};
use im_domain::{Caller, HumanDuration, Role, TenantId, UserId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

/// Shortest HS256 key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// HS256 tokens signed with `hs256_key`, or with a key file the app creates.
    Local,
    /// RS256 or ES256 tokens of User Management, verified against the key set at `jwks_url`.
    Jwks,
}

/// The `auth` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// Base64 of at least [`MIN_KEY_BYTES`] bytes; empty: the app's key file. A secret.
    pub hs256_key: SecretString,
    /// When not empty, tokens must carry this `iss` (and minted tokens carry it).
    pub issuer: String,
    /// When not empty, tokens must carry this `aud`.
    pub audience: String,
    /// Clock skew tolerated when checking `exp` and `nbf`.
    pub leeway: HumanDuration,
    /// Lifetime of minted tokens.
    pub token_ttl: HumanDuration,
    /// jwks: where User Management serves its JSON Web Key Set.
    pub jwks_url: String,
    /// jwks: age after which the key set is fetched again.
    pub jwks_cache_ttl: HumanDuration,
    /// jwks: shortest time between two fetches caused by an unknown key id or a failure.
    pub jwks_refetch_interval: HumanDuration,
    /// jwks: longest wait for one fetch of the key set.
    pub jwks_timeout: HumanDuration,
    /// jwks: the claim that carries the tenant id.
    pub tenant_claim: String,
    /// jwks: the claim that carries the roles (an array, or a space-separated string).
    pub roles_claim: String,
}

impl AuthSettings {
    /// What types alone cannot check: every problem, as (key within the section, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        use base64::Engine as _;
        let mut problems = Vec::new();
        match self.mode {
            AuthMode::Local => {
                let key = self.hs256_key.expose_secret();
                let decoded = base64::engine::general_purpose::STANDARD.decode(key);
                if !key.is_empty() && !decoded.is_ok_and(|k| k.len() >= MIN_KEY_BYTES) {
                    problems.push(("hs256_key", format!("must be base64 of at least {MIN_KEY_BYTES} bytes")));
                }
            }
            AuthMode::Jwks => {
                if !(self.jwks_url.starts_with("https://") || self.jwks_url.starts_with("http://")) {
                    problems.push(("jwks_url", "must be an http(s) URL with auth.mode = \"jwks\"".to_owned()));
                }
                if self.issuer.is_empty() {
                    problems.push(("issuer", "is required with auth.mode = \"jwks\"".to_owned()));
                }
                if self.audience.is_empty() {
                    problems.push(("audience", "is required with auth.mode = \"jwks\"".to_owned()));
                }
                if self.tenant_claim.is_empty() {
                    problems.push(("tenant_claim", "must not be empty".to_owned()));
                }
                if self.roles_claim.is_empty() {
                    problems.push(("roles_claim", "must not be empty".to_owned()));
                }
                if self.jwks_timeout.get().is_zero() {
                    problems.push(("jwks_timeout", "must be more than 0".to_owned()));
                }
            }
        }
        if self.token_ttl.get().as_secs() < 1 {
            problems.push(("token_ttl", "must be at least 1s".to_owned()));
        }
        problems
    }

    pub fn issuer(&self) -> Option<String> {
        Some(self.issuer.clone()).filter(|s| !s.is_empty())
    }

    pub fn audience(&self) -> Option<String> {
        Some(self.audience.clone()).filter(|s| !s.is_empty())
    }

    /// What the JWKS verifier needs from this section.
    pub fn jwks(&self) -> JwksConfig {
        JwksConfig {
            url: self.jwks_url.clone(),
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            leeway_secs: self.leeway.get().as_secs(),
            cache_ttl: self.jwks_cache_ttl.get(),
            refetch_interval: self.jwks_refetch_interval.get(),
            timeout: self.jwks_timeout.get(),
            tenant_claim: self.tenant_claim.clone(),
            roles_claim: self.roles_claim.clone(),
        }
    }
}

/// The claims this service reads (and writes when minting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Most verified tokens remembered; a full cache evicts the least used ones.
const CACHE_CAPACITY: usize = 10_000;

/// HS256 verification and minting with one shared key. Verified tokens are remembered until
/// they expire, so a client that reuses its token is not re-verified on every request.
pub struct LocalJwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    verified: BoundedCache<String, (Caller, i64)>,
}

impl std::fmt::Debug for LocalJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("LocalJwt").field("issuer", &self.issuer).field("audience", &self.audience).finish_non_exhaustive()
    }
}

impl LocalJwt {
    /// # Errors
    /// When the key is shorter than [`MIN_KEY_BYTES`].
    pub fn new(key: &[u8], issuer: Option<String>, audience: Option<String>, leeway_secs: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(key.len() >= MIN_KEY_BYTES, "the HS256 key must have at least {MIN_KEY_BYTES} bytes");
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        // A configured issuer or audience is required, not only checked when present.
        let mut required = vec!["exp", "sub"];
        if issuer.is_some() {
            required.push("iss");
        }
        if audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        match &issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            issuer,
            audience,
            verified: cache::bounded(CACHE_CAPACITY),
        })
    }

    /// Signs a token for a tenant, user and roles, valid for `ttl_secs`.
    ///
    /// # Errors
    /// When signing fails.
    pub fn mint(&self, tenant: &TenantId, user: &UserId, roles: &[Role], ttl_secs: i64) -> anyhow::Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            sub: user.to_string(),
            tenant_id: tenant.to_string(),
            roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
            exp: now + ttl_secs,
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?)
    }
}

#[async_trait]
impl Authenticator for LocalJwt {
    async fn authenticate(&self, bearer_token: &str) -> Result<Caller, AuthError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some((caller, exp)) = self.verified.get(bearer_token) {
            // Remembered tokens expire exactly as verified ones do (leeway included).
            if now <= exp.saturating_add(self.validation.leeway as i64) {
                return Ok(caller);
            }
        }
        let data = jsonwebtoken::decode::<Claims>(bearer_token, &self.decoding, &self.validation).map_err(|e| verification_error(&e))?;
        let exp = data.claims.exp;
        let caller = caller_from_claims(data.claims)?;
        self.verified.insert(bearer_token.to_owned(), (caller.clone(), exp));
        Ok(caller)
    }
}

/// What a failed verification tells the caller.
pub(crate) fn verification_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
        ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet".into()),
        ErrorKind::InvalidAlgorithm => AuthError::Invalid("unexpected algorithm".into()),
        ErrorKind::MissingRequiredClaim(claim) => AuthError::Invalid(format!("missing claim '{claim}'")),
        _ => AuthError::Invalid("malformed token".into()),
    }
}

/// Builds a caller from verified claims read by name: `sub`, the tenant claim (a string) and
/// the roles claim (an array of strings or one space-separated string; absent: no role).
/// Unknown role names are ignored.
///
/// # Errors
/// [`AuthError::Invalid`] when `sub` or the tenant claim is missing or not a valid id, or the
/// roles claim has another shape.
pub fn caller_from_values(
    claims: &serde_json::Map<String, serde_json::Value>,
    tenant_claim: &str,
    roles_claim: &str,
) -> Result<Caller, AuthError> {
    use serde_json::Value;
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned).unwrap_or_default();
    let roles: Vec<String> = match claims.get(roles_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Some(_) => return Err(AuthError::Invalid(format!("claim '{roles_claim}' must be an array of role names"))),
    };
    let tenant =
        TenantId::new(text(tenant_claim)).map_err(|_| AuthError::Invalid(format!("claim '{tenant_claim}' is not a valid tenant id")))?;
    let user = UserId::new(text("sub")).map_err(|_| AuthError::Invalid("claim 'sub' is not a valid user id".into()))?;
    Ok(Caller::new(tenant, user, roles.iter().filter_map(|r| Role::parse(r)).collect()))
}

/// Builds a caller from verified claims; unknown role names are ignored.
///
/// # Errors
/// [`AuthError::Invalid`] when `sub` or `tenant_id` is not a valid id.
pub fn caller_from_claims(claims: Claims) -> Result<Caller, AuthError> {
    let tenant = TenantId::new(claims.tenant_id).map_err(|_| AuthError::Invalid("claim 'tenant_id' is not a valid tenant id".into()))?;
    let user = UserId::new(claims.sub).map_err(|_| AuthError::Invalid("claim 'sub' is not a valid user id".into()))?;
    let roles = claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
    Ok(Caller::new(tenant, user, roles))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt() -> LocalJwt {
        LocalJwt::new(&[7u8; 32], Some("im".into()), None, 0).unwrap()
    }

    fn ids() -> (TenantId, UserId) {
        (TenantId::new("acme").unwrap(), UserId::new("alice").unwrap())
    }

    #[tokio::test]
    async fn minted_tokens_verify() {
        let (t, u) = ids();
        let token = jwt().mint(&t, &u, &[Role::Member], 60).unwrap();
        let caller = jwt().authenticate(&token).await.unwrap();
        assert_eq!(caller, Caller::new(t, u, vec![Role::Member]));
    }

    #[tokio::test]
    async fn remembered_tokens_still_expire() {
        let (t, u) = ids();
        let jwt = LocalJwt::new(&[7u8; 32], Some("im".into()), None, 0).unwrap();
        let token = jwt.mint(&t, &u, &[Role::Member], 1).unwrap();
        assert!(jwt.authenticate(&token).await.is_ok());
        assert!(jwt.authenticate(&token).await.is_ok(), "served from the cache");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(jwt.authenticate(&token).await, Err(AuthError::Expired), "the cache never outlives exp");
    }

    #[tokio::test]
    async fn bad_tokens_are_refused() {
        let (t, u) = ids();
        let expired = jwt().mint(&t, &u, &[Role::Member], -120).unwrap();
        assert_eq!(jwt().authenticate(&expired).await, Err(AuthError::Expired));
        let other_key = LocalJwt::new(&[8u8; 32], Some("im".into()), None, 0).unwrap().mint(&t, &u, &[], 60).unwrap();
        assert!(matches!(jwt().authenticate(&other_key).await, Err(AuthError::Invalid(_))));
        let other_issuer = LocalJwt::new(&[7u8; 32], Some("else".into()), None, 0).unwrap().mint(&t, &u, &[], 60).unwrap();
        assert!(matches!(jwt().authenticate(&other_issuer).await, Err(AuthError::Invalid(_))));
        assert!(matches!(jwt().authenticate("garbage").await, Err(AuthError::Invalid(_))));
    }

    /// Signs arbitrary claims with the test key (tokens the minting side would never produce).
    fn signed(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(&[7u8; 32])).unwrap()
    }

    fn claims(extra: &[(&str, &str)]) -> serde_json::Value {
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 60;
        let mut claims = serde_json::json!({"sub": "alice", "tenant_id": "acme", "roles": ["member"], "exp": exp});
        for (k, v) in extra {
            claims[*k] = serde_json::Value::from(*v);
        }
        claims
    }

    #[tokio::test]
    async fn configured_issuer_and_audience_are_required() {
        let strict = LocalJwt::new(&[7u8; 32], Some("im".into()), Some("im-api".into()), 0).unwrap();
        let refused = |e: &Result<Caller, AuthError>| matches!(e, Err(AuthError::Invalid(_)));
        assert!(strict.authenticate(&signed(&claims(&[("iss", "im"), ("aud", "im-api")]))).await.is_ok());
        for (case, extra) in [
            ("missing iss", vec![("aud", "im-api")]),
            ("wrong iss", vec![("iss", "other"), ("aud", "im-api")]),
            ("missing aud", vec![("iss", "im")]),
            ("wrong aud", vec![("iss", "im"), ("aud", "other")]),
        ] {
            let result = strict.authenticate(&signed(&claims(&extra))).await;
            assert!(refused(&result), "{case}: {result:?}");
        }
        let lax = LocalJwt::new(&[7u8; 32], None, None, 0).unwrap();
        assert!(lax.authenticate(&signed(&claims(&[]))).await.is_ok(), "nothing configured, nothing required");
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(LocalJwt::new(&[1u8; 8], None, None, 0).is_err());
    }
}
