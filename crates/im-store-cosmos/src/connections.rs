//! [`ConnectionRepository`] on `integration_connections`, partitioned by integration. Every call
//! checks the tenant of the document it reads (and writes conditionally on that version), so
//! another tenant's connection is not found. Events go into the same partition in the same
//! transactional batch.

use async_trait::async_trait;
use azure_data_cosmos::options::{BatchDeleteOptions, BatchReplaceOptions};
use azure_data_cosmos::{Query, TransactionalBatch};
use im_domain::connection::{Connection, ConnectionId, ConnectionRepository, owned_by, owned_write};
use im_domain::events::DomainEvent;
use im_domain::{DomainError, ETag, IntegrationId, Page, PageRequest, Stored, TenantId};

use crate::client::{CONNECTIONS, CosmosStore};
use crate::docs::{ConnectionDoc, stored_all};
use crate::errors::unexpected;
use crate::support::{precondition, read_doc, run_batch, with_events_in};

const RESOURCE: &str = "connection";

pub(crate) struct CosmosConnections {
    store: CosmosStore,
}

impl CosmosConnections {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store }
    }

    /// The connection in the integration's partition, whoever owns it.
    async fn read(&self, integration: IntegrationId, id: ConnectionId) -> Result<Option<Stored<Connection>>, DomainError> {
        read_doc(&self.store, CONNECTIONS, integration.to_string(), &id.to_string(), ConnectionDoc::TYPE, RESOURCE).await
    }
}

#[async_trait]
impl ConnectionRepository for CosmosConnections {
    #[tracing::instrument(skip_all, name = "connections.create", fields(tenant = %connection.tenant_id, integration = %connection.integration_id, connection = %connection.id, events = events.len()))]
    async fn create(&self, connection: &Connection, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let pk = connection.integration_id.to_string();
        let id = connection.id.to_string();
        let doc = ConnectionDoc::new(connection.clone());
        let batch = with_events_in(TransactionalBatch::new(pk.clone()).create_item(&doc).map_err(unexpected)?, events, Some(&pk))?;
        run_batch(&self.store, CONNECTIONS, batch, RESOURCE, &id).await?.ok_or_else(|| unexpected("no etag in the batch result"))
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
        let query = Query::from("SELECT * FROM c WHERE c.type = @type AND c.tenantId = @tenantId ORDER BY c.id")
            .with_parameter("@type", ConnectionDoc::TYPE)
            .map_err(unexpected)?
            .with_parameter("@tenantId", tenant.as_str())
            .map_err(unexpected)?;
        let (docs, continuation) = self.store.query_page::<ConnectionDoc>(CONNECTIONS, query, Some(integration.to_string()), page).await?;
        Ok(Page { items: stored_all(docs)?, continuation })
    }

    #[tracing::instrument(skip_all, name = "connections.replace", fields(tenant = %connection.tenant_id, integration = %connection.integration_id, connection = %connection.id, events = events.len()))]
    async fn replace(&self, connection: &Connection, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let found = self.read(connection.integration_id, connection.id).await?;
        let token = owned_write(found, &connection.tenant_id, connection.id, if_match)?;
        let pk = connection.integration_id.to_string();
        let id = connection.id.to_string();
        let doc = ConnectionDoc::new(connection.clone());
        let options = precondition(Some(&token)).map(|p| BatchReplaceOptions::default().with_precondition(p));
        let batch = with_events_in(
            TransactionalBatch::new(pk.clone()).replace_item(id.clone(), &doc, options).map_err(unexpected)?,
            events,
            Some(&pk),
        )?;
        run_batch(&self.store, CONNECTIONS, batch, RESOURCE, &id).await?.ok_or_else(|| unexpected("no etag in the batch result"))
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
        let pk = integration.to_string();
        let key = id.to_string();
        let options = precondition(Some(&token)).map(|p| BatchDeleteOptions::default().with_precondition(p));
        let batch = with_events_in(TransactionalBatch::new(pk.clone()).delete_item(key.clone(), options), events, Some(&pk))?;
        run_batch(&self.store, CONNECTIONS, batch, RESOURCE, &key).await?;
        Ok(())
    }
}
