//! Contracts of [`ProviderRepository`].

use std::collections::BTreeMap;

use im_domain::custom::{HttpMethod, Pagination};
use im_domain::ports::ProviderRepository;
use im_domain::provider::{
    ApiKeyPlacement, AuthMode, Capabilities, Category, Provider, ProviderFilter, ProviderId, ProviderSpec, VerificationRequest,
};
use im_domain::{DomainError, PageRequest};
use serde_json::json;

use crate::timestamp;

/// A provider with a fresh id in a fresh category (so checks never see each other's data),
/// supporting `auth_mode` (and `bearer` too with the authorization code mode).
pub fn provider(id: &str, category: &str, auth_mode: AuthMode) -> Provider {
    let oauth = auth_mode == AuthMode::Oauth2AuthorizationCode;
    let token = auth_mode.is_oauth2();
    let auth_modes = if oauth { vec![auth_mode, AuthMode::Bearer] } else { vec![auth_mode] };
    let api_key = (auth_mode == AuthMode::ApiKey).then(|| ApiKeyPlacement {
        location: im_domain::custom::ApiKeyLocation::Header,
        name: "X-Api-Key".into(),
        prefix: None,
    });
    Provider {
        spec: ProviderSpec {
            id: ProviderId::new(id).expect("valid provider id"),
            name: format!("Provider {id}"),
            category: Category::new(category).expect("valid category"),
            description: "A provider made by the conformance suite".into(),
            auth_modes,
            api_key,
            authorization_url: oauth.then(|| "https://auth.example.com/authorize".into()),
            token_url: token.then(|| "https://auth.example.com/token".into()),
            default_scopes: vec!["read".into()],
            api_base_url: "https://api.example.com".into(),
            docs_url: "https://docs.example.com".into(),
            config_schema: json!({"type": "object", "properties": {"site": {"type": "string"}}, "additionalProperties": false}),
            capabilities: Capabilities { webhooks: true, sync_entities: vec!["ticket".into()] },
            verification: Some(VerificationRequest {
                method: HttpMethod::Post,
                path: "/graphql".into(),
                query: BTreeMap::new(),
                body: Some(json!({"query": "{ viewer { id } }"})),
                expect: None,
            }),
            default_headers: BTreeMap::from([("X-Api-Version".into(), "2".into())]),
            default_query: BTreeMap::new(),
            pagination: Some(Pagination::Offset { offset_param: "startAt".into(), limit_param: "maxResults".into(), page_size: 50 }),
            entities: vec![
                serde_json::from_value(json!({
                    "name": "ticket", "idField": "id", "updatedAtField": "fields.updated",
                    "list": {"method": "GET", "path": "/tickets", "query": {"order": "updated"}, "itemsPath": "values"},
                    "get": {"method": "GET", "path": "/tickets/{id}"}
                }))
                .expect("valid entity"),
            ],
        },
        created_at: timestamp(),
        updated_at: timestamp(),
    }
}

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub async fn crud_and_category_move(repo: &dyn ProviderRepository) {
    let mut item = provider(&fresh("p"), &fresh("cat"), AuthMode::ApiKey);
    let etag = repo.create(&item).await.expect("create");
    let read = repo.get(&item.spec.id).await.expect("get");
    assert_eq!(read.value, item, "a read returns what was written");
    assert_eq!(read.etag, etag);
    assert_eq!(repo.etag(&item.spec.id).await.expect("etag"), etag, "the token of the current version");

    let old_category = item.spec.category.clone();
    item.spec.category = Category::new(fresh("cat")).unwrap();
    item.spec.name = "Moved".into();
    let etag2 = repo.replace(&item, Some(etag.clone())).await.expect("replace into another category");
    let read = repo.get(&item.spec.id).await.expect("get after move");
    assert_eq!(read.value, item, "the moved provider reads back");
    assert_eq!(read.etag, etag2);
    assert_eq!(repo.etag(&item.spec.id).await.expect("etag after move"), etag2, "a write changes the token");
    let old = ProviderFilter { category: Some(old_category), ..Default::default() };
    assert!(repo.list(&old, &PageRequest::first(10)).await.expect("list").items.is_empty(), "nothing is left in the old category");

    assert!(matches!(repo.replace(&item, Some(etag)).await, Err(DomainError::PreconditionFailed)), "stale replace is refused");
    assert!(matches!(repo.delete(&item.spec.id, Some(etag2.clone())).await, Ok(())), "delete with the current token");
    assert!(matches!(repo.get(&item.spec.id).await, Err(DomainError::NotFound { .. })), "deleted is not found");
    assert!(matches!(repo.etag(&item.spec.id).await, Err(DomainError::NotFound { .. })), "a deleted provider has no token");
    assert!(matches!(repo.delete(&item.spec.id, None).await, Err(DomainError::NotFound { .. })));
}

pub async fn ids_are_unique_across_categories(repo: &dyn ProviderRepository) {
    let id = fresh("p");
    repo.create(&provider(&id, &fresh("cat"), AuthMode::ApiKey)).await.expect("create");
    let twin = provider(&id, &fresh("cat"), AuthMode::Basic);
    assert!(matches!(repo.create(&twin).await, Err(DomainError::Conflict(_))), "the same id in another category conflicts");
}

pub async fn list_filters_and_pages(repo: &dyn ProviderRepository) {
    let category = fresh("cat");
    let mut ids = Vec::new();
    for (i, mode) in [
        AuthMode::Oauth2AuthorizationCode,
        AuthMode::ApiKey,
        AuthMode::Oauth2AuthorizationCode,
        AuthMode::Basic,
        AuthMode::Oauth2AuthorizationCode,
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("{}-{i}", fresh("p"));
        let mut p = provider(&id, &category, mode);
        if i == 3 {
            p.spec.description = "Knows the Zebra protocol".into();
        }
        repo.create(&p).await.expect("create");
        ids.push(id);
    }
    ids.sort();
    let in_category = ProviderFilter { category: Some(Category::new(&category).unwrap()), ..Default::default() };
    let mut seen = Vec::new();
    let mut page = PageRequest::first(2);
    loop {
        let result = repo.list(&in_category, &page).await.expect("list");
        seen.extend(result.items.into_iter().map(|s| s.value.spec.id.to_string()));
        match result.continuation {
            Some(token) => page = PageRequest { limit: 2, continuation: Some(token) },
            None => break,
        }
    }
    assert_eq!(seen, ids, "pages cover the category once, ordered by id");

    let oauth = ProviderFilter { auth_mode: Some(AuthMode::Oauth2AuthorizationCode), ..in_category.clone() };
    assert_eq!(repo.list(&oauth, &PageRequest::first(50)).await.expect("list").items.len(), 3, "auth mode filter");
    let bearer = ProviderFilter { auth_mode: Some(AuthMode::Bearer), ..in_category.clone() };
    assert_eq!(
        repo.list(&bearer, &PageRequest::first(50)).await.expect("list").items.len(),
        3,
        "the auth mode filter matches every provider that supports the mode among others"
    );
    let search = ProviderFilter { query: Some("zEBRA".into()), ..in_category.clone() };
    let found = repo.list(&search, &PageRequest::first(50)).await.expect("list").items;
    assert_eq!(found.len(), 1, "search ignores case and looks in the description");
    let cross = ProviderFilter { query: Some(ids[0].clone()), ..Default::default() };
    assert_eq!(repo.list(&cross, &PageRequest::first(50)).await.expect("list").items.len(), 1, "search across categories");
}

pub async fn seed_is_idempotent_and_keeps_edits(repo: &dyn ProviderRepository) {
    let category = fresh("cat");
    let (a, b) = (fresh("seed"), fresh("seed"));
    let seeds = vec![provider(&a, &category, AuthMode::ApiKey), provider(&b, &category, AuthMode::ApiKey)];
    let report = repo.seed(&seeds).await.expect("seed");
    assert_eq!((report.inserted, report.skipped), (2, 0), "first seed inserts");
    let report = repo.seed(&seeds).await.expect("seed again");
    assert_eq!((report.inserted, report.skipped), (0, 2), "second seed inserts nothing");

    let mut edited = repo.get(&ProviderId::new(&a).unwrap()).await.expect("get").value;
    edited.spec.name = "Edited by an admin".into();
    repo.replace(&edited, None).await.expect("admin edit");
    repo.delete(&ProviderId::new(&b).unwrap(), None).await.expect("admin delete");
    repo.seed(&seeds).await.expect("seed after edits");
    assert_eq!(
        repo.get(&ProviderId::new(&a).unwrap()).await.expect("get").value.spec.name,
        "Edited by an admin",
        "seeding never overwrites an edit"
    );
    assert!(
        matches!(repo.get(&ProviderId::new(&b).unwrap()).await, Err(DomainError::NotFound { .. })),
        "seeding never re-creates a deleted provider"
    );
}
