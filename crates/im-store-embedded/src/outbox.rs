//! [`Outbox`] on the `outbox` table, written in the same transactions as the documents.
//! A dead letter is a row with `dead_at` set: every pending read skips it.

use std::time::Duration;

use async_trait::async_trait;
use im_domain::events::{Claimed, DeadLetter, DomainEvent, OutboxStats, UnreadableEntry};
use im_domain::ports::Outbox;
use im_domain::{DomainError, Page, PageRequest};
use rusqlite::{OptionalExtension, params};

use crate::db::{Db, map_sqlite};
use crate::documents::{decode_token, encode_token};
use crate::support::LeasedQueue;

/// Dead letters wait for an operator; every other entry may be claimed.
const OUTBOX: LeasedQueue = LeasedQueue { table: "outbox", eligible: "dead_at IS NULL" };
use std::sync::Arc;

pub(crate) struct SqliteOutbox {
    db: Arc<Db>,
}

impl SqliteOutbox {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `(event id, body)` rows, decoded: readable events, and the entries this version cannot read.
fn decode_all(rows: Vec<(String, String)>) -> Claimed {
    let mut claimed = Claimed::default();
    for (id, body) in rows {
        match serde_json::from_str::<DomainEvent>(&body) {
            Ok(event) => claimed.events.push(event),
            Err(e) => {
                if let Ok(id) = uuid::Uuid::parse_str(&id) {
                    claimed.unreadable.push(UnreadableEntry { id, reason: e.to_string() });
                }
            }
        }
    }
    claimed
}

#[async_trait]
impl Outbox for SqliteOutbox {
    #[tracing::instrument(skip_all, name = "outbox.pending", fields(limit = limit))]
    async fn pending(&self, limit: u32) -> Result<Vec<DomainEvent>, DomainError> {
        let rows = self
            .db
            .read(move |conn| {
                conn.prepare_cached("SELECT id, body FROM outbox WHERE dead_at IS NULL ORDER BY seq LIMIT ?1")?
                    .query_map([i64::from(limit)], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(decode_all(rows).events)
    }

    #[tracing::instrument(skip_all, name = "outbox.claim", fields(owner = %owner, limit = limit))]
    async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Claimed, DomainError> {
        let owner = owner.to_owned();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .db
            .write(move |tx| {
                let rows = OUTBOX.claim(tx, &owner, limit, now_ms(), lease_ms)?;
                Ok(rows)
            })
            .await?;
        Ok(decode_all(rows))
    }

    #[tracing::instrument(skip_all, name = "outbox.mark_published", fields(count = ids.len()))]
    async fn mark_published(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        self.db.write(move |tx| OUTBOX.delete(tx, &ids)).await
    }

    #[tracing::instrument(skip_all, name = "outbox.release", fields(owner = %owner, count = ids.len()))]
    async fn release(&self, owner: &str, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (owner, ids): (String, Vec<String>) = (owner.to_owned(), ids.iter().map(ToString::to_string).collect());
        self.db
            .write(move |tx| {
                for chunk in ids.chunks(500) {
                    let marks = vec!["?"; chunk.len()].join(",");
                    let sql = format!("UPDATE outbox SET claimed_by = NULL, claimed_until = 0 WHERE claimed_by = ? AND id IN ({marks})");
                    tx.execute(&sql, rusqlite::params_from_iter(std::iter::once(&owner).chain(chunk))).map_err(map_sqlite)?;
                }
                // Unclaimed now: a relay's next round takes them.
                crate::db::note_outbox_write();
                Ok(())
            })
            .await
    }

    #[tracing::instrument(skip_all, name = "outbox.record_failure", fields(event_id = %id))]
    async fn record_failure(&self, id: uuid::Uuid, reason: &str, max_attempts: u32) -> Result<bool, DomainError> {
        let (id, reason) = (id.to_string(), reason.to_owned());
        self.db
            .write(move |tx| {
                // One statement: the count and the dead mark change together.
                let dead: Option<bool> = tx
                    .prepare_cached(
                        "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, \
                         dead_at = CASE WHEN attempts + 1 >= ?3 THEN ?4 ELSE NULL END \
                         WHERE id = ?1 AND dead_at IS NULL RETURNING dead_at IS NOT NULL",
                    )
                    .and_then(|mut s| s.query_row(params![id, reason, i64::from(max_attempts), now_ms()], |r| r.get(0)).optional())
                    .map_err(map_sqlite)?;
                Ok(dead.unwrap_or(false))
            })
            .await
    }

    #[tracing::instrument(skip_all, name = "outbox.dead_letters", fields(limit = page.limit))]
    async fn dead_letters(&self, page: &PageRequest) -> Result<Page<DeadLetter>, DomainError> {
        let after = page.continuation.as_deref().map(decode_token).transpose()?.unwrap_or_default();
        let limit = page.limit;
        let rows: Vec<(String, String, i64, Option<String>, i64, i64)> = self
            .db
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT id, body, attempts, last_error, created_at, dead_at FROM outbox \
                     WHERE dead_at IS NOT NULL AND id > ?1 ORDER BY id LIMIT ?2",
                )?
                .query_map(params![after, i64::from(limit) + 1], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let more = rows.len() > limit as usize;
        let items: Vec<DeadLetter> = rows
            .into_iter()
            .take(limit as usize)
            .filter_map(|(id, body, attempts, last_error, recorded, dead)| {
                let head = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
                let text = |key: &str| head.get(key).and_then(|v| v.as_str()).map(str::to_owned);
                Some(DeadLetter {
                    id: uuid::Uuid::parse_str(&id).ok()?,
                    event_type: text("eventType"),
                    tenant_id: text("tenantId"),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    last_error: last_error.unwrap_or_default(),
                    recorded_at: from_ms(recorded),
                    dead_at: from_ms(dead),
                })
            })
            .collect();
        let continuation = if more { items.last().map(|d| encode_token(&d.id.to_string())) } else { None };
        Ok(Page { items, continuation })
    }

    #[tracing::instrument(skip_all, name = "outbox.requeue", fields(event_id = %id))]
    async fn requeue(&self, id: uuid::Uuid) -> Result<(), DomainError> {
        let key = id.to_string();
        let changed = self
            .db
            .write(move |tx| {
                tx.prepare_cached(
                    "UPDATE outbox SET attempts = 0, dead_at = NULL, claimed_by = NULL, claimed_until = 0 \
                     WHERE id = ?1 AND dead_at IS NOT NULL",
                )
                .and_then(|mut s| s.execute([key]))
                .map_err(map_sqlite)
            })
            .await?;
        if changed == 0 { Err(DomainError::not_found("dead letter", id)) } else { Ok(()) }
    }

    #[tracing::instrument(skip_all, name = "outbox.stats")]
    async fn stats(&self) -> Result<OutboxStats, DomainError> {
        let (pending, oldest, dead) = self
            .db
            .read(|conn| {
                conn.query_row(
                    "SELECT count(*) FILTER (WHERE dead_at IS NULL), min(created_at) FILTER (WHERE dead_at IS NULL), \
                     count(*) FILTER (WHERE dead_at IS NOT NULL) FROM outbox",
                    [],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, i64>(2)?)),
                )
            })
            .await?;
        Ok(OutboxStats { pending: pending.max(0) as u64, oldest: oldest.map(from_ms), dead_letters: dead.max(0) as u64 })
    }
}
