//! Calling a provider's API: the one port every feature that talks to a provider goes through
//! (connection tests, sync tasks), and the credential source a connection gives it.
//!
//! The client builds requests from a [`ApiTarget`] (a catalog provider's or a custom
//! definition's base URL, default headers and pagination) and a [`RequestTemplate`], injects the
//! connection's credentials, pages, retries and limits; the connection decides what the
//! credentials are and refreshes them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::custom::{ApiKeyLocation, Pagination, RequestTemplate};
use crate::error::DomainError;

/// Credentials to put on one provider request. `Debug` never shows a value.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthMaterial {
    /// The request goes out without credentials.
    None,
    /// An API key in a header or a query parameter.
    ApiKey { location: ApiKeyLocation, name: String, value: String },
    /// `Authorization: Bearer <token>` (API tokens and OAuth2 access tokens).
    Bearer(String),
    /// HTTP basic authentication.
    Basic { username: String, password: String },
}

impl fmt::Debug for AuthMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthMaterial::None => f.write_str("AuthMaterial::None"),
            AuthMaterial::ApiKey { location, name, .. } => write!(f, "AuthMaterial::ApiKey({location:?} {name}: <redacted>)"),
            AuthMaterial::Bearer(_) => f.write_str("AuthMaterial::Bearer(<redacted>)"),
            AuthMaterial::Basic { .. } => f.write_str("AuthMaterial::Basic(<redacted>)"),
        }
    }
}

/// Where a connection's credentials come from. Implemented by the connection service (tokens
/// kept fresh, refreshes serialised per connection across instances); tests may hand in fixed
/// material.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait CredentialSource: Send + Sync {
    /// The credentials to use now. An OAuth2 source refreshes a token that expires soon first.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Unavailable`] when the secret store or the token endpoint
    ///   cannot be reached.
    /// - MUST return [`DomainError::Conflict`] when the connection cannot authenticate
    ///   (`pending_authorization`, `refresh_failed`, `revoked`), with the reason.
    async fn current(&self) -> Result<AuthMaterial, DomainError>;

    /// Called once when the provider answered 401 to a request made with `stale`: returns newer
    /// credentials (refreshing them unless another caller already did), or the same error
    /// classes as [`CredentialSource::current`]. A source that cannot refresh (an API key) MUST
    /// return [`DomainError::Conflict`] naming the refusal.
    async fn after_unauthorized(&self, stale: &AuthMaterial) -> Result<AuthMaterial, DomainError>;
}

/// The credentials of a provider that needs none: nothing is sent, and a 401 is final
/// ([`DomainError::Conflict`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCredentials;

#[async_trait]
impl CredentialSource for NoCredentials {
    async fn current(&self) -> Result<AuthMaterial, DomainError> {
        Ok(AuthMaterial::None)
    }

    async fn after_unauthorized(&self, _: &AuthMaterial) -> Result<AuthMaterial, DomainError> {
        Err(DomainError::Conflict("the provider refused a request without credentials".into()))
    }
}

/// The API a request goes to: a catalog provider's or a custom definition's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTarget {
    /// Absolute `https` base URL (or `http` where the sender's policy allows it).
    pub base_url: String,
    /// Sent with every request; never `Authorization`.
    pub default_headers: BTreeMap<String, String>,
    pub pagination: Pagination,
}

/// One request: a template, the values of its `{placeholders}`, and an optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderRequest {
    pub template: RequestTemplate,
    pub path_params: BTreeMap<String, String>,
    /// Query parameters added to the template's own (an updated-since filter, say).
    pub extra_query: BTreeMap<String, String>,
    pub body: Option<Value>,
}

/// Where to continue a listing: opaque to callers, kept as a sync checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken(pub String);

/// One page of records from a list request.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderPage {
    pub records: Vec<Value>,
    /// `None` on the last page.
    pub next: Option<PageToken>,
    pub status: u16,
}

/// The answer to a single request.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderResponse {
    pub status: u16,
    pub body: Option<Value>,
    pub latency: Duration,
}

/// Calls provider APIs. The adapter injects credentials, honours `Retry-After` and rate-limit
/// headers, retries 5xx and timeouts with bounded backoff, limits concurrency and rate per
/// connection, caps response sizes, and connects only to addresses the webhook URL policy
/// allows. Credentials never appear in its logs, spans or errors. `connection` is the key of the
/// per-connection concurrency and rate limits (the connection id). Tests use a fake provider API
/// with the real adapter rather than a mock of this port.
#[async_trait]
pub trait ProviderClient: Send + Sync {
    /// Sends one request and returns the provider's answer, whatever its status once retries
    /// are spent (a 404 is an answer, not an error).
    ///
    /// # Errors
    /// - MUST return [`DomainError::Unavailable`] when the provider cannot be reached or keeps
    ///   failing (5xx, timeouts, 429) after the bounded retries, with `retry_after` when known.
    /// - MUST return [`DomainError::Validation`] when the URL is refused by the destination policy.
    /// - Errors of `credentials` are returned as they are.
    async fn send(
        &self,
        connection: &str,
        target: &ApiTarget,
        request: &ProviderRequest,
        credentials: &dyn CredentialSource,
    ) -> Result<ProviderResponse, DomainError>;

    /// Fetches one page of a list request: the first when `page` is `None`, else the page the
    /// token names (its style is the target's pagination). `page_size` overrides the style's.
    ///
    /// # Errors
    /// As [`ProviderClient::send`]; a non-2xx answer after retries is [`DomainError::Unavailable`]
    /// (or `Conflict` for 401/403 after the one refresh), and a body without the records array
    /// at `items_path` is [`DomainError::Unexpected`].
    async fn list_page(
        &self,
        connection: &str,
        target: &ApiTarget,
        request: &ProviderRequest,
        page: Option<&PageToken>,
        page_size: Option<u32>,
        credentials: &dyn CredentialSource,
    ) -> Result<ProviderPage, DomainError>;
}
