//! [`WebhookRepository`] on `integration_webhooks`, partitioned by tenant.

use async_trait::async_trait;
use azure_data_cosmos::Query;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::webhooks::endpoint::{Webhook, WebhookId};
use im_domain::webhooks::ports::WebhookRepository;
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};
use serde::{Deserialize, Serialize};

use crate::client::{CosmosStore, WEBHOOKS};
use crate::docs::{SCHEMA_VERSION, etag_to_domain, header_etag};
use crate::errors::unexpected;
use crate::support::precondition;

const RESOURCE: &str = "webhook";

/// A webhook endpoint in `integration_webhooks` (partition key `/tenantId`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WebhookDoc {
    #[serde(rename = "type")]
    kind: String,
    schema_version: u32,
    #[serde(flatten)]
    webhook: Webhook,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

impl WebhookDoc {
    const TYPE: &'static str = "webhook";

    fn new(webhook: &Webhook) -> Self {
        Self { kind: Self::TYPE.into(), schema_version: SCHEMA_VERSION, webhook: webhook.clone(), etag: None }
    }
}

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
        let id = webhook.id.to_string();
        let doc = WebhookDoc::new(webhook);
        let create = self.store.container(WEBHOOKS).create_item(webhook.tenant_id.to_string(), &id, &doc, None);
        header_etag(self.store.call("a create", create, RESOURCE, &id).await?.headers().etag())
    }

    #[tracing::instrument(skip_all, name = "webhooks.get", fields(tenant = %tenant, webhook = %id))]
    async fn get(&self, tenant: &TenantId, id: WebhookId) -> Result<Stored<Webhook>, DomainError> {
        let key = id.to_string();
        let response =
            self.store.call("a read", self.store.container(WEBHOOKS).read_item(tenant.to_string(), &key, None), RESOURCE, &key).await?;
        let etag = header_etag(response.headers().etag())?;
        let doc: WebhookDoc = response.into_model().map_err(unexpected)?;
        if doc.kind != WebhookDoc::TYPE {
            return Err(DomainError::not_found(RESOURCE, id));
        }
        Ok(Stored { value: doc.webhook, etag })
    }

    #[tracing::instrument(skip_all, name = "webhooks.list", fields(tenant = %tenant))]
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError> {
        let query = Query::from("SELECT * FROM c WHERE c.type = @type ORDER BY c.id")
            .with_parameter("@type", WebhookDoc::TYPE)
            .map_err(unexpected)?;
        let (docs, continuation) = self.store.query_page::<WebhookDoc>(WEBHOOKS, query, Some(tenant.to_string()), page).await?;
        let items = docs
            .into_iter()
            .map(|d| Ok(Stored { etag: d.etag.as_deref().map(etag_to_domain).ok_or_else(|| unexpected("no _etag"))?, value: d.webhook }))
            .collect::<Result<Vec<_>, DomainError>>()?;
        Ok(Page { items, continuation })
    }

    #[tracing::instrument(skip_all, name = "webhooks.replace", fields(tenant = %webhook.tenant_id, webhook = %webhook.id))]
    async fn replace(&self, webhook: &Webhook, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let id = webhook.id.to_string();
        let options = precondition(if_match.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
        let doc = WebhookDoc::new(webhook);
        let replace = self.store.container(WEBHOOKS).replace_item(webhook.tenant_id.to_string(), &id, &doc, options);
        header_etag(self.store.call("a replace", replace, RESOURCE, &id).await?.headers().etag())
    }

    #[tracing::instrument(skip_all, name = "webhooks.delete", fields(tenant = %tenant, webhook = %id))]
    async fn delete(&self, tenant: &TenantId, id: WebhookId, if_match: Option<ETag>) -> Result<(), DomainError> {
        let key = id.to_string();
        let options = precondition(if_match.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
        self.store.call("a delete", self.store.container(WEBHOOKS).delete_item(tenant.to_string(), &key, options), RESOURCE, &key).await?;
        Ok(())
    }
}
