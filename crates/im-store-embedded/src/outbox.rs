//! [`Outbox`] on the `outbox` table, written in the same transactions as the documents.

use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::events::{DomainEvent, OutboxStats};
use im_domain::ports::Outbox;
use rusqlite::{params, params_from_iter};

use crate::db::{Db, map_sqlite};
use std::sync::Arc;

pub(crate) struct SqliteOutbox {
    db: Arc<Db>,
}

impl SqliteOutbox {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

fn decode_all(bodies: &[String]) -> Result<Vec<DomainEvent>, DomainError> {
    bodies
        .iter()
        .map(|b| serde_json::from_str(b).map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("decoding an outbox event"))))
        .collect()
}

#[async_trait]
impl Outbox for SqliteOutbox {
    #[tracing::instrument(skip_all, name = "outbox.pending", fields(limit = limit))]
    async fn pending(&self, limit: u32) -> Result<Vec<DomainEvent>, DomainError> {
        let bodies = self
            .db
            .read(move |conn| {
                conn.prepare_cached("SELECT body FROM outbox ORDER BY seq LIMIT ?1")?
                    .query_map([i64::from(limit)], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        decode_all(&bodies)
    }

    #[tracing::instrument(skip_all, name = "outbox.claim", fields(owner = %owner, limit = limit))]
    async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Vec<DomainEvent>, DomainError> {
        let owner = owner.to_owned();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let bodies = self
            .db
            .write(move |tx| {
                let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
                let rows: Vec<(i64, String)> = tx
                    .prepare_cached("SELECT seq, body FROM outbox WHERE claimed_until <= ?1 OR claimed_by = ?2 ORDER BY seq LIMIT ?3")
                    .and_then(|mut s| s.query_map(params![now, owner, i64::from(limit)], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                    .map_err(map_sqlite)?;
                for (seq, _) in &rows {
                    tx.prepare_cached("UPDATE outbox SET claimed_by = ?2, claimed_until = ?3 WHERE seq = ?1")
                        .and_then(|mut s| s.execute(params![seq, owner, now.saturating_add(lease_ms)]))
                        .map_err(map_sqlite)?;
                }
                Ok(rows.into_iter().map(|(_, body)| body).collect::<Vec<_>>())
            })
            .await?;
        decode_all(&bodies)
    }

    #[tracing::instrument(skip_all, name = "outbox.mark_published", fields(count = ids.len()))]
    async fn mark_published(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        self.db
            .write(move |tx| {
                for chunk in ids.chunks(500) {
                    let marks = vec!["?"; chunk.len()].join(",");
                    tx.execute(&format!("DELETE FROM outbox WHERE id IN ({marks})"), params_from_iter(chunk)).map_err(map_sqlite)?;
                }
                Ok(())
            })
            .await
    }

    #[tracing::instrument(skip_all, name = "outbox.stats")]
    async fn stats(&self) -> Result<OutboxStats, DomainError> {
        let (pending, oldest) = self
            .db
            .read(|conn| {
                conn.query_row("SELECT count(*), min(created_at) FROM outbox", [], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
                })
            })
            .await?;
        let oldest = oldest.and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok());
        Ok(OutboxStats { pending: pending.max(0) as u64, oldest })
    }
}
