//! Sync tasks, their per-record states and conflicts in `integration_sync_tasks` (documents of
//! type `syncTask`, `syncState`, `syncConflict`, partition key `/tenantId`), and executions in
//! `integration_sync_executions` (type `syncExecution`; the container's default TTL of 30 days
//! expires them). Completion events go into the outbox of the same partition in the same batch.

use async_trait::async_trait;
use azure_data_cosmos::Query;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::events::DomainEvent;
use im_domain::sync::ports::{StatePut, SyncExecutionRepository, SyncStateRepository, SyncTaskRepository};
use im_domain::sync::unix_millis::to_millis;
use im_domain::sync::{SyncConflict, SyncExecution, SyncState, SyncTask, SyncTaskId, state_id};
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::client::{CosmosStore, SYNC_EXECUTIONS, SYNC_TASKS};
use crate::docs::{Doc, stored_all};
use crate::errors::unexpected;
use crate::support::{create_doc, precondition, read_doc, replace_doc};

const TASK: &str = "syncTask";
const EXECUTION: &str = "syncExecution";
const STATE: &str = "syncState";
const CONFLICT: &str = "syncConflict";

/// A value that has no `id` of its own (a state), with the document id.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Keyed<T> {
    id: String,
    #[serde(flatten)]
    value: T,
}

fn doc<T: Clone>(kind: &str, value: &T) -> Doc<T> {
    Doc::of(kind, value.clone())
}

fn unkey<T>(stored: Stored<Keyed<T>>) -> Stored<T> {
    Stored { value: stored.value.value, etag: stored.etag }
}

/// Requests in flight at once for the batch calls of [`SyncStateRepository`].
const BATCH_CONCURRENCY: usize = 16;

/// `call` for each item, [`BATCH_CONCURRENCY`] at a time; the answers in the order of `items`.
async fn bounded<'a, T, R, F>(items: &'a [T], call: impl Fn(&'a T) -> F) -> Vec<R>
where
    F: Future<Output = R> + 'a,
{
    let mut answers = Vec::with_capacity(items.len());
    for chunk in items.chunks(BATCH_CONCURRENCY) {
        answers.extend(futures_util::future::join_all(chunk.iter().map(&call)).await);
    }
    answers
}

pub(crate) struct CosmosSync {
    store: CosmosStore,
}

impl CosmosSync {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store }
    }

    async fn by_task<T: DeserializeOwned + Send + 'static>(
        &self,
        container: &'static str,
        kind: &str,
        tenant: &TenantId,
        task: SyncTaskId,
        page: &PageRequest,
    ) -> Result<Page<Stored<T>>, DomainError> {
        let query = Query::from("SELECT * FROM c WHERE c.type = @type AND c.taskId = @task ORDER BY c.id")
            .with_parameter("@type", kind)
            .and_then(|q| q.with_parameter("@task", task.to_string()))
            .map_err(unexpected)?;
        let (docs, continuation) = self.store.query_page::<Doc<T>>(container, query, Some(tenant.to_string()), page).await?;
        Ok(Page { items: stored_all(docs)?, continuation })
    }
}

#[async_trait]
impl SyncTaskRepository for CosmosSync {
    #[tracing::instrument(skip_all, name = "sync_tasks.create", fields(tenant = %task.tenant_id, task = %task.id))]
    async fn create(&self, task: &SyncTask) -> Result<ETag, DomainError> {
        create_doc(&self.store, SYNC_TASKS, task.tenant_id.to_string(), task.id.to_string(), &doc(TASK, task), &[], "sync task").await
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.get", fields(tenant = %tenant, task = %id))]
    async fn get(&self, tenant: &TenantId, id: SyncTaskId) -> Result<Stored<SyncTask>, DomainError> {
        read_doc(&self.store, SYNC_TASKS, tenant.to_string(), &id.to_string(), TASK, "sync task")
            .await?
            .ok_or_else(|| DomainError::not_found("sync task", id))
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.list", fields(tenant = %tenant))]
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<SyncTask>>, DomainError> {
        let query = Query::from("SELECT * FROM c WHERE c.type = @type ORDER BY c.id").with_parameter("@type", TASK).map_err(unexpected)?;
        let (docs, continuation) = self.store.query_page::<Doc<SyncTask>>(SYNC_TASKS, query, Some(tenant.to_string()), page).await?;
        Ok(Page { items: stored_all(docs)?, continuation })
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.replace", fields(tenant = %task.tenant_id, task = %task.id, events = events.len()))]
    async fn replace(&self, task: &SyncTask, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let (pk, id) = (task.tenant_id.to_string(), task.id.to_string());
        replace_doc(&self.store, SYNC_TASKS, pk, id, &doc(TASK, task), if_match, events, "sync task").await
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.delete", fields(tenant = %tenant, task = %id))]
    async fn delete(&self, tenant: &TenantId, id: SyncTaskId, if_match: Option<ETag>) -> Result<(), DomainError> {
        let key = id.to_string();
        let options = precondition(if_match.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
        let delete = self.store.container(SYNC_TASKS).delete_item(tenant.to_string(), &key, options);
        self.store.call("a delete", delete, "sync task", &key).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "sync_tasks.due")]
    async fn due(&self, now: OffsetDateTime, limit: u32) -> Result<Vec<Stored<SyncTask>>, DomainError> {
        let query =
            Query::from("SELECT * FROM c WHERE c.type = @type AND ((c.status = 'active' AND c.nextRunAt <= @now) OR c.lease.until < @now)")
                .with_parameter("@type", TASK)
                .and_then(|q| q.with_parameter("@now", to_millis(now)))
                .map_err(unexpected)?;
        let page = PageRequest::first(limit.clamp(1, 1000));
        let (docs, _) = self.store.query_page::<Doc<SyncTask>>(SYNC_TASKS, query, None, &page).await?;
        let mut due = stored_all(docs)?;
        due.sort_by_key(|s| s.value.lease.as_ref().map(|l| l.until).or(s.value.next_run_at));
        Ok(due)
    }
}

#[async_trait]
impl SyncExecutionRepository for CosmosSync {
    #[tracing::instrument(skip_all, name = "sync_executions.create", fields(tenant = %execution.tenant_id, execution = %execution.id))]
    async fn create(&self, execution: &SyncExecution) -> Result<ETag, DomainError> {
        let (pk, id) = (execution.tenant_id.to_string(), execution.id.to_string());
        create_doc(&self.store, SYNC_EXECUTIONS, pk, id, &doc(EXECUTION, execution), &[], "sync execution").await
    }

    #[tracing::instrument(skip_all, name = "sync_executions.get", fields(tenant = %tenant, execution = %id))]
    async fn get(&self, tenant: &TenantId, id: Uuid) -> Result<Stored<SyncExecution>, DomainError> {
        read_doc(&self.store, SYNC_EXECUTIONS, tenant.to_string(), &id.to_string(), EXECUTION, "sync execution")
            .await?
            .ok_or_else(|| DomainError::not_found("sync execution", id))
    }

    #[tracing::instrument(skip_all, name = "sync_executions.list", fields(tenant = %tenant, task = %task))]
    async fn list(&self, tenant: &TenantId, task: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncExecution>>, DomainError> {
        self.by_task(SYNC_EXECUTIONS, EXECUTION, tenant, task, page).await
    }

    #[tracing::instrument(skip_all, name = "sync_executions.replace", fields(tenant = %execution.tenant_id, execution = %execution.id, events = events.len()))]
    async fn replace(&self, execution: &SyncExecution, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let (pk, id) = (execution.tenant_id.to_string(), execution.id.to_string());
        replace_doc(&self.store, SYNC_EXECUTIONS, pk, id, &doc(EXECUTION, execution), if_match, events, "sync execution").await
    }
}

#[async_trait]
impl SyncStateRepository for CosmosSync {
    async fn get(&self, tenant: &TenantId, task: SyncTaskId, platform_key: &str) -> Result<Option<Stored<SyncState>>, DomainError> {
        let found =
            read_doc::<Keyed<SyncState>>(&self.store, SYNC_TASKS, tenant.to_string(), &state_id(task, platform_key), STATE, "sync state")
                .await?;
        Ok(found.map(unkey))
    }

    async fn find_by_provider_id(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        provider_id: &str,
    ) -> Result<Option<Stored<SyncState>>, DomainError> {
        let query = Query::from("SELECT * FROM c WHERE c.type = @type AND c.taskId = @task AND c.providerId = @provider")
            .with_parameter("@type", STATE)
            .and_then(|q| q.with_parameter("@task", task.to_string()))
            .and_then(|q| q.with_parameter("@provider", provider_id))
            .map_err(unexpected)?;
        let (docs, _) =
            self.store.query_page::<Doc<Keyed<SyncState>>>(SYNC_TASKS, query, Some(tenant.to_string()), &PageRequest::first(1)).await?;
        Ok(stored_all(docs)?.into_iter().next().map(unkey))
    }

    #[tracing::instrument(skip_all, name = "sync_states.put", fields(tenant = %state.tenant_id, task = %state.task_id))]
    async fn put(&self, state: &SyncState, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let (pk, id) = (state.tenant_id.to_string(), state_id(state.task_id, &state.platform_key));
        let document = doc(STATE, &Keyed { id: id.clone(), value: state.clone() });
        match if_match {
            None => create_doc(&self.store, SYNC_TASKS, pk, id, &document, &[], "sync state").await,
            Some(etag) => match replace_doc(&self.store, SYNC_TASKS, pk, id, &document, Some(etag), &[], "sync state").await {
                Err(DomainError::NotFound { .. }) => Err(DomainError::PreconditionFailed),
                other => other,
            },
        }
    }

    /// Point reads (the cheapest request), [`BATCH_CONCURRENCY`] at a time.
    async fn get_many(&self, tenant: &TenantId, task: SyncTaskId, keys: &[String]) -> Result<Vec<Option<Stored<SyncState>>>, DomainError> {
        bounded(keys, |key| SyncStateRepository::get(self, tenant, task, key)).await.into_iter().collect()
    }

    async fn find_many_by_provider_ids(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        provider_ids: &[String],
    ) -> Result<Vec<Option<Stored<SyncState>>>, DomainError> {
        bounded(provider_ids, |id| self.find_by_provider_id(tenant, task, id)).await.into_iter().collect()
    }

    /// Conditional writes, [`BATCH_CONCURRENCY`] at a time (a transactional batch would make
    /// them all or nothing; each item keeps its own outcome instead). Each write is durable
    /// when its answer comes, so all are when this returns.
    #[tracing::instrument(skip_all, name = "sync_states.put_many", fields(count = puts.len()))]
    async fn put_many(&self, puts: &[StatePut]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        bounded(puts, |p| self.put(&p.state, p.if_match.clone()))
            .await
            .into_iter()
            .map(|outcome| match outcome {
                Err(e @ (DomainError::PreconditionFailed | DomainError::Conflict(_))) => Ok(Err(e)),
                Err(e) => Err(e),
                Ok(etag) => Ok(Ok(etag)),
            })
            .collect()
    }

    async fn list(&self, tenant: &TenantId, task: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncState>>, DomainError> {
        Ok(self.by_task::<Keyed<SyncState>>(SYNC_TASKS, STATE, tenant, task, page).await?.map(unkey))
    }

    #[tracing::instrument(skip_all, name = "sync_states.clear", fields(tenant = %tenant, task = %task))]
    async fn clear(&self, tenant: &TenantId, task: SyncTaskId, conflicts: bool) -> Result<u64, DomainError> {
        let text = if conflicts {
            "SELECT c.id FROM c WHERE (c.type = @state OR c.type = @conflict) AND c.taskId = @task"
        } else {
            "SELECT c.id FROM c WHERE c.type = @state AND c.taskId = @task"
        };
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let mut removed = 0;
        loop {
            let query = Query::from(text)
                .with_parameter("@state", STATE)
                .and_then(|q| q.with_parameter("@conflict", CONFLICT))
                .and_then(|q| q.with_parameter("@task", task.to_string()))
                .map_err(unexpected)?;
            let (ids, _) = self.store.query_page::<Id>(SYNC_TASKS, query, Some(tenant.to_string()), &PageRequest::first(200)).await?;
            if ids.is_empty() {
                return Ok(removed);
            }
            for Id { id } in ids {
                let delete = self.store.container(SYNC_TASKS).delete_item(tenant.to_string(), &id, None);
                match self.store.call("a delete", delete, "sync state", &id).await {
                    Ok(_) => removed += 1,
                    Err(DomainError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    async fn create_conflict(&self, conflict: &SyncConflict) -> Result<ETag, DomainError> {
        let (pk, id) = (conflict.tenant_id.to_string(), conflict.id.to_string());
        create_doc(&self.store, SYNC_TASKS, pk, id, &doc(CONFLICT, conflict), &[], "sync conflict").await
    }

    async fn get_conflict(&self, tenant: &TenantId, task: SyncTaskId, id: Uuid) -> Result<Stored<SyncConflict>, DomainError> {
        let found: Option<Stored<SyncConflict>> =
            read_doc(&self.store, SYNC_TASKS, tenant.to_string(), &id.to_string(), CONFLICT, "sync conflict").await?;
        found.filter(|c| c.value.task_id == task).ok_or_else(|| DomainError::not_found("sync conflict", id))
    }

    async fn list_conflicts(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        page: &PageRequest,
    ) -> Result<Page<Stored<SyncConflict>>, DomainError> {
        self.by_task(SYNC_TASKS, CONFLICT, tenant, task, page).await
    }

    async fn replace_conflict(&self, conflict: &SyncConflict, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let (pk, id) = (conflict.tenant_id.to_string(), conflict.id.to_string());
        replace_doc(&self.store, SYNC_TASKS, pk, id, &doc(CONFLICT, conflict), if_match, &[], "sync conflict").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_read_back_with_the_fields_cosmos_adds() {
        let tenant = TenantId::new("t").unwrap();
        let task = im_testkit::sync::task(&tenant);
        let mut json = serde_json::to_value(doc(TASK, &task)).unwrap();
        json["_rid"] = "abc".into();
        json["_ts"] = 1_767_225_600.into();
        json["_etag"] = "\"e\"".into();
        let back: Doc<SyncTask> = serde_json::from_value(json).unwrap();
        assert_eq!(back.value, task);
        assert_eq!(back.etag.as_deref(), Some("\"e\""));
    }
}
