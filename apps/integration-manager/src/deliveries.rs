//! The delivery dispatcher: takes due attempts from the durable queue and runs them
//! concurrently (bounded), so one slow or hanging receiver never holds up the others.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::events::{DomainEvent, EventType};
use im_domain::ports::{EventPublisher, EventSubscriber};
use im_domain::retry::Backoff;
use im_domain::services::{AttemptReport, DeliveryService, FirstAttempts, HeldAttempt};
use im_domain::webhooks::delivery::AttemptTrigger;
use im_domain::webhooks::ports::DeliveryJob;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a taken job stays leased to this process (a crash releases it after this): as long
/// as the attempt holds its delivery.
const LEASE: Duration = im_domain::webhooks::delivery::ATTEMPT_LEASE;
/// When an attempt that could not complete is tried again.
const RETRY_INCOMPLETE: time::Duration = time::Duration::seconds(5);
/// Sleeps when nothing is due: from 25 ms, doubling while the queue stays empty, at most 500 ms
/// (jobs queued by another instance wake nobody here, so an idle dispatcher still looks at the
/// shared queue that often); a wake-up or a taken job starts over from the shortest.
const IDLE: Backoff = Backoff { attempts: u32::MAX, first: Duration::from_millis(25), max: Duration::from_millis(500) };
/// Sleeps after failed reads of the queue: from 250 ms, doubling while they fail, at most 30 s.
const FAILING: Backoff = Backoff { attempts: u32::MAX, first: Duration::from_millis(250), max: Duration::from_secs(30) };

/// Runs until `shutdown`: then it takes no more jobs, and the attempts it started (tracked by
/// `tasks`, so the app waits for them) finish and are recorded. `wake` is notified when new
/// attempts are queued. `permits` bound the attempts in flight (`webhooks.concurrency`),
/// shared with the first attempts the fan-out makes itself ([`FirstHere`]).
pub fn spawn_dispatcher(
    service: DeliveryService,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    let (shutdown, attempts) = (shutdown.clone(), tasks.clone());
    // Shared by the attempts: each takes one reference, not a copy of the service (a count for
    // each of its shared parts, and its settings' schedule and user agent copied).
    let service = Arc::new(service);
    tasks.spawn(im_store_embedded::as_worker(async move {
        // Empty takes and failed reads in a row: how far each backoff has grown.
        let (mut idle, mut failed) = (0u32, 0u32);
        while !shutdown.is_cancelled() {
            let available = permits.available_permits().max(1) as u32;
            let taken = service.queue().take_due(available, LEASE).await;
            failed = if taken.is_err() { failed.saturating_add(1) } else { 0 };
            match taken {
                Ok(jobs) if !jobs.is_empty() => {
                    idle = 0;
                    // Jobs taken are leased to us: each is attempted, even when a stop comes now.
                    for job in jobs {
                        let Ok(permit) = permits.clone().acquire_owned().await else { return };
                        let service = Arc::clone(&service);
                        attempts.spawn(im_store_embedded::as_worker(async move {
                            let report = service.attempt(&job, AttemptTrigger::Scheduled).await;
                            after_attempt(&service, &job, report).await;
                            drop(permit);
                        }));
                    }
                }
                Ok(_) => {
                    idle = idle.saturating_add(1);
                    let longest = IDLE.delay(idle);
                    let wait = match service.queue().next_due().await {
                        Ok(Some(due)) => {
                            let millis = (due - time::OffsetDateTime::now_utc()).whole_milliseconds().clamp(1, longest.as_millis() as i128);
                            Duration::from_millis(millis as u64)
                        }
                        _ => longest,
                    };
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = wake.notified() => idle = 0,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                Err(error) => {
                    let wait = FAILING.delay(failed);
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "reading the delivery queue failed");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        tracing::debug!("delivery dispatcher stopped; attempts in flight finish");
    }));
}

/// Deliveries a sweep reads at a time; it reads again while reads come full, up to
/// [`HOLD_SWEEP_READS`] times.
const HOLD_SWEEP_BATCH: u32 = 200;
const HOLD_SWEEP_READS: u32 = 10;

/// With the delivery queue on a broker, where the fan-out may make first attempts itself (no
/// job is queued for them), runs until `shutdown` the sweep that queues the attempts an
/// instance held and never recorded (it stopped): every `every`
/// (`webhooks.hold_sweep_interval`, each instance from a random point of it), so at most that
/// plus [`im_domain::services::ENDED_HOLD_GRACE`] after their hold ended. Every instance
/// sweeps; the store's conditional claim keeps their work apart.
pub fn spawn_hold_sweeper(service: DeliveryService, every: Duration, wake: Arc<Notify>, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let shutdown = shutdown.clone();
    tasks.spawn(im_store_embedded::as_worker(async move {
        // `every` is at least 100 ms (the settings' check); the max only keeps the modulo defined.
        let mut wait = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_u128() as u32) % every.as_millis().max(1) as u64);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = every;
            for _ in 0..HOLD_SWEEP_READS {
                match service.requeue_ended_holds(HOLD_SWEEP_BATCH).await {
                    Ok(jobs) => {
                        if !jobs.is_empty() {
                            crate::metrics::record_holds_requeued(jobs.len());
                            let first: Vec<_> = jobs.iter().take(5).map(|j| j.delivery_id.to_string()).collect();
                            tracing::warn!(
                                count = jobs.len(),
                                first = %first.join(","),
                                "deliveries whose hold ended without their attempt or its job (an instance stopped, or the broker refused the job) were queued again"
                            );
                            wake.notify_one();
                        }
                        if (jobs.len() as u32) < HOLD_SWEEP_BATCH {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "looking for deliveries whose hold ended failed; the next sweep looks again");
                        break;
                    }
                }
            }
        }
    }));
}

/// Counts an attempt's outcome, and when it could not complete, schedules its job again.
async fn after_attempt(service: &DeliveryService, job: &DeliveryJob, report: Result<AttemptReport, DomainError>) {
    crate::metrics::record_attempt(&report);
    match report {
        Ok(AttemptReport::Postponed { at, reason }) => {
            tracing::warn!(%reason, delivery_id = %job.delivery_id, %at, "delivery attempt postponed");
        }
        Ok(_) => {}
        Err(error) => {
            // The job comes back after a pause (a broker gets it back through a delay queue), or
            // when its lease ends; a delivery the attempt still holds waits for the hold's end.
            tracing::warn!(%error, delivery_id = %job.delivery_id, "delivery attempt failed to complete");
            let again = time::OffsetDateTime::now_utc() + RETRY_INCOMPLETE;
            if let Err(error) = service.queue().schedule(job, again).await {
                tracing::warn!(%error, delivery_id = %job.delivery_id, "rescheduling the attempt failed");
            }
        }
    }
}

/// Fans events out to webhooks and wakes the dispatcher.
pub struct FanOut {
    /// Shared with the first attempts it starts ([`FirstHere`]).
    pub service: Arc<DeliveryService>,
    pub wake: Arc<Notify>,
    /// With the queue on a broker (`webhooks.first_attempt_in_fan_out`), the fan-out makes the
    /// first attempts it has free permits for itself ([`DeliveryService::fan_out_holding`]);
    /// [`spawn_hold_sweeper`] then runs beside it.
    pub first_here: Option<FirstAttemptsHere>,
}

/// What the fan-out needs to make first attempts itself.
pub struct FirstAttemptsHere {
    /// The attempts in flight: the dispatcher's permits.
    pub permits: Arc<Semaphore>,
    /// Where the attempts are tracked (a stop waits for them).
    pub tasks: TaskTracker,
    /// Cancelled when the app stops.
    pub stopping: CancellationToken,
}

/// The first attempts of one fan-out: one free permit of the dispatcher's each, taken before
/// the deliveries are written held; the unused ones go back after each write.
struct FirstHere<'a> {
    service: &'a Arc<DeliveryService>,
    here: &'a FirstAttemptsHere,
    reserved: Vec<OwnedSemaphorePermit>,
}

impl FirstAttempts for FirstHere<'_> {
    fn reserve(&mut self, pending: usize) -> usize {
        // A stop is under way: the fan-out's deliveries go to the queue (another instance, or
        // this one once started again, makes them), not held by a process about to end.
        if self.here.stopping.is_cancelled() {
            return 0;
        }
        let before = self.reserved.len();
        while self.reserved.len() - before < pending {
            match self.here.permits.clone().try_acquire_owned() {
                Ok(permit) => self.reserved.push(permit),
                Err(_) => break,
            }
        }
        self.reserved.len() - before
    }

    fn start(&mut self, attempt: HeldAttempt) {
        let Some(permit) = self.reserved.pop() else {
            // Not reserved (never asked for): the hold sweep queues it once the hold has ended.
            tracing::warn!(delivery_id = %attempt.job().delivery_id, "a first attempt came without a reserved permit");
            return;
        };
        let service = Arc::clone(self.service);
        self.here.tasks.spawn(im_store_embedded::as_worker(async move {
            let job = attempt.job().clone();
            let report = service.attempt_held(attempt).await;
            after_attempt(&service, &job, report).await;
            drop(permit);
        }));
    }

    fn release_unused(&mut self) {
        self.reserved.clear();
    }
}

impl FanOut {
    async fn fan_out(&self, events: &[DomainEvent]) -> Result<usize, DomainError> {
        match &self.first_here {
            Some(here) => {
                let mut first = FirstHere { service: &self.service, here, reserved: Vec::new() };
                self.service.fan_out_holding(events, &mut first).await
            }
            None => self.service.fan_out_all(events).await,
        }
    }
}

/// Events of a relayed batch fanned out in one `fan_out_all` (each tenant's deliveries in one write).
const FAN_OUT_BATCH: usize = 128;

#[async_trait]
impl EventSubscriber for FanOut {
    async fn handle(&self, event: &DomainEvent) -> Result<(), DomainError> {
        if self.fan_out(std::slice::from_ref(event)).await? > 0 {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Fans out the events of a batch, [`FAN_OUT_BATCH`] at a time: each tenant's
    /// endpoints are listed once, its deliveries written in one write (with their jobs when the
    /// queue lives in the store; else their jobs go to the queue together after it). Fan-out is
    /// idempotent per event and endpoint, so a failed batch is simply handled again.
    async fn handle_all(&self, events: &[DomainEvent]) -> Result<(), DomainError> {
        for chunk in events.chunks(FAN_OUT_BATCH) {
            if self.fan_out(chunk).await? > 0 {
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    fn wants(&self, event_type: EventType) -> bool {
        self.service.wants(event_type)
    }

    fn only_for_tenants_with_webhooks(&self) -> bool {
        self.service.only_for_tenants_with_webhooks()
    }
}

/// Publishes to the broker and hands the events to this process's subscribers (webhook
/// fan-out) at the same time, so both happen in every events mode and neither waits for the
/// other (a webhook's first attempt does not wait for the broker's confirm of its event); an
/// event is marked published only when both took it. Both are at least once: when one fails,
/// the batch is handed to both again (the fan-out is idempotent per event and endpoint; the
/// broker's consumers see events at least once). An event fanned out again queues one more job
/// for each of its deliveries still pending, since a broker's queue cannot tell that one is
/// queued: the attempts drop such copies (an attempt holds its delivery first).
pub struct BrokerAndLocal {
    pub broker: Arc<dyn EventPublisher>,
    pub local: Arc<dyn EventPublisher>,
}

#[async_trait]
impl EventPublisher for BrokerAndLocal {
    async fn publish(&self, events: &[DomainEvent]) -> Result<(), DomainError> {
        let (broker, local) = tokio::join!(self.broker.publish(events), self.local.publish(events));
        broker.and(local)
    }
}
