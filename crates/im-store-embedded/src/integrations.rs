//! [`IntegrationRepository`] on the documents table: container `integration_integrations`,
//! partitioned by tenant. A document's body is the integration's JSON text as written (its
//! `Serialize`), so `get_json` and `list_json` hand it out as stored.

use async_trait::async_trait;
use im_domain::events::DomainEvent;
use im_domain::integration::{Integration, IntegrationFilter};
use im_domain::ports::IntegrationRepository;
use im_domain::{DomainError, ETag, IntegrationId, JsonText, Page, PageRequest, Stored, TenantId, TextPage};

use crate::containers::INTEGRATIONS;
use crate::documents::{Documents, Query};
use crate::support::{decode_page, encode, get_decoded, partition_query};

const RESOURCE: &str = "integration";

pub(crate) struct SqliteIntegrations {
    docs: Documents,
}

impl SqliteIntegrations {
    pub(crate) fn new(docs: Documents) -> Self {
        Self { docs }
    }

    /// Writes `integration` as `body` (its JSON text), with `events`, only while its provider is
    /// at `provider_version` when one is given.
    async fn create_body(
        &self,
        integration: &Integration,
        body: String,
        provider_version: Option<&ETag>,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        let provider = provider_version.map(|version| (integration.provider_id.to_string(), version.clone()));
        let (tenant, id) = (integration.tenant_id.to_string(), integration.id.to_string());
        self.docs.create_requiring(INTEGRATIONS, tenant, id, body, None, events, provider).await
    }

    fn query(tenant: &TenantId, filter: &IntegrationFilter, page: &PageRequest) -> Query {
        let mut filters = Vec::new();
        if let Some(provider) = &filter.provider_id {
            filters.push(("$.providerId", provider.to_string()));
        }
        if let Some(status) = filter.status {
            filters.push(("$.status", status.as_str().to_owned()));
        }
        partition_query(INTEGRATIONS, tenant.to_string(), filters, page)
    }
}

#[async_trait]
impl IntegrationRepository for SqliteIntegrations {
    #[tracing::instrument(skip_all, name = "integrations.create", fields(tenant = %integration.tenant_id, integration = %integration.id, events = events.len()))]
    async fn create(&self, integration: &Integration, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        self.create_body(integration, encode(integration)?, None, events).await
    }

    fn checks_provider_in_write(&self) -> bool {
        true
    }

    #[tracing::instrument(skip_all, name = "integrations.create", fields(tenant = %integration.tenant_id, integration = %integration.id, events = events.len()))]
    async fn create_for_provider(
        &self,
        integration: &Integration,
        provider_version: &ETag,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        self.create_body(integration, encode(integration)?, Some(provider_version), events).await
    }

    #[tracing::instrument(skip_all, name = "integrations.create", fields(tenant = %integration.tenant_id, integration = %integration.id, events = events.len()))]
    async fn create_encoded(
        &self,
        integration: &Integration,
        text: &JsonText<Integration>,
        provider_version: &Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        // The document's body is this very text (see the module's doc).
        self.create_body(integration, text.as_str().to_owned(), provider_version.as_ref(), events).await
    }

    #[tracing::instrument(skip_all, name = "integrations.get", fields(tenant = %tenant, integration = %id))]
    async fn get(&self, tenant: &TenantId, id: IntegrationId) -> Result<Stored<Integration>, DomainError> {
        get_decoded(&self.docs, INTEGRATIONS, RESOURCE, tenant.to_string(), id).await
    }

    #[tracing::instrument(skip_all, name = "integrations.list", fields(tenant = %tenant))]
    async fn list(
        &self,
        tenant: &TenantId,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Integration>>, DomainError> {
        decode_page(self.docs.query(Self::query(tenant, filter, page)).await?)
    }

    #[tracing::instrument(skip_all, name = "integrations.get_json", fields(tenant = %tenant, integration = %id))]
    async fn get_json(&self, tenant: &TenantId, id: IntegrationId) -> Result<Stored<JsonText<Integration>>, DomainError> {
        match self.docs.get(INTEGRATIONS, tenant.to_string(), id.to_string()).await? {
            Some(doc) => Ok(Stored { value: JsonText::stored(doc.body), etag: doc.etag }),
            None => Err(DomainError::not_found(RESOURCE, id)),
        }
    }

    #[tracing::instrument(skip_all, name = "integrations.list_json", fields(tenant = %tenant))]
    async fn list_json(
        &self,
        tenant: &TenantId,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<TextPage<Integration>, DomainError> {
        let (items, continuation) = self.docs.query_texts(Self::query(tenant, filter, page)).await?;
        Ok(TextPage { items, continuation })
    }

    #[tracing::instrument(skip_all, name = "integrations.replace", fields(tenant = %integration.tenant_id, integration = %integration.id, events = events.len()))]
    async fn replace(&self, integration: &Integration, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let body = encode(integration)?;
        let pk = integration.tenant_id.to_string();
        self.docs.replace(INTEGRATIONS, RESOURCE, pk.clone(), pk, integration.id.to_string(), body, if_match, None, events).await
    }

    #[tracing::instrument(skip_all, name = "integrations.delete", fields(tenant = %tenant, integration = %id, events = events.len()))]
    async fn delete(
        &self,
        tenant: &TenantId,
        id: IntegrationId,
        if_match: Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<(), DomainError> {
        self.docs.delete(INTEGRATIONS, RESOURCE, tenant.to_string(), id.to_string(), if_match, events).await
    }
}
