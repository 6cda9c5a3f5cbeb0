//! Repository support shared by the containers: preconditions from domain etags, and
//! transactional batches that carry outbox events with the change they describe.

use azure_core::http::Etag;
use azure_data_cosmos::TransactionalBatch;
use azure_data_cosmos::models::TransactionalBatchResponse;
use azure_data_cosmos::options::Precondition;
use im_domain::events::DomainEvent;
use im_domain::{DomainError, ETag};

use crate::client::CosmosStore;
use crate::docs::{OutboxDoc, etag_to_cosmos, etag_to_domain};
use crate::errors::{batch_failure, unexpected};

pub(crate) fn precondition(if_match: Option<&ETag>) -> Option<Precondition> {
    if_match.map(|e| Precondition::if_match(Etag::from(etag_to_cosmos(e))))
}

/// Runs a batch whose first operation is the change; returns that operation's etag.
pub(crate) async fn run_batch(
    store: &CosmosStore,
    container: &'static str,
    batch: TransactionalBatch,
    resource: &'static str,
    id: &str,
) -> Result<Option<ETag>, DomainError> {
    let response =
        store.call("a transactional batch", store.container(container).execute_transactional_batch(batch, None), resource, id).await?;
    let ok = response.status().status_code().is_success() && u16::from(response.status()) != 207;
    let model: TransactionalBatchResponse = response.into_model().map_err(unexpected)?;
    let codes: Vec<u16> = model.results().iter().map(|r| r.status_code()).collect();
    if !ok || codes.iter().any(|c| *c >= 400) {
        return Err(batch_failure(&codes, resource, id));
    }
    Ok(model.results().first().and_then(|r| r.etag()).map(etag_to_domain))
}

pub(crate) fn with_events(batch: TransactionalBatch, events: &[DomainEvent]) -> Result<TransactionalBatch, DomainError> {
    with_events_in(batch, events, None)
}

/// Adds outbox entries to a batch of a container partitioned by integration (`integration`:
/// the partition) or by tenant (`None`).
pub(crate) fn with_events_in(
    mut batch: TransactionalBatch,
    events: &[DomainEvent],
    integration: Option<&str>,
) -> Result<TransactionalBatch, DomainError> {
    for event in events {
        let mut doc = OutboxDoc::new(event);
        doc.integration_id = integration.map(str::to_owned);
        batch = batch.create_item(doc).map_err(unexpected)?;
    }
    Ok(batch)
}
