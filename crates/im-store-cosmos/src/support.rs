//! Repository support shared by the containers: preconditions from domain etags, transactional
//! batches that carry outbox events with the change they describe, and documents created, read
//! (by type) and replaced.

use azure_core::http::Etag;
use azure_data_cosmos::TransactionalBatch;
use azure_data_cosmos::models::TransactionalBatchResponse;
use azure_data_cosmos::options::{BatchReplaceOptions, ItemWriteOptions, Precondition};
use im_domain::events::DomainEvent;
use im_domain::{DomainError, ETag, Stored};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::CosmosStore;
use crate::docs::{Doc, OutboxDoc, etag_to_cosmos, etag_to_domain, header_etag};
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

/// Creates `document`, with `events` in the same transactional batch when there are any.
pub(crate) async fn create_doc(
    store: &CosmosStore,
    container: &'static str,
    pk: String,
    id: String,
    document: &(impl Serialize + Send + Sync),
    events: &[DomainEvent],
    resource: &'static str,
) -> Result<ETag, DomainError> {
    if events.is_empty() {
        let create = store.container(container).create_item(pk, &id, document, None);
        return header_etag(store.call("a create", create, resource, &id).await?.headers().etag());
    }
    let batch = with_events(TransactionalBatch::new(pk).create_item(document).map_err(unexpected)?, events)?;
    run_batch(store, container, batch, resource, &id).await?.ok_or_else(|| unexpected("no etag in the batch result"))
}

/// Reads a document of type `kind` by partition and id, with the read's etag; `None` when there
/// is none or the id names a document of another type.
pub(crate) async fn read_doc<T: DeserializeOwned + Send + 'static>(
    store: &CosmosStore,
    container: &'static str,
    pk: String,
    id: &str,
    kind: &str,
    resource: &'static str,
) -> Result<Option<Stored<T>>, DomainError> {
    let response = match store.call("a read", store.container(container).read_item(pk, id, None), resource, id).await {
        Ok(response) => response,
        Err(DomainError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let etag = response.headers().etag().map(|e| etag_to_domain(e.as_ref()));
    let document: Doc<T> = response.into_model().map_err(unexpected)?;
    if document.kind != kind {
        return Ok(None);
    }
    let etag = etag.or_else(|| document.etag.as_deref().map(etag_to_domain)).ok_or_else(|| unexpected("no etag"))?;
    Ok(Some(Stored { value: document.value, etag }))
}

/// Replaces `document` on the condition `if_match`, with `events` in the same transactional
/// batch when there are any.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replace_doc(
    store: &CosmosStore,
    container: &'static str,
    pk: String,
    id: String,
    document: &(impl Serialize + Send + Sync),
    if_match: Option<ETag>,
    events: &[DomainEvent],
    resource: &'static str,
) -> Result<ETag, DomainError> {
    if events.is_empty() {
        let options = precondition(if_match.as_ref()).map(|p| ItemWriteOptions::default().with_precondition(p));
        let replace = store.container(container).replace_item(pk, &id, document, options);
        return header_etag(store.call("a replace", replace, resource, &id).await?.headers().etag());
    }
    let options = precondition(if_match.as_ref()).map(|p| BatchReplaceOptions::default().with_precondition(p));
    let batch = with_events(TransactionalBatch::new(pk).replace_item(id.clone(), document, options).map_err(unexpected)?, events)?;
    run_batch(store, container, batch, resource, &id).await?.ok_or_else(|| unexpected("no etag in the batch result"))
}
