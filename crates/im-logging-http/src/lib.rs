//! The platform's Logging Service behind the [`AuditSink`] port (`docs/contracts/logging-service.md`):
//! `POST {url}/api/v1/audit-events` with a JSON array of records, answered with any 2xx once the
//! service keeps them (it drops a record id it already has).
//!
//! Authenticated with a service token. 400/413/422 refuse the batch's content (`Validation`);
//! 5xx, 429 and timeouts are retried with backoff and then `Unavailable`; 401/403 mean our
//! configuration is wrong and are reported so. Record contents never reach a log or a span.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::audit::{AuditEntry, AuditSink};
use im_domain::ports::{DependencyHealth, HealthCheck};
use im_domain::retry::{Backoff, Failure, retry};
use im_domain::{DomainError, HumanDuration};
use reqwest::StatusCode;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// How to reach the service: the `url`, `token`, `timeout` and `attempts` keys of the `logging`
/// section of the configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpLoggingSettings {
    /// Base URL, e.g. `https://logging.platform.internal`.
    pub url: String,
    /// Service token sent as `Authorization: Bearer`; a secret, never logged.
    pub token: SecretString,
    /// Timeout of one attempt.
    pub timeout: HumanDuration,
    /// Attempts for a batch that fails with a retryable error (at least 1); the shipper tries
    /// again on its next round after that.
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one (not configurable).
    #[serde(skip, default = "default_backoff")]
    pub backoff: Duration,
}

impl HttpLoggingSettings {
    /// What types alone cannot check when this sink is used: every problem, as (key within the
    /// section, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !(self.url.starts_with("https://") || self.url.starts_with("http://")) {
            problems.push(("url", "is required (an http(s) URL) when logging.backend is 'http'".to_owned()));
        }
        if self.token.expose_secret().is_empty() {
            problems.push(("token", "is required when logging.backend is 'http'".to_owned()));
        }
        if self.timeout.is_zero() {
            problems.push(("timeout", "must be positive".to_owned()));
        }
        if !(1..=10).contains(&self.attempts) {
            problems.push(("attempts", "must be between 1 and 10".to_owned()));
        }
        problems
    }
}

fn default_backoff() -> Duration {
    Duration::from_millis(200)
}

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The HTTP client of the Logging Service; also its health check, judged from the last batch
/// sent (as the other platform-service clients).
#[derive(Debug)]
pub struct HttpAuditSink {
    settings: HttpLoggingSettings,
    endpoint: String,
    client: reqwest::Client,
    failing: Mutex<Option<String>>,
}

fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    text
}

impl HttpAuditSink {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: HttpLoggingSettings) -> Result<Self, DomainError> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout.get())
            .connect_timeout(settings.timeout.get())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DomainError::Unexpected(e.into()))?;
        let endpoint = format!("{}/api/v1/audit-events", settings.url.trim_end_matches('/'));
        Ok(Self { settings, endpoint, client, failing: Mutex::default() })
    }
}

#[async_trait]
impl AuditSink for HttpAuditSink {
    #[tracing::instrument(skip_all, name = "logging.send", fields(count = entries.len()))]
    async fn send(&self, entries: &[AuditEntry]) -> Result<(), DomainError> {
        let body = serde_json::to_vec(entries).map_err(|e| DomainError::Unexpected(e.into()))?;
        let attempts = self.settings.attempts.max(1);
        let backoff = Backoff { attempts, first: self.settings.backoff, max: MAX_BACKOFF };
        let attempt = |attempt: u32| {
            let request = self
                .client
                .post(&self.endpoint)
                .bearer_auth(self.settings.token.expose_secret())
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
                    Err(e) if e.is_timeout() => "timed out".into(),
                    Err(e) => format!("cannot be reached: {}", without_url(&e)),
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
        *self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = failing;
        result
    }
}

#[async_trait]
impl HealthCheck for HttpAuditSink {
    async fn check(&self) -> DependencyHealth {
        let failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        DependencyHealth {
            name: "logging_service".into(),
            ready: failing.is_none(),
            // Records wait in the store's buffer meanwhile; nothing is lost.
            critical: false,
            detail: if failing.is_some() { "the last batch failed" } else { "the last batch was accepted" }.into(),
            diagnostic: failing.unwrap_or_default(),
        }
    }
}
