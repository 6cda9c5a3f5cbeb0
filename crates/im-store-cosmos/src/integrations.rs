//! [`IntegrationRepository`] on `integration_integrations`, partitioned by tenant. Events go
//! into the same partition in the same transactional batch.

use async_trait::async_trait;
use azure_data_cosmos::options::{BatchDeleteOptions, ItemWriteOptions};
use azure_data_cosmos::{Query, TransactionalBatch};
use im_domain::events::DomainEvent;
use im_domain::integration::{Integration, IntegrationFilter};
use im_domain::ports::IntegrationRepository;
use im_domain::{DomainError, ETag, IntegrationId, Page, PageRequest, Stored, TenantId};

use crate::client::{CosmosStore, INTEGRATIONS};
use crate::docs::{IntegrationDoc, stored_all};
use crate::errors::unexpected;
use crate::support::{create_doc, precondition, read_doc, replace_doc, run_batch, with_events};

const RESOURCE: &str = "integration";

pub(crate) struct CosmosIntegrations {
    store: CosmosStore,
}

impl CosmosIntegrations {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl IntegrationRepository for CosmosIntegrations {
    #[tracing::instrument(skip_all, name = "integrations.create", fields(tenant = %integration.tenant_id, integration = %integration.id, events = events.len()))]
    async fn create(&self, integration: &Integration, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let (pk, id) = (integration.tenant_id.to_string(), integration.id.to_string());
        create_doc(&self.store, INTEGRATIONS, pk, id, &IntegrationDoc::new(integration.clone()), events, RESOURCE).await
    }

    #[tracing::instrument(skip_all, name = "integrations.get", fields(tenant = %tenant, integration = %id))]
    async fn get(&self, tenant: &TenantId, id: IntegrationId) -> Result<Stored<Integration>, DomainError> {
        read_doc(&self.store, INTEGRATIONS, tenant.to_string(), &id.to_string(), IntegrationDoc::TYPE, RESOURCE)
            .await?
            .ok_or_else(|| DomainError::not_found(RESOURCE, id))
    }

    #[tracing::instrument(skip_all, name = "integrations.list", fields(tenant = %tenant))]
    async fn list(
        &self,
        tenant: &TenantId,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Integration>>, DomainError> {
        let mut text = String::from("SELECT * FROM c WHERE c.type = @type");
        if filter.provider_id.is_some() {
            text.push_str(" AND c.providerId = @providerId");
        }
        if filter.status.is_some() {
            text.push_str(" AND c.status = @status");
        }
        text.push_str(" ORDER BY c.id");
        let mut query = Query::from(text).with_parameter("@type", IntegrationDoc::TYPE).map_err(unexpected)?;
        if let Some(provider) = &filter.provider_id {
            query = query.with_parameter("@providerId", provider.as_str()).map_err(unexpected)?;
        }
        if let Some(status) = filter.status {
            query = query.with_parameter("@status", status.as_str()).map_err(unexpected)?;
        }
        let (docs, continuation) = self.store.query_page::<IntegrationDoc>(INTEGRATIONS, query, Some(tenant.to_string()), page).await?;
        Ok(Page { items: stored_all(docs)?, continuation })
    }

    #[tracing::instrument(skip_all, name = "integrations.replace", fields(tenant = %integration.tenant_id, integration = %integration.id, events = events.len()))]
    async fn replace(&self, integration: &Integration, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let (pk, id) = (integration.tenant_id.to_string(), integration.id.to_string());
        replace_doc(&self.store, INTEGRATIONS, pk, id, &IntegrationDoc::new(integration.clone()), if_match, events, RESOURCE).await
    }

    #[tracing::instrument(skip_all, name = "integrations.delete", fields(tenant = %tenant, integration = %id, events = events.len()))]
    async fn delete(
        &self,
        tenant: &TenantId,
        id: IntegrationId,
        if_match: Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<(), DomainError> {
        let key = id.to_string();
        let precondition = precondition(if_match.as_ref());
        if events.is_empty() {
            let options = precondition.map(|p| ItemWriteOptions::default().with_precondition(p));
            self.store
                .call("a delete", self.store.container(INTEGRATIONS).delete_item(tenant.to_string(), &key, options), RESOURCE, &key)
                .await?;
            return Ok(());
        }
        let options = precondition.map(|p| BatchDeleteOptions::default().with_precondition(p));
        let batch = with_events(TransactionalBatch::new(tenant.to_string()).delete_item(key.clone(), options), events)?;
        run_batch(&self.store, INTEGRATIONS, batch, RESOURCE, &key).await?;
        Ok(())
    }
}
