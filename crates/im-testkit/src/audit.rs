//! The [`AuditBuffer`] contract every store passes, and a fake Logging Service on a loopback
//! port speaking `docs/contracts/logging-service.md`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use im_domain::audit::{AuditBuffer, AuditEntry};
use serde_json::json;
use time::OffsetDateTime;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::fresh_tenant;

/// An entry of `tenant` at `at`, with a fresh id.
pub fn entry(tenant: &str, at: OffsetDateTime) -> AuditEntry {
    AuditEntry {
        id: uuid::Uuid::now_v7(),
        timestamp: at,
        tenant_id: tenant.to_owned(),
        actor_id: "conformance-user".into(),
        action: "integration.create".into(),
        resource_type: "integration".into(),
        resource_id: uuid::Uuid::new_v4().to_string(),
        outcome: "succeeded".into(),
        request_id: Some("req-1".into()),
        details: json!({"name": "GitHub", "count": 3}),
    }
}

/// Claims and acknowledges until the buffer is empty (run the check alone against its buffer).
async fn drain(buffer: &dyn AuditBuffer) {
    loop {
        let held = buffer.claim("drain", 1000, Duration::from_secs(60)).await.expect("claim");
        if held.is_empty() {
            return;
        }
        buffer.acknowledge(&held.iter().map(|e| e.id).collect::<Vec<_>>()).await.expect("acknowledge");
    }
}

/// Appends keep each record whole and once (by id); claims hand out the oldest first, never an
/// entry another shipper holds, a holder's own entries again, and a dead holder's entries when
/// its hold ends; acknowledged entries are gone; the backlog counts what waits and its age.
pub async fn buffer(buffer: &dyn AuditBuffer) {
    drain(buffer).await;
    let empty = buffer.backlog().await.expect("backlog");
    assert_eq!((empty.count, empty.oldest), (0, None), "an empty buffer");

    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let base = OffsetDateTime::now_utc().replace_nanosecond(0).expect("whole seconds") - time::Duration::hours(1);
    let recorded: Vec<AuditEntry> =
        (0..4i64).map(|n| entry(if n % 2 == 0 { tenant.as_str() } else { other.as_str() }, base + time::Duration::seconds(n))).collect();
    for e in &recorded {
        buffer.append(e).await.expect("append");
    }
    buffer.append(&recorded[0]).await.expect("appending an id again succeeds");
    let backlog = buffer.backlog().await.expect("backlog");
    assert_eq!((backlog.count, backlog.oldest), (4, Some(base)), "one entry per id; the oldest timestamp");

    let long = Duration::from_secs(60);
    let first = buffer.claim("shipper-a", 2, long).await.expect("claim");
    assert_eq!(first, recorded[..2].to_vec(), "the oldest entries, whole, in order (across tenants)");
    let second = buffer.claim("shipper-b", 10, long).await.expect("claim");
    assert_eq!(second, recorded[2..].to_vec(), "another shipper gets only what nobody holds");
    assert!(buffer.claim("shipper-c", 10, long).await.expect("claim").is_empty(), "held entries are handed to nobody else");
    assert_eq!(buffer.claim("shipper-a", 10, long).await.expect("claim"), recorded[..2].to_vec(), "a holder gets its own entries again");

    buffer.acknowledge(&[recorded[0].id, recorded[1].id, uuid::Uuid::new_v4()]).await.expect("acknowledge ignores unknown ids");
    buffer.acknowledge(&[recorded[0].id]).await.expect("acknowledge is idempotent");
    let backlog = buffer.backlog().await.expect("backlog");
    assert_eq!((backlog.count, backlog.oldest), (2, Some(recorded[2].timestamp)));

    let short = buffer.claim("shipper-b", 10, Duration::from_millis(1)).await.expect("claim");
    assert_eq!(short, recorded[2..].to_vec());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(buffer.claim("shipper-c", 10, long).await.expect("claim"), recorded[2..].to_vec(), "a hold that ended is taken over");
    buffer.acknowledge(&[recorded[2].id, recorded[3].id]).await.expect("acknowledge");
    assert_eq!(buffer.backlog().await.expect("backlog").count, 0, "nothing left");
}

/// What the fake Logging Service does with the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggingFault {
    /// This status with a small problem body.
    Status(u16),
    /// `429` with `Retry-After: <secs>`.
    TooManyRequests { retry_after_secs: u64 },
}

#[derive(Debug, Default)]
struct LoggingState {
    /// Every record received, by id (a duplicate replaces itself).
    records: BTreeMap<uuid::Uuid, serde_json::Value>,
    /// Records received, duplicates included.
    received: usize,
    batches: usize,
    down: bool,
    faults: VecDeque<LoggingFault>,
}

/// A fake Logging Service: `POST /api/v1/audit-events` with a JSON array behind a bearer token,
/// answering `202`; it keeps records by id, like the service it stands for. It can be taken
/// down (every request `503`) and brought up again.
pub struct FakeLoggingService {
    server: MockServer,
    state: Arc<Mutex<LoggingState>>,
}

fn lock(state: &Mutex<LoggingState>) -> MutexGuard<'_, LoggingState> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct LoggingResponder {
    state: Arc<Mutex<LoggingState>>,
    token: String,
}

impl Respond for LoggingResponder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut state = lock(&self.state);
        if request.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {}", self.token)) {
            return ResponseTemplate::new(401);
        }
        if state.down {
            return ResponseTemplate::new(503);
        }
        match state.faults.pop_front() {
            Some(LoggingFault::Status(status)) => return ResponseTemplate::new(status),
            Some(LoggingFault::TooManyRequests { retry_after_secs }) => {
                return ResponseTemplate::new(429).insert_header("retry-after", retry_after_secs.to_string().as_str());
            }
            None => {}
        }
        if (request.method.as_str(), request.url.path()) != ("POST", "/api/v1/audit-events") {
            return ResponseTemplate::new(404);
        }
        let Ok(serde_json::Value::Array(records)) = serde_json::from_slice::<serde_json::Value>(&request.body) else {
            return ResponseTemplate::new(400).set_body_json(json!({"title": "the body must be a JSON array"}));
        };
        let mut ids = Vec::with_capacity(records.len());
        for record in &records {
            match serde_json::from_value::<AuditEntry>(record.clone()) {
                Ok(entry) => ids.push(entry.id),
                Err(e) => return ResponseTemplate::new(422).set_body_json(json!({"title": "invalid record", "detail": e.to_string()})),
            }
        }
        state.batches += 1;
        state.received += records.len();
        for (id, record) in ids.into_iter().zip(records) {
            state.records.insert(id, record);
        }
        ResponseTemplate::new(202).set_body_json(json!({"accepted": state.records.len()}))
    }
}

impl FakeLoggingService {
    /// Starts a fake that accepts `token`.
    pub async fn start(token: &str) -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(LoggingState::default()));
        Mock::given(any()).respond_with(LoggingResponder { state: state.clone(), token: token.to_owned() }).mount(&server).await;
        Self { server, state }
    }

    /// The base URL (`logging.url`).
    pub fn url(&self) -> String {
        self.server.uri()
    }

    /// Down: every request is `503` until [`Self::set_down`] with `false`.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    /// Faults answered before the normal answers, one per request.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = LoggingFault>) {
        lock(&self.state).faults.extend(faults);
    }

    /// Every record received, by id, as sent.
    pub fn records(&self) -> BTreeMap<uuid::Uuid, serde_json::Value> {
        lock(&self.state).records.clone()
    }

    /// `(records received with duplicates, batches accepted)`.
    pub fn received(&self) -> (usize, usize) {
        let state = lock(&self.state);
        (state.received, state.batches)
    }
}
