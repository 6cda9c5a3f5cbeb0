//! Ports of the webhook capability.

use async_trait::async_trait;

use super::endpoint::{Webhook, WebhookId};
use crate::common::{ETag, Page, PageRequest, Stored, TenantId};
use crate::error::DomainError;

/// Storage of webhook endpoints, partitioned by tenant.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait WebhookRepository: Send + Sync {
    /// # Errors
    /// MUST return [`DomainError::Conflict`] when the id exists in the tenant.
    async fn create(&self, webhook: &Webhook) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when the tenant has no such endpoint.
    async fn get(&self, tenant: &TenantId, id: WebhookId) -> Result<Stored<Webhook>, DomainError>;

    /// One tenant's endpoints, oldest first, one page at a time; never another tenant's.
    ///
    /// # Errors
    /// MUST return [`DomainError::Validation`] on `continuationToken` for a token it did not issue.
    async fn list(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale, having written nothing.
    async fn replace(&self, webhook: &Webhook, if_match: Option<ETag>) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent and [`DomainError::PreconditionFailed`]
    /// when `if_match` is stale.
    async fn delete(&self, tenant: &TenantId, id: WebhookId, if_match: Option<ETag>) -> Result<(), DomainError>;
}

/// Random bytes for secrets (the OS generator in production, fixed bytes in tests).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
pub trait Entropy: Send + Sync {
    fn fill(&self, bytes: &mut [u8]);
}

/// The operating system's random generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&self, bytes: &mut [u8]) {
        // Without randomness no secret can be made safely: stop rather than issue a weak one.
        getrandom::fill(bytes).unwrap_or_else(|e| panic!("the operating system has no randomness: {e}"));
    }
}

/// Storage of deliveries, partitioned by tenant, kept 7 days.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait DeliveryRepository: Send + Sync {
    /// # Errors
    /// MUST return [`DomainError::Conflict`] when the id exists (the event was fanned out before).
    async fn create(&self, delivery: &super::delivery::Delivery) -> Result<ETag, DomainError>;

    /// # Errors
    /// MUST return [`DomainError::NotFound`] when absent, expired or another tenant's.
    async fn get(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Stored<super::delivery::Delivery>, DomainError>;

    /// The delivery as a scheduled attempt about to make it reads it (those reads alone; the
    /// API's and manual attempts' use [`Self::get`]). A store may answer with the version it
    /// handed over when it wrote or queued the delivery moments ago, sparing a read. That
    /// version may be out of date only where another instance can write the delivery
    /// meanwhile (a queue elsewhere): there the attempt's first write, its hold or the skip,
    /// is conditional on it and fails [`DomainError::PreconditionFailed`], and the attempt
    /// reads again. Where the store keeps the queue, the job's lease keeps others off the
    /// delivery, and the store MUST hand only a version still current.
    ///
    /// # Errors
    /// As [`Self::get`].
    async fn get_for_attempt(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Stored<super::delivery::Delivery>, DomainError> {
        self.get(tenant, id).await
    }

    /// One endpoint's deliveries matching `filter`, oldest first, paged.
    async fn list(
        &self,
        tenant: &TenantId,
        webhook: WebhookId,
        filter: &super::delivery::DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<super::delivery::Delivery>>, DomainError>;

    /// Replaces a delivery and records `events` atomically with it.
    ///
    /// # Errors
    /// MUST return [`DomainError::PreconditionFailed`] when `if_match` is stale, writing nothing.
    async fn replace(
        &self,
        delivery: &super::delivery::Delivery,
        if_match: Option<ETag>,
        events: &[crate::events::DomainEvent],
    ) -> Result<ETag, DomainError>;

    /// Pending deliveries of every tenant whose hold ([`super::delivery::Delivery::lease_until`])
    /// ended before `before`, the earliest ended first, at most `limit`: the first attempts an
    /// instance took in its fan-out and died before recording, and the retries (or throttled
    /// attempts) held until due whose job never reached the queue (see
    /// [`crate::services::DeliveryService::requeue_ended_holds`]). A delivery that is final, or
    /// holds no lease, or whose hold ends at `before` or later, MUST NOT be listed.
    async fn holds_ended_before(
        &self,
        before: time::OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Stored<super::delivery::Delivery>>, DomainError>;

    /// Creates each delivery on its own terms, in one write where the store allows it (the
    /// embedded store: one transaction): an id that exists is `Err(Conflict)` for that item
    /// alone, and the others are created. The outcomes come in the order of `deliveries`. A
    /// store that creates them one by one (this default) stops at the first other failure:
    /// that item's outcome is the error, and each item after it `Err(Unavailable)`, not
    /// created; those before it stand, so the caller still sees what was created.
    ///
    /// # Errors
    /// When the store cannot be written (then none was created).
    async fn create_each(&self, deliveries: &[super::delivery::Delivery]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        let mut outcomes = Vec::with_capacity(deliveries.len());
        let mut failed = false;
        for delivery in deliveries {
            if failed {
                outcomes.push(Err(DomainError::unavailable("not created: an earlier create of the same write failed")));
                continue;
            }
            let outcome = self.create(delivery).await;
            failed = outcome.as_ref().is_err_and(|e| !matches!(e, DomainError::Conflict(_)));
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Whether the delivery queue the service uses lives in this repository's database, so that
    /// [`Self::create_each_queued`] and [`Self::replace_queued`] write a delivery and its job in
    /// one transaction. `false` by default (Cosmos DB, or the embedded store when the queue is
    /// RabbitMQ): the service then writes the record and the job one after the other.
    fn keeps_queue(&self) -> bool {
        false
    }

    /// [`Self::create_each`], and in the same transaction, for each delivery created `pending`,
    /// its first job at its `next_attempt_at` (as [`DeliveryQueue::schedule`] would): a delivery
    /// is never recorded without its job, nor a job queued without its delivery.
    ///
    /// # Errors
    /// MUST return [`DomainError::Unexpected`] when [`Self::keeps_queue`] is `false`, writing nothing.
    async fn create_each_queued(&self, deliveries: &[super::delivery::Delivery]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        let _ = deliveries;
        Err(keeps_no_queue())
    }

    /// [`Self::replace`], and in the same transaction the job of the delivery: removed
    /// ([`JobAfter::Complete`]) or due again at a time, unleased ([`JobAfter::RetryAt`]).
    ///
    /// # Errors
    /// MUST return [`DomainError::PreconditionFailed`] when `if_match` is stale, writing neither;
    /// [`DomainError::Unexpected`] when [`Self::keeps_queue`] is `false`, writing nothing.
    async fn replace_queued(
        &self,
        delivery: &super::delivery::Delivery,
        if_match: Option<ETag>,
        events: &[crate::events::DomainEvent],
        job: JobAfter,
    ) -> Result<ETag, DomainError> {
        let _ = (delivery, if_match, events, job);
        Err(keeps_no_queue())
    }
}

fn keeps_no_queue() -> DomainError {
    DomainError::Unexpected(anyhow::anyhow!("this delivery repository keeps no delivery queue"))
}

/// What becomes of a delivery's job when an attempt is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAfter {
    /// The delivery is final (or nothing is left to do): the job is removed.
    Complete,
    /// The next attempt is due at this time: the job waits for it, unleased.
    RetryAt(time::OffsetDateTime),
}

/// A delivery attempt waiting to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryJob {
    pub tenant_id: TenantId,
    pub delivery_id: uuid::Uuid,
}

/// The durable queue of delivery attempts: nothing scheduled is lost by a restart or a crash.
/// `im_testkit::queue` checks every clause below against every adapter.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait DeliveryQueue: Send + Sync {
    /// Schedules (or reschedules, for a retry of the attempt that holds it) the attempt of a
    /// delivery at `due`. MUST be durable when it returns. A queue that keeps one job per
    /// delivery MUST NOT let two consumers hold it at the same time; a broker MAY hand out a
    /// duplicate, which the delivery service drops (an attempt holds its delivery first).
    async fn schedule(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError>;

    /// [`Self::schedule`] for several jobs (a fan-out's new deliveries): durable when it returns
    /// `Ok`; on an error some MAY be scheduled (scheduling again is safe). A queue may send them
    /// together; by default one after the other.
    async fn schedule_each(&self, jobs: &[(DeliveryJob, time::OffsetDateTime)]) -> Result<(), DomainError> {
        for (job, due) in jobs {
            self.schedule(job, *due).await?;
        }
        Ok(())
    }

    /// Queues the first attempt of a delivery at `due` unless a job for it is queued already:
    /// MUST NOT change the due time or the lease of a queued job (an event replayed while its
    /// delivery waits for a retry, or while an attempt is in progress). A queue that cannot tell
    /// (a broker) MAY queue a second job; the delivery service drops such duplicates.
    async fn schedule_if_absent(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError>;

    /// Takes up to `max` jobs that are due, leasing them for `lease`. MUST NOT hand out a job
    /// before its due time, nor a job that is leased (to this consumer or another); a job taken
    /// by a worker that dies comes back, at the latest when the lease ends.
    async fn take_due(&self, max: u32, lease: std::time::Duration) -> Result<Vec<DeliveryJob>, DomainError>;

    /// Removes a job (after its attempt was recorded); it is not handed out again. MUST succeed
    /// for a job that is not queued.
    async fn complete(&self, job: &DeliveryJob) -> Result<(), DomainError>;

    /// When the next job is due, if known (so the dispatcher can sleep until then); MUST NOT be
    /// later than the earliest due job. `None` when the queue is empty or cannot tell.
    async fn next_due(&self) -> Result<Option<time::OffsetDateTime>, DomainError>;

    /// How many jobs wait for an attempt (due or not), for metrics; `None` when the queue
    /// cannot tell cheaply. A broker MAY count only the jobs that are due.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Unavailable`] when the queue cannot be reached.
    async fn depth(&self) -> Result<Option<u64>, DomainError> {
        Ok(None)
    }
}

/// The HTTP request of one attempt, signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRequest {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a receiver answered, or why it could not be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendResult {
    pub status: Option<u16>,
    pub retry_after: Option<std::time::Duration>,
    pub body_excerpt: Option<String>,
    pub error: Option<String>,
    pub duration: std::time::Duration,
}

/// Sends webhook requests (HTTP POST, no redirects, timeouts, SSRF checks after DNS resolution).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait WebhookSender: Send + Sync {
    /// MUST NOT fail: every problem is described in the result.
    async fn send(&self, request: OutgoingRequest) -> SendResult;
}
