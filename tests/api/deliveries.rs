//! Webhook delivery against real receivers on loopback: every request's signature is checked
//! with the shipped verifier.

use std::time::{Duration, Instant};

use im_domain::webhooks::signature::{SigningSecret, Verifier};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::{TestApp, github, problem, spawn_app_with};

/// Records what the in-process bus publishes.
struct Recorder(std::sync::Mutex<Vec<im_domain::events::DomainEvent>>);

#[async_trait::async_trait]
impl im_domain::ports::EventSubscriber for Recorder {
    async fn handle(&self, event: &im_domain::events::DomainEvent) -> Result<(), im_domain::DomainError> {
        self.0.lock().unwrap().push(event.clone());
        Ok(())
    }
}

/// Waits for an event of `event_type` and checks it against its published schema.
async fn published(recorder: &Recorder, event_type: &str) -> im_domain::events::DomainEvent {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(event) = recorder.0.lock().unwrap().iter().find(|e| e.event_type.as_str() == event_type).cloned() {
            crate::events::assert_matches_schema(&event.cloud_event());
            return event;
        }
        assert!(Instant::now() < deadline, "{event_type} was published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn app() -> TestApp {
    spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
        s.webhooks.service.retry_schedule =
            ["100ms", "200ms"].iter().map(|d| integration_manager::config::HumanDuration::parse(d).unwrap()).collect();
    })
    .await
}

/// Registers an endpoint; returns its id and signing secret.
async fn register(app: &TestApp, token: &str, url: &str, extra: Value) -> (String, SigningSecret) {
    let mut body = json!({"url": url});
    body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    let response = app.post("/api/v1/webhooks", token, &body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    (created["id"].as_str().unwrap().to_owned(), SigningSecret::parse(created["secret"].as_str().unwrap()).unwrap())
}

fn header(request: &Request, name: &str) -> String {
    request.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// Checks the Standard Webhooks signature of a received request.
fn verify(request: &Request, secrets: Vec<SigningSecret>) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Verifier::new(secrets)
        .verify(
            &header(request, "webhook-id"),
            &header(request, "webhook-timestamp"),
            &header(request, "webhook-signature"),
            &request.body,
            now,
        )
        .unwrap_or_else(|e| panic!("signature refused: {e}"));
}

async fn wait_for(server: &MockServer, count: usize) -> Vec<Request> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let received = server.received_requests().await.unwrap_or_default();
        if received.len() >= count || Instant::now() > deadline {
            return received;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn deliveries(app: &TestApp, token: &str, webhook: &str, query: &str) -> Vec<Value> {
    let page: Value = app.get(&format!("/api/v1/webhooks/{webhook}/deliveries{query}"), token).await.json().await.unwrap();
    page["items"].as_array().cloned().unwrap_or_default()
}

async fn wait_status(app: &TestApp, token: &str, webhook: &str, status: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = deliveries(app, token, webhook, &format!("?status={status}")).await;
        if found.len() >= count || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_fan_out_to_matching_endpoints_signed() {
    let app = app().await;
    let recorder = std::sync::Arc::new(Recorder(std::sync::Mutex::new(Vec::new())));
    app.state.bus.subscribe(recorder.clone());
    let token = app.member();
    let (all, only_created) = (MockServer::start().await, MockServer::start().await);
    for server in [&all, &only_created] {
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(204)).mount(server).await;
    }
    let (all_id, all_secret) =
        register(&app, &token, &format!("{}/all", all.uri()), json!({"eventTypes": ["integration.*"], "headers": {"X-Team": "ops"}})).await;
    let (_, created_secret) =
        register(&app, &token, &format!("{}/created", only_created.uri()), json!({"eventTypes": ["integration.created"]})).await;
    let (disabled_id, _) = register(&app, &token, &format!("{}/off", all.uri()), json!({"status": "disabled"})).await;

    let (integration, etag) = app.create_github(&token, "fanned").await;
    let path = format!("/api/v1/integrations/{}", integration["id"].as_str().unwrap());
    assert_eq!(app.put(&path, &token, &github("fanned again"), Some(&etag)).await.status(), StatusCode::OK);

    let to_all = wait_for(&all, 2).await;
    let to_created = wait_for(&only_created, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(all.received_requests().await.unwrap().len(), 2, "created and updated");
    assert_eq!(only_created.received_requests().await.unwrap().len(), 1, "only created");
    for request in &to_all {
        verify(request, vec![all_secret.clone()]);
        assert_eq!(header(request, "content-type"), "application/json");
        assert!(header(request, "user-agent").starts_with("IntegrationManager-Webhooks/"));
        assert_eq!(header(request, "x-team"), "ops");
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(header(request, "webhook-id"), body["id"].as_str().unwrap(), "webhook-id is the event id");
    }
    verify(&to_created[0], vec![created_secret]);

    let log = wait_status(&app, &token, &all_id, "succeeded", 2).await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["attempts"][0]["statusCode"], 204);
    assert_eq!(log[0]["attempts"][0]["trigger"], "scheduled");
    let skipped = wait_status(&app, &token, &disabled_id, "skipped", 2).await;
    assert_eq!(skipped.len(), 2, "a disabled endpoint's messages are kept as skipped");
    let delivered = published(&recorder, "webhook.delivered").await;
    assert_eq!(delivered.data.to_value()["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for request in all.received_requests().await.unwrap() {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert!(body["type"].as_str().unwrap().starts_with("integration."), "webhook.* events are never sent to webhooks: {body}");
    }
}

#[tokio::test]
async fn failures_retry_with_the_same_webhook_id_until_success() {
    let app = app().await;
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500).set_body_string("boom")).up_to_n_times(2).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    let (id, secret) = register(&app, &token, &format!("{}/h", server.uri()), json!({})).await;
    app.create_github(&token, "retried").await;

    let received = wait_for(&server, 3).await;
    assert_eq!(received.len(), 3);
    let ids: Vec<_> = received.iter().map(|r| header(r, "webhook-id")).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "the same webhook-id on every retry: {ids:?}");
    for request in &received {
        verify(request, vec![secret.clone()]);
    }
    let done = wait_status(&app, &token, &id, "succeeded", 1).await;
    assert_eq!(done.len(), 1);
    let attempts = done[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.iter().map(|a| a["statusCode"].as_u64().unwrap()).collect::<Vec<_>>(), vec![500, 500, 200]);
    assert_eq!(attempts[0]["responseExcerpt"], "boom");
    assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
}

#[tokio::test]
async fn exhausted_retries_fail_and_gone_disables_the_endpoint() {
    let app = app().await;
    let recorder = std::sync::Arc::new(Recorder(std::sync::Mutex::new(Vec::new())));
    app.state.bus.subscribe(recorder.clone());
    let token = app.member();
    let failing = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&failing).await;
    let gone = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(410)).mount(&gone).await;
    let (failing_id, _) = register(&app, &token, &format!("{}/f", failing.uri()), json!({})).await;
    let (gone_id, _) = register(&app, &token, &format!("{}/g", gone.uri()), json!({})).await;
    app.create_github(&token, "doomed").await;

    let failed = wait_status(&app, &token, &failing_id, "failed", 1).await;
    assert_eq!(failed[0]["attempts"].as_array().unwrap().len(), 3, "the first attempt and two retries");
    assert_eq!(failing.received_requests().await.unwrap().len(), 3);

    wait_status(&app, &token, &gone_id, "failed", 1).await;
    let endpoint: Value = app.get(&format!("/api/v1/webhooks/{gone_id}"), &token).await.json().await.unwrap();
    assert_eq!(endpoint["status"], "disabled");
    assert!(endpoint["disabledReason"].as_str().unwrap().contains("410"));
    assert_eq!(gone.received_requests().await.unwrap().len(), 1, "410 is never retried");
    let failed = published(&recorder, "webhook.failed").await;
    assert_eq!(failed.data.to_value()["status"], "failed");
    published(&recorder, "webhook.endpoint.disabled").await;
}

#[tokio::test]
async fn rotation_signs_with_both_secrets_and_manual_operations_work() {
    let app = app().await;
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_string("ok")).mount(&server).await;
    let (id, first) = register(&app, &token, &format!("{}/h", server.uri()), json!({})).await;
    let rotated: Value =
        app.request(Method::POST, &format!("/api/v1/webhooks/{id}/rotate-secret"), &token).send().await.unwrap().json().await.unwrap();
    let second = SigningSecret::parse(rotated["secret"].as_str().unwrap()).unwrap();

    let response = app.request(Method::POST, &format!("/api/v1/webhooks/{id}/test"), &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let test: Value = response.json().await.unwrap();
    assert_eq!(test["eventType"], "webhook.test");
    assert_eq!(test["status"], "succeeded");
    assert_eq!(test["attempts"][0]["trigger"], "manual");
    assert_eq!(test["attempts"][0]["responseExcerpt"], "ok");
    let request = &server.received_requests().await.unwrap()[0];
    assert_eq!(header(request, "webhook-signature").split(' ').count(), 2, "both secrets sign during the grace period");
    verify(request, vec![first]);
    verify(request, vec![second]);

    let delivery = test["id"].as_str().unwrap();
    let retried: Value = app
        .request(Method::POST, &format!("/api/v1/webhooks/{id}/deliveries/{delivery}/retry"), &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retried["attempts"].as_array().unwrap().len(), 2);
    let one: Value = app.get(&format!("/api/v1/webhooks/{id}/deliveries/{delivery}"), &token).await.json().await.unwrap();
    assert_eq!(one["id"], delivery);
    let stranger = app.member();
    assert_eq!(app.get(&format!("/api/v1/webhooks/{id}/deliveries/{delivery}"), &stranger).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn skipped_deliveries_are_recovered() {
    let app = app().await;
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    let (id, secret) = register(&app, &token, &format!("{}/h", server.uri()), json!({"status": "disabled"})).await;
    let since = time::OffsetDateTime::now_utc() - time::Duration::MINUTE;
    app.create_github(&token, "while disabled").await;
    wait_status(&app, &token, &id, "skipped", 1).await;
    assert!(server.received_requests().await.unwrap().is_empty());

    let enable = json!({"url": format!("{}/h", server.uri()), "status": "enabled"});
    assert_eq!(app.put(&format!("/api/v1/webhooks/{id}"), &token, &enable, None).await.status(), StatusCode::OK);
    let since = since.format(&time::format_description::well_known::Rfc3339).unwrap();
    let response = app.post(&format!("/api/v1/webhooks/{id}/recover"), &token, &json!({"since": since})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.json::<Value>().await.unwrap()["recovered"], 1);
    let received = wait_for(&server, 1).await;
    verify(&received[0], vec![secret]);
    wait_status(&app, &token, &id, "succeeded", 1).await;
    let bad = app.post(&format!("/api/v1/webhooks/{id}/recover"), &token, &json!({"since": "yesterday"})).await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn a_hanging_receiver_does_not_block_others() {
    let app = spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
        s.webhooks.sender.request_timeout = integration_manager::config::HumanDuration::parse("3s").unwrap();
    })
    .await;
    let token = app.member();
    let (hanging, quick) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(10))).mount(&hanging).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&quick).await;
    register(&app, &token, &format!("{}/slow", hanging.uri()), json!({})).await;
    register(&app, &token, &format!("{}/fast", quick.uri()), json!({})).await;
    let started = Instant::now();
    for i in 0..3 {
        app.create_github(&token, &format!("e{i}")).await;
    }
    assert_eq!(wait_for(&quick, 3).await.len(), 3);
    assert!(started.elapsed() < Duration::from_secs(3), "the quick receiver got everything while the other hung");
}

#[tokio::test]
async fn an_endpoint_failing_for_too_long_is_disabled_with_an_event() {
    let app = spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
        s.webhooks.service.retry_schedule =
            ["100ms", "100ms", "100ms"].iter().map(|d| integration_manager::config::HumanDuration::parse(d).unwrap()).collect();
        s.webhooks.service.disable_after = integration_manager::config::HumanDuration::parse("0s").unwrap();
        s.webhooks.service.disable_min_failures = 2;
    })
    .await;
    let recorder = std::sync::Arc::new(Recorder(std::sync::Mutex::new(Vec::new())));
    app.state.bus.subscribe(recorder.clone());
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).mount(&server).await;
    let (id, _) = register(&app, &token, &format!("{}/h", server.uri()), json!({})).await;
    app.create_github(&token, "doomed").await;

    let deadline = Instant::now() + Duration::from_secs(15);
    let endpoint = loop {
        let endpoint: Value = app.get(&format!("/api/v1/webhooks/{id}"), &token).await.json().await.unwrap();
        if endpoint["status"] == "disabled" || Instant::now() > deadline {
            break endpoint;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(endpoint["status"], "disabled");
    assert!(endpoint["disabledReason"].as_str().unwrap().contains("2 in a row"), "{endpoint}");
    wait_status(&app, &token, &id, "skipped", 1).await;
    assert_eq!(server.received_requests().await.unwrap().len(), 2, "no attempt after the endpoint was disabled");
    let disabled = published(&recorder, "webhook.endpoint.disabled").await;
    assert_eq!(disabled.subject, id);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let app = app().await;
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    let (id, _) = register(&app, &token, &format!("{}/h", server.uri()), json!({})).await;
    app.create_github(&token, "throttled").await;
    let done = wait_status(&app, &token, &id, "succeeded", 1).await;
    let attempts = done[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    let at = |i: usize| {
        time::OffsetDateTime::parse(attempts[i]["at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
    };
    let waited = at(1) - at(0);
    assert!(waited >= time::Duration::milliseconds(1900), "the receiver asked for 2 s; the schedule alone says 100 ms: waited {waited}");
}

#[tokio::test]
async fn the_rate_limit_spreads_deliveries_without_dropping_any() {
    let app = app().await;
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    let (id, _) = register(&app, &token, &format!("{}/h", server.uri()), json!({"rateLimitPerSecond": 2})).await;
    for i in 0..6 {
        app.create_github(&token, &format!("r{i}")).await;
    }
    let received = wait_for(&server, 6).await;
    assert_eq!(received.len(), 6, "every delivery arrives");
    let done = wait_status(&app, &token, &id, "succeeded", 6).await;
    let mut times: Vec<_> = done
        .iter()
        .map(|d| {
            time::OffsetDateTime::parse(d["attempts"][0]["at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
        })
        .collect();
    times.sort();
    for window in times.windows(3) {
        assert!(window[2] - window[0] >= time::Duration::milliseconds(950), "at most 2 per second: {times:?}");
    }
}

#[tokio::test]
async fn a_stop_lets_the_attempt_in_flight_finish_and_records_it() {
    let app = spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
    })
    .await;
    let token = app.member();
    let slow = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2))).mount(&slow).await;
    let (id, _) = register(&app, &token, &format!("{}/slow", slow.uri()), json!({})).await;
    app.create_github(&token, "in flight at the stop").await;
    assert_eq!(wait_for(&slow, 1).await.len(), 1, "the attempt is in flight");

    // Stop as SIGTERM does, then start again on the same data.
    let stopping = Instant::now();
    let app = app.restart().await;
    assert!(stopping.elapsed() >= Duration::from_millis(1500), "the stop waited for the attempt in flight");
    let succeeded = deliveries(&app, &token, &id, "?status=succeeded").await;
    assert_eq!(succeeded.len(), 1, "the attempt was recorded before the stop completed: {succeeded:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(slow.received_requests().await.unwrap().len(), 1, "nothing was cut off, so nothing is delivered twice");
    assert!(deliveries(&app, &token, &id, "?status=pending").await.is_empty());
}

/// With RabbitMQ, an instance that fans an event out makes the first attempt itself, the
/// delivery held by it and no job queued. Should it stop between that write and recording the
/// attempt, the hold sweep of a running instance finds the delivery once its hold has ended
/// (and the grace after it) and has its attempt made, once. Written here as such an instance
/// leaves it: one delivery held until three minutes ago, another whose hold ended 5 s ago
/// (within the grace: left alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_attempt_whose_instance_stopped_is_made_once_the_hold_sweep_finds_it() {
    if !crate::helpers::events_on_rabbitmq() || crate::helpers::backend_is_cosmos() {
        return; // The sweep runs with the broker's queue; this run writes to the embedded store.
    }
    let app = spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
        s.webhooks.service.hold_sweep_interval = integration_manager::config::HumanDuration::parse("200ms").unwrap();
    })
    .await;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[im_domain::Role::Member]);
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let (webhook, secret) = register(&app, &token, &format!("{}/hook", receiver.uri()), json!({})).await;
    let webhook_id = im_domain::webhooks::endpoint::WebhookId(webhook.parse().unwrap());
    let now = time::OffsetDateTime::now_utc();
    let held = |held_until: time::OffsetDateTime| {
        let message_id = uuid::Uuid::now_v7().to_string();
        im_domain::webhooks::delivery::Delivery {
            id: im_domain::webhooks::delivery::delivery_id(webhook_id, &message_id),
            tenant_id: im_domain::TenantId::new(&tenant).unwrap(),
            webhook_id,
            payload: json!({"id": message_id, "type": "integration.created", "data": {"name": "held"}}).into(),
            message_id,
            event_type: "integration.created".into(),
            status: im_domain::webhooks::delivery::DeliveryStatus::Pending,
            attempts: Vec::new(),
            older_attempts: 0,
            next_attempt_at: Some(held_until - time::Duration::minutes(2)),
            lease_until: Some(held_until),
            created_at: held_until - time::Duration::minutes(2),
            updated_at: held_until - time::Duration::minutes(2),
        }
    };
    let (ended, within_grace) = (held(now - time::Duration::minutes(3)), held(now - time::Duration::seconds(5)));
    let store = im_store_embedded::EmbeddedStore::open(app.dir.path(), std::sync::Arc::new(im_domain::SystemClock)).expect("open");
    for delivery in [&ended, &within_grace] {
        store.deliveries().create(delivery).await.expect("a held delivery, as a stopped instance leaves it");
    }

    let received = wait_for(&receiver, 1).await;
    assert_eq!(received.len(), 1, "the delivery whose hold ended was attempted");
    assert_eq!(header(&received[0], "webhook-id"), ended.message_id);
    verify(&received[0], vec![secret]);
    let succeeded = wait_status(&app, &token, &webhook, "succeeded", 1).await;
    assert_eq!(succeeded.len(), 1, "{succeeded:?}");
    assert_eq!(succeeded[0]["id"], json!(ended.id.to_string()));
    // Sweeps go on meanwhile: no second attempt, and the hold within its grace is left alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.received_requests().await.unwrap().len(), 1, "attempted once, and only the one whose hold ended");
    let pending = deliveries(&app, &token, &webhook, "?status=pending").await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["id"], json!(within_grace.id.to_string()));
}

/// Custom header values are secrets: masked on every read, kept out of the database, sent for
/// real; an update that sends the mask back keeps the stored value.
#[tokio::test]
async fn custom_header_values_are_masked_on_read_and_sent_for_real() {
    use im_domain::webhooks::endpoint::HEADER_MASK;
    let app = app().await;
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(204)).mount(&server).await;
    let headers = json!({"headers": {"Authorization": "Bearer s3cr3t-token", "X-Team": "ops"}});
    let response =
        app.post("/api/v1/webhooks", &token, &json!({"url": format!("{}/h", server.uri()), "headers": headers["headers"]})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/webhooks/{id}");
    let read = app.get(&path, &token).await.text().await.unwrap();
    let list = app.get("/api/v1/webhooks", &token).await.text().await.unwrap();
    for shown in [created.to_string(), read.clone(), list] {
        assert!(!shown.contains("s3cr3t-token") && !shown.contains("\"ops\""), "a header value came back: {shown}");
    }
    let read: Value = serde_json::from_str(&read).unwrap();
    assert_eq!(read["headers"], json!({"Authorization": HEADER_MASK, "X-Team": HEADER_MASK}));

    let test = |app: &TestApp| app.request(Method::POST, &format!("/api/v1/webhooks/{id}/test"), &token).send();
    assert_eq!(test(&app).await.unwrap().status(), StatusCode::OK);
    let first = &server.received_requests().await.unwrap()[0];
    assert_eq!((header(first, "authorization"), header(first, "x-team")), ("Bearer s3cr3t-token".to_owned(), "ops".to_owned()));

    // The mask sent back keeps the stored value; a new value replaces it.
    let change = json!({"url": format!("{}/h", server.uri()), "headers": {"Authorization": HEADER_MASK, "X-Team": "platform"}});
    let response = app.put(&path, &token, &change, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["headers"], json!({"Authorization": HEADER_MASK, "X-Team": HEADER_MASK}));
    assert_eq!(test(&app).await.unwrap().status(), StatusCode::OK);
    let second = &server.received_requests().await.unwrap()[1];
    assert_eq!((header(second, "authorization"), header(second, "x-team")), ("Bearer s3cr3t-token".to_owned(), "platform".to_owned()));

    // A mask for a header that has no stored value is refused, naming the header.
    let unknown = json!({"url": format!("{}/h", server.uri()), "headers": {"X-New": HEADER_MASK}});
    let bad = problem(app.put(&path, &token, &unknown, None).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(crate::helpers::fields(&bad), vec!["headers.X-New"]);

    if !crate::helpers::backend_is_cosmos() {
        assert!(crate::helpers::database_contains(&app, "X-Team"), "the scan sees the endpoint's document");
        assert!(!crate::helpers::database_contains(&app, "s3cr3t-token"), "the database keeps only header names");
    }
}

#[tokio::test]
async fn test_sends_and_manual_retries_are_rate_limited_per_endpoint() {
    let app = spawn_app_with(|s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
        s.webhooks.service.manual_sends_per_minute = 2;
    })
    .await;
    let token = app.member();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    let (id, _) = register(&app, &token, &format!("{}/h", server.uri()), json!({})).await;
    let (other, _) = register(&app, &token, &format!("{}/other", server.uri()), json!({})).await;
    let send = |path: String| app.request(Method::POST, &path, &token).send();

    let test: Value = send(format!("/api/v1/webhooks/{id}/test")).await.unwrap().json().await.unwrap();
    let delivery = test["id"].as_str().unwrap().to_owned();
    let retry = format!("/api/v1/webhooks/{id}/deliveries/{delivery}/retry");
    assert_eq!(send(retry.clone()).await.unwrap().status(), StatusCode::OK, "tests and retries share the budget");

    for path in [format!("/api/v1/webhooks/{id}/test"), retry] {
        let refused = send(path).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let wait: u64 = crate::helpers::header(&refused, "retry-after").parse().expect("Retry-After in seconds");
        assert!((1..=60).contains(&wait), "{wait}");
        let body = problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
        assert!(body["detail"].as_str().unwrap().contains("per minute"), "{body}");
    }
    assert_eq!(server.received_requests().await.unwrap().len(), 2, "refused sends reach nobody");
    let elsewhere = send(format!("/api/v1/webhooks/{other}/test")).await.unwrap();
    assert_eq!(elsewhere.status(), StatusCode::OK, "the budget is per endpoint");
}
