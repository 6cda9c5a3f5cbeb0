//! [`AuditBuffer`] on documents of type `audit` in `integration_integrations` (partition
//! `/tenantId`, the tenant of the record), beside the outbox entries that container already
//! keeps: no container of our own to provision, and every query of the container's resources
//! already selects its `type`. Reading them is a cross-partition query ordered by `recordedAt`;
//! a claim is a write conditional on the version read, as for the outbox.

use std::time::Duration;

use async_trait::async_trait;
use azure_data_cosmos::Query;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::audit::{AuditBacklog, AuditBuffer, AuditEntry};
use im_domain::cache::{self, BoundedCache};
use im_domain::{DomainError, PageRequest};
use serde::{Deserialize, Serialize};

use crate::client::{CosmosStore, INTEGRATIONS};
use crate::docs::etag_to_domain;
use crate::errors::unexpected;
use crate::support::precondition;

/// Entries handed out whose partition is remembered.
const PARTITIONS_CAPACITY: usize = 100_000;
/// The most entries `backlog` counts (cross-partition aggregates are not available).
const BACKLOG_SCAN: u32 = 1000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditDoc {
    id: String,
    tenant_id: String,
    #[serde(rename = "type")]
    kind: String,
    /// The record's timestamp, unix milliseconds: shipped oldest first.
    recorded_at: i64,
    record: AuditEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claimed_until: Option<i64>,
    /// `-1`: never expires, whatever the container's default.
    ttl: i64,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

const TYPE: &str = "audit";

fn doc_id(id: &uuid::Uuid) -> String {
    format!("audit-{id}")
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Located {
    tenant_id: String,
}

pub(crate) struct CosmosAuditBuffer {
    store: CosmosStore,
    /// The partition of each entry handed out, to delete it with a point operation.
    partitions: BoundedCache<uuid::Uuid, String>,
}

impl CosmosAuditBuffer {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store, partitions: cache::bounded(PARTITIONS_CAPACITY) }
    }

    async fn oldest(&self, limit: u32) -> Result<Vec<AuditDoc>, DomainError> {
        let query =
            Query::from("SELECT * FROM c WHERE c.type = @type ORDER BY c.recordedAt").with_parameter("@type", TYPE).map_err(unexpected)?;
        let (docs, _) = self.store.query_page::<AuditDoc>(INTEGRATIONS, query, None, &PageRequest::first(limit.clamp(1, 1000))).await?;
        Ok(docs)
    }

    async fn locate(&self, id: &uuid::Uuid) -> Result<Option<String>, DomainError> {
        if let Some(partition) = self.partitions.get(id) {
            return Ok(Some(partition));
        }
        let query =
            Query::from("SELECT c.tenantId FROM c WHERE c.id = @id").with_parameter("@id", doc_id(id).as_str()).map_err(unexpected)?;
        let (found, _) = self.store.query_page::<Located>(INTEGRATIONS, query, None, &PageRequest::first(1)).await?;
        Ok(found.into_iter().next().map(|l| l.tenant_id))
    }
}

#[async_trait]
impl AuditBuffer for CosmosAuditBuffer {
    #[tracing::instrument(skip_all, name = "audit_buffer.append", fields(record_id = %entry.id))]
    async fn append(&self, entry: &AuditEntry) -> Result<(), DomainError> {
        let doc = AuditDoc {
            id: doc_id(&entry.id),
            tenant_id: entry.tenant_id.clone(),
            kind: TYPE.into(),
            recorded_at: (entry.timestamp.unix_timestamp_nanos() / 1_000_000) as i64,
            record: entry.clone(),
            claimed_by: None,
            claimed_until: None,
            ttl: -1,
            etag: None,
        };
        let create = self.store.container(INTEGRATIONS).create_item(doc.tenant_id.clone(), &doc.id, &doc, None);
        match self.store.call("an audit record write", create, "audit record", &doc.id).await {
            Ok(_) | Err(DomainError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    #[tracing::instrument(skip_all, name = "audit_buffer.claim", fields(owner = %owner, limit = limit))]
    async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Vec<AuditEntry>, DomainError> {
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let candidates = self
            // Look past entries other shippers hold.
            .oldest(limit.saturating_mul(4))
            .await?
            .into_iter()
            .filter(|d| d.claimed_until.is_none_or(|t| t <= now) || d.claimed_by.as_deref() == Some(owner))
            .take(limit as usize);
        let claims = candidates.map(|mut doc| async move {
            let etag = doc.etag.take().map(|e| etag_to_domain(&e));
            doc.claimed_by = Some(owner.to_owned());
            doc.claimed_until = Some(until);
            let options = precondition(etag.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
            let replace = self.store.container(INTEGRATIONS).replace_item(doc.tenant_id.clone(), &doc.id, &doc, options);
            match self.store.call("an audit record claim", replace, "audit record", &doc.id).await {
                Ok(_) => Ok(Some(doc)),
                Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        let claimed = futures_util::future::join_all(claims).await.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut entries: Vec<AuditEntry> = claimed
            .into_iter()
            .flatten()
            .map(|doc| {
                self.partitions.insert(doc.record.id, doc.tenant_id);
                doc.record
            })
            .collect();
        entries.sort_by_key(|e| e.timestamp);
        Ok(entries)
    }

    #[tracing::instrument(skip_all, name = "audit_buffer.acknowledge", fields(count = ids.len()))]
    async fn acknowledge(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        for id in ids {
            let Some(partition) = self.locate(id).await? else { continue };
            let doc = doc_id(id);
            let delete = self.store.container(INTEGRATIONS).delete_item(partition, &doc, None);
            match self.store.call("an audit record delete", delete, "audit record", &doc).await {
                Ok(_) | Err(DomainError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            self.partitions.remove(id);
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "audit_buffer.backlog")]
    async fn backlog(&self) -> Result<AuditBacklog, DomainError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Recorded {
            recorded_at: i64,
        }
        let query = Query::from("SELECT c.recordedAt FROM c WHERE c.type = @type ORDER BY c.recordedAt")
            .with_parameter("@type", TYPE)
            .map_err(unexpected)?;
        let (rows, more) = self.store.query_page::<Recorded>(INTEGRATIONS, query, None, &PageRequest::first(BACKLOG_SCAN)).await?;
        let oldest = rows.first().and_then(|r| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.recorded_at) * 1_000_000).ok());
        Ok(AuditBacklog { count: rows.len() as u64 + u64::from(more.is_some()), oldest })
    }
}
