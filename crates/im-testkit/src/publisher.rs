//! The contract of the [`EventPublisher`] port: `Ok` means every event reached the consumers,
//! in the order of the batch; a destination that cannot take them is `Unavailable`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::events::{DomainEvent, EventType};
use im_domain::ports::EventPublisher;

use crate::fresh_tenant;

/// What a consumer of the published events (a subscriber, a queue bound to the exchange) saw.
#[async_trait]
pub trait Observer: Send {
    /// The ids of the events received since the last call, in order of arrival, waiting up to
    /// `wait` for `count` of them.
    async fn received(&mut self, count: usize, wait: Duration) -> Vec<uuid::Uuid>;
}

/// An event publisher adapter under test.
#[async_trait]
pub trait PublisherBackend: Send + Sync {
    /// A publisher, and an observer of everything it publishes, that no other check shares.
    async fn connected(&self) -> (Arc<dyn EventPublisher>, Box<dyn Observer>);

    /// A publisher whose destination cannot take events (broker unreachable, a subscriber failing).
    async fn failing(&self) -> Arc<dyn EventPublisher>;
}

/// An event of a tenant no other check uses.
pub fn fresh_event(event_type: EventType) -> DomainEvent {
    DomainEvent {
        id: uuid::Uuid::now_v7(),
        event_type,
        tenant_id: fresh_tenant(),
        subject: uuid::Uuid::now_v7().to_string(),
        time: crate::timestamp(),
        data: serde_json::json!({"name": "conformance"}).into(),
    }
}

/// Runs every check of the event publisher contract.
pub async fn contract(backend: &dyn PublisherBackend) {
    every_event_is_seen_in_batch_order(backend).await;
    an_empty_batch_is_confirmed(backend).await;
    a_failure_is_unavailable(backend).await;
}

/// Once `publish` returned `Ok`, the consumer sees each event of the batch, once, in order.
pub async fn every_event_is_seen_in_batch_order(backend: &dyn PublisherBackend) {
    let (publisher, mut observer) = backend.connected().await;
    let first = vec![
        fresh_event(EventType::IntegrationCreated),
        fresh_event(EventType::IntegrationUpdated),
        fresh_event(EventType::WebhookDelivered),
        fresh_event(EventType::IntegrationDeleted),
    ];
    let second = vec![fresh_event(EventType::IntegrationCreated), fresh_event(EventType::IntegrationDeleted)];
    // A batch as large as a busy relay's round: an adapter that sends a batch's events
    // together keeps their order too.
    let third: Vec<_> = (0..200).map(|_| fresh_event(EventType::IntegrationUpdated)).collect();
    publisher.publish(&first).await.unwrap_or_else(|e| panic!("publish MUST confirm a batch the destination takes: {e}"));
    publisher.publish(&second).await.unwrap_or_else(|e| panic!("publish MUST confirm the next batch: {e}"));
    publisher.publish(&third).await.unwrap_or_else(|e| panic!("publish MUST confirm a large batch: {e}"));
    let expected: Vec<_> = first.iter().chain(&second).chain(&third).map(|e| e.id).collect();
    let seen = observer.received(expected.len(), Duration::from_secs(5)).await;
    assert_eq!(seen, expected, "the consumer MUST see every confirmed event once, in the order of its batch");
    let more = observer.received(1, Duration::from_millis(300)).await;
    assert!(more.is_empty(), "nothing MUST arrive that was not published: {more:?}");
}

/// An empty batch is confirmed without reaching anyone.
pub async fn an_empty_batch_is_confirmed(backend: &dyn PublisherBackend) {
    let (publisher, mut observer) = backend.connected().await;
    publisher.publish(&[]).await.unwrap_or_else(|e| panic!("an empty batch MUST be confirmed: {e}"));
    assert!(observer.received(1, Duration::from_millis(300)).await.is_empty(), "an empty batch MUST deliver nothing");
}

/// A destination that cannot take the events is `Unavailable` (the relay keeps them and tries
/// again), never `Ok` and never another error.
pub async fn a_failure_is_unavailable(backend: &dyn PublisherBackend) {
    let publisher = backend.failing().await;
    let events = [fresh_event(EventType::IntegrationCreated), fresh_event(EventType::IntegrationUpdated)];
    let result = publisher.publish(&events).await;
    assert!(matches!(result, Err(DomainError::Unavailable { .. })), "a failed publish MUST be Unavailable, got {result:?}");
}

/// The in-process bus ([`im_domain::services::InProcessBus`]) as a publisher backend: the
/// observer is a subscriber that records what it handles.
#[derive(Debug, Default, Clone, Copy)]
pub struct InProcess;

#[derive(Default)]
struct Recorder {
    seen: tokio::sync::Mutex<Vec<uuid::Uuid>>,
    arrived: tokio::sync::Notify,
}

#[async_trait]
impl im_domain::ports::EventSubscriber for Recorder {
    async fn handle(&self, event: &DomainEvent) -> Result<(), DomainError> {
        self.seen.lock().await.push(event.id);
        self.arrived.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Observer for Arc<Recorder> {
    async fn received(&mut self, count: usize, wait: Duration) -> Vec<uuid::Uuid> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            let mut seen = self.seen.lock().await;
            if seen.len() >= count {
                return seen.drain(..count).collect();
            }
            drop(seen);
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return std::mem::take(&mut *self.seen.lock().await);
            }
        }
    }
}

/// A subscriber that cannot handle anything (its store is away, say).
struct Broken;

#[async_trait]
impl im_domain::ports::EventSubscriber for Broken {
    async fn handle(&self, _event: &DomainEvent) -> Result<(), DomainError> {
        Err(DomainError::Unexpected(anyhow::anyhow!("the subscriber's store refused the write")))
    }
}

#[async_trait]
impl PublisherBackend for InProcess {
    async fn connected(&self) -> (Arc<dyn EventPublisher>, Box<dyn Observer>) {
        let bus = im_domain::services::InProcessBus::new();
        let recorder = Arc::new(Recorder::default());
        bus.subscribe(recorder.clone());
        (Arc::new(bus), Box::new(recorder))
    }

    async fn failing(&self) -> Arc<dyn EventPublisher> {
        let bus = im_domain::services::InProcessBus::new();
        bus.subscribe(Arc::new(Recorder::default()));
        bus.subscribe(Arc::new(Broken));
        Arc::new(bus)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_in_process_bus_passes_the_publisher_contract() {
        super::contract(&super::InProcess).await;
    }
}
