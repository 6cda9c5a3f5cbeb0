//! Claiming due sync tasks, safely with several instances on one store: a task is run by the
//! instance whose conditional replace put its lease on the task; a lease that ends without a
//! heartbeat belongs to a dead instance, whose execution becomes `expired` and whose task is due
//! again at once (the next run resumes from the checkpoint).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::common::{Clock, IdGenerator, Stored};
use crate::error::DomainError;
use crate::events::{DomainEvent, EventData, EventType};
use crate::sync::ports::{SyncExecutionRepository, SyncTaskRepository};
use crate::sync::{ExecutionStatus, LastExecution, SyncExecution, SyncTask, TaskLease, TaskStatus, Trigger};

/// `data` of `sync.task.paused`: a task the service paused after consecutive failed runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncTaskPausedData {
    pub task_id: crate::sync::SyncTaskId,
    pub reason: String,
    pub consecutive_failures: u32,
    pub last_execution_id: uuid::Uuid,
}

/// Consecutive failed runs after which a task is paused, unless configured otherwise.
pub const DEFAULT_FAILURE_LIMIT: u32 = 5;

/// A task this instance holds, with the execution it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub task: Stored<SyncTask>,
    pub execution: Stored<SyncExecution>,
}

/// Claims due tasks for one instance (`owner`) and releases them when their run ends.
#[derive(Clone)]
pub struct SyncScheduler {
    tasks: Arc<dyn SyncTaskRepository>,
    executions: Arc<dyn SyncExecutionRepository>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    owner: String,
    lease: Duration,
    failure_limit: u32,
}

impl SyncScheduler {
    pub fn new(
        tasks: Arc<dyn SyncTaskRepository>,
        executions: Arc<dyn SyncExecutionRepository>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        owner: impl Into<String>,
        lease: Duration,
    ) -> Self {
        Self { tasks, executions, clock, ids, owner: owner.into(), lease, failure_limit: DEFAULT_FAILURE_LIMIT }
    }

    pub fn with_failure_limit(mut self, limit: u32) -> Self {
        self.failure_limit = limit.max(1);
        self
    }

    /// Takes up to `limit` due tasks for this instance: each one's lease is written with the
    /// etag `due` returned, so of several instances exactly one wins a task; the losers skip it.
    /// Tasks whose lease ended are released first (their execution `expired`, the task due now).
    ///
    /// # Errors
    /// When the store cannot be read; a task lost to another instance is no error.
    pub async fn claim_due(&self, limit: u32) -> Result<Vec<Claimed>, DomainError> {
        let now = self.clock.now();
        let mut claimed = Vec::new();
        for stored in self.tasks.due(now, limit).await? {
            let expired = stored.value.lease.as_ref().is_some_and(|l| l.until <= now);
            let result = if expired { self.expire(stored, now).await.map(|()| None) } else { self.claim(stored, now).await };
            match result {
                Ok(Some(c)) => claimed.push(c),
                Ok(None) | Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(claimed)
    }

    async fn expire(&self, stored: Stored<SyncTask>, now: OffsetDateTime) -> Result<(), DomainError> {
        let mut task = stored.value;
        let Some(lease) = task.lease.take() else { return Ok(()) };
        let reason = format!("the lease of {} ended without a heartbeat", lease.owner);
        task.last_execution = Some(LastExecution { id: lease.execution_id, status: ExecutionStatus::Expired, ended_at: Some(now) });
        let paused = self.count_failure(&mut task, &reason, lease.execution_id, now);
        task.next_run_at = (task.status == TaskStatus::Active).then_some(now);
        self.tasks.replace(&task, Some(stored.etag), paused.as_slice()).await?;
        if let Ok(current) = self.executions.get(&task.tenant_id, lease.execution_id).await
            && !current.value.status.is_final()
        {
            let mut execution = current.value;
            execution.finish(ExecutionStatus::Expired, Some(reason), now);
            // Another instance finishing it first is fine.
            let _ = self.executions.replace(&execution, Some(current.etag), &[execution.completed_event()]).await;
        }
        Ok(())
    }

    /// Counts a failed run; pauses an active task after the configured number in a row and
    /// returns the `sync.task.paused` event then.
    fn count_failure(&self, task: &mut SyncTask, error: &str, execution: uuid::Uuid, now: OffsetDateTime) -> Option<DomainEvent> {
        task.consecutive_failures += 1;
        if task.consecutive_failures < self.failure_limit || task.status != TaskStatus::Active {
            return None;
        }
        task.status = TaskStatus::Paused;
        let reason = format!("paused after {} consecutive failed runs; last error: {error}", task.consecutive_failures);
        task.status_reason = Some(reason.clone());
        let data =
            SyncTaskPausedData { task_id: task.id, reason, consecutive_failures: task.consecutive_failures, last_execution_id: execution };
        Some(DomainEvent {
            id: self.ids.new_uuid(),
            event_type: EventType::SyncTaskPaused,
            tenant_id: task.tenant_id.clone(),
            subject: task.id.to_string(),
            time: now,
            data: EventData::of(&data).unwrap_or_default(),
        })
    }

    async fn claim(&self, stored: Stored<SyncTask>, now: OffsetDateTime) -> Result<Option<Claimed>, DomainError> {
        let due = stored.value.status == TaskStatus::Active && stored.value.next_run_at.is_some_and(|at| at <= now);
        if !due || stored.value.lease.is_some() {
            return Ok(None);
        }
        let mut task = stored.value;
        // A manual run's execution is written just after the task names it: until it can be
        // read the task is left for a later look (taking it would hold it with no execution).
        // One never written (its request failed half-way) is run as a scheduled one.
        let queued = match task.pending_execution.take() {
            Some(id) => match self.executions.get(&task.tenant_id, id).await {
                Ok(found) => Some(found),
                Err(DomainError::NotFound { .. }) if now - task.updated_at < self.lease => return Ok(None),
                Err(DomainError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let execution_id = queued.as_ref().map_or_else(|| self.ids.new_uuid(), |e| e.value.id);
        task.lease = Some(TaskLease { owner: self.owner.clone(), execution_id, until: now + self.lease });
        task.cancel_requested = false;
        task.next_run_at = None;
        let etag = self.tasks.replace(&task, Some(stored.etag), &[]).await?;
        let mut execution = match queued {
            Some(found) => found,
            None => {
                let e =
                    SyncExecution::queued(execution_id, task.tenant_id.clone(), task.id, Trigger::Schedule, task.checkpoints.clone(), now);
                let etag = self.executions.create(&e).await?;
                Stored { value: e, etag }
            }
        };
        execution.value.status = ExecutionStatus::Running;
        execution.value.started_at = Some(now);
        execution.value.owner = Some(self.owner.clone());
        execution.value.checkpoints_from = task.checkpoints.clone();
        execution.etag = self.executions.replace(&execution.value, Some(execution.etag.clone()), &[]).await?;
        Ok(Some(Claimed { task: Stored { value: task, etag }, execution }))
    }

    /// Extends this instance's lease and saves the checkpoints reached; returns whether a
    /// caller asked to cancel.
    ///
    /// # Errors
    /// `PreconditionFailed` or `Conflict` when the task is no longer held by this execution
    /// (the lease ended and another instance took over): the run MUST stop without writing.
    pub async fn heartbeat(&self, claimed: &mut Claimed) -> Result<bool, DomainError> {
        let now = self.clock.now();
        let current = self.tasks.get(&claimed.task.value.tenant_id, claimed.task.value.id).await?;
        if !self.holds(&current.value, claimed.execution.value.id) {
            return Err(no_longer_held());
        }
        let mut task = current.value;
        task.checkpoints = claimed.execution.value.checkpoints_to.clone();
        if let Some(lease) = task.lease.as_mut() {
            lease.until = now + self.lease;
        }
        let etag = self.tasks.replace(&task, Some(current.etag), &[]).await?;
        let cancel = task.cancel_requested;
        claimed.task = Stored { value: task, etag };
        Ok(cancel)
    }

    /// Ends a run: records the execution's outcome with its `sync.task.completed` event (and
    /// `events`) atomically, releases the task, saves its checkpoints, counts consecutive
    /// failures and pauses the task after [`DEFAULT_FAILURE_LIMIT`] (or the configured number) in
    /// a row, with a `sync.task.paused` event. Returns the task as released.
    ///
    /// # Errors
    /// As [`SyncScheduler::heartbeat`] when the task is no longer held by this execution.
    pub async fn finish(
        &self,
        mut claimed: Claimed,
        status: ExecutionStatus,
        error: Option<String>,
        events: &[DomainEvent],
    ) -> Result<Stored<SyncTask>, DomainError> {
        let now = self.clock.now();
        self.heartbeat(&mut claimed).await?;
        let mut execution = claimed.execution.value;
        execution.finish(status, error.clone(), now);
        let mut all = events.to_vec();
        all.push(execution.completed_event());
        self.executions.replace(&execution, Some(claimed.execution.etag), &all).await?;
        // The task as the heartbeat left it; written since (a run queued once the execution read
        // as ended, a pause, a change of settings), it is released in its current version as
        // long as this execution still holds it.
        let (tenant, id) = (claimed.task.value.tenant_id.clone(), claimed.task.value.id);
        let mut held = Some(claimed.task);
        // A loop, not `retry::on_conflict`: its closure's borrows would keep this future from
        // being `Send` (runs are spawned).
        for _ in 0..=super::UNCONDITIONAL_RETRIES {
            let Stored { value: mut task, etag } = match held.take() {
                Some(held) => held,
                None => {
                    let current = self.tasks.get(&tenant, id).await?;
                    if !self.holds(&current.value, execution.id) {
                        return Err(no_longer_held());
                    }
                    current
                }
            };
            task.lease = None;
            task.cancel_requested = false;
            task.last_execution = Some(LastExecution { id: execution.id, status, ended_at: Some(now) });
            let mut paused = None;
            if status == ExecutionStatus::Failed {
                paused = self.count_failure(&mut task, error.as_deref().unwrap_or_default(), execution.id, now);
            } else {
                task.consecutive_failures = 0;
            }
            task.reschedule(now, now);
            match self.tasks.replace(&task, Some(etag), paused.as_slice()).await {
                Ok(etag) => return Ok(Stored { value: task, etag }),
                Err(DomainError::PreconditionFailed) => {}
                Err(e) => return Err(e),
            }
        }
        Err(DomainError::PreconditionFailed)
    }

    /// Whether `task` is held by this instance's run of `execution`.
    fn holds(&self, task: &SyncTask, execution: uuid::Uuid) -> bool {
        task.lease.as_ref().is_some_and(|l| l.owner == self.owner && l.execution_id == execution)
    }
}

fn no_longer_held() -> DomainError {
    DomainError::Conflict("the task is no longer held by this execution".into())
}
