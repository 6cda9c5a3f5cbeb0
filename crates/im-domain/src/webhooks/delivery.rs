//! Deliveries: one message to one endpoint, with every attempt recorded (kept 7 days).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use super::endpoint::WebhookId;
use crate::common::TenantId;
use crate::events::EventData;

/// How long delivery records are kept.
pub const DELIVERY_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// How long a scheduled attempt holds its delivery: a worker that dies mid-attempt leaves it
/// to another after this (longer than any attempt takes).
pub const ATTEMPT_LEASE: std::time::Duration = std::time::Duration::from_secs(120);
/// The text a store compares a stored hold's end (`leaseUntil`, RFC 3339 in UTC) with, `<=`,
/// to find the holds that ended before `before`: the second after it, so that every such hold
/// sorts at or before it as text (a fraction sorts before the whole second: `.5Z` < `Z`). A
/// few that end within that second pass too: the store tells them apart on the decoded value.
///
/// # Errors
/// When the time cannot be written as RFC 3339 (a year beyond 9999).
pub fn hold_text_cutoff(before: OffsetDateTime) -> Result<String, crate::DomainError> {
    let second_after =
        before.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).map_err(|e| crate::DomainError::Unexpected(e.into()))?
            + time::Duration::SECOND;
    second_after.format(&time::format_description::well_known::Rfc3339).map_err(|e| crate::DomainError::Unexpected(e.into()))
}

/// Attempts kept per delivery (each with at most a 4 KiB response excerpt).
pub const ATTEMPTS_KEPT: usize = 50;
/// Response bodies are recorded up to this many bytes.
pub const RESPONSE_EXCERPT_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its first attempt or a retry.
    Pending,
    Succeeded,
    /// Every attempt failed (or the endpoint answered 410 Gone).
    Failed,
    /// Recorded while the endpoint was disabled; can be recovered later.
    Skipped,
}

impl DeliveryStatus {
    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_value(Value::String(value.to_owned())).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptTrigger {
    Scheduled,
    Manual,
}

/// One HTTP attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub trigger: AttemptTrigger,
    /// The receiver's HTTP status, when it answered.
    pub status_code: Option<u16>,
    pub duration_ms: u64,
    /// The first 4 KiB of the response body.
    pub response_excerpt: Option<String>,
    /// Why the attempt failed, when it did.
    pub error: Option<String>,
}

/// A message to one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub webhook_id: WebhookId,
    /// The `webhook-id` header: the event id, the same on every retry.
    pub message_id: String,
    pub event_type: String,
    /// The CloudEvents document sent as the body, as the JSON text that is sent: stored, read
    /// back and sent as that text, never built as a tree of values (a tree was parsed, cloned
    /// for each endpoint, written out and dropped at every read and write of a delivery).
    pub payload: EventData,
    pub status: DeliveryStatus,
    /// The newest [`ATTEMPTS_KEPT`] attempts, oldest first.
    pub attempts: Vec<Attempt>,
    /// How many older attempts were made and no longer kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub older_attempts: u32,
    /// When the next scheduled attempt is due (pending deliveries).
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// While a scheduled attempt is in progress, the time until which its worker holds the
    /// delivery; another worker (a duplicate job, a replayed event) leaves it alone until then.
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Delivery {
    /// Records an attempt, keeping only the newest [`ATTEMPTS_KEPT`] (a stored delivery stays
    /// far below Cosmos DB's 2 MB item limit) and counting the older ones.
    pub fn record(&mut self, attempt: Attempt) {
        self.attempts.push(attempt);
        if self.attempts.len() > ATTEMPTS_KEPT {
            let dropped = self.attempts.len() - ATTEMPTS_KEPT;
            self.attempts.drain(..dropped);
            self.older_attempts = self.older_attempts.saturating_add(dropped as u32);
        }
    }
}

/// The deterministic id of the delivery of `event_id` to `webhook`: fanning the same event out
/// twice finds the delivery already there.
///
/// When the event id is a UUID version 7 (every event this service writes), the delivery id is
/// one too, with the event's time: the rest is the hash of the webhook and the event. Ids then
/// grow with time as the events' do, so a store's indexes of deliveries (and the embedded
/// delivery queue's key) take the deliveries of a batch at their end, a few pages for many
/// deliveries, instead of one page each at a random place (that was most of the disk writes of
/// a fan-out). Other event ids give the hash alone.
pub fn delivery_id(webhook: WebhookId, event_id: &str) -> Uuid {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{webhook}/{event_id}").as_bytes());
    match Uuid::try_parse(event_id).ok().filter(|event| event.get_version_num() == 7).and_then(|event| event.get_timestamp()) {
        Some(time) => {
            let (seconds, nanos) = time.to_unix();
            let mut rest = [0u8; 10];
            rest.copy_from_slice(&digest[..10]);
            uuid::Builder::from_unix_timestamp_millis(seconds * 1000 + u64::from(nanos / 1_000_000), &rest).into_uuid()
        }
        None => {
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            uuid::Builder::from_custom_bytes(bytes).into_uuid()
        }
    }
}

/// Filters of a delivery listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub event_type: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

impl DeliveryFilter {
    pub fn matches(&self, delivery: &Delivery) -> bool {
        self.status.is_none_or(|s| s == delivery.status)
            && self.event_type.as_ref().is_none_or(|t| *t == delivery.event_type)
            && self.since.is_none_or(|s| delivery.created_at >= s)
            && self.until.is_none_or(|u| delivery.created_at < u)
    }
}

/// What an attempt's outcome means for the delivery and the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Retry at the next step of the schedule, or after the receiver's `Retry-After` (bounded).
    Retry {
        retry_after: Option<std::time::Duration>,
    },
    /// 410 Gone: the receiver asks never to be called again.
    Gone,
}

/// Classifies an HTTP answer: only 2xx succeeds; 410 disables; 429 and 503 may name a wait.
pub fn classify(status: Option<u16>, retry_after: Option<std::time::Duration>) -> Outcome {
    match status {
        Some(s) if (200..300).contains(&s) => Outcome::Delivered,
        Some(410) => Outcome::Gone,
        Some(429 | 503) => Outcome::Retry { retry_after },
        _ => Outcome::Retry { retry_after: None },
    }
}

/// The wait before retry number `retry` (0-based) with ±20% jitter (`jitter` in [0, 1)), or
/// `None` when the schedule is exhausted. A receiver's `Retry-After` is honoured, clamped to
/// between the scheduled wait and one hour.
pub fn next_wait(
    schedule: &[std::time::Duration],
    retry: usize,
    jitter: f64,
    retry_after: Option<std::time::Duration>,
) -> Option<std::time::Duration> {
    let base = *schedule.get(retry)?;
    let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    let scheduled = base.mul_f64(factor);
    Some(match retry_after {
        Some(asked) => asked.clamp(scheduled, std::time::Duration::from_secs(3600).max(scheduled)),
        None => scheduled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_2xx_succeeds() {
        assert_eq!(classify(Some(200), None), Outcome::Delivered);
        assert_eq!(classify(Some(204), None), Outcome::Delivered);
        assert_eq!(classify(Some(301), None), Outcome::Retry { retry_after: None });
        assert_eq!(classify(Some(410), None), Outcome::Gone);
        assert_eq!(classify(Some(500), Some(Duration::from_secs(9))), Outcome::Retry { retry_after: None });
        assert_eq!(classify(Some(429), Some(Duration::from_secs(9))), Outcome::Retry { retry_after: Some(Duration::from_secs(9)) });
        assert_eq!(classify(None, None), Outcome::Retry { retry_after: None });
    }

    #[test]
    fn schedule_with_jitter_and_retry_after() {
        let schedule = [Duration::from_secs(5), Duration::from_secs(300)];
        assert_eq!(next_wait(&schedule, 0, 0.0, None), Some(Duration::from_secs(4)));
        assert_eq!(next_wait(&schedule, 0, 1.0, None), Some(Duration::from_secs(6)));
        assert_eq!(next_wait(&schedule, 2, 0.5, None), None, "exhausted");
        assert_eq!(next_wait(&schedule, 0, 0.5, Some(Duration::from_secs(60))), Some(Duration::from_secs(60)));
        assert_eq!(
            next_wait(&schedule, 0, 0.5, Some(Duration::from_millis(1))),
            Some(Duration::from_secs(5)),
            "never sooner than scheduled"
        );
        assert_eq!(next_wait(&schedule, 0, 0.5, Some(Duration::from_secs(99_999))), Some(Duration::from_secs(3600)), "bounded");
    }

    #[test]
    fn only_the_newest_attempts_are_kept_and_the_older_counted() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let mut delivery = Delivery {
            id: Uuid::nil(),
            tenant_id: TenantId::new("t").unwrap(),
            webhook_id: WebhookId(Uuid::nil()),
            message_id: "m".into(),
            event_type: "integration.created".into(),
            payload: EventData::default(),
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            older_attempts: 0,
            next_attempt_at: None,
            lease_until: None,
            created_at: at,
            updated_at: at,
        };
        for n in 0..(ATTEMPTS_KEPT as u64 + 7) {
            let attempt = Attempt {
                at,
                trigger: AttemptTrigger::Manual,
                status_code: Some(500),
                duration_ms: n,
                response_excerpt: Some("x".repeat(RESPONSE_EXCERPT_BYTES)),
                error: None,
            };
            delivery.record(attempt);
        }
        assert_eq!(delivery.attempts.len(), ATTEMPTS_KEPT);
        assert_eq!(delivery.older_attempts, 7);
        assert_eq!(delivery.attempts[0].duration_ms, 7, "the oldest went first");
        assert!(serde_json::to_vec(&delivery).unwrap().len() < 2 * 1024 * 1024 / 4, "far below Cosmos DB's item limit");
    }

    #[test]
    fn delivery_ids_are_deterministic() {
        let w = WebhookId(Uuid::nil());
        assert_eq!(delivery_id(w, "e1"), delivery_id(w, "e1"));
        assert_ne!(delivery_id(w, "e1"), delivery_id(w, "e2"));
    }

    #[test]
    fn every_hold_that_ended_before_a_time_sorts_at_or_before_its_cutoff_as_text() {
        let text = |t: OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap();
        let base = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        for before_ns in [0i64, 1, 500_000_000, 999_999_999] {
            let before = base + time::Duration::nanoseconds(before_ns);
            let cutoff = hold_text_cutoff(before).unwrap();
            for lease_ns in [-2_000_000_000i64, -1_000_000_000, -500_000_000, -1, 0, 1, 999_999_999, 1_000_000_000, 2_500_000_000] {
                let lease = base + time::Duration::nanoseconds(lease_ns);
                if lease < before {
                    assert!(text(lease) <= cutoff, "{} ended before {} but sorts after {cutoff}", text(lease), text(before));
                }
                if lease >= before + time::Duration::SECOND * 2 {
                    assert!(text(lease) > cutoff, "{} sorts before {cutoff}", text(lease));
                }
            }
        }
        assert_eq!(hold_text_cutoff(base).unwrap(), "2027-01-15T08:00:01Z");
    }

    #[test]
    fn the_deliveries_of_a_time_ordered_event_are_ordered_by_its_time() {
        let (w1, w2) = (WebhookId(Uuid::from_u128(1)), WebhookId(Uuid::from_u128(2)));
        let at = |ms: u64| uuid::Builder::from_unix_timestamp_millis(ms, &[0xab; 10]).into_uuid().to_string();
        let (earlier, later) = (at(1_764_000_000_000), at(1_764_000_000_001));
        let id = delivery_id(w1, &earlier);
        assert_eq!(id, delivery_id(w1, &earlier), "deterministic");
        assert_ne!(id, delivery_id(w2, &earlier), "one per endpoint");
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.as_bytes()[..6], Uuid::parse_str(&earlier).unwrap().as_bytes()[..6], "the event's time");
        for w in [w1, w2] {
            assert!(delivery_id(w, &earlier).to_string() < delivery_id(w1, &later).to_string(), "ordered as text too");
            assert!(delivery_id(w, &earlier).to_string() < delivery_id(w2, &later).to_string());
        }
        let v4 = "6f1c2b9e-8d4a-4c3e-9b1a-2f3e4d5c6b7a";
        assert_eq!(delivery_id(w1, v4).get_version_num(), 8, "other ids: the hash alone (a custom UUID), as before");
    }
}
