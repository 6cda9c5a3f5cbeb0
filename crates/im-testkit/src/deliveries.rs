//! The contract of the [`DeliveryRepository`] port: creates (one by one and per item in one
//! write), conditional replaces, and, for a repository that keeps the delivery queue in its
//! own database, records and jobs written together.

use std::time::Duration;

use im_domain::DomainError;
use im_domain::webhooks::delivery::{Delivery, DeliveryStatus, delivery_id};
use im_domain::webhooks::endpoint::WebhookId;
use im_domain::webhooks::ports::{DeliveryQueue, DeliveryRepository, JobAfter};
use time::OffsetDateTime;

use crate::fresh_tenant;

/// A delivery of a fresh event to a fresh endpoint of `tenant`, due now.
pub fn delivery(tenant: &im_domain::TenantId, status: DeliveryStatus) -> Delivery {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("whole seconds");
    let webhook_id = WebhookId(uuid::Uuid::now_v7());
    let message_id = uuid::Uuid::now_v7().to_string();
    Delivery {
        id: delivery_id(webhook_id, &message_id),
        tenant_id: tenant.clone(),
        webhook_id,
        payload: serde_json::json!({"id": message_id, "type": "integration.created"}).into(),
        message_id,
        event_type: "integration.created".into(),
        status,
        attempts: Vec::new(),
        older_attempts: 0,
        next_attempt_at: (status == DeliveryStatus::Pending).then_some(now),
        lease_until: None,
        created_at: now,
        updated_at: now,
    }
}

/// Every clause that holds for any delivery repository.
pub async fn contract(repo: &dyn DeliveryRepository) {
    create_get_and_conditional_replace(repo).await;
    create_each_creates_every_new_item_and_refuses_existing_ones_alone(repo).await;
    holds_ended_before_lists_the_pending_deliveries_whose_hold_ended(repo).await;
}

/// Across tenants, the pending deliveries whose hold ended before the time asked, the earliest
/// first: not one still held at that time, nor one without a hold, nor a final one. The holds
/// are set in 2001, at a random second of it, so that other data in the store is later.
pub async fn holds_ended_before_lists_the_pending_deliveries_whose_hold_ended(repo: &dyn DeliveryRepository) {
    let spread = i64::from(uuid::Uuid::new_v4().as_u128() as u32 % 30_000_000);
    let base = OffsetDateTime::from_unix_timestamp(978_307_200 + spread).expect("a time in 2001");
    let at = |offset_ms: i64| Some(base + time::Duration::milliseconds(offset_ms));
    let held = |tenant: &im_domain::TenantId, status: DeliveryStatus, until: Option<OffsetDateTime>| {
        let mut d = delivery(tenant, status);
        d.lease_until = until;
        d
    };
    let (one, other) = (fresh_tenant(), fresh_tenant());
    // Ended: a second before, half a second before (a fraction of the same second), and another
    // tenant's ten seconds before.
    let ended = [
        held(&one, DeliveryStatus::Pending, at(-1_000)),
        held(&one, DeliveryStatus::Pending, at(-500)),
        held(&other, DeliveryStatus::Pending, at(-10_000)),
    ];
    let not_listed = [
        held(&one, DeliveryStatus::Pending, at(0)),   // ends at the time asked
        held(&one, DeliveryStatus::Pending, at(300)), // later within its second
        held(&one, DeliveryStatus::Pending, at(60_000)),
        held(&one, DeliveryStatus::Pending, None),
        held(&one, DeliveryStatus::Succeeded, at(-2_000)),
        held(&other, DeliveryStatus::Failed, at(-3_000)),
    ];
    for d in ended.iter().chain(&not_listed) {
        repo.create(d).await.expect("create");
    }
    let before = base + time::Duration::milliseconds(0);

    let listed = repo.holds_ended_before(before, 1000).await.expect("holds_ended_before MUST succeed on a reachable store");

    let ids: Vec<_> = listed.iter().map(|d| d.value.id).collect();
    let ours: Vec<_> = ids.iter().filter(|id| ended.iter().chain(&not_listed).any(|d| d.id == **id)).copied().collect();
    assert_eq!(ours, vec![ended[2].id, ended[0].id, ended[1].id], "the ended holds, earliest first, and nothing else of ours");
    assert!(
        listed.iter().all(|d| d.value.status == DeliveryStatus::Pending && d.value.lease_until.is_some_and(|until| until < before)),
        "only pending deliveries whose hold ended: {listed:?}"
    );
    assert!(listed.windows(2).all(|w| w[0].value.lease_until <= w[1].value.lease_until), "earliest ended first");
    let first = listed.iter().find(|d| d.value.id == ended[2].id).unwrap();
    let stored = repo.get(&other, ended[2].id).await.unwrap();
    assert_eq!((&first.value, &first.etag), (&stored.value, &stored.etag), "listed as stored, with its etag");
    assert!(repo.holds_ended_before(before, 1).await.unwrap().len() <= 1, "at most `limit`");

    // A hold released (the attempt recorded, or the sweep) is no longer listed.
    let mut released = stored.value.clone();
    released.lease_until = None;
    repo.replace(&released, Some(stored.etag), &[]).await.unwrap();
    let again = repo.holds_ended_before(before, 1000).await.unwrap();
    assert!(!again.iter().any(|d| d.value.id == ended[2].id), "a released hold is still listed");
}

pub async fn create_get_and_conditional_replace(repo: &dyn DeliveryRepository) {
    let tenant = fresh_tenant();
    let created = delivery(&tenant, DeliveryStatus::Pending);
    let etag = repo.create(&created).await.expect("create MUST succeed for a new id");
    assert!(matches!(repo.create(&created).await, Err(DomainError::Conflict(_))), "create MUST return Conflict for an existing id");
    let stored = repo.get(&tenant, created.id).await.expect("a created delivery MUST be readable");
    assert_eq!(stored.value, created);
    assert!(
        matches!(repo.get(&fresh_tenant(), created.id).await, Err(DomainError::NotFound { .. })),
        "another tenant's delivery MUST be NotFound"
    );
    let mut changed = created.clone();
    changed.status = DeliveryStatus::Succeeded;
    changed.next_attempt_at = None;
    let newer = repo.replace(&changed, Some(etag.clone()), &[]).await.expect("replace MUST succeed on the current etag");
    assert!(
        matches!(repo.replace(&created, Some(etag), &[]).await, Err(DomainError::PreconditionFailed)),
        "replace MUST return PreconditionFailed on a stale etag"
    );
    let stored = repo.get(&tenant, created.id).await.unwrap();
    assert_eq!((stored.value, stored.etag), (changed.clone(), newer.clone()), "a refused replace MUST write nothing");
    // What an attempt reads: the current version (nothing was handed since the replace).
    let for_attempt = repo.get_for_attempt(&tenant, created.id).await.expect("an attempt MUST read a created delivery");
    assert_eq!((for_attempt.value, for_attempt.etag), (changed, newer), "an attempt MUST read the current version after a write");
    assert!(
        matches!(repo.get_for_attempt(&fresh_tenant(), created.id).await, Err(DomainError::NotFound { .. })),
        "another tenant's delivery MUST be NotFound to an attempt"
    );
    assert!(
        matches!(repo.get_for_attempt(&tenant, uuid::Uuid::now_v7()).await, Err(DomainError::NotFound { .. })),
        "a missing delivery MUST be NotFound to an attempt"
    );
}

pub async fn create_each_creates_every_new_item_and_refuses_existing_ones_alone(repo: &dyn DeliveryRepository) {
    let tenant = fresh_tenant();
    let existing = delivery(&tenant, DeliveryStatus::Pending);
    repo.create(&existing).await.unwrap();
    let mut clash = existing.clone();
    clash.status = DeliveryStatus::Skipped;
    let (first, last) = (delivery(&tenant, DeliveryStatus::Pending), delivery(&tenant, DeliveryStatus::Skipped));

    let outcomes = repo.create_each(&[first.clone(), clash, last.clone()]).await.expect("create_each MUST succeed on a reachable store");

    assert_eq!(outcomes.len(), 3, "create_each MUST answer one outcome per item");
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "new items MUST be created: {outcomes:?}");
    assert!(matches!(outcomes[1], Err(DomainError::Conflict(_))), "an existing id MUST be Conflict for its item: {outcomes:?}");
    for (item, outcome) in [(&first, &outcomes[0]), (&last, &outcomes[2])] {
        let stored = repo.get(&tenant, item.id).await.expect("created by create_each");
        assert_eq!((&stored.value, Some(&stored.etag)), (item, outcome.as_ref().ok()), "stored as given, with the etag answered");
    }
    assert_eq!(repo.get(&tenant, existing.id).await.unwrap().value, existing, "a refused item MUST leave the existing one as it was");
}

/// A repository that keeps no queue refuses the queued writes and writes nothing.
pub async fn without_a_queue_the_queued_writes_are_refused(repo: &dyn DeliveryRepository) {
    assert!(!repo.keeps_queue());
    let tenant = fresh_tenant();
    let item = delivery(&tenant, DeliveryStatus::Pending);
    assert!(matches!(repo.create_each_queued(std::slice::from_ref(&item)).await, Err(DomainError::Unexpected(_))));
    assert!(matches!(repo.get(&tenant, item.id).await, Err(DomainError::NotFound { .. })), "a refused create_each_queued wrote");
    let etag = repo.create(&item).await.unwrap();
    let mut done = item.clone();
    done.status = DeliveryStatus::Succeeded;
    assert!(matches!(repo.replace_queued(&done, Some(etag), &[], JobAfter::Complete).await, Err(DomainError::Unexpected(_))));
    assert_eq!(repo.get(&tenant, item.id).await.unwrap().value, item, "a refused replace_queued wrote");
}

/// Takes every due job (leasing them for a minute): the delivery ids handed out.
async fn due(queue: &dyn DeliveryQueue) -> Vec<uuid::Uuid> {
    let mut ids: Vec<_> =
        queue.take_due(1000, Duration::from_secs(60)).await.expect("take_due").into_iter().map(|j| j.delivery_id).collect();
    ids.sort();
    ids
}

/// A repository that keeps `queue` in its own database (`keeps_queue`): each created pending
/// delivery comes with its job, a skipped or refused one with none; a recorded attempt moves
/// or removes the job with the record, and a stale record changes neither. `queue` MUST be
/// empty and used by nothing else.
pub async fn records_and_jobs_are_written_together(repo: &dyn DeliveryRepository, queue: &dyn DeliveryQueue) {
    assert!(repo.keeps_queue(), "the repository under test keeps the queue");
    let tenant = fresh_tenant();
    let existing = delivery(&tenant, DeliveryStatus::Pending);
    repo.create(&existing).await.unwrap();
    let (pending, skipped) = (delivery(&tenant, DeliveryStatus::Pending), delivery(&tenant, DeliveryStatus::Skipped));

    let outcomes = repo.create_each_queued(&[pending.clone(), existing.clone(), skipped.clone()]).await.expect("create_each_queued");

    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    assert!(matches!(outcomes[1], Err(DomainError::Conflict(_))), "an existing id MUST be Conflict for its item: {outcomes:?}");
    assert_eq!(due(queue).await, vec![pending.id], "only the created pending delivery MUST have a job");
    let etag = outcomes[0].as_ref().expect("created").clone();

    // The attempt of the job just taken (leased) is recorded on a stale etag: nothing changes.
    let mut retry = pending.clone();
    retry.next_attempt_at = Some(OffsetDateTime::now_utc() - time::Duration::seconds(1));
    let stale = im_domain::ETag::new("stale");
    assert!(
        matches!(
            repo.replace_queued(&retry, Some(stale), &[], JobAfter::RetryAt(OffsetDateTime::now_utc())).await,
            Err(DomainError::PreconditionFailed)
        ),
        "replace_queued MUST return PreconditionFailed on a stale etag"
    );
    assert_eq!(repo.get(&tenant, pending.id).await.unwrap().value, pending, "a stale replace_queued MUST NOT write the record");
    assert!(due(queue).await.is_empty(), "a stale replace_queued MUST NOT release or move the job");

    // Recorded with a retry due now: the job is due again, unleased.
    let etag = repo
        .replace_queued(&retry, Some(etag), &[], JobAfter::RetryAt(OffsetDateTime::now_utc() - time::Duration::seconds(1)))
        .await
        .expect("replace_queued MUST succeed on the current etag");
    assert_eq!(repo.get(&tenant, pending.id).await.unwrap().value, retry);
    assert_eq!(due(queue).await, vec![pending.id], "RetryAt MUST make the job due at its time, unleased");

    // Recorded as final: the job is gone.
    let mut done = retry.clone();
    done.status = DeliveryStatus::Succeeded;
    done.next_attempt_at = None;
    repo.replace_queued(&done, Some(etag), &[], JobAfter::Complete).await.expect("replace_queued");
    assert_eq!(repo.get(&tenant, pending.id).await.unwrap().value, done);
    assert!(queue.depth().await.unwrap().is_none_or(|n| n == 0), "Complete MUST remove the job");
    assert_eq!(queue.next_due().await.unwrap(), None, "Complete MUST remove the job");
}
