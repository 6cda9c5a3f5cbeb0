//! Executions: one run of a sync task, kept 30 days.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::task::{Checkpoints, SyncTaskId};
use crate::common::TenantId;

/// How long executions are kept.
pub const EXECUTION_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// The most record errors an execution keeps (the first ones).
pub const MAX_RECORD_ERRORS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    Queued,
    Running,
    Succeeded,
    /// Finished, with some records failing (see `errors`).
    Partial,
    /// Made no progress (the provider or the Shard Manager refused or could not be reached).
    Failed,
    /// Stopped at a page boundary at a caller's request.
    Cancelled,
    /// Its instance stopped renewing the lease (died); the next run resumes from the checkpoint.
    Expired,
}

impl ExecutionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Queued => "queued",
            ExecutionStatus::Running => "running",
            ExecutionStatus::Succeeded => "succeeded",
            ExecutionStatus::Partial => "partial",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::Cancelled => "cancelled",
            ExecutionStatus::Expired => "expired",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, ExecutionStatus::Queued | ExecutionStatus::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Manual,
}

/// What happened to records moving one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub read: u64,
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    pub unchanged: u64,
    /// Records that came back after the sync's own write and were not written back.
    pub echoes_skipped: u64,
    pub conflicts: u64,
    pub failed: u64,
}

impl Counts {
    /// Whether anything was written.
    pub fn writes(&self) -> u64 {
        self.created + self.updated + self.deleted
    }
}

/// Counts per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectionCounts {
    /// Provider to platform.
    pub inbound: Counts,
    /// Platform to provider.
    pub outbound: Counts,
}

/// Which side a record error happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Provider,
    Platform,
}

/// One record that could not be synced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordError {
    pub record_id: String,
    pub side: Side,
    pub message: String,
}

/// One run of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncExecution {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub task_id: SyncTaskId,
    pub status: ExecutionStatus,
    pub trigger: Trigger,
    #[serde(with = "time::serde::rfc3339")]
    pub queued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub ended_at: Option<OffsetDateTime>,
    /// The instance running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub counts: DirectionCounts,
    pub checkpoints_from: Checkpoints,
    pub checkpoints_to: Checkpoints,
    /// The first [`MAX_RECORD_ERRORS`] record errors.
    #[serde(default)]
    pub errors: Vec<RecordError>,
    /// How many record errors there were in all.
    #[serde(default)]
    pub error_count: u64,
    /// Why the run failed, expired or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SyncExecution {
    pub fn queued(id: Uuid, tenant_id: TenantId, task_id: SyncTaskId, trigger: Trigger, from: Checkpoints, now: OffsetDateTime) -> Self {
        Self {
            id,
            tenant_id,
            task_id,
            status: ExecutionStatus::Queued,
            trigger,
            queued_at: now,
            started_at: None,
            ended_at: None,
            owner: None,
            counts: DirectionCounts::default(),
            checkpoints_to: from.clone(),
            checkpoints_from: from,
            errors: Vec::new(),
            error_count: 0,
            error: None,
        }
    }

    /// Records a failed record; keeps the first [`MAX_RECORD_ERRORS`].
    pub fn record_error(&mut self, error: RecordError) {
        self.error_count += 1;
        if self.errors.len() < MAX_RECORD_ERRORS {
            self.errors.push(error);
        }
    }

    /// Ends the run with `status` at `now`.
    pub fn finish(&mut self, status: ExecutionStatus, error: Option<String>, now: OffsetDateTime) {
        self.status = status;
        self.error = error;
        self.ended_at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_hundred_errors_and_counts_all() {
        let tenant = TenantId::new("t").unwrap();
        let mut e = SyncExecution::queued(
            Uuid::nil(),
            tenant,
            SyncTaskId(Uuid::nil()),
            Trigger::Manual,
            Checkpoints::default(),
            OffsetDateTime::UNIX_EPOCH,
        );
        for i in 0..150 {
            e.record_error(RecordError { record_id: i.to_string(), side: Side::Provider, message: "x".into() });
        }
        assert_eq!(e.errors.len(), MAX_RECORD_ERRORS);
        assert_eq!(e.errors[99].record_id, "99");
        assert_eq!(e.error_count, 150);
        assert!(!e.status.is_final());
        e.finish(ExecutionStatus::Partial, None, OffsetDateTime::UNIX_EPOCH);
        assert!(e.status.is_final());
    }
}

/// `data` of `sync.task.completed`: the outcome of a finished execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncTaskCompletedData {
    pub task_id: SyncTaskId,
    pub execution_id: Uuid,
    pub status: ExecutionStatus,
    pub trigger: Trigger,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub counts: DirectionCounts,
    pub checkpoints_from: Checkpoints,
    pub checkpoints_to: Checkpoints,
    pub error_count: u64,
    pub error: Option<String>,
}

impl SyncExecution {
    /// The `sync.task.completed` event of this (finished) execution. Its id is the execution's
    /// id: recording the completion twice yields one event for consumers, who drop duplicates
    /// by id.
    pub fn completed_event(&self) -> crate::events::DomainEvent {
        let data = SyncTaskCompletedData {
            task_id: self.task_id,
            execution_id: self.id,
            status: self.status,
            trigger: self.trigger,
            started_at: self.started_at,
            ended_at: self.ended_at,
            counts: self.counts,
            checkpoints_from: self.checkpoints_from.clone(),
            checkpoints_to: self.checkpoints_to.clone(),
            error_count: self.error_count,
            error: self.error.clone(),
        };
        crate::events::DomainEvent {
            id: self.id,
            event_type: crate::events::EventType::SyncTaskCompleted,
            tenant_id: self.tenant_id.clone(),
            subject: self.task_id.to_string(),
            time: self.ended_at.unwrap_or(self.queued_at),
            data: crate::events::EventData::of(&data).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod event_tests {
    use super::*;

    #[test]
    fn the_completion_event_matches_its_schema_and_is_keyed_by_the_execution() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../../docs/events/sync.task.completed.schema.json")).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let at = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
        let task = SyncTaskId(Uuid::now_v7());
        let mut e = SyncExecution::queued(Uuid::now_v7(), TenantId::new("t").unwrap(), task, Trigger::Schedule, Checkpoints::default(), at);
        e.started_at = Some(at);
        e.counts.inbound.created = 3;
        e.checkpoints_to.provider = Some("2026-01-01T00:00:00Z".into());
        e.record_error(RecordError { record_id: "42".into(), side: Side::Platform, message: "refused".into() });
        e.finish(ExecutionStatus::Partial, None, at);
        let event = e.completed_event();
        assert_eq!(event.id, e.id, "the execution id is the idempotency key");
        let document = event.cloud_event();
        let problems: Vec<String> = validator.iter_errors(&document).map(|p| p.to_string()).collect();
        assert!(problems.is_empty(), "{problems:?} in {document}");
        assert_eq!(document["data"]["counts"]["inbound"]["created"], 3);
        assert_eq!(document["subject"], task.to_string());
        let mut failed = e.clone();
        failed.finish(ExecutionStatus::Failed, Some("provider unavailable".into()), at);
        assert!(validator.is_valid(&failed.completed_event().cloud_event()));
        let mut bad = document.clone();
        bad["data"]["status"] = "exploded".into();
        assert!(!validator.is_valid(&bad), "the schema checks the status");
    }
}
