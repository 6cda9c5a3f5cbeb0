//! Use-case services: they check who may do what, validate input against the rules of the
//! domain and orchestrate the ports. Handlers in the app call these and nothing else.

mod audit_shipper;
mod bus;
mod catalog;
pub mod connection_test;
mod connections;
mod deliveries;
mod integrations;
mod outbox;
mod relay;
mod sync_engine;
#[cfg(test)]
mod sync_engine_tests;
mod sync_scheduler;
mod sync_tasks;
mod webhooks;

pub use audit_shipper::{AUDIT_CLAIM_LEASE, AuditShipper, Shipped};
pub use bus::InProcessBus;
pub use catalog::CatalogService;
pub use connections::{
    AuthorizeSpec, CallbackOutcome, CallbackParams, ConnectionCredentials, ConnectionService, ConnectionTests, OAuth2Settings,
    SECRET_KIND as CONNECTION_SECRET_KIND, StartedAuthorization,
};
pub use deliveries::{
    AttemptReport, DEFAULT_MANUAL_SENDS_PER_MINUTE, DeliveryService, DeliverySettings, ENDED_HOLD_GRACE, FirstAttempts, HeldAttempt,
};
pub use integrations::IntegrationService;
pub use outbox::OutboxAdmin;
pub use relay::{CLAIM_LEASE, ClaimedNotPublished, DEFAULT_MAX_PUBLISH_ATTEMPTS, EventRelay, Relayed};
pub use sync_engine::{EngineSettings, RunControl, SyncEngine, SyncSource, direction_problem};
pub use sync_scheduler::{Claimed, DEFAULT_FAILURE_LIMIT, SyncScheduler};
pub use sync_tasks::{ResetScope, SyncTaskService};
pub use webhooks::{WebhookService, WithSecret};

use crate::common::{ETag, Stored};

use crate::error::DomainError;

/// How many times a read-modify-write without the caller's `If-Match` is retried when another
/// writer got in between.
const UNCONDITIONAL_RETRIES: u32 = 20;

/// Runs a read-modify-write. `op(token)` reads the current version, applies the change and
/// writes it conditionally on `token`, or on the version it just read when `token` is `None`.
/// With the caller's `If-Match` a stale token is the caller's problem (412). Without one, a
/// concurrent change makes the operation read and apply again, so no update is ever lost.
async fn read_modify_write<T>(
    if_match: Option<&ETag>,
    mut op: impl AsyncFnMut(Option<&ETag>) -> Result<T, DomainError>,
) -> Result<T, DomainError> {
    if if_match.is_some() {
        return op(if_match).await;
    }
    crate::retry::on_conflict(UNCONDITIONAL_RETRIES + 1, async || op(None).await).await
}

/// The version a read-modify-write read, refused with `PreconditionFailed` when the caller's
/// token names another one.
fn matching<T>(current: Stored<T>, token: Option<&ETag>) -> Result<Stored<T>, DomainError> {
    if token.is_some_and(|t| *t != current.etag) {
        return Err(DomainError::PreconditionFailed);
    }
    Ok(current)
}

/// Polls a future that never waits (the mocks of service tests answer at once), without an async
/// runtime (the domain depends on none).
#[cfg(test)]
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}
