//! The platform's Shard Manager behind the [`ShardManager`] port (`docs/contracts/shard-manager.md`):
//!
//! - `PUT {url}/api/v1/tenants/{tenantId}/shards/{shardType}/{key}` `{"data", "version", "updatedAt", "source"}`,
//!   optional `If-Match` -> `{"key", "version", "updatedAt"}`
//! - `GET {url}/api/v1/tenants/{tenantId}/shards/{shardType}?changedSince=&limit=` -> `{"items", "nextCursor"}`
//! - `DELETE {url}/api/v1/tenants/{tenantId}/shards/{shardType}/{key}` -> 204
//!
//! Authenticated with a service token. 412 is `PreconditionFailed`; 400/422 are `Validation`;
//! 5xx, 429 (waiting its `Retry-After` when short), 409 on an unconditional write and timeouts
//! are retried with backoff and then `Unavailable`; 401/403 mean our configuration is wrong and
//! are reported so. Every call's duration is the histogram
//! `im_shard_manager_request_duration_seconds{op}`. Record data never reaches a log or a span.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_domain::ports::{DependencyHealth, HealthCheck};
use im_domain::retry::{Failure, retry};
use im_domain::sync::ports::{ShardChanges, ShardManager, ShardPut, ShardRecord, ShardWrite, ShardWritten, put_outcome};
use im_domain::{DomainError, FieldViolation, TenantId};
use im_platform_http::{PassiveHealth, PlatformHttpSettings, transport_reason, without_url};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, IF_MATCH, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// The histogram of call durations (retries included), labelled by `op` (`put`, `changes`, `delete`).
pub const DURATION_METRIC: &str = "im_shard_manager_request_duration_seconds";

/// How to reach the service: the `url`, `token`, `timeout`, `connect_timeout` and `attempts`
/// keys of the `shard_manager` section of the configuration.
pub type HttpShardSettings = PlatformHttpSettings;

/// Longest wait between two attempts, and the longest `Retry-After` waited for before another
/// attempt (a longer one ends the call with `Unavailable` carrying it).
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// What the caller hears when the service fails and says nothing about when to come back.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The HTTP client of the Shard Manager.
///
/// It is also the service's health check, judged passively from the requests it makes (as the
/// Secret Management client): after a request that failed for the service's sake (retries
/// exhausted, or the token refused), it is reported not ready until a request succeeds again.
#[derive(Debug)]
pub struct HttpShardManager {
    settings: HttpShardSettings,
    base: url::Url,
    client: reqwest::Client,
    health: PassiveHealth,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PutBody<'a> {
    data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    source: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PutAnswer {
    key: String,
    version: Value,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChangesAnswer {
    items: Vec<Item>,
    next_cursor: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    key: String,
    #[serde(default)]
    data: Value,
    version: Value,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    deleted: bool,
}

/// A refusal as RFC 9457 problem details, with the fields it names (`errors[].field` or
/// `errors[].pointer`, and `errors[].message` or `errors[].detail`).
#[derive(Deserialize, Default)]
struct Problem {
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    errors: Vec<ProblemField>,
}

#[derive(Deserialize)]
struct ProblemField {
    #[serde(default, alias = "pointer")]
    field: Option<String>,
    #[serde(default, alias = "detail")]
    message: Option<String>,
}

/// Versions are opaque: a string as is, anything else as its JSON text.
fn version_text(version: Value) -> String {
    match version {
        Value::String(v) => v,
        other => other.to_string(),
    }
}

/// The operations, as the metric and the logs name them.
#[derive(Clone, Copy)]
enum Op {
    Put,
    Changes,
    Delete,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Changes => "changes",
            Op::Delete => "delete",
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by the platform's services).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok().map(Duration::from_secs)
}

fn unreadable(error: reqwest::Error) -> DomainError {
    DomainError::unavailable(format!("the Shard Manager answered an unreadable body: {}", without_url(error)))
}

impl HttpShardManager {
    /// # Errors
    /// When the URL is not an http(s) base URL or the HTTP client cannot be built.
    pub fn new(settings: HttpShardSettings) -> Result<Self, DomainError> {
        let base = settings.base_url().ok_or_else(|| DomainError::invalid("shard_manager.url", "is not an http(s) URL"))?;
        let client = settings.client()?;
        let health = PassiveHealth::new("shard_manager", ("the last request succeeded", "the last request failed"));
        Ok(Self { settings, base, client, health })
    }

    /// `{url}/api/v1/tenants/{tenant}/shards/{shardType}[/{key}]`, each segment percent-encoded
    /// on its own (a key may hold `/`).
    fn url(&self, tenant: &TenantId, shard_type: &str, key: Option<&str>) -> url::Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(["api", "v1", "tenants", tenant.as_str(), "shards", shard_type]);
            if let Some(key) = key {
                segments.push(key);
            }
        }
        url
    }

    /// Sends one request with bounded retries; answers the first response that is not retried
    /// (any status but 401, 403, 429, 5xx and, when `retry_conflicts`, 409).
    async fn send(
        &self,
        op: Op,
        build: impl Fn() -> reqwest::RequestBuilder + Send + Sync,
        retry_conflicts: bool,
    ) -> Result<reqwest::Response, DomainError> {
        let backoff = self.settings.retries(MAX_BACKOFF);
        let attempts = backoff.attempts;
        // The wait the service asked for in its last answer, honoured before the next attempt.
        let asked = Mutex::new(None::<Duration>);
        let attempt = |attempt: u32| {
            let request = build().bearer_auth(self.settings.token());
            let asked = &asked;
            async move {
                let (reason, wait) = match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        match status {
                            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                                let reason = format!("the Shard Manager refused the service token ({status}): check shard_manager.token");
                                tracing::error!(op = op.as_str(), %status, "shard manager refused the service token");
                                return Err(Failure::Permanent((DomainError::Unexpected(anyhow::anyhow!("{reason}")), Some(reason))));
                            }
                            s if s.is_server_error()
                                || s == StatusCode::TOO_MANY_REQUESTS
                                || (retry_conflicts && s == StatusCode::CONFLICT) =>
                            {
                                (format!("answered {s}"), retry_after(response.headers()))
                            }
                            _ => return Ok(response),
                        }
                    }
                    Err(e) => (transport_reason(e), None),
                };
                tracing::warn!(op = op.as_str(), attempt, attempts, %reason, "shard manager request failed");
                let error = DomainError::Unavailable {
                    reason: format!("the Shard Manager {reason}"),
                    retry_after: Some(wait.unwrap_or(DEFAULT_RETRY_AFTER)),
                };
                let reason = Some(error.to_string());
                if wait.is_some_and(|w| w > MAX_RETRY_AFTER) {
                    // Longer than a caller should be held: it comes back when the service said.
                    return Err(Failure::Permanent((error, reason)));
                }
                *asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = wait;
                Err(Failure::Transient((error, reason)))
            }
        };
        let sleep = |delay: Duration| {
            let wait = asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take().map_or(delay, |w| w.max(delay));
            tokio::time::sleep(wait)
        };
        let started = Instant::now();
        let result = retry(backoff, attempt, sleep).await;
        metrics::histogram!(DURATION_METRIC, "op" => op.as_str()).record(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => {
                self.health.record(None);
                Ok(response)
            }
            Err((error, reason)) => {
                self.health.record(reason);
                Err(error)
            }
        }
    }
}

/// A 400/422 answer as `Validation`: the fields the problem names, else `default_field`.
async fn refused(response: reqwest::Response, default_field: &str) -> DomainError {
    let problem: Problem = response.json().await.unwrap_or_default();
    let violations: Vec<FieldViolation> = problem
        .errors
        .into_iter()
        .map(|e| {
            let field = e.field.map(|f| f.trim_start_matches('/').replace('/', ".")).filter(|f| !f.is_empty());
            FieldViolation::invalid(
                field.unwrap_or_else(|| default_field.to_owned()),
                e.message.unwrap_or_else(|| "was refused by the Shard Manager".to_owned()),
            )
        })
        .collect();
    if violations.is_empty() {
        let message = problem.detail.unwrap_or_else(|| "was refused by the Shard Manager".to_owned());
        DomainError::invalid(default_field, message)
    } else {
        DomainError::Validation(violations)
    }
}

fn unexpected(op: Op, status: StatusCode) -> DomainError {
    DomainError::Unexpected(anyhow::anyhow!("the Shard Manager answered {} with {status}, which the contract does not have", op.as_str()))
}

/// Puts in flight at once in [`ShardManager::put_many`].
const PUT_CONCURRENCY: usize = 8;

#[async_trait]
impl ShardManager for HttpShardManager {
    #[tracing::instrument(skip_all, name = "shards.put", fields(tenant = %tenant, shard_type, conditional = if_match.is_some()))]
    async fn put(
        &self,
        tenant: &TenantId,
        shard_type: &str,
        key: &str,
        write: &ShardWrite,
        if_match: Option<String>,
    ) -> Result<ShardWritten, DomainError> {
        let url = self.url(tenant, shard_type, Some(key));
        let body = PutBody { data: &write.data, version: write.version.as_deref(), updated_at: write.updated_at, source: &write.source };
        let body = serde_json::to_vec(&body).map_err(|e| DomainError::Unexpected(e.into()))?;
        let conditional = if_match.is_some();
        let build = || {
            let request = self.client.put(url.clone()).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone());
            match &if_match {
                Some(version) => request.header(IF_MATCH, version.as_str()),
                None => request,
            }
        };
        // An unconditional write that met another write in flight is tried again; a
        // conditional one lost a race and says so.
        let response = self.send(Op::Put, build, !conditional).await?;
        match response.status() {
            s if s.is_success() => {
                let answer: PutAnswer = response.json().await.map_err(unreadable)?;
                Ok(ShardWritten { key: answer.key, version: version_text(answer.version), updated_at: answer.updated_at })
            }
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => Err(DomainError::PreconditionFailed),
            StatusCode::NOT_FOUND if conditional => Err(DomainError::PreconditionFailed),
            StatusCode::NOT_FOUND => Err(DomainError::invalid("shardType", "is not a shard type the Shard Manager knows")),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY | StatusCode::PAYLOAD_TOO_LARGE => {
                Err(refused(response, "data").await)
            }
            s => Err(unexpected(Op::Put, s)),
        }
    }

    /// The contract has no bulk write: the puts go out [`PUT_CONCURRENCY`] at a time, each
    /// with its own retries and outcome.
    #[tracing::instrument(skip_all, name = "shards.put_many", fields(tenant = %tenant, shard_type, count = puts.len()))]
    async fn put_many(
        &self,
        tenant: &TenantId,
        shard_type: &str,
        puts: &[ShardPut],
    ) -> Result<Vec<Result<ShardWritten, DomainError>>, DomainError> {
        use futures_util::StreamExt as _;
        let calls: Vec<_> = puts.iter().map(|p| self.put(tenant, shard_type, &p.key, &p.write, p.if_match.clone())).collect();
        let outcomes: Vec<_> = futures_util::stream::iter(calls).buffered(PUT_CONCURRENCY).collect().await;
        outcomes.into_iter().map(put_outcome).collect()
    }

    #[tracing::instrument(skip_all, name = "shards.changes", fields(tenant = %tenant, shard_type, limit))]
    async fn changes(&self, tenant: &TenantId, shard_type: &str, cursor: Option<String>, limit: u32) -> Result<ShardChanges, DomainError> {
        let mut url = self.url(tenant, shard_type, None);
        {
            let mut query = url.query_pairs_mut();
            if let Some(cursor) = &cursor {
                query.append_pair("changedSince", cursor);
            }
            query.append_pair("limit", &limit.max(1).to_string());
        }
        let response = self.send(Op::Changes, || self.client.get(url.clone()), false).await?;
        match response.status() {
            s if s.is_success() => {
                let answer: ChangesAnswer = response.json().await.map_err(unreadable)?;
                let items = answer
                    .items
                    .into_iter()
                    .map(|item| ShardRecord {
                        key: item.key,
                        data: if item.deleted { Value::Null } else { item.data },
                        version: version_text(item.version),
                        updated_at: item.updated_at,
                        source: item.source,
                        deleted: item.deleted,
                    })
                    .collect();
                Ok(ShardChanges { items, next_cursor: answer.next_cursor })
            }
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY | StatusCode::GONE => Err(refused(response, "cursor").await),
            StatusCode::NOT_FOUND => Err(DomainError::invalid("shardType", "is not a shard type the Shard Manager knows")),
            s => Err(unexpected(Op::Changes, s)),
        }
    }

    #[tracing::instrument(skip_all, name = "shards.delete", fields(tenant = %tenant, shard_type))]
    async fn delete(&self, tenant: &TenantId, shard_type: &str, key: &str) -> Result<(), DomainError> {
        let url = self.url(tenant, shard_type, Some(key));
        let response = self.send(Op::Delete, || self.client.delete(url.clone()), true).await?;
        match response.status() {
            // A record that does not exist is deleted already.
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(unexpected(Op::Delete, s)),
        }
    }
}

#[async_trait]
impl HealthCheck for HttpShardManager {
    fn describe(&self) -> (&'static str, bool) {
        self.health.describe()
    }

    async fn check(&self) -> DependencyHealth {
        // Sync runs fail and are retried on their schedule; the API is unaffected.
        self.health.report()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_one_by_one() {
        let shards = HttpShardManager::new(HttpShardSettings::new("https://shards.internal/base/", "t")).unwrap();
        let tenant = TenantId::new("acme").unwrap();
        assert_eq!(
            shards.url(&tenant, "ticket", Some("a/1 ?#")).as_str(),
            "https://shards.internal/base/api/v1/tenants/acme/shards/ticket/a%2F1%20%3F%23"
        );
    }
}
