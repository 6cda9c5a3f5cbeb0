//! Sync tasks (`integration_sync_tasks`), executions (`integration_sync_executions`, 30 days)
//! and per-record states and conflicts (`integration_sync_states`, `integration_sync_conflicts`,
//! containers of the embedded store only) on the documents table, all partitioned by tenant.

use std::sync::Arc;

use async_trait::async_trait;
use im_domain::events::DomainEvent;
use im_domain::sync::ports::{StatePut, SyncExecutionRepository, SyncStateRepository, SyncTaskRepository};
use im_domain::sync::unix_millis::to_millis;
use im_domain::sync::{EXECUTION_TTL, SyncConflict, SyncExecution, SyncState, SyncTask, SyncTaskId, state_id};
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};
use rusqlite::params;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::containers::{SYNC_CONFLICTS, SYNC_EXECUTIONS, SYNC_STATES, SYNC_TASKS};
use crate::db::{Db, map_sqlite};
use crate::documents::{Doc, Documents, Query};
use crate::support::{decode, decode_page, encode, get_decoded, partition_query};

const TASK: &str = "sync task";
const EXECUTION: &str = "sync execution";
const CONFLICT: &str = "sync conflict";

fn by_task(container: &'static str, tenant: &TenantId, task: SyncTaskId, page: &PageRequest) -> Query {
    partition_query(container, tenant.to_string(), vec![("$.taskId", task.to_string())], page)
}

pub(crate) struct SqliteSync {
    docs: Documents,
    db: Arc<Db>,
}

impl SqliteSync {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        Self { docs: Documents::new(db.clone()), db }
    }
}

#[async_trait]
impl SyncTaskRepository for SqliteSync {
    #[tracing::instrument(skip_all, name = "sync_tasks.create", fields(tenant = %task.tenant_id, task = %task.id))]
    async fn create(&self, task: &SyncTask) -> Result<ETag, DomainError> {
        self.docs.create(SYNC_TASKS, task.tenant_id.to_string(), task.id.to_string(), encode(task)?, None).await
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.get", fields(tenant = %tenant, task = %id))]
    async fn get(&self, tenant: &TenantId, id: SyncTaskId) -> Result<Stored<SyncTask>, DomainError> {
        get_decoded(&self.docs, SYNC_TASKS, TASK, tenant.to_string(), id).await
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.list", fields(tenant = %tenant))]
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<SyncTask>>, DomainError> {
        decode_page(self.docs.query(partition_query(SYNC_TASKS, tenant.to_string(), Vec::new(), page)).await?)
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.replace", fields(tenant = %task.tenant_id, task = %task.id))]
    async fn replace(&self, task: &SyncTask, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let pk = task.tenant_id.to_string();
        self.docs.replace(SYNC_TASKS, TASK, pk.clone(), pk, task.id.to_string(), encode(task)?, if_match, None, events).await
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.delete", fields(tenant = %tenant, task = %id))]
    async fn delete(&self, tenant: &TenantId, id: SyncTaskId, if_match: Option<ETag>) -> Result<(), DomainError> {
        self.docs.delete(SYNC_TASKS, TASK, tenant.to_string(), id.to_string(), if_match, &[]).await
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.due")]
    async fn due(&self, now: OffsetDateTime, limit: u32) -> Result<Vec<Stored<SyncTask>>, DomainError> {
        let (at, live) = (to_millis(now), self.db.now());
        let docs = self
            .db
            .read(move |conn| {
                let sql = "SELECT pk, id, etag, body FROM documents WHERE container = +?1 \
                    AND (expires_at IS NULL OR expires_at > ?2) \
                    AND ((json_extract(body, '$.status') = 'active' AND json_extract(body, '$.nextRunAt') <= ?3) \
                         OR json_extract(body, '$.lease.until') < ?3) \
                    ORDER BY coalesce(json_extract(body, '$.lease.until'), json_extract(body, '$.nextRunAt')) LIMIT ?4";
                conn.prepare_cached(sql)?
                    .query_map(params![SYNC_TASKS, live, at, i64::from(limit)], |r| {
                        Ok(Doc { pk: r.get(0)?, id: r.get(1)?, etag: ETag::new(r.get::<_, String>(2)?), body: r.get(3)? })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        docs.into_iter().map(decode).collect()
    }
}

#[async_trait]
impl SyncExecutionRepository for SqliteSync {
    #[tracing::instrument(skip_all, name = "sync_executions.create", fields(tenant = %execution.tenant_id, execution = %execution.id))]
    async fn create(&self, execution: &SyncExecution) -> Result<ETag, DomainError> {
        let (pk, id) = (execution.tenant_id.to_string(), execution.id.to_string());
        self.docs.create(SYNC_EXECUTIONS, pk, id, encode(execution)?, Some(EXECUTION_TTL)).await
    }

    #[tracing::instrument(skip_all, name = "sync_executions.get", fields(tenant = %tenant, execution = %id))]
    async fn get(&self, tenant: &TenantId, id: Uuid) -> Result<Stored<SyncExecution>, DomainError> {
        get_decoded(&self.docs, SYNC_EXECUTIONS, EXECUTION, tenant.to_string(), id).await
    }

    #[tracing::instrument(skip_all, name = "sync_executions.list", fields(tenant = %tenant, task = %task))]
    async fn list(&self, tenant: &TenantId, task: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncExecution>>, DomainError> {
        decode_page(self.docs.query(by_task(SYNC_EXECUTIONS, tenant, task, page)).await?)
    }

    #[tracing::instrument(skip_all, name = "sync_executions.replace", fields(tenant = %execution.tenant_id, execution = %execution.id))]
    async fn replace(&self, execution: &SyncExecution, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let pk = execution.tenant_id.to_string();
        let body = encode(execution)?;
        self.docs
            .replace(SYNC_EXECUTIONS, EXECUTION, pk.clone(), pk, execution.id.to_string(), body, if_match, Some(EXECUTION_TTL), events)
            .await
    }
}

#[async_trait]
impl SyncStateRepository for SqliteSync {
    async fn get(&self, tenant: &TenantId, task: SyncTaskId, platform_key: &str) -> Result<Option<Stored<SyncState>>, DomainError> {
        self.docs.get(SYNC_STATES, tenant.to_string(), state_id(task, platform_key)).await?.map(decode).transpose()
    }

    async fn find_by_provider_id(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        provider_id: &str,
    ) -> Result<Option<Stored<SyncState>>, DomainError> {
        let mut query = by_task(SYNC_STATES, tenant, task, &PageRequest::first(1));
        query.filters.push(("$.providerId", provider_id.to_owned()));
        let (docs, _) = self.docs.query(query).await?;
        docs.into_iter().next().map(decode).transpose()
    }

    #[tracing::instrument(skip_all, name = "sync_states.put", fields(tenant = %state.tenant_id, task = %state.task_id))]
    async fn put(&self, state: &SyncState, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let (pk, id, body) = (state.tenant_id.to_string(), state_id(state.task_id, &state.platform_key), encode(state)?);
        match if_match {
            None => self.docs.create(SYNC_STATES, pk, id, body, None).await,
            Some(etag) => match self.docs.replace(SYNC_STATES, "sync state", pk.clone(), pk, id, body, Some(etag), None, &[]).await {
                Err(DomainError::NotFound { .. }) => Err(DomainError::PreconditionFailed),
                other => other,
            },
        }
    }

    async fn get_many(&self, tenant: &TenantId, task: SyncTaskId, keys: &[String]) -> Result<Vec<Option<Stored<SyncState>>>, DomainError> {
        let ids = keys.iter().map(|k| state_id(task, k)).collect();
        self.docs.get_many(SYNC_STATES, tenant.to_string(), ids).await?.into_iter().map(|d| d.map(decode).transpose()).collect()
    }

    async fn find_many_by_provider_ids(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        provider_ids: &[String],
    ) -> Result<Vec<Option<Stored<SyncState>>>, DomainError> {
        let (pk, task_text) = (tenant.to_string(), task.to_string());
        let wanted = encode(&provider_ids)?;
        let now = self.db.now();
        let mut found = self
            .db
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT etag, body, json_extract(body, '$.providerId') FROM documents WHERE container = +?1 AND pk = ?2 \
                     AND json_extract(body, '$.taskId') = ?3 AND json_extract(body, '$.providerId') IN (SELECT value FROM json_each(?4)) \
                     AND (expires_at IS NULL OR expires_at > ?5) ORDER BY id",
                )?
                .query_map(params![SYNC_STATES, pk, task_text, wanted, now], |r| {
                    Ok((
                        r.get::<_, String>(2)?,
                        Doc { pk: pk.clone(), id: String::new(), etag: ETag::new(r.get::<_, String>(0)?), body: r.get(1)? },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        // The first state of each provider id, as `find_by_provider_id` answers.
        found.reverse();
        let mut by_id: std::collections::HashMap<String, Doc> = found.into_iter().collect();
        provider_ids.iter().map(|id| by_id.remove(id).map(decode).transpose()).collect()
    }

    #[tracing::instrument(skip_all, name = "sync_states.put_many", fields(count = puts.len()))]
    async fn put_many(&self, puts: &[StatePut]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        let mut by_tenant: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, p) in puts.iter().enumerate() {
            let pk = p.state.tenant_id.to_string();
            match by_tenant.iter_mut().find(|(t, _)| *t == pk) {
                Some((_, indexes)) => indexes.push(i),
                None => by_tenant.push((pk, vec![i])),
            }
        }
        let mut outcomes: Vec<Option<Result<ETag, DomainError>>> = puts.iter().map(|_| None).collect();
        for (pk, indexes) in by_tenant {
            let items = indexes
                .iter()
                .map(|&i| {
                    let p = &puts[i];
                    Ok((state_id(p.state.task_id, &p.state.platform_key), encode(&p.state)?, p.if_match.clone()))
                })
                .collect::<Result<Vec<_>, DomainError>>()?;
            let written = self.docs.write_each(SYNC_STATES, "sync state", pk, items).await?;
            for (i, outcome) in indexes.into_iter().zip(written) {
                outcomes[i] = Some(match outcome {
                    Err(DomainError::NotFound { .. }) => Err(DomainError::PreconditionFailed),
                    other => other,
                });
            }
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or(Err(DomainError::PreconditionFailed))).collect())
    }

    async fn list(&self, tenant: &TenantId, task: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncState>>, DomainError> {
        decode_page(self.docs.query(by_task(SYNC_STATES, tenant, task, page)).await?)
    }

    #[tracing::instrument(skip_all, name = "sync_states.clear", fields(tenant = %tenant, task = %task))]
    async fn clear(&self, tenant: &TenantId, task: SyncTaskId, conflicts: bool) -> Result<u64, DomainError> {
        let (pk, task) = (tenant.to_string(), task.to_string());
        self.docs
            .transaction(move |tx, _| {
                let mut removed = 0;
                let containers: &[&str] = if conflicts { &[SYNC_STATES, SYNC_CONFLICTS] } else { &[SYNC_STATES] };
                for container in containers {
                    removed += tx
                        .execute(
                            "DELETE FROM documents WHERE container = +?1 AND pk = ?2 AND json_extract(body, '$.taskId') = ?3",
                            params![container, pk, task],
                        )
                        .map_err(map_sqlite)?;
                }
                Ok(removed as u64)
            })
            .await
    }

    async fn create_conflict(&self, conflict: &SyncConflict) -> Result<ETag, DomainError> {
        self.docs.create(SYNC_CONFLICTS, conflict.tenant_id.to_string(), conflict.id.to_string(), encode(conflict)?, None).await
    }

    async fn get_conflict(&self, tenant: &TenantId, task: SyncTaskId, id: Uuid) -> Result<Stored<SyncConflict>, DomainError> {
        let found = self.docs.get(SYNC_CONFLICTS, tenant.to_string(), id.to_string()).await?.map(decode::<SyncConflict>).transpose()?;
        found.filter(|c| c.value.task_id == task).ok_or_else(|| DomainError::not_found(CONFLICT, id))
    }

    async fn list_conflicts(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        page: &PageRequest,
    ) -> Result<Page<Stored<SyncConflict>>, DomainError> {
        decode_page(self.docs.query(by_task(SYNC_CONFLICTS, tenant, task, page)).await?)
    }

    async fn replace_conflict(&self, conflict: &SyncConflict, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let pk = conflict.tenant_id.to_string();
        self.docs.replace(SYNC_CONFLICTS, CONFLICT, pk.clone(), pk, conflict.id.to_string(), encode(conflict)?, if_match, None, &[]).await
    }
}
