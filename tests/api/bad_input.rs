//! Bad input never gets a 500 and never writes anything.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{fields, github, problem, spawn_app, spawn_app_with};

async fn count(app: &crate::helpers::TestApp, token: &str) -> usize {
    app.get("/api/v1/integrations", token).await.json::<Value>().await.unwrap()["items"].as_array().unwrap().len()
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    let token = app.member();
    let response = app
        .request(Method::POST, "/api/v1/integrations", &token)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::BAD_REQUEST).await;
    assert!(body["detail"].as_str().unwrap().contains("JSON"));
    let response = app.request(Method::POST, "/api/v1/integrations", &token).json(&json!([1, 2])).send().await.unwrap();
    problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(count(&app, &token).await, 0);
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let app = spawn_app().await;
    let token = app.member();
    let body = github("x").to_string();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut req = app.request(Method::POST, "/api/v1/integrations", &token).body(body.clone());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        problem(req.send().await.unwrap(), StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    }
    assert_eq!(count(&app, &token).await, 0);
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let app = spawn_app().await;
    let token = app.member();
    let mut body = github("x");
    body["description"] = json!("a".repeat(1024 * 1024 + 1));
    problem(app.post("/api/v1/integrations", &token, &body).await, StatusCode::PAYLOAD_TOO_LARGE).await;

    let small = spawn_app_with(|s| s.server.body_limit_bytes = 2048).await;
    let token = small.member();
    let mut body = github("x");
    body["description"] = json!("a".repeat(3000));
    let response = problem(small.post("/api/v1/integrations", &token, &body).await, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(response["detail"].as_str().unwrap().contains("2048"));
}

#[tokio::test]
async fn structural_problems_are_400_listing_every_field() {
    let app = spawn_app().await;
    let token = app.member();
    let body = json!({"name": 42, "config": "not an object", "colour": "red", "owner": {}, "status": "paused"});
    let bad = problem(app.post("/api/v1/integrations", &token, &body).await, StatusCode::BAD_REQUEST).await;
    let f = fields(&bad);
    for wanted in ["providerId", "name", "config", "colour", "owner", "status"] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }
    let codes: Vec<_> = bad["errors"].as_array().unwrap().iter().map(|e| e["code"].as_str().unwrap().to_owned()).collect();
    assert!(
        codes.contains(&"unknown_field".to_owned()) && codes.contains(&"required".to_owned()) && codes.contains(&"invalid_type".to_owned())
    );
    assert_eq!(count(&app, &token).await, 0, "nothing was written");
}

#[tokio::test]
async fn invalid_values_are_422_listing_every_field() {
    let app = spawn_app().await;
    let token = app.member();
    let body = json!({"providerId": "github", "name": "n".repeat(101), "description": "d".repeat(1001), "config": {"organization": ""}});
    let bad = problem(app.post("/api/v1/integrations", &token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let f = fields(&bad);
    for wanted in ["name", "description", "config.organization"] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }
    let body = json!({"providerId": "Not A Slug", "name": "x"});
    let bad = problem(app.post("/api/v1/integrations", &token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&bad), vec!["providerId"]);
    assert_eq!(count(&app, &token).await, 0, "nothing was written");
}

#[tokio::test]
async fn ids_that_are_not_uuids_are_404() {
    let app = spawn_app().await;
    let token = app.member();
    for id in ["not-a-uuid", "123", "%20", "00000000-0000-0000-0000-00000000000g"] {
        let path = format!("/api/v1/integrations/{id}");
        problem(app.get(&path, &token).await, StatusCode::NOT_FOUND).await;
        problem(app.delete(&path, &token, None).await, StatusCode::NOT_FOUND).await;
    }
    problem(app.get(&format!("/api/v1/integrations/{}", uuid::Uuid::new_v4()), &token).await, StatusCode::NOT_FOUND).await;
    problem(app.get("/api/v1/providers/NOT_A_SLUG", &token).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn bad_if_match_is_400() {
    let app = spawn_app().await;
    let token = app.member();
    let (created, _) = app.create_github(&token, "x").await;
    let path = format!("/api/v1/integrations/{}", created["id"].as_str().unwrap());
    problem(app.put(&path, &token, &github("y"), Some("unquoted")).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(app.put(&path, &token, &github("y"), Some("*")).await.status(), StatusCode::OK, "* matches any version");
}

/// A catalogue of hostile bodies: every answer is a 4xx problem, none a 500, nothing written.
#[tokio::test]
async fn no_client_input_produces_a_500() {
    let app = spawn_app().await;
    let token = app.member();
    let deep = (0..200).fold(json!(1), |acc, _| json!([acc]));
    let bodies = vec![
        json!(null),
        json!("string"),
        json!(12),
        json!({}),
        json!({"providerId": null, "name": null}),
        json!({"providerId": "github", "name": "x", "config": deep}),
        json!({"providerId": "github", "name": "x", "config": {"organization": 1e308}}),
        json!({"providerId": "custom", "name": "x", "customDefinition": "text"}),
        json!({"providerId": "custom", "name": "x", "customDefinition": {"entities": [null]}}),
        json!({"providerId": "github", "name": "\u{0000}\u{0007}"}),
        json!({"providerId": "github", "name": "x", "status": 5}),
        json!({"providerId": "a".repeat(10_000), "name": "x"}),
    ];
    for body in bodies {
        let response = app.post("/api/v1/integrations", &token, &body).await;
        let status = response.status();
        assert!(status.is_client_error(), "{body}: {status}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    let bad_utf8 = app
        .request(Method::POST, "/api/v1/integrations", &token)
        .header("content-type", "application/json")
        .body(vec![0xff, 0xfe, 0x7b])
        .send()
        .await
        .unwrap();
    problem(bad_utf8, StatusCode::BAD_REQUEST).await;
    assert_eq!(count(&app, &token).await, 0, "nothing was written");
}
