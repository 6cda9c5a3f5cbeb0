//! Driving the outbox relay: publish as soon as a write records events, retry with backoff
//! while the publisher is unavailable, and report how far behind the outbox is.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::connection::{Connection, ConnectionId, ConnectionRepository};
use im_domain::events::DomainEvent;
use im_domain::integration::{Integration, IntegrationFilter};
use im_domain::ports::{DependencyHealth, HealthCheck, IntegrationRepository, Outbox};
use im_domain::retry::Backoff;
use im_domain::services::EventRelay;
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
pub fn spawn_relay(relay: EventRelay, wake: Arc<Notify>, batch: u32, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        let backoff = Backoff { attempts: u32::MAX, first: Duration::from_millis(100), max: MAX_BACKOFF };
        let mut failures: u32 = 0;
        let mut failing_since: Option<std::time::Instant> = None;
        while !shutdown.is_cancelled() {
            match relay.relay_once(batch).await {
                Ok(round) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(after_secs = since.elapsed().as_secs(), "event publishing recovered");
                    }
                    failures = 0;
                    for id in &round.dead_letters {
                        tracing::warn!(event_id = %id, "an outbox event failed too often and is now a dead letter; it blocks nothing");
                    }
                    // A full round of published events: more may wait. A round with failures
                    // waits for the next poll, so failed tries are spread out.
                    if round.claimed as u32 == batch && round.published == round.claimed {
                        continue;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = wake.notified() => {}
                        () = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff.delay(failures);
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    let stats = relay.outbox().stats().await.ok();
                    tracing::warn!(
                        %error,
                        pending = stats.map(|s| s.pending),
                        failing_for_secs = since.elapsed().as_secs(),
                        retry_in_ms = wait.as_millis() as u64,
                        "publishing events failed; they stay in the outbox"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        tracing::debug!("outbox relay stopped");
    });
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
