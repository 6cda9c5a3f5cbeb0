//! Contracts of [`Outbox`], together with the repository writes that record events.

use im_domain::events::{DomainEvent, EventType};
use im_domain::ports::{IntegrationRepository, Outbox};
use im_domain::{DomainError, TenantId};

use crate::fresh_tenant;
use crate::integrations::integration;

fn event(tenant: &TenantId, event_type: EventType, subject: &str) -> DomainEvent {
    DomainEvent {
        id: uuid::Uuid::now_v7(),
        event_type,
        tenant_id: tenant.clone(),
        subject: subject.to_owned(),
        time: crate::timestamp(),
        data: serde_json::json!({"id": subject}),
    }
}

/// Drains what other checks left, so this check sees only its own events.
async fn drain(outbox: &dyn Outbox) {
    loop {
        let pending = outbox.pending(500).await.expect("pending");
        if pending.is_empty() {
            return;
        }
        let ids: Vec<_> = pending.iter().map(|e| e.id).collect();
        outbox.mark_published(&ids).await.expect("mark");
    }
}

/// Events are recorded with successful writes, in order, and never with refused ones.
/// (Run it alone against its outbox: it drains the outbox first.)
pub async fn events_are_recorded_atomically(repo: &dyn IntegrationRepository, outbox: &dyn Outbox) {
    drain(outbox).await;
    let tenant = fresh_tenant();
    let item = integration(&tenant, "github");
    let created = event(&tenant, EventType::IntegrationCreated, &item.id.to_string());
    let etag = repo.create(&item, std::slice::from_ref(&created)).await.expect("create");

    let duplicate = event(&tenant, EventType::IntegrationCreated, &item.id.to_string());
    assert!(matches!(repo.create(&item, std::slice::from_ref(&duplicate)).await, Err(DomainError::Conflict(_))));
    let stale = event(&tenant, EventType::IntegrationUpdated, &item.id.to_string());
    assert!(matches!(
        repo.replace(&item, Some(im_domain::ETag::new("stale")), std::slice::from_ref(&stale)).await,
        Err(DomainError::PreconditionFailed)
    ));

    let updated = event(&tenant, EventType::IntegrationUpdated, &item.id.to_string());
    let etag = repo.replace(&item, Some(etag), std::slice::from_ref(&updated)).await.expect("replace");
    let deleted = event(&tenant, EventType::IntegrationDeleted, &item.id.to_string());
    repo.delete(&tenant, item.id, Some(etag), std::slice::from_ref(&deleted)).await.expect("delete");

    let pending = outbox.pending(100).await.expect("pending");
    assert_eq!(
        pending,
        vec![created.clone(), updated.clone(), deleted.clone()],
        "committed events, in order, and no event of a refused write"
    );
    let stats = outbox.stats().await.expect("stats");
    assert_eq!(stats.pending, 3);
    assert!(stats.oldest.is_some());

    assert_eq!(outbox.pending(2).await.expect("pending").len(), 2, "limit is honoured");
    outbox.mark_published(&[created.id, updated.id]).await.expect("mark");
    outbox.mark_published(&[created.id, uuid::Uuid::new_v4()]).await.expect("marking again and unknown ids is fine");
    assert_eq!(outbox.pending(100).await.expect("pending"), vec![deleted.clone()]);
    outbox.mark_published(&[deleted.id]).await.expect("mark");
    let stats = outbox.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.oldest), (0, None));
}

/// Relays of several instances never hold the same event at once: an event held by one is
/// handed to another only once the hold ends; its own holder gets it again (a retry).
/// (Run it alone against its outbox: it drains the outbox first.)
pub async fn claims_are_exclusive(repo: &dyn IntegrationRepository, outbox: &dyn Outbox) {
    use std::time::Duration;
    drain(outbox).await;
    let tenant = fresh_tenant();
    let mut recorded = Vec::new();
    for n in 0..4 {
        let item = integration(&tenant, "github");
        let created = event(&tenant, EventType::IntegrationCreated, &format!("{}-{n}", item.id));
        repo.create(&item, std::slice::from_ref(&created)).await.expect("create");
        recorded.push(created);
    }
    let long = Duration::from_secs(60);
    let first = outbox.claim("relay-a", 2, long).await.expect("claim");
    assert_eq!(first, recorded[..2].to_vec(), "the oldest events, in order");
    let second = outbox.claim("relay-b", 10, long).await.expect("claim");
    assert_eq!(second, recorded[2..].to_vec(), "another relay gets only what nobody holds");
    assert!(outbox.claim("relay-c", 10, long).await.expect("claim").is_empty(), "held events are handed to nobody else");
    assert_eq!(outbox.claim("relay-a", 10, long).await.expect("claim"), recorded[..2].to_vec(), "a holder gets its own events again");

    outbox.mark_published(&[recorded[0].id, recorded[1].id]).await.expect("mark");
    let short = outbox.claim("relay-b", 10, Duration::from_millis(1)).await.expect("claim");
    assert_eq!(short, recorded[2..].to_vec());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(outbox.claim("relay-c", 10, long).await.expect("claim"), recorded[2..].to_vec(), "a hold that ended is taken over");
    outbox.mark_published(&[recorded[2].id, recorded[3].id]).await.expect("mark");
    assert!(outbox.pending(10).await.expect("pending").is_empty());
}
