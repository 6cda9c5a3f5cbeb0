//! [`WebhookRepository`] on the documents table: container `integration_webhooks`, partitioned
//! by tenant.

use async_trait::async_trait;
use im_domain::webhooks::endpoint::{Webhook, WebhookId};
use im_domain::webhooks::ports::WebhookRepository;
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};

use crate::containers::WEBHOOKS;
use crate::documents::Documents;
use crate::support::{decode_page, encode, get_decoded, partition_query};

const RESOURCE: &str = "webhook";

pub(crate) struct SqliteWebhooks {
    docs: Documents,
}

impl SqliteWebhooks {
    pub(crate) fn new(docs: Documents) -> Self {
        Self { docs }
    }
}

#[async_trait]
impl WebhookRepository for SqliteWebhooks {
    #[tracing::instrument(skip_all, name = "webhooks.create", fields(tenant = %webhook.tenant_id, webhook = %webhook.id))]
    async fn create(&self, webhook: &Webhook) -> Result<ETag, DomainError> {
        self.docs.create(WEBHOOKS, webhook.tenant_id.to_string(), webhook.id.to_string(), encode(webhook)?, None).await
    }

    #[tracing::instrument(skip_all, name = "webhooks.get", fields(tenant = %tenant, webhook = %id))]
    async fn get(&self, tenant: &TenantId, id: WebhookId) -> Result<Stored<Webhook>, DomainError> {
        get_decoded(&self.docs, WEBHOOKS, RESOURCE, tenant.to_string(), id).await
    }

    #[tracing::instrument(skip_all, name = "webhooks.list", fields(tenant = %tenant))]
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError> {
        decode_page(self.docs.query(partition_query(WEBHOOKS, tenant.to_string(), Vec::new(), page)).await?)
    }

    #[tracing::instrument(skip_all, name = "webhooks.replace", fields(tenant = %webhook.tenant_id, webhook = %webhook.id))]
    async fn replace(&self, webhook: &Webhook, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let pk = webhook.tenant_id.to_string();
        self.docs.replace(WEBHOOKS, RESOURCE, pk.clone(), pk, webhook.id.to_string(), encode(webhook)?, if_match, None, &[]).await
    }

    #[tracing::instrument(skip_all, name = "webhooks.delete", fields(tenant = %tenant, webhook = %id))]
    async fn delete(&self, tenant: &TenantId, id: WebhookId, if_match: Option<ETag>) -> Result<(), DomainError> {
        self.docs.delete(WEBHOOKS, RESOURCE, tenant.to_string(), id.to_string(), if_match, &[]).await
    }
}
