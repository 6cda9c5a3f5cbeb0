//! Sync tasks: what moves between a provider's entity and a Shard Manager shard type, when, in
//! which direction, and how conflicts and deletes are treated.

use std::fmt;
use std::str::FromStr as _;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::common::{IntegrationId, TenantId, UserId};
use crate::duration::HumanDuration;
use crate::error::{DomainError, FieldViolation, Violations};

/// Identifier of a sync task (UUID v7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SyncTaskId(pub Uuid);

impl SyncTaskId {
    /// Anything that is not a UUID is `None` (the API answers 404).
    pub fn parse(value: &str) -> Option<Self> {
        Uuid::try_parse(value).ok().map(Self)
    }
}

impl fmt::Display for SyncTaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which way records move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Provider to platform.
    Inbound,
    /// Platform to provider.
    Outbound,
    Bidirectional,
}

impl Direction {
    pub fn reads_provider(self) -> bool {
        matches!(self, Direction::Inbound | Direction::Bidirectional)
    }

    pub fn reads_platform(self) -> bool {
        matches!(self, Direction::Outbound | Direction::Bidirectional)
    }
}

/// Whether a run reads changes since the checkpoint or everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    Incremental,
    /// Reads everything; records missing from a complete, error-free enumeration are deleted
    /// (when `deletes` is `propagate`).
    Full,
}

/// Who wins a field changed on both sides since the last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    ProviderWins,
    PlatformWins,
    /// The side whose record was updated last (its `updatedAt`); the provider on a tie.
    NewestWins,
    /// Both versions are kept as a [`super::SyncConflict`] until it is resolved through the API;
    /// the record's other fields keep syncing.
    Manual,
}

/// What a delete on one side does to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletePolicy {
    Propagate,
    Ignore,
}

/// Whether the scheduler runs the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Active,
    /// Paused by a caller or by the service after consecutive failures (the reason says which);
    /// `resume` makes it active again.
    Paused,
    /// Not run, not even manually, until a caller sets it active.
    Disabled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Active => "active",
            TaskStatus::Paused => "paused",
            TaskStatus::Disabled => "disabled",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [TaskStatus::Active, TaskStatus::Paused, TaskStatus::Disabled].into_iter().find(|s| s.as_str() == value)
    }
}

/// The shortest interval of an `every` schedule.
pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The longest interval of a task's `every` schedule.
pub const MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// A five-field cron expression evaluated in an IANA time zone (`*/15 * * * *` in
/// `Europe/Berlin`): each matching wall-clock minute of the zone, daylight-saving changes
/// included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CronParts", into = "CronParts")]
pub struct CronSchedule {
    expression: String,
    timezone: String,
    #[serde(skip)]
    parsed: CronParsed,
}

#[derive(Clone)]
struct CronParsed(croner::Cron, chrono_tz::Tz);

impl fmt::Debug for CronParsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CronParsed")
    }
}

impl PartialEq for CronParsed {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1 && self.0.pattern.to_string() == other.0.pattern.to_string()
    }
}

impl Eq for CronParsed {}

#[derive(Serialize, Deserialize)]
struct CronParts {
    cron: String,
    timezone: String,
}

impl TryFrom<CronParts> for CronSchedule {
    type Error = String;
    fn try_from(parts: CronParts) -> Result<Self, String> {
        CronSchedule::new(&parts.cron, &parts.timezone).map_err(|v| v.to_string())
    }
}

impl From<CronSchedule> for CronParts {
    fn from(value: CronSchedule) -> Self {
        CronParts { cron: value.expression, timezone: value.timezone }
    }
}

impl CronSchedule {
    /// Parses a five-field expression (minute hour day-of-month month day-of-week, with lists,
    /// ranges, steps and names) and an IANA zone name (`UTC` when `timezone` is empty).
    ///
    /// # Errors
    /// A violation on `cron` or `timezone`.
    pub fn new(expression: &str, timezone: &str) -> Result<Self, FieldViolation> {
        let timezone = if timezone.is_empty() { "UTC" } else { timezone };
        let tz = chrono_tz::Tz::from_str(timezone)
            .map_err(|_| FieldViolation::invalid("timezone", format!("'{timezone}' is not an IANA time zone such as Europe/Berlin")))?;
        if expression.split_whitespace().count() != 5 || expression.contains('@') {
            return Err(FieldViolation::invalid("cron", "must have five fields: minute hour day-of-month month day-of-week"));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(expression)
            .map_err(|e| FieldViolation::invalid("cron", format!("is not a valid cron expression: {e}")))?;
        Ok(Self { expression: expression.trim().to_owned(), timezone: timezone.to_owned(), parsed: CronParsed(cron, tz) })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    /// The first matching minute strictly after `after`, if any in the next years.
    pub fn next_after(&self, after: OffsetDateTime) -> Option<OffsetDateTime> {
        use chrono::TimeZone as _;
        let CronParsed(cron, tz) = &self.parsed;
        let start = tz.timestamp_opt(after.unix_timestamp(), after.nanosecond()).single()?;
        let next = cron.find_next_occurrence(&start, false).ok()?;
        OffsetDateTime::from_unix_timestamp(next.timestamp()).ok()
    }
}

impl Default for CronParsed {
    fn default() -> Self {
        #[allow(clippy::expect_used)]
        let cron = croner::parser::CronParser::new().parse("* * * * *").expect("a constant pattern parses");
        Self(cron, chrono_tz::Tz::UTC)
    }
}

/// When the scheduler runs a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Schedule {
    Cron(Box<CronSchedule>),
    /// Every interval (at least [`MIN_INTERVAL`]) after the previous run was due.
    Every {
        every: HumanDuration,
    },
    /// Only `POST /sync-tasks/{id}/run`.
    Manual,
}

impl Schedule {
    /// Checks an interval.
    ///
    /// # Errors
    /// A violation on `every` when it is not a duration of at least one minute.
    pub fn every(text: &str) -> Result<Self, FieldViolation> {
        let every = HumanDuration::parse(text).map_err(|e| FieldViolation::invalid("every", e))?;
        if every.get() < MIN_INTERVAL || every.get() > MAX_INTERVAL {
            return Err(FieldViolation::invalid("every", "must be between 1m and 365d"));
        }
        Ok(Schedule::Every { every })
    }

    /// When the task is due next, given that it was last due (or created, or run) at `after`.
    /// Missed runs collapse: the answer is never before `now`'s next slot for cron, and an
    /// interval counts from `max(after, now - interval)`.
    pub fn next_run(&self, after: OffsetDateTime, now: OffsetDateTime) -> Option<OffsetDateTime> {
        match self {
            Schedule::Manual => None,
            Schedule::Every { every } => {
                let every = every.get();
                let from = if after.checked_add(every.try_into().ok()?)? < now { now } else { after };
                from.checked_add(every.try_into().ok()?)
            }
            Schedule::Cron(cron) => cron.next_after(after.max(now)),
        }
    }
}

/// A JSON pointer (RFC 6901): empty (the whole document) or `/`-separated reference tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JsonPointer(String);

impl JsonPointer {
    /// # Errors
    /// When the text does not start with `/`, is longer than 512 characters, or has a `~` not
    /// followed by `0` or `1`.
    pub fn new(value: impl Into<String>) -> Result<Self, FieldViolation> {
        let value = value.into();
        let bad_escape = value.match_indices('~').any(|(i, _)| !matches!(value.as_bytes().get(i + 1), Some(b'0' | b'1')));
        if !value.starts_with('/') || value.len() > 512 || value.len() < 2 || bad_escape {
            return Err(FieldViolation::invalid("", "must be a JSON pointer such as /fields/summary (RFC 6901)"));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value at this pointer in `doc`.
    pub fn get<'a>(&self, doc: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
        doc.pointer(&self.0)
    }

    /// Sets the value at this pointer, creating the objects on the way.
    pub fn set(&self, doc: &mut serde_json::Value, value: serde_json::Value) {
        let mut current = doc;
        let tokens: Vec<String> = self.0[1..].split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect();
        for (i, token) in tokens.iter().enumerate() {
            if !current.is_object() {
                *current = serde_json::Value::Object(serde_json::Map::new());
            }
            let Some(map) = current.as_object_mut() else { return };
            if i + 1 == tokens.len() {
                map.insert(token.clone(), value);
                return;
            }
            current = map.entry(token.clone()).or_insert(serde_json::Value::Null);
        }
    }
}

impl TryFrom<String> for JsonPointer {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::new(value).map_err(|v| v.message)
    }
}

impl From<JsonPointer> for String {
    fn from(value: JsonPointer) -> String {
        value.0
    }
}

/// One mapped field: where it lives in the provider's record and in the platform's shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldMapping {
    pub provider: JsonPointer,
    pub platform: JsonPointer,
    /// Limits this field to one way (a read-only provider field, say); `None` follows the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
}

/// The last execution, as the task shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastExecution {
    pub id: Uuid,
    pub status: super::ExecutionStatus,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub ended_at: Option<OffsetDateTime>,
}

/// Where the next run starts reading on each side: opaque cursors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoints {
    /// The provider-side cursor (an updated-since value or a page token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The Shard Manager's `changedSince` cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Platform changes before the platform cursor whose write to the provider failed: the
    /// next runs retry them first (at most [`MAX_PENDING_OUTBOUND`], each up to
    /// [`MAX_OUTBOUND_ATTEMPTS`] times).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_outbound: Vec<PendingOutbound>,
}

/// Failed outbound records a task keeps for retry; when a page would add more, the run stops
/// before that page (its cursor is not passed) and the page is read again by the next run.
pub const MAX_PENDING_OUTBOUND: usize = 100;

/// Attempts at writing one platform change to the provider (the first included); after the
/// last failed one the change is reported in the execution's record errors and left until the
/// record changes again.
pub const MAX_OUTBOUND_ATTEMPTS: u32 = 5;

/// A platform change whose write to the provider failed, as it was read, with its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingOutbound {
    pub key: String,
    /// The record as the change carried it (`null` for a delete).
    #[serde(default)]
    pub data: serde_json::Value,
    pub version: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Failed attempts so far.
    pub attempts: u32,
    pub last_error: String,
}

/// An instance's hold on a task while it runs one execution of it (a conditional write on the
/// task; renewed by heartbeats; a hold past `until` belongs to a dead instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskLease {
    pub owner: String,
    pub execution_id: Uuid,
    /// Unix milliseconds in storage, so stores can compare it.
    #[serde(with = "super::unix_millis")]
    pub until: OffsetDateTime,
}

/// What a caller sets on a task (create and replace): as written ([`SyncTaskDraft`], schedule
/// and mappings unchecked) or validated ([`SyncTaskSettings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSettings<S, M> {
    pub integration_id: IntegrationId,
    pub connection_id: Uuid,
    pub entity: String,
    pub target: String,
    pub direction: Direction,
    pub mode: SyncMode,
    pub schedule: S,
    pub field_mapping: Vec<M>,
    pub conflict_policy: ConflictPolicy,
    pub deletes: DeletePolicy,
    pub status: TaskStatus,
}

/// The settings of a task, validated.
pub type SyncTaskSettings = TaskSettings<Schedule, FieldMapping>;

/// A schedule as a caller writes it, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleDraft {
    Cron { cron: String, timezone: Option<String> },
    Every(String),
    Manual,
}

/// A field mapping as a caller writes it, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMappingDraft {
    pub provider: String,
    pub platform: String,
    pub direction: Option<Direction>,
}

/// The settings as a caller writes them; [`SyncTaskDraft::validate`] checks them all at once.
pub type SyncTaskDraft = TaskSettings<ScheduleDraft, FieldMappingDraft>;

/// The largest number of mapped fields of one task.
pub const MAX_FIELDS: usize = 200;

fn check_name(value: &str) -> Result<(), FieldViolation> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(FieldViolation::invalid("", "must be 1 to 128 letters, digits, '-', '_' or '.', starting with a letter or digit"))
    }
}

impl SyncTaskDraft {
    /// Checks every field, reporting each problem by its JSON path (`schedule.cron`,
    /// `fieldMapping[2].platform`).
    ///
    /// # Errors
    /// [`DomainError::Validation`] listing every offending field.
    pub fn validate(self) -> Result<SyncTaskSettings, DomainError> {
        let mut v = Violations::new();
        v.check("entity", check_name(&self.entity));
        v.check("target", check_name(&self.target));
        let schedule = match &self.schedule {
            ScheduleDraft::Cron { cron, timezone } => {
                v.check("schedule", CronSchedule::new(cron, timezone.as_deref().unwrap_or("")).map(|c| Schedule::Cron(Box::new(c))))
            }
            ScheduleDraft::Every(text) => v.check("schedule", Schedule::every(text)),
            ScheduleDraft::Manual => Some(Schedule::Manual),
        };
        if self.field_mapping.is_empty() {
            v.invalid("fieldMapping", "must map at least one field");
        }
        if self.field_mapping.len() > MAX_FIELDS {
            v.invalid("fieldMapping", format!("must map at most {MAX_FIELDS} fields"));
        }
        let mut mapping = Vec::new();
        let mut seen_platform = std::collections::BTreeSet::new();
        let mut seen_provider = std::collections::BTreeSet::new();
        for (i, m) in self.field_mapping.iter().enumerate() {
            let at = format!("fieldMapping[{i}]");
            let provider = v.check(&format!("{at}.provider"), JsonPointer::new(m.provider.clone()));
            let platform = v.check(&format!("{at}.platform"), JsonPointer::new(m.platform.clone()));
            if let Some(direction) = m.direction {
                let allowed = direction == self.direction || self.direction == Direction::Bidirectional;
                if !allowed {
                    v.invalid(format!("{at}.direction"), "must be the task's direction or, in a bidirectional task, one way");
                }
            }
            if let (Some(provider), Some(platform)) = (provider, platform) {
                if !seen_platform.insert(platform.clone()) {
                    v.invalid(format!("{at}.platform"), "is mapped twice");
                }
                if !seen_provider.insert(provider.clone()) {
                    v.invalid(format!("{at}.provider"), "is mapped twice");
                }
                mapping.push(FieldMapping { provider, platform, direction: m.direction });
            }
        }
        let schedule = schedule.unwrap_or(Schedule::Manual);
        v.finish(|| SyncTaskSettings {
            integration_id: self.integration_id,
            connection_id: self.connection_id,
            entity: self.entity,
            target: self.target,
            direction: self.direction,
            mode: self.mode,
            schedule,
            field_mapping: mapping,
            conflict_policy: self.conflict_policy,
            deletes: self.deletes,
            status: self.status,
        })
    }
}

/// A sync task of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncTask {
    pub id: SyncTaskId,
    pub tenant_id: TenantId,
    pub integration_id: IntegrationId,
    pub connection_id: Uuid,
    pub entity: String,
    pub target: String,
    pub direction: Direction,
    pub mode: SyncMode,
    pub schedule: Schedule,
    pub field_mapping: Vec<FieldMapping>,
    pub conflict_policy: ConflictPolicy,
    pub deletes: DeletePolicy,
    pub status: TaskStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// When the scheduler runs it next (`None`: manual, paused or disabled), unix milliseconds
    /// in storage so stores can compare it.
    #[serde(with = "super::unix_millis::option", default)]
    pub next_run_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_execution: Option<LastExecution>,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default)]
    pub checkpoints: Checkpoints,
    /// The running execution's hold, if one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<TaskLease>,
    /// A manual run waiting for the scheduler to claim it (its execution is `queued`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_execution: Option<Uuid>,
    /// Set by `cancel`: the running execution stops at its next page boundary.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub created_by: UserId,
    pub updated_by: UserId,
}

impl SyncTask {
    /// A new task with `settings`, due at its first slot after `now` when active.
    pub fn new(id: SyncTaskId, tenant_id: TenantId, settings: SyncTaskSettings, by: UserId, now: OffsetDateTime) -> Self {
        let mut task = Self {
            id,
            tenant_id,
            integration_id: settings.integration_id,
            connection_id: settings.connection_id,
            entity: String::new(),
            target: String::new(),
            direction: settings.direction,
            mode: settings.mode,
            schedule: Schedule::Manual,
            field_mapping: Vec::new(),
            conflict_policy: settings.conflict_policy,
            deletes: settings.deletes,
            status: settings.status,
            status_reason: None,
            next_run_at: None,
            last_execution: None,
            consecutive_failures: 0,
            checkpoints: Checkpoints::default(),
            lease: None,
            pending_execution: None,
            cancel_requested: false,
            created_at: now,
            updated_at: now,
            created_by: by.clone(),
            updated_by: by.clone(),
        };
        task.apply(settings, by, now);
        task
    }

    /// Replaces the caller-set fields. A change of integration, connection, entity, target or
    /// direction starts over from empty checkpoints.
    pub fn apply(&mut self, settings: SyncTaskSettings, by: UserId, now: OffsetDateTime) {
        let source_changed = self.integration_id != settings.integration_id
            || self.connection_id != settings.connection_id
            || self.entity != settings.entity
            || self.target != settings.target
            || self.direction != settings.direction;
        if source_changed && !self.entity.is_empty() {
            self.checkpoints = Checkpoints::default();
        }
        if settings.status != self.status {
            self.status_reason = None;
            self.consecutive_failures = 0;
        }
        self.integration_id = settings.integration_id;
        self.connection_id = settings.connection_id;
        self.entity = settings.entity;
        self.target = settings.target;
        self.direction = settings.direction;
        self.mode = settings.mode;
        self.schedule = settings.schedule;
        self.field_mapping = settings.field_mapping;
        self.conflict_policy = settings.conflict_policy;
        self.deletes = settings.deletes;
        self.status = settings.status;
        self.updated_at = now;
        self.updated_by = by;
        self.reschedule(now, now);
    }

    /// Recomputes `next_run_at` from the schedule, counting from `after`; a queued manual run
    /// is due at once.
    pub fn reschedule(&mut self, after: OffsetDateTime, now: OffsetDateTime) {
        self.next_run_at = match self.status {
            TaskStatus::Active if self.pending_execution.is_some() => Some(now),
            TaskStatus::Active => self.schedule.next_run(after, now),
            TaskStatus::Paused | TaskStatus::Disabled => None,
        };
    }

    /// Whether an execution holds the task at `now`.
    pub fn is_running(&self, now: OffsetDateTime) -> bool {
        self.lease.as_ref().is_some_and(|l| l.until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn cron_in_a_time_zone() {
        let cron = CronSchedule::new("0 9 * * *", "Europe/Berlin").unwrap();
        // 09:00 in Berlin is 08:00 UTC in winter, 07:00 UTC in summer.
        assert_eq!(cron.next_after(datetime!(2026-01-10 12:00 UTC)), Some(datetime!(2026-01-11 08:00 UTC)));
        assert_eq!(cron.next_after(datetime!(2026-07-10 12:00 UTC)), Some(datetime!(2026-07-11 07:00 UTC)));
        let every = CronSchedule::new("*/15 * * * *", "").unwrap();
        assert_eq!(every.timezone(), "UTC");
        assert_eq!(every.next_after(datetime!(2026-01-10 12:00 UTC)), Some(datetime!(2026-01-10 12:15 UTC)));
    }

    #[test]
    fn bad_cron_and_zones_are_refused_by_field() {
        for (expr, tz, field) in [
            ("* * * *", "UTC", "cron"),
            ("0 * * * * *", "UTC", "cron"),
            ("61 * * * *", "UTC", "cron"),
            ("@daily", "UTC", "cron"),
            ("* * * * *", "Mars/Olympus", "timezone"),
        ] {
            assert_eq!(CronSchedule::new(expr, tz).unwrap_err().field, field, "{expr} {tz}");
        }
    }

    #[test]
    fn intervals_have_a_floor_and_missed_runs_collapse() {
        assert!(Schedule::every("59s").is_err());
        assert!(Schedule::every("ten").is_err());
        let schedule = Schedule::every("10m").unwrap();
        let t0 = datetime!(2026-01-10 12:00 UTC);
        assert_eq!(schedule.next_run(t0, t0), Some(datetime!(2026-01-10 12:10 UTC)));
        // Down for a day: one run now-ish, not 144 catch-up runs.
        let later = datetime!(2026-01-11 12:00 UTC);
        assert_eq!(schedule.next_run(t0, later), Some(datetime!(2026-01-11 12:10 UTC)));
        assert_eq!(Schedule::Manual.next_run(t0, later), None);
    }

    #[test]
    fn pointers() {
        assert!(JsonPointer::new("/fields/summary").is_ok());
        for bad in ["", "/", "fields", "/a~2b", "/a~"] {
            assert!(JsonPointer::new(bad).is_err(), "{bad}");
        }
        let mut doc = serde_json::json!({});
        JsonPointer::new("/a/b~1c").unwrap().set(&mut doc, serde_json::json!(1));
        assert_eq!(doc, serde_json::json!({"a": {"b/c": 1}}));
        assert_eq!(JsonPointer::new("/a/b~1c").unwrap().get(&doc), Some(&serde_json::json!(1)));
    }

    fn draft() -> SyncTaskDraft {
        SyncTaskDraft {
            integration_id: IntegrationId(Uuid::nil()),
            connection_id: Uuid::nil(),
            entity: "issues".into(),
            target: "ticket".into(),
            direction: Direction::Bidirectional,
            mode: SyncMode::Incremental,
            schedule: ScheduleDraft::Every("15m".into()),
            field_mapping: vec![FieldMappingDraft { provider: "/title".into(), platform: "/title".into(), direction: None }],
            conflict_policy: ConflictPolicy::Manual,
            deletes: DeletePolicy::Propagate,
            status: TaskStatus::Active,
        }
    }

    #[test]
    fn a_draft_reports_every_problem_by_path() {
        assert!(draft().validate().is_ok());
        let mut bad = draft();
        bad.entity = String::new();
        bad.schedule = ScheduleDraft::Cron { cron: "nope".into(), timezone: Some("Nowhere".into()) };
        bad.field_mapping.push(FieldMappingDraft { provider: "x".into(), platform: "/title".into(), direction: None });
        bad.field_mapping.push(FieldMappingDraft { provider: "/b".into(), platform: "/title".into(), direction: None });
        let DomainError::Validation(v) = bad.validate().unwrap_err() else { panic!() };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["entity", "schedule.timezone", "fieldMapping[1].provider", "fieldMapping[2].platform"]);
    }

    #[test]
    fn a_task_round_trips_through_json() {
        let now = datetime!(2026-01-10 12:00 UTC);
        let mut settings = draft().validate().unwrap();
        settings.schedule = Schedule::Cron(Box::new(CronSchedule::new("*/15 * * * *", "Europe/Berlin").unwrap()));
        let task = SyncTask::new(SyncTaskId(Uuid::nil()), TenantId::new("t").unwrap(), settings, UserId::new("u").unwrap(), now);
        assert_eq!(task.next_run_at, Some(datetime!(2026-01-10 12:15 UTC)));
        let json = serde_json::to_value(&task).unwrap();
        assert_eq!(json["schedule"], serde_json::json!({"kind": "cron", "cron": "*/15 * * * *", "timezone": "Europe/Berlin"}));
        let back: SyncTask = serde_json::from_value(json).unwrap();
        assert_eq!(back, task);
        assert_eq!(back.schedule.next_run(now, now), task.next_run_at);
    }
}
