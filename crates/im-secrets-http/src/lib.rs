//! The platform's Secret Management service behind the [`SecretStore`] port
//! (`docs/contracts/secret-management.md`):
//!
//! - `PUT {url}/api/v1/secrets/{name}` `{"value": <json>, "metadata": {...}}` -> `{"name", "version"}`
//! - `GET {url}/api/v1/secrets/{name}?version=V` -> `{"name", "version", "value"}`
//! - `DELETE {url}/api/v1/secrets/{name}` -> 204
//! - `DELETE {url}/api/v1/secrets/{name}/versions?before=V` -> 204 (the versions issued before V)
//!
//! Authenticated with a service token. 404 is `NotFound`; 5xx, 429 and timeouts are retried with
//! backoff and then `Unavailable`; 401/403 mean our configuration is wrong and are reported so.
//! Secret values never reach a log.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::ports::{DependencyHealth, HealthCheck};
use im_domain::retry::{Failure, retry};
use im_domain::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use im_platform_http::{PassiveHealth, PlatformHttpSettings, transport_reason, without_url};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// How to reach the service: the `url`, `token`, `timeout`, `connect_timeout` and `attempts`
/// keys of the `secrets` section of the configuration.
pub type HttpSecretSettings = PlatformHttpSettings;

/// The HTTP client of the Secret Management service.
///
/// It is also the service's health check, judged passively from the requests it makes: after
/// a request that failed (retries exhausted), the service is reported not ready until a request
/// succeeds again; no probe of its own.
#[derive(Debug)]
pub struct HttpSecretStore {
    settings: HttpSecretSettings,
    client: reqwest::Client,
    health: PassiveHealth,
}

#[derive(Serialize)]
struct PutBody<'a> {
    value: &'a serde_json::Value,
    metadata: &'a BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct PutAnswer {
    version: serde_json::Value,
}

#[derive(Deserialize)]
struct GetAnswer {
    value: serde_json::Value,
}

fn path_of(name: &SecretName) -> String {
    // Names are namespaced paths; each segment is percent-encoded on its own.
    name.as_str().split('/').map(encode_segment).collect::<Vec<_>>().join("/")
}

fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl HttpSecretStore {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: HttpSecretSettings) -> Result<Self, DomainError> {
        let client = settings.client()?;
        let health = PassiveHealth::new("secret_management", ("the last request succeeded", "the last request failed"));
        Ok(Self { settings, client, health })
    }

    async fn send(
        &self,
        method: Method,
        name: &SecretName,
        query: Option<(&str, &str)>,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response, DomainError> {
        self.send_to(method, name, "", query, body).await
    }

    /// Sends to `{url}/api/v1/secrets/{name}{suffix}`.
    async fn send_to(
        &self,
        method: Method,
        name: &SecretName,
        suffix: &str,
        query: Option<(&str, &str)>,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response, DomainError> {
        let url = self.settings.endpoint(&format!("api/v1/secrets/{}{suffix}", path_of(name)));
        let backoff = self.settings.retries(MAX_BACKOFF);
        let attempts = backoff.attempts;
        let attempt = |attempt: u32| {
            let mut request = self.client.request(method.clone(), &url).bearer_auth(self.settings.token());
            if let Some((k, v)) = query {
                request = request.query(&[(k, v)]);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let method = &method;
            async move {
                let reason = match request.send().await {
                    Ok(response) => match response.status() {
                        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => format!("answered {s}"),
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                            return Err(Failure::Permanent(DomainError::Unexpected(anyhow::anyhow!(
                                "Secret Management refused the service token ({}): check secrets.token",
                                response.status()
                            ))));
                        }
                        _ => return Ok(response),
                    },
                    Err(e) => transport_reason(e),
                };
                tracing::warn!(%method, secret = %name, attempt, attempts, %reason, "secret management request failed");
                Err(Failure::Transient(DomainError::Unavailable {
                    reason: format!("Secret Management {reason}"),
                    retry_after: Some(Duration::from_secs(5)),
                }))
            }
        };
        let result = retry(backoff, attempt, tokio::time::sleep).await;
        self.health.record(result.as_ref().err().map(ToString::to_string));
        result
    }
}

#[async_trait]
impl HealthCheck for HttpSecretStore {
    fn describe(&self) -> (&'static str, bool) {
        self.health.describe()
    }

    async fn check(&self) -> DependencyHealth {
        // Reads and writes that need a secret wait or answer 503; nothing is lost.
        self.health.report()
    }
}

async fn refused(response: reqwest::Response, what: &str) -> DomainError {
    let status = response.status();
    DomainError::Unexpected(anyhow::anyhow!("Secret Management refused to {what}: {status}"))
}

#[async_trait]
impl SecretStore for HttpSecretStore {
    #[tracing::instrument(skip_all, name = "secrets.put", fields(secret = %name))]
    async fn put(&self, name: &SecretName, value: &SecretValue, metadata: &BTreeMap<String, String>) -> Result<SecretRef, DomainError> {
        let body = serde_json::to_value(PutBody { value: &value.0, metadata }).map_err(|e| DomainError::Unexpected(e.into()))?;
        let response = self.send(Method::PUT, name, None, Some(&body)).await?;
        if !response.status().is_success() {
            return Err(refused(response, "store a secret").await);
        }
        let answer: PutAnswer = response
            .json()
            .await
            .map_err(|e| DomainError::unavailable(format!("Secret Management answered an unreadable body: {}", without_url(e))))?;
        let version = match answer.version {
            serde_json::Value::String(v) => v,
            other => other.to_string(),
        };
        Ok(SecretRef { secret_name: name.clone(), version })
    }

    #[tracing::instrument(skip_all, name = "secrets.get", fields(secret = %reference.secret_name, version = %reference.version))]
    async fn get(&self, reference: &SecretRef) -> Result<SecretValue, DomainError> {
        let response = self.send(Method::GET, &reference.secret_name, Some(("version", &reference.version)), None).await?;
        match response.status() {
            StatusCode::NOT_FOUND => Err(DomainError::not_found("secret", &reference.secret_name)),
            s if s.is_success() => {
                let answer: GetAnswer = response
                    .json()
                    .await
                    .map_err(|e| DomainError::unavailable(format!("Secret Management answered an unreadable body: {}", without_url(e))))?;
                Ok(SecretValue(answer.value))
            }
            _ => Err(refused(response, "read a secret").await),
        }
    }

    #[tracing::instrument(skip_all, name = "secrets.delete", fields(secret = %name))]
    async fn delete(&self, name: &SecretName) -> Result<(), DomainError> {
        let response = self.send(Method::DELETE, name, None, None).await?;
        match response.status() {
            // Nothing to delete, or a service without version deletion (the older versions then
            // stay until the secret is deleted): pruning is housekeeping, never a failure.
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(()),
            s if s.is_success() => Ok(()),
            _ => Err(refused(response, "delete a secret").await),
        }
    }

    #[tracing::instrument(skip_all, name = "secrets.prune", fields(secret = %current.secret_name, version = %current.version))]
    async fn prune(&self, current: &SecretRef) -> Result<(), DomainError> {
        let response = self.send_to(Method::DELETE, &current.secret_name, "/versions", Some(("before", &current.version)), None).await?;
        match response.status() {
            // Nothing to delete, or a service without version deletion (the older versions then
            // stay until the secret is deleted): pruning is housekeeping, never a failure.
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(()),
            s if s.is_success() => Ok(()),
            _ => Err(refused(response, "delete older versions of a secret").await),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_are_encoded() {
        assert_eq!(super::encode_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(super::encode_segment("acme-01_x.y~"), "acme-01_x.y~");
    }
}
