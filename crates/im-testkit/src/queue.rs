//! The contract of the [`DeliveryQueue`] port: scheduling, taking due jobs under a lease,
//! delayed retries, redelivery after a crash, and duplicate schedules.
//!
//! A queue hands out any job that is due, whoever scheduled it, so checks cannot share one:
//! each check asks the [`QueueBackend`] for a queue of its own, and for one or more consumers of
//! it (each consumer stands for one instance of the service, with its own connection).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::webhooks::ports::{DeliveryJob, DeliveryQueue};
use time::OffsetDateTime;

use crate::fresh_tenant;

/// A delivery queue adapter under test.
#[async_trait]
pub trait QueueBackend: Send + Sync {
    /// Creates a new, empty queue that no other check uses, and returns its name.
    async fn fresh(&self) -> String;

    /// A consumer of the queue `name`, as one instance of the service holds it (its own
    /// connection, where the adapter has one). Dropping it without completing its jobs is a crash.
    async fn consumer(&self, name: &str) -> Arc<dyn DeliveryQueue>;
}

/// A long lease: no check outlives it.
const HELD: Duration = Duration::from_secs(60);
/// How long a check waits for something it expects to happen.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a check watches for something that must not happen.
const WATCH: Duration = Duration::from_millis(1_500);

/// A job for a delivery no other check has.
pub fn fresh_job() -> DeliveryJob {
    DeliveryJob { tenant_id: fresh_tenant(), delivery_id: uuid::Uuid::new_v4() }
}

fn ago(d: Duration) -> OffsetDateTime {
    OffsetDateTime::now_utc() - d
}

fn ids(jobs: &[DeliveryJob]) -> Vec<uuid::Uuid> {
    jobs.iter().map(|j| j.delivery_id).collect()
}

async fn take(queue: &dyn DeliveryQueue, max: u32, lease: Duration) -> Vec<DeliveryJob> {
    queue.take_due(max, lease).await.unwrap_or_else(|e| panic!("take_due MUST succeed on a reachable queue: {e}"))
}

async fn schedule(queue: &dyn DeliveryQueue, job: &DeliveryJob, due: OffsetDateTime) {
    queue.schedule(job, due).await.unwrap_or_else(|e| panic!("schedule MUST succeed on a reachable queue: {e}"));
}

async fn complete(queue: &dyn DeliveryQueue, job: &DeliveryJob) {
    queue.complete(job).await.unwrap_or_else(|e| panic!("complete MUST succeed on a reachable queue: {e}"));
}

/// Takes from `queue` until `job` is handed out or `wait` passes; returns every job handed out.
async fn take_until(queue: &dyn DeliveryQueue, job: &DeliveryJob, lease: Duration, wait: Duration) -> Vec<DeliveryJob> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = Vec::new();
    loop {
        got.extend(take(queue, 10, lease).await);
        if got.contains(job) || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long to watch so that the watch ends a little before `due`, however slow the machine.
fn shortly_before(due: OffsetDateTime) -> Duration {
    (due - OffsetDateTime::now_utc() - time::Duration::milliseconds(300)).try_into().unwrap_or(Duration::ZERO)
}

/// Takes from every consumer for `wait`; returns every job handed out (never completing any).
async fn watch(consumers: &[&dyn DeliveryQueue], wait: Duration) -> Vec<DeliveryJob> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = Vec::new();
    while tokio::time::Instant::now() < deadline {
        for consumer in consumers {
            got.extend(take(*consumer, 10, HELD).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

/// Runs every check of the delivery queue contract.
/// Queues keep due times to the millisecond: a job due at `t` may be handed out within the
/// millisecond of `t`.
const DUE_PRECISION: time::Duration = time::Duration::milliseconds(1);

pub async fn contract(backend: &dyn QueueBackend) {
    schedule_take_complete(backend).await;
    jobs_scheduled_together_are_each_due_at_their_time(backend).await;
    a_taken_job_is_not_handed_out_again_while_leased(backend).await;
    a_delayed_job_is_due_at_its_time_not_before(backend).await;
    a_crashed_consumers_job_comes_back(backend).await;
    jobs_scheduled_together_are_taken_and_completed_one_by_one(backend).await;
}

/// Due jobs are handed out (at most `max` per call), each once; a completed job is gone.
pub async fn schedule_take_complete(backend: &dyn QueueBackend) {
    let name = backend.fresh().await;
    let queue = backend.consumer(&name).await;
    let jobs = [fresh_job(), fresh_job(), fresh_job()];
    for job in &jobs {
        schedule(queue.as_ref(), job, ago(Duration::from_secs(1))).await;
    }

    let first = take(queue.as_ref(), 2, HELD).await;
    assert!(first.len() <= 2, "take_due MUST hand out at most `max` jobs: {:?}", ids(&first));
    let mut taken = first;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while taken.len() < jobs.len() && tokio::time::Instant::now() < deadline {
        taken.extend(take(queue.as_ref(), 10, HELD).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected: BTreeSet<_> = ids(&jobs).into_iter().collect();
    assert_eq!(taken.len(), jobs.len(), "every due job MUST be handed out exactly once: {:?}", ids(&taken));
    assert_eq!(ids(&taken).into_iter().collect::<BTreeSet<_>>(), expected, "the jobs handed out MUST be the ones scheduled");
    for job in &jobs {
        assert!(taken.contains(job), "a job MUST come back with its tenant: {job:?} in {taken:?}");
    }

    for job in &jobs {
        complete(queue.as_ref(), job).await;
    }
    // A job completed twice, or never scheduled, is no error.
    complete(queue.as_ref(), &jobs[0]).await;
    complete(queue.as_ref(), &fresh_job()).await;
    let after = watch(&[queue.as_ref()], WATCH).await;
    assert!(after.is_empty(), "a completed job MUST NOT be handed out again: {:?}", ids(&after));

    let other = backend.consumer(&name).await;
    let elsewhere = watch(&[other.as_ref()], Duration::from_millis(300)).await;
    assert!(elsewhere.is_empty(), "a completed job is gone for every consumer: {:?}", ids(&elsewhere));
}

/// `schedule_each` schedules every job at its own time: the due ones are handed out, each
/// once; a later one not before its time.
pub async fn jobs_scheduled_together_are_each_due_at_their_time(backend: &dyn QueueBackend) {
    let name = backend.fresh().await;
    let queue = backend.consumer(&name).await;
    let now = [fresh_job(), fresh_job(), fresh_job()];
    let later = fresh_job();
    let due_later = OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let mut jobs: Vec<_> = now.iter().map(|j| (j.clone(), ago(Duration::from_secs(1)))).collect();
    jobs.push((later.clone(), due_later));
    queue.schedule_each(&jobs).await.unwrap_or_else(|e| panic!("schedule_each MUST succeed on a reachable queue: {e}"));

    let early = watch(&[queue.as_ref()], shortly_before(due_later)).await;
    assert!(!early.contains(&later), "a job MUST NOT be handed out before its due time: {:?}", ids(&early));
    let expected: BTreeSet<_> = ids(&now).into_iter().collect();
    assert_eq!(early.len(), now.len(), "every due job MUST be handed out exactly once: {:?}", ids(&early));
    assert_eq!(ids(&early).into_iter().collect::<BTreeSet<_>>(), expected, "the jobs handed out MUST be the ones scheduled");
    let got = take_until(queue.as_ref(), &later, HELD, PATIENCE).await;
    assert!(got.contains(&later), "a job scheduled later MUST be handed out once due: {:?}", ids(&got));
    for job in now.iter().chain([&later]) {
        complete(queue.as_ref(), job).await;
    }
}

/// While a job is leased, neither its holder nor another consumer gets it again.
pub async fn a_taken_job_is_not_handed_out_again_while_leased(backend: &dyn QueueBackend) {
    let name = backend.fresh().await;
    let holder = backend.consumer(&name).await;
    let other = backend.consumer(&name).await;
    let job = fresh_job();
    schedule(holder.as_ref(), &job, ago(Duration::ZERO)).await;

    let taken = take_until(holder.as_ref(), &job, HELD, PATIENCE).await;
    assert_eq!(ids(&taken), vec![job.delivery_id], "the due job MUST be handed out once");
    let again = watch(&[holder.as_ref(), other.as_ref()], WATCH).await;
    assert!(again.is_empty(), "a leased job MUST NOT be handed out again while its lease runs: {:?}", ids(&again));

    complete(holder.as_ref(), &job).await;
    let after = watch(&[holder.as_ref(), other.as_ref()], Duration::from_millis(500)).await;
    assert!(after.is_empty(), "a completed job MUST NOT come back: {:?}", ids(&after));
}

/// A job scheduled for later (a first attempt, or a retry rescheduled by the worker that holds
/// the job) is not handed out before its time, and is handed out once it has come.
pub async fn a_delayed_job_is_due_at_its_time_not_before(backend: &dyn QueueBackend) {
    let name = backend.fresh().await;
    let queue = backend.consumer(&name).await;
    let other = backend.consumer(&name).await;

    // A first attempt due later.
    let later = fresh_job();
    let due = OffsetDateTime::now_utc() + time::Duration::milliseconds(1_500);
    schedule(queue.as_ref(), &later, due).await;
    if let Some(next) = queue.next_due().await.expect("next_due MUST succeed on a reachable queue") {
        assert!(next <= due, "next_due MUST NOT be later than the earliest job's due time: {next} > {due}");
    }
    let early = watch(&[queue.as_ref(), other.as_ref()], shortly_before(due)).await;
    assert!(early.is_empty(), "a job MUST NOT be handed out before its due time: {:?}", ids(&early));
    let taken = take_until(queue.as_ref(), &later, HELD, PATIENCE).await;
    assert!(OffsetDateTime::now_utc() + DUE_PRECISION >= due, "handed out at {} before it was due at {due}", OffsetDateTime::now_utc());
    assert_eq!(ids(&taken), vec![later.delivery_id], "a due job MUST be handed out once its time has come");

    // The worker holding it records a failed attempt and reschedules the retry.
    let retry_at = OffsetDateTime::now_utc() + time::Duration::milliseconds(1_200);
    schedule(queue.as_ref(), &later, retry_at).await;
    let early = watch(&[queue.as_ref(), other.as_ref()], shortly_before(retry_at)).await;
    assert!(early.is_empty(), "a rescheduled retry MUST NOT be handed out before its time: {:?}", ids(&early));
    let retried = take_until(other.as_ref(), &later, HELD, PATIENCE).await;
    assert!(OffsetDateTime::now_utc() + DUE_PRECISION >= retry_at, "the retry was handed out before it was due");
    assert_eq!(ids(&retried), vec![later.delivery_id], "a rescheduled retry MUST be handed out once, when due");
    complete(other.as_ref(), &later).await;
    let after = watch(&[queue.as_ref(), other.as_ref()], Duration::from_millis(500)).await;
    assert!(after.is_empty(), "a completed retry MUST NOT come back: {:?}", ids(&after));
}

/// A job whose consumer died without completing it comes back (at the latest when its lease
/// ends), so no scheduled attempt is lost by a crash.
pub async fn a_crashed_consumers_job_comes_back(backend: &dyn QueueBackend) {
    let name = backend.fresh().await;
    let lease = Duration::from_secs(1);
    let job = fresh_job();
    {
        let doomed = backend.consumer(&name).await;
        schedule(doomed.as_ref(), &job, ago(Duration::ZERO)).await;
        let taken = take_until(doomed.as_ref(), &job, lease, PATIENCE).await;
        assert_eq!(ids(&taken), vec![job.delivery_id], "the due job MUST be handed out");
        // The consumer dies here, without completing the job.
    }
    let survivor = backend.consumer(&name).await;
    let back = take_until(survivor.as_ref(), &job, HELD, lease + PATIENCE).await;
    assert_eq!(ids(&back), vec![job.delivery_id], "the job of a crashed consumer MUST come back, once");
    complete(survivor.as_ref(), &job).await;
    let after = watch(&[survivor.as_ref()], Duration::from_millis(500)).await;
    assert!(after.is_empty(), "a completed job MUST NOT come back: {:?}", ids(&after));
}

/// For a queue that keeps one job per delivery (SQLite): the same pending job scheduled twice is
/// held by one consumer at a time. A broker MAY hand out a copy; the delivery service drops it.
pub async fn a_duplicate_schedule_never_yields_two_concurrent_attempts(backend: &dyn QueueBackend) {
    let name = backend.fresh().await;
    let first = backend.consumer(&name).await;
    let second = backend.consumer(&name).await;
    let job = fresh_job();
    let now = ago(Duration::ZERO);
    schedule(first.as_ref(), &job, now).await;
    schedule(second.as_ref(), &job, now).await;

    // One job at a time, as a worker with one free slot takes them.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut held = Vec::new();
    while !held.contains(&job) && tokio::time::Instant::now() < deadline {
        held.extend(take(first.as_ref(), 1, HELD).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids(&held), vec![job.delivery_id], "the job MUST be handed out");
    held.extend(watch(&[second.as_ref(), first.as_ref()], WATCH).await);
    let copies = held.iter().filter(|j| **j == job).count();
    assert_eq!(copies, 1, "a job scheduled twice while pending MUST be held by one consumer at a time, got {copies} copies");
}

/// Jobs scheduled together (a fan-out's first attempts) are handed out at most `max` per take
/// and completed one by one: a completed one never comes back while the others are held; when
/// their consumer dies with some of them not completed, those come back (a broker MAY also hand
/// out again the completed ones that travelled with them; the delivery service drops those).
pub async fn jobs_scheduled_together_are_taken_and_completed_one_by_one(backend: &dyn QueueBackend) {
    let name = backend.fresh().await;
    let jobs: Vec<_> = (0..5).map(|_| fresh_job()).collect();
    let due: Vec<_> = jobs.iter().map(|j| (j.clone(), ago(Duration::from_secs(1)))).collect();
    // Long enough for the takes and the watch below on a loaded machine: a job whose lease ran
    // out would be handed out again, rightly.
    let lease = Duration::from_secs(4);
    {
        let doomed = backend.consumer(&name).await;
        doomed.schedule_each(&due).await.unwrap_or_else(|e| panic!("schedule_each MUST succeed on a reachable queue: {e}"));
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut taken = Vec::new();
        while taken.len() < jobs.len() && tokio::time::Instant::now() < deadline {
            let one = take(doomed.as_ref(), 1, lease).await;
            assert!(one.len() <= 1, "take_due MUST hand out at most `max` jobs: {:?}", ids(&one));
            taken.extend(one);
        }
        assert_eq!(
            ids(&taken).into_iter().collect::<BTreeSet<_>>(),
            ids(&jobs).into_iter().collect::<BTreeSet<_>>(),
            "every job scheduled together MUST be handed out, once"
        );
        assert_eq!(taken.len(), jobs.len(), "every job scheduled together MUST be handed out once: {:?}", ids(&taken));
        complete(doomed.as_ref(), &jobs[0]).await;
        complete(doomed.as_ref(), &jobs[1]).await;
        let again = watch(&[doomed.as_ref()], Duration::from_millis(500)).await;
        assert!(again.is_empty(), "jobs completed or held MUST NOT be handed out again: {:?}", ids(&again));
        // The consumer dies here with three of them held.
    }
    let survivor = backend.consumer(&name).await;
    let deadline = tokio::time::Instant::now() + lease + PATIENCE;
    let mut back = Vec::new();
    while !jobs[2..].iter().all(|j| back.contains(j)) && tokio::time::Instant::now() < deadline {
        back.extend(take(survivor.as_ref(), 10, HELD).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for job in &jobs[2..] {
        assert!(back.contains(job), "a job its crashed consumer did not complete MUST come back: {job:?} in {:?}", ids(&back));
    }
    for job in &back {
        complete(survivor.as_ref(), job).await;
    }
    let after = watch(&[survivor.as_ref()], Duration::from_millis(500)).await;
    assert!(after.is_empty(), "completed jobs MUST NOT come back: {:?}", ids(&after));
}
