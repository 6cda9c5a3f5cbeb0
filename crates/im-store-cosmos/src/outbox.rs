//! [`Outbox`] on the outbox documents that repository batches write next to their changes.
//! Reading them is a cross-partition query ordered by the time they were recorded. A dead
//! letter stays where it was recorded with the type `outbox-dead`, which pending reads leave out.

use std::time::Duration;

use async_trait::async_trait;
use azure_data_cosmos::Query;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::cache::{self, BoundedCache};
use im_domain::common::invalid_continuation;
use im_domain::events::{Claimed, DeadLetter, DomainEvent, OutboxStats, UnreadableEntry};
use im_domain::ports::Outbox;
use im_domain::{DomainError, Page, PageRequest};
use serde::Deserialize;

use crate::client::{CONNECTIONS, CosmosStore, DELIVERIES, INTEGRATIONS, SYNC_EXECUTIONS, SYNC_TASKS};
use crate::docs::{OutboxDoc, etag_to_domain};
use crate::errors::unexpected;
use crate::support::precondition;

/// Events handed out whose location is remembered.
const PARTITIONS_CAPACITY: usize = 100_000;

/// Containers whose writes record events.
const SOURCES: [&str; 5] = [INTEGRATIONS, DELIVERIES, CONNECTIONS, SYNC_TASKS, SYNC_EXECUTIONS];

/// Tries of a conditional change that keeps meeting concurrent writes.
const CONDITIONAL_TRIES: usize = 5;

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
    #[serde(default)]
    integration_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recorded {
    recorded_at: i64,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A dead-letter listing's token: the source container it is in, and the page token inside it
/// (empty at the start of that container).
fn encode_dead_token(source: usize, inner: Option<&str>) -> String {
    format!("{source}.{}", inner.unwrap_or_default())
}

fn decode_dead_token(token: Option<&str>) -> Result<(usize, Option<String>), DomainError> {
    let Some(token) = token else { return Ok((0, None)) };
    let (source, inner) = token.split_once('.').ok_or_else(invalid_continuation)?;
    let source: usize = source.parse().map_err(|_| invalid_continuation())?;
    if source >= SOURCES.len() || (source == 0 && inner.is_empty()) {
        return Err(invalid_continuation());
    }
    Ok((source, Some(inner.to_owned()).filter(|i| !i.is_empty())))
}

impl CosmosOutbox {
    /// Up to `limit` of the oldest entries of type `kind` of each source container, oldest first.
    async fn oldest(&self, kind: &str, limit: u32) -> Result<Vec<(&'static str, OutboxDoc)>, DomainError> {
        let mut found = Vec::new();
        for container in SOURCES {
            let query = Query::from("SELECT * FROM c WHERE c.type = @type ORDER BY c.recordedAt")
                .with_parameter("@type", kind)
                .map_err(unexpected)?;
            let (docs, _) = self.store.query_page::<OutboxDoc>(container, query, None, &PageRequest::first(limit.clamp(1, 1000))).await?;
            found.extend(docs.into_iter().map(|d| (container, d)));
        }
        found.sort_by_key(|(_, d)| d.recorded_at);
        Ok(found)
    }

    /// Notes where each entry handed out lives, to change or delete it with a point operation,
    /// and reads its event.
    fn remember(&self, docs: impl Iterator<Item = (&'static str, OutboxDoc)>) -> Claimed {
        let mut claimed = Claimed::default();
        for (container, d) in docs {
            let Some(id) = d.event_id() else { continue };
            self.partitions.insert(id, (container, d.partition()));
            match serde_json::from_value::<DomainEvent>(d.event) {
                Ok(event) => claimed.events.push(event),
                Err(e) => claimed.unreadable.push(UnreadableEntry { id, reason: e.to_string() }),
            }
        }
        claimed
    }

    /// The container and partition of the entry of event `id`, if it is in the outbox.
    async fn locate(&self, id: &uuid::Uuid) -> Result<Option<(&'static str, String)>, DomainError> {
        if let Some(location) = self.partitions.get(id) {
            return Ok(Some(location));
        }
        let doc_id = OutboxDoc::id_for(id);
        for container in SOURCES {
            let query = Query::from("SELECT c.tenantId, c.integrationId FROM c WHERE c.id = @id")
                .with_parameter("@id", doc_id.as_str())
                .map_err(unexpected)?;
            let (found, _) = self.store.query_page::<Located>(container, query, None, &PageRequest::first(1)).await?;
            if let Some(l) = found.into_iter().next() {
                return Ok(Some((container, l.integration_id.unwrap_or(l.tenant_id))));
            }
        }
        Ok(None)
    }

    /// The entry of event `id` as stored now, with where it lives.
    async fn read(&self, id: &uuid::Uuid) -> Result<Option<(&'static str, OutboxDoc)>, DomainError> {
        let Some((container, partition)) = self.locate(id).await? else { return Ok(None) };
        let Some(raw) = self.store.read_document(container, &partition, &OutboxDoc::id_for(id)).await? else { return Ok(None) };
        let doc = serde_json::from_value::<OutboxDoc>(raw).map_err(unexpected)?;
        Ok(Some((container, doc)))
    }

    /// Replaces `doc` if it is still the version read: `false` when another write came first.
    async fn replace_if_unchanged(&self, container: &'static str, mut doc: OutboxDoc) -> Result<bool, DomainError> {
        let etag = doc.etag.take().map(|e| etag_to_domain(&e));
        let options = precondition(etag.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
        let replace = self.store.container(container).replace_item(doc.partition(), &doc.id, &doc, options);
        match self.store.call("an outbox change", replace, "outbox event", &doc.id).await {
            Ok(_) => Ok(true),
            Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Applies `change` to the entry of event `id` by conditional write, reading again after a
    /// concurrent change. `change` answers `None` to leave the entry alone (with its answer).
    async fn change<R>(&self, id: &uuid::Uuid, change: impl Fn(&mut OutboxDoc) -> Result<R, R>) -> Result<Option<R>, DomainError> {
        for _ in 0..CONDITIONAL_TRIES {
            let Some((container, mut doc)) = self.read(id).await? else { return Ok(None) };
            match change(&mut doc) {
                Err(unchanged) => return Ok(Some(unchanged)),
                Ok(answer) => {
                    if self.replace_if_unchanged(container, doc).await? {
                        return Ok(Some(answer));
                    }
                }
            }
        }
        Err(DomainError::unavailable("the outbox entry keeps changing; try again"))
    }
}

#[async_trait]
impl Outbox for CosmosOutbox {
    #[tracing::instrument(skip_all, name = "outbox.pending", fields(limit = limit))]
    async fn pending(&self, limit: u32) -> Result<Vec<DomainEvent>, DomainError> {
        let found = self.oldest(OutboxDoc::TYPE, limit).await?;
        Ok(self.remember(found.into_iter().take(limit as usize)).events)
    }

    #[tracing::instrument(skip_all, name = "outbox.claim", fields(owner = %owner, limit = limit))]
    async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Claimed, DomainError> {
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let candidates = self
            // Look past events other relays hold.
            .oldest(OutboxDoc::TYPE, limit.saturating_mul(4))
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
            let replace = self.store.container(container).replace_item(doc.partition(), &doc.id, &doc, options);
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
            let Some((container, partition)) = self.locate(id).await? else { continue };
            let doc_id = OutboxDoc::id_for(id);
            let delete = self.store.container(container).delete_item(partition, &doc_id, None);
            match self.store.call("an outbox delete", delete, "outbox event", &doc_id).await {
                Ok(_) | Err(DomainError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            self.partitions.remove(id);
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "outbox.release", fields(owner = %owner, count = ids.len()))]
    async fn release(&self, owner: &str, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        for id in ids {
            self.change(id, |doc| {
                if doc.claimed_by.as_deref() != Some(owner) {
                    return Err(());
                }
                doc.claimed_by = None;
                doc.claimed_until = None;
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "outbox.record_failure", fields(event_id = %id))]
    async fn record_failure(&self, id: uuid::Uuid, reason: &str, max_attempts: u32) -> Result<bool, DomainError> {
        let dead = self
            .change(&id, |doc| {
                if doc.kind != OutboxDoc::TYPE {
                    return Err(false);
                }
                doc.attempts = doc.attempts.saturating_add(1);
                doc.last_error = Some(reason.to_owned());
                if doc.attempts >= max_attempts {
                    doc.kind = OutboxDoc::DEAD_TYPE.into();
                    doc.dead_at = Some(now_ms());
                    doc.claimed_by = None;
                    doc.claimed_until = None;
                    return Ok(true);
                }
                Ok(false)
            })
            .await?;
        Ok(dead.unwrap_or(false))
    }

    #[tracing::instrument(skip_all, name = "outbox.dead_letters", fields(limit = page.limit))]
    async fn dead_letters(&self, page: &PageRequest) -> Result<Page<DeadLetter>, DomainError> {
        let (source, inner) = decode_dead_token(page.continuation.as_deref())?;
        let container = SOURCES[source];
        let query = Query::from("SELECT * FROM c WHERE c.type = @type ORDER BY c.id")
            .with_parameter("@type", OutboxDoc::DEAD_TYPE)
            .map_err(unexpected)?;
        let request = PageRequest { limit: page.limit, continuation: inner };
        let (docs, next) = self.store.query_page::<OutboxDoc>(container, query, None, &request).await?;
        let continuation = match next {
            Some(token) => Some(encode_dead_token(source, Some(&token))),
            None if source + 1 < SOURCES.len() => Some(encode_dead_token(source + 1, None)),
            None => None,
        };
        let items = docs
            .into_iter()
            .filter_map(|d| {
                let text = |key: &str| d.event.get(key).and_then(|v| v.as_str()).map(str::to_owned);
                Some(DeadLetter {
                    id: d.event_id()?,
                    event_type: text("eventType"),
                    tenant_id: Some(d.tenant_id.clone()),
                    attempts: d.attempts,
                    last_error: d.last_error.clone().unwrap_or_default(),
                    recorded_at: from_ms(d.recorded_at),
                    dead_at: from_ms(d.dead_at.unwrap_or_default()),
                })
            })
            .collect();
        Ok(Page { items, continuation })
    }

    #[tracing::instrument(skip_all, name = "outbox.requeue", fields(event_id = %id))]
    async fn requeue(&self, id: uuid::Uuid) -> Result<(), DomainError> {
        let requeued = self
            .change(&id, |doc| {
                if doc.kind != OutboxDoc::DEAD_TYPE {
                    return Err(false);
                }
                doc.kind = OutboxDoc::TYPE.into();
                doc.attempts = 0;
                doc.dead_at = None;
                doc.claimed_by = None;
                doc.claimed_until = None;
                Ok(true)
            })
            .await?;
        if requeued == Some(true) { Ok(()) } else { Err(DomainError::not_found("dead letter", id)) }
    }

    #[tracing::instrument(skip_all, name = "outbox.stats")]
    async fn stats(&self) -> Result<OutboxStats, DomainError> {
        // Cross-partition aggregates are not available: count what a bounded scan sees.
        let mut stats = OutboxStats::default();
        let mut oldest_ms: Option<i64> = None;
        for kind in [OutboxDoc::TYPE, OutboxDoc::DEAD_TYPE] {
            for container in SOURCES {
                let query = Query::from("SELECT c.recordedAt FROM c WHERE c.type = @type ORDER BY c.recordedAt")
                    .with_parameter("@type", kind)
                    .map_err(unexpected)?;
                let (rows, more) = self.store.query_page::<Recorded>(container, query, None, &PageRequest::first(1000)).await?;
                let count = rows.len() as u64 + u64::from(more.is_some());
                if kind == OutboxDoc::DEAD_TYPE {
                    stats.dead_letters += count;
                    continue;
                }
                stats.pending += count;
                if let Some(first) = rows.first() {
                    oldest_ms = Some(oldest_ms.map_or(first.recorded_at, |o| o.min(first.recorded_at)));
                }
            }
        }
        stats.oldest = oldest_ms.map(from_ms);
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_tokens_round_trip_and_forged_ones_are_refused() {
        assert_eq!(decode_dead_token(None).unwrap(), (0, None));
        assert_eq!(decode_dead_token(Some(&encode_dead_token(0, Some("abc")))).unwrap(), (0, Some("abc".into())));
        assert_eq!(decode_dead_token(Some(&encode_dead_token(1, None))).unwrap(), (1, None));
        for forged in ["", "0.", "9.abc", "x.abc", "abc"] {
            assert!(decode_dead_token(Some(forged)).is_err(), "{forged}");
        }
    }
}
