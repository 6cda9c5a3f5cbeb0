//! [`DeliveryQueue`] on RabbitMQ: a durable work queue that several instances consume as
//! competing consumers. Each instance consumes with a prefetch limit ([`PREFETCH`]): the broker
//! pushes jobs ahead, and a take hands out those already here without a round trip per job. A
//! job is acknowledged only once its attempt is recorded (manual ack): if the process dies, the
//! broker gives its unacknowledged jobs (taken or only pushed) to another consumer.
//! Jobs due now that are scheduled together (a fan-out's first attempts) travel together, up to
//! `jobs_per_message` ([`JOBS_PER_MESSAGE`] by default) in one message: one publish, one
//! confirm, one delivery and one ack for them all. The message is acknowledged once each of its
//! jobs is completed or rescheduled; if the process dies before, all of them come back, the
//! completed ones too, which the delivery service drops as duplicates (it finds their deliveries
//! final).
//! Jobs due later wait in delay queues (one per delay bucket, with a queue-level TTL, so none
//! blocks another) that dead-letter into the work queue when the time comes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt as _, StreamExt as _};
use im_domain::webhooks::ports::{DeliveryJob, DeliveryQueue};
use im_domain::{DomainError, TenantId};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer, PublisherConfirm};

use crate::{RabbitConnection, RabbitSettings, bounded};

fn unavailable(context: &str, error: impl std::fmt::Display) -> DomainError {
    DomainError::Unavailable { reason: format!("rabbitmq delivery queue: {context}: {error}"), retry_after: Some(Duration::from_secs(1)) }
}

struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    /// Counts channels: a consumer of an earlier one is gone.
    generation: u64,
}

/// How many unacknowledged jobs the broker pushes to one instance ahead of its takes (64 gave
/// the most deliveries a second to ten endpoints of 32, 64 and 256 in `make bench`).
pub const PREFETCH: u16 = 64;

/// The most jobs one message carries by default (those due now of one
/// [`DeliveryQueue::schedule_each`]; `RabbitSettings::jobs_per_message`). With the prefetch, up
/// to `PREFETCH * jobs_per_message` jobs may wait at one consumer.
pub const JOBS_PER_MESSAGE: usize = 16;

/// The consumer of the work queue, on the channel of `generation`.
struct Consuming {
    generation: u64,
    consumer: std::pin::Pin<Box<Consumer>>,
    /// Jobs of messages already received that a take could not hand out (beyond its `max`).
    /// Held on this channel: they outlive a consumer the broker cancelled.
    waiting: VecDeque<DeliveryJob>,
    /// The broker cancelled this consumer, or it failed: the next take consumes again.
    ended: bool,
}

/// A job as a message carries it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobBody<'a> {
    #[serde(borrow)]
    tenant_id: std::borrow::Cow<'a, str>,
    delivery_id: uuid::Uuid,
}

impl<'a> From<&'a DeliveryJob> for JobBody<'a> {
    fn from(job: &'a DeliveryJob) -> Self {
        Self { tenant_id: job.tenant_id.as_str().into(), delivery_id: job.delivery_id }
    }
}

/// A message of several jobs.
#[derive(serde::Serialize)]
struct Batch<'a> {
    jobs: Vec<JobBody<'a>>,
}

/// A message of the work queue: one job (`{"tenantId", "deliveryId"}`), or several
/// (`{"jobs": [...]}`).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Message<'a> {
    #[serde(borrow, default)]
    jobs: Option<Vec<JobBody<'a>>>,
    #[serde(borrow, default)]
    tenant_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    delivery_id: Option<uuid::Uuid>,
}

impl Message<'_> {
    /// The jobs of a message body; `None` when it is not one.
    fn jobs(data: &[u8]) -> Option<Vec<DeliveryJob>> {
        let message: Message<'_> = serde_json::from_slice(data).ok()?;
        let job = |tenant: &str, delivery_id| Some(DeliveryJob { tenant_id: TenantId::new(tenant).ok()?, delivery_id });
        match message {
            Message { jobs: Some(jobs), .. } => jobs.iter().map(|j| job(&j.tenant_id, j.delivery_id)).collect(),
            Message { tenant_id: Some(tenant), delivery_id: Some(id), .. } => Some(vec![job(&tenant, id)?]),
            _ => None,
        }
    }
}

/// A job let go while its replacement is published: its message, on the channel of `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LetGo {
    generation: u64,
    tag: u64,
}

/// The jobs this process holds and the messages they came in.
#[derive(Default)]
struct InFlight {
    /// The channel the tags below are of: tags number the messages of one channel, and a new
    /// channel's start over.
    generation: u64,
    /// The message (delivery tag) of each job held, by delivery id.
    tags: HashMap<uuid::Uuid, u64>,
    /// How many of each message's jobs are still held: it is acknowledged when none is.
    left: HashMap<u64, u32>,
}

impl InFlight {
    fn clear(&mut self) {
        self.tags.clear();
        self.left.clear();
    }

    /// The channel of `generation` is the one now: the tags of earlier ones are forgotten.
    fn reset(&mut self, generation: u64) {
        self.clear();
        self.generation = generation;
    }

    /// Message `tag` came with `jobs` jobs.
    fn arrived(&mut self, tag: u64, jobs: u32) {
        self.left.insert(tag, jobs);
    }

    /// Job `id` of message `tag` is held. A job already held (the same delivery came again: a
    /// reschedule raced a redelivery) is not handed out a second time: its attempt, under way,
    /// completes it through `tag` now. Returns whether it is new, and a message that no job
    /// holds any more (to acknowledge).
    fn hold(&mut self, id: uuid::Uuid, tag: u64) -> (bool, Option<u64>) {
        match self.tags.insert(id, tag) {
            Some(older) => (false, self.release(older)),
            None => (true, None),
        }
    }

    /// One job of message `tag` is done with; the message, when that was its last.
    fn release(&mut self, tag: u64) -> Option<u64> {
        let left = self.left.get_mut(&tag)?;
        *left = left.saturating_sub(1);
        if *left > 0 {
            return None;
        }
        self.left.remove(&tag);
        Some(tag)
    }

    /// Job `id` is no longer held here while its replacement is published (which may come back
    /// to this process at once, and must then be handed out as a job of its own, not taken for a
    /// copy); the message it came in still counts it until [`Self::replaced`].
    fn let_go(&mut self, id: uuid::Uuid) -> Option<LetGo> {
        self.tags.remove(&id).map(|tag| LetGo { generation: self.generation, tag })
    }

    /// The replacement of job `id`, let go as `held`, was `published` (or not): the old message
    /// is done with it, and returned when that was its last job; if not published, the job is
    /// held again, unless its new message came anyway (a confirm that timed out), which then
    /// stands for it. Nothing changes when the channel changed meanwhile.
    fn replaced(&mut self, id: uuid::Uuid, held: LetGo, published: bool) -> Option<u64> {
        if held.generation != self.generation {
            return None;
        }
        if !published && !self.tags.contains_key(&id) {
            self.tags.insert(id, held.tag);
            return None;
        }
        self.release(held.tag)
    }

    /// Job `id` is completed (or rescheduled); the message to acknowledge, when it was its last.
    fn complete(&mut self, id: uuid::Uuid) -> Option<u64> {
        let tag = self.tags.remove(&id)?;
        self.release(tag)
    }
}

/// The delivery queue on RabbitMQ.
pub struct RabbitDeliveryQueue {
    connection: RabbitConnection,
    prefix: String,
    /// How long one broker operation may take (`operation_timeout`); a confirm waits for
    /// `confirm_timeout`.
    limit: Duration,
    confirm_timeout: Duration,
    /// The most jobs one message carries (at least 1).
    jobs_per_message: usize,
    link: tokio::sync::Mutex<Option<Link>>,
    /// Connections made so far.
    generations: std::sync::atomic::AtomicU64,
    /// The work queue's consumer; taken by one take at a time.
    consuming: tokio::sync::Mutex<Option<Consuming>>,
    /// The jobs this process holds, and their messages.
    in_flight: Mutex<InFlight>,
}

impl std::fmt::Debug for RabbitDeliveryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitDeliveryQueue")
            .field("url", &self.connection.redacted_url())
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
    /// `{prefix}.work` and `{prefix}.delay.{ms}`. On a connection of its own.
    pub fn new(settings: &RabbitSettings) -> Self {
        Self::on(settings, RabbitConnection::new(settings))
    }

    /// The queue on `connection` (shared with the event publisher), on a channel of its own.
    pub fn on(settings: &RabbitSettings, connection: RabbitConnection) -> Self {
        Self {
            connection,
            prefix: settings.delivery_queue_prefix.clone(),
            limit: settings.operation_timeout.get(),
            confirm_timeout: settings.confirm_timeout.get(),
            jobs_per_message: settings.jobs_per_message.max(1),
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

    /// The channel and its generation.
    async fn link(&self) -> Result<(Channel, u64), DomainError> {
        let mut link = self.link.lock().await;
        if link.as_ref().is_some_and(|l| !l.connection.status().connected() || !l.channel.status().connected()) {
            *link = None;
        }
        if link.is_none() {
            // Tags of an old channel mean nothing now: the broker requeued those jobs.
            self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let connection = self.connection.get().await.map_err(|e| unavailable("connect", e))?;
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
            self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).reset(generation);
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
        Ok(Consuming { generation, consumer: Box::pin(consumer), waiting: VecDeque::new(), ended: false })
    }

    async fn publish(&self, channel: &Channel, queue: &str, job: &DeliveryJob) -> Result<(), DomainError> {
        let confirm = self.send(channel, queue, &[job]).await?;
        self.confirmed(confirm).await
    }

    /// Publishes a message of `jobs` (one, or up to `jobs_per_message`); the broker's confirm
    /// is awaited by [`Self::confirmed`].
    async fn send(&self, channel: &Channel, queue: &str, jobs: &[&DeliveryJob]) -> Result<PublisherConfirm, DomainError> {
        let payload = match jobs {
            [job] => serde_json::to_vec(&JobBody::from(*job)),
            jobs => serde_json::to_vec(&Batch { jobs: jobs.iter().map(|job| JobBody::from(*job)).collect() }),
        }
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
        let queue = self.queue_for(channel, due).await?;
        self.publish(channel, &queue, job).await
    }

    /// The queue of a job due at `due`: the work queue when due now, else the delay queue of
    /// its wait (declared first).
    async fn queue_for(&self, channel: &Channel, due: time::OffsetDateTime) -> Result<String, DomainError> {
        let delay = (due - time::OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO);
        if delay < Duration::from_millis(50) {
            return Ok(self.work_queue());
        }
        let ms = bucket(delay);
        let queue = format!("{}.delay.{ms}", self.prefix);
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongLongInt(ms as i64));
        args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString("".into()));
        args.insert(ShortString::from("x-dead-letter-routing-key"), AMQPValue::LongString(self.work_queue().into()));
        args.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(ms as i64 + 600_000));
        let declare = channel.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args);
        bounded(self.limit, declare).await.map_err(|e| unavailable("declare a delay queue", e))?;
        Ok(queue)
    }

    async fn ack(&self, channel: &Channel, job: &DeliveryJob) -> Result<(), DomainError> {
        let tag = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).complete(job.delivery_id);
        match tag {
            Some(tag) => self.ack_message(channel, tag).await,
            None => Ok(()),
        }
    }

    /// Acknowledges message `tag` of `channel`: the broker forgets it.
    async fn ack_message(&self, channel: &Channel, tag: u64) -> Result<(), DomainError> {
        bounded(self.limit, channel.basic_ack(tag, BasicAckOptions::default())).await.map_err(|e| unavailable("ack", e))
    }
}

#[async_trait]
impl DeliveryQueue for RabbitDeliveryQueue {
    #[tracing::instrument(skip_all, name = "delivery_queue.schedule", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn schedule(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError> {
        let channel = self.channel().await?;
        // A job rescheduled while held lets go of its message first (else its new message,
        // taken for a copy, would be completed unrun by this reschedule).
        let held = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).let_go(job.delivery_id);
        let published = self.publish_at(&channel, job, due).await;
        let done = held
            .and_then(|held| self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).replaced(job.delivery_id, held, published.is_ok()));
        if let Some(tag) = done {
            self.ack_message(&channel, tag).await?;
        }
        published
    }

    /// Jobs are published together, up to `jobs_per_message` in a message, those due now to the
    /// work queue and those due later to the delay queue of their wait (declared once for
    /// them), and the confirms awaited together (one round trip, not one a job).
    #[tracing::instrument(skip_all, name = "delivery_queue.schedule_each", fields(count = jobs.len()))]
    async fn schedule_each(&self, jobs: &[(DeliveryJob, time::OffsetDateTime)]) -> Result<(), DomainError> {
        let channel = self.channel().await?;
        // Jobs by queue, in the order their queues first appear.
        let mut by_queue: Vec<(String, Vec<&DeliveryJob>)> = Vec::new();
        let (mut last_due, mut current) = (None, 0);
        for (job, due) in jobs {
            // A batch's jobs mostly share their due time: their queue is looked up once.
            if last_due != Some(*due) {
                let queue = self.queue_for(&channel, *due).await?;
                current = match by_queue.iter().position(|(q, _)| *q == queue) {
                    Some(at) => at,
                    None => {
                        by_queue.push((queue, Vec::new()));
                        by_queue.len() - 1
                    }
                };
                last_due = Some(*due);
            }
            by_queue[current].1.push(job);
        }
        // Sent together, in order (one trip to lapin's I/O thread for them all, not one each),
        // then their confirms awaited.
        let messages =
            by_queue.iter().flat_map(|(queue, of_queue)| of_queue.chunks(self.jobs_per_message).map(move |together| (queue, together)));
        let confirms = futures_util::future::try_join_all(messages.map(|(queue, together)| self.send(&channel, queue, together))).await?;
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
        if consuming.as_ref().is_none_or(|c| c.generation != generation || c.ended) {
            let mut fresh = self.consume(&channel, generation).await?;
            // Jobs waiting from a consumer of this same channel are still held here.
            if let Some(old) = consuming.take().filter(|c| c.generation == generation) {
                fresh.waiting = old.waiting;
            }
            *consuming = Some(fresh);
        }
        let Some(Consuming { consumer, waiting, ended, .. }) = consuming.as_mut() else { return Ok(Vec::new()) };
        let max = max as usize;
        let mut jobs: Vec<DeliveryJob> = waiting.drain(..waiting.len().min(max)).collect();
        let mut first = jobs.is_empty();
        while jobs.len() < max {
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
                    *ended = true;
                    return if jobs.is_empty() { Err(unavailable("consume", e)) } else { Ok(jobs) };
                }
                None => {
                    // The broker cancelled the consumer (the queue was deleted, say): consume again next time.
                    *ended = true;
                    break;
                }
            };
            let tag = delivery.delivery_tag;
            let Some(received) = Message::jobs(&delivery.data).filter(|jobs| !jobs.is_empty()) else {
                tracing::warn!("dropping an unreadable delivery job");
                self.ack_message(&channel, tag).await?;
                continue;
            };
            let mut done = Vec::new();
            {
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if in_flight.generation != generation {
                    // Connected again meanwhile: this message's tag is of the old channel (whose
                    // unacknowledged messages the broker requeues), not to be confused with the
                    // new channel's tags.
                    *ended = true;
                    break;
                }
                in_flight.arrived(tag, u32::try_from(received.len()).unwrap_or(u32::MAX));
                for job in received {
                    let (new, finished) = in_flight.hold(job.delivery_id, tag);
                    done.extend(finished);
                    if !new {
                        continue;
                    }
                    if jobs.len() < max {
                        jobs.push(job);
                    } else {
                        waiting.push_back(job);
                    }
                }
            }
            for tag in done {
                // The messages whose jobs all came again in this one.
                let _ = self.ack_message(&channel, tag).await;
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
    use super::{Batch, InFlight, JobBody, Message, bucket};
    use im_domain::TenantId;
    use im_domain::webhooks::ports::DeliveryJob;
    use std::time::Duration;

    fn job(tenant: &str) -> DeliveryJob {
        DeliveryJob { tenant_id: TenantId::new(tenant).unwrap(), delivery_id: uuid::Uuid::new_v4() }
    }

    #[test]
    fn a_message_carries_one_job_or_several() {
        let (a, b) = (job("t-1"), job("t-2"));
        let one = serde_json::to_vec(&JobBody::from(&a)).unwrap();
        assert_eq!(Message::jobs(&one), Some(vec![a.clone()]));
        // The form of one job is the one every earlier version wrote and reads.
        let text = format!(r#"{{"tenantId":"t-1","deliveryId":"{}"}}"#, a.delivery_id);
        assert_eq!(Message::jobs(text.as_bytes()), Some(vec![a.clone()]));
        let both = serde_json::to_vec(&Batch { jobs: vec![JobBody::from(&a), JobBody::from(&b)] }).unwrap();
        assert_eq!(Message::jobs(&both), Some(vec![a, b]));
        for unreadable in [&b"not json"[..], br#"{"tenantId":"t-1"}"#, br#"{"jobs":[{"tenantId":"","deliveryId":"x"}]}"#, b"{}"] {
            assert_eq!(Message::jobs(unreadable), None, "{}", String::from_utf8_lossy(unreadable));
        }
    }

    #[test]
    fn a_job_rescheduled_by_its_holder_is_handed_out_again_from_its_new_message() {
        let mut in_flight = InFlight::default();
        let (c, d) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        in_flight.arrived(1, 2);
        assert_eq!(in_flight.hold(c, 1), (true, None));
        assert_eq!(in_flight.hold(d, 1), (true, None));
        // `schedule` lets go of `c` before publishing its new message, which may arrive at once.
        let held = in_flight.let_go(c).expect("c is held");
        in_flight.arrived(2, 1);
        assert_eq!(in_flight.hold(c, 2), (true, None), "the new message of a rescheduled job MUST be handed out, not dropped as a copy");
        // Published: the old message's share goes; `d` still holds it.
        assert_eq!(in_flight.replaced(c, held, true), None);
        assert_eq!(in_flight.complete(d), Some(1));
        assert_eq!(in_flight.complete(c), Some(2));
    }

    #[test]
    fn a_reschedule_that_was_not_published_leaves_the_job_held() {
        let mut in_flight = InFlight::default();
        let c = uuid::Uuid::new_v4();
        in_flight.arrived(1, 1);
        in_flight.hold(c, 1);
        let held = in_flight.let_go(c).expect("c is held");
        assert_eq!(in_flight.replaced(c, held, false), None, "a message whose job is still to run MUST NOT be acknowledged");
        assert_eq!(in_flight.complete(c), Some(1));
        // Across a new connection, the old message's tag means another message now.
        in_flight.arrived(1, 1);
        in_flight.hold(c, 1);
        let held = in_flight.let_go(c).expect("c is held");
        in_flight.reset(2);
        in_flight.arrived(1, 2);
        assert_eq!(in_flight.replaced(c, held, true), None);
        assert_eq!(in_flight.left.get(&1), Some(&2), "the new channel's message 1 MUST keep its count");
    }

    #[test]
    fn a_new_connection_forgets_the_tags_of_the_old_one() {
        let mut in_flight = InFlight::default();
        in_flight.reset(1);
        let a = uuid::Uuid::new_v4();
        in_flight.arrived(7, 1);
        assert_eq!(in_flight.hold(a, 7), (true, None));
        in_flight.reset(2);
        assert_eq!(in_flight.generation, 2);
        // Tag 7 of the old channel is not acknowledged on the new one, where it names another message.
        assert_eq!(in_flight.complete(a), None);
    }

    #[test]
    fn a_message_is_acknowledged_when_its_last_job_is_done() {
        let mut in_flight = InFlight::default();
        let (a, b, c) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        in_flight.arrived(1, 3);
        assert_eq!(in_flight.hold(a, 1), (true, None));
        assert_eq!(in_flight.hold(b, 1), (true, None));
        assert_eq!(in_flight.hold(c, 1), (true, None));
        assert_eq!(in_flight.complete(a), None);
        assert_eq!(in_flight.complete(a), None, "a job completed twice counts once");
        assert_eq!(in_flight.complete(b), None);
        // `c` comes again alone (a reschedule raced a redelivery): not handed out twice, and
        // its first message, with no job left now, is acknowledged.
        in_flight.arrived(2, 1);
        assert_eq!(in_flight.hold(c, 2), (false, Some(1)));
        assert_eq!(in_flight.complete(c), Some(2));
        assert!(in_flight.tags.is_empty() && in_flight.left.is_empty());
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket(Duration::from_millis(120)), 200);
        assert_eq!(bucket(Duration::from_millis(1000)), 1000);
        assert_eq!(bucket(Duration::from_millis(1001)), 2000);
        assert_eq!(bucket(Duration::from_secs(300)), 300_000);
        assert_eq!(bucket(Duration::from_secs(301)), 360_000);
    }
}
