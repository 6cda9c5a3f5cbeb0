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
