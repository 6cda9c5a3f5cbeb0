//! Port traits: what the domain needs from the outside world. Adapters implement them; the
//! conformance suite in `im-testkit` checks every implementation against the contracts below.

use async_trait::async_trait;

use crate::common::{ETag, IntegrationId, JsonText, JsonTexts, Page, PageRequest, Stored, TenantId, TextPage};
use crate::error::DomainError;
use crate::events::{Claimed, DeadLetter, DomainEvent, EventType, OutboxStats};
use crate::integration::{Integration, IntegrationFilter};
use crate::provider::{Provider, ProviderFilter, ProviderId, SeedReport};

/// Storage of tenant integrations, partitioned by tenant.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait IntegrationRepository: Send + Sync {
    /// Stores a new integration, and records `events` in the outbox in the same atomic write,
    /// and returns its concurrency token.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Conflict`] if an integration with the same id exists in the
    ///   tenant, having written nothing (no event either).
    /// - MUST return [`DomainError::Unavailable`] when the store cannot be reached, having written nothing.
    async fn create(&self, integration: &Integration, events: &[DomainEvent]) -> Result<ETag, DomainError>;

    /// Whether [`IntegrationRepository::create_for_provider`] checks the provider's version in
    /// the write. When it does, the service validates a config with the provider's schema it
    /// compiled last without reading the provider first, and lets the write catch a change.
    fn checks_provider_in_write(&self) -> bool {
        false
    }

    /// [`IntegrationRepository::create`], only while the catalog holds the integration's
    /// provider at version `provider_version` (the version whose config schema the integration
    /// was validated against), checked in the same atomic write. Called only when
    /// [`IntegrationRepository::checks_provider_in_write`] says so; the default does not check.
    ///
    /// # Errors
    /// - As `create`;
    /// - MUST return [`DomainError::PreconditionFailed`] when the provider is at another version
    ///   or gone, having written nothing.
    async fn create_for_provider(
        &self,
        integration: &Integration,
        provider_version: &ETag,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        let _ = provider_version;
        self.create(integration, events).await
    }

    /// [`IntegrationRepository::create`], or [`IntegrationRepository::create_for_provider`] at
    /// `provider_version` when one is given, with `text`: `integration`'s JSON text as
    /// [`JsonText::encode`] writes it, which an adapter that stores integrations as that text
    /// writes as is instead of writing the integration out again.
    ///
    /// # Errors
    /// As `create`, or `create_for_provider` when `provider_version` is given.
    async fn create_encoded(
        &self,
        integration: &Integration,
        text: &JsonText<Integration>,
        provider_version: &Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        let _ = text;
        match provider_version {
            Some(version) => self.create_for_provider(integration, version, events).await,
            None => self.create(integration, events).await,
        }
    }

    /// Reads one integration of one tenant.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if the tenant has no integration with that id,
    ///   including when another tenant has one.
    async fn get(&self, tenant: &TenantId, id: IntegrationId) -> Result<Stored<Integration>, DomainError>;

    /// Lists one tenant's integrations matching `filter`, oldest first, one page at a time.
    /// MUST return every matching integration exactly once across the pages of an unchanged
    /// partition, never another tenant's, and `continuation: None` on the last page.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Validation`] on field `continuationToken` for a token it did not issue.
    async fn list(
        &self,
        tenant: &TenantId,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Integration>>, DomainError>;

    /// [`IntegrationRepository::get`], as the integration's JSON text (what an adapter that
    /// stores integrations as that text returns without decoding them).
    ///
    /// # Errors
    /// - MUST fail exactly when `get` fails, with the same error.
    async fn get_json(&self, tenant: &TenantId, id: IntegrationId) -> Result<Stored<JsonText<Integration>>, DomainError> {
        let stored = self.get(tenant, id).await?;
        Ok(Stored { value: JsonText::encode(&stored.value)?, etag: stored.etag })
    }

    /// [`IntegrationRepository::list`], as the integrations' JSON texts in one buffer: the same
    /// page, in the same order, with the same continuation.
    ///
    /// # Errors
    /// - MUST fail exactly when `list` fails, with the same error.
    async fn list_json(
        &self,
        tenant: &TenantId,
        filter: &IntegrationFilter,
        page: &PageRequest,
    ) -> Result<TextPage<Integration>, DomainError> {
        let page = self.list(tenant, filter, page).await?;
        let mut items = JsonTexts::with_capacity(page.items.len(), 0);
        for stored in page.items {
            items.push(&JsonText::encode(&stored.value)?);
        }
        Ok(TextPage { items, continuation: page.continuation })
    }

    /// Replaces a stored integration (same tenant and id), records `events` atomically with it,
    /// and returns the new concurrency token.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if it does not exist.
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is given and is not the
    ///   current token, having written nothing (no event either).
    async fn replace(&self, integration: &Integration, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError>;

    /// Deletes an integration and records `events` atomically with the deletion.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if it does not exist.
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is given and stale,
    ///   having written nothing.
    async fn delete(&self, tenant: &TenantId, id: IntegrationId, if_match: Option<ETag>, events: &[DomainEvent])
    -> Result<(), DomainError>;
}

/// Storage of the global provider catalog, partitioned by category. Provider ids are unique
/// across categories.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait ProviderRepository: Send + Sync {
    /// Stores a new provider.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Conflict`] if a provider with the same id exists in any category.
    async fn create(&self, provider: &Provider) -> Result<ETag, DomainError>;

    /// Reads a provider by id, whatever its category.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if there is none.
    async fn get(&self, id: &ProviderId) -> Result<Stored<Provider>, DomainError>;

    /// The concurrency token of a provider's current version, which `get` would return with it,
    /// without reading the provider: what keeps something derived from a version (a compiled
    /// config schema) checks that it is still current.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if there is none.
    async fn etag(&self, id: &ProviderId) -> Result<ETag, DomainError> {
        Ok(self.get(id).await?.etag)
    }

    /// Lists providers matching `filter`, ordered by id, one page at a time. With a category
    /// filter the query MUST stay inside that partition.
    ///
    /// # Errors
    /// - MUST return [`DomainError::Validation`] on field `continuationToken` for a token it did not issue.
    async fn list(&self, filter: &ProviderFilter, page: &PageRequest) -> Result<Page<Stored<Provider>>, DomainError>;

    /// Replaces a provider, possibly moving it to another category.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if it does not exist.
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is given and stale.
    async fn replace(&self, provider: &Provider, if_match: Option<ETag>) -> Result<ETag, DomainError>;

    /// Deletes a provider.
    ///
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] if it does not exist.
    /// - MUST return [`DomainError::PreconditionFailed`] if `if_match` is given and stale.
    async fn delete(&self, id: &ProviderId, if_match: Option<ETag>) -> Result<(), DomainError>;

    /// Seeds the catalog. MUST write only providers whose id was never seeded before, MUST NOT
    /// change or re-create a provider that was seeded once (an administrator may have edited or
    /// deleted it since), and MUST be safe to call on every start.
    async fn seed(&self, providers: &[Provider]) -> Result<SeedReport, DomainError>;
}

/// State of one dependency, for readiness reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyHealth {
    pub name: String,
    pub ready: bool,
    /// Whether the service cannot serve without it. A non-critical dependency that is down
    /// degrades the service (work waits durably) without making it unready.
    pub critical: bool,
    /// What was observed (latency, pending counts...), shown to unauthenticated callers: MUST NOT
    /// hold file paths, URLs, host or user names, or error texts.
    pub detail: String,
    /// Everything useful to an operator (paths, endpoints, the error): written to the logs only.
    pub diagnostic: String,
}

/// Something whose reachability decides whether the service is ready.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait HealthCheck: Send + Sync {
    /// The dependency's name in readiness reports and whether it is critical: what readiness
    /// reports for it when `check` does not answer in time.
    fn describe(&self) -> (&'static str, bool);

    /// Checks the dependency. MUST answer within a few seconds and MUST NOT fail: problems are
    /// reported as `ready: false`.
    async fn check(&self) -> DependencyHealth;
}

/// The transactional outbox: events recorded by repository writes, waiting to be published.
///
/// An entry that fails to be read or published `max_attempts` times becomes a dead letter: it
/// is no longer pending, claimed or counted as pending, so it blocks no later event; an
/// administrator lists it (`dead_letters`) and puts it back (`requeue`).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Up to `limit` readable events not yet marked published and not dead letters, oldest
    /// first. MUST include every event whose write committed, and none whose write failed;
    /// MUST skip entries it cannot read instead of failing (`claim` reports them).
    async fn pending(&self, limit: u32) -> Result<Vec<DomainEvent>, DomainError>;

    /// Takes up to `limit` pending entries, oldest first, that no other relay holds, and holds
    /// them for `lease` on behalf of `owner`, so that several instances publish each event once.
    /// MUST NOT hand an event held by another owner to anyone before its hold ends (a
    /// conditional write); MUST hand the same owner its own held events again (a retry after a
    /// failed publish); an event whose holder died comes back when the hold ends. An entry it
    /// cannot read MUST be held like the others and handed out in `Claimed::unreadable` (never
    /// fail the whole claim); dead letters MUST NOT be handed out.
    async fn claim(&self, owner: &str, limit: u32, lease: std::time::Duration) -> Result<Claimed, DomainError>;

    /// Marks events as published (they are then purged, dead letters included). MUST be
    /// idempotent, and MUST ignore ids it does not hold.
    async fn mark_published(&self, ids: &[uuid::Uuid]) -> Result<(), DomainError>;

    /// Ends the holds `owner` has on these entries (a publish of them failed), so that any
    /// relay's next claim may take them at once. MUST leave alone an entry another owner holds,
    /// and ignore ids that are not in the outbox.
    async fn release(&self, owner: &str, ids: &[uuid::Uuid]) -> Result<(), DomainError>;

    /// Counts one more failed try to read or publish the entry `id`, keeping `reason` (never
    /// the event's content). Once the count reaches `max_attempts` the entry MUST become a dead
    /// letter in the same conditional write; answers whether it did. MUST ignore (`Ok(false)`)
    /// an id that is not in the outbox or already a dead letter.
    async fn record_failure(&self, id: uuid::Uuid, reason: &str, max_attempts: u32) -> Result<bool, DomainError>;

    /// A page of dead letters, ordered by event id.
    ///
    /// # Errors
    /// MUST answer a continuation token it did not issue with `Validation` of
    /// `continuationToken` ([`crate::common::invalid_continuation`]).
    async fn dead_letters(&self, page: &PageRequest) -> Result<Page<DeadLetter>, DomainError>;

    /// Puts a dead letter back among the pending events with its failed tries reset, to be
    /// published in its original place (oldest first).
    ///
    /// # Errors
    /// MUST return [`DomainError::NotFound`] when `id` is not a dead letter (unknown, pending, or
    /// published); the change MUST be conditional, so two requeues of one entry are one.
    async fn requeue(&self, id: uuid::Uuid) -> Result<(), DomainError>;

    /// How many events wait, since when, and how many are dead letters.
    async fn stats(&self) -> Result<OutboxStats, DomainError>;
}

/// Where events go: a message broker, or subscribers in this process.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait EventPublisher: Send + Sync {
    /// Publishes events in order.
    ///
    /// # Errors
    /// MUST return `Ok` only once every event is durably accepted (the broker confirmed it, or
    /// every subscriber handled it); otherwise [`DomainError::Unavailable`], and the caller
    /// publishes them again later (consumers drop duplicates by event id).
    async fn publish(&self, events: &[DomainEvent]) -> Result<(), DomainError>;
}

/// Something in this process that reacts to events (webhook fan-out, sync triggers).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait EventSubscriber: Send + Sync {
    /// Handles one event. MUST be idempotent by event id (events arrive at least once).
    ///
    /// # Errors
    /// When the event could not be handled durably; it is then delivered again later.
    async fn handle(&self, event: &DomainEvent) -> Result<(), DomainError>;

    /// Handles a batch; the default handles the events one after the other. A subscriber that
    /// can work on several at once overrides it.
    ///
    /// # Errors
    /// When any event could not be handled (the whole batch is delivered again later).
    async fn handle_all(&self, events: &[DomainEvent]) -> Result<(), DomainError> {
        for event in events {
            self.handle(event).await?;
        }
        Ok(())
    }

    /// Whether events of this type mean anything to the subscriber (the default: all do). With
    /// no broker, an event that no subscriber wants is not written at all ([`EventReaders`]).
    fn wants(&self, _event_type: EventType) -> bool {
        true
    }

    /// Whether the subscriber acts on an event only for a tenant that has webhook endpoints
    /// when the event is written (the webhook fan-out; the default: no). When every subscriber
    /// that wants a type says so, a store may skip the event of a tenant without any endpoint
    /// ([`EventReaders::only_for_tenants_with_webhooks`]).
    fn only_for_tenants_with_webhooks(&self) -> bool {
        false
    }
}

/// Who reads the events of a type once they are published: an event that nobody reads need not
/// be written to the outbox. A broker's readers are unknown, so with a broker every event is
/// read ([`AllEventsRead`]); the in-process bus knows its subscribers.
pub trait EventReaders: Send + Sync {
    fn reads(&self, event_type: EventType) -> bool;

    /// Whether every reader of `event_type` reads it only for tenants that have webhook
    /// endpoints when it is written (the webhook fan-out): a store that can see the tenant's
    /// endpoints in the write then need not write the event of a tenant without any. The
    /// default (and a broker's): no.
    fn only_for_tenants_with_webhooks(&self, _event_type: EventType) -> bool {
        false
    }
}

/// Every event has readers (a broker's consumers are not known here).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllEventsRead;

impl EventReaders for AllEventsRead {
    fn reads(&self, _event_type: EventType) -> bool {
        true
    }
}
