//! [`Outbox`] on the `outbox` table, written in the same transactions as the documents.

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::events::{DomainEvent, OutboxStats};
use im_domain::ports::Outbox;
use rusqlite::params_from_iter;

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

#[async_trait]
impl Outbox for SqliteOutbox {
    async fn pending(&self, limit: u32) -> Result<Vec<DomainEvent>, DomainError> {
        let bodies = self
            .db
            .read(move |conn| {
                conn.prepare_cached("SELECT body FROM outbox ORDER BY seq LIMIT ?1")?
                    .query_map([i64::from(limit)], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        bodies
            .iter()
            .map(|b| {
                serde_json::from_str(b).map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("decoding an outbox event")))
            })
            .collect()
    }

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
