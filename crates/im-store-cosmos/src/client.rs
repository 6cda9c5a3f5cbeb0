//! Connecting, provisioning, and the shared plumbing of the repositories.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_core::credentials::Secret;
use azure_data_cosmos::clients::ContainerClient;
use azure_data_cosmos::feed::ContinuationToken;
use azure_data_cosmos::models::{ContainerProperties, IndexingMode, IndexingPolicy, TimeToLive};
use azure_data_cosmos::options::{
    BinaryEncodingOptions, ConnectionPoolOptions, MaxItemCountHint, OperationOptionsBuilder, QueryOptions, Region,
    ServerCertificateValidation, ThrottlingRetryOptionsBuilder,
};
use azure_data_cosmos::{AccountEndpoint, AccountReference, CosmosClient, CosmosRuntime, FeedScope, Query, RoutingStrategy};
use futures_util::TryStreamExt as _;
use im_domain::common::invalid_continuation;
use im_domain::ports::{DependencyHealth, HealthCheck, IntegrationRepository, Outbox, ProviderRepository};
use im_domain::{DomainError, HumanDuration, PageRequest};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::errors::{map, timed_out};

/// Continuation tokens this store issues: prefix, then a MAC of the SDK's token, then the token.
const TOKEN_PREFIX: &str = "s1.";
const TOKEN_MAC_LEN: usize = 43;

/// A container of the specification: name, partition key path, default TTL in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: &'static str,
    pub partition_key: &'static str,
    pub default_ttl_secs: Option<u32>,
}

/// The seven containers, exactly as the specification names them.
pub const CONTAINERS: [ContainerSpec; 7] = [
    ContainerSpec { name: "integration_providers", partition_key: "/category", default_ttl_secs: None },
    ContainerSpec { name: "integration_integrations", partition_key: "/tenantId", default_ttl_secs: None },
    ContainerSpec { name: "integration_connections", partition_key: "/integrationId", default_ttl_secs: None },
    ContainerSpec { name: "integration_webhooks", partition_key: "/tenantId", default_ttl_secs: None },
    ContainerSpec { name: "integration_webhook_deliveries", partition_key: "/tenantId", default_ttl_secs: Some(604_800) },
    ContainerSpec { name: "integration_sync_tasks", partition_key: "/tenantId", default_ttl_secs: None },
    ContainerSpec { name: "integration_sync_executions", partition_key: "/tenantId", default_ttl_secs: Some(2_592_000) },
];

pub(crate) const PROVIDERS: &str = "integration_providers";
pub(crate) const INTEGRATIONS: &str = "integration_integrations";
pub(crate) const CONNECTIONS: &str = "integration_connections";
pub(crate) const WEBHOOKS: &str = "integration_webhooks";
pub(crate) const DELIVERIES: &str = "integration_webhook_deliveries";
pub(crate) const SYNC_TASKS: &str = "integration_sync_tasks";
pub(crate) const SYNC_EXECUTIONS: &str = "integration_sync_executions";

/// The well-known key of the Cosmos DB emulator (any key works against the test server).
pub const EMULATOR_KEY: &str = "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw==";

/// How to reach the account: the `cosmos_db` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct CosmosSettings {
    /// `https://ACCOUNT.documents.azure.com:443/`
    pub endpoint: String,
    /// The account key (base64): a secret, never logged.
    pub key: SecretString,
    pub database: String,
    /// Client settings an emulator on loopback needs (its self-signed certificate, HTTP/1.1,
    /// text JSON). Production keeps the SDK defaults.
    pub emulator: bool,
    /// Longest wait for one request, retries included.
    pub request_timeout: HumanDuration,
    /// Regions to prefer, most preferred first (empty: the account's default order).
    pub preferred_regions: Vec<String>,
    /// How many times the SDK retries a throttled (429) request, honouring `x-ms-retry-after-ms`,
    /// before the store answers "unavailable".
    pub max_throttle_retries: u32,
    /// Create the database and containers at start when missing (otherwise `migrate` does).
    pub auto_provision: bool,
}

impl CosmosSettings {
    /// What types alone cannot check: every problem, as (key within the section, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        use base64::Engine as _;
        let mut problems = Vec::new();
        if self.endpoint.is_empty() {
            problems.push(("endpoint", "is required when storage.backend is 'cosmos'".to_owned()));
        } else if !self.endpoint.starts_with("https://") || self.endpoint.contains(char::is_whitespace) {
            problems.push(("endpoint", format!("'{}' is not an https:// account endpoint", self.endpoint)));
        }
        let key = self.key.expose_secret();
        if key.is_empty() || base64::engine::general_purpose::STANDARD.decode(key).is_err() {
            problems.push(("key", "is required (the account key, base64) when storage.backend is 'cosmos'".to_owned()));
        }
        let db = &self.database;
        if db.is_empty() || db.len() > 255 || db.contains(['/', '\\', '?', '#']) {
            problems.push(("database", "must be 1 to 255 characters without '/', '\\', '?' or '#'".to_owned()));
        }
        if self.request_timeout.get().as_secs() < 1 {
            problems.push(("request_timeout", "must be at least 1s".to_owned()));
        }
        if self.max_throttle_retries > 20 {
            problems.push(("max_throttle_retries", "must be at most 20".to_owned()));
        }
        problems
    }
}

async fn client(settings: &CosmosSettings) -> anyhow::Result<CosmosClient> {
    let endpoint: AccountEndpoint = settings
        .endpoint
        .parse()
        .map_err(|e| anyhow::anyhow!("cosmos_db.endpoint '{}' is not a valid endpoint: {e}", settings.endpoint))?;
    let account = AccountReference::with_authentication_key(endpoint, Secret::from(settings.key.expose_secret().to_owned()));
    let throttling = OperationOptionsBuilder::new()
        .with_throttling_retry_options(ThrottlingRetryOptionsBuilder::new().with_max_retry_count(settings.max_throttle_retries).build())
        .build();
    let mut builder = CosmosClient::builder().with_default_operation_options(throttling);
    if settings.emulator {
        let pool = ConnectionPoolOptions::builder()
            .with_server_certificate_validation(ServerCertificateValidation::RequiredUnlessEmulator)
            .with_is_http2_allowed(false)
            .build()?;
        let runtime = CosmosRuntime::builder().with_connection_pool(pool).build().await?;
        builder = builder.with_runtime(runtime).with_binary_encoding_options(BinaryEncodingOptions::new().with_enabled(false));
    }
    let routing = if settings.preferred_regions.is_empty() {
        RoutingStrategy::PreferredRegions(Vec::new())
    } else {
        RoutingStrategy::PreferredRegions(settings.preferred_regions.iter().map(|r| Region::from(r.clone())).collect())
    };
    Ok(builder.build(account, routing).await?)
}

/// What [`provision`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    pub created: Vec<String>,
    pub existing: Vec<String>,
}

fn indexing_policy() -> IndexingPolicy {
    // Everything is indexed (filters use providerId, status, authMode, type, recordedAt, and the
    // hold sweep a delivery's leaseUntil; lists order by id) except the large free-form values no
    // query reads.
    let mut policy = IndexingPolicy::default();
    policy.automatic = true;
    policy
        .with_indexing_mode(IndexingMode::Consistent)
        .with_included_path("/*")
        .with_excluded_path("/\"_etag\"/?")
        .with_excluded_path("/config/*")
        .with_excluded_path("/configSchema/*")
        .with_excluded_path("/customDefinition/*")
        .with_excluded_path("/event/data/*")
}

/// Creates the database and the seven containers where missing. Idempotent.
///
/// # Errors
/// When the account cannot be reached or refuses.
pub async fn provision(settings: &CosmosSettings) -> anyhow::Result<ProvisionReport> {
    let client = client(settings).await?;
    let mut report = ProvisionReport::default();
    match client.create_database(&settings.database, None).await {
        Ok(_) => report.created.push(format!("database {}", settings.database)),
        Err(e) if crate::errors::status(&e) == 409 => report.existing.push(format!("database {}", settings.database)),
        Err(e) => anyhow::bail!("cannot create database {}: {e}", settings.database),
    }
    let database = client.database_client(&settings.database);
    for spec in CONTAINERS {
        let ttl = spec.default_ttl_secs.map_or(TimeToLive::Forever, TimeToLive::Seconds);
        let properties =
            ContainerProperties::new(spec.name, spec.partition_key.into()).with_default_ttl(ttl).with_indexing_policy(indexing_policy());
        match database.create_container(properties, None).await {
            Ok(_) => report.created.push(format!("container {} ({}, ttl {:?})", spec.name, spec.partition_key, spec.default_ttl_secs)),
            Err(e) if crate::errors::status(&e) == 409 => report.existing.push(format!("container {}", spec.name)),
            Err(e) => anyhow::bail!("cannot create container {}: {e}", spec.name),
        }
    }
    Ok(report)
}

pub(crate) struct Inner {
    pub(crate) containers: HashMap<&'static str, ContainerClient>,
    pub(crate) timeout: Duration,
    pub(crate) settings: CosmosSettings,
}

/// The Cosmos DB store. Cheap to clone.
#[derive(Clone)]
pub struct CosmosStore {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for CosmosStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CosmosStore").field("settings", &self.inner.settings).finish()
    }
}

impl CosmosStore {
    /// Connects and checks that the database and every container exist.
    ///
    /// # Errors
    /// Naming the missing container (run `integration-manager migrate`, or set
    /// `cosmos_db.auto_provision = true`), or why the account cannot be reached.
    pub async fn connect(settings: CosmosSettings) -> anyhow::Result<Self> {
        let client = client(&settings).await?;
        let database = client.database_client(&settings.database);
        let mut containers = HashMap::new();
        for spec in CONTAINERS {
            match database.container_client(spec.name, None).await {
                Ok(container) => {
                    containers.insert(spec.name, container);
                }
                Err(e) if crate::errors::status(&e) == 404 => anyhow::bail!(
                    "Cosmos DB container '{}' (database '{}') is missing: run `integration-manager migrate` or set cosmos_db.auto_provision = true",
                    spec.name,
                    settings.database
                ),
                Err(e) => anyhow::bail!("cannot open Cosmos DB container '{}': {e}", spec.name),
            }
        }
        let timeout = settings.request_timeout.get();
        Ok(Self { inner: Arc::new(Inner { containers, timeout, settings }) })
    }

    pub fn integrations(&self) -> Arc<dyn IntegrationRepository> {
        Arc::new(crate::integrations::CosmosIntegrations::new(self.clone()))
    }

    pub fn connections(&self) -> Arc<dyn im_domain::connection::ConnectionRepository> {
        Arc::new(crate::connections::CosmosConnections::new(self.clone()))
    }

    pub fn providers(&self) -> Arc<dyn ProviderRepository> {
        Arc::new(crate::providers::CosmosProviders::new(self.clone()))
    }

    pub fn webhooks(&self) -> Arc<dyn im_domain::webhooks::ports::WebhookRepository> {
        Arc::new(crate::webhooks::CosmosWebhooks::new(self.clone()))
    }

    pub fn deliveries(&self) -> Arc<dyn im_domain::webhooks::ports::DeliveryRepository> {
        Arc::new(crate::deliveries::CosmosDeliveries::new(self.clone()))
    }

    pub fn sync_tasks(&self) -> Arc<dyn im_domain::sync::ports::SyncTaskRepository> {
        Arc::new(crate::sync::CosmosSync::new(self.clone()))
    }

    pub fn sync_executions(&self) -> Arc<dyn im_domain::sync::ports::SyncExecutionRepository> {
        Arc::new(crate::sync::CosmosSync::new(self.clone()))
    }

    pub fn sync_states(&self) -> Arc<dyn im_domain::sync::ports::SyncStateRepository> {
        Arc::new(crate::sync::CosmosSync::new(self.clone()))
    }

    /// The durable buffer of audit records waiting for the Logging Service.
    pub fn audit_buffer(&self) -> Arc<dyn im_domain::audit::AuditBuffer> {
        Arc::new(crate::audit::CosmosAuditBuffer::new(self.clone()))
    }

    /// `Idempotency-Key` records, in `integration_webhook_deliveries` with a TTL of their own.
    pub fn idempotency(&self) -> Arc<dyn im_domain::idempotency::IdempotencyRepository> {
        Arc::new(crate::idempotency::CosmosIdempotency::new(self.clone()))
    }

    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(crate::outbox::CosmosOutbox::new(self.clone()))
    }

    /// Writes a raw JSON document (it must carry `id` and the container's partition-key field);
    /// for resources whose repositories build on this store, and for tests of TTL behaviour.
    ///
    /// # Errors
    /// `Conflict` when the id exists in the partition; `Unavailable` when Cosmos cannot be reached.
    pub async fn create_document(&self, container: &'static str, partition: &str, document: &serde_json::Value) -> Result<(), DomainError> {
        let id = document.get("id").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        self.call("a create", self.container(container).create_item(partition.to_owned(), &id, document, None), "document", &id).await?;
        Ok(())
    }

    /// Reads a raw JSON document; `None` when absent (or expired).
    ///
    /// # Errors
    /// `Unavailable` when Cosmos cannot be reached.
    pub async fn read_document(
        &self,
        container: &'static str,
        partition: &str,
        id: &str,
    ) -> Result<Option<serde_json::Value>, DomainError> {
        match self.call("a read", self.container(container).read_item(partition.to_owned(), id, None), "document", id).await {
            Ok(response) => Ok(Some(response.into_model().map_err(|e| DomainError::Unexpected(anyhow::anyhow!("cosmos: {e}")))?)),
            Err(DomainError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn container(&self, name: &'static str) -> &ContainerClient {
        // Every container of CONTAINERS was opened by `connect`.
        &self.inner.containers[name]
    }

    /// Runs an SDK call under the request timeout.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        future: impl Future<Output = azure_data_cosmos::Result<T>>,
        resource: &'static str,
        id: &str,
    ) -> Result<T, DomainError> {
        match tokio::time::timeout(self.inner.timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(map(e, resource, id)),
            Err(_) => Err(timed_out(what)),
        }
    }

    /// One page of a parameterized query. With `partition`, the query stays in that partition.
    /// The SDK's continuation token, signed with the account key (and bound to the container),
    /// so that the service never receives a token this store did not issue: a crafted one is
    /// refused here as a bad request instead of failing in Cosmos DB.
    fn sign_token(&self, container: &str, sdk_token: &str) -> String {
        format!("{TOKEN_PREFIX}{}{sdk_token}", self.token_mac(container, sdk_token))
    }

    /// The SDK token inside a token [`Self::sign_token`] issued, if it is one.
    fn verify_token<'t>(&self, container: &str, token: &'t str) -> Option<&'t str> {
        let rest = token.strip_prefix(TOKEN_PREFIX)?;
        let (mac, sdk_token) = (rest.get(..TOKEN_MAC_LEN)?, rest.get(TOKEN_MAC_LEN..)?);
        let expected = self.token_mac(container, sdk_token);
        let same = mac.len() == expected.len() && mac.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        (same && !sdk_token.is_empty()).then_some(sdk_token)
    }

    fn token_mac(&self, container: &str, sdk_token: &str) -> String {
        let key = Secret::from(self.inner.settings.key.expose_secret().to_owned());
        let mac = azure_core::hmac::hmac_sha256(&format!("{container}\n{sdk_token}"), &key).unwrap_or_default();
        let mut mac: String = mac
            .chars()
            .filter(|c| *c != '=')
            .map(|c| {
                if c == '+' {
                    '-'
                } else if c == '/' {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        mac.truncate(TOKEN_MAC_LEN);
        format!("{mac:A<TOKEN_MAC_LEN$}")
    }

    pub(crate) async fn query_page<T: DeserializeOwned + Send + 'static>(
        &self,
        container: &'static str,
        query: Query,
        partition: Option<String>,
        page: &PageRequest,
    ) -> Result<(Vec<T>, Option<String>), DomainError> {
        let limit = NonZeroU32::new(page.limit).unwrap_or(NonZeroU32::MIN);
        let mut options = QueryOptions::default().with_max_item_count(MaxItemCountHint::Limit(limit));
        if let Some(token) = &page.continuation {
            let sdk_token = self.verify_token(container, token).ok_or_else(invalid_continuation)?;
            options = options.with_continuation_token(ContinuationToken::from_string(sdk_token.to_owned()));
        }
        let single_partition = partition.is_some();
        let scope = match partition {
            Some(pk) => FeedScope::partition(pk),
            None => FeedScope::full_container(),
        };
        let had_token = page.continuation.is_some();
        let fetch = async {
            let mut pages = self.container(container).query_items::<T>(query, scope, Some(options)).await?.into_pages();
            let Some(first) = pages.try_next().await? else { return Ok((Vec::new(), None)) };
            let more = if single_partition { first.headers().continuation().is_some() } else { first.items().len() as u32 >= page.limit };
            let items = first.into_items();
            let token = if more { Some(self.sign_token(container, pages.to_continuation_token()?.as_str())) } else { None };
            Ok::<_, azure_data_cosmos::CosmosError>((items, token))
        };
        match tokio::time::timeout(self.inner.timeout, fetch).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) if had_token && crate::errors::status(&e) < 500 && crate::errors::status(&e) != 429 => Err(invalid_continuation()),
            Ok(Err(e)) => Err(map(e, "query", container)),
            Err(_) => Err(timed_out("a query")),
        }
    }
}

#[async_trait]
impl HealthCheck for CosmosStore {
    fn describe(&self) -> (&'static str, bool) {
        ("store", true)
    }

    #[tracing::instrument(skip_all, name = "store.check")]
    async fn check(&self) -> DependencyHealth {
        let started = Instant::now();
        let query = Query::from("SELECT VALUE COUNT(1) FROM c WHERE c.type = 'seed'");
        let probe =
            self.query_page::<serde_json::Value>(PROVIDERS, query, Some(crate::docs::SEED_PARTITION.into()), &PageRequest::first(1)).await;
        let place = format!("cosmos {} database {}", self.inner.settings.endpoint, self.inner.settings.database);
        let (ready, detail, diagnostic) = match probe {
            Ok(_) => (true, format!("cosmos: {} ms", started.elapsed().as_millis()), place),
            Err(e) => (false, "cosmos: not reachable".to_owned(), format!("{place}: {e}")),
        };
        DependencyHealth { name: "store".into(), ready, critical: true, detail, diagnostic }
    }
}
