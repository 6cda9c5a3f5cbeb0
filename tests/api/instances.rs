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

/// Waits until `expected` distinct messages arrived (or `wait` passed), lets late duplicates
/// arrive, and returns (distinct messages delivered, duplicate deliveries).
async fn count_deliveries(receiver: &MockServer, expected: usize, wait: Duration) -> (usize, usize) {
    let deadline = Instant::now() + wait;
    let distinct = || async {
        let received: Vec<_> =
            receiver.received_requests().await.unwrap_or_default().into_iter().filter(|r| r.headers.get("x-outcome").is_none()).collect();
        let mut per_event: HashMap<String, usize> = HashMap::new();
        for request in &received {
            let id = request.headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            *per_event.entry(id).or_default() += 1;
        }
        (per_event.len(), received.len())
    };
    while distinct().await.0 < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (delivered, received) = distinct().await;
    (delivered, received - delivered)
}

async fn instances() -> Vec<TestApp> {
    // One data directory: the key files and the local secret store are the same for all, as
    // `secrets.local_shared_data_dir` requires.
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let first = spawn_in(dir.clone(), |s| {
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.webhooks.sender.allow_http = true;
        // Longer in all than the receiver outage of the chaos scenario, even on a slow store.
        s.webhooks.service.retry_schedule = ["200ms", "500ms", "1s", "2s", "4s", "8s", "12s", "15s"]
            .iter()
            .map(|d| integration_manager::config::HumanDuration::parse(d).unwrap())
            .collect();
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

    let (delivered, duplicates) = count_deliveries(&receiver, EVENTS, Duration::from_secs(60)).await;
    eprintln!("{INSTANCES} instances: {EVENTS} events committed, {delivered} delivered, {duplicates} duplicate deliveries");
    assert_eq!(delivered, EVENTS, "every event is delivered (lost: {})", EVENTS - delivered);
    assert!(duplicates * 100 <= EVENTS, "at most 1% duplicates: {duplicates} of {EVENTS}");

    let listed: Value = apps[2].get("/api/v1/webhooks", &token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "every instance sees the endpoint");
}

/// The small `make chaos` scenario that runs in `make test`: the receiver is down (503) while
/// events are committed across three instances, then comes back; nothing is lost, and
/// duplicates (a message accepted twice) are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_deliveries_survive_a_receiver_outage() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let apps = instances().await;
    let token = apps[0].member();
    let receiver = MockServer::start().await;
    let down = Arc::new(AtomicBool::new(true));
    let accepted: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let (answer, record, count_refused) = (down.clone(), accepted.clone(), refused.clone());
    Mock::given(method("POST"))
        .respond_with(move |request: &wiremock::Request| {
            if answer.load(Ordering::SeqCst) {
                count_refused.fetch_add(1, Ordering::SeqCst);
                return ResponseTemplate::new(503);
            }
            let id = request.headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            *record.lock().unwrap().entry(id).or_default() += 1;
            ResponseTemplate::new(200)
        })
        .mount(&receiver)
        .await;
    let created = apps[1].post("/api/v1/webhooks", &token, &json!({"url": format!("{}/hook", receiver.uri())})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let committed = EVENTS / 2;
    for n in 0..committed {
        let response = apps[n % INSTANCES].post("/api/v1/integrations", &token, &github(&format!("outage-{n}"))).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    down.store(false, Ordering::SeqCst);

    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < committed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = accepted.lock().unwrap().clone();
    let delivered = accepted.len();
    let duplicated: usize = accepted.values().map(|n| n - 1).sum();
    eprintln!(
        "chaos (receiver down, then up): {committed} events committed, {delivered} delivered, {} lost, {duplicated} duplicated, {} attempts refused during the outage",
        committed - delivered,
        refused.load(Ordering::SeqCst)
    );
    assert!(refused.load(Ordering::SeqCst) > 0, "the outage was seen");
    assert_eq!(delivered, committed, "nothing is lost");
    assert!(duplicated * 100 <= committed, "duplicates stay within 1%");
}
