//! The publisher and the delivery queue against the real RabbitMQ of this machine (required in
//! CI): the conformance suites of both ports, plus what only this adapter promises.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_bus_rabbitmq::{RabbitConnection, RabbitDeliveryQueue, RabbitPublisher, RabbitSettings};
use im_domain::events::{DomainEvent, EventType};
use im_domain::ports::{EventPublisher, HealthCheck};
use im_domain::webhooks::ports::DeliveryQueue;
use im_domain::{DomainError, TenantId};
use im_testkit::proxy::Proxy;
use im_testkit::publisher::{Observer, PublisherBackend};
use im_testkit::queue::QueueBackend;
use im_testkit::rabbit::TestQueue;
use im_testkit::services::{amqp_url, rabbitmq};
use secrecy::ExposeSecret as _;

fn event(event_type: EventType) -> DomainEvent {
    DomainEvent {
        id: uuid::Uuid::now_v7(),
        event_type,
        tenant_id: TenantId::new("acme").unwrap(),
        subject: uuid::Uuid::now_v7().to_string(),
        time: time::OffsetDateTime::now_utc(),
        data: serde_json::json!({"name": "x"}).into(),
    }
}

fn settings(url: String) -> RabbitSettings {
    RabbitSettings {
        exchange: format!("im-test-{}", uuid::Uuid::new_v4().simple()),
        confirm_timeout: im_domain::HumanDuration(Duration::from_secs(5)),
        ..RabbitSettings::new(url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_persistent_cloudevents_routed_by_type_with_confirms() {
    let Some(addr) = rabbitmq("publishes_persistent_cloudevents_routed_by_type_with_confirms") else { return };
    let settings = settings(amqp_url(addr));
    let mut queue = TestQueue::bind(settings.url.expose_secret(), &settings.exchange).await;
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

/// A broker that takes a batch and never confirms it: the publish fails once the confirm
/// timeout has passed (one deadline for the whole batch), and the next one, on a new
/// connection, goes through. The unconfirmed batch may have reached the broker: the relay
/// publishes it again (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_never_confirmed_fails_after_the_confirm_timeout() {
    let Some(addr) = rabbitmq("a_batch_never_confirmed_fails_after_the_confirm_timeout") else { return };
    let proxy = Proxy::start(addr).await;
    // The operation timeout stays at its default (5 s): it bounds the close of the muted
    // connection after the failure, so the publish gives up within about 6 s.
    let settings = RabbitSettings {
        confirm_timeout: im_domain::HumanDuration(Duration::from_secs(1)),
        ..settings(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()))
    };
    let exchange = settings.exchange.clone();
    let mut queue = TestQueue::bind(&amqp_url(addr), &settings.exchange).await;
    let publisher = RabbitPublisher::new(settings);
    publisher.publish(&[event(EventType::IntegrationCreated)]).await.expect("published while the broker answers");
    let connections = proxy.connections();

    proxy.mute();
    let batch: Vec<_> = (0..20).map(|_| event(EventType::IntegrationUpdated)).collect();
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), publisher.publish(&batch)).await.expect("the publish gives up");
    match &result {
        Err(e @ DomainError::Unavailable { .. }) => assert!(e.to_string().contains("confirm"), "{e}"),
        other => panic!("an unconfirmed batch is reported unavailable: {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "not before the confirm timeout: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "within the confirm timeout and the bound on closing the connection: {:?}",
        started.elapsed()
    );

    proxy.unmute();
    publisher.publish(&batch).await.expect("published again once the broker answers");
    assert!(proxy.connections() > connections, "on a new connection");
    let ids: Vec<_> = queue.drain(Duration::from_millis(500)).await.into_iter().filter_map(|m| m.message_id).collect();
    for sent in &batch {
        assert!(ids.contains(&sent.id.to_string()), "every event of the batch reached the queue: {ids:?}");
    }
    im_testkit::rabbit::delete_declared(&amqp_url(addr), None, Some(&exchange)).await.expect("the exchange deleted");
}

/// The publisher and the delivery queue of one process on one connection (one I/O thread of
/// lapin's, one connection at the broker), each on its own channel; when it drops, both go on
/// on one new connection, and the job held on the old one comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_and_the_queue_share_one_connection_and_recover_together() {
    let Some(addr) = rabbitmq("the_publisher_and_the_queue_share_one_connection_and_recover_together") else { return };
    let proxy = Proxy::start(addr).await;
    let settings = RabbitSettings {
        delivery_queue_prefix: format!("im-test-{}", uuid::Uuid::new_v4().simple()),
        ..settings(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()))
    };
    let mut observer = TestQueue::bind(&amqp_url(addr), &settings.exchange).await;
    let connection = RabbitConnection::new(&settings);
    let publisher = RabbitPublisher::on(settings.clone(), connection.clone());
    let queue = RabbitDeliveryQueue::on(&settings, connection);
    let job = im_domain::webhooks::ports::DeliveryJob { tenant_id: TenantId::new("acme").unwrap(), delivery_id: uuid::Uuid::now_v7() };

    let first = event(EventType::IntegrationCreated);
    publisher.publish(std::slice::from_ref(&first)).await.expect("published");
    queue.schedule(&job, time::OffsetDateTime::now_utc()).await.expect("scheduled");
    let taken = queue.take_due(10, Duration::from_secs(30)).await.expect("taken");
    assert_eq!(taken, vec![job.clone()]);
    assert_eq!(proxy.connections(), 1, "the publisher and the queue MUST share one connection");

    proxy.cut();
    let during = event(EventType::IntegrationUpdated);
    assert!(matches!(publisher.publish(std::slice::from_ref(&during)).await, Err(DomainError::Unavailable { .. })));
    proxy.restore();
    publisher.publish(std::slice::from_ref(&during)).await.expect("reconnects and publishes");
    // The job taken on the old connection was never completed: the broker gives it again.
    let mut again = Vec::new();
    for _ in 0..20 {
        again = queue.take_due(10, Duration::from_secs(30)).await.unwrap_or_default();
        if !again.is_empty() {
            break;
        }
    }
    assert_eq!(again, vec![job.clone()], "the job held on the dropped connection MUST come back");
    queue.complete(&job).await.expect("completed");
    assert_eq!(proxy.connections(), 2, "after the outage both MUST go on on one new connection");
    let ids: Vec<_> = observer.drain(Duration::from_millis(500)).await.into_iter().filter_map(|m| m.message_id).collect();
    assert!(ids.contains(&first.id.to_string()) && ids.contains(&during.id.to_string()), "{ids:?}");
    im_testkit::rabbit::delete_declared(&amqp_url(addr), Some(&settings.delivery_queue_prefix), Some(&settings.exchange))
        .await
        .expect("clean up");
}

#[tokio::test]
async fn an_unreachable_broker_is_unavailable() {
    let publisher = RabbitPublisher::new(settings("amqp://guest:guest@127.0.0.1:1/%2f".into()));
    assert!(matches!(publisher.publish(&[event(EventType::IntegrationCreated)]).await, Err(DomainError::Unavailable { .. })));
    let health = publisher.check().await;
    assert!(!health.ready && !health.critical);
    assert!(!health.detail.contains("guest:guest"), "no password in readiness details");
}

/// A broker that accepts the connection and then says nothing (a stopping node, a half-open
/// socket): every call gives up after `operation_timeout` instead of waiting, and holds no lock
/// that readiness would then wait on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_is_unavailable_within_the_operation_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let settings = RabbitSettings {
        operation_timeout: im_domain::HumanDuration(Duration::from_secs(1)),
        delivery_queue_prefix: "im-test-silent".into(),
        ..settings(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
    };
    let publisher = Arc::new(RabbitPublisher::new(settings.clone()));
    let queue = RabbitDeliveryQueue::new(&settings);
    let job = im_domain::webhooks::ports::DeliveryJob { tenant_id: TenantId::new("acme").unwrap(), delivery_id: uuid::Uuid::now_v7() };
    let bounded = Duration::from_secs(8);

    let publishing = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish(&[event(EventType::IntegrationCreated)]).await })
    };
    let health = tokio::time::timeout(bounded, publisher.check()).await.expect("readiness answers while a publish waits");
    assert!(!health.ready && !health.critical, "{health:?}");
    let published = tokio::time::timeout(bounded, publishing).await.expect("the publish gives up").unwrap();
    assert!(matches!(published, Err(DomainError::Unavailable { .. })), "{published:?}");
    let scheduled =
        tokio::time::timeout(bounded, queue.schedule(&job, time::OffsetDateTime::now_utc())).await.expect("scheduling gives up");
    assert!(matches!(scheduled, Err(DomainError::Unavailable { .. })), "{scheduled:?}");
    let taken = tokio::time::timeout(bounded, queue.take_due(10, Duration::from_secs(30))).await.expect("taking gives up");
    assert!(matches!(taken, Err(DomainError::Unavailable { .. })), "{taken:?}");
    accepted.abort();
}

/// Each publisher publishes to an exchange of its own; the observer is a queue bound to it.
struct Publishers {
    url: String,
}

struct Bound(TestQueue);

#[async_trait::async_trait]
impl Observer for Bound {
    async fn received(&mut self, count: usize, wait: Duration) -> Vec<uuid::Uuid> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        while seen.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(message) = self.0.next(left).await else { break };
            seen.push(message.message_id.and_then(|id| uuid::Uuid::parse_str(&id).ok()).expect("every message names its event"));
        }
        seen
    }
}

#[async_trait::async_trait]
impl PublisherBackend for Publishers {
    async fn connected(&self) -> (Arc<dyn EventPublisher>, Box<dyn Observer>) {
        let settings = settings(self.url.clone());
        let queue = TestQueue::bind(settings.url.expose_secret(), &settings.exchange).await;
        (Arc::new(RabbitPublisher::new(settings)), Box::new(Bound(queue)))
    }

    async fn failing(&self) -> Arc<dyn EventPublisher> {
        Arc::new(RabbitPublisher::new(settings("amqp://guest:guest@127.0.0.1:1/%2f".into())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_passes_the_publisher_contract() {
    let Some(addr) = rabbitmq("the_publisher_passes_the_publisher_contract") else { return };
    im_testkit::publisher::contract(&Publishers { url: amqp_url(addr) }).await;
}

/// Each queue is a prefix of its own; each consumer a connection of its own, as each instance
/// of the service has.
struct Queues {
    url: String,
    prefixes: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl QueueBackend for Queues {
    async fn fresh(&self) -> String {
        let prefix = format!("im-test-{}", uuid::Uuid::new_v4().simple());
        self.prefixes.lock().unwrap().push(prefix.clone());
        prefix
    }

    async fn consumer(&self, name: &str) -> Arc<dyn DeliveryQueue> {
        Arc::new(RabbitDeliveryQueue::new(&RabbitSettings {
            delivery_queue_prefix: name.to_owned(),
            ..RabbitSettings::new(self.url.clone())
        }))
    }
}

impl Queues {
    /// Deletes the work queues the checks declared (delay queues expire by themselves).
    async fn remove(&self) {
        let connection = lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default()).await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let prefixes = self.prefixes.lock().unwrap().clone();
        for prefix in prefixes {
            let work = format!("{prefix}.work");
            channel.queue_delete(work.as_str().into(), lapin::options::QueueDeleteOptions::default()).await.expect("delete the work queue");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_queue_passes_the_queue_contract() {
    let Some(addr) = rabbitmq("the_delivery_queue_passes_the_queue_contract") else { return };
    let queues = Queues { url: amqp_url(addr), prefixes: Mutex::default() };
    im_testkit::queue::contract(&queues).await;
    queues.remove().await;
}

// A broker cannot tell that a job is already queued, so a job scheduled twice may be handed
// to two consumers (the port allows it: see `DeliveryQueue::schedule_if_absent`); the delivery
// service drops the second copy without an attempt, because an attempt first holds its
// delivery with a conditional write (`services::deliveries::tests::a_duplicate_job_is_dropped_without_a_second_attempt`
// and `a_job_for_a_delivery_held_by_an_attempt_in_progress_waits_for_the_hold`). The other
// clauses of the queue contract hold on RabbitMQ as on SQLite.
