//! Webhook fan-out benchmark: E events x M endpoints delivered by the service (release binary,
//! embedded store) to a local receiver, measured as deliveries/s and commit-to-receipt latency
//! (the event's `time` is set when its change commits). In the same run, a bare loop signs and
//! POSTs the same number of bodies with reqwest to the same receiver at the same concurrency.
//!
//! Usage: bench-webhooks SERVICE_BINARY [EVENTS] [ENDPOINTS] [EVENTS_BACKEND]

#![allow(clippy::print_stdout)] // a report on stdout is what this tool is for

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use im_domain::webhooks::signature::SigningSecret;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Default)]
struct Receipts {
    latencies_ms: Vec<f64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn start_receiver(receipts: Arc<Mutex<Receipts>>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = HttpServer::new(move || {
        let receipts = receipts.clone();
        App::new().default_service(web::to(move |body: web::Bytes| {
            let receipts = receipts.clone();
            async move {
                let now = OffsetDateTime::now_utc();
                let sent: Option<OffsetDateTime> = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["time"].as_str().and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()));
                let mut r = receipts.lock().unwrap();
                if let Some(sent) = sent {
                    r.latencies_ms.push((now - sent).as_seconds_f64() * 1000.0);
                }
                let at = Instant::now();
                r.first.get_or_insert(at);
                r.last = Some(at);
                HttpResponse::NoContent().finish()
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .expect("listen")
    .run();
    tokio::spawn(server);
    port
}

fn report(name: &str, count: usize, receipts: &Receipts, elapsed: Duration) -> f64 {
    let mut sorted = receipts.latencies_ms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("{name:<28} {rate:>12.0} {:>10.2} {:>10.2}", percentile(&sorted, 0.5), percentile(&sorted, 0.99));
    rate
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = args.get(1).expect("usage: bench-webhooks SERVICE_BINARY [EVENTS] [ENDPOINTS] [EVENTS_BACKEND]").clone();
    let events: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(2000);
    let endpoints: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1);
    let backend = args.get(4).cloned().unwrap_or_else(|| "embedded".into());
    let concurrency = 64;

    // --- the service --------------------------------------------------------------------------
    let receipts = Arc::new(Mutex::new(Receipts::default()));
    let receiver_port = start_receiver(receipts.clone()).await;
    let data = std::env::temp_dir().join(format!("im-bench-webhooks-{}", uuid::Uuid::new_v4().simple()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env = [
        ("IM_STORAGE__DATA_DIR", data.display().to_string()),
        ("IM_SERVER__PORT", port.to_string()),
        ("IM_LOG__LEVEL", "warn".into()),
        ("IM_EVENTS__BACKEND", backend.clone()),
        ("IM_RABBITMQ__EXCHANGE", format!("im-bench-{}", uuid::Uuid::new_v4().simple())),
        ("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[\"127.0.0.0/8\"]".into()),
        ("IM_WEBHOOKS__ALLOW_HTTP", "true".into()),
    ];
    let mut child =
        Command::new(&binary).arg("serve").envs(env.clone()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("service");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = String::from_utf8(
        Command::new(&binary)
            .args(["token", "--tenant", "bench", "--user", "bench", "--roles", "member"])
            .envs(env)
            .output()
            .expect("token")
            .stdout,
    )
    .expect("utf-8")
    .trim()
    .to_owned();
    for i in 0..endpoints {
        let hook = serde_json::json!({"url": format!("http://127.0.0.1:{receiver_port}/hook/{i}")});
        let response = client.post(format!("{base}/api/v1/webhooks")).bearer_auth(&token).json(&hook).send().await.expect("register");
        assert!(response.status().is_success(), "register: {}", response.status());
    }
    let expected = events * endpoints;
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..concurrency {
        let (client, base, token, next) = (client.clone(), base.clone(), token.clone(), next.clone());
        writers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < events {
                let body = serde_json::json!({"providerId": "github", "name": "bench", "config": {"organization": "acme"}});
                let response =
                    client.post(format!("{base}/api/v1/integrations")).bearer_auth(&token).json(&body).send().await.expect("create");
                assert_eq!(response.status(), 201);
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while receipts.lock().unwrap().latencies_ms.len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let service = std::mem::take(&mut *receipts.lock().unwrap());
    let service_elapsed = service.last.map_or(started.elapsed(), |l| l - started);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data);

    // --- the bare loop: sign and POST the same bodies at the same concurrency ------------------
    let secret = SigningSecret::from_bytes(vec![7; 32]).unwrap();
    let body = serde_json::to_vec(
        &serde_json::json!({"specversion": "1.0", "id": "x", "type": "integration.created", "time": "", "data": {"name": "bench"}}),
    )
    .unwrap();
    let bare_started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..concurrency {
        let (client, next, secret, receipts) = (client.clone(), next.clone(), secret.clone(), receipts.clone());
        let mut body = body.clone();
        senders.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < expected {
                let id = uuid::Uuid::new_v4().to_string();
                let now = OffsetDateTime::now_utc();
                let mut doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
                doc["time"] = now.format(&Rfc3339).unwrap().into();
                body = serde_json::to_vec(&doc).unwrap();
                let ts = now.unix_timestamp();
                let signature = secret.sign(&id, ts, &body);
                let response = client
                    .post(format!("http://127.0.0.1:{receiver_port}/bare"))
                    .header("content-type", "application/json")
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", signature)
                    .body(body.clone())
                    .send()
                    .await
                    .expect("post");
                assert!(response.status().is_success());
            }
            drop(receipts);
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    let bare = std::mem::take(&mut *receipts.lock().unwrap());
    let bare_elapsed = bare_started.elapsed();

    println!("\n{:<28} {:>12} {:>10} {:>10}", "webhooks", "deliveries/s", "p50 ms", "p99 ms");
    let service_rate = report(&format!("service ({backend}, {endpoints} ep)"), service.latencies_ms.len(), &service, service_elapsed);
    let bare_rate = report("bare sign+POST loop", bare.latencies_ms.len(), &bare, bare_elapsed);
    println!(
        "{events} events x {endpoints} endpoint(s) = {expected} deliveries ({} received); concurrency {concurrency}; ratio {:.2}x; latency = event commit to receipt",
        service.latencies_ms.len(),
        service_rate / bare_rate
    );
}
