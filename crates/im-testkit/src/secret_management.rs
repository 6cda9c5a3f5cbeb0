//! A fake of the Secret Management service (`docs/contracts/secret-management.md`), in memory:
//! every version of every name behind the service token `Bearer service-token`. The HTTP secret
//! store's conformance run, the API suite on the HTTP secret store and the outage chaos test all
//! use it; while [`SecretManagement::down`] is set, every request gets a 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use wiremock::matchers::path_regex;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The token the fake expects from its clients.
pub const SERVICE_TOKEN: &str = "service-token";

/// The service's state, shared between the mock server and the test.
#[derive(Default)]
pub struct SecretManagement {
    /// While set, every request is answered 503 (an outage).
    pub down: AtomicBool,
    /// Requests refused during outages.
    pub refused: AtomicUsize,
    /// Every version ever issued per name, in order (version `n` at index `n - 1`); a deleted
    /// version is `None`, so version numbers are never reused.
    versions: Mutex<HashMap<String, Vec<Option<Value>>>>,
}

impl SecretManagement {
    /// Starts a mock server serving a fresh service; the server lives as long as the returned handle.
    pub async fn start() -> (Arc<Self>, MockServer) {
        let service = Arc::new(Self::default());
        let server = MockServer::start().await;
        Mock::given(path_regex("^/api/v1/secrets/.+")).respond_with(Serving(service.clone())).mount(&server).await;
        (service, server)
    }

    /// The names of the secrets kept now.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Every version of every secret kept now, as JSON text: what a test searches for a value.
    pub fn dump(&self) -> String {
        Value::from(self.lock().values().flatten().flatten().cloned().collect::<Vec<_>>()).to_string()
    }

    /// How many versions of `name` are kept now.
    pub fn versions_kept(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, |versions| versions.iter().flatten().count())
    }

    /// The newest version of `name` kept now.
    pub fn latest(&self, name: &str) -> Option<Value> {
        self.lock().get(name)?.iter().rev().flatten().next().cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Option<Value>>>> {
        self.versions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The service as mounted on a mock server.
pub struct Serving(pub Arc<SecretManagement>);

fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("a UTF-8 name")
}

impl Respond for Serving {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let service = &self.0;
        if service.down.load(Ordering::SeqCst) {
            service.refused.fetch_add(1, Ordering::SeqCst);
            return ResponseTemplate::new(503);
        }
        let expected = format!("Bearer {SERVICE_TOKEN}");
        if request.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return ResponseTemplate::new(401);
        }
        let path = request.url.path().trim_start_matches("/api/v1/secrets/");
        let query = |key: &str| request.url.query_pairs().find(|(k, _)| k == key).and_then(|(_, v)| v.parse::<usize>().ok());
        let mut secrets = service.lock();
        if let (Some(name), "DELETE") = (path.strip_suffix("/versions"), request.method.as_str()) {
            // Every version issued before `before`.
            let Some(before) = query("before") else { return ResponseTemplate::new(400) };
            return match secrets.get_mut(&percent_decoded(name)) {
                Some(versions) => {
                    versions.iter_mut().take(before.saturating_sub(1)).for_each(|v| *v = None);
                    ResponseTemplate::new(204)
                }
                None => ResponseTemplate::new(404),
            };
        }
        let name = percent_decoded(path);
        match request.method.as_str() {
            "PUT" => {
                let Ok(body) = request.body_json::<Value>() else { return ResponseTemplate::new(400) };
                let versions = secrets.entry(name.clone()).or_default();
                versions.push(Some(body["value"].clone()));
                // Versions as numbers: the adapter takes a string or a number.
                ResponseTemplate::new(201).set_body_json(json!({"name": name, "version": versions.len()}))
            }
            "GET" => {
                let version = query("version");
                match version.and_then(|v| secrets.get(&name)?.get(v.checked_sub(1)?)?.as_ref()) {
                    Some(value) => ResponseTemplate::new(200).set_body_json(json!({"name": name, "version": version, "value": value})),
                    None => ResponseTemplate::new(404),
                }
            }
            "DELETE" => ResponseTemplate::new(if secrets.remove(&name).is_some() { 204 } else { 404 }),
            _ => ResponseTemplate::new(405),
        }
    }
}
