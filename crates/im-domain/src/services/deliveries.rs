use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::{Caller, Role};
use crate::common::{Clock, IdGenerator, Page, PageRequest, Stored, TenantId};
use crate::error::DomainError;
use crate::events::{DomainEvent, EventType};
use crate::ports::EventSubscriber;
use crate::webhooks::delivery::{
    ATTEMPT_LEASE, Attempt, AttemptTrigger, Delivery, DeliveryFilter, DeliveryStatus, Outcome, RESPONSE_EXCERPT_BYTES, classify,
    delivery_id, next_wait,
};
use crate::webhooks::endpoint::{TEST_EVENT_TYPE, Webhook, WebhookId, WebhookStatus};
use crate::webhooks::ports::{
    DeliveryJob, DeliveryQueue, DeliveryRepository, OutgoingRequest, SendResult, WebhookRepository, WebhookSender,
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

/// Fans events out to endpoints, makes signed attempts, records them, retries on schedule,
/// and publishes `webhook.delivered` / `webhook.failed` through the outbox.
#[derive(Clone)]
pub struct DeliveryService {
    webhooks: Arc<dyn WebhookRepository>,
    endpoints: WebhookService,
    deliveries: Arc<dyn DeliveryRepository>,
    queue: Arc<dyn DeliveryQueue>,
    sender: Arc<dyn WebhookSender>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    settings: DeliverySettings,
    /// Per-endpoint send times of the last second, for `rateLimitPerSecond`.
    rates: Arc<Mutex<HashMap<WebhookId, Vec<OffsetDateTime>>>>,
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
const CLAIM_TRIES: usize = 3;
/// A scheduled job that comes this long before its delivery's next attempt is a duplicate.
const EARLY_SLACK: time::Duration = time::Duration::seconds(2);

/// Whether an attempt is to be made now.
enum Prepared {
    Done(AttemptReport),
    Ready(Box<(Stored<Delivery>, Stored<Webhook>)>),
}

/// What [`DeliveryService::attempt`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptReport {
    Delivered,
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
    ) -> Self {
        Self { webhooks, endpoints, deliveries, queue, sender, clock, ids, settings, rates: Arc::default() }
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
        payload: serde_json::Value,
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
        if !crate::webhooks::endpoint::DELIVERABLE.contains(&event.event_type) {
            return Ok(0);
        }
        let endpoints = self.all_endpoints(&event.tenant_id).await?;
        let mut queued = 0;
        for webhook in endpoints.iter().filter(|w| w.wants(event)) {
            let status = if webhook.status == WebhookStatus::Enabled { DeliveryStatus::Pending } else { DeliveryStatus::Skipped };
            let delivery = self.new_delivery(webhook, event.id.to_string(), event.event_type.as_str(), event.cloud_event(), status);
            let job = DeliveryJob { tenant_id: delivery.tenant_id.clone(), delivery_id: delivery.id };
            match self.deliveries.create(&delivery).await {
                Ok(_) if status == DeliveryStatus::Pending => {
                    self.queue.schedule(&job, self.clock.now()).await?;
                    queued += 1;
                }
                Ok(_) => {}
                Err(DomainError::Conflict(_)) => {
                    // Fanned out before (events arrive at least once). A crash may have come
                    // between recording the delivery and queueing it: queue it if nothing is,
                    // at the time it waits for, without touching a queued or running attempt.
                    let existing = self.deliveries.get(&delivery.tenant_id, delivery.id).await?.value;
                    if existing.status == DeliveryStatus::Pending {
                        let due = existing.next_attempt_at.unwrap_or_else(|| self.clock.now());
                        self.queue.schedule_if_absent(&job, due.max(existing.lease_until.unwrap_or(due))).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(queued)
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
        let body = serde_json::to_vec(&delivery.payload).map_err(|e| DomainError::Unexpected(e.into()))?;
        let timestamp = self.clock.now().unix_timestamp();
        let refs: Vec<_> = secrets.iter().collect();
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("user-agent".to_owned(), self.settings.user_agent.clone()),
            ("webhook-id".to_owned(), delivery.message_id.clone()),
            ("webhook-timestamp".to_owned(), timestamp.to_string()),
            ("webhook-signature".to_owned(), signature_header(&refs, &delivery.message_id, timestamp, &body)),
        ];
        headers.extend(webhook.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(self.sender.send(OutgoingRequest { url: webhook.url.clone(), headers, body }).await)
    }

    fn outcome_event(&self, delivery: &Delivery, event_type: EventType) -> DomainEvent {
        let last = delivery.attempts.last();
        DomainEvent {
            id: self.ids.new_uuid(),
            event_type,
            tenant_id: delivery.tenant_id.clone(),
            subject: delivery.id.to_string(),
            time: self.clock.now(),
            data: json!({
                "deliveryId": delivery.id.to_string(),
                "webhookId": delivery.webhook_id.to_string(),
                "messageId": delivery.message_id,
                "eventType": delivery.event_type,
                "status": delivery.status.as_str(),
                "attempts": delivery.attempts.len(),
                "lastStatusCode": last.and_then(|a| a.status_code),
                "lastError": last.and_then(|a| a.error.clone()),
            }),
        }
    }

    /// Makes the attempt a queued job stands for (or a manual one), records it, and decides
    /// what comes next. The job is completed or rescheduled before this returns.
    ///
    /// A scheduled job runs only when its delivery is pending, due, and not held by an attempt
    /// in progress; it then holds the delivery (a conditional write) for [`ATTEMPT_LEASE`]
    /// while it sends. A duplicate job (a replayed event, a job queued twice) therefore finds
    /// the delivery held, not yet due, or final, and is dropped: one chain of attempts per
    /// delivery, never two.
    pub async fn attempt(&self, job: &DeliveryJob, trigger: AttemptTrigger) -> Result<AttemptReport, DomainError> {
        for _ in 0..CLAIM_TRIES {
            match self.prepare(job, trigger).await? {
                Prepared::Done(report) => return Ok(report),
                Prepared::Ready(ready) => {
                    let (stored, webhook) = *ready;
                    if trigger == AttemptTrigger::Manual {
                        if let Some(at) = self.over_rate(&webhook.value) {
                            self.queue.schedule(job, at).await?;
                            return Ok(AttemptReport::Throttled);
                        }
                        return self.send_and_record(job, trigger, stored, webhook).await;
                    }
                    let mut held = stored.value.clone();
                    held.lease_until = Some(self.clock.now() + time::Duration::try_from(ATTEMPT_LEASE).unwrap_or(time::Duration::MINUTE));
                    match self.deliveries.replace(&held, Some(stored.etag), &[]).await {
                        Ok(etag) => {
                            if let Some(at) = self.over_rate(&webhook.value) {
                                // Hold it only until the endpoint's rate allows the attempt.
                                held.lease_until = Some(at);
                                self.deliveries.replace(&held, Some(etag), &[]).await?;
                                self.queue.schedule(job, at).await?;
                                return Ok(AttemptReport::Throttled);
                            }
                            return self.send_and_record(job, trigger, Stored { value: held, etag }, webhook).await;
                        }
                        // Another worker took it first: look again (it is held now, or done).
                        Err(DomainError::PreconditionFailed) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(DomainError::unavailable(format!("delivery {} kept changing while being claimed", job.delivery_id)))
    }

    /// Decides whether the job's attempt is to be made now, and completes or reschedules the
    /// job when it is not.
    async fn prepare(&self, job: &DeliveryJob, trigger: AttemptTrigger) -> Result<Prepared, DomainError> {
        let stored = match self.deliveries.get(&job.tenant_id, job.delivery_id).await {
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
            if let Some(until) = delivery.lease_until.filter(|until| *until > now) {
                // An attempt is in progress, or its worker died: look again when its hold ends.
                self.queue.schedule(job, until).await?;
                return Ok(Prepared::Done(AttemptReport::Nothing));
            }
            if delivery.next_attempt_at.is_some_and(|at| at > now + EARLY_SLACK) {
                // The attempt due now was made already; the job for the next one is queued.
                self.queue.complete(job).await?;
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
            self.deliveries.replace(&delivery, Some(stored.etag), &[]).await?;
            self.queue.complete(job).await?;
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
        webhook: Stored<Webhook>,
    ) -> Result<AttemptReport, DomainError> {
        let result = match self.send(&webhook.value, &stored.value).await {
            Ok(result) => result,
            Err(DomainError::NotFound { .. }) => return self.fail_unsignable(job, stored).await,
            Err(error) if trigger == AttemptTrigger::Scheduled => return self.postpone(job, stored, &error).await,
            Err(error) => return Err(error),
        };
        let now = self.clock.now();
        let mut delivery = stored.value.clone();
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
        let disabled_because = self.track_health(&webhook.value, &outcome).await?;
        let (report, mut events) = match outcome {
            Outcome::Delivered => {
                delivery.status = DeliveryStatus::Succeeded;
                delivery.next_attempt_at = None;
                (AttemptReport::Delivered, vec![EventType::WebhookDelivered])
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
            .map(|t| match (t, &disabled_because) {
                (EventType::WebhookEndpointDisabled, Some(reason)) => self.disabled_event(&webhook.value, reason),
                (t, _) => self.outcome_event(&delivery, t),
            })
            .collect();
        self.deliveries.replace(&delivery, Some(stored.etag), &events).await?;
        match report {
            AttemptReport::RetryAt(at) => self.queue.schedule(job, at).await?,
            _ => self.queue.complete(job).await?,
        }
        Ok(report)
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
        let failed = self.outcome_event(&delivery, EventType::WebhookFailed);
        self.deliveries.replace(&delivery, Some(stored.etag), &[failed]).await?;
        self.queue.complete(job).await?;
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
        self.deliveries.replace(&delivery, Some(stored.etag), &[]).await?;
        self.queue.schedule(job, at).await?;
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
        for _ in 0..5 {
            let current = self.webhooks.get(&webhook.tenant_id, webhook.id).await?;
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
                Ok(_) => return Ok(disabled_now),
                Err(DomainError::PreconditionFailed) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn disabled_event(&self, webhook: &Webhook, reason: &str) -> DomainEvent {
        DomainEvent {
            id: self.ids.new_uuid(),
            event_type: EventType::WebhookEndpointDisabled,
            tenant_id: webhook.tenant_id.clone(),
            subject: webhook.id.to_string(),
            time: self.clock.now(),
            data: json!({"webhookId": webhook.id.to_string(), "url": webhook.url, "reason": reason}),
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
        caller.require(Role::Member)?;
        let delivery = self.get(caller, webhook, id).await?;
        let job = DeliveryJob { tenant_id: caller.tenant_id.clone(), delivery_id: delivery.value.id };
        self.attempt(&job, AttemptTrigger::Manual).await?;
        self.deliveries.get(&caller.tenant_id, id).await
    }

    /// Re-queues every failed or skipped delivery of an endpoint created since `since`.
    pub async fn recover(&self, caller: &Caller, webhook: WebhookId, since: OffsetDateTime) -> Result<usize, DomainError> {
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
                    delivery.lease_until = None;
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
        caller.require(Role::Member)?;
        let endpoint = self.webhooks.get(&caller.tenant_id, webhook).await?;
        let message_id = self.ids.new_uuid().to_string();
        let payload = json!({
            "specversion": "1.0", "id": message_id, "source": crate::events::EVENT_SOURCE, "type": TEST_EVENT_TYPE,
            "subject": webhook.to_string(), "time": self.clock.now().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "datacontenttype": "application/json", "tenantid": caller.tenant_id.as_str(),
            "data": {"message": "This is a test event from Integration Manager."}
        });
        let delivery = self.new_delivery(&endpoint.value, message_id, TEST_EVENT_TYPE, payload, DeliveryStatus::Pending);
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
}

#[cfg(test)]
#[path = "deliveries_tests.rs"]
mod tests;
