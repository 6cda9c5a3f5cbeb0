//! Connections: how an integration authenticates to its provider. The connection document keeps
//! non-secret hints (last four characters, scopes, token expiry) and a [`SecretRef`]; the
//! credentials themselves live in the secret store.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::common::{ETag, IntegrationId, Page, PageRequest, Stored, TenantId, UserId, validate_text};
use crate::error::{DomainError, Violations};
use crate::events::DomainEvent;
use crate::provider::AuthMode;
use crate::secrets::{SecretRef, SecretValue};

/// Longest connection name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest status reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Most scopes a connection may ask for.
pub const MAX_SCOPES: usize = 100;
/// A secret shorter than this shows no last-four hint (four characters would give too much away).
pub const MIN_CHARS_FOR_HINT: usize = 12;

crate::common::uuid_id!(
    /// Identifier of a connection: a UUID version 7.
    ConnectionId
);

/// Whether a connection can authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    Active,
    /// An OAuth2 authorization was started and the provider has not called back yet.
    PendingAuthorization,
    /// The access token expired and cannot be refreshed without the user.
    Expired,
    /// The provider refused to refresh the token (`invalid_grant`).
    RefreshFailed,
    /// The user or the provider revoked the grant.
    Revoked,
    /// Something else went wrong; the reason says what.
    Error,
}

impl ConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Active => "active",
            ConnectionStatus::PendingAuthorization => "pending_authorization",
            ConnectionStatus::Expired => "expired",
            ConnectionStatus::RefreshFailed => "refresh_failed",
            ConnectionStatus::Revoked => "revoked",
            ConnectionStatus::Error => "error",
        }
    }
}

/// Credentials of a connection, as a caller hands them in. `Debug` never shows a value.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    ApiKey { api_key: String },
    Bearer { token: String },
    Basic { username: String, password: String },
    Oauth2ClientCredentials { client_id: String, client_secret: String, scopes: Vec<String> },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials::{}(<redacted>)", self.auth_mode().as_str())
    }
}

/// An OAuth 2.0 scope: 1 to 200 characters without spaces or control characters.
pub(crate) fn is_scope(scope: &str) -> bool {
    (1..=200).contains(&scope.chars().count()) && !scope.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn check_secret_text(v: &mut Violations, field: &str, value: &str, min: usize, max: usize) {
    let chars = value.chars().count();
    if chars < min || chars > max || value.chars().any(char::is_control) {
        v.invalid(field, format!("must be {min} to {max} characters without control characters"));
    }
}

/// Checks scopes: at most [`MAX_SCOPES`], each 1 to 200 characters without spaces.
pub fn check_scopes(v: &mut Violations, field: &str, scopes: &[String]) {
    if scopes.len() > MAX_SCOPES {
        v.invalid(field, format!("must have at most {MAX_SCOPES} scopes"));
    }
    for (i, scope) in scopes.iter().enumerate() {
        if !is_scope(scope) {
            v.invalid(format!("{field}[{i}]"), "must be 1 to 200 characters without spaces");
        }
    }
}

impl Credentials {
    pub fn auth_mode(&self) -> AuthMode {
        match self {
            Credentials::ApiKey { .. } => AuthMode::ApiKey,
            Credentials::Bearer { .. } => AuthMode::Bearer,
            Credentials::Basic { .. } => AuthMode::Basic,
            Credentials::Oauth2ClientCredentials { .. } => AuthMode::Oauth2ClientCredentials,
        }
    }

    /// Every problem of the values, by the field's path under `credentials`. The messages never
    /// quote a value.
    pub fn violations(&self) -> Violations {
        let mut v = Violations::new();
        match self {
            Credentials::ApiKey { api_key } => check_secret_text(&mut v, "credentials.apiKey", api_key, 1, 4096),
            Credentials::Bearer { token } => check_secret_text(&mut v, "credentials.token", token, 1, 8192),
            Credentials::Basic { username, password } => {
                check_secret_text(&mut v, "credentials.username", username, 1, 256);
                check_secret_text(&mut v, "credentials.password", password, 0, 1024);
            }
            Credentials::Oauth2ClientCredentials { client_id, client_secret, scopes } => {
                check_secret_text(&mut v, "credentials.clientId", client_id, 1, 256);
                check_secret_text(&mut v, "credentials.clientSecret", client_secret, 1, 1024);
                check_scopes(&mut v, "credentials.scopes", scopes);
            }
        }
        v
    }

    /// The non-secret hints a connection shows.
    pub fn hints(&self) -> CredentialHints {
        let (secret, scopes) = match self {
            Credentials::ApiKey { api_key } => (api_key, Vec::new()),
            Credentials::Bearer { token } => (token, Vec::new()),
            Credentials::Basic { password, .. } => (password, Vec::new()),
            Credentials::Oauth2ClientCredentials { client_secret, scopes, .. } => (client_secret, scopes.clone()),
        };
        CredentialHints { last_four: last_four(secret), scopes, token_expires_at: None }
    }

    /// The value kept in the secret store.
    pub fn to_secret(&self) -> SecretValue {
        SecretValue(match self {
            Credentials::ApiKey { api_key } => json!({ "apiKey": api_key }),
            Credentials::Bearer { token } => json!({ "token": token }),
            Credentials::Basic { username, password } => json!({ "username": username, "password": password }),
            Credentials::Oauth2ClientCredentials { client_id, client_secret, scopes } => {
                json!({ "clientId": client_id, "clientSecret": client_secret, "scopes": scopes })
            }
        })
    }

    /// Reads back what [`Credentials::to_secret`] stored for `mode`.
    ///
    /// # Errors
    /// `Unexpected` when the stored value does not have the shape of `mode` (never quoting it).
    pub fn from_secret(mode: AuthMode, value: &SecretValue) -> Result<Self, DomainError> {
        let text = |key: &str| value.0.get(key).and_then(Value::as_str).map(str::to_owned);
        let broken = || DomainError::Unexpected(anyhow::anyhow!("the stored credentials do not have the shape of {}", mode.as_str()));
        Ok(match mode {
            AuthMode::ApiKey => Credentials::ApiKey { api_key: text("apiKey").ok_or_else(broken)? },
            AuthMode::Bearer => Credentials::Bearer { token: text("token").ok_or_else(broken)? },
            AuthMode::Basic => {
                Credentials::Basic { username: text("username").ok_or_else(broken)?, password: text("password").ok_or_else(broken)? }
            }
            AuthMode::Oauth2ClientCredentials => Credentials::Oauth2ClientCredentials {
                client_id: text("clientId").ok_or_else(broken)?,
                client_secret: text("clientSecret").ok_or_else(broken)?,
                scopes: serde_json::from_value(value.0.get("scopes").cloned().unwrap_or(Value::Array(Vec::new()))).map_err(|_| broken())?,
            },
            AuthMode::Oauth2AuthorizationCode => return Err(broken()),
        })
    }
}

/// The last four characters of a secret long enough for them to give nothing useful away.
pub fn last_four(secret: &str) -> Option<String> {
    let chars: Vec<char> = secret.chars().collect();
    (chars.len() >= MIN_CHARS_FOR_HINT).then(|| chars[chars.len() - 4..].iter().collect())
}

/// What a connection shows about its credentials without revealing them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialHints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_four: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub token_expires_at: Option<OffsetDateTime>,
}

/// A hold on refreshing a connection's tokens, taken by conditional write so that one instance
/// refreshes at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshLease {
    pub owner: String,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
}

/// A connection as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub id: ConnectionId,
    pub tenant_id: TenantId,
    pub integration_id: IntegrationId,
    pub name: String,
    pub auth_mode: AuthMode,
    pub status: ConnectionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub hints: CredentialHints,
    /// Where the credentials are; `None` until an authorization stored some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_lease: Option<RefreshLease>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub created_by: UserId,
    pub updated_by: UserId,
}

/// What a tenant states when it creates or replaces a connection with credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionSpec {
    pub name: String,
    pub credentials: Credentials,
}

impl ConnectionSpec {
    /// Every problem that needs no integration: the name and the credential values.
    pub fn violations(&self) -> Violations {
        let mut v = Violations::new();
        v.check("name", validate_text(&self.name, 1, MAX_NAME_CHARS));
        self.credentials.violations().into_vec().into_iter().for_each(|x| v.push(x));
        v
    }
}

/// The tenant check of every connection store: the document a store read by partition (the
/// integration) and id, as the tenant's connection; `NotFound` when there was none or another
/// tenant owns it (the partition key alone does not confine a tenant).
///
/// # Errors
/// [`DomainError::NotFound`] unless `tenant` owns the connection.
pub fn owned_by(found: Option<Stored<Connection>>, tenant: &TenantId, id: ConnectionId) -> Result<Stored<Connection>, DomainError> {
    found.filter(|f| f.value.tenant_id == *tenant).ok_or_else(|| DomainError::not_found("connection", id))
}

/// The condition of a store's write to a connection it read: [`owned_by`], then the caller's
/// `If-Match` against the version read ([`crate::common::write_condition`]).
///
/// # Errors
/// `NotFound` as [`owned_by`]; `PreconditionFailed` when `if_match` names another version.
pub fn owned_write(
    found: Option<Stored<Connection>>,
    tenant: &TenantId,
    id: ConnectionId,
    if_match: Option<ETag>,
) -> Result<ETag, DomainError> {
    crate::common::write_condition(if_match, owned_by(found, tenant, id)?.etag)
}

/// Storage of connections. The container is partitioned by integration, but every call names
/// the tenant and is confined to it.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait ConnectionRepository: Send + Sync {
    /// Stores a new connection and records `events` in the same atomic write.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Conflict`] if a connection with the same id exists in the
    ///   integration, having written nothing (no event either).
    async fn create(&self, connection: &Connection, events: &[DomainEvent]) -> Result<ETag, DomainError>;

    /// Reads one connection of one integration of one tenant.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] unless the tenant's integration has that
    ///   connection: another tenant's connection (even with the right integration id) is not found.
    async fn get(&self, tenant: &TenantId, integration: IntegrationId, id: ConnectionId) -> Result<Stored<Connection>, DomainError>;

    /// Lists the connections of one integration of one tenant, oldest first, one page at a
    /// time. MUST return every one exactly once across the pages, never another tenant's.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Validation`] on field `continuationToken` for a token it did not issue.
    async fn list(
        &self,
        tenant: &TenantId,
        integration: IntegrationId,
        page: &PageRequest,
    ) -> Result<Page<Stored<Connection>>, DomainError>;

    /// Replaces a connection (same tenant, integration and id) and records `events` atomically.
    /// A refresh lease is taken by a replace conditional on the version read.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if the tenant has no such connection (another
    ///   tenant's is not found, and is left untouched).
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is given and stale,
    ///   having written nothing.
    async fn replace(&self, connection: &Connection, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError>;

    /// Deletes a connection and records `events` atomically with the deletion.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if the tenant has no such connection.
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is given and stale.
    async fn delete(
        &self,
        tenant: &TenantId,
        integration: IntegrationId,
        id: ConnectionId,
        if_match: Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<(), DomainError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print_and_round_trip_through_the_secret() {
        let all = [
            Credentials::ApiKey { api_key: "sk_live_0123456789abcd".into() },
            Credentials::Bearer { token: "ghp_tokentokentoken".into() },
            Credentials::Basic { username: "alice".into(), password: "correct horse battery".into() },
            Credentials::Oauth2ClientCredentials {
                client_id: "client".into(),
                client_secret: "secret-secret-secret".into(),
                scopes: vec!["read".into()],
            },
        ];
        for c in all {
            let printed = format!("{c:?}");
            assert!(!printed.contains("0123") && !printed.contains("token") && !printed.contains("horse") && !printed.contains("secret-"));
            assert_eq!(Credentials::from_secret(c.auth_mode(), &c.to_secret()).unwrap(), c);
        }
    }

    #[test]
    fn hints_show_the_last_four_of_long_secrets_only() {
        assert_eq!(last_four("sk_live_0123456789abcd").as_deref(), Some("abcd"));
        assert_eq!(last_four("short-key"), None);
        let c = Credentials::Oauth2ClientCredentials { client_id: "c".into(), client_secret: "s".repeat(20), scopes: vec!["a".into()] };
        assert_eq!(c.hints().scopes, vec!["a".to_owned()]);
    }

    #[test]
    fn values_are_checked_by_path_without_quoting_them() {
        let spec = ConnectionSpec {
            name: String::new(),
            credentials: Credentials::Oauth2ClientCredentials {
                client_id: String::new(),
                client_secret: "x\u{7}".into(),
                scopes: vec!["has space".into()],
            },
        };
        let fields: Vec<_> = spec.violations().into_vec().into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["name", "credentials.clientId", "credentials.clientSecret", "credentials.scopes[0]"]);
    }
}
