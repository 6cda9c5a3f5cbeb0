//! [`AuditBuffer`] on the `audit_buffer` table: audit records wait there for the Logging Service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::audit::{AuditBacklog, AuditBuffer, AuditEntry};
use rusqlite::params;

use crate::db::{Db, map_sqlite};
use crate::support::LeasedQueue;

/// Every buffered record may be claimed.
const AUDIT_BUFFER: LeasedQueue = LeasedQueue { table: "audit_buffer", eligible: "TRUE" };

pub(crate) struct SqliteAuditBuffer {
    db: Arc<Db>,
}

impl SqliteAuditBuffer {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

fn ms(at: time::OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

#[async_trait]
impl AuditBuffer for SqliteAuditBuffer {
    #[tracing::instrument(skip_all, name = "audit_buffer.append", fields(record_id = %entry.id))]
    async fn append(&self, entry: &AuditEntry) -> Result<(), DomainError> {
        let body = serde_json::to_string(entry).map_err(|e| DomainError::Unexpected(e.into()))?;
        let (id, recorded_at) = (entry.id.to_string(), ms(entry.timestamp));
        self.db
            .write(move |tx| {
                tx.prepare_cached("INSERT INTO audit_buffer (id, recorded_at, body) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO NOTHING")
                    .and_then(|mut s| s.execute(params![id, recorded_at, body]))
                    .map_err(map_sqlite)?;
                Ok(())
            })
            .await
    }

    #[tracing::instrument(skip_all, name = "audit_buffer.claim", fields(owner = %owner, limit = limit))]
    async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Vec<AuditEntry>, DomainError> {
        let owner = owner.to_owned();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows = self.db.write(move |tx| AUDIT_BUFFER.claim(tx, &owner, limit, ms(time::OffsetDateTime::now_utc()), lease_ms)).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, body)| match serde_json::from_str(&body) {
                Ok(entry) => Some(entry),
                Err(error) => {
                    // Written by this service in this form; it stays (and counts in the backlog).
                    tracing::error!(id, %error, "an audit buffer entry cannot be read");
                    None
                }
            })
            .collect())
    }

    #[tracing::instrument(skip_all, name = "audit_buffer.acknowledge", fields(count = ids.len()))]
    async fn acknowledge(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        self.db.write(move |tx| AUDIT_BUFFER.delete(tx, &ids)).await
    }

    #[tracing::instrument(skip_all, name = "audit_buffer.backlog")]
    async fn backlog(&self) -> Result<AuditBacklog, DomainError> {
        let (count, oldest): (i64, Option<i64>) = self
            .db
            .read(|conn| conn.query_row("SELECT count(*), min(recorded_at) FROM audit_buffer", [], |r| Ok((r.get(0)?, r.get(1)?))))
            .await?;
        let oldest = oldest.and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok());
        Ok(AuditBacklog { count: u64::try_from(count).unwrap_or_default(), oldest })
    }
}
