//! [`ConnectionRepository`] on the documents table: container `integration_connections`,
//! partitioned by integration. The tenant is checked on every call (inside the write's
//! transaction for writes), so another tenant's connection is not found.

use async_trait::async_trait;
use im_domain::connection::{Connection, ConnectionId, ConnectionRepository, owned_by, owned_write};
use im_domain::events::DomainEvent;
use im_domain::{DomainError, ETag, IntegrationId, Page, PageRequest, Stored, TenantId};

use crate::containers::CONNECTIONS;
use crate::documents::Documents;
use crate::support::{decode, decode_page, encode, partition_query};

const RESOURCE: &str = "connection";

pub(crate) struct SqliteConnections {
    docs: Documents,
}

impl SqliteConnections {
    pub(crate) fn new(docs: Documents) -> Self {
        Self { docs }
    }

    /// The connection in the integration's partition, whoever owns it.
    async fn read(&self, integration: IntegrationId, id: ConnectionId) -> Result<Option<Stored<Connection>>, DomainError> {
        self.docs.get(CONNECTIONS, integration.to_string(), id.to_string()).await?.map(decode::<Connection>).transpose()
    }
}

#[async_trait]
impl ConnectionRepository for SqliteConnections {
    #[tracing::instrument(skip_all, name = "connections.create", fields(tenant = %connection.tenant_id, integration = %connection.integration_id, connection = %connection.id, events = events.len()))]
    async fn create(&self, connection: &Connection, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let body = encode(connection)?;
        self.docs
            .create_with_events(CONNECTIONS, connection.integration_id.to_string(), connection.id.to_string(), body, None, events)
            .await
    }

    #[tracing::instrument(skip_all, name = "connections.get", fields(tenant = %tenant, integration = %integration, connection = %id))]
    async fn get(&self, tenant: &TenantId, integration: IntegrationId, id: ConnectionId) -> Result<Stored<Connection>, DomainError> {
        owned_by(self.read(integration, id).await?, tenant, id)
    }

    #[tracing::instrument(skip_all, name = "connections.list", fields(tenant = %tenant, integration = %integration))]
    async fn list(
        &self,
        tenant: &TenantId,
        integration: IntegrationId,
        page: &PageRequest,
    ) -> Result<Page<Stored<Connection>>, DomainError> {
        let query = partition_query(CONNECTIONS, integration.to_string(), vec![("$.tenantId", tenant.to_string())], page);
        decode_page(self.docs.query(query).await?)
    }

    #[tracing::instrument(skip_all, name = "connections.replace", fields(tenant = %connection.tenant_id, integration = %connection.integration_id, connection = %connection.id, events = events.len()))]
    async fn replace(&self, connection: &Connection, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let found = self.read(connection.integration_id, connection.id).await?;
        let token = owned_write(found, &connection.tenant_id, connection.id, if_match)?;
        let body = encode(connection)?;
        let pk = connection.integration_id.to_string();
        self.docs.replace(CONNECTIONS, RESOURCE, pk.clone(), pk, connection.id.to_string(), body, Some(token), None, events).await
    }

    #[tracing::instrument(skip_all, name = "connections.delete", fields(tenant = %tenant, integration = %integration, connection = %id, events = events.len()))]
    async fn delete(
        &self,
        tenant: &TenantId,
        integration: IntegrationId,
        id: ConnectionId,
        if_match: Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<(), DomainError> {
        let token = owned_write(self.read(integration, id).await?, tenant, id, if_match)?;
        self.docs.delete(CONNECTIONS, RESOURCE, integration.to_string(), id.to_string(), Some(token), events).await
    }
}
