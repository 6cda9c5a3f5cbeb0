//! Contracts of [`IdempotencyRepository`], and of [`IdempotencyService`] on it.

use std::sync::Arc;
use std::time::Duration;

use im_domain::idempotency::{Claim, IdempotencyRecord, IdempotencyRepository, IdempotencyService, SavedResponse};
use im_domain::{DomainError, ETag, SystemClock};

use crate::fresh_tenant;

const TTL: Duration = Duration::from_secs(3600);

/// Create, conflicts, stale tokens, tenant isolation, delete.
pub async fn contract(repo: &dyn IdempotencyRepository) {
    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let key = "a".repeat(64);
    let mut record = IdempotencyRecord {
        tenant_id: tenant.clone(),
        key: key.clone(),
        fingerprint: "f1".into(),
        locked_until: Some(time::OffsetDateTime::now_utc().replace_nanosecond(0).expect("whole seconds")),
        response: None,
    };
    assert!(repo.get(&tenant, &key).await.expect("get").is_none(), "absent");
    let etag = repo.create(&record, TTL).await.expect("create");
    assert!(matches!(repo.create(&record, TTL).await, Err(DomainError::Conflict(_))), "a live key conflicts");
    let read = repo.get(&tenant, &key).await.expect("get").expect("present");
    assert_eq!((&read.value, &read.etag), (&record, &etag), "reads back what was written");
    assert!(repo.get(&other, &key).await.expect("get").is_none(), "another tenant does not see it");
    let mut theirs = record.clone();
    theirs.tenant_id = other.clone();
    repo.create(&theirs, TTL).await.expect("another tenant has keys of its own");

    record.locked_until = None;
    record.response = Some(SavedResponse {
        status: 201,
        headers: vec![("location".into(), "/api/v1/x".into())],
        body: r#"{"id":"x","name":"é"}"#.into(),
    });
    let etag2 = repo.replace(&record, &etag, TTL).await.expect("replace");
    assert!(matches!(repo.replace(&record, &etag, TTL).await, Err(DomainError::PreconditionFailed)), "stale token");
    assert_eq!(repo.get(&tenant, &key).await.expect("get").expect("present").value, record);
    assert!(matches!(repo.delete(&tenant, &key, &ETag::new("nope")).await, Err(DomainError::PreconditionFailed)));
    repo.delete(&tenant, &key, &etag2).await.expect("delete");
    assert!(repo.get(&tenant, &key).await.expect("get").is_none(), "deleted");
    assert!(matches!(repo.delete(&tenant, &key, &etag2).await, Err(DomainError::NotFound { .. })));
    assert!(matches!(repo.replace(&record, &etag2, TTL).await, Err(DomainError::NotFound { .. } | DomainError::PreconditionFailed)));
    assert!(repo.get(&other, &key).await.expect("get").is_some(), "the other tenant's key is untouched");
}

/// The service on the repository: the first claim runs, a repetition replays, another request
/// with the key is a mismatch, a concurrent one is in progress, a released key runs again.
pub async fn service(repo: Arc<dyn IdempotencyRepository>) {
    let service = IdempotencyService::new(repo, Arc::new(SystemClock));
    let tenant = fresh_tenant();
    let fingerprint = IdempotencyService::fingerprint("POST", "/api/v1/things", b"{}");
    let Claim::Acquired(ticket) = service.claim(&tenant, "key-1", fingerprint.clone()).await.expect("claim") else {
        panic!("the first claim runs")
    };
    assert!(matches!(service.claim(&tenant, "key-1", fingerprint.clone()).await.expect("claim"), Claim::InProgress));
    assert!(matches!(service.claim(&tenant, "key-1", "other".into()).await.expect("claim"), Claim::Mismatch));
    assert!(matches!(service.claim(&fresh_tenant(), "key-1", fingerprint.clone()).await.expect("claim"), Claim::Acquired(_)));
    let response = SavedResponse { status: 201, headers: Vec::new(), body: "{}".into() };
    service.complete(ticket, response.clone()).await.expect("complete");
    match service.claim(&tenant, "key-1", fingerprint.clone()).await.expect("claim") {
        Claim::Replay(replayed) => assert_eq!(replayed, response),
        other => panic!("expected a replay, got {other:?}"),
    }
    let Claim::Acquired(ticket) = service.claim(&tenant, "key-2", fingerprint.clone()).await.expect("claim") else { panic!("runs") };
    service.release(ticket).await.expect("release");
    assert!(matches!(service.claim(&tenant, "key-2", fingerprint).await.expect("claim"), Claim::Acquired(_)), "released: runs again");
}
