use std::sync::Arc;

use serde_json::Value;

use crate::audit::{Audit, AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::cache::{self, BoundedCache};
use crate::common::{Clock, ETag, IdGenerator, IntegrationId, JsonText, Page, PageRequest, Stored, TextPage};
use crate::connection::ConnectionRepository;
use crate::error::{DomainError, Violations};
use crate::events::payloads::IntegrationEventData;
use crate::events::{DomainEvent, EventData, EventType};
use crate::integration::{Integration, IntegrationFilter, IntegrationOAuth2App, IntegrationSpec, IntegrationStatus, OAuth2AppSpec};
use crate::ports::{IntegrationRepository, ProviderRepository};
use crate::provider::{Provider, ProviderId};
use crate::schema::{compile_config_schema, validate_against};
use crate::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use crate::webhooks::endpoint::UrlPolicy;

use super::{matching, read_modify_write};

/// Compiled config schemas by provider id, with the provider version they were compiled from.
type ValidatorCache = BoundedCache<ProviderId, (ETag, Arc<jsonschema::Validator>)>;
/// Providers whose compiled config schema is kept in memory.
const VALIDATOR_CACHE_CAPACITY: usize = 1024;
/// Writes of a create tried while its provider changes under it.
const PROVIDER_CHANGED_ATTEMPTS: u32 = 3;

/// The secret-name kind of an integration's OAuth app: `integration-manager/{tenant}/oauth2-app/{id}`.
pub const OAUTH2_APP_SECRET_KIND: &str = "oauth2-app";

/// The secret name of an integration's OAuth app client secret (one name, a version per secret).
pub fn oauth2_app_secret_name(integration: &Integration) -> SecretName {
    SecretName::new(&integration.tenant_id, OAUTH2_APP_SECRET_KIND, &integration.id.to_string())
}

/// Creates, reads, changes and deletes a tenant's integrations.
#[derive(Clone)]
pub struct IntegrationService {
    integrations: Arc<dyn IntegrationRepository>,
    providers: Arc<dyn ProviderRepository>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    /// Compiled config schemas by provider, valid for the provider version (etag) they came from.
    validators: Arc<ValidatorCache>,
    audit: Audit,
    /// Connections of integrations: an integration that has some is not deleted.
    connections: Option<Arc<dyn ConnectionRepository>>,
    /// Which URLs custom definitions may name: the policy of every provider request.
    url_policy: UrlPolicy,
    /// Where OAuth app client secrets are kept; `None`: an `oauth2App` is refused.
    secrets: Option<Arc<dyn SecretStore>>,
}

impl std::fmt::Debug for IntegrationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntegrationService").finish_non_exhaustive()
    }
}

impl IntegrationService {
    pub fn new(
        integrations: Arc<dyn IntegrationRepository>,
        providers: Arc<dyn ProviderRepository>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        audit: Audit,
    ) -> Self {
        Self {
            integrations,
            providers,
            clock,
            ids,
            validators: Arc::new(cache::bounded(VALIDATOR_CACHE_CAPACITY)),
            audit,
            connections: None,
            url_policy: UrlPolicy::default(),
            secrets: None,
        }
    }

    /// Keeps the client secrets of integrations' OAuth apps in `secrets` (the store of
    /// connection credentials).
    #[must_use]
    pub fn with_secrets(mut self, secrets: Arc<dyn SecretStore>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Refuses to delete an integration that still has connections (their credentials would be
    /// orphaned in the secret store).
    #[must_use]
    pub fn with_connections(mut self, connections: Arc<dyn ConnectionRepository>) -> Self {
        self.connections = Some(connections);
        self
    }

    /// Judges the URLs of custom definitions with the destination policy of every provider
    /// request (`webhooks.allow_http`, `webhooks.allowed_private_cidrs`), so a definition is
    /// refused at creation exactly where its requests would be refused.
    #[must_use]
    pub fn with_url_policy(mut self, policy: UrlPolicy) -> Self {
        self.url_policy = policy;
        self
    }

    /// Validates every rule of a spec, including those that need its provider. `stored` is the
    /// integration's OAuth app now: `Some(None)` on create, `None` when unknown (a check before
    /// the integration is read, which cannot tell whether an omitted client secret may be kept).
    /// Returns the provider version the config was checked against (`None` for a custom
    /// integration). With `trust_cache`, a config schema compiled earlier is used without
    /// reading the provider's current version: the caller then has the store check that
    /// version in the write.
    async fn validate(
        &self,
        spec: &mut IntegrationSpec,
        previous_status: Option<IntegrationStatus>,
        stored: Option<Option<&IntegrationOAuth2App>>,
        trust_cache: bool,
    ) -> Result<Option<ETag>, DomainError> {
        let mut v = spec.violations(previous_status, &self.url_policy);
        if let Some(app) = &spec.oauth2_app {
            if self.secrets.is_none() {
                v.invalid("oauth2App", "cannot be kept: no secret store is configured");
            }
            app.check(&mut v, stored);
        }
        let version = self.check_config(&spec.provider_id, &mut spec.config, &mut v, trust_cache).await?;
        v.finish(|| version)
    }

    /// Checks `config` against the config schema of the provider (none for a custom
    /// integration), adding what it breaks to `v`; returns the provider version checked against.
    /// `config` is lent to the check as a JSON value, and is as it was when the check returns.
    async fn check_config(
        &self,
        provider: &ProviderId,
        config: &mut serde_json::Map<String, Value>,
        v: &mut Violations,
        trust_cache: bool,
    ) -> Result<Option<ETag>, DomainError> {
        if provider.is_custom() {
            return Ok(None);
        }
        match self.config_validator(provider, trust_cache).await {
            Ok((version, validator)) => {
                // Moved into a value and back rather than copied (no await in between).
                let lent = Value::Object(std::mem::take(config));
                // The short-circuiting check first: most configs are valid.
                if !validator.is_valid(&lent)
                    && let Err(violations) = validate_against(&validator, &lent, "config")
                {
                    violations.into_iter().for_each(|violation| v.push(violation));
                }
                if let Value::Object(map) = lent {
                    *config = map;
                }
                Ok(Some(version))
            }
            Err(DomainError::NotFound { .. }) => {
                v.invalid("providerId", format!("no provider '{provider}' in the catalog"));
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    /// Checks, before a change is even read, that the caller may make it (members and admins).
    ///
    /// # Errors
    /// `Forbidden`, recorded in the audit log.
    pub async fn authorize(&self, caller: &Caller, action: AuditAction) -> Result<(), DomainError> {
        self.audit.require(caller, Role::Member, AuditResource::Integration, action).await
    }

    /// Checks a spec as `create` would, writing nothing (the API merges these findings with
    /// its own when a body is refused).
    ///
    /// # Errors
    /// `Validation` listing every offending field; `Unavailable` when the catalog cannot be read.
    pub async fn check(&self, spec: &IntegrationSpec) -> Result<(), DomainError> {
        self.validate(&mut spec.clone(), None, None, false).await.map(|_| ())
    }

    fn secret_store(&self) -> Result<&Arc<dyn SecretStore>, DomainError> {
        self.secrets.as_ref().ok_or_else(|| DomainError::invalid("oauth2App", "cannot be kept: no secret store is configured"))
    }

    /// Writes a new version of the integration's OAuth app secret when `spec` carries one.
    async fn write_app_secret(&self, integration: &Integration, spec: &OAuth2AppSpec) -> Result<Option<IntegrationOAuth2App>, DomainError> {
        let Some(secret) = &spec.client_secret else { return Ok(None) };
        let metadata = std::collections::BTreeMap::from([
            ("integrationId".to_owned(), integration.id.to_string()),
            ("kind".to_owned(), "oauth2-client-secret".to_owned()),
        ]);
        let value = SecretValue(serde_json::json!({ "clientSecret": secret }));
        let reference = self.secret_store()?.put(&oauth2_app_secret_name(integration), &value, &metadata).await?;
        Ok(Some(IntegrationOAuth2App {
            client_id: spec.client_id.clone(),
            client_secret_hint: crate::connection::last_four(secret),
            client_secret: reference,
        }))
    }

    /// Deletes the app secret versions the integration no longer references (best effort: a
    /// failed prune is made up for by the next one, or by the integration's deletion).
    async fn prune_app_secret(&self, current: &SecretRef) {
        if let Some(secrets) = &self.secrets {
            let _ = secrets.prune(current).await;
        }
    }

    /// Audit details of a write: whether an OAuth app client secret was written (never its value).
    fn app_details(written: bool, integration: &Integration) -> Value {
        match &integration.oauth2_app {
            Some(app) => {
                serde_json::json!({ "oauth2App": { "clientId": app.client_id, "clientSecret": if written { "written" } else { "kept" } } })
            }
            None => Value::Null,
        }
    }

    /// # Errors
    /// `Forbidden` without the member role; `Validation` listing every offending field
    /// (unknown provider, config breaking the provider's schema, invalid custom definition).
    pub fn create<'a>(
        &'a self,
        caller: &'a Caller,
        spec: IntegrationSpec,
    ) -> impl Future<Output = Result<Stored<Integration>, DomainError>> + Send + 'a {
        let created = self.create_json(caller, spec);
        async move { created.await.map(|(stored, _)| stored) }
    }

    /// [`IntegrationService::create`], with the integration's JSON text ([`JsonText::encode`]),
    /// for a caller that passes it on: it is the text the store wrote.
    ///
    /// # Errors
    /// As `create`.
    pub fn create_json<'a>(
        &'a self,
        caller: &'a Caller,
        spec: IntegrationSpec,
    ) -> impl Future<Output = Result<(Stored<Integration>, JsonText<Integration>), DomainError>> + Send + 'a {
        // Boxed, here and in `create_unaudited` (and not an `async fn`, whose future would keep
        // a slot for `spec`), so that no future of a create, the handler's included, is larger
        // than what the allocator's per-thread cache serves (1,032 bytes for glibc): a create's
        // one future of 2,960 bytes took the allocator's slow path (with `malloc_consolidate`)
        // at every request.
        let unaudited = Box::pin(self.create_unaudited(caller, spec));
        async move {
            let result = unaudited.await;
            Box::pin(self.audit.result(caller, AuditResource::Integration, AuditAction::Create, None, &result, |(s, _)| {
                (s.value.id.to_string(), Self::app_details(true, &s.value))
            }))
            .await;
            result
        }
    }

    async fn create_unaudited(
        &self,
        caller: &Caller,
        mut spec: IntegrationSpec,
    ) -> Result<(Stored<Integration>, JsonText<Integration>), DomainError> {
        caller.require(Role::Member)?;
        // A store that checks the provider's version in the write lets the config be checked
        // with the schema compiled last, unread: a version changed since is caught by the write.
        let in_write = self.integrations.checks_provider_in_write();
        let version = match Box::pin(self.validate(&mut spec, None, Some(None), in_write)).await {
            // Refused by a schema compiled earlier: judged by the provider's current version.
            Err(DomainError::Validation(_)) if in_write => Box::pin(self.validate(&mut spec, None, Some(None), false)).await?,
            other => other?,
        };
        let IntegrationSpec { provider_id, name, description, status, config, custom_definition, oauth2_app } = spec;
        let now = self.clock.now();
        let integration = Integration {
            id: IntegrationId(self.ids.new_uuid()),
            tenant_id: caller.tenant_id.clone(),
            provider_id,
            name,
            description,
            status: status.unwrap_or(IntegrationStatus::Active),
            config,
            custom_definition,
            oauth2_app: None,
            created_at: now,
            updated_at: now,
            created_by: caller.user_id.clone(),
            updated_by: caller.user_id.clone(),
        };
        // In a future of its own: this one keeps a slot for `spec` (see `create`).
        Box::pin(self.write_created(integration, oauth2_app, version, in_write)).await
    }

    /// Writes the integration `create_unaudited` made of a spec checked against the provider's
    /// `version`, with its OAuth app's secret, if any. (Not an `async fn`: its future would
    /// keep the arguments twice, the integration's 500 bytes among them.)
    #[allow(clippy::manual_async_fn)]
    fn write_created(
        &self,
        mut integration: Integration,
        app: Option<OAuth2AppSpec>,
        mut version: Option<ETag>,
        in_write: bool,
    ) -> impl Future<Output = Result<(Stored<Integration>, JsonText<Integration>), DomainError>> + Send + '_ {
        async move {
            if let Some(app) = &app {
                integration.oauth2_app = Box::pin(self.write_app_secret(&integration, app)).await?;
            }
            // The event's data and the integration's text, written out once when they are the
            // same: the store writes the text as is, and the answer is made of it.
            let (data, text) = IntegrationEventData::with_text(&integration)?;
            let event = self.event_with(EventType::IntegrationCreated, &integration, data);
            let mut attempt = 1;
            let written = loop {
                let checked = if in_write { &version } else { &None };
                match self.integrations.create_encoded(&integration, &text, checked, std::slice::from_ref(&event)).await {
                    // The provider changed since its schema was compiled: check the config against
                    // its current version (read now), then write again.
                    Err(DomainError::PreconditionFailed) if attempt < PROVIDER_CHANGED_ATTEMPTS => {
                        attempt += 1;
                        let mut v = Violations::new();
                        version = Box::pin(self.check_config(&integration.provider_id, &mut integration.config, &mut v, false)).await?;
                        if let Err(e) = v.finish(|| ()) {
                            break Err(e);
                        }
                    }
                    Err(DomainError::PreconditionFailed) => {
                        break Err(DomainError::Conflict(format!(
                            "provider '{}' kept changing while the integration was created; try again",
                            integration.provider_id
                        )));
                    }
                    other => break other,
                }
            };
            match written {
                Ok(etag) => Ok((Stored { value: integration, etag }, text)),
                Err(e) => {
                    // Nothing references the secret just written.
                    if integration.oauth2_app.is_some()
                        && let Some(secrets) = &self.secrets
                    {
                        let _ = secrets.delete(&oauth2_app_secret_name(&integration)).await;
                    }
                    Err(e)
                }
            }
        }
    }

    /// # Errors
    /// `NotFound` when the caller's tenant has no such integration.
    pub async fn get(&self, caller: &Caller, id: IntegrationId) -> Result<Stored<Integration>, DomainError> {
        caller.require(Role::Viewer)?;
        self.integrations.get(&caller.tenant_id, id).await
    }

    pub async fn list(
        &self,
        caller: &Caller,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Integration>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.integrations.list(&caller.tenant_id, filter, page).await
    }

    /// [`IntegrationService::get`], as the integration's JSON text (for readers that only pass
    /// it on: the store may hand it out without decoding it).
    ///
    /// # Errors
    /// As `get`.
    pub async fn get_json(&self, caller: &Caller, id: IntegrationId) -> Result<Stored<JsonText<Integration>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.integrations.get_json(&caller.tenant_id, id).await
    }

    /// [`IntegrationService::list`], as the integrations' JSON texts.
    ///
    /// # Errors
    /// As `list`.
    pub async fn list_json(
        &self,
        caller: &Caller,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<TextPage<Integration>, DomainError> {
        caller.require(Role::Viewer)?;
        self.integrations.list_json(&caller.tenant_id, filter, page).await
    }

    /// Replaces the mutable fields of an integration. The provider cannot change.
    ///
    /// # Errors
    /// `NotFound`, `PreconditionFailed` when `if_match` is stale, `Validation` as for create.
    pub async fn update(
        &self,
        caller: &Caller,
        id: IntegrationId,
        spec: IntegrationSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Integration>, DomainError> {
        let written = spec.oauth2_app.as_ref().is_some_and(|app| app.client_secret.is_some());
        let result = self.update_unaudited(caller, id, spec, if_match).await;
        self.audit
            .result(caller, AuditResource::Integration, AuditAction::Update, Some(id.to_string()), &result, |s| {
                (String::new(), Self::app_details(written, &s.value))
            })
            .await;
        result
    }

    async fn update_unaudited(
        &self,
        caller: &Caller,
        id: IntegrationId,
        mut spec: IntegrationSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Integration>, DomainError> {
        caller.require(Role::Member)?;
        // A new client secret is written in each attempt, after the read the replace is
        // conditional on: a prune can only delete it when another writer replaced the document
        // since that read, and then this replace fails and the attempt is made again with a new
        // version. The versions it supersedes are pruned once the document references it. An
        // attempt that loses (or a process that dies) leaves a version nothing references, which
        // the next prune or the integration's deletion removes.
        let mut written: Option<IntegrationOAuth2App> = None;
        let updated = read_modify_write(if_match, async |token| {
            let current = self.integrations.get(&caller.tenant_id, id).await?;
            if spec.provider_id != current.value.provider_id {
                return Err(DomainError::invalid("providerId", "cannot be changed; create a new integration instead"));
            }
            if token.is_some_and(|t| *t != current.etag) {
                return Err(DomainError::PreconditionFailed);
            }
            self.validate(&mut spec, Some(current.value.status), Some(current.value.oauth2_app.as_ref()), false).await?;
            let oauth2_app = match &spec.oauth2_app {
                None => current.value.oauth2_app.clone(),
                Some(app) if app.client_secret.is_none() => current.value.oauth2_app.clone(),
                Some(app) => {
                    written = self.write_app_secret(&current.value, app).await?;
                    written.clone()
                }
            };
            let spec = spec.clone();
            let integration = Integration {
                name: spec.name,
                description: spec.description,
                status: spec.status.unwrap_or(current.value.status),
                config: spec.config,
                custom_definition: spec.custom_definition,
                oauth2_app,
                updated_at: self.clock.now(),
                updated_by: caller.user_id.clone(),
                ..current.value
            };
            let event = self.event(EventType::IntegrationUpdated, &integration)?;
            let etag = self.integrations.replace(&integration, Some(token.unwrap_or(&current.etag).clone()), &[event]).await?;
            Ok(Stored { value: integration, etag })
        })
        .await?;
        if let Some(app) = &written {
            self.prune_app_secret(&app.client_secret).await;
        }
        Ok(updated)
    }

    /// # Errors
    /// `NotFound`, `PreconditionFailed` when `if_match` is stale, `Conflict` while the
    /// integration has connections.
    pub async fn delete(&self, caller: &Caller, id: IntegrationId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        let result = self.delete_unaudited(caller, id, if_match).await;
        self.audit.of(caller, AuditResource::Integration, AuditAction::Delete, id, result).await
    }

    async fn delete_unaudited(&self, caller: &Caller, id: IntegrationId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        caller.require(Role::Member)?;
        let deleted = read_modify_write(if_match, async |token| {
            let current = matching(self.integrations.get(&caller.tenant_id, id).await?, token)?;
            if let Some(connections) = &self.connections
                && !connections.list(&caller.tenant_id, id, &PageRequest::first(1)).await?.items.is_empty()
            {
                return Err(DomainError::Conflict(
                    "the integration has connections; delete them first (DELETE .../connections/{connectionId})".to_owned(),
                ));
            }
            let event = self.event(EventType::IntegrationDeleted, &current.value)?;
            self.integrations.delete(&caller.tenant_id, id, Some(current.etag), &[event]).await?;
            Ok(current.value)
        })
        .await?;
        // The OAuth app's client secret goes with the integration (every version of it).
        if deleted.oauth2_app.is_some() {
            self.secret_store()?.delete(&oauth2_app_secret_name(&deleted)).await?;
        }
        Ok(())
    }

    /// An event about `integration`, carrying it as the API returns it.
    fn event(&self, event_type: EventType, integration: &Integration) -> Result<DomainEvent, DomainError> {
        Ok(self.event_with(event_type, integration, IntegrationEventData::data(integration)?))
    }

    /// An event about `integration` carrying `data`, its [`IntegrationEventData`].
    fn event_with(&self, event_type: EventType, integration: &Integration, data: EventData) -> DomainEvent {
        DomainEvent {
            id: self.ids.new_uuid(),
            event_type,
            tenant_id: integration.tenant_id.clone(),
            subject: integration.id.to_string(),
            time: self.clock.now(),
            data,
        }
    }
}

impl IntegrationService {
    /// The compiled config schema of a provider's current version, with that version: the
    /// provider is read (and its schema compiled) only when the version is not the one compiled
    /// last, so a change made through any instance is seen at once. With `trust_cache`, the
    /// schema compiled last is returned without reading the current version (the write that
    /// follows checks it).
    ///
    /// # Errors
    /// `NotFound` when there is no such provider.
    async fn config_validator(&self, id: &ProviderId, trust_cache: bool) -> Result<(ETag, Arc<jsonschema::Validator>), DomainError> {
        if trust_cache {
            if let Some(cached) = self.validators.get(id) {
                return Ok(cached);
            }
        } else {
            let current = self.providers.etag(id).await?;
            if let Some((etag, validator)) = self.validators.get(id)
                && etag == current
            {
                return Ok((etag, validator));
            }
        }
        let provider = self.providers.get(id).await?;
        Ok((provider.etag.clone(), self.validator(&provider)?))
    }

    /// The compiled config schema of a provider version, compiled once per version.
    fn validator(&self, provider: &Stored<Provider>) -> Result<Arc<jsonschema::Validator>, DomainError> {
        let id = &provider.value.spec.id;
        if let Some((etag, validator)) = self.validators.get(id)
            && etag == provider.etag
        {
            return Ok(validator);
        }
        // The schema was validated when the provider was written; a stored schema that no longer
        // compiles is a defect of the catalog, not of the caller's input.
        let validator =
            Arc::new(compile_config_schema(&provider.value.spec.config_schema).map_err(|e| {
                DomainError::Unexpected(anyhow::anyhow!("stored config schema of provider '{id}' does not compile: {e:?}"))
            })?);
        self.validators.insert(id.clone(), (provider.etag.clone(), validator.clone()));
        Ok(validator)
    }
}
