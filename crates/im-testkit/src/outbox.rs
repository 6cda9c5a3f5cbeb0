//! Contracts of [`Outbox`], together with the repository writes that record events.

use im_domain::events::{DomainEvent, EventType};
use im_domain::ports::{IntegrationRepository, Outbox};
use im_domain::{DomainError, PageRequest, TenantId};

use crate::fresh_tenant;
use crate::integrations::integration;

pub fn event(tenant: &TenantId, event_type: EventType, subject: &str) -> DomainEvent {
    DomainEvent {
        id: uuid::Uuid::now_v7(),
        event_type,
        tenant_id: tenant.clone(),
        subject: subject.to_owned(),
        time: crate::timestamp(),
        data: serde_json::json!({"id": subject}).into(),
    }
}

/// Drains what other checks left, so this check sees only its own events.
async fn drain(outbox: &dyn Outbox) {
    let dead: Vec<_> = all_dead_letters(outbox, 200).await.iter().map(|d| d.id).collect();
    outbox.mark_published(&dead).await.expect("mark");
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
/// handed to another only once the hold ends or its holder releases it; its own holder gets it
/// again (a retry).
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
    let first = outbox.claim("relay-a", 2, long).await.expect("claim").events;
    assert_eq!(first, recorded[..2].to_vec(), "the oldest events, in order");
    let second = outbox.claim("relay-b", 10, long).await.expect("claim").events;
    assert_eq!(second, recorded[2..].to_vec(), "another relay gets only what nobody holds");
    assert!(outbox.claim("relay-c", 10, long).await.expect("claim").is_empty(), "held events are handed to nobody else");
    assert_eq!(
        outbox.claim("relay-a", 10, long).await.expect("claim").events,
        recorded[..2].to_vec(),
        "a holder gets its own events again"
    );

    outbox.release("relay-b", &[recorded[0].id, uuid::Uuid::new_v4()]).await.expect("release of another's hold, and of an unknown id");
    assert!(outbox.claim("relay-c", 10, long).await.expect("claim").is_empty(), "a release ends only its owner's holds");
    outbox.release("relay-a", &[recorded[1].id]).await.expect("release");
    assert_eq!(
        outbox.claim("relay-c", 10, long).await.expect("claim").events,
        vec![recorded[1].clone()],
        "a released event is taken at once"
    );

    outbox.mark_published(&[recorded[0].id, recorded[1].id]).await.expect("mark");
    let short = outbox.claim("relay-b", 10, Duration::from_millis(1)).await.expect("claim").events;
    assert_eq!(short, recorded[2..].to_vec());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(outbox.claim("relay-c", 10, long).await.expect("claim").events, recorded[2..].to_vec(), "a hold that ended is taken over");
    outbox.mark_published(&[recorded[2].id, recorded[3].id]).await.expect("mark");
    assert!(outbox.pending(10).await.expect("pending").is_empty());
}

/// Every dead letter, across pages of `limit` entries.
async fn all_dead_letters(outbox: &dyn Outbox, limit: u32) -> Vec<im_domain::events::DeadLetter> {
    let mut all = Vec::new();
    let mut page = PageRequest::first(limit);
    loop {
        let found = outbox.dead_letters(&page).await.expect("dead letters");
        all.extend(found.items);
        match found.continuation {
            Some(token) => page = PageRequest { limit, continuation: Some(token) },
            None => return all,
        }
    }
}

/// An entry this version cannot read, or one whose tries keep failing, becomes a dead letter
/// after `max_attempts` failures: it no longer blocks, is listed with its reason, and goes back
/// to its place when requeued. `insert_unreadable` records an entry of `tenant` the store
/// cannot read (as a damaged write or a newer version would) and answers its event id.
/// (Run it alone against its outbox: it drains the outbox first.)
pub async fn failed_entries_become_dead_letters(
    repo: &dyn IntegrationRepository,
    outbox: &dyn Outbox,
    insert_unreadable: impl AsyncFnOnce(&TenantId) -> uuid::Uuid,
) {
    use std::time::Duration;
    drain(outbox).await;
    let tenant = fresh_tenant();
    let mut recorded = Vec::new();
    for n in 0..2 {
        let item = integration(&tenant, "github");
        let created = event(&tenant, EventType::IntegrationCreated, &format!("{}-{n}", item.id));
        repo.create(&item, std::slice::from_ref(&created)).await.expect("create");
        recorded.push(created);
    }
    let poison = insert_unreadable(&tenant).await;
    let long = Duration::from_secs(60);

    let claimed = outbox.claim("relay-a", 10, long).await.expect("an unreadable entry does not fail the claim");
    assert_eq!(claimed.events, recorded, "readable events are handed out");
    assert_eq!(claimed.unreadable.iter().map(|u| u.id).collect::<Vec<_>>(), vec![poison], "the unreadable entry is reported");
    assert_eq!(outbox.pending(10).await.expect("pending"), recorded, "pending skips what it cannot read");

    assert!(!outbox.record_failure(poison, "cannot be read", 2).await.expect("failure"), "one failure of two");
    assert_eq!(outbox.stats().await.expect("stats").dead_letters, 0);
    assert!(outbox.record_failure(poison, "cannot be read", 2).await.expect("failure"), "the second failure sets it aside");
    assert!(!outbox.record_failure(poison, "cannot be read", 2).await.expect("failure"), "a dead letter is counted once");
    assert!(!outbox.record_failure(uuid::Uuid::new_v4(), "x", 1).await.expect("failure"), "unknown ids are ignored");
    assert!(outbox.record_failure(recorded[0].id, "the publisher refused it", 1).await.expect("failure"));

    let stats = outbox.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead_letters), (1, 2));
    assert_eq!(outbox.pending(10).await.expect("pending"), recorded[1..].to_vec(), "dead letters are not pending");
    let again = outbox.claim("relay-a", 10, long).await.expect("claim");
    assert_eq!((again.events, again.unreadable), (recorded[1..].to_vec(), vec![]), "dead letters are not handed out");

    let mut dead = all_dead_letters(outbox, 1).await;
    dead.sort_by_key(|d| d.id);
    let mut expected = vec![poison, recorded[0].id];
    expected.sort();
    assert_eq!(dead.iter().map(|d| d.id).collect::<Vec<_>>(), expected, "each dead letter once across pages");
    let refused = dead.iter().find(|d| d.id == recorded[0].id).expect("listed");
    assert_eq!(refused.event_type.as_deref(), Some("integration.created"));
    assert_eq!(refused.tenant_id.as_deref(), Some(tenant.as_str()));
    assert_eq!((refused.attempts, refused.last_error.as_str()), (1, "the publisher refused it"));
    assert!(refused.dead_at >= refused.recorded_at);
    let unreadable = dead.iter().find(|d| d.id == poison).expect("listed");
    assert_eq!((unreadable.attempts, unreadable.last_error.as_str()), (2, "cannot be read"));
    let forged = PageRequest { limit: 10, continuation: Some("forged".into()) };
    assert!(matches!(outbox.dead_letters(&forged).await, Err(DomainError::Validation(_))), "a forged token is refused");

    outbox.requeue(recorded[0].id).await.expect("requeue");
    assert!(matches!(outbox.requeue(recorded[0].id).await, Err(DomainError::NotFound { .. })), "a second requeue finds no dead letter");
    assert!(matches!(outbox.requeue(recorded[1].id).await, Err(DomainError::NotFound { .. })), "a pending event is no dead letter");
    assert!(matches!(outbox.requeue(uuid::Uuid::new_v4()).await, Err(DomainError::NotFound { .. })));
    assert_eq!(outbox.pending(10).await.expect("pending"), recorded, "a requeued event is back in its place");
    assert_eq!(outbox.claim("relay-b", 10, long).await.expect("claim").events, recorded[..1].to_vec(), "and free to claim");
    assert!(!outbox.record_failure(recorded[0].id, "again", 2).await.expect("failure"), "its count starts again");
    let stats = outbox.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead_letters), (2, 1));

    outbox.mark_published(&[recorded[0].id, recorded[1].id, poison]).await.expect("mark, dead letters included");
    let stats = outbox.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.dead_letters), (0, 0));
}
