//! Contracts of [`ConnectionRepository`]: partitioned by integration, confined to the tenant.

use im_domain::connection::{Connection, ConnectionId, ConnectionRepository, ConnectionStatus, CredentialHints, RefreshLease};
use im_domain::events::{DomainEvent, EventType};
use im_domain::ports::Outbox;
use im_domain::provider::AuthMode;
use im_domain::secrets::{SecretName, SecretRef};
use im_domain::{DomainError, ETag, IntegrationId, PageRequest, TenantId};

use crate::{fresh_tenant, timestamp, user};

/// A connection of `integration` in `tenant`, with a fresh id.
pub fn connection(tenant: &TenantId, integration: IntegrationId) -> Connection {
    let id = ConnectionId(uuid::Uuid::now_v7());
    Connection {
        id,
        tenant_id: tenant.clone(),
        integration_id: integration,
        name: "Conformance connection".into(),
        auth_mode: AuthMode::ApiKey,
        status: ConnectionStatus::Active,
        status_reason: None,
        hints: CredentialHints { last_four: Some("abcd".into()), scopes: vec!["read".into()], token_expires_at: Some(timestamp()) },
        credentials: Some(SecretRef { secret_name: SecretName::new(tenant, "connection", &id.to_string()), version: "1".into() }),
        refresh_lease: None,
        created_at: timestamp(),
        updated_at: timestamp(),
        created_by: user(),
        updated_by: user(),
    }
}

fn fresh_integration() -> IntegrationId {
    IntegrationId(uuid::Uuid::now_v7())
}

fn event(connection: &Connection, event_type: EventType) -> DomainEvent {
    DomainEvent {
        id: uuid::Uuid::now_v7(),
        event_type,
        tenant_id: connection.tenant_id.clone(),
        subject: connection.id.to_string(),
        time: timestamp(),
        data: serde_json::json!({"id": connection.id.to_string(), "integrationId": connection.integration_id.to_string()}).into(),
    }
}

/// Runs every connection contract.
pub async fn contract(repo: &dyn ConnectionRepository) {
    crud(repo).await;
    tenants_are_isolated(repo).await;
    stale_etag_is_refused_and_a_lease_has_one_winner(repo).await;
    pages_cover_the_integration_once(repo).await;
}

/// Create, read back equal, replace with the current token, delete, then not found.
pub async fn crud(repo: &dyn ConnectionRepository) {
    let tenant = fresh_tenant();
    let mut item = connection(&tenant, fresh_integration());
    let etag = repo.create(&item, &[]).await.expect("create");
    let read = repo.get(&tenant, item.integration_id, item.id).await.expect("get after create");
    assert_eq!(read.value, item, "a read returns what was written");
    assert_eq!(read.etag, etag, "a read returns the token of the write");
    assert!(matches!(repo.create(&item, &[]).await, Err(DomainError::Conflict(_))), "a duplicate id is a conflict");

    item.status = ConnectionStatus::RefreshFailed;
    item.status_reason = Some("invalid_grant".into());
    let etag2 = repo.replace(&item, Some(etag.clone()), &[]).await.expect("replace with the current token");
    assert_ne!(etag2, etag, "every write issues a new token");
    assert_eq!(repo.get(&tenant, item.integration_id, item.id).await.expect("get").value, item);
    assert!(
        matches!(repo.get(&tenant, fresh_integration(), item.id).await, Err(DomainError::NotFound { .. })),
        "a connection is only found under its own integration"
    );

    repo.delete(&tenant, item.integration_id, item.id, Some(etag2), &[]).await.expect("delete with the current token");
    assert!(matches!(repo.get(&tenant, item.integration_id, item.id).await, Err(DomainError::NotFound { .. })), "deleted is not found");
    assert!(
        matches!(repo.delete(&tenant, item.integration_id, item.id, None, &[]).await, Err(DomainError::NotFound { .. })),
        "deleting twice is not found"
    );
    assert!(matches!(repo.replace(&item, None, &[]).await, Err(DomainError::NotFound { .. })), "replacing a deleted item is not found");
}

/// Another tenant that knows the integration id and the connection id still finds nothing.
pub async fn tenants_are_isolated(repo: &dyn ConnectionRepository) {
    let (a, b) = (fresh_tenant(), fresh_tenant());
    let integration = fresh_integration();
    let item = connection(&a, integration);
    repo.create(&item, &[]).await.expect("create in tenant A");
    assert!(matches!(repo.get(&b, integration, item.id).await, Err(DomainError::NotFound { .. })), "tenant B cannot read A's connection");
    assert!(
        matches!(repo.delete(&b, integration, item.id, None, &[]).await, Err(DomainError::NotFound { .. })),
        "tenant B cannot delete A's connection"
    );
    let mut forged = item.clone();
    forged.tenant_id = b.clone();
    forged.name = "Taken over".into();
    assert!(matches!(repo.replace(&forged, None, &[]).await, Err(DomainError::NotFound { .. })), "tenant B cannot replace A's connection");
    let page = repo.list(&b, integration, &PageRequest::first(200)).await.expect("list B");
    assert!(page.items.is_empty(), "tenant B's listing of the same integration holds none of A's connections");
    let kept = repo.get(&a, integration, item.id).await.expect("A's connection is still there");
    assert_eq!(kept.value, item, "A's connection is untouched");
}

/// A stale token is refused and writes nothing; two holders racing for the refresh lease with
/// the same version read: exactly one wins.
pub async fn stale_etag_is_refused_and_a_lease_has_one_winner(repo: &dyn ConnectionRepository) {
    let tenant = fresh_tenant();
    let item = connection(&tenant, fresh_integration());
    let first = repo.create(&item, &[]).await.expect("create");
    assert!(
        matches!(repo.replace(&item, Some(ETag::new("no-such-token")), &[]).await, Err(DomainError::PreconditionFailed)),
        "an unknown token is refused"
    );
    let lease = |owner: &str| {
        let mut held = item.clone();
        held.refresh_lease = Some(RefreshLease { owner: owner.into(), until: timestamp() + time::Duration::seconds(30) });
        held
    };
    let (one, two) = (lease("instance-1"), lease("instance-2"));
    let (r1, r2) =
        futures_util::future::join(repo.replace(&one, Some(first.clone()), &[]), repo.replace(&two, Some(first.clone()), &[])).await;
    assert_eq!(usize::from(r1.is_ok()) + usize::from(r2.is_ok()), 1, "one of two conditional lease writes wins: {r1:?} {r2:?}");
    let loser = if r1.is_ok() { &r2 } else { &r1 };
    assert!(matches!(loser, Err(DomainError::PreconditionFailed)), "the other one is refused as stale");
    let holder = repo.get(&tenant, item.integration_id, item.id).await.expect("get").value.refresh_lease.expect("a lease is held");
    assert_eq!(holder.owner, if r1.is_ok() { "instance-1" } else { "instance-2" }, "the winner holds the lease");
    assert!(
        matches!(repo.delete(&tenant, item.integration_id, item.id, Some(first), &[]).await, Err(DomainError::PreconditionFailed)),
        "a stale delete is refused"
    );
    assert!(repo.get(&tenant, item.integration_id, item.id).await.is_ok(), "refused writes change nothing");
}

pub async fn pages_cover_the_integration_once(repo: &dyn ConnectionRepository) {
    let tenant = fresh_tenant();
    let integration = fresh_integration();
    let other = connection(&tenant, fresh_integration());
    repo.create(&other, &[]).await.expect("create in another integration");
    let mut created = Vec::new();
    for _ in 0..5 {
        let item = connection(&tenant, integration);
        repo.create(&item, &[]).await.expect("create");
        created.push(item.id);
    }
    let mut seen = Vec::new();
    let mut page = PageRequest::first(2);
    for _ in 0..10 {
        let result = repo.list(&tenant, integration, &page).await.expect("list page");
        assert!(result.items.len() <= 2, "a page holds at most `limit` items");
        seen.extend(result.items.iter().map(|s| s.value.id));
        match result.continuation {
            Some(token) => page = PageRequest { limit: 2, continuation: Some(token) },
            None => break,
        }
    }
    assert_eq!(seen, created, "pages return every connection of the integration once, oldest first, and no other");
    let foreign = PageRequest { limit: 10, continuation: Some("this-was-never-issued".into()) };
    assert!(
        matches!(repo.list(&tenant, integration, &foreign).await, Err(DomainError::Validation(v)) if v[0].field == "continuationToken"),
        "a foreign continuation token is refused"
    );
}

/// Events are recorded with the write that caused them, and none for a refused write.
pub async fn events_are_recorded_atomically(repo: &dyn ConnectionRepository, outbox: &dyn Outbox) {
    let tenant = fresh_tenant();
    let item = connection(&tenant, fresh_integration());
    let created = event(&item, EventType::ConnectionCreated);
    let etag = repo.create(&item, std::slice::from_ref(&created)).await.expect("create with an event");
    let duplicate = event(&item, EventType::ConnectionCreated);
    assert!(repo.create(&item, std::slice::from_ref(&duplicate)).await.is_err(), "duplicate create");
    let stale = event(&item, EventType::ConnectionDeleted);
    assert!(
        repo.delete(&tenant, item.integration_id, item.id, Some(ETag::new("stale")), std::slice::from_ref(&stale)).await.is_err(),
        "stale delete"
    );
    let deleted = event(&item, EventType::ConnectionDeleted);
    repo.delete(&tenant, item.integration_id, item.id, Some(etag), std::slice::from_ref(&deleted)).await.expect("delete with an event");
    let pending: Vec<uuid::Uuid> = outbox.pending(10_000).await.expect("pending").into_iter().map(|e| e.id).collect();
    assert!(pending.contains(&created.id) && pending.contains(&deleted.id), "events of committed writes are pending");
    assert!(!pending.contains(&duplicate.id) && !pending.contains(&stale.id), "events of refused writes are not");
    outbox.mark_published(&[created.id, deleted.id]).await.expect("mark published");
    let pending: Vec<uuid::Uuid> = outbox.pending(10_000).await.expect("pending").into_iter().map(|e| e.id).collect();
    assert!(!pending.contains(&created.id) && !pending.contains(&deleted.id), "published events are purged");
}
