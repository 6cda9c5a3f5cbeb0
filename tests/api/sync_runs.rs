//! Sync runs end to end: a custom integration whose API is the fake provider (10,000 records
//! on the embedded store, 1,000 on Cosmos DB), the app's sync worker, and the embedded Shard
//! Manager. A run pulls every record, a second run over unchanged data writes nothing on either
//! side, edits on each side between runs go to the other side, a platform delete reaches the
//! provider, 429 and 503 answers are retried, two instances never run one task at once, a change
//! the provider refused is retried by the next run, a bidirectional task needs the entity's `get`
//! request, and deletions the entity marks in its list reach the platform.

use std::sync::Arc;
use std::time::Duration;

use im_domain::TenantId;
use im_domain::sync::ports::{ShardManager, ShardWrite};
use im_testkit::fake_provider::{FakeAuth, FakeProvider, Fault};
use integration_manager::config::HumanDuration;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, backend_is_cosmos, spawn_in};

const TOKEN: &str = "fake-provider-token-0123456789";

fn configure(s: &mut integration_manager::Settings) {
    s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
    s.webhooks.sender.allow_http = true;
    s.sync.poll_interval = HumanDuration::parse("100ms").unwrap();
    s.sync.page_size = 500;
}

async fn sync_app(dir: Arc<tempfile::TempDir>) -> TestApp {
    spawn_in(dir, configure).await
}

struct Synced {
    token: String,
    tenant: TenantId,
    task: String,
    integration: String,
}

/// A custom integration on the fake, a bearer connection and a manual bidirectional task.
async fn synced(app: &TestApp, fake: &FakeProvider) -> Synced {
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[im_domain::Role::Member]);
    let body = json!({"providerId": "custom", "name": "Local API", "customDefinition": fake.definition()});
    let created = app.post("/api/v1/integrations", &token, &body).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let integration = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let connection = json!({"name": "bot", "authMode": "bearer", "credentials": {"token": TOKEN}});
    let created = app.post(&format!("/api/v1/integrations/{integration}/connections"), &token, &connection).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let connection = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let task = json!({
        "integrationId": integration,
        "connectionId": connection,
        "entity": "record",
        "target": "records",
        "direction": "bidirectional",
        "schedule": {"manual": true},
        "fieldMapping": [{"provider": "/name", "platform": "/title"}],
        "conflictPolicy": "provider_wins",
        "deletes": "propagate",
    });
    let created = app.post("/api/v1/sync-tasks", &token, &task).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let task = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    Synced { token, tenant: TenantId::new(tenant).unwrap(), task, integration }
}

async fn queue(app: &TestApp, s: &Synced) -> reqwest::Response {
    app.request(reqwest::Method::POST, &format!("/api/v1/sync-tasks/{}/run", s.task), &s.token).send().await.unwrap()
}

/// Queues a run and waits until it ends; returns the execution.
async fn run(app: &TestApp, s: &Synced) -> Value {
    let queued = queue(app, s).await;
    assert_eq!(queued.status(), StatusCode::ACCEPTED);
    let execution: Value = queued.json().await.unwrap();
    wait(app, s, execution["id"].as_str().unwrap()).await
}

/// Waits until the execution ended: the next run can be queued at once (the task's release, the
/// write after the execution's end, does not hold it back).
async fn wait(app: &TestApp, s: &Synced, execution: &str) -> Value {
    let path = format!("/api/v1/sync-tasks/{}/executions/{execution}", s.task);
    // Polled often, as a client queueing runs back to back would.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while std::time::Instant::now() < deadline {
        let current: Value = app.get(&path, &s.token).await.json().await.unwrap();
        if !["queued", "running"].contains(&current["status"].as_str().unwrap()) {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the execution {execution} did not end in 5 minutes");
}

/// The Shard Manager the app writes to: the embedded one in the app's data directory.
fn shards(app: &TestApp) -> Arc<dyn ShardManager> {
    let store = im_store_embedded::EmbeddedStore::open(app.dir.path(), Arc::new(im_domain::SystemClock)).expect("the embedded store opens");
    store.shards()
}

/// Every live record of the task's shard type, by key.
async fn platform(app: &TestApp, s: &Synced) -> std::collections::BTreeMap<String, Value> {
    let shards = shards(app);
    let mut records = std::collections::BTreeMap::new();
    let mut cursor = None;
    loop {
        let page = shards.changes(&s.tenant, "records", cursor.clone(), 1000).await.unwrap();
        if page.items.is_empty() {
            return records;
        }
        for item in page.items {
            if item.deleted {
                records.remove(&item.key);
            } else {
                records.insert(item.key, item.data);
            }
        }
        cursor = Some(page.next_cursor);
    }
}

fn records() -> usize {
    if backend_is_cosmos() { 1_000 } else { 10_000 }
}

#[tokio::test]
async fn a_bidirectional_task_syncs_both_ways_and_a_second_run_over_unchanged_data_writes_nothing() {
    let fake = FakeProvider::start(records(), FakeAuth::Bearer(TOKEN.into())).await;
    let app = sync_app(Arc::new(tempfile::tempdir().unwrap())).await;
    let s = synced(&app, &fake).await;

    let first = run(&app, &s).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    let n = records() as u64;
    assert_eq!(first["counts"]["inbound"]["read"], n, "{first}");
    assert_eq!(first["counts"]["inbound"]["created"], n, "{first}");
    let copied = platform(&app, &s).await;
    assert_eq!(copied.len(), records());
    assert_eq!(copied["r000042"], json!({"title": "record 42"}));
    assert!(first["checkpointsTo"]["provider"].is_string() && first["checkpointsTo"]["platform"].is_string(), "{first}");

    // Nothing changed: nothing is written on either side (the run's own writes come back as echoes).
    let writes = fake.writes();
    let second = run(&app, &s).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    for direction in ["inbound", "outbound"] {
        for action in ["created", "updated", "deleted"] {
            assert_eq!(second["counts"][direction][action], 0, "{direction} {action}: {second}");
        }
    }
    assert_eq!(fake.writes(), writes, "no write to the provider");
    assert!(second["counts"]["inbound"]["read"].as_u64().unwrap() < n, "the updated-since filter limits the read: {second}");

    // Edits on both sides, a platform delete, and a flaky provider (429 then 503, retried).
    fake.edit("r000005", json!({"name": "edited at the provider"}));
    let shards = shards(&app);
    let write = ShardWrite {
        data: json!({"title": "edited on the platform"}),
        version: None,
        updated_at: time::OffsetDateTime::now_utc(),
        source: "someone".into(),
    };
    shards.put(&s.tenant, "records", "r000007", &write, None).await.unwrap();
    shards.delete(&s.tenant, "records", "r000011").await.unwrap();
    fake.fail_next([Fault::TooManyRequests { retry_after_secs: 1 }, Fault::Status(503)]);
    let third = run(&app, &s).await;
    assert_eq!(third["status"], "succeeded", "{third}");
    assert_eq!(fake.record("r000007").unwrap()["name"], "edited on the platform");
    assert!(fake.record("r000011").is_none(), "the platform delete reached the provider");
    let now = platform(&app, &s).await;
    assert_eq!(now["r000005"], json!({"title": "edited at the provider"}));
    assert_eq!((third["counts"]["outbound"]["updated"].clone(), third["counts"]["outbound"]["deleted"].clone()), (json!(1), json!(1)));
    assert_eq!(third["counts"]["inbound"]["updated"], 1, "{third}");

    // And it settles: nothing more to write.
    let writes = fake.writes();
    let fourth = run(&app, &s).await;
    assert_eq!(fake.writes(), writes, "{fourth}");
    assert_eq!(fourth["counts"]["inbound"]["updated"], 0, "{fourth}");
    // The task is released just after its execution's end is written: its lastExecution names
    // the run once it is.
    let path = format!("/api/v1/sync-tasks/{}", s.task);
    let mut task: Value = app.get(&path, &s.token).await.json().await.unwrap();
    for _ in 0..500 {
        if task["lastExecution"]["id"] == fourth["id"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        task = app.get(&path, &s.token).await.json().await.unwrap();
    }
    assert_eq!(task["lastExecution"]["id"], fourth["id"], "{task}");
    assert_eq!(task["consecutiveFailures"], 0);
    let _ = &s.integration;
}

#[tokio::test]
async fn two_instances_on_one_store_never_run_one_task_at_once() {
    let fake = FakeProvider::start(1_000, FakeAuth::Bearer(TOKEN.into())).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let a = sync_app(dir.clone()).await;
    let b = spawn_in(dir, |settings| {
        configure(settings);
        // The second instance shares the first's store (Cosmos DB: its database).
        settings.cosmos_db.database = a.settings.cosmos_db.database.clone();
        settings.cosmos_db.auto_provision = false;
    })
    .await;
    let s = synced(&a, &fake).await;
    // Slow pages: both instances poll while the run is in flight.
    fake.fail_next((0..2).map(|_| Fault::Slow(Duration::from_millis(700))));
    let queued = queue(&a, &s).await;
    let execution: Value = queued.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let busy = queue(&b, &s).await;
    assert_eq!(busy.status(), StatusCode::CONFLICT, "one active execution per task");
    let done = wait(&b, &s, execution["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let listed: Value = b.get(&format!("/api/v1/sync-tasks/{}/executions", s.task), &s.token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    let lists = fake.requests().iter().filter(|r| r.path_and_query.starts_with("/cursor/records")).count();
    assert_eq!(lists, 2, "one instance paged through once (1,000 records, pages of 500)");
    assert_eq!(platform(&a, &s).await.len(), 1_000);
}

#[tokio::test]
async fn a_platform_change_the_provider_refused_is_retried_by_the_next_run_without_changing_again() {
    let fake = FakeProvider::start(50, FakeAuth::Bearer(TOKEN.into())).await;
    let app = sync_app(Arc::new(tempfile::tempdir().unwrap())).await;
    let s = synced(&app, &fake).await;
    assert_eq!(run(&app, &s).await["status"], "succeeded");

    let write = ShardWrite {
        data: json!({"title": "edited on the platform"}),
        version: None,
        updated_at: time::OffsetDateTime::now_utc(),
        source: "someone".into(),
    };
    shards(&app).put(&s.tenant, "records", "r000003", &write, None).await.unwrap();
    fake.refuse_writes("r000003", 422);
    let refused = run(&app, &s).await;
    assert_eq!(refused["status"], "partial", "{refused}");
    assert_eq!(refused["errors"][0]["recordId"], "r000003", "{refused}");
    assert!(refused["errors"][0]["message"].as_str().unwrap().contains("attempt 1 of 5"), "{refused}");
    let pending = &refused["checkpointsTo"]["pendingOutbound"];
    assert_eq!((pending[0]["key"].clone(), pending[0]["attempts"].clone()), (json!("r000003"), json!(1)), "{refused}");
    assert_eq!(fake.record("r000003").unwrap()["name"], "record 3");

    // The provider takes it now: the next run writes it, though the platform did not change again.
    fake.accept_writes("r000003");
    let retried = run(&app, &s).await;
    assert_eq!(retried["status"], "succeeded", "{retried}");
    assert_eq!(retried["counts"]["outbound"]["updated"], 1, "{retried}");
    assert_eq!(fake.record("r000003").unwrap()["name"], "edited on the platform");
    let writes = fake.writes();
    let settled = run(&app, &s).await;
    assert_eq!((settled["status"].clone(), fake.writes()), (json!("succeeded"), writes), "{settled}");
}

#[tokio::test]
async fn a_bidirectional_task_needs_an_entity_with_a_get_request() {
    let fake = FakeProvider::start(1, FakeAuth::Bearer(TOKEN.into())).await;
    let app = sync_app(Arc::new(tempfile::tempdir().unwrap())).await;
    let mut definition = fake.definition();
    definition["entities"][0].as_object_mut().unwrap().remove("get");
    let token = app.member();
    let body = json!({"providerId": "custom", "name": "No reads", "customDefinition": definition});
    let integration =
        app.post("/api/v1/integrations", &token, &body).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let connection = json!({"name": "bot", "authMode": "bearer", "credentials": {"token": TOKEN}});
    let created = app.post(&format!("/api/v1/integrations/{integration}/connections"), &token, &connection).await;
    let connection = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let mut task = json!({
        "integrationId": integration, "connectionId": connection, "entity": "record", "target": "records",
        "direction": "bidirectional", "schedule": {"manual": true},
        "fieldMapping": [{"provider": "/name", "platform": "/title"}],
    });
    let refused = app.post("/api/v1/sync-tasks", &token, &task).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "direction", "{problem}");
    assert!(problem["errors"][0]["message"].as_str().unwrap().contains("no get request"), "{problem}");
    for direction in ["inbound", "outbound"] {
        task["direction"] = json!(direction);
        assert_eq!(app.post("/api/v1/sync-tasks", &token, &task).await.status(), StatusCode::CREATED, "{direction}");
    }
}

#[tokio::test]
async fn an_incremental_run_deletes_what_the_entity_marks_deleted_in_its_list() {
    let fake = FakeProvider::start(20, FakeAuth::Bearer(TOKEN.into())).await;
    let app = sync_app(Arc::new(tempfile::tempdir().unwrap())).await;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[im_domain::Role::Member]);
    let mut definition = fake.definition();
    // The marker is checked: a dotted path and a scalar value.
    definition["entities"][0]["deleted"] = json!({"field": "/archived", "value": {"yes": 1}});
    let body = json!({"providerId": "custom", "name": "Soft deletes", "customDefinition": definition});
    let refused = app.post("/api/v1/integrations", &token, &body).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = refused.json().await.unwrap();
    let fields = crate::helpers::fields(&problem);
    assert_eq!(fields, ["customDefinition.entities[0].deleted.field", "customDefinition.entities[0].deleted.value"], "{problem}");

    definition["entities"][0]["deleted"] = json!({"field": "archived", "value": true});
    let body = json!({"providerId": "custom", "name": "Soft deletes", "customDefinition": definition});
    let created = app.post("/api/v1/integrations", &token, &body).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let integration = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let connection = json!({"name": "bot", "authMode": "bearer", "credentials": {"token": TOKEN}});
    let created = app.post(&format!("/api/v1/integrations/{integration}/connections"), &token, &connection).await;
    let connection = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let task = json!({
        "integrationId": integration, "connectionId": connection, "entity": "record", "target": "records",
        "direction": "inbound", "mode": "incremental", "schedule": {"manual": true},
        "fieldMapping": [{"provider": "/name", "platform": "/title"}], "deletes": "propagate",
    });
    let created = app.post("/api/v1/sync-tasks", &token, &task).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let s = Synced {
        token,
        tenant: TenantId::new(tenant).unwrap(),
        task: created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned(),
        integration,
    };
    assert_eq!(run(&app, &s).await["status"], "succeeded");
    assert_eq!(platform(&app, &s).await.len(), 20);

    fake.edit("r000004", json!({"archived": true}));
    let second = run(&app, &s).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(second["counts"]["inbound"]["deleted"], 1, "{second}");
    let now = platform(&app, &s).await;
    assert_eq!(now.len(), 19);
    assert!(!now.contains_key("r000004"));
    assert!(fake.record("r000004").is_some(), "nothing goes back to the provider");
}
