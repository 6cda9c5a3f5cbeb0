//! Liveness and readiness.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<DependencyReport>,
}

/// The process is up.
#[utoipa::path(get, operation_id = "live", path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthReport)))]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(HealthReport { status: "live", dependencies: Vec::new() })
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
    let mut dependencies = Vec::with_capacity(state.health.len());
    for check in &state.health {
        let health = check.check().await;
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
    let report = HealthReport { status, dependencies };
    if ready { HttpResponse::Ok().json(report) } else { HttpResponse::ServiceUnavailable().json(report) }
}
