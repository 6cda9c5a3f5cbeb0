//! The publisher against the real RabbitMQ of this machine (required in CI).

use std::time::Duration;

use im_bus_rabbitmq::{RabbitPublisher, RabbitSettings};
use im_domain::events::{DomainEvent, EventType};
use im_domain::ports::{EventPublisher, HealthCheck};
use im_domain::{DomainError, TenantId};
use im_testkit::proxy::Proxy;
use im_testkit::rabbit::TestQueue;
use im_testkit::services::{amqp_url, rabbitmq};

fn event(event_type: EventType) -> DomainEvent {
    DomainEvent {
        id: uuid::Uuid::now_v7(),
        event_type,
        tenant_id: TenantId::new("acme").unwrap(),
        subject: uuid::Uuid::now_v7().to_string(),
        time: time::OffsetDateTime::now_utc(),
        data: serde_json::json!({"name": "x"}),
    }
}

fn settings(url: String) -> RabbitSettings {
    RabbitSettings { url, exchange: format!("im-test-{}", uuid::Uuid::new_v4().simple()), confirm_timeout: Duration::from_secs(5) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_persistent_cloudevents_routed_by_type_with_confirms() {
    let Some(addr) = rabbitmq("publishes_persistent_cloudevents_routed_by_type_with_confirms") else { return };
    let settings = settings(amqp_url(addr));
    let mut queue = TestQueue::bind(&settings.url, &settings.exchange).await;
    let publisher = RabbitPublisher::new(settings);
    let events = vec![event(EventType::IntegrationCreated), event(EventType::IntegrationUpdated), event(EventType::IntegrationDeleted)];
    publisher.publish(&events).await.expect("published and confirmed");
    for expected in &events {
        let got = queue.next(Duration::from_secs(5)).await.expect("a message");
        assert_eq!(got.routing_key, expected.event_type.as_str());
        assert_eq!(got.message_id.as_deref(), Some(expected.id.to_string().as_str()));
        assert_eq!(got.delivery_mode, Some(2), "persistent");
        assert_eq!(got.content_type.as_deref(), Some("application/cloudevents+json"));
        assert_eq!(got.body, expected.cloud_event());
    }
    assert!(queue.next(Duration::from_millis(300)).await.is_none(), "nothing else");
    assert!(publisher.check().await.ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_are_counted_not_logged_one_by_one() {
    let Some(addr) = rabbitmq("unroutable_events_are_counted_not_logged_one_by_one") else { return };
    // No queue bound to this fresh exchange: every event is unroutable.
    let publisher = RabbitPublisher::new(settings(amqp_url(addr)));
    let events: Vec<_> = (0..5).map(|_| event(EventType::IntegrationCreated)).collect();
    publisher.publish(&events).await.expect("accepted by the broker");
    assert_eq!(publisher.unroutable_count(), 5);
    let health = publisher.check().await;
    assert!(health.ready);
    for hidden in ["guest", "127.0.0.1", "amqp", &addr.port().to_string()] {
        assert!(!health.detail.contains(hidden), "readiness detail shows {hidden}: {}", health.detail);
    }
    assert!(health.diagnostic.contains("127.0.0.1"), "the logs get the details: {}", health.diagnostic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_a_broker_outage() {
    let Some(addr) = rabbitmq("recovers_after_a_broker_outage") else { return };
    let proxy = Proxy::start(addr).await;
    let settings = settings(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()));
    let mut queue = TestQueue::bind(&amqp_url(addr), &settings.exchange).await;
    let publisher = RabbitPublisher::new(settings);

    let first = event(EventType::IntegrationCreated);
    publisher.publish(std::slice::from_ref(&first)).await.expect("published");
    proxy.cut();
    let during = event(EventType::IntegrationUpdated);
    let result = publisher.publish(std::slice::from_ref(&during)).await;
    assert!(matches!(result, Err(DomainError::Unavailable { .. })), "an outage is reported, not swallowed: {result:?}");
    assert!(!publisher.check().await.ready, "readiness shows the broker is away");

    proxy.restore();
    publisher.publish(std::slice::from_ref(&during)).await.expect("reconnects and publishes");
    let ids: Vec<_> = queue.drain(Duration::from_millis(500)).await.into_iter().filter_map(|m| m.message_id).collect();
    assert!(ids.contains(&first.id.to_string()) && ids.contains(&during.id.to_string()), "{ids:?}");
}

#[tokio::test]
async fn an_unreachable_broker_is_unavailable() {
    let publisher = RabbitPublisher::new(settings("amqp://guest:guest@127.0.0.1:1/%2f".into()));
    assert!(matches!(publisher.publish(&[event(EventType::IntegrationCreated)]).await, Err(DomainError::Unavailable { .. })));
    let health = publisher.check().await;
    assert!(!health.ready && !health.critical);
    assert!(!health.detail.contains("guest:guest"), "no password in readiness details");
}
