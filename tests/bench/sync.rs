//! Sync benchmark: inbound records/s of the sync engine (provider pages through the provider
//! client, field mapping, per-record state with hash, writes to the embedded Shard Manager,
//! a checkpoint per page) beside a bare page-and-upsert loop over the same fake provider, the
//! same client and the same Shard Manager in the same run. Memory is the process's peak RSS:
//! bounded by the page size, not by the number of records.
//!
//! Usage: bench-sync [RECORDS] [PAGE_SIZE]
//! Prints: `sync-inbound <ours rec/s> <baseline rec/s> <ratio> <peak RSS KB>`, then
//! `sync-memory <KB> ...`: how much the process's anonymous memory grew during the engine's run
//! (the fake provider keeps every record in this process and SQLite maps the database file, so
//! the peak RSS grows with the record count; this figure stays with the page size).

#![allow(clippy::print_stdout)] // a report on stdout is what this tool is for

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use im_domain::custom::{EntityDefinition, HttpMethod, Pagination, RequestTemplate};
use im_domain::provider_client::{ApiTarget, NoCredentials, PageToken, ProviderClient, ProviderRequest};
use im_domain::services::{EngineSettings, RunControl, SyncEngine, SyncSource};
use im_domain::sync::ports::ShardWrite;
use im_domain::sync::task::{FieldMappingDraft, ScheduleDraft};
use im_domain::sync::{
    ConflictPolicy, DeletePolicy, Direction, ExecutionStatus, SyncExecution, SyncMode, SyncTask, SyncTaskDraft, SyncTaskId, TaskStatus,
    Trigger,
};
use im_domain::webhooks::endpoint::{Cidr, UrlPolicy};
use im_domain::{DomainError, IntegrationId, SystemClock, TenantId, UserId, UuidV7};
use im_testkit::fake_provider::{FakeAuth, FakeProvider};
use im_webhook_sender::provider::{HttpProviderClient, ProviderClientSettings};

/// Keeps the checkpoints as the scheduler would (in memory here: the task store is not measured).
struct Checkpoints(usize);

#[async_trait]
impl RunControl for Checkpoints {
    async fn page_done(&mut self, _: &SyncExecution) -> Result<bool, DomainError> {
        self.0 += 1;
        Ok(false)
    }
}

fn template(path: &str) -> RequestTemplate {
    RequestTemplate { method: HttpMethod::Get, path: path.into(), query: BTreeMap::new(), items_path: Some("data".into()) }
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The process's anonymous resident memory (heap and stacks; not the database file SQLite maps).
fn rss_anon_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("RssAnon:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn task(page_target: &str) -> SyncTask {
    let draft = SyncTaskDraft {
        integration_id: IntegrationId(uuid::Uuid::now_v7()),
        connection_id: uuid::Uuid::now_v7(),
        entity: "record".into(),
        target: page_target.into(),
        direction: Direction::Inbound,
        mode: SyncMode::Incremental,
        schedule: ScheduleDraft::Manual,
        field_mapping: vec![
            FieldMappingDraft { provider: "/name".into(), platform: "/title".into(), direction: None },
            FieldMappingDraft { provider: "/version".into(), platform: "/revision".into(), direction: None },
        ],
        conflict_policy: ConflictPolicy::ProviderWins,
        deletes: DeletePolicy::Ignore,
        status: TaskStatus::Active,
    };
    let settings = draft.validate().expect("a valid task");
    SyncTask::new(
        SyncTaskId(uuid::Uuid::now_v7()),
        TenantId::new("bench").expect("tenant"),
        settings,
        UserId::new("bench").expect("user"),
        time::OffsetDateTime::now_utc(),
    )
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let records: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let page_size: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);

    let fake = FakeProvider::start(records, FakeAuth::None).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = im_store_embedded::EmbeddedStore::open(dir.path(), Arc::new(SystemClock)).expect("store");
    store.migrate().await.expect("migrate");
    let shards = store.shards();
    let policy = UrlPolicy { allow_http: true, allowed_private: vec![Cidr::parse("127.0.0.0/8").expect("cidr")] };
    let client: Arc<dyn ProviderClient> = Arc::new(
        HttpProviderClient::new(
            ProviderClientSettings { requests_per_second: 10_000.0, burst: 10_000, ..ProviderClientSettings::default() },
            policy,
        )
        .expect("client"),
    );
    let source = SyncSource {
        target: ApiTarget {
            base_url: fake.base_url(),
            default_headers: BTreeMap::new(),
            pagination: Pagination::Cursor {
                cursor_param: "cursor".into(),
                next_cursor_path: "meta.next".into(),
                limit_param: Some("limit".into()),
                page_size: None,
            },
        },
        entity: EntityDefinition {
            name: "record".into(),
            id_field: "id".into(),
            updated_at_field: Some("updated_at".into()),
            updated_since_param: Some("updated_since".into()),
            list: template("/cursor/records"),
            get: None,
            upsert: None,
            delete: None,
            deleted: None,
        },
        path_params: BTreeMap::new(),
    };

    // Baseline: page through the provider and upsert each record's mapped fields.
    let tenant = TenantId::new("bench").expect("tenant");
    let started = Instant::now();
    let request =
        ProviderRequest { template: source.entity.list.clone(), path_params: BTreeMap::new(), extra_query: BTreeMap::new(), body: None };
    let mut token: Option<PageToken> = None;
    let mut written = 0usize;
    loop {
        let page =
            client.list_page("bench", &source.target, &request, token.as_ref(), Some(page_size), &NoCredentials).await.expect("page");
        for record in page.records {
            let key = record["id"].as_str().expect("id").to_owned();
            let write = ShardWrite {
                data: serde_json::json!({"title": record["name"], "revision": record["version"]}),
                version: record["updated_at"].as_str().map(str::to_owned),
                updated_at: time::OffsetDateTime::now_utc(),
                source: "bench".into(),
            };
            shards.put(&tenant, "baseline", &key, &write, None).await.expect("put");
            written += 1;
        }
        token = page.next;
        if token.is_none() {
            break;
        }
    }
    let baseline = written as f64 / started.elapsed().as_secs_f64();
    assert_eq!(written, records, "the baseline wrote every record");

    // Ours: the engine over the same fakes.
    let engine = SyncEngine::new(
        client.clone(),
        shards.clone(),
        store.sync_states(),
        Arc::new(SystemClock),
        Arc::new(UuidV7),
        EngineSettings { page_size, lookback: std::time::Duration::from_secs(300), heartbeat: std::time::Duration::from_secs(20) },
    );
    let task = task("ours");
    let mut execution = SyncExecution::queued(
        uuid::Uuid::now_v7(),
        task.tenant_id.clone(),
        task.id,
        Trigger::Manual,
        task.checkpoints.clone(),
        time::OffsetDateTime::now_utc(),
    );
    // The engine's memory: the most anonymous memory above what the process held when the run
    // started (the fake's records, the baseline's leftovers), sampled every 5 ms.
    let anon_at_start = rss_anon_kb();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_anon_kb());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak.max(rss_anon_kb())
        })
    };
    let started = Instant::now();
    let (status, error) = engine.run(&task, &source, &NoCredentials, &mut execution, &mut Checkpoints(0)).await;
    let ours = execution.counts.inbound.created as f64 / started.elapsed().as_secs_f64();
    assert_eq!(status, ExecutionStatus::Succeeded, "{error:?}");
    assert_eq!(execution.counts.inbound.created as usize, records, "the engine wrote every record");

    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let engine_growth = sampler.join().expect("sampler").saturating_sub(anon_at_start);
    println!("sync-inbound {ours:.0} {baseline:.0} {:.2} {}", ours / baseline, peak_rss_kb());
    println!("sync-memory {engine_growth} KB of anonymous memory grown during the engine's run ({records} records, pages of {page_size})");
}
