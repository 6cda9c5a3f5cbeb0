//! [`DeliveryQueue`] on RabbitMQ: a durable work queue that several instances consume as
//! competing consumers. Each instance consumes with a prefetch limit ([`PREFETCH`]): the broker
//! pushes jobs ahead, and a take hands out those already here without a round trip per job. A
//! job is acknowledged only once its attempt is recorded (manual ack): if the process dies, the
//! broker gives its unacknowledged jobs (taken or only pushed) to another consumer.
//! Jobs due later wait in delay queues (one per delay bucket, with a queue-level TTL, so none
//! blocks another) that dead-letter into the work queue when the time comes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt as _, StreamExt as _};
use im_domain::webhooks::ports::{DeliveryJob, DeliveryQueue};
use im_domain::{DomainError, TenantId};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, PublisherConfirm};
use serde_json::json;

use secrecy::{ExposeSecret as _, SecretString};

use crate::{RabbitSettings, bounded, redact};

fn unavailable(context: &str, error: impl std::fmt::Display) -> DomainError {
    DomainError::Unavailable { reason: format!("rabbitmq delivery queue: {context}: {error}"), retry_after: Some(Duration::from_secs(1)) }
}

struct Link {
    connection: Connection,
    channel: Channel,
    /// Counts connections: a consumer of an earlier one is gone.
    generation: u64,
}

/// How many unacknowledged jobs the broker pushes to one instance ahead of its takes (64 gave
/// the most deliveries a second to ten endpoints of 32, 64 and 256 in `make bench`).
pub const PREFETCH: u16 = 64;

/// The consumer of the work queue, on the connection of `generation`.
struct Consuming {
    generation: u64,
    consumer: std::pin::Pin<Box<Consumer>>,
}

/// The delivery queue on RabbitMQ.
pub struct RabbitDeliveryQueue {
    url: SecretString,
    prefix: String,
    /// How long one broker operation may take (`operation_timeout`); a confirm waits for
    /// `confirm_timeout`.
    limit: Duration,
    confirm_timeout: Duration,
    link: tokio::sync::Mutex<Option<Link>>,
    /// Connections made so far.
    generations: std::sync::atomic::AtomicU64,
    /// The work queue's consumer; taken by one take at a time.
    consuming: tokio::sync::Mutex<Option<Consuming>>,
    /// Delivery tags of the jobs this process holds, by delivery id.
    in_flight: Mutex<HashMap<uuid::Uuid, u64>>,
}

impl std::fmt::Debug for RabbitDeliveryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitDeliveryQueue")
            .field("url", &redact(self.url.expose_secret()))
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// How long a take waits for the first job when none has been pushed here yet: the broker
/// pushes a job the moment it is due, so the dispatcher waits here rather than sleeping blind.
const FIRST_JOB_WAIT: Duration = Duration::from_millis(200);

/// The delay bucket of a wait: 100 ms steps up to a second, seconds up to a minute, minutes beyond.
fn bucket(delay: Duration) -> u64 {
    let ms = delay.as_millis() as u64;
    let step = if ms <= 1_000 {
        100
    } else if ms <= 60_000 {
        1_000
    } else {
        60_000
    };
    ms.div_ceil(step) * step
}

impl RabbitDeliveryQueue {
    /// The broker of `settings.url`; `settings.delivery_queue_prefix` names the queues:
    /// `{prefix}.work` and `{prefix}.delay.{ms}`.
    pub fn new(settings: &RabbitSettings) -> Self {
        Self {
            url: settings.url.clone(),
            prefix: settings.delivery_queue_prefix.clone(),
            limit: settings.operation_timeout.get(),
            confirm_timeout: settings.confirm_timeout.get(),
            link: tokio::sync::Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            consuming: tokio::sync::Mutex::new(None),
            in_flight: Mutex::default(),
        }
    }

    fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// The channel, connecting first when needed. The lock is held only while connecting: the
    /// channel itself is shared by concurrent publishes, gets and acks.
    async fn channel(&self) -> Result<Channel, DomainError> {
        self.link().await.map(|(channel, _)| channel)
    }

    /// The channel and the generation of its connection.
    async fn link(&self) -> Result<(Channel, u64), DomainError> {
        let mut link = self.link.lock().await;
        if link.as_ref().is_some_and(|l| !l.connection.status().connected() || !l.channel.status().connected()) {
            *link = None;
        }
        if link.is_none() {
            // Tags of an old channel mean nothing now: the broker requeued those jobs.
            self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let connection = bounded(self.limit, Connection::connect(self.url.expose_secret(), ConnectionProperties::default()))
                .await
                .map_err(|e| unavailable("connect", e))?;
            let channel = bounded(self.limit, connection.create_channel()).await.map_err(|e| unavailable("channel", e))?;
            bounded(self.limit, channel.confirm_select(ConfirmSelectOptions::default()))
                .await
                .map_err(|e| unavailable("confirm mode", e))?;
            let declare = channel.queue_declare(
                self.work_queue().as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            );
            bounded(self.limit, declare).await.map_err(|e| unavailable("declare the work queue", e))?;
            let generation = self.generations.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            *link = Some(Link { connection, channel, generation });
        }
        link.as_ref().map(|l| (l.channel.clone(), l.generation)).ok_or_else(|| unavailable("connect", "no channel"))
    }

    /// Starts consuming the work queue on `channel`, with the prefetch limit.
    async fn consume(&self, channel: &Channel, generation: u64) -> Result<Consuming, DomainError> {
        bounded(self.limit, channel.basic_qos(PREFETCH, BasicQosOptions::default())).await.map_err(|e| unavailable("prefetch", e))?;
        let consume = channel.basic_consume(
            self.work_queue().as_str().into(),
            "".into(),
            BasicConsumeOptions { no_ack: false, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        );
        let consumer = bounded(self.limit, consume).await.map_err(|e| unavailable("consume", e))?;
        Ok(Consuming { generation, consumer: Box::pin(consumer) })
    }

    async fn publish(&self, channel: &Channel, queue: &str, job: &DeliveryJob) -> Result<(), DomainError> {
        let confirm = self.send(channel, queue, job).await?;
        self.confirmed(confirm).await
    }

    /// Publishes a job; the broker's confirm is awaited by [`Self::confirmed`].
    async fn send(&self, channel: &Channel, queue: &str, job: &DeliveryJob) -> Result<PublisherConfirm, DomainError> {
        let payload = serde_json::to_vec(&json!({"tenantId": job.tenant_id.as_str(), "deliveryId": job.delivery_id.to_string()}))
            .map_err(|e| DomainError::Unexpected(e.into()))?;
        let publish = channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default().with_delivery_mode(2),
        );
        bounded(self.limit, publish).await.map_err(|e| unavailable("publish", e))
    }

    async fn confirmed(&self, confirm: PublisherConfirm) -> Result<(), DomainError> {
        match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(_))) => Ok(()),
            Ok(Ok(_)) => Err(unavailable("publish", "the broker did not accept the job")),
            Ok(Err(e)) => Err(unavailable("confirm", e)),
            Err(_) => Err(unavailable("confirm", "timed out")),
        }
    }

    /// Publishes a job to the work queue, or to the delay queue of its wait.
    async fn publish_at(&self, channel: &Channel, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError> {
        let delay = (due - time::OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO);
        if delay < Duration::from_millis(50) {
            self.publish(channel, &self.work_queue(), job).await?;
        } else {
            let ms = bucket(delay);
            let queue = format!("{}.delay.{ms}", self.prefix);
            let mut args = FieldTable::default();
            args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongLongInt(ms as i64));
            args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString("".into()));
            args.insert(ShortString::from("x-dead-letter-routing-key"), AMQPValue::LongString(self.work_queue().into()));
            args.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(ms as i64 + 600_000));
            let declare = channel.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args);
            bounded(self.limit, declare).await.map_err(|e| unavailable("declare a delay queue", e))?;
            self.publish(channel, &queue, job).await?;
        }
        Ok(())
    }

    async fn ack(&self, channel: &Channel, job: &DeliveryJob) -> Result<(), DomainError> {
        let tag = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.delivery_id);
        if let Some(tag) = tag {
            bounded(self.limit, channel.basic_ack(tag, BasicAckOptions::default())).await.map_err(|e| unavailable("ack", e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl DeliveryQueue for RabbitDeliveryQueue {
    #[tracing::instrument(skip_all, name = "delivery_queue.schedule", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn schedule(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError> {
        let channel = self.channel().await?;
        self.publish_at(&channel, job, due).await?;
        // A job rescheduled while held: the new message is safe, the old one can go.
        self.ack(&channel, job).await
    }

    /// Jobs due now are published together and their confirms awaited together (one round trip,
    /// not one a job); jobs due later go one by one through their delay queues.
    #[tracing::instrument(skip_all, name = "delivery_queue.schedule_each", fields(count = jobs.len()))]
    async fn schedule_each(&self, jobs: &[(DeliveryJob, time::OffsetDateTime)]) -> Result<(), DomainError> {
        let channel = self.channel().await?;
        let soon = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(50);
        let mut confirms = Vec::with_capacity(jobs.len());
        for (job, due) in jobs {
            if *due < soon {
                confirms.push(self.send(&channel, &self.work_queue(), job).await?);
            } else {
                self.publish_at(&channel, job, *due).await?;
            }
        }
        for confirm in confirms {
            self.confirmed(confirm).await?;
        }
        Ok(())
    }

    /// The broker cannot tell whether a job is queued: this queues one more, which the delivery
    /// service drops when it finds the delivery held, not yet due or final.
    #[tracing::instrument(skip_all, name = "delivery_queue.schedule_if_absent", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn schedule_if_absent(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError> {
        let channel = self.channel().await?;
        self.publish_at(&channel, job, due).await
    }
    /// The jobs the broker has pushed here, up to `max`; when none is here yet, waits up to
    /// [`FIRST_JOB_WAIT`] for the first.
    #[tracing::instrument(skip_all, name = "delivery_queue.take_due", fields(max = max))]
    async fn take_due(&self, max: u32, _lease: Duration) -> Result<Vec<DeliveryJob>, DomainError> {
        let (channel, generation) = self.link().await?;
        let mut consuming = self.consuming.lock().await;
        if consuming.as_ref().is_none_or(|c| c.generation != generation) {
            *consuming = Some(self.consume(&channel, generation).await?);
        }
        let Some(Consuming { consumer, .. }) = consuming.as_mut() else { return Ok(Vec::new()) };
        let mut jobs = Vec::new();
        let mut first = true;
        while jobs.len() < max as usize {
            let next = if std::mem::take(&mut first) {
                match tokio::time::timeout(FIRST_JOB_WAIT, consumer.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            } else {
                match consumer.next().now_or_never() {
                    Some(next) => next,
                    None => break,
                }
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    *consuming = None;
                    return if jobs.is_empty() { Err(unavailable("consume", e)) } else { Ok(jobs) };
                }
                None => {
                    // The broker cancelled the consumer (the queue was deleted, say): consume again next time.
                    *consuming = None;
                    break;
                }
            };
            let tag = delivery.delivery_tag;
            let parsed: Option<DeliveryJob> = serde_json::from_slice::<serde_json::Value>(&delivery.data).ok().and_then(|v| {
                Some(DeliveryJob {
                    tenant_id: TenantId::new(v["tenantId"].as_str()?).ok()?,
                    delivery_id: uuid::Uuid::parse_str(v["deliveryId"].as_str()?).ok()?,
                })
            });
            match parsed {
                Some(job) => {
                    let duplicate = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(job.delivery_id, tag);
                    if let Some(older) = duplicate {
                        // The same delivery twice (a reschedule raced a redelivery): keep one.
                        let _ = bounded(self.limit, channel.basic_ack(older, BasicAckOptions::default())).await;
                        continue;
                    }
                    jobs.push(job);
                }
                None => {
                    tracing::warn!("dropping an unreadable delivery job");
                    bounded(self.limit, channel.basic_ack(tag, BasicAckOptions::default())).await.map_err(|e| unavailable("ack", e))?;
                }
            }
        }
        Ok(jobs)
    }

    #[tracing::instrument(skip_all, name = "delivery_queue.complete", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn complete(&self, job: &DeliveryJob) -> Result<(), DomainError> {
        let channel = self.channel().await?;
        self.ack(&channel, job).await
    }

    #[tracing::instrument(skip_all, name = "delivery_queue.next_due")]
    async fn next_due(&self) -> Result<Option<time::OffsetDateTime>, DomainError> {
        // The broker moves delayed jobs when they are due; poll the work queue.
        Ok(None)
    }

    /// The jobs that are due (ready in the work queue); delayed ones wait in their delay queues.
    async fn depth(&self) -> Result<Option<u64>, DomainError> {
        let channel = self.channel().await?;
        let inspect = channel.queue_declare(
            self.work_queue().as_str().into(),
            QueueDeclareOptions { durable: true, passive: true, ..Default::default() },
            FieldTable::default(),
        );
        let queue = bounded(self.limit, inspect).await.map_err(|e| unavailable("inspect the work queue", e))?;
        Ok(Some(u64::from(queue.message_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;
    use std::time::Duration;

    #[test]
    fn buckets() {
        assert_eq!(bucket(Duration::from_millis(120)), 200);
        assert_eq!(bucket(Duration::from_millis(1000)), 1000);
        assert_eq!(bucket(Duration::from_millis(1001)), 2000);
        assert_eq!(bucket(Duration::from_secs(300)), 300_000);
        assert_eq!(bucket(Duration::from_secs(301)), 360_000);
    }
}
