//! Contracts of [`IntegrationRepository`].

use std::collections::HashSet;

use im_domain::integration::{Integration, IntegrationFilter, IntegrationStatus};
use im_domain::ports::IntegrationRepository;
use im_domain::provider::ProviderId;
use im_domain::{DomainError, ETag, IntegrationId, JsonText, PageRequest, TenantId};
use serde_json::json;

use crate::{fresh_tenant, timestamp, user};

pub fn integration(tenant: &TenantId, provider: &str) -> Integration {
    Integration {
        id: IntegrationId(uuid::Uuid::now_v7()),
        tenant_id: tenant.clone(),
        provider_id: ProviderId::new(provider).expect("valid provider id"),
        name: "Conformance integration".into(),
        description: "made by the conformance suite".into(),
        status: IntegrationStatus::Active,
        config: json!({"organization": "acme", "nested": {"list": [1, 2, 3]}}).as_object().cloned().unwrap_or_default(),
        custom_definition: None,
        // Round-tripped by every store: the app's id and the reference of its secret.
        oauth2_app: Some(im_domain::integration::IntegrationOAuth2App {
            client_id: "conformance-app".into(),
            client_secret_hint: Some("wxyz".into()),
            client_secret: im_domain::secrets::SecretRef {
                secret_name: im_domain::secrets::SecretName::new(tenant, "oauth2-app", "conformance"),
                version: "3".into(),
            },
        }),
        created_at: timestamp(),
        updated_at: timestamp(),
        created_by: user(),
        updated_by: user(),
    }
}

/// Create, read back equal, replace with the current token, delete, then not found.
pub async fn crud(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    let mut item = integration(&tenant, "github");
    let etag = repo.create(&item, &[]).await.expect("create");
    let read = repo.get(&tenant, item.id).await.expect("get after create");
    assert_eq!(read.value, item, "a read returns what was written");
    assert_eq!(read.etag, etag, "a read returns the token of the write");

    item.name = "Renamed".into();
    item.status = IntegrationStatus::Inactive;
    let etag2 = repo.replace(&item, Some(etag.clone()), &[]).await.expect("replace with current token");
    assert_ne!(etag2, etag, "every write issues a new token");
    assert_eq!(repo.get(&tenant, item.id).await.expect("get after replace").value, item);

    repo.delete(&tenant, item.id, Some(etag2), &[]).await.expect("delete with current token");
    assert!(matches!(repo.get(&tenant, item.id).await, Err(DomainError::NotFound { .. })), "deleted is not found");
    assert!(matches!(repo.delete(&tenant, item.id, None, &[]).await, Err(DomainError::NotFound { .. })), "deleting twice is not found");
    assert!(matches!(repo.replace(&item, None, &[]).await, Err(DomainError::NotFound { .. })), "replacing a deleted item is not found");
}

pub async fn duplicate_id_conflicts(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    let item = integration(&tenant, "github");
    repo.create(&item, &[]).await.expect("create");
    let mut again = item.clone();
    again.name = "Other".into();
    assert!(matches!(repo.create(&again, &[]).await, Err(DomainError::Conflict(_))), "a duplicate id is a conflict");
    assert_eq!(repo.get(&tenant, item.id).await.expect("get").value.name, item.name, "a refused create writes nothing");
}

/// `create_encoded` writes the integration as `create` does (its text is the integration's own
/// JSON text, read back as it was given), and a duplicate id is a conflict.
pub async fn creates_from_its_text(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    let item = integration(&tenant, "github");
    let text = JsonText::encode(&item).expect("encode");
    let etag = repo.create_encoded(&item, &text, &None, &[]).await.expect("create from its text");
    let read = repo.get(&tenant, item.id).await.expect("get after create");
    assert_eq!((read.value, read.etag), (item.clone(), etag), "a read returns what was written");
    assert_eq!(repo.get_json(&tenant, item.id).await.expect("get_json").value.as_str(), text.as_str());
    let mut again = item.clone();
    again.name = "Other".into();
    let other = JsonText::encode(&again).expect("encode");
    assert!(matches!(repo.create_encoded(&again, &other, &None, &[]).await, Err(DomainError::Conflict(_))), "a duplicate id is a conflict");
    assert_eq!(repo.get(&tenant, item.id).await.expect("get").value.name, item.name, "a refused create writes nothing");
}

pub async fn stale_etag_is_refused(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    let mut item = integration(&tenant, "github");
    let first = repo.create(&item, &[]).await.expect("create");
    item.name = "Second".into();
    repo.replace(&item, Some(first.clone()), &[]).await.expect("replace");
    item.name = "Third".into();
    assert!(
        matches!(repo.replace(&item, Some(first.clone()), &[]).await, Err(DomainError::PreconditionFailed)),
        "stale replace is refused"
    );
    assert!(
        matches!(repo.replace(&item, Some(ETag::new("no-such-token")), &[]).await, Err(DomainError::PreconditionFailed)),
        "unknown token is refused"
    );
    assert!(
        matches!(repo.delete(&tenant, item.id, Some(first), &[]).await, Err(DomainError::PreconditionFailed)),
        "stale delete is refused"
    );
    assert_eq!(repo.get(&tenant, item.id).await.expect("still there").value.name, "Second", "refused writes change nothing");
}

pub async fn tenants_are_isolated(repo: &dyn IntegrationRepository) {
    let (a, b) = (fresh_tenant(), fresh_tenant());
    let item = integration(&a, "github");
    repo.create(&item, &[]).await.expect("create in tenant A");
    assert!(matches!(repo.get(&b, item.id).await, Err(DomainError::NotFound { .. })), "tenant B cannot read A's item");
    assert!(matches!(repo.delete(&b, item.id, None, &[]).await, Err(DomainError::NotFound { .. })), "tenant B cannot delete A's item");
    let mut forged = item.clone();
    forged.tenant_id = b.clone();
    assert!(matches!(repo.replace(&forged, None, &[]).await, Err(DomainError::NotFound { .. })), "tenant B cannot replace A's item");
    let page = repo.list(&b, &IntegrationFilter::default(), &PageRequest::first(200)).await.expect("list B");
    assert!(page.items.is_empty(), "tenant B's listing holds none of A's items");
    assert!(repo.get(&a, item.id).await.is_ok(), "A's item is untouched");
}

pub async fn pages_cover_everything_once(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    let mut created = Vec::new();
    for _ in 0..7 {
        let item = integration(&tenant, "github");
        repo.create(&item, &[]).await.expect("create");
        created.push(item.id);
    }
    let mut seen = Vec::new();
    let mut page = PageRequest::first(3);
    let mut pages = 0;
    loop {
        let result = repo.list(&tenant, &IntegrationFilter::default(), &page).await.expect("list page");
        assert!(result.items.len() <= 3, "a page holds at most `limit` items");
        seen.extend(result.items.iter().map(|s| s.value.id));
        pages += 1;
        match result.continuation {
            Some(token) => page = PageRequest { limit: 3, continuation: Some(token) },
            None => break,
        }
        assert!(pages < 10, "paging terminates");
    }
    assert_eq!(pages, 3, "7 items in pages of 3 take 3 pages");
    assert_eq!(seen, created, "pages return every item once, oldest first");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 7);
}

pub async fn filters(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    let github = integration(&tenant, "github");
    let mut jira = integration(&tenant, "jira");
    jira.status = IntegrationStatus::Inactive;
    repo.create(&github, &[]).await.expect("create");
    repo.create(&jira, &[]).await.expect("create");
    let by_provider = IntegrationFilter { provider_id: Some(ProviderId::new("jira").unwrap()), status: None };
    let page = repo.list(&tenant, &by_provider, &PageRequest::first(50)).await.expect("list");
    assert_eq!(page.items.iter().map(|s| s.value.id).collect::<Vec<_>>(), vec![jira.id], "provider filter");
    let by_status = IntegrationFilter { provider_id: None, status: Some(IntegrationStatus::Active) };
    let page = repo.list(&tenant, &by_status, &PageRequest::first(50)).await.expect("list");
    assert_eq!(page.items.iter().map(|s| s.value.id).collect::<Vec<_>>(), vec![github.id], "status filter");
    let both = IntegrationFilter { provider_id: Some(ProviderId::new("jira").unwrap()), status: Some(IntegrationStatus::Active) };
    assert!(repo.list(&tenant, &both, &PageRequest::first(50)).await.expect("list").items.is_empty(), "filters combine");
}

pub async fn foreign_continuation_token_is_refused(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    let page = PageRequest { limit: 10, continuation: Some("this-was-never-issued".into()) };
    match repo.list(&tenant, &IntegrationFilter::default(), &page).await {
        Err(DomainError::Validation(v)) => {
            assert_eq!(v[0].field, "continuationToken");
            assert!(v[0].kind.is_structural(), "an unreadable token is a malformed request (400), got {:?}", v[0].kind);
        }
        other => panic!("a foreign continuation token must be a validation error, got {other:?}"),
    }
}

/// The JSON texts are the encodings of what `get` and `list` return: same items, order, tokens,
/// continuation and errors.
pub async fn json_texts_are_the_encoding(repo: &dyn IntegrationRepository) {
    let tenant = fresh_tenant();
    for _ in 0..3 {
        repo.create(&integration(&tenant, "github"), &[]).await.expect("create");
    }
    let mut page = PageRequest::first(2);
    loop {
        let values = repo.list(&tenant, &IntegrationFilter::default(), &page).await.expect("list");
        let texts = repo.list_json(&tenant, &IntegrationFilter::default(), &page).await.expect("list_json");
        assert_eq!(texts.continuation, values.continuation, "the same continuation");
        assert_eq!(texts.items.len(), values.items.len(), "the same page");
        for (text, value) in texts.items.iter().zip(&values.items) {
            assert_eq!(text, JsonText::encode(&value.value).expect("encode").as_str(), "a listed text is the encoding");
            let one = repo.get_json(&tenant, value.value.id).await.expect("get_json");
            assert_eq!(one.value.as_str(), text, "a read text is the encoding");
            assert_eq!(one.etag, value.etag, "a read text carries its token");
        }
        match texts.continuation {
            Some(token) => page = PageRequest { limit: 2, continuation: Some(token) },
            None => break,
        }
    }
    let other = fresh_tenant();
    let id = repo.list(&tenant, &IntegrationFilter::default(), &PageRequest::first(1)).await.expect("list").items[0].value.id;
    assert!(matches!(repo.get_json(&other, id).await, Err(DomainError::NotFound { .. })), "another tenant's text is not found");
    let foreign = PageRequest { limit: 10, continuation: Some("this-was-never-issued".into()) };
    assert!(matches!(repo.list_json(&tenant, &IntegrationFilter::default(), &foreign).await, Err(DomainError::Validation(_))));
}

/// A store that checks the provider's version in the write (`checks_provider_in_write`)
/// creates only while the provider is at that version: a stale or deleted provider is
/// `PreconditionFailed` and nothing is written.
pub async fn creates_for_a_provider_version(repo: &dyn IntegrationRepository, providers: &dyn im_domain::ports::ProviderRepository) {
    if !repo.checks_provider_in_write() {
        return;
    }
    let provider_id = format!("versioned-{}", uuid::Uuid::now_v7().simple());
    let category = format!("cat-{}", uuid::Uuid::now_v7().simple());
    let provider = crate::providers::provider(&provider_id, &category, im_domain::provider::AuthMode::Bearer);
    let first = providers.create(&provider).await.expect("create provider");
    let second = providers.replace(&provider, Some(first.clone())).await.expect("replace provider");
    let tenant = fresh_tenant();

    let stale = integration(&tenant, &provider_id);
    let err = repo.create_for_provider(&stale, &first, &[]).await.expect_err("a stale provider version is refused");
    assert!(matches!(err, DomainError::PreconditionFailed), "{err:?}");
    assert!(matches!(repo.get(&tenant, stale.id).await, Err(DomainError::NotFound { .. })), "nothing written");

    let encoded = JsonText::encode(&stale).expect("encode");
    let err = repo.create_encoded(&stale, &encoded, &Some(first.clone()), &[]).await.expect_err("a stale provider version is refused");
    assert!(matches!(err, DomainError::PreconditionFailed), "{err:?}");
    assert!(matches!(repo.get(&tenant, stale.id).await, Err(DomainError::NotFound { .. })), "nothing written");

    let current = integration(&tenant, &provider_id);
    repo.create_for_provider(&current, &second, &[]).await.expect("the current provider version creates");
    assert_eq!(repo.get(&tenant, current.id).await.expect("written").value, current);
    let from_text = integration(&tenant, &provider_id);
    let encoded = JsonText::encode(&from_text).expect("encode");
    repo.create_encoded(&from_text, &encoded, &Some(second.clone()), &[]).await.expect("the current provider version creates");
    assert_eq!(repo.get(&tenant, from_text.id).await.expect("written").value, from_text);

    providers.delete(&provider.spec.id, None).await.expect("delete provider");
    let orphan = integration(&tenant, &provider_id);
    let err = repo.create_for_provider(&orphan, &second, &[]).await.expect_err("a deleted provider is refused");
    assert!(matches!(err, DomainError::PreconditionFailed), "{err:?}");
    assert!(matches!(repo.get(&tenant, orphan.id).await, Err(DomainError::NotFound { .. })), "nothing written");
}
