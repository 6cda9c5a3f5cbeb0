//! OAuth2 connections against a fake authorization server on loopback: the tenant's OAuth app on
//! the integration (client secret in the secret store, never shown), the authorization code flow
//! with PKCE (S256), refused, reused and expired states, tokens in the secret store only (one
//! version kept), refreshes serialised per connection (20 concurrent calls, one refresh), a
//! refused refresh, and cached client-credentials tokens.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use im_domain::auth::{Caller, Role};
use im_domain::connection::ConnectionId;
use im_domain::custom::{HttpMethod, Pagination, RequestTemplate};
use im_domain::provider_client::{ApiTarget, AuthMaterial, CredentialSource, ProviderClient, ProviderRequest};
use im_domain::services::ConnectionCredentials;
use im_domain::{DomainError, IntegrationId, TenantId, UserId};
use im_testkit::fake_oauth2::FakeOAuth2;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::events::{Recorder, assert_matches_schema};
use crate::helpers::{TestApp, backend_is_cosmos, database_contains, header, problem, spawn_app_with, spawn_with_secret_management};

const CLIENT_ID: &str = "tenant-app";
const CLIENT_SECRET: &str = "app-Secret-0123456789-value";
const CALLBACK: &str = "http://127.0.0.1:9/api/v1/oauth2/callback";
const RETURN_URL: &str = "https://app.example.com/integrations/done";

struct Setup {
    app: TestApp,
    fake: FakeOAuth2,
    tenant: String,
    token: String,
    integration: String,
    /// Follows no redirect.
    browser: reqwest::Client,
}

async fn setup() -> Setup {
    setup_with(false, |_| {}).await
}

/// The app (with a Secret Management fake of its own when `secret_management`, whatever
/// `IM_TEST_SECRETS` says), a provider with the authorization code flow at the fake, and an
/// integration of it with the tenant's OAuth app.
async fn setup_with(secret_management: bool, configure: impl FnOnce(&mut integration_manager::Settings)) -> Setup {
    let fake = FakeOAuth2::start(CLIENT_ID, CLIENT_SECRET).await;
    let settings = |s: &mut integration_manager::Settings| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
        s.oauth2.redirect_url = CALLBACK.into();
        configure(s);
    };
    let app = if secret_management { spawn_with_secret_management(settings).await } else { spawn_app_with(settings).await };
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[Role::Member]);
    let provider = format!("acme-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let body = json!({
        "id": provider, "name": "Acme Tracker", "category": "project-management", "description": "Tracks acme things",
        "authModes": ["oauth2_authorization_code"], "authorizationUrl": fake.authorization_url(), "tokenUrl": fake.token_url(),
        "defaultScopes": ["read"], "apiBaseUrl": "https://api.acme.example", "docsUrl": "https://docs.acme.example",
        "configSchema": {"type": "object"}, "capabilities": {"webhooks": false, "syncEntities": []}
    });
    let created = app.post("/api/v1/providers", &app.admin(), &body).await;
    assert_eq!(created.status(), StatusCode::CREATED, "{}", created.text().await.unwrap());
    let app_body = json!({"clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET});
    let created = app
        .post("/api/v1/integrations", &token, &json!({"providerId": provider, "name": "Acme", "config": {}, "oauth2App": app_body}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let text = created.text().await.unwrap();
    assert!(!text.contains(CLIENT_SECRET), "the client secret is never echoed: {text}");
    let integration: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(integration["oauth2App"], json!({"clientId": CLIENT_ID, "clientSecretHint": "alue"}), "{integration}");
    let integration = integration["id"].as_str().expect("an integration").to_owned();
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Setup { app, fake, tenant, token, integration, browser }
}

fn query(url: &str) -> HashMap<String, String> {
    reqwest::Url::parse(url).unwrap().query_pairs().into_owned().collect()
}

impl Setup {
    fn authorize_path(&self) -> String {
        format!("/api/v1/integrations/{}/connections/oauth2/authorize", self.integration)
    }

    /// Starts an authorization; returns the connection id and the authorization URL.
    async fn start(&self, return_url: Option<&str>) -> (String, String) {
        let mut body = json!({"name": "Acme (alice)", "scopes": ["read", "write"]});
        if let Some(url) = return_url {
            body["returnUrl"] = json!(url);
        }
        let response = self.app.post(&self.authorize_path(), &self.token, &body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let text = response.text().await.unwrap();
        assert!(!text.contains(CLIENT_SECRET), "the client secret is never echoed: {text}");
        let started: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(started["connection"]["status"], "pending_authorization");
        assert_eq!(started["connection"]["authMode"], "oauth2_authorization_code");
        let id = started["connection"]["id"].as_str().unwrap().to_owned();
        (id, started["authorizationUrl"].as_str().unwrap().to_owned())
    }

    /// The user approves at the fake: returns the code and state it redirects back with.
    async fn approve(&self, authorization_url: &str) -> (String, String) {
        let response = self.browser.get(authorization_url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FOUND, "the fake accepts the authorization request");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        assert!(location.starts_with(CALLBACK), "{location}");
        let back = query(&location);
        (back["code"].clone(), back["state"].clone())
    }

    async fn callback(&self, params: &[(&str, &str)]) -> reqwest::Response {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/oauth2/callback", self.app.address), params).unwrap();
        self.browser.get(url).send().await.unwrap()
    }

    async fn connection(&self, id: &str) -> Value {
        self.app.get(&format!("/api/v1/integrations/{}/connections/{id}", self.integration), &self.token).await.json().await.unwrap()
    }

    async fn credentials(&self, id: &str) -> ConnectionCredentials {
        let caller = Caller::new(TenantId::new(self.tenant.as_str()).unwrap(), UserId::new("alice").unwrap(), vec![Role::Member]);
        let integration = IntegrationId::parse(&self.integration).unwrap();
        self.app.state.connections.credentials(&caller, integration, ConnectionId::parse(id).unwrap()).await.expect("credentials")
    }

    /// An active connection whose first token expires in `expires_in` seconds.
    async fn authorized(&self, expires_in: u64) -> String {
        self.fake.set_expires_in(expires_in);
        let (id, url) = self.start(None).await;
        let (code, state) = self.approve(&url).await;
        assert_eq!(self.callback(&[("code", &code), ("state", &state)]).await.status(), StatusCode::OK);
        self.fake.set_expires_in(3600);
        id
    }
}

#[tokio::test]
async fn the_authorization_code_flow_with_pkce_activates_the_connection_and_keeps_tokens_secret() {
    let s = setup().await;
    let (id, url) = s.start(Some(RETURN_URL)).await;
    let asked = query(&url);
    assert!(url.starts_with(&s.fake.authorization_url()), "{url}");
    assert_eq!((asked["client_id"].as_str(), asked["redirect_uri"].as_str()), (CLIENT_ID, CALLBACK));
    assert_eq!((asked["response_type"].as_str(), asked["code_challenge_method"].as_str()), ("code", "S256"));
    assert_eq!(asked["code_challenge"].len(), 43, "a SHA-256 challenge, base64url");
    assert_eq!(asked["scope"], "read write");
    assert!(!asked["state"].is_empty());

    let (code, state) = s.approve(&url).await;
    let response = s.callback(&[("code", &code), ("state", &state)]).await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(header(&response, "location"), RETURN_URL);
    let active = s.connection(&id).await;
    assert_eq!(active["status"], "active", "{active}");
    assert_eq!(active["scopes"], json!(["read", "write"]));
    assert!(active["tokenExpiresAt"].is_string(), "{active}");
    assert_eq!(s.fake.requests("authorization_code"), 1);

    let material = s.credentials(&id).await.current().await.expect("a token");
    assert_eq!(material, AuthMaterial::Bearer("access-1".into()));
    assert_eq!(s.fake.requests("refresh_token"), 0, "a fresh token is not refreshed");
    if !backend_is_cosmos() {
        for secret in ["access-1", "refresh-", CLIENT_SECRET] {
            assert!(!database_contains(&s.app, secret), "{secret} is in the secret store only");
        }
    }

    // The state is single use.
    let again = problem(s.callback(&[("code", &code), ("state", &state)]).await, StatusCode::CONFLICT).await;
    assert!(again["detail"].as_str().unwrap().contains("already"), "{again}");
    assert_eq!(s.fake.requests("authorization_code"), 1, "a used state exchanges nothing");
}

#[tokio::test]
async fn forged_denied_and_mismatched_authorizations_are_refused_and_the_connection_shows_why() {
    let s = setup().await;
    let recorder = Arc::new(Recorder::default());
    s.app.state.bus.subscribe(recorder.clone());

    // No state, a forged one, one whose payload was changed: 400, nothing touched.
    problem(s.callback(&[("code", "c")]).await, StatusCode::BAD_REQUEST).await;
    problem(s.callback(&[("code", "c"), ("state", "bm90LWEtc3RhdGU.c2ln")]).await, StatusCode::BAD_REQUEST).await;
    let (id, url) = s.start(None).await;
    let state = query(&url)["state"].clone();
    let (payload, signature) = state.split_once('.').unwrap();
    let tampered = format!("{}x.{signature}", payload);
    problem(s.callback(&[("code", "c"), ("state", &tampered)]).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(s.connection(&id).await["status"], "pending_authorization");

    // The user refuses: 409, the connection is revoked with the reason and an event says so.
    let denied = problem(s.callback(&[("error", "access_denied"), ("state", &state)]).await, StatusCode::CONFLICT).await;
    assert!(denied["detail"].as_str().unwrap().contains("access_denied"), "{denied}");
    let revoked = s.connection(&id).await;
    assert_eq!(revoked["status"], "revoked");
    assert!(revoked["statusReason"].as_str().unwrap().contains("access_denied"), "{revoked}");
    let events: Vec<_> = {
        let mut found = Vec::new();
        for _ in 0..200 {
            found = recorder.0.lock().unwrap().iter().filter(|e| e.subject == id).cloned().collect::<Vec<_>>();
            if found.iter().any(|e| e.event_type.as_str() == "integration.connection.failed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        found
    };
    let failed = events.iter().find(|e| e.event_type.as_str() == "integration.connection.failed").expect("a failed event");
    assert_matches_schema(&failed.cloud_event());
    assert!(!failed.cloud_event().to_string().contains(CLIENT_SECRET));

    // A code exchanged with another authorization's verifier: the fake refuses it (PKCE), the
    // connection is marked and nothing is stored.
    let (first, first_url) = s.start(None).await;
    let (second, second_url) = s.start(None).await;
    let (first_code, _) = s.approve(&first_url).await;
    let (_, second_state) = s.approve(&second_url).await;
    let refused = problem(s.callback(&[("code", &first_code), ("state", &second_state)]).await, StatusCode::CONFLICT).await;
    assert!(refused["detail"].as_str().unwrap().contains("invalid_grant"), "{refused}");
    let marked = s.connection(&second).await;
    assert_eq!(marked["status"], "error");
    assert!(marked["statusReason"].as_str().unwrap().contains("invalid_grant"), "{marked}");
    assert!(s.fake.issued().is_empty(), "no token was issued");
    assert_eq!(s.connection(&first).await["status"], "pending_authorization");
    let unusable = s.credentials(&second).await.current().await;
    assert!(matches!(unusable, Err(DomainError::Conflict(_))), "{unusable:?}");
}

#[tokio::test]
async fn authorize_bodies_are_checked_and_return_urls_must_be_https() {
    let s = setup().await;
    let path = s.authorize_path();
    let bad = json!({"name": "", "returnUrl": "javascript:alert(1)"});
    let found = problem(s.app.post(&path, &s.token, &bad).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let fields = crate::helpers::fields(&found);
    assert!(fields.contains(&"name".to_owned()) && fields.contains(&"returnUrl".to_owned()), "{found}");
    let http = json!({"name": "x", "returnUrl": "http://evil.example/"});
    let found = problem(s.app.post(&path, &s.token, &http).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(crate::helpers::fields(&found), ["returnUrl"]);
    let missing = json!({"scopes": ["read"]});
    problem(s.app.post(&path, &s.token, &missing).await, StatusCode::BAD_REQUEST).await;
    // The app is the integration's: an authorization no longer takes one.
    let app_in_body = json!({"name": "x", "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET});
    let refused = problem(s.app.post(&path, &s.token, &app_in_body).await, StatusCode::BAD_REQUEST).await;
    assert!(!refused.to_string().contains(CLIENT_SECRET), "{refused}");
    let unknown = json!({"name": "x", "password": "p"});
    problem(s.app.post(&path, &s.token, &unknown).await, StatusCode::BAD_REQUEST).await;
    // An integration of the same provider without an app: 422 naming oauth2App, nothing created.
    let provider =
        s.app.get(&format!("/api/v1/integrations/{}", s.integration), &s.token).await.json::<Value>().await.unwrap()["providerId"].clone();
    let bare: Value = s
        .app
        .post("/api/v1/integrations", &s.token, &json!({"providerId": provider, "name": "No app", "config": {}}))
        .await
        .json()
        .await
        .unwrap();
    let bare_base = format!("/api/v1/integrations/{}/connections", bare["id"].as_str().unwrap());
    let no_app = problem(
        s.app.post(&format!("{bare_base}/oauth2/authorize"), &s.token, &json!({"name": "x"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(crate::helpers::fields(&no_app), ["oauth2App"], "{no_app}");
    let listed: Value = s.app.get(&bare_base, &s.token).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "nothing was created: {listed}");
    // A GitHub integration of the built-in catalog has OAuth2 too; an api-key-only custom one does not.
    let custom = json!({"providerId": "custom", "name": "Keyed", "customDefinition": crate::helpers::custom_definition()});
    let keyed: Value = s.app.post("/api/v1/integrations", &s.token, &custom).await.json().await.unwrap();
    let keyed_path = format!("/api/v1/integrations/{}/connections/oauth2/authorize", keyed["id"].as_str().unwrap());
    let body = json!({"name": "x"});
    problem(s.app.post(&keyed_path, &s.token, &body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    // Another tenant's integration is not found.
    let other = s.app.token("t-other-tenant", "mallory", &[Role::Member]);
    problem(s.app.post(&path, &other, &body).await, StatusCode::NOT_FOUND).await;
}

/// The `integration.connection.failed` events of connection `id` once one arrived (or none after 5 s).
async fn failed_events(recorder: &Recorder, id: &str) -> Vec<im_domain::events::DomainEvent> {
    let mut failed = Vec::new();
    for _ in 0..200 {
        failed = recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.subject == id && e.event_type.as_str() == "integration.connection.failed")
            .cloned()
            .collect::<Vec<_>>();
        if !failed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    failed
}

/// A provider API that accepts one bearer token.
async fn api_accepting(token: &str) -> wiremock::MockServer {
    use wiremock::matchers::{header as has_header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/me"))
        .and(has_header("authorization", format!("Bearer {token}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"login": "alice"})))
        .mount(&api)
        .await;
    Mock::given(method("GET")).and(path("/me")).respond_with(ResponseTemplate::new(401)).with_priority(10).mount(&api).await;
    api
}

fn provider_client() -> im_webhook_sender::provider::HttpProviderClient {
    let policy = im_domain::webhooks::endpoint::UrlPolicy {
        allow_http: true,
        allowed_private: vec![im_domain::webhooks::endpoint::Cidr::parse("127.0.0.0/8").unwrap()],
    };
    let settings =
        im_webhook_sender::provider::ProviderClientSettings { max_concurrency_per_connection: 32, burst: 100, ..Default::default() };
    im_webhook_sender::provider::HttpProviderClient::new(settings, policy).unwrap()
}

fn me(api: &wiremock::MockServer) -> (ApiTarget, ProviderRequest) {
    let target = ApiTarget { base_url: api.uri(), default_headers: BTreeMap::new(), pagination: Pagination::None };
    let template = RequestTemplate { method: HttpMethod::Get, path: "/me".into(), query: BTreeMap::new(), items_path: None };
    (target, ProviderRequest { template, path_params: BTreeMap::new(), extra_query: BTreeMap::new(), body: None })
}

#[tokio::test]
async fn twenty_concurrent_calls_with_an_expiring_token_cause_one_refresh_and_a_401_one_more() {
    let s = setup().await;
    // The first token expires within the refresh skew (60s): every call needs a new one.
    let id = s.authorized(30).await;
    s.fake.set_token_delay(Duration::from_millis(300));
    let api = api_accepting("access-2").await;
    let client = Arc::new(provider_client());
    let credentials = Arc::new(s.credentials(&id).await);
    let (target, request) = me(&api);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (client, credentials, target, request, id) =
                (client.clone(), credentials.clone(), target.clone(), request.clone(), id.clone());
            tokio::spawn(async move { client.send(&id, &target, &request, credentials.as_ref()).await })
        })
        .collect();
    for call in calls {
        let answer = call.await.unwrap().expect("the call succeeds");
        assert_eq!(answer.status, 200);
    }
    assert_eq!(s.fake.requests("refresh_token"), 1, "one refresh for twenty callers");
    let refreshed = s.connection(&id).await;
    assert_eq!(refreshed["status"], "active");
    let expires: String = refreshed["tokenExpiresAt"].as_str().unwrap().to_owned();
    let expires = time::OffsetDateTime::parse(&expires, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(expires > time::OffsetDateTime::now_utc() + time::Duration::minutes(50), "the new token's expiry is shown");

    // The provider refuses the current token: it is refreshed once and the call retried.
    s.fake.set_token_delay(Duration::ZERO);
    let api = api_accepting("access-3").await;
    let (target, request) = me(&api);
    let answer = client.send(&id, &target, &request, credentials.as_ref()).await.expect("the call succeeds after a refresh");
    assert_eq!(answer.status, 200);
    assert_eq!(s.fake.requests("refresh_token"), 2);
}

#[tokio::test]
async fn a_refresh_the_provider_refuses_marks_the_connection_refresh_failed_with_an_event() {
    let s = setup().await;
    let recorder = Arc::new(Recorder::default());
    s.app.state.bus.subscribe(recorder.clone());
    let id = s.authorized(10).await;
    s.fake.refuse_refresh(true);
    let refused = s.credentials(&id).await.current().await;
    assert!(matches!(&refused, Err(DomainError::Conflict(why)) if why.contains("invalid_grant")), "{refused:?}");
    let marked = s.connection(&id).await;
    assert_eq!(marked["status"], "refresh_failed");
    assert!(marked["statusReason"].as_str().unwrap().contains("invalid_grant"), "{marked}");
    // The connection no longer tries: no second refresh request.
    let again = s.credentials(&id).await.current().await;
    assert!(matches!(again, Err(DomainError::Conflict(_))));
    assert_eq!(s.fake.requests("refresh_token"), 1);
    let failed = failed_events(&recorder, &id).await;
    assert_eq!(failed.len(), 1, "one event");
    let cloud = failed[0].cloud_event();
    assert_matches_schema(&cloud);
    assert_eq!(cloud["data"]["status"], "refresh_failed");
}

#[tokio::test]
async fn client_credentials_tokens_are_fetched_and_cached_until_shortly_before_expiry() {
    let s = setup().await;
    let mut definition = crate::helpers::custom_definition();
    definition["auth"] = json!({"type": "oauth2_client_credentials", "tokenUrl": s.fake.token_url(), "scopes": ["read"]});
    let body = json!({"providerId": "custom", "name": "Machine", "customDefinition": definition});
    let integration: Value = s.app.post("/api/v1/integrations", &s.token, &body).await.json().await.unwrap();
    let base = format!("/api/v1/integrations/{}/connections", integration["id"].as_str().unwrap());
    let connection = json!({"name": "machine", "authMode": "oauth2_client_credentials",
        "credentials": {"clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET, "scopes": ["read"]}});
    let created = s.app.post(&base, &s.token, &connection).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let setup = Setup { integration: integration["id"].as_str().unwrap().to_owned(), ..s };

    // A token expiring within the skew is fetched again; one good for an hour is reused.
    setup.fake.set_expires_in(30);
    let first = setup.credentials(&id).await.current().await.expect("a token");
    setup.fake.set_expires_in(3600);
    let second = setup.credentials(&id).await.current().await.expect("a token");
    let third = setup.credentials(&id).await.current().await.expect("a token");
    assert_eq!(first, AuthMaterial::Bearer("access-1".into()));
    assert_eq!(second, AuthMaterial::Bearer("access-2".into()));
    assert_eq!(third, second, "cached");
    assert_eq!(setup.fake.requests("client_credentials"), 2);
    let shown = setup.connection(&id).await;
    assert!(shown["tokenExpiresAt"].is_string(), "{shown}");
    assert!(!shown.to_string().contains("access-2"));

    // Wrong app credentials: the token endpoint refuses them and the connection says so.
    let wrong = json!({"name": "machine", "authMode": "oauth2_client_credentials",
        "credentials": {"clientId": CLIENT_ID, "clientSecret": "not-the-secret-0123", "scopes": ["read"]}});
    let created: Value = setup.app.post(&base, &setup.token, &wrong).await.json().await.unwrap();
    let wrong_id = created["id"].as_str().unwrap().to_owned();
    let refused = setup.credentials(&wrong_id).await.current().await;
    assert!(matches!(&refused, Err(DomainError::Conflict(why)) if why.contains("invalid_client")), "{refused:?}");
    assert_eq!(setup.connection(&wrong_id).await["status"], "refresh_failed");
}

#[tokio::test]
async fn a_callback_after_the_state_ttl_is_422_and_the_connection_expires_without_a_token() {
    let s = setup_with(false, |s| s.oauth2.state_ttl = im_domain::HumanDuration(Duration::from_secs(1))).await;
    let recorder = Arc::new(Recorder::default());
    s.app.state.bus.subscribe(recorder.clone());
    let (id, url) = s.start(None).await;
    let (code, state) = s.approve(&url).await;
    // Past the 1 s lifetime (states count whole seconds).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = problem(s.callback(&[("code", &code), ("state", &state)]).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(crate::helpers::fields(&expired), ["state"], "{expired}");
    assert!(expired.to_string().contains("expired"), "{expired}");
    let shown = s.connection(&id).await;
    assert_eq!(shown["status"], "expired", "{shown}");
    assert!(shown["statusReason"].as_str().is_some_and(|r| r.contains("not completed within 1s")), "{shown}");
    assert!(shown.get("tokenExpiresAt").is_none_or(Value::is_null), "no token: {shown}");
    assert_eq!(s.fake.requests("authorization_code"), 0, "an expired state exchanges no code");
    assert!(s.fake.issued().is_empty(), "no token was issued, so none can be stored");
    let unusable = s.credentials(&id).await.current().await;
    assert!(matches!(unusable, Err(DomainError::Conflict(_))), "{unusable:?}");
    // The state stays spent: the connection is no longer pending.
    problem(s.callback(&[("code", &code), ("state", &state)]).await, StatusCode::CONFLICT).await;
    let failed = failed_events(&recorder, &id).await;
    assert_eq!(failed.len(), 1, "one event");
    assert_eq!(failed[0].cloud_event()["data"]["status"], "expired");
}

#[tokio::test]
async fn the_oauth_app_is_the_integrations_and_a_refresh_keeps_only_the_current_secret_version() {
    // Audit records go to a Logging Service fake, so they can be read back.
    let logging = im_testkit::audit::FakeLoggingService::start("logging-token").await;
    let url = logging.url();
    let s = setup_with(true, |s| {
        s.logging.backend = integration_manager::config::PlatformBackend::Http;
        s.logging.http.url = url;
        s.logging.http.token = "logging-token".into();
        s.logging.shipper.interval = im_domain::HumanDuration(Duration::from_millis(100));
    })
    .await;
    let secrets = s.app.secret_management.clone().expect("a Secret Management fake").service;
    let app_secret = format!("integration-manager/{}/oauth2-app/{}", s.tenant, s.integration);
    assert_eq!(secrets.versions_kept(&app_secret), 1, "the client secret is kept under {app_secret}: {:?}", secrets.names());

    // Authorized with the integration's app (the fake checks the client secret), the pending
    // version of the connection's secret is gone once the tokens are referenced.
    let id = s.authorized(30).await;
    let name = format!("integration-manager/{}/connection/{id}", s.tenant);
    assert_eq!(secrets.versions_kept(&name), 1, "only the tokens' version is kept");
    let kept = secrets.latest(&name).expect("the connection's secret");
    assert_eq!(kept["accessToken"], "access-1");
    assert!(kept.get("pending").is_none(), "the pending version was pruned: it is not the one kept");
    assert!(kept.get("clientSecret").is_none() && kept.get("clientId").is_none(), "the connection keeps no app");
    assert!(!secrets.dump().contains("nonceHash"));

    // A refresh (the token expires within the skew) writes a new version and prunes the old one;
    // a source made before the refresh keeps working with the version current at each call.
    let source = s.credentials(&id).await;
    assert_eq!(source.current().await.expect("a refreshed token"), AuthMaterial::Bearer("access-2".into()));
    assert_eq!(s.fake.requests("refresh_token"), 1);
    assert_eq!(secrets.versions_kept(&name), 1, "the superseded version is deleted");
    let after = secrets.dump();
    assert!(after.contains("access-2") && !after.contains("access-1"), "only the current token is kept");
    assert_eq!(source.current().await.expect("the cached token"), AuthMaterial::Bearer("access-2".into()));

    // Keeping the app: the same clientId without a secret. Changing the clientId needs one (422).
    let path = format!("/api/v1/integrations/{}", s.integration);
    let current: Value = s.app.get(&path, &s.token).await.json().await.unwrap();
    let mut body = json!({"providerId": current["providerId"], "name": "Acme", "config": {}, "oauth2App": {"clientId": CLIENT_ID}});
    let kept = s.app.put(&path, &s.token, &body, None).await;
    assert_eq!(kept.status(), StatusCode::OK);
    assert_eq!(kept.json::<Value>().await.unwrap()["oauth2App"], json!({"clientId": CLIENT_ID, "clientSecretHint": "alue"}));
    assert_eq!(secrets.versions_kept(&app_secret), 1);
    body["oauth2App"] = json!({"clientId": "another-app"});
    let refused = problem(s.app.put(&path, &s.token, &body, None).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(crate::helpers::fields(&refused), ["oauth2App.clientSecret"], "{refused}");
    // The read-only hint may be sent back (ignored); an absent app is kept.
    body["oauth2App"] = json!({"clientId": CLIENT_ID, "clientSecretHint": "alue"});
    assert_eq!(s.app.put(&path, &s.token, &body, None).await.status(), StatusCode::OK);
    body.as_object_mut().unwrap().remove("oauth2App");
    let absent = s.app.put(&path, &s.token, &body, None).await;
    assert_eq!(absent.json::<Value>().await.unwrap()["oauth2App"]["clientId"], CLIENT_ID);

    // Replacing the secret: the next refresh uses the new one (the fake refuses it: invalid_client),
    // and only the new secret is kept.
    let wrong = "replaced-Secret-9876543210";
    body["oauth2App"] = json!({"clientId": CLIENT_ID, "clientSecret": wrong});
    let replaced = s.app.put(&path, &s.token, &body, None).await;
    assert_eq!(replaced.status(), StatusCode::OK);
    let text = replaced.text().await.unwrap();
    assert!(!text.contains(wrong), "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["oauth2App"]["clientSecretHint"], "3210");
    assert_eq!(secrets.versions_kept(&app_secret), 1, "the old secret is deleted");
    assert!(secrets.dump().contains(wrong) && !secrets.dump().contains(CLIENT_SECRET));
    let stale = source.after_unauthorized(&AuthMaterial::Bearer("access-2".into())).await;
    assert!(matches!(&stale, Err(DomainError::Conflict(why)) if why.contains("invalid_client")), "{stale:?}");
    assert_eq!(s.connection(&id).await["status"], "refresh_failed");

    // Deleting the integration (after its connection) deletes the app's secret.
    let connection = format!("{path}/connections/{id}");
    assert_eq!(s.app.delete(&connection, &s.token, None).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(s.app.delete(&path, &s.token, None).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(secrets.versions_kept(&app_secret), 0, "the app's secret went with the integration");
    assert!(!secrets.dump().contains(wrong));

    // The secret's writes and reads are audit records, which never hold it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records: Vec<Value> = logging.records().into_values().filter(|r| r["tenantId"] == s.tenant.as_str()).collect();
        if records.iter().any(|r| r["action"] == "integration.delete") {
            break records;
        }
        assert!(std::time::Instant::now() < deadline, "the audit records never arrived: {records:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = Value::from(records.clone()).to_string();
    assert!(!text.contains(CLIENT_SECRET) && !text.contains(wrong), "{text}");
    let of = |action: &str| records.iter().filter(|r| r["action"] == action).cloned().collect::<Vec<_>>();
    assert_eq!(of("integration.create")[0]["details"]["oauth2App"], json!({"clientId": CLIENT_ID, "clientSecret": "written"}));
    let updates: Vec<Value> = of("integration.update").iter().map(|r| r["details"]["oauth2App"]["clientSecret"].clone()).collect();
    assert!(updates.contains(&json!("kept")) && updates.contains(&json!("written")), "{updates:?}");
    let reads = of("integration.use_credentials");
    assert!(reads.len() >= 3, "the code exchange and each refresh read the client secret: {reads:?}");
    assert!(reads.iter().all(|r| r["details"]["secret"] == "oauth2App.clientSecret" && r["resourceId"] == s.integration.as_str()));
}
