//! [`ProviderRepository`] on the documents table: container `integration_providers`,
//! partitioned by category, ids unique across categories.

use async_trait::async_trait;
use im_domain::ports::ProviderRepository;
use im_domain::provider::{Provider, ProviderFilter, ProviderId, SeedReport};
use im_domain::{DomainError, ETag, Page, PageRequest, Stored};
use rusqlite::{OptionalExtension, params};

use crate::containers::PROVIDERS;
use crate::db::map_sqlite;
use crate::documents::{Documents, Query, find_provider, insert, new_etag};
use crate::support::{decode, encode};

const RESOURCE: &str = "provider";

pub(crate) struct SqliteProviders {
    docs: Documents,
}

impl SqliteProviders {
    pub(crate) fn new(docs: Documents) -> Self {
        Self { docs }
    }

    async fn current_category(&self, id: &ProviderId) -> Result<String, DomainError> {
        match self.docs.find_provider(id.to_string()).await? {
            Some(doc) => Ok(doc.pk),
            None => Err(DomainError::not_found(RESOURCE, id)),
        }
    }
}

#[async_trait]
impl ProviderRepository for SqliteProviders {
    #[tracing::instrument(skip_all, name = "providers.create", fields(provider = %provider.spec.id))]
    async fn create(&self, provider: &Provider) -> Result<ETag, DomainError> {
        let body = encode(provider)?;
        let (pk, id) = (provider.spec.category.to_string(), provider.spec.id.to_string());
        // One transaction: the id check across categories and the insert cannot interleave
        // with another writer.
        self.docs
            .transaction(move |tx, now| {
                if find_provider(tx, &id, now).map_err(map_sqlite)?.is_some() {
                    return Err(DomainError::Conflict(format!("a provider with id '{id}' already exists")));
                }
                insert(tx, PROVIDERS, &pk, &id, &body, None, None, now, new_etag())
            })
            .await
    }

    #[tracing::instrument(skip_all, name = "providers.get", fields(provider = %id))]
    async fn get(&self, id: &ProviderId) -> Result<Stored<Provider>, DomainError> {
        match self.docs.find_provider(id.to_string()).await? {
            Some(doc) => decode(doc),
            None => Err(DomainError::not_found(RESOURCE, id)),
        }
    }

    #[tracing::instrument(skip_all, name = "providers.etag", fields(provider = %id))]
    async fn etag(&self, id: &ProviderId) -> Result<ETag, DomainError> {
        self.docs.provider_etag(id.to_string()).await?.ok_or_else(|| DomainError::not_found(RESOURCE, id))
    }

    #[tracing::instrument(skip_all, name = "providers.list")]
    async fn list(&self, filter: &ProviderFilter, page: &PageRequest) -> Result<Page<Stored<Provider>>, DomainError> {
        let filters = Vec::new();
        let contains = filter.auth_mode.map(|mode| ("$.authModes", mode.as_str().to_owned())).into_iter().collect();
        let search = filter.query.clone().map(|q| (vec!["$.id", "$.name", "$.description"], q));
        let query = Query {
            container: PROVIDERS,
            pk: filter.category.as_ref().map(ToString::to_string),
            filters,
            search,
            contains,
            page: page.clone(),
        };
        let (docs, continuation) = self.docs.query(query).await?;
        let items = docs.into_iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        Ok(Page { items, continuation })
    }

    #[tracing::instrument(skip_all, name = "providers.replace", fields(provider = %provider.spec.id))]
    async fn replace(&self, provider: &Provider, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let body = encode(provider)?;
        let current = self.current_category(&provider.spec.id).await?;
        self.docs
            .replace(
                PROVIDERS,
                RESOURCE,
                current,
                provider.spec.category.to_string(),
                provider.spec.id.to_string(),
                body,
                if_match,
                None,
                &[],
            )
            .await
    }

    #[tracing::instrument(skip_all, name = "providers.delete", fields(provider = %id))]
    async fn delete(&self, id: &ProviderId, if_match: Option<ETag>) -> Result<(), DomainError> {
        let current = self.current_category(id).await?;
        self.docs.delete(PROVIDERS, RESOURCE, current, id.to_string(), if_match, &[]).await
    }

    #[tracing::instrument(skip_all, name = "providers.seed", fields(count = providers.len()))]
    async fn seed(&self, providers: &[Provider]) -> Result<SeedReport, DomainError> {
        let mut docs = Vec::with_capacity(providers.len());
        for provider in providers {
            docs.push((provider.spec.category.to_string(), provider.spec.id.to_string(), encode(provider)?));
        }
        self.docs
            .transaction(move |tx, now| {
                let mut report = SeedReport::default();
                for (pk, id, body) in docs {
                    let seeded: Option<i64> = tx
                        .query_row("SELECT seeded_at FROM catalog_seed WHERE provider_id = ?1", [&id], |r| r.get(0))
                        .optional()
                        .map_err(map_sqlite)?;
                    if seeded.is_some() {
                        report.skipped += 1;
                        continue;
                    }
                    tx.execute("INSERT INTO catalog_seed (provider_id, seeded_at) VALUES (?1, ?2)", params![id, now])
                        .map_err(map_sqlite)?;
                    // An administrator may have created the id before it was ever seeded: keep theirs.
                    if find_provider(tx, &id, now).map_err(map_sqlite)?.is_some() {
                        report.skipped += 1;
                    } else {
                        insert(tx, PROVIDERS, &pk, &id, &body, None, None, now, new_etag())?;
                        report.inserted += 1;
                    }
                }
                Ok(report)
            })
            .await
    }
}
