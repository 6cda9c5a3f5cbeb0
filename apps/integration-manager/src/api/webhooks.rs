//! `/api/v1/webhooks`: a tenant's webhook endpoints and their signing secrets.

use std::collections::BTreeMap;

use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::IntegrationId;
use im_domain::Stored;
use im_domain::services::WithSecret;
use im_domain::webhooks::endpoint::{Webhook, WebhookId, WebhookSpec, WebhookStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use im_domain::audit::AuditAction;

use super::body;
use super::extract::{Authenticated, IfMatch, JsonBody, Write, created, etag_header, unchanged};
use super::problem::{ApiError, ApiResult, Problem};
use super::{ListResponse, QueryParams, rfc3339};
use crate::state::AppState;

/// Whether an endpoint receives deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = WebhookStatus)]
pub enum WebhookStatusDto {
    Enabled,
    Disabled,
}

impl From<WebhookStatusDto> for WebhookStatus {
    fn from(dto: WebhookStatusDto) -> Self {
        match dto {
            WebhookStatusDto::Enabled => WebhookStatus::Enabled,
            WebhookStatusDto::Disabled => WebhookStatus::Disabled,
        }
    }
}

impl From<WebhookStatus> for WebhookStatusDto {
    fn from(status: WebhookStatus) -> Self {
        match status {
            WebhookStatus::Enabled => WebhookStatusDto::Enabled,
            WebhookStatus::Disabled => WebhookStatusDto::Disabled,
        }
    }
}

/// Body of `POST /webhooks` and `PUT /webhooks/{id}`. The read-only fields of the resource may
/// be sent back and are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookInput {
    /// https URL of the receiver (http and private addresses only where configuration allows).
    #[schema(
        max_length = 2048,
        pattern = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\x00-\x20\x7F-\x9F/?#]+([/?#][^\x00-\x20\x7F-\x9F]*)?$",
        example = "https://hooks.example.com/integration-manager"
    )]
    url: String,
    #[serde(default)]
    #[schema(max_length = 1000)]
    description: Option<String>,
    #[serde(default)]
    #[schema(schema_with = super::schemas::event_type_filters)]
    event_types: Vec<String>,
    /// Only events of these integrations; empty or absent: all.
    #[serde(default)]
    #[schema(max_items = 100)]
    integration_ids: Option<Vec<uuid::Uuid>>,
    /// `enabled` (default) or `disabled`; absent on update keeps the current status.
    #[serde(default)]
    status: Option<WebhookStatusDto>,
    #[serde(default)]
    #[schema(schema_with = super::schemas::webhook_headers)]
    headers: BTreeMap<String, String>,
    /// Deliveries beyond this rate wait (never dropped).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10000)]
    rate_limit_per_second: Option<u32>,
}

impl From<WebhookInput> for WebhookSpec {
    fn from(input: WebhookInput) -> Self {
        WebhookSpec {
            url: input.url,
            description: input.description.unwrap_or_default(),
            event_types: input.event_types,
            integration_ids: input.integration_ids.unwrap_or_default().into_iter().map(IntegrationId).collect(),
            status: input.status.map(Into::into),
            headers: input.headers,
            rate_limit_per_second: input.rate_limit_per_second,
        }
    }
}

/// A webhook endpoint. `secret` appears only in the answers of create and rotate-secret.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Webhook)]
pub struct WebhookView {
    id: uuid::Uuid,
    tenant_id: String,
    url: String,
    description: String,
    event_types: Vec<String>,
    integration_ids: Vec<uuid::Uuid>,
    status: WebhookStatusDto,
    disabled_reason: Option<String>,
    headers: BTreeMap<String, String>,
    rate_limit_per_second: Option<u32>,
    /// Until when the secret before the last rotation still signs deliveries.
    #[schema(format = DateTime)]
    previous_secret_expires_at: Option<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    created_by: String,
    updated_by: String,
    /// The signing secret (`whsec_...`): shown once, never again.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl WebhookView {
    fn of(w: &Webhook, secret: Option<String>) -> Self {
        Self {
            id: w.id.0,
            tenant_id: w.tenant_id.to_string(),
            url: w.url.clone(),
            description: w.description.clone(),
            event_types: w.event_types.clone(),
            integration_ids: w.integration_ids.iter().map(|i| i.0).collect(),
            status: w.status.into(),
            disabled_reason: w.disabled_reason.clone(),
            headers: w.headers.clone(),
            rate_limit_per_second: w.rate_limit_per_second,
            previous_secret_expires_at: w.previous_secret.as_ref().map(|p| rfc3339(p.expires_at)),
            created_at: rfc3339(w.created_at),
            updated_at: rfc3339(w.updated_at),
            created_by: w.created_by.to_string(),
            updated_by: w.updated_by.to_string(),
            secret,
        }
    }
}

/// Reads and checks a body.
async fn read_spec(state: &AppState, body: Value) -> ApiResult<WebhookSpec> {
    body::read(body, |input: WebhookInput| Ok(WebhookSpec::from(input)), async |spec: &WebhookSpec| state.webhooks.check(spec)).await
}

fn path_id(raw: &str) -> ApiResult<WebhookId> {
    WebhookId::parse(raw).ok_or_else(|| ApiError::NotFound(format!("webhook '{raw}' was not found")))
}

fn respond(mut builder: actix_web::HttpResponseBuilder, stored: &Stored<Webhook>, secret: Option<String>) -> HttpResponse {
    builder.insert_header(etag_header(&stored.etag)).json(WebhookView::of(&stored.value, secret))
}

/// List the caller's webhook endpoints.
#[utoipa::path(get, operation_id = "listWebhooks", path = "/api/v1/webhooks", tag = "webhooks",
    params(
        super::Paging,
    ),
    responses((status = 200, description = "A page of endpoints, oldest first; never their secrets", body = ListResponse<WebhookView>)),
    security(("bearer" = [])))]
pub async fn list(state: web::Data<AppState>, caller: Authenticated, req: HttpRequest) -> ApiResult<HttpResponse> {
    let mut query = QueryParams::parse(&req)?;
    let page = query.page();
    query.finish()?;
    let page = state.webhooks.list(&caller.0, &page.unwrap_or_else(|| im_domain::PageRequest::first(50))).await?;
    let items = page.items.iter().map(|s| WebhookView::of(&s.value, None)).collect();
    Ok(HttpResponse::Ok().json(ListResponse { items, continuation_token: page.continuation }))
}

/// Register an endpoint. The answer carries its signing secret, once.
#[utoipa::path(post, operation_id = "createWebhook", path = "/api/v1/webhooks", tag = "webhooks",
    request_body = WebhookInput,
    responses(
        (status = 201, description = "Created; `secret` is shown this once", body = WebhookView),
        (status = 409, description = "The tenant has `webhooks.max_endpoints_per_tenant` endpoints already", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, body: JsonBody) -> ApiResult<HttpResponse> {
    state.webhooks.authorize(&caller.0, AuditAction::Create).await?;
    let spec = read_spec(&state, body.0).await?;
    let WithSecret { webhook, secret } = state.webhooks.create(&caller.0, spec).await?;
    Ok(respond(created(format!("/api/v1/webhooks/{}", webhook.value.id)), &webhook, Some(secret.expose())))
}

/// Read an endpoint (never its secret).
#[utoipa::path(get, operation_id = "getWebhook", path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "The endpoint; `ETag` is set", body = WebhookView),
    ),
    security(("bearer" = [])))]
pub async fn get(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let stored = state.webhooks.get(&caller.0, path_id(&id)?).await?;
    Ok(unchanged(&req, &stored.etag).unwrap_or_else(|| respond(HttpResponse::Ok(), &stored, None)))
}

/// Replace an endpoint's settings.
#[utoipa::path(put, operation_id = "updateWebhook", path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id"), IfMatch),
    request_body = WebhookInput,
    responses((status = 200, description = "Updated", body = WebhookView)),
    security(("bearer" = [])))]
pub async fn update(state: web::Data<AppState>, write: Write, id: web::Path<String>, body: JsonBody) -> ApiResult<HttpResponse> {
    state.webhooks.authorize(&write.caller, AuditAction::Update).await?;
    let id = path_id(&id)?;
    let spec = read_spec(&state, body.0).await?;
    let stored = state.webhooks.update(&write.caller, id, spec, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &stored, None))
}

/// Delete an endpoint and its signing secrets.
#[utoipa::path(delete, operation_id = "deleteWebhook", path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id"), IfMatch),
    responses((status = 204, description = "Deleted")),
    security(("bearer" = [])))]
pub async fn delete(state: web::Data<AppState>, write: Write, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    state.webhooks.delete(&write.caller, id, write.tag()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Issue a new signing secret (shown once). The previous one keeps signing, beside the new
/// one, for `webhooks.previous_secret_grace`.
#[utoipa::path(post, operation_id = "rotateWebhookSecret", path = "/api/v1/webhooks/{id}/rotate-secret", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id"), IfMatch),
    responses((status = 200, description = "Rotated; `secret` is shown this once", body = WebhookView)),
    security(("bearer" = [])))]
pub async fn rotate_secret(state: web::Data<AppState>, write: Write, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    let WithSecret { webhook, secret } = state.webhooks.rotate_secret(&write.caller, id, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &webhook, Some(secret.expose())))
}
