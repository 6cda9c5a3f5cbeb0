//! The port-conformance suite: one async function per port contract. Every adapter of a port
//! calls all of them from its own tests, so every backend is held to the same behaviour: the
//! stores ([`run_all`], [`outbox`], [`webhooks`], [`deliveries`]), the delivery queues ([`queue`]), the secret
//! stores ([`secrets`]) and the event publishers ([`publisher`]). Each check uses fresh tenants
//! and ids, so checks can share one store and run concurrently.
//!
//! The functions panic with a message naming the contract that was broken.

pub mod audit;
pub mod connections;
pub mod cosmos;
pub mod deliveries;
pub mod fake_oauth2;
pub mod fake_provider;
pub mod fake_shard_manager;
pub mod idempotency;
pub mod integrations;
pub mod outbox;
pub mod providers;
pub mod proxy;
pub mod publisher;
pub mod queue;
pub mod rabbit;
pub mod secret_management;
pub mod secrets;
pub mod services;
pub mod sync;
pub mod webhooks;

use im_domain::{TenantId, UserId};
use time::OffsetDateTime;

/// A tenant id no other check uses.
pub fn fresh_tenant() -> TenantId {
    TenantId::new(format!("tenant-{}", uuid::Uuid::new_v4().simple())).expect("valid tenant id")
}

pub fn user() -> UserId {
    UserId::new("conformance-user").expect("valid user id")
}

/// A fixed timestamp, at millisecond precision like the service's clock.
pub fn timestamp() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
}

/// Runs every check of the suite against the given repositories.
pub async fn run_all(integrations: &dyn im_domain::ports::IntegrationRepository, providers: &dyn im_domain::ports::ProviderRepository) {
    integrations::crud(integrations).await;
    integrations::duplicate_id_conflicts(integrations).await;
    integrations::creates_from_its_text(integrations).await;
    integrations::stale_etag_is_refused(integrations).await;
    integrations::tenants_are_isolated(integrations).await;
    integrations::pages_cover_everything_once(integrations).await;
    integrations::filters(integrations).await;
    integrations::foreign_continuation_token_is_refused(integrations).await;
    integrations::json_texts_are_the_encoding(integrations).await;
    integrations::creates_for_a_provider_version(integrations, providers).await;
    providers::crud_and_category_move(providers).await;
    providers::ids_are_unique_across_categories(providers).await;
    providers::list_filters_and_pages(providers).await;
    providers::seed_is_idempotent_and_keeps_edits(providers).await;
}

/// Runs every store check of the suite against `$store`, which has the accessors both stores
/// (`im-store-embedded`, `im-store-cosmos`) have: integrations, providers, the outbox (with
/// `$insert_unreadable`, an async closure that writes an outbox entry of the tenant the store
/// cannot read and returns its id), webhooks, connections, sync tasks, executions and states,
/// the sync service and scheduler on them, and the audit buffer.
#[macro_export]
macro_rules! store_suite {
    ($store:expr, $insert_unreadable:expr) => {{
        let store = &$store;
        $crate::run_all(store.integrations().as_ref(), store.providers().as_ref()).await;
        $crate::outbox::events_are_recorded_atomically(store.integrations().as_ref(), store.outbox().as_ref()).await;
        $crate::outbox::claims_are_exclusive(store.integrations().as_ref(), store.outbox().as_ref()).await;
        $crate::outbox::failed_entries_become_dead_letters(store.integrations().as_ref(), store.outbox().as_ref(), $insert_unreadable)
            .await;
        $crate::webhooks::contract(store.webhooks().as_ref()).await;
        $crate::deliveries::contract(store.deliveries().as_ref()).await;
        $crate::deliveries::without_a_queue_the_queued_writes_are_refused(store.deliveries().as_ref()).await;
        $crate::connections::contract(store.connections().as_ref()).await;
        $crate::connections::events_are_recorded_atomically(store.connections().as_ref(), store.outbox().as_ref()).await;
        $crate::sync::run_all(store.sync_tasks().as_ref(), store.sync_executions().as_ref(), store.sync_states().as_ref()).await;
        $crate::sync::service(store.sync_tasks(), store.sync_executions(), store.sync_states()).await;
        $crate::sync::scheduler(store.sync_tasks(), store.sync_executions()).await;
        $crate::sync::the_next_run_is_queued_as_the_last_ends(store.sync_tasks(), store.sync_executions(), store.sync_states()).await;
        $crate::audit::buffer(store.audit_buffer().as_ref()).await;
    }};
}
