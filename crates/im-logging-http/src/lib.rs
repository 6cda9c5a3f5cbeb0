//! The platform's Logging Service behind the [`AuditSink`] port (`docs/contracts/logging-service.md`):
//! `POST {url}/api/v1/audit-events` with a JSON array of records, answered with any 2xx once the
//! service keeps them (it drops a record id it already has).
//!
//! Authenticated with a service token. 400/413/422 refuse the batch's content (`Validation`);
//! 5xx, 429 and timeouts are retried with backoff and then `Unavailable`; 401/403 mean our
//! configuration is wrong and are reported so. Record contents never reach a log or a span.

use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::audit::{AuditEntry, AuditSink};
use im_domain::ports::{DependencyHealth, HealthCheck};
use im_domain::retry::{Failure, retry};
use im_platform_http::{PassiveHealth, PlatformHttpSettings, transport_reason};
use reqwest::StatusCode;

/// How to reach the service: the `url`, `token`, `timeout`, `connect_timeout` and `attempts`
/// keys of the `logging` section of the configuration.
pub type HttpLoggingSettings = PlatformHttpSettings;

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The HTTP client of the Logging Service; also its health check, judged from the last batch
/// sent (as the other platform-service clients).
#[derive(Debug)]
pub struct HttpAuditSink {
    settings: HttpLoggingSettings,
    endpoint: String,
    client: reqwest::Client,
    health: PassiveHealth,
}

impl HttpAuditSink {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: HttpLoggingSettings) -> Result<Self, DomainError> {
        let client = settings.client()?;
        let endpoint = settings.endpoint("api/v1/audit-events");
        let health = PassiveHealth::new("logging_service", ("the last batch was accepted", "the last batch failed"));
        Ok(Self { settings, endpoint, client, health })
    }
}

#[async_trait]
impl AuditSink for HttpAuditSink {
    #[tracing::instrument(skip_all, name = "logging.send", fields(count = entries.len()))]
    async fn send(&self, entries: &[AuditEntry]) -> Result<(), DomainError> {
        let body = serde_json::to_vec(entries).map_err(|e| DomainError::Unexpected(e.into()))?;
        let backoff = self.settings.retries(MAX_BACKOFF);
        let attempts = backoff.attempts;
        let attempt = |attempt: u32| {
            let request = self
                .client
                .post(&self.endpoint)
                .bearer_auth(self.settings.token())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            async move {
                let reason = match request.send().await {
                    Ok(response) => match response.status() {
                        s if s.is_success() => return Ok(()),
                        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => format!("answered {s}"),
                        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                            return Err(Failure::Permanent(DomainError::Unexpected(anyhow::anyhow!(
                                "the Logging Service refused the service token ({s}): check logging.token"
                            ))));
                        }
                        s @ (StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY) => {
                            return Err(Failure::Permanent(DomainError::invalid(
                                "auditEvents",
                                format!("the Logging Service refused them ({s})"),
                            )));
                        }
                        s => {
                            return Err(Failure::Permanent(DomainError::Unexpected(anyhow::anyhow!(
                                "the Logging Service answered {s}, which the contract does not have"
                            ))));
                        }
                    },
                    Err(e) => transport_reason(e),
                };
                tracing::warn!(attempt, attempts, %reason, "logging service request failed");
                Err(Failure::Transient(DomainError::unavailable(format!("the Logging Service {reason}"))))
            }
        };
        let result = retry(backoff, attempt, tokio::time::sleep).await;
        let failing = match &result {
            // A refused record is the record's problem, not the service's.
            Ok(()) | Err(DomainError::Validation(_)) => None,
            Err(e) => Some(e.to_string()),
        };
        self.health.record(failing);
        result
    }
}

#[async_trait]
impl HealthCheck for HttpAuditSink {
    fn describe(&self) -> (&'static str, bool) {
        self.health.describe()
    }

    async fn check(&self) -> DependencyHealth {
        // Records wait in the store's buffer meanwhile; nothing is lost.
        self.health.report()
    }
}
