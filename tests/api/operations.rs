use reqwest::Method;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{github, header, problem, spawn_app, workspace};

#[tokio::test]
async fn health_reports_each_dependency() {
    let app = spawn_app().await;
    let live = app.anonymous(Method::GET, "/health/live").send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let ready = app.anonymous(Method::GET, "/health/ready").send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    let store = body["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == "store").expect("the store is reported");
    assert_eq!(store["ready"], true);
}

/// Readiness answers without authentication: states only, no paths, URLs, user or host names.
#[tokio::test]
async fn readiness_reveals_no_paths_urls_or_user_names() {
    let app = spawn_app().await;
    let body = app.anonymous(Method::GET, "/health/ready").send().await.unwrap().text().await.unwrap();
    let data_dir = app.dir.path().display().to_string();
    for secret in
        [data_dir.as_str(), "integration-manager.db", ".db", "://", "guest", "127.0.0.1", "localhost", &app.settings.cosmos_db.endpoint]
    {
        assert!(secret.is_empty() || !body.contains(secret), "readiness shows {secret:?}: {body}");
    }
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["dependencies"].as_array().unwrap().iter().all(|d| d["detail"].is_string()), "{body}");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let token = app.member();
    let response = app.get("/api/v1/integrations", &token).await;
    assert!(uuid::Uuid::parse_str(&header(&response, "x-request-id")).is_ok());
    let response = app.request(Method::GET, "/api/v1/integrations", &token).header("x-request-id", "trace-abc-123").send().await.unwrap();
    assert_eq!(header(&response, "x-request-id"), "trace-abc-123", "a caller's id is kept");
    let response =
        app.request(Method::GET, "/api/v1/integrations", &token).header("x-request-id", "bad id with spaces").send().await.unwrap();
    assert_ne!(header(&response, "x-request-id"), "bad id with spaces", "an unsafe id is replaced");
    let response = app.post("/api/v1/integrations", &token, &serde_json::json!({})).await;
    assert!(!header(&response, "x-request-id").is_empty(), "errors carry it too");
}

#[tokio::test]
async fn unknown_routes_are_problem_404() {
    let app = spawn_app().await;
    let token = app.member();
    problem(app.get("/api/v1/nothing-here", &token).await, StatusCode::NOT_FOUND).await;
    problem(app.anonymous(Method::GET, "/").send().await.unwrap(), StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn data_survives_a_restart() {
    let app = spawn_app().await;
    let token = app.token("durable", "alice", &[im_domain::Role::Member]);
    let (created, etag) = app.create_github(&token, "kept").await;
    let path = format!("/api/v1/integrations/{}", created["id"].as_str().unwrap());
    let app = app.restart().await;
    let response = app.get(&path, &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "etag"), etag);
    assert_eq!(response.json::<Value>().await.unwrap(), created);
    assert_eq!(app.put(&path, &token, &github("still writable"), Some(&etag)).await.status(), StatusCode::OK);
}

/// The served document and the committed `docs/openapi.json` are the same; run with
/// `UPDATE_OPENAPI=1` to rewrite the committed one after an API change.
#[tokio::test]
async fn openapi_document_matches_the_committed_one() {
    let app = spawn_app().await;
    let served = app.anonymous(Method::GET, "/openapi.json").send().await.unwrap().text().await.unwrap();
    let path = workspace().join("docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &served).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(served == committed, "docs/openapi.json is stale: run `make openapi` and commit it");
    let doc: Value = serde_json::from_str(&served).unwrap();
    for path in ["/api/v1/integrations", "/api/v1/integrations/{id}", "/api/v1/providers", "/api/v1/providers/{id}", "/health/ready"] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
    // The documented request fields are the ones the API reads.
    let props: Vec<_> = doc["components"]["schemas"]["IntegrationInput"]["properties"].as_object().unwrap().keys().cloned().collect();
    for field in ["providerId", "name", "description", "status", "config", "customDefinition"] {
        assert!(props.contains(&field.to_owned()), "{field} documented");
    }
}

/// `/metrics` needs the configured token, and counts requests by route template and status.
#[tokio::test]
async fn metrics_count_requests_by_route_template_behind_the_token() {
    let app = crate::helpers::spawn_app_with(|s| s.metrics.token = "scrape-token-for-tests".to_owned().into()).await;
    let token = app.member();
    let (created, _) = app.create_github(&token, "metrics").await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(app.get(&format!("/api/v1/integrations/{id}"), &token).await.status(), StatusCode::OK);
    let refused = app.anonymous(Method::GET, "/metrics").send().await.unwrap();
    problem(refused, StatusCode::UNAUTHORIZED).await;
    let wrong = app.anonymous(Method::GET, "/metrics").header("Authorization", "Bearer another-token").send().await.unwrap();
    problem(wrong, StatusCode::UNAUTHORIZED).await;
    let scraped = app.anonymous(Method::GET, "/metrics").header("Authorization", "Bearer scrape-token-for-tests").send().await.unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    let text = scraped.text().await.unwrap();
    assert!(text.contains(r#"http_requests_total{method="GET",route="/api/v1/integrations/{id}",status="200"}"#), "{text}");
    assert!(text.contains(r#"http_request_duration_seconds_bucket{method="POST",route="/api/v1/integrations",status="201""#), "{text}");
    assert!(!text.contains(id), "route templates, never ids");
    assert!(text.contains("outbox_pending_events"), "{text}");
}

/// The readiness entry named `name`, if reported.
async fn dependency(app: &crate::helpers::TestApp, name: &str) -> Option<Value> {
    let body: Value = app.anonymous(Method::GET, "/health/ready").send().await.unwrap().json().await.unwrap();
    body["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == name).cloned()
}

/// With `logging.backend = "http"`, audit records are kept in the store while the Logging
/// Service is down (readiness shows the backlog) and arrive whole, with their request id, once
/// it is up; then the backlog is empty.
#[tokio::test]
async fn audit_records_wait_for_the_logging_service() {
    use im_testkit::audit::FakeLoggingService;
    let logging = FakeLoggingService::start("logging-token").await;
    logging.set_down(true);
    let url = logging.url();
    let app = crate::helpers::spawn_app_with(|s| {
        s.logging.backend = integration_manager::config::PlatformBackend::Http;
        s.logging.http.url = url;
        s.logging.http.token = "logging-token".into();
        s.logging.http.attempts = 1;
        s.logging.shipper.interval = integration_manager::config::HumanDuration::parse("100ms").unwrap();
        s.logging.shipper.max_backlog_age = integration_manager::config::HumanDuration::parse("1s").unwrap();
    })
    .await;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let member = app.token(&tenant, "alice", &[im_domain::Role::Member]);
    let viewer = app.token(&tenant, "victor", &[im_domain::Role::Viewer]);
    let created =
        app.request(Method::POST, "/api/v1/integrations", &member).header("x-request-id", "req-audit-1").json(&github("a")).send().await;
    assert_eq!(created.unwrap().status(), StatusCode::CREATED);
    let denied = app.post("/api/v1/integrations", &viewer, &github("b")).await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);

    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let backlog = dependency(&app, "audit_backlog").await.expect("the backlog is reported");
    assert_eq!(backlog["ready"], false, "older than logging.max_backlog_age: {backlog}");
    assert!(backlog["detail"].as_str().unwrap().starts_with("2 audit record(s) waiting"), "{backlog}");
    assert_eq!(dependency(&app, "logging_service").await.expect("the service is reported")["ready"], false);
    assert!(logging.records().is_empty());

    logging.set_down(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while logging.records().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the records never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let records: Vec<Value> = logging.records().into_values().filter(|r| r["tenantId"] == tenant.as_str()).collect();
    let outcomes: Vec<(&str, &str, &str)> =
        records.iter().map(|r| (r["action"].as_str().unwrap(), r["outcome"].as_str().unwrap(), r["actorId"].as_str().unwrap())).collect();
    assert!(outcomes.contains(&("integration.create", "succeeded", "alice")), "{records:?}");
    assert!(outcomes.contains(&("integration.create", "denied", "victor")), "{records:?}");
    let success = records.iter().find(|r| r["outcome"] == "succeeded").unwrap();
    assert_eq!(success["requestId"], "req-audit-1", "the request id rides along");
    assert!(success["resourceId"].as_str().is_some_and(|id| !id.is_empty()) && success["id"].is_string(), "{success}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let backlog = dependency(&app, "audit_backlog").await.unwrap();
        if backlog["detail"].as_str().unwrap().starts_with("0 audit record(s)") && backlog["ready"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "acknowledged records are deleted: {backlog}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// With `shard_manager.backend = "http"` the app talks to the configured Shard Manager and
/// readiness reports it.
#[tokio::test]
async fn the_http_shard_manager_is_wired_and_in_readiness() {
    use im_testkit::fake_shard_manager::FakeShardManager;
    let shards = FakeShardManager::start("shard-token").await;
    let url = shards.url();
    let app = crate::helpers::spawn_app_with(|s| {
        s.shard_manager.backend = integration_manager::config::PlatformBackend::Http;
        s.shard_manager.http.url = url;
        s.shard_manager.http.token = "shard-token".into();
    })
    .await;
    assert_eq!(dependency(&app, "shard_manager").await.expect("reported")["ready"], true);
    let write = im_domain::sync::ports::ShardWrite {
        data: serde_json::json!({"title": "x"}),
        version: None,
        updated_at: time::OffsetDateTime::now_utc(),
        source: "integration-1".into(),
    };
    let tenant = im_domain::TenantId::new("acme").unwrap();
    app.state.shards.put(&tenant, "ticket", "k1", &write, None).await.expect("a write through the configured adapter");
    assert_eq!(shards.record("acme", "ticket", "k1"), Some(serde_json::json!({"title": "x"})));
    assert!(dependency(&spawn_app().await, "shard_manager").await.is_none(), "the embedded one is the store's");
}
