//! Wiring: picks the adapters the configuration names, builds the services and the HTTP
//! server. `build_app` serves both the real server and in-process tests.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServerHandle, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use base64::Engine as _;
use im_auth::LocalJwt;
use im_bus_rabbitmq::RabbitDeliveryQueue;
use im_bus_rabbitmq::RabbitPublisher;
use im_domain::auth::Authenticator;
use im_domain::ports::{EventPublisher, HealthCheck, IntegrationRepository, Outbox, ProviderRepository};
use im_domain::secrets::SecretStore;
use im_domain::services::{
    CatalogService, DeliveryService, DeliverySettings, EventRelay, InProcessBus, IntegrationService, WebhookService,
};
use im_domain::webhooks::ports::{DeliveryQueue, DeliveryRepository, OsEntropy, WebhookRepository};
use im_domain::{Clock, SystemClock, UuidV7};
use im_store_cosmos::{CosmosSettings, CosmosStore};
use im_store_embedded::EmbeddedStore;
use im_webhook_sender::{HttpWebhookSender, SenderSettings};

use crate::api;
use crate::config::{AuthMode, EventsBackend, SecretsBackend, Settings, StorageBackend};
use crate::deliveries::{BrokerThenLocal, FanOut, spawn_dispatcher};
use crate::events::{OutboxHealth, WakeOnEvents};

/// What every handler can reach.
pub struct AppState {
    pub integrations: IntegrationService,
    pub catalog: CatalogService,
    pub webhooks: WebhookService,
    pub deliveries: DeliveryService,
    pub authenticator: Arc<dyn Authenticator>,
    pub health: Vec<Arc<dyn HealthCheck>>,
    /// In-process subscribers register here (embedded events backend).
    pub bus: Arc<InProcessBus>,
    pub body_limit: usize,
}

/// The actix application: routes, body limits, request ids, problem+json for unknown routes.
pub fn build_app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<ServiceRequest, Config = (), Response = ServiceResponse<impl MessageBody>, Error = actix_web::Error, InitError = ()>,
> {
    let limit = state.body_limit;
    App::new()
        .app_data(state)
        .app_data(web::JsonConfig::default().limit(limit))
        .configure(api::routes)
        .default_service(web::to(api::not_found))
        .wrap(from_fn(api::request_id::middleware))
}

/// The local token signer/verifier, with the key from configuration or the key file.
///
/// # Errors
/// When the key cannot be read or created.
pub fn local_jwt(settings: &Settings) -> anyhow::Result<LocalJwt> {
    let AuthMode::Local = settings.auth.mode;
    let key = if settings.auth.hs256_key.is_empty() {
        crate::keys::load_or_create_key(&settings.auth_key_file(), im_auth::MIN_KEY_BYTES)?
    } else {
        base64::engine::general_purpose::STANDARD.decode(settings.auth.hs256_key.expose()).context("auth.hs256_key is not base64")?
    };
    LocalJwt::new(&key, settings.auth.issuer(), settings.auth.audience(), settings.auth.leeway_secs)
}

/// The configured secret store: local and encrypted, or the Secret Management service.
///
/// # Errors
/// When the local key cannot be had or the HTTP client cannot be built.
pub fn secret_store(settings: &Settings) -> anyhow::Result<Arc<dyn SecretStore>> {
    match settings.secrets.backend {
        SecretsBackend::Local => {
            let key = if settings.secrets.local_key.is_empty() {
                let bytes = crate::keys::load_or_create_key(&settings.secrets_key_file(), im_secrets_local::KEY_BYTES)?;
                <[u8; im_secrets_local::KEY_BYTES]>::try_from(bytes.as_slice())
                    .map_err(|_| anyhow::anyhow!("the secrets key file must hold 32 bytes"))?
            } else {
                im_secrets_local::parse_key(settings.secrets.local_key.expose())?
            };
            Ok(Arc::new(im_secrets_local::LocalSecretStore::open(&settings.storage.data_dir, &key)?))
        }
        SecretsBackend::Http => Ok(Arc::new(
            im_secrets_http::HttpSecretStore::new(im_secrets_http::HttpSecretSettings {
                url: settings.secrets.url.clone(),
                token: settings.secrets.token.expose().to_owned(),
                timeout: settings.secrets.timeout.0,
                attempts: settings.secrets.attempts,
                backoff: Duration::from_millis(100),
            })
            .map_err(|e| anyhow::anyhow!("secret management client: {e}"))?,
        )),
    }
}

/// The configured store, as the ports the services need.
pub struct Storage {
    pub integrations: Arc<dyn IntegrationRepository>,
    pub webhooks: Arc<dyn WebhookRepository>,
    pub deliveries: Arc<dyn DeliveryRepository>,
    pub providers: Arc<dyn ProviderRepository>,
    pub outbox: Arc<dyn Outbox>,
    pub health: Arc<dyn HealthCheck>,
    /// The embedded store, whose expired documents a sweeper deletes (Cosmos expires its own).
    pub embedded: Option<EmbeddedStore>,
    /// What `migrate` did or found, for people.
    pub report: Vec<String>,
}

/// Opens the configured store: the embedded one is migrated; Cosmos DB is provisioned when
/// `provision` (the `migrate` command, or `cosmos_db.auto_provision`), then checked.
///
/// # Errors
/// When the store cannot be opened, migrated, provisioned, or misses a container.
pub async fn open_storage(settings: &Settings, clock: Arc<dyn Clock>, provision: bool) -> anyhow::Result<Storage> {
    match settings.storage.backend {
        StorageBackend::Embedded => {
            let store = EmbeddedStore::open(&settings.storage.data_dir, clock)?;
            let migrated = store.migrate().await.context("migrating the embedded store")?;
            if !migrated.applied.is_empty() {
                tracing::info!(applied = ?migrated.applied, version = migrated.version, "store migrated");
            }
            let mut report = vec![format!("embedded store {} at schema version {}", store.path().display(), migrated.version)];
            report.extend(migrated.applied.iter().map(|m| format!("applied migration {m}")));
            Ok(Storage {
                integrations: store.integrations(),
                webhooks: store.webhooks(),
                deliveries: store.deliveries(),
                providers: store.providers(),
                outbox: store.outbox(),
                health: Arc::new(store.clone()),
                embedded: Some(store),
                report,
            })
        }
        StorageBackend::Cosmos => {
            let cosmos = &settings.cosmos_db;
            let cosmos_settings = CosmosSettings {
                endpoint: cosmos.endpoint.clone(),
                key: cosmos.key.expose().to_owned(),
                database: cosmos.database.clone(),
                emulator: cosmos.emulator,
                request_timeout: Duration::from_secs(cosmos.request_timeout_secs),
                preferred_regions: cosmos.preferred_regions.clone(),
                max_throttle_retries: cosmos.max_throttle_retries,
            };
            let mut report = Vec::new();
            if provision || cosmos.auto_provision {
                let provisioned = im_store_cosmos::provision(&cosmos_settings).await.context("provisioning Cosmos DB")?;
                report.extend(provisioned.created.iter().map(|c| format!("created {c}")));
                report.extend(provisioned.existing.iter().map(|c| format!("exists {c}")));
                tracing::info!(created = ?provisioned.created, existing = provisioned.existing.len(), "cosmos db provisioned");
            }
            let store = CosmosStore::connect(cosmos_settings).await?;
            Ok(Storage {
                integrations: store.integrations(),
                webhooks: store.webhooks(),
                deliveries: store.deliveries(),
                providers: store.providers(),
                outbox: store.outbox(),
                health: Arc::new(store),
                embedded: None,
                report,
            })
        }
    }
}

/// A built server, bound to its port, not yet running.
pub struct Application {
    port: u16,
    server: Server,
    background: Vec<tokio::task::JoinHandle<()>>,
    state: web::Data<AppState>,
}

impl Application {
    /// Builds everything and binds the port.
    ///
    /// # Errors
    /// When the store, the keys, the catalog or the port fail.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let storage = open_storage(&settings, clock.clone(), false).await?;
        let authenticator: Arc<dyn Authenticator> = Arc::new(local_jwt(&settings)?);

        let catalog = CatalogService::new(storage.providers.clone(), clock.clone());
        let report = catalog.seed(crate::catalog::builtin_providers()?).await.context("seeding the provider catalog")?;
        tracing::info!(inserted = report.inserted, already_seeded = report.skipped, "provider catalog seeded");
        let wake = Arc::new(tokio::sync::Notify::new());
        let repository = Arc::new(WakeOnEvents { inner: storage.integrations.clone(), wake: wake.clone() });
        let integrations = IntegrationService::new(repository, storage.providers.clone(), clock, Arc::new(UuidV7));

        let mut health: Vec<Arc<dyn HealthCheck>> = vec![storage.health.clone()];
        let bus = Arc::new(InProcessBus::new());
        let publisher: Arc<dyn EventPublisher> = match settings.events.backend {
            EventsBackend::Embedded => bus.clone(),
            EventsBackend::Rabbitmq => {
                let rabbit = Arc::new(RabbitPublisher::new(im_bus_rabbitmq::RabbitSettings {
                    url: settings.rabbitmq.url.expose().to_owned(),
                    exchange: settings.rabbitmq.exchange.clone(),
                    confirm_timeout: Duration::from_secs(settings.rabbitmq.confirm_timeout_secs),
                }));
                health.push(rabbit.clone());
                Arc::new(BrokerThenLocal { broker: rabbit, local: bus.clone() })
            }
        };
        let relay = EventRelay::new(storage.outbox.clone(), publisher);
        health.push(Arc::new(OutboxHealth {
            outbox: storage.outbox.clone(),
            max_age: Duration::from_secs(settings.events.outbox_max_age_secs),
        }));

        let secrets = secret_store(&settings)?;
        let webhooks = WebhookService::new(
            storage.webhooks.clone(),
            secrets,
            Arc::new(SystemClock),
            Arc::new(UuidV7),
            Arc::new(OsEntropy),
            settings.webhooks.url_policy(),
            settings.webhooks.previous_secret_grace.0,
        )
        .with_max_endpoints(settings.webhooks.max_endpoints_per_tenant);
        // Delivery jobs: a RabbitMQ work queue shared by every instance, or the embedded
        // database of the data directory (whatever the store).
        let queue: Arc<dyn DeliveryQueue> = match settings.events.backend {
            EventsBackend::Embedded => {
                let queue_store = match &storage.embedded {
                    Some(store) => store.clone(),
                    None => {
                        let store = EmbeddedStore::open(&settings.storage.data_dir, Arc::new(SystemClock))?;
                        store.migrate().await.context("migrating the delivery queue")?;
                        store
                    }
                };
                let released = queue_store.release_delivery_leases().await?;
                if released > 0 {
                    tracing::info!(released, "delivery attempts interrupted by the last stop are due again");
                }
                queue_store.delivery_queue()
            }
            EventsBackend::Rabbitmq => Arc::new(RabbitDeliveryQueue::new(
                settings.rabbitmq.url.expose().to_owned(),
                settings.rabbitmq.delivery_queue_prefix.clone(),
            )),
        };
        let sender = HttpWebhookSender::new(SenderSettings {
            connect_timeout: settings.webhooks.connect_timeout.0,
            request_timeout: settings.webhooks.request_timeout.0,
            policy: settings.webhooks.url_policy(),
        })
        .map_err(|e| anyhow::anyhow!("webhook sender: {e}"))?;
        let deliveries = DeliveryService::new(
            storage.webhooks.clone(),
            webhooks.clone(),
            storage.deliveries.clone(),
            queue,
            Arc::new(sender),
            Arc::new(SystemClock),
            Arc::new(UuidV7),
            DeliverySettings {
                retry_schedule: settings.webhooks.retry_schedule.iter().map(|d| d.0).collect(),
                disable_after: settings.webhooks.disable_after.0,
                disable_min_failures: settings.webhooks.disable_min_failures,
                user_agent: format!("IntegrationManager-Webhooks/{}", env!("CARGO_PKG_VERSION")),
            },
        );
        let dispatch = Arc::new(tokio::sync::Notify::new());
        bus.subscribe(Arc::new(FanOut { service: deliveries.clone(), wake: dispatch.clone() }));
        let dispatcher = spawn_dispatcher(deliveries.clone(), dispatch, settings.webhooks.concurrency);
        // Only now, with every in-process subscriber registered, may events flow.
        let relay_task = crate::events::spawn_relay(relay, wake, settings.events.relay_batch_size);
        let state = web::Data::new(AppState {
            integrations,
            catalog,
            webhooks,
            deliveries,
            authenticator,
            health,
            bus,
            body_limit: settings.server.body_limit_bytes,
        });

        let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))
            .with_context(|| format!("cannot listen on {}:{}", settings.server.host, settings.server.port))?;
        let port = listener.local_addr()?.port();
        let workers = if settings.server.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            settings.server.workers
        };
        let state_for_tests = state.clone();
        let server = HttpServer::new(move || build_app(state.clone()))
            .workers(workers)
            .shutdown_timeout(settings.server.shutdown_timeout_secs)
            .listen(listener)?
            .run();

        let mut background = vec![relay_task, dispatcher];
        if let Some(store) = storage.embedded {
            background.push(spawn_ttl_sweeper(store, Duration::from_secs(settings.storage.ttl_sweep_interval_secs)));
        }
        tracing::info!(address = %format!("{}:{port}", settings.server.host), workers, events = ?settings.events.backend, "listening");
        Ok(Self { port, server, background, state: state_for_tests })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shared state (tests subscribe to the in-process bus through it).
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// A handle that stops the server gracefully.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM/SIGINT stop it gracefully: in-flight requests finish).
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        for task in self.background {
            task.abort();
        }
        result
    }
}

fn spawn_ttl_sweeper(store: EmbeddedStore, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            match store.purge_expired().await {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "expired documents purged"),
                Err(e) => tracing::warn!(error = %e, "purging expired documents failed"),
            }
        }
    })
}
