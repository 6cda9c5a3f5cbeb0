//! Replays and duplicate jobs against in-memory ports: a repository with real concurrency
//! tokens and a queue with a broker's semantics (every scheduled job is a message; nothing
//! deduplicates them), so only the service's own checks keep one chain of attempts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::audit::Audit;
use crate::common::{ETag, UuidV7};
use crate::secrets::{MockSecretStore, SecretName, SecretRef, SecretValue};
use crate::services::block_on;
use crate::webhooks::endpoint::UrlPolicy;
use crate::webhooks::ports::OsEntropy;

struct TestClock(Mutex<OffsetDateTime>);

impl TestClock {
    fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap();
        *now += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

#[derive(Default)]
struct Deliveries {
    rows: Mutex<HashMap<Uuid, (Delivery, u64)>>,
    /// Keeps the delivery queue itself: the job of each delivery and its due time, written
    /// with the record.
    keeps_queue: bool,
    jobs: Mutex<HashMap<Uuid, OffsetDateTime>>,
    /// A delivery whose create fails (the store unavailable for it).
    refuse: Mutex<Option<Uuid>>,
    /// A version handed to the next attempt's read of its delivery, as a store may hand the
    /// version it wrote (out of date once another writer changed it).
    handed: Mutex<Option<Stored<Delivery>>>,
    /// Set: each delivery `holds_ended_before` lists is held again until then right after it
    /// was read (another worker's hold, written between the sweep's read and its release).
    held_again_after_listing: Mutex<Option<OffsetDateTime>>,
}

impl Deliveries {
    fn value(&self, id: Uuid) -> Delivery {
        self.rows.lock().unwrap()[&id].0.clone()
    }
}

#[async_trait]
impl DeliveryRepository for Deliveries {
    async fn create(&self, delivery: &Delivery) -> Result<ETag, DomainError> {
        if *self.refuse.lock().unwrap() == Some(delivery.id) {
            return Err(DomainError::unavailable("the store is away"));
        }
        let mut rows = self.rows.lock().unwrap();
        if rows.contains_key(&delivery.id) {
            return Err(DomainError::Conflict("exists".into()));
        }
        rows.insert(delivery.id, (delivery.clone(), 1));
        Ok(ETag::new("1"))
    }

    async fn get(&self, _tenant: &TenantId, id: Uuid) -> Result<Stored<Delivery>, DomainError> {
        let rows = self.rows.lock().unwrap();
        let (value, version) = rows.get(&id).ok_or_else(|| DomainError::not_found("delivery", id))?;
        Ok(Stored { value: value.clone(), etag: ETag::new(version.to_string()) })
    }

    async fn get_for_attempt(&self, tenant: &TenantId, id: Uuid) -> Result<Stored<Delivery>, DomainError> {
        let handed = self.handed.lock().unwrap().take_if(|handed| handed.value.id == id);
        match handed {
            Some(handed) => Ok(handed),
            None => self.get(tenant, id).await,
        }
    }

    async fn list(
        &self,
        _: &TenantId,
        webhook: WebhookId,
        filter: &DeliveryFilter,
        _: &PageRequest,
    ) -> Result<Page<Stored<Delivery>>, DomainError> {
        let rows = self.rows.lock().unwrap();
        let items = rows
            .values()
            .filter(|(d, _)| d.webhook_id == webhook && filter.matches(d))
            .map(|(d, version)| Stored { value: d.clone(), etag: ETag::new(version.to_string()) })
            .collect();
        Ok(Page { items, continuation: None })
    }

    async fn replace(&self, delivery: &Delivery, if_match: Option<ETag>, _events: &[DomainEvent]) -> Result<ETag, DomainError> {
        let mut rows = self.rows.lock().unwrap();
        let row = rows.get_mut(&delivery.id).ok_or_else(|| DomainError::not_found("delivery", delivery.id))?;
        if if_match.is_some_and(|e| e.as_str() != row.1.to_string()) {
            return Err(DomainError::PreconditionFailed);
        }
        *row = (delivery.clone(), row.1 + 1);
        Ok(ETag::new(row.1.to_string()))
    }

    async fn holds_ended_before(&self, before: OffsetDateTime, limit: u32) -> Result<Vec<Stored<Delivery>>, DomainError> {
        let mut rows = self.rows.lock().unwrap();
        let mut ended: Vec<_> = rows
            .values()
            .filter(|(d, _)| d.status == DeliveryStatus::Pending && d.lease_until.is_some_and(|until| until < before))
            .map(|(d, version)| Stored { value: d.clone(), etag: ETag::new(version.to_string()) })
            .collect();
        ended.sort_by_key(|d| d.value.lease_until);
        ended.truncate(limit as usize);
        if let Some(until) = *self.held_again_after_listing.lock().unwrap() {
            for listed in &ended {
                let row = rows.get_mut(&listed.value.id).unwrap();
                row.0.lease_until = Some(until);
                row.1 += 1;
            }
        }
        Ok(ended)
    }

    fn keeps_queue(&self) -> bool {
        self.keeps_queue
    }

    async fn create_each_queued(&self, deliveries: &[Delivery]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        assert!(self.keeps_queue, "create_each_queued on a repository without the queue");
        let outcomes = self.create_each(deliveries).await?;
        for (delivery, outcome) in deliveries.iter().zip(&outcomes) {
            if let (Ok(_), Some(due)) = (outcome, delivery.next_attempt_at.filter(|_| delivery.status == DeliveryStatus::Pending)) {
                self.jobs.lock().unwrap().insert(delivery.id, due);
            }
        }
        Ok(outcomes)
    }

    async fn replace_queued(
        &self,
        delivery: &Delivery,
        if_match: Option<ETag>,
        events: &[DomainEvent],
        job: JobAfter,
    ) -> Result<ETag, DomainError> {
        assert!(self.keeps_queue, "replace_queued on a repository without the queue");
        let etag = self.replace(delivery, if_match, events).await?;
        let mut jobs = self.jobs.lock().unwrap();
        match job {
            JobAfter::Complete => jobs.remove(&delivery.id),
            JobAfter::RetryAt(at) => jobs.insert(delivery.id, at),
        };
        Ok(etag)
    }
}

/// A broker: every schedule is one more message; taking a job removes its message.
#[derive(Default)]
struct Broker {
    messages: Mutex<Vec<(DeliveryJob, OffsetDateTime)>>,
    /// Set: every schedule fails (the broker is away).
    refuse: std::sync::atomic::AtomicBool,
}

impl Broker {
    fn dues(&self) -> Vec<OffsetDateTime> {
        self.messages.lock().unwrap().iter().map(|(_, due)| *due).collect()
    }
}

#[async_trait]
impl DeliveryQueue for Broker {
    async fn schedule(&self, job: &DeliveryJob, due: OffsetDateTime) -> Result<(), DomainError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(DomainError::unavailable("the broker is away"));
        }
        self.messages.lock().unwrap().push((job.clone(), due));
        Ok(())
    }

    async fn schedule_if_absent(&self, job: &DeliveryJob, due: OffsetDateTime) -> Result<(), DomainError> {
        self.schedule(job, due).await
    }

    async fn take_due(&self, _max: u32, _lease: Duration) -> Result<Vec<DeliveryJob>, DomainError> {
        Ok(self.messages.lock().unwrap().drain(..).map(|(job, _)| job).collect())
    }

    async fn complete(&self, _job: &DeliveryJob) -> Result<(), DomainError> {
        Ok(())
    }

    async fn next_due(&self) -> Result<Option<OffsetDateTime>, DomainError> {
        Ok(None)
    }
}

struct Receiver {
    status: u16,
    calls: AtomicUsize,
}

#[async_trait]
impl WebhookSender for Receiver {
    async fn send(&self, _request: OutgoingRequest) -> SendResult {
        self.calls.fetch_add(1, Ordering::SeqCst);
        SendResult { status: Some(self.status), retry_after: None, body_excerpt: None, error: None, duration: Duration::from_millis(1) }
    }
}

#[derive(Default)]
struct Endpoints(Mutex<Vec<Webhook>>, AtomicUsize);

#[async_trait]
impl WebhookRepository for Endpoints {
    async fn create(&self, webhook: &Webhook) -> Result<ETag, DomainError> {
        self.0.lock().unwrap().push(webhook.clone());
        Ok(ETag::new("1"))
    }

    async fn get(&self, _tenant: &TenantId, id: WebhookId) -> Result<Stored<Webhook>, DomainError> {
        let all = self.0.lock().unwrap();
        let found = all.iter().find(|w| w.id == id).cloned().ok_or_else(|| DomainError::not_found("webhook", id))?;
        Ok(Stored { value: found, etag: ETag::new("1") })
    }

    async fn list(&self, _tenant: &TenantId, _page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let all = self.0.lock().unwrap();
        Ok(Page { items: all.iter().map(|w| Stored { value: w.clone(), etag: ETag::new("1") }).collect(), continuation: None })
    }

    async fn replace(&self, webhook: &Webhook, _if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let mut all = self.0.lock().unwrap();
        if let Some(w) = all.iter_mut().find(|w| w.id == webhook.id) {
            *w = webhook.clone();
        }
        Ok(ETag::new("1"))
    }

    async fn delete(&self, _tenant: &TenantId, _id: WebhookId, _if_match: Option<ETag>) -> Result<(), DomainError> {
        Ok(())
    }
}

struct World {
    service: DeliveryService,
    deliveries: Arc<Deliveries>,
    queue: Arc<Broker>,
    receiver: Arc<Receiver>,
    clock: Arc<TestClock>,
    event: DomainEvent,
    delivery_id: Uuid,
    webhook_id: WebhookId,
    webhooks: Arc<Endpoints>,
}

fn world(receiver_status: u16) -> World {
    world_with(receiver_status, signing_secret)
}

/// [`world`] with the delivery queue kept by the repository.
fn world_with_queue_in_store(receiver_status: u16) -> World {
    world_of(receiver_status, signing_secret, true)
}

fn signing_secret(secrets: &mut MockSecretStore) {
    secrets.expect_get().returning(|_| Ok(SecretValue(json!({"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}))));
}

fn world_with(receiver_status: u16, secrets_answer: impl FnOnce(&mut MockSecretStore)) -> World {
    world_of(receiver_status, secrets_answer, false)
}

fn world_of(receiver_status: u16, secrets_answer: impl FnOnce(&mut MockSecretStore), keeps_queue: bool) -> World {
    let tenant = TenantId::new("tenant-a").unwrap();
    let start = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let clock = Arc::new(TestClock(Mutex::new(start)));
    let webhook_id = WebhookId(Uuid::now_v7());
    let secret = SecretRef { secret_name: SecretName::new(&tenant, "webhook", &webhook_id.to_string()), version: "1".into() };
    let webhook = Webhook {
        id: webhook_id,
        tenant_id: tenant.clone(),
        url: "https://hooks.example.com/im".into(),
        description: String::new(),
        event_types: Vec::new(),
        integration_ids: Vec::new(),
        status: WebhookStatus::Enabled,
        disabled_reason: None,
        headers: BTreeMap::new(),
        rate_limit_per_second: None,
        secret,
        previous_secret: None,
        headers_secret: None,
        failing_since: None,
        consecutive_failures: 0,
        created_at: start,
        updated_at: start,
        created_by: crate::common::UserId::new("u").unwrap(),
        updated_by: crate::common::UserId::new("u").unwrap(),
    };
    let webhooks = Arc::new(Endpoints(Mutex::new(vec![webhook]), AtomicUsize::new(0)));
    let mut secrets = MockSecretStore::new();
    secrets_answer(&mut secrets);
    let endpoints = WebhookService::new(
        webhooks.clone(),
        Arc::new(secrets),
        clock.clone(),
        Arc::new(UuidV7),
        Arc::new(OsEntropy),
        UrlPolicy::default(),
        Duration::from_secs(60),
        Audit::discarding(),
    );
    let deliveries = Arc::new(Deliveries { keeps_queue, ..Deliveries::default() });
    let queue = Arc::new(Broker::default());
    let receiver = Arc::new(Receiver { status: receiver_status, calls: AtomicUsize::new(0) });
    let settings = DeliverySettings {
        retry_schedule: vec![Duration::from_secs(300), Duration::from_secs(3600)],
        disable_after: Duration::from_secs(86_400 * 5),
        disable_min_failures: 100,
        user_agent: "test".into(),
    };
    let service = DeliveryService::new(
        webhooks.clone(),
        endpoints,
        deliveries.clone(),
        queue.clone(),
        receiver.clone(),
        clock.clone(),
        Arc::new(UuidV7),
        settings,
        Audit::discarding(),
    );
    let event = DomainEvent {
        id: Uuid::now_v7(),
        event_type: EventType::IntegrationCreated,
        tenant_id: tenant,
        subject: "i".into(),
        time: start,
        data: json!({"id": "i"}).into(),
    };
    let delivery_id = delivery_id(webhook_id, &event.id.to_string());
    World { service, deliveries, queue, receiver, clock, event, delivery_id, webhook_id, webhooks }
}

impl World {
    /// Takes every queued job and runs it, as several dispatchers would, one after the other.
    fn run_queued(&self) {
        let jobs = block_on(self.queue.take_due(100, ATTEMPT_LEASE)).unwrap();
        for job in jobs {
            block_on(self.service.attempt(&job, AttemptTrigger::Scheduled)).unwrap();
        }
    }

    fn sends(&self) -> usize {
        self.receiver.calls.load(Ordering::SeqCst)
    }
}

#[test]
fn a_replayed_event_leaves_a_waiting_retry_where_it_is() {
    let w = world(500);
    block_on(w.service.fan_out(&w.event)).unwrap();
    w.run_queued();
    let retry_at = w.deliveries.value(w.delivery_id).next_attempt_at.expect("a retry is scheduled");
    assert!(retry_at > w.clock.now());

    block_on(w.service.fan_out(&w.event)).unwrap();

    assert!(w.queue.dues().iter().all(|due| *due >= retry_at), "a replay queued a job before the retry: {:?}", w.queue.dues());
    assert_eq!(w.deliveries.value(w.delivery_id).next_attempt_at, Some(retry_at), "the delivery was rescheduled");
    w.run_queued();
    assert_eq!(w.sends(), 1, "a replayed event started a second chain of attempts");
}

#[test]
fn a_duplicate_job_is_dropped_without_a_second_attempt() {
    let w = world(500);
    block_on(w.service.fan_out(&w.event)).unwrap();
    // Relayed again before the first attempt (a crash between publishing and marking).
    block_on(w.service.fan_out(&w.event)).unwrap();
    assert_eq!(w.queue.dues().len(), 2, "the broker holds both jobs");

    w.run_queued();

    assert_eq!(w.sends(), 1, "both jobs made an attempt");
    let delivery = w.deliveries.value(w.delivery_id);
    assert_eq!(delivery.attempts.len(), 1);
    assert_eq!(delivery.lease_until, delivery.next_attempt_at, "the attempt's hold now ends when the retry is due");
    assert_eq!(w.queue.dues(), vec![delivery.next_attempt_at.unwrap()], "exactly one job waits, for the retry");

    w.clock.advance(Duration::from_secs(400));
    w.run_queued();
    assert_eq!(w.sends(), 2, "the retry ran once");
    assert_eq!(w.queue.dues().len(), 1, "one chain of attempts");
}

#[test]
fn an_attempt_handed_an_out_of_date_record_reads_it_again() {
    // The endpoint disabled: the attempt skips the delivery, a write conditional on the version
    // it read.
    let w = world(200);
    block_on(w.service.fan_out(&w.event)).unwrap();
    let as_written = block_on(w.deliveries.get(&w.event.tenant_id, w.delivery_id)).unwrap();
    // Another writer changed it since (its version moved on), and the endpoint was disabled.
    block_on(w.deliveries.replace(&as_written.value, None, &[])).unwrap();
    w.webhooks.0.lock().unwrap()[0].status = WebhookStatus::Disabled;
    *w.deliveries.handed.lock().unwrap() = Some(as_written.clone());
    w.run_queued();
    assert!(w.deliveries.handed.lock().unwrap().is_none(), "the attempt read the handed version");
    assert_eq!(w.deliveries.value(w.delivery_id).status, DeliveryStatus::Skipped, "skipped at once, not rescheduled");
    assert_eq!(w.sends(), 0);
    assert!(w.queue.dues().is_empty(), "its job is done: {:?}", w.queue.dues());

    // The endpoint enabled: the attempt's hold fails the same way, and it is made once.
    let w = world(200);
    block_on(w.service.fan_out(&w.event)).unwrap();
    let as_written = block_on(w.deliveries.get(&w.event.tenant_id, w.delivery_id)).unwrap();
    block_on(w.deliveries.replace(&as_written.value, None, &[])).unwrap();
    *w.deliveries.handed.lock().unwrap() = Some(as_written);
    w.run_queued();
    assert!(w.deliveries.handed.lock().unwrap().is_none(), "the attempt read the handed version");
    assert_eq!((w.sends(), w.deliveries.value(w.delivery_id).status), (1, DeliveryStatus::Succeeded));

    // A manual attempt sends before it writes: it reads the current version, never a handed one.
    let w = world(500);
    block_on(w.service.fan_out(&w.event)).unwrap();
    w.run_queued();
    let failed_once = block_on(w.deliveries.get(&w.event.tenant_id, w.delivery_id)).unwrap();
    block_on(w.deliveries.replace(&failed_once.value, None, &[])).unwrap();
    *w.deliveries.handed.lock().unwrap() = Some(failed_once);
    block_on(w.service.retry(&member(), w.webhook_id, w.delivery_id)).unwrap();
    assert!(w.deliveries.handed.lock().unwrap().is_some(), "a manual attempt took the handed version");
    assert_eq!((w.sends(), w.deliveries.value(w.delivery_id).attempts.len()), (2, 2), "sent and recorded");
}

#[test]
fn a_job_for_a_delivery_held_by_an_attempt_in_progress_waits_for_the_hold() {
    let w = world(200);
    block_on(w.service.fan_out(&w.event)).unwrap();
    let held_until = w.clock.now() + time::Duration::seconds(90);
    {
        let mut rows = w.deliveries.rows.lock().unwrap();
        let row = rows.get_mut(&w.delivery_id).unwrap();
        row.0.lease_until = Some(held_until);
    }
    // A replay while the attempt is in progress neither clears the hold nor queues for now.
    block_on(w.service.fan_out(&w.event)).unwrap();
    assert_eq!(w.deliveries.value(w.delivery_id).lease_until, Some(held_until));
    assert!(w.queue.dues().iter().skip(1).all(|due| *due >= held_until), "{:?}", w.queue.dues());

    w.run_queued();
    assert_eq!(w.sends(), 0, "an attempt was made while another held the delivery");
    assert!(w.queue.dues().iter().all(|due| *due == held_until), "jobs come back when the hold ends: {:?}", w.queue.dues());

    // The holder died: once the hold ends, exactly one attempt is made.
    w.clock.advance(Duration::from_secs(91));
    w.run_queued();
    assert_eq!(w.sends(), 1);
    assert_eq!(w.deliveries.value(w.delivery_id).status, DeliveryStatus::Succeeded);
    assert!(w.queue.dues().is_empty());
}

#[test]
fn an_attempt_the_secret_store_cannot_sign_waits_for_the_schedule_released() {
    let w = world_with(200, |secrets| {
        secrets.expect_get().returning(|_| Err(DomainError::unavailable("secret management is down")));
    });
    block_on(w.service.fan_out(&w.event)).unwrap();
    let job = block_on(w.queue.take_due(10, ATTEMPT_LEASE)).unwrap().remove(0);

    let report = block_on(w.service.attempt(&job, AttemptTrigger::Scheduled)).unwrap();

    let AttemptReport::Postponed { at, reason } = report else { panic!("{report:?}") };
    assert!(reason.contains("secret management is down"), "{reason}");
    assert_eq!(at, w.clock.now() + time::Duration::seconds(300), "the first step of the schedule");
    let delivery = w.deliveries.value(w.delivery_id);
    assert_eq!((delivery.status, delivery.lease_until, delivery.next_attempt_at), (DeliveryStatus::Pending, Some(at), Some(at)));
    assert!(delivery.attempts.is_empty(), "no request was sent");
    assert_eq!(w.queue.dues(), vec![at], "the job waits in the queue, the delivery held no longer than until then");
    assert_eq!(w.sends(), 0);
}

#[test]
fn a_delivery_whose_signing_secret_is_gone_fails_with_the_reason() {
    let w = world_with(200, |secrets| {
        secrets.expect_get().returning(|r| Err(DomainError::not_found("secret", &r.secret_name)));
    });
    block_on(w.service.fan_out(&w.event)).unwrap();

    w.run_queued();

    let delivery = w.deliveries.value(w.delivery_id);
    assert_eq!(delivery.status, DeliveryStatus::Failed);
    assert_eq!(delivery.next_attempt_at, None);
    let reason = delivery.attempts.last().and_then(|a| a.error.clone()).unwrap_or_default();
    assert!(reason.contains("signing secret is gone"), "{reason}");
    assert!(w.queue.dues().is_empty(), "nothing is retried");
    assert_eq!(w.sends(), 0);
}

/// A member of the world's tenant.
fn member() -> Caller {
    Caller { tenant_id: TenantId::new("tenant-a").unwrap(), user_id: crate::common::UserId::new("u").unwrap(), roles: vec![Role::Member] }
}

#[test]
fn manual_sends_of_an_endpoint_are_rate_limited_per_minute() {
    let w = world(200);
    let service = w.service.clone().with_manual_sends_per_minute(2);
    let caller = member();
    let test = block_on(service.test(&caller, w.webhook_id)).unwrap();
    w.clock.advance(Duration::from_secs(20));
    block_on(service.retry(&caller, w.webhook_id, test.value.id)).unwrap();
    w.clock.advance(Duration::from_secs(10));
    let refused = block_on(service.test(&caller, w.webhook_id));
    match refused {
        Err(DomainError::TooManyRequests { retry_after, .. }) => {
            assert_eq!(retry_after, Duration::from_secs(30), "until the oldest send leaves the minute")
        }
        other => panic!("expected TooManyRequests, got {other:?}"),
    }
    assert!(matches!(block_on(service.retry(&caller, w.webhook_id, test.value.id)), Err(DomainError::TooManyRequests { .. })));
    assert_eq!(w.sends(), 2, "refused sends reach no receiver");
    w.clock.advance(Duration::from_secs(30));
    block_on(service.test(&caller, w.webhook_id)).expect("the window moved on");
}

#[test]
fn with_the_queue_in_the_store_a_batch_is_recorded_with_its_jobs_and_an_attempt_moves_or_removes_its_job() {
    let w = world_with_queue_in_store(500);
    let second = DomainEvent { id: Uuid::now_v7(), ..w.event.clone() };
    let second_id = delivery_id(w.webhook_id, &second.id.to_string());

    let queued = block_on(w.service.fan_out_all(&[w.event.clone(), second])).unwrap();

    assert_eq!(queued, 2);
    assert_eq!(w.webhooks.1.load(Ordering::SeqCst), 1, "the tenant's endpoints are listed once for the batch");
    let jobs = w.deliveries.jobs.lock().unwrap().clone();
    assert_eq!(jobs, HashMap::from([(w.delivery_id, w.clock.now()), (second_id, w.clock.now())]), "each record with its job");
    assert!(w.queue.dues().is_empty(), "no job goes to the queue on its own");

    // A failed attempt moves the job to the retry with the record.
    let job = DeliveryJob { tenant_id: w.event.tenant_id.clone(), delivery_id: w.delivery_id };
    let report = block_on(w.service.attempt(&job, AttemptTrigger::Scheduled)).unwrap();
    let AttemptReport::RetryAt(at) = report else { panic!("{report:?}") };
    assert_eq!(w.deliveries.value(w.delivery_id).next_attempt_at, Some(at));
    assert_eq!(w.deliveries.jobs.lock().unwrap()[&w.delivery_id], at, "the job waits for the retry");
    assert!(w.queue.dues().is_empty(), "nothing was scheduled on its own");
}

/// A process's capacity for first attempts in the fan-out; keeps what it is handed.
#[derive(Default)]
struct Here {
    capacity: usize,
    asked: usize,
    started: Vec<HeldAttempt>,
    /// Writes after which unused capacity was given back.
    released: usize,
}

impl FirstAttempts for Here {
    fn reserve(&mut self, pending: usize) -> usize {
        self.asked += 1;
        let taken = pending.min(self.capacity);
        self.capacity -= taken;
        taken
    }

    fn start(&mut self, attempt: HeldAttempt) {
        self.started.push(attempt);
    }

    fn release_unused(&mut self) {
        self.released += 1;
    }
}

fn second_event(w: &World) -> (DomainEvent, Uuid) {
    let second = DomainEvent { id: Uuid::now_v7(), ..w.event.clone() };
    let id = delivery_id(w.webhook_id, &second.id.to_string());
    (second, id)
}

#[test]
fn a_first_attempt_made_by_the_fan_out_goes_through_no_queue_and_queues_no_job() {
    let w = world(200);
    let (second, second_id) = second_event(&w);
    // Capacity for one of the two: the other is queued as before.
    let mut here = Here { capacity: 1, ..Here::default() };

    let queued = block_on(w.service.fan_out_holding(&[w.event.clone(), second], &mut here)).unwrap();

    assert_eq!(queued, 2);
    let held = w.deliveries.value(w.delivery_id);
    let until = held.lease_until.expect("the delivery attempted here is created held");
    assert_eq!(until, w.clock.now() + time::Duration::try_from(ATTEMPT_LEASE).unwrap(), "held as long as an attempt holds");
    assert_eq!(w.deliveries.value(second_id).lease_until, None, "the other one is not held");
    assert_eq!(w.queue.dues(), vec![w.clock.now()], "the other's job is due now; the held one has none");
    assert_eq!(here.started.len(), 1, "one attempt handed out");
    assert_eq!(here.started[0].job().delivery_id, w.delivery_id);

    let report = block_on(w.service.attempt_held(here.started.pop().unwrap())).unwrap();
    assert!(matches!(report, AttemptReport::Delivered { .. }), "{report:?}");
    assert_eq!(w.sends(), 1);
    let delivered = w.deliveries.value(w.delivery_id);
    assert_eq!(delivered.status, DeliveryStatus::Succeeded);
    assert_eq!(delivered.lease_until, None, "the attempt released its hold");

    // The queued job: one more send, for the other. Once the hold would have ended, the
    // sweep finds nothing to queue again.
    w.run_queued();
    assert_eq!(w.sends(), 2);
    assert_eq!(w.deliveries.value(second_id).status, DeliveryStatus::Succeeded);
    w.clock.advance(ATTEMPT_LEASE + ENDED_HOLD_GRACE + Duration::from_secs(1));
    assert!(block_on(w.service.requeue_ended_holds(100)).unwrap().is_empty(), "a recorded attempt leaves no hold behind");
    assert!(w.queue.dues().is_empty(), "nothing left queued");
}

/// The event fanned out by a process that takes its first attempt and dies before making it:
/// the world, and when the delivery's hold ends.
fn fanned_out_held_and_abandoned() -> (World, OffsetDateTime) {
    let w = world(200);
    let mut here = Here { capacity: 4, ..Here::default() };
    block_on(w.service.fan_out_holding(std::slice::from_ref(&w.event), &mut here)).unwrap();
    let until = w.deliveries.value(w.delivery_id).lease_until.expect("created held");
    drop(here);
    (w, until)
}

#[test]
fn a_first_attempt_its_process_never_made_is_made_once_its_hold_has_ended() {
    let (w, until) = fanned_out_held_and_abandoned(); // Its relay round marked the event done.
    assert!(w.queue.dues().is_empty(), "no job was queued for the held delivery");

    // While the hold lasts, and within the grace after it, the sweep leaves it alone.
    assert!(block_on(w.service.requeue_ended_holds(100)).unwrap().is_empty());
    w.clock.advance(ATTEMPT_LEASE + ENDED_HOLD_GRACE);
    assert!(block_on(w.service.requeue_ended_holds(100)).unwrap().is_empty(), "queued within the grace");

    w.clock.advance(Duration::from_secs(1));
    let requeued = block_on(w.service.requeue_ended_holds(100)).unwrap();
    assert_eq!(requeued.iter().map(|j| j.delivery_id).collect::<Vec<_>>(), vec![w.delivery_id]);
    assert_eq!(w.queue.dues(), vec![w.clock.now()], "due at once");
    assert_eq!(w.deliveries.value(w.delivery_id).lease_until, Some(w.clock.now()), "claimed: its hold ends at the sweep");
    assert!(w.clock.now() > until);
    // Another instance's sweep (or this one's next) finds nothing more.
    assert!(block_on(w.service.requeue_ended_holds(100)).unwrap().is_empty(), "queued twice");

    w.run_queued();
    assert_eq!(w.sends(), 1, "the attempt was made, once");
    assert_eq!(w.deliveries.value(w.delivery_id).status, DeliveryStatus::Succeeded);
}

#[test]
fn a_held_first_attempt_whose_event_is_relayed_again_waits_for_the_hold() {
    let (w, until) = fanned_out_held_and_abandoned(); // Before its relay round was marked.

    // The event, relayed again, queues no earlier job.
    block_on(w.service.fan_out(&w.event)).unwrap();
    assert!(w.queue.dues().iter().all(|due| *due >= until), "a job came before the hold's end: {:?}", w.queue.dues());
    // Jobs taken early (a broker's clock ahead) wait for the hold.
    w.run_queued();
    assert_eq!(w.sends(), 0, "an attempt was made while the delivery was held");

    w.clock.advance(ATTEMPT_LEASE + Duration::from_secs(1));
    w.run_queued();
    assert_eq!(w.sends(), 1, "the replayed event's job made the attempt, once");
    // The sweep, later, finds the delivery done.
    w.clock.advance(ENDED_HOLD_GRACE * 2);
    assert!(block_on(w.service.requeue_ended_holds(100)).unwrap().is_empty());
    assert_eq!(w.deliveries.value(w.delivery_id).status, DeliveryStatus::Succeeded);
}

#[test]
fn a_hold_taken_again_between_the_sweeps_read_and_its_claim_stands() {
    let (w, _) = fanned_out_held_and_abandoned();
    w.clock.advance(ATTEMPT_LEASE + ENDED_HOLD_GRACE + Duration::from_secs(1));
    // Another worker (a replayed event's job, say) holds it again right after the sweep read it.
    let again = w.clock.now() + time::Duration::MINUTE;
    *w.deliveries.held_again_after_listing.lock().unwrap() = Some(again);

    let requeued = block_on(w.service.requeue_ended_holds(100)).unwrap();

    assert!(requeued.is_empty(), "the claim failed: nothing is queued");
    assert!(w.queue.dues().is_empty(), "a job beside the new holder's");
    assert_eq!(w.deliveries.value(w.delivery_id).lease_until, Some(again), "the new hold stands");
}

#[test]
fn a_retry_whose_job_the_queue_refused_is_queued_by_the_sweep_once_it_is_overdue() {
    let w = world(500);
    let mut here = Here { capacity: 4, ..Here::default() };
    block_on(w.service.fan_out_holding(std::slice::from_ref(&w.event), &mut here)).unwrap();
    w.queue.refuse.store(true, Ordering::SeqCst); // The broker is away when the retry is recorded.

    let report = block_on(w.service.attempt_held(here.started.pop().unwrap()));

    assert!(report.is_err(), "the retry's job could not be queued: {report:?}");
    assert_eq!(w.sends(), 1);
    let recorded = w.deliveries.value(w.delivery_id);
    let at = recorded.next_attempt_at.expect("a retry");
    assert_eq!((recorded.status, recorded.lease_until), (DeliveryStatus::Pending, Some(at)), "recorded held until the retry is due");
    assert!(w.queue.dues().is_empty(), "no job anywhere for the retry");
    w.queue.refuse.store(false, Ordering::SeqCst);

    w.clock.advance(Duration::try_from(at - w.clock.now()).unwrap() + ENDED_HOLD_GRACE);
    assert!(block_on(w.service.requeue_ended_holds(100)).unwrap().is_empty(), "queued within the grace");
    w.clock.advance(Duration::from_secs(1));
    assert_eq!(block_on(w.service.requeue_ended_holds(100)).unwrap().len(), 1, "the overdue retry is queued");
    w.run_queued();
    assert_eq!(w.sends(), 2, "the retry was made");
}

#[test]
fn a_recovered_delivery_whose_job_the_queue_refused_is_queued_by_the_sweep() {
    let w = world(200);
    block_on(w.service.fan_out(&w.event)).unwrap();
    block_on(w.queue.take_due(10, ATTEMPT_LEASE)).unwrap(); // Its job ran while the endpoint was disabled:
    w.deliveries.rows.lock().unwrap().get_mut(&w.delivery_id).unwrap().0.status = DeliveryStatus::Skipped;
    let caller = member();
    w.queue.refuse.store(true, Ordering::SeqCst); // The broker is away when it is recovered.

    let recovered = block_on(w.service.recover(&caller, w.webhook_id, w.clock.now() - time::Duration::HOUR));

    assert!(recovered.is_err(), "its job could not be queued: {recovered:?}");
    let delivery = w.deliveries.value(w.delivery_id);
    assert_eq!((delivery.status, delivery.lease_until), (DeliveryStatus::Pending, Some(w.clock.now())), "pending, held until due (now)");
    w.queue.refuse.store(false, Ordering::SeqCst);
    w.clock.advance(ENDED_HOLD_GRACE + Duration::from_secs(1));
    assert_eq!(block_on(w.service.requeue_ended_holds(100)).unwrap().len(), 1, "the sweep queues it");
    w.run_queued();
    assert_eq!(w.sends(), 1);
    assert_eq!(w.deliveries.value(w.delivery_id).status, DeliveryStatus::Succeeded);
}

#[test]
fn with_the_queue_in_the_store_the_sweep_does_nothing() {
    let w = world_with_queue_in_store(200);
    block_on(w.service.fan_out(&w.event)).unwrap();
    let mut held = w.deliveries.value(w.delivery_id);
    held.lease_until = Some(w.clock.now());
    block_on(w.deliveries.replace(&held, None, &[])).unwrap();
    w.clock.advance(ATTEMPT_LEASE + ENDED_HOLD_GRACE * 2);
    assert!(block_on(w.service.requeue_ended_holds(100)).unwrap().is_empty(), "the store's queue holds its job");
    assert_eq!(w.deliveries.value(w.delivery_id).lease_until, held.lease_until);
}

#[test]
fn with_the_queue_in_the_store_the_fan_out_makes_no_first_attempt_itself() {
    let w = world_with_queue_in_store(200);
    let mut here = Here { capacity: 4, ..Here::default() };
    block_on(w.service.fan_out_holding(std::slice::from_ref(&w.event), &mut here)).unwrap();
    assert_eq!((here.asked, here.started.len()), (0, 0), "the store's take hands jobs out already");
    assert_eq!(w.deliveries.value(w.delivery_id).lease_until, None);
    assert_eq!(w.deliveries.jobs.lock().unwrap().get(&w.delivery_id), Some(&w.clock.now()), "queued with its record");
}

#[test]
fn a_write_failing_partway_still_attempts_and_queues_what_it_created_and_fails_the_fan_out() {
    let w = world(200);
    let (second, second_id) = second_event(&w);
    let (third, third_id) = second_event(&w);
    *w.deliveries.refuse.lock().unwrap() = Some(second_id);
    let mut here = Here { capacity: 3, ..Here::default() };

    let batch = [w.event.clone(), second, third];
    let result = block_on(w.service.fan_out_holding(&batch, &mut here));

    assert!(matches!(result, Err(DomainError::Unavailable { .. })), "the relay must hand the batch again: {result:?}");
    assert_eq!(here.started.len(), 1, "the delivery created before the failure is attempted");
    assert_eq!(here.released, 1, "the capacity of the others is given back");
    assert!(w.deliveries.value(w.delivery_id).lease_until.is_some(), "created held");
    assert!(w.queue.dues().is_empty(), "no job for the held one");
    assert!(!w.deliveries.rows.lock().unwrap().contains_key(&third_id), "nothing is created after the failure");
    block_on(w.service.attempt_held(here.started.pop().unwrap())).unwrap();

    // The relay hands the batch again: the missing ones are created and queued, once.
    *w.deliveries.refuse.lock().unwrap() = None;
    block_on(w.service.fan_out_all(&batch)).unwrap();
    w.clock.advance(ATTEMPT_LEASE);
    w.run_queued();
    assert_eq!(w.sends(), 3, "each delivery was made once");
    for id in [w.delivery_id, second_id, third_id] {
        assert_eq!(w.deliveries.value(id).status, DeliveryStatus::Succeeded);
    }
}
