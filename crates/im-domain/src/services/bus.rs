use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::error::DomainError;
use crate::events::{DomainEvent, EventType};
use crate::ports::{EventPublisher, EventReaders, EventSubscriber};

/// The embedded event bus: publishing hands the events to each subscriber in this process and
/// succeeds only once all of them handled every event, so the outbox keeps an event until
/// every subscriber has it (at least once, like the broker). A subscriber's failure is
/// [`DomainError::Unavailable`], as the port demands: the relay keeps the events and tries again.
///
/// Its readers ([`EventReaders`]) are its subscribers: with no broker, an event type none of
/// them wants (`webhook.delivered` for the webhook fan-out) need not be written, nor one that
/// only the webhook fan-out wants for a tenant without webhook endpoints.
#[derive(Default)]
pub struct InProcessBus {
    subscribers: RwLock<Vec<Arc<dyn EventSubscriber>>>,
}

impl std::fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessBus").finish_non_exhaustive()
    }
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn subscribe(&self, subscriber: Arc<dyn EventSubscriber>) {
        self.subscribers.write().unwrap_or_else(|p| p.into_inner()).push(subscriber);
    }
}

impl EventReaders for InProcessBus {
    fn reads(&self, event_type: EventType) -> bool {
        self.subscribers.read().unwrap_or_else(|p| p.into_inner()).iter().any(|s| s.wants(event_type))
    }

    /// Some subscriber wants the type, and each that does acts only for tenants with webhooks.
    fn only_for_tenants_with_webhooks(&self, event_type: EventType) -> bool {
        let subscribers = self.subscribers.read().unwrap_or_else(|p| p.into_inner());
        let mut readers = subscribers.iter().filter(|s| s.wants(event_type)).peekable();
        readers.peek().is_some() && readers.all(|s| s.only_for_tenants_with_webhooks())
    }
}

#[async_trait]
impl EventPublisher for InProcessBus {
    async fn publish(&self, events: &[DomainEvent]) -> Result<(), DomainError> {
        let subscribers = self.subscribers.read().unwrap_or_else(|p| p.into_inner()).clone();
        for subscriber in &subscribers {
            subscriber.handle_all(events).await.map_err(|e| match e {
                DomainError::Unavailable { .. } => e,
                other => DomainError::unavailable(format!("an in-process subscriber could not handle the events: {other:#}")),
            })?;
        }
        Ok(())
    }
}
