//! Webhook endpoint management: signing secrets shown once, SSRF-safe destinations, filters.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{backend_is_cosmos, fields, header, problem, spawn_app};

fn endpoint(url: &str) -> Value {
    json!({"url": url, "description": "ops receiver", "eventTypes": ["integration.*"], "headers": {"X-Team": "platform"}, "rateLimitPerSecond": 20})
}

#[tokio::test]
async fn the_signing_secret_is_shown_once_and_never_stored_with_the_endpoint() {
    let app = spawn_app().await;
    let token = app.member();
    let response = app.post("/api/v1/webhooks", &token, &endpoint("https://hooks.example.com/im")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = header(&response, "location");
    let created: Value = response.json().await.unwrap();
    let secret = created["secret"].as_str().expect("the secret, once").to_owned();
    let signing = im_domain::webhooks::signature::SigningSecret::parse(&secret).expect("a whsec_ secret of 24-64 bytes");
    assert_eq!(signing.expose(), secret);
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["eventTypes"], json!(["integration.*"]));
    assert_eq!(created["headers"]["X-Team"], im_domain::webhooks::endpoint::HEADER_MASK, "header values are secrets");

    let read: Value = app.get(&location, &token).await.json().await.unwrap();
    assert!(read.get("secret").is_none(), "never again: {read}");
    let list: Value = app.get("/api/v1/webhooks", &token).await.json().await.unwrap();
    assert!(!list.to_string().contains(&secret), "not in listings");
    assert!(!read.to_string().contains("secretName"), "no internal references either");

    if !backend_is_cosmos() {
        assert!(app.dir.path().join("integration-manager.db").exists());
        assert!(!crate::helpers::database_contains(&app, &secret), "the database keeps only a reference");
    }
}

#[tokio::test]
async fn rotation_returns_a_new_secret_and_keeps_the_previous_one_for_the_grace_period() {
    let app = spawn_app().await;
    let token = app.member();
    let created: Value = app.post("/api/v1/webhooks", &token, &endpoint("https://hooks.example.com/im")).await.json().await.unwrap();
    let path = format!("/api/v1/webhooks/{}", created["id"].as_str().unwrap());
    let response = app.request(Method::POST, &format!("{path}/rotate-secret"), &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let rotated: Value = response.json().await.unwrap();
    assert_ne!(rotated["secret"], created["secret"]);
    let expires =
        time::OffsetDateTime::parse(rotated["previousSecretExpiresAt"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    let hours = (expires - time::OffsetDateTime::now_utc()).whole_hours();
    assert!((23..=24).contains(&hours), "24 h grace by default ({hours} h)");
    let read: Value = app.get(&path, &token).await.json().await.unwrap();
    assert!(read.get("secret").is_none());
}

#[tokio::test]
async fn destinations_filters_and_headers_are_validated_field_by_field() {
    let app = spawn_app().await;
    let token = app.member();
    let body = json!({
        "url": "http://hooks.example.com/plain",
        "eventTypes": ["integration.created", "webhook.delivered", "bogus.*"],
        "headers": {"webhook-signature": "forged", "Content-Type": "text/plain", "X-Fine": "ok"},
        "rateLimitPerSecond": 0
    });
    let bad = problem(app.post("/api/v1/webhooks", &token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let f = fields(&bad);
    for wanted in ["url", "eventTypes[1]", "eventTypes[2]", "headers.webhook-signature", "headers.Content-Type", "rateLimitPerSecond"] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }
    assert!(!f.contains(&"headers.X-Fine".to_owned()));

    for refused in [
        "https://127.0.0.1/h",
        "https://10.0.0.8/h",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/h",
        "https://[::ffff:192.168.0.1]/h",
        "https://100.64.1.1/h",
        "https://0.0.0.0/h",
    ] {
        let bad = problem(app.post("/api/v1/webhooks", &token, &json!({"url": refused})).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&bad), vec!["url"], "{refused}");
        assert!(bad["errors"][0]["message"].as_str().unwrap().contains("not an allowed destination"), "{bad}");
    }
    let bad = problem(app.post("/api/v1/webhooks", &token, &json!({"url": 5, "extra": true})).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(fields(&bad).len(), 2);
    let list: Value = app.get("/api/v1/webhooks", &token).await.json().await.unwrap();
    assert!(list["items"].as_array().unwrap().is_empty(), "nothing was written");
}

#[tokio::test]
async fn the_private_allowlist_opens_exceptions() {
    let app = crate::helpers::spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
    })
    .await;
    let token = app.member();
    assert_eq!(app.post("/api/v1/webhooks", &token, &json!({"url": "http://127.0.0.1:9000/hook"})).await.status(), StatusCode::CREATED);
    problem(app.post("/api/v1/webhooks", &token, &json!({"url": "http://10.0.0.1/hook"})).await, StatusCode::UNPROCESSABLE_ENTITY).await;
}

/// The destination is judged as the sender reads the URL (WHATWG rules), at creation and at update.
#[tokio::test]
async fn every_spelling_of_an_internal_address_is_refused_even_over_plain_http() {
    let app = crate::helpers::spawn_app_with(|s| s.webhooks.sender.allow_http = true).await;
    let token = app.member();
    let created: Value = app.post("/api/v1/webhooks", &token, &endpoint("http://hooks.example.com/a")).await.json().await.unwrap();
    let path = format!("/api/v1/webhooks/{}", created["id"].as_str().unwrap());
    let port = app.address.rsplit(':').next().unwrap().to_owned();
    for host in [
        "127.1",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "0",
        "127.0.0.1.",
        "localhost",
        "0xa9fea9fe",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "[2001::1]",
        "[fec0::1]",
        "[fe80::1]",
        "[fd00::1]",
    ] {
        let url = format!("http://{host}:{port}/hook");
        let bad = problem(app.post("/api/v1/webhooks", &token, &json!({"url": url})).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&bad), vec!["url"], "create {url}");
        let bad = problem(app.put(&path, &token, &json!({"url": url}), None).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&bad), vec!["url"], "update {url}");
    }
    let list: Value = app.get("/api/v1/webhooks", &token).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "nothing else was written");
    assert_eq!(list["items"][0]["url"], "http://hooks.example.com/a", "the update was refused");
}

#[tokio::test]
async fn urls_with_credentials_are_refused() {
    let app = spawn_app().await;
    let token = app.member();
    for url in ["https://user:s3cr3t-pw@hooks.example.com/a", "https://user@hooks.example.com/a"] {
        let bad = problem(app.post("/api/v1/webhooks", &token, &json!({"url": url})).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&bad), vec!["url"], "{url}");
        assert!(!bad.to_string().contains("s3cr3t-pw"), "the problem does not echo the password: {bad}");
    }
}

#[tokio::test]
async fn endpoints_are_tenant_scoped_and_concurrency_controlled() {
    let app = spawn_app().await;
    let (owner, stranger) = (app.member(), app.member());
    let response = app.post("/api/v1/webhooks", &owner, &endpoint("https://hooks.example.com/a")).await;
    let etag = header(&response, "etag");
    let created: Value = response.json().await.unwrap();
    let path = format!("/api/v1/webhooks/{}", created["id"].as_str().unwrap());
    problem(app.get(&path, &stranger).await, StatusCode::NOT_FOUND).await;
    problem(app.delete(&path, &stranger, None).await, StatusCode::NOT_FOUND).await;
    problem(app.request(Method::POST, &format!("{path}/rotate-secret"), &stranger).send().await.unwrap(), StatusCode::NOT_FOUND).await;
    problem(app.get("/api/v1/webhooks/not-a-uuid", &owner).await, StatusCode::NOT_FOUND).await;

    let mut change = endpoint("https://hooks.example.com/b");
    change["status"] = json!("disabled");
    let response = app.put(&path, &owner, &change, Some(&etag)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.unwrap();
    assert_eq!((updated["status"].as_str(), updated["disabledReason"].as_str()), (Some("disabled"), Some("disabled by a user")));
    problem(app.put(&path, &owner, &change, Some(&etag)).await, StatusCode::PRECONDITION_FAILED).await;
    change["status"] = json!("enabled");
    let enabled: Value = app.put(&path, &owner, &change, None).await.json().await.unwrap();
    assert!(enabled["disabledReason"].is_null(), "re-enabling clears the reason");
    let viewer = app.token("x", "v", &[im_domain::Role::Viewer]);
    problem(app.post("/api/v1/webhooks", &viewer, &endpoint("https://hooks.example.com/a")).await, StatusCode::FORBIDDEN).await;
    assert_eq!(app.delete(&path, &owner, None).await.status(), StatusCode::NO_CONTENT);
    problem(app.get(&path, &owner).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn a_tenant_has_at_most_the_configured_number_of_endpoints() {
    let app = crate::helpers::spawn_app_with(|s| s.webhooks.service.max_endpoints_per_tenant = 2).await;
    let token = app.member();
    for n in 0..2 {
        let created = app.post("/api/v1/webhooks", &token, &json!({"url": format!("https://hooks.example.com/{n}")})).await;
        assert_eq!(created.status(), StatusCode::CREATED);
    }
    let refused =
        problem(app.post("/api/v1/webhooks", &token, &json!({"url": "https://hooks.example.com/3"})).await, StatusCode::CONFLICT).await;
    assert!(refused["detail"].as_str().unwrap_or_default().contains("at most 2 webhook endpoints"), "{refused}");
    let other = app.member();
    let created = app.post("/api/v1/webhooks", &other, &json!({"url": "https://hooks.example.com/other"})).await;
    assert_eq!(created.status(), StatusCode::CREATED, "the cap is per tenant");
}
