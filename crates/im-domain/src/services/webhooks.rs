use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::audit::{Audit, AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::cache::{self, BoundedCache};
use crate::common::{Clock, ETag, IdGenerator, Page, PageRequest, Stored, TenantId};
use crate::error::DomainError;
use crate::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use crate::webhooks::endpoint::{HEADER_MASK, PreviousSecret, UrlPolicy, Webhook, WebhookId, WebhookSpec, WebhookStatus, masked};
use crate::webhooks::ports::{Entropy, WebhookRepository};
use crate::webhooks::signature::SigningSecret;

use super::{matching, read_modify_write};

/// Length of new signing secrets, in bytes (the Standard Webhooks range is 24 to 64).
const SECRET_BYTES: usize = 32;

/// Values read from the secret store, by secret name and version (a version never changes).
type VersionCache<T> = Arc<BoundedCache<(String, String), T>>;
/// Versions of secret-store values kept in memory, per kind.
const VERSION_CACHE_CAPACITY: usize = 10_000;
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
    secret_cache: VersionCache<SigningSecret>,
    /// Custom header values already read, by reference.
    header_cache: VersionCache<BTreeMap<String, String>>,
    audit: Audit,
}

/// Secret-store kind of the custom header values of an endpoint.
const HEADERS_KIND: &str = "webhook-headers";

/// The header values to store: a value sent as [`HEADER_MASK`] keeps the current one.
fn resolve_headers(spec: &BTreeMap<String, String>, current: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, DomainError> {
    let mut resolved = BTreeMap::new();
    for (name, value) in spec {
        let value = if value == HEADER_MASK {
            current.get(name).ok_or_else(|| {
                DomainError::invalid(format!("headers.{name}"), "is the mask of a stored value, and none is stored: send the value itself")
            })?
        } else {
            value
        };
        resolved.insert(name.clone(), value.clone());
    }
    Ok(resolved)
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
    #[allow(clippy::too_many_arguments, reason = "one port or setting each; wired once, in startup")]
    pub fn new(
        webhooks: Arc<dyn WebhookRepository>,
        secrets: Arc<dyn SecretStore>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
        entropy: Arc<dyn Entropy>,
        policy: UrlPolicy,
        previous_secret_grace: Duration,
        audit: Audit,
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
            secret_cache: Arc::new(cache::bounded(VERSION_CACHE_CAPACITY)),
            header_cache: Arc::new(cache::bounded(VERSION_CACHE_CAPACITY)),
            audit,
        }
    }

    /// Stores custom header values in the secret store; `None` when there are none.
    async fn store_headers(&self, webhook: &Webhook, headers: &BTreeMap<String, String>) -> Result<Option<SecretRef>, DomainError> {
        if headers.is_empty() {
            return Ok(None);
        }
        let name = SecretName::new(&webhook.tenant_id, HEADERS_KIND, &webhook.id.to_string());
        let metadata =
            BTreeMap::from([("kind".to_owned(), "webhook-custom-headers".to_owned()), ("webhookId".to_owned(), webhook.id.to_string())]);
        self.secrets.put(&name, &SecretValue(json!({ "headers": headers })), &metadata).await.map(Some)
    }

    /// The real values of an endpoint's custom headers, for the sender.
    ///
    /// # Errors
    /// When the secret store cannot be read.
    pub async fn custom_headers(&self, webhook: &Webhook) -> Result<BTreeMap<String, String>, DomainError> {
        let Some(reference) = &webhook.headers_secret else {
            // Stored before values moved to the secret store: the document holds them.
            return Ok(webhook.headers.iter().filter(|(_, v)| v.as_str() != HEADER_MASK).map(|(k, v)| (k.clone(), v.clone())).collect());
        };
        let key = (reference.secret_name.to_string(), reference.version.clone());
        if let Some(headers) = self.header_cache.get(&key) {
            return Ok(headers);
        }
        let value = self.secrets.get(reference).await?;
        let detail = serde_json::json!({"secret": "custom_headers"});
        self.audit.service_read_secret(&webhook.tenant_id, AuditResource::Webhook, webhook.id.to_string(), detail).await;
        let headers: BTreeMap<String, String> = value
            .0
            .get("headers")
            .cloned()
            .and_then(|h| serde_json::from_value(h).ok())
            .ok_or_else(|| DomainError::Unexpected(anyhow::anyhow!("stored custom headers have no 'headers' map")))?;
        self.header_cache.insert(key, headers.clone());
        Ok(headers)
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

    /// Checks, before a change is even read, that the caller may make it (members and admins).
    ///
    /// # Errors
    /// `Forbidden`, recorded in the audit log.
    pub async fn authorize(&self, caller: &Caller, action: AuditAction) -> Result<(), DomainError> {
        self.audit.require(caller, Role::Member, AuditResource::Webhook, action).await
    }

    /// Checks a spec as `create` and `update` would, writing nothing.
    ///
    /// # Errors
    /// `Validation` listing every offending field.
    pub fn check(&self, spec: &WebhookSpec) -> Result<(), DomainError> {
        spec.validate(&self.policy)
    }

    /// # Errors
    /// `Forbidden` without the member role; `Validation` listing every offending field.
    pub async fn create(&self, caller: &Caller, spec: WebhookSpec) -> Result<WithSecret, DomainError> {
        let result = self.create_unaudited(caller, spec).await;
        self.audit
            .result(caller, AuditResource::Webhook, AuditAction::Create, None, &result, |s| {
                (s.webhook.value.id.to_string(), serde_json::Value::Null)
            })
            .await;
        result
    }

    async fn create_unaudited(&self, caller: &Caller, spec: WebhookSpec) -> Result<WithSecret, DomainError> {
        caller.require(Role::Member)?;
        spec.validate(&self.policy)?;
        let headers = resolve_headers(&spec.headers, &BTreeMap::new())?;
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
            headers: masked(&headers),
            headers_secret: None,
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
        let created = match self.store_headers(&webhook, &headers).await {
            Ok(reference) => {
                webhook.headers_secret = reference;
                self.webhooks.create(&webhook).await
            }
            Err(e) => Err(e),
        };
        match created {
            Ok(etag) => Ok(WithSecret { webhook: Stored { value: webhook, etag }, secret }),
            Err(e) => {
                // Nothing references the secrets: take them back.
                let _ = self.secrets.delete(&webhook.secret.secret_name).await;
                if let Some(headers) = &webhook.headers_secret {
                    let _ = self.secrets.delete(&headers.secret_name).await;
                }
                Err(e)
            }
        }
    }

    pub async fn get(&self, caller: &Caller, id: WebhookId) -> Result<Stored<Webhook>, DomainError> {
        caller.require(Role::Viewer)?;
        let stored = self.webhooks.get(&caller.tenant_id, id).await?;
        Ok(Stored { value: stored.value.with_masked_headers(), etag: stored.etag })
    }

    pub async fn list(&self, caller: &Caller, page: &PageRequest) -> Result<Page<Stored<Webhook>>, DomainError> {
        caller.require(Role::Viewer)?;
        let mut page = self.webhooks.list(&caller.tenant_id, page).await?;
        for stored in &mut page.items {
            stored.value.headers = masked(&stored.value.headers);
        }
        Ok(page)
    }

    /// Replaces an endpoint's settings; re-enabling clears the disabled reason; a custom header
    /// sent with the mask as value keeps its stored value.
    pub async fn update(
        &self,
        caller: &Caller,
        id: WebhookId,
        spec: WebhookSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Webhook>, DomainError> {
        let result = self.update_unaudited(caller, id, spec, if_match).await;
        self.audit.of(caller, AuditResource::Webhook, AuditAction::Update, id, result).await
    }

    async fn update_unaudited(
        &self,
        caller: &Caller,
        id: WebhookId,
        spec: WebhookSpec,
        if_match: Option<&ETag>,
    ) -> Result<Stored<Webhook>, DomainError> {
        caller.require(Role::Member)?;
        spec.validate(&self.policy)?;
        read_modify_write(if_match, async |token| {
            let current = matching(self.webhooks.get(&caller.tenant_id, id).await?, token)?;
            let current_headers = self.custom_headers(&current.value).await?;
            let headers = resolve_headers(&spec.headers, &current_headers)?;
            let headers_secret = if headers == current_headers && current.value.headers_secret.is_some() {
                current.value.headers_secret.clone()
            } else {
                self.store_headers(&current.value, &headers).await?
            };
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
                headers: masked(&headers),
                headers_secret: headers_secret.clone(),
                rate_limit_per_second: spec.rate_limit_per_second,
                updated_at: self.clock.now(),
                updated_by: caller.user_id.clone(),
                ..current.value
            };
            let etag = self.webhooks.replace(&webhook, Some(token.unwrap_or(&current.etag).clone())).await?;
            if headers_secret.is_none()
                && let Some(old) = &current.value.headers_secret
            {
                // No custom header left: nothing references the stored values any more.
                let _ = self.secrets.delete(&old.secret_name).await;
            }
            Ok(Stored { value: webhook, etag })
        })
        .await
    }

    /// Deletes an endpoint and its signing secrets.
    pub async fn delete(&self, caller: &Caller, id: WebhookId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        let result = self.delete_unaudited(caller, id, if_match).await;
        self.audit.of(caller, AuditResource::Webhook, AuditAction::Delete, id, result).await
    }

    async fn delete_unaudited(&self, caller: &Caller, id: WebhookId, if_match: Option<&ETag>) -> Result<(), DomainError> {
        caller.require(Role::Member)?;
        let current = self.webhooks.get(&caller.tenant_id, id).await?;
        self.webhooks.delete(&caller.tenant_id, id, if_match.cloned()).await?;
        // The endpoint is gone; a secret the store fails to delete now is unreferenced and
        // harmless, so the caller's deletion stands.
        let _ = self.secrets.delete(&current.value.secret.secret_name).await;
        if let Some(headers) = &current.value.headers_secret {
            let _ = self.secrets.delete(&headers.secret_name).await;
        }
        Ok(())
    }

    /// Issues a new signing secret; the previous one keeps signing for the grace period.
    pub async fn rotate_secret(&self, caller: &Caller, id: WebhookId, if_match: Option<&ETag>) -> Result<WithSecret, DomainError> {
        let result = self.rotate_secret_unaudited(caller, id, if_match).await;
        self.audit.of(caller, AuditResource::Webhook, AuditAction::RotateSecret, id, result).await
    }

    async fn rotate_secret_unaudited(&self, caller: &Caller, id: WebhookId, if_match: Option<&ETag>) -> Result<WithSecret, DomainError> {
        caller.require(Role::Member)?;
        let secret = self.new_secret()?;
        read_modify_write(if_match, async |token| {
            let current = matching(self.webhooks.get(&caller.tenant_id, id).await?, token)?;
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
            if let Some(secret) = self.secret_cache.get(&key) {
                secrets.push(secret);
                continue;
            }
            let value = self.secrets.get(reference).await?;
            let detail = serde_json::json!({"secret": "signing_secret", "version": reference.version});
            self.audit.service_read_secret(&webhook.tenant_id, AuditResource::Webhook, webhook.id.to_string(), detail).await;
            let text = value
                .0
                .get("secret")
                .and_then(|s| s.as_str())
                .ok_or_else(|| DomainError::Unexpected(anyhow::anyhow!("a stored signing secret has no 'secret'")))?;
            let secret = SigningSecret::parse(text).map_err(|e| DomainError::Unexpected(anyhow::anyhow!("{e}")))?;
            self.secret_cache.insert(key, secret.clone());
            secrets.push(secret);
        }
        Ok(secrets)
    }
}
