//! Liveness and readiness.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use crate::startup::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct DependencyReport {
    pub name: String,
    pub ready: bool,
    pub detail: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `live`, `ready` or `not_ready`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<DependencyReport>,
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthReport)))]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(HealthReport { status: "live", dependencies: Vec::new() })
}

/// Every dependency is reachable.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready; each dependency reported", body = HealthReport),
        (status = 503, description = "A dependency is not ready", body = HealthReport),
    ))]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let mut dependencies = Vec::with_capacity(state.health.len());
    for check in &state.health {
        let health = check.check().await;
        dependencies.push(DependencyReport { name: health.name, ready: health.ready, detail: health.detail });
    }
    let ready = dependencies.iter().all(|d| d.ready);
    let report = HealthReport { status: if ready { "ready" } else { "not_ready" }, dependencies };
    if ready { HttpResponse::Ok().json(report) } else { HttpResponse::ServiceUnavailable().json(report) }
}
