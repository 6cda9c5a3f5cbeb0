//! The use cases of sync tasks behind `/api/v1/sync-tasks`: who may, what is checked, what is
//! written. Runs are carried out by the scheduler; this service queues them and changes the
//! task's state conditionally, so a request never races a running execution into a lost update.

use std::sync::Arc;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::audit::{Audit, AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::common::{Clock, ETag, IdGenerator, Page, PageRequest, Stored};
use crate::error::DomainError;
use crate::sync::ports::{SyncExecutionRepository, SyncStateRepository, SyncTaskRepository};
use crate::sync::{
    Checkpoints, ExecutionStatus, Resolution, SyncConflict, SyncExecution, SyncTask, SyncTaskDraft, SyncTaskId, TaskStatus, Trigger,
};

use super::{matching, read_modify_write};

/// What `reset` forgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetScope {
    /// The checkpoints: the next run reads everything again (states keep it from rewriting
    /// unchanged records).
    Checkpoints,
    /// Checkpoints, per-record states and conflicts: the next run starts as the first did.
    All,
}

/// Manages sync tasks, queues their runs and settles their conflicts.
#[derive(Clone)]
pub struct SyncTaskService {
    tasks: Arc<dyn SyncTaskRepository>,
    executions: Arc<dyn SyncExecutionRepository>,
    states: Arc<dyn SyncStateRepository>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    audit: Audit,
}

fn busy() -> DomainError {
    DomainError::Conflict("an execution of this task is queued or running".into())
}

/// `Conflict` when an execution runs the task (`running`, [`SyncTaskService::runs`]) or is
/// queued for it.
fn idle(task: &SyncTask, running: bool) -> Result<(), DomainError> {
    if running || task.pending_execution.is_some() { Err(busy()) } else { Ok(()) }
}

impl SyncTaskService {
    pub fn new(
        tasks: Arc<dyn SyncTaskRepository>,
        executions: Arc<dyn SyncExecutionRepository>,
        states: Arc<dyn SyncStateRepository>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        audit: Audit,
    ) -> Self {
        Self { tasks, executions, states, clock, ids, audit }
    }

    /// Checks the member role before a request body is read, recording a denial.
    ///
    /// # Errors
    /// `Forbidden`.
    pub async fn authorize(&self, caller: &Caller, action: AuditAction) -> Result<(), DomainError> {
        self.audit.require(caller, Role::Member, AuditResource::SyncTask, action).await
    }

    async fn audited<T>(
        &self,
        caller: &Caller,
        action: AuditAction,
        id: Option<SyncTaskId>,
        result: Result<T, DomainError>,
        describe: impl FnOnce(&T) -> (String, Value),
    ) -> Result<T, DomainError> {
        self.audit.result(caller, AuditResource::SyncTask, action, id.map(|i| i.to_string()), &result, describe).await;
        result
    }

    /// # Errors
    /// `Forbidden` without the member role; `Validation` listing every offending field.
    pub async fn create(&self, caller: &Caller, draft: SyncTaskDraft) -> Result<Stored<SyncTask>, DomainError> {
        let result = async {
            caller.require(Role::Member)?;
            let settings = draft.validate()?;
            let task = SyncTask::new(
                SyncTaskId(self.ids.new_uuid()),
                caller.tenant_id.clone(),
                settings,
                caller.user_id.clone(),
                self.clock.now(),
            );
            let etag = self.tasks.create(&task).await?;
            Ok(Stored { value: task, etag })
        }
        .await;
        self.audited(caller, AuditAction::Create, None, result, |t| (t.value.id.to_string(), json!({"entity": t.value.entity}))).await
    }

    pub async fn get(&self, caller: &Caller, id: SyncTaskId) -> Result<Stored<SyncTask>, DomainError> {
        caller.require(Role::Viewer)?;
        self.tasks.get(&caller.tenant_id, id).await
    }

    pub async fn list(&self, caller: &Caller, page: &PageRequest) -> Result<Page<Stored<SyncTask>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.tasks.list(&caller.tenant_id, page).await
    }

    /// Whether an execution runs `task` at `now`: its lease is current and the execution it
    /// names has not ended. A run ends with two writes, the execution's final status and then the
    /// task's release (which the scheduler makes on the task's current version for as long as
    /// the execution holds it): a client that saw the execution end and queues the next run,
    /// resets or deletes the task at once is not refused in between, and one who cancels is told
    /// that nothing runs. The execution is read only while a lease is current.
    async fn runs(&self, task: &SyncTask, now: time::OffsetDateTime) -> Result<bool, DomainError> {
        let Some(lease) = task.lease.as_ref().filter(|_| task.is_running(now)) else { return Ok(false) };
        match self.executions.get(&task.tenant_id, lease.execution_id).await {
            Ok(execution) => Ok(!execution.value.status.is_final()),
            Err(DomainError::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Changes a task with `change` under `if_match` (or retried on a concurrent write).
    async fn modify(
        &self,
        caller: &Caller,
        id: SyncTaskId,
        if_match: Option<&ETag>,
        mut change: impl FnMut(&mut SyncTask) -> Result<(), DomainError>,
    ) -> Result<Stored<SyncTask>, DomainError> {
        self.modify_seeing_runs(caller, id, if_match, false, |task, _| change(task)).await
    }

    /// [`Self::modify`] for a change that depends on whether an execution runs the task: with
    /// `see_runs`, `change` is told so ([`Self::runs`], judged on the version it changes);
    /// without, no execution is read and `change` is told `false`.
    async fn modify_seeing_runs(
        &self,
        caller: &Caller,
        id: SyncTaskId,
        if_match: Option<&ETag>,
        see_runs: bool,
        mut change: impl FnMut(&mut SyncTask, bool) -> Result<(), DomainError>,
    ) -> Result<Stored<SyncTask>, DomainError> {
        caller.require(Role::Member)?;
        read_modify_write(if_match, async |token| {
            let current = matching(self.tasks.get(&caller.tenant_id, id).await?, token)?;
            let mut task = current.value;
            let running = see_runs && self.runs(&task, self.clock.now()).await?;
            change(&mut task, running)?;
            task.updated_at = self.clock.now();
            task.updated_by = caller.user_id.clone();
            let etag = self.tasks.replace(&task, Some(token.unwrap_or(&current.etag).clone()), &[]).await?;
            Ok(Stored { value: task, etag })
        })
        .await
    }

    /// Replaces a task's settings. A new source or direction starts from empty checkpoints.
    ///
    /// # Errors
    /// `Validation`; `PreconditionFailed` on a stale `if_match`; `NotFound`.
    pub async fn update(
        &self,
        caller: &Caller,
        id: SyncTaskId,
        draft: SyncTaskDraft,
        if_match: Option<&ETag>,
    ) -> Result<Stored<SyncTask>, DomainError> {
        let result = async {
            caller.require(Role::Member)?;
            let settings = draft.validate()?;
            let now = self.clock.now();
            let by = caller.user_id.clone();
            self.modify(caller, id, if_match, |task| {
                task.apply(settings.clone(), by.clone(), now);
                Ok(())
            })
            .await
        }
        .await;
        self.audited(caller, AuditAction::Update, Some(id), result, |_| (String::new(), Value::Null)).await
    }

    /// Deletes a task with its states and conflicts (its executions expire with their TTL).
    ///
    /// # Errors
    /// `Conflict` while an execution is queued or running (cancel it first).
    pub async fn delete(&self, caller: &Caller, id: SyncTaskId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        let result = async {
            caller.require(Role::Member)?;
            let current = self.tasks.get(&caller.tenant_id, id).await?;
            idle(&current.value, self.runs(&current.value, self.clock.now()).await?)?;
            self.tasks.delete(&caller.tenant_id, id, Some(if_match.unwrap_or(&current.etag).clone())).await?;
            // The task is gone: states left behind by a failure here are unreferenced.
            let _ = self.states.clear(&caller.tenant_id, id, true).await;
            Ok(())
        }
        .await;
        self.audited(caller, AuditAction::Delete, Some(id), result, |_| (String::new(), Value::Null)).await
    }

    /// Queues a manual run: the scheduler claims it at once. Returns the queued execution.
    ///
    /// # Errors
    /// `Conflict` while an execution is queued or running, or when the task is not active.
    pub async fn run(&self, caller: &Caller, id: SyncTaskId) -> Result<Stored<SyncExecution>, DomainError> {
        let result = self.run_unaudited(caller, id).await;
        self.audited(caller, AuditAction::Run, Some(id), result, |e| (String::new(), json!({"executionId": e.value.id}))).await
    }

    async fn run_unaudited(&self, caller: &Caller, id: SyncTaskId) -> Result<Stored<SyncExecution>, DomainError> {
        caller.require(Role::Member)?;
        let now = self.clock.now();
        let execution_id = self.ids.new_uuid();
        let task = self
            .modify_seeing_runs(caller, id, None, true, |task, running| {
                idle(task, running)?;
                if task.status != TaskStatus::Active {
                    return Err(DomainError::Conflict(format!("the task is {}: resume it first", task.status.as_str())));
                }
                task.pending_execution = Some(execution_id);
                task.cancel_requested = false;
                task.reschedule(now, now);
                Ok(())
            })
            .await?;
        let execution =
            SyncExecution::queued(execution_id, caller.tenant_id.clone(), id, Trigger::Manual, task.value.checkpoints.clone(), now);
        match self.executions.create(&execution).await {
            Ok(etag) => Ok(Stored { value: execution, etag }),
            Err(e) => {
                // Take the queued run back so the task is not held by an execution that does not exist.
                let _ = self
                    .modify(caller, id, None, |task| {
                        if task.pending_execution == Some(execution_id) {
                            task.pending_execution = None;
                            task.reschedule(now, now);
                        }
                        Ok(())
                    })
                    .await;
                Err(e)
            }
        }
    }

    /// Stops scheduling the task; a running execution finishes.
    pub async fn pause(&self, caller: &Caller, id: SyncTaskId, if_match: Option<&ETag>) -> Result<Stored<SyncTask>, DomainError> {
        let now = self.clock.now();
        let reason = format!("paused by {}", caller.user_id);
        let result = self
            .modify(caller, id, if_match, |task| {
                task.status = TaskStatus::Paused;
                task.status_reason = Some(reason.clone());
                task.reschedule(now, now);
                Ok(())
            })
            .await;
        self.audited(caller, AuditAction::Pause, Some(id), result, |_| (String::new(), Value::Null)).await
    }

    /// Makes a paused task active again and clears its failure count.
    ///
    /// # Errors
    /// `Conflict` for a disabled task (set it active with `PUT`).
    pub async fn resume(&self, caller: &Caller, id: SyncTaskId, if_match: Option<&ETag>) -> Result<Stored<SyncTask>, DomainError> {
        let now = self.clock.now();
        let result = self
            .modify(caller, id, if_match, |task| {
                if task.status == TaskStatus::Disabled {
                    return Err(DomainError::Conflict("the task is disabled: set its status to active".into()));
                }
                task.status = TaskStatus::Active;
                task.status_reason = None;
                task.consecutive_failures = 0;
                task.reschedule(now, now);
                Ok(())
            })
            .await;
        self.audited(caller, AuditAction::Resume, Some(id), result, |_| (String::new(), Value::Null)).await
    }

    /// Asks the running execution to stop at its next page boundary; a queued one is cancelled
    /// at once.
    ///
    /// # Errors
    /// `Conflict` when nothing is queued or running.
    pub async fn cancel(&self, caller: &Caller, id: SyncTaskId) -> Result<Stored<SyncTask>, DomainError> {
        let now = self.clock.now();
        let result = async {
            let mut queued = None;
            let task = self
                .modify_seeing_runs(caller, id, None, true, |task, running| {
                    queued = None;
                    if running {
                        task.cancel_requested = true;
                    } else if let Some(pending) = task.pending_execution.take() {
                        queued = Some(pending);
                        task.reschedule(now, now);
                    } else {
                        return Err(DomainError::Conflict("no execution of this task is queued or running".into()));
                    }
                    Ok(())
                })
                .await;
            let task = task?;
            if let Some(pending) = queued {
                self.finish_queued(caller, pending, now).await?;
            }
            Ok(task)
        }
        .await;
        self.audited(caller, AuditAction::Cancel, Some(id), result, |_| (String::new(), Value::Null)).await
    }

    async fn finish_queued(&self, caller: &Caller, id: Uuid, now: time::OffsetDateTime) -> Result<(), DomainError> {
        read_modify_write(None, async |_| {
            let current = self.executions.get(&caller.tenant_id, id).await?;
            if current.value.status != ExecutionStatus::Queued {
                return Ok(());
            }
            let mut execution = current.value;
            execution.finish(ExecutionStatus::Cancelled, Some(format!("cancelled by {}", caller.user_id)), now);
            self.executions.replace(&execution, Some(current.etag), &[]).await.map(|_| ())
        })
        .await
    }

    /// Forgets the checkpoints (and, with [`ResetScope::All`], states and conflicts).
    ///
    /// # Errors
    /// `Conflict` while an execution is queued or running.
    pub async fn reset(&self, caller: &Caller, id: SyncTaskId, scope: ResetScope) -> Result<Stored<SyncTask>, DomainError> {
        let result = async {
            let task = self
                .modify_seeing_runs(caller, id, None, true, |task, running| {
                    idle(task, running)?;
                    task.checkpoints = Checkpoints::default();
                    Ok(())
                })
                .await?;
            if scope == ResetScope::All {
                self.states.clear(&caller.tenant_id, id, true).await?;
            }
            Ok(task)
        }
        .await;
        let scope = if scope == ResetScope::All { "all" } else { "checkpoints" };
        self.audited(caller, AuditAction::Reset, Some(id), result, |_| (String::new(), json!({"scope": scope}))).await
    }

    pub async fn executions(
        &self,
        caller: &Caller,
        id: SyncTaskId,
        page: &PageRequest,
    ) -> Result<Page<Stored<SyncExecution>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.tasks.get(&caller.tenant_id, id).await?;
        self.executions.list(&caller.tenant_id, id, page).await
    }

    /// # Errors
    /// `NotFound` when the execution is not one of this task's.
    pub async fn execution(&self, caller: &Caller, id: SyncTaskId, execution: Uuid) -> Result<Stored<SyncExecution>, DomainError> {
        caller.require(Role::Viewer)?;
        let found = self.executions.get(&caller.tenant_id, execution).await?;
        if found.value.task_id != id {
            return Err(DomainError::not_found("sync execution", execution));
        }
        Ok(found)
    }

    pub async fn conflicts(&self, caller: &Caller, id: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncConflict>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.tasks.get(&caller.tenant_id, id).await?;
        self.states.list_conflicts(&caller.tenant_id, id, page).await
    }

    /// Settles a conflict: records the choice; the task's next run (the instance holding its
    /// lease) writes it to both sides and marks the conflict applied.
    ///
    /// # Errors
    /// `Conflict` when it was resolved already; `Validation` on `value` when a given value is not
    /// an object holding exactly the conflicting fields.
    pub async fn resolve(
        &self,
        caller: &Caller,
        id: SyncTaskId,
        conflict: Uuid,
        resolution: Resolution,
    ) -> Result<Stored<SyncConflict>, DomainError> {
        let result = async {
            caller.require(Role::Member)?;
            let current = self.states.get_conflict(&caller.tenant_id, id, conflict).await?;
            if !current.value.is_open() {
                return Err(DomainError::Conflict("the conflict was resolved already".into()));
            }
            if let Resolution::Value { value } = &resolution {
                let fits = value
                    .as_object()
                    .is_some_and(|o| o.len() == current.value.fields.len() && current.value.fields.iter().all(|f| o.contains_key(f)));
                if !fits {
                    return Err(DomainError::invalid(
                        "value",
                        format!("must be an object with exactly the fields {}", current.value.fields.join(", ")),
                    ));
                }
            }
            let mut resolved = current.value;
            resolved.resolution = Some(resolution.clone());
            resolved.resolved_at = Some(self.clock.now());
            let etag = self.states.replace_conflict(&resolved, Some(current.etag)).await?;
            Ok(Stored { value: resolved, etag })
        }
        .await;
        self.audit
            .result(caller, AuditResource::SyncConflict, AuditAction::Resolve, Some(conflict.to_string()), &result, |_| {
                (String::new(), json!({"taskId": id}))
            })
            .await;
        result
    }
}
