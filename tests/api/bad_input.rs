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

/// Sends a POST of `body` in chunks of `chunk` bytes (chunked transfer coding: no length told
/// up front) and answers the status line and the body of the response.
async fn post_chunked(app: &crate::helpers::TestApp, token: &str, content_type: &str, body: &[u8], chunk: usize) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /api/v1/integrations HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The service may answer (413) and close before the rest is sent: what is left is dropped.
    let mut sending = Ok(());
    for part in body.chunks(chunk) {
        if sending.is_ok() {
            sending = async {
                stream.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await?;
                stream.write_all(part).await?;
                stream.write_all(b"\r\n").await?;
                stream.flush().await
            }
            .await;
        }
    }
    if sending.is_ok() {
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

#[tokio::test]
async fn a_body_in_chunks_is_read_whole_and_held_to_the_limit() {
    let app = spawn_app_with(|s| s.server.body_limit_bytes = 2048).await;
    let token = app.member();
    let body = github("chunked").to_string();
    // In one chunk, in several, and under a `+json` media type: all read as the same JSON.
    for (content_type, chunk) in [("application/json", body.len()), ("application/json", 7), ("application/vnd.api+json", 1)] {
        let (status, answer) = post_chunked(&app, &token, content_type, body.as_bytes(), chunk).await;
        assert!(status.contains(" 201 "), "{content_type} in chunks of {chunk}: {status} {answer}");
    }
    assert_eq!(count(&app, &token).await, 3);
    // Past the limit with no length told up front: refused as it arrives.
    let mut large = github("large");
    large["description"] = json!("a".repeat(3000));
    let (status, answer) = post_chunked(&app, &token, "application/json", large.to_string().as_bytes(), 500).await;
    assert!(status.contains(" 413 ") && answer.contains("2048"), "{status} {answer}");
    // Malformed JSON split across chunks is still a 400.
    let (status, _) = post_chunked(&app, &token, "application/json", b"{\"name\": ", 3).await;
    assert!(status.contains(" 400 "), "{status}");
    assert_eq!(count(&app, &token).await, 3);
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
