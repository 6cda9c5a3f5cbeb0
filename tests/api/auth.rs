use im_domain::Role;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{github, header, problem, spawn_app};

#[tokio::test]
async fn missing_invalid_and_expired_tokens_are_401() {
    let app = spawn_app().await;
    let response = app.anonymous(Method::GET, "/api/v1/integrations").send().await.unwrap();
    assert_eq!(header(&response, "www-authenticate"), "Bearer");
    problem(response, StatusCode::UNAUTHORIZED).await;

    let response = app.anonymous(Method::GET, "/api/v1/integrations").header("authorization", "Basic YTpi").send().await.unwrap();
    problem(response, StatusCode::UNAUTHORIZED).await;
    let response = app.get("/api/v1/integrations", "not.a.jwt").await;
    assert!(header(&response, "www-authenticate").contains("invalid_token"));
    problem(response, StatusCode::UNAUTHORIZED).await;

    let jwt = integration_manager::startup::local_jwt(&app.settings).unwrap();
    let tenant = im_domain::TenantId::new("acme").unwrap();
    let user = im_domain::UserId::new("bob").unwrap();
    let expired = jwt.mint(&tenant, &user, &[Role::Member], -3600).unwrap();
    let body = problem(app.get("/api/v1/integrations", &expired).await, StatusCode::UNAUTHORIZED).await;
    assert!(body["detail"].as_str().unwrap().contains("expired"));

    let foreign = im_auth::LocalJwt::new(&[9u8; 32], Some("integration-manager".into()), None, 0)
        .unwrap()
        .mint(&tenant, &user, &[Role::Admin], 600)
        .unwrap();
    problem(app.get("/api/v1/integrations", &foreign).await, StatusCode::UNAUTHORIZED).await;

    for path in ["/api/v1/providers", "/api/v1/providers/github", "/api/v1/integrations/00000000-0000-0000-0000-000000000000"] {
        problem(app.anonymous(Method::GET, path).send().await.unwrap(), StatusCode::UNAUTHORIZED).await;
    }
}

#[tokio::test]
async fn roles_decide_what_a_caller_may_do() {
    let app = spawn_app().await;
    let member = app.token("acme", "alice", &[Role::Member]);
    let viewer = app.token("acme", "victor", &[Role::Viewer]);
    let nobody = app.token("acme", "nora", &[]);
    let (created, _) = app.create_github(&member, "shared").await;
    let path = format!("/api/v1/integrations/{}", created["id"].as_str().unwrap());

    // viewer: reads, never writes
    assert_eq!(app.get(&path, &viewer).await.status(), StatusCode::OK);
    assert_eq!(app.get("/api/v1/providers/github", &viewer).await.status(), StatusCode::OK);
    problem(app.post("/api/v1/integrations", &viewer, &github("x")).await, StatusCode::FORBIDDEN).await;
    problem(app.put(&path, &viewer, &github("x"), None).await, StatusCode::FORBIDDEN).await;
    problem(app.delete(&path, &viewer, None).await, StatusCode::FORBIDDEN).await;
    // a viewer's bad body is still a 403, not a hint about validation
    problem(app.request(Method::POST, "/api/v1/integrations", &viewer).json(&json!({"x": 1})).send().await.unwrap(), StatusCode::FORBIDDEN)
        .await;

    // no role: nothing
    problem(app.get(&path, &nobody).await, StatusCode::FORBIDDEN).await;

    // member: tenant writes, not the catalog
    let provider = json!({"id": "acme-tool", "name": "Acme", "category": "productivity", "authModes": ["bearer"], "apiBaseUrl": "https://api.acme.example", "docsUrl": "https://docs.acme.example"});
    problem(app.post("/api/v1/providers", &member, &provider).await, StatusCode::FORBIDDEN).await;
    problem(app.delete("/api/v1/providers/github", &member, None).await, StatusCode::FORBIDDEN).await;

    // admin: the catalog, and its own tenant
    let admin = app.token("acme", "root", &[Role::Admin]);
    assert_eq!(app.post("/api/v1/providers", &admin, &provider).await.status(), StatusCode::CREATED);
    assert_eq!(app.get(&path, &admin).await.status(), StatusCode::OK);
}
