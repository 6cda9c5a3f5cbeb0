//! The Shard Manager adapter against the test kit's fake Shard Manager (the port's conformance
//! suite), and against local mocks for request shape, error mapping, timeouts and retries.

use std::time::{Duration, Instant};

use im_domain::ports::HealthCheck as _;
use im_domain::sync::ports::{ShardManager as _, ShardWrite};
use im_domain::{DomainError, TenantId};
use im_shard_http::{HttpShardManager, HttpShardSettings};
use im_testkit::fake_shard_manager::{FakeShardManager, ShardFault};
use serde_json::json;
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn client(url: &str) -> HttpShardManager {
    HttpShardManager::new(HttpShardSettings::for_tests(url)).unwrap()
}

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn write() -> ShardWrite {
    ShardWrite {
        data: json!({"title": "Fix the build"}),
        version: Some("17".into()),
        updated_at: time::macros::datetime!(2026-01-01 12:00 UTC),
        source: "integration-1".into(),
    }
}

#[tokio::test]
async fn passes_the_shard_manager_contract_against_the_fake_service() {
    let fake = FakeShardManager::start("service-token").await;
    im_testkit::sync::shard_manager(&client(&fake.url())).await;
}

#[tokio::test]
async fn put_sends_the_record_with_the_token_and_if_match() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/api/v1/tenants/acme/shards/ticket/PROJ-1%2F2"))
        .and(header("authorization", "Bearer service-token"))
        .and(header("if-match", "v3"))
        .and(body_json(json!({
            "data": {"title": "Fix the build"}, "version": "17", "updatedAt": "2026-01-01T12:00:00Z", "source": "integration-1"
        })))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"key": "PROJ-1/2", "version": 4, "updatedAt": "2026-01-01T12:00:00Z"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let written = client(&server.uri()).put(&tenant(), "ticket", "PROJ-1/2", &write(), Some("v3".into())).await.unwrap();
    assert_eq!((written.key.as_str(), written.version.as_str()), ("PROJ-1/2", "4"), "a numeric version is opaque text");
}

#[tokio::test]
async fn changes_send_the_cursor_and_limit_and_read_tombstones() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/tenants/acme/shards/ticket"))
        .and(query_param("changedSince", "c9"))
        .and(query_param("limit", "50"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "items": [
                {"key": "a", "data": {"x": 1}, "version": "v10", "updatedAt": "2026-01-01T12:00:00Z", "deleted": false, "source": "i-1"},
                {"key": "b", "data": {"stale": true}, "version": "v11", "updatedAt": "2026-01-01T12:00:01Z", "deleted": true}
            ],
            "nextCursor": "c11"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let page = client(&server.uri()).changes(&tenant(), "ticket", Some("c9".into()), 50).await.unwrap();
    assert_eq!(page.next_cursor, "c11");
    assert_eq!((page.items[0].source.as_deref(), page.items[0].deleted), (Some("i-1"), false));
    assert!(page.items[1].deleted && page.items[1].data.is_null(), "a tombstone carries no data");
}

/// One mock answering `status` (with `headers`) to every request, and the adapter's error.
async fn answer_with(template: ResponseTemplate, call: &str) -> (Result<(), DomainError>, usize, Duration) {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any()).respond_with(template).mount(&server).await;
    let shards = client(&server.uri());
    let started = Instant::now();
    let result = match call {
        "put" => shards.put(&tenant(), "ticket", "k", &write(), None).await.map(drop),
        "put-if-match" => shards.put(&tenant(), "ticket", "k", &write(), Some("v1".into())).await.map(drop),
        "changes" => shards.changes(&tenant(), "ticket", Some("c1".into()), 10).await.map(drop),
        "delete" => shards.delete(&tenant(), "ticket", "k").await,
        other => panic!("no call {other}"),
    };
    let requests = server.received_requests().await.map_or(0, |r| r.len());
    (result, requests, started.elapsed())
}

#[tokio::test]
async fn refused_tokens_are_a_configuration_error_not_retried() {
    for status in [401, 403] {
        let (result, requests, _) = answer_with(ResponseTemplate::new(status), "put").await;
        match result {
            Err(DomainError::Unexpected(e)) => assert!(e.to_string().contains("shard_manager.token"), "{e}"),
            other => panic!("{status}: expected a configuration error, got {other:?}"),
        }
        assert_eq!(requests, 1, "{status} is not retried");
    }
}

#[tokio::test]
async fn not_found_depends_on_the_call() {
    let (put, ..) = answer_with(ResponseTemplate::new(404), "put").await;
    assert!(matches!(&put, Err(DomainError::Validation(v)) if v[0].field == "shardType"), "{put:?}");
    let (conditional, ..) = answer_with(ResponseTemplate::new(404), "put-if-match").await;
    assert!(matches!(conditional, Err(DomainError::PreconditionFailed)), "If-Match on a missing record: {conditional:?}");
    let (delete, ..) = answer_with(ResponseTemplate::new(404), "delete").await;
    assert!(delete.is_ok(), "a missing record is deleted already: {delete:?}");
}

#[tokio::test]
async fn conflicts_are_stale_versions_when_conditional_and_retried_otherwise() {
    let (conditional, requests, _) = answer_with(ResponseTemplate::new(409), "put-if-match").await;
    assert!(matches!(conditional, Err(DomainError::PreconditionFailed)), "{conditional:?}");
    assert_eq!(requests, 1);
    let (unconditional, requests, _) = answer_with(ResponseTemplate::new(409), "put").await;
    assert!(matches!(unconditional, Err(DomainError::Unavailable { .. })), "{unconditional:?}");
    assert_eq!(requests, 3, "a write that met another is tried again");
    let (precondition, requests, _) = answer_with(ResponseTemplate::new(412), "put-if-match").await;
    assert!(matches!(precondition, Err(DomainError::PreconditionFailed)) && requests == 1, "{precondition:?}");
}

#[tokio::test]
async fn refusals_name_the_fields_of_the_problem() {
    let body = json!({"title": "invalid", "errors": [{"pointer": "/data/title", "detail": "is too long"}]});
    let (result, requests, _) = answer_with(ResponseTemplate::new(422).set_body_json(body), "put").await;
    match result {
        Err(DomainError::Validation(v)) => assert_eq!((v[0].field.as_str(), v[0].message.as_str()), ("data.title", "is too long")),
        other => panic!("{other:?}"),
    }
    assert_eq!(requests, 1);
    let (cursor, ..) = answer_with(ResponseTemplate::new(400), "changes").await;
    assert!(matches!(&cursor, Err(DomainError::Validation(v)) if v[0].field == "cursor"), "{cursor:?}");
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after_then_unavailable_with_it() {
    let (result, requests, elapsed) = answer_with(ResponseTemplate::new(429).insert_header("retry-after", "1"), "changes").await;
    assert!(matches!(result, Err(DomainError::Unavailable { retry_after: Some(d), .. }) if d == Duration::from_secs(1)), "{result:?}");
    assert_eq!(requests, 3);
    assert!(elapsed >= Duration::from_secs(2), "waited Retry-After before each retry: {elapsed:?}");
    let (long, requests, _) = answer_with(ResponseTemplate::new(429).insert_header("retry-after", "120"), "changes").await;
    assert!(
        matches!(long, Err(DomainError::Unavailable { retry_after: Some(d), .. }) if d == Duration::from_secs(120)),
        "a long wait is the caller's: {long:?}"
    );
    assert_eq!(requests, 1, "not held for two minutes");
}

#[tokio::test]
async fn server_errors_are_retried_then_unavailable() {
    for call in ["put", "changes", "delete"] {
        let (result, requests, _) = answer_with(ResponseTemplate::new(503), call).await;
        assert!(matches!(result, Err(DomainError::Unavailable { retry_after: Some(_), .. })), "{call}: {result:?}");
        assert_eq!(requests, 3, "{call}");
    }
}

#[tokio::test]
async fn timeouts_are_retried_then_unavailable() {
    let (result, requests, elapsed) =
        answer_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)).set_body_json(json!({})), "changes").await;
    assert!(matches!(result, Err(DomainError::Unavailable { .. })), "{result:?}");
    assert_eq!(requests, 3);
    assert!(elapsed < Duration::from_secs(3), "three attempts of 300 ms, not the server's delay: {elapsed:?}");
}

#[tokio::test]
async fn an_unreachable_service_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let result = client(&url).delete(&tenant(), "ticket", "k").await;
    match result {
        Err(DomainError::Unavailable { reason, .. }) => assert!(!reason.contains(&url), "no URL in the error: {reason}"),
        other => panic!("{other:?}"),
    }
}

/// Faults of the fake service: a failure then success is one successful call; readiness follows
/// the last request and shows no URL.
#[tokio::test]
async fn transient_faults_are_absorbed_and_readiness_follows_the_requests() {
    let fake = FakeShardManager::start("service-token").await;
    let shards = client(&fake.url());
    fake.fail_next([ShardFault::Status(502), ShardFault::TooManyRequests { retry_after_secs: 0 }]);
    shards.put(&tenant(), "ticket", "k", &write(), None).await.expect("the third attempt succeeds");
    assert_eq!((fake.requests(), fake.count("acme", "ticket")), (3, 1));
    assert!(shards.check().await.ready);

    fake.fail_next([ShardFault::Status(500), ShardFault::Status(500), ShardFault::Slow(Duration::from_secs(1))]);
    assert!(shards.changes(&tenant(), "ticket", None, 10).await.is_err());
    let down = shards.check().await;
    assert!(!down.ready && !down.critical, "{down:?}");
    assert!(!down.detail.contains(&fake.url()) && !down.diagnostic.contains(&fake.url()), "{down:?}");
    shards.changes(&tenant(), "ticket", None, 10).await.expect("the service is back");
    assert!(shards.check().await.ready, "ready again after a success");
}
