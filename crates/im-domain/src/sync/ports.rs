//! Ports of the sync capability: task, execution and state storage, and the Shard Manager.

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use super::execution::SyncExecution;
use super::state::{SyncConflict, SyncState};
use super::task::{SyncTask, SyncTaskId};
use crate::common::{ETag, Page, PageRequest, Stored, TenantId};
use crate::error::DomainError;
use crate::events::DomainEvent;

/// Storage of sync tasks, partitioned by tenant (`integration_sync_tasks`, `/tenantId`).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait SyncTaskRepository: Send + Sync {
    /// # Errors
    /// MUST return [`DomainError::Conflict`] when the id exists in the tenant, having written nothing.
    async fn create(&self, task: &SyncTask) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when the tenant has no such task (another tenant's
    /// task included).
    async fn get(&self, tenant: &TenantId, id: SyncTaskId) -> Result<Stored<SyncTask>, DomainError>;

    /// One tenant's tasks, oldest first, one page at a time; never another tenant's, never a
    /// state or conflict document kept in the same container.
    ///
    /// # Errors
    /// MUST return [`DomainError::Validation`] on `continuationToken` for a token it did not issue.
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<SyncTask>>, DomainError>;

    /// Replaces a task and records `events` atomically with it. The scheduler's claims,
    /// heartbeats and releases are replaces with `if_match`.
    ///
    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale, having written nothing (no event either).
    async fn replace(&self, task: &SyncTask, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale.
    async fn delete(&self, tenant: &TenantId, id: SyncTaskId, if_match: Option<ETag>) -> Result<(), DomainError>;

    /// Up to `limit` tasks of every tenant that are due at `now`: `active`, with `next_run_at`
    /// at or before `now`, earliest first; plus tasks whose lease ended before `now` (a dead
    /// instance's run, to be marked expired). MUST return each such task's current etag (the
    /// caller claims it with a conditional replace) and MAY return tasks that stopped being due
    /// since (the claim then fails or the caller skips them).
    async fn due(&self, now: OffsetDateTime, limit: u32) -> Result<Vec<Stored<SyncTask>>, DomainError>;
}

/// Storage of executions, partitioned by tenant, kept 30 days (`integration_sync_executions`).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait SyncExecutionRepository: Send + Sync {
    /// Stores an execution that expires [`super::EXECUTION_TTL`] after its last write.
    ///
    /// # Errors
    /// MUST return [`DomainError::Conflict`] when the id exists.
    async fn create(&self, execution: &SyncExecution) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent, expired or another tenant's.
    async fn get(&self, tenant: &TenantId, id: Uuid) -> Result<Stored<SyncExecution>, DomainError>;

    /// One task's executions, oldest first (ids are UUIDv7), one page at a time.
    ///
    /// # Errors
    /// MUST return [`DomainError::Validation`] on `continuationToken` for a token it did not issue.
    async fn list(&self, tenant: &TenantId, task: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncExecution>>, DomainError>;

    /// Replaces an execution and records `events` atomically with it (the completion event).
    ///
    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale, having written nothing (no event either).
    async fn replace(&self, execution: &SyncExecution, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError>;
}

/// The most items the sync engine hands to one batch call ([`SyncStateRepository::get_many`],
/// [`SyncStateRepository::put_many`], [`ShardManager::put_many`]): its largest page.
pub const MAX_BATCH: usize = 1000;

/// A conditional write of one state in [`SyncStateRepository::put_many`]: created when
/// `if_match` is `None`, replaced when `if_match` is its current etag.
#[derive(Debug, Clone, PartialEq)]
pub struct StatePut {
    pub state: SyncState,
    pub if_match: Option<ETag>,
}

/// Storage of per-record sync states and conflicts, partitioned by tenant. Cosmos keeps them in
/// `integration_sync_tasks` beside their task (documents of type `syncState`, `syncConflict`);
/// the embedded store in containers of their own.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait SyncStateRepository: Send + Sync {
    /// The state of one record, by platform key.
    async fn get(&self, tenant: &TenantId, task: SyncTaskId, platform_key: &str) -> Result<Option<Stored<SyncState>>, DomainError>;

    /// The state of one record, by provider id. MUST find a state written with that
    /// `provider_id` by [`SyncStateRepository::put`].
    async fn find_by_provider_id(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        provider_id: &str,
    ) -> Result<Option<Stored<SyncState>>, DomainError>;

    /// Writes a state: creates it when `if_match` is `None` and none exists, replaces it when
    /// `if_match` is its current etag.
    ///
    /// # Errors
    /// MUST return [`DomainError::PreconditionFailed`] when `if_match` is stale or the state was
    /// deleted, and [`DomainError::Conflict`] when `if_match` is `None` and the state exists,
    /// having written nothing.
    async fn put(&self, state: &SyncState, if_match: Option<ETag>) -> Result<ETag, DomainError>;

    /// The states of several records of one task, by platform key: one answer per key, in the
    /// order of `keys` (`None` where there is none), each as [`SyncStateRepository::get`]
    /// answers. The sync engine reads a page's states with one call (up to
    /// [`MAX_BATCH`] keys; a store MAY split a longer list).
    async fn get_many(&self, tenant: &TenantId, task: SyncTaskId, keys: &[String]) -> Result<Vec<Option<Stored<SyncState>>>, DomainError> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            found.push(self.get(tenant, task, key).await?);
        }
        Ok(found)
    }

    /// The states of several records of one task, by provider id: one answer per id, in the
    /// order of `provider_ids`, each as [`SyncStateRepository::find_by_provider_id`] answers.
    async fn find_many_by_provider_ids(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        provider_ids: &[String],
    ) -> Result<Vec<Option<Stored<SyncState>>>, DomainError> {
        let mut found = Vec::with_capacity(provider_ids.len());
        for id in provider_ids {
            found.push(self.find_by_provider_id(tenant, task, id).await?);
        }
        Ok(found)
    }

    /// Writes several states (of one tenant, distinct records), each exactly as
    /// [`SyncStateRepository::put`] would: its own condition and its own outcome, returned in
    /// the order of `puts`. An item that fails its condition (`PreconditionFailed`, `Conflict`)
    /// writes nothing and does not stop the others. Every item that succeeded is durable when
    /// the call returns `Ok`, so a caller may then save a checkpoint past them.
    ///
    /// # Errors
    /// A failure of the store itself (`Unavailable`, `Unexpected`): an item may or may not have
    /// been written (each wholly or not at all); the caller MUST NOT move a checkpoint past them.
    async fn put_many(&self, puts: &[StatePut]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        let mut outcomes = Vec::with_capacity(puts.len());
        for p in puts {
            outcomes.push(match self.put(&p.state, p.if_match.clone()).await {
                Err(e @ (DomainError::PreconditionFailed | DomainError::Conflict(_))) => Err(e),
                Err(e) => return Err(e),
                Ok(etag) => Ok(etag),
            });
        }
        Ok(outcomes)
    }

    /// One task's states, by platform key order of the store, one page at a time.
    async fn list(&self, tenant: &TenantId, task: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncState>>, DomainError>;

    /// Deletes every state (and, with `conflicts`, every conflict) of a task; returns how many
    /// documents went. MUST be idempotent.
    async fn clear(&self, tenant: &TenantId, task: SyncTaskId, conflicts: bool) -> Result<u64, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::Conflict`] when the id exists.
    async fn create_conflict(&self, conflict: &SyncConflict) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when the task has no such conflict.
    async fn get_conflict(&self, tenant: &TenantId, task: SyncTaskId, id: Uuid) -> Result<Stored<SyncConflict>, DomainError>;

    /// One task's conflicts (open and resolved), oldest first, one page at a time.
    async fn list_conflicts(
        &self,
        tenant: &TenantId,
        task: SyncTaskId,
        page: &PageRequest,
    ) -> Result<Page<Stored<SyncConflict>>, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale.
    async fn replace_conflict(&self, conflict: &SyncConflict, if_match: Option<ETag>) -> Result<ETag, DomainError>;
}

/// A record as the Shard Manager keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRecord {
    pub key: String,
    pub data: Value,
    /// Opaque; changes on every write.
    pub version: String,
    pub updated_at: OffsetDateTime,
    /// The integration that wrote it last, when a sync did.
    pub source: Option<String>,
    /// A tombstone: the record was deleted.
    pub deleted: bool,
}

/// A write to the Shard Manager.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardWrite {
    pub data: Value,
    /// The provider's version of the record, kept for reference.
    pub version: Option<String>,
    pub updated_at: OffsetDateTime,
    /// The writing integration's id (the origin tag of the write).
    pub source: String,
}

/// One write of [`ShardManager::put_many`]: `write` to `key`, conditionally on `if_match`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPut {
    pub key: String,
    pub write: ShardWrite,
    pub if_match: Option<String>,
}

/// The Shard Manager's answer to a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardWritten {
    pub key: String,
    pub version: String,
    pub updated_at: OffsetDateTime,
}

/// One page of changes.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardChanges {
    pub items: Vec<ShardRecord>,
    /// Where to continue (and the next checkpoint): MUST be returned even on an empty page.
    pub next_cursor: String,
}

/// The platform's typed record store ("shards"). Contract: `docs/contracts/shard-manager.md`.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait ShardManager: Send + Sync {
    /// Creates or replaces a record; with `if_match`, only when its current version is that one.
    ///
    /// # Errors
    /// - MUST return [`DomainError::PreconditionFailed`] when `if_match` is not the current
    ///   version (or the record does not exist), having written nothing.
    /// - MUST return [`DomainError::Validation`] when the record is refused (named by field).
    /// - MUST return [`DomainError::Unavailable`] when the service cannot be reached or fails
    ///   (after the adapter's bounded retries), with `retry_after` when known.
    async fn put(
        &self,
        tenant: &TenantId,
        shard_type: &str,
        key: &str,
        write: &ShardWrite,
        if_match: Option<String>,
    ) -> Result<ShardWritten, DomainError>;

    /// Creates or replaces several records of one shard type, each exactly as
    /// [`ShardManager::put`] would: its own condition and its own outcome (in the order of
    /// `puts`); a refused or stale item writes nothing and does not stop the others. Every item
    /// that succeeded is durable when the call returns `Ok`.
    ///
    /// # Errors
    /// `Unavailable` (or `Unexpected`) when the service fails as a whole: an item may or may
    /// not have been written.
    async fn put_many(
        &self,
        tenant: &TenantId,
        shard_type: &str,
        puts: &[ShardPut],
    ) -> Result<Vec<Result<ShardWritten, DomainError>>, DomainError> {
        let mut outcomes = Vec::with_capacity(puts.len());
        for p in puts {
            outcomes.push(put_outcome(self.put(tenant, shard_type, &p.key, &p.write, p.if_match.clone()).await)?);
        }
        Ok(outcomes)
    }

    /// Records changed after `cursor` (from the beginning when `None`), tombstones included,
    /// oldest change first, at most `limit`. Reading from the returned cursor MUST NOT skip a
    /// change made after the previous read, and a change MAY be returned twice.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Validation`] on `cursor` for a cursor it did not issue.
    /// - MUST return [`DomainError::Unavailable`] as for `put`.
    async fn changes(&self, tenant: &TenantId, shard_type: &str, cursor: Option<String>, limit: u32) -> Result<ShardChanges, DomainError>;

    /// Deletes a record, leaving a tombstone that later [`ShardManager::changes`] return.
    /// MUST succeed when the record does not exist.
    ///
    /// # Errors
    /// [`DomainError::Unavailable`] as for `put`.
    async fn delete(&self, tenant: &TenantId, shard_type: &str, key: &str) -> Result<(), DomainError>;
}

/// One item of [`ShardManager::put_many`] from the outcome of its [`ShardManager::put`]: a
/// stale or refused record is that item's outcome; any other error fails the whole call.
///
/// # Errors
/// The error of a put that failed for the service's sake.
pub fn put_outcome(outcome: Result<ShardWritten, DomainError>) -> Result<Result<ShardWritten, DomainError>, DomainError> {
    match outcome {
        Err(e @ (DomainError::PreconditionFailed | DomainError::Validation(_))) => Ok(Err(e)),
        Err(e) => Err(e),
        Ok(written) => Ok(Ok(written)),
    }
}
