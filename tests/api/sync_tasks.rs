//! Sync tasks over HTTP: CRUD with `If-Match`, validation naming each field, the connection
//! check, manual runs (202, then 409 while one is queued), pause and resume, reset, cancel,
//! executions, and tenant isolation.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, fields, header, problem, spawn_app};

/// A tenant's member token, an integration and one of its connections.
struct Setup {
    token: String,
    integration: String,
    connection: String,
}

async fn setup(app: &TestApp) -> Setup {
    let token = app.member();
    let (created, _) = app.create_github(&token, "synced").await;
    let integration = created["id"].as_str().unwrap().to_owned();
    let body = json!({"name": "Sync bot", "authMode": "bearer", "credentials": {"token": "ghp_Sync0123456789TokenValue"}});
    let response = app.post(&format!("/api/v1/integrations/{integration}/connections"), &token, &body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let connection = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    Setup { token, integration, connection }
}

fn task(s: &Setup) -> Value {
    json!({
        "integrationId": s.integration,
        "connectionId": s.connection,
        "entity": "issue",
        "target": "tickets",
        "direction": "bidirectional",
        "schedule": {"cron": "*/15 * * * *", "timezone": "Europe/Berlin"},
        "fieldMapping": [{"provider": "/title", "platform": "/title"}, {"provider": "/state", "platform": "/status", "direction": "inbound"}],
        "conflictPolicy": "manual",
    })
}

async fn create(app: &TestApp, s: &Setup, body: &Value) -> (Value, String) {
    let response = app.post("/api/v1/sync-tasks", &s.token, body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let etag = header(&response, "etag");
    let location = header(&response, "location");
    let created: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/api/v1/sync-tasks/{}", created["id"].as_str().unwrap()));
    (created, etag)
}

async fn post_if(app: &TestApp, path: &str, token: &str, if_match: Option<&str>) -> reqwest::Response {
    let mut request = app.request(Method::POST, path, token);
    if let Some(etag) = if_match {
        request = request.header("if-match", etag);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn crud_with_if_match() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let (created, etag) = create(&app, &s, &task(&s)).await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/api/v1/sync-tasks/{id}");
    assert_eq!(created["status"], "active");
    assert_eq!(created["mode"], "incremental");
    assert_eq!(created["deletes"], "ignore");
    assert_eq!(created["schedule"], json!({"cron": "*/15 * * * *", "timezone": "Europe/Berlin"}));
    assert_eq!(created["fieldMapping"][1]["direction"], "inbound");
    assert_eq!(created["consecutiveFailures"], 0);
    assert!(created["nextRunAt"].is_string(), "an active cron task is due: {created}");

    let read = app.get(&path, &s.token).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "etag"), etag);

    // The answer of a read may be sent back, changed.
    let mut changed = created.clone();
    changed["schedule"] = json!({"every": "10m"});
    changed["mode"] = json!("full");
    // Read-only fields as a later read shows them are ignored.
    changed["lastExecution"] = json!({"id": uuid::Uuid::now_v7(), "status": "succeeded", "endedAt": "2026-01-31T12:00:00Z"});
    changed["consecutiveFailures"] = json!(2);
    changed["statusReason"] = json!("paused by bob");
    let stale = app.put(&path, &s.token, &changed, Some("\"stale\"")).await;
    problem(stale, StatusCode::PRECONDITION_FAILED).await;
    let updated = app.put(&path, &s.token, &changed, Some(&etag)).await;
    assert_eq!(updated.status(), StatusCode::OK);
    let new_etag = header(&updated, "etag");
    assert_ne!(new_etag, etag);
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["schedule"], json!({"every": "10m"}));
    assert_eq!(updated["mode"], "full");
    assert!(updated.get("lastExecution").is_none() && updated["consecutiveFailures"] == 0, "{updated}");

    let listed: Value = app.get("/api/v1/sync-tasks", &s.token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["id"], id);

    problem(app.delete(&path, &s.token, Some(&etag)).await, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(app.delete(&path, &s.token, Some(&new_etag)).await.status(), StatusCode::NO_CONTENT);
    problem(app.get(&path, &s.token).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn validation_names_every_field() {
    let app = spawn_app().await;
    let s = setup(&app).await;

    let mut body = task(&s);
    body["schedule"] = json!({"cron": "61 * * * *", "timezone": "Mars/Olympus"});
    body["fieldMapping"] = json!([{"provider": "title", "platform": "/title"}, {"provider": "/a", "platform": "/b~2"}]);
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let found = fields(&p);
    for field in ["schedule.timezone", "fieldMapping[0].provider", "fieldMapping[1].platform"] {
        assert!(found.contains(&field.to_owned()), "{field} in {found:?}");
    }

    body = task(&s);
    body["schedule"] = json!({"cron": "61 * * * *"});
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["schedule.cron"]);

    body["schedule"] = json!({"every": "30s"});
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["schedule.every"]);

    body["schedule"] = json!({"every": "10m", "manual": true});
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["schedule"]);

    // A connection of another integration (or none) is named.
    body = task(&s);
    body["connectionId"] = json!(uuid::Uuid::now_v7());
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["connectionId"]);

    // The entity must be one the provider describes (GitHub: issue, repository).
    body = task(&s);
    body["entity"] = json!("wiki_page");
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["entity"]);
    assert!(p["errors"][0]["message"].as_str().is_some_and(|m| m.contains("issue")), "{p}");

    // A direction the entity's requests cannot carry out is named (GitHub's repository is
    // listed only: no get request to compare a bidirectional change with, no upsert to write).
    for direction in ["bidirectional", "outbound"] {
        body = task(&s);
        body["entity"] = json!("repository");
        body["direction"] = json!(direction);
        body["fieldMapping"] = json!([{"provider": "/name", "platform": "/name"}]);
        let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&p), vec!["direction"], "{direction}");
        assert!(p["errors"][0]["message"].as_str().is_some_and(|m| m.contains("upsert")), "{p}");
    }
    body["direction"] = json!("inbound");
    let (inbound, etag) = create(&app, &s, &body).await;
    body["direction"] = json!("bidirectional");
    let path = format!("/api/v1/sync-tasks/{}", inbound["id"].as_str().unwrap());
    let p = problem(app.put(&path, &s.token, &body, Some(&etag)).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["direction"]);
    assert_eq!(app.delete(&path, &s.token, Some(&etag)).await.status(), StatusCode::NO_CONTENT);

    // Shape problems are 400s naming the field.
    body = task(&s);
    body["direction"] = json!("sideways");
    body["colour"] = json!("blue");
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::BAD_REQUEST).await;
    let found = fields(&p);
    assert!(found.contains(&"direction".to_owned()) && found.contains(&"colour".to_owned()), "{found:?}");

    let listed: Value = app.get("/api/v1/sync-tasks", &s.token).await.json().await.unwrap();
    assert_eq!(listed["items"], json!([]), "nothing was written");
}

#[tokio::test]
async fn run_is_accepted_once_then_conflicts() {
    // The sync worker looks once at start-up, then not for an hour: the run stays queued.
    let app =
        crate::helpers::spawn_app_with(|s| s.sync.poll_interval = integration_manager::config::HumanDuration::parse("1h").unwrap()).await;
    let s = setup(&app).await;
    let mut body = task(&s);
    body["schedule"] = json!({"manual": true});
    let (created, _) = create(&app, &s, &body).await;
    let id = created["id"].as_str().unwrap();
    assert!(created.get("nextRunAt").is_none(), "a manual task is never due: {created}");

    let run = post_if(&app, &format!("/api/v1/sync-tasks/{id}/run"), &s.token, None).await;
    assert_eq!(run.status(), StatusCode::ACCEPTED);
    let location = header(&run, "location");
    let execution: Value = run.json().await.unwrap();
    assert_eq!(execution["status"], "queued");
    assert_eq!(execution["trigger"], "manual");
    assert_eq!(execution["taskId"], id);
    assert_eq!(location, format!("/api/v1/sync-tasks/{id}/executions/{}", execution["id"].as_str().unwrap()));

    let again = post_if(&app, &format!("/api/v1/sync-tasks/{id}/run"), &s.token, None).await;
    problem(again, StatusCode::CONFLICT).await;
    // Nor can it be deleted or reset while the run is queued.
    let path = format!("/api/v1/sync-tasks/{id}");
    problem(app.delete(&path, &s.token, None).await, StatusCode::CONFLICT).await;
    let reset = app.post(&format!("{path}/reset"), &s.token, &json!({"scope": "all"})).await;
    problem(reset, StatusCode::CONFLICT).await;

    let read = app.get(&location, &s.token).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.json::<Value>().await.unwrap()["id"], execution["id"]);
    let listed: Value = app.get(&format!("{path}/executions"), &s.token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["id"], execution["id"]);

    // Cancelling the queued run ends it and frees the task.
    assert_eq!(post_if(&app, &format!("{path}/cancel"), &s.token, None).await.status(), StatusCode::OK);
    let cancelled: Value = app.get(&location, &s.token).await.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    problem(post_if(&app, &format!("{path}/cancel"), &s.token, None).await, StatusCode::CONFLICT).await;
    let reset = app.post(&format!("{path}/reset"), &s.token, &json!({"scope": "checkpoints"})).await;
    assert_eq!(reset.status(), StatusCode::OK);
    let bad = app.post(&format!("{path}/reset"), &s.token, &json!({"scope": "everything"})).await;
    assert_eq!(fields(&problem(bad, StatusCode::BAD_REQUEST).await), vec!["scope"]);
    assert_eq!(post_if(&app, &format!("{path}/run"), &s.token, None).await.status(), StatusCode::ACCEPTED);

    let conflicts: Value = app.get(&format!("{path}/conflicts"), &s.token).await.json().await.unwrap();
    assert_eq!(conflicts["items"], json!([]));
    let resolve = format!("{path}/conflicts/{}/resolve", uuid::Uuid::now_v7());
    problem(app.post(&resolve, &s.token, &json!({"winner": "provider"})).await, StatusCode::NOT_FOUND).await;
    for neither_or_both in [json!({}), json!({"winner": "platform", "value": {"/title": "x"}})] {
        let p = problem(app.post(&resolve, &s.token, &neither_or_both).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&p), vec!["winner"]);
    }
}

#[tokio::test]
async fn pause_and_resume() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let (created, etag) = create(&app, &s, &task(&s)).await;
    let path = format!("/api/v1/sync-tasks/{}", created["id"].as_str().unwrap());

    problem(post_if(&app, &format!("{path}/pause"), &s.token, Some("\"stale\"")).await, StatusCode::PRECONDITION_FAILED).await;
    let paused = post_if(&app, &format!("{path}/pause"), &s.token, Some(&etag)).await;
    assert_eq!(paused.status(), StatusCode::OK);
    let paused: Value = paused.json().await.unwrap();
    assert_eq!(paused["status"], "paused");
    assert!(paused["statusReason"].as_str().is_some_and(|r| r.contains("alice")), "{paused}");
    assert!(paused.get("nextRunAt").is_none(), "a paused task is not due: {paused}");
    problem(post_if(&app, &format!("{path}/run"), &s.token, None).await, StatusCode::CONFLICT).await;

    let resumed = post_if(&app, &format!("{path}/resume"), &s.token, None).await;
    assert_eq!(resumed.status(), StatusCode::OK);
    let resumed: Value = resumed.json().await.unwrap();
    assert_eq!(resumed["status"], "active");
    assert!(resumed.get("statusReason").is_none() && resumed["nextRunAt"].is_string(), "{resumed}");
}

#[tokio::test]
async fn another_tenant_sees_nothing() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let (created, etag) = create(&app, &s, &task(&s)).await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/api/v1/sync-tasks/{id}");
    let other = app.member();

    problem(app.get(&path, &other).await, StatusCode::NOT_FOUND).await;
    problem(app.put(&path, &other, &task(&s), Some(&etag)).await, StatusCode::NOT_FOUND).await;
    problem(app.delete(&path, &other, None).await, StatusCode::NOT_FOUND).await;
    for action in ["run", "pause", "resume", "cancel"] {
        problem(post_if(&app, &format!("{path}/{action}"), &other, None).await, StatusCode::NOT_FOUND).await;
    }
    problem(app.get(&format!("{path}/executions"), &other).await, StatusCode::NOT_FOUND).await;
    problem(app.get(&format!("{path}/conflicts"), &other).await, StatusCode::NOT_FOUND).await;
    let listed: Value = app.get("/api/v1/sync-tasks", &other).await.json().await.unwrap();
    assert_eq!(listed["items"], json!([]));

    // Another tenant's connection is not one the caller can name.
    let theirs = setup(&app).await;
    let mut body = task(&s);
    body["integrationId"] = json!(theirs.integration);
    body["connectionId"] = json!(theirs.connection);
    let p = problem(app.post("/api/v1/sync-tasks", &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["connectionId"]);

    problem(app.get("/api/v1/sync-tasks/not-a-uuid", &s.token).await, StatusCode::NOT_FOUND).await;
    let unknown = format!("{path}/executions/{}", uuid::Uuid::now_v7());
    problem(app.get(&unknown, &s.token).await, StatusCode::NOT_FOUND).await;
}
