//! Contracts of [`SyncTaskRepository`], [`SyncExecutionRepository`] and [`SyncStateRepository`].

use std::collections::BTreeSet;
use std::time::Duration;

use im_domain::common::IntegrationId;
use im_domain::sync::ports::{StatePut, SyncExecutionRepository, SyncStateRepository, SyncTaskRepository};
use im_domain::sync::task::{FieldMappingDraft, ScheduleDraft};
use im_domain::sync::{
    ConflictPolicy, DeletePolicy, Direction, ExecutionStatus, Resolution, Side, SyncConflict, SyncExecution, SyncMode, SyncState, SyncTask,
    SyncTaskDraft, SyncTaskId, TaskLease, TaskStatus, Trigger, fields_hash,
};
use im_domain::{DomainError, ETag, PageRequest, TenantId};
use serde_json::json;
use uuid::Uuid;

use crate::{fresh_tenant, timestamp, user};

/// An active bidirectional task due every 10 minutes after [`timestamp`].
pub fn task(tenant: &TenantId) -> SyncTask {
    let draft = SyncTaskDraft { schedule: ScheduleDraft::Every("10m".into()), ..draft() };
    let settings = draft.validate().expect("a valid draft");
    SyncTask::new(SyncTaskId(Uuid::now_v7()), tenant.clone(), settings, user(), timestamp())
}

fn state(tenant: &TenantId, task: SyncTaskId, key: &str, provider_id: &str) -> SyncState {
    let fields = json!({"/title": key});
    SyncState {
        tenant_id: tenant.clone(),
        task_id: task,
        platform_key: key.into(),
        provider_id: Some(provider_id.into()),
        hash: fields_hash(&fields),
        fields,
        provider_version: Some("1".into()),
        platform_version: Some("v1".into()),
        origin: Side::Provider,
        deleted: false,
        updated_at: timestamp(),
        platform_data: None,
        open_conflict: None,
        seen_in: None,
    }
}

fn conflict(tenant: &TenantId, task: SyncTaskId) -> SyncConflict {
    SyncConflict {
        id: Uuid::now_v7(),
        tenant_id: tenant.clone(),
        task_id: task,
        platform_key: "k/1".into(),
        provider_id: Some("1".into()),
        fields: vec!["/title".into()],
        base: json!({"/title": "a"}),
        provider: json!({"/title": "b"}),
        platform: json!({"/title": "c"}),
        detected_at: timestamp(),
        resolution: None,
        resolved_at: None,
        applied_at: None,
    }
}

/// CRUD, conflicts, stale tokens, tenant isolation and paging of tasks.
pub async fn tasks(repo: &dyn SyncTaskRepository, states: &dyn SyncStateRepository) {
    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let mut t = task(&tenant);
    let etag = repo.create(&t).await.expect("create");
    assert!(matches!(repo.create(&t).await, Err(DomainError::Conflict(_))), "duplicate id");
    let read = repo.get(&tenant, t.id).await.expect("get");
    assert_eq!((read.value.clone(), read.etag.clone()), (t.clone(), etag.clone()), "reads back what was written");
    assert!(matches!(repo.get(&other, t.id).await, Err(DomainError::NotFound { .. })), "another tenant cannot read it");

    t.status = TaskStatus::Paused;
    t.status_reason = Some("paused by a caller".into());
    // Checkpoints keep the platform changes to retry, as read.
    t.checkpoints.platform = Some("42".into());
    t.checkpoints.pending_outbound = vec![im_domain::sync::PendingOutbound {
        key: "k/7".into(),
        data: json!({"title": "refused", "nested": {"n": 1}}),
        version: "41".into(),
        updated_at: timestamp(),
        source: None,
        deleted: false,
        attempts: 2,
        last_error: "the provider refused the write (HTTP 422)".into(),
    }];
    let etag2 = repo.replace(&t, Some(etag.clone()), &[]).await.expect("replace");
    assert_eq!(repo.get(&tenant, t.id).await.expect("get").value.checkpoints, t.checkpoints, "checkpoints read back");
    assert!(matches!(repo.replace(&t, Some(etag.clone()), &[]).await, Err(DomainError::PreconditionFailed)), "stale token");
    assert!(matches!(repo.replace(&task(&other), None, &[]).await, Err(DomainError::NotFound { .. })), "replace of a missing task");
    assert_eq!(repo.get(&tenant, t.id).await.expect("get").value.status, TaskStatus::Paused);

    // Listing pages through the tenant's tasks only, never states or conflicts kept beside them.
    states.put(&state(&tenant, t.id, "k1", "p1"), None).await.expect("a state");
    states.create_conflict(&conflict(&tenant, t.id)).await.expect("a conflict");
    let mut ids = BTreeSet::from([t.id]);
    for _ in 0..4 {
        let more = task(&tenant);
        repo.create(&more).await.expect("create");
        ids.insert(more.id);
    }
    repo.create(&task(&other)).await.expect("another tenant's task");
    let mut seen = Vec::new();
    let mut page = PageRequest::first(2);
    loop {
        let listed = repo.list(&tenant, &page).await.expect("list");
        seen.extend(listed.items.iter().map(|s| s.value.id));
        match listed.continuation {
            Some(token) => page = PageRequest { limit: 2, continuation: Some(token) },
            None => break,
        }
    }
    assert_eq!(seen.len(), ids.len(), "every task once, nothing else: {seen:?}");
    assert_eq!(seen.iter().copied().collect::<BTreeSet<_>>(), ids);
    let forged = PageRequest { limit: 2, continuation: Some("forged".into()) };
    assert!(matches!(repo.list(&tenant, &forged).await, Err(DomainError::Validation(_))), "a forged continuation token");

    assert!(matches!(repo.delete(&tenant, t.id, Some(etag)).await, Err(DomainError::PreconditionFailed)), "stale delete");
    repo.delete(&tenant, t.id, Some(etag2)).await.expect("delete");
    assert!(matches!(repo.get(&tenant, t.id).await, Err(DomainError::NotFound { .. })), "gone");
    assert!(matches!(repo.delete(&tenant, t.id, None).await, Err(DomainError::NotFound { .. })), "deleted twice");
}

/// `due` finds active tasks whose time came and tasks whose lease ended, and a claim by
/// conditional replace succeeds once.
pub async fn due_tasks_and_exclusive_claims(repo: &dyn SyncTaskRepository) {
    let tenant = fresh_tenant();
    let now = timestamp() + Duration::from_secs(3600);
    let lease = |until| TaskLease { owner: "instance-a".into(), execution_id: Uuid::now_v7(), until };

    let mut due = task(&tenant);
    due.next_run_at = Some(now - Duration::from_secs(60));
    let mut at_now = task(&tenant);
    at_now.next_run_at = Some(now);
    let mut later = task(&tenant);
    later.next_run_at = Some(now + Duration::from_secs(60));
    let mut paused = task(&tenant);
    paused.status = TaskStatus::Paused;
    paused.next_run_at = Some(now - Duration::from_secs(60));
    let mut manual = task(&tenant);
    manual.next_run_at = None;
    let mut dead = task(&tenant);
    dead.next_run_at = None;
    dead.lease = Some(lease(now - Duration::from_secs(1)));
    let mut alive = task(&tenant);
    alive.next_run_at = Some(now + Duration::from_secs(600));
    alive.lease = Some(lease(now + Duration::from_secs(30)));
    for t in [&due, &at_now, &later, &paused, &manual, &dead, &alive] {
        repo.create(t).await.expect("create");
    }

    let found = repo.due(now, 10_000).await.expect("due");
    let mine: BTreeSet<_> = found.iter().filter(|s| s.value.tenant_id == tenant).map(|s| s.value.id).collect();
    assert_eq!(mine, BTreeSet::from([due.id, at_now.id, dead.id]), "due: active and time came, or lease ended");

    let stored = found.into_iter().find(|s| s.value.id == due.id).expect("the due task");
    let mut claimed = stored.value.clone();
    claimed.lease = Some(lease(now + Duration::from_secs(60)));
    claimed.next_run_at = None;
    repo.replace(&claimed, Some(stored.etag.clone()), &[]).await.expect("the first claim wins");
    let mut rival = stored.value.clone();
    rival.lease = Some(TaskLease { owner: "instance-b".into(), execution_id: Uuid::now_v7(), until: now + Duration::from_secs(60) });
    assert!(
        matches!(repo.replace(&rival, Some(stored.etag), &[]).await, Err(DomainError::PreconditionFailed)),
        "a second claim with the same token fails"
    );
    let again = repo.due(now, 10_000).await.expect("due");
    assert!(!again.iter().any(|s| s.value.id == due.id), "a claimed task is not due while its lease runs");
}

/// CRUD, stale tokens, tenant isolation and per-task listing of executions.
pub async fn executions(repo: &dyn SyncExecutionRepository) {
    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let (task_a, task_b) = (SyncTaskId(Uuid::now_v7()), SyncTaskId(Uuid::now_v7()));
    let new = |task| SyncExecution::queued(Uuid::now_v7(), tenant.clone(), task, Trigger::Manual, Default::default(), timestamp());
    let mut e = new(task_a);
    let etag = repo.create(&e).await.expect("create");
    assert!(matches!(repo.create(&e).await, Err(DomainError::Conflict(_))), "duplicate id");
    assert_eq!(repo.get(&tenant, e.id).await.expect("get").value, e);
    assert!(matches!(repo.get(&other, e.id).await, Err(DomainError::NotFound { .. })), "another tenant cannot read it");

    e.status = ExecutionStatus::Running;
    e.counts.inbound.read = 7;
    let etag2 = repo.replace(&e, Some(etag.clone()), &[]).await.expect("replace");
    assert!(matches!(repo.replace(&e, Some(etag), &[]).await, Err(DomainError::PreconditionFailed)), "stale token");
    assert_eq!(repo.get(&tenant, e.id).await.expect("get").etag, etag2);

    let mut expected = vec![e.id];
    for _ in 0..2 {
        let more = new(task_a);
        repo.create(&more).await.expect("create");
        expected.push(more.id);
    }
    repo.create(&new(task_b)).await.expect("another task's execution");
    let first = repo.list(&tenant, task_a, &PageRequest::first(2)).await.expect("list");
    let rest = repo.list(&tenant, task_a, &PageRequest { limit: 2, continuation: first.continuation.clone() }).await.expect("list");
    let seen: Vec<_> = first.items.iter().chain(rest.items.iter()).map(|s| s.value.id).collect();
    assert_eq!(seen, expected, "one task's executions, oldest first, once");
    assert!(rest.continuation.is_none());
}

/// States: create-only without a token, conditional replace, lookups by key and provider id,
/// per-task listing and clearing; conflicts: CRUD scoped to their task.
pub async fn states_and_conflicts(repo: &dyn SyncStateRepository) {
    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let (task, task_b) = (SyncTaskId(Uuid::now_v7()), SyncTaskId(Uuid::now_v7()));
    let mut s = state(&tenant, task, "shard/key?#1", "provider-1");
    assert!(repo.get(&tenant, task, &s.platform_key).await.expect("get").is_none());
    let etag = repo.put(&s, None).await.expect("create");
    assert!(matches!(repo.put(&s, None).await, Err(DomainError::Conflict(_))), "a create of an existing state");
    let read = repo.get(&tenant, task, &s.platform_key).await.expect("get").expect("present");
    assert_eq!((read.value.clone(), read.etag.clone()), (s.clone(), etag.clone()));
    assert!(repo.get(&other, task, &s.platform_key).await.expect("get").is_none(), "another tenant sees nothing");
    assert!(repo.get(&tenant, task_b, &s.platform_key).await.expect("get").is_none(), "another task sees nothing");
    let found = repo.find_by_provider_id(&tenant, task, "provider-1").await.expect("find").expect("present");
    assert_eq!(found.value, s);
    assert!(repo.find_by_provider_id(&tenant, task_b, "provider-1").await.expect("find").is_none());

    s.fields = json!({"/title": "changed"});
    s.hash = fields_hash(&s.fields);
    let etag2 = repo.put(&s, Some(etag.clone())).await.expect("replace");
    assert!(matches!(repo.put(&s, Some(etag)).await, Err(DomainError::PreconditionFailed)), "stale token");
    let missing = state(&tenant, task, "never-written", "p");
    assert!(matches!(repo.put(&missing, Some(etag2)).await, Err(DomainError::PreconditionFailed)), "replace of a missing state");

    repo.put(&state(&tenant, task, "k2", "provider-2"), None).await.expect("create");
    repo.put(&state(&tenant, task_b, "k3", "provider-3"), None).await.expect("create");
    let listed = repo.list(&tenant, task, &PageRequest::first(50)).await.expect("list");
    let keys: BTreeSet<_> = listed.items.iter().map(|s| s.value.platform_key.clone()).collect();
    assert_eq!(keys, BTreeSet::from(["shard/key?#1".to_owned(), "k2".to_owned()]));

    let mut c = conflict(&tenant, task);
    let cetag = repo.create_conflict(&c).await.expect("create conflict");
    assert!(matches!(repo.create_conflict(&c).await, Err(DomainError::Conflict(_))), "duplicate conflict id");
    assert_eq!(repo.get_conflict(&tenant, task, c.id).await.expect("get").value, c);
    assert!(matches!(repo.get_conflict(&tenant, task_b, c.id).await, Err(DomainError::NotFound { .. })), "another task's conflict");
    assert!(matches!(repo.get_conflict(&other, task, c.id).await, Err(DomainError::NotFound { .. })), "another tenant's conflict");
    c.resolution = Some(Resolution::Winner { side: Side::Platform });
    c.resolved_at = Some(timestamp());
    repo.replace_conflict(&c, Some(cetag.clone())).await.expect("resolve");
    assert!(matches!(repo.replace_conflict(&c, Some(cetag)).await, Err(DomainError::PreconditionFailed)), "stale token");
    let conflicts = repo.list_conflicts(&tenant, task, &PageRequest::first(50)).await.expect("list");
    assert_eq!(conflicts.items.iter().map(|c| c.value.clone()).collect::<Vec<_>>(), vec![c.clone()]);

    assert_eq!(repo.clear(&tenant, task, false).await.expect("clear states"), 2);
    assert!(repo.get(&tenant, task, "k2").await.expect("get").is_none(), "states are gone");
    assert_eq!(repo.list_conflicts(&tenant, task, &PageRequest::first(50)).await.expect("list").items.len(), 1, "conflicts stay");
    assert!(repo.get(&tenant, task_b, "k3").await.expect("get").is_some(), "another task's states stay");
    assert_eq!(repo.clear(&tenant, task, true).await.expect("clear all"), 1);
    assert_eq!(repo.clear(&tenant, task, true).await.expect("clear again"), 0, "idempotent");
    assert!(repo.list_conflicts(&tenant, task, &PageRequest::first(50)).await.expect("list").items.is_empty());
}

/// The batch calls of states: reads by key and by provider id answer in the order asked
/// (`None` for what is missing, nothing of another tenant or task), and a batch of writes keeps
/// each item's condition and outcome (a stale or duplicate item writes nothing and does not
/// stop the others).
pub async fn state_batches(repo: &dyn SyncStateRepository) {
    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let (task, task_b) = (SyncTaskId(Uuid::now_v7()), SyncTaskId(Uuid::now_v7()));
    let a = state(&tenant, task, "a/1", "provider-a");
    let b = state(&tenant, task, "b?#", "provider-b");
    let put = |state: &SyncState, if_match| StatePut { state: state.clone(), if_match };
    let created = repo.put_many(&[put(&a, None), put(&b, None)]).await.expect("put_many");
    let [Ok(etag_a), Ok(etag_b)] = created.as_slice() else { panic!("both created: {created:?}") };
    repo.put(&state(&other, task, "a/1", "provider-a"), None).await.expect("another tenant's");
    repo.put(&state(&tenant, task_b, "b?#", "provider-b"), None).await.expect("another task's");

    let keys = ["b?#".to_owned(), "missing".to_owned(), "a/1".to_owned()];
    let found = repo.get_many(&tenant, task, &keys).await.expect("get_many");
    let found: Vec<_> = found.into_iter().map(|s| s.map(|s| (s.value, s.etag))).collect();
    assert_eq!(found, vec![Some((b.clone(), etag_b.clone())), None, Some((a.clone(), etag_a.clone()))], "in the order asked");
    let other_task = repo.get_many(&tenant, SyncTaskId(Uuid::now_v7()), &keys).await.expect("get_many");
    assert!(other_task.iter().all(Option::is_none), "another task's keys are not this one's");
    assert!(repo.get_many(&tenant, task, &[]).await.expect("get_many").is_empty());

    let ids = ["provider-b".to_owned(), "nobody".to_owned(), "provider-a".to_owned()];
    let by_provider = repo.find_many_by_provider_ids(&tenant, task, &ids).await.expect("find_many");
    let by_provider: Vec<_> = by_provider.into_iter().map(|s| s.map(|s| s.value.platform_key)).collect();
    assert_eq!(by_provider, vec![Some("b?#".to_owned()), None, Some("a/1".to_owned())]);
    let in_b = repo.find_many_by_provider_ids(&tenant, task_b, &ids).await.expect("find_many");
    assert_eq!(in_b.into_iter().map(|s| s.is_some()).collect::<Vec<_>>(), [true, false, false], "only that task's states");

    let mut a2 = a.clone();
    a2.fields = json!({"/title": "a changed"});
    a2.hash = fields_hash(&a2.fields);
    let mut b2 = b.clone();
    b2.fields = json!({"/title": "b changed"});
    let c = state(&tenant, task, "c", "provider-c");
    let outcomes = repo
        .put_many(&[
            put(&a2, Some(etag_a.clone())),
            put(&b2, Some(ETag::new("stale"))),
            put(&c, None),
            put(&b2, None),
            put(&state(&tenant, task, "never", "p"), Some(etag_b.clone())),
        ])
        .await
        .expect("put_many");
    assert_eq!(outcomes.len(), 5);
    let etag_a2 = outcomes[0].as_ref().expect("a replaced with its etag").clone();
    assert!(matches!(outcomes[1], Err(DomainError::PreconditionFailed)), "a stale etag: {:?}", outcomes[1]);
    let etag_c = outcomes[2].as_ref().expect("c created").clone();
    assert!(matches!(outcomes[3], Err(DomainError::Conflict(_))), "a create of an existing state: {:?}", outcomes[3]);
    assert!(matches!(outcomes[4], Err(DomainError::PreconditionFailed)), "a replace of a missing state: {:?}", outcomes[4]);
    let now =
        repo.get_many(&tenant, task, &["a/1".to_owned(), "b?#".to_owned(), "c".to_owned(), "never".to_owned()]).await.expect("get_many");
    let now: Vec<_> = now.into_iter().map(|s| s.map(|s| (s.value, s.etag))).collect();
    assert_eq!(now, vec![Some((a2, etag_a2)), Some((b, etag_b.clone())), Some((c, etag_c)), None], "only the good items were written");
}

/// Every check of the sync stores.
pub async fn run_all(tasks_repo: &dyn SyncTaskRepository, executions_repo: &dyn SyncExecutionRepository, states: &dyn SyncStateRepository) {
    tasks(tasks_repo, states).await;
    due_tasks_and_exclusive_claims(tasks_repo).await;
    executions(executions_repo).await;
    states_and_conflicts(states).await;
    state_batches(states).await;
}

/// Keeps audit records, to check what the service recorded.
#[derive(Default)]
pub struct AuditRecords(std::sync::Mutex<Vec<im_domain::audit::AuditRecord>>);

#[async_trait::async_trait]
impl im_domain::audit::AuditLog for AuditRecords {
    async fn record(&self, record: im_domain::audit::AuditRecord) {
        self.0.lock().expect("audit records").push(record);
    }
}

impl AuditRecords {
    pub fn actions(&self) -> Vec<String> {
        self.0.lock().expect("audit records").iter().map(|r| format!("{}:{}", r.action_name(), r.outcome.as_str())).collect()
    }
}

fn caller(tenant: &TenantId, roles: Vec<im_domain::Role>) -> im_domain::Caller {
    im_domain::Caller { tenant_id: tenant.clone(), user_id: user(), roles }
}

/// An active bidirectional task's settings, due every 15 minutes in Berlin, of a new
/// integration and connection.
fn draft() -> SyncTaskDraft {
    SyncTaskDraft {
        integration_id: IntegrationId(Uuid::now_v7()),
        connection_id: Uuid::now_v7(),
        entity: "issues".into(),
        target: "ticket".into(),
        direction: Direction::Bidirectional,
        mode: SyncMode::Incremental,
        schedule: ScheduleDraft::Cron { cron: "*/15 * * * *".into(), timezone: Some("Europe/Berlin".into()) },
        field_mapping: vec![FieldMappingDraft { provider: "/fields/summary".into(), platform: "/title".into(), direction: None }],
        conflict_policy: ConflictPolicy::Manual,
        deletes: DeletePolicy::Propagate,
        status: TaskStatus::Active,
    }
}

/// The use cases of `SyncTaskService` on a real store: validation, runs (one at a time),
/// cancel, pause and resume, reset, conflicts, tenant isolation and audit records.
pub async fn service(
    tasks_repo: std::sync::Arc<dyn SyncTaskRepository>,
    executions_repo: std::sync::Arc<dyn SyncExecutionRepository>,
    states: std::sync::Arc<dyn SyncStateRepository>,
) {
    use im_domain::services::{ResetScope, SyncTaskService};
    let audit = std::sync::Arc::new(AuditRecords::default());
    let service = SyncTaskService::new(
        tasks_repo,
        executions_repo,
        states.clone(),
        std::sync::Arc::new(im_domain::SystemClock),
        std::sync::Arc::new(im_domain::UuidV7),
        im_domain::audit::Audit::new(audit.clone(), std::sync::Arc::new(im_domain::SystemClock)),
    );
    let tenant = fresh_tenant();
    let member = caller(&tenant, vec![im_domain::Role::Member]);
    let viewer = caller(&tenant, vec![im_domain::Role::Viewer]);
    let stranger = caller(&fresh_tenant(), vec![im_domain::Role::Member]);

    let mut bad = draft();
    bad.schedule = ScheduleDraft::Every("30s".into());
    bad.field_mapping[0].platform = "title".into();
    let Err(DomainError::Validation(problems)) = service.create(&member, bad).await else { panic!("a bad draft is refused") };
    let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["schedule.every", "fieldMapping[0].platform"]);
    assert!(matches!(service.create(&viewer, draft()).await, Err(DomainError::Forbidden(_))), "viewers do not create");

    let task = service.create(&member, draft()).await.expect("create");
    assert!(task.value.next_run_at.is_some(), "an active cron task is scheduled");
    assert!(matches!(service.get(&stranger, task.value.id).await, Err(DomainError::NotFound { .. })), "tenant isolation");
    let id = task.value.id;

    let queued = service.run(&member, id).await.expect("run");
    assert_eq!((queued.value.status, queued.value.trigger), (ExecutionStatus::Queued, Trigger::Manual));
    assert!(matches!(service.run(&member, id).await, Err(DomainError::Conflict(_))), "one execution at a time");
    assert!(matches!(service.reset(&member, id, ResetScope::Checkpoints).await, Err(DomainError::Conflict(_))), "no reset while queued");
    let listed = service.executions(&member, id, &PageRequest::first(10)).await.expect("executions");
    assert_eq!(listed.items.iter().map(|e| e.value.id).collect::<Vec<_>>(), vec![queued.value.id]);
    assert_eq!(service.execution(&member, id, queued.value.id).await.expect("execution").value.id, queued.value.id);
    assert!(matches!(service.execution(&stranger, id, queued.value.id).await, Err(DomainError::NotFound { .. })));

    let cancelled = service.cancel(&member, id).await.expect("cancel");
    assert!(cancelled.value.pending_execution.is_none());
    let execution = service.execution(&member, id, queued.value.id).await.expect("execution");
    assert_eq!(execution.value.status, ExecutionStatus::Cancelled, "a queued run is cancelled at once");
    assert!(matches!(service.cancel(&member, id).await, Err(DomainError::Conflict(_))), "nothing left to cancel");

    let paused = service.pause(&member, id, None).await.expect("pause");
    assert_eq!((paused.value.status, paused.value.next_run_at), (TaskStatus::Paused, None));
    assert!(paused.value.status_reason.as_deref().is_some_and(|r| r.contains("paused by")));
    assert!(matches!(service.run(&member, id).await, Err(DomainError::Conflict(_))), "a paused task does not run");
    assert!(matches!(service.resume(&member, id, Some(&task.etag)).await, Err(DomainError::PreconditionFailed)), "stale If-Match");
    let resumed = service.resume(&member, id, Some(&paused.etag)).await.expect("resume");
    assert_eq!((resumed.value.status, resumed.value.status_reason.clone()), (TaskStatus::Active, None));
    assert!(resumed.value.next_run_at.is_some());

    states.put(&state(&tenant, id, "k1", "p1"), None).await.expect("a state");
    let mut open = conflict(&tenant, id);
    states.create_conflict(&open).await.expect("a conflict");
    let bad_value = Resolution::Value { value: json!({"/other": 1}) };
    assert!(matches!(service.resolve(&member, id, open.id, bad_value).await, Err(DomainError::Validation(_))));
    let resolved = service.resolve(&member, id, open.id, Resolution::Winner { side: Side::Provider }).await.expect("resolve");
    assert!(resolved.value.resolved_at.is_some());
    open.id = Uuid::now_v7();
    assert!(matches!(
        service.resolve(&member, id, open.id, Resolution::Winner { side: Side::Provider }).await,
        Err(DomainError::NotFound { .. })
    ));
    assert!(matches!(
        service.resolve(&member, id, resolved.value.id, Resolution::Winner { side: Side::Platform }).await,
        Err(DomainError::Conflict(_))
    ));
    assert_eq!(service.conflicts(&member, id, &PageRequest::first(10)).await.expect("conflicts").items.len(), 1);

    service.reset(&member, id, ResetScope::All).await.expect("reset");
    assert!(states.get(&tenant, id, "k1").await.expect("get").is_none(), "reset all forgets states");
    assert!(service.conflicts(&member, id, &PageRequest::first(10)).await.expect("conflicts").items.is_empty());

    let mut changed = draft();
    changed.status = TaskStatus::Disabled;
    let updated = service.update(&member, id, changed, None).await.expect("update");
    assert_eq!((updated.value.status, updated.value.next_run_at), (TaskStatus::Disabled, None));
    service.delete(&member, id, Some(&updated.etag)).await.expect("delete");
    assert!(matches!(service.get(&member, id).await, Err(DomainError::NotFound { .. })));

    let actions = audit.actions();
    for expected in [
        "sync_task.create:denied",
        "sync_task.create:succeeded",
        "sync_task.run:succeeded",
        "sync_task.cancel:succeeded",
        "sync_task.pause:succeeded",
        "sync_task.resume:succeeded",
        "sync_conflict.resolve:succeeded",
        "sync_task.reset:succeeded",
        "sync_task.update:succeeded",
        "sync_task.delete:succeeded",
    ] {
        assert!(actions.iter().any(|a| a == expected), "{expected} in {actions:?}");
    }
}

/// The [`ShardManager`](im_domain::sync::ports::ShardManager) contract: conditional writes,
/// changes in order from a cursor (tombstones included), isolation of tenants and shard types.
pub async fn shard_manager(shards: &dyn im_domain::sync::ports::ShardManager) {
    use im_domain::sync::ports::{ShardPut, ShardWrite};
    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let write = |title: &str| ShardWrite {
        data: json!({"title": title}),
        version: Some("7".into()),
        updated_at: timestamp(),
        source: "integration-1".into(),
    };

    let empty = shards.changes(&tenant, "ticket", None, 10).await.expect("changes");
    assert!(empty.items.is_empty(), "nothing yet");
    let a = shards.put(&tenant, "ticket", "a/1", &write("first"), None).await.expect("put");
    let b = shards.put(&tenant, "ticket", "b", &write("second"), None).await.expect("put");
    shards.put(&other, "ticket", "a/1", &write("another tenant"), None).await.expect("put");
    shards.put(&tenant, "note", "a/1", &write("another type"), None).await.expect("put");
    assert_ne!(a.version, b.version);

    let stale = shards.put(&tenant, "ticket", "a/1", &write("stale"), Some("not-the-version".into())).await;
    assert!(matches!(stale, Err(DomainError::PreconditionFailed)), "a stale If-Match writes nothing");
    let missing = shards.put(&tenant, "ticket", "never", &write("x"), Some(a.version.clone())).await;
    assert!(matches!(missing, Err(DomainError::PreconditionFailed)), "If-Match on a missing record");
    let a2 = shards.put(&tenant, "ticket", "a/1", &write("edited"), Some(a.version.clone())).await.expect("conditional put");
    assert_ne!(a2.version, a.version, "a write makes a new version");

    let first = shards.changes(&tenant, "ticket", None, 1).await.expect("changes");
    assert_eq!(
        first.items.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["b"],
        "oldest change first, the latest version of each record"
    );
    let rest = shards.changes(&tenant, "ticket", Some(first.next_cursor.clone()), 10).await.expect("changes");
    assert_eq!(rest.items.len(), 1);
    assert_eq!((rest.items[0].key.as_str(), &rest.items[0].data), ("a/1", &json!({"title": "edited"})));
    assert_eq!(rest.items[0].source.as_deref(), Some("integration-1"), "the origin of the write");
    assert!(!rest.items[0].deleted);

    let quiet = shards.changes(&tenant, "ticket", Some(rest.next_cursor.clone()), 10).await.expect("changes");
    assert!(quiet.items.is_empty(), "nothing after the last change");
    shards.delete(&tenant, "ticket", "b").await.expect("delete");
    shards.delete(&tenant, "ticket", "never-existed").await.expect("a delete of a missing record succeeds");
    let after = shards.changes(&tenant, "ticket", Some(quiet.next_cursor), 10).await.expect("changes");
    let tombstone = after.items.iter().find(|r| r.key == "b").expect("the tombstone");
    assert!(tombstone.deleted, "a delete is a tombstone in the changes");
    assert!(matches!(shards.put(&tenant, "ticket", "b", &write("x"), Some(b.version)).await, Err(DomainError::PreconditionFailed)));

    // A batch: each item on its own terms, the outcomes in order, consecutive changes.
    let cursor = shards.changes(&tenant, "ticket", None, 100).await.expect("changes").next_cursor;
    let a3 = shards.put(&tenant, "ticket", "a/1", &write("before the batch"), None).await.expect("put");
    let cursor = shards.changes(&tenant, "ticket", Some(cursor), 100).await.expect("changes").next_cursor;
    let item = |key: &str, title: &str, if_match: Option<String>| ShardPut { key: key.into(), write: write(title), if_match };
    let outcomes = shards
        .put_many(
            &tenant,
            "ticket",
            &[
                item("c", "batched", None),
                item("a/1", "stale", Some(a.version.clone())),
                item("a/1", "batched too", Some(a3.version.clone())),
                item("never", "x", Some(a3.version.clone())),
            ],
        )
        .await
        .expect("put_many");
    assert_eq!(outcomes.len(), 4);
    let c = outcomes[0].as_ref().expect("an unconditional item");
    assert_eq!(c.key, "c");
    assert!(matches!(outcomes[1], Err(DomainError::PreconditionFailed)), "a stale item: {:?}", outcomes[1]);
    let a4 = outcomes[2].as_ref().expect("a conditional item on the current version");
    assert!(matches!(outcomes[3], Err(DomainError::PreconditionFailed)), "an item on a missing record: {:?}", outcomes[3]);
    assert_ne!(a4.version, a3.version);
    let batch = shards.changes(&tenant, "ticket", Some(cursor), 100).await.expect("changes");
    let seen: Vec<_> = batch.items.iter().map(|r| (r.key.as_str(), r.version.as_str(), r.data.clone())).collect();
    assert_eq!(
        seen,
        vec![("c", c.version.as_str(), json!({"title": "batched"})), ("a/1", a4.version.as_str(), json!({"title": "batched too"}))],
        "the batch's writes, in order, and nothing of the refused items"
    );
    assert!(shards.put_many(&tenant, "ticket", &[]).await.expect("an empty batch").is_empty());

    let forged = shards.changes(&tenant, "ticket", Some("forged!".into()), 10).await;
    assert!(matches!(forged, Err(DomainError::Validation(_))), "a cursor it did not issue");
    let others = shards.changes(&other, "ticket", None, 10).await.expect("changes");
    assert_eq!(others.items.len(), 1, "tenants are isolated");
    assert_eq!(others.items[0].data, json!({"title": "another tenant"}));
}

/// `SyncScheduler` on a real store: of two instances claiming at once exactly one runs a due
/// task; a lease that ends without a heartbeat expires the execution and the task runs again
/// (the old holder can no longer write); consecutive failures pause the task with a reason.
pub async fn scheduler(tasks_repo: std::sync::Arc<dyn SyncTaskRepository>, executions_repo: std::sync::Arc<dyn SyncExecutionRepository>) {
    use im_domain::services::SyncScheduler;
    let instance = |owner: &str, lease: Duration| {
        SyncScheduler::new(
            tasks_repo.clone(),
            executions_repo.clone(),
            std::sync::Arc::new(im_domain::SystemClock),
            std::sync::Arc::new(im_domain::UuidV7),
            owner,
            lease,
        )
        .with_failure_limit(2)
    };
    let (a, b) = (instance("instance-a", Duration::from_secs(60)), instance("instance-b", Duration::from_secs(60)));
    let tenant = fresh_tenant();
    let due = task(&tenant);
    assert!(due.next_run_at.is_some_and(|at| at < time::OffsetDateTime::now_utc()), "due since the fixed timestamp");
    tasks_repo.create(&due).await.expect("create");

    let (got_a, got_b) = tokio::join!(a.claim_due(1000), b.claim_due(1000));
    let mine = |claims: &[im_domain::services::Claimed]| claims.iter().filter(|c| c.task.value.id == due.id).cloned().collect::<Vec<_>>();
    let (mine_a, mine_b) = (mine(&got_a.expect("claim a")), mine(&got_b.expect("claim b")));
    assert_eq!(mine_a.len() + mine_b.len(), 1, "exactly one instance runs the task: {mine_a:?} {mine_b:?}");
    let mut winner = mine_a.into_iter().chain(mine_b).next().expect("a claim");
    assert_eq!((winner.execution.value.status, winner.execution.value.trigger), (ExecutionStatus::Running, Trigger::Schedule));
    assert!(mine(&a.claim_due(1000).await.expect("claim")).is_empty(), "a held task is not claimed again");
    let holder = if winner.execution.value.owner.as_deref() == Some("instance-a") { &a } else { &b };
    assert!(!holder.heartbeat(&mut winner).await.expect("heartbeat"), "no cancel asked");
    let released = holder.finish(winner, ExecutionStatus::Failed, Some("provider unavailable".into()), &[]).await.expect("finish");
    assert_eq!((released.value.consecutive_failures, released.value.status), (1, TaskStatus::Active));
    assert!(released.value.lease.is_none() && released.value.next_run_at.is_some());

    // A dead instance: its lease ends (zero here) without a heartbeat.
    let mut task_b = task(&tenant);
    task_b.next_run_at = Some(timestamp());
    tasks_repo.create(&task_b).await.expect("create");
    let dying = instance("instance-dying", Duration::ZERO);
    let mut lost = mine_of(&dying.claim_due(1000).await.expect("claim"), task_b.id).expect("claimed by the dying instance");
    let expired_id = lost.execution.value.id;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(mine_of(&a.claim_due(1000).await.expect("claim"), task_b.id).is_none(), "the first pass expires the dead run");
    let execution = executions_repo.get(&tenant, expired_id).await.expect("execution");
    assert_eq!(execution.value.status, ExecutionStatus::Expired);
    let mut again = mine_of(&a.claim_due(1000).await.expect("claim"), task_b.id).expect("the task runs again at once");
    assert_ne!(again.execution.value.id, expired_id);
    assert_eq!(again.task.value.consecutive_failures, 1, "an expired run counts as failed");
    assert!(matches!(dying.heartbeat(&mut lost).await, Err(DomainError::Conflict(_))), "the old holder must stop");
    assert!(!a.heartbeat(&mut again).await.expect("heartbeat"));
    let paused = a.finish(again, ExecutionStatus::Failed, Some("boom".into()), &[]).await.expect("finish");
    assert_eq!(paused.value.status, TaskStatus::Paused, "two failures in a row pause the task");
    assert!(paused.value.status_reason.as_deref().is_some_and(|r| r.contains("2 consecutive failed runs") && r.contains("boom")));
    assert_eq!(paused.value.next_run_at, None);

    // A manual run is claimed only once its execution can be read (it is written just after
    // the task names it), then with that execution.
    let mut manual = task(&tenant);
    let queued_id = Uuid::now_v7();
    manual.pending_execution = Some(queued_id);
    manual.next_run_at = Some(timestamp());
    manual.updated_at = time::OffsetDateTime::now_utc();
    tasks_repo.create(&manual).await.expect("create");
    assert!(mine_of(&a.claim_due(1000).await.expect("claim"), manual.id).is_none(), "not before its execution exists");
    let stored = tasks_repo.get(&tenant, manual.id).await.expect("task");
    assert!(stored.value.lease.is_none() && stored.value.pending_execution == Some(queued_id), "left as it was: {:?}", stored.value);
    let queued =
        SyncExecution::queued(queued_id, tenant.clone(), manual.id, Trigger::Manual, Default::default(), time::OffsetDateTime::now_utc());
    executions_repo.create(&queued).await.expect("create the execution");
    let claimed = mine_of(&a.claim_due(1000).await.expect("claim"), manual.id).expect("claimed now");
    assert_eq!((claimed.execution.value.id, claimed.execution.value.trigger), (queued_id, Trigger::Manual));
    assert_eq!(claimed.execution.value.status, ExecutionStatus::Running);
}

fn mine_of(claims: &[im_domain::services::Claimed], id: SyncTaskId) -> Option<im_domain::services::Claimed> {
    claims.iter().find(|c| c.task.value.id == id).cloned()
}

/// A run ends with two writes, the execution's final status and then the task's release. A
/// client that saw the execution end may queue the next run (or delete the task, or cancel) at
/// once, between the two: that request is accepted (a cancel is told nothing runs), and the
/// release, which then finds the task written meanwhile, is made on its current version and
/// keeps the queued run.
pub async fn the_next_run_is_queued_as_the_last_ends(
    tasks_repo: std::sync::Arc<dyn SyncTaskRepository>,
    executions_repo: std::sync::Arc<dyn SyncExecutionRepository>,
    states: std::sync::Arc<dyn SyncStateRepository>,
) {
    use im_domain::services::{SyncScheduler, SyncTaskService};
    let clock = std::sync::Arc::new(im_domain::SystemClock);
    let ids = std::sync::Arc::new(im_domain::UuidV7);
    let audit = im_domain::audit::Audit::new(std::sync::Arc::new(AuditRecords::default()), clock.clone());
    let service = SyncTaskService::new(tasks_repo.clone(), executions_repo.clone(), states, clock.clone(), ids.clone(), audit);
    let tenant = fresh_tenant();
    let member = caller(&tenant, vec![im_domain::Role::Member]);
    let between = std::sync::Arc::new(Between {
        inner: tasks_repo.clone(),
        armed: Default::default(),
        reached: Default::default(),
        go: Default::default(),
    });
    let scheduler = SyncScheduler::new(between.clone(), executions_repo.clone(), clock, ids, "instance-a", Duration::from_secs(60));
    let mut due = task(&tenant);
    due.next_run_at = Some(timestamp());
    tasks_repo.create(&due).await.expect("create");
    let mut claimed = mine_of(&scheduler.claim_due(1000).await.expect("claim"), due.id).expect("claimed");
    let ended = claimed.execution.value.id;
    assert!(!scheduler.heartbeat(&mut claimed).await.expect("heartbeat"));
    assert!(matches!(service.run(&member, due.id).await, Err(DomainError::Conflict(_))), "refused while the execution runs");

    let (released, queued) = between_writes(&between, &scheduler, claimed, service.run(&member, due.id)).await;
    let released = released.expect("released on the task's current version");
    let queued = queued.expect("the next run is queued as soon as the execution has ended");
    assert_eq!(queued.value.status, ExecutionStatus::Queued);
    assert!(released.value.lease.is_none(), "{:?}", released.value);
    assert_eq!(released.value.pending_execution, Some(queued.value.id), "the release keeps the queued run");
    assert_eq!(released.value.last_execution.as_ref().map(|l| (l.id, l.status)), Some((ended, ExecutionStatus::Succeeded)));
    assert!(released.value.next_run_at.is_some_and(|at| at <= time::OffsetDateTime::now_utc()), "due at once");
    let mut next = mine_of(&scheduler.claim_due(1000).await.expect("claim"), due.id).expect("the queued run is claimed");
    assert_eq!((next.execution.value.id, next.execution.value.trigger), (queued.value.id, Trigger::Manual));

    // Cancelled between the two writes: nothing runs any more, nothing is queued.
    assert!(!scheduler.heartbeat(&mut next).await.expect("heartbeat"));
    let (released, cancelled) = between_writes(&between, &scheduler, next.clone(), service.cancel(&member, due.id)).await;
    assert!(matches!(cancelled, Err(DomainError::Conflict(_))), "nothing left to cancel: {cancelled:?}");
    let released = released.expect("released");
    assert!(!released.value.cancel_requested && released.value.lease.is_none(), "{:?}", released.value);
    let execution = executions_repo.get(&tenant, next.execution.value.id).await.expect("execution");
    assert_eq!(execution.value.status, ExecutionStatus::Succeeded, "the run's outcome stands");

    // Deleted between the two writes: nothing is left to release, and that is what finish says.
    service.run(&member, due.id).await.expect("run");
    let mut last = mine_of(&scheduler.claim_due(1000).await.expect("claim"), due.id).expect("claimed");
    assert!(!scheduler.heartbeat(&mut last).await.expect("heartbeat"));
    let (gone, deleted) = between_writes(&between, &scheduler, last, service.delete(&member, due.id, None)).await;
    assert!(matches!(deleted, Ok(())), "deleted as soon as the execution has ended: {deleted:?}");
    assert!(matches!(gone, Err(DomainError::NotFound { .. })), "{gone:?}");
    assert!(matches!(tasks_repo.get(&tenant, due.id).await, Err(DomainError::NotFound { .. })));
}

/// Ends `claimed` successfully while `request` is made between its two writes.
async fn between_writes<T>(
    between: &Between,
    scheduler: &im_domain::services::SyncScheduler,
    claimed: im_domain::services::Claimed,
    request: impl Future<Output = T>,
) -> (Result<im_domain::Stored<SyncTask>, DomainError>, T) {
    between.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let request = async {
        between.reached.notified().await;
        let out = request.await;
        between.go.notify_one();
        out
    };
    tokio::join!(scheduler.finish(claimed, ExecutionStatus::Succeeded, None, &[]), request)
}

/// A task repository that, once armed, stops before the next release of a task (a replace
/// without a lease) until the test has made its request.
struct Between {
    inner: std::sync::Arc<dyn SyncTaskRepository>,
    armed: std::sync::atomic::AtomicBool,
    reached: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl SyncTaskRepository for Between {
    async fn create(&self, task: &SyncTask) -> Result<ETag, DomainError> {
        self.inner.create(task).await
    }

    async fn get(&self, tenant: &TenantId, id: SyncTaskId) -> Result<im_domain::Stored<SyncTask>, DomainError> {
        self.inner.get(tenant, id).await
    }

    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<im_domain::Page<im_domain::Stored<SyncTask>>, DomainError> {
        self.inner.list(tenant, page).await
    }

    async fn replace(
        &self,
        task: &SyncTask,
        if_match: Option<ETag>,
        events: &[im_domain::events::DomainEvent],
    ) -> Result<ETag, DomainError> {
        if task.lease.is_none() && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.reached.notify_one();
            self.go.notified().await;
        }
        self.inner.replace(task, if_match, events).await
    }

    async fn delete(&self, tenant: &TenantId, id: SyncTaskId, if_match: Option<ETag>) -> Result<(), DomainError> {
        self.inner.delete(tenant, id, if_match).await
    }

    async fn due(&self, now: time::OffsetDateTime, limit: u32) -> Result<Vec<im_domain::Stored<SyncTask>>, DomainError> {
        self.inner.due(now, limit).await
    }
}
