//! Secrets (connection credentials, webhook signing secrets) live in a secret store; our
//! database keeps only a [`SecretRef`].

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::common::TenantId;
use crate::error::DomainError;

/// A secret's namespaced name: `integration-manager/{tenantId}/{kind}/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretName(String);

impl SecretName {
    /// `kind` and `id` are slugs or UUIDs of ours (never caller text).
    pub fn new(tenant: &TenantId, kind: &str, id: &str) -> Self {
        Self(format!("integration-manager/{tenant}/{kind}/{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a secret is: what our database stores instead of the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    pub secret_name: SecretName,
    pub version: String,
}

/// A secret value (JSON). `Debug` never shows it.
#[derive(Clone, PartialEq)]
pub struct SecretValue(pub serde_json::Value);

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// The platform's Secret Management service, or a local encrypted store.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Stores a new version of `name` and returns its reference.
    ///
    /// # Errors
    /// MUST return [`DomainError::Unavailable`] when the store cannot be reached (after its own
    /// retries), having stored nothing the caller will reference.
    async fn put(&self, name: &SecretName, value: &SecretValue, metadata: &BTreeMap<String, String>) -> Result<SecretRef, DomainError>;

    /// Reads the referenced version.
    ///
    /// # Errors
    /// MUST return [`DomainError::NotFound`] when the name or version does not exist.
    async fn get(&self, reference: &SecretRef) -> Result<SecretValue, DomainError>;

    /// Deletes every version of `name`. MUST succeed when it does not exist.
    async fn delete(&self, name: &SecretName) -> Result<(), DomainError>;

    /// Deletes the versions of `current.secret_name` issued before `current.version`, keeping
    /// that version and any issued after it (a newer one may be about to be referenced).
    /// Called once a document references `current`, so what it deletes is referenced by
    /// nothing; it is idempotent and cumulative: a prune that never ran (the process died after
    /// the new version was written) is made up for by the next one, or by [`SecretStore::delete`].
    ///
    /// # Errors
    /// MUST succeed when `current` or its name does not exist (nothing older is kept then);
    /// MUST return [`DomainError::Unavailable`] when the store cannot be reached.
    async fn prune(&self, current: &SecretRef) -> Result<(), DomainError>;
}
