use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{fields, header, problem, spawn_app};

fn acme_provider(id: &str) -> Value {
    json!({
        "id": id, "name": "Acme Tracker", "category": "project-management", "description": "Tracks acme things",
        "authModes": ["oauth2_authorization_code", "bearer"], "authorizationUrl": "https://acme.example/oauth/authorize", "tokenUrl": "https://acme.example/oauth/token",
        "defaultScopes": ["read"], "apiBaseUrl": "https://api.acme.example", "docsUrl": "https://docs.acme.example",
        "configSchema": {"type": "object", "properties": {"board": {"type": "string"}}, "required": ["board"], "additionalProperties": false},
        "capabilities": {"webhooks": true, "syncEntities": ["card"]}
    })
}

#[tokio::test]
async fn the_catalog_is_seeded_with_real_providers() {
    let app = spawn_app().await;
    let token = app.member();
    let mut all = Vec::new();
    let mut url = "/api/v1/providers?limit=7".to_owned();
    loop {
        let page: Value = app.get(&url, &token).await.json().await.unwrap();
        all.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["continuationToken"].as_str() {
            Some(next) => url = format!("/api/v1/providers?limit=7&continuationToken={next}"),
            None => break,
        }
    }
    assert!(all.len() >= 20, "{} providers", all.len());
    let github = all.iter().find(|p| p["id"] == "github").expect("github is seeded");
    assert_eq!(github["category"], "source-control");
    assert_eq!(github["authModes"], json!(["oauth2_authorization_code", "bearer"]));
    assert_eq!(github["authorizationUrl"], "https://github.com/login/oauth/authorize");
    assert_eq!(github["apiBaseUrl"], "https://api.github.com");
    assert_eq!(github["capabilities"]["webhooks"], true);

    let response = app.get("/api/v1/providers/stripe", &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!header(&response, "etag").is_empty());
    assert_eq!(response.json::<Value>().await.unwrap()["authModes"], json!(["bearer", "basic"]));
    let datadog: Value = app.get("/api/v1/providers/datadog", &token).await.json().await.unwrap();
    assert_eq!(datadog["apiKey"], json!({"in": "header", "name": "DD-API-KEY"}), "an API key provider says where the key goes");

    let scm: Value = app.get("/api/v1/providers?category=source-control", &token).await.json().await.unwrap();
    let ids: Vec<_> = scm["items"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    for id in ["bitbucket", "github", "gitlab"] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    assert!(scm["items"].as_array().unwrap().iter().all(|p| p["category"] == "source-control"));
    let keys: Value = app.get("/api/v1/providers?authMode=api_key&limit=200", &token).await.json().await.unwrap();
    let keys = keys["items"].as_array().unwrap();
    assert!(keys.iter().all(|p| p["authModes"].as_array().unwrap().contains(&json!("api_key"))));
    let ids: Vec<_> = keys.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert!(
        ids.contains(&"datadog") && ids.contains(&"linear"),
        "the filter matches providers that support the mode among others: {ids:?}"
    );
    assert!(!ids.contains(&"github"), "{ids:?}");
    let search: Value = app.get("/api/v1/providers?q=JIRA", &token).await.json().await.unwrap();
    assert!(search["items"].as_array().unwrap().iter().any(|p| p["id"] == "jira"));
    let bad = problem(app.get("/api/v1/providers?authMode=magic&category=Bad", &token).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad).len(), 2);
}

#[tokio::test]
async fn admins_manage_the_catalog() {
    let app = spawn_app().await;
    let admin = app.admin();
    let response = app.post("/api/v1/providers", &admin, &acme_provider("acme-tracker")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(header(&response, "location"), "/api/v1/providers/acme-tracker");
    let etag = header(&response, "etag");

    problem(app.post("/api/v1/providers", &admin, &acme_provider("acme-tracker")).await, StatusCode::CONFLICT).await;
    problem(app.post("/api/v1/providers", &admin, &acme_provider("github")).await, StatusCode::CONFLICT).await;

    // Integrations of the new provider follow its schema
    let member = app.member();
    let bad = problem(
        app.post("/api/v1/integrations", &member, &json!({"providerId": "acme-tracker", "name": "x"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), vec!["config.board"]);
    let ok =
        app.post("/api/v1/integrations", &member, &json!({"providerId": "acme-tracker", "name": "x", "config": {"board": "b1"}})).await;
    assert_eq!(ok.status(), StatusCode::CREATED);

    // Update moves it to another category; the id cannot change
    let mut moved = acme_provider("acme-tracker");
    moved["category"] = json!("productivity");
    let response = app.put("/api/v1/providers/acme-tracker", &admin, &moved, Some(&etag)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let new_etag = header(&response, "etag");
    let listed: Value = app.get("/api/v1/providers?category=productivity&q=acme", &admin).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    problem(app.put("/api/v1/providers/acme-tracker", &admin, &moved, Some(&etag)).await, StatusCode::PRECONDITION_FAILED).await;
    let bad = problem(
        app.put("/api/v1/providers/acme-tracker", &admin, &acme_provider("other-id"), None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), vec!["id"]);
    problem(app.put("/api/v1/providers/no-such", &admin, &acme_provider("no-such"), None).await, StatusCode::NOT_FOUND).await;

    assert_eq!(app.delete("/api/v1/providers/acme-tracker", &admin, Some(&new_etag)).await.status(), StatusCode::NO_CONTENT);
    problem(app.get("/api/v1/providers/acme-tracker", &admin).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn creates_follow_the_providers_current_schema() {
    let app = spawn_app().await;
    let (admin, member) = (app.admin(), app.member());
    let response = app.post("/api/v1/providers", &admin, &acme_provider("acme-versions")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let etag = header(&response, "etag");
    let create = |config: Value| json!({"providerId": "acme-versions", "name": "x", "config": config});
    // The first schema is compiled, and used
    assert_eq!(app.post("/api/v1/integrations", &member, &create(json!({"board": "b1"}))).await.status(), StatusCode::CREATED);
    let bad = problem(app.post("/api/v1/integrations", &member, &create(json!({}))).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["config.board"]);

    // A new version requires a team and no longer a board: a config valid for the old schema is
    // refused, and one the old schema refused is taken
    let mut changed = acme_provider("acme-versions");
    changed["configSchema"] = json!({"type": "object", "properties": {"team": {"type": "string"}}, "required": ["team"]});
    let response = app.put("/api/v1/providers/acme-versions", &admin, &changed, Some(&etag)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let etag = header(&response, "etag");
    let bad =
        problem(app.post("/api/v1/integrations", &member, &create(json!({"board": "b1"}))).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["config.team"]);
    assert_eq!(app.post("/api/v1/integrations", &member, &create(json!({"team": "t1"}))).await.status(), StatusCode::CREATED);

    // A deleted provider takes no more integrations
    assert_eq!(app.delete("/api/v1/providers/acme-versions", &admin, Some(&etag)).await.status(), StatusCode::NO_CONTENT);
    let bad =
        problem(app.post("/api/v1/integrations", &member, &create(json!({"team": "t1"}))).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["providerId"]);
}

#[tokio::test]
async fn invalid_providers_are_refused_with_every_field() {
    let app = spawn_app().await;
    let admin = app.admin();
    let body = json!({
        "id": "custom", "name": "", "category": "Not a slug", "authModes": ["oauth2_authorization_code"],
        "apiBaseUrl": "ftp://x", "docsUrl": "https://docs.example",
        "configSchema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    });
    let bad = problem(app.post("/api/v1/providers", &admin, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["category"], "a category that cannot be read is reported first");
    let mut body = body;
    body["category"] = json!("misc");
    let bad = problem(app.post("/api/v1/providers", &admin, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let f = fields(&bad);
    for wanted in ["id", "name", "authorizationUrl", "tokenUrl", "apiBaseUrl"] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }
    assert!(f.iter().any(|x| x.starts_with("configSchema")), "{f:?}");
    let bad =
        problem(app.post("/api/v1/providers", &admin, &json!({"id": "x1", "authModes": ["smoke-signals"]})).await, StatusCode::BAD_REQUEST)
            .await;
    let f = fields(&bad);
    for wanted in ["name", "category", "authModes[0]", "apiBaseUrl", "docsUrl"] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }
}

#[tokio::test]
async fn seeding_is_idempotent_and_keeps_admin_edits_across_restarts() {
    let app = spawn_app().await;
    let admin = app.admin();
    let before: Value = app.get("/api/v1/providers?limit=200", &admin).await.json().await.unwrap();
    let count = before["items"].as_array().unwrap().len();

    let mut github: Value = app.get("/api/v1/providers/github", &admin).await.json().await.unwrap();
    github["name"] = json!("GitHub (edited)");
    let github = github.as_object_mut().unwrap();
    github.remove("createdAt");
    github.remove("updatedAt");
    assert_eq!(app.put("/api/v1/providers/github", &admin, &Value::Object(github.clone()), None).await.status(), StatusCode::OK);
    assert_eq!(app.delete("/api/v1/providers/gitlab", &admin, None).await.status(), StatusCode::NO_CONTENT);

    let app = app.restart().await;
    let after: Value = app.get("/api/v1/providers?limit=200", &admin).await.json().await.unwrap();
    assert_eq!(after["items"].as_array().unwrap().len(), count - 1, "the restart re-created nothing and duplicated nothing");
    assert_eq!(app.get("/api/v1/providers/github", &admin).await.json::<Value>().await.unwrap()["name"], "GitHub (edited)");
    problem(app.get("/api/v1/providers/gitlab", &admin).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn providers_carry_a_verification_request_and_entities() {
    let app = spawn_app().await;
    let member = app.member();
    let github: Value = app.get("/api/v1/providers/github", &member).await.json().await.unwrap();
    assert_eq!(github["verification"], json!({"method": "GET", "path": "/user"}));
    assert_eq!(github["pagination"]["style"], "link");
    assert_eq!(github["entities"][0]["name"], "issue");
    let jira: Value = app.get("/api/v1/providers/jira", &member).await.json().await.unwrap();
    assert_eq!(jira["pagination"]["cursorParam"], "nextPageToken");

    let admin = app.admin();
    let mut acme = acme_provider("acme-entities");
    acme["verification"] = json!({"method": "POST", "path": "/graphql", "body": {"query": "{ viewer { id } }"}});
    acme["defaultHeaders"] = json!({"Acme-Version": "2026-01-01"});
    acme["pagination"] = json!({"style": "offset", "offsetParam": "startAt", "limitParam": "maxResults", "pageSize": 50});
    acme["entities"] = json!([{
        "name": "card", "idField": "id", "updatedAtField": "updated",
        "list": {"method": "GET", "path": "/boards/{board}/cards", "itemsPath": "values"},
        "get": {"method": "GET", "path": "/cards/{id}"}
    }]);
    let response = app.post("/api/v1/providers", &admin, &acme).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    for key in ["verification", "defaultHeaders", "pagination", "entities"] {
        assert_eq!(created[key], acme[key], "{key}");
    }

    // Every bad value is reported with its path, and nothing is written.
    let mut bad = acme_provider("acme-bad");
    bad["verification"] = json!({"method": "DELETE", "path": "/me", "body": {"x": 1}});
    bad["defaultHeaders"] = json!({"Authorization": "Bearer x"});
    bad["entities"] = json!([{"name": "ticket", "idField": "id", "list": {"method": "GET", "path": "/tickets"}}]);
    let problem = problem(app.post("/api/v1/providers", &admin, &bad).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let fields = fields(&problem);
    for f in ["verification.method", "verification.body", "defaultHeaders.Authorization", "pagination", "entities[0].name"] {
        assert!(fields.contains(&f.to_owned()), "{f} not in {fields:?}");
    }
    assert_eq!(app.get("/api/v1/providers/acme-bad", &member).await.status(), StatusCode::NOT_FOUND);
}
