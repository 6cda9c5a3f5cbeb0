//! [`WebhookRepository`] on the documents table: container `integration_webhooks`, partitioned
//! by tenant.

use std::sync::Arc;

use async_trait::async_trait;
use im_domain::webhooks::endpoint::{Webhook, WebhookId};
use im_domain::webhooks::ports::WebhookRepository;
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};

use crate::containers::WEBHOOKS;
use crate::deliveries::LeasedRecords;
use crate::documents::Documents;
use crate::support::{decode_page, encode, get_decoded, partition_query};

const RESOURCE: &str = "webhook";

pub(crate) struct SqliteWebhooks {
    docs: Documents,
    /// Endpoints the delivery queue's take read for the attempts that follow it.
    leased: Arc<LeasedRecords>,
}

impl SqliteWebhooks {
    pub(crate) fn new(docs: Documents, leased: Arc<LeasedRecords>) -> Self {
        Self { docs, leased }
    }

    /// Runs a write of the endpoint, forgetting what a take read of it before and after (an
    /// attempt's update that lost to another writer reads the endpoint again, from the database).
    async fn writing<T>(&self, tenant: &str, id: &str, write: impl Future<Output = Result<T, DomainError>>) -> Result<T, DomainError> {
        self.leased.forget_webhook(tenant, id);
        let result = write.await;
        self.leased.forget_webhook(tenant, id);
        result
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
        let pk = tenant.to_string();
        if let Some(webhook) = self.leased.take_webhook(&pk, id) {
            return Ok(webhook);
        }
        get_decoded(&self.docs, WEBHOOKS, RESOURCE, pk, id).await
    }

    #[tracing::instrument(skip_all, name = "webhooks.list", fields(tenant = %tenant))]
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError> {
        decode_page(self.docs.query(partition_query(WEBHOOKS, tenant.to_string(), Vec::new(), page)).await?)
    }

    #[tracing::instrument(skip_all, name = "webhooks.replace", fields(tenant = %webhook.tenant_id, webhook = %webhook.id))]
    async fn replace(&self, webhook: &Webhook, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let (pk, id) = (webhook.tenant_id.to_string(), webhook.id.to_string());
        let body = encode(webhook)?;
        self.writing(&pk, &id, self.docs.replace(WEBHOOKS, RESOURCE, pk.clone(), pk.clone(), id.clone(), body, if_match, None, &[])).await
    }

    #[tracing::instrument(skip_all, name = "webhooks.delete", fields(tenant = %tenant, webhook = %id))]
    async fn delete(&self, tenant: &TenantId, id: WebhookId, if_match: Option<ETag>) -> Result<(), DomainError> {
        let (pk, id) = (tenant.to_string(), id.to_string());
        self.writing(&pk, &id, self.docs.delete(WEBHOOKS, RESOURCE, pk.clone(), id.clone(), if_match, &[])).await
    }
}
