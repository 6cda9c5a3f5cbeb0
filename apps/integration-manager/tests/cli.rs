//! The real binary: subcommands, configuration errors, tokens against a running server,
//! graceful shutdown.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_integration-manager");

fn command(data_dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("IM_CONFIG")
        .env("IM_STORAGE__DATA_DIR", data_dir)
        .env("IM_LOG__LEVEL", "info")
        .env("IM_LOG__FORMAT", "json")
        .env("IM_SERVER__SHUTDOWN_TIMEOUT", "5s")
        .env_remove("RUST_LOG")
        // Switches of the tests, not configuration keys (`IM_` is the configuration's prefix).
        .env_remove("IM_CHAOS_FULL")
        .env_remove("IM_TEST_BACKEND")
        .env_remove("IM_TEST_EVENTS")
        .env_remove("IM_TEST_SECRETS")
        .env_remove("IM_TEST_COSMOS_ENDPOINT");
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(data_dir: &Path) -> Server {
    serve_with(data_dir, &[]).await
}

async fn serve_with(data_dir: &Path, env: &[(&str, String)]) -> Server {
    serve_as(data_dir, env, "all").await
}

async fn serve_as(data_dir: &Path, env: &[(&str, String)], role: &str) -> Server {
    let port = free_port();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("server.log")).unwrap();
    let child = command(data_dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("IM_SERVER__PORT", port.to_string())
        .args(["serve", "--role", role])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the binary starts");
    let server = Server { child, url: format!("http://127.0.0.1:{port}") };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = reqwest::get(format!("{}/health/ready", server.url)).await
            && r.status().is_success()
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = reqwest::get(format!("{}/health/ready", server.url)).await.map(|r| r.status());
    let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
    let tail: Vec<_> = log.lines().rev().take(20).collect();
    panic!("the server did not become ready (last answer: {last:?}); the log ends with {tail:#?}");
}

/// The broker's URL, an exchange no other test uses (named `{prefix}-…`) and a queue bound to
/// it; `None` when `test` runs without RabbitMQ.
async fn fresh_exchange(test: &str, prefix: &str) -> Option<(String, String, im_testkit::rabbit::TestQueue)> {
    let url = im_testkit::services::amqp_url(im_testkit::services::rabbitmq(test)?);
    let exchange = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let queue = im_testkit::rabbit::TestQueue::bind(&url, &exchange).await;
    Some((url, exchange, queue))
}

fn token(data_dir: &Path, roles: &str) -> String {
    let out = command(data_dir).args(["token", "--tenant", "acme", "--user", "alice", "--roles", roles]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "the token alone on stdout");
    stdout.trim().to_owned()
}

#[tokio::test]
async fn a_minted_token_works_against_the_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path()).await;
    let token = token(dir.path(), "member,admin");
    assert_eq!(token.split('.').count(), 3, "a JWT");
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/api/v1/integrations", server.url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"providerId": "github", "name": "cli", "config": {"organization": "acme"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let bad = command(dir.path()).args(["token", "--tenant", "acme", "--user", "alice", "--roles", "overlord"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("overlord"));
}

/// An `api` instance serves the API and publishes nothing; a `worker` on the same store relays
/// what the API committed and serves only the health endpoints; readiness names the role and
/// checks what the role uses. `probe` tells a live server from none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_roles_split_the_work() {
    let Some((url, exchange, mut queue)) = fresh_exchange("api_and_worker_roles_split_the_work", "im-roles-test").await else { return };
    let env = [("IM_EVENTS__BACKEND", "rabbitmq".to_owned()), ("IM_RABBITMQ__URL", url), ("IM_RABBITMQ__EXCHANGE", exchange)];
    let dir = tempfile::tempdir().unwrap();
    let api = serve_as(dir.path(), &env, "api").await;
    let token = token(dir.path(), "member");
    let client = reqwest::Client::new();
    let ready =
        |url: String| async move { reqwest::get(format!("{url}/health/ready")).await.unwrap().json::<serde_json::Value>().await.unwrap() };
    let names = |report: &serde_json::Value| -> Vec<String> {
        report["dependencies"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_owned()).collect()
    };

    let report = ready(api.url.clone()).await;
    assert_eq!(report["role"], "api");
    assert!(!names(&report).contains(&"outbox".to_owned()), "the api role does not relay: {report}");
    let created: serde_json::Value = client
        .post(format!("{}/api/v1/integrations", api.url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"providerId": "github", "name": "roles", "config": {"organization": "acme"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("created").to_owned();
    assert!(queue.next(Duration::from_millis(1500)).await.is_none(), "nothing publishes without a worker");

    let worker = serve_as(dir.path(), &env, "worker").await;
    let report = ready(worker.url.clone()).await;
    assert_eq!(report["role"], "worker");
    assert!(names(&report).contains(&"outbox".to_owned()), "{report}");
    let message = queue.next(Duration::from_secs(20)).await.expect("the worker relays the api's event");
    assert_eq!((message.routing_key.as_str(), message.body["subject"].as_str()), ("integration.created", Some(id.as_str())));
    let listed = client.get(format!("{}/api/v1/integrations", worker.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(listed.status(), 404, "the worker role serves no API");
    assert_eq!(reqwest::get(format!("{}/health/live", worker.url)).await.unwrap().status(), 200);

    let port = |server: &Server| server.url.rsplit(':').next().unwrap().to_owned();
    let probe = |port: String| command(dir.path()).env("IM_SERVER__PORT", port).arg("probe").status().unwrap();
    assert!(probe(port(&worker)).success());
    assert!(!probe(free_port().to_string()).success(), "no server there");
}

#[tokio::test]
async fn sigterm_stops_gracefully_with_exit_code_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path()).await;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let stderr = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(stderr.contains("\"request_id\"") || stderr.contains("listening"), "JSON logs were written: {stderr}");
    assert!(!stderr.contains("hs256"), "no key material in logs");
    let key = std::fs::read_to_string(dir.path().join("auth-hs256.key")).unwrap();
    assert!(!stderr.contains(key.trim()), "the signing key never reaches the log");
}

#[test]
fn configuration_errors_name_the_key_and_exit_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = command(dir.path()).env("IM_SERVER__PORT", port.to_string()).env("IM_LOG__FORMAT", "yaml").arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("log.format"), "{stderr}");
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok(), "the port was never bound");

    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\nport = \"high\"\n").unwrap();
    let out = command(dir.path()).args(["--config", file.to_str().unwrap(), "serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.port"));
}

#[test]
fn migrate_is_idempotent_and_openapi_prints_the_document() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = command(dir.path()).arg("migrate").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(dir.path().join("integration-manager.db").exists());
    let out = command(dir.path()).arg("openapi").output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["paths"]["/api/v1/integrations"].is_object());
}

/// SIGKILL while writes are committing and events are being published: after a restart, every
/// write that was acknowledged has its event on the broker (the outbox kept what was not sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_publish_loses_no_event() {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    let Some((url, exchange, mut queue)) = fresh_exchange("a_crash_between_commit_and_publish_loses_no_event", "im-crash-test").await
    else {
        return;
    };
    let env =
        [("IM_EVENTS__BACKEND", "rabbitmq".to_owned()), ("IM_RABBITMQ__URL", url.clone()), ("IM_RABBITMQ__EXCHANGE", exchange.clone())];
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve_with(dir.path(), &env).await;
    let token = token(dir.path(), "member");

    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (url, token, acknowledged) = (server.url.clone(), token.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..10_000 {
                let body = serde_json::json!({"providerId": "github", "name": format!("w{w}-{i}"), "config": {"organization": "acme"}});
                let Ok(response) = client.post(format!("{url}/api/v1/integrations")).bearer_auth(&token).json(&body).send().await else {
                    return;
                };
                if response.status() != 201 {
                    return;
                }
                let created: serde_json::Value = response.json().await.unwrap();
                acknowledged.lock().unwrap().insert(created["id"].as_str().unwrap().to_owned());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.child.kill().expect("SIGKILL");
    server.child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 10, "the load committed writes before the crash ({})", acknowledged.len());

    let _restarted = serve_with(dir.path(), &env).await;
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !acknowledged.is_subset(&seen) && Instant::now() < deadline {
        if let Some(message) = queue.next(Duration::from_secs(2)).await {
            assert_eq!(message.routing_key, "integration.created");
            seen.insert(message.body["subject"].as_str().unwrap().to_owned());
        }
    }
    let missing: Vec<_> = acknowledged.difference(&seen).collect();
    assert!(missing.is_empty(), "{} of {} acknowledged writes have no event: {missing:?}", missing.len(), acknowledged.len());
}

/// SIGKILL while deliveries are pending (embedded queue): after a restart every one is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_a_crash() {
    crash_with_pending_deliveries(Vec::new()).await;
}

/// The same with delivery jobs on the RabbitMQ work queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_on_rabbitmq_survive_a_crash() {
    let Some(addr) = im_testkit::services::rabbitmq("pending_deliveries_on_rabbitmq_survive_a_crash") else { return };
    let unique = format!("im-crash-deliveries-{}", uuid::Uuid::new_v4().simple());
    crash_with_pending_deliveries(vec![
        ("IM_EVENTS__BACKEND", "rabbitmq".to_owned()),
        ("IM_RABBITMQ__URL", im_testkit::services::amqp_url(addr)),
        ("IM_RABBITMQ__EXCHANGE", unique.clone()),
        ("IM_RABBITMQ__DELIVERY_QUEUE_PREFIX", unique),
    ])
    .await;
}

async fn crash_with_pending_deliveries(extra: Vec<(&'static str, String)>) {
    use std::collections::HashSet;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let receiver = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&receiver).await;
    let mut env = vec![
        ("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[\"127.0.0.0/8\"]".to_owned()),
        ("IM_WEBHOOKS__ALLOW_HTTP", "true".to_owned()),
        // Long enough that no delivery runs out of attempts before the crash, however slow the machine.
        ("IM_WEBHOOKS__RETRY_SCHEDULE", format!("[{}]", vec!["\"1s\""; 40].join(", "))),
    ];
    env.extend(extra);
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve_with(dir.path(), &env).await;
    let token = token(dir.path(), "member");
    let client = reqwest::Client::new();
    let hook = serde_json::json!({"url": format!("{}/hook", receiver.uri())});
    let response = client.post(format!("{}/api/v1/webhooks", server.url)).bearer_auth(&token).json(&hook).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let response_body: serde_json::Value = response.json().await.unwrap();
    let mut subjects = HashSet::new();
    for i in 0..10 {
        let body = serde_json::json!({"providerId": "github", "name": format!("crash {i}"), "config": {"organization": "acme"}});
        let created: serde_json::Value = client
            .post(format!("{}/api/v1/integrations", server.url))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        subjects.insert(created["id"].as_str().unwrap().to_owned());
    }
    let started = Instant::now();
    // Every delivery has had an attempt (so each is pending, with a retry due) before the crash.
    let mut attempted = HashSet::new();
    while !subjects.is_subset(&attempted) && started.elapsed() < Duration::from_secs(30) {
        for request in receiver.received_requests().await.unwrap() {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            attempted.insert(body["subject"].as_str().unwrap_or_default().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.child.kill().expect("SIGKILL");
    server.child.wait().unwrap();

    receiver.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let _restarted = serve_with(dir.path(), &env).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut delivered = HashSet::new();
    while !subjects.is_subset(&delivered) && Instant::now() < deadline {
        for request in receiver.received_requests().await.unwrap() {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            delivered.insert(body["subject"].as_str().unwrap_or_default().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing: Vec<_> = subjects.difference(&delivered).collect();
    assert!(missing.is_empty(), "{} of 10 pending deliveries were lost: {missing:?}", missing.len());

    // Signing secrets are shown once, in the creation answer, and never written to the log.
    let created = response_body;
    let secret = created["secret"].as_str().unwrap();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(!log.contains(secret) && !log.contains(&secret[6..]), "the signing secret never reaches the log");
}

/// `make chaos` (`IM_CHAOS_FULL=1`) runs the long variants of the chaos scenarios; `make test`
/// the short ones.
fn chaos_full() -> bool {
    std::env::var("IM_CHAOS_FULL").is_ok_and(|v| v == "1")
}

/// Chaos: three instances on one data directory deliver webhooks while events are committed
/// across them; one instance is SIGKILLed mid-load and started again (three rounds, a different
/// instance each, in the full variant). Every committed event's delivery arrives; duplicates
/// (an attempt in flight when its instance died) are counted and bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kill_9_of_an_instance_under_load_loses_no_delivery() {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const INSTANCES: usize = 3;
    let (rounds, load) = if chaos_full() { (3, Duration::from_secs(4)) } else { (1, Duration::from_millis(1500)) };
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let env = [
        ("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[\"127.0.0.0/8\"]".to_owned()),
        ("IM_WEBHOOKS__ALLOW_HTTP", "true".to_owned()),
        ("IM_WEBHOOKS__RETRY_SCHEDULE", format!("[{}]", vec!["\"1s\""; 40].join(", "))),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    for _ in 0..INSTANCES {
        servers.push(serve_with(dir.path(), &env).await);
    }
    let token = token(dir.path(), "member");
    let client = reqwest::Client::new();
    let hook = serde_json::json!({"url": format!("{}/hook", receiver.uri())});
    let response = client.post(format!("{}/api/v1/webhooks", servers[0].url)).bearer_auth(&token).json(&hook).send().await.unwrap();
    assert_eq!(response.status(), 201);

    // One writer per instance; a writer whose instance is down waits for it to come back.
    let urls = Arc::new(Mutex::new(servers.iter().map(|s| s.url.clone()).collect::<Vec<_>>()));
    let committed = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..INSTANCES {
        let (urls, token, committed, stop, client) = (urls.clone(), token.clone(), committed.clone(), stop.clone(), client.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let url = urls.lock().unwrap()[w].clone();
                let body = serde_json::json!({"providerId": "github", "name": format!("w{w}-{i}"), "config": {"organization": "acme"}});
                let sent = client.post(format!("{url}/api/v1/integrations")).bearer_auth(&token).json(&body).send().await;
                match sent {
                    Ok(response) if response.status() == 201 => {
                        let created: serde_json::Value = response.json().await.unwrap();
                        committed.lock().unwrap().insert(created["id"].as_str().unwrap().to_owned());
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }
    let mut last_kill = Instant::now();
    for round in 0..rounds {
        tokio::time::sleep(load).await;
        let victim = (round + 1) % INSTANCES;
        last_kill = Instant::now();
        servers[victim].child.kill().expect("SIGKILL");
        servers[victim].child.wait().unwrap();
        tokio::time::sleep(load / 2).await;
        servers[victim] = serve_with(dir.path(), &env).await;
        urls.lock().unwrap()[victim] = servers[victim].url.clone();
    }
    tokio::time::sleep(load).await;
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    let committed = committed.lock().unwrap().clone();
    assert!(committed.len() > 10, "the load committed writes ({})", committed.len());

    // Deliveries per committed event (by subject), counted until all arrived or a minute passed.
    let deliveries = || async {
        let mut per_subject: HashMap<String, usize> = HashMap::new();
        for request in receiver.received_requests().await.unwrap() {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            let subject = body["subject"].as_str().unwrap_or_default();
            if committed.contains(subject) {
                *per_subject.entry(subject.to_owned()).or_default() += 1;
            }
        }
        per_subject
    };
    // An attempt in flight in the killed instance stays leased to it until its lease ends; then
    // another instance makes it.
    let deadline = last_kill + im_domain::webhooks::delivery::ATTEMPT_LEASE + Duration::from_secs(30);
    while deliveries().await.len() < committed.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_arrived = last_kill.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_subject = deliveries().await;
    let (delivered, duplicated) = (per_subject.len(), per_subject.values().map(|n| n - 1).sum::<usize>());
    let lost = committed.len() - delivered;
    eprintln!(
        "chaos (kill -9 of one of {INSTANCES} instances under load, {rounds} round(s)): {} events committed, {delivered} delivered, {lost} lost, {duplicated} duplicated; the last arrived {:.1} s after the last kill",
        committed.len(),
        all_arrived.as_secs_f64()
    );
    assert_eq!(lost, 0, "every committed event is delivered");
    // A duplicate is an attempt that was in flight (or sent, not yet recorded) when its instance died.
    assert!(duplicated <= committed.len() / 20 + 2 * rounds, "duplicates stay bounded: {duplicated} of {}", committed.len());
}

/// The store of the crash test: the embedded one, or with `IM_TEST_BACKEND=cosmos` a fresh
/// database on the Cosmos test server (`None`: skipped, the server is not available).
fn store_env() -> Option<Vec<(&'static str, String)>> {
    if !std::env::var("IM_TEST_BACKEND").is_ok_and(|b| b == "cosmos") {
        return Some(Vec::new());
    }
    let endpoint = im_testkit::cosmos::endpoint("a_killed_sync_run_resumes_from_its_checkpoint")?;
    Some(vec![
        ("IM_STORAGE__BACKEND", "cosmos".to_owned()),
        ("IM_COSMOS_DB__ENDPOINT", endpoint),
        ("IM_COSMOS_DB__KEY", im_store_cosmos::EMULATOR_KEY.to_owned()),
        ("IM_COSMOS_DB__DATABASE", im_testkit::cosmos::fresh_database()),
        ("IM_COSMOS_DB__EMULATOR", "true".to_owned()),
        ("IM_COSMOS_DB__AUTO_PROVISION", "true".to_owned()),
        ("IM_COSMOS_DB__REQUEST_TIMEOUT", "30s".to_owned()),
        ("IM_SECRETS__LOCAL_SHARED_DATA_DIR", "true".to_owned()),
    ])
}

/// SIGKILL in the middle of a bidirectional run against a slow provider: a second instance on the
/// same store marks the first execution `expired`, the next run continues from the checkpoint
/// the dead run saved (its first page request carries the saved cursor), and in the end every
/// provider record is in the Shard Manager once with its content, and every platform record
/// reached the provider once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sync_run_resumes_from_its_checkpoint() {
    use im_domain::TenantId;
    use im_domain::sync::ports::ShardWrite;
    use im_testkit::fake_provider::{FakeAuth, FakeProvider, Fault};
    use serde_json::{Value, json};

    let Some(mut env) = store_env() else { return };
    let cosmos = !env.is_empty();
    // Modest on Cosmos DB: its test server is slow.
    let (records, page, platform_only) = if cosmos { (600, 50, 10) } else { (3_000, 100, 20) };
    env.extend([
        ("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[\"127.0.0.0/8\"]".to_owned()),
        ("IM_WEBHOOKS__ALLOW_HTTP", "true".to_owned()),
        ("IM_SYNC__POLL_INTERVAL", "100ms".to_owned()),
        ("IM_SYNC__LEASE", "5s".to_owned()),
        ("IM_SYNC__PAGE_SIZE", page.to_string()),
    ]);
    let token_value = "fake-provider-token-0123456789";
    let fake = FakeProvider::start(records, FakeAuth::Bearer(token_value.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = serve_with(dir.path(), &env).await;
    let token = token(dir.path(), "member");
    let client = reqwest::Client::new();
    let post = |url: String, body: Value| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            let response = client.post(url).bearer_auth(token).json(&body).send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.json::<Value>().await.unwrap()
        }
    };
    let definition = fake.definition();
    let integration = post(
        format!("{}/api/v1/integrations", first.url),
        json!({"providerId": "custom", "name": "Local API", "customDefinition": definition}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let connection = post(
        format!("{}/api/v1/integrations/{integration}/connections", first.url),
        json!({"name": "bot", "authMode": "bearer", "credentials": {"token": token_value}}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = json!({
        "integrationId": integration, "connectionId": connection, "entity": "record", "target": "records",
        "direction": "bidirectional", "schedule": {"manual": true},
        "fieldMapping": [{"provider": "/name", "platform": "/title"}],
        "conflictPolicy": "provider_wins", "deletes": "propagate",
    });
    let task = post(format!("{}/api/v1/sync-tasks", first.url), task).await["id"].as_str().unwrap().to_owned();

    // Records only the platform has: the run writes them to the provider first.
    let tenant = TenantId::new("acme").unwrap();
    let shards = || {
        im_store_embedded::EmbeddedStore::open(dir.path(), std::sync::Arc::new(im_domain::SystemClock)).expect("the store opens").shards()
    };
    for n in 0..platform_only {
        let write = ShardWrite {
            data: json!({"title": format!("platform {n}")}),
            version: None,
            updated_at: time::OffsetDateTime::now_utc(),
            source: "someone".into(),
        };
        shards().put(&tenant, "records", &format!("p{n:04}"), &write, None).await.unwrap();
    }

    // A slow provider: the run is killed with pages still to read.
    let pages = records / page;
    fake.fail_next((0..platform_only + pages / 2).map(|_| Fault::Slow(Duration::from_millis(150))));
    let lists = |fake: &FakeProvider| fake.requests().into_iter().filter(|r| r.path_and_query.starts_with("/cursor/records")).count();
    let execution = post(format!("{}/api/v1/sync-tasks/{task}/run", first.url), json!({})).await["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    while lists(&fake) < pages / 3 {
        assert!(started.elapsed() < Duration::from_secs(60), "the run did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.child.kill().expect("SIGKILL");
    first.child.wait().unwrap();
    let seen_before = fake.requests().len();
    assert_eq!(fake.writes(), platform_only, "the platform's records were written to the provider before the crash");

    let second = serve_with(dir.path(), &env).await;
    let get = |path: String| {
        let (client, token, url) = (client.clone(), token.clone(), second.url.clone());
        async move { client.get(format!("{url}{path}")).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let next = loop {
        let listed = get(format!("/api/v1/sync-tasks/{task}/executions")).await;
        let items = listed["items"].as_array().cloned().unwrap_or_default();
        let finished = items
            .iter()
            .find(|e| e["id"] != execution.as_str() && ["succeeded", "partial", "failed"].contains(&e["status"].as_str().unwrap_or("")));
        if let Some(finished) = finished {
            break finished.clone();
        }
        assert!(Instant::now() < deadline, "no run after the crash finished: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dead = get(format!("/api/v1/sync-tasks/{task}/executions/{execution}")).await;
    assert_eq!(dead["status"], "expired", "{dead}");
    assert_eq!(next["status"], "succeeded", "{next}");
    assert_eq!(next["trigger"], "schedule", "the expired task was due again at once: {next}");

    // Resumed, not restarted: the saved cursor names a page, the first list request after the
    // crash carries it, and fewer records were read than the provider has.
    let from: Value = serde_json::from_str(next["checkpointsFrom"]["provider"].as_str().expect("a provider checkpoint")).unwrap();
    let page_token = from["page"].as_str().expect("the checkpoint is inside the enumeration");
    let cursor = page_token.strip_prefix("c:").expect("a cursor position").to_owned();
    let after: Vec<_> =
        fake.requests()[seen_before..].iter().filter(|r| r.path_and_query.starts_with("/cursor/records")).cloned().collect();
    assert!(after[0].path_and_query.ends_with(&format!("cursor={cursor}")), "{cursor}: {:?}", after[0]);
    assert!(after.len() < pages, "{} pages read after the crash of {pages}", after.len());
    let read = next["counts"]["inbound"]["read"].as_u64().unwrap();
    assert!(read < (records + platform_only) as u64, "{read} records read again: {next}");
    assert_eq!(
        next["counts"]["outbound"]["created"].as_u64().unwrap() + next["counts"]["outbound"]["updated"].as_u64().unwrap(),
        0,
        "{next}"
    );

    // Every record once, with its content: each write takes the next change number of the shard
    // type, so as many changes as records means nothing was written twice.
    let mut live = std::collections::BTreeMap::new();
    let mut cursor = None;
    let mut changes = 0;
    loop {
        let page = shards().changes(&tenant, "records", cursor.clone(), 1000).await.unwrap();
        if page.items.is_empty() {
            break;
        }
        for item in page.items {
            changes += 1;
            assert!(!item.deleted, "{}", item.key);
            live.insert(item.key, item.data);
        }
        cursor = Some(page.next_cursor);
    }
    assert_eq!(live.len(), records + platform_only);
    assert_eq!(cursor.as_deref(), Some((records + platform_only).to_string().as_str()), "one write per record");
    assert_eq!(changes, records + platform_only);
    for provider in fake.records() {
        let id = provider["id"].as_str().unwrap();
        assert_eq!(live[id], json!({"title": provider["name"]}), "{id}");
    }
    for n in 0..platform_only {
        assert_eq!(fake.record(&format!("p{n:04}")).expect("written to the provider")["name"], format!("platform {n}"));
    }
    assert_eq!(fake.writes(), platform_only, "each platform record was written to the provider once");
}
