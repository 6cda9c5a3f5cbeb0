//! `/api/v1/sync-tasks`: what moves between a provider's entity and a Shard Manager shard type,
//! when and how; manual runs, pause and resume, cancel and reset; executions and conflicts.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::audit::AuditAction;
use im_domain::connection::ConnectionId;
use im_domain::custom::EntityDefinition;
use im_domain::services::ResetScope;
use im_domain::sync::task::{FieldMappingDraft, ScheduleDraft};
use im_domain::sync::{
    Checkpoints, ConflictPolicy, Counts, DeletePolicy, Direction, ExecutionStatus, Resolution, Schedule, Side, SyncConflict, SyncExecution,
    SyncMode, SyncTask, SyncTaskDraft, SyncTaskId, TaskStatus, Trigger,
};
use im_domain::{Caller, DomainError, IntegrationId, Page, PageRequest, Stored, Violations};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::body;
use super::extract::{Authenticated, IfMatch, JsonBody, Write, created, etag_header, unchanged};
use super::problem::{self, ApiError, ApiResult};
use super::{ListResponse, QueryParams, rfc3339};
use crate::state::AppState;

/// An enum of the API mirroring one of the domain's, value for value, both ways.
macro_rules! mirror {
    ($(#[$meta:meta])* $dto:ident as $schema:ident <=> $domain:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        #[schema(as = $schema)]
        pub enum $dto {
            $($variant),+
        }

        impl From<$dto> for $domain {
            fn from(value: $dto) -> Self {
                match value {
                    $($dto::$variant => $domain::$variant),+
                }
            }
        }

        impl From<$domain> for $dto {
            fn from(value: $domain) -> Self {
                match value {
                    $($domain::$variant => $dto::$variant),+
                }
            }
        }
    };
}

mirror!(
    /// Which way records move: `inbound` (provider to platform), `outbound`, `bidirectional`.
    DirectionDto as SyncDirection <=> Direction { Inbound, Outbound, Bidirectional }
);
mirror!(
    /// `incremental` reads changes since the checkpoint; `full` reads everything.
    SyncModeDto as SyncMode <=> SyncMode { Incremental, Full }
);
mirror!(
    /// Who wins a field changed on both sides; `manual` keeps both as a conflict.
    ConflictPolicyDto as SyncConflictPolicy <=> ConflictPolicy { ProviderWins, PlatformWins, NewestWins, Manual }
);
mirror!(
    /// What a delete on one side does to the other.
    DeletePolicyDto as SyncDeletePolicy <=> DeletePolicy { Propagate, Ignore }
);
mirror!(
    /// Whether the scheduler runs the task (`disabled`: not even manually).
    TaskStatusDto as SyncTaskStatus <=> TaskStatus { Active, Paused, Disabled }
);
mirror!(
    /// Where an execution is.
    ExecutionStatusDto as SyncExecutionStatus <=> ExecutionStatus { Queued, Running, Succeeded, Partial, Failed, Cancelled, Expired }
);
mirror!(
    /// What started an execution.
    TriggerDto as SyncTrigger <=> Trigger { Schedule, Manual }
);
mirror!(
    /// A side of the sync: the provider or the platform (Shard Manager).
    SideDto as SyncSide <=> Side { Provider, Platform }
);

/// When the task runs: exactly one of `cron` (with an optional IANA `timezone`, UTC by
/// default), `every` (a duration of `1m` to `365d`, such as `10m`), or `manual: true`.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = SyncSchedule)]
pub struct ScheduleDto {
    /// A five-field cron expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = super::schemas::cron)]
    cron: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "Europe/Berlin", max_length = 64)]
    timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = super::schemas::every)]
    every: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manual: Option<bool>,
}

impl ScheduleDto {
    /// The rules of `SyncSchedule` beside its fields: exactly one of `cron` (with its
    /// `timezone`), `every` or `manual: true`.
    pub fn rules() -> Value {
        json!({
            "oneOf": [
                {"required": ["cron"], "properties": {"cron": {"not": {"type": "null"}}, "every": body::refused(), "manual": body::refused()}},
                {"required": ["every"], "properties": {"every": {"not": {"type": "null"}}, "cron": body::refused(), "manual": body::refused(), "timezone": body::refused()}},
                {"required": ["manual"], "properties": {"manual": {"const": true}, "cron": body::refused(), "every": body::refused(), "timezone": body::refused()}},
            ],
            body::RULE: {"message": "must have exactly one of cron, every or manual"}
        })
    }

    fn into_draft(self, v: &mut Violations) -> ScheduleDraft {
        match (self.cron, self.every, self.manual) {
            (Some(cron), None, None) => return ScheduleDraft::Cron { cron, timezone: self.timezone },
            (None, Some(every), None) if self.timezone.is_none() => return ScheduleDraft::Every(every),
            (None, None, Some(true)) if self.timezone.is_none() => return ScheduleDraft::Manual,
            (None, None, Some(false)) => v.invalid("schedule.manual", "must be true (or give cron or every)"),
            (None, _, _) if self.timezone.is_some() => v.invalid("schedule.timezone", "is only used with cron"),
            _ => v.invalid("schedule", "must have exactly one of cron, every or manual"),
        }
        ScheduleDraft::Manual
    }

    fn of(schedule: &Schedule) -> Self {
        match schedule {
            Schedule::Cron(cron) => {
                Self { cron: Some(cron.expression().to_owned()), timezone: Some(cron.timezone().to_owned()), ..Self::default() }
            }
            Schedule::Every { every } => Self { every: Some(every.to_string()), ..Self::default() },
            Schedule::Manual => Self { manual: Some(true), ..Self::default() },
        }
    }
}

/// One mapped field, by JSON pointer (RFC 6901) on each side.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = SyncFieldMapping)]
pub struct FieldMappingDto {
    /// A JSON pointer (RFC 6901).
    #[schema(example = "/fields/summary", min_length = 2, max_length = 512, pattern = r"^(/([^~]|~[01])*)+$")]
    provider: String,
    /// A JSON pointer (RFC 6901).
    #[schema(example = "/title", min_length = 2, max_length = 512, pattern = r"^(/([^~]|~[01])*)+$")]
    platform: String,
    /// Limits this field to one way; absent follows the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    direction: Option<DirectionDto>,
}

/// Body of `POST /sync-tasks` and `PUT /sync-tasks/{id}`. The read-only fields of the resource
/// may be sent back and are ignored (`api::openapi::READ_ONLY_ECHOES`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncTaskInput {
    integration_id: uuid::Uuid,
    /// A connection of the integration.
    connection_id: uuid::Uuid,
    /// An entity of the integration's provider or custom definition.
    #[schema(example = "issues", max_length = 128)]
    entity: String,
    /// The Shard Manager shard type records go to and come from.
    #[schema(example = "tickets", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
    target: String,
    direction: DirectionDto,
    /// `incremental` when absent.
    #[serde(default)]
    mode: Option<SyncModeDto>,
    schedule: ScheduleDto,
    #[schema(min_items = 1, max_items = 200)]
    field_mapping: Vec<FieldMappingDto>,
    /// `provider_wins` when absent.
    #[serde(default)]
    conflict_policy: Option<ConflictPolicyDto>,
    /// `ignore` when absent.
    #[serde(default)]
    deletes: Option<DeletePolicyDto>,
    /// `active` when absent.
    #[serde(default)]
    status: Option<TaskStatusDto>,
}

impl SyncTaskInput {
    /// The rules of `SyncTaskInput` beside its fields: a mapped field's `direction` is the
    /// task's, or one way in a `bidirectional` task.
    pub fn rules() -> Value {
        let allowed = |direction: &str, items: &[Value]| {
            let items = [items, &[Value::Null]].concat();
            json!({
                "if": {"properties": {"direction": {"const": direction}}, "required": ["direction"]},
                "then": {"properties": {"fieldMapping": {"items": {"properties": {"direction": {"enum": items}}}}}},
            })
        };
        json!({"allOf": [
            allowed("inbound", &[json!("inbound")]),
            allowed("outbound", &[json!("outbound")]),
            allowed("bidirectional", &[json!("inbound"), json!("outbound")]),
        ]})
    }
}

impl TryFrom<SyncTaskInput> for SyncTaskDraft {
    type Error = DomainError;

    fn try_from(input: SyncTaskInput) -> Result<Self, DomainError> {
        let mut v = Violations::new();
        let schedule = input.schedule.into_draft(&mut v);
        let draft = SyncTaskDraft {
            integration_id: IntegrationId(input.integration_id),
            connection_id: input.connection_id,
            entity: input.entity,
            target: input.target,
            direction: input.direction.into(),
            mode: input.mode.map_or(SyncMode::Incremental, Into::into),
            schedule,
            field_mapping: input
                .field_mapping
                .into_iter()
                .map(|m| FieldMappingDraft { provider: m.provider, platform: m.platform, direction: m.direction.map(Into::into) })
                .collect(),
            conflict_policy: input.conflict_policy.map_or(ConflictPolicy::ProviderWins, Into::into),
            deletes: input.deletes.map_or(DeletePolicy::Ignore, Into::into),
            status: input.status.map_or(TaskStatus::Active, Into::into),
        };
        v.finish(|| draft)
    }
}

/// The last execution of a task.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncLastExecution)]
pub struct LastExecutionView {
    id: uuid::Uuid,
    status: ExecutionStatusDto,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    ended_at: Option<String>,
}

/// A sync task.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncTask)]
pub struct SyncTaskView {
    id: uuid::Uuid,
    tenant_id: String,
    integration_id: uuid::Uuid,
    connection_id: uuid::Uuid,
    entity: String,
    target: String,
    direction: DirectionDto,
    mode: SyncModeDto,
    schedule: ScheduleDto,
    field_mapping: Vec<FieldMappingDto>,
    conflict_policy: ConflictPolicyDto,
    deletes: DeletePolicyDto,
    status: TaskStatusDto,
    /// Why the task is paused or disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    status_reason: Option<String>,
    /// When the scheduler runs it next (absent: manual, paused or disabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    next_run_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_execution: Option<LastExecutionView>,
    consecutive_failures: u32,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    created_by: String,
    updated_by: String,
}

impl From<&SyncTask> for SyncTaskView {
    fn from(t: &SyncTask) -> Self {
        Self {
            id: t.id.0,
            tenant_id: t.tenant_id.to_string(),
            integration_id: t.integration_id.0,
            connection_id: t.connection_id,
            entity: t.entity.clone(),
            target: t.target.clone(),
            direction: t.direction.into(),
            mode: t.mode.into(),
            schedule: ScheduleDto::of(&t.schedule),
            field_mapping: t
                .field_mapping
                .iter()
                .map(|m| FieldMappingDto {
                    provider: m.provider.as_str().to_owned(),
                    platform: m.platform.as_str().to_owned(),
                    direction: m.direction.map(Into::into),
                })
                .collect(),
            conflict_policy: t.conflict_policy.into(),
            deletes: t.deletes.into(),
            status: t.status.into(),
            status_reason: t.status_reason.clone(),
            next_run_at: t.next_run_at.map(rfc3339),
            last_execution: t.last_execution.as_ref().map(|e| LastExecutionView {
                id: e.id,
                status: e.status.into(),
                ended_at: e.ended_at.map(rfc3339),
            }),
            consecutive_failures: t.consecutive_failures,
            created_at: rfc3339(t.created_at),
            updated_at: rfc3339(t.updated_at),
            created_by: t.created_by.to_string(),
            updated_by: t.updated_by.to_string(),
        }
    }
}

/// What happened to the records moving one way.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncCounts)]
pub struct CountsView {
    read: u64,
    created: u64,
    updated: u64,
    deleted: u64,
    unchanged: u64,
    /// Writes of the sync itself coming back, recognised and not echoed.
    echoes_skipped: u64,
    conflicts: u64,
    failed: u64,
}

impl From<&Counts> for CountsView {
    fn from(c: &Counts) -> Self {
        Self {
            read: c.read,
            created: c.created,
            updated: c.updated,
            deleted: c.deleted,
            unchanged: c.unchanged,
            echoes_skipped: c.echoes_skipped,
            conflicts: c.conflicts,
            failed: c.failed,
        }
    }
}

/// Counts per direction.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SyncDirectionCounts)]
pub struct DirectionCountsView {
    /// Provider to platform.
    inbound: CountsView,
    /// Platform to provider.
    outbound: CountsView,
}

/// Where a run starts (or ended) reading on each side: opaque cursors.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SyncCheckpoints)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointsView {
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<String>,
    /// Platform changes before the platform cursor whose write to the provider failed: the
    /// next runs retry them (each up to 5 attempts in all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pending_outbound: Vec<PendingOutboundView>,
}

/// A platform change the next run writes to the provider again.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncPendingOutbound)]
pub struct PendingOutboundView {
    /// The record's key in the Shard Manager.
    key: String,
    /// Failed attempts so far.
    attempts: u32,
    last_error: String,
}

impl From<&Checkpoints> for CheckpointsView {
    fn from(c: &Checkpoints) -> Self {
        Self {
            provider: c.provider.clone(),
            platform: c.platform.clone(),
            pending_outbound: c
                .pending_outbound
                .iter()
                .map(|p| PendingOutboundView { key: p.key.clone(), attempts: p.attempts, last_error: p.last_error.clone() })
                .collect(),
        }
    }
}

/// A record that could not be synced.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncRecordError)]
pub struct RecordErrorView {
    record_id: String,
    side: SideDto,
    message: String,
}

/// One run of a sync task (kept 30 days).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncExecution)]
pub struct ExecutionView {
    id: uuid::Uuid,
    task_id: uuid::Uuid,
    status: ExecutionStatusDto,
    trigger: TriggerDto,
    #[schema(format = DateTime)]
    queued_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    ended_at: Option<String>,
    counts: DirectionCountsView,
    checkpoints_from: CheckpointsView,
    checkpoints_to: CheckpointsView,
    /// The first 100 record errors.
    errors: Vec<RecordErrorView>,
    /// Every record error, including those not listed.
    error_count: u64,
    /// Why the run failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<&SyncExecution> for ExecutionView {
    fn from(e: &SyncExecution) -> Self {
        Self {
            id: e.id,
            task_id: e.task_id.0,
            status: e.status.into(),
            trigger: e.trigger.into(),
            queued_at: rfc3339(e.queued_at),
            started_at: e.started_at.map(rfc3339),
            ended_at: e.ended_at.map(rfc3339),
            counts: DirectionCountsView { inbound: (&e.counts.inbound).into(), outbound: (&e.counts.outbound).into() },
            checkpoints_from: (&e.checkpoints_from).into(),
            checkpoints_to: (&e.checkpoints_to).into(),
            errors: e
                .errors
                .iter()
                .map(|r| RecordErrorView { record_id: r.record_id.clone(), side: r.side.into(), message: r.message.clone() })
                .collect(),
            error_count: e.error_count,
            error: e.error.clone(),
        }
    }
}

/// How a conflict is settled: exactly one of `winner` (the side whose version both sides get)
/// or `value` (an object holding exactly the conflicting fields, by platform pointer).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = SyncConflictResolution)]
pub struct ResolutionDto {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    winner: Option<SideDto>,
    /// The conflicting fields' values, by platform pointer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    value: Option<Value>,
}

impl ResolutionDto {
    /// The rules of `SyncConflictResolution` beside its fields: exactly one of `winner` or `value`.
    pub fn rules() -> Value {
        json!({
            "oneOf": [
                {"required": ["winner"], "properties": {"winner": {"not": {"type": "null"}}, "value": body::refused()}},
                {"required": ["value"], "properties": {"value": {"not": {"type": "null"}}, "winner": body::refused()}},
            ],
            body::RULE: {"field": "winner", "message": "give exactly one of winner or value"}
        })
    }
}

impl TryFrom<ResolutionDto> for Resolution {
    type Error = DomainError;

    fn try_from(dto: ResolutionDto) -> Result<Self, DomainError> {
        match (dto.winner, dto.value) {
            (Some(side), None) => Ok(Resolution::Winner { side: side.into() }),
            (None, Some(value)) => Ok(Resolution::Value { value }),
            _ => Err(DomainError::invalid("winner", "give exactly one of winner or value")),
        }
    }
}

impl From<&Resolution> for ResolutionDto {
    fn from(r: &Resolution) -> Self {
        match r {
            Resolution::Winner { side } => Self { winner: Some((*side).into()), value: None },
            Resolution::Value { value } => Self { winner: None, value: Some(value.clone()) },
        }
    }
}

/// A record changed on both sides under the `manual` policy: both versions, kept until settled.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncConflict)]
pub struct ConflictView {
    id: uuid::Uuid,
    task_id: uuid::Uuid,
    platform_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_id: Option<String>,
    /// The conflicting fields, by platform pointer.
    fields: Vec<String>,
    /// The fields as last synced.
    base: Value,
    provider: Value,
    platform: Value,
    #[schema(format = DateTime)]
    detected_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolution: Option<ResolutionDto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    resolved_at: Option<String>,
    /// When a run wrote the resolution to both sides.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    applied_at: Option<String>,
}

impl From<&SyncConflict> for ConflictView {
    fn from(c: &SyncConflict) -> Self {
        Self {
            id: c.id,
            task_id: c.task_id.0,
            platform_key: c.platform_key.clone(),
            provider_id: c.provider_id.clone(),
            fields: c.fields.clone(),
            base: c.base.clone(),
            provider: c.provider.clone(),
            platform: c.platform.clone(),
            detected_at: rfc3339(c.detected_at),
            resolution: c.resolution.as_ref().map(Into::into),
            resolved_at: c.resolved_at.map(rfc3339),
            applied_at: c.applied_at.map(rfc3339),
        }
    }
}

/// What `reset` forgets.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = SyncResetScope)]
pub enum ResetScopeDto {
    /// The checkpoints: the next run reads everything again.
    Checkpoints,
    /// Checkpoints, per-record states and conflicts.
    All,
}

/// Body of `POST /sync-tasks/{id}/reset`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResetInput {
    scope: ResetScopeDto,
}

fn task_id(raw: &str) -> ApiResult<SyncTaskId> {
    SyncTaskId::parse(raw).ok_or_else(|| ApiError::NotFound(format!("sync task '{raw}' was not found")))
}

fn child_id(raw: &str, what: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::try_parse(raw).map_err(|_| ApiError::NotFound(format!("{what} '{raw}' was not found")))
}

fn respond(mut builder: actix_web::HttpResponseBuilder, stored: &Stored<SyncTask>) -> HttpResponse {
    builder.insert_header(etag_header(&stored.etag)).json(SyncTaskView::from(&stored.value))
}

fn page_of(req: &HttpRequest) -> ApiResult<PageRequest> {
    let mut query = QueryParams::parse(req)?;
    let page = query.page();
    query.finish()?;
    Ok(page.unwrap_or_else(|| PageRequest::first(50)))
}

fn listing<T, V>(page: Page<Stored<T>>) -> HttpResponse
where
    V: ToSchema + Serialize + for<'a> From<&'a T>,
{
    let items: Vec<V> = page.items.iter().map(|s| V::from(&s.value)).collect();
    HttpResponse::Ok().json(ListResponse { items, continuation_token: page.continuation })
}

/// The draft's own rules, and that `connectionId` names a connection of the integration in the
/// caller's tenant: every problem in one answer.
async fn check(state: &AppState, caller: &Caller, draft: &SyncTaskDraft) -> Result<(), DomainError> {
    let mut v = Violations::new();
    match draft.clone().validate() {
        Ok(_) => {}
        Err(DomainError::Validation(found)) => found.into_iter().for_each(|f| v.push(f)),
        Err(e) => return Err(e),
    }
    match state.connections.get(caller, draft.integration_id, ConnectionId(draft.connection_id)).await {
        Ok(_) => {
            let entities = entities(state, caller, draft.integration_id).await?;
            match entities.iter().find(|e| e.name == draft.entity) {
                None => {
                    let names: Vec<&str> = entities.iter().map(|e| e.name.as_str()).collect();
                    v.invalid("entity", format!("must be an entity the integration's provider describes: {}", names.join(", ")));
                }
                Some(entity) => {
                    if let Some(problem) = im_domain::services::direction_problem(entity, draft.direction) {
                        v.invalid("direction", problem);
                    }
                }
            }
        }
        Err(DomainError::NotFound { .. }) => v.invalid("connectionId", "must name a connection of the integration integrationId"),
        Err(e) => return Err(e),
    }
    v.finish(|| ())
}

/// The entities a sync can read and write: those of the integration's custom definition, or
/// of its catalog provider.
async fn entities(state: &AppState, caller: &Caller, integration: IntegrationId) -> Result<Vec<EntityDefinition>, DomainError> {
    let integration = state.integrations.get(caller, integration).await?.value;
    let described = match integration.custom_definition {
        Some(definition) => definition.entities,
        None => match state.catalog.get(caller, &integration.provider_id).await {
            Ok(provider) => provider.value.spec.entities,
            Err(DomainError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e),
        },
    };
    Ok(described)
}

async fn read_draft(state: &AppState, caller: &Caller, body: Value) -> ApiResult<SyncTaskDraft> {
    let draft = body::read(
        body,
        |input: SyncTaskInput| SyncTaskDraft::try_from(input),
        async |draft: &SyncTaskDraft| check(state, caller, draft).await,
    )
    .await?;
    check(state, caller, &draft).await?;
    Ok(draft)
}

/// List the tenant's sync tasks.
#[utoipa::path(get, operation_id = "listSyncTasks", path = "/api/v1/sync-tasks", tag = "sync",
    params(
        super::Paging,
    ),
    responses((status = 200, description = "A page of sync tasks", body = ListResponse<SyncTaskView>)),
    security(("bearer" = [])))]
pub async fn list(state: web::Data<AppState>, caller: Authenticated, req: HttpRequest) -> ApiResult<HttpResponse> {
    let page = page_of(&req)?;
    Ok(listing::<_, SyncTaskView>(state.sync_tasks.list(&caller.0, &page).await?))
}

/// Create a sync task.
#[utoipa::path(post, operation_id = "createSyncTask", path = "/api/v1/sync-tasks", tag = "sync",
    request_body = SyncTaskInput,
    responses((status = 201, description = "Created; `Location` and `ETag` are set", body = SyncTaskView)),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, body: JsonBody) -> ApiResult<HttpResponse> {
    state.sync_tasks.authorize(&caller.0, AuditAction::Create).await?;
    let draft = read_draft(&state, &caller.0, body.0).await?;
    let stored = state.sync_tasks.create(&caller.0, draft).await?;
    Ok(respond(created(format!("/api/v1/sync-tasks/{}", stored.value.id)), &stored))
}

/// Read a sync task.
#[utoipa::path(get, operation_id = "getSyncTask", path = "/api/v1/sync-tasks/{id}", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id")),
    responses(
        (status = 200, description = "The task; `ETag` is set", body = SyncTaskView),
        (status = 304, description = "`If-None-Match` names the current version"),
    ),
    security(("bearer" = [])))]
pub async fn get(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let stored = state.sync_tasks.get(&caller.0, task_id(&id)?).await?;
    Ok(unchanged(&req, &stored.etag).unwrap_or_else(|| respond(HttpResponse::Ok(), &stored)))
}

/// Replace a sync task's settings; a new source or direction starts from empty checkpoints.
#[utoipa::path(put, operation_id = "updateSyncTask", path = "/api/v1/sync-tasks/{id}", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id"), IfMatch),
    request_body = SyncTaskInput,
    responses((status = 200, description = "Updated; the new `ETag` is set", body = SyncTaskView)),
    security(("bearer" = [])))]
pub async fn update(state: web::Data<AppState>, write: Write, id: web::Path<String>, body: JsonBody) -> ApiResult<HttpResponse> {
    state.sync_tasks.authorize(&write.caller, AuditAction::Update).await?;
    let id = task_id(&id)?;
    // Another tenant's task is 404 whatever the body says.
    state.sync_tasks.get(&write.caller, id).await?;
    let draft = read_draft(&state, &write.caller, body.0).await?;
    let stored = state.sync_tasks.update(&write.caller, id, draft, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Delete a sync task with its per-record states and conflicts (409 while a run is queued or
/// running: cancel it first).
#[utoipa::path(delete, operation_id = "deleteSyncTask", path = "/api/v1/sync-tasks/{id}", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id"), IfMatch),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "A run is queued or running", body = problem::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(state: web::Data<AppState>, write: Write, id: web::Path<String>) -> ApiResult<HttpResponse> {
    state.sync_tasks.delete(&write.caller, task_id(&id)?, write.tag()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Queue a manual run; the scheduler claims it at once.
#[utoipa::path(post, operation_id = "runSyncTask", path = "/api/v1/sync-tasks/{id}/run", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id")),
    responses(
        (status = 202, description = "Queued; `Location` names the execution", body = ExecutionView),
        (status = 409, description = "A run is queued or running, or the task is not active", body = problem::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn run(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = task_id(&id)?;
    let execution = state.sync_tasks.run(&caller.0, id).await?;
    Ok(HttpResponse::Accepted()
        .insert_header((header::LOCATION, format!("/api/v1/sync-tasks/{id}/executions/{}", execution.value.id)))
        .json(ExecutionView::from(&execution.value)))
}

/// Stop scheduling the task; a running execution finishes.
#[utoipa::path(post, operation_id = "pauseSyncTask", path = "/api/v1/sync-tasks/{id}/pause", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id"), IfMatch),
    responses((status = 200, description = "Paused; the new `ETag` is set", body = SyncTaskView)),
    security(("bearer" = [])))]
pub async fn pause(state: web::Data<AppState>, write: Write, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let stored = state.sync_tasks.pause(&write.caller, task_id(&id)?, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Make a paused task active again, clearing its failure count.
#[utoipa::path(post, operation_id = "resumeSyncTask", path = "/api/v1/sync-tasks/{id}/resume", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id"), IfMatch),
    responses(
        (status = 200, description = "Active; the new `ETag` is set", body = SyncTaskView),
        (status = 409, description = "The task is disabled (set it active with PUT)", body = problem::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn resume(state: web::Data<AppState>, write: Write, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let stored = state.sync_tasks.resume(&write.caller, task_id(&id)?, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Stop the running execution at its next page boundary, or cancel a queued one at once.
#[utoipa::path(post, operation_id = "cancelSyncTaskRun", path = "/api/v1/sync-tasks/{id}/cancel", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id")),
    responses(
        (status = 200, description = "Cancel requested; the new `ETag` is set", body = SyncTaskView),
        (status = 409, description = "Nothing is queued or running", body = problem::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn cancel(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let stored = state.sync_tasks.cancel(&caller.0, task_id(&id)?).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Forget the checkpoints (`checkpoints`), or the checkpoints, per-record states and conflicts
/// (`all`).
#[utoipa::path(post, operation_id = "resetSyncTask", path = "/api/v1/sync-tasks/{id}/reset", tag = "sync",
    params(("id" = uuid::Uuid, Path, description = "Sync task id")),
    request_body = ResetInput,
    responses(
        (status = 200, description = "Reset; the new `ETag` is set", body = SyncTaskView),
        (status = 409, description = "A run is queued or running", body = problem::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn reset(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, body: JsonBody) -> ApiResult<HttpResponse> {
    state.sync_tasks.authorize(&caller.0, AuditAction::Reset).await?;
    let id = task_id(&id)?;
    let scope = body::read(
        body.0,
        |input: ResetInput| {
            Ok(match input.scope {
                ResetScopeDto::Checkpoints => ResetScope::Checkpoints,
                ResetScopeDto::All => ResetScope::All,
            })
        },
        async |_: &ResetScope| Ok(()),
    )
    .await?;
    let stored = state.sync_tasks.reset(&caller.0, id, scope).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// List a task's executions, newest first (kept 30 days).
#[utoipa::path(get, operation_id = "listSyncExecutions", path = "/api/v1/sync-tasks/{id}/executions", tag = "sync",
    params(
        ("id" = uuid::Uuid, Path, description = "Sync task id"),
        super::Paging,
    ),
    responses((status = 200, description = "A page of executions", body = ListResponse<ExecutionView>)),
    security(("bearer" = [])))]
pub async fn executions(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<String>,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let id = task_id(&id)?;
    let page = page_of(&req)?;
    Ok(listing::<_, ExecutionView>(state.sync_tasks.executions(&caller.0, id, &page).await?))
}

/// Read one execution of a task.
#[utoipa::path(get, operation_id = "getSyncExecution", path = "/api/v1/sync-tasks/{id}/executions/{executionId}", tag = "sync",
    params(
        ("id" = uuid::Uuid, Path, description = "Sync task id"),
        ("executionId" = uuid::Uuid, Path, description = "Execution id"),
    ),
    responses((status = 200, description = "The execution", body = ExecutionView)),
    security(("bearer" = [])))]
pub async fn execution(state: web::Data<AppState>, caller: Authenticated, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let id = task_id(&path.0)?;
    let execution = child_id(&path.1, "sync execution")?;
    let found = state.sync_tasks.execution(&caller.0, id, execution).await?;
    Ok(HttpResponse::Ok().json(ExecutionView::from(&found.value)))
}

/// List a task's conflicts (the `manual` policy), open and resolved.
#[utoipa::path(get, operation_id = "listSyncConflicts", path = "/api/v1/sync-tasks/{id}/conflicts", tag = "sync",
    params(
        ("id" = uuid::Uuid, Path, description = "Sync task id"),
        super::Paging,
    ),
    responses((status = 200, description = "A page of conflicts", body = ListResponse<ConflictView>)),
    security(("bearer" = [])))]
pub async fn conflicts(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<String>,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let id = task_id(&id)?;
    let page = page_of(&req)?;
    Ok(listing::<_, ConflictView>(state.sync_tasks.conflicts(&caller.0, id, &page).await?))
}

/// Settle a conflict: the chosen version is recorded on the conflict, and the task's next run
/// writes it to both sides (then `appliedAt` is set).
#[utoipa::path(post, operation_id = "resolveSyncConflict", path = "/api/v1/sync-tasks/{id}/conflicts/{conflictId}/resolve", tag = "sync",
    params(
        ("id" = uuid::Uuid, Path, description = "Sync task id"),
        ("conflictId" = uuid::Uuid, Path, description = "Conflict id"),
    ),
    request_body = ResolutionDto,
    responses(
        (status = 200, description = "Resolved", body = ConflictView),
        (status = 409, description = "Resolved already", body = problem::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn resolve(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<(String, String)>,
    body: JsonBody,
) -> ApiResult<HttpResponse> {
    state.sync_tasks.authorize(&caller.0, AuditAction::Resolve).await?;
    let id = task_id(&path.0)?;
    let conflict = child_id(&path.1, "sync conflict")?;
    let resolution = body::read(body.0, |input: ResolutionDto| Resolution::try_from(input), async |_: &Resolution| Ok(())).await?;
    let resolved = state.sync_tasks.resolve(&caller.0, id, conflict, resolution).await?;
    Ok(HttpResponse::Ok().json(ConflictView::from(&resolved.value)))
}
