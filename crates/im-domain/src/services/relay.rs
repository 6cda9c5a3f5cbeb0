use std::sync::Arc;

use crate::error::DomainError;
use crate::ports::{EventPublisher, Outbox};

/// How long a relay holds the events it took: longer than a publish takes; a relay that died
/// leaves its events to the others after this.
pub const CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Moves events from the outbox to the publisher: claim them (so that another instance's relay
/// leaves them alone), publish, and only once that is confirmed, mark them published. A crash
/// anywhere in between publishes again once the claim ends (at least once); nothing is ever lost.
#[derive(Clone)]
pub struct EventRelay {
    outbox: Arc<dyn Outbox>,
    publisher: Arc<dyn EventPublisher>,
    /// This relay's name in its claims.
    owner: String,
}

impl std::fmt::Debug for EventRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRelay").finish_non_exhaustive()
    }
}

impl EventRelay {
    pub fn new(outbox: Arc<dyn Outbox>, publisher: Arc<dyn EventPublisher>) -> Self {
        Self { outbox, publisher, owner: uuid::Uuid::new_v4().to_string() }
    }

    /// Relays up to `batch` pending events; returns how many were published.
    ///
    /// # Errors
    /// When the outbox cannot be read or the publisher does not confirm; nothing is marked then.
    pub async fn relay_once(&self, batch: u32) -> Result<usize, DomainError> {
        let events = self.outbox.claim(&self.owner, batch, CLAIM_LEASE).await?;
        if events.is_empty() {
            return Ok(0);
        }
        self.publisher.publish(&events).await?;
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        self.outbox.mark_published(&ids).await?;
        Ok(ids.len())
    }

    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.outbox
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;
    use crate::events::{DomainEvent, EventType};
    use crate::ports::{MockEventPublisher, MockOutbox};
    use crate::services::block_on;

    fn event() -> DomainEvent {
        DomainEvent {
            id: uuid::Uuid::new_v4(),
            event_type: EventType::IntegrationCreated,
            tenant_id: TenantId::new("t").unwrap(),
            subject: "s".into(),
            time: time::OffsetDateTime::UNIX_EPOCH,
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn nothing_is_marked_when_publishing_fails() {
        let mut outbox = MockOutbox::new();
        let events = vec![event(), event()];
        let returned = events.clone();
        outbox.expect_claim().returning(move |_, _, _| Ok(returned.clone()));
        outbox.expect_mark_published().never();
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().returning(|_| Err(DomainError::unavailable("broker down")));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        let result = block_on(relay.relay_once(10));
        assert!(matches!(result, Err(DomainError::Unavailable { .. })));
    }

    #[test]
    fn published_events_are_marked() {
        let mut outbox = MockOutbox::new();
        let events = vec![event(), event()];
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let returned = events.clone();
        outbox.expect_claim().returning(move |_, _, _| Ok(returned.clone()));
        outbox.expect_mark_published().withf(move |marked| marked == ids.as_slice()).times(1).returning(|_| Ok(()));
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().withf(move |published| published == events.as_slice()).times(1).returning(|_| Ok(()));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        assert_eq!(block_on(relay.relay_once(10)).unwrap(), 2);
    }
}
