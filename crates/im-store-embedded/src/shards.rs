//! The embedded Shard Manager: the [`ShardManager`] port on the documents table, so sync runs
//! end to end on one machine. Records live in container `shard_records`, partition
//! `{tenant}/{shardType}`, id the record key. Every write (a tombstone too) takes the next
//! number of the partition's change sequence (`seq`, in the writer's transaction, so numbers are
//! unique and increasing); `changes` reads `seq > cursor` in order and the cursor is the last
//! number read. The version of a record is its `seq`.

use async_trait::async_trait;
use im_domain::sync::ports::{ShardChanges, ShardManager, ShardPut, ShardRecord, ShardWrite, ShardWritten};
use im_domain::{DomainError, TenantId};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::db::map_sqlite;
use crate::documents::Documents;

const SHARDS: &str = "shard_records";
/// The most records one `changes` call returns.
const MAX_LIMIT: u32 = 1000;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordDoc {
    seq: i64,
    data: Value,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    provider_version: Option<String>,
    #[serde(default)]
    deleted: bool,
}

fn partition(tenant: &TenantId, shard_type: &str) -> String {
    format!("{tenant}/{shard_type}")
}

fn encode(doc: &RecordDoc) -> Result<String, DomainError> {
    serde_json::to_string(doc).map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("encoding a shard record")))
}

fn decode(body: &str) -> rusqlite::Result<RecordDoc> {
    serde_json::from_str(body).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn bad_cursor() -> DomainError {
    DomainError::invalid("cursor", "is not a cursor this Shard Manager issued")
}

/// [`ShardManager`] on the embedded store.
pub(crate) struct EmbeddedShards {
    docs: Documents,
}

impl EmbeddedShards {
    pub(crate) fn new(docs: Documents) -> Self {
        Self { docs }
    }

    /// Writes `doc` (data or tombstone) as the next change of the partition, conditionally on
    /// `if_match` (the current live version).
    async fn write(&self, pk: String, key: String, doc: RecordDoc, if_match: Option<String>) -> Result<i64, DomainError> {
        self.docs
            .transaction(move |tx, _| {
                let last = last_seq(tx, &pk)?;
                write_in(tx, &pk, &key, doc, if_match.as_ref(), last + 1)
            })
            .await
    }
}

fn validate_key(key: &str) -> Result<(), DomainError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(DomainError::invalid("key", "must be 1 to 1024 characters"));
    }
    Ok(())
}

fn record_doc(write: &ShardWrite) -> RecordDoc {
    RecordDoc {
        seq: 0,
        data: write.data.clone(),
        updated_at: write.updated_at,
        source: Some(write.source.clone()),
        provider_version: write.version.clone(),
        deleted: false,
    }
}

/// The partition's last change number (0 before the first).
fn last_seq(tx: &rusqlite::Connection, pk: &str) -> Result<i64, DomainError> {
    // The container is written out so the partial index `shard_records_by_seq` serves it.
    let last: Option<i64> = tx
        .prepare_cached("SELECT max(json_extract(body, '$.seq')) FROM documents WHERE container = 'shard_records' AND pk = ?1")
        .and_then(|mut s| s.query_row(params![pk], |r| r.get(0)))
        .map_err(map_sqlite)?;
    Ok(last.unwrap_or(0))
}

/// Writes `doc` as change number `seq` inside the writer's transaction, conditionally on
/// `if_match` (the current live version); writes nothing when the condition fails.
fn write_in(
    tx: &rusqlite::Connection,
    pk: &str,
    key: &str,
    mut doc: RecordDoc,
    if_match: Option<&String>,
    seq: i64,
) -> Result<i64, DomainError> {
    if let Some(expected) = if_match {
        let current: Option<String> = tx
            .prepare_cached("SELECT body FROM documents WHERE container = +?1 AND pk = ?2 AND id = ?3")
            .and_then(|mut s| s.query_row(params![SHARDS, pk, key], |r| r.get(0)).optional())
            .map_err(map_sqlite)?;
        let current = current.map(|b| decode(&b)).transpose().map_err(map_sqlite)?;
        let live = current.as_ref().filter(|c| !c.deleted).map(|c| c.seq.to_string());
        if live.as_ref() != Some(expected) {
            return Err(DomainError::PreconditionFailed);
        }
    }
    doc.seq = seq;
    let body = encode(&doc)?;
    let etag = uuid::Uuid::new_v4().simple().to_string();
    tx.prepare_cached(
        "INSERT INTO documents (container, pk, id, etag, body, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, NULL) \
         ON CONFLICT (container, pk, id) DO UPDATE SET etag = excluded.etag, body = excluded.body",
    )
    .and_then(|mut s| s.execute(params![SHARDS, pk, key, etag, body]))
    .map_err(map_sqlite)?;
    Ok(doc.seq)
}

#[async_trait]
impl ShardManager for EmbeddedShards {
    #[tracing::instrument(skip_all, name = "shards.put", fields(tenant = %tenant, shard_type))]
    async fn put(
        &self,
        tenant: &TenantId,
        shard_type: &str,
        key: &str,
        write: &ShardWrite,
        if_match: Option<String>,
    ) -> Result<ShardWritten, DomainError> {
        validate_key(key)?;
        let seq = self.write(partition(tenant, shard_type), key.to_owned(), record_doc(write), if_match).await?;
        Ok(ShardWritten { key: key.to_owned(), version: seq.to_string(), updated_at: write.updated_at })
    }

    /// One transaction of the single writer for the whole batch: consecutive change numbers,
    /// one commit.
    #[tracing::instrument(skip_all, name = "shards.put_many", fields(tenant = %tenant, shard_type, count = puts.len()))]
    async fn put_many(
        &self,
        tenant: &TenantId,
        shard_type: &str,
        puts: &[ShardPut],
    ) -> Result<Vec<Result<ShardWritten, DomainError>>, DomainError> {
        let pk = partition(tenant, shard_type);
        let items: Vec<_> =
            puts.iter().map(|p| (p.key.clone(), validate_key(&p.key).map(|()| record_doc(&p.write)), p.if_match.clone())).collect();
        let versions = self
            .docs
            .transaction(move |tx, _| {
                let mut next = last_seq(tx, &pk)? + 1;
                let mut outcomes = Vec::with_capacity(items.len());
                for (key, doc, if_match) in items {
                    let outcome = match doc.and_then(|doc| write_in(tx, &pk, &key, doc, if_match.as_ref(), next)) {
                        Err(e @ (DomainError::PreconditionFailed | DomainError::Validation(_))) => Err(e),
                        Err(e) => return Err(e),
                        Ok(seq) => {
                            next += 1;
                            Ok(seq)
                        }
                    };
                    outcomes.push(outcome);
                }
                Ok(outcomes)
            })
            .await?;
        Ok(puts
            .iter()
            .zip(versions)
            .map(|(p, seq)| seq.map(|seq| ShardWritten { key: p.key.clone(), version: seq.to_string(), updated_at: p.write.updated_at }))
            .collect())
    }

    #[tracing::instrument(skip_all, name = "shards.changes", fields(tenant = %tenant, shard_type))]
    async fn changes(&self, tenant: &TenantId, shard_type: &str, cursor: Option<String>, limit: u32) -> Result<ShardChanges, DomainError> {
        let after: i64 = match cursor.as_deref() {
            None => 0,
            Some(text) => text.parse().ok().filter(|n: &i64| *n >= 0).ok_or_else(bad_cursor)?,
        };
        let pk = partition(tenant, shard_type);
        let limit = i64::from(limit.clamp(1, MAX_LIMIT));
        let items = self
            .docs
            .transaction(move |tx, _| {
                let mut statement = tx
                    .prepare_cached(
                        "SELECT id, body FROM documents WHERE container = 'shard_records' AND pk = ?1 AND json_extract(body, '$.seq') > ?2 \
                         ORDER BY json_extract(body, '$.seq') LIMIT ?3",
                    )
                    .map_err(map_sqlite)?;
                let rows = statement
                    .query_map(params![pk, after, limit], |r| Ok((r.get::<_, String>(0)?, decode(&r.get::<_, String>(1)?)?)))
                    .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                    .map_err(map_sqlite)?;
                Ok(rows)
            })
            .await?;
        let next = items.last().map_or(after, |(_, doc)| doc.seq);
        let items = items
            .into_iter()
            .map(|(key, doc)| ShardRecord {
                key,
                version: doc.seq.to_string(),
                updated_at: doc.updated_at,
                source: doc.source,
                deleted: doc.deleted,
                data: if doc.deleted { Value::Null } else { doc.data },
            })
            .collect();
        Ok(ShardChanges { items, next_cursor: next.to_string() })
    }

    #[tracing::instrument(skip_all, name = "shards.delete", fields(tenant = %tenant, shard_type))]
    async fn delete(&self, tenant: &TenantId, shard_type: &str, key: &str) -> Result<(), DomainError> {
        let doc = RecordDoc {
            seq: 0,
            data: Value::Null,
            updated_at: OffsetDateTime::now_utc(),
            source: None,
            provider_version: None,
            deleted: true,
        };
        self.write(partition(tenant, shard_type), key.to_owned(), doc, None).await.map(|_| ())
    }
}
