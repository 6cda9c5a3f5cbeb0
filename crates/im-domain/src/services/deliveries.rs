use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{Audit, AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::common::{Clock, ETag, IdGenerator, Page, PageRequest, Stored, TenantId};
use crate::error::DomainError;
use crate::events::payloads::{DeliveryOutcomeData, EndpointDisabledData};
use crate::events::{DomainEvent, EventData, EventType};
use crate::ports::{AllEventsRead, EventReaders, EventSubscriber};
use crate::retry::{Backoff, Failure, retry};
use crate::webhooks::delivery::{
    ATTEMPT_LEASE, Attempt, AttemptTrigger, Delivery, DeliveryFilter, DeliveryStatus, Outcome, RESPONSE_EXCERPT_BYTES, classify,
    delivery_id, next_wait,
};
use crate::webhooks::endpoint::{TEST_EVENT_TYPE, Webhook, WebhookId, WebhookStatus};
use crate::webhooks::ports::{
    DeliveryJob, DeliveryQueue, DeliveryRepository, JobAfter, OutgoingRequest, SendResult, WebhookRepository, WebhookSender,
};
use crate::webhooks::signature::signature_header;

use super::WebhookService;

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Waits before each retry (the first attempt is immediate).
    pub retry_schedule: Vec<Duration>,
    /// An endpoint failing without a success for this long is disabled...
    pub disable_after: Duration,
    /// ...once it has failed at least this many attempts in a row.
    pub disable_min_failures: u32,
    /// The `user-agent` of every request.
    pub user_agent: String,
}

/// How long after a hold's end [`DeliveryService::requeue_ended_holds`] queues the attempt of a
/// delivery still held: a job that waits for the hold (an attempt's own, come back when its
/// hold ends; a throttled one's; a retry's) is left that long to take it first. A broker's
/// delay queues round waits over a minute up to the next whole minute: such a job may come up
/// to a minute late.
pub const ENDED_HOLD_GRACE: Duration = Duration::from_secs(90);

/// Fans events out to endpoints, makes signed attempts, records them, retries on schedule,
/// and publishes `webhook.delivered` / `webhook.failed` through the outbox.
#[derive(Clone)]
pub struct DeliveryService {
    webhooks: Arc<dyn WebhookRepository>,
    endpoints: WebhookService,
    deliveries: Arc<dyn DeliveryRepository>,
    queue: Arc<dyn DeliveryQueue>,
    /// The queue lives in the repository's database ([`DeliveryRepository::keeps_queue`]): a
    /// record and its job are written in one transaction.
    queue_in_store: bool,
    sender: Arc<dyn WebhookSender>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    settings: DeliverySettings,
    /// Per-endpoint send times of the last second, for `rateLimitPerSecond`.
    rates: Arc<Mutex<HashMap<WebhookId, Vec<OffsetDateTime>>>>,
    /// Per-endpoint times of manual sends (tests and retries) in the last window.
    manual: Arc<ManualSends>,
    audit: Audit,
    /// Who reads the outcome events (`webhook.delivered`, `webhook.failed`,
    /// `webhook.endpoint.disabled`): an outcome nobody reads is not written.
    readers: Arc<dyn EventReaders>,
}

/// Manual sends (`/test` and manual retries) an endpoint allows per minute, unless configured.
pub const DEFAULT_MANUAL_SENDS_PER_MINUTE: u32 = 10;
/// Endpoints whose recent manual sends are remembered (bounded: the least used are forgotten).
const MANUAL_SENDS_CAPACITY: usize = 10_000;

/// The rate of manual sends per endpoint, in this instance: a sliding window of one minute.
struct ManualSends {
    per_minute: u32,
    sent: crate::cache::BoundedCache<WebhookId, Vec<OffsetDateTime>>,
    /// Makes each read-check-write of `sent` one step.
    lock: Mutex<()>,
}

impl ManualSends {
    fn new(per_minute: u32) -> Self {
        Self { per_minute: per_minute.max(1), sent: crate::cache::bounded(MANUAL_SENDS_CAPACITY), lock: Mutex::new(()) }
    }

    /// Counts a manual send of `endpoint` at `now`, or refuses it with when to try again.
    fn admit(&self, endpoint: WebhookId, now: OffsetDateTime) -> Result<(), DomainError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut sent = self.sent.get(&endpoint).unwrap_or_default();
        sent.retain(|t| now - *t < time::Duration::MINUTE);
        if sent.len() >= self.per_minute as usize {
            let free_at = sent[0] + time::Duration::MINUTE;
            let wait = (free_at - now).whole_seconds().max(1) as u64;
            return Err(DomainError::TooManyRequests {
                reason: format!("at most {} test sends and manual retries per endpoint per minute", self.per_minute),
                retry_after: Duration::from_secs(wait),
            });
        }
        sent.push(now);
        self.sent.insert(endpoint, sent);
        Ok(())
    }
}

/// The `time` of a delivery's CloudEvents payload: when the event's change was committed.
fn committed_at(payload: &EventData) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&payload.str_member(&["time"])?, &time::format_description::well_known::Rfc3339).ok()
}

impl std::fmt::Debug for DeliveryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryService").field("settings", &self.settings).finish_non_exhaustive()
    }
}

fn excerpt(text: Option<String>) -> Option<String> {
    text.map(|mut t| {
        if t.len() > RESPONSE_EXCERPT_BYTES {
            let mut cut = RESPONSE_EXCERPT_BYTES;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
        }
        t
    })
}

/// Why a delivery whose endpoint's signing secret is gone failed.
const UNSIGNABLE: &str = "the endpoint's signing secret is gone from the secret store; rotate the secret to deliver again";
/// Times a scheduled attempt tries to take its delivery when other workers keep changing it.
const CLAIM_TRIES: u32 = 3;
/// How many times the failure streak of an endpoint is read and written again when the endpoint
/// changed in between.
const HEALTH_TRIES: u32 = 5;
/// A scheduled job that comes this long before its delivery's next attempt is a duplicate.
const EARLY_SLACK: time::Duration = time::Duration::seconds(2);

/// Whether an attempt is to be made now.
enum Prepared {
    Done(AttemptReport),
    Ready(Box<(Stored<Delivery>, Stored<Webhook>)>),
}

/// Where [`DeliveryService::fan_out_holding`] hands the first attempts this process makes itself.
pub trait FirstAttempts: Send {
    /// How many of `pending` new deliveries of one write (at most) this process will attempt
    /// itself now: the capacity is taken here, before they are written held.
    fn reserve(&mut self, pending: usize) -> usize;
    /// One of the reserved attempts, its delivery recorded held by this process: run it with
    /// [`DeliveryService::attempt_held`].
    fn start(&mut self, attempt: HeldAttempt);
    /// The write's attempts are all started: capacity reserved for it and not used (its
    /// deliveries existed already, or were not created) is given back now.
    fn release_unused(&mut self);
}

/// Makes no first attempt in the fan-out: every job goes to the queue.
struct NoFirstAttempts;

impl FirstAttempts for NoFirstAttempts {
    fn reserve(&mut self, _pending: usize) -> usize {
        0
    }

    fn start(&mut self, _attempt: HeldAttempt) {}

    fn release_unused(&mut self) {}
}

/// A first attempt handed out by [`DeliveryService::fan_out_holding`]: the delivery as it was
/// created (held by this process), and its endpoint as the fan-out read it.
pub struct HeldAttempt {
    job: DeliveryJob,
    delivery: Stored<Delivery>,
    webhook: Webhook,
}

impl HeldAttempt {
    /// The job that stands for this attempt (not queued: the hold sweep queues it should the
    /// attempt never be recorded).
    #[must_use]
    pub fn job(&self) -> &DeliveryJob {
        &self.job
    }
}

/// What [`DeliveryService::attempt`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptReport {
    /// The receiver took it; `committed_at`: when the event it carries was committed (its
    /// CloudEvents `time`), for the commit-to-receipt latency.
    Delivered {
        committed_at: Option<OffsetDateTime>,
    },
    RetryAt(OffsetDateTime),
    Failed,
    /// Waiting for the endpoint's rate limit; the job was rescheduled.
    Throttled,
    /// The attempt could not be made (a dependency failed); it waits for `at`.
    Postponed {
        at: OffsetDateTime,
        reason: String,
    },
    /// Nothing to do (already final, or the delivery or endpoint is gone).
    Nothing,
}

impl DeliveryService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        webhooks: Arc<dyn WebhookRepository>,
        endpoints: WebhookService,
        deliveries: Arc<dyn DeliveryRepository>,
        queue: Arc<dyn DeliveryQueue>,
        sender: Arc<dyn WebhookSender>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        settings: DeliverySettings,
        audit: Audit,
    ) -> Self {
        let manual = Arc::new(ManualSends::new(DEFAULT_MANUAL_SENDS_PER_MINUTE));
        let queue_in_store = deliveries.keeps_queue();
        let readers = Arc::new(AllEventsRead);
        Self {
            webhooks,
            endpoints,
            deliveries,
            queue,
            queue_in_store,
            sender,
            clock,
            ids,
            settings,
            rates: Arc::default(),
            manual,
            audit,
            readers,
        }
    }

    /// Writes an outcome event only when `readers` read its type (by default every event is
    /// written). With no broker, the in-process bus is the only reader, and its webhook fan-out
    /// never sends `webhook.*` events: writing them would cost three writes per delivery
    /// (the event, its claim, its removal) for nobody.
    #[must_use]
    pub fn with_event_readers(mut self, readers: Arc<dyn EventReaders>) -> Self {
        self.readers = readers;
        self
    }

    /// Whether deliveries and their jobs are written in one transaction (the queue lives in the
    /// repository's database), so that fanning out a batch at once costs one write.
    #[must_use]
    pub fn queue_in_store(&self) -> bool {
        self.queue_in_store
    }

    /// Manual sends (`/test` and manual retries) each endpoint allows per minute (at least 1).
    #[must_use]
    pub fn with_manual_sends_per_minute(mut self, per_minute: u32) -> Self {
        self.manual = Arc::new(ManualSends::new(per_minute));
        self
    }

    /// Checks, before a request is even read, that the caller may act on deliveries (members).
    ///
    /// # Errors
    /// `Forbidden`, recorded in the audit log.
    pub async fn authorize(&self, caller: &Caller, action: AuditAction) -> Result<(), DomainError> {
        self.audit.require(caller, Role::Member, AuditResource::Webhook, action).await
    }

    pub fn queue(&self) -> &Arc<dyn DeliveryQueue> {
        &self.queue
    }

    async fn all_endpoints(&self, tenant: &TenantId) -> Result<Vec<Webhook>, DomainError> {
        let mut all = Vec::new();
        let mut page = PageRequest::first(200);
        loop {
            let result = self.webhooks.list(tenant, &page).await?;
            all.extend(result.items.into_iter().map(|s| s.value));
            match result.continuation {
                Some(token) => page = PageRequest { limit: 200, continuation: Some(token) },
                None => return Ok(all),
            }
        }
    }

    fn new_delivery(
        &self,
        webhook: &Webhook,
        message_id: String,
        event_type: &str,
        payload: EventData,
        status: DeliveryStatus,
    ) -> Delivery {
        let now = self.clock.now();
        Delivery {
            id: delivery_id(webhook.id, &message_id),
            tenant_id: webhook.tenant_id.clone(),
            webhook_id: webhook.id,
            message_id,
            event_type: event_type.to_owned(),
            payload,
            status,
            attempts: Vec::new(),
            older_attempts: 0,
            next_attempt_at: (status == DeliveryStatus::Pending).then_some(now),
            lease_until: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Records a delivery for every endpoint of the event's tenant that wants it (skipped when
    /// the endpoint is disabled) and queues its first attempt. Idempotent by event id.
    pub async fn fan_out(&self, event: &DomainEvent) -> Result<usize, DomainError> {
        self.fan_out_all(std::slice::from_ref(event)).await
    }

    /// [`Self::fan_out`] for a batch of events: each tenant's endpoints are listed once for the
    /// batch, and each tenant's deliveries are created in one write, with their jobs when the
    /// queue lives in the same database (else each job is queued after its record). Idempotent
    /// by event id: returns how many first attempts were queued.
    pub async fn fan_out_all(&self, events: &[DomainEvent]) -> Result<usize, DomainError> {
        self.fan_out_holding(events, &mut NoFirstAttempts).await
    }

    /// [`Self::fan_out_all`], where this process makes first attempts itself when the queue is
    /// elsewhere (a broker): `first` says how many of each write's new pending deliveries it
    /// will attempt now, those are created held by it (`lease_until`, [`ATTEMPT_LEASE`] ahead,
    /// as an attempt's own hold), and each is handed to `first` as soon as the write is
    /// committed, before the other jobs are queued. They get no job: the attempt, recorded,
    /// releases the hold (the delivery is final, or its retry's own job is queued), and should
    /// this process die before recording it, [`Self::requeue_ended_holds`] (any instance's)
    /// queues its job once the hold has ended. No trip through the queue, no hold of its own
    /// and no message to the broker between the event and its first attempt. With the queue in
    /// the store, or when `first` takes none, every job is queued for the dispatchers as before.
    ///
    /// # Errors
    /// As [`Self::fan_out_all`]; attempts handed to `first` before an error stand (their
    /// deliveries are recorded, and a fan-out handled again finds them).
    pub async fn fan_out_holding(&self, events: &[DomainEvent], first: &mut dyn FirstAttempts) -> Result<usize, DomainError> {
        let mut tenants: Vec<(&TenantId, Vec<&DomainEvent>)> = Vec::new();
        for event in events.iter().filter(|e| crate::webhooks::endpoint::DELIVERABLE.contains(&e.event_type)) {
            match tenants.iter_mut().find(|(tenant, _)| **tenant == event.tenant_id) {
                Some((_, of_tenant)) => of_tenant.push(event),
                None => tenants.push((&event.tenant_id, vec![event])),
            }
        }
        let mut queued = 0;
        for (tenant, events) in tenants {
            let endpoints = self.all_endpoints(tenant).await?;
            let mut deliveries: Vec<(Delivery, &Webhook)> = events
                .iter()
                .flat_map(|event| {
                    // The payload written out once an event, its text copied for each endpoint.
                    let mut payload = None;
                    endpoints.iter().filter(|w| w.wants(event)).map(move |webhook| {
                        let status =
                            if webhook.status == WebhookStatus::Enabled { DeliveryStatus::Pending } else { DeliveryStatus::Skipped };
                        let payload = payload.get_or_insert_with(|| event.cloud_event_text()).clone();
                        (self.new_delivery(webhook, event.id.to_string(), event.event_type.as_str(), payload, status), webhook)
                    })
                })
                .collect();
            if deliveries.is_empty() {
                continue;
            }
            if !self.queue_in_store {
                let pending = deliveries.iter().filter(|(d, _)| d.status == DeliveryStatus::Pending).count();
                let held = first.reserve(pending);
                let until = self.hold_until();
                for (delivery, _) in deliveries.iter_mut().filter(|(d, _)| d.status == DeliveryStatus::Pending).take(held) {
                    delivery.lease_until = Some(until);
                }
            }
            let (deliveries, webhooks): (Vec<Delivery>, Vec<&Webhook>) = deliveries.into_iter().unzip();
            let outcomes = if self.queue_in_store {
                self.deliveries.create_each_queued(&deliveries).await?
            } else {
                self.deliveries.create_each(&deliveries).await?
            };
            if outcomes.len() != deliveries.len() {
                return Err(DomainError::Unexpected(anyhow::anyhow!(
                    "the delivery store answered {} outcomes for {} deliveries",
                    outcomes.len(),
                    deliveries.len()
                )));
            }
            // New deliveries' first jobs (none for those attempted here), sent together when the
            // queue is elsewhere.
            let mut first_jobs = Vec::new();
            let mut replayed = Vec::new();
            // A store that creates one by one may fail partway: what it created is started or
            // queued all the same (a held one would otherwise wait for its hold's end), and the
            // failure is answered once that is done.
            let mut failed = None;
            // The records move to their first attempts (and to the replayed ones' checks), not copied.
            for ((delivery, webhook), outcome) in deliveries.into_iter().zip(webhooks).zip(outcomes) {
                let job = DeliveryJob { tenant_id: delivery.tenant_id.clone(), delivery_id: delivery.id };
                match outcome {
                    Ok(etag) if delivery.status == DeliveryStatus::Pending => {
                        queued += 1;
                        if self.queue_in_store {
                            continue;
                        }
                        if delivery.lease_until.is_some() {
                            first.start(HeldAttempt { job, delivery: Stored { value: delivery, etag }, webhook: webhook.clone() });
                        } else {
                            first_jobs.push((job, delivery.next_attempt_at.unwrap_or(delivery.created_at)));
                        }
                    }
                    Ok(_) => {}
                    Err(DomainError::Conflict(_)) => replayed.push((delivery, job)),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            // Capacity reserved for deliveries that existed or failed goes back now, and what
            // was created is queued before the replayed ones are looked at.
            first.release_unused();
            if !first_jobs.is_empty() {
                self.queue.schedule_each(&first_jobs).await?;
            }
            for (delivery, job) in replayed {
                // Fanned out before (events arrive at least once). A crash may have come
                // between recording the delivery and queueing it (a queue elsewhere): queue it
                // if nothing is, at the time it waits for, without touching a queued or running
                // attempt.
                let existing = self.deliveries.get(&delivery.tenant_id, delivery.id).await?.value;
                if existing.status == DeliveryStatus::Pending {
                    let due = existing.next_attempt_at.unwrap_or_else(|| self.clock.now());
                    self.queue.schedule_if_absent(&job, due.max(existing.lease_until.unwrap_or(due))).await?;
                }
            }
            if let Some(error) = failed {
                return Err(error);
            }
        }
        Ok(queued)
    }

    /// Makes a first attempt [`Self::fan_out_holding`] handed out: the delivery is held by this
    /// process since its creation, so it is sent at once (or, over the endpoint's rate, held
    /// until then and its job rescheduled) and recorded like any scheduled attempt. The endpoint
    /// is the one the fan-out read just before its write: one disabled or deleted in between
    /// still gets this attempt, as it would one already taken by a dispatcher.
    ///
    /// # Errors
    /// As [`Self::attempt`]; the delivery then stays held until its hold ends, and
    /// [`Self::requeue_ended_holds`] queues its job.
    pub async fn attempt_held(&self, held: HeldAttempt) -> Result<AttemptReport, DomainError> {
        let HeldAttempt { job, delivery, webhook } = held;
        // Boxed, as each try of `attempt` is: this future is spawned as a task.
        Box::pin(self.hold_and_send(&job, AttemptTrigger::Scheduled, delivery.value, delivery.etag, webhook)).await
    }

    /// Queues the job of each pending delivery whose hold ended [`ENDED_HOLD_GRACE`] ago or
    /// more (at most `limit` of them, the earliest ended first): the first attempts an
    /// instance took in its fan-out ([`Self::fan_out_holding`], which queues no job for them)
    /// and died before recording, and the retries whose job was never queued (an attempt's
    /// retry is recorded held until it is due, and its job queued after: the instance stopped
    /// in between, or the broker refused it). Every instance with workers calls this from time
    /// to time; the grace leaves a delivery whose own job waits for the hold (an attempt's job
    /// come back when its hold ends, a throttled one's, a retry's) to that job. Each delivery
    /// found is claimed first, by moving its hold's end to now with a write conditional on the
    /// version read, and its job queued only then: of several instances sweeping together, one
    /// queues it; one whose job or attempt changed it meanwhile is left to that. A crash (or a
    /// refused publish) after the claim leaves the delivery to be found again after the grace.
    /// Returns the jobs queued. Nothing to do with the queue in the store (no delivery is held
    /// without its job there).
    ///
    /// # Errors
    /// When the store or the queue cannot be read or written (the rest waits for the next call).
    pub async fn requeue_ended_holds(&self, limit: u32) -> Result<Vec<DeliveryJob>, DomainError> {
        if self.queue_in_store {
            return Ok(Vec::new());
        }
        let now = self.clock.now();
        let before = now - time::Duration::try_from(ENDED_HOLD_GRACE).unwrap_or(time::Duration::MINUTE);
        let mut requeued = Vec::new();
        for Stored { value: mut delivery, etag } in self.deliveries.holds_ended_before(before, limit).await? {
            // Judged again here, as the port promises.
            if delivery.status != DeliveryStatus::Pending || delivery.lease_until.is_none_or(|until| until >= before) {
                continue;
            }
            delivery.lease_until = Some(now);
            match self.deliveries.replace(&delivery, Some(etag), &[]).await {
                Ok(_) => {}
                // Changed meanwhile (its job, its attempt or another instance's sweep came
                // first): left to that.
                Err(DomainError::PreconditionFailed | DomainError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
            let job = DeliveryJob { tenant_id: delivery.tenant_id.clone(), delivery_id: delivery.id };
            self.queue.schedule(&job, delivery.next_attempt_at.map_or(now, |at| at.max(now))).await?;
            requeued.push(job);
        }
        Ok(requeued)
    }

    /// When a hold taken now ends: [`ATTEMPT_LEASE`] ahead.
    fn hold_until(&self) -> OffsetDateTime {
        self.clock.now() + time::Duration::try_from(ATTEMPT_LEASE).unwrap_or(time::Duration::MINUTE)
    }

    fn over_rate(&self, webhook: &Webhook) -> Option<OffsetDateTime> {
        let limit = webhook.rate_limit_per_second? as usize;
        let now = self.clock.now();
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let sent = rates.entry(webhook.id).or_default();
        sent.retain(|t| now - *t < time::Duration::SECOND);
        if sent.len() >= limit {
            return Some(sent[0] + time::Duration::SECOND);
        }
        sent.push(now);
        None
    }

    /// Sends one signed attempt of a delivery and records it.
    async fn send(&self, webhook: &Webhook, delivery: &Delivery) -> Result<SendResult, DomainError> {
        let secrets = self.endpoints.signing_secrets(webhook).await?;
        let body = delivery.payload.as_str().as_bytes().to_vec();
        let timestamp = self.clock.now().unix_timestamp();
        let refs: Vec<_> = secrets.iter().collect();
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("user-agent".to_owned(), self.settings.user_agent.clone()),
            ("webhook-id".to_owned(), delivery.message_id.clone()),
            ("webhook-timestamp".to_owned(), timestamp.to_string()),
            ("webhook-signature".to_owned(), signature_header(&refs, &delivery.message_id, timestamp, &body)),
        ];
        headers.extend(self.endpoints.custom_headers(webhook).await?);
        Ok(self.sender.send(OutgoingRequest { url: webhook.url.clone(), headers, body }).await)
    }

    fn outcome_event(&self, delivery: &Delivery, event_type: EventType) -> DomainEvent {
        DomainEvent {
            id: self.ids.new_uuid(),
            event_type,
            tenant_id: delivery.tenant_id.clone(),
            subject: delivery.id.to_string(),
            time: self.clock.now(),
            data: EventData::of(&DeliveryOutcomeData::from(delivery)).unwrap_or_default(),
        }
    }

    /// Makes the attempt a queued job stands for (or a manual one), records it, and decides
    /// what comes next. The job is completed or rescheduled before this returns.
    ///
    /// A scheduled job runs only when its delivery is pending, due, and not held by an attempt
    /// in progress; it then holds the delivery (a conditional write) for [`ATTEMPT_LEASE`]
    /// while it sends. A duplicate job (a replayed event, a job queued twice) therefore finds
    /// the delivery held, not yet due, or final, and is dropped: one chain of attempts per
    /// delivery, never two. When the queue lives in the store, a scheduled job must have been
    /// taken from it (leased for [`ATTEMPT_LEASE`]): that lease is the hold, so no hold is written.
    pub async fn attempt(&self, job: &DeliveryJob, trigger: AttemptTrigger) -> Result<AttemptReport, DomainError> {
        // Each try boxed: it holds the delivery, its endpoint and the futures of the send and
        // the record (5,944 bytes in a debug build), and this future is what a dispatcher
        // spawns as a task: tokio copied it whole when it was spawned and when it ended, and
        // the dispatcher's `async` block when it awaited it.
        retry(Backoff::immediate(CLAIM_TRIES), |_| Box::pin(self.claim_and_attempt(job, trigger)), |_| std::future::ready(())).await
    }

    /// One try of [`Self::attempt`]. Losing the race for the hold, or finding the delivery
    /// changed while preparing (the skip's conditional write failed), are the failures worth
    /// looking again for (transient); every other error ends the attempt as it is.
    async fn claim_and_attempt(&self, job: &DeliveryJob, trigger: AttemptTrigger) -> Result<AttemptReport, Failure<DomainError>> {
        let prepared = self.prepare(job, trigger).await.map_err(|e| match e {
            // The delivery it read was out of date (a version a store handed it, which another
            // writer changed since): read it again.
            DomainError::PreconditionFailed => {
                Failure::Transient(DomainError::unavailable(format!("delivery {} changed while being prepared", job.delivery_id)))
            }
            e => Failure::Permanent(e),
        })?;
        let (stored, webhook) = match prepared {
            Prepared::Done(report) => return Ok(report),
            Prepared::Ready(ready) => *ready,
        };
        if trigger == AttemptTrigger::Manual {
            if let Some(at) = self.over_rate(&webhook.value) {
                self.queue.schedule(job, at).await.map_err(Failure::Permanent)?;
                return Ok(AttemptReport::Throttled);
            }
            return self.send_and_record(job, trigger, stored, webhook.value).await.map_err(Failure::Permanent);
        }
        if self.queue_in_store {
            // The job, leased to this worker by the take in the same database (one job per
            // delivery, never handed to two workers while leased), already holds the delivery:
            // no second write. Both leases are `ATTEMPT_LEASE` long.
            return self.hold_and_send(job, trigger, stored.value, stored.etag, webhook.value).await.map_err(Failure::Permanent);
        }
        let Stored { value: mut held, etag } = stored;
        held.lease_until = Some(self.hold_until());
        match self.deliveries.replace(&held, Some(etag), &[]).await {
            Ok(etag) => self.hold_and_send(job, trigger, held, etag, webhook.value).await.map_err(Failure::Permanent),
            // Another worker took it first: look again (it is held now, or done).
            Err(DomainError::PreconditionFailed) => {
                Err(Failure::Transient(DomainError::unavailable(format!("delivery {} kept changing while being claimed", job.delivery_id))))
            }
            Err(e) => Err(Failure::Permanent(e)),
        }
    }

    /// Sends the attempt of a delivery this worker now holds (as `etag`), or, when the
    /// endpoint's rate does not allow it yet, holds it only until then and reschedules the job.
    async fn hold_and_send(
        &self,
        job: &DeliveryJob,
        trigger: AttemptTrigger,
        mut held: Delivery,
        etag: ETag,
        webhook: Webhook,
    ) -> Result<AttemptReport, DomainError> {
        if let Some(at) = self.over_rate(&webhook) {
            held.lease_until = Some(at);
            self.deliveries.replace(&held, Some(etag), &[]).await?;
            self.queue.schedule(job, at).await?;
            return Ok(AttemptReport::Throttled);
        }
        self.send_and_record(job, trigger, Stored { value: held, etag }, webhook).await
    }

    /// Decides whether the job's attempt is to be made now, and completes or reschedules the
    /// job when it is not.
    async fn prepare(&self, job: &DeliveryJob, trigger: AttemptTrigger) -> Result<Prepared, DomainError> {
        // A scheduled attempt may be handed the version its store wrote or queued moments ago:
        // its first write, the hold (or the skip), is conditional on it. A manual one sends
        // before it writes: it reads the current version.
        let read = match trigger {
            AttemptTrigger::Scheduled => self.deliveries.get_for_attempt(&job.tenant_id, job.delivery_id).await,
            AttemptTrigger::Manual => self.deliveries.get(&job.tenant_id, job.delivery_id).await,
        };
        let stored = match read {
            Ok(stored) => stored,
            Err(DomainError::NotFound { .. }) => {
                self.queue.complete(job).await?;
                return Ok(Prepared::Done(AttemptReport::Nothing));
            }
            Err(e) => return Err(e),
        };
        if trigger == AttemptTrigger::Scheduled {
            let now = self.clock.now();
            let delivery = &stored.value;
            if delivery.status != DeliveryStatus::Pending {
                self.queue.complete(job).await?;
                return Ok(Prepared::Done(AttemptReport::Nothing));
            }
            if delivery.next_attempt_at.is_some_and(|at| at > now + EARLY_SLACK) {
                // The attempt due now was made already; the job for the next one is queued (a
                // retry recorded with the queue elsewhere is held until it is due, so that the
                // hold sweep queues it should that job be missing).
                self.queue.complete(job).await?;
                return Ok(Prepared::Done(AttemptReport::Nothing));
            }
            if let Some(until) = delivery.lease_until.filter(|until| *until > now) {
                // An attempt is in progress, or its worker died: look again when its hold ends.
                self.queue.schedule(job, until).await?;
                return Ok(Prepared::Done(AttemptReport::Nothing));
            }
        }
        let webhook = match self.webhooks.get(&job.tenant_id, stored.value.webhook_id).await {
            Ok(w) => w,
            Err(DomainError::NotFound { .. }) => {
                self.queue.complete(job).await?;
                return Ok(Prepared::Done(AttemptReport::Nothing));
            }
            Err(e) => return Err(e),
        };
        if trigger == AttemptTrigger::Scheduled && webhook.value.status == WebhookStatus::Disabled {
            let mut delivery = stored.value.clone();
            delivery.status = DeliveryStatus::Skipped;
            delivery.next_attempt_at = None;
            delivery.updated_at = self.clock.now();
            self.record(job, &delivery, stored.etag, &[], JobAfter::Complete).await?;
            return Ok(Prepared::Done(AttemptReport::Nothing));
        }
        Ok(Prepared::Ready(Box::new((stored, webhook))))
    }

    /// Sends the attempt of a delivery this worker may make now, records it (releasing the
    /// hold), and completes or reschedules the job.
    async fn send_and_record(
        &self,
        job: &DeliveryJob,
        trigger: AttemptTrigger,
        stored: Stored<Delivery>,
        webhook: Webhook,
    ) -> Result<AttemptReport, DomainError> {
        let result = match self.send(&webhook, &stored.value).await {
            Ok(result) => result,
            Err(DomainError::NotFound { .. }) => return self.fail_unsignable(job, stored).await,
            Err(error) if trigger == AttemptTrigger::Scheduled => return self.postpone(job, stored, &error).await,
            Err(error) => return Err(error),
        };
        let now = self.clock.now();
        let Stored { value: mut delivery, etag } = stored;
        delivery.lease_until = None;
        delivery.record(Attempt {
            at: now,
            trigger,
            status_code: result.status,
            duration_ms: result.duration.as_millis() as u64,
            response_excerpt: excerpt(result.body_excerpt.clone()),
            error: result.error.clone(),
        });
        delivery.updated_at = now;
        let scheduled_attempts = delivery.attempts.iter().filter(|a| a.trigger == AttemptTrigger::Scheduled).count();
        let outcome = classify(result.status, result.retry_after);
        let disabled_because = self.track_health(&webhook, &outcome).await?;
        let (report, mut events) = match outcome {
            Outcome::Delivered => {
                delivery.status = DeliveryStatus::Succeeded;
                delivery.next_attempt_at = None;
                let committed_at = committed_at(&delivery.payload);
                (AttemptReport::Delivered { committed_at }, vec![EventType::WebhookDelivered])
            }
            Outcome::Gone => {
                delivery.status = DeliveryStatus::Failed;
                delivery.next_attempt_at = None;
                (AttemptReport::Failed, vec![EventType::WebhookFailed])
            }
            Outcome::Retry { retry_after } => {
                let jitter = f64::from(self.ids.new_uuid().as_u128() as u32) / f64::from(u32::MAX);
                let retries_done = scheduled_attempts.saturating_sub(1);
                match (trigger, next_wait(&self.settings.retry_schedule, retries_done, jitter, retry_after)) {
                    (AttemptTrigger::Manual, _) if delivery.status != DeliveryStatus::Pending => (AttemptReport::Failed, Vec::new()),
                    (_, Some(wait)) => {
                        let at = now + time::Duration::try_from(wait).unwrap_or(time::Duration::HOUR);
                        delivery.status = DeliveryStatus::Pending;
                        delivery.next_attempt_at = Some(at);
                        (AttemptReport::RetryAt(at), Vec::new())
                    }
                    (_, None) => {
                        delivery.status = DeliveryStatus::Failed;
                        delivery.next_attempt_at = None;
                        (AttemptReport::Failed, vec![EventType::WebhookFailed])
                    }
                }
            }
        };
        if disabled_because.is_some() {
            events.push(EventType::WebhookEndpointDisabled);
        }
        let events: Vec<_> = events
            .into_iter()
            .filter(|t| self.readers.reads(*t))
            .map(|t| match (t, &disabled_because) {
                (EventType::WebhookEndpointDisabled, Some(reason)) => self.disabled_event(&webhook, reason),
                (t, _) => self.outcome_event(&delivery, t),
            })
            .collect();
        let next = match report {
            AttemptReport::RetryAt(at) => JobAfter::RetryAt(at),
            _ => JobAfter::Complete,
        };
        self.record(job, &delivery, etag, &events, next).await?;
        Ok(report)
    }

    /// Writes a delivery conditionally on `etag`, with `events`, and then its job: in one
    /// transaction when the queue lives in the same database, else the record first (a crash
    /// in between leaves the job leased: it runs again and finds the delivery recorded; a
    /// retry is recorded held until it is due, which the hold sweep covers should its job be
    /// missing).
    async fn record(
        &self,
        job: &DeliveryJob,
        delivery: &Delivery,
        etag: ETag,
        events: &[DomainEvent],
        next: JobAfter,
    ) -> Result<(), DomainError> {
        if self.queue_in_store {
            self.deliveries.replace_queued(delivery, Some(etag), events, next).await?;
            return Ok(());
        }
        match next {
            JobAfter::RetryAt(at) => {
                // Recorded held until it is due, as a throttled attempt is: should its job never
                // be queued (this process stops before, or the queue refuses it; a first attempt
                // made by the fan-out has no message of its own to come back), the hold sweep
                // finds it once that hold has ended.
                let held = Delivery { lease_until: Some(at), ..delivery.clone() };
                self.deliveries.replace(&held, Some(etag), events).await?;
                self.queue.schedule(job, at).await
            }
            JobAfter::Complete => {
                self.deliveries.replace(delivery, Some(etag), events).await?;
                self.queue.complete(job).await
            }
        }
    }

    /// The endpoint's signing secret is gone from the secret store: no attempt can ever be
    /// signed, so the delivery ends `failed` with the reason, instead of repeating until it expires.
    async fn fail_unsignable(&self, job: &DeliveryJob, stored: Stored<Delivery>) -> Result<AttemptReport, DomainError> {
        let now = self.clock.now();
        let mut delivery = stored.value;
        delivery.record(Attempt {
            at: now,
            trigger: AttemptTrigger::Scheduled,
            status_code: None,
            duration_ms: 0,
            response_excerpt: None,
            error: Some(UNSIGNABLE.to_owned()),
        });
        delivery.status = DeliveryStatus::Failed;
        delivery.next_attempt_at = None;
        delivery.lease_until = None;
        delivery.updated_at = now;
        let failed: Vec<_> = self
            .readers
            .reads(EventType::WebhookFailed)
            .then(|| self.outcome_event(&delivery, EventType::WebhookFailed))
            .into_iter()
            .collect();
        self.record(job, &delivery, stored.etag, &failed, JobAfter::Complete).await?;
        Ok(AttemptReport::Failed)
    }

    /// An attempt that could not be made (the secret store is unavailable): the delivery is
    /// released and waits for the next step of its schedule, and so does its job; no attempt is
    /// recorded, since no request was sent.
    async fn postpone(&self, job: &DeliveryJob, stored: Stored<Delivery>, error: &DomainError) -> Result<AttemptReport, DomainError> {
        let now = self.clock.now();
        let made = stored.value.attempts.iter().filter(|a| a.trigger == AttemptTrigger::Scheduled).count();
        let schedule = &self.settings.retry_schedule;
        let wait = schedule.get(made.saturating_sub(1)).or(schedule.last()).copied().unwrap_or(Duration::from_secs(5));
        let at = now + time::Duration::try_from(wait).unwrap_or(time::Duration::MINUTE);
        let mut delivery = stored.value;
        delivery.lease_until = None;
        delivery.next_attempt_at = Some(at);
        delivery.updated_at = now;
        self.record(job, &delivery, stored.etag, &[], JobAfter::RetryAt(at)).await?;
        Ok(AttemptReport::Postponed { at, reason: error.to_string() })
    }

    /// Updates the endpoint's failure streak after an attempt and disables it on 410 Gone, or
    /// when it has failed without a success for `disable_after` and at least
    /// `disable_min_failures` attempts. Returns the reason when it was disabled now.
    async fn track_health(&self, webhook: &Webhook, outcome: &Outcome) -> Result<Option<String>, DomainError> {
        if *outcome == Outcome::Delivered && webhook.failing_since.is_none() && webhook.consecutive_failures == 0 {
            // Healthy and still healthy: nothing to write (the common case).
            return Ok(None);
        }
        let tracked =
            retry(Backoff::immediate(HEALTH_TRIES), |_| self.track_health_once(webhook, outcome), |_| std::future::ready(())).await;
        match tracked {
            // Others kept changing the endpoint: their writes carry the streak on.
            Err(DomainError::PreconditionFailed) => Ok(None),
            other => other,
        }
    }

    /// One read and conditional write of [`Self::track_health`]; losing the race to another
    /// writer is transient.
    async fn track_health_once(&self, webhook: &Webhook, outcome: &Outcome) -> Result<Option<String>, Failure<DomainError>> {
        let current = self.webhooks.get(&webhook.tenant_id, webhook.id).await.map_err(Failure::Permanent)?;
        let now = self.clock.now();
        let mut next = current.value.clone();
        let mut disabled_now = None;
        match outcome {
            Outcome::Delivered => {
                if next.failing_since.is_none() && next.consecutive_failures == 0 {
                    return Ok(None);
                }
                next.failing_since = None;
                next.consecutive_failures = 0;
            }
            Outcome::Gone | Outcome::Retry { .. } => {
                let since = *next.failing_since.get_or_insert(now);
                next.consecutive_failures = next.consecutive_failures.saturating_add(1);
                let too_long = now - since >= time::Duration::try_from(self.settings.disable_after).unwrap_or(time::Duration::MAX);
                let reason = match outcome {
                    Outcome::Gone => Some("the endpoint answered 410 Gone".to_owned()),
                    _ if too_long && next.consecutive_failures >= self.settings.disable_min_failures => Some(format!(
                        "every attempt failed since {} ({} in a row)",
                        since.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                        next.consecutive_failures
                    )),
                    _ => None,
                };
                if let Some(reason) = reason
                    && next.status == WebhookStatus::Enabled
                {
                    next.status = WebhookStatus::Disabled;
                    next.disabled_reason = Some(reason.clone());
                    disabled_now = Some(reason);
                }
            }
        }
        next.updated_at = now;
        match self.webhooks.replace(&next, Some(current.etag)).await {
            Ok(_) => Ok(disabled_now),
            Err(e @ DomainError::PreconditionFailed) => Err(Failure::Transient(e)),
            Err(e) => Err(Failure::Permanent(e)),
        }
    }

    fn disabled_event(&self, webhook: &Webhook, reason: &str) -> DomainEvent {
        DomainEvent {
            id: self.ids.new_uuid(),
            event_type: EventType::WebhookEndpointDisabled,
            tenant_id: webhook.tenant_id.clone(),
            subject: webhook.id.to_string(),
            time: self.clock.now(),
            data: EventData::of(&EndpointDisabledData::new(webhook, reason)).unwrap_or_default(),
        }
    }

    pub async fn list(
        &self,
        caller: &Caller,
        webhook: WebhookId,
        filter: &DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Delivery>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.webhooks.get(&caller.tenant_id, webhook).await?;
        self.deliveries.list(&caller.tenant_id, webhook, filter, page).await
    }

    pub async fn get(&self, caller: &Caller, webhook: WebhookId, id: Uuid) -> Result<Stored<Delivery>, DomainError> {
        caller.require(Role::Viewer)?;
        let delivery = self.deliveries.get(&caller.tenant_id, id).await?;
        if delivery.value.webhook_id != webhook {
            return Err(DomainError::not_found("delivery", id));
        }
        Ok(delivery)
    }

    /// A manual attempt now, whatever the delivery's status.
    pub async fn retry(&self, caller: &Caller, webhook: WebhookId, id: Uuid) -> Result<Stored<Delivery>, DomainError> {
        let result = self.retry_unaudited(caller, webhook, id).await;
        self.audit
            .result(caller, AuditResource::Delivery, AuditAction::Retry, Some(id.to_string()), &result, |_| {
                (String::new(), serde_json::Value::Null)
            })
            .await;
        result
    }

    async fn retry_unaudited(&self, caller: &Caller, webhook: WebhookId, id: Uuid) -> Result<Stored<Delivery>, DomainError> {
        caller.require(Role::Member)?;
        let delivery = self.get(caller, webhook, id).await?;
        self.manual.admit(webhook, self.clock.now())?;
        let job = DeliveryJob { tenant_id: caller.tenant_id.clone(), delivery_id: delivery.value.id };
        self.attempt(&job, AttemptTrigger::Manual).await?;
        self.deliveries.get(&caller.tenant_id, id).await
    }

    /// Re-queues every failed or skipped delivery of an endpoint created since `since`.
    pub async fn recover(&self, caller: &Caller, webhook: WebhookId, since: OffsetDateTime) -> Result<usize, DomainError> {
        let result = self.recover_unaudited(caller, webhook, since).await;
        self.audit
            .result(caller, AuditResource::Webhook, AuditAction::Recover, Some(webhook.to_string()), &result, |n| {
                (String::new(), serde_json::json!({ "recovered": n }))
            })
            .await;
        result
    }

    async fn recover_unaudited(&self, caller: &Caller, webhook: WebhookId, since: OffsetDateTime) -> Result<usize, DomainError> {
        caller.require(Role::Member)?;
        self.webhooks.get(&caller.tenant_id, webhook).await?;
        let mut recovered = 0;
        for status in [DeliveryStatus::Failed, DeliveryStatus::Skipped] {
            let filter = DeliveryFilter { status: Some(status), since: Some(since), ..DeliveryFilter::default() };
            let mut page = PageRequest::first(200);
            loop {
                let result = self.deliveries.list(&caller.tenant_id, webhook, &filter, &page).await?;
                for stored in result.items {
                    let mut delivery = stored.value;
                    delivery.status = DeliveryStatus::Pending;
                    delivery.next_attempt_at = Some(self.clock.now());
                    // With the queue elsewhere, held until due (now), as a recorded retry is: the
                    // hold sweep queues it should its job not reach the queue.
                    delivery.lease_until = (!self.queue_in_store).then(|| self.clock.now());
                    delivery.updated_at = self.clock.now();
                    match self.deliveries.replace(&delivery, Some(stored.etag), &[]).await {
                        Ok(_) => {
                            self.queue
                                .schedule(
                                    &DeliveryJob { tenant_id: delivery.tenant_id.clone(), delivery_id: delivery.id },
                                    self.clock.now(),
                                )
                                .await?;
                            recovered += 1;
                        }
                        Err(DomainError::PreconditionFailed) => {}
                        Err(e) => return Err(e),
                    }
                }
                match result.continuation {
                    Some(token) => page = PageRequest { limit: 200, continuation: Some(token) },
                    None => break,
                }
            }
        }
        Ok(recovered)
    }

    /// Sends a `webhook.test` event now, recorded like any delivery, and returns it.
    pub async fn test(&self, caller: &Caller, webhook: WebhookId) -> Result<Stored<Delivery>, DomainError> {
        let result = self.test_unaudited(caller, webhook).await;
        self.audit
            .result(caller, AuditResource::Webhook, AuditAction::Test, Some(webhook.to_string()), &result, |d| {
                (String::new(), serde_json::json!({ "deliveryId": d.value.id.to_string() }))
            })
            .await;
        result
    }

    async fn test_unaudited(&self, caller: &Caller, webhook: WebhookId) -> Result<Stored<Delivery>, DomainError> {
        caller.require(Role::Member)?;
        let endpoint = self.webhooks.get(&caller.tenant_id, webhook).await?;
        self.manual.admit(webhook, self.clock.now())?;
        let message_id = self.ids.new_uuid().to_string();
        let payload = json!({
            "specversion": "1.0", "id": message_id, "source": crate::events::EVENT_SOURCE, "type": TEST_EVENT_TYPE,
            "subject": webhook.to_string(), "time": self.clock.now().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "datacontenttype": "application/json", "tenantid": caller.tenant_id.as_str(),
            "data": {"message": "This is a test event from Integration Manager."}
        });
        let delivery = self.new_delivery(&endpoint.value, message_id, TEST_EVENT_TYPE, payload.into(), DeliveryStatus::Pending);
        self.deliveries.create(&delivery).await?;
        let job = DeliveryJob { tenant_id: caller.tenant_id.clone(), delivery_id: delivery.id };
        self.attempt(&job, AttemptTrigger::Manual).await?;
        let mut stored = self.deliveries.get(&caller.tenant_id, delivery.id).await?;
        if stored.value.status == DeliveryStatus::Pending {
            // A test is one attempt, never retried.
            stored.value.status = if stored.value.attempts.last().is_some_and(|a| a.status_code.is_some_and(|s| (200..300).contains(&s))) {
                DeliveryStatus::Succeeded
            } else {
                DeliveryStatus::Failed
            };
            stored.value.next_attempt_at = None;
            let etag = self.deliveries.replace(&stored.value, Some(stored.etag.clone()), &[]).await?;
            stored.etag = etag;
            self.queue.complete(&job).await?;
        }
        Ok(stored)
    }
}

#[async_trait]
impl EventSubscriber for DeliveryService {
    async fn handle(&self, event: &DomainEvent) -> Result<(), DomainError> {
        self.fan_out(event).await.map(|_| ())
    }

    /// Webhooks receive only the deliverable events.
    fn wants(&self, event_type: EventType) -> bool {
        crate::webhooks::endpoint::DELIVERABLE.contains(&event_type)
    }

    /// An event goes to the endpoints its tenant has: a tenant without any gets nothing.
    fn only_for_tenants_with_webhooks(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod attempt_tests {
    //! The attempt logic against the mocks of its ports, with an injected clock and fixed ids.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::json;
    use time::OffsetDateTime;

    use super::*;
    use crate::common::{ETag, MockClock, MockIdGenerator, UserId};
    use crate::secrets::{MockSecretStore, SecretName, SecretRef, SecretValue};
    use crate::services::block_on;
    use crate::webhooks::endpoint::UrlPolicy;
    use crate::webhooks::ports::{MockDeliveryQueue, MockDeliveryRepository, MockEntropy, MockWebhookRepository, MockWebhookSender};
    use crate::webhooks::signature::{SigningSecret, Verifier};

    const SCHEDULE: [Duration; 2] = [Duration::from_secs(10), Duration::from_secs(60)];

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap()
    }

    fn tenant() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    fn secret() -> SigningSecret {
        SigningSecret::from_bytes(vec![7; 32]).unwrap()
    }

    fn webhook() -> Webhook {
        let id = WebhookId(Uuid::from_u128(1));
        Webhook {
            id,
            tenant_id: tenant(),
            url: "https://receiver.example.com/hooks".into(),
            description: String::new(),
            event_types: Vec::new(),
            integration_ids: Vec::new(),
            status: WebhookStatus::Enabled,
            disabled_reason: None,
            headers: BTreeMap::from([("x-team".to_owned(), "payments".to_owned())]),
            rate_limit_per_second: None,
            secret: SecretRef { secret_name: SecretName::new(&tenant(), "webhook", &id.to_string()), version: "1".into() },
            previous_secret: None,
            headers_secret: None,
            failing_since: None,
            consecutive_failures: 0,
            created_at: now() - time::Duration::days(1),
            updated_at: now() - time::Duration::days(1),
            created_by: UserId::new("alice").unwrap(),
            updated_by: UserId::new("alice").unwrap(),
        }
    }

    /// A pending delivery of `webhook` that has had `scheduled_attempts` failed scheduled attempts.
    fn delivery(webhook: &Webhook, scheduled_attempts: usize) -> Delivery {
        let failed = Attempt {
            at: now() - time::Duration::minutes(1),
            trigger: AttemptTrigger::Scheduled,
            status_code: Some(500),
            duration_ms: 12,
            response_excerpt: None,
            error: None,
        };
        Delivery {
            id: delivery_id(webhook.id, "event-1"),
            tenant_id: tenant(),
            webhook_id: webhook.id,
            message_id: "event-1".into(),
            event_type: "integration.created".into(),
            payload: json!({"id": "event-1", "type": "integration.created", "time": "2026-01-01T00:00:00Z"}).into(),
            status: DeliveryStatus::Pending,
            attempts: vec![failed; scheduled_attempts],
            older_attempts: 0,
            next_attempt_at: Some(now()),
            lease_until: None,
            created_at: now() - time::Duration::hours(1),
            updated_at: now() - time::Duration::minutes(1),
        }
    }

    fn job(delivery: &Delivery) -> DeliveryJob {
        DeliveryJob { tenant_id: delivery.tenant_id.clone(), delivery_id: delivery.id }
    }

    fn answer(status: u16, retry_after: Option<Duration>) -> SendResult {
        SendResult { status: Some(status), retry_after, body_excerpt: Some("ok".into()), error: None, duration: Duration::from_millis(42) }
    }

    /// What the service wrote and sent, for the assertions.
    #[derive(Default)]
    struct Seen {
        requests: Vec<OutgoingRequest>,
        replaced: Vec<(Delivery, Vec<DomainEvent>)>,
        endpoint_writes: Vec<Webhook>,
        scheduled: Vec<(DeliveryJob, OffsetDateTime)>,
        completed: Vec<DeliveryJob>,
    }

    /// The service with mocks around one endpoint and one delivery; the receiver answers `result`.
    fn service(webhook: &Webhook, delivery: &Delivery, result: SendResult) -> (DeliveryService, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));

        let mut clock = MockClock::new();
        clock.expect_now().returning(now);
        let clock: Arc<dyn Clock> = Arc::new(clock);
        let mut ids = MockIdGenerator::new();
        // The low 32 bits feed the jitter: 0 means the shortest wait of the ±20% band.
        ids.expect_new_uuid().returning(|| Uuid::from_u128(0xABCD_0000_0000));
        let ids: Arc<dyn IdGenerator> = Arc::new(ids);

        let mut webhooks = MockWebhookRepository::new();
        let stored_webhook = Arc::new(Mutex::new(webhook.clone()));
        let current = stored_webhook.clone();
        webhooks.expect_get().returning(move |_, _| Ok(Stored { value: current.lock().unwrap().clone(), etag: ETag::new("w1") }));
        let (writes, current) = (seen.clone(), stored_webhook);
        webhooks.expect_replace().returning(move |w, _| {
            writes.lock().unwrap().endpoint_writes.push(w.clone());
            *current.lock().unwrap() = w.clone();
            Ok(ETag::new("w2"))
        });
        let webhooks: Arc<dyn WebhookRepository> = Arc::new(webhooks);

        let mut secrets = MockSecretStore::new();
        let reference = webhook.secret.clone();
        secrets.expect_get().withf(move |r| *r == reference).returning(|_| Ok(SecretValue(json!({"secret": secret().expose()}))));
        let endpoints = WebhookService::new(
            webhooks.clone(),
            Arc::new(secrets),
            clock.clone(),
            ids.clone(),
            Arc::new(MockEntropy::new()),
            UrlPolicy::default(),
            Duration::from_secs(3600),
            Audit::discarding(),
        );

        let mut deliveries = MockDeliveryRepository::new();
        deliveries.expect_keeps_queue().return_const(false);
        let stored = delivery.clone();
        deliveries.expect_get_for_attempt().returning(move |_, _| Ok(Stored { value: stored.clone(), etag: ETag::new("d1") }));
        // First the attempt holds its delivery (a conditional write of the lease), then it
        // records the outcome on the version it holds.
        deliveries
            .expect_replace()
            .withf(|d, if_match, events| *if_match == Some(ETag::new("d1")) && d.lease_until.is_some() && events.is_empty())
            .times(1)
            .returning(|_, _, _| Ok(ETag::new("d2")));
        let replaced = seen.clone();
        deliveries.expect_replace().withf(|_, if_match, _| *if_match == Some(ETag::new("d2"))).returning(move |d, _, events| {
            replaced.lock().unwrap().replaced.push((d.clone(), events.to_vec()));
            Ok(ETag::new("d3"))
        });

        let mut queue = MockDeliveryQueue::new();
        let scheduled = seen.clone();
        queue.expect_schedule().returning(move |job, at| {
            scheduled.lock().unwrap().scheduled.push((job.clone(), at));
            Ok(())
        });
        let completed = seen.clone();
        queue.expect_complete().returning(move |job| {
            completed.lock().unwrap().completed.push(job.clone());
            Ok(())
        });

        let mut sender = MockWebhookSender::new();
        let sent = seen.clone();
        sender.expect_send().times(1).returning(move |request| {
            sent.lock().unwrap().requests.push(request);
            result.clone()
        });

        let settings = DeliverySettings {
            retry_schedule: SCHEDULE.to_vec(),
            disable_after: Duration::from_secs(5 * 24 * 3600),
            disable_min_failures: 3,
            user_agent: "IntegrationManager/test".into(),
        };
        let service = DeliveryService::new(
            webhooks,
            endpoints,
            Arc::new(deliveries),
            Arc::new(queue),
            Arc::new(sender),
            clock,
            ids,
            settings,
            Audit::discarding(),
        );
        (service, seen)
    }

    fn one_replace(seen: &Seen) -> (Delivery, Vec<DomainEvent>) {
        assert_eq!(seen.replaced.len(), 1, "the attempt is recorded once");
        seen.replaced[0].clone()
    }

    #[test]
    fn a_success_records_the_attempt_and_publishes_webhook_delivered_with_it() {
        block_on(async {
            let (webhook, delivery) = (webhook(), delivery(&webhook(), 0));
            let (service, seen) = service(&webhook, &delivery, answer(204, None));

            let report = service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

            assert!(matches!(report, AttemptReport::Delivered { committed_at: Some(_) }), "{report:?}");
            let seen = seen.lock().unwrap();
            let (recorded, events) = one_replace(&seen);
            assert_eq!(recorded.status, DeliveryStatus::Succeeded);
            assert_eq!(recorded.next_attempt_at, None);
            assert_eq!(recorded.updated_at, now());
            let attempt = recorded.attempts.last().unwrap();
            assert_eq!(
                (attempt.at, attempt.trigger, attempt.status_code, attempt.duration_ms),
                (now(), AttemptTrigger::Scheduled, Some(204), 42)
            );
            assert_eq!(events.len(), 1, "one outcome event, in the same write as the record: {events:?}");
            let event = &events[0];
            assert_eq!(
                (event.event_type, &event.tenant_id, event.subject.as_str()),
                (EventType::WebhookDelivered, &tenant(), &*recorded.id.to_string())
            );
            assert_eq!(event.time, now());
            assert_eq!(
                event.data,
                json!({
                    "deliveryId": recorded.id.to_string(), "webhookId": webhook.id.to_string(), "messageId": "event-1",
                    "eventType": "integration.created", "status": "succeeded", "attempts": 1, "lastStatusCode": 204, "lastError": null,
                })
            );
            assert_eq!(seen.completed, vec![job(&delivery)], "the job is completed");
            assert!(seen.scheduled.is_empty(), "and not rescheduled");
            assert!(seen.endpoint_writes.is_empty(), "a healthy endpoint that stays healthy is not written");

            // The request is signed at the injected clock's time, with the endpoint's secret.
            let request = &seen.requests[0];
            let header = |name: &str| request.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap();
            assert_eq!(request.url, webhook.url);
            assert_eq!(header("webhook-id"), "event-1");
            assert_eq!(header("webhook-timestamp"), now().unix_timestamp().to_string());
            assert_eq!(header("x-team"), "payments");
            assert_eq!(request.body, delivery.payload.as_str().as_bytes(), "the body is the payload's text as stored");
            Verifier::new(vec![secret()])
                .verify("event-1", header("webhook-timestamp"), header("webhook-signature"), &request.body, now().unix_timestamp())
                .expect("signed with the endpoint's secret");
        });
    }

    #[test]
    fn the_commit_time_is_read_from_the_payloads_text() {
        let payload = |text: &str| serde_json::from_str::<EventData>(text).unwrap();
        let at = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
        let read = committed_at(&payload(r#"{"id":"e","data":{"time":"no"},"time":"2026-01-01T00:00:00Z"}"#));
        assert_eq!(read, Some(at), "the top level's member, after a nested one of the same name");
        assert_eq!(committed_at(&payload(r#"{"time":"2026-01-01T00:00:00.5\u005A"}"#)), Some(at + time::Duration::milliseconds(500)));
        for text in [r#"{"id":"e"}"#, r#"{"time":7}"#, r#"{"time":"yesterday"}"#, "null", "[1]"] {
            assert_eq!(committed_at(&payload(text)), None, "{text}");
        }
    }

    #[test]
    fn a_failed_attempt_is_retried_on_the_schedule() {
        block_on(async {
            for (earlier_attempts, wait) in [(0, SCHEDULE[0]), (1, SCHEDULE[1])] {
                let (webhook, delivery) = (webhook(), delivery(&webhook(), earlier_attempts));
                let (service, seen) = service(&webhook, &delivery, answer(500, Some(Duration::from_secs(3000))));

                let report = service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

                // Jitter 0 is the shortest wait of the band; a Retry-After on a 500 is ignored.
                let at = now() + time::Duration::try_from(wait.mul_f64(0.8)).unwrap();
                assert_eq!(report, AttemptReport::RetryAt(at), "after {earlier_attempts} earlier attempts");
                let seen = seen.lock().unwrap();
                let (recorded, events) = one_replace(&seen);
                assert_eq!((recorded.status, recorded.next_attempt_at), (DeliveryStatus::Pending, Some(at)));
                assert_eq!(recorded.attempts.len(), earlier_attempts + 1);
                assert_eq!(recorded.attempts.last().unwrap().status_code, Some(500));
                assert!(events.is_empty(), "no outcome event while retrying: {events:?}");
                assert_eq!(seen.scheduled, vec![(job(&delivery), at)], "the job is rescheduled for the retry");
                assert!(seen.completed.is_empty(), "and not completed");
                let endpoint = seen.endpoint_writes.last().expect("the failure streak is recorded");
                assert_eq!(
                    (endpoint.failing_since, endpoint.consecutive_failures, endpoint.status),
                    (Some(now()), 1, WebhookStatus::Enabled)
                );
            }
        });
    }

    #[test]
    fn retry_after_is_honoured_on_429_and_503() {
        block_on(async {
            for status in [429, 503] {
                let (webhook, delivery) = (webhook(), delivery(&webhook(), 0));
                let (service, seen) = service(&webhook, &delivery, answer(status, Some(Duration::from_secs(120))));

                let report = service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

                let at = now() + time::Duration::seconds(120);
                assert_eq!(report, AttemptReport::RetryAt(at), "{status} with Retry-After: 120");
                let seen = seen.lock().unwrap();
                assert_eq!(one_replace(&seen).0.next_attempt_at, Some(at));
                assert_eq!(seen.scheduled, vec![(job(&delivery), at)]);
            }
        });
    }

    /// An in-process subscriber that wants only the events webhooks receive, as the fan-out.
    struct WebhooksOnly;

    #[async_trait]
    impl EventSubscriber for WebhooksOnly {
        async fn handle(&self, _: &DomainEvent) -> Result<(), DomainError> {
            Ok(())
        }

        fn wants(&self, event_type: EventType) -> bool {
            crate::webhooks::endpoint::DELIVERABLE.contains(&event_type)
        }

        fn only_for_tenants_with_webhooks(&self) -> bool {
            true
        }
    }

    /// A bus whose subscribers are `webhooks_only` fan-outs and `others` that read everything.
    fn bus(webhooks_only: usize, others: usize) -> Arc<crate::services::InProcessBus> {
        struct ReadsAll;
        #[async_trait]
        impl EventSubscriber for ReadsAll {
            async fn handle(&self, _: &DomainEvent) -> Result<(), DomainError> {
                Ok(())
            }
        }
        let bus = Arc::new(crate::services::InProcessBus::new());
        (0..webhooks_only).for_each(|_| bus.subscribe(Arc::new(WebhooksOnly)));
        (0..others).for_each(|_| bus.subscribe(Arc::new(ReadsAll)));
        bus
    }

    #[test]
    fn only_events_the_fan_out_alone_reads_are_for_tenants_with_webhooks() {
        use crate::ports::EventReaders;
        let created = EventType::IntegrationCreated;
        assert!(bus(1, 0).only_for_tenants_with_webhooks(created), "the fan-out is its only reader");
        assert!(bus(2, 0).only_for_tenants_with_webhooks(created));
        assert!(!bus(1, 1).only_for_tenants_with_webhooks(created), "another subscriber reads it for every tenant");
        assert!(!bus(0, 0).only_for_tenants_with_webhooks(created), "nobody reads it (reads() says so)");
        assert!(!bus(1, 0).only_for_tenants_with_webhooks(EventType::WebhookDelivered), "the fan-out does not want it");
    }

    #[test]
    fn an_outcome_event_no_subscriber_reads_is_not_written() {
        block_on(async {
            for (status, bus) in [(204, bus(1, 0)), (410, bus(1, 0)), (204, bus(0, 0))] {
                let (webhook, delivery) = (webhook(), delivery(&webhook(), 0));
                let (service, seen) = service(&webhook, &delivery, answer(status, None));
                let service = service.with_event_readers(bus);

                service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

                let seen = seen.lock().unwrap();
                let (recorded, events) = one_replace(&seen);
                assert!(matches!(recorded.status, DeliveryStatus::Succeeded | DeliveryStatus::Failed), "{:?}", recorded.status);
                assert!(events.is_empty(), "{status}: nobody reads webhook.* events, none is written: {events:?}");
                assert_eq!(seen.completed, vec![job(&delivery)]);
            }
        });
    }

    #[test]
    fn an_outcome_event_is_written_when_a_subscriber_reads_it() {
        block_on(async {
            let (webhook, delivery) = (webhook(), delivery(&webhook(), 0));
            let (service, seen) = service(&webhook, &delivery, answer(410, None));
            let service = service.with_event_readers(bus(1, 1));

            service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

            let seen = seen.lock().unwrap();
            let types: Vec<_> = one_replace(&seen).1.iter().map(|e| e.event_type).collect();
            assert_eq!(types, vec![EventType::WebhookFailed, EventType::WebhookEndpointDisabled]);
        });
    }

    #[test]
    fn gone_fails_the_delivery_and_disables_the_endpoint() {
        block_on(async {
            let (webhook, delivery) = (webhook(), delivery(&webhook(), 0));
            let (service, seen) = service(&webhook, &delivery, answer(410, None));

            let report = service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

            assert_eq!(report, AttemptReport::Failed);
            let seen = seen.lock().unwrap();
            let endpoint = seen.endpoint_writes.last().expect("the endpoint is written");
            assert_eq!(endpoint.status, WebhookStatus::Disabled);
            assert!(endpoint.disabled_reason.as_deref().is_some_and(|r| r.contains("410")), "{:?}", endpoint.disabled_reason);
            let (recorded, events) = one_replace(&seen);
            assert_eq!((recorded.status, recorded.next_attempt_at), (DeliveryStatus::Failed, None));
            let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
            assert_eq!(types, vec![EventType::WebhookFailed, EventType::WebhookEndpointDisabled]);
            assert_eq!(events[1].data.to_value()["webhookId"], webhook.id.to_string());
            assert_eq!(seen.completed, vec![job(&delivery)]);
            assert!(seen.scheduled.is_empty(), "a 410 is never retried");
        });
    }

    #[test]
    fn an_exhausted_schedule_fails_the_delivery_for_good() {
        block_on(async {
            let (webhook, delivery) = (webhook(), delivery(&webhook(), SCHEDULE.len()));
            let (service, seen) = service(&webhook, &delivery, answer(500, None));

            let report = service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

            assert_eq!(report, AttemptReport::Failed);
            let seen = seen.lock().unwrap();
            let (recorded, events) = one_replace(&seen);
            assert_eq!((recorded.status, recorded.next_attempt_at), (DeliveryStatus::Failed, None));
            assert_eq!(recorded.attempts.len(), SCHEDULE.len() + 1);
            let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
            assert_eq!(types, vec![EventType::WebhookFailed], "one outcome event with the record");
            assert_eq!(events[0].data.to_value()["status"], "failed");
            assert_eq!(events[0].data.to_value()["attempts"], SCHEDULE.len() + 1);
            assert_eq!(events[0].data.to_value()["lastStatusCode"], 500);
            assert_eq!(seen.completed, vec![job(&delivery)]);
            assert!(seen.scheduled.is_empty());
        });
    }

    #[test]
    fn an_endpoint_failing_for_too_long_is_disabled() {
        block_on(async {
            let mut webhook = webhook();
            webhook.failing_since = Some(now() - time::Duration::days(5));
            webhook.consecutive_failures = 2;
            let delivery = delivery(&webhook, 0);
            let (service, seen) = service(&webhook, &delivery, answer(502, None));

            let report = service.attempt(&job(&delivery), AttemptTrigger::Scheduled).await.unwrap();

            assert!(matches!(report, AttemptReport::RetryAt(_)), "this delivery still retries: {report:?}");
            let seen = seen.lock().unwrap();
            let endpoint = seen.endpoint_writes.last().unwrap();
            assert_eq!((endpoint.status, endpoint.consecutive_failures), (WebhookStatus::Disabled, 3));
            let types: Vec<_> = one_replace(&seen).1.iter().map(|e| e.event_type).collect();
            assert_eq!(types, vec![EventType::WebhookEndpointDisabled]);
        });
    }
}

#[cfg(test)]
#[path = "deliveries_tests.rs"]
mod tests;
