//! [`Outbox`] on the outbox documents that repository batches write next to their changes.
//! Reading them is a cross-partition query ordered by the time they were recorded.

use std::time::Duration;

use async_trait::async_trait;
use azure_data_cosmos::Query;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::cache::{self, BoundedCache};
use im_domain::events::{DomainEvent, OutboxStats};
use im_domain::ports::Outbox;
use im_domain::{DomainError, PageRequest};
use serde::Deserialize;

use crate::client::{CosmosStore, DELIVERIES, INTEGRATIONS, SYNC_EXECUTIONS, SYNC_TASKS};
use crate::docs::{OutboxDoc, etag_to_domain};
use crate::errors::unexpected;
use crate::support::precondition;

/// Events handed out whose location is remembered.
const PARTITIONS_CAPACITY: usize = 100_000;

/// Containers whose writes record events.
const SOURCES: [&str; 4] = [INTEGRATIONS, DELIVERIES, SYNC_TASKS, SYNC_EXECUTIONS];

pub(crate) struct CosmosOutbox {
    store: CosmosStore,
    /// Container and partition of each event handed out by `pending`, to delete it with a point operation.
    /// Bounded: an event no longer remembered is found again by a query.
    partitions: BoundedCache<uuid::Uuid, (&'static str, String)>,
}

impl CosmosOutbox {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store, partitions: cache::bounded(PARTITIONS_CAPACITY) }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Located {
    tenant_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recorded {
    recorded_at: i64,
}

impl CosmosOutbox {
    /// Up to `limit` of the oldest events of each source container, oldest first.
    async fn oldest(&self, limit: u32) -> Result<Vec<(&'static str, OutboxDoc)>, DomainError> {
        let mut found = Vec::new();
        for container in SOURCES {
            let query = Query::from("SELECT * FROM c WHERE c.type = @type ORDER BY c.recordedAt")
                .with_parameter("@type", OutboxDoc::TYPE)
                .map_err(unexpected)?;
            let (docs, _) = self.store.query_page::<OutboxDoc>(container, query, None, &PageRequest::first(limit.clamp(1, 1000))).await?;
            found.extend(docs.into_iter().map(|d| (container, d)));
        }
        found.sort_by_key(|(_, d)| d.recorded_at);
        Ok(found)
    }

    /// Notes where each event handed out lives, to delete it with a point operation.
    fn remember(&self, docs: impl Iterator<Item = (&'static str, OutboxDoc)>) -> Vec<DomainEvent> {
        docs.map(|(container, d)| {
            self.partitions.insert(d.event.id, (container, d.tenant_id));
            d.event
        })
        .collect()
    }
}

#[async_trait]
impl Outbox for CosmosOutbox {
    #[tracing::instrument(skip_all, name = "outbox.pending", fields(limit = limit))]
    async fn pending(&self, limit: u32) -> Result<Vec<DomainEvent>, DomainError> {
        let found = self.oldest(limit).await?;
        Ok(self.remember(found.into_iter().take(limit as usize)))
    }

    #[tracing::instrument(skip_all, name = "outbox.claim", fields(owner = %owner, limit = limit))]
    async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Vec<DomainEvent>, DomainError> {
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let candidates = self
            // Look past events other relays hold.
            .oldest(limit.saturating_mul(4))
            .await?
            .into_iter()
            .filter(|(_, d)| d.claimed_until.is_none_or(|t| t <= now) || d.claimed_by.as_deref() == Some(owner))
            .take(limit as usize);
        // Each hold is a write conditional on the version read: of two relays, one wins.
        let claims = candidates.map(|(container, mut doc)| async move {
            let etag = doc.etag.take().map(|e| etag_to_domain(&e));
            doc.claimed_by = Some(owner.to_owned());
            doc.claimed_until = Some(until);
            let options = precondition(etag.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
            let replace = self.store.container(container).replace_item(doc.tenant_id.clone(), &doc.id, &doc, options);
            match self.store.call("an outbox claim", replace, "outbox event", &doc.id).await {
                Ok(_) => Ok(Some((container, doc))),
                Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        let claimed = futures_util::future::join_all(claims).await.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(self.remember(claimed.into_iter().flatten()))
    }

    #[tracing::instrument(skip_all, name = "outbox.mark_published", fields(count = ids.len()))]
    async fn mark_published(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        for id in ids {
            let known = self.partitions.get(id);
            let doc_id = format!("outbox-{id}");
            let location = match known {
                Some(location) => Some(location),
                None => {
                    let mut location = None;
                    for container in SOURCES {
                        let query = Query::from("SELECT c.tenantId FROM c WHERE c.id = @id")
                            .with_parameter("@id", doc_id.as_str())
                            .map_err(unexpected)?;
                        let (found, _) = self.store.query_page::<Located>(container, query, None, &PageRequest::first(1)).await?;
                        if let Some(l) = found.into_iter().next() {
                            location = Some((container, l.tenant_id));
                            break;
                        }
                    }
                    location
                }
            };
            let Some((container, partition)) = location else { continue };
            let delete = self.store.container(container).delete_item(partition, &doc_id, None);
            match self.store.call("an outbox delete", delete, "outbox event", &doc_id).await {
                Ok(_) | Err(DomainError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            self.partitions.remove(id);
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "outbox.stats")]
    async fn stats(&self) -> Result<OutboxStats, DomainError> {
        // Cross-partition aggregates are not available: count what a bounded scan sees.
        let (mut pending, mut oldest_ms): (u64, Option<i64>) = (0, None);
        for container in SOURCES {
            let query = Query::from("SELECT c.recordedAt FROM c WHERE c.type = @type ORDER BY c.recordedAt")
                .with_parameter("@type", OutboxDoc::TYPE)
                .map_err(unexpected)?;
            let (rows, more) = self.store.query_page::<Recorded>(container, query, None, &PageRequest::first(1000)).await?;
            pending += rows.len() as u64 + u64::from(more.is_some());
            if let Some(first) = rows.first() {
                oldest_ms = Some(oldest_ms.map_or(first.recorded_at, |o| o.min(first.recorded_at)));
            }
        }
        let oldest = oldest_ms.and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok());
        Ok(OutboxStats { pending, oldest })
    }
}
