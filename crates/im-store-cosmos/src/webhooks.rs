//! [`WebhookRepository`] on `integration_webhooks`, partitioned by tenant.

use async_trait::async_trait;
use azure_data_cosmos::Query;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::webhooks::endpoint::{Webhook, WebhookId};
use im_domain::webhooks::ports::WebhookRepository;
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};

use crate::client::{CosmosStore, WEBHOOKS};
use crate::docs::{WebhookDoc, stored_all};
use crate::errors::unexpected;
use crate::support::{create_doc, precondition, read_doc, replace_doc};

const RESOURCE: &str = "webhook";

pub(crate) struct CosmosWebhooks {
    store: CosmosStore,
}

impl CosmosWebhooks {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl WebhookRepository for CosmosWebhooks {
    #[tracing::instrument(skip_all, name = "webhooks.create", fields(tenant = %webhook.tenant_id, webhook = %webhook.id))]
    async fn create(&self, webhook: &Webhook) -> Result<ETag, DomainError> {
        let (pk, id) = (webhook.tenant_id.to_string(), webhook.id.to_string());
        create_doc(&self.store, WEBHOOKS, pk, id, &WebhookDoc::new(webhook.clone()), &[], RESOURCE).await
    }

    #[tracing::instrument(skip_all, name = "webhooks.get", fields(tenant = %tenant, webhook = %id))]
    async fn get(&self, tenant: &TenantId, id: WebhookId) -> Result<Stored<Webhook>, DomainError> {
        read_doc(&self.store, WEBHOOKS, tenant.to_string(), &id.to_string(), WebhookDoc::TYPE, RESOURCE)
            .await?
            .ok_or_else(|| DomainError::not_found(RESOURCE, id))
    }

    #[tracing::instrument(skip_all, name = "webhooks.list", fields(tenant = %tenant))]
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError> {
        let query = Query::from("SELECT * FROM c WHERE c.type = @type ORDER BY c.id")
            .with_parameter("@type", WebhookDoc::TYPE)
            .map_err(unexpected)?;
        let (docs, continuation) = self.store.query_page::<WebhookDoc>(WEBHOOKS, query, Some(tenant.to_string()), page).await?;
        Ok(Page { items: stored_all(docs)?, continuation })
    }

    #[tracing::instrument(skip_all, name = "webhooks.replace", fields(tenant = %webhook.tenant_id, webhook = %webhook.id))]
    async fn replace(&self, webhook: &Webhook, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let (pk, id) = (webhook.tenant_id.to_string(), webhook.id.to_string());
        replace_doc(&self.store, WEBHOOKS, pk, id, &WebhookDoc::new(webhook.clone()), if_match, &[], RESOURCE).await
    }

    #[tracing::instrument(skip_all, name = "webhooks.delete", fields(tenant = %tenant, webhook = %id))]
    async fn delete(&self, tenant: &TenantId, id: WebhookId, if_match: Option<ETag>) -> Result<(), DomainError> {
        let key = id.to_string();
        let options = precondition(if_match.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
        self.store.call("a delete", self.store.container(WEBHOOKS).delete_item(tenant.to_string(), &key, options), RESOURCE, &key).await?;
        Ok(())
    }
}
