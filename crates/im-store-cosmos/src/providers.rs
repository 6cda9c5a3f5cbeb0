//! [`ProviderRepository`] on `integration_providers`, partitioned by category. Ids are unique
//! across categories; reads by id are cross-partition queries.

use async_trait::async_trait;
use azure_data_cosmos::Query;
use azure_data_cosmos::options::ItemWriteOptions;
use im_domain::ports::ProviderRepository;
use im_domain::provider::{Provider, ProviderFilter, ProviderId, SeedReport};
use im_domain::{DomainError, ETag, Page, PageRequest, Stored};

use crate::client::{CosmosStore, PROVIDERS};
use crate::docs::{ProviderDoc, SEED_PARTITION, SeedDoc, header_etag, stored_all};
use crate::errors::unexpected;
use crate::support::precondition;

const RESOURCE: &str = "provider";

pub(crate) struct CosmosProviders {
    store: CosmosStore,
}

impl CosmosProviders {
    pub(crate) fn new(store: CosmosStore) -> Self {
        Self { store }
    }

    async fn find(&self, id: &str) -> Result<Option<Stored<Provider>>, DomainError> {
        let query = Query::from("SELECT * FROM c WHERE c.type = @type AND c.id = @id")
            .with_parameter("@type", ProviderDoc::TYPE)
            .and_then(|q| q.with_parameter("@id", id))
            .map_err(unexpected)?;
        let (docs, _) = self.store.query_page::<ProviderDoc>(PROVIDERS, query, None, &PageRequest::first(1)).await?;
        docs.into_iter().next().map(ProviderDoc::stored).transpose()
    }

    async fn insert(&self, provider: &Provider) -> Result<ETag, DomainError> {
        let id = provider.spec.id.to_string();
        let doc = ProviderDoc::new(provider.clone());
        let response = self
            .store
            .call(
                "a create",
                self.store.container(PROVIDERS).create_item(provider.spec.category.to_string(), &id, &doc, None),
                RESOURCE,
                &id,
            )
            .await?;
        header_etag(response.headers().etag())
    }
}

#[async_trait]
impl ProviderRepository for CosmosProviders {
    #[tracing::instrument(skip_all, name = "providers.create", fields(provider = %provider.spec.id))]
    async fn create(&self, provider: &Provider) -> Result<ETag, DomainError> {
        if self.find(provider.spec.id.as_str()).await?.is_some() {
            return Err(DomainError::Conflict(format!("a provider with id '{}' already exists", provider.spec.id)));
        }
        self.insert(provider).await
    }

    #[tracing::instrument(skip_all, name = "providers.get", fields(provider = %id))]
    async fn get(&self, id: &ProviderId) -> Result<Stored<Provider>, DomainError> {
        self.find(id.as_str()).await?.ok_or_else(|| DomainError::not_found(RESOURCE, id))
    }

    #[tracing::instrument(skip_all, name = "providers.list")]
    async fn list(&self, filter: &ProviderFilter, page: &PageRequest) -> Result<Page<Stored<Provider>>, DomainError> {
        let mut text = String::from("SELECT * FROM c WHERE c.type = @type");
        if filter.auth_mode.is_some() {
            text.push_str(" AND ARRAY_CONTAINS(c.authModes, @authMode)");
        }
        if filter.query.is_some() {
            text.push_str(" AND (CONTAINS(LOWER(c.id), @q) OR CONTAINS(LOWER(c.name), @q) OR CONTAINS(LOWER(c.description), @q))");
        }
        text.push_str(" ORDER BY c.id");
        let mut query = Query::from(text).with_parameter("@type", ProviderDoc::TYPE).map_err(unexpected)?;
        if let Some(mode) = filter.auth_mode {
            query = query.with_parameter("@authMode", mode.as_str()).map_err(unexpected)?;
        }
        if let Some(q) = &filter.query {
            query = query.with_parameter("@q", q.to_lowercase()).map_err(unexpected)?;
        }
        let partition = filter.category.as_ref().map(ToString::to_string);
        let (docs, continuation) = self.store.query_page::<ProviderDoc>(PROVIDERS, query, partition, page).await?;
        Ok(Page { items: stored_all(docs)?, continuation })
    }

    #[tracing::instrument(skip_all, name = "providers.replace", fields(provider = %provider.spec.id))]
    async fn replace(&self, provider: &Provider, if_match: Option<ETag>) -> Result<ETag, DomainError> {
        let id = provider.spec.id.to_string();
        let current = self.get(&provider.spec.id).await?;
        if if_match.as_ref().is_some_and(|m| *m != current.etag) {
            return Err(DomainError::PreconditionFailed);
        }
        let token = if_match.unwrap_or(current.etag.clone());
        let doc = ProviderDoc::new(provider.clone());
        let old_category = current.value.spec.category.to_string();
        if old_category == provider.spec.category.as_str() {
            let options = precondition(Some(&token)).map(|p| ItemWriteOptions::default().with_precondition(p));
            let response = self
                .store
                .call("a replace", self.store.container(PROVIDERS).replace_item(old_category, &id, &doc, options), RESOURCE, &id)
                .await?;
            return header_etag(response.headers().etag());
        }
        // A new partition key is a new document: write it, then delete the old one conditionally;
        // if the old one changed meanwhile, take the new one back and report the conflict.
        let etag = self.insert(provider).await?;
        let options = precondition(Some(&token)).map(|p| ItemWriteOptions::default().with_precondition(p));
        if let Err(e) =
            self.store.call("a delete", self.store.container(PROVIDERS).delete_item(old_category, &id, options), RESOURCE, &id).await
        {
            let _ = self
                .store
                .call("a delete", self.store.container(PROVIDERS).delete_item(provider.spec.category.to_string(), &id, None), RESOURCE, &id)
                .await;
            return Err(e);
        }
        Ok(etag)
    }

    #[tracing::instrument(skip_all, name = "providers.delete", fields(provider = %id))]
    async fn delete(&self, id: &ProviderId, if_match: Option<ETag>) -> Result<(), DomainError> {
        let current = self.get(id).await?;
        let options =
            precondition(Some(if_match.as_ref().unwrap_or(&current.etag))).map(|p| ItemWriteOptions::default().with_precondition(p));
        let key = id.to_string();
        self.store
            .call(
                "a delete",
                self.store.container(PROVIDERS).delete_item(current.value.spec.category.to_string(), &key, options),
                RESOURCE,
                &key,
            )
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "providers.seed", fields(count = providers.len()))]
    async fn seed(&self, providers: &[Provider]) -> Result<SeedReport, DomainError> {
        let mut report = SeedReport::default();
        for provider in providers {
            let id = provider.spec.id.to_string();
            let marker = SeedDoc {
                id: SeedDoc::id_for(&id),
                category: SEED_PARTITION.into(),
                kind: SeedDoc::TYPE.into(),
                schema_version: crate::docs::SCHEMA_VERSION,
                provider_id: id.clone(),
                seeded_at: provider.created_at.unix_timestamp(),
            };
            // A marker means "seeded once": never again, whatever an administrator did since.
            let read = self.store.container(PROVIDERS).read_item(SEED_PARTITION, &marker.id, None);
            match self.store.call("a read", read, "seed marker", &marker.id).await {
                Ok(_) => {
                    report.skipped += 1;
                    continue;
                }
                Err(DomainError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            match self.create(provider).await {
                Ok(_) => report.inserted += 1,
                Err(DomainError::Conflict(_)) => report.skipped += 1,
                Err(e) => return Err(e),
            }
            let create = self.store.container(PROVIDERS).create_item(SEED_PARTITION, &marker.id, &marker, None);
            match self.store.call("a create", create, "seed marker", &marker.id).await {
                Ok(_) | Err(DomainError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}
