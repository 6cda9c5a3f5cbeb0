//! [`DeliveryRepository`] on `integration_webhook_deliveries` (partition key `/tenantId`, the
//! container's default TTL of 7 days expires them). Outcome events go into the outbox of the
//! same partition in the same batch.

use async_trait::async_trait;
use azure_data_cosmos::options::{BatchReplaceOptions, ItemWriteOptions};
use azure_data_cosmos::{Query, TransactionalBatch};
use im_domain::events::DomainEvent;
use im_domain::webhooks::delivery::{Delivery, DeliveryFilter, DeliveryStatus};
use im_domain::webhooks::endpoint::WebhookId;
use im_domain::webhooks::ports::DeliveryRepository;
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};
use serde::{Deserialize, Serialize};

use crate::client::{CosmosStore, DELIVERIES};
use crate::docs::{SCHEMA_VERSION, etag_to_domain, header_etag};
use crate::errors::unexpected;
use crate::support::{precondition, run_batch, with_events};

const RESOURCE: &str = "delivery";

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryDoc {
    #[serde(rename = "type")]
    kind: String,
    schema_version: u32,
    #[serde(flatten)]
    delivery: Delivery,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

impl<'de> Deserialize<'de> for DeliveryDoc {
    /// Read through a JSON object rather than `#[serde(flatten)]`: a flattened delivery is read
    /// through serde's own buffer, which cannot hand its payload over as the JSON text it is
    /// kept as (`EventData`); a JSON value can.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Envelope {
            #[serde(rename = "type")]
            kind: String,
            schema_version: u32,
            #[serde(rename = "_etag", default)]
            etag: Option<String>,
        }
        let value = serde_json::Value::deserialize(deserializer)?;
        let Envelope { kind, schema_version, etag } = Envelope::deserialize(&value).map_err(D::Error::custom)?;
        let delivery = Delivery::deserialize(value).map_err(D::Error::custom)?;
        Ok(Self { kind, schema_version, delivery, etag })
    }
}

impl DeliveryDoc {
    const TYPE: &'static str = "delivery";

    fn new(delivery: &Delivery) -> Self {
        Self { kind: Self::TYPE.into(), schema_version: SCHEMA_VERSION, delivery: delivery.clone(), etag: None }
    }
}

pub(crate) struct CosmosDeliveries {
    store: CosmosStore,
}

impl CosmosDeliveries {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl DeliveryRepository for CosmosDeliveries {
    /// The delivery queue is never in Cosmos DB (RabbitMQ, or the data directory's SQLite file):
    /// a record and its job are two writes, the record first.
    fn keeps_queue(&self) -> bool {
        false
    }

    #[tracing::instrument(skip_all, name = "deliveries.create", fields(tenant = %delivery.tenant_id, delivery = %delivery.id))]
    async fn create(&self, delivery: &Delivery) -> Result<ETag, DomainError> {
        let id = delivery.id.to_string();
        let doc = DeliveryDoc::new(delivery);
        let create = self.store.container(DELIVERIES).create_item(delivery.tenant_id.to_string(), &id, &doc, None);
        header_etag(self.store.call("a create", create, RESOURCE, &id).await?.headers().etag())
    }

    #[tracing::instrument(skip_all, name = "deliveries.get", fields(tenant = %tenant, delivery = %id))]
    async fn get(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Stored<Delivery>, DomainError> {
        let key = id.to_string();
        let response =
            self.store.call("a read", self.store.container(DELIVERIES).read_item(tenant.to_string(), &key, None), RESOURCE, &key).await?;
        let etag = header_etag(response.headers().etag())?;
        let doc: DeliveryDoc = response.into_model().map_err(unexpected)?;
        Ok(Stored { value: doc.delivery, etag })
    }

    #[tracing::instrument(skip_all, name = "deliveries.list", fields(tenant = %tenant, webhook = %webhook))]
    async fn list(
        &self,
        tenant: &TenantId,
        webhook: WebhookId,
        filter: &DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Delivery>>, DomainError> {
        let mut text = String::from("SELECT * FROM c WHERE c.type = @type AND c.webhookId = @webhook");
        if filter.status.is_some() {
            text.push_str(" AND c.status = @status");
        }
        if filter.event_type.is_some() {
            text.push_str(" AND c.eventType = @eventType");
        }
        text.push_str(" ORDER BY c.id");
        let mut query = Query::from(text)
            .with_parameter("@type", DeliveryDoc::TYPE)
            .and_then(|q| q.with_parameter("@webhook", webhook.to_string()))
            .map_err(unexpected)?;
        if let Some(status) = filter.status {
            query = query.with_parameter("@status", status.as_str()).map_err(unexpected)?;
        }
        if let Some(event_type) = &filter.event_type {
            query = query.with_parameter("@eventType", event_type.as_str()).map_err(unexpected)?;
        }
        let (docs, continuation) = self.store.query_page::<DeliveryDoc>(DELIVERIES, query, Some(tenant.to_string()), page).await?;
        let items = docs
            .into_iter()
            .filter(|d| filter.matches(&d.delivery))
            .map(|d| Ok(Stored { etag: d.etag.as_deref().map(etag_to_domain).ok_or_else(|| unexpected("no _etag"))?, value: d.delivery }))
            .collect::<Result<Vec<_>, DomainError>>()?;
        Ok(Page { items, continuation })
    }

    /// A query across partitions (every tenant's), by the hold's end as stored: RFC 3339 text
    /// in UTC, compared with the second after `before` and then exactly on the decoded values,
    /// which are put in order ([`im_domain::webhooks::delivery::hold_text_cutoff`]).
    #[tracing::instrument(skip_all, name = "deliveries.holds_ended_before")]
    async fn holds_ended_before(&self, before: time::OffsetDateTime, limit: u32) -> Result<Vec<Stored<Delivery>>, DomainError> {
        let cutoff = im_domain::webhooks::delivery::hold_text_cutoff(before)?;
        let query =
            Query::from("SELECT * FROM c WHERE c.type = @type AND c.status = @pending AND c.leaseUntil <= @cutoff ORDER BY c.leaseUntil")
                .with_parameter("@type", DeliveryDoc::TYPE)
                .and_then(|q| q.with_parameter("@pending", DeliveryStatus::Pending.as_str()))
                .and_then(|q| q.with_parameter("@cutoff", cutoff))
                .map_err(unexpected)?;
        let (docs, _) = self.store.query_page::<DeliveryDoc>(DELIVERIES, query, None, &PageRequest::first(limit.clamp(1, 1000))).await?;
        let mut ended = docs
            .into_iter()
            .filter(|d| d.delivery.status == DeliveryStatus::Pending && d.delivery.lease_until.is_some_and(|until| until < before))
            .map(|d| Ok(Stored { etag: d.etag.as_deref().map(etag_to_domain).ok_or_else(|| unexpected("no _etag"))?, value: d.delivery }))
            .collect::<Result<Vec<_>, DomainError>>()?;
        ended.sort_by_key(|d| d.value.lease_until);
        // The page size is a hint per physical partition: a query across several may answer more.
        ended.truncate(limit as usize);
        Ok(ended)
    }

    #[tracing::instrument(skip_all, name = "deliveries.replace", fields(tenant = %delivery.tenant_id, delivery = %delivery.id, events = events.len()))]
    async fn replace(&self, delivery: &Delivery, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let id = delivery.id.to_string();
        let doc = DeliveryDoc::new(delivery);
        if events.is_empty() {
            let options = precondition(if_match.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
            let replace = self.store.container(DELIVERIES).replace_item(delivery.tenant_id.to_string(), &id, &doc, options);
            return header_etag(self.store.call("a replace", replace, RESOURCE, &id).await?.headers().etag());
        }
        let options = precondition(if_match.as_ref()).map(|p| BatchReplaceOptions::default().with_precondition(p));
        let batch = with_events(
            TransactionalBatch::new(delivery.tenant_id.to_string()).replace_item(id.clone(), &doc, options).map_err(unexpected)?,
            events,
        )?;
        run_batch(&self.store, DELIVERIES, batch, RESOURCE, &id).await?.ok_or_else(|| unexpected("no etag in the batch result"))
    }
}
