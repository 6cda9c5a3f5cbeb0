//! A fake provider API on a loopback port, for tests of the provider client and of everything
//! built on it (connection tests, sync tasks).
//!
//! It serves one collection of records under a path per pagination style, so one fake covers
//! every style a definition can declare:
//!
//! | path | pagination | answer |
//! |---|---|---|
//! | `GET /cursor/records?cursor=&limit=` (and `GET /records?...`) | `cursor` (`nextCursorPath` = `meta.next`) | `{"data": [...], "meta": {"next": "..." or null}}` |
//! | `GET /page/records?page=&per_page=` | `page` (from 1) | `{"data": [...]}` |
//! | `GET /offset/records?offset=&limit=` | `offset` | `{"data": [...]}` |
//! | `GET /link/records?page=&per_page=` | `link` (`Link: <...>; rel="next"`) | `[...]` |
//! | `GET /none/records` | `none` | `{"data": [...]}` (every record) |
//! | `GET /records/{id}`, `PUT /records/{id}` (an upsert), `DELETE /records/{id}` | | one record |
//! | `GET /me` | | the verification request: `{"login": "fake"}` |
//!
//! Every list takes `updated_since` (RFC 3339, inclusive). Records are
//! `{"id": "r000001", "name": "...", "version": n, "updated_at": "<RFC 3339>"}`, ordered by id; each
//! change moves a logical clock one second forward, so `updated_at` orders changes.
//!
//! Requests are checked against the [`FakeAuth`] the fake expects (401 otherwise), counted, and
//! answered with the [`Fault`]s queued by the test first (429 with `Retry-After`, 5xx, slow or
//! huge answers), one fault per request.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The credentials the fake accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeAuth {
    /// Every request is accepted.
    None,
    /// An API key in the named header.
    HeaderKey { name: String, value: String },
    /// An API key in the named query parameter.
    QueryKey { name: String, value: String },
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// HTTP basic authentication.
    Basic { username: String, password: String },
}

/// A misbehaviour for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `429 Too Many Requests` with `Retry-After: <secs>`.
    TooManyRequests { retry_after_secs: u64 },
    /// `429` with `X-RateLimit-Reset: <unix seconds>` (GitHub's style) and no `Retry-After`.
    RateLimitReset { reset_in_secs: u64 },
    /// This status (a 5xx, say) with a small body.
    Status(u16),
    /// The normal answer, after this delay.
    Slow(Duration),
    /// A `200` whose body has this many bytes.
    Huge(usize),
}

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query as sent.
    pub path_and_query: String,
    /// Whether it carried the expected credentials.
    pub authorized: bool,
    /// Headers by lowercase name; repeated ones joined with `, `.
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug)]
struct State {
    records: BTreeMap<String, Value>,
    clock: i64,
    next_id: u64,
    auth: FakeAuth,
    faults: VecDeque<Fault>,
    seen: Vec<SeenRequest>,
    /// Origin written into `Link` headers instead of the fake's own (to test cross-origin links).
    link_origin: Option<String>,
    /// `PUT` and `DELETE` requests answered.
    writes: usize,
    /// Records whose writes (`PUT`, `DELETE`) are answered with this status.
    refused: BTreeMap<String, u16>,
}

const EPOCH: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn rfc3339(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds).expect("valid timestamp").format(&Rfc3339).expect("formattable")
}

impl State {
    fn tick(&mut self) -> String {
        self.clock += 1;
        rfc3339(self.clock)
    }

    fn insert(&mut self, fields: Value) -> String {
        self.next_id += 1;
        let id = format!("r{:06}", self.next_id);
        let updated_at = self.tick();
        let mut record = json!({"id": id, "name": format!("record {}", self.next_id), "version": 1, "updated_at": updated_at});
        merge(&mut record, fields);
        self.records.insert(id.clone(), record);
        id
    }

    fn create(&mut self, id: &str, fields: Value) -> Value {
        let updated_at = self.tick();
        let mut record = json!({"id": id, "version": 1, "updated_at": updated_at});
        merge(&mut record, fields);
        self.records.insert(id.to_owned(), record.clone());
        record
    }

    fn edit(&mut self, id: &str, fields: Value) -> Option<Value> {
        let updated_at = self.tick();
        let record = self.records.get_mut(id)?;
        merge(record, fields);
        record["id"] = json!(id);
        record["version"] = json!(record["version"].as_u64().unwrap_or(0) + 1);
        record["updated_at"] = json!(updated_at);
        Some(record.clone())
    }
}

fn merge(record: &mut Value, fields: Value) {
    if let (Some(record), Value::Object(fields)) = (record.as_object_mut(), fields) {
        for (k, v) in fields {
            if k != "id" && k != "version" && k != "updated_at" {
                record.insert(k, v);
            }
        }
    }
}

/// The running fake. Dropping it stops the server.
pub struct FakeProvider {
    server: MockServer,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider").field("uri", &self.server.uri()).finish_non_exhaustive()
    }
}

impl FakeProvider {
    /// Starts a fake with `records` records that accepts `auth`.
    pub async fn start(records: usize, auth: FakeAuth) -> Self {
        let server = MockServer::start().await;
        let state = State {
            records: BTreeMap::new(),
            clock: EPOCH,
            next_id: 0,
            auth,
            faults: VecDeque::new(),
            seen: Vec::new(),
            link_origin: None,
            writes: 0,
            refused: BTreeMap::new(),
        };
        let state = Arc::new(Mutex::new(state));
        {
            let mut s = lock(&state);
            for _ in 0..records {
                s.insert(json!({}));
            }
        }
        Mock::given(any()).respond_with(Responder { state: state.clone(), origin: server.uri() }).mount(&server).await;
        Self { server, state }
    }

    /// `http://127.0.0.1:<port>`: the base URL of a definition that targets the fake.
    pub fn base_url(&self) -> String {
        self.server.uri()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A custom definition (the `customDefinition` of an integration) of entity `record` on
    /// this fake: cursor pages of `/cursor/records` with the `updated_since` filter, and the
    /// `get`, `upsert` (`PUT`) and `delete` requests of `/records/{id}`, with a bearer token.
    pub fn definition(&self) -> Value {
        json!({
            "baseUrl": self.base_url(),
            "auth": {"type": "bearer"},
            "pagination": {"style": "cursor", "cursorParam": "cursor", "nextCursorPath": "meta.next", "limitParam": "limit"},
            "entities": [{
                "name": "record", "idField": "id", "updatedAtField": "updated_at", "updatedSinceParam": "updated_since",
                "list": {"method": "GET", "path": "/cursor/records", "itemsPath": "data"},
                "get": {"method": "GET", "path": "/records/{id}"},
                "upsert": {"method": "PUT", "path": "/records/{id}"},
                "delete": {"method": "DELETE", "path": "/records/{id}"}
            }]
        })
    }

    /// Accept other credentials from now on (a rotated token: the old one gets 401).
    pub fn set_auth(&self, auth: FakeAuth) {
        self.state().auth = auth;
    }

    /// Queues faults: the next requests get them, one each, in order.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().faults.extend(faults);
    }

    /// Writes this origin into `Link` headers instead of the fake's own.
    pub fn set_link_origin(&self, origin: Option<String>) {
        self.state().link_origin = origin;
    }

    /// Answers every write (`PUT`, `DELETE`) of record `id` with `status` (a 422, say), until
    /// [`FakeProvider::accept_writes`].
    pub fn refuse_writes(&self, id: &str, status: u16) {
        self.state().refused.insert(id.to_owned(), status);
    }

    pub fn accept_writes(&self, id: &str) {
        self.state().refused.remove(id);
    }

    /// Adds a record with these fields; returns its id.
    pub fn insert(&self, fields: Value) -> String {
        self.state().insert(fields)
    }

    /// Changes fields of a record (a new version and `updated_at`); `None` when there is none.
    pub fn edit(&self, id: &str, fields: Value) -> Option<Value> {
        self.state().edit(id, fields)
    }

    /// Removes a record; whether it existed.
    pub fn delete(&self, id: &str) -> bool {
        self.state().records.remove(id).is_some()
    }

    pub fn record(&self, id: &str) -> Option<Value> {
        self.state().records.get(id).cloned()
    }

    /// Every record, ordered by id.
    pub fn records(&self) -> Vec<Value> {
        self.state().records.values().cloned().collect()
    }

    /// The `updated_at` the next change will get (to build an updated-since filter).
    pub fn now(&self) -> String {
        rfc3339(self.state().clock + 1)
    }

    /// How many `PUT` and `DELETE` requests were answered (writes made through the API).
    pub fn writes(&self) -> usize {
        self.state().writes
    }

    /// How many requests arrived (faulted ones and refused ones included).
    pub fn request_count(&self) -> usize {
        self.state().seen.len()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state().seen.clone()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Responder {
    state: Arc<Mutex<State>>,
    origin: String,
}

fn query(request: &Request) -> BTreeMap<String, String> {
    request.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn authorized(auth: &FakeAuth, request: &Request, query: &BTreeMap<String, String>) -> bool {
    let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match auth {
        FakeAuth::None => true,
        FakeAuth::HeaderKey { name, value } => header(name).as_deref() == Some(value),
        FakeAuth::QueryKey { name, value } => query.get(name) == Some(value),
        FakeAuth::Bearer(token) => header("authorization") == Some(format!("Bearer {token}")),
        FakeAuth::Basic { username, password } => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            header("authorization") == Some(format!("Basic {encoded}"))
        }
    }
}

/// A numeric query parameter, or the message of a 400.
fn number(query: &BTreeMap<String, String>, name: &str, default: usize) -> Result<usize, String> {
    match query.get(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("bad {name}")),
    }
}

impl Responder {
    /// A list answer, or the message of a 400.
    fn list(&self, state: &State, style: &str, query: &BTreeMap<String, String>) -> Result<ResponseTemplate, String> {
        let since = query.get("updated_since").cloned();
        let matching: Vec<&Value> = state
            .records
            .values()
            .filter(|r| since.as_ref().is_none_or(|s| r["updated_at"].as_str().is_some_and(|u| u >= s.as_str())))
            .collect();
        let ok = |body: Value| ResponseTemplate::new(200).set_body_json(body);
        match style {
            "none" => Ok(ok(json!({"data": matching}))),
            "cursor" => {
                let limit = number(query, "limit", 50)?.max(1);
                let after = query.get("cursor").cloned().unwrap_or_default();
                let page: Vec<&Value> =
                    matching.iter().copied().filter(|r| r["id"].as_str().is_some_and(|id| id > after.as_str())).take(limit).collect();
                let more = page.last().is_some_and(|last| matching.last().is_some_and(|l| l["id"] != last["id"]));
                let next = if more { page.last().map(|r| r["id"].clone()) } else { None };
                Ok(ok(json!({"data": page, "meta": {"next": next}})))
            }
            "page" | "offset" | "link" => {
                let (size_name, default) = if style == "offset" { ("limit", 50) } else { ("per_page", 30) };
                let size = number(query, size_name, default)?.max(1);
                let start = if style == "offset" { number(query, "offset", 0)? } else { (number(query, "page", 1)?.max(1) - 1) * size };
                let page: Vec<&Value> = matching.iter().copied().skip(start).take(size).collect();
                if style != "link" {
                    return Ok(ok(json!({"data": page})));
                }
                let mut response = ok(json!(page));
                if start + size < matching.len() {
                    let origin = state.link_origin.clone().unwrap_or_else(|| self.origin.clone());
                    let next = start / size + 2;
                    let mut link = format!("<{origin}/link/records?page={next}&per_page={size}");
                    if let Some(s) = &since {
                        link.push_str(&format!("&updated_since={}", s.replace(':', "%3A").replace('+', "%2B")));
                    }
                    link.push_str(">; rel=\"next\", <");
                    link.push_str(&format!("{origin}/link/records?page=1&per_page={size}>; rel=\"first\""));
                    response = response.insert_header("link", link);
                }
                Ok(response)
            }
            _ => Ok(ResponseTemplate::new(404)),
        }
    }

    fn answer(&self, state: &mut State, request: &Request, query: &BTreeMap<String, String>) -> ResponseTemplate {
        let segments: Vec<&str> = request.url.path().trim_start_matches('/').split('/').collect();
        let method = request.method.as_str();
        let not_found = || ResponseTemplate::new(404).set_body_json(json!({"error": "not found"}));
        match (method, segments.as_slice()) {
            ("GET", ["me"]) => ResponseTemplate::new(200).set_body_json(json!({"login": "fake"})),
            // `/records` lists with cursors, as `/cursor/records` does.
            ("GET", ["records"]) => self
                .list(state, "cursor", query)
                .unwrap_or_else(|message| ResponseTemplate::new(400).set_body_json(json!({"error": message}))),
            ("GET", [style, "records"]) => {
                self.list(state, style, query).unwrap_or_else(|message| ResponseTemplate::new(400).set_body_json(json!({"error": message})))
            }
            ("GET", ["records", id]) => state.records.get(*id).map_or_else(not_found, |r| ResponseTemplate::new(200).set_body_json(r)),
            ("PUT" | "DELETE", ["records", id]) if state.refused.contains_key(*id) => {
                ResponseTemplate::new(state.refused[*id]).set_body_json(json!({"error": "refused"}))
            }
            ("POST", ["records"]) => {
                let id = state.insert(request.body_json().unwrap_or(Value::Null));
                ResponseTemplate::new(201).set_body_json(&state.records[&id])
            }
            ("PUT", ["records", id]) => {
                let fields = request.body_json().unwrap_or(Value::Null);
                state.writes += 1;
                if !state.records.contains_key(*id) {
                    // An upsert: a record the caller names is created with that id.
                    let created = state.create(id, fields);
                    return ResponseTemplate::new(201).set_body_json(created);
                }
                state.edit(id, fields).map_or_else(not_found, |r| ResponseTemplate::new(200).set_body_json(r))
            }
            ("DELETE", ["records", id]) => {
                state.writes += 1;
                if state.records.remove(*id).is_some() { ResponseTemplate::new(204) } else { not_found() }
            }
            _ => not_found(),
        }
    }
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut state = lock(&self.state);
        let query = query(request);
        let ok = authorized(&state.auth, request, &query);
        let path_and_query = match request.url.query() {
            Some(q) => format!("{}?{q}", request.url.path()),
            None => request.url.path().to_owned(),
        };
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &request.headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            headers.entry(name.as_str().to_owned()).and_modify(|v| *v = format!("{v}, {value}")).or_insert(value);
        }
        state.seen.push(SeenRequest { method: request.method.to_string(), path_and_query, authorized: ok, headers });
        let mut delay = None;
        match state.faults.pop_front() {
            Some(Fault::TooManyRequests { retry_after_secs }) => {
                return ResponseTemplate::new(429).insert_header("retry-after", retry_after_secs.to_string());
            }
            Some(Fault::RateLimitReset { reset_in_secs }) => {
                let reset = OffsetDateTime::now_utc().unix_timestamp() + i64::try_from(reset_in_secs).unwrap_or(0);
                return ResponseTemplate::new(429)
                    .insert_header("x-ratelimit-remaining", "0")
                    .insert_header("x-ratelimit-reset", reset.to_string());
            }
            Some(Fault::Status(status)) => return ResponseTemplate::new(status).set_body_json(json!({"error": "injected"})),
            Some(Fault::Huge(bytes)) => return ResponseTemplate::new(200).set_body_raw(vec![b' '; bytes], "application/json"),
            Some(Fault::Slow(d)) => delay = Some(d),
            None => {}
        }
        let response = if ok {
            self.answer(&mut state, request, &query)
        } else {
            ResponseTemplate::new(401).set_body_json(json!({"error": "bad credentials"}))
        };
        match delay {
            Some(d) => response.set_delay(d),
            None => response,
        }
    }
}
