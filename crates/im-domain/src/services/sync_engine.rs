//! The sync engine: one run of a sync task between a provider's entity (through the
//! [`ProviderClient`]) and a Shard Manager shard type (through the [`ShardManager`]), with the
//! per-record [`SyncState`]s in the [`SyncStateRepository`]. Ports only: the app's worker claims
//! the run with the scheduler and hands in the connection's credentials.
//!
//! A run has up to three steps, in this order:
//! 1. **Resolved conflicts** (bidirectional): the value a person chose through the API is
//!    written to both sides, then the conflict is marked applied. The resolution is applied by
//!    the next run, not by the `resolve` request: only the run holding the task's lease writes.
//! 2. **Platform changes** (outbound, bidirectional): the Shard Manager's changes since the
//!    platform checkpoint. A change the sync itself wrote (its version is the state's) is an
//!    echo and is skipped; otherwise the provider's current record is read with the entity's
//!    `get` request (bidirectional), the fields are compared three ways with
//!    [`merge::reconcile`], and the winners are written with the entity's upsert request (and
//!    tombstones with its delete request when deletes propagate).
//! 3. **Provider records** (inbound, bidirectional): pages from the provider checkpoint, with
//!    an inclusive updated-since filter moved back by the lookback window; a record whose mapped
//!    fields hash to the state's hash is unchanged (or the sync's own write coming back) and
//!    writes nothing. Changed fields are written to the Shard Manager with the integration as
//!    `source`, conditionally on the platform version the state knows.
//!
//! After each page the checkpoints reached are handed to [`RunControl::page_done`], which
//! saves them (and answers whether to stop): a checkpoint never passes a record that was not
//! written, so a crash loses nothing (records after it are read again and deduplicated by hash).
//! In `full` mode every provider record is read and marked seen by the enumeration; only when
//! the enumeration completed without a failed page or record are the records it did not see
//! deleted from the platform (with `deletes: propagate`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::common::{Clock, IdGenerator, PageRequest, Stored};
use crate::custom::{CustomApiDefinition, EntityDefinition, Pagination};
use crate::error::DomainError;
use crate::integration::Integration;
use crate::provider::ProviderSpec;
use crate::provider_client::{ApiTarget, CredentialSource, PageToken, ProviderClient, ProviderRequest};
use crate::sync::merge::{self, Version};
use crate::sync::ports::{ShardManager, ShardPut, ShardRecord, ShardWrite, ShardWritten, StatePut, SyncStateRepository};
use crate::sync::{
    Counts, DeletePolicy, Direction, ExecutionStatus, FieldMapping, MAX_OUTBOUND_ATTEMPTS, MAX_PENDING_OUTBOUND, PendingOutbound,
    RecordError, Resolution, Side, SyncConflict, SyncExecution, SyncMode, SyncState, SyncTask, fields_hash,
};

/// How the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSettings {
    /// Records asked for per provider page and per Shard Manager changes page.
    pub page_size: u32,
    /// How far before the checkpoint an incremental read starts again (clock skew between the
    /// provider and this service, records committed late): records read twice are deduplicated.
    pub lookback: Duration,
    /// How often a run renews its hold inside a long page (the checkpoint saved is still the
    /// previous page's): well under the scheduler's lease.
    pub heartbeat: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self { page_size: 100, lookback: Duration::from_secs(300), heartbeat: Duration::from_secs(20) }
    }
}

/// Where a task's records come from: the API, the entity and the path parameters filled from
/// the integration's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSource {
    pub target: ApiTarget,
    pub entity: EntityDefinition,
    pub path_params: BTreeMap<String, String>,
}

impl SyncSource {
    /// The source of `entity` of an integration: its custom definition's, or its catalog
    /// provider's (`spec`) with the base URL and path placeholders filled from its config.
    ///
    /// # Errors
    /// `Conflict` when the definition or provider has no such entity (or the integration has
    /// neither); `Validation` when the config lacks a value the base URL needs.
    pub fn for_integration(integration: &Integration, spec: Option<&ProviderSpec>, entity: &str) -> Result<Self, DomainError> {
        let missing = || DomainError::Conflict(format!("the integration has no entity '{entity}' to sync"));
        if let Some(definition) = &integration.custom_definition {
            return Self::custom(definition, entity).ok_or_else(missing);
        }
        let spec = spec.ok_or_else(missing)?;
        let found = spec.entities.iter().find(|e| e.name == entity).ok_or_else(missing)?;
        let config = Value::Object(integration.config.clone());
        let path_params = integration.config.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect();
        Ok(Self {
            target: ApiTarget {
                base_url: super::connection_test::fill_from_config(&spec.api_base_url, &config, "apiBaseUrl")?,
                default_headers: spec.default_headers.clone(),
                pagination: spec.pagination.clone().unwrap_or(Pagination::None),
            },
            entity: found.clone(),
            path_params,
        })
    }

    /// The source of `entity` of a custom definition.
    pub fn custom(definition: &CustomApiDefinition, entity: &str) -> Option<Self> {
        let found = definition.entities.iter().find(|e| e.name == entity)?;
        Some(Self {
            target: ApiTarget {
                base_url: definition.base_url.clone(),
                default_headers: definition.default_headers.clone(),
                pagination: definition.pagination.clone(),
            },
            entity: found.clone(),
            path_params: BTreeMap::new(),
        })
    }
}

/// The run's link to whoever holds it (the scheduler's lease).
#[async_trait]
pub trait RunControl: Send + Sync {
    /// Called after each page, once everything the page needed was written, with the
    /// execution as it stands (`checkpoints_to` is where the next run may start). Saves the
    /// checkpoints and renews the hold; returns `true` when the run must stop (cancelled).
    ///
    /// # Errors
    /// When the hold was lost: the run stops without writing more.
    async fn page_done(&mut self, execution: &SyncExecution) -> Result<bool, DomainError>;
}

/// The provider-side checkpoint: where an enumeration stands. Stored as JSON text in
/// [`crate::sync::Checkpoints::provider`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderCursor {
    /// Records updated at or after this time (less the lookback) are read (incremental mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    /// The enumeration in progress: its id (what `full` mode marks records seen with), when it
    /// started, the page to continue from and the newest `updatedAt` seen so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enumeration: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    newest: Option<String>,
}

fn format_time(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// A record timestamp: RFC 3339 text, or unix seconds or milliseconds.
fn parse_time(value: &Value) -> Option<OffsetDateTime> {
    match value {
        Value::String(text) => OffsetDateTime::parse(text, &Rfc3339).ok(),
        Value::Number(n) => {
            let n = n.as_i64()?;
            if n > 100_000_000_000 {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(n) * 1_000_000).ok()
            } else {
                OffsetDateTime::from_unix_timestamp(n).ok()
            }
        }
        _ => None,
    }
}

/// The value at a dotted path (`fields.updated`).
fn dotted<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(record, |v, key| v.get(key))
}

/// A record's id as text.
fn record_id(record: &Value, id_field: &str) -> Option<String> {
    match dotted(record, id_field)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The platform's record as a state knows it.
fn platform_record(state: &SyncState) -> Value {
    state.platform_data.clone().unwrap_or_else(|| project(&state.fields))
}

/// A record holding `fields` (by platform pointer) and nothing else.
fn project(fields: &Value) -> Value {
    let mut record = json!({});
    if let Some(fields) = fields.as_object() {
        merge::apply(&mut record, fields);
    }
    record
}

/// The provider's record as the last synced fields describe it.
fn provider_projection(mapping: &[FieldMapping], fields: &Value) -> Value {
    let mut record = json!({});
    for m in mapping {
        if let Some(value) = fields.get(m.platform.as_str()) {
            m.provider.set(&mut record, value.clone());
        }
    }
    record
}

/// Why `entity` cannot be synced in `direction`, if it cannot: writing to the provider needs
/// its `upsert` request, and a bidirectional task its `get` request (a platform change is
/// compared with the provider's current record; without reading it, a provider change not yet
/// listed would be overwritten).
pub fn direction_problem(entity: &EntityDefinition, direction: Direction) -> Option<String> {
    if direction.reads_platform() && entity.upsert.is_none() {
        return Some("the entity has no upsert request: records cannot be written to the provider; use direction inbound".into());
    }
    if direction == Direction::Bidirectional && entity.get.is_none() {
        return Some(
            "the entity has no get request: a bidirectional task reads the provider's current record before writing a platform change; use inbound or outbound"
                .into(),
        );
    }
    None
}

/// A platform change to retry, after `attempts` failed ones.
fn pending_outbound(item: &ShardRecord, attempts: u32, last_error: String) -> PendingOutbound {
    PendingOutbound {
        key: item.key.clone(),
        data: item.data.clone(),
        version: item.version.clone(),
        updated_at: item.updated_at,
        source: item.source.clone(),
        deleted: item.deleted,
        attempts,
        last_error,
    }
}

/// Why a run stopped early.
enum Stop {
    Cancelled,
    Failed(DomainError),
}

impl From<DomainError> for Stop {
    fn from(e: DomainError) -> Self {
        Stop::Failed(e)
    }
}

/// Runs sync tasks.
#[derive(Clone)]
pub struct SyncEngine {
    client: Arc<dyn ProviderClient>,
    shards: Arc<dyn ShardManager>,
    states: Arc<dyn SyncStateRepository>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    settings: EngineSettings,
}

impl SyncEngine {
    pub fn new(
        client: Arc<dyn ProviderClient>,
        shards: Arc<dyn ShardManager>,
        states: Arc<dyn SyncStateRepository>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        settings: EngineSettings,
    ) -> Self {
        let settings = EngineSettings { page_size: settings.page_size.clamp(1, 1000), ..settings };
        Self { client, shards, states, clock, ids, settings }
    }

    /// Runs `task` once, from its checkpoints, recording counts, record errors and the
    /// checkpoints reached in `execution`; returns how the run ended and why (never `Queued`,
    /// `Running` or `Expired`). A failed page ends the run `failed` when no page had completed,
    /// else `partial`; failing records end it `partial` (or `failed` when every record read
    /// failed); a cancellation seen at a page boundary ends it `cancelled`.
    pub async fn run(
        &self,
        task: &SyncTask,
        source: &SyncSource,
        credentials: &dyn CredentialSource,
        execution: &mut SyncExecution,
        control: &mut dyn RunControl,
    ) -> (ExecutionStatus, Option<String>) {
        execution.checkpoints_to = task.checkpoints.clone();
        let mut run = Run {
            engine: self,
            task,
            source,
            credentials,
            execution,
            control,
            connection: task.connection_id.to_string(),
            origin: task.integration_id.to_string(),
            pages: 0,
            last_beat: self.clock.now(),
            cancel_pending: false,
            outbound_attempt: None,
            outbound_failure: None,
            retried: (0, 0),
        };
        let result = run.all().await;
        let (pages, (retried, retried_failed)) = (run.pages, run.retried);
        let counts = execution.counts;
        // Retries of changes that failed before do not make a run failed: one record the
        // provider keeps refusing must not pause its task.
        let read = (counts.inbound.read + counts.outbound.read).saturating_sub(retried);
        let failed = (counts.inbound.failed + counts.outbound.failed).saturating_sub(retried_failed);
        match result {
            Ok(()) if execution.error_count > 0 && failed > 0 && failed >= read => {
                (ExecutionStatus::Failed, Some("every record read failed".into()))
            }
            Ok(()) if execution.error_count > 0 => (ExecutionStatus::Partial, None),
            Ok(()) => (ExecutionStatus::Succeeded, None),
            Err(Stop::Cancelled) => (ExecutionStatus::Cancelled, Some("cancelled at a page boundary".into())),
            Err(Stop::Failed(e)) if pages == 0 => (ExecutionStatus::Failed, Some(e.to_string())),
            Err(Stop::Failed(e)) => (ExecutionStatus::Partial, Some(e.to_string())),
        }
    }
}

/// One side of a record, as a run sees it.
struct ProviderSide {
    record: Value,
    id: String,
    updated_at: Option<OffsetDateTime>,
}

struct PlatformSide {
    data: Value,
    version: Option<String>,
    updated_at: Option<OffsetDateTime>,
    /// The sync itself wrote this version.
    ours: bool,
}

/// What [`Run::settle_begin`] decided for one record, up to its Shard Manager write.
struct Settling {
    read_from: Side,
    key: String,
    state: Option<Stored<SyncState>>,
    provider: Option<ProviderSide>,
    platform: Option<PlatformSide>,
    seen_in: Option<Uuid>,
    decision: merge::Decision,
    provider_id: Option<String>,
    provider_version: Option<String>,
    origin: Side,
    /// The platform's record and version before the write.
    platform_data: Option<Value>,
    platform_version: Option<String>,
    /// The write to the Shard Manager, conditional on `platform_version`, when the platform
    /// takes fields.
    write: Option<ShardWrite>,
}

/// A state to save: `next` replaces `current` (created when there is none).
struct PendingState {
    read_from: Side,
    next: SyncState,
    current: Option<Stored<SyncState>>,
}

/// A provider record compared with its state.
enum Compared {
    Nothing,
    Save(Box<PendingState>),
    Settle(Box<Settling>),
}

/// The outcome of a write to the provider.
enum ProviderWrite {
    Done { id: String, record: Option<Value> },
    Refused(String),
}

struct Run<'a> {
    engine: &'a SyncEngine,
    task: &'a SyncTask,
    source: &'a SyncSource,
    credentials: &'a dyn CredentialSource,
    execution: &'a mut SyncExecution,
    control: &'a mut dyn RunControl,
    connection: String,
    /// The `source` of the sync's writes to the Shard Manager: the integration id.
    origin: String,
    pages: u32,
    /// When the hold was last renewed, and whether a cancellation came inside a page.
    last_beat: OffsetDateTime,
    cancel_pending: bool,
    /// The attempt at writing the platform change being handled (1 for a change read from the
    /// feed), and why it failed.
    outbound_attempt: Option<u32>,
    outbound_failure: Option<String>,
    /// Earlier failed changes tried again, and how many of them failed again.
    retried: (u64, u64),
}

impl Run<'_> {
    async fn all(&mut self) -> Result<(), Stop> {
        let direction = self.task.direction;
        if let Some(problem) = direction_problem(&self.source.entity, direction) {
            return Err(Stop::Failed(DomainError::Conflict(format!("entity '{}': {problem}", self.source.entity.name))));
        }
        if direction == Direction::Bidirectional {
            self.apply_resolutions().await?;
        }
        if direction.reads_platform() {
            self.platform_changes().await?;
        }
        if direction.reads_provider() {
            self.provider_records().await?;
        }
        Ok(())
    }

    fn counts(&mut self, side: Side) -> &mut Counts {
        match side {
            Side::Provider => &mut self.execution.counts.inbound,
            Side::Platform => &mut self.execution.counts.outbound,
        }
    }

    /// Counts a record read from `side` that writes nothing: the sync's own write coming back
    /// (`echo`) or an unchanged record.
    fn skipped(&mut self, side: Side, echo: bool) {
        let counts = self.counts(side);
        if echo {
            counts.echoes_skipped += 1;
        } else {
            counts.unchanged += 1;
        }
    }

    /// `side` is where the record was read from.
    fn record_failed(&mut self, side: Side, record_id: &str, mut message: String) {
        self.counts(side).failed += 1;
        if side == Side::Platform
            && let Some(attempt) = self.outbound_attempt
        {
            self.outbound_failure = Some(message.clone());
            message = if attempt >= MAX_OUTBOUND_ATTEMPTS {
                format!("{message}; given up after {attempt} attempts, until the record changes again")
            } else {
                format!("{message} (attempt {attempt} of {MAX_OUTBOUND_ATTEMPTS}; the next run retries it)")
            };
        }
        let write_side = if side == Side::Provider { Side::Platform } else { Side::Provider };
        self.execution.record_error(RecordError { record_id: record_id.to_owned(), side: write_side, message });
    }

    async fn page_done(&mut self) -> Result<(), Stop> {
        self.pages += 1;
        self.last_beat = self.engine.clock.now();
        if self.control.page_done(self.execution).await? || self.cancel_pending {
            return Err(Stop::Cancelled);
        }
        Ok(())
    }

    /// Inside a page: renews the hold when a heartbeat is due. The checkpoints handed over are
    /// still the previous page's; a cancellation waits for the page boundary.
    async fn keep_alive(&mut self) -> Result<(), Stop> {
        let now = self.engine.clock.now();
        if (now - self.last_beat).unsigned_abs() < self.engine.settings.heartbeat {
            return Ok(());
        }
        self.last_beat = now;
        if self.control.page_done(self.execution).await? {
            self.cancel_pending = true;
        }
        Ok(())
    }

    fn tenant(&self) -> &crate::common::TenantId {
        &self.task.tenant_id
    }

    // ----- provider requests -------------------------------------------------------------

    fn request(&self, template: &crate::custom::RequestTemplate, id: Option<&str>, body: Option<Value>) -> ProviderRequest {
        let mut path_params = self.source.path_params.clone();
        if let Some(id) = id {
            path_params.insert("id".into(), id.to_owned());
        }
        ProviderRequest { template: template.clone(), path_params, extra_query: BTreeMap::new(), body }
    }

    /// A status that says the provider fails, not the record: the run stops.
    fn failing(status: u16) -> bool {
        status == 429 || status >= 500 || status == 401 || status == 403
    }

    /// The provider's current record, by id: `None` when it has none (404).
    async fn fetch(&self, id: &str) -> Result<Option<Value>, Stop> {
        let Some(template) = &self.source.entity.get else { return Ok(None) };
        let request = self.request(template, Some(id), None);
        let engine = self.engine;
        let response = engine.client.send(&self.connection, &self.source.target, &request, self.credentials).await?;
        match response.status {
            200..=299 => Ok(response.body),
            404 | 410 => Ok(None),
            status => Err(Stop::Failed(DomainError::Unavailable {
                reason: format!("the provider answered HTTP {status} to a read of record '{id}'"),
                retry_after: None,
            })),
        }
    }

    /// Creates or updates a provider record with `body` (provider fields).
    async fn write_provider(&self, id: &str, body: Value) -> Result<ProviderWrite, Stop> {
        let Some(template) = &self.source.entity.upsert else {
            return Ok(ProviderWrite::Refused(format!("entity '{}' has no upsert request", self.source.entity.name)));
        };
        let request = self.request(template, Some(id), Some(body));
        let engine = self.engine;
        let response = engine.client.send(&self.connection, &self.source.target, &request, self.credentials).await?;
        match response.status {
            200..=299 => {
                let written = response.body.as_ref().and_then(|b| record_id(b, &self.source.entity.id_field));
                Ok(ProviderWrite::Done { id: written.unwrap_or_else(|| id.to_owned()), record: response.body })
            }
            status if Self::failing(status) => Err(Stop::Failed(DomainError::Unavailable {
                reason: format!("the provider answered HTTP {status} to a write"),
                retry_after: None,
            })),
            status => Ok(ProviderWrite::Refused(format!("the provider refused the write (HTTP {status})"))),
        }
    }

    fn provider_version(&self, record: &Value) -> Option<String> {
        let field = self.source.entity.updated_at_field.as_deref()?;
        match dotted(record, field)? {
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    fn updated_at(&self, record: &Value) -> Option<OffsetDateTime> {
        self.source.entity.updated_at_field.as_deref().and_then(|f| dotted(record, f)).and_then(parse_time)
    }

    // ----- the three-way step shared by every phase --------------------------------------

    /// Compares one record's sides with its state and writes what the task's direction and
    /// conflict policy decide; `read_from` is the side the record was read from (for counts).
    async fn settle(
        &mut self,
        read_from: Side,
        key: &str,
        state: Option<Stored<SyncState>>,
        provider: Option<ProviderSide>,
        platform: Option<PlatformSide>,
        seen_in: Option<Uuid>,
    ) -> Result<(), Stop> {
        let Some(mut settling) = self.settle_begin(read_from, key.to_owned(), state, provider, platform, seen_in).await? else {
            return Ok(());
        };
        let written = match settling.write.take() {
            Some(write) => {
                let engine = self.engine;
                let outcome = engine.shards.put(self.tenant(), &self.task.target, key, &write, settling.platform_version.clone()).await;
                Some((write, outcome))
            }
            None => None,
        };
        match self.settle_finish(settling, written).await? {
            Some(pending) => self.save_states(vec![pending]).await,
            None => Ok(()),
        }
    }

    /// The first half of [`Run::settle`]: the three-way decision, the provider write it calls
    /// for, and the Shard Manager write (left to the caller, in [`Settling::write`]). `None`
    /// when the provider refused its write (recorded as failed).
    async fn settle_begin(
        &mut self,
        read_from: Side,
        key: String,
        state: Option<Stored<SyncState>>,
        provider: Option<ProviderSide>,
        platform: Option<PlatformSide>,
        seen_in: Option<Uuid>,
    ) -> Result<Option<Settling>, Stop> {
        let task = self.task;
        let live = state.as_ref().filter(|s| !s.value.deleted);
        let base = live.and_then(|s| s.value.fields.as_object());
        let pv = provider.as_ref().map(|p| Version { record: &p.record, updated_at: p.updated_at });
        let qv = platform.as_ref().map(|p| Version { record: &p.data, updated_at: p.updated_at });
        let decision = merge::reconcile(&task.field_mapping, task.direction, task.conflict_policy, base, pv.as_ref(), qv.as_ref());
        if decision.contested > 0 {
            self.counts(read_from).conflicts += 1;
        }
        let mut provider_id = live.and_then(|s| s.value.provider_id.clone()).or_else(|| provider.as_ref().map(|p| p.id.clone()));
        let mut provider_version = provider.as_ref().and_then(|p| self.provider_version(&p.record));
        if provider_version.is_none() {
            provider_version = live.and_then(|s| s.value.provider_version.clone());
        }
        let mut origin = live.map_or(read_from, |s| s.value.origin);
        if let Some(fields) = &decision.to_provider {
            let creating = provider_id.is_none();
            let mut body = json!({});
            merge::apply(&mut body, fields);
            match self.write_provider(provider_id.as_deref().unwrap_or(&key), body).await? {
                ProviderWrite::Done { id, record } => {
                    provider_id = Some(id);
                    if let Some(version) = record.as_ref().and_then(|r| self.provider_version(r)) {
                        provider_version = Some(version);
                    }
                    origin = Side::Platform;
                    let counts = &mut self.execution.counts.outbound;
                    if creating { counts.created += 1 } else { counts.updated += 1 }
                }
                ProviderWrite::Refused(message) => {
                    self.record_failed(read_from, &key, message);
                    return Ok(None);
                }
            }
        }
        let (platform_data, platform_version) = match (&platform, live) {
            (Some(p), _) => (Some(p.data.clone()), p.version.clone()),
            (None, Some(s)) => (Some(platform_record(&s.value)), s.value.platform_version.clone()),
            (None, None) => (None, None),
        };
        let write = decision.to_platform.as_ref().map(|fields| {
            let mut data = platform_data.clone().unwrap_or_else(|| json!({}));
            merge::apply(&mut data, fields);
            ShardWrite {
                data,
                version: provider_version.clone(),
                updated_at: provider.as_ref().and_then(|p| p.updated_at).unwrap_or_else(|| self.engine.clock.now()),
                source: self.origin.clone(),
            }
        });
        Ok(Some(Settling {
            read_from,
            key,
            state,
            provider,
            platform,
            seen_in,
            decision,
            provider_id,
            provider_version,
            origin,
            platform_data,
            platform_version,
            write,
        }))
    }

    /// The second half of [`Run::settle`], with the outcome of the Shard Manager write (when
    /// there was one): the conflict to open, the counts, and the state to save (`None` when
    /// nothing is to be saved: the platform changed since, or refused the record).
    async fn settle_finish(
        &mut self,
        settling: Settling,
        written: Option<(ShardWrite, Result<ShardWritten, DomainError>)>,
    ) -> Result<Option<PendingState>, Stop> {
        let Settling {
            read_from,
            key,
            state,
            provider,
            platform,
            seen_in,
            decision,
            provider_id,
            provider_version,
            mut origin,
            mut platform_data,
            mut platform_version,
            write: _,
        } = settling;
        if let Some((write, outcome)) = written {
            match outcome {
                Ok(written) => {
                    let creating = platform_data.is_none();
                    platform_version = Some(written.version);
                    platform_data = Some(write.data);
                    origin = Side::Provider;
                    let counts = &mut self.execution.counts.inbound;
                    if creating { counts.created += 1 } else { counts.updated += 1 }
                }
                // The platform changed since its version was read: its change is read as a
                // platform change by this run or the next, which compares the sides again.
                Err(DomainError::PreconditionFailed) => return Ok(None),
                Err(DomainError::Validation(v)) => {
                    let message = v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                    self.record_failed(read_from, &key, format!("the Shard Manager refused the record: {message}"));
                    return Ok(None);
                }
                Err(e) => return Err(Stop::Failed(e)),
            }
        }
        let task = self.task;
        let live = state.as_ref().filter(|s| !s.value.deleted);
        let base = live.and_then(|s| s.value.fields.as_object());
        let mut open_conflict = live.and_then(|s| s.value.open_conflict);
        if !decision.conflicts.is_empty() && open_conflict.is_none() {
            let conflict = self.conflict(&key, provider_id.clone(), base, &decision.conflicts, provider.as_ref(), platform.as_ref());
            let engine = self.engine;
            engine.states.create_conflict(&conflict).await?;
            open_conflict = Some(conflict.id);
        }
        if decision.writes_nothing() {
            self.skipped(read_from, platform.as_ref().is_some_and(|p| p.ours));
        }
        let fields = Value::Object(decision.synced);
        let platform_data = platform_data.filter(|d| *d != project(&fields));
        let next = SyncState {
            tenant_id: task.tenant_id.clone(),
            task_id: task.id,
            platform_key: key,
            hash: fields_hash(&fields),
            fields,
            provider_id,
            provider_version,
            platform_version,
            origin,
            deleted: false,
            updated_at: self.engine.clock.now(),
            platform_data,
            open_conflict,
            seen_in: seen_in.or_else(|| live.and_then(|s| s.value.seen_in)),
        };
        Ok(Some(PendingState { read_from, next, current: state }))
    }

    /// Writes a state unless it is what the store has.
    async fn save_state(&mut self, read_from: Side, next: SyncState, current: Option<&Stored<SyncState>>) -> Result<(), Stop> {
        self.save_states(vec![PendingState { read_from, next, current: current.cloned() }]).await
    }

    /// Writes states in one batch, leaving out those that are what the store has (but for
    /// their time); a state another writer changed since it was read fails its record.
    async fn save_states(&mut self, pending: Vec<PendingState>) -> Result<(), Stop> {
        let mut puts = Vec::with_capacity(pending.len());
        let mut sides = Vec::with_capacity(pending.len());
        for PendingState { read_from, mut next, current } in pending {
            if let Some(current) = &current {
                let at = std::mem::replace(&mut next.updated_at, current.value.updated_at);
                if next == current.value {
                    continue;
                }
                next.updated_at = at;
            }
            sides.push(read_from);
            puts.push(StatePut { state: next, if_match: current.map(|c| c.etag) });
        }
        if puts.is_empty() {
            return Ok(());
        }
        let engine = self.engine;
        let outcomes = engine.states.put_many(&puts).await?;
        for ((put, side), outcome) in puts.iter().zip(sides).zip(outcomes) {
            match outcome {
                Ok(_) => {}
                Err(DomainError::PreconditionFailed | DomainError::Conflict(_)) => {
                    self.record_failed(side, &put.state.platform_key, "its sync state was changed by another writer".into());
                }
                Err(e) => return Err(Stop::Failed(e)),
            }
        }
        Ok(())
    }

    fn conflict(
        &self,
        key: &str,
        provider_id: Option<String>,
        base: Option<&Map<String, Value>>,
        fields: &[String],
        provider: Option<&ProviderSide>,
        platform: Option<&PlatformSide>,
    ) -> SyncConflict {
        let mapping = &self.task.field_mapping;
        let theirs = provider.map(|p| merge::extract(mapping, &p.record, Side::Provider)).unwrap_or_default();
        let ours = platform.map(|p| merge::extract(mapping, &p.data, Side::Platform)).unwrap_or_default();
        let pick = |from: Option<&Map<String, Value>>| -> Value {
            Value::Object(fields.iter().map(|f| (f.clone(), from.and_then(|m| m.get(f)).cloned().unwrap_or(Value::Null))).collect())
        };
        SyncConflict {
            id: self.engine.ids.new_uuid(),
            tenant_id: self.task.tenant_id.clone(),
            task_id: self.task.id,
            platform_key: key.to_owned(),
            provider_id,
            fields: fields.to_vec(),
            base: pick(base),
            provider: pick(Some(&theirs)),
            platform: pick(Some(&ours)),
            detected_at: self.engine.clock.now(),
            resolution: None,
            resolved_at: None,
            applied_at: None,
        }
    }

    // ----- step 1: resolved conflicts ----------------------------------------------------

    async fn apply_resolutions(&mut self) -> Result<(), Stop> {
        let engine = self.engine;
        let mut page = PageRequest::first(100);
        loop {
            let conflicts = engine.states.list_conflicts(self.tenant(), self.task.id, &page).await?;
            for stored in conflicts.items {
                if stored.value.resolution.is_some() && stored.value.applied_at.is_none() {
                    self.apply_resolution(stored).await?;
                }
            }
            match conflicts.continuation {
                Some(next) => page.continuation = Some(next),
                None => return Ok(()),
            }
        }
    }

    async fn apply_resolution(&mut self, stored: Stored<SyncConflict>) -> Result<(), Stop> {
        let engine = self.engine;
        let conflict = &stored.value;
        let values = match &conflict.resolution {
            Some(Resolution::Winner { side: Side::Provider }) => conflict.provider.clone(),
            Some(Resolution::Winner { side: Side::Platform }) => conflict.platform.clone(),
            Some(Resolution::Value { value }) => value.clone(),
            None => return Ok(()),
        };
        let values = values.as_object().cloned().unwrap_or_default();
        let state = engine.states.get(self.tenant(), self.task.id, &conflict.platform_key).await?;
        if let Some(state) = state.filter(|s| !s.value.deleted) {
            let key = conflict.platform_key.clone();
            let to_provider: Map<String, Value> = self
                .task
                .field_mapping
                .iter()
                .filter_map(|m| values.get(m.platform.as_str()).map(|v| (m.provider.as_str().to_owned(), v.clone())))
                .collect();
            let mut next = state.value.clone();
            if !to_provider.is_empty() {
                let mut body = json!({});
                merge::apply(&mut body, &to_provider);
                match self.write_provider(state.value.provider_id.as_deref().unwrap_or(&key), body).await? {
                    ProviderWrite::Done { id, record } => {
                        next.provider_id = Some(id);
                        if let Some(version) = record.as_ref().and_then(|r| self.provider_version(r)) {
                            next.provider_version = Some(version);
                        }
                        self.execution.counts.outbound.updated += 1;
                    }
                    ProviderWrite::Refused(message) => {
                        self.record_failed(Side::Platform, &key, message);
                        return Ok(());
                    }
                }
            }
            let mut data = platform_record(&state.value);
            merge::apply(&mut data, &values);
            let write = ShardWrite {
                data: data.clone(),
                version: next.provider_version.clone(),
                updated_at: engine.clock.now(),
                source: self.origin.clone(),
            };
            match engine.shards.put(self.tenant(), &self.task.target, &key, &write, state.value.platform_version.clone()).await {
                Ok(written) => {
                    next.platform_version = Some(written.version);
                    self.execution.counts.inbound.updated += 1;
                }
                // The platform changed since: the resolution is applied by a later run.
                Err(DomainError::PreconditionFailed) => return Ok(()),
                Err(DomainError::Validation(v)) => {
                    let message = v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                    self.record_failed(Side::Provider, &key, format!("the Shard Manager refused the record: {message}"));
                    return Ok(());
                }
                Err(e) => return Err(Stop::Failed(e)),
            }
            let mut fields = next.fields.as_object().cloned().unwrap_or_default();
            fields.extend(values);
            next.fields = Value::Object(fields);
            next.hash = fields_hash(&next.fields);
            next.platform_data = Some(data).filter(|d| *d != project(&next.fields));
            next.open_conflict = None;
            next.origin = Side::Platform;
            next.updated_at = engine.clock.now();
            self.save_state(Side::Platform, next, Some(&state)).await?;
        }
        let mut applied = stored.value.clone();
        applied.applied_at = Some(engine.clock.now());
        match engine.states.replace_conflict(&applied, Some(stored.etag)).await {
            Ok(_) | Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => Ok(()),
            Err(e) => Err(Stop::Failed(e)),
        }
    }

    // ----- step 2: platform changes ------------------------------------------------------

    async fn platform_changes(&mut self) -> Result<(), Stop> {
        let engine = self.engine;
        let size = engine.settings.page_size;
        self.retry_pending_outbound().await?;
        loop {
            let cursor = self.execution.checkpoints_to.platform.clone();
            let changes = engine.shards.changes(self.tenant(), &self.task.target, cursor.clone(), size).await?;
            let count = changes.items.len();
            for item in &changes.items {
                self.keep_alive().await?;
                let failure = self.outbound(item, 0).await?;
                let pending = &mut self.execution.checkpoints_to.pending_outbound;
                // A newer change of a pending record supersedes it, written or failed anew.
                pending.retain(|p| p.key != item.key);
                if let Some(error) = failure {
                    if pending.len() >= MAX_PENDING_OUTBOUND {
                        return Err(Stop::Failed(DomainError::Unavailable {
                            reason: format!(
                                "more than {MAX_PENDING_OUTBOUND} platform changes could not be written to the provider: the run stops before the rest of this page"
                            ),
                            retry_after: None,
                        }));
                    }
                    pending.push(pending_outbound(item, 1, error));
                }
            }
            let moved = cursor.as_deref() != Some(changes.next_cursor.as_str());
            self.execution.checkpoints_to.platform = Some(changes.next_cursor);
            if count == 0 || !moved {
                return Ok(());
            }
            self.page_done().await?;
        }
    }

    /// The platform changes whose write to the provider failed in earlier runs, each tried
    /// again: kept with one more attempt when it fails again, dropped (reported) after
    /// [`MAX_OUTBOUND_ATTEMPTS`].
    async fn retry_pending_outbound(&mut self) -> Result<(), Stop> {
        let pending = self.execution.checkpoints_to.pending_outbound.clone();
        if pending.is_empty() {
            return Ok(());
        }
        for entry in pending {
            self.keep_alive().await?;
            let item = ShardRecord {
                key: entry.key.clone(),
                data: entry.data.clone(),
                version: entry.version.clone(),
                updated_at: entry.updated_at,
                source: entry.source.clone(),
                deleted: entry.deleted,
            };
            let failure = self.outbound(&item, entry.attempts).await?;
            self.retried.0 += 1;
            self.retried.1 += u64::from(failure.is_some());
            let list = &mut self.execution.checkpoints_to.pending_outbound;
            list.retain(|p| p.key != entry.key);
            if let Some(error) = failure
                && entry.attempts + 1 < MAX_OUTBOUND_ATTEMPTS
            {
                list.push(pending_outbound(&item, entry.attempts + 1, error));
            }
        }
        self.page_done().await
    }

    /// Handles one platform change as attempt `failed_before + 1`; returns why it failed.
    async fn outbound(&mut self, item: &ShardRecord, failed_before: u32) -> Result<Option<String>, Stop> {
        self.outbound_attempt = Some(failed_before + 1);
        self.outbound_failure = None;
        let result = self.platform_change(item).await;
        self.outbound_attempt = None;
        result?;
        Ok(self.outbound_failure.take())
    }

    async fn platform_change(&mut self, item: &ShardRecord) -> Result<(), Stop> {
        let engine = self.engine;
        self.execution.counts.outbound.read += 1;
        let state = engine.states.get(self.tenant(), self.task.id, &item.key).await?;
        let ours = item.source.as_deref() == Some(self.origin.as_str());
        if item.deleted {
            return self.platform_deleted(item, state, ours).await;
        }
        let live = state.as_ref().filter(|s| !s.value.deleted);
        if let Some(s) = live
            && s.value.platform_version.as_deref() == Some(item.version.as_str())
        {
            self.skipped(Side::Platform, ours);
            return Ok(());
        }
        let provider = match live {
            None => None,
            Some(s) => {
                let id = s.value.provider_id.clone().unwrap_or_else(|| item.key.clone());
                let reads = self.task.direction.reads_provider();
                let current = if reads { self.fetch(&id).await? } else { None };
                match current {
                    Some(record) => Some(ProviderSide { updated_at: self.updated_at(&record), record, id }),
                    // In an outbound task the provider is taken to hold what was last synced.
                    None if !reads => Some(ProviderSide {
                        record: provider_projection(&self.task.field_mapping, &s.value.fields),
                        id,
                        updated_at: s.value.provider_version.as_ref().and_then(|v| parse_time(&Value::String(v.clone()))),
                    }),
                    // The provider no longer has it: the platform's record is written again.
                    None => None,
                }
            }
        };
        let platform =
            PlatformSide { data: item.data.clone(), version: Some(item.version.clone()), updated_at: Some(item.updated_at), ours };
        let seen = live.and_then(|s| s.value.seen_in);
        self.settle(Side::Platform, &item.key, state, provider, Some(platform), seen).await
    }

    async fn platform_deleted(&mut self, item: &ShardRecord, state: Option<Stored<SyncState>>, ours: bool) -> Result<(), Stop> {
        let Some(current) = state.filter(|s| !s.value.deleted) else {
            self.skipped(Side::Platform, ours);
            return Ok(());
        };
        let mut next = current.value.clone();
        let propagate = self.task.deletes == DeletePolicy::Propagate;
        match (&self.source.entity.delete, &current.value.provider_id) {
            (Some(template), Some(id)) if propagate => {
                let request = self.request(template, Some(id), None);
                let engine = self.engine;
                let response = engine.client.send(&self.connection, &self.source.target, &request, self.credentials).await?;
                match response.status {
                    200..=299 | 404 | 410 => self.execution.counts.outbound.deleted += 1,
                    status if Self::failing(status) => {
                        return Err(Stop::Failed(DomainError::Unavailable {
                            reason: format!("the provider answered HTTP {status} to a delete"),
                            retry_after: None,
                        }));
                    }
                    status => {
                        self.record_failed(Side::Platform, &item.key, format!("the provider refused the delete (HTTP {status})"));
                        return Ok(());
                    }
                }
            }
            _ => self.execution.counts.outbound.unchanged += 1,
        }
        next.deleted = true;
        next.origin = Side::Platform;
        next.platform_version = Some(item.version.clone());
        next.updated_at = self.engine.clock.now();
        self.save_state(Side::Platform, next, Some(&current)).await
    }

    // ----- step 3: provider records ------------------------------------------------------

    async fn provider_records(&mut self) -> Result<(), Stop> {
        let engine = self.engine;
        let entity = &self.source.entity;
        let full = self.task.mode == SyncMode::Full;
        let mut cursor: ProviderCursor =
            self.execution.checkpoints_to.provider.as_deref().and_then(|c| serde_json::from_str(c).ok()).unwrap_or_default();
        if cursor.enumeration.is_none() {
            cursor.enumeration = Some(engine.ids.new_uuid());
            cursor.started = Some(format_time(engine.clock.now()));
            cursor.page = None;
            cursor.newest = None;
        }
        let lookback = time::Duration::try_from(engine.settings.lookback).unwrap_or(time::Duration::ZERO);
        let since =
            if full { None } else { cursor.since.as_ref().and_then(|s| parse_time(&Value::String(s.clone()))).map(|s| s - lookback) };
        let mut request = self.request(&entity.list, None, None);
        let mut skip_older = since;
        if let (Some(param), Some(since)) = (&entity.updated_since_param, since) {
            request.extra_query.insert(param.clone(), format_time(since));
            skip_older = None;
        }
        let enumeration = cursor.enumeration;
        let mut newest = cursor.newest.as_ref().and_then(|s| parse_time(&Value::String(s.clone())));
        loop {
            let token = cursor.page.clone().map(PageToken);
            let page = engine
                .client
                .list_page(
                    &self.connection,
                    &self.source.target,
                    &request,
                    token.as_ref(),
                    Some(engine.settings.page_size),
                    self.credentials,
                )
                .await?;
            let page_newest = self.provider_page(page.records, skip_older, full.then_some(enumeration).flatten()).await?;
            newest = newest.max(page_newest);
            cursor.newest = newest.map(format_time);
            cursor.page = page.next.map(|t| t.0);
            let complete = cursor.page.is_none();
            if complete {
                // The next run reads from the newest change seen, but never from after this
                // enumeration started (a record changed on a page already read during it).
                let started = cursor.started.as_ref().and_then(|s| parse_time(&Value::String(s.clone())));
                let next = match (newest, started) {
                    (Some(n), Some(s)) => Some(n.min(s)),
                    (n, _) => n,
                };
                if let Some(next) = next {
                    cursor.since = Some(format_time(next));
                }
                cursor = ProviderCursor { since: cursor.since, ..ProviderCursor::default() };
            }
            self.execution.checkpoints_to.provider = Some(serde_json::to_string(&cursor).unwrap_or_default());
            self.page_done().await?;
            if complete {
                break;
            }
        }
        if full
            && self.execution.error_count == 0
            && let Some(enumeration) = enumeration
        {
            self.sweep(enumeration).await?;
        }
        Ok(())
    }

    /// Handles one page of provider records; returns the newest `updatedAt` among them. The
    /// page goes in batches (the whole page, unless two records write the same platform key):
    /// see [`Run::provider_batch`].
    async fn provider_page(
        &mut self,
        records: Vec<Value>,
        skip_older: Option<OffsetDateTime>,
        seen_in: Option<Uuid>,
    ) -> Result<Option<OffsetDateTime>, Stop> {
        let mut newest = None;
        let mut batch = Vec::with_capacity(records.len());
        for record in records {
            let updated_at = self.updated_at(&record);
            if let (Some(since), Some(at)) = (skip_older, updated_at)
                && at < since
            {
                continue;
            }
            newest = newest.max(updated_at);
            self.execution.counts.inbound.read += 1;
            let Some(id) = record_id(&record, &self.source.entity.id_field) else {
                self.record_failed(Side::Provider, "", format!("the record has no id at '{}'", self.source.entity.id_field));
                continue;
            };
            batch.push(ProviderSide { record, id, updated_at });
        }
        // Each batch settles at least its first record; what it leaves goes in the next.
        while !batch.is_empty() {
            batch = self.provider_batch(batch, seen_in).await?;
        }
        Ok(newest)
    }

    /// Records of one page, with one call for each step: their states are
    /// read together; each record is compared with its state (and written to the provider when
    /// the policy says so); the page's Shard Manager writes go in one batch, then its states in
    /// one batch. Both are durable before the caller saves the page's checkpoint, so a crash
    /// loses nothing (records after the checkpoint are read again and deduplicated by hash).
    /// Returns the records left for a later batch: one whose platform key an earlier record of
    /// the batch writes (an id repeated in the page, or a state found by provider id), read
    /// again once that one is saved.
    async fn provider_batch(&mut self, records: Vec<ProviderSide>, seen_in: Option<Uuid>) -> Result<Vec<ProviderSide>, Stop> {
        let engine = self.engine;
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let mut states = engine.states.get_many(self.tenant(), self.task.id, &ids).await?;
        // A record the sync created at the provider has the platform key as its id when the
        // upsert request names the id (`PUT /records/{id}`); only when the provider assigns ids
        // is it looked up by provider id (a query, not a read by key).
        let provider_assigns_ids = self.source.entity.upsert.as_ref().is_some_and(|u| !u.path.contains("{id}"));
        if self.task.direction == Direction::Bidirectional && provider_assigns_ids {
            let missing: Vec<usize> = states.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i).collect();
            if !missing.is_empty() {
                let wanted: Vec<String> = missing.iter().map(|&i| ids[i].clone()).collect();
                let found = engine.states.find_many_by_provider_ids(self.tenant(), self.task.id, &wanted).await?;
                for (i, state) in missing.into_iter().zip(found) {
                    states[i] = state;
                }
            }
        }
        let mut keys = HashSet::new();
        let mut later = Vec::new();
        let mut pending = Vec::new();
        let mut settling = Vec::new();
        let mut failure = None;
        for (provider, state) in records.into_iter().zip(states) {
            self.keep_alive().await?;
            let key = state.as_ref().map_or(provider.id.as_str(), |s| s.value.platform_key.as_str());
            if !keys.insert(key.to_owned()) {
                later.push(provider);
                continue;
            }
            match self.provider_compare(provider, state, seen_in).await {
                Ok(Compared::Nothing) => {}
                Ok(Compared::Save(state)) => pending.push(*state),
                Ok(Compared::Settle(s)) => settling.push(*s),
                // What was decided before is still written (a provider write may have been made).
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut puts = Vec::new();
        let mut writing = Vec::new();
        for (i, s) in settling.iter_mut().enumerate() {
            if let Some(write) = s.write.take() {
                puts.push(ShardPut { key: s.key.clone(), write, if_match: s.platform_version.clone() });
                writing.push(i);
            }
        }
        let mut written: Vec<_> = settling.iter().map(|_| None).collect();
        if !puts.is_empty() {
            let outcomes = engine.shards.put_many(self.tenant(), &self.task.target, &puts).await?;
            for ((i, put), outcome) in writing.into_iter().zip(puts).zip(outcomes) {
                written[i] = Some((put.write, outcome));
            }
        }
        for (s, written) in settling.into_iter().zip(written) {
            match self.settle_finish(s, written).await {
                Ok(Some(state)) => pending.push(state),
                Ok(None) => {}
                Err(e) => {
                    failure = failure.or(Some(e));
                    break;
                }
            }
        }
        let saved = self.save_states(pending).await;
        match failure {
            Some(e) => Err(e),
            None => saved.map(|()| later),
        }
    }

    /// Compares one provider record with its state: unchanged (perhaps only to be marked seen
    /// by the enumeration), or to be settled.
    async fn provider_compare(
        &mut self,
        provider: ProviderSide,
        state: Option<Stored<SyncState>>,
        seen_in: Option<Uuid>,
    ) -> Result<Compared, Stop> {
        if self.source.entity.deleted.as_ref().is_some_and(|d| d.marks(&provider.record)) {
            self.provider_deleted(state).await?;
            return Ok(Compared::Nothing);
        }
        let live = state.as_ref().filter(|s| !s.value.deleted);
        // A record deleted on the platform (the delete ignored) stays deleted until the
        // provider changes it.
        if let Some(s) = state.as_ref().filter(|s| s.value.deleted && self.task.direction == Direction::Bidirectional) {
            let theirs = Value::Object(merge::extract(&self.task.field_mapping, &provider.record, Side::Provider));
            if fields_hash(&theirs) == s.value.hash {
                self.skipped(Side::Provider, false);
                return Ok(Compared::Nothing);
            }
        }
        if let Some(s) = live {
            let theirs = Value::Object(merge::extract(&self.task.field_mapping, &provider.record, Side::Provider));
            if fields_hash(&theirs) == s.value.hash {
                self.skipped(Side::Provider, s.value.origin == Side::Platform);
                if seen_in.is_some() && s.value.seen_in != seen_in {
                    let mut next = s.value.clone();
                    next.seen_in = seen_in;
                    return Ok(Compared::Save(Box::new(PendingState { read_from: Side::Provider, next, current: state })));
                }
                return Ok(Compared::Nothing);
            }
        }
        let key = live.map_or_else(|| provider.id.clone(), |s| s.value.platform_key.clone());
        let platform = live.map(|s| PlatformSide {
            data: platform_record(&s.value),
            version: s.value.platform_version.clone(),
            updated_at: Some(s.value.updated_at),
            ours: false,
        });
        let settling = self.settle_begin(Side::Provider, key, state, Some(provider), platform, seen_in).await?;
        Ok(settling.map_or(Compared::Nothing, |s| Compared::Settle(Box::new(s))))
    }

    /// A listed record the entity's `deleted` marker marks: with `deletes: propagate` a synced
    /// record is deleted from the platform; a record never synced is not created.
    async fn provider_deleted(&mut self, state: Option<Stored<SyncState>>) -> Result<(), Stop> {
        match state.filter(|s| !s.value.deleted) {
            Some(current) if self.task.deletes == DeletePolicy::Propagate => self.delete_on_platform(&current).await,
            _ => {
                self.skipped(Side::Provider, false);
                Ok(())
            }
        }
    }

    /// Deletes a synced record from the platform because the provider deleted it.
    async fn delete_on_platform(&mut self, stored: &Stored<SyncState>) -> Result<(), Stop> {
        let engine = self.engine;
        engine.shards.delete(self.tenant(), &self.task.target, &stored.value.platform_key).await?;
        self.execution.counts.inbound.deleted += 1;
        let mut next = stored.value.clone();
        next.deleted = true;
        next.origin = Side::Provider;
        next.updated_at = engine.clock.now();
        self.save_state(Side::Provider, next, Some(stored)).await
    }

    /// After a complete, error-free full enumeration: records it did not see are gone from the
    /// provider; with `deletes: propagate` they are deleted from the platform.
    async fn sweep(&mut self, enumeration: Uuid) -> Result<(), Stop> {
        if self.task.deletes != DeletePolicy::Propagate {
            return Ok(());
        }
        let engine = self.engine;
        let mut page = PageRequest::first(100);
        loop {
            let states = engine.states.list(self.tenant(), self.task.id, &page).await?;
            for stored in states.items {
                let s = &stored.value;
                if s.deleted || s.provider_id.is_none() || s.seen_in == Some(enumeration) {
                    continue;
                }
                self.delete_on_platform(&stored).await?;
            }
            match states.continuation {
                Some(next) => page.continuation = Some(next),
                None => return Ok(()),
            }
        }
    }
}
