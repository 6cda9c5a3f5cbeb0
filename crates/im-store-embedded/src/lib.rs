//! The embedded store: every repository port of the domain on one SQLite database file in the
//! data directory (WAL mode), so the service runs on one machine with nothing else installed.
//!
//! Documents are kept the way Cosmos DB keeps them, in containers with a partition key, an
//! opaque concurrency token and an optional expiry, so both store adapters pass the same
//! conformance suite. Schema changes are numbered migrations applied by [`EmbeddedStore::migrate`].

mod audit;
mod connections;
mod db;
mod deliveries;
pub mod documents;
mod gathered_wal;
mod group_reads;
mod handoff;
mod idempotency;
mod integrations;
mod kept_open;
mod migrations;
mod outbox;
mod providers;
mod shards;
mod support;
mod sync;
mod wal_index;
mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::ports::{DependencyHealth, HealthCheck, IntegrationRepository, Outbox, ProviderRepository};
use im_domain::{Clock, DomainError};

pub use db::{Db, DbOptions, WAL_RESTART_FRAMES, WORKER_ROOM, as_worker};
pub use documents::Documents;
pub use handoff::{HandedEvent, HandoffSink, OutboxHandoff};
pub use migrations::MigrationReport;

/// Containers, named as in Cosmos DB.
pub mod containers {
    pub const PROVIDERS: &str = "integration_providers";
    pub const INTEGRATIONS: &str = "integration_integrations";
    pub const CONNECTIONS: &str = "integration_connections";
    pub const WEBHOOKS: &str = "integration_webhooks";
    pub const WEBHOOK_DELIVERIES: &str = "integration_webhook_deliveries";
    /// The payloads that the deliveries of one event share, one per tenant and event id
    /// (embedded store only: Cosmos keeps each delivery's payload in its document).
    pub const WEBHOOK_PAYLOADS: &str = "integration_webhook_payloads";
    pub const SYNC_TASKS: &str = "integration_sync_tasks";
    pub const SYNC_EXECUTIONS: &str = "integration_sync_executions";
    /// Per-record sync states (embedded store only: Cosmos keeps them in `integration_sync_tasks`).
    pub const SYNC_STATES: &str = "integration_sync_states";
    /// Sync conflicts (embedded store only: Cosmos keeps them in `integration_sync_tasks`).
    pub const SYNC_CONFLICTS: &str = "integration_sync_conflicts";
    /// `Idempotency-Key` records (Cosmos keeps them in `integration_webhook_deliveries`).
    pub const IDEMPOTENCY_KEYS: &str = "integration_idempotency_keys";
}

/// File name of the database inside the data directory.
pub const DATABASE_FILE: &str = "integration-manager.db";

/// The embedded store. Cheap to clone; every clone shares the same connections.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Arc<Db>,
    path: PathBuf,
    /// Records the delivery queue's take read for the gets that follow.
    leased: Arc<deliveries::LeasedRecords>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database in `data_dir`. Does not migrate.
    ///
    /// # Errors
    /// When the directory or the file cannot be created or opened.
    pub fn open(data_dir: &Path, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        Self::open_with(data_dir, clock, DbOptions::default())
    }

    /// [`EmbeddedStore::open`] with `options`.
    ///
    /// # Errors
    /// As `open`.
    pub fn open_with(data_dir: &Path, clock: Arc<dyn Clock>, options: DbOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", data_dir.display()))?;
        let path = data_dir.join(DATABASE_FILE);
        let db = Db::open_with(&path, clock, options)?;
        Ok(Self { db: Arc::new(db), path, leased: Arc::default() })
    }

    /// Writes an event to the outbox only when `readers` may act on it (see
    /// [`Db::write_events_for`]): for the in-process bus, whose webhook fan-out is the only
    /// reader of the deliverable events, an event of a tenant without webhook endpoints is not
    /// written. Never with a broker.
    pub fn write_events_for(&self, readers: Arc<dyn im_domain::ports::EventReaders>) {
        self.db.write_events_for(readers);
    }

    /// Runs `wake` after every commit that wrote an event to the outbox (on the writer thread:
    /// it must not block), so that a relay wakes for events this store recorded, not for those
    /// it skipped ([`Db::on_outbox_commit`]).
    pub fn on_outbox_commit(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        self.db.on_outbox_commit(wake);
    }

    /// Writes the events of later writes claimed for the relay of `handoff` (while it has room
    /// and is not paused), and hands them to it in memory once they commit: its rounds take no
    /// claim before publishing ([`OutboxHandoff`]). Only the first call counts; call it only
    /// with a relay running in this process.
    pub fn hand_off_events(&self, handoff: Arc<OutboxHandoff>) {
        self.db.hand_off_events(handoff);
    }

    /// Applies the migrations that were not applied yet. Idempotent.
    ///
    /// # Errors
    /// When a migration fails (the failing one is rolled back whole).
    pub async fn migrate(&self) -> Result<MigrationReport, DomainError> {
        self.db.write_in_savepoint(migrations::apply).await
    }

    /// Deletes the documents whose time to live has passed; returns how many.
    pub async fn purge_expired(&self) -> Result<usize, DomainError> {
        self.documents().purge_expired().await
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Low-level document access, for repositories of later resources and for tests.
    pub fn documents(&self) -> Documents {
        Documents::new(self.db.clone())
    }

    pub fn integrations(&self) -> Arc<dyn IntegrationRepository> {
        Arc::new(integrations::SqliteIntegrations::new(self.documents()))
    }

    pub fn connections(&self) -> Arc<dyn im_domain::connection::ConnectionRepository> {
        Arc::new(connections::SqliteConnections::new(self.documents()))
    }

    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(outbox::SqliteOutbox::new(self.db.clone()))
    }

    /// The durable buffer of audit records waiting for the Logging Service.
    pub fn audit_buffer(&self) -> Arc<dyn im_domain::audit::AuditBuffer> {
        Arc::new(audit::SqliteAuditBuffer::new(self.db.clone()))
    }

    pub fn webhooks(&self) -> Arc<dyn im_domain::webhooks::ports::WebhookRepository> {
        Arc::new(webhooks::SqliteWebhooks::new(self.documents(), self.leased.clone()))
    }

    /// Deliveries, when the delivery queue is elsewhere (RabbitMQ).
    pub fn deliveries(&self) -> Arc<dyn im_domain::webhooks::ports::DeliveryRepository> {
        Arc::new(deliveries::SqliteDeliveries::new(self.documents(), self.leased.clone()))
    }

    /// Deliveries whose queue is this database's [`Self::delivery_queue`]
    /// (`events.backend = "embedded"`): a delivery and its job are written in one transaction
    /// (`DeliveryRepository::keeps_queue`).
    pub fn deliveries_with_queue(&self) -> Arc<dyn im_domain::webhooks::ports::DeliveryRepository> {
        Arc::new(deliveries::SqliteDeliveries::with_queue(self.documents(), self.leased.clone()))
    }

    /// Resolves once every write queued before it has ended (committed or rolled back) and the
    /// events its group handed over went to the relay ([`Self::hand_off_events`]): a barrier.
    /// While the writer's queue is full it tries again, for up to `patience`.
    ///
    /// # Errors
    /// When the writer took no write within `patience`, or stopped.
    pub async fn writes_settled(&self, patience: Duration) -> Result<(), DomainError> {
        let until = std::time::Instant::now() + patience;
        loop {
            match self.db.write(|_| Ok(())).await {
                Err(DomainError::Unavailable { .. }) if std::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                settled => return settled,
            }
        }
    }

    /// Releases every lease of the delivery queue. The embedded queue has one consumer, this
    /// process: at start, jobs a crashed predecessor had taken are due again at once.
    pub async fn release_delivery_leases(&self) -> Result<usize, DomainError> {
        self.db.write(|tx| tx.execute("UPDATE delivery_jobs SET leased_until = 0 WHERE leased_until > 0", []).map_err(db::map_sqlite)).await
    }

    /// The durable queue of delivery attempts.
    pub fn delivery_queue(&self) -> Arc<dyn im_domain::webhooks::ports::DeliveryQueue> {
        Arc::new(deliveries::SqliteDeliveryQueue::new(self.db.clone(), self.leased.clone()))
    }

    /// The embedded Shard Manager (`shard_manager.backend = "embedded"`).
    pub fn shards(&self) -> Arc<dyn im_domain::sync::ports::ShardManager> {
        Arc::new(shards::EmbeddedShards::new(self.documents()))
    }

    pub fn sync_tasks(&self) -> Arc<dyn im_domain::sync::ports::SyncTaskRepository> {
        Arc::new(sync::SqliteSync::new(self.db.clone()))
    }

    pub fn sync_executions(&self) -> Arc<dyn im_domain::sync::ports::SyncExecutionRepository> {
        Arc::new(sync::SqliteSync::new(self.db.clone()))
    }

    pub fn sync_states(&self) -> Arc<dyn im_domain::sync::ports::SyncStateRepository> {
        Arc::new(sync::SqliteSync::new(self.db.clone()))
    }

    pub fn idempotency(&self) -> Arc<dyn im_domain::idempotency::IdempotencyRepository> {
        Arc::new(idempotency::SqliteIdempotency::new(self.documents()))
    }

    pub fn providers(&self) -> Arc<dyn ProviderRepository> {
        Arc::new(providers::SqliteProviders::new(self.documents()))
    }
}

#[async_trait]
impl HealthCheck for EmbeddedStore {
    fn describe(&self) -> (&'static str, bool) {
        ("store", true)
    }

    #[tracing::instrument(skip_all, name = "store.check")]
    async fn check(&self) -> DependencyHealth {
        let started = std::time::Instant::now();
        let result = self.db.read(|conn| conn.query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get::<_, i64>(0))).await;
        let (ready, detail, diagnostic) = match result {
            Ok(applied) => {
                let detail = format!("sqlite: {applied} migrations, {} µs", started.elapsed().as_micros());
                (true, detail, format!("sqlite {}", self.path.display()))
            }
            Err(e) => (false, "sqlite: not reachable".to_owned(), format!("sqlite {}: {e}", self.path.display())),
        };
        DependencyHealth { name: "store".into(), ready, critical: true, detail, diagnostic }
    }
}
