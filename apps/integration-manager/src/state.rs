//! The application state every handler can reach. A module of its own so that `api` does
//! not depend on `startup`, which wires `api` into the server.

use std::sync::Arc;

use im_domain::auth::Authenticator;
use im_domain::ports::HealthCheck;
use im_domain::services::connection_test::ConnectionTester;
use im_domain::services::{
    CatalogService, ConnectionService, DeliveryService, InProcessBus, IntegrationService, OutboxAdmin, WebhookService,
};

/// What every handler can reach.
pub struct AppState {
    pub integrations: IntegrationService,
    pub connections: ConnectionService,
    /// Connection tests (through the provider client).
    pub connection_tests: Arc<dyn ConnectionTester>,
    pub catalog: CatalogService,
    pub webhooks: WebhookService,
    pub deliveries: DeliveryService,
    /// The outbox's dead letters (admin).
    pub outbox: OutboxAdmin,
    pub authenticator: Arc<dyn Authenticator>,
    pub health: Vec<Arc<dyn HealthCheck>>,
    /// In-process subscribers register here (embedded events backend).
    pub bus: Arc<InProcessBus>,
    pub body_limit: usize,
}
