//! Ports of the webhook capability.

use async_trait::async_trait;

use super::endpoint::{Webhook, WebhookId};
use crate::common::{ETag, Page, PageRequest, Stored, TenantId};
use crate::error::DomainError;

/// Storage of webhook endpoints, partitioned by tenant.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait WebhookRepository: Send + Sync {
    /// # Errors
    /// MUST return [`DomainError::Conflict`] when the id exists in the tenant.
    async fn create(&self, webhook: &Webhook) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when the tenant has no such endpoint.
    async fn get(&self, tenant: &TenantId, id: WebhookId) -> Result<Stored<Webhook>, DomainError>;

    /// One tenant's endpoints, oldest first, one page at a time; never another tenant's.
    ///
    /// # Errors
    /// MUST return [`DomainError::Validation`] on `continuationToken` for a token it did not issue.
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale, having written nothing.
    async fn replace(&self, webhook: &Webhook, if_match: Option<ETag>) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale.
    async fn delete(&self, tenant: &TenantId, id: WebhookId, if_match: Option<ETag>) -> Result<(), DomainError>;
}

/// Random bytes for secrets (the OS generator in production, fixed bytes in tests).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
pub trait Entropy: Send + Sync {
    fn fill(&self, bytes: &mut [u8]);
}

/// The operating system's random generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&self, bytes: &mut [u8]) {
        // Without randomness no secret can be made safely: stop rather than issue a weak one.
        getrandom::fill(bytes).unwrap_or_else(|e| panic!("the operating system has no randomness: {e}"));
    }
}
