//! A fake Shard Manager on a loopback port, speaking `docs/contracts/shard-manager.md`: for the
//! HTTP adapter's conformance run and for sync tests that want the platform service itself.
//!
//! Records live in memory per tenant and shard type. Every write (a tombstone too) takes the next
//! number of one global change sequence; a record's version is `v{n}`, a cursor is `c{n}` (the
//! last change read), so anything else is a cursor it did not issue (400). Requests without
//! `Authorization: Bearer <token>` are 401. Faults queued by the test answer the next requests
//! first (429 with `Retry-After`, a status, a delay), one per request; every request is counted.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// A misbehaviour for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardFault {
    /// `429 Too Many Requests` with `Retry-After: <secs>`.
    TooManyRequests { retry_after_secs: u64 },
    /// This status with a small problem body.
    Status(u16),
    /// The normal answer, after this delay.
    Slow(Duration),
}

#[derive(Debug, Clone)]
struct Record {
    seq: u64,
    data: Value,
    updated_at: String,
    source: Option<String>,
    deleted: bool,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    /// `(tenant, shard type)` -> key -> record.
    partitions: BTreeMap<(String, String), BTreeMap<String, Record>>,
    faults: VecDeque<ShardFault>,
    requests: usize,
}

/// The fake service. Dropping it stops the server.
pub struct FakeShardManager {
    server: MockServer,
    state: Arc<Mutex<State>>,
}

struct Responder {
    state: Arc<Mutex<State>>,
    token: String,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn problem(status: u16, detail: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(
        serde_json::to_vec(&json!({"title": "refused", "status": status, "detail": detail})).unwrap_or_default(),
        "application/problem+json",
    )
}

fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

impl FakeShardManager {
    /// Starts a fake that accepts `token`.
    pub async fn start(token: &str) -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        Mock::given(any()).respond_with(Responder { state: state.clone(), token: token.to_owned() }).mount(&server).await;
        Self { server, state }
    }

    /// The base URL (`shard_manager.url`).
    pub fn url(&self) -> String {
        self.server.uri()
    }

    /// Queues faults answered before the normal answers, one per request.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = ShardFault>) {
        lock(&self.state).faults.extend(faults);
    }

    /// Requests received so far, faults and refusals included.
    pub fn requests(&self) -> usize {
        lock(&self.state).requests
    }

    /// The live data of a record, `None` when absent or deleted.
    pub fn record(&self, tenant: &str, shard_type: &str, key: &str) -> Option<Value> {
        let state = lock(&self.state);
        let record = state.partitions.get(&(tenant.to_owned(), shard_type.to_owned()))?.get(key)?;
        (!record.deleted).then(|| record.data.clone())
    }

    /// How many live records a tenant's shard type holds.
    pub fn count(&self, tenant: &str, shard_type: &str) -> usize {
        lock(&self.state)
            .partitions
            .get(&(tenant.to_owned(), shard_type.to_owned()))
            .map_or(0, |p| p.values().filter(|r| !r.deleted).count())
    }
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut state = lock(&self.state);
        state.requests += 1;
        let authorized = request.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {}", self.token));
        if !authorized {
            return problem(401, "a service token is required");
        }
        let delay = match state.faults.pop_front() {
            Some(ShardFault::TooManyRequests { retry_after_secs }) => {
                return problem(429, "slow down").insert_header("retry-after", retry_after_secs.to_string().as_str());
            }
            Some(ShardFault::Status(status)) => return problem(status, "injected"),
            Some(ShardFault::Slow(delay)) => Some(delay),
            None => None,
        };
        let answer = answer(&mut state, request);
        match delay {
            Some(delay) => answer.set_delay(delay),
            None => answer,
        }
    }
}

/// The contract's answer to one authorized request.
fn answer(state: &mut State, request: &Request) -> ResponseTemplate {
    let segments: Vec<String> = request.url.path_segments().map(|s| s.map(decoded).collect()).unwrap_or_default();
    let [api, v1, tenants, tenant, shards, shard_type, rest @ ..] = segments.as_slice() else {
        return problem(404, "no such route");
    };
    if (api.as_str(), v1.as_str(), tenants.as_str(), shards.as_str()) != ("api", "v1", "tenants", "shards") || tenant.is_empty() {
        return problem(404, "no such route");
    }
    let partition = (tenant.clone(), shard_type.clone());
    match (request.method.as_str(), rest) {
        ("GET", []) => changes(state, &partition, request),
        ("PUT", [key]) => put(state, partition, key, request),
        ("DELETE", [key]) => {
            state.seq += 1;
            let seq = state.seq;
            let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            state
                .partitions
                .entry(partition)
                .or_default()
                .insert(key.clone(), Record { seq, data: Value::Null, updated_at: now, source: None, deleted: true });
            ResponseTemplate::new(204)
        }
        _ => problem(405, "method not allowed"),
    }
}

fn put(state: &mut State, partition: (String, String), key: &str, request: &Request) -> ResponseTemplate {
    if key.is_empty() || key.len() > 1024 {
        return ResponseTemplate::new(422).set_body_json(json!({"errors": [{"field": "key", "message": "must be 1 to 1024 characters"}]}));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else { return problem(400, "the body is not JSON") };
    let (Some(data), Some(updated_at), Some(source)) = (body.get("data"), body["updatedAt"].as_str(), body["source"].as_str()) else {
        return ResponseTemplate::new(422)
            .set_body_json(json!({"errors": [{"pointer": "/data", "detail": "data, updatedAt and source are required"}]}));
    };
    if time::OffsetDateTime::parse(updated_at, &time::format_description::well_known::Rfc3339).is_err() {
        return ResponseTemplate::new(422).set_body_json(json!({"errors": [{"field": "updatedAt", "message": "is not RFC 3339"}]}));
    }
    if let Some(expected) = request.headers.get("if-match").and_then(|v| v.to_str().ok()) {
        let current = state.partitions.get(&partition).and_then(|p| p.get(key)).filter(|r| !r.deleted).map(|r| format!("v{}", r.seq));
        if current.as_deref() != Some(expected) {
            return problem(412, "the record is not at that version");
        }
    }
    state.seq += 1;
    let seq = state.seq;
    let record = Record { seq, data: data.clone(), updated_at: updated_at.to_owned(), source: Some(source.to_owned()), deleted: false };
    state.partitions.entry(partition).or_default().insert(key.to_owned(), record);
    ResponseTemplate::new(200).set_body_json(json!({"key": key, "version": format!("v{seq}"), "updatedAt": updated_at}))
}

fn changes(state: &State, partition: &(String, String), request: &Request) -> ResponseTemplate {
    let query: BTreeMap<String, String> = request.url.query_pairs().into_owned().collect();
    let after = match query.get("changedSince") {
        None => 0,
        Some(cursor) => match cursor.strip_prefix('c').and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => n,
            None => {
                return ResponseTemplate::new(400)
                    .set_body_json(json!({"errors": [{"field": "changedSince", "message": "not a cursor of ours"}]}));
            }
        },
    };
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(100).clamp(1, 1000);
    let mut changed: Vec<(&String, &Record)> =
        state.partitions.get(partition).map(|p| p.iter().filter(|(_, r)| r.seq > after).collect()).unwrap_or_default();
    changed.sort_by_key(|(_, r)| r.seq);
    changed.truncate(limit);
    let next = changed.last().map_or(after, |(_, r)| r.seq);
    let items: Vec<Value> = changed
        .into_iter()
        .map(|(key, r)| {
            json!({
                "key": key, "data": if r.deleted { Value::Null } else { r.data.clone() }, "version": format!("v{}", r.seq),
                "updatedAt": r.updated_at, "source": r.source, "deleted": r.deleted,
            })
        })
        .collect();
    ResponseTemplate::new(200).set_body_json(json!({"items": items, "nextCursor": format!("c{next}")}))
}
