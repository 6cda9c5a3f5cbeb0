//! Wiring: picks the adapters the configuration names, builds the services and the HTTP
//! server in named steps (store, events, webhooks, HTTP), and runs them until one
//! cancellation token says stop. `build_app` serves both the real server and in-process tests.
//!
//! Lifecycle: SIGTERM or ctrl-c cancels the token ([`Shutdown`]); the HTTP server then stops
//! accepting and lets in-flight requests finish, while the background workers (outbox relay,
//! delivery dispatcher, TTL sweeper) finish the round they are in and stop: a delivery attempt
//! in flight completes and is recorded; nothing is aborted mid-write. Both get
//! `server.shutdown_timeout`; an attempt still running after it keeps its lease, so the next
//! start (embedded queue) or another consumer (RabbitMQ) runs it again.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use base64::Engine as _;
use im_auth::{JwksAuthenticator, LocalJwt};
use im_bus_rabbitmq::RabbitConnection;
use im_bus_rabbitmq::RabbitDeliveryQueue;
use im_bus_rabbitmq::RabbitPublisher;
use im_domain::audit::Audit;
use im_domain::auth::Authenticator;
use im_domain::connection::ConnectionRepository;
use im_domain::ports::{EventPublisher, HealthCheck, IntegrationRepository, Outbox, ProviderRepository};
use im_domain::provider_client::ProviderClient;
use im_domain::secrets::SecretStore;
use im_domain::services::{
    AuditShipper, CatalogService, ConnectionService, ConnectionTests, DeliveryService, DeliverySettings, EngineSettings, EventRelay,
    InProcessBus, IntegrationService, OutboxAdmin, SyncEngine, SyncScheduler, SyncTaskService, WebhookService,
};
use im_domain::sync::ports::ShardManager;
use im_domain::webhooks::ports::{DeliveryQueue, DeliveryRepository, OsEntropy, WebhookRepository};
use im_domain::{Clock, SystemClock, UuidV7};
use im_store_cosmos::CosmosStore;
use im_store_embedded::{EmbeddedStore, OutboxHandoff};
use im_webhook_sender::HttpWebhookSender;
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::audit::{AuditBacklogHealth, BufferedAudit, TracingAudit};
use crate::config::{AuthMode, EventSettings, EventsBackend, PlatformBackend, SecretsBackend, Settings, StorageBackend};
use crate::deliveries::{BrokerAndLocal, FanOut, FirstAttemptsHere, spawn_dispatcher, spawn_hold_sweeper};
use crate::events::{OutboxHealth, WakeOnEvents};
use crate::state::AppState;

/// What one instance does, so the API and the background work scale on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeRole {
    /// The HTTP API only; no background work.
    Api,
    /// The outbox relay, the delivery dispatcher, the sync worker and the TTL sweeper; the port serves only
    /// the health endpoints.
    Worker,
    /// Both (one process does everything: the default).
    All,
}

impl ServeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ServeRole::Api => "api",
            ServeRole::Worker => "worker",
            ServeRole::All => "all",
        }
    }

    pub fn serves_api(self) -> bool {
        self != ServeRole::Worker
    }

    pub fn runs_workers(self) -> bool {
        self != ServeRole::Api
    }
}

/// The actix application: routes, body limits, request ids, problem+json for unknown routes.
pub fn build_app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<ServiceRequest, Config = (), Response = ServiceResponse<impl MessageBody>, Error = actix_web::Error, InitError = ()>,
> {
    let role = state.role;
    App::new()
        .app_data(state)
        .configure(|cfg| if role.serves_api() { api::routes(cfg) } else { api::operation_routes(cfg) })
        .default_service(web::to(api::not_found))
        .wrap(from_fn(api::request_id::middleware))
}

/// The key of OAuth2 authorization states, from configuration or the key file.
///
/// # Errors
/// When the key cannot be read or created.
fn oauth2_state_key(settings: &Settings) -> anyhow::Result<im_domain::oauth2::StateKey> {
    let configured = settings.oauth2.state_key.expose_secret();
    let key = if configured.is_empty() {
        crate::keys::load_or_create_key(&settings.oauth2_key_file(), im_domain::oauth2::MIN_STATE_KEY_BYTES)?
    } else {
        base64::engine::general_purpose::STANDARD.decode(configured.trim()).context("oauth2.state_key is not base64")?
    };
    im_domain::oauth2::StateKey::new(key).map_err(|e| anyhow::anyhow!("oauth2.state_key: {e}"))
}

fn oauth2_settings(settings: &Settings) -> im_domain::services::OAuth2Settings {
    let oauth2 = &settings.oauth2;
    im_domain::services::OAuth2Settings {
        redirect_url: oauth2.redirect_url.clone(),
        refresh_skew: oauth2.refresh_skew.get(),
        refresh_lease: oauth2.refresh_lease.get(),
        state_ttl: oauth2.state_ttl.get(),
        allow_http_return_url: oauth2.allow_http_return_url,
        ..Default::default()
    }
}

/// The local token signer/verifier, with the key from configuration or the key file.
///
/// # Errors
/// When the key cannot be read or created.
pub fn local_jwt(settings: &Settings) -> anyhow::Result<LocalJwt> {
    let auth = &settings.auth;
    match auth.mode {
        AuthMode::Local => {
            let configured = auth.hs256_key.expose_secret();
            let key = if configured.is_empty() {
                crate::keys::load_or_create_key(&settings.auth_key_file(), im_auth::MIN_KEY_BYTES)?
            } else {
                base64::engine::general_purpose::STANDARD.decode(configured).context("auth.hs256_key is not base64")?
            };
            LocalJwt::new(&key, auth.issuer(), auth.audience(), auth.leeway.get().as_secs())
        }
        AuthMode::Jwks => anyhow::bail!("local tokens need auth.mode = \"local\"; with \"jwks\" User Management issues them"),
    }
}

/// The configured verifier of callers' tokens. With `jwks`, the key set is fetched once now;
/// a failure is logged and the first request fetches again.
///
/// # Errors
/// When the local key cannot be had or the HTTP client cannot be built.
pub async fn authenticator(settings: &Settings) -> anyhow::Result<Arc<dyn Authenticator>> {
    match settings.auth.mode {
        AuthMode::Local => Ok(Arc::new(local_jwt(settings)?)),
        AuthMode::Jwks => {
            let jwks = JwksAuthenticator::new(settings.auth.jwks())?;
            match jwks.refresh().await {
                Ok(keys) => tracing::info!(keys, "User Management key set fetched"),
                Err(error) => tracing::warn!(%error, "User Management key set not fetched yet"),
            }
            Ok(Arc::new(jwks))
        }
    }
}

/// The configured secret store: local and encrypted, or the Secret Management service.
///
/// # Errors
/// When the local key cannot be had or the HTTP client cannot be built.
pub fn secret_store(settings: &Settings, health: &mut Vec<Arc<dyn HealthCheck>>) -> anyhow::Result<Arc<dyn SecretStore>> {
    match settings.secrets.backend {
        SecretsBackend::Local => {
            let key = match settings.secrets.local.configured_key()? {
                Some(key) => key,
                None => {
                    let bytes = crate::keys::load_or_create_key(&settings.secrets_key_file(), im_secrets_local::KEY_BYTES)?;
                    <[u8; im_secrets_local::KEY_BYTES]>::try_from(bytes.as_slice())
                        .map_err(|_| anyhow::anyhow!("the secrets key file must hold 32 bytes"))?
                }
            };
            let store = Arc::new(im_secrets_local::LocalSecretStore::open(&settings.storage.data_dir, &key)?);
            Ok(Arc::new(crate::metrics::TimedSecrets(store)))
        }
        SecretsBackend::Http => {
            let store = Arc::new(
                im_secrets_http::HttpSecretStore::new(settings.secrets.http.clone())
                    .map_err(|e| anyhow::anyhow!("secret management client: {e}"))?,
            );
            health.push(store.clone());
            Ok(Arc::new(crate::metrics::TimedSecrets(store)))
        }
    }
}

/// The configured Shard Manager: the embedded one on the data directory's database (whatever the
/// store), or the platform's service over HTTP (then in readiness).
///
/// # Errors
/// When the embedded database cannot be opened or the HTTP client cannot be built.
pub async fn shard_manager(
    settings: &Settings,
    storage: &Storage,
    health: &mut Vec<Arc<dyn HealthCheck>>,
) -> anyhow::Result<Arc<dyn ShardManager>> {
    match settings.shard_manager.backend {
        PlatformBackend::Embedded => Ok(embedded_store(settings, storage).await?.shards()),
        PlatformBackend::Http => {
            let client = Arc::new(
                im_shard_http::HttpShardManager::new(settings.shard_manager.http.clone())
                    .map_err(|e| anyhow::anyhow!("shard manager client: {e}"))?,
            );
            health.push(client.clone());
            Ok(client)
        }
    }
}

/// The configured audit log: the `audit` log target, or the store's buffer for the Logging
/// Service, whose backlog is in readiness; with the buffer, the shipper the worker roles run.
///
/// # Errors
/// When the HTTP client cannot be built.
fn audit_log(
    settings: &Settings,
    storage: &Storage,
    role: ServeRole,
    health: &mut Vec<Arc<dyn HealthCheck>>,
) -> anyhow::Result<(Arc<dyn im_domain::audit::AuditLog>, Option<AuditShipper>)> {
    let logging = &settings.logging;
    match logging.backend {
        PlatformBackend::Embedded => Ok((Arc::new(TracingAudit), None)),
        PlatformBackend::Http => {
            health.push(Arc::new(AuditBacklogHealth {
                buffer: storage.audit_buffer.clone(),
                max_age: logging.shipper.max_backlog_age.get(),
            }));
            let shipper = if role.runs_workers() {
                let sink = Arc::new(
                    im_logging_http::HttpAuditSink::new(logging.http.clone())
                        .map_err(|e| anyhow::anyhow!("logging service client: {e}"))?,
                );
                health.push(sink.clone());
                Some(AuditShipper::new(storage.audit_buffer.clone(), sink))
            } else {
                None
            };
            Ok((Arc::new(BufferedAudit { buffer: storage.audit_buffer.clone() }), shipper))
        }
    }
}

/// The configured store, as the ports the services need.
pub struct Storage {
    pub integrations: Arc<dyn IntegrationRepository>,
    pub connections: Arc<dyn ConnectionRepository>,
    pub webhooks: Arc<dyn WebhookRepository>,
    pub deliveries: Arc<dyn DeliveryRepository>,
    pub providers: Arc<dyn ProviderRepository>,
    pub sync_tasks: Arc<dyn im_domain::sync::ports::SyncTaskRepository>,
    pub sync_executions: Arc<dyn im_domain::sync::ports::SyncExecutionRepository>,
    pub sync_states: Arc<dyn im_domain::sync::ports::SyncStateRepository>,
    pub outbox: Arc<dyn Outbox>,
    pub audit_buffer: Arc<dyn im_domain::audit::AuditBuffer>,
    pub idempotency: Arc<dyn im_domain::idempotency::IdempotencyRepository>,
    pub health: Arc<dyn HealthCheck>,
    /// The embedded store, whose expired documents a sweeper deletes (Cosmos expires its own).
    pub embedded: Option<EmbeddedStore>,
    /// What `migrate` did or found, for people.
    pub report: Vec<String>,
}

/// Every repository of one store (both stores have the same constructors).
macro_rules! repositories_of {
    ($store:expr, $health:expr, $embedded:expr, $report:expr) => {
        Storage {
            integrations: $store.integrations(),
            connections: $store.connections(),
            webhooks: $store.webhooks(),
            deliveries: $store.deliveries(),
            providers: $store.providers(),
            sync_tasks: $store.sync_tasks(),
            sync_executions: $store.sync_executions(),
            sync_states: $store.sync_states(),
            outbox: $store.outbox(),
            audit_buffer: $store.audit_buffer(),
            idempotency: $store.idempotency(),
            health: $health,
            embedded: $embedded,
            report: $report,
        }
    };
}

/// How the embedded database runs, from `storage`.
fn embedded_options(settings: &Settings) -> im_store_embedded::DbOptions {
    im_store_embedded::DbOptions::default().with_wal_restart_mib(settings.storage.wal_restart_mb)
}

/// Opens the configured store: the embedded one is migrated; Cosmos DB is provisioned when
/// `provision` (the `migrate` command, or `cosmos_db.auto_provision`), then checked.
///
/// # Errors
/// When the store cannot be opened, migrated, provisioned, or misses a container.
pub async fn open_storage(settings: &Settings, clock: Arc<dyn Clock>, provision: bool) -> anyhow::Result<Storage> {
    match settings.storage.backend {
        StorageBackend::Embedded => {
            let store = EmbeddedStore::open_with(&settings.storage.data_dir, clock, embedded_options(settings))?;
            let migrated = store.migrate().await.context("migrating the embedded store")?;
            if !migrated.applied.is_empty() {
                tracing::info!(applied = ?migrated.applied, version = migrated.version, "store migrated");
            }
            let mut report = vec![format!("embedded store {} at schema version {}", store.path().display(), migrated.version)];
            report.extend(migrated.applied.iter().map(|m| format!("applied migration {m}")));
            Ok(repositories_of!(store, Arc::new(store.clone()), Some(store), report))
        }
        StorageBackend::Cosmos => {
            let cosmos = &settings.cosmos_db;
            let mut report = Vec::new();
            if provision || cosmos.auto_provision {
                let provisioned = im_store_cosmos::provision(cosmos).await.context("provisioning Cosmos DB")?;
                report.extend(provisioned.created.iter().map(|c| format!("created {c}")));
                report.extend(provisioned.existing.iter().map(|c| format!("exists {c}")));
                tracing::info!(created = ?provisioned.created, existing = provisioned.existing.len(), "cosmos db provisioned");
            }
            let store = CosmosStore::connect(cosmos.clone()).await?;
            Ok(repositories_of!(store, Arc::new(store), None, report))
        }
    }
}

/// The sync worker of this instance: its scheduler (an owner id of its own), the engine and
/// where credentials and sources come from.
async fn sync_worker(
    settings: &Settings,
    storage: &Storage,
    connections: ConnectionService,
    client: Arc<dyn ProviderClient>,
    shards: Arc<dyn ShardManager>,
) -> anyhow::Result<crate::sync::SyncWorker> {
    let sync = &settings.sync;
    let owner = format!("instance-{}", uuid::Uuid::now_v7().simple());
    let scheduler = SyncScheduler::new(
        storage.sync_tasks.clone(),
        storage.sync_executions.clone(),
        Arc::new(SystemClock),
        Arc::new(UuidV7),
        owner,
        sync.lease.get(),
    )
    .with_failure_limit(sync.failure_limit);
    let engine = SyncEngine::new(
        client,
        shards,
        storage.sync_states.clone(),
        Arc::new(SystemClock),
        Arc::new(UuidV7),
        // A heartbeat at least four times per lease.
        EngineSettings { page_size: sync.page_size, lookback: sync.lookback.get(), heartbeat: sync.lease.get() / 4 },
    );
    Ok(crate::sync::SyncWorker {
        scheduler,
        engine,
        connections,
        integrations: storage.integrations.clone(),
        providers: storage.providers.clone(),
        concurrency: sync.concurrency,
        poll: sync.poll_interval.get(),
    })
}

/// Stops a running [`Application`]: the same token SIGTERM and ctrl-c cancel.
#[derive(Debug, Clone)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// Asks the application to stop: HTTP requests and background work in flight finish first.
    pub fn trigger(&self) {
        self.0.cancel();
    }
}

/// The background workers and the token that stops them; attempts in flight are tracked too.
struct Workers {
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Events the embedded store may have handed to the relay and not yet seen published, for
/// each event of a relay round (`events.relay_batch_size`).
const HANDOFF_ROUNDS_AHEAD: usize = 8;

/// How long the stop waits for the writer to take its barrier while its queue is full.
const HANDOFF_STOP_PATIENCE: Duration = Duration::from_secs(5);

/// The embedded store hands the events of this instance's writes to a lane of `relay` of its
/// own, claimed for it at commit ([`crate::events::spawn_handoff`]).
fn spawn_handoff(settings: &EventSettings, store: &EmbeddedStore, relay: &EventRelay, wake: &Arc<tokio::sync::Notify>, workers: &Workers) {
    let lane = relay.lane();
    let (sink, handed) = tokio::sync::mpsc::unbounded_channel();
    let capacity = settings.relay_batch_size as usize * HANDOFF_ROUNDS_AHEAD;
    // A send fails only once the lane stopped, after the stop's barrier (`writes_settled`):
    // no group hands anything over then.
    let to_lane: im_store_embedded::HandoffSink = Box::new(move |events| {
        let _ = sink.send(events);
    });
    let handoff = Arc::new(OutboxHandoff::new(lane.owner(), im_domain::services::CLAIM_LEASE, capacity, to_lane));
    store.hand_off_events(handoff.clone());
    let store = store.clone();
    let settled = Box::pin(async move {
        if let Err(error) = store.writes_settled(HANDOFF_STOP_PATIENCE).await {
            tracing::warn!(%error, "the writes under way at the stop could not be waited for; events they hand over now stay claimed until the claim ends (30 s), then any relay takes them");
        }
    });
    crate::events::spawn_handoff(
        lane,
        handoff,
        handed,
        settled,
        settings.relay_lanes(),
        settings.relay_batch_size,
        wake.clone(),
        &workers.shutdown,
        &workers.tasks,
    );
}

/// The event step: the in-process bus, the publisher behind the outbox relay, the integration
/// service whose writes wake the relay.
struct Events {
    bus: Arc<InProcessBus>,
    relay: EventRelay,
    wake: Arc<tokio::sync::Notify>,
    integrations: IntegrationService,
    /// The connection repository whose writes wake the relay.
    connections: Arc<dyn ConnectionRepository>,
    /// With RabbitMQ, the connection the publisher shares with the delivery queue.
    broker: Option<RabbitConnection>,
}

fn events(
    settings: &Settings,
    storage: &Storage,
    clock: Arc<dyn Clock>,
    audit: Audit,
    secrets: Arc<dyn SecretStore>,
    role: ServeRole,
    health: &mut Vec<Arc<dyn HealthCheck>>,
) -> Events {
    let wake = Arc::new(tokio::sync::Notify::new());
    let (repository, connections): (Arc<dyn IntegrationRepository>, Arc<dyn ConnectionRepository>) = match &storage.embedded {
        // The embedded store wakes the relay itself, after the commits that wrote an event: not
        // after the writes whose events it skipped (nobody reads them), whose wake-ups each cost
        // the relay a look at an empty outbox.
        Some(store) => {
            let relay = wake.clone();
            store.on_outbox_commit(Arc::new(move || relay.notify_one()));
            (storage.integrations.clone(), storage.connections.clone())
        }
        None => (
            Arc::new(WakeOnEvents { inner: storage.integrations.clone(), wake: wake.clone() }),
            Arc::new(WakeOnEvents { inner: storage.connections.clone(), wake: wake.clone() }),
        ),
    };
    let integrations = IntegrationService::new(repository, storage.providers.clone(), clock, Arc::new(UuidV7), audit)
        .with_connections(storage.connections.clone())
        .with_url_policy(settings.webhooks.sender.url_policy())
        .with_secrets(secrets);
    let bus = Arc::new(InProcessBus::new());
    let broker = match settings.events.backend {
        EventsBackend::Embedded => None,
        EventsBackend::Rabbitmq => Some(RabbitConnection::new(&settings.rabbitmq)),
    };
    let publisher: Arc<dyn EventPublisher> = match &broker {
        None => bus.clone(),
        Some(connection) => {
            let rabbit = Arc::new(RabbitPublisher::on(settings.rabbitmq.clone(), connection.clone()));
            // Only the relay publishes: the broker and the outbox are the workers' dependencies.
            if role.runs_workers() {
                health.push(rabbit.clone());
            }
            Arc::new(BrokerAndLocal { broker: rabbit, local: bus.clone() })
        }
    };
    if role.runs_workers() {
        health.push(Arc::new(OutboxHealth { outbox: storage.outbox.clone(), max_age: settings.events.outbox_max_age.get() }));
    }
    let relay = EventRelay::new(storage.outbox.clone(), publisher).with_max_attempts(settings.events.max_publish_attempts);
    Events { bus, relay, wake, integrations, connections, broker }
}

/// The webhook step: endpoints, their delivery queue, the sender and the delivery service.
async fn webhooks(
    settings: &Settings,
    storage: &Storage,
    secrets: Arc<dyn SecretStore>,
    audit: Audit,
    role: ServeRole,
    broker: Option<RabbitConnection>,
) -> anyhow::Result<(WebhookService, DeliveryService, Arc<dyn DeliveryQueue>)> {
    let webhooks = WebhookService::new(
        storage.webhooks.clone(),
        secrets,
        Arc::new(SystemClock),
        Arc::new(UuidV7),
        Arc::new(OsEntropy),
        settings.webhooks.sender.url_policy(),
        settings.webhooks.service.previous_secret_grace.get(),
        audit.clone(),
    )
    .with_max_endpoints(settings.webhooks.service.max_endpoints_per_tenant);
    let sender = HttpWebhookSender::new(&settings.webhooks.sender).map_err(|e| anyhow::anyhow!("webhook sender: {e}"))?;
    let queue = delivery_queue(settings, storage, role, broker).await?;
    // The embedded queue in the embedded store's own database: a record and its job are
    // written in one transaction.
    let records = match (&storage.embedded, settings.events.backend) {
        (Some(store), EventsBackend::Embedded) => store.deliveries_with_queue(),
        _ => storage.deliveries.clone(),
    };
    let deliveries = DeliveryService::new(
        storage.webhooks.clone(),
        webhooks.clone(),
        records,
        queue.clone(),
        Arc::new(sender),
        Arc::new(SystemClock),
        Arc::new(UuidV7),
        DeliverySettings {
            retry_schedule: settings.webhooks.service.retry_schedule.iter().map(|d| d.get()).collect(),
            disable_after: settings.webhooks.service.disable_after.get(),
            disable_min_failures: settings.webhooks.service.disable_min_failures,
            user_agent: format!("IntegrationManager-Webhooks/{}", env!("CARGO_PKG_VERSION")),
        },
        audit,
    )
    .with_manual_sends_per_minute(settings.webhooks.service.manual_sends_per_minute);
    Ok((webhooks, deliveries, queue))
}

/// Delivery jobs: a RabbitMQ work queue shared by every instance, or the embedded database of
/// the data directory (whatever the store), whose leases the last stop left are released by a
/// role that runs the dispatcher (an `api` instance must not release a running worker's leases).
/// On RabbitMQ, on the event publisher's connection (`broker`) when given.
async fn delivery_queue(
    settings: &Settings,
    storage: &Storage,
    role: ServeRole,
    broker: Option<RabbitConnection>,
) -> anyhow::Result<Arc<dyn DeliveryQueue>> {
    match settings.events.backend {
        EventsBackend::Embedded => {
            let queue_store = embedded_store(settings, storage).await?;
            let released = if role.runs_workers() { queue_store.release_delivery_leases().await? } else { 0 };
            if released > 0 {
                tracing::info!(released, "delivery attempts interrupted by the last stop are due again");
            }
            Ok(queue_store.delivery_queue())
        }
        EventsBackend::Rabbitmq => {
            let connection = broker.unwrap_or_else(|| RabbitConnection::new(&settings.rabbitmq));
            Ok(Arc::new(RabbitDeliveryQueue::on(&settings.rabbitmq, connection)))
        }
    }
}

/// The embedded database of the data directory: the store itself, or (with Cosmos DB) the same
/// file opened and migrated for what always lives there.
async fn embedded_store(settings: &Settings, storage: &Storage) -> anyhow::Result<EmbeddedStore> {
    match &storage.embedded {
        Some(store) => Ok(store.clone()),
        None => {
            let store = EmbeddedStore::open_with(&settings.storage.data_dir, Arc::new(SystemClock), embedded_options(settings))?;
            store.migrate().await.context("migrating the data directory's database")?;
            Ok(store)
        }
    }
}

/// The HTTP step: binds the port; the server stops when the token is cancelled (signals are
/// ours, not actix's, so one token stops everything).
fn http_server(settings: &Settings, state: web::Data<AppState>) -> anyhow::Result<(Server, u16, usize)> {
    let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))
        .with_context(|| format!("cannot listen on {}:{}", settings.server.host, settings.server.port))?;
    let port = listener.local_addr()?.port();
    let workers = if settings.server.workers == 0 {
        default_workers(std::thread::available_parallelism().map_or(1, |n| n.get()))
    } else {
        settings.server.workers
    };
    let server = HttpServer::new(move || build_app(state.clone()))
        .workers(workers)
        .shutdown_timeout(settings.server.shutdown_timeout.get().as_secs())
        .disable_signals()
        .listen(listener)?
        .run();
    Ok((server, port, workers))
}

/// HTTP workers when `server.workers` is 0: two per core. A request does more than a bare
/// handler's (checks, a read or a queued write), so a worker that the kernel preempts (for the
/// clients on the same cores, for the writer thread) holds every connection it serves; with
/// twice the threads each holds half as many and another one runs meanwhile. Measured on 2
/// cores at 64 connections (docs/benchmarks.md, "A thirty-seventh machine"): GETs by id about
/// 25% more a second and creates a few percent more than with one a core; three, six or eight
/// workers did worse than four.
fn default_workers(cores: usize) -> usize {
    cores.saturating_mul(2)
}

/// `/metrics` alone on `metrics.port` (when set and enabled), one worker: scrapes are rare.
fn metrics_server(settings: &Settings, state: web::Data<AppState>) -> anyhow::Result<Option<(Server, u16)>> {
    if settings.metrics.port == 0 || !settings.metrics.enabled {
        return Ok(None);
    }
    let listener = TcpListener::bind((settings.server.host.as_str(), settings.metrics.port))
        .with_context(|| format!("cannot listen on {}:{} (metrics.port)", settings.server.host, settings.metrics.port))?;
    let port = listener.local_addr()?.port();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(crate::state::MetricsListener)
            .route("/metrics", web::get().to(api::health::metrics))
            .default_service(web::to(api::not_found))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(Some((server, port)))
}

/// A built server, bound to its port, not yet running.
pub struct Application {
    port: u16,
    server: Server,
    /// `/metrics` on `metrics.port`, and the port it is bound to.
    metrics_server: Option<(Server, u16)>,
    workers: Workers,
    drain: Duration,
    state: web::Data<AppState>,
}

impl Application {
    /// Builds an instance of every role; see [`Application::build_with_role`].
    ///
    /// # Errors
    /// When the store, the keys, the catalog or the port fail.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_role(settings, ServeRole::All).await
    }

    /// Builds everything in steps (store, catalog, events, webhooks, workers, HTTP) and binds
    /// the port; the background workers start only in the `worker` and `all` roles, the API
    /// routes are served only in the `api` and `all` roles.
    ///
    /// # Errors
    /// When the store, the keys, the catalog or the port fail.
    pub async fn build_with_role(settings: Settings, role: ServeRole) -> anyhow::Result<Self> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let storage = open_storage(&settings, clock.clone(), false).await?;
        let authenticator = authenticator(&settings).await?;

        let mut health: Vec<Arc<dyn HealthCheck>> = vec![storage.health.clone()];
        let (audit_log, audit_shipper) = audit_log(&settings, &storage, role, &mut health)?;
        let audit = Audit::new(audit_log, clock.clone());
        let shards = shard_manager(&settings, &storage, &mut health).await?;
        let catalog = CatalogService::new(storage.providers.clone(), clock.clone(), audit.clone())
            .with_http_urls(settings.webhooks.sender.allow_http);
        let report = catalog.seed(crate::catalog::builtin_providers()?).await.context("seeding the provider catalog")?;
        tracing::info!(inserted = report.inserted, already_seeded = report.skipped, "provider catalog seeded");

        let secrets = secret_store(&settings, &mut health)?;
        let events = events(&settings, &storage, clock, audit.clone(), secrets.clone(), role, &mut health);
        let outbox = OutboxAdmin::new(storage.outbox.clone(), audit.clone());
        let connections = ConnectionService::new(
            events.connections.clone(),
            storage.integrations.clone(),
            storage.providers.clone(),
            secrets.clone(),
            Arc::new(SystemClock),
            Arc::new(UuidV7),
            audit.clone(),
        )
        .with_oauth2(
            Arc::new(
                im_webhook_sender::oauth2::HttpOAuth2Client::new(&settings.provider_client, settings.webhooks.sender.url_policy())
                    .map_err(|e| anyhow::anyhow!("OAuth2 token client: {e}"))?,
            ),
            oauth2_state_key(&settings)?,
            oauth2_settings(&settings),
        );
        // One provider client for everything that calls a provider: its per-connection limits
        // hold across features.
        let provider_client: Arc<dyn ProviderClient> = Arc::new(
            im_webhook_sender::provider::HttpProviderClient::new(settings.provider_client.clone(), settings.webhooks.sender.url_policy())
                .map_err(|e| anyhow::anyhow!("provider client: {e}"))?,
        );
        let connection_tests = Arc::new(ConnectionTests::new(connections.clone(), provider_client.clone()));
        let sync_tasks = SyncTaskService::new(
            storage.sync_tasks.clone(),
            storage.sync_executions.clone(),
            storage.sync_states.clone(),
            Arc::new(SystemClock),
            Arc::new(UuidV7),
            audit.clone(),
        );
        let (webhooks, deliveries, queue) = webhooks(&settings, &storage, secrets, audit, role, events.broker.clone()).await?;
        // With no broker, the in-process subscribers are the only readers of events: an outcome
        // event none of them wants is not written.
        let deliveries = match settings.events.backend {
            EventsBackend::Embedded => deliveries.with_event_readers(events.bus.clone()),
            EventsBackend::Rabbitmq => deliveries,
        };

        let workers = Workers { shutdown: CancellationToken::new(), tasks: TaskTracker::new() };
        if role.runs_workers() {
            let dispatch = Arc::new(tokio::sync::Notify::new());
            let permits = Arc::new(tokio::sync::Semaphore::new(settings.webhooks.service.concurrency));
            // With the queue on a broker, the fan-out makes the first attempts it has permits for.
            // (Only there: the embedded queue beside another store keeps one job a delivery, and a
            // job queued again after the attempt began could move that attempt's own reschedule.)
            // Those get no job: the hold sweep queues any whose instance stopped before recording
            // it. It runs with the broker's queue even when this instance makes no first attempt
            // (another instance, or this one before a restart, may have).
            let first_here = (settings.events.backend == EventsBackend::Rabbitmq && settings.webhooks.service.first_attempt_in_fan_out)
                .then(|| FirstAttemptsHere { permits: permits.clone(), tasks: workers.tasks.clone(), stopping: workers.shutdown.clone() });
            if settings.events.backend == EventsBackend::Rabbitmq {
                let every = settings.webhooks.service.hold_sweep_interval.get();
                spawn_hold_sweeper(deliveries.clone(), every, dispatch.clone(), &workers.shutdown, &workers.tasks);
            }
            events.bus.subscribe(Arc::new(FanOut { service: Arc::new(deliveries.clone()), wake: dispatch.clone(), first_here }));
            // With no broker, this process's subscribers read every event the store relays; an
            // event only the webhook fan-out reads is not written for a tenant without webhook
            // endpoints. (An instance without workers has none, and writes every event: the
            // fan-out of another instance reads them.)
            if settings.events.backend == EventsBackend::Embedded
                && let Some(store) = &storage.embedded
            {
                store.write_events_for(events.bus.clone());
            }
            spawn_dispatcher(deliveries.clone(), dispatch, permits, &workers.shutdown, &workers.tasks);
            // Only now, with every in-process subscriber registered, may events flow.
            if settings.events.handoff
                && let Some(store) = &storage.embedded
            {
                spawn_handoff(&settings.events, store, &events.relay, &events.wake, &workers);
            }
            crate::events::spawn_relay(
                &events.relay,
                settings.events.relay_lanes(),
                &events.wake,
                settings.events.relay_batch_size,
                &workers.shutdown,
                &workers.tasks,
            );
            if let Some(shipper) = audit_shipper {
                let shipping = &settings.logging.shipper;
                crate::audit::spawn_shipper(shipper, shipping.batch_size, shipping.interval.get(), &workers.shutdown, &workers.tasks);
            }
            let worker = sync_worker(&settings, &storage, connections.clone(), provider_client.clone(), shards.clone()).await?;
            crate::sync::spawn_sync_worker(worker, &workers.shutdown, &workers.tasks);
            if let Some(store) = storage.embedded {
                spawn_ttl_sweeper(store, settings.storage.ttl_sweep_interval.get(), &workers.shutdown, &workers.tasks);
            }
        }

        let state = web::Data::new(AppState {
            integrations: events.integrations,
            connections,
            connection_tests,
            catalog,
            sync_tasks,
            shards,
            webhooks,
            deliveries,
            outbox,
            authenticator,
            health,
            bus: events.bus,
            body_limit: settings.server.body_limit_bytes,
            role,
            metrics: settings.metrics.enabled.then(|| crate::state::MetricsEndpoint {
                handle: crate::metrics::handle(),
                token: settings.metrics.token.clone(),
                outbox: storage.outbox.clone(),
                queue,
                own_port: settings.metrics.port != 0,
            }),
            rate_limits: api::gate::TenantLimiter::new(settings.rate_limits.per_tenant),
            idempotency: im_domain::idempotency::IdempotencyService::new(storage.idempotency.clone(), Arc::new(SystemClock)),
        });
        if let Some(metrics) = &state.metrics {
            spawn_metrics_upkeep(metrics.handle.clone(), &workers.shutdown, &workers.tasks);
        }
        let (server, port, http_workers) = http_server(&settings, state.clone())?;
        let metrics_server = metrics_server(&settings, state.clone())?;
        tracing::info!(
            address = %format!("{}:{port}", settings.server.host), workers = http_workers, events = ?settings.events.backend,
            role = role.as_str(), "listening"
        );
        Ok(Self { port, server, metrics_server, workers, drain: settings.server.shutdown_timeout.get(), state })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port `/metrics` is served on when `metrics.port` is set.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_server.as_ref().map(|(_, port)| *port)
    }

    /// The shared state (tests subscribe to the in-process bus through it).
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// What stops this application gracefully, as SIGTERM and ctrl-c do.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown(self.workers.shutdown.clone())
    }

    /// Serves until SIGTERM, ctrl-c or [`Shutdown::trigger`]; then in-flight requests finish,
    /// the workers drain, and it returns.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self { server, metrics_server, workers, drain, .. } = self;
        let token = workers.shutdown;
        let handle = server.handle();
        if let Some((metrics, _)) = metrics_server {
            let (stop, token) = (metrics.handle(), token.clone());
            tokio::spawn(metrics);
            tokio::spawn(async move {
                token.cancelled().await;
                stop.stop(true).await;
            });
        }
        tokio::spawn(cancel_on_signal(token.clone()));
        tokio::spawn({
            let token = token.clone();
            async move {
                token.cancelled().await;
                tracing::info!("stopping: in-flight requests and background work finish first");
                handle.stop(true).await;
            }
        });
        let serve = async {
            let result = server.await;
            // Also when the server ended on its own: the workers stop with it.
            token.cancel();
            result
        };
        // The workers drain while the last requests finish, within the same timeout.
        let drain_workers = async {
            token.cancelled().await;
            workers.tasks.close();
            if tokio::time::timeout(drain, workers.tasks.wait()).await.is_err() {
                tracing::warn!(
                    still_running = workers.tasks.len(),
                    "background work did not finish within server.shutdown_timeout; its delivery leases bring it back"
                );
            }
        };
        let (result, ()) = tokio::join!(serve, drain_workers);
        result
    }
}

/// Cancels `token` on SIGTERM or ctrl-c (SIGINT); ends when the token is cancelled otherwise.
async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = token.cancelled() => return,
        () = terminate => tracing::info!("SIGTERM received"),
        () = interrupt => tracing::info!("ctrl-c received"),
    }
    token.cancel();
}

/// Folds the recorded histogram samples into their buckets every
/// [`crate::metrics::UPKEEP_INTERVAL`], until `shutdown`, whether or not `/metrics` is scraped.
fn spawn_metrics_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut interval = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => handle.run_upkeep(),
            }
        }
    });
}

/// Deletes expired documents of the embedded store every `every`, until `shutdown`.
fn spawn_ttl_sweeper(store: EmbeddedStore, every: Duration, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let shutdown = shutdown.clone();
    tasks.spawn(im_store_embedded::as_worker(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            match store.purge_expired().await {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "expired documents purged"),
                Err(e) => tracing::warn!(error = %e, "purging expired documents failed"),
            }
        }
    }));
}

/// Asks the server on this machine's `port` for its liveness, with plain HTTP/1.1 over a socket
/// (the `probe` subcommand: no HTTP client is needed for one GET on loopback).
///
/// # Errors
/// When it cannot connect, or the answer is not `200`.
pub fn probe(port: u16, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout).with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).context("no answer")?;
    anyhow::ensure!(head.starts_with(b"HTTP/1.1 200"), "answered {:?}", String::from_utf8_lossy(&head));
    Ok(())
}
