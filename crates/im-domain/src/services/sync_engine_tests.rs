//! The engine against in-memory fakes of its ports: a provider API, a Shard Manager and a state
//! store, all answering at once (the domain has no async runtime).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::block_on;
use super::sync_engine::{EngineSettings, RunControl, SyncEngine, SyncSource};
use crate::common::{Clock, ETag, IdGenerator, IntegrationId, Page, PageRequest, Stored, TenantId, UserId};
use crate::custom::{EntityDefinition, HttpMethod, Pagination, RequestTemplate};
use crate::error::DomainError;
use crate::provider_client::{
    ApiTarget, CredentialSource, NoCredentials, PageToken, ProviderClient, ProviderPage, ProviderRequest, ProviderResponse,
};
use crate::sync::ports::{ShardChanges, ShardManager, ShardRecord, ShardWrite, ShardWritten, SyncStateRepository};
use crate::sync::task::{FieldMappingDraft, ScheduleDraft};
use crate::sync::{
    ConflictPolicy, DeletePolicy, Direction, ExecutionStatus, Resolution, Side, SyncConflict, SyncExecution, SyncMode, SyncState, SyncTask,
    SyncTaskDraft, SyncTaskId, TaskStatus, Trigger, state_id,
};

// ----- fakes ---------------------------------------------------------------------------------

struct Now;
impl Clock for Now {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

struct Ids;
impl IdGenerator for Ids {
    fn new_uuid(&self) -> Uuid {
        Uuid::now_v7()
    }
}

#[derive(Default)]
struct ApiState {
    records: BTreeMap<String, Value>,
    clock: i64,
    /// List calls so far, and the list call (0-based) that fails.
    lists: usize,
    fail_list: Option<usize>,
    /// Ids whose writes are refused with 422.
    refuse: BTreeSet<String>,
    writes: usize,
    deletes: usize,
    /// Every page ends with its first record again (a provider that repeats records).
    repeat_first: bool,
}

/// A provider API: records `{"id", "title", "state", "updated_at"}`, pages by offset, filter
/// `updated_since`, `GET/PUT/DELETE /records/{id}` (PUT creates a missing record).
#[derive(Default, Clone)]
struct Api(Arc<Mutex<ApiState>>);

const EPOCH: i64 = 1_767_225_600;

fn stamp(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(EPOCH + seconds).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap()
}

impl Api {
    fn with(n: usize) -> Self {
        let api = Api::default();
        for i in 0..n {
            api.upsert(&format!("r{i:05}"), json!({"title": format!("title {i}"), "state": "open"}));
        }
        api
    }

    fn upsert(&self, id: &str, fields: Value) -> Value {
        let mut s = self.0.lock().unwrap();
        s.clock += 1;
        let at = stamp(s.clock);
        let record = s.records.entry(id.to_owned()).or_insert_with(|| json!({"id": id}));
        for (k, v) in fields.as_object().unwrap() {
            record[k] = v.clone();
        }
        record["updated_at"] = json!(at);
        record.clone()
    }

    fn get(&self, id: &str) -> Option<Value> {
        self.0.lock().unwrap().records.get(id).cloned()
    }

    fn writes(&self) -> (usize, usize) {
        let s = self.0.lock().unwrap();
        (s.writes, s.deletes)
    }
}

#[async_trait]
impl ProviderClient for Api {
    async fn send(
        &self,
        _: &str,
        _: &ApiTarget,
        request: &ProviderRequest,
        _: &dyn CredentialSource,
    ) -> Result<ProviderResponse, DomainError> {
        let id = request.path_params.get("id").cloned().unwrap_or_default();
        let answer = |status: u16, body: Option<Value>| Ok(ProviderResponse { status, body, latency: std::time::Duration::ZERO });
        match request.template.method {
            HttpMethod::Get => {
                let found = self.get(&id);
                answer(if found.is_some() { 200 } else { 404 }, found)
            }
            HttpMethod::Put => {
                if self.0.lock().unwrap().refuse.contains(&id) {
                    return answer(422, None);
                }
                self.0.lock().unwrap().writes += 1;
                let record = self.upsert(&id, request.body.clone().unwrap_or(json!({})));
                answer(200, Some(record))
            }
            HttpMethod::Delete => {
                let mut s = self.0.lock().unwrap();
                s.deletes += 1;
                let existed = s.records.remove(&id).is_some();
                answer(if existed { 204 } else { 404 }, None)
            }
            _ => answer(405, None),
        }
    }

    async fn list_page(
        &self,
        _: &str,
        _: &ApiTarget,
        request: &ProviderRequest,
        page: Option<&PageToken>,
        page_size: Option<u32>,
        _: &dyn CredentialSource,
    ) -> Result<ProviderPage, DomainError> {
        let mut s = self.0.lock().unwrap();
        s.lists += 1;
        if s.fail_list == Some(s.lists - 1) {
            return Err(DomainError::Unavailable { reason: "the provider answered HTTP 503".into(), retry_after: None });
        }
        let since = request.extra_query.get("updated_since").cloned();
        let matching: Vec<&Value> =
            s.records.values().filter(|r| since.as_ref().is_none_or(|since| r["updated_at"].as_str().unwrap() >= since.as_str())).collect();
        let start: usize = page.map_or(0, |p| p.0.parse().unwrap());
        let size = page_size.unwrap_or(10) as usize;
        let mut records: Vec<Value> = matching.iter().skip(start).take(size).map(|r| (*r).clone()).collect();
        if s.repeat_first
            && let Some(first) = records.first().cloned()
        {
            records.push(first);
        }
        let next = (start + size < matching.len()).then(|| PageToken((start + size).to_string()));
        Ok(ProviderPage { records, next, status: 200 })
    }
}

#[derive(Default)]
struct ShardState {
    seq: i64,
    records: BTreeMap<String, ShardRecord>,
    /// Records the Shard Manager refuses (a validation error).
    refuse: BTreeSet<String>,
    writes: usize,
}

#[derive(Default, Clone)]
struct Shards(Arc<Mutex<ShardState>>);

impl Shards {
    fn data(&self, key: &str) -> Option<Value> {
        self.0.lock().unwrap().records.get(key).filter(|r| !r.deleted).map(|r| r.data.clone())
    }

    fn live(&self) -> usize {
        self.0.lock().unwrap().records.values().filter(|r| !r.deleted).count()
    }

    fn writes(&self) -> usize {
        self.0.lock().unwrap().writes
    }

    /// A platform user's edit.
    fn edit(&self, key: &str, data: Value) {
        let mut s = self.0.lock().unwrap();
        s.seq += 1;
        let record = ShardRecord {
            key: key.into(),
            data,
            version: s.seq.to_string(),
            updated_at: OffsetDateTime::now_utc(),
            source: None,
            deleted: false,
        };
        s.records.insert(key.into(), record);
    }

    fn remove(&self, key: &str) {
        let mut s = self.0.lock().unwrap();
        s.seq += 1;
        let seq = s.seq;
        if let Some(r) = s.records.get_mut(key) {
            r.deleted = true;
            r.version = seq.to_string();
            r.source = None;
        }
    }
}

#[async_trait]
impl ShardManager for Shards {
    async fn put(
        &self,
        _: &TenantId,
        _: &str,
        key: &str,
        write: &ShardWrite,
        if_match: Option<String>,
    ) -> Result<ShardWritten, DomainError> {
        let mut s = self.0.lock().unwrap();
        if s.refuse.contains(key) {
            return Err(DomainError::invalid("data", "refused"));
        }
        if let Some(expected) = if_match {
            let live = s.records.get(key).filter(|r| !r.deleted).map(|r| r.version.clone());
            if live != Some(expected) {
                return Err(DomainError::PreconditionFailed);
            }
        }
        s.seq += 1;
        s.writes += 1;
        let version = s.seq.to_string();
        let record = ShardRecord {
            key: key.into(),
            data: write.data.clone(),
            version: version.clone(),
            updated_at: write.updated_at,
            source: Some(write.source.clone()),
            deleted: false,
        };
        s.records.insert(key.into(), record);
        Ok(ShardWritten { key: key.into(), version, updated_at: write.updated_at })
    }

    async fn changes(&self, _: &TenantId, _: &str, cursor: Option<String>, limit: u32) -> Result<ShardChanges, DomainError> {
        let s = self.0.lock().unwrap();
        let after: i64 = cursor.map_or(0, |c| c.parse().unwrap());
        let mut items: Vec<ShardRecord> = s.records.values().filter(|r| r.version.parse::<i64>().unwrap() > after).cloned().collect();
        items.sort_by_key(|r| r.version.parse::<i64>().unwrap());
        items.truncate(limit as usize);
        let next = items.last().map_or(after, |r| r.version.parse().unwrap());
        Ok(ShardChanges { items, next_cursor: next.to_string() })
    }

    async fn delete(&self, _: &TenantId, _: &str, key: &str) -> Result<(), DomainError> {
        let mut s = self.0.lock().unwrap();
        s.writes += 1;
        drop(s);
        self.remove(key);
        Ok(())
    }
}

#[derive(Default)]
struct StateStore {
    states: BTreeMap<String, (SyncState, u64)>,
    conflicts: BTreeMap<Uuid, (SyncConflict, u64)>,
    version: u64,
}

#[derive(Default, Clone)]
struct States(Arc<Mutex<StateStore>>);

fn etag(n: u64) -> ETag {
    ETag::new(n.to_string())
}

#[async_trait]
impl SyncStateRepository for States {
    async fn get(&self, _: &TenantId, task: SyncTaskId, key: &str) -> Result<Option<Stored<SyncState>>, DomainError> {
        let s = self.0.lock().unwrap();
        Ok(s.states.get(&state_id(task, key)).map(|(v, e)| Stored { value: v.clone(), etag: etag(*e) }))
    }

    async fn find_by_provider_id(&self, _: &TenantId, _: SyncTaskId, id: &str) -> Result<Option<Stored<SyncState>>, DomainError> {
        let s = self.0.lock().unwrap();
        let found = s.states.values().find(|(v, _)| v.provider_id.as_deref() == Some(id));
        Ok(found.map(|(v, e)| Stored { value: v.clone(), etag: etag(*e) }))
    }

    async fn put(&self, state: &SyncState, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let mut s = self.0.lock().unwrap();
        let id = state_id(state.task_id, &state.platform_key);
        match (s.states.get(&id), &if_match) {
            (Some(_), None) => return Err(DomainError::Conflict("exists".into())),
            (Some((_, e)), Some(m)) if etag(*e) != *m => return Err(DomainError::PreconditionFailed),
            (None, Some(_)) => return Err(DomainError::PreconditionFailed),
            _ => {}
        }
        s.version += 1;
        let v = s.version;
        s.states.insert(id, (state.clone(), v));
        Ok(etag(v))
    }

    async fn list(&self, _: &TenantId, _: SyncTaskId, page: &PageRequest) -> Result<Page<Stored<SyncState>>, DomainError> {
        let s = self.0.lock().unwrap();
        let start: usize = page.continuation.as_deref().map_or(0, |c| c.parse().unwrap());
        let all: Vec<_> = s.states.values().collect();
        let items = all.iter().skip(start).take(page.limit as usize).map(|(v, e)| Stored { value: v.clone(), etag: etag(*e) }).collect();
        let next = start + page.limit as usize;
        Ok(Page { items, continuation: (next < all.len()).then(|| next.to_string()) })
    }

    async fn clear(&self, _: &TenantId, _: SyncTaskId, _: bool) -> Result<u64, DomainError> {
        unimplemented!("not used by the engine")
    }

    async fn create_conflict(&self, conflict: &SyncConflict) -> Result<ETag, DomainError> {
        let mut s = self.0.lock().unwrap();
        s.version += 1;
        let v = s.version;
        s.conflicts.insert(conflict.id, (conflict.clone(), v));
        Ok(etag(v))
    }

    async fn get_conflict(&self, _: &TenantId, _: SyncTaskId, id: Uuid) -> Result<Stored<SyncConflict>, DomainError> {
        let s = self.0.lock().unwrap();
        s.conflicts.get(&id).map(|(c, e)| Stored { value: c.clone(), etag: etag(*e) }).ok_or(DomainError::not_found("conflict", id))
    }

    async fn list_conflicts(&self, _: &TenantId, _: SyncTaskId, _: &PageRequest) -> Result<Page<Stored<SyncConflict>>, DomainError> {
        let s = self.0.lock().unwrap();
        Ok(Page { items: s.conflicts.values().map(|(c, e)| Stored { value: c.clone(), etag: etag(*e) }).collect(), continuation: None })
    }

    async fn replace_conflict(&self, conflict: &SyncConflict, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let mut s = self.0.lock().unwrap();
        s.version += 1;
        let v = s.version;
        let current = s.conflicts.get(&conflict.id).ok_or(DomainError::not_found("conflict", conflict.id))?;
        if if_match.is_some_and(|m| m != etag(current.1)) {
            return Err(DomainError::PreconditionFailed);
        }
        s.conflicts.insert(conflict.id, (conflict.clone(), v));
        Ok(etag(v))
    }
}

impl States {
    fn conflicts(&self) -> Vec<SyncConflict> {
        self.0.lock().unwrap().conflicts.values().map(|(c, _)| c.clone()).collect()
    }

    fn resolve(&self, id: Uuid, resolution: Resolution) {
        let mut s = self.0.lock().unwrap();
        let entry = s.conflicts.get_mut(&id).unwrap();
        entry.0.resolution = Some(resolution);
        entry.0.resolved_at = Some(OffsetDateTime::now_utc());
    }
}

/// Saves checkpoints like the scheduler would, and can cancel or lose the lease after a page.
#[derive(Default)]
struct Control {
    saved: Vec<crate::sync::Checkpoints>,
    cancel_after: Option<usize>,
    crash_after: Option<usize>,
}

#[async_trait]
impl RunControl for Control {
    async fn page_done(&mut self, execution: &SyncExecution) -> Result<bool, DomainError> {
        if self.crash_after == Some(self.saved.len()) {
            return Err(DomainError::Conflict("the lease was lost".into()));
        }
        self.saved.push(execution.checkpoints_to.clone());
        Ok(self.cancel_after.is_some_and(|n| self.saved.len() >= n))
    }
}

// ----- harness -------------------------------------------------------------------------------

struct World {
    api: Api,
    shards: Shards,
    states: States,
    engine: SyncEngine,
    task: SyncTask,
    source: SyncSource,
}

fn template(method: HttpMethod, path: &str) -> RequestTemplate {
    RequestTemplate { method, path: path.into(), query: BTreeMap::new(), items_path: None }
}

fn world(api: Api, direction: Direction, mode: SyncMode, policy: ConflictPolicy) -> World {
    let draft = SyncTaskDraft {
        integration_id: IntegrationId(Uuid::now_v7()),
        connection_id: Uuid::now_v7(),
        entity: "record".into(),
        target: "ticket".into(),
        direction,
        mode,
        schedule: ScheduleDraft::Manual,
        field_mapping: vec![
            FieldMappingDraft { provider: "/title".into(), platform: "/name".into(), direction: None },
            FieldMappingDraft { provider: "/state".into(), platform: "/status".into(), direction: None },
        ],
        conflict_policy: policy,
        deletes: DeletePolicy::Propagate,
        status: TaskStatus::Active,
    };
    let task = SyncTask::new(
        SyncTaskId(Uuid::now_v7()),
        TenantId::new("t").unwrap(),
        draft.validate().unwrap(),
        UserId::new("u").unwrap(),
        OffsetDateTime::now_utc(),
    );
    let source = SyncSource {
        target: ApiTarget { base_url: "https://api.example.com".into(), default_headers: BTreeMap::new(), pagination: Pagination::None },
        entity: EntityDefinition {
            name: "record".into(),
            id_field: "id".into(),
            updated_at_field: Some("updated_at".into()),
            updated_since_param: Some("updated_since".into()),
            list: template(HttpMethod::Get, "/records"),
            get: Some(template(HttpMethod::Get, "/records/{id}")),
            upsert: Some(template(HttpMethod::Put, "/records/{id}")),
            delete: Some(template(HttpMethod::Delete, "/records/{id}")),
            deleted: None,
        },
        path_params: BTreeMap::new(),
    };
    let (shards, states) = (Shards::default(), States::default());
    let engine = SyncEngine::new(
        Arc::new(api.clone()),
        Arc::new(shards.clone()),
        Arc::new(states.clone()),
        Arc::new(Now),
        Arc::new(Ids),
        EngineSettings { page_size: 10, lookback: std::time::Duration::from_secs(5), heartbeat: std::time::Duration::from_secs(20) },
    );
    World { api, shards, states, engine, task, source }
}

impl World {
    /// Runs once; the task keeps the checkpoints reached (as the scheduler's finish does).
    fn run_with(&mut self, control: &mut Control) -> (ExecutionStatus, Option<String>, SyncExecution) {
        let mut execution = SyncExecution::queued(
            Uuid::now_v7(),
            self.task.tenant_id.clone(),
            self.task.id,
            Trigger::Manual,
            self.task.checkpoints.clone(),
            OffsetDateTime::now_utc(),
        );
        let (status, error) = block_on(self.engine.run(&self.task, &self.source, &NoCredentials, &mut execution, control));
        // What the scheduler saved last: the final checkpoints on an ending run, the last page's
        // on a lost lease.
        self.task.checkpoints = if control.crash_after.is_some() {
            control.saved.last().cloned().unwrap_or_default()
        } else {
            execution.checkpoints_to.clone()
        };
        (status, error, execution)
    }

    fn run(&mut self) -> (ExecutionStatus, SyncExecution) {
        let (status, error, execution) = self.run_with(&mut Control::default());
        assert!(error.is_none() || status != ExecutionStatus::Succeeded, "{error:?}");
        (status, execution)
    }
}

// ----- tests ---------------------------------------------------------------------------------

#[test]
fn inbound_writes_every_record_with_its_source_and_saves_a_checkpoint_per_page() {
    let mut w = world(Api::with(25), Direction::Inbound, SyncMode::Incremental, ConflictPolicy::ProviderWins);
    let mut control = Control::default();
    let (status, _, execution) = w.run_with(&mut control);
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!((execution.counts.inbound.read, execution.counts.inbound.created), (25, 25));
    assert_eq!(w.shards.live(), 25);
    assert_eq!(w.shards.data("r00003").unwrap(), json!({"name": "title 3", "status": "open"}));
    let record = w.shards.0.lock().unwrap().records["r00003"].clone();
    assert_eq!(record.source, Some(w.task.integration_id.to_string()), "the write carries the integration as its origin");
    assert_eq!(control.saved.len(), 3, "one checkpoint per page");
    let last: Value = serde_json::from_str(w.task.checkpoints.provider.as_deref().unwrap()).unwrap();
    assert_eq!(last["since"], stamp(25), "the newest change seen");

    // Incremental: only records changed since (within the lookback) are read again, and the
    // unchanged ones among them write nothing.
    w.api.upsert("r00007", json!({"title": "renamed"}));
    let (status, execution) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(execution.counts.inbound.updated, 1);
    assert!(execution.counts.inbound.read < 25, "the updated-since filter limits the read: {:?}", execution.counts.inbound);
    assert_eq!(w.shards.data("r00007").unwrap()["name"], "renamed");
}

#[test]
fn a_record_repeated_in_one_page_is_written_once_and_then_found_unchanged() {
    let mut w = world(Api::with(12), Direction::Inbound, SyncMode::Incremental, ConflictPolicy::ProviderWins);
    w.api.0.lock().unwrap().repeat_first = true;
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded, "{:?}", run.errors);
    let counts = run.counts.inbound;
    assert_eq!((counts.read, counts.created, counts.unchanged, counts.failed), (14, 12, 2, 0));
    assert_eq!(w.shards.writes(), 12);
    assert_eq!(w.states.0.lock().unwrap().states.len(), 12);
}

#[test]
fn a_lost_lease_mid_run_resumes_from_the_last_page_written_with_nothing_lost() {
    let mut w = world(Api::with(35), Direction::Inbound, SyncMode::Incremental, ConflictPolicy::ProviderWins);
    let (_, _, first) = w.run_with(&mut Control { crash_after: Some(2), ..Control::default() });
    assert_eq!(first.counts.inbound.created, 30, "the third page was written, its checkpoint not saved");
    let (status, second) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(w.shards.live(), 35, "nothing lost");
    assert_eq!(second.counts.inbound.created, 5);
    assert_eq!(second.counts.inbound.unchanged, 10, "the page written after the last checkpoint is read again and deduplicated");
}

#[test]
fn a_cancelled_run_stops_at_the_page_boundary_and_keeps_its_checkpoint() {
    let mut w = world(Api::with(30), Direction::Inbound, SyncMode::Incremental, ConflictPolicy::ProviderWins);
    let (status, _, execution) = w.run_with(&mut Control { cancel_after: Some(1), ..Control::default() });
    assert_eq!(status, ExecutionStatus::Cancelled);
    assert_eq!(execution.counts.inbound.read, 10);
    let (_, next) = w.run();
    assert_eq!(next.counts.inbound.created, 20, "the next run continues after the cancelled page");
}

#[test]
fn a_bidirectional_run_over_unchanged_data_writes_nothing_on_either_side() {
    let mut w = world(Api::with(15), Direction::Bidirectional, SyncMode::Incremental, ConflictPolicy::Manual);
    w.shards.edit("p1", json!({"name": "born on the platform", "status": "new"}));
    let (status, first) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!((first.counts.inbound.created, first.counts.outbound.created), (15, 1));
    assert_eq!(w.api.get("p1").unwrap()["title"], "born on the platform");
    let (api_writes, shard_writes) = (w.api.writes(), w.shards.writes());
    for _ in 0..2 {
        let (status, again) = w.run();
        assert_eq!(status, ExecutionStatus::Succeeded);
        assert_eq!((w.api.writes(), w.shards.writes()), (api_writes, shard_writes), "nothing written: {:?}", again.counts);
        assert_eq!(again.counts.inbound.writes() + again.counts.outbound.writes(), 0);
    }
}

#[test]
fn a_field_changed_on_one_side_goes_to_the_other_and_does_not_come_back() {
    let mut w = world(Api::with(3), Direction::Bidirectional, SyncMode::Incremental, ConflictPolicy::Manual);
    w.run();
    w.shards.edit("r00001", json!({"name": "title 1", "status": "closed", "extra": "kept"}));
    w.api.upsert("r00002", json!({"title": "from the provider"}));
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(w.api.get("r00001").unwrap()["state"], "closed");
    assert_eq!(w.shards.data("r00002").unwrap()["name"], "from the provider");
    assert_eq!((run.counts.outbound.updated, run.counts.inbound.updated), (1, 1));
    let writes = (w.api.writes(), w.shards.writes());
    let (_, echo) = w.run();
    assert_eq!((w.api.writes(), w.shards.writes()), writes, "{:?}", echo.counts);
    w.api.upsert("r00001", json!({"title": "again"}));
    w.run();
    assert_eq!(w.shards.data("r00001").unwrap(), json!({"name": "again", "status": "closed", "extra": "kept"}), "unmapped fields stay");
}

fn both_sides_edited(policy: ConflictPolicy, provider_last: bool) -> World {
    let mut w = world(Api::with(2), Direction::Bidirectional, SyncMode::Incremental, policy);
    w.run();
    if provider_last {
        w.shards.edit("r00000", json!({"name": "platform edit", "status": "open"}));
        std::thread::sleep(std::time::Duration::from_millis(5));
        w.api.0.lock().unwrap().clock += 100_000_000;
        w.api.upsert("r00000", json!({"title": "provider edit"}));
    } else {
        w.api.upsert("r00000", json!({"title": "provider edit"}));
        w.shards.edit("r00000", json!({"name": "platform edit", "status": "open"}));
    }
    w
}

#[test]
fn each_conflict_policy_settles_a_field_changed_on_both_sides() {
    for (policy, provider_last, winner) in [
        (ConflictPolicy::ProviderWins, false, "provider edit"),
        (ConflictPolicy::PlatformWins, false, "platform edit"),
        // The fake provider's clock is ahead: its edit is the newest.
        (ConflictPolicy::NewestWins, true, "provider edit"),
        // The platform's edit is now, the provider's at the fake's 2026 clock.
        (ConflictPolicy::NewestWins, false, "platform edit"),
    ] {
        let mut w = both_sides_edited(policy, provider_last);
        let (status, run) = w.run();
        assert_eq!(status, ExecutionStatus::Succeeded, "{policy:?}");
        assert_eq!(run.counts.outbound.conflicts, 1, "{policy:?}");
        assert_eq!(w.api.get("r00000").unwrap()["title"], winner, "{policy:?}");
        assert_eq!(w.shards.data("r00000").unwrap()["name"], winner, "{policy:?}");
        let writes = (w.api.writes(), w.shards.writes());
        w.run();
        assert_eq!((w.api.writes(), w.shards.writes()), writes, "{policy:?}: settled, nothing more to write");
        assert!(w.states.conflicts().is_empty());
    }
}

#[test]
fn manual_keeps_both_versions_until_resolved_then_writes_the_choice_to_both_sides() {
    let mut w = both_sides_edited(ConflictPolicy::Manual, false);
    let writes = (w.api.writes(), w.shards.writes());
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!((w.api.writes(), w.shards.writes()), writes, "a kept conflict writes nothing");
    assert_eq!(run.counts.outbound.conflicts, 1);
    let conflicts = w.states.conflicts();
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    assert_eq!((c.fields.clone(), c.platform_key.as_str()), (vec!["/name".to_owned()], "r00000"));
    assert_eq!(
        (c.base["/name"].clone(), c.provider["/name"].clone(), c.platform["/name"].clone()),
        (json!("title 0"), json!("provider edit"), json!("platform edit"))
    );
    w.run();
    assert_eq!(w.states.conflicts().len(), 1, "one conflict per record, not one per run");
    assert_eq!(w.api.get("r00000").unwrap()["title"], "provider edit", "still both versions");
    assert_eq!(w.shards.data("r00000").unwrap()["name"], "platform edit");

    w.states.resolve(c.id, Resolution::Value { value: json!({"/name": "agreed"}) });
    let (status, _) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(w.api.get("r00000").unwrap()["title"], "agreed");
    assert_eq!(w.shards.data("r00000").unwrap()["name"], "agreed");
    assert!(w.states.conflicts()[0].applied_at.is_some());
    let writes = (w.api.writes(), w.shards.writes());
    w.run();
    assert_eq!((w.api.writes(), w.shards.writes()), writes, "the applied resolution does not echo");

    let mut w = both_sides_edited(ConflictPolicy::Manual, false);
    w.run();
    let id = w.states.conflicts()[0].id;
    w.states.resolve(id, Resolution::Winner { side: Side::Platform });
    w.run();
    assert_eq!(w.api.get("r00000").unwrap()["title"], "platform edit");
}

#[test]
fn full_mode_deletes_only_after_a_complete_error_free_enumeration() {
    let mut w = world(Api::with(25), Direction::Inbound, SyncMode::Full, ConflictPolicy::ProviderWins);
    w.run();
    assert_eq!(w.shards.live(), 25);
    w.api.0.lock().unwrap().records.remove("r00003");
    let lists = w.api.0.lock().unwrap().lists;
    w.api.0.lock().unwrap().fail_list = Some(lists + 1);
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Partial, "the first page was written before the second failed");
    assert_eq!(run.counts.inbound.deleted, 0);
    assert_eq!(w.shards.live(), 25, "a failed page never deletes");
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(run.counts.inbound.deleted, 1);
    assert!(w.shards.data("r00003").is_none());
    assert_eq!(w.shards.live(), 24);
}

#[test]
fn a_failing_record_ends_the_run_partial_and_the_others_sync() {
    let mut w = world(Api::with(5), Direction::Inbound, SyncMode::Incremental, ConflictPolicy::ProviderWins);
    w.shards.0.lock().unwrap().refuse.insert("r00002".into());
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Partial);
    assert_eq!((run.counts.inbound.created, run.counts.inbound.failed, run.error_count), (4, 1, 1));
    assert_eq!(run.errors[0].record_id, "r00002");
    assert_eq!(run.errors[0].side, Side::Platform);

    let mut w = world(Api::with(5), Direction::Inbound, SyncMode::Incremental, ConflictPolicy::ProviderWins);
    w.api.0.lock().unwrap().fail_list = Some(0);
    let (status, _, run) = w.run_with(&mut Control::default());
    assert_eq!(status, ExecutionStatus::Failed, "no progress");
    assert_eq!(run.counts.inbound.read, 0);
}

#[test]
fn outbound_sends_platform_changes_and_deletes() {
    let mut w = world(Api::default(), Direction::Outbound, SyncMode::Incremental, ConflictPolicy::PlatformWins);
    for i in 0..12 {
        w.shards.edit(&format!("k{i}"), json!({"name": format!("n{i}"), "status": "open"}));
    }
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(run.counts.outbound.created, 12);
    assert_eq!(w.api.get("k4").unwrap()["title"], "n4");
    w.shards.remove("k4");
    w.api.0.lock().unwrap().refuse.insert("k5".into());
    w.shards.edit("k5", json!({"name": "refused", "status": "open"}));
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Partial);
    assert_eq!((run.counts.outbound.deleted, run.counts.outbound.failed), (1, 1));
    assert!(w.api.get("k4").is_none());
    assert_eq!(w.api.writes(), (12, 1));
}

#[test]
fn a_refused_outbound_record_is_retried_by_the_next_runs_without_changing_again() {
    let mut w = world(Api::default(), Direction::Outbound, SyncMode::Incremental, ConflictPolicy::PlatformWins);
    for i in 0..3 {
        w.shards.edit(&format!("k{i}"), json!({"name": format!("n{i}"), "status": "open"}));
    }
    w.api.0.lock().unwrap().refuse.insert("k1".into());
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Partial);
    assert_eq!((run.counts.outbound.created, run.counts.outbound.failed), (2, 1));
    assert!(run.errors[0].message.contains("attempt 1 of 5"), "{:?}", run.errors);
    let pending = &w.task.checkpoints.pending_outbound;
    assert_eq!((pending.len(), pending[0].key.as_str(), pending[0].attempts), (1, "k1", 1));
    assert!(pending[0].last_error.contains("422"), "{pending:?}");

    // The provider accepts it now: the next run writes it though the platform did not change.
    w.api.0.lock().unwrap().refuse.clear();
    let (status, run) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded, "{:?}", run.errors);
    assert_eq!((run.counts.outbound.created, run.counts.outbound.failed), (1, 0));
    assert_eq!(w.api.get("k1").unwrap()["title"], "n1");
    assert!(w.task.checkpoints.pending_outbound.is_empty());
    let writes = w.api.writes();
    w.run();
    assert_eq!(w.api.writes(), writes, "written once");
}

#[test]
fn a_record_refused_every_time_is_given_up_after_the_last_attempt_until_it_changes() {
    let mut w = world(Api::default(), Direction::Outbound, SyncMode::Incremental, ConflictPolicy::PlatformWins);
    w.shards.edit("k0", json!({"name": "n0", "status": "open"}));
    w.api.0.lock().unwrap().refuse.insert("k0".into());
    for attempt in 1..=crate::sync::MAX_OUTBOUND_ATTEMPTS {
        let (status, run) = w.run();
        // The first attempt is the only record read, failed; later ones are retries, which
        // leave the run partial (a refused record must not pause its task).
        let expected = if attempt == 1 { ExecutionStatus::Failed } else { ExecutionStatus::Partial };
        assert_eq!(status, expected, "attempt {attempt}");
        assert_eq!(run.counts.outbound.failed, 1, "attempt {attempt}");
        let kept = w.task.checkpoints.pending_outbound.len();
        if attempt < crate::sync::MAX_OUTBOUND_ATTEMPTS {
            assert_eq!(kept, 1, "attempt {attempt}");
            assert_eq!(w.task.checkpoints.pending_outbound[0].attempts, attempt);
        } else {
            assert_eq!(kept, 0, "given up");
            assert!(run.errors[0].message.contains("given up after 5 attempts"), "{:?}", run.errors);
        }
    }
    let (status, run) = w.run();
    assert_eq!((status, run.counts.outbound.read), (ExecutionStatus::Succeeded, 0), "left alone");
    // A new change is tried again.
    w.api.0.lock().unwrap().refuse.clear();
    w.shards.edit("k0", json!({"name": "changed", "status": "open"}));
    let (status, _) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(w.api.get("k0").unwrap()["title"], "changed");
}

#[test]
fn a_newer_change_of_a_pending_record_supersedes_it_and_too_many_failures_stop_before_the_page() {
    let mut w = world(Api::default(), Direction::Outbound, SyncMode::Incremental, ConflictPolicy::PlatformWins);
    w.shards.edit("k0", json!({"name": "first", "status": "open"}));
    w.api.0.lock().unwrap().refuse.insert("k0".into());
    w.run();
    assert_eq!(w.task.checkpoints.pending_outbound.len(), 1);
    w.shards.edit("k0", json!({"name": "second", "status": "open"}));
    w.run();
    let pending = &w.task.checkpoints.pending_outbound;
    assert_eq!(pending.len(), 1, "one entry per record: {pending:?}");
    assert_eq!(pending[0].data["name"], "second");

    // More failures than the list keeps: the run stops before the cursor passes them.
    let mut w = world(Api::default(), Direction::Outbound, SyncMode::Incremental, ConflictPolicy::PlatformWins);
    for i in 0..=crate::sync::MAX_PENDING_OUTBOUND {
        let key = format!("k{i:04}");
        w.shards.edit(&key, json!({"name": "x", "status": "open"}));
        w.api.0.lock().unwrap().refuse.insert(key);
    }
    let (status, _, run) = w.run_with(&mut Control::default());
    assert_ne!(status, ExecutionStatus::Succeeded);
    assert_eq!(w.task.checkpoints.pending_outbound.len(), crate::sync::MAX_PENDING_OUTBOUND);
    let cursor: i64 = w.task.checkpoints.platform.as_deref().unwrap_or("0").parse().unwrap();
    assert!(cursor < (crate::sync::MAX_PENDING_OUTBOUND + 1) as i64, "the last change is read again: {cursor} {:?}", run.error);
    w.api.0.lock().unwrap().refuse.clear();
    let (status, _) = w.run();
    assert_eq!(status, ExecutionStatus::Succeeded);
    assert_eq!(w.api.0.lock().unwrap().records.len(), crate::sync::MAX_PENDING_OUTBOUND + 1, "every record reached the provider");
}

#[test]
fn a_bidirectional_task_needs_the_entity_get_request_and_writing_needs_its_upsert() {
    let mut w = world(Api::with(3), Direction::Bidirectional, SyncMode::Incremental, ConflictPolicy::ProviderWins);
    w.source.entity.get = None;
    let (status, error, _) = w.run_with(&mut Control::default());
    assert_eq!(status, ExecutionStatus::Failed);
    assert!(error.as_deref().is_some_and(|e| e.contains("no get request")), "{error:?}");
    assert_eq!(w.shards.writes(), 0, "nothing is written");
    // Inbound and outbound tasks do without it.
    for direction in [Direction::Inbound, Direction::Outbound] {
        w.task.direction = direction;
        let (status, _) = w.run();
        assert_eq!(status, ExecutionStatus::Succeeded, "{direction:?}");
    }
    w.source.entity.upsert = None;
    let (status, error, _) = w.run_with(&mut Control::default());
    assert_eq!(status, ExecutionStatus::Failed);
    assert!(error.as_deref().is_some_and(|e| e.contains("no upsert request")), "{error:?}");
}

#[test]
fn an_incremental_run_applies_deletions_the_entity_marks_in_its_list() {
    for (direction, deletes) in [
        (Direction::Inbound, DeletePolicy::Propagate),
        (Direction::Bidirectional, DeletePolicy::Propagate),
        (Direction::Inbound, DeletePolicy::Ignore),
    ] {
        let mut w = world(Api::with(5), direction, SyncMode::Incremental, ConflictPolicy::ProviderWins);
        w.task.deletes = deletes;
        w.source.entity.deleted = Some(crate::custom::DeletedMarker { field: "state".into(), value: json!("deleted") });
        w.api.upsert("r00004", json!({"state": "deleted"}));
        let (status, first) = w.run();
        assert_eq!(status, ExecutionStatus::Succeeded);
        assert_eq!((first.counts.inbound.created, w.shards.live()), (4, 4), "a record deleted before it was synced is not created");

        w.api.upsert("r00002", json!({"state": "deleted"}));
        let (status, run) = w.run();
        assert_eq!(status, ExecutionStatus::Succeeded, "{direction:?} {deletes:?}");
        let propagate = deletes == DeletePolicy::Propagate;
        assert_eq!(run.counts.inbound.deleted, u64::from(propagate), "{direction:?} {deletes:?}: {:?}", run.counts);
        assert_eq!(w.shards.data("r00002").is_none(), propagate, "{direction:?} {deletes:?}");
        assert_eq!(w.api.writes(), (0, 0), "{direction:?}: nothing goes back to the provider");
        let writes = w.shards.writes();
        w.run();
        assert_eq!(w.shards.writes(), writes, "{direction:?} {deletes:?}: settled");
    }
}
