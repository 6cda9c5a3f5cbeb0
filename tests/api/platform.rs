//! What operators rely on: metrics after real activity, per-tenant rate limits and their
//! headers, `Idempotency-Key` on creates (on whichever store `IM_TEST_BACKEND` selects).

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{TestApp, fields, github, header, problem, spawn_app_with};

/// The value of the first sample whose line starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(app: &TestApp) -> String {
    let response = app.anonymous(Method::GET, "/metrics").send().await.expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("text")
}

/// An app that may deliver to receivers on loopback over HTTP.
async fn loopback_app() -> TestApp {
    spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
    })
    .await
}

/// A delivered webhook shows in the commit-to-receipt histogram; the secret store's calls, the
/// delivery queue and the dead letters are series with sane values.
#[tokio::test]
async fn metrics_show_receipt_latency_queue_depth_dead_letters_and_secret_calls() {
    let app = loopback_app().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(204)).mount(&receiver).await;
    let token = app.member();
    let created = app.post("/api/v1/webhooks", &token, &json!({"url": format!("{}/hook", receiver.uri())})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    app.create_github(&token, "metrics").await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&app).await;
        if sample(&text, "im_delivery_commit_to_success_seconds_count").is_some_and(|n| n >= 1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "no delivery was recorded: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let count = sample(&text, "im_delivery_commit_to_success_seconds_count").unwrap();
    let sum = sample(&text, "im_delivery_commit_to_success_seconds_sum").unwrap();
    assert!(sum >= 0.0 && sum / count < 60.0, "commit to receipt took {sum}s over {count} deliveries");
    for op in ["put", "get"] {
        let calls = sample(&text, &format!(r#"im_secret_store_request_duration_seconds_count{{op="{op}"}}"#));
        assert!(calls.is_some_and(|n| n >= 1.0), "secret store {op} timed: {text}");
    }
    assert!(sample(&text, "im_delivery_queue_depth").is_some_and(|n| n >= 0.0), "{text}");
    assert_eq!(sample(&text, "im_outbox_dead_letters"), Some(0.0), "{text}");
    assert!(text.contains(r#"webhook_delivery_attempts_total{outcome="delivered"}"#), "{text}");
}

/// With `metrics.port`, `/metrics` is served there and no longer on the API port.
#[tokio::test]
async fn metrics_move_to_their_own_port() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let app = spawn_app_with(|s| s.metrics.port = free).await;
    assert_eq!(app.get("/api/v1/integrations", &app.member()).await.status(), StatusCode::OK);
    problem(app.anonymous(Method::GET, "/metrics").send().await.unwrap(), StatusCode::NOT_FOUND).await;
    let scraped = app.client.get(format!("http://127.0.0.1:{free}/metrics")).send().await.unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("http_requests_total"));
    let other = app.client.get(format!("http://127.0.0.1:{free}/api/v1/integrations")).send().await.unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND, "the metrics port serves nothing else");
}

fn number(response: &reqwest::Response, name: &str) -> u64 {
    header(response, name).parse().unwrap_or_else(|_| panic!("{name} is a number"))
}

/// A tenant gets its burst, then 429 with `Retry-After` and `RateLimit-*`; another tenant and
/// the health endpoints are unaffected.
#[tokio::test]
async fn a_tenant_over_its_rate_limit_gets_429_with_the_headers() {
    let app = spawn_app_with(|s| s.rate_limits.per_tenant = integration_manager::config::TenantRateLimit { rate: 1, burst: 3 }).await;
    let (tenant, other) = (app.member(), app.member());
    let first = app.get("/api/v1/integrations", &tenant).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!((number(&first, "ratelimit-limit"), number(&first, "ratelimit-remaining")), (3, 2));
    assert!((1..=3).contains(&number(&first, "ratelimit-reset")));
    let mut refused = None;
    for _ in 0..20 {
        let response = app.get("/api/v1/integrations", &tenant).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let refused = refused.expect("the burst runs out");
    assert_eq!(number(&refused, "ratelimit-remaining"), 0);
    assert_eq!(number(&refused, "ratelimit-limit"), 3);
    assert!((1..=2).contains(&number(&refused, "retry-after")), "one request a second");
    assert!(number(&refused, "ratelimit-reset") >= 1);
    problem(refused, StatusCode::TOO_MANY_REQUESTS).await;

    let theirs = app.get("/api/v1/integrations", &other).await;
    assert_eq!((theirs.status(), number(&theirs, "ratelimit-remaining")), (StatusCode::OK, 2), "each tenant has its own bucket");
    let health = app.anonymous(Method::GET, "/health/live").send().await.unwrap();
    assert!(health.status().is_success() && health.headers().get("ratelimit-limit").is_none());

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.get("/api/v1/integrations", &tenant).await.status(), StatusCode::OK, "a token comes back each second");
}

/// By default there is no limit and no header.
#[tokio::test]
async fn without_a_rate_limit_no_headers_are_sent() {
    let app = spawn_app_with(|_| {}).await;
    let response = app.get("/api/v1/integrations", &app.member()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("ratelimit-limit").is_none());
}

async fn post_with_key(app: &TestApp, path: &str, token: &str, key: &str, body: &Value) -> reqwest::Response {
    app.request(Method::POST, path, token).header("Idempotency-Key", key).json(body).send().await.expect("request")
}

async fn count_integrations(app: &TestApp, token: &str) -> usize {
    let listed: Value = app.get("/api/v1/integrations", token).await.json().await.unwrap();
    listed["items"].as_array().unwrap().len()
}

/// The same key and body answer the first response again without a second create; another
/// body is 422 naming the header; another tenant's key is its own.
#[tokio::test]
async fn a_repeated_idempotency_key_replays_the_first_response() {
    let app = spawn_app_with(|_| {}).await;
    let (token, other) = (app.member(), app.member());
    let body = github("once");
    let first = post_with_key(&app, "/api/v1/integrations", &token, "create-once-1", &body).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let (location, etag) = (header(&first, "location"), header(&first, "etag"));
    assert!(first.headers().get("idempotent-replayed").is_none());
    let created: Value = first.json().await.unwrap();

    let again = post_with_key(&app, "/api/v1/integrations", &token, "create-once-1", &body).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(header(&again, "idempotent-replayed"), "true");
    assert_eq!((header(&again, "location"), header(&again, "etag")), (location, etag));
    assert_eq!(header(&again, "content-type"), "application/json");
    assert_eq!(again.json::<Value>().await.unwrap(), created, "the same body");
    assert_eq!(count_integrations(&app, &token).await, 1, "created once");

    let changed = post_with_key(&app, "/api/v1/integrations", &token, "create-once-1", &github("another")).await;
    let refused = problem(changed, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&refused), ["Idempotency-Key"]);
    let elsewhere = post_with_key(&app, "/api/v1/webhooks", &token, "create-once-1", &body).await;
    problem(elsewhere, StatusCode::UNPROCESSABLE_ENTITY).await;

    let theirs = post_with_key(&app, "/api/v1/integrations", &other, "create-once-1", &body).await;
    assert_eq!(theirs.status(), StatusCode::CREATED, "keys belong to a tenant");
    assert!(theirs.headers().get("idempotent-replayed").is_none());
    assert_ne!(theirs.json::<Value>().await.unwrap()["id"], created["id"]);

    let without = app.post("/api/v1/integrations", &token, &github("no-key")).await;
    assert_eq!(without.status(), StatusCode::CREATED);
    assert_eq!(count_integrations(&app, &token).await, 2);
}

/// A refused request keeps nothing: the same key runs again once the request is right.
#[tokio::test]
async fn a_failed_request_does_not_keep_its_key() {
    let app = spawn_app_with(|_| {}).await;
    let token = app.member();
    let invalid = json!({"providerId": "github", "name": "", "config": {"organization": "acme"}});
    let refused = post_with_key(&app, "/api/v1/integrations", &token, "retry-me", &invalid).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let fixed = post_with_key(&app, "/api/v1/integrations", &token, "retry-me", &github("fixed")).await;
    assert_eq!(fixed.status(), StatusCode::CREATED);
    assert!(fixed.headers().get("idempotent-replayed").is_none());
}

/// Concurrent duplicates: one creates, the others get the replay or 409 (in progress).
#[tokio::test]
async fn concurrent_duplicates_create_once() {
    let app = spawn_app_with(|_| {}).await;
    let token = app.member();
    let body = github("concurrent");
    let send = || post_with_key(&app, "/api/v1/integrations", &token, "same-time", &body);
    let (a, b, c, d, e, f) = tokio::join!(send(), send(), send(), send(), send(), send());
    let answers = [a, b, c, d, e, f];
    let statuses: Vec<StatusCode> = answers.iter().map(reqwest::Response::status).collect();
    assert!(statuses.iter().all(|s| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT), "{statuses:?}");
    let fresh = answers.iter().filter(|r| r.status() == StatusCode::CREATED && r.headers().get("idempotent-replayed").is_none()).count();
    assert_eq!(fresh, 1, "one request ran: {statuses:?}");
    assert_eq!(count_integrations(&app, &token).await, 1);
}

/// Every POST takes a key (a webhook here); a malformed key is 400.
#[tokio::test]
async fn keys_work_on_other_creates_and_are_checked() {
    let app = loopback_app().await;
    let token = app.member();
    let body = json!({"url": "http://127.0.0.1:9/hook"});
    let first = post_with_key(&app, "/api/v1/webhooks", &token, "hook-1", &body).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    assert!(first["secret"].as_str().is_some_and(|s| s.starts_with("whsec_")));
    let again = post_with_key(&app, "/api/v1/webhooks", &token, "hook-1", &body).await;
    assert_eq!(header(&again, "idempotent-replayed"), "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert!(again.get("secret").is_none(), "a kept answer holds no secret: {again}");
    let listed: Value = app.get("/api/v1/webhooks", &token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    let long = "k".repeat(256);
    problem(post_with_key(&app, "/api/v1/webhooks", &token, &long, &body).await, StatusCode::BAD_REQUEST).await;
}
