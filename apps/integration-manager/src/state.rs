//! The application state every handler can reach. A module of its own so that `api` does
//! not depend on `startup`, which wires `api` into the server.

use std::sync::Arc;

use im_domain::auth::Authenticator;
use im_domain::ports::HealthCheck;
use im_domain::services::connection_test::ConnectionTester;
use im_domain::services::{
    CatalogService, ConnectionService, DeliveryService, InProcessBus, IntegrationService, OutboxAdmin, SyncTaskService, WebhookService,
};

/// What every handler can reach.
pub struct AppState {
    pub integrations: IntegrationService,
    pub connections: ConnectionService,
    /// Connection tests (through the provider client).
    pub connection_tests: Arc<dyn ConnectionTester>,
    pub catalog: CatalogService,
    pub sync_tasks: SyncTaskService,
    /// The configured Shard Manager (`shard_manager.backend`).
    pub shards: Arc<dyn im_domain::sync::ports::ShardManager>,
    pub webhooks: WebhookService,
    pub deliveries: DeliveryService,
    /// The outbox's dead letters (admin).
    pub outbox: OutboxAdmin,
    pub authenticator: Arc<dyn Authenticator>,
    pub health: Vec<Arc<dyn HealthCheck>>,
    /// In-process subscribers register here (embedded events backend).
    pub bus: Arc<InProcessBus>,
    pub body_limit: usize,
    /// What this instance does: the API routes are served by `api` and `all` only.
    pub role: crate::startup::ServeRole,
    /// `/metrics`, when enabled.
    pub metrics: Option<MetricsEndpoint>,
    /// Per-tenant token buckets (`None`: no limit).
    pub rate_limits: Option<crate::api::gate::TenantLimiter>,
    /// `Idempotency-Key` records.
    pub idempotency: im_domain::idempotency::IdempotencyService,
}

/// What `/metrics` needs: the recorder, the scrape token, and what it samples at each scrape.
pub struct MetricsEndpoint {
    pub handle: metrics_exporter_prometheus::PrometheusHandle,
    /// Empty: no token needed.
    pub token: secrecy::SecretString,
    pub outbox: Arc<dyn im_domain::ports::Outbox>,
    /// The delivery queue, whose depth is sampled at each scrape.
    pub queue: Arc<dyn im_domain::webhooks::ports::DeliveryQueue>,
    /// Served on a port of its own (`metrics.port`), not on the API port.
    pub own_port: bool,
}

/// Marks the application of the metrics port.
#[derive(Debug, Clone, Copy)]
pub struct MetricsListener;
