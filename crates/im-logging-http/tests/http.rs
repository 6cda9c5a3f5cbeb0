//! The Logging Service adapter against local mocks (request shape, error mapping, timeouts,
//! retries) and against the test kit's fake service (down, then up: every record arrives).

use std::sync::Arc;
use std::time::Duration;

use im_domain::DomainError;
use im_domain::audit::{AuditEntry, AuditSink as _};
use im_domain::ports::HealthCheck as _;
use im_logging_http::{HttpAuditSink, HttpLoggingSettings};
use im_testkit::audit::{FakeLoggingService, LoggingFault, entry};
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn sink(url: &str) -> HttpAuditSink {
    HttpAuditSink::new(HttpLoggingSettings::for_tests(url)).unwrap()
}

fn batch() -> Vec<AuditEntry> {
    let at = time::macros::datetime!(2026-01-01 12:00 UTC);
    vec![entry("acme", at), entry("globex", at)]
}

#[tokio::test]
async fn a_batch_is_one_post_of_a_json_array_with_the_token() {
    let server = MockServer::start().await;
    let entries = batch();
    let expected = serde_json::json!([
        {
            "id": entries[0].id, "timestamp": "2026-01-01T12:00:00Z", "tenantId": "acme", "actorId": "conformance-user",
            "action": "integration.create", "resourceType": "integration", "resourceId": entries[0].resource_id,
            "outcome": "succeeded", "requestId": "req-1", "details": {"name": "GitHub", "count": 3}
        },
        serde_json::to_value(&entries[1]).unwrap()
    ]);
    Mock::given(method("POST"))
        .and(path("/api/v1/audit-events"))
        .and(header("authorization", "Bearer service-token"))
        .and(header("content-type", "application/json"))
        .and(body_json(expected))
        .respond_with(ResponseTemplate::new(202))
        .expect(1)
        .mount(&server)
        .await;
    sink(&format!("{}/", server.uri())).send(&entries).await.unwrap();
}

async fn answered(template: ResponseTemplate) -> (Result<(), DomainError>, usize) {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any()).respond_with(template).mount(&server).await;
    let result = sink(&server.uri()).send(&batch()).await;
    (result, server.received_requests().await.map_or(0, |r| r.len()))
}

#[tokio::test]
async fn errors_map_to_the_port() {
    for status in [500, 502, 503, 429] {
        let (result, requests) = answered(ResponseTemplate::new(status)).await;
        assert!(matches!(result, Err(DomainError::Unavailable { .. })), "{status}: {result:?}");
        assert_eq!(requests, 3, "{status} is retried");
    }
    for status in [401, 403] {
        let (result, requests) = answered(ResponseTemplate::new(status)).await;
        assert!(matches!(&result, Err(DomainError::Unexpected(e)) if e.to_string().contains("logging.token")), "{status}: {result:?}");
        assert_eq!(requests, 1, "{status} is not retried");
    }
    for status in [400, 413, 422] {
        let (result, requests) = answered(ResponseTemplate::new(status)).await;
        assert!(matches!(result, Err(DomainError::Validation(_))), "{status}: {result:?}");
        assert_eq!(requests, 1, "{status} is not retried");
    }
    let (slow, requests) = answered(ResponseTemplate::new(202).set_delay(Duration::from_secs(2))).await;
    assert!(matches!(slow, Err(DomainError::Unavailable { .. })) && requests == 3, "{slow:?}");
}

/// Records are buffered in a real store (the shipper's at-least-once) while the service is down;
/// once it is up, every one arrives, duplicates only by id.
#[tokio::test]
async fn nothing_is_lost_while_the_service_is_down() {
    let fake = FakeLoggingService::start("service-token").await;
    let sink = Arc::new(sink(&fake.url()));
    let buffer = Arc::new(MemoryBuffer::default());
    let shipper = im_domain::services::AuditShipper::new(buffer.clone(), sink.clone());
    let entries: Vec<AuditEntry> = (0..25).map(|_| entry("acme", time::OffsetDateTime::now_utc())).collect();
    for e in &entries {
        im_domain::audit::AuditBuffer::append(buffer.as_ref(), e).await.unwrap();
    }

    fake.set_down(true);
    assert!(shipper.ship_once(10).await.is_err(), "the service is down");
    assert!(!sink.check().await.ready, "readiness shows it");
    assert_eq!(buffer.len(), 25, "nothing deleted");

    fake.set_down(false);
    fake.fail_next([LoggingFault::Status(503)]);
    while shipper.ship_once(10).await.expect("the service is up").claimed > 0 {}
    assert!(sink.check().await.ready);
    assert_eq!(buffer.len(), 0, "every acknowledged record is deleted");
    let received = fake.records();
    assert!(entries.iter().all(|e| received.contains_key(&e.id)), "every record arrived");
    assert_eq!(received.len(), 25);
}

/// A buffer in memory with the store's claim rules, for the shipper against the real HTTP sink.
#[derive(Default)]
struct MemoryBuffer {
    entries: std::sync::Mutex<Vec<(AuditEntry, Option<String>)>>,
}

impl MemoryBuffer {
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[async_trait::async_trait]
impl im_domain::audit::AuditBuffer for MemoryBuffer {
    async fn append(&self, entry: &AuditEntry) -> Result<(), DomainError> {
        self.entries.lock().unwrap().push((entry.clone(), None));
        Ok(())
    }

    async fn claim(&self, owner: &str, limit: u32, _: Duration) -> Result<Vec<AuditEntry>, DomainError> {
        let mut entries = self.entries.lock().unwrap();
        let mut claimed = Vec::new();
        for (entry, holder) in entries.iter_mut().filter(|(_, h)| h.as_deref().is_none_or(|h| h == owner)).take(limit as usize) {
            *holder = Some(owner.to_owned());
            claimed.push(entry.clone());
        }
        Ok(claimed)
    }

    async fn acknowledge(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
        self.entries.lock().unwrap().retain(|(e, _)| !ids.contains(&e.id));
        Ok(())
    }

    async fn backlog(&self) -> Result<im_domain::audit::AuditBacklog, DomainError> {
        let entries = self.entries.lock().unwrap();
        Ok(im_domain::audit::AuditBacklog { count: entries.len() as u64, oldest: entries.first().map(|(e, _)| e.timestamp) })
    }
}
