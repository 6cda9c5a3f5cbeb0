//! Liveness and readiness.

use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::auth::AuthError;
use im_domain::ports::DependencyHealth;
use secrecy::ExposeSecret as _;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::problem::{ApiError, Problem};
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct DependencyReport {
    pub name: String,
    pub ready: bool,
    /// A critical dependency that is not ready makes the service unready; another one degrades it.
    pub critical: bool,
    pub detail: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `live`, `ready`, `degraded` (a non-critical dependency is down; work waits durably) or `not_ready`.
    pub status: &'static str,
    /// What this instance does (`api`, `worker` or `all`); readiness checks what that role uses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<DependencyReport>,
}

/// How long readiness waits for the checks (each MUST answer within a few seconds).
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);

/// The process is up.
#[utoipa::path(get, operation_id = "live", path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthReport)))]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(HealthReport { status: "live", role: None, dependencies: Vec::new() })
}

/// Every dependency is reachable.
// Unauthenticated: each dependency's state and a detail free of paths, URLs, user names and
// error texts; the diagnostics of an unready one go to the logs.
#[utoipa::path(get, operation_id = "ready", path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready; each dependency reported", body = HealthReport),
        (status = 503, description = "A dependency is not ready", body = HealthReport),
    ))]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    // Every check runs at once; one that does not answer in time is reported unready, so a
    // dependency that hangs never holds the probe.
    let checks: Vec<_> = state
        .health
        .iter()
        .map(|check| {
            let check = check.clone();
            (check.describe(), tokio::spawn(async move { check.check().await }))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + CHECK_TIMEOUT;
    let mut dependencies = Vec::with_capacity(checks.len());
    for ((name, critical), task) in checks {
        let abort = task.abort_handle();
        let health = match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(health)) => health,
            outcome => {
                abort.abort();
                let diagnostic = match outcome {
                    Ok(Err(e)) => format!("the check failed: {e}"),
                    _ => format!("the check did not answer within {} s", CHECK_TIMEOUT.as_secs()),
                };
                DependencyHealth { name: name.into(), ready: false, critical, detail: "not answering".into(), diagnostic }
            }
        };
        if health.ready {
            tracing::debug!(dependency = %health.name, diagnostic = %health.diagnostic, "dependency ready");
        } else {
            tracing::warn!(dependency = %health.name, diagnostic = %health.diagnostic, "dependency not ready");
        }
        dependencies.push(DependencyReport { name: health.name, ready: health.ready, critical: health.critical, detail: health.detail });
    }
    let ready = dependencies.iter().all(|d| d.ready || !d.critical);
    let degraded = dependencies.iter().any(|d| !d.ready);
    let status = match (ready, degraded) {
        (false, _) => "not_ready",
        (true, true) => "degraded",
        (true, false) => "ready",
    };
    let report = HealthReport { status, role: Some(state.role.as_str()), dependencies };
    if ready { HttpResponse::Ok().json(report) } else { HttpResponse::ServiceUnavailable().json(report) }
}

/// Prometheus metrics in the text exposition format.
// Behind `Authorization: Bearer <metrics.token>` when a token is configured; 404 when
// `metrics.enabled` is false.
#[utoipa::path(get, operation_id = "metrics", path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Metrics in the Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "`metrics.token` is set and the request does not carry it", content_type = "application/problem+json", body = Problem),
        (status = 404, description = "Metrics are disabled, or served on their own port (`metrics.port`)", content_type = "application/problem+json", body = Problem),
    ))]
pub async fn metrics(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let Some(endpoint) = &state.metrics else {
        return Err(ApiError::NotFound("metrics are disabled (metrics.enabled)".into()));
    };
    if endpoint.own_port && req.app_data::<crate::state::MetricsListener>().is_none() {
        return Err(ApiError::NotFound("metrics are served on their own port (metrics.port)".into()));
    }
    let expected = endpoint.token.expose_secret();
    if !expected.is_empty() {
        let given =
            req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
            return Err(ApiError::Unauthorized(AuthError::Invalid("the metrics token is missing or wrong".into())));
        }
    }
    if let Ok(stats) = endpoint.outbox.stats().await {
        let age = stats.oldest.map_or(0, |t| (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0) as u64);
        crate::metrics::record_outbox(stats.pending, age, stats.dead_letters);
    }
    if let Ok(Some(depth)) = endpoint.queue.depth().await {
        crate::metrics::record_queue_depth(depth);
    }
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(endpoint.handle.render()))
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
