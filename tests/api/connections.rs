//! Connections: credentials in the secret store and never shown, hints only, tenant isolation
//! although the container is partitioned by integration, the credential source other features
//! call providers with, and what deleting an integration with connections does.

use std::sync::Arc;
use std::time::Duration;

use im_domain::auth::{Caller, Role};
use im_domain::connection::{ConnectionId, ConnectionStatus};
use im_domain::custom::ApiKeyLocation;
use im_domain::events::DomainEvent;
use im_domain::provider_client::{AuthMaterial, CredentialSource};
use im_domain::{DomainError, IntegrationId, TenantId, UserId};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::events::{Recorder, assert_matches_schema};
use crate::helpers::{
    TestApp, backend_is_cosmos, custom_definition, database_contains, fields, header, problem, spawn_app, spawn_with_secret_management,
};

const TOKEN: &str = "ghp_Secret0123456789TokenValue";
const NEW_TOKEN: &str = "ghp_Another0123456789Value9876";

fn bearer(name: &str, token: &str) -> Value {
    json!({"name": name, "authMode": "bearer", "credentials": {"token": token}})
}

async fn integration(app: &TestApp, token: &str) -> String {
    let (created, _) = app.create_github(token, "connected").await;
    created["id"].as_str().unwrap().to_owned()
}

/// The caller a token stands for, to reach the services as another feature does.
fn caller(tenant: &str) -> Caller {
    Caller::new(TenantId::new(tenant).unwrap(), UserId::new("alice").unwrap(), vec![Role::Member])
}

async fn source(app: &TestApp, tenant: &str, integration: &str, id: &str) -> Result<AuthMaterial, DomainError> {
    let integration = IntegrationId::parse(integration).unwrap();
    let id = ConnectionId::parse(id).unwrap();
    app.state.connections.credentials(&caller(tenant), integration, id).await?.current().await
}

/// A fresh tenant, a member's token, a GitHub integration of it and its connections path.
async fn fresh_integration(app: &TestApp) -> (String, String, String, String) {
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[Role::Member]);
    let integration = integration(app, &token).await;
    let base = format!("/api/v1/integrations/{integration}/connections");
    (tenant, token, integration, base)
}

/// The connection as the store keeps it.
async fn stored(app: &TestApp, tenant: &str, integration: &str, id: &str) -> im_domain::Stored<im_domain::connection::Connection> {
    let (integration, id) = (IntegrationId::parse(integration).unwrap(), ConnectionId::parse(id).unwrap());
    app.state.connections.get(&caller(tenant), integration, id).await.unwrap()
}

#[tokio::test]
async fn credentials_go_to_the_secret_store_and_only_hints_come_back() {
    let app = spawn_app().await;
    let (tenant, token, integration, base) = fresh_integration(&app).await;
    let response = app.post(&base, &token, &bearer("Deploy bot", TOKEN)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let etag = header(&response, "etag");
    let location = header(&response, "location");
    let text = response.text().await.unwrap();
    assert!(!text.contains(TOKEN) && !text.contains("Secret0123"), "no credential in the answer: {text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("{base}/{id}"));
    assert_eq!(created["authMode"], "bearer");
    assert_eq!(created["status"], "active");
    assert_eq!(created["lastFour"], "alue", "the last four characters are the hint");
    assert_eq!(created["integrationId"], integration.as_str());
    assert!(created.get("credentials").is_none());

    let listed: Value = app.get(&base, &token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().iter().map(|c| c["id"].clone()).collect::<Vec<_>>(), vec![json!(id)]);
    let read = app.get(&location, &token).await;
    assert_eq!(header(&read, "etag"), etag);
    assert!(!read.text().await.unwrap().contains(TOKEN));
    assert_eq!(source(&app, &tenant, &integration, &id).await.unwrap(), AuthMaterial::Bearer(TOKEN.into()), "the source reads the secret");
    if !backend_is_cosmos() {
        assert!(!database_contains(&app, TOKEN), "the database never holds the credential");
    }

    // Replace: If-Match honoured, new credentials used at once.
    problem(app.put(&location, &token, &bearer("Deploy bot", NEW_TOKEN), Some("\"stale\"")).await, StatusCode::PRECONDITION_FAILED).await;
    let mut body = created.clone();
    body["name"] = json!("Release bot");
    body["credentials"] = json!({"token": NEW_TOKEN});
    let response = app.put(&location, &token, &body, Some(&etag)).await;
    assert_eq!(response.status(), StatusCode::OK, "the view sent back with new credentials is accepted");
    let updated: Value = response.json().await.unwrap();
    assert_eq!((updated["name"].as_str(), updated["lastFour"].as_str()), (Some("Release bot"), Some("9876")));
    assert_eq!(source(&app, &tenant, &integration, &id).await.unwrap(), AuthMaterial::Bearer(NEW_TOKEN.into()));

    // Delete: the document, then the secret.
    let stored = stored(&app, &tenant, &integration, &id).await;
    let secret = stored.value.credentials.expect("a secret reference");
    assert_eq!(secret.secret_name.as_str(), format!("integration-manager/{tenant}/connection/{id}"));
    assert_eq!(app.delete(&location, &token, None).await.status(), StatusCode::NO_CONTENT);
    problem(app.get(&location, &token).await, StatusCode::NOT_FOUND).await;
    let secrets = integration_manager::startup::secret_store(&app.settings, &mut Vec::new()).unwrap();
    assert!(matches!(secrets.get(&secret).await, Err(DomainError::NotFound { .. })), "the secret went with the connection");
    assert!(matches!(source(&app, &tenant, &integration, &id).await, Err(DomainError::NotFound { .. })));
}

#[tokio::test]
async fn modes_and_credentials_are_checked_field_by_field() {
    let app = spawn_app().await;
    let token = app.member();
    let integration = integration(&app, &token).await;
    let base = format!("/api/v1/integrations/{integration}/connections");

    let bad = problem(
        app.post(&base, &token, &json!({"name": "k", "authMode": "api_key", "credentials": {"apiKey": "sk_0123456789abcdef"}})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), ["authMode"], "GitHub takes no API key");
    assert!(!bad.to_string().contains("sk_0123"), "a refused credential is not echoed: {bad}");

    let bad = problem(
        app.post(&base, &token, &json!({"name": "", "authMode": "bearer", "credentials": {"username": "alice"}})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let f = fields(&bad);
    for wanted in ["credentials.token", "credentials.username"] {
        assert!(f.contains(&wanted.to_owned()), "{wanted} not in {f:?}");
    }

    let bad = problem(
        app.post(&base, &token, &json!({"name": "x", "authMode": "bearer", "credentials": {"token": "t", "pin": 1}})).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(fields(&bad), ["credentials.pin"]);
    let bad = problem(
        app.post(&base, &token, &json!({"name": "x", "authMode": "oauth2_authorization_code", "credentials": {}})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), ["authMode"]);
    let listed: Value = app.get(&base, &token).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "refused requests wrote nothing");
    problem(app.post("/api/v1/integrations/not-a-uuid/connections", &token, &bearer("x", TOKEN)).await, StatusCode::NOT_FOUND).await;
    let unknown = format!("/api/v1/integrations/{}/connections", uuid::Uuid::now_v7());
    problem(app.post(&unknown, &token, &bearer("x", TOKEN)).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn another_tenant_finds_nothing_even_with_both_ids() {
    let app = spawn_app().await;
    let (owner, other) = (app.member(), app.member());
    let integration = integration(&app, &owner).await;
    let base = format!("/api/v1/integrations/{integration}/connections");
    let created: Value = app.post(&base, &owner, &bearer("mine", TOKEN)).await.json().await.unwrap();
    let path = format!("{base}/{}", created["id"].as_str().unwrap());

    problem(app.get(&path, &other).await, StatusCode::NOT_FOUND).await;
    problem(app.get(&base, &other).await, StatusCode::NOT_FOUND).await;
    problem(app.put(&path, &other, &bearer("taken", NEW_TOKEN), None).await, StatusCode::NOT_FOUND).await;
    problem(app.delete(&path, &other, None).await, StatusCode::NOT_FOUND).await;
    problem(app.post(&base, &other, &bearer("planted", NEW_TOKEN)).await, StatusCode::NOT_FOUND).await;
    let kept: Value = app.get(&path, &owner).await.json().await.unwrap();
    assert_eq!(kept["name"], "mine");

    let viewer = app.token("someone", "v", &[Role::Viewer]);
    problem(app.post(&base, &viewer, &bearer("x", TOKEN)).await, StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn an_integration_with_connections_is_not_deleted() {
    let app = spawn_app().await;
    let token = app.member();
    let integration = integration(&app, &token).await;
    let path = format!("/api/v1/integrations/{integration}");
    let created: Value = app.post(&format!("{path}/connections"), &token, &bearer("c", TOKEN)).await.json().await.unwrap();

    let refused = problem(app.delete(&path, &token, None).await, StatusCode::CONFLICT).await;
    assert!(refused["detail"].as_str().unwrap().contains("connections"), "{refused}");
    assert_eq!(app.get(&path, &token).await.status(), StatusCode::OK, "the integration is still there");

    let connection = format!("{path}/connections/{}", created["id"].as_str().unwrap());
    assert_eq!(app.delete(&connection, &token, None).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.delete(&path, &token, None).await.status(), StatusCode::NO_CONTENT, "without connections it goes");
}

#[tokio::test]
async fn a_custom_api_key_connection_puts_the_key_where_the_definition_says() {
    let app = spawn_app().await;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[Role::Member]);
    let body = json!({"providerId": "custom", "name": "Ticketing", "customDefinition": custom_definition()});
    let integration: Value = app.post("/api/v1/integrations", &token, &body).await.json().await.unwrap();
    let integration = integration["id"].as_str().unwrap().to_owned();
    let base = format!("/api/v1/integrations/{integration}/connections");

    problem(app.post(&base, &token, &bearer("wrong mode", TOKEN)).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    let key = json!({"name": "key", "authMode": "api_key", "credentials": {"apiKey": "short"}});
    let created: Value = app.post(&base, &token, &key).await.json().await.unwrap();
    assert!(created.get("lastFour").is_none(), "a short secret shows no hint");
    let material = source(&app, &tenant, &integration, created["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(material, AuthMaterial::ApiKey { location: ApiKeyLocation::Header, name: "X-Api-Key".into(), value: "short".into() });
    assert!(!format!("{material:?}").contains("short"), "material never prints");
}

/// The events about `subject` the recorder got once `count` arrived (or after five seconds), and
/// a moment later, so that an extra event would show.
async fn events_about(recorder: &Recorder, subject: &str, count: usize) -> Vec<DomainEvent> {
    let about = || recorder.0.lock().unwrap().iter().filter(|e| e.subject == subject).cloned().collect::<Vec<_>>();
    for _ in 0..200 {
        if about().len() >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    about()
}

#[tokio::test]
async fn creating_and_deleting_publish_events_that_match_their_schemas() {
    let app = spawn_app().await;
    let recorder = Arc::new(Recorder::default());
    app.state.bus.subscribe(recorder.clone());
    let token = app.member();
    let hook = json!({"url": "https://hooks.example.com/im", "eventTypes": ["integration.connection.*"]});
    assert_eq!(app.post("/api/v1/webhooks", &token, &hook).await.status(), StatusCode::CREATED, "connection events are deliverable");
    let integration = integration(&app, &token).await;
    let base = format!("/api/v1/integrations/{integration}/connections");
    let created: Value = app.post(&base, &token, &bearer("evented", TOKEN)).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(app.delete(&format!("{base}/{id}"), &token, None).await.status(), StatusCode::NO_CONTENT);

    let seen = events_about(&recorder, &id, 2).await;
    let types: Vec<_> = seen.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["integration.connection.created", "integration.connection.deleted"]);
    for event in &seen {
        let cloud = event.cloud_event();
        assert_matches_schema(&cloud);
        assert_eq!(cloud["data"]["integrationId"], integration.as_str());
        assert!(!cloud.to_string().contains(TOKEN), "no credential in an event");
    }
}

#[tokio::test]
async fn a_failed_connection_shows_why_refuses_its_credentials_and_publishes_one_event() {
    let app = spawn_app().await;
    let recorder = Arc::new(Recorder::default());
    app.state.bus.subscribe(recorder.clone());
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[Role::Member]);
    let integration = integration(&app, &token).await;
    let base = format!("/api/v1/integrations/{integration}/connections");
    let created: Value = app.post(&base, &token, &bearer("failing", TOKEN)).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let (integration_id, connection_id) = (IntegrationId::parse(&integration).unwrap(), ConnectionId::parse(&id).unwrap());

    let reason = "the provider answered 401 to the verification request";
    for _ in 0..2 {
        app.state
            .connections
            .mark_failed(&caller(&tenant), integration_id, connection_id, ConnectionStatus::Error, reason)
            .await
            .expect("marked");
    }
    let read: Value = app.get(&format!("{base}/{id}"), &token).await.json().await.unwrap();
    assert_eq!((read["status"].as_str(), read["statusReason"].as_str()), (Some("error"), Some(reason)));
    let refused = source(&app, &tenant, &integration, &id).await;
    assert!(matches!(&refused, Err(DomainError::Conflict(why)) if why.contains(reason)), "{refused:?}");
    let other = app.state.connections.mark_failed(&caller("intruder"), integration_id, connection_id, ConnectionStatus::Revoked, "x").await;
    assert!(matches!(other, Err(DomainError::NotFound { .. })), "another tenant cannot mark it");

    let events = events_about(&recorder, &id, 2).await;
    let failed: Vec<_> = events.iter().filter(|e| e.event_type.as_str() == "integration.connection.failed").collect();
    assert_eq!(failed.len(), 1, "one event for one change");
    let cloud = failed[0].cloud_event();
    assert_matches_schema(&cloud);
    assert_eq!(cloud["data"]["statusReason"], reason);

    // New credentials make it active again.
    let response = app.put(&format!("{base}/{id}"), &token, &bearer("failing", NEW_TOKEN), None).await;
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "active");
}

#[tokio::test]
async fn a_connection_test_calls_the_provider_with_the_credentials_and_its_status_follows() {
    use wiremock::matchers::{header as has_header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v2/tickets"))
        .and(has_header("X-Api-Key", "good-key-0123456789"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": [], "meta": {}})))
        .mount(&api)
        .await;
    Mock::given(method("GET")).and(path("/v2/tickets")).respond_with(ResponseTemplate::new(401)).with_priority(10).mount(&api).await;
    let app = crate::helpers::spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
    })
    .await;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[Role::Member]);
    let mut definition = custom_definition();
    definition["baseUrl"] = json!(format!("{}/v2", api.uri()));
    let body = json!({"providerId": "custom", "name": "Ticketing", "customDefinition": definition});
    let integration: Value = app.post("/api/v1/integrations", &token, &body).await.json().await.unwrap();
    let integration = integration["id"].as_str().unwrap().to_owned();
    let base = format!("/api/v1/integrations/{integration}/connections");
    let key = |value: &str| json!({"name": "key", "authMode": "api_key", "credentials": {"apiKey": value}});
    let created: Value = app.post(&base, &token, &key("good-key-0123456789")).await.json().await.unwrap();
    let connection = format!("{base}/{}", created["id"].as_str().unwrap());

    // Good credentials: the provider answers 200 to the smallest list.
    let response = app.request(reqwest::Method::POST, &format!("{connection}/test"), &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!((outcome["ok"].clone(), outcome["status"].clone()), (json!(true), json!(200)), "{outcome}");
    let sent = api.received_requests().await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].url.query_pairs().find(|(k, _)| k == "limit").map(|(_, v)| v.into_owned()).as_deref(), Some("1"));

    // Refused credentials: ok is false with the status, the connection is marked with the reason.
    let current = app.get(&connection, &token).await;
    let etag = header(&current, "etag");
    let replaced = app.put(&connection, &token, &key("wrong-key-0123456789"), Some(etag.as_str())).await;
    assert_eq!(replaced.status(), StatusCode::OK);
    let text = app.request(reqwest::Method::POST, &format!("{connection}/test"), &token).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("wrong-key"), "no credential in the outcome: {text}");
    let outcome: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((outcome["ok"].clone(), outcome["status"].clone()), (json!(false), json!(401)), "{outcome}");
    let marked: Value = app.get(&connection, &token).await.json().await.unwrap();
    assert_eq!(marked["status"], "error");
    assert!(marked["statusReason"].as_str().unwrap().contains("401"), "{marked}");

    // The provider accepts them again: a passing test makes the connection active.
    Mock::given(method("GET"))
        .and(path("/v2/tickets"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": []})))
        .mount(&api)
        .await;
    let outcome: Value =
        app.request(reqwest::Method::POST, &format!("{connection}/test"), &token).send().await.unwrap().json().await.unwrap();
    assert_eq!(outcome["ok"], true, "{outcome}");
    let recovered: Value = app.get(&connection, &token).await.json().await.unwrap();
    assert_eq!(recovered["status"], "active");
    assert!(recovered.get("statusReason").is_none_or(Value::is_null), "{recovered}");

    // Another tenant cannot test it.
    let other = app.token("t-other-tenant", "mallory", &[Role::Member]);
    problem(app.request(reqwest::Method::POST, &format!("{connection}/test"), &other).send().await.unwrap(), StatusCode::NOT_FOUND).await;
}

/// Every file under `dir` whose bytes hold `needle`.
fn files_holding(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if std::fs::read(&path).unwrap_or_default().windows(needle.len()).any(|w| w == needle.as_bytes()) {
            found.push(path);
        }
    }
    found
}

/// With the HTTP secret store against the Secret Management fake (on whichever store the suite
/// runs): the credentials are in Secret Management under the connection's name, every version
/// of them, and nowhere else: not in the stored document, not in the data directory (no local
/// secret file, no database page), not in any answer; a replaced credential is a new version,
/// a deleted connection takes its secret along; while the service is down, no connection is
/// created half-way.
#[tokio::test]
async fn credentials_land_in_secret_management_and_nowhere_else() {
    use std::sync::atomic::Ordering;

    let app = spawn_with_secret_management(|_| {}).await;
    let fake = app.secret_management.clone().expect("the app keeps secrets in the fake");
    let (tenant, token, integration, base) = fresh_integration(&app).await;
    let response = app.post(&base, &token, &bearer("Deploy bot", TOKEN)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let text = response.text().await.unwrap();
    assert!(!text.contains(TOKEN), "{text}");
    let id = serde_json::from_str::<Value>(&text).unwrap()["id"].as_str().unwrap().to_owned();
    let name = format!("integration-manager/{tenant}/connection/{id}");
    assert!(fake.service.names().contains(&name), "the secret is kept under {name}: {:?}", fake.service.names());
    assert!(fake.service.dump().contains(TOKEN), "Secret Management holds the credential");

    let stored = stored(&app, &tenant, &integration, &id).await;
    let document = serde_json::to_string(&stored.value).unwrap();
    assert!(!document.contains(TOKEN), "the stored document keeps a reference only: {document}");
    assert_eq!(stored.value.credentials.as_ref().map(|r| r.secret_name.as_str().to_owned()), Some(name.clone()));
    assert!(files_holding(app.dir.path(), TOKEN).is_empty(), "nothing under the data directory holds the credential");
    if !backend_is_cosmos() {
        assert!(!database_contains(&app, TOKEN));
    }
    for read in [app.get(&base, &token).await, app.get(&format!("{base}/{id}"), &token).await] {
        assert!(!read.text().await.unwrap().contains(TOKEN));
    }
    assert_eq!(source(&app, &tenant, &integration, &id).await.unwrap(), AuthMaterial::Bearer(TOKEN.into()), "read back from the service");

    // A replacement is a new version; the source uses it at once.
    let replaced = app.put(&format!("{base}/{id}"), &token, &bearer("Deploy bot", NEW_TOKEN), None).await;
    assert_eq!(replaced.status(), StatusCode::OK);
    assert!(!replaced.text().await.unwrap().contains(NEW_TOKEN));
    assert!(fake.service.dump().contains(NEW_TOKEN));
    assert_eq!(source(&app, &tenant, &integration, &id).await.unwrap(), AuthMaterial::Bearer(NEW_TOKEN.into()));

    // Deleting the connection deletes every version.
    assert_eq!(app.delete(&format!("{base}/{id}"), &token, None).await.status(), StatusCode::NO_CONTENT);
    assert!(!fake.service.names().contains(&name), "the secret went with the connection");
    assert!(!fake.service.dump().contains(NEW_TOKEN) && !fake.service.dump().contains(TOKEN));

    // Secret Management down: the create fails as unavailable and leaves no connection behind.
    fake.service.down.store(true, Ordering::SeqCst);
    let refused = app.post(&base, &token, &bearer("While down", TOKEN)).await;
    assert!(refused.status().is_server_error(), "{}", refused.status());
    assert!(!refused.text().await.unwrap().contains(TOKEN));
    fake.service.down.store(false, Ordering::SeqCst);
    let listed: Value = app.get(&base, &token).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "nothing half-stored: {listed}");
}

#[tokio::test]
async fn the_oauth_client_secret_lands_in_secret_management_and_nowhere_else() {
    use std::sync::atomic::Ordering;

    const APP_SECRET: &str = "app_Secret0123456789ClientValue";
    const NEW_APP_SECRET: &str = "app_Another0123456789ClientValue";
    let app = spawn_with_secret_management(|_| {}).await;
    let fake = app.secret_management.clone().expect("the app keeps secrets in the fake");
    let recorder = Arc::new(Recorder::default());
    app.state.bus.subscribe(recorder.clone());
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[Role::Member]);
    let body = |secret: &str| {
        json!({"providerId": "github", "name": "With an app", "config": {"organization": "acme"},
            "oauth2App": {"clientId": "Iv1.app", "clientSecret": secret}})
    };
    let response = app.post("/api/v1/integrations", &token, &body(APP_SECRET)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let text = response.text().await.unwrap();
    assert!(!text.contains(APP_SECRET), "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(created["oauth2App"], json!({"clientId": "Iv1.app", "clientSecretHint": "alue"}));
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/integrations/{id}");
    let name = format!("integration-manager/{tenant}/oauth2-app/{id}");
    assert!(fake.service.dump().contains(APP_SECRET), "Secret Management holds the client secret");
    assert_eq!(fake.service.versions_kept(&name), 1, "kept under {name}: {:?}", fake.service.names());

    let stored = app.state.integrations.get(&caller(&tenant), IntegrationId::parse(&id).unwrap()).await.unwrap();
    let document = serde_json::to_string(&stored.value).unwrap();
    assert!(!document.contains(APP_SECRET), "the stored document keeps a reference only: {document}");
    assert_eq!(stored.value.oauth2_app.as_ref().map(|a| a.client_secret.secret_name.as_str().to_owned()), Some(name.clone()));

    // A replacement: the response hides it, Secret Management keeps only the new one.
    let replaced = app.put(&path, &token, &body(NEW_APP_SECRET), None).await;
    assert_eq!(replaced.status(), StatusCode::OK);
    assert!(!replaced.text().await.unwrap().contains(NEW_APP_SECRET));
    assert_eq!(fake.service.versions_kept(&name), 1);
    assert!(fake.service.dump().contains(NEW_APP_SECRET) && !fake.service.dump().contains(APP_SECRET));
    // A refused value is not echoed either.
    let refused = app.put(&path, &token, &body("bad\u{7}Secret0123456789"), None).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!refused.text().await.unwrap().contains("Secret0123456789"));

    for read in [app.get(&path, &token).await, app.get("/api/v1/integrations", &token).await] {
        let text = read.text().await.unwrap();
        assert!(!text.contains(APP_SECRET) && !text.contains(NEW_APP_SECRET), "{text}");
    }
    for secret in [APP_SECRET, NEW_APP_SECRET] {
        assert!(files_holding(app.dir.path(), secret).is_empty(), "nothing under the data directory holds the client secret");
        if !backend_is_cosmos() {
            assert!(!database_contains(&app, secret));
        }
    }
    let mut events = Vec::new();
    for _ in 0..200 {
        events = recorder.0.lock().unwrap().iter().filter(|e| e.subject == id).cloned().collect::<Vec<DomainEvent>>();
        if events.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(events.len() >= 2, "created and updated: {events:?}");
    for event in &events {
        let cloud = event.cloud_event();
        assert_matches_schema(&cloud);
        let text = cloud.to_string();
        assert!(!text.contains(APP_SECRET) && !text.contains(NEW_APP_SECRET) && !text.contains(&name), "{text}");
        assert_eq!(cloud["data"]["oauth2App"]["clientId"], "Iv1.app");
    }

    // Deleting the integration deletes every version.
    assert_eq!(app.delete(&path, &token, None).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(fake.service.versions_kept(&name), 0, "the secret went with the integration");

    // Secret Management down: the create fails as unavailable and leaves no integration behind.
    fake.service.down.store(true, Ordering::SeqCst);
    let refused = app.post("/api/v1/integrations", &token, &body(APP_SECRET)).await;
    assert!(refused.status().is_server_error(), "{}", refused.status());
    assert!(!refused.text().await.unwrap().contains(APP_SECRET));
    fake.service.down.store(false, Ordering::SeqCst);
    let listed: Value = app.get("/api/v1/integrations", &token).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "nothing half-stored: {listed}");
}
