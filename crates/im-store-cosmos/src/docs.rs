//! The documents this adapter stores: camelCase JSON with `id`, the partition key, a `type`
//! discriminator and a `schemaVersion`. Reads also take Cosmos' `_etag`.

use im_domain::connection::Connection;
use im_domain::events::DomainEvent;
use im_domain::integration::Integration;
use im_domain::provider::Provider;
use im_domain::webhooks::endpoint::Webhook;
use im_domain::{DomainError, ETag, Stored};
use serde::{Deserialize, Serialize};

use crate::errors::unexpected;

pub const SCHEMA_VERSION: u32 = 1;

/// The `type` of the documents of a domain value.
pub trait Kind {
    const TYPE: &'static str;
}

impl Kind for Integration {
    const TYPE: &'static str = "integration";
}

impl Kind for Connection {
    const TYPE: &'static str = "connection";
}

impl Kind for Provider {
    const TYPE: &'static str = "provider";
}

impl Kind for Webhook {
    const TYPE: &'static str = "webhook";
}

/// A domain value as a document: its `type`, the `schemaVersion`, and the value's own fields
/// beside them. Reads also take Cosmos' `_etag`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Doc<T> {
    #[serde(rename = "type")]
    pub kind: String,
    pub schema_version: u32,
    #[serde(flatten)]
    pub value: T,
    #[serde(rename = "_etag", default, skip_serializing)]
    pub etag: Option<String>,
}

impl<T> Doc<T> {
    /// `value` as a document of type `kind`.
    pub fn of(kind: &str, value: T) -> Self {
        Self { kind: kind.into(), schema_version: SCHEMA_VERSION, value, etag: None }
    }

    /// The value with the document's `_etag` (as a query returns it).
    ///
    /// # Errors
    /// `Unexpected` when the document has no `_etag`.
    pub fn stored(self) -> Result<Stored<T>, DomainError> {
        let etag = self.etag.as_deref().map(etag_to_domain).ok_or_else(|| unexpected("no _etag"))?;
        Ok(Stored { value: self.value, etag })
    }
}

impl<T: Kind> Doc<T> {
    pub const TYPE: &'static str = T::TYPE;

    pub fn new(value: T) -> Self {
        Self::of(T::TYPE, value)
    }
}

/// Every document's value with its `_etag`.
///
/// # Errors
/// `Unexpected` when one has no `_etag`.
pub fn stored_all<T>(docs: Vec<Doc<T>>) -> Result<Vec<Stored<T>>, DomainError> {
    docs.into_iter().map(Doc::stored).collect()
}

/// An integration in `integration_integrations` (partition key `/tenantId`).
pub type IntegrationDoc = Doc<Integration>;
/// A connection in `integration_connections` (partition key `/integrationId`).
pub type ConnectionDoc = Doc<Connection>;
/// A provider in `integration_providers` (partition key `/category`).
pub type ProviderDoc = Doc<Provider>;
/// A webhook endpoint in `integration_webhooks` (partition key `/tenantId`).
pub type WebhookDoc = Doc<Webhook>;

/// The partition of `integration_providers` that remembers seeded provider ids (not a valid
/// category, so it never mixes with providers).
pub const SEED_PARTITION: &str = "_seed";

/// Marks a built-in provider id as seeded once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedDoc {
    pub id: String,
    pub category: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub schema_version: u32,
    pub provider_id: String,
    pub seeded_at: i64,
}

impl SeedDoc {
    pub const TYPE: &'static str = "seed";

    pub fn id_for(provider_id: &str) -> String {
        format!("seed-{provider_id}")
    }
}

/// An outbox entry, in the partition (and container) of the change it describes. Its `type` is
/// `outbox` while it waits and `outbox-dead` once it is a dead letter. The event stays raw JSON
/// until the relay reads it, so that one entry this version cannot read fails alone.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxDoc {
    pub id: String,
    pub tenant_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub schema_version: u32,
    /// Unix milliseconds; the relay publishes oldest first.
    #[serde(default)]
    pub recorded_at: i64,
    pub event: serde_json::Value,
    /// The partition of an entry in a container partitioned by integration (connections);
    /// absent where the partition is the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integration_id: Option<String>,
    /// The relay holding the event, and until when (unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_until: Option<i64>,
    /// Failed tries to read or publish the event, and why the last one failed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it became a dead letter (unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<i64>,
    /// `-1`: never expires, whatever the default TTL of its container (deliveries expire;
    /// their events must not vanish unpublished).
    #[serde(default = "never_expires")]
    pub ttl: i64,
    #[serde(rename = "_etag", default, skip_serializing)]
    pub etag: Option<String>,
}

fn never_expires() -> i64 {
    -1
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl OutboxDoc {
    pub const TYPE: &'static str = "outbox";
    /// The `type` of a dead letter: every query for pending entries leaves it out.
    pub const DEAD_TYPE: &'static str = "outbox-dead";

    /// The partition-key value of the entry in its container.
    pub fn partition(&self) -> String {
        self.integration_id.clone().unwrap_or_else(|| self.tenant_id.clone())
    }

    pub fn id_for(id: &uuid::Uuid) -> String {
        format!("outbox-{id}")
    }

    pub fn new(event: &DomainEvent) -> Self {
        Self {
            id: Self::id_for(&event.id),
            tenant_id: event.tenant_id.to_string(),
            kind: Self::TYPE.into(),
            schema_version: SCHEMA_VERSION,
            recorded_at: (event.time.unix_timestamp_nanos() / 1_000_000) as i64,
            event: serde_json::to_value(event).unwrap_or_default(),
            integration_id: None,
            claimed_by: None,
            claimed_until: None,
            attempts: 0,
            last_error: None,
            dead_at: None,
            ttl: never_expires(),
            etag: None,
        }
    }

    /// The event id, from the document id.
    pub fn event_id(&self) -> Option<uuid::Uuid> {
        self.id.strip_prefix("outbox-").and_then(|id| uuid::Uuid::parse_str(id).ok())
    }
}

/// Cosmos etags come quoted (`"0000-..."`), some emulators' unquoted. The domain token is the
/// value without quotes, prefixed `q.` when Cosmos quoted it, so it can be sent back verbatim.
pub fn etag_to_domain(raw: &str) -> ETag {
    match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => ETag::new(format!("q.{inner}")),
        None => ETag::new(raw),
    }
}

/// The concurrency token of a write's response.
pub(crate) fn header_etag(etag: Option<&azure_core::http::Etag>) -> Result<ETag, DomainError> {
    etag.map(|e| etag_to_domain(e.as_ref()))
        .ok_or_else(|| DomainError::Unexpected(anyhow::anyhow!("cosmos: a write answered without an etag")))
}

pub fn etag_to_cosmos(etag: &ETag) -> String {
    match etag.as_str().strip_prefix("q.") {
        Some(inner) => format!("\"{inner}\""),
        None => etag.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_round_trip() {
        for raw in ["\"00000a00-0000-0000-0000-5f9a5c2c0000\"", "5b6c7d8e-unquoted"] {
            assert_eq!(etag_to_cosmos(&etag_to_domain(raw)), raw);
            assert!(!etag_to_domain(raw).as_str().contains('"'));
        }
    }
}
