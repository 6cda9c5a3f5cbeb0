//! Domain events: what happened, recorded atomically with the change it describes (the
//! transactional outbox) and published at least once, as CloudEvents 1.0.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
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
    pub data: EventData,
}

/// An event's payload as JSON text, written once where the event is made: stored, published
/// and delivered as that text, never built as a tree of values to be written out again (an
/// event recorded with a create cost more than the create's own document did). Equality is
/// that of the JSON values, whatever the spacing or the order of members.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventData(Box<RawValue>);

impl EventData {
    /// The JSON text of `data`.
    ///
    /// # Errors
    /// As `serde_json::to_string` (a map with keys that are not strings, a failing `Serialize`).
    pub fn of<T: Serialize + ?Sized>(data: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(data).map(Self)
    }

    /// The JSON text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The payload as a JSON value (parsed at each call).
    #[must_use]
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    /// The member of a payload that is an object named by the first of `keys` it has, if that
    /// member is a string ([`str_member`]).
    #[must_use]
    pub fn str_member(&self, keys: &[&str]) -> Option<String> {
        str_member(self.0.get(), keys)
    }
}

/// The member of the JSON object `text` named by the first of `keys` it has, if that member is
/// a string. Read in one pass, the other members skipped, not built; the reading stops at a
/// member named by the first key (none after it can rank higher), so what follows it, a
/// payload say, is not scanned.
#[must_use]
pub fn str_member(text: &str, keys: &[&str]) -> Option<String> {
    use serde::de::{DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};

    /// A member's name as its rank among the keys (`None`: not one of them), told without
    /// copying the name.
    struct Rank<'k>(&'k [&'k str]);
    impl<'de> DeserializeSeed<'de> for Rank<'_> {
        type Value = Option<usize>;
        fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Option<usize>, D::Error> {
            deserializer.deserialize_identifier(self)
        }
    }
    impl Visitor<'_> for Rank<'_> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a member's name")
        }
        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Option<usize>, E> {
            Ok(self.0.iter().position(|key| *key == name))
        }
    }
    /// Reads the members, keeping the best-ranked one's rank and value (if a string) in `found`.
    struct Members<'a, 'k> {
        keys: &'k [&'k str],
        found: &'a mut Option<(usize, Option<String>)>,
    }
    impl<'de> Visitor<'de> for Members<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<(), A::Error> {
            while let Some(rank) = members.next_key_seed(Rank(self.keys))? {
                match rank {
                    Some(rank) if self.found.as_ref().is_none_or(|(best, _)| rank < *best) => {
                        let value: &'de RawValue = members.next_value()?;
                        *self.found = Some((rank, serde_json::from_str(value.get()).ok()));
                        if rank == 0 {
                            return Ok(());
                        }
                    }
                    _ => {
                        members.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
    }
    let mut found = None;
    let read = serde_json::Deserializer::from_str(text).deserialize_map(Members { keys, found: &mut found });
    match read {
        Ok(()) => found.and_then(|(_, value)| value),
        // Stopping at the first key's member leaves the object's end unread, which the parser
        // then reports; any other failure is text that is not a whole JSON object.
        Err(_) => match found {
            Some((0, value)) => value,
            _ => None,
        },
    }
}

impl Default for EventData {
    /// `null`.
    fn default() -> Self {
        Self(RawValue::NULL.to_owned())
    }
}

impl From<Value> for EventData {
    fn from(value: Value) -> Self {
        // A value's text: `to_raw_value` cannot fail on it (its map keys are strings).
        Self::of(&value).unwrap_or_default()
    }
}

impl PartialEq for EventData {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

impl PartialEq<Value> for EventData {
    fn eq(&self, other: &Value) -> bool {
        self.to_value() == *other
    }
}

impl fmt::Debug for EventData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The CloudEvents `source` of every event of this service.
pub const EVENT_SOURCE: &str = "/integration-manager";

impl DomainEvent {
    /// The event as a CloudEvents 1.0 structured-mode JSON document.
    pub fn cloud_event(&self) -> Value {
        serde_json::to_value(self.envelope()).unwrap_or(Value::Null)
    }

    /// The event as a CloudEvents 1.0 structured-mode document, as JSON text (its data copied
    /// as text, not built as a tree first): the body of the event's webhook deliveries.
    #[must_use]
    pub fn cloud_event_text(&self) -> EventData {
        // The envelope's members are strings, a time and JSON text: writing it cannot fail.
        EventData::of(&self.envelope()).unwrap_or_default()
    }

    /// The event's CloudEvents 1.0 structured-mode document, to be written out as it is (its
    /// data copied as text, not built as a tree first).
    pub fn envelope(&self) -> CloudEvent<'_> {
        CloudEvent {
            specversion: "1.0",
            id: self.id,
            source: EVENT_SOURCE,
            event_type: self.event_type.as_str(),
            subject: &self.subject,
            time: self.time,
            datacontenttype: "application/json",
            tenantid: self.tenant_id.as_str(),
            data: &self.data,
        }
    }
}

/// A [`DomainEvent`] as a CloudEvents 1.0 structured-mode document ([`DomainEvent::envelope`]).
#[derive(Debug, Serialize)]
pub struct CloudEvent<'a> {
    pub specversion: &'static str,
    pub id: Uuid,
    pub source: &'static str,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub subject: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub datacontenttype: &'static str,
    pub tenantid: &'a str,
    pub data: &'a EventData,
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
    use serde_json::json;

    #[test]
    fn names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }

    fn event(data: EventData) -> DomainEvent {
        DomainEvent {
            id: Uuid::nil(),
            event_type: EventType::IntegrationCreated,
            tenant_id: TenantId::new("acme").unwrap(),
            subject: "abc".into(),
            time: OffsetDateTime::UNIX_EPOCH,
            data,
        }
    }

    #[test]
    fn cloud_event_envelope() {
        let event = event(json!({"id": "abc"}).into());
        let ce = event.cloud_event();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "integration.created");
        assert_eq!(ce["tenantid"], "acme");
        assert_eq!(ce["time"], "1970-01-01T00:00:00Z");
        assert_eq!(ce["data"]["id"], "abc");
    }

    #[test]
    fn event_data_is_kept_as_written_and_compared_as_json() {
        let data = EventData::of(&json!({"id": "abc", "n": 1.5, "nested": {"a": [1, 2]}})).unwrap();
        assert_eq!(data.as_str(), r#"{"id":"abc","n":1.5,"nested":{"a":[1,2]}}"#);
        let event = event(data);
        // Written out with the text as it is, read back from text and from a value alike.
        let text = serde_json::to_string(&event).unwrap();
        assert!(text.contains(r#""data":{"id":"abc","n":1.5,"nested":{"a":[1,2]}}"#), "{text}");
        let read: DomainEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(read.data.as_str(), event.data.as_str());
        let from_value: DomainEvent = serde_json::from_value(serde_json::to_value(&event).unwrap()).unwrap();
        assert_eq!(from_value, event);
        let envelope = serde_json::to_string(&event.envelope()).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&envelope).unwrap(), event.cloud_event());
        assert!(envelope.ends_with(r#","data":{"id":"abc","n":1.5,"nested":{"a":[1,2]}}}"#), "{envelope}");

        // Equal as JSON values, whatever the spacing and the order of members.
        let spaced: EventData = serde_json::from_str(r#"{ "nested": {"a": [1, 2]}, "n": 1.5, "id": "abc" }"#).unwrap();
        assert_eq!(spaced, event.data);
        assert_eq!(spaced, json!({"id": "abc", "n": 1.5, "nested": {"a": [1, 2]}}));
        assert_ne!(spaced, EventData::from(json!({"id": "abd", "n": 1.5, "nested": {"a": [1, 2]}})));
        assert_eq!(EventData::default(), Value::Null);
    }

    #[test]
    fn a_member_of_event_data_is_read_as_a_string_only() {
        let data: EventData =
            serde_json::from_str(r#"{"id": "i-1", "integrationId": "with \"quotes\" \u00e9", "n": 2, "o": {"id": "inner"}}"#).unwrap();
        assert_eq!(data.str_member(&["id"]).as_deref(), Some("i-1"));
        assert_eq!(data.str_member(&["integrationId", "id"]).as_deref(), Some("with \"quotes\" \u{e9}"), "the first key it has");
        assert_eq!(data.str_member(&["missing", "id"]).as_deref(), Some("i-1"), "the next key when the first is missing");
        assert_eq!(data.str_member(&["n", "id"]), None, "the first key it has is not a string");
        assert_eq!(data.str_member(&["o"]), None, "not a string");
        assert_eq!(data.str_member(&["missing"]), None);
        let escaped_key: EventData = serde_json::from_str(r#"{"k\u0065y": "v", "id": "x"}"#).unwrap();
        assert_eq!(escaped_key.str_member(&["key"]).as_deref(), Some("v"), "a key written with an escape");
        assert_eq!(EventData::from(json!(["id"])).str_member(&["id"]), None, "not an object");

        // The first key's member ends the reading: what follows it is not read.
        assert_eq!(str_member(r#"{"a": 1, "id": "i-2", "rest": [unread"#, &["id"]).as_deref(), Some("i-2"));
        assert_eq!(str_member(r#"{"id": 5, "rest": [unread"#, &["id", "a"]), None, "the first key's member is not a string");
        // Another key's member does not: the text is read to its end, and must be whole.
        assert_eq!(str_member(r#"{"a": "x", "rest": 1}"#, &["id", "a"]).as_deref(), Some("x"));
        assert_eq!(str_member(r#"{"a": "x", "rest": [unread"#, &["id", "a"]), None, "the text is not a whole object");
        assert_eq!(str_member(r#"{"a": "x", "id": "i-3", "a": "y"}"#, &["id", "a"]).as_deref(), Some("i-3"), "a later first key wins");
        assert_eq!(str_member("not json", &["id"]), None);
    }
}
