use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{custom_definition, fields, github, header, problem, spawn_app};

#[tokio::test]
async fn create_read_update_delete() {
    let app = spawn_app().await;
    let token = app.member();

    // Create
    let response = app.post("/api/v1/integrations", &token, &github("Acme GitHub")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = header(&response, "location");
    let etag = header(&response, "etag");
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/integrations/{id}"));
    assert_eq!(created["providerId"], "github");
    assert_eq!(created["status"], "active", "new integrations are active");
    assert_eq!(created["createdBy"], "alice");
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert!(created["tenantId"].as_str().unwrap().starts_with("t-"));
    for key in ["createdAt", "updatedAt"] {
        assert!(created[key].as_str().unwrap().ends_with('Z'), "{key} is RFC 3339 UTC");
    }

    // Read
    let response = app.get(&location, &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "etag"), etag);
    assert_eq!(response.json::<Value>().await.unwrap(), created);
    let response = app.request(reqwest::Method::GET, &location, &token).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

    // Update with the current ETag
    let mut change = github("Renamed");
    change["status"] = json!("inactive");
    change["description"] = json!("the org's repositories");
    let response = app.put(&location, &token, &change, Some(&etag)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let new_etag = header(&response, "etag");
    assert_ne!(new_etag, etag);
    let updated: Value = response.json().await.unwrap();
    assert_eq!((updated["name"].as_str(), updated["status"].as_str()), (Some("Renamed"), Some("inactive")));
    assert_eq!(updated["createdAt"], created["createdAt"]);

    // A stale ETag is refused and changes nothing
    let problem_body =
        problem(app.put(&location, &token, &github("Lost update"), Some(&etag)).await, StatusCode::PRECONDITION_FAILED).await;
    assert!(problem_body["detail"].as_str().unwrap().contains("modified"));
    assert_eq!(app.get(&location, &token).await.json::<Value>().await.unwrap()["name"], "Renamed");
    problem(app.delete(&location, &token, Some(&etag)).await, StatusCode::PRECONDITION_FAILED).await;

    // Without If-Match the update applies to the current version; status is kept when absent
    let response = app.put(&location, &token, &github("Unconditional"), None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let latest = header(&response, "etag");
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "inactive");

    // Delete
    assert_eq!(app.delete(&location, &token, Some(&latest)).await.status(), StatusCode::NO_CONTENT);
    problem(app.get(&location, &token).await, StatusCode::NOT_FOUND).await;
    problem(app.delete(&location, &token, None).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn list_pages_and_filters() {
    let app = spawn_app().await;
    let token = app.member();
    let mut ids = Vec::new();
    for i in 0..5 {
        let (body, _) = app.create_github(&token, &format!("gh {i}")).await;
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let jira = json!({"providerId": "jira", "name": "Jira", "status": "inactive", "config": {"siteUrl": "https://acme.atlassian.net"}});
    let response = app.post("/api/v1/integrations", &token, &jira).await;
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().await.unwrap());

    let mut seen = Vec::new();
    let mut url = "/api/v1/integrations?limit=2&providerId=github".to_owned();
    for _ in 0..10 {
        let page: Value = app.get(&url, &token).await.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        match page["continuationToken"].as_str() {
            Some(next) => url = format!("/api/v1/integrations?limit=2&providerId=github&continuationToken={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every GitHub integration once, oldest first");

    let inactive: Value = app.get("/api/v1/integrations?status=inactive", &token).await.json().await.unwrap();
    assert_eq!(inactive["items"].as_array().unwrap().len(), 1);
    assert_eq!(inactive["items"][0]["providerId"], "jira");
    let all: Value = app.get("/api/v1/integrations", &token).await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 6);
    assert!(all["continuationToken"].is_null());

    let bad = problem(
        app.get("/api/v1/integrations?limit=500&status=broken&continuationToken=zzz", &token).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let f = fields(&bad);
    assert!(f.contains(&"limit".to_owned()) && f.contains(&"status".to_owned()), "{f:?}");
    problem(app.get("/api/v1/integrations?limit=ten", &token).await, StatusCode::BAD_REQUEST).await;
    let bad = problem(app.get("/api/v1/integrations?continuationToken=forged", &token).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(fields(&bad), vec!["continuationToken"]);
    // Tokens shaped like the stores' own, with crafted contents: a 4xx naming the field, never a 5xx.
    for crafted in ["c1.", "c1.eyJ0b2tlbiI6MX0", "c1.%FF%FE", "c1.W10", "s1.", "s1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAc1.W10"] {
        let response = app.get(&format!("/api/v1/integrations?providerId=github&continuationToken={crafted}"), &token).await;
        let bad = problem(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(fields(&bad), vec!["continuationToken"], "{crafted}");
    }
}

#[tokio::test]
async fn another_tenants_integration_is_not_found() {
    let app = spawn_app().await;
    let (owner, stranger) = (app.member(), app.member());
    let (created, etag) = app.create_github(&owner, "private").await;
    let path = format!("/api/v1/integrations/{}", created["id"].as_str().unwrap());

    let body = problem(app.get(&path, &stranger).await, StatusCode::NOT_FOUND).await;
    assert!(!body.to_string().contains("private"), "nothing of the resource leaks");
    problem(app.put(&path, &stranger, &github("hijack"), None).await, StatusCode::NOT_FOUND).await;
    problem(app.put(&path, &stranger, &github("hijack"), Some(&etag)).await, StatusCode::NOT_FOUND).await;
    problem(app.delete(&path, &stranger, None).await, StatusCode::NOT_FOUND).await;
    let list: Value = app.get("/api/v1/integrations", &stranger).await.json().await.unwrap();
    assert!(list["items"].as_array().unwrap().is_empty());
    assert_eq!(app.get(&path, &owner).await.json::<Value>().await.unwrap()["name"], "private", "untouched");
}

#[tokio::test]
async fn custom_api_integrations() {
    let app = spawn_app().await;
    let token = app.member();
    let body = json!({"providerId": "custom", "name": "Ticketing", "customDefinition": custom_definition()});
    let response = app.post("/api/v1/integrations", &token, &body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["customDefinition"], custom_definition(), "the definition round-trips");

    // Missing definition
    let bad = problem(
        app.post("/api/v1/integrations", &token, &json!({"providerId": "custom", "name": "x"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), vec!["customDefinition"]);

    // Every invalid field of a definition is listed with its path
    let mut definition = custom_definition();
    definition["baseUrl"] = json!("http://insecure.example.com");
    definition["auth"] = json!({"type": "oauth2_client_credentials", "tokenUrl": "not a url"});
    definition["pagination"] = json!({"style": "offset", "offsetParam": "offset", "limitParam": "limit", "pageSize": 0});
    definition["entities"][0]["get"]["path"] = json!("/tickets");
    definition["entities"][0]["name"] = json!("Bad Name");
    let bad = problem(
        app.post("/api/v1/integrations", &token, &json!({"providerId": "custom", "name": "x", "customDefinition": definition})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let f = fields(&bad);
    for wanted in [
        "customDefinition.baseUrl",
        "customDefinition.auth.tokenUrl",
        "customDefinition.pagination.pageSize",
        "customDefinition.entities[0].get.path",
        "customDefinition.entities[0].name",
    ] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }

    // A structural error inside the definition names its path
    let mut definition = custom_definition();
    definition["auth"] = json!({"type": "api_key", "in": "header", "name": "X", "secret": "oops"});
    let bad = problem(
        app.post("/api/v1/integrations", &token, &json!({"providerId": "custom", "name": "x", "customDefinition": definition})).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(fields(&bad)[0].starts_with("customDefinition.auth"), "{bad}");

    // A catalog integration cannot carry a definition
    let mut gh = github("x");
    gh["customDefinition"] = custom_definition();
    let bad = problem(app.post("/api/v1/integrations", &token, &gh).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["customDefinition"]);
}

#[tokio::test]
async fn config_is_checked_against_the_providers_schema() {
    let app = spawn_app().await;
    let token = app.member();
    let body = json!({"providerId": "github", "name": "gh", "config": {"repositories": ["not a repo path", 3], "colour": "blue"}});
    let bad = problem(app.post("/api/v1/integrations", &token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let f = fields(&bad);
    for wanted in ["config.organization", "config.repositories[0]", "config.repositories[1]"] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }
    assert!(f.iter().any(|x| x.starts_with("config")) && f.len() >= 4, "additional property reported too: {f:?}");
}

#[tokio::test]
async fn domain_rules_on_update() {
    let app = spawn_app().await;
    let token = app.member();
    let (created, _) = app.create_github(&token, "gh").await;
    let path = format!("/api/v1/integrations/{}", created["id"].as_str().unwrap());
    let jira = json!({"providerId": "jira", "name": "x", "config": {"siteUrl": "https://a.atlassian.net"}});
    let bad = problem(app.put(&path, &token, &jira, None).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["providerId"], "the provider cannot change");
    let mut error_status = github("x");
    error_status["status"] = json!("error");
    let bad = problem(app.put(&path, &token, &error_status, None).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["status"], "'error' is the service's to set");
    let bad = problem(
        app.post("/api/v1/integrations", &token, &json!({"providerId": "no-such-tool", "name": "x"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), vec!["providerId"]);
    assert!(bad["errors"][0]["message"].as_str().unwrap().contains("no-such-tool"));
}

#[tokio::test]
async fn concurrent_unconditional_updates_lose_nothing() {
    let app = spawn_app().await;
    let token = app.member();
    let (created, _) = app.create_github(&token, "gh").await;
    let path = format!("/api/v1/integrations/{}", created["id"].as_str().unwrap());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (client, url, token) = (app.client.clone(), format!("{}{path}", app.address), token.clone());
        tasks.push(tokio::spawn(async move {
            client.put(url).bearer_auth(token).json(&github(&format!("writer {i}"))).send().await.unwrap().status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK, "every unconditional update applies");
    }
}
