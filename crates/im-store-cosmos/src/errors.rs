//! SDK errors to domain errors, inside the adapter.

use std::time::Duration;

use azure_data_cosmos::CosmosError;
use im_domain::DomainError;

/// Anything the store cannot classify: a decoding failure, a missing etag, a malformed query.
pub(crate) fn unexpected(e: impl std::fmt::Display) -> DomainError {
    DomainError::Unexpected(anyhow::anyhow!("cosmos: {e}"))
}

/// The HTTP status of an SDK error (0 when the request never got an answer).
pub(crate) fn status(error: &CosmosError) -> u16 {
    u16::from(error.status())
}

/// Maps an SDK error. `resource` and `id` name what a 404 is about.
pub(crate) fn map(error: CosmosError, resource: &'static str, id: &str) -> DomainError {
    let code = status(&error);
    match code {
        404 => DomainError::not_found(resource, id),
        409 => DomainError::Conflict(format!("a {resource} with id '{id}' already exists")),
        412 => DomainError::PreconditionFailed,
        429 => {
            let retry_after = error.response().and_then(|r| r.headers().retry_after_ms).map(Duration::from_millis);
            DomainError::Unavailable {
                reason: "Cosmos DB is throttling requests (429) beyond the retry budget".into(),
                retry_after: Some(retry_after.unwrap_or(Duration::from_secs(1)).max(Duration::from_secs(1))),
            }
        }
        408 | 449 | 500..=599 => {
            DomainError::Unavailable { reason: format!("Cosmos DB answered {code}"), retry_after: Some(Duration::from_secs(1)) }
        }
        _ if !error.is_from_wire() => DomainError::unavailable(format!("Cosmos DB cannot be reached: {error}")),
        _ => DomainError::Unexpected(anyhow::anyhow!("Cosmos DB refused a request ({code}): {error}")),
    }
}

/// A timeout of our own around an SDK call.
pub(crate) fn timed_out(what: &str) -> DomainError {
    DomainError::Unavailable { reason: format!("Cosmos DB did not answer {what} in time"), retry_after: Some(Duration::from_secs(1)) }
}

/// The status of a failed transactional batch: the failing operation's own code (the others
/// carry 424 Failed Dependency).
pub(crate) fn batch_failure(codes: &[u16], resource: &'static str, id: &str) -> DomainError {
    let code = codes.iter().copied().find(|c| *c != 424 && *c >= 400).unwrap_or(500);
    match code {
        404 => DomainError::not_found(resource, id),
        409 => DomainError::Conflict(format!("a {resource} with id '{id}' already exists")),
        412 => DomainError::PreconditionFailed,
        429 => {
            DomainError::Unavailable { reason: "Cosmos DB is throttling requests (429)".into(), retry_after: Some(Duration::from_secs(1)) }
        }
        500..=599 => DomainError::unavailable(format!("Cosmos DB answered {code} to a batch")),
        _ => DomainError::Unexpected(anyhow::anyhow!("Cosmos DB refused a batch operation with {code}")),
    }
}
