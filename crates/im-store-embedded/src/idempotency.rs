//! [`IdempotencyRepository`] on the documents table: container `integration_idempotency_keys`,
//! partitioned by tenant; every write sets the expiry the TTL sweeper honours (no schema change).

use std::time::Duration;

use async_trait::async_trait;
use im_domain::idempotency::{IdempotencyRecord, IdempotencyRepository};
use im_domain::{DomainError, ETag, Stored, TenantId};

use crate::containers::IDEMPOTENCY_KEYS;
use crate::documents::Documents;
use crate::support::{decode, encode};

const RESOURCE: &str = "idempotency key";

pub(crate) struct SqliteIdempotency {
    docs: Documents,
}

impl SqliteIdempotency {
    pub(crate) fn new(docs: Documents) -> Self {
        Self { docs }
    }
}

#[async_trait]
impl IdempotencyRepository for SqliteIdempotency {
    #[tracing::instrument(skip_all, name = "idempotency.create", fields(tenant = %record.tenant_id))]
    async fn create(&self, record: &IdempotencyRecord, ttl: Duration) -> Result<ETag, DomainError> {
        self.docs.create(IDEMPOTENCY_KEYS, record.tenant_id.to_string(), record.key.clone(), encode(record)?, Some(ttl)).await
    }

    #[tracing::instrument(skip_all, name = "idempotency.get", fields(tenant = %tenant))]
    async fn get(&self, tenant: &TenantId, key: &str) -> Result<Option<Stored<IdempotencyRecord>>, DomainError> {
        self.docs.get(IDEMPOTENCY_KEYS, tenant.to_string(), key.to_owned()).await?.map(decode).transpose()
    }

    #[tracing::instrument(skip_all, name = "idempotency.replace", fields(tenant = %record.tenant_id))]
    async fn replace(&self, record: &IdempotencyRecord, if_match: &ETag, ttl: Duration) -> Result<ETag, DomainError> {
        let pk = record.tenant_id.to_string();
        let (key, body) = (record.key.clone(), encode(record)?);
        self.docs.replace(IDEMPOTENCY_KEYS, RESOURCE, pk.clone(), pk, key, body, Some(if_match.clone()), Some(ttl), &[]).await
    }

    #[tracing::instrument(skip_all, name = "idempotency.delete", fields(tenant = %tenant))]
    async fn delete(&self, tenant: &TenantId, key: &str, if_match: &ETag) -> Result<(), DomainError> {
        self.docs.delete(IDEMPOTENCY_KEYS, RESOURCE, tenant.to_string(), key.to_owned(), Some(if_match.clone()), &[]).await
    }
}
