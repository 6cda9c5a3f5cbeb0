//! Driving the outbox relay: publish as soon as a write records events, retry with backoff
//! while the publisher is unavailable, and report how far behind the outbox is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use im_domain::connection::{Connection, ConnectionId, ConnectionRepository};
use im_domain::events::DomainEvent;
use im_domain::integration::{Integration, IntegrationFilter};
use im_domain::ports::{DependencyHealth, HealthCheck, IntegrationRepository, Outbox};
use im_domain::retry::Backoff;
use im_domain::services::{ClaimedNotPublished, EventRelay, Relayed};
use im_domain::{DomainError, ETag, IntegrationId, JsonText, Page, PageRequest, Stored, TenantId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest wait between two relay attempts while the publisher is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Poll interval when nothing wakes the relay (events written by another process, retries).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Runs the relay until `shutdown`; a round in progress finishes (events it could not publish
/// stay in the outbox for the next start). `wake` is notified after every commit that
/// recorded events.
///
/// With `lanes` above one, rounds overlap at light load: the relay's first lane works as a lone
/// relay does (a round, then at once another while rounds come full, else a wait for a wake-up),
/// and each other lane ([`EventRelay::lane`]: a relay of its own name, whose rounds claim other
/// events) takes a round when woken while the first is busy, so the events written while a
/// round waits for its publish (a broker's confirms, of its events and the fan-out's jobs) do not wait
/// for it. Under a heavier load (a round claimed more than [`OVERLAP_UP_TO`] events) the other
/// lanes hand their wake-ups to the first one instead: larger rounds one after another publish
/// more events for each write and each confirm than overlapping ones. Events of one process may
/// then be published in another order than they were written, as with several instances.
pub fn spawn_relay(relay: &EventRelay, lanes: u32, wake: &Arc<Notify>, batch: u32, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let shared = Arc::new(Lanes { wake: wake.clone(), to_first: Notify::new(), backlog: AtomicBool::new(false) });
    for lane in 0..lanes.max(1) {
        let (relay, shared, shutdown) = (relay.lane(), shared.clone(), shutdown.clone());
        tasks.spawn(im_store_embedded::as_worker(async move {
            if lane == 0 {
                first_lane(&relay, &shared, batch, &shutdown).await;
            } else {
                other_lane(&relay, &shared, batch, &shutdown).await;
            }
        }));
    }
}

/// How long the store hands no events over after a round of them failed to publish: they and
/// the ones written meanwhile go the relay's usual way, which backs off while the publisher is
/// down.
const HANDOFF_PAUSE: Duration = Duration::from_secs(5);

/// Events handed over with less of their claim left than this are not published by the lane
/// (a publish that took the rest of the claim could meet another relay's of the same events):
/// they are released to the usual rounds, and the store hands nothing over for
/// [`HANDOFF_PAUSE`]. Only a lane that falls far behind meets such events.
const HANDED_MIN_CLAIM_LEFT: Duration = Duration::from_secs(im_domain::services::CLAIM_LEASE.as_secs() / 3);

/// Runs until `shutdown` the relay's rounds of the events the embedded store hands over claimed
/// at commit ([`im_store_embedded::OutboxHandoff`]): each round publishes what arrived since
/// the one before (up to `batch` events) and marks it, with no claim; up to `rounds` of them
/// are under way at once. A round that fails releases its events to the relay's usual rounds
/// (woken by `wake`), and the store hands nothing over for [`HANDOFF_PAUSE`]. At the stop no
/// round begins and the store hands nothing more over; once `settled` (a write queued after
/// the pause) is answered, every group that could still hand events over has ended, and what
/// was handed over and not yet taken is released (any relay takes it at once). Those of a
/// process that died are taken once their claim ends.
#[allow(clippy::too_many_arguments)]
pub fn spawn_handoff(
    relay: EventRelay,
    handoff: Arc<im_store_embedded::OutboxHandoff>,
    mut handed: tokio::sync::mpsc::UnboundedReceiver<Vec<im_store_embedded::HandedEvent>>,
    settled: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    rounds: u32,
    batch: u32,
    wake: Arc<Notify>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    let (shutdown, round_tasks) = (shutdown.clone(), tasks.clone());
    tasks.spawn(im_store_embedded::as_worker(async move {
        let relay = Arc::new(relay);
        let permits = Arc::new(tokio::sync::Semaphore::new(rounds.max(1) as usize));
        // Handed over, not taken by a round: released at the stop.
        let mut not_taken: Vec<uuid::Uuid> = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                got = handed.recv() => match got {
                    Some(events) => events,
                    None => break,
                },
            };
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    not_taken.extend(first.into_iter().map(|event| event.id));
                    break;
                }
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            // What arrived while the rounds under way held every permit goes in this one.
            let mut events = first;
            while events.len() < batch as usize {
                match handed.try_recv() {
                    Ok(more) => events.extend(more),
                    Err(_) => break,
                }
            }
            let (relay, handoff, wake, round_shutdown) = (relay.clone(), handoff.clone(), wake.clone(), shutdown.clone());
            round_tasks.spawn(im_store_embedded::as_worker(async move {
                let count = events.len();
                let Handed { events, left, late } = sort_handed(events, HANDED_MIN_CLAIM_LEFT);
                if late {
                    // Far behind: the usual rounds, in large batches, take what is written next.
                    handoff.pause_for(HANDOFF_PAUSE);
                    tracing::info!(count = left.len(), "the handoff lane fell behind; events go the relay's usual way for a while");
                }
                let published = if events.is_empty() { Ok(()) } else { relay.publish_claimed(&events).await };
                match &published {
                    Ok(()) => {}
                    Err(ClaimedNotPublished::Refused(error)) => {
                        handoff.pause_for(HANDOFF_PAUSE);
                        tracing::warn!(%error, count = events.len(), "publishing events handed over at commit failed; the relay's next rounds take them");
                    }
                    Err(ClaimedNotPublished::NotReleased { refused, release }) => {
                        handoff.pause_for(HANDOFF_PAUSE);
                        let ids: Vec<_> = events.iter().map(|event| event.id).collect();
                        match again(&round_shutdown, || relay.outbox().release(relay.owner(), &ids)).await {
                            Ok(()) => tracing::warn!(
                                error = %refused,
                                %release,
                                count = ids.len(),
                                "publishing events handed over at commit failed; released at a later try, the relay's next rounds take them"
                            ),
                            Err(release) => tracing::warn!(
                                error = %refused,
                                %release,
                                count = ids.len(),
                                "publishing events handed over at commit failed, and releasing them too; they are taken once their claim ends"
                            ),
                        }
                    }
                    Err(ClaimedNotPublished::NotMarked(error)) => {
                        let ids: Vec<_> = events.iter().map(|event| event.id).collect();
                        match mark_again(relay.outbox().as_ref(), &ids, &round_shutdown).await {
                            Ok(()) => tracing::info!(%error, count = ids.len(), "events handed over at commit were marked published at a later try"),
                            Err(error) => tracing::warn!(
                                %error,
                                count = ids.len(),
                                "events handed over at commit were published but not marked; they are published again once their claim ends"
                            ),
                        }
                    }
                }
                // Not expected: the usual rounds count an unreadable entry toward a dead letter,
                // as any they cannot read, and publish those this lane came to too late.
                if !left.is_empty()
                    && let Err(error) = release_again(relay.as_ref(), &left, &round_shutdown).await
                {
                    tracing::warn!(%error, count = left.len(), "releasing events handed over failed; they are taken once their claim ends");
                }
                if matches!(published, Err(ClaimedNotPublished::Refused(_) | ClaimedNotPublished::NotReleased { .. })) || !left.is_empty() {
                    wake.notify_one();
                }
                handoff.done(count);
                drop(permit);
            }));
        }
        // Nothing more is handed over; once the groups under way ended, what was and is not
        // taken goes back to the outbox.
        handoff.pause_for(Duration::from_secs(u64::from(u32::MAX)));
        settled.await;
        handed.close();
        while let Ok(events) = handed.try_recv() {
            not_taken.extend(events.into_iter().map(|event| event.id));
        }
        if let Err(error) = relay.outbox().release(relay.owner(), &not_taken).await {
            tracing::warn!(%error, count = not_taken.len(), "releasing the events handed over at the stop failed; they are taken once their claim ends");
        }
    }));
}

/// The waits before each new try to mark published the events a lane published, or to release
/// those it did not, when that failed (the store was busy or away). All of them end well within
/// [`HANDED_MIN_CLAIM_LEFT`], so the events are still held by the lane while it tries.
const MARK_RETRIES: [Duration; 3] = [Duration::from_millis(50), Duration::from_millis(250), Duration::from_secs(1)];

/// Tries again to mark published events a lane published and could not mark. A mark that fails
/// for good leaves them held, and they are published again once their claim ends (at least once).
///
/// # Errors
/// The last try's.
async fn mark_again(outbox: &dyn Outbox, ids: &[uuid::Uuid], shutdown: &CancellationToken) -> Result<(), DomainError> {
    again(shutdown, || outbox.mark_published(ids)).await
}

/// Releases events the lane holds and will not publish, trying again when that fails. A release
/// that fails for good leaves them held until their claim ends; then any relay takes them.
///
/// # Errors
/// The last try's.
async fn release_again(relay: &EventRelay, ids: &[uuid::Uuid], shutdown: &CancellationToken) -> Result<(), DomainError> {
    let first = relay.outbox().release(relay.owner(), ids).await;
    if first.is_ok() {
        return first;
    }
    again(shutdown, || relay.outbox().release(relay.owner(), ids)).await
}

/// Runs `write` after each wait of [`MARK_RETRIES`] until it succeeds; the stop ends a wait at
/// once, for a last try.
///
/// # Errors
/// The last try's.
async fn again<F>(shutdown: &CancellationToken, mut write: impl FnMut() -> F) -> Result<(), DomainError>
where
    F: Future<Output = Result<(), DomainError>>,
{
    let mut tried = Ok(());
    for wait in MARK_RETRIES {
        let stopping = tokio::select! {
            biased;
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(wait) => false,
        };
        tried = write().await;
        if tried.is_ok() || stopping {
            break;
        }
    }
    tried
}

/// The events handed over that a lane publishes, and those it leaves to the usual rounds.
#[derive(Debug, Default, PartialEq)]
struct Handed {
    /// Decoded, with at least the minimum of their claim left.
    events: Vec<DomainEvent>,
    /// Unreadable, or with too little of their claim left.
    left: Vec<uuid::Uuid>,
    /// Some had too little of their claim left.
    late: bool,
}

/// Decodes the events handed over with at least `min_claim_left` of their claim left; the ids of
/// the others.
fn sort_handed(handed: Vec<im_store_embedded::HandedEvent>, min_claim_left: Duration) -> Handed {
    let min_left_ms = i64::try_from(min_claim_left.as_millis()).unwrap_or(i64::MAX);
    let mut sorted = Handed { events: Vec::with_capacity(handed.len()), left: Vec::new(), late: false };
    for event in handed {
        if event.claim_left_ms() < min_left_ms {
            sorted.left.push(event.id);
            sorted.late = true;
            continue;
        }
        match serde_json::from_str::<DomainEvent>(&event.body) {
            Ok(decoded) => sorted.events.push(decoded),
            Err(_) => sorted.left.push(event.id),
        }
    }
    sorted
}

/// What the relay's lanes share.
struct Lanes {
    /// Notified after every commit that recorded events.
    wake: Arc<Notify>,
    /// Wakes the first lane for a round another lane left to it.
    to_first: Notify,
    /// A round came full or large ([`heavy`]): until the first lane's next round that does
    /// not, the other lanes take no rounds.
    backlog: AtomicBool,
}

/// Reports failed rounds and recoveries; how long to wait after a failure.
struct Failures {
    backoff: Backoff,
    failures: u32,
    failing_since: Option<std::time::Instant>,
}

impl Failures {
    fn new() -> Self {
        Self {
            backoff: Backoff { attempts: u32::MAX, first: Duration::from_millis(100), max: MAX_BACKOFF },
            failures: 0,
            failing_since: None,
        }
    }

    fn succeeded(&mut self, round: &Relayed) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(after_secs = since.elapsed().as_secs(), "event publishing recovered");
        }
        self.failures = 0;
        for id in &round.dead_letters {
            tracing::warn!(event_id = %id, "an outbox event failed too often and is now a dead letter; it blocks nothing");
        }
    }

    /// Logs the failure; the wait before the next round.
    async fn failed(&mut self, relay: &EventRelay, error: &DomainError) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = self.backoff.delay(self.failures);
        let since = *self.failing_since.get_or_insert_with(std::time::Instant::now);
        let stats = relay.outbox().stats().await.ok();
        tracing::warn!(
            %error,
            pending = stats.map(|s| s.pending),
            failing_for_secs = since.elapsed().as_secs(),
            retry_in_ms = wait.as_millis() as u64,
            "publishing events failed; they stay in the outbox"
        );
        wait
    }
}

/// Whether `round` may have left events behind: it came full, all of it published.
fn came_full(round: &Relayed, batch: u32) -> bool {
    round.claimed as u32 == batch && round.published == round.claimed
}

/// Events a round may claim for the other lanes to go on taking rounds beside the first one:
/// more, and the load is such that rounds one at a time, each taking more, publish more events
/// for each write and each confirm (at saturation, overlapping rounds cost a sixth of the
/// deliveries a second); fewer, and the events written during a round are better off not
/// waiting for it.
const OVERLAP_UP_TO: usize = 32;

/// Whether the relay is under a load at which the other lanes leave the rounds to the first.
fn heavy(round: &Relayed, batch: u32) -> bool {
    round.claimed > OVERLAP_UP_TO || came_full(round, batch)
}

async fn first_lane(relay: &EventRelay, lanes: &Lanes, batch: u32, shutdown: &CancellationToken) {
    let mut failures = Failures::new();
    while !shutdown.is_cancelled() {
        match relay.relay_once(batch).await {
            Ok(round) => {
                failures.succeeded(&round);
                // A full round of published events: more may wait. A round with failures
                // waits for the next poll, so failed tries are spread out.
                lanes.backlog.store(heavy(&round, batch), Ordering::Release);
                if came_full(&round, batch) {
                    continue;
                }
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = lanes.wake.notified() => {}
                    () = lanes.to_first.notified() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
            Err(error) => {
                let wait = failures.failed(relay, &error).await;
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::debug!("outbox relay stopped");
}

async fn other_lane(relay: &EventRelay, lanes: &Lanes, batch: u32, shutdown: &CancellationToken) {
    let mut failures = Failures::new();
    // Set after a round that left events of its own claimed (it failed, or the publisher
    // refused some): the next round comes after this wait, woken or not, and takes them again
    // (a claim takes back its own relay's entries), as the first lane's would; otherwise they
    // would wait for their claim to end (`CLAIM_LEASE`).
    let mut again: Option<Duration> = None;
    loop {
        if let Some(wait) = again.take() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        } else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = lanes.wake.notified() => {}
            }
            if lanes.backlog.load(Ordering::Acquire) {
                // The first lane goes on with larger rounds; the wake-up is its (a round it
                // makes once more at worst), so that no event waits for the idle poll.
                lanes.to_first.notify_one();
                continue;
            }
        }
        match relay.relay_once(batch).await {
            Ok(round) => {
                failures.succeeded(&round);
                if heavy(&round, batch) {
                    lanes.backlog.store(true, Ordering::Release);
                }
                if came_full(&round, batch) {
                    lanes.to_first.notify_one();
                }
                // Failed tries are spread out as the first lane's are: at its idle poll.
                if round.published < round.claimed {
                    again = Some(IDLE_POLL);
                }
            }
            Err(error) => again = Some(failures.failed(relay, &error).await),
        }
    }
}

/// Readiness detail of the outbox: how many events wait and for how long, and how many are
/// dead letters (either makes readiness `degraded`, never unready: the outbox is not critical).
pub struct OutboxHealth {
    pub outbox: Arc<dyn Outbox>,
    pub max_age: Duration,
}

#[async_trait]
impl HealthCheck for OutboxHealth {
    fn describe(&self) -> (&'static str, bool) {
        ("outbox", true)
    }

    #[tracing::instrument(skip_all, name = "outbox.check")]
    async fn check(&self) -> DependencyHealth {
        match self.outbox.stats().await {
            Ok(stats) => {
                let age = stats.oldest.map(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0) as u64).unwrap_or(0);
                let lagging = age > self.max_age.as_secs();
                DependencyHealth {
                    name: "outbox".into(),
                    ready: !lagging && stats.dead_letters == 0,
                    critical: false,
                    detail: format!("{} event(s) pending, oldest {age} s, {} dead letter(s)", stats.pending, stats.dead_letters),
                    diagnostic: String::new(),
                }
            }
            Err(e) => DependencyHealth {
                name: "outbox".into(),
                ready: false,
                critical: true,
                detail: "not readable".to_owned(),
                diagnostic: e.to_string(),
            },
        }
    }
}

/// Wakes the relay after every write that recorded events, whatever the store, so events leave
/// at once instead of at the next poll.
pub struct WakeOnEvents<R: ?Sized> {
    pub inner: Arc<R>,
    pub wake: Arc<Notify>,
}

impl<R: ?Sized> WakeOnEvents<R> {
    fn woke<T>(&self, result: Result<T, DomainError>, events: &[DomainEvent]) -> Result<T, DomainError> {
        if result.is_ok() && !events.is_empty() {
            self.wake.notify_one();
        }
        result
    }
}

#[async_trait]
impl IntegrationRepository for WakeOnEvents<dyn IntegrationRepository> {
    async fn create(&self, integration: &Integration, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        self.woke(self.inner.create(integration, events).await, events)
    }

    fn checks_provider_in_write(&self) -> bool {
        self.inner.checks_provider_in_write()
    }

    async fn create_for_provider(
        &self,
        integration: &Integration,
        provider_version: &ETag,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        self.woke(self.inner.create_for_provider(integration, provider_version, events).await, events)
    }

    async fn create_encoded(
        &self,
        integration: &Integration,
        text: &JsonText<Integration>,
        provider_version: &Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        self.woke(self.inner.create_encoded(integration, text, provider_version, events).await, events)
    }

    async fn get(&self, tenant: &TenantId, id: IntegrationId) -> Result<Stored<Integration>, DomainError> {
        self.inner.get(tenant, id).await
    }

    async fn list(
        &self,
        tenant: &TenantId,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Integration>>, DomainError> {
        self.inner.list(tenant, filter, page).await
    }

    async fn get_json(&self, tenant: &TenantId, id: IntegrationId) -> Result<Stored<JsonText<Integration>>, DomainError> {
        self.inner.get_json(tenant, id).await
    }

    async fn list_json(
        &self,
        tenant: &TenantId,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<im_domain::TextPage<Integration>, DomainError> {
        self.inner.list_json(tenant, filter, page).await
    }

    async fn replace(&self, integration: &Integration, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        self.woke(self.inner.replace(integration, if_match, events).await, events)
    }

    async fn delete(
        &self,
        tenant: &TenantId,
        id: IntegrationId,
        if_match: Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<(), DomainError> {
        self.woke(self.inner.delete(tenant, id, if_match, events).await, events)
    }
}

#[async_trait]
impl ConnectionRepository for WakeOnEvents<dyn ConnectionRepository> {
    async fn create(&self, connection: &Connection, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        self.woke(self.inner.create(connection, events).await, events)
    }

    async fn get(&self, tenant: &TenantId, integration: IntegrationId, id: ConnectionId) -> Result<Stored<Connection>, DomainError> {
        self.inner.get(tenant, integration, id).await
    }

    async fn list(
        &self,
        tenant: &TenantId,
        integration: IntegrationId,
        page: &PageRequest,
    ) -> Result<Page<Stored<Connection>>, DomainError> {
        self.inner.list(tenant, integration, page).await
    }

    async fn replace(&self, connection: &Connection, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        self.woke(self.inner.replace(connection, if_match, events).await, events)
    }

    async fn delete(
        &self,
        tenant: &TenantId,
        integration: IntegrationId,
        id: ConnectionId,
        if_match: Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<(), DomainError> {
        self.woke(self.inner.delete(tenant, integration, id, if_match, events).await, events)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use im_domain::events::EventType;
    use im_domain::ports::EventPublisher;
    use im_store_embedded::EmbeddedStore;
    use im_testkit::integrations::integration;
    use im_testkit::outbox::event;

    use super::*;

    /// A publisher like a broker whose confirms take a while: a batch holding a held event
    /// waits until it is let go.
    #[derive(Default)]
    struct SlowPublisher {
        published: Mutex<HashSet<uuid::Uuid>>,
        held: Mutex<HashSet<uuid::Uuid>>,
        let_go: Notify,
        /// Refuses every batch it does not hold, as a broker that is away.
        down: AtomicBool,
    }

    impl SlowPublisher {
        fn has(&self, id: uuid::Uuid) -> bool {
            self.published.lock().unwrap().contains(&id)
        }

        fn let_go(&self) {
            self.held.lock().unwrap().clear();
            self.let_go.notify_waiters();
        }
    }

    #[async_trait]
    impl EventPublisher for SlowPublisher {
        async fn publish(&self, events: &[DomainEvent]) -> Result<(), DomainError> {
            loop {
                let waiting = self.let_go.notified();
                if !events.iter().any(|e| self.held.lock().unwrap().contains(&e.id)) {
                    break;
                }
                waiting.await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(DomainError::unavailable("the broker is away"));
            }
            self.published.lock().unwrap().extend(events.iter().map(|e| e.id));
            Ok(())
        }
    }

    struct Setup {
        store: EmbeddedStore,
        publisher: Arc<SlowPublisher>,
        wake: Arc<Notify>,
        /// Woken by the handoff lane only (`handing_over`).
        lane_wake: Arc<Notify>,
        /// How long the handoff's sink blocks the writer thread before it sends (`handing_over`).
        sink_delay_ms: Arc<std::sync::atomic::AtomicU64>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        _dir: tempfile::TempDir,
    }

    /// A fresh store and publisher; nothing running yet.
    async fn set_up() -> Setup {
        set_up_with(im_store_embedded::DbOptions::default()).await
    }

    /// [`set_up`], the store's database opened with `options`.
    async fn set_up_with(options: im_store_embedded::DbOptions) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with(dir.path(), Arc::new(im_domain::SystemClock), options).unwrap();
        store.migrate().await.unwrap();
        let publisher = Arc::new(SlowPublisher::default());
        let (wake, shutdown, tasks) = (Arc::new(Notify::new()), CancellationToken::new(), TaskTracker::new());
        let (lane_wake, sink_delay_ms) = (Arc::new(Notify::new()), Arc::default());
        Setup { store, publisher, wake, lane_wake, sink_delay_ms, shutdown, tasks, _dir: dir }
    }

    async fn relaying(lanes: u32) -> Setup {
        let setup = set_up().await;
        setup.relay(lanes);
        setup
    }

    impl Setup {
        /// Starts the relay's usual rounds, in `lanes` lanes.
        fn relay(&self, lanes: u32) {
            let relay = EventRelay::new(self.store.outbox(), self.publisher.clone());
            spawn_relay(&relay, lanes, &self.wake, 256, &self.shutdown, &self.tasks);
        }

        /// Commits `count` events (one create each, the last `held`) and wakes the relay.
        async fn write(&self, count: usize, held: bool) -> Vec<uuid::Uuid> {
            let tenant = im_testkit::fresh_tenant();
            let mut ids = Vec::new();
            for i in 0..count {
                let item = integration(&tenant, "github");
                let created = event(&tenant, EventType::IntegrationCreated, &item.id.to_string());
                if held && i + 1 == count {
                    self.publisher.held.lock().unwrap().insert(created.id);
                }
                ids.push(created.id);
                self.store.integrations().create(&item, std::slice::from_ref(&created)).await.unwrap();
            }
            self.wake.notify_one();
            ids
        }

        async fn published_within(&self, id: uuid::Uuid, wait: Duration) -> bool {
            let until = std::time::Instant::now() + wait;
            while std::time::Instant::now() < until {
                if self.publisher.has(id) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            self.publisher.has(id)
        }

        async fn stop(self) {
            let pending = async {
                while !self.store.outbox().pending(10).await.unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), pending).await.expect("every event published and marked");
            self.shutdown.cancel();
            self.tasks.close();
            self.tasks.wait().await;
        }
    }

    /// With two lanes, an event written while a round waits for its publish goes out in a
    /// round of its own; with one, it waits for that round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_light_load_a_second_lane_publishes_what_a_waiting_round_would_hold_up() {
        for lanes in [2, 1] {
            let setup = relaying(lanes).await;
            let slow = setup.write(1, true).await[0];
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!setup.publisher.has(slow), "held until let go");
            let next = setup.write(1, false).await[0];
            let overlapped = setup.published_within(next, Duration::from_millis(if lanes == 2 { 3000 } else { 300 })).await;
            assert_eq!(overlapped, lanes == 2, "{lanes} lane(s): the next event published while the first round waited");
            setup.publisher.let_go();
            for id in [slow, next] {
                assert!(setup.published_within(id, Duration::from_secs(3)).await);
            }
            setup.stop().await;
        }
    }

    /// A round of the other lane that failed is made again once the publisher is back, not
    /// left claimed until its claim ends (`CLAIM_LEASE`, 30 s), and not only on a wake-up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_round_of_another_lane_is_made_again() {
        let setup = relaying(2).await;
        let slow = setup.write(1, true).await[0];
        tokio::time::sleep(Duration::from_millis(100)).await;
        setup.publisher.down.store(true, Ordering::SeqCst);
        let next = setup.write(1, false).await[0];
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!setup.publisher.has(next), "refused while the broker is away");
        setup.publisher.down.store(false, Ordering::SeqCst);
        assert!(setup.published_within(next, Duration::from_secs(5)).await, "made again once the broker is back");
        setup.publisher.let_go();
        assert!(setup.published_within(slow, Duration::from_secs(3)).await);
        setup.stop().await;
    }

    /// After a large round (more than `OVERLAP_UP_TO` events), the other lanes leave the
    /// rounds to the first one: an event written while its round waits goes out after it,
    /// handed over (not left for the idle poll).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_load_the_rounds_are_left_to_the_first_lane() {
        let setup = set_up().await;
        // Written before the relay starts, so that the first lane's first round takes them all
        // (on a slow machine, the idle poll during the writes would split them into rounds
        // that are not large), and with the wake-up taken back (the other lane would take it,
        // and perhaps the burst with it, and the first lane's empty round would then tell the
        // load is light).
        let burst = setup.write(OVERLAP_UP_TO + 8, false).await;
        setup.wake.notified().await;
        setup.relay(2);
        for id in &burst {
            assert!(setup.published_within(*id, Duration::from_secs(3)).await);
        }
        // The round ends once its events are marked: until then the other lane would take
        // a wake-up as at light load.
        let marked = async {
            while !setup.store.outbox().pending(1).await.unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), marked).await.expect("the burst marked");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let slow = setup.write(1, true).await[0];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let next = setup.write(1, false).await[0];
        assert!(!setup.published_within(next, Duration::from_millis(300)).await, "no round beside the first lane's under load");
        setup.publisher.let_go();
        let started = std::time::Instant::now();
        for id in [slow, next] {
            assert!(setup.published_within(id, Duration::from_secs(3)).await);
        }
        assert!(started.elapsed() < IDLE_POLL / 2, "handed to the first lane, not left for its idle poll: {:?}", started.elapsed());
        setup.stop().await;
    }

    /// The relay's lane of the events the store hands over (batches of `batch`, one round at
    /// a time), its handoff claiming them for `lease`; no usual rounds.
    async fn handing_over(lease: Duration, batch: u32) -> Setup {
        handing_over_to(lease, batch, |outbox| outbox).await
    }

    /// [`handing_over`], the lane's outbox being the store's as `outbox` makes it.
    async fn handing_over_to(lease: Duration, batch: u32, outbox: impl FnOnce(Arc<dyn Outbox>) -> Arc<dyn Outbox>) -> Setup {
        handing_over_with(set_up().await, lease, batch, outbox)
    }

    /// [`handing_over_to`] on `setup`.
    fn handing_over_with(setup: Setup, lease: Duration, batch: u32, outbox: impl FnOnce(Arc<dyn Outbox>) -> Arc<dyn Outbox>) -> Setup {
        let (store, publisher) = (&setup.store, &setup.publisher);
        let lane = EventRelay::new(outbox(store.outbox()), publisher.clone());
        let (sink, handed) = tokio::sync::mpsc::unbounded_channel();
        let delay = setup.sink_delay_ms.clone();
        let handoff = Arc::new(im_store_embedded::OutboxHandoff::new(
            lane.owner(),
            lease,
            64,
            Box::new(move |events| {
                std::thread::sleep(Duration::from_millis(delay.load(Ordering::SeqCst)));
                let _ = sink.send(events);
            }),
        ));
        store.hand_off_events(handoff.clone());
        let barrier = store.clone();
        let settled = Box::pin(async move { barrier.writes_settled(Duration::from_secs(5)).await.unwrap() });
        spawn_handoff(lane, handoff, handed, settled, 1, batch, setup.lane_wake.clone(), &setup.shutdown, &setup.tasks);
        setup
    }

    /// Every event of `ids` any relay may claim, within `wait` (claimed then).
    async fn claimable_within(store: &EmbeddedStore, ids: &HashSet<uuid::Uuid>, wait: Duration) -> HashSet<uuid::Uuid> {
        let mut claimed = HashSet::new();
        let until = std::time::Instant::now() + wait;
        loop {
            claimed.extend(claimable_now(store).await);
            if ids.is_subset(&claimed) || std::time::Instant::now() >= until {
                return claimed;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn claimable_now(store: &EmbeddedStore) -> HashSet<uuid::Uuid> {
        let claimed = store.outbox().claim("another relay", 100, Duration::from_secs(60)).await.unwrap();
        claimed.events.iter().map(|e| e.id).collect()
    }

    /// The lane publishes what the store hands over; at the stop, what it was handed and had
    /// not taken is released at once (not left claimed until the claim ends).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lane_publishes_what_it_is_handed_and_the_stop_releases_the_rest() {
        let setup = handing_over(im_domain::services::CLAIM_LEASE, 1).await;
        let first = setup.write(1, false).await[0];
        assert!(setup.published_within(first, Duration::from_secs(3)).await, "published by the lane");

        // The lane's one round waits on a held event; the next event waits for the round to end
        // (taken off the channel), two more wait on the channel.
        let held = setup.write(1, true).await[0];
        let left: HashSet<_> = setup.write(3, false).await.into_iter().collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(claimable_now(&setup.store).await.is_empty(), "all of them claimed for the lane");
        setup.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        setup.publisher.let_go();
        setup.tasks.close();
        setup.tasks.wait().await;
        assert!(setup.publisher.has(held), "taken before the stop, published");
        assert!(left.iter().all(|id| !setup.publisher.has(*id)), "no round begins after the stop");
        assert_eq!(claimable_now(&setup.store).await, left, "released at the stop: any relay takes them at once");
    }

    /// At the stop, the lane waits for the group under way to hand its events over before it
    /// releases what it was not taken: an event committed as the lane stops is not left claimed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stop_waits_for_the_group_under_way_to_hand_its_events_over() {
        let setup = Arc::new(handing_over(im_domain::services::CLAIM_LEASE, 16).await);
        setup.sink_delay_ms.store(300, Ordering::SeqCst);
        let writing = tokio::spawn({
            let setup = setup.clone();
            async move { setup.write(1, false).await[0] }
        });
        // The group committed; the writer thread is in the sink, not yet sent.
        tokio::time::sleep(Duration::from_millis(100)).await;
        setup.shutdown.cancel();
        setup.tasks.close();
        setup.tasks.wait().await;
        let id = writing.await.unwrap();
        assert!(!setup.publisher.has(id), "handed over after the stop: not published");
        let ids = HashSet::from([id]);
        assert_eq!(claimable_within(&setup.store, &ids, Duration::ZERO).await, ids, "released at the stop, not left claimed");
    }

    /// Events handed over with too little of their claim left are not published by the lane
    /// (another relay could take them during the publish): they are released to the usual
    /// rounds, which are woken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lane_leaves_events_near_the_end_of_their_claim_to_the_usual_rounds() {
        let setup = handing_over(HANDED_MIN_CLAIM_LEFT / 2, 16).await;
        let woken = setup.lane_wake.notified();
        let ids: HashSet<_> = setup.write(3, false).await.into_iter().collect();
        tokio::time::timeout(Duration::from_secs(3), woken).await.expect("the usual rounds woken");
        assert_eq!(claimable_within(&setup.store, &ids, Duration::from_secs(3)).await, ids, "released (or, paused, written unclaimed)");
        assert!(ids.iter().all(|id| !setup.publisher.has(*id)), "not published by the lane");
        setup.shutdown.cancel();
        setup.tasks.close();
        setup.tasks.wait().await;
    }

    /// When requests have filled the store's write queue, the lane's writes still get in: events
    /// whose publish was refused are released at once (any relay takes them), not left held
    /// until their claim ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_queue_full_of_requests_does_not_keep_the_lane_from_releasing() {
        const QUEUE: usize = 4;
        let options = im_store_embedded::DbOptions { write_queue: QUEUE, ..im_store_embedded::DbOptions::default() };
        let setup = handing_over_with(set_up_with(options).await, im_domain::services::CLAIM_LEASE, 16, |outbox| outbox);
        setup.publisher.down.store(true, Ordering::SeqCst);
        let refused = setup.write(1, true).await[0];
        // The writer thread is held in the handoff's sink after the next commit while requests
        // fill the queue, for longer than the lane's tries of a release take.
        let held_for = MARK_RETRIES.iter().sum::<Duration>() + Duration::from_millis(700);
        setup.sink_delay_ms.store(held_for.as_millis() as u64, Ordering::SeqCst);
        let holding = tokio::spawn({
            let store = setup.store.clone();
            let tenant = im_testkit::fresh_tenant();
            let item = integration(&tenant, "github");
            let created = event(&tenant, EventType::IntegrationCreated, &item.id.to_string());
            async move { store.integrations().create(&item, &[created]).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        setup.sink_delay_ms.store(0, Ordering::SeqCst);
        let tenant = im_testkit::fresh_tenant();
        let requests: Vec<_> = (0..QUEUE)
            .map(|_| {
                let (store, item) = (setup.store.clone(), integration(&tenant, "github"));
                tokio::spawn(async move { store.integrations().create(&item, &[]).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let full = setup.store.integrations().create(&integration(&tenant, "github"), &[]).await;
        assert!(matches!(full, Err(DomainError::Unavailable { .. })), "the queue is full of requests: {full:?}");
        // The lane's publish is refused now, and it releases the event while the queue is full.
        setup.publisher.let_go();
        holding.await.unwrap().unwrap();
        for request in requests {
            request.await.unwrap().unwrap();
        }
        let ids = HashSet::from([refused]);
        // The event written while the writer was held goes the same way, or is written unclaimed
        // (the handoff paused): either way any relay may take it too.
        let claimable = claimable_within(&setup.store, &ids, Duration::from_secs(2)).await;
        assert!(ids.is_subset(&claimable), "released, not held until its claim ends: {claimable:?}");
        assert!(!setup.publisher.has(refused));
        setup.shutdown.cancel();
        setup.tasks.close();
        setup.tasks.wait().await;
    }

    /// An outbox whose first `failing` marks and first `failing_releases` releases fail, as a
    /// store too busy to take them.
    struct FailingMarks {
        outbox: Arc<dyn Outbox>,
        failing: std::sync::atomic::AtomicU32,
        failing_releases: std::sync::atomic::AtomicU32,
    }

    fn fails_first(failing: &std::sync::atomic::AtomicU32) -> bool {
        failing.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1)).is_ok()
    }

    #[async_trait]
    impl Outbox for FailingMarks {
        async fn pending(&self, limit: u32) -> Result<Vec<DomainEvent>, DomainError> {
            self.outbox.pending(limit).await
        }
        async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<im_domain::events::Claimed, DomainError> {
            self.outbox.claim(owner, limit, lease).await
        }
        async fn mark_published(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
            if fails_first(&self.failing) {
                return Err(DomainError::unavailable("the store is busy"));
            }
            self.outbox.mark_published(ids).await
        }
        async fn release(&self, owner: &str, ids: &[uuid::Uuid]) -> Result<(), DomainError> {
            if fails_first(&self.failing_releases) {
                return Err(DomainError::unavailable("the store is busy"));
            }
            self.outbox.release(owner, ids).await
        }
        async fn record_failure(&self, id: uuid::Uuid, reason: &str, max_attempts: u32) -> Result<bool, DomainError> {
            self.outbox.record_failure(id, reason, max_attempts).await
        }
        async fn dead_letters(&self, page: &PageRequest) -> Result<Page<im_domain::events::DeadLetter>, DomainError> {
            self.outbox.dead_letters(page).await
        }
        async fn requeue(&self, id: uuid::Uuid) -> Result<(), DomainError> {
            self.outbox.requeue(id).await
        }
        async fn stats(&self) -> Result<im_domain::events::OutboxStats, DomainError> {
            self.outbox.stats().await
        }
    }

    /// Events the lane published and could not mark are marked at a later try, not left held
    /// until their claim ends (then published again); a mark failing at every try leaves them
    /// held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lane_tries_again_to_mark_what_it_published() {
        for failing in [2, MARK_RETRIES.len() as u32 + 1] {
            let setup = handing_over_to(im_domain::services::CLAIM_LEASE, 16, |outbox| {
                Arc::new(FailingMarks { outbox, failing: failing.into(), failing_releases: 0.into() })
            })
            .await;
            let id = setup.write(1, false).await[0];
            assert!(setup.published_within(id, Duration::from_secs(3)).await, "published by the lane");
            let tries: Duration = MARK_RETRIES.iter().sum();
            tokio::time::sleep(tries + Duration::from_millis(500)).await;
            let pending = setup.store.outbox().pending(10).await.unwrap();
            let marked = pending.iter().all(|event| event.id != id);
            assert_eq!(marked, failing <= MARK_RETRIES.len() as u32, "{failing} failed marks");
            assert!(claimable_now(&setup.store).await.is_empty(), "{failing} failed marks: still held or marked, not taken again");
            setup.shutdown.cancel();
            setup.tasks.close();
            setup.tasks.wait().await;
        }
    }

    /// Events whose publish was refused, and whose release failed, are released at a later try
    /// (any relay takes them at once), not left held until their claim ends; a release failing
    /// at every try leaves them held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lane_tries_again_to_release_what_it_could_not_publish() {
        for failing in [2, MARK_RETRIES.len() as u32 + 1] {
            let setup = handing_over_to(im_domain::services::CLAIM_LEASE, 16, |outbox| {
                Arc::new(FailingMarks { outbox, failing: 0.into(), failing_releases: failing.into() })
            })
            .await;
            setup.publisher.down.store(true, Ordering::SeqCst);
            let ids = HashSet::from([setup.write(1, false).await[0]]);
            let tries: Duration = MARK_RETRIES.iter().sum();
            let released = claimable_within(&setup.store, &ids, tries + Duration::from_millis(500)).await;
            assert_eq!(released == ids, failing <= MARK_RETRIES.len() as u32, "{failing} failed releases");
            setup.shutdown.cancel();
            setup.tasks.close();
            setup.tasks.wait().await;
        }
    }

    /// The stop cuts the wait before a try short: the events are marked at once, not left held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_stop_the_lane_tries_at_once_to_mark_what_it_published() {
        let setup = handing_over_to(im_domain::services::CLAIM_LEASE, 16, |outbox| {
            Arc::new(FailingMarks { outbox, failing: 1.into(), failing_releases: 0.into() })
        })
        .await;
        let id = setup.write(1, false).await[0];
        assert!(setup.published_within(id, Duration::from_secs(3)).await, "published by the lane");
        setup.shutdown.cancel();
        setup.tasks.close();
        setup.tasks.wait().await;
        let pending = setup.store.outbox().pending(10).await.unwrap();
        assert!(pending.iter().all(|event| event.id != id), "marked at the stop");
    }

    #[test]
    fn handed_events_unreadable_or_near_the_end_of_their_claim_are_left() {
        let tenant = im_testkit::fresh_tenant();
        let now = time::OffsetDateTime::now_utc();
        let until = |left: Duration| (now.unix_timestamp_nanos() / 1_000_000) as i64 + left.as_millis() as i64;
        let good = event(&tenant, EventType::IntegrationCreated, "a");
        let handed = |e: &DomainEvent, left| im_store_embedded::HandedEvent {
            id: e.id,
            body: serde_json::to_string(e).unwrap(),
            claimed_until_ms: until(left),
        };
        let late = event(&tenant, EventType::IntegrationCreated, "b");
        let unreadable =
            im_store_embedded::HandedEvent { id: uuid::Uuid::new_v4(), body: "{".into(), claimed_until_ms: until(Duration::from_secs(30)) };
        let sorted = sort_handed(
            vec![handed(&good, Duration::from_secs(30)), handed(&late, Duration::from_secs(5)), unreadable.clone()],
            Duration::from_secs(10),
        );
        assert_eq!(sorted, Handed { events: vec![good], left: vec![late.id, unreadable.id], late: true });
    }
}
