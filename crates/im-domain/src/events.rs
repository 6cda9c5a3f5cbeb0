//! Domain events: what happened, recorded atomically with the change it describes (the
//! transactional outbox) and published at least once, as CloudEvents 1.0.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::common::TenantId;

pub mod payloads;

/// The events this service publishes. The routing key on the bus is the event name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "integration.created")]
    IntegrationCreated,
    #[serde(rename = "integration.updated")]
    IntegrationUpdated,
    #[serde(rename = "integration.deleted")]
    IntegrationDeleted,
    #[serde(rename = "webhook.delivered")]
    WebhookDelivered,
    #[serde(rename = "webhook.failed")]
    WebhookFailed,
    #[serde(rename = "sync.task.completed")]
    SyncTaskCompleted,
    /// A sync task was paused by the service after consecutive failed runs.
    #[serde(rename = "sync.task.paused")]
    SyncTaskPaused,
    /// An endpoint was disabled by the service (410 Gone, or failing for too long).
    #[serde(rename = "webhook.endpoint.disabled")]
    WebhookEndpointDisabled,
    #[serde(rename = "integration.connection.created")]
    ConnectionCreated,
    #[serde(rename = "integration.connection.deleted")]
    ConnectionDeleted,
    /// A connection stopped working (a refused refresh, a failed test or authorization).
    #[serde(rename = "integration.connection.failed")]
    ConnectionFailed,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::IntegrationCreated,
        EventType::IntegrationUpdated,
        EventType::IntegrationDeleted,
        EventType::WebhookDelivered,
        EventType::WebhookFailed,
        EventType::SyncTaskCompleted,
        EventType::SyncTaskPaused,
        EventType::WebhookEndpointDisabled,
        EventType::ConnectionCreated,
        EventType::ConnectionDeleted,
        EventType::ConnectionFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::IntegrationCreated => "integration.created",
            EventType::IntegrationUpdated => "integration.updated",
            EventType::IntegrationDeleted => "integration.deleted",
            EventType::WebhookDelivered => "webhook.delivered",
            EventType::WebhookFailed => "webhook.failed",
            EventType::SyncTaskCompleted => "sync.task.completed",
            EventType::SyncTaskPaused => "sync.task.paused",
            EventType::WebhookEndpointDisabled => "webhook.endpoint.disabled",
            EventType::ConnectionCreated => "integration.connection.created",
            EventType::ConnectionDeleted => "integration.connection.deleted",
            EventType::ConnectionFailed => "integration.connection.failed",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event. `id` is unique: consumers drop duplicates by it (publication is at least once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainEvent {
    pub id: Uuid,
    pub event_type: EventType,
    pub tenant_id: TenantId,
    /// The id of the resource the event is about.
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The event's payload (one of the types of [`payloads`]), as JSON; never secret values.
    pub data: Value,
}

/// The CloudEvents `source` of every event of this service.
pub const EVENT_SOURCE: &str = "/integration-manager";

impl DomainEvent {
    /// The event as a CloudEvents 1.0 structured-mode JSON document.
    pub fn cloud_event(&self) -> Value {
        json!({
            "specversion": "1.0",
            "id": self.id.to_string(),
            "source": EVENT_SOURCE,
            "type": self.event_type.as_str(),
            "subject": self.subject,
            "time": self.time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "datacontenttype": "application/json",
            "tenantid": self.tenant_id.as_str(),
            "data": self.data,
        })
    }
}

/// Outbox statistics, for readiness and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Events waiting to be published (dead letters excluded).
    pub pending: u64,
    /// When the oldest pending event was recorded.
    pub oldest: Option<OffsetDateTime>,
    /// Events set aside after too many failed tries, waiting for an administrator.
    pub dead_letters: u64,
}

/// An outbox entry whose stored form this version cannot read (a damaged entry, or one written
/// by a newer version). It is handed out by id so that its failed tries are counted too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableEntry {
    pub id: Uuid,
    /// Why it cannot be read (a decoding error; never the entry's content).
    pub reason: String,
}

/// What [`crate::ports::Outbox::claim`] handed out: readable events, oldest first, and the
/// entries it could not read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claimed {
    pub events: Vec<DomainEvent>,
    pub unreadable: Vec<UnreadableEntry>,
}

impl Claimed {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.unreadable.is_empty()
    }
}

/// An outbox entry set aside after `max_attempts` failed tries to read or publish it. It
/// blocks nothing; an administrator lists it and puts it back (`Outbox::requeue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event's id.
    pub id: Uuid,
    /// The event's type and tenant, when the entry can be read that far.
    pub event_type: Option<String>,
    pub tenant_id: Option<String>,
    /// Failed tries so far.
    pub attempts: u32,
    /// Why the last try failed.
    pub last_error: String,
    /// When the event was recorded, and when it was set aside.
    pub recorded_at: OffsetDateTime,
    pub dead_at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }

    #[test]
    fn cloud_event_envelope() {
        let event = DomainEvent {
            id: Uuid::nil(),
            event_type: EventType::IntegrationCreated,
            tenant_id: TenantId::new("acme").unwrap(),
            subject: "abc".into(),
            time: OffsetDateTime::UNIX_EPOCH,
            data: json!({"id": "abc"}),
        };
        let ce = event.cloud_event();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "integration.created");
        assert_eq!(ce["tenantid"], "acme");
        assert_eq!(ce["time"], "1970-01-01T00:00:00Z");
        assert_eq!(ce["data"]["id"], "abc");
    }
}
