//! OAuth2 connections: the authorization code flow with PKCE (start and callback), and tokens
//! kept fresh without races.
//!
//! The tenant's OAuth app is the integration's (`oauth2App`: the client id on the integration,
//! the client secret in the secret store); the code exchange and every refresh read it from the
//! integration, so a replaced app applies to the next refresh. The connection's secret holds the
//! scopes and, once granted, `accessToken`, `refreshToken` and `expiresAt` (unix seconds). While
//! an authorization is pending it holds `pending` (`nonceHash`, `returnUrl`) instead of tokens.
//! (Client-credentials connections keep their own `clientId` and `clientSecret` in their secret;
//! authorization code connections authorized before apps moved to integrations may too, and use
//! them while their integration has no app.)
//!
//! Each token refresh or completed authorization writes a new version of the connection's
//! secret, makes the connection reference it (a conditional replace), and only then prunes the
//! versions before it ([`crate::secrets::SecretStore::prune`]): a reader holding the previous
//! reference that finds it gone reads the connection again. A process that dies between the
//! write and the prune leaves old versions that the next prune, or the connection's deletion,
//! removes.
//!
//! A token is refreshed when it expires within the refresh skew, or once when the provider
//! refused it (a 401). Refreshes are serialised per connection across instances by the
//! connection's refresh lease, taken by a write conditional on the version read: whoever takes
//! it refreshes, writes a new secret version and clears the lease in one conditional replace;
//! everyone else waits for the new token (or for the lease to lapse). A refresh the token endpoint
//! refuses (`invalid_grant`...) sets `refresh_failed` with the reason and publishes
//! `integration.connection.failed`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::HumanDuration;
use crate::audit::{AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::common::{IntegrationId, Stored, TenantId, UserId, validate_redirect_url, validate_text};
use crate::connection::{Connection, ConnectionId, ConnectionStatus, CredentialHints, MAX_NAME_CHARS, RefreshLease, check_scopes};
use crate::custom::CustomAuth;
use crate::error::{DomainError, FieldViolation, ViolationKind, Violations};
use crate::events::EventType;
use crate::integration::Integration;
use crate::oauth2::{
    AuthorizationRequest, AuthorizationState, OAuth2App, OAuth2Client, STATE_LIFETIME, StateKey, TokenGrant, new_nonce, nonce_hash,
};
use crate::provider::AuthMode;
use crate::secrets::{SecretName, SecretRef, SecretValue};

use super::{ConnectionCredentials, ConnectionService, SECRET_KIND};

/// How OAuth2 connections behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Settings {
    /// The public URL of `GET /api/v1/oauth2/callback`; empty: authorizations cannot start.
    pub redirect_url: String,
    /// A token expiring within this is refreshed before use.
    pub refresh_skew: Duration,
    /// How long a refresh lease holds; a holder that died is waited for at most this long.
    pub refresh_lease: Duration,
    /// How often a caller waiting for another's refresh looks again.
    pub refresh_poll: Duration,
    /// Whether `returnUrl` may be plain `http`.
    pub allow_http_return_url: bool,
    /// How long an authorization's `state` is accepted.
    pub state_ttl: Duration,
}

impl Default for OAuth2Settings {
    fn default() -> Self {
        Self {
            redirect_url: String::new(),
            refresh_skew: Duration::from_secs(60),
            refresh_lease: Duration::from_secs(30),
            refresh_poll: Duration::from_millis(50),
            allow_http_return_url: false,
            state_ttl: STATE_LIFETIME,
        }
    }
}

pub(super) struct OAuth2Support {
    pub(super) client: Arc<dyn OAuth2Client>,
    pub(super) key: StateKey,
    pub(super) settings: OAuth2Settings,
}

/// What a tenant states to start an authorization.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizeSpec {
    pub name: String,
    /// `None`: the provider's default scopes.
    pub scopes: Option<Vec<String>>,
    pub return_url: Option<String>,
}

/// A started authorization: the pending connection and the URL the user opens.
#[derive(Debug, Clone)]
pub struct StartedAuthorization {
    pub connection: Stored<Connection>,
    pub authorization_url: String,
}

/// What the provider sent back to the callback.
#[derive(Debug, Clone, Default)]
pub struct CallbackParams {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// A completed authorization.
#[derive(Debug, Clone)]
pub struct CallbackOutcome {
    pub connection: Stored<Connection>,
    pub return_url: Option<String>,
}

/// The OAuth2 URLs and default scopes of an integration's provider or custom definition.
struct Endpoints {
    authorization_url: Option<String>,
    token_url: Option<String>,
    default_scopes: Vec<String>,
}

/// What the secret of an OAuth2 connection holds about tokens.
struct Tokens {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_at: Option<i64>,
}

impl Tokens {
    fn read(value: &SecretValue) -> Self {
        let text = |key: &str| value.0.get(key).and_then(Value::as_str).map(str::to_owned);
        Self {
            access_token: text("accessToken"),
            refresh_token: text("refreshToken"),
            expires_at: value.0.get("expiresAt").and_then(Value::as_i64),
        }
    }

    /// The access token when it is good for at least `skew` and is not `stale`.
    fn usable(&self, now: OffsetDateTime, skew: Duration, stale: Option<&str>) -> Option<&str> {
        let token = self.access_token.as_deref()?;
        let fresh = self.expires_at.is_none_or(|at| at - (skew.as_secs() as i64) > now.unix_timestamp());
        (fresh && stale != Some(token)).then_some(token)
    }
}

fn app_of(value: &SecretValue) -> Result<OAuth2App, DomainError> {
    let text = |key: &str| value.0.get(key).and_then(Value::as_str).map(str::to_owned);
    match (text("clientId"), text("clientSecret")) {
        (Some(client_id), Some(client_secret)) => Ok(OAuth2App { client_id, client_secret }),
        _ => Err(DomainError::Unexpected(anyhow::anyhow!("the stored OAuth2 credentials have no client id or secret"))),
    }
}

fn scopes_of(value: &SecretValue) -> Vec<String> {
    value.0.get("scopes").and_then(|s| serde_json::from_value(s.clone()).ok()).unwrap_or_default()
}

/// A field of the callback that is absent or does not parse (400).
fn bad_callback(field: &str, message: &str) -> DomainError {
    DomainError::Validation(vec![FieldViolation::new(field, ViolationKind::WrongType, message)])
}

impl ConnectionService {
    fn oauth2_support(&self) -> Result<&OAuth2Support, DomainError> {
        self.oauth2.as_deref().ok_or_else(|| {
            DomainError::Conflict("OAuth2 connections cannot obtain tokens: no OAuth2 token client is configured".to_owned())
        })
    }

    async fn endpoints(&self, integration: &Integration) -> Result<Endpoints, DomainError> {
        if let Some(definition) = &integration.custom_definition {
            return Ok(match &definition.auth {
                CustomAuth::Oauth2ClientCredentials { token_url, scopes } => {
                    Endpoints { authorization_url: None, token_url: Some(token_url.clone()), default_scopes: scopes.clone() }
                }
                _ => Endpoints { authorization_url: None, token_url: None, default_scopes: Vec::new() },
            });
        }
        let spec = self.providers.get(&integration.provider_id).await?.value.spec;
        Ok(Endpoints { authorization_url: spec.authorization_url, token_url: spec.token_url, default_scopes: spec.default_scopes })
    }

    /// The token URL of an integration's provider or custom definition.
    async fn token_url(&self, tenant: &TenantId, integration: IntegrationId) -> Result<String, DomainError> {
        let parent = self.integrations.get(tenant, integration).await?;
        self.endpoints(&parent.value)
            .await?
            .token_url
            .ok_or_else(|| DomainError::Conflict("the integration's provider has no token URL".to_owned()))
    }

    /// Stores a new version of a connection's secret.
    pub(super) async fn put_secret(&self, connection: &Connection, value: Value) -> Result<SecretRef, DomainError> {
        let metadata = BTreeMap::from([
            ("integrationId".to_owned(), connection.integration_id.to_string()),
            ("authMode".to_owned(), connection.auth_mode.as_str().to_owned()),
        ]);
        let name = SecretName::new(&connection.tenant_id, SECRET_KIND, &connection.id.to_string());
        self.secrets.put(&name, &SecretValue(value), &metadata).await
    }

    /// Checks a request to start an authorization, writing nothing.
    ///
    /// # Errors
    /// `NotFound` for an unknown integration; `Validation` listing every offending field.
    pub async fn check_authorization(&self, caller: &Caller, integration: IntegrationId, spec: &AuthorizeSpec) -> Result<(), DomainError> {
        let support = self.oauth2_support()?;
        let parent = self.integrations.get(&caller.tenant_id, integration).await?;
        self.authorization_checks(support, &parent.value, spec).await.map(|_| ())
    }

    /// Every problem of `spec` for `integration`; else the provider's authorization URL and endpoints.
    async fn authorization_checks(
        &self,
        support: &OAuth2Support,
        integration: &Integration,
        spec: &AuthorizeSpec,
    ) -> Result<(String, Endpoints), DomainError> {
        let mut v = Violations::new();
        v.check("name", validate_text(&spec.name, 1, MAX_NAME_CHARS));
        if let Some(scopes) = &spec.scopes {
            check_scopes(&mut v, "scopes", scopes);
        }
        if let Some(url) = &spec.return_url {
            v.check("returnUrl", validate_redirect_url(url, support.settings.allow_http_return_url));
        }
        if integration.oauth2_app.is_none() {
            v.invalid("oauth2App", "the integration has no OAuth app: set oauth2App (clientId, clientSecret) on the integration first");
        }
        let options = self.options(integration).await?;
        let endpoints = self.endpoints(integration).await?;
        let authorization_url = match (&endpoints.authorization_url, endpoints.token_url.is_some()) {
            (Some(url), true) if options.modes.contains(&AuthMode::Oauth2AuthorizationCode) => url.clone(),
            _ => {
                v.invalid("integrationId", "the integration's provider does not support oauth2_authorization_code");
                String::new()
            }
        };
        v.finish(|| (authorization_url, endpoints))
    }

    /// Starts an authorization code flow: creates the connection `pending_authorization` with
    /// the app in its secret and returns the URL the user opens (state and S256 challenge in it).
    ///
    /// # Errors
    /// `Forbidden` without the member role; `NotFound` for an unknown integration; `Validation`
    /// for the body's values (a provider without `oauth2_authorization_code` among them);
    /// `Conflict` when `oauth2.redirect_url` is not configured.
    pub async fn start_authorization(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        spec: AuthorizeSpec,
    ) -> Result<StartedAuthorization, DomainError> {
        let result = self.start_authorization_unaudited(caller, integration, spec).await;
        self.audit
            .result(caller, AuditResource::Connection, AuditAction::Create, None, &result, |s| {
                (
                    s.connection.value.id.to_string(),
                    json!({ "integrationId": integration.to_string(), "authMode": "oauth2_authorization_code" }),
                )
            })
            .await;
        result
    }

    async fn start_authorization_unaudited(
        &self,
        caller: &Caller,
        integration: IntegrationId,
        spec: AuthorizeSpec,
    ) -> Result<StartedAuthorization, DomainError> {
        caller.require(Role::Member)?;
        let support = self.oauth2_support()?;
        let parent = self.integrations.get(&caller.tenant_id, integration).await?;
        let (authorization_url, endpoints) = self.authorization_checks(support, &parent.value, &spec).await?;
        if support.settings.redirect_url.is_empty() {
            return Err(DomainError::Conflict("OAuth2 authorizations need oauth2.redirect_url in the configuration".to_owned()));
        }
        let scopes = spec.scopes.clone().unwrap_or(endpoints.default_scopes);
        let hints = CredentialHints { last_four: None, scopes: scopes.clone(), token_expires_at: None };
        let mut connection = self.new_connection(
            caller,
            integration,
            spec.name.clone(),
            AuthMode::Oauth2AuthorizationCode,
            ConnectionStatus::PendingAuthorization,
            hints,
        );
        let now = connection.created_at;
        let nonce = new_nonce()?;
        let state = AuthorizationState {
            tenant: caller.tenant_id.to_string(),
            integration: integration.to_string(),
            connection: connection.id.to_string(),
            user: caller.user_id.to_string(),
            nonce: nonce.clone(),
            expires_at: (now + support.settings.state_ttl).unix_timestamp(),
        };
        let signed = support.key.sign(&state);
        let verifier = support.key.pkce_verifier(&nonce);
        // Checked above: the integration has an app.
        let client_id = parent.value.oauth2_app.as_ref().map(|app| app.client_id.clone()).unwrap_or_default();
        let url = support.client.authorization_url(&AuthorizationRequest {
            client_id: &client_id,
            authorization_url: &authorization_url,
            redirect_url: &support.settings.redirect_url,
            scopes: &scopes,
            state: &signed,
            pkce_verifier: &verifier,
        })?;
        let secret = json!({
            "scopes": scopes,
            "pending": { "nonceHash": nonce_hash(&nonce), "returnUrl": spec.return_url },
        });
        connection.credentials = Some(self.put_secret(&connection, secret).await?);
        Ok(StartedAuthorization { connection: self.insert(connection).await?, authorization_url: url })
    }

    /// Completes an authorization: checks the state (signature, expiry, single use), exchanges
    /// the code with the PKCE verifier, stores the tokens and makes the connection `active`. A
    /// provider error, an expired state or a refused exchange marks the connection with the
    /// reason (and publishes `integration.connection.failed`); nothing is stored half.
    ///
    /// # Errors
    /// `Validation` (400) for a missing, malformed or forged state or a missing code; `Validation`
    /// on `state` (422) for an expired one; `Conflict` for a state already used, an authorization
    /// the user or provider refused, or a code the token endpoint refused; `Unavailable` when the
    /// token endpoint or the secret store cannot be reached.
    pub async fn complete_authorization(&self, params: CallbackParams) -> Result<CallbackOutcome, DomainError> {
        let support = self.oauth2_support()?;
        let token = params.state.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| bad_callback("state", "is required"))?;
        let state = support.key.verify(token).ok_or_else(|| bad_callback("state", "is not a state this service issued"))?;
        let parse = || -> Option<(TenantId, IntegrationId, ConnectionId, UserId)> {
            Some((
                TenantId::new(&state.tenant).ok()?,
                IntegrationId::parse(&state.integration)?,
                ConnectionId::parse(&state.connection)?,
                UserId::new(&state.user).ok()?,
            ))
        };
        let (tenant, integration, id, user) = parse().ok_or_else(|| bad_callback("state", "is not a state this service issued"))?;
        let caller = Caller::new(tenant.clone(), user, vec![Role::Member]);
        let result = self.complete_checked(support, &caller, integration, id, &state, params).await;
        self.audit
            .result(&caller, AuditResource::Connection, AuditAction::Update, Some(id.to_string()), &result, |_| {
                (String::new(), json!({ "integrationId": integration.to_string(), "authorization": "completed" }))
            })
            .await;
        result
    }

    async fn complete_checked(
        &self,
        support: &OAuth2Support,
        caller: &Caller,
        integration: IntegrationId,
        id: ConnectionId,
        state: &AuthorizationState,
        params: CallbackParams,
    ) -> Result<CallbackOutcome, DomainError> {
        let current = self.connections.get(&caller.tenant_id, integration, id).await?;
        let used = || DomainError::Conflict("this authorization was already completed or abandoned; start a new one".to_owned());
        if current.value.status != ConnectionStatus::PendingAuthorization {
            return Err(used());
        }
        let reference = current.value.credentials.clone().ok_or_else(used)?;
        let secret = self.secrets.get(&reference).await?;
        let pending = secret.0.get("pending").ok_or_else(used)?;
        if pending.get("nonceHash").and_then(Value::as_str) != Some(nonce_hash(&state.nonce).as_str()) {
            return Err(used());
        }
        let return_url = pending.get("returnUrl").and_then(Value::as_str).map(str::to_owned);
        if state.expires_at <= self.clock.now().unix_timestamp() {
            let reason = format!("the authorization was not completed within {}", HumanDuration(support.settings.state_ttl));
            self.fail_authorization(caller, &current, ConnectionStatus::Expired, &reason).await?;
            return Err(DomainError::invalid("state", "has expired; start a new authorization"));
        }
        if let Some(error) = params.error.as_deref() {
            let code: String = error.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
            let status = if code == "access_denied" { ConnectionStatus::Revoked } else { ConnectionStatus::Error };
            let reason = format!("the provider refused the authorization ({code})");
            self.fail_authorization(caller, &current, status, &reason).await?;
            return Err(DomainError::Conflict(reason));
        }
        let code = params.code.as_deref().filter(|c| !c.is_empty()).ok_or_else(|| bad_callback("code", "is required"))?;
        let token_url = self.token_url(&caller.tenant_id, integration).await?;
        let app = self.app_for(caller, &current.value, &secret).await?;
        let verifier = support.key.pkce_verifier(&state.nonce);
        let grant = match support.client.exchange_code(&app, &token_url, &support.settings.redirect_url, code, &verifier).await {
            Ok(grant) => grant,
            Err(e) => {
                let reason = match &e {
                    DomainError::Conflict(reason) => format!("the token endpoint refused the authorization code: {reason}"),
                    _ => "the token endpoint could not be reached to exchange the authorization code".to_owned(),
                };
                self.fail_authorization(caller, &current, ConnectionStatus::Error, &reason).await?;
                return Err(match e {
                    DomainError::Conflict(_) => DomainError::Conflict(reason),
                    other => other,
                });
            }
        };
        let now = self.clock.now();
        let mut value = secret.0.as_object().cloned().unwrap_or_default();
        value.remove("pending");
        let scopes = apply_grant(&mut value, &grant, now);
        let reference = self.put_secret(&current.value, Value::Object(value)).await?;
        let connection = Connection {
            status: ConnectionStatus::Active,
            status_reason: None,
            hints: CredentialHints { last_four: None, scopes, token_expires_at: expiry(&grant, now) },
            credentials: Some(reference),
            refresh_lease: None,
            updated_at: now,
            updated_by: caller.user_id.clone(),
            ..current.value.clone()
        };
        match self.connections.replace(&connection, Some(current.etag.clone()), &[]).await {
            Ok(etag) => {
                self.prune_superseded(&connection).await;
                Ok(CallbackOutcome { connection: Stored { value: connection, etag }, return_url })
            }
            // Another callback with the same state got there first.
            Err(DomainError::PreconditionFailed) => Err(used()),
            Err(e) => Err(e),
        }
    }

    /// The OAuth app to ask the token endpoint with for `connection`: a client-credentials
    /// connection's own; otherwise its integration's (the client secret read from the secret
    /// store, an audit record), or, for a connection authorized while apps were given with each
    /// authorization, the app in its secret while the integration has none.
    ///
    /// # Errors
    /// `Conflict` when there is no app; `Unavailable` when the secret store cannot be reached.
    pub(super) async fn app_for(&self, caller: &Caller, connection: &Connection, secret: &SecretValue) -> Result<OAuth2App, DomainError> {
        if connection.auth_mode == AuthMode::Oauth2ClientCredentials {
            return app_of(secret);
        }
        let mut missing: Option<SecretRef> = None;
        loop {
            let parent = self.integrations.get(&connection.tenant_id, connection.integration_id).await?;
            let Some(app) = parent.value.oauth2_app else {
                return app_of(secret).map_err(|_| {
                    DomainError::Conflict("the integration has no OAuth app (oauth2App); set it on the integration".to_owned())
                });
            };
            match self.secrets.get(&app.client_secret).await {
                Ok(value) => {
                    let read = Ok::<_, DomainError>(());
                    self.audit
                        .result(
                            caller,
                            AuditResource::Integration,
                            AuditAction::UseCredentials,
                            Some(connection.integration_id.to_string()),
                            &read,
                            |_| (String::new(), json!({ "secret": "oauth2App.clientSecret", "connectionId": connection.id.to_string() })),
                        )
                        .await;
                    let client_secret = value
                        .0
                        .get("clientSecret")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| DomainError::Unexpected(anyhow::anyhow!("the stored OAuth app secret has no client secret")))?;
                    return Ok(OAuth2App { client_id: app.client_id, client_secret });
                }
                // Replaced (and the old version pruned) since the integration was read: read it
                // again, once per reference.
                Err(DomainError::NotFound { .. }) if missing.as_ref() != Some(&app.client_secret) => {
                    missing = Some(app.client_secret);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes the versions of a connection's secret before the one it now references (best
    /// effort: a failed prune is made up for by the next one, or by the connection's deletion).
    pub(super) async fn prune_superseded(&self, connection: &Connection) {
        if let Some(current) = &connection.credentials {
            let _ = self.secrets.prune(current).await;
        }
    }

    /// Marks a pending authorization failed (conditionally: a concurrent completion wins).
    async fn fail_authorization(
        &self,
        caller: &Caller,
        current: &Stored<Connection>,
        status: ConnectionStatus,
        reason: &str,
    ) -> Result<(), DomainError> {
        let connection = Connection {
            status,
            status_reason: Some(reason.to_owned()),
            updated_at: self.clock.now(),
            updated_by: caller.user_id.clone(),
            ..current.value.clone()
        };
        let event = self.event(EventType::ConnectionFailed, &connection)?;
        match self.connections.replace(&connection, Some(current.etag.clone()), &[event]).await {
            Ok(_) | Err(DomainError::PreconditionFailed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Writes a grant's tokens into a connection secret; returns the scopes it now has.
fn apply_grant(value: &mut Map<String, Value>, grant: &TokenGrant, now: OffsetDateTime) -> Vec<String> {
    value.insert("accessToken".into(), Value::String(grant.access_token.clone()));
    if let Some(refresh) = &grant.refresh_token {
        value.insert("refreshToken".into(), Value::String(refresh.clone()));
    }
    match expiry(grant, now) {
        Some(at) => value.insert("expiresAt".into(), json!(at.unix_timestamp())),
        None => value.remove("expiresAt"),
    };
    if let Some(scopes) = &grant.scopes {
        value.insert("scopes".into(), json!(scopes));
    }
    scopes_of(&SecretValue(Value::Object(value.clone())))
}

fn expiry(grant: &TokenGrant, now: OffsetDateTime) -> Option<OffsetDateTime> {
    grant.expires_in.map(|d| now + d)
}

impl ConnectionCredentials {
    /// A token of this OAuth2 connection good for at least the refresh skew and other than
    /// `stale`, refreshing it (under the connection's lease) when needed.
    pub(super) async fn oauth2_token(&self, stale: Option<&str>) -> Result<String, DomainError> {
        let service = &self.service;
        let support = service.oauth2_support()?;
        let settings = &support.settings;
        let give_up = service.clock.now() + settings.refresh_lease + Duration::from_secs(5);
        loop {
            let now = service.clock.now();
            if now > give_up {
                return Err(DomainError::Unavailable {
                    reason: format!("connection '{}': another instance is still refreshing its token", self.id),
                    retry_after: Some(Duration::from_secs(5)),
                });
            }
            let (stored, secret) = self.read_current().await?;
            let tokens = Tokens::read(&secret);
            if let Some(token) = tokens.usable(now, settings.refresh_skew, stale) {
                return Ok(token.to_owned());
            }
            if stored.value.refresh_lease.as_ref().is_some_and(|lease| lease.until > now) {
                support.client.pause(settings.refresh_poll).await;
                continue;
            }
            let owner = service.ids.new_uuid().to_string();
            let leased =
                Connection { refresh_lease: Some(RefreshLease { owner, until: now + settings.refresh_lease }), ..stored.value.clone() };
            match service.connections.replace(&leased, Some(stored.etag.clone()), &[]).await {
                Ok(etag) => return self.refresh_leased(support, Stored { value: leased, etag }, secret, tokens).await,
                // Another caller changed the connection (took the lease, most likely): look again.
                Err(DomainError::PreconditionFailed) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Gets a new token while holding the lease, stores it and releases the lease in one write.
    async fn refresh_leased(
        &self,
        support: &OAuth2Support,
        leased: Stored<Connection>,
        secret: SecretValue,
        tokens: Tokens,
    ) -> Result<String, DomainError> {
        let service = &self.service;
        let connection = &leased.value;
        let outcome = async {
            let token_url = service.token_url(&self.tenant, self.integration).await?;
            let app = service.app_for(&self.caller, connection, &secret).await?;
            match (connection.auth_mode, tokens.refresh_token.as_deref()) {
                (AuthMode::Oauth2ClientCredentials, _) => support.client.client_credentials(&app, &token_url, &scopes_of(&secret)).await,
                (_, Some(refresh)) => support.client.refresh(&app, &token_url, refresh).await,
                (_, None) => Err(DomainError::Conflict("the access token expired and the provider issued no refresh token".to_owned())),
            }
        }
        .await;
        let now = service.clock.now();
        match outcome {
            Ok(grant) => {
                let mut value = secret.0.as_object().cloned().unwrap_or_default();
                let scopes = apply_grant(&mut value, &grant, now);
                let reference = match service.put_secret(connection, Value::Object(value)).await {
                    Ok(reference) => reference,
                    Err(e) => {
                        self.release(&leased).await;
                        return Err(e);
                    }
                };
                let hints = CredentialHints { scopes, token_expires_at: expiry(&grant, now), ..connection.hints.clone() };
                let updated =
                    Connection { credentials: Some(reference), hints, refresh_lease: None, updated_at: now, ..connection.clone() };
                match service.connections.replace(&updated, Some(leased.etag.clone()), &[]).await {
                    // The connection references the new version: the older ones go.
                    Ok(_) => {
                        service.prune_superseded(&updated).await;
                        Ok(grant.access_token)
                    }
                    // Changed meanwhile (new credentials, deleted): the caller uses this token once;
                    // the next call reads whatever is current.
                    Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => Ok(grant.access_token),
                    Err(e) => Err(e),
                }
            }
            Err(DomainError::Conflict(reason)) => {
                let reason: String = format!("token refresh refused: {reason}").chars().take(crate::connection::MAX_REASON_CHARS).collect();
                let failed = Connection {
                    status: ConnectionStatus::RefreshFailed,
                    status_reason: Some(reason.clone()),
                    refresh_lease: None,
                    updated_at: now,
                    ..connection.clone()
                };
                let event = service.event(EventType::ConnectionFailed, &failed)?;
                match service.connections.replace(&failed, Some(leased.etag.clone()), &[event]).await {
                    Ok(_) | Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                Err(DomainError::Conflict(format!("connection '{}' cannot authenticate: {reason}", self.id)))
            }
            Err(e) => {
                self.release(&leased).await;
                Err(e)
            }
        }
    }

    /// Gives a lease back after a refresh that may succeed later (best effort: it lapses anyway).
    async fn release(&self, leased: &Stored<Connection>) {
        let released = Connection { refresh_lease: None, ..leased.value.clone() };
        let _ = self.service.connections.replace(&released, Some(leased.etag.clone()), &[]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_used_until_it_expires_within_the_skew_and_never_when_stale() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let skew = Duration::from_secs(60);
        let tokens = |expires_at: Option<i64>| Tokens { access_token: Some("a".into()), refresh_token: None, expires_at };
        assert_eq!(tokens(Some(now.unix_timestamp() + 61)).usable(now, skew, None), Some("a"));
        assert_eq!(tokens(Some(now.unix_timestamp() + 60)).usable(now, skew, None), None, "within the skew");
        assert_eq!(tokens(None).usable(now, skew, None), Some("a"), "no expiry given: used until refused");
        assert_eq!(tokens(None).usable(now, skew, Some("a")), None, "the provider refused it");
        assert_eq!(tokens(None).usable(now, skew, Some("older")), Some("a"), "another caller refreshed it already");
        let none = Tokens { access_token: None, refresh_token: None, expires_at: None };
        assert_eq!(none.usable(now, skew, None), None);
    }

    #[test]
    fn a_grant_replaces_the_tokens_and_keeps_a_refresh_token_it_does_not_rotate() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let mut value = json!({"clientId": "c", "refreshToken": "r1", "scopes": ["a"]}).as_object().cloned().expect("object");
        let grant =
            TokenGrant { access_token: "t2".into(), refresh_token: None, expires_in: Some(Duration::from_secs(3600)), scopes: None };
        assert_eq!(apply_grant(&mut value, &grant, now), vec!["a".to_owned()]);
        let tokens = Tokens::read(&SecretValue(Value::Object(value.clone())));
        assert_eq!(tokens.access_token.as_deref(), Some("t2"));
        assert_eq!(tokens.refresh_token.as_deref(), Some("r1"));
        assert_eq!(tokens.expires_at, Some(now.unix_timestamp() + 3600));
        let rotated =
            TokenGrant { access_token: "t3".into(), refresh_token: Some("r2".into()), expires_in: None, scopes: Some(vec!["b".into()]) };
        assert_eq!(apply_grant(&mut value, &rotated, now), vec!["b".to_owned()]);
        let tokens = Tokens::read(&SecretValue(Value::Object(value)));
        assert_eq!((tokens.refresh_token.as_deref(), tokens.expires_at), (Some("r2"), None));
    }
}
