use std::path::{Path, PathBuf};
use std::sync::Arc;

use im_domain::{Role, TenantId, UserId};
use integration_manager::{Application, Settings};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};

/// A request being built; [`Checked::send`] checks the exchange against the OpenAPI document
/// (`crate::contract`).
pub struct Checked {
    inner: RequestBuilder,
    method: Method,
    path: String,
    body: Option<Value>,
}

impl Checked {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.inner = self.inner.header(name, value);
        self
    }

    pub fn json(mut self, body: &Value) -> Self {
        self.inner = self.inner.json(body);
        self.body = Some(body.clone());
        self
    }

    /// A raw body: the exchange's answer is checked, the body itself is not (it may not be JSON).
    pub fn body(mut self, body: impl Into<reqwest::Body>) -> Self {
        self.inner = self.inner.body(body);
        self
    }

    pub async fn send(self) -> reqwest::Result<Response> {
        let response = self.inner.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let version = response.version();
        let bytes = response.bytes().await?;
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
        crate::contract::check(&self.method, &self.path, self.body.as_ref(), status, content_type, &bytes);
        let mut rebuilt = http::Response::new(bytes);
        *rebuilt.status_mut() = status;
        *rebuilt.headers_mut() = headers;
        *rebuilt.version_mut() = version;
        Ok(Response::from(rebuilt))
    }
}

/// A running service and what a test needs to talk to it.
pub struct TestApp {
    pub address: String,
    pub state: actix_web::web::Data<integration_manager::AppState>,
    pub client: reqwest::Client,
    pub settings: Settings,
    shutdown: integration_manager::startup::Shutdown,
    /// `None` once stopped.
    running: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Keeps the data directory alive as long as the app (and across restarts).
    pub dir: Arc<tempfile::TempDir>,
    /// The Secret Management fake the app keeps its secrets in, when it uses the HTTP secret store.
    pub secret_management: Option<SecretManagementFake>,
    /// This app's use of the broker objects it declares (RabbitMQ events backend).
    broker: Option<BrokerObjects>,
}

/// The work queue and the exchange of a test's apps on the broker (names `im-api-test-*`),
/// deleted once no app of the process uses them any more, so that test runs leave nothing on
/// the broker (the delay queues expire by themselves, ten minutes after their last use). Each
/// app holds one use until it has stopped (a dropped `TestApp` is stopped first: see its
/// `Drop`); a restart holds one more across its stop.
struct BrokerObjects {
    url: String,
    exchange: String,
    queue_prefix: String,
}

/// Whether a broker object is one the API suite named (and may delete).
fn ours(name: &str) -> bool {
    name.starts_with("im-api-test-")
}

/// Apps using each (exchange, queue prefix) of the broker.
static BROKER_USERS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<(String, String), usize>>> =
    std::sync::LazyLock::new(Default::default);

impl BrokerObjects {
    /// One more use of the objects `settings` name, when they are a test's own.
    fn used_by(settings: &Settings) -> Option<Self> {
        let rabbit = &settings.rabbitmq;
        if settings.events.backend != integration_manager::config::EventsBackend::Rabbitmq
            || !(ours(&rabbit.exchange) || ours(&rabbit.delivery_queue_prefix))
        {
            return None;
        }
        // The broker itself, not the address the app was given (a test's proxy may be cut).
        let url = im_testkit::services::amqp_url(im_testkit::services::rabbitmq_addr());
        let objects = Self { url, exchange: rabbit.exchange.clone(), queue_prefix: rabbit.delivery_queue_prefix.clone() };
        *BROKER_USERS.lock().unwrap().entry(objects.key()).or_default() += 1;
        Some(objects)
    }

    fn key(&self) -> (String, String) {
        (self.exchange.clone(), self.queue_prefix.clone())
    }
}

impl Drop for BrokerObjects {
    fn drop(&mut self) {
        {
            let mut users = BROKER_USERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let left = users.get_mut(&self.key()).map(|n| {
                *n -= 1;
                *n
            });
            if left != Some(0) {
                return;
            }
            users.remove(&self.key());
        }
        // Deleted on a thread of its own (a drop cannot wait for a future), bounded: a broker
        // that is away (a test stopped it) leaves them, as a crash would.
        let (url, exchange, prefix) = (self.url.clone(), self.exchange.clone(), self.queue_prefix.clone());
        let deleting = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                let delete = im_testkit::rabbit::delete_declared(
                    &url,
                    Some(prefix.as_str()).filter(|p| ours(p)),
                    Some(exchange.as_str()).filter(|e| ours(e)),
                );
                let _ = tokio::time::timeout(std::time::Duration::from_secs(3), delete).await;
            });
        });
        let _ = deleting.join();
    }
}

/// A Secret Management fake and the server it answers on (alive as long as this value).
#[derive(Clone)]
pub struct SecretManagementFake {
    pub service: Arc<im_testkit::secret_management::SecretManagement>,
    server: Arc<wiremock::MockServer>,
}

impl SecretManagementFake {
    pub async fn start() -> Self {
        let (service, server) = im_testkit::secret_management::SecretManagement::start().await;
        Self { service, server: Arc::new(server) }
    }

    /// Points `settings` at this fake with the HTTP secret store.
    pub fn configure(&self, settings: &mut Settings) {
        settings.secrets.backend = integration_manager::config::SecretsBackend::Http;
        settings.secrets.http.url = self.server.uri();
        settings.secrets.http.token = im_testkit::secret_management::SERVICE_TOKEN.to_owned().into();
    }
}

/// The black-box suite runs once per store backend: `IM_TEST_BACKEND=cosmos` selects Cosmos DB
/// (the Cosmos test server), anything else the embedded store.
pub fn backend_is_cosmos() -> bool {
    std::env::var("IM_TEST_BACKEND").is_ok_and(|b| b == "cosmos")
}

/// `IM_TEST_SECRETS=http` runs the suite with the HTTP secret store against a Secret Management
/// fake (one per app); anything else, the local secret store.
pub fn secrets_over_http() -> bool {
    std::env::var("IM_TEST_SECRETS").is_ok_and(|b| b == "http")
}

/// `IM_TEST_EVENTS=rabbitmq` runs the suite with events and delivery jobs on RabbitMQ.
pub fn events_on_rabbitmq() -> bool {
    std::env::var("IM_TEST_EVENTS").is_ok_and(|b| b == "rabbitmq")
}

fn init_logs() {
    // Quiet unless RUST_LOG asks otherwise.
    integration_manager::telemetry::init(&integration_manager::config::LogSettings {
        format: integration_manager::config::LogFormat::Pretty,
        level: "warn".into(),
    });
}

/// A client whose every request fails after a minute: a request that hangs fails its test
/// instead of holding the run.
fn test_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build().expect("a client")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_in(Arc::new(tempfile::tempdir().expect("temp dir")), configure).await
}

pub async fn spawn_in(dir: Arc<tempfile::TempDir>, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let fake = if secrets_over_http() { Some(SecretManagementFake::start().await) } else { None };
    spawn_with(dir, fake, configure).await
}

/// An app whose secrets are kept by a fresh Secret Management fake, whatever `IM_TEST_SECRETS` says.
pub async fn spawn_with_secret_management(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let fake = SecretManagementFake::start().await;
    spawn_with(Arc::new(tempfile::tempdir().expect("temp dir")), Some(fake), configure).await
}

async fn spawn_with(dir: Arc<tempfile::TempDir>, fake: Option<SecretManagementFake>, configure: impl FnOnce(&mut Settings)) -> TestApp {
    init_logs();
    let mut settings = Settings::defaults();
    settings.server.host = "127.0.0.1".into();
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.server.shutdown_timeout = integration_manager::config::HumanDuration::parse("5s").unwrap();
    settings.storage.data_dir = dir.path().to_owned();
    if backend_is_cosmos() {
        let endpoint = im_testkit::cosmos::endpoint("the API suite on the cosmos backend")
            .expect("IM_TEST_BACKEND=cosmos needs the Cosmos test server (node and npm)");
        settings.storage.backend = integration_manager::config::StorageBackend::Cosmos;
        settings.cosmos_db.endpoint = endpoint;
        settings.cosmos_db.key = im_store_cosmos::EMULATOR_KEY.into();
        settings.cosmos_db.database = im_testkit::cosmos::fresh_database();
        settings.cosmos_db.emulator = true;
        settings.cosmos_db.auto_provision = true;
        // One instance per test: its data directory is the only one.
        settings.secrets.local_shared_data_dir = true;
        settings.cosmos_db.request_timeout = integration_manager::config::HumanDuration::parse("30s").unwrap();
    }
    if events_on_rabbitmq() {
        let addr = im_testkit::services::rabbitmq("the API suite on the rabbitmq events backend")
            .expect("IM_TEST_EVENTS=rabbitmq needs RabbitMQ on 127.0.0.1:5672");
        settings.events.backend = integration_manager::config::EventsBackend::Rabbitmq;
        settings.rabbitmq.url = im_testkit::services::amqp_url(addr).into();
        let unique = uuid::Uuid::new_v4().simple().to_string();
        settings.rabbitmq.exchange = format!("im-api-test-{unique}");
        settings.rabbitmq.delivery_queue_prefix = format!("im-api-test-{unique}");
    }
    if let Some(fake) = &fake {
        fake.configure(&mut settings);
    }
    configure(&mut settings);
    let app = Application::build(settings.clone()).await.expect("the app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let shutdown = app.shutdown();
    let state = app.state();
    let running = tokio::spawn(app.run_until_stopped());
    let broker = BrokerObjects::used_by(&settings);
    TestApp { address, state, client: test_client(), settings, shutdown, running: Some(running), dir, secret_management: fake, broker }
}

/// A test that ends without `stop` stops its apps here: on a multi-threaded runtime the app
/// drains and its use of the broker objects ends when it has stopped; on the default
/// current-thread runtime, ending with the test, the app and that use end with the runtime.
/// Either way no app of an ended test declares the objects again after their deletion.
impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.trigger();
        let (running, broker) = (self.running.take(), self.broker.take());
        if let (Some(running), Ok(runtime)) = (running, tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                let _ = running.await;
                drop(broker);
            });
        }
    }
}

impl TestApp {
    /// Stops this instance and starts another on the same data directory.
    pub async fn restart(self) -> TestApp {
        let (settings, dir, fake) = (self.settings.clone(), self.dir.clone(), self.secret_management.clone());
        // Its broker objects (and the jobs queued there) outlive the stop.
        let _kept = BrokerObjects::used_by(&settings);
        self.stop().await;
        spawn_with(dir, fake, move |s| *s = settings).await
    }

    /// Stops this instance as SIGTERM does and waits until it has drained.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(running) = self.running.take() {
            running.await.expect("the app task").expect("the app stops cleanly");
        }
    }

    pub fn token(&self, tenant: &str, user: &str, roles: &[Role]) -> String {
        let jwt = integration_manager::startup::local_jwt(&self.settings).expect("jwt");
        jwt.mint(&TenantId::new(tenant).unwrap(), &UserId::new(user).unwrap(), roles, 600).expect("mint")
    }

    /// A fresh tenant's member token.
    pub fn member(&self) -> String {
        self.token(&format!("t-{}", uuid::Uuid::new_v4().simple()), "alice", &[Role::Member])
    }

    pub fn admin(&self) -> String {
        self.token("platform", "root", &[Role::Admin])
    }

    /// A request without a token, checked against the OpenAPI document when sent.
    pub fn anonymous(&self, method: Method, path: &str) -> Checked {
        Checked { inner: self.client.request(method.clone(), format!("{}{path}", self.address)), method, path: path.to_owned(), body: None }
    }

    /// A request whose exchange is checked against the OpenAPI document when sent.
    pub fn request(&self, method: Method, path: &str, token: &str) -> Checked {
        Checked {
            inner: self.client.request(method.clone(), format!("{}{path}", self.address)).bearer_auth(token),
            method,
            path: path.to_owned(),
            body: None,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.request(Method::GET, path, token).send().await.expect("request")
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Response {
        self.request(Method::POST, path, token).json(body).send().await.expect("request")
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value, if_match: Option<&str>) -> Response {
        let mut req = self.request(Method::PUT, path, token).json(body);
        if let Some(etag) = if_match {
            req = req.header("if-match", etag);
        }
        req.send().await.expect("request")
    }

    pub async fn delete(&self, path: &str, token: &str, if_match: Option<&str>) -> Response {
        let mut req = self.request(Method::DELETE, path, token);
        if let Some(etag) = if_match {
            req = req.header("if-match", etag);
        }
        req.send().await.expect("request")
    }

    /// Creates a GitHub integration and returns its body and ETag.
    pub async fn create_github(&self, token: &str, name: &str) -> (Value, String) {
        let response = self.post("/api/v1/integrations", token, &github(name)).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let etag = header(&response, "etag");
        (response.json().await.expect("json"), etag)
    }
}

pub fn github(name: &str) -> Value {
    json!({"providerId": "github", "name": name, "config": {"organization": "acme"}})
}

pub fn header(response: &Response, name: &str) -> String {
    response.headers().get(name).unwrap_or_else(|| panic!("no {name} header")).to_str().unwrap().to_owned()
}

/// Asserts a problem+json answer with `status` and returns it.
pub async fn problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status, "status");
    assert_eq!(header(&response, "content-type"), "application/problem+json");
    let body: Value = response.json().await.expect("problem body");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().is_some_and(|t| !t.is_empty()) && body["title"].is_string() && body["detail"].is_string(), "{body}");
    body
}

/// The `field` of every listed error.
pub fn fields(problem: &Value) -> Vec<String> {
    problem["errors"].as_array().map(|e| e.iter().map(|e| e["field"].as_str().unwrap_or_default().to_owned()).collect()).unwrap_or_default()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

pub fn custom_definition() -> Value {
    json!({
        "baseUrl": "https://api.example.com/v2",
        "auth": {"type": "api_key", "in": "header", "name": "X-Api-Key"},
        "defaultHeaders": {"Accept": "application/json"},
        "pagination": {"style": "cursor", "cursorParam": "cursor", "nextCursorPath": "meta.next", "limitParam": "limit", "pageSize": 100},
        "entities": [{
            "name": "ticket", "idField": "id", "updatedAtField": "updated_at",
            "list": {"method": "GET", "path": "/tickets", "itemsPath": "data"},
            "get": {"method": "GET", "path": "/tickets/{id}"},
            "upsert": {"method": "PUT", "path": "/tickets/{id}"},
            "delete": {"method": "DELETE", "path": "/tickets/{id}"}
        }]
    })
}

/// Whether the embedded database files (main file and write-ahead log) hold `needle` anywhere.
pub fn database_contains(app: &TestApp, needle: &str) -> bool {
    ["integration-manager.db", "integration-manager.db-wal"]
        .iter()
        .map(|name| std::fs::read(app.dir.path().join(name)).unwrap_or_default())
        .any(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
}
