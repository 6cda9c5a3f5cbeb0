use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde_json::json;

use crate::audit::{Audit, AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::common::{Clock, ETag, IdGenerator, IntegrationId, Page, PageRequest, Stored, TenantId};
use crate::connection::{Connection, ConnectionId, ConnectionRepository, ConnectionSpec, ConnectionStatus, CredentialHints, Credentials};
use crate::custom::CustomAuth;
use crate::error::DomainError;
use crate::events::payloads::ConnectionEventData;
use crate::events::{DomainEvent, EventData, EventType};
use crate::integration::Integration;
use crate::ports::{IntegrationRepository, ProviderRepository};
use crate::provider::{ApiKeyPlacement, AuthMode};
use crate::provider_client::{AuthMaterial, CredentialSource, ProviderClient};
use crate::secrets::{SecretRef, SecretStore};

use super::connection_test::{ConnectionTestOutcome, ConnectionTester, Verification, test_connection};
use super::{matching, read_modify_write};

mod oauth2;
pub use oauth2::{AuthorizeSpec, CallbackOutcome, CallbackParams, OAuth2Settings, StartedAuthorization};

/// The secret-name kind of connection credentials: `integration-manager/{tenant}/connection/{id}`.
pub const SECRET_KIND: &str = "connection";

/// Creates, reads, changes and deletes the connections of a tenant's integrations, keeps their
/// credentials in the secret store, and hands out [`CredentialSource`]s for provider calls.
#[derive(Clone)]
pub struct ConnectionService {
    connections: Arc<dyn ConnectionRepository>,
    integrations: Arc<dyn IntegrationRepository>,
    providers: Arc<dyn ProviderRepository>,
    secrets: Arc<dyn SecretStore>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    audit: Audit,
    /// OAuth2 token endpoints and the state key; `None`: OAuth2 connections cannot get tokens.
    oauth2: Option<Arc<oauth2::OAuth2Support>>,
}

impl std::fmt::Debug for ConnectionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionService").finish_non_exhaustive()
    }
}

/// What an integration lets its connections do: the modes its provider (or custom definition)
/// supports and where an API key goes.
struct AuthOptions {
    modes: Vec<AuthMode>,
    api_key: Option<ApiKeyPlacement>,
}

impl ConnectionService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        connections: Arc<dyn ConnectionRepository>,
        integrations: Arc<dyn IntegrationRepository>,
        providers: Arc<dyn ProviderRepository>,
        secrets: Arc<dyn SecretStore>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        audit: Audit,
    ) -> Self {
        Self { connections, integrations, providers, secrets, clock, ids, audit, oauth2: None }
    }

    /// Lets OAuth2 connections get and refresh tokens through `client`, and authorizations start
    /// with states signed by `key`.
    #[must_use]
    pub fn with_oauth2(
        mut self,
        client: Arc<dyn crate::oauth2::OAuth2Client>,
        key: crate::oauth2::StateKey,
        settings: OAuth2Settings,
    ) -> Self {
        self.oauth2 = Some(Arc::new(oauth2::OAuth2Support { client, key, settings }));
        self
    }

    /// Checks, before a change is even read, that the caller may make it (members and admins).
    ///
    /// # Errors
    /// `Forbidden`, recorded in the audit log.
    pub async fn authorize(&self, caller: &Caller, action: AuditAction) -> Result<(), DomainError> {
        self.audit.require(caller, Role::Member, AuditResource::Connection, action).await
    }

    async fn options(&self, integration: &Integration) -> Result<AuthOptions, DomainError> {
        if let Some(definition) = &integration.custom_definition {
            let api_key = match &definition.auth {
                CustomAuth::ApiKey { location, name, prefix } => {
                    Some(ApiKeyPlacement { location: *location, name: name.clone(), prefix: prefix.clone() })
                }
                _ => None,
            };
            return Ok(AuthOptions { modes: vec![definition.auth.auth_mode()], api_key });
        }
        match self.providers.get(&integration.provider_id).await {
            Ok(provider) => Ok(AuthOptions { modes: provider.value.spec.auth_modes, api_key: provider.value.spec.api_key }),
            // A provider removed from the catalog since: its integrations take no new connection.
            Err(DomainError::NotFound { .. }) => Ok(AuthOptions { modes: Vec::new(), api_key: None }),
            Err(e) => Err(e),
        }
    }

    /// Checks a spec against the integration it is for, writing nothing.
    ///
    /// # Errors
    /// `NotFound` for an unknown integration; `Validation` listing every offending field.
    pub async fn check(&self, caller: &Caller, integration: IntegrationId, spec: &ConnectionSpec) -> Result<(), DomainError> {
        let integration = self.integrations.get(&caller.tenant_id, integration).await?;
        self.validate(&integration.value, spec).await
    }

    async fn validate(&self, integration: &Integration, spec: &ConnectionSpec) -> Result<(), DomainError> {
        let mut v = spec.violations();
        let options = self.options(integration).await?;
        let mode = spec.credentials.auth_mode();
        if !options.modes.contains(&mode) {
            let names: Vec<_> = options.modes.iter().map(|m| m.as_str()).collect();
            v.invalid(
                "authMode",
                format!(
                    "'{}' is not supported by this integration's provider; supported: {}",
                    mode.as_str(),
                    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
                ),
            );
        }
        v.finish(|| ())
    }

    async fn store_credentials(&self, connection: &Connection, credentials: &Credentials) -> Result<SecretRef, DomainError> {
        self.put_secret(connection, credentials.to_secret().0).await
    }

    /// # Errors
    /// `Forbidden` without the member role; `NotFound` for an unknown integration; `Validation`
    /// listing every offending field (a mode the provider does not support among them).
    pub async fn create(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        spec: ConnectionSpec,
    ) -> Result<Stored<Connection>, DomainError> {
        let result = self.create_unaudited(caller, integration, spec).await;
        self.audit
            .result(caller, AuditResource::Connection, AuditAction::Create, None, &result, |s| {
                (s.value.id.to_string(), json!({ "integrationId": integration.to_string(), "authMode": s.value.auth_mode.as_str() }))
            })
            .await;
        result
    }

    async fn create_unaudited(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        spec: ConnectionSpec,
    ) -> Result<Stored<Connection>, DomainError> {
        caller.require(Role::Member)?;
        let parent = self.integrations.get(&caller.tenant_id, integration).await?;
        self.validate(&parent.value, &spec).await?;
        let hints = spec.credentials.hints();
        let mut connection =
            self.new_connection(caller, integration, spec.name, spec.credentials.auth_mode(), ConnectionStatus::Active, hints);
        connection.credentials = Some(self.store_credentials(&connection, &spec.credentials).await?);
        self.insert(connection).await
    }

    /// A new connection of the caller's `integration`, made by the caller now, with a fresh id,
    /// no credentials stored yet and no refresh lease.
    fn new_connection(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        name: String,
        auth_mode: AuthMode,
        status: ConnectionStatus,
        hints: CredentialHints,
    ) -> Connection {
        let now = self.clock.now();
        Connection {
            id: ConnectionId(self.ids.new_uuid()),
            tenant_id: caller.tenant_id.clone(),
            integration_id: integration,
            name,
            auth_mode,
            status,
            status_reason: None,
            hints,
            credentials: None,
            refresh_lease: None,
            created_at: now,
            updated_at: now,
            created_by: caller.user_id.clone(),
            updated_by: caller.user_id.clone(),
        }
    }

    /// Stores a new connection whose secret was just written, with `integration.connection.created`;
    /// when that fails, deletes the secret (nothing references it).
    async fn insert(&self, connection: Connection) -> Result<Stored<Connection>, DomainError> {
        let event = self.event(EventType::ConnectionCreated, &connection)?;
        match self.connections.create(&connection, &[event]).await {
            Ok(etag) => Ok(Stored { value: connection, etag }),
            Err(e) => {
                if let Some(secret) = &connection.credentials {
                    let _ = self.secrets.delete(&secret.secret_name).await;
                }
                Err(e)
            }
        }
    }

    /// # Errors
    /// `NotFound` unless the caller's tenant has that integration and connection.
    pub async fn get(&self, caller: &Caller, integration: IntegrationId, id: ConnectionId) -> Result<Stored<Connection>, DomainError> {
        caller.require(Role::Viewer)?;
        self.connections.get(&caller.tenant_id, integration, id).await
    }

    /// # Errors
    /// `NotFound` for an unknown integration; `Validation` for a foreign continuation token.
    pub async fn list(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        page: &PageRequest,
    ) -> Result<Page<Stored<Connection>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.integrations.get(&caller.tenant_id, integration).await?;
        self.connections.list(&caller.tenant_id, integration, page).await
    }

    /// Replaces a connection's name and credentials (a new secret version); the connection is
    /// active again with the new credentials.
    ///
    /// # Errors
    /// `NotFound`, `PreconditionFailed` when `if_match` is stale, `Validation` as for create.
    pub async fn update(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        id: ConnectionId,
        spec: ConnectionSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Connection>, DomainError> {
        let result = self.update_unaudited(caller, integration, id, spec, if_match).await;
        self.audit
            .result(caller, AuditResource::Connection, AuditAction::Update, Some(id.to_string()), &result, |s| {
                (String::new(), json!({ "integrationId": integration.to_string(), "authMode": s.value.auth_mode.as_str() }))
            })
            .await;
        result
    }

    async fn update_unaudited(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        id: ConnectionId,
        spec: ConnectionSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Connection>, DomainError> {
        caller.require(Role::Member)?;
        let parent = self.integrations.get(&caller.tenant_id, integration).await?;
        self.validate(&parent.value, &spec).await?;
        let updated = read_modify_write(if_match, async |token| {
            let current = matching(self.connections.get(&caller.tenant_id, integration, id).await?, token)?;
            let mut connection = Connection {
                name: spec.name.clone(),
                auth_mode: spec.credentials.auth_mode(),
                status: ConnectionStatus::Active,
                status_reason: None,
                hints: spec.credentials.hints(),
                refresh_lease: None,
                updated_at: self.clock.now(),
                updated_by: caller.user_id.clone(),
                ..current.value.clone()
            };
            // A new version of the same secret: the document names the version it uses, so a
            // version whose write lost is never read (and goes with the connection).
            connection.credentials = Some(self.store_credentials(&connection, &spec.credentials).await?);
            let etag = self.connections.replace(&connection, Some(token.unwrap_or(&current.etag).clone()), &[]).await?;
            Ok(Stored { value: connection, etag })
        })
        .await?;
        // The connection references the new version: the ones before it go (a reader holding an
        // older reference reads the connection again).
        self.prune_superseded(&updated.value).await;
        Ok(updated)
    }

    /// Deletes a connection, then its credentials.
    ///
    /// # Errors
    /// `NotFound`, `PreconditionFailed` when `if_match` is stale.
    pub async fn delete(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        id: ConnectionId,
        if_match: Option<&ETag>,
    ) -> Result<(), DomainError> {
        let result = self.delete_unaudited(caller, integration, id, if_match).await;
        self.audit
            .result(caller, AuditResource::Connection, AuditAction::Delete, Some(id.to_string()), &result, |_| {
                (String::new(), json!({ "integrationId": integration.to_string() }))
            })
            .await;
        result
    }

    async fn delete_unaudited(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        id: ConnectionId,
        if_match: Option<&ETag>,
    ) -> Result<(), DomainError> {
        caller.require(Role::Member)?;
        let deleted = read_modify_write(if_match, async |token| {
            let current = matching(self.connections.get(&caller.tenant_id, integration, id).await?, token)?;
            let event = self.event(EventType::ConnectionDeleted, &current.value)?;
            self.connections.delete(&caller.tenant_id, integration, id, Some(current.etag), &[event]).await?;
            Ok(current.value)
        })
        .await?;
        if let Some(secret) = &deleted.credentials {
            self.secrets.delete(&secret.secret_name).await?;
        }
        Ok(())
    }

    /// Records that a connection stopped working (a failed test, a refused refresh or
    /// authorization): sets `status` with `reason` and publishes `integration.connection.failed`
    /// with the change. A connection already in that status with that reason is left as it is
    /// (no second event).
    ///
    /// # Errors
    /// `NotFound` unless the tenant has that connection; `Validation` on `status` for `active`
    /// and on `reason` for an empty or over-long one.
    pub async fn mark_failed(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        id: ConnectionId,
        status: ConnectionStatus,
        reason: &str,
    ) -> Result<Stored<Connection>, DomainError> {
        let mut v = crate::error::Violations::new();
        if status == ConnectionStatus::Active {
            v.invalid("status", "a failure cannot make a connection active");
        }
        v.check("reason", crate::common::validate_text(reason, 1, crate::connection::MAX_REASON_CHARS));
        v.finish(|| ())?;
        read_modify_write(None, async |_| {
            let current = self.connections.get(&caller.tenant_id, integration, id).await?;
            if current.value.status == status && current.value.status_reason.as_deref() == Some(reason) {
                return Ok(current);
            }
            let connection =
                Connection { status, status_reason: Some(reason.to_owned()), updated_at: self.clock.now(), ..current.value.clone() };
            let event = self.event(EventType::ConnectionFailed, &connection)?;
            let etag = self.connections.replace(&connection, Some(current.etag.clone()), &[event]).await?;
            Ok(Stored { value: connection, etag })
        })
        .await
    }

    /// Makes a connection in `error` `active` again (a test passed); leaves any other status.
    async fn mark_recovered(&self, caller: &Caller, integration: IntegrationId, id: ConnectionId) -> Result<(), DomainError> {
        read_modify_write(None, async |_| {
            let current = self.connections.get(&caller.tenant_id, integration, id).await?;
            if current.value.status != ConnectionStatus::Error {
                return Ok(current);
            }
            let connection =
                Connection { status: ConnectionStatus::Active, status_reason: None, updated_at: self.clock.now(), ..current.value.clone() };
            let etag = self.connections.replace(&connection, Some(current.etag.clone()), &[]).await?;
            Ok(Stored { value: connection, etag })
        })
        .await
        .map(|_| ())
    }

    /// The credentials of a connection, for provider calls made on behalf of `caller` (a user,
    /// or the service itself for scheduled work). Every read of the secret is an audit record.
    ///
    /// # Errors
    /// `Forbidden` without the member role; `NotFound` unless the tenant has that connection.
    pub async fn credentials(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        id: ConnectionId,
    ) -> Result<ConnectionCredentials, DomainError> {
        self.audit.require(caller, Role::Member, AuditResource::Connection, AuditAction::UseCredentials).await?;
        let stored = self.connections.get(&caller.tenant_id, integration, id).await?;
        let parent = self.integrations.get(&caller.tenant_id, integration).await?;
        let options = self.options(&parent.value).await?;
        Ok(ConnectionCredentials {
            service: self.clone(),
            caller: caller.clone(),
            tenant: caller.tenant_id.clone(),
            integration,
            id: stored.value.id,
            api_key: options.api_key,
            testing: false,
        })
    }

    /// An event about `connection`, carrying it as the API returns it.
    fn event(&self, event_type: EventType, connection: &Connection) -> Result<DomainEvent, DomainError> {
        Ok(DomainEvent {
            id: self.ids.new_uuid(),
            event_type,
            tenant_id: connection.tenant_id.clone(),
            subject: connection.id.to_string(),
            time: self.clock.now(),
            data: EventData::of(&ConnectionEventData::from(connection)).map_err(|e| DomainError::Unexpected(e.into()))?,
        })
    }
}

/// Tests connections: sends the provider's verification request (or a custom definition's
/// smallest list) through the provider client with the connection's credentials, and sets the
/// connection's status from the outcome: a 2xx makes it `active` again, a 401 or 403 (or a 2xx
/// whose body refuses them, as Slack's `"ok": false`) makes it `error` with the reason (and publishes `integration.connection.failed`); an unreachable
/// provider or another status changes nothing, since it says nothing about the credentials.
#[derive(Clone)]
pub struct ConnectionTests {
    service: ConnectionService,
    client: Arc<dyn ProviderClient>,
}

impl ConnectionTests {
    pub fn new(service: ConnectionService, client: Arc<dyn ProviderClient>) -> Self {
        Self { service, client }
    }
}

#[async_trait(?Send)]
impl ConnectionTester for ConnectionTests {
    async fn test(&self, caller: &Caller, integration: &IntegrationId, connection: &str) -> Result<ConnectionTestOutcome, DomainError> {
        let service = &self.service;
        let not_found = || DomainError::NotFound { resource: "connection", id: connection.to_owned() };
        let id = ConnectionId::parse(connection).ok_or_else(not_found)?;
        let mut credentials = service.credentials(caller, *integration, id).await?;
        credentials.testing = true;
        let parent = service.integrations.get(&caller.tenant_id, *integration).await?.value;
        let verification = match &parent.custom_definition {
            Some(definition) => Verification::for_custom(definition)?,
            None => {
                let provider = service.providers.get(&parent.provider_id).await?.value;
                Verification::for_provider(&provider.spec, &serde_json::Value::Object(parent.config.clone()))?
            }
        };
        let observed = Observed { inner: &credentials, refused: AtomicBool::new(false) };
        let mut outcome = test_connection(self.client.as_ref(), &id.to_string(), &verification, &observed, service.clock.as_ref()).await;
        if observed.refused.load(Ordering::Relaxed) && outcome.status.is_none() {
            // The provider answered 401 and the credentials could not be refreshed.
            outcome.status = Some(401);
        }
        let refusal = match outcome.status {
            _ if outcome.ok => None,
            Some(status @ (401 | 403)) => Some(format!("the provider refused the credentials (HTTP {status}) in a connection test")),
            // A 2xx whose body says no (Slack's `"ok": false`).
            Some(status @ 200..=299) => {
                Some(format!("the provider refused the credentials in its answer (HTTP {status}) to a connection test"))
            }
            _ => None,
        };
        if outcome.ok {
            service.mark_recovered(caller, *integration, id).await?;
        } else if let Some(reason) = refusal {
            service.mark_failed(caller, *integration, id, ConnectionStatus::Error, &reason).await?;
        }
        Ok(outcome)
    }
}

/// A credential source that notes whether the provider refused the credentials (the client
/// asks for newer ones only after a 401).
struct Observed<'a> {
    inner: &'a ConnectionCredentials,
    refused: AtomicBool,
}

#[async_trait]
impl CredentialSource for Observed<'_> {
    async fn current(&self) -> Result<AuthMaterial, DomainError> {
        self.inner.current().await
    }

    async fn after_unauthorized(&self, stale: &AuthMaterial) -> Result<AuthMaterial, DomainError> {
        self.refused.store(true, Ordering::Relaxed);
        self.inner.after_unauthorized(stale).await
    }
}

/// The [`CredentialSource`] of one connection: reads the current credentials from the secret
/// store on every call (so a replaced credential is used at once) and refuses a connection that
/// cannot authenticate.
#[derive(Clone)]
pub struct ConnectionCredentials {
    service: ConnectionService,
    caller: Caller,
    tenant: TenantId,
    integration: IntegrationId,
    id: ConnectionId,
    api_key: Option<ApiKeyPlacement>,
    /// A connection test may use the credentials of a connection in `error` (a failed test or
    /// call): the test is how it recovers.
    testing: bool,
}

impl std::fmt::Debug for ConnectionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCredentials").field("connection", &self.id).finish_non_exhaustive()
    }
}

impl ConnectionCredentials {
    /// Refuses a connection that cannot authenticate now.
    fn check_usable(&self, connection: &Connection) -> Result<(), DomainError> {
        let usable = connection.status == ConnectionStatus::Active || (self.testing && connection.status == ConnectionStatus::Error);
        if !usable {
            return Err(DomainError::Conflict(format!(
                "connection '{}' cannot authenticate: it is {}{}",
                connection.id,
                connection.status.as_str(),
                connection.status_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            )));
        }
        Ok(())
    }

    async fn audit_use(&self) {
        let result = Ok::<_, DomainError>(());
        self.service
            .audit
            .result(&self.caller, AuditResource::Connection, AuditAction::UseCredentials, Some(self.id.to_string()), &result, |_| {
                (String::new(), json!({ "integrationId": self.integration.to_string() }))
            })
            .await;
    }

    /// The credentials now; for OAuth2 connections a token fresh for at least the refresh skew
    /// (refreshed first when needed), or newer than `stale`.
    /// The connection, checked usable, and the secret version it references now. A version
    /// pruned after the connection was read (a refresh or a replacement referenced a newer one
    /// meanwhile) is not an error: the connection is read again.
    async fn read_current(&self) -> Result<(Stored<Connection>, crate::secrets::SecretValue), DomainError> {
        let service = &self.service;
        let mut missing: Option<SecretRef> = None;
        loop {
            let stored = service.connections.get(&self.tenant, self.integration, self.id).await?;
            self.check_usable(&stored.value)?;
            let reference = stored
                .value
                .credentials
                .clone()
                .ok_or_else(|| DomainError::Conflict(format!("connection '{}' has no credentials", self.id)))?;
            match service.secrets.get(&reference).await {
                Ok(value) => return Ok((stored, value)),
                Err(DomainError::NotFound { .. }) if missing.as_ref() != Some(&reference) => missing = Some(reference),
                Err(e) => return Err(e),
            }
        }
    }

    async fn material(&self, stale: Option<&AuthMaterial>) -> Result<AuthMaterial, DomainError> {
        let service = &self.service;
        let stored = service.connections.get(&self.tenant, self.integration, self.id).await?;
        let connection = stored.value;
        self.check_usable(&connection)?;
        if connection.auth_mode.is_oauth2() {
            self.audit_use().await;
            let stale = match stale {
                Some(AuthMaterial::Bearer(token)) => Some(token.as_str()),
                _ => None,
            };
            return self.oauth2_token(stale).await.map(AuthMaterial::Bearer);
        }
        let (stored, value) = self.read_current().await?;
        let connection = stored.value;
        self.audit_use().await;
        match Credentials::from_secret(connection.auth_mode, &value)? {
            Credentials::ApiKey { api_key } => {
                let placement = self
                    .api_key
                    .clone()
                    .ok_or_else(|| DomainError::Conflict("the integration's provider does not say where an API key goes".to_owned()))?;
                Ok(AuthMaterial::ApiKey { location: placement.location, value: placement.value(&api_key), name: placement.name })
            }
            Credentials::Bearer { token } => Ok(AuthMaterial::Bearer(token)),
            Credentials::Basic { username, password } => Ok(AuthMaterial::Basic { username, password }),
            Credentials::Oauth2ClientCredentials { .. } => {
                Err(DomainError::Unexpected(anyhow::anyhow!("OAuth2 credentials are handled as tokens")))
            }
        }
    }
}

#[async_trait]
impl CredentialSource for ConnectionCredentials {
    async fn current(&self) -> Result<AuthMaterial, DomainError> {
        self.material(None).await
    }

    async fn after_unauthorized(&self, stale: &AuthMaterial) -> Result<AuthMaterial, DomainError> {
        // Static credentials cannot be refreshed; ones replaced since the request are newer. An
        // OAuth2 token the provider refused is refreshed once (unless another caller already did).
        let now = self.material(Some(stale)).await?;
        if &now == stale {
            return Err(DomainError::Conflict(format!(
                "the provider refused the credentials of connection '{}' and they cannot be refreshed",
                self.id
            )));
        }
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::common::{SystemClock, UserId, UuidV7};
    use crate::connection::{CredentialHints, MockConnectionRepository};
    use crate::ports::{MockIntegrationRepository, MockProviderRepository};
    use crate::secrets::{MockSecretStore, SecretName, SecretValue};
    use crate::services::block_on;

    fn tenant() -> TenantId {
        TenantId::new("t1").expect("tenant")
    }

    fn reference(version: &str) -> SecretRef {
        SecretRef { secret_name: SecretName::new(&tenant(), SECRET_KIND, "c1"), version: version.into() }
    }

    fn connection(version: &str) -> Stored<Connection> {
        let now = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let user = UserId::new("alice").expect("user");
        Stored {
            value: Connection {
                id: ConnectionId(uuid::Uuid::from_u128(1)),
                tenant_id: tenant(),
                integration_id: IntegrationId(uuid::Uuid::from_u128(2)),
                name: "bot".into(),
                auth_mode: AuthMode::Bearer,
                status: ConnectionStatus::Active,
                status_reason: None,
                hints: CredentialHints::default(),
                credentials: Some(reference(version)),
                refresh_lease: None,
                created_at: now,
                updated_at: now,
                created_by: user.clone(),
                updated_by: user,
            },
            etag: ETag::new(format!("e{version}")),
        }
    }

    /// A source whose connection reads as `versions[i]` at the i-th read (the last one after).
    fn source(versions: &'static [&'static str], secrets: MockSecretStore) -> ConnectionCredentials {
        let reads = Arc::new(AtomicUsize::new(0));
        let mut connections = MockConnectionRepository::new();
        connections.expect_get().returning(move |_, _, _| {
            let i = reads.fetch_add(1, Ordering::SeqCst).min(versions.len() - 1);
            Ok(connection(versions[i]))
        });
        let service = ConnectionService::new(
            Arc::new(connections),
            Arc::new(MockIntegrationRepository::new()),
            Arc::new(MockProviderRepository::new()),
            Arc::new(secrets),
            Arc::new(SystemClock),
            Arc::new(UuidV7),
            Audit::discarding(),
        );
        let caller = Caller::new(tenant(), UserId::new("alice").expect("user"), vec![Role::Member]);
        ConnectionCredentials {
            service,
            caller,
            tenant: tenant(),
            integration: IntegrationId(uuid::Uuid::from_u128(2)),
            id: ConnectionId(uuid::Uuid::from_u128(1)),
            api_key: None,
            testing: false,
        }
    }

    #[test]
    fn a_reader_whose_version_was_pruned_meanwhile_reads_the_connection_again() {
        // The reader read version 1; a refresh or replacement then referenced version 2 and
        // pruned version 1 before the reader asked the store for it.
        let mut secrets = MockSecretStore::new();
        secrets.expect_get().returning(|r| match r.version.as_str() {
            "2" => Ok(SecretValue(json!({"token": "new-token"}))),
            _ => Err(DomainError::not_found("secret", &r.secret_name)),
        });
        let credentials = source(&["1", "2"], secrets);
        assert_eq!(block_on(credentials.current()).expect("the current version"), AuthMaterial::Bearer("new-token".into()));
    }

    #[test]
    fn a_reference_that_stays_missing_is_not_found_not_a_loop() {
        let mut secrets = MockSecretStore::new();
        secrets.expect_get().times(2).returning(|r| Err(DomainError::not_found("secret", &r.secret_name)));
        let credentials = source(&["1"], secrets);
        assert!(matches!(block_on(credentials.current()), Err(DomainError::NotFound { .. })));
    }
}
