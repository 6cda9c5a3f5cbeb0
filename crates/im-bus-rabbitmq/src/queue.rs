//! [`DeliveryQueue`] on RabbitMQ: a durable work queue that several instances consume as
//! competing consumers. A job is taken with `basic.get` and acknowledged only once its attempt
//! is recorded (manual ack): if the process dies, the broker gives the job to another consumer.
//! Jobs due later wait in delay queues (one per delay bucket, with a queue-level TTL, so none
//! blocks another) that dead-letter into the work queue when the time comes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::webhooks::ports::{DeliveryJob, DeliveryQueue};
use im_domain::{DomainError, TenantId};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::json;

use secrecy::{ExposeSecret as _, SecretString};

use crate::{RabbitSettings, bounded, redact};

fn unavailable(context: &str, error: impl std::fmt::Display) -> DomainError {
    DomainError::Unavailable { reason: format!("rabbitmq delivery queue: {context}: {error}"), retry_after: Some(Duration::from_secs(1)) }
}

struct Link {
    connection: Connection,
    channel: Channel,
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
            in_flight: Mutex::default(),
        }
    }

    fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// The channel, connecting first when needed. The lock is held only while connecting: the
    /// channel itself is shared by concurrent publishes, gets and acks.
    async fn channel(&self) -> Result<Channel, DomainError> {
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
            *link = Some(Link { connection, channel });
        }
        link.as_ref().map(|l| l.channel.clone()).ok_or_else(|| unavailable("connect", "no channel"))
    }

    async fn publish(&self, channel: &Channel, queue: &str, job: &DeliveryJob) -> Result<(), DomainError> {
        let payload = serde_json::to_vec(&json!({"tenantId": job.tenant_id.as_str(), "deliveryId": job.delivery_id.to_string()}))
            .map_err(|e| DomainError::Unexpected(e.into()))?;
        let publish = channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default().with_delivery_mode(2),
        );
        let confirm = bounded(self.limit, publish).await.map_err(|e| unavailable("publish", e))?;
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

    /// The broker cannot tell whether a job is queued: this queues one more, which the delivery
    /// service drops when it finds the delivery held, not yet due or final.
    #[tracing::instrument(skip_all, name = "delivery_queue.schedule_if_absent", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn schedule_if_absent(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError> {
        let channel = self.channel().await?;
        self.publish_at(&channel, job, due).await
    }
    #[tracing::instrument(skip_all, name = "delivery_queue.take_due", fields(max = max))]
    async fn take_due(&self, max: u32, _lease: Duration) -> Result<Vec<DeliveryJob>, DomainError> {
        let channel = self.channel().await?;
        let mut jobs = Vec::new();
        while jobs.len() < max as usize {
            let get = channel.basic_get(self.work_queue().as_str().into(), BasicGetOptions { no_ack: false });
            let Some(message) = bounded(self.limit, get).await.map_err(|e| unavailable("get", e))? else {
                break;
            };
            let tag = message.delivery.delivery_tag;
            let parsed: Option<DeliveryJob> = serde_json::from_slice::<serde_json::Value>(&message.delivery.data).ok().and_then(|v| {
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
