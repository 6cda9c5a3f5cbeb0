//! Idempotent requests (`Idempotency-Key`): the first request with a key runs and its response
//! is kept for [`RETENTION`]; a repetition with the same key and the same request gets that
//! response again without running; the same key with another request is refused; a repetition
//! while the first still runs is told so. Keys belong to a tenant.
//!
//! The first request holds its key for [`LEASE`]: when its instance died meanwhile, a later
//! repetition takes the key over and runs (nothing was answered, so nothing is replayed).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

use crate::common::{Clock, ETag, Stored, TenantId};
use crate::error::DomainError;

/// How long a response is kept for replay.
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a running first request holds its key.
pub const LEASE: Duration = Duration::from_secs(120);

/// A response kept for replay: its status, the headers that describe it, its body (UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// One key of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdempotencyRecord {
    pub tenant_id: TenantId,
    /// The digest of the caller's key (64 hexadecimal digits: a valid document id in every store).
    pub key: String,
    /// The digest of the request the key was first used with.
    pub fingerprint: String,
    /// While the first request runs: until when it holds the key.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub locked_until: Option<OffsetDateTime>,
    /// Once it answered: its response.
    #[serde(default)]
    pub response: Option<SavedResponse>,
}

/// Storage of idempotency records, partitioned by tenant; each expires `ttl` after its last write.
#[async_trait]
pub trait IdempotencyRepository: Send + Sync {
    /// Stores a new record.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Conflict`] if the tenant has a live record with that key,
    ///   having written nothing.
    /// - MUST return [`DomainError::Unavailable`] when the store cannot be reached.
    async fn create(&self, record: &IdempotencyRecord, ttl: Duration) -> Result<ETag, DomainError>;

    /// Reads a live record: `None` when the tenant has none with that key (another tenant's
    /// record with the same key is not it), or when it expired.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Unavailable`] when the store cannot be reached.
    async fn get(&self, tenant: &TenantId, key: &str) -> Result<Option<Stored<IdempotencyRecord>>, DomainError>;

    /// Replaces a record if `if_match` is its current token; returns the new token.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if it does not exist.
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is stale, having written nothing.
    async fn replace(&self, record: &IdempotencyRecord, if_match: &ETag, ttl: Duration) -> Result<ETag, DomainError>;

    /// Deletes a record if `if_match` is its current token.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if it does not exist.
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is stale, having deleted nothing.
    async fn delete(&self, tenant: &TenantId, key: &str, if_match: &ETag) -> Result<(), DomainError>;
}

/// What a request with a key may do.
#[derive(Debug)]
pub enum Claim {
    /// It holds the key: run it, then [`IdempotencyService::complete`] or [`IdempotencyService::release`].
    Acquired(Ticket),
    /// The first request with this key and this request answered this: answer it again.
    Replay(SavedResponse),
    /// The first request with this key and this request is still running.
    InProgress,
    /// The key was used with another request.
    Mismatch,
}

/// A key held by the request that runs.
#[derive(Debug)]
pub struct Ticket {
    record: IdempotencyRecord,
    etag: ETag,
}

/// The rules above, on an [`IdempotencyRepository`].
#[derive(Clone)]
pub struct IdempotencyService {
    repository: Arc<dyn IdempotencyRepository>,
    clock: Arc<dyn Clock>,
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl IdempotencyService {
    pub fn new(repository: Arc<dyn IdempotencyRepository>, clock: Arc<dyn Clock>) -> Self {
        Self { repository, clock }
    }

    /// The digest of a request: its method, its path and query, its body.
    pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
        let mut hash = Sha256::new();
        for part in [method.as_bytes(), b"\n", path.as_bytes(), b"\n", body] {
            hash.update(part);
        }
        hex(hash.finalize())
    }

    /// Claims `key` of `tenant` for a request with `fingerprint` (see [`Claim`]).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn claim(&self, tenant: &TenantId, key: &str, fingerprint: String) -> Result<Claim, DomainError> {
        let key = hex(Sha256::digest(key.as_bytes()));
        let mut record = IdempotencyRecord { tenant_id: tenant.clone(), key, fingerprint, locked_until: None, response: None };
        // A record can vanish (expired, released) between the create and the read: try again.
        for _ in 0..3 {
            let now = self.clock.now();
            record.locked_until = Some(now + LEASE);
            match self.repository.create(&record, RETENTION).await {
                Ok(etag) => return Ok(Claim::Acquired(Ticket { record, etag })),
                Err(DomainError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
            let Some(stored) = self.repository.get(tenant, &record.key).await? else { continue };
            if stored.value.fingerprint != record.fingerprint {
                return Ok(Claim::Mismatch);
            }
            if let Some(response) = stored.value.response {
                return Ok(Claim::Replay(response));
            }
            if stored.value.locked_until.is_some_and(|until| until > now) {
                return Ok(Claim::InProgress);
            }
            // The first request's instance stopped before answering: take the key over.
            return match self.repository.replace(&record, &stored.etag, RETENTION).await {
                Ok(etag) => Ok(Claim::Acquired(Ticket { record, etag })),
                Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => Ok(Claim::InProgress),
                Err(e) => Err(e),
            };
        }
        Ok(Claim::InProgress)
    }

    /// Keeps the response of the request that held the key, for [`RETENTION`].
    ///
    /// # Errors
    /// When the store fails, or the key was taken over meanwhile (its lease ran out).
    pub async fn complete(&self, ticket: Ticket, response: SavedResponse) -> Result<(), DomainError> {
        let Ticket { mut record, etag } = ticket;
        record.locked_until = None;
        record.response = Some(response);
        self.repository.replace(&record, &etag, RETENTION).await.map(drop)
    }

    /// Gives the key up without a response (the request failed): a repetition runs again.
    ///
    /// # Errors
    /// When the store fails; a key already taken over or expired is not an error.
    pub async fn release(&self, ticket: Ticket) -> Result<(), DomainError> {
        match self.repository.delete(&ticket.record.tenant_id, &ticket.record.key, &ticket.etag).await {
            Ok(()) | Err(DomainError::NotFound { .. } | DomainError::PreconditionFailed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_method_path_and_body() {
        let base = IdempotencyService::fingerprint("POST", "/a", b"{}");
        assert_eq!(base, IdempotencyService::fingerprint("POST", "/a", b"{}"));
        assert_ne!(base, IdempotencyService::fingerprint("POST", "/b", b"{}"));
        assert_ne!(base, IdempotencyService::fingerprint("PUT", "/a", b"{}"));
        assert_ne!(base, IdempotencyService::fingerprint("POST", "/a", b"{ }"));
        assert_eq!(base.len(), 64);
    }
}
