//! The Cosmos DB adapter against the Cosmos test server (required in CI): provisioning, the
//! conformance suite (the same one the embedded store passes), TTL expiry.

use std::time::{Duration, Instant};

use im_store_cosmos::{CONTAINERS, CosmosSettings, CosmosStore, provision};
use im_testkit::cosmos::{endpoint, fresh_database};

fn settings(endpoint: String, database: String) -> CosmosSettings {
    CosmosSettings {
        endpoint,
        key: im_store_cosmos::EMULATOR_KEY.into(),
        database,
        emulator: true,
        request_timeout: im_domain::HumanDuration(Duration::from_secs(20)),
        preferred_regions: Vec::new(),
        max_throttle_retries: 3,
        auto_provision: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_creates_the_seven_containers_once_and_connect_names_a_missing_one() {
    let Some(endpoint) = endpoint("provisioning") else { return };
    let settings = settings(endpoint, fresh_database());

    let error = CosmosStore::connect(settings.clone()).await.expect_err("nothing is provisioned yet");
    assert!(error.to_string().contains("integration_providers") && error.to_string().contains("migrate"), "{error}");

    let report = provision(&settings).await.expect("provision");
    assert_eq!(report.created.len(), 8, "the database and seven containers: {report:?}");
    for spec in CONTAINERS {
        assert!(report.created.iter().any(|c| c.contains(spec.name) && c.contains(spec.partition_key)), "{} in {report:?}", spec.name);
    }
    let again = provision(&settings).await.expect("provision again");
    assert!(again.created.is_empty() && again.existing.len() == 8, "idempotent: {again:?}");
    CosmosStore::connect(settings).await.expect("connects once provisioned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let Some(endpoint) = endpoint("passes_the_conformance_suite") else { return };
    let settings = settings(endpoint, fresh_database());
    provision(&settings).await.expect("provision");
    let store = CosmosStore::connect(settings).await.expect("connect");
    im_testkit::run_all(store.integrations().as_ref(), store.providers().as_ref()).await;
    im_testkit::outbox::events_are_recorded_atomically(store.integrations().as_ref(), store.outbox().as_ref()).await;
    im_testkit::outbox::claims_are_exclusive(store.integrations().as_ref(), store.outbox().as_ref()).await;
    im_testkit::outbox::failed_entries_become_dead_letters(store.integrations().as_ref(), store.outbox().as_ref(), async |tenant| {
        let id = uuid::Uuid::now_v7();
        let doc = serde_json::json!({
            "id": format!("outbox-{id}"), "tenantId": tenant.as_str(), "type": "outbox", "schemaVersion": 1,
            "recordedAt": time::OffsetDateTime::now_utc().unix_timestamp() * 1000, "ttl": -1,
            "event": {"id": id, "eventType": "integration.created", "tenantId": tenant.as_str(), "unexpected": true},
        });
        store.create_document("integration_integrations", tenant.as_str(), &doc).await.expect("insert an unreadable entry");
        id
    })
    .await;
    im_testkit::webhooks::contract(store.webhooks().as_ref()).await;
    im_testkit::deliveries::contract(store.deliveries().as_ref()).await;
    im_testkit::deliveries::without_a_queue_the_queued_writes_are_refused(store.deliveries().as_ref()).await;
    im_testkit::connections::contract(store.connections().as_ref()).await;
    im_testkit::connections::events_are_recorded_atomically(store.connections().as_ref(), store.outbox().as_ref()).await;
    im_testkit::sync::run_all(store.sync_tasks().as_ref(), store.sync_executions().as_ref(), store.sync_states().as_ref()).await;
    im_testkit::sync::service(store.sync_tasks(), store.sync_executions(), store.sync_states()).await;
    im_testkit::sync::scheduler(store.sync_tasks(), store.sync_executions()).await;
    im_testkit::audit::buffer(store.audit_buffer().as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_and_execution_documents_expire() {
    let Some(endpoint) = endpoint("delivery_and_execution_documents_expire") else { return };
    let settings = settings(endpoint, fresh_database());
    provision(&settings).await.expect("provision");
    let store = CosmosStore::connect(settings).await.expect("connect");
    // A per-document ttl is honoured only in containers whose TTL is on, as provisioned for
    // deliveries (7 days) and executions (30 days); the webhooks container keeps documents.
    let doc = |id: &str, ttl: Option<i64>| {
        let mut d = serde_json::json!({"id": id, "tenantId": "t1", "type": "test"});
        if let Some(ttl) = ttl {
            d["ttl"] = ttl.into();
        }
        d
    };
    store.create_document("integration_webhook_deliveries", "t1", &doc("d1", Some(5))).await.unwrap();
    store.create_document("integration_sync_executions", "t1", &doc("e1", Some(5))).await.unwrap();
    store.create_document("integration_webhook_deliveries", "t1", &doc("d2", None)).await.unwrap();
    store.create_document("integration_webhooks", "t1", &doc("w1", None)).await.unwrap();
    assert!(store.read_document("integration_webhook_deliveries", "t1", "d1").await.unwrap().is_some());

    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let d1 = store.read_document("integration_webhook_deliveries", "t1", "d1").await.unwrap();
        let e1 = store.read_document("integration_sync_executions", "t1", "e1").await.unwrap();
        if d1.is_none() && e1.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "documents with ttl 5 s did not expire");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        store.read_document("integration_webhook_deliveries", "t1", "d2").await.unwrap().is_some(),
        "the 7-day default keeps a new delivery"
    );
    assert!(store.read_document("integration_webhooks", "t1", "w1").await.unwrap().is_some(), "no TTL on webhooks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_records_pass_the_conformance_suite() {
    let Some(endpoint) = endpoint("idempotency_records_pass_the_conformance_suite") else { return };
    let settings = settings(endpoint, fresh_database());
    provision(&settings).await.expect("provision");
    let store = CosmosStore::connect(settings).await.expect("connect");
    im_testkit::idempotency::contract(store.idempotency().as_ref()).await;
    im_testkit::idempotency::service(store.idempotency()).await;
}
