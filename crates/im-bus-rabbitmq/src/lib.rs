//! The RabbitMQ adapter: [`EventPublisher`] on a durable topic exchange.
//!
//! Each event is published as a persistent message whose body is the CloudEvents 1.0 JSON
//! document and whose routing key is the event type (`integration.created`, ...). The channel
//! is in confirm mode: `publish` returns only after the broker acknowledged every message. A
//! negative acknowledgement, a timeout or a lost connection is [`DomainError::Unavailable`]; the
//! connection is then dropped and re-established on the next call (the relay retries with
//! backoff), so a broker restart loses nothing. Messages the broker returns as unroutable (no
//! queue bound) are counted, not logged one by one: an event type nobody consumes (such as
//! `webhook.delivered`) is normal. The first one is logged at info, then a count at most once a
//! minute ([`UNROUTABLE_LOG_INTERVAL`]); [`RabbitPublisher::unroutable_count`] has the total.

mod queue;

pub use queue::RabbitDeliveryQueue;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::HumanDuration;
use im_domain::events::DomainEvent;
use im_domain::ports::{DependencyHealth, EventPublisher, HealthCheck};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// How to reach the broker: the `rabbitmq` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct RabbitSettings {
    /// `amqp://user:password@host:port/vhost` or `amqps://...`; a secret (it holds a password).
    pub url: SecretString,
    /// The durable topic exchange events are published to.
    pub exchange: String,
    /// How long to wait for the broker's confirms of one batch.
    pub confirm_timeout: HumanDuration,
    /// How long to wait for the broker to connect or to answer one operation (declare, publish,
    /// get, ack, close). A broker that stops answering is then treated as away, so no caller,
    /// lock or readiness check waits on it for longer.
    pub operation_timeout: HumanDuration,
    /// The durable work queue of webhook delivery jobs is `<prefix>.work`, its delay queues
    /// `<prefix>.delay.<ms>`.
    pub delivery_queue_prefix: String,
    /// The most delivery jobs one message of the work queue carries (those due now of one
    /// fan-out); 1 sends every job alone, as versions before messages of several jobs did, which
    /// cannot read them (so 1 while such a version still consumes the queue).
    pub jobs_per_message: usize,
}

impl RabbitSettings {
    /// What types alone cannot check: every problem, as (key within the section, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let url = self.url.expose_secret();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            problems.push(("url", "must be an amqp:// or amqps:// URL".to_owned()));
        }
        let valid_name = |n: &str| {
            !n.is_empty() && n.len() <= 255 && !n.starts_with("amq.") && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        };
        for (key, name) in [("exchange", &self.exchange), ("delivery_queue_prefix", &self.delivery_queue_prefix)] {
            if !valid_name(name) {
                problems.push((key, "must be 1 to 255 of letters, digits, '-', '_', '.', ':' and not start with 'amq.'".to_owned()));
            }
        }
        if !(1..=256).contains(&self.jobs_per_message) {
            problems.push(("jobs_per_message", "must be between 1 and 256".to_owned()));
        }
        if self.confirm_timeout.get().as_secs() < 1 {
            problems.push(("confirm_timeout", "must be at least 1s".to_owned()));
        }
        if self.operation_timeout.get().as_secs() < 1 {
            problems.push(("operation_timeout", "must be at least 1s".to_owned()));
        }
        problems
    }

    /// Settings for `url` with the default names, a 10 s confirm timeout, a 5 s operation
    /// timeout and [`queue::JOBS_PER_MESSAGE`] jobs a message at most.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            exchange: "integration-manager.events".into(),
            confirm_timeout: HumanDuration(Duration::from_secs(10)),
            operation_timeout: HumanDuration(Duration::from_secs(5)),
            delivery_queue_prefix: "integration-manager.deliveries".into(),
            jobs_per_message: queue::JOBS_PER_MESSAGE,
        }
    }
}

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Waits at most `limit` for one broker operation; the error, or the wait that ran out, as text.
async fn bounded<T, E: fmt::Display>(limit: Duration, operation: impl Future<Output = Result<T, E>>) -> Result<T, String> {
    match tokio::time::timeout(limit, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}", HumanDuration(limit))),
    }
}

/// Shortest time between two log lines about unroutable events.
pub const UNROUTABLE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Counts unroutable events and decides when to say so.
#[derive(Debug, Default)]
struct UnroutableCounter {
    total: AtomicU64,
    /// When the last line was logged, and how many were counted since.
    window: Mutex<Option<(Instant, u64)>>,
}

/// What to log about an unroutable event.
#[derive(Debug, PartialEq, Eq)]
enum UnroutableLog {
    First,
    Since { count: u64, total: u64 },
}

impl UnroutableCounter {
    fn note(&self, now: Instant) -> Option<UnroutableLog> {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        match window.as_mut() {
            None => {
                *window = Some((now, 0));
                Some(UnroutableLog::First)
            }
            Some((last, count)) => {
                *count += 1;
                if now.saturating_duration_since(*last) < UNROUTABLE_LOG_INTERVAL {
                    return None;
                }
                let logged = UnroutableLog::Since { count: *count, total };
                *window = Some((now, 0));
                Some(logged)
            }
        }
    }

    fn record(&self, routing_key: &str) {
        match self.note(Instant::now()) {
            Some(UnroutableLog::First) => tracing::info!(
                routing_key,
                "an event was unroutable: no queue is bound for it; further ones are counted and logged at most once a minute"
            ),
            Some(UnroutableLog::Since { count, total }) => {
                tracing::info!(count, total, routing_key, "events were unroutable (no queue bound) since the last report");
            }
            None => {}
        }
    }
}

/// A connection to the broker that the event publisher and the delivery queue of one process
/// share ([`RabbitPublisher::on`], [`RabbitDeliveryQueue::on`]), each on channels of its own.
/// lapin reads and writes each connection's socket on a thread of its own: on one connection,
/// an event's publish, a job's publish and their confirms cross one such thread, and wake it
/// together when they come together, instead of two threads each woken for its share.
/// Connects on first use and again on the first use after it dropped (a broker restart, or a
/// publish that failed and closed it: the other user then finds its channel closed and opens
/// one on the new connection, as after a restart).
#[derive(Clone)]
pub struct RabbitConnection {
    shared: Arc<SharedConnection>,
}

struct SharedConnection {
    url: SecretString,
    limit: Duration,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl fmt::Debug for RabbitConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConnection").field("url", &self.redacted_url()).finish_non_exhaustive()
    }
}

impl RabbitConnection {
    /// Does not connect yet: the first use does.
    pub fn new(settings: &RabbitSettings) -> Self {
        Self {
            shared: Arc::new(SharedConnection {
                url: settings.url.clone(),
                limit: settings.operation_timeout.get(),
                current: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The broker's URL without its password, for logs.
    fn redacted_url(&self) -> String {
        redact(self.shared.url.expose_secret())
    }

    /// The connection, made first when there is none or it is no longer connected (within the
    /// operation timeout).
    async fn get(&self) -> Result<Arc<Connection>, String> {
        let mut current = self.shared.current.lock().await;
        if let Some(connection) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        let properties = ConnectionProperties::default().with_connection_name("integration-manager".into());
        let connection = Arc::new(bounded(self.shared.limit, Connection::connect(self.shared.url.expose_secret(), properties)).await?);
        *current = Some(connection.clone());
        Ok(connection)
    }
}

struct Link {
    connection: Arc<Connection>,
    channel: Channel,
}

/// Publishes events to RabbitMQ with publisher confirms.
pub struct RabbitPublisher {
    settings: RabbitSettings,
    connection: RabbitConnection,
    link: tokio::sync::Mutex<Option<Link>>,
    last_error: Mutex<Option<String>>,
    unroutable: UnroutableCounter,
}

impl fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitPublisher").field("settings", &self.settings).finish_non_exhaustive()
    }
}

fn unavailable(context: &str, error: impl fmt::Display) -> DomainError {
    DomainError::Unavailable { reason: format!("rabbitmq: {context}: {error}"), retry_after: Some(Duration::from_secs(1)) }
}

impl RabbitPublisher {
    /// Does not connect yet: the first publish (or readiness check) does, on a connection of
    /// its own.
    pub fn new(settings: RabbitSettings) -> Self {
        let connection = RabbitConnection::new(&settings);
        Self::on(settings, connection)
    }

    /// Publishes on `connection` (shared with the delivery queue), on a channel of its own.
    pub fn on(settings: RabbitSettings, connection: RabbitConnection) -> Self {
        Self {
            settings,
            connection,
            link: tokio::sync::Mutex::new(None),
            last_error: Mutex::new(None),
            unroutable: UnroutableCounter::default(),
        }
    }

    /// Events the broker accepted but could route to no queue, since start.
    pub fn unroutable_count(&self) -> u64 {
        self.unroutable.total.load(Ordering::Relaxed)
    }

    async fn connect(&self) -> Result<Link, DomainError> {
        let limit = self.settings.operation_timeout.get();
        let connection = self.connection.get().await.map_err(|e| unavailable("connect", e))?;
        let channel = bounded(limit, connection.create_channel()).await.map_err(|e| unavailable("open channel", e))?;
        bounded(limit, channel.confirm_select(ConfirmSelectOptions::default())).await.map_err(|e| unavailable("confirm mode", e))?;
        let declare = channel.exchange_declare(
            self.settings.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            FieldTable::default(),
        );
        bounded(limit, declare).await.map_err(|e| unavailable("declare exchange", e))?;
        tracing::info!(url = %redact(self.settings.url.expose_secret()), exchange = %self.settings.exchange, "connected to rabbitmq");
        Ok(Link { connection, channel })
    }

    async fn publish_on(&self, channel: &Channel, events: &[DomainEvent]) -> Result<(), DomainError> {
        let payloads = events
            .iter()
            .map(|event| serde_json::to_vec(&event.envelope()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DomainError::Unexpected(e.into()))?;
        // Each publish resolves once lapin's I/O thread has written it: awaited one by one,
        // every event of a round waited for a trip to that thread and back. Started together,
        // in order (each takes its delivery tag and queues its frames when first polled, and
        // `try_join_all` polls them in order), they go out in one write.
        let publishes = events.iter().zip(&payloads).map(|(event, payload)| {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/cloudevents+json".into())
                .with_message_id(event.id.to_string().into())
                .with_type(event.event_type.as_str().into())
                .with_app_id("integration-manager".into())
                .with_timestamp(u64::try_from(event.time.unix_timestamp()).unwrap_or_default());
            channel.basic_publish(
                self.settings.exchange.as_str().into(),
                event.event_type.as_str().into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                payload,
                properties,
            )
        });
        let sent = bounded(self.settings.operation_timeout.get(), futures_util::future::try_join_all(publishes))
            .await
            .map_err(|e| unavailable("publish", e))?;
        // One timer for the batch's confirms, not one registered and cancelled per event.
        let confirmed = async {
            for (event, confirm) in events.iter().zip(sent) {
                match confirm.await {
                    Err(e) => return Err(unavailable("confirm", e)),
                    Ok(Confirmation::Nack(_)) => return Err(unavailable("confirm", format!("the broker refused event {}", event.id))),
                    Ok(Confirmation::Ack(Some(_))) => self.unroutable.record(event.event_type.as_str()),
                    Ok(Confirmation::NotRequested) => return Err(unavailable("confirm", "the channel is not in confirm mode")),
                    Ok(Confirmation::Ack(None)) => {}
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.settings.confirm_timeout.get(), confirmed)
            .await
            .unwrap_or_else(|_| Err(unavailable("confirm", "the broker did not confirm in time")))
    }

    fn record(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

#[async_trait]
impl EventPublisher for RabbitPublisher {
    #[tracing::instrument(skip_all, name = "events.publish", fields(count = events.len()))]
    async fn publish(&self, events: &[DomainEvent]) -> Result<(), DomainError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut link = self.link.lock().await;
        if link.as_ref().is_some_and(|l| !l.connection.status().connected() || !l.channel.status().connected()) {
            *link = None;
        }
        if link.is_none() {
            match self.connect().await {
                Ok(new) => *link = Some(new),
                Err(e) => {
                    self.record(Some(e.to_string()));
                    return Err(e);
                }
            }
        }
        let channel = link.as_ref().map(|l| l.channel.clone()).ok_or_else(|| unavailable("connect", "no channel"))?;
        match self.publish_on(&channel, events).await {
            Ok(()) => {
                self.record(None);
                Ok(())
            }
            Err(e) => {
                // Start afresh next time: a channel with an unconfirmed publish is in an unknown state.
                if let Some(old) = link.take() {
                    let _ = bounded(self.settings.operation_timeout.get(), old.connection.close(320, "reconnecting".into())).await;
                }
                self.record(Some(e.to_string()));
                Err(e)
            }
        }
    }
}

#[async_trait]
impl HealthCheck for RabbitPublisher {
    fn describe(&self) -> (&'static str, bool) {
        ("rabbitmq", false)
    }

    #[tracing::instrument(skip_all, name = "events.check")]
    async fn check(&self) -> DependencyHealth {
        let place = format!("rabbitmq {}, exchange {}", redact(self.settings.url.expose_secret()), self.settings.exchange);
        let limit = self.settings.operation_timeout.get();
        // A publish holds the link while it waits for confirms: wait for it no longer than for
        // any broker operation.
        let Ok(mut link) = tokio::time::timeout(limit, self.link.lock()).await else {
            return DependencyHealth {
                name: "rabbitmq".into(),
                ready: false,
                critical: false,
                detail: "not answering: a publish is still waiting".to_owned(),
                diagnostic: format!("{place}: a publish held the connection for more than {}", HumanDuration(limit)),
            };
        };
        let connected = link.as_ref().is_some_and(|l| l.connection.status().connected());
        let (ready, detail, diagnostic) = if connected {
            (true, "connected".to_owned(), place)
        } else {
            match tokio::time::timeout(limit, self.connect()).await {
                Ok(Ok(new)) => {
                    *link = Some(new);
                    (true, "connected".to_owned(), place)
                }
                Ok(Err(e)) => (false, "not connected".to_owned(), format!("{place}: {e}")),
                Err(_) => (false, "not connected: timed out".to_owned(), format!("{place}: connecting timed out")),
            }
        };
        let (detail, diagnostic) = match self.last_error.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(last) if ready => (format!("{detail}; the last publish failed"), format!("{diagnostic}; last publish error: {last}")),
            _ => (detail, diagnostic),
        };
        // Writes go to the outbox while the broker is away: degraded, not unready.
        DependencyHealth { name: "rabbitmq".into(), ready, critical: false, detail, diagnostic }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unroutable_events_are_counted_and_reported_at_most_once_a_minute() {
        let counter = UnroutableCounter::default();
        let start = Instant::now();
        assert_eq!(counter.note(start), Some(UnroutableLog::First));
        for i in 1..=100 {
            assert_eq!(counter.note(start + Duration::from_millis(i * 500)), None, "quiet within the minute");
        }
        let later = start + UNROUTABLE_LOG_INTERVAL + Duration::from_secs(1);
        assert_eq!(counter.note(later), Some(UnroutableLog::Since { count: 101, total: 102 }));
        assert_eq!(counter.note(later + Duration::from_secs(1)), None);
        assert_eq!(counter.note(later + UNROUTABLE_LOG_INTERVAL), Some(UnroutableLog::Since { count: 2, total: 104 }));
        assert_eq!(counter.total.load(Ordering::Relaxed), 104);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }
}
