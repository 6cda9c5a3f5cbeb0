use std::sync::Arc;

use crate::audit::{Audit, AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::common::{Clock, ETag, Page, PageRequest, Stored};
use crate::error::DomainError;
use crate::ports::ProviderRepository;
use crate::provider::{Provider, ProviderFilter, ProviderId, ProviderSpec, SeedReport};

use super::{matching, read_modify_write};

/// Reads and administers the global provider catalog.
#[derive(Clone)]
pub struct CatalogService {
    providers: Arc<dyn ProviderRepository>,
    clock: Arc<dyn Clock>,
    audit: Audit,
    allow_http: bool,
}

impl std::fmt::Debug for CatalogService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogService").finish_non_exhaustive()
    }
}

impl CatalogService {
    pub fn new(providers: Arc<dyn ProviderRepository>, clock: Arc<dyn Clock>, audit: Audit) -> Self {
        Self { providers, clock, audit, allow_http: false }
    }

    /// Accepts `http` OAuth2 URLs in provider definitions when the destination policy of
    /// provider calls allows `http` (`webhooks.allow_http`, local development and tests).
    #[must_use]
    pub fn with_http_urls(mut self, allow_http: bool) -> Self {
        self.allow_http = allow_http;
        self
    }

    /// Checks, before a change is even read, that the caller may change the catalog (admins).
    ///
    /// # Errors
    /// `Forbidden`, recorded in the audit log.
    pub async fn authorize(&self, caller: &Caller, action: AuditAction) -> Result<(), DomainError> {
        self.audit.require(caller, Role::Admin, AuditResource::Provider, action).await
    }

    /// Checks a provider definition under this catalog's rules, writing nothing.
    ///
    /// # Errors
    /// `Validation` listing every offending field.
    pub fn check(&self, spec: &ProviderSpec) -> Result<(), DomainError> {
        spec.validate_with(self.allow_http)
    }

    pub async fn get(&self, caller: &Caller, id: &ProviderId) -> Result<Stored<Provider>, DomainError> {
        caller.require(Role::Viewer)?;
        self.providers.get(id).await
    }

    pub async fn list(&self, caller: &Caller, filter: &ProviderFilter, page: &PageRequest) -> Result<Page<Stored<Provider>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.providers.list(filter, page).await
    }

    /// # Errors
    /// `Forbidden` without the admin role, `Validation` listing every offending field,
    /// `Conflict` when the id is taken.
    pub async fn create(&self, caller: &Caller, spec: ProviderSpec) -> Result<Stored<Provider>, DomainError> {
        let result = self.create_unaudited(caller, spec).await;
        self.audit
            .result(caller, AuditResource::Provider, AuditAction::Create, None, &result, |s| {
                (s.value.spec.id.to_string(), serde_json::Value::Null)
            })
            .await;
        result
    }

    async fn create_unaudited(&self, caller: &Caller, spec: ProviderSpec) -> Result<Stored<Provider>, DomainError> {
        caller.require(Role::Admin)?;
        spec.validate_with(self.allow_http)?;
        let now = self.clock.now();
        let provider = Provider { spec, created_at: now, updated_at: now };
        let etag = self.providers.create(&provider).await?;
        Ok(Stored { value: provider, etag })
    }

    /// Replaces a provider's description; its id cannot change, its category can.
    pub async fn update(
        &self,
        caller: &Caller,
        id: &ProviderId,
        spec: ProviderSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Provider>, DomainError> {
        let result = self.update_unaudited(caller, id, spec, if_match).await;
        self.audit.of(caller, AuditResource::Provider, AuditAction::Update, id, result).await
    }

    async fn update_unaudited(
        &self,
        caller: &Caller,
        id: &ProviderId,
        spec: ProviderSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Provider>, DomainError> {
        caller.require(Role::Admin)?;
        if spec.id != *id {
            return Err(DomainError::invalid("id", "cannot be changed"));
        }
        spec.validate_with(self.allow_http)?;
        read_modify_write(if_match, async |token| {
            let current = matching(self.providers.get(id).await?, token)?;
            let provider = Provider { spec: spec.clone(), created_at: current.value.created_at, updated_at: self.clock.now() };
            let etag = self.providers.replace(&provider, Some(token.unwrap_or(&current.etag).clone())).await?;
            Ok(Stored { value: provider, etag })
        })
        .await
    }

    pub async fn delete(&self, caller: &Caller, id: &ProviderId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        let result = self.delete_unaudited(caller, id, if_match).await;
        self.audit.of(caller, AuditResource::Provider, AuditAction::Delete, id, result).await
    }

    async fn delete_unaudited(&self, caller: &Caller, id: &ProviderId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        caller.require(Role::Admin)?;
        self.providers.delete(id, if_match.cloned()).await
    }

    /// Seeds the catalog with the built-in providers (idempotent; never overwrites edits).
    ///
    /// # Errors
    /// `Validation` if a built-in provider breaks the rules (a defect of the shipped data).
    pub async fn seed(&self, specs: Vec<ProviderSpec>) -> Result<SeedReport, DomainError> {
        let now = self.clock.now();
        let mut providers = Vec::with_capacity(specs.len());
        for spec in specs {
            spec.validate().map_err(|e| DomainError::Unexpected(anyhow::anyhow!("built-in provider '{}' is invalid: {e}", spec.id)))?;
            providers.push(Provider { spec, created_at: now, updated_at: now });
        }
        self.providers.seed(&providers).await
    }
}
