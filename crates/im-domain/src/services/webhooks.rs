use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::auth::{Caller, Role};
use crate::common::{Clock, ETag, IdGenerator, Page, PageRequest, Stored, TenantId};
use crate::error::DomainError;
use crate::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use crate::webhooks::endpoint::{PreviousSecret, UrlPolicy, Webhook, WebhookId, WebhookSpec, WebhookStatus};
use crate::webhooks::ports::{Entropy, WebhookRepository};
use crate::webhooks::signature::SigningSecret;

use super::read_modify_write;

/// Length of new signing secrets, in bytes (the Standard Webhooks range is 24 to 64).
const SECRET_BYTES: usize = 32;

/// Endpoints a tenant may have unless configured otherwise.
pub const DEFAULT_MAX_ENDPOINTS: usize = 50;

/// Registers and manages a tenant's webhook endpoints and their signing secrets.
#[derive(Clone)]
pub struct WebhookService {
    webhooks: Arc<dyn WebhookRepository>,
    secrets: Arc<dyn SecretStore>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    entropy: Arc<dyn Entropy>,
    policy: UrlPolicy,
    previous_secret_grace: Duration,
    /// Endpoints a tenant may have.
    max_endpoints: usize,
    /// Signing secrets already read, by reference (a reference names one immutable version).
    secret_cache: Arc<std::sync::Mutex<std::collections::HashMap<(String, String), SigningSecret>>>,
}

impl std::fmt::Debug for WebhookService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookService").field("policy", &self.policy).finish_non_exhaustive()
    }
}

/// A stored endpoint, with its signing secret when it was just created or rotated (the only
/// times the secret is ever shown).
#[derive(Debug, Clone)]
pub struct WithSecret {
    pub webhook: Stored<Webhook>,
    pub secret: SigningSecret,
}

impl WebhookService {
    pub fn new(
        webhooks: Arc<dyn WebhookRepository>,
        secrets: Arc<dyn SecretStore>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        entropy: Arc<dyn Entropy>,
        policy: UrlPolicy,
        previous_secret_grace: Duration,
    ) -> Self {
        Self {
            webhooks,
            secrets,
            clock,
            ids,
            entropy,
            policy,
            previous_secret_grace,
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
            secret_cache: Arc::default(),
        }
    }

    /// At most `max` endpoints per tenant (a create beyond is a conflict).
    #[must_use]
    pub fn with_max_endpoints(mut self, max: usize) -> Self {
        self.max_endpoints = max;
        self
    }

    /// Refuses a new endpoint when the tenant has `max_endpoints` already. (Two creations at
    /// the same instant may both pass: the cap bounds growth, it is not a quota to the unit.)
    async fn check_room(&self, tenant: &TenantId) -> Result<(), DomainError> {
        let mut count = 0;
        let mut page = PageRequest::first(200);
        loop {
            let result = self.webhooks.list(tenant, &page).await?;
            count += result.items.len();
            if count >= self.max_endpoints {
                return Err(DomainError::Conflict(format!(
                    "a tenant has at most {} webhook endpoints; delete one before adding another",
                    self.max_endpoints
                )));
            }
            match result.continuation {
                Some(token) => page = PageRequest { limit: 200, continuation: Some(token) },
                None => return Ok(()),
            }
        }
    }

    fn new_secret(&self) -> Result<SigningSecret, DomainError> {
        let mut bytes = vec![0u8; SECRET_BYTES];
        self.entropy.fill(&mut bytes);
        SigningSecret::from_bytes(bytes).map_err(|e| DomainError::Unexpected(anyhow::anyhow!("{e}")))
    }

    async fn store_secret(&self, webhook: &Webhook, secret: &SigningSecret) -> Result<SecretRef, DomainError> {
        let name = SecretName::new(&webhook.tenant_id, "webhook", &webhook.id.to_string());
        let metadata =
            BTreeMap::from([("kind".to_owned(), "webhook-signing-secret".to_owned()), ("webhookId".to_owned(), webhook.id.to_string())]);
        self.secrets.put(&name, &SecretValue(json!({ "secret": secret.expose() })), &metadata).await
    }

    /// # Errors
    /// `Forbidden` without the member role; `Validation` listing every offending field.
    pub async fn create(&self, caller: &Caller, spec: WebhookSpec) -> Result<WithSecret, DomainError> {
        caller.require(Role::Member)?;
        spec.validate(&self.policy)?;
        self.check_room(&caller.tenant_id).await?;
        let now = self.clock.now();
        let secret = self.new_secret()?;
        let mut webhook = Webhook {
            id: WebhookId(self.ids.new_uuid()),
            tenant_id: caller.tenant_id.clone(),
            url: spec.url,
            description: spec.description,
            event_types: spec.event_types,
            integration_ids: spec.integration_ids,
            status: spec.status.unwrap_or(WebhookStatus::Enabled),
            disabled_reason: None,
            headers: spec.headers,
            rate_limit_per_second: spec.rate_limit_per_second,
            secret: SecretRef { secret_name: SecretName::new(&caller.tenant_id, "webhook", "pending"), version: String::new() },
            previous_secret: None,
            failing_since: None,
            consecutive_failures: 0,
            created_at: now,
            updated_at: now,
            created_by: caller.user_id.clone(),
            updated_by: caller.user_id.clone(),
        };
        webhook.secret = self.store_secret(&webhook, &secret).await?;
        match self.webhooks.create(&webhook).await {
            Ok(etag) => Ok(WithSecret { webhook: Stored { value: webhook, etag }, secret }),
            Err(e) => {
                // Nothing references the secret: take it back.
                let _ = self.secrets.delete(&webhook.secret.secret_name).await;
                Err(e)
            }
        }
    }

    pub async fn get(&self, caller: &Caller, id: WebhookId) -> Result<Stored<Webhook>, DomainError> {
        caller.require(Role::Viewer)?;
        self.webhooks.get(&caller.tenant_id, id).await
    }

    pub async fn list(&self, caller: &Caller, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError> {
        caller.require(Role::Viewer)?;
        self.webhooks.list(&caller.tenant_id, page).await
    }

    /// Replaces an endpoint's settings; re-enabling clears the disabled reason.
    pub async fn update(
        &self,
        caller: &Caller,
        id: WebhookId,
        spec: WebhookSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Webhook>, DomainError> {
        caller.require(Role::Member)?;
        spec.validate(&self.policy)?;
        read_modify_write(if_match, async |token| {
            let current = self.webhooks.get(&caller.tenant_id, id).await?;
            if token.is_some_and(|t| *t != current.etag) {
                return Err(DomainError::PreconditionFailed);
            }
            let status = spec.status.unwrap_or(current.value.status);
            let reenabled = status == WebhookStatus::Enabled && current.value.status == WebhookStatus::Disabled;
            let webhook = Webhook {
                failing_since: if reenabled { None } else { current.value.failing_since },
                consecutive_failures: if reenabled { 0 } else { current.value.consecutive_failures },
                url: spec.url.clone(),
                description: spec.description.clone(),
                event_types: spec.event_types.clone(),
                integration_ids: spec.integration_ids.clone(),
                disabled_reason: if status == WebhookStatus::Enabled {
                    None
                } else {
                    current.value.disabled_reason.clone().or(Some("disabled by a user".into()))
                },
                status,
                headers: spec.headers.clone(),
                rate_limit_per_second: spec.rate_limit_per_second,
                updated_at: self.clock.now(),
                updated_by: caller.user_id.clone(),
                ..current.value
            };
            let etag = self.webhooks.replace(&webhook, Some(token.unwrap_or(&current.etag).clone())).await?;
            Ok(Stored { value: webhook, etag })
        })
        .await
    }

    /// Deletes an endpoint and its signing secrets.
    pub async fn delete(&self, caller: &Caller, id: WebhookId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        caller.require(Role::Member)?;
        let current = self.webhooks.get(&caller.tenant_id, id).await?;
        self.webhooks.delete(&caller.tenant_id, id, if_match.cloned()).await?;
        // The endpoint is gone; a secret the store fails to delete now is unreferenced and
        // harmless, so the caller's deletion stands.
        let _ = self.secrets.delete(&current.value.secret.secret_name).await;
        Ok(())
    }

    /// Issues a new signing secret; the previous one keeps signing for the grace period.
    pub async fn rotate_secret(&self, caller: &Caller, id: WebhookId, if_match: Option<&ETag>) -> Result<WithSecret, DomainError> {
        caller.require(Role::Member)?;
        let secret = self.new_secret()?;
        read_modify_write(if_match, async |token| {
            let current = self.webhooks.get(&caller.tenant_id, id).await?;
            if token.is_some_and(|t| *t != current.etag) {
                return Err(DomainError::PreconditionFailed);
            }
            let now = self.clock.now();
            let reference = self.store_secret(&current.value, &secret).await?;
            let grace = time::Duration::try_from(self.previous_secret_grace).unwrap_or(time::Duration::DAY);
            let webhook = Webhook {
                previous_secret: Some(PreviousSecret { secret: current.value.secret.clone(), expires_at: now + grace }),
                secret: reference,
                updated_at: now,
                updated_by: caller.user_id.clone(),
                ..current.value
            };
            let etag = self.webhooks.replace(&webhook, Some(token.unwrap_or(&current.etag).clone())).await?;
            Ok(WithSecret { webhook: Stored { value: webhook, etag }, secret: secret.clone() })
        })
        .await
    }

    /// The secrets that sign deliveries to `webhook` now: the current one, and the previous one
    /// while its grace period lasts.
    pub async fn signing_secrets(&self, webhook: &Webhook) -> Result<Vec<SigningSecret>, DomainError> {
        let mut references = vec![&webhook.secret];
        if let Some(previous) = &webhook.previous_secret
            && previous.expires_at > self.clock.now()
        {
            references.push(&previous.secret);
        }
        let mut secrets = Vec::with_capacity(references.len());
        for reference in references {
            let key = (reference.secret_name.to_string(), reference.version.clone());
            if let Some(secret) = self.secret_cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
                secrets.push(secret.clone());
                continue;
            }
            let value = self.secrets.get(reference).await?;
            let text = value
                .0
                .get("secret")
                .and_then(|s| s.as_str())
                .ok_or_else(|| DomainError::Unexpected(anyhow::anyhow!("a stored signing secret has no 'secret'")))?;
            let secret = SigningSecret::parse(text).map_err(|e| DomainError::Unexpected(anyhow::anyhow!("{e}")))?;
            let mut cache = self.secret_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= 10_000 {
                cache.clear();
            }
            cache.insert(key, secret.clone());
            secrets.push(secret);
        }
        Ok(secrets)
    }
}
