//! Webhook delivery benchmark, end to end: integrations are created through the API (release
//! binary); each create commits an `integration.created` event that the service fans out to
//! every registered endpoint and delivers, signed, to a local receiver. Two phases on one
//! service:
//!
//! 1. saturation: EVENTS creates from 64 concurrent writers; the rate is deliveries received
//!    per second from the first create to the last receipt (for 1 endpoint, messages/s);
//! 2. paced: once the service is at rest again (its outbox empty: with RabbitMQ, the saturation
//!    phase's `webhook.delivered` events published), creates at half the saturation rate of events for
//!    `BENCH_PACED_SECS` (default 3 s), an open loop (each create starts on its own schedule);
//!    `BENCH_LATENCY_LOG=FILE` writes there each of its receipts' commit time (ms since the
//!    phase's first commit, whose Unix time heads the file) and latency, in commit order.
//!
//! `BENCH_PACED_RATE=N` paces at N events/s instead (to compare two builds at one rate).
//! `BENCH_SERVICE_LOG=FILE` keeps the service's log there, written at `BENCH_SERVICE_LOG_LEVEL`
//! (a `log.level` filter, `warn` by default; `RUST_LOG`, when set, replaces it in the service).
//!
//! Latency is commit to receipt: the event's `time` (set when its change is written) to the
//! receiver's clock. The receiver counts each (endpoint, `webhook-id`) it got against what was
//! committed (creates answered 201 x endpoints): lost deliveries fail the run.
//!
//! Usage: bench-webhooks SERVICE_BINARY [EVENTS] [ENDPOINTS] [EVENTS_BACKEND]
//! Prints a table, then one `ROW name ours baseline ratio p50 p99 rss_mb` line per phase (the
//! baseline is the open-source Svix server's figure on this machine class, quoted by the
//! performance issue: 1,130 messages/s for 1 endpoint, 3,400 deliveries/s for 10).

#![allow(clippy::print_stdout, clippy::print_stderr)] // a report on stdout is what this tool is for

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Svix (Postgres 15, memory queue) on this machine class, from the performance issue.
const SVIX_ONE_ENDPOINT: f64 = 1_130.0;
const SVIX_TEN_ENDPOINTS: f64 = 3_400.0;
/// Concurrent writers of the saturation phase.
const WRITERS: usize = 64;

#[derive(Default)]
struct Receipts {
    latencies_ms: Vec<f64>,
    /// (commit time in seconds since the epoch, latency in ms) of each receipt, for
    /// `BENCH_LATENCY_LOG`.
    timeline: Vec<(f64, f64)>,
    /// (endpoint path, webhook-id) of every request received.
    seen: HashSet<(String, String)>,
    received: usize,
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
        App::new().default_service(web::to(move |request: HttpRequest, body: web::Bytes| {
            let receipts = receipts.clone();
            async move {
                let now = OffsetDateTime::now_utc();
                let sent: Option<OffsetDateTime> = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["time"].as_str().and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()));
                let id = request.headers().get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let mut r = receipts.lock().unwrap();
                if let Some(sent) = sent {
                    let latency = (now - sent).as_seconds_f64() * 1000.0;
                    r.latencies_ms.push(latency);
                    r.timeline.push(((sent - OffsetDateTime::UNIX_EPOCH).as_seconds_f64(), latency));
                }
                r.received += 1;
                r.seen.insert((request.path().to_owned(), id));
                r.last = Some(Instant::now());
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

/// Writes the paced phase's receipts, in commit order, as `ms_since_first_commit latency_ms`
/// lines: where in the phase the slow ones fall (a stall shows as a run of them). A first line,
/// `# first commit at SECONDS`, gives that commit's time since the Unix epoch, to set the
/// timeline beside the service's log or a sampler's.
fn write_timeline(path: &str, receipts: &Receipts) {
    let mut timeline = receipts.timeline.clone();
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    let first = timeline.first().map_or(0.0, |t| t.0);
    let header = format!("# first commit at {first:.6}\n");
    let lines: String = std::iter::once(header)
        .chain(timeline.iter().map(|(at, latency)| format!("{:.3} {latency:.3}\n", (at - first) * 1000.0)))
        .collect();
    if let Err(e) = std::fs::write(path, lines) {
        eprintln!("bench-webhooks: cannot write {path}: {e}");
    }
}

/// What one phase measured.
struct Phase {
    committed: usize,
    unique: usize,
    received: usize,
    rate: f64,
    p50: f64,
    p99: f64,
}

fn summarize(receipts: &Receipts, committed: usize, endpoints: usize, elapsed: Duration) -> Phase {
    let mut sorted = receipts.latencies_ms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Phase {
        committed: committed * endpoints,
        unique: receipts.seen.len(),
        received: receipts.received,
        rate: receipts.seen.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&sorted, 0.5),
        p99: percentile(&sorted, 0.99),
    }
}

struct Service {
    child: std::process::Child,
    base: String,
    token: String,
    data: std::path::PathBuf,
    log: std::path::PathBuf,
    /// What names the exchange and queues the service declared on the broker (RabbitMQ mode).
    broker_prefix: Option<String>,
}

impl Service {
    fn fail(&self, what: &str) -> ! {
        self.keep_log();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<_> = log.lines().rev().take(30).collect();
        eprintln!("bench-webhooks: {what}; the service's log ends with:");
        for line in tail.into_iter().rev() {
            eprintln!("  {line}");
        }
        std::process::exit(1);
    }

    /// Copies the service's log to `BENCH_SERVICE_LOG`, when set.
    fn keep_log(&self) {
        if let Ok(path) = std::env::var("BENCH_SERVICE_LOG")
            && let Err(e) = std::fs::copy(&self.log, &path)
        {
            eprintln!("bench-webhooks: cannot copy the service's log to {path}: {e}");
        }
    }
}

async fn start_service(binary: &str, backend: &str, client: &reqwest::Client) -> Service {
    let data = std::env::temp_dir().join(format!("im-bench-webhooks-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data).expect("data dir");
    let log = data.join("server.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let prefix = format!("im-bench-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("IM_STORAGE__DATA_DIR", data.join("store").display().to_string()),
        ("IM_SERVER__PORT", port.to_string()),
        ("IM_LOG__LEVEL", std::env::var("BENCH_SERVICE_LOG_LEVEL").unwrap_or_else(|_| "warn".into())),
        ("IM_EVENTS__BACKEND", backend.to_owned()),
        ("IM_RABBITMQ__EXCHANGE", prefix.clone()),
        ("IM_RABBITMQ__DELIVERY_QUEUE_PREFIX", prefix.clone()),
        ("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[\"127.0.0.0/8\"]".into()),
        ("IM_WEBHOOKS__ALLOW_HTTP", "true".into()),
    ];
    let stderr = std::fs::File::create(&log).expect("log file");
    let child = Command::new(binary).arg("serve").envs(env.clone()).stdout(Stdio::null()).stderr(stderr).spawn().expect("service");
    let broker_prefix = (backend == "rabbitmq").then_some(prefix);
    let mut service = Service { child, base: format!("http://127.0.0.1:{port}"), token: String::new(), data, log, broker_prefix };
    let mut ready = false;
    for _ in 0..600 {
        if client.get(format!("{}/health/ready", service.base)).send().await.is_ok_and(|r| r.status().is_success()) {
            ready = true;
            break;
        }
        if service.child.try_wait().ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !ready {
        service.fail(&format!("the service ({backend}) did not become ready"));
    }
    let token = Command::new(binary)
        .args(["token", "--tenant", "bench", "--user", "bench", "--roles", "member"])
        .envs(env)
        .stderr(Stdio::inherit())
        .output()
        .expect("token");
    service.token = String::from_utf8(token.stdout).expect("utf-8").trim().to_owned();
    service
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time (user and system) a process has used so far, in seconds; 0 when it cannot be read.
fn cpu_secs(pid: &str) -> f64 {
    // Fields 14 and 15 of /proc/PID/stat, counted after the command name's closing parenthesis.
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
    });
    // The kernel reports in clock ticks, 100 a second on Linux.
    ticks.map_or(0.0, |t| t / 100.0)
}

/// Time the host took from this machine's CPUs (the `steal` column of `/proc/stat`'s `cpu`
/// line, all CPUs together), in seconds; 0 when it cannot be read. A virtual machine's vCPU that
/// the host runs something else on is stalled: everything on it waits, ours and the baseline's.
fn stolen_secs() -> f64 {
    let ticks = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        line.split_whitespace().nth(8)?.parse::<f64>().ok()
    });
    ticks.map_or(0.0, |t| t / 100.0)
}

/// The broker's Erlang VM on this machine, if one runs (RabbitMQ mode), by its command name.
fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU used by the service, the broker and this process (load generator and receiver) since
/// `since`, each in percent of one core over the time elapsed: how busy the machine was.
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    service: f64,
    /// `None` when no broker is measured (embedded mode, or none found).
    broker: Option<f64>,
    load: f64,
    /// Taken by the host from the machine's CPUs (`stolen_secs`).
    stolen: f64,
}

impl Cpu {
    fn now(service: u32, broker: Option<&str>) -> Self {
        Cpu {
            at: Instant::now(),
            service: cpu_secs(&service.to_string()),
            broker: broker.map(cpu_secs),
            load: cpu_secs("self"),
            stolen: stolen_secs(),
        }
    }

    /// The service's, the broker's and this process's CPU since `start`, and what the host
    /// took, in % of one core (`-` for a broker not measured).
    fn percent_since(&self, start: &Cpu) -> (String, String, String, String) {
        let secs = (self.at - start.at).as_secs_f64().max(1e-3);
        let pct = |a: f64, b: f64| format!("{:.0}", (a - b) / secs * 100.0);
        let broker = match (self.broker, start.broker) {
            (Some(now), Some(then)) => pct(now, then),
            _ => "-".to_owned(),
        };
        (pct(self.service, start.service), broker, pct(self.load, start.load), pct(self.stolen, start.stolen))
    }

    fn since(&self, start: &Cpu) -> String {
        let secs = (self.at - start.at).as_secs_f64();
        if secs < 0.2 {
            // CPU time is counted in ticks of 10 ms: a share of so short a span means nothing.
            return format!("not measured over {secs:.2} s");
        }
        let (service, broker, load, stolen) = self.percent_since(start);
        let broker = if broker == "-" { "not measured".to_owned() } else { format!("{broker}%") };
        format!(
            "service {service}%, broker {broker}, load generator and receiver {load}% of a core over {secs:.1} s; \
             taken by the host (steal) {stolen}%"
        )
    }
}

/// Creates one integration; true when it was committed (201).
async fn create(client: &reqwest::Client, base: &str, token: &str) -> bool {
    let body = serde_json::json!({"providerId": "github", "name": "bench", "config": {"organization": "acme"}});
    match client.post(format!("{base}/api/v1/integrations")).bearer_auth(token).json(&body).send().await {
        Ok(response) if response.status() == 201 => true,
        Ok(response) => {
            eprintln!("bench-webhooks: a create was answered {}", response.status());
            false
        }
        Err(e) => {
            eprintln!("bench-webhooks: a create failed: {e}");
            false
        }
    }
}

/// Waits until `expected` distinct deliveries arrived (or nothing arrived for 20 s).
async fn drain(receipts: &Mutex<Receipts>, expected: usize) {
    let mut last_count = 0;
    let mut quiet_since = Instant::now();
    loop {
        let count = receipts.lock().unwrap().seen.len();
        if count >= expected {
            return;
        }
        if count != last_count {
            (last_count, quiet_since) = (count, Instant::now());
        } else if quiet_since.elapsed() > Duration::from_secs(20) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the service's outbox is empty (its `/metrics`), at most 60 s.
async fn settle(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let text = match client.get(format!("{base}/metrics")).send().await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let pending = text.lines().find_map(|l| l.strip_prefix("outbox_pending_events ")).and_then(|v| v.trim().parse::<f64>().ok());
        if pending == Some(0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("bench-webhooks: the outbox did not empty within 60 s; pacing anyway");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = args.get(1).expect("usage: bench-webhooks SERVICE_BINARY [EVENTS] [ENDPOINTS] [EVENTS_BACKEND]").clone();
    let events: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(2000);
    let endpoints: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1);
    let backend = args.get(4).cloned().unwrap_or_else(|| "embedded".into());
    let paced_secs: f64 = std::env::var("BENCH_PACED_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);

    let receipts = Arc::new(Mutex::new(Receipts::default()));
    let receiver_port = start_receiver(receipts.clone()).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(WRITERS).build().expect("client");
    let mut service = start_service(&binary, &backend, &client).await;
    let pid = service.child.id();
    for i in 0..endpoints {
        let hook = serde_json::json!({"url": format!("http://127.0.0.1:{receiver_port}/hook/{i}")});
        let response = client
            .post(format!("{}/api/v1/webhooks", service.base))
            .bearer_auth(&service.token)
            .json(&hook)
            .send()
            .await
            .expect("register");
        if !response.status().is_success() {
            service.fail(&format!("registering an endpoint was answered {}", response.status()));
        }
    }
    // Peak RSS of the service, sampled while it runs.
    let peak_kb = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak_kb = peak_kb.clone();
        tokio::spawn(async move {
            loop {
                let kb = (rss_mb(pid) * 1024.0) as u64;
                peak_kb.fetch_max(kb, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let broker = (backend == "rabbitmq").then(broker_pid).flatten();
    // --- 1. saturation ---------------------------------------------------------------------
    let cpu_start = Cpu::now(pid, broker.as_deref());
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let committed = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (client, base, token, next, committed) =
            (client.clone(), service.base.clone(), service.token.clone(), next.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < events {
                if create(&client, &base, &token).await {
                    committed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let intake = started.elapsed();
    let committed = committed.load(Ordering::Relaxed);
    drain(&receipts, committed * endpoints).await;
    let saturated = std::mem::take(&mut *receipts.lock().unwrap());
    let elapsed = saturated.last.map_or(started.elapsed(), |l| l - started);
    let saturation = summarize(&saturated, committed, endpoints, elapsed);
    let cpu_saturated = Cpu::now(pid, broker.as_deref());

    // --- 2. paced at half the saturation rate of events ---------------------------------------
    // Measured at rest, not while the service still publishes the saturation phase's
    // `webhook.delivered` events (RabbitMQ mode): the outbox is empty first.
    settle(&client, &service.base).await;
    let settled = cpu_saturated.at.elapsed();
    let cpu_paced_start = Cpu::now(pid, broker.as_deref());
    let cpu_settling = cpu_paced_start.since(&cpu_saturated);
    // `BENCH_PACED_RATE` (events/s) replaces half the saturation rate: runs of two builds then
    // compare at one rate.
    let fixed_rate = std::env::var("BENCH_PACED_RATE").ok().map(|r| {
        r.parse::<f64>().unwrap_or_else(|_| {
            eprintln!("bench-webhooks: BENCH_PACED_RATE={r} is not a number of events a second");
            std::process::exit(2);
        })
    });
    let paced_rate = fixed_rate.unwrap_or(saturation.rate / endpoints as f64 / 2.0).max(1.0);
    let paced_events = (paced_rate * paced_secs).round().max(1.0) as usize;
    let interval = Duration::from_secs_f64(1.0 / paced_rate);
    let paced_committed = Arc::new(AtomicUsize::new(0));
    let paced_started = Instant::now();
    let mut creates = Vec::with_capacity(paced_events);
    for i in 0..paced_events {
        tokio::time::sleep_until((paced_started + interval.mul_f64(i as f64)).into()).await;
        let (client, base, token, committed) = (client.clone(), service.base.clone(), service.token.clone(), paced_committed.clone());
        creates.push(tokio::spawn(async move {
            if create(&client, &base, &token).await {
                committed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for c in creates {
        c.await.expect("create");
    }
    let paced_committed = paced_committed.load(Ordering::Relaxed);
    drain(&receipts, paced_committed * endpoints).await;
    let paced_receipts = std::mem::take(&mut *receipts.lock().unwrap());
    let paced = summarize(&paced_receipts, paced_committed, endpoints, paced_started.elapsed());
    let cpu_paced = Cpu::now(pid, broker.as_deref());
    if let Ok(path) = std::env::var("BENCH_LATENCY_LOG") {
        write_timeline(&path, &paced_receipts);
    }
    sampler.abort();
    let peak = peak_kb.load(Ordering::Relaxed) as f64 / 1024.0;
    let _ = service.child.kill();
    let _ = service.child.wait();

    let baseline = if endpoints == 1 { SVIX_ONE_ENDPOINT } else { SVIX_TEN_ENDPOINTS };
    let unit = if endpoints == 1 { "messages/s" } else { "deliveries/s" };
    let name = format!("webhooks-{endpoints}ep-{backend}");
    println!(
        "\n{:<34} {:>12} {:>10} {:>10} {:>10} {:>8} {:>6}",
        format!("webhooks ({unit})"),
        "rate",
        "p50 ms",
        "p99 ms",
        "committed",
        "lost",
        "dup"
    );
    let mut lost_any = false;
    for (label, phase) in [(format!("{name} saturation"), &saturation), (format!("{name} paced 1/2"), &paced)] {
        let lost = phase.committed.saturating_sub(phase.unique);
        lost_any |= lost > 0;
        println!(
            "{label:<34} {:>12.0} {:>10.2} {:>10.2} {:>10} {:>8} {:>6}",
            phase.rate,
            phase.p50,
            phase.p99,
            phase.committed,
            lost,
            phase.received - phase.unique
        );
    }
    println!(
        "{events} events x {endpoints} endpoint(s), {WRITERS} writers (intake {:.0} events/s); paced: {paced_rate:.0} events/s for {paced_secs} s; \
         peak RSS {peak:.0} MB; latency = event commit to receipt; Svix reference {baseline:.0} {unit}",
        committed as f64 / intake.as_secs_f64()
    );
    println!("CPU saturation: {}", cpu_saturated.since(&cpu_start));
    println!("CPU paced: {}", cpu_paced.since(&cpu_paced_start));
    let (service_cpu, broker_cpu, load_cpu, stolen) = cpu_paced.percent_since(&cpu_paced_start);
    println!("CPU_PACED {name} {service_cpu} {broker_cpu} {load_cpu} {stolen}");
    println!(
        "settling after saturation (the outbox emptied: outcome events published): {:.2} s; CPU then: {cpu_settling}",
        settled.as_secs_f64()
    );
    println!(
        "ROW {name} {:.0} {baseline:.0} {:.2} {:.2} {:.2} {peak:.0}",
        saturation.rate,
        saturation.rate / baseline,
        saturation.p50,
        saturation.p99
    );
    println!("ROW {name}-paced {:.0} - - {:.2} {:.2} {peak:.0}", paced.rate, paced.p50, paced.p99);
    if lost_any {
        service.fail("deliveries were lost (committed events that never reached the receiver)");
    }
    service.keep_log();
    let _ = std::fs::remove_dir_all(&service.data);
    if let Some(prefix) = &service.broker_prefix {
        remove_broker_objects(prefix).await;
    }
}

/// Deletes the work queue and the exchange the service declared for this run (the default
/// broker of the service's configuration), so that runs leave nothing on the broker.
async fn remove_broker_objects(prefix: &str) {
    let url = im_testkit::services::amqp_url(im_testkit::services::rabbitmq_addr());
    if im_testkit::rabbit::delete_declared(&url, Some(prefix), Some(prefix)).await.is_err() {
        eprintln!("bench-webhooks: cannot reach the broker to delete {prefix}.work");
    }
}
