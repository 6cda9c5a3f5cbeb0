//! User Management tokens: RS256 and ES256 JWTs verified against the service's JSON Web Key Set.
//!
//! The key set is fetched on first use and kept for `jwks_cache_ttl`; a token signed with a key
//! id the set does not hold makes it fetched again, at most once per `jwks_refetch_interval`
//! (so a flood of tokens with made-up key ids cannot turn into a flood of requests). When the
//! service cannot be reached the last good keys stay in use; only when none were ever fetched is
//! the caller told the identity provider is unavailable.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_domain::Caller;
use im_domain::auth::{AuthError, Authenticator};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::{caller_from_values, verification_error};

/// Algorithms accepted from User Management.
const ALGORITHMS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

/// How the verifier fetches keys and reads claims.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    pub url: String,
    pub issuer: String,
    pub audience: String,
    pub leeway_secs: u64,
    /// Age after which the next request fetches the set again.
    pub cache_ttl: Duration,
    /// Shortest time between two fetches caused by unknown key ids (or by failures).
    pub refetch_interval: Duration,
    /// Longest wait for one fetch.
    pub timeout: Duration,
    pub tenant_claim: String,
    pub roles_claim: String,
}

/// One usable key of the set.
struct Key {
    algorithm: Algorithm,
    decoding: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Key>,
    /// When the keys were last fetched successfully.
    fetched_at: Option<Instant>,
    /// When a fetch was last attempted, successful or not.
    attempted_at: Option<Instant>,
}

/// Verifies User Management's tokens against its key set.
pub struct JwksAuthenticator {
    config: JwksConfig,
    http: reqwest::Client,
    set: Mutex<KeySet>,
    /// Serialises fetches: concurrent requests that need a fetch wait for one, not one each.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for JwksAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksAuthenticator").field("issuer", &self.config.issuer).finish_non_exhaustive()
    }
}

/// The wire shape of a key set; each key is parsed on its own, so one key of an unsupported
/// type does not make the others unusable.
#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// Why a fetch failed (never holds a token or a key).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the key set cannot be fetched: {0}")]
    Transport(String),
    #[error("the key set answered status {0}")]
    Status(u16),
    #[error("the key set is not a JSON Web Key Set: {0}")]
    Malformed(String),
}

impl JwksAuthenticator {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(config: JwksConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(config.timeout).build()?;
        Ok(Self { config, http, set: Mutex::new(KeySet::default()), fetching: tokio::sync::Mutex::new(()) })
    }

    /// Fetches the key set now and replaces the cached keys; on failure the cached keys stay.
    ///
    /// # Errors
    /// When the set cannot be fetched or holds no usable key.
    pub async fn refresh(&self) -> Result<usize, FetchError> {
        self.lock().attempted_at = Some(Instant::now());
        let keys = self.fetch().await?;
        let count = keys.len();
        let mut set = self.lock();
        set.keys = keys;
        set.fetched_at = Some(Instant::now());
        Ok(count)
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, FetchError> {
        let response = self.http.get(&self.config.url).send().await.map_err(|e| FetchError::Transport(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let raw: RawSet = response.json().await.map_err(|e| FetchError::Malformed(e.without_url().to_string()))?;
        let keys: HashMap<String, Key> = raw.keys.into_iter().filter_map(usable_key).collect();
        if keys.is_empty() {
            return Err(FetchError::Malformed("no RS256 or ES256 key with a key id".into()));
        }
        tracing::debug!(keys = keys.len(), "key set fetched");
        Ok(keys)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeySet> {
        self.set.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key for `kid`, or whether a fetch may be attempted first.
    fn lookup(&self, kid: &str) -> Lookup {
        let set = self.lock();
        let now = Instant::now();
        let may_fetch = set.attempted_at.is_none_or(|at| now.duration_since(at) >= self.config.refetch_interval);
        let stale = set.fetched_at.is_none_or(|at| now.duration_since(at) >= self.config.cache_ttl);
        match set.keys.get(kid) {
            Some(key) if !(stale && may_fetch) => Lookup::Found(key.algorithm, key.decoding.clone()),
            _ if may_fetch => Lookup::Fetch,
            _ => Lookup::Settled,
        }
    }

    /// The key for `kid`, fetching the set again when it is stale or lacks the key (within the
    /// rate limit).
    async fn key(&self, kid: &str) -> Result<(Algorithm, DecodingKey), AuthError> {
        if let Lookup::Found(alg, key) = self.lookup(kid) {
            return Ok((alg, key));
        }
        {
            let _one_fetch = self.fetching.lock().await;
            // Another request may have fetched while this one waited.
            if let Lookup::Fetch = self.lookup(kid)
                && let Err(error) = self.refresh().await
            {
                tracing::warn!(%error, "fetching the User Management key set failed; the last good keys stay in use");
            }
        }
        let set = self.lock();
        match set.keys.get(kid) {
            Some(key) => Ok((key.algorithm, key.decoding.clone())),
            None if set.fetched_at.is_none() => Err(AuthError::Unavailable("the User Management key set cannot be fetched".into())),
            None => Err(AuthError::Invalid("unknown key id".into())),
        }
    }
}

enum Lookup {
    Found(Algorithm, DecodingKey),
    /// The key is missing or stale, and a fetch is allowed.
    Fetch,
    /// The key is missing, and no fetch is allowed yet.
    Settled,
}

/// A key of the set this verifier can use: a key id, RS256 or ES256 (stated by `alg`, or
/// implied by the key type), and a signature use.
fn usable_key(value: serde_json::Value) -> Option<(String, Key)> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    let kid = jwk.common.key_id.clone()?;
    if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature) {
        return None;
    }
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (_, Some(jsonwebtoken::jwk::KeyAlgorithm::RS256)) => Algorithm::RS256,
        (_, Some(jsonwebtoken::jwk::KeyAlgorithm::ES256)) => Algorithm::ES256,
        (_, Some(_)) => return None,
        (jsonwebtoken::jwk::AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec), None) if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    let decoding = DecodingKey::from_jwk(&jwk).ok()?;
    Some((kid, Key { algorithm, decoding }))
}

#[async_trait]
impl Authenticator for JwksAuthenticator {
    async fn authenticate(&self, bearer_token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(bearer_token).map_err(|_| AuthError::Invalid("malformed token".into()))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::Invalid("unexpected algorithm".into()));
        }
        let kid = header.kid.ok_or_else(|| AuthError::Invalid("missing key id".into()))?;
        let (algorithm, key) = self.key(&kid).await?;
        // The key decides the algorithm: a token may not pick another one for the same key.
        if algorithm != header.alg {
            return Err(AuthError::Invalid("unexpected algorithm".into()));
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(bearer_token, &key, &validation)
            .map_err(|e| verification_error(&e))?;
        caller_from_values(&data.claims, &self.config.tenant_claim, &self.config.roles_claim)
    }
}
