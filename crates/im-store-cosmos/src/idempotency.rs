//! [`IdempotencyRepository`] on `integration_webhook_deliveries` (partition key `/tenantId`,
//! TTL enabled): documents of type `idempotencyKey` whose own `ttl` expires them, so Cosmos DB
//! deletes them without a sweeper and no container is added.

use std::time::Duration;

use async_trait::async_trait;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::idempotency::{IdempotencyRecord, IdempotencyRepository};
use im_domain::{DomainError, ETag, Stored, TenantId};
use serde::{Deserialize, Serialize};

use crate::client::{CosmosStore, DELIVERIES};
use crate::docs::{SCHEMA_VERSION, header_etag};
use crate::errors::unexpected;
use crate::support::precondition;

const RESOURCE: &str = "idempotency key";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdempotencyDoc {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    schema_version: u32,
    #[serde(flatten)]
    record: IdempotencyRecord,
    /// Seconds after the last write until Cosmos DB deletes it.
    ttl: i64,
}

impl IdempotencyDoc {
    const TYPE: &'static str = "idempotencyKey";

    /// The document id: a prefix keeps it apart from the deliveries of the same partition.
    fn id_for(key: &str) -> String {
        format!("idempotency-{key}")
    }

    fn new(record: &IdempotencyRecord, ttl: Duration) -> Self {
        Self {
            id: Self::id_for(&record.key),
            kind: Self::TYPE.into(),
            schema_version: SCHEMA_VERSION,
            record: record.clone(),
            ttl: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1),
        }
    }
}

pub(crate) struct CosmosIdempotency {
    store: CosmosStore,
}

impl CosmosIdempotency {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl IdempotencyRepository for CosmosIdempotency {
    #[tracing::instrument(skip_all, name = "idempotency.create", fields(tenant = %record.tenant_id))]
    async fn create(&self, record: &IdempotencyRecord, ttl: Duration) -> Result<ETag, DomainError> {
        let doc = IdempotencyDoc::new(record, ttl);
        let create = self.store.container(DELIVERIES).create_item(record.tenant_id.to_string(), &doc.id, &doc, None);
        header_etag(self.store.call("a create", create, RESOURCE, &doc.id).await?.headers().etag())
    }

    #[tracing::instrument(skip_all, name = "idempotency.get", fields(tenant = %tenant))]
    async fn get(&self, tenant: &TenantId, key: &str) -> Result<Option<Stored<IdempotencyRecord>>, DomainError> {
        let id = IdempotencyDoc::id_for(key);
        let read = self.store.container(DELIVERIES).read_item(tenant.to_string(), &id, None);
        let response = match self.store.call("a read", read, RESOURCE, &id).await {
            Ok(response) => response,
            Err(DomainError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let etag = header_etag(response.headers().etag())?;
        let doc: IdempotencyDoc = response.into_model().map_err(unexpected)?;
        Ok((doc.kind == IdempotencyDoc::TYPE).then_some(Stored { value: doc.record, etag }))
    }

    #[tracing::instrument(skip_all, name = "idempotency.replace", fields(tenant = %record.tenant_id))]
    async fn replace(&self, record: &IdempotencyRecord, if_match: &ETag, ttl: Duration) -> Result<ETag, DomainError> {
        let doc = IdempotencyDoc::new(record, ttl);
        let options = precondition(Some(if_match)).map(|p| ItemWriteOptions::default().with_precondition(p));
        let replace = self.store.container(DELIVERIES).replace_item(record.tenant_id.to_string(), &doc.id, &doc, options);
        header_etag(self.store.call("a replace", replace, RESOURCE, &doc.id).await?.headers().etag())
    }

    #[tracing::instrument(skip_all, name = "idempotency.delete", fields(tenant = %tenant))]
    async fn delete(&self, tenant: &TenantId, key: &str, if_match: &ETag) -> Result<(), DomainError> {
        let id = IdempotencyDoc::id_for(key);
        let options = precondition(Some(if_match)).map(|p| ItemWriteOptions::default().with_precondition(p));
        self.store.call("a delete", self.store.container(DELIVERIES).delete_item(tenant.to_string(), &id, options), RESOURCE, &id).await?;
        Ok(())
    }
}
