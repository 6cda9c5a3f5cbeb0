//! Several instances on one store (and, with `IM_TEST_EVENTS=rabbitmq`, one broker): every
//! event is delivered, and duplicates, the rare result of a crash, are counted and bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{TestApp, github, spawn_in};

const INSTANCES: usize = 3;
const EVENTS: usize = 60;

async fn instances() -> Vec<TestApp> {
    // One data directory: the key files and the local secret store are the same for all, as
    // `secrets.local_shared_data_dir` requires.
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let first = spawn_in(dir.clone(), |s| {
        s.webhooks.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.allow_http = true;
    })
    .await;
    let shared = first.settings.clone();
    let mut all = vec![first];
    for _ in 1..INSTANCES {
        let settings = shared.clone();
        all.push(spawn_in(dir.clone(), move |s| *s = settings).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_from_three_instances_arrive_once() {
    let apps = instances().await;
    let token = apps[0].member();
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let created = apps[1].post("/api/v1/webhooks", &token, &json!({"url": format!("{}/hook", receiver.uri())})).await;
    assert_eq!(created.status(), StatusCode::CREATED);

    for n in 0..EVENTS {
        let response = apps[n % INSTANCES].post("/api/v1/integrations", &token, &github(&format!("across-{n}"))).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{:?}", response.text().await);
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut per_event: HashMap<String, usize> = HashMap::new();
    loop {
        per_event.clear();
        for request in receiver.received_requests().await.unwrap_or_default() {
            let id = request.headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            *per_event.entry(id).or_default() += 1;
        }
        if per_event.len() >= EVENTS || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let late duplicates arrive before counting them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = receiver.received_requests().await.unwrap_or_default().len();
    let duplicates = received - per_event.len();
    eprintln!("{INSTANCES} instances: {EVENTS} events committed, {} delivered, {duplicates} duplicate deliveries", per_event.len());
    assert_eq!(per_event.len(), EVENTS, "every event is delivered (lost: {})", EVENTS - per_event.len());
    assert!(duplicates * 100 <= EVENTS, "at most 1% duplicates: {duplicates} of {EVENTS}");

    let listed: Value = apps[2].get("/api/v1/webhooks", &token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "every instance sees the endpoint");
}
