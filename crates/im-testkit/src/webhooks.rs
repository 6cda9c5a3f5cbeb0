//! Contracts of [`WebhookRepository`].

use std::collections::BTreeMap;

use im_domain::secrets::{SecretName, SecretRef};
use im_domain::webhooks::endpoint::{Webhook, WebhookId, WebhookStatus};
use im_domain::webhooks::ports::WebhookRepository;
use im_domain::{DomainError, ETag, PageRequest, TenantId};

use crate::{fresh_tenant, timestamp, user};

pub fn webhook(tenant: &TenantId) -> Webhook {
    let id = WebhookId(uuid::Uuid::now_v7());
    Webhook {
        id,
        tenant_id: tenant.clone(),
        url: "https://hooks.example.com/im".into(),
        description: "conformance".into(),
        event_types: vec!["integration.*".into()],
        integration_ids: Vec::new(),
        status: WebhookStatus::Enabled,
        disabled_reason: None,
        headers: BTreeMap::from([("x-team".to_owned(), "platform".to_owned())]),
        rate_limit_per_second: Some(10),
        secret: SecretRef { secret_name: SecretName::new(tenant, "webhook", &id.to_string()), version: "1".into() },
        previous_secret: None,
        headers_secret: None,
        failing_since: None,
        consecutive_failures: 0,
        created_at: timestamp(),
        updated_at: timestamp(),
        created_by: user(),
        updated_by: user(),
    }
}

/// CRUD, conflicts, stale tokens, tenant isolation and paging in one pass.
pub async fn contract(repo: &dyn WebhookRepository) {
    let (tenant, other) = (fresh_tenant(), fresh_tenant());
    let mut hook = webhook(&tenant);
    let etag = repo.create(&hook).await.expect("create");
    assert!(matches!(repo.create(&hook).await, Err(DomainError::Conflict(_))), "duplicate id");
    let read = repo.get(&tenant, hook.id).await.expect("get");
    assert_eq!((read.value.clone(), read.etag.clone()), (hook.clone(), etag.clone()), "reads back what was written");
    assert!(matches!(repo.get(&other, hook.id).await, Err(DomainError::NotFound { .. })), "another tenant cannot read it");

    hook.status = WebhookStatus::Disabled;
    hook.disabled_reason = Some("410 Gone".into());
    let etag2 = repo.replace(&hook, Some(etag.clone())).await.expect("replace");
    assert!(matches!(repo.replace(&hook, Some(etag.clone())).await, Err(DomainError::PreconditionFailed)), "stale token");
    assert!(matches!(repo.replace(&hook, Some(ETag::new("nope"))).await, Err(DomainError::PreconditionFailed)));
    assert_eq!(repo.get(&tenant, hook.id).await.expect("get").value.disabled_reason.as_deref(), Some("410 Gone"));

    let mut ids = vec![hook.id];
    for _ in 0..4 {
        let h = webhook(&tenant);
        repo.create(&h).await.expect("create");
        ids.push(h.id);
    }
    let mut seen = Vec::new();
    let mut page = PageRequest::first(2);
    loop {
        let result = repo.list(&tenant, &page).await.expect("list");
        seen.extend(result.items.into_iter().map(|s| s.value.id));
        match result.continuation {
            Some(token) => page = PageRequest { limit: 2, continuation: Some(token) },
            None => break,
        }
    }
    assert_eq!(seen, ids, "every endpoint once, oldest first");
    assert!(repo.list(&other, &PageRequest::first(50)).await.expect("list").items.is_empty(), "tenant isolation");

    assert!(matches!(repo.delete(&tenant, hook.id, Some(etag)).await, Err(DomainError::PreconditionFailed)));
    repo.delete(&tenant, hook.id, Some(etag2)).await.expect("delete");
    assert!(matches!(repo.get(&tenant, hook.id).await, Err(DomainError::NotFound { .. })));
    assert!(matches!(repo.delete(&tenant, hook.id, None).await, Err(DomainError::NotFound { .. })));
}
