//! Several instances on one store (and, with `IM_TEST_EVENTS=rabbitmq`, one broker): every
//! event is delivered, and duplicates, the rare result of a crash, are counted and bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{TestApp, events_on_rabbitmq, github, spawn_in};

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

/// A receiver that accepts every delivery, subscribed by a webhook created through `app`.
async fn accepting_receiver(app: &TestApp, token: &str) -> MockServer {
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let created = app.post("/api/v1/webhooks", token, &json!({"url": format!("{}/hook", receiver.uri())})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    receiver
}

async fn instances() -> Vec<TestApp> {
    instances_with(|_| {}).await
}

/// Three instances with the settings of [`instances`], then `configure`'s.
async fn instances_with(configure: impl FnOnce(&mut integration_manager::Settings)) -> Vec<TestApp> {
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
        configure(s);
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
    let receiver = accepting_receiver(&apps[1], &token).await;

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

/// Every instance's readiness report; each is ready (200), degraded at worst.
async fn readiness(apps: &[TestApp]) -> Vec<Value> {
    let mut reports = Vec::new();
    for app in apps {
        let response = app.anonymous(reqwest::Method::GET, "/health/ready").send().await.expect("readiness answers");
        assert_eq!(response.status(), StatusCode::OK, "a non-critical dependency leaves the service ready");
        reports.push(response.json::<Value>().await.unwrap());
    }
    reports
}

/// `make chaos` (`IM_CHAOS_FULL=1`) runs the long variants; `make test` the short ones.
fn chaos_full() -> bool {
    std::env::var("IM_CHAOS_FULL").is_ok_and(|v| v == "1")
}

/// Chaos: Secret Management answers 503 while events are committed across three instances
/// (signing a delivery needs the endpoint's secret), then recovers: the deliveries wait on
/// their schedule and all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_deliveries_survive_a_secret_management_outage() {
    use std::sync::atomic::Ordering;
    let (service, secrets) = im_testkit::secret_management::SecretManagement::start().await;
    let apps = instances_with(|s| {
        s.secrets.backend = integration_manager::config::SecretsBackend::Http;
        s.secrets.http.url = secrets.uri();
        s.secrets.http.token = im_testkit::secret_management::SERVICE_TOKEN.to_owned().into();
        s.secrets.http.attempts = 1;
    })
    .await;
    let token = apps[0].member();
    let receiver = accepting_receiver(&apps[1], &token).await;

    service.down.store(true, Ordering::SeqCst);
    let committed = if chaos_full() { EVENTS * 5 } else { EVENTS / 2 };
    for n in 0..committed {
        let response = apps[n % INSTANCES].post("/api/v1/integrations", &token, &github(&format!("secrets-down-{n}"))).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    tokio::time::sleep(Duration::from_millis(if chaos_full() { 5000 } else { 1500 })).await;
    // Readiness shows the outage (degraded: deliveries wait durably) on the instances that met it.
    let reports = readiness(&apps).await;
    let down_seen = |report: &Value| {
        report["status"] == "degraded"
            && report["dependencies"].as_array().into_iter().flatten().any(|d| d["name"] == "secret_management" && d["ready"] == false)
    };
    assert!(reports.iter().any(down_seen), "readiness reports Secret Management down: {reports:?}");
    assert!(!reports.iter().any(|r| r.to_string().contains(&secrets.uri())), "no URL in readiness: {reports:?}");
    let delivered_while_down = receiver.received_requests().await.unwrap_or_default().len();
    service.down.store(false, Ordering::SeqCst);

    let (delivered, duplicated) = count_deliveries(&receiver, committed, Duration::from_secs(60)).await;
    let refused = service.refused.load(Ordering::SeqCst);
    eprintln!(
        "chaos (Secret Management down, then up): {committed} events committed, {delivered} delivered, {} lost, {duplicated} duplicated, {refused} secret reads refused during the outage",
        committed - delivered
    );
    assert!(refused > 0, "the outage was seen");
    assert_eq!(delivered_while_down, 0, "nothing is sent unsigned while the secret is out of reach");
    assert_eq!(delivered, committed, "nothing is lost");
    assert!(duplicated * 100 <= committed, "duplicates stay within 1%");
}

/// The local RabbitMQ node's application, stopped by `rabbitmqctl stop_app`; started again when
/// dropped, even when the test fails.
struct BrokerStopped;

fn rabbitmqctl(command: &str) -> bool {
    std::process::Command::new("rabbitmqctl").args(["-q", command]).status().is_ok_and(|s| s.success())
}

impl BrokerStopped {
    fn stop() -> Self {
        assert!(rabbitmqctl("stop_app"), "`rabbitmqctl stop_app` must work for the broker restart scenario");
        BrokerStopped
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !rabbitmqctl("start_app") {
            eprintln!("`rabbitmqctl start_app` failed: start RabbitMQ again by hand");
        }
    }
}

/// Chaos, RabbitMQ variant only (`IM_TEST_EVENTS=rabbitmq`, run by `make chaos`): the broker's
/// application is stopped while events are committed across three instances and started again;
/// the outbox keeps what could not be published and every delivery arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_deliveries_survive_a_broker_restart() {
    if !events_on_rabbitmq() {
        return;
    }
    let apps = instances().await;
    let token = apps[0].member();
    let receiver = accepting_receiver(&apps[1], &token).await;
    let committed = if chaos_full() { EVENTS * 5 } else { EVENTS };
    let commit = |n: usize| {
        let (app, token) = (&apps[n % INSTANCES], &token);
        async move {
            let response = app.post("/api/v1/integrations", token, &github(&format!("broker-{n}"))).await;
            assert_eq!(response.status(), StatusCode::CREATED, "writes go on while the broker is away");
        }
    };
    for n in 0..committed / 2 {
        commit(n).await;
    }
    {
        let _stopped = BrokerStopped::stop();
        for n in committed / 2..committed {
            commit(n).await;
        }
        tokio::time::sleep(Duration::from_secs(if chaos_full() { 10 } else { 2 })).await;
        let reports = readiness(&apps).await;
        assert!(reports.iter().all(|r| r["status"] == "degraded"), "readiness shows the broker away: {reports:?}");
    }
    let (delivered, duplicated) = count_deliveries(&receiver, committed, Duration::from_secs(120)).await;
    eprintln!(
        "chaos (RabbitMQ stopped, then started): {committed} events committed, {delivered} delivered, {} lost, {duplicated} duplicated",
        committed - delivered
    );
    assert_eq!(delivered, committed, "nothing is lost");
    // A duplicate is a job or an event whose acknowledgement the stopping broker lost.
    assert!(duplicated <= committed / 20 + 2, "duplicates stay bounded: {duplicated} of {committed}");
}
