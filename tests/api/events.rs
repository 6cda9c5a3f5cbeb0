//! Domain events: one per committed change, none for a refused one, CloudEvents envelopes that
//! match the published schemas, nothing lost while the broker is away.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::events::DomainEvent;
use im_domain::ports::EventSubscriber;
use im_testkit::proxy::Proxy;
use im_testkit::rabbit::TestQueue;
use im_testkit::services::{amqp_url, rabbitmq};
use integration_manager::config::EventsBackend;
use reqwest::Method;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, github, header, spawn_app, spawn_app_with, workspace};

/// Checks a CloudEvent against `docs/events/<type>.schema.json`.
pub(crate) fn assert_matches_schema(event: &Value) {
    let event_type = event["type"].as_str().expect("a type");
    let path = workspace().join(format!("docs/events/{event_type}.schema.json"));
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} exists", path.display()))).unwrap();
    let validator = jsonschema::options().should_validate_formats(true).build(&schema).expect("a valid schema");
    let errors: Vec<String> = validator.iter_errors(event).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{event_type} breaks its schema: {errors:?}\n{event}");
}

/// Keeps every event the in-process bus hands it.
#[derive(Default)]
pub(crate) struct Recorder(pub(crate) Mutex<Vec<DomainEvent>>);

#[async_trait]
impl EventSubscriber for Recorder {
    async fn handle(&self, event: &DomainEvent) -> Result<(), DomainError> {
        self.0.lock().unwrap().push(event.clone());
        Ok(())
    }
}

/// Creates, updates (and fails an update), deletes; returns the integration id.
async fn change_an_integration(app: &TestApp, token: &str) -> String {
    let (created, etag) = app.create_github(token, "evented").await;
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/integrations/{id}");
    let response = app.put(&path, token, &github("evented, renamed"), Some(&etag)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let etag2 = header(&response, "etag");
    assert_eq!(app.put(&path, token, &github("lost"), Some(&etag)).await.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        app.post("/api/v1/integrations", token, &serde_json::json!({"providerId": "nope", "name": "x"})).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(app.delete(&path, token, Some(&etag2)).await.status(), StatusCode::NO_CONTENT);
    id
}

#[tokio::test]
async fn the_embedded_bus_gets_one_event_per_change() {
    let app = spawn_app().await;
    let recorder = Arc::new(Recorder::default());
    app.state.bus.subscribe(recorder.clone());
    let token = app.member();
    let id = change_an_integration(&app, &token).await;

    let mut events = Vec::new();
    for _ in 0..100 {
        events = recorder.0.lock().unwrap().clone();
        if events.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = {
        let all = recorder.0.lock().unwrap().clone();
        assert_eq!(all.len(), events.len().max(3), "no extra events");
        all
    };
    let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["integration.created", "integration.updated", "integration.deleted"],
        "one event per committed change, none for refused ones"
    );
    assert!(events.iter().all(|e| e.subject == id));
    assert_eq!(events[1].data.to_value()["name"], "evented, renamed");
    assert_eq!(events.iter().map(|e| e.id).collect::<HashSet<_>>().len(), 3, "unique ids");
    for event in &events {
        assert_matches_schema(&event.cloud_event());
    }
}

#[tokio::test]
async fn the_data_of_integration_created_is_the_integration_as_the_api_returns_it() {
    let app = spawn_app().await;
    let recorder = Arc::new(Recorder::default());
    app.state.bus.subscribe(recorder.clone());
    let token = app.member();
    let (created, _) = app.create_github(&token, "described by its event").await;
    let id = created["id"].as_str().unwrap();
    let response = app.get(&format!("/api/v1/integrations/{id}"), &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let fetched: Value = response.json().await.unwrap();

    let mut event = None;
    for _ in 0..100 {
        event = recorder.0.lock().unwrap().iter().find(|e| e.event_type.as_str() == "integration.created").cloned();
        if event.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = event.expect("integration.created is published");
    assert_eq!(event.subject, id);
    assert_eq!(event.data, fetched, "the event carries the integration exactly as GET returns it");
    assert_matches_schema(&event.cloud_event());
}

fn rabbit_app(url: String, exchange: &str) -> impl FnOnce(&mut integration_manager::Settings) {
    let exchange = exchange.to_owned();
    move |s| {
        s.events.backend = EventsBackend::Rabbitmq;
        s.rabbitmq.url = url.into();
        s.rabbitmq.exchange = exchange;
        s.rabbitmq.confirm_timeout = integration_manager::config::HumanDuration::parse("3s").unwrap();
    }
}

#[tokio::test]
async fn rabbitmq_gets_one_event_per_change_with_routing_keys_and_envelopes() {
    let Some(addr) = rabbitmq("rabbitmq_gets_one_event_per_change_with_routing_keys_and_envelopes") else { return };
    let exchange = format!("im-api-test-{}", uuid::Uuid::new_v4().simple());
    let mut queue = TestQueue::bind(&amqp_url(addr), &exchange).await;
    let app = spawn_app_with(rabbit_app(amqp_url(addr), &exchange)).await;
    let token = app.member();
    let id = change_an_integration(&app, &token).await;

    let messages = queue.drain(Duration::from_secs(2)).await;
    let keys: Vec<_> = messages.iter().map(|m| m.routing_key.as_str()).collect();
    assert_eq!(keys, ["integration.created", "integration.updated", "integration.deleted"]);
    for m in &messages {
        assert_eq!(m.body["subject"], id.as_str());
        assert_eq!(m.body["type"], m.routing_key.as_str());
        assert_eq!(m.message_id.as_deref(), m.body["id"].as_str(), "the message id is the event id");
        assert_eq!(m.delivery_mode, Some(2));
        assert!(m.body["tenantid"].as_str().unwrap().starts_with("t-"));
        assert_matches_schema(&m.body);
    }
    let ready: Value = app.anonymous(Method::GET, "/health/ready").send().await.unwrap().json().await.unwrap();
    let broker = ready["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == "rabbitmq").expect("the broker is reported");
    assert_eq!(broker["ready"], true);
    assert!(!ready.to_string().contains("guest:guest"), "no password in readiness");
}

#[tokio::test]
async fn a_broker_outage_loses_no_event() {
    let Some(addr) = rabbitmq("a_broker_outage_loses_no_event") else { return };
    let exchange = format!("im-api-test-{}", uuid::Uuid::new_v4().simple());
    let mut queue = TestQueue::bind(&amqp_url(addr), &exchange).await;
    let proxy = Proxy::start(addr).await;
    let app = spawn_app_with(rabbit_app(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()), &exchange)).await;
    let token = app.member();

    proxy.cut();
    let mut created = HashSet::new();
    for i in 0..20 {
        let (body, _) = app.create_github(&token, &format!("during outage {i}")).await;
        created.insert(body["id"].as_str().unwrap().to_owned());
    }
    let ready: Value = app.anonymous(Method::GET, "/health/ready").send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(queue.next(Duration::from_millis(300)).await.is_none(), "nothing got through the outage");

    proxy.restore();
    let mut seen_subjects = HashSet::new();
    let mut ids_by_subject = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen_subjects.len() < created.len() && std::time::Instant::now() < deadline {
        if let Some(m) = queue.next(Duration::from_secs(1)).await {
            let subject = m.body["subject"].as_str().unwrap().to_owned();
            let id = m.message_id.clone().unwrap();
            // A duplicate (at-least-once) must carry the same event id.
            if let Some(previous) = ids_by_subject.insert(subject.clone(), id.clone()) {
                assert_eq!(previous, id, "duplicates share the event id");
            }
            seen_subjects.insert(subject);
        }
    }
    assert_eq!(seen_subjects, created, "every write made during the outage has its event");
}

/// Records an outbox entry this version cannot read (an unknown event type), as a damaged
/// write or a newer version would, straight into the app's store; answers its event id.
async fn insert_unreadable_entry(app: &TestApp, tenant: &str) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let event = serde_json::json!({"id": id, "eventType": "integration.exploded", "tenantId": tenant, "subject": "s", "data": {}});
    if crate::helpers::backend_is_cosmos() {
        let store = im_store_cosmos::CosmosStore::connect(app.settings.cosmos_db.clone()).await.expect("connect");
        let doc = serde_json::json!({
            "id": format!("outbox-{id}"), "tenantId": tenant, "type": "outbox", "schemaVersion": 1,
            "recordedAt": now_ms, "ttl": -1, "event": event,
        });
        store.create_document("integration_integrations", tenant, &doc).await.expect("insert an unreadable entry");
    } else {
        let store = im_store_embedded::EmbeddedStore::open(app.dir.path(), Arc::new(im_domain::SystemClock)).expect("open");
        let row = (id.to_string(), event.to_string(), now_ms);
        store
            .documents()
            .transaction(move |tx, _| {
                tx.execute("INSERT INTO outbox (id, body, created_at) VALUES (?1, ?2, ?3)", row)
                    .map_err(|e| DomainError::Unexpected(e.into()))
            })
            .await
            .expect("insert an unreadable entry");
    }
    id
}

/// Every dead letter, across pages.
async fn dead_letters(app: &TestApp) -> Vec<Value> {
    let (mut all, mut query) = (Vec::new(), "limit=200".to_owned());
    loop {
        let response = app.get(&format!("/api/v1/admin/outbox/dead-letters?{query}"), &app.admin()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await.unwrap();
        all.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["continuationToken"].as_str() {
            Some(token) => query = format!("limit=200&continuationToken={token}"),
            None => return all,
        }
    }
}

async fn requeue(app: &TestApp, path: &str, token: &str) -> StatusCode {
    app.request(Method::POST, path, token).send().await.expect("request").status()
}

async fn until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "{what} within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_entry_blocks_no_later_event_and_an_admin_lists_and_requeues_it() {
    let app = spawn_app_with(|s| s.events.max_publish_attempts = 2).await;
    let recorder = Arc::new(Recorder::default());
    app.state.bus.subscribe(recorder.clone());
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let token = app.token(&tenant, "alice", &[im_domain::Role::Member]);
    let poison = insert_unreadable_entry(&app, &tenant).await;

    // Later events leave although the older entry cannot be read.
    let (created, _) = app.create_github(&token, "after the poison").await;
    let id = created["id"].as_str().unwrap().to_owned();
    until("the later event is published", async || recorder.0.lock().unwrap().iter().any(|e| e.subject == id).then_some(())).await;

    // After two failed tries the entry is a dead letter, listed with its reason.
    let listed =
        until("the dead letter is listed", async || dead_letters(&app).await.into_iter().find(|d| d["id"] == poison.to_string())).await;
    assert_eq!(listed["attempts"], 2);
    assert_eq!(listed["eventType"], "integration.exploded");
    assert_eq!(listed["tenantId"], tenant.as_str());
    assert!(listed["lastError"].as_str().unwrap().contains("cannot be read"), "{listed}");

    // Readiness counts it: degraded, not unready.
    let ready: Value = app.anonymous(Method::GET, "/health/ready").send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    let outbox = ready["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == "outbox").expect("outbox reported").clone();
    assert!(outbox["detail"].as_str().unwrap().contains("1 dead letter(s)"), "{outbox}");

    // Administrators only; every answer is a problem the document names.
    let path = format!("/api/v1/admin/outbox/dead-letters/{poison}/requeue");
    assert_eq!(app.get("/api/v1/admin/outbox/dead-letters", &token).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(requeue(&app, &path, &token).await, StatusCode::FORBIDDEN);
    let unknown = format!("/api/v1/admin/outbox/dead-letters/{}/requeue", uuid::Uuid::new_v4());
    assert_eq!(requeue(&app, &unknown, &app.admin()).await, StatusCode::NOT_FOUND);
    assert_eq!(requeue(&app, "/api/v1/admin/outbox/dead-letters/nope/requeue", &app.admin()).await, StatusCode::NOT_FOUND);
    let forged = app.get("/api/v1/admin/outbox/dead-letters?continuationToken=forged", &app.admin()).await;
    assert_eq!(forged.status(), StatusCode::BAD_REQUEST);

    // Requeued, it is tried again from zero (and, still unreadable, set aside again).
    let first_dead_at = listed["deadAt"].as_str().unwrap().to_owned();
    assert_eq!(requeue(&app, &path, &app.admin()).await, StatusCode::NO_CONTENT);
    assert!(dead_letters(&app).await.iter().all(|d| d["id"] != poison.to_string() || d["deadAt"] != first_dead_at.as_str()));
    let again = until("the requeued entry is tried again", async || {
        dead_letters(&app).await.into_iter().find(|d| d["id"] == poison.to_string() && d["deadAt"] != first_dead_at.as_str())
    })
    .await;
    assert_eq!(again["attempts"], 2, "its count started again: {again}");
    app.stop().await;
}
